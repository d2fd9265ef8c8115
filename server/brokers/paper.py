"""PaperBroker: market orders fill at the last `price:{symbol}`; no price -> rejected.

It keeps its orders in Redis, keyed by client order id, so it behaves like a real broker that
dedupes: every server process sharing the Redis sees one book, and a second place with the same
id returns the first order. Latency, timeouts that take effect, and errors that do not are
injectable, so faults can be seen from outside.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from decimal import Decimal
from typing import Any, Protocol, cast

from redis.asyncio import Redis

from server.brokers.base import (
    AmbiguousBrokerError,
    BrokerOrder,
    BrokerOrderStatus,
    Side,
)
from server.domain import format_decimal
from server.store import keys, scripts


class PriceSource(Protocol):
    async def last_price(self, symbol: str) -> Decimal | None: ...


class PaperBroker:
    def __init__(
        self,
        *,
        redis: Redis,
        prices: PriceSource,
        latency_s: float = 0.0,
        timeout_rate: float = 0.0,
        error_rate: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self._redis = redis
        self._prices = prices
        self._latency = latency_s
        self._timeout_rate = timeout_rate
        self._error_rate = error_rate
        self._rng = rng or random.Random()
        self._place = redis.register_script(scripts.PAPER_PLACE)

    async def place_order(
        self, client_order_id: str, symbol: str, side: Side, quantity: int
    ) -> BrokerOrder:
        # Wall clock at entry, before the simulated latency: benchmarks read it from the book
        # to split "tick/timer -> broker call" from the broker's own time.
        entered_ns = time.time_ns()
        await self._delay()
        if self._rng.random() < self._error_rate:
            raise AmbiguousBrokerError("paper broker: connection reset before the order")
        price = await self._prices.last_price(symbol)
        order = (
            BrokerOrder(
                client_order_id,
                f"paper-{secrets.token_hex(8)}",
                BrokerOrderStatus.FILLED,
                price,
            )
            if price is not None
            else BrokerOrder(
                client_order_id, "", BrokerOrderStatus.REJECTED, reason=f"no price for {symbol}"
            )
        )
        stored = await self._place(
            keys=[keys.PAPER_ORDERS, keys.PAPER_LOG],
            args=[client_order_id, _encode(order, symbol, side, quantity, entered_ns)],
        )
        if self._rng.random() < self._timeout_rate:
            raise AmbiguousBrokerError("paper broker: timed out after the order took effect")
        return _decode(str(stored))

    async def get_order(self, client_order_id: str) -> BrokerOrder | None:
        await self._delay()
        raw = await self._redis.hget(keys.PAPER_ORDERS, client_order_id)
        return _decode(str(raw)) if raw is not None else None

    async def _delay(self) -> None:
        if self._latency > 0:
            await asyncio.sleep(self._latency)


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
