"""Happy paths of every RPC and the Redis/DB state they leave."""

from __future__ import annotations

import grpc
import pytest

from protos.algoplane.v1 import strategy_pb2 as pb
from tests.conftest import Harness
from tests.support import rpc_code, spec


async def test_create_get_list(server: Harness) -> None:
    created = await server.stub.CreateStrategy(
        pb.CreateStrategyRequest(spec=spec(symbol="SBIN")), metadata=server.md()
    )
    assert created.id.startswith("stg_")
    assert created.status == pb.STRATEGY_STATUS_CREATED
    assert created.spec.stop_loss == "95.5"

    fetched = await server.stub.GetStrategy(
        pb.GetStrategyRequest(strategy_id=created.id), metadata=server.md()
    )
    assert fetched == created

    listed = await server.stub.ListStrategies(pb.ListStrategiesRequest(), metadata=server.md())
    assert [s.id for s in listed.strategies] == [created.id]
    assert listed.next_page_token == ""


async def test_start_loads_redis_and_stop_unloads(server: Harness) -> None:
    created = await server.stub.CreateStrategy(
        pb.CreateStrategyRequest(spec=spec(symbol="INFY")), metadata=server.md()
    )
    runtime = await server.stub.StartStrategy(
        pb.StartStrategyRequest(strategy_id=created.id), metadata=server.md()
    )
    assert runtime.status == pb.STRATEGY_STATUS_SCHEDULED
    assert runtime.position == pb.POSITION_NONE

    sid = created.id
    assert await server.redis.hgetall(f"strategy:{{{sid}}}") == {
        "id": sid,
        "tenant": "tenant-a",
        "symbol": "INFY",
        "quantity": "10",
        "buy_time": await server.redis.hget(f"strategy:{{{sid}}}", "buy_time"),
        "sell_time": await server.redis.hget(f"strategy:{{{sid}}}", "sell_time"),
        "stop_loss": "95.5",
        "created_at": await server.redis.hget(f"strategy:{{{sid}}}", "created_at"),
    }  # the static config only: status lives in runtime:{id}
    hot = await server.redis.hgetall(f"runtime:{{{sid}}}")
    assert hot["status"] == "SCHEDULED"
    assert hot["position"] == "NONE"
    assert hot["tenant"] == "tenant-a"
    assert await server.redis.smembers("symbol:{INFY}:strategies") == {sid}

    stopped = await server.stub.StopStrategy(
        pb.StopStrategyRequest(strategy_id=sid), metadata=server.md()
    )
    assert stopped.status == pb.STRATEGY_STATUS_STOPPED
    assert stopped.HasField("terminated_at")
    assert await server.redis.smembers("symbol:{INFY}:strategies") == set()
    assert await server.redis.hget(f"runtime:{{{sid}}}", "status") == "STOPPED"

    got = await server.stub.GetRuntime(pb.GetRuntimeRequest(strategy_id=sid), metadata=server.md())
    assert got == stopped
    again = await server.stub.GetStrategy(
        pb.GetStrategyRequest(strategy_id=sid), metadata=server.md()
    )
    assert again.status == pb.STRATEGY_STATUS_STOPPED


async def test_start_with_spec_creates_and_starts(server: Harness) -> None:
    runtime = await server.stub.StartStrategy(
        pb.StartStrategyRequest(spec=spec(symbol="TCS")), metadata=server.md()
    )
    assert runtime.status == pb.STRATEGY_STATUS_SCHEDULED
    stored = await server.stub.GetStrategy(
        pb.GetStrategyRequest(strategy_id=runtime.strategy_id), metadata=server.md()
    )
    assert stored.status == pb.STRATEGY_STATUS_SCHEDULED
    assert await server.redis.smembers("symbol:{TCS}:strategies") == {runtime.strategy_id}


async def test_start_twice_is_failed_precondition(server: Harness) -> None:
    runtime = await server.stub.StartStrategy(
        pb.StartStrategyRequest(spec=spec()), metadata=server.md()
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await server.stub.StartStrategy(
            pb.StartStrategyRequest(strategy_id=runtime.strategy_id), metadata=server.md()
        )
    assert rpc_code(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "already SCHEDULED" in (err.value.details() or "")


async def test_stop_then_restart_is_a_new_run(server: Harness) -> None:
    runtime = await server.stub.StartStrategy(
        pb.StartStrategyRequest(spec=spec()), metadata=server.md()
    )
    await server.stub.StopStrategy(
        pb.StopStrategyRequest(strategy_id=runtime.strategy_id), metadata=server.md()
    )
    again = await server.stub.StartStrategy(
        pb.StartStrategyRequest(strategy_id=runtime.strategy_id), metadata=server.md()
    )
    assert again.status == pb.STRATEGY_STATUS_SCHEDULED
    assert again.version == 3
    assert not again.HasField("terminated_at")


async def test_list_orders_is_empty_before_any_trade(server: Harness) -> None:
    runtime = await server.stub.StartStrategy(
        pb.StartStrategyRequest(spec=spec()), metadata=server.md()
    )
    orders = await server.stub.ListOrders(
        pb.ListOrdersRequest(strategy_id=runtime.strategy_id), metadata=server.md()
    )
    assert list(orders.orders) == []
