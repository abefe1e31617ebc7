"""`tracepipe collect` against a full spool disk and against files planted in its spool (session 25's hostile
review): the collector keeps receiving, the committer keeps committing, nothing planted is parsed as a serial,
followed, opened blocking or trusted for its JSON shape, and the decoder state and the spool serial survive."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_collector import collector, stop_collector, v5_datagram, v9_datagram

from tracepipe import spool as sp
from tracepipe.collector import (
    COMMIT_LOCK_FILE,
    COMMITTER_STATS,
    Collector,
    CollectorConfig,
    SpoolNotWritable,
    _load_state,
    _save_state,
    commit_pending,
    make_block,
)
from tracepipe.ingest.netflow import DecoderState, decode_datagrams
from tracepipe.lake import Lake
from tracepipe.limits import DEFAULT as DEFAULT_LIMITS
from tracepipe.units import parse_listen

MAPPED = np.array([[0] * 10 + [255, 255, 192, 0, 2, 9]], np.uint8)  # ::ffff:192.0.2.9


def write_segment(spool: Path, serial: int, payloads: list[bytes]) -> Path:
    spool.mkdir(parents=True, exist_ok=True)
    writer = sp.SegmentWriter(spool, serial)
    block = make_block(time.time_ns() // 1000, 2, np.repeat(MAPPED, len(payloads), 0), np.full(len(payloads), 2055), payloads)  # fmt: skip
    writer.append(block, len(payloads))
    closed = writer.close()
    assert closed is not None
    return closed


def lake_src_ports(lake: Path) -> list[int]:
    files = sorted(lake.glob("flows/**/*.parquet"))
    return sorted(p for f in files for p in pq.read_table(f, columns=["src_port"]).column(0).to_pylist())


def wait_until(condition: Callable[[], bool], timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def run_python(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`script` in a child (what must not hang, checked without leaving a thread stuck in open())."""
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


# ---- 2. files planted in the spool -----------------------------------------------------------------------------


def test_planted_names_that_are_no_segments_are_ignored_not_parsed(tmp_path):
    # review: a file named seg-x.spool made int() raise in segment_serial: the collector died at its next status
    # line, and every restart died again (likewise in done/ and failed/, and as .open)
    spool = tmp_path / "spool"
    real = write_segment(spool, 3, [v5_datagram(0, [("10.0.0.1", 1001)])])
    for directory in (spool, spool / sp.DONE_DIR, spool / sp.FAILED_DIR):
        directory.mkdir(exist_ok=True)
        for name in ("seg-x.spool", "seg-.open", "seg-1-2.spool", "seg-12.spool", "seg-0000000001.spool"):
            (directory / name).write_bytes(b"planted")
    assert sp.closed_segments(spool) == [real]
    assert sp.open_segments(spool) == []
    assert sp.next_serial(spool) == 4
    lake = tmp_path / "lake"
    assert commit_pending(Lake(lake), spool, keep=False) == 1
    assert lake_src_ports(lake) == [1001]
    report = Collector(CollectorConfig(listen=[parse_listen("127.0.0.1:0")], lake=lake, spool=spool)).status()
    assert report["spool_backlog_segments"] == 0


