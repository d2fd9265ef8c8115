"""The Python SDK and the container healthcheck against the real server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis

from clients import Connection, RetryEvent, RetryPolicy, StreamGapError, StreamState
from clients.healthcheck import check
from clients.sdk import AlgoplaneClient
from protos.algoplane.v1 import strategy_pb2 as pb
from tests.conftest import Harness, serving
from tests.faults.proxy import FaultProxy
from tests.support import (
    RedisProcess,
    auth,
    blocked_stream_readers,
    free_port,
    spec,
    token,
)


async def test_sdk_round_trip(server: Harness) -> None:
    buy = datetime.now(UTC) + timedelta(hours=1)
    async with AlgoplaneClient(f"127.0.0.1:{server.port}", token("sdk-user")) as client:
        spec = client.spec("SBIN", 5, buy, buy + timedelta(hours=2), "90.125")
        created = await client.create(spec, request_id="sdk-1")
        assert await client.create(spec, request_id="sdk-1") == created
        events = client.watch_runtime(created.id)
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.3)  # the stream is open before the change it should see
        runtime = await client.start(strategy_id=created.id)
        event = await asyncio.wait_for(first, 5)
        assert event.runtime == runtime
        assert [s.id for s in await client.list_all()] == [created.id]
        stopped = await client.stop(created.id)
        assert stopped.status == pb.STRATEGY_STATUS_STOPPED
        assert await client.runtime(created.id) == stopped
        assert await client.orders(created.id) == []
        await events.aclose()


async def test_sdk_refuses_naive_datetimes_and_ambiguous_start(server: Harness) -> None:
    async with AlgoplaneClient(f"127.0.0.1:{server.port}", token("sdk-user")) as client:
        with pytest.raises(ValueError, match="timezone-aware"):
            client.spec("SBIN", 1, datetime(2030, 1, 1), datetime(2030, 1, 2), "1")
        with pytest.raises(ValueError, match="exactly one"):
            await client.start()


async def test_healthcheck_reports_serving(server: Harness) -> None:
    assert await asyncio.to_thread(check, f"127.0.0.1:{server.port}")
    assert not await asyncio.to_thread(check, "127.0.0.1:1", 0.5)


# -- retries, resume and packaging: against a real server that goes away and comes back ----


@asynccontextmanager
async def restartable(
    redis_proc: RedisProcess, data_dir: Path, port: int
) -> AsyncIterator[Harness]:
    """A server on a fixed port (so a client can find it again after a restart)."""
    async with serving(redis_proc.url, data_dir, grpc_addr=f"127.0.0.1:{port}") as harness:
        yield harness


@pytest.fixture
async def clean_redis(redis_proc: RedisProcess) -> RedisProcess:
    flush = Redis.from_url(redis_proc.url)
    await flush.flushall()
    await flush.aclose()
    return redis_proc


FAST = RetryPolicy(attempts=30, initial_backoff_s=0.05, max_backoff_s=0.2)


async def test_reads_retry_until_the_server_is_back_and_refusals_are_not_retried(
    clean_redis: RedisProcess, tmp_path: Path
) -> None:
    port = free_port()
    retries: list[RetryEvent] = []
    async with restartable(clean_redis, tmp_path, port) as first:
        sid = (await first.stub.CreateStrategy(
            pb.CreateStrategyRequest(spec=spec()), metadata=auth("sdk-user")
        )).id  # fmt: skip
    client = AlgoplaneClient(
        f"127.0.0.1:{port}", token("sdk-user"), timeout_s=1, retry=FAST, on_retry=retries.append
    )
    async with client:
        pending = asyncio.ensure_future(client.get(sid))
        await asyncio.sleep(0.6)
        assert not pending.done()  # the server is away: retrying, not failed
        async with restartable(clean_redis, tmp_path, port):
            strategy = await asyncio.wait_for(pending, 10)
            assert strategy.id == sid
            assert retries and {r.code for r in retries} <= {
                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED
            }  # fmt: skip
            assert {(r.method, r.request_id) for r in retries} == {("GetStrategy", "")}
            seen = len(retries)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.get("stg_000000000000" + "0" * 20)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            assert len(retries) == seen  # NOT_FOUND is an answer, not a reason to retry


async def test_a_lost_reply_is_retried_with_the_same_generated_request_id(server: Harness) -> None:
    """The reply to the first Create never arrives in time (a slow link); the retry carries the
    same request_id, so the server answers with the first result instead of a second strategy."""
    proxy = FaultProxy("127.0.0.1", server.port)
    port = await proxy.start()
    retries: list[RetryEvent] = []

    def heal(event: RetryEvent) -> None:
        retries.append(event)
        proxy.heal()

    client = AlgoplaneClient(
        f"127.0.0.1:{port}", token("sdk-user"), timeout_s=0.8, retry=FAST, on_retry=heal
    )
    try:
        async with client:
            await client.list_all()  # the connection is up before the link gets slow
            proxy.latency(0.5)  # the request lands at 0.5 s, its reply would at ~1 s
            created = await client.create(spec(symbol="INFY"))
            listed = await client.list_all()
    finally:
        await proxy.stop()
    assert [r.code for r in retries] == [grpc.StatusCode.DEADLINE_EXCEEDED]
    request_id = retries[0].request_id
    assert len(request_id) == 32 and retries[0].method == "CreateStrategy"
    assert [s.id for s in listed] == [created.id]  # one strategy, not two
    again = await server.stub.CreateStrategy(
        pb.CreateStrategyRequest(spec=created.spec, request_id=request_id),
        metadata=auth("sdk-user"),
    )
    assert again == created  # the server stored the first attempt under that very id


async def test_streams_resume_across_a_restart_with_no_gap_and_no_duplicate(
    clean_redis: RedisProcess, tmp_path: Path
) -> None:
    """Events made while the watcher is cut off (through another server on the same Redis
    and DB) arrive after it reconnects to the restarted server, once each and in order."""
    port = free_port()
    states: list[StreamState] = []
    client = AlgoplaneClient(f"127.0.0.1:{port}", token("sdk-user"), retry=FAST)
    async with client:
        events = client.watch_runtime(on_state=states.append)
        async with restartable(clean_redis, tmp_path, port) as first:
            nxt = asyncio.ensure_future(anext(events))
            await blocked_stream_readers(first.redis, 1)
            a = await client.start(spec=spec(symbol="SBIN"))
            got = [await asyncio.wait_for(nxt, 5)]
            nxt = asyncio.ensure_future(anext(events))
        # Down: the watcher retries while changes happen through a second server.
        async with serving(clean_redis.url, tmp_path) as other:
            md = auth("sdk-user")
            b = await other.stub.StartStrategy(pb.StartStrategyRequest(spec=spec()), metadata=md)
            s = await other.stub.StopStrategy(
                pb.StopStrategyRequest(strategy_id=a.strategy_id), metadata=md
            )
        assert not nxt.done()
        assert any(st.connection is Connection.RECONNECTING for st in states)
        async with restartable(clean_redis, tmp_path, port):
            got.append(await asyncio.wait_for(nxt, 15))
            got.append(await asyncio.wait_for(anext(events), 5))
            c = await client.stop(b.strategy_id)
            got.append(await asyncio.wait_for(anext(events), 5))
        await events.aclose()
    assert [e.runtime for e in got] == [a, b, s, c]
    assert len({e.event_id for e in got}) == 4
    resumed = [st for st in states if st.connection is Connection.CONNECTED]
    assert resumed[0].resumed_after == "" and not resumed[0].gap_possible
    assert resumed[-1].resumed_after == got[0].event_id and not resumed[-1].gap_possible


async def test_a_batch_is_handed_out_event_by_event_and_resumed_after_its_last(
    clean_redis: RedisProcess, tmp_path: Path
) -> None:
    """watch_runtime reads StreamRuntimeBatches: three events waiting at the resume point
    arrive as one message and are yielded one by one; after the server goes away and comes
    back, the stream resumes after the last of them (the next change once, nothing twice).
    batched=False reads the single-event stream and yields the same events."""
    port = free_port()
    md = auth("sdk-user")
    client = AlgoplaneClient(f"127.0.0.1:{port}", token("sdk-user"), retry=FAST)
    async with client:
        async with restartable(clean_redis, tmp_path, port) as first:
            anchor = await first.stub.StartStrategy(
                pb.StartStrategyRequest(spec=spec(symbol="A0")), metadata=md
            )
            info = await first.redis.xinfo_stream("stream:runtime:{sdk-user}")
            after = str(info["last-generated-id"])
            waiting = [
                await first.stub.StartStrategy(
                    pb.StartStrategyRequest(spec=spec(symbol=f"W{n}")), metadata=md
                )
                for n in range(3)
            ]
            batches = first.stub.StreamRuntimeBatches(
                pb.StreamRuntimeRequest(after_event_id=after), metadata=md
            )
            one = await asyncio.wait_for(batches.read(), 5)
            batches.cancel()
            assert isinstance(one, pb.RuntimeEventBatch)
            assert [e.runtime for e in one.events] == waiting  # one message

            events = client.watch_runtime(after_event_id=after)
            got = [await asyncio.wait_for(anext(events), 5)]
            plain = client.watch_runtime(after_event_id=after, batched=False)
            singles = [await asyncio.wait_for(anext(plain), 5) for _ in waiting]
            await plain.aclose()
        # The server is gone; the rest of the batch was in hand already.
        got += [await asyncio.wait_for(anext(events), 5) for _ in waiting[1:]]
        nxt = asyncio.ensure_future(anext(events))
        async with restartable(clean_redis, tmp_path, port):
            later = await client.stop(anchor.strategy_id)
            got.append(await asyncio.wait_for(nxt, 15))
        await events.aclose()
    assert [e.runtime for e in got] == [*waiting, later]
    assert got[:3] == singles
    assert len({e.event_id for e in got}) == 4


async def test_a_position_the_stream_no_longer_keeps_is_a_gap_error(server: Harness) -> None:
    states: list[StreamState] = []
    async with AlgoplaneClient(f"127.0.0.1:{server.port}", token("sdk-user")) as client:
        with pytest.raises(StreamGapError, match="ahead of the stream"):
            await anext(
                client.watch_orders(after_event_id="99999999999999-0", on_state=states.append)
            )
    assert states[-1].connection is Connection.FAILED
    assert states[-1].error.startswith("OUT_OF_RANGE: ")


def test_the_wheel_ships_the_generated_stubs(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(root)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    [wheel] = tmp_path.glob("algoplane-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in ("strategy_pb2.py", "strategy_pb2.pyi", "strategy_pb2_grpc.py", "strategy.proto"):
        assert f"protos/algoplane/v1/{stub}" in names
    assert {"clients/sdk.py", "clients/cli.py", "clients/py.typed"} <= names


async def test_a_stream_cut_before_its_first_event_resumes_where_it_started(
    clean_redis: RedisProcess, tmp_path: Path
) -> None:
    """The server announces the start position in the stream's headers, so a watcher that got
    no event before the server went away still misses nothing that happened meanwhile."""
    port = free_port()
    states: list[StreamState] = []
    client = AlgoplaneClient(f"127.0.0.1:{port}", token("sdk-user"), retry=FAST)
    async with client:
        events = client.watch_runtime(on_state=states.append)
        async with restartable(clean_redis, tmp_path, port) as first:
            await first.stub.StartStrategy(  # the stream is not empty: it starts after this
                pb.StartStrategyRequest(spec=spec(symbol="TCS")), metadata=auth("sdk-user")
            )
            nxt = asyncio.ensure_future(anext(events))
            for _ in range(250):
                if any(st.connection is Connection.CONNECTED for st in states):
                    break
                await asyncio.sleep(0.02)
            start_after = (await first.redis.xinfo_stream("stream:runtime:{sdk-user}"))[
                "last-generated-id"
            ]
        async with serving(clean_redis.url, tmp_path) as other:
            during = await other.stub.StartStrategy(
                pb.StartStrategyRequest(spec=spec(symbol="INFY")), metadata=auth("sdk-user")
            )
        async with restartable(clean_redis, tmp_path, port):
            got = await asyncio.wait_for(nxt, 15)
        await events.aclose()
    assert got.runtime == during
    connected = [st for st in states if st.connection is Connection.CONNECTED]
    assert connected[0].resumed_after == ""
    assert connected[-1].resumed_after == start_after and not connected[-1].gap_possible


async def test_a_link_that_goes_silent_is_noticed_by_keepalive_and_the_stream_resumes(
    server: Harness,
) -> None:
    """A black-holed link (no reset, nothing forwarded) under an idle stream: the SDK's pings
    go unanswered, it reconnects once the link works again, and misses nothing meanwhile."""
    proxy = FaultProxy("127.0.0.1", server.port)
    port = await proxy.start()
    states: list[StreamState] = []
    client = AlgoplaneClient(f"127.0.0.1:{port}", token("sdk-user"), retry=FAST, keepalive_s=1.0)
    try:
        async with client:
            events = client.watch_runtime(on_state=states.append)
            nxt = asyncio.ensure_future(anext(events))
            await until_state(states, Connection.CONNECTED)
            proxy.blackhole()
            await until_state(states, Connection.RECONNECTING, timeout_s=6)
            during = await server.stub.StartStrategy(  # made while the watcher is cut off
                pb.StartStrategyRequest(spec=spec(symbol="WIPRO")), metadata=auth("sdk-user")
            )
            proxy.heal()
            got = await asyncio.wait_for(nxt, 15)
            await events.aclose()
    finally:
        await proxy.stop()
    assert got.runtime == during


async def until_state(
    states: list[StreamState], connection: Connection, timeout_s: float = 5.0
) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if any(st.connection is connection for st in states):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {connection.value} state within {timeout_s}s: {states}")
