"""Tests of ranking/snapshot.py (publish, load, prune) and ranking/retrieval.py (exact and
faiss retrievers)."""

from __future__ import annotations

import json
import re
import shutil
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from features.errors import SnapshotError
from features.schema import CONTEXT_SEGMENTS, FEATURE_NAMES
from ranking import snapshot
from ranking.retrieval import (
    SEARCH_PARAMS_KEY,
    ExactRetriever,
    FaissRetriever,
    SearchParams,
    build_index,
    cold_positions,
    popular_head,
    retriever_for,
    search_recall,
    tune_search,
    tune_search_report,
    write_index,
)

SCOPE = "books"


def make_arrays(
    n: int = 6, u: int = 3, d: int = 4, seed: int = 0, prefix: str = "i"
) -> dict[str, np.ndarray]:
    """A small valid snapshot: n items, u users, d dimensions, every user has seen something."""
    rng = np.random.default_rng(seed)
    seen_rows = [sorted(rng.choice(n, size=1 + r % 3, replace=False).tolist()) for r in range(u)]
    return {
        "item_ids": np.array(sorted(f"{prefix}{j:03d}" for j in range(n))),
        "item_vectors": rng.standard_normal((n, d)).astype(np.float32),
        "item_bias": (rng.random(n) * 0.1).astype(np.float32),
        "item_popularity": np.array([0.5, 0.9, 0.1, 0.9, 0.0, 0.3][:n] + [0.2] * (n - 6), "f4"),
        "user_ids": np.array(sorted(f"u{r:03d}" for r in range(u))),
        "user_vectors": rng.standard_normal((u, d)).astype(np.float32),
        "user_features": rng.random((u, len(FEATURE_NAMES))).astype(np.float32),
        "seen_indptr": np.cumsum([0, *map(len, seen_rows)]).astype(np.int64),
        "seen_indices": np.array([i for row in seen_rows for i in row], dtype=np.int64),
    }


def version_dirs(root: Path, scope: str = SCOPE) -> set[str]:
    return {p.name for p in (root / scope).iterdir() if p.is_dir() and not p.name.startswith(".")}


# ---------------------------------------------------------------------------------------------
# publish / load
# ---------------------------------------------------------------------------------------------


def test_nothing_published(tmp_path: Path) -> None:
    assert snapshot.current_version(tmp_path, SCOPE) is None
    assert snapshot.published_scopes(tmp_path) == []
    assert snapshot.published_scopes(tmp_path / "missing") == []
    assert snapshot.prune(tmp_path, SCOPE) == []
    with pytest.raises(SnapshotError, match="no published snapshot"):
        snapshot.load_current(tmp_path, SCOPE)


def test_round_trip(tmp_path: Path) -> None:
    arrays = make_arrays()
    version = snapshot.publish(tmp_path, SCOPE, arrays, extra={"model": "als", "iterations": 3})

    assert snapshot.current_version(tmp_path, SCOPE) == version
    assert (tmp_path / SCOPE / snapshot.POINTER).read_text().strip() == version
    assert snapshot.published_scopes(tmp_path) == [SCOPE]
    assert version_dirs(tmp_path) == {version}

    loaded = snapshot.load_current(tmp_path, SCOPE)
    assert loaded.scope == SCOPE
    assert loaded.version == version
    assert loaded.path == tmp_path / SCOPE / version
    for name in snapshot.ARRAYS:
        got, want = getattr(loaded, name), arrays[name]
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert got.dtype.kind == want.dtype.kind, name
    assert loaded.item_vectors.dtype == np.float32
    assert loaded.seen_indptr.dtype == np.int64
    assert loaded.n_items == 6
    assert loaded.n_users == 3
    assert loaded.dim == 4

    manifest = loaded.manifest
    assert manifest == json.loads((loaded.path / snapshot.MANIFEST).read_text())
    assert manifest["format"] == snapshot.FORMAT_VERSION
    assert manifest["scope"] == SCOPE
    assert manifest["version"] == version
    assert manifest["items"] == 6
    assert manifest["users"] == 3
    assert manifest["dimensions"] == 4
    assert manifest["retrieval"] == "exact"
    assert manifest["model"] == "als"
    assert manifest["iterations"] == 3
    assert set(manifest["files"]) == {f"{name}.npy" for name in [*snapshot.ARRAYS, "item_unit"]}
    assert loaded.created_at == manifest["created_at"]
    assert re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{10}", version), version


def test_unit_rows_are_published_and_mapped_not_computed(tmp_path: Path) -> None:
    arrays = make_arrays()
    arrays["item_vectors"][2] = 0.0  # a zero row stays zero
    snapshot.publish(tmp_path, SCOPE, arrays)
    loaded = snapshot.load_current(tmp_path, SCOPE)
    expected = arrays["item_vectors"] / np.maximum(
        np.linalg.norm(arrays["item_vectors"], axis=1, keepdims=True), 1e-30
    )
    np.testing.assert_allclose(loaded.item_unit, expected, rtol=1e-6)
    assert not loaded.item_unit.flags.owndata  # a view of the mapped file, shared by workers
    with pytest.raises(SnapshotError, match="item_unit"):
        snapshot.publish(tmp_path, SCOPE, {**arrays, "item_unit": expected[:, :2]})


def test_loaded_derived_arrays(tmp_path: Path) -> None:
    arrays = make_arrays()
    arrays["item_vectors"][2] = 0.0  # a zero vector has a zero unit vector
    loaded = snapshot.load(tmp_path / SCOPE / snapshot.publish(tmp_path, SCOPE, arrays))
    norms = np.linalg.norm(loaded.item_unit, axis=1)
    np.testing.assert_allclose(np.delete(norms, 2), 1.0, rtol=1e-6)
    assert norms[2] == 0.0
    assert loaded.item_unit.dtype == np.float32
    np.testing.assert_array_equal(loaded.zero_bias, np.zeros(6, dtype=np.float32))
    # popularity [0.5, 0.9, 0.1, 0.9, 0.0, 0.3]: desc, ties (1 and 3) by position
    np.testing.assert_array_equal(loaded.popular, [1, 3, 0, 5, 2, 4])


