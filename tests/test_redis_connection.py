"""server/store/connection.py against a real redis-server: pipelines with scripts after Redis
lost its script cache run every command exactly once, and errors come back as redis-py's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from server.store import connection
from server.store.connection import execute, queue_script
from server.store.state import connect
from tests.support import RedisProcess

ADD = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
async def client(redis_proc: RedisProcess) -> AsyncIterator[Redis]:
    client = connect(redis_proc.url, timeout_s=2)
    yield client
    await client.aclose()


async def test_a_pipeline_after_script_flush_runs_each_command_once(client: Redis) -> None:
    await client.delete("total", "plain")
    add = client.register_script(ADD)
    await client.script_flush()  # what a Redis restart does to the scripts
    async with client.pipeline(transaction=False) as pipe:
        queue_script(pipe, add, ["total"], [2])
        pipe.incr("plain")
        await add(keys=["total"], args=[3], client=pipe)  # redis-py's own way, beside it
        assert await execute(pipe) == [2, 1, 5]
    assert (await client.get("total"), await client.get("plain")) == ("5", "1")

    async with client.pipeline(transaction=False) as pipe:  # loaded now: one trip
        queue_script(pipe, add, ["total"], [1])
        pipe.hset("plain", "f", "v")  # WRONGTYPE: the others still run
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await execute(pipe)
    assert await client.get("total") == "6"
    async with client.pipeline(transaction=False) as pipe:
        pipe.hset("plain", "f", "v")
        replies = await execute(pipe, raise_on_error=False)
    assert isinstance(replies[0], ResponseError)


async def test_pipelines_sent_together_each_get_their_own_replies(client: Redis) -> None:
    await client.delete(*[f"n{k}" for k in range(50)], "wrong")
    await client.set("wrong", "x")

    async def one(k: int, raise_on_error: bool = False) -> list[object]:
        async with client.pipeline(transaction=False) as pipe:
            pipe.incrby(f"n{k}", k)
            pipe.hset(f"h{k}", mapping={"k": str(k)})
            pipe.hgetall(f"h{k}")
            if k % 7 == 0:
                pipe.hset("wrong", "f", "v")  # WRONGTYPE for this pipeline alone
            return await execute(pipe, raise_on_error=raise_on_error)

    # Started in one turn of the loop: they share writes.
    results = await asyncio.gather(*(one(k) for k in range(50)))
    for k, replies in enumerate(results):
        assert replies[:3] == [k, 1, {"k": str(k)}]
        if k % 7 == 0:
            assert isinstance(replies[3], ResponseError)
        else:
            assert len(replies) == 3
    failing, passing = await asyncio.gather(
        one(7, raise_on_error=True), one(8, raise_on_error=True), return_exceptions=True
    )
    assert isinstance(failing, ResponseError) and "WRONGTYPE" in str(failing)
    assert passing == [16, 0, {"k": "8"}]


async def test_replies_read_straight_from_the_connection_match_redis_pys(client: Redis) -> None:
    """XADD, SADD, SREM and EVALSHA replies skip redis-py's parse layers: each reply, error
    replies included, still lands in its own place, with the values redis-py would give."""
    await client.delete("events", "members", "wrong", "total")
    await client.set("wrong", "x")
    add = client.register_script(ADD)
    async with client.pipeline(transaction=False) as pipe:
        pipe.xadd("events", {"a": "1"})
        pipe.sadd("members", "m1", "m2")
        pipe.sadd("wrong", "m")  # WRONGTYPE
        queue_script(pipe, add, ["total"], [4])
        queue_script(pipe, add, ["wrong"], [1])  # an error raised inside the script
        pipe.srem("members", "m1")
        pipe.hgetall("events:none")  # a reply with a callback: the full path
        replies = await execute(pipe, raise_on_error=False)
    event_id, added, wrong, total, script_error, removed, empty = replies
    assert isinstance(event_id, str) and event_id.count("-") == 1
    assert (added, total, removed, empty) == (2, 4, 1, {})
    assert isinstance(wrong, ResponseError) and "WRONGTYPE" in str(wrong)
    assert isinstance(script_error, ResponseError)
    assert [e[0] for e in await client.xrange("events") or []] == [event_id]
    assert await client.smembers("members") == {"m2"}
    assert await client.get("total") == "4"


async def test_a_connection_killed_under_shared_pipelines_fails_them_all_and_heals(
    client: Redis, redis_proc: RedisProcess
) -> None:
    admin = connect(redis_proc.url, timeout_s=2)
    try:
        await client.delete("slow", "counted")

        async def blocked(n: int) -> list[object]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.incr("counted")
                pipe.blpop([f"slow{n}"], timeout=5)  # holds its connection
                return await execute(pipe)

        # The first _DIRECT_WHILE go out at once, each on its own connection; the two that
        # come while those are in flight share a write.
        direct = connection._DIRECT_WHILE
        running = [asyncio.ensure_future(blocked(n)) for n in range(direct + 2)]
        await asyncio.sleep(0.3)
        # The shared write's second INCR waits behind its first BLPOP (one connection runs
        # its commands in order).
        assert await admin.get("counted") == str(direct + 1)
        assert await admin.client_kill_filter(_type="normal", skipme=True) >= direct + 1
        for task in running:
            with pytest.raises(RedisConnectionError):
                await task

        async def plain() -> list[object]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.incr("counted")
                return await execute(pipe)

        # The next pipelines get fresh connections.
        got = await asyncio.gather(plain(), plain(), plain())
        assert sorted(int(str(r[0])) for r in got) == [direct + 2, direct + 3, direct + 4]
    finally:
        await admin.aclose()
