"""Hostile input, end to end: every RPC of the Ranking, Settings and Admin services is fuzzed
with requests generated from the proto descriptor, with payloads that are not valid protobuf
(random bytes, invalid UTF-8, truncation, corrupt tags) and with oversized messages; the CSV
importer is fed random files. Every answer must be OK or a precise status -- never UNKNOWN or
INTERNAL -- and the server keeps serving.

How it runs: ``@given`` cannot drive a coroutine, so hypothesis drives a synchronous function
that calls the in-process server through a blocking grpc channel, and the async test awaits it
with ``asyncio.to_thread``; the server meanwhile keeps running on the session loop.

The generators here are shared with ``tests/bench/fuzz.py``, which sends 10,000+ requests per
RPC. Keep this module importable without the fixtures.

Side effects on the shared seeded data are kept out: user IDs sent to UpdateSettings and
DeleteUserData are prefixed so they never name a seeded (or any other test's) user, RunJob only
ever gets names that are not jobs, SetFlags never turns personalization off, and the rows
RecordEvents stored are removed when the module ends.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import hmac
import io
import json
import math
import operator
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import hypothesis
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.unknown_fields import UnknownFieldSet
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from features.errors import InvalidInput
from features.schema import DEVICE_CATEGORIES, Interaction, validate_id, validate_scope
from jobs.importer import ColumnMap, read_interactions
from jobs.runner import JOB_NAMES
from server.api import privrank_pb2 as pb
from server.auth import POLICY, Role
from tests.conftest import Client

F = FieldDescriptor
Code = grpc.StatusCode

EXAMPLES_PER_RPC = 150  # generated requests per RPC in the test suite (the bench sends 10,000+)
UNDECODABLE_PER_RPC = 40
CALL_TIMEOUT_S = 15.0

# The statuses a hostile request may end in. UNAVAILABLE is deliberately not among them: the
# server maps StoreUnavailable -- and with it *any* unexpected PostgreSQL error, e.g. a malformed
# statement or a driver bug -- to UNAVAILABLE, and the client reports a crashed server or a
# dropped connection as UNAVAILABLE too. So UNAVAILABLE passes only when its details say a
# store timed out or could not be reached (a loaded 2-core machine can exceed Redis' 50 ms
# budget); any other UNAVAILABLE is a bug hidden behind a retryable status.
ACCEPTED: frozenset[Code] = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.PERMISSION_DENIED,
        Code.RESOURCE_EXHAUSTED,
        Code.FAILED_PRECONDITION,
        Code.DEADLINE_EXCEEDED,
    }
)
NEVER: frozenset[Code] = frozenset({Code.UNKNOWN, Code.INTERNAL})
_TRANSIENT = re.compile(
    r"^(PostgreSQL|Redis): \w*(Timeout|Connection|QueryCanceled)\w*(Error)?:", re.IGNORECASE
)

FUZZ_PREFIX = "fuzz-"  # user IDs that mutating RPCs may touch
_ID_CHARS = re.compile(r"[A-Za-z0-9_.:\-/]+")


# ---------------------------------------------------------------------------------------------
# The RPCs, from the descriptor
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    service: str  # full name, e.g. privrank.v1.Ranking
    name: str
    input: Descriptor
    output: Descriptor

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.input)

    @property
    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.output)

    def __str__(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.name}"


RPCS: tuple[Rpc, ...] = tuple(
    Rpc(service.full_name, method.name, method.input_type, method.output_type)
    for service in pb.DESCRIPTOR.services_by_name.values()
    for method in service.methods
)


def roles_for(rpc: Rpc) -> list[Role]:
    """The roles the policy lets call ``rpc`` (every one of them is used by the fuzzer)."""
    return sorted(POLICY.get(rpc.path, frozenset({Role.ADMIN})), key=lambda r: r.value)


# ---------------------------------------------------------------------------------------------
# Keeping the fuzzer from destroying the data it runs against
# ---------------------------------------------------------------------------------------------


def _own_user(request: Message) -> None:
    """A user ID that could be valid is moved into the fuzzer's namespace: never a seeded user
    (u0…u999) nor one another test relies on."""
    user_id = request.user_id  # type: ignore[attr-defined]
    if _ID_CHARS.fullmatch(user_id):
        request.user_id = FUZZ_PREFIX + user_id  # type: ignore[attr-defined]


def _no_real_job(request: Message) -> None:
    """RunJob with a real job name spawns a process: only names that are not jobs are sent."""
    if request.name in JOB_NAMES:  # type: ignore[attr-defined]
        request.name += "?"  # type: ignore[attr-defined]


def _personalization_stays_on(request: Message) -> None:
    if request.HasField("personalization_enabled") and not request.personalization_enabled:  # type: ignore[attr-defined]
        request.personalization_enabled = True  # type: ignore[attr-defined]


# Every RPC must be listed in exactly one of these two tables; a new RPC fails
# test_every_rpc_is_classified_for_fuzzing until someone decided how to fuzz it safely.
SANITIZERS: dict[str, Callable[[Message], None]] = {
    "/privrank.v1.Settings/UpdateSettings": _own_user,
    "/privrank.v1.Settings/DeleteUserData": _own_user,
    "/privrank.v1.Admin/RunJob": _no_real_job,
    "/privrank.v1.Admin/SetFlags": _personalization_stays_on,
}
HARMLESS: frozenset[str] = frozenset(
    {
        "/privrank.v1.Ranking/Recommend",
        "/privrank.v1.Ranking/RankCandidates",
        "/privrank.v1.Ranking/SimilarItems",
        "/privrank.v1.Ranking/RecordEvents",  # stored rows are removed at the end (see `fuzz`)
        "/privrank.v1.Settings/GetSettings",
        "/privrank.v1.Settings/ExportUserData",
        "/privrank.v1.Admin/GetMetrics",
        "/privrank.v1.Admin/ListJobRuns",
        "/privrank.v1.Admin/Reload",
        "/privrank.v1.Admin/GetModelInfo",
    }
)
WRITES: frozenset[str] = frozenset(
    {
        "/privrank.v1.Ranking/RecordEvents",
        "/privrank.v1.Settings/UpdateSettings",
        "/privrank.v1.Settings/DeleteUserData",
    }
)


def sanitize(rpc: Rpc, request: Message) -> Message:
    if rpc.path not in SANITIZERS and rpc.path not in HARMLESS:
        raise AssertionError(f"{rpc.path} is new: add it to SANITIZERS or HARMLESS")
    if rpc.path in SANITIZERS:
        SANITIZERS[rpc.path](request)
    return request


def sanitize_payload(rpc: Rpc, payload: bytes) -> bytes:
    """Raw bytes that happen to parse are sanitized like generated requests."""
    try:
        request = rpc.request_class.FromString(payload)
    except DecodeError:
        return payload  # the server cannot parse it either
    before = request.SerializeToString()
    sanitize(rpc, request)
    after = request.SerializeToString()
    return payload if after == before else after


# ---------------------------------------------------------------------------------------------
# Strategies: one per field type, built from the descriptor
# ---------------------------------------------------------------------------------------------

_INT_RANGES: dict[int, tuple[int, int]] = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
_INT_EDGES = (0, 1, -1, 2, 10, 20, 100, 999, 1000, 1001, 9999, 10_000, 10_001, -720, 840, 841)

# Strings chosen to break parsers, validators, logs and SQL: empty, boundaries of the ID
# length, PII look-alikes, control and bidi characters, non-ASCII case mappings, injection.
NASTY_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "default",
    "DEFAULT",
    " default",
    "u1",
    "u1 ",
    "i1",
    "fuzz",
    "a" * 128,
    "a" * 129,
    "x@example.com",
    "+44 20 7946 0958",
    "(555) 123-4567",
    "221B Baker Street",
    "SW1A 1AA",
    "12345-6789",
    "\x00",
    "u1\x00",
    "\t\r\n",
    "\u202eu1",
    "\ufeffdefault",
    "\u0130",
    "ß",
    "\U0001f4a5",
    "é" * 100,
    "../../etc/passwd",
    "' OR '1'='1' --",
    "'; DROP TABLE events; --",
    "%s%s%n%x",
    "${jndi:ldap://x/a}",
    "{{7*7}}",
    "nightly ",
    "NaN",
    "-0",
    "9" * 400,
    "\\",
    '"',
    ",",
    "privrank:rank:default:u1",
)
_CHARS = st.characters(exclude_categories=("Cs",))  # proto strings cannot hold surrogates
_ID_LIKE = st.from_regex(r"[A-Za-z0-9_.:\-/]{1,130}", fullmatch=True)
_SHORT_ID = st.from_regex(r"[A-Za-z0-9_.:\-/]{1,20}", fullmatch=True)
_SEEDED_USERS = st.integers(0, 260).map("u{}".format)
_SEEDED_ITEMS = st.integers(0, 130).map("i{}".format)

# Sizes: 2 = a singular field (up to 1 MB strings), 1 = an element of a list, 0 = an element of
# a huge list (tens of thousands of copies; kept short so the message stays near the cap).
_LONG = {0: (), 1: (129, 1024), 2: (129, 1024, 65_537, 1_000_000)}
_TEXT_MAX = {0: 8, 1: 40, 2: 300}
_HUGE_SCALARS = (1000, 1001, 10_000, 10_001, 50_000)
_HUGE_MESSAGES = (1000, 1001, 3000)

# Hints steer the "plausible" half of the examples towards values that pass validation, so the
# paths behind it (the ranker, the stores) are reached. They are keyed by field name and type;
# every field, hinted or not, also gets the wild strategy of its type.
_S, _I, _D = F.TYPE_STRING, F.TYPE_INT32, F.TYPE_DOUBLE
HINTS: dict[tuple[str, int], SearchStrategy[Any]] = {
    ("user_id", _S): st.one_of(_SEEDED_USERS, _SHORT_ID),
    ("item_id", _S): st.one_of(_SEEDED_ITEMS, _SHORT_ID),
    ("exclude_item_ids", _S): _SEEDED_ITEMS,
    ("candidate_item_ids", _S): st.one_of(_SEEDED_ITEMS, _SHORT_ID),
    ("scope", _S): st.sampled_from(["", "default", "no-such-scope"]),
    ("limit", _I): st.integers(0, 1001),
    ("session_id", _S): _SHORT_ID,
    ("device_category", _S): st.sampled_from([*DEVICE_CATEGORIES, "", "MOBILE", "phone"]),
    ("country_code", _S): st.sampled_from(["", "US", "de", "GB", "XX", "U", "USA", "1A"]),
    ("utc_offset_minutes", _I): st.integers(-721, 841),
    ("value", _D): st.floats(-1e6, 1e6),
}


def _weighted(*choices: tuple[int, SearchStrategy[Any]]) -> SearchStrategy[Any]:
    """One of the strategies, each with its weight (``st.one_of`` favours its first branches
    too much for rare-but-important values to show up reliably in a few hundred examples)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(_Pick(table))


