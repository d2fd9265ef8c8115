"""StrategyManager: the use cases behind the API (seed 3.1).

Every change commits to the DB first, then lands in Redis (versioned, so a late writer can
not undo a newer state), then goes out as an event on the tenant's runtime stream.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from server.clock import Clock
from server.domain import (
    Intent,
    Order,
    Position,
    Runtime,
    Strategy,
    StrategySpec,
    StrategyStatus,
    client_order_id,
    format_decimal,
    is_strategy_id,
    new_strategy_id,
    plan_stop,
    require_future_buy,
    start_runtime,
    validate_request_id,
)
from server.errors import InvalidArgument, Unavailable, strategy_not_found
from server.publisher import Publisher
from server.scheduler import Scheduler
from server.stoploss import StopLossGuard
from server.store.codec import (
    runtime_from_flat,
    runtime_to_flat,
    strategy_from_flat,
    strategy_to_flat,
    to_micros,
)
from server.store.db import Database, IdempotencyConflict, IdempotencyKey, StoredResponse
from server.store.locks import StrategyLocks
from server.store.queue import OrderEvent, OrderQueue
from server.store.state import RedisState

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50


@dataclass(frozen=True, slots=True)
class Page:
    strategies: list[Strategy]
    next_page_token: str


class StrategyManager:
    def __init__(
        self,
        *,
        db: Database,
        state: RedisState,
        publisher: Publisher,
        scheduler: Scheduler,
        queue: OrderQueue,
        locks: StrategyLocks,
        stoploss: StopLossGuard,
        clock: Clock,
        watch_symbol: Callable[[str], None] = lambda _symbol: None,
        lock_wait_s: float = 15.0,
        exit_wait_s: float = 5.0,
    ) -> None:
        self._db = db
        self._state = state
        self._publisher = publisher
        self._scheduler = scheduler
        self._queue = queue
        self._locks = locks
        self._stoploss = stoploss
        self._watch_symbol = watch_symbol
        self._clock = clock
        self._lock_wait_s = lock_wait_s
        self._exit_wait_s = exit_wait_s
        self._trading = asyncio.Event()

    def open_for_trading(self) -> None:
        """Recovery is done: Start and Stop may act from now on."""
        self._trading.set()

    def _require_trading(self) -> None:
        if not self._trading.is_set():
            raise Unavailable(
                "the server is recovering (rebuilding state, settling orders); "
                "reads work, Start/Stop do once recovery is done"
            )

    async def create(self, tenant: str, spec: StrategySpec, request_id: str) -> Strategy:
        validate_request_id(request_id)
        key = _key(request_id, "create", _spec_fingerprint(spec))
        if key and (replayed := await self._replay(tenant, key)) is not None:
            return strategy_from_flat(replayed)
        require_future_buy(spec, self._clock.now())
        strategy, runtime = self._new(tenant, spec, StrategyStatus.CREATED)
        try:
            await self._db.insert_strategy(strategy, runtime, key, strategy_to_flat(strategy))
        except IdempotencyConflict:
            return strategy_from_flat(await self._replay_after_race(tenant, key))
        return strategy

    async def get(self, tenant: str, strategy_id: str) -> Strategy:
        strategy, _ = await self._load(tenant, strategy_id)
        return strategy

    async def list_page(
        self, tenant: str, status: StrategyStatus | None, page_size: int, page_token: str
    ) -> Page:
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after_id = _decode_page_token(page_token, status)
        rows = await self._db.list_strategies(tenant, status, after_id, limit + 1)
        page, more = rows[:limit], len(rows) > limit
        token = _encode_page_token(page[-1].id, status) if more else ""
        return Page(page, token)

    async def start_stored(self, tenant: str, strategy_id: str, request_id: str) -> Runtime:
        validate_request_id(request_id)
        self._require_trading()
        key = _key(request_id, "start", strategy_id)
        if not is_strategy_id(strategy_id):
            if key:  # a request_id used before for another request is named first
                await self._replay(tenant, key)
            raise strategy_not_found(strategy_id)
        now = self._clock.now()

        def change(strategy: Strategy, runtime: Runtime) -> Runtime:
            return start_runtime(strategy, runtime, now)

        try:
            if key is None:
                strategy, runtime, _ = await self._db.transition(tenant, strategy_id, change)
            else:
                # A stored response for this request_id comes back instead (a retry).
                outcome = await self._db.transition_once(tenant, strategy_id, change, key)
                if isinstance(outcome, StoredResponse):
                    replayed = _checked(outcome, key)
                    return await self._ensure_hot(tenant, runtime_from_flat(replayed))
                strategy, runtime, _ = outcome
        except IdempotencyConflict:
            replayed = await self._replay_after_race(tenant, key)
            return await self._ensure_hot(tenant, runtime_from_flat(replayed))
        await self._went_live(runtime, strategy)
        return runtime

    async def start_new(self, tenant: str, spec: StrategySpec, request_id: str) -> Runtime:
        validate_request_id(request_id)
        self._require_trading()
        key = _key(request_id, "start", _spec_fingerprint(spec))
        if key and (replayed := await self._replay(tenant, key)) is not None:
            return await self._ensure_hot(tenant, runtime_from_flat(replayed))
        require_future_buy(spec, self._clock.now())
        created, blank = self._new(tenant, spec, StrategyStatus.CREATED)
        runtime = start_runtime(created, blank, self._clock.now())
        strategy = Strategy(
            created.id, tenant, spec, runtime.status, created.created_at, runtime.updated_at
        )
        try:
            await self._db.insert_strategy(strategy, runtime, key, runtime_to_flat(runtime))
        except IdempotencyConflict:
            replayed = await self._replay_after_race(tenant, key)
            return await self._ensure_hot(tenant, runtime_from_flat(replayed))
        await self._went_live(runtime, strategy)
        return runtime

    async def stop(self, tenant: str, strategy_id: str, keep_position: bool) -> Runtime:
        """Cancels the timers; an open position is exited first (an exit-priority SELL)
        unless keep_position. Runs under the strategy's lock, so it waits for an order in
        flight instead of racing it; with an exit it waits up to exit_wait_s for the result."""
        await self._load(tenant, strategy_id)
        self._require_trading()
        async with self._locks.held(strategy_id, timeout_s=self._lock_wait_s):
            strategy, current = await self._db.get_strategy(tenant, strategy_id)
            plan = plan_stop(current, keep_position, self._clock.now())
            self._scheduler.cancel(strategy_id)
            log.info(
                "strategy %s stopping (%s)",
                strategy_id,
                "exiting the position" if plan.exit_position else "no exit",
                extra={"tenant": tenant, "strategy_id": strategy_id},
            )
            if plan.exit_position:
                await self._enqueue_exit(strategy, current)
            elif plan.runtime != current:
                now = self._clock.now()
                strategy, current, _ = await self._db.transition(
                    tenant, strategy_id, lambda _s, r: plan_stop(r, keep_position, now).runtime
                )
                await self._publish(current, strategy)
                await self._stoploss.disarm(strategy)
                return current
            else:
                return current
        return await self._await_exit(tenant, strategy_id, current)

    async def _enqueue_exit(self, strategy: Strategy, runtime: Runtime) -> None:
        """A new client order id per exit attempt of a run: a Stop retrying a failed exit
        must not get the failed order back from a broker that dedupes."""
        prefix = client_order_id(strategy.id, runtime.run, Intent.EXIT, 0)[:-1]
        orders = await self._db.list_orders(strategy.tenant, strategy.id)
        seq = 1 + sum(1 for order in orders if order.id.startswith(prefix))
        now = self._clock.now()
        event = OrderEvent(
            strategy_id=strategy.id,
            tenant=strategy.tenant,
            run=runtime.run,
            intent=Intent.EXIT,
            order_id=client_order_id(strategy.id, runtime.run, Intent.EXIT, seq),
            due_at_us=to_micros(now),
            fired_at_us=to_micros(now),
        )
        await self._queue.enqueue(event)  # None: this exit was queued already

    async def _await_exit(self, tenant: str, strategy_id: str, before: Runtime) -> Runtime:
        deadline = asyncio.get_running_loop().time() + self._exit_wait_s
        latest = before
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            latest = await self.runtime(tenant, strategy_id)
            if latest.version != before.version and latest.position is not Position.BOUGHT:
                return latest
            if latest.status is not before.status:
                return latest
        return latest

    async def runtime(self, tenant: str, strategy_id: str) -> Runtime:
        """The hot runtime from Redis; the DB's for strategies that are not loaded."""
        if not is_strategy_id(strategy_id):
            raise strategy_not_found(strategy_id)
        hot = await self._state.get_runtime(strategy_id)
        if hot is not None:
            if hot.tenant != tenant:
                raise strategy_not_found(strategy_id)
            if hot.status.live:  # the last tick, not only the last fill
                price = await self._state.last_price(hot.symbol)
                return replace(hot, last_price=price) if price is not None else hot
            return hot
        _, runtime = await self._load(tenant, strategy_id)
        return runtime

    async def orders(self, tenant: str, strategy_id: str) -> list[Order]:
        if strategy_id:
            await self._load(tenant, strategy_id)
        return await self._db.list_orders(tenant, strategy_id)

    async def check_owner(self, tenant: str, strategy_id: str) -> None:
        """NOT_FOUND unless the strategy exists and belongs to the tenant."""
        await self._load(tenant, strategy_id)

    async def _load(self, tenant: str, strategy_id: str) -> tuple[Strategy, Runtime]:
        if not is_strategy_id(strategy_id):
            raise strategy_not_found(strategy_id)
        return await self._db.get_strategy(tenant, strategy_id)

    def _new(
        self, tenant: str, spec: StrategySpec, status: StrategyStatus
    ) -> tuple[Strategy, Runtime]:
        now = self._clock.now()
        strategy = Strategy(new_strategy_id(now), tenant, spec, status, now, now)
        runtime = Runtime(
            strategy_id=strategy.id,
            tenant=tenant,
            symbol=spec.symbol,
            status=status,
            position=Position.NONE,
            version=0,
            run=0,
            updated_at=now,
        )
        return strategy, runtime

    async def _went_live(self, runtime: Runtime, strategy: Strategy) -> None:
        await self._publish(runtime, strategy)
        self._scheduler.schedule(strategy, runtime)
        self._watch_symbol(strategy.spec.symbol)
        spec = strategy.spec
        log.info(
            "strategy %s started: %s x%d, buy %s, sell %s, stop-loss %s",
            strategy.id,
            spec.symbol,
            spec.quantity,
            spec.buy_time.isoformat(),
            spec.sell_time.isoformat(),
            format_decimal(spec.stop_loss),
            extra={"tenant": strategy.tenant, "strategy_id": strategy.id},
        )

    async def _publish(self, runtime: Runtime, strategy: Strategy) -> None:
        await self._publisher.runtime(runtime, strategy)

    async def _ensure_hot(self, tenant: str, replayed: Runtime) -> Runtime:
        """A replayed Start makes sure its effect reached Redis (the first call may have
        died between the DB commit and Redis)."""
        strategy, current = await self._db.get_strategy(tenant, replayed.strategy_id)
        if current.status.live:
            await self._publish(current, strategy)
            self._scheduler.schedule(strategy, current)
        return replayed

    async def _replay(self, tenant: str, key: IdempotencyKey) -> dict[str, str] | None:
        stored = await self._db.get_response(tenant, key.request_id)
        return _checked(stored, key) if stored is not None else None

    async def _replay_after_race(self, tenant: str, key: IdempotencyKey | None) -> dict[str, str]:
        replayed = await self._replay(tenant, key) if key else None
        if replayed is None:  # pragma: no cover - a conflict implies a stored response
            raise RuntimeError("idempotency conflict without a stored response")
        return replayed


