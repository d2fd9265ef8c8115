"""Proto <-> domain translation, with the input checks that belong to the wire format
(required fields, timestamp ranges, enum values). Domain rules live in server.domain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from protos.algoplane.v1 import strategy_pb2 as pb
from server.domain import (
    Order,
    Runtime,
    Strategy,
    StrategySpec,
    StrategyStatus,
    format_decimal,
    parse_decimal,
    validate_quantity,
    validate_symbol,
    validate_times,
)
from server.errors import InvalidArgument

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# google.protobuf.Timestamp's documented range: 0001-01-01 .. 9999-12-31.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def spec_from_request(request: pb.CreateStrategyRequest | pb.StartStrategyRequest) -> StrategySpec:
    if not request.HasField("spec"):
        raise InvalidArgument("spec", "is required")
    return spec_from_proto("spec", request.spec)


def spec_from_proto(field: str, message: pb.StrategySpec) -> StrategySpec:
    """Checks every field of a spec, naming the first bad one as `<field>.<name>`."""
    symbol = validate_symbol(f"{field}.symbol", message.symbol)
    quantity = validate_quantity(f"{field}.quantity", message.quantity)
    buy_time = _time(f"{field}.buy_time", message, "buy_time")
    sell_time = _time(f"{field}.sell_time", message, "sell_time")
    stop_loss = parse_decimal(f"{field}.stop_loss", message.stop_loss)
    validate_times(buy_time, sell_time)
    return StrategySpec(symbol, quantity, buy_time, sell_time, stop_loss)


def status_from_proto(value: int) -> StrategyStatus | None:
    if value == pb.STRATEGY_STATUS_UNSPECIFIED:
        return None
    if value not in pb.StrategyStatus.values():
        raise InvalidArgument("status", f"unknown status {value}")
    name = pb.StrategyStatus.Name(pb.StrategyStatus.ValueType(value))
    return StrategyStatus(name.removeprefix("STRATEGY_STATUS_"))


def strategy_to_proto(strategy: Strategy) -> pb.Strategy:
    spec = strategy.spec
    return pb.Strategy(
        id=strategy.id,
        spec=pb.StrategySpec(
            symbol=spec.symbol,
            quantity=spec.quantity,
            buy_time=_timestamp(spec.buy_time),
            sell_time=_timestamp(spec.sell_time),
            stop_loss=format_decimal(spec.stop_loss),
        ),
        status=pb.StrategyStatus.Value("STRATEGY_STATUS_" + strategy.status.value),
        created_at=_timestamp(strategy.created_at),
        updated_at=_timestamp(strategy.updated_at),
    )


def runtime_to_proto(runtime: Runtime) -> pb.Runtime:
    message = pb.Runtime(
        strategy_id=runtime.strategy_id,
        symbol=runtime.symbol,
        status=pb.StrategyStatus.Value("STRATEGY_STATUS_" + runtime.status.value),
        position=pb.Position.Value("POSITION_" + runtime.position.value),
        entry_price=format_decimal(runtime.entry_price),
        exit_price=format_decimal(runtime.exit_price),
        last_price=format_decimal(runtime.last_price),
        last_buy_order_id=runtime.last_buy_order_id,
        last_sell_order_id=runtime.last_sell_order_id,
        last_sl_order_id=runtime.last_sl_order_id,
        failure_reason=runtime.failure_reason,
        updated_at=_timestamp(runtime.updated_at),
        version=runtime.version,
        notice=runtime.notice,
    )
    if runtime.terminated_at is not None:
        message.terminated_at.CopyFrom(_timestamp(runtime.terminated_at))
    return message


def order_to_proto(order: Order) -> pb.Order:
    return pb.Order(
        id=order.id,
        strategy_id=order.strategy_id,
        symbol=order.symbol,
        kind=pb.OrderKind.Value("ORDER_KIND_" + order.kind.value),
        status=pb.OrderStatus.Value("ORDER_STATUS_" + order.status.value),
        quantity=order.quantity,
        fill_price=format_decimal(order.fill_price),
        broker_order_id=order.broker_order_id,
        attempts=order.attempts,
        error=order.error,
        created_at=_timestamp(order.created_at),
        updated_at=_timestamp(order.updated_at),
    )


def _time(field: str, message: pb.StrategySpec, name: str) -> datetime:
    if not message.HasField(name):  # type: ignore[arg-type]
        raise InvalidArgument(field, "is required")
    stamp: Timestamp = getattr(message, name)
    if not _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS:
        raise InvalidArgument(field, "is outside the range of google.protobuf.Timestamp")
    if not 0 <= stamp.nanos <= 999_999_999:
        raise InvalidArgument(field, "nanos must be between 0 and 999999999")
    return _EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)


def _timestamp(value: datetime) -> Timestamp:
    delta = value - _EPOCH
    seconds = delta.days * 86_400 + delta.seconds
    return Timestamp(seconds=seconds, nanos=delta.microseconds * 1000)
