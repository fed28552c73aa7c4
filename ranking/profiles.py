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
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from features.errors import ConfigError


@dataclass(frozen=True)
class Profile:
    popularity_weight: float = 0.05
    recency_weight: float = 0.02
    diversity: float = 0.0
    candidates: int = 100
    cache_ttl_s: int | None = None
    exclude_items: tuple[str, ...] = ()

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


DEFAULT_PROFILE = Profile()


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
        profile = Profile(**values)
        profile.validate(where)
        profiles[scope] = profile
    return profiles
