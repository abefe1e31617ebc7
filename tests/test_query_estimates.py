"""DuckDB's size estimates of the lake's scans, and the join plans they lead to (query._bound_on).

DuckDB binds read_parquet to its first file and estimates the scan at that file's rows times the number of
files. Every scan used to read an empty schema anchor first, so every scan of the lake was estimated at 0 rows
and DuckDB, taking the flows for the small side of each join, hashed them: a count over flows_attributed held
all the flows' keys in memory (1.17 GB against 255 MB, session 26), `trace` hashed a month of flows (19.8 GB).
Now a real lake file of the declared types comes first (the one nearest the mean size), and the anchor only when
that file's footer is not what the table declares; every column is cast to its declared type either way."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from support.lake_files import plant_retyped

from tracepipe import query
from tracepipe.correlate.attribution import attribute_flows
from tracepipe.correlate.leases import refresh_leases
from tracepipe.lake import Lake, hash_bytes, ingest_table
from tracepipe.query import connect
from tracepipe.schema import VM_EVENTS

DAY = dt.datetime(2024, 3, 12, tzinfo=dt.UTC)
SIZES = (1_000, 2_000, 4_000, 8_000)  # flows per day file: mean 3,750, nearest 4,000


def _flows(day: int, rows: int) -> pa.Table:
    ts = pa.array(
        [DAY + dt.timedelta(days=day, seconds=i) for i in range(rows)], pa.timestamp("us", tz="UTC")
    )
    return pa.table(
        {
            "ts_start": ts,
            "ts_end": ts,
            "src_addr": pa.array([f"10.0.{i % 40}.{i % 200 + 1}" for i in range(rows)]),
            "dst_addr": pa.array([f"192.0.2.{i % 250 + 1}" for i in range(rows)]),
            "proto": pa.array([6] * rows, pa.int16()),
            "packets": pa.array([1] * rows, pa.int64()),
            "bytes": pa.array(list(range(rows)), pa.int64()),
        }
    )


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Path:
    """Four days of flows of different sizes from 40 VMs' addresses, attributed with vm keys."""
    root = tmp_path_factory.mktemp("estimates") / "lake"
    lake = Lake(root)
    events = [
        {
            "ts": DAY - dt.timedelta(hours=1),
            "cloud": "lab",
            "hypervisor": "h1",
            "vm_id": f"vm-{i}",
            "vm_name": f"node-{i}",
            "action": "create",
            "addrs": [f"10.0.{i}.{j}" for j in range(1, 201)],
            "project": "p",
            "user": "u",
        }
        for i in range(40)
    ]
    ingest_table(
        lake, "vm_events", "create", hash_bytes(b"create"), [pa.Table.from_pylist(events, VM_EVENTS)]
    )
    refresh_leases(lake, dt.timedelta(days=7))
    for day, rows in enumerate(SIZES):
        ingest_table(lake, "flows", f"day{day}", hash_bytes(f"day{day}".encode()), [_flows(day, rows)])
    attribute_flows(lake, [(DAY + dt.timedelta(days=d)).strftime("%Y-%m-%d") for d in range(len(SIZES))])
    return root


def _plan(con: Any, sql: str) -> dict[str, Any]:
    return json.loads(con.execute("EXPLAIN (FORMAT JSON) " + sql).fetchall()[0][1])[0]


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node] + [n for child in node.get("children", []) for n in _nodes(child)]


def _estimate(node: dict[str, Any]) -> int:
    return int(node.get("extra_info", {}).get("Estimated Cardinality", "0").replace(",", ""))


def _scans(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in _nodes(node) if n.get("name") == "READ_PARQUET"]


def _reads(node: dict[str, Any], column: str) -> bool:
    return any(column in str(n.get("extra_info", {}).get("Projections", "")) for n in _scans(node))


def test_a_scan_of_the_lake_is_estimated_at_its_rows(lake):
    with contextlib.closing(connect(Lake(lake))) as con:
        (scan,) = _scans(_plan(con, "SELECT * FROM flows"))
        assert sum(SIZES) / 2 <= _estimate(scan) <= sum(SIZES) * 2, scan
        assert con.execute("SELECT count(*), sum(bytes) FROM flows").fetchall() == [
            (sum(SIZES), sum(n * (n - 1) // 2 for n in SIZES))
        ]


def test_flows_attributed_hashes_the_vms_and_streams_the_flows(lake):
    """Every hash join of flows_attributed builds its table from the VMs (the right child, in DuckDB's plans),
    never from the flows: the flows are the side that streams past it."""
    with contextlib.closing(connect(Lake(lake), stored_facts_from=10**12)) as con:
        plan = _plan(con, "SELECT count(*), count(src_vm_name), count(dst_project) FROM flows_attributed")
        joins = [n for n in _nodes(plan) if n.get("name") == "HASH_JOIN"]
        assert joins
        for join in joins:
            build = join["children"][1]
            assert not _reads(build, "ts_start") and not _reads(build, "src_vm_key"), join
        counted = con.execute("SELECT count(*), count(src_vm_name) FROM flows_attributed").fetchall()
        assert counted[0][0] == sum(SIZES) and counted[0][1] == sum(SIZES)  # every source is a VM's


def _sum_with(kept: int) -> int:
    """sum(bytes) of the lake once the 4,000-row file holds `kept` rows whose bytes are 0..kept-1."""
    return sum(n * (n - 1) // 2 for n in SIZES if n != 4_000) + kept * (kept - 1) // 2


def _representative(lake: Lake) -> Path:
    entries = lake.entries("flows")
    mean = sum(e.rows for e in entries) / len(entries)
    return min(entries, key=lambda e: abs(e.rows - mean)).path


def test_a_retyped_file_where_the_scan_would_bind_is_passed_over(lake, tmp_path):
    """The file DuckDB would bind on (the one nearest the mean size) replaced by one whose `bytes` is text:
    the scan binds on the schema anchor instead, `bytes` stays BIGINT and every row is read."""
    root = tmp_path / "lake"
    shutil.copytree(lake, root)
    planted = _representative(Lake(root))
    kept = plant_retyped(planted, "bytes", "{i}")  # rows 0..kept-1 of the file, bytes = the row's number
    with contextlib.closing(connect(Lake(root))) as con:
        assert query._bound_on("flows", [planted], frozenset(), {planted: 4_000})[0] != planted
        assert con.execute("SELECT typeof(bytes), sum(bytes) FROM flows GROUP BY 1").fetchall() == [
            ("BIGINT", _sum_with(kept))
        ]


def test_a_file_swapped_after_the_check_still_reads_as_declared(lake, tmp_path, monkeypatch):
    """The file checked, then replaced before the query binds on it (the check passes, as it did before the
    swap): the view's casts keep `bytes` BIGINT, sums right."""
    root = tmp_path / "lake"
    shutil.copytree(lake, root)
    kept = plant_retyped(_representative(Lake(root)), "bytes", "{i}")
    monkeypatch.setattr(query, "_binds_as_declared", lambda *args: True)
    with contextlib.closing(connect(Lake(root))) as con:
        assert con.execute("SELECT typeof(bytes), sum(bytes) FROM flows GROUP BY 1").fetchall() == [
            ("BIGINT", _sum_with(kept))
        ]
