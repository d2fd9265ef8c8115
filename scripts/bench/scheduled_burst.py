"""Benchmark 2: a scheduled burst, N strategies with the same buy_time, against arq.

The real server (subprocess), real Redis, the paper broker with zero latency. N strategies
are started through the API (64 calls in flight) with one common buy_time far enough ahead
for all of them to be in place; each BUY's lateness is the paper broker's entry time minus
buy_time (same machine, same wall clock). Then, on the same redis-server (flushed), the peer
a user would otherwise pick: arq jobs deferred to the same instant (`_defer_until`) whose
function makes the same PaperBroker call, run by an arq worker with the engine's concurrency.
The server runs with `ALGOPLANE_ENGINE_PROCESSES=2` (the server and one engine-only worker,
as for a 2-core host: README, Performance), the configuration the targets apply to; in the
same runs it is measured again with 1 (the server's engine alone), for comparison.
`--engine-processes 2,1` chooses those configurations (the first has the targets);
`--replicas N` runs N server processes on the same Redis and SQLite file instead of one.

    .venv/bin/python -m scripts.bench.scheduled_burst [--count 10000] [--runs 3]
        [--engine-processes 2,1] [--replicas 1]
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from scripts.bench.harness import (
    ROOT,
    Report,
    ServerProcess,
    Target,
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
    redis_url: str, redis: Redis, count: int, replicas: int = 1, engine_processes: int = 1
) -> tuple[list[float], float, int]:
    """Lateness (ms) of every BUY at the broker, the start rate, and BUYs not placed.
    With `replicas` > 1, that many server processes share the Redis and the SQLite file, as
    replicas do (every one keeps every timer; their engines share the consumer group); the
    strategies are started through the first and reach the others by their timer sync."""
    env = {"ALGOPLANE_TIMER_SYNC_S": "5", "ALGOPLANE_ENGINE_PROCESSES": str(engine_processes)}
    async with contextlib.AsyncExitStack() as stack:
        shared = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="algoplane-burst-")))
        servers = [
            await stack.enter_async_context(server_process(redis_url, env=env, data_dir=shared))
            for _ in range(replicas)
        ]
        server = servers[0]
        await redis.set(keys.price(SYMBOL), "100")
        # Enough time for every start at >= 300/s (the slowest machine seen set up at 772/s),
        # plus a margin for the timers to settle (longer than a timer sync, which is how the
        # other replicas load the strategies).
        buy = datetime.now(UTC) + timedelta(seconds=count / 300 + 5)
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


@dataclass
class _Runs:
    """One configuration's figures, a value per run."""

    firsts: list[float] = field(default_factory=list)
    lasts: list[float] = field(default_factory=list)
    p50s: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    start_rates: list[float] = field(default_factory=list)
    missing: int = 0

    def add(self, lateness: list[float], missing: int, rate: float, peer_p99: float) -> None:
        ours = summarize(lateness)
        self.missing += missing
        self.start_rates.append(rate)
        self.firsts.append(min(lateness))
        # All placed within 5 s is the target: a run that did not place them all has no
        # drain time, whatever its latest placed BUY was.
        self.lasts.append(ours.max if missing == 0 else math.inf)
        self.p50s.append(ours.p50)
        self.p99s.append(ours.p99)
        # Over every BUY that was due, one never placed counting as later than any placed: a
        # run that dropped its latest BUYs gets no better p99 for it (past 1%: inf, ratio 0).
        self.ratios.append(peer_p99 / percentile(lateness + [math.inf] * missing, 99))


def _processes(n: int) -> str:
    return f"{n} engine process{'es' if n > 1 else ''}"


