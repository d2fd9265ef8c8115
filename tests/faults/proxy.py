"""FaultProxy: a small asyncio TCP proxy that puts network faults between the server and
Redis, the DB or the feed (no toxiproxy can be installed here).

    proxy = FaultProxy("127.0.0.1", redis_port)
    port = await proxy.start()          # point the server at 127.0.0.1:port
    proxy.latency(0.2)                  # every chunk, both directions, 200 ms late
    proxy.blackhole()                   # read and drop everything: peers hang until timeouts
    proxy.reset()                       # RST every current connection
    proxy.refuse(True)                  # new connections are closed (RST) at once
    proxy.heal()                        # back to normal (refuse off, no latency, no blackhole)
    await proxy.stop()

Every control applies at once to new AND existing connections. While black-holed, bytes from
either side are read and dropped, and a close from either side is held back too (as on a cut
network link); after `heal` new bytes flow again, so a peer that gave up on a connection and
opened another one just works, while one that kept waiting for the lost bytes keeps waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

_CHUNK = 64 * 1024
_LINGER_ZERO = struct.pack("ii", 1, 0)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Closes the connection with an RST rather than a FIN (SO_LINGER 0, then abort)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One proxied connection: the accepted client side and our upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        _rst(self.client)
        _rst(self.upstream)
        me = asyncio.current_task()
        for task in self.tasks:
            if task is not me:
                task.cancel()


class FaultProxy:
    """Forwards 127.0.0.1:<port> to target_host:target_port, with injectable faults."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.accepted = 0  # connections accepted so far (refused ones included)
        self._server: asyncio.Server | None = None
        self._port = 0
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._latency = 0.0
        self._refusing = False
        self._flowing = asyncio.Event()  # cleared while black-holed
        self._flowing.set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, port: int = 0) -> int:
        """Listens on host:port (0: a free port); returns the port. May be called again after
        `stop` to listen on the same port."""
        self._server = await asyncio.start_server(self._accept, self.host, port or self._port)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def stop(self) -> None:
        """Stops listening and resets every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.reset()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        for task in handlers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @property
    def port(self) -> int:
        return self._port

    @property
    def connections(self) -> int:
        """Connections currently proxied."""
        return len(self._links)

    # -- fault controls (immediate, for new and existing connections) ------------------------

    def latency(self, seconds: float) -> None:
        """Every chunk, in both directions, is delivered `seconds` after it arrived."""
        if seconds < 0:
            raise ValueError("latency must not be negative")
        self._latency = seconds

    def blackhole(self) -> None:
        """Accept and read, forward nothing (bytes are dropped, closes are held back)."""
        self._flowing.clear()

    def reset(self) -> None:
        """Aborts every current connection with an RST on both sides."""
        for link in list(self._links):
            link.abort()
        self._links.clear()

    def refuse(self, on: bool = True) -> None:
        """While on, a new connection is closed with an RST as soon as it is accepted."""
        self._refusing = on

    def heal(self) -> None:
        """No latency, no blackhole, no refusing; connections that survived go on."""
        self._latency = 0.0
        self._refusing = False
        self._flowing.set()

    # -- plumbing ----------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._refusing:
            _rst(writer)
            return
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # stop(): the links are reset already; asyncio would log a cancelled handler
        finally:
            self._handlers.discard(me)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _rst(writer)  # the target is down: the client sees it at once
            return
        if self._refusing:  # refuse() was called while we dialled
            _rst(writer)
            _rst(up_writer)
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, link)),
            asyncio.create_task(self._pump(up_reader, writer, link)),
        ]
        try:
            await asyncio.wait(link.tasks)
        finally:
            self._links.discard(link)
            for task in link.tasks:
                task.cancel()
            for side in (writer, up_writer):
                side.transport.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        """One direction. Chunks are stamped on arrival and delivered at arrival + latency
        by a second task, so latency delays each chunk without serialising them."""
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(pending, writer, link))
        try:
            while data := await reader.read(_CHUNK):
                if self._flowing.is_set():  # black-holed bytes are dropped
                    pending.put_nowait((loop.time() + self._latency, data))
            await self._flowing.wait()  # EOF: held back while black-holed, then passed on
            pending.put_nowait((loop.time() + self._latency, b""))
            await deliver
        except (ConnectionError, OSError):
            link.abort()  # a reset on one side resets the other
        finally:
            deliver.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await deliver

    async def _deliver(
        self,
        pending: asyncio.Queue[tuple[float, bytes]],
        writer: asyncio.StreamWriter,
        link: _Link,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await pending.get()
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if writer.transport.is_closing():
                    return
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            link.abort()
