"""`ingest netflow --jobs N`: captures walked in input order in one process (one decoder state) and turned into
Parquet by N worker processes land exactly what one process lands: the same flows, rejects in the same order, the
same per-exporter counters (sequence gaps across a capture split in two included), committed as one source each."""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap, wrpcap
from support.probes import LAN_MAC

from tracepipe.errors import LakeError
from tracepipe.ingest.decode_pool import DecodePool, InputChanged
from tracepipe.ingest.flows import ContentHash, ingest_flow_files
from tracepipe.ingest.netflow import DecoderState, FileRecords, InFile, decode_walked, walk_datagrams
from tracepipe.ingest.pcap import iter_udp_batches
from tracepipe.lake import HashStopped, Lake
from tracepipe.schema import FLOWS

COLUMNS = ["ts_start", "ts_end", "src_addr", "dst_addr", "src_port", "dst_port", "proto", "packets", "bytes"]
COLUMNS += ["tcp_flags", "ip_version", "exporter", "input_if", "output_if", "sampling_interval", "source"]


@pytest.fixture(scope="module")
def captures(softflowd_export, tmp_path_factory) -> list:
    """Real softflowd v5, v9 and IPFIX exports; the v9 one also split in two files (its template in the first,
    most data in the second), and with junk datagrams and a truncated one among its packets."""
    base = tmp_path_factory.mktemp("jobs")
    exports = {v: softflowd_export(v, "ipv6" if v in (9, 10) else "ipv4") for v in (5, 9, 10)}
    packets = rdpcap(str(exports[9].export_pcap))
    wrpcap(str(base / "v9-part1.pcap"), packets[:3])
    wrpcap(str(base / "v9-part2.pcap"), packets[3:])
    hostile = list(packets)
    first = hostile[0]
    for at, payload in (
        (5, b"\x00\x09junk"),
        (9, bytes(first[UDP].payload)[:30]),
        (12, b"\x00\x0a" + b"\xff" * 40),
    ):
        frame = (
            Ether(dst=LAN_MAC)
            / IP(src=first[IP].src, dst=first[IP].dst)
            / UDP(sport=first[UDP].sport, dport=2055)
        )
        hostile.insert(at, frame / payload)
    # a data datagram whose header clock says 2099: its flows are rejects "time outside plausible window"
    future = next(bytes(p[UDP].payload) for p in packets[1:] if len(p[UDP].payload) > 200)
    future = future[:8] + struct.pack(">I", 4_080_000_000) + future[12:]
    frame = (
        Ether(dst=LAN_MAC)
        / IP(src=first[IP].src, dst=first[IP].dst)
        / UDP(sport=first[UDP].sport, dport=2055)
    )
    hostile.append(frame / future)
    wrpcap(str(base / "v9-hostile.pcap"), hostile)
    wrpcap(str(base / "v9-data-sets.pcap"), _one_set_a_datagram(packets))
    paths = [exports[5].export_pcap, base / "v9-part1.pcap", base / "v9-part2.pcap", exports[10].export_pcap]
    return [*paths, base / "v9-hostile.pcap", base / "v9-data-sets.pcap"]


def _one_set_a_datagram(packets: list) -> list:
    """softflowd's v9 datagrams re-cut so that each holds one flowset (templates first, then one data set a
    datagram, sequence numbers in a row): what a busy exporter sends, and what the walker's fast path takes."""
    out = []
    sets = []
    for packet in packets:
        payload = bytes(packet[UDP].payload)
        pos = 20
        while pos + 4 <= len(payload):
            set_id, length = struct.unpack_from(">HH", payload, pos)
            if length < 4:
                break
            sets.append((set_id, payload[:20], payload[pos : pos + length]))
            pos += length
    sets.sort(key=lambda s: s[0] >= 256)  # templates first (stable: data in export order)
    for seq, (_, header, body) in enumerate(sets):
        _, _, uptime, secs, _, source_id = struct.unpack(">HHIIII", header)
        datagram = struct.pack(">HHIIII", 9, 1, uptime, secs, seq, source_id) + body
        first = packets[0]
        out.append(
            Ether(dst=LAN_MAC)
            / IP(src=first[IP].src, dst=first[IP].dst)
            / UDP(sport=9, dport=2055)
            / datagram
        )
    return out


