"""Prometheus metrics: the real server with /metrics on a free port, scraped over HTTP; each
test makes something happen and checks that the series counting it moved."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.algoplane.v1 import strategy_pb2 as pb
from server.app import App
from server.brokers.base import AmbiguousBrokerError, BrokerOrder, Side
from server.brokers.metered import MeteredBroker
from server.config import SettingsError, load_settings
from server.domain import Intent
from server.metrics import Metrics
from server.store.codec import to_micros
from server.store.queue import OrderEvent
from tests.conftest import Harness, make_settings
from tests.support import RedisProcess, blocked_stream_readers, rpc_code, spec_at
from tests.test_engine import bought, eventually, pipeline, reaches, start_precise
from tests.test_market import market, open_position, subscribed

METRICS_ON: dict[str, Any] = {"metrics_addr": "127.0.0.1:0"}


class Scrape:
    """One scrape of /metrics: sample name + labels -> value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a labelled series that was never touched."""
        return self._samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(h: Harness) -> Scrape:
    port = h.app.metrics_port
    assert port is not None

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    return Scrape(await asyncio.to_thread(get))


async def reads(h: Harness, name: str, value: float, timeout_s: float = 5.0, **labels: str) -> None:
    """Waits until the series reads `value` (gauges are sampled, so they lag a little)."""

    async def check() -> bool:
        return (await scrape(h))(name, **labels) == value

    await eventually(check, timeout_s)


@asynccontextmanager
async def metered(
    redis_proc: RedisProcess, tmp_path: Path, **overrides: Any
) -> AsyncIterator[Harness]:
    async with pipeline(redis_proc, tmp_path, **METRICS_ON, **overrides) as h:
        yield h


async def test_rpcs_are_counted_by_method_and_the_code_the_client_got(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with metered(redis_proc, tmp_path) as h:
        for _ in range(2):
            await h.stub.ListStrategies(pb.ListStrategiesRequest(), metadata=h.md())
        failing: list[tuple[str, Any]] = [
            (
                "NOT_FOUND",
                h.stub.GetStrategy(pb.GetStrategyRequest(strategy_id="nope"), metadata=h.md()),
            ),
            ("INVALID_ARGUMENT", h.stub.StartStrategy(pb.StartStrategyRequest(), metadata=h.md())),
            ("UNAUTHENTICATED", h.stub.ListStrategies(pb.ListStrategiesRequest())),
        ]
        for expected, call in failing:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert rpc_code(err.value).name == expected
        stream = h.stub.StreamOrders(
            pb.StreamOrdersRequest(after_event_id="99999999999999-0"), metadata=h.md()
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream.read()
        assert rpc_code(err.value) == grpc.StatusCode.OUT_OF_RANGE

        got = await scrape(h)
        rpcs = "algoplane_rpcs_total"
        # This app's own registry: the other tests' servers in this process count elsewhere.
        assert got(rpcs, method="ListStrategies", code="OK") == 2
        assert got(rpcs, method="GetStrategy", code="NOT_FOUND") == 1
        assert got(rpcs, method="StartStrategy", code="INVALID_ARGUMENT") == 1
        assert got(rpcs, method="ListStrategies", code="UNAUTHENTICATED") == 1
        assert got(rpcs, method="StreamOrders", code="OUT_OF_RANGE") == 1
        assert got(rpcs, method="StartStrategy", code="OK") == 0


async def test_stream_subscribers_while_streams_are_open(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with metered(redis_proc, tmp_path) as h:
        runtime = h.stub.StreamRuntime(pb.StreamRuntimeRequest(), metadata=h.md())
        orders = h.stub.StreamOrders(pb.StreamOrdersRequest(), metadata=h.md())
        await blocked_stream_readers(h.redis, 2)
        got = await scrape(h)
        assert got("algoplane_stream_subscribers", method="StreamRuntime") == 1
        assert got("algoplane_stream_subscribers", method="StreamOrders") == 1
        runtime.cancel()
        orders.cancel()
        await reads(h, "algoplane_stream_subscribers", 0, method="StreamRuntime")
        await reads(h, "algoplane_stream_subscribers", 0, method="StreamOrders")
        await reads(h, "algoplane_rpcs_total", 1, method="StreamRuntime", code="CANCELLED")


async def test_a_run_counts_orders_broker_calls_and_timer_lateness(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with metered(redis_proc, tmp_path) as h:
        await h.redis.set("price:{SBIN}", "100.5")
        traded = await start_precise(h, buy_in=0.6, hold=0.6)
        rejected = await start_precise(h, buy_in=0.6, hold=60, symbol="NOPRICE")
        await reaches(h, traded, pb.STRATEGY_STATUS_COMPLETED)
        await reaches(h, rejected, pb.STRATEGY_STATUS_FAILED)

        got = await scrape(h)
        orders = "algoplane_orders_total"
        assert got(orders, kind="buy", status="filled") == 1
        assert got(orders, kind="sell", status="filled") == 1
        assert got(orders, kind="buy", status="rejected") == 1
        assert got(orders, kind="sell", status="rejected") == 0
        broker = "algoplane_broker_call_seconds"
        assert got(f"{broker}_count", operation="place_order", outcome="ok") == 3
        assert got(f"{broker}_count", operation="get_order", outcome="ok") == 0
        assert 0 < got(f"{broker}_sum", operation="place_order", outcome="ok") < 3
        lateness = "algoplane_scheduler_lateness_seconds"
        assert got(f"{lateness}_count", intent="buy") == 2
        assert got(f"{lateness}_count", intent="sell") == 1  # the failed one's SELL never fired
        assert 0 <= got(f"{lateness}_sum", intent="buy") < 1.0
        assert got("algoplane_tick_to_order_seconds_count") == 0  # no tick caused an order


async def test_armed_stop_losses_go_up_with_a_position_and_down_on_stop(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with metered(redis_proc, tmp_path) as h:  # no feed: the index is counted all the same
        await h.redis.set("price:{SBIN}", "100")
        sid = await start_precise(h, buy_in=0.5, hold=60)
        await bought(h, sid)
        await reads(h, "algoplane_stoploss_armed", 1)
        await h.stub.StopStrategy(pb.StopStrategyRequest(strategy_id=sid), metadata=h.md())
        await reads(h, "algoplane_stoploss_armed", 0)
        got = await scrape(h)
        assert got("algoplane_orders_total", kind="sell", status="filled") == 1  # Stop's exit


async def test_queue_depth_pending_and_redeliveries(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    # One worker and a slow broker: two BUYs due together make a visible backlog.
    async with metered(
        redis_proc, tmp_path, exec_concurrency=1, paper_latency_ms=800, exec_claim_idle_s=1.0
    ) as h:
        await reads(h, "algoplane_queue_depth", 0, queue="orders")
        for symbol in ("SBIN", "INFY"):
            await h.redis.set(f"price:{{{symbol}}}", "100")
        buy_at = time.time() + 0.6
        for symbol in ("SBIN", "INFY"):
            await h.stub.StartStrategy(
                pb.StartStrategyRequest(spec=spec_at(buy_at, buy_at + 60, symbol=symbol)),
                metadata=h.md(),
            )

        async def backlog() -> bool:
            got = await scrape(h)
            depth = got("algoplane_queue_depth", queue="orders")
            return depth == 2 and got("algoplane_queue_pending", queue="orders") == 1

        await eventually(backlog, timeout_s=5)
        await reads(h, "algoplane_queue_depth", 0, queue="orders")
        await reads(h, "algoplane_queue_pending", 0, queue="orders")

        # A worker that took an event and died: the event stays pending until it is taken
        # over. XADD and XREADGROUP in one transaction, so the engine's own blocked read
        # cannot take it first.
        now = to_micros(datetime.now(UTC))
        ghost = "stg_" + "0" * 32
        event = OrderEvent(ghost, "tenant-a", 1, Intent.BUY, f"{ghost}-1-buy", now, now)
        async with h.redis.pipeline(transaction=True) as pipe:
            pipe.xadd("queue:orders", dict(event.fields().items()))
            pipe.xreadgroup("engine", "dead-worker", {"queue:orders": ">"}, count=1)
            await pipe.execute()
        got = await scrape(h)
        assert got("algoplane_queue_redeliveries_total", queue="orders") == 0
        await reads(h, "algoplane_queue_pending", 1, queue="orders")
        await reads(h, "algoplane_queue_redeliveries_total", 1, queue="orders")
        await reads(h, "algoplane_queue_depth", 0, queue="orders")
        assert (await scrape(h))("algoplane_queue_redeliveries_total", queue="exits") == 0


async def test_a_stop_loss_exit_measures_tick_to_order(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with market(redis_proc, tmp_path, **METRICS_ON) as (h, feed):
        sid = await open_position(h, feed)
        await reads(h, "algoplane_stoploss_armed", 1)
        assert (await scrape(h))("algoplane_tick_to_order_seconds_count") == 0
        await feed.push("SBIN", "95")
        await reaches(h, sid, pb.STRATEGY_STATUS_COMPLETED)
        got = await scrape(h)
        assert got("algoplane_tick_to_order_seconds_count") == 1
        assert 0 < got("algoplane_tick_to_order_seconds_sum") < 2
        assert got("algoplane_orders_total", kind="stoploss", status="filled") == 1
        await reads(h, "algoplane_stoploss_armed", 0)


async def test_feed_connection_staleness_and_reconnects(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with market(redis_proc, tmp_path, feed_stale_s=1.0, **METRICS_ON) as (h, feed):
        await open_position(h, feed)
        got = await scrape(h)
        assert got("algoplane_feed_connected") == 1
        assert got("algoplane_feed_reconnects_total") == 0
        await reads(h, "algoplane_feed_stale_symbols", 1)  # a position, no tick for 1 s
        await feed.push("SBIN", "101")
        await reads(h, "algoplane_feed_stale_symbols", 0)

        await feed.stop()
        await reads(h, "algoplane_feed_connected", 0)
        await feed.start(port=feed.port)
        await subscribed(feed, "SBIN")
        await reads(h, "algoplane_feed_connected", 1)
        assert (await scrape(h))("algoplane_feed_reconnects_total") >= 1


async def test_metrics_are_off_with_an_empty_address(server: Harness) -> None:
    assert server.app.metrics_port is None


async def test_a_taken_metrics_port_stops_startup_naming_the_variable(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = App(make_settings(redis_proc.url, tmp_path, metrics_addr=f"127.0.0.1:{port}"))
        with pytest.raises(OSError, match=f"ALGOPLANE_METRICS_ADDR=127.0.0.1:{port}"):
            await app.start()
        await app.stop()
        assert app.metrics_port is None
        assert not (tmp_path / "algoplane.db").exists()  # it failed before anything else


def test_metrics_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALGOPLANE_METRICS_ADDR", raising=False)
    monkeypatch.delenv("ALGOPLANE_LOG_FORMAT", raising=False)
    settings = load_settings()
    assert settings.metrics_addr == "127.0.0.1:9464"
    assert settings.metrics_bind == ("127.0.0.1", 9464)
    assert settings.log_format == "text"
    for value, bind in [("", None), ("0.0.0.0:0", ("0.0.0.0", 0)), ("[::1]:9465", ("::1", 9465))]:
        monkeypatch.setenv("ALGOPLANE_METRICS_ADDR", value)
        assert load_settings().metrics_bind == bind
    for name, value in [
        ("ALGOPLANE_METRICS_ADDR", "9464"),
        ("ALGOPLANE_METRICS_ADDR", "localhost:99999"),
        ("ALGOPLANE_LOG_FORMAT", "xml"),
    ]:
        monkeypatch.setenv(name, value)
        with pytest.raises(SettingsError) as err:
            load_settings()
        assert str(err.value).startswith(f"invalid setting {name}: ")
        assert "\n" not in str(err.value)
        monkeypatch.delenv(name)


class _FlakyBroker:
    """Places nothing in time and fails every lookup."""

    async def place_order(
        self, client_order_id: str, symbol: str, side: Side, quantity: int
    ) -> BrokerOrder:
        await asyncio.sleep(10)
        raise AssertionError("the caller's timeout should have cancelled this")

    async def get_order(self, client_order_id: str) -> BrokerOrder | None:
        raise AmbiguousBrokerError("connection reset")


async def test_broker_calls_are_timed_by_outcome() -> None:
    metrics = Metrics()
    broker = MeteredBroker(broker=_FlakyBroker(), metrics=metrics)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(broker.place_order("c-1", "SBIN", Side.BUY, 1), 0.05)
    with pytest.raises(AmbiguousBrokerError):
        await broker.get_order("c-1")

    def count(operation: str, outcome: str) -> float | None:
        labels = {"operation": operation, "outcome": outcome}
        return metrics.registry.get_sample_value("algoplane_broker_call_seconds_count", labels)

    assert count("place_order", "cancelled") == 1
    assert count("get_order", "error") == 1
    assert count("place_order", "ok") == count("place_order", "error") == 0
