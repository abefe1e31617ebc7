"""What a sweep and its report read must follow the window, not the lake's history (a site runs for years:
~3 M VMs and 10^8 flows a day at CERN). Each test plants garbage in the files of the history a step has no
business reading: the step still answers (it never opened them), and answers what it answered before.

Regressions pinned: the local hosts read the address of every lease ever (an hourly sweep over 3 M leased
addresses: 19 s and 945 MB); the dedupe of a sweep's alerts scanned every alert file of every day; the HTML
report read every vms row to show the few VMs its alerts name; finalize's look-up of the candidates' leases opened
every lease file's footer; the report's flow queries listed every flows file of the lake."""

from __future__ import annotations

import datetime as dt
from contextlib import ExitStack
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from support import stories as gen

from tracepipe.correlate import leases as lease_layout
from tracepipe.correlate.leases import write_derived
from tracepipe.detect import detectors as det
from tracepipe.lake import Lake
from tracepipe.pipeline_config import parse_pipeline
from tracepipe.report.html import build_report_data
from tracepipe.schema import ALERTS, FLOWS, VM_LEASES, VMS, null_column
from tracepipe.sweep import known_alert_ids, spill_local

UTC = dt.UTC
SINCE = dt.datetime(2024, 3, 12, 10, tzinfo=UTC)
UNTIL = SINCE + dt.timedelta(hours=1)
NOW_LEASED = "198.51.100.7"  # a floating IP (outside local_networks) a VM holds during the window
ONCE_LEASED = "198.51.100.3"  # a floating IP a VM held a year before, released since
LATER_LEASED = "198.51.100.8"  # a floating IP first leased months after the window (a rerun of an old window)
OUTSIDE = "203.0.113.9"


def _table(schema: pa.Schema, columns: dict[str, list]) -> pa.Table:
    n = len(next(iter(columns.values())))
    return pa.Table.from_arrays(
        [pa.array(columns[f.name], f.type) if f.name in columns else null_column(n, f.type) for f in schema],
        schema=schema,
    )


def _plant_garbage(paths: list[Path]) -> None:
    """What a reader must not open: not Parquet any more (the log still lists the files)."""
    for path in paths:
        path.write_bytes(b"not a parquet file: this step read the history")


@pytest.fixture
def leased_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Lake, list[Path]]:
    """A lake with flows in one hour, and leases cut into many files by valid_from (as at a real site, only
    smaller files): a year of closed leases before, the window's, and leases begun months after. Returns the
    lake and the lease files that hold no lease overlapping what the window's detectors read."""
    lake = Lake(tmp_path / "lake")
    starts = [SINCE + dt.timedelta(minutes=m) for m in range(0, 60, 5)]
    flows = _table(
        FLOWS,
        {
            "ts_start": starts,
            "ts_end": starts,
            "src_addr": [NOW_LEASED, ONCE_LEASED, LATER_LEASED, "10.10.0.5"] * 3,
            "dst_addr": [OUTSIDE] * 12,
            "src_port": [40000] * 12,
            "dst_port": [443] * 12,
            "proto": [6] * 12,
            "packets": [3] * 12,
            "bytes": [180] * 12,
            "ip_version": [4] * 12,
            "exporter": ["10.255.0.1"] * 12,
            "source": ["test"] * 12,
        },
    )
    lake.append("flows", flows, key="flows")
    year_ago = SINCE - dt.timedelta(days=365)
    old = [year_ago + dt.timedelta(days=d) for d in range(20)]
    later = [SINCE + dt.timedelta(days=90 + d) for d in range(8)]
    addrs = [f"10.9.{d}.1" for d in range(20)] + [ONCE_LEASED] + [NOW_LEASED] + [LATER_LEASED] * 8
    valid_from = [*old, year_ago + dt.timedelta(days=21), SINCE - dt.timedelta(days=3), *later]
    valid_to = [t + dt.timedelta(days=1) for t in old] + [year_ago + dt.timedelta(days=22), None]
    valid_to += [t + dt.timedelta(hours=1) for t in later]
    n = len(addrs)
    status = ["deleted"] * n
    status[21] = "active"
    leases = _table(
        VM_LEASES,
        {
            "addr": addrs,
            "vm_id": [f"vm-{i:03d}" for i in range(n)],
            "valid_from": valid_from,
            "valid_to": valid_to,
            "vm_status": status,
        },
    )
    monkeypatch.setattr(lease_layout, "FILE_ROWS", 3)  # many files of few leases: the layout, small
    write_derived(lake, "vm_leases", leases, {})
    lake.refresh()
    # (a month either side: wider than what the window's detectors read, exfiltration's baseline included)
    during = (SINCE - dt.timedelta(days=30), UNTIL + dt.timedelta(days=30))
    outside = [
        e.path
        for e in lake.entries("vm_leases")
        if e.null_counts.get("valid_to") == 0
        and (e.maxs["valid_to"] <= during[0] or e.mins["valid_from"] >= during[1])
    ]
    assert len(outside) >= len(lake.entries("vm_leases")) - 2 >= 6
    return lake, outside


