"""`python -m server` as a real process: embedded defaults, SIGTERM, bad settings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from protos.algoplane.v1 import strategy_pb2 as pb
from server import event_loop
from server.config import SettingsError, load_settings
from tests.support import (
    PYTHON,
    aio_stub,
    blocked_stream_readers,
    free_port,
    redis_process,
    server_env,
    spec,
)

START_TIMEOUT_S = 30.0


@dataclass
class ServerProcess:
    """One `python -m server` child; stdout is read for the address and the demo token."""

    process: asyncio.subprocess.Process
    log: Path
    lines: list[str] = field(default_factory=list)

    @classmethod
    async def start(
        cls, env: dict[str, str], cwd: Path, log: Path, *, own_group: bool = False
    ) -> ServerProcess:
        """`own_group`: the server leads a process group of its own, as a terminal's
        foreground job does, so that a test can signal the whole group."""
        with log.open("ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                PYTHON,
                "-m",
                "server",
                env=env,
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=own_group,
            )
        return cls(process, log)

    async def read_until(self, prefix: str) -> str:
        """The first stdout line starting with `prefix` (earlier lines are kept)."""
        assert self.process.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.process.stdout.readline(), START_TIMEOUT_S)
            if not raw:
                raise AssertionError(f"server exited early:\n{self.log.read_text()}")
            line = raw.decode().rstrip("\n")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    async def demo_token(self) -> str:
        await self.read_until("algoplane: listening on")
        await self.read_until("algoplane: demo token")
        token = await self.read_until("")
        assert token.count(".") == 2, token
        return token

    async def wait(self, timeout_s: float = 20.0) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        assert self.process.stdout is not None
        await asyncio.wait_for(self.process.stdout.read(), timeout_s)
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.wait()


def md(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


async def embedded_redis_pid(data: Path) -> int:
    """The pid of the redis-server the server started in its data dir."""
    redis = Redis(unix_socket_path=str(data / "redis" / "redis.sock"))
    try:
        return int((await redis.info("server"))["process_id"])
    finally:
        await redis.aclose()


async def wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while alive(pid):
        if loop.time() > deadline:
            raise AssertionError(f"process {pid} is still running")
        await asyncio.sleep(0.05)


async def test_embedded_defaults_sigterm_and_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sock = data / "redis" / "redis.sock"
    port = free_port()
    env = server_env(ALGOPLANE_DATA_DIR=str(data), ALGOPLANE_GRPC_ADDR=f"127.0.0.1:{port}")
    redis_pids: list[int] = []
    server = await ServerProcess.start(env, tmp_path, tmp_path / "server.log")
    try:
        token = await server.demo_token()
        assert f"algoplane: listening on 127.0.0.1:{port}" in server.lines
        assert "server.cli: starting on uvloop.Loop" in server.log.read_text()

        # Its own redis-server, on a unix socket in the data dir, with AOF on.
        assert sock.is_socket()
        redis = Redis(unix_socket_path=str(sock), decode_responses=True)
        try:
            assert await redis.config_get("appendonly") == {"appendonly": "yes"}
            assert await redis.config_get("appendfsync") == {"appendfsync": "everysec"}
            redis_pids.append(int((await redis.info("server"))["process_id"]))

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = aio_stub(channel)
                listed = await stub.ListStrategies(pb.ListStrategiesRequest(), metadata=md(token))
                assert list(listed.strategies) == []
                created = await stub.CreateStrategy(
                    pb.CreateStrategyRequest(spec=spec(symbol="KEEP")), metadata=md(token)
                )
                started = await stub.StartStrategy(
                    pb.StartStrategyRequest(spec=spec(symbol="HOT")), metadata=md(token)
                )

                stream = stub.StreamRuntime(pb.StreamRuntimeRequest(), metadata=md(token))
                await blocked_stream_readers(redis, 1)
                server.process.send_signal(signal.SIGTERM)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(stream.read(), 10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert await server.wait() == 0
        finally:
            await redis.aclose()

        # The embedded redis-server stopped with it.
        await wait_gone(redis_pids[0])
        gone = Redis(unix_socket_path=str(sock), socket_timeout=1)
        try:
            with pytest.raises(RedisConnectionError):
                await gone.ping()
        finally:
            await gone.aclose()

        # A second start on the same data dir finds the strategies, the secret (the old
        # token still works) and, through the AOF, the hot state.
        server = await ServerProcess.start(env, tmp_path, tmp_path / "server2.log")
        await server.demo_token()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = aio_stub(channel)
            again = await stub.GetStrategy(
                pb.GetStrategyRequest(strategy_id=created.id), metadata=md(token)
            )
            assert again == created
            runtime = await stub.GetRuntime(
                pb.GetRuntimeRequest(strategy_id=started.strategy_id), metadata=md(token)
            )
            assert runtime == started
        redis = Redis(unix_socket_path=str(sock), decode_responses=True)
        try:
            redis_pids.append(int((await redis.info("server"))["process_id"]))
            assert await redis.smembers("symbol:{HOT}:strategies") == {started.strategy_id}
        finally:
            await redis.aclose()
        server.process.send_signal(signal.SIGTERM)
        assert await server.wait() == 0
        await wait_gone(redis_pids[1])
    finally:
        await server.kill()
        for pid in redis_pids:  # an orphaned embedded redis-server if the server was killed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ALGOPLANE_GRPC_ADDR", "nonsense"),
        ("ALGOPLANE_LOG_LEVEL", "LOUD"),
        ("ALGOPLANE_JWT_SECRET", "short"),
        ("ALGOPLANE_REDIS_URL", "http://localhost:6379"),
        ("ALGOPLANE_DATABASE_URL", "mysql://db"),
        ("ALGOPLANE_DATABASE_URL", "sqlite+aiosqlite:///:memory:"),
        ("ALGOPLANE_STREAM_MAXLEN", "ten"),
        ("ALGOPLANE_METRICS_ADDR", "9464"),
        ("ALGOPLANE_LOG_FORMAT", "xml"),
        ("ALGOPLANE_EVENT_LOOP", "trio"),
        ("ALGOPLANE_FEED_COMPRESSION", "gzip"),
    ],
)
def test_malformed_setting_stops_startup(tmp_path: Path, name: str, value: str) -> None:
    env = server_env(ALGOPLANE_DATA_DIR=str(tmp_path / "data"), **{name: value})
    result = subprocess.run(
        [PYTHON, "-m", "server"],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0]
    if name == "ALGOPLANE_JWT_SECRET":
        assert value not in lines[0]  # a secret is never echoed
    assert result.stdout == ""
    assert not (tmp_path / "data").exists()  # nothing was started or written


async def test_standard_event_loop_serves_and_streams(tmp_path: Path) -> None:
    """ALGOPLANE_EVENT_LOOP=asyncio: the standard library's loop, for a platform without
    uvloop; the same server, calls and streams on it."""
    port = free_port()
    env = server_env(
        ALGOPLANE_DATA_DIR=str(tmp_path / "data"),
        ALGOPLANE_GRPC_ADDR=f"127.0.0.1:{port}",
        ALGOPLANE_EVENT_LOOP="asyncio",
    )
    server = await ServerProcess.start(env, tmp_path, tmp_path / "server.log")
    try:
        token = await server.demo_token()
        assert "server.cli: starting on asyncio.unix_events._UnixSelectorEventLoop" in (
            server.log.read_text()
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = aio_stub(channel)
            stream = stub.StreamRuntime(pb.StreamRuntimeRequest(), metadata=md(token))
            await stream.initial_metadata()
            started = await stub.StartStrategy(
                pb.StartStrategyRequest(spec=spec(symbol="LOOP")), metadata=md(token)
            )
            event = await asyncio.wait_for(stream.read(), 10)
            assert isinstance(event, pb.RuntimeEvent)
            assert event.runtime.strategy_id == started.strategy_id
            stream.cancel()
        server.process.send_signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        await server.kill()


def test_event_loop_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALGOPLANE_EVENT_LOOP", raising=False)
    assert load_settings().event_loop == "uvloop"

    async def loop_class() -> str:
        return event_loop.running()

    assert event_loop.run(loop_class(), "uvloop") == "uvloop.Loop"
    assert event_loop.run(loop_class(), "asyncio").startswith("asyncio.")
    # Where uvloop cannot be imported, the default is refused with what to set instead, and
    # the standard loop is still there.
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(
        SettingsError,
        match=r"^invalid setting ALGOPLANE_EVENT_LOOP: .*uvloop is not installed.*'asyncio'",
    ):
        load_settings()
    monkeypatch.setenv("ALGOPLANE_EVENT_LOOP", "asyncio")
    assert load_settings().event_loop == "asyncio"


async def test_a_killed_servers_output_ends_though_its_redis_lives_on(tmp_path: Path) -> None:
    # Whoever reads the server's output (a terminal pipe, a container runtime) sees it end
    # when the server dies, even while the embedded redis-server it started outlives it.
    data = tmp_path / "data"
    env = server_env(ALGOPLANE_DATA_DIR=str(data), ALGOPLANE_GRPC_ADDR=f"127.0.0.1:{free_port()}")
    server = await ServerProcess.start(env, tmp_path, tmp_path / "server.log")
    redis_pid = 0
    try:
        await server.demo_token()
        redis_pid = await embedded_redis_pid(data)
        server.process.kill()
        assert await server.wait(timeout_s=10) == -signal.SIGKILL  # stdout read to its end
        assert alive(redis_pid)
    finally:
        await server.kill()
        if redis_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(redis_pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["ctrl_c", "hangup"])
async def test_a_signal_to_the_servers_group_leaves_its_redis_to_the_server(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # A terminal's Ctrl-C (or its closing: SIGHUP) signals the whole foreground process
    # group. redis-server stops at once on SIGINT, and the server still needs it while it
    # finishes the orders in hand: the server alone stops it, last, with SIGTERM.
    data = tmp_path / "data"
    env = server_env(ALGOPLANE_DATA_DIR=str(data), ALGOPLANE_GRPC_ADDR=f"127.0.0.1:{free_port()}")
    server = await ServerProcess.start(env, tmp_path, tmp_path / "server.log", own_group=True)
    redis_pid = 0
    try:
        await server.demo_token()
        redis_pid = await embedded_redis_pid(data)
        os.killpg(server.process.pid, sig)
        assert await server.wait(timeout_s=30) == 0
        await wait_gone(redis_pid)
        redis_log = (data / "redis" / "redis.log").read_text()
        assert "Received SIGTERM" in redis_log
        assert "Received SIGINT" not in redis_log
        assert "cannot read the queue" not in server.log.read_text()
    finally:
        await server.kill()
        if redis_pid and alive(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)


async def test_a_start_after_kill_9_stops_the_orphaned_redis_and_keeps_its_data(
    tmp_path: Path,
) -> None:
    # A server killed outright leaves its embedded redis-server running (a session of its
    # own). The next start in that data dir shuts it down, which writes its AOF out, and
    # starts its own on the same files: the hot state is still there.
    data = tmp_path / "data"
    port = free_port()
    env = server_env(ALGOPLANE_DATA_DIR=str(data), ALGOPLANE_GRPC_ADDR=f"127.0.0.1:{port}")
    server = await ServerProcess.start(env, tmp_path, tmp_path / "server.log")
    pids: list[int] = []
    try:
        token = await server.demo_token()
        pids.append(await embedded_redis_pid(data))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            started = await aio_stub(channel).StartStrategy(
                pb.StartStrategyRequest(spec=spec(symbol="HOT")), metadata=md(token)
            )
        server.process.kill()
        assert await server.wait() == -signal.SIGKILL
        assert alive(pids[0])

        server = await ServerProcess.start(env, tmp_path, tmp_path / "server2.log")
        await server.demo_token()
        await wait_gone(pids[0])
        pids.append(await embedded_redis_pid(data))
        assert pids[1] != pids[0]
        assert f"a redis-server (pid {pids[0]}) still serves" in server.log.read_text()
        redis = Redis(unix_socket_path=str(data / "redis" / "redis.sock"), decode_responses=True)
        try:
            assert await redis.smembers("symbol:{HOT}:strategies") == {started.strategy_id}
        finally:
            await redis.aclose()
        server.process.send_signal(signal.SIGTERM)
        assert await server.wait() == 0
        await wait_gone(pids[1])
    finally:
        await server.kill()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_second_server_on_a_live_servers_data_dir_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first_env = server_env(
        ALGOPLANE_DATA_DIR=str(data), ALGOPLANE_GRPC_ADDR=f"127.0.0.1:{free_port()}"
    )
    first = await ServerProcess.start(first_env, tmp_path, tmp_path / "first.log")
    redis_pid = 0
    try:
        await first.demo_token()
        redis_pid = await embedded_redis_pid(data)
        second_env = {**first_env, "ALGOPLANE_GRPC_ADDR": f"127.0.0.1:{free_port()}"}
        second = await ServerProcess.start(second_env, tmp_path, tmp_path / "second.log")
        try:
            assert await second.wait(timeout_s=30) != 0
        finally:
            await second.kill()
        refusal = (tmp_path / "second.log").read_text()
        assert f"data dir in use: the algoplane server with pid {first.process.pid}" in refusal
        # The first one's Redis was left alone.
        assert await embedded_redis_pid(data) == redis_pid
        first.process.send_signal(signal.SIGTERM)
        assert await first.wait() == 0
        await wait_gone(redis_pid)
    finally:
        await first.kill()
        if redis_pid and alive(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)


async def test_a_second_signal_while_stopping_gives_up_and_says_what_was_still_running(
    tmp_path: Path,
) -> None:
    # A call stuck on a frozen Redis holds the stop in its grace period (60 s here); a
    # second SIGTERM ends the wait: the tasks still running are logged and the server exits
    # at once with 1, instead of hanging until someone kills it.
    with redis_process(tmp_path / "redis") as redis_proc:
        port = free_port()
        env = server_env(
            ALGOPLANE_REDIS_URL=redis_proc.url,
            ALGOPLANE_DATA_DIR=str(tmp_path / "data"),
            ALGOPLANE_GRPC_ADDR=f"127.0.0.1:{port}",
            ALGOPLANE_REDIS_TIMEOUT_S="60",
            ALGOPLANE_SHUTDOWN_GRACE_S="60",
        )
        server = await ServerProcess.start(env, tmp_path, tmp_path / "server.log")
        assert redis_proc.process is not None
        redis_pid = redis_proc.process.pid
        try:
            token = await server.demo_token()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = aio_stub(channel)
                started = await stub.StartStrategy(
                    pb.StartStrategyRequest(spec=spec(symbol="HOT")), metadata=md(token)
                )
                os.kill(redis_pid, signal.SIGSTOP)
                stuck = asyncio.ensure_future(
                    stub.GetRuntime(
                        pb.GetRuntimeRequest(strategy_id=started.strategy_id), metadata=md(token)
                    )
                )
                await asyncio.sleep(0.5)
                assert not stuck.done()
                server.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(2.0)
                assert server.process.returncode is None  # waiting for the stuck call
                server.process.send_signal(signal.SIGTERM)
                assert await server.wait(timeout_s=20) == 1
                stuck.cancel()
            log = server.log.read_text()
            assert "shutdown gave up (a second signal came); still running: " in log
            assert "shutdown gave up; the stop itself was at: " in log
        finally:
            os.kill(redis_pid, signal.SIGCONT)
            await server.kill()