def test_lookups(tmp_path: Path) -> None:
    arrays = make_arrays()
    loaded = snapshot.load(tmp_path / SCOPE / snapshot.publish(tmp_path, SCOPE, arrays))
    assert loaded.user_position("u001") == 1
    assert loaded.user_position("u999") is None
    assert loaded.user_position("") is None
    assert loaded.item_position("i005") == 5
    assert loaded.item_position("i006") is None
    np.testing.assert_array_equal(loaded.item_positions(["i004", "zzz", "i000", "i004"]), [0, 4])
    assert loaded.item_positions([]).shape == (0,)
    # an unknown ID longer than every known one, which a known one begins: not that one
    np.testing.assert_array_equal(loaded.lookup_items(["i0040", "i004", "i00"]), [-1, 4, -1])
    np.testing.assert_array_equal(loaded.lookup_users(["u0010", "u001", "u999"]), [-1, 1, -1])
    indptr, indices = arrays["seen_indptr"], arrays["seen_indices"]
    for u in range(3):
        np.testing.assert_array_equal(loaded.seen(u), indices[indptr[u] : indptr[u + 1]])


def test_publishing_again_moves_current_and_keeps_the_old_version(tmp_path: Path) -> None:
    first = snapshot.publish(tmp_path, SCOPE, make_arrays(seed=1))
    second = snapshot.publish(tmp_path, SCOPE, make_arrays(seed=2))
    assert first != second
    assert snapshot.current_version(tmp_path, SCOPE) == second
    assert snapshot.load_current(tmp_path, SCOPE).version == second
    assert version_dirs(tmp_path) == {first, second}
    # the old one is intact and loadable until pruned
    assert snapshot.load(tmp_path / SCOPE / first).version == first
    removed = snapshot.prune(tmp_path, SCOPE, keep=0)
    assert removed == [first]
    assert version_dirs(tmp_path) == {second}
    assert snapshot.load_current(tmp_path, SCOPE).version == second


def test_publishing_the_same_content_again_keeps_the_current_version(tmp_path: Path) -> None:
    """A re-run of build (or of train and build over unchanged data): no new version, no
    pointer swap, no second copy, while nobody was erased since the current one's data."""
    first = snapshot.publish(tmp_path, SCOPE, make_arrays(seed=1), data_as_of=100.0)
    pointer = (tmp_path / SCOPE / snapshot.POINTER).stat().st_mtime_ns
    assert snapshot.publish(tmp_path, SCOPE, make_arrays(seed=1), data_as_of=100.0) == first
    again = {"data_as_of": 200.0, "last_erasure": 99.0}
    assert snapshot.publish(tmp_path, SCOPE, make_arrays(seed=1), **again) == first
    assert (tmp_path / SCOPE / snapshot.POINTER).stat().st_mtime_ns == pointer
    assert sorted(p.name for p in (tmp_path / SCOPE).iterdir()) == sorted([snapshot.POINTER, first])
    assert snapshot.load_current(tmp_path, SCOPE).data_as_of == 100.0


@pytest.mark.parametrize(
    "change",
    [
        # the current one would mask the user erased at 150, whom the new one may serve
        {"data_as_of": 200.0, "last_erasure": 150.0},
        {"extra": {"model": "ease"}},
        {"arrays": make_arrays(seed=2)},
        {"arrays": {**make_arrays(seed=1), "user_ids": np.array(["u000", "u001", "u009"])}},
    ],
    ids=["erasure since the current one's data", "other settings", "other arrays", "other users"],
)
def test_other_content_is_a_new_version(tmp_path: Path, change: dict[str, Any]) -> None:
    first = snapshot.publish(tmp_path, SCOPE, make_arrays(seed=1), data_as_of=100.0)
    args: dict[str, Any] = {"arrays": make_arrays(seed=1), "data_as_of": 100.0, **change}
    second = snapshot.publish(tmp_path, SCOPE, args.pop("arrays"), **args)
    assert second != first
    assert snapshot.current_version(tmp_path, SCOPE) == second
    assert snapshot.load_current(tmp_path, SCOPE).data_as_of == args["data_as_of"]


def test_a_damaged_current_snapshot_is_replaced_by_its_content(tmp_path: Path) -> None:
    first = snapshot.publish(tmp_path, SCOPE, make_arrays(seed=1))
    flip_byte(tmp_path / SCOPE / first / "item_vectors.npy")
    second = snapshot.publish(tmp_path, SCOPE, make_arrays(seed=1))
    assert second != first
    assert snapshot.load_current(tmp_path, SCOPE).version == second


def test_scopes_are_independent(tmp_path: Path) -> None:
    books = snapshot.publish(tmp_path, "books", make_arrays(seed=1))
    films = snapshot.publish(tmp_path, "films", make_arrays(seed=2, n=8))
    assert snapshot.published_scopes(tmp_path) == ["books", "films"]
    assert snapshot.load_current(tmp_path, "books").version == books
    assert snapshot.load_current(tmp_path, "films").n_items == 8
    assert snapshot.current_version(tmp_path, "films") == films


