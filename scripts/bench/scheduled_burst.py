"""Benchmark 2: a scheduled burst, N strategies with the same buy_time, against arq.

The real server (subprocess), real Redis, the paper broker with zero latency. N strategies
are started through the API (64 calls in flight) with one common buy_time far enough ahead
for all of them to be in place; each BUY's lateness is the paper broker's entry time minus
buy_time (same machine, same wall clock). Then, on the same redis-server (flushed), the peer
a user would otherwise pick: arq jobs deferred to the same instant (`_defer_until`) whose
function makes the same PaperBroker call, run by an arq worker with the engine's concurrency.
`--replicas N` runs N server processes on the same Redis and SQLite file instead of one
(run_all measures one).

    .venv/bin/python -m scripts.bench.scheduled_burst [--count 10000] [--runs 3] [--replicas 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from scripts.bench.harness import (
    ROOT,
    Report,
    ServerProcess,
    aio_stub,
    at_least,
    at_most,
    broker_entries,
    closed_loop,
    machine,
    percentile,
    print_report,
    redis_server,
    server_process,
    spec_at,
    summarize,
    wait_for_orders,
)
from server.config import Settings
from server.store import keys

SYMBOL = "BURST"
ARQ_VENV = ROOT / ".venv-bench-arq"
ARQ_REQUIREMENT = "arq==0.26.3"
# The peer holds as many jobs at once as the engine holds events (with 32 and with 256 the
# peer's lateness was the same within its spread: its worker is bound by its event loop).
PEER_MAX_JOBS: int = Settings.model_fields["exec_concurrency"].default


def _arq_python() -> Path:
    """The peer's own venv (arq pins redis-py < 6), created on first use."""
    python = ARQ_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(ARQ_VENV)], check=True)
        # The server's paper broker imports grpc (for its error types): the same grpcio.
        pinned = (ROOT / "constraints.txt").read_text().splitlines()
        grpcio = next(line for line in pinned if line.startswith("grpcio=="))
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", ARQ_REQUIREMENT, "hiredis", grpcio],
            check=True,
        )
    return python


async def _start_all(server: ServerProcess, count: int, buy: datetime) -> float:
    channel = server.channel()
    stub = aio_stub(channel)
    md = server.metadata("bench-burst")
    spec = spec_at(buy, buy + timedelta(hours=1), symbol=SYMBOL, stop_loss="1")
    stamp = time.time_ns()

    async def call(n: int) -> None:
        request = pb.StartStrategyRequest(spec=spec, request_id=f"burst-{stamp}-{n}")
        await stub.StartStrategy(request, metadata=md, timeout=60)

    try:
        result = await closed_loop(call, count, 64)
    finally:
        await channel.close(None)
    if result.errors:
        raise RuntimeError(f"{len(result.errors)} starts failed, e.g. {result.errors[0]}")
    return result.rate


async def _ours(
    redis_url: str, redis: Redis, count: int, replicas: int = 1
) -> tuple[list[float], float, int]:
    """Lateness (ms) of every BUY at the broker, the start rate, and BUYs not placed.
    With `replicas` > 1, that many server processes share the Redis and the SQLite file, as
    replicas do (every one keeps every timer; their engines share the consumer group); the
    strategies are started through the first and reach the others by their timer sync."""
    env = {"ALGOPLANE_TIMER_SYNC_S": "5"}
    async with contextlib.AsyncExitStack() as stack:
        shared = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="algoplane-burst-")))
        servers = [
            await stack.enter_async_context(server_process(redis_url, env=env, data_dir=shared))
            for _ in range(replicas)
        ]
        server = servers[0]
        await redis.set(keys.price(SYMBOL), "100")
        # Enough time for every start at >= 150/s, plus a margin for the timers to settle
        # (longer than a timer sync, which is how the other replicas load the strategies).
        buy = datetime.now(UTC) + timedelta(seconds=count / 150 + 5)
        rate = await _start_all(server, count, buy)
        if datetime.now(UTC) >= buy - timedelta(seconds=1):
            raise RuntimeError("starting the strategies took past buy_time; lower --count")
        await asyncio.sleep((buy - datetime.now(UTC)).total_seconds())
        due_ns = int(buy.timestamp() * 1e9)
        # Late BUYs beyond the grace are not placed: counted below.
        with contextlib.suppress(TimeoutError):
            await wait_for_orders(redis, count, timeout_s=120)
        entries = await broker_entries(redis)
        buys = [ns for order_id, ns in entries.items() if order_id.endswith("-1-buy")]
    lateness = [(ns - due_ns) / 1e6 for ns in buys]
    return lateness, rate, count - len(buys)


