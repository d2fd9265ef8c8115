"""How our Redis connections read and write: costs of redis-py's asyncio client removed.

Under a burst of orders the engine sends thousands of pipelined commands a second, and these
costs of redis-py's asyncio client were a third of the event loop:
- it packs every command in Python, byte string by byte string, where its sync connection
  uses hiredis's packer (in C) when hiredis is installed. `faster()` uses that packer here.
- it reads every reply under its own `asyncio.timeout` (the socket timeout), a timer set
  and cancelled per reply. `execute()` runs a pipeline under one deadline for the whole of
  it instead (the same socket timeout), and its replies are read without a timer each.
- its pipelines ask SCRIPT EXISTS before running any script (see `_execute`), and queuing a
  script on a pipeline costs an import statement, tuple copies and an await per call
  (`queue_script` queues the EVALSHA directly).
- each pipeline is a write (a system call) of its own, and takes and gives back a pooled
  connection through the pool's locks and hooks. `execute()` sends the pipelines queued in
  one turn of the loop together, in one write on one connection (see `_Coalescer`).
None of them changes what a caller gets back.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import weakref
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

# Set while execute() holds a deadline over a whole pipeline.
_UNDER_DEADLINE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "redis_under_deadline", default=False
)


async def execute(pipe: Pipeline, *, raise_on_error: bool = True) -> list[Any]:
    """pipe.execute() under one deadline: the client's socket timeout, for the whole
    pipeline. Past it, builtin TimeoutError (the connection is dropped, as redis-py drops
    it after any failed read). As with pipe.execute(), the first failed command's error
    is raised unless raise_on_error is False, which returns errors among the replies."""
    timeout_s = pipe.connection_pool.connection_kwargs.get("socket_timeout")
    marked = _UNDER_DEADLINE.set(True)
    try:
        async with asyncio.timeout(timeout_s):
            replies = await _execute(pipe)
    finally:
        _UNDER_DEADLINE.reset(marked)
    if raise_on_error:
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
    return replies


async def _execute(pipe: Pipeline) -> list[Any]:
    """redis-py asks SCRIPT EXISTS before every pipeline holding a script: a round trip
    more each time. Here the scripts go as EVALSHA straight away; a command that meets
    NOSCRIPT (Redis restarted or flushed its scripts) did not run, so after loading the
    scripts exactly those commands are sent again. A MULTI/EXEC pipeline keeps redis-py's
    check, since re-sending part of it would not be atomic."""
    if pipe.is_transaction:
        return list(await pipe.execute(raise_on_error=False))
    scripts = list(pipe.scripts)
    pipe.scripts.clear()
    stack = _take(pipe)
    if not stack:
        return []
    coalescer = _coalescer(pipe.connection_pool)
    replies = await coalescer.run(pipe, stack)
    missing = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        for script in scripts:
            pipe.execute_command("SCRIPT LOAD", script.script)
        for n in missing:
            args, options = stack[n]
            pipe.execute_command(*args, **options)
        again = (await coalescer.run(pipe, _take(pipe)))[len(scripts) :]
        for n, reply in zip(missing, again, strict=True):
            replies[n] = reply
    return replies


def queue_script(
    pipe: Pipeline, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
) -> None:
    """Queues `script` on `pipe` as `await script(keys, args, client=pipe)` does: an EVALSHA,
    with the script noted on the pipeline so that a Redis that lacks it gets it loaded
    (`_execute`). redis-py's way imports inside the call and copies its arguments twice,
    about 4% of the event loop under a burst, where every order queues several scripts."""
    pipe.scripts.add(script)  # type: ignore[arg-type] # redis-py adds AsyncScripts here too
    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)


def _take(pipe: Pipeline) -> list[tuple[Any, Any]]:
    """The pipeline's queued (args, options), leaving it empty."""
    stack = list(pipe.command_stack)
    pipe.command_stack.clear()
    return stack


# Pipelines that go out on their own, at once, while fewer than this many writes are in flight.
_DIRECT_WHILE = 4

_Queued = tuple[Pipeline, list[tuple[Any, Any]], "asyncio.Future[list[Any]]"]