class _Pick:
    """``table.__getitem__`` with a short repr (hypothesis puts strategy reprs in its event
    log; a 40 kB one draws a HypothesisWarning, an error under this suite's settings)."""

    def __init__(self, table: list[SearchStrategy[Any]]) -> None:
        self._table = table

    def __call__(self, index: int) -> SearchStrategy[Any]:
        return self._table[index]

    def __repr__(self) -> str:
        return f"pick-one-of-{len(self._table)}"


def _strings(size: int) -> SearchStrategy[str]:
    parts = [
        (3, st.text(_CHARS, max_size=_TEXT_MAX[size])),
        (2, _ID_LIKE),
        (2, st.sampled_from(NASTY_STRINGS)),
    ]
    if _LONG[size]:
        parts.append((1, st.builds(operator.mul, _CHARS, st.sampled_from(_LONG[size]))))
    return _weighted(*parts)


def _ints(low: int, high: int) -> SearchStrategy[int]:
    edges = sorted({v for v in (*_INT_EDGES, low, high, low + 1, high - 1) if low <= v <= high})
    return _weighted((1, st.integers(low, high)), (1, st.sampled_from(edges)))


def _enum(enum: EnumDescriptor, plausible: bool) -> SearchStrategy[int]:
    known = [v.number for v in enum.values]
    if plausible:
        return st.sampled_from(known)
    # proto3 enums are open: any int32 may arrive on the wire
    return _weighted((1, st.sampled_from(known)), (1, _ints(-(2**31), 2**31 - 1)))


def _mostly(likely: SearchStrategy[Any], other: SearchStrategy[Any]) -> SearchStrategy[Any]:
    """``likely`` nine times in ten, ``other`` otherwise."""
    return _weighted((9, likely), (1, other))


