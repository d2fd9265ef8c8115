"""SqliteWriter's group commit: the API's writes in one hop share a transaction, each request
in a savepoint of its own, and no result leaves before the group's COMMIT; the engine's batch
writes stay a transaction each.

A hop is what the writer's thread finds queued when it looks. To put several requests in one
hop for certain, each test first holds the thread with a request that waits on a gate (the
writer's own `_call`, as every public method uses it), queues the requests, then opens it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Any

import pytest

from server.store.sqlite_writer import _GROUP_MAX, RowUpdate, SqliteWriter

Row = tuple[str, dict[str, Any]]

SCHEMA = """
CREATE TABLE strategies (id TEXT PRIMARY KEY, status TEXT NOT NULL, version INTEGER NOT NULL);
CREATE TABLE orders (
    id TEXT PRIMARY KEY,
    strategy_id TEXT NOT NULL REFERENCES strategies (id) DEFERRABLE INITIALLY DEFERRED,
    status TEXT NOT NULL
);
CREATE TABLE keys (k TEXT PRIMARY KEY);
"""


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "writer.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA)
        conn.executemany(
            "INSERT INTO strategies VALUES (?, 'CREATED', 1)", [(f"s{n}",) for n in range(3)]
        )
    return path


@pytest.fixture
async def writer(db_path: Path) -> AsyncIterator[SqliteWriter]:
    writer = SqliteWriter(str(db_path), strategies="strategies", orders="orders")
    yield writer
    await writer.close()


def _rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


async def _in_one_hop(writer: SqliteWriter, *requests: Awaitable[Any]) -> list[Any]:
    """Runs the requests in one hop of the writer's thread; their results or exceptions."""
    gate = threading.Event()
    held = asyncio.ensure_future(writer._call(gate.wait))
    await asyncio.sleep(0.05)  # the thread is inside the gate's hop
    tasks = [asyncio.ensure_future(request) for request in requests]
    await asyncio.sleep(0)  # every request is queued behind the gate
    gate.set()
    await held
    return await asyncio.gather(*tasks, return_exceptions=True)


def _start(
    writer: SqliteWriter, strategy_id: str, version: int, inserts: Sequence[Row] = ()
) -> Awaitable[bool]:
    """As a StartStrategy by id writes: read the row, decide, write; False when the stored
    version is not `version` (nothing written)."""

    def decide(rows: list[dict[str, Any] | None]) -> tuple[bool, RowUpdate | None]:
        (row,) = rows
        if row is None or row["version"] != version:
            return False, None
        runtime = {"status": "SCHEDULED", "version": version + 1}
        return True, (strategy_id, version, runtime, list(inserts))

    return writer.read_and_update([("strategies", {"id": strategy_id})], decide)


def _order(order_id: str, strategy_id: str) -> dict[str, Any]:
    return {"id": order_id, "strategy_id": strategy_id, "status": "NEW"}


async def _foreign_keys_on(writer: SqliteWriter) -> None:
    # Off by default in SQLite: a deferred foreign key is how a test makes a COMMIT fail.
    await writer._call(lambda: writer._connection().execute("PRAGMA foreign_keys=ON"))


ORPHAN: Row = ("orders", _order("o-orphan", "no-such-strategy"))  # fails at COMMIT


async def test_each_request_of_a_group_keeps_its_own_outcome(
    writer: SqliteWriter, db_path: Path
) -> None:
    results = await _in_one_hop(
        writer,
        _start(writer, "s0", 1),
        _start(writer, "s1", 7),  # stale version: writes nothing
        writer.insert([("keys", {"k": "taken"})]),
        # Its UPDATE runs, then its insert hits the key taken just before: its savepoint is
        # rolled back, the UPDATE with it.
        _start(writer, "s2", 1, [("keys", {"k": "taken"})]),
        writer.fetch_one("strategies", {"id": "s0"}),  # sees the write before it
    )

    assert results[:3] == [True, False, None]
    assert isinstance(results[3], sqlite3.IntegrityError)
    assert results[4] == {"id": "s0", "status": "SCHEDULED", "version": 2}
    assert _rows(db_path, "SELECT id, status, version FROM strategies ORDER BY id") == [
        ("s0", "SCHEDULED", 2),
        ("s1", "CREATED", 1),
        ("s2", "CREATED", 1),
    ]
    assert _rows(db_path, "SELECT k FROM keys") == [("taken",)]


async def test_a_failed_commit_fails_every_request_of_the_group_and_writes_nothing(
    writer: SqliteWriter, db_path: Path
) -> None:
    await _foreign_keys_on(writer)
    results = await _in_one_hop(
        writer,
        _start(writer, "s0", 1),
        writer.fetch_one("strategies", {"id": "s0"}),  # saw a write that never committed
        writer.insert([ORPHAN]),
    )

    assert all(isinstance(result, sqlite3.IntegrityError) for result in results), results
    assert _rows(db_path, "SELECT status FROM strategies WHERE id = 's0'") == [("CREATED",)]
    assert _rows(db_path, "SELECT id FROM orders") == []
    # The writer goes on: the next hop opens a transaction of its own.
    assert await _start(writer, "s0", 1) is True
    assert _rows(db_path, "SELECT status FROM strategies WHERE id = 's0'") == [("SCHEDULED",)]


async def test_a_long_hop_commits_in_groups_of_bounded_size(
    writer: SqliteWriter, db_path: Path
) -> None:
    await _foreign_keys_on(writer)
    count = _GROUP_MAX + 10
    requests = [writer.insert([("keys", {"k": f"k{n}"})]) for n in range(count)]
    requests.append(writer.insert([ORPHAN]))  # the second group's COMMIT fails
    results = await _in_one_hop(writer, *requests)

    assert results[:_GROUP_MAX] == [None] * _GROUP_MAX
    assert all(isinstance(r, sqlite3.IntegrityError) for r in results[_GROUP_MAX:]), results
    assert _rows(db_path, "SELECT count(*) FROM keys") == [(_GROUP_MAX,)]


async def test_an_engine_batch_is_a_transaction_of_its_own(
    writer: SqliteWriter, db_path: Path
) -> None:
    await _foreign_keys_on(writer)
    results = await _in_one_hop(
        writer,
        writer.insert([("keys", {"k": "before"})]),
        # An engine batch whose order names no strategy: its own COMMIT fails, alone.
        writer.save_many([("s0", 1, {"status": "BOUGHT", "version": 2}, [_order("o1", "nope")])]),
        writer.insert([("keys", {"k": "between"})]),
        writer.save_many([("s1", 1, {"status": "BOUGHT", "version": 2}, [_order("o2", "s1")])]),
        writer.insert([ORPHAN]),
    )

    assert results[0] is None
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert results[2] is None
    assert results[3] == [True]
    assert isinstance(results[4], sqlite3.IntegrityError)
    assert _rows(db_path, "SELECT k FROM keys ORDER BY k") == [("before",), ("between",)]
    assert _rows(db_path, "SELECT id, status FROM strategies WHERE version = 2") == [
        ("s1", "BOUGHT")
    ]
    assert _rows(db_path, "SELECT id FROM orders") == [("o2",)]


async def test_close_commits_what_its_hop_wrote_first(db_path: Path) -> None:
    writer = SqliteWriter(str(db_path), strategies="strategies", orders="orders")
    results = await _in_one_hop(writer, _start(writer, "s0", 1), writer.close())

    assert results == [True, None]
    assert _rows(db_path, "SELECT status FROM strategies WHERE id = 's0'") == [("SCHEDULED",)]
