"""Interceptors: authentication and error -> status translation, the only place that aborts.

Both wrap the method's behaviour rather than short-circuiting in intercept_service, so the
verified tenant is set in a context variable of the very task that runs the handler.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, NoReturn, cast

import grpc
import redis.exceptions
import sqlalchemy.exc

from server.api.auth import TokenVerifier
from server.errors import AlgoplaneError

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/algoplane.v1.StrategyService/"

# The tenant of the current call; set only from a verified token.
current_tenant: ContextVar[str] = ContextVar("current_tenant")

Unary = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
Streaming = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]

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
    """Wraps the unary-unary and unary-stream behaviours of our own service's methods."""

    def wrap_unary(self, behaviour: Unary) -> Unary:
        raise NotImplementedError

    def wrap_stream(self, behaviour: Streaming) -> Streaming:
        raise NotImplementedError

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
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self.wrap_unary(cast(Unary, handler.unary_unary)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self.wrap_stream(cast(Streaming, handler.unary_stream)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class ErrorInterceptor(_BehaviourInterceptor):
    """Domain errors -> their status; infrastructure failures -> UNAVAILABLE; the rest ->
    INTERNAL with nothing leaked (and logged, since it is a bug)."""

    def wrap_unary(self, behaviour: Unary) -> Unary:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await behaviour(request, context)
            except Exception as exc:  # noqa: BLE001 - translated, never swallowed
                await _abort(context, exc)

        return unary

    def wrap_stream(self, behaviour: Streaming) -> Streaming:
        async def stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                async for item in behaviour(request, context):
                    yield item
            except Exception as exc:  # noqa: BLE001 - translated, never swallowed
                await _abort(context, exc)

        return stream


class AuthInterceptor(_BehaviourInterceptor):
    """Verifies the bearer token before the handler runs and records the tenant."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = dict(context.invocation_metadata() or ())
        header = metadata.get("authorization")
        current_tenant.set(self._verifier.tenant_of(header if isinstance(header, str) else None))

    def wrap_unary(self, behaviour: Unary) -> Unary:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self._authenticate(context)
            return await behaviour(request, context)

        return unary

    def wrap_stream(self, behaviour: Streaming) -> Streaming:
        async def stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            self._authenticate(context)
            async for item in behaviour(request, context):
                yield item

        return stream


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
