"""AlgoplaneClient: typed async methods for every RPC of `algoplane.v1.StrategyService`.

Every call carries the bearer token and a deadline. Failures that repeating can fix
(UNAVAILABLE, DEADLINE_EXCEEDED) are retried with backoff and jitter, and only for calls a
repeat cannot apply twice; anything else (INVALID_ARGUMENT, NOT_FOUND, ...) reaches the
caller at once as `grpc.aio.AioRpcError`. The stream helpers reconnect by themselves and
resume after the last event they yielded, so a consumer sees every event once, in order,
until it stops iterating.

    async with AlgoplaneClient("127.0.0.1:50051", token) as client:
        runtime = await client.start(spec=client.spec("SBIN", 5, buy, sell, "99.5"))
        async for event in client.watch_runtime(runtime.strategy_id):
            print(event.runtime.status)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from clients.errors import StreamGapError
from clients.retry import (
    RETRYABLE,
    Connection,
    RetryEvent,
    RetryHook,
    RetryPolicy,
    StateHook,
    StreamState,
    is_resumable,
)
from protos.algoplane.v1 import strategy_pb2 as pb
from protos.algoplane.v1 import strategy_pb2_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class _Event(Protocol):
    @property
    def event_id(self) -> str: ...


E = TypeVar("E", bound=_Event)
M = TypeVar("M")  # a stream's message: one event, or a batch of them

# grpc's own reconnect backoff grows to 120 s by default, so a client could sit out a server
# that came back long ago; ours bounds it near the SDK's own backoff.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

# A connection that stayed up this long counts as having worked: the next failure starts the
# backoff afresh instead of continuing a previous outage's count.
_HEALTHY_AFTER_S = 2.0
# The header in which the server announces where a stream starts (server/api/servicer.py).
START_AFTER_HEADER = "algoplane-start-after"


def timestamp(value: datetime) -> Timestamp:
    """A Timestamp from a timezone-aware datetime (naive datetimes are refused)."""
    if value.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware")
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def new_request_id() -> str:
    return uuid.uuid4().hex


class AlgoplaneClient:
    """Async client; use as `async with AlgoplaneClient(addr, token) as client: ...`.

    `timeout_s` is the deadline of each attempt of a unary call; `retry` bounds the attempts
    and the waits (streams use its backoff too, without a bound on attempts); `on_retry` is
    told about every retry before its wait.
    """

    def __init__(
        self,
        target: str,
        token: str,
        *,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        on_retry: RetryHook | None = None,
        keepalive_s: float = 20.0,
    ) -> None:
        self.target = target
        # Pings, also on an idle stream, so a link that dropped silently (no reset, e.g. a
        # NAT that forgot it) is noticed within keepalive_s plus its timeout and resumed.
        keepalive = [
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(min(keepalive_s, 10.0) * 1000)),
            # grpc-core 1.6x applies this one, not keepalive_timeout, to the ping's ack.
            ("grpc.http2.ping_timeout_ms", int(min(keepalive_s, 10.0) * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_time_between_pings_ms", int(keepalive_s * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", int(keepalive_s * 1000)),
        ]
        self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS + keepalive)
        self._stub = strategy_pb2_grpc.StrategyServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout_s
        self._retry = retry or RetryPolicy()
        self._on_retry = on_retry

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

    # -- writes: each retried only because a repeat cannot act twice -----------------------

    async def create(self, spec: pb.StrategySpec, request_id: str = "") -> pb.Strategy:
        """Stores a strategy. Without a `request_id` one is generated, and every retry sends
        the same one, so a retry after a lost reply returns the first result."""
        request = pb.CreateStrategyRequest(spec=spec, request_id=request_id or new_request_id())
        return await self._call(
            self._stub.CreateStrategy, request, "CreateStrategy", request.request_id
        )

    async def start(
        self, *, strategy_id: str = "", spec: pb.StrategySpec | None = None, request_id: str = ""
    ) -> pb.Runtime:
        """Starts a stored strategy, or creates and starts one from `spec`; `request_id` as
        for `create`."""
        if bool(strategy_id) == (spec is not None):
            raise ValueError("give exactly one of strategy_id and spec")
        request_id = request_id or new_request_id()
        request = (
            pb.StartStrategyRequest(strategy_id=strategy_id, request_id=request_id)
            if strategy_id
            else pb.StartStrategyRequest(spec=spec, request_id=request_id)
        )
        return await self._call(self._stub.StartStrategy, request, "StartStrategy", request_id)

    async def stop(self, strategy_id: str, *, keep_position: bool = False) -> pb.Runtime:
        """Stops a strategy (exiting an open position unless `keep_position`).

        Retried although it carries no request_id, because the server's Stop converges: it
        runs under the strategy's lock, a STOPPED strategy is returned unchanged, and an exit
        it queued is deduplicated by its deterministic client order id (a retry while that
        exit is still queued enqueues the same id; once it ran, the position is closed)."""
        request = pb.StopStrategyRequest(strategy_id=strategy_id, keep_position=keep_position)
        return await self._call(self._stub.StopStrategy, request, "StopStrategy")

    # -- reads ---------------------------------------------------------------------------

    async def get(self, strategy_id: str) -> pb.Strategy:
        request = pb.GetStrategyRequest(strategy_id=strategy_id)
        return await self._call(self._stub.GetStrategy, request, "GetStrategy")

    async def list_page(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        status: pb.StrategyStatus.ValueType = pb.STRATEGY_STATUS_UNSPECIFIED,
    ) -> pb.ListStrategiesResponse:
        """One page of the caller's strategies (`page_size` 0 = the server's 50)."""
        request = pb.ListStrategiesRequest(
            page_size=page_size, page_token=page_token, status=status
        )
        return await self._call(self._stub.ListStrategies, request, "ListStrategies")

    async def list_all(
        self, status: pb.StrategyStatus.ValueType = pb.STRATEGY_STATUS_UNSPECIFIED
    ) -> list[pb.Strategy]:
        """Every strategy of the caller, following page tokens."""
        found: list[pb.Strategy] = []
        token = ""
        while True:
            page = await self.list_page(page_size=500, page_token=token, status=status)
            found.extend(page.strategies)
            token = page.next_page_token
            if not token:
                return found

    async def runtime(self, strategy_id: str) -> pb.Runtime:
        request = pb.GetRuntimeRequest(strategy_id=strategy_id)
        return await self._call(self._stub.GetRuntime, request, "GetRuntime")

    async def orders(self, strategy_id: str = "") -> list[pb.Order]:
        """The order log of one strategy, or of all the caller's strategies."""
        request = pb.ListOrdersRequest(strategy_id=strategy_id)
        reply = await self._call(self._stub.ListOrders, request, "ListOrders")
        return list(reply.orders)

    # -- streams -------------------------------------------------------------------------

    def watch_runtime(
        self,
        strategy_id: str = "",
        after_event_id: str = "",
        *,
        on_state: StateHook | None = None,
        batched: bool = True,
    ) -> AsyncGenerator[pb.RuntimeEvent]:
        """Runtime events of one strategy (empty: all of the caller's), from now or after
        `after_event_id`, resuming by itself across disconnects and server restarts.
        Raises StreamGapError when the server no longer keeps the events to resume from.
        `batched`: read StreamRuntimeBatches (events that wait go in one message; yielded
        one by one all the same); False: StreamRuntime, one message per event."""
        if batched:

            def open_batches(after: str) -> grpc.aio.UnaryStreamCall[Any, pb.RuntimeEventBatch]:
                request = pb.StreamRuntimeRequest(strategy_id=strategy_id, after_event_id=after)
                return self._stub.StreamRuntimeBatches(request, metadata=self._metadata)

            return self._follow(open_batches, after_event_id, on_state, _events_of)

        def open_call(after: str) -> grpc.aio.UnaryStreamCall[Any, pb.RuntimeEvent]:
            request = pb.StreamRuntimeRequest(strategy_id=strategy_id, after_event_id=after)
            return self._stub.StreamRuntime(request, metadata=self._metadata)

        return self._follow(open_call, after_event_id, on_state, _alone)

    def watch_orders(
        self,
        strategy_id: str = "",
        after_event_id: str = "",
        *,
        on_state: StateHook | None = None,
        batched: bool = True,
    ) -> AsyncGenerator[pb.OrderEvent]:
        """Order events, with the same resuming (and `batched`) as `watch_runtime`."""
        if batched:

            def open_batches(after: str) -> grpc.aio.UnaryStreamCall[Any, pb.OrderEventBatch]:
                request = pb.StreamOrdersRequest(strategy_id=strategy_id, after_event_id=after)
                return self._stub.StreamOrdersBatches(request, metadata=self._metadata)

            return self._follow(open_batches, after_event_id, on_state, _events_of)

        def open_call(after: str) -> grpc.aio.UnaryStreamCall[Any, pb.OrderEvent]:
            request = pb.StreamOrdersRequest(strategy_id=strategy_id, after_event_id=after)
            return self._stub.StreamOrders(request, metadata=self._metadata)

        return self._follow(open_call, after_event_id, on_state, _alone)

    # -- plumbing ------------------------------------------------------------------------

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        name: str,
        request_id: str = "",
    ) -> Resp:
        """One unary call with the token and a deadline per attempt; the same request object
        (so the same request_id) goes out on every attempt."""
        attempt = 1
        while True:
            try:
                return await method(request, metadata=self._metadata, timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in RETRYABLE or attempt >= self._retry.attempts:
                    raise
                delay = self._retry.delay(attempt)
                if self._on_retry is not None:
                    details = exc.details() or ""
                    self._on_retry(RetryEvent(name, attempt, code, details, delay, request_id))
                await asyncio.sleep(delay)
                attempt += 1

    async def _follow(
        self,
        open_call: Callable[[str], grpc.aio.UnaryStreamCall[Any, M]],
        after_event_id: str,
        on_state: StateHook | None,
        unpack: Callable[[M], Iterable[E]],
    ) -> AsyncGenerator[E]:
        """Yields events; after a resumable failure waits, reopens after the last event_id
        yielded (or, before any event, after the position the server announced when the
        stream opened) and goes on. The server's resume is exact, so nothing needs
        deduplicating."""
        report = on_state or (lambda _state: None)
        last, attempt = after_event_id, 0
        report(StreamState(Connection.CONNECTING))
        while True:
            call = open_call(last)
            up = asyncio.create_task(
                self._up(call, _connected(last, reconnect=attempt > 0), report)
            )
            try:
                async for message in call:
                    await up  # reported before the first event
                    for event in unpack(message):
                        # Resumes after the last event handed out, mid-batch included.
                        last = event.event_id
                        yield event
                error = "the server ended the stream"
            except grpc.aio.AioRpcError as exc:
                error = _failure(exc, last, report)
            finally:
                up.cancel()
                call.cancel()
            opened = up.result() if up.done() and not up.cancelled() else None
            if opened is not None and not last:
                last = opened[1]  # dropped before any event: resume where it started
            healthy = opened is not None and time.monotonic() - opened[0] > _HEALTHY_AFTER_S
            attempt = 1 if healthy else attempt + 1
            report(StreamState(Connection.RECONNECTING, attempt=attempt, error=error))
            await asyncio.sleep(self._retry.delay(attempt))

    async def _up(
        self, call: grpc.aio.UnaryStreamCall[Any, Any], state: StreamState, report: StateHook
    ) -> tuple[float, str]:
        """Reports the stream connected once its headers arrived, which the server sends as
        soon as the stream's position is fixed; returns when that was and the event_id the
        stream starts after (empty from a server that does not announce it)."""
        metadata = await call.initial_metadata()
        start_after = ""
        for key, value in metadata or ():
            if key == START_AFTER_HEADER:
                start_after = value if isinstance(value, str) else value.decode()
        if not call.done():
            report(state)
        return time.monotonic(), start_after


def _alone(event: E) -> Iterable[E]:
    return (event,)


def _events_of(batch: Any) -> Iterable[Any]:
    return batch.events  # type: ignore[no-any-return]


def _connected(resumed_after: str, *, reconnect: bool) -> StreamState:
    # Back without an event_id to resume from: the stream restarts at its end and whatever
    # happened during the outage is not replayed; the caller is told so.
    gap = reconnect and not resumed_after
    return StreamState(Connection.CONNECTED, resumed_after=resumed_after, gap_possible=gap)


def _failure(exc: grpc.aio.AioRpcError, last: str, report: StateHook) -> str:
    """The error text of a resumable failure; raises for the others (after reporting)."""
    code, details = exc.code(), exc.details() or ""
    text = f"{code.name}: {details}"
    if code is grpc.StatusCode.OUT_OF_RANGE:
        report(StreamState(Connection.FAILED, error=text))
        raise StreamGapError(last, details) from None
    if not is_resumable(code, details):
        report(StreamState(Connection.FAILED, error=text))
        raise exc
    return text
