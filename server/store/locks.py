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
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

from server.cancellation import cancel_requested
from server.errors import Unavailable
from server.store import keys, scripts
from server.store.connection import execute, queue_script

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

    def request(self, pipe: Pipeline, strategy_id: str) -> str:
        """try_acquire() as a command added to the caller's pipeline, so a lock goes out in
        a round trip the caller makes anyway; returns the token, and the command's reply
        says whether the lock was taken."""
        token = secrets.token_hex(16)
        pipe.set(keys.lock_state(strategy_id), token, nx=True, px=self._ttl_ms)
        return token

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

    @contextlib.asynccontextmanager
    async def held(self, strategy_id: str, timeout_s: float | None = None) -> AsyncIterator[str]:
        """Waits for the lock (see acquire), holds it for the block, extending it every
        third of its TTL."""
        token = await self.acquire(strategy_id, timeout_s)
        async with self._holding({strategy_id: token}):
            yield token

    async def try_acquire_all(self, strategy_ids: list[str]) -> dict[str, str]:
        """try_acquire() for many strategies in one round trip: the tokens of those taken."""
        # One random part for the batch: a token must be unique to its holder, and an
        # os.urandom call per lock was a visible share of a burst.
        batch = secrets.token_hex(16)
        tokens = {sid: f"{batch}:{n}" for n, sid in enumerate(strategy_ids)}
        async with self._redis.pipeline(transaction=False) as pipe:
            for strategy_id, token in tokens.items():
                pipe.set(keys.lock_state(strategy_id), token, nx=True, px=self._ttl_ms)
            taken = await execute(pipe)
        return {sid: token for (sid, token), ok in zip(tokens.items(), taken, strict=True) if ok}

    async def release_all(self, tokens: dict[str, str]) -> None:
        """release() for many locks in one round trip."""
        await self._each(self._release, tokens, [])

    async def extend_all(self, tokens: dict[str, str]) -> list[str]:
        """extend() for many locks in one round trip; returns the strategies whose lock was
        lost."""
        kept = await self._each(self._extend, tokens, [self._ttl_ms])
        return [sid for sid, ok in zip(tokens, kept, strict=True) if not ok]

    async def _each(
        self, script: AsyncScript, tokens: dict[str, str], extra: list[int]
    ) -> list[Any]:
        if not tokens:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for strategy_id, token in tokens.items():
                queue_script(pipe, script, [keys.lock_state(strategy_id)], [token, *extra])
            return list(await execute(pipe))

    @contextlib.asynccontextmanager
    async def held_where_free(
        self, strategy_ids: list[str], taken: dict[str, str] | None = None
    ) -> AsyncIterator[dict[str, str]]:
        """Takes, without waiting, every lock that is free; holds them for the block as
        held() does; yields the tokens of the locks taken. `taken`: locks the caller took
        already (see request()), held and released here with the others."""
        tokens = dict(taken or {})
        rest = [sid for sid in strategy_ids if sid not in tokens]
        try:
            if rest:
                tokens |= await self.try_acquire_all(rest)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.release_all(tokens)
            raise
        async with self._holding(tokens):
            yield tokens

    @contextlib.asynccontextmanager
    async def _holding(self, tokens: dict[str, str]) -> AsyncIterator[None]:
        """Keeps the locks extended for the block, then releases them."""
        keeper = asyncio.create_task(self._keep(tokens))
        try:
            yield
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            with contextlib.suppress(Exception):
                await self.release_all(tokens)

    async def _keep(self, tokens: dict[str, str]) -> None:
        # Ends by cancellation; a cancel swallowed inside extend_all() must still end it, or
        # _holding() waits for it forever while it keeps the locks alive.
        while not cancel_requested() and tokens:
            await asyncio.sleep(self._ttl_ms / 3000)
            try:
                for strategy_id in await self.extend_all(tokens):
                    log.error("lock on %s was lost while held", strategy_id)
            except Exception as exc:  # noqa: BLE001 - keep trying while Redis is away
                log.warning("could not extend %d locks: %s", len(tokens), exc)
