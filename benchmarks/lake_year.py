#!/usr/bin/env python3
"""Year-lake benchmark (issue 11, Must 1): after a year of collector commits, is the lake as fast as a lake
holding the same rows in one commit?

Build (resumable, in DIR/year): VMs and leases for the year first (correlate.make_leases, Lake.replace_dataset),
then --commits small flow batches through the real write path, the way `tracepipe collect` commits a spool
segment: each batch (~--flows-per-commit flows, ts_start within one 5-minute slot, 288 commits per UTC day from
2024-03-01, so 100,000 commits span 347 days) is attributed against vm_leases (attribution.attribute_table) and
landed by lake.ingest_table as one source with its own content hash (data commit, manifest commit, auto-
compaction). --jobs workers write different days at once. Built in hours, the year keeps every log entry
(the lake expires them after 7 days), and delta-rs lists the log directory on every commit and open: pass
--log-retention SECONDS (the build's pace times 7 days; ~400 at 5 commits/s) for a site's steady state. Every commit's wall and CPU ms go to
DIR/build-w<N>.jsonl, which is also what a rerun resumes from (the lake skips a source it already holds).

Measure, each lake in its own process, same probes for all: the year lake as built, a hard-linked copy after
Lake.compact of every day (DIR/compacted), and the same rows in one commit (DIR/one): time to open the lake
(query.connect(Lake(root))), `who` p50/p95 over --probes random (address, time) probes (query.who, a fresh Lake
each, as the command does), `count(*) from flows where date = D`, a one-hour flows_attributed query, peak RSS; and
the same as cold commands (`python -m tracepipe.cli ... --format json`, --cli-runs each, wall/CPU/RSS by wait4).

Prints the build's figures (commits/s, mean/p95 ms per commit, first vs last 1,000 commits, by tenth of the
build), then one table: year / compacted / one commit, the ratios (goal <= 1.5) and who p50 (goal <= 0.5 s).

    PYTHONPATH=$PWD python benchmarks/lake_year.py --lake /work/bench-out/quick --commits 3000
    PYTHONPATH=$PWD python benchmarks/lake_year.py --lake /work/bench-out/year --log-retention 400  # 100,000; resumes
    PYTHONPATH=$PWD python benchmarks/lake_year.py --lake DIR --measure-at 20000,50000 --log-retention 400
    PYTHONPATH=$PWD python benchmarks/lake_year.py --lake DIR --measure-only --format json
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from correlate import START, US, address_pool, make_day_flows, make_leases

from tracepipe import query as q
from tracepipe.correlate.attribution import attribute_table, lease_index
from tracepipe.lake import MANIFEST_DIR, Lake, hash_bytes, ingest_table
from tracepipe.schema import FLOWS

SLOT_US = 300 * US  # a collector rotating every 5 minutes
SLOTS_PER_DAY = 86400 * US // SLOT_US
YEAR_DAYS = 365
GOAL_RATIO = 1.5
GOAL_WHO_P50_S = 0.5

DAY_COUNT_SQL = "SELECT count(*) AS flows FROM flows WHERE date = '{day}'"
HOUR_ATTRIBUTED_SQL = (
    "SELECT src_project, dst_project, count(*) AS flows, sum(bytes) AS bytes FROM flows_attributed "
    "WHERE ts_start >= TIMESTAMPTZ '{start}' AND ts_start < TIMESTAMPTZ '{start}' + INTERVAL 1 HOUR "
    "GROUP BY ALL ORDER BY flows DESC, src_project, dst_project"
)


# ---- build -------------------------------------------------------------------------------------------------


def external_pool() -> pa.Array:
    return address_pool("203.0.0.0/10", 50_000)


def setup_year(root: Path, vms: int, addrs: int, seed: int) -> None:
    """VMs and their leases over the whole year, before any flow lands (so that flows are attributed as the
    collector does when vm_leases exist)."""
    lake = Lake(root)
    if lake.files("vm_leases"):
        return
    leases, vm_table = make_leases(vms, addrs, YEAR_DAYS, np.random.default_rng(seed))
    lake.replace_dataset("vm_leases", leases)
    lake.replace_dataset("vms", vm_table)


def day_slots(
    day: int, flows_per_commit: int, internal: pa.Array, external: pa.Array, seed: int
) -> list[pa.Table]:
    """One UTC day of flows (the same rows on every run), cut into its 5-minute collector slots."""
    rng = np.random.default_rng([seed, day])
    table = make_day_flows(day, SLOTS_PER_DAY * flows_per_commit, internal, external, rng)
    table = table.cast(pa.schema([FLOWS.field(n) for n in table.column_names]))
    day_start = int((START + dt.timedelta(days=day)).timestamp() * US)
    slot = (pc.cast(table["ts_start"], pa.int64()).to_numpy() - day_start) // SLOT_US
    order = np.argsort(slot, kind="stable")
    table = table.take(pa.array(order))
    bounds = np.searchsorted(slot[order], np.arange(SLOTS_PER_DAY + 1))
    return [table.slice(a, b - a) for a, b in itertools.pairwise(bounds)]


def done_commits(out: Path) -> set[int]:
    done: set[int] = set()
    for log in out.glob("build-w*.jsonl"):
        with open(log) as handle:
            for line in handle:
                try:
                    done.add(json.loads(line)["i"])
                except (ValueError, KeyError):  # a line torn by a kill
                    continue
    return done


def build_worker(
    out: str, worker: int, jobs: int, commits: int, flows_per_commit: int, seed: int, every: int
) -> None:
    """Commit every slot i < commits of the days day % jobs == worker that the logs do not list yet."""
    out_dir = Path(out)
    lake = Lake(out_dir / "year")
    index = lease_index(lake)
    internal = pc.unique(lake.read("vm_leases", columns=["addr"])["addr"].combine_chunks())
    external = external_pool()
    done = done_commits(out_dir)
    last_day = (commits - 1) // SLOTS_PER_DAY
    recent: list[float] = []
    made, started = 0, time.perf_counter()
    with open(out_dir / f"build-w{worker}.jsonl", "a") as log:
        for day in range(worker, last_day + 1, jobs):
            todo = [
                i
                for i in range(day * SLOTS_PER_DAY, min((day + 1) * SLOTS_PER_DAY, commits))
                if i not in done
            ]
            if not todo:
                continue
            slots = day_slots(day, flows_per_commit, internal, external, seed)
            for i in todo:
                batch = slots[i % SLOTS_PER_DAY]
                source = f"spool/{(START + dt.timedelta(days=day)).date()}/slot-{i % SLOTS_PER_DAY:03d}"
                batch = batch.set_column(
                    batch.schema.get_field_index("source"),
                    "source",
                    pa.array([source] * batch.num_rows, pa.string()),
                )
                wall, cpu = time.perf_counter(), time.process_time()
                result = ingest_table(
                    lake,
                    "flows",
                    source,
                    hash_bytes(f"lake-year-{seed}-{i}".encode()),
                    [attribute_table(batch, index)],
                )
                ms = (time.perf_counter() - wall) * 1000
                cpu_ms = (time.process_time() - cpu) * 1000
                record = {
                    "i": i,
                    "w": worker,
                    "t": time.time(),
                    "ms": round(ms, 2),
                    "cpu_ms": round(cpu_ms, 2),
                }
                record.update({"rows": batch.num_rows, "skipped": result.skipped})
                log.write(json.dumps(record) + "\n")
                log.flush()
                made += 1
                recent.append(ms)
                if made % every == 0:
                    rate = made / (time.perf_counter() - started)
                    print(
                        f"  w{worker}: {made:,} commits this run ({rate:.1f}/s), day {day}, last {len(recent):,}: "
                        f"mean {statistics.fmean(recent):.0f} ms, p95 {np.percentile(recent, 95):.0f} ms",
                        flush=True,
                    )
                    recent = []


def build(
    out: Path,
    commits: int,
    jobs: int,
    flows_per_commit: int,
    vms: int,
    addrs: int,
    seed: int,
    every: int,
    log_retention: int | None = None,
) -> float:
    """Bring DIR/year to `commits` collector commits; returns the wall seconds this run took."""
    (out / "year").mkdir(parents=True, exist_ok=True)
    setup_year(out / "year", vms, addrs, seed)
    todo = commits - len([i for i in done_commits(out) if i < commits])
    if todo <= 0:
        return 0.0
    print(f"building {out / 'year'}: {todo:,} commits to go (of {commits:,}), {jobs} worker(s)", flush=True)
    started = time.perf_counter()
    if log_retention is not None:
        build_worker(str(out), 0, 1, 1, flows_per_commit, seed, every)  # commit 0 creates flows and _ingest
        emulate_retention(out / "year", log_retention)
    arguments = [(str(out), w, jobs, commits, flows_per_commit, seed, every) for w in range(jobs)]
    if jobs == 1:
        build_worker(*arguments[0])
    else:
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=build_worker, args=a) for a in arguments]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
            if w.exitcode != 0:
                raise SystemExit(f"build worker failed with exit code {w.exitcode}")
    return time.perf_counter() - started


def emulate_retention(root: Path, seconds: int) -> None:
    """A year of commits built in hours keeps every log entry and tombstone (the lake keeps them 7 days and 1
    day), so that the log directory, which delta-rs lists on every commit and open, grows without bound.
    Scaling the retentions to the build's pace (--log-retention SECONDS stands for 7 days, tombstones 1/7 of
    it) gives the steady state a site reaches after a week. Compaction deletes expired log entries."""
    properties = {
        "delta.logRetentionDuration": f"interval {seconds} seconds",
        "delta.deletedFileRetentionDuration": f"interval {max(seconds // 7, 1)} seconds",
    }
    lake = Lake(root)
    for name in ("flows", MANIFEST_DIR, "vm_leases", "vms"):
        table = lake.table(name)
        if table is not None and any(
            table.metadata().configuration.get(k) != v for k, v in properties.items()
        ):
            table.alter.set_table_properties(properties)


def build_figures(out: Path) -> dict[str, Any]:
    """Per-commit wall/CPU ms from the build logs, in the order the commits landed."""
    records = []
    for log in out.glob("build-w*.jsonl"):
        with open(log) as handle:
            for line in handle:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    landed = sorted((r for r in records if not r.get("skipped")), key=lambda r: r["t"])
    if not landed:
        return {"commits": 0}
    ms = np.array([r["ms"] for r in landed])
    cpu = np.array([r["cpu_ms"] for r in landed])

    def stats(sel: slice) -> dict[str, float]:
        return {
            "commits": len(ms[sel]),
            "mean_ms": round(float(ms[sel].mean()), 1),
            "p95_ms": round(float(np.percentile(ms[sel], 95)), 1),
            "cpu_mean_ms": round(float(cpu[sel].mean()), 1),
        }

    n = len(landed)
    tenths = [
        stats(slice(k * n // 10, (k + 1) * n // 10)) for k in range(10) if (k + 1) * n // 10 > k * n // 10
    ]
    # commits/s over stretches where the build ran (gaps between runs of a resumed build left out)
    times = np.array([r["t"] for r in landed])
    gaps = np.diff(times)
    busy = float(gaps[gaps < 60].sum()) if n > 1 else 0.0
    return {
        "commits": len({r["i"] for r in records}),
        "landed_in_logs": n,
        "rows": int(sum(r["rows"] for r in landed)),
        "commits_per_s": round((n - 1) / busy, 2) if busy else None,
        "all": stats(slice(None)),
        "first_1000": stats(slice(0, 1000)),
        "last_1000": stats(slice(max(n - 1000, 0), n)),
        "tenths": tenths,
    }


# ---- the two other lakes -----------------------------------------------------------------------------------


def _stamp(out: Path) -> dict[str, Any]:
    lake = Lake(out / "year")
    return {"flows_version": lake.version("flows"), "vm_leases_version": lake.version("vm_leases")}


def _fresh(path: Path, stamp: dict[str, Any]) -> bool:
    marker = path / "_bench_stamp.json"
    if not marker.exists():
        return False
    saved = json.loads(marker.read_text())
    return all(saved.get(key) == value for key, value in stamp.items())


def make_compacted(out: Path) -> dict[str, Any]:
    """A hard-linked copy of the year lake (files are never modified in place; locks not shared), then
    Lake.compact of every day of flows and of the manifest (min_files=2: whatever is not one file yet)."""
    path, stamp = out / "compacted", _stamp(out)
    if _fresh(path, stamp):
        return json.loads((path / "_bench_stamp.json").read_text()).get("compact", {})
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(out / "year", path, copy_function=os.link, ignore=shutil.ignore_patterns("_locks"))
    lake = Lake(path)
    wall, cpu = time.perf_counter(), time.process_time()
    flows = lake.compact("flows", min_files=2)
    manifest = lake.compact(MANIFEST_DIR, min_files=2)
    info = {
        "seconds": round(time.perf_counter() - wall, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "flows": flows,
        "manifest": manifest,
    }
    (path / "_bench_stamp.json").write_text(json.dumps({**stamp, "compact": info}))
    return info


def make_one_commit(out: Path) -> None:
    """The same rows (flows as attributed, leases, VMs) in a new lake: flows in one ingest (one commit)."""
    path, stamp = out / "one", _stamp(out)
    if _fresh(path, stamp):
        return
    shutil.rmtree(path, ignore_errors=True)
    year, one = Lake(out / "year"), Lake(path)
    one.replace_dataset("vm_leases", year.read("vm_leases"))
    one.replace_dataset("vms", year.read("vms"))
    flows = year.read("flows")
    ingest_table(one, "flows", "one-commit", hash_bytes(f"one-{stamp}".encode()), [flows])
    (path / "_bench_stamp.json").write_text(json.dumps(stamp))


# ---- measure -----------------------------------------------------------------------------------------------


def probes(out: Path, count: int, seed: int) -> dict[str, Any]:
    """The same random questions for every lake: `who` at a random time within the built days, of an address
    some lease held then (4 in 5, when one did) or of any lease address; days for the count, hours for the
    attributed query."""
    lake = Lake(out / "year")
    rng = np.random.default_rng(seed + 1)
    leases = lake.read("vm_leases", columns=["addr", "valid_from", "valid_to"])
    lease_addr = leases["addr"].to_pylist()
    valid_from = _micros(leases["valid_from"], 0)
    valid_to = _micros(leases["valid_to"], np.iinfo(np.int64).max)
    days = lake.days("flows")
    first = dt.datetime.fromisoformat(days[0]).replace(tzinfo=dt.UTC)
    who = []
    for offset in rng.uniform(0, len(days) * 86400, count):
        at = first + dt.timedelta(seconds=float(offset))
        us = int(at.timestamp() * US)
        held = np.flatnonzero((valid_from <= us) & (us < valid_to))
        pick = rng.choice(held) if len(held) and rng.random() < 0.8 else rng.integers(0, len(lease_addr))
        who.append([lease_addr[int(pick)], at.isoformat()])
    hours = [first + dt.timedelta(hours=int(h)) for h in rng.integers(0, len(days) * 24, 5)]
    return {
        "who": who,
        "days": [days[int(d)] for d in rng.integers(0, len(days), 5)],
        "hours": [h.isoformat() for h in hours],
    }


def _micros(column: pa.ChunkedArray, fill: int) -> np.ndarray:
    return pc.fill_null(pc.cast(column, pa.int64()), fill).to_numpy()


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM belongs to the address space (a child forked from a big parent inherits
    the parent's ru_maxrss, not its VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _pct(values: list[float], p: float) -> float:
    return round(float(np.percentile(values, p)), 4)


def lake_info(root: Path) -> dict[str, Any]:
    lake = Lake(root)
    entries = lake.entries("flows")
    log = root / "flows" / "_delta_log"
    on_disk = sum(len(files) for _, _, files in os.walk(root / "flows"))
    return {
        "flow_files": len(entries),
        "flow_rows": sum(e.rows for e in entries),
        "flows_version": lake.version("flows"),
        "manifest_version": lake.version(MANIFEST_DIR),
        "flows_log_entries": len(os.listdir(log)),
        "flows_files_on_disk": on_disk,
    }


def measure_in_process(root: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Library calls, in this (fresh) process; ru_maxrss at the end is this lake's peak."""
    out: dict[str, Any] = {"lake": lake_info(root)}
    opens, open_cpu = [], []
    for _ in range(20):
        wall, cpu = time.perf_counter(), time.process_time()
        q.connect(Lake(root)).close()
        opens.append(time.perf_counter() - wall)
        open_cpu.append(time.process_time() - cpu)
    out["open_s"] = {"p50": _pct(opens, 50), "max": round(max(opens), 4), "cpu_p50": _pct(open_cpu, 50)}

    who_s, who_cpu, answers = [], [], []
    for addr, at in plan["who"]:
        wall, cpu = time.perf_counter(), time.process_time()
        answer = q.who(Lake(root), addr, dt.datetime.fromisoformat(at)).to_dict()
        who_s.append(time.perf_counter() - wall)
        who_cpu.append(time.process_time() - cpu)
        answers.append([answer["held"], [x["vm_id"] for x in answer["leases"]], answer["flows"]["flows"]])
    out["who_s"] = {
        "p50": _pct(who_s, 50),
        "p95": _pct(who_s, 95),
        "cpu_p50": _pct(who_cpu, 50),
        "n": len(who_s),
    }
    out["who_held"] = sum(1 for a in answers if a[0])
    out["who_digest"] = hash_bytes(json.dumps(answers).encode())[:16]

    for name, template, values, key in (
        ("day_count", DAY_COUNT_SQL, plan["days"], "day"),
        ("hour_attributed", HOUR_ATTRIBUTED_SQL, plan["hours"], "start"),
    ):
        total, query_only, cpu_total, results = [], [], [], []
        for value in values:
            wall, cpu = time.perf_counter(), time.process_time()
            con = q.connect(Lake(root))
            opened = time.perf_counter()
            rows = q.run_read_only(con, template.format(**{key: value})).fetchall()
            query_only.append(time.perf_counter() - opened)
            total.append(time.perf_counter() - wall)
            cpu_total.append(time.process_time() - cpu)
            con.close()
            results.append(rows)
        out[f"{name}_s"] = {
            "p50": _pct(total, 50),
            "query_p50": _pct(query_only, 50),
            "cpu_p50": _pct(cpu_total, 50),
        }
        out[f"{name}_digest"] = hash_bytes(json.dumps(results, default=str).encode())[:16]
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def run_cli(args: list[str], scratch: Path) -> dict[str, float]:
    """One cold `tracepipe` command: wall, user+sys CPU and max RSS of that process alone. Through
    /usr/bin/time: a child forked from this (big) process would inherit its ru_maxrss."""
    report = scratch / "time.txt"
    wall = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%U %S %M", "-o", str(report), sys.executable, "-m", "tracepipe.cli", *args],
        capture_output=True,
    )
    elapsed = time.perf_counter() - wall
    if proc.returncode != 0:
        raise SystemExit(
            f"tracepipe {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr.decode()[-2000:]}"
        )
    json.loads(proc.stdout)  # the answer is whole
    user, system, rss_kib = report.read_text().split()[-3:]
    return {"s": elapsed, "cpu_s": float(user) + float(system), "rss_mib": int(rss_kib) / 1024}