def _scalar(f: FieldDescriptor, plausible: bool, size: int) -> SearchStrategy[Any]:
    t = f.type
    if t == F.TYPE_STRING:
        wild: SearchStrategy[Any] = _strings(size)
        tame: SearchStrategy[Any] = _SHORT_ID
    elif t == F.TYPE_BYTES:
        wild = tame = st.binary(max_size=64)
    elif t == F.TYPE_BOOL:
        wild = tame = st.booleans()
    elif t == F.TYPE_DOUBLE:
        wild, tame = st.floats(), st.floats(-1e3, 1e3)
    elif t == F.TYPE_FLOAT:
        wild, tame = st.floats(width=32), st.floats(-1e3, 1e3, width=32)
    elif t == F.TYPE_ENUM:
        wild, tame = _enum(f.enum_type, False), _enum(f.enum_type, True)
    elif t in _INT_RANGES:
        low, high = _INT_RANGES[t]
        wild, tame = _ints(low, high), st.integers(max(low, -1000), min(high, 1000))
    else:  # a field type this fuzzer does not know yet: fail loudly, never skip it
        raise TypeError(f"no strategy for {f.full_name} (type {t})")
    if not plausible:
        return wild
    return _mostly(HINTS.get((f.name, t), tame), wild)


def _stamp(seconds: int, nanos: int) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


def _stamp_of(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _stamp_ago(delta_s: int) -> Timestamp:
    return _stamp_of(datetime.now(UTC) - timedelta(seconds=delta_s))


def _timestamps(plausible: bool) -> SearchStrategy[Timestamp]:
    """Recent times (some in the future), any valid time, and out-of-range seconds/nanos."""
    recent = st.integers(-86_400, 400 * 86_400).map(_stamp_ago)
    valid = st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)
    ).map(lambda d: _stamp_of(d.replace(tzinfo=UTC)))
    wild = st.builds(_stamp, _ints(-(2**63), 2**63 - 1), _ints(-(2**31), 2**31 - 1))
    edges = st.sampled_from(
        [
            (-62_135_596_800, 0),  # 0001-01-01, the first valid second
            (-62_135_596_801, 0),
            (253_402_300_799, 999_999_999),  # 9999-12-31T23:59:59.999999999
            (253_402_300_800, 0),
            (0, -1),
            (0, 1_000_000_000),
            (2**63 - 1, 0),
            (-(2**63), 0),
        ]
    ).map(lambda sn: _stamp(*sn))
    if plausible:  # mostly valid, some at or beyond the edges
        return _weighted((5, recent), (2, valid), (2, edges), (1, wild))
    return _weighted((1, recent), (1, valid), (1, edges), (1, wild))


def _unknown_fields(desc: Descriptor) -> SearchStrategy[bytes]:
    """Well-formed fields with numbers ``desc`` does not define (wire types 0, 1, 2, 5)."""
    used = {f.number for f in desc.fields}
    number = st.one_of(st.integers(1, 40), st.integers(1, 2**29 - 1)).filter(
        lambda n: n not in used and not 19_000 <= n <= 19_999
    )
    one = st.one_of(
        st.builds(lambda n, v: _tag(n, 0) + _varint(v), number, st.integers(0, 2**64 - 1)),
        st.builds(lambda n, v: _tag(n, 1) + v, number, st.binary(min_size=8, max_size=8)),
        st.builds(lambda n, v: _tag(n, 2) + _varint(len(v)) + v, number, st.binary(max_size=64)),
        st.builds(lambda n, v: _tag(n, 5) + v, number, st.binary(min_size=4, max_size=4)),
    )
    return st.lists(one, min_size=1, max_size=3).map(b"".join)


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == F.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _single(f: FieldDescriptor, plausible: bool, size: int, depth: int) -> SearchStrategy[Any]:
    if f.type == F.TYPE_MESSAGE:
        return message_strategy(f.message_type, plausible, size, depth + 1)
    return _scalar(f, plausible, size)


def _field(f: FieldDescriptor, plausible: bool, size: int, depth: int) -> SearchStrategy[Any]:
    if _is_map(f):
        key = _single(f.message_type.fields_by_name["key"], plausible, 0, depth)
        value = _single(f.message_type.fields_by_name["value"], plausible, 0, depth)
        return st.dictionaries(key, value, max_size=8)
    if not f.is_repeated:
        return _single(f, plausible, size, depth)
    element = _single(f, plausible, min(size, 1), depth)
    few = st.lists(element, min_size=1, max_size=4) if plausible else st.lists(element, max_size=12)
    if size == 0:
        return few
    counts = _HUGE_MESSAGES if f.type == F.TYPE_MESSAGE else _HUGE_SCALARS
    huge = st.builds(
        operator.mul,
        st.lists(_single(f, plausible, 0, depth), min_size=1, max_size=1),
        st.sampled_from(counts),
    )
    return _mostly(few, huge)


def _build(cls: type[Message], values: dict[str, Any], unknown: bytes) -> Message:
    message = cls()
    for name, value in values.items():
        f = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name) if f.type == F.TYPE_MESSAGE or f.is_repeated else None
        if _is_map(f):
            for k, v in value.items():
                if isinstance(v, Message):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif f.is_repeated:
            target.extend(value)
        elif f.type == F.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    if unknown:
        message.MergeFromString(unknown)
    return message


MAX_DEPTH = 4


@cache
def message_strategy(
    desc: Descriptor, plausible: bool, size: int = 2, depth: int = 0
) -> SearchStrategy[Message]:
    """Messages of type ``desc``: every field may be unset or set to any value of its type,
    repeated fields short or huge, nested messages recursively, plus unknown fields."""
    cls = message_factory.GetMessageClass(desc)
    if desc.full_name == "google.protobuf.Timestamp":
        return _timestamps(plausible)
    if depth > MAX_DEPTH:
        return st.just(cls())
    fields = {f.name: _field(f, plausible, size, depth) for f in desc.fields}
    unknown = _unknown_fields(desc)
    if plausible:  # every field set, except that fields with presence may stay unset
        values = st.fixed_dictionaries(
            {name: s for name, s in fields.items() if not desc.fields_by_name[name].has_presence},
            optional={n: s for n, s in fields.items() if desc.fields_by_name[n].has_presence},
        )
        extra = _mostly(st.just(b""), unknown)
    else:  # any subset of the fields
        values = st.fixed_dictionaries({}, optional=fields)
        extra = st.one_of(st.just(b""), unknown)
    return st.builds(_build, st.just(cls), values, extra)


