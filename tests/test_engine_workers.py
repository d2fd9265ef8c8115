"""ALGOPLANE_ENGINE_PROCESSES: the server and the engine-only workers it starts, as real
processes on a real Redis and one SQLite file. A burst is split between them and each BUY
reaches the broker once; a worker killed mid-burst is restarted and its events are taken
over; a worker ends with its server, whether the server stops or is killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from server.config import Settings, SettingsError, load_settings
from server.store import keys
from server.worker_supervisor import worker_env
from tests.faults.test_server_faults import (
    BURST,
    Node,
    cluster,
    holds_events_mid_burst,
    invariants_hold,
    launch,
    node_env,
    pending_of,
    placed_once_each,
    until,
)
from tests.support import PYTHON, RedisProcess, auth, free_port, server_env
from tests.test_db import database_url  # noqa: F401 - the fixture: SQLite, then PostgreSQL
from tests.test_engine import precise_spec
from tests.test_process import alive, wait_gone


def engine_workers_of(pid: int) -> list[int]:
    """Running `engine-worker` children of `pid` (a zombie has no command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"engine-worker" in command:
            found.append(int(entry.name))
    return sorted(found)


def two_free_ports() -> int:
    """A port whose next port is free too (the first worker serves its metrics there)."""
    for _ in range(50):
        port = free_port()
        if port < 65535:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise AssertionError("no two adjacent free ports")


async def sample(port: int, name: str, **labels: str) -> float:
    """The value of one series on the /metrics endpoint at `port` (0 when absent)."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    text = await asyncio.to_thread(get)
    return sum(
        found.value
        for family in text_string_to_metric_families(text)
        for found in family.samples
        if found.name == name and found.labels == labels
    )


async def buys_filled(port: int) -> float:
    return await sample(port, "algoplane_orders_total", kind="buy", status="filled")


async def start_burst(node: Node, count: int) -> set[str]:
    spec = precise_spec(buy_in=3.0, hold=600, symbol="INFY")
    limit = asyncio.Semaphore(64)

    async def start() -> str:
        async with limit:
            reply = await node.stub.StartStrategy(
                pb.StartStrategyRequest(spec=spec), metadata=auth()
            )
            return reply.strategy_id

    sids = set(await asyncio.gather(*(start() for _ in range(count))))
    assert len(sids) == count
    return sids


@dataclass
class WithWorker:
    """A server started with ALGOPLANE_ENGINE_PROCESSES=2, its one engine worker, the shared
    Redis, and the server's metrics port (the worker's is the next one)."""

    redis: Redis
    node: Node
    worker: int
    metrics_port: int


@contextlib.asynccontextmanager
async def server_with_worker(
    redis_proc: RedisProcess, tmp_path: Path, **extra: str
) -> AsyncIterator[WithWorker]:
    metrics_port = two_free_ports()
    env = node_env(
        redis_proc.url,
        tmp_path / "data",
        free_port(),
        ALGOPLANE_ENGINE_PROCESSES="2",
        ALGOPLANE_METRICS_ADDR=f"127.0.0.1:{metrics_port}",
        **BURST,
        **extra,
    )
    async with cluster(redis_proc) as (redis, nodes):
        await redis.set("price:{INFY}", "1500")
        node = await launch(env, tmp_path, "server")
        nodes.append(node)
        await until("one engine worker", lambda: _count(node.pid, 1), 10)
        (worker,) = engine_workers_of(node.pid)
        yield WithWorker(redis, node, worker, metrics_port)


async def test_a_burst_is_split_between_the_server_and_its_engine_worker(
    redis_proc: RedisProcess,
    tmp_path: Path,
    database_url: str,  # noqa: F811 - the fixture imported above
) -> None:
    count = 400
    async with server_with_worker(
        redis_proc, tmp_path, ALGOPLANE_DATABASE_URL=database_url
    ) as setup:
        redis, node, metrics_port = setup.redis, setup.node, setup.metrics_port
        assert await sample(metrics_port, "algoplane_engine_workers") == 1
        sids = await start_burst(node, count)
        await placed_once_each(redis, sids)

        by_server, by_worker = await buys_filled(metrics_port), await buys_filled(metrics_port + 1)
        assert by_server + by_worker == count
        assert by_server > 0 and by_worker > 0, (by_server, by_worker)

        assert await node.sigterm() == 0
        assert not alive(setup.worker)
        await invariants_hold(redis, database_url)


async def test_an_engine_worker_killed_mid_burst_is_restarted_and_its_events_taken_over(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    count = 500
    async with server_with_worker(redis_proc, tmp_path) as setup:
        redis, node, victim = setup.redis, setup.node, setup.worker
        sids = await start_burst(node, count)
        await until(
            "the worker holds events mid-burst",
            lambda: holds_events_mid_burst(redis, victim, count),
            10,
            every_s=0.005,
        )
        os.kill(victim, signal.SIGKILL)
        await wait_gone(victim)

        async def workers_gauge(value: float) -> bool:
            return await sample(setup.metrics_port, "algoplane_engine_workers") == value

        # Down while the supervisor waits to restart it (0.5 s), then up again below.
        await until("the gauge shows the worker down", lambda: workers_gauge(0), 5, every_s=0.02)
        assert int(await redis.llen(keys.PAPER_LOG)) < count, "the burst ended before the kill"
        assert await pending_of(redis, victim) > 0  # left behind under the dead worker's name

        await placed_once_each(redis, sids)
        assert "taking over event" in node.log()
        assert f"engine worker 1 (pid {victim}) exited with code -9" in node.log()

        async def restarted() -> bool:
            return len([pid for pid in engine_workers_of(node.pid) if pid != victim]) == 1

        await until("a new engine worker", restarted, 10)
        (successor,) = engine_workers_of(node.pid)
        await until("the gauge shows it up again", lambda: workers_gauge(1), 5)
        assert await node.sigterm() == 0
        assert not alive(successor)
        await invariants_hold(redis, f"sqlite+aiosqlite:///{tmp_path / 'data' / 'algoplane.db'}")


async def test_engine_workers_end_when_their_server_is_killed(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    env = node_env(
        redis_proc.url,
        tmp_path / "data",
        free_port(),
        ALGOPLANE_ENGINE_PROCESSES="3",
        ALGOPLANE_LOG_LEVEL="INFO",  # the workers' start lines
    )
    async with cluster(redis_proc) as (_, nodes):
        node = await launch(env, tmp_path, "server")
        nodes.append(node)
        await until("two engine workers", lambda: _count(node.pid, 2), 10)

        async def both_taking_orders() -> bool:
            return len(re.findall(r"engine worker \d taking orders", node.log())) == 2

        await until("both workers taking orders", both_taking_orders, 10)
        # The server's event loop (ALGOPLANE_EVENT_LOOP, default uvloop) is theirs too.
        for index in (1, 2):
            assert re.search(
                rf"engine worker {index} taking orders \(pid \d+, uvloop\.Loop\)", node.log()
            )
        workers = engine_workers_of(node.pid)
        server = node.pid
        await node.kill9()
        for pid in workers:
            await wait_gone(pid, timeout_s=5)
        for index in (1, 2):
            assert (
                f"[engine-worker-{index}] server.engine_worker: engine worker {index}: its server"
                f" (pid {server}) is gone; stopping"
            ) in node.log()


async def _count(pid: int, expected: int) -> bool:
    return len(engine_workers_of(pid)) == expected


def test_engine_processes_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALGOPLANE_ENGINE_PROCESSES", raising=False)
    monkeypatch.setenv("ALGOPLANE_METRICS_ADDR", "127.0.0.1:9464")
    assert load_settings().engine_processes == 1
    monkeypatch.setenv("ALGOPLANE_ENGINE_PROCESSES", "4")
    assert load_settings().engine_processes == 4
    for value in ("0", "17", "two", "1.5"):
        monkeypatch.setenv("ALGOPLANE_ENGINE_PROCESSES", value)
        with pytest.raises(SettingsError, match=r"^invalid setting ALGOPLANE_ENGINE_PROCESSES: "):
            load_settings()
    # Worker n serves its metrics on the server's port + n.
    monkeypatch.setenv("ALGOPLANE_METRICS_ADDR", "127.0.0.1:65534")
    monkeypatch.setenv("ALGOPLANE_ENGINE_PROCESSES", "2")
    assert load_settings().engine_processes == 2
    monkeypatch.setenv("ALGOPLANE_ENGINE_PROCESSES", "3")
    with pytest.raises(SettingsError, match=r"ALGOPLANE_ENGINE_PROCESSES: .*65535"):
        load_settings()


def test_a_worker_gets_the_server_settings_however_they_were_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(
        data_dir=Path("relative-data"),
        exec_concurrency=7,
        paper_latency_ms=3,
        buy_grace_s=12.5,
        reflection=False,
        log_format="json",
        metrics_addr="127.0.0.1:9000",
        engine_processes=3,
        jwt_secret="s" * 32,
    )
    env = worker_env(settings, redis_url="unix:///tmp/redis.sock", index=2)
    assert "ALGOPLANE_JWT_SECRET" not in env
    for name in [k for k in os.environ if k.startswith("ALGOPLANE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    got = load_settings()
    assert got.redis_url == "unix:///tmp/redis.sock"
    assert got.database_url == settings.effective_database_url
    assert got.data_dir == Path("relative-data").resolve()
    assert got.metrics_addr == "127.0.0.1:9002"
    assert got.engine_processes == 1
    assert got.jwt_secret == ""
    same = {"data_dir", "redis_url", "database_url", "metrics_addr", "engine_processes"}
    same.add("jwt_secret")
    assert got.model_dump(exclude=same) == settings.model_dump(exclude=same)
    assert settings.exec_concurrency == 7 and got.log_format == "json" and not got.reflection


async def test_an_engine_worker_refuses_to_run_without_the_server_redis(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        *(PYTHON, "-m", "server", "engine-worker", "--parent-pid", str(os.getpid())),
        env=server_env(ALGOPLANE_DATA_DIR=str(tmp_path)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "ALGOPLANE_REDIS_URL is required" in err.decode()
    assert not (tmp_path / "redis").exists()  # no embedded Redis of its own
