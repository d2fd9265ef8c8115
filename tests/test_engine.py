"""The execution pipeline end to end: real scheduler time, real Redis queue, real engine,
the paper broker's book in Redis. Instants are 1-3 s ahead."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from server.domain import Intent, client_order_id
from server.store.codec import to_micros
from server.store.queue import OrderEvent, OrderQueue
from tests.conftest import Harness, serving, start_harness, stop_harness
from tests.support import RedisProcess, spec, spec_at

PAPER_LOG = "{paper}:log"


@asynccontextmanager
async def pipeline(
    redis_proc: RedisProcess, data_dir: Path, *, flush: bool = True, **overrides: Any
) -> AsyncIterator[Harness]:
    if flush:
        client = Redis.from_url(redis_proc.url)
        await client.flushall()
        await client.aclose()
    async with serving(redis_proc.url, data_dir, **overrides) as harness:
        yield harness


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def runtime_of(h: Harness, strategy_id: str) -> pb.Runtime:
    return await h.stub.GetRuntime(pb.GetRuntimeRequest(strategy_id=strategy_id), metadata=h.md())


async def reaches(h: Harness, strategy_id: str, status: int, timeout_s: float = 10.0) -> None:
    async def check() -> bool:
        return (await runtime_of(h, strategy_id)).status == status

    await eventually(check, timeout_s)


async def orders_of(h: Harness, strategy_id: str) -> list[pb.Order]:
    reply = await h.stub.ListOrders(pb.ListOrdersRequest(strategy_id=strategy_id), metadata=h.md())
    return list(reply.orders)


async def start(h: Harness, buy_in: float, hold: float, symbol: str = "SBIN") -> str:
    runtime = await h.stub.StartStrategy(
        pb.StartStrategyRequest(
            spec=spec(
                symbol=symbol,
                buy_in=timedelta(seconds=buy_in),
                hold=timedelta(seconds=hold),
            )
        ),
        metadata=h.md(),
    )
    return runtime.strategy_id


def precise_spec(buy_in: float, hold: float, symbol: str = "SBIN") -> pb.StrategySpec:
    """spec() rounds to whole seconds; this keeps sub-second instants."""
    buy_at = time.time() + buy_in
    return spec_at(buy_at, buy_at + hold, symbol=symbol)


async def start_precise(h: Harness, buy_in: float, hold: float, symbol: str = "SBIN") -> str:
    runtime = await h.stub.StartStrategy(
        pb.StartStrategyRequest(spec=precise_spec(buy_in, hold, symbol)), metadata=h.md()
    )
    return runtime.strategy_id


async def test_buy_then_sell_reach_the_broker_once_each(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with pipeline(redis_proc, tmp_path) as h:
        await h.redis.set("price:{SBIN}", "100.5")
        events = h.stub.StreamRuntime(pb.StreamRuntimeRequest(), metadata=h.md())
        order_events = h.stub.StreamOrders(pb.StreamOrdersRequest(), metadata=h.md())
        await asyncio.sleep(0.3)
        sid = await start_precise(h, buy_in=1.0, hold=1.0)
        await bought(h, sid)
        await h.redis.set("price:{SBIN}", "101.25")
        await reaches(h, sid, pb.STRATEGY_STATUS_COMPLETED)

        runtime = await runtime_of(h, sid)
        assert runtime.position == pb.POSITION_SOLD
        assert runtime.entry_price == "100.5"
        assert runtime.exit_price == "101.25"
        assert runtime.last_buy_order_id == client_order_id(sid, 1, Intent.BUY)
        assert runtime.last_sell_order_id == client_order_id(sid, 1, Intent.SELL)
        assert runtime.HasField("terminated_at")
        assert await h.redis.lrange(PAPER_LOG, 0, -1) == [
            runtime.last_buy_order_id,
            runtime.last_sell_order_id,
        ]
        orders = await orders_of(h, sid)
        assert [(o.kind, o.status, o.attempts, o.fill_price) for o in orders] == [
            (pb.ORDER_KIND_BUY, pb.ORDER_STATUS_FILLED, 1, "100.5"),
            (pb.ORDER_KIND_SELL, pb.ORDER_STATUS_FILLED, 1, "101.25"),
        ]
        assert all(o.broker_order_id.startswith("paper-") for o in orders)
        assert await h.redis.smembers("symbol:{SBIN}:strategies") == set()

        statuses = [(e.runtime.status, e.runtime.position) for e in await _take(events, count=5)]
        assert statuses == [
            (pb.STRATEGY_STATUS_SCHEDULED, pb.POSITION_NONE),
            (pb.STRATEGY_STATUS_RUNNING, pb.POSITION_NONE),
            (pb.STRATEGY_STATUS_RUNNING, pb.POSITION_BOUGHT),
            (pb.STRATEGY_STATUS_RUNNING, pb.POSITION_BOUGHT),
            (pb.STRATEGY_STATUS_COMPLETED, pb.POSITION_SOLD),
        ]
        order_statuses = [
            (e.order.kind, e.order.status) for e in await _take(order_events, count=4)
        ]
        # The intent is committed as the first attempt (SUBMITTED, attempts 1) before the call.
        assert order_statuses == [
            (pb.ORDER_KIND_BUY, pb.ORDER_STATUS_SUBMITTED),
            (pb.ORDER_KIND_BUY, pb.ORDER_STATUS_FILLED),
            (pb.ORDER_KIND_SELL, pb.ORDER_STATUS_SUBMITTED),
            (pb.ORDER_KIND_SELL, pb.ORDER_STATUS_FILLED),
        ]
        events.cancel()
        order_events.cancel()


async def bought(h: Harness, sid: str, timeout_s: float = 8.0) -> None:
    """Waits until the strategy's BUY has filled."""
    await eventually(
        lambda: _has(h, sid, pb.STRATEGY_STATUS_RUNNING, pb.POSITION_BOUGHT), timeout_s
    )


