"""The pipeline across real server processes: a worker killed mid-order (kill -9) and a
second replica that takes its event over; the broker sees one order."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from server.domain import Intent, client_order_id
from tests.support import SECRET, RedisProcess, aio_stub, auth, free_port, server_env
from tests.test_engine import precise_spec
from tests.test_process import ServerProcess


async def start_replica(
    redis_url: str, db_url: str, root: Path, name: str
) -> tuple[ServerProcess, int]:
    port = free_port()
    env = server_env(
        ALGOPLANE_GRPC_ADDR=f"127.0.0.1:{port}",
        ALGOPLANE_REDIS_URL=redis_url,
        ALGOPLANE_DATABASE_URL=db_url,
        ALGOPLANE_DATA_DIR=str(root / name),
        ALGOPLANE_JWT_SECRET=SECRET,
        ALGOPLANE_PAPER_LATENCY_MS="2500",
        ALGOPLANE_BROKER_TIMEOUT_S="6",
        ALGOPLANE_EXEC_CLAIM_IDLE_S="1.5",
        ALGOPLANE_TIMER_SYNC_S="0.5",
        # The dead holder's lock must expire first (its TTL); the BUY is still wanted then.
        ALGOPLANE_BUY_GRACE_S="60",
        ALGOPLANE_LOCK_TTL_MS="3000",
        ALGOPLANE_LOG_LEVEL="WARNING",
    )
    server = await ServerProcess.start(env, root, root / f"{name}.log")
    await server.read_until("algoplane: listening on")
    return server, port


async def test_killed_worker_event_completes_once_on_a_replica(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    redis = Redis.from_url(redis_proc.url, decode_responses=True)
    await redis.flushall()
    await redis.set("price:{SBIN}", "100")
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    a, a_port = await start_replica(redis_proc.url, db_url, tmp_path, "a")
    b: ServerProcess | None = None
    channel_a = grpc.aio.insecure_channel(f"127.0.0.1:{a_port}")
    try:
        stub_a = aio_stub(channel_a)
        started = await stub_a.StartStrategy(
            pb.StartStrategyRequest(spec=precise_spec(buy_in=1.0, hold=600)), metadata=auth()
        )
        sid = started.strategy_id
        deadline = time.monotonic() + 10
        while True:  # the BUY is at the broker (2.5 s of latency): kill the server now
            orders = await stub_a.ListOrders(pb.ListOrdersRequest(strategy_id=sid), metadata=auth())
            if orders.orders and orders.orders[0].status == pb.ORDER_STATUS_SUBMITTED:
                break
            assert time.monotonic() < deadline, "the BUY never reached the broker"
            await asyncio.sleep(0.05)
        await a.kill()

        b, b_port = await start_replica(redis_proc.url, db_url, tmp_path, "b")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{b_port}") as channel_b:
            stub_b = aio_stub(channel_b)
            deadline = time.monotonic() + 20
            while True:
                runtime = await stub_b.GetRuntime(
                    pb.GetRuntimeRequest(strategy_id=sid), metadata=auth()
                )
                if runtime.position == pb.POSITION_BOUGHT:
                    break
                assert time.monotonic() < deadline, f"never bought: {runtime}"
                await asyncio.sleep(0.1)
            (buy,) = (
                await stub_b.ListOrders(pb.ListOrdersRequest(strategy_id=sid), metadata=auth())
            ).orders
        assert buy.status == pb.ORDER_STATUS_FILLED
        assert buy.attempts == 2  # the killed attempt, then the replica's
        assert await redis.lrange("{paper}:log", 0, -1) == [client_order_id(sid, 1, Intent.BUY)]
        assert runtime.last_buy_order_id == buy.id
    finally:
        await channel_a.close(None)
        await a.kill()
        if b is not None:
            await b.kill()
        await redis.aclose()
