"""Scheduler: BUY/SELL timers (APScheduler) that, when they fire, enqueue an order event.

Nothing else: the engine does the work. Every replica keeps timers for every live strategy
(`sync` reloads them), and the queue's enqueue-once script makes a double firing one event,
so two replicas are safe and either one firing is enough.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from server.clock import Clock
from server.domain import Intent, Position, Runtime, Strategy, StrategyStatus, client_order_id
from server.store.codec import to_micros
from server.store.queue import OrderEvent, OrderQueue

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, *, queue: OrderQueue, clock: Clock) -> None:
        self._queue = queue
        self._clock = clock
        # A timer late because the process was down still fires (misfire_grace_time=None):
        # the engine, not the timer, decides whether a late BUY may still be placed.
        self._aps = AsyncIOScheduler(
            timezone=UTC,
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
        )
        self._fired: set[tuple[str, int, Intent]] = set()

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
        if runtime.status is StrategyStatus.SCHEDULED and runtime.position is Position.NONE:
            self._add(strategy, runtime, Intent.BUY, strategy.spec.buy_time)
        self._add(strategy, runtime, Intent.SELL, strategy.spec.sell_time)

    def cancel(self, strategy_id: str) -> None:
        for intent in (Intent.BUY, Intent.SELL):
            with contextlib.suppress(JobLookupError):
                self._aps.remove_job(_job_id(strategy_id, intent))

    def sync(self, live: list[tuple[Strategy, Runtime]]) -> None:
        """Makes the timers match the live strategies (after a restart, or strategies another
        replica started)."""
        wanted = {strategy.id for strategy, _ in live}
        for job in self._aps.get_jobs():
            if job.id.split(":", 1)[0] not in wanted:
                job.remove()
        for strategy, runtime in live:
            self.schedule(strategy, runtime)

    def forget_fired(self) -> None:
        """Redis lost its queue and markers: timers that already fired may fire again (the
        engine drops what the order log shows as done)."""
        self._fired.clear()

    def _add(self, strategy: Strategy, runtime: Runtime, intent: Intent, due: datetime) -> None:
        if (strategy.id, runtime.run, intent) in self._fired:
            return
        args = [strategy.id, strategy.tenant, runtime.run, intent, to_micros(due)]
        job = self._aps.get_job(_job_id(strategy.id, intent))
        if job is not None and list(job.args) == args:
            return  # the periodic sync finds most timers already set: leave them be
        self._aps.add_job(
            self._fire,
            trigger="date",
            run_date=due,
            id=_job_id(strategy.id, intent),
            replace_existing=True,
            args=args,
        )

    async def _fire(
        self, strategy_id: str, tenant: str, run: int, intent: Intent, due_us: int
    ) -> None:
        event = OrderEvent(
            strategy_id=strategy_id,
            tenant=tenant,
            run=run,
            intent=intent,
            order_id=client_order_id(strategy_id, run, intent),
            due_at_us=due_us,
            fired_at_us=to_micros(self._clock.now()),
        )
        if await self._queue.enqueue_retrying(event):
            self._fired.add((strategy_id, run, intent))
        # else: not marked fired, so the next sync sets the timer again and it refires.


def _job_id(strategy_id: str, intent: Intent) -> str:
    return f"{strategy_id}:{intent.value}"
