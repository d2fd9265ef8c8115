"""SQLModel tables and async access to the durable store (SQLite by default, or PostgreSQL).

The DB is the record Redis is rebuilt from: every state change commits here first.
Instants are integer microseconds since the epoch, so SQLite and PostgreSQL agree exactly.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    LargeBinary,
    event,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.domain import (
    Order,
    OrderKind,
    OrderStatus,
    Position,
    Runtime,
    Strategy,
    StrategySpec,
    StrategyStatus,
    format_decimal,
)
from server.errors import strategy_not_found
from server.store.codec import from_micros, runtime_to_flat, to_micros
from server.store.sqlite_writer import RowUpdate, SqliteWriter

_MAX_CONFLICT_RETRIES = 8
_SCHEMA_ATTEMPTS = 5


class StrategyRow(SQLModel, table=True):
    __tablename__ = "strategies"
    __table_args__ = (Index("ix_strategies_tenant_status_id", "tenant", "status", "id"),)

    id: str = Field(primary_key=True, max_length=40)
    tenant: str = Field(index=True, max_length=128)
    symbol: str = Field(max_length=32)
    quantity: int = Field(sa_column=Column(BigInteger, nullable=False))
    buy_time: int = Field(sa_column=Column(BigInteger, nullable=False))
    sell_time: int = Field(sa_column=Column(BigInteger, nullable=False))
    stop_loss: str = Field(max_length=32)
    status: str = Field(max_length=16)
    position: str = Field(max_length=16)
    run: int = 0
    version: int = Field(sa_column=Column(BigInteger, nullable=False))
    entry_price: str = Field(default="", max_length=32)
    exit_price: str = Field(default="", max_length=32)
    last_price: str = Field(default="", max_length=32)
    last_buy_order_id: str = Field(default="", max_length=80)
    last_sell_order_id: str = Field(default="", max_length=80)
    last_sl_order_id: str = Field(default="", max_length=80)
    failure_reason: str = Field(default="", max_length=1000)
    created_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    updated_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    terminated_at: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))


class OrderRow(SQLModel, table=True):
    __tablename__ = "orders"
    __table_args__ = (Index("ix_orders_tenant_strategy", "tenant", "strategy_id", "created_at"),)

    # The client order id the broker sees; the primary key fences duplicates.
    id: str = Field(primary_key=True, max_length=80)
    tenant: str = Field(max_length=128)
    strategy_id: str = Field(max_length=40)
    run: int
    symbol: str = Field(max_length=32)
    kind: str = Field(max_length=16)
    status: str = Field(max_length=16)
    quantity: int = Field(sa_column=Column(BigInteger, nullable=False))
    attempts: int = 0
    fill_price: str = Field(default="", max_length=32)
    broker_order_id: str = Field(default="", max_length=128)
    error: str = Field(default="", max_length=1000)
    created_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    updated_at: int = Field(sa_column=Column(BigInteger, nullable=False))


class IdempotencyRow(SQLModel, table=True):
    """The first answer to a Create/Start carrying a request_id, replayed on repeats."""

    __tablename__ = "idempotency_keys"

    tenant: str = Field(primary_key=True, max_length=128)
    request_id: str = Field(primary_key=True, max_length=64)
    fingerprint: str = Field(max_length=64)
    response: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: int = Field(sa_column=Column(BigInteger, nullable=False))


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    request_id: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class StoredResponse:
    fingerprint: str
    body: dict[str, str]


class IdempotencyConflict(Exception):
    """Another call stored a response under the same request_id first."""


Transition = Callable[[Strategy, Runtime], Runtime]
# A strategy with its runtime (None: no such strategy) and one of its orders (None: not stored).
Found = tuple[tuple[Strategy, Runtime] | None, Order | None]


class Database:
    """Async access to the durable store; nothing here blocks the event loop."""

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        """`timeout_s` bounds each PostgreSQL connect and statement, so a DB that stopped
        answering (a cut network, a stalled server) fails the call instead of hanging it."""
        self._sqlite = url.startswith("sqlite")
        self._engine: AsyncEngine = create_async_engine(url, **_engine_options(url, timeout_s))
        if self._sqlite:
            event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        # On SQLite (one writer at a time) every write and the engine's reads go through
        # one thread (SqliteWriter); the SQLAlchemy paths below that write serve PostgreSQL.
        self._hot_writer: SqliteWriter | None = None
        self._bulk_reader: SqliteWriter | None = None
        if self._sqlite:
            path = make_url(url).database
            if path in (None, "", ":memory:"):  # Settings refuses these; direct callers too
                raise ValueError("SQLite needs a file, not an in-memory database")
            self._hot_writer = SqliteWriter(
                path, strategies=StrategyRow.__tablename__, orders=OrderRow.__tablename__
            )
            # Bulk reads (the timer sync: up to every live strategy) on a thread and
            # connection of their own: on the writer's thread they would hold up the engine's
            # reads and commits, a stop-loss exit's among them. WAL lets both run at once.
            self._bulk_reader = SqliteWriter(
                path, strategies=StrategyRow.__tablename__, orders=OrderRow.__tablename__
            )

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def create_schema(self) -> None:
        """The one place the schema is created (idempotent). Replicas starting together on
        a new DB race on CREATE TABLE; the loser's next pass finds the tables and is done."""
        for attempt in range(_SCHEMA_ATTEMPTS):
            try:
                async with self._engine.begin() as conn:
                    await conn.run_sync(SQLModel.metadata.create_all)
                return
            except DBAPIError:
                if attempt == _SCHEMA_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.1 * (attempt + 1))

    async def ping(self) -> None:
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        for thread in (self._hot_writer, self._bulk_reader):
            if thread is not None:
                await thread.close()
        await self._engine.dispose()

    async def get_response(self, tenant: str, request_id: str) -> StoredResponse | None:
        if self._hot_writer is not None:
            found = await self._hot_writer.fetch_one(
                IdempotencyRow.__tablename__, {"tenant": tenant, "request_id": request_id}
            )
            if found is None:
                return None
            return StoredResponse(found["fingerprint"], json.loads(found["response"]))
        async with AsyncSession(self._engine) as session:
            row = await session.get(IdempotencyRow, (tenant, request_id))
            if row is None:
                return None
            return StoredResponse(row.fingerprint, json.loads(row.response))

    async def insert_strategy(
        self,
        strategy: Strategy,
        runtime: Runtime,
        idempotency: IdempotencyKey | None,
        response: dict[str, str],
    ) -> None:
        """Inserts a new strategy and, atomically with it, the response to replay.
        Raises IdempotencyConflict when the request_id was taken meanwhile."""
        if self._hot_writer is not None:
            rows = [(StrategyRow.__tablename__, _row_values(strategy, runtime))]
            if idempotency is not None:
                idem = _idem_values(strategy.tenant, idempotency, response, runtime)
                rows.append((IdempotencyRow.__tablename__, idem))
            try:
                await self._hot_writer.insert(rows)
            except sqlite3.IntegrityError:
                raise IdempotencyConflict() from None
            return
        async with AsyncSession(self._engine, expire_on_commit=False) as session:
            session.add(_to_row(strategy, runtime))
            if idempotency is not None:
                session.add(_idem_row(strategy.tenant, idempotency, response, runtime))
            await _commit(session)

    async def get_strategy(self, tenant: str, strategy_id: str) -> tuple[Strategy, Runtime]:
        async with AsyncSession(self._engine) as session:
            row = await session.get(StrategyRow, strategy_id)
        if row is None or row.tenant != tenant:
            raise strategy_not_found(strategy_id)
        return _strategy(row), _runtime(row)

    async def list_strategies(
        self, tenant: str, status: StrategyStatus | None, after_id: str, limit: int
    ) -> list[Strategy]:
        query = select(StrategyRow).where(StrategyRow.tenant == tenant)
        if status is not None:
            query = query.where(StrategyRow.status == status.value)
        if after_id:
            query = query.where(col(StrategyRow.id) > after_id)
        query = query.order_by(col(StrategyRow.id)).limit(limit)
        async with AsyncSession(self._engine) as session:
            rows = (await session.exec(query)).all()
        return [_strategy(row) for row in rows]

    async def transition(
        self,
        tenant: str,
        strategy_id: str,
        change: Transition,
        idempotency: IdempotencyKey | None = None,
    ) -> tuple[Strategy, Runtime, bool]:
        """Applies `change` to the stored runtime with optimistic concurrency (a version
        check), storing the idempotent response in the same transaction.
        Returns (strategy, runtime, changed); domain errors from `change` propagate."""
        if self._hot_writer is not None:
            done = await self._transition_hot(
                self._hot_writer, tenant, strategy_id, change, idempotency, replay=False
            )
            assert not isinstance(done, StoredResponse)  # only a replay returns one
            return done
        for _ in range(_MAX_CONFLICT_RETRIES):
            async with AsyncSession(self._engine, expire_on_commit=False) as session:
                row = await session.get(StrategyRow, strategy_id)
                if row is None or row.tenant != tenant:
                    raise strategy_not_found(strategy_id)
                strategy, current = _strategy(row), _runtime(row)
                updated = change(strategy, current)
                if updated == current:
                    return strategy, current, False
                if not await _update_if_version(session, row, updated):
                    continue
                if idempotency is not None:
                    session.add(_idem_row(tenant, idempotency, {}, updated))
                await _commit(session)
                return _with_status(strategy, updated), updated, True
        raise RuntimeError(f"strategy {strategy_id}: too many concurrent updates")

    async def transition_once(
        self,
        tenant: str,
        strategy_id: str,
        change: Transition,
        idempotency: IdempotencyKey,
    ) -> StoredResponse | tuple[Strategy, Runtime, bool]:
        """transition() for a call with a request_id, unless a response is already stored
        under it: then that response. On SQLite the stored response, the strategy, the
        change and the write are one hop (a Start by id paid two, and a third for the
        lookup alone before that)."""
        if self._hot_writer is None:
            stored = await self.get_response(tenant, idempotency.request_id)
            if stored is not None:
                return stored
            return await self.transition(tenant, strategy_id, change, idempotency)
        return await self._transition_hot(
            self._hot_writer, tenant, strategy_id, change, idempotency, replay=True
        )

    async def _transition_hot(
        self,
        writer: SqliteWriter,
        tenant: str,
        strategy_id: str,
        change: Transition,
        idempotency: IdempotencyKey | None,
        *,
        replay: bool,
    ) -> StoredResponse | tuple[Strategy, Runtime, bool]:
        """transition() on SQLite in one hop and one transaction: the read, `change` (a pure
        function of the domain, run on the writer's thread) and the version-checked write.
        With `replay`, a response stored under the idempotency key comes back instead."""
        queries = [(StrategyRow.__tablename__, {"id": strategy_id})]
        if replay and idempotency is not None:
            where = {"tenant": tenant, "request_id": idempotency.request_id}
            queries.append((IdempotencyRow.__tablename__, where))

        def decide(
            rows: list[dict[str, Any] | None],
        ) -> tuple[StoredResponse | tuple[Strategy, Runtime, bool], RowUpdate | None]:
            values, stored = rows[0], rows[1] if len(rows) > 1 else None
            if stored is not None:
                return StoredResponse(stored["fingerprint"], json.loads(stored["response"])), None
            if values is None or values["tenant"] != tenant:
                raise strategy_not_found(strategy_id)
            row = cast(StrategyRow, SimpleNamespace(**values))
            strategy, current = _strategy(row), _runtime(row)
            updated = change(strategy, current)
            if updated == current:
                return (strategy, current, False), None
            inserts = []
            if idempotency is not None:
                idem = _idem_values(tenant, idempotency, {}, updated)
                inserts.append((IdempotencyRow.__tablename__, idem))
            update = (strategy_id, current.version, _runtime_values(updated), inserts)
            return (_with_status(strategy, updated), updated, True), update

        try:
            return await writer.read_and_update(queries, decide)
        except sqlite3.IntegrityError:
            raise IdempotencyConflict() from None

    async def list_live(self) -> list[tuple[Strategy, Runtime]]:
        """Every started, unfinished strategy: what the scheduler must have timers for."""
        live = [StrategyStatus.SCHEDULED.value, StrategyStatus.RUNNING.value]
        if self._hot_writer is not None:
            return await self._hot_strategies("status IN (?, ?)", live)
        return await self._strategies(col(StrategyRow.status).in_(live))

    async def find_with_order(
        self, strategy_id: str, order_id: str
    ) -> tuple[tuple[Strategy, Runtime] | None, Order | None]:
        """A strategy (by id alone: the engine acts for every tenant) and one of its orders,
        in one read; (None, None) when the strategy does not exist."""
        if self._hot_writer is not None:
            return (await self.find_many([(strategy_id, order_id)]))[0]
        async with AsyncSession(self._engine) as session:
            row = await session.get(StrategyRow, strategy_id)
            order = await session.get(OrderRow, order_id) if row is not None else None
        found = (_strategy(row), _runtime(row)) if row is not None else None
        return found, (_order(order) if order is not None else None)

    async def find_many(self, pairs: list[tuple[str, str]]) -> list[Found]:
        """find_with_order() for many (strategy id, order id) pairs, in one read on SQLite."""
        if self._hot_writer is None:
            return [await self.find_with_order(sid, oid) for sid, oid in pairs]
        return [_found(*row) for row in await self._hot_writer.find_many(pairs)]

    async def read_and_save_intents(
        self,
        pairs: list[tuple[str, str]],
        decide: Callable[[list[Found]], list[tuple[Runtime, list[tuple[Order, int]]] | None]],
    ) -> list[bool | None]:
        """find_many(), then save_many(fresh=True) of what `decide` makes of it (None for a
        pair: nothing to write; an order written must be its pair's); per pair, whether its
        write went through (None: none asked). On SQLite both run in one transaction and one
        thread hop, and `decide` runs on that thread: it must not touch the event loop. A
        stop-loss exit pays one hop between taking its lock and calling the broker, not a
        read and then a commit."""
        if self._hot_writer is None:
            changes = decide(await self.find_many(pairs))
            asked: list[tuple[Runtime | None, list[tuple[Order, int]]]] = [
                change for change in changes if change is not None
            ]
            saved = iter(await self.save_many(asked, fresh=True))
            return [None if change is None else next(saved) for change in changes]

        def on_thread(rows: list[tuple[Any, Any]]) -> list[Any]:
            changes = decide([_found(*row) for row in rows])
            return [None if change is None else _save_item(*change) for change in changes]

        return await self._hot_writer.read_and_save(pairs, on_thread)

    async def list_changed_since(
        self, since_us: int, known: Callable[[str, int], bool] | None = None
    ) -> list[tuple[Strategy, Runtime]]:
        """Every strategy whose runtime changed at or after `since_us`, live or not, except
        those for which `known(id, version)` is true (rows skipped before they are built)."""
        if self._hot_writer is not None:
            return await self._hot_strategies("updated_at >= ?", [since_us], known)
        found = await self._strategies(col(StrategyRow.updated_at) >= since_us)
        if known is None:
            return found
        return [(s, r) for s, r in found if not known(s.id, r.version)]

    async def _hot_strategies(
        self, where: str, params: list[Any], known: Callable[[str, int], bool] | None = None
    ) -> list[tuple[Strategy, Runtime]]:
        """On SQLite, read on the bulk reader's thread into plain holders: the timer sync
        reads every strategy changed in the last seconds, thousands under load, and the
        ORM's per-row cost on the event loop showed as stalls of StartStrategy."""
        assert self._bulk_reader is not None
        table = StrategyRow.__tablename__
        if known is None:
            rows = await self._bulk_reader.fetch_where(table, where, params)
        else:
            # Ids and versions first, the whole rows only of those not known: during a burst
            # of Starts nearly every changed row is one this process scheduled itself, and
            # building each as a dict held the interpreter lock for ~5% of the Starts' time.
            versions = await self._bulk_reader.fetch_versions(table, where, params)
            wanted = [sid for sid, version in versions if not known(sid, version)]
            rows = await self._bulk_reader.fetch_by_ids(table, wanted) if wanted else []
        found = [cast(StrategyRow, SimpleNamespace(**values)) for values in rows]
        return [(_strategy(row), _runtime(row)) for row in found]

    async def _strategies(self, condition: Any) -> list[tuple[Strategy, Runtime]]:
        async with AsyncSession(self._engine) as session:
            rows = (await session.exec(select(StrategyRow).where(condition))).all()
        return [(_strategy(row), _runtime(row)) for row in rows]

    async def list_unfinished_orders(self, updated_before_us: int) -> list[tuple[Order, int]]:
        """Orders whose intent is committed but not final (PENDING, SUBMITTED, UNKNOWN), last
        touched before the given instant, with their run."""
        unfinished = [
            OrderStatus.PENDING.value,
            OrderStatus.SUBMITTED.value,
            OrderStatus.UNKNOWN.value,
        ]
        query = (
            select(OrderRow)
            .where(col(OrderRow.status).in_(unfinished))
            .where(col(OrderRow.updated_at) < updated_before_us)
            .order_by(col(OrderRow.created_at))
        )
        async with AsyncSession(self._engine) as session:
            rows = (await session.exec(query)).all()
        return [(_order(row), row.run) for row in rows]

    async def save(
        self, runtime: Runtime | None, orders: list[tuple[Order, int]], *, fresh: bool = False
    ) -> bool:
        """Commits orders (upserted by client order id) and the runtime together. The runtime
        is written only over the version just before it; False (nothing written) otherwise.
        `fresh`: the orders are new intents; False (nothing written) if one is stored."""
        if self._hot_writer is not None:
            return (await self.save_many([(runtime, orders)], fresh=fresh))[0]
        # A plain connection: no ORM unit of work to flush; leaving without commit rolls back.
        async with self._engine.connect() as conn:
            if fresh and orders:
                ids = [order.id for order, _ in orders]
                stored = await conn.execute(select(OrderRow.id).where(col(OrderRow.id).in_(ids)))
                if stored.first() is not None:
                    return False
            if runtime is not None:
                result = await conn.execute(
                    update(StrategyRow)
                    .where(col(StrategyRow.id) == runtime.strategy_id)
                    .where(col(StrategyRow.version) == runtime.version - 1)
                    .values(**_runtime_values(runtime))
                )
                if result.rowcount != 1:
                    return False  # rolled back on leaving
            for order, run in orders:
                await conn.execute(self._upsert_order(_order_values(order, run)))
            await conn.commit()
            return True

    async def save_many(
        self,
        changes: list[tuple[Runtime | None, list[tuple[Order, int]]]],
        *,
        fresh: bool = False,
    ) -> list[bool]:
        """save() for many strategies: on SQLite one transaction, in which each change is
        written only if its own checks hold (False for one that did not)."""
        if self._hot_writer is None:
            return [await self.save(runtime, orders, fresh=fresh) for runtime, orders in changes]
        return await self._hot_writer.save_many(
            [_save_item(runtime, orders) for runtime, orders in changes], fresh=fresh
        )

    def _upsert_order(self, values: dict[str, Any]) -> Any:
        """One INSERT .. ON CONFLICT DO UPDATE by client order id (PostgreSQL; SQLite's goes
        through SqliteWriter), instead of a read and an ORM flush."""
        statement = postgresql.insert(OrderRow).values(**values)
        changed = {key: statement.excluded[key] for key in values if key != "id"}
        return statement.on_conflict_do_update(index_elements=["id"], set_=changed)

    async def list_orders(self, tenant: str, strategy_id: str) -> list[Order]:
        query = select(OrderRow).where(OrderRow.tenant == tenant)
        if strategy_id:
            query = query.where(OrderRow.strategy_id == strategy_id)
        query = query.order_by(col(OrderRow.created_at), col(OrderRow.id))
        async with AsyncSession(self._engine) as session:
            rows = (await session.exec(query)).all()
        return [_order(row) for row in rows]


