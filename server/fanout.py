"""TenantFeed: one reader of a tenant's event stream shared by all its subscribers.

Ten dashboards of one tenant used to mean ten blocking XREADs and ten encodings of every
event. A feed reads the stream once, encodes each event once (to the bytes that go on the
wire) and keeps the newest `capacity` of them; each subscriber walks that buffer at its own
pace from its own position. A subscriber that falls behind the buffer (or resumes from before
it) reads Redis directly until it is back inside, so a slow reader still costs no memory and
positions are still exact: no gap, no duplicate.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.cancellation import cancel_requested
from server.store.codec import Flat
from server.store.state import StreamId, format_stream_id

log = logging.getLogger(__name__)

ReadEvents = Callable[[StreamId], Awaitable[list[tuple[StreamId, Flat]]]]
Encode = Callable[[str, Flat], bytes]


@dataclass(frozen=True, slots=True)
class Encoded:
    position: StreamId
    event_id: str
    strategy_id: str
    payload: bytes
    # The payload as one element of a batch message's `repeated ... events = 1` field (its
    # tag, its length, itself): a batch is these joined, with no encoding per subscriber.
    element: bytes


def encode(position: StreamId, fields: Flat, encoder: Encode) -> Encoded:
    event_id = format_stream_id(position)
    payload = encoder(event_id, fields)
    element = _EVENTS_TAG + _varint(len(payload)) + payload
    return Encoded(position, event_id, fields.get("strategy_id", ""), payload, element)


# Field 1, wire type 2 (length-delimited): (1 << 3) | 2.
_EVENTS_TAG = b"\x0a"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class TenantFeed:
    def __init__(
        self, *, read: ReadEvents, encoder: Encode, start: StreamId, capacity: int
    ) -> None:
        self._read = read
        self._encoder = encoder
        self._capacity = capacity
        self._items: list[Encoded] = []
        # The items' positions, in step with `_items`: `after` bisects this in C, where a
        # key function would call back into Python ten times per subscriber per event.
        self._positions: list[StreamId] = []
        # Every event after `floor` is in the buffer, or not read yet.
        self.floor = start
        self._last = start
        # Set when events arrive or the reader fails, then replaced by a new one: take it
        # before reading `after`, and a wake-up between the read and the wait is not lost.
        self.changed = asyncio.Event()
        self.error: Exception | None = None
        self.subscribers = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tenant-feed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def after(self, position: StreamId) -> list[Encoded] | None:
        """The buffered events after `position`; None when it is older than the buffer."""
        if position < self.floor:
            return None
        positions = self._positions
        if not positions or position >= positions[-1]:
            return []  # caught up: the usual case on every wake-up but the first
        return self._items[bisect.bisect_right(positions, position) :]

    async def _run(self) -> None:
        try:
            while not cancel_requested():  # a cancel swallowed by a Redis call still ends it
                batch = await self._read(self._last)
                if not batch:
                    continue
                self._items.extend(encode(p, fields, self._encoder) for p, fields in batch)
                self._positions.extend(p for p, _ in batch)
                self._last = batch[-1][0]
                self._trim()
                self.wake()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every subscriber, which ends
            log.warning("event stream reader failed: %s", exc)
            self.error = exc
            self.wake()

    def _trim(self) -> None:
        # In halves, so that dropping from the front stays amortised O(1) per event.
        if len(self._items) > 2 * self._capacity:
            drop = len(self._items) - self._capacity
            self.floor = self._items[drop - 1].position
            del self._items[:drop]
            del self._positions[:drop]

    def wake(self) -> None:
        """Wakes every subscriber waiting on `changed` (new events, an error, shutdown)."""
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()
