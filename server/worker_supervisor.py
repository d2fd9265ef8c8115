"""The server's engine-only worker processes (`ALGOPLANE_ENGINE_PROCESSES` - 1 of them):
started once the server has recovered, restarted when one dies, stopped with the server.

Why processes: a burst of orders is bound by one interpreter lock (the loop and the SQLite
thread take turns at it) while the machine's other core idles; a second process brings a
second lock. The workers join the same consumer group as the server's own engine, so the
guarantees hold as they do between replicas: a lock per strategy, one client order id per
intent, and events a dead worker held taken over by the others after
`ALGOPLANE_EXEC_CLAIM_IDLE_S`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path

from server.cancellation import cancel_and_wait
from server.child_process import ChildProcess
from server.config import Settings
from server.metrics import Metrics

log = logging.getLogger(__name__)

_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0
# A worker that ran this long before it died is restarted after the first backoff again.
_STABLE_S = 60.0
_ROOT = str(Path(__file__).resolve().parent.parent)
# Beyond the shutdown grace, how long a worker may take to close its connections.
_CLOSE_S = 5.0


def worker_env(settings: Settings, *, redis_url: str, index: int) -> dict[str, str]:
    """The server's settings as the worker's environment, whichever way the server got
    them (environment, or a Settings built in code): the worker reads only its environment.
    The worker uses the server's Redis (embedded or not) and database, never its own, and
    serves its metrics on the server's metrics port + `index` (0 stays 0: any free port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALGOPLANE_")}
    for name, value in settings.model_dump().items():
        if name == "jwt_secret":  # the worker serves no calls
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        env[f"ALGOPLANE_{name.upper()}"] = text
    env["ALGOPLANE_REDIS_URL"] = redis_url
    env["ALGOPLANE_DATABASE_URL"] = settings.effective_database_url
    env["ALGOPLANE_DATA_DIR"] = str(settings.data_dir.resolve())
    env["ALGOPLANE_ENGINE_PROCESSES"] = "1"
    # `-m server` finds this very code, whatever the server's working directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (_ROOT, os.environ.get("PYTHONPATH"))))
    if settings.metrics_addr:
        host, port = settings.metrics_addr.rsplit(":", 1)
        env["ALGOPLANE_METRICS_ADDR"] = f"{host}:{int(port) + index if int(port) else 0}"
    return env


class EngineWorkers:
    def __init__(
        self,
        *,
        settings: Settings,
        redis_url: str,
        count: int,
        metrics: Metrics,
        python: str = sys.executable,
    ) -> None:
        self._settings = settings
        self._redis_url = redis_url
        self._count = count
        self._metrics = metrics
        self._python = python
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._processes: dict[int, ChildProcess] = {}

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._keep(index), name=f"algoplane-engine-worker-{index}")
            for index in range(1, self._count + 1)
        ]

    async def _keep(self, index: int) -> None:
        backoff = _FIRST_BACKOFF_S
        env = worker_env(self._settings, redis_url=self._redis_url, index=index)
        while not self._stopping:
            began = time.monotonic()
            try:
                process = ChildProcess.start(
                    [
                        *(self._python, "-m", "server", "engine-worker"),
                        *("--parent-pid", str(os.getpid()), "--index", str(index)),
                    ],
                    env=env,
                    inherit_stderr=True,  # its log lines go where the server's go
                    # Out of the terminal's process group: Ctrl-C reaches the server alone,
                    # which stops its workers in order (a worker also ends once it sees its
                    # server gone).
                    start_new_session=True,
                )
            except OSError as exc:
                log.error("cannot start engine worker %d: %s", index, exc)
            else:
                self._processes[index] = process
                self._metrics.engine_workers.set(len(self._processes))
                if self._stopping:  # stop() began while this one was starting
                    process.terminate()
                log.info("engine worker %d started (pid %d)", index, process.pid)
                code = await process.wait()
                del self._processes[index]
                self._metrics.engine_workers.set(len(self._processes))
                if self._stopping:
                    return
                log.warning(
                    "engine worker %d (pid %d) exited with code %s; the events it held are"
                    " taken over after ALGOPLANE_EXEC_CLAIM_IDLE_S",
                    index,
                    process.pid,
                    code,
                )
            if time.monotonic() - began > _STABLE_S:
                backoff = _FIRST_BACKOFF_S
            log.info("restarting engine worker %d in %.1fs", index, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM: each worker finishes the orders in its hands within grace_s (the rest
        stay pending for the other engines), then closes; SIGKILL after that."""
        self._stopping = True
        processes = list(self._processes.values())
        for process in processes:
            process.terminate()
        if processes:
            _, late = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in processes], timeout=grace_s + _CLOSE_S
            )
            if late:
                log.warning("%d engine worker(s) did not stop in time: killed", len(late))
                for process in processes:
                    process.kill()  # nothing once it has exited
                await asyncio.gather(*(p.wait() for p in processes))
        await cancel_and_wait(self._tasks)
        self._tasks = []
