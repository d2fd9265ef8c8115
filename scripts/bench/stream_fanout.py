"""Benchmark 4: stream fan-out, StreamRuntime subscribers over many tenants.

The real server (subprocess) and real Redis. `subscribers` StreamRuntime calls spread over
`tenants` tenants (10 dashboards each by default) run in `procs` subscriber processes, so the
clients' decoding does not share one interpreter with the load. Events are appended to the
tenants' runtime streams exactly as the server's publisher appends them (same key, same
fields, server.store), from this process: the control path cannot produce 1,000 state changes
a second on two cores, and what is measured here is the path from the stream to the
dashboards. Each event carries its creation time (`updated_at`, µs); a subscriber's lag is
its receive time minus that.

Steady: `rate` events/s in all for 5 s; lag p50/p99 over every delivery, deliveries/s, the
server's CPU, and whether every subscriber got every event. Then the rate is raised until
p99 passes 100 ms: the last rate below is the saturation point. The same search then runs
against a bare grpc.aio fan-out of the same streams (scripts/bench/fanout_reference.py), on
the same machine with the same subscribers, which separates the server's own cost from what
grpc.aio and the machine allow: once on the standard library's loop, once on uvloop, the
server's default loop.

The subscribers read HTTP/2 frames themselves (scripts/bench/h2_subscriber.py): grpc.aio
clients cost more CPU per message than the server spends sending it, and on 2 cores they
would saturate before the server does.

    .venv/bin/python -m scripts.bench.stream_fanout [--rate 1000] [--subscribers 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from protos.algoplane.v1 import strategy_pb2 as pb
from scripts.bench.fanout_reference import READY_LINE as REFERENCE_READY
from scripts.bench.h2_subscriber import GrpcStreamsProtocol
from scripts.bench.harness import (
    JWT_SECRET,
    ROOT,
    ProcessMeter,
    Report,
    at_least,
    at_most,
    baseline_process,
    machine,
    percentile,
    print_report,
    redis_server,
    server_process,
)
from server.api.auth import mint_token
from server.domain import Position, Runtime, StrategyStatus
from server.store.codec import Flat, runtime_to_flat
from server.store.keys import StreamKind
from server.store.state import RedisState, connect

DRAIN_S = 10.0
ROUND_S = 5.0


def _tenant(n: int) -> str:
    return f"fan-{n:03d}"


# ----------------------------------------------------------------------------- subscribers


async def _subscribe(
    addr: str, tenants: list[str], per_tenant: int, expect: int, method: str
) -> None:
    """Child process: per_tenant streams per tenant on one HTTP/2 connection (as one grpc
    channel would); prints 'ready', then one JSON line with every lag (ms) and the
    per-stream counts once each stream got `expect` events (or the parent closes stdin).
    `method`: StreamRuntime (an event per message) or StreamRuntimeBatches."""
    batched = method.endswith("Batches")
    lags: list[float] = []
    counts: dict[int, int] = {}
    done = asyncio.Event()
    left = len(tenants) * per_tenant

    def on_message(stream: int, message: bytes) -> None:
        nonlocal left
        now_us = time.time_ns() // 1000
        if batched:
            events = list(pb.RuntimeEventBatch.FromString(message).events)
        else:
            events = [pb.RuntimeEvent.FromString(message)]
        for event in events:
            lags.append((now_us - event.runtime.updated_at.ToMicroseconds()) / 1000)
        before = counts[stream]
        got = counts[stream] = before + len(events)
        if before < expect <= got:
            left -= 1
            if left == 0:
                done.set()

    def on_end(stream: int) -> None:
        if counts.get(stream, 0) < expect:
            print(f"stream {stream} ended after {counts.get(stream, 0)} events", file=sys.stderr)

    host, port = addr.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        lambda: GrpcStreamsProtocol(on_message, on_end), host, int(port)
    )
    path = f"/algoplane.v1.StrategyService/{method}"
    for tenant in tenants:
        token = mint_token(JWT_SECRET, tenant, timedelta(hours=1), datetime.now(UTC))
        for _ in range(per_tenant):
            counts[protocol.call(addr, path, [("authorization", f"Bearer {token}")])] = 0
    await asyncio.sleep(1.0)  # the calls reach the server and fix their positions
    print("ready", flush=True)
    stop = asyncio.ensure_future(loop.run_in_executor(None, sys.stdin.read))
    finished = asyncio.ensure_future(done.wait())
    await asyncio.wait({stop, finished}, return_when=asyncio.FIRST_COMPLETED)
    finished.cancel()
    protocol.close()
    print(json.dumps({"lags": lags, "counts": list(counts.values())}), flush=True)
    sys.exit(0)


# ----------------------------------------------------------------------------- load


def runtime_event(tenant: str, strategy_id: str, version: int) -> Flat:
    """A runtime event's fields as the publisher appends them, stamped now (the lag's start)."""
    runtime = Runtime(
        strategy_id=strategy_id,
        tenant=tenant,
        symbol="FAN",
        status=StrategyStatus.RUNNING,
        position=Position.BOUGHT,
        version=version,
        run=1,
        updated_at=datetime.now(UTC),
    )
    return runtime_to_flat(runtime)


async def _publish(state: RedisState, tenants: int, rate: int, seconds: float) -> int:
    """`rate` runtime events/s over all tenants, round robin, in 1 ms slices; each slice's
    events go to Redis in one pipeline (as the server's publisher sends a batch), so that
    the load generator leaves the machine's cores to what is measured."""
    total = int(rate * seconds)
    began = time.perf_counter()
    sent = 0
    version = 0
    while sent < total:
        target = min(total, int((time.perf_counter() - began) * rate) + 1)
        events: list[tuple[StreamKind, str, Flat]] = []
        while sent < target:
            version += 1
            tenant = _tenant(sent % tenants)
            events.append(
                ("runtime", tenant, runtime_event(tenant, f"s-{tenant}-{sent % 4}", version))
            )
            sent += 1
        await state.put_written([], events_after=events)
        await asyncio.sleep(0.001)
    return sent


async def _round(
    addr: str,
    redis_url: str,
    pid: int,
    tenants: int,
    per_tenant: int,
    procs: int,
    rate: int,
    seconds: float,
    method: str = "StreamRuntime",
) -> dict[str, float]:
    per_proc = [list(range(p, tenants, procs)) for p in range(procs)]
    expect = int(rate * seconds) // tenants
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "scripts.bench.stream_fanout",
            "--child",
            addr,
            ",".join(_tenant(n) for n in group),
            str(per_tenant),
            str(expect),
            method,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            limit=256 * 1024 * 1024,  # the report is one JSON line with every lag
        )
        for group in per_proc
    ]
    for child in children:
        assert child.stdout is not None
        line = await child.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"a subscriber process did not start: {line!r}")
    redis = connect(redis_url, timeout_s=10)
    state = RedisState(client=redis, stream_client=redis, stream_maxlen=100_000)
    meter = ProcessMeter(pid)
    meter.reset()
    began = time.perf_counter()
    sent = await _publish(state, tenants, rate, seconds)
    cpu = meter.cpu_share()
    results = []
    elapsed = time.perf_counter() - began
    for child in children:
        assert child.stdout is not None and child.stdin is not None
        # A child reports by itself once every stream got every event; one still short
        # after DRAIN_S is told to report what it has (stdin closed): those streams count
        # as having missed events.
        try:
            line = await asyncio.wait_for(child.stdout.readline(), timeout=DRAIN_S)
        except TimeoutError:
            child.stdin.close()
            line = await asyncio.wait_for(child.stdout.readline(), timeout=30)
        if not child.stdin.is_closing():
            child.stdin.close()
        await child.wait()
        results.append(json.loads(line.decode()))
    await redis.aclose()
    lags = [lag for r in results for lag in r["lags"]]
    counts = [c for r in results for c in r["counts"]]
    return {
        "sent": sent,
        "deliveries": len(lags),
        "expected": sent * per_tenant,
        "p50": percentile(lags, 50),
        "p99": percentile(lags, 99),
        "rate": len(lags) / elapsed,
        "cpu": cpu,
        "short": sum(c < expect for c in counts),
    }