def landed(lake_dir, paths: list, jobs: int) -> tuple:
    lake = Lake(lake_dir)
    # parallel_min_bytes=0: the small real captures go through the workers too
    summary = ingest_flow_files(lake, paths, jobs=jobs, parallel_min_bytes=0)
    flows = lake.read("flows", columns=COLUMNS)
    rejects = lake.read("rejects", columns=["offset", "exporter", "reason", "detail", "source"])
    data = flows.to_pydict()
    rows = sorted(zip(*(data[c] for c in COLUMNS), strict=True), key=repr)
    return summary, rows, rejects, lake


def test_jobs_land_exactly_what_one_process_lands(captures, tmp_path):
    one, one_rows, one_rejects, _ = landed(tmp_path / "one", captures, jobs=1)
    two, two_rows, two_rejects, lake = landed(tmp_path / "two", captures, jobs=2)
    assert one.flows > 0 and one.rejects >= 3  # the junk, the truncated datagram, the bad IPFIX
    assert two_rows == one_rows
    assert two.to_dict()["files"] == one.to_dict()["files"]
    assert two.exporters == one.exporters
    assert two.days == one.days
    assert two.exit_code == one.exit_code == 3
    future = [r for r in one_rejects.to_pylist() if r["reason"] == "time outside plausible window"]
    assert future and all("ts_start=2099" in r["detail"] for r in future)
    # each names its datagram: the packet record appended last to the hostile capture (16-byte record header)
    hostile = next(p for p in captures if p.name == "v9-hostile.pcap")
    last = rdpcap(str(hostile))[-1]
    assert {r["offset"] for r in future} == {hostile.stat().st_size - 16 - len(bytes(last))}
    assert not [r for r in one_rows if r[0].year > 2090]
    key = ["source", "offset", "reason", "detail"]
    assert sorted(two_rejects.select(key).to_pylist(), key=repr) == sorted(
        one_rejects.select(key).to_pylist(), key=repr
    )
    # rejects in input order within each source, as one process writes them
    for source in set(one_rejects.column("source").to_pylist()):
        mask = pa.compute.equal(one_rejects.column("source"), source)
        mask2 = pa.compute.equal(two_rejects.column("source"), source)
        assert (
            two_rejects.filter(mask2).column("offset").to_pylist()
            == one_rejects.filter(mask).column("offset").to_pylist()
        )
    # every capture is one source in the manifest, its rows in the workers' files
    manifest = lake.manifest().to_pylist()
    assert sorted(r["rows"] for r in manifest if r["dataset"] == "flows") == sorted(
        f["flows"] for f in one.to_dict()["files"]
    )
    # re-ingesting skips every file, as with one process
    again = ingest_flow_files(lake, captures, jobs=2, parallel_min_bytes=0)
    assert [f.status for f in again.files] == ["skipped"] * len(captures)


def test_a_worker_that_dies_is_an_error_that_says_what_to_do(captures, tmp_path):
    state = DecoderState()
    batch = next(iter_udp_batches(captures[1]))
    walked, _ = walk_datagrams(batch.payloads, batch.exporters, batch.ts_us, batch.offsets, "x", state)
    (tmp_path / "lake" / "flows").mkdir(parents=True)
    with DecodePool(2, tmp_path / "lake") as pool:
        pool.begin("k" * 16)
        os.kill(pool._procs[0].pid, signal.SIGKILL)
        pool._procs[0].wait()
        with pytest.raises(LakeError, match=r"decode worker 0 died.*--jobs 1"):
            for _ in range(4):
                pool.submit(walked)
            pool.finish()
        pool.abort()
    assert not list((tmp_path / "lake").rglob("*.parquet"))  # the live worker deleted what it wrote


