"""The lake on Delta Lake tables: commits from the log, compaction (automatic and `tracepipe compact`),
retention (`tracepipe expire`), time travel (`tracepipe sql --as-of`), the in-place upgrade of an old lake, and
reading the lake without tracepipe (deltalake + DuckDB, polars). Real Parquet, real DuckDB, the real CLI."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_in_process
from tracepipe import query
from tracepipe.lake import COMPACT_MIN_FILES, Lake, ingest_table
from tracepipe.schema import FLOWS, VM_EVENTS

DAY = dt.datetime(2024, 3, 12, tzinfo=dt.UTC)


def _flows(n: int, start: dt.datetime, seed: int = 0) -> pa.Table:
    ts = [start + dt.timedelta(minutes=i) for i in range(n)]
    return pa.table(
        {
            "ts_start": pa.array(ts, FLOWS.field("ts_start").type),
            "ts_end": pa.array(ts, FLOWS.field("ts_end").type),
            "src_addr": [f"10.0.{seed % 250}.{i % 250}" for i in range(n)],
            "dst_addr": ["192.0.2.1"] * n,
            "dst_port": [22] * n,
            "proto": pa.array([6] * n, pa.int16()),
            "bytes": pa.array([100 + seed] * n, pa.int64()),
            "source": [f"batch-{seed}"] * n,
        }
    )


def _count(lake: Lake, sql: str = "SELECT count(*) FROM flows") -> int:
    return query.connect(lake).execute(sql).fetchone()[0]


def test_ingest_commits_once_per_source_and_compacts_by_itself(tmp_path):
    lake = Lake(tmp_path / "lake")
    for i in range(COMPACT_MIN_FILES - 1):
        ingest_table(lake, "flows", f"b{i}", f"{i:064x}", [_flows(10, DAY + dt.timedelta(hours=i), i)])
    assert len(lake.files("flows")) == COMPACT_MIN_FILES - 1  # below the threshold: one file per commit
    ingest_table(lake, "flows", "last", f"{99:064x}", [_flows(10, DAY + dt.timedelta(hours=20), 99)])
    files = lake.files("flows")
    assert len(files) == 1  # the 16th small file of the day triggered the merge
    merged = pq.read_table(files[0])
    assert merged.num_rows == 10 * COMPACT_MIN_FILES
    keys = list(zip(merged["src_addr"].to_pylist(), merged["ts_start"].to_pylist(), strict=True))
    assert keys == sorted(keys)  # one sorted row group: min/max statistics prune by address
    assert _count(lake) == 10 * COMPACT_MIN_FILES
    # the history says what happened, in order
    history = lake.table("flows").history()
    assert history[0]["operation"] == "WRITE" and "compact" in history[0]["tracepipe"]
    # the same source again: skipped, nothing doubles (also after the merge removed its file)
    again = ingest_table(lake, "flows", "b0", f"{0:064x}", [_flows(10, DAY, 0)])
    assert again.skipped and _count(lake) == 10 * COMPACT_MIN_FILES


def test_file_entries_are_read_from_the_log_once_per_version_and_follow_other_writers(tmp_path, monkeypatch):
    """entries() (asked ~20 times by an hourly lease update) reads the log's add actions once per table
    version; a commit by this object or by another process's Lake moves the version and is seen at once."""
    from deltalake import DeltaTable

    ingest_table(Lake(tmp_path / "lake"), "flows", "a", f"{1:064x}", [_flows(10, DAY, 1)])
    reader = Lake(tmp_path / "lake")
    reads = []
    original = DeltaTable.get_add_actions
    monkeypatch.setattr(
        DeltaTable, "get_add_actions", lambda self, **kw: reads.append(1) or original(self, **kw)
    )
    first = reader.entries("flows")
    assert reader.entries("flows") == first and reader.files("flows", ["2024-03-12"]) == [
        e.path for e in first
    ]
    assert reader.entries("flows", ["2024-03-13"]) == [] and len(reads) == 1
    other = Lake(tmp_path / "lake")  # another writer (its own handle on the table)
    ingest_table(other, "flows", "b", f"{2:064x}", [_flows(10, DAY + dt.timedelta(days=1), 2)])
    later = reader.entries("flows")
    assert len(later) == 2 and [e.day for e in later] == ["2024-03-12", "2024-03-13"]
    assert [e.day for e in reader.entries("flows", ["2024-03-13"])] == ["2024-03-13"]
    # some days of a version not listed whole yet (a collector's commit): the same entries, built alone
    fresh = Lake(tmp_path / "lake")
    assert fresh.entries("flows", ["2024-03-13"]) == [e for e in later if e.day == "2024-03-13"]
    assert fresh.entries("flows", []) == [] and fresh.entries("vm_events", ["2024-03-13"]) == []
    # the source of a file is found from its name, in the version that holds it
    assert reader.already_ingested("flows", f"{2:064x}") and not reader.already_ingested("flows", f"{3:064x}")
    ingest_table(reader, "flows", "c", f"{3:064x}", [_flows(10, DAY, 3)])
    assert len(reader.entries("flows")) == 3 and reader.already_ingested("flows", f"{3:064x}")


def test_a_source_is_looked_up_without_listing_the_table_and_entries_read_their_stats_on_demand(tmp_path):
    """Every new source asks whether its files are in the table (a run killed before its manifest row): a Lake
    that has not listed the table's version builds the entries of those files only. The per-column statistics
    of an entry are read from the log when asked for, the same values as a full listing's, and an entry
    pickles as plain data."""
    import pickle

    writer = Lake(tmp_path / "lake")
    for i in range(3):
        ingest_table(
            writer, "flows", f"s{i}", f"{i + 1:064x}", [_flows(10 + i, DAY + dt.timedelta(days=i), i)]
        )
    fresh = Lake(tmp_path / "lake")
    found = fresh._source_entries("flows", f"{2:064x}")
    assert fresh._cached_entries("flows", fresh.table("flows")) is None  # nothing else was listed
    assert [e.rows for e in found] == [11] and found[0].relative.startswith(
        "date=2024-03-13/part-" + f"{2:064x}"
    )
    assert fresh._source_entries("flows", f"{9:064x}") == []
    listed = {e.relative: e for e in Lake(tmp_path / "lake").entries("flows")}
    assert found == [listed[found[0].relative]]
    entry = listed[found[0].relative]
    assert entry.null_counts["src_addr"] == 0 and entry.null_counts.get("no such column") is None
    assert entry.mins["bytes"] <= entry.maxs["bytes"] and "bytes" in entry.maxs
    assert dict(entry.maxs) == {name: entry.maxs[name] for name in entry.maxs}
    again = pickle.loads(pickle.dumps(entry))
    assert again == entry and type(again.null_counts) is dict
    # once the whole version is listed, the lookup answers from that listing
    assert fresh.entries("flows") and fresh._source_entries("flows", f"{3:064x}") == [
        e for e in fresh.entries("flows") if f"part-{3:064x}-" in e.relative
    ]


