"""The `algoplane watch` table: a pure model fed with API messages, and its rich rendering.

The model never does I/O: `Board.apply_runtime` / `apply_order` / `add_strategy` take the
messages the streams and reads deliver, in any order; runtime versions decide which copy
wins, so a seed read that raced a stream event cannot roll a row back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from decimal import Decimal, InvalidOperation

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from clients.render import kind_name, order_status_name, position_name, status_name
from clients.retry import Connection, StreamState
from protos.algoplane.v1 import strategy_pb2 as pb

LIVE = frozenset({"SCHEDULED", "RUNNING"})
_HOLDING = frozenset({"BOUGHT", "SOLD", "EXITED_BY_SL"})


def _decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text) if text else None
    except InvalidOperation:
        return None


@dataclass
class Row:
    """What the table shows for one strategy."""

    strategy_id: str
    symbol: str = ""
    quantity: int | None = None
    status: str = ""
    position: str = ""
    entry: Decimal | None = None
    last: Decimal | None = None
    exit: Decimal | None = None
    version: int = -1
    last_order: str = ""
    note: str = ""
    _order_key: tuple[int, int, str] = (0, 0, "")

    @property
    def pnl(self) -> Decimal | None:
        """Quantity x (exit, else last, - entry) once a position was opened; None when a
        part of it is not known yet."""
        price = self.exit if self.exit is not None else self.last
        if self.position not in _HOLDING or None in (self.quantity, self.entry, price):
            return None
        assert self.quantity is not None and self.entry is not None and price is not None
        return self.quantity * (price - self.entry)

    @property
    def live(self) -> bool:
        return self.status in LIVE


@dataclass
class Board:
    """Every row, plus the connection state of each stream. `only` limits the rows to these
    strategy ids (empty: all of the caller's)."""

    only: frozenset[str] = frozenset()
    rows: dict[str, Row] = field(default_factory=dict)
    streams: dict[str, StreamState] = field(default_factory=dict)
    message: str = ""

    def _row(self, strategy_id: str) -> Row | None:
        if self.only and strategy_id not in self.only:
            return None
        return self.rows.setdefault(strategy_id, Row(strategy_id))

    def add_strategy(self, strategy: pb.Strategy) -> bool:
        row = self._row(strategy.id)
        if row is None:
            return False
        row.symbol = strategy.spec.symbol
        row.quantity = strategy.spec.quantity
        if row.version < 0:  # the runtime, when known, is newer than the stored status
            row.status = status_name(strategy.status)
        return True

    def apply_runtime(self, runtime: pb.Runtime) -> bool:
        """Applies a snapshot unless an older version than the row holds (a notice comes
        with the version it annotates, so equal versions apply)."""
        row = self._row(runtime.strategy_id)
        if row is None or runtime.version < row.version:
            return False
        row.version = runtime.version
        row.symbol = runtime.symbol or row.symbol
        row.status = status_name(runtime.status)
        row.position = position_name(runtime.position)
        row.entry = _decimal(runtime.entry_price)
        row.exit = _decimal(runtime.exit_price)
        # Stream snapshots carry the price of the last change; a blank one says nothing new.
        row.last = _decimal(runtime.last_price) or row.last
        row.note = runtime.failure_reason or runtime.notice
        return True

    def apply_order(self, order: pb.Order) -> bool:
        """The row's last order is the most recently updated one."""
        row = self._row(order.strategy_id)
        if row is None:
            return False
        key = (order.updated_at.seconds, order.updated_at.nanos, order.id)
        if key < row._order_key:
            return False
        row._order_key = key
        row.symbol = row.symbol or order.symbol
        fill = f" @ {order.fill_price}" if order.fill_price else ""
        row.last_order = f"{kind_name(order.kind)} {order_status_name(order.status)}{fill}"
        return True

    def missing_quantity(self) -> list[str]:
        """Rows first seen on a stream: their quantity needs a GetStrategy."""
        return [row.strategy_id for row in self.rows.values() if row.quantity is None]

    def set_stream(self, name: str, state: StreamState) -> None:
        self.streams[name] = state

    def connection(self) -> tuple[str, str]:
        """(text, style) for the header, the worst of the streams' states."""
        states = list(self.streams.values())
        failed = [s for s in states if s.connection is Connection.FAILED]
        if failed:
            return f"error: {failed[0].error}", "bold red"
        retrying = [s for s in states if s.connection is Connection.RECONNECTING]
        if retrying:
            attempt = max(s.attempt for s in retrying)
            return f"reconnecting (attempt {attempt})", "bold yellow"
        if states and all(s.connection is Connection.CONNECTED for s in states):
            return "connected", "bold green"
        return "connecting", "yellow"

    def ordered(self) -> list[Row]:
        """Live strategies first, newest first within each group (ids sort by creation)."""
        newest = sorted(self.rows.values(), key=lambda r: r.strategy_id, reverse=True)
        return sorted(newest, key=lambda r: not r.live)


def _money(value: Decimal | None) -> str:
    return "" if value is None else f"{value:f}"


def _pnl(value: Decimal | None) -> Text:
    if value is None:
        return Text("")
    style = "green" if value > 0 else "red" if value < 0 else ""
    return Text(f"{value.normalize():+f}" if value else "0", style=style)


def render(board: Board, *, addr: str, now: datetime, tz: tzinfo, max_rows: int) -> RenderableType:
    """The whole screen: a header with the connection state, the table, and a footer."""
    text, style = board.connection()
    header = Text.assemble(
        ("algoplane watch", "bold"),
        f"  {addr}  ",
        (text, style),
        f"  {now.astimezone(tz):%H:%M:%S %Z}",
    )
    table = Table(
        "ID", "SYMBOL", "QTY", "STATUS", "POSITION", "ENTRY", "LAST", "EXIT", "P&L",
        "LAST ORDER", "NOTE", expand=False,
    )  # fmt: skip
    rows = board.ordered()
    for row in rows[: max(max_rows, 1)]:
        table.add_row(
            row.strategy_id,
            row.symbol,
            "" if row.quantity is None else str(row.quantity),
            row.status,
            row.position,
            _money(row.entry),
            _money(row.last),
            _money(row.exit),
            _pnl(row.pnl),
            row.last_order,
            row.note,
        )
    parts: list[RenderableType] = [header, table]
    hidden = len(rows) - max(max_rows, 1)
    if hidden > 0:
        parts.append(Text(f"... and {hidden} more (live ones are listed first)", style="dim"))
    if not rows:
        parts.append(Text("no strategies yet; they appear here as they are created", "dim"))
    if board.message:
        parts.append(Text(board.message, style="yellow"))
    return Group(*parts)
