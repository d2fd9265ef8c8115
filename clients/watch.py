"""`algoplane watch`: follows StreamRuntime and StreamOrders for the caller's strategies.

The dashboard opens both streams first and then reads the current state (ListStrategies +
GetRuntime), so a change made while it reads reaches it on a stream; versions make the
older copy lose. The SDK resumes the streams after the last event_id across disconnects and
server restarts; when that cannot be exact (the history was trimmed, or nothing had arrived
yet to resume from) the table is read again.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import TypeVar

import grpc
from rich.console import Console
from rich.live import Live

from clients.dashboard import Board, render
from clients.errors import StreamGapError
from clients.render import json_line
from clients.retry import Connection, StreamState
from clients.sdk import AlgoplaneClient

_SEED_CONCURRENCY = 16
T = TypeVar("T")


@dataclass
class _Session:
    """The dashboard's shared state: the board, and the signals its tasks give each other."""

    client: AlgoplaneClient
    board: Board
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reseed: asyncio.Event = field(default_factory=asyncio.Event)
    asked: set[str] = field(default_factory=set)
    side: set[asyncio.Task[None]] = field(default_factory=set)

    def on_state(self, name: str) -> Callable[[StreamState], None]:
        def report(state: StreamState) -> None:
            self.board.set_stream(name, state)
            # Read the table once the stream's position is fixed (its first connect), so no
            # change falls between the read and the stream; again after a possible gap.
            first = state.connection is Connection.CONNECTED and not state.resumed_after
            if first or state.gap_possible:
                self.reseed.set()
            self.changed.set()

        return report


async def dashboard(
    client: AlgoplaneClient,
    console: Console,
    *,
    only: frozenset[str],
    tz: tzinfo,
    refresh_s: float,
) -> None:
    """Runs the live table until cancelled; raises what a stream cannot recover from."""
    session = _Session(client, Board(only=only))
    core = [
        asyncio.create_task(_follow(session, "runtime", _runtime_events)),
        asyncio.create_task(_follow(session, "orders", _order_events)),
        asyncio.create_task(_prices(session, refresh_s)),
    ]
    try:
        with Live(console=console, auto_refresh=False, redirect_stdout=False) as live:
            while True:
                await _frame(session, live, tz)
                await _wait_for_change(session, core)
    finally:
        every = [*core, *session.side]
        for task in every:
            task.cancel()
        await asyncio.gather(*every, return_exceptions=True)


async def _frame(session: _Session, live: Live, tz: tzinfo) -> None:
    """Reads again if asked to, looks up what rows lack, and draws the board."""
    if session.reseed.is_set():
        session.reseed.clear()
        await _seed(session)
    for strategy_id in set(session.board.missing_quantity()) - session.asked:
        session.asked.add(strategy_id)
        session.side.add(asyncio.create_task(_learn_quantity(session, strategy_id)))
    session.changed.clear()
    screen = render(
        session.board,
        addr=session.client.target,
        now=datetime.now(UTC),
        tz=tz,
        max_rows=live.console.size.height - 7,
    )
    live.update(screen, refresh=True)


async def _wait_for_change(session: _Session, core: list[asyncio.Task[None]]) -> None:
    """Until something changed, a task failed, or a second passed (the clock in the header)."""
    waiter = asyncio.create_task(session.changed.wait())
    watched = [waiter, *core, *session.side]
    await asyncio.wait(watched, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    for task in [*core, *session.side]:
        if task.done():
            session.side.discard(task)
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc


EventSource = Callable[[_Session, str], Awaitable[None]]


async def _follow(session: _Session, name: str, source: EventSource) -> None:
    """One stream, resumed by the SDK; a gap it reports means the table is read again and
    the stream starts over from now."""
    while True:
        try:
            await source(session, name)
        except StreamGapError as gap:
            session.board.message = f"{name} stream: {gap}; table reloaded"
            session.reseed.set()
            session.changed.set()


async def _runtime_events(session: _Session, name: str) -> None:
    events = session.client.watch_runtime(on_state=session.on_state(name))
    async for event in events:
        if session.board.apply_runtime(event.runtime):
            session.changed.set()


async def _order_events(session: _Session, name: str) -> None:
    events = session.client.watch_orders(on_state=session.on_state(name))
    async for event in events:
        if session.board.apply_order(event.order):
            session.changed.set()


async def _seed(session: _Session) -> None:
    """Reads every strategy, its runtime and the order log into the board."""
    client, board = session.client, session.board
    strategies = await _quietly(client.list_all(), [])
    if board.only:
        strategies = [s for s in strategies if s.id in board.only]
    for strategy in strategies:
        board.add_strategy(strategy)
    gate = asyncio.Semaphore(_SEED_CONCURRENCY)

    async def runtime_of(strategy_id: str) -> None:
        async with gate:
            runtime = await _quietly(client.runtime(strategy_id), None)
        if runtime is not None:
            board.apply_runtime(runtime)

    await asyncio.gather(*(runtime_of(s.id) for s in strategies))
    for order in await _quietly(client.orders(), []):
        board.apply_order(order)
    session.changed.set()


async def _learn_quantity(session: _Session, strategy_id: str) -> None:
    strategy = await _quietly(session.client.get(strategy_id), None)
    if strategy is not None and session.board.add_strategy(strategy):
        session.changed.set()


async def _prices(session: _Session, refresh_s: float) -> None:
    """Stream snapshots only change with the strategy; the last price of an open position
    moves with every tick, and GetRuntime has it."""
    while True:
        await asyncio.sleep(refresh_s)
        holding = [r for r in session.board.rows.values() if r.live and r.position == "BOUGHT"]
        for row in holding:
            runtime = await _quietly(session.client.runtime(row.strategy_id), None)
            if runtime is not None and session.board.apply_runtime(runtime):
                session.changed.set()


async def _quietly(call: Awaitable[T], fallback: T) -> T:
    """A read for the table: while the server is away, the streams already say so in the
    header and the next reconnect reads again, so a failed read shows nothing new."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise
        return fallback


async def json_events(client: AlgoplaneClient, *, only: frozenset[str]) -> None:
    """Both streams as JSON lines on stdout (RuntimeEvent has "runtime", OrderEvent "order");
    connection changes go to stderr as text."""
    tasks = [
        asyncio.create_task(_runtime_lines(client, only)),
        asyncio.create_task(_order_lines(client, only)),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _runtime_lines(client: AlgoplaneClient, only: frozenset[str]) -> None:
    async for event in client.watch_runtime(on_state=_state_line("runtime")):
        if not only or event.runtime.strategy_id in only:
            print(json_line(event), flush=True)


async def _order_lines(client: AlgoplaneClient, only: frozenset[str]) -> None:
    async for event in client.watch_orders(on_state=_state_line("orders")):
        if not only or event.order.strategy_id in only:
            print(json_line(event), flush=True)


def _state_line(name: str) -> Callable[[StreamState], None]:
    def report(state: StreamState) -> None:
        if state.connection in (Connection.CONNECTING, Connection.FAILED):
            return  # a failure is the command's one error line
        detail = f" (attempt {state.attempt}): {state.error}" if state.attempt else ""
        if state.gap_possible:
            detail = " from now: events of the outage were not replayed"
        print(f"algoplane: {name} stream {state.connection.value}{detail}", file=sys.stderr)

    return report
