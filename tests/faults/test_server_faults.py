"""Server faults with real processes: `python -m server` children, a real redis-server, real
signals (SIGKILL, SIGTERM). Every scenario ends with `check_invariants` over the paper broker's
book, the DB and Redis.

1. kill -9 during a slow broker call, restart the same server: the order settles once.
2. a broker that applies every order and then times out: found by get_order, never re-placed.
3. SIGTERM with open streams and orders in flight: exit 0, streams end UNAVAILABLE, resume
   with no gap and no duplicate; the in-flight order finished or is settled by recovery.
4. two servers on one Redis and one SQLite file, one killed mid-burst of 500 BUYs.
5. kill -9 while a stop-loss exit, taken by the process that saw the tick, is at the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from protos.algoplane.v1 import strategy_pb2_grpc
from scripts.feedsim import FeedSimulator
from server.domain import Intent, OrderStatus, Position, StrategyStatus, client_order_id
from server.store import keys
from server.store.db import Database
from server.store.locks import StrategyLocks
from server.store.state import connect
from tests.faults.invariants import check_invariants
from tests.support import SECRET, RedisProcess, aio_stub, auth, blocked_stream_readers, free_port
from tests.support import server_env as base_env
from tests.test_engine import precise_spec
from tests.test_process import ServerProcess

TENANT = "tenant-a"

# A slow broker call (1.5 s each way), a timeout above it, and a lock that a dead holder
# leaves behind for only 1.5 s.
SLOW_BROKER = {
    "ALGOPLANE_PAPER_LATENCY_MS": "1500",
    "ALGOPLANE_BROKER_TIMEOUT_S": "4",
    "ALGOPLANE_LOCK_TTL_MS": "1500",
    "ALGOPLANE_EXEC_CLAIM_IDLE_S": "1.5",
}


# --- harness -----------------------------------------------------------------------------


@dataclass
class Node:
    """One running `python -m server` and a channel to it."""

    server: ServerProcess
    port: int
    env: dict[str, str]
    channel: grpc.aio.Channel
    stub: strategy_pb2_grpc.StrategyServiceAsyncStub

    @property
    def pid(self) -> int:
        return self.server.process.pid

    async def kill9(self) -> None:
        await self.channel.close(None)
        await self.server.kill()

    async def sigterm(self) -> int:
        self.server.process.send_signal(signal.SIGTERM)
        code = await self.server.wait(20)
        await self.channel.close(None)
        return code

    def log(self) -> str:
        return self.server.log.read_text()


def node_env(redis_url: str, data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = base_env(
        ALGOPLANE_GRPC_ADDR=f"127.0.0.1:{port}",
        ALGOPLANE_REDIS_URL=redis_url,
        ALGOPLANE_DATA_DIR=str(data_dir),
        ALGOPLANE_JWT_SECRET=SECRET,
        ALGOPLANE_TIMER_SYNC_S="0.5",
        ALGOPLANE_HEALTH_INTERVAL_S="0.2",
        ALGOPLANE_LOG_LEVEL="WARNING",
    )
    env.update(extra)
    return env


async def launch(env: dict[str, str], root: Path, name: str) -> Node:
    """Starts a server and returns once it trades ("listening" is printed after recovery)."""
    server = await ServerProcess.start(env, root, root / f"{name}.log")
    try:
        line = await server.read_until("algoplane: listening on")
    except BaseException:
        await server.kill()
        raise
    port = int(line.rsplit(":", 1)[1])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Node(server, port, env, channel, aio_stub(channel))


@contextlib.asynccontextmanager
async def cluster(redis_proc: RedisProcess) -> AsyncIterator[tuple[Redis, list[Node]]]:
    """A flushed Redis and a list the test adds its nodes to; every node still running at
    the end is killed, whatever happened."""
    redis = Redis.from_url(redis_proc.url, decode_responses=True)
    await redis.flushall()
    nodes: list[Node] = []
    try:
        yield redis, nodes
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                await node.kill9()
        await redis.aclose()


def db_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{(data_dir / 'algoplane.db').resolve()}"


async def invariants_hold(redis: Redis, url: str) -> None:
    db = Database(url)
    try:
        await check_invariants(redis, db, tenant=TENANT)
    finally:
        await db.close()


async def until(
    what: str, check: Callable[[], Awaitable[bool]], timeout_s: float, every_s: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout_s:g}s: {what}")
        await asyncio.sleep(every_s)


async def orders_of(node: Node, sid: str) -> list[pb.Order]:
    reply = await node.stub.ListOrders(pb.ListOrdersRequest(strategy_id=sid), metadata=auth())
    return list(reply.orders)


async def runtime_of(node: Node, sid: str) -> pb.Runtime:
    return await node.stub.GetRuntime(pb.GetRuntimeRequest(strategy_id=sid), metadata=auth())


async def start_strategy(node: Node, buy_in: float, hold: float, symbol: str = "SBIN") -> str:
    reply = await node.stub.StartStrategy(
        pb.StartStrategyRequest(spec=precise_spec(buy_in, hold, symbol)), metadata=auth()
    )
    return reply.strategy_id


async def order_submitted(node: Node, order_id: str) -> bool:
    sid = order_id.split("-", 1)[0]
    return any(
        o.id == order_id and o.status == pb.ORDER_STATUS_SUBMITTED
        for o in await orders_of(node, sid)
    )


async def queue_drained(redis: Redis) -> bool:
    """No queued event left, taken or not (finished events are acknowledged and deleted)."""
    for stream in (keys.ORDER_QUEUE, keys.EXIT_QUEUE):
        if await redis.exists(stream) and int(await redis.xlen(stream)) > 0:
            return False
    return True


# --- 1. kill -9 during a slow broker call, restart the same server ------------------------


@pytest.mark.parametrize("moment", ["before-the-broker-applied", "after-the-broker-applied"])
async def test_kill_9_during_a_slow_broker_call_then_restart_settles_once(
    redis_proc: RedisProcess, tmp_path: Path, moment: str
) -> None:
    applied = moment == "after-the-broker-applied"
    data = tmp_path / "data"
    env = node_env(
        redis_proc.url,
        data,
        free_port(),
        **SLOW_BROKER,
        ALGOPLANE_BUY_GRACE_S="30",
        # After the broker applies the order it times out, and the engine asks get_order,
        # which takes 1.5 s: the kill lands there, with the order at the broker.
        ALGOPLANE_PAPER_TIMEOUT_RATE="1.0" if applied else "0",
    )
    async with cluster(redis_proc) as (redis, nodes):
        await redis.set("price:{SBIN}", "100")
        nodes.append(node := await launch(env, tmp_path, "first"))
        sid = await start_strategy(node, buy_in=1.0, hold=600)
        buy = client_order_id(sid, 1, Intent.BUY)

        if applied:

            async def at_broker() -> bool:
                return bool(await redis.hexists(keys.PAPER_ORDERS, buy))

            await until("the broker applied the BUY", at_broker, 6, every_s=0.01)
        else:
            await until("the BUY is at the broker", lambda: order_submitted(node, buy), 6)
        await node.kill9()
        assert await redis.lrange(keys.PAPER_LOG, 0, -1) == ([buy] if applied else [])

        db = Database(db_url(data))
        try:
            _, before = await db.find_with_order(sid, buy)
            assert before is not None and before.status is OrderStatus.SUBMITTED, before
            assert before.attempts == 1

            # The same server again: same data dir (DB), same Redis, same port.
            nodes.append(node := await launch(env, tmp_path, "second"))
            # "listening" comes after recovery: the BUY is settled by now.
            _, after = await db.find_with_order(sid, buy)
            assert after is not None and after.status is OrderStatus.FILLED, after
            # Not at the broker: placed once more with the same id. At the broker: found by
            # get_order and recorded, never placed again.
            assert after.attempts == (1 if applied else 2)
            found, _ = await db.find_with_order(sid, buy)
            assert found is not None
            runtime = found[1]
            assert (runtime.status, runtime.position) == (
                StrategyStatus.RUNNING,
                Position.BOUGHT,
            )
            assert runtime.last_buy_order_id == buy
        finally:
            await db.close()
        hot = await runtime_of(node, sid)
        assert (hot.status, hot.position) == (pb.STRATEGY_STATUS_RUNNING, pb.POSITION_BOUGHT)
        # The dead worker's queue entry is taken over and dropped as a duplicate.
        await until("the dead worker's event was taken over", lambda: queue_drained(redis), 10)
        assert await redis.lrange(keys.PAPER_LOG, 0, -1) == [buy]

        assert await node.sigterm() == 0
        await invariants_hold(redis, db_url(data))


async def test_kill_9_and_restart_beyond_the_buy_grace_fails_the_buy(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    grace = 2.0
    env = node_env(
        redis_proc.url, data, free_port(), **SLOW_BROKER, ALGOPLANE_BUY_GRACE_S=f"{grace:g}"
    )
    async with cluster(redis_proc) as (redis, nodes):
        await redis.set("price:{SBIN}", "100")
        nodes.append(node := await launch(env, tmp_path, "first"))
        spec = precise_spec(buy_in=1.0, hold=600)
        reply = await node.stub.StartStrategy(pb.StartStrategyRequest(spec=spec), metadata=auth())
        sid = reply.strategy_id
        buy = client_order_id(sid, 1, Intent.BUY)
        await until("the BUY is at the broker", lambda: order_submitted(node, buy), 6)
        await node.kill9()
        assert await redis.llen(keys.PAPER_LOG) == 0  # killed before the broker applied it

        # Down until the grace has passed.
        past = spec.buy_time.ToDatetime(tzinfo=UTC).timestamp() + grace + 0.3
        await asyncio.sleep(max(0.0, past - datetime.now(UTC).timestamp()))
        nodes.append(node := await launch(env, tmp_path, "second"))

        (order,) = await orders_of(node, sid)
        assert (order.id, order.status) == (buy, pb.ORDER_STATUS_FAILED)
        assert "grace" in order.error
        runtime = await runtime_of(node, sid)
        assert runtime.status == pb.STRATEGY_STATUS_FAILED
        assert runtime.position == pb.POSITION_NONE
        assert "BUY not placed" in runtime.failure_reason
        assert f"{grace:g}s grace" in runtime.failure_reason
        await until("the dead worker's event was taken over", lambda: queue_drained(redis), 10)
        assert await redis.llen(keys.PAPER_LOG) == 0
        assert await redis.hlen(keys.PAPER_ORDERS) == 0

        assert await node.sigterm() == 0
        await invariants_hold(redis, db_url(data))


# --- 2. the broker applies the order and then times out ------------------------------------


async def test_broker_that_applies_then_times_out_every_time(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = node_env(
        redis_proc.url,
        data,
        free_port(),
        ALGOPLANE_PAPER_TIMEOUT_RATE="1.0",
        ALGOPLANE_PAPER_LATENCY_MS="100",
        ALGOPLANE_BROKER_TIMEOUT_S="2",
    )
    async with cluster(redis_proc) as (redis, nodes):
        await redis.set("price:{SBIN}", "100")
        nodes.append(node := await launch(env, tmp_path, "server"))
        # Three strategies one after another: six placements in a row, each of which takes
        # effect and then times out.
        sids = [await start_strategy(node, buy_in=1.0 + 0.4 * n, hold=1.0) for n in range(3)]

        async def completed() -> bool:
            runtimes = [await runtime_of(node, sid) for sid in sids]
            return all(r.status == pb.STRATEGY_STATUS_COMPLETED for r in runtimes)

        await until("every strategy completed", completed, 12)
        expected = [client_order_id(sid, 1, i) for sid in sids for i in (Intent.BUY, Intent.SELL)]
        assert sorted(await redis.lrange(keys.PAPER_LOG, 0, -1)) == sorted(expected)
        for sid in sids:
            runtime = await runtime_of(node, sid)
            assert runtime.position == pb.POSITION_SOLD
            assert (runtime.entry_price, runtime.exit_price) == ("100", "100")
            orders = await orders_of(node, sid)
            # One placement each: the timeout was followed by get_order, which found it.
            assert [(o.kind, o.status, o.attempts) for o in orders] == [
                (pb.ORDER_KIND_BUY, pb.ORDER_STATUS_FILLED, 1),
                (pb.ORDER_KIND_SELL, pb.ORDER_STATUS_FILLED, 1),
            ]
        assert await node.sigterm() == 0
        assert node.log().count("timed out after the order took effect") == 6
        await invariants_hold(redis, db_url(data))


# --- 3. SIGTERM with open streams and in-flight orders -------------------------------------


class Subscriber:
    """Reads one server stream into a list until it ends; keeps how it ended."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.events: list[Any] = []
        self.ended: grpc.aio.AioRpcError | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self.call:
                self.events.append(event)
        except grpc.aio.AioRpcError as exc:
            self.ended = exc

    async def until_event(self, event_id: str, timeout_s: float) -> None:
        async def reached() -> bool:
            return any(e.event_id == event_id for e in self.events)

        await until(f"event {event_id}", reached, timeout_s, every_s=0.02)

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def runtime_stream(node: Node, after: str | None) -> Subscriber:
    request = pb.StreamRuntimeRequest(after_event_id=after or "")
    return Subscriber(node.stub.StreamRuntime(request, metadata=auth()))