async def run(
    *,
    quick: bool = False,
    count: int = 10_000,
    runs: int = 3,
    replicas: int = 1,
    engine_processes: Sequence[int] = (2, 1),
) -> Report:
    if quick:
        count, runs = 500, 1
    on = f", {replicas} server replicas" if replicas > 1 else ""
    report = Report(
        "scheduled_burst",
        f"Scheduled burst: {count:,} BUYs due at one instant, "
        f"{_processes(engine_processes[0])}{on}, vs arq",
        params={
            "count": count,
            "runs": runs,
            "replicas": replicas,
            "engine_processes": list(engine_processes),
        },
    )
    measured = {n: _Runs() for n in engine_processes}
    peer_p50s, peer_p99s, peer_lasts = [], [], []
    for _ in range(runs):
        async with redis_server() as redis_proc:
            redis = redis_proc.client()
            try:
                ours = {}
                for n in engine_processes:
                    ours[n] = await _ours(redis_proc.url, redis, count, replicas, n)
                    await redis.flushall()
                peer = await _peer(redis_proc.url, redis, count)
            finally:
                await redis.aclose()
        theirs = summarize(peer)
        peer_p50s.append(theirs.p50)
        peer_p99s.append(theirs.p99)
        peer_lasts.append(theirs.max)
        for n, (lateness, rate, missing) in ours.items():
            measured[n].add(lateness, missing, rate, theirs.p99)
    primary, *others = engine_processes
    _add_figures(report, measured[primary], "", targets=True)
    report.add_runs("arq: lateness p50", peer_p50s, "ms")
    report.add_runs("arq: lateness p99", peer_p99s, "ms")
    report.add_runs("arq: last job late by", peer_lasts, "ms")
    for n in others:
        _add_figures(report, measured[n], f"{_processes(n)}: ", targets=False)
    report.note(
        "lateness = paper broker entry (wall clock) - buy_time; a BUY later than the engine's "
        "5 s grace is recorded as failed, not placed, and counted as not placed"
    )
    report.note(
        f"ours: the server with ALGOPLANE_ENGINE_PROCESSES={primary} (targets)"
        + "".join(f", then with {n} (no target, for comparison)" for n in others)
        + ", each on the same Redis flushed between them, in every run"
    )
    report.note(
        f"arq peer: {ARQ_REQUIREMENT}, one worker, max_jobs={PEER_MAX_JOBS} (the engine's "
        "concurrency), poll_delay=0.05 s"
    )
    return report


def _add_figures(report: Report, runs: _Runs, prefix: str, *, targets: bool) -> None:
    def target(t: Target) -> Target | None:
        return t if targets else None

    report.add_runs(f"{prefix}first BUY late by", runs.firsts, "ms", target=target(at_most(20)))
    report.add_runs(
        f"{prefix}last BUY late by (all placed = drain time; inf: not all placed)",
        runs.lasts,
        "ms",
        target=target(at_most(5000)),
    )
    report.add_runs(f"{prefix}BUY lateness p50 (placed BUYs)", runs.p50s, "ms")
    report.add_runs(f"{prefix}BUY lateness p99 (placed BUYs)", runs.p99s, "ms")
    report.add_runs(
        f"{prefix}arq p99 / ours p99 (a BUY not placed counts as latest)",
        runs.ratios,
        "x",
        target=target(at_least(2)),
    )
    report.add_runs(f"{prefix}StartStrategy rate while setting up", runs.start_rates, "calls/s")
    report.add(f"{prefix}BUYs not placed (all runs)", runs.missing, "", target=target(at_most(0)))


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
    parser.add_argument(
        "--engine-processes",
        default="2,1",
        help="ALGOPLANE_ENGINE_PROCESSES values measured in each run, the first with the"
        " targets (default 2,1)",
    )
    args = parser.parse_args()
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    try:
        processes = [int(n) for n in args.engine_processes.split(",")]
    except ValueError:
        processes = []
    if not processes or min(processes) < 1 or len(set(processes)) != len(processes):
        parser.error("--engine-processes: distinct whole numbers >= 1, e.g. 2,1")
    print("\n".join(machine().lines()))
    report = run(
        quick=args.quick,
        count=args.count,
        runs=args.runs,
        replicas=args.replicas,
        engine_processes=processes,
    )
    print_report(asyncio.run(report))


if __name__ == "__main__":
    main()
