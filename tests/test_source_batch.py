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

    assert rows(whole, "vm_events", ("source", "line")) == rows(
        split, "vm_events", ("source", "line")
    )
    assert rows(whole, "vm_leases", ()) == rows(split, "vm_leases", ())
