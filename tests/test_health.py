"""grpc.health.v1 and server reflection, and health following Redis down and back up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from tests.conftest import Harness, make_settings, start_harness, stop_harness
from tests.support import RedisProcess, aio_stub, auth, redis_process, rpc_code, spec

SERVICE = "algoplane.v1.StrategyService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(channel: grpc.aio.Channel, service: str = "") -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return reply.status


async def wait_health(channel: grpc.aio.Channel, want: Any, timeout_s: float = 5.0) -> float:
    """Polls Check until both names report `want`; returns how long that took."""
    started = time.monotonic()
    while True:
        statuses = {await health_status(channel, name) for name in ("", SERVICE)}
        if statuses == {want}:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"health is {statuses}, expected {want} within {timeout_s}s")
        await asyncio.sleep(0.05)


async def reflect(channel: grpc.aio.Channel, request: Any) -> Any:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([request]), timeout=5)
    async for reply in call:
        return reply
    raise AssertionError("reflection sent no reply")


@pytest.mark.parametrize("service", ["", SERVICE])
async def test_health_serving_without_a_token(server: Harness, service: str) -> None:
    assert await health_status(server.channel, service) == SERVING


async def test_reflection_lists_the_services(server: Harness) -> None:
    reply = await reflect(server.channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in reply.list_services_response.service}
    assert names == {
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_reflection_describes_the_api(server: Harness) -> None:
    """What `grpcurl describe` needs: the file that defines the service."""
    reply = await reflect(
        server.channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    [api] = [f for f in files if f.package == "algoplane.v1"]
    [service] = api.service
    assert service.name == "StrategyService"
    assert {m.name for m in service.method} == {
        "CreateStrategy",
        "GetStrategy",
        "ListStrategies",
        "StartStrategy",
        "StopStrategy",
        "GetRuntime",
        "StreamRuntime",
        "ListOrders",
        "StreamOrders",
        "StreamRuntimeBatches",
        "StreamOrdersBatches",
    }


async def test_reflection_off(redis_proc: RedisProcess, tmp_path: Path) -> None:
    harness = await start_harness(make_settings(redis_proc.url, tmp_path, reflection=False))
    try:
        # The call's status alone, without a request message: grpc.aio's client can fail
        # the send of one that races the server's immediate answer with INTERNAL ("Failed
        # execute_batch"), which says nothing about the server.
        call = reflection_pb2_grpc.ServerReflectionStub(harness.channel).ServerReflectionInfo(
            timeout=5
        )
        assert await call.code() == grpc.StatusCode.UNIMPLEMENTED
        # Health is served either way.
        assert await health_status(harness.channel) == SERVING
    finally:
        await stop_harness(harness)


async def test_health_follows_redis_down_and_back(tmp_path: Path) -> None:
    with redis_process(tmp_path / "redis") as proc:
        harness = await start_harness(make_settings(proc.url, tmp_path / "data"))
        revived: RedisProcess | None = None
        stub = aio_stub(harness.channel)
        try:
            await wait_health(harness.channel, SERVING, timeout_s=2)
            stored = await stub.StartStrategy(
                pb.StartStrategyRequest(spec=spec(symbol="LIVE")), metadata=auth()
            )

            proc.kill()
            await wait_health(harness.channel, NOT_SERVING)

            # Calls that need Redis say UNAVAILABLE at once instead of hanging.
            outage = pb.StartStrategyRequest(spec=spec(symbol="RETRY"), request_id="outage-1")
            attempts: list[Any] = [
                stub.GetRuntime(
                    pb.GetRuntimeRequest(strategy_id=stored.strategy_id),
                    metadata=auth(),
                    timeout=5,
                ),
                stub.StartStrategy(outage, metadata=auth(), timeout=5),
            ]
            for attempt in attempts:
                began = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await attempt
                assert rpc_code(err.value) == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - began < 2.5
            stream = stub.StreamRuntime(pb.StreamRuntimeRequest(), metadata=auth(), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stream.read()
            assert rpc_code(err.value) == grpc.StatusCode.UNAVAILABLE

            # The DB still answers what does not need Redis.
            got = await stub.GetStrategy(
                pb.GetStrategyRequest(strategy_id=stored.strategy_id), metadata=auth()
            )
            assert got.status == pb.STRATEGY_STATUS_SCHEDULED

            revived = RedisProcess(port=proc.port, directory=proc.directory).start()
            await wait_health(harness.channel, SERVING)

            # The retried Start (same request_id) now completes and lands in Redis.
            retried = await stub.StartStrategy(outage, metadata=auth(), timeout=5)
            assert retried.status == pb.STRATEGY_STATUS_SCHEDULED
            assert (
                await stub.GetRuntime(
                    pb.GetRuntimeRequest(strategy_id=retried.strategy_id), metadata=auth()
                )
                == retried
            )
            redis = Redis.from_url(revived.url, decode_responses=True)
            try:
                assert await redis.smembers("symbol:{RETRY}:strategies") == {retried.strategy_id}
            finally:
                await redis.aclose()
        finally:
            await stop_harness(harness)
            if revived is not None:
                revived.stop()