def _found(values: dict[str, Any] | None, order_values: dict[str, Any] | None) -> Found:
    """SqliteWriter's columns as a strategy, its runtime and an order."""
    if values is None:
        return None, None
    # Plain attribute holders: SQLModel's model_construct and SQLAlchemy's instrumented
    # attributes cost more than the conversion itself, on every order of a burst.
    hot = cast(StrategyRow, SimpleNamespace(**values))
    hot_order = cast(OrderRow, SimpleNamespace(**order_values)) if order_values else None
    return (_strategy(hot), _runtime(hot)), _order(hot_order) if hot_order else None


def _save_item(
    runtime: Runtime | None, orders: list[tuple[Order, int]]
) -> tuple[str, int | None, dict[str, Any] | None, list[dict[str, Any]]]:
    """A change as SqliteWriter writes it."""
    return (
        runtime.strategy_id if runtime is not None else "",
        runtime.version - 1 if runtime is not None else None,
        _runtime_values(runtime) if runtime is not None else None,
        [_order_values(order, run) for order, run in orders],
    )


def _engine_options(url: str, timeout_s: float) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 10}}
    return {
        "pool_pre_ping": True,
        "pool_size": 10,
        "max_overflow": 20,
        "pool_timeout": 5,
        # asyncpg: bound on connecting and on every statement (raises TimeoutError).
        "connect_args": {"timeout": timeout_s, "command_timeout": timeout_s},
    }