def test_compact_command_keeps_every_row_and_readers_of_old_snapshots(tmp_path):
    lake = Lake(tmp_path / "lake")
    for i in range(6):
        ingest_table(lake, "flows", f"b{i}", f"{i:064x}", [_flows(5, DAY + dt.timedelta(hours=i), i)])
    before = query.connect(lake)  # a reader that opened the lake before the compaction
    expected = before.execute("SELECT sum(bytes), count(*) FROM flows").fetchone()
    result = run_in_process("compact", "--lake", str(lake.root), "--format", "json")
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)["datasets"]["flows"]
    assert (done["days"], done["files_removed"], done["files_added"], done["rows"]) == (1, 6, 1, 30)
    assert len(lake.files("flows")) == 1
    assert query.connect(lake).execute("SELECT sum(bytes), count(*) FROM flows").fetchone() == expected
    # the old reader still reads the files it listed: removed from the log, not from the disk
    assert before.execute("SELECT sum(bytes), count(*) FROM flows").fetchone() == expected


def test_expire_removes_old_days_says_what_went_and_keeps_lifecycle(tmp_path):
    lake = Lake(tmp_path / "lake")
    old, recent = DAY - dt.timedelta(days=500), DAY
    ingest_table(lake, "flows", "old", "01" * 32, [_flows(7, old)])
    ingest_table(lake, "flows", "recent", "02" * 32, [_flows(3, recent, 1)])
    events = pa.table(
        {
            "ts": pa.array([old], VM_EVENTS.field("ts").type),
            "cloud": ["openstack"],
            "vm_id": ["vm-1"],
            "action": ["create"],
        }
    )
    ingest_table(lake, "vm_events", "ev", "03" * 32, [events])
    now = recent + dt.timedelta(days=1)
    result = run_in_process(
        "expire", "--older-than", "400d", "--lake", str(lake.root), "--format", "json", "--no-vacuum"
    )
    assert result.returncode == 0, result.stderr
    gone = {d["dataset"]: d for d in json.loads(result.stdout)["datasets"]}
    # relative to today (2026 or later): both 2024 days are older than 400 days
    assert gone["flows"]["rows"] == 10 and gone["flows"]["days"] == [old.date().isoformat(), "2024-03-12"]
    assert _count(lake) == 0
    assert lake.read("vm_events").num_rows == 1  # lifecycle history stays
    # relative to a given `now`, only the old day goes
    lake2 = Lake(tmp_path / "lake2")
    ingest_table(lake2, "flows", "old", "01" * 32, [_flows(7, old)])
    ingest_table(lake2, "flows", "recent", "02" * 32, [_flows(3, recent, 1)])
    from tracepipe.maintenance import expire_lake

    summary = expire_lake(lake2, dt.timedelta(days=400), now=now, vacuum=False)
    assert [(d["dataset"], d["rows"]) for d in summary.datasets if d["rows"]] == [("flows", 7)]
    assert _count(lake2) == 3
    assert lake2.table("flows").history(1)[0]["tracepipe"].find("expire") >= 0


def test_sql_as_of_a_version_or_a_time_sees_the_lake_as_it_was(tmp_path):
    lake = Lake(tmp_path / "lake")
    ingest_table(lake, "flows", "first", "0a" * 32, [_flows(4, DAY)])
    token = ",".join(f"{k}={v}" for k, v in sorted(lake.versions().items()))
    # Delta time travel goes by the commit files' modification times, which the kernel stamps from its coarse
    # clock (a few ms behind the wall clock): a moment between two commits must be more than that from both
    time.sleep(0.05)
    between = dt.datetime.now(dt.UTC)
    time.sleep(0.05)
    ingest_table(lake, "flows", "second", "0b" * 32, [_flows(6, DAY, 1)])

    def count(*extra: str) -> int:
        result = run_in_process(
            "sql", "SELECT count(*) AS n FROM flows", "--format", "json", "--lake", str(lake.root), *extra
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)[0]["n"]

    assert count() == 10
    assert count("--as-of", token) == 4
    assert count("--as-of", between.isoformat()) == 4
    bad = run_in_process("sql", "SELECT 1", "--as-of", "flows=x", "--lake", str(lake.root))
    assert bad.returncode == 2 and "lake version" in bad.stderr


