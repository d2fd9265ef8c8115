"""Scheduler: BUY/SELL timers (APScheduler) that, when they fire, enqueue an order event.

Nothing else: the engine does the work. Every replica keeps timers for every live strategy
(`sync` reloads them), and the queue's enqueue-once script makes a double firing one event,
so two replicas are safe and either one firing is enough.

APScheduler holds one job: the next wake-up. The instants with timers are a heap here, and
each wake-up fires every instant due, then re-arms for the next. A job per strategy would have
APScheduler run 10,000 jobs one by one for 10,000 strategies with the same buy_time, one
round trip each; a job per instant made every StartStrategy pay for an APScheduler job (a
third of its time). Everything due at an instant is enqueued in pipelined chunks (the queue's
enqueue-once script, `_CHUNK` calls per round trip).
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from server.clock import Clock
from server.domain import Intent, Position, Runtime, Strategy, StrategyStatus, client_order_id
from server.metrics import Metrics
from server.store.codec import from_micros, to_micros
from server.store.queue import OrderEvent, OrderQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Timer:
    strategy_id: str
    tenant: str
    run: int
    intent: Intent
    due_us: int


_Key = tuple[str, Intent]


class Scheduler:
    def __init__(self, *, queue: OrderQueue, clock: Clock, metrics: Metrics | None = None) -> None:
        self._queue = queue
        self._clock = clock
        self._metrics = metrics or Metrics()
        # A timer late because the process was down still fires (misfire_grace_time=None):
        # the engine, not the timer, decides whether a late BUY may still be placed.
        self._aps = AsyncIOScheduler(
            timezone=UTC,
            # A wake-up may be re-armed while the last one still enqueues: both must run.
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 64},
        )
        self._fired: set[tuple[str, int, Intent]] = set()
        self._timers: dict[_Key, _Timer] = {}
        # The runtime version each live strategy's timers were last set from: the periodic
        # sync skips what it reads back unchanged (see `knows`).
        self._versions: dict[str, int] = {}
        self._instants: dict[int, dict[_Key, _Timer]] = {}
        # Every instant with timers (and some whose timers were cancelled), earliest first;
        # APScheduler holds one job, for the earliest (_next_us).
        self._heap: list[int] = []
        self._next_us: int | None = None

    def start(self) -> None:
        self._aps.start()

    def stop(self) -> None:
        if self._aps.running:
            self._aps.shutdown(wait=False)

    def schedule(self, strategy: Strategy, runtime: Runtime) -> None:
        """Timers for what is still ahead of this run: BUY while nothing was bought, SELL
        while the strategy is live."""
        if not runtime.status.live:
            self.cancel(strategy.id)
            return
        self._versions[strategy.id] = runtime.version
        if runtime.status is StrategyStatus.SCHEDULED and runtime.position is Position.NONE:
            self._add(strategy, runtime, Intent.BUY, strategy.spec.buy_time)
        self._add(strategy, runtime, Intent.SELL, strategy.spec.sell_time)

    def knows(self, strategy_id: str, version: int) -> bool:
        """True when the timers of this strategy were set from this very runtime version."""
        return self._versions.get(strategy_id) == version

    def cancel(self, strategy_id: str) -> None:
        self._versions.pop(strategy_id, None)
        for intent in (Intent.BUY, Intent.SELL):
            self._remove((strategy_id, intent))

    def sync(self, live: list[tuple[Strategy, Runtime]]) -> None:
        """Makes the timers match the live strategies (after a restart, or strategies another
        replica started)."""
        wanted = {strategy.id for strategy, _ in live}
        for key in [key for key in self._timers if key[0] not in wanted]:
            self._remove(key)
        for strategy, runtime in live:
            self.schedule(strategy, runtime)

    def forget_fired(self) -> None:
        """Redis lost its queue and markers: timers that already fired may fire again (the
        engine drops what the order log shows as done)."""
        self._fired.clear()

    def _add(self, strategy: Strategy, runtime: Runtime, intent: Intent, due: datetime) -> None:
        if (strategy.id, runtime.run, intent) in self._fired:
            return
        timer = _Timer(strategy.id, strategy.tenant, runtime.run, intent, to_micros(due))
        key = (strategy.id, intent)
        if self._timers.get(key) == timer:
            return  # the periodic sync finds most timers already set: leave them be
        self._remove(key)
        self._timers[key] = timer
        instant = self._instants.get(timer.due_us)
        if instant is None:
            instant = self._instants[timer.due_us] = {}
            heapq.heappush(self._heap, timer.due_us)
            if self._next_us is None or timer.due_us < self._next_us:
                self._arm(timer.due_us)
        instant[key] = timer

    def _remove(self, key: _Key) -> None:
        timer = self._timers.pop(key, None)
        if timer is None:
            return
        instant = self._instants.get(timer.due_us)
        if instant is None:
            return
        instant.pop(key, None)
        if not instant:  # its heap entry stays; _wake skips instants with nothing left
            del self._instants[timer.due_us]

    def _arm(self, due_us: int) -> None:
        """Sets the one APScheduler job to wake at `due_us`."""
        self._next_us = due_us
        # In an empty context: APScheduler's timer would otherwise inherit the caller's
        # (an RPC's log fields), and a job firing for many tenants would log as one.
        contextvars.Context().run(
            self._aps.add_job,
            self._wake,
            trigger="date",
            run_date=from_micros(due_us),
            id=_WAKE_JOB,
            replace_existing=True,
        )

    async def _wake(self) -> None:
        """Fires every instant now due, earliest first, after arming the next wake-up.
        The due instants are taken before the first await, so a wake-up re-armed while
        this one is still enqueueing never fires one of them twice."""
        self._next_us = None
        now_us = to_micros(self._clock.now())
        due: list[int] = []
        while self._heap and self._heap[0] <= now_us:
            instant = heapq.heappop(self._heap)
            if instant in self._instants and (not due or due[-1] != instant):
                due.append(instant)
        while self._heap and self._heap[0] not in self._instants:
            heapq.heappop(self._heap)  # instants whose timers were all cancelled
        if self._heap:
            self._arm(self._heap[0])
        for instant in due:
            await self._fire(instant)

    async def _fire(self, due_us: int) -> None:
        """Everything due at this instant, in one burst."""
        timers = list(self._instants.pop(due_us, {}).values())
        fired_at = to_micros(self._clock.now())
        # Chunk by chunk, the first one small: each chunk's timers are retired, its events
        # built, sent (one round trip) and counted before the next is touched, so the engine
        # starts on the first orders while the rest of a 10,000-strategy burst is still being
        # prepared (retiring all 10,000 first held the first BUY back by 7 ms).
        bounds = [0, *range(min(_FIRST_CHUNK, len(timers)), len(timers), _CHUNK), len(timers)]
        for start, end in itertools.pairwise(bounds):
            chunk = timers[start:end]
            self._retire(chunk)
            await self._enqueue(chunk, fired_at)

    def _retire(self, timers: list[_Timer]) -> None:
        """Firing timers leave the timer table. Only these very timers: one replaced while
        an earlier chunk was being sent (the strategy rescheduled) stays."""
        for timer in timers:
            key = (timer.strategy_id, timer.intent)
            if self._timers.get(key) is timer:
                del self._timers[key]

    async def _enqueue(self, timers: list[_Timer], fired_at: int) -> None:
        events = [
            OrderEvent(
                strategy_id=t.strategy_id,
                tenant=t.tenant,
                run=t.run,
                intent=t.intent,
                order_id=client_order_id(t.strategy_id, t.run, t.intent),
                due_at_us=t.due_us,
                fired_at_us=fired_at,
            )
            for t in timers
        ]
        queued = await self._queue.enqueue_all(events)
        for timer, ok in zip(timers, queued, strict=True):
            self._metrics.timer_fired(timer.intent, (fired_at - timer.due_us) / 1_000_000)
            if ok:
                self._fired.add((timer.strategy_id, timer.run, timer.intent))
        # Not queued: not marked fired, so the next sync sets the timer again and it refires.


_FIRST_CHUNK = 16
_CHUNK = 64


_WAKE_JOB = "wake"
