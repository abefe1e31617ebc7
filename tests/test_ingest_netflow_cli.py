"""`tracepipe ingest netflow` as a user runs it: real softflowd export captures into a lake read back with DuckDB,
idempotent re-runs, partial and unusable input with their exit codes, and SIGKILL at random moments."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap, wrpcap
from support.probes import LAN_MAC

from tests.conftest import run_tracepipe
from tracepipe.lake import Lake
from tracepipe.query import scan_sql

ROOT = Path(__file__).resolve().parents[1]


def table(lake: Path, dataset: str) -> str:
    """The dataset's files as its transaction log lists them (a glob would also see files of killed runs)."""
    return f"({scan_sql(dataset, Lake(lake).files(dataset))})"


def query(lake: Path, sql: str) -> list[tuple]:
    with duckdb.connect() as con:
        sql = sql.replace("FLOWS", table(lake, "flows")).replace("REJECTS", table(lake, "rejects"))
        return con.execute(sql).fetchall()


def ingest(lake: Path, *paths: Path, fmt: str = "json") -> tuple[int, dict | str]:
    proc = run_tracepipe("ingest", "netflow", *map(str, paths), "--lake", str(lake), "--format", fmt)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout) if fmt == "json" else proc.stdout


@pytest.fixture(scope="module")
def exports(softflowd_export) -> dict[int, object]:
    return {v: softflowd_export(v, "ipv6" if v in (9, 10) else "ipv4") for v in (5, 9, 10)}


def test_real_exports_land_and_match_what_nfdump_counts(exports, tmp_path):
    lake = tmp_path / "lake"
    paths = [exports[v].export_pcap for v in (5, 9, 10)]
    code, summary = ingest(lake, *paths)
    assert code == 0, summary
    expected = sum(exports[v].expected.num_rows for v in (5, 9, 10))
    assert summary["totals"]["flows"] == expected
    assert summary["totals"]["rejects"] == 0
    assert [f["status"] for f in summary["files"]] == ["landed"] * 3
    (exporter,) = summary["exporters"]
    stats = summary["exporters"][exporter]
    assert stats["versions"] == [5, 9, 10]
    assert stats["datagrams"] == sum(exports[v].softflowd.datagrams for v in (5, 9, 10))
    assert stats["sequence_gaps"] == 0
    assert query(lake, "select count(*) from FLOWS") == [(expected,)]
    by_source = dict(query(lake, "select source, count(*) from FLOWS group by source"))
    assert by_source == {str(exports[v].export_pcap): exports[v].expected.num_rows for v in (5, 9, 10)}
    # hive partitions by UTC day of ts_start, one manifest row per capture
    assert query(lake, "select count(*) from FLOWS where strftime(ts_start, '%Y-%m-%d') <> date") == [(0,)]
    assert Lake(lake).manifest().column("dataset").to_pylist() == ["flows"] * 3


def test_reingest_adds_nothing(exports, tmp_path):
    lake = tmp_path / "lake"
    path = exports[9].export_pcap
    assert ingest(lake, path)[0] == 0
    before = query(lake, "select count(*), sum(bytes) from FLOWS")
    code, summary = ingest(lake, path)
    assert code == 0
    assert summary["files"][0]["status"] == "skipped"
    assert query(lake, "select count(*), sum(bytes) from FLOWS") == before


def test_table_output_names_exporters_and_unknown_sampling(exports, tmp_path):
    code, text = ingest(tmp_path / "lake", exports[5].export_pcap, fmt="table")
    assert code == 0
    assert "127.0.0.1" in text
    assert "sampling interval unknown for 127.0.0.1" in text  # v5 from softflowd: no sampling information


def test_partial_input_lands_the_rest_and_exits_3(exports, tmp_path):
    packets = list(rdpcap(str(exports[9].export_pcap)))
    junk = (
        Ether(dst=LAN_MAC)
        / IP(src="127.0.0.1", dst="127.0.0.1")
        / UDP(sport=1, dport=2055)
        / (b"\x00\x63" + b"junk" * 10)
    )
    wrpcap(str(tmp_path / "mixed.pcap"), [*packets, junk])
    data = (tmp_path / "mixed.pcap").read_bytes()
    (tmp_path / "mixed.pcap").write_bytes(data + data[24:60])  # and a record cut at the end of the file
    lake = tmp_path / "lake"
    code, summary = ingest(lake, tmp_path / "mixed.pcap")
    assert code == 3
    assert summary["totals"]["flows"] == exports[9].expected.num_rows
    assert summary["totals"]["rejects"] == 2
    rejects = query(lake, 'select source, reason, "offset" from REJECTS order by "offset"')
    assert [(s, r) for s, r, _ in rejects] == [
        (str(tmp_path / "mixed.pcap"), "not netflow"),
        (str(tmp_path / "mixed.pcap"), "truncated pcap record"),
    ]
    assert rejects[1][2] == len(data)  # the byte offset of the cut record
    assert query(lake, "select count(*) from FLOWS") == [(exports[9].expected.num_rows,)]