def test_upgrade_puts_an_old_lake_under_logs_in_place(tmp_path):
    """A lake as tracepipe 0.1 wrote it: loose Parquet files per day and one manifest file per source."""
    root = tmp_path / "lake"
    day_dir = root / "flows" / "date=2024-03-12"
    day_dir.mkdir(parents=True)
    old_flows = _flows(8, DAY).drop_columns([])  # no attributed_at column: the old schema
    pq.write_table(old_flows, day_dir / "part-0123456789abcdef.parquet")
    (root / "_ingest").mkdir()
    pq.write_table(
        pa.table(
            {
                "content_hash": ["cd" * 32],
                "dataset": ["flows"],
                "source": ["old.pcap"],
                "rows": [8],
                "ingested_at": pa.array([DAY], FLOWS.field("ts_start").type),
            }
        ),
        root / "_ingest" / f"flows-{'cd' * 32}.parquet",
    )
    # an upgrade killed before its commit left a conformed copy next to the original: not counted twice
    (day_dir / "part-upgraded-0badc0ffee.parquet").write_bytes(
        (day_dir / "part-0123456789abcdef.parquet").read_bytes()
    )
    refused = run_in_process("sql", "SELECT count(*) FROM flows", "--lake", str(root))
    assert refused.returncode == 4 and "tracepipe upgrade" in refused.stderr
    result = run_in_process("upgrade", "--lake", str(root), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["converted"] == {"_ingest": 1, "flows": 1}
    lake = Lake(root)
    assert _count(lake) == 8
    assert [p.name for p in day_dir.glob("*.parquet")] == [lake.files("flows")[0].name]  # originals gone
    assert lake.already_ingested("flows", "cd" * 32)
    again = run_in_process("upgrade", "--lake", str(root), "--format", "json")
    assert again.returncode == 0 and json.loads(again.stdout)["converted"] == {}


def test_readable_without_tracepipe(tmp_path):
    """The README's snippets: delta-rs gives the file list (or an Arrow dataset), DuckDB and polars read it."""
    lake = Lake(tmp_path / "lake")
    for i in range(3):
        ingest_table(lake, "flows", f"b{i}", f"{i + 40:064x}", [_flows(5, DAY, i)])
    lake.compact("flows", min_files=2)
    from deltalake import DeltaTable

    table = DeltaTable(str(tmp_path / "lake" / "flows"))
    con = duckdb.connect()
    files = table.file_uris()
    assert con.execute("SELECT count(*), sum(bytes) FROM read_parquet($f)", {"f": files}).fetchone() == (
        15,
        5 * (100 + 101 + 102),
    )
    arrow = table.to_pyarrow_dataset()  # noqa: F841 (DuckDB reads the Python variable by name)
    assert con.execute("SELECT count(*) FROM arrow WHERE date = '2024-03-12'").fetchone() == (15,)
    assert pl.scan_delta(str(tmp_path / "lake" / "flows")).select(pl.len()).collect().item() == 15
    # the removed small files are still on disk: a glob would double rows, the log does not
    on_disk = list((tmp_path / "lake" / "flows").rglob("*.parquet"))
    assert len(on_disk) > len(files)


@pytest.mark.parametrize("dataset", ["vm_leases", "vms"])
def test_replaced_derived_tables_keep_one_version_of_their_rows(tmp_path, dataset):
    lake = Lake(tmp_path / "lake")
    for n in (3, 5):
        rows = pa.table(
            {
                "addr": [f"10.0.0.{i}" for i in range(n)],
                "vm_id": [f"vm-{i}" for i in range(n)],
                "valid_from": pa.array([DAY] * n, FLOWS.field("ts_start").type),
            }
        )
        lake.replace_dataset(dataset, rows if dataset == "vm_leases" else rows.select(["vm_id"]))
    assert lake.read(dataset).num_rows == 5
    assert _count(lake, f"SELECT count(*) FROM {dataset}") == 5


def test_a_closed_day_is_merged_when_the_next_day_gets_rows(tmp_path):
    lake = Lake(tmp_path / "lake")
    for i in range(5):
        ingest_table(
            lake, "flows", f"d1-{i}", f"{i + 0x300:064x}", [_flows(3, DAY + dt.timedelta(hours=i), i)]
        )
    assert (
        len(lake.files("flows", ["2024-03-12"])) == 5
    )  # the day is still being written: below the threshold
    ingest_table(lake, "flows", "d2", f"{0x400:064x}", [_flows(3, DAY + dt.timedelta(days=1), 9)])
    assert len(lake.files("flows", ["2024-03-12"])) == 1 and _count(lake) == 18


def test_a_one_shot_ingest_across_midnight_is_not_rewritten_at_once(tmp_path):
    """Issue 17: a capture spanning two days, decoded by two workers, left two files of its own in the first
    (closed) day; the closed-day merge then rewrote them right after they were written. Files of this source
    alone stay as written; with another source's small file there, the day is merged as before."""
    from tracepipe.lake import DayParts
    from tracepipe.schema import DATASETS

    lake = Lake(tmp_path / "lake")
    with lake.ingest("flows", source="capture", content_hash="0f" * 32) as writer:
        writer.write(pa.concat_tables([_flows(3, DAY, 1), _flows(2, DAY + dt.timedelta(days=1), 2)]))
        worker = DayParts(lake.root, DATASETS["flows"], writer.key)  # what a second decode worker writes
        worker.write(pa.concat_tables([_flows(4, DAY, 3), _flows(1, DAY + dt.timedelta(days=1), 4)]))
        writer.adopt(worker.close(), 5)
        writer.commit()
    assert len(lake.files("flows", ["2024-03-12"])) == 2 and _count(lake) == 10
    assert [i.get("operation") for i in lake.commit_infos("flows", limit=5)].count("compact") == 0

    ingest_table(lake, "flows", "earlier", "0e" * 32, [_flows(2, DAY + dt.timedelta(hours=3), 5)])
    ingest_table(lake, "flows", "next", "0c" * 32, [_flows(2, DAY + dt.timedelta(days=1, hours=2), 6)])
    assert len(lake.files("flows", ["2024-03-12"])) == 1 and _count(lake) == 14


def test_a_source_killed_before_its_manifest_row_is_not_merged_until_recognised(tmp_path):
    """Regression for the idempotence key: the rows of a run killed between its commit and its manifest row
    are found again by their file names, so compaction must not rename them before the rerun has seen them."""
    from tracepipe.lake import PartFile
    from tracepipe.schema import DATASETS

    lake = Lake(tmp_path / "lake")
    ingest_table(lake, "flows", "earlier", "0e" * 32, [_flows(3, DAY, 1)])
    part = PartFile(lake.root / "flows", DATASETS["flows"], "2024-03-12", f"part-{'0d' * 32}-0badf00d")
    part.write(_flows(4, DAY, 2))
    lake.commit("flows", [part.close()])  # and then the process was killed: no manifest row
    assert lake.compact("flows", min_files=2)["files_removed"] == 0  # the unconfirmed file is left alone
    # attribution (a rewrite of the whole day) keeps it recognisable too
    assert lake.rewrite("flows", ["2024-03-12"], lambda batch: batch)["rows"] == 7
    again = ingest_table(lake, "flows", "killed", "0d" * 32, [_flows(4, DAY, 2)])
    assert again.skipped and _count(lake) == 7
    recovered = [r for r in lake.manifest().to_pylist() if r["content_hash"] == "0d" * 32]
    assert len(recovered) == 1 and recovered[0]["rows"] == 4 and "recovered" in recovered[0]["source"]
    assert lake.compact("flows", min_files=2)["files_removed"] == 2 and _count(lake) == 7
    assert ingest_table(lake, "flows", "killed", "0d" * 32, [_flows(4, DAY, 2)]).skipped


def test_a_handle_older_than_the_log_retention_reopens(tmp_path):
    """A long-lived writer (the collector) whose table handle is older than the log entries still on disk
    (log retention cleaned them up) still commits and reads everything. The year benchmark also saw a commit
    fail with 'Object ... .json not found' when the cleanup ran during the commit; Lake.commit reopens and
    retries then (that race is not reproduced here)."""
    old = Lake(tmp_path / "lake")
    ingest_table(old, "flows", "first", "1a" * 32, [_flows(2, DAY)])
    assert old.read("flows").num_rows == 2  # `old` holds a handle at this version
    other = Lake(tmp_path / "lake")
    for i in range(5):
        ingest_table(other, "flows", f"b{i}", f"{i + 0x20:064x}", [_flows(2, DAY, i + 5)])
    table = other.table("flows")
    table.create_checkpoint()
    log = tmp_path / "lake" / "flows" / "_delta_log"
    for entry in log.glob("*.json"):  # what log retention does to entries older than the last checkpoint
        if int(entry.stem) < table.version():
            entry.unlink()
    ingest_table(old, "flows", "late", "1b" * 32, [_flows(3, DAY, 9)])
    assert old.read("flows").num_rows == 2 + 10 + 3
    assert _count(Lake(tmp_path / "lake")) == 15


def test_every_table_has_a_checkpoint_at_most_checkpoint_interval_commits_old(tmp_path):
    """Every open replays the log after the last checkpoint: a new table asks Delta for one every
    CHECKPOINT_INTERVAL commits, and one made with Delta's default of 100 (a lake of before) gets them from
    Lake.commit, without a commit of its own (a new version of vm_leases would mean a full lease rebuild)."""
    from deltalake import DeltaTable

    from tracepipe.lake import CHECKPOINT_INTERVAL, TABLE_CONFIG

    assert CHECKPOINT_INTERVAL < 100
    for made_before in (False, True):
        root = tmp_path / f"lake-{made_before}"
        lake = Lake(root)
        ingest_table(lake, "flows", "first", f"{1:064x}", [_flows(2, DAY)])
        table = DeltaTable(str(root / "flows"))
        interval = table.metadata().configuration["delta.checkpointInterval"]
        assert interval == TABLE_CONFIG["delta.checkpointInterval"]
        if made_before:
            table.alter.set_table_properties({"delta.checkpointInterval": "100"})
        lake = Lake(root)
        start = DeltaTable(str(root / "flows")).version()
        for i in range(2, 2 * CHECKPOINT_INTERVAL + 3):  # (a day each: no compaction)
            ingest_table(lake, "flows", f"e{i}", f"{i:064x}", [_flows(2, DAY + dt.timedelta(days=i), i)])
        version = DeltaTable(str(root / "flows")).version()
        assert version > start + 2 * CHECKPOINT_INTERVAL
        log = root / "flows" / "_delta_log"
        last = json.loads((log / "_last_checkpoint").read_text())["version"]
        assert version - last < CHECKPOINT_INTERVAL, (made_before, version, last)
        checkpoints = sorted(int(p.name.split(".")[0]) for p in log.glob("*.checkpoint.parquet"))
        assert len(checkpoints) >= 2 and all((v + 1) % CHECKPOINT_INTERVAL == 0 for v in checkpoints), (
            checkpoints
        )
        assert _count(Lake(root)) == 2 * (2 * CHECKPOINT_INTERVAL + 2)


def test_a_source_is_looked_up_in_one_row_group_of_a_big_merged_manifest_file(tmp_path, monkeypatch):
    """A manifest of many sources (a collector commits ~100,000 a year): merged files are sorted by (dataset,
    content_hash) in row groups of MANIFEST_GROUP_ROWS, and a lookup reads only the group whose statistics
    hold the hash (~0.5 MB), not the file; the answer is the one the whole file gives, for hashes present,
    absent between two present, and of the other dataset."""
    import random

    from tracepipe.lake import MANIFEST, MANIFEST_DIR, MANIFEST_GROUP_ROWS, PartFile

    rng = random.Random(3)
    rows = 3 * MANIFEST_GROUP_ROWS + 77
    hashes = sorted({f"{rng.getrandbits(256):064x}" for _ in range(rows)})
    datasets = ["flows" if i % 3 else "vm_events" for i in range(len(hashes))]
    table = _manifest_rows(hashes, datasets, [f"s{i}" for i in range(len(hashes))])
    lake = Lake(tmp_path / "lake")
    part = PartFile(lake.root / MANIFEST_DIR, MANIFEST, None, "part-merged")
    part.write(table.take(pa.array(rng.sample(range(len(hashes)), len(hashes)))))  # (in any order)
    action = part.close()
    assert action is not None
    lake.commit(MANIFEST_DIR, [action])
    assert pq.read_metadata(part.path).num_row_groups == 4
    fresh = Lake(tmp_path / "lake")
    monkeypatch.setattr(fresh, "_manifest_keys", lambda: pytest.fail("read the whole manifest"))
    opened: list[int] = []
    real_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, i, **kw: opened.append(i) or real_group(self, i, **kw)
    )
    for i in rng.sample(range(len(hashes)), 60):
        opened.clear()
        other = "vm_events" if datasets[i] == "flows" else "flows"
        assert fresh._manifest_has(datasets[i], hashes[i])
        assert not fresh._manifest_has(other, hashes[i])
        between = hashes[i][:-1] + ("0" if hashes[i][-1] != "0" else "1")
        assert fresh._manifest_has(datasets[i], between) == (between in set(hashes))
        assert len(opened) <= 2  # (one group; two where datasets meet inside one)
    assert not fresh._manifest_has("flows", "0" * 64) and not fresh._manifest_has("flows", "f" * 64)


