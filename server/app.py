"""Composition root: builds every component, starts them in order, stops them in reverse."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from protos.algoplane.v1 import strategy_pb2
from server.api.auth import TokenVerifier
from server.api.health import FEED_HEALTH_SERVICE, HealthReporter
from server.api.interceptors import (
    AuthInterceptor,
    DecodeInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
)
from server.api.servicer import ENCODERS, StrategyServicer
from server.api.servicer import add_to_server as add_strategy_service
from server.cancellation import cancel_and_wait, cancel_requested
from server.clock import Clock, SystemClock
from server.config import Settings
from server.engine_wiring import (
    EngineWiring,
    close_connections,
    connect_state,
    open_database,
    wire_engine,
)
from server.manager import StrategyManager
from server.market.formats import feed_format
from server.market.listener import MarketListener
from server.metrics import Metrics, MetricsServer, serve_configured
from server.publisher import Publisher
from server.recovery import Recovery
from server.scheduler import Scheduler
from server.stoploss import StopLossGuard
from server.store.codec import to_micros
from server.store.db import Database
from server.store.embedded_redis import EmbeddedRedis
from server.store.state import RedisState
from server.store.stoploss import StopLossIndex
from server.streams import EventStreams
from server.worker_supervisor import EngineWorkers

log = logging.getLogger(__name__)

# Every this many timer-sync rounds the sync reads every live strategy; the rounds between
# read only what changed.
_FULL_SYNC_EVERY = 12
# Bounds App.abandon(): the embedded redis-server's stop is SIGTERM, 10 s, then SIGKILL.
_ABANDON_REDIS_S = 15.0

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
        self._server: grpc.aio.Server | None = None
        self._scheduler: Scheduler | None = None
        self._wiring: EngineWiring | None = None
        self._workers: EngineWorkers | None = None
        self._listener: MarketListener | None = None
        self._recovery: Recovery | None = None
        self._recovered = False
        self._background: list[asyncio.Task[Any]] = []
        self._metrics = Metrics()
        self._metrics_server: MetricsServer | None = None
        # Symbols of live strategies (from the DB's periodic sync, plus every Start since):
        # the ones whose stop-loss index is counted.
        self._symbols: set[str] = set()
        self._synced_us = 0

    @property
    def listener(self) -> MarketListener | None:
        """The market listener, when a feed is configured (its counters and state)."""
        return self._listener

    @property
    def metrics_port(self) -> int | None:
        """The bound /metrics port (ALGOPLANE_METRICS_ADDR may ask for 0), None when off."""
        return self._metrics_server.port if self._metrics_server is not None else None

    async def start(self) -> Running:
        settings = self._settings
        self._serve_metrics()
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
        self._db = open_database(settings)
        await self._db.create_schema()
        self._state = connect_state(settings, redis_url)
        manager = self._build_pipeline(redis_url)
        self._streams = EventStreams(state=self._state, encoders=ENCODERS)
        port = await self._start_server(manager, self._streams, TokenVerifier(secret))
        self._spawn("health", self._health_loop())
        log.info("algoplane serving reads on port %d; recovering before it trades", port)
        await self._recover_until_done()
        await self._start_trading(manager)
        log.info("algoplane trading on port %d", port)
        return Running(port=port, jwt_secret=secret, secret_generated=generated)

    def _serve_metrics(self) -> None:
        """First of all, so a taken port stops startup before anything else runs."""
        self._metrics_server = serve_configured(self._metrics, self._settings)

    async def _recover_until_done(self) -> None:
        """Health stays NOT_SERVING and Start/Stop answer UNAVAILABLE until this is done;
        with Redis or the DB away it keeps trying."""
        assert self._recovery is not None
        delay = 0.2
        while True:
            try:
                await self._recovery.recover()
                self._recovered = True
                return
            except Exception as exc:  # noqa: BLE001 - a dependency is away: try again
                log.warning("recovery failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _start_trading(self, manager: StrategyManager) -> None:
        assert self._wiring is not None and self._scheduler is not None
        await self._wiring.engine.start()
        if self._workers is not None:
            # After recovery, like this process's own engine: a worker never races a rebuild.
            self._workers.start()
        self._scheduler.start()
        await self._sync_timers()
        self._spawn("timer-sync", self._sync_loop())
        self._spawn("reconcile", _every(self._settings.timer_sync_s, self._maintain))
        self._spawn("metrics", _every(min(1.0, self._settings.health_interval_s), self._sample))
        if self._listener is not None:
            self._start_listener(self._listener)
        manager.open_for_trading()
        if self._health is not None:
            await self._health.check_once()

    async def _maintain(self) -> None:
        """Rebuild Redis if it lost its data; settle orders left unfinished."""
        assert self._recovery is not None and self._scheduler is not None
        if await self._recovery.rebuild_if_lost():
            self._scheduler.forget_fired()
            await self._sync_timers()
        await self._recovery.reconcile()

    async def _sample(self) -> None:
        """Gauges whose truth is in Redis. Sampled here, on the event loop, rather than on
        scrape: the HTTP server answers from its own thread, which cannot use the async
        Redis client, and a scrape must never wait on the loop. They lag by at most the
        interval (a second)."""
        assert self._wiring is not None
        self._metrics.set_queues(await self._wiring.queue.depths())
        armed = await self._wiring.index.armed_total(self._symbols)
        self._metrics.stoploss_armed.set(armed)

    def _watch_symbol(self, symbol: str) -> None:
        self._symbols.add(symbol)
        if self._listener is not None:
            self._listener.add(symbol)

    async def _recovered_check(self) -> None:
        if not self._recovered:
            raise RuntimeError("recovery has not finished")

    def _build_pipeline(self, redis_url: str) -> StrategyManager:
        """Queue, locks, broker, scheduler, engine and recovery (not started yet); returns
        the manager that the API drives them through."""
        settings, state, db = self._settings, self._state, self._db
        assert state is not None and db is not None
        wiring = self._wiring = wire_engine(
            settings,
            redis_url=redis_url,
            state=state,
            db=db,
            clock=self._clock,
            metrics=self._metrics,
            cancel_timers=self._cancel_timers,
        )
        self._listener = self._market_listener(wiring.guard, wiring.index, wiring.publisher)
        self._scheduler = Scheduler(queue=wiring.queue, clock=self._clock, metrics=self._metrics)
        if settings.engine_processes > 1:
            self._workers = EngineWorkers(
                settings=settings,
                redis_url=redis_url,
                count=settings.engine_processes - 1,
                metrics=self._metrics,
            )
        self._recovery = Recovery(
            db=db,
            redis=state.client,
            engine=wiring.engine,
            clock=self._clock,
            settle_after_s=settings.reconcile_after_s,
        )
        return StrategyManager(
            db=db,
            state=state,
            publisher=wiring.publisher,
            scheduler=self._scheduler,
            queue=wiring.queue,
            locks=wiring.locks,
            stoploss=wiring.guard,
            clock=self._clock,
            watch_symbol=self._watch_symbol,
        )

    def _cancel_timers(self, strategy_id: str) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel(strategy_id)

    def _market_listener(
        self, guard: StopLossGuard, index: StopLossIndex, publisher: Publisher
    ) -> MarketListener | None:
        settings = self._settings
        if not settings.feed_url:
            log.warning("no ALGOPLANE_FEED_URL: prices come only from price:{SYMBOL} keys")
            return None
        assert self._state is not None
        listener = MarketListener(
            url=settings.feed_url,
            fmt=feed_format(settings.feed_format),
            guard=guard,
            index=index,
            state=self._state,
            publisher=publisher,
            max_backoff_s=settings.feed_max_backoff_s,
            stale_s=settings.feed_stale_s,
            compression=settings.feed_compression == "deflate",
            report_health=self._report_feed,
        )
        self._metrics.watch_listener(listener)
        return listener

    def _start_listener(self, listener: MarketListener) -> None:
        check_every = min(1.0, self._settings.feed_stale_s / 3)
        self._spawn("feed", listener.run())
        self._spawn("feed-staleness", _every(check_every, listener.check_staleness))
        self._spawn("stoploss-sweep", _every(5.0, listener.sweep))

    async def _report_feed(self, serving: bool) -> None:
        if self._health is not None:
            await self._health.set_detail(FEED_HEALTH_SERVICE, serving)

    def _spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        self._background.append(asyncio.create_task(coro, name=f"algoplane-{name}"))

    async def _sync_loop(self) -> None:
        rounds = 0
        while not cancel_requested():  # see server.cancellation
            await asyncio.sleep(self._settings.timer_sync_s)
            rounds += 1
            try:
                await self._sync_timers(full=rounds % _FULL_SYNC_EVERY == 0)
            except Exception as exc:  # noqa: BLE001 - DB away: the next round retries
                log.warning("timer sync failed: %s", exc)

    async def _sync_timers(self, *, full: bool = True) -> None:
        """Timers and watched symbols follow the DB's live strategies (restarts, replicas).
        Not `full`: only the strategies changed since the last round (by any replica);
        reading 100,000 live ones every few seconds cost half a core. The overlap covers
        commits that landed late and clocks that differ a little between replicas; the full
        sync every _FULL_SYNC_EVERY rounds catches anything beyond that."""
        assert self._scheduler is not None and self._db is not None
        began_us = to_micros(self._clock.now())
        if full:
            live = await self._db.list_live()
            self._scheduler.sync(live)
            self._symbols = {strategy.spec.symbol for strategy, _ in live}
        else:
            overlap_us = int((2 * self._settings.timer_sync_s + 1) * 1_000_000)
            # What this process scheduled itself comes back unchanged: skipped unbuilt, as a
            # burst of Starts would otherwise be read back and rebuilt every round.
            changed = await self._db.list_changed_since(
                self._synced_us - overlap_us, known=self._scheduler.knows
            )
            for strategy, runtime in changed:
                self._scheduler.schedule(strategy, runtime)  # no longer live: cancelled
            self._symbols |= {s.spec.symbol for s, runtime in changed if runtime.status.live}
        self._synced_us = began_us
        if self._listener is not None:
            self._listener.watch(self._symbols)

    async def _start_server(
        self, manager: StrategyManager, streams: EventStreams, verifier: TokenVerifier
    ) -> int:
        server = grpc.aio.server(
            # Outermost first: metrics see the status the error interceptor settled on.
            interceptors=[
                MetricsInterceptor(self._metrics),
                ErrorInterceptor(),
                AuthInterceptor(verifier),
                DecodeInterceptor(),
            ],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", 16 * MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
                # Dashboards sit on idle streams: clients may ping (the SDK does, every 20 s)
                # to find a dead link, and the server pings them to free the streams of
                # clients that vanished without a close.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
                ("grpc.http2.max_ping_strikes", 0),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.ping_timeout_ms", 20_000),  # what grpc-core 1.6x applies
            ],
        )
        add_strategy_service(
            StrategyServicer(
                manager=manager, streams=streams, stall_s=self._settings.stream_stall_s
            ),
            server,
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
            checks={
                "redis": self._state.ping,
                "database": self._db.ping,
                "recovery": self._recovered_check,
            },
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

    async def stop(self) -> None:
        """Health NOT_SERVING, streams end UNAVAILABLE, in-flight calls get the grace
        period, timers stop, the engine finishes the orders in hand (the rest stay pending
        for the next start or a peer), then connections, then embedded Redis."""
        await self._stop_api()
        await self._stop_pipeline()
        await close_connections(self._wiring, self._state, self._db)
        if self._embedded is not None:
            await self._embedded.stop()
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.close)
            self._metrics_server = None

    async def abandon(self) -> None:
        """After a stop that was given up on: the embedded redis-server is stopped all the
        same (SIGTERM, then SIGKILL: stop() bounds it), so the next start finds no orphan."""
        if self._embedded is not None:
            try:
                await asyncio.wait_for(self._embedded.stop(), _ABANDON_REDIS_S)
            except Exception as exc:  # noqa: BLE001 - exiting anyway; the next start copes
                log.error("could not stop the embedded redis-server: %s", exc)

    async def _stop_api(self) -> None:
        if self._health is not None:
            await self._health.shutdown()
        if self._streams is not None:
            self._streams.close()
        if self._server is not None:
            await self._server.stop(self._settings.shutdown_grace_s)

    async def _stop_pipeline(self) -> None:
        await cancel_and_wait(self._background)
        self._background = []
        if self._scheduler is not None:
            self._scheduler.stop()
        stopping = []
        if self._wiring is not None:
            stopping.append(self._wiring.engine.stop(self._settings.shutdown_grace_s))
        if self._workers is not None:
            # Before Redis and the DB go: the workers finish the orders in their hands too.
            stopping.append(self._workers.stop(self._settings.shutdown_grace_s))
        await asyncio.gather(*stopping)


async def _every(interval_s: float, step: Callable[[], Awaitable[object]]) -> None:
    """A stoppable loop whose body is one call into tested code; a failing step is logged.
    It ends on cancel(), also when a Redis call in the step swallowed it (server.cancellation)."""
    while not cancel_requested():
        await asyncio.sleep(interval_s)
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.warning("%s failed: %s", getattr(step, "__name__", step), exc)