def request_strategy(rpc: Rpc) -> SearchStrategy[Message]:
    """Wild requests (anything the wire allows) and plausible ones (mostly valid values, so the
    deeper layers are reached), half and half."""
    return _weighted(
        (1, message_strategy(rpc.input, False)), (1, message_strategy(rpc.input, True))
    )


def short(message: Message) -> str:
    """A one-line description of a (possibly huge) message, for failure reports."""
    parts = []
    for f, value in message.ListFields():
        if f.is_repeated:
            first = next(iter(value), None)
            text = short(first) if isinstance(first, Message) else repr(first)[:60]
            parts.append(f"{f.name}=[{len(value)} x, first {text}]")
        elif isinstance(value, Message):
            parts.append(f"{f.name}={short(value)}")
        else:
            text = repr(value)
            parts.append(f"{f.name}={text[:80]}" + (f"...({len(text)})" if len(text) > 80 else ""))
    unknown = len(UnknownFieldSet(message))
    suffix = f" +{unknown} unknown fields" if unknown else ""
    return f"{type(message).__name__}({', '.join(parts)}){suffix}"


class Shown:
    """A generated value with a short repr: hypothesis prints failing examples, and the repr
    of a 1 MB request is useless (and, with warnings as errors, fatal: HypothesisWarning)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        if isinstance(self.value, Message):
            return short(self.value)
        return describe(self.value, 200)


@st.composite
def shown(draw: st.DrawFn, strategy: SearchStrategy[Any]) -> Shown:
    """``strategy``'s values wrapped in Shown (a composite: hypothesis prints the repr of what
    it returns, not the calls that built it)."""
    return Shown(draw(strategy))


# -- boundary values, deterministic: every field at each of its extremes, the others valid ---

_GOOD_STRINGS = {
    "user_id": "u1",
    "item_id": "i1",
    "candidate_item_ids": "i2",
    "exclude_item_ids": "i3",
}


def baseline(desc: Descriptor) -> Message:
    """A request that passes validation (as far as generic defaults get): known IDs, the
    first non-zero enum value, one element in repeated fields that have a good value."""
    message = message_factory.GetMessageClass(desc)()
    for f in desc.fields:
        if f.type == F.TYPE_ENUM:
            value: Any = next((v.number for v in f.enum_type.values if v.number), 0)
        elif f.type == F.TYPE_STRING and f.name in _GOOD_STRINGS:
            value = _GOOD_STRINGS[f.name]
        elif f.type == F.TYPE_MESSAGE and f.is_repeated and not _is_map(f):
            getattr(message, f.name).add().CopyFrom(baseline(f.message_type))
            continue
        else:
            continue
        if f.is_repeated:
            getattr(message, f.name).append(value)
        else:
            setattr(message, f.name, value)
    return message


_STAMP_EDGES = ((2**63 - 1, 0), (-(2**63), 0), (253_402_300_800, 0), (0, -1), (0, 10**9))


def _extreme_values(f: FieldDescriptor) -> list[Any]:
    t = f.type
    if t == F.TYPE_STRING:
        return ["", "a" * 129, "\x00", "\u202e", "x" * 1_000_000, "é" * 200_000]
    if t == F.TYPE_BYTES:
        return [b"", b"\xff" * 1_000_000]
    if t == F.TYPE_BOOL:
        return [True, False]
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        big = 3.4e38 if t == F.TYPE_FLOAT else 1.7976931348623157e308
        return [math.nan, math.inf, -math.inf, big, -big, -0.0, 1e-45]
    if t == F.TYPE_ENUM:
        top = max(v.number for v in f.enum_type.values)
        return [-1, -(2**31), 2**31 - 1, top + 1]
    low, high = _INT_RANGES[t]
    return sorted({v for v in (low, high, -1, 0, 1000, 1001, 10_001) if low <= v <= high})


def extreme_requests(desc: Descriptor, depth: int = 0) -> Iterator[Message]:
    """One message per (field, extreme value): huge limits, huge ID and event lists, out-of-range
    timestamps and enums, NaN and infinities, oversized strings."""
    if depth > MAX_DEPTH:
        return
    base = baseline(desc)
    for f in desc.fields:
        if _is_map(f):
            continue
        variants: list[Callable[[Message], None]] = []
        if f.type == F.TYPE_MESSAGE:
            sub = f.message_type
            if sub.full_name == "google.protobuf.Timestamp":
                subs: list[Message] = [_stamp(s, n) for s, n in _STAMP_EDGES]
            else:
                subs = list(extreme_requests(sub, depth + 1))
            for value in subs:
                if f.is_repeated:
                    variants.append(lambda m, f=f, v=value: getattr(m, f.name).add().CopyFrom(v))
                else:
                    variants.append(lambda m, f=f, v=value: getattr(m, f.name).CopyFrom(v))
            if f.is_repeated:
                one = baseline(sub)
                for n in (1000, 1001, 10_000):
                    variants.append(lambda m, f=f, o=one, n=n: getattr(m, f.name).extend([o] * n))
        elif f.is_repeated:
            good = _GOOD_STRINGS.get(f.name, "a") if f.type == F.TYPE_STRING else None
            for n in (10_000, 10_001, 100_000):
                if good is not None:
                    variants.append(lambda m, f=f, g=good, n=n: getattr(m, f.name).extend([g] * n))
            for value in _extreme_values(f):
                variants.append(lambda m, f=f, v=value: getattr(m, f.name).append(v))
        else:
            for value in _extreme_values(f):
                variants.append(lambda m, f=f, v=value: setattr(m, f.name, v))
        for apply in variants:
            message = type(base)()
            message.CopyFrom(base)
            if f.is_repeated:
                message.ClearField(f.name)  # type: ignore[arg-type]
            apply(message)
            yield message


# -- payloads that are not valid protobuf --------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _len_field(number: int, body: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(body)) + body


def string_paths(desc: Descriptor, depth: int = 0) -> list[tuple[int, ...]]:
    """Field-number paths from ``desc`` to every (nested) string field."""
    paths: list[tuple[int, ...]] = []
    for f in desc.fields:
        if f.type == F.TYPE_STRING:
            paths.append((f.number,))
        elif f.type == F.TYPE_MESSAGE and depth < MAX_DEPTH:
            paths.extend((f.number, *p) for p in string_paths(f.message_type, depth + 1))
    return paths


def _nested(path: tuple[int, ...], body: bytes) -> bytes:
    for number in reversed(path):
        body = _len_field(number, body)
    return body


BAD_UTF8: tuple[bytes, ...] = (
    b"\xff",
    b"u1\xfe",
    b"\xc0\x80",  # overlong NUL
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xe2\x82",  # truncated sequence
    b"\x80",
)
CORRUPT: tuple[bytes, ...] = (
    b"\x00",  # field number 0
    b"\x07",  # wire type 7
    b"\x0e\x01",  # wire type 6
    b"\x08" + b"\xff" * 11,  # varint longer than 10 bytes
    b"\x0a\xff\xff\xff\xff\x0f",  # length far beyond the message
    b"\x0a\x05ab",  # length beyond the message
    b"\x0b",  # a group that never ends
    b"\x0c",  # an end-group without a start
    b"\x0b" * 200 + b"\x0c" * 200,  # nesting beyond the parser's depth limit
    b"\x0d\x01\x02",  # truncated fixed32
    b"\x09\x01\x02\x03",  # truncated fixed64
)


def undecodable_strategy(rpc: Rpc) -> SearchStrategy[bytes]:
    """Payloads for ``rpc``: random bytes, a valid request with an invalid UTF-8 string at some
    (nested) string field, a truncated request, a request followed by a corrupt field."""
    valid = request_strategy(rpc).map(lambda m: m.SerializeToString())
    parts = [
        st.binary(min_size=1, max_size=256),
        st.builds(operator.add, valid, st.sampled_from(CORRUPT)),
        st.builds(lambda raw, cut: raw[: max(0, len(raw) - 1 - cut)], valid, st.integers(0, 64)),
    ]
    paths = string_paths(rpc.input)
    if paths:
        parts.append(
            st.builds(
                lambda raw, path, bad: raw + _nested(path, bad),
                valid,
                st.sampled_from(paths),
                st.sampled_from(BAD_UTF8),
            )
        )
    return st.one_of(parts)


def oversized_payload(rpc: Rpc, max_bytes: int) -> bytes:
    """A valid request padded with an unknown field to just above ``max_bytes``."""
    base = baseline(rpc.input).SerializeToString()
    unused = max({f.number for f in rpc.input.fields} | {0}) + 100
    pad = max_bytes - len(base) + 1
    return base + _len_field(unused, b"\x00" * pad)


# ---------------------------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------------------------

Metadata = list[tuple[str, str]]
TokenSource = Callable[[Role, str], Metadata]


@dataclass
class Outcome:
    code: Code
    details: str
    reply: bytes | None


class Sender:
    """A blocking channel to the server; sends raw bytes to any method path (identity
    serializers), so generated, undecodable and oversized payloads all go the same way."""

    def __init__(self, target: str, tokens: TokenSource, timeout_s: float = CALL_TIMEOUT_S):
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self._tokens = tokens
        self._timeout = timeout_s
        self._calls: dict[str, grpc.UnaryUnaryMultiCallable] = {}

    def close(self) -> None:
        self._channel.close()

    def metadata(self, rpc: Rpc, role: Role, request: Message | None, same: bool) -> Metadata:
        """A token of ``role``; a user token's subject is the request's user (``same``) or
        someone else."""
        subject = ""
        if role is Role.USER:
            user_id = getattr(request, "user_id", "") if request is not None else ""
            subject = user_id if same and 0 < len(user_id) <= 128 else "someone-else"
        return self._tokens(role, subject)

    def send(self, rpc: Rpc, payload: bytes, metadata: Metadata) -> Outcome:
        call = self._calls.get(rpc.path)
        if call is None:
            call = self._calls[rpc.path] = self._channel.unary_unary(rpc.path)
        try:
            reply = call(payload, metadata=metadata, timeout=self._timeout)
        except grpc.RpcError as exc:
            return Outcome(exc.code(), exc.details() or "", None)  # type: ignore[attr-defined]
        return Outcome(Code.OK, "", reply)


def check_outcome(rpc: Rpc, outcome: Outcome, allowed: frozenset[Code] = ACCEPTED) -> str | None:
    """None if ``outcome`` is acceptable, else what is wrong with it."""
    transient = outcome.code is Code.UNAVAILABLE and _TRANSIENT.match(outcome.details)
    if outcome.code not in allowed and not (transient and Code.OK in allowed):
        return f"{rpc} answered {outcome.code.name}: {outcome.details[:300]!r}"
    if outcome.code is Code.OK:
        try:
            rpc.response_class.FromString(outcome.reply or b"")
        except DecodeError as exc:
            return f"{rpc} answered OK with a reply that does not parse: {exc}"
    return None


def describe(payload: bytes, limit: int = 400) -> str:
    text = payload[:limit].hex()
    return text + (f"... ({len(payload)} bytes)" if len(payload) > limit else "")


_FUZZ_SETTINGS: dict[str, Any] = {
    "deadline": None,
    # no "explain" phase: it re-runs failing examples under coverage tracing, slow and noisy
    "phases": [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    "database": None,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
}


def fuzz_requests(
    sender: Sender,
    rpc: Rpc,
    examples: int,
    *,
    seed: int | None = None,
    strict: bool = True,
    counts: Counter[Code] | None = None,
    failures: list[str] | None = None,
) -> Counter[Code]:
    """Send ``examples`` generated requests to ``rpc``. ``strict``: raise (and shrink) on the
    first unacceptable answer; otherwise count it and keep a description in ``failures``.
    Without ``seed`` the examples are the same on every run (derandomized)."""
    counts = Counter() if counts is None else counts
    roles = roles_for(rpc)

    @settings(max_examples=examples, derandomize=seed is None, **_FUZZ_SETTINGS)
    @given(
        shown=shown(request_strategy(rpc)),
        role=st.sampled_from(roles),
        same_subject=st.booleans(),
    )
    def check(shown: Shown, role: Role, same_subject: bool) -> None:
        request = sanitize(rpc, shown.value)
        payload = request.SerializeToString()
        outcome = sender.send(rpc, payload, sender.metadata(rpc, role, request, same_subject))
        counts[outcome.code] += 1
        problem = check_outcome(rpc, outcome)
        if problem is None:
            return
        if strict:
            raise AssertionError(f"{problem}\nrequest: {short(request)}")
        if failures is not None and len(failures) < 20:
            failures.append(f"{problem} | role {role.value} | {short(request)}")

    (check if seed is None else hypothesis.seed(seed)(check))()
    return counts


def fuzz_undecodable(
    sender: Sender,
    rpc: Rpc,
    examples: int,
    *,
    seed: int | None = None,
    strict: bool = True,
    counts: Counter[Code] | None = None,
    failures: list[str] | None = None,
    max_bytes: int | None = None,
) -> Counter[Code]:
    """Payloads that may not parse: those that do not must end in INVALID_ARGUMENT (the
    request is malformed); those that happen to parse in any accepted status. One longer
    than the server's ``max_bytes`` may be RESOURCE_EXHAUSTED instead: gRPC checks the size
    before anything decodes it."""
    counts = Counter() if counts is None else counts
    admin = sender.metadata(rpc, Role.ADMIN, None, False)

    @settings(max_examples=examples, derandomize=seed is None, **_FUZZ_SETTINGS)
    @given(shown=shown(undecodable_strategy(rpc)))
    def check(shown: Shown) -> None:
        payload = sanitize_payload(rpc, shown.value)
        try:
            rpc.request_class.FromString(payload)
            allowed = ACCEPTED
        except DecodeError:
            allowed = frozenset({Code.INVALID_ARGUMENT})
            if max_bytes is not None and len(payload) > max_bytes:
                allowed |= {Code.RESOURCE_EXHAUSTED}
        outcome = sender.send(rpc, payload, admin)
        counts[outcome.code] += 1
        problem = check_outcome(rpc, outcome, allowed)
        if problem is None:
            return
        if strict:
            raise AssertionError(f"{problem}\npayload (hex): {describe(payload)}")
        if failures is not None and len(failures) < 20:
            failures.append(f"{problem} | payload {describe(payload, 120)}")

    (check if seed is None else hypothesis.seed(seed)(check))()
    return counts


def recommend_works(sender: Sender) -> bool:
    """The server still answers a normal request."""
    rpc = next(r for r in RPCS if r.name == "Recommend")
    request = pb.RecommendRequest(user_id="u1", limit=5)
    outcome = sender.send(
        rpc, request.SerializeToString(), sender.metadata(rpc, Role.SERVICE, None, False)
    )
    if outcome.code is not Code.OK:
        return False
    return len(pb.RankedItems.FromString(outcome.reply or b"").items) > 0


# ---------------------------------------------------------------------------------------------
# The tests against the real server
# ---------------------------------------------------------------------------------------------


@dataclass
class Fuzz:
    client: Client
    sender: Sender


@pytest.fixture(scope="module")
async def fuzz(client: Client, pg_url: str) -> AsyncIterator[Fuzz]:
    """A blocking sender to the module's server; afterwards, every row the fuzzer stored
    (events, items, settings of FUZZ_PREFIX users, erasures) is removed again."""
    conn = await asyncpg.connect(pg_url)
    try:
        started = await conn.fetchval("SELECT now()")
        last_event = await conn.fetchval("SELECT coalesce(max(id), 0) FROM events")
        items = await conn.fetch("SELECT scope, item_id, first_seen FROM items")
    finally:
        await conn.close()
    personalization = client.app.optouts.personalization_enabled
    minted: dict[tuple[Role, str], Metadata] = {}

    def tokens(role: Role, subject: str) -> Metadata:
        if role is Role.USER:
            return client.token(role.value, subject)
        if (role, subject) not in minted:
            minted[role, subject] = client.token(role.value, subject or "fuzzer")
        return minted[role, subject]

    sender = Sender(f"127.0.0.1:{client.port}", tokens)
    try:
        yield Fuzz(client, sender)
    finally:
        sender.close()
        await client.app.set_personalization(personalization)
        conn = await asyncpg.connect(pg_url)
        try:
            async with conn.transaction():
                await conn.execute("DELETE FROM events WHERE id > $1", last_event)
                await conn.execute(
                    "DELETE FROM user_settings WHERE starts_with(user_id, $1)", FUZZ_PREFIX
                )
                await conn.execute("DELETE FROM erasures WHERE erased_at >= $1", started)
                keys = ([r["scope"] for r in items], [r["item_id"] for r in items])
                await conn.execute(
                    "DELETE FROM items AS i WHERE NOT EXISTS (SELECT 1 FROM"
                    " unnest($1::text[], $2::text[]) AS k(scope, item_id)"
                    " WHERE k.scope = i.scope AND k.item_id = i.item_id)",
                    *keys,
                )
                await conn.execute(
                    "UPDATE items AS i SET first_seen = k.first_seen FROM"
                    " unnest($1::text[], $2::text[], $3::timestamptz[])"
                    " AS k(scope, item_id, first_seen)"
                    " WHERE i.scope = k.scope AND i.item_id = k.item_id"
                    " AND i.first_seen <> k.first_seen",
                    *keys,
                    [r["first_seen"] for r in items],
                )
        finally:
            await conn.close()


def test_every_rpc_is_classified_for_fuzzing() -> None:
    paths = {rpc.path for rpc in RPCS}
    assert len(RPCS) >= 14
    assert paths == set(SANITIZERS) | HARMLESS, "classify new RPCs in SANITIZERS or HARMLESS"
    assert not set(SANITIZERS) & HARMLESS


def test_generated_requests_cover_every_field() -> None:
    """The generic strategies set every field of every request type at least once."""
    for rpc in RPCS:
        seen: set[str] = set()

        @settings(max_examples=60, derandomize=True, **_FUZZ_SETTINGS)
        @given(request=request_strategy(rpc))
        def collect(request: Message) -> None:
            seen.update(f.name for f, _ in request.ListFields())  # noqa: B023

        collect()
        assert seen == {f.name for f in rpc.input.fields}, str(rpc)


@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_generated_requests_end_in_a_precise_status(fuzz: Fuzz, rpc: Rpc) -> None:
    counts = await asyncio.to_thread(fuzz_requests, fuzz.sender, rpc, EXAMPLES_PER_RPC)
    assert sum(counts.values()) >= EXAMPLES_PER_RPC
    assert not set(counts) & NEVER
    assert await asyncio.to_thread(recommend_works, fuzz.sender)


@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_boundary_requests_end_in_a_precise_status(fuzz: Fuzz, rpc: Rpc) -> None:
    """Huge limits and ID lists, out-of-range timestamps and enums, NaN, 1 MB strings."""

    def run() -> list[str]:
        problems = []
        for request in extreme_requests(rpc.input):
            sanitize(rpc, request)
            payload = request.SerializeToString()
            metadata = fuzz.sender.metadata(rpc, roles_for(rpc)[0], request, True)
            outcome = fuzz.sender.send(rpc, payload, metadata)
            problem = check_outcome(rpc, outcome)
            if problem is not None:
                problems.append(f"{problem}\n  request: {short(request)}")
        return problems

    problems = await asyncio.to_thread(run)
    assert problems == []
    assert await asyncio.to_thread(recommend_works, fuzz.sender)


@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_undecodable_requests_are_invalid_argument(fuzz: Fuzz, rpc: Rpc) -> None:
    """Random bytes, invalid UTF-8 in a string field, truncated or corrupt requests: the request
    is malformed, so INVALID_ARGUMENT -- not grpcio's UNKNOWN "Unexpected <class
    'google.protobuf.message.DecodeError'>: ..." (which also leaks the exception)."""
    counts = await asyncio.to_thread(
        fuzz_undecodable,
        fuzz.sender,
        rpc,
        UNDECODABLE_PER_RPC,
        max_bytes=fuzz.client.config.max_message_bytes,
    )
    assert sum(counts.values()) >= UNDECODABLE_PER_RPC
    assert await asyncio.to_thread(recommend_works, fuzz.sender)


