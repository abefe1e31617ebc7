"""Lease benchmark: a year of CERN-like VM churn, then the next hour.

Generates HOURS hours of Nova lifecycle history (350 VMs created per hour by default; addresses of one /16
reused as soon as they are free; 1 in 10 VMs soft-deleted before its delete; lifetimes from minutes to
months; create.start/.end, soft_delete.end, delete.start/.end as Nova sends them), lands it in a lake one day
per source, then prints in one run:
  * the full build: build_leases alone (in memory, best of 3) and its events/s, then `tracepipe leases rebuild`
    as a user runs it, in a process of its own: wall, CPU and its own peak RSS; by default (beyond what a
    quarter of the machine's memory holds it replays the history in time slices: bounded memory) and with
    `--at-once 0` (every event at once, in memory),
  * the next hours (UPDATES of them, ~1,000 notifications each, written as real Nova versioned notifications
    in the oslo envelope, from the samples in ../shared/realdata) through `ingest vm` + correlate, one after
    the other into the year-old lake, each next to the same hour into a new empty lake (goal: <= 3x and <= 2 s;
    medians),
  * `who` (the library call behind `tracepipe who`) p50/p95 over PROBES probes with known answers, all checked,
  * peak RSS of the process.
The year's events are generated as vm_events rows (their JSON would be ~40 GB); the generator's rows are
checked against the Nova parser on a sample of VMs written as notifications.

    python benchmarks/leases.py                      # a year: 8,760 hours, ~3 M VMs, ~10 M events
    python benchmarks/leases.py --hours 720,2160     # a month, then three: does the hourly update stay flat?
    python benchmarks/leases.py --hours 720 --keep --lake /tmp/lease-lake
    git show 2d97cad:tracepipe/correlate/leases.py > /tmp/leases_old.py
    python benchmarks/leases.py --hours 720 --compare /tmp/leases_old.py   # + the build before/after, interleaved
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import heapq
import importlib.util
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

from tracepipe.correlate.attribution import correlate
from tracepipe.correlate.leases import build_leases, save_reclaim_interval
from tracepipe.ingest.cloud import parse_cloud_text
from tracepipe.ingest.vm import ingest_vm_files
from tracepipe.lake import Lake, hash_bytes, ingest_table
from tracepipe.query import who
from tracepipe.schema import VM_EVENTS

START = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
US = 1_000_000
REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "nova"
if not REALDATA.is_dir():
    REALDATA = Path("/work/shared/realdata/nova")
RECLAIM = dt.timedelta(days=7)


# `tracepipe ...` in a process of its own that prints its peak RSS (VmHWM, kB) last on stderr: the peak of the
# command's own memory after exec (a child's ru_maxrss also counts the benchmark's pages it was forked with)
COMMAND_PEAK = (
    "import atexit, re, runpy, sys\n"
    "atexit.register(lambda: print('VmHWM', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1],"
    " file=sys.stderr))\n"
    "sys.argv = ['tracepipe', *sys.argv[1:]]\n"
    "runpy.run_module('tracepipe', run_name='__main__')\n"
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan_vms(hours: int, per_hour: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One row per VM: created (µs), deleted (µs, or -1 still alive), soft-deleted (µs or -1), address index.
    Addresses: the one free the longest is taken next (as a /16 under churn), so each is reused many times."""
    n = hours * per_hour
    created = np.sort(rng.integers(0, hours * 3600 * US, n)) + int(START.timestamp() * US)
    # lifetimes: log-normal, median ~8 h, a tail of weeks to months
    life = (np.exp(rng.normal(np.log(8 * 3600), 1.6, n)) * US).astype(np.int64) + 60 * US
    end = int((START + dt.timedelta(hours=hours)).timestamp() * US)
    deleted = created + life
    alive = deleted >= end
    soft = (rng.random(n) < 0.1) & ~alive
    soft_at = np.where(soft, deleted - np.minimum(life // 2, 3600 * US), -1)
    deleted = np.where(alive, -1, deleted)
    # address allocation: a per-VM loop of the generator (not of what is measured)
    free = [(0, a) for a in range(65_534)]
    heapq.heapify(free)
    addr = np.empty(n, np.int64)
    for i in range(n):
        t, a = heapq.heappop(free)
        if t > created[i]:  # the pool is exhausted: should not happen at this churn
            raise SystemExit(f"address pool exhausted at VM {i}")
        addr[i] = a
        heapq.heappush(free, (deleted[i] if deleted[i] >= 0 else end + 10**12, a))
    return {"created": created, "deleted": deleted, "soft": soft_at, "addr": addr}


def address_text(index: np.ndarray) -> pa.Array:
    """10.64.0.1 ... 10.64.255.254 for indexes 0 .. 65,533, as canonical text (vectorised)."""
    value = index + 1
    third, fourth = value // 256, value % 256
    text = np.char.add(np.char.add("10.64.", third.astype(str)), np.char.add(".", fourth.astype(str)))
    # one Array (pyarrow >= 26 converts a numpy text array of more than ~1.4 M values into a ChunkedArray,
    # which ListArray.from_arrays refuses)
    converted = pa.array(text)
    return converted.combine_chunks() if isinstance(converted, pa.ChunkedArray) else converted


def vm_ids(n: int, offset: int = 0) -> np.ndarray:
    return np.array([str(uuid.UUID(int=(offset + i) * 7919 + 1)) for i in range(n)])


def event_rows(plan: dict[str, np.ndarray], ids: np.ndarray, rng: np.random.Generator) -> pa.Table:
    """vm_events rows exactly as the Nova parser makes them from the notifications (checked in main)."""
    n = len(ids)
    addrs = address_text(plan["addr"])
    name = np.char.add("vm-", np.arange(n).astype(str))
    project = np.char.add("project-", (np.arange(n) % 500).astype(str))
    user = np.char.add("user-", (np.arange(n) % 2000).astype(str))
    host = np.char.add("compute-", rng.integers(0, 200, n).astype(str))
    parts = []

    def add(
        mask: np.ndarray, ts: np.ndarray, event_type: str, action: str, state: str, with_addr: bool
    ) -> None:
        idx = np.nonzero(mask)[0]
        if not len(idx):
            return
        listed = pa.ListArray.from_arrays(
            pa.array(np.arange(len(idx) + 1) if with_addr else np.zeros(len(idx) + 1, np.int64), pa.int32()),
            addrs.take(pa.array(idx)) if with_addr else pa.array([], pa.string()),
        )
        parts.append(
            pa.table(
                {
                    "ts": pa.array(ts[idx], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
                    "cloud": pa.array(["openstack"] * len(idx)),
                    "vm_id": pa.array(ids[idx]),
                    "vm_name": pa.array(name[idx]),
                    "project": pa.array(project[idx]),
                    "user": pa.array(user[idx]),
                    "hypervisor": pa.array(host[idx]),
                    "event_type": pa.array([event_type] * len(idx)),
                    "action": pa.array([action] * len(idx)),
                    "state": pa.array([state] * len(idx)),
                    "addrs": listed,
                    "event_id": pa.array([f"{event_type}-{v}" for v in ids[idx]]),
                    "source": pa.array(["benchmark"] * len(idx)),
                }
            )
        )

    everyone = np.ones(n, bool)
    gone = plan["deleted"] >= 0
    add(everyone, plan["created"], "instance.create.start", "create", "building", False)
    add(everyone, plan["created"] + 40 * US, "instance.create.end", "create", "active", True)
    add(plan["soft"] >= 0, plan["soft"], "instance.soft_delete.end", "soft_delete", "soft_deleted", True)
    add(gone, plan["deleted"], "instance.delete.start", "delete", "active", True)
    add(gone, plan["deleted"] + 3 * US, "instance.delete.end", "delete", "deleted", False)
    table = pa.concat_tables(parts, promote_options="default")
    columns = {
        f.name: table[f.name] if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in VM_EVENTS
    }
    return pa.table(columns, schema=VM_EVENTS).sort_by("ts")


def notification(template: dict, row: dict) -> str:
    """One Nova versioned notification in the oslo envelope, made from a real sample."""
    message = copy.deepcopy(template)
    data = message["payload"]["nova_object.data"]
    data.update(
        uuid=row["vm_id"],
        display_name=row["vm_name"],
        host_name=row["vm_name"],
        tenant_id=row["project"],
        user_id=row["user"],
        host=row["hypervisor"],
        state=row["state"],
    )
    ips = data.get("ip_addresses") or []
    if row["addrs"] and ips:
        ips[0]["nova_object.data"]["address"] = row["addrs"][0]
        data["ip_addresses"] = ips[:1]
    elif not row["addrs"]:
        data["ip_addresses"] = []
    message["message_id"] = row["event_id"]
    message["timestamp"] = row["ts"].strftime("%Y-%m-%d %H:%M:%S.%f")
    return json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(message)})


def write_notifications(rows: pa.Table, path: Path) -> None:
    templates = {}
    for event_type in set(rows["event_type"].to_pylist()):
        name = event_type.removeprefix("instance.").replace(".", "-").replace("_", "_")
        templates[event_type] = json.loads((REALDATA / f"instance-{name}.json").read_text())
    # a template without an address (delete.end of a deleted VM) still needs an ip list to fill: take create's
    with open(path, "w") as out:
        for row in rows.to_pylist():
            template = templates[row["event_type"]]
            if row["addrs"] and not template["payload"]["nova_object.data"].get("ip_addresses"):
                template = copy.deepcopy(template)
                template["payload"]["nova_object.data"]["ip_addresses"] = copy.deepcopy(
                    templates["instance.create.end"]["payload"]["nova_object.data"]["ip_addresses"]
                    if "instance.create.end" in templates
                    else json.loads((REALDATA / "instance-create-end.json").read_text())["payload"][
                        "nova_object.data"
                    ]["ip_addresses"]
                )
            out.write(notification(template, row) + "\n")


def land_year(lake: Lake, events: pa.Table) -> None:
    days = events["ts"].cast(pa.date32()).to_numpy()
    bounds = np.flatnonzero(np.diff(days.astype(np.int64))) + 1
    for chunk in np.split(np.arange(len(days)), bounds):
        day = str(days[chunk[0]])
        ingest_table(
            lake, "vm_events", f"benchmark-{day}", hash_bytes(f"bench-{day}".encode()), [events.take(chunk)]
        )


def next_hours(
    plan: dict[str, np.ndarray], ids: np.ndarray, hours: int, per_hour: int, rng, count: int = 1
) -> list[pa.Table]:
    """The `count` hours after the history, one table each: per_hour new VMs (create.start/.end, on addresses
    free at the end) and 150 deletes of VMs alive at the end."""
    end = int((START + dt.timedelta(hours=hours)).timestamp() * US)
    alive = np.flatnonzero(plan["deleted"] < 0)
    leaving_all = rng.choice(alive, min(len(alive), 150 * count), replace=False)
    held = set(plan["addr"][alive].tolist())
    free = np.array(sorted(set(range(65_534)) - held))
    out = []
    for k in range(count):
        begin = end + k * 3600 * US
        leaving = leaving_all[k * 150 : (k + 1) * 150]
        new = {
            "created": np.sort(rng.integers(begin, begin + 3600 * US, per_hour)),
            "deleted": np.full(per_hour, -1),
            "soft": np.full(per_hour, -1),
            "addr": free[k * per_hour : (k + 1) * per_hour],
        }
        new_rows = event_rows(new, vm_ids(per_hour, len(ids) + k * per_hour), rng)
        old = {
            "created": plan["created"][leaving],
            "deleted": rng.integers(begin, begin + 3600 * US, len(leaving)),
            "soft": np.full(len(leaving), -1),
            "addr": plan["addr"][leaving],
        }
        old_rows = event_rows(old, ids[leaving], rng)
        old_rows = old_rows.filter(pa.compute.starts_with(old_rows["event_type"], "instance.delete"))
        out.append(pa.concat_tables([new_rows, old_rows]).sort_by("ts"))
    return out


def compare_builds(path: Path, events: pa.Table, rounds: int = 3) -> None:
    """The build of another leases.py and this one, alternately on the same events: on a loaded machine a ratio
    measured interleaved means more than two figures measured at different times."""
    spec = importlib.util.spec_from_file_location("leases_compared", path)
    assert spec is not None and spec.loader is not None
    other = importlib.util.module_from_spec(spec)
    sys.modules["leases_compared"] = other
    spec.loader.exec_module(other)
    cpu: dict[str, list[float]] = {"compared": [], "this": []}
    wall: dict[str, list[float]] = {"compared": [], "this": []}
    for _ in range(rounds):
        outputs = []
        for label, build in (("compared", other.build_leases), ("this", build_leases)):
            start, started = time.process_time(), time.perf_counter()
            outputs.append(build(events, RECLAIM))
            cpu[label].append(time.process_time() - start)
            wall[label].append(time.perf_counter() - started)
        same = all(a.equals(b) for a, b in zip(*outputs, strict=True))
        print(f"  compared build gives {'the same' if same else 'DIFFERENT'} leases and VMs")
    per_m = {label: min(v) / events.num_rows * 1e6 for label, v in cpu.items()}
    print(
        f"build_leases interleaved, best of {rounds}: {path} {per_m['compared']:.2f} CPU s per M events, this "
        f"{per_m['this']:.2f} ({per_m['compared'] / per_m['this']:.2f}x); wall {min(wall['compared']):.2f} s -> "
        f"{min(wall['this']):.2f} s ({min(wall['compared']) / min(wall['this']):.2f}x)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hours",
        default="8760",
        help="history length (default a year); several, comma-separated (720,2160), run one after the other "
        "and summed up in one table: whether the hourly update stays flat as the history grows",
    )
    parser.add_argument(
        "--updates",
        type=int,
        default=3,
        help="successive next hours into the history-old lake, each next to the same hour into a new empty "
        "lake (medians printed)",
    )
    parser.add_argument("--per-hour", type=int, default=350, help="VMs created per hour")
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--lake", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="another version of tracepipe/correlate/leases.py: its build_leases and this one run alternately "
        "on the same events (outputs checked equal), CPU seconds per million events of each",
    )
    args = parser.parse_args(argv)
    runs = []
    for hours in [int(h) for h in str(args.hours).split(",")]:
        runs.append(run(args, hours))
    if len(runs) > 1:
        print(
            "\nhistory  events      build_leases M/s (wall, CPU)  next hour old / empty lake (median wall, CPU)"
        )
        for r in runs:
            print(
                f"{r['hours']:>6} h  {r['events']:>10,}  {r['build_wall']:.2f}, {r['build_cpu']:.2f}"
                f"                   {r['old_s']:.2f} / {r['empty_s']:.2f} s = {r['ratio']:.2f}x wall, "
                f"{r['old_cpu']:.2f} / {r['empty_cpu']:.2f} s = {r['cpu_ratio']:.2f}x CPU"
            )
    print(f"peak RSS {peak_rss_mib():,.0f} MiB")
    return 0


