"""`algoplane`: the command line over the SDK (rich tables, or `--json` for scripts).

    algoplane token --sub demo                                   # needs the server's secret
    algoplane start --symbol SBIN --quantity 5 --buy 09:15 --sell 15:20 --stop-loss 99.5
    algoplane watch                                              # the live dashboard

Address and token come from `--addr`/`--token` or ALGOPLANE_ADDR/ALGOPLANE_TOKEN. A gRPC
failure prints one line, `algoplane: <STATUS>: <details>`, and exits with 10 + the status
number (NOT_FOUND 15, UNAVAILABLE 24, UNAUTHENTICATED 26, ...); bad flags exit 2.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
from google.protobuf.message import Message
from rich.console import Console, RenderableType

from clients import render
from clients.errors import StreamGapError
from clients.retry import RetryEvent
from clients.sdk import AlgoplaneClient
from clients.timeparse import FORMATS, parse_duration, parse_instant, zone
from clients.watch import dashboard, json_events
from protos.algoplane.v1 import strategy_pb2 as pb

app = typer.Typer(
    name="algoplane",
    help="Create, start, stop and watch algoplane trading strategies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_ADDR = "127.0.0.1:50051"
EXIT_INTERRUPTED = 130
_HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "check --token / ALGOPLANE_TOKEN",
    grpc.StatusCode.UNAVAILABLE: "is the server running at {addr}?",
    grpc.StatusCode.DEADLINE_EXCEEDED: "no answer within {timeout:g}s; see --timeout",
}

Addr = Annotated[
    str, typer.Option("--addr", envvar="ALGOPLANE_ADDR", help="Server host:port.")
]  # fmt: skip
Token = Annotated[
    str,
    typer.Option(
        "--token", envvar="ALGOPLANE_TOKEN", show_default=False,
        help="Bearer token (see `algoplane token`).",
    ),
]  # fmt: skip
Json = Annotated[bool, typer.Option("--json", help="JSON output, one object per line.")]
Tz = Annotated[
    str,
    typer.Option(
        "--tz", envvar="ALGOPLANE_TZ", show_default=False,
        help="Time zone for clock times and shown times (default: the machine's).",
    ),
]  # fmt: skip
Timeout = Annotated[
    float, typer.Option("--timeout", min=0.1, help="Deadline of each call attempt, seconds.")
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Report retries on stderr.")]


@dataclass(frozen=True)
class Conn:
    """How to reach the server, gathered from each command's options."""

    addr: str
    token: str
    timeout: float
    verbose: bool

    def require_token(self) -> None:
        if not self.token:
            raise typer.BadParameter(
                "no token: give --token or set ALGOPLANE_TOKEN "
                "(`algoplane token --sub NAME` prints one)",
                param_hint="--token",
            )

    def client(self) -> AlgoplaneClient:
        hook = _report_retry if self.verbose else None
        return AlgoplaneClient(self.addr, self.token, timeout_s=self.timeout, on_retry=hook)


def _report_retry(event: RetryEvent) -> None:
    print(
        f"algoplane: {event.method} got {event.code.name}; "
        f"retry {event.attempt} in {event.delay_s:.1f}s",
        file=sys.stderr,
    )


class Status(StrEnum):
    created = "created"
    scheduled = "scheduled"
    running = "running"
    completed = "completed"
    stopped = "stopped"
    failed = "failed"


# -- commands -------------------------------------------------------------------------------


