"""The DB away while the server runs: PostgreSQL behind the fault proxy, refused (connections
reset, new ones closed) or black-holed (nothing answers). Writes answer UNAVAILABLE within
their deadline, health is NOT_SERVING, a BUY that comes due meanwhile reaches the broker only
once its intent is committed (after the heal, exactly once), and all resumes by itself.

Skipped when PostgreSQL does not answer on 127.0.0.1:5432."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from protos.algoplane.v1 import strategy_pb2 as pb
from server.domain import Intent, client_order_id
from tests.faults.common import (
    NOT_SERVING,
    SERVING,
    final_check,
    health_becomes,
    is_bought,
    paper_log,
    sleep_until,
    start_at,
    timed,
)
from tests.faults.proxy import FaultProxy
from tests.support import RedisProcess, rpc_code, spec_at
from tests.test_db import PG_HOST, PG_PORT, fresh_postgres_database
from tests.test_engine import eventually, pipeline

pytestmark = pytest.mark.postgres


def make_db_away(proxy: FaultProxy, how: str) -> None:
    if how == "refused":
        proxy.refuse(True)
        proxy.reset()
    else:
        proxy.blackhole()


async def unavailable_within_deadline(call: object) -> None:
    error, took = await timed(call)  # type: ignore[arg-type]
    assert error is not None, "the call succeeded with the DB away"
    assert rpc_code(error) == grpc.StatusCode.UNAVAILABLE, error
    assert took < 4.5, f"answered after {took:.1f}s"


@pytest.mark.parametrize("how", ["refused", "black-holed"])
async def test_db_away_no_broker_call_without_a_committed_intent(
    redis_proc: RedisProcess, tmp_path: Path, how: str
) -> None:
    async with fresh_postgres_database() as direct_url:
        proxy = FaultProxy(PG_HOST, PG_PORT)
        port = await proxy.start()
        proxied_url = direct_url.replace(f"{PG_HOST}:{PG_PORT}", f"127.0.0.1:{port}")
        try:
            # A grace far beyond the outage: the BUY due while the DB is away is still wanted
            # after the heal, so the expected outcome is exactly one order.
            async with pipeline(
                redis_proc,
                tmp_path,
                database_url=proxied_url,
                buy_grace_s=60,
                exec_claim_idle_s=1.5,
                db_timeout_s=1.5,  # a black-holed call fails in 2 x 1.5 s, within its 5 s
            ) as h:
                await h.redis.set("price:{SBIN}", "100")
                t0 = time.time()
                before = await start_at(h, t0 + 0.6, t0 + 60)
                due_in_gap = await start_at(h, t0 + 2.5, t0 + 60)
                await eventually(lambda: is_bought(h, before), timeout_s=5)

                make_db_away(proxy, how)
                await unavailable_within_deadline(
                    h.stub.CreateStrategy(
                        pb.CreateStrategyRequest(spec=spec_at(t0 + 30, t0 + 60)),
                        metadata=h.md(),
                        timeout=5,
                    )
                )
                await unavailable_within_deadline(
                    h.stub.StartStrategy(
                        pb.StartStrategyRequest(spec=spec_at(t0 + 30, t0 + 60)),
                        metadata=h.md(),
                        timeout=5,
                    )
                )
                await health_becomes(h.channel, NOT_SERVING, timeout_s=5)
                await sleep_until(t0 + 5.0)  # the BUY came due
                assert await paper_log(redis_proc.url) == [client_order_id(before, 1, Intent.BUY)]

                proxy.heal()
                await health_becomes(h.channel, SERVING, timeout_s=10)
                await eventually(lambda: is_bought(h, due_in_gap), timeout_s=10)
                t1 = time.time()
                after = await start_at(h, t1 + 0.5, t1 + 60)  # writes and trading resume
                await eventually(lambda: is_bought(h, after), timeout_s=8)
                await asyncio.sleep(0.3)
                assert sorted(await paper_log(redis_proc.url)) == sorted(
                    client_order_id(sid, 1, Intent.BUY) for sid in (before, due_in_gap, after)
                )
                await final_check(redis_proc.url, direct_url)
        finally:
            await proxy.stop()