class _Coalescer:
    """A pipeline goes out at once while few others are in flight; when more are, it
    queues, and the queued ones go to Redis together at the next turn of the loop: one
    write, one connection, their replies read in order and handed back to each.

    On this 2-core machine a send on a loopback socket costs more than everything redis-py
    does around it, and under load dozens of tasks each send their own small pipeline in the
    same turn (64 StartStrategy calls publishing, a batch of orders settling). Redis runs
    each pipeline's commands in order either way; only the write is shared. A failed
    connection fails every pipeline of its write (none of them knows which of its commands
    ran, as before), and the connection is dropped rather than reused mid-reply."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._timeout_s = pool.connection_kwargs.get("socket_timeout")
        self._queued: list[_Queued] = []
        self._busy = 0  # writes in flight
        self._writes: set[asyncio.Task[None]] = set()

    async def run(self, pipe: Pipeline, stack: list[tuple[Any, Any]]) -> list[Any]:
        replies: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if self._busy < _DIRECT_WHILE:
            # Few in flight: sent at once, from the caller's own task, so that a server that
            # is not loaded (a stop-loss exit beside the price flusher) waits for no turn of
            # the loop. Beyond that, pipelines queue up and go together.
            self._busy += 1
            try:
                await self._send_and_read([(pipe, stack, replies)])
            finally:
                self._busy -= 1
            return replies.result()
        if not self._queued:
            # The write's first step runs in the loop's next turn: whatever else is queued
            # in this turn goes with it. Its own task, in an empty context: it serves many
            # callers (none of whom may cancel it for the others), and carries none of
            # their context variables (log fields, the per-read deadline marker).
            task = contextvars.Context().run(asyncio.ensure_future, self._write())
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
        self._queued.append((pipe, stack, replies))
        return await replies

    async def _write(self) -> None:
        queued, self._queued = self._queued, []
        self._busy += 1
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._send_and_read(queued)
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else ConnectionError(repr(exc))
            for _, _, replies in queued:
                if not replies.done():
                    replies.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._busy -= 1

    async def _send_and_read(self, queued: list[_Queued]) -> None:
        connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        # Reads run under one deadline: the caller's (execute) or _write's.
        marked = _UNDER_DEADLINE.set(True)
        try:
            commands = [args for _, stack, _ in queued for args, _ in stack]
            await connection.send_packed_command(connection.pack_commands(commands))
            for pipe, stack, replies in queued:
                got: list[Any] = []
                callbacks = pipe.response_callbacks
                for args, options in stack:
                    try:
                        if args[0] in _PLAIN_REPLIES and not options and args[0] not in callbacks:
                            got.append(await connection.read_response())
                        else:
                            got.append(await pipe.parse_response(connection, args[0], **options))
                    except ResponseError as exc:
                        got.append(exc)
                if not replies.done():
                    replies.set_result(got)
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            _UNDER_DEADLINE.reset(marked)
            await self._pool.release(connection)


# Commands whose reply is used as Redis sends it (no callback, no options, no WATCH state): read
# straight from the connection, not through the two layers of redis-py's parse_response, which
# cost more than the read itself on the few commands each order sends.
_PLAIN_REPLIES = frozenset({"EVALSHA", "XADD", "SADD", "SREM", "XACK", "XDEL"})

_COALESCERS: weakref.WeakKeyDictionary[ConnectionPool, _Coalescer] = weakref.WeakKeyDictionary()


def _coalescer(pool: ConnectionPool) -> _Coalescer:
    coalescer = _COALESCERS.get(pool)
    if coalescer is None:
        coalescer = _COALESCERS[pool] = _Coalescer(pool)
    return coalescer


class _Faster:
    """Mixed into the pool's connection class (TCP, unix socket or TLS, as the URL says)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # What redis-py's HiredisRespSerializer does (hiredis is a dependency: redis[hiredis]),
        # minus its per-argument conversion pass: a command name with spaces ('SCRIPT LOAD')
        # is split, hiredis packs the rest.
        if isinstance(args[0], str) and " " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # an argument hiredis does not take: redis-py's packer says which
            return cast(list[bytes], super().pack_command(*args))  # type: ignore[misc]

    async def read_response(
        self,
        disable_decoding: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - redis-py's own signature
        *,
        disconnect_on_error: bool = True,
        push_request: bool | None = False,
    ) -> Any:
        if timeout is None and _UNDER_DEADLINE.get():
            timeout = math.inf  # redis-py's "no timeout for this read": execute() has one
        return await super().read_response(  # type: ignore[misc]
            disable_decoding,
            timeout,
            disconnect_on_error=disconnect_on_error,
            push_request=push_request,
        )


_FASTER: dict[str, type[AbstractConnection]] = {}


def faster(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """`base` with both costs removed; one class per base."""
    if base.__name__ not in _FASTER:
        _FASTER[base.__name__] = type(f"Faster{base.__name__}", (_Faster, base), {})
    return _FASTER[base.__name__]
