"""The immutable in-memory snapshot of a scope: what the jobs publish and the server ranks from.

On disk a snapshot is a directory ``<root>/<scope>/<version>/`` of ``.npy`` arrays, an optional
faiss index and ``manifest.json`` (version, counts, sha256 of every file, and ``data_as_of``:
when the data its user arrays come from was read, which erasures are compared against).
Publication writes the directory under a temporary name, fsyncs it, renames it into place and
then atomically replaces the ``<root>/<scope>/CURRENT`` pointer, so a reader sees the old
snapshot or the new one, never a partial one. Loading verifies every checksum before anything
is used; arrays are memory-mapped, not copied.

Items are ordered by item ID, so array positions double as the tie-break order. Users are
ordered by user ID and found by binary search.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from features.errors import SnapshotError
from features.schema import CONTEXT_SEGMENTS

POINTER = "CURRENT"
MANIFEST = "manifest.json"
INDEX_FILE = "items.faiss"
FORMAT_VERSION = 1

# name -> (dtype kind, number of dimensions); every snapshot has exactly these arrays
ARRAYS: dict[str, tuple[str, int]] = {
    "item_ids": ("U", 1),
    "item_vectors": ("f", 2),
    "item_bias": ("f", 1),
    "item_popularity": ("f", 1),
    "user_ids": ("U", 1),
    "user_vectors": ("f", 2),
    "user_features": ("f", 2),
    "seen_indptr": ("i", 1),
    "seen_indices": ("i", 1),
}
# arrays a snapshot may carry: the item-item matrix of an EASE model (float32[n, n]); the
# most popular items per context segment (daypart x device; int64 positions, -1 padded, with
# their float32 scores); and the profile-free item components that serving weighs into the
# bias (ranking/scoring.py): recency and engagement (float32[n] in [0, 1]), a category code
# per item (int32[n]) into the category names (str[C], code 0 = none). Snapshots built before
# the components serve their item_bias as built.
OPTIONAL_ARRAYS: dict[str, tuple[str, int]] = {
    # item_vectors' rows scaled to norm 1 (0 stays 0): written by publish, so that every
    # process maps one copy instead of computing its own (snapshots from before compute it)
    "item_unit": ("f", 2),
    "item_item": ("f", 2),
    "segment_items": ("i", 2),
    "segment_scores": ("f", 2),
    "item_recency": ("f", 1),
    "item_engagement": ("f", 1),
    "item_category": ("i", 1),
    "categories": ("U", 1),
}
ITEM_COMPONENTS = ("item_recency", "item_engagement", "item_category", "categories")


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One scope's model and data, read-only. Shapes: n items, u users, d dimensions."""

    scope: str
    version: str
    path: Path
    manifest: dict[str, Any]
    item_ids: np.ndarray  # str[n], sorted
    item_vectors: np.ndarray  # float32[n, d]
    item_bias: np.ndarray  # float32[n], the build profile's bias (the faiss index's)
    item_popularity: np.ndarray  # float32[n], non-personalized score in [0, 1]
    user_ids: np.ndarray  # str[u], sorted
    user_vectors: np.ndarray  # float32[u, d]
    user_features: np.ndarray  # float32[u, F], columns as features.schema.FEATURE_NAMES
    seen_indptr: np.ndarray  # int64[u + 1], CSR rows of items each user interacted with
    seen_indices: np.ndarray  # int64[nnz], sorted within each row
    # derived once at load
    item_unit: np.ndarray = field(repr=False)  # float32[n, d], rows of norm 1 (or 0)
    zero_bias: np.ndarray = field(repr=False)  # float32[n]
    popular: np.ndarray = field(repr=False)  # int64[n], positions by popularity desc, then ID
    item_item: np.ndarray | None = field(default=None, repr=False)  # float32[n, n] (EASE)
    segment_items: np.ndarray | None = field(default=None, repr=False)  # int64[S, T]
    segment_scores: np.ndarray | None = field(default=None, repr=False)  # float32[S, T]
    item_recency: np.ndarray | None = field(default=None, repr=False)  # float32[n]
    item_engagement: np.ndarray | None = field(default=None, repr=False)  # float32[n]
    item_category: np.ndarray | None = field(default=None, repr=False)  # int32[n]
    categories: np.ndarray | None = field(default=None, repr=False)  # str[C]

    @property
    def n_items(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])

    @property
    def created_at(self) -> float:
        return float(self.manifest["created_at"])

    @property
    def data_as_of(self) -> float:
        """When the data of its users was read (unix seconds): an erasure at or after it may
        not be reflected. 0 for snapshots from before it was recorded (age unknown)."""
        return _data_as_of(self.manifest)

    def user_position(self, user_id: str) -> int | None:
        pos = int(np.searchsorted(self.user_ids, user_id))
        if pos < self.n_users and self.user_ids[pos] == user_id:
            return pos
        return None

    def item_position(self, item_id: str) -> int | None:
        pos = int(np.searchsorted(self.item_ids, item_id))
        if pos < self.n_items and self.item_ids[pos] == item_id:
            return pos
        return None

    def item_positions(self, item_ids: list[str]) -> np.ndarray:
        """Positions (int64, sorted, unique) of the known IDs among ``item_ids``."""
        found = self.lookup_items(item_ids)
        return np.unique(found[found >= 0])

    def lookup_items(self, item_ids: list[str]) -> np.ndarray:
        """The position of each of ``item_ids`` in order (int64[len]), -1 where unknown."""
        return _lookup(self.item_ids, item_ids)

    def lookup_users(self, user_ids: list[str]) -> np.ndarray:
        """The position of each of ``user_ids`` in order (int64[len]), -1 where unknown."""
        return _lookup(self.user_ids, user_ids)

    def seen(self, user_pos: int) -> np.ndarray:
        return self.seen_indices[self.seen_indptr[user_pos] : self.seen_indptr[user_pos + 1]]


