"""The baseline for control_rpcs: a bare grpc.aio server answering CreateStrategy and
StartStrategy of the real proto with a reply of the same shape, and nothing behind it (no
interceptors, auth, validation, DB, Redis or timers).

It runs as its own process, like the real server, so the client's event loop and the server's
never share one interpreter; what is left shared is the machine's cores, equally for both.

    .venv/bin/python -m scripts.bench.echo_server --port 50199
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from protos.algoplane.v1 import strategy_pb2 as pb

SERVICE = "algoplane.v1.StrategyService"
READY_LINE = "echo: listening"


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


async def create(request: pb.CreateStrategyRequest, _context: object) -> pb.Strategy:
    now = _now()
    return pb.Strategy(
        id=f"stg_{secrets.token_hex(16)}",
        spec=request.spec,
        status=pb.STRATEGY_STATUS_CREATED,
        created_at=now,
        updated_at=now,
    )


async def start(request: pb.StartStrategyRequest, _context: object) -> pb.Runtime:
    return pb.Runtime(
        strategy_id=request.strategy_id or f"stg_{secrets.token_hex(16)}",
        status=pb.STRATEGY_STATUS_SCHEDULED,
        position=pb.POSITION_NONE,
        symbol=request.spec.symbol or "BENCH",
        version=1,
        updated_at=_now(),
    )


def handler() -> grpc.GenericRpcHandler[Any, Any]:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "CreateStrategy": grpc.unary_unary_rpc_method_handler(
                create,
                request_deserializer=pb.CreateStrategyRequest.FromString,
                response_serializer=pb.Strategy.SerializeToString,
            ),
            "StartStrategy": grpc.unary_unary_rpc_method_handler(
                start,
                request_deserializer=pb.StartStrategyRequest.FromString,
                response_serializer=pb.Runtime.SerializeToString,
            ),
        },
    )


async def serve_until_signalled(
    handler: grpc.GenericRpcHandler[Any, Any], port: int, ready_line: str
) -> None:
    """A bare grpc.aio server with `handler` on 127.0.0.1:port; prints `ready_line` once it
    listens, and stops on SIGTERM or SIGINT. Shared by the benchmarks' baselines."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot bind 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(ready_line, flush=True)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve_until_signalled(handler(), parser.parse_args().port, READY_LINE))


if __name__ == "__main__":
    main()
