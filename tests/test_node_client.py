"""clients/node against the real server: the protos work from Node.js (@grpc/grpc-js with
@grpc/proto-loader, nothing generated), and its errors read as status code plus message."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from tests.conftest import Harness, serving
from tests.support import RedisProcess, token

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"
SCRIPT = NODE_DIR / "start-and-watch.mjs"
NODE = shutil.which("node")
NPM = shutil.which("npm")
TENANT = "node-user"

pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None, reason="node and npm are needed to run clients/node"
)


@pytest.fixture(scope="session")
def node_modules() -> Iterator[Path]:
    """`npm ci` once per session. The lock keeps two concurrent sessions on one tree from
    installing over each other."""
    assert NPM is not None
    with (NODE_DIR / "package-lock.json").open("rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            result = subprocess.run(
                [NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
    yield NODE_DIR / "node_modules"


@dataclass
class Run:
    code: int
    lines: list[dict[str, Any]]
    stderr: str


async def start_and_watch(port: int, bearer: str, *args: str) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALGOPLANE_")}
    env.update(ALGOPLANE_ADDR=f"127.0.0.1:{port}", ALGOPLANE_TOKEN=bearer)
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE, str(SCRIPT), *args, env=env, cwd=NODE_DIR,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    lines = [json.loads(line) for line in out.decode().splitlines()]
    return Run(proc.returncode, lines, err.decode())


SPEC_ARGS = ("--symbol", "SBIN", "--quantity", "3", "--stop-loss", "90")


async def test_starts_a_strategy_and_streams_it_to_completed(
    node_modules: Path, redis_proc: RedisProcess, tmp_path: Path
) -> None:
    flush = Redis.from_url(redis_proc.url)
    await flush.flushall()
    await flush.aclose()
    async with serving(redis_proc.url, tmp_path / "data") as h:
        await h.redis.set("price:{SBIN}", "100.5")  # the paper broker fills at this price
        run = await start_and_watch(
            h.port, token(TENANT), *SPEC_ARGS,
            "--buy-in", "1500ms", "--hold", "1s", "--request-id", "node-1", "--timeout", "20s",
        )  # fmt: skip
        assert (run.code, run.stderr) == (0, "")

        runtimes = [line["runtime"] for line in run.lines]
        sid = runtimes[0]["strategyId"]
        assert all(r["strategyId"] == sid and r["symbol"] == "SBIN" for r in runtimes)
        assert [(r["status"], r["position"]) for r in runtimes] == [
            ("STRATEGY_STATUS_SCHEDULED", "POSITION_NONE"),
            ("STRATEGY_STATUS_RUNNING", "POSITION_NONE"),
            ("STRATEGY_STATUS_RUNNING", "POSITION_BOUGHT"),
            ("STRATEGY_STATUS_RUNNING", "POSITION_BOUGHT"),
            ("STRATEGY_STATUS_COMPLETED", "POSITION_SOLD"),
        ]
        # No gap and no duplicate: every version once, in order.
        versions = [int(r["version"]) for r in runtimes]
        assert versions == list(range(versions[0], versions[0] + len(versions)))

        # The first line is StartStrategy's reply; the rest are events of the tenant's stream.
        assert "eventId" not in run.lines[0]
        stream = await h.redis.xrange(f"stream:runtime:{{{TENANT}}}")
        kept = [entry_id for entry_id, _ in stream or []]
        event_ids = [line["eventId"] for line in run.lines[1:]]
        assert event_ids == [i for i in kept if i in event_ids] and len(event_ids) == 4

        # Node's JSON of the final runtime is exactly what protobuf's own JSON mapping gives.
        final = await h.stub.GetRuntime(
            pb.GetRuntimeRequest(strategy_id=sid), metadata=h.md(TENANT)
        )
        assert runtimes[-1] == MessageToDict(final)
        assert final.entry_price == final.exit_price == "100.5"


async def test_a_bad_token_reads_unauthenticated(node_modules: Path, server: Harness) -> None:
    forged = token(TENANT, secret="another-secret-0123456789abcdef-0123456789")
    run = await start_and_watch(server.port, forged, *SPEC_ARGS, "--buy-in", "1h", "--hold", "1h")
    assert run.code == 1
    assert run.lines == []
    message = run.stderr.strip()
    assert "\n" not in message
    assert message.startswith("start-and-watch: StartStrategy failed: UNAUTHENTICATED: "), message


async def test_a_bad_spec_reads_invalid_argument_naming_the_field(
    node_modules: Path, server: Harness
) -> None:
    run = await start_and_watch(
        server.port, token(TENANT), "--symbol", "SBIN", "--stop-loss", "1e3",
        "--buy-in", "1h", "--hold", "1h",
    )  # fmt: skip
    assert (run.code, run.lines) == (1, [])
    assert run.stderr.startswith(
        "start-and-watch: StartStrategy failed: INVALID_ARGUMENT: spec.stop_loss"
    ), run.stderr
    listed = await server.stub.ListStrategies(
        pb.ListStrategiesRequest(), metadata=server.md(TENANT)
    )
    assert list(listed.strategies) == []


async def test_usage_errors_exit_2_before_any_call(node_modules: Path) -> None:
    # Port 1 never answers: a call attempted would fail with UNAVAILABLE and exit 1, not 2.
    for bearer, args in [
        ("", (*SPEC_ARGS, "--buy-in", "1h", "--hold", "1h")),
        ("t", (*SPEC_ARGS, "--buy-in", "soon", "--hold", "1h")),
        ("t", (*SPEC_ARGS, "--buy-in", "1h", "--sell-time", "2030-01-02T09:15:00Z")),
        ("t", (*SPEC_ARGS, "--buy-in", "1h", "--hold", "1h", "--bogus")),
    ]:
        run = await start_and_watch(1, bearer, *args)
        assert (run.code, run.lines) == (2, []), (args, run.stderr)
        assert run.stderr.startswith("start-and-watch: "), run.stderr
        assert "usage: node start-and-watch.mjs" in run.stderr


async def test_an_absent_server_reads_unavailable(node_modules: Path) -> None:
    run = await start_and_watch(1, token(TENANT), *SPEC_ARGS, "--buy-in", "1h", "--hold", "1h")
    assert (run.code, run.lines) == (1, [])
    assert run.stderr.startswith("start-and-watch: StartStrategy failed: UNAVAILABLE: "), run.stderr
