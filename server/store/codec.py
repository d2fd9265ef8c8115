"""Domain objects <-> flat string maps, the one wire form for Redis hashes, stream entries and
stored idempotent responses. Instants travel as integer microseconds since the epoch (UTC)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from server.domain import (
    Order,
    OrderKind,
    OrderStatus,
    Position,
    Runtime,
    Strategy,
    StrategySpec,
    StrategyStatus,
    format_decimal,
)

Flat = dict[str, str]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(value: datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _opt_time(raw: str) -> datetime | None:
    return from_micros(int(raw)) if raw else None


def _opt_decimal(raw: str) -> Decimal | None:
    return Decimal(raw) if raw else None


def strategy_config(strategy: Strategy) -> Flat:
    """What `strategy:{id}` holds: the static config (seed 1). Status lives in the runtime."""
    flat = strategy_to_flat(strategy)
    del flat["status"], flat["updated_at"]
    return flat


def strategy_to_flat(strategy: Strategy) -> Flat:
    spec = strategy.spec
    return {
        "id": strategy.id,
        "tenant": strategy.tenant,
        "symbol": spec.symbol,
        "quantity": str(spec.quantity),
        "buy_time": str(to_micros(spec.buy_time)),
        "sell_time": str(to_micros(spec.sell_time)),
        "stop_loss": format_decimal(spec.stop_loss),
        "status": strategy.status.value,
        "created_at": str(to_micros(strategy.created_at)),
        "updated_at": str(to_micros(strategy.updated_at)),
    }


def strategy_from_flat(flat: Flat) -> Strategy:
    spec = StrategySpec(
        symbol=flat["symbol"],
        quantity=int(flat["quantity"]),
        buy_time=from_micros(int(flat["buy_time"])),
        sell_time=from_micros(int(flat["sell_time"])),
        stop_loss=Decimal(flat["stop_loss"]),
    )
    return Strategy(
        id=flat["id"],
        tenant=flat["tenant"],
        spec=spec,
        status=StrategyStatus(flat["status"]),
        created_at=from_micros(int(flat["created_at"])),
        updated_at=from_micros(int(flat["updated_at"])),
    )


def runtime_to_flat(runtime: Runtime) -> Flat:
    """Empty values are left out, so a Redis hash holds only what is set."""
    flat = {
        "strategy_id": runtime.strategy_id,
        "tenant": runtime.tenant,
        "symbol": runtime.symbol,
        "status": runtime.status.value,
        "position": runtime.position.value,
        "version": str(runtime.version),
        "run": str(runtime.run),
        "updated_at": str(to_micros(runtime.updated_at)),
        "entry_price": format_decimal(runtime.entry_price),
        "exit_price": format_decimal(runtime.exit_price),
        "last_price": format_decimal(runtime.last_price),
        "last_buy_order_id": runtime.last_buy_order_id,
        "last_sell_order_id": runtime.last_sell_order_id,
        "last_sl_order_id": runtime.last_sl_order_id,
        "failure_reason": runtime.failure_reason,
        "terminated_at": str(to_micros(runtime.terminated_at)) if runtime.terminated_at else "",
        "notice": runtime.notice,
    }
    return {key: value for key, value in flat.items() if value != ""}


def runtime_from_flat(flat: Flat) -> Runtime:
    return Runtime(
        strategy_id=flat["strategy_id"],
        tenant=flat["tenant"],
        symbol=flat["symbol"],
        status=StrategyStatus(flat["status"]),
        position=Position(flat["position"]),
        version=int(flat["version"]),
        run=int(flat["run"]),
        updated_at=from_micros(int(flat["updated_at"])),
        entry_price=_opt_decimal(flat.get("entry_price", "")),
        exit_price=_opt_decimal(flat.get("exit_price", "")),
        last_price=_opt_decimal(flat.get("last_price", "")),
        last_buy_order_id=flat.get("last_buy_order_id", ""),
        last_sell_order_id=flat.get("last_sell_order_id", ""),
        last_sl_order_id=flat.get("last_sl_order_id", ""),
        failure_reason=flat.get("failure_reason", ""),
        terminated_at=_opt_time(flat.get("terminated_at", "")),
        notice=flat.get("notice", ""),
    )


def order_to_flat(order: Order) -> Flat:
    flat = {
        "id": order.id,
        "tenant": order.tenant,
        "strategy_id": order.strategy_id,
        "symbol": order.symbol,
        "kind": order.kind.value,
        "status": order.status.value,
        "quantity": str(order.quantity),
        "attempts": str(order.attempts),
        "created_at": str(to_micros(order.created_at)),
        "updated_at": str(to_micros(order.updated_at)),
        "fill_price": format_decimal(order.fill_price),
        "broker_order_id": order.broker_order_id,
        "error": order.error,
    }
    return {key: value for key, value in flat.items() if value != ""}


def order_from_flat(flat: Flat) -> Order:
    return Order(
        id=flat["id"],
        tenant=flat["tenant"],
        strategy_id=flat["strategy_id"],
        symbol=flat["symbol"],
        kind=OrderKind(flat["kind"]),
        status=OrderStatus(flat["status"]),
        quantity=int(flat["quantity"]),
        attempts=int(flat["attempts"]),
        created_at=from_micros(int(flat["created_at"])),
        updated_at=from_micros(int(flat["updated_at"])),
        fill_price=_opt_decimal(flat.get("fill_price", "")),
        broker_order_id=flat.get("broker_order_id", ""),
        error=flat.get("error", ""),
    )