@pytest.mark.parametrize("planted", ["struct_first", "stats_not_utf8"])
def test_a_planted_manifest_file_never_hides_a_source_it_names(tmp_path, planted):
    """Review of session 22: the row-group lookup finds content_hash by its Parquet leaf (a struct of two
    leaves before it shifted the Arrow position to another column's statistics), and statistics it cannot
    read (not UTF-8) mean "may hold": the answer is the whole manifest's, never "not ingested" (a duplicate)."""
    from deltalake.transaction import AddAction

    from tracepipe.lake import MANIFEST_DIR, file_stats

    target = "ab" * 32
    lake = Lake(tmp_path / "lake")
    lake._write_manifest_row("flows", "cd" * 32, "legit", 1, 0, [], {})
    hashes = (
        pa.array([target.encode(), b"\xff\xfe"], pa.binary()).view(pa.string())
        if planted == "stats_not_utf8"
        else pa.array([target, "ef" * 32])
    )
    columns = {
        "content_hash": hashes,
        "dataset": ["flows", "flows"],
        "source": ["s", "t"],
        "rows": [1, 1],
        "rejects": [0, 0],
        "files": pa.array([[], []], pa.list_(pa.string())),
        "ingested_at": pa.array([dt.datetime(2025, 1, 1)] * 2, pa.timestamp("us", tz="UTC")),
        "stats": ["{}", "{}"],
    }
    if planted == "struct_first":
        columns = {"x": pa.array([{"a": "zz", "b": "zz"}] * 2), **columns}
    relative = "part-planted.parquet"
    path = lake.root / MANIFEST_DIR / relative
    pq.write_table(pa.table(columns), path)
    stats = (
        json.dumps({"numRecords": 2}) if planted == "stats_not_utf8" else file_stats(pq.read_metadata(path))
    )
    lake.commit(
        MANIFEST_DIR, [AddAction(relative, path.stat().st_size, {}, int(time.time() * 1000), True, stats)]
    )
    assert Lake(tmp_path / "lake")._manifest_has("flows", target)
    assert Lake(tmp_path / "lake").already_ingested("flows", target)


