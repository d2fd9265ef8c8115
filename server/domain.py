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
    # The event was not valid in the strategy's state; nothing reached the broker.
    SKIPPED = "SKIPPED"

    @property
    def final(self) -> bool:
        return self in (
            OrderStatus.FILLED,
            OrderStatus.REJECTED,
            OrderStatus.FAILED,
            OrderStatus.SKIPPED,
        )


class Intent(StrEnum):
    """Why an order event exists; an intent of a run maps to one client order id."""

    BUY = "buy"
    SELL = "sell"
    STOPLOSS = "sl"
    EXIT = "exit"  # a user's Stop closing the position

    @property
    def kind(self) -> OrderKind:
        return {
            Intent.BUY: OrderKind.BUY,
            Intent.SELL: OrderKind.SELL,
            Intent.STOPLOSS: OrderKind.STOPLOSS,
            Intent.EXIT: OrderKind.SELL,
        }[self]

    @property
    def is_exit(self) -> bool:
        """Exits jump the queue: they are read before any BUY/SELL."""
        return self in (Intent.STOPLOSS, Intent.EXIT)


_ORDER_ID_RE = re.compile(r"^(stg_[0-9a-f]{32})-(\d+)-(buy|sell|sl|exit)(\d*)$")


def parse_client_order_id(order_id: str) -> tuple[str, int, Intent]:
    """(strategy id, run, intent) of one of our client order ids; ValueError otherwise."""
    match = _ORDER_ID_RE.fullmatch(order_id)
    if match is None:
        raise ValueError(f"{order_id!r} is not an algoplane client order id")
    return match.group(1), int(match.group(2)), Intent(match.group(3))


def client_order_id(strategy_id: str, run: int, intent: Intent, seq: int = 1) -> str:
    """Deterministic: the same run and intent always give the same id, so a retry after a
    timeout or a crash can never become a second order at a broker that dedupes."""
    suffix = f"{intent.value}{seq}" if intent is Intent.EXIT else intent.value
    return f"{strategy_id}-{run}-{suffix}"


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
    # Transient news about the strategy (a stale price feed); not part of the durable state.
    notice: str = ""


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
    return bool(STRATEGY_ID_RE.fullmatch(value))


def parse_decimal(field: str, raw: str) -> Decimal:
    """A positive, finite decimal with at most 8 decimals and 10 integer digits."""
    if not _DECIMAL_RE.fullmatch(raw):
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
    if not SYMBOL_RE.fullmatch(symbol):
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
    if not request_id.isprintable():
        raise InvalidArgument("request_id", "must not contain control characters")
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


@dataclass(frozen=True, slots=True)
class StopPlan:
    """What a Stop does: a new runtime to commit, or an exit order to send first."""

    runtime: Runtime
    exit_position: bool


def plan_stop(current: Runtime, keep_position: bool, now: datetime) -> StopPlan:
    """Live or failed-with-a-position -> STOPPED, after an exit unless keep_position.
    Stopping a stopped strategy changes nothing."""
    holding = current.position is Position.BOUGHT
    if current.status is StrategyStatus.STOPPED:  # kept its position, or a late fill
        return StopPlan(current, exit_position=holding and not keep_position)
    if not current.status.live and not (holding and current.status is StrategyStatus.FAILED):
        raise FailedPrecondition(
            f"strategy {current.strategy_id} is CREATED, not started"
            if current.status is StrategyStatus.CREATED
            else f"strategy {current.strategy_id} is already {current.status.value}"
        )
    if holding and not keep_position:
        return StopPlan(current, exit_position=True)
    stopped = replace(
        current,
        status=StrategyStatus.STOPPED,
        version=current.version + 1,
        updated_at=now,
        terminated_at=now,
    )
    return StopPlan(stopped, exit_position=False)


def refusal(intent: Intent, runtime: Runtime) -> str:
    """Why `intent` may not act on this runtime now; empty when it may."""
    if intent is Intent.BUY:
        if runtime.status is not StrategyStatus.SCHEDULED or runtime.position is not Position.NONE:
            return f"BUY needs a SCHEDULED strategy with no position, found {_state(runtime)}"
        return ""
    if runtime.position is not Position.BOUGHT:
        return f"{intent.kind.value} needs an open position, found {_state(runtime)}"
    if intent in (Intent.SELL, Intent.STOPLOSS) and runtime.status is not StrategyStatus.RUNNING:
        return f"{intent.kind.value} needs a RUNNING strategy, found {_state(runtime)}"
    return ""


def _state(runtime: Runtime) -> str:
    return f"{runtime.status.value}/{runtime.position.value}"


def _next(runtime: Runtime, now: datetime, **changes: object) -> Runtime:
    return replace(runtime, version=runtime.version + 1, updated_at=now, **changes)  # type: ignore[arg-type]


def order_submitted(runtime: Runtime, intent: Intent, order_id: str, now: datetime) -> Runtime:
    """The intent is committed: BUY makes the strategy RUNNING; every intent names its order."""
    field = {
        Intent.BUY: "last_buy_order_id",
        Intent.SELL: "last_sell_order_id",
        Intent.EXIT: "last_sell_order_id",
        Intent.STOPLOSS: "last_sl_order_id",
    }[intent]
    status = StrategyStatus.RUNNING if intent is Intent.BUY else runtime.status
    return _next(runtime, now, status=status, **{field: order_id})


def order_filled(runtime: Runtime, intent: Intent, price: Decimal, now: datetime) -> Runtime:
    if intent is Intent.BUY:
        return _next(runtime, now, position=Position.BOUGHT, entry_price=price, last_price=price)
    position = Position.EXITED_BY_SL if intent is Intent.STOPLOSS else Position.SOLD
    status = StrategyStatus.STOPPED if intent is Intent.EXIT else StrategyStatus.COMPLETED
    return _next(
        runtime,
        now,
        status=status,
        position=position,
        exit_price=price,
        last_price=price,
        failure_reason="",
        terminated_at=now,
    )


def strategy_failed(runtime: Runtime, reason: str, now: datetime) -> Runtime:
    """FAILED with the reason. A failed exit leaves the position BOUGHT and visible, so a Stop
    can retry the exit; only a flat strategy is terminated."""
    terminated = now if runtime.position is not Position.BOUGHT else None
    return _next(
        runtime, now, status=StrategyStatus.FAILED, failure_reason=reason, terminated_at=terminated
    )
