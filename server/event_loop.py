"""The event loop the server's processes run on (`ALGOPLANE_EVENT_LOOP`).

uvloop by default: a stream fan-out is bound by the loop's cost per wakeup and per socket
callback as much as by grpc.aio's per message, and uvloop's are lower (a bare grpc.aio
fan-out spent 12 to 18% less CPU per delivery on it, the server 6%). `asyncio` is the standard
library's loop, for a platform without uvloop or to rule the loop out when diagnosing.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

EventLoop = Literal["uvloop", "asyncio"]
T = TypeVar("T")


def available(kind: EventLoop) -> bool:
    if kind == "asyncio":
        return True
    try:
        importlib.import_module(kind)
    except ImportError:
        return False
    return True


def running() -> str:
    """The running loop's class, for the startup log: what the process really runs on."""
    loop = type(asyncio.get_running_loop())
    return f"{loop.__module__}.{loop.__qualname__}"


def factory(kind: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], kind: EventLoop) -> T:
    """asyncio.run on a loop of `kind` (no global policy is changed)."""
    with asyncio.Runner(loop_factory=factory(kind)) as runner:
        return runner.run(main)