def test_a_new_run_asks_the_manifest_for_one_source_without_reading_it_all(tmp_path, monkeypatch):
    """A run that ingests one source (`ingest vm` every hour) learns whether it landed before from the
    manifest's statistics and two Arrow columns, not by reading every source ever ingested into Python: the
    answer is the same for sources in compacted manifest files, in files of their own, and of another
    dataset."""
    lake = Lake(tmp_path / "lake")
    hashes = [f"{i * 7919:064x}" for i in range(40)]
    for i, h in enumerate(hashes):
        ingest_table(lake, "flows", f"b{i}", h, [_flows(2, DAY + dt.timedelta(days=i % 3), i)])
    assert lake.compact("_ingest", min_files=2)["files_removed"] > 0  # most rows in merged files
    ingest_table(lake, "flows", "late", "ab" * 32, [_flows(2, DAY, 77)])  # and one in a file of its own
    fresh = Lake(tmp_path / "lake")
    monkeypatch.setattr(fresh, "_manifest_keys", lambda: pytest.fail("read the whole manifest"))
    by_files: list[str] = []  # (the killed-run check: the table's files named after the source)
    real = fresh._source_entries
    monkeypatch.setattr(fresh, "_source_entries", lambda name, h: by_files.append(h) or real(name, h))
    for h in [*hashes, "ab" * 32]:
        assert fresh.already_ingested("flows", h)
        assert not fresh.already_ingested("vm_events", h)  # (another dataset: no files of it either)
    assert by_files == [*hashes, "ab" * 32]  # only for vm_events: the manifest answered for flows
    assert not fresh.already_ingested("flows", "cd" * 32)
    assert not fresh.already_ingested("flows", hashes[5][:-1] + "f")  # (inside a merged file's range)
    assert fresh._manifest_cache is None
    opened: list[int] = []
    real_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, i, **kw: opened.append(i) or real_group(self, i, **kw)
    )
    for h in hashes[:10]:
        assert fresh.already_ingested("flows", h)
    assert len(opened) == 0  # each merged file's groups read once in the run, not once per source asked
    # a checkpoint never fails a commit that landed, whatever the table's property says
    from types import SimpleNamespace

    made: list[int] = []
    for interval in ("²", "9" * 5000, None, "20", "7"):
        table = SimpleNamespace(
            metadata=lambda i=interval: SimpleNamespace(configuration={"delta.checkpointInterval": i}),
            version=lambda: 19,
            create_checkpoint=lambda: made.append(1),
        )
        Lake._checkpoint(table)
    assert len(made) == 4  # all but "20", whose own hook wrote it at version 19


def _backdate_log(table_dir, days: float) -> dict[int, dt.datetime]:
    """Every commit and checkpoint of a table's log made `days` older, commit v a minute after commit v-1 (Delta
    time travel and log retention go by these files' modification times). {version: its commit time}."""
    start = time.time() - days * 86400
    stamps = {}
    for path in (table_dir / "_delta_log").iterdir():
        head = path.name.split(".")[0]
        if head.isdigit():
            when = start + int(head) * 60
            os.utime(path, (when, when))
            stamps[int(head)] = dt.datetime.fromtimestamp(when, dt.UTC)
    return stamps


def _sql_count(lake: Lake, *extra: str):
    result = run_in_process(
        "sql", "SELECT count(*) AS n FROM flows", "--format", "json", "--lake", str(lake.root), *extra
    )
    return result.returncode, (json.loads(result.stdout)[0]["n"] if result.returncode == 0 else result.stderr)


def test_as_of_older_than_the_log_keeps_is_refused_not_answered_from_another_version(tmp_path):
    """Hostile review F4: once log retention cleaned up the commits before a checkpoint (cleanup_metadata, as
    compaction and vacuum run it after 7 days), `--as-of flows=10` read as an empty lake and a time of then as
    the oldest version left, both exit 0: wrong evidence. Now exit 2 saying the log no longer reaches back."""
    from deltalake import DeltaTable

    lake = Lake(tmp_path / "lake")
    for i in range(24):  # a day each: no compaction; a checkpoint at version 19
        ingest_table(lake, "flows", f"d{i}", f"{i + 1:064x}", [_flows(2, DAY + dt.timedelta(days=i), i)])
    table_dir = tmp_path / "lake" / "flows"
    stamps = _backdate_log(table_dir, days=10)
    kept = {v: _sql_count(lake, "--as-of", f"flows={v}") for v in (10, 19, 20)}
    assert kept[10] == (0, 2 * 10) and kept[19][1] == 2 * 19  # (version 0 created the table empty)
    between = (stamps[10] + dt.timedelta(seconds=30)).isoformat()
    assert _sql_count(lake, "--as-of", between) == (0, 2 * 10)

    DeltaTable(str(table_dir)).cleanup_metadata()  # what log retention does: commits 0..18 go
    assert not (table_dir / "_delta_log" / f"{10:020d}.json").exists()
    for asked in ("flows=10", between):
        code, said = _sql_count(lake, "--as-of", asked)
        assert code == 2, said
        assert "no longer reaches back" in said and "oldest version is 19" in said
    assert _sql_count(lake, "--as-of", "flows=19") == kept[19]
    assert _sql_count(lake, "--as-of", (stamps[20] + dt.timedelta(seconds=30)).isoformat()) == kept[20]
    # a time before a table's first commit, its log whole, is before it existed: nothing, as before
    assert Lake(tmp_path / "lake", as_of=dt.datetime(2020, 1, 1, tzinfo=dt.UTC)).oldest_kept("flows")[0] == 19
    fresh = Lake(tmp_path / "fresh")
    ingest_table(fresh, "flows", "one", f"{99:064x}", [_flows(3, DAY)])
    assert _sql_count(fresh, "--as-of", "2020-01-01T00:00Z") == (0, 0)


