"""Simulated market feed: a websockets server that plays a random walk per symbol, or replays
a CSV of ticks, and honours subscribe messages, so the embedded default has prices to act on.

    python -m scripts.feedsim --port 8765 --symbols SBIN=100,INFY=1500 --rate 5
    python -m scripts.feedsim --csv ticks.csv --speed 10 --loop
    python -m scripts.feedsim --format binance --symbols BTCUSDT=60000

Wire formats (what `server/market` reads):

- `json`: a tick `{"symbol": "SBIN", "price": "101.25", "ts": <epoch ms>}`, or a JSON array of
  ticks when several of a client's symbols tick at once. Clients subscribe with
  `{"action": "subscribe", "symbols": [...]}`; a later subscribe replaces the set.
- `binance`: one Binance spot trade message per tick (`{"e": "trade", "s": "BTCUSDT", ...}`).
  Also accepted: Binance's `SUBSCRIBE`/`UNSUBSCRIBE`/`LIST_SUBSCRIPTIONS` requests on
  `<symbol>@trade` streams, answered like Binance does (`{"result": null, "id": 1}`); as on
  Binance, SUBSCRIBE adds to the set. The json subscribe message works here too.

A client that never subscribed gets every symbol. A subscribe naming a symbol the simulator
does not know adds it to the walk at 100.00.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import random
import re
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, get_args

from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

Format = Literal["json", "binance"]

CENT = Decimal("0.01")
NEW_SYMBOL_PRICE = Decimal("100.00")
DEFAULT_SYMBOLS = "SBIN=100,INFY=1500,TCS=3500,BTCUSDT=60000"
BINANCE_INVALID_REQUEST = 2  # Binance's error code for a request it cannot read
CLOSE_TIMEOUT_S = 2.0
_SEPARATORS = (",", ":")
_EPOCH_MS = re.compile(r"^\d+(\.\d+)?$")

log = logging.getLogger("feedsim")


@dataclass(frozen=True, slots=True)
class Tick:
    """One price for one symbol, as the simulator emits it."""

    symbol: str
    price: Decimal


@dataclass(frozen=True, slots=True)
class CsvRow:
    """One CSV tick: its timestamp in epoch milliseconds, symbol and price."""

    ts_ms: float
    symbol: str
    price: Decimal


@dataclass(eq=False)
class _Client:
    """A connected client and the symbols it asked for (None: never subscribed, gets all)."""

    connection: ServerConnection
    symbols: set[str] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def wants(self, symbol: str) -> bool:
        return self.symbols is None or symbol in self.symbols


# ----------------------------------------------------------------------------- parsing


def positive_price(raw: Decimal | str) -> Decimal:
    """A positive finite Decimal from a Decimal or a decimal string, else ValueError."""
    try:
        price = raw if isinstance(raw, Decimal) else Decimal(str(raw).strip())
    except InvalidOperation:
        raise ValueError(f"price {raw!r} is not a decimal") from None
    if not price.is_finite() or price <= 0:
        raise ValueError(f"price {raw!r} is not positive and finite")
    return price


def parse_ts_ms(raw: str) -> float:
    """Epoch milliseconds from `1732456789123` or an RFC 3339 instant with a timezone."""
    text = raw.strip()
    if _EPOCH_MS.match(text):
        return float(text)
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"ts {raw!r} is neither epoch ms nor RFC 3339") from None
    if value.tzinfo is None:
        raise ValueError(f"ts {raw!r} has no timezone")
    return value.timestamp() * 1000


def parse_csv_row(record: Sequence[str]) -> CsvRow:
    """`ts,symbol,price` into a CsvRow, else ValueError."""
    if len(record) != 3:
        raise ValueError(f"expected ts,symbol,price, got {len(record)} fields")
    ts_text, symbol, price_text = (cell.strip() for cell in record)
    if not symbol:
        raise ValueError("empty symbol")
    return CsvRow(parse_ts_ms(ts_text), symbol, positive_price(price_text))


def load_csv(path: Path) -> list[CsvRow]:
    """Every row of a tick CSV in file order; a first line that is not a tick is a header."""
    rows: list[CsvRow] = []
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue
            try:
                rows.append(parse_csv_row(record))
            except ValueError as exc:
                if reader.line_num == 1:
                    continue  # the header
                raise ValueError(f"{path}:{reader.line_num}: {exc}") from None
    return rows


def parse_symbols(text: str) -> dict[str, Decimal]:
    """`SBIN=100,INFY=1500` into {symbol: starting price}."""
    symbols: dict[str, Decimal] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        symbol, sep, price = item.partition("=")
        if not sep or not symbol.strip():
            raise ValueError(f"symbol {item!r} is not SYMBOL=PRICE")
        symbols[symbol.strip()] = positive_price(price)
    return symbols


def _load_json(raw: str | bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _stream_symbol(stream: str) -> str | None:
    """`btcusdt@trade` -> `BTCUSDT`; streams of other kinds are not served (None)."""
    name, sep, kind = stream.partition("@")
    return name.upper() if sep and kind == "trade" and name else None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _groups(rows: Sequence[CsvRow]) -> Iterator[list[CsvRow]]:
    """Consecutive rows with the same timestamp, which tick together."""
    group: list[CsvRow] = []
    for row in rows:
        if group and row.ts_ms != group[0].ts_ms:
            yield group
            group = []
        group.append(row)
    if group:
        yield group


# ----------------------------------------------------------------------------- simulator


class FeedSimulator:
    """A websockets feed server: a random walk per symbol (or a CSV replay) to every client,
    filtered by what each client subscribed to."""

    def __init__(
        self,
        *,
        symbols: Mapping[str, Decimal] | None = None,
        rate_hz: float = 5.0,
        volatility: float = 0.002,
        csv_path: Path | None = None,
        fmt: Format = "json",
        seed: int | None = None,
        speed: float = 1.0,
        loop: bool = False,
    ) -> None:
        """`rate_hz` 0 turns the walk off (only `push` and the CSV send ticks). With
        `csv_path` the CSV is replayed instead of the walk, from the first client's
        connection, `speed` times faster than recorded, once or forever (`loop`)."""
        if rate_hz < 0 or volatility < 0 or speed <= 0:
            raise ValueError("rate_hz and volatility must be >= 0, speed > 0")
        if fmt not in get_args(Format):
            raise ValueError(f"fmt {fmt!r} is not one of {get_args(Format)}")
        self._prices = {name: positive_price(price) for name, price in (symbols or {}).items()}
        self._rate_hz = rate_hz
        self._volatility = volatility
        self._rows = load_csv(csv_path) if csv_path is not None else None
        self._fmt: Format = fmt
        self._speed = speed
        self._loop = loop
        self._rng = random.Random(seed)
        self._server: Server | None = None
        self._host = "127.0.0.1"
        self._port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._clients: list[_Client] = []
        self._first_client = asyncio.Event()
        self._trade_ids: dict[str, int] = {}
        # Every subscribe message received (json `action: subscribe` and Binance `SUBSCRIBE`),
        # parsed, valid or not, oldest first; kept across reconnects, for tests.
        self.subscribe_messages: list[Any] = []

    # -- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listens on host:port (0: a free port) and starts the walk or the replay; returns
        the ws URL. May be called again after `stop` (e.g. on the same port)."""
        if self._server is not None:
            raise RuntimeError("the feed simulator is already running")
        self._server = await serve(self._handle, host, port, close_timeout=CLOSE_TIMEOUT_S)
        self._host = host
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._first_client = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run_source(), name="feedsim-source")]
        log.debug("listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        """Stops the ticks, closes every connection (code 1001) and the listening socket."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def port(self) -> int:
        """The listening port (still known after `stop`, to restart on it)."""
        if self._port is None:
            raise RuntimeError("the feed simulator was never started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"ws://{host}:{self.port}"

    # -- what tests look at and do

    @property
    def connections(self) -> int:
        """How many clients are connected."""
        return len(self._clients)

    @property
    def subscriptions(self) -> list[frozenset[str] | None]:
        """Each connected client's symbols, in connection order (None: never subscribed)."""
        return [None if c.symbols is None else frozenset(c.symbols) for c in self._clients]

    @property
    def extensions(self) -> list[list[str]]:
        """Each connected client's negotiated websocket extensions, in connection order."""
        return [[str(e.name) for e in c.connection.protocol.extensions] for c in self._clients]

    @property
    def prices(self) -> dict[str, Decimal]:
        """The current price of every symbol the simulator knows."""
        return dict(self._prices)

    async def push(self, symbol: str, price: Decimal | str) -> None:
        """Sends one tick now to every client subscribed to `symbol`; the walk goes on from
        this price."""
        tick = Tick(symbol, positive_price(price))
        self._prices[symbol] = tick.price
        self._deliver([tick])

    async def push_raw(self, message: str) -> None:
        """Sends `message` as is, as a text frame, to every client."""
        broadcast([c.connection for c in self._clients], message)

    async def drop_connections(self) -> None:
        """Cuts every client's TCP connection with no closing handshake (the client sees
        code 1006); the server keeps listening, so clients can reconnect."""
        clients = list(self._clients)
        for client in clients:
            client.connection.transport.abort()
        async with asyncio.timeout(5):
            for client in clients:
                await client.closed.wait()

    # -- connections

    async def _handle(self, connection: ServerConnection) -> None:
        client = _Client(connection)
        self._clients.append(client)
        self._first_client.set()
        log.info("client %s connected", connection.remote_address)
        try:
            async for raw in connection:
                self._on_message(client, raw)
        except ConnectionClosed:
            pass
        finally:
            self._clients.remove(client)
            client.closed.set()
            log.info("client %s disconnected", connection.remote_address)

    def _on_message(self, client: _Client, raw: str | bytes) -> None:
        message = _load_json(raw)
        if isinstance(message, dict) and message.get("action") == "subscribe":
            self.subscribe_messages.append(message)
            self._json_subscribe(client, message.get("symbols"))
        elif self._fmt == "binance" and isinstance(message, dict) and "method" in message:
            if message["method"] == "SUBSCRIBE":
                self.subscribe_messages.append(message)
            reply = self._binance_request(client, message["method"], message.get("params"))
            reply["id"] = message.get("id")
            broadcast([client.connection], json.dumps(reply, separators=_SEPARATORS))
        else:
            log.warning("ignored a client message: %.200r", raw)

    def _json_subscribe(self, client: _Client, symbols: Any) -> None:
        if not _is_str_list(symbols):
            log.warning("ignored a subscribe whose symbols are not a list of strings")
            return
        client.symbols = set(symbols)
        self._add_symbols(client.symbols)
        log.info("client %s subscribed to %s", client.connection.remote_address, symbols)

    def _binance_request(self, client: _Client, method: Any, params: Any) -> dict[str, Any]:
        """Applies a Binance websocket request; returns its reply without the id."""
        if method == "LIST_SUBSCRIPTIONS":
            streams = sorted(f"{s.lower()}@trade" for s in client.symbols or ())
            return {"result": streams}
        if method not in ("SUBSCRIBE", "UNSUBSCRIBE") or not _is_str_list(params):
            return {"error": {"code": BINANCE_INVALID_REQUEST, "msg": "Invalid request"}}
        symbols = {s for s in map(_stream_symbol, params) if s is not None}
        current = client.symbols or set()
        if method == "SUBSCRIBE":
            client.symbols = current | symbols
            self._add_symbols(symbols)
        else:
            client.symbols = current - symbols
        return {"result": None}

    def _add_symbols(self, symbols: Iterable[str]) -> None:
        for symbol in symbols:
            self._prices.setdefault(symbol, NEW_SYMBOL_PRICE)

    # -- ticks

    async def _run_source(self) -> None:
        if self._rows is not None:
            await self._replay(self._rows)
        elif self._rate_hz > 0:
            await self._walk()

    async def _walk(self) -> None:
        """Every 1/rate_hz seconds, moves every symbol and sends the ticks."""
        loop = asyncio.get_running_loop()
        period = 1.0 / self._rate_hz
        due = loop.time()
        while True:
            due = max(due + period, loop.time())
            await asyncio.sleep(due - loop.time())
            self._deliver([self._step(symbol) for symbol in list(self._prices)])

    def _step(self, symbol: str) -> Tick:
        """A gaussian step of relative size `volatility`, to the cent, never below a cent."""
        factor = Decimal(repr(1.0 + self._rng.gauss(0.0, self._volatility)))
        price = max((self._prices[symbol] * factor).quantize(CENT), CENT)
        self._prices[symbol] = price
        return Tick(symbol, price)

    async def _replay(self, rows: Sequence[CsvRow]) -> None:
        """The CSV at its recorded pace (divided by speed), from the first connection."""
        if not rows:
            return
        await self._first_client.wait()
        loop = asyncio.get_running_loop()
        span_s = (rows[-1].ts_ms - rows[0].ts_ms) / 1000
        gap_s = (span_s / (len(rows) - 1) if len(rows) > 1 and span_s > 0 else 1.0) / self._speed
        while True:
            started = loop.time()
            for group in _groups(rows):
                due = started + (group[0].ts_ms - rows[0].ts_ms) / 1000 / self._speed
                await asyncio.sleep(max(0.0, due - loop.time()))
                self._deliver([self._csv_tick(row) for row in group])
            if not self._loop:
                return
            await asyncio.sleep(gap_s)

    def _csv_tick(self, row: CsvRow) -> Tick:
        self._prices[row.symbol] = row.price
        return Tick(row.symbol, row.price)

    def _deliver(self, ticks: Sequence[Tick]) -> None:
        """Sends each client the ticks of its symbols, stamped now."""
        now_ms = _now_ms()
        payloads = [(tick.symbol, self._payload(tick, now_ms)) for tick in ticks]
        for client in list(self._clients):
            wanted = [payload for symbol, payload in payloads if client.wants(symbol)]
            for frame in self._frames(wanted):
                broadcast([client.connection], frame)

    def _payload(self, tick: Tick, now_ms: int) -> dict[str, Any]:
        if self._fmt == "json":
            return {"symbol": tick.symbol, "price": str(tick.price), "ts": now_ms}
        trade_id = self._trade_ids.get(tick.symbol, 0) + 1
        self._trade_ids[tick.symbol] = trade_id
        return {
            "e": "trade",
            "E": now_ms,
            "s": tick.symbol,
            "t": trade_id,
            "p": str(tick.price),
            "q": f"{self._rng.uniform(0.001, 2.0):.5f}",
            "T": now_ms,
            "m": False,
            "M": True,
        }

    def _frames(self, payloads: list[dict[str, Any]]) -> list[str]:
        """json: one frame (an object, or an array for several); binance: one per trade."""
        if not payloads:
            return []
        if self._fmt == "binance":
            return [json.dumps(payload, separators=_SEPARATORS) for payload in payloads]
        body: Any = payloads[0] if len(payloads) == 1 else payloads
        return [json.dumps(body, separators=_SEPARATORS)]


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.feedsim", description="Simulated market feed (websockets)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0: a free port")
    parser.add_argument("--symbols", default=DEFAULT_SYMBOLS, help="SYMBOL=PRICE,...")
    parser.add_argument("--rate", type=float, default=5.0, help="walk steps per second")
    parser.add_argument("--volatility", type=float, default=0.002, help="relative step size")
    parser.add_argument("--csv", type=Path, help="replay ts,symbol,price rows instead")
    parser.add_argument("--speed", type=float, default=1.0, help="CSV replay speed-up")
    parser.add_argument("--loop", action="store_true", help="replay the CSV forever")
    parser.add_argument("--format", choices=get_args(Format), default="json")
    parser.add_argument("--seed", type=int, help="makes the walk repeatable")
    return parser


def simulator_from_args(args: argparse.Namespace) -> FeedSimulator:
    return FeedSimulator(
        symbols=parse_symbols(args.symbols),
        rate_hz=args.rate,
        volatility=args.volatility,
        csv_path=args.csv,
        fmt=args.format,
        seed=args.seed,
        speed=args.speed,
        loop=args.loop,
    )


async def serve_until_signal(simulator: FeedSimulator, host: str, port: int) -> None:
    """Runs the simulator until SIGINT or SIGTERM, then stops it cleanly."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    url = await simulator.start(host, port)
    print(f"feed: listening on {url}", flush=True)
    try:
        await stopping.wait()
    finally:
        await simulator.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="feed: %(message)s", stream=sys.stderr)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        simulator = simulator_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"feed: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve_until_signal(simulator, args.host, args.port))
    except OSError as exc:
        print(f"feed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
