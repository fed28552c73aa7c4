"""The CSV/TSV importer, in-process: rows line up with the header or the file is refused,
values are kept as written, named columns are required, the separator follows the file."""

from __future__ import annotations

import csv
import io
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.errors import InvalidInput
from features.postgres import PgStore
from features.schema import Interaction
from jobs.importer import ColumnMap, ItemColumnMap, read_interactions, read_items

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None)
HEADER = "user_id,item_id,value,timestamp"


def _write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _read(path: Path, columns: ColumnMap | None = None) -> list[Interaction]:
    return [
        e for batch in read_interactions(path, "default", columns or ColumnMap()) for e in batch
    ]


def _refusal(path: Path, columns: ColumnMap | None = None) -> str:
    with pytest.raises(InvalidInput) as caught:
        _read(path, columns)
    return str(caught.value)


def test_a_decimal_comma_row_is_refused_not_shifted(tmp_path: Path) -> None:
    """``4,5`` under a four-column header used to be read as rating 4 at 1970-01-01 00:00:05."""
    path = _write(tmp_path / "events.csv", HEADER, "u1,i1,4,1700000000", "u1,i2,4,5,1700000000")
    assert _refusal(path) == "events.csv line 3: 5 fields where the header has 4"


def test_a_short_row_is_refused_not_half_read(tmp_path: Path) -> None:
    path = _write(tmp_path / "events.csv", HEADER, "u1,i1,4,1700000000", "u1,i2,1700000000")
    assert _refusal(path) == "events.csv line 3: 3 fields where the header has 4"


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = _write(tmp_path / "events.csv", HEADER, "", "u1,i1,4,1700000000", "")
    assert [e.value for e in _read(path)] == [4.0]


@pytest.mark.parametrize(
    "header", ["user_id,item_id,timestamp,item_id", "user_id,item_id,value,timestamp,value"]
)
def test_a_column_named_twice_is_refused(tmp_path: Path, header: str) -> None:
    twice = header.rsplit(",", 1)[1]
    cells = ",".join(["u1", "i1", "1700000000", "i2", "3"][: header.count(",") + 1])
    path = _write(tmp_path / "events.csv", header, cells)
    assert _refusal(path) == f"events.csv: column {twice!r} appears twice in the header"


def test_items_refuse_misaligned_rows_and_repeated_columns(tmp_path: Path) -> None:
    ragged = _write(tmp_path / "items.csv", "item_id,category", "i1,a", "i2,b,c")
    with pytest.raises(InvalidInput, match=r"^items\.csv line 3: 3 fields where the header has 2$"):
        list(read_items(ragged, ItemColumnMap()))
    twice = _write(tmp_path / "twice.csv", "item_id,category,category", "i1,a,b")
    with pytest.raises(InvalidInput, match="column 'category' appears twice"):
        list(read_items(twice, ItemColumnMap()))


def test_explicit_values_are_kept_and_only_a_missing_one_means_1(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "events.csv",
        HEADER,
        "u1,i1,0,1700000000",
        "u1,i2,-3,1700000000",
        "u1,i3,,1700000000",
        "u1,i4, 2.5 ,1700000000",
    )
    got = _read(path)
    assert [(e.event_type, e.value) for e in got] == [
        ("rating", 0.0),
        ("rating", -3.0),
        ("rating", 1.0),
        ("rating", 2.5),
    ]


def test_a_named_value_or_event_column_must_be_in_the_header(tmp_path: Path) -> None:
    path = _write(tmp_path / "events.csv", "user_id,item_id,timestamp", "u1,i1,1700000000")
    assert [e.event_type for e in _read(path)] == ["view"]  # neither named: views
    for columns, name in ((ColumnMap(value="stars"), "stars"), (ColumnMap(event="kind"), "kind")):
        assert _refusal(path, columns).startswith(f"events.csv: no column {name!r}")
    # named as the default, still required
    assert _refusal(path, ColumnMap(value="value")).startswith("events.csv: no column 'value'")


