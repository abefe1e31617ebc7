"""The one parser of each unit people type: durations, sizes, times, dates and addresses (one address, a
network, a HOST:PORT to listen on).

Every command option and every pipeline file goes through these, so `--rotate 1d`, `--window 1d` and
`window = "1d"` accept the same forms. Text that does not parse raises UsageError (exit code 2) with a form
that works; `to_utc` is the lenient twin of `parse_time` for timestamps found in data (None instead).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import re
import socket
from dataclasses import dataclass
from typing import Any

from tracepipe.errors import UsageError


def time_zone(name: str) -> dt.tzinfo:
    """The IANA time zone `name` (UsageError, exit 2, when there is none such)."""
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise UsageError(
            f"unknown time zone {name!r}; use an IANA name such as UTC or Europe/Berlin"
        ) from exc


__all__ = [
    "EARLIEST_TIME",
    "FUTURE_SLACK",
    "ListenSpec",
    "canonical_addresses",
    "in_time_window",
    "parse_addr",
    "parse_date",
    "parse_duration",
    "parse_listen",
    "parse_network",
    "parse_size",
    "parse_time",
    "time_window",
    "to_utc",
    "to_utc_range",
]

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|w)?", re.IGNORECASE)
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_DURATION_PARTS = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)\s*(?:ms|s|m|h|d|w)\s*){2,}", re.IGNORECASE)
_DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}  # binary: 32M is 32 MiB, as the kernel counts
# [v6]:port | host:port | :port | port ('%' and letters: a zone id, fe80::1%eth0)
_LISTEN = re.compile(r"\[([0-9A-Fa-f:.%a-z]+)\]:(\d+)|([^:\[\]]*):(\d+)|(\d+)")
_EPOCH = re.compile(r"\d{9,11}(\.\d+)?")  # 1973..5138: a short number is a typo, not a time
# epoch milliseconds (JavaScript, Elasticsearch, Splunk exports): 1973..2286
_EPOCH_MS = re.compile(r"\d{12,13}")
# "2025-06-17 08:05:00 UTC", as tickets and logs write it
_UTC_WORD = re.compile(r"\s*(UTC|GMT)$", re.IGNORECASE)
# What a person may type. Times: NetFlow, cloud logs and this tool live between these, and a window or baseline
# (at most MAX_DURATION) around any of them stays far inside what datetime and DuckDB can hold (year 1..9999).
TIME_RANGE = (dt.datetime(1970, 1, 1, tzinfo=dt.UTC), dt.datetime(2200, 1, 1, tzinfo=dt.UTC))
MAX_DURATION = dt.timedelta(days=36500)  # 100 years: retention, windows, baselines

# The times data may carry (flows, lifecycle events, syslog, intel): 1990-01-01 .. now + 1 day, UTC.
# Before 1990 there was no NetFlow (1996), OpenStack (2010) or OpenNebula (2008) to write them; what lies
# there is a broken clock (epoch 0 = 1970, an unset RTC) or a forgery (year 0001). A day past now still takes a
# clock some hours fast or a zone written wrong (offsets reach 14 h); anything later (year 9999) is forged or
# broken, would make "latest" queries and retention lie, and is rejected where it was found.
EARLIEST_TIME = dt.datetime(1990, 1, 1, tzinfo=dt.UTC)
FUTURE_SLACK = dt.timedelta(days=1)


def parse_duration(value: str | float, *, positive: bool = False) -> dt.timedelta:
    """'250ms', '90s', '30m', '1h', '2d', '1w', or a number of seconds (text or number) -> timedelta, from 0 to
    MAX_DURATION (nan and inf refused).

    Units are case-insensitive; `positive=True` also refuses zero (intervals that drive a clock)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UsageError(f"duration {value!r} does not parse: give a number and a unit, e.g. 30m, 1h, 2d")
    if isinstance(value, str):
        text = value.strip()
        match = _DURATION.fullmatch(text)
        parts = [] if match else _DURATION_PART.findall(text)
        if not match and not (parts and _DURATION_PARTS.fullmatch(text)):
            raise UsageError(
                f"duration {value!r} does not parse: it is not a duration like 90s, 30m, 1h, 1h30m or 2d "
                "(units ms, s, m, h, d, w; a bare number is seconds)"
            )
        if match:
            seconds = float(match.group(1)) * _DURATION_SECONDS[(match.group(2) or "s").lower()]
        else:  # 1h30m, 2d 12h: each part with its unit
            seconds = sum(float(n) * _DURATION_SECONDS[unit.lower()] for n, unit in parts)
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds > MAX_DURATION.total_seconds():
        raise UsageError(f"duration {value!r} is out of range: at most {MAX_DURATION.days}d (100 years)")
    if seconds < 0 or (positive and seconds == 0):
        raise UsageError(f"duration {value!r} must be {'more than' if positive else 'at least'} zero")
    return dt.timedelta(seconds=seconds)


