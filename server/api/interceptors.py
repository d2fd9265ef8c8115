"""Interceptors: metrics, authentication and error -> status translation (the only place
that aborts).

They wrap the method's behaviour rather than short-circuiting in intercept_service, so the
verified tenant is set in a context variable of the very task that runs the handler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, NoReturn, cast

import grpc
import redis.exceptions
import sqlalchemy.exc
from google.protobuf.message import DecodeError

from server import logs
from server.api.auth import TokenVerifier
from server.errors import AlgoplaneError, InvalidArgument
from server.metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/algoplane.v1.StrategyService/"

# The tenant of the current call; set only from a verified token.
current_tenant: ContextVar[str] = ContextVar("current_tenant")

Behaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
Deserializer = Callable[[bytes], Any]

# Infrastructure failures the caller can retry: the call never hangs, it says so.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    ConnectionError,
    TimeoutError,
)


def tenant() -> str:
    return current_tenant.get()


class _BehaviourInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps the behaviour of our own service's methods. Streaming methods write with
    `context.write` rather than yielding, so both kinds are coroutines and one wrapper
    serves both."""

    def __init__(self) -> None:
        # method -> (the handler it was given, the handler it made of it)
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def wrap(self, behaviour: Behaviour) -> Behaviour:
        raise NotImplementedError

    def wrap_rpc(self, behaviour: Behaviour, method: str, streaming: bool) -> Behaviour:
        """Like `wrap`, for an interceptor that needs to know which method it wraps."""
        return self.wrap(behaviour)

    def wrap_deserializer(self, deserializer: Deserializer | None) -> Deserializer | None:
        return deserializer

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):
            return handler
        # Wrapped once per method, not per call: the handler that comes back is the same
        # object every time (the inner interceptors keep theirs too).
        cached = self._wrapped.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap_handler(handler, handler_call_details.method)
        self._wrapped[handler_call_details.method] = (handler, wrapped)
        return wrapped

    def _wrap_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any], full_method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        factory: Any
        if handler.unary_unary is not None:
            behaviour, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        elif handler.unary_stream is not None:
            behaviour, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            return handler
        method = full_method.removeprefix(SERVICE_PREFIX)
        streaming = handler.unary_stream is not None
        wrapped: grpc.RpcMethodHandler[Any, Any] = factory(
            self.wrap_rpc(cast(Behaviour, behaviour), method, streaming),
            request_deserializer=self.wrap_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        return wrapped


class MetricsInterceptor(_BehaviourInterceptor):
    """Counts every call by method and the status code its client gets, and open streams.
    It must be the outermost interceptor: the error interceptor inside it has already turned
    every exception into the final status (an abort) by the time a call returns here."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def wrap_rpc(self, behaviour: Behaviour, method: str, streaming: bool) -> Behaviour:
        subscribers = self._metrics.subscribers.get(method) if streaming else None

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            # Anything the error interceptor lets through reaches the client as UNKNOWN.
            code: grpc.StatusCode | None = grpc.StatusCode.UNKNOWN
            if subscribers is not None:
                subscribers.inc()
            try:
                result = await behaviour(request, context)
                code = context.code() or grpc.StatusCode.OK
                return result
            except grpc.aio.AbortError:
                code = context.code()
                raise
            except asyncio.CancelledError:  # the client went away (or the server stopped)
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                if subscribers is not None:
                    subscribers.dec()
                self._metrics.rpc_done(method, (code or grpc.StatusCode.UNKNOWN).name)

        return call


class ErrorInterceptor(_BehaviourInterceptor):
    """Domain errors -> their status; infrastructure failures -> UNAVAILABLE; the rest ->
    INTERNAL with nothing leaked (and logged, since it is a bug)."""

    def wrap(self, behaviour: Behaviour) -> Behaviour:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await behaviour(request, context)
            except Exception as exc:  # noqa: BLE001 - translated, never swallowed
                await _abort(context, exc)

        return call


class AuthInterceptor(_BehaviourInterceptor):
    """Verifies the bearer token before the handler runs and records the tenant."""

    def __init__(self, verifier: TokenVerifier) -> None:
        super().__init__()
        self._verifier = verifier

    def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = dict(context.invocation_metadata() or ())
        header = metadata.get("authorization")
        current_tenant.set(self._verifier.tenant_of(header if isinstance(header, str) else None))

    def wrap(self, behaviour: Behaviour) -> Behaviour:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self._authenticate(context)
            # Log lines of this call carry its tenant (and strategy, when the request names
            # one); the call runs in its own task, so the binding ends with it.
            logs.bind(tenant=tenant(), strategy_id=str(getattr(request, "strategy_id", "")))
            return await behaviour(request, context)

        return call


class _Undecodable:
    """Stands in for request bytes that did not parse (bad UTF-8, corrupt wire format)."""


class DecodeInterceptor(_BehaviourInterceptor):
    """Undecodable requests end with INVALID_ARGUMENT (after authentication, as this is the
    innermost interceptor) instead of grpc's own UNKNOWN."""

    def wrap_deserializer(self, deserializer: Deserializer | None) -> Deserializer | None:
        if deserializer is None:
            return None
        parse = deserializer

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError:
                return _Undecodable()

        return deserialize

    def wrap(self, behaviour: Behaviour) -> Behaviour:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            _check_decoded(request)
            return await behaviour(request, context)

        return call


def _check_decoded(request: object) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument("request", "is not a valid protobuf message for this method")


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, AlgoplaneError):
        await context.abort(exc.code, exc.message)
    if isinstance(exc, _UNAVAILABLE):
        log.warning("dependency unavailable: %s", exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"storage unavailable: {_name(exc)}")
    log.exception("unexpected error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _name(exc: BaseException) -> str:
    if isinstance(exc, redis.exceptions.RedisError):
        return "redis"
    if isinstance(exc, sqlalchemy.exc.SQLAlchemyError):
        return "database"
    return type(exc).__name__
