"""The ``privrank`` command: demo, serve, db migrate, import, synth, jobs, token, healthcheck.

Each command reads the one Config, starts the embedded PostgreSQL and Redis when no URL is
configured, and reports failure as one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from features.cache import RankCache
from features.errors import EXIT_LOCKED, ConfigError, JobLocked, PrivrankError, StoreUnreachable
from features.postgres import PgStore
from features.schema import DEFAULT_SCOPE, validate_scope
from server import embedded
from server.auth import mint_token
from server.config import Config

if TYPE_CHECKING:
    from jobs.report import Online

log = logging.getLogger("privrank")

EXIT_FAILURE = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privrank", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="embedded stores + synthetic data + nightly jobs + serve")
    demo.add_argument("--users", type=int, default=2000)
    demo.add_argument("--items", type=int, default=1000)
    demo.add_argument("--events", type=int, default=60_000)

    serve = sub.add_parser("serve", help="run the gRPC server (config from the environment)")
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes sharing the port, one per core (default: PRIVRANK_WORKERS, 1)",
    )

    db = sub.add_parser("db", help="database schema")
    db.add_argument("action", choices=["migrate"])

    imp = sub.add_parser("import", help="bulk-load interactions or item categories (CSV/TSV)")
    imp.add_argument("kind", choices=["interactions", "items"])
    imp.add_argument("file", type=Path)
    imp.add_argument("--scope", default=DEFAULT_SCOPE)
    imp.add_argument("--user-col", default="user_id")
    imp.add_argument("--item-col", default="item_id")
    imp.add_argument(
        "--value-col", default=None, help="default: value, if the file has it; named: required"
    )
    imp.add_argument("--time-col", default="timestamp")
    imp.add_argument(
        "--event-col",
        default=None,
        help="default: event_type, if the file has it; named: required",
    )
    imp.add_argument("--category-col", default="category", help="items: the category column")
    imp.add_argument(
        "--sep",
        default=None,
        help="field separator, '\\t' or 'tab' for TSV (default: tab for .tsv, comma for .csv,"
        " else a tab if the header line has one and no comma)",
    )
    imp.add_argument(
        "--drop-columns", default="", help="comma-separated columns to discard (never read)"
    )

    synth = sub.add_parser("synth", help="generate seeded synthetic interactions")
    synth.add_argument("--users", type=int, required=True)
    synth.add_argument("--items", type=int, required=True)
    synth.add_argument("--events", type=int, required=True)
    synth.add_argument("--scope", default=DEFAULT_SCOPE)
    synth.add_argument("--seed", type=int, default=7)

    from jobs.runner import JOB_NAMES

    jobs = sub.add_parser("jobs", help="batch jobs (cron)")
    jobs.add_argument("name", choices=JOB_NAMES)
    jobs.add_argument("--scope", default=None, help="one scope (default: every scope with data)")

    export = sub.add_parser("export", help="export features of consenting users (analytics)")
    export.add_argument("kind", choices=["features"])
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--scope", default=None, help="one scope (default: all)")

    report = sub.add_parser("report", help="render an HTML report of quality and health")
    report.add_argument("--out", type=Path, required=True)
    report.add_argument("--scope", default=None, help="one scope (default: all)")
    report.add_argument("--server", default=None, help="gRPC address (default: PRIVRANK_LISTEN)")
    report.add_argument(
        "--metrics", default=None, help="Prometheus address (default: PRIVRANK_METRICS_LISTEN)"
    )

    token = sub.add_parser("token", help="mint a signed bearer token")
    token.add_argument("--role", required=True, choices=["service", "admin", "user"])
    token.add_argument("--subject", default="")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")

    health = sub.add_parser("healthcheck", help="exit 0 if the server reports SERVING")
    health.add_argument("--target", default=None)
    health.add_argument(
        "--live",
        action="store_true",
        help="exit 0 if the server answers health at all, SERVING or not (a liveness probe:"
        " a server still waiting for its first snapshot, or warming up, is alive but not ready)",
    )
    health.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="with TLS on: the CA to trust for the server's certificate (default:"
        " PRIVRANK_TLS_CERT_FILE, the certificate itself, which gRPC's TLS accepts as the root)",
    )
    health.add_argument(
        "--tls-server-name",
        default=None,
        help="with TLS on: the name the server's certificate is for, if not the target's host"
        " (default: PRIVRANK_TLS_SERVER_NAME)",
    )
    return parser


async def _migrate_schema(database_url: str) -> list[str]:
    """Apply migrations as the login itself (the owner), not as the service role."""
    owner = await PgStore.connect(database_url, timeout_s=30.0, role=None, max_size=1)
    try:
        return await owner.migrate()
    finally:
        await owner.close()


@contextlib.asynccontextmanager
async def _stores(
    config: Config, urls: embedded.EmbeddedUrls
) -> AsyncIterator[tuple[PgStore, RankCache]]:
    """The schema migrated, then stores acting as the non-owner service role."""
    await _migrate_schema(urls.database_url)
    pg = await PgStore.connect(urls.database_url, timeout_s=max(config.store_timeout_s, 5.0))
    cache = RankCache.from_url(
        urls.redis_url,
        timeout_s=max(config.redis_timeout_s, 5.0),
        ttl_s=config.cache_ttl_s,
        key_prefix=config.redis_key_prefix,
    )
    try:
        yield pg, cache
    finally:
        await cache.close()
        await pg.close()


async def _import(config: Config, urls: embedded.EmbeddedUrls, args: argparse.Namespace) -> None:
    from jobs.importer import ColumnMap, ItemColumnMap, read_interactions, read_items

    if not args.file.is_file():
        raise PrivrankError(f"{args.file}: no such file")
    drop = frozenset(name.strip() for name in args.drop_columns.split(",") if name.strip())
    if args.kind == "items":
        items = ItemColumnMap(args.item_col, args.category_col, args.sep, drop)
        async with _stores(config, urls) as (pg, _):
            stored = await pg.upsert_item_batches(
                validate_scope(args.scope), read_items(args.file, items)
            )
        print(f"imported {stored} items into scope {args.scope!r}")
        return
    columns = ColumnMap(
        args.user_col,
        args.item_col,
        args.value_col,
        args.time_col,
        args.event_col,
        args.sep,
        drop,
    )
    async with _stores(config, urls) as (pg, _):
        stored = await pg.insert_event_batches(
            read_interactions(args.file, validate_scope(args.scope), columns)
        )
    print(f"imported {stored} events into scope {args.scope!r}")


async def _synth(config: Config, urls: embedded.EmbeddedUrls, args: argparse.Namespace) -> None:
    from jobs.synth import generate

    scope = validate_scope(args.scope)
    try:
        batches = generate(
            users=args.users, items=args.items, events=args.events, scope=scope, seed=args.seed
        )
        async with _stores(config, urls) as (pg, _):
            stored = await pg.insert_event_batches(batches)
    except ValueError as exc:
        raise PrivrankError(str(exc)) from None
    print(
        f"generated {stored} events for {args.users} users and {args.items} items "
        f"in scope {scope!r}"
    )


async def _jobs(config: Config, urls: embedded.EmbeddedUrls, name: str, scope: str | None) -> None:
    """Print the first run's ``started_line``, then each step's summary as it ends; the
    failures, if any, end the command as one error line."""
    from jobs.runner import run_job
    from jobs.steps import JobContext

    def say(line: str) -> None:
        print(line, flush=True)

    async with _stores(config, urls) as (pg, cache):
        await run_job(
            JobContext(config, pg, cache),
            name,
            [validate_scope(scope)] if scope else None,
            on_started=say,
            on_summary=say,
        )


async def _migrate(config: Config, urls: embedded.EmbeddedUrls) -> None:
    applied = await _migrate_schema(urls.database_url)
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")


async def _export(config: Config, urls: embedded.EmbeddedUrls, args: argparse.Namespace) -> None:
    """Write the features of consenting users (and nobody else) as CSV."""
    import csv

    from features.schema import FEATURE_NAMES

    scope = validate_scope(args.scope) if args.scope else None
    async with _stores(config, urls) as (pg, _):
        rows = await pg.consenting_features(scope)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["scope", "user_id", *FEATURE_NAMES])
        writer.writeheader()
        writer.writerows(rows)
    users = len({row["user_id"] for row in rows})
    print(f"exported {len(rows)} feature rows of {users} consenting users to {args.out}")


async def _online(config: Config, server: str, metrics: str, scope: str = "") -> Online:
    """Online figures of ``scope`` (default: the default scope) from a running server, or a
    note on why there are none."""
    import urllib.request

    from grpc import aio
    from prometheus_client.parser import text_string_to_metric_families

    from jobs.report import Online
    from server.api import privrank_pb2 as pb
    from server.api import privrank_pb2_grpc as rpc

    token = mint_token(
        config.signing_keys()[0],
        role="admin",
        subject="report",
        ttl_s=60,
        issuer=config.token_issuer,
    )
    tls, name = _client_tls(config), config.tls_server_name
    options = [("grpc.ssl_target_name_override", name)] if name else []
    try:
        async with (
            aio.secure_channel(server, tls, options)
            if tls is not None
            else aio.insecure_channel(server)
        ) as channel:
            answer = await rpc.AdminStub(channel).GetMetrics(
                pb.GetMetricsRequest(scope=scope),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=3,
            )
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://{metrics}/metrics", timeout=3).read().decode()
        )
    except (aio.AioRpcError, OSError) as exc:
        return Online({}, {}, [], note=f"No server answered at {server} / {metrics}: {exc}")
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "privrank_request_seconds_bucket" and sample.labels.get("method") in (
                "Recommend",
                "RankCandidates",
                "SimilarItems",
            ):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    online = answer.online
    figures = {
        "requests": float(online.requests),
        "latency p50 (ms)": online.latency_p50_ms,
        "latency p95 (ms)": online.latency_p95_ms,
        "latency p99 (ms)": online.latency_p99_ms,
        "cache hit rate": online.cache_hit_rate,
        "fallback rate": online.fallback_rate,
        "opt-out rate": online.opt_out_rate,
    }
    return Online(figures, dict(online.served_by_source), sorted(buckets.items()))


async def _report(config: Config, urls: embedded.EmbeddedUrls, args: argparse.Namespace) -> None:
    from jobs.report import render

    async with _stores(config, urls) as (pg, _):
        scopes = [validate_scope(args.scope)] if args.scope else await pg.scopes()
        evaluations = {scope: await pg.evaluations(scope, limit=500) for scope in scopes}
    online = await _online(
        config,
        args.server or config.listen,
        args.metrics or config.metrics_listen,
        scopes[0] if args.scope else "",
    )
    args.out.write_text(render(evaluations, online))
    print(
        f"wrote {args.out} ({len(scopes)} scopes; server: "
        f"{'reachable' if online.figures else 'not reachable'})"
    )


def _print_demo_banner(config: Config, port: int) -> None:
    keys = config.signing_keys()
    service = mint_token(
        keys[0], role="service", subject="demo-backend", ttl_s=86400, issuer=config.token_issuer
    )
    admin = mint_token(
        keys[0], role="admin", subject="demo-admin", ttl_s=86400, issuer=config.token_issuer
    )
    host = config.listen.rpartition(":")[0]
    print(
        f"\nprivrank is SERVING on {host}:{port}\n\n"
        f"service token:\n  {service}\n\nadmin token:\n  {admin}\n\n"
        "try:\n"
        f"  grpcurl -plaintext -H 'authorization: Bearer {service}' \\\n"
        f'    -d \'{{"user_id": "u1", "limit": 5}}\' {host}:{port} '
        "privrank.v1.Ranking/Recommend\n\n"
        "Ctrl-C stops the server and the embedded PostgreSQL and Redis.\n",
        flush=True,
    )


async def _demo(config: Config, urls: embedded.EmbeddedUrls, args: argparse.Namespace) -> None:
    from jobs.runner import run_job
    from jobs.steps import JobContext
    from jobs.synth import generate
    from server.app import serve

    async with _stores(config, urls) as (pg, cache):
        if DEFAULT_SCOPE not in await pg.scopes():
            print(
                f"generating synthetic data: {args.users} users, {args.items} items, "
                f"{args.events} events",
                flush=True,
            )
            await pg.insert_event_batches(
                generate(
                    users=args.users, items=args.items, events=args.events, scope=DEFAULT_SCOPE
                )
            )
        print("running the nightly jobs", flush=True)
        for line in await run_job(JobContext(config, pg, cache), "nightly", [DEFAULT_SCOPE]):
            print("  " + line, flush=True)
    await serve(
        config,
        urls.database_url,
        urls.redis_url,
        on_ready=lambda port: _print_demo_banner(config, port),
    )


async def _check_stores(config: Config, urls: embedded.EmbeddedUrls) -> None:
    """Migrate the schema and connect as the service role once, before taking traffic.

    A PostgreSQL that cannot be reached at all does not keep the server down: it starts on its
    snapshots, non-personalized until the opt-outs are confirmed (How privrank degrades), and
    the next job or ``db migrate`` migrates. One that answers and refuses fails the start.
    """
    try:
        async with _stores(config, urls):
            pass
    except StoreUnreachable as exc:
        log.warning(
            "starting without PostgreSQL (%s): the schema is not checked, answers stay"
            " non-personalized until the opt-outs are confirmed",
            exc,
        )


async def _serve(config: Config, urls: embedded.EmbeddedUrls) -> None:
    from server.app import serve

    await _check_stores(config, urls)
    await serve(config, urls.database_url, urls.redis_url)


def _serve_workers(config: Config, urls: embedded.EmbeddedUrls) -> int:
    from server.workers import serve_workers

    asyncio.run(_check_stores(config, urls))
    return serve_workers(config, urls.database_url, urls.redis_url, config.workers)


def _check_listen_addresses(config: Config) -> None:
    """Refuse, before any store starts, a gRPC or metrics address that is in use (by another
    process, or by the other of the two) or cannot be bound here: gRPC and the metrics server
    would fail later, with a traceback, once the stores run. Port 0 (any free port) is not
    checked. Raises ConfigError naming the variable and the address."""
    with contextlib.ExitStack() as held:  # each probe listens until both are checked
        for variable, address in (
            ("PRIVRANK_LISTEN", config.listen),
            ("PRIVRANK_METRICS_LISTEN", config.metrics_listen),
        ):
            host, _, port = address.rpartition(":")
            if int(port) == 0:
                continue
            try:
                places = socket.getaddrinfo(
                    host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            except socket.gaierror as exc:
                raise ConfigError(f"{variable}: cannot resolve {host}: {exc.strerror}") from None
            failures = []
            for family, kind, proto, _, place in places:
                probe = held.enter_context(socket.socket(family, kind, proto))
                # as gRPC and http.server bind: a closed connection's TIME_WAIT is no obstacle
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(place)
                    probe.listen()
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise ConfigError(f"{variable}: {address} is already in use") from None
                    failures.append(exc.strerror)
            # as for gRPC, one bindable address of several (localhost: 127.0.0.1, ::1) will do
            if len(failures) == len(places):
                raise ConfigError(f"{variable}: cannot listen on {address}: {failures[0]}")


def _client_tls(config: Config, ca_file: Path | None = None) -> Any:
    """Credentials for a local client of this server (healthcheck, report): None where it is
    plaintext; else trusting ``ca_file`` (default: the server's own certificate), presenting
    the server's certificate where clients must present one."""
    from server.tls import channel_credentials

    if config.tls_cert_file is None:
        return None
    mutual = config.tls_client_ca_file is not None
    return channel_credentials(
        ca_file or config.tls_cert_file,
        config.tls_cert_file if mutual else None,
        config.tls_key_file if mutual else None,
    )


def _healthcheck(config: Config, args: argparse.Namespace) -> int:
    """Exit 0 if the server says SERVING (with --live: if it answers); over TLS when the
    server has it (``_client_tls``)."""
    from server.app import channel_ready_check

    tls = _client_tls(config, args.tls_ca)
    name = args.tls_server_name or config.tls_server_name
    ready = channel_ready_check(args.target or config.listen, tls, name, live=args.live)
    return 0 if ready else EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = Config.from_env()
        logging.basicConfig(
            level=config.log_level.upper(),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        if args.command == "token":
            print(
                mint_token(
                    config.signing_keys()[0],
                    role=args.role,
                    subject=args.subject,
                    ttl_s=args.ttl,
                    issuer=config.token_issuer,
                )
            )
            return 0
        if args.command == "healthcheck":
            return _healthcheck(config, args)
        if args.command == "serve" and args.workers is not None:
            config = dataclasses.replace(config, workers=args.workers)
            config.validate()
        if args.command in ("serve", "demo"):
            _check_listen_addresses(config)
        if args.command == "serve" and config.workers > 1:
            with embedded.services(config.data_dir, config.database_url, config.redis_url) as urls:
                return _serve_workers(config, urls)
        commands: dict[str, Callable[[embedded.EmbeddedUrls], Coroutine[Any, Any, None]]] = {
            "demo": lambda urls: _demo(config, urls, args),
            "serve": lambda urls: _serve(config, urls),
            "db": lambda urls: _migrate(config, urls),
            "import": lambda urls: _import(config, urls, args),
            "synth": lambda urls: _synth(config, urls, args),
            "jobs": lambda urls: _jobs(config, urls, args.name, args.scope),
            "export": lambda urls: _export(config, urls, args),
            "report": lambda urls: _report(config, urls, args),
        }
        with embedded.services(config.data_dir, config.database_url, config.redis_url) as urls:
            asyncio.run(commands[args.command](urls))
        return 0
    except JobLocked as exc:
        print(f"privrank: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except (PrivrankError, OSError) as exc:  # OSError: a data dir, TLS or --out file
        print(f"privrank: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
