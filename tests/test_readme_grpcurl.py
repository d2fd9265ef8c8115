"""The README's grpcurl commands, read out of the README so the docs cannot rot.

Always: every command names a method or symbol the server has, and its request body parses
into that method's request message. With `grpcurl` on the PATH: every command runs, in README
order and with the shell's own quoting, against a real server, and its output parses into the
response message."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from redis.asyncio import Redis

from protos.algoplane.v1 import strategy_pb2 as pb
from tests.conftest import Harness, serving
from tests.support import RedisProcess, spec_at, token

README = Path(__file__).resolve().parent.parent / "README.md"
ADDRESS = "localhost:50051"
TENANT = "demo"  # the tenant of the demo token the README's commands use
SERVICE = pb.DESCRIPTOR.services_by_name["StrategyService"]
# grpcurl flags that take a value; every other flag is a switch.
VALUE_FLAGS = {"-H", "-d", "-rpc-header", "-reflect-header", "-max-time", "-connect-timeout"}
assert health_pb2.DESCRIPTOR  # imported for its descriptors: the health check is in the README


@dataclass
class Command:
    """One grpcurl command: the shell text as written, and what its words say."""

    text: str
    target: str  # "list", "describe <symbol>" or "<service>/<method>"
    body: str | None
    address: str

    @property
    def method(self) -> MethodDescriptor | None:
        if "/" not in self.target:
            return None
        service, name = self.target.split("/")
        found = descriptor_pool.Default().FindServiceByName(service).methods_by_name.get(name)
        assert found is not None, f"no method {self.target}"
        return found


def readme_commands() -> list[Command]:
    """Every grpcurl command in the README's bash blocks, with its continuation lines (kept
    as written: bash, not this parser, reads them when the command runs)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M)
    commands: list[Command] = []
    for block in blocks:
        pending = ""
        for line in block.splitlines():
            pending = f"{pending}\n{line}" if pending else line
            if pending.endswith("\\"):
                continue
            try:
                words = shlex.split(pending.replace("\\\n", " "), comments=True)
            except ValueError:  # a quote still open: the command goes on
                continue
            if words and words[0] == "grpcurl":
                commands.append(_command(pending.strip(), words[1:]))
            pending = ""
    return commands


def _command(text: str, words: list[str]) -> Command:
    body = None
    positional: list[str] = []
    rest = iter(words)
    for word in rest:
        if word in VALUE_FLAGS:
            value = next(rest)
            if word == "-d":
                body = value
        elif not word.startswith("-"):
            positional.append(word)
    return Command(text, " ".join(positional[1:]), body, positional[0])


def request_class(method: MethodDescriptor) -> type[Message]:
    return message_factory.GetMessageClass(method.input_type)


def response_class(method: MethodDescriptor) -> type[Message]:
    return message_factory.GetMessageClass(method.output_type)


def has_symbol(name: str) -> bool:
    pool = descriptor_pool.Default()
    for find in (pool.FindServiceByName, pool.FindMessageTypeByName, pool.FindEnumTypeByName):
        with contextlib.suppress(KeyError):
            return bool(find(name))
    return False


# Stand-ins for the shell variables, each of the shape the server gives.
SAMPLE_VARIABLES = {
    "$ID": "stg_0193a1b2c3d4e5f60718293a4b5c",
    "$EVENT_ID": "1732456789123-0",
    "$ORDER_EVENT_ID": "1732456789123-1",
}


def test_every_command_names_what_the_server_has_and_its_body_parses() -> None:
    commands = readme_commands()
    assert len(commands) >= len(SERVICE.methods) + 4, [c.target for c in commands]
    for command in commands:
        assert command.address == ADDRESS, command.text
        if command.target == "list":
            continue
        if command.target.startswith("describe "):
            assert has_symbol(command.target.split()[1]), command.text
            continue
        method = command.method
        assert method is not None, command.text
        body = command.body or "{}"
        for name, value in SAMPLE_VARIABLES.items():
            body = body.replace(name, value)
        json_format.Parse(body, request_class(method)())  # raises on an unknown field or value

    by_method: dict[str, list[Command]] = {}
    for command in commands:
        if command.method is not None:
            by_method.setdefault(command.method.name, []).append(command)
    assert set(by_method) >= {m.name for m in SERVICE.methods}, "an RPC has no example"
    assert "Check" in by_method
    for stream in ("StreamRuntime", "StreamOrders"):
        bodies = [c.body or "" for c in by_method[stream]]
        assert any("after_event_id" in b for b in bodies), f"{stream}: no resume example"
        assert any("after_event_id" not in b for b in bodies), f"{stream}: no live example"


# On the PATH, or installed into this venv (e.g. by a PyPI package that ships the binary).
GRPCURL = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))


@dataclass
class Stream:
    """A streaming grpcurl left running while the commands after it run."""

    command: Command
    process: asyncio.subprocess.Process
    output: str = ""
    reader: asyncio.Task[None] | None = None
    grew: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        assert self.process.stdout is not None
        while chunk := await self.process.stdout.read(4096):
            self.output += chunk.decode()
            self.grew.set()

    def parse(self) -> list[Message]:
        method = self.command.method
        assert method is not None
        decoder, text, position, found = json.JSONDecoder(), self.output, 0, []
        while (start := text.find("{", position)) >= 0:
            value, position = decoder.raw_decode(text, start)
            found.append(json_format.ParseDict(value, response_class(method)()))
        return found


STREAM_SETTLE_S = 0.3


