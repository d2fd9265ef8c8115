"""Typed async operations over Redis: the only holder of the Redis clients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from server.domain import Runtime, Strategy
from server.store import keys, scripts
from server.store.codec import (
    Flat,
    runtime_from_flat,
    runtime_to_flat,
    strategy_config,
)
from server.store.connection import execute, faster, queue_script
from server.store.keys import StreamKind

StreamId = tuple[int, int]
_MAX_STREAM_PART = 2**64 - 1


def parse_stream_id(raw: str) -> StreamId | None:
    """'1732456789123-0' -> (1732456789123, 0); None when it is not a stream id."""
    ms, sep, seq = raw.partition("-")
    if not sep or not raw.isascii():  # str.isdigit() admits '²', which int() rejects
        return None
    if not ms.isdigit() or not seq.isdigit() or len(ms) > 20 or len(seq) > 20:
        return None
    value = int(ms), int(seq)
    if max(value) > _MAX_STREAM_PART:  # Redis refuses such an id in XREAD
        return None
    return value


def format_stream_id(value: StreamId) -> str:
    return f"{value[0]}-{value[1]}"


@dataclass(frozen=True, slots=True)
class StreamBounds:
    """What a tenant's event stream can still replay."""

    last_id: StreamId
    # Everything at or before this id may have been trimmed away (None: nothing trimmed).
    trimmed_through: StreamId | None


def connect(url: str, *, timeout_s: float, max_connections: int = 512) -> Redis:
    """A client that never retries on its own: a blind retry of XADD or of a claim script
    could apply it twice, so the callers decide what is safe to repeat. Under a burst, a
    call waits (up to timeout_s) for a free pooled connection instead of failing at once."""
    pool = BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections,
        timeout=timeout_s,
    )
    pool.connection_class = faster(pool.connection_class)
    return Redis.from_pool(pool)


class RedisState:
    """The hot state: strategies, runtimes, symbol sets and per-tenant event streams."""

    def __init__(self, *, client: Redis, stream_client: Redis, stream_maxlen: int) -> None:
        self._redis = client
        # Blocking stream reads hold a connection each; a separate pool keeps them from
        # starving ordinary commands.
        self._streams = stream_client
        self._maxlen = stream_maxlen
        self._apply = client.register_script(scripts.APPLY_RUNTIME)

    @property
    def client(self) -> Redis:
        return self._redis

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._streams.aclose()
        await self._redis.aclose()

    async def put_runtimes(
        self,
        runtimes: list[Runtime],
        *,
        events_before: list[tuple[StreamKind, str, Flat]],
        strategies: Sequence[Strategy | None] | None = None,
    ) -> list[Flat | None]:
        """Appends `events_before`, then writes each runtime (and its strategy's config, when
        `strategies` gives it) unless Redis already holds that version or a newer one, in
        one round trip; `put_written` then keeps the live sets in step. Returns, for each
        runtime, the fields written (for its event), or None when it was not written."""
        configs = [*strategies] if strategies else [None] * len(runtimes)
        flats = [runtime_to_flat(runtime) for runtime in runtimes]
        async with self._redis.pipeline(transaction=False) as pipe:
            for kind, tenant, fields in events_before:
                self._append(pipe, kind, tenant, fields)
            for runtime, flat, strategy in zip(runtimes, flats, configs, strict=True):
                queue_script(pipe, self._apply, *_apply_args(runtime, flat, strategy))
            replies = await execute(pipe)
        written = replies[len(events_before) :]
        return [flat if new else None for flat, new in zip(flats, written, strict=True)]

    async def put_written(
        self, written: list[Runtime], *, events_after: list[tuple[StreamKind, str, Flat]]
    ) -> None:
        """After put_runtimes(): the live sets of the runtimes it wrote, then `events_after`,
        in one round trip."""
        if not written and not events_after:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for runtime in written:
                await _update_live_set(pipe, runtime)
            for kind, tenant, fields in events_after:
                self._append(pipe, kind, tenant, fields)
            await execute(pipe)

    async def get_runtime(self, strategy_id: str) -> Runtime | None:
        flat = cast(Flat, await self._redis.hgetall(keys.runtime(strategy_id)))
        return runtime_from_flat(flat) if flat else None

    async def last_price(self, symbol: str) -> Decimal | None:
        """The last price the market listener stored (seed 4.1), if any."""
        raw = await self._redis.get(keys.price(symbol))
        try:
            return Decimal(str(raw)) if raw is not None else None
        except InvalidOperation:
            return None

    async def append_event(self, kind: StreamKind, tenant: str, fields: Flat) -> str:
        """Appends one event to the tenant's stream; returns its id (the resume token)."""
        return str(await self._append(self._redis, kind, tenant, fields))

    def _append(self, client: Redis, kind: StreamKind, tenant: str, fields: Flat) -> Any:
        # XADD as redis-py's xadd() sends it, without its checks of a dozen options we never
        # pass, which cost about as much as packing the event: a burst sends four per order.
        if not fields:
            raise ValueError("an event needs at least one field")
        key = keys.event_stream(kind, tenant)
        return client.execute_command(  # type: ignore[no-untyped-call]
            "XADD", key, "MAXLEN", "~", self._maxlen, "*", *_pairs(fields)
        )

    async def stream_bounds(self, kind: StreamKind, tenant: str) -> StreamBounds:
        try:
            info: dict[str, Any] = await self._redis.xinfo_stream(keys.event_stream(kind, tenant))
        except ResponseError:  # no such key: nothing was ever written
            return StreamBounds(last_id=(0, 0), trimmed_through=None)
        last = parse_stream_id(str(info["last-generated-id"])) or (0, 0)
        return StreamBounds(last_id=last, trimmed_through=_trimmed_through(info, self._maxlen))

    async def read_events(
        self,
        kind: StreamKind,
        tenant: str,
        after: StreamId,
        *,
        block_ms: int | None,
        count: int,
    ) -> list[tuple[StreamId, Flat]]:
        """Events after `after`, waiting up to block_ms for the first one (None: no wait)."""
        reply: list[tuple[str, list[tuple[str, Flat]]]] = await self._streams.xread(
            {keys.event_stream(kind, tenant): format_stream_id(after)},
            count=count,
            block=block_ms,
        )  # type: ignore[assignment]
        events: list[tuple[StreamId, Flat]] = []
        for _key, entries in reply or []:
            for raw_id, fields in entries:
                event_id = parse_stream_id(raw_id)
                if event_id is not None:
                    events.append((event_id, fields))
        return events


