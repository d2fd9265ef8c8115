"""Live event streams for StreamRuntime/StreamOrders, read from the tenant's Redis Stream.

A subscriber pulls with XREAD from an exact position, so a slow reader costs the server no
memory (gRPC flow control holds it back), and resuming after `after_event_id` gives no gap
and no duplicate. Empty `after_event_id` starts at the stream's current end, resolved once
so that nothing written between two reads is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from server.domain import Order, Runtime
from server.errors import InvalidArgument, OutOfRange, Unavailable
from server.store.codec import Flat, order_from_flat, runtime_from_flat
from server.store.keys import StreamKind
from server.store.state import RedisState, StreamId, format_stream_id, parse_stream_id

T = TypeVar("T")


class EventStreams:
    def __init__(self, *, state: RedisState, block_ms: int = 1000, batch: int = 256) -> None:
        self._state = state
        self._block_ms = block_ms
        self._batch = batch
        self._closing = asyncio.Event()

    def close(self) -> None:
        """Ends every open subscription with UNAVAILABLE (the client resumes elsewhere)."""
        self._closing.set()

    def runtime_events(
        self, tenant: str, strategy_id: str, after_event_id: str
    ) -> AsyncIterator[tuple[str, Runtime]]:
        return self._events("runtime", tenant, strategy_id, after_event_id, runtime_from_flat)

    def order_events(
        self, tenant: str, strategy_id: str, after_event_id: str
    ) -> AsyncIterator[tuple[str, Order]]:
        return self._events("orders", tenant, strategy_id, after_event_id, order_from_flat)

    async def _events(
        self,
        kind: StreamKind,
        tenant: str,
        strategy_id: str,
        after_event_id: str,
        decode: Callable[[Flat], T],
    ) -> AsyncIterator[tuple[str, T]]:
        position = await self._start(kind, tenant, after_event_id)
        while True:
            batch = await self._next_batch(kind, tenant, position)
            for event_id, fields in batch:
                position = event_id
                if strategy_id and fields.get("strategy_id") != strategy_id:
                    continue
                yield format_stream_id(event_id), decode(fields)

    async def _start(self, kind: StreamKind, tenant: str, after_event_id: str) -> StreamId:
        if self._closing.is_set():
            raise Unavailable("server is shutting down")
        bounds = await self._state.stream_bounds(kind, tenant)
        if not after_event_id:
            return bounds.last_id
        after = parse_stream_id(after_event_id)
        if after is None:
            raise InvalidArgument("after_event_id", "must be an event_id from this stream")
        if after > bounds.last_id:
            raise OutOfRange("after_event_id is ahead of the stream (was it reset?)")
        if bounds.trimmed_through is not None and after < bounds.trimmed_through:
            raise OutOfRange("after_event_id is older than the events the stream still keeps")
        return after

    async def _next_batch(
        self, kind: StreamKind, tenant: str, position: StreamId
    ) -> list[tuple[StreamId, Flat]]:
        read = asyncio.ensure_future(
            self._state.read_events(
                kind, tenant, position, block_ms=self._block_ms, count=self._batch
            )
        )
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({read, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (read, closing):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        if not read.done() or read.cancelled():
            raise Unavailable("server is shutting down; resume with after_event_id")
        return read.result()