def test_a_fifo_or_symlink_under_a_segment_name_blocks_nothing(tmp_path):
    # review: a FIFO seg-000000000.spool blocked the committer for ever in hash_file (SIGTERM never finished);
    # a symlink seg-N.spool -> /dev/zero was hashed for 6 minutes
    spool = tmp_path / "spool"
    spool.mkdir()
    os.mkfifo(spool / "seg-000000000.spool")
    os.symlink("/dev/zero", spool / "seg-000000001.spool")
    os.mkfifo(spool / "seg-000000002.open")
    write_segment(spool, 3, [v5_datagram(0, [("10.0.0.1", 1002)])])
    script = (
        "import sys; from pathlib import Path; from tracepipe.lake import Lake;"
        "from tracepipe.collector import commit_pending;"
        "print(commit_pending(Lake(Path(sys.argv[2])), Path(sys.argv[1]), keep=False))"
    )
    done = run_python(script, str(spool), str(tmp_path / "lake"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]
    assert lake_src_ports(tmp_path / "lake") == [1002]
    assert "not a regular file (a FIFO)" in done.stderr
    assert "not a regular file (a symbolic link)" in done.stderr
    assert (spool / "seg-000000000.spool").exists()  # left alone, not removed or moved


def test_a_collector_starts_past_a_planted_fifo_open_segment_and_lands_flows(tmp_path):
    # review: a FIFO seg-N.open hung the collector at start (recover_open read it); a symlink planted as the
    # committer's lock made it truncate the link's target
    lake = tmp_path / "lake"
    spool = lake / "_spool"
    spool.mkdir(parents=True)
    os.mkfifo(spool / "seg-000000001.open")
    (spool / "seg-y.open").write_bytes(b"planted")
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.symlink(target, spool / COMMIT_LOCK_FILE)
    with collector(tmp_path, lake, "--rotate", "1s") as run:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(v5_datagram(0, [("10.0.0.1", 1003)]), run.addr())
        wait_until(lambda: lake_src_ports(lake) == [1003], what="the flow in the lake")
        assert stop_collector(run) == 0
    assert target.read_text() == "keep me"
    assert not (spool / COMMIT_LOCK_FILE).is_symlink()
    assert "seg-y.open: not a segment name" in run.stderr.read_text()


@pytest.mark.parametrize(
    "planted", ["[]", '{"flows": "x"}', '{"exporters": []}', '{"exporters": {"a": 1}}', "{"]
)
def test_a_planted_committer_json_does_not_break_the_status_line(tmp_path, planted):
    # review: committer.json of [] or {"flows": "x"} made status() raise, which killed the receive loop
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / COMMITTER_STATS).write_text(planted)
    c = Collector(CollectorConfig(listen=[parse_listen("127.0.0.1:0")], lake=tmp_path / "lake", spool=spool))
    report = c.status()
    assert report["flows_committed"] == 0
    assert report["sequence_gaps"] == 0
    c.log_status(report)


@pytest.mark.parametrize(
    "sidecar", ["[]", '{"cut_bytes": "x", "kept_bytes": 1, "datagrams": 1}', "{", "fifo"]
)
def test_a_planted_recovery_sidecar_does_not_send_the_segment_to_failed(tmp_path, sidecar):
    # review: a seg-N.spool.recovered.json of [] raised in commit_segment, taken for a decoder bug: the real
    # segment went to failed/ and its flows never landed
    spool = tmp_path / "spool"
    segment = write_segment(spool, 1, [v5_datagram(0, [("10.0.0.1", 1004)])])
    path = segment.with_name(segment.name + sp.RECOVERY_SUFFIX)
    if sidecar == "fifo":
        os.mkfifo(path)
    else:
        path.write_text(sidecar)
    assert commit_pending(Lake(tmp_path / "lake"), spool, keep=False) == 1
    assert lake_src_ports(tmp_path / "lake") == [1004]
    assert not (spool / sp.FAILED_DIR).exists()


