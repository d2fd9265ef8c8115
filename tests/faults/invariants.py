"""The invariants every fault scenario ends with, checked over the broker's record (the paper
broker's book in Redis), the DB and Redis. `check_invariants` raises AssertionError naming
the first broken one."""

from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal
from typing import Any

from redis.asyncio import Redis

from server.domain import (
    Intent,
    Order,
    OrderStatus,
    Position,
    Runtime,
    Strategy,
    StrategyStatus,
    parse_client_order_id,
)
from server.store.db import Database

UNFINISHED = {OrderStatus.PENDING, OrderStatus.SUBMITTED, OrderStatus.UNKNOWN}


async def broker_book(redis: Redis) -> dict[str, dict[str, Any]]:
    raw = await redis.hgetall("{paper}:orders")
    return {_text(k): json.loads(v) for k, v in raw.items()}


async def check_invariants(redis: Redis, db: Database, *, tenant: str = "tenant-a") -> None:
    book = await broker_book(redis)
    log = [_text(x) for x in await redis.lrange("{paper}:log", 0, -1)]
    check_broker(book, log)
    orders = await db.list_orders(tenant, "")
    check_order_log(orders, book)
    for strategy in await db.list_strategies(tenant, None, "", 100_000):
        _, runtime = await db.get_strategy(tenant, strategy.id)
        check_runtime(strategy, runtime, [o for o in orders if o.strategy_id == strategy.id])
        await check_hot(redis, strategy, runtime)


def check_broker(book: dict[str, dict[str, Any]], log: list[str]) -> None:
    """At most one broker order per client order id, one BUY and one exit filled per run."""
    repeated = [oid for oid, n in Counter(log).items() if n > 1]
    assert not repeated, f"client order ids placed twice: {repeated}"
    per_run: Counter[tuple[str, int, str]] = Counter()
    for oid, order in book.items():
        sid, run, intent = parse_client_order_id(oid)
        if order["status"] == "FILLED":
            per_run[(sid, run, "buy" if intent is Intent.BUY else "exit")] += 1
    doubled = [key for key, n in per_run.items() if n > 1]
    assert not doubled, f"more than one filled BUY or exit in a run: {doubled}"


def check_order_log(orders: list[Order], book: dict[str, dict[str, Any]]) -> None:
    """Every intent final, and the log agrees with the broker both ways."""
    open_ = [(o.id, o.status.value) for o in orders if o.status in UNFINISHED]
    assert not open_, f"intents not final: {open_}"
    by_id = {order.id: order for order in orders}
    for oid, placed in book.items():
        row = by_id.get(oid)
        assert row is not None, f"the broker has {oid}, the order log does not"
        assert row.status.value == placed["status"], (
            f"{oid}: the log says {row.status.value}, the broker {placed['status']}"
        )
    for order in orders:
        if order.status is OrderStatus.FILLED:
            assert order.id in book, f"{order.id} FILLED in the log, unknown to the broker"


def check_runtime(strategy: Strategy, runtime: Runtime, orders: list[Order]) -> None:
    """The runtime's position follows from the fills of its current run."""
    filled = {
        parse_client_order_id(o.id)[2]
        for o in orders
        if o.status is OrderStatus.FILLED and parse_client_order_id(o.id)[1] == runtime.run
    }
    exited = bool(filled - {Intent.BUY})
    position = runtime.position
    if position is Position.BOUGHT:
        assert Intent.BUY in filled and not exited, f"{strategy.id}: BOUGHT, fills {filled}"
    elif position in (Position.SOLD, Position.EXITED_BY_SL):
        assert Intent.BUY in filled and exited, f"{strategy.id}: {position}, fills {filled}"
    else:
        assert not filled, f"{strategy.id}: no position, fills {filled}"
    if position is Position.EXITED_BY_SL:
        assert Intent.STOPLOSS in filled, f"{strategy.id}: EXITED_BY_SL without an SL fill"


async def check_hot(redis: Redis, strategy: Strategy, runtime: Runtime) -> None:
    """Redis agrees with the DB, and an open position sits above its stop-loss."""
    hot = await redis.hgetall(f"runtime:{{{strategy.id}}}")
    if hot and runtime.status.live:
        version = int(_text(hot.get("version") or hot.get(b"version") or "-1"))
        assert version == runtime.version, f"{strategy.id}: Redis v{version}, DB v{runtime.version}"
    if runtime.position is Position.BOUGHT and runtime.status is StrategyStatus.RUNNING:
        price = await redis.get(f"price:{{{strategy.spec.symbol}}}")
        if price is not None:
            assert Decimal(_text(price)) > strategy.spec.stop_loss, (
                f"{strategy.id}: price {_text(price)} <= stop-loss {strategy.spec.stop_loss} "
                "and still BOUGHT"
            )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
