"""Logging: readable text by default, one JSON object per line with ALGOPLANE_LOG_FORMAT=json.

Every line carries what it concerns when that is known: `tenant`, `strategy_id`, `order_id`,
`event_id`. A call site passes them with `extra=` or binds them for everything below it
(`bind`, `context`: context variables, so they follow the task of one RPC or one event).
Tokens never reach a log line: nothing logs metadata, and as a second line of defence the
formatters blank anything that looks like a bearer token or a JWT.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]
FIELDS = ("tenant", "strategy_id", "order_id", "event_id")

_context: ContextVar[Mapping[str, str]] = ContextVar(
    "algoplane_log_context", default=MappingProxyType({})
)
# "Bearer <credential>" and anything shaped like a JWT (base64url JSON header and payload).
_SECRET_LIKE = re.compile(
    r"(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"
)


def bind(**fields: str) -> Token[Mapping[str, str]]:
    """Adds fields to the current task's log context (empty values are ignored)."""
    merged = {**_context.get(), **{k: v for k, v in fields.items() if v}}
    return _context.set(merged)


def reset(token: Token[Mapping[str, str]]) -> None:
    _context.reset(token)


@contextmanager
def context(**fields: str) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        reset(token)


def redact(text: str) -> str:
    return _SECRET_LIKE.sub("[redacted]", text)


class ContextFilter(logging.Filter):
    """Puts the bound context on each record; a field passed with `extra=` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _context.get()
        for name in FIELDS:
            if not getattr(record, name, ""):
                setattr(record, name, bound.get(name, ""))
        return True


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger>: <message> [tenant=.. strategy_id=..]`"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{n}={v}" for n in FIELDS if (v := getattr(record, n, "")))
        if ids:
            head, sep, rest = line.partition("\n")  # after the message, before a traceback
            line = f"{head} [{ids}]{sep}{rest}"
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One object per line: ts (RFC 3339, UTC), level, logger, message, the context fields
    that are set, and exception (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            if value := getattr(record, name, ""):
                entry[name] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, ensure_ascii=False))


def configure(level: str, fmt: LogFormat, stream: TextIO | None = None) -> logging.Handler:
    """Sends every logger's records to `stream` (stderr) in the chosen format; replaces the
    handler an earlier call installed. Returns the handler."""
    # Neither format shows them, and looking them up for every record (the multiprocessing
    # process name above all) was a visible share of each StartStrategy.
    logging.logProcesses = logging.logMultiprocessing = logging.logThreads = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.set_name("algoplane")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "algoplane"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