def test_a_sender_dating_flows_on_many_days_lands_what_arrived_on_time_in_few_files(tmp_path):
    """Session-23 review: each of 3,000 one-flow datagrams dated on another day made one segment 3,000 day files
    (its commit 22 s, every later query listing them). Now a segment lands flows on the days its datagrams
    arrived (and the week before: long flows) and on at most `far_days_per_segment` other days; the flows of any
    other day are rejects, one per day and exporter, saying how many and when. Flows of the days near arrival
    all land, however many far days come first."""
    import datetime as dt

    now = int(time.time())
    far = [v5_datagram(i, [("10.0.0.1", 5000 + i)], unix_secs=1710237600 + i * 86400) for i in range(40)]
    near = [v5_datagram(100 + i, [("10.0.0.2", 6000 + i)], unix_secs=now - 3600 * i) for i in range(3)]
    spool = tmp_path / "spool"
    write_segment(spool, 1, far + near)
    lake = Lake(tmp_path / "lake")
    assert commit_pending(lake, spool, keep=False) == 1
    ports = lake_src_ports(tmp_path / "lake")
    assert [p for p in ports if p >= 6000] == [6000, 6001, 6002]  # every flow that arrived on time
    assert len([p for p in ports if p < 6000]) == DEFAULT_LIMITS.far_days_per_segment
    days = {f.parent.name for f in (tmp_path / "lake" / "flows").glob("date=*/*.parquet")}
    assert len(days) <= DEFAULT_LIMITS.far_days_per_segment + 2
    rejects = pq.read_table(sorted((tmp_path / "lake" / "rejects").glob("**/*.parquet"))[0]).to_pylist()
    far_rejects = [r for r in rejects if r["reason"] == "limit far_days_per_segment"]
    assert len(far_rejects) == 40 - DEFAULT_LIMITS.far_days_per_segment
    assert {r["exporter"] for r in far_rejects} == {"192.0.2.9"}
    first = dt.date(2024, 3, 12)
    dated = {dt.date.fromisoformat(r["detail"].split(" dated ")[1][:10]) for r in far_rejects}
    assert dated <= {first + dt.timedelta(days=i) for i in range(40)} and len(dated) == len(far_rejects)
    assert all(r["detail"].startswith("1 flow dated ") for r in far_rejects)


# ---- 3. status() while commits delete segments -----------------------------------------------------------------


def test_status_survives_segments_deleted_while_it_lists_them(tmp_path):
    # review: sum(p.stat() ... if p.exists()) raised FileNotFoundError when a commit deleted a segment in
    # between (146 of 157k calls); status() runs in the receive loop
    spool = tmp_path / "spool"
    spool.mkdir()
    c = Collector(CollectorConfig(listen=[parse_listen("127.0.0.1:0")], lake=tmp_path / "lake", spool=spool))
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            path = spool / f"seg-{i % 50:09d}.spool"
            path.write_bytes(b"x")
            path.unlink()
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(20_000):
            report = c.status()
            assert 0 <= report["spool_backlog_bytes"] <= report["spool_backlog_segments"]
    finally:
        stop.set()
        thread.join()


# ---- 4. the decoder state and the serial ---------------------------------------------------------------------


def v9_interface_names(names: list[str], first: int = 0, source_id: int = 1) -> bytes:
    """One v9 datagram: an options template (scope: interface, v9 scope type 2; option: interface name, id 82) and a
    data set naming ifindex first.. with `names` (each as UTF-8 of a fixed length)."""
    size = max(len(n.encode()) for n in names)
    body = struct.pack(">HHH", 400, 4, 4) + struct.pack(">HHHH", 2, 4, 82, size)
    records = b"".join(
        struct.pack(">I", first + i) + n.encode().ljust(size, b"\0") for i, n in enumerate(names)
    )
    sets = b""
    for set_id, content in ((1, body), (400, records)):
        content += b"\0" * ((-len(content)) % 4)
        sets += struct.pack(">HH", set_id, len(content) + 4) + content
    return struct.pack(">HHIIII", 9, 2, 100_000, 1710237600, 0, source_id) + sets


def state_with_names(count: int) -> DecoderState:
    state = DecoderState()
    names = ["\U0001f600" * 128] * 100  # 51.6 KB a datagram
    datagrams = [v9_datagram(0, [], template=True)]
    datagrams += [v9_interface_names(names[: count - first], first) for first in range(0, count, 100)]
    decode_datagrams(
        datagrams,
        ["192.0.2.9"] * len(datagrams),
        np.array([1710237600_000_000] * len(datagrams)),
        None,
        "x",
        state,
    )
    assert len(state.if_names) == count and len(state.templates) == 2
    return state


