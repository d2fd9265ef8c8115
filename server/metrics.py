"""Prometheus metrics: every definition in one place, on a registry per `Metrics`.

The composition root makes one `Metrics` and passes it to the components that count; each
App has its own `CollectorRegistry`, so several apps in one process (the tests) never share
series. Calls on per-order and per-tick paths go to children bound once here: no label
lookup, no string formatting.

Gauges that live in Redis (queue depth, armed stop-losses) are set by a periodic sampler in
the app (`set_queues`, `stoploss_armed`); the listener's own state is read on scrape through
`watch_listener`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from server.config import Settings
from server.domain import Intent, OrderKind, OrderStatus

log = logging.getLogger(__name__)

QUEUES = ("orders", "exits")
BROKER_OPERATIONS = ("place_order", "get_order")
# ok: a reply; error: the broker raised (ambiguous or not); cancelled: the engine's broker
# timeout ran out (or shutdown) while the call was still running.
BROKER_OUTCOMES = ("ok", "error", "cancelled")
STREAM_METHODS = ("StreamRuntime", "StreamOrders", "StreamRuntimeBatches", "StreamOrdersBatches")

_TICK_TO_ORDER_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
# Timers fire milliseconds late when healthy, hours late after a long outage.
_LATENESS_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0,
)  # fmt: skip


class ListenerView(Protocol):
    """What a scrape reads of the market listener: plain attributes, safe to read from the
    HTTP server's thread (each read is one atomic load; the listener replaces, never
    mutates, its stale set)."""

    connected: bool

    @property
    def stats(self) -> Mapping[str, int]: ...

    @property
    def stale(self) -> frozenset[str]: ...


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.orders = Counter(
            "algoplane_orders",
            "Orders that reached a final status, by kind and status.",
            ["kind", "status"],
            registry=registry,
        )
        self.broker_call_seconds = Histogram(
            "algoplane_broker_call_seconds",
            "Duration of each broker call, by operation and outcome.",
            ["operation", "outcome"],
            registry=registry,
        )
        self.tick_to_order_seconds = Histogram(
            "algoplane_tick_to_order_seconds",
            "From the feed message that breached a stop-loss to the start of its exit's "
            "broker call.",
            buckets=_TICK_TO_ORDER_BUCKETS,
            registry=registry,
        )
        self.scheduler_lateness_seconds = Histogram(
            "algoplane_scheduler_lateness_seconds",
            "How late a BUY/SELL timer fired after its scheduled instant.",
            ["intent"],
            buckets=_LATENESS_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "algoplane_queue_depth",
            "Events in the queue not yet acknowledged (waiting or being handled).",
            ["queue"],
            registry=registry,
        )
        self.queue_pending = Gauge(
            "algoplane_queue_pending",
            "Events taken by a worker and not yet acknowledged (redelivered if it dies).",
            ["queue"],
            registry=registry,
        )
        self.queue_redeliveries = Counter(
            "algoplane_queue_redeliveries",
            "Events taken over from a worker that went silent.",
            ["queue"],
            registry=registry,
        )
        self.stoploss_armed = Gauge(
            "algoplane_stoploss_armed",
            "Positions armed in the stop-loss index (shared Redis: every replica reports it).",
            registry=registry,
        )
        self.stream_subscribers = Gauge(
            "algoplane_stream_subscribers",
            "Open stream calls (StreamRuntime, StreamOrders and their *Batches) on this process.",
            ["method"],
            registry=registry,
        )
        self.engine_workers = Gauge(
            "algoplane_engine_workers",
            "Engine-only worker processes this server has running "
            "(ALGOPLANE_ENGINE_PROCESSES - 1 when all are up).",
            registry=registry,
        )
        self.rpcs = Counter(
            "algoplane_rpcs",
            "Finished StrategyService calls, by method and the status code the client got.",
            ["method", "code"],
            registry=registry,
        )
        self._bind_children()

    def _bind_children(self) -> None:
        self._orders = {
            (kind, status): self.orders.labels(kind.value.lower(), status.value.lower())
            for kind in OrderKind
            for status in OrderStatus
            if status.final
        }
        self._broker = {
            (operation, outcome): self.broker_call_seconds.labels(operation, outcome)
            for operation in BROKER_OPERATIONS
            for outcome in BROKER_OUTCOMES
        }
        self._lateness = {
            intent: self.scheduler_lateness_seconds.labels(intent.value)
            for intent in (Intent.BUY, Intent.SELL)
        }
        self._redeliveries = {q: self.queue_redeliveries.labels(q) for q in QUEUES}
        self.subscribers = {m: self.stream_subscribers.labels(m) for m in STREAM_METHODS}
        self._rpc_children: dict[tuple[str, str], Counter] = {}

    def order_final(self, kind: OrderKind, status: OrderStatus) -> None:
        child = self._orders.get((kind, status))
        if child is not None:
            child.inc()

    def broker_call(self, operation: str, outcome: str, seconds: float) -> None:
        self._broker[operation, outcome].observe(seconds)

    def tick_to_order(self, seconds: float) -> None:
        self.tick_to_order_seconds.observe(max(seconds, 0.0))

    def timer_fired(self, intent: Intent, late_s: float) -> None:
        child = self._lateness.get(intent)
        if child is not None:
            # A timer may fire a hair early; that is "on time", not negative lateness.
            child.observe(max(late_s, 0.0))

    def redelivered(self, queue: str) -> None:
        child = self._redeliveries.get(queue)
        if child is not None:
            child.inc()

    def set_queues(self, depths: Mapping[str, tuple[int, int]]) -> None:
        """Per queue: (entries not acknowledged, of which taken by a worker)."""
        for queue, (depth, pending) in depths.items():
            self.queue_depth.labels(queue).set(depth)
            self.queue_pending.labels(queue).set(pending)

    def rpc_done(self, method: str, code: str) -> None:
        # labels() takes a lock and validates on every call. Bound on first use rather than
        # up front (unlike the children above): /metrics shows only the (method, code) pairs
        # that happened, and those are a small, fixed set.
        child = self._rpc_children.get((method, code))
        if child is None:
            child = self._rpc_children[method, code] = self.rpcs.labels(method, code)
        child.inc()

    def watch_listener(self, listener: ListenerView) -> None:
        """Feed metrics read on scrape from the listener's own state."""
        self.registry.register(_FeedCollector(listener))

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serves /metrics over HTTP from a daemon thread (prometheus_client's server)."""
        httpd, thread = start_http_server(port, host, registry=self.registry)
        return MetricsServer(httpd, thread)


def serve_configured(metrics: Metrics, settings: Settings) -> MetricsServer | None:
    """Serves `metrics` where ALGOPLANE_METRICS_ADDR says; None when it is empty. A taken
    port is an OSError naming the setting."""
    bind = settings.metrics_bind
    if bind is None:
        return None
    try:
        server = metrics.serve(*bind)
    except OSError as exc:
        raise OSError(
            f"cannot serve metrics on ALGOPLANE_METRICS_ADDR={settings.metrics_addr}"
            f": {exc.strerror or exc}"
        ) from exc
    log.info("metrics on http://%s:%d/metrics", bind[0], server.port)
    return server


class MetricsServer:
    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port = int(httpd.server_port)

    def close(self) -> None:
        """Blocks until the serving thread has returned (up to its poll interval, 0.5 s)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class _FeedCollector(Collector):
    def __init__(self, listener: ListenerView) -> None:
        self._listener = listener
        self._stale = 0

    def collect(self) -> Iterable[Metric]:
        listener = self._listener
        # Copying the stale set could meet a mutation on the loop's thread (the listener
        # replaces it today); then the previous count stands rather than the scrape failing.
        with contextlib.suppress(RuntimeError):
            self._stale = len(listener.stale)
        yield GaugeMetricFamily(
            "algoplane_feed_connected",
            "1 while the price feed's websocket is connected.",
            value=1.0 if listener.connected else 0.0,
        )
        yield CounterMetricFamily(
            "algoplane_feed_reconnects",
            "Times the feed connection dropped or could not be opened (then retried).",
            value=float(listener.stats.get("reconnects", 0)),
        )
        yield GaugeMetricFamily(
            "algoplane_feed_stale_symbols",
            "Symbols holding positions with no tick for ALGOPLANE_FEED_STALE_S.",
            value=float(self._stale),
        )
