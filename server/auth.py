"""Bearer tokens and the access policy.

Tokens are HS256 JWTs signed with the configured key (``privrank token`` mints them) carrying
``sub``, ``role``, ``iss``, ``iat`` and ``exp``. Verification accepts the current key and, during
a rotation, the previous one. ``POLICY`` maps every RPC to the roles allowed to call it; a method
missing from it is refused, so a new RPC is closed until it is listed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

import jwt

from features.errors import InvalidInput, PermissionDenied, Unauthenticated


class Role(StrEnum):
    SERVICE = "service"
    ADMIN = "admin"
    USER = "user"


_SVC = frozenset({Role.SERVICE, Role.ADMIN})
_SETTINGS = frozenset({Role.SERVICE, Role.ADMIN, Role.USER})
_ADMIN = frozenset({Role.ADMIN})

POLICY: dict[str, frozenset[Role]] = {
    "/privrank.v1.Ranking/Recommend": _SVC,
    "/privrank.v1.Ranking/RankCandidates": _SVC,
    "/privrank.v1.Ranking/SimilarItems": _SVC,
    "/privrank.v1.Ranking/RecordEvents": _SVC,
    "/privrank.v1.Settings/GetSettings": _SETTINGS,
    "/privrank.v1.Settings/UpdateSettings": _SETTINGS,
    "/privrank.v1.Settings/ExportUserData": _SETTINGS,
    "/privrank.v1.Settings/DeleteUserData": _SETTINGS,
    "/privrank.v1.Admin/GetMetrics": _ADMIN,
    "/privrank.v1.Admin/RunJob": _ADMIN,
    "/privrank.v1.Admin/ListJobRuns": _ADMIN,
    "/privrank.v1.Admin/Reload": _ADMIN,
    "/privrank.v1.Admin/GetModelInfo": _ADMIN,
    "/privrank.v1.Admin/SetFlags": _ADMIN,
}

# Probes and discovery need no token: health checks and server reflection.
PUBLIC_METHODS: frozenset[str] = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.health.v1.Health/List",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    role: Role

    def check_subject(self, user_id: str) -> None:
        """A ``user`` token acts only for its own subject; other roles for anyone."""
        if self.role is Role.USER and user_id != self.subject:
            raise PermissionDenied("a user token may only access its own settings and data")


ANONYMOUS = Principal("", Role.USER)


def mint_token(
    secret: str, *, role: str, subject: str, ttl_s: int, issuer: str, now: float | None = None
) -> str:
    """A signed bearer token for ``role``; ``user`` tokens need a subject."""
    try:
        parsed = Role(role)
    except ValueError:
        raise InvalidInput(f"role must be one of: {', '.join(r.value for r in Role)}") from None
    if parsed is Role.USER and not subject:
        raise InvalidInput("a user token needs --subject USER_ID")
    if ttl_s <= 0:
        raise InvalidInput("ttl must be positive")
    issued = int(now if now is not None else time.time())
    claims = {
        "sub": subject or parsed.value,
        "role": parsed.value,
        "iss": issuer,
        "iat": issued,
        "exp": issued + ttl_s,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_token(token: str, keys: list[str], issuer: str) -> Principal:
    """The principal of a valid token; Unauthenticated otherwise (bad signature, expired,
    wrong issuer, unknown role)."""
    return _verify(token, keys, issuer)[0]


def _verify(token: str, keys: list[str], issuer: str) -> tuple[Principal, float]:
    """``verify_token``, also returning the token's expiry (unix seconds)."""
    last: Exception | None = None
    for key in keys:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["HS256"],
                issuer=issuer,
                options={"require": ["exp", "iat", "iss", "sub", "role"]},
            )
        except jwt.InvalidSignatureError as exc:
            last = exc
            continue
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        try:
            return Principal(str(claims["sub"]), Role(claims["role"])), float(claims["exp"])
        except ValueError:
            raise Unauthenticated("token carries an unknown role") from None
    raise Unauthenticated("invalid token: signature not recognised") from last


class Authorizer:
    """Checks calls against POLICY. Tokens that verified are remembered until they expire: a
    backend sends the same token with every call, and verifying it (HMAC, base64, JSON) each
    time is a measurable share of the CPU a cached answer costs. At most ``memo_size`` tokens
    are remembered; past that the memo starts over. Invalid tokens are never remembered."""

    def __init__(self, keys: list[str], issuer: str, memo_size: int = 4096) -> None:
        self._keys = keys
        self._issuer = issuer
        self._memo_size = memo_size
        self._verified: dict[str, tuple[Principal, float]] = {}

    def principal(self, token: str) -> Principal:
        known = self._verified.get(token)
        if known is not None and time.time() < known[1]:
            return known[0]
        principal, expires = _verify(token, self._keys, self._issuer)
        if len(self._verified) >= self._memo_size:
            self._verified.clear()
        self._verified[token] = (principal, expires)
        return principal

    def authorize(self, method: str, authorization: str) -> Principal:
        """Check ``method`` against POLICY with the ``authorization`` metadata value."""
        if method in PUBLIC_METHODS:
            return ANONYMOUS
        allowed = POLICY.get(method)
        if allowed is None:
            raise PermissionDenied(f"{method} is not in the access policy")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        principal = self.principal(token.strip())
        if principal.role not in allowed:
            raise PermissionDenied(f"role {principal.role.value!r} may not call {method}")
        return principal
