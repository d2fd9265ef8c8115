"""Publisher.runtime(): calls made together share their Redis round trips. What a reader sees
must not change: the newest snapshot in Redis, one event per snapshot written, never an older
state after a newer one, every caller told the outcome of its own write."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis.exceptions
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from server.domain import Position, Runtime, Strategy, StrategySpec, StrategyStatus, new_strategy_id
from server.publisher import Publisher
from server.store import keys
from server.store.state import RedisState, connect
from tests.conftest import Harness
from tests.support import auth, redis_process, spec

T0 = datetime(2030, 1, 2, 9, 0, tzinfo=UTC)


def make(tenant: str = "tenant-a", symbol: str = "SBIN") -> tuple[Strategy, Runtime]:
    strategy = Strategy(
        id=new_strategy_id(T0),
        tenant=tenant,
        spec=StrategySpec(
            symbol=symbol,
            quantity=5,
            buy_time=T0 + timedelta(hours=1),
            sell_time=T0 + timedelta(hours=2),
            stop_loss=Decimal("95.5"),
        ),
        status=StrategyStatus.SCHEDULED,
        created_at=T0,
        updated_at=T0,
    )
    runtime = Runtime(
        strategy_id=strategy.id,
        tenant=tenant,
        symbol=symbol,
        status=StrategyStatus.SCHEDULED,
        position=Position.NONE,
        version=1,
        run=1,
        updated_at=T0,
    )
    return strategy, runtime


async def runtime_events(redis: Redis, tenant: str) -> list[dict[str, str]]:
    entries: list[tuple[str, dict[str, str]]] = await redis.xrange(  # type: ignore[assignment]
        keys.event_stream("runtime", tenant)
    )
    return [fields for _id, fields in entries]


async def test_concurrent_versions_of_one_strategy_end_at_the_newest_in_order(
    state: RedisState,
) -> None:
    strategy, first = make()
    versions = [
        replace(first, version=v, updated_at=T0 + timedelta(seconds=v)) for v in range(1, 9)
    ]
    shuffled = versions[:]
    random.Random(7).shuffle(shuffled)
    publisher = Publisher(state=state)

    await asyncio.gather(*(publisher.runtime(r, strategy) for r in shuffled))

    stored = await state.get_runtime(strategy.id)
    assert stored is not None and stored.version == 8
    published = [int(e["version"]) for e in await runtime_events(state.client, "tenant-a")]
    # Stale snapshots are dropped, not published: the versions on the stream only grow, and
    # the last one is the newest.
    assert published == sorted(set(published))
    assert published[-1] == 8
    assert await state.client.smembers(keys.symbol_strategies("SBIN")) == {strategy.id}
    assert await state.client.hget(keys.strategy(strategy.id), "symbol") == "SBIN"


async def test_many_strategies_published_together_each_once(state: RedisState) -> None:
    made = [make(tenant=f"t{n % 3}", symbol=f"SYM{n % 4}") for n in range(300)]
    publisher = Publisher(state=state)

    await asyncio.gather(*(publisher.runtime(r, s) for s, r in made))

    for tenant in ("t0", "t1", "t2"):
        ids = [e["strategy_id"] for e in await runtime_events(state.client, tenant)]
        assert sorted(ids) == sorted(s.id for s, r in made if r.tenant == tenant)
    for strategy, _ in made:
        stored = await state.get_runtime(strategy.id)
        assert stored is not None and stored.version == 1
    members = await state.client.smembers(keys.symbol_strategies("SYM0"))
    assert members == {s.id for s, r in made if r.symbol == "SYM0"}


async def test_a_cancelled_caller_still_has_its_runtime_written(state: RedisState) -> None:
    strategy, runtime = make()
    publisher = Publisher(state=state)
    call = asyncio.create_task(publisher.runtime(runtime, strategy))
    await asyncio.sleep(0)  # queued for the shared write
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # The DB already holds this state: Redis must follow it even though nobody waits.
    await publisher.runtime(replace(runtime, version=2), strategy)
    stored = await state.get_runtime(strategy.id)
    assert stored is not None and stored.version == 2
    published = [int(e["version"]) for e in await runtime_events(state.client, "tenant-a")]
    assert published == [1, 2]


async def test_every_caller_of_a_failed_batch_gets_the_error_and_later_calls_work(
    tmp_path: Path,
) -> None:
    with redis_process(tmp_path / "redis") as proc:
        client = connect(proc.url, timeout_s=1)
        streams = connect(proc.url, timeout_s=1)
        state = RedisState(client=client, stream_client=streams, stream_maxlen=100)
        publisher = Publisher(state=state)
        try:
            proc.kill()
            made = [make() for _ in range(5)]
            results = await asyncio.gather(
                *(publisher.runtime(r, s) for s, r in made), return_exceptions=True
            )
            assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results), results
            proc.start()
            strategy, runtime = made[0]
            await publisher.runtime(runtime, strategy)
            stored = await state.get_runtime(strategy.id)
            assert stored is not None and stored.version == 1
        finally:
            await state.close()


async def test_concurrent_starts_each_reach_redis_and_their_tenants_stream(
    server: Harness,
) -> None:
    tenants = ["tenant-a", "tenant-b"]
    created: dict[str, list[str]] = {t: [] for t in tenants}
    for n in range(40):
        tenant = tenants[n % 2]
        made = await server.stub.CreateStrategy(
            pb.CreateStrategyRequest(spec=spec(symbol=f"PUB{n % 3}")), metadata=auth(tenant)
        )
        created[tenant].append(made.id)

    async def start(tenant: str, strategy_id: str) -> pb.Runtime:
        request = pb.StartStrategyRequest(strategy_id=strategy_id, request_id=f"r-{strategy_id}")
        return await server.stub.StartStrategy(request, metadata=auth(tenant))

    started = await asyncio.gather(*(start(t, sid) for t in tenants for sid in created[t]))

    assert {r.status for r in started} == {pb.STRATEGY_STATUS_SCHEDULED}
    for tenant in tenants:
        for sid in created[tenant]:
            assert await server.redis.hget(keys.runtime(sid), "status") == "SCHEDULED"
        events = await runtime_events(server.redis, tenant)
        assert sorted(e["strategy_id"] for e in events) == sorted(created[tenant])
    live = set()
    for symbol in ("PUB0", "PUB1", "PUB2"):
        live |= await server.redis.smembers(keys.symbol_strategies(symbol))
    assert live == set(created["tenant-a"]) | set(created["tenant-b"])
