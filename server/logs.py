"""Logging: readable text by default, one JSON object per line with ALGOPLANE_LOG_FORMAT=json.

Every line carries what it concerns when that is known: `tenant`, `strategy_id`, `order_id`,
`event_id`. A call site passes them with `extra=` or binds them for everything below it
(`bind`, `context`: context variables, so they follow the task of one RPC or one event).
Tokens never reach a log line: nothing logs metadata, and as a second line of defence the
formatters blank anything that looks like a bearer token or a JWT.
"""

from __future__ import annotations

import asyncio
import io
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
# Every match of _SECRET_LIKE holds one of these in the lower-cased text (keep them in step):
# two substring tests cost a tenth of the pattern's scan, which every line paid.
_SECRET_MARKERS = ("bearer", "eyj")


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
    lowered = text.lower()
    if not any(marker in lowered for marker in _SECRET_MARKERS):
        return text  # nearly every line (each StartStrategy logs one)
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
    """`<time> <LEVEL> <logger>: <message> [tenant=.. strategy_id=..]`; an engine worker's
    lines say so after the level (`[engine-worker-1]`): they share the server's stderr."""

    def __init__(self, process: str = "") -> None:
        label = f"[{process}] " if process else ""
        super().__init__(f"%(asctime)s %(levelname)s {label}%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{n}={v}" for n in FIELDS if (v := getattr(record, n, "")))
        if ids:
            head, sep, rest = line.partition("\n")  # after the message, before a traceback
            line = f"{head} [{ids}]{sep}{rest}"
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One object per line: ts (RFC 3339, UTC), level, logger, message, the context fields
    that are set, exception (the traceback) when there is one, and `process` in an engine
    worker's lines."""

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._process:
            entry["process"] = self._process
        for name in FIELDS:
            if value := getattr(record, name, ""):
                entry[name] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, ensure_ascii=False))


class FlushBehindHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that flushes WARNING and above at once and INFO and below at most
    FLUSH_S later, together: a write to stderr per line was a tenth of a StartStrategy
    (each Start logs one line, and a write is a system call). A process killed outright
    loses at most FLUSH_S of INFO lines; logging.shutdown() at exit flushes the rest."""

    FLUSH_S = 0.05

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._flush_due = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()
        elif not self._flush_due:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # a thread without a loop: nothing to flush it later
                self.flush()
                return
            self._flush_due = True
            loop.call_later(self.FLUSH_S, self.flush)

    def flush(self) -> None:
        self._flush_due = False
        super().flush()


def _stderr_buffered() -> TextIO:
    """stderr's file, behind a buffer of our own (sys.stderr writes out every line); stderr
    itself when it has no file (a test capturing it)."""
    try:
        raw = io.FileIO(sys.stderr.fileno(), "w", closefd=False)
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return sys.stderr
    return io.TextIOWrapper(
        io.BufferedWriter(raw, 1 << 16), encoding="utf-8", errors="backslashreplace"
    )


def configure(
    level: str, fmt: LogFormat, stream: TextIO | None = None, *, process: str = ""
) -> logging.Handler:
    """Sends every logger's records to `stream` (stderr) in the chosen format, labelled with
    `process` when it is set; replaces the handler an earlier call installed. Returns the
    handler."""
    # Neither format shows them, and looking them up for every record (the multiprocessing
    # process name above all) was a visible share of each StartStrategy.
    logging.logProcesses = logging.logMultiprocessing = logging.logThreads = False
    handler = FlushBehindHandler(stream or _stderr_buffered())
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else TextFormatter(process))
    handler.set_name("algoplane")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "algoplane"]:
        root.removeHandler(old)
        old.flush()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