@app.command()
def token(
    sub: Annotated[str, typer.Option("--sub", help="The tenant the token speaks for.")],
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime: 90s, 15m, 12h, 1d.")] = "1d",
    secret: Annotated[
        str,
        typer.Option(
            "--secret",
            envvar="ALGOPLANE_JWT_SECRET",
            show_default=False,
            help="The server's HS256 secret (default: <data dir>/jwt.secret).",
        ),
    ] = "",
    data_dir: Annotated[
        Path, typer.Option("--data-dir", envvar="ALGOPLANE_DATA_DIR", help="The server's data dir.")
    ] = Path(".algoplane"),
) -> None:
    """Print a bearer token for a tenant, signed like `algoplane-server token`."""
    # The one command that needs the server's code: a token must be minted exactly as the
    # server verifies it. The import stays here so the SDK and other commands never load it.
    from server.api.auth import mint_token, parse_ttl

    secret = secret or _stored_secret(data_dir)
    if len(secret.encode()) < 32:
        raise typer.BadParameter("must be at least 32 bytes (HS256)", param_hint="--secret")
    try:
        lifetime = parse_ttl(ttl)
        print(mint_token(secret, sub, lifetime, datetime.now(UTC)))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _stored_secret(data_dir: Path) -> str:
    path = data_dir / "jwt.secret"
    try:
        return path.read_text().strip()
    except OSError:
        raise typer.BadParameter(
            f"no secret: give --secret, set ALGOPLANE_JWT_SECRET, or point --data-dir at the "
            f"server's data dir ({path} cannot be read)",
            param_hint="--secret",
        ) from None


Symbol = Annotated[str, typer.Option("--symbol", help="e.g. SBIN (taken upper-case).")]
Quantity = Annotated[int | None, typer.Option("--quantity", min=1, help="Shares/units to buy.")]
StopLoss = Annotated[str, typer.Option("--stop-loss", help="Exit when the price falls to it.")]
Buy = Annotated[str, typer.Option("--buy", help=f"BUY at: {FORMATS}.", show_default=False)]
Sell = Annotated[str, typer.Option("--sell", help="SELL at (formats as --buy).")]
BuyIn = Annotated[str, typer.Option("--buy-in", help="BUY after this long: 30s, 5m, 1h.")]
Hold = Annotated[str, typer.Option("--hold", help="SELL this long after the BUY.")]
RequestId = Annotated[
    str,
    typer.Option("--request-id", help="Makes a retry safe (default: a fresh one per command)."),
]


@dataclass(frozen=True)
class SpecFlags:
    symbol: str
    quantity: int | None
    stop_loss: str
    buy: str
    sell: str
    buy_in: str
    hold: str

    def given(self) -> bool:
        texts = (self.symbol, self.stop_loss, self.buy, self.sell, self.buy_in, self.hold)
        return self.quantity is not None or any(texts)

    def build(self, tz: tzinfo, now: datetime) -> pb.StrategySpec:
        for flag, value in (("--symbol", self.symbol), ("--stop-loss", self.stop_loss)):
            if not value:
                raise typer.BadParameter("is required for a new strategy", param_hint=flag)
        if self.quantity is None:
            raise typer.BadParameter("is required for a new strategy", param_hint="--quantity")
        buy = _instant(self.buy, self.buy_in, "--buy", "--buy-in", tz, now)
        sell = _instant(self.sell, self.hold, "--sell", "--hold", tz, buy)
        return AlgoplaneClient.spec(self.symbol.upper(), self.quantity, buy, sell, self.stop_loss)


def _instant(
    at: str, after: str, at_flag: str, after_flag: str, tz: tzinfo, base: datetime
) -> datetime:
    if bool(at) == bool(after):
        raise typer.BadParameter(
            f"give exactly one of {at_flag} and {after_flag}", param_hint=at_flag
        )
    try:
        if at:
            return parse_instant(at, tz, base.astimezone(tz).date())
        return base + parse_duration(after)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=at_flag if at else after_flag) from None