MAX_SIZE = 1 << 50  # 1 PiB: beyond any buffer, file or spool a size option names


def parse_size(value: str | int) -> int:
    """'512k', '32M', '1G', '1GiB', '2.5G' or a number of bytes -> bytes (binary multiples)."""
    if isinstance(value, bool):
        raise UsageError(f"size {value!r} does not parse: write e.g. 32M, 1G or 33554432")
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(str(value).strip())
    if not match:
        raise UsageError(f"size {value!r} does not parse: write e.g. 512k, 32M, 1G or 33554432 (bytes)")
    size = float(match.group(1)) * (1 << _SIZE_SHIFT[match.group(2).lower()])
    if not size <= MAX_SIZE:  # also catches inf: 400 digits of "9" are a float overflow, not a size
        raise UsageError(f"size {value!r} is out of range: at most 1024T")
    return int(size)


def to_utc(value: Any, naive_tz: dt.tzinfo = dt.UTC) -> dt.datetime | None:
    """A timestamp from data -> aware UTC datetime, or None when it is empty or does not parse.

    ISO 8601 with Z or an offset (a time without one is read in `naive_tz`; a trailing "UTC" or "GMT" is UTC),
    epoch seconds as a number or as 9-11 digits of text, epoch milliseconds as 12-13 digits, or a datetime."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            return dt.datetime.fromtimestamp(float(value), dt.UTC)
        if isinstance(value, dt.datetime):
            parsed = value
        elif isinstance(value, str):
            text = value.strip()
            if _EPOCH.fullmatch(text):
                return dt.datetime.fromtimestamp(float(text), dt.UTC)
            if _EPOCH_MS.fullmatch(text):
                return dt.datetime.fromtimestamp(int(text) / 1000, dt.UTC)
            named = _UTC_WORD.search(text)
            if named:
                text = text[: named.start()]
            parsed = dt.datetime.fromisoformat(text.replace("z", "Z"))
            if named:
                if parsed.tzinfo is not None:
                    return None  # ("08:05+02:00 UTC" says two things)
                parsed = parsed.replace(tzinfo=dt.UTC)
        else:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=naive_tz)
        return parsed.astimezone(dt.UTC)  # 0001-01-01T00:00+01:00 has no UTC time: OverflowError
    except (ValueError, OverflowError, OSError):
        return None


def to_utc_range(value: Any, naive_tz: dt.tzinfo = dt.UTC) -> tuple[dt.datetime, dt.datetime] | None:
    """A time from data as the span it names, both ends inclusive: a date alone (2025-06-17, 20250617) is that
    whole UTC day, 00:00 to its last microsecond (an incident ticket's or a MISP event's date: read as
    midnight, the day's holders were "nobody"); any other time (to_utc) is one instant. None if no time."""
    if isinstance(value, str):
        try:
            day = dt.date.fromisoformat(value.strip())
        except ValueError:
            day = None
        if day is not None:
            start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
            return start, start + (dt.timedelta(days=1) - dt.timedelta(microseconds=1))  # (no 10000-01-01)
    instant = to_utc(value, naive_tz)
    return None if instant is None else (instant, instant)


def time_window(now: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """(earliest, latest) time that data may carry: EARLIEST_TIME .. now + FUTURE_SLACK (see above)."""
    return EARLIEST_TIME, (now or dt.datetime.now(dt.UTC)) + FUTURE_SLACK


def in_time_window(ts: dt.datetime, now: dt.datetime | None = None) -> bool:
    """Whether a time found in data is plausible (time_window); readers reject the record otherwise."""
    earliest, latest = time_window(now)
    return earliest <= ts <= latest


def parse_time(text: str, naive_tz: dt.tzinfo = dt.UTC) -> dt.datetime:
    """A time typed by a person: ISO 8601 (Z or an offset; none = `naive_tz`, UTC by default) or epoch
    seconds -> aware UTC datetime within TIME_RANGE; UsageError else."""
    value = to_utc(text, naive_tz) if isinstance(text, str) else None
    if value is None:
        raise UsageError(
            f"time {text!r} does not parse: give ISO 8601 (2024-03-12T07:30:00Z, 2024-03-12 08:30+01:00; "
            "no offset = UTC) or epoch seconds (1710228600)"
        )
    low, high = TIME_RANGE
    if not low <= value < high:
        raise UsageError(
            f"time {text!r} is out of range: give a time from {low:%Y-%m-%d} to before {high:%Y-%m-%d} (UTC)"
        )
    return value


def utc_text(value: dt.datetime, timespec: str = "auto") -> str:
    """A time as parse_time reads it back and people read it: ISO 8601 in UTC with `Z`."""
    return value.astimezone(dt.UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def parse_date(text: str) -> dt.date:
    """A UTC day 'YYYY-MM-DD' -> date; UsageError else."""
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"date {text!r} does not parse: give YYYY-MM-DD, e.g. 2024-03-12") from None


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
CANONICAL_IPV4_RE = rf"^{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}$"  # already what str(IPv4Address) prints


def canonical_addr(text: str) -> str:
    """One IPv4/IPv6 address -> the canonical text the lake stores (2001:db8::1, 10.1.2.3); ValueError else.
    An IPv4-mapped IPv6 address (::ffff:10.1.9.1, as a dual-stack API or a user may write one) is its IPv4
    address, the one flows carry; an IPv6 zone (fe80::1%eth0, 2001:db8::13%eth0) names an interface of the
    machine that wrote it, not part of the address: dropped."""
    ip = ipaddress.ip_address(text.strip())
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if ip.scope_id is not None:
            return str(ipaddress.IPv6Address(int(ip)))
    return str(ip)


def parse_addr(text: str) -> str:
    """One IPv4/IPv6 address -> its canonical text (canonical_addr); UsageError else."""
    try:
        return canonical_addr(text)
    except ValueError:
        raise UsageError(
            f"address {text!r} does not parse (not an IP address): give one IPv4 or IPv6 address, e.g. 10.0.0.5"
        ) from None


def canonical_addresses(values: Any) -> Any:
    """A polars Series of address text -> the canonical text the lake stores (as flows: `2001:db8::1`,
    `10.1.2.3`), null where a value is not one IP address. `ipaddress` runs on the distinct values only."""
    import polars as pl  # here: the CLI's option parsing above stays light

    distinct = values.drop_nulls().unique()
    # (IPv4 text already canonical is what it is: `ipaddress` on each of 233 k hosts was 14% of an ingest)
    plain = distinct.str.contains(CANONICAL_IPV4_RE)
    mapping: dict[str, str] = {t: t for t in distinct.filter(plain).to_list()}
    for text in distinct.filter(~plain).to_list():
        try:
            mapping[text] = canonical_addr(text)
        except ValueError:
            continue
    return values.replace_strict(mapping, default=None, return_dtype=pl.String)


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address or CIDR (10.0.0.0/8, 2001:db8::/32, 192.0.2.7; host bits allowed) -> network; UsageError
    else."""
    try:
        return ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise UsageError(
            f"network {text!r} does not parse (not an address or CIDR): write e.g. 10.0.0.0/8 or 2001:db8::/32"
        ) from None


@dataclass(frozen=True)
class ListenSpec:
    """Where a UDP socket listens: address family, host, port."""

    family: int
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenSpec:
    """`0.0.0.0:2055`, `[::]:4739`, `[::1]:9995`, `:2055` or `2055` (all IPv4 addresses) -> ListenSpec;
    UsageError for anything else (host names included: a collector binds to addresses)."""
    match = _LISTEN.fullmatch(text.strip())
    if not match:
        raise UsageError(
            f"cannot read listen address {text!r}; write HOST:PORT, e.g. 0.0.0.0:2055 or [::]:4739"
        )
    if match.group(5):
        host, port = "0.0.0.0", int(match.group(5))
    elif match.group(1):
        host, port = match.group(1), int(match.group(2))
    else:
        host, port = match.group(3) or "0.0.0.0", int(match.group(4))
    try:
        version = ipaddress.ip_address(host.split("%")[0]).version
    except ValueError:
        raise UsageError(f"listen address {text!r}: {host!r} is not an IP address") from None
    if port > 65535:
        raise UsageError(f"listen address {text!r}: port {port} is out of range")
    return ListenSpec(socket.AF_INET6 if version == 6 else socket.AF_INET, host, port)