def test_as_of_a_version_whose_files_vacuum_deleted_says_so_instead_of_advising_repair(tmp_path):
    """Hostile review F4: after `expire` and a vacuum past --retain, `--as-of` the version before the expire
    failed (exit 4) with "run `tracepipe repair`", which checks the current version and cannot help. Now exit
    2 saying the files of that version were vacuumed; a file the current version lists that is gone is still
    damage (exit 4, repair)."""
    lake = Lake(tmp_path / "lake")
    recent = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=2)
    ingest_table(lake, "flows", "old", "01" * 32, [_flows(7, recent - dt.timedelta(days=500))])
    ingest_table(lake, "flows", "new", "02" * 32, [_flows(3, recent)])
    token = ",".join(f"{k}={v}" for k, v in sorted(lake.versions().items()))
    assert _sql_count(lake, "--as-of", token) == (0, 10)
    expired = run_in_process("expire", "--older-than", "400d", "--no-vacuum", "--lake", str(lake.root))
    assert expired.returncode == 0, expired.stderr
    gone = [p for p in (tmp_path / "lake" / "flows").glob("date=*/*.parquet") if p not in lake.files("flows")]
    assert len(gone) == 1
    for path in gone:  # what `tracepipe vacuum` does once the removal is older than --retain
        path.unlink()
    code, said = _sql_count(lake, "--as-of", token)
    assert code == 2 and "deleted by `tracepipe vacuum`" in said and "repair" not in said, said
    assert _sql_count(lake) == (0, 3)
    # a file the current version lists, gone: damage, whatever version is asked for; repair is the advice
    now = ",".join(f"{k}={v}" for k, v in sorted(Lake(lake.root).versions().items()))
    Lake(lake.root).files("flows")[0].unlink()
    code, said = _sql_count(lake, "--as-of", now)
    assert code == 4 and "tracepipe repair" in said, said


def _removed_by(table_dir, versions) -> set[str]:
    """The files the commits `versions` of a table's log removed."""
    out = set()
    for v in versions:
        for line in (table_dir / "_delta_log" / f"{v:020d}.json").read_text().splitlines():
            action = json.loads(line)
            if "remove" in action:
                out.add(action["remove"]["path"])
    return out


def test_a_rewritten_derived_table_keeps_a_week_of_log_and_of_replaced_files(tmp_path):
    """Hostile review F5: vm_leases and vms, replaced by every lease update and never compacted, kept every
    commit in their log and every file they replaced on disk until someone ran `tracepipe vacuum` (a year of
    hourly updates: ~8,760 log entries and ~17,500 dead files per table). Now each rewrite lets the log go past
    LOG_RETENTION, and with those commits the files they removed, and nothing a version the log still
    rebuilds lists; a removal planted in the log never reaches out of the table's folder."""
    from tracepipe.lake import CHECKPOINT_INTERVAL

    lake = Lake(tmp_path / "lake")
    table_dir = tmp_path / "lake" / "vm_leases"

    def replace(i: int) -> None:
        rows = pa.table(
            {
                "addr": [f"10.0.0.{i % 250}"],
                "vm_id": [f"vm-{i}"],
                "valid_from": pa.array([DAY], FLOWS.field("ts_start").type),
            }
        )
        lake.replace_dataset("vm_leases", rows)

    for i in range(CHECKPOINT_INTERVAL + 5):  # a checkpoint at version 19
        replace(i)
    assert len(list(table_dir.glob("*.parquet"))) == CHECKPOINT_INTERVAL + 5  # every file replaced stays
    # a commit of the log altered by whoever can write the lake: removals of files out of the table's folder
    victims = tmp_path / "victims"
    victims.mkdir()
    for name in ("part-linked.parquet", "part-up.parquet", "part-victim.parquet"):
        (victims / name).write_text("not the lake's")
    (table_dir / "date=2024-01-01").symlink_to(victims, target_is_directory=True)
    (table_dir / "part-victim.parquet").symlink_to(victims / "part-victim.parquet")
    planted = [
        {"remove": {"path": p, "dataChange": True, "deletionTimestamp": 0}}
        for p in ("date=2024-01-01/part-linked.parquet", "../victims/part-up.parquet", "part-victim.parquet")
    ]
    commit = table_dir / "_delta_log" / f"{5:020d}.json"
    commit.write_text(commit.read_text().rstrip("\n") + "".join("\n" + json.dumps(a) for a in planted))

    _backdate_log(table_dir, days=30)
    for path in table_dir.glob("*.parquet"):
        os.utime(path, (time.time() - 30 * 86400,) * 2, follow_symlinks=False)
    replace(99)  # the next rewrite, a month later
    versions = sorted(int(p.name[:20]) for p in (table_dir / "_delta_log").glob("*.json"))
    oldest, _ = lake.oldest_kept("vm_leases")
    assert versions[0] == oldest == CHECKPOINT_INTERVAL - 1 and versions[-1] == lake.version("vm_leases")
    on_disk = {p.name for p in table_dir.glob("*.parquet") if not p.is_symlink()}
    listed = {e.relative for e in lake.entries("vm_leases")}
    # what is left: the files of the current version and those that commits the log keeps removed
    assert on_disk == listed | _removed_by(table_dir, versions)
    assert len(on_disk) == len(versions) + 1 and lake.read("vm_leases")["vm_id"].to_pylist() == ["vm-99"]
    for version in versions:
        assert Lake(lake.root, as_of={"vm_leases": version}).damaged("vm_leases") == []
    assert sorted(p.read_text() for p in victims.iterdir()) == ["not the lake's"] * 3
    # the planted link itself went, not its target
    assert not (table_dir / "part-victim.parquet").is_symlink()


def test_compaction_deletes_the_files_it_merged_once_their_commit_leaves_the_log(tmp_path):
    """Hostile review F5, for the day-partitioned tables: the log entries that compaction cleans up take the
    small files they merged off the disk with them (those of a merge still in the log stay, for readers and
    time travel); every version left reads whole."""
    lake = Lake(tmp_path / "lake")
    table_dir = tmp_path / "lake" / "flows"
    for i in range(COMPACT_MIN_FILES):  # the 16th merges the day
        ingest_table(lake, "flows", f"a{i}", f"{i + 1:064x}", [_flows(2, DAY + dt.timedelta(hours=i), i)])
    next_day = DAY + dt.timedelta(days=1)
    for i in range(COMPACT_MIN_FILES - 1):
        ingest_table(
            lake, "flows", f"b{i}", f"{i + 100:064x}", [_flows(2, next_day + dt.timedelta(hours=i), i)]
        )
    first_day = table_dir / f"date={DAY.date()}"
    assert len(list(first_day.glob("*.parquet"))) == COMPACT_MIN_FILES + 1  # merged, and its parts
    _backdate_log(table_dir, days=30)
    for path in table_dir.rglob("*.parquet"):
        os.utime(path, (time.time() - 30 * 86400,) * 2)
    ingest_table(lake, "flows", "last", f"{999:064x}", [_flows(2, next_day + dt.timedelta(hours=20), 99)])
    assert [p.name for p in first_day.glob("*.parquet")] == [lake.files("flows", [str(DAY.date())])[0].name]
    second_day = table_dir / f"date={next_day.date()}"
    assert len(list(second_day.glob("*.parquet"))) == COMPACT_MIN_FILES + 1  # its merge is still in the log
    assert _count(Lake(lake.root)) == 2 * (2 * COMPACT_MIN_FILES)
    oldest, _ = lake.oldest_kept("flows")
    for version in range(oldest, lake.version("flows") + 1):
        assert Lake(lake.root, as_of={"flows": version}).damaged("flows") == []


