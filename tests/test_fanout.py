"""TenantFeed's buffer, in process (the streams over gRPC and Redis are in
test_streams.py and test_stream_backpressure.py)."""

from __future__ import annotations

import asyncio

from server.fanout import Encoded, TenantFeed
from server.store.codec import Flat
from server.store.state import StreamId


def _feed_reading(batches: asyncio.Queue[list[tuple[StreamId, Flat]]], capacity: int) -> TenantFeed:
    async def read(_after: StreamId) -> list[tuple[StreamId, Flat]]:
        return await batches.get()

    def encoder(event_id: str, fields: Flat) -> bytes:
        return event_id.encode()

    return TenantFeed(read=read, encoder=encoder, start=(0, 0), capacity=capacity)


async def _fed(
    feed: TenantFeed, batches: asyncio.Queue[list[tuple[StreamId, Flat]]], ids: range
) -> None:
    changed = feed.changed
    batches.put_nowait([((n, 0), {"strategy_id": f"s-{n}"}) for n in ids])
    await asyncio.wait_for(changed.wait(), timeout=1)


def _ids(items: list[Encoded] | None) -> list[int]:
    assert items is not None
    return [item.position[0] for item in items]


async def test_after_gives_the_events_after_a_position_and_none_once_trimmed() -> None:
    batches: asyncio.Queue[list[tuple[StreamId, Flat]]] = asyncio.Queue()
    feed = _feed_reading(batches, capacity=4)
    feed.start()
    try:
        assert _ids(feed.after((0, 0))) == []
        await _fed(feed, batches, range(1, 4))
        assert _ids(feed.after((0, 0))) == [1, 2, 3]
        assert _ids(feed.after((2, 0))) == [3]
        assert _ids(feed.after((3, 0))) == []  # caught up
        assert _ids(feed.after((9, 0))) == []
        # A position between two events (an id the filter skipped) still resumes exactly.
        assert _ids(feed.after((1, 5))) == [2, 3]

        await _fed(feed, batches, range(4, 10))  # 9 > 2 x 4: the oldest five are dropped
        assert feed.floor == (5, 0)
        assert feed.after((4, 0)) is None  # older than the buffer: read Redis instead
        assert _ids(feed.after((5, 0))) == [6, 7, 8, 9]
        assert _ids(feed.after((8, 0))) == [9]
        assert feed.after((8, 0))[0].payload == b"9-0"  # type: ignore[index]
    finally:
        await feed.stop()