async def _has(h: Harness, sid: str, status: int, position: int) -> bool:
    runtime = await runtime_of(h, sid)
    return runtime.status == status and runtime.position == position


async def _take(call: Any, count: int, timeout_s: float = 5.0) -> list[Any]:
    got: list[Any] = []

    async def read() -> None:
        async for event in call:
            got.append(event)
            if len(got) == count:
                return

    await asyncio.wait_for(read(), timeout_s)
    return got


async def test_two_hundred_buys_due_in_one_second_each_placed_once(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with pipeline(redis_proc, tmp_path, exec_concurrency=32) as h:
        await h.redis.set("price:{INFY}", "1500")
        spec_ = precise_spec(buy_in=2.5, hold=120, symbol="INFY")
        started = await asyncio.gather(
            *(
                h.stub.StartStrategy(pb.StartStrategyRequest(spec=spec_), metadata=h.md())
                for _ in range(200)
            )
        )
        ids = {r.strategy_id for r in started}
        assert len(ids) == 200

        async def all_bought() -> bool:
            return int(await h.redis.llen(PAPER_LOG)) >= 200

        await eventually(all_bought, timeout_s=30)
        await asyncio.sleep(0.5)  # a duplicate would show up here
        log = await h.redis.lrange(PAPER_LOG, 0, -1)
        assert sorted(log) == sorted(client_order_id(sid, 1, Intent.BUY) for sid in ids)
        for sid in list(ids)[:5]:
            runtime = await runtime_of(h, sid)
            assert runtime.position == pb.POSITION_BOUGHT


async def test_broker_timeout_after_effect_is_found_not_repeated(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with pipeline(redis_proc, tmp_path, paper_timeout_rate=1.0) as h:
        await h.redis.set("price:{SBIN}", "99")
        sid = await start_precise(h, buy_in=1.0, hold=60)
        await bought(h, sid)
        assert await h.redis.lrange(PAPER_LOG, 0, -1) == [client_order_id(sid, 1, Intent.BUY)]
        (buy,) = await orders_of(h, sid)
        assert (buy.status, buy.attempts, buy.fill_price) == (pb.ORDER_STATUS_FILLED, 1, "99")


async def test_three_failed_attempts_fail_the_strategy_and_nothing_more_is_sent(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with pipeline(redis_proc, tmp_path, paper_error_rate=1.0) as h:
        await h.redis.set("price:{SBIN}", "99")
        sid = await start_precise(h, buy_in=1.0, hold=1.0)
        await reaches(h, sid, pb.STRATEGY_STATUS_FAILED, timeout_s=6)
        runtime = await runtime_of(h, sid)
        assert "BUY failed after 3 attempts" in runtime.failure_reason
        assert runtime.position == pb.POSITION_NONE
        await asyncio.sleep(1.5)  # past sell_time: the SELL timer was removed
        (buy,) = await orders_of(h, sid)
        assert (buy.status, buy.attempts) == (pb.ORDER_STATUS_FAILED, 3)
        assert "connection reset" in buy.error
        assert await h.redis.llen(PAPER_LOG) == 0


async def test_no_price_means_rejected_and_failed(redis_proc: RedisProcess, tmp_path: Path) -> None:
    async with pipeline(redis_proc, tmp_path) as h:
        sid = await start_precise(h, buy_in=0.8, hold=60, symbol="NOPRICE")
        await reaches(h, sid, pb.STRATEGY_STATUS_FAILED, timeout_s=6)
        runtime = await runtime_of(h, sid)
        assert runtime.failure_reason == "BUY rejected by the broker: no price for NOPRICE"
        (buy,) = await orders_of(h, sid)
        assert (buy.status, buy.attempts) == (pb.ORDER_STATUS_REJECTED, 1)


async def test_stop_exits_an_open_position(redis_proc: RedisProcess, tmp_path: Path) -> None:
    async with pipeline(redis_proc, tmp_path) as h:
        await h.redis.set("price:{SBIN}", "100")
        sid = await start_precise(h, buy_in=0.8, hold=2.0)
        await bought(h, sid)
        await h.redis.set("price:{SBIN}", "97")
        stopped = await h.stub.StopStrategy(
            pb.StopStrategyRequest(strategy_id=sid), metadata=h.md()
        )
        assert (stopped.status, stopped.position) == (
            pb.STRATEGY_STATUS_STOPPED,
            pb.POSITION_SOLD,
        )
        assert stopped.exit_price == "97"
        await asyncio.sleep(2.0)  # past sell_time: the SELL timer was removed
        log = await h.redis.lrange(PAPER_LOG, 0, -1)
        assert log == [client_order_id(sid, 1, Intent.BUY), client_order_id(sid, 1, Intent.EXIT)]
        kinds = [(o.kind, o.status) for o in await orders_of(h, sid)]
        assert kinds == [
            (pb.ORDER_KIND_BUY, pb.ORDER_STATUS_FILLED),
            (pb.ORDER_KIND_SELL, pb.ORDER_STATUS_FILLED),
        ]


async def test_stop_keeping_the_position_sends_nothing(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with pipeline(redis_proc, tmp_path) as h:
        await h.redis.set("price:{SBIN}", "100")
        sid = await start_precise(h, buy_in=0.8, hold=1.5)
        await bought(h, sid)
        stopped = await h.stub.StopStrategy(
            pb.StopStrategyRequest(strategy_id=sid, keep_position=True), metadata=h.md()
        )
        assert (stopped.status, stopped.position) == (
            pb.STRATEGY_STATUS_STOPPED,
            pb.POSITION_BOUGHT,
        )
        await asyncio.sleep(2.0)
        assert await h.redis.lrange(PAPER_LOG, 0, -1) == [client_order_id(sid, 1, Intent.BUY)]
        assert (await runtime_of(h, sid)).status == pb.STRATEGY_STATUS_STOPPED


async def test_stop_before_buy_cancels_the_timers(redis_proc: RedisProcess, tmp_path: Path) -> None:
    async with pipeline(redis_proc, tmp_path) as h:
        await h.redis.set("price:{SBIN}", "100")
        sid = await start_precise(h, buy_in=1.0, hold=0.5)
        await h.stub.StopStrategy(pb.StopStrategyRequest(strategy_id=sid), metadata=h.md())
        await asyncio.sleep(2.0)
        assert await h.redis.llen(PAPER_LOG) == 0
        assert await orders_of(h, sid) == []


async def test_conflicting_exits_act_once(redis_proc: RedisProcess, tmp_path: Path) -> None:
    async with pipeline(redis_proc, tmp_path) as h:
        await h.redis.set("price:{SBIN}", "100")
        sid = await start_precise(h, buy_in=0.8, hold=60)
        await bought(h, sid)
        queue = OrderQueue(redis=h.redis, consumer="test")
        now = to_micros(datetime.now(UTC))
        for intent in (Intent.SELL, Intent.STOPLOSS, Intent.EXIT):
            event = OrderEvent(
                strategy_id=sid,
                tenant="tenant-a",
                run=1,
                intent=intent,
                order_id=client_order_id(sid, 1, intent),
                due_at_us=now,
                fired_at_us=now,
            )
            assert await queue.enqueue(event) is not None
            assert await queue.enqueue(event) is None  # enqueue-once

        async def exited() -> bool:
            return (await runtime_of(h, sid)).position != pb.POSITION_BOUGHT

        await eventually(exited)
        await asyncio.sleep(0.5)
        # Whichever exit acts first wins; the other two are skipped, never sent.
        runtime = await runtime_of(h, sid)
        assert (runtime.status, runtime.position) in [
            (pb.STRATEGY_STATUS_COMPLETED, pb.POSITION_SOLD),
            (pb.STRATEGY_STATUS_COMPLETED, pb.POSITION_EXITED_BY_SL),
            (pb.STRATEGY_STATUS_STOPPED, pb.POSITION_SOLD),
        ]
        orders = await orders_of(h, sid)
        sent = await h.redis.lrange(PAPER_LOG, 0, -1)
        assert len(sent) == 2  # the BUY and one exit
        filled = [o for o in orders if o.status == pb.ORDER_STATUS_FILLED]
        skipped = [o for o in orders if o.status == pb.ORDER_STATUS_SKIPPED]
        assert len(filled) == 2 and len(skipped) == 2
        assert all("needs" in o.error for o in skipped)


async def test_missed_buy_beyond_grace_fails(redis_proc: RedisProcess, tmp_path: Path) -> None:
    async with pipeline(redis_proc, tmp_path, buy_grace_s=0.5) as h:
        await h.redis.set("price:{SBIN}", "100")
        sid = await start_precise(h, buy_in=1.0, hold=60)
    await asyncio.sleep(2.0)  # the server is down at buy_time and for longer than the grace
    async with pipeline(redis_proc, tmp_path, flush=False, buy_grace_s=0.5) as h:
        await reaches(h, sid, pb.STRATEGY_STATUS_FAILED, timeout_s=6)
        runtime = await runtime_of(h, sid)
        assert "BUY not placed" in runtime.failure_reason
        assert "grace" in runtime.failure_reason
        assert await h.redis.llen(PAPER_LOG) == 0
        (buy,) = await orders_of(h, sid)
        assert buy.status == pb.ORDER_STATUS_SKIPPED


async def test_missed_sell_is_placed_at_once(redis_proc: RedisProcess, tmp_path: Path) -> None:
    async with pipeline(redis_proc, tmp_path) as h:
        await h.redis.set("price:{SBIN}", "100")
        sid = await start_precise(h, buy_in=0.8, hold=1.0)
        await bought(h, sid)
    await asyncio.sleep(2.0)  # down at sell_time
    async with pipeline(redis_proc, tmp_path, flush=False) as h:
        await reaches(h, sid, pb.STRATEGY_STATUS_COMPLETED, timeout_s=6)
        sent = await h.redis.lrange(PAPER_LOG, 0, -1)
        assert sent == [client_order_id(sid, 1, Intent.BUY), client_order_id(sid, 1, Intent.SELL)]


@pytest.mark.parametrize("replicas", [2])
async def test_two_servers_on_one_redis_place_each_order_once(
    redis_proc: RedisProcess, tmp_path: Path, replicas: int
) -> None:
    async with pipeline(redis_proc, tmp_path / "a") as a:
        settings = a.settings.model_copy(update={"data_dir": tmp_path / "b"})
        # Both replicas share the DB, as replicas do.
        settings = settings.model_copy(update={"database_url": a.settings.effective_database_url})
        b = await start_harness(settings)
        try:
            await a.redis.set("price:{TCS}", "3000")
            spec_ = precise_spec(buy_in=2.0, hold=1.5, symbol="TCS")
            starts = [
                (a if n % 2 else b).stub.StartStrategy(
                    pb.StartStrategyRequest(spec=spec_), metadata=a.md()
                )
                for n in range(40)
            ]
            ids = {r.strategy_id for r in await asyncio.gather(*starts)}

            async def all_sold() -> bool:
                return int(await a.redis.llen(PAPER_LOG)) >= 80

            await eventually(all_sold, timeout_s=20)
            await asyncio.sleep(1.0)
            sent = await a.redis.lrange(PAPER_LOG, 0, -1)
            assert len(sent) == 80 == len(set(sent))
            for sid in ids:
                assert (await runtime_of(a, sid)).status == pb.STRATEGY_STATUS_COMPLETED
        finally:
            await stop_harness(b)


async def test_exits_jump_a_backlog_of_thousands(redis_proc: RedisProcess, tmp_path: Path) -> None:
    async with pipeline(redis_proc, tmp_path, exec_concurrency=2) as h:
        await h.redis.set("price:{SBIN}", "100")
        sid = await start_precise(h, buy_in=0.8, hold=600)
        await bought(h, sid)
        now = to_micros(datetime.now(UTC))
        async with h.redis.pipeline(transaction=False) as pipe:
            for n in range(5000):  # BUYs of strategies nobody knows: each is looked up, dropped
                ghost = f"stg_{n:032x}"
                event = OrderEvent(ghost, "tenant-a", 1, Intent.BUY, f"{ghost}-1-buy", now, now)
                pipe.xadd("queue:orders", dict(event.fields().items()))
            await pipe.execute()
        queue = OrderQueue(redis=h.redis, consumer="test")
        exit_event = OrderEvent(
            sid, "tenant-a", 1, Intent.STOPLOSS, client_order_id(sid, 1, Intent.STOPLOSS), now, now
        )
        assert await queue.enqueue(exit_event) is not None

        async def exited() -> bool:
            return (await runtime_of(h, sid)).position == pb.POSITION_EXITED_BY_SL

        await eventually(exited, timeout_s=5)
        assert await h.redis.xlen("queue:orders") > 2500  # most of the backlog still waits


async def test_failed_exit_keeps_the_position_and_stop_retries_it(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with pipeline(redis_proc, tmp_path) as h:
        await h.redis.set("price:{SBIN}", "100")
        sid = await start_precise(h, buy_in=0.8, hold=1.0)
        await bought(h, sid)
        await h.redis.delete("price:{SBIN}")  # the SELL is rejected: no price
        await reaches(h, sid, pb.STRATEGY_STATUS_FAILED, timeout_s=6)
        failed = await runtime_of(h, sid)
        assert failed.position == pb.POSITION_BOUGHT
        assert failed.failure_reason == "SELL rejected by the broker: no price for SBIN"
        assert not failed.HasField("terminated_at")

        await h.redis.set("price:{SBIN}", "102")
        stopped = await h.stub.StopStrategy(
            pb.StopStrategyRequest(strategy_id=sid), metadata=h.md()
        )
        assert (stopped.status, stopped.position, stopped.exit_price) == (
            pb.STRATEGY_STATUS_STOPPED,
            pb.POSITION_SOLD,
            "102",
        )
        assert stopped.failure_reason == ""
        orders = [(o.id, o.status) for o in await orders_of(h, sid)]
        assert orders == [
            (client_order_id(sid, 1, Intent.BUY), pb.ORDER_STATUS_FILLED),
            (client_order_id(sid, 1, Intent.SELL), pb.ORDER_STATUS_REJECTED),
            (client_order_id(sid, 1, Intent.EXIT, 1), pb.ORDER_STATUS_FILLED),
        ]


async def test_invariants_hold_after_a_full_run(redis_proc: RedisProcess, tmp_path: Path) -> None:
    from server.store.db import Database
    from tests.faults.invariants import check_invariants

    async with pipeline(redis_proc, tmp_path) as h:
        await h.redis.set("price:{SBIN}", "100")
        sid = await start_precise(h, buy_in=0.8, hold=0.8)
        await reaches(h, sid, pb.STRATEGY_STATUS_COMPLETED)
        db = Database(h.settings.effective_database_url)
        try:
            await check_invariants(h.redis, db)
            # The check can fail: a second filled exit at the broker breaks it.
            ghost = client_order_id(sid, 1, Intent.EXIT, 1)
            fill = {"client_order_id": ghost, "status": "FILLED", "fill_price": "1"}
            await h.redis.hset("{paper}:orders", ghost, json.dumps(fill))
            with pytest.raises(AssertionError, match="more than one filled"):
                await check_invariants(h.redis, db)
        finally:
            await db.close()