def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


async def _commit(session: AsyncSession) -> None:
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise IdempotencyConflict() from None


async def _update_if_version(session: AsyncSession, row: StrategyRow, runtime: Runtime) -> bool:
    values = _runtime_values(runtime)
    result = await session.exec(
        update(StrategyRow)
        .where(col(StrategyRow.id) == row.id, col(StrategyRow.version) == row.version)
        .values(**values)
    )
    if result.rowcount != 1:
        await session.rollback()
        return False
    return True


def _idem_row(
    tenant: str, key: IdempotencyKey, response: dict[str, str], runtime: Runtime
) -> IdempotencyRow:
    return IdempotencyRow(**_idem_values(tenant, key, response, runtime))


def _idem_values(
    tenant: str, key: IdempotencyKey, response: dict[str, str], runtime: Runtime
) -> dict[str, Any]:
    """The row's columns; the SQLite path inserts them as they are (building the SQLModel
    object and dumping it again was a tenth of a StartStrategy)."""
    body = response or runtime_to_flat(runtime)
    return {
        "tenant": tenant,
        "request_id": key.request_id,
        "fingerprint": key.fingerprint,
        "response": json.dumps(body, sort_keys=True).encode(),
        "created_at": to_micros(runtime.updated_at),
    }


def _runtime_values(runtime: Runtime) -> dict[str, Any]:
    return {
        "status": runtime.status.value,
        "position": runtime.position.value,
        "run": runtime.run,
        "version": runtime.version,
        "entry_price": format_decimal(runtime.entry_price),
        "exit_price": format_decimal(runtime.exit_price),
        "last_price": format_decimal(runtime.last_price),
        "last_buy_order_id": runtime.last_buy_order_id,
        "last_sell_order_id": runtime.last_sell_order_id,
        "last_sl_order_id": runtime.last_sl_order_id,
        "failure_reason": runtime.failure_reason,
        "updated_at": to_micros(runtime.updated_at),
        "terminated_at": to_micros(runtime.terminated_at) if runtime.terminated_at else None,
    }


