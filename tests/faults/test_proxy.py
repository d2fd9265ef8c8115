"""The fault proxy against a trivial asyncio echo server: each control, on new and existing
connections."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.faults.proxy import FaultProxy
from tests.test_engine import eventually

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Echo:
    server: asyncio.Server
    port: int
    resets: int = 0  # connections the echo server saw reset by the proxy
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


@contextlib.asynccontextmanager
async def echo_and_proxy() -> AsyncIterator[tuple[Echo, FaultProxy]]:
    echo: Echo | None = None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert echo is not None
        echo.writers.append(writer)
        try:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except ConnectionResetError:
            echo.resets += 1
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    echo = Echo(server, int(server.sockets[0].getsockname()[1]))
    proxy = FaultProxy("127.0.0.1", echo.port)
    await proxy.start()
    try:
        yield echo, proxy
    finally:
        await proxy.stop()
        for writer in echo.writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


async def dial(proxy: FaultProxy) -> Conn:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def roundtrip(conn: Conn, payload: bytes = b"ping", timeout_s: float = 1.0) -> bytes:
    reader, writer = conn
    writer.write(payload)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(payload)), timeout_s)


def close(*conns: Conn) -> None:
    for _, writer in conns:
        writer.transport.abort()


async def test_forwards_both_ways_on_many_connections() -> None:
    async with echo_and_proxy() as (_, proxy):
        conns = [await dial(proxy) for _ in range(3)]
        for n, conn in enumerate(conns):
            assert await roundtrip(conn, f"hello {n}".encode()) == f"hello {n}".encode()
        big = bytes(range(256)) * 1024  # 256 KiB: several chunks each way
        assert await roundtrip(conns[0], big) == big
        assert proxy.connections == 3
        close(*conns)


async def test_latency_delays_each_direction_and_heal_removes_it() -> None:
    async with echo_and_proxy() as (_, proxy):
        existing = await dial(proxy)
        assert await roundtrip(existing) == b"ping"
        proxy.latency(0.15)
        fresh = await dial(proxy)
        for conn in (existing, fresh):
            began = time.monotonic()
            assert await roundtrip(conn) == b"ping"
            assert 0.3 <= time.monotonic() - began < 0.9  # 0.15 s there and 0.15 s back
        proxy.heal()
        began = time.monotonic()
        assert await roundtrip(existing) == b"ping"
        assert time.monotonic() - began < 0.1
        close(existing, fresh)


async def test_blackhole_swallows_traffic_until_heal() -> None:
    async with echo_and_proxy() as (_, proxy):
        existing = await dial(proxy)
        assert await roundtrip(existing) == b"ping"
        proxy.blackhole()
        fresh = await dial(proxy)  # accepted, but nothing gets through
        for conn in (existing, fresh):
            with pytest.raises(TimeoutError):
                await roundtrip(conn, b"lost", timeout_s=0.3)
        proxy.heal()
        # The dropped bytes stay lost; new bytes flow on the same connections.
        assert await roundtrip(existing, b"again") == b"again"
        assert await roundtrip(fresh, b"fresh") == b"fresh"
        close(existing, fresh)


async def test_blackhole_holds_back_a_close() -> None:
    async with echo_and_proxy() as (echo, proxy):
        reader, writer = await dial(proxy)
        assert await roundtrip((reader, writer)) == b"ping"
        proxy.blackhole()
        writer.write_eof()  # our FIN does not reach the echo server: it keeps its side open
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.3)
        proxy.heal()
        assert await asyncio.wait_for(reader.read(1), 1.0) == b""  # now it closes
        assert echo.resets == 0
        close((reader, writer))


async def test_reset_aborts_existing_connections_with_rst() -> None:
    async with echo_and_proxy() as (echo, proxy):
        conns = [await dial(proxy) for _ in range(2)]
        for conn in conns:
            assert await roundtrip(conn) == b"ping"
        proxy.reset()
        for reader, _ in conns:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(1), 1.0)

        await eventually(lambda: _true(echo.resets == 2), 1.0)  # the target side was reset too
        assert proxy.connections == 0
        fresh = await dial(proxy)  # reset is a one-off: new connections work
        assert await roundtrip(fresh) == b"ping"
        close(*conns, fresh)


async def test_refuse_closes_new_connections_only() -> None:
    async with echo_and_proxy() as (_, proxy):
        existing = await dial(proxy)
        assert await roundtrip(existing) == b"ping"
        proxy.refuse(True)
        began = time.monotonic()
        reader, writer = await dial(proxy)
        with contextlib.suppress(ConnectionResetError):  # an RST, or at least an EOF
            assert await asyncio.wait_for(reader.read(1), 1.0) == b""
        assert time.monotonic() - began < 0.5
        assert await roundtrip(existing) == b"ping"  # established ones are untouched
        proxy.refuse(False)
        fresh = await dial(proxy)
        assert await roundtrip(fresh) == b"ping"
        close(existing, (reader, writer), fresh)


async def test_target_down_closes_the_client_and_stop_restart_keeps_the_port() -> None:
    async with echo_and_proxy() as (echo, proxy):
        conn = await dial(proxy)
        assert await roundtrip(conn) == b"ping"
        port = proxy.port
        await proxy.stop()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(conn[0].read(1), 1.0)
        with pytest.raises(OSError):
            await dial(proxy)
        assert await proxy.start() == port
        again = await dial(proxy)
        assert await roundtrip(again) == b"ping"

        echo.server.close()  # the target goes away: a new client is closed at once
        await echo.server.wait_closed()
        reader, writer = await dial(proxy)
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(1), 1.0) == b""
        close(conn, again, (reader, writer))


async def _true(value: bool) -> bool:
    return value
