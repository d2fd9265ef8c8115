"""Per-strategy execution locks: `SET lock_state:{id} <token> NX PX <ttl>`.

A lock whose holder died expires with its TTL; a live holder extends it while a slow broker
call runs; release is compare-and-delete, so a holder whose lock already expired never frees
someone else's. A caller that finds the lock taken waits for it rather than dropping its event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from server.cancellation import cancel_requested
from server.errors import Unavailable
from server.store import keys, scripts

log = logging.getLogger(__name__)


class StrategyLocks:
    def __init__(self, *, redis: Redis, ttl_ms: int = 10_000, poll_s: float = 0.02) -> None:
        self._redis = redis
        self._ttl_ms = ttl_ms
        self._poll = poll_s
        self._release = redis.register_script(scripts.RELEASE_LOCK)
        self._extend = redis.register_script(scripts.EXTEND_LOCK)

    async def try_acquire(self, strategy_id: str) -> str | None:
        token = secrets.token_hex(16)
        taken = await self._redis.set(keys.lock_state(strategy_id), token, nx=True, px=self._ttl_ms)
        return token if taken else None

    async def acquire(self, strategy_id: str, timeout_s: float | None = None) -> str:
        """Waits until the lock is ours; Unavailable after timeout_s (None: no limit)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            token = await self.try_acquire(strategy_id)
            if token is not None:
                return token
            if deadline is not None and loop.time() >= deadline:
                raise Unavailable(f"strategy {strategy_id} is busy executing an order; retry")
            await asyncio.sleep(self._poll)

    async def release(self, strategy_id: str, token: str) -> bool:
        return bool(await self._release(keys=[keys.lock_state(strategy_id)], args=[token]))

    async def extend(self, strategy_id: str, token: str) -> bool:
        return bool(
            await self._extend(keys=[keys.lock_state(strategy_id)], args=[token, self._ttl_ms])
        )

    @contextlib.asynccontextmanager
    async def held(self, strategy_id: str, timeout_s: float | None = None) -> AsyncIterator[str]:
        """Holds the lock for the block, extending it every third of its TTL."""
        token = await self.acquire(strategy_id, timeout_s)
        keeper = asyncio.create_task(self._keep(strategy_id, token))
        try:
            yield token
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            with contextlib.suppress(Exception):
                await self.release(strategy_id, token)

    async def _keep(self, strategy_id: str, token: str) -> None:
        # Ends by cancellation; a cancel swallowed inside extend() must still end it, or
        # held() waits for it forever while it keeps the lock alive.
        while not cancel_requested():
            await asyncio.sleep(self._ttl_ms / 3000)
            try:
                if not await self.extend(strategy_id, token):
                    log.error("lock on %s was lost while held", strategy_id)
                    return
            except Exception as exc:  # noqa: BLE001 - keep trying while Redis is away
                log.warning("could not extend lock on %s: %s", strategy_id, exc)
