"""Sources of one run committed together (lake.SourceBatch): a relay's folder of a syslog file per VM, or a folder of
OpenNebula's per-VM logs, paid two Delta commits, their fsyncs and a compaction check per file (200 syslog files
of 500 lines: 13.3 s, against 1.4 s for the same lines in one file). Each source keeps its own files (named after
its content hash) and manifest row: what lands, what a rerun skips and what a kill between the commits leaves are
as they were, source by source."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracepipe.ingest.vm import ingest_syslog_files, ingest_vm_files
from tracepipe.lake import MANIFEST_DIR, Lake, SourceBatch

STORY = Path(__file__).resolve().parent.parent / "sample_data" / "story"


def _logs(folder: Path, files: int, lines: int = 3, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(start, start + files):
        (folder / f"vm-{f:04d}.log").write_text(
            "".join(
                f"Mar 12 10:{i:02d}:{f % 60:02d} vm-{f} sshd[{100 + i}]: Failed password for root from "
                f"203.0.113.{i + 1} port {40000 + f} ssh2\n"
                for i in range(lines)
            )
        )
    return folder


def _commits(lake: Lake, name: str) -> int:
    """How many commits of sources the table's log holds (not its creation, compactions, attributions)."""
    return sum("content_hash" in info for info in Lake(lake.root).commit_infos(name, 1000))


def test_a_folder_of_many_syslog_files_lands_in_a_few_commits_with_every_line_once(tmp_path):
    folder = _logs(tmp_path / "relay", 70)
    lake = Lake(tmp_path / "lake")
    report = ingest_syslog_files(lake, [folder], year=2024)
    assert len(report.results) == 70 and not any(r.skipped for r in report.results)
    # 70 sources in batches of 64: two commits of rows and two of manifest rows (before: 70 of each)
    assert (_commits(lake, "vm_logs"), _commits(lake, MANIFEST_DIR)) == (2, 2)
    rows = Lake(lake.root).read("vm_logs")
    assert rows.num_rows == 210
    assert sorted(set(rows.column("source").to_pylist())) == sorted(
        str(p.absolute()) for p in folder.iterdir()
    )
    manifest = Lake(lake.root).manifest().to_pylist()
    assert sorted(r["source"] for r in manifest) == sorted(str(p.absolute()) for p in folder.iterdir())
    assert {r["rows"] for r in manifest} == {3}
    for result in report.results:  # each source's result names its own files, version and stats
        assert result.version is not None and result.rows == 3 and result.stats["lines"] == 3
        assert result.files and all(result.content_hash[:16] in f or "vm_logs/" in f for f in result.files)
    assert report.touched_days == ["2024-03-12"]
    # a rerun skips them all; two more files and one grown land their news only
    assert all(r.skipped for r in ingest_syslog_files(Lake(lake.root), [folder], year=2024).results)
    _logs(folder, 2, start=70)
    with open(folder / "vm-0003.log", "a") as grown:
        grown.write("Mar 12 11:00:00 vm-3 sshd[999]: Accepted publickey for alice\n")
    again = ingest_syslog_files(Lake(lake.root), [folder], year=2024)
    assert sorted(Path(r.source).name for r in again.results if not r.skipped) == [
        "vm-0003.log", "vm-0070.log", "vm-0071.log"
    ]  # fmt: skip
    assert Lake(lake.root).read("vm_logs").num_rows == 210 + 6 + 1


def test_the_same_content_twice_in_one_batch_lands_once(tmp_path):
    folder = _logs(tmp_path / "relay", 3)
    (folder / "copy.log").write_bytes((folder / "vm-0001.log").read_bytes())
    report = ingest_syslog_files(Lake(tmp_path / "lake"), [folder], year=2024)
    landed = sorted(Path(r.source).name for r in report.results if not r.skipped)
    assert landed == [
        "copy.log",
        "vm-0000.log",
        "vm-0002.log",
    ]  # (the first of the two in the folder's order)
    assert Lake(tmp_path / "lake").read("vm_logs").num_rows == 9


def test_a_batch_flushes_at_its_row_budget(tmp_path):
    folder = _logs(tmp_path / "relay", 6, lines=5)
    lake = Lake(tmp_path / "lake")
    flushes: list[int] = []
    real = SourceBatch.flush

    def counted(self):
        flushes.append(len(self._items))
        real(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SourceBatch, "flush", counted)
        patch.setattr(SourceBatch.__init__, "__defaults__", (64, 10))  # (max_sources, max_rows)
        ingest_syslog_files(lake, [folder], year=2024)
    assert flushes == [2, 2, 2, 0]  # (10 rows: every second file; then the end's)
    assert Lake(lake.root).read("vm_logs").num_rows == 30


