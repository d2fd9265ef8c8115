"""Puts committed changes where readers see them: Redis (hot state) and the tenant streams."""

from __future__ import annotations

import asyncio

from server.domain import Order, Runtime, Strategy
from server.store.codec import Flat, order_to_flat, runtime_to_flat
from server.store.keys import StreamKind
from server.store.state import RedisState

Event = tuple[StreamKind, str, Flat]  # (stream kind, tenant, fields)

# Runtimes written per round trip by the shared writes of runtime(): a recovery that restores
# every live strategy at once still sends pipelines of a bounded size.
_BATCH = 256

_Waiting = tuple[Runtime, Strategy | None, "asyncio.Future[None]"]


class Publisher:
    def __init__(self, *, state: RedisState) -> None:
        self._state = state
        # runtime() calls not yet written, and the task writing them.
        self._waiting: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None

    async def runtime(self, runtime: Runtime, strategy: Strategy | None = None) -> None:
        """Redis follows the committed DB state; the event goes out only when this snapshot
        is the newest Redis has seen, so a stream never shows an older state last.

        Calls made together share their round trips: what arrives while one batch is in
        Redis goes out with the next. Under 64 concurrent StartStrategy calls the two
        pipelines of each call (their setup, their replies, their wake-ups) cost about a
        third of the event loop. A caller that is cancelled still has its runtime written:
        the DB already holds it."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((runtime, strategy, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_waiting(), name="publisher")
        await future

    async def _write_waiting(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:_BATCH], self._waiting[_BATCH:]
                try:
                    await self._put([r for r, _, _ in batch], [s for _, s, _ in batch], [])
                except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                    _settle(batch, exc)
                except BaseException:
                    _settle(batch, asyncio.CancelledError())
                    raise
                else:
                    _settle(batch, None)
        finally:
            self._writer = None
            if self._waiting:  # only when cancelled (the server is stopping)
                waiting, self._waiting = self._waiting, []
                _settle(waiting, asyncio.CancelledError())

    async def notice(self, runtime: Runtime) -> None:
        """An event that carries news but no new state (Redis keeps no notice)."""
        await self._state.append_event("runtime", runtime.tenant, runtime_to_flat(runtime))

    async def changes(self, changes: list[tuple[Runtime | None, list[Order]]]) -> None:
        """Committed changes (each of one strategy, a runtime or None and its orders): the
        order events, then each runtime that is the newest Redis has seen and its event, in
        two round trips for all."""
        orders: list[Event] = [
            ("orders", o.tenant, order_to_flat(o)) for _, os in changes for o in os
        ]
        runtimes = [runtime for runtime, _ in changes if runtime is not None]
        await self._put(runtimes, None, orders)

    async def _put(
        self,
        runtimes: list[Runtime],
        strategies: list[Strategy | None] | None,
        events_before: list[Event],
    ) -> None:
        written = await self._state.put_runtimes(
            runtimes, events_before=events_before, strategies=strategies
        )
        fresh = [(r, flat) for r, flat in zip(runtimes, written, strict=True) if flat is not None]
        events: list[Event] = [("runtime", r.tenant, flat) for r, flat in fresh]
        # Every write keeps the live set in step, also live to live: after a Redis wipe the
        # first write of a runtime may be this one, and recovery's older snapshot then loses.
        await self._state.put_written([r for r, _ in fresh], events_after=events)


def _settle(batch: list[_Waiting], error: BaseException | None) -> None:
    for _, _, future in batch:
        if future.done():  # its caller was cancelled
            continue
        if isinstance(error, asyncio.CancelledError):
            future.cancel()
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(None)
