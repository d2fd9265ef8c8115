"""Which failures the SDK retries, how long it waits, and what it tells the caller.

Unary reads are retried on UNAVAILABLE and DEADLINE_EXCEEDED; writes only where a repeat
cannot act twice (see `AlgoplaneClient`). Streams resume on transport-level failures and on
the server's stall cut-off, never on a status that repeating cannot change.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# RESOURCE_EXHAUSTED on a stream is the server cutting off a reader that stalled; the README
# says to resume with the last event_id, which is exactly what a reconnect does.
_RESUMABLE = RETRYABLE | {grpc.StatusCode.RESOURCE_EXHAUSTED}

# grpc reports a connection torn down mid-stream as INTERNAL with one of these in the details;
# the server's own INTERNAL ("internal error") is a bug that a resume would only repeat.
_TRANSPORT_HINTS = ("RST_STREAM", "GOAWAY", "Stream removed", "Socket closed", "Connection reset")


def is_resumable(code: grpc.StatusCode, details: str) -> bool:
    """Whether a stream that ended with this status should reconnect and resume."""
    if code in _RESUMABLE:
        return True
    return code is grpc.StatusCode.INTERNAL and any(hint in details for hint in _TRANSPORT_HINTS)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter. `attempts` bounds unary calls (1 = no retry); streams
    reconnect until cancelled, waiting at most `max_backoff_s` between attempts."""

    attempts: int = 4
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 3.0
    multiplier: float = 2.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """The wait before retry number `attempt` (1-based): half fixed, half random, so a
        fleet of clients that failed together does not come back together."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return ceiling / 2 + rng() * ceiling / 2


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """Passed to `on_retry` before each wait: which call failed how, and the request_id every
    attempt of a Create/Start carries (empty for reads)."""

    method: str
    attempt: int
    code: grpc.StatusCode
    details: str
    delay_s: float
    request_id: str = ""


class Connection(Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StreamState:
    """What a stream helper reports through `on_state` as its connection changes.

    `attempt` counts reconnects since the stream last worked; `error` is the failure that
    caused the current (re)connect; `resumed_after` is the event_id a connection resumed
    after. `gap_possible` is True when a connection came back without any event_id to resume
    from (nothing had been received yet): events of the outage were not replayed, so a caller
    that keeps state should re-read it.
    """

    connection: Connection
    attempt: int = 0
    error: str = ""
    resumed_after: str = ""
    gap_possible: bool = False


RetryHook = Callable[[RetryEvent], None]
StateHook = Callable[[StreamState], None]
