"""Every validation rule: INVALID_ARGUMENT (or the stated code) naming the field, and nothing
written; idempotent Create/Start; and a fuzzer that no input turns into UNKNOWN or INTERNAL."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.algoplane.v1 import strategy_pb2 as pb
from protos.algoplane.v1 import strategy_pb2_grpc
from tests.conftest import Harness
from tests.support import aio_stub, redis_dump, rpc_code, ts

if TYPE_CHECKING:
    from protos.algoplane.v1.strategy_pb2_grpc import StrategyServiceAsyncStub

HOUR = timedelta(hours=1)
WEEK = timedelta(days=7)
MIB = 1024 * 1024
# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
TS_MIN, TS_MAX = -62_135_596_800, 253_402_300_799
SYMBOL_PATTERN = r"[A-Z0-9][A-Z0-9:._-]{0,31}"
SERVICE = "/algoplane.v1.StrategyService/"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def stub(server: Harness) -> StrategyServiceAsyncStub:
    return aio_stub(server.channel)


def make_spec(case: dict[str, Any] | None = None) -> pb.StrategySpec:
    """A valid spec (BUY in an hour, held an hour), then `case` applied: `buy_in`/`hold`
    move the times, None clears a field, anything else replaces it."""
    fields = dict(case or {})
    buy = datetime.now(UTC) + fields.pop("buy_in", HOUR)
    sell = buy + fields.pop("hold", HOUR)
    message = pb.StrategySpec(
        symbol="SBIN", quantity=10, buy_time=ts(buy), sell_time=ts(sell), stop_loss="95.5"
    )
    for name, value in fields.items():
        if value is None:
            message.ClearField(name)  # type: ignore[arg-type]
        elif isinstance(value, Timestamp):
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


async def snapshot(server: Harness) -> tuple[object, ...]:
    """What a rejected call must leave alone: tenant-a's strategies and all of Redis."""
    listed = await stub(server).ListStrategies(
        pb.ListStrategiesRequest(page_size=1000), metadata=server.md()
    )
    return list(listed.strategies), await redis_dump(server.redis)


async def rejects(
    server: Harness,
    call: Callable[[], Awaitable[object]],
    field: str | None,
    code: grpc.StatusCode = INVALID,
) -> str:
    """Asserts the call fails with `code`, its message names `field`, and nothing changed."""
    before = await snapshot(server)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call()
    details = err.value.details() or ""
    assert rpc_code(err.value) == code, details
    if field is not None and code == INVALID:
        assert details.startswith(f"{field}: "), details
    elif field is not None:
        assert field in details, details
    assert await snapshot(server) == before
    return details


async def first_event(call: grpc.aio.UnaryStreamCall[Any, Any]) -> object:
    try:
        return await call.read()
    finally:
        call.cancel()


def b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


# --- the spec --------------------------------------------------------------------------

