"""settle(): asyncio.gather(..., return_exceptions=True), without a task for a lone call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TypeVar

T = TypeVar("T")


def settle(calls: Sequence[Awaitable[T]]) -> Awaitable[list[T | BaseException]]:
    """Each call's result or the exception it raised, in order; the calls run side by side,
    as gather(return_exceptions=True) runs them, and as there they are scheduled by this
    call, ahead of anything scheduled after it. A lone call instead runs in the awaiting
    task, from its first step: it starts at once rather than a turn of the loop later,
    behind whatever else is ready (on the stop-loss path such turns came twice per exit),
    and still before anything scheduled meanwhile gets a turn. Cancelling the awaiting task
    cancels the calls either way."""
    if len(calls) == 1:
        return _lone(calls[0])
    return asyncio.gather(*calls, return_exceptions=True)


async def _lone(call: Awaitable[T]) -> list[T | BaseException]:
    try:
        return [await call]
    except Exception as exc:  # noqa: BLE001 - handed back, as gather hands it back
        return [exc]
