"""The simulated feed (scripts/feedsim.py): a real websockets server and real clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK

from scripts.feedsim import FeedSimulator, load_csv, parse_symbols
from tests.support import PYTHON, server_env

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 3.0


@contextlib.asynccontextmanager
async def running(sim: FeedSimulator) -> AsyncIterator[str]:
    url = await sim.start()
    try:
        yield url
    finally:
        await sim.stop()


async def recv(ws: ClientConnection) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))


def ticks_of(message: Any) -> list[dict[str, Any]]:
    return message if isinstance(message, list) else [message]


async def until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def subscribe(ws: ClientConnection, sim: FeedSimulator, message: dict[str, Any]) -> None:
    """Sends a subscribe and waits until the simulator has applied it."""
    seen = len(sim.subscribe_messages)
    await ws.send(json.dumps(message))
    await until(lambda: len(sim.subscribe_messages) > seen)


async def ticks_until(ws: ClientConnection, symbol: str, price: str) -> list[dict[str, Any]]:
    """Every tick received up to and including the marker tick (symbol, price)."""
    seen: list[dict[str, Any]] = []
    while not seen or (seen[-1]["symbol"], seen[-1]["price"]) != (symbol, price):
        seen.extend(ticks_of(await recv(ws)))
    return seen


def sim_of(rate_hz: float = 0.0, **kwargs: Any) -> FeedSimulator:
    symbols = {"SBIN": Decimal("100"), "INFY": Decimal("1500")}
    return FeedSimulator(symbols=symbols, rate_hz=rate_hz, seed=7, **kwargs)


async def test_a_client_that_never_subscribed_gets_every_symbol_in_one_array() -> None:
    sim = sim_of(rate_hz=50)
    async with running(sim) as url, connect(url) as ws:
        assert url == f"ws://127.0.0.1:{sim.port}"
        for _ in range(3):
            message = await recv(ws)
            assert isinstance(message, list)
            assert sorted(t["symbol"] for t in message) == ["INFY", "SBIN"]
            for tick in message:
                price = Decimal(tick["price"])
                assert price > 0 and price == price.quantize(Decimal("0.01"))
                assert abs(tick["ts"] - time.time() * 1000) < 5000
        assert sim.subscriptions == [None]
        assert sim.connections == 1


async def test_subscribe_filters_and_a_later_subscribe_replaces_the_set() -> None:
    sim = sim_of(rate_hz=50)
    async with running(sim) as url, connect(url) as ws:
        await subscribe(ws, sim, {"action": "subscribe", "symbols": ["SBIN"]})
        assert sim.subscriptions == [frozenset({"SBIN"})]
        await sim.push("SBIN", "111.11")  # everything after this marker is filtered
        await ticks_until(ws, "SBIN", "111.11")
        for _ in range(5):
            message = await recv(ws)
            assert isinstance(message, dict)  # one symbol ticks: an object, not an array
            assert message["symbol"] == "SBIN"

        await subscribe(ws, sim, {"action": "subscribe", "symbols": ["INFY"]})
        assert sim.subscriptions == [frozenset({"INFY"})]
        await sim.push("INFY", "1234.56")
        await ticks_until(ws, "INFY", "1234.56")
        for _ in range(5):
            assert ticks_of(await recv(ws))[0]["symbol"] == "INFY"
        assert [m["symbols"] for m in sim.subscribe_messages] == [["SBIN"], ["INFY"]]


async def test_an_unknown_symbol_joins_the_walk_at_100() -> None:
    sim = FeedSimulator(symbols={"SBIN": Decimal("100")}, rate_hz=50, volatility=0.0)
    async with running(sim) as url, connect(url) as ws:
        await subscribe(ws, sim, {"action": "subscribe", "symbols": ["NEWCO"]})
        assert sim.prices["NEWCO"] == Decimal("100.00")
        for _ in range(3):
            tick = await recv(ws)
            assert (tick["symbol"], tick["price"]) == ("NEWCO", "100.00")


async def test_push_sends_an_exact_tick_to_subscribers_only_and_push_raw_to_all() -> None:
    sim = sim_of()
    async with running(sim) as url, connect(url) as sbin, connect(url) as infy:
        await subscribe(sbin, sim, {"action": "subscribe", "symbols": ["SBIN"]})
        await subscribe(infy, sim, {"action": "subscribe", "symbols": ["INFY"]})
        await sim.push("SBIN", Decimal("95.5"))
        await sim.push("INFY", "1499.99")
        message = await recv(sbin)
        assert message["symbol"] == "SBIN" and message["price"] == "95.5"
        assert isinstance(message["ts"], int)
        assert (await recv(infy))["price"] == "1499.99"  # it never saw the SBIN tick
        assert sim.prices["SBIN"] == Decimal("95.5")

        await sim.push_raw('{"symbol": "SBIN", "price": ')
        for ws in (sbin, infy):
            assert await asyncio.wait_for(ws.recv(), TIMEOUT_S) == '{"symbol": "SBIN", "price": '
        with pytest.raises(ValueError):
            await sim.push("SBIN", "-1")
        with pytest.raises(ValueError):
            await sim.push("SBIN", "NaN")


async def test_bad_client_messages_are_ignored_and_the_connection_stays() -> None:
    sim = sim_of()
    async with running(sim) as url, connect(url) as ws:
        for bad in ("not json", "[1, 2]", '{"action": "subscribe", "symbols": "SBIN"}'):
            await ws.send(bad)
        await subscribe(ws, sim, {"action": "subscribe", "symbols": [1]})
        assert sim.subscriptions == [None]  # still subscribed to everything
        await sim.push("INFY", "1500.01")
        assert (await recv(ws))["price"] == "1500.01"


async def test_walk_never_reaches_zero_and_keeps_cents() -> None:
    sim = FeedSimulator(symbols={"PENNY": Decimal("0.05")}, rate_hz=200, volatility=5.0, seed=3)
    async with running(sim) as url, connect(url) as ws:
        prices = [Decimal((await recv(ws))["price"]) for _ in range(30)]
    assert all(p >= Decimal("0.01") and p == p.quantize(Decimal("0.01")) for p in prices)
    assert len(set(prices)) > 1


async def test_binance_subscribe_reply_and_trade_messages() -> None:
    sim = FeedSimulator(symbols={"BTCUSDT": Decimal("60000")}, rate_hz=0, fmt="binance")
    async with running(sim) as url, connect(url) as ws:
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@trade"], "id": 7}))
        assert await recv(ws) == {"result": None, "id": 7}
        assert sim.subscribe_messages[-1]["params"] == ["btcusdt@trade"]
        assert sim.subscriptions == [frozenset({"BTCUSDT"})]

        await sim.push("ETHUSDT", "3000.00")  # not subscribed
        await sim.push("BTCUSDT", "60000.10")
        trade = await recv(ws)
        assert set(trade) == {"e", "E", "s", "t", "p", "q", "T", "m", "M"}
        assert (trade["e"], trade["s"], trade["p"]) == ("trade", "BTCUSDT", "60000.10")
        assert trade["t"] == 1
        assert Decimal(trade["q"]) > 0 and trade["m"] is False and trade["M"] is True
        assert isinstance(trade["E"], int) and trade["T"] == trade["E"]

        # as on Binance, SUBSCRIBE adds streams; one message per trade, never an array
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["ethusdt@trade"], "id": 8}))
        assert await recv(ws) == {"result": None, "id": 8}
        await sim.push("ETHUSDT", "3000.01")
        await sim.push("BTCUSDT", "60000.20")
        assert [(await recv(ws))["p"] for _ in range(2)] == ["3000.01", "60000.20"]
        await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 9}))
        assert await recv(ws) == {"result": ["btcusdt@trade", "ethusdt@trade"], "id": 9}
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": "btcusdt@trade", "id": 10}))
        assert (await recv(ws))["error"]["code"] == 2


async def test_binance_walk_sends_one_frame_per_trade() -> None:
    symbols = {"BTCUSDT": Decimal("60000"), "ETHUSDT": Decimal("3000")}
    sim = FeedSimulator(symbols=symbols, rate_hz=50, fmt="binance", seed=1)
    async with running(sim) as url, connect(url) as ws:
        trades = [await recv(ws) for _ in range(6)]
    assert all(isinstance(t, dict) and t["e"] == "trade" for t in trades)
    assert {t["s"] for t in trades} == {"BTCUSDT", "ETHUSDT"}
    ids = [t["t"] for t in trades if t["s"] == "BTCUSDT"]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_csv_replay_in_order_with_recorded_timing(tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text(
        "ts,symbol,price\n"
        "1732456789000,SBIN,101.25\n"
        "2024-11-24T13:59:49.200Z,INFY,1501.50\n"
        "1732456789200,SBIN,101.30\n"
        "\n"
        "1732456789400,SBIN,101.10\n"
    )
    sim = FeedSimulator(csv_path=path, speed=2.0)
    async with running(sim) as url, connect(url) as ws:
        started = time.monotonic()
        messages = [await recv(ws) for _ in range(3)]
        elapsed = time.monotonic() - started
        assert [[(t["symbol"], t["price"]) for t in ticks_of(m)] for m in messages] == [
            [("SBIN", "101.25")],
            [("INFY", "1501.50"), ("SBIN", "101.30")],  # same ts: one array
            [("SBIN", "101.10")],
        ]
        assert 0.15 <= elapsed < 2.0  # 400 ms recorded at speed 2
        with pytest.raises(TimeoutError):  # then the feed goes quiet
            await asyncio.wait_for(ws.recv(), 0.3)
        assert sim.prices["SBIN"] == Decimal("101.10")


async def test_csv_replay_loops_and_honours_subscriptions(tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text("0,SBIN,100.00\n10,INFY,1500.00\n20,SBIN,100.50\n")
    sim = FeedSimulator(csv_path=path, speed=10.0, loop=True)
    async with running(sim) as url, connect(url) as ws:
        await subscribe(ws, sim, {"action": "subscribe", "symbols": ["SBIN"]})
        await ticks_until(ws, "SBIN", "100.50")
        prices = [(await recv(ws))["price"] for _ in range(4)]
    assert prices == ["100.00", "100.50", "100.00", "100.50"]


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("1,SBIN,100\n2,SBIN,zero\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: price 'zero'"):
        load_csv(path)
    path.write_text("2024-11-24T14:00:00,SBIN,100\n3,SBIN,1\n4,SBIN\n")  # no timezone: a header
    with pytest.raises(ValueError, match=r":3: expected ts,symbol,price"):
        load_csv(path)
    assert parse_symbols("SBIN=100, INFY=1500.5") == {
        "SBIN": Decimal("100"),
        "INFY": Decimal("1500.5"),
    }
    with pytest.raises(ValueError):
        parse_symbols("SBIN")


async def test_drop_connections_cuts_clients_who_can_reconnect_and_resubscribe() -> None:
    sim = sim_of()
    async with running(sim) as url:
        async with connect(url) as first, connect(url) as second:
            await subscribe(first, sim, {"action": "subscribe", "symbols": ["SBIN"]})
            await sim.drop_connections()
            assert sim.connections == 0
            for ws in (first, second):
                with pytest.raises(ConnectionClosedError):
                    await asyncio.wait_for(ws.recv(), TIMEOUT_S)
        async with connect(url) as again:
            await subscribe(again, sim, {"action": "subscribe", "symbols": ["SBIN"]})
            await sim.push("SBIN", "90.00")
            assert (await recv(again))["price"] == "90.00"
        assert [m["symbols"] for m in sim.subscribe_messages] == [["SBIN"], ["SBIN"]]


async def test_stop_closes_clients_and_start_again_on_the_same_port() -> None:
    sim = sim_of()
    url = await sim.start()
    async with connect(url) as ws:
        await until(lambda: sim.connections == 1)
        await sim.stop()
        with pytest.raises(ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), TIMEOUT_S)
    assert await sim.start(port=sim.port) == url
    try:
        async with connect(url) as ws:
            await until(lambda: sim.connections == 1)
            await sim.push("SBIN", "100.01")
            assert (await recv(ws))["price"] == "100.01"
    finally:
        await sim.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_cli_serves_until_a_signal_and_exits_0(sig: signal.Signals) -> None:
    process = await asyncio.create_subprocess_exec(
        *(PYTHON, "-m", "scripts.feedsim", "--port", "0", "--symbols", "SBIN=100"),
        *("--rate", "50", "--seed", "1"),
        cwd=ROOT,
        env=server_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
        prefix = "feed: listening on "
        assert line.startswith(prefix), line
        async with connect(line.removeprefix(prefix)) as ws:
            assert (await recv(ws))["symbol"] == "SBIN"
            process.send_signal(sig)
            assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
        await process.communicate()


async def test_cli_rejects_bad_arguments() -> None:
    process = await asyncio.create_subprocess_exec(
        *(PYTHON, "-m", "scripts.feedsim", "--port", "0", "--symbols", "SBIN=abc"),
        cwd=ROOT,
        env=server_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 2
    assert b"feed: price 'abc' is not a decimal" in err
