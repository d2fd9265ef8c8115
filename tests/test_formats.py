"""Feed formats against sample messages written from their public documentation."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.market.formats import BinanceFormat, FeedError, JsonFormat, Tick

# https://developers.binance.com/docs/binance-spot-api-docs/web-socket-streams#trade-streams
BINANCE_TRADE = {
    "e": "trade",
    "E": 1672515782136,
    "s": "BNBBTC",
    "t": 12345,
    "p": "0.001",
    "q": "100",
    "T": 1672515782136,
    "m": True,
    "M": True,
}


def ticks(parsed: list[Tick | FeedError]) -> list[Tick]:
    assert all(isinstance(item, Tick) for item in parsed), parsed
    return [item for item in parsed if isinstance(item, Tick)]


def reasons(parsed: list[Tick | FeedError]) -> list[str]:
    return [item.reason for item in parsed if isinstance(item, FeedError)]


def test_json_single_tick_with_epoch_ms() -> None:
    (tick,) = ticks(
        JsonFormat().parse('{"symbol": "SBIN", "price": "101.25", "ts": 1732456789123}')
    )
    assert tick == Tick("SBIN", Decimal("101.25"), datetime.fromtimestamp(1732456789.123, UTC))


def test_json_array_numbers_and_rfc3339() -> None:
    message = json.dumps(
        [
            {"symbol": "SBIN", "price": 101.5, "ts": "2026-11-24T09:15:00Z"},
            {"symbol": "INFY", "price": "1500"},
        ]
    )
    first, second = ticks(JsonFormat().parse(message))
    assert first == Tick("SBIN", Decimal("101.5"), datetime(2026, 11, 24, 9, 15, tzinfo=UTC))
    assert second == Tick("INFY", Decimal("1500"), None)


def test_json_prices_are_kept_to_eight_decimals() -> None:
    (tick,) = ticks(JsonFormat().parse('{"symbol": "X", "price": "1.123456789"}'))
    assert tick.price == Decimal("1.12345679")


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("not json", "malformed"),
        ("[]", "malformed"),
        ("42", "malformed"),
        ('{"symbol": "SBIN"}', "malformed"),
        ('{"action": "subscribe", "symbols": ["SBIN"]}', "control"),
        ('{"symbol": "sbin", "price": "1"}', "bad_symbol"),
        ('{"symbol": "SBIN\\n", "price": "1"}', "bad_symbol"),
        ('{"symbol": 7, "price": "1"}', "bad_symbol"),
        ('{"symbol": "SBIN", "price": "0"}', "bad_price"),
        ('{"symbol": "SBIN", "price": -3}', "bad_price"),
        ('{"symbol": "SBIN", "price": "NaN"}', "bad_price"),
        ('{"symbol": "SBIN", "price": NaN}', "bad_price"),
        ('{"symbol": "SBIN", "price": Infinity}', "bad_price"),
        ('{"symbol": "SBIN", "price": 1e400}', "bad_price"),
        ('{"symbol": "SBIN", "price": "1e99"}', "bad_price"),
        ('{"symbol": "SBIN", "price": "0.000000001"}', "bad_price"),
        ('{"symbol": "SBIN", "price": true}', "bad_price"),
        ('{"symbol": "SBIN", "price": "abc"}', "bad_price"),
        ('{"symbol": "SBIN", "price": null}', "bad_price"),
        ('{"symbol": "SBIN", "price": "1", "ts": "yesterday"}', "bad_ts"),
        ('{"symbol": "SBIN", "price": "1", "ts": "2026-11-24T09:15:00"}', "bad_ts"),
        ('{"symbol": "SBIN", "price": "1", "ts": 1e30}', "bad_ts"),
        ('{"symbol": "SBIN", "price": "1", "ts": 99999999999999999999}', "bad_ts"),
        ("[" * 100_000, "malformed"),
    ],
)
def test_json_bad_input_is_a_counted_reason(message: str, reason: str) -> None:
    assert reasons(JsonFormat().parse(message)) == [reason]


def test_json_one_bad_tick_does_not_cost_the_good_ones() -> None:
    parsed = JsonFormat().parse('[{"symbol": "A", "price": "1"}, {"symbol": "B", "price": "x"}]')
    assert parsed[0] == Tick("A", Decimal("1"), None)
    assert reasons(parsed) == ["bad_price"]


def test_json_subscribe_message() -> None:
    assert json.loads(JsonFormat().subscribe(["INFY", "SBIN"]) or "") == {
        "action": "subscribe",
        "symbols": ["INFY", "SBIN"],
    }


def test_binance_trade() -> None:
    (tick,) = ticks(BinanceFormat().parse(json.dumps(BINANCE_TRADE)))
    assert tick == Tick("BNBBTC", Decimal("0.001"), datetime.fromtimestamp(1672515782.136, UTC))


def test_binance_combined_stream_wrapper() -> None:
    message = json.dumps({"stream": "bnbbtc@trade", "data": BINANCE_TRADE})
    assert ticks(BinanceFormat().parse(message))[0].symbol == "BNBBTC"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"result": None, "id": 1}, "control"),
        ({**BINANCE_TRADE, "e": "aggTrade"}, "malformed"),
        ({k: v for k, v in BINANCE_TRADE.items() if k != "p"}, "malformed"),
        ({**BINANCE_TRADE, "p": "-1"}, "bad_price"),
        ({**BINANCE_TRADE, "s": "bnbbtc"}, "bad_symbol"),
        ([BINANCE_TRADE], "malformed"),
    ],
)
def test_binance_bad_input(message: object, reason: str) -> None:
    assert reasons(BinanceFormat().parse(json.dumps(message))) == [reason]


def test_binance_subscribe_message() -> None:
    assert json.loads(BinanceFormat().subscribe(["BTCUSDT"]) or "") == {
        "method": "SUBSCRIBE",
        "params": ["btcusdt@trade"],
        "id": 1,
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(["symbol", "price", "ts", "e", "s", "p", "T", "data", "stream"]),
            children,
            max_size=6,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200), json_values.map(json.dumps)))
def test_no_message_makes_a_format_raise(message: str | bytes) -> None:
    for fmt in (JsonFormat(), BinanceFormat()):
        for item in fmt.parse(message):
            assert isinstance(item, Tick | FeedError)
            if isinstance(item, Tick):
                assert item.price > 0
