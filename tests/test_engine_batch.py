"""The engine's batch lane and the paper broker's coalescing, seen from outside: real
redis-server, real gRPC server, real timers, the paper broker's book in Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from protos.algoplane.v1 import strategy_pb2 as pb
from server.brokers.base import BrokerOrder, BrokerOrderStatus, Side
from server.brokers.paper import PaperBroker
from server.domain import (
    Intent,
    Order,
    OrderKind,
    OrderStatus,
    Runtime,
    client_order_id,
)
from server.store import keys
from server.store.codec import to_micros
from server.store.db import Found
from server.store.queue import OrderEvent
from server.store.state import RedisState
from tests.conftest import Harness
from tests.support import RedisProcess, spec_at
from tests.test_engine import (
    PAPER_LOG,
    bought,
    eventually,
    orders_of,
    pipeline,
    runtime_of,
    start_precise,
)

PAPER_ORDERS = "{paper}:orders"
FOREIGN = "someone-else"


async def start_at(h: Harness, buy_at: float, sell_at: float, symbol: str) -> str:
    """StartStrategy over gRPC with the BUY and SELL at these epoch instants."""
    spec = spec_at(buy_at, sell_at, symbol=symbol)
    runtime = await h.stub.StartStrategy(pb.StartStrategyRequest(spec=spec), metadata=h.md())
    return runtime.strategy_id


async def sleep_until(epoch_s: float) -> None:
    await asyncio.sleep(max(0.0, epoch_s - time.time()))


async def is_bought(h: Harness, sid: str) -> bool:
    runtime = await runtime_of(h, sid)
    return (runtime.status, runtime.position) == (
        pb.STRATEGY_STATUS_RUNNING,
        pb.POSITION_BOUGHT,
    )


async def queues_drained(h: Harness) -> bool:
    """Both engine streams empty (acknowledged and deleted) with nothing pending."""
    for stream in (keys.ORDER_QUEUE, keys.EXIT_QUEUE):
        if await h.redis.xlen(stream) != 0:
            return False
        if (await h.redis.xpending(stream, keys.ENGINE_GROUP))["pending"] != 0:
            return False
    return True


async def queue_state(h: Harness) -> str:
    """For a failure message: what waits in queue:orders and what a worker has taken."""
    queued = await h.redis.xlen(keys.ORDER_QUEUE)
    taken = (await h.redis.xpending(keys.ORDER_QUEUE, keys.ENGINE_GROUP))["pending"]
    return f"queue:orders holds {queued} entries, {taken} taken by a worker"


async def armed_ids(h: Harness, symbol: str) -> list[str]:
    """The strategies in the symbol's armed stop-loss set (members are `<price>:<id>`)."""
    members = await h.redis.zrange(keys.stoploss_armed(symbol), 0, -1)
    return [str(member).split(":", 1)[1] for member in members]


async def only_buy_filled_once(h: Harness, sid: str) -> None:
    orders = await orders_of(h, sid)
    assert [(o.id, o.kind, o.status, o.attempts) for o in orders] == [
        (client_order_id(sid, 1, Intent.BUY), pb.ORDER_KIND_BUY, pb.ORDER_STATUS_FILLED, 1)
    ]


# --- the lane under a burst ------------------------------------------------------------------


