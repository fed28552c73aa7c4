"""Tests of features/schema.py: opaque IDs pass, personal data is refused with the field named,
and no input makes the validators raise anything but InvalidInput."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features import errors
from features.schema import (
    DEFAULT_SCOPE,
    DEVICE_CATEGORIES,
    EVENT_TYPES,
    MAX_ID_LENGTH,
    Interaction,
    check_pii,
    country_code,
    device_code,
    make_interaction,
    validate_id,
    validate_scope,
)

T = TypeVar("T")

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)

EMAILS = ["jane.doe@example.com", "x+tag@mail.co.uk", "a@b.io", "first_last@sub.example.org"]
PHONES = [
    "+14155550123",
    "+44 20 7946 0958",
    "(415) 555-0123",
    "415-555-0123",
    "415.555.0123",
    "+33 1 23 45 67 89",
]
# what _STREET_RE catches: a house number, whitespace, words, whitespace, a street type
STREETS = [
    "221 Baker Street",
    "10 Downing St",
    "1600 Pennsylvania Avenue",
    "42 Wallaby Way Road",
    "7 elm ln",
    "350 Fifth Ave",
    "12 Sunset Blvd",
    "221B Baker Street",
]
POSTCODES = ["SW1A 1AA", "EC1A 1BB", "M1 1AE", "90210-1234", "K1A 0B1"]
OPAQUE_IDS = [
    "u0",
    "i123",
    "user_42",
    "a1b2c3d4-e5f6",
    "sku:1234",
    "item/9",
    "x.y.z",
    "4155550123",  # digits only: a numeric ID, not a phone number
    "123456",
    "12345",  # a bare five-digit number is a numeric ID far more often than a ZIP code
    "90210",
    "ab12cd",  # postcode-shaped, but written without the space postcodes are written with
    "SW1A1AA",
    "2024-01-15",  # a date, not a phone number
    "A" * MAX_ID_LENGTH,
]


@pytest.mark.parametrize("value", [*EMAILS, *PHONES, *STREETS, *POSTCODES])
def test_pii_canaries_are_rejected(value: str) -> None:
    with pytest.raises(errors.PiiRejected, match=r"^user_id: looks like"):
        validate_id("user_id", value)
    with pytest.raises(errors.PiiRejected, match=r"^item_ids\[3\]: "):
        check_pii("item_ids[3]", value)


@pytest.mark.parametrize("value", EMAILS)
def test_emails_are_named_as_such(value: str) -> None:
    with pytest.raises(errors.PiiRejected, match="email"):
        check_pii("user_id", value)


@pytest.mark.parametrize("value", PHONES)
def test_phone_numbers_are_named_as_such(value: str) -> None:
    with pytest.raises(errors.PiiRejected, match="phone number"):
        check_pii("user_id", value)


@pytest.mark.parametrize("value", [*STREETS, *[p for p in POSTCODES if "-" not in p]])
def test_addresses_are_named_as_such(value: str) -> None:
    with pytest.raises(errors.PiiRejected, match="street address or postcode"):
        check_pii("user_id", value)


@pytest.mark.parametrize("value", OPAQUE_IDS)
def test_opaque_ids_pass(value: str) -> None:
    assert validate_id("user_id", value) == value
    check_pii("user_id", value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "^item_id is required$"),
        ("a" * (MAX_ID_LENGTH + 1), f"^item_id is longer than {MAX_ID_LENGTH} characters$"),
        ("a b", "^item_id may contain only"),
        ("ü1", "^item_id may contain only"),
        ("id;drop", "^item_id may contain only"),
        ("tab\there", "^item_id may contain only"),
    ],
)
def test_malformed_ids_name_the_field(value: str, message: str) -> None:
    with pytest.raises(errors.InvalidInput, match=message) as caught:
        validate_id("item_id", value)
    assert type(caught.value) is errors.InvalidInput


def test_id_with_trailing_newline_is_rejected() -> None:
    # IDs "may contain only letters, digits and _ . : - /"; a newline is none of these (the
    # pattern's "$" also matches just before a final newline)
    with pytest.raises(errors.InvalidInput, match=r"^user_id may contain only"):
        validate_id("user_id", "u1\n")


def test_validate_scope() -> None:
    assert validate_scope("") == DEFAULT_SCOPE
    assert validate_scope("books") == "books"
    assert validate_scope("eu-west_2") == "eu-west_2"
    assert validate_scope("a" * 63) == "a" * 63
    for bad in ["Books", "-books", "_x", "a" * 64, "a b", "books!", "bücher"]:
        with pytest.raises(errors.InvalidInput, match=r"^scope must be"):
            validate_scope(bad)


def test_scope_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(errors.InvalidInput, match=r"^scope must be"):
        validate_scope("books\n")


def test_device_code() -> None:
    assert device_code("") == 0
    for code, name in enumerate(DEVICE_CATEGORIES):
        assert device_code(name) == code
        assert device_code(name.upper()) == code
    with pytest.raises(errors.InvalidInput, match=r"^context.device_category must be one of"):
        device_code("phone")


def test_country_code() -> None:
    assert country_code("") == ""
    assert country_code("us") == "US"
    assert country_code("GB") == "GB"
    for bad in ["USA", "U", "u1", "U S", "ÜS"]:
        with pytest.raises(errors.InvalidInput, match=r"^context.country_code must be"):
            country_code(bad)


def test_country_code_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(errors.InvalidInput, match=r"^context.country_code must be"):
        country_code("us\n")


def outcome(fn: Callable[..., T], *args: object, **kwargs: object) -> tuple[T | None, str | None]:
    """(result, None) if ``fn`` returns, (None, message) if it raises InvalidInput."""
    try:
        return fn(*args, **kwargs), None
    except errors.InvalidInput as exc:
        return None, str(exc)


def event(**overrides: object) -> Interaction:
    fields: dict[str, object] = {
        "scope": "",
        "user_id": "u1",
        "item_id": "i1",
        "event_type": "click",
        "value": 0.0,
        "occurred_at": datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    }
    fields.update(overrides)
    return make_interaction(**fields)  # type: ignore[arg-type]


def test_make_interaction_valid() -> None:
    got = event(
        scope="books",
        value=3.5,
        session_id="s-1",
        device_category="Mobile",
        country="de",
        utc_offset_minutes=120,
    )
    assert got == Interaction(
        scope="books",
        user_id="u1",
        item_id="i1",
        event_type="click",
        value=3.5,
        occurred_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        session_id="s-1",
        device=DEVICE_CATEGORIES.index("mobile"),
        country="DE",
        utc_offset_minutes=120,
    )


def test_make_interaction_defaults() -> None:
    before = datetime.now(UTC)
    got = event(occurred_at=None, value=None)
    after = datetime.now(UTC)
    assert got.scope == DEFAULT_SCOPE
    assert got.value == 1.0  # none given means 1
    assert before <= got.occurred_at <= after
    assert got.device == 0
    assert got.country == ""
    assert got.utc_offset_minutes is None


def test_make_interaction_time_zones() -> None:
    # naive times are taken as UTC; aware ones are kept as given
    assert event(occurred_at=datetime(2024, 1, 1)).occurred_at == datetime(2024, 1, 1, tzinfo=UTC)
    plus_two = timezone(timedelta(hours=2))
    got = event(occurred_at=datetime(2024, 1, 1, 2, 0, tzinfo=plus_two))
    assert got.occurred_at == datetime(2024, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("offset", [-720, 0, 840])
def test_make_interaction_offset_bounds(offset: int) -> None:
    assert event(utc_offset_minutes=offset).utc_offset_minutes == offset


@pytest.mark.parametrize(
    ("overrides", "field", "error"),
    [
        ({"event_type": "like"}, "event_type", errors.InvalidInput),
        ({"value": float("nan")}, "value", errors.InvalidInput),
        ({"value": float("inf")}, "value", errors.InvalidInput),
        ({"value": -2e6}, "value", errors.InvalidInput),
        ({"session_id": "s 1"}, "context.session_id", errors.InvalidInput),
        ({"session_id": "jane@example.com"}, "context.session_id", errors.PiiRejected),
        ({"utc_offset_minutes": -721}, "context.utc_offset_minutes", errors.InvalidInput),
        ({"utc_offset_minutes": 841}, "context.utc_offset_minutes", errors.InvalidInput),
        ({"scope": "Books"}, "scope", errors.InvalidInput),
        ({"user_id": ""}, "user_id", errors.InvalidInput),
        ({"user_id": "+14155550123"}, "user_id", errors.PiiRejected),
        ({"item_id": "SW1A 1AA"}, "item_id", errors.PiiRejected),
        ({"item_id": "a/b?c"}, "item_id", errors.InvalidInput),
        ({"device_category": "fridge"}, "context.device_category", errors.InvalidInput),
        ({"country": "France"}, "context.country_code", errors.InvalidInput),
    ],
)
def test_make_interaction_errors_name_where_and_field(
    overrides: dict[str, object], field: str, error: type[errors.InvalidInput]
) -> None:
    with pytest.raises(error) as caught:
        event(where="events[7]", **overrides)
    assert type(caught.value) is error, "the error class (PII or not) is kept"
    assert str(caught.value).startswith(f"events[7]: {field}"), str(caught.value)


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_is_accepted(event_type: str) -> None:
    assert event(event_type=event_type).event_type == event_type


@SETTINGS
@given(field=st.sampled_from(["user_id", "item_id", "context.session_id"]), value=st.text())
def test_validate_id_returns_unchanged_or_raises_invalid_input(field: str, value: str) -> None:
    got, error = outcome(validate_id, field, value)
    if error is None:
        assert got == value
    else:
        assert error.startswith(field), error


@SETTINGS
@given(value=st.text(max_size=MAX_ID_LENGTH))
def test_check_pii_raises_only_pii_rejected(value: str) -> None:
    try:
        check_pii("user_id", value)
    except errors.PiiRejected as exc:
        error: str | None = str(exc)
    else:
        error = None
    assert error is None or error.startswith("user_id: "), error


def mostly(valid: st.SearchStrategy[T], other: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``other`` a fifth of the time, otherwise ``valid`` (so that whole events are valid often
    enough to exercise the success path too)."""
    return st.sampled_from(range(5)).flatmap(lambda pick: other if pick == 4 else valid)


