"""Feed formats: one small adapter per wire format, turning a websocket message into ticks.

Everything from the feed is untrusted: a message that does not parse, a symbol outside our
pattern, or a price that is not a positive finite decimal becomes a FeedError with a reason
the listener counts. One bad tick in an array does not cost the good ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Literal, Protocol

from server.domain import SYMBOL_RE

_EIGHT_PLACES = Decimal("0.00000001")
MAX_PRICE = Decimal("9999999999.99999999")  # 10 integer digits, 8 decimals


class FeedError(ValueError):
    """A message or tick we cannot use; `reason` is a short counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Tick:
    symbol: str
    price: Decimal
    ts: datetime | None = None


Parsed = list["Tick | FeedError"]


class FeedFormat(Protocol):
    name: str

    def parse(self, message: str | bytes) -> Parsed:
        """Each tick of one message, or the FeedError that tick (or the message) raised."""
        ...

    def subscribe(self, symbols: list[str]) -> str | None:
        """The message asking the feed for these symbols (None: the feed has none)."""
        ...


def parse_price(raw: Any) -> Decimal:
    """A positive finite price from a decimal string or a JSON number, to 8 decimals."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise FeedError("bad_price", f"price {raw!r} is not a number")
    if isinstance(raw, float) and not math.isfinite(raw):
        raise FeedError("bad_price", f"price {raw!r} is not finite")
    try:
        price = Decimal(str(raw).strip())
    except InvalidOperation:
        raise FeedError("bad_price", f"price {raw!r} is not a decimal") from None
    if not price.is_finite() or price <= 0:
        raise FeedError("bad_price", f"price {raw!r} is not positive and finite")
    if price > MAX_PRICE:
        raise FeedError("bad_price", f"price {raw!r} is out of range")
    price = price.quantize(_EIGHT_PLACES, rounding=ROUND_HALF_EVEN)
    if price <= 0:
        raise FeedError("bad_price", f"price {raw!r} rounds to zero at 8 decimals")
    return price


def parse_symbol(raw: Any) -> str:
    if not isinstance(raw, str) or not SYMBOL_RE.fullmatch(raw):
        raise FeedError("bad_symbol", f"symbol {raw!r} is not a valid symbol")
    return raw


def parse_ts(raw: Any) -> datetime | None:
    """Epoch milliseconds or RFC 3339; absent is fine."""
    if raw is None:
        return None
    if isinstance(raw, int) and not isinstance(raw, bool):
        try:
            return datetime.fromtimestamp(raw / 1000, UTC)
        except (OverflowError, OSError, ValueError):
            raise FeedError("bad_ts", f"ts {raw!r} is out of range") from None
    if isinstance(raw, str):
        try:
            value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise FeedError("bad_ts", f"ts {raw!r} is not RFC 3339") from None
        if value.tzinfo is None:
            raise FeedError("bad_ts", f"ts {raw!r} has no timezone")
        return value.astimezone(UTC)
    raise FeedError("bad_ts", f"ts {raw!r} is neither epoch ms nor RFC 3339")


def _load(message: str | bytes) -> Any:
    try:
        return json.loads(message)
    except (ValueError, RecursionError):
        raise FeedError("malformed", "not JSON") from None


class JsonFormat:
    """`{"symbol": "SBIN", "price": "101.25", "ts": 1732456789123}` or an array of them."""

    name = "json"

    def parse(self, message: str | bytes) -> Parsed:
        try:
            data = _load(message)
        except FeedError as exc:
            return [exc]
        items = data if isinstance(data, list) else [data]
        if not items:
            return [FeedError("malformed", "empty array")]
        return [_guard(self._tick, item) for item in items]

    def _tick(self, item: Any) -> Tick:
        if not isinstance(item, dict):
            raise FeedError("malformed", "a tick must be an object")
        if "symbol" not in item or "price" not in item:
            if "action" in item or "result" in item:  # an echo or ack of a control message
                raise FeedError("control", "not a tick")
            raise FeedError("malformed", "a tick needs symbol and price")
        return Tick(
            parse_symbol(item["symbol"]), parse_price(item["price"]), parse_ts(item.get("ts"))
        )

    def subscribe(self, symbols: list[str]) -> str | None:
        return json.dumps({"action": "subscribe", "symbols": symbols})


class BinanceFormat:
    """Binance spot trade stream: `{"e":"trade","s":"BTCUSDT","p":"...","T":...}`, raw or
    wrapped by a combined stream as `{"stream": "...", "data": {...}}`."""

    name = "binance"

    def parse(self, message: str | bytes) -> Parsed:
        return [_guard(self._trade, message)]

    def _trade(self, message: str | bytes) -> Tick:
        data = _load(message)
        if isinstance(data, dict) and isinstance(data.get("data"), dict) and "stream" in data:
            data = data["data"]
        if not isinstance(data, dict):
            raise FeedError("malformed", "a trade must be an object")
        if data.get("e") != "trade":
            if "result" in data or "id" in data:  # the reply to SUBSCRIBE
                raise FeedError("control", "not a trade")
            raise FeedError("malformed", f"event type {data.get('e')!r} is not 'trade'")
        if "s" not in data or "p" not in data:
            raise FeedError("malformed", "a trade needs s and p")
        return Tick(parse_symbol(data["s"]), parse_price(data["p"]), parse_ts(data.get("T")))

    def subscribe(self, symbols: list[str]) -> str | None:
        streams = [f"{symbol.lower()}@trade" for symbol in symbols]
        return json.dumps({"method": "SUBSCRIBE", "params": streams, "id": 1})


def _guard(parse: Callable[[Any], Tick], item: Any) -> Tick | FeedError:
    try:
        return parse(item)
    except FeedError as exc:
        return exc


def feed_format(name: Literal["json", "binance"]) -> FeedFormat:
    return JsonFormat() if name == "json" else BinanceFormat()
