#!/usr/bin/env python3
"""Sweep benchmark: a day of a ~1,000-VM cloud's flows (numpy generator, tens of millions of rows) landed in a
lake, then one `run_sweep` over it (all rule detectors + the anomaly model) in a fresh process.

Prints flows/s of the sweep, its peak RSS, and the share of time per stage. The lake is kept (--lake) so that
a second run can skip generation (--reuse).

    python benchmarks/sweep.py --hosts 1000 --rate 9 --lake /tmp/tracepipe-bench   # ~20 M flows
    python benchmarks/sweep.py --lake /tmp/tracepipe-bench --reuse                  # sweep again
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

START = dt.datetime(2026, 3, 12, tzinfo=dt.UTC)


def generate(lake_dir: Path, hosts: int, rate: float, seed: int) -> dict:
    from support import stories as gen

    from tracepipe.lake import Lake

    t0 = time.perf_counter()
    story = gen.generate(
        seed=seed, n_hosts=hosts, days=1, start=START, rate=rate, v6_hosts=max(4, hosts // 50)
    )
    t1 = time.perf_counter()
    lake = Lake(lake_dir)
    lake.append("flows", story.flows, key=f"bench-{seed}")
    lake.replace_dataset("vm_leases", story.leases)
    (lake_dir / "intel.txt").write_text(story.intel_lines)
    from tracepipe.intel import import_intel

    import_intel(lake, lake_dir / "intel.txt")
    t2 = time.perf_counter()
    return {
        "flows": story.flows.num_rows,
        "planted": len(story.planted),
        "generate_s": round(t1 - t0, 1),
        "write_s": round(t2 - t1, 1),
        "local_networks": gen.LOCAL_NETWORKS,
    }


def fit(lake_dir: Path) -> dict:
    """The model's baseline = the same day (the benchmark has one day); its own process, its own RSS."""
    from support import stories as gen

    from tracepipe.detect import model
    from tracepipe.lake import Lake

    t0 = time.perf_counter()
    model.fit_lake(
        Lake(lake_dir),
        START,
        START + dt.timedelta(days=1),
        gen.LOCAL_NETWORKS,
        path=lake_dir / "_models" / "bench.npz",
    )
    return {
        "fit_s": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def sweep(lake_dir: Path, with_model: bool) -> dict:
    """Runs in its own process so that ru_maxrss is the sweep's peak, not the generator's."""
    from support import stories as gen

    from tracepipe.lake import Lake
    from tracepipe.pipeline_config import load_pipeline
    from tracepipe.sweep import run_sweep

    lake = Lake(lake_dir)
    config = load_pipeline(REPO / "pipelines" / "nightly.toml")
    config = dataclasses.replace(
        config,
        pipeline=dataclasses.replace(config.pipeline, local_networks=gen.LOCAL_NETWORKS),
        output=dataclasses.replace(config.output, report_dir=str(lake_dir / "reports"), html=False),
        model=dataclasses.replace(
            config.model, enabled=with_model, path=str(lake_dir / "_models" / "bench.npz")
        ),
    )
    for old in (lake_dir / "alerts").rglob("*.parquet"):  # a fresh sweep each run (not an idempotent rerun)
        old.unlink()
    t0 = time.perf_counter()
    result = run_sweep(lake, config, START, START + dt.timedelta(days=1))
    elapsed = time.perf_counter() - t0
    return {
        "flows": result.flows,
        "sweep_s": elapsed,
        "timings": result.timings,
        "alerts": result.alerts.num_rows,
        "by_detector": result.summary()["new_by_detector"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", type=Path, default=Path("/tmp/tracepipe-bench-sweep"))
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument(
        "--rate", type=float, default=9.0, help="activity per host (9 -> ~20 M flows/day at 1,000)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="sweep the lake as it is, no generation")
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--sweep-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fit-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sweep_only:
        print(json.dumps(sweep(args.lake, not args.no_model)))
        return 0
    if args.fit_only:
        print(json.dumps(fit(args.lake)))
        return 0
    if not args.reuse:
        if args.lake.exists():
            import shutil

            shutil.rmtree(args.lake)
        info = generate(args.lake, args.hosts, args.rate, args.seed)
        print(
            f"generated {info['flows']:,} flows for {args.hosts:,} VMs in {info['generate_s']} s, "
            f"landed in the lake in {info['write_s']} s ({info['flows'] / max(info['write_s'], 1e-9):,.0f} rows/s)"
        )

    def child(*flags: str) -> dict:
        proc = subprocess.run(
            [sys.executable, __file__, *flags, "--lake", str(args.lake)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"benchmark step {flags} failed:\n{proc.stderr}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    if not args.no_model:
        fitted = child("--fit-only")
        print(
            f"model fit on the day (before the sweep, own process): {fitted['fit_s']:.1f} s, "
            f"peak RSS {fitted['peak_rss_mb']:,.0f} MB"
        )
    stats = child("--sweep-only", *(["--no-model"] if args.no_model else []))
    total = stats["sweep_s"]
    print(
        f"sweep of {stats['flows']:,} flows: {total:.1f} s = {stats['flows'] / total:,.0f} flows/s, "
        f"peak RSS {stats['peak_rss_mb']:,.0f} MB, {stats['alerts']} alerts {stats['by_detector']}"
    )
    print(
        f"CPU time of the sweep process (user+sys, imports included): {stats['cpu_s']:.1f} s "
        f"on {os.cpu_count()} cores; load average now {os.getloadavg()[0]:.1f} (other jobs share the machine)"
    )
    print("time per stage:")
    for stage, seconds in sorted(stats["timings"].items(), key=lambda kv: -kv[1]):
        print(f"  {stage:<16} {seconds:7.2f} s  {100 * seconds / total:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