def mostly_text(valid: list[str] | tuple[str, ...]) -> st.SearchStrategy[str]:
    return mostly(st.sampled_from(valid), st.text())


@SETTINGS
@given(
    scope=mostly_text(["", "default", "books"]),
    user_id=mostly_text(OPAQUE_IDS),
    item_id=mostly_text(OPAQUE_IDS),
    event_type=mostly_text(EVENT_TYPES),
    value=st.one_of(st.none(), mostly(st.floats(min_value=-1e6, max_value=1e6), st.floats())),
    occurred_at=st.one_of(
        st.none(), st.datetimes(), st.datetimes(timezones=st.just(timezone(timedelta(hours=-5))))
    ),
    session_id=mostly_text(["", "s1", "sess-9"]),
    device_category=mostly_text(DEVICE_CATEGORIES),
    country=mostly_text(["", "us", "GB"]),
    utc_offset_minutes=mostly(st.one_of(st.none(), st.integers(-720, 840)), st.integers()),
)
def test_make_interaction_returns_or_raises_invalid_input(
    scope: str,
    user_id: str,
    item_id: str,
    event_type: str,
    value: float | None,
    occurred_at: datetime | None,
    session_id: str,
    device_category: str,
    country: str,
    utc_offset_minutes: int | None,
) -> None:
    got, error = outcome(
        make_interaction,
        scope=scope,
        user_id=user_id,
        item_id=item_id,
        event_type=event_type,
        value=value,
        occurred_at=occurred_at,
        session_id=session_id,
        device_category=device_category,
        country=country,
        utc_offset_minutes=utc_offset_minutes,
        where="row 5",
    )
    if error is not None:
        assert error.startswith("row 5: "), error
    else:
        assert isinstance(got, Interaction)
        assert got.user_id == user_id
        assert got.item_id == item_id
        assert got.event_type in EVENT_TYPES
        assert got.value == (1.0 if value is None else value)  # 0 and negatives kept
        assert got.occurred_at.tzinfo is not None
