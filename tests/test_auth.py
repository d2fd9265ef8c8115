"""The auth matrix and tenant isolation, for every RPC and both streams.

Bad credentials get UNAUTHENTICATED and change nothing; another tenant's strategy looks
exactly like one that does not exist; `algoplane-server token` mints a working token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import jwt
import pytest

from protos.algoplane.v1 import strategy_pb2 as pb
from tests.conftest import Harness
from tests.support import (
    PYTHON,
    SECRET,
    aio_stub,
    redis_dump,
    rpc_code,
    server_env,
    spec,
    token,
)

if TYPE_CHECKING:
    from protos.algoplane.v1.strategy_pb2_grpc import StrategyServiceAsyncStub

Metadata = tuple[tuple[str, str], ...]
UNKNOWN_ID = "stg_" + "0123456789abcdef" * 2
OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256"


def stub(server: Harness) -> StrategyServiceAsyncStub:
    return aio_stub(server.channel)


# --- hand-made tokens -------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    claims: dict[str, Any] = {"sub": "tenant-a", "iat": now, "exp": now + 3600}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def hand_token(header: dict[str, str], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT built without PyJWT, so no library refuses (or warns about) the odd ones."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if key is None:
        return signing_input + "."
    digest = hashlib.sha512 if header["alg"] == "HS512" else hashlib.sha256
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


def bearer(value: str) -> Metadata:
    return (("authorization", f"Bearer {value}"),)


BAD_CREDENTIALS: dict[str, Callable[[], Metadata]] = {
    "no-token": lambda: (),
    "expired": lambda: bearer(token("tenant-a", ttl=timedelta(minutes=-5))),
    "wrong-key": lambda: bearer(token("tenant-a", secret=OTHER_SECRET)),
    "alg-none": lambda: bearer(hand_token({"alg": "none", "typ": "JWT"}, _claims(), None)),
    "alg-none-signed": lambda: bearer(
        hand_token({"alg": "none", "typ": "JWT"}, _claims(), SECRET.encode())
    ),
    "alg-hs512": lambda: bearer(
        hand_token({"alg": "HS512", "typ": "JWT"}, _claims(), SECRET.encode())
    ),
    "no-exp": lambda: bearer(
        hand_token({"alg": "HS256", "typ": "JWT"}, _claims(exp=None), SECRET.encode())
    ),
    "no-sub": lambda: bearer(
        hand_token({"alg": "HS256", "typ": "JWT"}, _claims(sub=None), SECRET.encode())
    ),
    "basic-scheme": lambda: (("authorization", "Basic x"),),
    "bearer-alone": lambda: (("authorization", "Bearer"),),
    "no-scheme": lambda: (("authorization", token("tenant-a")),),
    "garbage": lambda: bearer("not.a.jwt"),
}


def test_hand_tokens_are_well_formed_apart_from_what_they_break() -> None:
    """The HS256 hand-made token is accepted by PyJWT, so the bad ones fail for one reason."""
    good = hand_token({"alg": "HS256", "typ": "JWT"}, _claims(), SECRET.encode())
    assert jwt.decode(good, SECRET, algorithms=["HS256"])["sub"] == "tenant-a"
    header = json.loads(base64.urlsafe_b64decode(bearer_value("alg-none").split(".")[0] + "=="))
    assert header == {"alg": "none", "typ": "JWT"}
    assert bearer_value("alg-none").endswith(".")


def bearer_value(case: str) -> str:
    return BAD_CREDENTIALS[case]()[0][1].removeprefix("Bearer ")


# --- calling every RPC the same way -------------------------------------------------------

# (stub, metadata, strategy_id) -> the first response, or AioRpcError.
Call = Callable[["StrategyServiceAsyncStub", Metadata, str], Awaitable[object]]


async def _first(call: grpc.aio.UnaryStreamCall[Any, Any]) -> object:
    """The stream's first message (or its error); a stream never hangs a test."""
    try:
        return await call.read()
    finally:
        call.cancel()


RPCS: dict[str, Call] = {
    "CreateStrategy": lambda s, md, _id: s.CreateStrategy(
        pb.CreateStrategyRequest(spec=spec(), request_id="probe"), metadata=md
    ),
    "GetStrategy": lambda s, md, sid: s.GetStrategy(
        pb.GetStrategyRequest(strategy_id=sid), metadata=md
    ),
    "ListStrategies": lambda s, md, _id: s.ListStrategies(pb.ListStrategiesRequest(), metadata=md),
    "StartStrategy": lambda s, md, sid: s.StartStrategy(
        pb.StartStrategyRequest(strategy_id=sid, request_id="probe"), metadata=md
    ),
    "StartStrategy(spec)": lambda s, md, _id: s.StartStrategy(
        pb.StartStrategyRequest(spec=spec()), metadata=md
    ),
    "StopStrategy": lambda s, md, sid: s.StopStrategy(
        pb.StopStrategyRequest(strategy_id=sid), metadata=md
    ),
    "GetRuntime": lambda s, md, sid: s.GetRuntime(
        pb.GetRuntimeRequest(strategy_id=sid), metadata=md
    ),
    "ListOrders": lambda s, md, sid: s.ListOrders(
        pb.ListOrdersRequest(strategy_id=sid), metadata=md
    ),
    "StreamRuntime": lambda s, md, sid: _first(
        s.StreamRuntime(pb.StreamRuntimeRequest(strategy_id=sid), metadata=md, timeout=5)
    ),
    "StreamOrders": lambda s, md, sid: _first(
        s.StreamOrders(pb.StreamOrdersRequest(strategy_id=sid), metadata=md, timeout=5)
    ),
}
# The RPCs that address one strategy (the rest create or list).
BY_ID = [
    "GetStrategy",
    "StartStrategy",
    "StopStrategy",
    "GetRuntime",
    "ListOrders",
    "StreamRuntime",
    "StreamOrders",
]