def _checked(stored: StoredResponse, key: IdempotencyKey) -> dict[str, str]:
    """The stored response's body, when it was stored for this same request."""
    if stored.fingerprint != key.fingerprint:
        raise InvalidArgument(
            "request_id", "was already used by this tenant for a different request"
        )
    return stored.body


def _key(request_id: str, method: str, body: str) -> IdempotencyKey | None:
    if not request_id:
        return None
    digest = hashlib.sha256(f"{method}\n{body}".encode()).hexdigest()
    return IdempotencyKey(request_id, digest)


def _spec_fingerprint(spec: StrategySpec) -> str:
    return json.dumps(
        [
            spec.symbol,
            spec.quantity,
            to_micros(spec.buy_time),
            to_micros(spec.sell_time),
            format_decimal(spec.stop_loss),
        ]
    )


def _encode_page_token(last_id: str, status: StrategyStatus | None) -> str:
    raw = json.dumps({"after": last_id, "status": status.value if status else ""})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_page_token(token: str, status: StrategyStatus | None) -> str:
    if not token:
        return ""
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        after, token_status = str(data["after"]), str(data["status"])
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeError, RecursionError):
        raise InvalidArgument("page_token", "is not a token this API returned") from None
    if not is_strategy_id(after):
        raise InvalidArgument("page_token", "is not a token this API returned")
    if token_status != (status.value if status else ""):
        raise InvalidArgument("page_token", "was issued for a different status filter")
    return after