def _to_row(strategy: Strategy, runtime: Runtime) -> StrategyRow:
    return StrategyRow(**_row_values(strategy, runtime))


def _row_values(strategy: Strategy, runtime: Runtime) -> dict[str, Any]:
    spec = strategy.spec
    return {
        "id": strategy.id,
        "tenant": strategy.tenant,
        "symbol": spec.symbol,
        "quantity": spec.quantity,
        "buy_time": to_micros(spec.buy_time),
        "sell_time": to_micros(spec.sell_time),
        "stop_loss": format_decimal(spec.stop_loss),
        "created_at": to_micros(strategy.created_at),
        **_runtime_values(runtime),
    }


def _strategy(row: StrategyRow) -> Strategy:
    return Strategy(
        id=row.id,
        tenant=row.tenant,
        spec=StrategySpec(
            symbol=row.symbol,
            quantity=row.quantity,
            buy_time=from_micros(row.buy_time),
            sell_time=from_micros(row.sell_time),
            stop_loss=Decimal(row.stop_loss),
        ),
        status=StrategyStatus(row.status),
        created_at=from_micros(row.created_at),
        updated_at=from_micros(row.updated_at),
    )


def _with_status(strategy: Strategy, runtime: Runtime) -> Strategy:
    return replace(strategy, status=runtime.status, updated_at=runtime.updated_at)


