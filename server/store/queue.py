"""The order queue: Redis Streams read through one consumer group, exits before BUY/SELL.

Why Streams and not BLMOVE lists: an entry a worker has taken stays in the group's pending list
until it is acknowledged, so an entry whose worker died is found by XAUTOCLAIM and delivered
again, with a delivery count that lets a poison event end with a recorded reason instead of
looping. Lists would need a processing list per worker and a hand-written reaper.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from server.domain import Intent
from server.store import keys, scripts
from server.store.connection import execute, queue_script

log = logging.getLogger(__name__)

# The queues' short names, as metrics label them.
QUEUE_NAMES = {keys.EXIT_QUEUE: "exits", keys.ORDER_QUEUE: "orders"}

# A fired marker outlives the longest strategy (7 days of holding) with a margin.
_FIRED_TTL_MS = 9 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class OrderEvent:
    strategy_id: str
    tenant: str
    run: int
    intent: Intent
    order_id: str
    due_at_us: int
    fired_at_us: int
    # A STOPLOSS event: when the feed message that breached it arrived (wall clock), for the
    # tick-to-order latency; 0 when no tick caused the event.
    tick_at_us: int = 0

    def fields(self) -> dict[str, str]:
        fields = {
            "strategy_id": self.strategy_id,
            "tenant": self.tenant,
            "run": str(self.run),
            "intent": self.intent.value,
            "order_id": self.order_id,
            "due_at": str(self.due_at_us),
            "fired_at": str(self.fired_at_us),
        }
        if self.tick_at_us:
            fields["tick_at"] = str(self.tick_at_us)
        return fields

    @classmethod
    def parse(cls, fields: dict[str, str]) -> OrderEvent:
        return cls(
            strategy_id=fields["strategy_id"],
            tenant=fields["tenant"],
            run=int(fields["run"]),
            intent=Intent(fields["intent"]),
            order_id=fields["order_id"],
            due_at_us=int(fields["due_at"]),
            fired_at_us=int(fields["fired_at"]),
            tick_at_us=int(fields.get("tick_at", 0)),
        )

    @property
    def lateness_s(self) -> float:
        return (self.fired_at_us - self.due_at_us) / 1_000_000


@dataclass(frozen=True, slots=True)
class Delivery:
    """One entry taken from a queue: ack it when done, whatever the outcome."""

    stream: str
    entry_id: str
    fields: dict[str, str]
    deliveries: int = 1


class OrderQueue:
    def __init__(self, *, redis: Redis, consumer: str) -> None:
        self._redis = redis
        self.consumer = consumer
        self._enqueue = redis.register_script(scripts.ENQUEUE_ONCE)

    async def ensure_group(self) -> None:
        for stream in (keys.EXIT_QUEUE, keys.ORDER_QUEUE):
            try:
                await self._redis.xgroup_create(stream, keys.ENGINE_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def enqueue(self, event: OrderEvent) -> str | None:
        """Adds the event unless its intent was enqueued before; returns the entry id."""
        entry = await self._enqueue(*_script_args(event))
        return str(entry) if entry else None

    async def enqueue_and_take(
        self, event: OrderEvent, alongside: Callable[[Pipeline], None] | None = None
    ) -> tuple[Delivery | None, list[Any]]:
        """Enqueues the event once, as enqueue() does, and takes for this consumer the oldest
        entry of its stream no worker has taken yet: normally this event, unless others
        wait before it. Returns that delivery (None when this intent was enqueued before,
        or nothing was taken: the workers then get it) and the replies of the commands
        `alongside` added to the same round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            if alongside is not None:
                alongside(pipe)
            queue_script(pipe, self._enqueue, *_script_args(event, self.consumer))
            *beside, reply = await execute(pipe)
        return _taken(reply), beside

    async def taken_here(self, order_id: str, count: int = 256) -> Delivery | None:
        """The exit of `order_id` if this consumer holds it taken: an enqueue_and_take whose
        reply was lost may have taken it, and nobody here knows to run it."""
        pending = await self._redis.xpending_range(
            keys.EXIT_QUEUE, keys.ENGINE_GROUP, "-", "+", count, consumername=self.consumer
        )
        if not pending:
            return None
        async with self._redis.pipeline(transaction=False) as pipe:
            for row in pending:
                pipe.xrange(keys.EXIT_QUEUE, row["message_id"], row["message_id"], count=1)
            replies = await execute(pipe)
        for row, entries in zip(pending, replies, strict=True):
            for entry_id, fields in entries or []:
                if fields.get("order_id") == order_id:
                    flat = cast(dict[str, str], fields)
                    return Delivery(
                        keys.EXIT_QUEUE, str(entry_id), flat, int(row["times_delivered"])
                    )
        return None

    async def enqueue_all(self, events: list[OrderEvent], *, attempts: int = 20) -> list[bool]:
        """Many events (a chunk of a burst of timers due at one instant) in one round trip;
        like enqueue_retrying, per event: True for each event now in the queue."""
        done = [False] * len(events)
        for attempt in range(attempts):
            todo = [n for n in range(len(events)) if not done[n]]
            if not todo:
                break
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for n in todo:
                        queue_script(pipe, self._enqueue, *_script_args(events[n]))
                    replies = await execute(pipe, raise_on_error=False)
            except Exception as exc:  # noqa: BLE001 - Redis away: retry, the script dedupes
                log.warning("enqueue of %d events failed (%s); retrying", len(todo), exc)
                replies = [exc] * len(todo)
            for n, reply in zip(todo, replies, strict=True):
                done[n] = not isinstance(reply, Exception)
            if not all(done):
                await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
        if not all(done):
            log.error("could not enqueue %d of %d events", done.count(False), len(events))
        return done

    async def enqueue_retrying(self, event: OrderEvent, attempts: int = 20) -> bool:
        """Enqueue-once is idempotent, so repeating it after an unknown outcome is safe.
        True once the event is in the queue (now or before); False after `attempts`."""
        for attempt in range(attempts):
            try:
                entry = await self.enqueue(event)
            except Exception as exc:  # noqa: BLE001 - Redis away: retry, the script dedupes
                log.warning("enqueue of %s failed (%s); retrying", event.order_id, exc)
                await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
                continue
            if entry is None:
                log.info("%s was already enqueued", event.order_id)
            return True
        log.error("could not enqueue %s", event.order_id)
        return False

    async def depths(self) -> dict[str, tuple[int, int]]:
        """Per queue ("orders", "exits"): entries not yet acknowledged (acknowledging deletes
        them), and how many of those a worker has taken."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in QUEUE_NAMES:
                pipe.xlen(stream)
                pipe.xpending(stream, keys.ENGINE_GROUP)
            replies = await execute(pipe, raise_on_error=False)
        depths: dict[str, tuple[int, int]] = {}
        for n, name in enumerate(QUEUE_NAMES.values()):
            length, pending = replies[2 * n], replies[2 * n + 1]
            if isinstance(length, Exception):
                raise length
            if isinstance(pending, ResponseError) and "NOGROUP" in str(pending):
                pending = {"pending": 0}  # Redis lost its data; the engine recreates it
            elif isinstance(pending, Exception):
                raise pending
            depths[name] = (int(length), int(pending["pending"]))
        return depths

    async def take(
        self, block_ms: int, count: int = 1, *, exits_only: bool = False
    ) -> list[Delivery]:
        """Up to `count` new entries from each stream (only the exits with `exits_only`),
        exits first; waits up to block_ms."""
        names = [keys.EXIT_QUEUE] if exits_only else [keys.EXIT_QUEUE, keys.ORDER_QUEUE]
        streams: dict[Any, Any] = dict.fromkeys(names, ">")
        reply = await self._redis.xreadgroup(
            keys.ENGINE_GROUP, self.consumer, streams, count=count, block=block_ms
        )
        taken = [
            Delivery(str(stream), str(entry_id), cast(dict[str, str], fields))
            for stream, entries in cast(list[Any], reply or [])
            for entry_id, fields in entries
        ]
        taken.sort(key=lambda d: d.stream != keys.EXIT_QUEUE)
        return taken

    async def reclaim(self, min_idle_ms: int, count: int = 64) -> list[Delivery]:
        """Entries whose worker went quiet for min_idle_ms (it died): now ours."""
        found: list[Delivery] = []
        for stream in (keys.EXIT_QUEUE, keys.ORDER_QUEUE):
            reply = await self._redis.xautoclaim(
                stream, keys.ENGINE_GROUP, self.consumer, min_idle_ms, "0-0", count=count
            )
            entries = cast(list[Any], reply[1])
            counts = await self._delivery_counts(stream, [e[0] for e in entries if e])
            for entry_id, fields in entries:
                if fields is not None:  # None: the entry was deleted meanwhile
                    flat = cast(dict[str, str], fields)
                    found.append(Delivery(stream, str(entry_id), flat, counts.get(entry_id, 1)))
        return found

    async def _delivery_counts(self, stream: str, ids: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry_id in ids:
            pending = await self._redis.xpending_range(
                stream, keys.ENGINE_GROUP, min=entry_id, max=entry_id, count=1
            )
            for item in pending:
                counts[str(item["message_id"])] = int(item["times_delivered"])
        return counts

    async def touch_all(self, deliveries: list[Delivery]) -> None:
        """Resets the entries' idle time so no other process reclaims them while we work."""
        if not deliveries:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream, ids in _by_stream(deliveries).items():
                pipe.xclaim(stream, keys.ENGINE_GROUP, self.consumer, 0, list(ids), justid=True)
            await execute(pipe)

    async def ack(self, delivery: Delivery) -> None:
        """Done with the entry: acknowledged and removed, so the streams stay small."""
        await self.ack_all([delivery])

    async def ack_all(self, deliveries: list[Delivery]) -> None:
        """ack() for many entries in one round trip."""
        if not deliveries:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            for stream, ids in _by_stream(deliveries).items():
                pipe.xack(stream, keys.ENGINE_GROUP, *ids)
                pipe.xdel(stream, *ids)
            await execute(pipe)


def _by_stream(deliveries: list[Delivery]) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for delivery in deliveries:
        grouped.setdefault(delivery.stream, []).append(delivery.entry_id)
    return grouped


def _script_args(event: OrderEvent, taker: str = "") -> tuple[list[str], list[str | int]]:
    stream = keys.EXIT_QUEUE if event.intent.is_exit else keys.ORDER_QUEUE
    marker = keys.fired(event.strategy_id, event.run, _marker(event))
    fields = [item for pair in event.fields().items() for item in pair]
    return [stream, marker], [_FIRED_TTL_MS, taker, keys.ENGINE_GROUP, *fields]


def _taken(reply: Any) -> Delivery | None:
    """The entry in ENQUEUE_ONCE's XREADGROUP reply, if it took one."""
    if not isinstance(reply, list) or not reply:
        return None
    stream, entries = reply[0]
    entry_id, flat = entries[0]
    fields = {str(flat[n]): str(flat[n + 1]) for n in range(0, len(flat), 2)}
    return Delivery(str(stream), str(entry_id), fields)


def _marker(event: OrderEvent) -> str:
    # Exits carry their own order id (a Stop may retry a failed exit with a new one).
    return event.order_id if event.intent is Intent.EXIT else event.intent.value