def _lookup(known: np.ndarray, ids: list[str]) -> np.ndarray:
    """The position of each of ``ids`` in ``known`` (sorted str[n]), -1 where absent: one
    binary search of the whole list (int64[len])."""
    if not ids or len(known) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    # each ID at its own length: cast to ``known``'s width, a longer unknown ID would be cut
    # to a known one's and found as that one
    wanted = np.asarray(ids, dtype=np.str_)
    pos = np.minimum(np.searchsorted(known, wanted), len(known) - 1)
    return np.where(known[pos] == wanted, pos, -1).astype(np.int64)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(written: Path, path: Path) -> None:
    """Move the fully written file ``written`` to ``path`` (same directory) so that after a
    crash ``path`` holds the old content or the new, whole: ``os.replace`` is atomic but not
    durable, so the file is fsynced before it and the directory after."""
    _fsync(written)
    os.replace(written, path)
    _fsync(path.parent)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` (float32[n, d]) with each row scaled to norm 1; zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: np.ndarray = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return unit


def _check_arrays(arrays: dict[str, np.ndarray]) -> None:
    missing = set(ARRAYS) - set(arrays)
    if missing:
        raise SnapshotError(f"snapshot is missing arrays: {sorted(missing)}")
    for name, (kind, ndim) in ARRAYS.items():
        arr = arrays[name]
        if arr.dtype.kind != kind or arr.ndim != ndim:
            raise SnapshotError(f"{name}: expected kind {kind!r} with {ndim} dims, got {arr.dtype}")
    for name, arr in arrays.items():
        # a NaN score ranks nowhere consistently (and inf - inf is NaN): refused here, so no
        # kernel meets one. A float64 sum of float32 values cannot overflow: it is finite
        # exactly when every value is, without an array of flags the size of the input
        if (
            arr is not None
            and arr.dtype.kind == "f"
            and not math.isfinite(arr.sum(dtype=np.float64))
        ):
            raise SnapshotError(f"{name}: holds NaN or infinite values")
    n, u = len(arrays["item_ids"]), len(arrays["user_ids"])
    if arrays["item_vectors"].shape[0] != n or len(arrays["item_bias"]) != n:
        raise SnapshotError("item arrays disagree in length")
    if len(arrays["item_popularity"]) != n:
        raise SnapshotError("item_popularity disagrees with item_ids in length")
    if arrays["user_vectors"].shape[0] != u or arrays["user_features"].shape[0] != u:
        raise SnapshotError("user arrays disagree in length")
    if arrays["user_vectors"].shape[1] != arrays["item_vectors"].shape[1]:
        raise SnapshotError("user and item vectors differ in dimension")
    indptr = arrays["seen_indptr"]
    seen = arrays["seen_indices"]
    if len(indptr) != u + 1 or indptr[0] != 0 or indptr[-1] != len(seen):
        raise SnapshotError("seen_indptr does not describe seen_indices")
    if np.any(indptr[1:] < indptr[:-1]):
        raise SnapshotError("seen_indptr must not decrease")
    if len(seen) and (seen.min() < 0 or seen.max() >= n):
        raise SnapshotError("seen_indices must be item positions")
    if n and np.any(arrays["item_ids"][1:] <= arrays["item_ids"][:-1]):
        raise SnapshotError("item_ids must be sorted and unique")
    if u and np.any(arrays["user_ids"][1:] <= arrays["user_ids"][:-1]):
        raise SnapshotError("user_ids must be sorted and unique")
    for name, (kind, ndim) in OPTIONAL_ARRAYS.items():
        extra = arrays.get(name)
        if extra is not None and (extra.dtype.kind != kind or extra.ndim != ndim):
            raise SnapshotError(f"{name}: expected kind {kind!r} with {ndim} dims")
    if arrays.get("item_unit") is not None and (
        arrays["item_unit"].shape != arrays["item_vectors"].shape
    ):
        raise SnapshotError("item_unit: expected the shape of item_vectors")
    if arrays.get("item_item") is not None and arrays["item_item"].shape != (n, n):
        raise SnapshotError(f"item_item: expected a {n}x{n} matrix")
    present = [arrays.get(name) is not None for name in ITEM_COMPONENTS]
    if any(present) and not all(present):
        raise SnapshotError(f"the item components {list(ITEM_COMPONENTS)} come together")
    if all(present):
        if any(len(arrays[name]) != n for name in ITEM_COMPONENTS[:3]):
            raise SnapshotError("item components disagree with item_ids in length")
        codes, names = arrays["item_category"], arrays["categories"]
        if len(names) == 0 or (n and (codes.min() < 0 or codes.max() >= len(names))):
            raise SnapshotError("item_category does not fit the category names")
    segments, scores = arrays.get("segment_items"), arrays.get("segment_scores")
    if (segments is None) != (scores is None):
        raise SnapshotError("segment_items and segment_scores come together")
    if (
        segments is not None
        and scores is not None
        and (
            segments.shape != scores.shape
            or len(segments) != CONTEXT_SEGMENTS
            or (segments.size and segments.max() >= n)
        )
    ):
        raise SnapshotError(
            f"segment_items / segment_scores do not fit the items and {CONTEXT_SEGMENTS} segments"
        )


def _with_unit(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with ``item_unit`` made from the item vectors if it is not there."""
    vectors = arrays.get("item_vectors")
    if arrays.get("item_unit") is None and vectors is not None and vectors.ndim == 2:
        return {**arrays, "item_unit": unit_rows(vectors)}
    return arrays


def _manifest(
    scope: str,
    version: str,
    created: float,
    data_as_of: float,
    arrays: dict[str, np.ndarray],
    retrieval: str,
    files: dict[str, str],
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "scope": scope,
        "version": version,
        "created_at": created,
        "data_as_of": data_as_of,
        "items": len(arrays["item_ids"]),
        "users": len(arrays["user_ids"]),
        "dimensions": int(arrays["item_vectors"].shape[1]),
        "retrieval": retrieval,
        "files": files,
        **(extra or {}),
    }


def publish(
    root: Path,
    scope: str,
    arrays: dict[str, np.ndarray],
    *,
    data_as_of: float | None = None,
    last_erasure: float | None = None,
    index_writer: Any = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write a new snapshot of ``scope`` under ``root`` and make it current. Returns the version:
    the current one, left as it is, if it would serve exactly as the new one (``_serves_as``).

    ``data_as_of`` (unix seconds): when the data of the arrays was read (default: now);
    ``last_erasure``: the latest erasure of any user (unix seconds; None: none).
    ``index_writer(path)``, if given, writes the faiss index file. Crash-safe: until the final
    pointer swap, readers keep the previous snapshot; a leftover temporary directory is
    harmless and removed by cleanup.
    """
    arrays = _with_unit(arrays)
    _check_arrays(arrays)
    scope_dir = root / scope
    scope_dir.mkdir(parents=True, exist_ok=True)
    staging = scope_dir / f".staging-{os.getpid()}-{time.time_ns()}"
    staging.mkdir()
    try:
        checksums: dict[str, str] = {}
        for name in [*ARRAYS, *(a for a in OPTIONAL_ARRAYS if arrays.get(a) is not None)]:
            path = staging / f"{name}.npy"
            np.save(path, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            checksums[path.name] = _sha256(path)
        if index_writer is not None:
            index_writer(staging / INDEX_FILE)
            checksums[INDEX_FILE] = _sha256(staging / INDEX_FILE)
        # what serving sees: the files and the build's settings (data_as_of aside)
        identity = {"files": checksums, "extra": extra or {}}
        content = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        created = time.time()
        as_of = created if data_as_of is None else data_as_of
        current = current_version(root, scope)
        if current is not None and _serves_as(scope_dir / current, content, last_erasure):
            shutil.rmtree(staging)
            return current
        version = _version_name(created, content, current)
        retrieval = "faiss" if index_writer is not None else "exact"
        manifest = _manifest(scope, version, created, as_of, arrays, retrieval, checksums, extra)
        manifest["content"] = content
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for path in staging.iterdir():
            _fsync(path)
        staging.rename(scope_dir / version)
        _fsync(scope_dir)
        pointer_tmp = scope_dir / f".{POINTER}.{os.getpid()}"
        pointer_tmp.write_text(version + "\n")
        replace_durably(pointer_tmp, scope_dir / POINTER)
        return version
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _serves_as(path: Path, content: str, last_erasure: float | None) -> bool:
    """Whether the published snapshot at ``path`` is intact, of identical ``content``, and
    nobody was erased since its data was read (``last_erasure`` before its data_as_of): then
    it masks no user the new one would serve, and a re-run of build keeps it (no hot swap).
    (Data read later to identical arrays holds no user erased in between either.)"""
    try:
        published = load(path)
    except SnapshotError:
        return False
    unmasked = last_erasure is None or last_erasure < published.data_as_of
    return published.manifest.get("content") == content and unmasked


def _version_name(created: float, content: str, current: str | None) -> str:
    """``YYYYmmddTHHMMSS.ffffffZ-<content hash>``: names sort in publication order, even when
    the clock stands still or steps back (the stamp is kept past the current version's)."""
    micros = int(created * 1e6)
    if current:
        try:
            parsed = datetime.strptime(current.split("Z-", 1)[0], "%Y%m%dT%H%M%S.%f")
        except ValueError:
            parsed = None  # a name of another format: nothing to order against
        if parsed is not None:
            previous = calendar.timegm(parsed.timetuple()) * 1_000_000 + parsed.microsecond
            micros = max(micros, previous + 1)
    whole, frac = divmod(micros, 1_000_000)
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(whole))}.{frac:06d}Z-{content[:10]}"


def current_version(root: Path, scope: str) -> str | None:
    """The version the scope's pointer names, or None if nothing was published."""
    try:
        return (root / scope / POINTER).read_text().strip() or None
    except FileNotFoundError:
        return None


def published_scopes(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / POINTER).is_file())


def load(path: Path) -> Snapshot:
    """Load and verify the snapshot directory ``path``; raise SnapshotError if anything is off."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{path}: unreadable manifest: {exc}") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise SnapshotError(f"{path}: unsupported snapshot format {manifest.get('format')!r}")
    files: dict[str, str] = manifest.get("files", {})
    for name in [f"{a}.npy" for a in ARRAYS]:
        if name not in files:
            raise SnapshotError(f"{path}: manifest lists no {name}")
    for name, expected in files.items():
        try:
            actual = _sha256(path / name)
        except OSError as exc:
            raise SnapshotError(f"{path}: {name} unreadable: {exc}") from exc
        if actual != expected:
            raise SnapshotError(f"{path}: {name} fails its checksum")
    names = [*ARRAYS, *(a for a in OPTIONAL_ARRAYS if f"{a}.npy" in files)]
    try:
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in names}
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{path}: unreadable array: {exc}") from exc
    _check_arrays(arrays)
    return _assemble(path, manifest, arrays)


def in_memory(
    scope: str, arrays: dict[str, np.ndarray], *, extra: dict[str, Any] | None = None
) -> Snapshot:
    """A snapshot of ``arrays`` held in memory and never published (version ``unpublished``),
    checked as ``publish`` checks them and derived as ``load`` derives a published one: what
    evaluate ranks the training part of its holdout split with, through the serving code."""
    arrays = _with_unit(arrays)
    _check_arrays(arrays)
    now = time.time()
    manifest = _manifest(scope, "unpublished", now, now, arrays, "exact", {}, extra)
    return _assemble(Path(), manifest, arrays)


def _assemble(path: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> Snapshot:
    """The Snapshot of checked ``arrays``, with what is derived once at load."""
    vectors = np.ascontiguousarray(arrays["item_vectors"], dtype=np.float32)
    stored_unit = arrays.get("item_unit")
    unit = unit_rows(vectors) if stored_unit is None else stored_unit
    popularity = arrays["item_popularity"]
    # stable sort of -popularity over ID-ordered positions: ties keep ID order
    popular = np.argsort(-np.asarray(popularity, dtype=np.float64), kind="stable").astype(np.int64)
    return Snapshot(
        scope=manifest["scope"],
        version=manifest["version"],
        path=path,
        manifest=manifest,
        item_ids=arrays["item_ids"],
        item_vectors=vectors,
        item_bias=np.ascontiguousarray(arrays["item_bias"], dtype=np.float32),
        item_popularity=np.asarray(popularity, dtype=np.float32),
        user_ids=arrays["user_ids"],
        user_vectors=np.ascontiguousarray(arrays["user_vectors"], dtype=np.float32),
        user_features=arrays["user_features"],
        seen_indptr=np.asarray(arrays["seen_indptr"], dtype=np.int64),
        seen_indices=np.asarray(arrays["seen_indices"], dtype=np.int64),
        item_unit=np.ascontiguousarray(unit, dtype=np.float32),
        zero_bias=np.zeros(len(vectors), dtype=np.float32),
        popular=popular,
        item_item=arrays.get("item_item"),
        segment_items=arrays.get("segment_items"),
        segment_scores=arrays.get("segment_scores"),
        item_recency=_float32(arrays.get("item_recency")),
        item_engagement=_float32(arrays.get("item_engagement")),
        item_category=arrays.get("item_category"),
        categories=arrays.get("categories"),
    )


def _float32(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else np.asarray(array, dtype=np.float32)


def load_current(root: Path, scope: str) -> Snapshot:
    version = current_version(root, scope)
    if version is None:
        raise SnapshotError(f"scope {scope!r} has no published snapshot under {root}")
    return load(root / scope / version)


def _data_as_of(manifest: dict[str, Any]) -> float:
    return float(manifest.get("data_as_of", 0.0))


def _read_data_as_of(path: Path) -> float:
    try:
        return _data_as_of(json.loads((path / MANIFEST).read_text()))
    except (OSError, ValueError, TypeError):
        return 0.0  # unreadable: treat as oldest


def prune(root: Path, scope: str, keep: int = 3, *, data_before: float | None = None) -> list[str]:
    """Remove all but the newest ``keep`` snapshots of a scope, and every snapshot whose data
    was read before ``data_before`` (unix seconds; e.g. the latest erasure). Never the
    current one."""
    scope_dir = root / scope
    current = current_version(root, scope)
    if not scope_dir.is_dir():
        return []
    versions = sorted(
        (p for p in scope_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
        reverse=True,
    )
    removed = []
    for rank, path in enumerate(versions):
        if path.name == current:
            continue
        stale = rank >= keep or (data_before is not None and _read_data_as_of(path) < data_before)
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    for leftover in scope_dir.glob(".staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return removed