@dataclass
class TenantA:
    """tenant-a's strategies: one started (hot in Redis), one only stored."""

    scheduled: str
    created: str


async def seed_tenant_a(server: Harness) -> TenantA:
    started = await stub(server).StartStrategy(
        pb.StartStrategyRequest(spec=spec(symbol="INFY")), metadata=server.md("tenant-a")
    )
    created = await stub(server).CreateStrategy(
        pb.CreateStrategyRequest(spec=spec(symbol="TCS")), metadata=server.md("tenant-a")
    )
    return TenantA(scheduled=started.strategy_id, created=created.id)


async def snapshot(server: Harness) -> tuple[object, ...]:
    """Everything a call could have written: both tenants' strategies and all of Redis."""
    listed = []
    for tenant in ("tenant-a", "tenant-b"):
        page = await stub(server).ListStrategies(
            pb.ListStrategiesRequest(page_size=1000), metadata=server.md(tenant)
        )
        listed.append(list(page.strategies))
    return (*listed, await redis_dump(server.redis))


def target_for(rpc: str, seeded: TenantA) -> str:
    """A strategy the call would change or reveal if it ran: Start hits the stored one."""
    return seeded.created if rpc == "StartStrategy" else seeded.scheduled


# --- UNAUTHENTICATED ---------------------------------------------------------------------


async def test_bad_credentials_on_an_empty_server_write_nothing(server: Harness) -> None:
    startup_keys = await redis_dump(server.redis)  # whatever the server keeps from the start
    for rpc, call in RPCS.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(stub(server), BAD_CREDENTIALS["alg-none"](), UNKNOWN_ID)
        assert rpc_code(err.value) == grpc.StatusCode.UNAUTHENTICATED, rpc
    listed = await stub(server).ListStrategies(pb.ListStrategiesRequest(), metadata=server.md())
    assert list(listed.strategies) == []
    assert await redis_dump(server.redis) == startup_keys
    assert not [k for k in startup_keys if "tenant" in k or k.startswith(("strategy:", "runtime:"))]


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS))
@pytest.mark.parametrize("rpc", list(RPCS))
async def test_bad_credentials_are_unauthenticated(
    server: Harness, rpc: str, credentials: str
) -> None:
    seeded = await seed_tenant_a(server)
    before = await snapshot(server)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await RPCS[rpc](stub(server), BAD_CREDENTIALS[credentials](), target_for(rpc, seeded))

    assert rpc_code(err.value) == grpc.StatusCode.UNAUTHENTICATED
    assert SECRET not in (err.value.details() or "")
    assert await snapshot(server) == before


# --- tenant isolation --------------------------------------------------------------------


@pytest.mark.parametrize("rpc", BY_ID)
async def test_other_tenants_strategy_is_exactly_not_found(server: Harness, rpc: str) -> None:
    seeded = await seed_tenant_a(server)
    before = await snapshot(server)
    targets = {
        "tenant-a's started strategy": seeded.scheduled,
        "tenant-a's stored strategy": seeded.created,
        "unknown well-formed id": UNKNOWN_ID,
        "malformed id": "nope",
        "upper-case hex": seeded.scheduled.upper(),
    }

    messages = {}
    for label, strategy_id in targets.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await RPCS[rpc](stub(server), server.md("tenant-b"), strategy_id)
        assert rpc_code(err.value) == grpc.StatusCode.NOT_FOUND, label
        messages[label] = (err.value.details() or "").replace(strategy_id, "<id>")

    assert len(set(messages.values())) == 1, messages
    assert "tenant" not in messages["tenant-a's started strategy"]
    assert await snapshot(server) == before
    # And tenant-a still sees its own.
    for strategy_id in (seeded.scheduled, seeded.created):
        await RPCS["GetRuntime"](stub(server), server.md("tenant-a"), strategy_id)


async def test_list_strategies_shows_only_the_callers(server: Harness) -> None:
    seeded = await seed_tenant_a(server)
    own = await stub(server).CreateStrategy(
        pb.CreateStrategyRequest(spec=spec(symbol="WIPRO")), metadata=server.md("tenant-b")
    )

    for status in (pb.STRATEGY_STATUS_UNSPECIFIED, pb.STRATEGY_STATUS_SCHEDULED):
        b = await stub(server).ListStrategies(
            pb.ListStrategiesRequest(status=status), metadata=server.md("tenant-b")
        )
        expected = [own.id] if status == pb.STRATEGY_STATUS_UNSPECIFIED else []
        assert [s.id for s in b.strategies] == expected
    a = await stub(server).ListStrategies(pb.ListStrategiesRequest(), metadata=server.md())
    assert sorted(s.id for s in a.strategies) == sorted([seeded.scheduled, seeded.created])
    orders = await stub(server).ListOrders(pb.ListOrdersRequest(), metadata=server.md("tenant-b"))
    assert list(orders.orders) == []


