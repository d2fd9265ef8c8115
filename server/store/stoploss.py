"""The stop-loss index: per symbol, the strategies holding a position, scored by stop-loss.

A tick costs one script call, O(log n + triggered), instead of the seed's read of every
strategy's stop-loss. Arming happens when a BUY fills, disarming on any exit, stop or failure.
"""

from __future__ import annotations

from decimal import Decimal

from redis.asyncio import Redis

from server.domain import format_decimal
from server.store import keys, scripts
from server.store.connection import execute


def padded(value: Decimal) -> str:
    """19 characters, 10 integer digits and 8 decimals: string order is numeric order."""
    return f"{value:019.8f}"


def member(strategy_id: str, stop_loss: Decimal) -> str:
    return f"{padded(stop_loss)}:{strategy_id}"


class StopLossIndex:
    def __init__(self, *, redis: Redis) -> None:
        self._redis = redis
        self._trigger = redis.register_script(scripts.STOPLOSS_TRIGGER)

    async def tick(self, symbol: str, price: Decimal, low: Decimal | None = None) -> list[str]:
        """Stores the price; returns the strategies whose stop-loss it breached (now fired).
        `low`, for a batch of ticks ending at `price`, is the batch's lowest price: it is the
        one checked, in the same atomic step that stores `price`."""
        args = [format_decimal(price)]
        if low is not None and low < price:
            args.append(format_decimal(low))
        return await self._run(symbol, *args)

    async def arm_and_recheck_all(
        self, armed: list[tuple[str, str, Decimal]]
    ) -> list[tuple[str, list[str]]]:
        """Arms each (symbol, strategy id, stop-loss), then fires what its symbol's stored
        price already breaches, one script call each, one round trip for all; returns
        (symbol, the strategies that fired on it) where any did."""
        if not armed:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for symbol, strategy_id, stop_loss in armed:
                entry = member(strategy_id, stop_loss)
                args = ["", "", entry, repr(float(stop_loss))]
                await self._trigger(keys=_keys(symbol), args=args, client=pipe)
            replies = await execute(pipe)
        return [
            (symbol, [str(strategy_id) for strategy_id in fired])
            for (symbol, _, _), fired in zip(armed, replies, strict=True)
            if fired
        ]

    async def disarm_all(self, armed: list[tuple[str, str, Decimal]]) -> None:
        """Takes each (symbol, strategy id, stop-loss) out of the index, one round trip."""
        if not armed:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for symbol, strategy_id, stop_loss in armed:
                pipe.zrem(keys.stoploss_armed(symbol), member(strategy_id, stop_loss))
            await execute(pipe)

    async def _run(self, symbol: str, *args: str) -> list[str]:
        fired = await self._trigger(keys=_keys(symbol), args=list(args))
        return [str(strategy_id) for strategy_id in fired]

    async def fired(self, symbol: str) -> list[str]:
        """Triggers not yet handed to the queue (a crash came between)."""
        return [str(k) for k in await self._redis.hkeys(keys.stoploss_fired(symbol))]

    async def handed_over(self, symbol: str, strategy_id: str) -> None:
        await self._redis.hdel(keys.stoploss_fired(symbol), strategy_id)

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
    return [keys.price(symbol), keys.stoploss_armed(symbol), keys.stoploss_fired(symbol)]