def test_publish_leaves_no_temporary_files(tmp_path: Path) -> None:
    version = snapshot.publish(tmp_path, SCOPE, make_arrays())
    assert sorted(p.name for p in (tmp_path / SCOPE).iterdir()) == sorted(
        [snapshot.POINTER, version]
    )
    files = sorted(p.name for p in (tmp_path / SCOPE / version).iterdir())
    names = [*snapshot.ARRAYS, "item_unit"]
    assert files == sorted([snapshot.MANIFEST, *(f"{name}.npy" for name in names)])


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["item_vectors.npy", "seen_indices.npy", "item_ids.npy"])
def test_corrupt_file_is_refused(tmp_path: Path, name: str) -> None:
    version = snapshot.publish(tmp_path, SCOPE, make_arrays())
    flip_byte(tmp_path / SCOPE / version / name)
    with pytest.raises(SnapshotError, match=re.escape(f"{name} fails its checksum")):
        snapshot.load(tmp_path / SCOPE / version)
    with pytest.raises(SnapshotError, match=re.escape(f"{name} fails its checksum")):
        snapshot.load_current(tmp_path, SCOPE)


def test_corrupt_header_is_refused(tmp_path: Path) -> None:
    version = snapshot.publish(tmp_path, SCOPE, make_arrays())
    flip_byte(tmp_path / SCOPE / version / "item_vectors.npy", offset=20)
    with pytest.raises(SnapshotError, match="checksum"):
        snapshot.load_current(tmp_path, SCOPE)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    version = snapshot.publish(tmp_path, SCOPE, make_arrays())
    (tmp_path / SCOPE / version / "item_bias.npy").unlink()
    with pytest.raises(SnapshotError, match=r"item_bias\.npy unreadable"):
        snapshot.load_current(tmp_path, SCOPE)


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    version = snapshot.publish(tmp_path, SCOPE, make_arrays())
    (tmp_path / SCOPE / version / snapshot.MANIFEST).unlink()
    with pytest.raises(SnapshotError, match="unreadable manifest"):
        snapshot.load_current(tmp_path, SCOPE)


def test_garbled_manifest_is_refused(tmp_path: Path) -> None:
    version = snapshot.publish(tmp_path, SCOPE, make_arrays())
    (tmp_path / SCOPE / version / snapshot.MANIFEST).write_text("{not json")
    with pytest.raises(SnapshotError, match="unreadable manifest"):
        snapshot.load_current(tmp_path, SCOPE)


def test_manifest_of_another_format_is_refused(tmp_path: Path) -> None:
    version = snapshot.publish(tmp_path, SCOPE, make_arrays())
    path = tmp_path / SCOPE / version / snapshot.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="unsupported snapshot format 99"):
        snapshot.load_current(tmp_path, SCOPE)


def test_manifest_missing_an_array_is_refused(tmp_path: Path) -> None:
    version = snapshot.publish(tmp_path, SCOPE, make_arrays())
    path = tmp_path / SCOPE / version / snapshot.MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["files"]["user_vectors.npy"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match=r"manifest lists no user_vectors\.npy"):
        snapshot.load_current(tmp_path, SCOPE)


def test_pointer_to_a_missing_version_is_refused(tmp_path: Path) -> None:
    version = snapshot.publish(tmp_path, SCOPE, make_arrays())
    shutil.rmtree(tmp_path / SCOPE / version)
    with pytest.raises(SnapshotError):
        snapshot.load_current(tmp_path, SCOPE)


def bad(arrays: dict[str, np.ndarray], **changes: np.ndarray) -> dict[str, np.ndarray]:
    return {**arrays, **changes}


GOOD = make_arrays()
BAD_ARRAYS = {
    "unsorted item_ids": (
        bad(GOOD, item_ids=GOOD["item_ids"][[1, 0, 2, 3, 4, 5]]),
        "item_ids must be sorted",
    ),
    "duplicate item_ids": (
        bad(GOOD, item_ids=np.array(["i0", "i1", "i1", "i3", "i4", "i5"])),
        "item_ids must be sorted and unique",
    ),
    "unsorted user_ids": (
        bad(GOOD, user_ids=np.array(["u2", "u1", "u3"])),
        "user_ids must be sorted",
    ),
    "short item_bias": (bad(GOOD, item_bias=GOOD["item_bias"][:-1]), "item arrays disagree"),
    "short item_vectors": (
        bad(GOOD, item_vectors=GOOD["item_vectors"][:-1]),
        "item arrays disagree",
    ),
    "short item_popularity": (
        bad(GOOD, item_popularity=GOOD["item_popularity"][:-1]),
        "item_popularity disagrees",
    ),
    "short user_vectors": (
        bad(GOOD, user_vectors=GOOD["user_vectors"][:-1]),
        "user arrays disagree",
    ),
    "short user_features": (
        bad(GOOD, user_features=GOOD["user_features"][:-1]),
        "user arrays disagree",
    ),
    "dimension mismatch": (
        bad(GOOD, user_vectors=np.zeros((3, 5), dtype=np.float32)),
        "differ in dimension",
    ),
    "indptr too short": (
        bad(GOOD, seen_indptr=GOOD["seen_indptr"][:-1]),
        "seen_indptr does not describe",
    ),
    "indptr wrong total": (
        bad(GOOD, seen_indices=GOOD["seen_indices"][:-1]),
        "seen_indptr does not describe",
    ),
    "indptr decreasing": (
        bad(GOOD, seen_indptr=np.array([0, 4, 3, 6], dtype=np.int64)),
        "seen_indptr must not decrease",
    ),
    "seen item past the catalog": (
        bad(GOOD, seen_indices=np.array([0, 1, 2, 3, 4, 6], dtype=np.int64)),
        "seen_indices must be item positions",
    ),
    "negative seen item": (
        bad(GOOD, seen_indices=np.array([0, 1, 2, 3, 4, -1], dtype=np.int64)),
        "seen_indices must be item positions",
    ),
    "segments short of a row": (
        bad(
            GOOD,
            segment_items=np.full((CONTEXT_SEGMENTS - 1, 5), -1, dtype=np.int64),
            segment_scores=np.zeros((CONTEXT_SEGMENTS - 1, 5), dtype=np.float32),
        ),
        f"do not fit the items and {CONTEXT_SEGMENTS} segments",
    ),
    "a NaN in item_vectors": (
        bad(
            GOOD, item_vectors=np.where(np.eye(6, 4) > 0, np.nan, GOOD["item_vectors"]).astype("f4")
        ),
        "item_vectors: holds NaN or infinite values",
    ),
    "an infinite bias": (
        bad(GOOD, item_bias=np.array([0, 0, np.inf, 0, 0, 0], dtype=np.float32)),
        "item_bias: holds NaN or infinite values",
    ),
    "a NaN user vector": (
        bad(GOOD, user_vectors=np.full((3, 4), np.nan, dtype=np.float32)),
        "user_vectors: holds NaN or infinite values",
    ),
    "integer vectors": (
        bad(GOOD, item_vectors=GOOD["item_vectors"].astype(np.int64)),
        "item_vectors: expected kind 'f'",
    ),
    "object ids": (
        bad(GOOD, item_ids=GOOD["item_ids"].astype(object)),
        "item_ids: expected kind 'U'",
    ),
    "1-d vectors": (
        bad(GOOD, item_vectors=GOOD["item_vectors"].ravel()),
        "item_vectors: expected kind 'f' with 2 dims",
    ),
    "missing array": (
        {k: v for k, v in GOOD.items() if k != "item_bias"},
        r"missing arrays: \['item_bias'\]",
    ),
}