def measure_cli(root: Path, plan: dict[str, Any], runs: int) -> dict[str, Any]:
    lake = ["--lake", str(root), "--format", "json"]
    commands = {
        "open": [["sql", "select 1", *lake]] * runs,
        "who": [["who", addr, "--at", at, *lake] for addr, at in plan["who"][:runs]],
        "day_count": [["sql", DAY_COUNT_SQL.format(day=plan["days"][k % 5]), *lake] for k in range(runs)],
        "hour_attributed": [
            ["sql", HOUR_ATTRIBUTED_SQL.format(start=plan["hours"][k % 5]), *lake] for k in range(runs)
        ],
    }
    out: dict[str, Any] = {}
    for name, runs_args in commands.items():
        results = [run_cli(a, root.parent) for a in runs_args]
        out[name] = {
            "p50": _pct([r["s"] for r in results], 50),
            "max": round(max(r["s"] for r in results), 3),
            "cpu_p50": _pct([r["cpu_s"] for r in results], 50),
            "rss_mib": round(max(r["rss_mib"] for r in results), 1),
        }
    return out


def measure(out: Path, probe_count: int, cli_runs: int, seed: int) -> dict[str, Any]:
    plan = probes(out, probe_count, seed)
    (out / "probes.json").write_text(json.dumps(plan))
    result: dict[str, Any] = {}
    for name in ("year", "compacted", "one"):
        print(f"measuring {name} ...", flush=True)
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--measure-child",
                str(out / name),
                "--probes-file",
                str(out / "probes.json"),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"measuring {name} failed:\n{proc.stderr[-3000:]}")
        result[name] = {"lib": json.loads(proc.stdout.strip().splitlines()[-1])}
        result[name]["cli"] = measure_cli(out / name, plan, cli_runs)
    return result


