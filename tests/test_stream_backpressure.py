"""A subscriber that stops reading is cut off; the others keep getting every event."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from protos.algoplane.v1 import strategy_pb2 as pb
from server.store.codec import runtime_to_flat
from server.store.state import RedisState, connect
from tests.conftest import make_settings, start_harness, stop_harness
from tests.support import RedisProcess, aio_stub, auth, spec

EVENTS = 4000


async def test_stalled_subscriber_is_cut_off_and_others_keep_reading(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    h = await start_harness(make_settings(redis_proc.url, tmp_path, stream_stall_s=1.0))
    state = RedisState(
        client=connect(redis_proc.url, timeout_s=5),
        stream_client=connect(redis_proc.url, timeout_s=5),
        stream_maxlen=1_000_000,
    )
    # No BDP probing: the slow client's flow-control window stays small and fills up.
    slow_channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{h.port}", options=[("grpc.http2.bdp_probe", 0)]
    )
    try:
        runtime = await h.stub.StartStrategy(pb.StartStrategyRequest(spec=spec()), metadata=h.md())
        hot = await state.get_runtime(runtime.strategy_id)
        assert hot is not None
        slow = aio_stub(slow_channel).StreamRuntime(pb.StreamRuntimeRequest(), metadata=auth())
        fast = h.stub.StreamRuntime(pb.StreamRuntimeRequest(), metadata=h.md())
        received: list[pb.RuntimeEvent] = []

        async def read_fast() -> None:
            async for event in fast:
                received.append(event)
                if len(received) == EVENTS:
                    return

        reader = asyncio.create_task(read_fast())
        await asyncio.sleep(0.5)  # both streams are open
        padding = "x" * 400  # makes each event big enough to fill windows quickly
        for n in range(EVENTS):
            await state.append_event(
                "runtime",
                "tenant-a",
                runtime_to_flat(replace(hot, version=100 + n, failure_reason=padding)),
            )
        await asyncio.wait_for(reader, 30)
        assert [e.runtime.version for e in received] == list(range(100, 100 + EVENTS))

        await asyncio.sleep(2.5)  # longer than the stall limit
        slow_got = 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _event in slow:
                slow_got += 1
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "after_event_id" in (err.value.details() or "")
        assert 0 < slow_got < EVENTS
        fast.cancel()
    finally:
        await slow_channel.close(None)
        await state.close()
        await stop_harness(h)
