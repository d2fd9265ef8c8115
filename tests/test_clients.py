"""The Python SDK and the container healthcheck against the real server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
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


async def _cli(server: Harness, *args: str, token_: str | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "ALGOPLANE_TARGET": f"127.0.0.1:{server.port}"}
    env["ALGOPLANE_TOKEN"] = token("cli-user") if token_ is None else token_
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_drives_the_api(server: Harness) -> None:
    code, out, _ = await _cli(
        server, "start", "--symbol", "SBIN", "--buy-in", "1h", "--stop-loss", "99.5"
    )
    assert code == 0
    started = json.loads(out)
    assert started["status"] == "STRATEGY_STATUS_SCHEDULED"
    sid = started["strategyId"]
    code, out, _ = await _cli(server, "get", sid)
    assert json.loads(out)["spec"]["stopLoss"] == "99.5"
    code, out, _ = await _cli(server, "list")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [sid]
    code, out, _ = await _cli(server, "stop", sid)
    assert json.loads(out)["status"] == "STRATEGY_STATUS_STOPPED"
    code, out, err = await _cli(server, "get", sid, token_=token("someone-else"))
    assert code == 1
    assert err.startswith("algoplane: NOT_FOUND:")
    code, _, err = await _cli(server, "list", token_="")
    assert code == 2
    assert "ALGOPLANE_TOKEN" in err
