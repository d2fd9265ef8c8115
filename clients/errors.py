"""SDK errors. gRPC failures reach the caller as `grpc.aio.AioRpcError` unchanged; these are
the cases the SDK itself decides.

    ClientError
    └── StreamGapError   a stream cannot resume without losing events (OUT_OF_RANGE)
"""

from __future__ import annotations


class ClientError(Exception):
    """Root of the errors raised by the SDK itself."""


class StreamGapError(ClientError):
    """The server no longer keeps the events after `after_event_id` (or never had it): the
    stream cannot continue without a gap, so the caller must re-read state and start afresh."""

    def __init__(self, after_event_id: str, details: str) -> None:
        super().__init__(
            f"cannot resume after event {after_event_id!r}: {details} "
            "(re-read state, then stream from now)"
        )
        self.after_event_id = after_event_id
        self.details = details
