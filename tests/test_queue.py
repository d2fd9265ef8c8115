"""The order queue on a real Redis: enqueue-and-take, the stop-loss exit's one round trip."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from server.domain import Intent, client_order_id
from server.store import keys
from server.store.locks import StrategyLocks
from server.store.queue import OrderEvent, OrderQueue


def exit_of(strategy_id: str) -> OrderEvent:
    return OrderEvent(
        strategy_id=strategy_id,
        tenant="acme",
        run=1,
        intent=Intent.STOPLOSS,
        order_id=client_order_id(strategy_id, 1, Intent.STOPLOSS),
        due_at_us=1,
        fired_at_us=1,
        tick_at_us=1,
    )


async def pending_for(redis: Redis) -> dict[str, str]:
    """Entry id -> the consumer holding it, on the exits stream."""
    rows = await redis.xpending_range(keys.EXIT_QUEUE, keys.ENGINE_GROUP, "-", "+", 100)
    return {str(row["message_id"]): str(row["consumer"]) for row in rows}


async def test_enqueue_and_take_holds_the_new_exit_and_its_lock_in_one_call(redis: Redis) -> None:
    queue = OrderQueue(redis=redis, consumer="here")
    await queue.ensure_group()
    locks = StrategyLocks(redis=redis, ttl_ms=5000)
    tokens: list[str] = []

    def lock(pipe: Pipeline) -> None:
        tokens.append(locks.request(pipe, "s1"))

    taken, (locked,) = await queue.enqueue_and_take(exit_of("s1"), alongside=lock)

    assert taken is not None and locked
    assert taken.stream == keys.EXIT_QUEUE
    assert taken.fields["order_id"] == exit_of("s1").order_id
    assert await pending_for(redis) == {taken.entry_id: "here"}
    assert await redis.get(keys.lock_state("s1")) == tokens[0]
    # No worker gets it again; a second enqueue of the intent adds and takes nothing.
    assert await OrderQueue(redis=redis, consumer="worker").take(10, 10) == []
    assert await queue.enqueue_and_take(exit_of("s1")) == (None, [])
    assert int(await redis.xlen(keys.EXIT_QUEUE)) == 1


async def test_an_older_exit_waiting_is_taken_first_and_the_new_one_waits(redis: Redis) -> None:
    queue = OrderQueue(redis=redis, consumer="here")
    await queue.ensure_group()
    older = await queue.enqueue(exit_of("s1"))  # no worker has taken it yet

    taken, _ = await queue.enqueue_and_take(exit_of("s2"))

    assert taken is not None and taken.entry_id == older
    assert taken.fields["strategy_id"] == "s1"
    left = await OrderQueue(redis=redis, consumer="worker").take(10, 10)
    assert [d.fields["strategy_id"] for d in left] == ["s2"]


async def test_a_taken_exit_whose_taker_died_is_reclaimed_by_another_process(
    redis: Redis,
) -> None:
    dead = OrderQueue(redis=redis, consumer="dead")
    await dead.ensure_group()
    taken, _ = await dead.enqueue_and_take(exit_of("s1"))
    assert taken is not None

    other = OrderQueue(redis=redis, consumer="other")
    reclaimed = await other.reclaim(min_idle_ms=0)

    assert [(d.entry_id, d.deliveries) for d in reclaimed] == [(taken.entry_id, 2)]
    assert await pending_for(redis) == {taken.entry_id: "other"}


async def test_without_the_group_the_exit_is_queued_for_the_workers(redis: Redis) -> None:
    queue = OrderQueue(redis=redis, consumer="here")  # Redis lost its data: no group yet

    taken, _ = await queue.enqueue_and_take(exit_of("s1"))

    assert taken is None
    await queue.ensure_group()  # the engine recreates it, from the stream's start
    left = await OrderQueue(redis=redis, consumer="worker").take(10, 10)
    assert [d.fields["strategy_id"] for d in left] == ["s1"]


async def test_taken_here_finds_only_this_consumers_exit_of_that_order(redis: Redis) -> None:
    here = OrderQueue(redis=redis, consumer="here")
    there = OrderQueue(redis=redis, consumer="there")
    await here.ensure_group()
    mine, theirs = await here.enqueue_and_take(exit_of("s1"))
    assert mine is not None and theirs == []
    taken_there, _ = await there.enqueue_and_take(exit_of("s2"))
    assert taken_there is not None

    found = await here.taken_here(exit_of("s1").order_id)

    assert found is not None
    assert (found.stream, found.entry_id, found.fields) == (
        mine.stream,
        mine.entry_id,
        mine.fields,
    )
    assert found.deliveries == 1
    assert await here.taken_here(exit_of("s2").order_id) is None  # held by another process
    assert await there.taken_here(exit_of("s1").order_id) is None
    await here.ack(found)
    assert await here.taken_here(exit_of("s1").order_id) is None
