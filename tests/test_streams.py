"""StreamRuntime and StreamOrders: an event per change, resume with after_event_id (no gap,
no duplicate), filters, bad positions, and order events written the way the engine will."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import grpc
import pytest
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from server.domain import Order, OrderKind, OrderStatus
from server.store.codec import order_to_flat
from server.store.db import Database
from server.store.state import RedisState, connect
from tests.conftest import Harness, make_settings, start_harness, stop_harness
from tests.support import RedisProcess, aio_stub, auth, blocked_stream_readers, rpc_code, spec

EVENT_TIMEOUT_S = 5.0
TENANT = "tenant-a"

T = TypeVar("T")
# grpc.aio's end-of-stream marker (the type stubs do not declare it).
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]

if TYPE_CHECKING:
    from protos.algoplane.v1.strategy_pb2_grpc import StrategyServiceAsyncStub as AsyncStub


async def next_message(call: grpc.aio.UnaryStreamCall[Any, T]) -> T:
    message = await asyncio.wait_for(call.read(), EVENT_TIMEOUT_S)
    assert message is not EOF, "the stream ended"
    return message  # type: ignore[return-value]


async def take(call: grpc.aio.UnaryStreamCall[Any, T], count: int) -> list[T]:
    return [await next_message(call) for _ in range(count)]


def id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def assert_increasing(event_ids: list[str]) -> None:
    keys = [id_key(e) for e in event_ids]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys), "an event id repeats"


def runtime_stream(
    stub: AsyncStub, *, strategy_id: str = "", after: str = ""
) -> grpc.aio.UnaryStreamCall[pb.StreamRuntimeRequest, pb.RuntimeEvent]:
    request = pb.StreamRuntimeRequest(strategy_id=strategy_id, after_event_id=after)
    return stub.StreamRuntime(request, metadata=auth(TENANT))


def order_stream(
    stub: AsyncStub, *, strategy_id: str = "", after: str = ""
) -> grpc.aio.UnaryStreamCall[pb.StreamOrdersRequest, pb.OrderEvent]:
    request = pb.StreamOrdersRequest(strategy_id=strategy_id, after_event_id=after)
    return stub.StreamOrders(request, metadata=auth(TENANT))


async def start_new(stub: AsyncStub, symbol: str = "SBIN") -> pb.Runtime:
    return await stub.StartStrategy(
        pb.StartStrategyRequest(spec=spec(symbol=symbol)), metadata=auth(TENANT)
    )


async def start_stored(stub: AsyncStub, strategy_id: str) -> pb.Runtime:
    return await stub.StartStrategy(
        pb.StartStrategyRequest(strategy_id=strategy_id), metadata=auth(TENANT)
    )


async def stop(stub: AsyncStub, strategy_id: str) -> pb.Runtime:
    return await stub.StopStrategy(
        pb.StopStrategyRequest(strategy_id=strategy_id), metadata=auth(TENANT)
    )


async def create(stub: AsyncStub, symbol: str = "SBIN") -> pb.Strategy:
    return await stub.CreateStrategy(
        pb.CreateStrategyRequest(spec=spec(symbol=symbol)), metadata=auth(TENANT)
    )


async def get_runtime(stub: AsyncStub, strategy_id: str) -> pb.Runtime:
    return await stub.GetRuntime(
        pb.GetRuntimeRequest(strategy_id=strategy_id), metadata=auth(TENANT)
    )


async def test_start_and_stop_each_deliver_the_runtime(server: Harness) -> None:
    stub = aio_stub(server.channel)
    stream = runtime_stream(stub)
    try:
        await blocked_stream_readers(server.redis, 1)

        started = await start_new(stub)
        event = await next_message(stream)
        assert event.runtime == started == await get_runtime(stub, started.strategy_id)
        assert event.runtime.status == pb.STRATEGY_STATUS_SCHEDULED
        assert event.runtime.version == 1

        stopped = await stop(stub, started.strategy_id)
        second = await next_message(stream)
        assert second.runtime == stopped == await get_runtime(stub, started.strategy_id)
        assert second.runtime.status == pb.STRATEGY_STATUS_STOPPED
        assert second.runtime.version == 2

        restarted = await start_stored(stub, started.strategy_id)
        third = await next_message(stream)
        assert third.runtime == restarted == await get_runtime(stub, started.strategy_id)
        assert third.runtime.version == 3

        assert_increasing([event.event_id, second.event_id, third.event_id])
    finally:
        stream.cancel()


async def test_resume_gets_exactly_the_missed_events(server: Harness) -> None:
    stub = aio_stub(server.channel)
    first = runtime_stream(stub)
    try:
        await blocked_stream_readers(server.redis, 1)
        before = [await start_new(stub, symbol) for symbol in ("AAA", "BBB", "CCC")]
        before += [await stop(stub, before[0].strategy_id), await stop(stub, before[1].strategy_id)]
        seen = await take(first, len(before))
    finally:
        first.cancel()
    assert [e.runtime for e in seen] == before
    assert_increasing([e.event_id for e in seen])

    # While nobody listens.
    missed = [
        await stop(stub, before[2].strategy_id),
        await start_stored(stub, before[0].strategy_id),
        await start_new(stub, "DDD"),
    ]

    resumed = runtime_stream(stub, after=seen[-1].event_id)
    try:
        replay = await take(resumed, len(missed))
        assert [e.runtime for e in replay] == missed
        ids = [e.event_id for e in seen + replay]
        assert_increasing(ids)
        # Nothing else is queued before the next live change: no duplicate, no extra.
        live = await stop(stub, missed[-1].strategy_id)
        after = await next_message(resumed)
        assert after.runtime == live
        assert id_key(after.event_id) > id_key(replay[-1].event_id)
    finally:
        resumed.cancel()

    # Resuming from the middle replays the same events with the same ids.
    middle = runtime_stream(stub, after=seen[1].event_id)
    try:
        again = await take(middle, len(seen) - 2 + len(missed) + 1)
    finally:
        middle.cancel()
    assert [e.event_id for e in again] == [e.event_id for e in seen[2:] + replay + [after]]
    assert [e.runtime for e in again] == [e.runtime for e in seen[2:] + replay + [after]]


async def test_empty_after_event_id_starts_now(server: Harness) -> None:
    stub = aio_stub(server.channel)
    old = await start_new(stub, "OLD")
    await stop(stub, old.strategy_id)

    stream = runtime_stream(stub)
    try:
        await blocked_stream_readers(server.redis, 1)
        new = await start_new(stub, "NEW")
        event = await next_message(stream)
        assert event.runtime == new
    finally:
        stream.cancel()


async def test_strategy_filter_yields_only_that_strategy(server: Harness) -> None:
    stub = aio_stub(server.channel)
    mine, other = await create(stub, "MINE"), await create(stub, "OTHER")
    stream = runtime_stream(stub, strategy_id=mine.id)
    try:
        await blocked_stream_readers(server.redis, 1)
        await start_stored(stub, other.id)
        started = await start_stored(stub, mine.id)
        await stop(stub, other.id)
        stopped = await stop(stub, mine.id)
        events = await take(stream, 2)
    finally:
        stream.cancel()
    assert [e.runtime for e in events] == [started, stopped]

    # The filter holds on resume too.
    resumed = runtime_stream(stub, strategy_id=other.id, after=events[0].event_id)
    try:
        [event] = await take(resumed, 1)
    finally:
        resumed.cancel()
    assert event.runtime.strategy_id == other.id
    assert event.runtime.status == pb.STRATEGY_STATUS_STOPPED


async def test_two_subscribers_share_one_reader_and_both_see_every_event(
    server: Harness,
) -> None:
    stub = aio_stub(server.channel)
    one = runtime_stream(stub)
    await blocked_stream_readers(server.redis, 1)
    first = await start_new(stub, "X0")
    [seen] = await take(one, 1)
    assert seen.runtime == first
    # Resuming after the event `one` saw pins `two` to the same position without a race.
    two = runtime_stream(stub, after=seen.event_id)
    try:
        changes = []
        for symbol in ("X1", "X2", "X3"):
            started = await start_new(stub, symbol)
            changes += [started, await stop(stub, started.strategy_id)]
        got_one, got_two = await asyncio.gather(take(one, 6), take(two, 6))
        # Both are reading: one tenant's subscribers share one blocking XREAD.
        await asyncio.sleep(0.1)
        clients = await server.redis.client_list()
        assert sum(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in clients) == 1
    finally:
        one.cancel()
        two.cancel()
    assert [e.runtime for e in got_one] == changes
    assert got_one == got_two
    await blocked_stream_readers(server.redis, 0)  # the last one out stops the reader


StreamKind = Literal["runtime", "orders"]


async def first_read_error(stub: AsyncStub, kind: StreamKind, after: str) -> grpc.aio.AioRpcError:
    call: grpc.aio.UnaryStreamCall[Any, Any] = (
        runtime_stream(stub, after=after) if kind == "runtime" else order_stream(stub, after=after)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(call.read(), EVENT_TIMEOUT_S)
    return err.value


@pytest.mark.parametrize("kind", ["runtime", "orders"])
@pytest.mark.parametrize("after", ["abc", "12-x", "-1", "1-2-3", " 1-0"])
async def test_malformed_after_event_id_is_invalid_argument(
    server: Harness, kind: StreamKind, after: str
) -> None:
    error = await first_read_error(aio_stub(server.channel), kind, after)
    assert rpc_code(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert "after_event_id" in (error.details() or "")


@pytest.mark.parametrize("kind", ["runtime", "orders"])
async def test_after_event_id_ahead_of_the_stream_is_out_of_range(
    server: Harness, kind: StreamKind
) -> None:
    stub = aio_stub(server.channel)
    # An empty stream: any real position is ahead of it.
    error = await first_read_error(stub, kind, "5-0")
    assert rpc_code(error) == grpc.StatusCode.OUT_OF_RANGE

    stream = runtime_stream(stub)
    try:
        await blocked_stream_readers(server.redis, 1)
        await start_new(stub)
        event = await next_message(stream)
    finally:
        stream.cancel()
    ms, seq = id_key(event.event_id)
    for ahead in (f"{ms}-{seq + 1}", f"{ms + 60_000}-0"):
        error = await first_read_error(stub, "runtime", ahead)
        assert rpc_code(error) == grpc.StatusCode.OUT_OF_RANGE
        assert "after_event_id" in (error.details() or "")


async def test_trimmed_history_is_out_of_range(redis_proc: RedisProcess, tmp_path: Path) -> None:
    flush = Redis.from_url(redis_proc.url)
    await flush.flushall()
    await flush.aclose()
    harness = await start_harness(
        make_settings(redis_proc.url, tmp_path / "data", stream_maxlen=100)
    )
    stub = aio_stub(harness.channel)
    stream = runtime_stream(stub)
    try:
        await blocked_stream_readers(harness.redis, 1)
        strategy = await start_new(stub)
        changes = [strategy]
        for _ in range(125):  # 251 events: well past the cap, so the oldest are trimmed
            changes.append(await stop(stub, strategy.strategy_id))
            changes.append(await start_stored(stub, strategy.strategy_id))
        events = await take(stream, len(changes))
        assert [e.runtime for e in events] == changes
    finally:
        stream.cancel()
    try:
        error = await first_read_error(stub, "runtime", events[0].event_id)
        assert rpc_code(error) == grpc.StatusCode.OUT_OF_RANGE
        assert "after_event_id" in (error.details() or "")

        # A recent position is still kept and resumes exactly.
        recent = runtime_stream(stub, after=events[-6].event_id)
        try:
            tail = await take(recent, 5)
        finally:
            recent.cancel()
        assert [e.event_id for e in tail] == [e.event_id for e in events[-5:]]
    finally:
        await stop_harness(harness)


@dataclass
class EngineWriter:
    """Writes order events the way the execution engine does: DB row, then stream event."""

    db: Database
    state: RedisState

    async def write(self, order: Order, run: int = 1) -> str:
        assert await self.db.save(None, [(order, run)])
        return await self.state.append_event("orders", order.tenant, order_to_flat(order))


@pytest.fixture
async def engine(server: Harness) -> AsyncIterator[EngineWriter]:
    settings = server.settings
    db = Database(settings.effective_database_url)
    state = RedisState(
        client=connect(settings.redis_url, timeout_s=2),
        stream_client=connect(settings.redis_url, timeout_s=4),
        stream_maxlen=settings.stream_maxlen,
    )
    try:
        yield EngineWriter(db, state)
    finally:
        await state.close()
        await db.close()


T0 = datetime(2031, 3, 4, 9, 15, 0, 123456, tzinfo=UTC)


def order(strategy: pb.Strategy, kind: OrderKind, **changes: Any) -> Order:
    values: dict[str, Any] = {
        "id": f"{strategy.id}-1-{kind.value}",
        "tenant": TENANT,
        "strategy_id": strategy.id,
        "symbol": strategy.spec.symbol,
        "kind": kind,
        "status": OrderStatus.PENDING,
        "quantity": strategy.spec.quantity,
        "attempts": 0,
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(changes)
    return Order(**values)


def expected_proto(o: Order) -> pb.Order:
    message = pb.Order(
        id=o.id,
        strategy_id=o.strategy_id,
        symbol=o.symbol,
        kind=pb.OrderKind.Value("ORDER_KIND_" + o.kind.value),
        status=pb.OrderStatus.Value("ORDER_STATUS_" + o.status.value),
        quantity=o.quantity,
        fill_price="" if o.fill_price is None else str(o.fill_price),
        broker_order_id=o.broker_order_id,
        attempts=o.attempts,
        error=o.error,
    )
    message.created_at.FromDatetime(o.created_at)
    message.updated_at.FromDatetime(o.updated_at)
    return message


async def test_order_events_stream_and_list(server: Harness, engine: EngineWriter) -> None:
    stub = aio_stub(server.channel)
    mine, other = await create(stub, "SBIN"), await create(stub, "INFY")
    later = T0.replace(second=1)
    buy = [
        order(mine, OrderKind.BUY),
        order(mine, OrderKind.BUY, status=OrderStatus.SUBMITTED, attempts=1, updated_at=later),
        order(
            mine,
            OrderKind.BUY,
            status=OrderStatus.FILLED,
            attempts=1,
            broker_order_id="BRK-42",
            fill_price=Decimal("101.25"),
            updated_at=later.replace(second=2),
        ),
    ]
    elsewhere = order(other, OrderKind.BUY, status=OrderStatus.REJECTED, error="no margin")

    stream = order_stream(stub, strategy_id=mine.id)
    try:
        await blocked_stream_readers(server.redis, 1)
        ids = [await engine.write(buy[0]), await engine.write(buy[1])]
        await engine.write(elsewhere)
        ids.append(await engine.write(buy[2]))
        events = await take(stream, 3)
    finally:
        stream.cancel()
    assert [e.event_id for e in events] == ids
    assert [e.order for e in events] == [expected_proto(o) for o in buy]
    filled = events[-1].order
    assert filled.status == pb.ORDER_STATUS_FILLED
    assert filled.fill_price == "101.25"
    assert filled.broker_order_id == "BRK-42"
    assert filled.created_at.nanos == 123456000

    listed = await stub.ListOrders(pb.ListOrdersRequest(strategy_id=mine.id), metadata=auth(TENANT))
    assert list(listed.orders) == [expected_proto(buy[-1])]
    everything = await stub.ListOrders(pb.ListOrdersRequest(), metadata=auth(TENANT))
    assert sorted(o.id for o in everything.orders) == sorted([buy[-1].id, elsewhere.id])
    assert expected_proto(elsewhere) in everything.orders

    # While disconnected: the SELL goes out and fills. Resume gets exactly those two.
    sell = [
        order(mine, OrderKind.SELL, created_at=later, updated_at=later),
        order(
            mine,
            OrderKind.SELL,
            created_at=later,
            updated_at=later,
            status=OrderStatus.FILLED,
            fill_price=Decimal("102.5"),
            attempts=1,
        ),
    ]
    missed = [await engine.write(o) for o in sell]
    resumed = order_stream(stub, after=ids[-1])
    try:
        replay = await take(resumed, 2)
        assert [e.event_id for e in replay] == missed
        assert [e.order for e in replay] == [expected_proto(o) for o in sell]
        live = order(other, OrderKind.SELL)
        live_id = await engine.write(live)
        assert (await next_message(resumed)).event_id == live_id
    finally:
        resumed.cancel()

    listed = await stub.ListOrders(pb.ListOrdersRequest(strategy_id=mine.id), metadata=auth(TENANT))
    assert list(listed.orders) == [expected_proto(buy[-1]), expected_proto(sell[-1])]


async def test_headers_announce_the_start_position_before_any_event(server: Harness) -> None:
    stub = aio_stub(server.channel)
    before = await start_new(stub, "H0")  # the stream is not empty
    quiet = runtime_stream(stub)
    try:
        headers = dict(await asyncio.wait_for(quiet.initial_metadata(), 5))  # no event yet
        start_after = str(headers["algoplane-start-after"])
        last = (await server.redis.xinfo_stream("stream:runtime:{tenant-a}"))["last-generated-id"]
        assert start_after == last
        # A client that drops before any event resumes there and misses nothing.
        quiet.cancel()
        changes = [await stop(stub, before.strategy_id), await start_new(stub, "H1")]
        resumed = runtime_stream(stub, after=start_after)
        try:
            got = await take(resumed, 2)
        finally:
            resumed.cancel()
        assert [e.runtime for e in got] == changes
    finally:
        quiet.cancel()
