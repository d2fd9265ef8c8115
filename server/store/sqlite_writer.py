"""SqliteWriter: the engine's reads and commits on SQLite, each in one thread hop.

Through SQLAlchemy and aiosqlite, every statement of a transaction is a separate hop to the
connection's thread and back to the event loop, and SQLite's single writer means the write
lock is held across all of them. On a loop busy with a burst of orders each hop waits its
turn, so the lock was held for milliseconds per commit and the whole engine ran at about a
hundred orders a second. Here one thread owns one sqlite3 connection and runs the whole
transaction (BEGIN IMMEDIATE, the version-checked UPDATE, the upserts, COMMIT) in one call:
the loop waits once, and nothing else waits on it. The engine's read of an event's strategy
and order goes the same way (one hop instead of a session's several). Other writers (the
API's inserts and transitions) keep using SQLAlchemy; SQLite's busy timeout orders the two.

Requests that arrive while the thread is busy are run together in its next hop: under a burst
the thread would otherwise wait for the GIL once per request (the loop holds it), and one
hop per batch is what let the engine keep up.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from typing import Any, TypeVar

T = TypeVar("T")
_Job = tuple[Callable[[], Any], "asyncio.Future[Any]"]

_BUSY_TIMEOUT_S = 10.0


class SqliteWriter:
    def __init__(self, path: str, *, strategies: str, orders: str) -> None:
        self._path = path
        self._strategies = strategies
        self._orders = orders
        # One thread: the connection is used by it alone, and commits are serialised.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._conn: sqlite3.Connection | None = None
        # Appended on the loop, popped on the thread: deque's append/popleft are atomic.
        self._jobs: deque[_Job] = deque()
        self._draining = False

    async def save(
        self,
        strategy_id: str,
        previous: int | None,
        runtime: dict[str, Any] | None,
        orders: list[dict[str, Any]],
        inserts: list[tuple[str, dict[str, Any]]] | None = None,
    ) -> bool:
        """The runtime (only over stored version `previous`), the orders (upserted) and any
        other rows (inserted) in one transaction; False, and nothing written, when the stored
        version is not `previous`. sqlite3.IntegrityError when an inserted key is taken."""
        job = partial(self._save, strategy_id, previous, runtime, orders, inserts or [])
        return await self._call(job)

    async def find(
        self, strategy_id: str, order_id: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The strategy's row and the order's row (None when absent), as column dicts."""
        return await self._call(partial(self._find, strategy_id, order_id))

    async def insert(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        """(table, column values) rows in one transaction; sqlite3.IntegrityError when a key
        is taken (nothing written)."""
        await self._call(partial(self._insert, rows))

    async def fetch_one(self, table: str, where: dict[str, Any]) -> dict[str, Any] | None:
        """The row matching every column = value in `where`, as a dict."""
        return await self._call(partial(self._fetch_one, table, where))

    async def close(self) -> None:
        await self._call(self._close)
        self._thread.shutdown(wait=True)

    async def _call(self, job: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.append((job, future))
        if not self._draining:
            self._draining = True
            loop.run_in_executor(self._thread, self._drain, loop)
        return await future

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the thread: every job queued so far, then their results to the loop at once."""
        done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        while self._jobs:
            job, future = self._jobs.popleft()
            try:
                done.append((future, job(), None))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.append((future, None, exc))
        loop.call_soon_threadsafe(self._deliver, loop, done)

    def _deliver(
        self,
        loop: asyncio.AbstractEventLoop,
        done: list[tuple[asyncio.Future[Any], Any, BaseException | None]],
    ) -> None:
        """On the loop: results out; jobs queued since the thread's last look get a new hop."""
        for future, result, error in done:
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        if self._jobs:
            loop.run_in_executor(self._thread, self._drain, loop)
        else:
            self._draining = False

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                self._path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=True
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
            conn.row_factory = sqlite3.Row
            self._conn = conn
        return self._conn

    def _save(
        self,
        strategy_id: str,
        previous: int | None,
        runtime: dict[str, Any] | None,
        orders: list[dict[str, Any]],
        inserts: list[tuple[str, dict[str, Any]]],
    ) -> bool:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if runtime is not None and previous is not None:
                columns = tuple(runtime)
                params = {**runtime, "_id": strategy_id, "_previous": previous}
                cursor = conn.execute(_update_sql(self._strategies, columns), params)
                if cursor.rowcount != 1:
                    conn.execute("ROLLBACK")
                    return False
            for values in orders:
                conn.execute(_upsert_sql(self._orders, tuple(values)), values)
            for table, values in inserts:
                conn.execute(_insert_sql(table, tuple(values)), values)
            conn.execute("COMMIT")
            return True
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _find(
        self, strategy_id: str, order_id: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        conn = self._connection()
        strategy = conn.execute(
            f'SELECT * FROM "{self._strategies}" WHERE id = ?', (strategy_id,)
        ).fetchone()
        if strategy is None:
            return None, None
        order = conn.execute(f'SELECT * FROM "{self._orders}" WHERE id = ?', (order_id,)).fetchone()
        return dict(strategy), (dict(order) if order is not None else None)

    def _insert(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for table, values in rows:
                conn.execute(_insert_sql(table, tuple(values)), values)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _fetch_one(self, table: str, where: dict[str, Any]) -> dict[str, Any] | None:
        condition = " AND ".join(f'"{c}" = :{c}' for c in where)
        row = self._connection().execute(f'SELECT * FROM "{table}" WHERE {condition}', where)
        found = row.fetchone()
        return dict(found) if found is not None else None

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@cache
def _update_sql(table: str, columns: tuple[str, ...]) -> str:
    assignments = ", ".join(f'"{c}" = :{c}' for c in columns)
    return f'UPDATE "{table}" SET {assignments} WHERE id = :_id AND version = :_previous'


@cache
def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(f'"{c}"' for c in columns)
    values = ", ".join(f":{c}" for c in columns)
    return f'INSERT INTO "{table}" ({names}) VALUES ({values})'


@cache
def _upsert_sql(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(f'"{c}"' for c in columns)
    values = ", ".join(f":{c}" for c in columns)
    updates = ", ".join(f'"{c}" = excluded."{c}"' for c in columns if c != "id")
    return (
        f'INSERT INTO "{table}" ({names}) VALUES ({values}) '
        f"ON CONFLICT (id) DO UPDATE SET {updates}"
    )
