"""ChildProcess: the server's way to start the embedded redis-server and engine workers."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from server.child_process import ChildProcess

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]


def _descriptors(pid: int) -> set[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    return {os.readlink(fd_dir / name) for name in os.listdir(fd_dir)}


async def test_a_child_holds_none_of_our_descriptors() -> None:
    # An inheritable pipe, as a server's stdout is: the child must not keep it open, or a
    # reader of the server's output never sees it end once the server is gone.
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    child = ChildProcess.start(SLEEPER)
    try:
        pipe = os.readlink(f"/proc/self/fd/{write_end}")
        await asyncio.sleep(0.2)  # past exec
        held = _descriptors(child.pid)
        assert pipe not in held
        assert {os.readlink(f"/proc/{child.pid}/fd/{n}") for n in (0, 1, 2)} == {"/dev/null"}
        os.close(write_end)
        assert os.read(read_end, 1) == b""  # EOF although the child still runs
        assert child.returncode is None
    finally:
        child.kill()
        assert await child.wait() == -signal.SIGKILL
        os.close(read_end)


async def test_every_waiter_gets_the_exit_code_and_a_cancelled_one_stops_nothing() -> None:
    child = ChildProcess.start([sys.executable, "-c", "import time; time.sleep(0.5); exit(3)"])
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(child.wait(), 0.05)
    assert child.returncode is None
    assert list(await asyncio.gather(child.wait(), child.wait())) == [3, 3]
    assert child.returncode == 3
    child.kill()  # exited and reaped: no signal goes to a pid that may be reused
    assert await child.wait() == 3


async def test_without_a_pidfd_exit_is_polled(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfd(_pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    child = ChildProcess.start(SLEEPER)
    child.terminate()
    assert await asyncio.wait_for(child.wait(), 5) == -signal.SIGTERM


def test_a_missing_binary_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ChildProcess.start([str(tmp_path / "no-such-binary")])
