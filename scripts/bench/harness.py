"""Shared benchmark harness: the real server, real Redis and a real feed, driven from outside.

Every benchmark starts its own processes and measures through the same doors a client uses
(gRPC, the websocket feed) plus read-only looks at Redis, the SQLite file and /proc. Figures
come out as a `Report` (medians over several runs with their spread, targets, pass/miss).

The benchmark contract, which `scripts.bench.run_all` relies on: a module in scripts/bench/
exposes `async def run(*, quick: bool = False, ...) -> Report`, every other parameter having a
default (the full size); `quick=True` picks small sizes for a smoke run. `main()` parses the
same sizes from the command line and prints the report.

Pieces:
    redis_server()          a redis-server on a free port in a temp dir (sync or async `with`)
    server_process(url)     `python -m server` against it, SERVING and open for trading
    baseline_process(m)     a bare grpc.aio baseline (echo, raw fan-out) in its own process
    token / metadata        bearer tokens any server started here accepts (fixed secret)
    future_spec / spec_at   valid specs: nothing fires, or BUY/SELL at given instants
    TickFeed                a websocket price feed in this process, in the JSON format
    broker_entries(redis)   client order id -> wall-clock ns at which the paper broker was called
    closed_loop(...)        N calls in flight, latencies and elapsed time
    summarize / over_runs   p50/p99/max of samples; median and min-max of per-run figures
    Report, Target          named figures with units, targets and pass/miss
    machine()               what the figures were taken on
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from protos.algoplane.v1 import strategy_pb2 as pb
from protos.algoplane.v1 import strategy_pb2_grpc
from server.api.auth import mint_token
from server.store import keys
from server.store.embedded_redis import find_redis_server

ROOT = Path(__file__).resolve().parents[2]
# Fixed so that the bench mints tokens itself; never used outside a throwaway data dir.
JWT_SECRET = "bench-secret-0123456789abcdef-0123456789abcdef"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
_LISTENING = "algoplane: listening on"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


# ----------------------------------------------------------------------------- redis


@dataclass
class RedisServer:
    """A running redis-server on 127.0.0.1:`port` (never 6379)."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes]
    aof: bool

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, *, timeout_s: float = 60.0) -> Redis:
        """A new async client (decoded strings); the caller closes it (`aclose`)."""
        return Redis(
            host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=timeout_s
        )


class _RedisContext:
    """Starts on enter, stops and removes its directory on exit; `with` or `async with`."""

    def __init__(self, *, aof: bool, extra_args: Sequence[str]) -> None:
        self._aof = aof
        self._extra = list(extra_args)
        self._server: RedisServer | None = None

    def __enter__(self) -> RedisServer:
        directory = Path(tempfile.mkdtemp(prefix="algoplane-bench-redis-"))
        port = free_port()
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self._aof
            else ["--appendonly", "no"]
        )
        args = [
            find_redis_server(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(directory / "redis.log"),
            *persistence,
            *self._extra,
        ]  # fmt: skip
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._server = RedisServer(port, directory, process, self._aof)
        try:
            _wait_for_pong(port, process, directory)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self._server

    def __exit__(
        self, _type: type[BaseException] | None, _exc: BaseException | None, _tb: Any
    ) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        if server.process.poll() is None:
            server.process.terminate()
            try:
                server.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(timeout=5)
        shutil.rmtree(server.directory, ignore_errors=True)

    async def __aenter__(self) -> RedisServer:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.__exit__, exc_type, exc, tb)


def _wait_for_pong(port: int, process: subprocess.Popen[bytes], directory: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"redis-server exited with {process.returncode}:\n{_tail(directory / 'redis.log')}"
            )
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn,
        ):
            conn.sendall(b"PING\r\n")
            if conn.recv(16).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise RuntimeError(f"redis-server did not answer on port {port}")


def redis_server(*, aof: bool = False, extra_args: Sequence[str] = ()) -> _RedisContext:
    """A real redis-server on a free port in a temp dir. Persistence is off by default (the
    figures are about the server, not the disk); `aof=True` is production's AOF everysec."""
    return _RedisContext(aof=aof, extra_args=extra_args)


