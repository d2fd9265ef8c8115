"""The `algoplane` console script, run as a subprocess against the real server; and the time
and duration formats it accepts."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from clients.timeparse import parse_duration, parse_instant
from tests.conftest import Harness
from tests.support import SECRET, free_port, token

ALGOPLANE = str(Path(sys.executable).with_name("algoplane"))


async def cli(addr: str, *args: str, token_: str = "", **env: str) -> tuple[int, str, str]:
    """Runs the installed console script; no ALGOPLANE_* variable leaks in from outside."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ALGOPLANE_")}
    clean.update({"ALGOPLANE_ADDR": addr, "ALGOPLANE_TOKEN": token_, "COLUMNS": "200"}, **env)
    proc = await asyncio.create_subprocess_exec(
        ALGOPLANE, *args, env=clean,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def card(out: str) -> dict[str, str]:
    """The two-column card of a single object, as {field: value}; field names may have a
    space in them, values are separated from them by at least two."""
    rows = (line.strip().split("  ", 1) for line in out.splitlines() if line.strip())
    return {name.strip(): value.strip() for name, value in rows}


def _noon_zone() -> str:
    """An Etc/GMT zone where it is now between 08:00 and 16:00, so 'now + 1h' is today."""
    hour = datetime.now(UTC).hour
    offset = (12 - hour + 12) % 24 - 12  # local = UTC + offset, offset in -12..11
    return "Etc/GMT" + (f"{-offset:+d}" if offset else "")  # Etc/GMT-5 is UTC+5


async def test_the_whole_lifecycle_through_the_command_line(server: Harness) -> None:
    addr = f"127.0.0.1:{server.port}"
    code, out, err = await cli(
        addr, "token", "--sub", "cli-user", "--ttl", "1h", ALGOPLANE_JWT_SECRET=SECRET
    )
    assert (code, err) == (0, "")
    tok = out.strip()
    zone = _noon_zone()
    local_now = datetime.now(ZoneInfo(zone)).replace(microsecond=0)
    buy, sell = local_now + timedelta(hours=1), local_now + timedelta(hours=2, seconds=30)
    code, out, err = await cli(
        addr, "create", "--json", "--tz", zone, "--symbol", "sbin", "--quantity", "7",
        "--buy", buy.strftime("%H:%M:%S"), "--sell", sell.strftime("%H:%M:%S"),
        "--stop-loss", "99.5", token_=tok,
    )  # fmt: skip
    assert (code, err) == (0, "")
    created = json.loads(out)
    sid = created["id"]
    assert created["status"] == "STRATEGY_STATUS_CREATED"
    assert created["spec"] == {
        "symbol": "SBIN",
        "quantity": "7",
        "buyTime": buy.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sellTime": sell.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "stopLoss": "99.5",
    }
    code, out, err = await cli(addr, "start", sid, "--json", token_=tok)
    assert (code, err) == (0, "")
    assert json.loads(out)["status"] == "STRATEGY_STATUS_SCHEDULED"
    code, out, _ = await cli(addr, "get", sid, "--tz", zone, token_=tok)
    shown = card(out)
    assert shown["buy time"] == f"{buy:%Y-%m-%d %H:%M:%S} {buy.tzname()}"
    assert (shown["symbol"], shown["status"]) == ("SBIN", "SCHEDULED")


async def test_start_list_runtime_stop_orders_in_tables_and_json(server: Harness) -> None:
    addr, tok = f"127.0.0.1:{server.port}", token("cli-user")
    code, out, err = await cli(
        addr, "start", "--symbol", "INFY", "--quantity", "3", "--buy-in", "1h", "--hold", "1h30m",
        "--stop-loss", "1450.25", "--json", token_=tok,
    )  # fmt: skip
    assert (code, err) == (0, "")
    started = json.loads(out)
    sid = started["strategyId"]
    assert (started["status"], started["position"]) == (
        "STRATEGY_STATUS_SCHEDULED",
        "POSITION_NONE",
    )
    got = json.loads((await cli(addr, "get", sid, "--json", token_=tok))[1])
    buy = datetime.fromisoformat(got["spec"]["buyTime"])
    sell = datetime.fromisoformat(got["spec"]["sellTime"])
    assert sell - buy == timedelta(hours=1, minutes=30)
    assert abs(buy - datetime.now(UTC) - timedelta(hours=1)) < timedelta(seconds=30)

    code, out, _ = await cli(addr, "list", "--tz", "UTC", token_=tok)
    assert code == 0
    row = next(line for line in out.splitlines() if sid in line)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells == [
        sid, "INFY", "3", f"{buy:%Y-%m-%d %H:%M:%S} UTC", f"{sell:%Y-%m-%d %H:%M:%S} UTC",
        "1450.25", "SCHEDULED",
    ]  # fmt: skip
    code, out, _ = await cli(addr, "list", "--status", "stopped", "--json", token_=tok)
    assert (code, out) == (0, "")

    code, out, _ = await cli(addr, "stop", sid, "--keep-position", token_=tok)
    assert code == 0
    shown = card(out)
    assert (shown["status"], shown["position"]) == ("STOPPED", "NONE")
    code, out, _ = await cli(addr, "list", "--status", "stopped", "--json", token_=tok)
    assert [json.loads(line)["id"] for line in out.splitlines()] == [sid]
    code, out, _ = await cli(addr, "runtime", sid, "--json", token_=tok)
    assert json.loads(out)["status"] == "STRATEGY_STATUS_STOPPED"
    code, out, err = await cli(addr, "orders", sid, token_=tok)
    assert (code, out, err) == (0, "", "(none)\n")


async def test_every_failure_is_one_line_and_its_own_exit_code(server: Harness) -> None:
    addr, tok = f"127.0.0.1:{server.port}", token("cli-user")
    _, out, _ = await cli(
        addr, "start", "--json", "--symbol", "SBIN", "--quantity", "1", "--buy-in", "1h",
        "--hold", "1h", "--stop-loss", "90", token_=tok,
    )  # fmt: skip
    sid = json.loads(out)["strategyId"]
    dead = f"127.0.0.1:{free_port()}"
    cases = {
        "not found": cli(addr, "get", sid, token_=token("someone-else")),
        "bad token": cli(addr, "list", token_="not-a-jwt"),
        "no server": cli(dead, "list", "--timeout", "1", token_=tok),
        "bad spec": cli(
            addr, "create", "--symbol", "SBIN", "--quantity", "1", "--buy-in", "1h",
            "--hold", "1h", "--stop-loss", "-3", token_=tok,
        ),
        "started": cli(addr, "start", sid, token_=tok),
        "no token": cli(addr, "list"),
        "bad time": cli(
            addr, "create", "--symbol", "SBIN", "--quantity", "1", "--buy", "25:00",
            "--hold", "1h", "--stop-loss", "1", token_=tok,
        ),
        "both": cli(addr, "start", sid, "--symbol", "SBIN", token_=tok),
        "bad flag": cli(addr, "list", "--frobnicate", token_=tok),
        "bad zone": cli(addr, "list", "--tz", "Mars/Olympus", token_=tok),
    }  # fmt: skip
    results = dict(zip(cases, await asyncio.gather(*cases.values()), strict=True))
    for name, (_, out, err) in results.items():
        assert "Traceback" not in err, name
        assert out == "", name
    one_line = {name: (code, err.strip()) for name, (code, _, err) in results.items() if code > 2}
    assert one_line == {
        "not found": (15, f"algoplane: NOT_FOUND: strategy '{sid}' not found"),
        "bad token": (26, one_line["bad token"][1]),
        "no server": (24, one_line["no server"][1]),
        "bad spec": (13, one_line["bad spec"][1]),
        "started": (19, f"algoplane: FAILED_PRECONDITION: strategy {sid} is already SCHEDULED"),
    }
    assert one_line["bad token"][1].startswith("algoplane: UNAUTHENTICATED: invalid token")
    assert one_line["bad token"][1].endswith("(check --token / ALGOPLANE_TOKEN)")
    assert one_line["no server"][1].startswith("algoplane: UNAVAILABLE: ")
    assert one_line["no server"][1].endswith(f"(is the server running at {dead}?)")
    assert one_line["bad spec"][1].startswith("algoplane: INVALID_ARGUMENT: spec.stop_loss: ")
    for name in ("no token", "bad time", "both", "bad flag", "bad zone"):
        assert results[name][0] == 2, name
    assert "ALGOPLANE_TOKEN" in results["no token"][2]
    assert "'25:00' is not a time" in results["bad time"][2]
    assert "not both" in results["both"][2]
    assert "--frobnicate" in results["bad flag"][2]
    assert "unknown time zone 'Mars/Olympus'" in results["bad zone"][2]


def test_clock_times_are_today_in_the_zone_and_rfc3339_needs_an_offset() -> None:
    kolkata = ZoneInfo("Asia/Kolkata")
    today = date(2030, 1, 2)
    assert parse_instant("09:15", kolkata, today) == datetime(2030, 1, 2, 3, 45, tzinfo=UTC)
    assert parse_instant("09:15:30", kolkata, today) == datetime(2030, 1, 2, 3, 45, 30, tzinfo=UTC)
    assert parse_instant("2030-01-02T09:15:00Z", kolkata, today) == datetime(
        2030, 1, 2, 9, 15, tzinfo=UTC
    )
    assert parse_instant("2030-01-02 09:15:00.1234567+05:30", UTC, today) == datetime(
        2030, 1, 2, 9, 15, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))
    )
    for bad in ("9:15", "24:00", "09:60", "2030-01-02T09:15:00", "2030-02-30T09:15:00Z", ""):
        with pytest.raises(ValueError, match="is not a time"):
            parse_instant(bad, kolkata, today)
    with pytest.raises(ValueError, match="does not exist"):  # clocks jump 02:00 -> 03:00
        parse_instant("02:30", ZoneInfo("Europe/Berlin"), date(2030, 3, 31))


def test_durations() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("1h30m") == timedelta(hours=1, minutes=30)
    assert parse_duration("2d") == timedelta(days=2)
    for bad in ("", "0s", "5", "1.5h", "m", "1s1h"):
        with pytest.raises(ValueError):
            parse_duration(bad)
