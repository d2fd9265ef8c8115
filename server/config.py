"""Settings: the only reader of ALGOPLANE_* environment variables.

Parsed once at process entry, frozen, and passed down. A malformed value stops startup with
one line naming the variable (see `load_settings`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from server import event_loop
from server.event_loop import EventLoop

_ADDR = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9._-]+|\*):\d{1,5}$")

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALGOPLANE_", frozen=True, extra="ignore")

    grpc_addr: str = "127.0.0.1:50051"
    # Empty: start an embedded redis-server on a unix socket in data_dir.
    redis_url: str = ""
    # Empty: a SQLite file in data_dir.
    database_url: str = ""
    data_dir: Path = Path("./.algoplane")
    # Empty: generated once and kept in data_dir/jwt.secret.
    jwt_secret: str = Field(default="", repr=False)
    reflection: bool = True
    log_level: LogLevel = "INFO"
    log_format: Literal["text", "json"] = "text"
    # uvloop: less CPU per wakeup than the standard loop (server/event_loop.py).
    event_loop: EventLoop = "uvloop"
    # Prometheus /metrics over HTTP; empty: off. Each replica on a host needs its own port.
    metrics_addr: str = "127.0.0.1:9464"
    # How long in-flight calls may run after SIGTERM before they are cancelled.
    shutdown_grace_s: Annotated[float, Field(ge=0, le=300)] = 5.0
    # Upper bound on any single Redis command, so an RPC never hangs on a stalled Redis.
    redis_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # Upper bound on each PostgreSQL connect and statement (an unreachable DB fails fast).
    db_timeout_s: Annotated[float, Field(gt=0, le=600)] = 2.0
    # Approximate number of events each tenant's streams keep for resuming.
    stream_maxlen: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000
    # A stream subscriber that reads nothing for this long is cut off (RESOURCE_EXHAUSTED).
    stream_stall_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    health_interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0

    # Execution pipeline.
    # Events the engine holds at once (taken 64 at a time by each order worker).
    exec_concurrency: Annotated[int, Field(ge=1, le=1024)] = 256
    # Processes taking orders off the queue: the server and engine-only workers it starts
    # (each with an interpreter lock of its own; a burst is bound by one). Each worker
    # serves its metrics on ALGOPLANE_METRICS_ADDR's port + its index (1, 2, ...).
    engine_processes: Annotated[int, Field(ge=1, le=16)] = 1
    buy_grace_s: Annotated[float, Field(ge=0, le=3600)] = 5.0
    broker_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    broker_timeout_s: Annotated[float, Field(gt=0, le=120)] = 2.0
    # How long an event may sit with a silent worker before another worker takes it over.
    exec_claim_idle_s: Annotated[float, Field(gt=0, le=3600)] = 15.0
    lock_ttl_ms: Annotated[int, Field(ge=100, le=600_000)] = 10_000
    # How often every replica reloads the timers of all live strategies from the DB.
    timer_sync_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    # Orders not final and untouched this long are settled with the broker by the reconciler.
    reconcile_after_s: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    broker: Literal["paper"] = "paper"
    # Market data: empty URL runs without a feed (no stop-loss triggering from ticks).
    feed_url: str = ""
    feed_format: Literal["json", "binance"] = "json"
    feed_max_backoff_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    feed_stale_s: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    # Not offered by default: inflating every tick cost the listener a third of its time per
    # message (README, "Market listener and stop-loss").
    feed_compression: Literal["off", "deflate"] = "off"
    paper_latency_ms: Annotated[int, Field(ge=0, le=600_000)] = 0
    paper_timeout_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    paper_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.0

    @field_validator("grpc_addr", "metrics_addr")
    @classmethod
    def _addr(cls, value: str, info: ValidationInfo) -> str:
        metrics = info.field_name == "metrics_addr"
        if metrics and value == "":
            return value
        if not _ADDR.match(value):
            example = "127.0.0.1:9464, or empty for off" if metrics else "127.0.0.1:50051"
            raise ValueError(f"expected host:port, e.g. {example}")
        port = int(value.rsplit(":", 1)[1])
        if port > 65535:
            raise ValueError("port must be at most 65535")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://, rediss:// or unix:// URL")
        return value

    @field_validator("feed_url")
    @classmethod
    def _feed_url(cls, value: str) -> str:
        if value and not value.startswith(("ws://", "wss://")):
            raise ValueError("expected a ws:// or wss:// URL")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if value and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("expected sqlite+aiosqlite:// or postgresql+asyncpg:// URL")
        if value.startswith("sqlite") and make_url(value).database in (None, "", ":memory:"):
            # Every aiosqlite connection would get its own empty in-memory database.
            raise ValueError("SQLite needs a file: sqlite+aiosqlite:///path/to/algoplane.db")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        if value and len(value.encode()) < 32:
            raise ValueError("must be at least 32 bytes for HS256")
        return value

    @field_validator("event_loop")
    @classmethod
    def _event_loop(cls, value: EventLoop) -> EventLoop:
        if not event_loop.available(value):
            raise ValueError(f"{value} is not installed on this machine; 'asyncio' always is")
        return value

    @field_validator("engine_processes")
    @classmethod
    def _engine_processes(cls, value: int, info: ValidationInfo) -> int:
        metrics_addr = info.data.get("metrics_addr") or ""
        port = int(metrics_addr.rsplit(":", 1)[1]) if metrics_addr else 0
        if port and port + value - 1 > 65535:
            raise ValueError(
                f"the engine workers would serve metrics on ports {port + 1}-{port + value - 1}"
                " (ALGOPLANE_METRICS_ADDR's port + 1, 2, ...): past 65535"
            )
        return value

    @property
    def metrics_bind(self) -> tuple[str, int] | None:
        """(host, port) for the metrics server, None when it is off."""
        if not self.metrics_addr:
            return None
        host, port = self.metrics_addr.rsplit(":", 1)
        host = "0.0.0.0" if host == "*" else host.strip("[]")
        return host, int(port)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'algoplane.db').resolve()}"


def load_settings() -> Settings:
    """Reads the environment once; raises SettingsError naming the first bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "ALGOPLANE_" + str(err["loc"][0]).upper() if err["loc"] else "ALGOPLANE_*"
        raise SettingsError(f"invalid setting {name}: {err['msg']}") from None
