"""A generated cloud for Security Service Challenge drills: ~5,000 VMs whose addresses (IPv4 and IPv6) are
reused several times over a month, deleted and soft-deleted VMs, gaps where nobody held an address, and
SSC-style observations of it with their known answers. Used by tests/test_trace.py and benchmarks/trace.py.

Vectorised with numpy/pyarrow (the benchmark lands a month of flows). Leases are the lake's vm_leases rows as
the lifecycle would have built them: per address one lease per slot, never overlapping.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tracepipe.lake import Lake, hash_bytes, ingest_table
from tracepipe.schema import FLOWS, VM_LEASES, VMS

START = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
US = 1_000_000
CC = "203.0.113.66"  # the drill's C&C
CC_PORT = 4444
QUARANTINE = 7 * 86400 * US


@dataclass
class Cloud:
    leases: pa.Table
    vms: pa.Table
    days: int


def make_cloud(n_vms: int = 5000, n_v4: int = 1600, n_v6: int = 400, days: int = 30, seed: int = 5) -> Cloud:
    rng = np.random.default_rng(seed)
    pool = [f"10.64.{i // 250}.{i % 250 + 1}" for i in range(n_v4)] + [
        f"2001:db8:64::{i + 1:x}" for i in range(n_v6)
    ]
    n_addrs = len(pool)
    slots = -(-n_vms // n_addrs)
    slot_us = days * 86400 * US // slots
    vm = np.arange(n_vms)
    addr_idx, slot = vm % n_addrs, vm // n_addrs
    t0 = int(START.timestamp() * US)
    valid_from = t0 + slot * slot_us + (rng.random(n_vms) * 0.2 * slot_us).astype(np.int64)
    valid_to = valid_from + ((0.4 + rng.random(n_vms) * 0.35) * slot_us).astype(np.int64)
    last = slot == slots - 1
    open_lease = last & (rng.random(n_vms) < 0.6)  # still held now: active or soft-deleted (quarantined)
    soft = open_lease & (rng.random(n_vms) < 0.25)
    status = np.where(open_lease, np.where(soft, "soft_deleted", "active"), "deleted")
    force = ~open_lease & (rng.random(n_vms) < 0.1)  # force-deleted: nothing kept
    deleted_at = np.where(open_lease, valid_from + slot_us // 2, valid_to)
    quarantine = np.where(force, 0, deleted_at + QUARANTINE)
    ts = pa.timestamp("us", tz="UTC")
    vm_ids = pa.array([f"vm-{i:05d}" for i in range(n_vms)])
    users = rng.integers(0, 900, n_vms)
    projects = users // 3  # an owner's VMs share a project; a project has about three owners
    leases = pa.table(
        {
            "addr": pa.array(pool).take(pa.array(addr_idx)),
            "vm_id": vm_ids,
            "vm_name": pc.binary_join_element_wise("node-", vm_ids, ""),
            "project": pa.array([f"project-{p:03d}" for p in projects]),
            "user": pa.array([f"user-{u:03d}" for u in users]),
            "hypervisor": pa.array([f"compute-{h:02d}" for h in rng.integers(0, 40, n_vms)]),
            "cloud": pa.array(["openstack"] * n_vms),
            "addr_kind": pa.array(["fixed"] * n_vms),
            "valid_from": pa.array(valid_from, ts),
            "valid_to": pc.if_else(pa.array(open_lease), pa.nulls(n_vms, ts), pa.array(valid_to, ts)),
            "end_reason": pc.if_else(
                pa.array(open_lease),
                pa.nulls(n_vms, pa.string()),
                pa.array(np.where(force, "force_delete", "delete")),
            ),
            "vm_status": pa.array(status),
            "quarantine_until": pc.if_else(
                pa.array((~open_lease & ~force) | soft),
                pa.array(quarantine, ts),
                pa.nulls(n_vms, ts),
            ),
        }
    ).cast(VM_LEASES)
    vms = pa.table(
        {
            "vm_id": vm_ids,
            "cloud": leases["cloud"],
            "vm_name": leases["vm_name"],
            "project": leases["project"],
            "user": leases["user"],
            "hypervisor": leases["hypervisor"],
            "status": leases["vm_status"],
            "created_at": leases["valid_from"],
            "deleted_at": pc.if_else(
                pa.array(status == "active"), pa.nulls(n_vms, ts), pa.array(deleted_at, ts)
            ),
            "quarantine_until": leases["quarantine_until"],
            "first_event_at": leases["valid_from"],
            "last_event_at": leases["valid_from"],
            "image": pa.array([f"img-{i % 7}" for i in range(n_vms)]),  # vm-00012 runs img-5
            "vm_key": pa.nulls(n_vms, pa.int64()),  # the lease writer assigns them (correlate/vm_keys.py)
            "identity_changed_at": pa.nulls(n_vms, ts),  # and this (correlate/vm_keys.py)
        }
    ).cast(VMS)
    return Cloud(leases, vms, days)


def observations(cloud: Cloud, n: int = 100, seed: int = 7) -> list[dict]:
    """SSC-style observations with their answers: `expect_vm` (None = nobody held it), `in_cloud`. Mixes
    addresses held by an active, a deleted and a soft-deleted VM, addresses reused by a later VM (observed
    in the later lease), gaps between leases, IPv6 addresses, and addresses the cloud never had."""
    rng = np.random.default_rng(seed)
    leases = cloud.leases.to_pylist()
    by_addr: dict[str, list[dict]] = {}
    for lease in leases:
        by_addr.setdefault(lease["addr"], []).append(lease)
    reused = [lease for lease in leases if by_addr[lease["addr"]][0] is not lease]
    kinds = {
        "active": [x for x in leases if x["vm_status"] == "active"],
        "deleted": [x for x in leases if x["vm_status"] == "deleted"],
        "soft_deleted": [x for x in leases if x["vm_status"] == "soft_deleted"],
        "reused": reused,
        "ipv6": [x for x in leases if ":" in x["addr"]],
    }
    out: list[dict] = []
    k = max(1, n // 100)  # per 100 observations: 80 held (5 kinds), 10 gaps, 10 never the cloud's
    plan = (["active"] * 15 + ["deleted"] * 20 + ["soft_deleted"] * 15 + ["reused"] * 20 + ["ipv6"] * 10) * k
    chosen: set[str] = set()
    for kind in plan:
        lease = kinds[kind][int(rng.integers(len(kinds[kind])))]
        while lease["vm_id"] in chosen:  # one observation per VM: windows of two would share flows
            lease = kinds[kind][int(rng.integers(len(kinds[kind])))]
        chosen.add(lease["vm_id"])
        start = lease["valid_from"]
        end = lease["valid_to"] or start + dt.timedelta(days=2)
        at = start + (end - start) * float(rng.uniform(0.1, 0.9))
        out.append(
            {
                "kind": kind,
                "address": lease["addr"],
                "time": at,
                "expect_vm": lease["vm_id"],
                "in_cloud": True,
            }
        )
    gaps = [
        (earlier, later)
        for held in by_addr.values()
        for earlier, later in itertools.pairwise(held)
        if later["valid_from"] - earlier["valid_to"] > dt.timedelta(hours=2)
    ]
    for _ in range(10 * k):
        earlier, later = gaps[int(rng.integers(len(gaps)))]
        at = earlier["valid_to"] + (later["valid_from"] - earlier["valid_to"]) / 2
        out.append(
            {"kind": "gap", "address": earlier["addr"], "time": at, "expect_vm": None, "in_cloud": True}
        )
    for i in range(10 * k):
        at = START + dt.timedelta(days=float(rng.uniform(1, cloud.days - 1)))
        out.append(
            {
                "kind": "never",
                "address": f"10.99.{i // 250}.{i % 250 + 1}",
                "time": at,
                "expect_vm": None,
                "in_cloud": False,
            }
        )
    order = rng.permutation(len(out))
    return [out[i] for i in order][:n]


def cc_flows(obs: list[dict]) -> pa.Table:
    """Two flows per held observation: the VM to the C&C (port 4444) and the reply, at the observed time."""
    rows = []
    for o in obs:
        if o["expect_vm"] is None:
            continue
        ts = o["time"]
        for src, dst, sport, dport in (
            (o["address"], CC, 50000, CC_PORT),
            (CC, o["address"], CC_PORT, 50000),
        ):
            rows.append(
                {
                    "ts_start": ts,
                    "ts_end": ts + dt.timedelta(seconds=3),
                    "src_addr": src,
                    "dst_addr": dst,
                    "src_port": sport,
                    "dst_port": dport,
                    "proto": 6,
                    "packets": 5,
                    "bytes": 900,
                    "ip_version": 6 if ":" in o["address"] else 4,
                    "source": "drill-cc.pcap",
                }
            )
    return pa.Table.from_pylist(rows, schema=FLOWS)


def background_flows(cloud: Cloud, per_day: int, day: int, seed: int = 11) -> pa.Table:
    """One UTC day of ordinary flows between the cloud's addresses and the internet."""
    rng = np.random.default_rng(seed + day)
    internal = pc.unique(cloud.leases["addr"].combine_chunks())
    internal = internal.filter(pc.invert(pc.match_substring(internal, ":")))
    external = pa.array([f"198.51.{i // 250}.{i % 250 + 1}" for i in range(2000)])
    day_start = int((START + dt.timedelta(days=day)).timestamp() * US)
    ts = day_start + rng.integers(0, 86400 * US, per_day)
    inside = pc.take(internal, pa.array(rng.integers(0, len(internal), per_day)))
    outside = pc.take(external, pa.array(rng.integers(0, len(external), per_day)))
    outbound = rng.random(per_day) < 0.6
    t = pa.timestamp("us", tz="UTC")
    packets = rng.integers(1, 100, per_day)
    return pa.table(
        {
            "ts_start": pa.array(ts, t),
            "ts_end": pa.array(ts + rng.integers(0, 30 * US, per_day), t),
            "src_addr": pc.if_else(pa.array(outbound), inside, outside),
            "dst_addr": pc.if_else(pa.array(outbound), outside, inside),
            "src_port": pa.array(rng.integers(1024, 65535, per_day).astype(np.int32)),
            "dst_port": pa.array(rng.choice(np.array([22, 53, 80, 443], np.int32), per_day)),
            "proto": pa.array(np.full(per_day, 6, np.int16)),
            "packets": pa.array(packets),
            "bytes": pa.array(packets * 500),
            "ip_version": pa.array(np.full(per_day, 4, np.int8)),
            "source": pa.array([f"day-{day:02d}.pcap"] * per_day),
        }
    ).cast(
        pa.schema(
            [
                FLOWS.field(n)
                for n in (
                    "ts_start",
                    "ts_end",
                    "src_addr",
                    "dst_addr",
                    "src_port",
                    "dst_port",
                    "proto",
                    "packets",
                    "bytes",
                    "ip_version",
                    "source",
                )
            ]
        )
    )


def land(lake: Lake, cloud: Cloud, obs: list[dict], per_day: int = 0) -> None:
    """Leases and VMs as ingest would have left them, the C&C flows, `per_day` background flows a day, and
    attribution of every flow file."""
    from tracepipe.attribution import attribute_flows

    lake.replace_dataset("vm_leases", cloud.leases)
    lake.replace_dataset("vms", cloud.vms)
    ingest_table(
        lake, "flows", "drill-cc", hash_bytes(b"drill-cc-" + str(len(obs)).encode()), [cc_flows(obs)]
    )
    for day in range(cloud.days if per_day else 0):
        table = background_flows(cloud, per_day, day)
        ingest_table(lake, "flows", f"day-{day}", hash_bytes(f"drill-bg-{per_day}-{day}".encode()), [table])
    attribute_flows(lake)
