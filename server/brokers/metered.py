"""MeteredBroker: any Broker, with every call timed into algoplane_broker_call_seconds.

A wrapper rather than timers in the engine, so every adapter is measured the same way and the
engine's code stays about orders.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

from server.brokers.base import Broker, BrokerOrder, Side
from server.metrics import Metrics

T = TypeVar("T")


class MeteredBroker:
    def __init__(self, *, broker: Broker, metrics: Metrics) -> None:
        self._broker = broker
        self._metrics = metrics

    async def place_order(
        self, client_order_id: str, symbol: str, side: Side, quantity: int
    ) -> BrokerOrder:
        call = self._broker.place_order(client_order_id, symbol, side, quantity)
        return await self._timed("place_order", call)

    async def get_order(self, client_order_id: str) -> BrokerOrder | None:
        return await self._timed("get_order", self._broker.get_order(client_order_id))

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await call
            outcome = "ok"
            return result
        except asyncio.CancelledError:  # the engine's broker timeout (or shutdown)
            outcome = "cancelled"
            raise
        finally:
            self._metrics.broker_call(operation, outcome, time.perf_counter() - started)
