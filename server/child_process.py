"""ChildProcess: a process the server starts (the embedded redis-server, engine workers),
started by the standard library and awaited without blocking the loop.

Not asyncio.create_subprocess_exec: on uvloop (the default loop) it does not close the file
descriptors the server inherited, so the embedded redis-server kept the server's stdout open
after the server was killed, and whoever read that stdout never saw it end. subprocess.Popen
closes them (close_fds). Its exit is awaited through a pidfd the loop watches, so no thread
and no SIGCHLD handler of the loop's is involved.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Mapping, Sequence

# Where a pidfd is not available (not Linux, or a kernel before 5.3): how often exit is polled.
_POLL_S = 0.05


class ChildProcess:
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self._exit: asyncio.Task[int] | None = None

    @classmethod
    def start(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        start_new_session: bool = False,
        inherit_stderr: bool = False,
    ) -> ChildProcess:
        """Starts `argv` with stdin and stdout on /dev/null, stderr too unless it is to share
        ours, and no other descriptor of ours; raises OSError when it cannot."""
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=None if inherit_stderr else subprocess.DEVNULL,
            env=env,
            close_fds=True,
            start_new_session=start_new_session,
        )
        return cls(popen)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs; its exit code (negative: the signal that ended it) after."""
        return self._popen.poll()

    # These do nothing once it has exited (Popen's own check), so never signal a reused pid.
    def terminate(self) -> None:
        self._popen.terminate()

    def kill(self) -> None:
        self._popen.kill()

    async def wait(self) -> int:
        """Its exit code, once it exits. Any number of callers may wait; a caller that is
        cancelled (a timeout) leaves the watch running for the others."""
        if self._exit is None:
            self._exit = asyncio.get_running_loop().create_task(self._watch())
        return await asyncio.shield(self._exit)

    async def _watch(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(self._popen.pid)
        except (AttributeError, OSError):
            # No pidfd, so nothing to wait on but the clock.
            while (code := self._popen.poll()) is None:  # noqa: ASYNC110
                await asyncio.sleep(_POLL_S)
            return code
        try:
            exited: asyncio.Future[None] = loop.create_future()
            loop.add_reader(pidfd, _settle, exited)
            try:
                await exited
            finally:
                loop.remove_reader(pidfd)
        finally:
            os.close(pidfd)
        return self._popen.wait()  # readable: it has exited, so this reaps it at once


def _settle(future: asyncio.Future[None]) -> None:
    # The pidfd stays readable, so this may run again before the waiter does.
    if not future.done():
        future.set_result(None)