BAD_SPECS = [
    pytest.param("spec.symbol", {"symbol": "sbin"}, id="symbol-lower-case"),
    pytest.param("spec.symbol", {"symbol": "A" * 33}, id="symbol-33-chars"),
    pytest.param("spec.symbol", {"symbol": ""}, id="symbol-empty"),
    pytest.param("spec.symbol", {"symbol": "-SBIN"}, id="symbol-leading-dash"),
    pytest.param("spec.symbol", {"symbol": "SB IN"}, id="symbol-space"),
    pytest.param("spec.symbol", {"symbol": "SBIN\n"}, id="symbol-trailing-newline"),
    pytest.param("spec.symbol", {"symbol": "SB\u0130N"}, id="symbol-non-ascii"),
    pytest.param("spec.quantity", {"quantity": 0}, id="quantity-0"),
    pytest.param("spec.quantity", {"quantity": -1}, id="quantity-negative"),
    pytest.param("spec.quantity", {"quantity": 10**9 + 1}, id="quantity-over-1e9"),
    pytest.param("spec.quantity", {"quantity": -(2**63)}, id="quantity-int64-min"),
    *(
        pytest.param("spec.stop_loss", {"stop_loss": value}, id=f"stop_loss-{value!r}")
        for value in [
            "",
            "0",
            "0.000000000",
            "-1",
            "abc",
            "1e5",
            "NaN",
            "inf",
            "-Infinity",
            "1.123456789",
            "1,5",
            " 1.5",
            "1.5\n",
        ]
    ),
    pytest.param("spec.sell_time", {"hold": timedelta(0)}, id="sell-equals-buy"),
    pytest.param("spec.sell_time", {"hold": -timedelta(seconds=1)}, id="sell-before-buy"),
    pytest.param("spec.sell_time", {"hold": WEEK + timedelta(seconds=1)}, id="hold-7d-1s"),
    pytest.param("spec.sell_time", {"hold": WEEK + timedelta(microseconds=1)}, id="hold-7d-1us"),
    pytest.param("spec.buy_time", {"buy_in": -timedelta(minutes=1)}, id="buy-in-the-past"),
    pytest.param("spec.buy_time", {"buy_time": None}, id="buy-missing"),
    pytest.param("spec.sell_time", {"sell_time": None}, id="sell-missing"),
    pytest.param("spec.buy_time", {"buy_time": Timestamp(seconds=2**62)}, id="buy-s-huge"),
    pytest.param("spec.buy_time", {"buy_time": Timestamp(seconds=-(2**62))}, id="buy-s-tiny"),
    pytest.param("spec.buy_time", {"buy_time": Timestamp(seconds=TS_MAX + 1)}, id="buy-y10000"),
    pytest.param("spec.buy_time", {"buy_time": Timestamp(seconds=TS_MIN - 1)}, id="buy-y0"),
    pytest.param("spec.buy_time", {"buy_time": Timestamp(nanos=-1)}, id="buy-nanos-negative"),
    pytest.param("spec.buy_time", {"buy_time": Timestamp(nanos=10**9)}, id="buy-nanos-1e9"),
    pytest.param("spec.sell_time", {"sell_time": Timestamp(seconds=2**62)}, id="sell-s-huge"),
    pytest.param("spec.sell_time", {"sell_time": Timestamp(nanos=-1)}, id="sell-nanos-neg"),
]


@pytest.mark.parametrize(("field", "case"), BAD_SPECS)
async def test_bad_spec_is_rejected_naming_the_field(
    server: Harness, field: str, case: dict[str, Any]
) -> None:
    md = server.md()
    await rejects(
        server,
        lambda: stub(server).CreateStrategy(
            pb.CreateStrategyRequest(spec=make_spec(case), request_id="create-1"), metadata=md
        ),
        field,
    )
    await rejects(
        server,
        lambda: stub(server).StartStrategy(
            pb.StartStrategyRequest(spec=make_spec(case), request_id="start-1"), metadata=md
        ),
        field,
    )


GOOD_SPECS = [
    pytest.param({"quantity": 10**9}, id="quantity-1e9"),
    pytest.param({"quantity": 1}, id="quantity-1"),
    pytest.param({"stop_loss": "0.00000001"}, id="stop_loss-8-decimals-tiny"),
    pytest.param({"stop_loss": "101.12345678"}, id="stop_loss-8-decimals"),
    pytest.param({"hold": WEEK}, id="hold-exactly-7-days"),
    pytest.param({"hold": timedelta(microseconds=1)}, id="hold-1us"),
    pytest.param({"symbol": "A" * 32}, id="symbol-32-chars"),
    pytest.param({"symbol": "NSE:SBIN-EQ_1.X"}, id="symbol-punctuation"),
    pytest.param({"symbol": "0"}, id="symbol-one-digit"),
]


@pytest.mark.parametrize("case", GOOD_SPECS)
async def test_boundary_specs_are_accepted(server: Harness, case: dict[str, Any]) -> None:
    sent = make_spec(case)
    created = await stub(server).CreateStrategy(
        pb.CreateStrategyRequest(spec=sent), metadata=server.md()
    )
    assert created.spec == sent
    runtime = await stub(server).StartStrategy(
        pb.StartStrategyRequest(spec=make_spec(case)), metadata=server.md()
    )
    assert runtime.status == pb.STRATEGY_STATUS_SCHEDULED


async def test_missing_spec_and_missing_target(server: Harness) -> None:
    md = server.md()
    await rejects(
        server,
        lambda: stub(server).CreateStrategy(pb.CreateStrategyRequest(), metadata=md),
        "spec",
    )
    await rejects(
        server,
        lambda: stub(server).StartStrategy(pb.StartStrategyRequest(request_id="x"), metadata=md),
        "target",
    )
    # A spec that is set but empty is checked field by field.
    await rejects(
        server,
        lambda: stub(server).StartStrategy(
            pb.StartStrategyRequest(spec=pb.StrategySpec()), metadata=md
        ),
        "spec.symbol",
    )


