#!/usr/bin/env python3
"""DuckDB/polars vs Spark on the same lake: one sweep's detectors (the same code on both engines) and one
flows_attributed query, at growing sizes; then Spark local[1] vs local[2] on the largest size.

Prints, in one run, a table of seconds per engine and size (Spark's session start reported apart: a cluster
pays it once per job), and the speed-up of a second executor core. Flows come from the sweep tests'
generator (tests/support/stories.py generate(): ordinary hosts plus one host per detector), one day per size.

    python benchmarks/engines.py                       # 40, 160, 640 hosts (~0.1 / 0.4 / 1.5 M flows)
    python benchmarks/engines.py --hosts 40 160 --rate 4 --json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

START = dt.datetime(2026, 3, 12, tzinfo=dt.UTC)
QUERY = (
    "SELECT src_project, dst_port, count(*) AS flows, sum(bytes)::BIGINT AS bytes FROM flows_attributed "
    "GROUP BY ALL ORDER BY bytes DESC, src_project, dst_port LIMIT 20"
)


def build(root: Path, hosts: int, rate: float, seed: int) -> tuple[object, object, int]:
    from support import stories as gen

    from tracepipe.lake import Lake
    from tracepipe.pipeline_config import parse_pipeline

    story = gen.generate(seed=seed, n_hosts=hosts, days=1, start=START, rate=rate)
    lake = Lake(root / f"lake-{hosts}")
    lake.append("flows", story.flows, key="bench")
    lake.replace_dataset("vm_leases", story.leases)
    config = parse_pipeline(
        f'[pipeline]\nname = "bench"\nlocal_networks = {json.dumps(gen.LOCAL_NETWORKS)}\n'
        f'[output]\nreport_dir = "{root / "reports"}"\nhtml = false\n',
        "bench.toml",
    )
    return lake, config, story.flows.num_rows


def duckdb_run(lake, config) -> dict[str, float]:
    import polars as pl

    from tracepipe.detect import detectors as det
    from tracepipe.engines import engine_session

    since, until = START, START + dt.timedelta(days=1)
    t0 = time.perf_counter()
    ctx = det.prepare_context(lake, config, since, until, None)
    frames = [fn(ctx) for name, fn in det.DETECTORS.items() if getattr(config.detectors, name).enabled]
    candidates = pl.concat(frames)
    t1 = time.perf_counter()
    with engine_session(lake, "duckdb") as engine:
        engine.query(QUERY)
    t2 = time.perf_counter()
    return {"sweep": t1 - t0, "query": t2 - t1, "candidates": candidates.height}


def spark_run(lake, config, spark) -> dict[str, float]:
    from tracepipe.engines.spark import SparkEngine
    from tracepipe.engines.spark_sweep import sweep_candidates

    since, until = START, START + dt.timedelta(days=1)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _, candidates = sweep_candidates(lake, config, since, until, None, session=spark, timings=timings)
    t1 = time.perf_counter()
    SparkEngine(lake, session=spark).query(QUERY)
    t2 = time.perf_counter()
    return {
        "sweep": t1 - t0,
        "query": t2 - t1,
        "candidates": candidates.height,
        **{f"sweep_{k}": v for k, v in timings.items() if k != "session"},
    }


def session(master: str):
    from tracepipe.engines.spark import get_session

    t0 = time.perf_counter()
    spark = get_session(master, {"spark.driver.memory": "4g"})
    spark.range(1).count()  # JVM warm-up: the first job of a session
    return spark, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", type=int, nargs="+", default=[40, 160, 640])
    parser.add_argument("--rate", type=float, default=1.0, help="scales each ordinary host's activity")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--dir", type=Path, default=None, help="work directory (default: a temp dir, removed)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="tracepipe-engines-"))
    rows = []
    try:
        lakes = []
        for hosts in args.hosts:
            t0 = time.perf_counter()
            lake, config, flows = build(root, hosts, args.rate, args.seed)
            lakes.append((hosts, lake, config, flows))
            print(
                f"generated {hosts} hosts: {flows:,} flows in {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
            )
        spark, start_s = session("local[2]")
        print(f"Spark local[2] session start + first job: {start_s:.1f} s", file=sys.stderr)
        for hosts, lake, config, flows in lakes:
            duck = duckdb_run(lake, config)
            sp = spark_run(lake, config, spark)
            assert duck["candidates"] == sp["candidates"], "engines disagree"
            rows.append(
                {
                    "hosts": hosts,
                    "flows": flows,
                    "duckdb_sweep_s": duck["sweep"],
                    "duckdb_query_s": duck["query"],
                    "spark2_sweep_s": sp["sweep"],
                    "spark2_query_s": sp["query"],
                    **{k: v for k, v in sp.items() if k.startswith("sweep_")},
                }
            )
            print(f"{hosts} hosts done", file=sys.stderr)
        spark.stop()
        hosts, lake, config, flows = lakes[-1]
        spark1, start1 = session("local[1]")
        one = spark_run(lake, config, spark1)
        spark1.stop()
        spark2, start2 = session("local[2]")
        two = spark_run(lake, config, spark2)
        spark2.stop()
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"\n{'hosts':>6} {'flows':>10} | {'duckdb sweep':>12} {'spark sweep':>12} {'ratio':>6} | "
        f"{'duckdb query':>12} {'spark query':>12}"
    )
    for r in rows:
        print(
            f"{r['hosts']:>6} {r['flows']:>10,} | {r['duckdb_sweep_s']:>11.2f}s {r['spark2_sweep_s']:>11.2f}s "
            f"{r['spark2_sweep_s'] / r['duckdb_sweep_s']:>5.1f}x | {r['duckdb_query_s']:>11.2f}s "
            f"{r['spark2_query_s']:>11.2f}s"
        )
    print(f"\nSpark session start + first job: local[2] {start_s:.1f} s (not in the sweep times)")
    print(
        f"executors, {flows:,} flows: local[1] sweep {one['sweep']:.2f} s, local[2] {two['sweep']:.2f} s "
        f"(speed-up {one['sweep'] / two['sweep']:.2f}x); query {one['query']:.2f} s -> {two['query']:.2f} s"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "sizes": rows,
                    "spark_start_s": start_s,
                    "local1": one,
                    "local2": two,
                    "local1_start_s": start1,
                    "local2_start_s": start2,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
