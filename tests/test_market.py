"""Market listener and stop-loss end to end: a real websockets feed (the simulator), the real
listener, Redis, engine and paper broker."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.algoplane.v1 import strategy_pb2 as pb
from scripts.feedsim import FeedSimulator
from server.domain import Intent, client_order_id
from server.store.queue import OrderEvent
from server.store.stoploss import Armed, StopLossIndex
from tests.conftest import Harness
from tests.support import RedisProcess
from tests.test_engine import (
    PAPER_LOG,
    bought,
    eventually,
    orders_of,
    pipeline,
    precise_spec,
    reaches,
    runtime_of,
    start_precise,
)


@asynccontextmanager
async def market(
    redis_proc: RedisProcess, tmp_path: Path, fmt: str = "json", **overrides: Any
) -> AsyncIterator[tuple[Harness, FeedSimulator]]:
    feed = FeedSimulator(rate_hz=0, fmt=fmt)  # type: ignore[arg-type]
    url = await feed.start()
    values: dict[str, Any] = {"feed_url": url, "feed_format": fmt, "feed_max_backoff_s": 0.3}
    values.update(overrides)
    try:
        async with pipeline(redis_proc, tmp_path, **values) as h:
            yield h, feed
    finally:
        await feed.stop()


async def subscribed(feed: FeedSimulator, symbol: str) -> None:
    async def check() -> bool:
        return any(subs is not None and symbol in subs for subs in feed.subscriptions)

    await eventually(check, timeout_s=5)


async def price_is(h: Harness, symbol: str, price: str) -> None:
    async def check() -> bool:
        return bool(await h.redis.get(f"price:{{{symbol}}}") == price)

    await eventually(check, timeout_s=5)


async def open_position(
    h: Harness, feed: FeedSimulator, symbol: str = "SBIN", hold: float = 60
) -> str:
    """Starts a strategy (stop-loss 95.5), feeds price 100 and waits until it is bought."""
    sid = await start_precise(h, buy_in=0.8, hold=hold, symbol=symbol)
    await subscribed(feed, symbol)
    await feed.push(symbol, "100")
    await price_is(h, symbol, "100")
    await bought(h, sid)
    return sid


async def test_breaching_tick_exits_by_stop_loss_ahead_of_sell(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with market(redis_proc, tmp_path) as (h, feed):
        events = h.stub.StreamOrders(pb.StreamOrdersRequest(), metadata=h.md())
        sid = await open_position(h, feed, hold=2.0)
        await feed.push("SBIN", "95.5")  # at the stop-loss: breached
        await reaches(h, sid, pb.STRATEGY_STATUS_COMPLETED)
        runtime = await runtime_of(h, sid)
        assert runtime.position == pb.POSITION_EXITED_BY_SL
        assert runtime.exit_price == "95.5"
        assert runtime.last_sl_order_id == client_order_id(sid, 1, Intent.STOPLOSS)
        assert runtime.HasField("terminated_at")
        await asyncio.sleep(2.0)  # past sell_time: no SELL (its timer was removed)
        assert await h.redis.lrange(PAPER_LOG, 0, -1) == [
            client_order_id(sid, 1, Intent.BUY),
            client_order_id(sid, 1, Intent.STOPLOSS),
        ]
        kinds = [(o.kind, o.status) for o in await orders_of(h, sid)]
        assert kinds == [
            (pb.ORDER_KIND_BUY, pb.ORDER_STATUS_FILLED),
            (pb.ORDER_KIND_STOPLOSS, pb.ORDER_STATUS_FILLED),
        ]
        seen: list[tuple[int, int]] = []
        async for event in events:
            seen.append((event.order.kind, event.order.status))
            if seen[-1] == (pb.ORDER_KIND_STOPLOSS, pb.ORDER_STATUS_FILLED):
                break
        assert (pb.ORDER_KIND_STOPLOSS, pb.ORDER_STATUS_SUBMITTED) in seen
        assert await h.redis.zcard("symbol:{SBIN}:stoploss") == 0
        # The trigger's marker, kept until its exit was queued, is cleared (after the exit).
        assert await h.redis.hlen("symbol:{SBIN}:stoploss:fired") == 0


async def test_only_breached_fire_and_repeats_fire_once(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with market(redis_proc, tmp_path) as (h, feed):
        ids: dict[str, str] = {}
        for n in range(30):  # stop-losses 80, 81, ..., 109... all below the entry at 100+
            message = _precise(buy_in=1.2, symbol="INFY", stop_loss=str(70 + n))
            runtime = await h.stub.StartStrategy(
                pb.StartStrategyRequest(spec=message), metadata=h.md()
            )
            ids[runtime.strategy_id] = str(70 + n)
        await subscribed(feed, "INFY")
        await feed.push("INFY", "150")
        for sid in ids:
            await bought(h, sid)
        for _ in range(5):  # repeated breaching ticks: still one exit each
            await feed.push("INFY", "85")
        breached = {sid for sid, stop in ids.items() if int(stop) >= 85}
        assert len(breached) == 15

        async def exits_done() -> bool:
            return int(await h.redis.llen(PAPER_LOG)) >= 30 + len(breached)

        await eventually(exits_done, timeout_s=10)
        await asyncio.sleep(0.5)
        log = await h.redis.lrange(PAPER_LOG, 0, -1)
        stoploss = sorted(str(x) for x in log if str(x).endswith("-sl"))
        assert stoploss == sorted(client_order_id(s, 1, Intent.STOPLOSS) for s in breached)
        for sid in set(ids) - breached:
            assert (await runtime_of(h, sid)).position == pb.POSITION_BOUGHT


def _precise(buy_in: float, symbol: str, stop_loss: str) -> pb.StrategySpec:
    message = precise_spec(buy_in=buy_in, hold=60, symbol=symbol)
    message.stop_loss = stop_loss
    return message


async def test_tick_below_stop_loss_before_buy_does_nothing(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with market(redis_proc, tmp_path) as (h, feed):
        sid = await start_precise(h, buy_in=1.5, hold=60)
        await subscribed(feed, "SBIN")
        await feed.push("SBIN", "80")  # below the stop-loss, but nothing is held yet
        await price_is(h, "SBIN", "80")
        await asyncio.sleep(0.3)
        assert await orders_of(h, sid) == []
        await feed.push("SBIN", "100")  # back up before the BUY
        await price_is(h, "SBIN", "100")
        await bought(h, sid)
        await asyncio.sleep(0.5)
        assert (await runtime_of(h, sid)).position == pb.POSITION_BOUGHT
        assert await h.redis.llen(PAPER_LOG) == 1


async def test_stop_loss_during_an_in_flight_buy_exits_right_after_the_fill(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with market(redis_proc, tmp_path, paper_latency_ms=1200, broker_timeout_s=5) as (
        h,
        feed,
    ):
        sid = await start_precise(h, buy_in=0.8, hold=60)
        await subscribed(feed, "SBIN")
        await feed.push("SBIN", "100")

        async def in_flight() -> bool:
            orders = await orders_of(h, sid)
            return bool(orders) and orders[0].status == pb.ORDER_STATUS_SUBMITTED

        await eventually(in_flight, timeout_s=5)
        await feed.push("SBIN", "90")  # breaches 95.5 while the BUY is at the broker
        await reaches(h, sid, pb.STRATEGY_STATUS_COMPLETED, timeout_s=10)
        runtime = await runtime_of(h, sid)
        assert runtime.position == pb.POSITION_EXITED_BY_SL
        assert await h.redis.lrange(PAPER_LOG, 0, -1) == [
            client_order_id(sid, 1, Intent.BUY),
            client_order_id(sid, 1, Intent.STOPLOSS),
        ]


async def test_a_stop_loss_breached_at_the_fill_is_cleared_and_logged_after_its_exit(
    redis_proc: RedisProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The price is below the stop-loss when the BUY fills: the re-check at arming fires it,
    # and its exit waits for the BUY's lock on the per-event path. The trigger's bookkeeping
    # (its log line, clearing its marker) waits for that exit to end, as for any exit run here.
    caplog.set_level(logging.INFO)
    async with market(redis_proc, tmp_path) as (h, feed):
        sid = await start_precise(h, buy_in=0.8, hold=30)
        await subscribed(feed, "SBIN")
        await feed.push("SBIN", "90")
        await price_is(h, "SBIN", "90")
        await reaches(h, sid, pb.STRATEGY_STATUS_COMPLETED)
        assert (await runtime_of(h, sid)).position == pb.POSITION_EXITED_BY_SL

        async def cleared() -> bool:
            return bool(await h.redis.hlen("symbol:{SBIN}:stoploss:fired") == 0)

        await eventually(cleared, timeout_s=5)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("server.")]
    sl_filled = said.index(f"order {client_order_id(sid, 1, Intent.STOPLOSS)} FILLED")
    assert said.index(f"stop-loss of {sid} breached on SBIN") > sl_filled


async def test_stop_loss_and_sell_due_together_give_one_exit(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with market(redis_proc, tmp_path) as (h, feed):
        sid = await open_position(h, feed, hold=1.0)
        stored = await h.stub.GetStrategy(pb.GetStrategyRequest(strategy_id=sid), metadata=h.md())
        sell_at = stored.spec.sell_time.ToNanoseconds() / 1e9
        await asyncio.sleep(max(0.0, sell_at - time.time()))
        await feed.push("SBIN", "90")  # the breaching tick at the SELL instant

        async def ended() -> bool:
            return (await runtime_of(h, sid)).status == pb.STRATEGY_STATUS_COMPLETED

        await eventually(ended)
        await asyncio.sleep(0.5)
        sent = await h.redis.lrange(PAPER_LOG, 0, -1)
        assert len(sent) == 2  # the BUY and exactly one exit
        statuses = sorted(o.status for o in await orders_of(h, sid))
        assert statuses.count(pb.ORDER_STATUS_FILLED) == 2


async def test_feed_restart_reconnects_resubscribes_and_stop_loss_still_fires(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with market(redis_proc, tmp_path) as (h, feed):
        sid = await open_position(h, feed)
        listener = h.app.listener
        assert listener is not None
        before = len(feed.subscribe_messages)
        port = feed.port
        await feed.stop()
        await asyncio.sleep(1.0)  # the listener retries with backoff meanwhile
        assert not listener.connected
        await feed.start(port=port)
        await subscribed(feed, "SBIN")
        assert len(feed.subscribe_messages) > before
        await feed.push("SBIN", "95")
        await reaches(h, sid, pb.STRATEGY_STATUS_COMPLETED)
        assert listener.stats["reconnects"] >= 1


async def test_malformed_messages_are_counted_and_never_stop_the_listener(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with market(redis_proc, tmp_path) as (h, feed):
        sid = await open_position(h, feed)
        junk = [
            "not json",
            "[]",
            '{"symbol": "SBIN"}',
            '{"symbol": "sbin", "price": "1"}',
            '{"symbol": "SBIN", "price": "-1"}',
            '{"symbol": "SBIN", "price": "NaN"}',
            '{"symbol": "SBIN", "price": 0}',
            '{"symbol": "UNWATCHED", "price": "1"}',
            '{"symbol": "SBIN", "price": "1", "ts": "whenever"}',
            "[" * 50_000,
            json.dumps([{"symbol": "SBIN", "price": "x"}, {"symbol": "SBIN", "price": "99"}]),
        ]
        for message in junk:
            await feed.push_raw(message)
        await price_is(h, "SBIN", "99")  # the good tick inside the last array got through
        listener = h.app.listener
        assert listener is not None
        stats = listener.stats
        assert stats["malformed"] >= 4
        assert stats["bad_symbol"] == 1
        assert stats["bad_price"] >= 4
        assert stats["unknown_symbol"] == 1
        assert stats["bad_ts"] == 1
        await feed.push("SBIN", "95")
        await reaches(h, sid, pb.STRATEGY_STATUS_COMPLETED)


async def test_binance_trade_stream(redis_proc: RedisProcess, tmp_path: Path) -> None:
    async with market(redis_proc, tmp_path, fmt="binance") as (h, feed):
        sid = await open_position(h, feed, symbol="BTCUSDT")
        assert any(
            isinstance(m, dict) and m.get("method") == "SUBSCRIBE" for m in feed.subscribe_messages
        )
        await feed.push("BTCUSDT", "90")
        await reaches(h, sid, pb.STRATEGY_STATUS_COMPLETED)
        assert (await runtime_of(h, sid)).exit_price == "90"


@pytest.mark.parametrize(
    ("setting", "negotiated"), [("off", []), ("deflate", ["permessage-deflate"])]
)
async def test_feed_compression_is_offered_only_when_asked_for(
    redis_proc: RedisProcess, tmp_path: Path, setting: str, negotiated: list[str]
) -> None:
    # The simulator accepts permessage-deflate whenever a client offers it, as feeds do.
    async with market(redis_proc, tmp_path, feed_compression=setting) as (h, feed):
        sid = await open_position(h, feed)
        assert feed.extensions == [negotiated]
        await feed.push("SBIN", "95")
        await reaches(h, sid, pb.STRATEGY_STATUS_COMPLETED)


async def test_a_stale_symbol_with_positions_is_reported(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with market(redis_proc, tmp_path, feed_stale_s=1.0) as (h, feed):
        sid = await open_position(h, feed)
        events = h.stub.StreamRuntime(pb.StreamRuntimeRequest(strategy_id=sid), metadata=h.md())
        health = health_pb2_grpc.HealthStub(h.channel)

        async def feed_status() -> int:
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service="algoplane.v1.MarketFeed")
            )
            return int(reply.status)

        notices: list[str] = []

        async def read() -> None:
            async for event in events:
                if event.runtime.notice:
                    notices.append(event.runtime.notice)
                    if "again" in event.runtime.notice:
                        return

        reader = asyncio.create_task(read())
        await eventually(lambda: _eq(feed_status(), health_pb2.HealthCheckResponse.NOT_SERVING))
        await eventually(lambda: _true(bool(notices)))
        assert notices[0] == "no price for SBIN for 1s"
        await feed.push("SBIN", "101")
        await eventually(lambda: _eq(feed_status(), health_pb2.HealthCheckResponse.SERVING))
        await asyncio.wait_for(reader, 5)
        assert notices[-1] == "prices for SBIN flowing again"
        overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert overall.status == health_pb2.HealthCheckResponse.SERVING


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _true(value: bool) -> bool:
    return value


async def test_breach_racing_a_stop_that_keeps_the_position_is_recorded_not_placed(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """A trigger queues its exit with the run it was armed for, without reading the runtime
    first; the engine checks the state under the lock. Here the trigger comes after a Stop
    that kept the position (as if it fired between the Stop's commit and its disarm)."""
    async with market(redis_proc, tmp_path) as (h, feed):
        sid = await open_position(h, feed)
        await h.stub.StopStrategy(
            pb.StopStrategyRequest(strategy_id=sid, keep_position=True), metadata=h.md()
        )
        assert await h.redis.zcard("symbol:{SBIN}:stoploss") == 0  # the Stop disarmed it
        assert await h.redis.exists("symbol:{SBIN}:stoploss:runs") == 0
        armed = Armed("SBIN", sid, Decimal("95.5"), 1, "tenant-a")
        await StopLossIndex(redis=h.redis).arm_and_recheck_all([armed])
        await feed.push("SBIN", "95")

        async def recorded() -> bool:
            return len(await orders_of(h, sid)) == 2

        await eventually(recorded, timeout_s=5)
        buy, stoploss = await orders_of(h, sid)
        assert (buy.kind, buy.status) == (pb.ORDER_KIND_BUY, pb.ORDER_STATUS_FILLED)
        assert (stoploss.id, stoploss.kind, stoploss.status) == (
            client_order_id(sid, 1, Intent.STOPLOSS),
            pb.ORDER_KIND_STOPLOSS,
            pb.ORDER_STATUS_SKIPPED,
        )
        assert stoploss.error == "STOPLOSS needs a RUNNING strategy, found STOPPED/BOUGHT"
        await asyncio.sleep(0.3)
        assert await h.redis.lrange(PAPER_LOG, 0, -1) == [client_order_id(sid, 1, Intent.BUY)]
        runtime = await runtime_of(h, sid)
        assert (runtime.status, runtime.position) == (
            pb.STRATEGY_STATUS_STOPPED,
            pb.POSITION_BOUGHT,
        )
        assert await h.redis.hlen("symbol:{SBIN}:stoploss:fired") == 0


async def test_an_exit_whose_enqueue_reply_was_lost_runs_at_once_not_after_the_reaper(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    # The reaper would find the taken entry only after a minute: the exit must not wait.
    async with market(redis_proc, tmp_path, exec_claim_idle_s=60) as (h, feed):
        sid = await open_position(h, feed, hold=30)
        wiring = h.app._wiring
        assert wiring is not None
        queue = wiring.queue
        real = queue.enqueue_and_take
        lost: list[str] = []

        async def reply_lost(event: OrderEvent, alongside: Any = None) -> Any:
            # Redis ran the round trip (the entry is queued and taken for this process, its
            # lock set); the reply never came back.
            await real(event, alongside=alongside)
            lost.append(event.order_id)
            raise redis.exceptions.TimeoutError("Timeout reading from socket")

        queue.enqueue_and_take = reply_lost  # type: ignore[method-assign]
        started = time.monotonic()
        await feed.push("SBIN", "95")
        await reaches(h, sid, pb.STRATEGY_STATUS_COMPLETED, timeout_s=10)
        assert time.monotonic() - started < 10  # not the reaper's 60 s
        assert lost == [client_order_id(sid, 1, Intent.STOPLOSS)]
        assert (await runtime_of(h, sid)).position == pb.POSITION_EXITED_BY_SL
        assert await h.redis.lrange(PAPER_LOG, 0, -1) == [
            client_order_id(sid, 1, Intent.BUY),
            client_order_id(sid, 1, Intent.STOPLOSS),
        ]
        await asyncio.sleep(0.3)
        pending = await h.redis.xpending("{queue:orders}:exits", "engine")
        assert pending["pending"] == 0  # run and acknowledged
        assert await h.redis.exists(f"lock_state:{sid}") == 0
