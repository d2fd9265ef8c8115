"""Cancellation that a library swallowed.

On Python 3.11, `asyncio.wait_for` returns the inner result and drops the caller's cancel()
when both land in the same loop step (fixed in 3.12). redis-py wraps every socket write in
it whenever a socket timeout is set, so a task cancelled during a Redis command may see the
command return normally instead of CancelledError. A loop that ends only by being cancelled
(a lock keeper, a background step) would then run forever and its canceller, awaiting it,
would hang. Such loops check `cancel_requested()` after each step: the request is still
counted on the task even when the exception was swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


def cancel_requested() -> bool:
    """True once the current task has been asked to stop (cancel() not undone)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancels every task, then waits for each to end; what they raise on the way out is
    theirs to log (a cancelled background loop has nothing left to report)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