async def stream_reader_blocked(redis: Redis, timeout_s: float = 15.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        clients = await redis.client_list()
        if any(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in clients):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("no stream reader blocked in Redis")


class Session:
    """Runs README commands as a reader would, in order, through bash."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ALGOPLANE_")}
        self.env["TOKEN"] = token(TENANT)
        assert GRPCURL is not None
        self.env["PATH"] = f"{Path(GRPCURL).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.streams: list[Stream] = []

    def shell(self, command: Command) -> str:
        return command.text.replace(ADDRESS, f"127.0.0.1:{self.h.port}")

    async def spawn(self, command: Command) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            "bash", "-c", self.shell(command), env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def unary(self, command: Command) -> str:
        process = await self.spawn(command)
        out, err = await asyncio.wait_for(process.communicate(), 20)
        assert (process.returncode, err.decode()) == (0, ""), command.text
        return out.decode()

    async def open_stream(self, command: Command) -> Stream:
        stream = Stream(command, await self.spawn(command))
        stream.reader = asyncio.create_task(stream.read())
        self.streams.append(stream)
        # Nothing on the wire tells when the server has fixed a stream's start (no headers
        # before the first event), and how many XREADs serve a tenant's subscribers is the
        # server's business. So: some reader blocks in Redis and the stream is still up a
        # moment later; the README's next change comes one grpcurl run after that.
        await stream_reader_blocked(self.h.redis)
        await asyncio.sleep(STREAM_SETTLE_S)
        if stream.process.returncode is not None:
            assert stream.process.stderr is not None
            error = (await stream.process.stderr.read()).decode()
            raise AssertionError(f"stream ended at once: {command.text}\n{error}")
        return stream

    async def close(self) -> None:
        for stream in self.streams:
            if stream.process.returncode is None:
                stream.process.terminate()
            await stream.process.wait()
            if stream.reader is not None:
                await stream.reader


@contextlib.asynccontextmanager
async def session(h: Harness) -> AsyncIterator[Session]:
    s = Session(h)
    try:
        yield s
    finally:
        await s.close()


async def first_event_id(stream: Stream, timeout_s: float = 10.0) -> str:
    async with asyncio.timeout(timeout_s):
        while True:
            stream.grew.clear()
            if messages := stream.parse():
                break
            await stream.grew.wait()
    first = messages[0]
    if isinstance(first, pb.RuntimeEventBatch | pb.OrderEventBatch):
        assert first.events, "an empty batch"
        first = first.events[0]
    assert isinstance(first, pb.RuntimeEvent | pb.OrderEvent)
    return first.event_id


async def traded_order_event_id(h: Harness) -> str:
    """The tenant's first order event, from a strategy that bought and sold: what a reader who
    watched StreamOrders while trading would hold."""
    await h.redis.set("price:{SBIN}", "100")
    now = time.time()
    started = await h.stub.StartStrategy(
        pb.StartStrategyRequest(spec=spec_at(now + 0.5, now + 1.0)), metadata=h.md(TENANT)
    )
    async with asyncio.timeout(10):
        while True:
            runtime = await h.stub.GetRuntime(
                pb.GetRuntimeRequest(strategy_id=started.strategy_id), metadata=h.md(TENANT)
            )
            if runtime.status == pb.STRATEGY_STATUS_COMPLETED:
                break
            await asyncio.sleep(0.05)
    entries = await h.redis.xrange(f"stream:orders:{{{TENANT}}}", count=1)
    assert entries
    return str(entries[0][0])


def check_output(command: Command, out: str) -> Message | None:
    if command.target == "list":
        assert f"{SERVICE.full_name}\n" in out
        return None
    if command.target.startswith("describe "):
        assert out.startswith(f"{command.target.split()[1]} is a "), out
        return None
    method = command.method
    assert method is not None
    return json_format.Parse(out, response_class(method)())


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not on the PATH")
async def test_every_command_runs_against_a_real_server(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    flush = Redis.from_url(redis_proc.url)
    await flush.flushall()
    await flush.aclose()
    async with serving(redis_proc.url, tmp_path / "data") as h, session(h) as s:
        s.env["ORDER_EVENT_ID"] = await traded_order_event_id(h)
        for command in readme_commands():
            method = command.method
            if "$EVENT_ID" in command.text:
                runtime_streams = [x for x in s.streams if x.command.target.endswith("Runtime")]
                s.env["EVENT_ID"] = await first_event_id(runtime_streams[0])
            if method is not None and method.server_streaming:
                stream = await s.open_stream(command)
                if "after_event_id" in (command.body or ""):
                    await first_event_id(stream)  # the events after it come at once
                continue
            reply = check_output(command, await s.unary(command))
            if isinstance(reply, health_pb2.HealthCheckResponse):
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            if isinstance(reply, pb.Strategy) and method and method.name == "CreateStrategy":
                s.env["ID"] = reply.id

        created = s.env["ID"]
        for stream in s.streams:
            assert stream.process.returncode is None, f"a stream ended: {stream.command.text}"
            messages = stream.parse()
            if stream.command.target.endswith(("StreamRuntime", "StreamRuntimeBatches")):
                assert messages, f"no runtime event on: {stream.command.text}"
            if '"strategy_id": "\'$ID\'"' in stream.command.text:
                events = [m for m in messages if isinstance(m, pb.RuntimeEvent)]
                assert len(events) == len(messages)
                assert {e.runtime.strategy_id for e in events} == {created}