def run(args: argparse.Namespace, hours: int) -> dict[str, float]:
    """One history of `hours`: generate, land, build, the next hours, `who`; its figures."""
    rng = np.random.default_rng(18)
    root = args.lake or Path(tempfile.mkdtemp(prefix="tracepipe-leases-"))
    if args.lake and "," in str(args.hours):
        root = args.lake / f"{hours}h"
    figures: dict[str, float] = {"hours": hours}
    print(f"== {hours:,} hours of history")
    try:
        started = time.perf_counter()
        plan = plan_vms(hours, args.per_hour, rng)
        ids = vm_ids(len(plan["created"]))
        events = event_rows(plan, ids, rng)
        print(
            f"generated {len(ids):,} VMs, {events.num_rows:,} events over {hours:,} h "
            f"({time.perf_counter() - started:.1f} s)"
        )
        # the generator's rows are the parser's: write 200 VMs as notifications and parse them back
        sample = pa.compute.is_in(events["vm_id"], pa.array(ids[:200]))
        sample_rows = events.filter(sample)
        sample_path = root.parent / f"{root.name}-sample.jsonl"
        root.mkdir(parents=True, exist_ok=True)
        write_notifications(sample_rows, sample_path)
        parsed, rejects = parse_cloud_text(sample_path.read_text(), str(sample_path))
        keep = [
            "ts",
            "vm_id",
            "vm_name",
            "project",
            "user",
            "hypervisor",
            "event_type",
            "action",
            "state",
            "addrs",
        ]
        same = (
            parsed.select(keep)
            .sort_by([("ts", "ascending"), ("event_type", "ascending")])
            .equals(sample_rows.select(keep).sort_by([("ts", "ascending"), ("event_type", "ascending")]))
        )
        print(
            f"generator vs Nova parser on 200 VMs: {'identical' if same else 'DIFFERENT'} ({rejects.num_rows} rejects)"
        )
        sample_path.unlink()

        lake = Lake(root / "year")
        t = time.perf_counter()
        land_year(lake, events)
        print(f"landed the history in {len(lake.files('vm_events'))} files ({time.perf_counter() - t:.1f} s)")
        # the build alone (in memory: what `leases rebuild` replays), then the command's whole work
        # best of 3, as the other benchmarks: one build on this machine moves +-25% from run to run
        tries = []
        for _ in range(3):
            cpu, t = time.process_time(), time.perf_counter()
            build_leases(events, RECLAIM)
            tries.append((time.perf_counter() - t, time.process_time() - cpu))
        build_s, build_cpu = min(w for w, _ in tries), min(c for _, c in tries)
        figures.update(
            events=events.num_rows,
            build_wall=events.num_rows / build_s / 1e6,
            build_cpu=events.num_rows / build_cpu / 1e6,
        )
        print(
            f"build_leases alone, best of 3 ({', '.join(f'{w:.2f}' for w, _ in tries)} s): "
            f"{events.num_rows:,} events in {build_s:.1f} s wall, {build_cpu:.1f} s CPU "
            f"({events.num_rows / build_s / 1e6:.2f} M events/s wall, {events.num_rows / build_cpu / 1e6:.2f} M "
            f"per CPU s; goal >= 1 M events/s)"
        )
        if args.compare:
            print("interleaved on the generated events (one chunk):")
            compare_builds(args.compare, events)
        # the events as the repair (`leases rebuild`) replays them: read back from the lake's day files (a
        # table in as many chunks as files, where the generated one is one chunk); one copy held at a time
        del events
        landed = lake.read("vm_events")
        cpu, t = time.process_time(), time.perf_counter()
        build_leases(landed, RECLAIM)
        landed_cpu, landed_s = time.process_time() - cpu, time.perf_counter() - t
        print(
            f"build_leases on the events read from the lake ({landed.column('vm_id').num_chunks} chunks): "
            f"{landed_s:.1f} s wall, {landed_cpu:.1f} s CPU ({landed.num_rows / landed_s / 1e6:.2f} M events/s "
            f"wall, {landed.num_rows / landed_cpu / 1e6:.2f} M per CPU s)"
        )
        if args.compare:
            print("interleaved on the events read from the lake:")
            compare_builds(args.compare, landed)
        del landed
        # the repair as a user runs it, in a process of its own (its peak RSS is its own): beyond FULL_EVENTS
        # events it replays the history in time slices (bounded memory)
        save_reclaim_interval(lake, RECLAIM)
        for label, extra in (("default", []), ("--at-once 0", ["--at-once", "0"])):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            command = ["leases", "rebuild", "--lake", str(lake.root), "--format", "json", *extra]
            run = subprocess.run(
                [sys.executable, "-c", COMMAND_PEAK, *command], capture_output=True, text=True, check=False
            )
            full_s = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            assert run.returncode == 0, run.stderr[-2000:]
            built = json.loads(run.stdout)
            full_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            full_rss = int(run.stderr.rsplit("VmHWM", 1)[1].split()[0]) / 1024
            print(
                f"full build (`tracepipe leases rebuild`, {label}): {built['leases']['events']:,} events -> "
                f"{built['lease_rows']:,} leases, {built['vms']:,} VMs in {full_s:.1f} s wall, {full_cpu:.1f} s "
                f"CPU with reading and writing the lake; its peak RSS {full_rss:,.0f} MiB "
                f"({built['leases']['reason']})"
            )

        # the next hours, one after the other into the history-old lake (each builds on the last, as hourly
        # runs do), each next to the same hour into a new empty lake; interleaved, so that both see the same load
        timings: dict[str, list[float]] = {"old": [], "empty": [], "old_cpu": [], "empty_cpu": []}
        for k, hour in enumerate(next_hours(plan, ids, hours, args.per_hour, rng, args.updates)):
            notes = root / f"next-hour-{k}.jsonl"
            write_notifications(hour, notes)
            line = []
            for label, target in (("old", lake), ("empty", Lake(root / f"empty-{k}"))):
                cpu, t = time.process_time(), time.perf_counter()
                report = ingest_vm_files(target, [notes])
                done = correlate(target, reclaim_interval=RECLAIM)
                wall, used = time.perf_counter() - t, time.process_time() - cpu
                assert done.error is None and report.rejects == 0, (done.error, report.rejects)
                timings[label].append(wall)
                timings[f"{label}_cpu"].append(used)
                line.append(
                    f"{wall:.2f} s wall, {used:.2f} s CPU ({done.leases['mode']}, "
                    f"{done.leases.get('addresses', 0)} addresses, {done.leases['events']:,} events replayed)"
                )
            print(
                f"next hour {k + 1} ({report.rows:,} notifications): into the {hours:,}-hour-old lake {line[0]}; "
                f"into an empty lake {line[1]}"
            )
        median = {k: float(np.median(v)) for k, v in timings.items()}
        figures.update(
            old_s=median["old"],
            empty_s=median["empty"],
            old_cpu=median["old_cpu"],
            empty_cpu=median["empty_cpu"],
            ratio=median["old"] / median["empty"],
            cpu_ratio=median["old_cpu"] / median["empty_cpu"],
        )
        print(
            f"next hour, median of {args.updates}: history-old lake {median['old']:.2f} s wall "
            f"({median['old_cpu']:.2f} s CPU), empty lake {median['empty']:.2f} s ({median['empty_cpu']:.2f} s CPU): "
            f"{figures['ratio']:.2f}x wall, {figures['cpu_ratio']:.2f}x CPU (goal <= 3x and <= 2 s)"
        )

        # who: probes at a random instant inside a random VM's life (a deleted one's too), known answers
        picks = rng.choice(len(ids), args.probes, replace=False)
        end_us = int((START + dt.timedelta(hours=hours)).timestamp() * US)
        stop = np.where(plan["deleted"] >= 0, plan["deleted"] + 3 * US, end_us)
        start = plan["created"] + 40 * US
        at = start[picks] + (rng.random(args.probes) * (stop[picks] - start[picks])).astype(np.int64)
        addrs = address_text(plan["addr"][picks]).to_pylist()
        latencies, right = [], 0
        for i, pick in enumerate(picks):
            when = dt.datetime.fromtimestamp(at[i] / US, dt.UTC)
            t = time.perf_counter()
            answer = who(lake, addrs[i], when, window=dt.timedelta(0))
            latencies.append(time.perf_counter() - t)
            right += [lease["vm_id"] for lease in answer.leases] == [ids[pick]]
        p50, p95 = np.percentile(latencies, [50, 95])
        print(f"who over {args.probes} probes: p50 {p50:.3f} s, p95 {p95:.3f} s, right {right}/{args.probes}")
        print(f"peak RSS so far {peak_rss_mib():,.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return figures


if __name__ == "__main__":
    sys.exit(main())
