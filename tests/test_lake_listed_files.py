"""Every reader checks the files a table's log lists before it reads them (Lake.damaged, query.check_files): one
lstat per file now, not an open (connect cost 2.4-3.1 s at 9,000 listed files, session 27). Whatever is planted
among many good files (a FIFO that would hang a reader, a link to a file elsewhere, a partition folder swapped for
a link, a file gone or resized) is still found, with the reason that opening each file gives."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from tests.conftest import run_tracepipe
from tracepipe import query
from tracepipe.errors import LakeError
from tracepipe.lake import FileEntry, Lake, have_null_counts, ingest_table
from tracepipe.limits import MAX_FLOW_DURATION
from tracepipe.schema import DATASETS, FLOWS

START = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
DAYS = 40
END_DAY = START.date() + dt.timedelta(days=DAYS)  # (the first day without flows)


@pytest.fixture(scope="module")
def many_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lake whose flows table lists a file per day for DAYS days."""
    root = tmp_path_factory.mktemp("many") / "lake"
    lake = Lake(root)
    ts = [START + dt.timedelta(days=d, minutes=m) for d in range(DAYS) for m in range(3)]
    flows = pa.table(
        {
            "ts_start": pa.array(ts, FLOWS.field("ts_start").type),
            "ts_end": pa.array(ts, FLOWS.field("ts_end").type),
            "src_addr": [f"10.0.{i % 200}.{i % 250}" for i in range(len(ts))],
            "dst_addr": ["192.0.2.1"] * len(ts),
            "source": ["t"] * len(ts),
        }
    )
    ingest_table(lake, "flows", "t", "t-hash", [flows])
    assert len(Lake(root).entries("flows")) == DAYS
    return root


@pytest.fixture
def lake(many_files: Path, tmp_path: Path) -> Lake:
    """A fresh copy of the many-files lake, for one test to plant things in."""
    root = tmp_path / "lake"
    shutil.copytree(many_files, root, symlinks=True)
    return Lake(root)


