"""PaperBroker: market orders fill at the last `price:{symbol}`; no price -> rejected.

It keeps its orders in Redis, keyed by client order id, so it behaves like a real broker that
dedupes: every server process sharing the Redis sees one book, and a second place with the same
id returns the first order. Latency, timeouts that take effect, and errors that do not are
injectable, so faults can be seen from outside.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import secrets
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from redis.asyncio import Redis

from server.brokers.base import (
    AmbiguousBrokerError,
    BrokerOrder,
    BrokerOrderStatus,
    Side,
)
from server.domain import format_decimal
from server.store import keys, scripts
from server.store.connection import execute, queue_script


@dataclass(slots=True)
class _Placement:
    client_order_id: str
    symbol: str
    side: Side
    quantity: int
    entered_ns: int
    stored: asyncio.Future[str]


class PaperBroker:
    def __init__(
        self,
        *,
        redis: Redis,
        latency_s: float = 0.0,
        timeout_rate: float = 0.0,
        error_rate: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self._redis = redis
        self._latency = latency_s
        self._timeout_rate = timeout_rate
        self._error_rate = error_rate
        self._rng = rng or random.Random()
        self._place = redis.register_script(scripts.PAPER_PLACE)
        # Orders placed in one turn of the loop go to the book together (see _book).
        self._waiting: list[_Placement] = []
        # Broker order ids: unique per broker instance (a random part) and per order (a count).
        self._id_prefix = secrets.token_hex(6)
        self._ids = itertools.count(1)
        self._flushes: set[asyncio.Task[None]] = set()

    async def place_order(
        self, client_order_id: str, symbol: str, side: Side, quantity: int
    ) -> BrokerOrder:
        # Wall clock at entry, before the simulated latency: benchmarks read it from the book
        # to split "tick/timer -> broker call" from the broker's own time.
        entered_ns = time.time_ns()
        await self._delay()
        if self._rng.random() < self._error_rate:
            raise AmbiguousBrokerError("paper broker: connection reset before the order")
        stored = await self._book(client_order_id, symbol, side, quantity, entered_ns)
        if self._rng.random() < self._timeout_rate:
            raise AmbiguousBrokerError("paper broker: timed out after the order took effect")
        return _decode(stored)

    async def get_order(self, client_order_id: str) -> BrokerOrder | None:
        await self._delay()
        raw = await self._redis.hget(keys.PAPER_ORDERS, client_order_id)
        return _decode(str(raw)) if raw is not None else None

    async def _delay(self) -> None:
        if self._latency > 0:
            await asyncio.sleep(self._latency)

    def _book(
        self, client_order_id: str, symbol: str, side: Side, quantity: int, entered_ns: int
    ) -> asyncio.Future[str]:
        """The order as the book stores it. Orders placed in the same turn of the loop (the
        engine places a batch side by side) are stored together, two round trips for all,
        as a broker's basket API would take them; each still fills at the price when it
        reaches the book and is deduped by its own client order id."""
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[str] = loop.create_future()
        self._waiting.append(
            _Placement(client_order_id, symbol, side, quantity, entered_ns, stored)
        )
        if len(self._waiting) == 1:
            flush = loop.create_task(self._flush())
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)
        return stored

    async def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        try:
            replies = await self._store(batch)
        except Exception as exc:  # noqa: BLE001 - each caller gets what one call would have
            for placement in batch:
                if not placement.stored.done():
                    placement.stored.set_exception(exc)
            return
        for placement, raw in zip(batch, replies, strict=True):
            if not placement.stored.done():  # done: its caller gave up (a timeout)
                placement.stored.set_result(str(raw))

    def _fill(self, client_order_id: str, symbol: str, price: Decimal | None) -> BrokerOrder:
        """A market order fills at the last price; with no price it is rejected."""
        if price is None:
            return BrokerOrder(
                client_order_id, "", BrokerOrderStatus.REJECTED, reason=f"no price for {symbol}"
            )
        broker_id = f"paper-{self._id_prefix}-{next(self._ids)}"
        return BrokerOrder(client_order_id, broker_id, BrokerOrderStatus.FILLED, price)

    async def _store(self, batch: list[_Placement]) -> list[Any]:
        symbols = list(dict.fromkeys(placement.symbol for placement in batch))
        async with self._redis.pipeline(transaction=False) as pipe:
            for symbol in symbols:
                pipe.get(keys.price(symbol))
            prices = dict(zip(symbols, map(_price, await execute(pipe)), strict=True))
        async with self._redis.pipeline(transaction=False) as pipe:
            for p in batch:
                order = self._fill(p.client_order_id, p.symbol, prices[p.symbol])
                stored = _encode(order, p.symbol, p.side, p.quantity, p.entered_ns)
                args = [p.client_order_id, stored]
                queue_script(pipe, self._place, [keys.PAPER_ORDERS, keys.PAPER_LOG], args)
            return list(await execute(pipe))


def _price(raw: Any) -> Decimal | None:
    try:
        return Decimal(str(raw)) if raw is not None else None
    except InvalidOperation:
        return None


def _encode(order: BrokerOrder, symbol: str, side: Side, quantity: int, entered_ns: int) -> str:
    return json.dumps(
        {
            "client_order_id": order.client_order_id,
            "broker_order_id": order.broker_order_id,
            "status": order.status.value,
            "fill_price": format_decimal(order.fill_price),
            "reason": order.reason,
            "symbol": symbol,
            "side": side.value,
            "quantity": quantity,
            "entered_ns": entered_ns,
        }
    )


def _decode(raw: str) -> BrokerOrder:
    data = cast(dict[str, Any], json.loads(raw))
    fill = str(data.get("fill_price") or "")
    return BrokerOrder(
        client_order_id=str(data["client_order_id"]),
        broker_order_id=str(data["broker_order_id"]),
        status=BrokerOrderStatus(data["status"]),
        fill_price=Decimal(fill) if fill else None,
        reason=str(data.get("reason", "")),
    )