def _ratios(ours: list[float], theirs: list[float]) -> list[float]:
    """Run by run (a saturation of 0 on either side has no ratio)."""
    return [o / t if t else math.nan for o, t in zip(ours, theirs, strict=True)]


def _cpu_us_per_delivery(found: dict[str, float]) -> float:
    return found["cpu"] / found["rate"] * 1e6 if found["rate"] else math.nan


BATCHES = "StreamRuntimeBatches"
# Events/s tried, in order, for the saturation point (x 10 dashboards = deliveries/s). A
# round's rate is its deliveries over its publishing time, which ends a little after the
# last event, so a step reads just under its nominal rate (2,000 reads 19,980): 2,250 is
# there so that a server holding more than 20,000 can show it.
SATURATION_STEPS = (1000, 1250, 1500, 1750, 2000, 2250, 2500, 3000, 3500, 4000, 5000)


async def _saturation(
    report: Report,
    name: str,
    args: tuple[str, str, int, int, int, int],
    steps: Sequence[int],
    method: str = "StreamRuntime",
) -> float:
    """The highest deliveries/s with p99 <= 100 ms and no stream short, over `steps`."""
    best = 0.0
    for rate in steps:
        found = await _round(*args, rate, ROUND_S, method)
        report.note(
            f"{name}, {rate:,} events/s: {found['rate']:,.0f} deliveries/s, "
            f"p50 {found['p50']:.1f} ms, p99 {found['p99']:.1f} ms, "
            f"CPU {found['cpu']:.2f} cores, short streams {int(found['short'])}"
        )
        if found["p99"] > 100 or found["short"]:
            break
        best = found["rate"]
    return best


