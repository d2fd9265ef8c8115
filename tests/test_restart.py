"""The DB survives a server restart, with Redis kept or flushed in between."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from tests.conftest import Harness, make_settings, start_harness, stop_harness
from tests.support import RedisProcess, aio_stub, auth, spec


@dataclass
class Snapshot:
    """Everything a tenant can read about its strategies."""

    strategies: list[pb.Strategy]
    runtimes: list[pb.Runtime]
    listed: list[pb.Strategy]
    scheduled: list[pb.Strategy]


async def make_some_state(harness: Harness) -> list[str]:
    """One CREATED, one SCHEDULED (stored then started), one started from a spec, one
    STOPPED: every state this issue can produce."""
    stub = aio_stub(harness.channel)
    created = await stub.CreateStrategy(
        pb.CreateStrategyRequest(spec=spec(symbol="CREATED", stop_loss="0.00000001")),
        metadata=auth(),
    )
    stored = await stub.CreateStrategy(
        pb.CreateStrategyRequest(spec=spec(symbol="STORED", quantity=1_000_000_000)),
        metadata=auth(),
    )
    await stub.StartStrategy(pb.StartStrategyRequest(strategy_id=stored.id), metadata=auth())
    direct = await stub.StartStrategy(
        pb.StartStrategyRequest(spec=spec(symbol="DIRECT", stop_loss="1234567890.12345678")),
        metadata=auth(),
    )
    stopped = await stub.StartStrategy(
        pb.StartStrategyRequest(spec=spec(symbol="STOPPED")), metadata=auth()
    )
    await stub.StopStrategy(
        pb.StopStrategyRequest(strategy_id=stopped.strategy_id), metadata=auth()
    )
    return [created.id, stored.id, direct.strategy_id, stopped.strategy_id]


async def snapshot(harness: Harness, ids: list[str]) -> Snapshot:
    stub = aio_stub(harness.channel)
    strategies = [
        await stub.GetStrategy(pb.GetStrategyRequest(strategy_id=sid), metadata=auth())
        for sid in ids
    ]
    runtimes = [
        await stub.GetRuntime(pb.GetRuntimeRequest(strategy_id=sid), metadata=auth()) for sid in ids
    ]
    listed = await stub.ListStrategies(pb.ListStrategiesRequest(), metadata=auth())
    scheduled = await stub.ListStrategies(
        pb.ListStrategiesRequest(status=pb.STRATEGY_STATUS_SCHEDULED), metadata=auth()
    )
    return Snapshot(strategies, runtimes, list(listed.strategies), list(scheduled.strategies))


@pytest.mark.parametrize("flush_redis", [False, True], ids=["redis-kept", "redis-flushed"])
async def test_db_survives_a_restart(
    redis_proc: RedisProcess, tmp_path: Path, flush_redis: bool
) -> None:
    redis = Redis.from_url(redis_proc.url)
    await redis.flushall()
    settings = make_settings(redis_proc.url, tmp_path / "data")
    first = await start_harness(settings)
    try:
        ids = await make_some_state(first)
        before = await snapshot(first, ids)
    finally:
        await stop_harness(first)
    assert [s.status for s in before.strategies] == [
        pb.STRATEGY_STATUS_CREATED,
        pb.STRATEGY_STATUS_SCHEDULED,
        pb.STRATEGY_STATUS_SCHEDULED,
        pb.STRATEGY_STATUS_STOPPED,
    ]
    assert sorted(s.id for s in before.listed) == sorted(ids)
    assert len(before.scheduled) == 2

    if flush_redis:
        await redis.flushall()
    await redis.aclose()

    second = await start_harness(settings)
    try:
        after = await snapshot(second, ids)
        # GetStrategy/ListStrategies answer from the DB, Redis or not; GetRuntime falls back
        # to the DB's copy for a strategy Redis does not hold.
        assert after == before
        stub = aio_stub(second.channel)
        # The restarted server keeps working on the old data.
        stopped = await stub.StopStrategy(
            pb.StopStrategyRequest(strategy_id=ids[2]), metadata=auth()
        )
        assert stopped.status == pb.STRATEGY_STATUS_STOPPED
        assert stopped.version == before.runtimes[2].version + 1
        again = await stub.StartStrategy(
            pb.StartStrategyRequest(strategy_id=ids[3]), metadata=auth()
        )
        assert again.status == pb.STRATEGY_STATUS_SCHEDULED
        assert again.version == before.runtimes[3].version + 1
    finally:
        await stop_harness(second)
