"""The Python SDK and the container healthcheck against the real server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from clients.healthcheck import check
from clients.sdk import AlgoplaneClient
from protos.algoplane.v1 import strategy_pb2 as pb
from tests.conftest import Harness
from tests.support import token


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
