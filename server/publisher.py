"""Puts committed changes where readers see them: Redis (hot state) and the tenant streams."""

from __future__ import annotations

from server.domain import Order, Runtime, Strategy
from server.store.codec import Flat, order_to_flat, runtime_to_flat
from server.store.keys import StreamKind
from server.store.state import RedisState

Event = tuple[StreamKind, str, Flat]  # (stream kind, tenant, fields)


class Publisher:
    def __init__(self, *, state: RedisState) -> None:
        self._state = state

    async def runtime(self, runtime: Runtime, strategy: Strategy | None = None) -> None:
        """Redis follows the committed DB state; the event goes out only when this snapshot
        is the newest Redis has seen, so a stream never shows an older state last."""
        config = [strategy] if strategy is not None else None
        [written] = await self._state.put_runtimes([runtime], events_before=[], strategies=config)
        if written is not None:
            event: Event = ("runtime", runtime.tenant, written)
            await self._state.put_written([runtime], events_after=[event])

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
        written = await self._state.put_runtimes(runtimes, events_before=orders)
        fresh = [(r, flat) for r, flat in zip(runtimes, written, strict=True) if flat is not None]
        events: list[Event] = [("runtime", r.tenant, flat) for r, flat in fresh]
        # Every write keeps the live set in step, also live to live: after a Redis wipe the
        # first write of a runtime may be this one, and recovery's older snapshot then loses.
        await self._state.put_written([r for r, _ in fresh], events_after=events)
