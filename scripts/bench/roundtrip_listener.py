"""The yardstick beside benchmark 1's held tick rate: a listener that makes one Redis round
trip per tick (issue 7 puts that near 18,000 ticks/s on its machine).

It reads the feed as the server's listener does (websockets without compression, on the
server's event loop) and, for each tick, awaits a SET of the symbol's `price:{SYMBOL}` before
it reads the next: the seed's listener without its stop-loss scan. The benchmark drives it
with the server's ladder and check (the last price in Redis within 100 ms), so the two held
rates compare on one machine in one run.

    .venv/bin/python -m scripts.bench.roundtrip_listener --feed ws://... --redis redis://...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from typing import get_args

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from server import event_loop
from server.event_loop import EventLoop
from server.store import keys
from server.store.state import connect

READY_LINE = "roundtrip listener: connected"


async def listen(feed_url: str, redis_url: str) -> None:
    redis = connect(redis_url, timeout_s=10)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with ws_connect(feed_url, compression=None, max_size=2**20) as ws:
            print(READY_LINE, flush=True)

            async def read() -> None:
                async for message in ws:
                    tick = json.loads(message)
                    await redis.set(keys.price(tick["symbol"]), tick["price"])

            reader = asyncio.create_task(read())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([reader, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stop.is_set():
                # Stopped where it fell behind the feed (the step it did not hold): a closing
                # handshake would wait behind the ticks not read yet, up to its timeout.
                ws.transport.abort()
            reader.cancel()
            # Ended by the cancel, or by the abort where a Redis call swallowed the cancel
            # (server.cancellation): either way done before the Redis client closes.
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await reader
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--feed", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--event-loop", choices=get_args(EventLoop), default="uvloop")
    args = parser.parse_args()
    event_loop.run(listen(args.feed, args.redis), args.event_loop)


if __name__ == "__main__":
    main()