@app.command()
def create(
    symbol: Symbol = "",
    quantity: Quantity = None,
    stop_loss: StopLoss = "",
    buy: Buy = "",
    sell: Sell = "",
    buy_in: BuyIn = "",
    hold: Hold = "",
    request_id: RequestId = "",
    addr: Addr = DEFAULT_ADDR,
    token: Token = "",
    tz: Tz = "",
    timeout: Timeout = 10.0,
    json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Store a strategy (CREATED); `start ID` starts it later."""
    zone_ = _zone(tz)
    flags = SpecFlags(symbol, quantity, stop_loss, buy, sell, buy_in, hold)
    spec = flags.build(zone_, datetime.now(UTC))
    conn = Conn(addr, token, timeout, verbose)

    async def run(client: AlgoplaneClient) -> None:
        created = await client.create(spec, request_id)
        _show(created, json, lambda: render.strategy_card(created, zone_))

    _run(conn, run)


@app.command()
def start(
    strategy_id: Annotated[str, typer.Argument(help="A stored strategy's id.")] = "",
    symbol: Symbol = "",
    quantity: Quantity = None,
    stop_loss: StopLoss = "",
    buy: Buy = "",
    sell: Sell = "",
    buy_in: BuyIn = "",
    hold: Hold = "",
    request_id: RequestId = "",
    addr: Addr = DEFAULT_ADDR,
    token: Token = "",
    tz: Tz = "",
    timeout: Timeout = 10.0,
    json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Start a stored strategy by id, or create and start one from the flags."""
    zone_ = _zone(tz)
    flags = SpecFlags(symbol, quantity, stop_loss, buy, sell, buy_in, hold)
    if strategy_id and flags.given():
        raise typer.BadParameter("give a strategy id or the flags of a new one, not both")
    if not strategy_id and not flags.given():
        raise typer.BadParameter(
            "give a strategy id, or --symbol/--quantity/--stop-loss and the times of a new one"
        )
    spec = None if strategy_id else flags.build(zone_, datetime.now(UTC))
    conn = Conn(addr, token, timeout, verbose)

    async def run(client: AlgoplaneClient) -> None:
        runtime = await client.start(strategy_id=strategy_id, spec=spec, request_id=request_id)
        _show(runtime, json, lambda: render.runtime_card(runtime, zone_))

    _run(conn, run)


Id = Annotated[str, typer.Argument(help="The strategy's id.", show_default=False)]


@app.command()
def stop(
    strategy_id: Id,
    keep_position: Annotated[
        bool, typer.Option("--keep-position", help="Leave an open position open.")
    ] = False,
    addr: Addr = DEFAULT_ADDR,
    token: Token = "",
    tz: Tz = "",
    timeout: Timeout = 10.0,
    json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Stop a strategy; an open position is sold first unless --keep-position."""
    zone_ = _zone(tz)

    async def run(client: AlgoplaneClient) -> None:
        runtime = await client.stop(strategy_id, keep_position=keep_position)
        _show(runtime, json, lambda: render.runtime_card(runtime, zone_))

    _run(Conn(addr, token, timeout, verbose), run)


@app.command()
def get(
    strategy_id: Id,
    addr: Addr = DEFAULT_ADDR,
    token: Token = "",
    tz: Tz = "",
    timeout: Timeout = 10.0,
    json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Show a strategy's spec and status."""
    zone_ = _zone(tz)

    async def run(client: AlgoplaneClient) -> None:
        strategy = await client.get(strategy_id)
        _show(strategy, json, lambda: render.strategy_card(strategy, zone_))

    _run(Conn(addr, token, timeout, verbose), run)


@app.command("list")
def list_(
    status: Annotated[Status | None, typer.Option("--status", help="Only this status.")] = None,
    addr: Addr = DEFAULT_ADDR,
    token: Token = "",
    tz: Tz = "",
    timeout: Timeout = 10.0,
    json: Json = False,
    verbose: Verbose = False,
) -> None:
    """List your strategies, oldest first."""
    zone_ = _zone(tz)
    wanted = pb.StrategyStatus.Value(
        "STRATEGY_STATUS_" + (status.name.upper() if status else "UNSPECIFIED")
    )

    async def run(client: AlgoplaneClient) -> None:
        strategies = await client.list_all(wanted)
        _show_many(strategies, json, lambda: render.strategies_table(strategies, zone_))

    _run(Conn(addr, token, timeout, verbose), run)


@app.command()
def runtime(
    strategy_id: Id,
    addr: Addr = DEFAULT_ADDR,
    token: Token = "",
    tz: Tz = "",
    timeout: Timeout = 10.0,
    json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Show a strategy's live state: position, prices, orders, version."""
    zone_ = _zone(tz)

    async def run(client: AlgoplaneClient) -> None:
        state = await client.runtime(strategy_id)
        _show(state, json, lambda: render.runtime_card(state, zone_))

    _run(Conn(addr, token, timeout, verbose), run)


@app.command()
def orders(
    strategy_id: Annotated[str, typer.Argument(help="Only this strategy's orders.")] = "",
    addr: Addr = DEFAULT_ADDR,
    token: Token = "",
    tz: Tz = "",
    timeout: Timeout = 10.0,
    json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Show the order log (of one strategy, or all of yours)."""
    zone_ = _zone(tz)

    async def run(client: AlgoplaneClient) -> None:
        found = await client.orders(strategy_id)
        _show_many(found, json, lambda: render.orders_table(found, zone_))

    _run(Conn(addr, token, timeout, verbose), run)


@app.command()
def watch(
    strategy_ids: Annotated[
        list[str] | None, typer.Option("--id", help="Only this strategy (repeatable).")
    ] = None,
    refresh: Annotated[
        str, typer.Option("--refresh", help="How often open positions' prices are read.")
    ] = "2s",
    addr: Addr = DEFAULT_ADDR,
    token: Token = "",
    tz: Tz = "",
    json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Live table of your strategies (Ctrl-C ends it); --json prints the events instead.

    Follows StreamRuntime and StreamOrders and resumes after the last event across
    disconnects and server restarts; the header shows the connection state."""
    zone_ = _zone(tz)
    only = frozenset(strategy_ids or ())
    try:
        refresh_s = parse_duration(refresh).total_seconds()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--refresh") from None

    async def run(client: AlgoplaneClient) -> None:
        if json:
            await json_events(client, only=only)
        else:
            await dashboard(client, Console(), only=only, tz=zone_, refresh_s=refresh_s)

    _run(Conn(addr, token, 10.0, verbose), run)


# -- plumbing -------------------------------------------------------------------------------


def _zone(name: str) -> tzinfo:
    try:
        return zone(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tz") from None


Table = Callable[[], RenderableType]
Command = Callable[[AlgoplaneClient], Coroutine[Any, Any, None]]


def _show(message: Message, as_json: bool, table: Table) -> None:
    if as_json:
        print(render.json_line(message), flush=True)
    else:
        _console().print(table())


def _show_many(messages: Sequence[Message], as_json: bool, table: Table) -> None:
    if as_json:
        for message in messages:
            print(render.json_line(message), flush=True)
    elif messages:
        _console().print(table())
    else:
        print("(none)", file=sys.stderr)


def _console() -> Console:
    # Piped into another program, a table keeps its full width rather than 80 columns.
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
    return Console(width=width)


def _run(conn: Conn, command: Command) -> None:
    """Runs `command(client)` and turns every failure into one line and an exit code."""
    conn.require_token()

    async def main() -> None:
        # The channel belongs to the loop it is made in: asyncio.run's, so made in here.
        async with conn.client() as client:
            await command(client)

    try:
        asyncio.run(main())
    except grpc.aio.AioRpcError as exc:
        _fail_rpc(exc, conn)
    except StreamGapError as exc:
        _fail(f"OUT_OF_RANGE: {exc}", 10 + grpc.StatusCode.OUT_OF_RANGE.value[0])
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _fail_rpc(exc: grpc.aio.AioRpcError, conn: Conn) -> NoReturn:
    code = exc.code()
    details = " ".join((exc.details() or "").split())
    hint = _HINTS.get(code, "").format(addr=conn.addr, timeout=conn.timeout)
    _fail(f"{code.name}: {details}" + (f" ({hint})" if hint else ""), 10 + code.value[0])


def _fail(message: str, code: int) -> NoReturn:
    print(f"algoplane: {message}", file=sys.stderr)
    raise typer.Exit(code)


def main() -> None:
    """Console script entry point."""
    app(prog_name="algoplane")


if __name__ == "__main__":
    main()
