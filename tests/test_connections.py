"""Connections through a real server: the cap per process, and the idle and age limits."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
from grpc import aio

from server.api import privrank_pb2 as pb
from server.api import privrank_pb2_grpc as rpc
from server.config import Config
from tests.serving import Running, established_sockets, fresh_channels, serving


def _port(running: Running) -> int:
    return int(running.target.rsplit(":", 1)[1])


async def _recommend(running: Running, channel: aio.Channel) -> grpc.StatusCode:
    try:
        await rpc.RankingStub(channel).Recommend(
            pb.RecommendRequest(user_id="u1", limit=5), metadata=running.service, timeout=5
        )
    except aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_connection_past_the_cap_is_closed_and_the_others_served(
    config: Config, pg_url: str, redis_url: str, seeded: object
) -> None:
    async with (
        serving(dataclasses.replace(config, max_connections=2), pg_url, redis_url) as running,
        fresh_channels(_port(running), 3) as channels,
    ):
        codes = [await _recommend(running, channel) for channel in channels]
        assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE]
        assert len(established_sockets(_port(running))) == 2
        await channels[0].close()
        # the third one, backing off since it was refused, gets in once a place is free
        for _ in range(50):
            if await _recommend(running, channels[2]) == grpc.StatusCode.OK:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the refused client never got in")
        assert await _recommend(running, channels[1]) == grpc.StatusCode.OK


async def test_aged_connections_are_replaced_without_failing_a_call(
    config: Config, pg_url: str, redis_url: str, seeded: object
) -> None:
    aged = dataclasses.replace(config, max_connection_age_s=0.3, shutdown_grace_s=1.0)
    async with (
        serving(aged, pg_url, redis_url) as running,
        fresh_channels(_port(running), 1) as (channel,),
    ):
        seen: set[str] = set()
        codes = []
        ends = time.monotonic() + 2.0
        while time.monotonic() < ends:
            codes.append(await _recommend(running, channel))
            seen |= established_sockets(_port(running))
    assert set(codes) == {grpc.StatusCode.OK}, set(codes)
    assert len(seen) >= 3, seen  # about one connection per 0.3 s


async def test_an_idle_connection_is_closed_and_the_next_call_reconnects(
    config: Config, pg_url: str, redis_url: str, seeded: object
) -> None:
    idle = dataclasses.replace(config, max_connection_idle_s=0.3)
    async with (
        serving(idle, pg_url, redis_url) as running,
        fresh_channels(_port(running), 1) as (channel,),
    ):
        assert await _recommend(running, channel) == grpc.StatusCode.OK
        first = established_sockets(_port(running))
        assert len(first) == 1
        for _ in range(50):
            await asyncio.sleep(0.1)
            if not established_sockets(_port(running)):
                break
        else:
            raise AssertionError("the idle connection stayed open")
        assert await _recommend(running, channel) == grpc.StatusCode.OK
        assert established_sockets(_port(running)) - first
