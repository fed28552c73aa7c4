"""Privacy promises, each tested so it would fail if it broke: the authorization matrix, token
checks, row-level security, no PII anywhere, complete erasure, consent-gated export and
retention."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import jwt
import numpy as np
import pytest
import redis
from google.protobuf.message import Message
from grpc import aio

from features.errors import JobError, PermissionDenied, StoreUnavailable, Unauthenticated
from features.postgres import SERVICE_ROLE, PgStore, RanksReplacement
from features.schema import make_interaction
from jobs import steps
from jobs.runner import run_job
from jobs.steps import JobContext
from jobs.synth import generate
from ranking import snapshot
from server.api import privrank_pb2 as pb
from server.auth import POLICY, Authorizer, Role, mint_token, verify_token
from tests.conftest import Client, privrank

OWN = "matrix-user"
OTHER = "matrix-other"

# one cheap, side-effect-free request per RPC, for a given subject; a new RPC without an entry
# here fails test_every_rpc_is_in_the_policy_and_the_matrix
REQUESTS: dict[str, Callable[[str], Message]] = {
    "Recommend": lambda u: pb.RecommendRequest(user_id=u),
    "RankCandidates": lambda u: pb.RankCandidatesRequest(user_id=u, candidate_item_ids=["i1"]),
    "SimilarItems": lambda u: pb.SimilarItemsRequest(item_id="i1"),
    "RecordEvents": lambda u: pb.RecordEventsRequest(),  # empty: INVALID_ARGUMENT once allowed
    "GetSettings": lambda u: pb.GetSettingsRequest(user_id=u),
    "UpdateSettings": lambda u: pb.UpdateSettingsRequest(user_id=u),
    "ExportUserData": lambda u: pb.ExportUserDataRequest(user_id=u),
    "DeleteUserData": lambda u: pb.DeleteUserDataRequest(user_id=u),
    "GetMetrics": lambda u: pb.GetMetricsRequest(),
    "RunJob": lambda u: pb.RunJobRequest(name="no-such-job"),  # INVALID_ARGUMENT once allowed
    "ListJobRuns": lambda u: pb.ListJobRunsRequest(limit=1),
    "Reload": lambda u: pb.ReloadRequest(),
    "GetModelInfo": lambda u: pb.GetModelInfoRequest(),
    "SetFlags": lambda u: pb.SetFlagsRequest(),  # no field set: changes nothing
}
SUBJECT_BOUND = {"GetSettings", "UpdateSettings", "ExportUserData", "DeleteUserData"}


def _methods() -> list[tuple[str, str]]:
    return [
        (service.name, method.name)
        for service in pb.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def _stub(client: Client, service: str) -> Any:
    return {"Ranking": client.ranking, "Settings": client.settings, "Admin": client.admin}[service]


def test_every_rpc_is_in_the_policy_and_the_matrix() -> None:
    paths = {f"/privrank.v1.{s}/{m}" for s, m in _methods()}
    assert paths == set(POLICY), "the policy table and the API disagree"
    assert {m for _, m in _methods()} == set(REQUESTS), "an RPC has no matrix request"


@pytest.mark.parametrize(("service", "method"), _methods())
async def test_authorization_matrix(client: Client, service: str, method: str) -> None:
    call = getattr(_stub(client, service), method)
    allowed_roles = POLICY[f"/privrank.v1.{service}/{method}"]
    no_token = await _status(call(REQUESTS[method](OWN)))
    assert no_token == grpc.StatusCode.UNAUTHENTICATED
    for role in Role:
        for target in (OWN, OTHER):
            code = await _status(call(REQUESTS[method](target), metadata=client.token(role, OWN)))
            allowed = role in allowed_roles and not (
                role is Role.USER and method in SUBJECT_BOUND and target != OWN
            )
            cell = f"{role.value} -> {method}({target})"
            if allowed:
                assert code not in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                ), f"{cell} was refused: {code}"
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, f"{cell} gave {code}"


async def _status(call: Any) -> grpc.StatusCode:
    try:
        await call
    except aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _bad_tokens(secret: str) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": "x", "role": "admin", "iss": "privrank", "iat": now, "exp": now + 600}
    return {
        "expired": jwt.encode({**claims, "iat": now - 7200, "exp": now - 3600}, secret),
        "wrong key": jwt.encode(claims, "another-key-" + "z" * 32),
        "wrong issuer": jwt.encode({**claims, "iss": "someone-else"}, secret),
        "alg none": jwt.encode(claims, key=None, algorithm="none"),
        "no expiry": jwt.encode({k: v for k, v in claims.items() if k != "exp"}, secret),
        "unknown role": jwt.encode({**claims, "role": "root"}, secret),
        "malformed": "not.a.jwt",
        "empty": "",
    }


async def test_bad_tokens_are_unauthenticated(client: Client) -> None:
    secret = client.config.signing_keys()[0]
    for name, token in _bad_tokens(secret).items():
        for header in (f"Bearer {token}", f"Basic {token}"):
            code = await _status(
                client.admin.GetModelInfo(
                    pb.GetModelInfoRequest(), metadata=[("authorization", header)]
                )
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED, f"{name}: {code}"


def test_signing_key_rotation_accepts_both_keys_until_the_old_one_is_dropped() -> None:
    old, new = "old-key-" + "a" * 32, "new-key-" + "b" * 32
    token = mint_token(old, role="service", subject="s", ttl_s=60, issuer="privrank")
    assert verify_token(token, [new, old], "privrank").role is Role.SERVICE
    with pytest.raises(Unauthenticated):
        verify_token(token, [new], "privrank")


def test_remembered_tokens_still_expire_and_bad_ones_are_never_remembered() -> None:
    key = "memo-key-" + "c" * 32
    authorizer = Authorizer([key], "privrank")
    method = "/privrank.v1.Ranking/Recommend"
    now = time.time()
    token = mint_token(key, role="service", subject="s", ttl_s=2, issuer="privrank", now=now)
    expires = int(now) + 2
    assert authorizer.authorize(method, f"Bearer {token}").role is Role.SERVICE
    assert authorizer.authorize(method, f"Bearer {token}").role is Role.SERVICE  # remembered
    with pytest.raises(PermissionDenied):  # the role is checked on every call, memo or not
        authorizer.authorize("/privrank.v1.Admin/SetFlags", f"Bearer {token}")
    time.sleep(max(0.0, expires - time.time()) + 0.2)
    with pytest.raises(Unauthenticated, match="expired"):
        authorizer.authorize(method, f"Bearer {token}")
    forged = mint_token("other-" + "d" * 32, role="admin", subject="x", ttl_s=60, issuer="privrank")
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            authorizer.authorize(method, f"Bearer {forged}")


async def test_row_level_security_confines_a_user_scoped_connection(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url, server_settings={"role": SERVICE_ROLE})
    a, b = "rls-" + uuid.uuid4().hex[:6], "rls-" + uuid.uuid4().hex[:6]
    try:
        attrs = await conn.fetchrow(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user"
        )
        assert await conn.fetchval("SELECT current_user") == SERVICE_ROLE
        assert not attrs["rolsuper"]
        assert not attrs["rolbypassrls"]
        owned = await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tableowner = $1",
            SERVICE_ROLE,
        )
        assert owned == 0
        for user in (a, b):
            await conn.execute(
                "INSERT INTO events (scope, user_id, item_id, event_type, occurred_at)"
                " VALUES ('rls', $1, 'i1', 'view', now())",
                user,
            )
            await conn.execute("INSERT INTO user_settings (user_id) VALUES ($1)", user)
            await conn.execute(
                "INSERT INTO user_features (scope, user_id) VALUES ('rls', $1)", user
            )
            await conn.execute(
                "INSERT INTO ranks (scope, user_id, model_version, item_ids, scores)"
                " VALUES ('rls', $1, 'v', '{i1}', '{1}')",
                user,
            )
        async with conn.transaction():
            await conn.execute("SELECT set_config('privrank.user_id', $1, true)", a)
            for table in ("events", "user_settings", "user_features", "ranks"):
                seen = {r["user_id"] for r in await conn.fetch(f"SELECT user_id FROM {table}")}
                assert seen == {a}, f"{table}: a user-scoped connection saw {seen}"
            deleted = await conn.execute("DELETE FROM events WHERE user_id = $1", b)
            assert deleted == "DELETE 0"
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("INSERT INTO user_settings (user_id) VALUES ($1)", b + "x")
        # outside the scoped transaction the setting is gone (transaction-local)
        assert await conn.fetchval("SELECT count(*) FROM events WHERE user_id = $1", b) == 1
    finally:
        for table in ("events", "user_settings", "user_features", "ranks"):
            await conn.execute(f"DELETE FROM {table} WHERE user_id = ANY($1)", [a, b])
        await conn.close()


CANARIES = {
    "email": "canary.person@example.org",
    "phone": "+44 20 7946 0000",
    "name": "Jane Canary",
    "street": "12 Canary Road",
}


async def test_planted_pii_is_rejected_everywhere_and_found_nowhere(
    client: Client,
    owner_pg: PgStore,
    pg_url: str,
    redis_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for kind, value in CANARIES.items():
        for field in ("user_id", "item_id"):
            event = pb.Event(user_id="u1", item_id="i1", event_type=pb.CLICK)
            setattr(event, field, value)
            code = await _status(
                client.ranking.RecordEvents(
                    pb.RecordEventsRequest(events=[event]), metadata=client.svc
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{kind} as {field}: {code}"
        event = pb.Event(
            user_id="u1",
            item_id="i1",
            event_type=pb.CLICK,
            context=pb.EventContext(session_id=value),
        )
        code = await _status(
            client.ranking.RecordEvents(pb.RecordEventsRequest(events=[event]), metadata=client.svc)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{kind} as session_id: {code}"
        code = await _status(
            client.ranking.Recommend(pb.RecommendRequest(user_id=value), metadata=client.svc)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        path = tmp_path / f"{kind}.csv"
        path.write_text(f"user_id,item_id,timestamp\nu1,i1,1700000000\n{value},i2,1700000001\n")
        result = privrank(
            client.config, "import", "interactions", str(path), "--scope", "canary", check=False
        )
        assert result.returncode == 1, result.stdout
        assert value not in result.stderr, "the error line echoes the personal data"

    found: list[str] = []
    conn = await asyncpg.connect(pg_url)
    try:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        for row in tables:
            dump = await conn.fetch(f'SELECT t::text AS line FROM "{row["tablename"]}" t')
            text = "\n".join(r["line"] for r in dump)
            found += [f"postgres:{row['tablename']}:{k}" for k, v in CANARIES.items() if v in text]
    finally:
        await conn.close()
    store = redis.Redis.from_url(redis_url)
    for key in store.scan_iter(match="*", count=1000):
        kind = store.type(key)
        values = store.lrange(key, 0, -1) if kind == b"list" else [store.get(key) or b""]
        blob = key + b"".join(values)
        found += [f"redis:{k}" for k, v in CANARIES.items() if v.encode() in blob]
    store.close()
    for file in client.config.data_dir.rglob("*"):
        if file.is_file() and "postgres" not in file.parts and "redis" not in file.parts:
            data = file.read_bytes()
            found += [f"file:{file.name}:{k}" for k, v in CANARIES.items() if v.encode() in data]
            # numpy stores str arrays as UTF-32: look for that encoding too
            found += [
                f"file:{file.name}:{k}"
                for k, v in CANARIES.items()
                if v.encode("utf-32-le") in data
            ]
    log = caplog.text
    found += [f"log:{k}" for k, v in CANARIES.items() if v in log]
    assert found == []
    assert "canary" not in await owner_pg.scopes()


async def test_logs_carry_no_tokens(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    metadata = client.svc
    await client.ranking.Recommend(pb.RecommendRequest(user_id="u1"), metadata=metadata)
    await _status(client.admin.GetMetrics(pb.GetMetricsRequest(), metadata=metadata))
    token = metadata[0][1].split()[1]
    assert token not in caplog.text
    assert token.split(".")[2] not in caplog.text


async def test_erasure_leaves_no_row_key_or_vector(
    client: Client, seeded: JobContext, owner_pg: PgStore, pg_url: str, redis_url: str
) -> None:
    user = "u20"
    loaded = client.app.ranker.loaded().values()
    holding = sum(ls.snapshot.user_position(user) is not None for ls in loaded)
    assert client.app.ranker.scope("default").snapshot.user_position(user) is not None
    receipt = await client.settings.DeleteUserData(
        pb.DeleteUserDataRequest(user_id=user), metadata=client.svc
    )
    assert receipt.removed["events"] > 0
    assert receipt.removed["snapshot"] == holding

    conn = await asyncpg.connect(pg_url)
    try:
        for table in ("events", "user_settings", "user_features", "ranks"):
            left = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE user_id = $1", user)
            assert left == 0, f"{table} still holds {left} rows of the erased user"
    finally:
        await conn.close()
    store = redis.Redis.from_url(redis_url)
    keys = [
        k
        for k in store.scan_iter(match=f"{client.config.redis_key_prefix}*", count=1000)
        if k.endswith(b":" + user.encode())
    ]
    store.close()
    assert keys == []
    answer = await client.ranking.Recommend(pb.RecommendRequest(user_id=user), metadata=client.svc)
    assert answer.source == pb.SOURCE_POPULAR  # masked in the live snapshot

    # every scope with a snapshot or a model that could hold the user (not "every scope with
    # data": other test modules leave scopes whose data cannot be trained on)
    trained = sorted(
        {
            d.name
            for root in (client.config.snapshot_dir, client.config.model_dir)
            for d in root.iterdir()
            if d.is_dir()
        }
    )
    assert "default" in trained
    await run_job(seeded, "nightly", trained)
    await client.admin.Reload(pb.ReloadRequest(), metadata=client.adm)
    holders = []
    for ids in client.config.snapshot_dir.rglob("user_ids.npy"):
        if user in set(np.load(ids).tolist()):
            holders.append(str(ids))
    for model in client.config.model_dir.rglob("*.npz"):
        with np.load(model) as data:
            if user in set(data["user_ids"].tolist()):
                holders.append(str(model))
    assert holders == [], "a snapshot or model still holds the erased user's vector"


async def test_export_features_includes_only_consenting_users(
    client: Client, seeded: JobContext, tmp_path: Path
) -> None:
    ids, _ = await seeded.pg.user_features("default")
    consenting, other = sorted(ids.tolist())[:2]
    await client.settings.UpdateSettings(
        pb.UpdateSettingsRequest(user_id=consenting, data_sharing_consent=True),
        metadata=client.svc,
    )
    out = tmp_path / "features.csv"
    result = privrank(client.config, "export", "features", "--out", str(out))
    assert "of 1 consenting users" in result.stdout
    lines = out.read_text().splitlines()
    assert lines[0].startswith("scope,user_id,engagement_score")
    assert {line.split(",")[1] for line in lines[1:]} == {consenting}
    assert other not in out.read_text()


async def test_cleanup_enforces_retention_and_reports_it(pg: PgStore) -> None:
    scope = "ret" + uuid.uuid4().hex[:6]
    old = datetime.now(UTC) - timedelta(days=400)
    await pg.insert_events(
        [
            make_interaction(
                scope=scope, user_id="r1", item_id="i1", event_type="view", value=1, occurred_at=old
            ),
            make_interaction(
                scope=scope,
                user_id="r1",
                item_id="i2",
                event_type="view",
                value=1,
                occurred_at=datetime.now(UTC),
            ),
        ]
    )
    removed = await pg.cleanup(
        now=datetime.now(UTC), ranks_hours=24, features_days=30, events_days=365
    )
    assert removed["events"] >= 1
    pairs = await pg.training_pairs(scope)
    assert pairs.item_ids.tolist() == ["i2"]


async def test_fields_outside_the_allow_list_are_refused(
    client: Client, owner_pg: PgStore, tmp_path: Path
) -> None:
    event = pb.Event(user_id="u1", item_id="i1", scope="extra", event_type=pb.CLICK)
    raw = pb.RecordEventsRequest(events=[event]).SerializeToString()
    # a client with another .proto sends field 20 of the event (say, an email)
    smuggled = pb.Event.FromString(event.SerializeToString() + b"\xa2\x01\x05a@b.c")
    request = pb.RecordEventsRequest(events=[smuggled])
    assert len(request.SerializeToString()) > len(raw)
    with pytest.raises(aio.AioRpcError) as err:
        await client.ranking.RecordEvents(request, metadata=client.svc)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[0]: field number 20" in err.value.details()

    path = tmp_path / "extra.csv"
    path.write_text("user_id,item_id,timestamp,email\nu1,i1,1700000000,x\n")
    refused = privrank(
        client.config, "import", "interactions", str(path), "--scope", "extra", check=False
    )
    assert refused.returncode == 1
    assert "column 'email' is outside the allow-list" in refused.stderr
    assert "extra" not in await owner_pg.scopes()
    dropped = privrank(
        client.config,
        "import",
        "interactions",
        str(path),
        "--scope",
        "extra",
        "--drop-columns",
        "email",
    )
    assert "imported 1 events" in dropped.stdout


async def test_the_feature_table_holds_only_the_allow_list(pg_url: str) -> None:
    from features.schema import FEATURE_NAMES

    conn = await asyncpg.connect(pg_url)
    try:
        columns = {
            r["column_name"]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_name = 'user_features'"
            )
        }
    finally:
        await conn.close()
    assert columns == {"scope", "user_id", "embedding", "updated_at", *FEATURE_NAMES}


async def test_jobs_skip_opted_out_users_and_delete_their_features_and_ranks(
    client: Client, seeded: JobContext, pg_url: str
) -> None:
    user = "u33"
    await client.settings.UpdateSettings(
        pb.UpdateSettingsRequest(user_id=user, personalization_enabled=False), metadata=client.svc
    )
    await run_job(seeded, "nightly", ["default"])
    conn = await asyncpg.connect(pg_url)
    try:
        for table in ("user_features", "ranks"):
            left = await conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE user_id = $1 AND scope = 'default'", user
            )
            assert left == 0, f"{table} kept rows of an opted-out user"
    finally:
        await conn.close()
    ids = np.load(
        seeded.config.snapshot_dir / "default" / str(snapshot_version(seeded)) / "user_ids.npy"
    )
    assert user not in set(ids.tolist())
    await client.settings.UpdateSettings(
        pb.UpdateSettingsRequest(user_id=user, personalization_enabled=True), metadata=client.svc
    )


def snapshot_version(ctx: JobContext) -> str | None:
    from ranking import snapshot

    return snapshot.current_version(ctx.config.snapshot_dir, "default")


async def test_a_precompute_racing_an_opt_out_and_an_erasure_leaves_no_ranking_of_either(
    client: Client, seeded: JobContext, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An opt-out and an erasure that land after precompute chose its users, before it wrote
    their rankings: neither user has a cached or a stored ranking once it is done."""
    quitter, erased = "u65", "u64"
    version = snapshot_version(seeded)
    assert version is not None
    for user in (quitter, erased):
        assert await seeded.cache.get("default", version, user) is not None
    write, raced = seeded.cache.put_many, []

    async def racing_write(scope: str, model_version: str, batch: list, **kw: object) -> int:
        if not raced:
            raced.append(True)
            await client.settings.UpdateSettings(
                pb.UpdateSettingsRequest(user_id=quitter, personalization_enabled=False),
                metadata=client.svc,
            )
            await client.settings.DeleteUserData(
                pb.DeleteUserDataRequest(user_id=erased), metadata=client.svc
            )
            for user in (quitter, erased):  # the two requests deleted what was there
                assert await seeded.cache.get(scope, model_version, user) is None
        return await write(scope, model_version, batch, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(seeded.cache, "put_many", racing_write)
    try:
        await run_job(seeded, "precompute", ["default"])
        assert raced
        conn = await asyncpg.connect(pg_url)
        try:
            for user in (quitter, erased):
                assert await seeded.cache.get("default", version, user) is None, user
                stored = await conn.fetchval("SELECT count(*) FROM ranks WHERE user_id = $1", user)
                assert stored == 0, user
            kept = "SELECT count(*) FROM ranks WHERE user_id = 'u66' AND scope = 'default'"
            assert await conn.fetchval(kept) == 1
        finally:
            await conn.close()
        assert await seeded.cache.get("default", version, "u66") is not None
    finally:
        monkeypatch.undo()
        await client.settings.UpdateSettings(
            pb.UpdateSettingsRequest(user_id=quitter, personalization_enabled=True),
            metadata=client.svc,
        )


async def test_a_precompute_that_fails_leaves_no_ranking_of_a_user_opted_out_meanwhile(
    seeded: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user opts out while precompute runs (the opt-out's purge before precompute writes
    their ranking to Redis), then a later batch fails (the ranks table's COPY, say): the
    ranks table rolls back, and the user's ranking must not stay in Redis for its TTL."""
    pg, cache = seeded.pg, seeded.cache
    scope = "pre" + uuid.uuid4().hex[:6]
    await pg.insert_event_batches(
        [dataclasses.replace(e, user_id=f"{scope}-{e.user_id}") for e in batch]
        for batch in generate(users=30, items=30, events=1200, scope=scope, seed=8)
    )
    await run_job(seeded, "train", [scope])  # train and build
    version = snapshot.current_version(seeded.config.snapshot_dir, scope)
    assert version is not None
    monkeypatch.setattr(steps, "BATCH_USERS", 4)
    put_many, add, opted, adds = cache.put_many, RanksReplacement.add, [], []

    async def opting_out_first(scope: str, version: str, batch: Any, **kw: Any) -> int:
        if not opted:
            opted.append(batch[0][0])
            await pg.update_settings(
                opted[0], personalization_enabled=False, data_sharing_consent=None
            )
            await cache.delete_user(opted[0])  # as UpdateSettings purges after its commit
        return await put_many(scope, version, batch, **kw)

    async def failing_second(self: RanksReplacement, rows: Any) -> None:
        adds.append(1)
        if len(adds) == 2:
            raise StoreUnavailable("PostgreSQL: connection lost")
        await add(self, rows)

    monkeypatch.setattr(cache, "put_many", opting_out_first)
    monkeypatch.setattr(RanksReplacement, "add", failing_second)
    with pytest.raises(JobError):
        await run_job(seeded, "precompute", [scope])
    monkeypatch.undo()
    assert await cache.get(scope, version, opted[0]) is None
