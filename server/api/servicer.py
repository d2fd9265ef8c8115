"""StrategyService: translates proto <-> domain and calls the manager. Nothing else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
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
from server.api.stall_watch import StallWatch
from server.errors import InvalidArgument, ResourceExhausted
from server.manager import StrategyManager
from server.metrics import STREAM_METHODS
from server.store.codec import Flat, order_from_flat, runtime_from_flat
from server.store.keys import StreamKind
from server.streams import EventStreams

Context = grpc.aio.ServicerContext[Any, Any]


class StrategyServicer(strategy_pb2_grpc.StrategyServiceServicer):
    def __init__(
        self, *, manager: StrategyManager, streams: EventStreams, stall_s: float = 30.0
    ) -> None:
        self._manager = manager
        self._streams = streams
        # A subscriber whose flow-control window stays full for stall_s is cut off, so a
        # reader that stopped cannot hold server resources; it resumes with after_event_id.
        self._stalls = StallWatch(stall_s)

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

    # Streams write with context.write (not yield) so a stalled reader can be cut off. What
    # they write is the event already encoded once for every subscriber (add_to_server).
    async def StreamRuntime(  # type: ignore[override]
        self, request: pb.StreamRuntimeRequest, context: Context
    ) -> None:
        await self._stream("runtime", request.strategy_id, request.after_event_id, context)

    async def StreamOrders(  # type: ignore[override]
        self, request: pb.StreamOrdersRequest, context: Context
    ) -> None:
        await self._stream("orders", request.strategy_id, request.after_event_id, context)

    async def StreamRuntimeBatches(  # type: ignore[override]
        self, request: pb.StreamRuntimeRequest, context: Context
    ) -> None:
        await self._stream(
            "runtime", request.strategy_id, request.after_event_id, context, batched=True
        )

    async def StreamOrdersBatches(  # type: ignore[override]
        self, request: pb.StreamOrdersRequest, context: Context
    ) -> None:
        await self._stream(
            "orders", request.strategy_id, request.after_event_id, context, batched=True
        )

    async def _stream(
        self,
        kind: StreamKind,
        strategy_id: str,
        after_event_id: str,
        context: Context,
        *,
        batched: bool = False,
    ) -> None:
        owner = tenant()
        if strategy_id:
            await self._manager.check_owner(owner, strategy_id)

        subscription = await self._streams.subscribe(kind, owner, strategy_id, after_event_id)
        writer = self._stalls.watch()
        try:
            # Headers go out at once with the position the stream starts after: a client
            # knows the stream is established, and can resume exactly even if it drops
            # before the first event.
            await context.send_initial_metadata(((START_AFTER_HEADER, subscription.start_after),))
            while True:
                items = await subscription.next()
                # Batched, every event that has arrived goes in one write: grpc.aio's cost
                # per message, not ours per event, is what bounds a fan-out.
                if batched:
                    for at in range(0, len(items), BATCH_MAX):
                        writer.since = time.monotonic()
                        await context.write(
                            b"".join(item.element for item in items[at : at + BATCH_MAX])
                        )
                else:
                    for item in items:
                        writer.since = time.monotonic()
                        await context.write(item.payload)
                writer.since = None
        except asyncio.CancelledError:
            if not writer.cut_off():
                raise
            raise ResourceExhausted(
                f"stream consumer read nothing for {self._stalls.stall_s:g}s; "
                "reconnect with after_event_id"
            ) from None
        finally:
            self._stalls.unwatch(writer)
            await subscription.close()


def encode_runtime_event(event_id: str, fields: Flat) -> bytes:
    runtime = runtime_to_proto(runtime_from_flat(fields))
    return pb.RuntimeEvent(event_id=event_id, runtime=runtime).SerializeToString()


def encode_order_event(event_id: str, fields: Flat) -> bytes:
    order = order_to_proto(order_from_flat(fields))
    return pb.OrderEvent(event_id=event_id, order=order).SerializeToString()


START_AFTER_HEADER = "algoplane-start-after"
ENCODERS: dict[StreamKind, Callable[[str, Flat], bytes]] = {
    "runtime": encode_runtime_event,
    "orders": encode_order_event,
}
_SERVICE = "algoplane.v1.StrategyService"
# Events in one message of a *Batches stream (a few hundred bytes each).
BATCH_MAX = 256


class _Capture:
    """Stands in for the server while the generated code registers its handlers."""

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]

    def add_generic_rpc_handlers(self, _handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, _service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.handlers = dict(handlers)


def add_to_server(servicer: StrategyServicer, server: grpc.aio.Server) -> None:
    """The generated registration, except that the streams send bytes as they are:
    each event is encoded once by the tenant's feed, not once per subscriber."""
    capture = _Capture()
    strategy_pb2_grpc.add_StrategyServiceServicer_to_server(servicer, capture)  # type: ignore[arg-type]
    handlers = capture.handlers
    for name in STREAM_METHODS:
        generated = handlers[name]
        handlers[name] = grpc.unary_stream_rpc_method_handler(
            generated.unary_stream,  # type: ignore[arg-type]
            request_deserializer=generated.request_deserializer,
            response_serializer=_pass_bytes(generated.response_serializer),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_registered_method_handlers(_SERVICE, handlers)  # type: ignore[attr-defined]


def _pass_bytes(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    def serializer(message: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        assert serialize is not None
        return serialize(message)

    return serializer
