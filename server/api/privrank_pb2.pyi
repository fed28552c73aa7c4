import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    SOURCE_CACHED: _ClassVar[Source]
    SOURCE_LIVE: _ClassVar[Source]
    SOURCE_POPULAR: _ClassVar[Source]
    SOURCE_CONTEXT: _ClassVar[Source]
    SOURCE_RECENT: _ClassVar[Source]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    IMPRESSION: _ClassVar[EventType]
    CLICK: _ClassVar[EventType]
    VIEW: _ClassVar[EventType]
    COMPLETE: _ClassVar[EventType]
    ACCEPT: _ClassVar[EventType]
    DISMISS: _ClassVar[EventType]
    RATING: _ClassVar[EventType]
    PURCHASE: _ClassVar[EventType]
SOURCE_UNSPECIFIED: Source
SOURCE_CACHED: Source
SOURCE_LIVE: Source
SOURCE_POPULAR: Source
SOURCE_CONTEXT: Source
SOURCE_RECENT: Source
EVENT_TYPE_UNSPECIFIED: EventType
IMPRESSION: EventType
CLICK: EventType
VIEW: EventType
COMPLETE: EventType
ACCEPT: EventType
DISMISS: EventType
RATING: EventType
PURCHASE: EventType

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "scope", "limit", "exclude_item_ids", "context")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    scope: str
    limit: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    context: EventContext
    def __init__(self, user_id: _Optional[str] = ..., scope: _Optional[str] = ..., limit: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., context: _Optional[_Union[EventContext, _Mapping]] = ...) -> None: ...

