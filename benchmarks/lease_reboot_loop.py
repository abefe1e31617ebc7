"""Lease state under a reboot loop (README, Limits): one live VM of N Nova events (power_off / power_on / reboot
listing one address) among two weeks of ordinary churn, then one more hourly `tracepipe ingest vm`.

    python benchmarks/lease_reboot_loop.py build N LAKE HOURFILE   # the lake, built in full, and the next hour
    cp -a LAKE /tmp/l && /usr/bin/time -f '%e s %M KB' tracepipe ingest vm HOURFILE --lake /tmp/l --output json
    python benchmarks/lease_reboot_loop.py check /tmp/l            # the update's tables == `leases rebuild`'s
"""

from __future__ import annotations

import datetime as dt
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.leases import (
    RECLAIM,
    START,
    US,
    event_rows,
    land_year,
    next_hours,
    plan_vms,
    vm_ids,
    write_notifications,
)
from tracepipe.correlate.leases import refresh_leases, save_reclaim_interval
from tracepipe.lake import Lake
from tracepipe.schema import VM_EVENTS

HOURS = 24 * 14
PER_HOUR = 20
LOOP_VM = "00000000-0000-4000-8000-00000000beef"
LOOP_ADDR = "10.99.0.7"
SAMPLE_PORT = "ce531f90-199f-48c0-816c-13e38010b442"
LOOP_PORT = "00000000-0000-4000-8000-00000000b0b0"
CYCLE = [
    ("instance.power_off.start", "power_off", "active"),
    ("instance.power_off.end", "power_off", "stopped"),
    ("instance.power_on.start", "power_on", "stopped"),
    ("instance.power_on.end", "power_on", "active"),
    ("instance.reboot.start", "reboot", "active"),
    ("instance.reboot.end", "reboot", "active"),
]


def loop_rows(n: int, first_us: int, step_us: int, offset: int = 0) -> pa.Table:
    k = np.arange(offset, offset + n)
    ts = first_us + np.arange(n) * step_us
    kinds = [CYCLE[i % len(CYCLE)] for i in range(offset, offset + n)]
    rows = {
        "ts": pa.array(ts, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "cloud": pa.array(["openstack"] * n),
        "vm_id": pa.array([LOOP_VM] * n),
        "vm_name": pa.array(["loop"] * n),
        "project": pa.array(["project-loop"] * n),
        "user": pa.array(["user-loop"] * n),
        "hypervisor": pa.array(["compute-7"] * n),
        "event_type": pa.array([t for t, _, _ in kinds]),
        "action": pa.array([a for _, a, _ in kinds]),
        "state": pa.array([s for _, _, s in kinds]),
        "addrs": pa.array([[LOOP_ADDR]] * n, pa.list_(pa.string())),
        "event_id": pa.array([f"loop-{i}" for i in k]),
        "source": pa.array(["repro"] * n),
    }
    table = pa.table(rows)
    return pa.table(
        {f.name: table[f.name] if f.name in table.column_names else pa.nulls(n, f.type) for f in VM_EVENTS},
        schema=VM_EVENTS,
    )


def create_rows(first_us: int) -> pa.Table:
    rows = loop_rows(2, first_us - 100 * US, 40 * US)
    return rows.set_column(
        rows.schema.get_field_index("event_type"),
        "event_type",
        pa.array(["instance.create.start", "instance.create.end"]),
    ).set_column(rows.schema.get_field_index("action"), "action", pa.array(["create", "create"]))


def build(n: int, root: Path, hour_file: Path) -> None:
    rng = np.random.default_rng(27)
    plan = plan_vms(HOURS, PER_HOUR, rng)
    ids = vm_ids(len(plan["created"]))
    churn = event_rows(plan, ids, rng)
    start_us = int(START.timestamp() * US) + 3600 * US
    span = (HOURS - 2) * 3600 * US
    step = max(span // max(n, 1), 1)
    loop = loop_rows(n, start_us, step)
    create = create_rows(start_us).select(loop.column_names)
    events = pa.concat_tables([churn, create, loop]).sort_by("ts")
    shutil.rmtree(root, ignore_errors=True)
    lake = Lake(root)
    save_reclaim_interval(lake, RECLAIM)
    land_year(lake, events)
    t = time.perf_counter()
    update = refresh_leases(lake)
    print(
        f"lake {root}: {events.num_rows:,} events ({n:,} of the loop VM); full build {time.perf_counter() - t:.1f} s"
        f" ({update.to_dict()})"
    )
    nxt = next_hours(plan, ids, HOURS, PER_HOUR, rng, 1)[0]
    end_us = int((START + dt.timedelta(hours=HOURS)).timestamp() * US)
    more = loop_rows(12, end_us + 60 * US, 60 * US, offset=n)
    more = more.filter(
        pa.compute.ends_with(more["event_type"], ".end")
    )  # (the samples have no .start of these)
    write_notifications(pa.concat_tables([nxt, more.select(nxt.column_names)]).sort_by("ts"), hour_file)
    # (the samples' port: the loop VM's own, as Nova gives each VM its port)
    lines = hour_file.read_text().splitlines()
    lines = [ln.replace(SAMPLE_PORT, LOOP_PORT) if LOOP_VM in ln else ln for ln in lines]
    hour_file.write_text("\n".join(lines) + "\n")
    print(f"next hour: {nxt.num_rows + more.num_rows} notifications in {hour_file}")


def check(root: Path) -> None:
    copy = root.parent / (root.name + "-rebuilt")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(root, copy, symlinks=True)
    rebuilt = Lake(copy)
    refresh_leases(rebuilt, full=True)
    lake = Lake(root)
    for name, key in (("vm_leases", ["addr", "valid_from"]), ("vms", ["vm_id"])):
        a = lake.read(name).sort_by([(k, "ascending") for k in key])
        b = rebuilt.read(name).sort_by([(k, "ascending") for k in key])
        if name == "vms":
            a, b = a.drop(["vm_key", "identity_changed_at"]), b.drop(["vm_key", "identity_changed_at"])
        print(
            name,
            a.num_rows,
            "rows:",
            "identical to the rebuild" if a.equals(b) else "DIFFERENT from the rebuild",
        )
    shutil.rmtree(copy, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        check(Path(sys.argv[2]))
