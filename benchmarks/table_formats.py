"""Which open table format should hold the lake (issue 11)? Delta Lake (delta-rs) vs Apache Iceberg (pyiceberg).

Builds, for each format, a flows-like table (ts_start timestamp[us, UTC], src_addr/dst_addr string,
src_port/dst_port int32, proto int16, packets/bytes int64, source string, partitioned by UTC day `date`)
through N small appends (default 3000 commits of 50 rows) shaped like `tracepipe collect --rotate 5m`:
288 commits per day partition, days advancing, a few late rows landing in the previous day. Then measures:

- append: per-commit time (mean, p95, max; first vs last 10 % of commits, to show growth with history)
- open + list one day: a new table object (catalog/log read from disk), files of one day by partition pruning
  from metadata; in-process (median of 5) at several commit counts, and once from a cold `python` process
- count one day: pyarrow.dataset over the format's file list, and DuckDB `read_parquet([files])`
- overwrite one day (remove the day's files + add the rewritten rows, one commit)
- compaction (Delta: `optimize.compact()`; Iceberg: pyiceberg has no rewrite_data_files, so each day is
  rewritten with `overwrite(overwrite_filter=date = D)`), then open/list/count again
- retention: Delta `vacuum` / Iceberg `expire_snapshots`; metadata size on disk before and after
- two processes appending at once (optimistic concurrency: do both succeed, is every row there?), and an
  append racing an overwrite of the same day (is a row lost?)
- polars `scan_delta` / `scan_iceberg`, time travel 10 commits back, peak RSS of each format's process

The writer reopens its table object every --reopen-every commits (default 100): a delta-rs DeltaTable kept
across hundreds of commits gets slower with every commit since it was opened (about 10 ms -> 110 ms per
append after 700 commits on this machine), reopened it stays near 10-20 ms. pyiceberg's append costs grow with
the number of retained snapshots (TableMetadata is deep-copied on every update), so a long Iceberg build wants
--iceberg-expire-every K (expire all but the last K snapshots every K commits) and --iceberg-merge-manifests.

Each format runs in its own child process (so peak RSS is per format). Wall and CPU seconds are both shown
where the machine is shared. Needs `deltalake`, `pyiceberg[sql-sqlite,pyarrow]`, `duckdb`, `pyarrow`, `polars`.

    python benchmarks/table_formats.py                        # both formats, N=3000, prints a table
    python benchmarks/table_formats.py --commits 500 --formats delta --format json
    python benchmarks/table_formats.py --formats iceberg --commits 1500 --iceberg-merge-manifests \
        --iceberg-expire-every 100                            # Iceberg as a long-running writer would keep it
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

COMMITS_PER_DAY = 288  # 5-minute rotation
EPOCH = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
SCHEMA = pa.schema(
    [
        ("ts_start", pa.timestamp("us", tz="UTC")),
        ("src_addr", pa.string()),
        ("dst_addr", pa.string()),
        ("src_port", pa.int32()),
        ("dst_port", pa.int32()),
        ("proto", pa.int16()),
        ("packets", pa.int64()),
        ("bytes", pa.int64()),
        ("source", pa.string()),
        ("date", pa.date32()),
    ]
)


# ---- workload ---------------------------------------------------------------------------------------------------


def batch(commit: int, rows: int, seed: int = 0) -> pa.Table:
    """The rows of the collector's commit number `commit`: flows starting in its 5-minute window, a few
    (about 2 %) up to 2 minutes earlier, so the first commit of a day also writes to the previous day."""
    rng = np.random.default_rng(commit * 7919 + seed)
    window = EPOCH.timestamp() + commit * 300.0
    ts = window + rng.uniform(0, 300, rows)
    late = rng.random(rows) < 0.02
    ts[late] -= rng.uniform(0, 120, late.sum())
    ts_us = (ts * 1e6).astype(np.int64)
    days = (ts_us // 86_400_000_000).astype(np.int32)
    octets = rng.integers(0, 256, (rows, 4))
    src = [f"10.{a}.{b}.{c}" for a, b, c in octets[:, :3]]
    dst = [f"192.0.2.{d}" for d in octets[:, 3]]
    return pa.table(
        [
            pa.array(ts_us, pa.timestamp("us", tz="UTC")),
            pa.array(src, pa.string()),
            pa.array(dst, pa.string()),
            pa.array(rng.integers(1024, 65536, rows), pa.int32()),
            pa.array(rng.choice([22, 53, 80, 443], rows), pa.int32()),
            pa.array(rng.choice([6, 17], rows), pa.int16()),
            pa.array(rng.integers(1, 1000, rows), pa.int64()),
            pa.array(rng.integers(40, 1_500_000, rows), pa.int64()),
            pa.array([f"probe-{seed}"] * rows, pa.string()),
            pa.array(days, pa.int32()).cast(pa.date32()),
        ],
        schema=SCHEMA,
    )


def day_of(commit: int) -> dt.date:
    return (EPOCH + dt.timedelta(seconds=commit * 300)).date()


def dir_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under path."""
    total = files = 0
    for p in path.rglob("*"):
        if p.is_file():
            total += p.stat().st_size
            files += 1
    return total, files


