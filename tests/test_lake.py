"""The lake's guarantees: hive partitions by UTC day, atomic files, idempotent re-ingest, leftovers cleaned."""

import datetime as dt
import os
import time

import duckdb
import pyarrow as pa
import pytest

from tracepipe import query
from tracepipe.lake import Lake, PartFile, ingest_table
from tracepipe.query import scan_sql
from tracepipe.schema import DATASETS, FLOWS


def _flows(n: int, start: dt.datetime) -> pa.Table:
    ts = [start + dt.timedelta(hours=i) for i in range(n)]
    return pa.table(
        {
            "ts_start": ts,
            "ts_end": ts,
            "src_addr": [f"10.0.0.{i % 250}" for i in range(n)],
            "dst_addr": ["192.0.2.1"] * n,
            "packets": list(range(n)),
            "bytes": [100 * i for i in range(n)],
            "source": ["test"] * n,
        }
    )


def test_ingest_partitions_by_utc_day_and_duckdb_reads_it(tmp_path):
    lake = Lake(tmp_path / "lake")
    table = _flows(30, dt.datetime(2024, 3, 12, 0, 30, tzinfo=dt.UTC))
    result = ingest_table(lake, "flows", "test-source", "ab" * 32, [table])
    assert result.rows == 30 and not result.skipped
    days = sorted(p.parent.name for p in lake.files("flows"))
    assert days == ["date=2024-03-12", "date=2024-03-13"]
    con = duckdb.connect()
    rows = con.execute(
        f"select date, count(*), sum(bytes) from ({scan_sql('flows', lake.files('flows'))}) "
        "group by date order by date"
    ).fetchall()
    assert [(str(d), c) for d, c, _ in rows] == [("2024-03-12", 24), ("2024-03-13", 6)]
    assert sum(r[2] for r in rows) == sum(100 * i for i in range(30))
    # the declared schema, timestamps UTC
    assert lake.read("flows").schema == FLOWS


def test_same_source_twice_adds_nothing(tmp_path):
    lake = Lake(tmp_path / "lake")
    table = _flows(5, dt.datetime(2024, 3, 12, tzinfo=dt.UTC))
    ingest_table(lake, "flows", "src", "cd" * 32, [table])
    again = ingest_table(lake, "flows", "src", "cd" * 32, [table])
    assert again.skipped
    assert lake.read("flows").num_rows == 5
    assert lake.manifest().num_rows == 1


def test_killed_run_leftovers_are_replaced_not_doubled(tmp_path):
    """A run killed after its rows were committed but before its manifest row: the rerun is skipped (the
    table's transaction id says the source is in), nothing doubles. A temp file of a run killed mid-write
    is never read, and vacuum removes it once it is older than the retention."""
    lake = Lake(tmp_path / "lake")
    table = _flows(5, dt.datetime(2024, 3, 12, tzinfo=dt.UTC))
    part = PartFile(lake.root / "flows", DATASETS["flows"], "2024-03-12", f"part-{'ef' * 32}-0badf00d")
    part.write(table)
    lake.commit("flows", [part.close()])  # the rows' commit, and then the process died
    stray = lake.root / "flows" / "date=2024-03-12" / "part-stray.parquet.tmp"
    stray.write_bytes(b"PAR1 half")
    result = ingest_table(lake, "flows", "src", "ef" * 32, [table])
    assert result.skipped
    assert lake.read("flows").num_rows == 5
    con = query.connect(lake)
    assert con.execute("select count(*) from flows").fetchone()[0] == 5
    manifest_stray = lake.root / "_ingest" / "part-stray.parquet.tmp"  # an unpartitioned table's own
    manifest_stray.write_bytes(b"PAR1 half")
    young = lake.root / "_ingest" / "part-young.parquet.tmp"  # a writer may still be finishing it
    young.write_bytes(b"PAR1 half")
    old = time.time() - 3 * 86400
    for path in (stray, manifest_stray):
        os.utime(path, (old, old))
    lake.vacuum(dt.timedelta(days=1))
    assert not stray.exists() and not manifest_stray.exists()
    assert young.exists()
    assert lake.read("flows").num_rows == 5


def test_abort_leaves_nothing_visible(tmp_path):
    lake = Lake(tmp_path / "lake")
    table = _flows(5, dt.datetime(2024, 3, 12, tzinfo=dt.UTC))
    with pytest.raises(RuntimeError):
        with lake.ingest("flows", "src", "12" * 32) as writer:
            writer.write(table)
            writer._part("2024-03-12")._flush()
            assert list(lake.root.rglob("*.tmp"))  # a file was being written
            raise RuntimeError("killed")
    assert lake.files("flows") == []
    assert not list(lake.root.rglob("*.tmp"))
    assert not lake.already_ingested("flows", "12" * 32)