def _walked_batches(capture: Path, batch_datagrams: int) -> list:
    """The capture's datagrams walked into batches of `batch_datagrams`, as the ingest hands them to the pool."""
    state = DecoderState()
    return [
        walk_datagrams(b.payloads, b.exporters, b.ts_us, b.offsets, "x", state)[0]
        for b in iter_udp_batches(capture, batch_datagrams=batch_datagrams)
    ]


def test_every_batch_is_decoded_and_its_answer_comes_back_numbered(captures, tmp_path):
    walked = _walked_batches(captures[2], batch_datagrams=4)
    assert len(walked) >= 5
    with DecodePool(2, tmp_path) as pool:
        pool.begin("k" * 16)
        answers = [a for w in walked for a in pool.submit(w)]
        last, adds, rows = pool.finish()
    numbers = sorted(n for n, _ in [*answers, *last])
    assert numbers == list(range(len(walked)))
    assert rows == sum(w.records for w in walked) > 0
    assert len(adds) == 2  # one file per worker for the one day of this capture
    assert np.all([(tmp_path / "flows" / a.path).exists() for a in adds])


def test_a_decode_worker_does_not_load_pandas():
    """Issue 17: pyarrow imported pandas (~0.3-0.45 s of CPU) on a worker's first array conversion; the worker's
    entry point keeps it out, and Arrow conversions and Parquet writing work without it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tracepipe.nopandas import refuse_pandas\n"
        "refuse_pandas()\n"
        "import io, pyarrow as pa, pyarrow.parquet as pq\n"
        "import tracepipe.ingest.decode_pool\n"
        "table = pa.table({'a': pa.array(['10.0.0.1', None]), 'n': pa.array([1, 2])})\n"
        "pq.write_table(table, io.BytesIO())\n"
        "print('pandas' in sys.modules, table.column('a').null_count)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "1"]


def test_ingest_netflow_lands_and_attributes_without_loading_pandas(tmp_path):
    """The flow ingest commands refuse pandas too (~0.2-0.35 s of every run): landing a capture and attributing
    it to the VMs of a lake with leases (polars, numpy, DuckDB) works, and pandas never loads."""
    import subprocess
    import sys

    story = Path(__file__).resolve().parents[1] / "tracepipe" / "demo_story"
    lake = tmp_path / "lake"
    vm = subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", "ingest", "vm", str(story / "nova"), "--lake", str(lake)],
        capture_output=True,
        text=True,
    )
    assert vm.returncode == 0, vm.stdout + vm.stderr
    code = (
        "import sys, json\n"
        "from tracepipe.cli import app\n"
        "try:\n"
        f"    app(['ingest', 'netflow', {str(story / 'netflow')!r}, '--lake', {str(lake)!r}, '--format', 'json'])\n"
        "except SystemExit as done:\n"
        "    print('EXIT', done.code, 'pandas' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.splitlines()[-1] == "EXIT 0 False", run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads(run.stdout[: run.stdout.rindex("EXIT")])
    assert summary["totals"]["flows"] > 10_000 and summary["correlation"]["error"] is None
    attributed = summary["correlation"]["flows"]  # the lease look-up (numpy, polars) ran without pandas
    assert attributed["rows"] == summary["totals"]["flows"] and attributed["src_attributed"] > 5_000


def test_a_slow_worker_does_not_hold_up_the_others(captures, tmp_path):
    """Issue 17 profile: batch k went to worker k % jobs, so the walker waited on a worker busy writing a row
    group while the other ran dry. Batches now go to the least busy worker: with worker 0 stopped outright,
    every batch still gets decoded (by worker 1), and worker 0's share is answered once it runs again."""
    import threading

    walked = _walked_batches(captures[2], batch_datagrams=1)
    assert len(walked) >= 10
    with DecodePool(2, tmp_path) as pool:
        pool.begin("k" * 16)
        os.kill(pool._procs[0].pid, signal.SIGSTOP)
        try:
            answers: list = []
            feeding = threading.Thread(target=lambda: [answers.extend(pool.submit(w)) for w in walked])
            feeding.start()
            feeding.join(timeout=60)
            assert not feeding.is_alive(), "the walker waited on the stopped worker"
            assert len(pool._queued[0]) <= 3  # IN_FLIGHT: what the stopped worker holds is bounded
        finally:
            os.kill(pool._procs[0].pid, signal.SIGCONT)
        last, _, rows = pool.finish()
    assert sorted(n for n, _ in [*answers, *last]) == list(range(len(walked)))
    assert rows == sum(w.records for w in walked) > 0


