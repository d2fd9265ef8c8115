"""Feed faults while positions are armed: the feed server killed and restarted on its port,
and the feed connection reset through the fault proxy. A breaching price comes right after;
the listener reconnects, subscribes again, and each breached stop-loss exits exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from protos.algoplane.v1 import strategy_pb2 as pb
from scripts.feedsim import FeedSimulator
from server.domain import Intent, client_order_id
from tests.conftest import Harness
from tests.faults.common import all_bought, final_check, paper_log, reaches, start_at
from tests.faults.proxy import FaultProxy
from tests.support import RedisProcess
from tests.test_engine import eventually, pipeline
from tests.test_market import subscribed

Fault = Callable[[], Awaitable[None]]


async def resubscribed(feed: FeedSimulator, symbols: set[str]) -> None:
    """A connected client has asked for these symbols (again)."""

    async def check() -> bool:
        return any(subs is not None and symbols <= subs for subs in feed.subscriptions)

    await eventually(check, timeout_s=5)


@contextlib.asynccontextmanager
async def ticking(feed: FeedSimulator, prices: dict[str, str]) -> AsyncIterator[None]:
    """Pushes the prices every 0.1 s, as a live feed keeps ticking; a tick sent while the
    listener is away is lost, as on a real feed."""

    async def tick() -> None:
        while True:
            for symbol, price in prices.items():
                with contextlib.suppress(Exception):  # the feed may be down for a moment
                    await feed.push(symbol, price)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def armed_positions_survive(
    h: Harness, feed: FeedSimulator, redis_url: str, fault: Fault
) -> None:
    """Three positions on two symbols; `fault` hits the feed; breaching prices follow at
    once. The two breached stop-losses exit once each, the third position stays."""
    t0 = time.time()
    breached_sbin = await start_at(h, t0 + 0.8, t0 + 60, symbol="SBIN", stop_loss="95.5")
    kept = await start_at(h, t0 + 0.8, t0 + 60, symbol="SBIN", stop_loss="90")
    breached_infy = await start_at(h, t0 + 0.8, t0 + 60, symbol="INFY", stop_loss="95.5")
    await subscribed(feed, "SBIN")
    await subscribed(feed, "INFY")
    await feed.push("SBIN", "100")
    await feed.push("INFY", "100")
    await all_bought(h, [breached_sbin, kept, breached_infy], timeout_s=6)
    listener = h.app.listener
    assert listener is not None
    subscribes_before = len(feed.subscribe_messages)
    reconnects_before = listener.stats["reconnects"]

    await fault()
    async with ticking(feed, {"SBIN": "93", "INFY": "94"}):
        for sid in (breached_sbin, breached_infy):
            exited = await reaches(h, sid, pb.STRATEGY_STATUS_COMPLETED, timeout_s=10)
            assert exited.position == pb.POSITION_EXITED_BY_SL
        await asyncio.sleep(0.5)  # more breaching ticks: a second exit would show up here

    assert listener.stats["reconnects"] > reconnects_before
    assert listener.connected
    # On the new connection it asked for both symbols again (and, once INFY had no live
    # strategy left, for SBIN alone).
    again = [set(m["symbols"]) for m in feed.subscribe_messages[subscribes_before:]]
    assert {"SBIN", "INFY"} in again, again
    await resubscribed(feed, {"SBIN"})
    runtime = await h.stub.GetRuntime(pb.GetRuntimeRequest(strategy_id=kept), metadata=h.md())
    assert (runtime.status, runtime.position) == (pb.STRATEGY_STATUS_RUNNING, pb.POSITION_BOUGHT)
    assert sorted(await paper_log(redis_url)) == sorted(
        [
            *(client_order_id(sid, 1, Intent.BUY) for sid in (breached_sbin, kept, breached_infy)),
            client_order_id(breached_sbin, 1, Intent.STOPLOSS),
            client_order_id(breached_infy, 1, Intent.STOPLOSS),
        ]
    )
    await final_check(redis_url, h.settings.effective_database_url)


async def test_feed_server_killed_and_restarted(redis_proc: RedisProcess, tmp_path: Path) -> None:
    feed = FeedSimulator(rate_hz=0)
    url = await feed.start()
    try:
        async with pipeline(
            redis_proc, tmp_path, feed_url=url, feed_format="json", feed_max_backoff_s=0.3
        ) as h:

            async def kill_and_restart() -> None:
                port = feed.port
                await feed.stop()
                await asyncio.sleep(0.5)  # the listener retries with backoff meanwhile
                listener = h.app.listener
                assert listener is not None and not listener.connected
                await feed.start(port=port)

            await armed_positions_survive(h, feed, redis_proc.url, kill_and_restart)
    finally:
        await feed.stop()


async def test_feed_connection_reset_through_the_proxy(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    feed = FeedSimulator(rate_hz=0)
    await feed.start()
    proxy = FaultProxy("127.0.0.1", feed.port)
    port = await proxy.start()
    try:
        async with pipeline(
            redis_proc,
            tmp_path,
            feed_url=f"ws://127.0.0.1:{port}",
            feed_format="json",
            feed_max_backoff_s=0.3,
        ) as h:

            async def reset() -> None:
                assert proxy.connections == 1
                proxy.reset()

            await armed_positions_survive(h, feed, redis_proc.url, reset)
            assert proxy.accepted >= 2  # the listener came back through the proxy
    finally:
        await proxy.stop()
        await feed.stop()