def test_a_commit_whose_new_file_was_deleted_before_it_commits_nothing(tmp_path):
    """Appends take no lock that `vacuum` takes, so a `vacuum --retain` shorter than a long ingest can delete
    a file written but not yet committed. The commit used to list it anyway: every later read of the table
    failed on the missing file. Now the commit refuses, nothing lands, and the same write again succeeds."""
    from tracepipe.errors import LakeError
    from tracepipe.lake import PartFile
    from tracepipe.schema import DATASETS

    lake = Lake(tmp_path / "lake")
    ingest_table(lake, "flows", "first", "h1", [_flows(3, DAY)])
    before = lake.version("flows")
    part = PartFile(lake.root / "flows", DATASETS["flows"], "2024-03-12", "part-late")
    part.write(_flows(2, DAY, seed=1))
    add = part.close()
    assert add is not None
    part.path.unlink()  # vacuum's doing
    with pytest.raises(LakeError, match="gone or changed since written"):
        lake.commit("flows", [add])
    assert lake.version("flows") == before
    assert _count(lake) == 3
    ingest_table(lake, "flows", "second", "h2", [_flows(2, DAY, seed=1)])
    assert _count(lake) == 5


def test_rejects_are_written_as_they_come_and_counted_beyond_a_cap(tmp_path, monkeypatch):
    """Session-27 review: every reject was held in memory until the source's commit (~240 bytes each: a 16 MB
    syslog file of 8 M junk lines peaked at 2.15 GB, a 173 KB gzip'ed conn.log at 1.1 GB). Now they go to the
    source's rejects file in row groups as they come, the first MAX_REJECT_ROWS one by one and the rest as one
    row per reason saying how many and between which lines; the command still counts every one."""
    import pyarrow.parquet as pq

    from tests.conftest import ingest_syslog
    from tracepipe import lake as lake_module

    monkeypatch.setattr(lake_module, "MAX_REJECT_ROWS", 100)
    monkeypatch.setattr(lake_module, "REJECT_GROUP_ROWS", 16)
    log = tmp_path / "junk.log"
    good = "2024-03-12T10:00:00+00:00 web-01 sshd[1]: Accepted password for bob from 192.0.2.7 port 4 ssh2\n"
    log.write_text(good + "x\n" * 1000 + good.replace("10:00", "11:00"))
    lake = Lake(tmp_path / "lake")
    report, _ = ingest_syslog(lake, [log], sender_addr="10.0.0.5")
    assert report.results[0].rejects == 1000 and report.results[0].rows == 2
    (path,) = lake.files("rejects")
    assert pq.ParquetFile(path).metadata.num_row_groups >= 100 // 16  # written as they came
    rows = pq.read_table(path).to_pylist()
    assert len(rows) == 101
    assert sorted(r["line"] for r in rows)[:100] == list(range(2, 102))
    (summary,) = [r for r in rows if r["detail"].startswith("900 more rejects")]
    assert summary["line"] == 102 and "lines 102..1001" in summary["detail"]
    assert _count(lake, "SELECT count(*) FROM vm_logs") == 2


def _merged_manifest(lake: Lake, sources: int, bloom: bool = True) -> tuple[list[str], pa.Table]:
    """A merged manifest file of `sources` flows rows (a collector's year is ~100,000), as compaction writes
    it (bloom: its Bloom filters on `source`) or as it wrote it before them; committed to `lake`."""
    import random

    from deltalake.transaction import AddAction

    from tracepipe.lake import MANIFEST, MANIFEST_DIR, PartFile, file_stats

    rng = random.Random(5)
    hashes = sorted({f"5{rng.getrandbits(252):063x}" for _ in range(sources)})  # (all in "5…")
    sources = [f"/spool/seg-{i:06d}" for i in rng.sample(range(len(hashes)), len(hashes))]
    table = _manifest_rows(hashes, ["flows"] * len(hashes), sources)
    if bloom:
        part = PartFile(lake.root / MANIFEST_DIR, MANIFEST, None, "part-merged")
        part.write(table)
        action = part.close()
        assert action is not None
    else:
        path = lake.root / MANIFEST_DIR / "part-merged.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=MANIFEST.group_rows)
        size, stats = path.stat().st_size, file_stats(pq.read_metadata(path))
        action = AddAction("part-merged.parquet", size, {}, int(time.time() * 1000), True, stats)
    lake.commit(MANIFEST_DIR, [action])
    return hashes, table


def _manifest_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | None]]:
    """(file, row group or None for its footer) of every manifest file read from now on."""
    import tracepipe.lake as lake_module

    reads: list[tuple[str, int | None]] = []
    real_footer, real_group = pq.read_metadata, pq.ParquetFile.read_row_group
    real_open, real_file = pq.ParquetFile.__init__, lake_module._manifest_file
    handles: list[tuple[object, str]] = []  # (manifest files are read through handles: lake._manifest_file)

    @contextlib.contextmanager
    def manifest_file(path):
        with real_file(path) as handle:
            handles.append((handle, str(path)))
            yield handle

    def name_of(where) -> str:
        return next((name for handle, name in handles if handle is where), str(where))

    def footer(where, *args, **kwargs):
        name = name_of(where)
        if "_ingest" in name:
            reads.append((os.path.basename(name), None))
        return real_footer(where, *args, **kwargs)

    def opened(self, source, *args, **kwargs):
        self._test_path = name_of(source)
        real_open(self, source, *args, **kwargs)

    def group(self, i, *args, **kwargs):
        if "_ingest" in getattr(self, "_test_path", ""):
            reads.append((os.path.basename(self._test_path), i))
        return real_group(self, i, *args, **kwargs)

    monkeypatch.setattr(lake_module, "_manifest_file", manifest_file)
    monkeypatch.setattr(pq, "read_metadata", footer)
    monkeypatch.setattr(pq.ParquetFile, "__init__", opened)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", group)
    return reads