@pytest.mark.parametrize("case", BAD_ARRAYS)
def test_bad_arrays_are_refused_at_publish(tmp_path: Path, case: str) -> None:
    arrays, message = BAD_ARRAYS[case]
    with pytest.raises(SnapshotError, match=message):
        snapshot.publish(tmp_path, SCOPE, arrays)
    assert snapshot.current_version(tmp_path, SCOPE) is None
    assert not (tmp_path / SCOPE).exists() or not any((tmp_path / SCOPE).iterdir())


def test_failing_index_writer_leaves_the_current_snapshot(tmp_path: Path) -> None:
    version = snapshot.publish(tmp_path, SCOPE, make_arrays(seed=1))

    def broken(path: Path) -> None:
        path.write_bytes(b"half an index")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        snapshot.publish(tmp_path, SCOPE, make_arrays(seed=2), index_writer=broken)
    assert snapshot.current_version(tmp_path, SCOPE) == version
    assert sorted(p.name for p in (tmp_path / SCOPE).iterdir()) == sorted(
        [snapshot.POINTER, version]
    )


def test_leftover_staging_dir_is_ignored_and_pruned(tmp_path: Path) -> None:
    version = snapshot.publish(tmp_path, SCOPE, make_arrays(seed=1))
    # a crashed publish: staging directory with a newer-looking, half-written snapshot
    staging = tmp_path / SCOPE / ".staging-4242-1"
    staging.mkdir()
    np.save(staging / "item_ids.npy", np.array(["x"]))
    (staging / snapshot.MANIFEST).write_text("{")
    assert snapshot.current_version(tmp_path, SCOPE) == version
    assert snapshot.load_current(tmp_path, SCOPE).version == version
    assert snapshot.published_scopes(tmp_path) == [SCOPE]

    assert snapshot.prune(tmp_path, SCOPE, keep=3) == []
    assert not staging.exists()
    assert snapshot.load_current(tmp_path, SCOPE).version == version
    assert version_dirs(tmp_path) == {version}


def test_prune_never_removes_the_current_version(tmp_path: Path) -> None:
    versions = [snapshot.publish(tmp_path, SCOPE, make_arrays(seed=s)) for s in range(4)]
    assert len(set(versions)) == 4
    # roll back to the first one: it is now the oldest *and* the current one
    (tmp_path / SCOPE / snapshot.POINTER).write_text(versions[0] + "\n")
    for keep in (3, 1, 0):
        removed = snapshot.prune(tmp_path, SCOPE, keep=keep)
        assert versions[0] not in removed
        assert versions[0] in version_dirs(tmp_path)
        assert snapshot.load_current(tmp_path, SCOPE).version == versions[0]
    assert version_dirs(tmp_path) == {versions[0]}


def test_prune_keeps_the_newest_by_name(tmp_path: Path) -> None:
    versions = [snapshot.publish(tmp_path, SCOPE, make_arrays(seed=s)) for s in range(5)]
    current = versions[-1]
    newest_two = set(sorted(versions, reverse=True)[:2])
    removed = snapshot.prune(tmp_path, SCOPE, keep=2)
    assert version_dirs(tmp_path) == newest_two | {current}
    assert set(removed) == set(versions) - newest_two - {current}
    assert snapshot.prune(tmp_path, SCOPE, keep=2) == []


def test_prune_keeps_the_newest_published_within_one_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three publishes in the same second get the same timestamp prefix, so their version names
    # sort by content hash, not by publication order. prune(keep=2) must still keep the two
    # most recently published ones.
    scratch = tmp_path / "scratch"
    by_name = sorted((snapshot.publish(scratch, SCOPE, make_arrays(seed=s)), s) for s in range(3))
    # publish the highest-named first, then the lowest-named, then the middle one
    order = [by_name[2][1], by_name[0][1], by_name[1][1]]
    frozen = types.SimpleNamespace(
        time=lambda: 1_700_000_000.25,
        time_ns=time.time_ns,
        strftime=time.strftime,
        gmtime=time.gmtime,
    )
    monkeypatch.setattr(snapshot, "time", frozen)
    root = tmp_path / "root"
    first, second, third = (snapshot.publish(root, SCOPE, make_arrays(seed=s)) for s in order)
    assert first[:16] == second[:16] == third[:16], "same-second timestamp prefix"
    assert snapshot.current_version(root, SCOPE) == third

    removed = snapshot.prune(root, SCOPE, keep=2)
    assert version_dirs(root) == {second, third}, (
        f"prune(keep=2) removed {removed} and kept {sorted(version_dirs(root))}; "
        f"publication order was {[first, second, third]}"
    )


