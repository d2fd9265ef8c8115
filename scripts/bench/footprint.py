"""Benchmark 5: what a strategy and an order cost to keep.

Part 1, armed strategies: starts `--strategies` strategies through the API (StartStrategy with
a spec, create-and-start in one call, many in flight, tenants in turn; BUY a day ahead so they
stay SCHEDULED) and measures
  - Redis bytes per strategy, two ways: MEMORY USAGE summed over the keys the strategies own
    (`strategy:{id}`, `runtime:{id}`, their share of `symbol:{S}:strategies`), and the growth
    of INFO used_memory divided by the count (this one also holds the tenants' event streams,
    which keep up to ALGOPLANE_STREAM_MAXLEN events each, and allocator overhead);
  - the server's RSS with that many live strategies (psutil), against its RSS before.
Part 2, orders: on a fresh server, `--order-strategies` strategies whose BUY and SELL fall a few
seconds ahead run to completion (two orders each, filled by the paper broker at a price set in
Redis) and it measures the SQLite bytes per order row, two ways: the pages of the `orders`
table and its indexes (SQLite's dbstat), and the growth of the checkpointed file across the
orders (which also holds the strategy rows' updates those orders cause).

Target: under 1 KiB of Redis per armed strategy.

    .venv/bin/python -m scripts.bench.footprint [--strategies 100000] [--order-strategies 1500]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from scripts.bench import harness
from scripts.bench.harness import Report, at_most
from server.store import keys

if TYPE_CHECKING:
    from protos.algoplane.v1.strategy_pb2_grpc import StrategyServiceAsyncStub as Stub

NAME = "footprint"
TITLE = "Footprint: Redis per armed strategy, DB per order, server RSS"
KIB = 1024
SYMBOLS = [f"FP{n}" for n in range(50)]
PRICE = "100"
FINAL_ORDER_STATES = ("FILLED", "REJECTED", "FAILED", "SKIPPED")


@dataclass
class Armed:
    """Part 1's measurements."""

    count: int
    fill_s: float
    failed: list[str]
    key_bytes: dict[str, int]
    used_memory_delta: int
    rss_before: int
    rss_after: int
    idle_cpu: float