def test_a_run_stopped_between_a_batch_s_rows_and_its_manifest_rows_is_finished_by_the_rerun(
    tmp_path, monkeypatch
):
    """The kill the commit order is for: rows committed, manifest rows not. The rerun finds each source's
    files by their names (Lake.already_ingested), records its manifest row, and lands nothing twice."""
    folder = _logs(tmp_path / "relay", 5)
    lake = Lake(tmp_path / "lake")

    def killed(self, rows):
        raise KeyboardInterrupt  # (the process stops here)

    with monkeypatch.context() as stopped:
        stopped.setattr(Lake, "_write_manifest_rows", killed)
        with pytest.raises(KeyboardInterrupt):
            ingest_syslog_files(lake, [folder], year=2024)
    assert Lake(lake.root).read("vm_logs").num_rows == 15  # (committed, no manifest row yet)
    again = ingest_syslog_files(Lake(lake.root), [folder], year=2024)
    assert all(r.skipped for r in again.results)
    assert Lake(lake.root).read("vm_logs").num_rows == 15
    assert len(Lake(lake.root).manifest()) == 5


def test_a_run_stopped_before_a_batch_commits_leaves_nothing_and_the_rerun_lands_all(tmp_path, monkeypatch):
    folder = _logs(tmp_path / "relay", 5)
    lake = Lake(tmp_path / "lake")
    with monkeypatch.context() as stopped:
        stopped.setattr(Lake, "commit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            ingest_syslog_files(lake, [folder], year=2024)
    # nothing committed, and no file of the sources set aside left in the table's folders
    assert Lake(lake.root).table("vm_logs") is None or Lake(lake.root).read("vm_logs").num_rows == 0
    assert not [p for p in (tmp_path / "lake").rglob("*.parquet") if "_delta_log" not in p.parts]
    report = ingest_syslog_files(Lake(lake.root), [folder], year=2024)
    assert not any(r.skipped for r in report.results) and Lake(lake.root).read("vm_logs").num_rows == 15


def test_nova_notifications_a_file_each_land_as_the_one_file_does(tmp_path):
    """VM sources too (OpenNebula's log per VM, a relay's file per hour): the same events and leases whether the
    notifications come in one file or a file each, in a few commits."""
    from tracepipe.correlate.attribution import correlate

    lines = (STORY / "nova" / "notifications.jsonl").read_text().splitlines()
    folder = tmp_path / "split"
    folder.mkdir()
    for i, line in enumerate(lines):
        (folder / f"n-{i:03d}.jsonl").write_text(line + "\n")
    whole, split = Lake(tmp_path / "whole"), Lake(tmp_path / "split-lake")
    assert ingest_vm_files(whole, [STORY / "nova" / "notifications.jsonl"]).results[0].rows > 0
    report = ingest_vm_files(split, [folder])
    assert len(report.results) == len(lines)
    assert _commits(split, "vm_events") == 2  # (before: one commit a file)
    for lake in (whole, split):
        correlate(Lake(lake.root), days=None)

    def rows(lake: Lake, name: str, drop: tuple[str, ...]) -> list[tuple]:
        table = Lake(lake.root).read(name)
        table = table.drop_columns([c for c in drop if c in table.column_names])
        return sorted(tuple(str(v) for v in r.values()) for r in table.to_pylist())

    assert rows(whole, "vm_events", ("source", "line")) == rows(split, "vm_events", ("source", "line"))
    assert rows(whole, "vm_leases", ()) == rows(split, "vm_leases", ())


def _line(minute: int, second: int, port: int) -> str:
    return f"Mar 12 10:{minute:02d}:{second:02d} vm-a sshd[1]: Failed password for root from 203.0.113.5 port {port} ssh2\n"


def test_a_path_named_twice_that_grew_between_lands_its_lines_once(tmp_path):
    """A review: `ingest syslog DIR DIR/a.log` while a.log grows landed its first lines twice (the second read
    told what is new from what was committed, and the first read was still waiting in the batch)."""
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text("".join(_line(0, i, 40000 + i) for i in range(10)))
    b.write_text(_line(30, 0, 1))

    def grow(path: str) -> None:
        if path.endswith("b.log"):
            with open(a, "a") as more:
                more.write("".join(_line(1, i, 50000 + i) for i in range(5)))

    ingest_syslog_files(Lake(tmp_path / "lake"), [a, b, a], year=2024, progress=grow)
    rows = Lake(tmp_path / "lake").read("vm_logs", columns=["source", "line"]).to_pylist()
    assert len(rows) == 16 and len({(r["source"], r["line"]) for r in rows}) == 16


def test_a_wholly_rejected_file_s_twin_in_one_batch_is_read_and_rejected_too(tmp_path):
    """A review: the twin of a file of nothing but bad lines was 'skipped (already in the lake)' when both were in
    one batch; such content never counts as landed, so the twin is read and its rejects said, as before."""
    folder = tmp_path / "relay"
    folder.mkdir()
    for name in ("a-garbage.log", "b-garbage-twin.log"):
        (folder / name).write_text("garbage line\n")
    results = ingest_syslog_files(Lake(tmp_path / "lake"), [folder], year=2024).results
    assert [(Path(r.source).name, r.skipped, r.rejects) for r in results] == [
        ("a-garbage.log", False, 1), ("b-garbage-twin.log", False, 1)
    ]  # fmt: skip


def test_a_file_that_vanishes_mid_run_is_not_read_and_the_others_land(tmp_path):
    """A review: a file removed between its hash and its read stopped the run with FileNotFoundError (an
    internal error), and with batches it took the sources parsed before it down too."""
    folder = _logs(tmp_path / "relay", 5)

    def vanish(path: str) -> None:
        if path.endswith("vm-0003.log"):
            (folder / "vm-0003.log").unlink()

    report = ingest_syslog_files(Lake(tmp_path / "lake"), [folder], year=2024, progress=vanish)
    assert [Path(source).name for source, _why in report.not_read] == ["vm-0003.log"]
    assert Lake(tmp_path / "lake").read("vm_logs").num_rows == 12


def test_an_error_mid_batch_still_lands_the_sources_read_before_it(tmp_path, monkeypatch):
    from tracepipe.ingest import vm as vm_ingest

    folder = _logs(tmp_path / "relay", 5)
    real = vm_ingest.parse_syslog

    def broken(text, source, *args, **kwargs):
        if source.endswith("vm-0003.log"):
            raise RuntimeError("a bug in one file's parse")
        return real(text, source, *args, **kwargs)

    monkeypatch.setattr(vm_ingest, "parse_syslog", broken)
    with pytest.raises(RuntimeError):
        ingest_syslog_files(Lake(tmp_path / "lake"), [folder], year=2024)
    assert (
        Lake(tmp_path / "lake").read("vm_logs").num_rows == 9
    )  # (the three before it, as one commit each did)


def test_a_second_run_waits_for_the_first(tmp_path, monkeypatch):
    """Two runs over logs that grow landed the same new lines each (a review: 13-37% of the lines twice with two
    cron runs overlapping): a run holds the dataset's run lock; the other waits, at most TRACEPIPE_LOCK_WAIT."""
    from tests.conftest import run_in_process
    from tracepipe.ingest.vm import RUN_LOCK

    folder = _logs(tmp_path / "relay", 2)
    lake = Lake(tmp_path / "lake")
    monkeypatch.setenv("TRACEPIPE_LOCK_WAIT", "1")
    for dataset, command in (("vm_logs", ["syslog", "--year", "2024"]), ("vm_events", ["vm"])):
        with lake.lock(RUN_LOCK.format(dataset)):
            run = run_in_process("ingest", *command, str(folder), "--lake", str(lake.root))
        assert run.returncode == 4 and RUN_LOCK.format(dataset) in run.stderr, run.stderr
    assert Lake(lake.root).table("vm_logs") is None
    assert (
        run_in_process("ingest", "syslog", str(folder), "--year", "2024", "--lake", str(lake.root)).returncode
        == 0
    )


def test_a_full_disk_in_the_compaction_after_a_commit_does_not_undo_the_run(tmp_path, monkeypatch):
    """A review: ENOSPC in the housekeeping compaction after the commit ended the run with exit 4 and 'nothing
    landed', though every row was committed."""
    import errno

    folder = _logs(tmp_path / "relay", 3)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Lake, "compact", full)
    report = ingest_syslog_files(Lake(tmp_path / "lake"), [folder], year=2024)
    assert (
        not any(r.skipped for r in report.results) and Lake(tmp_path / "lake").read("vm_logs").num_rows == 9
    )


