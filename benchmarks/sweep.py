#!/usr/bin/env python3
"""Sweep benchmark: a day of a ~1,000-VM cloud's flows at 10^7 and 5*10^7 flows (more with --flows), generated
with numpy straight into the lake, then `tracepipe model fit` and `tracepipe sweep` run on their own over that
day, each in a fresh child process of this (small) one: wall time, CPU time, flows/s and the child's peak RSS
(ru_maxrss from wait4), one row per size, so that growth with flows/day is visible.

    python benchmarks/sweep.py                                   # 10^7 and 5*10^7 flows (~6 min here)
    python benchmarks/sweep.py --flows 1e7 --flows 5e7 --flows 1e8
    python benchmarks/sweep.py --flows 1e7 --reuse               # sweep the lakes of a previous run again

The lakes live under --dir (default /tmp/tracepipe-bench-sweep, ~1.6 GB per 10^8 flows) and are kept for
--reuse; a sweep's spill (in $TMPDIR, ~11 GB per 10^8 flows, removed at its end, plus ~2 GB for the facts of
the DNS resolver's bucket) needs room as well.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START = dt.datetime(2026, 3, 12, tzinfo=dt.UTC)
CHUNK_FLOWS = 5_000_000  # flows generated (and held) at a time: the generator's own memory stays ~1.5 GB


# Every generated VM pushes metrics to 10.10.0.5:2003 (Graphite) in short alike sessions; the chunks of a big day
# overlay the same hosts, so at 5*10^7 flows each VM pushes 132 times an hour and the brute-force detector names all
# 1,000 of them (24,000 alerts whose evidence then dominates the sweep). A site allowlists its metrics collector.
METRICS_ALLOWLIST = (
    '\n[[allowlist.entries]]\nreason = "the cloud\'s metrics collector (Graphite), every VM pushes to it"\n'
    'cidrs = ["10.10.0.5/32"]\ndetectors = ["brute_force"]\nports = [2003]\n'
)


def generate(lake_dir: Path, flows: int, hosts: int, seed: int) -> dict:
    """A day of `hosts` VMs: the planted story of tests/support/stories.generate, then more days' worth of the
    same hosts' ordinary traffic (other seeds) appended in chunks until `flows` rows."""
    sys.path.insert(0, str(REPO / "tests"))
    from support import stories as gen

    from tracepipe.intel import import_intel
    from tracepipe.lake import Lake

    lake = Lake(lake_dir)
    total, chunk, per_rate = 0, 0, None
    t0 = time.perf_counter()
    while total < flows:
        # rate scales the ordinary hosts' activity linearly: aim each chunk at CHUNK_FLOWS rows
        want = min(CHUNK_FLOWS, flows - total)
        rate = 3.0 if per_rate is None else max(0.05, want / per_rate)
        story = gen.generate(
            seed=seed + chunk,
            n_hosts=hosts,
            days=1,
            start=START,
            rate=rate,
            planted=chunk == 0,
            v6_hosts=max(4, hosts // 50),
        )
        table = story.flows if story.flows.num_rows <= flows - total else story.flows.slice(0, flows - total)
        per_rate = per_rate or story.flows.num_rows / rate
        lake.append("flows", table, key=f"bench-{seed}-{chunk}")
        if chunk == 0:
            lake.replace_dataset("vm_leases", story.leases)
            (lake_dir / "intel.txt").write_text(story.intel_lines)
            import_intel(lake, lake_dir / "intel.txt")
        total += table.num_rows
        chunk += 1
        del story, table
    pipeline = (REPO / "pipelines" / "nightly.toml").read_text()
    pipeline = pipeline.replace(
        'local_networks = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "2001:db8::/32"]',
        f"local_networks = {json.dumps(gen.LOCAL_NETWORKS)}",
    )
    pipeline = pipeline.replace('report_dir = "reports/nightly"', f'report_dir = "{lake_dir / "reports"}"')
    pipeline = pipeline.replace("html = true", "html = false")
    # the generated data movers ship to a partner site every day, as a grid site's VMs do: a site declares such
    # a peer (without it, a one-day lake has no history for them and each mover is an exfiltration alert)
    pipeline += (
        '\n[[science_peers]]\nname = "partner site"\n'
        'reason = "the data movers\' daily transfers (tests/support/stories.py generate)"\n'
        'prefixes = ["192.0.2.50/32"]\n'
    )
    pipeline += METRICS_ALLOWLIST
    (lake_dir / "bench.toml").write_text(pipeline)
    return {"flows": total, "generate_s": time.perf_counter() - t0}


def child(args: list[str]) -> tuple[int, str, dict]:
    """Run `python args...` with this worktree first on the path: its exit code, stdout and its own rusage
    (wait4: this child's peak RSS alone, not the largest of all children as RUSAGE_CHILDREN would give)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode not in (0, 1):  # 1: the sweep found alerts
        raise SystemExit(f"`{' '.join(args)}` failed ({proc.returncode}):\n{stderr[-3000:]}")
    return (
        proc.returncode,
        stdout,
        {
            "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime,
            "minor_faults": usage.ru_minflt,
            "peak_rss_mb": usage.ru_maxrss / 1024,
        },
    )


def measure(lake_dir: Path) -> dict:
    """`tracepipe model fit` then `tracepipe sweep` over the day, each on its own."""
    since, until = START.isoformat(), (START + dt.timedelta(days=1)).isoformat()
    pipeline = str(lake_dir / "bench.toml")
    shutil.rmtree(lake_dir / "alerts", ignore_errors=True)  # a fresh sweep each run, not an idempotent rerun
    shutil.rmtree(lake_dir / "_models", ignore_errors=True)
    cli = ["-m", "tracepipe.cli"]
    common = ["--lake", str(lake_dir), "--format", "json"]
    _, _, fit = child(
        [*cli, "model", "fit", "--since", since, "--until", until, "--pipeline", pipeline, *common]
    )
    _, out, sweep = child([*cli, "sweep", pipeline, "--since", since, "--until", until, *common])
    summary = json.loads(out)
    return {"fit": fit, "sweep": sweep, "summary": summary, "alerts_digest": alerts_digest(summary)}


def alerts_digest(summary: dict) -> str:
    """A hash of every alert of the sweep's JSON report, all fields but created_at, in alert_id order: two
    versions of the code found the same alerts when the digests agree."""
    report = json.loads(Path(summary["reports"]["json"]).read_text())
    alerts = sorted(({k: v for k, v in a.items() if k != "created_at"} for a in report["alerts"]), key=str)
    return hashlib.sha256(json.dumps(alerts, default=str, sort_keys=True).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tracepipe-bench-sweep"))
    parser.add_argument(
        "--flows", type=float, action="append", help="flows in the day (repeatable; default 1e7 and 5e7)"
    )
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="sweep the lakes of a previous run as they are")
    parser.add_argument("--generate-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(f) for f in (args.flows or [1e7, 5e7])]
    if args.generate_only:
        print(json.dumps(generate(args.generate_only, sizes[0], args.hosts, args.seed)))
        return 0
    rows = []
    for size in sizes:
        lake_dir = args.dir / f"flows-{size:.0e}".replace("+", "")
        if not (args.reuse and (lake_dir / "bench.toml").exists()):
            shutil.rmtree(lake_dir, ignore_errors=True)
            lake_dir.mkdir(parents=True)
            _, out, gen = child(
                [__file__, "--generate-only", str(lake_dir), "--flows", str(size), "--hosts", str(args.hosts)]
            )
            info = json.loads(out.strip().splitlines()[-1])
            print(
                f"{info['flows']:,} flows for {args.hosts:,} VMs generated into {lake_dir} in "
                f"{info['generate_s']:.0f} s (generator peak RSS {gen['peak_rss_mb']:,.0f} MB)",
                flush=True,
            )
        m = measure(lake_dir)
        s, fit, summary = m["sweep"], m["fit"], m["summary"]
        flows = summary["flows"]
        row = {
            "flows": flows,
            "sweep_s": s["wall_s"],
            "sweep_cpu_s": s["cpu_s"],
            "sweep_user_s": s["user_s"],
            "sweep_sys_s": s["sys_s"],
            "sweep_minor_faults": s["minor_faults"],
            "sweep_rss_mb": s["peak_rss_mb"],
            "fit_s": fit["wall_s"],
            "fit_cpu_s": fit["cpu_s"],
            "fit_rss_mb": fit["peak_rss_mb"],
            "alerts": summary["alerts"],
            "by_detector": summary["new_by_detector"],
            "timings": summary["timings_s"],
            "cpu_timings": summary.get("cpu_timings_s", {}),
            "load": os.getloadavg()[0],
            "alerts_digest": m["alerts_digest"],
        }
        rows.append(row)
        print(
            f"{flows:,} flows: sweep {row['sweep_s']:.0f} s wall = {flows / row['sweep_s']:,.0f} flows/s, "
            f"{row['sweep_cpu_s']:.0f} s CPU = {flows / row['sweep_cpu_s']:,.0f} flows per CPU-second "
            f"(user {row['sweep_user_s']:.1f} s, system {row['sweep_sys_s']:.1f} s, "
            f"{row['sweep_minor_faults']:,} page faults), "
            f"peak RSS {row['sweep_rss_mb']:,.0f} MB; model fit {row['fit_s']:.0f} s wall, "
            f"{row['fit_cpu_s']:.0f} s CPU = {flows / row['fit_cpu_s']:,.0f} flows per CPU-second, "
            f"peak RSS {row['fit_rss_mb']:,.0f} MB; "
            f"{row['alerts']} alerts {row['by_detector']} (digest {row['alerts_digest']})",
            flush=True,
        )
        for label, key in (("CPU", "cpu_timings"), ("wall", "timings")):
            total = sum(row[key].values())
            print(
                f"  sweep {label} time per stage: "
                + ", ".join(
                    f"{k} {v:.1f} s ({100 * v / max(total, 1e-9):.0f}%)"
                    for k, v in sorted(row[key].items(), key=lambda kv: -kv[1])
                    if v >= 0.05
                )
            )
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other jobs share the machine)")
    print(
        f"{'flows':>12} {'sweep s':>8} {'flows/s':>10} {'CPU s':>7} {'flows/CPU-s':>12} {'sweep RSS':>10} "
        f"{'fit s':>6} {'fit CPU s':>9} {'flows/CPU-s':>12} {'fit RSS':>8}  alerts digest"
    )
    for r in rows:
        print(
            f"{r['flows']:>12,} {r['sweep_s']:>8.0f} {r['flows'] / r['sweep_s']:>10,.0f} {r['sweep_cpu_s']:>7.0f} "
            f"{r['flows'] / r['sweep_cpu_s']:>12,.0f} {r['sweep_rss_mb']:>7,.0f} MB {r['fit_s']:>6.0f} "
            f"{r['fit_cpu_s']:>9.0f} {r['flows'] / r['fit_cpu_s']:>12,.0f} {r['fit_rss_mb']:>5,.0f} MB  "
            f"{r['alerts_digest']}"
        )
    goal = 2 * 1024  # MiB: issue #18's bound on peak RSS, and its 500 k flows per CPU-second
    worst = max(max(r["sweep_rss_mb"], r["fit_rss_mb"]) for r in rows)
    slowest = min(r["flows"] / r["sweep_cpu_s"] for r in rows)
    print(
        f"goal (issue #18): peak RSS <= {goal:,} MiB: {'met' if worst <= goal else 'NOT met'} (worst {worst:,.0f}); "
        f">= 500,000 flows per CPU-second in the sweep: {'met' if slowest >= 5e5 else 'NOT met'} "
        f"(slowest {slowest:,.0f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
