"""Benchmark: the cost of one price tick's stop-loss check, by number of armed strategies.

Starts its own redis-server on a free port, arms N strategies on one symbol (stop-losses
spread below the price), and times ticks that breach nothing and ticks that breach one
(re-armed after each), with the real STOPLOSS_TRIGGER script. For comparison it also times
the seed's approach (read every strategy's stop-loss on each tick). Prints medians (µs) and
the ratio against N=10.

    .venv/bin/python -m scripts.bench.sl_tick [--sizes 10,1000,100000] [--ticks 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from decimal import Decimal

from redis.asyncio import Redis

from server.store.embedded_redis import find_redis_server
from server.store.state import connect
from server.store.stoploss import StopLossIndex, member


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _arm(redis: Redis, symbol: str, size: int) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(size):
            stop = Decimal(1000 + n % 50_000) / 100  # 10.00 .. 509.99, all below 600
            pipe.zadd(f"symbol:{{{symbol}}}:stoploss", {member(f"s{n}", stop): float(stop)})
            if n % 10_000 == 9_999:
                await pipe.execute()
        await pipe.execute()


async def _time_ticks(index: StopLossIndex, symbol: str, ticks: int) -> tuple[float, float]:
    """Medians in µs: a tick that breaches nothing, and one that breaches one strategy."""
    quiet, firing = [], []
    for n in range(ticks):
        start = time.perf_counter()
        fired = await index.tick(symbol, Decimal("600") + Decimal(n % 7) / 100)
        quiet.append(time.perf_counter() - start)
        assert fired == []
        await index.arm(symbol, "victim", Decimal("700"))
        start = time.perf_counter()
        fired = await index.tick(symbol, Decimal("650"))
        firing.append(time.perf_counter() - start)
        assert fired == ["victim"]
    return statistics.median(quiet) * 1e6, statistics.median(firing) * 1e6


async def _time_seed_scan(redis: Redis, size: int, ticks: int) -> float:
    """The seed's 4.2: read every strategy's stop-loss (pipelined HGETs) on each tick."""
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(size):
            pipe.hset(f"runtime:{{s{n}}}", "stop_loss", "100")
        await pipe.execute()
    samples = []
    for _ in range(ticks):
        start = time.perf_counter()
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(size):
                pipe.hget(f"runtime:{{s{n}}}", "stop_loss")
            values = await pipe.execute()
        _ = [v for v in values if v is not None and Decimal(v) >= 600]
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


async def run(port: int, sizes: list[int], ticks: int, scan_sizes: list[int]) -> None:
    redis = connect(f"redis://127.0.0.1:{port}/0", timeout_s=60)
    for _ in range(100):
        try:
            await redis.ping()
            break
        except Exception:  # noqa: BLE001 - still starting
            await asyncio.sleep(0.05)
    try:
        index = StopLossIndex(redis=redis)
        print(f"stop-loss check per tick, median of {ticks} ticks (µs), one Redis round trip")
        print(f"{'armed':>8} {'no trigger':>11} {'1 trigger':>10} {'ratio vs first':>15}")
        base = None
        for size in sizes:
            await redis.flushall()
            await _arm(redis, "BENCH", size)
            quiet, firing = await _time_ticks(index, "BENCH", ticks)
            base = base or quiet
            print(f"{size:>8} {quiet:>11.1f} {firing:>10.1f} {quiet / base:>15.2f}")
        print("\nthe seed's scan (read every stop-loss each tick), for comparison")
        for size in scan_sizes:
            await redis.flushall()
            median = await _time_seed_scan(redis, size, max(20, ticks // 50))
            print(f"{size:>8} {median:>11.1f}")
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="10,1000,100000")
    parser.add_argument("--scan-sizes", default="10,1000,10000")
    parser.add_argument("--ticks", type=int, default=2000)
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    scan_sizes = [int(x) for x in args.scan_sizes.split(",")]
    port = _free_port()
    directory = tempfile.mkdtemp(prefix="algoplane-bench-")
    command = [find_redis_server(), "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*command, "--dir", directory], stdout=subprocess.DEVNULL)
    try:
        asyncio.run(run(port, sizes, args.ticks, scan_sizes))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