def _open_by(path_part: str) -> list[int]:
    """Pids of the processes that hold a file whose path contains `path_part` open (Linux /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(path_part in os.readlink(fd) for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def test_a_hung_worker_is_killed_and_its_files_removed_then_the_rerun_lands_once(softflowd_export, tmp_path):
    """Session 5 defect: a decode worker that hung was killed (after 30 s, at stop) and its *.parquet.tmp files
    stayed in the lake, removed only by a vacuum an hour later (and a worker stopped mid-batch hung the ingest
    for ever). A real worker is stopped (SIGSTOP) while it writes a row group: the ingest fails within the hang
    timeout with the lake's exit code, no temp or uncommitted file stays, and the rerun lands the source once."""
    import threading

    from tracepipe.errors import EXIT_FAILED

    export = softflowd_export(5, "ipv4")
    raw = Path(export.export_pcap).read_bytes()
    # the real export's datagrams again and again: ~600 k flows, so that each worker writes a row group (250 k
    # rows with 2 jobs) to a temp file well before its last batch
    repeats = -(-600_000 // export.expected.num_rows)
    big = tmp_path / "big.pcap"
    big.write_bytes(raw[:24] + raw[24:] * repeats)
    lake = Lake(tmp_path / "lake")
    failed: list[BaseException] = []
    summaries: list = []

    def ingest() -> None:
        try:
            summaries.append(ingest_flow_files(lake, [big], jobs=2, parallel_min_bytes=0, hang_seconds=3))
        except BaseException as exc:  # handed to the test thread
            failed.append(exc)

    running = threading.Thread(target=ingest)
    running.start()
    stopped: list[int] = []
    while running.is_alive() and not stopped:
        tmp = next((p for p in (tmp_path / "lake" / "flows").rglob("*.parquet.tmp")), None)
        if tmp is not None:
            stopped = [p for p in _open_by(tmp.name) if p != os.getpid()]
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)  # hangs for real: no batch taken, no answer
    running.join(timeout=120)
    assert stopped, "no worker was caught writing a temp file"
    assert not running.is_alive(), "the ingest waited for ever on the hung worker"
    # (the run's summary says it: the file failed, the error, exit 4; since session 38 a run that stops lists
    # what it did, a lake that could not be written or a worker that hung alike)
    assert failed == [] and len(summaries) == 1, failed
    summary = summaries[0]
    assert summary.exit_code == EXIT_FAILED and [f.status for f in summary.files] == ["failed"]
    assert "did not answer within 3 s and was killed" in summary.error and "Rerun" in summary.error
    for pid in stopped:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    left = [p.name for p in (tmp_path / "lake" / "flows").rglob("part-*")]
    assert left == []  # neither the killed worker's temp files nor the other's closed parts
    assert lake.read("flows", columns=["bytes"]).num_rows == 0

    again = ingest_flow_files(Lake(tmp_path / "lake"), [big], jobs=2, parallel_min_bytes=0)
    assert [f.status for f in again.files] == ["landed"]
    assert (
        Lake(tmp_path / "lake").read("flows", columns=["bytes"]).num_rows
        == repeats * export.expected.num_rows
    )
    assert [f.status for f in ingest_flow_files(lake, [big], jobs=2).files] == ["skipped"]


