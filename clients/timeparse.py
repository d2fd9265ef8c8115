"""The instants and durations the CLI accepts.

09:15 / 09:15:30        today, in the given zone
2030-01-02T09:15:00Z    RFC 3339 (an offset is required: Z or +05:30)
90s, 15m, 2h, 1d, 1h30m durations
"""

from __future__ import annotations

import os
import re
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?$")
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
FORMATS = "09:15, 09:15:30 (today) or RFC 3339 like 2030-01-02T09:15:00Z"


def zone(name: str | None = None) -> tzinfo:
    """The zone named (an IANA name such as Asia/Kolkata), else $ALGOPLANE_TZ, else the
    machine's local zone."""
    name = name or os.environ.get("ALGOPLANE_TZ", "")
    if not name:
        local = datetime.now().astimezone().tzinfo
        return local if local is not None else UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r} (use an IANA name like Asia/Kolkata)"
        ) from None


def parse_instant(text: str, tz: tzinfo, today: date) -> datetime:
    """An aware datetime for `text`: a clock time is on `today` in `tz`."""
    text = text.strip()
    clock = _CLOCK.fullmatch(text)
    if clock:
        hour, minute, second = (int(part or 0) for part in clock.groups())
        return _local(datetime.combine(today, time(hour, minute, second)), tz, text)
    if _RFC3339.fullmatch(text):
        try:
            return datetime.fromisoformat(_trim_fraction(text.replace("z", "Z")))
        except ValueError:
            pass  # e.g. 2030-02-30: reported below like any other bad value
    raise ValueError(f"{text!r} is not a time: use {FORMATS}")


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '2h', '1d', '1h30m' -> timedelta (more than zero)."""
    match = _DURATION.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise ValueError(f"{text!r} is not a duration: use e.g. 30s, 5m, 2h, 1d or 1h30m")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    value = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if not value:
        raise ValueError(f"{text!r} must be longer than zero")
    return value


def _local(naive: datetime, tz: tzinfo, text: str) -> datetime:
    aware = naive.replace(tzinfo=tz)
    # A clock time skipped by a DST change does not exist; zoneinfo would shift it silently.
    if aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) != naive:
        raise ValueError(f"{text} does not exist on {naive.date()} in {tz} (a DST change)")
    return aware


def _trim_fraction(text: str) -> str:
    """Python parses at most microseconds; the API stores microseconds anyway."""
    return re.sub(r"\.(\d{6})\d+", r".\1", text)
