"""No row lands in a partition far in the past or future: a flow whose time a sender set to 2099 or to 1970
(a router without NTP) is a reject with its time, counted, and the rest of the file lands (exit 3)."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
from conftest import run_tracepipe

from tracepipe.lake import Lake

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "netflow" / "nfdump-v9.csv"


def _shifted(line: str, year: str) -> str:
    cells = line.split(",")
    cells[0] = year + cells[0][4:]
    cells[1] = year + cells[1][4:]
    return ",".join(cells)


def test_flows_outside_the_plausible_window_are_rejects_and_the_rest_lands(tmp_path: Path) -> None:
    header, *lines = SAMPLE.read_text().splitlines()
    rows = [line for line in lines if line[:2] == "20"]  # the records (nfdump's Summary lines follow them)
    assert len(rows) == 256
    planted = [_shifted(rows[0], "2099"), _shifted(rows[1], "1970")]
    csv = tmp_path / "flows.csv"
    csv.write_text("\n".join([header, *planted, *rows[2:]]) + "\n")
    lake = tmp_path / "lake"
    done = run_tracepipe("ingest", "netflow", str(csv), "--lake", str(lake), "--format", "json")
    assert done.returncode == 3, done.stderr
    summary = json.loads(done.stdout)
    assert summary["totals"]["flows"] == len(rows) - 2
    assert summary["totals"]["rejects"] == 2
    days = sorted(p.name for p in (lake / "flows").glob("date=*"))
    assert days == ["date=2024-03-12"], days
    files = [str(p) for p in Lake(lake).files("rejects")]
    found = duckdb.sql(
        f"SELECT reason, detail, line FROM read_parquet({files!r}) WHERE dataset = 'flows' ORDER BY detail"
    ).fetchall()
    assert [r[0] for r in found] == ["time outside plausible window"] * 2
    assert found[0][1].startswith("ts_start=1970-03-12") and found[1][1].startswith("ts_start=2099-03-12")
    assert [r[2] for r in found] == [3, 2]  # with their lines (they had none)
    # the same file again: nothing new, no duplicate
    again = run_tracepipe("ingest", "netflow", str(csv), "--lake", str(lake), "--format", "json")
    assert json.loads(again.stdout)["totals"]["flows"] == 0
