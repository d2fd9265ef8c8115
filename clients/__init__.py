"""Python SDK and CLI over the generated stubs (never imports server)."""

from clients.sdk import AlgoplaneClient

__all__ = ["AlgoplaneClient"]