class Clock:
    """Wall and process-CPU seconds of a block (CPU includes every thread: Rust, Arrow, DuckDB)."""

    def __enter__(self) -> Clock:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def timed(fn, repeat: int = 5) -> dict:
    """Median wall/CPU seconds of `fn()` over `repeat` runs, and its last result."""
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        with Clock() as c:
            result = fn()
        walls.append(c.wall)
        cpus.append(c.cpu)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "result": result}


def count_pyarrow(files: list[str]) -> int:
    import pyarrow.dataset as ds

    return ds.dataset(files, format="parquet").count_rows()


def count_duckdb(files: list[str]) -> int:
    import duckdb

    con = duckdb.connect()
    try:
        return con.execute("select count(*) from read_parquet(?)", [files]).fetchone()[0]
    finally:
        con.close()


def read_files(files: list[str]) -> pa.Table:
    import pyarrow.dataset as ds

    if not files:
        return SCHEMA.empty_table()
    return ds.dataset(files, format="parquet").to_table()


def local(uri: str) -> str:
    return uri.removeprefix("file://")


# ---- formats ----------------------------------------------------------------------------------------------------


class Delta:
    name = "delta"

    def __init__(self, root: Path, merge_manifests: bool = False) -> None:
        self.path = root / "flows"
        self.handle = None

    def create(self) -> None:
        from deltalake import DeltaTable

        DeltaTable.create(
            str(self.path),
            schema=SCHEMA,
            partition_by=["date"],
            configuration={"delta.checkpointInterval": "100"},
        )

    def append(self, table: pa.Table, held: bool = True) -> None:
        """Append in one commit. `held`: the collector keeps its table object between commits (as it would);
        otherwise the log is read again from disk first."""
        from deltalake import DeltaTable, write_deltalake

        if self.handle is None or not held:
            self.handle = DeltaTable(str(self.path))
        write_deltalake(self.handle, table, mode="append")

    def open_files(self, day: dt.date) -> list[str]:
        from deltalake import DeltaTable

        return DeltaTable(str(self.path)).file_uris(file_pruning_predicate=[("date", "=", day.isoformat())])

    def rewrite_day(self, day: dt.date) -> dict:
        """Read one day from a snapshot and replace it in one commit based on that same snapshot (a concurrent
        append into the day must make this commit fail, not vanish)."""
        from deltalake import DeltaTable, write_deltalake

        with Clock() as read:
            t = DeltaTable(str(self.path))
            files = t.file_uris(file_pruning_predicate=[("date", "=", day.isoformat())])
            data = read_files(files)
            if "date" in data.column_names:
                data = data.drop_columns(["date"])
            # delta-rs does not store partition columns in the data files: `date` comes from the path / log.
            data = data.append_column("date", pa.array([day] * data.num_rows, pa.date32())).select(
                SCHEMA.names
            )
        with Clock() as commit:
            write_deltalake(t, data, mode="overwrite", predicate=f"date = '{day.isoformat()}'")
        return {
            "read_s": read.wall,
            "commit_s": commit.wall,
            "commit_cpu_s": commit.cpu,
            "rows": data.num_rows,
        }

    def compact(self, days: list[dt.date]) -> dict:
        from deltalake import DeltaTable

        m = DeltaTable(str(self.path)).optimize.compact()
        return {"files_added": m["numFilesAdded"], "files_removed": m["numFilesRemoved"], "commits": 1}

    def expire(self) -> dict:
        from deltalake import DeltaTable

        t = DeltaTable(str(self.path))
        removed = t.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
        t.cleanup_metadata()  # log files older than delta.logRetentionDuration (30 days): none here
        return {"data_files_deleted": len(removed)}

    def metadata_dir(self) -> list[Path]:
        return [self.path / "_delta_log"]

    def version_info(self) -> dict:
        from deltalake import DeltaTable

        log = self.path / "_delta_log"
        t = DeltaTable(str(self.path))
        last = log / "_last_checkpoint"
        return {
            "version": t.version(),
            "checkpoints": len(list(log.glob("*.checkpoint*.parquet"))),
            "last_checkpoint": json.loads(last.read_text())["version"] if last.exists() else None,
            "json_commits": len(list(log.glob("*.json"))),
        }

    def count_commits_ago(self, k: int) -> int:
        from deltalake import DeltaTable

        t = DeltaTable(str(self.path))
        t.load_as_version(t.version() - k)
        return count_pyarrow(t.file_uris())

    import_code = "import deltalake"

    def polars_count(self, day: dt.date) -> int:
        import polars as pl

        return pl.scan_delta(str(self.path)).filter(pl.col("date") == day).select(pl.len()).collect().item()

    def cold_open_code(self, day: dt.date) -> str:
        return (
            "from deltalake import DeltaTable;"
            f"f=DeltaTable({str(self.path)!r}).file_uris(file_pruning_predicate=[('date','=','{day}')]);"
            "print(len(f))"
        )


