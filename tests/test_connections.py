"""Connections through a real server: the cap per process, and the idle and age limits."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc
import pytest

from server.config import Config, running_grpc_transport
from server.metrics import core_connection_count
from tests.serving import Running, established_sockets, fresh_channels, serving


async def test_a_connection_past_the_cap_is_closed_and_the_others_served(
    config: Config, pg_url: str, redis_url: str, seeded: object
) -> None:
    async with (
        serving(dataclasses.replace(config, max_connections=2), pg_url, redis_url) as running,
        fresh_channels(running.port, 3) as channels,
    ):
        codes = [await running.recommend_status(channel) for channel in channels]
        assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE]
        assert len(established_sockets(running.port)) == 2
        # the gauge, brought up to date once a second, counts every server of this process
        assert await _connections_gauge(running, "max") == 2
        for _ in range(30):
            if await _connections_gauge(running, "open") == core_connection_count() >= 2:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("privrank_grpc_connections did not follow channelz")
        await channels[0].close()
        # the third one, backing off since it was refused, gets in once a place is free
        for _ in range(50):
            if await running.recommend_status(channels[2]) == grpc.StatusCode.OK:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the refused client never got in")
        assert await running.recommend_status(channels[1]) == grpc.StatusCode.OK


async def _connections_gauge(running: Running, state: str) -> float | None:
    for _ in range(30):  # until its first update
        value = running.app.metrics.registry.get_sample_value(
            "privrank_grpc_connections", {"state": state}
        )
        if value is not None:
            return value
        await asyncio.sleep(0.2)
    return None


async def _said_to_be_ignored_on_ph2(
    config: Config, pg_url: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> bool:
    """On the ph2 transport, which has no idle or age limit: that the server warns so."""
    if running_grpc_transport() != "ph2":
        return False
    with caplog.at_level(logging.WARNING, logger="server.app"):
        async with serving(config, pg_url, redis_url):
            pass
    assert "no effect on the ph2 transport" in caplog.text
    return True


async def test_aged_connections_are_replaced_without_failing_a_call(
    config: Config, pg_url: str, redis_url: str, seeded: object, caplog: pytest.LogCaptureFixture
) -> None:
    aged = dataclasses.replace(config, max_connection_age_s=0.3, shutdown_grace_s=1.0)
    if await _said_to_be_ignored_on_ph2(aged, pg_url, redis_url, caplog):
        return
    async with (
        serving(aged, pg_url, redis_url) as running,
        fresh_channels(running.port, 1) as (channel,),
    ):
        seen: set[str] = set()
        codes = []
        ends = time.monotonic() + 2.0
        while time.monotonic() < ends:
            codes.append(await running.recommend_status(channel))
            seen |= established_sockets(running.port)
    assert set(codes) == {grpc.StatusCode.OK}, set(codes)
    assert len(seen) >= 3, seen  # about one connection per 0.3 s


async def test_an_idle_connection_is_closed_and_the_next_call_reconnects(
    config: Config, pg_url: str, redis_url: str, seeded: object, caplog: pytest.LogCaptureFixture
) -> None:
    idle = dataclasses.replace(config, max_connection_idle_s=0.3)
    if await _said_to_be_ignored_on_ph2(idle, pg_url, redis_url, caplog):
        return
    async with (
        serving(idle, pg_url, redis_url) as running,
        fresh_channels(running.port, 1) as (channel,),
    ):
        assert await running.recommend_status(channel) == grpc.StatusCode.OK
        first = established_sockets(running.port)
        assert len(first) == 1
        for _ in range(50):
            await asyncio.sleep(0.1)
            if not established_sockets(running.port):
                break
        else:
            raise AssertionError("the idle connection stayed open")
        assert await running.recommend_status(channel) == grpc.StatusCode.OK
        assert established_sockets(running.port) - first
