"""Bulk import of interaction events and item attributes from CSV/TSV, every row validated
before anything is kept.

Columns are mapped by name; any other column is refused unless the caller names it to be
discarded, so nothing outside the allow-list is read by accident, and a header that names a
column twice or a row whose fields do not line up with the header is refused. Timestamps are
unix seconds or ISO 8601. Without an event column, rows are ``rating`` events when a value
column is present and ``view`` events otherwise; an empty value cell means 1, any other value
is kept as written.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from features.errors import InvalidInput
from features.schema import Interaction, make_interaction, validate_category, validate_id


@dataclass(frozen=True, slots=True)
class ColumnMap:
    """The columns to read. ``value`` and ``event`` left None read ``value`` and
    ``event_type`` where the header has them; named, the header must have them. ``sep`` None
    takes the separator from the file (see ``_separator``)."""

    user: str = "user_id"
    item: str = "item_id"
    value: str | None = None
    time: str = "timestamp"
    event: str | None = None
    sep: str | None = None
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


def _separator(raw: str | None, path: Path, handle: TextIO) -> str:
    """``raw`` as one character (``\\t`` or ``tab`` for a tab); if None, a tab for a ``.tsv``
    file, a comma for a ``.csv`` one, and for another name a tab if the header line has one
    and no comma, else a comma. Reads the header line of ``handle`` and rewinds it."""
    if raw is None:
        suffix = path.suffix.lower()
        if suffix in (".tsv", ".csv"):
            return "\t" if suffix == ".tsv" else ","
        header = handle.readline(1 << 16)
        handle.seek(0)
        return "\t" if "\t" in header and "," not in header else ","
    sep = "\t" if raw in ("\\t", "tab") else raw
    if len(sep) != 1:
        raise InvalidInput(f"the separator must be one character, got {raw!r}")
    return sep


def _rows(
    path: Path,
    sep: str | None,
    required: tuple[str, ...],
    mapped: set[str],
    drop: frozenset[str],
    kept: str,
) -> Iterator[tuple[str, dict[str, str]]]:
    """Each row of the file as ``{column: cell}`` with the place it came from (``"file line
    N"``), after checking the header: no name twice, the ``required`` columns present, and
    every column either ``mapped`` or ``drop``-ped. ``kept`` names what privrank keeps, for the
    error message. Blank lines are skipped; any other row must have exactly the header's number
    of fields. Raises InvalidInput naming the line (also for a file that is not UTF-8 text or
    not CSV)."""
    try:
        # utf-8-sig: a byte-order mark (as spreadsheet exports write) is not part of the header
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=_separator(sep, path, handle))
            header = next(reader, [])
            twice = next((name for n, name in enumerate(header) if name in header[:n]), None)
            if twice is not None:
                raise InvalidInput(f"{path.name}: column {twice!r} appears twice in the header")
            for name in required:
                if name not in header:
                    raise InvalidInput(
                        f"{path.name}: no column {name!r} (columns: {', '.join(header)})"
                    )
                if name in drop:
                    raise InvalidInput(
                        f"{path.name}: column {name!r} is read, so it cannot be in --drop-columns"
                    )
            extra = [name for name in header if name not in mapped and name not in drop]
            if extra:
                raise InvalidInput(
                    f"{path.name}: column {extra[0]!r} is outside the allow-list; privrank "
                    f"keeps only {kept} (name columns to discard with --drop-columns)"
                )
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    line = reader.line_num
                    raise InvalidInput(
                        f"{path.name} line {line}: not readable as CSV: {exc}"
                    ) from None
                if not cells:
                    continue
                where = f"{path.name} line {reader.line_num}"
                if len(cells) != len(header):
                    # e.g. a decimal comma ("4,5") in a comma-separated file
                    raise InvalidInput(
                        f"{where}: {len(cells)} fields where the header has {len(header)}"
                    )
                yield where, dict(zip(header, cells, strict=True))
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path.name}: not UTF-8 text (byte {exc.start} of a block)") from None
    except csv.Error as exc:
        raise InvalidInput(f"{path.name}: not readable as CSV: {exc}") from None


def read_interactions(
    path: Path, scope: str, columns: ColumnMap, *, chunk: int = 50_000
) -> Iterator[list[Interaction]]:
    """Yield validated events in chunks; raise InvalidInput naming the line and field (also for
    a file that is not UTF-8 text or not CSV)."""
    value_col = "value" if columns.value is None else columns.value
    event_col = "event_type" if columns.event is None else columns.event
    named = tuple(name for name in (columns.value, columns.event) if name is not None)
    rows = _rows(
        path,
        columns.sep,
        (columns.user, columns.item, columns.time, *named),
        {columns.user, columns.item, columns.time, value_col, event_col},
        columns.drop,
        "user, item, event type, value and time",
    )
    has_value = has_event = False
    default_event = "view"
    batch: list[Interaction] = []
    for n, (where, row) in enumerate(rows):
        if n == 0:  # a dropped column is never read, though it has the default's name
            has_value = value_col in row and value_col not in columns.drop
            has_event = event_col in row and event_col not in columns.drop
            default_event = "rating" if has_value else "view"
        raw_value = row[value_col].strip() if has_value else ""
        try:
            value = float(raw_value) if raw_value else None
        except ValueError:
            raise InvalidInput(f"{where}: value is not a number") from None
        batch.append(
            make_interaction(
                scope=scope,
                user_id=row[columns.user].strip(),
                item_id=row[columns.item].strip(),
                event_type=row[event_col].strip().lower() if has_event else default_event,
                value=value,
                occurred_at=parse_time(row[columns.time], where),
                where=where,
            )
        )
        if len(batch) >= chunk:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass(frozen=True, slots=True)
class ItemColumnMap:
    item: str = "item_id"
    category: str = "category"
    sep: str | None = None  # None: from the file, as for ColumnMap
    drop: frozenset[str] = frozenset()  # columns the caller explicitly discards


def read_items(
    path: Path, columns: ItemColumnMap, *, chunk: int = 50_000
) -> Iterator[list[tuple[str, str]]]:
    """Yield validated ``(item_id, category)`` pairs in chunks. A category is a short opaque
    label validated like an ID (an empty cell: no category), never free text; an item listed
    twice is refused. Raises InvalidInput naming the line and field."""
    rows = _rows(
        path,
        columns.sep,
        (columns.item, columns.category),
        {columns.item, columns.category},
        columns.drop,
        "item and category",
    )
    first_line: dict[str, str] = {}
    batch: list[tuple[str, str]] = []
    for where, row in rows:
        item_id = validate_id(f"{where}: item_id", row[columns.item].strip())
        category = row[columns.category].strip()
        if category:
            validate_category(f"{where}: category", category)
        if item_id in first_line:
            raise InvalidInput(f"{where}: item_id repeats {first_line[item_id]}")
        first_line[item_id] = "line " + where.rsplit(" ", 1)[1]
        batch.append((item_id, category))
        if len(batch) >= chunk:
            yield batch
            batch = []
    if batch:
        yield batch