# ----------------------------------------------------------------------------- server


@dataclass
class ServerProcess:
    """A running `python -m server`, SERVING and open for trading."""

    process: asyncio.subprocess.Process
    addr: str
    data_dir: Path
    stderr_path: Path
    stdout_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def db_path(self) -> Path:
        """The SQLite file (when ALGOPLANE_DATABASE_URL was not overridden)."""
        return self.data_dir / "algoplane.db"

    def token(self, tenant: str, ttl: timedelta = timedelta(days=1)) -> str:
        return token(tenant, ttl)

    def metadata(self, tenant: str) -> tuple[tuple[str, str]]:
        """Call metadata carrying a fresh token for `tenant`."""
        return metadata(tenant)

    def channel(self) -> grpc.aio.Channel:
        """A new channel to the server; the caller closes it."""
        return grpc.aio.insecure_channel(self.addr)

    def stderr_tail(self, lines: int = 30) -> str:
        return _tail(self.stderr_path, lines)

    @property
    def running(self) -> bool:
        return self.process.returncode is None


def token(tenant: str, ttl: timedelta = timedelta(days=1)) -> str:
    """A bearer token for `tenant`, valid on every server `server_process` starts."""
    return mint_token(JWT_SECRET, tenant, ttl, datetime.now(UTC))