def _plant(lake: Lake, kind: str, outside: Path) -> tuple[FileEntry, str]:
    """Replace one listed file (a day in the middle of the table) by `kind`; the entry and the reason expected."""
    entry = lake.entries("flows")[DAYS // 2]
    path = entry.path
    outside.mkdir(exist_ok=True)
    if kind == "fifo":
        path.unlink()
        os.mkfifo(path)
        return entry, "left in place: not a regular file (a FIFO)"
    if kind == "file link":  # to a good copy of the same file, so that only the link gives it away
        copy = outside / path.name
        shutil.copy(path, copy)
        path.unlink()
        path.symlink_to(copy)
        return entry, "left in place: reached through a symbolic link"
    if kind == "folder link":  # the partition folder swapped for a link to a good copy of it
        copy = outside / path.parent.name
        shutil.copytree(path.parent, copy)
        shutil.rmtree(path.parent)
        path.parent.symlink_to(copy, target_is_directory=True)
        return entry, "left in place: reached through a symbolic link"
    if kind == "directory":
        path.unlink()
        path.mkdir()
        return entry, "left in place: not a regular file (a directory)"
    if kind == "missing":
        path.unlink()
        return entry, "No such file or directory"
    if kind == "resized":
        with path.open("ab") as handle:
            handle.write(b"x")
        return entry, f"{entry.size + 1} bytes, the log says {entry.size}"
    if kind == "folder is a file":
        shutil.rmtree(path.parent)
        path.parent.write_bytes(b"not a folder")
        return entry, "left in place: reached through a symbolic link"
    raise AssertionError(kind)


KINDS = ["fifo", "file link", "folder link", "directory", "missing", "resized", "folder is a file"]


@pytest.mark.parametrize("kind", KINDS)
def test_one_planted_file_among_many_is_found_with_the_reason_opening_it_gives(lake, tmp_path, kind):
    """damaged() without footers (an lstat per file, each folder reached once) names the planted file alone,
    with the same reason as damaged(read_footers=True), which opens every file without following a link."""
    entry, reason = _plant(lake, kind, tmp_path / "outside")
    lake = Lake(lake.root)
    found = lake.damaged("flows")
    assert [(e.relative, why) for e, why in found] == [(entry.relative, reason)]
    assert [(e.relative, why) for e, why in lake.damaged("flows", read_footers=True)] == [
        (entry.relative, reason)
    ]
    with pytest.raises(LakeError, match="damaged lake files") as error:
        query.connect(lake)
    assert entry.relative.split("/")[-1] in str(error.value) and reason in str(error.value)


def test_a_fifo_planted_among_many_files_stops_sql_with_its_name_never_hangs_it(lake, tmp_path):
    """The command line, in a process of its own (a hang would be a timeout here, not a test run for ever)."""
    entry, _ = _plant(lake, "fifo", tmp_path / "outside")
    result = run_tracepipe("sql", "SELECT count(*) FROM flows", "--lake", str(lake.root), timeout=60)
    assert result.returncode == 4, result.stderr
    assert entry.path.name in result.stderr and "FIFO" in result.stderr


def test_the_table_folder_itself_may_be_a_link(lake, tmp_path):
    """A table folder moved to another disk and linked back is the table's (as before): nothing damaged."""
    moved = tmp_path / "other-disk" / "flows"
    moved.parent.mkdir()
    shutil.move(lake.root / "flows", moved)
    (lake.root / "flows").symlink_to(moved, target_is_directory=True)
    lake = Lake(lake.root)
    assert lake.damaged("flows") == []
    con = query.connect(lake)
    assert con.execute("SELECT count(*) FROM flows").fetchone() == (DAYS * 3,)


def test_many_good_files_are_all_read(lake):
    """No file of a sound lake is taken for damaged, and the views read every row of every day."""
    assert all(lake.damaged(name) == [] for name in DATASETS)
    con = query.connect(lake)
    assert con.execute('SELECT count(*), count(DISTINCT "date") FROM flows').fetchone() == (DAYS * 3, DAYS)
    assert con.execute("SELECT count(*) FROM flows_attributed").fetchone() == (DAYS * 3,)


def test_null_counts_present_as_file_by_file(lake):
    """have_null_counts (in columns, once per listing) answers what each entry's null counts say: every flat
    column of flows has one, a column the log has no statistics of has none, and a hand-made entry (a plain
    dict) is asked directly."""
    entries = lake.entries("flows")
    flat = [f.name for f in FLOWS if not pa.types.is_nested(f.type)]
    plain = FileEntry(entries[0].path, entries[0].relative, entries[0].day, 3, 1, {"ts_start": 0})
    for columns in (flat, ["ts_start"], [*flat, "no_such_column"], []):
        mixed = [*entries, plain]
        expected = [all(e.null_counts.get(c) is not None for c in columns) for e in mixed]
        assert have_null_counts(mixed, columns) == expected
    assert have_null_counts(entries, flat) == [True] * DAYS


def test_views_over_stand_ins_bind_as_over_the_files(lake):
    """connect makes the SQL views over empty typed stand-ins and puts the file scans in last: each view of a
    scan has the columns and types of its stand-in (else a view over it would bind differently once in place)."""
    con = query.connect(lake)
    for view, dataset in [("flows", "flows"), ("_flows_todo", "flows"), ("vm_events", "vm_events")]:
        scan = con.execute(f'DESCRIBE SELECT * FROM "{view}"').fetchall()
        stand_in = duckdb.connect().execute(f"DESCRIBE {query.empty_relation_sql(dataset)}").fetchall()
        assert [row[:2] for row in scan] == [row[:2] for row in stand_in]
    expected = sum(1 for i in range(DAYS * 3) if f"10.0.{i % 200}.{i % 250}" == "10.0.1.1")
    rows = con.execute("SELECT count(*) FROM flows_attributed WHERE src_addr = '10.0.1.1'").fetchone()
    assert rows == (expected,) and expected > 0


@pytest.mark.parametrize("hours", [0.5, 23.9, 24 * 5 + 0.2, 24 * (DAYS - 1) + 1])
def test_who_reads_the_flows_of_its_window_days_alone_and_answers_the_same(many_files, hours):
    """`who` opens flows with the files of its days only (connect days: its window's and the days before it
    whose flows can reach into it, query.who_days): the flows it sums are those a session over every file
    finds, windows across midnight and at the table's ends included."""
    lake = Lake(many_files)
    at = START + dt.timedelta(hours=hours)
    window = dt.timedelta(hours=1)
    day = round(hours / 24)  # the midnight inside the window; its first flow is row 3 * day
    addr = f"10.0.{3 * day % 200}.{3 * day % 250}"
    answer = query.who(lake, addr, at, window)
    full = query.connect(lake)
    assert answer.flows == query.flow_summary(full, addr, at - window, at + window)
    assert answer.flows["flows"] == 1
    days = query.who_days(at, window)
    assert days == (query._day(at - window - MAX_FLOW_DURATION), query._day(at + window))
    narrow = query.connect(lake, days=days)
    for other in ("10.0.0.0", "10.0.3.3", "10.0.15.15", addr):
        assert query.flow_summary(narrow, other, at - window, at + window) == query.flow_summary(
            full, other, at - window, at + window
        )
    listed = narrow.execute('SELECT DISTINCT "date" FROM flows ORDER BY 1').fetchall()
    span = range((days[1] - days[0]).days + 1)
    assert [row[0] for row in listed] == [
        d for d in (days[0] + dt.timedelta(days=i) for i in span) if START.date() <= d < END_DAY
    ]


def test_a_fifo_planted_as_a_manifest_file_is_an_error_not_a_hang(tmp_path):
    """Every ingest asks the manifest whether its content landed already (already_ingested) and may ask for its
    path (has_source): a FIFO under a manifest file's listed name made both wait for a writer for ever
    (session-28 read). Now an OSError naming it, at once (run in a child with a timeout: a hang fails)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import datetime as dt, os, sys
        import pyarrow as pa
        from tracepipe.lake import MANIFEST_DIR, Lake, hash_bytes, ingest_table
        from tracepipe.schema import VM_EVENTS
        lake = Lake(sys.argv[1])
        row = {"ts": dt.datetime(2025, 1, 1, tzinfo=dt.UTC), "cloud": "c", "vm_id": "v", "action": "create"}
        ingest_table(lake, "vm_events", "s1", hash_bytes(b"s1"), [pa.Table.from_pylist([row], schema=VM_EVENTS)])
        path = Lake(sys.argv[1]).entries(MANIFEST_DIR)[0].path
        os.unlink(path)
        os.mkfifo(path)
        for ask in (lambda l: l.already_ingested("vm_events", hash_bytes(b"s1")),
                    lambda l: l.has_source("vm_events", "s1")):
            try:
                ask(Lake(sys.argv[1]))
                print("answered")
            except OSError as exc:
                print("refused", exc.filename == str(path), "FIFO" in str(exc))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "lake")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["refused True True", "refused True True"], done.stdout


def test_lake_files_reach_arrow_as_its_own_files_not_python_ones(tmp_path, monkeypatch):
    """Arrow reading a Python file object calls back into Python from its I/O threads; one still running as
    the interpreter exits aborts the process (`intel import` on the demo lake exited 134, "terminate called
    without an active exception", 3-4 runs in 20 under load, session 29). The manifest lookups, the footer
    checks (damaged) and the views' footer reads give pyarrow its own files (fsutil.arrow_file)."""
    import pyarrow.parquet as pq

    from tracepipe.lake import MANIFEST_DIR, hash_bytes
    from tracepipe.schema import VM_EVENTS

    lake = Lake(tmp_path / "lake")
    row = {"ts": dt.datetime(2025, 1, 1, tzinfo=dt.UTC), "cloud": "c", "vm_id": "v", "action": "create"}
    for i in range(3):
        table = pa.Table.from_pylist([{**row, "vm_id": f"v{i}"}], schema=VM_EVENTS)
        ingest_table(lake, "vm_events", f"s{i}", hash_bytes(f"s{i}".encode()), [table])
    assert Lake(lake.root).entries(MANIFEST_DIR)
    given: list[object] = []
    for name in ("read_metadata", "read_schema", "read_table"):
        real = getattr(pq, name)
        monkeypatch.setattr(
            pq, name, lambda where, *a, _real=real, **k: (given.append(where), _real(where, *a, **k))[1]
        )
    real_init = pq.ParquetFile.__init__
    monkeypatch.setattr(
        pq.ParquetFile,
        "__init__",
        lambda self, where, *a, **k: (given.append(where), real_init(self, where, *a, **k))[1],
    )
    fresh = Lake(lake.root)
    assert fresh.already_ingested("vm_events", hash_bytes(b"s1"))
    assert fresh.has_source("vm_events", "s2") and not fresh.has_source("vm_events", "s9")
    assert fresh.damaged("vm_events", read_footers=True) == []
    query.connect(fresh).close()
    handles = [g for g in given if not isinstance(g, (str, os.PathLike))]
    assert handles, given  # (the lookups read through handles)
    # (pyarrow's own files count as io.IOBase too: what matters is that none is a Python file object)
    assert not [g for g in handles if isinstance(g, pa.PythonFile) or not isinstance(g, pa.NativeFile)], (
        handles
    )