@pytest.mark.parametrize("limit_kib, names_kept", [(256, True), (48, False)])
def test_the_saved_state_stays_loadable_within_its_limit(tmp_path, limit_kib, names_kept):
    # review: decoder-state.json held the state's JSON text as a string, encoded twice (an emoji took 14
    # bytes): 113 MiB for 65,536 names of 128 emoji, over its own 64 MiB load limit, so the next start lost
    # every template and the spool serial. 200 names of 128 emoji: 358 KB so, 100 KB as UTF-8 in one object
    limits = dataclasses.replace(DEFAULT_LIMITS, decoder_state_bytes=limit_kib << 10)
    state = state_with_names(200)
    _save_state(tmp_path, state, "seg-000000007.spool", limits)
    assert (tmp_path / sp.STATE_FILE).stat().st_size <= limit_kib << 10
    loaded, after = _load_state(tmp_path, limits)
    assert after == "seg-000000007.spool"
    assert len(loaded.templates) == 2  # the data template and the options template
    assert len(loaded.if_names) == (200 if names_kept else 0)
    assert (state.limits_hit["decoder_state_bytes"] == 0) == names_kept
    assert sp.next_serial(tmp_path, limits.decoder_state_bytes) == 8


def test_a_state_file_of_the_old_format_still_loads(tmp_path):
    state = state_with_names(3)
    (tmp_path / sp.STATE_FILE).write_text(json.dumps({"after_segment": "seg-000000004.spool", "state": state.to_json()}))  # fmt: skip
    loaded, after = _load_state(tmp_path)
    assert after == "seg-000000004.spool"
    assert len(loaded.templates) == 2 and len(loaded.if_names) == 3


def test_serials_do_not_repeat_when_the_state_file_is_refused(tmp_path):
    # review: a refused decoder-state.json took after_segment along: next_serial restarted at 1, and new segments
    # reused seg-000000001.spool, a name that earlier flows' `source` column cites
    limits = dataclasses.replace(
        DEFAULT_LIMITS, decoder_state_bytes=64
    )  # no state fits: every load refuses it
    spool = tmp_path / "spool"
    for serial in (1, 2, 3):
        write_segment(spool, serial, [v9_datagram(serial, [("10.0.0.1", 1000 + serial)], template=True)])
    assert commit_pending(Lake(tmp_path / "lake"), spool, keep=False, limits=limits) == 3
    assert sp.closed_segments(spool) == []
    assert sp.read_state_file(spool, limits.decoder_state_bytes)[0] is None  # refused
    assert sp.next_serial(spool, limits.decoder_state_bytes) == 4