def test_compaction_asks_the_manifest_for_the_sources_it_merges_only(tmp_path, monkeypatch):
    """Regression (review: cost grew with history): compaction after a commit read every manifest row into
    Python sets to learn which files were confirmed (_confirmed; 3.3 s and 775 MiB at 1 M sources). It asks
    for the keys of the files it merges: a manifest file whose statistics exclude them is not opened, of a
    merged one only the group that may hold each key is read. The files merged are the same."""
    lake = Lake(tmp_path / "lake")
    _merged_manifest(lake, 3 * 8192 + 77)
    earlier = [
        f"{i:064x}" for i in range(1, 4)
    ]  # one-row manifest files whose statistics exclude the new ones
    for i, h in enumerate(earlier):
        ingest_table(lake, "flows", f"earlier-{i}", h, [_flows(2, DAY - dt.timedelta(days=2), i)])
    new = [f"e{i}" * 32 for i in range(1, 4)]  # (above every other hash)
    for i, h in enumerate(new):
        ingest_table(lake, "flows", f"new-{i}", h, [_flows(3, DAY, 10 + i)])
    fresh = Lake(tmp_path / "lake")  # (the next run: nothing of the manifest read yet)
    monkeypatch.setattr(fresh, "_manifest_keys", lambda: pytest.fail("read the whole manifest"))
    reads = _manifest_reads(monkeypatch)
    done = fresh.compact("flows", ["2024-03-12"], min_files=2)
    assert done["files_removed"] == 3 and done["files_added"] == 1 and _count(fresh) == 9 + 6
    opened = {name for name, _group in reads}
    # neither the merged file (its hashes all start with "5") nor the earlier sources' files: the new ones
    assert "part-merged.parquet" not in opened and len(opened) <= 3
    assert all(name.startswith("part-") for name in opened)
    # a key inside the merged file's range: one group read, and the answer the whole manifest gives
    hashes, _table = _merged_manifest(Lake(tmp_path / "other"), 3 * 8192 + 77)
    other = Lake(tmp_path / "other")
    monkeypatch.setattr(other, "_manifest_keys", lambda: pytest.fail("read the whole manifest"))
    reads.clear()
    assert other._confirmed([hashes[10], hashes[9000], hashes[-1]]) == {hashes[10], hashes[9000], hashes[-1]}
    assert len([g for _name, g in reads if g is not None]) <= 3


@pytest.mark.parametrize("bloom", [True, False], ids=["merged-with-bloom-filters", "merged-before-them"])
def test_has_source_asks_the_manifest_for_one_path_without_reading_it_all(tmp_path, monkeypatch, bloom):
    """Regression (review: cost grew with history): has_source (every big file of `ingest netflow --jobs`)
    read every manifest row into Python sets (3.6 s, 792 MiB at 1 M sources). A file of one source whose
    statistics exclude the path is not opened; of a merged file (sorted by content hash: its groups'
    statistics span every path) only the groups its Bloom filters on `source` do not exclude are read. A
    merged file written before the filters is read group by group in Arrow: the same answers."""
    lake = Lake(tmp_path / "lake")
    _hashes, table = _merged_manifest(lake, 3 * 8192 + 77, bloom)
    for i in range(3):
        ingest_table(lake, "flows", f"/data/b{i}.pcap", f"{i + 1:064x}", [_flows(2, DAY, i)])
    fresh = Lake(tmp_path / "lake")
    monkeypatch.setattr(fresh, "_manifest_keys", lambda: pytest.fail("read the whole manifest"))
    reads = _manifest_reads(monkeypatch)
    sources = table.column("source").to_pylist()
    for source in [sources[0], sources[5000], sources[-1]]:
        reads.clear()
        assert fresh.has_source("flows", source)
        assert not fresh.has_source("vm_events", source)
        groups = [g for name, g in reads if g is not None]
        assert {name for name, _g in reads} == {"part-merged.parquet"}  # (the one-row files: excluded)
        assert len(groups) <= (1 if bloom else 4)
    reads.clear()
    assert not fresh.has_source("flows", "/spool/seg-000100x")  # (inside the merged file's range)
    assert len([g for _name, g in reads if g is not None]) <= (1 if bloom else 4)
    assert fresh.has_source("flows", "/data/b1.pcap") and not fresh.has_source("flows", "/data/b9.pcap")
    assert fresh._manifest_cache is None


def test_bloom_filters_are_read_as_duckdb_reads_them(tmp_path):
    """tracepipe.bloom (has_source's reader of the filters pyarrow writes) excludes exactly the row groups that
    DuckDB's own reader excludes, for paths present, absent, short and longer than xxHash's 32-byte stripe;
    a file without filters excludes nothing."""
    import random

    from tracepipe import bloom

    assert bloom.xxhash64(b"") == 0xEF46DB3751D8E999 and bloom.xxhash64(b"a") == 0xD24EC4F1A98C6E5B
    paths = [f"/srv/spool/seg-{i:09d}.spool" for i in range(40_000)]
    table = pa.table({"source": paths})
    with_filters, without = tmp_path / "filters.parquet", tmp_path / "plain.parquet"
    filters = {"source": {"ndv": 8192, "fpp": 0.01}}
    pq.write_table(table, with_filters, row_group_size=8192, bloom_filter_options=filters)
    pq.write_table(table, without, row_group_size=8192)
    rng = random.Random(7)
    asked = [*rng.sample(paths, 30), *(f"/srv/spool/seg-{i:09d}.x" for i in range(30)), "", "a", "é" * 40]
    connection = duckdb.connect()
    for path, footer in (
        (with_filters, pq.read_metadata(with_filters)),
        (without, pq.read_metadata(without)),
    ):
        with open(path, "rb") as handle:
            for value in asked:
                ours = {
                    g
                    for g in range(footer.num_row_groups)
                    if bloom.excludes(handle, footer, g, "source", value)
                }
                theirs = connection.execute(
                    "SELECT row_group_id FROM parquet_bloom_probe(?, 'source', ?) WHERE bloom_filter_excludes",
                    [str(path), value],
                ).fetchall()
                assert ours == {g for (g,) in theirs}
                if path == without:
                    assert ours == set()
                elif value in paths:  # never its own group; most others (1% false positives a group)
                    assert paths.index(value) // 8192 not in ours and len(ours) >= footer.num_row_groups - 2


def _manifest_rows(hashes: list[str], datasets: list[str], sources: list[str]) -> pa.Table:
    """Manifest rows of one-row sources ingested on 2025-01-01, one per content hash."""
    from tracepipe.schema import INGEST_MANIFEST

    n = len(hashes)
    columns = {"content_hash": hashes, "dataset": datasets, "source": sources, "rows": [1] * n}
    columns |= {"rejects": [0] * n, "files": [[]] * n, "stats": ["{}"] * n}
    columns["ingested_at"] = [dt.datetime(2025, 1, 1, tzinfo=dt.UTC)] * n
    return pa.table({f.name: columns[f.name] for f in INGEST_MANIFEST}, schema=INGEST_MANIFEST)
