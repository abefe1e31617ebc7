"""Regression tests of the session-5 review: defects found at the edges of the parallel readers (nfdump CSV
byte ranges, nfcapd block ranges), the packed sort keys of the lease build and the sweep's buckets. Each test
reproduces the defect first (it failed before its fix)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import lake_flows, lake_rows
from support import slow

from tracepipe.ingest.flows import ingest_flow_files
from tracepipe.ingest.nfdump import RangeLanding, nfdump_csv_ranges, read_nfdump_csv
from tracepipe.lake import Lake

SAMPLE_CSV = Path(__file__).resolve().parent.parent / "sample_data" / "netflow" / "nfdump-v9.csv"


def _csv_header_and_body(n: int = 20) -> tuple[bytes, list[bytes]]:
    header, *rest = SAMPLE_CSV.read_bytes().split(b"\n")
    return header, [line for line in rest if line.strip()][:n]


def _lake_rows(lake: Lake) -> tuple[list, list]:
    flow_columns = "src_addr, dst_addr, src_port, dst_port, proto, packets, bytes, ts_start, exporter"
    return lake_rows(lake.root, "flows", flow_columns), lake_rows(
        lake.root, "rejects", "line, reason", "line"
    )


def _ranges_read(path: Path, cuts: list[int]) -> tuple[int, list]:
    """The file read as the decode workers read it, cut into ranges at `cuts` (line ends), landed in order."""
    whole = nfdump_csv_ranges(path, "s")[0]
    bounds = [0, *cuts, path.stat().st_size]
    landing, flows, rejects = RangeLanding(whole.columns), 0, []
    for start, end in itertools.pairwise(bounds):
        job = replace(whole, start=start, end=end, skip_rows=whole.skip_rows if start == 0 else 0)
        part = job.decode()
        flows += part.flows.num_rows
        rejects += landing.land(part.rejects, part.stats).select(["line", "reason"]).to_pylist()
    return flows, rejects


@pytest.mark.parametrize("crlf", [False, True])
def test_a_csv_range_without_a_single_flow_is_read_not_a_worker_crash(tmp_path, crlf):
    """Bug: CsvRange.decode counted exporters with dictionary_decode(), which only a dictionary column has; a
    range that held no flow at all (the header alone, a stretch of junk or blank lines: anyone who writes the
    file can make one) gave a plain empty FLOWS table and the worker raised AttributeError, so `ingest netflow
    --jobs N` failed the whole file (exit 4) that one process reads. Every cut at a line end must read as one
    process reads."""
    header, body = _csv_header_and_body(4)
    lines = [header, *body[:2], b"junk,line", b"", b"more junk", *body[2:]]
    end = b"\r\n" if crlf else b"\n"
    path = tmp_path / "cuts.csv"
    path.write_bytes(end.join(lines) + end)
    serial_flows, serial_rejects = read_nfdump_csv(path)
    want = serial_flows.num_rows, serial_rejects.select(["line", "reason"]).to_pylist()
    assert want[0] == 4 and [r["line"] for r in want[1]] == [4, 6]
    text = path.read_bytes()
    line_ends = [i + 1 for i, byte in enumerate(text[:-1]) if byte == ord("\n")]
    for first in line_ends:
        for second in line_ends:
            if second > first:
                assert _ranges_read(path, [first, second]) == want, (first, second)


def test_workers_land_a_csv_whose_middle_ranges_hold_only_junk(tmp_path):
    """End to end (--jobs 2, real worker processes): ~200 KB of junk lines between flows put whole ranges of
    the file without a flow; the file must land as with one process (its flows, each junk line a reject on
    its own line), not fail in a worker."""
    header, body = _csv_header_and_body(200)
    junk = [b"junk,%d" % i for i in range(20_000)]
    path = tmp_path / "junk-middle.csv"
    path.write_bytes(b"\n".join([header, *body, *junk, *body]) + b"\n")
    assert len(nfdump_csv_ranges(path, "s")) >= 3

    def land(jobs: int) -> tuple[list, list]:
        lake = Lake(tmp_path / f"lake-{jobs}")
        summary = ingest_flow_files(lake, [path], jobs=jobs, parallel_min_bytes=1)
        assert summary.files[0].status == "landed", summary.files[0]
        return _lake_rows(lake)

    one = land(1)
    assert len(one[0]) == 2 * len(body) and len(one[1]) == len(junk)
    assert one[1][0][0] == 2 + len(body)
    assert land(2) == one


@pytest.mark.parametrize("jobs", [1, 2])
def test_an_nfdump_csv_that_is_its_header_without_a_newline_lands_nothing_not_an_internal_error(
    tmp_path, jobs
):
    """Bug (older than the workers): a file that is nfdump's CSV header alone without its newline (an output
    cut off right after it) made pyarrow raise "Could not skip initial 1 rows" and `ingest netflow` stopped
    with an internal error (exit 4) and a traceback hint, instead of reading a file with no flows."""
    header, body = _csv_header_and_body(1)
    path = tmp_path / "cut.csv"
    path.write_bytes(header)
    flows, rejects = read_nfdump_csv(path)
    assert (flows.num_rows, rejects.num_rows) == (0, 0)
    summary = ingest_flow_files(Lake(tmp_path / "lake"), [path], jobs=jobs, parallel_min_bytes=1)
    assert summary.files[0].flows == 0 and summary.files[0].rejects == 0
    path.write_bytes(header + b"\n" + body[0])  # one flow, no final newline: read as before
    assert read_nfdump_csv(path)[0].num_rows == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_a_service_stop_of_an_ingest_with_workers_leaves_no_temp_file_and_no_process(tmp_path, sig):
    """Bug: Ctrl-C in a terminal (SIGINT to the whole process group) or `systemctl stop` (SIGTERM to the whole
    cgroup) during `ingest netflow --jobs 2` killed the decode workers by the signal itself, before the parent
    could tell them to delete their files: their *.parquet.tmp stayed in the lake's day folders for good. The
    workers now leave the signal to the parent (abort) or notice it gone (end-of-file): no temp file stays,
    no worker lives on, nothing half-written is visible, and the rerun lands the file once."""
    header, body = _csv_header_and_body(10_000)
    blob = b"\n".join(body) + b"\n"
    path = tmp_path / "big.csv"
    with open(path, "wb") as out:
        out.write(header + b"\n")
        for _ in range((24 << 20) // len(blob)):
            out.write(blob)
    lake_dir = tmp_path / "lake"
    env = slow.env_holding_first_write(tmp_path)  # a poll under CI's load missed the temp file
    code = (
        "import sys; from pathlib import Path; from tracepipe.lake import Lake; "
        "from tracepipe.ingest.flows import ingest_flow_files; "
        "ingest_flow_files(Lake(sys.argv[1]), [Path(sys.argv[2])], jobs=2, parallel_min_bytes=1)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(lake_dir), str(path)],
        start_new_session=True,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not list(lake_dir.rglob("*.tmp")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert child.poll() is None, "the ingest ended before its workers wrote"
    os.killpg(child.pid, sig)  # what the terminal (or systemd) does: the parent and its workers
    child.communicate(timeout=60)
    while time.monotonic() < deadline and (list(lake_dir.rglob("*.tmp")) or _group_alive(child.pid)):
        time.sleep(0.1)
    assert not list(lake_dir.rglob("*.tmp"))
    assert not _group_alive(child.pid)
    visible = lake_flows(lake_dir).num_rows if (lake_dir / "flows" / "_delta_log").exists() else 0
    expected = read_nfdump_csv(path)[0].num_rows
    assert visible in (0, expected)
    for _ in range(2):  # the rerun lands it (or skips it), the next skips it: never twice
        ingest_flow_files(Lake(lake_dir), [path], jobs=2, parallel_min_bytes=1)
        assert lake_flows(lake_dir).num_rows == expected


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "trailer",
    [
        # a trailer line again right after the first (serial: starts over, the junk after it is a reject)
        [b"Summary", b"Summary", b"a,b", b"1,2", b"junk"],
        # blank lines inside the trailer: ranges of two lines fall between its lines
        [b"Summary", b"", b"flows,bytes,packets", b"", b"1,2,3", b"junk"],
        [b"Summary", b"No matching flows", b"a,b", b"1,2", b"junk"],
        # a 48-field flow line right after "Summary", inside the trailer, and right after it (session 5 report:
        # landed as a flow with workers where one process skipped it); FLOW stands for the line
        [b"Summary", b"FLOW", b"flows,bytes,packets,avg_bps,avg_pps,avg_bpp", b"1,2,3,4,5,6", b"junk"],
        [b"Summary", b"flows,bytes,packets,avg_bps,avg_pps,avg_bpp", b"FLOW", b"1,2,3,4,5,6", b"junk"],
        [b"Summary", b"flows,bytes,packets,avg_bps,avg_pps,avg_bpp", b"1,2,3,4,5,6", b"FLOW", b"junk"],
        [b"Summary", b"FLOW", b"", b"FLOW", b"a,b", b"1,2", b"junk"],
    ],
)
def test_csv_rejects_after_a_trailer_cut_by_ranges_are_those_of_one_process(tmp_path, trailer):
    """Bug: RangeLanding dropped the first `trailer_left` rejects of the next range whatever they were, and
    forgot the trailer lines still due when that range was too short to hold them: with the cut right after a
    "Summary" followed by another, a real reject ("junk") was lost; with a range between two lines of the
    trailer, a trailer line became a reject. Every split into up to three ranges at line ends must give the
    rejects (lines, reasons) and flows of one process."""
    header, body = _csv_header_and_body(4)
    flow_lines = iter(body[2:])
    trailer = [next(flow_lines) if line == b"FLOW" else line for line in trailer]
    path = tmp_path / "trailer.csv"
    path.write_bytes(b"\n".join([header, body[0], *trailer, body[1]]) + b"\n")
    serial_flows, serial_rejects = read_nfdump_csv(path)
    want = serial_flows.num_rows, serial_rejects.select(["line", "reason"]).to_pylist()
    assert want[0] == 2 + sum(line in body for line in trailer)  # a flow line inside a trailer is a flow
    assert want[1][-1] == {"line": 2 + len(trailer), "reason": "expected 48 fields"}
    text = path.read_bytes()
    line_ends = [i + 1 for i, byte in enumerate(text[:-1]) if byte == ord("\n")]
    for count in (1, 2, 3):
        for cuts in itertools.combinations(line_ends, count):
            assert _ranges_read(path, list(cuts)) == want, cuts


def test_nfcapd_ranges_of_a_file_of_tiny_blocks_are_walked_in_bounded_memory(tmp_path):
    """Hostile input: an nfcapd file of 13-byte blocks (one record claimed, one byte of data; a 64 MB file
    holds 5 M of them). Bug: iter_ranges held every block's Span (~160 bytes each) before cutting ranges, and
    each range carried up to a quarter of them to a worker: the parent's memory grew ~12x the file (a 1 GB
    file: ~13 GB), where the one-process reader streams. Now the headers are walked twice and never all held,
    and a range holds at most RANGE_BLOCKS blocks; the ranges still cover every block, in order."""
    import tracemalloc

    import numpy as np

    from tracepipe.ingest import nffile

    n = 60_000
    header = np.zeros(1, nffile.FILE_HEADER)
    header["magic"], header["version"], header["num_blocks"] = nffile.MAGIC, nffile.LAYOUT_VERSION_2, n + 1
    tiny = np.array([(1, 1, nffile.DATA_BLOCK_TYPE_3, 0)], nffile.BLOCK_HEADER).tobytes() + b"\x00"
    path = tmp_path / "nfcapd.tiny"
    path.write_bytes(header.tobytes() + tiny * n + tiny[:5])  # and a last block header cut short
    assert nffile.native_problem(path) is None  # the native reader (and so the workers) take it
    numbers, largest, tables = [], 0, 0
    tracemalloc.start()
    try:
        for part in nffile.iter_ranges(path, "s", parts=2):
            if isinstance(part, nffile.BlockRange):
                numbers.extend(span.number for span in part.spans)
                largest = max(largest, len(part.spans))
                part = None  # a range is let go once sent
            else:
                tables += 1
                assert part.column("reason").to_pylist() == ["truncated nfcapd file"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # ~1 MB of one range in flight (was ~10 MB for the spans of this file alone)
    assert numbers == list(range(n)) and tables == 1
    assert largest == nffile.RANGE_BLOCKS


def test_csv_workers_count_per_exporter_as_one_process_with_rows_outside_the_time_window(tmp_path):
    """Bug: with --jobs, the rows a CSV worker found outside the plausible time window (a router without NTP
    says 1980) were also counted as rejects of the exporter line "nfdump-csv" of the summary, which one process
    counts in the totals only: `ingest netflow --format json` differed with the number of jobs."""
    header, body = _csv_header_and_body(30)
    stale = [line.replace(b"2024-", b"1980-") for line in body[:5]]
    path = tmp_path / "stale-clock.csv"
    path.write_bytes(b"\n".join([header, *body, *stale, b"junk"]) + b"\n")
    one, two = (
        ingest_flow_files(Lake(tmp_path / f"lake-{jobs}"), [path], jobs=jobs, parallel_min_bytes=1).to_dict()
        for jobs in (1, 2)
    )
    assert one["totals"]["flows"] == 30 and one["totals"]["rejects"] == 6
    # the junk line and (since session 23: rejected with their lines by the CSV reader) the 5 stale ones
    assert one["exporters"]["nfdump-csv"]["rejects"] == 6
    assert two["exporters"] == one["exporters"]
    assert two["totals"] == one["totals"] and two["exit_code"] == one["exit_code"] == 3


@pytest.mark.parametrize(
    "after",
    [
        # a 48-field flow line right after "Summary" (the trailer's names and values lines follow it), right after
        # the whole trailer, and between its lines; a range cut falls before and after each line of it
        ["Summary", "FLOW", "flows,bytes,packets,avg_bps,avg_pps,avg_bpp", "1,2,3,4,5,6", "junk"],
        ["Summary", "flows,bytes,packets,avg_bps,avg_pps,avg_bpp", "1,2,3,4,5,6", "FLOW", "junk"],
        ["Summary", "flows,bytes,packets,avg_bps,avg_pps,avg_bpp", "FLOW", "1,2,3,4,5,6", "junk"],
        ["Summary", "FLOW", "junk", "more junk"],
    ],
)
def test_a_flow_line_after_a_summary_trailer_at_a_worker_range_cut_lands_as_one_process_lands_it(
    tmp_path, after
):
    """Session 5 defect report: a 48-field line right after an nfdump CSV "Summary" trailer at a range cut
    landed as a flow with `--jobs` where one process skipped it. The real pool (ingest_flow_files, jobs 2) over a
    file whose 64 KiB worker ranges are cut at every line of such a trailer, one trailer per cut: the lake holds
    the flows and the rejects (line numbers included) that one process lands."""
    header, body = _csv_header_and_body(20)
    block = [body[5] if t == "FLOW" else t.encode() for t in after]
    lines = [header] + [body[i % len(body)] for i in range(2_400)]  # ~800 kB: ranges of 64 KiB
    path = tmp_path / "trailers.csv"

    def cuts() -> list[int]:
        path.write_bytes(b"\n".join(lines) + b"\n")
        return [r.start for r in nfdump_csv_ranges(path, "s")][1:]

    for i in itertools.count():  # a trailer at each cut in turn, the cut falling before, inside or after it
        at = cuts()
        if i >= len(at):
            break
        text = path.read_bytes()
        line = text.count(b"\n", 0, at[i]) + 1  # the first line of range i + 1
        offset = i % (len(block) + 2)
        lines[line - offset : line - offset] = block

    def land(jobs: int) -> tuple[list, list]:
        lake = Lake(tmp_path / f"lake-{jobs}")
        summary = ingest_flow_files(lake, [path], jobs=jobs, parallel_min_bytes=1)
        assert summary.files[0].status == "landed"
        return _lake_rows(lake)

    text = path.read_bytes()
    at = cuts()
    trailers = [i + 1 for i in range(len(text)) if text.startswith(b"\nSummary\n", i)]
    near = [min(abs(cut - t) for t in trailers) for cut in at]
    assert len(at) >= 10 and len(trailers) == len(at) and max(near) < 2_000, near
    one_flows, one_rejects = land(1)
    assert land(2) == (one_flows, one_rejects)
    assert len(one_flows) == text.count(b"\n") - 1 - text.count(b"\nSummary\n") * (len(after) - 1)