def test_a_file_planted_under_the_next_segment_name_is_not_written_through(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.symlink(target, spool / "seg-000000001.open")
    with pytest.raises(FileExistsError):
        sp.SegmentWriter(spool, 1)
    assert target.read_text() == "keep me"


# ---- 1. a full spool disk ------------------------------------------------------------------------------------


def committer_pids(spool: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"tracepipe.collector" in cmdline and str(spool).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def _collector_on_a_4_mib_spool(
    tmp_path: Path, rotate: str
) -> tuple[Path, Path, Path, Path, subprocess.Popen]:
    """`tracepipe collect` on 127.0.0.1 (any port) whose spool is a 4 MiB filesystem of its own, in a mount
    namespace of the collector's -> (spool, lake, stats file, log, process)."""
    spool = tmp_path / "spool"
    lake = tmp_path / "lake"
    spool.mkdir()
    stats_file = tmp_path / "stats.json"
    log = tmp_path / "collect.log"
    collect = [
        sys.executable, "-m", "tracepipe.cli", "collect", "--listen", "127.0.0.1:0", "--lake", str(lake),
        "--spool", str(spool), "--rotate", rotate, "--status-interval", "0.5s", "--stats-file", str(stats_file),
    ]  # fmt: skip
    unshare = (
        ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    )
    shell = f'mount -t tmpfs -o size=4m tmpfs "{spool}" && exec "$@"'
    with open(log, "wb") as out:
        proc = subprocess.Popen([*unshare, "sh", "-c", shell, "sh", *collect], stdout=out, stderr=out)
    return spool, lake, stats_file, log, proc


def test_a_full_spool_disk_recovers_once_the_committer_frees_it(tmp_path):
    # review: on a full spool filesystem the committer died saving decoder-state.json / committer.json (only
    # LakeError was caught), the collector restarted it 50 times in 40 s, the committed segment was never
    # deleted and no later flow was ever committed. Now the receive loop keeps a free-space reserve (drops
    # counted), and the committer saves the state within it, deletes segments, and the next flows land.
    spool, lake, stats_file, log, proc = _collector_on_a_4_mib_spool(tmp_path, "1s")
    try:
        wait_until(lambda: stats_file.exists() and committer_pids(spool), what="the collector")
        port = int(json.loads(stats_file.read_text())["listen"][0].rsplit(":", 1)[1])
        (committer,) = committer_pids(spool)
        os.kill(committer, signal.SIGSTOP)  # the committer falls behind a flood
        stats = lambda: json.loads(stats_file.read_text())  # noqa: E731
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            junk = b"\x00\x05" + b"J" * 60000
            deadline = time.monotonic() + 120
            while stats().get("spool_reserve_drops", 0) + stats()["spool_write_errors"] == 0:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"no datagram dropped: {stats()}"
                for _ in range(20):
                    sender.sendto(junk, ("127.0.0.1", port))
                time.sleep(0.01)
            for _ in range(
                3000
            ):  # then tiny batches, which fill the last free bytes when nothing holds a reserve
                sender.sendto(b"\x00\x05xx", ("127.0.0.1", port))
                time.sleep(0.001)
            os.kill(committer, signal.SIGCONT)
            seq = 0

            def landed() -> bool:
                nonlocal seq
                sender.sendto(v5_datagram(seq, [("10.0.0.1", 2000 + seq)]), ("127.0.0.1", port))
                seq += 1
                return bool(lake_src_ports(lake))

            wait_until(landed, what="a flow sent after the disk was full, in the lake")
            wait_until(lambda: stats()["spool_backlog_segments"] == 0, what="the backlog to drain")
        assert committer_pids(spool) == [committer]  # never died, never restarted
        # the reserve stopped the loop before the disk was full
        assert stats()["spool_reserve_drops"] > 0 and stats()["spool_write_errors"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()
    finally:
        for pid in committer_pids(spool):  # (a stopped one, when the test failed before SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "the committer exited" not in log.read_text()


def test_a_spool_smaller_than_one_rotation_hands_its_segment_to_the_committer(tmp_path):
    """Collector review (session 35): at the spool's free-space reserve the open segment stayed open until the
    next rotation (`--rotate 1h` here), so nothing was committed, nothing freed, and every datagram was dropped
    for the rest of the hour though the lake had room. Now the segment is handed over at once: flows sent after
    the spool filled land within seconds, the log says when there is room again, and the status says how long
    the oldest segment has waited."""
    spool, lake, stats_file, log, proc = _collector_on_a_4_mib_spool(tmp_path, "1h")
    try:
        wait_until(lambda: stats_file.exists() and committer_pids(spool), what="the collector")
        port = int(json.loads(stats_file.read_text())["listen"][0].rsplit(":", 1)[1])
        stats = lambda: json.loads(stats_file.read_text())  # noqa: E731
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            junk = b"\x00\x05" + b"J" * 60000  # (v5 headers of no record: land nothing, fill the spool)
            deadline = time.monotonic() + 120
            while stats().get("spool_reserve_drops", 0) == 0:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"no datagram dropped: {stats()}"
                for _ in range(20):
                    sender.sendto(junk, ("127.0.0.1", port))
                time.sleep(0.01)
            for _ in range(3000):  # then tiny ones, which fill the last bytes above the reserve
                sender.sendto(b"\x00\x05xx", ("127.0.0.1", port))
                time.sleep(0.001)
            time.sleep(2)  # (the committer's turn: it lands the segments handed over and deletes them)
            spooled = stats()["datagrams"]
            # the flows sent now are spooled (the committer drained what was handed over), not dropped
            for seq in range(50):
                sender.sendto(v5_datagram(seq, [("10.0.0.1", 2000 + seq)]), ("127.0.0.1", port))
                time.sleep(0.05)
            wait_until(
                lambda: stats()["datagrams"] >= spooled + 50,
                timeout=60,
                what="the flows sent after it, spooled",
            )
            assert stats()["spool_backlog_oldest_s"] >= 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()
        assert set(lake_src_ports(lake)) >= {2000 + seq for seq in range(50)}
        assert "the spool has room again" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _lake_rejects(lake: Path) -> list[dict]:
    files = sorted(lake.glob("rejects/**/*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def _failing_on(marked: set[bytes], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The decoder, raising on any call that holds one of `marked` (after scribbling a sampling rate into the state,
    as a bug half-way through a datagram could); returns the list of its call sizes."""
    from tracepipe.ingest import netflow

    real = netflow.decode_datagrams
    calls: list[int] = []

    def decode(payloads, exporters, *args, **kwargs):
        calls.append(len(payloads))
        if any(p in marked for p in payloads):
            state = args[3]
            state.sampling[("203.0.113.66", 77)] = 1000
            raise IndexError("planted decoder bug")
        return real(payloads, exporters, *args, **kwargs)

    monkeypatch.setattr(netflow, "decode_datagrams", decode)
    return calls


def test_a_datagram_the_decoder_raises_on_is_set_aside_and_the_rest_of_its_segment_lands(
    tmp_path, monkeypatch
):
    """README Limits (session 25): an exception inside the decoder sent the whole collector segment to failed/,
    every sender's flows of it lost. Now the segment is decoded again from the saved state in halves: the
    datagram that raises goes to failed/ (for a bug report) with a reject naming its offset, the others land,
    and the templates learned before it still decode the data after it."""
    spool, lake = tmp_path / "spool", tmp_path / "lake"
    bad = v5_datagram(1, [("10.0.0.66", 1066)])
    datagrams = [
        v9_datagram(0, [("10.0.0.1", 1001)], template=True),
        v5_datagram(0, [("10.0.0.2", 1002)]),
        bad,
        v9_datagram(1, [("10.0.0.3", 1003)], template=False),  # needs the template of the first datagram
        v5_datagram(2, [("10.0.0.4", 1004)]),
    ]
    segment = write_segment(spool, 1, datagrams)
    block = next(sp.read_blocks(segment))
    bad_offset = block.payload_offset + sum(len(d) for d in datagrams[:2])
    calls = _failing_on({bad}, monkeypatch)
    assert commit_pending(Lake(lake), spool, keep=False) == 1
    assert lake_src_ports(lake) == [1001, 1002, 1003, 1004]
    errors = [r for r in _lake_rejects(lake) if r["reason"] == "decoder error"]
    assert len(errors) == 1
    assert errors[0]["offset"] == bad_offset and errors[0]["source"] == str(segment.resolve())
    assert "IndexError: planted decoder bug" in errors[0]["detail"] and "failed/seg-" in errors[0]["detail"]
    kept = list(sp.read_blocks(spool / sp.FAILED_DIR / segment.name))
    assert [bytes(b.payload) for b in kept] == [bad] and len(kept[0].records) == 1
    assert not segment.exists()  # committed and removed (keep=False)
    assert calls[0] == len(datagrams) and len(calls) <= 2 + 2 * 3  # the whole, then halves down to one
    # the state saved after the segment holds nothing of what the failed attempts scribbled into it
    saved = (spool / "decoder-state.json").read_text()
    assert "203.0.113.66" not in saved


def test_a_segment_whose_datagrams_all_raise_is_set_aside_in_a_bounded_number_of_attempts(
    tmp_path, monkeypatch
):
    spool, lake = tmp_path / "spool", tmp_path / "lake"
    good = [v5_datagram(i, [("10.0.0.1", 2000 + i)]) for i in range(3)]
    bad = [v5_datagram(100 + i, [("10.0.0.66", 3000 + i)]) for i in range(400)]
    segment = write_segment(spool, 1, good + bad)
    calls = _failing_on(set(bad), monkeypatch)
    assert commit_pending(Lake(lake), spool, keep=False) == 1
    assert lake_src_ports(lake) == [2000, 2001, 2002]
    errors = [r for r in _lake_rejects(lake) if r["reason"] == "decoder error"]
    from tracepipe.ingest import netflow

    kept = [bytes(p) for b in sp.read_blocks(spool / sp.FAILED_DIR / segment.name) for p in _payloads(b)]
    assert kept == bad  # every datagram set aside, in order, none lost
    assert 1 < len(errors) < len(bad)  # halved while the budget lasted, then pieces set aside whole
    # attempts: the first pass, the budget, then the halves still waiting (one per halving level)
    assert len(calls) <= 1 + netflow.ISOLATE_MAX_ATTEMPTS + int(np.log2(len(good + bad))) + 1


def _payloads(block: sp.Block) -> list[memoryview]:
    ends = np.cumsum(block.records["length"].astype(np.int64))
    return [
        block.payload[e - n : e] for e, n in zip(ends.tolist(), block.records["length"].tolist(), strict=True)
    ]


def test_a_spool_that_cannot_keep_the_failing_datagrams_keeps_the_segment_for_later(tmp_path, monkeypatch):
    """failed/<segment> cannot be written (here a directory of that name is in the way; a full disk likewise):
    nothing is committed, the segment stays in the spool (SpoolNotWritable: the committer retries), and it
    lands once the file can be written."""
    spool, lake = tmp_path / "spool", tmp_path / "lake"
    bad = v5_datagram(1, [("10.0.0.66", 1066)])
    segment = write_segment(spool, 1, [v5_datagram(0, [("10.0.0.2", 1002)]), bad])
    (spool / sp.FAILED_DIR / segment.name).mkdir(parents=True)
    _failing_on({bad}, monkeypatch)
    with pytest.raises(SpoolNotWritable, match="cannot keep the datagrams the decoder failed on"):
        commit_pending(Lake(lake), spool, keep=False)
    assert segment.exists() and lake_src_ports(lake) == []
    (spool / sp.FAILED_DIR / segment.name).rmdir()
    assert commit_pending(Lake(lake), spool, keep=False) == 1
    assert lake_src_ports(lake) == [1002]


def test_done_and_failed_planted_as_symlinks_are_replaced_not_written_through(tmp_path, monkeypatch):
    """Whoever can write the lake can write its spool: a symlink planted as done/ or failed/ (to any folder of
    the host) made the committer move segments, and write the datagrams the decoder failed on, into its target
    (as the collector's user, root on many sites). Now each is replaced by a directory of its own."""
    spool, lake, elsewhere = tmp_path / "spool", tmp_path / "lake", tmp_path / "elsewhere"
    elsewhere.mkdir()
    bad = v5_datagram(1, [("10.0.0.66", 1066)])
    segment = write_segment(spool, 1, [v5_datagram(0, [("10.0.0.2", 1002)]), bad])
    (spool / sp.FAILED_DIR).symlink_to(elsewhere)
    (spool / sp.DONE_DIR).symlink_to(elsewhere)
    _failing_on({bad}, monkeypatch)
    assert commit_pending(Lake(lake), spool, keep=True) == 1
    assert lake_src_ports(lake) == [1002]
    assert list(elsewhere.iterdir()) == []
    for name in (sp.FAILED_DIR, sp.DONE_DIR):
        assert not (spool / name).is_symlink() and (spool / name / segment.name).is_file()
