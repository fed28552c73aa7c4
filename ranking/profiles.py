"""Per-scope ranking profiles: how a scope's rankings are weighted, diversified and cached.

Read from one TOML file (``PRIVRANK_PROFILES_FILE``), one table per scope; a scope without a
table uses the defaults:

    [default]
    popularity_weight = 0.05   # added to relevance: weight × normalised log popularity
    recency_weight = 0.02      # bounded boost for new items: weight × exp(-age / 7 days)
    diversity = 0.3            # MMR strength in [0, 1]; 0 keeps the relevance order
    candidates = 100           # how many top items diversity re-ranks
    cache_ttl_s = 3600         # TTL of this scope's cached rankings (default: global)
    exclude_items = ["i13"]    # never served in this scope

    [default.variants.diverse] # an A/B variant: a share of users, serve-time overrides
    share = 0.5                # users are bucketed by a hash of scope and user ID
    diversity = 0.6            # may override diversity, candidates, exclude_items

Users outside every variant's share are in the variant "control" (the scope's own settings).
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from features.errors import ConfigError

CONTROL = "control"
VARIANT_SETTINGS = frozenset({"diversity", "candidates", "exclude_items"})


@dataclass(frozen=True)
class Variant:
    name: str
    share: float  # of the scope's users, in (0, 1]
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    popularity_weight: float = 0.05
    recency_weight: float = 0.02
    diversity: float = 0.0
    candidates: int = 100
    cache_ttl_s: int | None = None
    exclude_items: tuple[str, ...] = ()
    variants: tuple[Variant, ...] = ()

    def variant_of(self, scope: str, user_id: str) -> str:
        """The user's variant: deterministic from a hash of scope and user ID."""
        if not self.variants:
            return CONTROL
        digest = hashlib.sha256(f"{scope}:{user_id}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64
        edge = 0.0
        for variant in self.variants:
            edge += variant.share
            if point < edge:
                return variant.name
        return CONTROL

    def for_variant(self, name: str) -> Profile:
        """The settings a variant serves with (the scope's own for control)."""
        for variant in self.variants:
            if variant.name == name:
                return replace(self, **variant.overrides)
        return self

    @property
    def variant_names(self) -> tuple[str, ...]:
        return (CONTROL, *(v.name for v in self.variants))

    def validate(self, where: str) -> None:
        for name in ("popularity_weight", "recency_weight"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{where}: {name} must be a finite number >= 0")
        if not isinstance(self.diversity, int | float) or not 0.0 <= self.diversity <= 1.0:
            raise ConfigError(f"{where}: diversity must be within 0..1")
        if not isinstance(self.candidates, int) or not 1 <= self.candidates <= 1000:
            raise ConfigError(f"{where}: candidates must be an integer within 1..1000")
        if self.cache_ttl_s is not None and (
            not isinstance(self.cache_ttl_s, int) or self.cache_ttl_s <= 0
        ):
            raise ConfigError(f"{where}: cache_ttl_s must be a positive integer")
        if not all(isinstance(item, str) and item for item in self.exclude_items):
            raise ConfigError(f"{where}: exclude_items must be a list of item IDs")
        if sum(v.share for v in self.variants) > 1.0 + 1e-9:
            raise ConfigError(f"{where}: the variants' shares add up to more than 1")


DEFAULT_PROFILE = Profile()


def _variants(where: str, tables: Any) -> tuple[Variant, ...]:
    if not isinstance(tables, Mapping):
        raise ConfigError(f"{where}: variants must be tables, [scope.variants.NAME]")
    variants = []
    for name, table in tables.items():
        if name == CONTROL or not isinstance(table, Mapping):
            raise ConfigError(f"{where}: variant {name!r} must be a table, not named control")
        share = table.get("share")
        if not isinstance(share, int | float) or not 0.0 < share <= 1.0:
            raise ConfigError(f"{where}: variant {name!r} needs a share within (0, 1]")
        overrides = {k: v for k, v in table.items() if k != "share"}
        unknown = sorted(set(overrides) - VARIANT_SETTINGS)
        if unknown:
            raise ConfigError(
                f"{where}: variant {name!r} cannot set {unknown[0]!r} (it may set "
                f"{sorted(VARIANT_SETTINGS)}; weights are built into the snapshot)"
            )
        if "exclude_items" in overrides:
            overrides["exclude_items"] = tuple(overrides["exclude_items"])
        variants.append(Variant(name, float(share), overrides))
    return tuple(variants)


def load_profiles(path: Path) -> dict[str, Profile]:
    """Parse and validate a profiles file; raise ConfigError naming the scope and setting."""
    try:
        document: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"PRIVRANK_PROFILES_FILE: {path}: {exc}") from None
    known = {f.name for f in fields(Profile)}
    profiles = {}
    for scope, table in document.items():
        where = f"PRIVRANK_PROFILES_FILE: [{scope}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table of settings")
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown setting {unknown[0]!r} (known: {sorted(known)})")
        values = dict(table)
        if "exclude_items" in values:
            values["exclude_items"] = tuple(values["exclude_items"])
        values["variants"] = _variants(where, values.get("variants", {}))
        profile = Profile(**values)
        profile.validate(where)
        for variant in profile.variants:
            profile.for_variant(variant.name).validate(f"{where} variant {variant.name!r}")
        profiles[scope] = profile
    return profiles
