"""Connections through a real server: the cap per process, and the idle and age limits."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc import aio

from server.app import CHANNELZ_LOOP_SHARE, GAUGES_PERIOD_S, _when_due, channelz_pause
from server.config import Config, running_grpc_transport
from server.metrics import core_calls, core_connections
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
            if await _connections_gauge(running, "open") == core_connections(core_calls()[1]) >= 2:
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


async def _until_closed(running: Running, failure: str) -> None:
    """Until the server has no connection open (5 s at most, then AssertionError(failure))."""
    for _ in range(50):
        await asyncio.sleep(0.1)
        if not established_sockets(running.port):
            return
    raise AssertionError(failure)


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
        await _until_closed(running, "the idle connection stayed open")
        assert await running.recommend_status(channel) == grpc.StatusCode.OK
        assert established_sockets(running.port) - first


_STILL_CLIENT = """
import sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
print("connected", flush=True)
time.sleep(120)
"""


async def test_a_client_that_vanished_is_disconnected_by_keepalive(
    config: Config, pg_url: str, redis_url: str, seeded: object
) -> None:
    """A client that stops answering (here SIGSTOPped; a host gone is the same to the server)
    loses its connection to the server's unanswered keepalive PING, freeing its place."""
    pinging = dataclasses.replace(config, keepalive_s=0.3, keepalive_timeout_s=0.5)
    async with serving(pinging, pg_url, redis_url) as running:
        client = subprocess.Popen(
            [sys.executable, "-c", _STILL_CLIENT, running.target],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None
        try:
            assert await asyncio.to_thread(client.stdout.readline) == "connected\n"
            assert len(established_sockets(running.port)) == 1
            await asyncio.sleep(1.0)  # answered pings keep it open
            assert len(established_sockets(running.port)) == 1
            client.send_signal(signal.SIGSTOP)
            await _until_closed(running, "the unanswered connection stayed open")
        finally:
            client.kill()
            client.wait()
            client.stdout.close()


async def test_clients_may_ping_as_often_as_allowed_and_no_more(
    config: Config, pg_url: str, redis_url: str, seeded: object
) -> None:
    """Keepalive PINGs from a client at the allowed rate keep an idle connection; faster ones
    get it closed (GOAWAY too_many_pings). Both clients idle side by side for 9 s."""
    allowing = dataclasses.replace(config, min_client_ping_s=1.5)

    async def idle_connection(running: Running, every_ms: int) -> bool:
        """Whether a connection pinging every ``every_ms`` stays open over 9 idle seconds."""
        options = [
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.keepalive_time_ms", every_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # as grpc-go clients do
        ]
        async with aio.insecure_channel(running.target, options) as channel:
            before = established_sockets(running.port)
            assert await running.recommend_status(channel) == grpc.StatusCode.OK
            (opened,) = established_sockets(running.port) - before
            await asyncio.sleep(9.0)  # only pings cross it now
            return opened in established_sockets(running.port)

    async with serving(allowing, pg_url, redis_url) as running:
        # gRPC's clients wait 1 s between pings at least: 200 ms is once a second
        allowed = asyncio.create_task(idle_connection(running, 2000))
        await asyncio.sleep(0.5)  # one connection at a time
        too_often = await idle_connection(running, 200)
        assert await allowed, "a client pinging every 2 s lost its connection"
        assert not too_often, "a client pinging every second kept its connection"


def test_channelz_reads_are_spaced_as_they_grow_costly() -> None:
    """A read of channelz holds the event loop longer the more connections are open: once a
    second while cheap, then rarer, at most CHANNELZ_LOOP_SHARE of the loop."""
    assert channelz_pause(0.0004) == GAUGES_PERIOD_S  # ~16 connections
    assert channelz_pause(0.024) == pytest.approx(0.024 / CHANNELZ_LOOP_SHARE)  # ~1,000
    assert 0.024 / channelz_pause(0.024) <= CHANNELZ_LOOP_SHARE


def test_a_channelz_read_that_waited_for_a_core_is_not_taken_for_a_costly_one() -> None:
    # a read's wall time includes any wait for the CPU (a busy machine); its spacing follows
    # the CPU time it took, so the counts are not left stale for seconds after one such wait
    started = time.monotonic()
    due = _when_due(started, lambda: time.sleep(0.05))
    assert due <= time.monotonic() + GAUGES_PERIOD_S
    assert _when_due(due, lambda: pytest.fail("read before it was due")) == due

    def costly() -> None:
        spin_until = time.thread_time() + 0.01
        while time.thread_time() < spin_until:
            pass

    started = time.monotonic()
    assert _when_due(started, costly) >= started + 0.01 / CHANNELZ_LOOP_SHARE
