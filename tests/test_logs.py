"""Structured logs: text and JSON formats, the ids each line carries, and no token or secret
in any log line of a real authenticated run."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.algoplane.v1 import strategy_pb2 as pb
from server import logs
from tests.support import (
    SECRET,
    RedisProcess,
    aio_stub,
    auth,
    free_port,
    rpc_code,
    server_env,
    token,
)
from tests.test_engine import pipeline, reaches, start_precise
from tests.test_process import ServerProcess, md

log = logging.getLogger("tests.test_logs")


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Every logger's records, at DEBUG, as the server's JSON handler writes them."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = logs.configure("DEBUG", "json", stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def ours(stream: io.StringIO) -> list[dict[str, Any]]:
    """This module's lines: a thread an earlier test left closing (a DB driver's, say) may
    still log at DEBUG into the root logger meanwhile."""
    return [entry for entry in lines(stream) if entry["logger"] == log.name]


def test_json_lines_carry_the_bound_ids_and_the_traceback(json_logs: io.StringIO) -> None:
    with logs.context(tenant="tenant-a", strategy_id="stg_1"):
        log.info("placed %s", "it", extra={"order_id": "stg_1-1-buy"})
        with logs.context(event_id="1-0"):
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("failed")
    log.warning("outside")
    placed, failed, outside = ours(json_logs)
    assert placed["message"] == "placed it"
    assert placed["level"] == "INFO" and placed["logger"] == "tests.test_logs"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", placed["ts"])
    assert (placed["tenant"], placed["strategy_id"], placed["order_id"]) == (
        "tenant-a",
        "stg_1",
        "stg_1-1-buy",
    )
    assert "event_id" not in placed
    assert failed["event_id"] == "1-0" and failed["tenant"] == "tenant-a"
    assert "ValueError: boom" in failed["exception"]
    assert set(outside) == {"ts", "level", "logger", "message"}  # the bindings ended


def test_text_lines_are_readable() -> None:
    stream = io.StringIO()
    handler = logs.configure("INFO", "text", stream)
    root = logging.getLogger()
    try:
        with logs.context(tenant="tenant-a", strategy_id="stg_1"):
            log.info("started")
        log.debug("not at INFO")
        log.info("plain")
    finally:
        root.removeHandler(handler)
    started, plain = stream.getvalue().splitlines()
    prefix = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO tests\.test_logs: "
    assert re.fullmatch(prefix + r"started \[tenant=tenant-a strategy_id=stg_1\]", started)
    assert re.fullmatch(prefix + "plain", plain)


def test_an_engine_workers_lines_say_which_process_wrote_them() -> None:
    root = logging.getLogger()
    lines = []
    for fmt in ("text", "json"):
        stream = io.StringIO()
        handler = logs.configure("INFO", fmt, stream, process="engine-worker-2")
        try:
            log.info("taking orders")
        finally:
            root.removeHandler(handler)
        lines.append(stream.getvalue().strip())
    text, entry = lines[0], json.loads(lines[1])
    assert re.fullmatch(
        r"\S+ \S+ INFO \[engine-worker-2\] tests\.test_logs: taking orders", text
    ), text
    assert entry["process"] == "engine-worker-2" and entry["message"] == "taking orders"


def test_anything_shaped_like_a_token_is_redacted(json_logs: io.StringIO) -> None:
    jwt = token("tenant-a")
    log.warning("header was %s", f"Bearer {jwt}")
    log.warning("raw %s; bearer token missing", jwt)
    log.warning("shouted: %s", "BEARER opaque-credential-1234")
    output = json_logs.getvalue()
    assert jwt not in output and "opaque-credential" not in output
    header, raw, shouted = ours(json_logs)
    assert header["message"] == "header was [redacted]"
    assert raw["message"] == "raw [redacted]; bearer token missing"
    assert shouted["message"] == "shouted: [redacted]"


async def test_a_served_run_logs_its_ids_and_never_a_token_or_the_secret(
    redis_proc: RedisProcess,
    tmp_path: Path,
    json_logs: io.StringIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    good = auth("tenant-a")
    forged = (("authorization", f"Bearer {token('tenant-a', secret='x' * 40)}"),)
    async with pipeline(redis_proc, tmp_path) as h:
        sid = await start_precise(h, buy_in=0.5, hold=60, symbol="NOPRICE")  # BUY rejected
        await reaches(h, sid, pb.STRATEGY_STATUS_FAILED)
        await h.stub.ListOrders(pb.ListOrdersRequest(strategy_id=sid), metadata=good)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.ListStrategies(pb.ListStrategiesRequest(), metadata=forged)
        assert rpc_code(err.value) == grpc.StatusCode.UNAUTHENTICATED

    entries = lines(json_logs)
    [started] = [e for e in entries if e["message"].startswith(f"strategy {sid} started")]
    assert (started["tenant"], started["strategy_id"]) == ("tenant-a", sid)
    [rejected] = [e for e in entries if e["message"].startswith(f"order {sid}-1-buy REJECTED")]
    assert rejected["logger"] == "server.engine"
    assert (rejected["tenant"], rejected["strategy_id"]) == ("tenant-a", sid)
    assert rejected["order_id"] == f"{sid}-1-buy"
    assert re.fullmatch(r"\d+-\d+", rejected["event_id"])  # the queue entry it came from
    # A timer fires for every tenant due at its instant: it carries none of the RPC's fields.
    fired = [e for e in entries if e["message"].startswith('Running job "Scheduler._wake')]
    assert fired and all("tenant" not in e and "strategy_id" not in e for e in fired)

    # Nothing logs a credential at all (the raw records, before any redaction) ...
    raw = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert len(caplog.records) > 20  # DEBUG of every library was on
    credentials = [good[0][1], forged[0][1], SECRET]
    for secret in [*credentials, *(c.removeprefix("Bearer ") for c in credentials)]:
        assert secret not in raw
        assert secret not in json_logs.getvalue()  # ... nor the written lines


async def test_the_server_process_logs_json_and_serves_metrics(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    env = server_env(
        ALGOPLANE_GRPC_ADDR=f"127.0.0.1:{port}",
        ALGOPLANE_REDIS_URL=redis_proc.url,
        ALGOPLANE_DATA_DIR=str(tmp_path / "data"),
        ALGOPLANE_JWT_SECRET=SECRET,
        ALGOPLANE_LOG_FORMAT="json",
        ALGOPLANE_METRICS_ADDR=f"127.0.0.1:{metrics_port}",
    )
    server = await ServerProcess.start(env, tmp_path, tmp_path / "server.log")
    try:
        await server.read_until("algoplane: listening on")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await aio_stub(channel).ListStrategies(
                pb.ListStrategiesRequest(), metadata=md(token("tenant-a"))
            )
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/metrics")
        assert b'algoplane_rpcs_total{code="OK",method="ListStrategies"} 1.0' in text
        server.process.send_signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        await server.kill()
    entries = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()]
    messages = [e["message"] for e in entries]
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in messages
    assert f"algoplane trading on port {port}" in messages
    assert "shutting down" in messages


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return bytes(reply.read())


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushed = ""

    def flush(self) -> None:
        self.flushed = self.getvalue()


async def test_info_lines_are_flushed_together_soon_and_warnings_at_once() -> None:
    stream = _CountingStream()
    handler = logs.configure("INFO", "text", stream)
    try:
        log.info("first")
        log.info("second")
        assert "first" in stream.getvalue() and stream.flushed == ""
        await asyncio.sleep(logs.FlushBehindHandler.FLUSH_S * 3)
        assert "first" in stream.flushed and "second" in stream.flushed
        log.warning("at once")
        assert "at once" in stream.flushed
    finally:
        logging.getLogger().removeHandler(handler)
