"""The Broker contract, run against every adapter (today: PaperBroker on a real Redis)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from server.brokers.base import (
    AmbiguousBrokerError,
    Broker,
    BrokerOrder,
    BrokerOrderStatus,
    InvalidBrokerReply,
    Side,
    check_reply,
)
from server.brokers.metered import MeteredBroker
from server.brokers.paper import PaperBroker
from server.metrics import Metrics
from server.store.state import RedisState


def paper(state: RedisState, timeout_rate: float = 0.0, error_rate: float = 0.0) -> PaperBroker:
    return PaperBroker(redis=state.client, timeout_rate=timeout_rate, error_rate=error_rate)


@pytest.fixture(params=["paper", "metered-paper"])
def broker(request: pytest.FixtureRequest, state: RedisState) -> Broker:
    if request.param == "metered-paper":  # the wrapper the app puts around every adapter
        return MeteredBroker(broker=paper(state), metrics=Metrics())
    return paper(state)


async def test_market_order_fills_at_the_last_price(broker: Broker, state: RedisState) -> None:
    await state.client.set("price:{SBIN}", "101.25")
    order = await broker.place_order("c-1", "SBIN", Side.BUY, 10)
    assert order.status is BrokerOrderStatus.FILLED
    assert order.fill_price == Decimal("101.25")
    assert check_reply(order, "c-1") == order
    assert await broker.get_order("c-1") == order


async def test_same_client_order_id_returns_the_first_order(
    broker: Broker, state: RedisState
) -> None:
    await state.client.set("price:{SBIN}", "100")
    first = await broker.place_order("c-2", "SBIN", Side.BUY, 10)
    await state.client.set("price:{SBIN}", "90")
    again = await broker.place_order("c-2", "SBIN", Side.BUY, 10)
    assert again == first
    assert await state.client.lrange("{paper}:log", 0, -1) == ["c-2"]


async def test_no_price_is_rejected_with_a_reason(broker: Broker) -> None:
    order = await broker.place_order("c-3", "NOPE", Side.SELL, 1)
    assert order.status is BrokerOrderStatus.REJECTED
    assert order.reason == "no price for NOPE"


async def test_unknown_order_is_none(broker: Broker) -> None:
    assert await broker.get_order("never-placed") is None


async def test_timeout_after_effect_is_ambiguous_but_found(state: RedisState) -> None:
    await state.client.set("price:{SBIN}", "100")
    broker = paper(state, timeout_rate=1.0)
    with pytest.raises(AmbiguousBrokerError):
        await broker.place_order("c-4", "SBIN", Side.BUY, 10)
    found = await broker.get_order("c-4")
    assert found is not None and found.status is BrokerOrderStatus.FILLED


async def test_error_before_effect_is_ambiguous_and_absent(state: RedisState) -> None:
    await state.client.set("price:{SBIN}", "100")
    broker = paper(state, error_rate=1.0)
    with pytest.raises(AmbiguousBrokerError):
        await broker.place_order("c-5", "SBIN", Side.BUY, 10)
    assert await broker.get_order("c-5") is None
    assert await state.client.llen("{paper}:log") == 0


@pytest.mark.parametrize(
    "reply",
    [
        BrokerOrder("other-id", "b-1", BrokerOrderStatus.FILLED, Decimal("1")),
        BrokerOrder("c-6", "b-1", BrokerOrderStatus.FILLED, None),
        BrokerOrder("c-6", "b-1", BrokerOrderStatus.FILLED, Decimal("0")),
        BrokerOrder("c-6", "b-1", BrokerOrderStatus.FILLED, Decimal("NaN")),
        BrokerOrder("c-6", "", BrokerOrderStatus.ACCEPTED),
    ],
)
def test_replies_that_do_not_validate_are_ambiguous(reply: BrokerOrder) -> None:
    with pytest.raises(InvalidBrokerReply):
        check_reply(reply, "c-6")


async def test_two_paper_brokers_share_one_book(state: RedisState) -> None:
    """Two PaperBroker instances (two server processes) share one book."""
    await state.client.set("price:{SBIN}", "5")
    one, two = paper(state), paper(state)
    first = await one.place_order("c-7", "SBIN", Side.BUY, 1)
    assert await two.place_order("c-7", "SBIN", Side.BUY, 1) == first