def _apply_args(
    runtime: Runtime, flat: Flat, strategy: Strategy | None
) -> tuple[list[str], list[Any]]:
    strategy_fields = _pairs(strategy_config(strategy)) if strategy else []
    args: list[Any] = [runtime.version, len(strategy_fields) // 2, *strategy_fields]
    args.extend(_pairs(flat))
    return [keys.strategy(runtime.strategy_id), keys.runtime(runtime.strategy_id)], args


async def _update_live_set(client: Redis, runtime: Runtime) -> Any:
    """The symbol's live set follows a written runtime (on a pipeline: queued only)."""
    live_set = keys.symbol_strategies(runtime.symbol)
    if runtime.status.live:
        return await client.sadd(live_set, runtime.strategy_id)
    return await client.srem(live_set, runtime.strategy_id)


def _pairs(flat: Flat) -> list[str]:
    return [item for pair in flat.items() for item in pair]


def _trimmed_through(info: dict[str, Any], maxlen: int) -> StreamId | None:
    """The newest id that may be gone from the stream (None: every entry is still there).

    XADD's MAXLEN trimming does not move Redis 7's max-deleted-entry-id (only XDEL does), so
    trimming is detected from the count of entries ever added; everything before the first
    kept entry then counts as gone, which errs towards OUT_OF_RANGE rather than a gap."""
    deleted = parse_stream_id(str(info.get("max-deleted-entry-id", "")))
    through = deleted if deleted and deleted != (0, 0) else None
    length = int(info.get("length", 0))
    added = info.get("entries-added")
    # Redis 6.2 does not count; once the stream is at its cap, assume its head was trimmed.
    removed = int(added) > length if added is not None else length >= maxlen
    head = _before_first_entry(info) if removed else None
    if head is not None and (through is None or head > through):
        through = head
    return through


def _before_first_entry(info: dict[str, Any]) -> StreamId | None:
    first = info.get("first-entry")
    if not first:  # everything is gone
        last = parse_stream_id(str(info.get("last-generated-id", "")))
        return last if last and last != (0, 0) else None
    first_id = parse_stream_id(str(first[0]))
    if first_id is None or first_id == (0, 0):
        return None
    ms, seq = first_id
    return (ms, seq - 1) if seq > 0 else (ms - 1, 2**64 - 1)
