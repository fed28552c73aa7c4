"""Per-scope ranking profiles: how a scope's rankings are weighted, diversified and cached.

Read from one TOML file (``PRIVRANK_PROFILES_FILE``), one table per scope; a scope without a
table uses the defaults:

    [default]
    relevance_weight = 1.0     # multiplies the model's score (> 0)
    popularity_weight = 0.05   # added: weight × normalised log popularity
    recency_weight = 0.02      # bounded boost for new items: weight × exp(-age / 7 days)
    engagement_weight = 0.0    # added: weight × the item's engagement rate (engaged / events)
    boosts = { sports = 0.1, ads = -0.2 }  # added per item category; negative demotes
    model = "auto"             # what the train job chose; "embeddings" or "item_item" to
                               # serve that model of the snapshot; "rules" (below)
    diversity = 0.3            # MMR strength in [0, 1]; 0 keeps the relevance order
    candidates = 100           # how many top items diversity re-ranks
    cache_ttl_s = 3600         # TTL of this scope's cached rankings (default: global)
    exclude_items = ["i13"]    # never served in this scope

    [notifications]            # a rule-based scope: no learned model
    model = "rules"
    base_scores = { alert = 1.0, promo = 0.3 }  # per item category (others: 0)
    engagement_weight = 2.0    # score = base × (1 + weight × the user's share of engagement
                               # with the category) + the weighted terms and boosts above

    [default.variants.diverse] # an A/B variant: a share of users, serve-time overrides
    share = 0.5                # users are bucketed by a hash of scope and user ID
    diversity = 0.6            # may override anything in VARIANT_SETTINGS
    model = "embeddings"       # e.g. serve the snapshot's embeddings where control has EASE

Categories come from ``privrank import items``. Every weight applies at serve time
(ranking/scoring.py weighs the snapshot's item components when a snapshot is installed), so
variants may change them. A variant that scores differently from control (``scores_like``)
is never served control's precomputed rankings: it is ranked live. Users outside every
variant's share are in the variant "control" (the scope's own settings).
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from features.errors import ConfigError, InvalidInput
from features.schema import validate_category

CONTROL = "control"
# what a variant may override: everything that applies at serve time
SCORE_SETTINGS = (
    "relevance_weight",
    "popularity_weight",
    "recency_weight",
    "engagement_weight",
    "boosts",
    "base_scores",
    "model",
)
VARIANT_SETTINGS = frozenset({"diversity", "candidates", "exclude_items", *SCORE_SETTINGS})
MODELS = ("auto", "embeddings", "item_item", "rules")
VARIANT_MODELS = ("embeddings", "item_item")
_CATEGORY_TABLES = ("boosts", "base_scores")


@dataclass(frozen=True)
class Variant:
    name: str
    share: float  # of the scope's users, in (0, 1]
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    relevance_weight: float = 1.0
    popularity_weight: float = 0.05
    recency_weight: float = 0.02
    engagement_weight: float = 0.0
    boosts: tuple[tuple[str, float], ...] = ()  # (category, additive weight), sorted
    model: str = "auto"
    base_scores: tuple[tuple[str, float], ...] = ()  # rules: (category, base score), sorted
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

    def ranking_depth(self, k: int) -> int:
        """How many top-scored items a top ``k`` is picked from: the ``candidates`` diversity
        re-ranks, where it diversifies, else ``k`` itself."""
        return max(k, self.candidates) if self.diversity > 0 else k

    def scores_like(self, other: Profile) -> bool:
        """True if both score every item alike (they may still differ in re-ranking)."""
        return all(getattr(self, name) == getattr(other, name) for name in SCORE_SETTINGS)

    def validate(self, where: str) -> None:
        for name in ("popularity_weight", "recency_weight", "engagement_weight"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ConfigError(f"{where}: {name} must be a finite number >= 0")
        if not _finite(self.relevance_weight) or self.relevance_weight <= 0:
            raise ConfigError(f"{where}: relevance_weight must be a finite number > 0")
        if self.model not in MODELS:
            raise ConfigError(f"{where}: model must be one of {list(MODELS)}")
        if (self.model == "rules") != bool(self.base_scores):
            raise ConfigError(f'{where}: base_scores go with model = "rules", and it needs them')
        for table in _CATEGORY_TABLES:
            for category, weight in getattr(self, table):
                if not _finite(weight):
                    raise ConfigError(f"{where}: {table}.{category} must be a finite number")
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


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _settings(where: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """A table's settings in Profile's types: lists as tuples, category tables as sorted
    (category, weight) pairs with each category validated as a label."""
    values = dict(table)
    if "exclude_items" in values:
        values["exclude_items"] = tuple(values["exclude_items"])
    for name in _CATEGORY_TABLES:
        if name not in values:
            continue
        weights = values[name]
        if not isinstance(weights, Mapping):
            raise ConfigError(f"{where}: {name} must be a table of category = number")
        for category in weights:
            try:
                validate_category(f"{where}: {name}", category)
            except InvalidInput as exc:
                raise ConfigError(str(exc)) from None
        values[name] = tuple(sorted(weights.items()))
    return values


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
                f"{sorted(VARIANT_SETTINGS)})"
            )
        if "model" in overrides and overrides["model"] not in VARIANT_MODELS:
            raise ConfigError(
                f"{where}: variant {name!r}: model must be one of {list(VARIANT_MODELS)}"
            )
        overrides = _settings(f"{where} variant {name!r}", overrides)
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
        values = _settings(where, table)
        values["variants"] = _variants(where, values.get("variants", {}))
        profile = Profile(**values)
        profile.validate(where)
        for variant in profile.variants:
            served = profile.for_variant(variant.name)
            served.validate(f"{where} variant {variant.name!r}")
            if profile.model == "rules" and served.model != "rules":
                raise ConfigError(f"{where} variant {variant.name!r}: a rules scope keeps rules")
        profiles[scope] = profile
    return profiles
