"""The peer for benchmark 2: arq deferred jobs doing the same broker call as the engine.

Runs in its own venv (arq needs redis-py < 6, the server needs >= 6; scripts/bench/
scheduled_burst.py creates it). Two commands:

    python arq_peer.py enqueue <redis-url> <count> <due-epoch-ns>   # N jobs, _defer_until due
    python -m arq scripts.bench.arq_peer.WorkerSettings              # the worker (ARQ_REDIS_URL)

Each job calls PaperBroker.place_order with the client order id the engine would use, so
the broker's book records when the call was entered, exactly as for the server.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from redis.asyncio import Redis

from server.brokers.base import Side
from server.brokers.paper import PaperBroker

SYMBOL = "BURST"


async def startup(ctx: dict[str, Any]) -> None:
    redis = Redis.from_url(os.environ["ARQ_REDIS_URL"], decode_responses=True)
    ctx["broker_redis"] = redis
    ctx["broker"] = PaperBroker(redis=redis)


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["broker_redis"].aclose()


async def place(ctx: dict[str, Any], order_id: str) -> None:
    await ctx["broker"].place_order(order_id, SYMBOL, Side.BUY, 1)


class WorkerSettings:
    functions = [place]
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = RedisSettings.from_dsn(os.environ.get("ARQ_REDIS_URL", "redis://"))
    # The engine's concurrency (ARQ_MAX_JOBS, set by the benchmark from the server's
    # default), and a poll delay well under arq's 0.5 s default, so that the peer is measured
    # at its most responsive rather than at its defaults.
    max_jobs = int(os.environ.get("ARQ_MAX_JOBS", "256"))
    poll_delay = 0.05
    keep_result = 0


async def enqueue(url: str, count: int, due_ns: int) -> None:
    pool = await create_pool(RedisSettings.from_dsn(url))
    due = datetime.fromtimestamp(due_ns / 1e9, UTC)
    try:
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    pool.enqueue_job(
                        "place", f"peer{n}-1-buy", _job_id=f"peer{n}", _defer_until=due
                    )
                    for n in range(start, min(start + 500, count))
                )
            )
    finally:
        await pool.aclose()


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "enqueue":
        raise SystemExit(__doc__)
    asyncio.run(enqueue(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