@pytest.mark.parametrize("key", ["ab" * 32, None])
def test_abort_removes_the_workers_temp_files_never_a_finished_file_of_the_same_key(key, tmp_path):
    """The parent removes what a killed worker left by name pattern: only temp files. A finished file of the
    same key whose random part happens to start with a worker's tag (another writer of the same content may
    have committed it) stays."""
    lake_dir = tmp_path / "lake"
    day = lake_dir / "flows" / "date=2024-03-12"
    day.mkdir(parents=True)
    with DecodePool(2, lake_dir) as pool:
        pool.begin(key)
        tag = pool._tags[0]
        committed = day / f"part-{'ab' * 32}-{tag}beef.parquet"
        committed.write_bytes(b"PAR1")
        left = [day / f"part-{tag}-{'0' * 32}.parquet.tmp"]  # provisional: the key was being computed
        if key is not None:
            left.append(day / f"part-{key}-{tag}f00d.parquet.tmp")
        for path in left:
            path.write_bytes(b"PAR1 half")
        os.kill(pool._procs[0].pid, signal.SIGKILL)
        pool._procs[0].wait()
        pool.abort()
    assert committed.exists()
    assert not [p for p in left if p.exists()]


def _walk(capture: Path, in_file: bool) -> list:
    """(Walked, walk's Decoded) per batch of 8 datagrams; `in_file`: the fast path's records left in the file."""
    state = DecoderState()
    out = []
    for b in iter_udp_batches(capture, batch_datagrams=8):
        where = InFile(str(capture), b.payload_offsets, b.heads) if in_file else None
        out.append(walk_datagrams(b.payloads, b.exporters, b.ts_us, b.offsets, "x", state, where))
    return out


def _rows(table: pa.Table) -> list:
    return sorted(map(repr, table.cast(FLOWS).to_pylist()))


@pytest.mark.parametrize("which", range(6))
def test_records_read_from_the_file_decode_as_the_records_sent_as_bytes(captures, which):
    """Issue 17: a capture's records go to the workers as file offsets (netflow.FileRecords). Every capture,
    the hostile one included (junk, a truncated datagram, a bad IPFIX length, a date in 2099), decodes to the
    same flows, rejects and counters as when the record bytes were sent, from much less pickled."""
    capture = captures[which]
    as_bytes, as_offsets = _walk(capture, False), _walk(capture, True)
    # v9/IPFIX data datagrams of a known template take the fast path, whose records stay in the file; v5 and
    # the datagrams of the full walk travel as bytes (softflowd sends templates in each datagram: re-cut)
    if which == 5:
        assert any(isinstance(r, FileRecords) for w, _ in as_offsets for _, r, _, _ in w.groups)
    for (sent, walk_sent), (offsets, walk_offsets) in zip(as_bytes, as_offsets, strict=True):
        assert walk_offsets.rejects.equals(walk_sent.rejects) and walk_offsets.stats == walk_sent.stats
        want, got = (
            decode_walked(pickle.loads(pickle.dumps(sent))),
            decode_walked(pickle.loads(pickle.dumps(offsets))),
        )
        assert _rows(got.flows) == _rows(want.flows)
        assert got.rejects.equals(want.rejects) and got.stats == want.stats
    if which == 5:  # the record bytes left in the file are not pickled (16 bytes a datagram instead)
        in_file = [r for w, _ in as_offsets for _, r, _, _ in w.groups if isinstance(r, FileRecords)]
        left = sum(int(r.lengths[r.starts >= 0].sum()) for r in in_file)
        sent_bytes = sum(len(pickle.dumps(w)) for w, _ in as_bytes)
        assert left > 10_000
        assert sum(len(pickle.dumps(w)) for w, _ in as_offsets) < sent_bytes - left / 2


