"""The reconcile loop settles an order left UNKNOWN while the server keeps running."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from protos.algoplane.v1 import strategy_pb2 as pb
from server.brokers.base import Side
from server.brokers.paper import PaperBroker
from server.domain import Intent, Order, OrderKind, OrderStatus, client_order_id, order_submitted
from server.store.db import Database
from server.store.state import RedisState, connect
from tests.faults.invariants import check_invariants
from tests.support import RedisProcess
from tests.test_engine import eventually, orders_of, pipeline, runtime_of, start_precise


async def test_an_unknown_order_found_at_the_broker_is_recorded_without_a_restart(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    async with pipeline(redis_proc, tmp_path, reconcile_after_s=0.5, timer_sync_s=0.5) as h:
        await h.redis.set("price:{SBIN}", "100")
        sid = await start_precise(h, buy_in=30.0, hold=600)  # no timer fires meanwhile
        db = Database(h.settings.effective_database_url)
        state = RedisState(
            client=connect(h.settings.redis_url, timeout_s=5),
            stream_client=connect(h.settings.redis_url, timeout_s=5),
            stream_maxlen=1000,
        )
        try:
            # What a worker leaves when the broker applied the BUY and every lookup after it
            # failed: the intent committed, the order UNKNOWN, the runtime RUNNING.
            _, runtime = await db.get_strategy("tenant-a", sid)
            order_id = client_order_id(sid, 1, Intent.BUY)
            past = datetime.now(UTC) - timedelta(seconds=5)
            order = Order(order_id, "tenant-a", sid, "SBIN", OrderKind.BUY, OrderStatus.UNKNOWN,
                          10, 3, past, past, error="outcome unknown")  # fmt: skip
            assert await db.save(order_submitted(runtime, Intent.BUY, order_id, past), [(order, 1)])
            await PaperBroker(redis=state.client).place_order(order_id, "SBIN", Side.BUY, 10)

            async def settled() -> bool:
                orders = await orders_of(h, sid)
                return bool(orders) and orders[0].status == pb.ORDER_STATUS_FILLED

            await eventually(settled, timeout_s=8)
            runtime_now = await runtime_of(h, sid)
            assert runtime_now.position == pb.POSITION_BOUGHT
            assert runtime_now.entry_price == "100"
            assert await h.redis.lrange("{paper}:log", 0, -1) == [order_id]
            assert await h.redis.zcard("symbol:{SBIN}:stoploss") == 1  # armed
            await check_invariants(h.redis, db)
        finally:
            await state.close()
            await db.close()