def test_prune_goes_by_when_the_data_was_read_not_when_it_was_built(tmp_path: Path) -> None:
    """A snapshot built after an erasure from data read before it may hold the erased user:
    cleanup prunes it with the snapshots built before the erasure (never the current one)."""
    erased_at = time.time()
    before = snapshot.publish(tmp_path, SCOPE, make_arrays(seed=1), data_as_of=erased_at - 60)
    late = snapshot.publish(tmp_path, SCOPE, make_arrays(seed=2), data_as_of=erased_at - 1)
    fresh = snapshot.publish(tmp_path, SCOPE, make_arrays(seed=3), data_as_of=erased_at + 1)
    previous = snapshot.publish(tmp_path, SCOPE, make_arrays(seed=4), data_as_of=erased_at - 1)
    assert snapshot.load(tmp_path / SCOPE / late).data_as_of == erased_at - 1
    removed = snapshot.prune(tmp_path, SCOPE, keep=5, data_before=erased_at)
    assert sorted(removed) == sorted([before, late])
    assert version_dirs(tmp_path) == {fresh, previous}  # the current one stays, masked


def test_prune_other_scopes_untouched(tmp_path: Path) -> None:
    books = [snapshot.publish(tmp_path, "books", make_arrays(seed=s)) for s in range(3)]
    films = [snapshot.publish(tmp_path, "films", make_arrays(seed=s)) for s in range(3)]
    snapshot.prune(tmp_path, "books", keep=0)
    assert version_dirs(tmp_path, "books") == {books[-1]}
    assert version_dirs(tmp_path, "films") == set(films)


