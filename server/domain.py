"""Strategy, runtime and order types, input rules and the strategy state machine. No I/O."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum

from server.errors import FailedPrecondition, InvalidArgument

SYMBOL_RE = re.compile(r"^[A-Z0-9][A-Z0-9:._-]{0,31}$")
STRATEGY_ID_RE = re.compile(r"^stg_[0-9a-f]{32}$")
_DECIMAL_RE = re.compile(r"^[0-9]{1,10}(\.[0-9]{1,8})?$")
MAX_QUANTITY = 10**9
MAX_HOLD = timedelta(days=7)
MAX_REQUEST_ID = 64


class StrategyStatus(StrEnum):
    CREATED = "CREATED"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    STOPPED = "STOPPED"
    FAILED = "FAILED"

    @property
    def live(self) -> bool:
        """Started and not yet ended: the strategy is hot in Redis."""
        return self in (StrategyStatus.SCHEDULED, StrategyStatus.RUNNING)


class Position(StrEnum):
    NONE = "NONE"
    BOUGHT = "BOUGHT"
    SOLD = "SOLD"
    EXITED_BY_SL = "EXITED_BY_SL"


class OrderKind(StrEnum):
    BUY = "BUY"
    SELL = "SELL"
    STOPLOSS = "STOPLOSS"


class OrderStatus(StrEnum):
    PENDING = "PENDING"
    SUBMITTED = "SUBMITTED"
    FILLED = "FILLED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True, slots=True)
class StrategySpec:
    symbol: str
    quantity: int
    buy_time: datetime
    sell_time: datetime
    stop_loss: Decimal


@dataclass(frozen=True, slots=True)
class Strategy:
    id: str
    tenant: str
    spec: StrategySpec
    status: StrategyStatus
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Runtime:
    """The live state of one strategy; `version` grows by one with every change."""

    strategy_id: str
    tenant: str
    symbol: str
    status: StrategyStatus
    position: Position
    version: int
    run: int
    updated_at: datetime
    entry_price: Decimal | None = None
    exit_price: Decimal | None = None
    last_price: Decimal | None = None
    last_buy_order_id: str = ""
    last_sell_order_id: str = ""
    last_sl_order_id: str = ""
    failure_reason: str = ""
    terminated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Order:
    id: str
    tenant: str
    strategy_id: str
    symbol: str
    kind: OrderKind
    status: OrderStatus
    quantity: int
    attempts: int
    created_at: datetime
    updated_at: datetime
    fill_price: Decimal | None = None
    broker_order_id: str = ""
    error: str = ""


def new_strategy_id(now: datetime) -> str:
    """Millisecond time first, so ids sort by creation and can serve as a page cursor."""
    millis = int(now.timestamp() * 1000)
    return f"stg_{millis:012x}{secrets.token_hex(10)}"


def is_strategy_id(value: str) -> bool:
    return bool(STRATEGY_ID_RE.match(value))


def parse_decimal(field: str, raw: str) -> Decimal:
    """A positive, finite decimal with at most 8 decimals and 10 integer digits."""
    if not _DECIMAL_RE.match(raw):
        raise InvalidArgument(
            field, "must be a positive decimal string with at most 8 decimals, e.g. '101.25'"
        )
    try:
        value = Decimal(raw)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        raise InvalidArgument(field, "is not a decimal") from None
    if value <= 0:
        raise InvalidArgument(field, "must be greater than zero")
    return value


def format_decimal(value: Decimal | None) -> str:
    """Canonical text: no exponent, no trailing zeros ('101.25', '100')."""
    if value is None:
        return ""
    text = f"{value.normalize():f}"
    return text


def validate_symbol(field: str, symbol: str) -> str:
    if not SYMBOL_RE.match(symbol):
        raise InvalidArgument(
            field, "must match ^[A-Z0-9][A-Z0-9:._-]{0,31}$ (upper case, at most 32 characters)"
        )
    return symbol


def validate_quantity(field: str, quantity: int) -> int:
    if not 1 <= quantity <= MAX_QUANTITY:
        raise InvalidArgument(field, f"must be between 1 and {MAX_QUANTITY}")
    return quantity


def validate_times(buy_time: datetime, sell_time: datetime) -> None:
    if sell_time <= buy_time:
        raise InvalidArgument("spec.sell_time", "must be after spec.buy_time")
    if sell_time - buy_time > MAX_HOLD:
        raise InvalidArgument("spec.sell_time", "must be within 7 days of spec.buy_time")


def require_future_buy(spec: StrategySpec, now: datetime) -> None:
    """New specs must be schedulable: their BUY instant is still ahead."""
    if spec.buy_time <= now:
        raise InvalidArgument("spec.buy_time", "must be in the future")


def validate_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument("request_id", f"must be at most {MAX_REQUEST_ID} characters")
    return request_id


def start_runtime(strategy: Strategy, current: Runtime, now: datetime) -> Runtime:
    """CREATED/STOPPED (flat) -> SCHEDULED, as a new run so its order ids are new."""
    if strategy.status.live:
        raise FailedPrecondition(f"strategy {strategy.id} is already {strategy.status.value}")
    if strategy.status not in (StrategyStatus.CREATED, StrategyStatus.STOPPED):
        raise FailedPrecondition(
            f"strategy {strategy.id} is {strategy.status.value}; create a new strategy"
        )
    if current.position is Position.BOUGHT:
        raise FailedPrecondition(f"strategy {strategy.id} still holds a position")
    if strategy.spec.buy_time <= now:
        raise FailedPrecondition(
            f"strategy {strategy.id} cannot start: spec.buy_time "
            f"{strategy.spec.buy_time.isoformat()} has passed"
        )
    return Runtime(
        strategy_id=strategy.id,
        tenant=strategy.tenant,
        symbol=strategy.spec.symbol,
        status=StrategyStatus.SCHEDULED,
        position=Position.NONE,
        version=current.version + 1,
        run=current.run + 1,
        updated_at=now,
    )


def stop_runtime(current: Runtime, now: datetime) -> Runtime:
    """SCHEDULED/RUNNING -> STOPPED. Stopping a stopped strategy is a no-op."""
    if current.status is StrategyStatus.STOPPED:
        return current
    if not current.status.live:
        raise FailedPrecondition(
            f"strategy {current.strategy_id} is {current.status.value}, not started"
            if current.status is StrategyStatus.CREATED
            else f"strategy {current.strategy_id} is already {current.status.value}"
        )
    return replace(
        current,
        status=StrategyStatus.STOPPED,
        version=current.version + 1,
        updated_at=now,
        terminated_at=now,
    )