class RankCandidatesRequest(_message.Message):
    __slots__ = ("user_id", "scope", "candidate_item_ids", "limit")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    scope: str
    candidate_item_ids: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    def __init__(self, user_id: _Optional[str] = ..., scope: _Optional[str] = ..., candidate_item_ids: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("item_id", "scope", "limit")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    scope: str
    limit: int
    def __init__(self, item_id: _Optional[str] = ..., scope: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class RankedItems(_message.Message):
    __slots__ = ("items", "model_version", "source", "variant")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: str
    source: Source
    variant: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., source: _Optional[_Union[Source, str]] = ..., variant: _Optional[str] = ...) -> None: ...

class EventContext(_message.Message):
    __slots__ = ("session_id", "device_category", "country_code", "utc_offset_minutes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_CODE_FIELD_NUMBER: _ClassVar[int]
    UTC_OFFSET_MINUTES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    device_category: str
    country_code: str
    utc_offset_minutes: int
    def __init__(self, session_id: _Optional[str] = ..., device_category: _Optional[str] = ..., country_code: _Optional[str] = ..., utc_offset_minutes: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("user_id", "item_id", "scope", "event_type", "value", "occurred_at", "context")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    scope: str
    event_type: EventType
    value: float
    occurred_at: _timestamp_pb2.Timestamp
    context: EventContext
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., scope: _Optional[str] = ..., event_type: _Optional[_Union[EventType, str]] = ..., value: _Optional[float] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., context: _Optional[_Union[EventContext, _Mapping]] = ...) -> None: ...

class RecordEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class RecordEventsResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class GetSettingsRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class UserSettings(_message.Message):
    __slots__ = ("user_id", "personalization_enabled", "data_sharing_consent", "updated_at")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZATION_ENABLED_FIELD_NUMBER: _ClassVar[int]
    DATA_SHARING_CONSENT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    personalization_enabled: bool
    data_sharing_consent: bool
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[str] = ..., personalization_enabled: _Optional[bool] = ..., data_sharing_consent: _Optional[bool] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UpdateSettingsRequest(_message.Message):
    __slots__ = ("user_id", "personalization_enabled", "data_sharing_consent")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZATION_ENABLED_FIELD_NUMBER: _ClassVar[int]
    DATA_SHARING_CONSENT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    personalization_enabled: bool
    data_sharing_consent: bool
    def __init__(self, user_id: _Optional[str] = ..., personalization_enabled: _Optional[bool] = ..., data_sharing_consent: _Optional[bool] = ...) -> None: ...

class ExportUserDataRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class FeatureVector(_message.Message):
    __slots__ = ("scope", "values", "embedding", "updated_at")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    scope: str
    values: _containers.ScalarMap[str, float]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, scope: _Optional[str] = ..., values: _Optional[_Mapping[str, float]] = ..., embedding: _Optional[_Iterable[float]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EventCount(_message.Message):
    __slots__ = ("scope", "event_type", "count")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    scope: str
    event_type: EventType
    count: int
    def __init__(self, scope: _Optional[str] = ..., event_type: _Optional[_Union[EventType, str]] = ..., count: _Optional[int] = ...) -> None: ...

class UserDataExport(_message.Message):
    __slots__ = ("settings", "features", "event_counts", "cached_rankings")
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_RANKINGS_FIELD_NUMBER: _ClassVar[int]
    settings: UserSettings
    features: _containers.RepeatedCompositeFieldContainer[FeatureVector]
    event_counts: _containers.RepeatedCompositeFieldContainer[EventCount]
    cached_rankings: int
    def __init__(self, settings: _Optional[_Union[UserSettings, _Mapping]] = ..., features: _Optional[_Iterable[_Union[FeatureVector, _Mapping]]] = ..., event_counts: _Optional[_Iterable[_Union[EventCount, _Mapping]]] = ..., cached_rankings: _Optional[int] = ...) -> None: ...

class DeleteUserDataRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class DeletionReceipt(_message.Message):
    __slots__ = ("user_id", "removed", "deleted_at")
    class RemovedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    DELETED_AT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    removed: _containers.ScalarMap[str, int]
    deleted_at: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[str] = ..., removed: _Optional[_Mapping[str, int]] = ..., deleted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ("scope",)
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    scope: str
    def __init__(self, scope: _Optional[str] = ...) -> None: ...

class OfflineEvaluation(_message.Message):
    __slots__ = ("model_version", "model", "values", "evaluated_at", "users_evaluated")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_AT_FIELD_NUMBER: _ClassVar[int]
    USERS_EVALUATED_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    model: str
    values: _containers.ScalarMap[str, float]
    evaluated_at: _timestamp_pb2.Timestamp
    users_evaluated: int
    def __init__(self, model_version: _Optional[str] = ..., model: _Optional[str] = ..., values: _Optional[_Mapping[str, float]] = ..., evaluated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., users_evaluated: _Optional[int] = ...) -> None: ...

class OnlineMetrics(_message.Message):
    __slots__ = ("requests", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "cache_hit_rate", "fallback_rate", "opt_out_rate", "served_by_source", "served_by_variant", "click_through_by_variant", "acceptance_by_variant")
    class ServedBySourceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ServedByVariantEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ClickThroughByVariantEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class AcceptanceByVariantEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P95_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_RATE_FIELD_NUMBER: _ClassVar[int]
    OPT_OUT_RATE_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_VARIANT_FIELD_NUMBER: _ClassVar[int]
    CLICK_THROUGH_BY_VARIANT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_BY_VARIANT_FIELD_NUMBER: _ClassVar[int]
    requests: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    cache_hit_rate: float
    fallback_rate: float
    opt_out_rate: float
    served_by_source: _containers.ScalarMap[str, int]
    served_by_variant: _containers.ScalarMap[str, int]
    click_through_by_variant: _containers.ScalarMap[str, float]
    acceptance_by_variant: _containers.ScalarMap[str, float]
    def __init__(self, requests: _Optional[int] = ..., latency_p50_ms: _Optional[float] = ..., latency_p95_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., cache_hit_rate: _Optional[float] = ..., fallback_rate: _Optional[float] = ..., opt_out_rate: _Optional[float] = ..., served_by_source: _Optional[_Mapping[str, int]] = ..., served_by_variant: _Optional[_Mapping[str, int]] = ..., click_through_by_variant: _Optional[_Mapping[str, float]] = ..., acceptance_by_variant: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("scope", "offline", "online")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    scope: str
    offline: _containers.RepeatedCompositeFieldContainer[OfflineEvaluation]
    online: OnlineMetrics
    def __init__(self, scope: _Optional[str] = ..., offline: _Optional[_Iterable[_Union[OfflineEvaluation, _Mapping]]] = ..., online: _Optional[_Union[OnlineMetrics, _Mapping]] = ...) -> None: ...

class RunJobRequest(_message.Message):
    __slots__ = ("name", "scope")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    scope: str
    def __init__(self, name: _Optional[str] = ..., scope: _Optional[str] = ...) -> None: ...

class JobRun(_message.Message):
    __slots__ = ("run_id", "name", "scope", "status", "detail", "started_at", "finished_at")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    name: str
    scope: str
    status: str
    detail: str
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    def __init__(self, run_id: _Optional[int] = ..., name: _Optional[str] = ..., scope: _Optional[str] = ..., status: _Optional[str] = ..., detail: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListJobRunsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListJobRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[JobRun]
    def __init__(self, runs: _Optional[_Iterable[_Union[JobRun, _Mapping]]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("model_versions",)
    class ModelVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model_versions: _containers.ScalarMap[str, str]
    def __init__(self, model_versions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("scope",)
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    scope: str
    def __init__(self, scope: _Optional[str] = ...) -> None: ...

class ScopeModel(_message.Message):
    __slots__ = ("scope", "model_version", "created_at", "items", "users", "dimensions", "retrieval")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    scope: str
    model_version: str
    created_at: _timestamp_pb2.Timestamp
    items: int
    users: int
    dimensions: int
    retrieval: str
    def __init__(self, scope: _Optional[str] = ..., model_version: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., items: _Optional[int] = ..., users: _Optional[int] = ..., dimensions: _Optional[int] = ..., retrieval: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("scopes", "personalization_enabled")
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZATION_ENABLED_FIELD_NUMBER: _ClassVar[int]
    scopes: _containers.RepeatedCompositeFieldContainer[ScopeModel]
    personalization_enabled: bool
    def __init__(self, scopes: _Optional[_Iterable[_Union[ScopeModel, _Mapping]]] = ..., personalization_enabled: _Optional[bool] = ...) -> None: ...

class SetFlagsRequest(_message.Message):
    __slots__ = ("personalization_enabled",)
    PERSONALIZATION_ENABLED_FIELD_NUMBER: _ClassVar[int]
    personalization_enabled: bool
    def __init__(self, personalization_enabled: _Optional[bool] = ...) -> None: ...

class Flags(_message.Message):
    __slots__ = ("personalization_enabled",)
    PERSONALIZATION_ENABLED_FIELD_NUMBER: _ClassVar[int]
    personalization_enabled: bool
    def __init__(self, personalization_enabled: _Optional[bool] = ...) -> None: ...
