"""MarketListener: a websocket client that stores every price and triggers stop-losses.

It connects to ALGOPLANE_FEED_URL, subscribes to the symbols of live strategies (again on
every reconnect and whenever that set changes), and never stops trying: a drop is followed by
exponential backoff with jitter, capped. Bad messages are counted and logged, never fatal.
A symbol with open positions that gets no tick for `stale_s` is reported.

Reading and checking are decoupled: a tick only updates the symbol's pending (last, lowest)
pair, and one flusher sends every pending symbol to Redis as soon as the previous round trip
is back. At a few hundred ticks a second that is one round trip per tick, as before; at tens
of thousands, ticks that arrive during a round trip share the next one, so the feed is never
held up by Redis. Nothing is lost by coalescing: the script stores the last price and checks
the batch's lowest, atomically with the stop-loss index, so a stop-loss that any tick of the
batch breached fires. A batch that cannot be written (Redis away) stays pending and is
retried, merged with what came after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from decimal import Decimal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from server.cancellation import cancel_requested
from server.market.formats import FeedError, FeedFormat, Tick
from server.publisher import Publisher
from server.settle import settle
from server.stoploss import StopLossGuard
from server.store.state import RedisState
from server.store.stoploss import StopLossIndex

log = logging.getLogger(__name__)

HealthReport = Callable[[bool], Awaitable[None]]
MAX_MESSAGE_BYTES = 1024 * 1024
_BASE_BACKOFF_S = 0.2
_FLUSH_RETRY_S = 0.1


@dataclass(slots=True)
class _Pending:
    """Ticks of one symbol not yet in Redis: the newest price and the lowest since the last
    write."""

    last: Decimal
    low: Decimal
    # Wall clock (µs) of the batch's first tick: where tick-to-order latency starts.
    received_us: int = 0

    def merge_older(self, older: _Pending) -> None:
        self.low = min(self.low, older.low)
        self.received_us = older.received_us


def backoff_delay(attempt: int, cap_s: float, rng: random.Random) -> float:
    """Exponential with 'equal jitter': half fixed, half random, never above the cap."""
    ceiling = min(cap_s, _BASE_BACKOFF_S * float(2 ** min(attempt, 32)))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class MarketListener:
    def __init__(
        self,
        *,
        url: str,
        fmt: FeedFormat,
        guard: StopLossGuard,
        index: StopLossIndex,
        state: RedisState,
        publisher: Publisher,
        max_backoff_s: float,
        stale_s: float,
        compression: bool = False,
        report_health: HealthReport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._url = url
        self._fmt = fmt
        self._guard = guard
        self._index = index
        self._state = state
        self._publisher = publisher
        self._max_backoff = max_backoff_s
        self._stale_s = stale_s
        self._compression = compression
        self._report = report_health
        self._rng = rng or random.Random()
        self.stats: Counter[str] = Counter()
        self.connected = False
        self._symbols: frozenset[str] = frozenset()
        self._changed = asyncio.Event()
        self._last_tick: dict[str, float] = {}
        self._stale: set[str] = set()
        self._pending: dict[str, _Pending] = {}
        self._dirty = asyncio.Event()

    @property
    def symbols(self) -> frozenset[str]:
        return self._symbols

    @property
    def stale(self) -> frozenset[str]:
        return frozenset(self._stale)

    def watch(self, symbols: set[str] | frozenset[str]) -> None:
        """The symbols of live strategies; a change is sent to the feed at once."""
        new = frozenset(symbols)
        if new != self._symbols:
            now = asyncio.get_running_loop().time()
            for symbol in new - self._symbols:
                self._last_tick.setdefault(symbol, now)  # staleness counts from here
            self._symbols = new
            self._changed.set()

    def add(self, symbol: str) -> None:
        self.watch(self._symbols | {symbol})

    async def run(self) -> None:
        """Connect, read, reconnect; forever (cancel to stop)."""
        # The flusher outlives connections: ticks read just before a drop are still written.
        flusher = asyncio.create_task(self._flush_forever(), name="market-flusher")
        try:
            await self._read_forever()
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher

    async def _read_forever(self) -> None:
        attempt = 0
        while True:
            try:
                async with connect(
                    self._url,
                    open_timeout=10,
                    max_size=MAX_MESSAGE_BYTES,
                    ping_interval=20,
                    compression="deflate" if self._compression else None,
                ) as ws:
                    attempt = 0
                    await self._session(ws)
            except (OSError, TimeoutError, WebSocketException) as exc:
                log.warning("feed %s: %s", self._url, exc or type(exc).__name__)
            self._set_connected(False)
            if cancel_requested():  # a library turned our cancel into an error or a close
                raise asyncio.CancelledError
            self.stats["reconnects"] += 1
            await asyncio.sleep(backoff_delay(attempt, self._max_backoff, self._rng))
            attempt += 1

    async def _session(self, ws: ClientConnection) -> None:
        log.info("feed connected: %s", self._url)
        self._set_connected(True)
        self._changed.set()  # (re)subscribe on every connect
        subscriber = asyncio.create_task(self._subscribe_on_change(ws))
        try:
            async for message in ws:
                await self.handle(message)
                if cancel_requested():  # swallowed by a Redis call (server.cancellation)
                    raise asyncio.CancelledError
        finally:
            subscriber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await subscriber

    async def _subscribe_on_change(self, ws: ClientConnection) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            message = self._fmt.subscribe(sorted(self._symbols))
            if message is not None and self._symbols:
                await ws.send(message)
                self.stats["subscribes"] += 1

    async def handle(self, message: str | bytes) -> None:
        """One feed message: every valid tick of a watched symbol is stored and checked."""
        self.stats["messages"] += 1
        for item in self._fmt.parse(message):
            if isinstance(item, FeedError):
                self._count(item.reason, str(item))
            elif item.symbol not in self._symbols:
                self._count("unknown_symbol", item.symbol)
            else:
                self._tick(item)

    def _tick(self, tick: Tick) -> None:
        self._last_tick[tick.symbol] = asyncio.get_running_loop().time()
        self.stats["ticks"] += 1
        pending = self._pending.get(tick.symbol)
        if pending is None:
            self._pending[tick.symbol] = _Pending(tick.price, tick.price, time.time_ns() // 1000)
        else:
            pending.last = tick.price
            pending.low = min(pending.low, tick.price)
        self._dirty.set()

    async def _flush_forever(self) -> None:
        while not cancel_requested():  # a cancel swallowed by a Redis call still ends it
            await self._dirty.wait()
            self._dirty.clear()
            batch, self._pending = self._pending, {}
            failed = await self._flush(batch)
            if failed:
                for symbol, older in failed.items():
                    newer = self._pending.get(symbol)
                    if newer is None:
                        self._pending[symbol] = older
                    else:
                        newer.merge_older(older)
                await asyncio.sleep(_FLUSH_RETRY_S)
                self._dirty.set()

    async def _flush(self, batch: dict[str, _Pending]) -> dict[str, _Pending]:
        """Writes and checks each symbol's batch side by side; returns the ones that failed."""
        symbols = list(batch)
        results = await settle(
            [
                self._guard.on_price(s, batch[s].last, batch[s].low, batch[s].received_us)
                for s in symbols
            ]
        )
        failed: dict[str, _Pending] = {}
        for symbol, result in zip(symbols, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                self._count("store_errors", str(result))  # Redis away: kept, retried
                failed[symbol] = batch[symbol]
            else:
                self.stats["stoploss_fired"] += result
        return failed

    def _count(self, reason: str, detail: str) -> None:
        self.stats[reason] += 1
        # The first few of each kind are logged in full; the rest only counted. Ticks of
        # symbols nobody trades are normal on a shared feed: informational only.
        level = logging.INFO if reason == "unknown_symbol" else logging.WARNING
        if self.stats[reason] <= 5 or self.stats[reason] % 1000 == 0:
            log.log(level, "feed: %s (%d so far): %s", reason, self.stats[reason], detail[:200])

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected

    async def check_staleness(self) -> set[str]:
        """Symbols holding positions with no tick for stale_s; reports each change once."""
        now = asyncio.get_running_loop().time()
        stale: set[str] = set()
        for symbol in self._symbols:
            quiet = now - self._last_tick.get(symbol, now)
            if quiet >= self._stale_s and await self._index.armed_count(symbol) > 0:
                stale.add(symbol)
        for symbol in stale - self._stale:
            log.warning("feed: no price for %s for %.0fs", symbol, self._stale_s)
            await self._notify(symbol, f"no price for {symbol} for {self._stale_s:g}s")
        for symbol in self._stale - stale:
            await self._notify(symbol, f"prices for {symbol} flowing again")
        self._stale = stale
        if self._report is not None:
            await self._report(self.connected and not stale)
        return stale

    async def _notify(self, symbol: str, notice: str) -> None:
        """A runtime event carrying the notice, for every position on the symbol."""
        for strategy_id in await self._index.armed_ids(symbol):
            runtime = await self._state.get_runtime(strategy_id)
            if runtime is not None:
                await self._publisher.notice(replace(runtime, notice=notice))

    async def sweep(self) -> None:
        await self._guard.sweep(set(self._symbols))
