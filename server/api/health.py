"""grpc.health.v1: SERVING only while Redis and the DB answer; NOT_SERVING otherwise and
from the start of shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from grpc_health.v1 import health_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "algoplane.v1.StrategyService"
# The feed's own entry: NOT_SERVING while disconnected or a symbol with positions is stale.
# The server as a whole stays SERVING (orders still execute on the last prices).
FEED_HEALTH_SERVICE = "algoplane.v1.MarketFeed"

Check = Callable[[], Awaitable[None]]


class HealthStatusSink(Protocol):
    """The part of grpc_health's aio HealthServicer this module drives."""

    async def set(
        self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus
    ) -> None: ...

    async def enter_graceful_shutdown(self) -> None: ...


class HealthReporter:
    def __init__(
        self,
        *,
        servicer: HealthStatusSink,
        checks: Mapping[str, Check],
        timeout_s: float,
    ) -> None:
        self._servicer = servicer
        self._checks = dict(checks)
        self._timeout = timeout_s
        self._failing: set[str] = set()
        self._closed = False

    async def check_once(self) -> bool:
        """Runs every check once and publishes the result; returns whether all passed."""
        failing = set()
        for name, check in self._checks.items():
            try:
                await asyncio.wait_for(check(), self._timeout)
            except Exception as exc:  # noqa: BLE001 - any failure means not serving
                failing.add(name)
                if name not in self._failing:
                    log.warning("health: %s is failing: %s", name, str(exc) or type(exc).__name__)
        if self._failing - failing:
            log.info("health: %s recovered", ", ".join(sorted(self._failing - failing)))
        self._failing = failing
        await self._publish(serving=not failing)
        return not failing

    async def run(self, interval_s: float) -> None:
        while not self._closed:
            await self.check_once()
            await asyncio.sleep(interval_s)

    async def set_detail(self, service: str, serving: bool) -> None:
        """The status of one part (the feed), beside the overall status."""
        if not self._closed:
            await self._servicer.set(service, _status(serving))

    async def shutdown(self) -> None:
        self._closed = True
        await self._servicer.enter_graceful_shutdown()

    async def _publish(self, *, serving: bool) -> None:
        if self._closed:
            return
        for service in ("", SERVICE_NAME):
            await self._servicer.set(service, _status(serving))


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus:
    return (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