class Iceberg:
    name = "iceberg"

    def __init__(self, root: Path, merge_manifests: bool = False) -> None:
        self.root = root
        self.merge = merge_manifests
        self.handle = None

    def catalog(self):
        from pyiceberg.catalog.sql import SqlCatalog

        return SqlCatalog(
            "bench", uri=f"sqlite:///{self.root}/catalog.db", warehouse=f"file://{self.root}/warehouse"
        )

    def create(self) -> None:
        cat = self.catalog()
        cat.create_namespace("lake")
        props = {
            # keep only the last 100 metadata.json files (the default keeps every one: O(N^2) bytes on disk)
            "write.metadata.delete-after-commit.enabled": "true",
            "write.metadata.previous-versions-max": "100",
        }
        if self.merge:
            props["commit.manifest-merge.enabled"] = "true"
        t = cat.create_table("lake.flows", schema=SCHEMA, properties=props)
        with t.update_spec() as spec:
            spec.add_identity("date")

    def append(self, table: pa.Table, held: bool = True) -> None:
        if self.handle is None or not held:
            self.handle = self.catalog().load_table("lake.flows")
        self.handle.append(table)

    def _files(self, t, day: dt.date) -> list[str]:
        from pyiceberg.expressions import EqualTo

        return [
            local(task.file.file_path)
            for task in t.scan(row_filter=EqualTo("date", day.isoformat())).plan_files()
        ]

    def open_files(self, day: dt.date) -> list[str]:
        return self._files(self.catalog().load_table("lake.flows"), day)

    def rewrite_day(self, day: dt.date) -> dict:
        """Read one day from a snapshot and replace it in one commit (delete + append snapshots, one catalog
        commit) based on that same snapshot."""
        from pyiceberg.expressions import EqualTo

        with Clock() as read:
            t = self.catalog().load_table("lake.flows")
            data = read_files(self._files(t, day)).select(SCHEMA.names).cast(SCHEMA)
        with Clock() as commit:
            if data.num_rows:
                t.overwrite(data, overwrite_filter=EqualTo("date", day.isoformat()))
        return {
            "read_s": read.wall,
            "commit_s": commit.wall,
            "commit_cpu_s": commit.cpu,
            "rows": data.num_rows,
        }

    def compact(self, days: list[dt.date]) -> dict:
        """pyiceberg (0.12) has no rewrite_data_files: rewrite each day with overwrite (one commit per day)."""
        before = sum(len(self.open_files(d)) for d in days)
        for d in days:
            self.rewrite_day(d)
        after = sum(len(self.open_files(d)) for d in days)
        return {"files_added": after, "files_removed": before, "commits": len(days)}

    def expire_keep_last(self, keep: int) -> None:
        """Expire all but the newest `keep` snapshots (maintenance a writer would run every `keep` commits)."""
        t = self.catalog().load_table("lake.flows")
        snaps = sorted(t.metadata.snapshots, key=lambda s: s.timestamp_ms)
        if len(snaps) > keep:
            cutoff = dt.datetime.fromtimestamp(snaps[-keep].timestamp_ms / 1000, dt.UTC)
            t.maintenance.expire_snapshots().older_than(cutoff).commit()
        self.handle = None

    def expire(self) -> dict:
        t = self.catalog().load_table("lake.flows")
        n_before = len(t.metadata.snapshots)
        cutoff = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        t.maintenance.expire_snapshots().older_than(cutoff).commit()
        t = self.catalog().load_table("lake.flows")
        # pyiceberg's expire_snapshots only edits metadata: data files, manifests, manifest lists stay on disk
        # (no delete_orphan_files / remove_orphan_files in pyiceberg 0.12).
        return {"snapshots_before": n_before, "snapshots_after": len(t.metadata.snapshots)}

    def metadata_dir(self) -> list[Path]:
        return [self.root / "warehouse" / "lake" / "flows" / "metadata", self.root / "catalog.db"]

    def version_info(self) -> dict:
        t = self.catalog().load_table("lake.flows")
        snap = t.current_snapshot()
        manifests = snap.manifests(t.io) if snap else []
        meta = Path(local(t.metadata_location))
        return {
            "snapshots": len(t.metadata.snapshots),
            "manifests_in_current_list": len(manifests),
            "metadata_json_bytes": meta.stat().st_size,
            "metadata_json_files": len(list(meta.parent.glob("*.metadata.json"))),
        }

    def count_commits_ago(self, k: int) -> int:
        t = self.catalog().load_table("lake.flows")
        snap = t.current_snapshot()
        for _ in range(k):
            snap = t.metadata.snapshot_by_id(snap.parent_snapshot_id)
        return count_pyarrow(
            [local(task.file.file_path) for task in t.scan(snapshot_id=snap.snapshot_id).plan_files()]
        )

    import_code = "import pyiceberg.catalog.sql, pyiceberg.expressions"

    def polars_count(self, day: dt.date) -> int:
        import polars as pl

        t = self.catalog().load_table("lake.flows")
        return pl.scan_iceberg(t).filter(pl.col("date") == day).select(pl.len()).collect().item()

    def cold_open_code(self, day: dt.date) -> str:
        return (
            "from pyiceberg.catalog.sql import SqlCatalog;from pyiceberg.expressions import EqualTo;"
            f"c=SqlCatalog('bench',uri='sqlite:///{self.root}/catalog.db',warehouse='file://{self.root}/warehouse');"
            f"f=list(c.load_table('lake.flows').scan(row_filter=EqualTo('date','{day}')).plan_files());"
            "print(len(f))"
        )


