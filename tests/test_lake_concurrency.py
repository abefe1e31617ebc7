"""Issue 11, Must 2: concurrent writers, nothing lost.

For a minute, at once and on one lake: the real collector receives the demo story's softflowd v9 export
(replayed datagram by datagram over UDP on 127.0.0.1), `tracepipe ingest vm` lands the story's Nova
notifications in chunks whose late events change the leases of the day the flows are on (each run re-attributes
that day), a compactor merges small files in a loop, and a reader counts `flows` and `flows_attributed` over and
over. Meanwhile the writers (collector, its committer alone, `ingest vm`, compactor) are killed with SIGKILL at
random moments (seeded) and restarted. Then:
- the reader never failed, and its counts never dipped and never exceeded the export (no row missing or doubled
  in any snapshot);
- the lake holds every flow of the export exactly once: the same multiset as `ingest netflow` of the capture into
  a fresh lake (datagrams still in the socket buffer at a kill are not received, as with any UDP collector: the
  exporter sends those again at the end, the way the test learns them from the spool);
- the leases equal those of a clean run, and the attribution equals a from-scratch `attribute_flows` of a copy of
  the lake (flows and flows_attributed) and the clean run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import empty_lake, ingest_in_process
from conftest import ingest_vm as ingest_vm_in_process
from support import probes
from test_collector import spooled_payloads, start_collector, stop_collector

from tests.conftest import FLOW_KEY_AND_COUNTERS
from tracepipe.correlate.attribution import attribute_flows
from tracepipe.demo import STORY_DIR
from tracepipe.lake import Lake
from tracepipe.query import connect

EXPORT = STORY_DIR / "netflow" / "openstack-softflowd-v9.pcap"  # softflowd v9, 436 datagrams, one UTC day
NOVA = STORY_DIR / "nova" / "notifications.jsonl"
SEED = int(os.environ.get("TRACEPIPE_CHAOS_SEED", "11"))  # another seed: other kill moments
CHAOS_S = 60.0
SEND_S = 40.0  # the export is sent over this much of the minute (longer: paused while the collector is down)
VM_CHUNKS = 7
KILL_EVERY_S = (2.0, 4.5)  # collector, its committer or the compactor
DRAIN_S = 240.0  # at most this long for a stopped collector to commit its spooled backlog
VM_KILL_AFTER_S = (0.4, 2.0)  # an `ingest vm` run takes ~1-3 s here (start-up ~0.7 s)
FLOW_COLUMNS = ("ts_start", "ts_end", *FLOW_KEY_AND_COUNTERS)
WHO = ("src_vm", "dst_vm")

# A reader as an analyst runs it: a new session per query, on a new Lake (the latest commits) and on one Lake that
# lives as long as the process (refreshed from the log); one JSON line per sample, errors included.
READER = """
import json, sys, time, traceback
from pathlib import Path
from tracepipe.lake import Lake
from tracepipe.query import connect
root, out, stop = sys.argv[1], sys.argv[2], Path(sys.argv[3])
kept = Lake(root)
with open(out, "a") as sink:
    n = 0
    while not stop.exists():
        mode = "kept" if n % 2 else "fresh"
        n += 1
        try:
            con = connect(kept if mode == "kept" else Lake(root))
            flows = con.sql("select count(*) from flows").fetchall()[0][0]
            attributed = con.sql("select count(*) from flows_attributed").fetchall()[0][0]
            con.close()
            sink.write(json.dumps({"mode": mode, "flows": flows, "attributed": attributed}) + "\\n")
        except Exception:
            sink.write(json.dumps({"mode": mode, "error": traceback.format_exc()}) + "\\n")
        sink.flush()
        time.sleep(0.05)
"""

# `tracepipe compact` in a loop (by the library call, so that the test does not depend on the CLI command)
COMPACTOR = """
import sys, time
from tracepipe.lake import Lake
root = sys.argv[1]
while True:
    lake = Lake(root)
    for name in ("flows", "vm_logs", "vm_events", "_ingest"):
        lake.compact(name, min_files=2)
    time.sleep(0.3)
