"""StreamRuntimeBatches and StreamOrdersBatches: the events of StreamRuntime/StreamOrders,
in the same order with the same ids, but the events waiting when the server writes go in
one message (at most 256); resume, filters, tenants and bad input as the single streams."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest

from protos.algoplane.v1 import strategy_pb2 as pb
from server.api.servicer import BATCH_MAX
from server.domain import OrderKind, OrderStatus
from tests.conftest import Harness
from tests.support import aio_stub, auth, blocked_stream_readers, rpc_code
from tests.test_streams import (
    TENANT,
    EngineWriter,
    create,
    engine,  # noqa: F401 - the fixture
    expected_proto,
    next_message,
    order,
    order_stream,
    runtime_stream,
    start_new,
    stop,
    take,
)

if TYPE_CHECKING:
    from protos.algoplane.v1.strategy_pb2_grpc import StrategyServiceAsyncStub as AsyncStub

OTHER = "tenant-b"


def runtime_batches(
    stub: AsyncStub, *, strategy_id: str = "", after: str = "", tenant: str = TENANT
) -> grpc.aio.UnaryStreamCall[pb.StreamRuntimeRequest, pb.RuntimeEventBatch]:
    request = pb.StreamRuntimeRequest(strategy_id=strategy_id, after_event_id=after)
    return stub.StreamRuntimeBatches(request, metadata=auth(tenant))


def order_batches(
    stub: AsyncStub, *, strategy_id: str = "", after: str = ""
) -> grpc.aio.UnaryStreamCall[pb.StreamOrdersRequest, pb.OrderEventBatch]:
    request = pb.StreamOrdersRequest(strategy_id=strategy_id, after_event_id=after)
    return stub.StreamOrdersBatches(request, metadata=auth(TENANT))


async def test_waiting_events_come_in_one_message_equal_to_the_single_stream(
    server: Harness,
) -> None:
    stub = aio_stub(server.channel)
    first = await start_new(stub, "AAA")
    # The position to resume after: an event a reader got.
    single = runtime_stream(stub)
    try:
        await blocked_stream_readers(server.redis, 1)
        mark = await stop(stub, first.strategy_id)
        after = (await next_message(single)).event_id
        assert mark.status == pb.STRATEGY_STATUS_STOPPED
    finally:
        single.cancel()

    # Five changes while nobody listens: a resume finds them all waiting.
    missed = [await start_new(stub, symbol) for symbol in ("B1", "B2", "B3")]
    missed += [await stop(stub, missed[0].strategy_id), await stop(stub, missed[2].strategy_id)]

    plain = runtime_stream(stub, after=after)
    batched = runtime_batches(stub, after=after)
    try:
        events = await take(plain, len(missed))
        batch = await next_message(batched)
        assert len(batch.events) == len(missed), "the waiting events came in one message"
        assert list(batch.events) == events
        assert [e.runtime for e in batch.events] == missed

        # Live: one change, one message of one event, the same as the single stream's.
        live = await start_new(stub, "B4")
        alone = await next_message(batched)
        assert list(alone.events) == [await next_message(plain)]
        assert alone.events[0].runtime == live
    finally:
        plain.cancel()
        batched.cancel()


async def test_a_long_catch_up_is_split_into_messages_of_at_most_the_batch_limit(
    server: Harness,
) -> None:
    stub = aio_stub(server.channel)
    single = runtime_stream(stub)
    try:
        await blocked_stream_readers(server.redis, 1)
        await start_new(stub, "ANCHOR")
        after = (await next_message(single)).event_id
    finally:
        single.cancel()
    count = BATCH_MAX + 44
    started = await asyncio.gather(*(start_new(stub, f"S{n}") for n in range(count)))
    batched = runtime_batches(stub, after=after)
    try:
        sizes: list[int] = []
        got: list[pb.RuntimeEvent] = []
        while len(got) < count:
            batch = await next_message(batched)
            sizes.append(len(batch.events))
            got += batch.events
    finally:
        batched.cancel()
    assert len(got) == count
    assert 0 < max(sizes) <= BATCH_MAX
    assert len(sizes) < count, "a catch-up is not one message per event"
    assert {e.runtime.strategy_id for e in got} == {r.strategy_id for r in started}
    assert len({e.event_id for e in got}) == count


async def test_strategy_filter_and_tenants(server: Harness) -> None:
    stub = aio_stub(server.channel)
    mine = await create(stub, "MINE")
    filtered = runtime_batches(stub, strategy_id=mine.id)
    theirs = runtime_batches(stub, tenant=OTHER)
    try:
        await blocked_stream_readers(server.redis, 2)
        await start_new(stub, "OTHERSTRAT")
        started = await stub.StartStrategy(
            pb.StartStrategyRequest(strategy_id=mine.id), metadata=auth(TENANT)
        )
        batch = await next_message(filtered)
        assert [e.runtime for e in batch.events] == [started]
        # The other tenant's stream is open and gets none of tenant-a's events.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(theirs.read(), 0.5)
    finally:
        filtered.cancel()
        theirs.cancel()

    # Another tenant's strategy id is NOT_FOUND, as on the single streams; a bad position
    # is INVALID_ARGUMENT naming the field.
    foreign = runtime_batches(stub, strategy_id=mine.id, tenant=OTHER)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await foreign.read()
    assert rpc_code(refused.value) == grpc.StatusCode.NOT_FOUND
    bad = runtime_batches(stub, after="not-an-id")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await bad.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "after_event_id" in (raised.value.details() or "")


async def test_order_batches_carry_the_order_events(server: Harness, engine: EngineWriter) -> None:  # noqa: F811
    stub = aio_stub(server.channel)
    mine = await create(stub, "SBIN")
    buy = [
        order(mine, OrderKind.BUY),
        order(mine, OrderKind.BUY, status=OrderStatus.SUBMITTED, attempts=1),
    ]
    plain = order_stream(stub)
    try:
        await blocked_stream_readers(server.redis, 1)
        first_id = await engine.write(buy[0])
        assert (await next_message(plain)).event_id == first_id
    finally:
        plain.cancel()
    second_id = await engine.write(buy[1])
    batched = order_batches(stub, after=first_id)
    try:
        batch = await next_message(batched)
        assert [e.event_id for e in batch.events] == [second_id]
        assert [e.order for e in batch.events] == [expected_proto(buy[1])]
    finally:
        batched.cancel()
