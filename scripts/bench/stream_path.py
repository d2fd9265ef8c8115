"""Diagnostic for benchmark 4: the Python a stream delivery costs us, in one process.

Benchmark 4 reads CPU per delivery off the whole server while gRPC, the kernel and the
machine's noise weigh on it (two rounds of the same code differ by 10% there). This runs
the server's own stream path, the servicer's StreamRuntime behind the four interceptors,
EventStreams, a TenantFeed, with a stand-in for grpc.aio's context whose write completes one
loop step later (as grpc's completion does) and a stand-in for Redis that hands the feed one
event per read. Beside it, on the same stand-ins and the same loop, the bare fan-out's
design (scripts/bench/fanout_reference.py: an asyncio.Queue per subscriber). What separates
the two is the Python of ours that every delivery runs, measured to a tenth of a
microsecond: a figure to compare before and after a change to the path, not a speed of the
server (gRPC's own cost per message, several times larger, is not in it).

    .venv/bin/python -m scripts.bench.stream_path [--events 20000] [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast, get_args

from protos.algoplane.v1 import strategy_pb2 as pb
from scripts.bench.harness import Report, machine, print_report
from scripts.bench.stream_fanout import runtime_event
from server import event_loop
from server.api.auth import TokenVerifier, mint_token
from server.api.interceptors import (
    AuthInterceptor,
    Behaviour,
    DecodeInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
)
from server.api.servicer import ENCODERS, StrategyServicer, encode_runtime_event
from server.metrics import Metrics
from server.store.codec import Flat
from server.store.keys import StreamKind
from server.store.state import RedisState, StreamBounds, StreamId
from server.streams import EventStreams

SECRET = "stream-path-secret-0123456789abcdef-0123"
TENANT = "bench-tenant"
DASHBOARDS = 10
# Loop steps between two events: every subscriber has written the last one before the next
# arrives, as at a rate below saturation, so that each delivery pays its own wake-up.
STEPS_PER_EVENT = 4


class _EventSource:
    """Stands in for RedisState: the stream is empty at first, then one event per read."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[list[tuple[StreamId, Flat]]] = asyncio.Queue()

    async def stream_bounds(self, kind: StreamKind, tenant: str) -> StreamBounds:
        return StreamBounds(last_id=(0, 0), trimmed_through=None)

    async def read_events(
        self, kind: StreamKind, tenant: str, after: StreamId, *, block_ms: int | None, count: int
    ) -> list[tuple[StreamId, Flat]]:
        return await self.events.get()


class _Tally:
    """Writes by every subscriber; `done` is set once `expected` of them completed."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.written = 0
        self.done = asyncio.Event()

    def add(self) -> None:
        self.written += 1
        if self.written == self.expected:
            self.done.set()


class _Context:
    """Stands in for grpc.aio's servicer context: a write completes one loop step later."""

    def __init__(self, token: str, tally: _Tally) -> None:
        self._tally = tally
        self._metadata = (("authorization", f"Bearer {token}"),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def send_initial_metadata(self, metadata: object) -> None:
        return None

    def code(self) -> None:
        return None

    async def write(self, message: bytes) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        loop.call_soon(done.set_result, None)
        await done
        self._tally.add()


async def _deliver(events: int, publish: Callable[[int], None], tally: _Tally) -> float:
    """CPU µs per delivery, from the first event until every subscriber wrote every event."""
    await asyncio.sleep(0.01)  # the subscribers reach their first wait
    began = time.process_time()
    for n in range(1, events + 1):
        publish(n)
        for _ in range(STEPS_PER_EVENT):
            await asyncio.sleep(0)
    await tally.done.wait()
    return (time.process_time() - began) / tally.expected * 1e6


def _server_call(source: _EventSource) -> Behaviour:
    streams = EventStreams(state=cast(RedisState, source), encoders=ENCODERS)
    servicer = StrategyServicer(manager=cast(Any, None), streams=streams, stall_s=30.0)
    call = cast(Behaviour, servicer.StreamRuntime)
    # As app.py orders them, the outermost last wrapped.
    interceptors = [
        MetricsInterceptor(Metrics()),
        ErrorInterceptor(),
        AuthInterceptor(TokenVerifier(SECRET)),
        DecodeInterceptor(),
    ]
    for interceptor in reversed(interceptors):
        call = interceptor.wrap_rpc(call, "StreamRuntime", True)
    return call


async def _call(call: Behaviour, request: pb.StreamRuntimeRequest, context: _Context) -> Any:
    return await call(request, cast(Any, context))


async def _ours(events: int) -> float:
    source = _EventSource()
    call = _server_call(source)
    token = mint_token(SECRET, TENANT, timedelta(hours=1), datetime.now(UTC))
    tally = _Tally(events * DASHBOARDS)
    contexts = [_Context(token, tally) for _ in range(DASHBOARDS)]
    calls: list[asyncio.Task[Any]] = [
        asyncio.create_task(_call(call, pb.StreamRuntimeRequest(), c)) for c in contexts
    ]
    fields = [runtime_event(TENANT, f"s-{n % 4}", n) for n in range(events + 1)]
    try:
        return await _deliver(
            events, lambda n: source.events.put_nowait([((n, 0), fields[n])]), tally
        )
    finally:
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


async def _queues(events: int) -> float:
    tally = _Tally(events * DASHBOARDS)
    contexts = [_Context("", tally) for _ in range(DASHBOARDS)]
    queues: list[asyncio.Queue[bytes]] = [asyncio.Queue() for _ in contexts]

    async def subscriber(context: _Context, queue: asyncio.Queue[bytes]) -> None:
        while True:
            await context.write(await queue.get())

    tasks = [asyncio.create_task(subscriber(c, q)) for c, q in zip(contexts, queues, strict=True)]
    fields = [runtime_event(TENANT, f"s-{n % 4}", n) for n in range(events + 1)]

    def publish(n: int) -> None:
        payload = encode_runtime_event(f"{n}-0", fields[n])
        for queue in queues:
            queue.put_nowait(payload)

    try:
        return await _deliver(events, publish, tally)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run(*, events: int = 20_000, runs: int = 7, loop: event_loop.EventLoop = "uvloop") -> Report:
    report = Report(
        "stream_path",
        "Stream path: the Python a delivery costs, in process (diagnostic for benchmark 4)",
        params={"events": events, "dashboards": DASHBOARDS, "runs": runs, "loop": loop},
    )
    ours: list[float] = []
    queues: list[float] = []
    for _ in range(runs):  # interleaved, so that a slow moment of the machine hits both
        ours.append(event_loop.run(_ours(events), loop))
        queues.append(event_loop.run(_queues(events), loop))
    report.add_runs("server's stream path, CPU per delivery", ours, "µs")
    report.add_runs("a queue per subscriber (the bare fan-out's design)", queues, "µs")
    report.add_runs(
        "ours - queue per subscriber",
        [o - q for o, q in zip(ours, queues, strict=True)],
        "µs",
    )
    report.note(
        f"one tenant, {DASHBOARDS} StreamRuntime calls, one event per feed read, every "
        "subscriber idle again before the next event; a write completes one loop step "
        "later; both include encoding each event once"
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--event-loop", choices=get_args(event_loop.EventLoop), default="uvloop")
    args = parser.parse_args()
    print("\n".join(machine().lines()))
    print_report(run(events=args.events, runs=args.runs, loop=args.event_loop))


if __name__ == "__main__":
    main()