"""


def python(script: str, *args: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", script, *args], stdout=handle, stderr=handle, stdin=subprocess.DEVNULL
        )


def ingest_vm(lake: Path, chunk: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "tracepipe.cli", "ingest", "vm", "--lake", str(lake), str(chunk)],
            stdout=handle,
            stderr=handle,
            stdin=subprocess.DEVNULL,
        )


def committer_pid(collector_pid: int) -> int | None:
    """The collector's committer process (its only child), if it runs."""
    try:
        children = Path(f"/proc/{collector_pid}/task/{collector_pid}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        with contextlib.suppress(OSError):
            if b"tracepipe.collector" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    return None


def rows(lake: Path, sql: str) -> Counter:
    con = connect(Lake(lake))
    try:
        return Counter(con.sql(sql).fetchall())
    finally:
        con.close()


def diff(want: Counter, have: Counter, limit: int = 10) -> str:
    missing = sorted((want - have).elements(), key=str)
    extra = sorted((have - want).elements(), key=str)
    lines = [f"{len(missing)} missing:", *[f"  - {r}" for r in missing[:limit]]]
    lines += [f"{len(extra)} extra:", *[f"  + {r}" for r in extra[:limit]]]
    return "\n".join(lines)


def split_lines(path: Path, parts: int, out: Path) -> list[Path]:
    lines = path.read_text().splitlines(keepends=True)
    size = -(-len(lines) // parts)
    out.mkdir()
    chunks = []
    for i in range(parts):
        chunk = out / f"nova-{i:02d}.jsonl"
        chunk.write_text("".join(lines[i * size : (i + 1) * size]))
        chunks.append(chunk)
    return chunks


def enough_kills(kills: Counter) -> bool:
    """Every kind of writer killed, at least 10 kills in all."""
    return sum(kills.values()) >= 10 and set(kills) == {"collector", "committer", "ingest vm", "compactor"}


class Exporter(threading.Thread):
    """Sends the export's datagrams in order from one socket, paced over `seconds`; pauses while `up` is clear
    (the collector is down: its datagrams would be refused)."""

    def __init__(self, payloads: list[bytes], dest: tuple[str, int], seconds: float) -> None:
        super().__init__(daemon=True)
        self.payloads = payloads
        self.dest = dest
        self.gap = seconds / len(payloads)
        self.up = threading.Event()
        self.up.set()
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            for payload in self.payloads:
                while not self.up.wait(0.1):
                    if self.stop.is_set():
                        return
                if self.stop.is_set():
                    return
                with contextlib.suppress(ConnectionRefusedError):  # the ICMP of a datagram sent at a kill
                    sock.sendto(payload, self.dest)
                self.sent += 1
                time.sleep(self.gap)


def test_kill_9_writers_while_readers_count_nothing_lost_nothing_doubled(tmp_path):
    rng = random.Random(SEED)
    payloads = probes.export_payloads(EXPORT)
    assert len(payloads) == len(set(payloads)) == 436  # each datagram is told apart by its sequence number

    # the clean run: the capture and every notification, each ingested once into a fresh lake
    clean = tmp_path / "clean"
    ingest_in_process([EXPORT], clean)
    ingest_vm_in_process(Lake(clean), [NOVA])

    lake = tmp_path / "lake"
    empty_lake(lake)  # readers start before the first flow lands: a lake with no flows reads as empty views
    spool = tmp_path / "spool"
    logs = tmp_path / "logs"
    logs.mkdir()
    chunks = split_lines(NOVA, VM_CHUNKS, tmp_path / "nova")
    collect_args = ("--spool", str(spool), "--rotate", "1s", "--keep-segments")
    collector = start_collector(logs, lake, *collect_args)
    port = collector.ports["4"]
    exporter = Exporter(payloads, ("127.0.0.1", port), SEND_S)
    stop_reading = tmp_path / "stop-reading"
    samples = tmp_path / "reader.jsonl"
    reader = python(READER, str(lake), str(samples), str(stop_reading), log=logs / "reader.log")
    compactor = python(COMPACTOR, str(lake), log=logs / "compactor.log")
    vm: subprocess.Popen | None = None
    vm_kill_at = 0.0
    chunk_index = 0
    kills: Counter = Counter()
    started = time.monotonic()
    chunk_due = [started + i * (CHAOS_S * 0.75 / VM_CHUNKS) for i in range(VM_CHUNKS)]
    exporter.start()
    try:
        next_kill = started + rng.uniform(*KILL_EVERY_S)
        # a minute of chaos; on a loaded machine (slow restarts, fewer kills in it) on until every writer has
        # been killed and 10 kills in all, for at most three minutes
        while time.monotonic() < started + CHAOS_S or (
            not enough_kills(kills) and time.monotonic() < started + 3 * CHAOS_S
        ):
            now = time.monotonic()
            if vm is not None and vm.poll() is not None:
                assert vm.returncode in (0, -signal.SIGKILL), (logs / "vm.log").read_text()
                if vm.returncode == 0:
                    chunk_index += 1
                vm = None
            if vm is None and chunk_index < VM_CHUNKS and now >= chunk_due[chunk_index]:
                vm = ingest_vm(
                    lake, chunks[chunk_index], logs / "vm.log"
                )  # a killed run: the same chunk again
                # every other run is killed somewhere in its landing, lease rebuild or re-attribution
                # (until one has been killed: how long a run takes depends on the machine's load)
                kill = rng.random() < 0.5 or kills["ingest vm"] == 0
                vm_kill_at = now + rng.uniform(*VM_KILL_AFTER_S) if kill else float("inf")
            if vm is not None and now >= vm_kill_at:
                vm.kill()
                if vm.wait() == -signal.SIGKILL:
                    kills["ingest vm"] += 1
                else:  # it had just finished
                    assert vm.returncode == 0, (logs / "vm.log").read_text()
                    chunk_index += 1
                vm = None
            if now >= next_kill:
                next_kill = now + rng.uniform(*KILL_EVERY_S)
                victim = rng.choice(["collector", "committer", "compactor"])
                if victim == "compactor":
                    compactor.kill()
                    compactor.wait()
                    compactor = python(COMPACTOR, str(lake), log=logs / "compactor.log")
                elif victim == "committer":
                    pid = committer_pid(collector.proc.pid)
                    if pid is None:
                        continue  # the collector is starting it again
                    os.kill(pid, signal.SIGKILL)  # the collector notices and starts another
                else:
                    exporter.up.clear()
                    collector.proc.kill()
                    collector.proc.wait()
                    collector = start_collector(logs, lake, *collect_args, listen=(f"127.0.0.1:{port}",))
                    exporter.up.set()
                kills[victim] += 1
            time.sleep(0.05)

        # calm: the exporter and `ingest vm` finish, the collector drains and stops cleanly
        calm = time.monotonic() - started
        exporter.join(timeout=60)
        assert not exporter.is_alive() and exporter.sent == len(payloads)
        if vm is not None:
            assert vm.wait(60) == 0 or vm.returncode == -signal.SIGKILL, (logs / "vm.log").read_text()
            chunk_index += vm.returncode == 0
        for chunk in chunks[chunk_index:]:
            assert ingest_vm(lake, chunk, logs / "vm.log").wait(60) == 0, (logs / "vm.log").read_text()
        time.sleep(1.5)  # the last datagrams reach the spool, the compactor and the reader see the end
        # a stop commits the spooled backlog first: on a loaded machine (the suite runs on every core) commits
        # fall behind the 1 s rotation during the chaos, and draining ~40 segments took over a minute once
        assert stop_collector(collector, timeout=DRAIN_S) == 0, collector.stderr.read_text()
        # datagrams in the socket buffer (or the batch being received) at a collector kill never reached the
        # spool: the exporter sends those again
        missing = set(payloads) - set(spooled_payloads(spool))
        if missing:
            collector = start_collector(logs, lake, *collect_args, listen=(f"127.0.0.1:{port}",))
            probes.replay_udp([p for p in payloads if p in missing], ("127.0.0.1", port))
            deadline = time.monotonic() + 20
            while set(payloads) - set(spooled_payloads(spool)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert stop_collector(collector, timeout=DRAIN_S) == 0, collector.stderr.read_text()
    finally:
        exporter.stop.set()
        exporter.up.set()
        stop_reading.touch()
        for proc in (collector.proc, compactor, vm):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        probes.stop_process(reader, timeout=30)
    elapsed = time.monotonic() - started
    print(
        f"{elapsed:.0f} s, kills {dict(kills)}, {len(missing)} datagrams sent again, calm after {calm:.0f} s"
    )

    # every writer was killed, at least 10 times in all
    assert enough_kills(kills), kills
    spooled = spooled_payloads(spool)
    assert len(spooled) == len(set(spooled)) and set(spooled) == set(payloads), "a datagram spooled twice"
    assert not (spool / "failed").exists() and not list(spool.glob("seg-*"))
    assert len(missing) < 100, f"{len(missing)} datagrams lost at kills: more than a socket buffer"

    # the readers: no error, and no snapshot with a row missing or doubled
    read = [json.loads(line) for line in samples.read_text().splitlines()]
    errors = [s["error"] for s in read if "error" in s]
    assert not errors, f"{len(errors)} reader errors, the first:\n{errors[0]}"
    assert len(read) >= 30, f"only {len(read)} reader samples in {elapsed:.0f} s"
    for mode in ("fresh", "kept"):
        counts = [s["flows"] for s in read if s["mode"] == mode]
        assert counts == sorted(counts), f"{mode} reader: flows count went down: {counts}"
    assert all(s["flows"] == s["attributed"] for s in read), "flows_attributed differs from flows"
    clean_flows = rows(clean, f"select {', '.join(FLOW_COLUMNS)} from flows")
    total = sum(clean_flows.values())
    assert total == 13621 and max(s["flows"] for s in read) <= total
    assert max(s["flows"] for s in read) > total // 2  # the reader saw the lake fill up

    # the final lake: every flow of the export exactly once
    chaos_flows = rows(lake, f"select {', '.join(FLOW_COLUMNS)} from flows")
    assert chaos_flows == clean_flows, diff(clean_flows, chaos_flows)
    assert len(list((lake / "flows").rglob("*.parquet"))) > len(Lake(lake).files("flows"))  # compaction ran

    # the leases of a clean run, and the attribution of a from-scratch run on a copy of the final lake
    lease_sql = "select addr, vm_id, valid_from, valid_to, end_reason from vm_leases"
    assert rows(lake, lease_sql) == rows(clean, lease_sql), diff(
        rows(clean, lease_sql), rows(lake, lease_sql)
    )
    scratch = tmp_path / "scratch"
    shutil.copytree(lake, scratch)
    attribute_flows(Lake(scratch))
    stored = f"select {', '.join(FLOW_COLUMNS + WHO)} from flows"
    chaos_stored = rows(lake, stored)
    assert chaos_stored == rows(scratch, stored), diff(rows(scratch, stored), chaos_stored)
    assert chaos_stored == rows(clean, stored), diff(rows(clean, stored), chaos_stored)
    resolved = (
        f"select {', '.join(FLOW_COLUMNS + WHO)}, src_vm_name, dst_vm_name, src_project from flows_attributed"
    )
    assert rows(lake, resolved) == rows(scratch, resolved), diff(
        rows(scratch, resolved), rows(lake, resolved)
    )
    assert (
        sum(1 for row in chaos_stored.elements() if row[-2] or row[-1]) > 1000
    )  # flows were attributed at all


@pytest.mark.parametrize("killed_after", ["events landed", "leases rebuilt"])
def test_a_killed_ingest_vm_is_finished_by_its_rerun(killed_after, tmp_path):
    """Regression (found by the test above): a rerun of a killed `ingest vm` skips its sources (their events
    are in the lake), and so rebuilt no lease and re-attributed no day: the lake kept the leases and the flow
    attribution from before the killed run for good."""
    from tracepipe.correlate.leases import rebuild_leases
    from tracepipe.ingest.cloud import parse_cloud_text
    from tracepipe.lake import hash_file, ingest_table

    first, late = split_lines(NOVA, 2, tmp_path / "nova")
    clean = tmp_path / "clean"
    ingest_in_process([EXPORT], clean)
    ingest_vm_in_process(Lake(clean), [first, late])
    lake = tmp_path / "lake"
    ingest_in_process([EXPORT], lake)
    ingest_vm_in_process(Lake(lake), [first])
    events, rejects = parse_cloud_text(late.read_text(), str(late))  # what the killed run had done
    ingest_table(Lake(lake), "vm_events", str(late.absolute()), hash_file(late), [events], [rejects])
    if killed_after == "leases rebuilt":
        assert rebuild_leases(Lake(lake)) == {"2025-06-17"}
    stored = f"select {', '.join(FLOW_COLUMNS + WHO)} from flows"
    assert rows(lake, stored) != rows(clean, stored)

    rerun, done = ingest_vm_in_process(Lake(lake), [late])
    assert rerun.skipped == 1 and done.days == ["2025-06-17"]
    lease_sql = "select addr, vm_id, valid_from, valid_to from vm_leases"
    assert rows(lake, lease_sql) == rows(clean, lease_sql)
    assert rows(lake, stored) == rows(clean, stored)
    assert ingest_vm_in_process(Lake(lake), [late])[1].days == []  # once finished, a rerun rewrites nothing


CLI = [sys.executable, "-m", "tracepipe.cli"]
_HOLDER = """
import sys, time
from tracepipe.lake import Lake
with Lake(sys.argv[1]).lock(sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("lock", ["flows", "ingest-flows"])
def test_a_lock_held_by_a_stopped_process_is_waited_for_a_bounded_time_naming_it(tmp_path, lock):
    """A holder stopped (SIGSTOP) or hung kept every later command waiting for ever, with nothing on stderr,
    and an append's commit too, whatever README said (failure-injection review, session 38): now a command
    waits TRACEPIPE_LOCK_WAIT seconds at most, says whom it waits for, and exits 4 naming the holder."""
    lake_dir = tmp_path / "lake"
    capture = STORY_DIR / "netflow" / "opennebula-softflowd-ipfix.pcap"
    first = subprocess.run(
        [*CLI, "ingest", "netflow", "--lake", str(lake_dir), str(capture)], capture_output=True
    )
    assert first.returncode == 0, first.stderr
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lake_dir), lock], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGSTOP)
        command = ["compact", "--lake", str(lake_dir), "--min-files", "2"]
        if lock.startswith("ingest-"):  # an append: its commit takes the dataset's ingest lock
            other = STORY_DIR / "netflow" / "openstack-softflowd-v9.pcap"
            command = ["ingest", "netflow", "--lake", str(lake_dir), str(other)]
        env = {**os.environ, "TRACEPIPE_LOCK_WAIT": "2"}
        started = time.monotonic()
        run = subprocess.run(CLI + command, capture_output=True, text=True, env=env, timeout=120)
        assert time.monotonic() - started < 60
        assert run.returncode == 4, (run.stdout, run.stderr)
        said = run.stdout + run.stderr
        assert f"the {lock} lock" in said and f"pid {holder.pid}" in said and "TRACEPIPE_LOCK_WAIT" in said
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait()
    # the holder gone, the same command goes through
    again = subprocess.run(CLI + command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout, again.stderr)