async def test_request_ids_are_per_tenant(server: Harness) -> None:
    a = await stub(server).CreateStrategy(
        pb.CreateStrategyRequest(spec=spec(symbol="INFY"), request_id="shared"),
        metadata=server.md("tenant-a"),
    )
    b = await stub(server).CreateStrategy(
        pb.CreateStrategyRequest(spec=spec(symbol="TCS"), request_id="shared"),
        metadata=server.md("tenant-b"),
    )
    assert b.id != a.id
    assert b.spec.symbol == "TCS"


async def test_stream_of_all_strategies_carries_only_the_callers_events(server: Harness) -> None:
    b_md = server.md("tenant-b")
    call = stub(server).StreamRuntime(pb.StreamRuntimeRequest(), metadata=b_md, timeout=10)
    try:
        # tenant-b's first event proves the stream is live before tenant-a acts.
        first = await stub(server).StartStrategy(
            pb.StartStrategyRequest(spec=spec(symbol="WIPRO")), metadata=b_md
        )
        event = await call.read()
        assert isinstance(event, pb.RuntimeEvent)
        assert event.runtime.strategy_id == first.strategy_id

        foreign = await stub(server).StartStrategy(
            pb.StartStrategyRequest(spec=spec(symbol="INFY")), metadata=server.md("tenant-a")
        )
        await stub(server).StopStrategy(
            pb.StopStrategyRequest(strategy_id=foreign.strategy_id),
            metadata=server.md("tenant-a"),
        )
        second = await stub(server).StartStrategy(
            pb.StartStrategyRequest(spec=spec(symbol="TCS")), metadata=b_md
        )
        event = await call.read()
        assert isinstance(event, pb.RuntimeEvent)
        assert event.runtime.strategy_id == second.strategy_id
    finally:
        call.cancel()

    # Replaying tenant-b's stream from its start shows its two events and nothing else.
    replay = stub(server).StreamRuntime(
        pb.StreamRuntimeRequest(after_event_id="0-0"), metadata=b_md, timeout=10
    )
    try:
        seen = []
        for _ in range(2):
            event = await replay.read()
            assert isinstance(event, pb.RuntimeEvent)
            seen.append(event.runtime.strategy_id)
    finally:
        replay.cancel()
    assert seen == [first.strategy_id, second.strategy_id]


# --- algoplane-server token --------------------------------------------------------------


def _token_command(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "server", "token", *args],
        env=server_env(ALGOPLANE_JWT_SECRET=SECRET, ALGOPLANE_DATA_DIR=str(tmp_path / "data")),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_token_command_prints_a_working_token(server: Harness, tmp_path: Path) -> None:
    done = await asyncio.to_thread(_token_command, tmp_path, "--sub", "tenant-a", "--ttl", "1h")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    minted = lines[0]
    claims = jwt.decode(minted, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "tenant-a"
    assert claims["exp"] - claims["iat"] == 3600

    md = bearer(minted)
    created = await stub(server).CreateStrategy(pb.CreateStrategyRequest(spec=spec()), metadata=md)
    listed = await stub(server).ListStrategies(pb.ListStrategiesRequest(), metadata=server.md())
    assert [s.id for s in listed.strategies] == [created.id]


@pytest.mark.parametrize("ttl", ["1y", "0h", "--ttl=-1h", "1.5h"])
def test_token_command_rejects_a_bad_ttl_in_one_line(tmp_path: Path, ttl: str) -> None:
    args = [ttl] if ttl.startswith("--") else ["--ttl", ttl]
    done = _token_command(tmp_path, "--sub", "tenant-a", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "ttl" in lines[0]


async def test_a_token_verified_before_still_expires_on_time() -> None:
    """Verified tokens are remembered (no signature check per call), never past their exp."""
    from server.api.auth import TokenVerifier, mint_token
    from server.errors import Unauthenticated

    verifier = TokenVerifier(SECRET)
    now = datetime.now(UTC)
    short = mint_token(SECRET, "tenant-a", timedelta(seconds=1), now.replace(microsecond=0))
    assert verifier.tenant_of(f"Bearer {short}") == "tenant-a"
    assert verifier.tenant_of(f"Bearer {short}") == "tenant-a"  # remembered
    forged = mint_token("x" * 40, "tenant-a", timedelta(hours=1), now)
    for _ in range(2):  # a bad signature is checked every time, never remembered
        with pytest.raises(Unauthenticated, match="invalid token"):
            verifier.tenant_of(f"Bearer {forged}")
    await asyncio.sleep(max(0.0, 1.05 - (datetime.now(UTC) - now).total_seconds()))
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.tenant_of(f"Bearer {short}")
