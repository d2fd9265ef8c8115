"""Puts committed changes where readers see them: Redis (hot state) and the tenant streams."""

from __future__ import annotations

from server.domain import Order, Runtime, Strategy
from server.store.codec import order_to_flat, runtime_to_flat
from server.store.state import RedisState


class Publisher:
    def __init__(self, *, state: RedisState) -> None:
        self._state = state

    async def runtime(self, runtime: Runtime, strategy: Strategy | None = None) -> None:
        """Redis follows the committed DB state; the event goes out only when this snapshot
        is the newest Redis has seen, so a stream never shows an older state last."""
        if await self._state.put_runtime(runtime, strategy):
            await self._state.append_event("runtime", runtime.tenant, runtime_to_flat(runtime))

    async def notice(self, runtime: Runtime) -> None:
        """An event that carries news but no new state (Redis keeps no notice)."""
        await self._state.append_event("runtime", runtime.tenant, runtime_to_flat(runtime))

    async def order(self, order: Order) -> None:
        await self._state.append_event("orders", order.tenant, order_to_flat(order))