async def run(
    *,
    quick: bool = False,
    subscribers: int = 500,
    tenants: int = 50,
    rate: int = 1000,
    procs: int = 2,
    runs: int = 3,
) -> Report:
    steps: Sequence[int] = SATURATION_STEPS
    if quick:
        subscribers, tenants, rate, runs, steps = 40, 4, 200, 1, (200, 400)
    per_tenant = subscribers // tenants
    report = Report(
        "stream_fanout",
        "Stream fan-out: StreamRuntime subscribers over tenants",
        params={"subscribers": subscribers, "tenants": tenants, "rate": rate, "runs": runs},
    )
    p50s: list[float] = []
    p99s: list[float] = []
    cpus: list[float] = []
    delivered: list[float] = []
    ours: list[float] = []
    batched: list[float] = []
    raw: list[float] = []
    raw_uv: list[float] = []
    per_delivery: dict[str, list[float]] = {"server": [], "asyncio": [], "uvloop": []}
    short = 0
    async with (
        redis_server() as redis_proc,
        server_process(redis_proc.url) as server,
        baseline_process(
            "scripts.bench.fanout_reference", REFERENCE_READY, "--redis", redis_proc.url
        ) as (raw_addr, raw_pid),
        baseline_process(
            "scripts.bench.fanout_reference",
            REFERENCE_READY,
            *("--redis", redis_proc.url, "--event-loop", "uvloop"),
        ) as (uv_addr, uv_pid),
    ):
        args = (server.addr, redis_proc.url, server.pid, tenants, per_tenant, procs)
        raw_args = (raw_addr, redis_proc.url, raw_pid, tenants, per_tenant, procs)
        uv_args = (uv_addr, redis_proc.url, uv_pid, tenants, per_tenant, procs)
        for run in range(runs):
            steady = await _round(*args, rate, ROUND_S)
            p50s.append(steady["p50"])
            p99s.append(steady["p99"])
            cpus.append(steady["cpu"])
            delivered.append(steady["rate"])
            short += int(steady["short"])
            # CPU per delivery at half the steady rate: the cost that sets the saturation
            # point, steadier than it on a noisy machine, and below saturation, where a
            # process pegged at one core would read 1 core / rate whatever it costs.
            for name, each in (("server", args), ("asyncio", raw_args), ("uvloop", uv_args)):
                found = await _round(*each, rate // 2, ROUND_S)
                per_delivery[name].append(_cpu_us_per_delivery(found))
            # A sweep of each per run, back to back: one sweep's figure swings with what
            # else the 2 cores did in its 5 s rounds, so the median of several is reported,
            # and the ratio is taken within each run.
            ours.append(await _saturation(report, f"run {run + 1}, server", args, steps))
            batched.append(
                await _saturation(report, f"run {run + 1}, server, batches", args, steps, BATCHES)
            )
            raw.append(await _saturation(report, f"run {run + 1}, raw grpc.aio", raw_args, steps))
            raw_uv.append(
                await _saturation(report, f"run {run + 1}, raw grpc.aio on uvloop", uv_args, steps)
            )
    report.add_runs("delivery lag p50", p50s, "ms")
    report.add_runs("delivery lag p99", p99s, "ms", target=at_most(50))
    report.add_runs("deliveries/s", delivered, "/s")
    report.add_runs("server CPU (cores)", cpus, "")
    report.add("subscribers that missed events (all runs)", short, "", target=at_most(0))
    half = f"at {rate // 2 * per_tenant:,} deliveries/s"
    report.add_runs(f"server CPU per delivery {half}", per_delivery["server"], "µs")
    report.add_runs(f"raw grpc.aio CPU per delivery {half}", per_delivery["asyncio"], "µs")
    report.add_runs(f"raw grpc.aio on uvloop CPU per delivery {half}", per_delivery["uvloop"], "µs")
    report.add_runs(
        "saturation: deliveries/s with p99 <= 100 ms (StreamRuntime, an event per message)",
        ours,
        "/s",
        target=at_least(20_000),
    )
    report.add_runs(
        f"saturation, {BATCHES} (waiting events in one message)",
        batched,
        "/s",
        target=at_least(20_000),
    )
    report.add_runs("raw grpc.aio fan-out saturation, same load and machine", raw, "/s")
    report.add_runs("raw grpc.aio fan-out on uvloop (the server's loop)", raw_uv, "/s")
    report.add_runs(
        "server / raw grpc.aio saturation",
        _ratios(ours, raw),
        "",
    )
    report.add_runs(
        "server / raw grpc.aio on uvloop saturation",
        _ratios(ours, raw_uv),
        "",
    )
    report.add_runs(
        "server with batches / raw grpc.aio saturation",
        _ratios(batched, raw),
        "",
    )
    report.note(
        f"{procs} subscriber processes reading HTTP/2 directly (scripts/bench/h2_subscriber.py); "
        "events appended to the tenants' streams as the publisher does; lag = receive wall "
        "clock - event's updated_at; raw fan-out: scripts/bench/fanout_reference.py, on the "
        "standard library's loop and on uvloop (the server runs on uvloop, its default "
        "ALGOPLANE_EVENT_LOOP)"
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=5, metavar=("ADDR", "TENANTS", "PER", "EXPECT", "METHOD"))
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.child:
        addr, names, per, expect, method = args.child
        asyncio.run(_subscribe(addr, names.split(","), int(per), int(expect), method))
        return
    print("\n".join(machine().lines()))
    report = asyncio.run(
        run(
            quick=args.quick,
            subscribers=args.subscribers,
            tenants=args.tenants,
            rate=args.rate,
            procs=args.procs,
            runs=args.runs,
        )
    )
    print_report(report)


if __name__ == "__main__":
    main()
