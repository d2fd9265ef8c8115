"""`algoplane watch`: the table model on its own, and the real console script under a pty
against a real server that is restarted underneath it."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from pathlib import Path

import pexpect
from redis.asyncio import Redis

from clients.dashboard import Board
from clients.retry import Connection, StreamState
from clients.sdk import AlgoplaneClient
from protos.algoplane.v1 import strategy_pb2 as pb
from tests.conftest import Harness, serving
from tests.support import RedisProcess, free_port, spec_at, token
from tests.test_cli import ALGOPLANE

SID = "stg_0193a0b0c0d0aaaaaaaaaaaaaaaaaaaaaaaa"


def runtime(version: int, **fields: object) -> pb.Runtime:
    values: dict[str, object] = {
        "strategy_id": SID, "symbol": "SBIN", "status": pb.STRATEGY_STATUS_RUNNING,
        "position": pb.POSITION_BOUGHT, "entry_price": "100", "version": version,
    }  # fmt: skip
    values.update(fields)
    return pb.Runtime(**values)  # type: ignore[arg-type]


def test_the_board_drops_stale_snapshots_and_computes_pnl_in_decimals() -> None:
    board = Board()
    assert board.apply_runtime(runtime(3, last_price="100.1"))
    row = board.rows[SID]
    assert row.pnl is None  # the quantity is not known until the strategy is read
    strategy = pb.Strategy(id=SID, spec=pb.StrategySpec(symbol="SBIN", quantity=3))
    strategy.status = pb.STRATEGY_STATUS_SCHEDULED
    board.add_strategy(strategy)
    assert row.status == "RUNNING"  # the stored status does not override a runtime
    assert row.pnl == Decimal("0.3")  # 3 x 0.1 exactly, no float drift
    assert not board.apply_runtime(runtime(2, entry_price="1"))  # older: dropped
    assert row.entry == Decimal("100")
    assert board.apply_runtime(runtime(3, notice="no price for SBIN for 30s"))
    assert (row.note, row.last) == ("no price for SBIN for 30s", Decimal("100.1"))
    board.apply_runtime(
        runtime(4, status=pb.STRATEGY_STATUS_COMPLETED, position=pb.POSITION_SOLD,
                exit_price="97.25", last_price="98")
    )  # fmt: skip
    assert row.pnl == Decimal("-8.25")  # the exit price wins over the last price


def test_the_board_keeps_the_latest_order_and_ignores_other_ids() -> None:
    board = Board(only=frozenset({SID}))
    later = pb.Order(strategy_id=SID, kind=pb.ORDER_KIND_SELL, status=pb.ORDER_STATUS_PENDING)
    later.updated_at.FromSeconds(200)
    earlier = pb.Order(
        strategy_id=SID, kind=pb.ORDER_KIND_BUY, status=pb.ORDER_STATUS_FILLED, fill_price="101"
    )
    earlier.updated_at.FromSeconds(100)
    assert board.apply_order(earlier) and board.rows[SID].last_order == "BUY FILLED @ 101"
    assert board.apply_order(later) and board.rows[SID].last_order == "SELL PENDING"
    assert not board.apply_order(earlier)
    assert not board.apply_runtime(runtime(1, strategy_id="stg_other"))
    assert list(board.rows) == [SID]


def test_the_connection_shown_is_the_worst_of_both_streams() -> None:
    board = Board()
    assert board.connection()[0] == "connecting"
    board.set_stream("runtime", StreamState(Connection.CONNECTED))
    board.set_stream("orders", StreamState(Connection.CONNECTED))
    assert board.connection()[0] == "connected"
    board.set_stream("orders", StreamState(Connection.RECONNECTING, attempt=3, error="x"))
    assert board.connection()[0] == "reconnecting (attempt 3)"
    board.set_stream("runtime", StreamState(Connection.FAILED, error="UNAUTHENTICATED: expired"))
    assert board.connection()[0] == "error: UNAUTHENTICATED: expired"


# -- under a pty --------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class Screen:
    """What the watch process drew. Rich's Live redraws in place, so the last frame (from the
    last header line on) is what a person would see now."""

    def __init__(self, child: pexpect.spawn[str]) -> None:
        self.child = child
        self.text = ""

    def frame(self) -> str:
        start = self.text.rfind("algoplane watch")
        return self.text[start:] if start >= 0 else ""

    async def shows(self, check: Callable[[str], bool], timeout_s: float = 15.0) -> str:
        """Reads without blocking the event loop (the server runs in it) until the current
        frame passes `check`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                chunk = self.child.read_nonblocking(65536, timeout=0)
                self.text += _ANSI.sub("", chunk)
            except pexpect.TIMEOUT:
                await asyncio.sleep(0.05)
            if check(self.frame()) and self.frame().count("\n") > 3:
                return self.frame()
        raise AssertionError(f"the screen never showed it; last frame:\n{self.frame()}")


