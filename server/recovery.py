"""Recovery: Redis rebuilt from the DB, and in-flight orders settled with the broker.

On start, before the server trades: every live strategy's `strategy:{id}`, `runtime:{id}` and
symbol set membership are written back (versioned, so a Redis that kept its data is left as
is), positions are re-armed in the stop-loss index (re-checked against the last price), and
every order whose intent is committed but not final is settled through the engine (broker
asked first). While running, the same runs again whenever Redis is found empty, and the
reconcile step keeps settling orders left UNKNOWN or SUBMITTED.
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta

from redis.asyncio import Redis

from server.clock import Clock
from server.engine import ExecutionEngine
from server.store import keys
from server.store.codec import to_micros
from server.store.db import Database

log = logging.getLogger(__name__)


class Recovery:
    def __init__(
        self,
        *,
        db: Database,
        redis: Redis,
        engine: ExecutionEngine,
        clock: Clock,
        settle_after_s: float,
    ) -> None:
        self._db = db
        self._redis = redis
        self._engine = engine
        self._clock = clock
        self._settle_after = timedelta(seconds=settle_after_s)

    async def recover(self) -> None:
        """Everything a start needs before trading: hot state, then in-flight orders."""
        await self.rebuild()
        await self.reconcile(everything=True)

    async def rebuild(self) -> int:
        """Writes every live strategy back into Redis; returns how many."""
        live = await self._db.list_live()
        for strategy, runtime in live:
            await self._engine.restore_hot(strategy, runtime)
        await self._redis.set(keys.STATE_EPOCH, secrets.token_hex(8))
        log.info("hot state rebuilt from the DB: %d live strategies", len(live))
        return len(live)

    async def rebuild_if_lost(self) -> bool:
        """Rebuilds when Redis has lost its data while we ran; True when it did."""
        if await self._redis.exists(keys.STATE_EPOCH):
            return False
        log.warning("Redis has lost its data: rebuilding from the DB")
        await self.rebuild()
        await self.reconcile(everything=True)
        return True

    async def reconcile(self, *, everything: bool = False) -> int:
        """Settles unfinished orders (all of them, or those quiet for settle_after_s)."""
        cutoff = self._clock.now() + (timedelta(0) if everything else -self._settle_after)
        unfinished = await self._db.list_unfinished_orders(to_micros(cutoff) + 1)
        for order, run in unfinished:
            log.warning("settling %s order %s with the broker", order.status.value, order.id)
            try:
                await self._engine.reconcile(order, run)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("could not settle %s yet: %s", order.id, exc)
        return len(unfinished)
