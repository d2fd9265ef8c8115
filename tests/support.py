"""Test helpers: real redis-server processes, free ports, tokens and specs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import jwt
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from protos.algoplane.v1 import strategy_pb2_grpc
from server.store.embedded_redis import find_redis_server

SECRET = "test-secret-0123456789abcdef-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisProcess:
    """A real redis-server on a free TCP port, never the machine's 6379."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    appendonly: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def redis_process(directory: Path, *, appendonly: bool = False) -> Iterator[RedisProcess]:
    proc = RedisProcess(port=free_port(), directory=directory, appendonly=appendonly).start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(directory, ignore_errors=True)


def token(tenant: str, *, ttl: timedelta = timedelta(hours=1), secret: str = SECRET) -> str:
    now = datetime.now(UTC)
    claims = {"sub": tenant, "iat": int(now.timestamp()), "exp": int((now + ttl).timestamp())}
    return jwt.encode(claims, secret, algorithm="HS256")


def auth(tenant: str = "tenant-a") -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token(tenant)}"),)


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def spec(
    *,
    symbol: str = "SBIN",
    quantity: int = 10,
    buy_in: timedelta = timedelta(hours=1),
    hold: timedelta = timedelta(hours=1),
    stop_loss: str = "95.5",
) -> pb.StrategySpec:
    buy = datetime.now(UTC).replace(microsecond=0) + buy_in
    return pb.StrategySpec(
        symbol=symbol,
        quantity=quantity,
        buy_time=ts(buy),
        sell_time=ts(buy + hold),
        stop_loss=stop_loss,
    )


def rpc_code(exc: BaseException) -> grpc.StatusCode:
    assert isinstance(exc, grpc.aio.AioRpcError | grpc.RpcError), exc
    code = exc.code()
    assert isinstance(code, grpc.StatusCode)
    return code


def server_env(**overrides: str) -> dict[str, str]:
    """Environment for a server subprocess: only our settings, plus the current PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALGOPLANE_")}
    env.update(overrides)
    env.setdefault("ALGOPLANE_METRICS_ADDR", "")  # never the default 9464 (servers side by side)
    env.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    return env


PYTHON = sys.executable


def aio_stub(channel: grpc.aio.Channel) -> strategy_pb2_grpc.StrategyServiceAsyncStub:
    """The stub typed for grpc.aio (its calls are awaitable), for the type checker's sake."""
    return strategy_pb2_grpc.StrategyServiceStub(channel)


async def blocked_stream_readers(redis: Redis, count: int, timeout_s: float = 5.0) -> None:
    """Waits until exactly `count` clients sit in a blocking XREAD, i.e. the server's open
    streams have fixed their start position; a test can then write without a race."""
    deadline = time.monotonic() + timeout_s
    while True:
        clients = await redis.client_list()
        blocked = [c for c in clients if c.get("cmd") == "xread" and "b" in c.get("flags", "")]
        if len(blocked) == count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} blocked stream readers, saw {len(blocked)}")
        await asyncio.sleep(0.02)


async def redis_dump(redis: Redis) -> dict[str, object]:
    """Every key in Redis with its type and content, to show that a call wrote nothing."""
    dump: dict[str, object] = {}
    for key in sorted(str(k) for k in await redis.keys("*")):
        kind = await redis.type(key)
        if kind == "hash":
            dump[key] = await redis.hgetall(key)
        elif kind == "set":
            dump[key] = sorted(await redis.smembers(key))
        elif kind == "stream":
            dump[key] = await redis.xrange(key)
        elif kind == "list":
            dump[key] = await redis.lrange(key, 0, -1)
        elif kind == "zset":
            dump[key] = await redis.zrange(key, 0, -1, withscores=True)
        else:
            dump[key] = (kind, await redis.get(key) if kind == "string" else None)
    return dump


def spec_at(
    buy_at: float, sell_at: float, symbol: str = "SBIN", stop_loss: str = "95.5"
) -> pb.StrategySpec:
    """A spec whose BUY and SELL fall at the given epoch instants (sub-second kept)."""
    message = spec(symbol=symbol, stop_loss=stop_loss)
    message.buy_time.FromNanoseconds(int(buy_at * 1e9))
    message.sell_time.FromNanoseconds(int(sell_at * 1e9))
    return message
