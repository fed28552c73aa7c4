"""Item attributes: `privrank import items` validates, refuses unmapped columns and upserts,
on real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.errors import InvalidInput
from features.postgres import PgStore
from jobs.importer import ItemColumnMap, read_items
from jobs.synth import generate
from server.config import Config
from tests.conftest import privrank

# -- import items -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("item_id,category\ni1,has space\n", "line 2: category may contain only"),
        ("item_id,category\ni1,x@example.com\n", "line 2: category: looks like an email"),
        ("item_id,category\ni1," + "c" * 65 + "\n", "line 2: category is longer than 64"),
        ("item_id,category\n,promo\n", "line 2: item_id is required"),
        ("item_id,category\ni1,a\ni2,b\ni1,c\n", "line 4: item_id repeats line 2"),
        ("item_id,title\ni1,Hello\n", "no column 'category'"),
        ("item_id,category,title\ni1,a,Hello\n", "column 'title' is outside the allow-list"),
        ("item_id,category\ni1,\xff\n", None),  # written as bytes below: not UTF-8
    ],
)
def test_bad_item_files_are_refused_naming_the_line(
    tmp_path: Path, text: str, message: str | None
) -> None:
    path = tmp_path / "items.csv"
    if message is None:
        path.write_bytes(b"item_id,category\ni1,\xff\n")
        message = "not UTF-8"
    else:
        path.write_text(text)
    with pytest.raises(InvalidInput, match=message):
        list(read_items(path, ItemColumnMap()))


def test_item_files_map_columns_and_keep_empty_categories(tmp_path: Path) -> None:
    path = tmp_path / "items.tsv"
    path.write_text("sku\tkind\tnote\ni1\tpromo\tx\ni2\t\ty\n")
    columns = ItemColumnMap("sku", "kind", "tab", frozenset({"note"}))
    assert [pair for batch in read_items(path, columns) for pair in batch] == [
        ("i1", "promo"),
        ("i2", ""),
    ]


async def test_import_items_upserts_and_refuses_all_or_nothing(
    config: Config, pg: PgStore, tmp_path: Path
) -> None:
    scope = "catalog"
    # events too, so that every scope with data can run the nightly jobs
    await pg.insert_event_batches(generate(users=30, items=20, events=400, scope=scope, seed=2))
    first = tmp_path / "items.csv"
    first.write_text("item_id,category,title\ni1,promo,Summer\ni2,news,Headline\nnew1,promo,x\n")
    refused = privrank(config, "import", "items", str(first), "--scope", scope, check=False)
    assert refused.returncode == 1
    assert "column 'title' is outside the allow-list" in refused.stderr
    assert "Summer" not in refused.stderr
    assert set((await pg.item_categories(scope)).values()) == {""}

    done = privrank(
        config, "import", "items", str(first), "--scope", scope, "--drop-columns", "title"
    )
    assert "imported 3 items" in done.stdout
    stored = await pg.item_categories(scope)
    assert (stored["i1"], stored["i2"], stored["new1"], stored["i3"]) == (
        "promo",
        "news",
        "promo",
        "",
    )

    # a re-import updates; a bad line anywhere keeps nothing of the file
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,category\ni1,sports\ni2,free text\n")
    refused = privrank(config, "import", "items", str(bad), "--scope", scope, check=False)
    assert refused.returncode == 1
    assert "bad.csv line 3: category may contain only" in refused.stderr
    assert (await pg.item_categories(scope))["i1"] == "promo"
    again = tmp_path / "again.csv"
    again.write_text("item_id,category\ni1,sports\ni2,\n")
    privrank(config, "import", "items", str(again), "--scope", scope)
    stored = await pg.item_categories(scope)
    assert (stored["i1"], stored["i2"], stored["new1"]) == ("sports", "", "promo")
