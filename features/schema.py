"""The privacy-safe schema: what privrank accepts and keeps, and nothing else.

Identifiers are opaque strings. A feature vector holds only the aggregate numbers named in
``FEATURE_NAMES`` plus the learned embedding. Every ingest path validates through this module,
so a value that looks like personal data (an email, a phone number, a street address or a
postcode used as an ID) is refused with the field named.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from features.errors import InvalidInput, PiiRejected

DEFAULT_SCOPE = "default"
EARLIEST_EVENT = datetime(1970, 1, 1, tzinfo=UTC)
MAX_ID_LENGTH = 128
MAX_CATEGORY_LENGTH = 64

# The allow-list of per-user aggregate features, in the column order of the feature matrix.
FEATURE_NAMES: tuple[str, ...] = (
    "engagement_score",
    "click_through_rate",
    "sessions_7d",
    "sessions_30d",
    "avg_session_seconds",
    "preferred_hour",
    "device_category",
    "country_code",
    "utc_offset_minutes",
)

# Categorical features are stored as small integer codes so the vector stays numeric.
DEVICE_CATEGORIES: tuple[str, ...] = ("unknown", "desktop", "mobile", "tablet", "tv", "other")

# Event types and the implicit-feedback weight each contributes to training.
EVENT_WEIGHTS: dict[str, float] = {
    "impression": 0.0,
    "click": 1.0,
    "view": 1.0,
    "complete": 2.0,
    "accept": 2.0,
    "dismiss": 0.0,
    "rating": 1.0,  # scaled by the rating value
    "purchase": 4.0,
}
EVENT_TYPES: tuple[str, ...] = tuple(EVENT_WEIGHTS)
DEFAULT_VALUE = 1.0  # an event's value when none is given
ENGAGED_EVENTS: tuple[str, ...] = ("click", "view", "complete", "accept", "rating", "purchase")

_ID_RE = re.compile(r"[A-Za-z0-9_.:\-/]{1,128}")
_SCOPE_RE = re.compile(r"[a-z0-9][a-z0-9_\-]{0,62}")
_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")
# Phone numbers in international (+...) or North American formatting. Bare digit strings are
# left alone: numeric IDs are far more common than unformatted phone numbers.
_PHONE_RE = re.compile(r"\+\d[\d\s().\-]{6,19}|\(?\d{3}\)?[\s.\-]\d{3}[\s.\-]\d{4}")
# UK and Canadian postcodes in their written form (with the space) and US ZIP+4. A bare
# five-digit ZIP is indistinguishable from a numeric ID and is not flagged.
_POSTCODE_RE = re.compile(
    r"[A-Z]{1,2}\d[A-Z\d]?\s\d[A-Z]{2}|\d{5}-\d{4}|[A-Z]\d[A-Z]\s\d[A-Z]\d", re.IGNORECASE
)
_STREET_RE = re.compile(
    r"\d+[A-Za-z]?\s+\w+(\s+\w+)*\s+(street|st|avenue|ave|road|rd|lane|ln|boulevard|blvd|drive|dr)\b",
    re.IGNORECASE,
)
_COUNTRY_RE = re.compile(r"[A-Z]{2}")


def check_pii(field: str, value: str) -> None:
    """Raise PiiRejected if ``value`` looks like an email, phone number, address or postcode."""
    if _EMAIL_RE.search(value):
        raise PiiRejected(f"{field}: looks like an email address; send an opaque ID instead")
    if _PHONE_RE.fullmatch(value.strip()):
        raise PiiRejected(f"{field}: looks like a phone number; send an opaque ID instead")
    if _STREET_RE.search(value) or _POSTCODE_RE.fullmatch(value.strip()):
        raise PiiRejected(f"{field}: looks like a street address or postcode; send an opaque ID")


def user_digest(user_id: str) -> str:
    """The one-way form in which an erased user is remembered (sha256, hex)."""
    return hashlib.sha256(user_id.encode()).hexdigest()


def validate_id(field: str, value: str) -> str:
    """Return ``value`` if it is a well-formed opaque ID; otherwise raise with the field named."""
    if not value:
        raise InvalidInput(f"{field} is required")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInput(f"{field} is longer than {MAX_ID_LENGTH} characters")
    check_pii(field, value)
    if not _ID_RE.fullmatch(value):
        raise InvalidInput(f"{field} may contain only letters, digits and _ . : - /")
    return value


def validate_category(field: str, value: str) -> str:
    """Return ``value`` if it is a well-formed category label: a short opaque label held to
    the rules of an ID (so never free text), at most MAX_CATEGORY_LENGTH characters."""
    validate_id(field, value)
    if len(value) > MAX_CATEGORY_LENGTH:
        raise InvalidInput(f"{field} is longer than {MAX_CATEGORY_LENGTH} characters")
    return value


def validate_scope(value: str) -> str:
    """Return the scope name (empty means ``default``) if well formed."""
    if not value:
        return DEFAULT_SCOPE
    if not _SCOPE_RE.fullmatch(value):
        raise InvalidInput("scope must be 1-63 lowercase letters, digits, '_' or '-'")
    return value


CONTEXT_SEGMENTS = 4 * len(DEVICE_CATEGORIES)  # dayparts (local hour // 6) x devices


def context_segment(device: int, local_hour: int) -> int:
    """The context segment of a device code and a local hour: daypart (hour // 6) x device."""
    return (local_hour // 6) * len(DEVICE_CATEGORIES) + device


def device_code(category: str) -> int:
    """Integer code of a device category (unknown categories are refused)."""
    if not category:
        return 0
    try:
        return DEVICE_CATEGORIES.index(category.lower())
    except ValueError:
        allowed = ", ".join(DEVICE_CATEGORIES[1:])
        raise InvalidInput(f"context.device_category must be one of: {allowed}") from None


def country_code(value: str) -> str:
    """Validated ISO 3166-1 alpha-2 code, or '' if absent."""
    if value and not (value.isascii() and _COUNTRY_RE.fullmatch(value.upper())):
        raise InvalidInput("context.country_code must be a two-letter ISO 3166-1 code")
    return value.upper()


@dataclass(frozen=True, slots=True)
class Interaction:
    """One validated interaction event, as stored. ``value`` scales a rating's weight in
    training (0 or below: no positive signal); other events' weights ignore it."""

    scope: str
    user_id: str
    item_id: str
    event_type: str
    value: float
    occurred_at: datetime
    session_id: str = ""
    device: int = 0
    country: str = ""
    utc_offset_minutes: int | None = None
    variant: str = ""  # the A/B variant of the user when the event arrived ('' if none)


def make_interaction(
    *,
    scope: str,
    user_id: str,
    item_id: str,
    event_type: str,
    value: float | None,
    occurred_at: datetime | None,
    session_id: str = "",
    device_category: str = "",
    country: str = "",
    utc_offset_minutes: int | None = None,
    where: str = "event",
) -> Interaction:
    """Validate every field of one event; the error message starts with ``where``. A ``value``
    of None (none given) is DEFAULT_VALUE; any other is kept as given, 0 and negatives too."""
    try:
        if event_type not in EVENT_WEIGHTS:
            raise InvalidInput(f"event_type must be one of: {', '.join(EVENT_TYPES)}")
        if value is None:
            value = DEFAULT_VALUE
        elif value != value or abs(value) > 1e6:
            raise InvalidInput("value must be a finite number with |value| <= 1e6")
        if session_id:
            validate_id("context.session_id", session_id)
        if utc_offset_minutes is not None and not -720 <= utc_offset_minutes <= 840:
            raise InvalidInput("context.utc_offset_minutes must be within -720..840")
        when = occurred_at or datetime.now(UTC)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        if when < EARLIEST_EVENT:
            raise InvalidInput("occurred_at lies before 1970-01-01")
        return Interaction(
            scope=validate_scope(scope),
            user_id=validate_id("user_id", user_id),
            item_id=validate_id("item_id", item_id),
            event_type=event_type,
            value=value,
            occurred_at=when,
            session_id=session_id,
            device=device_code(device_category),
            country=country_code(country),
            utc_offset_minutes=utc_offset_minutes,
        )
    except InvalidInput as exc:
        raise type(exc)(f"{where}: {exc}") from None
