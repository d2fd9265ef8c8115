"""The execution engine, the parts it owns and the connections it runs on, opened and wired
the same way in the server and in the engine-only worker processes it starts
(`ALGOPLANE_ENGINE_PROCESSES`)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis

from server.brokers.base import Broker
from server.brokers.metered import MeteredBroker
from server.brokers.paper import PaperBroker
from server.clock import Clock
from server.config import Settings
from server.engine import EngineConfig, ExecutionEngine
from server.metrics import Metrics
from server.publisher import Publisher
from server.stoploss import StopLossGuard
from server.store.db import Database
from server.store.locks import StrategyLocks
from server.store.queue import OrderQueue
from server.store.state import RedisState, connect
from server.store.stoploss import StopLossIndex


@dataclass(frozen=True, slots=True)
class EngineWiring:
    """What the engine was built from; the server's API and listener share some of it."""

    engine: ExecutionEngine
    queue: OrderQueue
    locks: StrategyLocks
    publisher: Publisher
    index: StopLossIndex
    guard: StopLossGuard
    # The workers' own pool (they block in XREADGROUP); see close_connections.
    engine_redis: Redis


def open_database(settings: Settings) -> Database:
    return Database(settings.effective_database_url, timeout_s=settings.db_timeout_s)


def connect_state(settings: Settings, redis_url: str) -> RedisState:
    return RedisState(
        client=connect(redis_url, timeout_s=settings.redis_timeout_s),
        # Its XREADs block for up to a second (EventStreams): a timeout above that.
        stream_client=connect(redis_url, timeout_s=settings.redis_timeout_s + 2),
        stream_maxlen=settings.stream_maxlen,
    )


async def close_connections(
    wiring: EngineWiring | None, state: RedisState | None, db: Database | None
) -> None:
    """Once the engine has stopped: its pool, then Redis, then the DB (whichever opened)."""
    if wiring is not None:
        await wiring.guard.stop()
        await wiring.engine_redis.aclose()
    if state is not None:
        await state.close()
    if db is not None:
        await db.close()


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        concurrency=settings.exec_concurrency,
        broker_attempts=settings.broker_attempts,
        broker_timeout_s=settings.broker_timeout_s,
        buy_grace_s=settings.buy_grace_s,
        claim_idle_ms=int(settings.exec_claim_idle_s * 1000),
    )


def wire_engine(
    settings: Settings,
    *,
    redis_url: str,
    state: RedisState,
    db: Database,
    clock: Clock,
    metrics: Metrics,
    cancel_timers: Callable[[str], None],
) -> EngineWiring:
    """Built, not started. Exits the guard queues are taken by this engine at once."""
    config = engine_config(settings)
    # Workers block in XREADGROUP: their own pool, with a timeout above the block time.
    engine_redis = connect(redis_url, timeout_s=settings.redis_timeout_s + config.block_ms / 1000)
    queue = OrderQueue(redis=engine_redis, consumer=consumer_name())
    locks = StrategyLocks(redis=state.client, ttl_ms=settings.lock_ttl_ms)
    publisher = Publisher(state=state)
    index = StopLossIndex(redis=state.client)
    guard = StopLossGuard(index=index, queue=queue, state=state, clock=clock)
    engine = ExecutionEngine(
        queue=queue,
        locks=locks,
        db=db,
        publisher=publisher,
        broker=broker(settings, state, metrics),
        stoploss=guard,
        clock=clock,
        config=config,
        cancel_timers=cancel_timers,
        metrics=metrics,
    )
    guard.submit_with(engine.submit_exit, engine.exits_ended)
    return EngineWiring(engine, queue, locks, publisher, index, guard, engine_redis)


def broker(settings: Settings, state: RedisState, metrics: Metrics) -> Broker:
    paper = PaperBroker(
        redis=state.client,
        latency_s=settings.paper_latency_ms / 1000,
        timeout_rate=settings.paper_timeout_rate,
        error_rate=settings.paper_error_rate,
    )
    return MeteredBroker(broker=paper, metrics=metrics)


def consumer_name() -> str:
    """Unique per process, so the consumer group tells whose pending events are whose."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
