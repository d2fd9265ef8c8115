"""Benchmark 3: CreateStrategy and StartStrategy throughput and latency with 64 calls in flight,
against a bare grpc.aio server answering the same RPCs (scripts/bench/echo_server.py).

Each run starts a fresh Redis and server, warms both servers up, then sends `--calls`
CreateStrategy calls (valid specs whose BUY is a day ahead, so nothing fires; unique
request_ids; tenants in turn), then StartStrategy for each strategy it created, then the same
two shapes of call to the echo server, all from one client process with `--in-flight` calls
outstanding. The ratio to the echo server is taken within each run, so a
busy machine slows both sides alike. Target: each RPC at least 40% of the echo server's rate.

The echo server runs in its own process, like the real server: inside the client's process
it would share the client's event loop and interpreter lock and look slower than it is; as a
separate process it competes for the machine's cores exactly as the real server does.

    .venv/bin/python -m scripts.bench.control_rpcs [--runs 5] [--calls 2000] [--in-flight 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from protos.algoplane.v1 import strategy_pb2 as pb
from scripts.bench import harness
from scripts.bench.echo_server import READY_LINE
from scripts.bench.harness import LoadResult, Report, at_least

if TYPE_CHECKING:
    from protos.algoplane.v1.strategy_pb2_grpc import StrategyServiceAsyncStub as Stub

NAME = "control_rpcs"
TITLE = "Control RPCs: CreateStrategy and StartStrategy under load"
TARGET_RATIO = 0.40
SYMBOLS = [f"CTL{n}" for n in range(20)]
Metadata = tuple[tuple[str, str]]


@dataclass
class Phases:
    """Per-run figures of each measured phase ('CreateStrategy', 'echo StartStrategy', ...)."""

    rate: dict[str, list[float]] = field(default_factory=dict)
    p50_ms: dict[str, list[float]] = field(default_factory=dict)
    p99_ms: dict[str, list[float]] = field(default_factory=dict)
    # CPU (cores) of the process serving the phase, and of the client driving it.
    server_cpu: dict[str, list[float]] = field(default_factory=dict)
    client_cpu: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)

    def record(self, phase: str, result: LoadResult, cpu: tuple[float, float]) -> None:
        summary = harness.summarize(result.latencies_s)
        self.rate.setdefault(phase, []).append(result.rate)
        self.p50_ms.setdefault(phase, []).append(summary.p50 * 1000)
        self.p99_ms.setdefault(phase, []).append(summary.p99 * 1000)
        self.server_cpu.setdefault(phase, []).append(cpu[0])
        self.client_cpu.setdefault(phase, []).append(cpu[1])
        self.errors.setdefault(phase, []).extend(result.errors)

    def ratios(self, phase: str, baseline: str) -> list[float]:
        return [a / b for a, b in zip(self.rate[phase], self.rate[baseline], strict=True) if b]


@dataclass
class Endpoint:
    """One server being driven: its stub, its process, and the tenants taking turns."""

    stub: Stub
    meter: harness.ProcessMeter
    tenants: list[Metadata]
    nonce: str = field(default_factory=lambda: secrets.token_hex(4))

    def tenant(self, n: int) -> Metadata:
        return self.tenants[n % len(self.tenants)]


async def _create_phase(
    target: Endpoint, run: int, ids: list[str], calls: int, in_flight: int
) -> LoadResult:
    """CreateStrategy x calls; fills `ids` in call order ('' where a call failed)."""
    ids[:] = [""] * calls
    specs = [harness.future_spec(SYMBOLS[n % len(SYMBOLS)]) for n in range(calls)]

    async def call(n: int) -> None:
        request = pb.CreateStrategyRequest(spec=specs[n], request_id=f"c{target.nonce}-{run}-{n}")
        created = await target.stub.CreateStrategy(request, metadata=target.tenant(n))
        ids[n] = created.id

    return await harness.closed_loop(call, calls, in_flight)


async def _start_phase(
    target: Endpoint, run: int, ids: Sequence[str], in_flight: int
) -> LoadResult:
    """StartStrategy of each stored strategy, by the tenant that created it."""
    live = [(n, sid) for n, sid in enumerate(ids) if sid]

    async def call(k: int) -> None:
        n, sid = live[k]
        request = pb.StartStrategyRequest(strategy_id=sid, request_id=f"s{target.nonce}-{run}-{n}")
        await target.stub.StartStrategy(request, metadata=target.tenant(n))

    return await harness.closed_loop(call, len(live), in_flight)


async def _measured(
    phases: Phases, name: str, target: Endpoint, phase: Coroutine[Any, Any, LoadResult]
) -> None:
    client = harness.ProcessMeter(os.getpid())
    target.meter.reset()
    result = await phase
    phases.record(name, result, (target.meter.cpu_share(), client.cpu_share()))


async def _one_run(
    phases: Phases, real: Endpoint, echo: Endpoint, run: int, sizes: tuple[int, int]
) -> None:
    """Create then Start on the real server, then both on the echo server."""
    calls, in_flight = sizes
    for name, target in (("", real), ("echo ", echo)):
        ids: list[str] = []
        await _measured(
            phases,
            f"{name}CreateStrategy",
            target,
            _create_phase(target, run, ids, calls, in_flight),
        )
        await _measured(
            phases, f"{name}StartStrategy", target, _start_phase(target, run, ids, in_flight)
        )


async def run(
    *,
    quick: bool = False,
    runs: int = 5,
    calls: int = 2000,
    in_flight: int = 64,
    tenants: int = 8,
    warmup: int = 300,
) -> Report:
    """CreateStrategy/StartStrategy rate and latency vs the echo server, per run. Each run gets
    a fresh Redis and server, so every run starts from the same (empty) state."""
    if quick:
        runs, calls, warmup = 2, 300, 100
    params = {"runs": runs, "calls per phase": calls, "in flight": in_flight, "tenants": tenants}
    report = Report(NAME, TITLE, dict(params))
    phases = Phases()
    metadata = [harness.metadata(f"tenant-{t}") for t in range(tenants)]
    async with (
        harness.baseline_process("scripts.bench.echo_server", READY_LINE) as (echo_addr, echo_pid),
        grpc.aio.insecure_channel(echo_addr) as echo_channel,
    ):
        echo = Endpoint(harness.aio_stub(echo_channel), harness.ProcessMeter(echo_pid), metadata)
        for n in range(runs):
            async with (
                harness.redis_server(aof=True) as redis,
                harness.server_process(redis.url) as server,
                server.channel() as channel,
            ):
                meter = harness.ProcessMeter(server.pid)
                real = Endpoint(harness.aio_stub(channel), meter, metadata)
                # Connections, SQLite's first pages, the interpreters' caches: not measured.
                await _one_run(Phases(), real, echo, -1 - n, (warmup, in_flight))
                await _one_run(phases, real, echo, n, (calls, in_flight))
    _fill(report, phases)
    return report


def _fill(report: Report, phases: Phases) -> None:
    for rpc in ("CreateStrategy", "StartStrategy"):
        report.add_runs(f"{rpc} rate", phases.rate[rpc], "calls/s")
        report.add_runs(f"{rpc} p50", phases.p50_ms[rpc], "ms")
        report.add_runs(f"{rpc} p99", phases.p99_ms[rpc], "ms")
        report.add_runs(f"echo {rpc} rate", phases.rate[f"echo {rpc}"], "calls/s")
        report.add_runs(f"echo {rpc} p99", phases.p99_ms[f"echo {rpc}"], "ms")
        report.add_runs(
            f"{rpc} / echo rate",
            phases.ratios(rpc, f"echo {rpc}"),
            "",
            target=at_least(TARGET_RATIO),
        )
        report.add_runs(f"server CPU during {rpc}", phases.server_cpu[rpc], "cores")
        report.add_runs(f"echo CPU during echo {rpc}", phases.server_cpu[f"echo {rpc}"], "cores")
        report.add_runs(f"client CPU during echo {rpc}", phases.client_cpu[f"echo {rpc}"], "cores")
    report.note(
        "Real server: a fresh one per run (AOF everysec Redis, SQLite in a temp dir, paper "
        "broker latency 0) after a warm-up; specs whose BUY is a day ahead, so nothing fires. "
        "Ratios are per run (same run, same load); CPU in cores (1.0 = one core busy)."
    )
    report.note(
        "Echo: a bare grpc.aio server in its own process answering the same RPCs with a reply "
        "of the same shape (scripts/bench/echo_server.py); the client is one grpc.aio process."
    )
    for phase, errors in phases.errors.items():
        if errors:
            report.note(f"{phase}: {len(errors)} failed calls, first: {errors[0]}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 runs of 300 calls")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="calls per phase and run")
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--tenants", type=int, default=8)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    report = asyncio.run(
        run(
            quick=args.quick,
            runs=args.runs,
            calls=args.calls,
            in_flight=args.in_flight,
            tenants=args.tenants,
        )
    )
    harness.print_report(report)


if __name__ == "__main__":
    main()
