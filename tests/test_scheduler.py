"""The scheduler's one wake-up job over a heap of instants, against a real Redis queue: timers
added out of order, an earlier instant added after the job was armed, cancelled timers and a
burst at one instant all fire as they should, once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import cast

import pytest
from redis.asyncio import Redis

from server.clock import SystemClock
from server.domain import Intent, Position, Runtime, Strategy, StrategySpec, StrategyStatus
from server.scheduler import Scheduler
from server.store import keys
from server.store.queue import OrderQueue
from tests.support import RedisProcess


@pytest.fixture
async def redis(redis_proc: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_proc.url, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def scheduler(redis: Redis) -> AsyncIterator[Scheduler]:
    scheduler = Scheduler(queue=OrderQueue(redis=redis, consumer="test"), clock=SystemClock())
    scheduler.start()
    yield scheduler
    scheduler.stop()


def strategy(n: int, buy: datetime) -> tuple[Strategy, Runtime]:
    sid = f"stg_{n:032x}"
    spec = StrategySpec("SBIN", 1, buy, buy + timedelta(hours=1), Decimal("90"))
    now = datetime.now(UTC)
    runtime = Runtime(sid, "tenant-a", "SBIN", StrategyStatus.SCHEDULED, Position.NONE, 1, 1, now)
    return Strategy(sid, "tenant-a", spec, StrategyStatus.SCHEDULED, now, now), runtime


async def fired_buys(redis: Redis) -> list[str]:
    entries = cast(list[tuple[str, dict[str, str]]], await redis.xrange(keys.ORDER_QUEUE))
    return [fields["strategy_id"] for _, fields in entries if fields["intent"] == Intent.BUY]


async def test_instants_fire_in_order_also_one_added_earlier_after_arming(
    scheduler: Scheduler, redis: Redis
) -> None:
    base = datetime.now(UTC) + timedelta(seconds=0.6)
    late, cancelled = strategy(1, base + timedelta(seconds=0.4)), strategy(2, base)
    scheduler.schedule(*late)  # armed for base + 0.4
    scheduler.schedule(*cancelled)  # earlier: re-armed for base
    early = strategy(3, base - timedelta(seconds=0.3))  # earlier still, added last
    scheduler.schedule(*early)
    scheduler.cancel(cancelled[0].id)  # the job still wakes at base, finds nothing there

    await asyncio.sleep((base - datetime.now(UTC)).total_seconds() + 0.1)
    assert await fired_buys(redis) == [early[0].id]
    await asyncio.sleep(0.5)
    assert await fired_buys(redis) == [early[0].id, late[0].id]  # each once, in order


async def test_a_burst_at_one_instant_fires_every_timer_once(
    scheduler: Scheduler, redis: Redis
) -> None:
    due = datetime.now(UTC) + timedelta(seconds=0.5)
    pairs = [strategy(n, due) for n in range(300)]
    for pair in pairs:
        scheduler.schedule(*pair)
        scheduler.schedule(*pair)  # the periodic sync sets the same timers again
    await asyncio.sleep(1.2)
    fired = await fired_buys(redis)
    assert sorted(fired) == sorted(s.id for s, _ in pairs)
    scheduler.sync([(s, r) for s, r in pairs])  # fired timers are not set again
    await asyncio.sleep(0.3)
    assert len(await fired_buys(redis)) == 300


async def test_a_timer_in_the_past_fires_at_once(scheduler: Scheduler, redis: Redis) -> None:
    """A restart after a timer's instant: it still fires (the engine judges lateness)."""
    pair = strategy(7, datetime.now(UTC) - timedelta(seconds=3))
    scheduler.schedule(*pair)
    await asyncio.sleep(0.3)
    assert await fired_buys(redis) == [pair[0].id]


async def test_knows_the_version_its_timers_were_set_from_until_cancelled(
    scheduler: Scheduler,
) -> None:
    stg, runtime = strategy(7, datetime.now(UTC) + timedelta(hours=1))
    assert not scheduler.knows(stg.id, runtime.version)
    scheduler.schedule(stg, runtime)
    assert scheduler.knows(stg.id, runtime.version)
    # Another version (a replica's change) is news to the timer sync.
    assert not scheduler.knows(stg.id, runtime.version + 1)
    stopped = replace(runtime, status=StrategyStatus.STOPPED, version=runtime.version + 1)
    scheduler.schedule(stg, stopped)
    assert not scheduler.knows(stg.id, runtime.version)
    assert not scheduler.knows(stg.id, stopped.version)
    scheduler.schedule(stg, runtime)
    scheduler.cancel(stg.id)
    assert not scheduler.knows(stg.id, runtime.version)
