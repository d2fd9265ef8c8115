"""Redis faults against a running server: kill -9 with AOF, Redis wiped, SIGSTOP past the lock
TTL, and the network to Redis black-holed or reset (through the fault proxy). Every scenario
ends with the invariant check over the broker's book, the DB and Redis."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from server.domain import Intent, client_order_id
from tests.conftest import serving
from tests.faults.common import (
    NOT_SERVING,
    SERVING,
    all_bought,
    final_check,
    health_becomes,
    is_bought,
    order_status,
    paper_log,
    reaches,
    sleep_until,
    start_at,
    timed,
)
from tests.faults.proxy import FaultProxy
from tests.support import RedisProcess, redis_process, rpc_code, spec_at
from tests.test_engine import eventually, pipeline

# A slow broker, so an order can be caught in flight; events of a failed attempt come back
# quickly (claim idle), and a redelivered BUY is still within its grace.
SLOW_BROKER: dict[str, Any] = {
    "paper_latency_ms": 1500,
    "broker_timeout_s": 5,
    "exec_claim_idle_s": 1.5,
    "buy_grace_s": 30,
}
SUBMITTED = pb.ORDER_STATUS_SUBMITTED
COMPLETED = pb.STRATEGY_STATUS_COMPLETED


def ids(*pairs: tuple[str, Intent]) -> list[str]:
    return sorted(client_order_id(sid, 1, intent) for sid, intent in pairs)


async def test_kill9_with_aof_then_restart_goes_on_with_nothing_lost_or_doubled(
    tmp_path: Path,
) -> None:
    with redis_process(tmp_path / "redis", appendonly=True) as redis_proc:
        restarted: RedisProcess | None = None
        try:
            async with pipeline(redis_proc, tmp_path / "data", **SLOW_BROKER) as h:
                await h.redis.set("price:{SBIN}", "100")
                t0 = time.time()
                held = await start_at(h, t0 + 0.8, t0 + 6.0)  # bought before; SELL after
                gap_sell = await start_at(h, t0 + 0.8, t0 + 3.0)  # SELL due while Redis is down
                in_flight = await start_at(h, t0 + 2.4, t0 + 8.0)  # at the broker at the kill
                later = await start_at(h, t0 + 4.5, t0 + 6.5)  # BUY and SELL after the restart

                async def ready_to_kill() -> bool:
                    return (
                        await is_bought(h, held)
                        and await is_bought(h, gap_sell)
                        and await order_status(h, in_flight, Intent.BUY) == SUBMITTED
                    )

                await eventually(ready_to_kill, timeout_s=6)
                redis_proc.kill()
                await asyncio.sleep(1.0)
                restarted = RedisProcess(
                    port=redis_proc.port, directory=redis_proc.directory, appendonly=True
                ).start()

                for sid in (held, gap_sell, in_flight, later):
                    await reaches(h, sid, COMPLETED, timeout_s=15)
                assert sorted(await paper_log(redis_proc.url)) == ids(
                    *[(s, Intent.BUY) for s in (held, gap_sell, in_flight, later)],
                    *[(s, Intent.SELL) for s in (held, gap_sell, in_flight, later)],
                )
                await final_check(redis_proc.url, h.settings.effective_database_url)
        finally:
            if restarted is not None:
                restarted.stop()


async def wipe_keeping_the_broker(redis_url: str, prices: dict[str, str]) -> None:
    """FLUSHALL, as a new empty instance would be, in one transaction with putting back the
    paper broker's book (a real broker lives outside our Redis) and the last prices (the
    feed writes them again at once)."""
    raw = Redis.from_url(redis_url)
    try:
        book = {key: await raw.dump(key) for key in ("{paper}:orders", "{paper}:log")}
        async with raw.pipeline(transaction=True) as pipe:
            pipe.flushall()
            for key, dumped in book.items():
                if dumped is not None:
                    pipe.restore(key, 0, dumped)
            for symbol, price in prices.items():
                pipe.set(f"price:{{{symbol}}}", price)
            await pipe.execute()
    finally:
        await raw.aclose()


async def test_redis_wiped_is_rebuilt_from_the_db_and_trading_goes_on(tmp_path: Path) -> None:
    with redis_process(tmp_path / "redis") as redis_proc:
        # One engine worker, so an event can be caught waiting in the queue at the wipe.
        async with pipeline(
            redis_proc,
            tmp_path / "data",
            exec_concurrency=1,
            timer_sync_s=1.5,
            **{**SLOW_BROKER, "paper_latency_ms": 1000},
        ) as h:
            await h.redis.set("price:{SBIN}", "100")
            await h.redis.set("price:{SLX}", "100")
            t0 = time.time()
            held = await start_at(h, t0 + 0.8, t0 + 6.0)  # bought before; SELL after
            breach = await start_at(h, t0 + 0.8, t0 + 60, symbol="SLX")  # bought at 100
            in_flight = await start_at(h, t0 + 3.0, t0 + 8.0)  # at the broker at the wipe
            queued = await start_at(h, t0 + 3.2, t0 + 8.5)  # in the queue at the wipe
            later = await start_at(h, t0 + 5.0, t0 + 7.0)  # BUY and SELL after the wipe

            async def ready_to_wipe() -> bool:
                return (
                    time.time() > t0 + 3.4
                    and await is_bought(h, held)
                    and await is_bought(h, breach)
                    and await order_status(h, in_flight, Intent.BUY) == SUBMITTED
                    and await order_status(h, queued, Intent.BUY) is None
                )

            await eventually(ready_to_wipe, timeout_s=6)
            # The last SLX price now breaches the stop-loss (95.5) of the position held.
            await wipe_keeping_the_broker(redis_proc.url, {"SBIN": "100", "SLX": "90"})
            wiped_at = time.monotonic()

            check = Redis.from_url(redis_proc.url, decode_responses=True)
            try:

                async def rebuilt() -> bool:
                    return bool(await check.exists("algoplane:state-epoch"))

                await eventually(rebuilt, timeout_s=5)
                assert time.monotonic() - wiped_at < 3.0
                await eventually(lambda: is_bought(h, in_flight), timeout_s=5)
                for sid in (held, later, queued, in_flight):
                    for key in (f"runtime:{{{sid}}}", f"strategy:{{{sid}}}"):
                        assert await check.exists(key), f"{key} not rebuilt"
                assert {held, later, queued, in_flight} <= await check.smembers(
                    "symbol:{SBIN}:strategies"
                )
                armed = await check.zrange("symbol:{SBIN}:stoploss", 0, -1)
                assert any(str(m).endswith(held) for m in armed)
            finally:
                await check.aclose()

            for sid in (held, later, queued, in_flight):
                await reaches(h, sid, COMPLETED, timeout_s=15)
            exited = await reaches(h, breach, COMPLETED, timeout_s=5)
            assert exited.position == pb.POSITION_EXITED_BY_SL
            assert sorted(await paper_log(redis_proc.url)) == ids(
                *[(s, Intent.BUY) for s in (held, breach, in_flight, queued, later)],
                *[(s, Intent.SELL) for s in (held, in_flight, queued, later)],
                (breach, Intent.STOPLOSS),
            )
            await final_check(redis_proc.url, h.settings.effective_database_url)


async def test_sigstop_past_the_lock_ttl_then_sigcont_places_one_order(tmp_path: Path) -> None:
    with redis_process(tmp_path / "redis") as redis_proc:
        assert redis_proc.process is not None
        settings = {**SLOW_BROKER, "lock_ttl_ms": 1000, "redis_timeout_s": 1.0}
        async with pipeline(redis_proc, tmp_path / "data", **settings) as h:
            await h.redis.set("price:{SBIN}", "100")
            t0 = time.time()
            sid = await start_at(h, t0 + 0.8, t0 + 60)

            async def in_flight() -> bool:
                return await order_status(h, sid, Intent.BUY) == SUBMITTED

            await eventually(in_flight, timeout_s=5)
            redis_proc.process.send_signal(signal.SIGSTOP)  # the broker's place lands in here
            try:
                error, took = await timed(
                    h.stub.GetRuntime(
                        pb.GetRuntimeRequest(strategy_id=sid), metadata=h.md(), timeout=5
                    )
                )
                assert error is not None and rpc_code(error) == grpc.StatusCode.UNAVAILABLE
                assert took < 3.0
                await health_becomes(h.channel, NOT_SERVING, timeout_s=4)
                await sleep_until(t0 + 4.0)  # 3 s past the lock TTL
            finally:
                redis_proc.process.send_signal(signal.SIGCONT)

            await health_becomes(h.channel, SERVING, timeout_s=8)
            bought = await reaches(h, sid, pb.STRATEGY_STATUS_RUNNING, timeout_s=10)
            await eventually(lambda: is_bought(h, sid), timeout_s=10)
            assert await paper_log(redis_proc.url) == [client_order_id(sid, 1, Intent.BUY)]
            assert bought.last_buy_order_id == client_order_id(sid, 1, Intent.BUY)

            # Trading goes on by itself: a new strategy buys once.
            t1 = time.time()
            after = await start_at(h, t1 + 0.5, t1 + 60)
            await eventually(lambda: is_bought(h, after), timeout_s=8)
            assert sorted(await paper_log(redis_proc.url)) == ids(
                (sid, Intent.BUY), (after, Intent.BUY)
            )
            await final_check(redis_proc.url, h.settings.effective_database_url)


async def test_redis_black_holed_then_healed(tmp_path: Path) -> None:
    with redis_process(tmp_path / "redis") as redis_proc:
        direct = Redis.from_url(redis_proc.url, decode_responses=True)
        proxy = FaultProxy("127.0.0.1", redis_proc.port)
        port = await proxy.start()
        try:
            await direct.set("price:{SBIN}", "100")
            url = f"redis://127.0.0.1:{port}/0"
            async with serving(
                url, tmp_path / "data", **{**SLOW_BROKER, "paper_latency_ms": 0}
            ) as h:
                t0 = time.time()
                before = await start_at(h, t0 + 0.5, t0 + 60)
                due_in_gap = await start_at(h, t0 + 2.0, t0 + 60)  # BUY due while black-holed
                await eventually(lambda: is_bought(h, before), timeout_s=5)

                proxy.blackhole()
                error, took = await timed(
                    h.stub.GetRuntime(
                        pb.GetRuntimeRequest(strategy_id=before), metadata=h.md(), timeout=5
                    )
                )
                assert error is not None and rpc_code(error) == grpc.StatusCode.UNAVAILABLE
                assert took < 3.0
                retried = pb.StartStrategyRequest(
                    spec=spec_at(t0 + 6.0, t0 + 60), request_id="start-in-the-dark"
                )
                error, took = await timed(h.stub.StartStrategy(retried, metadata=h.md(), timeout=5))
                assert error is not None and rpc_code(error) == grpc.StatusCode.UNAVAILABLE
                assert took < 3.0
                await health_becomes(h.channel, NOT_SERVING, timeout_s=4)
                await sleep_until(t0 + 3.5)  # past the gap's BUY
                assert await paper_log(redis_proc.url) == [client_order_id(before, 1, Intent.BUY)]

                proxy.heal()
                await health_becomes(h.channel, SERVING, timeout_s=8)
                # The client retries its Start with the same request_id: one strategy.
                started = await h.stub.StartStrategy(retried, metadata=h.md(), timeout=5)
                await eventually(lambda: is_bought(h, due_in_gap), timeout_s=10)
                await eventually(lambda: is_bought(h, started.strategy_id), timeout_s=10)
                listed = await h.stub.ListStrategies(pb.ListStrategiesRequest(), metadata=h.md())
                assert len(listed.strategies) == 3
                assert sorted(await paper_log(redis_proc.url)) == ids(
                    (before, Intent.BUY),
                    (due_in_gap, Intent.BUY),
                    (started.strategy_id, Intent.BUY),
                )
                await final_check(redis_proc.url, h.settings.effective_database_url)
        finally:
            await proxy.stop()
            await direct.aclose()


async def test_redis_connections_reset_during_a_burst_of_buys(tmp_path: Path) -> None:
    with redis_process(tmp_path / "redis") as redis_proc:
        direct = Redis.from_url(redis_proc.url, decode_responses=True)
        proxy = FaultProxy("127.0.0.1", redis_proc.port)
        port = await proxy.start()
        try:
            await direct.set("price:{INFY}", "1500")
            url = f"redis://127.0.0.1:{port}/0"
            settings = {**SLOW_BROKER, "paper_latency_ms": 300}
            async with serving(url, tmp_path / "data", **settings) as h:
                t0 = time.time()
                spec_ = spec_at(t0 + 2.0, t0 + 60, symbol="INFY")
                started = await asyncio.gather(
                    *(
                        h.stub.StartStrategy(pb.StartStrategyRequest(spec=spec_), metadata=h.md())
                        for _ in range(40)
                    )
                )
                sids = [r.strategy_id for r in started]
                await sleep_until(t0 + 2.1)
                for _ in range(5):  # every connection to Redis reset, again and again
                    proxy.reset()
                    await asyncio.sleep(0.15)

                async def all_placed() -> bool:
                    return len(await paper_log(redis_proc.url)) >= len(sids)

                await eventually(all_placed, timeout_s=15)
                await all_bought(h, sids, timeout_s=10)
                await asyncio.sleep(0.5)  # a duplicate would show up here
                assert sorted(await paper_log(redis_proc.url)) == ids(
                    *[(sid, Intent.BUY) for sid in sids]
                )

                # Every position is armed, even where the reset came between the commit and
                # the arming: the event is not acknowledged, and its retry or redelivery (up to
                # the retries' 1.6 s and the claim's idle time later), found done, arms it.
                async def all_armed() -> bool:
                    return await direct.zcard("symbol:{INFY}:stoploss") >= len(sids)

                await eventually(all_armed, timeout_s=15)
                assert await direct.zcard("symbol:{INFY}:stoploss") == len(sids)
                await final_check(redis_proc.url, h.settings.effective_database_url)
        finally:
            await proxy.stop()
            await direct.aclose()