# ---------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def single_threaded_faiss() -> Iterator[None]:
    """HNSW construction with one thread builds the same graph every run."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def catalog(n: int = 3000, d: int = 16, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    bias = (rng.standard_normal(n) * 0.5).astype(np.float32)
    return vectors, bias


def queries(count: int = 50, d: int = 16, seed: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, d)).astype(np.float32)


NO_EXCLUSIONS = np.empty(0, dtype=np.int64)


def test_exact_retriever_matches_numpy() -> None:
    vectors, bias = catalog(n=400)
    exact = ExactRetriever(vectors, bias)
    excluded = np.array([3, 3, 17, 200], dtype=np.int64)
    for query in queries(count=5):
        items, scores = exact.top_k(query, excluded, 10)
        full = vectors.astype(np.float64) @ query + bias
        full[excluded] = -np.inf
        np.testing.assert_array_equal(items, np.argsort(-full, kind="stable")[:10])
        np.testing.assert_allclose(scores, full[items], rtol=1e-5)


KINDS = ["ivf", "hnsw"]


def check_rescored_exactly(
    exact: ExactRetriever, query: np.ndarray, got: np.ndarray, got_scores: np.ndarray, n: int
) -> None:
    """Candidates are re-scored exactly: same scores as the exact kernel for the same items."""
    assert (np.diff(got_scores) <= 0).all()
    rescored = {int(i): s for i, s in zip(*exact.top_k(query, NO_EXCLUSIONS, n), strict=True)}
    assert [rescored[int(i)] for i in got] == got_scores.tolist()


@pytest.mark.usefixtures("single_threaded_faiss")
def test_hnsw_recall_against_exact() -> None:
    # HNSW as earlier builds made it, searched with the earlier rule (no SearchParams)
    vectors, bias = catalog()
    exact = ExactRetriever(vectors, bias)
    hnsw = FaissRetriever(build_index(vectors, bias, kind="hnsw"), vectors, bias)
    assert hnsw.name == "faiss-hnsw"
    recalls = []
    for query in queries():
        want, want_scores = exact.top_k(query, NO_EXCLUSIONS, 10)
        got, got_scores = hnsw.top_k(query, NO_EXCLUSIONS, 10)
        assert len(got) == 10
        check_rescored_exactly(exact, query, got, got_scores, 3000)
        assert got_scores[0] <= want_scores[0]
        recalls.append(len(set(got.tolist()) & set(want.tolist())) / 10)
    recall = float(np.mean(recalls))
    assert recall >= 0.95, f"faiss recall@10 vs exact is {recall:.3f}, below the 0.95 threshold"


@pytest.mark.usefixtures("single_threaded_faiss")
def test_tuned_ivf_recall_against_exact_on_held_out_queries() -> None:
    # isotropic noise is the hard case for IVF: the untuned default is not enough, and
    # tune_search must find what is; it is checked on queries it did not tune on
    vectors, bias = catalog()
    index = build_index(vectors, bias)
    exact = ExactRetriever(vectors, bias)
    tuning = tune_search_report(index, vectors, bias, queries(count=100, seed=60), 10, 0.97)
    assert tuning.met, tuning
    assert tuning.recall >= 0.97
    assert tuning.params.nprobe >= 1
    assert tuning.ms_per_query > 0
    ivf = FaissRetriever(index, vectors, bias, params=tuning.params)
    assert ivf.name == "faiss-ivf"
    recalls = []
    for query in queries():
        want, want_scores = exact.top_k(query, NO_EXCLUSIONS, 10)
        got, got_scores = ivf.top_k(query, NO_EXCLUSIONS, 10)
        assert len(got) == 10
        check_rescored_exactly(exact, query, got, got_scores, 3000)
        assert got_scores[0] <= want_scores[0]
        recalls.append(len(set(got.tolist()) & set(want.tolist())) / 10)
    recall = float(np.mean(recalls))
    assert recall >= 0.95, f"tuned IVF recall@10 on held-out queries is {recall:.3f} < 0.95"
    # the same figure through search_recall
    assert search_recall(index, vectors, bias, queries(), 10, tuning.params) == pytest.approx(
        recall
    )


@pytest.mark.usefixtures("single_threaded_faiss")
def test_tune_search_picks_the_smallest_setting_that_reaches_the_target() -> None:
    vectors, bias = catalog()
    index = build_index(vectors, bias)
    sample = queries(count=60, seed=61)
    # margin_se=0: the sample's mean recall is taken at its word
    params = tune_search(index, vectors, bias, sample, 10, 0.9, heads=(0,), margin_se=0)
    assert params == SearchParams(nprobe=params.nprobe, head=0)
    assert search_recall(index, vectors, bias, sample, 10, params) >= 0.9
    smaller = [p for p in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48) if p < params.nprobe]
    if smaller:
        below = SearchParams(nprobe=smaller[-1])
        assert search_recall(index, vectors, bias, sample, 10, below) < 0.9
    # with the default margin, the mean must clear the target by about 1.6 standard errors
    careful = tune_search_report(index, vectors, bias, sample, 10, 0.9, heads=(0,))
    assert careful.met
    assert careful.params.nprobe >= params.nprobe
    assert careful.recall > careful.recall_low >= 0.9
    # probing every list is an exact scan of the index: any target is reachable
    everything = tune_search_report(index, vectors, bias, sample, 10, 1.0, heads=(0,))
    assert everything.met
    assert everything.recall == everything.recall_low == 1.0


def test_tune_search_reports_an_unreachable_target() -> None:
    vectors, bias = catalog(n=400, d=8)
    index = build_index(vectors, bias, kind="hnsw", hnsw_neighbours=2)
    tuning = tune_search_report(index, vectors, bias, queries(count=5, d=8), 50, 1.01, heads=(0,))
    assert not tuning.met
    assert 0 < tuning.recall <= 1


@pytest.mark.usefixtures("single_threaded_faiss")
def test_popular_head_finds_what_the_index_does_not_probe() -> None:
    # one list probed: an item of huge bias far from the query is found only through the head
    vectors, bias = catalog()
    index = build_index(vectors, bias)
    star = int(np.argmin(vectors @ queries(count=1)[0]))  # the worst match for the query
    bias = bias.copy()
    bias[star] = 1000.0
    query = queries(count=1)[0]
    without = FaissRetriever(index, vectors, bias, params=SearchParams(nprobe=1, head=0))
    with_head = FaissRetriever(index, vectors, bias, params=SearchParams(nprobe=1, head=1))
    assert star not in without.top_k(query, NO_EXCLUSIONS, 10)[0]
    items, _ = with_head.top_k(query, NO_EXCLUSIONS, 10)
    assert items[0] == star
    # excluded items stay excluded, head or not
    assert star not in with_head.top_k(query, np.array([star], dtype=np.int64), 10)[0]
    np.testing.assert_array_equal(popular_head(bias, 1), [star])
    np.testing.assert_array_equal(popular_head(np.zeros(5, np.float32), 3), [0, 1, 2])
    assert popular_head(bias, 0).dtype == np.int64


@pytest.mark.usefixtures("single_threaded_faiss")
def test_cold_items_are_left_out_of_the_index_and_still_ranked_exactly() -> None:
    # a third of the catalog cold (zero vectors, as build makes items nobody touched), their
    # bias as high as the best warm items' scores: some belong in many top 10s
    vectors, bias = catalog()
    cold = np.arange(0, len(vectors), 3)
    vectors[cold] = 0.0
    bias[cold] = 7.0 + 1.5 * np.random.default_rng(8).standard_normal(len(cold))
    np.testing.assert_array_equal(cold_positions(vectors), cold)
    index = build_index(vectors, bias)
    assert index.ntotal == len(vectors) - len(cold)
    # the index holds the warm items under their positions
    warm = np.setdiff1d(np.arange(len(vectors)), cold)
    _, found = index.search(np.hstack([queries(count=3), np.ones((3, 1), np.float32)]), 50)
    assert set(found[found >= 0].tolist()) <= set(warm.tolist())
    exact = ExactRetriever(vectors, bias)
    # no head, one list: the cold part of every answer is still exactly the exact scan's
    retriever = FaissRetriever(index, vectors, bias, params=SearchParams(nprobe=1, head=0))
    cold_set = set(cold.tolist())
    rng = np.random.default_rng(7)
    cold_answers = 0
    for query in queries():
        excluded = np.sort(rng.choice(cold, size=20, replace=False))
        want, _ = exact.top_k(query, excluded, 10)
        got, got_scores = retriever.top_k(query, excluded, 10)
        check_rescored_exactly(exact, query, got, got_scores, 3000)
        assert not set(got.tolist()) & set(excluded.tolist())
        # a cold item of the exact top 10 outscores all but 9 items, candidates included
        assert set(want.tolist()) & cold_set <= set(got.tolist())
        cold_answers += bool(set(want.tolist()) & cold_set)
    assert cold_answers >= 10
    # a variant's own bias re-orders and lifts the cold items: still exact for them
    other = bias.copy()
    other[cold] = 14.0 - bias[cold]
    query = queries(count=1)[0]
    want, _ = ExactRetriever(vectors, other).top_k(query, NO_EXCLUSIONS, 10)
    got, _ = retriever.with_bias(other).top_k(query, NO_EXCLUSIONS, 10)
    assert set(want.tolist()) & cold_set
    assert set(want.tolist()) & cold_set <= set(got.tolist())
    # tuned, the whole answer reaches the recall target (the index is warm items only)
    params = tune_search(index, vectors, bias, queries(count=60, seed=61), 10, 0.95)
    assert search_recall(index, vectors, bias, queries(), 10, params) >= 0.95


@pytest.mark.parametrize("kind", KINDS)
def test_empty_catalog(kind: str) -> None:
    vectors, bias = np.empty((0, 4), np.float32), np.empty(0, np.float32)
    retriever = FaissRetriever(build_index(vectors, bias, kind=kind), vectors, bias)
    items, scores = retriever.top_k(queries(count=1, d=4)[0], NO_EXCLUSIONS, 5)
    assert items.shape == scores.shape == (0,)


def test_search_params_round_trip() -> None:
    params = SearchParams(nprobe=6, ef_search=0, head=250)
    assert SearchParams.from_dict(params.to_dict()) == params
    assert SearchParams.from_dict({"nprobe": "3", "unknown": 1}) == SearchParams(nprobe=3)


@pytest.mark.usefixtures("single_threaded_faiss")
@pytest.mark.parametrize("kind", KINDS)
def test_exclusions_are_respected_by_both(kind: str) -> None:
    vectors, bias = catalog()
    exact = ExactRetriever(vectors, bias)
    hnsw = FaissRetriever(build_index(vectors, bias, kind=kind), vectors, bias)
    rng = np.random.default_rng(9)
    for query in queries(count=20):
        best, _ = exact.top_k(query, NO_EXCLUSIONS, 15)
        # the best 15 plus random others, with a duplicate
        excluded = np.sort(
            np.concatenate([best, rng.choice(3000, size=30, replace=False), best[:1]])
        ).astype(np.int64)
        for retriever in (exact, hnsw):
            items, _ = retriever.top_k(query, excluded, 10)
            assert len(items) == 10, retriever.name
            assert not np.isin(items, excluded).any(), retriever.name


@pytest.mark.parametrize("kind", KINDS)
def test_faiss_retriever_small_catalog_falls_back_to_exact_results(kind: str) -> None:
    # asking for more than the index can give: the answer is still the exact one
    vectors, bias = catalog(n=40, d=4)
    exact = ExactRetriever(vectors, bias)
    hnsw = FaissRetriever(build_index(vectors, bias, kind=kind), vectors, bias)
    excluded = np.array([0, 5, 6], dtype=np.int64)
    for query in queries(count=5, d=4):
        for k in (1, 10, 37, 100):
            got = hnsw.top_k(query, excluded, k)
            want = exact.top_k(query, excluded, k)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def test_repeated_exclusions_do_not_shrink_the_ann_answer() -> None:
    """Item 0 excluded 60 times still leaves 99 items: faiss alone (one list probed, no head)
    finds about half, and the exact scan must make up the rest of k = 80, in a single query
    and in a batch alike (exclusions may repeat: the kernels' contract)."""
    rng = np.random.default_rng(0)
    centres = np.array([[10, 0], [-10, 0]], dtype=np.float32)
    vectors = (centres[np.arange(100) % 2] + rng.standard_normal((100, 2))).astype(np.float32)
    bias = np.zeros(100, dtype=np.float32)
    index = build_index(vectors, bias, nlist=2)
    ann = FaissRetriever(index, vectors, bias, params=SearchParams(nprobe=1, head=0))
    query, excluded = np.array([1, 0], dtype=np.float32), np.zeros(60, dtype=np.int64)
    want, _ = ExactRetriever(vectors, bias).top_k(query, excluded, 80)
    assert len(want) == 80
    np.testing.assert_array_equal(ann.top_k(query, excluded, 80)[0], want)
    _, _, counts = ann.top_k_batch(query[None, :], np.array([0, 60]), excluded, 80)
    assert counts.tolist() == [80]


@pytest.mark.parametrize("kind", KINDS)
def test_k_zero_returns_nothing_from_both(kind: str) -> None:
    # the Retriever contract: (positions int64[k'], scores float32[k']) with k' <= k
    vectors, bias = catalog(n=100, d=4)
    query = queries(count=1, d=4)[0]
    exact = ExactRetriever(vectors, bias)
    hnsw = FaissRetriever(build_index(vectors, bias, kind=kind), vectors, bias)
    for retriever in (exact, hnsw):
        items, scores = retriever.top_k(query, NO_EXCLUSIONS, 0)
        assert items.shape == scores.shape == (0,), retriever.name
        assert items.dtype == np.int64, retriever.name


def test_retriever_for_exact_without_index(tmp_path: Path) -> None:
    version = snapshot.publish(tmp_path, SCOPE, make_arrays())
    loaded = snapshot.load(tmp_path / SCOPE / version)
    assert loaded.manifest["retrieval"] == "exact"
    retriever = retriever_for(loaded)
    assert isinstance(retriever, ExactRetriever)
    assert retriever.name == "exact"


@pytest.mark.usefixtures("single_threaded_faiss")
def test_retriever_for_faiss_with_index(tmp_path: Path) -> None:
    arrays = make_arrays(n=200, d=8)
    vectors, bias = arrays["item_vectors"], arrays["item_bias"]
    version = snapshot.publish(
        tmp_path,
        SCOPE,
        arrays,
        index_writer=lambda path: write_index(build_index(vectors, bias), path),
    )
    loaded = snapshot.load_current(tmp_path, SCOPE)
    assert loaded.version == version
    assert (loaded.path / snapshot.INDEX_FILE).is_file()
    assert loaded.manifest["retrieval"] == "faiss"
    assert snapshot.INDEX_FILE in loaded.manifest["files"]
    retriever = retriever_for(loaded)
    assert isinstance(retriever, FaissRetriever)
    assert retriever.name == "faiss-ivf"
    # untuned: the nprobe written in the index file and the default head
    written = faiss.read_index(str(loaded.path / snapshot.INDEX_FILE))
    assert retriever.params == SearchParams(nprobe=written.nprobe, head=1000)
    query = loaded.user_vectors[0]
    excluded = loaded.seen(0)
    items, _ = retriever.top_k(query, excluded, 5)
    assert len(items) == 5
    assert not np.isin(items, excluded).any()


def test_retriever_for_uses_search_params_recorded_in_the_manifest(tmp_path: Path) -> None:
    arrays = make_arrays(n=200, d=8)
    vectors, bias = arrays["item_vectors"], arrays["item_bias"]
    tuned = SearchParams(nprobe=2, head=7)
    snapshot.publish(
        tmp_path,
        SCOPE,
        arrays,
        index_writer=lambda path: write_index(build_index(vectors, bias), path),
        extra={SEARCH_PARAMS_KEY: tuned.to_dict()},
    )
    retriever = retriever_for(snapshot.load_current(tmp_path, SCOPE))
    assert isinstance(retriever, FaissRetriever)
    assert retriever.params == tuned


def test_an_index_faiss_cannot_read_refuses_the_snapshot(tmp_path: Path) -> None:
    """Checksummed but unreadable (another faiss's format, a broken build): SnapshotError,
    which a reload refuses like any failing snapshot, not faiss's RuntimeError."""
    snapshot.publish(
        tmp_path, SCOPE, make_arrays(), index_writer=lambda path: path.write_bytes(b"no" * 64)
    )
    with pytest.raises(SnapshotError, match="faiss cannot read it"):
        retriever_for(snapshot.load_current(tmp_path, SCOPE))


@pytest.mark.usefixtures("single_threaded_faiss")
def test_retriever_for_an_hnsw_index_of_an_earlier_build(tmp_path: Path) -> None:
    arrays = make_arrays(n=200, d=8)
    vectors, bias = arrays["item_vectors"], arrays["item_bias"]
    snapshot.publish(
        tmp_path,
        SCOPE,
        arrays,
        index_writer=lambda path: write_index(build_index(vectors, bias, kind="hnsw"), path),
    )
    loaded = snapshot.load_current(tmp_path, SCOPE)
    retriever = retriever_for(loaded)
    assert isinstance(retriever, FaissRetriever)
    assert retriever.name == "faiss-hnsw"
    assert retriever.params == SearchParams()  # the earlier search rule, no head
    exact = ExactRetriever(loaded.item_vectors, loaded.item_bias)
    for user in range(loaded.n_users):
        query, excluded = loaded.user_vectors[user], loaded.seen(user)
        got = retriever.top_k(query, excluded, 5)
        want = exact.top_k(query, excluded, 5)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.usefixtures("single_threaded_faiss")
def test_hnsw_batch_rows_are_the_single_query_answers() -> None:
    """A batch row whose exclusions put it in another row's size class must not be searched
    with that row's wider beam: HNSW's candidates change with it (precompute's rankings
    would then differ from live answers)."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    bias = np.zeros(3000, dtype=np.float32)
    ann = FaissRetriever(build_index(vectors, bias, kind="hnsw", hnsw_neighbours=4), vectors, bias)
    for _ in range(20):
        batch = rng.standard_normal((2, 16)).astype(np.float32)
        excluded = np.sort(rng.choice(3000, 12, replace=False)).astype(np.int64)
        items, scores, counts = ann.top_k_batch(batch, np.array([0, 0, 12]), excluded, 20)
        for row, row_excluded in enumerate((NO_EXCLUSIONS, excluded)):
            want = ann.top_k(batch[row].copy(), row_excluded, 20)
            np.testing.assert_array_equal(items[row, : counts[row]], want[0])
            np.testing.assert_array_equal(scores[row, : counts[row]], want[1])


def test_corrupt_index_is_refused_at_load(tmp_path: Path) -> None:
    arrays = make_arrays(n=50, d=4)
    index = build_index(arrays["item_vectors"], arrays["item_bias"])
    version = snapshot.publish(
        tmp_path, SCOPE, arrays, index_writer=lambda path: write_index(index, path)
    )
    flip_byte(tmp_path / SCOPE / version / snapshot.INDEX_FILE)
    with pytest.raises(SnapshotError, match=re.escape(f"{snapshot.INDEX_FILE} fails its checksum")):
        snapshot.load_current(tmp_path, SCOPE)


def test_retriever_for_mismatched_index_uses_exact(tmp_path: Path) -> None:
    arrays = make_arrays(n=50, d=4)
    other, other_bias = catalog(n=60, d=4)  # an index of another catalog
    snapshot.publish(
        tmp_path,
        SCOPE,
        arrays,
        index_writer=lambda path: write_index(build_index(other, other_bias), path),
    )
    assert isinstance(retriever_for(snapshot.load_current(tmp_path, SCOPE)), ExactRetriever)


@pytest.mark.parametrize("kind", ["exact", *KINDS])
def test_batched_retrieval_is_the_single_query_path(kind: str) -> None:
    # what precompute caches is what Recommend would serve: row by row the same items and bits
    vectors, bias = catalog()
    retriever: ExactRetriever | FaissRetriever = (
        ExactRetriever(vectors, bias)
        if kind == "exact"
        else FaissRetriever(
            build_index(vectors, bias, kind=kind), vectors, bias, params=SearchParams(head=50)
        )
    )
    rng = np.random.default_rng(11)
    batch = queries(count=40)
    # rows with no, few and many exclusions (duplicates included), sorted as the CSR requires
    rows = [
        np.sort(rng.choice(3000, size=int(rng.integers(0, 3)) * 40, replace=True)).astype(np.int64)
        for _ in batch
    ]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int64)
    items, scores, counts = retriever.top_k_batch(batch, indptr, indices, 25)
    assert items.shape == scores.shape == (40, 25)
    for r, query in enumerate(batch):
        single_items, single_scores = retriever.top_k(query, rows[r], 25)
        assert counts[r] == len(single_items) == 25
        np.testing.assert_array_equal(items[r], single_items)
        np.testing.assert_array_equal(scores[r], single_scores)
    empty = retriever.top_k_batch(batch[:0], indptr[:1], indices[:0], 25)
    assert [a.shape[0] for a in empty] == [0, 0, 0]
