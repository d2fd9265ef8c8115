"""The stop-loss index on a real Redis: only breached stop-losses fire, once, exactly."""

from __future__ import annotations

from decimal import Decimal

from redis.asyncio import Redis

from server.store.stoploss import Armed, Fired, StopLossIndex


def ids(fired: list[Fired]) -> list[str]:
    return [f.strategy_id for f in fired]


async def arm(
    index: StopLossIndex, symbol: str, strategy_id: str, stop: str
) -> list[tuple[str, list[str]]]:
    """Arms one position (run 1 of tenant acme); what fired at once, by symbol."""
    armed = Armed(symbol, strategy_id, Decimal(stop), 1, "acme")
    return [(sym, ids(fired)) for sym, fired in await index.arm_and_recheck_all([armed])]


async def test_a_tick_fires_exactly_the_breached_ones_among_ten_thousand(redis: Redis) -> None:
    index = StopLossIndex(redis=redis)
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(10_000):  # stop-losses 50.00 .. 149.99
            stop = Decimal(5000 + n) / 100
            pipe.zadd("symbol:{SBIN}:stoploss", {f"{stop:019.8f}:s{n}": float(stop)})
        await pipe.execute()
    fired = ids(await index.tick("SBIN", Decimal("149.5")))
    assert sorted(fired) == sorted(f"s{n}" for n in range(9950, 10_000))
    assert await redis.get("price:{SBIN}") == "149.5"
    assert await index.armed_count("SBIN") == 9950
    # A lower tick fires only the newly breached; the fired ones never again.
    again = ids(await index.tick("SBIN", Decimal("149.4")))
    assert sorted(again) == sorted(f"s{n}" for n in range(9940, 9950))
    assert await index.tick("SBIN", Decimal("149.4")) == []
    assert set(ids(await index.fired("SBIN"))) == {f"s{n}" for n in range(9940, 10_000)}
    # A higher tick fires nothing.
    assert await index.tick("SBIN", Decimal("200")) == []


async def test_comparison_is_exact_at_eight_decimals(redis: Redis) -> None:
    index = StopLossIndex(redis=redis)
    await arm(index, "X", "at", "1234567890.12345678")
    await arm(index, "above", "above", "1")  # another symbol, untouched
    assert await index.tick("X", Decimal("1234567890.12345679")) == []
    assert ids(await index.tick("X", Decimal("1234567890.12345678"))) == ["at"]


async def test_disarm_and_hand_over(redis: Redis) -> None:
    index = StopLossIndex(redis=redis)
    await arm(index, "SBIN", "a", "95")
    await arm(index, "SBIN", "b", "96")
    await index.disarm_all([("SBIN", "a", Decimal("95"))])
    assert await index.armed_ids("SBIN") == ["b"]
    assert ids(await index.tick("SBIN", Decimal("10"))) == ["b"]
    await index.handed_over("SBIN", ["b"])
    assert await index.fired("SBIN") == []


async def test_a_batch_stores_its_last_price_and_fires_what_its_lowest_breached(
    redis: Redis,
) -> None:
    index = StopLossIndex(redis=redis)
    await arm(index, "SBIN", "under", "94")
    await arm(index, "SBIN", "dip", "97")
    await arm(index, "SBIN", "above", "101")
    # Ticks 102, 96.5, 100.5 coalesced: last 100.5, lowest 96.5.
    fired = ids(await index.tick("SBIN", Decimal("100.5"), low=Decimal("96.5")))
    assert sorted(fired) == ["above", "dip"]
    assert await redis.get("price:{SBIN}") == "100.5"
    assert await redis.hget("symbol:{SBIN}:stoploss:fired", "dip") == "96.5"
    assert await index.armed_ids("SBIN") == ["under"]


async def test_arm_and_recheck_fires_at_once_when_the_stored_price_is_already_below(
    redis: Redis,
) -> None:
    index = StopLossIndex(redis=redis)
    assert await arm(index, "SBIN", "early", "95") == []  # no price yet
    await index.tick("SBIN", Decimal("99"))
    assert await arm(index, "SBIN", "above", "98") == []
    assert await index.armed_ids("SBIN") == ["early", "above"]
    assert await arm(index, "SBIN", "breached", "99.5") == [("SBIN", ["breached"])]
    assert await index.armed_ids("SBIN") == ["early", "above"]
    assert ids(await index.fired("SBIN")) == ["breached"]


async def test_a_trigger_carries_the_run_and_tenant_its_position_was_armed_for(
    redis: Redis,
) -> None:
    index = StopLossIndex(redis=redis)
    await index.arm_and_recheck_all(
        [
            Armed("SBIN", "x", Decimal("95"), 3, "acme:desk-1"),  # a tenant may hold ':'
            Armed("SBIN", "y", Decimal("90"), 1, "globex"),
        ]
    )
    assert await redis.hgetall("symbol:{SBIN}:stoploss:runs") == {
        "x": "3 acme:desk-1",
        "y": "1 globex",
    }
    assert await index.tick("SBIN", Decimal("94")) == [Fired("x", 3, "acme:desk-1")]
    # Fired and disarmed positions leave no owner behind.
    await index.disarm_all([("SBIN", "y", Decimal("90"))])
    assert await redis.exists("symbol:{SBIN}:stoploss:runs") == 0
    # An armed entry without an owner (armed before owners were kept) still fires; its run
    # is unknown, so the caller reads the runtime.
    await redis.zadd("symbol:{SBIN}:stoploss", {f"{Decimal('93'):019.8f}:old": 93.0})
    assert await index.tick("SBIN", Decimal("92")) == [Fired("old")]