def metadata(tenant: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying a fresh token for `tenant`."""
    return (("authorization", f"Bearer {token(tenant)}"),)


def aio_stub(channel: grpc.aio.Channel) -> strategy_pb2_grpc.StrategyServiceAsyncStub:
    """The generated stub, typed for grpc.aio (its calls are awaitable)."""
    return strategy_pb2_grpc.StrategyServiceStub(channel)


def server_env(redis_url: str, data_dir: Path, addr: str, **extra: str) -> dict[str, str]:
    """The current environment without any ALGOPLANE_* (ours only), plus the bench settings.
    ALGOPLANE_EVENT_LOOP passes through, so that any benchmark can set the server's loop
    against its default: `ALGOPLANE_EVENT_LOOP=asyncio python -m scripts.bench.<name>`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALGOPLANE_")}
    if "ALGOPLANE_EVENT_LOOP" in os.environ:
        env["ALGOPLANE_EVENT_LOOP"] = os.environ["ALGOPLANE_EVENT_LOOP"]
    env["PYTHONPATH"] = str(ROOT)
    env.update(
        ALGOPLANE_REDIS_URL=redis_url,
        ALGOPLANE_DATA_DIR=str(data_dir),
        ALGOPLANE_JWT_SECRET=JWT_SECRET,
        ALGOPLANE_GRPC_ADDR=addr,
        ALGOPLANE_PAPER_LATENCY_MS="0",
        # Off: the metrics endpoint is not what is measured, and a fixed port would collide.
        ALGOPLANE_METRICS_ADDR="",
    )
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def server_process(
    redis_url: str,
    *,
    env: Mapping[str, str] | None = None,
    feed_url: str | None = None,
    data_dir: Path | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
    stop_grace_s: float = STOP_GRACE_S,
) -> AsyncIterator[ServerProcess]:
    """Starts the server as a child process, with a temp SQLite data dir (or `data_dir`),
    waits until it is SERVING and open for trading, and stops it with SIGTERM on exit (SIGKILL
    after `stop_grace_s`). `env` overrides any ALGOPLANE_* it sets."""
    own_dir = data_dir is None
    directory = data_dir or Path(tempfile.mkdtemp(prefix="algoplane-bench-server-"))
    directory.mkdir(parents=True, exist_ok=True)
    addr = f"127.0.0.1:{free_port()}"
    extra = dict(env or {})
    if feed_url is not None:
        extra.setdefault("ALGOPLANE_FEED_URL", feed_url)
    server = await _spawn(server_env(redis_url, directory, addr, **extra), directory, addr)
    try:
        await _wait_ready(server, start_timeout_s)
        yield server
    finally:
        died_early = not server.running
        if died_early:
            print(f"server died early (exit {server.process.returncode}); stderr tail:")
            print(server.stderr_tail())
        await _stop(server.process, stop_grace_s)
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def baseline_process(
    module: str, ready_line: str, *args: str, listens: bool = True
) -> AsyncIterator[tuple[str, int]]:
    """A baseline server (`python -m module --port P *args`) in its own process, like the
    real server, so that neither shares an interpreter with the client; yields its address
    and pid once it printed `ready_line`, and stops it (SIGINT, then SIGKILL) on exit. A
    baseline that only connects out (`listens=False`) gets no --port and yields no address."""
    port = free_port() if listens else 0
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *(("--port", str(port)) if listens else ()),
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if ready_line not in line.decode():
            raise RuntimeError(f"{module} did not start (exit {process.returncode})")
        yield f"127.0.0.1:{port}" if listens else "", process.pid
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _spawn(env: dict[str, str], directory: Path, addr: str) -> ServerProcess:
    stdout_path, stderr_path = directory / "server.out", directory / "server.err"
    # Files, not pipes: nobody has to keep draining them while the benchmark runs.
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            env=env,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    return ServerProcess(process, addr, directory, stderr_path, stdout_path)


async def _wait_ready(server: ServerProcess, timeout_s: float) -> None:
    """The stdout line comes after `open_for_trading`; health SERVING needs Redis, the DB and
    recovery. Both, so a benchmark never measures a server still starting."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if not server.running:
                raise RuntimeError(
                    f"server exited with {server.process.returncode} while starting:\n"
                    f"{server.stderr_tail()}"
                )
            if _LISTENING in server.stdout_path.read_text(errors="replace") and await _serving(
                health
            ):
                return
            if loop.time() > deadline:
                raise RuntimeError(f"server not ready within {timeout_s}s:\n{server.stderr_tail()}")
            await asyncio.sleep(0.05)


async def _serving(health: Any) -> bool:
    try:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def _stop(process: asyncio.subprocess.Process, grace_s: float) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


# ----------------------------------------------------------------------------- strategies


def spec_at(
    buy_at: datetime,
    sell_at: datetime,
    *,
    symbol: str = "BENCH",
    stop_loss: str = "1",
    quantity: int = 1,
) -> pb.StrategySpec:
    """A valid spec whose BUY and SELL fall at the given instants (sub-second kept)."""
    spec = pb.StrategySpec(symbol=symbol, quantity=quantity, stop_loss=stop_loss)
    spec.buy_time.FromNanoseconds(int(buy_at.timestamp() * 1e9))
    spec.sell_time.FromNanoseconds(int(sell_at.timestamp() * 1e9))
    return spec


def future_spec(
    symbol: str = "BENCH", *, stop_loss: str = "1", quantity: int = 1
) -> pb.StrategySpec:
    """A spec that fires nothing during a benchmark: BUY a day ahead, SELL an hour later."""
    buy = datetime.now(UTC) + timedelta(days=1)
    return spec_at(
        buy, buy + timedelta(hours=1), symbol=symbol, stop_loss=stop_loss, quantity=quantity
    )


# ----------------------------------------------------------------------------- feed


@dataclass(frozen=True, slots=True)
class SentTick:
    """When a tick left the feed: `perf_ns` for intervals in this process, `wall_ns` to
    compare with timestamps taken in other processes (same machine, same clock)."""

    perf_ns: int
    wall_ns: int
    receivers: int


class TickFeed:
    """A websocket price feed in the benchmark process, speaking the JSON format the listener
    reads (server/market/formats.py): ticks `{"symbol", "price", "ts"}` out, subscribe
    `{"action": "subscribe", "symbols": [...]}` in (a later one replaces the set; a client
    that never subscribed gets every symbol). Ticks are sent only when asked, so a benchmark
    controls every price the server sees."""

    def __init__(self) -> None:
        self._server: Server | None = None
        self._port = 0
        self._clients: dict[ServerConnection, set[str] | None] = {}

    async def __aenter__(self) -> TickFeed:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def start(self) -> str:
        self._server = await serve(self._handle, "127.0.0.1", 0, close_timeout=2)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._port}"

    @property
    def connections(self) -> int:
        return len(self._clients)

    def subscribed(self) -> set[str]:
        """Every symbol some connected client asked for."""
        return set().union(*(s for s in self._clients.values() if s is not None))

    async def wait_connected(self, count: int = 1, timeout_s: float = 30.0) -> None:
        await _until(lambda: len(self._clients) >= count, timeout_s, "feed connections")

    async def wait_subscribed(self, symbols: Iterable[str], timeout_s: float = 30.0) -> None:
        """Until a connected client subscribed to all of `symbols`."""
        wanted = set(symbols)
        await _until(
            lambda: any(s is not None and wanted <= s for s in self._clients.values()),
            timeout_s,
            f"a subscription to {sorted(wanted)[:5]}",
        )

    async def send(self, symbol: str, price: Decimal | str) -> SentTick:
        """One tick now to every client that wants `symbol`; returns when it was sent."""
        return await self.send_many([(symbol, price)])

    async def send_many(self, ticks: Sequence[tuple[str, Decimal | str]]) -> SentTick:
        """Several ticks as one JSON array frame (one message, like a feed's batch)."""
        wall_ns, perf_ns = time.time_ns(), time.perf_counter_ns()
        ts_ms = wall_ns // 1_000_000
        sent = 0
        for connection, symbols in list(self._clients.items()):
            items = [
                {"symbol": symbol, "price": str(price), "ts": ts_ms}
                for symbol, price in ticks
                if symbols is None or symbol in symbols
            ]
            if not items:
                continue
            body: Any = items[0] if len(items) == 1 else items
            with contextlib.suppress(ConnectionClosed):
                await connection.send(json.dumps(body, separators=(",", ":")))
                sent += 1
        return SentTick(perf_ns, wall_ns, sent)

    async def send_each(self, ticks: Sequence[tuple[str, Decimal | str]]) -> SentTick:
        """Several ticks, each its own message as `send` makes it, framed here and written
        together. websockets' send() runs its protocol machinery (and compression, when
        negotiated) in Python for each message, and this feed shares the machine's cores with
        the server it measures: with only websockets' frame serializer a tick costs it a few
        microseconds instead of tens. Frames are unmasked (server to client), uncompressed,
        which permessage-deflate allows any message to be (RSV1 clear). The JSON is written
        by hand: the benchmarks' symbols and decimal prices hold nothing JSON escapes."""
        wall_ns, perf_ns = time.time_ns(), time.perf_counter_ns()
        ts_ms = wall_ns // 1_000_000
        sent = 0
        for connection, symbols in list(self._clients.items()):
            frames = [
                Frame(
                    Opcode.TEXT, f'{{"symbol":"{symbol}","price":"{price}","ts":{ts_ms}}}'.encode()
                ).serialize(mask=False)
                for symbol, price in ticks
                if symbols is None or symbol in symbols
            ]
            if not frames or connection.state is not State.OPEN:
                continue
            with contextlib.suppress(ConnectionError):
                connection.transport.write(b"".join(frames))
                await connection.drain()  # the same flow control send() waits on
                sent += 1
        return SentTick(perf_ns, wall_ns, sent)

    async def _handle(self, connection: ServerConnection) -> None:
        self._clients[connection] = None
        try:
            async for raw in connection:
                self._on_message(connection, raw)
        except ConnectionClosed:
            pass
        finally:
            self._clients.pop(connection, None)

    def _on_message(self, connection: ServerConnection, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("action") != "subscribe":
            return
        symbols = message.get("symbols")
        if isinstance(symbols, list):
            self._clients[connection] = {str(s) for s in symbols}


async def _until(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not ready():
        if loop.time() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s}s")
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------------------- broker book


async def broker_entries(redis: Redis) -> dict[str, int]:
    """client order id -> time.time_ns() at which PaperBroker.place_order was entered (before
    any simulated latency), for every order in the paper broker's book."""
    entries: dict[str, int] = {}
    async for order_id, raw in redis.hscan_iter(keys.PAPER_ORDERS, count=1000):
        entered = json.loads(raw).get("entered_ns")
        if isinstance(entered, int):
            entries[str(order_id)] = entered
    return entries


async def wait_for_orders(redis: Redis, count: int, timeout_s: float = 60.0) -> None:
    """Until the paper broker's book holds at least `count` orders."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while int(await redis.hlen(keys.PAPER_ORDERS)) < count:
        if loop.time() > deadline:
            have = await redis.hlen(keys.PAPER_ORDERS)
            raise TimeoutError(f"{have} of {count} broker orders within {timeout_s}s")
        await asyncio.sleep(0.02)


# ----------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    """What a closed loop did: per-call latencies (s) of the calls that succeeded."""

    latencies_s: list[float]
    elapsed_s: float
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Successful calls per second."""
        return len(self.latencies_s) / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def closed_loop(
    call: Callable[[int], Awaitable[object]], total: int, in_flight: int
) -> LoadResult:
    """Runs call(0) .. call(total - 1) with `in_flight` of them outstanding at all times (each
    worker starts the next as soon as its last one answered). Failures are counted, not raised."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(total))

    async def worker() -> None:
        for n in counter:
            start = time.perf_counter()
            try:
                await call(n)
            except Exception as exc:  # noqa: BLE001 - a failed call is a figure, not a crash
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(in_flight, total))))
    return LoadResult(latencies, time.perf_counter() - began, errors)


class ProcessMeter:
    """CPU seconds and RSS of one process (the server, Redis), from /proc via psutil."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._cpu0 = self.cpu_seconds()
        self._t0 = time.perf_counter()

    def cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def rss_bytes(self) -> int:
        return int(self._process.memory_info().rss)

    def reset(self) -> None:
        self._cpu0, self._t0 = self.cpu_seconds(), time.perf_counter()

    def cpu_share(self) -> float:
        """CPU seconds per wall second since the last reset (1.0 = one core busy)."""
        wall = time.perf_counter() - self._t0
        return (self.cpu_seconds() - self._cpu0) / wall if wall > 0 else 0.0


# ----------------------------------------------------------------------------- stats


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default).
    Infinite samples (something that never happened, counted as later than anything that
    did) give infinity wherever the percentile reaches one, never NaN."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    if rank == low:
        return ordered[low]
    if math.isinf(ordered[high]):
        return ordered[high]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Summary:
    count: int
    p50: float
    p99: float
    max: float


def summarize(samples: Sequence[float]) -> Summary:
    """p50, p99 and max of one run's samples."""
    return Summary(
        len(samples),
        percentile(samples, 50),
        percentile(samples, 99),
        max(samples) if samples else math.nan,
    )


@dataclass(frozen=True, slots=True)
class Spread:
    """One figure over several runs: the median of the per-run values and their range."""

    median: float
    low: float
    high: float
    runs: int


def over_runs(values: Sequence[float]) -> Spread:
    if not values:
        return Spread(math.nan, math.nan, math.nan, 0)
    return Spread(statistics.median(values), min(values), max(values), len(values))


@dataclass(frozen=True, slots=True)
class Target:
    """A figure's goal: at most or at least `limit` (in the figure's unit)."""

    kind: Literal["at_most", "at_least"]
    limit: float

    def met(self, value: float) -> bool:
        return value <= self.limit if self.kind == "at_most" else value >= self.limit

    def text(self, unit: str) -> str:
        sign = "≤" if self.kind == "at_most" else "≥"
        return f"{sign} {fmt(self.limit)} {unit}".rstrip()


def at_most(limit: float) -> Target:
    return Target("at_most", limit)


def at_least(limit: float) -> Target:
    return Target("at_least", limit)


def fmt(value: float) -> str:
    """A figure to about three significant digits, thousands separated."""
    if math.isnan(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


@dataclass(frozen=True, slots=True)
class Figure:
    name: str
    value: float
    unit: str
    spread: Spread | None = None
    target: Target | None = None

    @property
    def passed(self) -> bool | None:
        if self.target is None or math.isnan(self.value):
            return None
        return self.target.met(self.value)

    def cells(self) -> list[str]:
        spread = (
            f"{fmt(self.spread.low)} .. {fmt(self.spread.high)} ({_runs(self.spread.runs)})"
            if self.spread is not None
            else ""
        )
        target = self.target.text(self.unit) if self.target is not None else ""
        result = {True: "pass", False: "MISS", None: ""}[self.passed]
        return [self.name, f"{fmt(self.value)} {self.unit}".rstrip(), spread, target, result]


def _runs(count: int) -> str:
    return "1 run" if count == 1 else f"{count} runs"


_HEADER = ["figure", "value (median)", "spread (min .. max)", "target", "result"]


@dataclass
class Report:
    """One benchmark's figures, its parameters and notes on method."""

    name: str
    title: str
    params: dict[str, object] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        name: str,
        value: float,
        unit: str = "",
        *,
        spread: Spread | None = None,
        target: Target | None = None,
    ) -> Figure:
        figure = Figure(name, value, unit, spread, target)
        self.figures.append(figure)
        return figure

    def add_runs(
        self, name: str, values: Sequence[float], unit: str = "", *, target: Target | None = None
    ) -> Figure:
        """A figure measured once per run: its median, with the min-max as the spread."""
        spread = over_runs(values)
        return self.add(name, spread.median, unit, spread=spread, target=target)

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def passed(self) -> bool:
        return all(f.passed is not False for f in self.figures)

    def text(self) -> str:
        rows = [_HEADER, *(f.cells() for f in self.figures)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
        lines = [f"== {self.title} ({self.name})", self._params_line()]
        lines += [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
        ]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(line.rstrip() for line in lines if line is not None)

    def markdown(self, heading: str | None = None) -> str:
        title = heading or self.title
        lines = [f"## {title}", "", f"`{self.name}`: {self._params_line()}", ""]
        lines.append("| " + " | ".join(_HEADER) + " |")
        lines.append("|" + "---|" * len(_HEADER))
        lines += ["| " + " | ".join(f.cells()) + " |" for f in self.figures]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> Report:
        """The inverse of `to_json` (the runner gets reports from child processes)."""
        data = json.loads(text)
        figures = [
            Figure(
                f["name"],
                float(f["value"]),
                f["unit"],
                Spread(**f["spread"]) if f["spread"] else None,
                Target(**f["target"]) if f["target"] else None,
            )
            for f in data["figures"]
        ]
        return cls(data["name"], data["title"], data["params"], figures, data["notes"])

    def _params_line(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items()) or "default sizes"


# ----------------------------------------------------------------------------- machine


@dataclass(frozen=True, slots=True)
class Machine:
    cpu: str
    cores_logical: int
    cores_physical: int
    ram_bytes: int
    os: str
    python: str
    redis: str
    date: str
    load: tuple[float, float, float]

    def lines(self) -> list[str]:
        return [
            f"CPU: {self.cpu}, {self.cores_logical} logical / {self.cores_physical} physical cores",
            f"RAM: {self.ram_bytes / 2**30:.1f} GiB",
            f"OS: {self.os}",
            f"Python: {self.python}",
            f"Redis: {self.redis}",
            f"Date: {self.date}",
            "Load average (1/5/15 min) at start: " + " / ".join(f"{x:.2f}" for x in self.load),
        ]


def machine() -> Machine:
    """What the figures were taken on (the load average shows whether it was quiet)."""
    return Machine(
        cpu=_cpu_model(),
        cores_logical=psutil.cpu_count(logical=True) or 0,
        cores_physical=psutil.cpu_count(logical=False) or 0,
        ram_bytes=int(psutil.virtual_memory().total),
        os=f"{platform.system()} {platform.release()}",
        python=f"{platform.python_implementation()} {platform.python_version()}",
        redis=_redis_version(),
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        load=os.getloadavg(),
    )


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _redis_version() -> str:
    try:
        out = subprocess.run(
            [find_redis_server(), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    version = next((p.split("=", 1)[1] for p in out.split() if p.startswith("v=")), out.strip())
    return f"redis-server {version}"


# ----------------------------------------------------------------------------- entry points


def print_report(report: Report) -> None:
    print(report.text(), flush=True)
