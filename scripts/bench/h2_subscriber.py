"""A minimal gRPC server-streaming reader over plain HTTP/2, for the fan-out benchmark.

On a 2-core machine, grpc.aio clients reading 20,000 messages a second spend more CPU than the
server that sends them (about 65 µs a message against the server's 45 to 80), so a benchmark
driven by them measures its own subscribers. This reader speaks just enough HTTP/2 to open
many StreamRuntime calls on one connection and read their messages: the client preface,
SETTINGS (and their ACKs), PING ACKs, one HEADERS frame per call (HPACK literals, no
Huffman), the request's DATA frame, and then the DATA frames of the replies, split into
gRPC length-prefixed messages. Every message is still decoded as a RuntimeEvent. The
reply's own HEADERS are not decoded; a trailer (HEADERS with END_STREAM) or RST_STREAM ends
a call. Flow-control windows are opened wide at the start and topped up as data arrives.

What it costs per message is a few microseconds, so what the benchmark sees is the server.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Sequence
from typing import cast

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
_MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65_535
_TOP_UP = 2**30  # consumed bytes after which a window is opened again

_FRAME_HEADER = struct.Struct(">I B I")  # length (24 bits) and type, flags, stream id
_U32 = struct.Struct(">I")


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _FRAME_HEADER.pack((len(payload) << 8) | kind, flags, stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literals(headers: Sequence[tuple[str, str]]) -> bytes:
    """Each header as 'literal without indexing, new name', plain strings (RFC 7541 6.2.2)."""
    out = bytearray()
    for name, value in headers:
        out.append(0)
        for text in (name.encode(), value.encode()):
            out += _hpack_int(len(text), 7)
            out += text
    return bytes(out)


OnMessage = Callable[[int, bytes], None]
OnEnd = Callable[[int], None]


class GrpcStreamsProtocol(asyncio.Protocol):
    """Server-streaming calls on one HTTP/2 connection; `on_message(stream, message)` for
    every gRPC message of a reply, `on_end(stream)` when a call ends."""

    def __init__(self, on_message: OnMessage, on_end: OnEnd) -> None:
        self._on_message = on_message
        self._on_end = on_end
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._pending: dict[int, bytearray] = {}
        self._consumed: dict[int, int] = {}
        self._connection_consumed = 0
        self._next_stream = 1
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport: uvloop's has Transport's methods without subclassing it.
        self._transport = transport = cast(asyncio.Transport, transport)
        settings = struct.pack(">HIHI", 0x2, 0, 0x4, _MAX_WINDOW)  # no push; wide windows
        transport.write(
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, _U32.pack(_MAX_WINDOW - _DEFAULT_WINDOW))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        for stream in list(self._pending):
            self._end(stream)
        self.closed.set()

    def call(self, authority: str, path: str, metadata: Sequence[tuple[str, str]]) -> int:
        """Opens one call with an empty request message; returns its stream id."""
        assert self._transport is not None
        stream = self._next_stream
        self._next_stream += 2
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        self._pending[stream] = bytearray()
        self._consumed[stream] = 0
        self._transport.write(
            frame(HEADERS, END_HEADERS, stream, hpack_literals(headers))
            + frame(DATA, END_STREAM, stream, b"\x00" + _U32.pack(0))
        )
        return stream

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= 9:
            word, flags, stream = _FRAME_HEADER.unpack_from(buffer, offset)
            length, kind = word >> 8, word & 0xFF
            end = offset + 9 + length
            if len(buffer) < end:
                break
            payload = bytes(buffer[offset + 9 : end])
            offset = end
            if kind == DATA:
                self._data(stream & _MAX_WINDOW, flags, payload)
            else:
                self._control(kind, flags, stream & _MAX_WINDOW, payload)
        del buffer[:offset]

    def _control(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if (kind == HEADERS and flags & END_STREAM) or kind == RST_STREAM:
            self._end(stream)
        elif kind == SETTINGS and not flags & ACK:
            self._write(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self._write(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            self.close()

    def _data(self, stream: int, flags: int, payload: bytes) -> None:
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        pending = self._pending.get(stream)
        if pending is None:
            return
        pending += payload
        used = 0
        while len(pending) - used >= 5:
            size = _U32.unpack_from(pending, used + 1)[0]
            if len(pending) - used - 5 < size:
                break
            self._on_message(stream, bytes(pending[used + 5 : used + 5 + size]))
            used += 5 + size
        del pending[:used]
        self._top_up(stream, len(payload))
        if flags & END_STREAM:
            self._end(stream)

    def _top_up(self, stream: int, size: int) -> None:
        # The connection's window is shared by every call; each call also has its own.
        self._connection_consumed += size
        if self._connection_consumed >= _TOP_UP:
            self._write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._connection_consumed)))
            self._connection_consumed = 0
        consumed = self._consumed.get(stream, 0) + size
        if consumed >= _TOP_UP:
            self._write(frame(WINDOW_UPDATE, 0, stream, _U32.pack(consumed)))
            consumed = 0
        self._consumed[stream] = consumed

    def _end(self, stream: int) -> None:
        if self._pending.pop(stream, None) is not None:
            self._consumed.pop(stream, None)
            self._on_end(stream)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