def test_rejects_land_with_source_and_offset(tmp_path):
    lake = Lake(tmp_path / "lake")
    rejects = pa.table({"offset": [24], "reason": ["truncated pcap record"]})
    result = ingest_table(lake, "flows", "cap.pcap", "34" * 32, [], rejects=[rejects])
    assert result.rejects == 1
    got = lake.read("rejects").to_pylist()
    assert got[0]["source"] == "cap.pcap" and got[0]["offset"] == 24 and got[0]["dataset"] == "flows"


def test_an_append_on_a_snapshot_older_than_a_rewrite_still_commits(tmp_path):
    """Regression (issue 11 concurrency test): delta-rs checked an append as if it had read every file of its
    snapshot, so a collector commit whose snapshot predated an attribution rewrite of the day (data_change
    removes) failed with "a concurrent transaction deleted data this operation read"."""
    root = tmp_path / "lake"
    appender, rewriter = Lake(root), Lake(root)
    start = dt.datetime(2024, 3, 12, 1, tzinfo=dt.UTC)
    for i in range(3):
        ingest_table(appender, "flows", f"src-{i}", f"{i:02d}" * 32, [_flows(5, start)])
    rewriter.rewrite("flows", None, lambda batch: batch)  # what attribute_flows does, data_change=True
    appender._seen["flows"] = appender._log_stamp(
        "flows"
    )  # the appender read its snapshot before the rewrite
    result = ingest_table(appender, "flows", "src-3", "03" * 32, [_flows(5, start)])
    assert result.rows == 5 and not result.skipped
    assert Lake(root).read("flows").num_rows == 20 and len(Lake(root).files("flows")) == 2


def test_parquet_files_read_side_by_side_keep_their_order_and_fill_missing_columns(tmp_path):
    """read_parquet_files reads files in a pool of threads: the tables come back in the order of the paths,
    a column a file lacks (written before it existed) is null, and a damaged file raises."""
    import pyarrow.parquet as pq

    from tracepipe.lake import read_parquet_files

    schema = pa.schema([pa.field("n", pa.int64(), nullable=False), pa.field("note", pa.string())])
    paths = []
    for i in range(9):  # enough for the pool; every other file without `note`
        path = tmp_path / f"f{i}.parquet"
        columns = {"n": pa.array(range(i * 100, i * 100 + 50 + i), pa.int64())}
        if i % 2 == 0:
            columns["note"] = pa.array([f"file {i}"] * (50 + i))
        pq.write_table(pa.table(columns), path)
        paths.append(path)
    tables = read_parquet_files(list(reversed(paths)), schema)
    assert [t.schema for t in tables] == [schema] * 9
    assert [t.column("n")[0].as_py() for t in tables] == [i * 100 for i in reversed(range(9))]
    assert [t.num_rows for t in tables] == [50 + i for i in reversed(range(9))]
    assert [t.column("note").null_count for t in tables] == [
        0 if i % 2 == 0 else 50 + i for i in reversed(range(9))
    ]
    paths[4].write_bytes(paths[4].read_bytes()[:40])  # truncated
    with pytest.raises(pa.ArrowInvalid):
        read_parquet_files(paths, schema)


def test_a_replace_of_many_files_that_fails_commits_nothing_and_leaves_no_temp_file(tmp_path):
    """replace_files writes its files side by side: when one cannot be written (here a table whose VM ids are
    not text), the error is raised, the table is what it was, and no temp file is left beside its files."""
    from tracepipe.fsutil import TMP_SUFFIX
    from tracepipe.schema import VMS

    lake = Lake(tmp_path / "lake")
    good = pa.table(
        {f.name: pa.nulls(3, f.type) if f.name != "vm_id" else pa.array(["a", "b", "c"]) for f in VMS},
        schema=VMS,
    )
    with lake.lock("vms"):
        first = lake.replace_files("vms", [], [good])
    before = lake.read("vms").to_pylist()
    bad = pa.table({"vm_id": pa.array([[1]] * 3)})  # a list where text belongs
    with (
        lake.lock("vms"),
        pytest.raises((pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError, ValueError)),
    ):
        lake.replace_files("vms", lake.entries("vms"), [good, good, bad, good, good, good])
    assert lake.version("vms") == first
    assert lake.read("vms").to_pylist() == before
    assert not [p for p in (tmp_path / "lake").rglob("*") if p.name.endswith(TMP_SUFFIX)]