@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_oversized_requests_are_resource_exhausted(fuzz: Fuzz, rpc: Rpc) -> None:
    payload = oversized_payload(rpc, fuzz.client.config.max_message_bytes)
    assert len(payload) > fuzz.client.config.max_message_bytes
    metadata = fuzz.sender.metadata(rpc, Role.ADMIN, None, False)
    outcome = await asyncio.to_thread(fuzz.sender.send, rpc, payload, metadata)
    assert outcome.code is Code.RESOURCE_EXHAUSTED, outcome.details
    assert await asyncio.to_thread(recommend_works, fuzz.sender)


_HEADERS = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200).map(
        "Bearer {}".format
    ),
    st.sampled_from(["Bearer", "Bearer ", "bearer x.y.z", "Basic dXNlcjpwdw==", "Bearer a.b.c"]),
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)


async def test_hostile_credentials_are_unauthenticated(fuzz: Fuzz) -> None:
    """Garbage authorization headers, and tokens signed with the real key but with arbitrary
    claims (wrong types, missing, expired, unknown roles): never UNKNOWN or INTERNAL."""
    secret = fuzz.client.config.signing_keys()[0]
    issuer = fuzz.client.config.token_issuer

    def signed(claims: dict[str, Any]) -> str:
        # by hand: PyJWT refuses to *encode* some claims (a non-string iss) it must still
        # refuse to accept
        def part(value: dict[str, Any]) -> bytes:
            return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")

        head = part({"alg": "HS256", "typ": "JWT"}) + b"." + part(claims)
        mac = hmac.new(secret.encode(), head, hashlib.sha256).digest()
        return "Bearer " + (head + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()

    now = int(time.time())
    claims = st.fixed_dictionaries(
        {},
        optional={
            "sub": st.one_of(st.text(max_size=10), _JSON),
            "role": st.one_of(st.sampled_from([r.value for r in Role]), _JSON),
            "iss": st.one_of(st.just(issuer), _JSON),
            "iat": st.one_of(st.integers(now - 10**6, now + 10**6), _JSON),
            "exp": st.one_of(st.integers(now - 10**6, now + 10**6), _JSON),
        },
    )
    headers = st.one_of(_HEADERS, claims.map(signed))
    bad_token = frozenset({Code.UNAUTHENTICATED, Code.PERMISSION_DENIED})

    def run() -> None:
        @settings(max_examples=100, derandomize=True, **_FUZZ_SETTINGS)
        @given(rpc=st.sampled_from(RPCS), header=headers)
        def check(rpc: Rpc, header: str) -> None:
            request = sanitize(rpc, baseline(rpc.input))
            outcome = fuzz.sender.send(
                rpc, request.SerializeToString(), [("authorization", header)]
            )
            problem = check_outcome(rpc, outcome, ACCEPTED | bad_token)
            assert problem is None, f"{problem} (authorization: {header[:200]!r})"

        check()

    await asyncio.to_thread(run)


async def test_the_server_keeps_serving_after_all_of_it(fuzz: Fuzz) -> None:
    answer = await fuzz.client.ranking.Recommend(
        pb.RecommendRequest(user_id="u1", limit=10), metadata=fuzz.client.svc
    )
    assert len(answer.items) == 10
    flags = await fuzz.client.admin.SetFlags(pb.SetFlagsRequest(), metadata=fuzz.client.adm)
    assert flags.personalization_enabled, "the fuzzer must never turn personalization off"


# ---------------------------------------------------------------------------------------------
# The CSV importer, in-process
# ---------------------------------------------------------------------------------------------

_NAMES = ("user_id", "item_id", "value", "timestamp", "event_type", "user", "item", "ts", "email")
_COLUMN = st.one_of(st.sampled_from(_NAMES), st.text(_CHARS, max_size=12))
_CELL = st.one_of(
    _SEEDED_USERS,
    _SEEDED_ITEMS,
    _SHORT_ID,
    st.integers(-(2**70), 2**70).map(str),  # unix seconds, sane and absurd
    st.floats().map(str),
    st.datetimes().map(lambda d: d.isoformat()),
    st.sampled_from(
        ["", "view", "CLICK", "rating", "bogus", "1e309", "nan", "-inf", "1_000", "²", "٣", "Z"]
    ),
    st.sampled_from(NASTY_STRINGS),
    st.text(_CHARS, max_size=30),
)
_SEPARATORS = (",", "\t", "tab", "\\t", ";", "|", " ", '"', "'", "\x00", "é", "\n", "\r")


def _columns(header: list[str]) -> SearchStrategy[ColumnMap]:
    names = st.sampled_from([*header, *_NAMES]) if header else st.sampled_from(_NAMES)
    return st.builds(
        ColumnMap,
        user=names,
        item=names,
        value=names,
        time=names,
        event=names,
        sep=st.one_of(st.sampled_from(_SEPARATORS), st.characters(exclude_categories=("Cs",))),
        drop=st.frozensets(names, max_size=3),
    )


_ROLE_CELLS: dict[str, SearchStrategy[str]] = {
    "user": st.one_of(_SEEDED_USERS, _SHORT_ID),
    "item": st.one_of(_SEEDED_ITEMS, _SHORT_ID),
    "time": st.one_of(
        st.integers(0, 2_000_000_000).map(str),
        st.floats(0, 2e9).map("{:.3f}".format),
        st.datetimes().map(lambda d: d.isoformat()),
        st.datetimes().map(lambda d: d.isoformat() + "Z"),
    ),
    "value": st.one_of(st.floats(-1e6, 1e6).map(str), st.just("")),
    "event": st.sampled_from(["view", "CLICK", " rating ", "purchase", "dismiss", ""]),
}


@st.composite
def _plausible_csv(draw: st.DrawFn) -> tuple[str, ColumnMap]:
    """A header built from the column map (shuffled, sometimes with discarded or unexpected
    columns), rows written by csv.writer with cells that mostly fit their column."""
    names = st.one_of(st.sampled_from(_NAMES), _SHORT_ID)
    columns = ColumnMap(
        user=draw(st.sampled_from(["user_id", "user"])),
        item=draw(st.sampled_from(["item_id", "item"])),
        value=draw(st.sampled_from(["value", "rating"])),
        time=draw(st.sampled_from(["timestamp", "ts"])),
        event=draw(st.sampled_from(["event_type", "event"])),
        sep=draw(st.sampled_from([",", "\t", "tab", ";", "|"])),
        drop=draw(st.frozensets(names, max_size=2)),
    )
    roles = ["user", "item", "time"]
    roles += [r for r in ("value", "event") if draw(st.booleans())]
    # a column left out of the header is left unnamed too (a named one is required)
    unnamed = {r: None for r in ("value", "event") if r not in roles}
    columns = replace(columns, **unnamed)
    header = [getattr(columns, r) for r in roles] + sorted(columns.drop)
    if draw(st.integers(0, 9)) == 0:
        header.append(draw(names))  # not mapped, not dropped: refused
    order = draw(st.permutations(range(len(header))))
    header = [header[i] for i in order]
    role_of = {getattr(columns, r): r for r in roles}
    wild = st.one_of(_CELL, st.sampled_from(NASTY_STRINGS))
    clean = draw(st.booleans())  # half the files have only fitting cells
    rows = []
    for _ in range(draw(st.integers(0, 12))):
        fits = [_ROLE_CELLS.get(role_of.get(n, ""), wild) for n in header]
        row = [draw(f if clean else _mostly(f, wild)) for f in fits]
        if draw(st.integers(0, 19)) == 0:
            row = row[: draw(st.integers(0, len(row)))]  # ragged
        rows.append(row)
    sep = "\t" if columns.sep in ("tab", "\\t") else columns.sep
    out = io.StringIO()
    writer = csv.writer(out, delimiter=sep, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerows([header, *rows])
    return out.getvalue(), columns


@st.composite
def _wild_csv(draw: st.DrawFn) -> tuple[str, ColumnMap]:
    """Random header and cells joined by hand (stray quotes, separators inside cells, any
    line end, any single-character separator), or random text altogether."""
    header = draw(st.lists(_COLUMN, max_size=7))
    columns = draw(_columns(header))
    sep = "\t" if columns.sep in ("tab", "\\t") else columns.sep
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(_CHARS, max_size=500)), columns
    rows = draw(st.lists(st.lists(_CELL, max_size=len(header) + 2), max_size=12))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    quote_all = draw(st.booleans())
    lines = [sep.join(f'"{c}"' if quote_all else c for c in cells) for cells in [header, *rows]]
    return newline.join(lines) + draw(st.sampled_from(["", newline])), columns


def csv_files() -> SearchStrategy[tuple[str, ColumnMap]]:
    """CSV/TSV text and the column map to read it with: plausible files (which mostly get past
    the header, so rows are validated) and wild ones."""
    return st.one_of(_plausible_csv(), _wild_csv())


def _consume(path: Path, columns: ColumnMap) -> None:
    """Read every batch; what is yielded must be validated events; the only error allowed is
    InvalidInput."""
    try:
        for batch in read_interactions(path, "default", columns, chunk=7):
            for event in batch:
                assert isinstance(event, Interaction)
                validate_id("user_id", event.user_id)
                validate_id("item_id", event.item_id)
                validate_scope(event.scope)
                assert event.occurred_at.tzinfo is not None
                assert math.isfinite(event.value)
    except InvalidInput:
        pass


@settings(max_examples=200, derandomize=True, **_FUZZ_SETTINGS)
@given(data=csv_files())
def test_importer_random_text_yields_events_or_invalid_input(
    tmp_path: Path, data: tuple[str, ColumnMap]
) -> None:
    text, columns = data
    path = tmp_path / "events.csv"
    path.write_text(text, encoding="utf-8", newline="")
    _consume(path, columns)


@settings(max_examples=200, derandomize=True, **_FUZZ_SETTINGS)
@given(
    data=csv_files(),
    noise=st.one_of(st.binary(min_size=1, max_size=64), st.sampled_from(BAD_UTF8)),
    where=st.floats(0, 1),
)
def test_importer_random_bytes_and_invalid_utf8_are_invalid_input(
    tmp_path: Path, data: tuple[str, ColumnMap], noise: bytes, where: float
) -> None:
    """A file that is not UTF-8 is bad input like any other: InvalidInput naming the file, not
    a UnicodeDecodeError (a ValueError the CLI does not map)."""
    text, columns = data
    raw = text.encode()
    at = int(len(raw) * where)
    path = tmp_path / "events.csv"
    path.write_bytes(raw[:at] + noise + raw[at:])
    _consume(path, columns)


def test_importer_refuses_an_oversized_field_with_invalid_input(tmp_path: Path) -> None:
    """csv refuses fields above its 128 KiB limit with csv.Error; that must surface as
    InvalidInput naming the line, like every other malformed input."""
    path = tmp_path / "events.csv"
    path.write_text(f"user_id,item_id,timestamp\nu1,{'i' * 200_000},1700000000\n")
    with pytest.raises(InvalidInput):
        _consume_strict(path, ColumnMap())


def _consume_strict(path: Path, columns: ColumnMap) -> None:
    for _ in read_interactions(path, "default", columns):
        pass


@settings(max_examples=100, derandomize=True, **_FUZZ_SETTINGS)
@given(sep=st.text(_CHARS, max_size=3))
def test_importer_any_separator_is_used_or_invalid_input(tmp_path: Path, sep: str) -> None:
    """``--sep`` is user input too: '', ';;' or 'ab' must be refused with InvalidInput, not a
    TypeError from the csv module."""
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i1,1700000000\n")
    _consume(path, ColumnMap(sep=sep))