def test_a_commit_that_finds_its_source_landed_without_a_manifest_row_writes_that_row(tmp_path, monkeypatch):
    """The collector's committer checks a segment at its commit, under the ingest lock: a segment whose committer
    was killed between its rows and its manifest row gets its 'recovered' row there (without it, compaction and
    re-attribution leave the segment's files alone for good: flows stayed without their VM)."""
    from tracepipe.lake import hash_file

    folder = _logs(tmp_path / "relay", 1)
    lake = Lake(tmp_path / "lake")
    with monkeypatch.context() as stopped:
        stopped.setattr(
            Lake, "_write_manifest_rows", lambda self, rows: (_ for _ in ()).throw(KeyboardInterrupt())
        )
        with pytest.raises(KeyboardInterrupt):
            ingest_syslog_files(lake, [folder], year=2024)
    content = hash_file(folder / "vm-0000.log")
    with Lake(lake.root).ingest("vm_logs", str(folder / "vm-0000.log"), content) as writer:
        assert writer.commit({}).skipped
    assert Lake(lake.root).manifest().column("content_hash").to_pylist() == [content]


def test_small_flow_files_land_in_a_few_commits_and_each_once(tmp_path, monkeypatch):
    """A backfill of small files (5-minute nfcapd files, a folder of nfdump CSV or Zeek logs) paid two commits
    and a compaction check a file (300 small CSV files: 21.2 CPU s, 9.3 with batches). Captures (pcap) still land
    one by one: a skipped one must leave the decoder's state as it found it."""
    import shutil

    from tests.test_ingest_hash_overlap import _drop_folder
    from tracepipe.ingest.flows import ingest_flow_files

    _drop_folder(tmp_path / "drop", 70)
    flows = tmp_path / "drop" / "flows"
    shutil.copy(flows / "nfcapd.00003.csv", flows / "nfcapd.00003-copy.csv")  # (a twin of content)
    lake = Lake(tmp_path / "lake")
    summary = ingest_flow_files(lake, [flows], jobs=1)
    statuses = {Path(f.path).name: f.status for f in summary.files}
    twins = statuses.pop("nfcapd.00003-copy.csv"), statuses.pop("nfcapd.00003.csv")
    assert twins == ("landed", "skipped")  # (the first in the folder's order lands)
    assert set(statuses.values()) == {"landed"} and summary.flows == 70 and summary.days == {"2024-03-12"}
    assert _commits(lake, "flows") <= 3 and Lake(lake.root).read("flows").num_rows == 70
    # stopped between a batch's rows and its manifest rows: the rerun lands nothing twice
    more = tmp_path / "more"
    _drop_folder(more, 10, start=100)
    with monkeypatch.context() as stopped:
        stopped.setattr(
            Lake, "_write_manifest_rows", lambda self, rows: (_ for _ in ()).throw(KeyboardInterrupt())
        )
        with pytest.raises(KeyboardInterrupt):
            ingest_flow_files(Lake(lake.root), [more / "flows"], jobs=1)
    again = ingest_flow_files(Lake(lake.root), [more / "flows"], jobs=1)
    assert {f.status for f in again.files} == {"skipped"}
    assert Lake(lake.root).read("flows").num_rows == 80


def test_a_batched_file_another_command_landed_first_counts_in_no_total(tmp_path, monkeypatch):
    """A review: a file of a batch that another `ingest` landed first (skipped at the commit) still counted in
    the summary's per-exporter flows (exporters 496 against 280 flows landed, the lake's rows elsewhere)."""
    from tests.test_ingest_hash_overlap import _drop_folder
    from tracepipe.ingest.flows import ingest_flow_files
    from tracepipe.lake import hash_file

    _drop_folder(tmp_path / "drop", 6)
    raced = hash_file(tmp_path / "drop" / "flows" / "nfcapd.00002.csv")
    real = Lake.already_ingested

    def landed_by_another(self, dataset, content_hash, holding=False):
        return (holding and content_hash == raced) or real(self, dataset, content_hash, holding)

    monkeypatch.setattr(Lake, "already_ingested", landed_by_another)
    summary = ingest_flow_files(Lake(tmp_path / "lake"), [tmp_path / "drop" / "flows"], jobs=1)
    statuses = {Path(f.path).name: f.status for f in summary.files}
    assert statuses.pop("nfcapd.00002.csv") == "skipped" and set(statuses.values()) == {"landed"}
    assert summary.flows == 5 == sum(e["flows"] for e in summary.exporters.values())
