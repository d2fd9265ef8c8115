"""settle(): results and exceptions in order; calls scheduled ahead of what is scheduled after
them; a lone call runs in the awaiting task."""

from __future__ import annotations

import asyncio

import pytest

from server.settle import settle


async def _task_of() -> asyncio.Task[object] | None:
    return asyncio.current_task()


async def _fails(message: str) -> int:
    raise ValueError(message)


async def _after(delay_s: float, value: int, log: list[int]) -> int:
    await asyncio.sleep(delay_s)
    log.append(value)
    return value


async def test_a_lone_call_runs_in_the_callers_task_and_a_pair_in_tasks_of_their_own() -> None:
    me = asyncio.current_task()
    assert await settle([_task_of()]) == [me]
    pair = await settle([_task_of(), _task_of()])
    assert me not in pair
    assert pair[0] is not pair[1]


async def test_results_and_exceptions_come_back_in_order_and_calls_run_side_by_side() -> None:
    finished: list[int] = []
    results = await settle([_after(0.05, 1, finished), _fails("two"), _after(0.0, 3, finished)])
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ValueError) and str(results[1]) == "two"
    assert finished == [3, 1]  # the third did not wait for the first
    [alone] = await settle([_fails("alone")])
    assert isinstance(alone, ValueError) and str(alone) == "alone"


@pytest.mark.parametrize("calls", [1, 2])
async def test_calls_run_ahead_of_what_is_scheduled_after_settle(calls: int) -> None:
    # The batch lane schedules its publish after its broker calls and relies on this order.
    ran: list[str] = []

    async def note(name: str) -> str:
        ran.append(name)
        return name

    placing = settle([note(f"call {n}") for n in range(calls)])
    later = asyncio.ensure_future(note("scheduled after"))
    assert await placing == [f"call {n}" for n in range(calls)]
    await later
    assert ran == [*(f"call {n}" for n in range(calls)), "scheduled after"]


async def test_cancelling_the_caller_cancels_a_lone_call() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caller = asyncio.ensure_future(settle([slow()]))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert cancelled.is_set()
