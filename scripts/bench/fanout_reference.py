"""The baseline for stream_fanout: a bare grpc.aio fan-out of the tenants' Redis streams.

It answers StreamRuntime of the real proto the plainest way: one XREAD reader per tenant,
each event serialized once (the server's own encoder), and one asyncio.Queue per subscriber
whose task writes the bytes with `context.write`. Nothing else: no interceptors, no token
verification (the tenant is read from the token's payload), no resume, no stall cut-off, no
slow-reader handling. The subscribers, the load and the machine are the benchmark's, so what
separates this figure from the server's is the server's own cost per delivery. It runs on the
standard library's loop (the plain grpc.aio the issue's figure is from) or, with
`--event-loop uvloop`, on the loop the server runs on by default: the like-for-like one.

    .venv/bin/python -m scripts.bench.fanout_reference --port 50199 --redis redis://...
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
from typing import Any, get_args

import grpc

from scripts.bench.echo_server import SERVICE, serve_until_signalled
from server import event_loop
from server.api.servicer import encode_runtime_event
from server.event_loop import EventLoop
from server.store.state import RedisState, connect, format_stream_id

READY_LINE = "fanout reference: listening"


def _tenant(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            payload = str(value).split(" ", 1)[1].split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            return str(claims["sub"])
    raise ValueError("no bearer token")


class Fanout:
    def __init__(self, state: RedisState) -> None:
        self._state = state
        self._queues: dict[str, set[asyncio.Queue[bytes]]] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}

    async def stream(self, _request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        tenant = _tenant(context.invocation_metadata())
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        subscribers = self._queues.setdefault(tenant, set())
        subscribers.add(queue)
        if tenant not in self._readers:
            self._readers[tenant] = asyncio.create_task(self._read(tenant))
        try:
            while True:
                await context.write(await queue.get())
        finally:
            subscribers.discard(queue)
            if not subscribers:
                # As the server's feeds do: a tenant nobody watches is not read, so this
                # process takes no CPU from whatever the benchmark measures meanwhile.
                reader = self._readers.pop(tenant, None)
                if reader is not None:
                    reader.cancel()

    async def _read(self, tenant: str) -> None:
        after = (await self._state.stream_bounds("runtime", tenant)).last_id
        while True:
            batch = await self._state.read_events(
                "runtime", tenant, after, block_ms=1000, count=256
            )
            for position, fields in batch:
                payload = encode_runtime_event(format_stream_id(position), fields)
                for queue in self._queues.get(tenant, ()):
                    queue.put_nowait(payload)
                after = position

    async def stop(self) -> None:
        for task in self._readers.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def serve(port: int, redis_url: str) -> None:
    redis = connect(redis_url, timeout_s=10)
    fanout = Fanout(RedisState(client=redis, stream_client=redis, stream_maxlen=100_000))
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"StreamRuntime": grpc.unary_stream_rpc_method_handler(fanout.stream)}
    )
    try:
        await serve_until_signalled(handler, port, READY_LINE)
    finally:
        await fanout.stop()
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--event-loop", choices=get_args(EventLoop), default="asyncio")
    args = parser.parse_args()
    event_loop.run(serve(args.port, args.redis), args.event_loop)


if __name__ == "__main__":
    main()
