"""Composition root: builds every component, starts them in order, stops them in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from protos.algoplane.v1 import strategy_pb2, strategy_pb2_grpc
from server.api.auth import TokenVerifier
from server.api.health import HealthReporter
from server.api.interceptors import AuthInterceptor, ErrorInterceptor
from server.api.servicer import StrategyServicer
from server.clock import Clock, SystemClock
from server.config import Settings
from server.manager import StrategyManager
from server.store.db import Database
from server.store.embedded_redis import EmbeddedRedis
from server.store.state import RedisState, connect
from server.streams import EventStreams

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Running:
    """What a started app tells its caller."""

    port: int
    jwt_secret: str
    secret_generated: bool


def load_or_create_secret(data_dir: Path) -> tuple[str, bool]:
    """The configured-nowhere default: a random secret kept (0600) in the data dir."""
    path = data_dir / "jwt.secret"
    if path.exists():
        return path.read_text().strip(), False
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret, True


class App:
    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        self._settings = settings
        self._clock = clock or SystemClock()
        self._embedded: EmbeddedRedis | None = None
        self._db: Database | None = None
        self._state: RedisState | None = None
        self._streams: EventStreams | None = None
        self._health: HealthReporter | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> Running:
        settings = self._settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        redis_url = settings.redis_url
        if not redis_url:
            self._embedded = EmbeddedRedis(data_dir=settings.data_dir)
            redis_url = await self._embedded.start()
        secret, generated = (
            (settings.jwt_secret, False)
            if settings.jwt_secret
            else await asyncio.to_thread(load_or_create_secret, settings.data_dir)
        )
        self._db = Database(settings.effective_database_url)
        await self._db.create_schema()
        self._state = RedisState(
            client=connect(redis_url, timeout_s=settings.redis_timeout_s),
            stream_client=connect(redis_url, timeout_s=settings.redis_timeout_s + 2),
            stream_maxlen=settings.stream_maxlen,
        )
        manager = StrategyManager(db=self._db, state=self._state, clock=self._clock)
        self._streams = EventStreams(state=self._state)
        port = await self._start_server(manager, self._streams, TokenVerifier(secret))
        self._health_task = asyncio.create_task(self._health_loop(), name="algoplane-health")
        log.info("algoplane serving on port %d", port)
        return Running(port=port, jwt_secret=secret, secret_generated=generated)

    async def _start_server(
        self, manager: StrategyManager, streams: EventStreams, verifier: TokenVerifier
    ) -> int:
        server = grpc.aio.server(
            interceptors=[ErrorInterceptor(), AuthInterceptor(verifier)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", 16 * MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        strategy_pb2_grpc.add_StrategyServiceServicer_to_server(
            StrategyServicer(manager=manager, streams=streams), server
        )
        health_servicer = AsyncHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if self._settings.reflection:
            names = (
                strategy_pb2.DESCRIPTOR.services_by_name["StrategyService"].full_name,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, server)
        assert self._db is not None and self._state is not None
        self._health = HealthReporter(
            servicer=health_servicer,
            checks={"redis": self._state.ping, "database": self._db.ping},
            timeout_s=self._settings.redis_timeout_s,
        )
        await self._health.check_once()
        port = server.add_insecure_port(self._settings.grpc_addr)
        if port == 0:
            raise OSError(f"cannot bind ALGOPLANE_GRPC_ADDR={self._settings.grpc_addr}")
        await server.start()
        self._server = server
        return port

    async def _health_loop(self) -> None:
        assert self._health is not None
        await self._health.run(self._settings.health_interval_s)

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self) -> None:
        """Health NOT_SERVING, streams end UNAVAILABLE, in-flight calls get the grace
        period, then background tasks, then connections, then embedded Redis."""
        if self._health is not None:
            await self._health.shutdown()
        if self._streams is not None:
            self._streams.close()
        if self._server is not None:
            await self._server.stop(self._settings.shutdown_grace_s)
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._state is not None:
            await self._state.close()
        if self._db is not None:
            await self._db.close()
        if self._embedded is not None:
            await self._embedded.stop()
