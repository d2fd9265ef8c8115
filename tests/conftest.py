"""Fixtures: a real redis-server on a free port, the real server (grpc.aio) on a free port,
real SQLite in a temp dir; tests call the generated stubs."""

from __future__ import annotations

import os

# Before grpc is imported: this process serves gRPC (grpc.aio, in process) and also forks
# children (grpcurl, through uvloop's subprocess). With grpc's fork support on, its handlers
# ran in the forked child while other threads were inside gRPC, and about one run in five
# of tests/test_readme_grpcurl.py saw that child abort before it exec'd grpcurl
# ("ev_epoll1_linux.cc: Check failed: next_worker->state == KICKED"); none in 12 without.
# No test relies on gRPC surviving a fork: the children exec at once.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import grpc
import pytest
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2_grpc
from server import event_loop
from server.app import App
from server.config import Settings
from server.event_loop import EventLoop
from server.store.state import RedisState, connect
from tests.support import SECRET, RedisProcess, aio_stub, auth, redis_process


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with redis_process(tmp_path_factory.mktemp("redis")) as proc:
        yield proc


@pytest.fixture
async def redis(redis_proc: RedisProcess) -> AsyncIterator[Redis]:
    """A client of the session's redis-server, emptied for this test."""
    client = connect(redis_proc.url, timeout_s=10)
    await client.flushall()
    yield client
    await client.aclose()


@dataclass
class Harness:
    """A running server and what a test needs to talk to it and inspect its state."""

    app: App
    settings: Settings
    port: int
    channel: grpc.aio.Channel
    stub: strategy_pb2_grpc.StrategyServiceAsyncStub
    redis: Redis

    def md(self, tenant: str = "tenant-a") -> tuple[tuple[str, str]]:
        return auth(tenant)


def make_settings(redis_url: str, data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "grpc_addr": "127.0.0.1:0",
        "redis_url": redis_url,
        "data_dir": data_dir,
        "jwt_secret": SECRET,
        "shutdown_grace_s": 1.0,
        "health_interval_s": 0.2,
        "redis_timeout_s": 1.0,
        # Never the default 9464: tests run servers side by side; metric tests ask for port 0.
        "metrics_addr": "",
    }
    values.update(overrides)
    return Settings.model_validate(values)


async def start_harness(settings: Settings) -> Harness:
    app = App(settings)
    running = await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    return Harness(
        app=app,
        settings=settings,
        port=running.port,
        channel=channel,
        stub=aio_stub(channel),
        redis=redis,
    )


async def stop_harness(harness: Harness) -> None:
    await harness.channel.close(None)
    await harness.redis.aclose()
    await harness.app.stop()


@asynccontextmanager
async def serving(redis_url: str, data_dir: Path, **overrides: Any) -> AsyncIterator[Harness]:
    """The in-process server with the pipeline's test defaults (fast timer sync, 8 workers)
    on any Redis URL, e.g. a fault proxy's; `overrides` are Settings fields."""
    values: dict[str, Any] = {"timer_sync_s": 0.5, "exec_concurrency": 8}
    values.update(overrides)
    harness = await start_harness(make_settings(redis_url, data_dir, **values))
    try:
        yield harness
    finally:
        await stop_harness(harness)


@pytest.fixture
async def server(redis_proc: RedisProcess, tmp_path: Path) -> AsyncIterator[Harness]:
    flush = Redis.from_url(redis_proc.url)
    await flush.flushall()
    await flush.aclose()
    harness = await start_harness(make_settings(redis_proc.url, tmp_path / "data"))
    try:
        yield harness
    finally:
        await stop_harness(harness)


@pytest.fixture
async def state(redis_proc: RedisProcess) -> AsyncIterator[RedisState]:
    """A RedisState on the test redis-server, flushed."""
    client = connect(redis_proc.url, timeout_s=5)
    await client.flushall()
    streams = connect(redis_proc.url, timeout_s=5)
    state = RedisState(client=client, stream_client=streams, stream_maxlen=1000)
    yield state
    await state.close()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    # The tests' in-process servers run on the loop the server runs on by default (uvloop),
    # or on ALGOPLANE_EVENT_LOOP's when it is set: `ALGOPLANE_EVENT_LOOP=asyncio scripts/test`.
    kind = os.environ.get("ALGOPLANE_EVENT_LOOP") or Settings.model_fields["event_loop"].default
    for choice in get_args(EventLoop):
        if kind == choice:
            return {choice: event_loop.factory(choice)}
    raise pytest.UsageError(f"ALGOPLANE_EVENT_LOOP={kind!r}: one of {get_args(EventLoop)}")