async def test_stored_strategy_whose_buy_time_passed(server: Harness) -> None:
    """Starting it is FAILED_PRECONDITION; replays of earlier calls still return their
    first result, though a fresh call would now be refused."""
    md = server.md()
    buy = datetime.now(UTC) + timedelta(seconds=1)
    soon = pb.StrategySpec(
        symbol="SBIN", quantity=1, buy_time=ts(buy), sell_time=ts(buy + HOUR), stop_loss="90"
    )
    stored = await stub(server).CreateStrategy(
        pb.CreateStrategyRequest(spec=soon, request_id="create-soon"), metadata=md
    )
    other = await stub(server).CreateStrategy(pb.CreateStrategyRequest(spec=soon), metadata=md)
    started = await stub(server).StartStrategy(
        pb.StartStrategyRequest(strategy_id=other.id, request_id="start-soon"), metadata=md
    )
    await asyncio.sleep(max(0.0, (buy - datetime.now(UTC)).total_seconds()) + 0.1)

    before = await stub(server).GetStrategy(
        pb.GetStrategyRequest(strategy_id=stored.id), metadata=md
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(server).StartStrategy(
            pb.StartStrategyRequest(strategy_id=stored.id), metadata=md
        )
    assert rpc_code(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "spec.buy_time" in (err.value.details() or "")
    after = await stub(server).GetStrategy(
        pb.GetStrategyRequest(strategy_id=stored.id), metadata=md
    )
    assert after == before
    assert not await server.redis.exists(f"runtime:{{{stored.id}}}")

    replayed_create = await stub(server).CreateStrategy(
        pb.CreateStrategyRequest(spec=soon, request_id="create-soon"), metadata=md
    )
    assert replayed_create == stored
    replayed_start = await stub(server).StartStrategy(
        pb.StartStrategyRequest(strategy_id=other.id, request_id="start-soon"), metadata=md
    )
    assert replayed_start == started
    # The same spec in a new request is refused: its buy_time is gone. (No full snapshot
    # here: the started strategy's BUY may be executing in the background.)
    ids = await list_ids(server)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(server).CreateStrategy(pb.CreateStrategyRequest(spec=soon), metadata=md)
    assert rpc_code(err.value) == INVALID
    assert (err.value.details() or "").startswith("spec.buy_time: ")
    assert await list_ids(server) == ids


# --- request_id ------------------------------------------------------------------------


async def test_request_id_longer_than_64_is_rejected(server: Harness) -> None:
    md = server.md()
    stored = await stub(server).CreateStrategy(
        pb.CreateStrategyRequest(spec=make_spec()), metadata=md
    )
    for rid in ("r" * 65, "\u00e9" * 65):
        calls: list[Callable[[], Awaitable[object]]] = [
            partial(
                stub(server).CreateStrategy,
                pb.CreateStrategyRequest(spec=make_spec(), request_id=rid),
                metadata=md,
            ),
            partial(
                stub(server).StartStrategy,
                pb.StartStrategyRequest(spec=make_spec(), request_id=rid),
                metadata=md,
            ),
            partial(
                stub(server).StartStrategy,
                pb.StartStrategyRequest(strategy_id=stored.id, request_id=rid),
                metadata=md,
            ),
        ]
        for call in calls:
            await rejects(server, call, "request_id")
    for rid in ("r" * 64, "\u00e9" * 64):
        created = await stub(server).CreateStrategy(
            pb.CreateStrategyRequest(spec=make_spec(), request_id=rid), metadata=md
        )
        assert created.id


async def test_a_rejected_request_does_not_use_up_its_request_id(server: Harness) -> None:
    md = server.md()
    await rejects(
        server,
        lambda: stub(server).CreateStrategy(
            pb.CreateStrategyRequest(spec=make_spec({"quantity": 0}), request_id="rid"),
            metadata=md,
        ),
        "spec.quantity",
    )
    created = await stub(server).CreateStrategy(
        pb.CreateStrategyRequest(spec=make_spec(), request_id="rid"), metadata=md
    )
    assert created.spec.quantity == 10


# --- idempotency -----------------------------------------------------------------------


async def list_ids(server: Harness) -> list[str]:
    listed = await stub(server).ListStrategies(
        pb.ListStrategiesRequest(page_size=1000), metadata=server.md()
    )
    return [s.id for s in listed.strategies]


async def test_create_with_a_repeated_request_id(server: Harness) -> None:
    md = server.md()
    body = make_spec()
    first = await stub(server).CreateStrategy(
        pb.CreateStrategyRequest(spec=body, request_id="rid-1"), metadata=md
    )
    again = await stub(server).CreateStrategy(
        pb.CreateStrategyRequest(spec=body, request_id="rid-1"), metadata=md
    )
    assert again == first
    assert await list_ids(server) == [first.id]

    different = pb.StrategySpec()
    different.CopyFrom(body)
    different.quantity = 11
    await rejects(
        server,
        lambda: stub(server).CreateStrategy(
            pb.CreateStrategyRequest(spec=different, request_id="rid-1"), metadata=md
        ),
        "request_id",
    )
    # Start with the same body is a different request, so the id is taken.
    await rejects(
        server,
        lambda: stub(server).StartStrategy(
            pb.StartStrategyRequest(spec=body, request_id="rid-1"), metadata=md
        ),
        "request_id",
    )


async def test_start_with_spec_and_a_repeated_request_id(server: Harness) -> None:
    md = server.md()
    body = make_spec({"symbol": "TCS"})
    first = await stub(server).StartStrategy(
        pb.StartStrategyRequest(spec=body, request_id="rid-2"), metadata=md
    )
    again = await stub(server).StartStrategy(
        pb.StartStrategyRequest(spec=body, request_id="rid-2"), metadata=md
    )
    assert again == first
    assert await list_ids(server) == [first.strategy_id]
    assert await server.redis.smembers("symbol:{TCS}:strategies") == {first.strategy_id}


async def test_start_stored_with_a_repeated_request_id(server: Harness) -> None:
    md = server.md()
    created = await stub(server).CreateStrategy(
        pb.CreateStrategyRequest(spec=make_spec()), metadata=md
    )
    request = pb.StartStrategyRequest(strategy_id=created.id, request_id="rid-3")
    first = await stub(server).StartStrategy(request, metadata=md)
    again = await stub(server).StartStrategy(request, metadata=md)
    assert again == first
    # Without the request_id, it is a second start of a started strategy.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(server).StartStrategy(
            pb.StartStrategyRequest(strategy_id=created.id), metadata=md
        )
    assert rpc_code(err.value) == grpc.StatusCode.FAILED_PRECONDITION


async def test_concurrent_creates_with_one_request_id_make_one_strategy(server: Harness) -> None:
    md = server.md()
    body = make_spec()
    results = await asyncio.gather(
        *(
            stub(server).CreateStrategy(
                pb.CreateStrategyRequest(spec=body, request_id="rid-race"), metadata=md
            )
            for _ in range(10)
        )
    )
    assert all(r == results[0] for r in results)
    assert await list_ids(server) == [results[0].id]


async def test_concurrent_starts_with_one_request_id_make_one_strategy(server: Harness) -> None:
    md = server.md()
    body = make_spec({"symbol": "WIPRO"})
    results = await asyncio.gather(
        *(
            stub(server).StartStrategy(
                pb.StartStrategyRequest(spec=body, request_id="rid-race"), metadata=md
            )
            for _ in range(10)
        )
    )
    assert all(r == results[0] for r in results)
    assert await list_ids(server) == [results[0].strategy_id]
    assert await server.redis.smembers("symbol:{WIPRO}:strategies") == {results[0].strategy_id}


# --- ListStrategies --------------------------------------------------------------------


async def create_many(server: Harness, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        created = await stub(server).CreateStrategy(
            pb.CreateStrategyRequest(spec=make_spec()), metadata=server.md()
        )
        ids.append(created.id)
    return ids


async def test_pagination_visits_every_strategy_once_in_order(server: Harness) -> None:
    ids = await create_many(server, 5)
    pages: list[list[str]] = []
    page_token = ""
    while True:
        page = await stub(server).ListStrategies(
            pb.ListStrategiesRequest(page_size=2, page_token=page_token), metadata=server.md()
        )
        pages.append([s.id for s in page.strategies])
        page_token = page.next_page_token
        if not page_token:
            break
        assert len(pages) < 10
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == sorted(ids)

    everything = await stub(server).ListStrategies(
        pb.ListStrategiesRequest(page_size=2**31 - 1), metadata=server.md()
    )
    assert [s.id for s in everything.strategies] == sorted(ids)
    assert everything.next_page_token == ""


async def test_pagination_with_a_status_filter(server: Harness) -> None:
    ids = await create_many(server, 5)
    for strategy_id in ids[:3]:
        await stub(server).StartStrategy(
            pb.StartStrategyRequest(strategy_id=strategy_id), metadata=server.md()
        )
    first = await stub(server).ListStrategies(
        pb.ListStrategiesRequest(page_size=2, status=pb.STRATEGY_STATUS_SCHEDULED),
        metadata=server.md(),
    )
    second = await stub(server).ListStrategies(
        pb.ListStrategiesRequest(
            page_size=2, status=pb.STRATEGY_STATUS_SCHEDULED, page_token=first.next_page_token
        ),
        metadata=server.md(),
    )
    assert [s.id for s in (*first.strategies, *second.strategies)] == sorted(ids[:3])
    assert second.next_page_token == ""
    created = await stub(server).ListStrategies(
        pb.ListStrategiesRequest(status=pb.STRATEGY_STATUS_CREATED), metadata=server.md()
    )
    assert [s.id for s in created.strategies] == sorted(ids[3:])


async def test_list_arguments_are_checked(server: Harness) -> None:
    await create_many(server, 3)
    md = server.md()

    async def list_with(**kwargs: Any) -> object:
        return await stub(server).ListStrategies(pb.ListStrategiesRequest(**kwargs), metadata=md)

    for size in (-1, -(2**31)):
        await rejects(server, partial(list_with, page_size=size), "page_size")
    for status in (99, -1, 2**31 - 1):
        await rejects(server, partial(list_with, status=status), "status")

    first = await stub(server).ListStrategies(pb.ListStrategiesRequest(page_size=1), metadata=md)
    token = first.next_page_token
    assert token
    for status in (pb.STRATEGY_STATUS_CREATED, pb.STRATEGY_STATUS_STOPPED):
        await rejects(server, partial(list_with, page_token=token, status=status), "page_token")
    filtered = await stub(server).ListStrategies(
        pb.ListStrategiesRequest(page_size=1, status=pb.STRATEGY_STATUS_CREATED), metadata=md
    )
    await rejects(server, lambda: list_with(page_token=filtered.next_page_token), "page_token")


@pytest.mark.parametrize(
    "page_token",
    [
        "garbage",
        "!!!",
        "\x00",
        "\u00e9t\u00e9",
        b64("[]"),
        b64('"text"'),
        b64("{}"),
        b64('{"after": "x", "status": ""}'),
        b64('{"after": "stg_' + "0" * 32 + '"}'),
        b64("[" * 100_000),
        base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
    ],
    ids=lambda t: t[:12],
)
async def test_garbage_page_token_is_rejected(server: Harness, page_token: str) -> None:
    await rejects(
        server,
        lambda: stub(server).ListStrategies(
            pb.ListStrategiesRequest(page_token=page_token), metadata=server.md()
        ),
        "page_token",
    )


# --- stream positions ------------------------------------------------------------------


@pytest.mark.parametrize("stream", ["StreamRuntime", "StreamOrders"])
@pytest.mark.parametrize(
    "after",
    [
        "abc",
        "1",
        "1-",
        "-1",
        "x-1",
        "1-2-3",
        "\u00b2-0",
        "\u0661-0",
        "9" * 21 + "-0",
        "0-" + str(2**64),
        str(2**64) + "-0",
    ],
)
async def test_bad_after_event_id_is_rejected(server: Harness, stream: str, after: str) -> None:
    await rejects(server, lambda: first_event(open_stream(server, stream, after)), "after_event_id")


@pytest.mark.parametrize("stream", ["StreamRuntime", "StreamOrders"])
async def test_after_event_id_ahead_of_the_stream_is_out_of_range(
    server: Harness, stream: str
) -> None:
    await rejects(
        server,
        lambda: first_event(open_stream(server, stream, "99999999999999-0")),
        "after_event_id",
        grpc.StatusCode.OUT_OF_RANGE,
    )


def open_stream(
    server: Harness, stream: str, after: str, strategy_id: str = ""
) -> grpc.aio.UnaryStreamCall[Any, Any]:
    if stream == "StreamRuntime":
        return stub(server).StreamRuntime(
            pb.StreamRuntimeRequest(strategy_id=strategy_id, after_event_id=after),
            metadata=server.md(),
            timeout=5,
        )
    return stub(server).StreamOrders(
        pb.StreamOrdersRequest(strategy_id=strategy_id, after_event_id=after),
        metadata=server.md(),
        timeout=5,
    )


# --- the wire --------------------------------------------------------------------------


async def test_messages_over_one_mib_are_resource_exhausted(server: Harness) -> None:
    md = server.md()
    huge = "r" * (2 * MIB)
    await rejects(
        server,
        lambda: stub(server).CreateStrategy(
            pb.CreateStrategyRequest(spec=make_spec(), request_id=huge), metadata=md
        ),
        None,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    await rejects(
        server,
        lambda: first_event(open_stream(server, "StreamRuntime", "", strategy_id=huge)),
        None,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    # Just under the limit, the message arrives and the field rule speaks.
    await rejects(
        server,
        lambda: stub(server).CreateStrategy(
            pb.CreateStrategyRequest(spec=make_spec(), request_id="r" * (MIB - 1024)),
            metadata=md,
        ),
        "request_id",
    )


@pytest.mark.parametrize(
    "raw",
    [b"\x0a\x02\xff\xfe", b"\xff\xff\xff", b"\x0a\x05ab"],
    ids=["bad-utf8", "corrupt", "truncated"],
)
@pytest.mark.parametrize("method", ["GetStrategy", "CreateStrategy", "StreamRuntime"])
async def test_undecodable_request_bytes(server: Harness, method: str, raw: bytes) -> None:
    """Bytes that are no valid message: INVALID_ARGUMENT, after authentication."""

    async def send(metadata: tuple[tuple[str, str], ...]) -> object:
        if method.startswith("Stream"):
            call = server.channel.unary_stream(SERVICE + method, None, None)(raw, metadata=metadata)
            return await first_event(call)
        return await server.channel.unary_unary(SERVICE + method, None, None)(
            raw, metadata=metadata
        )

    await rejects(server, lambda: send(server.md()), "request")
    await rejects(server, lambda: send(()), None, grpc.StatusCode.UNAUTHENTICATED)


# --- fuzzing ---------------------------------------------------------------------------

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# A stream that is valid just waits for events; the short deadline ends it.
ALLOWED_STREAM = ALLOWED | {grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
STREAM_DEADLINE_S = 0.15

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
NOW = int(time.time())
SECONDS = st.one_of(
    INT64,
    st.integers(NOW - 86_400, NOW + 9 * 86_400),
    st.integers(TS_MIN - 2, TS_MIN + 2),
    st.integers(TS_MAX - 2, TS_MAX + 2),
)
NANOS = st.one_of(INT32, st.integers(0, 999_999_999))
TIMESTAMPS = st.one_of(st.none(), st.builds(Timestamp, seconds=SECONDS, nanos=NANOS))
REQUEST_IDS = st.one_of(st.sampled_from(["", "fuzz-1", "fuzz-2", "x" * 65]), TEXT)
STRATEGY_IDS = st.one_of(st.just(""), TEXT, st.from_regex(r"stg_[0-9a-f]{32}", fullmatch=True))


@st.composite
def times(draw: st.DrawFn) -> tuple[Timestamp | None, Timestamp | None]:
    """Mostly independent times; often a sell_time near the buy_time, to reach the store."""
    buy = draw(TIMESTAMPS)
    if buy is not None and draw(st.booleans()):
        offset = draw(st.integers(-10, 8 * 86_400))
        seconds = min(2**63 - 1, max(-(2**63), buy.seconds + offset))  # stays an int64
        return buy, Timestamp(seconds=seconds, nanos=draw(NANOS))
    return buy, draw(TIMESTAMPS)


@st.composite
def specs(draw: st.DrawFn) -> pb.StrategySpec | None:
    if draw(st.integers(0, 20)) == 0:
        return None
    buy, sell = draw(times())
    message = pb.StrategySpec(
        symbol=draw(st.one_of(TEXT, st.from_regex(SYMBOL_PATTERN, fullmatch=True))),
        quantity=draw(st.one_of(INT64, st.integers(-2, 10**9 + 2))),
        stop_loss=draw(
            st.one_of(
                TEXT,
                st.decimals().map(str),
                st.from_regex(r"[0-9]{1,12}(\.[0-9]{1,10})?", fullmatch=True),
            )
        ),
    )
    if buy is not None:
        message.buy_time.CopyFrom(buy)
    if sell is not None:
        message.sell_time.CopyFrom(sell)
    return message


def assert_allowed(exc: grpc.RpcError, allowed: set[grpc.StatusCode]) -> None:
    code = rpc_code(exc)
    assert code in allowed, (code, exc.details() if isinstance(exc, grpc.Call) else "")


def assert_valid_spec(spec: pb.StrategySpec) -> None:
    """What the server accepted obeys every rule."""
    assert re.fullmatch(SYMBOL_PATTERN, spec.symbol), spec.symbol
    assert 1 <= spec.quantity <= 10**9
    buy, sell = spec.buy_time.ToDatetime(UTC), spec.sell_time.ToDatetime(UTC)
    assert buy < sell <= buy + WEEK
    stop_loss = Decimal(spec.stop_loss)
    assert stop_loss.is_finite() and stop_loss > 0
    assert stop_loss == round(stop_loss, 8)


class SyncClient:
    """A blocking channel for hypothesis, which runs in a thread beside the server's loop."""

    def __init__(self, server: Harness) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = strategy_pb2_grpc.StrategyServiceStub(self.channel)
        self.md = server.md()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.channel.close()


async def seed_ids(server: Harness) -> list[str]:
    """One stored and one started strategy, so fuzzed ids can hit real rows."""
    created = await stub(server).CreateStrategy(
        pb.CreateStrategyRequest(spec=make_spec()), metadata=server.md()
    )
    started = await stub(server).StartStrategy(
        pb.StartStrategyRequest(spec=make_spec()), metadata=server.md()
    )
    return [created.id, started.strategy_id]


async def test_fuzz_create_and_start(server: Harness) -> None:
    known = await seed_ids(server)

    def fuzz() -> None:
        with SyncClient(server) as client:

            @FUZZ
            @given(
                kind=st.sampled_from(["create", "start-spec", "start-id"]),
                spec=specs(),
                request_id=REQUEST_IDS,
                strategy_id=st.one_of(STRATEGY_IDS, st.sampled_from(known)),
            )
            def run(
                kind: str, spec: pb.StrategySpec | None, request_id: str, strategy_id: str
            ) -> None:
                try:
                    if kind == "create":
                        created = client.stub.CreateStrategy(
                            pb.CreateStrategyRequest(spec=spec, request_id=request_id),
                            metadata=client.md,
                            timeout=10,
                        )
                        assert_valid_spec(created.spec)
                    elif kind == "start-spec":
                        client.stub.StartStrategy(
                            pb.StartStrategyRequest(spec=spec, request_id=request_id),
                            metadata=client.md,
                            timeout=10,
                        )
                    else:
                        client.stub.StartStrategy(
                            pb.StartStrategyRequest(strategy_id=strategy_id, request_id=request_id),
                            metadata=client.md,
                            timeout=10,
                        )
                except grpc.RpcError as exc:
                    assert_allowed(exc, ALLOWED)

            run()

    await asyncio.to_thread(fuzz)


async def test_fuzz_list_strategies(server: Harness) -> None:
    await seed_ids(server)
    tokens = st.one_of(
        TEXT,
        st.builds(
            lambda after, status: b64(json.dumps({"after": after, "status": status})),
            STRATEGY_IDS,
            st.one_of(st.just(""), TEXT, st.sampled_from(["CREATED", "SCHEDULED"])),
        ),
        st.binary(max_size=64).map(lambda raw: base64.urlsafe_b64encode(raw).decode()),
    )

    def fuzz() -> None:
        with SyncClient(server) as client:

            @FUZZ
            @given(
                page_size=st.one_of(INT32, st.integers(-2, 3)),
                page_token=tokens,
                status=st.one_of(INT32, st.integers(-1, 8)),
            )
            def run(page_size: int, page_token: str, status: int) -> None:
                request = pb.ListStrategiesRequest(
                    page_size=page_size,
                    page_token=page_token,
                    status=pb.StrategyStatus.ValueType(status),
                )
                try:
                    client.stub.ListStrategies(request, metadata=client.md, timeout=10)
                except grpc.RpcError as exc:
                    assert_allowed(exc, ALLOWED)

            run()

    await asyncio.to_thread(fuzz)


async def test_fuzz_strategy_ids(server: Harness) -> None:
    known = await seed_ids(server)

    def fuzz() -> None:
        with SyncClient(server) as client:
            calls: dict[str, Callable[[str], object]] = {
                "get": lambda sid: client.stub.GetStrategy(
                    pb.GetStrategyRequest(strategy_id=sid), metadata=client.md, timeout=10
                ),
                "stop": lambda sid: client.stub.StopStrategy(
                    pb.StopStrategyRequest(strategy_id=sid), metadata=client.md, timeout=10
                ),
                "runtime": lambda sid: client.stub.GetRuntime(
                    pb.GetRuntimeRequest(strategy_id=sid), metadata=client.md, timeout=10
                ),
                "orders": lambda sid: client.stub.ListOrders(
                    pb.ListOrdersRequest(strategy_id=sid), metadata=client.md, timeout=10
                ),
            }

            @FUZZ
            @given(
                which=st.sampled_from(sorted(calls)),
                strategy_id=st.one_of(STRATEGY_IDS, st.sampled_from(known)),
            )
            def run(which: str, strategy_id: str) -> None:
                try:
                    calls[which](strategy_id)
                except grpc.RpcError as exc:
                    assert_allowed(exc, ALLOWED)

            run()

    await asyncio.to_thread(fuzz)


async def test_fuzz_streams(server: Harness) -> None:
    known = await seed_ids(server)
    after_ids = st.one_of(
        st.just(""),
        TEXT,
        st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 2**65), st.integers(0, 2**65)),
        st.sampled_from(["0-0", "0-1", "1-0"]),
    )

    def fuzz() -> None:
        with SyncClient(server) as client:

            @FUZZ
            @given(
                orders=st.booleans(),
                strategy_id=st.one_of(TEXT, st.sampled_from(["", *known])),
                after=after_ids,
            )
            def run(orders: bool, strategy_id: str, after: str) -> None:
                call: Any
                if orders:
                    call = client.stub.StreamOrders(
                        pb.StreamOrdersRequest(strategy_id=strategy_id, after_event_id=after),
                        metadata=client.md,
                        timeout=STREAM_DEADLINE_S,
                    )
                else:
                    call = client.stub.StreamRuntime(
                        pb.StreamRuntimeRequest(strategy_id=strategy_id, after_event_id=after),
                        metadata=client.md,
                        timeout=STREAM_DEADLINE_S,
                    )
                try:
                    for _ in call:
                        break
                except grpc.RpcError as exc:
                    assert_allowed(exc, ALLOWED_STREAM)
                finally:
                    call.cancel()

            run()

    await asyncio.to_thread(fuzz)


async def test_fuzz_raw_request_bytes(server: Harness) -> None:
    unary = [
        "CreateStrategy",
        "GetStrategy",
        "ListStrategies",
        "StartStrategy",
        "StopStrategy",
        "GetRuntime",
        "ListOrders",
    ]

    def fuzz() -> None:
        with SyncClient(server) as client:

            @FUZZ
            @given(
                method=st.sampled_from([*unary, "StreamRuntime", "StreamOrders"]),
                raw=st.binary(max_size=200),
            )
            def run(method: str, raw: bytes) -> None:
                try:
                    if method in unary:
                        client.channel.unary_unary(SERVICE + method, None, None)(
                            raw, metadata=client.md, timeout=10
                        )
                    else:
                        call: Any = client.channel.unary_stream(SERVICE + method, None, None)(
                            raw, metadata=client.md, timeout=STREAM_DEADLINE_S
                        )
                        try:
                            for _ in call:
                                break
                        finally:
                            call.cancel()
                except grpc.RpcError as exc:
                    assert_allowed(exc, ALLOWED_STREAM if method.startswith("Stream") else ALLOWED)

            run()

    await asyncio.to_thread(fuzz)
