"""The Broker protocol every adapter implements, and the typed results it returns.

A rejection is a normal outcome, so it is a returned `BrokerOrder` with status REJECTED.
Only a failure whose outcome is unknown (timeout, connection error, 5xx) is an exception,
`AmbiguousBrokerError`: the order may or may not have reached the market, so the caller asks
`get_order` before it places again with the same client order id.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Protocol


class Side(StrEnum):
    BUY = "BUY"
    SELL = "SELL"


class BrokerOrderStatus(StrEnum):
    ACCEPTED = "ACCEPTED"  # live at the broker, not filled yet
    FILLED = "FILLED"
    REJECTED = "REJECTED"


@dataclass(frozen=True, slots=True)
class BrokerOrder:
    client_order_id: str
    broker_order_id: str
    status: BrokerOrderStatus
    fill_price: Decimal | None = None
    reason: str = ""


class AmbiguousBrokerError(Exception):
    """The call failed and whether the order exists is unknown (timeout, reset, 5xx)."""


class InvalidBrokerReply(AmbiguousBrokerError):
    """The broker answered something we cannot trust; treated as an unknown outcome."""


class Broker(Protocol):
    async def place_order(
        self, client_order_id: str, symbol: str, side: Side, quantity: int
    ) -> BrokerOrder:
        """Places a market order. Placing an id the broker already knows returns that order."""
        ...

    async def get_order(self, client_order_id: str) -> BrokerOrder | None:
        """The order with this client order id, or None when the broker has none."""
        ...


def check_reply(reply: BrokerOrder, client_order_id: str) -> BrokerOrder:
    """Validates a broker reply before anything is recorded from it."""
    if reply.client_order_id != client_order_id:
        raise InvalidBrokerReply(
            f"reply for {reply.client_order_id!r}, expected {client_order_id!r}"
        )
    if reply.status is BrokerOrderStatus.FILLED and (
        reply.fill_price is None or not reply.fill_price.is_finite() or reply.fill_price <= 0
    ):
        raise InvalidBrokerReply(f"filled order {client_order_id} without a valid fill price")
    if reply.status is not BrokerOrderStatus.REJECTED and not reply.broker_order_id:
        raise InvalidBrokerReply(f"order {client_order_id} has no broker order id")
    return reply
