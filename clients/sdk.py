"""AlgoplaneClient: the generated async stub with the bearer token attached to every call."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import datetime
from types import TracebackType

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from protos.algoplane.v1 import strategy_pb2 as pb
from protos.algoplane.v1 import strategy_pb2_grpc


def timestamp(value: datetime) -> Timestamp:
    """A Timestamp from a timezone-aware datetime (naive datetimes are refused)."""
    if value.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware")
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


class AlgoplaneClient:
    """Async client; use as `async with AlgoplaneClient(addr, token) as client: ...`."""

    def __init__(self, target: str, token: str, *, timeout_s: float = 10.0) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = strategy_pb2_grpc.StrategyServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout_s

    async def __aenter__(self) -> AlgoplaneClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    @staticmethod
    def spec(
        symbol: str, quantity: int, buy_time: datetime, sell_time: datetime, stop_loss: str
    ) -> pb.StrategySpec:
        return pb.StrategySpec(
            symbol=symbol,
            quantity=quantity,
            buy_time=timestamp(buy_time),
            sell_time=timestamp(sell_time),
            stop_loss=stop_loss,
        )

    async def create(self, spec: pb.StrategySpec, request_id: str = "") -> pb.Strategy:
        request = pb.CreateStrategyRequest(spec=spec, request_id=request_id)
        return await self._stub.CreateStrategy(
            request, metadata=self._metadata, timeout=self._timeout
        )

    async def get(self, strategy_id: str) -> pb.Strategy:
        request = pb.GetStrategyRequest(strategy_id=strategy_id)
        return await self._stub.GetStrategy(request, metadata=self._metadata, timeout=self._timeout)

    async def list_all(
        self, status: pb.StrategyStatus.ValueType = pb.STRATEGY_STATUS_UNSPECIFIED
    ) -> list[pb.Strategy]:
        """Every strategy of the caller, following page tokens."""
        found: list[pb.Strategy] = []
        token = ""
        while True:
            request = pb.ListStrategiesRequest(page_size=500, page_token=token, status=status)
            page = await self._stub.ListStrategies(
                request, metadata=self._metadata, timeout=self._timeout
            )
            found.extend(page.strategies)
            token = page.next_page_token
            if not token:
                return found

    async def start(
        self, *, strategy_id: str = "", spec: pb.StrategySpec | None = None, request_id: str = ""
    ) -> pb.Runtime:
        if bool(strategy_id) == (spec is not None):
            raise ValueError("give exactly one of strategy_id and spec")
        request = (
            pb.StartStrategyRequest(strategy_id=strategy_id, request_id=request_id)
            if strategy_id
            else pb.StartStrategyRequest(spec=spec, request_id=request_id)
        )
        return await self._stub.StartStrategy(
            request, metadata=self._metadata, timeout=self._timeout
        )

    async def stop(self, strategy_id: str, *, keep_position: bool = False) -> pb.Runtime:
        request = pb.StopStrategyRequest(strategy_id=strategy_id, keep_position=keep_position)
        return await self._stub.StopStrategy(
            request, metadata=self._metadata, timeout=self._timeout
        )

    async def runtime(self, strategy_id: str) -> pb.Runtime:
        request = pb.GetRuntimeRequest(strategy_id=strategy_id)
        return await self._stub.GetRuntime(request, metadata=self._metadata, timeout=self._timeout)

    async def orders(self, strategy_id: str = "") -> list[pb.Order]:
        request = pb.ListOrdersRequest(strategy_id=strategy_id)
        reply = await self._stub.ListOrders(request, metadata=self._metadata, timeout=self._timeout)
        return list(reply.orders)

    async def watch_runtime(
        self, strategy_id: str = "", after_event_id: str = ""
    ) -> AsyncGenerator[pb.RuntimeEvent]:
        """Runtime events; resumes after `after_event_id` when given."""
        request = pb.StreamRuntimeRequest(strategy_id=strategy_id, after_event_id=after_event_id)
        async for event in self._stub.StreamRuntime(request, metadata=self._metadata):
            yield event

    async def watch_orders(
        self, strategy_id: str = "", after_event_id: str = ""
    ) -> AsyncGenerator[pb.OrderEvent]:
        request = pb.StreamOrdersRequest(strategy_id=strategy_id, after_event_id=after_event_id)
        async for event in self._stub.StreamOrders(request, metadata=self._metadata):
            yield event
