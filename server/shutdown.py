"""A bounded shutdown: a stop that does not finish in time, or that a second signal cuts
short, ends with the tasks still running in the log, so a hang is a visible failure instead
of a process that has to be killed by hand (and whose cause nobody saw)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import CoroutineType, FrameType, GeneratorType
from typing import Any

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent

# Past the two grace periods (in-flight calls, then the orders in hand), what is left to do
# (stream readers, connections, the embedded redis-server's AOF) takes seconds, not half a
# minute.
_DEADLINE_BEYOND_GRACE_S = 30.0


def shutdown_deadline(grace_s: float) -> float:
    return 2 * grace_s + _DEADLINE_BEYOND_GRACE_S


async def stop_within(
    stop: Callable[[], Awaitable[None]], deadline_s: float, again: asyncio.Event
) -> bool:
    """Runs `stop()`; True once it finished. False, with every task still running logged
    (where each waits), when `deadline_s` passed first or `again` was set (a second signal):
    the caller then gives up on the rest."""
    stopping = asyncio.ensure_future(stop())
    forced = asyncio.ensure_future(again.wait())
    try:
        await asyncio.wait(
            {stopping, forced}, timeout=deadline_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        forced.cancel()
    if stopping.done():
        stopping.result()  # a failing stop is the caller's to report
        return True
    why = "a second signal came" if again.is_set() else f"it took over {deadline_s:g}s"
    found = (_where(task) for task in asyncio.all_tasks() if task is not stopping)
    waiting = [where for where in found if where is not None]
    log.error(
        "shutdown gave up (%s); still running: %s",
        why,
        "; ".join(sorted(waiting)) or "nothing but the stop itself",
    )
    log.error("shutdown gave up; the stop itself was at: %s", _where(stopping))
    stopping.cancel()
    return False


def _where(task: asyncio.Future[Any]) -> str | None:
    """`name: our function (file:line) > the innermost one` of where a running task waits."""
    if not isinstance(task, asyncio.Task) or task.done() or task is asyncio.current_task():
        return None
    frames: list[FrameType] = []
    awaiting: Any = task.get_coro()
    while True:
        if isinstance(awaiting, CoroutineType):
            frame, inner = awaiting.cr_frame, awaiting.cr_await
        elif isinstance(awaiting, GeneratorType):  # a Future's __await__, for one
            frame, inner = awaiting.gi_frame, awaiting.gi_yieldfrom
        else:
            break
        if frame is None:
            break
        frames.append(frame)
        awaiting = inner
    ours = [frame for frame in frames if Path(frame.f_code.co_filename).is_relative_to(_PACKAGE)]
    shown = [*ours[-1:], *frames[-1:]] if ours and ours[-1] is not frames[-1] else frames[-1:]
    where = " > ".join(map(_frame, shown))
    return f"{task.get_name()}: {where}" if where else task.get_name()


def _frame(frame: FrameType) -> str:
    return f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
