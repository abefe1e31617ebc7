"""`tracepipe trace` at the size of a Security Service Challenge answered on a real site's lake: a generated
cloud (tests/support/ssc.py: VMs whose IPv4/IPv6 addresses are reused over a month, deleted and soft-deleted
VMs), a month of flows attributed as ingest leaves them, and N observations (default 1,000) of which 80% hit a
VM, 10% a gap between leases and 10% an address the cloud never had. Prints the time of one trace() call (one
DuckDB batch for all observations), whether every answer is right, and peak RSS.

    python benchmarks/trace.py                          # 20,000 VMs, 300,000 flows a day for 31 days
    python benchmarks/trace.py --per-day 50000 --observations 100
"""

from __future__ import annotations

import argparse
import csv
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main(argv: list[str] | None = None) -> int:
    from support import ssc

    from tracepipe.lake import Lake
    from tracepipe.respond.observations import read_observations
    from tracepipe.respond.trace import trace

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vms", type=int, default=20_000)
    parser.add_argument("--per-day", type=int, default=300_000, help="background flows per day")
    parser.add_argument("--days", type=int, default=31)
    parser.add_argument("--observations", type=int, default=1000)
    parser.add_argument(
        "--lake", type=Path, default=None, help="default: a temporary directory, removed after"
    )
    args = parser.parse_args(argv)
    root = args.lake or Path(tempfile.mkdtemp(prefix="tracepipe-trace-bench-"))
    try:
        started = time.perf_counter()
        cloud = ssc.make_cloud(n_vms=args.vms, n_v4=args.vms // 3, n_v6=args.vms // 12, days=args.days)
        observations = ssc.observations(cloud, args.observations)
        lake = Lake(root)
        ssc.land(lake, cloud, observations, per_day=args.per_day)
        print(
            f"lake {root}: {args.vms:,} VMs, {cloud.leases.num_rows:,} leases, "
            f"{args.per_day * args.days:,} flows over {args.days} days, landed and attributed in "
            f"{time.perf_counter() - started:.1f} s"
        )
        ticket = root.parent / f"{root.name}-ticket.csv"
        with ticket.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["address", "port", "time"])
            writer.writerows([o["address"], ssc.CC_PORT, o["time"].isoformat()] for o in observations)
        started = time.perf_counter()
        result = trace(lake, read_observations(ticket))
        seconds = time.perf_counter() - started
        wrong = 0
        for truth, answer in zip(observations, result.observations, strict=True):
            holders = [h["vm_id"] for h in answer["holders"]]
            if holders != ([truth["expect_vm"]] if truth["expect_vm"] else []):
                wrong += 1
        print(
            f"trace: {len(observations):,} observations in {seconds:.2f} s ({result.summary}); "
            f"wrong answers: {wrong}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB"
        )
        ticket.unlink(missing_ok=True)
        return 1 if wrong else 0
    finally:
        if args.lake is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