@pytest.mark.parametrize(
    ("name", "sep", "columns"),
    [
        ("events.tsv", "\t", ColumnMap()),
        ("events.TSV", "\t", ColumnMap()),
        ("events.txt", "\t", ColumnMap()),  # sniffed: a tab and no comma in the header
        ("events", ",", ColumnMap()),
        ("events.tsv", ";", ColumnMap(sep=";")),  # a named separator wins over the name
    ],
)
def test_the_separator_follows_the_file_unless_named(
    tmp_path: Path, name: str, sep: str, columns: ColumnMap
) -> None:
    path = _write(tmp_path / name, sep.join(HEADER.split(",")), sep.join(["u1", "i1", "4", "5"]))
    assert [(e.user_id, e.value) for e in _read(path, columns)] == [("u1", 4.0)]


def test_a_csv_named_file_is_read_with_commas_even_if_tab_separated(tmp_path: Path) -> None:
    path = _write(tmp_path / "events.csv", HEADER.replace(",", "\t"), "u1\ti1\t4\t5")
    assert _refusal(path).startswith("events.csv: no column 'user_id'")


_VALUE = st.one_of(st.floats(-1e6, 1e6, allow_subnormal=False), st.integers(-5, 5), st.none())


@SETTINGS
@given(
    values=st.lists(_VALUE, min_size=1, max_size=20),
    sep=st.sampled_from([",", "\t", ";"]),
    data=st.data(),
)
def test_rows_are_read_as_written_or_refused_at_the_misaligned_one(
    tmp_path_factory: pytest.TempPathFactory,
    values: list[float | int | None],
    sep: str,
    data: st.DataObject,
) -> None:
    """Property: a file whose rows all have the header's fields is read with every value as
    written (None written as an empty cell: 1); give one row a field more or fewer and the
    file is refused at that row's line, whatever the cells."""
    rows = [
        [f"u{n}", f"i{n}", "" if v is None else repr(v), str(1_700_000_000 + n)]
        for n, v in enumerate(values)
    ]
    ragged = data.draw(st.one_of(st.none(), st.integers(0, len(rows) - 1)), label="ragged")
    if ragged is not None:
        cells = rows[ragged]
        rows[ragged] = (
            [*cells, data.draw(st.sampled_from(["5", "", "x"]))]
            if data.draw(st.booleans())
            else cells[: data.draw(st.integers(1, 3))]
        )
    out = io.StringIO()
    csv.writer(out, delimiter=sep, lineterminator="\n").writerows([HEADER.split(","), *rows])
    path = tmp_path_factory.mktemp("prop") / "events.csv"
    path.write_text(out.getvalue(), encoding="utf-8")
    columns = ColumnMap(sep=sep)
    if ragged is None:
        got = _read(path, columns)
        assert [e.value for e in got] == [1.0 if v is None else float(v) for v in values]
        assert [e.occurred_at.timestamp() for e in got] == [
            1_700_000_000 + n for n in range(len(values))
        ]
    else:
        assert _refusal(path, columns).startswith(f"events.csv line {ragged + 2}: ")


async def test_imported_ratings_train_as_their_value(tmp_path: Path, pg: PgStore) -> None:
    """A 4 is a strength of 4, a 0 none, a -3 cancels a view of the same item: seen, not liked."""
    scope = "imp" + uuid.uuid4().hex[:6]
    path = _write(
        tmp_path / "events.csv",
        "user_id,item_id,value,timestamp,event_type",
        "u1,i4,4,1700000000,rating",
        "u1,i0,0,1700000000,rating",
        "u1,i3,,1700000000,view",
        "u1,i3,-3,1700000001,rating",
    )
    await pg.insert_event_batches(read_interactions(path, scope, ColumnMap()))
    pairs = await pg.training_pairs(scope)
    strength = dict(zip(pairs.item_ids.tolist(), pairs.strength.tolist(), strict=True))
    assert strength == {"i4": 4.0, "i0": 0.0, "i3": 0.0}


def test_a_dropped_value_or_event_column_is_never_read(tmp_path: Path) -> None:
    """``--drop-columns value`` on a file whose ``value`` is a price: the rows are views, not
    ratings weighted by the price; a column the import needs cannot be dropped."""
    path = _write(
        tmp_path / "events.csv",
        "user_id,item_id,timestamp,value,event_type",
        "u1,i1,1700000000,250,purchase",
    )
    dropped = ColumnMap(drop=frozenset({"value", "event_type"}))
    assert [(e.event_type, e.value) for e in _read(path, dropped)] == [("view", 1.0)]
    assert "'user_id' is read" in _refusal(path, ColumnMap(drop=frozenset({"user_id", "value"})))
