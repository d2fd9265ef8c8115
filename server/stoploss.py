"""StopLossGuard: arms and disarms positions in the stop-loss index and hands every trigger
to the queue as a STOPLOSS event (exit priority).

A trigger first lands in the index's fired hash (atomically with its removal from the armed
set), then is enqueued, then cleared; `sweep` re-enqueues what a crash left in between, and
enqueue-once makes that safe. So a trigger is never lost and never fires twice.

Clearing the fired marker and the trigger's log line wait until the exits this process runs
have ended (at most a second). They are Python work on the event loop, and an exit's intent
commit runs on a DB thread that needs the interpreter lock while the loop holds it: done at
once they held up every exit by 0.2 to 0.3 ms of its 2 ms from tick to broker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from decimal import Decimal

from server.clock import Clock
from server.domain import Intent, Position, Strategy, StrategyStatus, client_order_id
from server.store.codec import to_micros
from server.store.queue import OrderEvent, OrderQueue
from server.store.state import RedisState
from server.store.stoploss import Armed, Fired, StopLossIndex

log = logging.getLogger(__name__)

# How long a trigger's bookkeeping waits for the exits running here: by then any exit is past
# its intent commit; a broker slower than that does not hold the fired markers up.
_BOOKKEEPING_WAIT_S = 1.0

ExitsEnded = Callable[[float], Awaitable[None]]


async def _no_exits_here(_limit_s: float) -> None:
    return None


class StopLossGuard:
    def __init__(
        self, *, index: StopLossIndex, queue: OrderQueue, state: RedisState, clock: Clock
    ) -> None:
        self._index = index
        self._queue = queue
        self._state = state
        self._clock = clock
        self._submit: Callable[[OrderEvent], Awaitable[bool]] = queue.enqueue_retrying
        self._exits_ended: ExitsEnded = _no_exits_here
        self._bookkeeping: set[asyncio.Task[None]] = set()

    def submit_with(
        self, submit: Callable[[OrderEvent], Awaitable[bool]], exits_ended: ExitsEnded
    ) -> None:
        """Where STOPLOSS events go (the engine's submit_exit, which also runs them at
        once; by default the queue, for the exits worker), and how to wait, at most a given
        number of seconds, until the exits running here have ended."""
        self._submit = submit
        self._exits_ended = exits_ended

    async def arm(self, strategy: Strategy, run: int) -> None:
        await self.arm_all([(strategy, run)])

    async def arm_all(self, positions: list[tuple[Strategy, int]]) -> None:
        """Arms fresh positions (each strategy with the run that bought it), then checks the
        last price: a tick that breached a stop-loss while its BUY was in flight exits it at
        once. One round trip for all."""
        armed = [
            Armed(s.spec.symbol, s.id, s.spec.stop_loss, run, s.tenant) for s, run in positions
        ]
        for symbol, fired in await self._index.arm_and_recheck_all(armed):
            await self.hand_over(symbol, fired)

    async def disarm(self, strategy: Strategy) -> None:
        await self.disarm_all([strategy])

    async def disarm_all(self, strategies: list[Strategy]) -> None:
        await self._index.disarm_all([(s.spec.symbol, s.id, s.spec.stop_loss) for s in strategies])

    async def on_price(
        self, symbol: str, price: Decimal, low: Decimal | None = None, received_us: int = 0
    ) -> int:
        """One tick, or a batch ending at `price` whose lowest was `low`: stored and checked
        in one step; returns how many stop-losses fired. `received_us`: when the tick (the
        batch's first) arrived, carried to the exit for its tick-to-order latency."""
        fired = await self._index.tick(symbol, price, low)
        await self.hand_over(symbol, fired, received_us)
        return len(fired)

    async def sweep(self, symbols: set[str]) -> None:
        """Hands over triggers a crash left between firing and enqueueing. The bookkeeping in
        flight goes first: the markers it is about to clear are queued, not lost."""
        await self._bookkeeping_done()
        for symbol in symbols:
            pending = await self._index.fired(symbol)
            if pending:
                log.warning("re-enqueueing %d stop-loss triggers on %s", len(pending), symbol)
                await self.hand_over(symbol, pending)

    async def hand_over(self, symbol: str, fired: list[Fired], tick_at_us: int = 0) -> None:
        """Queues each trigger's exit (the engine runs it at once); the rest of the
        triggers' bookkeeping follows in the background (see the module's note)."""
        handed: list[str] = []
        exits: list[OrderEvent] = []
        for trigger in fired:
            event = await self._event(trigger, tick_at_us)
            if event is not None:
                if not await self._submit(event):
                    continue  # stays in the fired hash; the next sweep tries again
                exits.append(event)
            handed.append(trigger.strategy_id)
        if handed:
            task = asyncio.create_task(self._clear(symbol, handed, exits))
            self._bookkeeping.add(task)
            task.add_done_callback(self._bookkeeping.discard)

    async def _clear(self, symbol: str, handed: list[str], exits: list[OrderEvent]) -> None:
        try:
            await self._exits_ended(_BOOKKEEPING_WAIT_S)
            for event in exits:
                ids = {"tenant": event.tenant, "strategy_id": event.strategy_id}
                log.info("stop-loss of %s breached on %s", event.strategy_id, symbol, extra=ids)
            await self._index.handed_over(symbol, handed)
        except Exception as exc:  # noqa: BLE001 - queued already: the sweep clears them
            log.warning("could not clear %d stop-loss markers on %s: %s", len(handed), symbol, exc)

    async def stop(self) -> None:
        """Waits for the bookkeeping in flight (once the engine has stopped, before Redis
        closes); cut short, it leaves markers the next start's sweep clears."""
        await self._bookkeeping_done()

    async def _bookkeeping_done(self) -> None:
        if self._bookkeeping:
            await asyncio.wait(set(self._bookkeeping), timeout=_BOOKKEEPING_WAIT_S * 2)

    async def _event(self, trigger: Fired, tick_at_us: int) -> OrderEvent | None:
        """The STOPLOSS event of a trigger; None when there is no position to exit.

        A trigger that knows the run it was armed for is queued at once: reading the runtime
        first would put a round trip between the tick and the exit, and the engine checks
        the state under the strategy's lock anyway (an exit that lost a race with a SELL or
        a Stop is recorded as SKIPPED there, with the reason). Only a trigger armed without
        its run (before the index kept it) or re-found after a crash reads the runtime."""
        run, tenant = trigger.run, trigger.tenant
        if run is None:
            runtime = await self._state.get_runtime(trigger.strategy_id)
            holding = runtime is not None and runtime.position is Position.BOUGHT
            if runtime is None or not holding or runtime.status is not StrategyStatus.RUNNING:
                return None
            run, tenant = runtime.run, runtime.tenant
        now = to_micros(self._clock.now())
        return OrderEvent(
            strategy_id=trigger.strategy_id,
            tenant=tenant,
            run=run,
            intent=Intent.STOPLOSS,
            order_id=client_order_id(trigger.strategy_id, run, Intent.STOPLOSS),
            due_at_us=now,
            fired_at_us=now,
            tick_at_us=tick_at_us,
        )
