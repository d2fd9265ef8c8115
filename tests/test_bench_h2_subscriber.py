"""The fan-out benchmark's HTTP/2 reader sees exactly what a grpc client sees."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from protos.algoplane.v1 import strategy_pb2 as pb
from scripts.bench.h2_subscriber import GrpcStreamsProtocol
from server.store.codec import runtime_to_flat
from server.store.state import RedisState
from tests.conftest import make_settings, start_harness, stop_harness
from tests.support import RedisProcess, auth, spec

EVENTS = 300
PATH = "/algoplane.v1.StrategyService/StreamRuntime"


async def test_h2_reader_gets_every_event_in_order_on_many_calls(
    redis_proc: RedisProcess, tmp_path: Path, state: RedisState
) -> None:
    h = await start_harness(make_settings(redis_proc.url, tmp_path))
    try:
        runtime = await h.stub.StartStrategy(pb.StartStrategyRequest(spec=spec()), metadata=h.md())
        hot = await state.get_runtime(runtime.strategy_id)
        assert hot is not None
        got: dict[int, list[int]] = {}
        ended: list[int] = []
        all_in = asyncio.Event()

        def on_message(stream: int, message: bytes) -> None:
            got[stream].append(pb.RuntimeEvent.FromString(message).runtime.version)
            if all(len(versions) == EVENTS for versions in got.values()):
                all_in.set()

        reader = GrpcStreamsProtocol(on_message, ended.append)
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: reader, "127.0.0.1", h.port)
        addr = f"127.0.0.1:{h.port}"
        for _ in range(3):
            got[reader.call(addr, PATH, list(auth()))] = []
        # Another tenant's call on the same connection ends with its own status, not events.
        refused = reader.call(addr, PATH, [("authorization", "Bearer not-a-token")])
        await asyncio.sleep(0.5)  # the calls are open and have their positions
        for n in range(EVENTS):
            flat = runtime_to_flat(replace(hot, version=100 + n))
            await state.append_event("runtime", "tenant-a", flat)
        await asyncio.wait_for(all_in.wait(), 15)
        assert all(versions == list(range(100, 100 + EVENTS)) for versions in got.values())
        assert ended == [refused]
        reader.close()
        await asyncio.wait_for(reader.closed.wait(), 5)
        assert sorted(ended) == sorted([refused, *got])
    finally:
        await stop_harness(h)
