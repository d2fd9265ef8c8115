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
hop per batch is what let the engine keep up. The writes of a hop also share a transaction
(group commit): each runs inside a savepoint of its own, so one that fails leaves nothing and
the others go on, and the group commits once: 64 concurrent Creates or Starts paid 64
COMMITs, now a few. No result leaves the thread before its group's COMMIT, and if that fails
every request of the group gets the error, as nothing of the group was written. The engine's
batch writes stay a transaction each (see `_call`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from typing import Any, TypeVar

T = TypeVar("T")
# (the request, its caller's future, whether it commits alone rather than in a group)
_Job = tuple[Callable[[], Any], "asyncio.Future[Any]", bool]

_BUSY_TIMEOUT_S = 10.0
# Requests per group transaction at most: a hop under a long run of API calls still commits
# every so often.
_GROUP_MAX = 256

# (strategy id, runtime version it must replace or None, runtime columns or None, order rows)
_SaveItem = tuple[str, int | None, dict[str, Any] | None, list[dict[str, Any]]]
# (strategy row, order row): column dicts, None when absent
_Found = tuple[dict[str, Any] | None, dict[str, Any] | None]
# (strategy id, runtime version it must replace, runtime columns, (table, row) to insert)
RowUpdate = tuple[str, int, dict[str, Any], list[tuple[str, dict[str, Any]]]]


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
        # On the thread: the index in the current hop's results of the first request run
        # inside the open group transaction; None while no group transaction is open.
        self._group_from: int | None = None
        # On the thread: the running request's index in the hop's results, and whether it
        # commits alone.
        self._hop_index = 0
        self._alone = False

    async def save_many(self, items: list[_SaveItem], *, fresh: bool = False) -> list[bool]:
        """save() for many strategies in one transaction, each with its own version check:
        an item whose stored version is not its `previous` writes nothing and gets False.
        `fresh`: the orders must not exist yet; an item with one that does gets False too."""
        return await self._call(partial(self._save_many, items, fresh), alone=True)

    async def find_many(self, pairs: list[tuple[str, str]]) -> list[_Found]:
        """find() for many (strategy id, order id) pairs in one hop."""
        return await self._call(partial(self._find_many, pairs))

    async def read_and_save(
        self, pairs: list[tuple[str, str]], decide: Callable[[list[_Found]], list[_SaveItem | None]]
    ) -> list[bool | None]:
        """find_many() and save_many(fresh=True) in one hop and one transaction: `decide`
        runs on this thread with what was read and names what to write for each pair (None:
        nothing); it may write only orders of the pairs. Returns, per pair, whether its
        write went through (None: none asked). The read is inside the write transaction, so
        the fresh check is the read's own (no second lookup); the version check stays."""
        return await self._call(partial(self._read_and_save, pairs, decide), alone=True)

    async def insert(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        """(table, column values) rows in one transaction; sqlite3.IntegrityError when a key
        is taken (nothing written)."""
        await self._call(partial(self._insert, rows))

    async def fetch_one(self, table: str, where: dict[str, Any]) -> dict[str, Any] | None:
        """The row matching every column = value in `where`, as a dict."""
        return await self._call(partial(self._fetch_one, table, where))

    async def read_and_update(
        self,
        queries: list[tuple[str, dict[str, Any]]],
        decide: Callable[[list[dict[str, Any] | None]], tuple[T, RowUpdate | None]],
    ) -> T:
        """fetch_one() for each (table, where) and save() in one hop and one transaction:
        `decide` runs on this thread with the rows read and returns its result and what to
        write (None: nothing). Nothing can change between the read and the write; an error
        from `decide` writes nothing and reaches the caller."""
        return await self._call(partial(self._read_and_update, queries, decide))

    async def fetch_where(self, table: str, where: str, params: list[Any]) -> list[dict[str, Any]]:
        """Every row of `table` matching `where` (SQL with ? placeholders: our own text,
        never a caller's input; the values go in `params`)."""
        return await self._call(partial(self._fetch_where, table, where, params))

    async def fetch_versions(
        self, table: str, where: str, params: list[Any]
    ) -> list[tuple[str, int]]:
        """(id, version) of every row of `table` matching `where` (as fetch_where): plain
        tuples, a fraction of a whole row's cost in Python."""
        return await self._call(partial(self._fetch_versions, table, where, params))

    async def fetch_by_ids(self, table: str, ids: list[str]) -> list[dict[str, Any]]:
        """The rows of `table` with these ids (those that exist)."""
        return await self._call(partial(self._fetch_by_ids, table, ids))

    async def close(self) -> None:
        await self._call(self._close, alone=True)
        self._thread.shutdown(wait=True)

    async def _call(self, job: Callable[[], T], *, alone: bool = False) -> T:
        """Runs `job` on the thread. The engine's batches (`alone`) are a transaction each,
        as before group commit: already one COMMIT for up to 64 orders, and an engine worker
        process waiting for SQLite's write lock (it sleeps in steps of up to 100 ms) waits no
        longer for a group around them. The API's single-strategy writes share groups."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.append((job, future, alone))
        if not self._draining:
            self._draining = True
            loop.run_in_executor(self._thread, self._drain, loop)
        return await future

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the thread: every job queued so far (the API's writes in group transactions,
        each engine batch in its own), then their results to the loop at once."""
        done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        while self._jobs:
            job, future, alone = self._jobs.popleft()
            if alone:  # close() among them: what the hop wrote commits first
                self._end_group(done)
            self._hop_index, self._alone = len(done), alone
            try:
                done.append((future, job(), None))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.append((future, None, exc))
            if alone or (
                self._group_from is not None and len(done) - self._group_from >= _GROUP_MAX
            ):
                self._end_group(done)
        self._end_group(done)
        loop.call_soon_threadsafe(self._deliver, loop, done)

    def _end_group(self, done: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
        """Commits the open group transaction. If the COMMIT fails, nothing of the group was
        written: every request run in it gets the error instead of its result (reads too,
        which may have seen the group's writes)."""
        first, self._group_from = self._group_from, None
        if first is None:
            return
        conn = self._connection()
        try:
            if not conn.in_transaction:  # SQLite rolled it back itself (I/O error, full disk)
                raise sqlite3.OperationalError("the group transaction was rolled back by SQLite")
            conn.execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the group
            # Outside any request's own error handling: a ROLLBACK that fails too must not
            # stop the hop's results from reaching their callers.
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            done[first:] = [(future, None, exc) for future, _, _ in done[first:]]

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

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One request's writes: a savepoint inside the hop's group transaction (BEGIN
        IMMEDIATE on the hop's first write; the hop commits it). On any error the savepoint
        is rolled back, so the request wrote nothing and the group goes on. A write whose
        checks failed wrote nothing, so its savepoint releases nothing. A request that
        commits alone (an engine batch) is a transaction of its own: the hop commits it
        right after it, and an error rolls it back."""
        conn = self._connection()
        if self._group_from is None:
            conn.execute("BEGIN IMMEDIATE")
            self._group_from = self._hop_index
        elif not conn.in_transaction:
            # SQLite rolled the group back itself (I/O error, full disk): a savepoint now
            # would start a transaction of its own; the group fails as a whole at its end.
            raise sqlite3.OperationalError("the group transaction was rolled back by SQLite")
        if self._alone:
            # A transaction of its own, as before group commit: no savepoint, whose two
            # statements would each wait for the interpreter lock on a busy loop.
            try:
                yield conn
            except BaseException:
                self._group_from = None
                with contextlib.suppress(sqlite3.Error):  # the request's own error goes up
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                raise
            return
        conn.execute("SAVEPOINT request")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK TO request")
            conn.execute("RELEASE request")
            raise
        conn.execute("RELEASE request")

    def _write(
        self,
        conn: sqlite3.Connection,
        strategy_id: str,
        previous: int | None,
        runtime: dict[str, Any] | None,
        orders: list[dict[str, Any]],
        inserts: list[tuple[str, dict[str, Any]]],
        fresh: bool = False,
    ) -> bool:
        """Inside a transaction: False, with nothing written, when the version check fails
        (the runtime's UPDATE is the first write, and it matched no row) or, with `fresh`,
        when one of the orders is already stored."""
        if fresh and self._rows_by_id(conn, self._orders, [values["id"] for values in orders]):
            return False
        # Positional parameters in the dicts' own order (the SQL names the columns in that
        # order): sqlite3 binds them at about half the cost of named ones, on a thread that
        # holds the interpreter lock while it binds.
        if runtime is not None and previous is not None:
            params = (*runtime.values(), strategy_id, previous)
            cursor = conn.execute(_update_sql(self._strategies, tuple(runtime)), params)
            if cursor.rowcount != 1:
                return False
        for values in orders:
            conn.execute(_upsert_sql(self._orders, tuple(values)), tuple(values.values()))
        for table, values in inserts:
            conn.execute(_insert_sql(table, tuple(values)), tuple(values.values()))
        return True

    def _save_many(self, items: list[_SaveItem], fresh: bool) -> list[bool]:
        with self._transaction() as conn:
            return [self._write(conn, *item, [], fresh) for item in items]

    def _read_and_save(
        self, pairs: list[tuple[str, str]], decide: Callable[[list[_Found]], list[_SaveItem | None]]
    ) -> list[bool | None]:
        with self._transaction() as conn:
            found, stored = self._read_pairs(conn, pairs)
            items = decide(found)
            read = {oid for _, oid in pairs}
            saved: list[bool | None] = []
            for item in items:
                if item is None:
                    saved.append(None)
                    continue
                ids = {values["id"] for values in item[3]}
                if not ids <= read:
                    raise ValueError(f"read_and_save: orders {sorted(ids - read)} were not read")
                if ids & stored:  # the fresh check, from the read: nothing commits between
                    saved.append(False)
                else:
                    saved.append(self._write(conn, *item, []))
            return saved

    def _find_many(self, pairs: list[tuple[str, str]]) -> list[_Found]:
        return self._read_pairs(self._connection(), pairs)[0]

    def _read_pairs(
        self, conn: sqlite3.Connection, pairs: list[tuple[str, str]]
    ) -> tuple[list[_Found], set[str]]:
        """What find_many() returns, and the ids of the pairs' orders that are stored."""
        strategies = self._rows_by_id(conn, self._strategies, [sid for sid, _ in pairs])
        orders = self._rows_by_id(conn, self._orders, [oid for _, oid in pairs])
        found: list[_Found] = [
            (strategies[sid], orders.get(oid)) if sid in strategies else (None, None)
            for sid, oid in pairs
        ]
        return found, set(orders)

    @staticmethod
    def _rows_by_id(
        conn: sqlite3.Connection, table: str, ids: list[str]
    ) -> dict[str, dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), 500):  # under SQLite's bound on query parameters
            part = ids[start : start + 500]
            marks = ", ".join("?" * len(part))
            for row in conn.execute(f'SELECT * FROM "{table}" WHERE id IN ({marks})', part):
                rows[row["id"]] = dict(row)
        return rows

    def _insert(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        with self._transaction() as conn:
            for table, values in rows:
                conn.execute(_insert_sql(table, tuple(values)), tuple(values.values()))

    def _fetch_one(self, table: str, where: dict[str, Any]) -> dict[str, Any] | None:
        condition = " AND ".join(f'"{c}" = :{c}' for c in where)
        row = self._connection().execute(f'SELECT * FROM "{table}" WHERE {condition}', where)
        found = row.fetchone()
        return dict(found) if found is not None else None

    def _read_and_update(
        self,
        queries: list[tuple[str, dict[str, Any]]],
        decide: Callable[[list[dict[str, Any] | None]], tuple[T, RowUpdate | None]],
    ) -> T:
        with self._transaction() as conn:
            result, update = decide([self._fetch_one(table, where) for table, where in queries])
            if update is not None:
                strategy_id, previous, runtime, inserts = update
                if not self._write(conn, strategy_id, previous, runtime, [], inserts):
                    # Read in this same transaction, which holds the write lock: a bug.
                    raise RuntimeError(f"strategy {strategy_id} changed inside its transaction")
            return result

    def _fetch_where(self, table: str, where: str, params: list[Any]) -> list[dict[str, Any]]:
        rows = self._connection().execute(f'SELECT * FROM "{table}" WHERE {where}', params)
        return [dict(row) for row in rows]

    def _fetch_versions(self, table: str, where: str, params: list[Any]) -> list[tuple[str, int]]:
        cursor = self._connection().cursor()
        cursor.row_factory = None  # tuples, not sqlite3.Row objects
        return cursor.execute(f'SELECT id, version FROM "{table}" WHERE {where}', params).fetchall()

    def _fetch_by_ids(self, table: str, ids: list[str]) -> list[dict[str, Any]]:
        return list(self._rows_by_id(self._connection(), table, ids).values())

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@cache
def _update_sql(table: str, columns: tuple[str, ...]) -> str:
    assignments = ", ".join(f'"{c}" = ?' for c in columns)
    return f'UPDATE "{table}" SET {assignments} WHERE id = ? AND version = ?'


@cache
def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(f'"{c}"' for c in columns)
    values = ", ".join("?" for _ in columns)
    return f'INSERT INTO "{table}" ({names}) VALUES ({values})'


@cache
def _upsert_sql(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(f'"{c}"' for c in columns)
    values = ", ".join("?" for _ in columns)
    updates = ", ".join(f'"{c}" = excluded."{c}"' for c in columns if c != "id")
    return (
        f'INSERT INTO "{table}" ({names}) VALUES ({values}) '
        f"ON CONFLICT (id) DO UPDATE SET {updates}"
    )
