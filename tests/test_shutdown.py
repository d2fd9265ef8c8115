"""The bounded stop: a stop past its deadline or cut short by a second signal is given up
on, with every task still running in the log."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.shutdown import shutdown_deadline, stop_within


async def never() -> None:
    await asyncio.Event().wait()


async def test_a_stop_past_its_deadline_is_given_up_naming_what_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="server.shutdown")
    stuck = asyncio.create_task(never(), name="stuck-reader")
    try:
        assert await stop_within(never, 0.2, asyncio.Event()) is False
    finally:
        stuck.cancel()
    assert "shutdown gave up (it took over 0.2s); still running: " in caplog.text
    assert "stuck-reader: wait (locks.py:" in caplog.text
    assert "the stop itself was at: " in caplog.text


async def test_a_second_signal_ends_the_wait_at_once(caplog: pytest.LogCaptureFixture) -> None:
    again = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, again.set)
    # The deadline is an hour: only the signal can end it (wait_for guards against a hang).
    assert await asyncio.wait_for(stop_within(never, 3600, again), 30) is False
    assert "shutdown gave up (a second signal came)" in caplog.text


async def test_a_stop_that_finishes_in_time_is_not_given_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stopped: list[bool] = []

    async def stop() -> None:
        await asyncio.sleep(0.05)
        stopped.append(True)

    assert await stop_within(stop, 5, asyncio.Event()) is True
    assert stopped == [True]
    assert "gave up" not in caplog.text

    async def failing() -> None:
        raise RuntimeError("redis went away")

    with pytest.raises(RuntimeError, match="redis went away"):
        await stop_within(failing, 5, asyncio.Event())


def test_the_deadline_covers_both_grace_periods() -> None:
    assert shutdown_deadline(5.0) == 40.0
    assert shutdown_deadline(0.0) == 30.0
