"""The machine's hops that run_all writes beside the machine: each one really made (the PINGs
reach the Redis given, the SQLite writes commit) and reported as a median with its p90."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from redis.asyncio import Redis

from scripts.bench import hops
from tests.support import RedisProcess

SAMPLES = 40
IDLE_SAMPLES = 5


async def _pings(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_ping", {}).get("calls", 0))


async def test_each_hop_is_made_and_reported(redis_proc: RedisProcess, redis: Redis) -> None:
    before = await _pings(redis)
    got = await hops.measure(redis_proc.url, samples=SAMPLES, idle_samples=IDLE_SAMPLES)
    # Each series' warm-up PINGs and its timed ones, all on the Redis it was given.
    assert await _pings(redis) - before == 2 * SAMPLES + 2 * IDLE_SAMPLES
    for hop in (got.redis_round_trip, got.thread_hop, got.sqlite_write):
        for timed in (hop.warm, hop.idle):
            assert 0 < timed.p50_us <= timed.p90_us
    line = got.line()
    assert f"a Redis round trip (redis-py PING) {got.redis_round_trip}" in line
    assert f"a hop to a thread and back {got.thread_hop}" in line
    assert f"committing a one-row SQLite write {got.sqlite_write}" in line


def test_the_sqlite_write_commits(tmp_path: Path) -> None:
    path = tmp_path / "hops.db"
    conn = hops._sqlite(path)
    try:
        for _ in range(3):
            hops._write(conn)
    finally:
        conn.close()
    other = sqlite3.connect(path)
    try:
        assert other.execute("SELECT version FROM runtime WHERE id = 1").fetchone() == (3,)
    finally:
        other.close()


def test_percentiles_are_the_median_and_the_p90() -> None:
    got = hops.percentiles([float(n) for n in range(1, 101)])
    assert got.p50_us == 50.5
    assert got.p90_us == pytest.approx(90.1)
    assert str(hops.Percentiles(1234.4, 2345.6)) == "1,234 (2,346)"
    hop = hops.Hop(hops.Percentiles(110.2, 122.0), hops.Percentiles(358.0, 479.4))
    assert str(hop) == "110 (122) / 358 (479) us"
    with pytest.raises(ValueError, match="no samples"):
        hops.percentiles([])


async def test_samples_must_be_positive(redis_proc: RedisProcess) -> None:
    with pytest.raises(ValueError, match="samples must be at least 1"):
        await hops.measure(redis_proc.url, samples=0)
    with pytest.raises(ValueError, match="samples must be at least 1"):
        await hops.measure(redis_proc.url, idle_samples=0)