def order_stream(node: Node, after: str | None) -> Subscriber:
    request = pb.StreamOrdersRequest(after_event_id=after or "")
    return Subscriber(node.stub.StreamOrders(request, metadata=auth()))


async def last_event_id(redis: Redis, kind: keys.StreamKind) -> str:
    info = await redis.xinfo_stream(keys.event_stream(kind, TENANT))
    return str(info["last-generated-id"])


async def test_sigterm_with_open_streams_and_orders_in_flight(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = node_env(
        redis_proc.url,
        data,
        free_port(),
        **SLOW_BROKER,
        ALGOPLANE_BUY_GRACE_S="30",
        # Orders in hand get 1 s after SIGTERM: one placed early finishes, one placed late
        # is cut off and left for recovery.
        ALGOPLANE_SHUTDOWN_GRACE_S="1",
    )
    subscribers: list[Subscriber] = []
    async with cluster(redis_proc) as (redis, nodes):
        await redis.set("price:{SBIN}", "100")
        nodes.append(node := await launch(env, tmp_path, "first"))
        subscribers += [runtime_stream(node, None), order_stream(node, None)]
        runtimes, orders = subscribers
        try:
            await blocked_stream_readers(redis, 2)
            early = await start_strategy(node, buy_in=1.0, hold=600)
            late = await start_strategy(node, buy_in=1.8, hold=600)
            # Due while the server is down or recovering: fired after the restart.
            missed = await start_strategy(node, buy_in=4.0, hold=600)
            sids = [early, late, missed]
            late_buy = client_order_id(late, 1, Intent.BUY)
            await until("the late BUY is in flight", lambda: order_submitted(node, late_buy), 6)

            assert await node.sigterm() == 0
            for sub in subscribers:
                await asyncio.wait_for(sub.task, 5)
                assert sub.ended is not None, "the stream did not end with an error"
                assert sub.ended.code() == grpc.StatusCode.UNAVAILABLE, sub.ended
                assert "resume with after_event_id" in (sub.ended.details() or ""), sub.ended
            assert runtimes.events and orders.events

            db = Database(db_url(data))
            try:
                in_flight = [
                    order.id
                    for order in [
                        (await db.find_with_order(s, client_order_id(s, 1, Intent.BUY)))[1]
                        for s in sids
                    ]
                    if order is not None and not order.status.final
                ]
            finally:
                await db.close()

            nodes.append(node := await launch(env, tmp_path, "second"))
            # The subscriber resumes both streams where it stopped.
            before_runtime, before_orders = list(runtimes.events), list(orders.events)
            resumed = [
                runtime_stream(node, before_runtime[-1].event_id),
                order_stream(node, before_orders[-1].event_id),
            ]
            subscribers += resumed

            async def all_bought() -> bool:
                states = [await runtime_of(node, sid) for sid in sids]
                return all(s.position == pb.POSITION_BOUGHT for s in states)

            await until("every BUY filled", all_bought, 12)
            for sid in sids:
                (buy,) = await orders_of(node, sid)
                assert buy.status == pb.ORDER_STATUS_FILLED
                # Left in flight by the shutdown: settled by recovery, not placed twice.
                if buy.id in in_flight:
                    assert buy.attempts <= 2, buy

            # Everything the streams will show is written; a full replay from "0-0" must
            # equal what the subscriber got before and after the restart.
            full = [runtime_stream(node, "0-0"), order_stream(node, "0-0")]
            subscribers += full
            for kind, sub, replay, before in (
                ("runtime", resumed[0], full[0], before_runtime),
                ("orders", resumed[1], full[1], before_orders),
            ):
                last = await last_event_id(redis, kind)  # type: ignore[arg-type]
                await sub.until_event(last, 5)
                await replay.until_event(last, 5)
                seen = [e.SerializeToString() for e in before + sub.events]
                assert [e.event_id for e in before + sub.events] == [
                    e.event_id for e in replay.events
                ], f"{kind}: gap or duplicate"
                assert seen == [e.SerializeToString() for e in replay.events]
            # The events tell the whole story of every strategy, restart included.
            filled = [
                e.order.id for e in full[1].events if e.order.status == pb.ORDER_STATUS_FILLED
            ]
            assert sorted(filled) == sorted(client_order_id(s, 1, Intent.BUY) for s in sids)
            assert sorted(await redis.lrange(keys.PAPER_LOG, 0, -1)) == sorted(filled)
        finally:
            for sub in subscribers:
                await sub.close()
        assert await node.sigterm() == 0
        await invariants_hold(redis, db_url(data))


# --- 4. two servers on one Redis, one killed mid-burst -------------------------------------


# A burst of BUYs for a kill to interrupt: orders stay in hand a little (so every engine holds
# some of the burst at once), and a dead engine's events are taken over quickly.
BURST = {
    "ALGOPLANE_EXEC_CONCURRENCY": "32",
    "ALGOPLANE_PAPER_LATENCY_MS": "20",
    "ALGOPLANE_BROKER_TIMEOUT_S": "5",
    "ALGOPLANE_EXEC_CLAIM_IDLE_S": "1.5",
    "ALGOPLANE_LOCK_TTL_MS": "1500",
    # Taken-over BUYs are late by the claim time: still wanted.
    "ALGOPLANE_BUY_GRACE_S": "60",
}


async def pending_of(redis: Redis, pid: int) -> int:
    """Events the engine of process `pid` has taken and not finished (its consumer names
    carry the pid)."""
    consumers = await redis.xinfo_consumers(keys.ORDER_QUEUE, keys.ENGINE_GROUP)
    return sum(int(c["pending"]) for c in consumers if f"-{pid}-" in c["name"])


async def holds_events_mid_burst(redis: Redis, pid: int, count: int) -> bool:
    """Killed between two of its batches (every event acked), an engine would leave nothing
    to take over: the burst is under way and `pid` has events in hand."""
    placed = int(await redis.llen(keys.PAPER_LOG))
    return placed >= count // 5 and await pending_of(redis, pid) > 0


async def placed_once_each(redis: Redis, sids: set[str], timeout_s: float = 30) -> None:
    """Waits for every strategy's BUY at the broker and an empty queue; each BUY once."""
    count = len(sids)

    async def all_placed() -> bool:
        return int(await redis.llen(keys.PAPER_LOG)) >= count and await queue_drained(redis)

    await until("every BUY placed and every event finished", all_placed, timeout_s, every_s=0.1)
    log = await redis.lrange(keys.PAPER_LOG, 0, -1)
    assert len(log) == len(set(log)) == count
    assert set(log) == {client_order_id(sid, 1, Intent.BUY) for sid in sids}


async def test_two_servers_one_killed_mid_burst_of_500_buys(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    shared = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    extra = {"ALGOPLANE_DATABASE_URL": shared, **BURST}
    count = 500
    async with cluster(redis_proc) as (redis, nodes):
        await redis.set("price:{INFY}", "1500")
        pair = await asyncio.gather(
            launch(node_env(redis_proc.url, tmp_path / "a", free_port(), **extra), tmp_path, "a"),
            launch(node_env(redis_proc.url, tmp_path / "b", free_port(), **extra), tmp_path, "b"),
        )
        nodes += pair
        victim, survivor = pair
        spec = precise_spec(buy_in=3.0, hold=600, symbol="INFY")
        limit = asyncio.Semaphore(64)

        async def start(n: int) -> str:
            async with limit:
                reply = await pair[n % 2].stub.StartStrategy(
                    pb.StartStrategyRequest(spec=spec), metadata=auth()
                )
                return reply.strategy_id

        sids = set(await asyncio.gather(*(start(n) for n in range(count))))
        assert len(sids) == count

        victim_pid = victim.pid
        await until(
            "the victim holds events mid-burst",
            lambda: holds_events_mid_burst(redis, victim_pid, count),
            10,
            every_s=0.005,
        )
        await victim.kill9()
        placed_at_kill = int(await redis.llen(keys.PAPER_LOG))
        assert placed_at_kill < count, "the burst ended before the kill"
        # The dead server held events in hand: they are pending under its consumer name.
        assert await pending_of(redis, victim_pid) > 0

        await placed_once_each(redis, sids, timeout_s=20)
        assert "taking over event" in survivor.log()

        db = Database(shared)
        try:
            live = await db.list_live()
            assert len(live) == count
            assert all(
                (r.status, r.position) == (StrategyStatus.RUNNING, Position.BOUGHT) for _, r in live
            )
        finally:
            await db.close()
        assert await survivor.sigterm() == 0
        await invariants_hold(redis, shared)


# --- 5. kill -9 while a stop-loss exit the listener's process took is at the broker ------


async def test_kill_9_during_a_stop_loss_taken_at_the_tick_then_another_server_settles_once(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """The process whose listener saw the breach queues the STOPLOSS and takes it for itself
    in one round trip; killed while its broker call is out, the entry is still pending in
    the consumer group, and the next server settles the exit once."""
    feed = FeedSimulator(rate_hz=0, fmt="json")
    url = await feed.start()
    data = tmp_path / "data"
    feed_env = {"ALGOPLANE_FEED_URL": url, "ALGOPLANE_FEED_FORMAT": "json"}
    env = node_env(redis_proc.url, data, free_port(), **SLOW_BROKER, **feed_env)
    try:
        async with cluster(redis_proc) as (redis, nodes):
            nodes.append(node := await launch(env, tmp_path, "first"))
            sid = await start_strategy(node, buy_in=1.0, hold=600)
            buy = client_order_id(sid, 1, Intent.BUY)
            stoploss = client_order_id(sid, 1, Intent.STOPLOSS)

            async def subscribed() -> bool:
                return any(subs and "SBIN" in subs for subs in feed.subscriptions)

            async def bought() -> bool:
                return (await runtime_of(node, sid)).position == pb.POSITION_BOUGHT

            await until("the listener subscribed", subscribed, 5)
            await feed.push("SBIN", "100")
            await until("the BUY filled", bought, 8)
            await feed.push("SBIN", "95")  # below the stop-loss, 95.5
            await until("the exit is at the broker", lambda: order_submitted(node, stoploss), 6)
            rows = await redis.xpending_range(keys.EXIT_QUEUE, keys.ENGINE_GROUP, "-", "+", 10)
            assert [f"-{node.pid}-" in str(row["consumer"]) for row in rows] == [True]
            await node.kill9()
            assert await redis.lrange(keys.PAPER_LOG, 0, -1) == [buy]

            other_env = node_env(redis_proc.url, data, free_port(), **SLOW_BROKER, **feed_env)
            nodes.append(other := await launch(other_env, tmp_path, "second"))
            await until("the entry was taken over", lambda: queue_drained(redis), 10)
            assert await redis.lrange(keys.PAPER_LOG, 0, -1) == [buy, stoploss]
            runtime = await runtime_of(other, sid)
            assert (runtime.status, runtime.position) == (
                pb.STRATEGY_STATUS_COMPLETED,
                pb.POSITION_EXITED_BY_SL,
            )
            assert await other.sigterm() == 0
            await invariants_hold(redis, db_url(data))
    finally:
        await feed.stop()


# --- found by scenario 4: a lock keeper whose cancel a Redis call swallowed ----------------


async def test_lock_keepers_end_even_when_a_redis_call_swallows_their_cancel(
    redis_proc: RedisProcess,
) -> None:
    """On Python 3.11 redis-py's socket writes (asyncio.wait_for) can swallow a cancel();
    the keeper then ran forever, extending the lock, and `held()` waited for it forever: in
    scenario 4 a strategy stayed locked and its event never finished. Many short holds with
    a keeper that extends every 10 ms hit that window every time before the fix."""
    client = connect(redis_proc.url, timeout_s=1.0)
    locks = StrategyLocks(redis=client, ttl_ms=30)
    names = [f"keeper-{n}" for n in range(20)]

    async def holder(name: str) -> None:
        for _ in range(40):
            async with locks.held(name):
                await asyncio.sleep(random.random() * 0.012)

    tasks = [asyncio.create_task(holder(name)) for name in names]
    try:
        _, stuck = await asyncio.wait(tasks, timeout=10)
        assert not stuck, f"{len(stuck)} of {len(tasks)} holders never got out of held()"
    finally:
        # A keeper that ignores cancel() ends once its lock is gone.
        while not all(task.done() for task in tasks):
            await client.delete(*(keys.lock_state(name) for name in names))
            await asyncio.sleep(0.05)
        await client.aclose()
