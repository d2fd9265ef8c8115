"""How the CLI shows API messages: rich tables for people, one JSON object a line for scripts."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import tzinfo

from google.protobuf.json_format import MessageToJson
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.table import Table

from protos.algoplane.v1 import strategy_pb2 as pb


def json_line(message: Message) -> str:
    """The message as compact JSON (field names as in grpcurl), default values included so a
    script finds every field."""
    return MessageToJson(message, indent=None, always_print_fields_with_no_presence=True)


def status_name(value: pb.StrategyStatus.ValueType) -> str:
    return pb.StrategyStatus.Name(value).removeprefix("STRATEGY_STATUS_")


def position_name(value: pb.Position.ValueType) -> str:
    return pb.Position.Name(value).removeprefix("POSITION_")


def kind_name(value: pb.OrderKind.ValueType) -> str:
    return pb.OrderKind.Name(value).removeprefix("ORDER_KIND_")


def order_status_name(value: pb.OrderStatus.ValueType) -> str:
    return pb.OrderStatus.Name(value).removeprefix("ORDER_STATUS_")


def when(stamp: Timestamp, tz: tzinfo) -> str:
    """Local time in `tz`; blank for an unset timestamp."""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return ""
    return stamp.ToDatetime(tz).strftime("%Y-%m-%d %H:%M:%S %Z")


def strategies_table(strategies: Iterable[pb.Strategy], tz: tzinfo) -> Table:
    table = Table("ID", "SYMBOL", "QTY", "BUY", "SELL", "STOP-LOSS", "STATUS")
    for s in strategies:
        table.add_row(
            s.id,
            s.spec.symbol,
            str(s.spec.quantity),
            when(s.spec.buy_time, tz),
            when(s.spec.sell_time, tz),
            s.spec.stop_loss,
            status_name(s.status),
        )
    return table


def strategy_card(s: pb.Strategy, tz: tzinfo) -> Table:
    return _card(
        ("id", s.id),
        ("symbol", s.spec.symbol),
        ("quantity", str(s.spec.quantity)),
        ("buy time", when(s.spec.buy_time, tz)),
        ("sell time", when(s.spec.sell_time, tz)),
        ("stop-loss", s.spec.stop_loss),
        ("status", status_name(s.status)),
        ("created", when(s.created_at, tz)),
        ("updated", when(s.updated_at, tz)),
    )


def runtime_card(r: pb.Runtime, tz: tzinfo) -> Table:
    return _card(
        ("strategy", r.strategy_id),
        ("symbol", r.symbol),
        ("status", status_name(r.status)),
        ("position", position_name(r.position)),
        ("entry price", r.entry_price),
        ("last price", r.last_price),
        ("exit price", r.exit_price),
        ("buy order", r.last_buy_order_id),
        ("sell order", r.last_sell_order_id),
        ("stop-loss order", r.last_sl_order_id),
        ("failure", r.failure_reason),
        ("notice", r.notice),
        ("updated", when(r.updated_at, tz)),
        ("terminated", when(r.terminated_at, tz)),
        ("version", str(r.version)),
    )


def orders_table(orders: Iterable[pb.Order], tz: tzinfo) -> Table:
    table = Table("ORDER", "SYMBOL", "KIND", "STATUS", "QTY", "FILL", "TRIES", "UPDATED", "ERROR")
    for o in orders:
        table.add_row(
            o.id,
            o.symbol,
            kind_name(o.kind),
            order_status_name(o.status),
            str(o.quantity),
            o.fill_price,
            str(o.attempts),
            when(o.updated_at, tz),
            o.error,
        )
    return table


def _card(*rows: tuple[str, str]) -> Table:
    """A two-column table of the fields that are set."""
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        if value:
            table.add_row(name, value)
    return table
