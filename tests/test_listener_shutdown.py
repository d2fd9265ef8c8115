"""The market listener stops when cancelled, even when a library below it turns the cancel
into a connection error (Python 3.11's asyncio.wait_for can drop a cancel that lands in the
step its inner call fails; server/cancellation.py). Once seen: a server told to stop as its
feed went away kept reconnecting, and its shutdown never finished."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, cast

import pytest

import server.market.listener as listener_module
from server.market.listener import MarketListener


class _ConnectThatSwallowsCancel:
    """Stands in for websockets' connect: never connects, and answers a cancel with the
    OSError a failing socket would give, as a library that loses the cancel does."""

    attempts = 0
    entered: asyncio.Event

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        type(self).attempts += 1

    async def __aenter__(self) -> Any:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise OSError("connection reset by peer") from None

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        return None


async def test_a_cancel_turned_into_a_connection_error_still_stops_the_listener(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(listener_module, "connect", _ConnectThatSwallowsCancel)
    _ConnectThatSwallowsCancel.attempts = 0
    _ConnectThatSwallowsCancel.entered = asyncio.Event()
    unused = cast(Any, None)  # nothing but the connection loop runs: no ticks arrive
    listener = MarketListener(
        url="ws://127.0.0.1:1",
        fmt=unused,
        guard=unused,
        index=unused,
        state=unused,
        publisher=unused,
        max_backoff_s=0.01,
        stale_s=60.0,
    )
    task = asyncio.create_task(listener.run())
    await asyncio.wait_for(_ConnectThatSwallowsCancel.entered.wait(), timeout=2)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    assert done, "the listener kept reconnecting after it was cancelled"
    assert task.cancelled()
    assert _ConnectThatSwallowsCancel.attempts == 1  # no reconnect after the cancel
    assert listener.stats["reconnects"] == 0
