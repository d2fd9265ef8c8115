"""The machine's hops: what a stop-loss exit costs on a machine before any of our code runs.

An exit is two Redis round trips (the trigger script; the enqueue, take and lock), one hop
to the SQLite thread that commits the intent, and the way back. Two 2-core AMD machines
with the same bare grpc.aio echo rate, the seed's scan slower on the first, ran that path at
1.08 and 2.17 ms: the path is made of wake-ups, not of compute, and those differ. So
`run_all` measures these hops first and writes them beside the machine's model, and a figure
of benchmark 1 can be read against the hops it is made of on the machine that produced it.

Each hop is timed from an event loop of the server's kind (uvloop), one at a time, back to
back and then each after 20 ms without work (benchmark 1's spacing of exits: an idle core and
a sleeping thread take longer to wake, and on a shared machine that differs most), and the
median of each is reported with its p90:
- a Redis round trip: PING through redis-py, with the server's client settings;
- a thread hop: the loop hands a no-op to a one-thread executor and awaits it;
- a SQLite write: the same hop running BEGIN IMMEDIATE, an UPDATE of one row and COMMIT on
  a WAL database with synchronous=NORMAL (the server's SQLite settings).
These are bare on purpose, sqlite3 and an executor rather than the server's SqliteWriter, as
the echo server is beside benchmark 3: a yardstick of the machine must not move with our code.

    .venv/bin/python -m scripts.bench.hops [--samples 2000] [--idle-samples 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from scripts.bench.harness import percentile, redis_server
from server import event_loop
from server.store.state import connect


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Microseconds: the median and the 90th percentile of one hop's samples (harness.Spread
    is a figure over runs)."""

    p50_us: float
    p90_us: float

    def __str__(self) -> str:
        return f"{self.p50_us:,.0f} ({self.p90_us:,.0f})"


@dataclass(frozen=True, slots=True)
class Hop:
    """One hop timed back to back, and each time after IDLE_S without work."""

    warm: Percentiles
    idle: Percentiles

    def __str__(self) -> str:
        return f"{self.warm} / {self.idle} us"


@dataclass(frozen=True, slots=True)
class Hops:
    redis_round_trip: Hop
    thread_hop: Hop
    sqlite_write: Hop

    def line(self) -> str:
        return (
            f"Hops (scripts/bench/hops.py), median (p90) back to back / each after "
            f"{IDLE_S * 1000:.0f} ms idle: a Redis round trip (redis-py PING) "
            f"{self.redis_round_trip}; a hop to a thread and back {self.thread_hop}; that hop "
            f"committing a one-row SQLite write {self.sqlite_write}"
        )


# Benchmark 1's spacing of stop-loss exits (one in 10 of its 500 ticks/s): between two exits
# the DB's thread sleeps that long, and the machine's cores may too.
IDLE_S = 0.02


def percentiles(samples_us: Sequence[float]) -> Percentiles:
    if not samples_us:
        raise ValueError("no samples")
    return Percentiles(percentile(samples_us, 50), percentile(samples_us, 90))


async def _timed(hop: Callable[[], Awaitable[object]], samples: int, idle_s: float) -> Percentiles:
    for _ in range(min(samples, 50)):  # warm: connections open, pages cached
        await hop()
    got: list[float] = []
    for _ in range(samples):
        if idle_s:
            await asyncio.sleep(idle_s)
        began = time.perf_counter()
        await hop()
        got.append((time.perf_counter() - began) * 1e6)
    return percentiles(got)


async def _hop(hop: Callable[[], Awaitable[object]], samples: int, idle_samples: int) -> Hop:
    return Hop(await _timed(hop, samples, 0.0), await _timed(hop, idle_samples, IDLE_S))


def _sqlite(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE runtime (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)")
    conn.execute("INSERT INTO runtime (id, version) VALUES (1, 0)")
    return conn


def _write(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE runtime SET version = version + 1 WHERE id = 1")
    conn.execute("COMMIT")


async def measure(redis_url: str, samples: int = 2000, idle_samples: int = 200) -> Hops:
    """The three hops, timed from the running loop against the Redis at `redis_url`:
    `samples` back to back, then `idle_samples` each after IDLE_S of sleep."""
    if samples < 1 or idle_samples < 1:
        raise ValueError("samples must be at least 1")
    loop = asyncio.get_running_loop()
    redis = connect(redis_url, timeout_s=10)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hops")
    with tempfile.TemporaryDirectory(prefix="algoplane-hops-") as tmp:
        # Opened on the executor's thread, as the server's writer opens its connection.
        conn = await loop.run_in_executor(executor, _sqlite, Path(tmp) / "hops.db")
        try:
            round_trip = await _hop(redis.ping, samples, idle_samples)
            thread_hop = await _hop(
                lambda: loop.run_in_executor(executor, int), samples, idle_samples
            )
            sqlite_write = await _hop(
                lambda: loop.run_in_executor(executor, _write, conn), samples, idle_samples
            )
        finally:
            await loop.run_in_executor(executor, conn.close)
            executor.shutdown()
            await redis.aclose()
    return Hops(round_trip, thread_hop, sqlite_write)


def measure_here(samples: int = 2000, idle_samples: int = 200) -> Hops:
    """`measure` on a redis-server of its own (no persistence) and a uvloop loop."""
    with redis_server() as server:
        return event_loop.run(measure(server.url, samples, idle_samples), "uvloop")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=2000, help="back to back, per hop")
    parser.add_argument("--idle-samples", type=int, default=200, help="after idling, per hop")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.idle_samples < 1:
        parser.error("--samples and --idle-samples must be at least 1")
    print(measure_here(args.samples, args.idle_samples).line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
