"""The stop-loss benchmark's feed: ticks it frames itself arrive as the messages `send`
makes, one per tick, whether or not the client negotiated permessage-deflate."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from websockets.asyncio.client import connect

from scripts.bench.harness import TickFeed


@pytest.mark.parametrize("compression", ["deflate", None])
async def test_ticks_framed_together_arrive_one_message_each(compression: str | None) -> None:
    long_symbol = "S" * 200  # a frame with the 16-bit length form
    huge_symbol = "H" * 70_000  # and with the 64-bit one
    async with (
        TickFeed() as feed,
        connect(feed.url, compression=compression, max_size=2**20) as ws,
    ):
        await feed.wait_connected()
        await feed.send(long_symbol, "1")
        sent = await feed.send_each(
            [
                ("SLB", Decimal("100.0001")),
                (long_symbol, "99.5"),
                (huge_symbol, "2"),
                ("SLB", Decimal("7")),
            ]
        )
        assert sent.receivers == 1
        got = [json.loads(await ws.recv()) for _ in range(5)]
    stamp = sent.wall_ns // 1_000_000
    assert got[0]["symbol"] == long_symbol
    assert got[1:] == [
        {"symbol": "SLB", "price": "100.0001", "ts": stamp},
        {"symbol": long_symbol, "price": "99.5", "ts": stamp},
        {"symbol": huge_symbol, "price": "2", "ts": stamp},
        {"symbol": "SLB", "price": "7", "ts": stamp},
    ]