def row_of(frame: str, sid: str) -> list[str]:
    line = next((line for line in frame.splitlines() if sid in line), "")
    return [cell.strip() for cell in line.strip()[1:-1].split("│")] if line else []


@asynccontextmanager
async def watching(port: int, tok: str) -> AsyncIterator[Screen]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALGOPLANE_")}
    env.update(TERM="xterm-256color", ALGOPLANE_TOKEN=tok, ALGOPLANE_TZ="UTC")
    child = pexpect.spawn(
        ALGOPLANE, ["watch", "--addr", f"127.0.0.1:{port}", "--refresh", "1s"],
        env=env, dimensions=(40, 160), encoding="utf-8", codec_errors="replace",
    )  # fmt: skip
    try:
        yield Screen(child)
    finally:
        child.sendintr()
        await asyncio.to_thread(child.expect, pexpect.EOF, timeout=10)
        child.close()
        assert child.exitstatus == 130, child.exitstatus


@asynccontextmanager
async def server_on(redis_proc: RedisProcess, data_dir: Path, port: int) -> AsyncIterator[Harness]:
    async with serving(redis_proc.url, data_dir, grpc_addr=f"127.0.0.1:{port}") as harness:
        yield harness


async def test_watch_shows_the_table_and_survives_a_server_restart(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    flush = Redis.from_url(redis_proc.url)
    await flush.flushall()
    await flush.aclose()
    port, tok = free_port(), token("watcher")
    async with AsyncExitStack() as stack:
        first_server = AsyncExitStack()
        stack.push_async_callback(first_server.aclose)
        first = await first_server.enter_async_context(server_on(redis_proc, tmp_path, port))
        await first.redis.set("price:{SBIN}", "100")
        async with AlgoplaneClient(f"127.0.0.1:{port}", tok) as client:
            now = time.time()
            started = await client.start(spec=spec_at(now + 1.5, now + 3600))
        sid = started.strategy_id
        screen = await stack.enter_async_context(watching(port, tok))
        frame = await screen.shows(
            lambda f: " connected " in f and row_of(f, sid)[4:7] == ["BOUGHT", "100", "100"]
        )
        assert row_of(frame, sid) == [
            sid, "SBIN", "10", "RUNNING", "BOUGHT", "100", "100", "", "0", "BUY FILLED @ 100", ""
        ]  # fmt: skip
        await first.redis.set("price:{SBIN}", "101.5")  # read by the price refresh
        frame = await screen.shows(lambda f: row_of(f, sid)[8:9] == ["+15"])
        assert row_of(frame, sid)[6] == "101.5"

        await first_server.aclose()  # the server goes away under the dashboard
        frame = await screen.shows(lambda f: "reconnecting (attempt" in f)
        assert row_of(frame, sid)[3:5] == ["RUNNING", "BOUGHT"]  # the table stays meanwhile
        second = await stack.enter_async_context(server_on(redis_proc, tmp_path, port))
        await screen.shows(lambda f: " connected " in f)
        await second.redis.set("price:{SBIN}", "102")
        async with AlgoplaneClient(f"127.0.0.1:{port}", tok) as client:
            await client.stop(sid)
        frame = await screen.shows(lambda f: row_of(f, sid)[3:4] == ["STOPPED"])
        row = row_of(frame, sid)
        assert row[:6] + row[7:] == [
            sid, "SBIN", "10", "STOPPED", "SOLD", "100", "102", "+20", "SELL FILLED @ 102", ""
        ]  # fmt: skip
        assert " connected " in frame
