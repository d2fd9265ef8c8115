"""The stop-loss index on a real Redis: only breached stop-losses fire, once, exactly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from redis.asyncio import Redis

from server.store.state import connect
from server.store.stoploss import StopLossIndex
from tests.support import RedisProcess


@pytest.fixture
async def redis(redis_proc: RedisProcess) -> AsyncIterator[Redis]:
    client = connect(redis_proc.url, timeout_s=10)
    await client.flushall()
    yield client
    await client.aclose()


async def test_a_tick_fires_exactly_the_breached_ones_among_ten_thousand(redis: Redis) -> None:
    index = StopLossIndex(redis=redis)
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(10_000):  # stop-losses 50.00 .. 149.99
            stop = Decimal(5000 + n) / 100
            pipe.zadd("symbol:{SBIN}:stoploss", {f"{stop:019.8f}:s{n}": float(stop)})
        await pipe.execute()
    fired = await index.tick("SBIN", Decimal("149.5"))
    assert sorted(fired) == sorted(f"s{n}" for n in range(9950, 10_000))
    assert await redis.get("price:{SBIN}") == "149.5"
    assert await index.armed_count("SBIN") == 9950
    # A lower tick fires only the newly breached; the fired ones never again.
    again = await index.tick("SBIN", Decimal("149.4"))
    assert sorted(again) == sorted(f"s{n}" for n in range(9940, 9950))
    assert await index.tick("SBIN", Decimal("149.4")) == []
    assert set(await index.fired("SBIN")) == {f"s{n}" for n in range(9940, 10_000)}
    # A higher tick fires nothing.
    assert await index.tick("SBIN", Decimal("200")) == []


async def test_comparison_is_exact_at_eight_decimals(redis: Redis) -> None:
    index = StopLossIndex(redis=redis)
    await index.arm_and_recheck_all([("X", "at", Decimal("1234567890.12345678"))])
    await index.arm_and_recheck_all([("above", "above", Decimal("1"))])  # another symbol, untouched
    assert await index.tick("X", Decimal("1234567890.12345679")) == []
    assert await index.tick("X", Decimal("1234567890.12345678")) == ["at"]


async def test_disarm_and_hand_over(redis: Redis) -> None:
    index = StopLossIndex(redis=redis)
    await index.arm_and_recheck_all([("SBIN", "a", Decimal("95"))])
    await index.arm_and_recheck_all([("SBIN", "b", Decimal("96"))])
    await index.disarm_all([("SBIN", "a", Decimal("95"))])
    assert await index.armed_ids("SBIN") == ["b"]
    assert await index.tick("SBIN", Decimal("10")) == ["b"]
    await index.handed_over("SBIN", "b")
    assert await index.fired("SBIN") == []


async def test_a_batch_stores_its_last_price_and_fires_what_its_lowest_breached(
    redis: Redis,
) -> None:
    index = StopLossIndex(redis=redis)
    await index.arm_and_recheck_all([("SBIN", "under", Decimal("94"))])
    await index.arm_and_recheck_all([("SBIN", "dip", Decimal("97"))])
    await index.arm_and_recheck_all([("SBIN", "above", Decimal("101"))])
    # Ticks 102, 96.5, 100.5 coalesced: last 100.5, lowest 96.5.
    fired = await index.tick("SBIN", Decimal("100.5"), low=Decimal("96.5"))
    assert sorted(fired) == ["above", "dip"]
    assert await redis.get("price:{SBIN}") == "100.5"
    assert await redis.hget("symbol:{SBIN}:stoploss:fired", "dip") == "96.5"
    assert await index.armed_ids("SBIN") == ["under"]


async def test_arm_and_recheck_fires_at_once_when_the_stored_price_is_already_below(
    redis: Redis,
) -> None:
    index = StopLossIndex(redis=redis)
    assert await index.arm_and_recheck_all([("SBIN", "early", Decimal("95"))]) == []  # no price yet
    await index.tick("SBIN", Decimal("99"))
    assert await index.arm_and_recheck_all([("SBIN", "above", Decimal("98"))]) == []
    assert await index.armed_ids("SBIN") == ["early", "above"]
    assert await index.arm_and_recheck_all([("SBIN", "breached", Decimal("99.5"))]) == [
        ("SBIN", ["breached"])
    ]
    assert await index.armed_ids("SBIN") == ["early", "above"]
    assert await index.fired("SBIN") == ["breached"]