# ---- report ------------------------------------------------------------------------------------------------

ROWS = [  # label, path in a lake's result, unit
    ("open: connect(Lake) p50", ("lib", "open_s", "p50"), "s"),
    ("open CPU p50", ("lib", "open_s", "cpu_p50"), "s"),
    ("who p50 (library)", ("lib", "who_s", "p50"), "s"),
    ("who p95 (library)", ("lib", "who_s", "p95"), "s"),
    ("who CPU p50 (library)", ("lib", "who_s", "cpu_p50"), "s"),
    ("count(*) date=D, open+query", ("lib", "day_count_s", "p50"), "s"),
    ("count(*) date=D, query only", ("lib", "day_count_s", "query_p50"), "s"),
    ("flows_attributed 1 h, open+query", ("lib", "hour_attributed_s", "p50"), "s"),
    ("flows_attributed 1 h, query only", ("lib", "hour_attributed_s", "query_p50"), "s"),
    ("peak RSS (library process)", ("lib", "peak_rss_mib"), "MiB"),
    ("cold `sql 'select 1'` p50", ("cli", "open", "p50"), "s"),
    ("cold `who` p50", ("cli", "who", "p50"), "s"),
    ("cold `who` CPU p50", ("cli", "who", "cpu_p50"), "s"),
    ("cold `sql count date=D` p50", ("cli", "day_count", "p50"), "s"),
    ("cold `sql flows_attributed 1 h` p50", ("cli", "hour_attributed", "p50"), "s"),
    ("peak RSS cold `who`", ("cli", "who", "rss_mib"), "MiB"),
    ("peak RSS cold `sql 1 h`", ("cli", "hour_attributed", "rss_mib"), "MiB"),
]
INFO_ROWS = [
    ("flow files (log)", "flow_files"),
    ("flow rows", "flow_rows"),
    ("flows table version", "flows_version"),
    ("_ingest table version", "manifest_version"),
    ("flows/_delta_log entries", "flows_log_entries"),
    ("files under flows/ on disk", "flows_files_on_disk"),
]


