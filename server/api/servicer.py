"""StrategyService: translates proto <-> domain and calls the manager. Nothing else."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from protos.algoplane.v1 import strategy_pb2 as pb
from protos.algoplane.v1 import strategy_pb2_grpc
from server.api.convert import (
    order_to_proto,
    runtime_to_proto,
    spec_from_request,
    status_from_proto,
    strategy_to_proto,
)
from server.api.interceptors import tenant
from server.errors import InvalidArgument, ResourceExhausted
from server.manager import StrategyManager
from server.streams import EventStreams

Context = grpc.aio.ServicerContext[Any, Any]


class StrategyServicer(strategy_pb2_grpc.StrategyServiceServicer):
    def __init__(
        self, *, manager: StrategyManager, streams: EventStreams, stall_s: float = 30.0
    ) -> None:
        self._manager = manager
        self._streams = streams
        self._stall_s = stall_s

    async def CreateStrategy(
        self, request: pb.CreateStrategyRequest, context: Context
    ) -> pb.Strategy:
        spec = spec_from_request(request)
        strategy = await self._manager.create(tenant(), spec, request.request_id)
        return strategy_to_proto(strategy)

    async def GetStrategy(self, request: pb.GetStrategyRequest, context: Context) -> pb.Strategy:
        return strategy_to_proto(await self._manager.get(tenant(), request.strategy_id))

    async def ListStrategies(
        self, request: pb.ListStrategiesRequest, context: Context
    ) -> pb.ListStrategiesResponse:
        status = status_from_proto(request.status)
        page = await self._manager.list_page(
            tenant(), status, request.page_size, request.page_token
        )
        return pb.ListStrategiesResponse(
            strategies=[strategy_to_proto(s) for s in page.strategies],
            next_page_token=page.next_page_token,
        )

    async def StartStrategy(self, request: pb.StartStrategyRequest, context: Context) -> pb.Runtime:
        target = request.WhichOneof("target")
        if target == "strategy_id":
            runtime = await self._manager.start_stored(
                tenant(), request.strategy_id, request.request_id
            )
        elif target == "spec":
            spec = spec_from_request(request)
            runtime = await self._manager.start_new(tenant(), spec, request.request_id)
        else:
            raise InvalidArgument("target", "set either strategy_id or spec")
        return runtime_to_proto(runtime)

    async def StopStrategy(self, request: pb.StopStrategyRequest, context: Context) -> pb.Runtime:
        runtime = await self._manager.stop(tenant(), request.strategy_id, request.keep_position)
        return runtime_to_proto(runtime)

    async def GetRuntime(self, request: pb.GetRuntimeRequest, context: Context) -> pb.Runtime:
        return runtime_to_proto(await self._manager.runtime(tenant(), request.strategy_id))

    async def ListOrders(
        self, request: pb.ListOrdersRequest, context: Context
    ) -> pb.ListOrdersResponse:
        orders = await self._manager.orders(tenant(), request.strategy_id)
        return pb.ListOrdersResponse(orders=[order_to_proto(o) for o in orders])

    # Streams write with context.write (not yield) so a stalled reader can be cut off.
    async def StreamRuntime(  # type: ignore[override]
        self, request: pb.StreamRuntimeRequest, context: Context
    ) -> None:
        owner = tenant()
        if request.strategy_id:
            await self._manager.check_owner(owner, request.strategy_id)
        events = self._streams.runtime_events(owner, request.strategy_id, request.after_event_id)
        async for event_id, runtime in events:
            event = pb.RuntimeEvent(event_id=event_id, runtime=runtime_to_proto(runtime))
            await self._write(context, event)

    async def StreamOrders(  # type: ignore[override]
        self, request: pb.StreamOrdersRequest, context: Context
    ) -> None:
        owner = tenant()
        if request.strategy_id:
            await self._manager.check_owner(owner, request.strategy_id)
        events = self._streams.order_events(owner, request.strategy_id, request.after_event_id)
        async for event_id, order in events:
            await self._write(
                context, pb.OrderEvent(event_id=event_id, order=order_to_proto(order))
            )

    async def _write(self, context: Context, message: Any) -> None:
        """A subscriber whose flow-control window stays full for stall_s is cut off, so a
        reader that stopped cannot hold server resources; it resumes with after_event_id."""
        try:
            await asyncio.wait_for(context.write(message), self._stall_s)
        except TimeoutError:
            raise ResourceExhausted(
                f"stream consumer read nothing for {self._stall_s:g}s; "
                "reconnect with after_event_id"
            ) from None