def test_a_capture_cut_short_after_its_walk_is_refused_and_never_read_outside(captures, tmp_path):
    """A capture truncated between its walk and a worker's read (an attacker, or tcpdump still writing): the
    worker answers that the input changed, the source is refused (InputChanged), nothing is left in the lake;
    spans that point outside the file or the inline bytes are refused the same way, never read."""
    capture = tmp_path / "v9.pcap"
    capture.write_bytes(captures[5].read_bytes())
    walked = [w for w, _ in _walk(capture, True)]
    with open(capture, "r+b") as handle:
        handle.truncate(capture.stat().st_size // 2)
    with pytest.raises(InputChanged, match="it ends at byte"):
        for w in walked:
            decode_walked(w)
    (tmp_path / "lake").mkdir()
    with DecodePool(2, tmp_path / "lake") as pool:
        pool.begin("k" * 16)
        with pytest.raises(InputChanged, match="it ends at byte"):
            for w in walked:
                pool.submit(w)
            pool.finish()
        pool.abort()
    assert not [p for p in (tmp_path / "lake").rglob("*") if p.is_file()]
    size = capture.stat().st_size
    for starts, lengths, inline in (
        ([size - 10], [30], b""),  # past the end of the file
        ([-1], [60], b"x" * 30),  # past the end of the inline bytes
        ([0], [31], b""),  # not whole records
    ):
        spans = FileRecords(str(capture), np.array(starts), np.array(lengths), inline)
        with pytest.raises(InputChanged):
            spans.read(30)
    assert bytes(FileRecords(str(capture), np.array([4, -1]), np.array([2, 2]), b"ab").read(2)) == (
        capture.read_bytes()[4:6] + b"ab"
    )


@pytest.mark.parametrize("seed", range(4))
def test_runs_of_equal_record_lengths_are_walked_as_one_record_at_a_time_would(tmp_path, seed):
    """pcap records of one length in a row are found with numpy (pcap._same_length_run): whatever the mix of
    lengths, runs longer and shorter than its window, the payloads and offsets are those scapy reads."""
    rng = np.random.default_rng(seed)
    frames = []
    while len(frames) < 400:
        size = int(rng.choice([24, 40, 41, 1400]))
        frames += [size] * int(rng.choice([1, 2, 3, 63, 64, 65, 300]))
    packets = [
        Ether(dst=LAN_MAC)
        / IP(src="192.0.2.7", dst="192.0.2.1")
        / UDP(sport=9, dport=2055)
        / (bytes([i % 251]) * n)
        for i, n in enumerate(frames)
    ]
    wrpcap(str(tmp_path / "runs.pcap"), packets)
    got, offsets = [], []
    for batch in iter_udp_batches(tmp_path / "runs.pcap", batch_datagrams=100):
        got += [bytes(p) for p in batch.payloads]
        offsets += batch.offsets.tolist()
        assert batch.heads == b"".join(
            bytes(p[:24]).ljust(24, b"\0") if len(p) >= 24 else bytes(24) for p in batch.payloads
        )
        data = (tmp_path / "runs.pcap").read_bytes()
        assert [
            data[a : a + len(p)] for a, p in zip(batch.payload_offsets.tolist(), batch.payloads, strict=True)
        ] == [bytes(p) for p in batch.payloads]
    assert got == [bytes(p[UDP].payload) for p in packets]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(packets)


def test_a_deadline_outliving_a_restart_never_kills_the_new_workers(tmp_path):
    """Regression: a threading.Timer per pool message could fire after the pool restarted and kill the new
    worker of the same index. One watchdog per pool now knows which generation of workers each deadline is
    for; a deadline of the current generation still kills (the hang guard), one of an older never does."""
    with DecodePool(2, tmp_path, hang_seconds=0.4) as pool:
        pool.start()
        old = pool._generation
        stuck = pool._watch(0)  # a send to worker 0 that never returns
        stuck.__enter__()
        pool.stop()
        pool.start()  # new workers, same indices
        with pool._watchdog.watch(old, 1):  # an old deadline registered late, for worker 1 this time
            time.sleep(1.2)
        stuck.__exit__(None, None, None)
        assert pool._generation == old + 1
        assert [p.poll() for p in pool._procs] == [None, None] and not pool._hung
        for _ in range(200):  # no thread per message: one watchdog, whatever the traffic
            with pool._watch(0):
                pass
        threads = [t.name for t in threading.enumerate()]
        assert threads.count("decode-pool-watchdog") == 1 and not [t for t in threads if "Timer" in t]
        with pool._watch(1):  # the current generation's deadline: worker 1 is killed
            time.sleep(1.2)
        assert pool._procs[1].poll() is not None and pool._procs[0].poll() is None and pool._hung == {1}
    assert "decode-pool-watchdog" not in [t.name for t in threading.enumerate()]  # ended with the pool


@pytest.mark.parametrize("order", ["landed-then-skipped", "aborted-then-landed"])
def test_the_workers_end_after_the_last_expected_source_however_it_ended(captures, tmp_path, order):
    """Regression: expect() was counted down by finish() only, so a last source skipped (its path already in
    the lake) or an earlier one aborted (its content found in the lake while it decoded) left the workers
    waiting until the pool's exit, beside the caller's commit and attribution."""
    lake = Lake(tmp_path / "lake")
    ingest_flow_files(lake, [captures[0], captures[3]], jobs=1)
    copy = tmp_path / "copy.pcap"
    copy.write_bytes(captures[3].read_bytes())  # same content, new path: hashed beside decoding, then aborted
    paths = [captures[2], captures[0]] if order == "landed-then-skipped" else [copy, captures[2]]
    with DecodePool(2, lake.root) as pool:
        summary = ingest_flow_files(lake, paths, pool=pool, parallel_min_bytes=0)
        assert [f.status for f in summary.files] == (
            ["landed", "skipped"] if order == "landed-then-skipped" else ["skipped", "landed"]
        )
        assert pool._procs
        deadline = time.monotonic() + 20
        while any(p.poll() is None for p in pool._procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.poll() for p in pool._procs] == [0, 0]  # ended by themselves, before the pool's exit


def test_an_abandoned_content_hash_stops_reading(tmp_path):
    """The SHA-256 thread beside decoding read an aborted input to its end; cancel() stops it within a chunk."""
    big = tmp_path / "sparse.pcap"
    with open(big, "wb") as handle:
        handle.truncate(64 << 30)  # 64 GiB of holes: minutes to hash
    hashing = ContentHash(big)
    time.sleep(0.2)
    started = time.monotonic()
    hashing.cancel()
    hashing._thread.join(10)
    assert hashing.done() and time.monotonic() - started < 2
    with pytest.raises(HashStopped):
        hashing.result()


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_datagram_the_decoder_raises_on_is_a_reject_and_the_rest_of_the_capture_lands(
    captures, tmp_path, monkeypatch, jobs
):
    """A bug in the decoder (none known; planted here in the walk) made `ingest netflow` fail the whole capture.
    Now the capture is decoded again from the state before it, piece by piece where the decoder raises: the
    datagram it raises on is a reject "decoder error" at its packet's offset, and what lands is exactly what the
    capture without that datagram lands (with and without the decode workers)."""
    from tracepipe.ingest import flows as flows_module

    capture = captures[-1]  # softflowd v9, one flowset a datagram: templates first, then data
    packets = rdpcap(str(capture))
    at = len(packets) // 2
    bad = bytes(packets[at][UDP].payload)
    without = tmp_path / "without.pcap"
    wrpcap(str(without), packets[:at] + packets[at + 1 :])
    _, expected, _, _ = landed(tmp_path / "expected", [without], jobs)
    real = flows_module.walk_datagrams

    def walk(payloads, *args, **kwargs):
        if any(bytes(p) == bad for p in payloads):
            raise IndexError("planted decoder bug")
        return real(payloads, *args, **kwargs)

    monkeypatch.setattr(flows_module, "walk_datagrams", walk)
    summary, rows, rejects, _ = landed(tmp_path / "lake", [capture], jobs)
    assert [r[:-1] for r in rows] == [r[:-1] for r in expected] and rows
    errors = [r for r in rejects.to_pylist() if r["reason"] == "decoder error"]
    offsets = np.concatenate([b.offsets for b in iter_udp_batches(capture)])
    assert (
        len(errors) == 1
        and errors[0]["offset"] == offsets[at]
        and errors[0]["exporter"] == packets[at][IP].src
    )
    assert "IndexError: planted decoder bug" in errors[0]["detail"] and errors[0]["source"] == str(capture)
    (result,) = summary.files
    assert result.status == "landed" and "decoder failed on it" in result.message