FORMATS = {"delta": Delta, "iceberg": Iceberg}


# ---- one format, in its own process -----------------------------------------------------------------------------


def metadata_bytes(fmt) -> dict:
    b = f = 0
    for p in fmt.metadata_dir():
        if p.is_dir():
            bb, ff = dir_size(p)
        else:
            bb, ff = p.stat().st_size, 1
        b += bb
        f += ff
    return {"bytes": b, "files": f}


def open_and_count(fmt, day: dt.date, script_python: str) -> dict:
    o = timed(lambda: fmt.open_files(day))
    files = o["result"]
    pa_count = timed(lambda: count_pyarrow(files), repeat=3)
    dd_count = timed(lambda: count_duckdb(files), repeat=3)
    with Clock() as c:
        out = subprocess.run(
            [script_python, "-c", fmt.cold_open_code(day)], capture_output=True, text=True, check=True
        )
    assert int(out.stdout.strip()) == len(files), (out.stdout, len(files))
    with Clock() as imp:
        subprocess.run([script_python, "-c", fmt.import_code], check=True)
    return {
        "open_list_s": round(o["wall"], 4),
        "open_list_cpu_s": round(o["cpu"], 4),
        "files_in_day": len(files),
        "cold_process_open_list_s": round(c.wall, 3),
        "cold_process_import_only_s": round(imp.wall, 3),
        "count_pyarrow_s": round(pa_count["wall"], 4),
        "count_duckdb_s": round(dd_count["wall"], 4),
        "rows_in_day": pa_count["result"],
        "duckdb_rows_agree": dd_count["result"] == pa_count["result"],
    }


