"""The stop-loss index: per symbol, the strategies holding a position, scored by stop-loss.

A tick costs one script call, O(log n + triggered), instead of the seed's read of every
strategy's stop-loss. Arming happens when a BUY fills, disarming on any exit, stop or failure.
Each armed position also keeps the run and tenant its exit will carry (`stoploss:runs`), handed
back with its trigger, so the exit is queued without a read of the runtime in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from redis.asyncio import Redis

from server.domain import format_decimal
from server.store import keys, scripts
from server.store.connection import execute, queue_script


def padded(value: Decimal) -> str:
    """19 characters, 10 integer digits and 8 decimals: string order is numeric order."""
    return f"{value:019.8f}"


def member(strategy_id: str, stop_loss: Decimal) -> str:
    return f"{padded(stop_loss)}:{strategy_id}"


@dataclass(frozen=True, slots=True)
class Armed:
    """A position to arm: its symbol, strategy, stop-loss, and the run and tenant its
    STOPLOSS event will carry."""

    symbol: str
    strategy_id: str
    stop_loss: Decimal
    run: int
    tenant: str


@dataclass(frozen=True, slots=True)
class Fired:
    """A stop-loss that fired, with the run and tenant it was armed for; `run` is None when
    they are not known (armed before the index kept them, or re-found after a crash): the
    caller reads the strategy's runtime instead."""

    strategy_id: str
    run: int | None = None
    tenant: str = ""


class StopLossIndex:
    def __init__(self, *, redis: Redis) -> None:
        self._redis = redis
        self._trigger = redis.register_script(scripts.STOPLOSS_TRIGGER)

    async def tick(self, symbol: str, price: Decimal, low: Decimal | None = None) -> list[Fired]:
        """Stores the price; returns the stop-losses it breached (now fired). `low`, for a
        batch of ticks ending at `price`, is the batch's lowest price: it is the one checked,
        in the same atomic step that stores `price`."""
        args = [format_decimal(price)]
        if low is not None and low < price:
            args.append(format_decimal(low))
        return _fired(await self._trigger(keys=_keys(symbol), args=args))

    async def arm_and_recheck_all(self, armed: list[Armed]) -> list[tuple[str, list[Fired]]]:
        """Arms each position, then fires what its symbol's stored price already breaches,
        one script call each, one round trip for all; returns (symbol, what fired on it)
        where anything did."""
        if not armed:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for a in armed:
                entry = member(a.strategy_id, a.stop_loss)
                owner = f"{a.run} {a.tenant}"
                args = ["", "", entry, repr(float(a.stop_loss)), a.strategy_id, owner]
                queue_script(pipe, self._trigger, _keys(a.symbol), args)
            replies = await execute(pipe)
        return [(a.symbol, _fired(reply)) for a, reply in zip(armed, replies, strict=True) if reply]

    async def disarm_all(self, armed: list[tuple[str, str, Decimal]]) -> None:
        """Takes each (symbol, strategy id, stop-loss) out of the index, one round trip."""
        if not armed:
            return
        # An owner left behind without its member (Redis died between the two) is inert:
        # only a member fires, and the next arming overwrites it.
        async with self._redis.pipeline(transaction=False) as pipe:
            for symbol, strategy_id, stop_loss in armed:
                pipe.zrem(keys.stoploss_armed(symbol), member(strategy_id, stop_loss))
                pipe.hdel(keys.stoploss_runs(symbol), strategy_id)
            await execute(pipe)

    async def fired(self, symbol: str) -> list[Fired]:
        """Triggers not yet handed to the queue (a crash came between)."""
        return [Fired(str(k)) for k in await self._redis.hkeys(keys.stoploss_fired(symbol))]

    async def handed_over(self, symbol: str, strategy_ids: list[str]) -> None:
        """Clears the fired markers of triggers whose exits are queued: one round trip."""
        await self._redis.hdel(keys.stoploss_fired(symbol), *strategy_ids)

    async def armed_count(self, symbol: str) -> int:
        return int(await self._redis.zcard(keys.stoploss_armed(symbol)))

    async def armed_total(self, symbols: set[str] | frozenset[str]) -> int:
        """Positions armed over all these symbols: one pipelined round trip."""
        if not symbols:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for symbol in symbols:
                pipe.zcard(keys.stoploss_armed(symbol))
            counts = await execute(pipe)
        return sum(int(count) for count in counts)

    async def armed_ids(self, symbol: str) -> list[str]:
        members = await self._redis.zrange(keys.stoploss_armed(symbol), 0, -1)
        return [str(m).split(":", 1)[1] for m in members]


def _keys(symbol: str) -> list[str]:
    """The trigger script's keys for a symbol."""
    return [
        keys.price(symbol),
        keys.stoploss_armed(symbol),
        keys.stoploss_fired(symbol),
        keys.stoploss_runs(symbol),
    ]


def _fired(reply: list[str]) -> list[Fired]:
    """The trigger script's flat (id, '<run> <tenant>') reply."""
    fired: list[Fired] = []
    for n in range(0, len(reply), 2):
        strategy_id, owner = str(reply[n]), str(reply[n + 1])
        run, _, tenant = owner.partition(" ")
        fired.append(
            Fired(strategy_id, int(run), tenant) if run.isdigit() and tenant else Fired(strategy_id)
        )
    return fired