def _runtime(row: StrategyRow) -> Runtime:
    return Runtime(
        strategy_id=row.id,
        tenant=row.tenant,
        symbol=row.symbol,
        status=StrategyStatus(row.status),
        position=Position(row.position),
        version=row.version,
        run=row.run,
        updated_at=from_micros(row.updated_at),
        entry_price=_decimal(row.entry_price),
        exit_price=_decimal(row.exit_price),
        last_price=_decimal(row.last_price),
        last_buy_order_id=row.last_buy_order_id,
        last_sell_order_id=row.last_sell_order_id,
        last_sl_order_id=row.last_sl_order_id,
        failure_reason=row.failure_reason,
        terminated_at=from_micros(row.terminated_at) if row.terminated_at is not None else None,
    )


def _decimal(raw: str) -> Decimal | None:
    return Decimal(raw) if raw else None


def _order_values(order: Order, run: int) -> dict[str, Any]:
    return {
        "id": order.id,
        "tenant": order.tenant,
        "strategy_id": order.strategy_id,
        "run": run,
        "symbol": order.symbol,
        "kind": order.kind.value,
        "status": order.status.value,
        "quantity": order.quantity,
        "attempts": order.attempts,
        "fill_price": format_decimal(order.fill_price),
        "broker_order_id": order.broker_order_id,
        "error": order.error,
        "created_at": to_micros(order.created_at),
        "updated_at": to_micros(order.updated_at),
    }


def _order(row: OrderRow) -> Order:
    return Order(
        id=row.id,
        tenant=row.tenant,
        strategy_id=row.strategy_id,
        symbol=row.symbol,
        kind=OrderKind(row.kind),
        status=OrderStatus(row.status),
        quantity=row.quantity,
        attempts=row.attempts,
        created_at=from_micros(row.created_at),
        updated_at=from_micros(row.updated_at),
        fill_price=_decimal(row.fill_price),
        broker_order_id=row.broker_order_id,
        error=row.error,
    )


__all__ = [
    "Database",
    "IdempotencyConflict",
    "IdempotencyKey",
    "OrderRow",
    "StoredResponse",
    "StrategyRow",
]
