"""The stop-loss guard on a real Redis: a trigger's exit is submitted at once, its fired marker
is cleared only after the exits running here have ended, and the sweep re-submits what a crash
left behind but not what is merely waiting for that (it waits for it first)."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal

import pytest
from redis.asyncio import Redis

from server.clock import SystemClock
from server.domain import Intent, Position, Runtime, StrategyStatus, client_order_id
from server.stoploss import StopLossGuard
from server.store.queue import OrderEvent, OrderQueue
from server.store.state import RedisState
from server.store.stoploss import Armed, StopLossIndex

FIRED = "symbol:{SBIN}:stoploss:fired"


class Engine:
    """Stands in for the engine's two hooks: records what is submitted, and lets the test
    say when the exits running here have ended."""

    def __init__(self) -> None:
        self.submitted: list[OrderEvent] = []
        self.ended = asyncio.Event()
        self.waits: list[float] = []

    async def submit(self, event: OrderEvent) -> bool:
        self.submitted.append(event)
        return True

    async def exits_ended(self, limit_s: float) -> None:
        self.waits.append(limit_s)
        await self.ended.wait()


def guard_on(redis: Redis, engine: Engine) -> tuple[StopLossGuard, StopLossIndex]:
    index = StopLossIndex(redis=redis)
    state = RedisState(client=redis, stream_client=redis, stream_maxlen=100)
    queue = OrderQueue(redis=redis, consumer="test")
    guard = StopLossGuard(index=index, queue=queue, state=state, clock=SystemClock())
    guard.submit_with(engine.submit, engine.exits_ended)
    return guard, index


async def until_idle() -> None:
    for _ in range(5):  # the bookkeeping task's first steps, were it not waiting
        await asyncio.sleep(0)


async def holding(redis: Redis, strategy_id: str, run: int) -> None:
    """The runtime of a bought position: what a trigger re-found by the sweep is checked
    against (its fired marker does not carry the run)."""
    state = RedisState(client=redis, stream_client=redis, stream_maxlen=100)
    runtime = Runtime(
        strategy_id=strategy_id,
        tenant="acme",
        symbol="SBIN",
        status=StrategyStatus.RUNNING,
        position=Position.BOUGHT,
        version=3,
        run=run,
        updated_at=SystemClock().now(),
    )
    assert await state.put_runtimes([runtime], events_before=[]) != [None]


async def test_the_marker_and_the_log_line_wait_for_the_exits_running_here(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine()
    guard, index = guard_on(redis, engine)
    await index.arm_and_recheck_all([Armed("SBIN", "s1", Decimal("95"), 3, "acme")])
    caplog.set_level(logging.INFO, logger="server.stoploss")

    assert await guard.on_price("SBIN", Decimal("94.5")) == 1

    assert [e.order_id for e in engine.submitted] == [client_order_id("s1", 3, Intent.STOPLOSS)]
    assert engine.submitted[0].tenant == "acme"
    await until_idle()
    assert await redis.hkeys(FIRED) == ["s1"]  # queued, not cleared yet
    assert "breached" not in caplog.text
    # A sweep meanwhile waits for that bookkeeping, then finds nothing left to re-queue:
    # the marker was on its way to being cleared, not lost.
    sweeping = asyncio.create_task(guard.sweep({"SBIN"}))
    await until_idle()
    assert not sweeping.done()

    engine.ended.set()
    await sweeping
    assert await redis.hkeys(FIRED) == []
    assert "stop-loss of s1 breached on SBIN" in caplog.text
    assert engine.waits == [1.0]
    assert len(engine.submitted) == 1
    assert "re-enqueueing" not in caplog.text


async def test_the_sweep_resubmits_a_trigger_a_crash_left_uncleared(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # A trigger fired by another process that died before enqueueing: only its marker is left.
    await holding(redis, "s1", 3)
    _, index = guard_on(redis, Engine())
    await index.arm_and_recheck_all([Armed("SBIN", "s1", Decimal("95"), 3, "acme")])
    assert [f.strategy_id for f in await index.tick("SBIN", Decimal("90"))] == ["s1"]

    engine = Engine()
    engine.ended.set()
    guard, _ = guard_on(redis, engine)
    await guard.sweep({"SBIN"})
    await guard.stop()

    assert [e.order_id for e in engine.submitted] == [client_order_id("s1", 3, Intent.STOPLOSS)]
    assert "re-enqueueing 1 stop-loss triggers on SBIN" in caplog.text
    assert await redis.hkeys(FIRED) == []


async def test_a_trigger_whose_submit_failed_keeps_its_marker_for_the_sweep(redis: Redis) -> None:
    engine = Engine()
    engine.ended.set()
    guard, index = guard_on(redis, engine)

    async def refused(event: OrderEvent) -> bool:
        engine.submitted.append(event)
        return False  # Redis away for the whole retry budget

    guard.submit_with(refused, engine.exits_ended)
    await index.arm_and_recheck_all([Armed("SBIN", "s1", Decimal("95"), 3, "acme")])
    await guard.on_price("SBIN", Decimal("90"))
    await guard.stop()
    assert await redis.hkeys(FIRED) == ["s1"]

    guard.submit_with(engine.submit, engine.exits_ended)
    await holding(redis, "s1", 3)
    await guard.sweep({"SBIN"})
    await guard.stop()
    assert len(engine.submitted) == 2
    assert await redis.hkeys(FIRED) == []