def _goal_rows() -> list[str]:
    """The figures the goal is about: what a user waits for and the memory it takes. CPU is shown to read the
    noise; "query only" (milliseconds on an open connection) to see where the time goes."""
    return [label for label, _path, _unit in ROWS if "CPU" not in label and "query only" not in label]


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> float:
    for key in path:
        tree = tree[key]
    return tree  # type: ignore[return-value]


def report(result: dict[str, Any]) -> dict[str, Any]:
    """Ratios and goals added to the measurements."""
    lakes = result["lakes"]
    ratios: dict[str, dict[str, float]] = {}
    for label, path, _unit in ROWS:
        base = _get(lakes["one"], path)
        ratios[label] = {
            name: round(_get(lakes[name], path) / base, 2) if base else float("nan")
            for name in ("year", "compacted")
        }
    timed = [label for label in _goal_rows() if not label.startswith("peak RSS")]
    result["ratios"] = ratios
    result["goals"] = {
        "ratios_le_1_5": {
            name: all(ratios[label][name] <= GOAL_RATIO for label in _goal_rows())
            for name in ("year", "compacted")
        },
        "worst_ratio": {
            name: max(timed, key=lambda label: ratios[label][name]) for name in ("year", "compacted")
        },
        "who_p50_le_0_5s": {name: lakes[name]["lib"]["who_s"]["p50"] <= GOAL_WHO_P50_S for name in lakes},
        "same_answers": all(
            len({lakes[name]["lib"][key] for name in lakes}) == 1
            for key in ("who_digest", "day_count_digest", "hour_attributed_digest")
        ),
    }
    return result


