"""SqliteWriter's group commit: the writes of one hop share a transaction, each request in a
savepoint of its own, and no result leaves before the hop's COMMIT.

A hop is what the writer's thread finds queued when it looks. To put several requests in one
hop for certain, each test first holds the thread with a request that waits on a gate (the
writer's own `_call`, as every public method uses it), queues the requests, then opens it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from server.store.sqlite_writer import _GROUP_MAX, SqliteWriter

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


def _status(status: str) -> dict[str, Any]:
    return {"status": status}


def _order(order_id: str, strategy_id: str) -> dict[str, Any]:
    return {"id": order_id, "strategy_id": strategy_id, "status": "NEW"}


async def _foreign_keys_on(writer: SqliteWriter) -> None:
    # Off by default in SQLite: a deferred foreign key is how a test makes a COMMIT fail.
    await writer._call(lambda: writer._connection().execute("PRAGMA foreign_keys=ON"))


async def test_each_request_of_a_hop_keeps_its_own_outcome(
    writer: SqliteWriter, db_path: Path
) -> None:
    results = await _in_one_hop(
        writer,
        writer.save("s0", 1, _status("SCHEDULED"), [_order("o0", "s0")]),
        writer.save("s1", 7, _status("SCHEDULED"), [_order("o1", "s1")]),  # stale version
        writer.insert([("keys", {"k": "taken"})]),
        # Its UPDATE runs, then its insert hits the key taken just before: its savepoint is
        # rolled back, the UPDATE with it.
        writer.save("s2", 1, _status("SCHEDULED"), [], [("keys", {"k": "taken"})]),
        writer.fetch_one("strategies", {"id": "s0"}),  # sees the write before it
    )

    assert results[0] is True
    assert results[1] is False
    assert results[2] is None
    assert isinstance(results[3], sqlite3.IntegrityError)
    assert results[4] == {"id": "s0", "status": "SCHEDULED", "version": 1}
    assert _rows(db_path, "SELECT id, status FROM strategies ORDER BY id") == [
        ("s0", "SCHEDULED"),
        ("s1", "CREATED"),
        ("s2", "CREATED"),
    ]
    assert _rows(db_path, "SELECT id FROM orders") == [("o0",)]
    assert _rows(db_path, "SELECT k FROM keys") == [("taken",)]


async def test_a_failed_commit_fails_every_request_of_the_hop_and_writes_nothing(
    writer: SqliteWriter, db_path: Path
) -> None:
    await _foreign_keys_on(writer)
    results = await _in_one_hop(
        writer,
        writer.save("s0", 1, _status("SCHEDULED"), []),
        writer.fetch_one("strategies", {"id": "s0"}),  # saw a write that never committed
        writer.insert([("orders", _order("o-orphan", "no-such-strategy"))]),  # fails at COMMIT
    )

    assert all(isinstance(result, sqlite3.IntegrityError) for result in results), results
    assert _rows(db_path, "SELECT status FROM strategies WHERE id = 's0'") == [("CREATED",)]
    assert _rows(db_path, "SELECT id FROM orders") == []
    # The writer goes on: the next hop opens a transaction of its own.
    assert await writer.save("s0", 1, _status("SCHEDULED"), []) is True
    assert _rows(db_path, "SELECT status FROM strategies WHERE id = 's0'") == [("SCHEDULED",)]


async def test_a_long_hop_commits_in_groups_of_bounded_size(
    writer: SqliteWriter, db_path: Path
) -> None:
    await _foreign_keys_on(writer)
    count = _GROUP_MAX + 10
    requests = [writer.insert([("keys", {"k": f"k{n}"})]) for n in range(count)]
    # The last group's COMMIT fails: only the requests of that group fail.
    requests.append(writer.insert([("orders", _order("o-orphan", "no-such-strategy"))]))
    results = await _in_one_hop(writer, *requests)

    assert results[:_GROUP_MAX] == [None] * _GROUP_MAX
    assert all(isinstance(r, sqlite3.IntegrityError) for r in results[_GROUP_MAX:]), results
    assert _rows(db_path, "SELECT count(*) FROM keys") == [(_GROUP_MAX,)]


async def test_close_commits_what_its_hop_wrote_first(db_path: Path) -> None:
    writer = SqliteWriter(str(db_path), strategies="strategies", orders="orders")
    results = await _in_one_hop(
        writer, writer.save("s0", 1, _status("SCHEDULED"), []), writer.close()
    )

    assert results == [True, None]
    assert _rows(db_path, "SELECT status FROM strategies WHERE id = 's0'") == [("SCHEDULED",)]