def _config(tmp_path: Path):
    return parse_pipeline(gen.pipeline_text(tmp_path / "reports"))


def test_local_hosts_read_only_the_leases_of_the_window(leased_lake, tmp_path):
    """A sweep's local hosts: the addresses a VM held during the window its detectors read (a floating IP
    outside local_networks included), found without opening a lease file of the rest of the history; a
    floating IP released a year ago, or leased only after the window, is an outside address for it. The same
    hosts whether the sweep reads the lake (prepare) or a host-bucketed spill that finds them as it reads."""
    lake, outside = leased_lake
    config = _config(tmp_path)
    _plant_garbage(outside)
    ctx = det.prepare_context(lake, config, SINCE, UNTIL)
    assert NOW_LEASED in ctx.local and "10.10.0.5" in ctx.local
    assert ONCE_LEASED not in ctx.local and LATER_LEASED not in ctx.local and OUTSIDE not in ctx.local
    spilled = det.DetectContext(lake, config, SINCE, UNTIL)
    enabled = [name for name in det.DETECTORS if getattr(config.detectors, name).enabled]
    with ExitStack() as stack:
        spill = spill_local(spilled, enabled, None, 2, stack, lambda name, fn: fn())
        assert spill is not None and spill.buckets == 2
        assert spilled.local == ctx.local
        owners = set(spill.owners.get_column("addr").to_list())
        assert NOW_LEASED in owners and ONCE_LEASED not in owners


def _alerts(starts: list[dt.datetime], addrs: list[str]) -> pa.Table:
    ids = [det.alert_id("horizontal_scan", a, None, 22, s) for a, s in zip(addrs, starts, strict=True)]
    return _table(
        ALERTS,
        {
            "alert_id": ids,
            "detector": ["horizontal_scan"] * len(ids),
            "addr": addrs,
            "port": [22] * len(ids),
            "window_start": starts,
            "window_end": [s + dt.timedelta(hours=1) for s in starts],
            "score": [0.9] * len(ids),
            "created_at": starts,
        },
    )


def test_dedupe_reads_only_the_days_of_the_alerts_windows(tmp_path):
    """An alert id hashes its window's start, and alerts are filed under that start's UTC day: the sweep's
    dedupe finds the alerts a rerun finds again (a window at 23:00 that ends after midnight included) in
    those days, without opening the alert files of any other day."""
    lake = Lake(tmp_path / "lake")
    day = dt.datetime(2024, 3, 12, tzinfo=UTC)
    history = [day - dt.timedelta(days=d, hours=-3) for d in range(1, 40)]  # 39 days before, one file each
    for i, start in enumerate(history):
        lake.append("alerts", _alerts([start], [f"10.0.0.{i}"]), key=f"old{i}")
    late = day + dt.timedelta(hours=23)  # the window 23:00-00:00, filed under its start's day
    stored = _alerts([day + dt.timedelta(hours=4), late], ["10.0.1.1", "10.0.1.2"])
    lake.append("alerts", stored, key="today")
    lake.refresh()
    days = {e.day for e in lake.entries("alerts")}
    assert len(days) == 40
    _plant_garbage([e.path for e in lake.entries("alerts") if e.day != "2024-03-12"])
    # a rerun over the evening: the 23:00 window again, and the next hour's new alert
    rerun = _alerts([late, late + dt.timedelta(hours=1)], ["10.0.1.2", "10.0.1.3"])
    assert known_alert_ids(lake, rerun) == {stored.column("alert_id")[1].as_py()}
    assert known_alert_ids(lake, stored) == set(stored.column("alert_id").to_pylist())
    assert known_alert_ids(lake, rerun.slice(1)) == set()
    assert known_alert_ids(lake, rerun.slice(0, 0)) == set()


def test_report_reads_only_the_vms_its_alerts_name(tmp_path, monkeypatch):
    """The HTML report shows what each alerted VM runs now (vms) from the rows of those VMs only: the vms
    files that cannot hold them (by their vm_id statistics in the log) are never opened."""
    lake = Lake(tmp_path / "lake")
    n = 40
    created = [dt.datetime(2023, 1, 1, tzinfo=UTC) + dt.timedelta(days=i) for i in range(n)]
    vms = _table(
        VMS,
        {
            "vm_id": [f"vm-{i:03d}" for i in range(n)],
            "vm_name": [f"name-{i}" for i in range(n)],
            "project": ["p"] * n,
            "status": ["active"] * n,
            "image": [f"image-{i}" for i in range(n)],
            "created_at": created,
        },
    )
    monkeypatch.setattr(lease_layout, "FILE_ROWS", 4)
    write_derived(lake, "vms", vms, {})
    lake.refresh()
    entries = lake.entries("vms")
    assert len(entries) == 10
    named = ["vm-006", "vm-033"]
    _plant_garbage(
        [e.path for e in entries if not any(e.mins["vm_id"] <= v <= e.maxs["vm_id"] for v in named)]
    )
    start = dt.datetime(2024, 3, 12, 10, tzinfo=UTC)
    alerts = _alerts([start, start, start], ["10.0.0.6", "10.0.0.33", "10.0.0.99"])
    alerts = alerts.set_column(
        ALERTS.get_field_index("vm_id"), ALERTS.field("vm_id"), pa.array([*named, None], pa.string())
    )
    data = build_report_data(lake, alerts, "t", (start, start + dt.timedelta(hours=1)))
    images = {a["who"]["vm_id"]: a["who"]["image"] for a in data["alerts"]}
    assert images == {"vm-006": "image-6", "vm-033": "image-33", None: None}