async def _peer(redis_url: str, redis: Redis, count: int) -> list[float]:
    python = _arq_python()
    env = {
        **os.environ,
        "ARQ_REDIS_URL": redis_url,
        "ARQ_MAX_JOBS": str(PEER_MAX_JOBS),
        "PYTHONPATH": str(ROOT),
    }
    worker = await asyncio.create_subprocess_exec(
        str(python),
        "-m",
        "arq",
        "scripts.bench.arq_peer.WorkerSettings",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await redis.set(keys.price(SYMBOL), "100")
        due_ns = time.time_ns() + int((count / 1000 + 5) * 1e9)
        enqueue = await asyncio.create_subprocess_exec(
            str(python),
            str(ROOT / "scripts" / "bench" / "arq_peer.py"),
            "enqueue",
            redis_url,
            str(count),
            str(due_ns),
            env=env,
        )
        if await enqueue.wait() != 0:
            raise RuntimeError("enqueueing the arq jobs failed")
        if time.time_ns() >= due_ns:
            raise RuntimeError("enqueueing the arq jobs took past the due time")
        await wait_for_orders(redis, count, timeout_s=120)
        entries = await broker_entries(redis)
    finally:
        worker.terminate()
        await worker.wait()
    return [(ns - due_ns) / 1e6 for order_id, ns in entries.items() if order_id.startswith("peer")]


async def run(
    *, quick: bool = False, count: int = 10_000, runs: int = 3, replicas: int = 1
) -> Report:
    if quick:
        count, runs = 500, 1
    on = f", {replicas} server replicas" if replicas > 1 else ""
    report = Report(
        "scheduled_burst",
        f"Scheduled burst: {count:,} BUYs due at one instant{on}, vs arq",
        params={"count": count, "runs": runs, "replicas": replicas},
    )
    firsts, lasts, p50s, p99s, peer_p50s, peer_p99s, peer_lasts = ([] for _ in range(7))
    ratios, missing_total, start_rates = [], 0, []
    for _ in range(runs):
        async with redis_server() as redis_proc:
            redis = redis_proc.client()
            try:
                lateness, rate, missing = await _ours(redis_proc.url, redis, count, replicas)
                await redis.flushall()
                peer = await _peer(redis_proc.url, redis, count)
            finally:
                await redis.aclose()
        missing_total += missing
        start_rates.append(rate)
        ours, theirs = summarize(lateness), summarize(peer)
        firsts.append(min(lateness))
        # All placed within 5 s is the target: a run that did not place them all has no
        # drain time, whatever its latest placed BUY was.
        lasts.append(ours.max if missing == 0 else math.inf)
        p50s.append(ours.p50)
        p99s.append(ours.p99)
        peer_p50s.append(theirs.p50)
        peer_p99s.append(theirs.p99)
        peer_lasts.append(theirs.max)
        # Over every BUY that was due, one never placed counting as later than any placed: a
        # run that dropped its latest BUYs gets no better p99 for it (past 1%: inf, ratio 0).
        ratios.append(theirs.p99 / percentile(lateness + [math.inf] * missing, 99))
    report.add_runs("first BUY late by", firsts, "ms", target=at_most(20))
    report.add_runs(
        "last BUY late by (all placed = drain time; inf: not all placed)",
        lasts,
        "ms",
        target=at_most(5000),
    )
    report.add_runs("BUY lateness p50 (placed BUYs)", p50s, "ms")
    report.add_runs("BUY lateness p99 (placed BUYs)", p99s, "ms")
    report.add_runs("arq: lateness p50", peer_p50s, "ms")
    report.add_runs("arq: lateness p99", peer_p99s, "ms")
    report.add_runs("arq: last job late by", peer_lasts, "ms")
    report.add_runs(
        "arq p99 / ours p99 (a BUY not placed counts as latest)", ratios, "x", target=at_least(2)
    )
    report.add_runs("StartStrategy rate while setting up", start_rates, "calls/s")
    report.add("BUYs not placed (all runs)", missing_total, "", target=at_most(0))
    report.note(
        "lateness = paper broker entry (wall clock) - buy_time; a BUY later than the engine's "
        "5 s grace is recorded as failed, not placed, and counted as not placed"
    )
    report.note(
        f"arq peer: {ARQ_REQUIREMENT}, max_jobs={PEER_MAX_JOBS} (the engine's concurrency), "
        "poll_delay=0.05 s"
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="server processes sharing the Redis and the SQLite file (default 1)",
    )
    args = parser.parse_args()
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    print("\n".join(machine().lines()))
    report = run(quick=args.quick, count=args.count, runs=args.runs, replicas=args.replicas)
    print_report(asyncio.run(report))


if __name__ == "__main__":
    main()
