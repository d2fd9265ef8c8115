"""settle(): asyncio.gather(..., return_exceptions=True), without a task for a lone call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TypeVar

T = TypeVar("T")


async def settle(calls: Sequence[Awaitable[T]]) -> list[T | BaseException]:
    """Each call's result or the exception it raised, in order; the calls run side by side,
    as gather(return_exceptions=True) runs them. A lone call runs in the caller's task
    instead of a task of its own: it starts now, not a turn of the loop later, behind
    whatever else is ready (on the stop-loss path such turns came twice per exit).
    Cancelling the caller cancels the call either way."""
    if len(calls) == 1:
        try:
            return [await calls[0]]
        except Exception as exc:  # noqa: BLE001 - handed back, as gather hands it back
            return [exc]
    return list(await asyncio.gather(*calls, return_exceptions=True))