def print_table(result: dict[str, Any]) -> None:
    b = result["build"]
    print()
    print(
        f"build: {b['commits']:,} collector commits ({b.get('rows', 0):,} flows), "
        f"{b.get('commits_per_s')} commits/s over the build's busy time, jobs {result['args']['jobs']}"
    )
    if b["commits"]:
        for label in ("all", "first_1000", "last_1000"):
            s = b[label]
            print(
                f"  {label:<10} {s['commits']:>7,} commits: mean {s['mean_ms']:7.1f} ms  p95 {s['p95_ms']:7.1f} ms  "
                f"CPU mean {s['cpu_mean_ms']:6.1f} ms"
            )
        print(
            "  by tenth of the build (mean / p95 / CPU ms): "
            + "  ".join(f"{s['mean_ms']:.0f}/{s['p95_ms']:.0f}/{s['cpu_mean_ms']:.0f}" for s in b["tenths"])
        )
    c = result.get("compaction", {})
    if c:
        print(
            f"Lake.compact of every day (copy): {c['seconds']} s ({c['cpu_s']} s CPU), flows "
            f"{c['flows']['files_removed']:,} -> {c['flows']['files_added']:,} files in {c['flows']['days']} days; "
            f"manifest {c['manifest']['files_removed']:,} -> {c['manifest']['files_added']:,}"
        )
    lakes = result["lakes"]
    head = f"{'':<38}{'year':>12}{'compacted':>12}{'one commit':>12}{'year/one':>10}{'comp/one':>10}"
    print()
    print(head)
    print("-" * len(head))
    for label, path, unit in ROWS:
        values = [_get(lakes[name], path) for name in ("year", "compacted", "one")]
        shown = [f"{v:.3f} {unit}" if unit == "s" else f"{v:,.0f} {unit}" for v in values]
        ratio = result["ratios"][label]
        goal = label in _goal_rows()
        marks = [" !" if goal and ratio[n] > GOAL_RATIO else "" for n in ("year", "compacted")]
        print(
            f"{label:<38}{shown[0]:>12}{shown[1]:>12}{shown[2]:>12}"
            f"{ratio['year']:>8.2f}{marks[0]:<2}{ratio['compacted']:>8.2f}{marks[1]:<2}"
        )
    print("-" * len(head))
    for label, key in INFO_ROWS:
        values = [lakes[name]["lib"]["lake"][key] for name in ("year", "compacted", "one")]
        print(f"{label:<38}" + "".join(f"{v:>12,}" for v in values))
    g = result["goals"]
    print()
    print(
        f"goal every ratio <= {GOAL_RATIO}: year {'met' if g['ratios_le_1_5']['year'] else 'NOT met'} "
        f"(worst: {g['worst_ratio']['year']}), compacted {'met' if g['ratios_le_1_5']['compacted'] else 'NOT met'} "
        f"(worst: {g['worst_ratio']['compacted']}); who p50 <= {GOAL_WHO_P50_S} s: "
        + ", ".join(f"{n} {'yes' if ok else 'NO'}" for n, ok in g["who_p50_le_0_5s"].items())
        + f"; same answers in all three lakes: {'yes' if g['same_answers'] else 'NO'}"
    )
    print(
        f"({result['probes']} who probes, {lakes['year']['lib']['who_held']} held; {result['args']['cli_runs']} runs per "
        f"cold command; load average {result['load_average']}, {os.cpu_count()} cores shared: figures are noisy)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lake", type=Path, help="benchmark directory (year/, compacted/, one/, build logs)")
    parser.add_argument("--commits", type=int, default=100_000)
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="build workers writing different days at once (2 on 2 shared cores was no faster; with expiring "
        "logs, two writers' post-commit log cleanups race in deltalake 1.6 and one commit fails after landing)",
    )
    parser.add_argument("--flows-per-commit", type=int, default=20)
    parser.add_argument("--vms", type=int, default=5000, help="VMs (one lease each) over the year")
    parser.add_argument("--addrs", type=int, default=1000, help="addresses the VMs' leases reuse")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--cli-runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--progress-every", type=int, default=1000)
    parser.add_argument(
        "--log-retention",
        type=int,
        default=None,
        help="seconds of log kept, standing for the lake's 7 days (see emulate_retention); default: the lake's own",
    )
    parser.add_argument("--measure-at", default="", help="also measure at these commit counts (comma list)")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--measure-only", action="store_true", help="measure the lake as it is")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    parser.add_argument("--measure-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probes-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_child:
        plan = json.loads(args.probes_file.read_text())
        print(json.dumps(measure_in_process(args.measure_child, plan)))
        return 0
    if args.lake is None:
        parser.error("--lake DIR is required")
    out: Path = args.lake
    steps = sorted({int(n) for n in args.measure_at.split(",") if n.strip()} | {args.commits})
    steps = [n for n in steps if n <= args.commits]
    if args.measure_only:
        steps = [0]
    for step in steps:
        if not args.measure_only:
            build(
                out,
                step,
                args.jobs,
                args.flows_per_commit,
                args.vms,
                args.addrs,
                args.seed,
                args.progress_every,
                args.log_retention,
            )
        if args.build_only:
            continue
        compaction = make_compacted(out)
        make_one_commit(out)
        result = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "build": build_figures(out),
            "compaction": compaction,
            "probes": args.probes,
            "lakes": measure(out, args.probes, args.cli_runs, args.seed),
            "load_average": [round(x, 1) for x in os.getloadavg()],
        }
        report(result)
        commits = result["build"]["commits"]
        (out / f"result-{commits}.json").write_text(json.dumps(result, indent=2, default=str))
        if args.format == "json":
            print(json.dumps(result, indent=2, default=str), flush=True)
        else:
            print_table(result)
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
