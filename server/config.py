"""The one typed configuration object, read once at start-up from a mapping (the environment).

Nothing else in privrank reads ``os.environ`` (``choose_grpc_transport`` sets gRPC's own key in
it before gRPC starts). Every key is validated here and a bad value fails fast with the key's
name. Secrets are masked in ``repr``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from features.errors import ConfigError
from ranking.profiles import DEFAULT_PROFILE, Profile, load_profiles

PREFIX = "PRIVRANK_"
# gRPC core's HTTP/2 server transports, by PRIVRANK_GRPC_TRANSPORT's values: the promise-based
# one is the gRPC experiment of this name
GRPC_TRANSPORTS = ("chttp2", "ph2")
PH2_SERVER_EXPERIMENT = "ph2_server"
_KEY_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:\-/]{1,64}")


def _parse_bool(key: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{key}: expected true/false, got {raw!r}")


def _parse_address(key: str, raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT, got {raw!r}")
    return raw


@dataclass(frozen=True)
class Config:
    """All settings of a privrank process. Units are in the field names."""

    data_dir: Path = Path(".privrank")
    database_url: str | None = field(default=None, repr=False)
    redis_url: str | None = field(default=None, repr=False)
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9464"
    workers: int = 1  # serving processes sharing the port (``serve --workers``)
    auth_secret: str | None = field(default=None, repr=False)
    previous_auth_secret: str | None = field(default=None, repr=False)
    token_issuer: str = "privrank"
    personalization_enabled: bool = True
    default_deadline_s: float = 1.0
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_rpcs: int = 0  # gRPC's own cap on open calls; 0: active + queued + 64
    max_active_rpcs: int = 8  # handlers running at once (the CPU work is on one event loop)
    # a call queued longer is refused (RESOURCE_EXHAUSTED); above the Redis timeout, so a hung
    # Redis (until its breaker opens) does not turn into refusals
    max_queue_wait_s: float = 0.5
    max_queued_rpcs: int = 256  # waiting for a slot; past this, RESOURCE_EXHAUSTED at once
    # per method, calls gRPC core may hold for the event loop without shedding any; past that
    # it sheds new ones at random, past twice that all of them (the caller sees CANCELLED);
    # 0 leaves gRPC core's own limits (1,000 and 3,000). A call waits there up to about
    # 2 x this / C (answers/s): keep that well inside callers' deadlines, or the loop spends
    # itself on calls that expired while they waited
    max_pending_rpcs: int = 128
    # TLS on the gRPC port (PEM files, re-read when they change; server/tls.py): the server's
    # certificate chain and key, and the CAs that must have signed the clients' certificates
    # (mTLS; unset: clients present none). Unset: plaintext, for a loopback or a mesh's sidecar
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # the name in the server's certificate, for ``privrank healthcheck`` (as in the Dockerfile)
    # when the address it dials is not in the certificate; unset: that address
    tls_server_name: str | None = None
    # connections one process holds at once; a further one is closed as it arrives (its
    # client sees UNAVAILABLE and retries with backoff). An idle one costs about 20-27 KB
    max_connections: int = 4096
    max_connection_idle_s: float = 0.0  # 0: never; else idle ones are closed (GOAWAY)
    # 0: never; else each connection is closed (GOAWAY, gRPC adds +-10 % jitter) at this age,
    # its calls given SHUTDOWN_GRACE_S: clients reconnect, so workers and balancers rebalance
    max_connection_age_s: float = 0.0
    # a connection quiet this long gets a PING; one unanswered within KEEPALIVE_TIMEOUT_S is
    # closed, so a client host that vanished frees its place under MAX_CONNECTIONS
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # clients may ping this often, with or without calls (keepalive through NATs and
    # balancers); pinging more often gets the connection closed (GOAWAY "too_many_pings")
    min_client_ping_s: float = 10.0
    # gRPC core's HTTP/2 server transport (choose_grpc_transport): "chttp2", the classic one,
    # answers the calls it sheds CANCELLED; "ph2", the promise-based one (a gRPC experiment),
    # RESOURCE_EXHAUSTED, but its error answers lack HTTP/2's :status, which only gRPC core's
    # own clients accept (README, Operations)
    grpc_transport: str = "chttp2"
    # niceness of gRPC core's own threads, below the event loop's (server/threads.py); 0: as is
    grpc_threads_nice: int = 10
    # threads scoring large requests off the event loop (numba nogil), so cheap calls go on
    # meanwhile; 0: one fewer than the cores each worker may use, at least one
    kernel_threads: int = 0
    offload_min_work: int = 1_000_000  # multiply-adds above which scoring leaves the loop
    breaker_failures: int = 5  # consecutive store failures that open its circuit
    breaker_cooldown_s: float = 1.0  # then one probe call per cooldown
    shutdown_delay_s: float = 2.0  # NOT_SERVING but still answering, so balancers move away
    shutdown_grace_s: float = 10.0  # then in-flight calls get this long to finish
    store_timeout_s: float = 2.0
    # measured on the event loop, so it must cover the loop's own lag under load, not only
    # Redis: a tighter one fails healthy calls when busy and opens the breaker (all LIVE)
    redis_timeout_s: float = 0.25
    # every key privrank writes in Redis starts with this, so deployments sharing one Redis
    # database stay apart (letters, digits and _ . : - /)
    redis_key_prefix: str = "privrank:"
    cache_ttl_s: int = 24 * 3600
    optout_refresh_s: float = 5.0
    optout_max_staleness_s: float = 30.0
    snapshot_poll_s: float = 5.0
    precompute_top_k: int = 100
    embedding_dim: int = 32
    exact_search_max_items: int = 50_000
    ranks_retention_h: int = 24
    features_retention_d: int = 30
    events_retention_d: int = 0  # 0 keeps events forever
    log_level: str = "INFO"
    profiles_file: Path | None = None
    profiles: Mapping[str, Profile] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Build from ``PRIVRANK_*`` keys of ``env`` (default: the process environment)."""
        source = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            key = PREFIX + f.name.upper()
            raw = source.get(key)
            if raw is None or raw == "" or f.name == "profiles":
                continue
            values[f.name] = _convert(key, f.type, raw)
        profiles_file = values.get("profiles_file")
        if isinstance(profiles_file, Path):
            values["profiles"] = load_profiles(profiles_file)
        config = cls(**values)  # type: ignore[arg-type]
        config.validate()
        return config

    def profile(self, scope: str) -> Profile:
        """The scope's ranking profile (the defaults if the profiles file has none)."""
        return self.profiles.get(scope, DEFAULT_PROFILE)

    def validate(self) -> None:
        _parse_address(PREFIX + "LISTEN", self.listen)
        _parse_address(PREFIX + "METRICS_LISTEN", self.metrics_listen)
        positive = {
            "DEFAULT_DEADLINE_S": self.default_deadline_s,
            "WORKERS": self.workers,
            "MAX_MESSAGE_BYTES": self.max_message_bytes,
            "MAX_CONNECTIONS": self.max_connections,
            "KEEPALIVE_S": self.keepalive_s,
            "KEEPALIVE_TIMEOUT_S": self.keepalive_timeout_s,
            "MIN_CLIENT_PING_S": self.min_client_ping_s,
            "MAX_ACTIVE_RPCS": self.max_active_rpcs,
            "MAX_QUEUED_RPCS": self.max_queued_rpcs,
            "MAX_QUEUE_WAIT_S": self.max_queue_wait_s,
            "BREAKER_FAILURES": self.breaker_failures,
            "BREAKER_COOLDOWN_S": self.breaker_cooldown_s,
            "STORE_TIMEOUT_S": self.store_timeout_s,
            "REDIS_TIMEOUT_S": self.redis_timeout_s,
            "CACHE_TTL_S": self.cache_ttl_s,
            "OPTOUT_REFRESH_S": self.optout_refresh_s,
            "OPTOUT_MAX_STALENESS_S": self.optout_max_staleness_s,
            "SNAPSHOT_POLL_S": self.snapshot_poll_s,  # 0 or less: a reload loop without a pause
            "PRECOMPUTE_TOP_K": self.precompute_top_k,
            "EMBEDDING_DIM": self.embedding_dim,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{PREFIX}{name}: must be positive, got {value}")
        for name, value, zero in (
            ("MAX_CONNECTION_IDLE_S", self.max_connection_idle_s, "never"),
            ("MAX_CONNECTION_AGE_S", self.max_connection_age_s, "never"),
            ("SHUTDOWN_DELAY_S", self.shutdown_delay_s, "none"),
            ("SHUTDOWN_GRACE_S", self.shutdown_grace_s, "none"),
            ("RANKS_RETENTION_H", self.ranks_retention_h, "keep forever"),
            ("FEATURES_RETENTION_D", self.features_retention_d, "keep forever"),
            ("EVENTS_RETENTION_D", self.events_retention_d, "keep forever"),
            ("OFFLOAD_MIN_WORK", self.offload_min_work, "always offload"),
            ("EXACT_SEARCH_MAX_ITEMS", self.exact_search_max_items, "always an index"),
        ):
            if value < 0:
                raise ConfigError(f"{PREFIX}{name}: must be >= 0 (0: {zero})")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError(
                f"{PREFIX}TLS_CERT_FILE and {PREFIX}TLS_KEY_FILE: set both or neither"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError(
                f"{PREFIX}TLS_CLIENT_CA_FILE needs {PREFIX}TLS_CERT_FILE and {PREFIX}TLS_KEY_FILE"
                " (client certificates are checked during the server's TLS handshake)"
            )
        if self.log_level.upper() not in logging.getLevelNamesMapping():
            raise ConfigError(
                f"{PREFIX}LOG_LEVEL: expected DEBUG, INFO, WARNING, ERROR or CRITICAL, "
                f"got {self.log_level!r}"
            )
        if self.kernel_threads < 0:
            raise ConfigError(f"{PREFIX}KERNEL_THREADS: must be >= 0 (0: automatic)")
        if self.max_pending_rpcs < 0:
            raise ConfigError(f"{PREFIX}MAX_PENDING_RPCS: must be >= 0 (0: gRPC core's own)")
        if self.grpc_transport not in GRPC_TRANSPORTS:
            raise ConfigError(
                f"{PREFIX}GRPC_TRANSPORT: expected one of {', '.join(GRPC_TRANSPORTS)}, "
                f"got {self.grpc_transport!r}"
            )
        if not 0 <= self.grpc_threads_nice <= 19:
            raise ConfigError(f"{PREFIX}GRPC_THREADS_NICE: must be 0-19 (0: unchanged)")
        if self.max_concurrent_rpcs < 0:
            raise ConfigError(f"{PREFIX}MAX_CONCURRENT_RPCS: must be >= 0 (0: automatic)")
        if 0 < self.max_concurrent_rpcs <= self.max_active_rpcs + self.max_queued_rpcs:
            # gRPC's cap would refuse calls before admission control could, with no clear message
            raise ConfigError(
                f"{PREFIX}MAX_CONCURRENT_RPCS ({self.max_concurrent_rpcs}) must exceed "
                f"{PREFIX}MAX_ACTIVE_RPCS + {PREFIX}MAX_QUEUED_RPCS "
                f"({self.max_active_rpcs + self.max_queued_rpcs})"
            )
        if self.optout_max_staleness_s < self.optout_refresh_s:
            raise ConfigError(f"{PREFIX}OPTOUT_MAX_STALENESS_S must be >= OPTOUT_REFRESH_S")
        if self.database_url and not self.database_url.startswith(("postgres://", "postgresql://")):
            raise ConfigError(f"{PREFIX}DATABASE_URL: expected a postgresql:// DSN")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"{PREFIX}REDIS_URL: expected a redis:// or unix:// URL")
        if not _KEY_PREFIX_RE.fullmatch(self.redis_key_prefix):
            # no glob characters: the prefix starts the SCAN patterns that find a user's keys
            raise ConfigError(
                f"{PREFIX}REDIS_KEY_PREFIX: 1-64 letters, digits and _ . : - /, "
                f"got {self.redis_key_prefix!r}"
            )

    def kernel_thread_count(self, cores: int) -> int:
        """KERNEL_THREADS, or where it is 0, one fewer than the ``cores`` this process may use
        per worker, at least one."""
        return self.kernel_threads or max(cores // self.workers - 1, 1)

    @property
    def concurrent_rpc_cap(self) -> int:
        """gRPC's cap on open calls, above admission control's, which refuses first."""
        return self.max_concurrent_rpcs or self.max_active_rpcs + self.max_queued_rpcs + 64

    @property
    def snapshot_dir(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def model_dir(self) -> Path:
        return self.data_dir / "models"

    def signing_keys(self) -> list[str]:
        """Keys that verify tokens: the current one first, then the one being rotated out."""
        current = self.auth_secret or load_or_create_secret(self.data_dir)
        return [current] + ([self.previous_auth_secret] if self.previous_auth_secret else [])


def _experiment_names(experiments: str) -> set[str]:
    """The names in a ``GRPC_EXPERIMENTS`` value, each with its "-" (off) prefix if it has one."""
    return {name.strip() for name in experiments.split(",")}


def grpc_experiments(experiments: str, transport: str) -> str | None:
    """``GRPC_EXPERIMENTS`` (``experiments``) with the choice of ``transport`` added, or None to
    leave it as it is: when it already names the experiment (gRPC's own setting wins) or the
    transport is invalid (``Config.validate`` reports that)."""
    named = {name.lstrip("-") for name in _experiment_names(experiments)}
    if transport not in GRPC_TRANSPORTS or PH2_SERVER_EXPERIMENT in named:
        return None
    choice = PH2_SERVER_EXPERIMENT if transport == "ph2" else "-" + PH2_SERVER_EXPERIMENT
    return f"{experiments},{choice}" if experiments.strip() else choice


def choose_grpc_transport(env: MutableMapping[str, str]) -> None:
    """Set ``GRPC_EXPERIMENTS`` in ``env`` for PRIVRANK_GRPC_TRANSPORT.

    gRPC core reads its experiments once, when ``grpc`` is imported, so this must run before
    that (``server/__init__.py`` calls it); after, it changes nothing, and
    ``running_grpc_transport`` says so."""
    transport = env.get(PREFIX + "GRPC_TRANSPORT") or Config.grpc_transport
    experiments = grpc_experiments(env.get("GRPC_EXPERIMENTS", ""), transport)
    if experiments is not None and "grpc" not in sys.modules:
        env["GRPC_EXPERIMENTS"] = experiments


def running_grpc_transport() -> str:
    """The HTTP/2 server transport gRPC runs in this process, whatever was configured: "ph2"
    where ``GRPC_EXPERIMENTS`` turns its experiment on (it is off unless named, in the grpcio
    this pins), else "chttp2"."""
    on = _experiment_names(os.environ.get("GRPC_EXPERIMENTS", ""))
    return "ph2" if PH2_SERVER_EXPERIMENT in on else "chttp2"


def _convert(key: str, type_name: object, raw: str) -> object:
    kind = str(type_name)
    try:
        if kind in ("Path", "Path | None"):
            return Path(raw)
        if kind == "bool":
            return _parse_bool(key, raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            value = float(raw)
            if not math.isfinite(value):  # NaN would pass every `<= 0` check
                raise ConfigError(f"{key}: expected a finite number, got {raw!r}")
            return value
    except ValueError:
        raise ConfigError(f"{key}: expected a {kind}, got {raw!r}") from None
    return raw


def load_or_create_secret(data_dir: Path) -> str:
    """The signing key kept in the data dir, generated (mode 0600) on first use. Processes
    starting at once on a new data dir (``serve --workers``) all get the one key: it is
    written whole under another name, then linked into place by whichever comes first."""
    path = data_dir / "auth_secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(prefix=".auth_secret-", dir=data_dir)  # mode 0600
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48))
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):  # another process was first: its key
                os.link(staged, path)
        finally:
            os.unlink(staged)
    return path.read_text().strip()
