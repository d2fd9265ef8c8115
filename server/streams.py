"""Live event streams for StreamRuntime/StreamOrders, from the tenant's Redis Stream.

Positions are exact Redis Stream ids, so resuming after `after_event_id` gives no gap and no
duplicate. Empty `after_event_id` starts at the stream's current end, resolved once so that
nothing written between two reads is skipped. Subscribers of one tenant share a TenantFeed
(server/fanout.py): one reader and one encoding per event. A subscriber that is behind the
feed's buffer reads Redis itself, pulling, so a slow reader costs the server no memory (gRPC
flow control holds it back).
"""

from __future__ import annotations

from collections.abc import Mapping

from server.errors import InvalidArgument, OutOfRange, Unavailable
from server.fanout import Encode, Encoded, TenantFeed, encode
from server.store.keys import StreamKind
from server.store.state import RedisState, StreamId, format_stream_id, parse_stream_id


class EventStreams:
    def __init__(
        self,
        *,
        state: RedisState,
        encoders: Mapping[StreamKind, Encode],
        block_ms: int = 1000,
        batch: int = 256,
        buffer: int = 1024,
    ) -> None:
        self._state = state
        self._encoders = encoders
        self._block_ms = block_ms
        self._batch = batch
        self._buffer = buffer
        self.closing = False
        self._feeds: dict[tuple[StreamKind, str], TenantFeed] = {}

    def close(self) -> None:
        """Ends every open subscription with UNAVAILABLE (the client resumes elsewhere)."""
        self.closing = True
        for feed in self._feeds.values():
            feed.wake()

    async def subscribe(
        self, kind: StreamKind, tenant: str, strategy_id: str, after_event_id: str
    ) -> Subscription:
        """A subscription to the events after the start position (empty after_event_id: the
        stream's current end); close it when the call ends."""
        position, last = await self._start(kind, tenant, after_event_id)
        return Subscription(
            self, kind, tenant, strategy_id, position, self._subscribe(kind, tenant, last)
        )

    async def _start(
        self, kind: StreamKind, tenant: str, after_event_id: str
    ) -> tuple[StreamId, StreamId]:
        """The subscriber's start position and the stream's last id."""
        if self.closing:
            raise Unavailable("server is shutting down")
        bounds = await self._state.stream_bounds(kind, tenant)
        if not after_event_id:
            return bounds.last_id, bounds.last_id
        after = parse_stream_id(after_event_id)
        if after is None:
            raise InvalidArgument("after_event_id", "must be an event_id from this stream")
        if after > bounds.last_id:
            raise OutOfRange("after_event_id is ahead of the stream (was it reset?)")
        if bounds.trimmed_through is not None and after < bounds.trimmed_through:
            raise OutOfRange("after_event_id is older than the events the stream still keeps")
        return after, bounds.last_id

    def _subscribe(self, kind: StreamKind, tenant: str, last: StreamId) -> TenantFeed:
        feed = self._feeds.get((kind, tenant))
        if feed is None or feed.error is not None:
            feed = TenantFeed(
                read=lambda after: self._state.read_events(
                    kind, tenant, after, block_ms=self._block_ms, count=self._batch
                ),
                encoder=self._encoders[kind],
                start=last,
                capacity=self._buffer,
            )
            self._feeds[(kind, tenant)] = feed
            feed.start()
        feed.subscribers += 1
        return feed

    async def unsubscribe(self, kind: StreamKind, tenant: str, feed: TenantFeed) -> None:
        feed.subscribers -= 1
        if feed.subscribers == 0:
            if self._feeds.get((kind, tenant)) is feed:
                del self._feeds[(kind, tenant)]
            await feed.stop()

    async def catch_up(self, kind: StreamKind, tenant: str, position: StreamId) -> list[Encoded]:
        batch = await self._state.read_events(
            kind, tenant, position, block_ms=None, count=self._batch
        )
        return [encode(p, fields, self._encoders[kind]) for p, fields in batch]


class Subscription:
    """One subscriber's place in a tenant's events. A plain object with a `next` coroutine
    rather than an async generator, which cost more per delivery (its asend machinery and
    aclosing; scripts/bench/stream_path.py); the stream call closes it in its `finally`."""

    __slots__ = (
        "_closed",
        "_feed",
        "_kind",
        "_position",
        "_strategy_id",
        "_streams",
        "_tenant",
        "start_after",
    )

    def __init__(
        self,
        streams: EventStreams,
        kind: StreamKind,
        tenant: str,
        strategy_id: str,
        position: StreamId,
        feed: TenantFeed,
    ) -> None:
        self._streams = streams
        self._kind = kind
        self._tenant = tenant
        self._strategy_id = strategy_id
        self._position = position
        self._feed = feed
        self._closed = False
        # The event_id the subscription starts after: a client that drops before the first
        # event resumes exactly from it.
        self.start_after = format_stream_id(position)

    async def next(self) -> list[Encoded]:
        """The next encoded events, in order, as many as have arrived (at least one)."""
        feed, streams = self._feed, self._streams
        while True:
            # Taken before looking, so that a wake-up between the look and the wait is kept.
            changed = feed.changed
            if streams.closing:
                raise Unavailable("server is shutting down; resume with after_event_id")
            if feed.error is not None:
                raise Unavailable(f"event stream unavailable ({feed.error}); resume later")
            items = feed.after(self._position)
            if items is None:  # behind the shared buffer: catch up from Redis
                items = await streams.catch_up(self._kind, self._tenant, self._position)
            if not items:
                # close() wakes every feed, so this wait needs no second waiter.
                await changed.wait()
                continue
            self._position = items[-1].position
            if self._strategy_id:
                items = [i for i in items if i.strategy_id == self._strategy_id]
            if items:
                return items

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._streams.unsubscribe(self._kind, self._tenant, self._feed)