def test_alert_leases_read_only_the_leases_held_at_the_alerts(leased_lake, tmp_path):
    """The sweep's finalize names the VM that held each candidate's address at its first flow (attribute),
    and exfiltration the project of each host's flows (_leases_of): both from the leases valid at those times,
    a deleted VM's included, without opening a lease file of the rest of the history (they read every one)."""
    lake, outside = leased_lake
    _plant_garbage(outside)
    at = SINCE + dt.timedelta(minutes=7)
    candidates = pl.DataFrame(
        {"addr": [NOW_LEASED, ONCE_LEASED, LATER_LEASED, None], "first_ts": [at, at, None, at]},
        schema={"addr": pl.String, "first_ts": pl.Datetime("us", "UTC")},
    )
    named = det.attribute(candidates, lake)
    assert named.get_column("vm_id").to_list() == ["vm-021", None, None, None]
    assert named.get_column("vm_status").to_list() == ["active", None, None, None]
    assert det.attribute(candidates.clear(), lake).height == 0
    ctx = det.DetectContext(lake, _config(tmp_path), SINCE, UNTIL)
    hosts = candidates.drop_nulls("addr")  # (a flow's src_addr is never null)
    found = det._leases_of(ctx, hosts, "addr", "first_ts", ("vm_id", "valid_from"))
    assert found.get_column("vm_id").to_list() == ["vm-021", None, None]
    assert found.get_column("valid_from").to_list()[0] == SINCE - dt.timedelta(days=3)


def test_alert_leases_find_a_deleted_vm_of_the_alerts_time(leased_lake):
    """A VM deleted since (in quarantine or gone) is still the one that held the address at the alert's time:
    an alert a year back finds the lease of ONCE_LEASED, closed long before the sweep runs."""
    lake, _ = leased_lake
    at = SINCE - dt.timedelta(days=365) + dt.timedelta(days=21, hours=5)
    candidates = pl.DataFrame({"addr": [ONCE_LEASED], "first_ts": [at]})
    named = det.attribute(candidates.with_columns(pl.col("first_ts").dt.replace_time_zone("UTC")), lake)
    assert named.get_column("vm_id").to_list() == ["vm-020"]
    assert named.get_column("vm_status").to_list() == ["deleted"]
    naive = det.attribute(candidates, lake)  # a naive time is UTC
    assert naive.get_column("vm_id").to_list() == ["vm-020"]


def test_report_reads_only_the_flows_of_its_window_days(tmp_path):
    """The HTML report's flow queries (top peers and ports, timelines, traffic) list only the flows files of
    the days of the window they ask about (they listed every file of the history, each query): the other days'
    files are neither listed nor opened (here: not even files any more), and the report shows the same rows (a flow of the window's day before the window, or one that began the day
    before and lasts into it, is not in the window: IN_WINDOW counts flows by their start)."""
    lake = Lake(tmp_path / "lake")
    day = dt.datetime(2024, 3, 12, tzinfo=UTC)
    starts = [day - dt.timedelta(days=d, minutes=1) for d in range(30, 0, -1)]  # 23:59 of 30 days before
    starts += [day + dt.timedelta(hours=9)] + [day + dt.timedelta(hours=10, minutes=m) for m in (5, 20, 59)]
    for i, start in enumerate(starts):
        flows = _table(
            FLOWS,
            {
                "ts_start": [start],
                "ts_end": [start + dt.timedelta(hours=2)],
                "src_addr": ["10.10.0.5"],
                "dst_addr": [OUTSIDE if i % 2 else "203.0.113.10"],
                "src_port": [40000],
                "dst_port": [22],
                "proto": [6],
                "packets": [3],
                "bytes": [180 + i],
                "ip_version": [4],
                "exporter": ["10.255.0.1"],
                "source": ["test"],
            },
        )
        lake.append("flows", flows, key=f"flows{i}")
    lake.refresh()
    assert len({e.day for e in lake.entries("flows")}) == 31
    window = (SINCE, UNTIL)
    alerts = _alerts([SINCE], ["10.10.0.5"])
    before = build_report_data(lake, alerts, "t", window)
    for entry in lake.entries("flows"):
        if entry.day != "2024-03-12":  # not even listed: a reader lstats each file it lists (regular_files)
            entry.path.unlink()
            entry.path.mkdir()
    after = build_report_data(lake, alerts, "t", window)
    del before["generated_at"], after["generated_at"]
    assert after == before
    assert after["summary"]["traffic"]["flows"] == 3
    assert [p["flows"] for p in after["alerts"][0]["top_peers"]] == [2, 1]
