"""Python SDK and CLI over the generated stubs (the SDK never imports server)."""

from clients.errors import ClientError, StreamGapError
from clients.retry import Connection, RetryEvent, RetryPolicy, StreamState
from clients.sdk import AlgoplaneClient

__all__ = [
    "AlgoplaneClient",
    "ClientError",
    "Connection",
    "RetryEvent",
    "RetryPolicy",
    "StreamGapError",
    "StreamState",
]
