"""StallWatch: cuts off stream calls whose reader stopped reading.

A subscriber whose flow-control window stays full makes `context.write` wait. One watchdog
task looks at every open stream's write a few times per stall limit, instead of a timer
armed and cancelled around every message: at 20,000 deliveries a second, those timers
(created, pushed on the loop's heap, cancelled, later purged) were a measurable share of a
delivery. A write pending for longer than `stall_s` gets its call's task cancelled, and the
call ends with RESOURCE_EXHAUSTED (see `Writer.cut_off`).
"""

from __future__ import annotations

import asyncio
import time


class Writer:
    """One stream call's write state; `since` is when its pending write began, or None."""

    __slots__ = ("since", "stalled", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.since: float | None = None
        self.stalled = False

    def cut_off(self) -> bool:
        """True when the watch cancelled this call for a stalled write: the caller turns the
        CancelledError it caught into its own error. Takes the cancel back, so that nothing
        further in the call's teardown is cancelled again."""
        if not self.stalled:
            return False
        self.task.uncancel()
        return True


class StallWatch:
    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._interval = max(stall_s / 4, 0.01)
        self._writers: set[Writer] = set()
        self._task: asyncio.Task[None] | None = None

    def watch(self) -> Writer:
        """The current task's Writer; hand it back with `unwatch` when the call ends."""
        task = asyncio.current_task()
        assert task is not None
        writer = Writer(task)
        self._writers.add(writer)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="stream-stall-watch")
        return writer

    def unwatch(self, writer: Writer) -> None:
        self._writers.discard(writer)

    async def _run(self) -> None:
        # Ends when no stream is open, so it never outlives the server's calls.
        try:
            while self._writers:
                await asyncio.sleep(self._interval)
                now = time.monotonic()
                for writer in self._writers:
                    since = writer.since
                    if since is not None and not writer.stalled and now - since >= self.stall_s:
                        writer.stalled = True
                        writer.task.cancel()
        finally:
            self._task = None
