"""Helpers shared by the fault scenarios: strategies at absolute instants, health, the broker's
log, and the closing invariant check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from server.domain import Intent, client_order_id
from server.store.db import Database
from tests.conftest import Harness
from tests.faults.invariants import check_invariants
from tests.support import spec_at
from tests.test_engine import eventually, orders_of

PAPER_LOG = "{paper}:log"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def start_at(
    h: Harness, buy_at: float, sell_at: float, symbol: str = "SBIN", stop_loss: str = "95.5"
) -> str:
    runtime = await h.stub.StartStrategy(
        pb.StartStrategyRequest(spec=spec_at(buy_at, sell_at, symbol, stop_loss)),
        metadata=h.md(),
        timeout=5,
    )
    return runtime.strategy_id


async def order_status(h: Harness, sid: str, intent: Intent) -> int | None:
    """The status of one order of run 1 from the order log (the DB: works with Redis away)."""
    wanted = client_order_id(sid, 1, intent)
    for order in await orders_of(h, sid):
        if order.id == wanted:
            return int(order.status)
    return None


async def is_bought(h: Harness, sid: str) -> bool:
    """Its BUY is FILLED in the order log."""
    return await order_status(h, sid, Intent.BUY) == pb.ORDER_STATUS_FILLED


async def all_bought(h: Harness, sids: list[str], timeout_s: float = 10.0) -> None:
    async def check() -> bool:
        return all([await is_bought(h, sid) for sid in sids])

    await eventually(check, timeout_s)


async def runtime_or_none(h: Harness, sid: str) -> pb.Runtime | None:
    """The runtime, or None while the server answers UNAVAILABLE (a dependency is away, or a
    pooled connection broken by the fault fails its first command)."""
    try:
        return await h.stub.GetRuntime(
            pb.GetRuntimeRequest(strategy_id=sid), metadata=h.md(), timeout=5
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            return None
        raise


async def reaches(h: Harness, sid: str, status: int, timeout_s: float = 15.0) -> pb.Runtime:
    """Waits for the strategy's status, riding over UNAVAILABLE answers; returns the runtime."""
    seen: list[pb.Runtime] = []

    async def check() -> bool:
        runtime = await runtime_or_none(h, sid)
        if runtime is not None:
            seen.append(runtime)
        return runtime is not None and runtime.status == status

    try:
        await eventually(check, timeout_s)
    except AssertionError:
        raise AssertionError(f"{sid} never reached {status}; last: {seen[-1:]}") from None
    return seen[-1]


async def health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return int(reply.status)


async def health_becomes(channel: grpc.aio.Channel, status: int, timeout_s: float = 8.0) -> None:
    async def check() -> bool:
        return await health(channel) == status

    await eventually(check, timeout_s)


async def paper_log(redis_url: str) -> list[str]:
    """The broker's record of placements, in order, over a fresh connection (the test's own
    pooled connections may have been broken by the fault)."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        return [str(x) for x in await redis.lrange(PAPER_LOG, 0, -1)]
    finally:
        await redis.aclose()


async def final_check(redis_url: str, db_url: str) -> None:
    """check_invariants over a fresh Redis client and Database (both closed afterwards)."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    db = Database(db_url)
    try:
        await check_invariants(redis, db)
    finally:
        await db.close()
        await redis.aclose()


async def timed(call: Awaitable[object]) -> tuple[BaseException | None, float]:
    """Runs an RPC; returns (the error it raised or None, seconds it took)."""
    began = time.monotonic()
    try:
        await call
    except Exception as exc:  # noqa: BLE001 - returned to the test to assert on
        return exc, time.monotonic() - began
    return None, time.monotonic() - began


async def sleep_until(instant: float) -> None:
    await asyncio.sleep(max(0.0, instant - time.time()))
