"""`tracepipe ingest netflow` on nfcapd files and nfsen/nfcapd directory trees (issue 14, item 2): the real
softflowd exports to a real nfcapd on 127.0.0.1 (conftest.softflowd_export); the lake must hold, record for
record, what `nfdump -r FILE -o csv` prints for the same file (nfdump's CSV has whole seconds: the comparison
is at that precision, plus the ms the reader keeps, checked against nfdump's own `%tsr` fractional output)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import lake_flows, multiset_diff, run_tracepipe
from support import probes, slow
from test_nffile import block, join, nfdump_rewrite, split

from tracepipe.errors import LakeError
from tracepipe.ingest import nffile
from tracepipe.ingest.decode_pool import DecodePool
from tracepipe.ingest.flows import ingest_flow_files, sniff_kind
from tracepipe.ingest.nfdump import iter_nfcapd, read_nfcapd, read_nfdump_csv
from tracepipe.lake import Lake
from tracepipe.tools import tool_path

CASES = [(5, "ipv4", "ipv4"), (9, "ipv6", "ipv4"), (10, "ipv4", "ipv4")]
KEY = ("src_addr", "dst_addr", "src_port", "dst_port", "proto", "packets", "bytes", "tcp_flags", "exporter")


def seconds(table: pa.Table) -> pa.Table:
    """Start/end in whole seconds since the epoch (nfdump -o csv's precision) as comparable columns."""
    out = table.select(list(KEY))
    for name in ("ts_start", "ts_end"):
        out = out.append_column(f"{name}_s", pc.divide(pc.cast(table.column(name), pa.int64()), 1_000_000))
    return out


def nfdump_ms(path: Path) -> list[tuple[str, int, int]]:
    """(src, start ms, end ms) per record as nfdump prints them: %tsr (fractional start), %te (end text, ms; TZ
    UTC). Not %ter: nfdump 1.7.1 prints its milliseconds modulo 100 (10:00:03.695 comes out as ...03.095), nor
    start + %td: with softflowd's IPFIX (erratum E1, end before start) the duration wraps around."""
    out = subprocess.run(
        [tool_path("nfdump"), "-r", str(path), "-q", "-N", "-6", "-o", "fmt:%sa|%tsr|%te"],
        capture_output=True,
        text=True,
        check=True,
        env={"TZ": "UTC", "LC_ALL": "C"},
    ).stdout
    rows = []
    for line in out.splitlines():
        if "|" in line:
            sa, ts, te = (x.strip() for x in line.split("|"))
            end = dt.datetime.strptime(te, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.UTC)
            rows.append((sa, round(float(ts) * 1000), round(end.timestamp() * 1000)))
    return sorted(rows)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"v{c[0]}-{c[1]}")
def test_lake_holds_what_nfdump_r_prints(case, softflowd_export, tmp_path):
    export = softflowd_export(*case)
    (nfcapd_file,) = export.nfcapd.files
    assert sniff_kind(nfcapd_file) == "nfcapd"
    csv = tmp_path / "nfdump.csv"
    probes.nfdump_csv(nfcapd_file, csv, tz="UTC")
    expected, csv_rejects = read_nfdump_csv(csv)
    assert csv_rejects.num_rows == 0 and expected.num_rows == export.softflowd.records
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "netflow", str(nfcapd_file), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["files"][0]["kind"] == "nfcapd"
    got = lake_flows(lake)
    diff = multiset_diff(seconds(expected), seconds(got), (*KEY, "ts_start_s", "ts_end_s"))
    assert not diff, diff
    # the ms nfdump keeps, as nfdump prints them in fractional seconds
    starts = pc.divide(pc.cast(got.column("ts_start"), pa.int64()), 1000).to_pylist()
    ends = pc.divide(pc.cast(got.column("ts_end"), pa.int64()), 1000).to_pylist()
    assert sorted(zip(got.column("src_addr").to_pylist(), starts, ends, strict=True)) == nfdump_ms(
        nfcapd_file
    )
    # the exporter nfdump keeps per record, and in the summary
    assert set(got.column("exporter").to_pylist()) == {export.exporter}
    assert export.exporter in summary["exporters"]
    assert set(got.column("source").to_pylist()) == {str(nfcapd_file.absolute())}


