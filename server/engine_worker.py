"""An engine-only process, `algoplane-server engine-worker`, started by the server when
ALGOPLANE_ENGINE_PROCESSES > 1 (server.worker_supervisor). It takes events off the order
queue beside the server's own engine; it serves no API, fires no timers and reads no feed.
It ends on SIGTERM (finishing the orders in its hands within the shutdown grace), or once it
sees its server gone."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys

from server import event_loop
from server.clock import Clock, SystemClock
from server.config import Settings
from server.engine_wiring import (
    EngineWiring,
    close_connections,
    connect_state,
    open_database,
    wire_engine,
)
from server.metrics import Metrics, MetricsServer, serve_configured
from server.store.db import Database
from server.store.state import RedisState

log = logging.getLogger(__name__)

# How often the worker looks for its server; a server killed with SIGKILL cannot say so.
_ORPHAN_CHECK_S = 0.5


class EngineWorker:
    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        if not settings.redis_url:
            # An embedded Redis of its own would be a second, empty queue.
            raise ValueError("ALGOPLANE_REDIS_URL is required: the server passes its Redis")
        self._settings = settings
        self._clock = clock or SystemClock()
        self._metrics = Metrics()
        self._metrics_server: MetricsServer | None = None
        self._db: Database | None = None
        self._state: RedisState | None = None
        self._wiring: EngineWiring | None = None

    async def start(self) -> None:
        settings = self._settings
        self._metrics_server = serve_configured(self._metrics, settings)
        self._db = open_database(settings)
        self._state = connect_state(settings, settings.redis_url)
        self._wiring = wire_engine(
            settings,
            redis_url=settings.redis_url,
            state=self._state,
            db=self._db,
            clock=self._clock,
            metrics=self._metrics,
            # The server's timers: its timer sync drops a finished strategy's, and a timer
            # that fires anyway meets a state the engine skips.
            cancel_timers=lambda strategy_id: None,
        )
        await self._wiring.engine.start()

    async def stop(self) -> None:
        if self._wiring is not None:
            await self._wiring.engine.stop(self._settings.shutdown_grace_s)
        await close_connections(self._wiring, self._state, self._db)
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.close)


async def run(settings: Settings, *, parent_pid: int, index: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        worker = EngineWorker(settings)
    except ValueError as exc:
        print(f"algoplane engine worker: {exc}", file=sys.stderr)
        return 2
    try:
        await worker.start()
    except Exception as exc:  # noqa: BLE001 - any start failure is reported in one line
        print(f"algoplane engine worker {index}: cannot start: {exc}", file=sys.stderr)
        with contextlib.suppress(Exception):
            await worker.stop()
        return 1
    gc.freeze()  # as the server does: startup's objects out of the collector's walks
    log.info(
        "engine worker %d taking orders (pid %d, %s)", index, os.getpid(), event_loop.running()
    )
    orphaned = asyncio.create_task(_server_gone(parent_pid))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({orphaned, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if orphaned.done():
        log.warning("engine worker %d: its server (pid %d) is gone; stopping", index, parent_pid)
    for task in (orphaned, stopping):
        task.cancel()
    await worker.stop()
    return 0


async def _server_gone(parent_pid: int) -> None:
    """Returns once this process's parent is no longer the server (it was re-parented)."""
    while True:
        if os.getppid() != parent_pid:
            return
        await asyncio.sleep(_ORPHAN_CHECK_S)
