"""server.store.db.Database against SQLite and, when 127.0.0.1:5432 answers, PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from server.domain import (
    Order,
    OrderKind,
    OrderStatus,
    Position,
    Runtime,
    Strategy,
    StrategySpec,
    StrategyStatus,
    new_strategy_id,
)
from server.errors import FailedPrecondition, NotFound, strategy_not_found
from server.store.codec import to_micros
from server.store.db import (
    Database,
    Found,
    IdempotencyConflict,
    IdempotencyKey,
    StoredResponse,
)
from tests.conftest import make_settings, start_harness, stop_harness
from tests.support import RedisProcess, aio_stub, auth, spec

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"
TENANT, OTHER = "tenant-a", "tenant-b"
T0 = datetime(2031, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def postgres_answers() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """A uniquely named, empty PostgreSQL database, dropped afterwards."""
    if not postgres_answers():
        pytest.skip(f"PostgreSQL does not answer on {PG_HOST}:{PG_PORT}")
    name = f"algoplane_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'algoplane.db'}"
        return
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await database.create_schema()
    try:
        yield database
    finally:
        await database.close()


def make_strategy(
    *,
    tenant: str = TENANT,
    at: datetime = T0,
    status: StrategyStatus = StrategyStatus.CREATED,
    stop_loss: str = "95.5",
) -> tuple[Strategy, Runtime]:
    strategy = Strategy(
        id=new_strategy_id(at),
        tenant=tenant,
        spec=StrategySpec(
            symbol="NSE:SBIN-EQ",
            quantity=1_000_000_000,
            buy_time=at + timedelta(hours=1, microseconds=1),
            sell_time=at + timedelta(days=7, hours=1, microseconds=999_999),
            stop_loss=Decimal(stop_loss),
        ),
        status=status,
        created_at=at,
        updated_at=at,
    )
    runtime = Runtime(
        strategy_id=strategy.id,
        tenant=tenant,
        symbol=strategy.spec.symbol,
        status=status,
        position=Position.NONE,
        version=0,
        run=0,
        updated_at=at,
    )
    return strategy, runtime


async def insert(db: Database, strategy: Strategy, runtime: Runtime) -> None:
    await db.insert_strategy(strategy, runtime, None, {})


async def test_create_schema_is_idempotent(database_url: str) -> None:
    first = Database(database_url)
    try:
        await first.create_schema()
        await first.create_schema()
        strategy, runtime = make_strategy()
        await insert(first, strategy, runtime)
    finally:
        await first.close()
    second = Database(database_url)
    try:
        await second.create_schema()  # a restart keeps what is there
        assert await second.get_strategy(TENANT, strategy.id) == (strategy, runtime)
    finally:
        await second.close()


async def test_strategy_round_trip_is_exact(db: Database) -> None:
    strategy, blank = make_strategy(stop_loss="1234567890.12345678")
    runtime = replace(
        blank,
        status=StrategyStatus.STOPPED,
        position=Position.EXITED_BY_SL,
        version=7,
        run=3,
        entry_price=Decimal("101.25"),
        exit_price=Decimal("0.00000001"),
        last_price=Decimal("99.9"),
        last_buy_order_id="b" * 80,
        last_sell_order_id="s-1",
        last_sl_order_id="sl-1",
        failure_reason="broker said: ünïcode ✓",
        updated_at=T0 + timedelta(microseconds=1),
        terminated_at=T0 + timedelta(seconds=1, microseconds=999_999),
    )
    strategy = replace(strategy, status=runtime.status, updated_at=runtime.updated_at)
    await insert(db, strategy, runtime)

    got_strategy, got_runtime = await db.get_strategy(TENANT, strategy.id)
    assert got_strategy == strategy
    assert got_runtime == runtime
    assert str(got_strategy.spec.stop_loss) == "1234567890.12345678"
    assert got_strategy.spec.buy_time.microsecond == 678902
    assert got_runtime.terminated_at is not None
    assert got_runtime.terminated_at.tzinfo is not None
    assert got_runtime.terminated_at.microsecond == 678900


async def test_other_tenant_sees_not_found(db: Database) -> None:
    strategy, runtime = make_strategy()
    await insert(db, strategy, runtime)
    with pytest.raises(NotFound) as theirs:
        await db.get_strategy(OTHER, strategy.id)
    assert theirs.value.message == strategy_not_found(strategy.id).message

    unknown = new_strategy_id(T0)
    with pytest.raises(NotFound) as missing:
        await db.get_strategy(TENANT, unknown)
    assert missing.value.message == strategy_not_found(unknown).message

    with pytest.raises(NotFound):
        await db.transition(OTHER, strategy.id, lambda s, r: replace(r, version=r.version + 1))
    assert await db.get_strategy(TENANT, strategy.id) == (strategy, runtime)
    assert await db.list_strategies(OTHER, None, "", 10) == []


async def test_list_strategies_pages_and_filters(db: Database) -> None:
    statuses = [
        StrategyStatus.CREATED,
        StrategyStatus.SCHEDULED,
        StrategyStatus.CREATED,
        StrategyStatus.STOPPED,
        StrategyStatus.SCHEDULED,
    ]
    mine = []
    for i, status in enumerate(statuses):
        strategy, runtime = make_strategy(at=T0 + timedelta(milliseconds=i), status=status)
        await insert(db, strategy, runtime)
        mine.append(strategy)
    theirs, their_runtime = make_strategy(tenant=OTHER, at=T0 + timedelta(milliseconds=2))
    await insert(db, theirs, their_runtime)

    pages: list[list[Strategy]] = []
    after = ""
    while True:
        page = await db.list_strategies(TENANT, None, after, 2)
        if not page:
            break
        pages.append(page)
        after = page[-1].id
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [s for p in pages for s in p] == sorted(mine, key=lambda s: s.id)

    scheduled = await db.list_strategies(TENANT, StrategyStatus.SCHEDULED, "", 10)
    assert scheduled == [mine[1], mine[4]]
    assert await db.list_strategies(TENANT, StrategyStatus.SCHEDULED, mine[1].id, 10) == [mine[4]]
    assert await db.list_strategies(TENANT, StrategyStatus.FAILED, "", 10) == []
    assert await db.list_strategies(OTHER, None, "", 10) == [theirs]


def bump(_strategy: Strategy, current: Runtime) -> Runtime:
    version = current.version + 1
    return replace(
        current,
        version=version,
        last_price=Decimal(version),
        updated_at=current.updated_at + timedelta(microseconds=1),
    )


@pytest.mark.parametrize("writers", [2, 6])
async def test_concurrent_transitions_all_apply_in_sequence(db: Database, writers: int) -> None:
    strategy, runtime = make_strategy()
    await insert(db, strategy, runtime)

    results = await asyncio.gather(
        *(db.transition(TENANT, strategy.id, bump) for _ in range(writers))
    )
    assert all(changed for _, _, changed in results)
    assert sorted(r.version for _, r, _ in results) == list(range(1, writers + 1))

    _, stored = await db.get_strategy(TENANT, strategy.id)
    assert stored.version == writers
    assert stored.last_price == Decimal(writers)
    assert stored.updated_at == T0 + timedelta(microseconds=writers)


async def test_transition_without_change_or_with_refusal_writes_nothing(db: Database) -> None:
    strategy, runtime = make_strategy()
    await insert(db, strategy, runtime)

    _, same, changed = await db.transition(TENANT, strategy.id, lambda _s, r: r)
    assert (same, changed) == (runtime, False)

    def refuse(_s: Strategy, _r: Runtime) -> Runtime:
        raise FailedPrecondition("no")

    with pytest.raises(FailedPrecondition):
        await db.transition(TENANT, strategy.id, refuse)
    assert await db.get_strategy(TENANT, strategy.id) == (strategy, runtime)


async def test_idempotency_row_is_atomic_with_the_insert(db: Database) -> None:
    first, first_rt = make_strategy()
    key = IdempotencyKey("req-1", "fingerprint-1")
    await db.insert_strategy(first, first_rt, key, {"id": first.id})
    assert await db.get_response(TENANT, "req-1") == StoredResponse(
        "fingerprint-1", {"id": first.id}
    )
    assert await db.get_response(OTHER, "req-1") is None

    # The same request_id again: refused, and the second strategy is not stored either.
    second, second_rt = make_strategy(at=T0 + timedelta(milliseconds=1))
    with pytest.raises(IdempotencyConflict):
        await db.insert_strategy(second, second_rt, IdempotencyKey("req-1", "fp-2"), {"x": "y"})
    with pytest.raises(NotFound):
        await db.get_strategy(TENANT, second.id)
    assert await db.get_response(TENANT, "req-1") == StoredResponse(
        "fingerprint-1", {"id": first.id}
    )

    # A failing insert (the id exists) stores no response for its request_id.
    with pytest.raises(IdempotencyConflict):
        await db.insert_strategy(first, first_rt, IdempotencyKey("req-2", "fp"), {"a": "b"})
    assert await db.get_response(TENANT, "req-2") is None

    # request_ids are per tenant.
    theirs, theirs_rt = make_strategy(tenant=OTHER, at=T0 + timedelta(milliseconds=2))
    await db.insert_strategy(theirs, theirs_rt, IdempotencyKey("req-1", "x"), {"t": "b"})
    assert await db.get_response(OTHER, "req-1") == StoredResponse("x", {"t": "b"})


async def test_transition_stores_its_response_once(db: Database) -> None:
    strategy, runtime = make_strategy()
    await insert(db, strategy, runtime)
    key = IdempotencyKey("start-1", "fp")
    _, bumped, _ = await db.transition(TENANT, strategy.id, bump, key)
    stored = await db.get_response(TENANT, "start-1")
    assert stored is not None
    assert stored.fingerprint == "fp"
    assert stored.body["version"] == "1"
    assert stored.body["strategy_id"] == strategy.id

    # Reusing the key rolls the whole transition back.
    with pytest.raises(IdempotencyConflict):
        await db.transition(TENANT, strategy.id, bump, key)
    assert (await db.get_strategy(TENANT, strategy.id))[1] == bumped


async def test_transition_once_gives_back_the_stored_response_on_a_retry(db: Database) -> None:
    strategy, runtime = make_strategy()
    await insert(db, strategy, runtime)
    key = IdempotencyKey("start-1", "fp")
    first = await db.transition_once(TENANT, strategy.id, bump, key)
    assert not isinstance(first, StoredResponse)
    _, bumped, changed = first
    assert changed and bumped.version == runtime.version + 1

    retried = await db.transition_once(TENANT, strategy.id, bump, key)
    assert isinstance(retried, StoredResponse)
    assert retried.fingerprint == "fp"
    assert retried.body["version"] == str(bumped.version)
    # The retry changed nothing.
    assert (await db.get_strategy(TENANT, strategy.id))[1] == bumped

    # Another tenant's request_id of the same name is its own, and the strategy is not theirs.
    with pytest.raises(NotFound):
        await db.transition_once(OTHER, strategy.id, bump, key)
    with pytest.raises(NotFound):
        await db.transition_once(TENANT, "stg_" + "0" * 32, bump, IdempotencyKey("s-2", "fp"))
    assert await db.get_response(TENANT, "s-2") is None


def make_order(strategy: Strategy, kind: OrderKind, **changes: object) -> Order:
    order = Order(
        id=f"{strategy.id}-1-{kind.value}",
        tenant=strategy.tenant,
        strategy_id=strategy.id,
        symbol=strategy.spec.symbol,
        kind=kind,
        status=OrderStatus.PENDING,
        quantity=strategy.spec.quantity,
        attempts=0,
        created_at=T0,
        updated_at=T0,
    )
    return replace(order, **changes)  # type: ignore[arg-type]


async def test_changed_since_skips_only_the_versions_the_caller_knows(db: Database) -> None:
    """The timer sync's read: strategies changed since an instant, except those whose
    (id, version) the caller already holds; a known id at another version still comes back."""
    old, early, late = (make_strategy(at=T0 + timedelta(seconds=n)) for n in (0, 10, 20))
    for strategy, runtime in (old, early, late):
        await insert(db, strategy, runtime)
    since = to_micros(T0 + timedelta(seconds=5))

    def ids(found: list[tuple[Strategy, Runtime]]) -> set[str]:
        return {strategy.id for strategy, _ in found}

    assert ids(await db.list_changed_since(since)) == {early[0].id, late[0].id}
    known = {(early[0].id, 0)}
    got = await db.list_changed_since(since, known=lambda sid, v: (sid, v) in known)
    assert ids(got) == {late[0].id}
    ((strategy, runtime),) = got
    assert (strategy, runtime) == late  # built whole, as without `known`
    assert ids(await db.list_changed_since(since, known=lambda sid, v: True)) == set()
    stale = {(early[0].id, 7), (late[0].id, 0)}
    got = await db.list_changed_since(since, known=lambda sid, v: (sid, v) in stale)
    assert ids(got) == {early[0].id}


async def test_save_upserts_orders_and_lists_them(db: Database) -> None:
    strategy, runtime = make_strategy()
    other_strategy, other_rt = make_strategy(at=T0 + timedelta(milliseconds=1))
    theirs, their_rt = make_strategy(tenant=OTHER, at=T0 + timedelta(milliseconds=2))
    for s, r in ((strategy, runtime), (other_strategy, other_rt), (theirs, their_rt)):
        await insert(db, s, r)

    buy = make_order(strategy, OrderKind.BUY)
    assert await db.save(None, [(buy, 1)])
    assert await db.list_orders(TENANT, strategy.id) == [buy]

    filled = replace(
        buy,
        status=OrderStatus.FILLED,
        attempts=2,
        fill_price=Decimal("101.12345678"),
        broker_order_id="BRK-1",
        updated_at=T0 + timedelta(seconds=1, microseconds=1),
    )
    assert await db.save(None, [(filled, 1)])
    assert await db.list_orders(TENANT, strategy.id) == [filled]

    sell = make_order(
        strategy,
        OrderKind.SELL,
        created_at=T0 + timedelta(hours=1),
        updated_at=T0 + timedelta(hours=1),
        status=OrderStatus.REJECTED,
        error="market closed",
    )
    elsewhere = make_order(other_strategy, OrderKind.STOPLOSS, created_at=T0 + timedelta(1))
    their_order = make_order(theirs, OrderKind.BUY)
    for order in (elsewhere, sell, their_order):
        assert await db.save(None, [(order, 1)])

    assert await db.list_orders(TENANT, strategy.id) == [filled, sell]
    assert await db.list_orders(TENANT, "") == [filled, sell, elsewhere]
    assert await db.list_orders(OTHER, "") == [their_order]
    assert await db.list_orders(OTHER, strategy.id) == []


async def test_fresh_intent_is_refused_where_its_order_is_stored(db: Database) -> None:
    """save(fresh=True) commits an intent only if its order is not stored yet: nothing is
    written (not the runtime either) when it is, as when another holder got there first."""
    strategy, runtime = make_strategy(status=StrategyStatus.SCHEDULED)
    await insert(db, strategy, runtime)
    skipped = make_order(strategy, OrderKind.BUY, status=OrderStatus.SKIPPED, error="late")
    assert await db.save(None, [(skipped, 1)])

    intent = replace(skipped, status=OrderStatus.SUBMITTED, attempts=1, error="")
    later = replace(runtime, version=runtime.version + 1, last_buy_order_id=intent.id)
    assert not await db.save(later, [(intent, 1)], fresh=True)
    assert await db.save_many([(later, [(intent, 1)])], fresh=True) == [False]
    assert await db.list_orders(TENANT, strategy.id) == [skipped]
    assert (await db.get_strategy(TENANT, strategy.id))[1] == runtime

    sell = make_order(strategy, OrderKind.SELL, status=OrderStatus.SUBMITTED, attempts=1)
    assert await db.save(later, [(sell, 1)], fresh=True)
    assert await db.list_orders(TENANT, strategy.id) == [skipped, sell]
    assert (await db.get_strategy(TENANT, strategy.id))[1] == later


async def test_read_and_save_intents_writes_what_was_decided_from_what_it_read(
    db: Database,
) -> None:
    """read_and_save_intents hands `decide` what find_many would have read, writes only the
    changes it returns, and keeps their checks: per pair True (written), False (its order
    is stored already, or its runtime moved on: nothing of it written) or None (none
    asked)."""
    ready, ready_runtime = make_strategy(status=StrategyStatus.SCHEDULED)
    done, done_runtime = make_strategy(status=StrategyStatus.SCHEDULED)
    moved, moved_runtime = make_strategy(status=StrategyStatus.SCHEDULED)
    for strategy, runtime in ((ready, ready_runtime), (done, done_runtime), (moved, moved_runtime)):
        await insert(db, strategy, runtime)
    stored = make_order(done, OrderKind.BUY, status=OrderStatus.FILLED)
    assert await db.save(None, [(stored, 1)])
    intents = {
        s.id: make_order(s, OrderKind.BUY, status=OrderStatus.SUBMITTED, attempts=1)
        for s in (ready, done, moved)
    }
    pairs = [(s.id, intents[s.id].id) for s in (ready, done, moved)]
    pairs += [("no-such-strategy", "no-such-order"), (ready.id, "not-asked")]
    seen: list[object] = []

    def decide(found: list[Found]) -> list[tuple[Runtime, list[tuple[Order, int]]] | None]:
        seen.extend(found)
        changes: list[tuple[Runtime, list[tuple[Order, int]]] | None] = []
        for (sid, oid), (row, _) in zip(pairs, found, strict=True):
            if row is None or oid == "not-asked":
                changes.append(None)
                continue
            _, runtime = row
            # `moved` is written over a version that is not the stored one: a lost check.
            version = runtime.version + (2 if sid == moved.id else 1)
            after = replace(runtime, version=version, last_buy_order_id=oid)
            changes.append((after, [(intents[sid], 1)]))
        return changes

    assert await db.read_and_save_intents(pairs, decide) == [True, False, False, None, None]
    assert seen == [
        ((ready, ready_runtime), None),
        ((done, done_runtime), stored),
        ((moved, moved_runtime), None),
        (None, None),
        ((ready, ready_runtime), None),
    ]
    assert await db.list_orders(TENANT, ready.id) == [intents[ready.id]]
    assert await db.list_orders(TENANT, done.id) == [stored]
    assert await db.list_orders(TENANT, moved.id) == []
    assert (await db.get_strategy(TENANT, ready.id))[1].last_buy_order_id == intents[ready.id].id
    assert (await db.get_strategy(TENANT, done.id))[1] == done_runtime
    assert (await db.get_strategy(TENANT, moved.id))[1] == moved_runtime


@pytest.mark.postgres
async def test_server_on_postgresql_survives_a_restart(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    redis = Redis.from_url(redis_proc.url)
    await redis.flushall()
    await redis.aclose()
    async with fresh_postgres_database() as url:
        settings = make_settings(redis_proc.url, tmp_path / "data", database_url=url)
        harness = await start_harness(settings)
        try:
            stub = aio_stub(harness.channel)
            created = await stub.CreateStrategy(
                pb.CreateStrategyRequest(spec=spec(stop_loss="0.12345678")), metadata=auth()
            )
            started = await stub.StartStrategy(
                pb.StartStrategyRequest(strategy_id=created.id), metadata=auth()
            )
            before = await stub.GetStrategy(
                pb.GetStrategyRequest(strategy_id=created.id), metadata=auth()
            )
        finally:
            await stop_harness(harness)
        assert not (tmp_path / "data" / "algoplane.db").exists()  # nothing went to SQLite

        harness = await start_harness(settings)
        try:
            stub = aio_stub(harness.channel)
            after = await stub.GetStrategy(
                pb.GetStrategyRequest(strategy_id=created.id), metadata=auth()
            )
            assert after == before
            assert after.status == pb.STRATEGY_STATUS_SCHEDULED
            assert after.spec.stop_loss == "0.12345678"
            runtime = await stub.GetRuntime(
                pb.GetRuntimeRequest(strategy_id=created.id), metadata=auth()
            )
            assert runtime == started
            listed = await stub.ListStrategies(pb.ListStrategiesRequest(), metadata=auth())
            assert list(listed.strategies) == [after]
        finally:
            await stop_harness(harness)