async def test_burst_of_two_hundred_buys_each_placed_once_and_left_clean(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    count, symbol = 200, "BRST"
    # The production default: 4 order workers taking 64 events at a time.
    async with pipeline(redis_proc, tmp_path, exec_concurrency=256) as h:
        await h.redis.set(keys.price(symbol), "250.5")
        buy_at = time.time() + 1.5
        spec = spec_at(buy_at, buy_at + 120, symbol=symbol)
        started = await asyncio.gather(
            *(
                h.stub.StartStrategy(pb.StartStrategyRequest(spec=spec), metadata=h.md())
                for _ in range(count)
            )
        )
        ids = {r.strategy_id for r in started}
        assert len(ids) == count

        async def all_placed() -> bool:
            return int(await h.redis.llen(PAPER_LOG)) >= count

        await eventually(all_placed, timeout_s=10)
        await eventually(lambda: queues_drained(h), timeout_s=5)
        await asyncio.sleep(0.3)  # a duplicate order or a late redelivery would show up here

        log = await h.redis.lrange(PAPER_LOG, 0, -1)
        assert len(log) == count == len(set(log))
        assert sorted(log) == sorted(client_order_id(sid, 1, Intent.BUY) for sid in ids)
        assert await h.redis.hlen(PAPER_ORDERS) == count
        assert await queues_drained(h)

        armed = await armed_ids(h, symbol)
        assert len(armed) == count
        assert set(armed) == ids
        assert await h.redis.keys("lock_state:*") == []

        runtimes = await asyncio.gather(*(runtime_of(h, sid) for sid in ids))
        assert {(r.status, r.position, r.entry_price) for r in runtimes} == {
            (pb.STRATEGY_STATUS_RUNNING, pb.POSITION_BOUGHT, "250.5")
        }
        await asyncio.gather(*(only_buy_filled_once(h, sid) for sid in ids))


# --- a lock held elsewhere -------------------------------------------------------------------


async def test_event_whose_lock_is_held_elsewhere_completes_once_it_is_released(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    symbol = "LOCKD"
    # Several order workers, so however the two events are split into reads neither waits
    # behind the other (see the next test for one worker).
    async with pipeline(redis_proc, tmp_path, exec_concurrency=256) as h:
        await h.redis.set(keys.price(symbol), "120")
        buy_at = time.time() + 1.5
        a = await start_at(h, buy_at, buy_at + 120, symbol)
        b = await start_at(h, buy_at, buy_at + 120, symbol)
        await sleep_until(buy_at - 0.3)
        held_at = time.monotonic()
        assert await h.redis.set(keys.lock_state(a), FOREIGN, px=3000, nx=True)

        await bought(h, b, timeout_s=buy_at + 2.0 - time.time())
        # B went through while A's lock is still someone else's: A waits, it is not dropped.
        assert await h.redis.get(keys.lock_state(a)) == FOREIGN
        assert not await is_bought(h, a)
        assert await h.redis.lrange(PAPER_LOG, 0, -1) == [client_order_id(b, 1, Intent.BUY)]

        await bought(h, a, timeout_s=4)
        assert time.monotonic() - held_at >= 2.9  # not before the foreign lock expired
        await eventually(lambda: queues_drained(h), timeout_s=3)
        assert sorted(await h.redis.lrange(PAPER_LOG, 0, -1)) == sorted(
            client_order_id(sid, 1, Intent.BUY) for sid in (a, b)
        )
        for sid in (a, b):
            await only_buy_filled_once(h, sid)
        assert await h.redis.keys("lock_state:*") == []


async def test_event_waiting_for_a_lock_does_not_hold_up_later_events(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """B is due 0.5 s after A; A's lock is held elsewhere for 3 s. B has nothing to do with
    A, so it should be bought on time. (The test pipeline's exec_concurrency of 8 was 8
    workers before the batch lane; it is one order worker now.)"""
    symbol = "HOLB"
    async with pipeline(redis_proc, tmp_path) as h:  # exec_concurrency=8
        await h.redis.set(keys.price(symbol), "120")
        a_at = time.time() + 1.5
        a = await start_at(h, a_at, a_at + 120, symbol)
        b = await start_at(h, a_at + 0.5, a_at + 120, symbol)
        await sleep_until(a_at - 0.3)
        assert await h.redis.set(keys.lock_state(a), FOREIGN, px=3000, nx=True)

        try:
            await bought(h, b, timeout_s=a_at + 1.8 - time.time())
        except AssertionError:
            waited = await h.redis.pttl(keys.lock_state(a))
            pytest.fail(
                f"B was not bought 1.3 s after its buy_time while A's lock was held elsewhere "
                f"(A's foreign lock still had {waited} ms to live; {await queue_state(h)}): "
                f"a worker waiting for one strategy's lock takes no further events"
            )
        await bought(h, a, timeout_s=4)
        for sid in (a, b):
            await only_buy_filled_once(h, sid)


async def test_redis_refusing_the_batch_locks_does_not_stop_the_engine(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """Redis refuses writes (out of memory) right when a batch takes its locks, for 0.3 s.
    The per-event path retries through such a blip; the engine should go on taking events."""
    symbol = "OOMB"
    async with pipeline(redis_proc, tmp_path) as h:  # exec_concurrency=8: one order worker
        await h.redis.set(keys.price(symbol), "120")
        first = await start_precise(h, buy_in=60, hold=60, symbol=symbol)
        now = to_micros(datetime.now(UTC))
        event = OrderEvent(
            first, "tenant-a", 1, Intent.BUY, client_order_id(first, 1, Intent.BUY), now, now
        )
        try:
            # One transaction: the worker reads the event only once writes are refused, so
            # its SET NX for the lock is the first write that fails (XREADGROUP still works).
            async with h.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(keys.ORDER_QUEUE, dict(event.fields().items()))
                pipe.config_set("maxmemory", 1)
                await pipe.execute()
            await asyncio.sleep(0.3)
        finally:
            await h.redis.config_set("maxmemory", 0)

        later = await start_precise(h, buy_in=1.0, hold=60, symbol=symbol)
        try:
            await bought(h, later, timeout_s=4)
        except AssertionError:
            first_status = pb.StrategyStatus.Name((await runtime_of(h, first)).status)
            pytest.fail(
                f"a BUY due 1 s after a 0.3 s Redis write outage was not bought within 3 s: "
                f"{await queue_state(h)} (the first strategy is {first_status}); no worker "
                f"reads the queue any more"
            )
        await bought(h, first, timeout_s=3)
        for sid in (first, later):
            await only_buy_filled_once(h, sid)


# --- a mixed batch ---------------------------------------------------------------------------


async def test_batch_mixing_a_sell_a_buy_and_a_malformed_entry(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    symbol = "MIXD"
    async with pipeline(redis_proc, tmp_path) as h:  # one order worker, 8 events a read
        await h.redis.set(keys.price(symbol), "200")
        x = await start_precise(h, buy_in=0.8, hold=60, symbol=symbol)
        y = await start_precise(h, buy_in=60, hold=60, symbol=symbol)
        await bought(h, x)
        await h.redis.set(keys.price(symbol), "210")

        # X's SELL and Y's BUY due at one instant, with a malformed entry (Y's id, no run,
        # intent or order id) in front: one transaction, so the worker reads all three at once.
        now = to_micros(datetime.now(UTC))
        sell_x = OrderEvent(
            x, "tenant-a", 1, Intent.SELL, client_order_id(x, 1, Intent.SELL), now, now
        )
        buy_y = OrderEvent(
            y, "tenant-a", 1, Intent.BUY, client_order_id(y, 1, Intent.BUY), now, now
        )
        async with h.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.ORDER_QUEUE, {"strategy_id": y, "tenant": "tenant-a"})
            pipe.xadd(keys.ORDER_QUEUE, dict(sell_x.fields().items()))
            pipe.xadd(keys.ORDER_QUEUE, dict(buy_y.fields().items()))
            malformed, _, _ = await pipe.execute()

        async def x_sold() -> bool:
            runtime = await runtime_of(h, x)
            return (runtime.status, runtime.position) == (
                pb.STRATEGY_STATUS_COMPLETED,
                pb.POSITION_SOLD,
            )

        await eventually(x_sold, timeout_s=5)
        await bought(h, y, timeout_s=5)
        await eventually(lambda: queues_drained(h), timeout_s=3)

        # The malformed entry was acknowledged and deleted, not left pending.
        assert await h.redis.xrange(keys.ORDER_QUEUE, malformed, malformed) == []
        pending = await h.redis.xpending_range(
            keys.ORDER_QUEUE, keys.ENGINE_GROUP, min="-", max="+", count=10
        )
        assert pending == []

        log = await h.redis.lrange(PAPER_LOG, 0, -1)
        assert log[0] == client_order_id(x, 1, Intent.BUY)
        assert sorted(log[1:]) == sorted([sell_x.order_id, buy_y.order_id])
        x_runtime, y_runtime = await runtime_of(h, x), await runtime_of(h, y)
        assert (x_runtime.entry_price, x_runtime.exit_price) == ("200", "210")
        assert y_runtime.entry_price == "210"
        assert [(o.kind, o.status, o.attempts) for o in await orders_of(h, x)] == [
            (pb.ORDER_KIND_BUY, pb.ORDER_STATUS_FILLED, 1),
            (pb.ORDER_KIND_SELL, pb.ORDER_STATUS_FILLED, 1),
        ]
        await only_buy_filled_once(h, y)
        assert await armed_ids(h, symbol) == [y]  # X's disarmed on exit
        assert await h.redis.keys("lock_state:*") == []


# --- the paper broker's coalescing ----------------------------------------------------------


async def test_paper_orders_placed_together_fill_per_symbol(state: RedisState) -> None:
    broker = PaperBroker(redis=state.client)
    await state.client.set(keys.price("PRC"), "101.25")
    await state.client.delete(keys.price("NOPX"))
    calls = [(f"c-{n}", "PRC" if n % 2 else "NOPX") for n in range(50)]

    replies = await asyncio.gather(
        *(broker.place_order(cid, symbol, Side.BUY, 5) for cid, symbol in calls)
    )

    for (cid, symbol), reply in zip(calls, replies, strict=True):
        assert reply.client_order_id == cid
        if symbol == "PRC":
            assert reply.status is BrokerOrderStatus.FILLED
            assert reply.fill_price == Decimal("101.25")
            assert reply.broker_order_id.startswith("paper-")
        else:
            assert (reply.status, reply.reason, reply.fill_price) == (
                BrokerOrderStatus.REJECTED,
                "no price for NOPX",
                None,
            )
        assert await broker.get_order(cid) == reply
    assert len({r.broker_order_id for r in replies if r.broker_order_id}) == 25
    log = await state.client.lrange(PAPER_LOG, 0, -1)
    assert sorted(log) == sorted(cid for cid, _ in calls)
    assert await state.client.hlen(PAPER_ORDERS) == 50


async def test_paper_duplicates_placed_together_are_one_order(state: RedisState) -> None:
    broker = PaperBroker(redis=state.client)
    await state.client.set(keys.price("PRC"), "7")
    ids = ["dup-a", "solo", "dup-a", "dup-b", "dup-a", "dup-b"]

    replies = await asyncio.gather(*(broker.place_order(cid, "PRC", Side.BUY, 1) for cid in ids))

    by_id: dict[str, set[BrokerOrder]] = {}
    for cid, reply in zip(ids, replies, strict=True):
        assert reply.status is BrokerOrderStatus.FILLED and reply.client_order_id == cid
        by_id.setdefault(cid, set()).add(reply)
    assert {cid: len(seen) for cid, seen in by_id.items()} == {"dup-a": 1, "solo": 1, "dup-b": 1}
    assert len({reply.broker_order_id for reply in replies}) == 3
    assert sorted(await state.client.lrange(PAPER_LOG, 0, -1)) == ["dup-a", "dup-b", "solo"]


async def test_paper_caller_that_gives_up_does_not_break_the_others(state: RedisState) -> None:
    broker = PaperBroker(redis=state.client)
    await state.client.set(keys.price("PRC"), "42")
    tasks = [
        asyncio.create_task(broker.place_order(f"o-{n}", "PRC", Side.SELL, 3)) for n in range(10)
    ]
    # Timed out at once: on Python 3.11 before its first step (it never reaches the book), on
    # 3.12+ at its first await (booked, like tasks[3] below).
    never = asyncio.create_task(
        asyncio.wait_for(broker.place_order("never", "PRC", Side.SELL, 3), 0)
    )
    await asyncio.sleep(0)  # every task has booked its order; the flush has not run yet
    tasks[3].cancel()  # gave up after booking, before the reply

    results = await asyncio.gather(*tasks, never, return_exceptions=True)

    assert isinstance(results[3], asyncio.CancelledError)
    assert isinstance(results[-1], TimeoutError)
    for n, result in enumerate(results[:-1]):
        if n == 3:
            continue
        assert isinstance(result, BrokerOrder), result
        assert (result.client_order_id, result.status, result.fill_price) == (
            f"o-{n}",
            BrokerOrderStatus.FILLED,
            Decimal("42"),
        )
    # The one that gave up after booking took effect, as with a real broker after a timeout:
    # asked again, the book has it.
    found = await broker.get_order("o-3")
    assert found is not None and found.status is BrokerOrderStatus.FILLED
    expected = [f"o-{n}" for n in range(10)]
    never_booked = await broker.get_order("never")
    if never_booked is not None:
        assert never_booked.status is BrokerOrderStatus.FILLED
        expected.append("never")
    assert sorted(await state.client.lrange(PAPER_LOG, 0, -1)) == sorted(expected)
    # The broker still works for the next turn's callers.
    again = await broker.place_order("after", "PRC", Side.BUY, 1)
    assert again.status is BrokerOrderStatus.FILLED


# --- a commit that lands between the lock and the lane's transaction ---------------------------


async def test_a_commit_just_before_the_lanes_transaction_is_not_overwritten(
    redis_proc: RedisProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder that released the lock just before the lane took it may commit after the
    lane has its lock and before its DB hop: here it recorded the BUY as skipped (an order
    row, the runtime unchanged). The lane decides from what its own transaction reads, so its
    intent must not replace that row and place the order; the event goes to the per-event
    path, which reads again."""
    symbol = "STALE"
    async with pipeline(redis_proc, tmp_path) as h:
        await h.redis.set(keys.price(symbol), "120")
        sid = await start_precise(h, buy_in=60, hold=60, symbol=symbol)
        now = to_micros(datetime.now(UTC))
        buy = OrderEvent(
            sid, "tenant-a", 1, Intent.BUY, client_order_id(sid, 1, Intent.BUY), now, now
        )
        db = h.app._db
        assert db is not None
        read_and_save = db.read_and_save_intents
        slipped_in: list[str] = []

        async def another_holder_commits_first(
            pairs: list[tuple[str, str]],
            decide: Callable[[list[Found]], list[tuple[Runtime, list[tuple[Order, int]]] | None]],
        ) -> list[bool | None]:
            if not slipped_in:
                row, _ = (await db.find_many(pairs))[0]
                assert row is not None
                strategy = row[0]
                skipped = Order(
                    id=buy.order_id,
                    tenant=strategy.tenant,
                    strategy_id=sid,
                    symbol=symbol,
                    kind=OrderKind.BUY,
                    status=OrderStatus.SKIPPED,
                    quantity=strategy.spec.quantity,
                    attempts=0,
                    created_at=datetime.now(UTC),
                    updated_at=datetime.now(UTC),
                    error="skipped by another holder",
                )
                assert await db.save(None, [(skipped, 1)])
                slipped_in.append(buy.order_id)
            return await read_and_save(pairs, decide)

        monkeypatch.setattr(db, "read_and_save_intents", another_holder_commits_first)
        await h.redis.xadd(keys.ORDER_QUEUE, dict(buy.fields().items()))
        await eventually(lambda: queues_drained(h), timeout_s=5)
        assert slipped_in == [buy.order_id]

        await asyncio.sleep(0.3)
        assert await h.redis.llen(PAPER_LOG) == 0  # nothing reached the broker
        assert [(o.id, o.status, o.error) for o in await orders_of(h, sid)] == [
            (buy.order_id, pb.ORDER_STATUS_SKIPPED, "skipped by another holder")
        ]
        runtime = await runtime_of(h, sid)
        assert (runtime.status, runtime.position) == (
            pb.STRATEGY_STATUS_SCHEDULED,
            pb.POSITION_NONE,
        )
