"""tracepipe.units: the one parser of durations, sizes, times, dates and addresses, used by every command and
by pipeline files (regression: `collect --rotate 1d` was refused while `who --window 1d` worked)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket

import pytest

from tracepipe.errors import UsageError
from tracepipe.pipeline_config import PipelineError, parse_pipeline
from tracepipe.units import (
    ListenSpec,
    parse_addr,
    parse_date,
    parse_duration,
    parse_listen,
    parse_network,
    parse_size,
    parse_time,
    to_utc,
)

DURATIONS = [
    ("250ms", 0.25),
    ("0.5s", 0.5),
    ("90s", 90),
    ("300", 300),
    ("5m", 300),
    ("30m", 1800),
    ("1h", 3600),
    ("1H", 3600),
    ("1d", 86400),
    ("7d", 7 * 86400),
    ("1w", 604800),
    (" 2 h ", 7200),
    ("1h30m", 5400),  # compound, as Go and systemd write them (`who --window 1h30m` was refused)
    ("2d 12h", 216000),
    ("1m30s500ms", 90.5),
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_pipeline_files_accept_the_same_durations(text, seconds):
    config = parse_pipeline(f'[window]\nlast = "{text}"\n')
    assert config.window.last == seconds
    detector = f'[detectors.beacon]\nwindow = "{text}"\n'
    if seconds >= 1 and seconds == int(seconds):
        assert parse_pipeline(detector).detectors.beacon.window == seconds
    else:  # a detector window is whole seconds (a sub-second one was floored to a zero window)
        with pytest.raises(PipelineError, match=r"detectors\.beacon\.window"):
            parse_pipeline(detector)


@pytest.mark.parametrize("text", ["soon", "1y", "-5m", "5 minutes", "", "m", "1h30", "1h-30m", "h30m"])
def test_parse_duration_refuses(text):
    with pytest.raises(UsageError, match="duration"):
        parse_duration(text)


def test_parse_duration_positive_refuses_zero():
    assert parse_duration("0s") == dt.timedelta(0)
    with pytest.raises(UsageError, match="more than zero"):
        parse_duration("0s", positive=True)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("33554432", 33554432),
        ("512k", 512 << 10),
        ("32M", 32 << 20),
        ("1G", 1 << 30),
        ("1GiB", 1 << 30),
        ("2.5g", 5 << 29),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["big", "32X", "-1M", "", "9" * 400, "1025T"]
)  # 400 digits: OverflowError once
def test_parse_size_refuses(text):
    with pytest.raises(UsageError, match="size"):
        parse_size(text)


def test_parse_time_date_addr():
    assert parse_time("2024-03-12T07:30:00Z") == dt.datetime(2024, 3, 12, 7, 30, tzinfo=dt.UTC)
    assert parse_time("2024-03-12") == dt.datetime(2024, 3, 12, tzinfo=dt.UTC)
    assert parse_time("2024-03-12 08:30", naive_tz=dt.timezone(dt.timedelta(hours=1))) == dt.datetime(
        2024, 3, 12, 7, 30, tzinfo=dt.UTC
    )
    assert to_utc("not a time") is None and to_utc("") is None and to_utc(None) is None
    assert to_utc(1710228600) == dt.datetime(2024, 3, 12, 7, 30, tzinfo=dt.UTC)
    assert parse_date("2024-03-12") == dt.date(2024, 3, 12)
    with pytest.raises(UsageError, match="YYYY-MM-DD"):
        parse_date("12/03/2024")
    assert parse_addr(" 2001:DB8:0::1 ") == "2001:db8::1" and parse_addr("10.0.0.5") == "10.0.0.5"
    with pytest.raises(UsageError, match="not an IP address"):
        parse_addr("10.0.0.0/8")
    # `who 2001:db8:20:1::13%eth0` and `who ::ffff:10.20.1.31` answered "nobody held" for addresses a VM held:
    # a zone names the writer's interface, a v4-mapped address is the IPv4 one flows carry
    assert (
        parse_addr("2001:db8:20:1::13%eth0") == "2001:db8:20:1::13" and parse_addr("fe80::1%2") == "fe80::1"
    )
    assert parse_addr("::ffff:10.20.1.31") == parse_addr("::FFFF:a14:11f") == "10.20.1.31"
    assert (
        parse_addr("::") == "::" and parse_addr("::10.20.1.31") == "::a14:11f"
    )  # (v4-compatible: not mapped)
    import polars as pl

    from tracepipe.units import canonical_addresses

    got = canonical_addresses(pl.Series(["::ffff:10.1.9.1", "2001:DB8::1%3", "x", None]))
    assert got.to_list() == ["10.1.9.1", "2001:db8::1", None, None]  # (Nova's ip_addresses, as ingested)


@pytest.mark.parametrize(
    ("text", "spec", "shown"),
    [
        ("0.0.0.0:2055", ListenSpec(socket.AF_INET, "0.0.0.0", 2055), "0.0.0.0:2055"),
        ("[::]:4739", ListenSpec(socket.AF_INET6, "::", 4739), "[::]:4739"),
        ("[::1]:9995", ListenSpec(socket.AF_INET6, "::1", 9995), "[::1]:9995"),
        ("[fe80::1%eth0]:2055", ListenSpec(socket.AF_INET6, "fe80::1%eth0", 2055), "[fe80::1%eth0]:2055"),
        (" 127.0.0.1:9995 ", ListenSpec(socket.AF_INET, "127.0.0.1", 9995), "127.0.0.1:9995"),
        (":2055", ListenSpec(socket.AF_INET, "0.0.0.0", 2055), "0.0.0.0:2055"),
        ("2055", ListenSpec(socket.AF_INET, "0.0.0.0", 2055), "0.0.0.0:2055"),
    ],
)
def test_parse_listen(text, spec, shown):
    assert parse_listen(text) == spec and str(parse_listen(text)) == shown


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("foo", "write HOST:PORT"),
        ("[::1]", "write HOST:PORT"),
        ("::1:2055", "write HOST:PORT"),  # a bare IPv6 address needs brackets
        ("127.0.0.1:70000", "port 70000 is out of range"),
        ("example.org:2055", "'example.org' is not an IP address"),
    ],
)
def test_parse_listen_refuses(text, message):
    with pytest.raises(UsageError, match=message):
        parse_listen(text)


def test_parse_network():
    assert parse_network(" 10.1.2.3/8 ") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_network("2001:db8::1") == ipaddress.ip_network("2001:db8::1/128")
    for bad in ("10.0.0.0/33", "lan", ""):
        with pytest.raises(UsageError, match="not an address or CIDR"):
            parse_network(bad)


def test_a_soft_deleted_vm_is_restorable_only_while_its_quarantine_lasts():
    # `who` said "soft-deleted, restorable; image kept until ... (reclaimed since)" once the quarantine was over
    from tracepipe.query import vm_now

    deleted = dt.datetime(2025, 6, 17, 9, 45, tzinfo=dt.UTC)
    until = deleted + dt.timedelta(days=7)
    during, after = until - dt.timedelta(days=1), until + dt.timedelta(days=1)
    assert vm_now("soft_deleted", deleted, until, during) == (
        "soft-deleted 2025-06-17 09:45 UTC, restorable; image quarantined until 2025-06-24 09:45 UTC"
    )
    assert vm_now("soft_deleted", deleted, until, after) == (
        "soft-deleted 2025-06-17 09:45 UTC, image kept until 2025-06-24 09:45 UTC (reclaimed since)"
    )
    assert (
        vm_now("soft_deleted", deleted, None, after)
        == "soft-deleted 2025-06-17 09:45 UTC (quarantined, restorable)"
    )
