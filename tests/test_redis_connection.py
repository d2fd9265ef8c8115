"""server/store/connection.py against a real redis-server: pipelines with scripts after Redis
lost its script cache run every command exactly once, and errors come back as redis-py's."""

from __future__ import annotations

import pytest
from redis.exceptions import ResponseError

from server.store.connection import execute
from server.store.state import connect
from tests.support import RedisProcess

ADD = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


async def test_a_pipeline_after_script_flush_runs_each_command_once(
    redis_proc: RedisProcess,
) -> None:
    client = connect(redis_proc.url, timeout_s=2)
    try:
        await client.delete("total", "plain")
        add = client.register_script(ADD)
        await client.script_flush()  # what a Redis restart does to the scripts
        async with client.pipeline(transaction=False) as pipe:
            await add(keys=["total"], args=[2], client=pipe)
            pipe.incr("plain")
            await add(keys=["total"], args=[3], client=pipe)
            assert await execute(pipe) == [2, 1, 5]
        assert (await client.get("total"), await client.get("plain")) == ("5", "1")

        async with client.pipeline(transaction=False) as pipe:  # loaded now: one trip
            await add(keys=["total"], args=[1], client=pipe)
            pipe.hset("plain", "f", "v")  # WRONGTYPE: the others still run
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                await execute(pipe)
        assert await client.get("total") == "6"
        async with client.pipeline(transaction=False) as pipe:
            pipe.hset("plain", "f", "v")
            replies = await execute(pipe, raise_on_error=False)
        assert isinstance(replies[0], ResponseError)
    finally:
        await client.aclose()