def test_an_nfsen_tree_lands_file_by_file_once(softflowd_export, tmp_path):
    """profiles-data/live/<source>/YYYY/MM/DD/nfcapd.YYYYMMDDhhmm: every file lands once; nfsen's .nfstat and
    nfcapd's still-open nfcapd.current.* are left alone; a rerun (the archive grew) adds only the new file."""
    files = [softflowd_export(*case).nfcapd.files[0] for case in CASES[:2]]
    tree = tmp_path / "profiles-data" / "live" / "router1" / "2024" / "03" / "12"
    tree.mkdir(parents=True)
    shutil.copy(files[0], tree / "nfcapd.202403120000")
    shutil.copy(files[0], tree / "nfcapd.current.4242")
    (tree.parent / ".nfstat").write_text("junk")
    (tree / "README").write_text("not a flow file")
    root = tmp_path / "profiles-data"
    lake = tmp_path / "lake"
    first = json.loads(
        run_tracepipe("ingest", "netflow", str(root), "--lake", str(lake), "--format", "json").stdout
    )
    assert [(Path(f["path"]).name, f["status"]) for f in first["files"]] == [
        ("nfcapd.202403120000", "landed")
    ]
    shutil.copy(files[1], tree / "nfcapd.202403120005")
    proc = run_tracepipe("ingest", "netflow", str(root), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    second = json.loads(proc.stdout)
    assert [(Path(f["path"]).name, f["status"]) for f in second["files"]] == [
        ("nfcapd.202403120000", "skipped"),
        ("nfcapd.202403120005", "landed"),
    ]
    expected = sum(softflowd_export(*case).expected.num_rows for case in CASES[:2])
    assert lake_flows(lake).num_rows == expected


def test_a_damaged_nfcapd_file_is_a_reject_the_others_land(softflowd_export, tmp_path):
    good = softflowd_export(*CASES[0]).nfcapd.files[0]
    damaged = tmp_path / "nfcapd.202403120010"
    damaged.write_bytes(good.read_bytes()[:3000])  # cut mid-block: nfdump says "appendix offset error"
    lake = tmp_path / "lake"
    proc = run_tracepipe(
        "ingest", "netflow", str(good), str(damaged), "--lake", str(lake), "--format", "json"
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    files = {Path(f["path"]).name: f for f in json.loads(proc.stdout)["files"]}
    assert files[damaged.name]["rejects"] == 1 and files[damaged.name]["flows"] == 0
    assert files[good.name]["flows"] == softflowd_export(*CASES[0]).expected.num_rows
    # the table a person reads says why the damaged file gave nothing, and names no exporter "nfcapd" as of
    # unknown sampling (its reject is counted under the kind's name: nfdump review, session 35)
    table = run_tracepipe("ingest", "netflow", str(damaged), "--lake", str(tmp_path / "lake2"))
    text = " ".join(table.stdout.split())
    assert "1 rejected (the rejects dataset says where and why)" in text, table.stdout
    assert "sampling interval unknown for nfcapd" not in text


def test_nfcapd_is_streamed_in_batches(softflowd_export):
    """The nfdump path: a small block size makes many batches, and together they are the whole file: nothing
    waits for the end (the native reader streams block by block: tests/test_nffile.py)."""
    path = softflowd_export(*CASES[1]).nfcapd.files[0]
    batches = list(iter_nfcapd(path, block_size=2048, native=False))
    assert len(batches) > 3
    assert sum(b[0].num_rows for b in batches) == softflowd_export(*CASES[1]).expected.num_rows
    assert all(b[1].num_rows == 0 for b in batches)


# ---- --jobs N: ranges of blocks read, decoded and written by worker processes (issue 17) ---------------------


def sampler_block(sysid: int, packets: int, space: int) -> bytes:
    """A data block holding one SamplerInfo record (nfdump 1.7.1 nfxV3.h, 24 bytes: type 15, size, exporter
    sysid, algorithm, id, packet interval, packet space): 1 in (packets + space) / packets sampled."""
    record = struct.pack("<HHHHqII", 15, 24, sysid, 0, 1, packets, space)
    return block(1, record)


@pytest.fixture(scope="module")
def several_blocks(softflowd_export, tmp_path_factory) -> Path:
    """A multi-block nfcapd file of two exporters (127.0.0.1 v5, ::1 v9: merged by the real nfdump), its
    blocks repeated, then a sampler record of 127.0.0.1 in a block of its own: the blocks that say who the
    exporter is and the one that says how it samples are read in different ranges, by different workers."""
    base = tmp_path_factory.mktemp("several")
    folder = base / "both"
    folder.mkdir()
    shutil.copy(softflowd_export(5, "ipv4", "ipv4").nfcapd.files[0], folder / "nfcapd.202403120000")
    shutil.copy(softflowd_export(9, "ipv4", "ipv6").nfcapd.files[0], folder / "nfcapd.202403120005")
    merged = nfdump_rewrite(folder, base / "nfcapd.merged")
    header, blocks, appendix = split(merged)
    sysid = nffile.read_nffile(merged)[2].out["127.0.0.1"]["sysid"]
    path = base / "nfcapd.202403120010"
    path.write_bytes(join(header, [*blocks * 4, sampler_block(sysid, 1, 9)], appendix))
    return path


def land(lake_dir: Path, path: Path, jobs: int) -> tuple[dict, pa.Table, list[dict]]:
    # parallel_min_bytes=0: the small real file goes through the workers too
    summary = ingest_flow_files(Lake(lake_dir), [path], jobs=jobs, parallel_min_bytes=0)
    rejects = Lake(lake_dir).read("rejects", columns=["offset", "reason", "detail", "source"]).to_pylist()
    return summary.to_dict(), lake_flows(lake_dir), rejects


def test_jobs_2_lands_what_nfdump_prints_with_the_exporters_sampling(several_blocks, tmp_path):
    ranges = list(nffile.iter_ranges(several_blocks, "x", parts=4))
    assert len(ranges) >= 3 and all(isinstance(r, nffile.BlockRange) for r in ranges)  # across both workers
    assert [span.records for span in ranges[-1].spans] == [1]  # the sampler, read apart from its exporter
    one, one_flows, one_rejects = land(tmp_path / "one", several_blocks, jobs=1)
    two, two_flows, two_rejects = land(tmp_path / "two", several_blocks, jobs=2)
    expected, _ = read_nfcapd(several_blocks)  # the nfdump path: the oracle
    assert expected.num_rows == two["totals"]["flows"] > 0
    assert not multiset_diff(expected, two_flows, (*KEY, "ts_start", "ts_end"))
    assert not multiset_diff(one_flows, two_flows, (*KEY, "ts_start", "ts_end", "source"))
    assert set(two_flows.column("exporter").to_pylist()) == {"127.0.0.1", "::1"}
    # the sampler record (last range) applied to the exporter record it names (first range), as in one process
    assert two["exporters"]["127.0.0.1"]["sampling"] == one["exporters"]["127.0.0.1"]["sampling"] == 10
    assert two["exporters"] == one["exporters"]
    assert two["files"] == one["files"] and two["files"][0]["reader"] == "native"
    assert two["exit_code"] == one["exit_code"] == 0 and not one_rejects and not two_rejects


@pytest.mark.parametrize("how", ["record size 0", "truncated"])
def test_jobs_2_a_damaged_block_is_a_reject_in_its_place_the_others_land(how, several_blocks, tmp_path):
    header, blocks, appendix = split(several_blocks)
    damaged_at = nffile.FILE_HEADER.itemsize + sum(len(b) for b in blocks[:3])
    records = int(np.frombuffer(blocks[3][:4], "<u4")[0])
    data = blocks[3][nffile.BLOCK_HEADER.itemsize :]
    if how == "record size 0":  # the first record's size field: nothing of block 3 can be read
        raw = join(
            header, [*blocks[:3], block(records, data[:2] + b"\x00\x00" + data[4:]), *blocks[4:]], appendix
        )
        kept = [*blocks[:3], *blocks[4:]]
    else:  # cut in the middle of block 3: nothing after it can be found
        raw = join(header, blocks, appendix)[: damaged_at + 100]
        kept = blocks[:3]
    path = tmp_path / "nfcapd.damaged"
    path.write_bytes(raw)
    oracle = tmp_path / "nfcapd.kept"  # the blocks that must land, alone, through nfdump
    oracle.write_bytes(join(header, kept, appendix))
    expected, _ = read_nfcapd(oracle)
    one, one_flows, one_rejects = land(tmp_path / "one", path, jobs=1)
    two, two_flows, two_rejects = land(tmp_path / "two", path, jobs=2)
    reason = "bad nfcapd record size" if how == "record size 0" else "truncated nfcapd file"
    assert [(r["offset"], r["reason"]) for r in two_rejects] == [(damaged_at, reason)]
    assert two_rejects == one_rejects
    assert 0 < expected.num_rows == two_flows.num_rows
    assert not multiset_diff(expected, two_flows, (*KEY, "ts_start", "ts_end"))
    assert not multiset_diff(one_flows, two_flows, (*KEY, "ts_start", "ts_end", "source"))
    assert two["exit_code"] == one["exit_code"] == 3
    assert two["exporters"] == one["exporters"] and two["files"] == one["files"]


def test_jobs_2_a_worker_that_dies_leaves_nothing_and_a_rerun_lands_once(several_blocks, tmp_path):
    lake_dir = tmp_path / "lake"
    (lake_dir / "flows").mkdir(parents=True)
    ranges = [r for r in nffile.iter_ranges(several_blocks, str(several_blocks), parts=4)]
    with DecodePool(2, lake_dir) as pool:
        pool.begin("k" * 16)
        os.kill(pool._procs[0].pid, signal.SIGKILL)
        pool._procs[0].wait()
        with pytest.raises(LakeError, match=r"decode worker 0 died.*--jobs 1"):
            for blocks in ranges * 2:
                pool.submit_nfcapd(blocks)
            pool.finish()
        pool.abort()
    assert not list(lake_dir.rglob("*.parquet*"))  # the live worker deleted what it wrote
    summary = ingest_flow_files(Lake(lake_dir), [several_blocks], jobs=2, parallel_min_bytes=0)
    assert summary.flows == read_nfcapd(several_blocks)[0].num_rows == lake_flows(lake_dir).num_rows


def test_jobs_2_ingest_killed_midway_shows_nothing_half_written_and_a_rerun_lands_once(
    several_blocks, tmp_path
):
    """SIGKILL of `ingest netflow --jobs 2` while its workers write: the lake shows none of the file's rows (or,
    if the commit came first, all of them), no temp file of a worker stays once the workers see their parent
    gone, and the rerun lands the file exactly once. The killed process cannot remove a temp file of its own (the
    manifest's, if the kill came at its write): readers never see it, and `vacuum` deletes it once it is an hour
    old."""
    header, blocks, appendix = split(several_blocks)
    path = tmp_path / "nfcapd.big"  # ~500 k records: each worker writes row groups before the end
    path.write_bytes(join(header, blocks * 200, appendix))
    expected = nffile.read_nffile(path)[0].num_rows
    lake_dir = tmp_path / "lake"
    code = (
        "import sys; from pathlib import Path; from tracepipe.lake import Lake; "
        "from tracepipe.ingest.flows import ingest_flow_files; "
        "ingest_flow_files(Lake(sys.argv[1]), [Path(sys.argv[2])], jobs=2, parallel_min_bytes=0)"
    )
    env = slow.env_holding_first_write(tmp_path)  # certainly killed while a worker writes
    child = subprocess.Popen([sys.executable, "-c", code, str(lake_dir), str(path)], env=env)
    deadline = time.monotonic() + 120
    workers_write = lake_dir / "flows"  # with --jobs 2 only the workers write flow files
    while not list(workers_write.rglob("*.tmp")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert child.poll() is None, "the ingest ended before its workers wrote"
    child.kill()
    child.wait()
    while list(workers_write.rglob("*.tmp")) and time.monotonic() < deadline:  # the workers abort on EOF
        time.sleep(0.1)
    assert not list(workers_write.rglob("*.tmp"))
    assert {p.parent.name for p in lake_dir.rglob("*.tmp")} <= {"_ingest"}
    visible = lake_flows(lake_dir).num_rows if (lake_dir / "flows" / "_delta_log").exists() else 0
    assert visible in (0, expected)
    for _ in range(2):  # the rerun lands it (or skips it, landed), the next one skips it: never twice
        ingest_flow_files(Lake(lake_dir), [path], jobs=2, parallel_min_bytes=0)
        assert lake_flows(lake_dir).num_rows == expected
    hour_ago = time.time() - 3700
    orphans = list(lake_dir.rglob("*.tmp"))
    for orphan in orphans:
        os.utime(orphan, (hour_ago, hour_ago))
    assert Lake(lake_dir).vacuum(dt.timedelta(hours=1)).get("_ingest", 0) >= len(orphans)
    assert not list(lake_dir.rglob("*.tmp"))
    assert lake_flows(lake_dir).num_rows == expected
