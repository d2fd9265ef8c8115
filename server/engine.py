"""ExecutionEngine: queue -> lock -> intent in the DB -> broker -> DB -> Redis and streams.

Each event runs under its strategy's lock. Before any broker call the order's intent is
committed with its deterministic client order id; an ambiguous broker failure is followed by
`get_order` before the same id is placed again. A redelivered event whose order is final is a
true duplicate and is dropped; an event that is not valid in the strategy's state is recorded
as SKIPPED; an event that arrives too early (SELL before its BUY happened) waits.

Workers take events up to 64 at a time; the plain ones (first delivery, lock free, nothing in
the order log yet, ready to go) run through the batch lane (`server/engine_batch.py`), which
does each of these steps once for the whole batch. Every other event runs alone through
`handle`, the per-event path, which is also what the batch lane falls back to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum

from redis.asyncio.client import Pipeline

from server.brokers.base import (
    AmbiguousBrokerError,
    Broker,
    BrokerOrder,
    BrokerOrderStatus,
    Side,
    check_reply,
)
from server.cancellation import cancel_and_wait, cancel_requested
from server.clock import Clock
from server.domain import (
    Intent,
    Order,
    OrderStatus,
    Position,
    Runtime,
    Strategy,
    StrategyStatus,
    order_filled,
    order_submitted,
    parse_client_order_id,
    refusal,
    strategy_failed,
)
from server.engine_batch import BatchLane
from server.logs import bind as bind_log_context
from server.logs import reset as reset_log_context
from server.metrics import Metrics
from server.publisher import Publisher
from server.stoploss import StopLossGuard
from server.store.codec import to_micros
from server.store.db import Database
from server.store.locks import StrategyLocks
from server.store.queue import QUEUE_NAMES, Delivery, OrderEvent, OrderQueue

log = logging.getLogger(__name__)

# Exits run at once by the process that queued them, at most this many at a time; beyond
# that the exits worker takes them, in batches.
_EXITS_RUN_HERE = 8


@dataclass(frozen=True, slots=True)
class EngineConfig:
    # Events in hand at once, taken `batch_size` at a time by each of the order workers.
    concurrency: int = 256
    batch_size: int = 64
    broker_attempts: int = 3
    broker_timeout_s: float = 2.0
    buy_grace_s: float = 5.0
    # An entry pending this long without its worker touching it is taken over.
    claim_idle_ms: int = 15_000
    reclaim_interval_s: float = 2.0
    # Deliveries after which an event that keeps failing ends with a recorded reason.
    max_deliveries: int = 10
    block_ms: int = 1000
    defer_s: float = 0.05


class Outcome(Enum):
    DONE = "done"
    DEFER = "defer"  # not yet: run again after the strategy's current step completes


class FollowUp(Enum):
    """What a settled order asks for once committed."""

    ARM = "arm"  # a position opened: arm its stop-loss
    FINISH = "finish"  # the run trades no more: no timers, no armed stop-loss


class ExecutionEngine:
    def __init__(
        self,
        *,
        queue: OrderQueue,
        locks: StrategyLocks,
        db: Database,
        publisher: Publisher,
        broker: Broker,
        stoploss: StopLossGuard,
        clock: Clock,
        config: EngineConfig,
        cancel_timers: Callable[[str], None],
        metrics: Metrics | None = None,
    ) -> None:
        self._queue = queue
        self._locks = locks
        self._db = db
        self._publish = publisher
        self._broker = broker
        self._stoploss = stoploss
        self._clock = clock
        self._config = config
        self._cancel_timers = cancel_timers
        self._metrics = metrics or Metrics()
        self._closing = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Workers waiting in XREADGROUP hold nothing yet; stop() cancels them at once.
        self._idle: set[asyncio.Task[None]] = set()
        self._busy = asyncio.Semaphore(config.concurrency)
        self._beside_tasks: set[asyncio.Task[None]] = set()
        # Exits run at once by the process that queued them (submit_exit).
        self._exits_here: set[asyncio.Task[None]] = set()
        self._lane = BatchLane(
            engine=self,
            queue=queue,
            locks=locks,
            db=db,
            publisher=publisher,
            touch_interval_s=config.claim_idle_ms / 3000,
        )

    async def start(self) -> None:
        await self._queue.ensure_group()
        batch = min(self._config.batch_size, self._config.concurrency)
        workers = -(-self._config.concurrency // batch)
        # Exits have a worker of their own, so a stop-loss never waits behind a burst.
        self._tasks = [
            asyncio.create_task(self._worker(batch, exits_only=True), name="engine-exits")
        ]
        self._tasks += [
            asyncio.create_task(self._worker(batch), name=f"engine-worker-{n}")
            for n in range(workers)
        ]
        self._tasks.append(asyncio.create_task(self._reaper(), name="engine-reaper"))

    async def stop(self, grace_s: float) -> None:
        """Stops taking events; events in hand get grace_s to finish, the rest stay pending
        in the consumer group and are delivered again (to us after a restart, or to a peer)."""
        self._closing.set()
        if not self._tasks:
            return
        for task in [*self._idle, self._tasks[-1]]:  # idle workers and the reaper
            task.cancel()
        busy = [*self._tasks, *self._beside_tasks, *self._exits_here]
        _, running = await asyncio.wait(busy, timeout=grace_s)
        await cancel_and_wait(running)
        self._tasks = []

    async def _worker(self, batch: int, *, exits_only: bool = False) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._closing.is_set():
            self._idle.add(me)
            try:
                deliveries = await self._queue.take(
                    self._config.block_ms, batch, exits_only=exits_only
                )
            except Exception as exc:  # noqa: BLE001 - Redis away: pause, then go on
                log.warning("engine cannot read the queue: %s", exc)
                await asyncio.sleep(0.5)
                if "NOGROUP" in str(exc):  # Redis lost its data: the group comes back first
                    with contextlib.suppress(Exception):
                        await self._queue.ensure_group()
                continue
            finally:
                self._idle.discard(me)
            try:
                careful = await self._lane.run(deliveries)
            except Exception as exc:  # noqa: BLE001 - Redis away before the batch began
                log.warning("a batch of %d events failed (%s)", len(deliveries), exc)
                careful = deliveries  # each alone: the per-event path retries
            for delivery in careful:
                await self._beside(delivery)

    async def _beside(self, delivery: Delivery) -> None:
        """Runs the event on the per-event path beside the worker, which goes on reading:
        an event waiting for its strategy's lock (or a SELL for its BUY) must not hold up
        the events behind it. At most `concurrency` at once; past that the worker waits."""
        await self._busy.acquire()
        task = asyncio.create_task(self._handle_and_release(delivery))
        self._beside_tasks.add(task)
        task.add_done_callback(self._beside_tasks.discard)

    async def submit_exit(self, event: OrderEvent) -> bool:
        """Queues an exit and, while few run here already, runs it here at once: the queue
        entry is taken for this process in the same round trip that adds it and takes the
        strategy's lock, then one DB transaction reads the strategy and commits the intent, so
        a stop-loss reaches the broker without waiting for a worker to wake up, then lock,
        then read, then commit. The entry is pending in the consumer group like any a worker
        took (reclaimed if we die). Returns True once the event is in the queue, as
        enqueue_retrying does."""
        if self._closing.is_set() or len(self._exits_here) >= _EXITS_RUN_HERE:
            # A storm of triggers goes to the exits worker, which takes them in batches.
            return await self._queue.enqueue_retrying(event)
        sid = event.strategy_id
        token = ""

        def lock(pipe: Pipeline) -> None:
            nonlocal token
            token = self._locks.request(pipe, sid)

        try:
            taken, (locked,) = await self._queue.enqueue_and_take(event, alongside=lock)
        except Exception as exc:  # noqa: BLE001 - retried plainly: the enqueue is once-only
            log.warning("enqueue of %s failed (%s); retrying", event.order_id, exc)
            with contextlib.suppress(Exception):
                await self._locks.release_all({sid: token})
            if not await self._queue.enqueue_retrying(event):
                return False
            # Had the first call gone through, it took the entry for this process, and no
            # worker will read it again: it runs here now, not once the reaper finds it idle
            # (claim_idle_s later).
            try:
                mine = await self._queue.taken_here(event.order_id)
            except Exception as exc:  # noqa: BLE001 - Redis away again: the reaper has it
                log.warning("could not look for %s among our taken exits: %s", event.order_id, exc)
                return True
            if mine is not None:
                self._run_here(mine, {})
            return True
        tokens = {sid: token} if locked else {}
        if tokens and (taken is None or taken.fields.get("order_id") != event.order_id):
            # Queued before (a sweep repeating), or an older exit came first: that one runs
            # here instead (without the lock), and this event waits for the exits worker.
            await self._locks.release_all(tokens)
            tokens = {}
        if taken is not None:
            self._run_here(taken, tokens)
        return True

    async def exits_ended(self, limit_s: float) -> None:
        """Returns once the exits running here now (submit_exit) have ended, or after
        `limit_s`: the stop-loss guard's bookkeeping waits for them."""
        if self._exits_here:
            await asyncio.wait(set(self._exits_here), timeout=limit_s)

    def _run_here(self, delivery: Delivery, tokens: dict[str, str]) -> None:
        task = asyncio.create_task(self._run_taken(delivery, tokens))
        self._exits_here.add(task)
        task.add_done_callback(self._exits_here.discard)

    async def _run_taken(self, delivery: Delivery, tokens: dict[str, str]) -> None:
        try:
            careful = await self._lane.run([delivery], taken=tokens)
        except Exception as exc:  # noqa: BLE001 - Redis away before it began: the slow path
            log.warning("exit %s failed (%s); running it alone", delivery.entry_id, exc)
            careful = [delivery]
        # On the per-event path, still in this task: it is the exit running here until it
        # ends (a trigger re-checked at its BUY's fill waits for the BUY's lock this way).
        for left in careful:
            await self._busy.acquire()
            await self._handle_and_release(left)

    async def _handle_and_release(self, delivery: Delivery) -> None:
        try:
            await self.handle(delivery)
        finally:
            self._busy.release()

    async def _reaper(self) -> None:
        while not self._closing.is_set():
            await asyncio.sleep(self._config.reclaim_interval_s)
            try:
                claimed = await self._queue.reclaim(self._config.claim_idle_ms)
            except Exception as exc:  # noqa: BLE001 - Redis away: try on the next round
                log.warning("engine cannot reclaim pending events: %s", exc)
                continue
            # Side by side (up to the concurrency): one by one, a backlog of claimed events
            # would go idle again and be claimed over and over, towards max_deliveries.
            await asyncio.gather(*(self._take_over(delivery) for delivery in claimed))

    async def _take_over(self, delivery: Delivery) -> None:
        log.warning("taking over event %s (%s)", delivery.entry_id, delivery.fields)
        self._metrics.redelivered(QUEUE_NAMES.get(delivery.stream, ""))
        async with self._busy:
            await self.handle(delivery)

    async def handle(self, delivery: Delivery) -> None:
        """Runs one delivered event to its end and acknowledges it. A failure (Redis or the
        DB away, a pooled connection broken by a reset) is retried here a few times, since
        handling is idempotent; past that the event stays pending for the reaper."""
        fields = delivery.fields
        bound = bind_log_context(
            event_id=delivery.entry_id,
            tenant=fields.get("tenant", ""),
            strategy_id=fields.get("strategy_id", ""),
            order_id=fields.get("order_id", ""),
        )
        toucher = asyncio.create_task(self._touch(delivery))
        try:
            finished = await self._handle_retrying(delivery)
        except Exception:
            log.exception("event %s failed; it will be delivered again", delivery.entry_id)
            return
        finally:
            reset_log_context(bound)
            toucher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await toucher
        if finished:
            with contextlib.suppress(Exception):
                await self._queue.ack(delivery)

    async def _handle_retrying(self, delivery: Delivery) -> bool:
        for pause in _RETRY_PAUSES_S:
            try:
                return await self._handle(delivery)
            except Exception as exc:  # noqa: BLE001 - retried; the last failure propagates
                log.warning("event %s failed (%s); retrying", delivery.entry_id, exc)
            if self._closing.is_set():
                return False
            await asyncio.sleep(pause)
        return await self._handle(delivery)

    async def _handle(self, delivery: Delivery) -> bool:
        """True when the event is finished; False leaves it pending (shutting down)."""
        try:
            event = OrderEvent.parse(delivery.fields)
        except (KeyError, ValueError):
            log.error("dropping malformed queue entry %s: %r", delivery.entry_id, delivery.fields)
            return True
        if delivery.deliveries > self._config.max_deliveries:
            await self._give_up(event, delivery.deliveries)
            return True
        while not self._closing.is_set():
            async with self._locks.held(event.strategy_id):
                outcome = await self.execute(event)
            if outcome is Outcome.DONE:
                return True
            await asyncio.sleep(self._config.defer_s)
        return False

    async def _touch(self, delivery: Delivery) -> None:
        interval = self._config.claim_idle_ms / 3000
        while not cancel_requested():  # a cancel swallowed by touch() still ends it
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await self._queue.touch_all([delivery])

    async def execute(self, event: OrderEvent) -> Outcome:
        """One event, under the strategy's lock."""
        found, existing = await self._db.find_with_order(event.strategy_id, event.order_id)
        if found is None:
            log.error("event for unknown strategy %s dropped", event.strategy_id)
            return Outcome.DONE
        strategy, runtime = found
        if existing is not None and existing.status.final:
            log.info("duplicate event for %s (%s) dropped", event.order_id, existing.status)
            await self.restore_hot(strategy, runtime)
            return Outcome.DONE
        if existing is not None:  # committed before: a crash, a timeout, or reconciliation
            await self._resume(event, strategy, runtime, existing)
            return Outcome.DONE
        started = await self._begin(event, strategy, runtime)
        if isinstance(started, Outcome):
            return started
        order, runtime = started
        await self._send(event, strategy, runtime, order, intent_committed=True)
        return Outcome.DONE

    async def restore_hot(self, strategy: Strategy, runtime: Runtime) -> None:
        """Puts the committed state back in Redis: config, runtime, stop-loss arming or
        disarming, all idempotent. Recovery uses it for every live strategy; a redelivered
        duplicate uses it because its first delivery may have committed and then lost Redis
        (a reset, a timeout) before any of them reached it."""
        await self._publish.runtime(runtime, strategy)
        if runtime.status is StrategyStatus.RUNNING and runtime.position is Position.BOUGHT:
            await self._stoploss.arm(strategy, runtime.run)
        elif not runtime.status.live:
            await self._finish(strategy)

    async def reconcile(self, order: Order, run: int) -> None:
        """Settles an order whose intent is committed but not final: ask the broker first,
        record what it says, place again (same id) only while its moment has not passed."""
        strategy_id, _, intent = parse_client_order_id(order.id)
        now = to_micros(self._clock.now())
        event = OrderEvent(strategy_id, order.tenant, run, intent, order.id, now, now)
        async with self._locks.held(strategy_id, timeout_s=self._config.broker_timeout_s * 10):
            await self.execute(event)

    async def _resume(
        self, event: OrderEvent, strategy: Strategy, runtime: Runtime, order: Order
    ) -> None:
        found = await self._lookup(order.id)
        if isinstance(found, BrokerOrder) and event.run != runtime.run:
            # An order of an earlier run: its outcome goes in the log, the runtime is past it.
            await self._commit(None, [_settled(order, found, self._clock.now())], event.run)
            return
        if isinstance(found, BrokerOrder):
            await self._record_reply(event, strategy, runtime, order, found)
            return
        if found is _UNKNOWN:  # cannot tell whether it exists: never guess
            await self._leave_unknown(order, event.run, "broker unreachable while reconciling")
            return
        too_late = self._too_late(event.intent, strategy)
        if too_late:
            now = self._clock.now()
            failed = replace(order, status=OrderStatus.FAILED, error=too_late, updated_at=now)
            await self._commit(strategy_failed(runtime, too_late, now), [failed], event.run)
            await self._finish(strategy)
            return
        await self._send(event, strategy, runtime, order)

    def _too_late(self, intent: Intent, strategy: Strategy) -> str:
        """A BUY the broker never got may still be placed within the grace; an exit always."""
        if intent is not Intent.BUY:
            return ""
        late = (self._clock.now() - strategy.spec.buy_time).total_seconds()
        if late <= self._config.buy_grace_s:
            return ""
        return (
            f"BUY not placed: the broker never received it and buy_time passed {late:.1f}s "
            f"ago, beyond the {self._config.buy_grace_s:g}s grace"
        )

    async def _leave_unknown(self, order: Order, run: int, why: str) -> None:
        unknown = replace(
            order, status=OrderStatus.UNKNOWN, error=why, updated_at=self._clock.now()
        )
        await self._commit(None, [unknown], run)

    async def _begin(
        self, event: OrderEvent, strategy: Strategy, runtime: Runtime
    ) -> tuple[Order, Runtime] | Outcome:
        """Checks the event against the state and commits its intent; an Outcome when the
        event ends here (DONE: recorded as skipped or failed) or must wait (DEFER)."""
        verdict = self.verdict(event, strategy, runtime)
        if verdict is not None:
            outcome, why, fails = verdict
            if why:
                await self._skip(event, strategy, why)
            if fails:
                await self._fail(runtime, why)
            return outcome
        order, submitted = self.intent(event, strategy, runtime)
        await self._save(submitted, [order], event.run)  # published beside the broker call
        return order, submitted

    def verdict(
        self, event: OrderEvent, strategy: Strategy, runtime: Runtime
    ) -> tuple[Outcome, str, bool] | None:
        """None when the event's order may go to the broker now; otherwise its outcome, the
        reason it is recorded as skipped ('' when it only waits) and whether the strategy
        fails with it."""
        if event.run != runtime.run:
            return (
                Outcome.DONE,
                f"event of run {event.run}, the strategy is on run {runtime.run}",
                False,
            )
        if _waits_for_buy(event.intent, runtime):
            return Outcome.DEFER, "", False
        reason = refusal(event.intent, runtime)
        if reason:
            return Outcome.DONE, reason, False
        # Late is late whether the timer fired late (the process was down) or the event
        # waited (the DB was away): a BUY is placed only within the grace of buy_time.
        late = max(event.lateness_s, (self._clock.now() - strategy.spec.buy_time).total_seconds())
        if event.intent is Intent.BUY and late > self._config.buy_grace_s:
            why = (
                f"BUY not placed: {late:.1f}s after buy_time, beyond the "
                f"{self._config.buy_grace_s:g}s grace"
            )
            return Outcome.DONE, why, True
        return None

    def intent(
        self, event: OrderEvent, strategy: Strategy, runtime: Runtime
    ) -> tuple[Order, Runtime]:
        """The order and the runtime to commit before the broker call: the intent and the
        first attempt in one commit, since the broker call follows at once."""
        now = self._clock.now()
        order = replace(_new_order(event, strategy, OrderStatus.SUBMITTED, now), attempts=1)
        return order, order_submitted(runtime, event.intent, order.id, now)

    async def _send(
        self,
        event: OrderEvent,
        strategy: Strategy,
        runtime: Runtime,
        order: Order,
        *,
        intent_committed: bool = False,
    ) -> None:
        side = Side.BUY if event.intent is Intent.BUY else Side.SELL
        # A committed intent is published while the broker works rather than before it: the
        # order reaches the broker sooner, and the reply is published only after this.
        publishing = (
            asyncio.ensure_future(self._publish_all(runtime, [order])) if intent_committed else None
        )
        try:
            reply, order, error = await self.place(
                order, strategy.spec.symbol, side, event.run, event.tick_at_us, publishing
            )
        finally:
            if publishing is not None:
                await publishing
        if isinstance(reply, BrokerOrder):
            await self._record_reply(event, strategy, runtime, order, reply)
        else:
            await self.unplaced(event, strategy, runtime, order, reply, error)

    async def unplaced(
        self,
        event: OrderEvent,
        strategy: Strategy,
        runtime: Runtime,
        order: Order,
        reply: object | None,
        error: str,
    ) -> None:
        """Records an order the broker surely does not have (None: failed) or whose fate it
        could not tell (_UNKNOWN: left for the reconciler)."""
        if reply is _UNKNOWN:
            await self._leave_unknown(order, event.run, f"outcome unknown: {error}")
            return
        now = self._clock.now()
        failed = replace(order, status=OrderStatus.FAILED, error=error, updated_at=now)
        why = f"{order.kind.value} failed after {order.attempts} attempts: {error}"
        await self._commit(strategy_failed(runtime, why, now), [failed], event.run)
        await self._finish(strategy)

    async def _record_reply(
        self,
        event: OrderEvent,
        strategy: Strategy,
        runtime: Runtime,
        order: Order,
        reply: BrokerOrder,
    ) -> None:
        after, settled, follow_up = self.settle(event, runtime, order, reply)
        await self._commit(after, [settled], event.run)
        if follow_up is FollowUp.ARM:
            await self._stoploss.arm(strategy, event.run)
        elif follow_up is FollowUp.FINISH:
            await self._finish(strategy)

    def settle(
        self, event: OrderEvent, runtime: Runtime, order: Order, reply: BrokerOrder
    ) -> tuple[Runtime | None, Order, FollowUp | None]:
        """What the broker's reply makes of the order and the runtime (None: unchanged),
        and what follows once that is committed."""
        now = self._clock.now()
        order = replace(order, broker_order_id=reply.broker_order_id, updated_at=now)
        if reply.status is BrokerOrderStatus.FILLED and reply.fill_price is not None:
            filled = replace(order, status=OrderStatus.FILLED, fill_price=reply.fill_price)
            after = order_filled(runtime, event.intent, reply.fill_price, now)
            return after, filled, FollowUp.ARM if event.intent is Intent.BUY else FollowUp.FINISH
        if reply.status is BrokerOrderStatus.REJECTED:
            rejected = replace(order, status=OrderStatus.REJECTED, error=reply.reason)
            why = f"{order.kind.value} rejected by the broker: {reply.reason}"
            return strategy_failed(runtime, why, now), rejected, FollowUp.FINISH
        # Accepted but not filled: left SUBMITTED for the reconciler to follow.
        return None, replace(order, status=OrderStatus.SUBMITTED), None

    async def place(
        self,
        order: Order,
        symbol: str,
        side: Side,
        run: int,
        tick_at_us: int = 0,
        publishing: asyncio.Future[None] | None = None,
    ) -> tuple[BrokerOrder | object | None, Order, str]:
        """At most broker_attempts placements, all with the same client order id; after an
        ambiguous failure the broker is asked first, so a timeout never becomes two orders.
        Every attempt is committed before its call (`publishing`: the caller committed the
        first with the intent and is publishing it; later attempts are published after it).
        Returns the broker's order, None (it surely has none), or _UNKNOWN."""
        error = ""
        found: BrokerOrder | object | None = None
        for attempt in range(self._config.broker_attempts):
            if publishing is not None and attempt > 0:
                await publishing
            if attempt > 0 or publishing is None:
                order = replace(
                    order,
                    status=OrderStatus.SUBMITTED,
                    attempts=order.attempts + 1,
                    updated_at=self._clock.now(),
                )
                await self._commit(None, [order], run)
            if tick_at_us and order.attempts == 1:  # wall clock: the tick may be another host's
                self._metrics.tick_to_order((time.time_ns() // 1000 - tick_at_us) / 1e6)
            try:
                async with asyncio.timeout(self._config.broker_timeout_s):
                    reply = await self._broker.place_order(order.id, symbol, side, order.quantity)
                return check_reply(reply, order.id), order, ""
            except (AmbiguousBrokerError, TimeoutError, OSError) as exc:
                error = str(exc) or type(exc).__name__
                log.warning("attempt %d of %s: %s", order.attempts, order.id, error)
            found = await self._lookup(order.id)
            if isinstance(found, BrokerOrder):
                return found, order, ""
        return found, order, error

    async def _lookup(self, order_id: str) -> BrokerOrder | object | None:
        """The broker's order, None when it has none, _UNKNOWN when it could not tell."""
        try:
            async with asyncio.timeout(self._config.broker_timeout_s):
                reply = await self._broker.get_order(order_id)
            return check_reply(reply, order_id) if reply is not None else None
        except (AmbiguousBrokerError, TimeoutError, OSError) as exc:
            log.warning("get_order(%s) failed: %s", order_id, exc)
            return _UNKNOWN

    async def _skip(self, event: OrderEvent, strategy: Strategy, reason: str) -> None:
        skipped = _new_order(event, strategy, OrderStatus.SKIPPED, self._clock.now(), reason)
        log.info("skipped %s: %s", event.order_id, reason)
        await self._commit(None, [skipped], event.run)

    async def _finish(self, strategy: Strategy) -> None:
        """The strategy will trade no more this run: no timers, no armed stop-loss."""
        self._cancel_timers(strategy.id)
        await self._stoploss.disarm(strategy)

    async def follow_up_all(
        self, follow_ups: list[tuple[Strategy | None, int, FollowUp | None]]
    ) -> None:
        """What settled orders of many strategies (each with its run) ask for, once
        committed."""
        armed = [(s, run) for s, run, then in follow_ups if s is not None and then is FollowUp.ARM]
        ended = [s for s, _, then in follow_ups if s is not None and then is FollowUp.FINISH]
        for strategy in ended:
            self._cancel_timers(strategy.id)
        await self._stoploss.disarm_all(ended)
        await self._stoploss.arm_all(armed)

    async def _fail(self, runtime: Runtime, reason: str) -> None:
        await self._commit(strategy_failed(runtime, reason, self._clock.now()), [], runtime.run)
        self._cancel_timers(runtime.strategy_id)

    async def _give_up(self, event: OrderEvent, deliveries: int) -> None:
        """An event that failed on every delivery ends with a recorded reason."""
        async with self._locks.held(event.strategy_id):
            found, existing = await self._db.find_with_order(event.strategy_id, event.order_id)
            if found is None or (existing is not None and existing.status.final):
                return
            why = f"{event.intent.kind.value} abandoned after {deliveries} failed deliveries"
            if existing is not None:
                failed = replace(existing, status=OrderStatus.UNKNOWN, error=why)
                await self._commit(None, [failed], event.run)
            if found[1].run == event.run and found[1].status.live:
                await self._fail(found[1], why)

    async def _commit(self, runtime: Runtime | None, orders: list[Order], run: int) -> None:
        """DB first (runtime and orders in one transaction), then Redis and the streams."""
        await self._save(runtime, orders, run)
        await self._publish_all(runtime, orders)

    async def _save(self, runtime: Runtime | None, orders: list[Order], run: int) -> None:
        if not await self._db.save(runtime, [(order, run) for order in orders]):
            raise RuntimeError("runtime changed under the strategy lock (lock lost?)")
        self.committed(orders)

    def committed(self, orders: list[Order], event_ids: dict[str, str] | None = None) -> None:
        """Counts and logs the orders a commit made final (`event_ids`: the queue entry of
        each order, when many are committed together). Counted once committed: a retry
        after a failed publish finds the order final in the DB and drops the event, so the
        commit is the one place that sees it become final."""
        for order in (order for order in orders if order.status.final):
            self._metrics.order_final(order.kind, order.status)
            ids = {"tenant": order.tenant, "strategy_id": order.strategy_id}
            ids["order_id"] = order.id  # also when recovery settles it (no event bound)
            if event_ids and order.id in event_ids:
                ids["event_id"] = event_ids[order.id]
            why = f": {order.error}" if order.error else ""
            log.info("order %s %s%s", order.id, order.status.value, why, extra=ids)

    async def _publish_all(self, runtime: Runtime | None, orders: list[Order]) -> None:
        await self._publish.changes([(runtime, orders)])


_UNKNOWN = object()
_RETRY_PAUSES_S = (0.1, 0.5, 1.0)


def _new_order(
    event: OrderEvent, strategy: Strategy, status: OrderStatus, now: datetime, error: str = ""
) -> Order:
    return Order(
        id=event.order_id,
        tenant=strategy.tenant,
        strategy_id=strategy.id,
        symbol=strategy.spec.symbol,
        kind=event.intent.kind,
        status=status,
        quantity=strategy.spec.quantity,
        attempts=0,
        created_at=now,
        updated_at=now,
        error=error,
    )


def _settled(order: Order, reply: BrokerOrder, now: datetime) -> Order:
    status = {
        BrokerOrderStatus.FILLED: OrderStatus.FILLED,
        BrokerOrderStatus.REJECTED: OrderStatus.REJECTED,
        BrokerOrderStatus.ACCEPTED: OrderStatus.SUBMITTED,
    }[reply.status]
    return replace(
        order,
        status=status,
        fill_price=reply.fill_price,
        broker_order_id=reply.broker_order_id,
        error=reply.reason,
        updated_at=now,
    )


def _waits_for_buy(intent: Intent, runtime: Runtime) -> bool:
    """A SELL due before its BUY has completed runs after it, rather than being skipped."""
    return (
        intent is Intent.SELL
        and runtime.position is Position.NONE
        and runtime.status in (StrategyStatus.SCHEDULED, StrategyStatus.RUNNING)
    )