def test_captures_and_an_nfdump_csv_of_one_exporter_in_one_command(tmp_path):
    # the bundled folder: softflowd v9 and IPFIX captures and nfdump's CSV of the same exporter. The summary's
    # versions (numbers from captures, "nfdump-csv" from the CSV) used to be sorted together: internal error,
    # exit 4 after the flows had landed, and the attribution step never ran
    code, summary = ingest(tmp_path / "lake", ROOT / "sample_data" / "netflow")
    assert code == 0, summary
    assert [f["status"] for f in summary["files"]] == ["landed"] * 3
    assert summary["exporters"]["127.0.0.1"]["versions"] == [9, 10, "nfdump-csv"]
    assert summary["totals"]["flows"] == query(tmp_path / "lake", "SELECT count(*) FROM FLOWS")[0][0] > 0


def test_nothing_usable_exits_4(tmp_path):
    (tmp_path / "notes.txt").write_text("this is not a capture\n")
    lake = tmp_path / "lake"
    code, summary = ingest(lake, tmp_path / "notes.txt", tmp_path / "missing.pcap")
    assert code == 4
    assert [(f["kind"], f["status"]) for f in summary["files"]] == [
        ("unknown", "rejected"),
        ("missing", "missing"),
    ]
    assert query(lake, 'select reason, "offset" from REJECTS') == [("not a pcap", 0)]
    # a rerun says it again (it was "skipped, already in the lake" and exit 0), its reject is not recorded twice
    code, summary = ingest(lake, tmp_path / "notes.txt")
    assert code == 4 and [f["status"] for f in summary["files"]] == ["rejected"]
    assert query(lake, 'select reason, "offset" from REJECTS') == [("not a pcap", 0)]
    # an empty file rejected once does not make every later empty file "already in the lake"
    (tmp_path / "empty.pcap").write_bytes(b"")
    (tmp_path / "empty2.pcap").write_bytes(b"")
    assert ingest(lake, tmp_path / "empty.pcap")[0] == 4
    code, summary = ingest(lake, tmp_path / "empty2.pcap")
    assert code == 4 and [f["status"] for f in summary["files"]] == ["rejected"]


def test_help_documents_exit_codes_and_an_example():
    proc = run_tracepipe("ingest", "netflow", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for needle in (
        "Exit codes: 0 all landed",
        "3 partial",
        "4 nothing landed",
        "Example: tracepipe ingest netflow",
        "--lake",
        "--format",
    ):
        assert needle in text, needle


# ---- SIGKILL at random moments ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_capture(tmp_path_factory) -> Path:
    """~200k v9 records in a real softflowd template's layout: an ingest of a second or two."""
    path = tmp_path_factory.mktemp("big") / "v9-big.pcap"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "netflow_ingest.py"),
            "--build-only",
            str(path),
            "--records",
            "200000",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return path


def _start(lake: Path, capture: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tracepipe.cli",
            "ingest",
            "netflow",
            str(capture),
            "--lake",
            str(lake),
            "--format",
            "json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )


def test_sigkill_at_random_moments_then_rerun_gives_the_clean_lake(big_capture, tmp_path):
    clean = tmp_path / "clean"
    started = time.monotonic()
    assert _start(clean, big_capture).wait(timeout=300) == 0
    duration = time.monotonic() - started
    total = query(clean, "select count(*) from FLOWS")[0][0]
    assert total >= 200_000

    lake = tmp_path / "killed"
    rng = random.Random(7)
    kills = 0
    while kills < 10:
        proc = _start(lake, big_capture)
        time.sleep(rng.uniform(0.05, duration * 0.9))  # anywhere from start-up to the commit
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        # whatever has landed is readable at every moment, and never half of a file
        assert query(lake, "select count(*) from FLOWS")[0][0] in (0, total)
    assert _start(lake, big_capture).wait(timeout=300) == 0
    assert query(lake, "select count(*) from FLOWS") == [(total,)]
    difference = (
        "select count(*) from (select * exclude (date) from {a} except all select * exclude (date) from {b})"
    )
    a, b = table(clean, "flows"), table(lake, "flows")
    assert query(lake, difference.format(a=a, b=b)) == [(0,)]
    assert query(lake, difference.format(a=b, b=a)) == [(0,)]
    # files of killed runs are not in the log (never read); vacuum deletes them once past the retention
    assert Lake(lake).manifest().column("dataset").to_pylist() == ["flows"]


def test_a_lake_that_cannot_be_written_mid_run_still_lists_what_landed(tmp_path, monkeypatch):
    """The disk filled between two captures of one run: exit 4 with nothing on stdout, not even under
    --format json, while the first capture had landed (failure-injection review, session 38). Now the summary
    lists it landed, the one the run stopped at failed and those after it not read, with the error."""
    from tracepipe.ingest.flows import ingest_flow_files
    from tracepipe.lake import IngestWriter

    story = Path(__file__).parents[1] / "tracepipe" / "demo_story" / "netflow"
    captures = [story / "opennebula-softflowd-ipfix.pcap", story / "openstack-softflowd-v9.pcap"]
    third = tmp_path / "third.pcap"
    third.write_bytes(captures[0].read_bytes()[:-1000])
    real, calls = IngestWriter.commit, []

    def commit(self, stats=None):
        calls.append(self.source)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, stats)

    monkeypatch.setattr(IngestWriter, "commit", commit)
    lake = Lake(tmp_path / "lake")
    summary = ingest_flow_files(lake, [*captures, third])
    assert [f.status for f in summary.files] == ["landed", "failed", "not read"]
    assert "No space left on device" in summary.error and summary.exit_code == 4
    assert summary.to_dict()["error"] == summary.error
    assert summary.flows == summary.files[0].flows > 0 and lake.read("flows").num_rows == summary.flows
    assert summary.days  # (what landed is attributed by the caller)
