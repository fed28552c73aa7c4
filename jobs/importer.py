"""Bulk import of interaction events from CSV/TSV, every row validated before anything is kept.

Columns are mapped by name; any other column is refused unless the caller names it to be
discarded, so nothing outside the allow-list is read by accident. Timestamps are unix
seconds or ISO 8601. Without an event column,
rows are ``rating`` events when a value column is present and ``view`` events otherwise.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from features.errors import InvalidInput
from features.schema import Interaction, make_interaction


@dataclass(frozen=True, slots=True)
class ColumnMap:
    user: str = "user_id"
    item: str = "item_id"
    value: str = "value"
    time: str = "timestamp"
    event: str = "event_type"
    sep: str = ","
    drop: frozenset[str] = frozenset()  # columns the caller explicitly discards


def parse_time(raw: str, where: str) -> datetime:
    text = raw.strip()
    try:
        if text.replace(".", "", 1).isdigit():
            return datetime.fromtimestamp(float(text), tz=UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        raise InvalidInput(f"{where}: timestamp is neither unix seconds nor ISO 8601") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def read_interactions(
    path: Path, scope: str, columns: ColumnMap, *, chunk: int = 50_000
) -> Iterator[list[Interaction]]:
    """Yield validated events in chunks; raise InvalidInput naming the line and field (also for
    a file that is not UTF-8 text or not CSV)."""
    sep = "\t" if columns.sep in ("\\t", "tab") else columns.sep
    if len(sep) != 1:
        raise InvalidInput(f"the separator must be one character, got {columns.sep!r}")
    try:
        yield from _read(path, scope, columns, sep, chunk)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path.name}: not UTF-8 text (byte {exc.start} of a block)") from None
    except csv.Error as exc:
        raise InvalidInput(f"{path.name}: not readable as CSV: {exc}") from None


def _read(
    path: Path, scope: str, columns: ColumnMap, sep: str, chunk: int
) -> Iterator[list[Interaction]]:
    # utf-8-sig: a byte-order mark (as spreadsheet exports write) is not part of the header
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=sep)
        header = reader.fieldnames or []
        for required in (columns.user, columns.item, columns.time):
            if required not in header:
                raise InvalidInput(
                    f"{path.name}: no column {required!r} (columns: {', '.join(header)})"
                )
        mapped = {columns.user, columns.item, columns.time, columns.value, columns.event}
        extra = [name for name in header if name not in mapped and name not in columns.drop]
        if extra:
            raise InvalidInput(
                f"{path.name}: column {extra[0]!r} is outside the allow-list; privrank keeps "
                "only user, item, event type, value and time (name columns to discard with "
                "--drop-columns)"
            )
        has_value = columns.value in header
        has_event = columns.event in header
        default_event = "rating" if has_value else "view"
        batch: list[Interaction] = []
        rows = iter(reader)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error as exc:
                line = reader.line_num
                raise InvalidInput(f"{path.name} line {line}: not readable as CSV: {exc}") from None
            where = f"{path.name} line {reader.line_num}"
            raw_value = row.get(columns.value) or "" if has_value else ""
            try:
                value = float(raw_value) if raw_value else 1.0
            except ValueError:
                raise InvalidInput(f"{where}: value is not a number") from None
            batch.append(
                make_interaction(
                    scope=scope,
                    user_id=(row.get(columns.user) or "").strip(),
                    item_id=(row.get(columns.item) or "").strip(),
                    event_type=(row.get(columns.event) or "").strip().lower()
                    if has_event
                    else default_event,
                    value=value,
                    occurred_at=parse_time(row.get(columns.time) or "", where),
                    where=where,
                )
            )
            if len(batch) >= chunk:
                yield batch
                batch = []
        if batch:
            yield batch