def run_concurrent(
    fmt_name: str, root: Path, merge: bool, appends: int, rows: int, race_overwrite: bool
) -> dict:
    """Two child processes at once: two appenders, or an appender and an overwriter of the same day."""
    start_at = time.time() + 2.0
    day = day_of(0)
    roles = ["append", "overwrite"] if race_overwrite else ["append", "append"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--_writer",
                fmt_name,
                str(root),
                role,
                str(appends),
                str(rows),
                str(i + 1),
                str(start_at),
                day.isoformat(),
                "1" if merge else "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, role in enumerate(roles)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        try:
            results.append(json.loads(out.strip().splitlines()[-1]))
        except (json.JSONDecodeError, IndexError):
            results.append({"crashed": True, "stderr": err[-500:]})
    return {"roles": roles, "writers": results}


def writer_main(argv: list[str]) -> None:
    fmt_name, root, role, appends, rows, seed, start_at, day, merge = argv
    fmt = FORMATS[fmt_name](Path(root), merge == "1")
    appends, rows, seed = int(appends), int(rows), int(seed)
    fmt.open_files(dt.date.fromisoformat(day))  # imports and first open before the start line
    time.sleep(max(0.0, float(start_at) - time.time()))
    ok = failed = 0
    errors: list[str] = []
    t0 = time.perf_counter()
    for i in range(appends):
        try:
            if role == "append":
                # the same day partition as the other writer (commit 0 .. appends: day 0)
                fmt.append(batch(i, rows, seed=100 + seed), held=False)
            else:
                fmt.rewrite_day(dt.date.fromisoformat(day))  # the day unchanged: every row must survive
            ok += 1
        except Exception as e:
            failed += 1
            errors.append(f"{type(e).__name__}: {str(e)[:160]}")
    print(
        json.dumps(
            {
                "role": role,
                "ok": ok,
                "failed": failed,
                "seconds": round(time.perf_counter() - t0, 2),
                "errors": sorted(set(errors))[:3],
            }
        )
    )


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def bench_format(
    name: str, commits: int, rows: int, concurrent: int, workdir: Path, merge: bool, reopen: int, expire: int
) -> dict:
    root = workdir / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    fmt = FORMATS[name](root, merge)
    res: dict = {"format": name, "commits": commits, "rows_per_commit": rows, "reopen_every": reopen}
    if name == "delta":
        import deltalake

        res["library"] = f"deltalake {deltalake.__version__}"
    else:
        import pyiceberg

        res["library"] = f"pyiceberg {pyiceberg.__version__}" + (" merge" if merge else "")
        res["library"] += f" expire/{expire}" if expire else ""
    fmt.create()

    probe_day = day_of(COMMITS_PER_DAY + 10)  # a full day (the second), 288 commits
    milestones = {
        m for m in (2 * COMMITS_PER_DAY, commits // 2, commits - 1) if 2 * COMMITS_PER_DAY <= m < commits
    }
    walls: list[float] = []
    cpus: list[float] = []
    growth = []
    expire_s = 0.0
    total = Clock().__enter__()
    for i in range(commits):
        b = batch(i, rows)
        if reopen and i % reopen == 0:
            fmt.handle = None  # the writer reopens its table object (after each Delta checkpoint)
        with Clock() as c:
            fmt.append(b)
        if expire and name == "iceberg" and (i + 1) % expire == 0:
            with Clock() as e:
                fmt.expire_keep_last(expire)
            expire_s += e.wall
        walls.append(c.wall)
        cpus.append(c.cpu)
        if i + 1 in milestones:
            o = timed(lambda: fmt.open_files(probe_day), repeat=3)
            growth.append({"commits": i + 1, "open_list_s": round(o["wall"], 4), **fmt.version_info()})
    total.__exit__()
    tenth = max(1, commits // 10)
    res["append"] = {
        "mean_ms": round(1e3 * statistics.fmean(walls), 2),
        "p95_ms": round(1e3 * pct(walls, 95), 2),
        "max_ms": round(1e3 * max(walls), 1),
        "cpu_mean_ms": round(1e3 * statistics.fmean(cpus), 2),
        "first10pct_mean_ms": round(1e3 * statistics.fmean(walls[:tenth]), 2),
        "last10pct_mean_ms": round(1e3 * statistics.fmean(walls[-tenth:]), 2),
        "total_s": round(total.wall, 1),
        "expire_during_build_s": round(expire_s, 1),
    }
    with Clock() as c:
        fmt.append(batch(commits, rows), held=False)
    res["append"]["reopen_then_append_ms"] = round(1e3 * c.wall, 1)
    res["growth"] = growth
    res["at_N"] = {**open_and_count(fmt, probe_day, sys.executable), **fmt.version_info()}
    res["metadata_at_N"] = metadata_bytes(fmt)

    # time travel (10 commits back: every append so far is one commit) + polars
    with Clock() as c:
        back = fmt.count_commits_ago(10)
    res["time_travel_10_back"] = {"rows": back, "s": round(c.wall, 3), "ok": back == (commits - 9) * rows}
    with Clock() as c:
        pl_rows = fmt.polars_count(probe_day)
    res["polars"] = {"rows": pl_rows, "s": round(c.wall, 3), "ok": pl_rows == res["at_N"]["rows_in_day"]}

    # overwrite one (full) day: read it through the format, rewrite it in one commit
    ow_day = day_of(2 * COMMITS_PER_DAY + 10)
    before = fmt.open_files(ow_day)
    w = fmt.rewrite_day(ow_day)
    after = fmt.open_files(ow_day)
    res["overwrite_day"] = {
        "s": round(w["commit_s"], 3),
        "cpu_s": round(w["commit_cpu_s"], 3),
        "read_s": round(w["read_s"], 3),
        "rows": w["rows"],
        "files_before": len(before),
        "files_after": len(after),
        "rows_after": count_pyarrow(after),
    }

    # compaction
    days = sorted({day_of(i) for i in range(commits + 1)} | {day_of(0) - dt.timedelta(days=1)})
    with Clock() as c:
        m = fmt.compact(days)
    res["compaction"] = {"s": round(c.wall, 2), "cpu_s": round(c.cpu, 2), **m}
    res["after_compaction"] = {**open_and_count(fmt, probe_day, sys.executable), **fmt.version_info()}
    res["metadata_after_compaction"] = metadata_bytes(fmt)
    with Clock() as c:
        e = fmt.expire()
    res["retention"] = {"s": round(c.wall, 2), **e}
    res["after_retention"] = {
        "open_list_s": timed(lambda: fmt.open_files(probe_day))["wall"],
        **fmt.version_info(),
    }
    res["metadata_after_retention"] = metadata_bytes(fmt)
    res["peak_rss_mib_build_and_read"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    # concurrency, on fresh small tables (so the figures above are not disturbed)
    conc = {}
    for race in (False, True):
        croot = workdir / f"{name}-conc-{int(race)}"
        shutil.rmtree(croot, ignore_errors=True)
        croot.mkdir(parents=True)
        cf = FORMATS[name](croot, merge)
        cf.create()
        for i in range(5):
            cf.append(batch(i, rows, seed=7), held=False)
        day0 = day_of(0)
        r = run_concurrent(name, croot, merge, concurrent, rows, race)
        appended = sum(w.get("ok", 0) for w in r["writers"] if w.get("role") == "append") * rows
        expected = 5 * rows + appended
        total_rows = sum(count_pyarrow(cf.open_files(d)) for d in {day0, day0 - dt.timedelta(days=1)})
        r["rows_expected_from_successful_commits"] = expected
        r["rows_found"] = total_rows
        r["nothing_lost"] = total_rows == expected
        conc["append_vs_overwrite_same_day" if race else "two_appenders"] = r
    res["concurrency"] = conc
    res["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return res


# ---- offline reader facts ---------------------------------------------------------------------------------------


def duckdb_extension_facts() -> dict:
    import duckdb

    rows = duckdb.sql(
        "select extension_name, installed, loaded from duckdb_extensions() "
        "where extension_name in ('delta', 'iceberg', 'ducklake', 'parquet')"
    ).fetchall()
    return {"duckdb": duckdb.__version__, **{n: {"installed": i, "loaded": lo} for n, i, lo in rows}}


# ---- report -----------------------------------------------------------------------------------------------------


def table_rows(results: list[dict]) -> list[tuple[str, ...]]:
    def g(r: dict, *path: str):
        for p in path:
            r = r.get(p, {}) if isinstance(r, dict) else {}
        return r if r != {} else "-"

    def growth(r: dict) -> str:
        return ", ".join(f"{x['commits']}: {1e3 * x['open_list_s']:.0f}" for x in r.get("growth", [])) or "-"

    def conc(r: dict, key: str) -> str:
        c = g(r, "concurrency", key)
        if c == "-":
            return "-"
        oks = "/".join(f"{w.get('ok', '?')}ok {w.get('failed', '?')}fail" for w in c["writers"])
        return f"{oks}; {'nothing lost' if c['nothing_lost'] else 'ROWS LOST/EXTRA'}"

    spec = [
        ("library", lambda r: r["library"]),
        ("commits x rows", lambda r: f"{r['commits']} x {r['rows_per_commit']}"),
        (
            "append mean / p95 / max ms",
            lambda r: (
                f"{g(r, 'append', 'mean_ms')} / {g(r, 'append', 'p95_ms')} / {g(r, 'append', 'max_ms')}"
            ),
        ),
        ("append CPU mean ms", lambda r: str(g(r, "append", "cpu_mean_ms"))),
        (
            "append first / last 10 % mean ms",
            lambda r: f"{g(r, 'append', 'first10pct_mean_ms')} / {g(r, 'append', 'last10pct_mean_ms')}",
        ),
        ("reopen + append ms", lambda r: str(g(r, "append", "reopen_then_append_ms"))),
        ("open + list day ms, by commits", growth),
        (
            "at N: open + list day ms (CPU)",
            lambda r: f"{1e3 * r['at_N']['open_list_s']:.1f} ({1e3 * r['at_N']['open_list_cpu_s']:.1f})",
        ),
        (
            "at N: cold process open + list s (import alone)",
            lambda r: f"{r['at_N']['cold_process_open_list_s']} ({r['at_N']['cold_process_import_only_s']})",
        ),
        ("at N: files in day / rows", lambda r: f"{r['at_N']['files_in_day']} / {r['at_N']['rows_in_day']}"),
        (
            "at N: count day pyarrow / duckdb ms",
            lambda r: f"{1e3 * r['at_N']['count_pyarrow_s']:.1f} / {1e3 * r['at_N']['count_duckdb_s']:.1f}",
        ),
        (
            "metadata at N",
            lambda r: f"{r['metadata_at_N']['bytes'] / 2**20:.1f} MiB, {r['metadata_at_N']['files']} files",
        ),
        (
            "overwrite one day: read s; commit s (CPU)",
            lambda r: (
                f"{r['overwrite_day']['read_s']}; {r['overwrite_day']['s']} ({r['overwrite_day']['cpu_s']}), "
                f"{r['overwrite_day']['files_before']} -> {r['overwrite_day']['files_after']} files"
            ),
        ),
        (
            "compaction s (CPU), commits",
            lambda r: f"{r['compaction']['s']} ({r['compaction']['cpu_s']}), {r['compaction']['commits']}",
        ),
        (
            "compaction files removed -> added",
            lambda r: f"{r['compaction']['files_removed']} -> {r['compaction']['files_added']}",
        ),
        ("compacted: open + list day ms", lambda r: f"{1e3 * r['after_compaction']['open_list_s']:.1f}"),
        (
            "compacted: cold process open + list s",
            lambda r: str(r["after_compaction"]["cold_process_open_list_s"]),
        ),
        (
            "compacted: count day pyarrow / duckdb ms",
            lambda r: (
                f"{1e3 * r['after_compaction']['count_pyarrow_s']:.1f} / "
                f"{1e3 * r['after_compaction']['count_duckdb_s']:.1f}"
            ),
        ),
        ("metadata after compaction", lambda r: f"{r['metadata_after_compaction']['bytes'] / 2**20:.1f} MiB"),
        ("retention (vacuum / expire) s", lambda r: str(r["retention"]["s"])),
        (
            "after retention: open + list ms, metadata",
            lambda r: (
                f"{1e3 * r['after_retention']['open_list_s']:.1f}, "
                f"{r['metadata_after_retention']['bytes'] / 2**20:.1f} MiB"
            ),
        ),
        (
            "time travel 10 commits back s",
            lambda r: (
                f"{r['time_travel_10_back']['s']} {'ok' if r['time_travel_10_back']['ok'] else 'WRONG'}"
            ),
        ),
        ("polars scan count", lambda r: "ok" if r["polars"]["ok"] else "WRONG"),
        ("2 appenders at once", lambda r: conc(r, "two_appenders")),
        ("append vs overwrite same day", lambda r: conc(r, "append_vs_overwrite_same_day")),
        ("peak RSS MiB", lambda r: str(r["peak_rss_mib"])),
    ]
    out = [("", *(r["format"] for r in results))]
    for label, fn in spec:
        cells = []
        for r in results:
            try:
                cells.append(str(fn(r)))
            except (KeyError, TypeError):
                cells.append("-")
        out.append((label, *cells))
    return out


def print_table(results: list[dict]) -> None:
    rows = table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_writer":
        writer_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--commits", type=int, default=3000, help="appends before the measurements (default 3000)"
    )
    ap.add_argument("--rows", type=int, default=50, help="rows per append (default 50)")
    ap.add_argument("--formats", default="delta,iceberg", help="comma list of: delta, iceberg")
    ap.add_argument(
        "--concurrent-appends", type=int, default=20, help="appends per process in the race tests"
    )
    ap.add_argument(
        "--iceberg-merge-manifests",
        action="store_true",
        help="set commit.manifest-merge.enabled on the Iceberg table",
    )
    ap.add_argument(
        "--reopen-every",
        type=int,
        default=100,
        help="writer reopens its table object every K commits (0: never)",
    )
    ap.add_argument(
        "--iceberg-expire-every",
        type=int,
        default=0,
        help="during the build, every K commits expire all but the last K Iceberg snapshots (0: never)",
    )
    ap.add_argument("--workdir", type=Path, help="where the tables go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the tables")
    ap.add_argument("--format", choices=["table", "json"], default="table")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="table-formats-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args._child:
        res = bench_format(
            args._child,
            args.commits,
            args.rows,
            args.concurrent_appends,
            workdir,
            args.iceberg_merge_manifests,
            args.reopen_every,
            args.iceberg_expire_every,
        )
        print(json.dumps(res, default=str))
        return
    results = []
    try:
        for name in args.formats.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--_child",
                name,
                "--commits",
                str(args.commits),
                "--rows",
                str(args.rows),
                "--concurrent-appends",
                str(args.concurrent_appends),
                "--workdir",
                str(workdir),
            ]
            if args.iceberg_merge_manifests:
                cmd.append("--iceberg-merge-manifests")
            cmd += [
                "--reopen-every",
                str(args.reopen_every),
                "--iceberg-expire-every",
                str(args.iceberg_expire_every),
            ]
            print(f"[{name}] {args.commits} commits ...", file=sys.stderr, flush=True)
            with Clock() as c:
                out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                results.append({"format": name, "error": out.stderr.strip().splitlines()[-1:]})
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["process_wall_s"] = round(c.wall, 1)
            results.append(res)
            print(f"[{name}] done in {c.wall:.0f} s", file=sys.stderr, flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    facts = {
        "duckdb_extensions": duckdb_extension_facts(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    if args.format == "json":
        print(json.dumps({"results": results, "environment": facts}, indent=2, default=str))
        return
    ok = [r for r in results if "error" not in r]
    if ok:
        print_table(ok)
    for r in results:
        if "error" in r:
            print(f"{r['format']}: FAILED {r['error']}")
    print(
        f"\nDuckDB {facts['duckdb_extensions'].pop('duckdb')} extensions here: "
        + ", ".join(f"{k} installed={v['installed']}" for k, v in facts["duckdb_extensions"].items())
    )


if __name__ == "__main__":
    main()
