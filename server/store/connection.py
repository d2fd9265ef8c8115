"""How our Redis connections read and write: three costs of redis-py's asyncio client removed.

Under a burst of orders the engine sends thousands of pipelined commands a second, and these
costs of redis-py's asyncio client were a third of the event loop:
- it packs every command in Python, byte string by byte string, where its sync connection
  uses hiredis's packer (in C) when hiredis is installed. `faster()` uses that packer here.
- it reads every reply under its own `asyncio.timeout` (the socket timeout), a timer set
  and cancelled per reply. `execute()` runs a pipeline under one deadline for the whole of
  it instead (the same socket timeout), and its replies are read without a timer each.
- its pipelines ask SCRIPT EXISTS before running any script (see `_execute`).
None of them changes what a caller gets back.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
from typing import Any, cast

import hiredis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError

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
    if pipe.is_transaction or not pipe.scripts:
        return list(await pipe.execute(raise_on_error=False))
    scripts = list(pipe.scripts)
    pipe.scripts.clear()
    stack = list(pipe.command_stack)
    replies = list(await pipe.execute(raise_on_error=False))
    missing = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        for script in scripts:
            pipe.execute_command("SCRIPT LOAD", script.script)
        for n in missing:
            args, options = stack[n]
            pipe.execute_command(*args, **options)
        again = list(await pipe.execute(raise_on_error=False))[len(scripts) :]
        for n, reply in zip(missing, again, strict=True):
            replies[n] = reply
    return replies


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