async def _start_many(
    stub: Stub, server: harness.ServerProcess, specs: Sequence[pb.StrategySpec], in_flight: int
) -> tuple[list[str], harness.LoadResult]:
    """Create-and-start each spec; returns the ids ('' for a failed call)."""
    ids = [""] * len(specs)
    tenants = [server.metadata(f"tenant-{t}") for t in range(10)]
    nonce = f"{time.time_ns():x}"
    progress = max(1, len(specs) // 10)
    began = time.perf_counter()

    async def call(n: int) -> None:
        request = pb.StartStrategyRequest(spec=specs[n], request_id=f"fp{nonce}-{n}")
        runtime = await stub.StartStrategy(request, metadata=tenants[n % len(tenants)])
        ids[n] = runtime.strategy_id
        if n % progress == progress - 1:
            elapsed = time.perf_counter() - began
            print(
                f"  footprint: {n + 1} of {len(specs)} started in {elapsed:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    result = await harness.closed_loop(call, len(specs), in_flight)
    return ids, result


async def _memory_usage(redis: Redis, names: Sequence[str]) -> int:
    """Sum of MEMORY USAGE over `names`, exact for aggregates (SAMPLES 0), pipelined."""
    total = 0
    for start in range(0, len(names), 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for name in names[start : start + 5000]:
                pipe.execute_command("MEMORY", "USAGE", name, "SAMPLES", "0")
            total += sum(int(v or 0) for v in await pipe.execute())
    return total


async def _key_bytes(redis: Redis, ids: Sequence[str]) -> dict[str, int]:
    streams = [str(name) async for name in redis.scan_iter(match="stream:*", count=1000)]
    return {
        "strategy hashes": await _memory_usage(redis, [keys.strategy(i) for i in ids]),
        "runtime hashes": await _memory_usage(redis, [keys.runtime(i) for i in ids]),
        "symbol sets": await _memory_usage(redis, [keys.symbol_strategies(s) for s in SYMBOLS]),
        "event streams": await _memory_usage(redis, streams),
    }


async def _used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def _settle(meter: harness.ProcessMeter, settle_s: float) -> tuple[int, float]:
    """RSS and CPU share over `settle_s` with no calls, long enough for timer-sync rounds
    over every live strategy (ALGOPLANE_TIMER_SYNC_S, 5 s) to run."""
    meter.reset()
    await asyncio.sleep(settle_s)
    return meter.rss_bytes(), meter.cpu_share()


async def measure_armed(count: int, in_flight: int, settle_s: float) -> Armed:
    async with (
        harness.redis_server() as redis_proc,
        harness.server_process(redis_proc.url) as server,
        server.channel() as channel,
    ):
        redis = redis_proc.client()
        try:
            meter = harness.ProcessMeter(server.pid)
            rss_before, _ = await _settle(meter, settle_s)
            memory_before = await _used_memory(redis)
            specs = [harness.future_spec(SYMBOLS[n % len(SYMBOLS)]) for n in range(count)]
            began = time.perf_counter()
            ids, result = await _start_many(harness.aio_stub(channel), server, specs, in_flight)
            fill_s = time.perf_counter() - began
            started = [i for i in ids if i]
            rss_after, idle_cpu = await _settle(meter, settle_s)
            return Armed(
                count=len(started),
                fill_s=fill_s,
                failed=result.errors,
                key_bytes=await _key_bytes(redis, started),
                used_memory_delta=await _used_memory(redis) - memory_before,
                rss_before=rss_before,
                rss_after=rss_after,
                idle_cpu=idle_cpu,
            )
        finally:
            await redis.aclose()


# ----------------------------------------------------------------------------- orders


@dataclass
class Orders:
    """Part 2's measurements."""

    rows: int
    table_bytes: int
    payload_bytes: int
    # Growth of the file while the orders were written, and how many rows that covers.
    file_delta: int
    rows_in_delta: int
    failed: list[str]


def _checkpointed_size(db: Path) -> int:
    """The main file's size once the WAL is folded in (the WAL is then empty)."""
    with sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=30) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return db.stat().st_size


def _orders_pages(db: Path) -> tuple[int, int, int]:
    """Rows of `orders`, bytes of the pages of it and its indexes, and their payload."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        rows = int(conn.execute("SELECT count(*) FROM orders").fetchone()[0])
        pgsize, payload = conn.execute(
            "SELECT sum(pgsize), sum(payload) FROM dbstat WHERE name IN "
            "(SELECT name FROM sqlite_master WHERE tbl_name = 'orders')"
        ).fetchone()
    return rows, int(pgsize or 0), int(payload or 0)


def _unfinished(db: Path) -> int:
    marks = ",".join("?" * len(FINAL_ORDER_STATES))
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        query = f"SELECT count(*) FROM orders WHERE status NOT IN ({marks})"
        return int(conn.execute(query, FINAL_ORDER_STATES).fetchone()[0])


def _order_specs(count: int, lead_s: float) -> list[pb.StrategySpec]:
    """BUY `lead_s` from now, spread over two seconds, SELL a second after its BUY."""
    base = datetime.now(UTC) + timedelta(seconds=lead_s)
    specs = []
    for n in range(count):
        buy = base + timedelta(seconds=(n % 20) / 10)
        specs.append(
            harness.spec_at(buy, buy + timedelta(seconds=1), symbol=SYMBOLS[n % len(SYMBOLS)])
        )
    return specs


async def _wait_orders(redis: Redis, db: Path, expected: int, timeout_s: float) -> None:
    await harness.wait_for_orders(redis, expected, timeout_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if not await asyncio.to_thread(_unfinished, db) or loop.time() > deadline:
            return
        await asyncio.sleep(0.2)


async def measure_orders(count: int, in_flight: int) -> Orders:
    # A late BUY is skipped after ALGOPLANE_BUY_GRACE_S; a backlog here must not turn orders
    # into skips (their rows would be smaller), and lateness is not what is measured.
    env = {"ALGOPLANE_BUY_GRACE_S": "300"}
    async with (
        harness.redis_server() as redis_proc,
        harness.server_process(redis_proc.url, env=env) as server,
        server.channel() as channel,
    ):
        redis = redis_proc.client()
        try:
            for symbol in SYMBOLS:
                await redis.set(keys.price(symbol), PRICE)
            # Starting must finish before the first BUY; 50 starts/s is far below what the
            # server does on a busy 2-core machine.
            specs = _order_specs(count, lead_s=5 + count / 50)
            ids, result = await _start_many(harness.aio_stub(channel), server, specs, in_flight)
            started = sum(1 for i in ids if i)
            # Measured after the starts, so the strategy and idempotency rows are not in it.
            before = await asyncio.to_thread(_checkpointed_size, server.db_path)
            rows_before, _, _ = await asyncio.to_thread(_orders_pages, server.db_path)
            await _wait_orders(redis, server.db_path, 2 * started, timeout_s=120 + count / 10)
            after = await asyncio.to_thread(_checkpointed_size, server.db_path)
            rows, table_bytes, payload = await asyncio.to_thread(_orders_pages, server.db_path)
            return Orders(
                rows, table_bytes, payload, after - before, rows - rows_before, result.errors
            )
        finally:
            await redis.aclose()


# ----------------------------------------------------------------------------- report


async def run(
    *,
    quick: bool = False,
    strategies: int = 100_000,
    order_strategies: int = 1500,
    in_flight: int = 128,
    settle_s: float = 11.0,
) -> Report:
    """Part 1 with `strategies` armed strategies, part 2 with `order_strategies` x 2 orders."""
    if quick:
        strategies, order_strategies, settle_s = 2000, 200, 6.0
    report = Report(
        NAME,
        TITLE,
        {"strategies": strategies, "order strategies": order_strategies, "in flight": in_flight},
    )
    armed = await measure_armed(strategies, in_flight, settle_s)
    _report_armed(report, armed)
    orders = await measure_orders(order_strategies, in_flight)
    _report_orders(report, orders)
    return report


def _report_armed(report: Report, armed: Armed) -> None:
    n = max(armed.count, 1)
    owned = sum(v for k, v in armed.key_bytes.items() if k != "event streams")
    report.add(
        "Redis per armed strategy, MEMORY USAGE of its keys", owned / n, "B", target=at_most(KIB)
    )
    report.add(
        "Redis per armed strategy, used_memory growth / count",
        armed.used_memory_delta / n,
        "B",
        target=at_most(KIB),
    )
    for part, size in armed.key_bytes.items():
        report.add(f"of which {part}, per strategy", size / n, "B")
    report.add(f"server RSS with {armed.count:,} live strategies", armed.rss_after / 2**20, "MiB")
    report.add("server RSS before them", armed.rss_before / 2**20, "MiB")
    report.add("server RSS growth per strategy", (armed.rss_after - armed.rss_before) / n, "B")
    report.add(f"server CPU, no calls, {armed.count:,} live strategies", armed.idle_cpu, "cores")
    report.add(f"time to start {armed.count:,} strategies", armed.fill_s, "s")
    report.add("start rate while filling", armed.count / armed.fill_s, "strategies/s")
    report.note(
        "Part 1: Redis without persistence (memory, not disk, is measured); strategies started "
        "with StartStrategy(spec) through the API, 10 tenants, 50 symbols, BUY a day ahead; "
        "RSS and idle CPU read over two timer-sync rounds with no calls. Event streams are "
        "per tenant and capped by ALGOPLANE_STREAM_MAXLEN, so their share per strategy falls "
        "as strategies grow."
    )
    if armed.failed:
        report.note(f"Part 1: {len(armed.failed)} starts failed, first: {armed.failed[0]}")


def _report_orders(report: Report, orders: Orders) -> None:
    rows = max(orders.rows, 1)
    report.add(
        "DB per order, orders table + indexes (dbstat pages)", orders.table_bytes / rows, "B"
    )
    report.add("DB per order, row payload only (dbstat)", orders.payload_bytes / rows, "B")
    report.add(
        "DB file growth per order (checkpointed)",
        orders.file_delta / max(orders.rows_in_delta, 1),
        "B",
    )
    report.note(
        f"Part 2: {orders.rows:,} order rows (BUY and SELL of strategies due a few seconds "
        "ahead, filled by the paper broker). The dbstat figure counts whole pages of the "
        "orders table and its two indexes (free space in them included); the file growth is "
        f"measured from after the starts over {orders.rows_in_delta:,} rows and also holds the "
        "updates the orders make to their strategy rows."
    )
    if orders.failed:
        report.note(f"Part 2: {len(orders.failed)} starts failed, first: {orders.failed[0]}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2,000 strategies, 400 orders")
    parser.add_argument("--strategies", type=int, default=100_000)
    parser.add_argument("--order-strategies", type=int, default=1500, help="2 orders each")
    parser.add_argument("--in-flight", type=int, default=128)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    report = asyncio.run(
        run(
            quick=args.quick,
            strategies=args.strategies,
            order_strategies=args.order_strategies,
            in_flight=args.in_flight,
        )
    )
    harness.print_report(report)


if __name__ == "__main__":
    main()
