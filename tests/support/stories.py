"""Seeded stories of a small research cloud, for the tests, the benchmarks and sample_data/make_sample.py (test
scaffolding: not in the package). Same seed, same bytes. Both stories plan conversations column-wise with numpy
(one batch per activity), take their TCP flags from one table per connection outcome (PACKET_FLAGS for
packets, FLOW_FLAGS their OR for flow records) and export both directions the way softflowd does; they differ
in how far they go:

- `build_story`: a few hours, tens of VMs doing ordinary work plus planted incidents (SSH brute force,
  horizontal scan, beaconing, exfiltration, a crypto miner) -> a `CloudStory` (VMs, planned connections,
  ground truth), a packet capture of it written with numpy (headers only, snap-length truncated, so a 1 GB
  transfer costs a few thousand records) that the real softflowd turns into NetFlow v9 / IPFIX
  (`export_netflow`), and the matching cloud records in the real formats (Nova notifications, Neutron floating
  IP events, an OpenNebula VM log and XML, rsyslog files from inside two VMs, a MISP CSV). This is the story
  behind sample_data/story (the demo).
- `generate`: days of flow records for tens of hosts, straight into schema.FLOWS (no packets: large enough for
  the detectors' baselines and for benchmarks at tens of millions of flows), one planted incident per detector
  on the last day -> a `FlowStory` with its leases; `story_lake` writes it into a real lake.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tracepipe.errors import EnvironmentProblem
from tracepipe.lake import Lake
from tracepipe.schema import FLOWS, TUNNEL_COLUMNS, VM_LEASES
from tracepipe.tools import tool_path

UTC = dt.UTC
STORY_START = dt.datetime(2025, 6, 17, 6, 0, tzinfo=UTC)
STORY_HOURS = 4.0

# infrastructure (not VMs: never attributed)
RESOLVER = "10.20.0.2"
NTP_SERVER = "10.20.0.3"
STORAGE = "10.20.0.5"
BASTION = "10.20.0.9"
WEB_SITES_V4 = [f"198.51.100.{i}" for i in range(30, 52)] + [f"203.0.113.{i}" for i in range(10, 16)]
WEB_SITES_V6 = [f"2001:db8:ffff::{i:x}" for i in range(0x10, 0x18)]
HTTP_CLIENTS = [f"203.0.113.{i}" for i in range(100, 140)]

# planted incidents
BRUTE_SRC, BEACON_SRC, EXFIL_SRC, SCAN_SRC, MINER_SRC = (
    "10.20.1.23",
    "10.20.1.19",
    "10.20.1.26",
    "10.20.1.31",
    "10.40.0.12",
)
BEACON_DST, EXFIL_DST, MINER_DST, MINER_PORT = "192.0.2.77", "198.51.100.200", "203.0.113.50", 3333
BRUTE_VICTIMS_INTERNAL = ("10.20.1.13", "10.20.1.15")
FLOATING_IP, FLOATING_FIXED = "198.51.100.20", "10.20.1.10"
ONE_PREFIX = "10.40."  # the OpenNebula site: its own probe

# TCP flags (RFC 9293), as packets carry them and flow records OR them
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

# How a connection ends (its "kind"), shared by both stories: the cloud story's packets and the flow story's
# records take their TCP flags from the one table below.
TCP_FULL, TCP_SYN_ONLY, TCP_SYN_RST, UDP, TCP_SYN_ACK_RST = 0, 1, 2, 3, 4
# kind -> direction (opener, answer) -> flags of its (first, middle, last) packet
PACKET_FLAGS = np.array(
    [
        [[SYN, PSH | ACK, FIN | ACK], [SYN | ACK, ACK, FIN | ACK]],  # TCP_FULL: handshake, data, close
        [[SYN, SYN, SYN], [0, 0, 0]],  # TCP_SYN_ONLY: nobody answers (filtered, or no host)
        [[SYN, SYN, SYN], [RST | ACK] * 3],  # TCP_SYN_RST: closed port
        [[0, 0, 0], [0, 0, 0]],  # UDP
        [[SYN, RST | ACK, RST | ACK], [SYN | ACK] * 3],  # TCP_SYN_ACK_RST: open port, the scanner resets
    ],
    np.uint8,
)
# what a flow record of each direction carries: the OR of its packets' flags (as softflowd exports it)
FLOW_FLAGS = np.bitwise_or.reduce(PACKET_FLAGS, axis=2)
DONE = int(FLOW_FLAGS[TCP_FULL, 0])  # a whole conversation's flags, opener's side
ANSWERED = np.array([True, False, True, True, True])  # kind -> does the other side send anything

MAX_IP_LEN = 65000  # GRO/TSO-sized segments as a host-side capture sees them


@dataclass(frozen=True)
class VM:
    vm_id: str
    name: str
    project: str
    user: str
    cloud: str
    hypervisor: str
    addr: str
    addr6: str | None
    role: str
    mac: str
    port_id: str


@dataclass
class CloudStory:
    seed: int
    start: dt.datetime
    end: dt.datetime
    vms: list[VM]
    conns: dict[str, np.ndarray]  # one entry per planned connection (see _Conns)
    truth: dict[str, Any] = field(default_factory=dict)

    @property
    def n_conns(self) -> int:
        return len(self.conns["t0"])


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _column(value, n: int, dtype=None) -> np.ndarray:
    """One column of a batch of n: a scalar (or a one-element array) repeated n times, an array as it is."""
    arr = np.asarray(value)
    if arr.ndim == 0 or (len(arr) == 1 and n != 1):
        arr = np.repeat(arr.reshape(-1), n)
    return arr if dtype is None else arr.astype(dtype)


class _Conns:
    """Collects planned connections column-wise, one vectorised batch per activity.

    Columns: t0 (start, epoch s), dur (s), src/dst (address text; src opens the connection), sport (-1 = pick an
    ephemeral port), dport, proto (6/17), kind (TCP_FULL, TCP_SYN_ONLY, TCP_SYN_RST, UDP), pk_f/pk_r (packets
    src->dst / dst->src), by_f/by_r (payload bytes each way).
    """

    cols = ("t0", "dur", "src", "dst", "sport", "dport", "proto", "kind", "pk_f", "pk_r", "by_f", "by_r")

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {c: [] for c in self.cols}

    def add(self, t0, dur, src, dst, dport, proto, kind, pk_f, pk_r, by_f, by_r, sport=-1) -> None:
        n = len(np.atleast_1d(t0))
        values = dict(
            t0=t0,
            dur=dur,
            src=src,
            dst=dst,
            sport=sport,
            dport=dport,
            proto=proto,
            kind=kind,
            pk_f=pk_f,
            pk_r=pk_r,
            by_f=by_f,
            by_r=by_r,
        )
        for col, value in values.items():
            self.parts[col].append(_column(value, n))

    def build(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = {c: np.concatenate(self.parts[c]) for c in self.cols}
        for c in ("src", "dst"):
            out[c] = out[c].astype(object)
        for c in ("sport", "dport", "proto", "kind", "pk_f", "pk_r"):
            out[c] = out[c].astype(np.int64)
        for c in ("by_f", "by_r"):
            out[c] = out[c].astype(np.int64)
        # enough packets to carry the bytes in segments of at most MAX_IP_LEN
        need_f = np.ceil(out["by_f"] / MAX_IP_LEN).astype(np.int64) + 2
        need_r = np.ceil(out["by_r"] / MAX_IP_LEN).astype(np.int64) + 2
        full = out["kind"] == TCP_FULL
        out["pk_f"] = np.where(full, np.maximum(out["pk_f"], need_f), out["pk_f"])
        out["pk_r"] = np.where(full, np.maximum(out["pk_r"], need_r), out["pk_r"])
        order = np.argsort(out["t0"], kind="stable")
        out = {c: v[order] for c, v in out.items()}
        # ephemeral source ports: per source host a running counter from a random base, so that two
        # connections of one host never share a 5-tuple (softflowd would merge them)
        hosts, inverse = np.unique(out["src"].astype(str), return_inverse=True)
        by_host = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse)
        rank = np.empty(len(inverse), np.int64)
        rank[by_host] = np.arange(len(inverse)) - np.repeat(np.cumsum(counts) - counts, counts)
        base = rng.integers(0, 28000, len(hosts))
        ephemeral = 32768 + (base[inverse] + rank) % 28000
        out["sport"] = np.where(out["sport"] < 0, ephemeral, out["sport"])
        return out


def _ts(start: dt.datetime) -> float:
    return start.timestamp()


def _arrivals(rng: np.random.Generator, t0: float, t1: float, mean_gap: float) -> np.ndarray:
    n = int((t1 - t0) / mean_gap * 1.5) + 5
    times = t0 + np.cumsum(rng.exponential(mean_gap, n))
    return times[times < t1]


def _make_vms(rng: np.random.Generator, n_ordinary: int) -> list[VM]:
    projects = [
        ("atlas-sim", "jdoe"),
        ("genomics-lab", "mkowalski"),
        ("climate-ml", "apatel"),
        ("teaching-cs101", "tnguyen"),
        ("astro-survey", "lchen"),
    ]
    roles = ["web", "db", "ci-runner", "jupyter", "dataproc"]
    vms: list[VM] = []
    fixed = {
        FLOATING_FIXED: ("web-01", "atlas-sim", "jdoe", "web"),
        "10.20.1.13": ("web-03", "atlas-sim", "jdoe", "web"),
        "10.20.1.15": ("db-01", "atlas-sim", "sgarcia", "db"),
        BEACON_SRC: ("web-05", "genomics-lab", "mkowalski", "web"),
        BRUTE_SRC: ("ci-runner-3", "teaching-cs101", "tnguyen", "ci-runner"),
        EXFIL_SRC: ("dataproc-04", "genomics-lab", "okafor", "dataproc"),
        SCAN_SRC: ("jupyter-07", "climate-ml", "apatel", "jupyter"),
    }
    counters = {r: 0 for r in roles}
    # the planted and victim VMs sit at fixed addresses up to 10.20.1.31: never fewer VMs than that
    total = max(max(n_ordinary, 0) + 5, 22)
    for i in range(total):
        addr = f"10.20.{1 + i // 240}.{10 + i % 240}"  # 240 VMs per /24, from 10.20.1.10
        if addr in fixed:
            name, project, user, role = fixed[addr]
        else:
            role = roles[i % len(roles)]
            counters[role] += 1
            project, user = projects[(i * 3) % len(projects)]
            name = f"{role}-{counters[role] + 10:02d}"
        addr6 = f"2001:db8:20:1::{10 + i:x}" if i % 3 == 0 else None
        mac = "fa:16:3e:" + ":".join(f"{b:02x}" for b in rng.bytes(3))
        vms.append(
            VM(
                _uuid(rng),
                name,
                project,
                user,
                "openstack",
                f"compute-{1 + i % 4}",
                addr,
                addr6,
                role,
                mac,
                _uuid(rng),
            )
        )
    # the second cloud: an OpenNebula VM (numeric id, group as project)
    vms.append(
        VM(
            "42",
            "render-node-2",
            "hpc-lab",
            "rsilva",
            "opennebula",
            "one-kvm-3",
            MINER_SRC,
            None,
            "render",
            "02:00:0a:28:00:0c",
            "0",
        )
    )
    return vms


def build_story(
    seed: int = 7, start: dt.datetime = STORY_START, hours: float = STORY_HOURS, n_ordinary: int = 30
) -> CloudStory:
    """Plan every connection of the story. Pure: same arguments, same story.

    `n_ordinary` + 5 OpenStack VMs on 10.20.1.10 and up (at least 22: the culprits and the two brute-force
    victims have fixed addresses up to 10.20.1.31), plus the OpenNebula VM; `start` and `hours` set the window.
    """
    rng = np.random.default_rng(seed)
    t_start = _ts(start)
    t_end = t_start + hours * 3600
    vms = _make_vms(rng, n_ordinary)
    c = _Conns()
    planted = {BRUTE_SRC, BEACON_SRC, EXFIL_SRC, SCAN_SRC, MINER_SRC}

    for vm in vms:
        # every VM, culprits included, does ordinary work too
        dns = _arrivals(rng, t_start, t_end, 150.0)
        c.add(
            dns,
            rng.uniform(0.001, 0.02, len(dns)),
            vm.addr,
            RESOLVER,
            53,
            17,
            UDP,
            1,
            1,
            rng.integers(40, 70, len(dns)),
            rng.integers(80, 250, len(dns)),
        )
        web = _arrivals(rng, t_start, t_end, 420.0)
        sites = np.array(WEB_SITES_V4, dtype=object)[rng.integers(0, len(WEB_SITES_V4), len(web))]
        c.add(
            web,
            rng.uniform(0.2, 8.0, len(web)),
            vm.addr,
            sites,
            443,
            6,
            TCP_FULL,
            rng.integers(6, 14, len(web)),
            rng.integers(6, 20, len(web)),
            rng.integers(800, 4000, len(web)),
            rng.integers(5_000, 2_000_000, len(web)),
        )
        if vm.addr6:
            web6 = _arrivals(rng, t_start, t_end, 900.0)
            sites6 = np.array(WEB_SITES_V6, dtype=object)[rng.integers(0, len(WEB_SITES_V6), len(web6))]
            c.add(
                web6,
                rng.uniform(0.2, 5.0, len(web6)),
                vm.addr6,
                sites6,
                443,
                6,
                TCP_FULL,
                rng.integers(6, 12, len(web6)),
                rng.integers(6, 16, len(web6)),
                rng.integers(800, 3000, len(web6)),
                rng.integers(5_000, 800_000, len(web6)),
            )
        ntp = np.arange(t_start + rng.uniform(0, 1024), t_end, 1024.0)
        c.add(ntp, 0.002, vm.addr, NTP_SERVER, 123, 17, UDP, 1, 1, 76, 76, sport=123)
        logins = _arrivals(rng, t_start, t_end, 5400.0)
        c.add(
            logins,
            rng.uniform(60, 1500, len(logins)),
            BASTION,
            vm.addr,
            22,
            6,
            TCP_FULL,
            rng.integers(40, 200, len(logins)),
            rng.integers(40, 260, len(logins)),
            rng.integers(5_000, 60_000, len(logins)),
            rng.integers(10_000, 400_000, len(logins)),
        )
        if vm.role in ("dataproc", "jupyter", "db"):
            bulk = _arrivals(rng, t_start, t_end, 3000.0)
            c.add(
                bulk,
                rng.uniform(20, 120, len(bulk)),
                vm.addr,
                STORAGE,
                2049,
                6,
                TCP_FULL,
                20,
                20,
                rng.integers(20_000_000, 80_000_000, len(bulk)),
                rng.integers(50_000, 400_000, len(bulk)),
            )
        if vm.addr == FLOATING_FIXED:
            # inbound HTTPS to the floating IP (the probe sits outside the NAT)
            hits = _arrivals(rng, t_start, t_end, 40.0)
            clients = np.array(HTTP_CLIENTS, dtype=object)[rng.integers(0, len(HTTP_CLIENTS), len(hits))]
            c.add(
                hits,
                rng.uniform(0.1, 3.0, len(hits)),
                clients,
                FLOATING_IP,
                443,
                6,
                TCP_FULL,
                rng.integers(5, 10, len(hits)),
                rng.integers(5, 14, len(hits)),
                rng.integers(500, 2000, len(hits)),
                rng.integers(3_000, 300_000, len(hits)),
            )

    incidents: list[dict[str, Any]] = []

    def iso(t: float) -> str:
        return dt.datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")

    # 1. SSH brute force, outbound from ci-runner-3 to 12 outside hosts and two of our own VMs
    b0, b1 = t_start + 70 * 60, t_start + 110 * 60
    targets = [f"203.0.113.{i}" for i in range(200, 212)] + list(BRUTE_VICTIMS_INTERNAL)
    brute_tries: dict[str, np.ndarray] = {}
    for target in targets:
        tries = np.sort(rng.uniform(b0, b1, int(rng.integers(36, 48))))
        brute_tries[target] = tries
        c.add(
            tries,
            rng.uniform(1.5, 4.0, len(tries)),
            BRUTE_SRC,
            target,
            22,
            6,
            TCP_FULL,
            rng.integers(10, 14, len(tries)),
            rng.integers(10, 14, len(tries)),
            rng.integers(1800, 2600, len(tries)),
            rng.integers(2400, 3400, len(tries)),
        )
    incidents.append(
        dict(
            kind="ssh_bruteforce",
            direction="outbound",
            addr=BRUTE_SRC,
            start=iso(b0),
            end=iso(b1),
            peers=targets,
            dst_ports=[22],
            attempts=int(sum(len(v) for v in brute_tries.values())),
        )
    )

    # 2. horizontal scan of 198.18.0.0/16 on port 445 from jupyter-07; ~4 % answer with RST
    s0, s1 = t_start + 120 * 60, t_start + 140 * 60
    n_scan = 1500
    scan_hosts = rng.choice(65536, n_scan, replace=False)
    scan_dst = np.array([f"198.18.{h >> 8}.{h & 255}" for h in scan_hosts], dtype=object)
    answered = rng.random(n_scan) < 0.04
    scan_t = np.sort(rng.uniform(s0, s1, n_scan))
    c.add(
        scan_t,
        0.0,
        SCAN_SRC,
        scan_dst,
        445,
        6,
        np.where(answered, TCP_SYN_RST, TCP_SYN_ONLY),
        1,
        np.where(answered, 1, 0),
        0,
        0,
    )
    incidents.append(
        dict(
            kind="horizontal_scan",
            addr=SCAN_SRC,
            start=iso(s0),
            end=iso(s1),
            peers_count=n_scan,
            peers_cidr="198.18.0.0/16",
            dst_ports=[445],
        )
    )

    # 3. beacon: every ~90 s with jitter, constant small sizes, the whole window
    beacon_t = np.arange(t_start + 37.0, t_end - 60, 90.0)
    beacon_t = beacon_t + rng.uniform(-8, 8, len(beacon_t))
    c.add(
        beacon_t,
        rng.uniform(0.3, 0.6, len(beacon_t)),
        BEACON_SRC,
        BEACON_DST,
        443,
        6,
        TCP_FULL,
        6,
        5,
        rng.integers(880, 920, len(beacon_t)),
        rng.integers(1480, 1540, len(beacon_t)),
    )
    incidents.append(
        dict(
            kind="beacon",
            addr=BEACON_SRC,
            start=iso(beacon_t[0]),
            end=iso(beacon_t[-1]),
            peers=[BEACON_DST],
            dst_ports=[443],
            period_s=90,
            jitter_s=8,
            connections=len(beacon_t),
            intel_match=True,
        )
    )

    # 4. exfiltration: six uploads of ~300 MB to one outside address
    e0, e1 = t_start + 150 * 60, t_start + 190 * 60
    ex_t = np.linspace(e0, e1 - 400, 6)
    ex_bytes = rng.integers(290_000_000, 320_000_000, 6)
    c.add(
        ex_t,
        380.0,
        EXFIL_SRC,
        EXFIL_DST,
        443,
        6,
        TCP_FULL,
        20,
        20,
        ex_bytes,
        rng.integers(200_000, 400_000, 6),
    )
    incidents.append(
        dict(
            kind="exfiltration",
            addr=EXFIL_SRC,
            start=iso(e0),
            end=iso(e1),
            peers=[EXFIL_DST],
            dst_ports=[443],
            bytes_out=int(ex_bytes.sum()),
        )
    )

    # 5. crypto miner on the OpenNebula VM: one connection to a pool port, a share every ~30 s for ~4 h
    m0, m1 = t_start + 5 * 60, t_end - 5 * 60
    n_shares = int((m1 - m0) / 30)
    c.add(
        m0,
        m1 - m0,
        MINER_SRC,
        MINER_DST,
        MINER_PORT,
        6,
        TCP_FULL,
        n_shares,
        n_shares,
        n_shares * 180,
        n_shares * 140,
    )
    incidents.append(
        dict(
            kind="miner",
            addr=MINER_SRC,
            start=iso(m0),
            end=iso(m1),
            peers=[MINER_DST],
            dst_ports=[MINER_PORT],
        )
    )

    by_addr = {vm.addr: vm for vm in vms}
    for incident in incidents:
        vm = by_addr[incident["addr"]]
        incident.update(
            vm_id=vm.vm_id,
            vm_name=vm.name,
            project=vm.project,
            user=vm.user,
            cloud=vm.cloud,
            hypervisor=vm.hypervisor,
        )
    conns = c.build(rng)
    story = CloudStory(seed, start, dt.datetime.fromtimestamp(t_end, UTC), vms, conns)
    story.truth = {
        "seed": seed,
        "window": {"start": iso(t_start), "end": iso(t_end)},
        "incidents": incidents,
        "brute_force_tries": {
            k: [iso(t) for t in v] for k, v in brute_tries.items() if k in BRUTE_VICTIMS_INTERNAL
        },
        "ordinary_addrs": sorted(vm.addr for vm in vms if vm.addr not in planted)
        + sorted(vm.addr6 for vm in vms if vm.addr6 and vm.addr not in planted),
        "infrastructure": {"resolver": RESOLVER, "ntp": NTP_SERVER, "storage": STORAGE, "bastion": BASTION},
        "floating_ip": {
            "floating": FLOATING_IP,
            "fixed": FLOATING_FIXED,
            "vm_name": by_addr[FLOATING_FIXED].name,
        },
        "vms": [asdict(vm) for vm in vms],
        "connections": len(conns["t0"]),
    }
    return story


# ---- packets ------------------------------------------------------------------------------------------------

_PCAP_REC = [("ts_sec", "<u4"), ("ts_usec", "<u4"), ("caplen", "<u4"), ("wirelen", "<u4")]
_ETH = [("eth_dst", "V6"), ("eth_src", "V6"), ("ethertype", ">u2")]
_IP4 = [
    ("ver_ihl", "u1"),
    ("tos", "u1"),
    ("ip_len", ">u2"),
    ("ident", ">u2"),
    ("frag", ">u2"),
    ("ttl", "u1"),
    ("ip_proto", "u1"),
    ("ip_sum", ">u2"),
    ("src4", ">u4"),
    ("dst4", ">u4"),
]
_IP6 = [
    ("ver_flow", ">u4"),
    ("pay_len", ">u2"),
    ("next_hdr", "u1"),
    ("hop", "u1"),
    ("src6", "V16"),
    ("dst6", "V16"),
]
_TCP = [
    ("sport", ">u2"),
    ("dport", ">u2"),
    ("seq", ">u4"),
    ("ack", ">u4"),
    ("off", "u1"),
    ("flags", "u1"),
    ("win", ">u2"),
    ("l4_sum", ">u2"),
    ("urg", ">u2"),
]
_UDP = [("sport", ">u2"), ("dport", ">u2"), ("udp_len", ">u2"), ("l4_sum", ">u2")]
_LAYOUTS = {
    (4, 6): np.dtype(_PCAP_REC + _ETH + _IP4 + _TCP),
    (4, 17): np.dtype(_PCAP_REC + _ETH + _IP4 + _UDP),
    (6, 6): np.dtype(_PCAP_REC + _ETH + _IP6 + _TCP),
    (6, 17): np.dtype(_PCAP_REC + _ETH + _IP6 + _UDP),
}
_MAC_A = np.frombuffer(bytes.fromhex("fa163e000001"), "V6")[0]
_MAC_B = np.frombuffer(bytes.fromhex("fa163e000002"), "V6")[0]


def _expand_packets(conns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row per packet: both directions of every connection, with flags, lengths and times."""
    n_f, n_r = conns["pk_f"], conns["pk_r"]
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("conn", "rev", "k", "n")}
    for rev, counts in ((0, n_f), (1, n_r)):
        idx = np.repeat(np.arange(len(counts)), counts)
        k = np.arange(len(idx)) - np.repeat(np.cumsum(counts) - counts, counts)
        cols["conn"].append(idx)
        cols["rev"].append(np.full(len(idx), rev, np.int8))
        cols["k"].append(k)
        cols["n"].append(counts[idx])
    conn = np.concatenate(cols["conn"])
    rev = np.concatenate(cols["rev"]).astype(bool)
    k = np.concatenate(cols["k"])
    n = np.concatenate(cols["n"])
    kind = conns["kind"][conn]
    dur = conns["dur"][conn]
    rtt = np.minimum(0.004, dur / 4 + 1e-4)
    frac = np.where(n > 1, k / np.maximum(n - 1, 1), 0.0)
    ts = conns["t0"][conn] + np.where(rev, rtt + frac * np.maximum(dur - rtt, 0), frac * dur)
    ts = np.where(rev & (kind == TCP_FULL) & (k == n - 1), conns["t0"][conn] + dur + rtt, ts)
    first, last = k == 0, k == n - 1
    flags = PACKET_FLAGS[kind, rev.astype(np.int64), np.where(first, 0, np.where(last, 2, 1))]
    total = np.where(rev, conns["by_r"][conn], conns["by_f"][conn])
    # TCP: payload only in the middle packets (SYN/SYN-ACK/FIN carry none); UDP: all packets carry it
    carriers = np.where(kind == UDP, n, np.maximum(n - 2, 1))
    carries = (kind == UDP) | ((kind == TCP_FULL) & ~first & (~last | (n <= 2)))
    payload = np.where(carries, total // carriers, 0)
    return dict(conn=conn, rev=rev, ts=ts, flags=flags.astype(np.uint8), payload=payload.astype(np.int64))


def _addr_bytes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique address text -> (version, 4-byte int, 16 bytes) per row, via ipaddress on unique values only."""
    uniq, inverse = np.unique(values.astype(str), return_inverse=True)
    parsed = [ipaddress.ip_address(a) for a in uniq]
    version = np.array([p.version for p in parsed], np.int8)[inverse]
    as4 = np.array([int(p) if p.version == 4 else 0 for p in parsed], np.uint32)[inverse]
    as16 = np.frombuffer(b"".join(p.packed.rjust(16, b"\0") for p in parsed), "V16")[inverse]
    return version, as4, as16


def _ip4_checksum(rec: np.ndarray) -> np.ndarray:
    raw = rec.view(np.uint8).reshape(len(rec), rec.dtype.itemsize)[:, 30:50]
    words = raw[:, 0::2].astype(np.uint32) << 8 | raw[:, 1::2]
    total = words.sum(axis=1)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF).astype(np.uint16)


def probe_conns(story: CloudStory, probe: str) -> np.ndarray:
    """Which connections a probe sees: "openstack" (everything but the OpenNebula site's 10.40.0.0/16, exported
    as NetFlow v9), "opennebula" (that site's own probe, exported as IPFIX) or "all"."""
    src, dst = story.conns["src"].astype(str), story.conns["dst"].astype(str)
    one = np.char.startswith(src, ONE_PREFIX) | np.char.startswith(dst, ONE_PREFIX)
    return {"openstack": ~one, "opennebula": one, "all": np.ones(len(one), bool)}[probe]


def packet_bytes(story: CloudStory, probe: str = "all") -> bytes:
    """The capture a probe sees (pcap, microsecond, Ethernet), packets in time order, headers only
    (snap-truncated)."""
    keep = probe_conns(story, probe)
    conns = {k: v[keep] for k, v in story.conns.items()}
    pk = _expand_packets(conns)
    conn, rev = pk["conn"], pk["rev"]
    s_ver, s4, s16 = _addr_bytes(conns["src"])
    _d_ver, d4, d16 = _addr_bytes(conns["dst"])
    version = s_ver[conn]
    proto = conns["proto"][conn]
    ts = pk["ts"]
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for (ver, pr), dtype in _LAYOUTS.items():
        sel = np.nonzero((version == ver) & (proto == pr))[0]
        if len(sel) == 0:
            continue
        c, r = conn[sel], rev[sel]
        rec = np.zeros(len(sel), dtype)
        l4 = 20 if pr == 6 else 8
        ip_hdr = 20 if ver == 4 else 40
        ip_len = np.minimum(ip_hdr + l4 + pk["payload"][sel], 65535)
        sec = np.floor(ts[sel])
        rec["ts_sec"] = sec.astype(np.uint32)
        rec["ts_usec"] = np.minimum(((ts[sel] - sec) * 1e6).round(), 999_999).astype(np.uint32)
        rec["caplen"] = dtype.itemsize - 16
        rec["wirelen"] = 14 + ip_len
        rec["eth_dst"] = np.where(r, _MAC_A, _MAC_B)
        rec["eth_src"] = np.where(r, _MAC_B, _MAC_A)
        sport, dport = conns["sport"][c], conns["dport"][c]
        rec["sport"] = np.where(r, dport, sport)
        rec["dport"] = np.where(r, sport, dport)
        if ver == 4:
            rec["ethertype"] = 0x0800
            rec["ver_ihl"], rec["ttl"], rec["ip_proto"], rec["frag"] = 0x45, 64, pr, 0x4000
            rec["ip_len"] = ip_len
            rec["ident"] = (sel * 2654435761) & 0xFFFF
            rec["src4"] = np.where(r, d4[c], s4[c])
            rec["dst4"] = np.where(r, s4[c], d4[c])
            rec["ip_sum"] = _ip4_checksum(rec)
        else:
            rec["ethertype"] = 0x86DD
            rec["ver_flow"], rec["next_hdr"], rec["hop"] = 6 << 28, pr, 64
            rec["pay_len"] = ip_len - 40
            rec["src6"] = np.where(r, d16[c], s16[c])
            rec["dst6"] = np.where(r, s16[c], d16[c])
        if pr == 6:
            rec["flags"], rec["off"], rec["win"] = pk["flags"][sel], 0x50, 64240
            rec["seq"] = (c * 7919 + 1000) & 0xFFFFFFFF
        else:
            rec["udp_len"] = ip_len - ip_hdr
        parts.append((sel, rec.view(np.uint8).reshape(len(sel), dtype.itemsize)))
    order = np.argsort(ts, kind="stable")
    sizes = np.zeros(len(ts), np.int64)
    for sel, rows in parts:
        sizes[sel] = rows.shape[1]
    offsets = np.empty(len(ts), np.int64)
    offsets[order] = np.cumsum(sizes[order]) - sizes[order]
    out = np.empty(int(sizes.sum()), np.uint8)
    for sel, rows in parts:
        out[offsets[sel][:, None] + np.arange(rows.shape[1])] = rows
    header = np.array(
        [(0xA1B2C3D4, 2, 4, 0, 0, 128, 1)],
        dtype=[
            ("m", "<u4"),
            ("ma", "<u2"),
            ("mi", "<u2"),
            ("z", "<i4"),
            ("s", "<u4"),
            ("snap", "<u4"),
            ("link", "<u4"),
        ],
    )
    return header.tobytes() + out.tobytes()


def write_traffic_pcap(story: CloudStory, path: Path, probe: str = "all") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(packet_bytes(story, probe))
    return path


# ---- the real probe -----------------------------------------------------------------------------------------


def export_netflow(traffic_pcap: Path, version: int, out_pcap: Path) -> Path:
    """Run the real softflowd over `traffic_pcap` (NetFlow `version` 9, or 10 = IPFIX) exporting to 127.0.0.1,
    and record the export datagrams with the real tcpdump into `out_pcap`.

    softflowd -r sends its whole export in one burst: tcpdump needs a large kernel buffer (-B) or it drops most
    of it ("packets dropped by kernel"), so tcpdump is started here rather than through probes.capture_udp.
    """
    from support import probes

    out_pcap = Path(out_pcap)
    out_pcap.unlink(missing_ok=True)
    out_pcap.parent.mkdir(parents=True, exist_ok=True)
    port = probes.free_udp_port()
    log = out_pcap.with_name(out_pcap.name + ".tcpdump.log")
    cmd = [tool_path("tcpdump"), "-i", "lo", "-U", "-n", "-B", "65536", "-w", str(out_pcap)]
    if os.geteuid() == 0:
        cmd += ["-Z", "root"]
    cmd.append(f"udp and dst host 127.0.0.1 and dst port {port}")
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while "listening on" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise EnvironmentProblem(f"tcpdump did not start: {log.read_text(errors='replace')}")
            time.sleep(0.05)
        result = probes.softflowd_export(Path(traffic_pcap), version, (probes.LOOPBACK_V4, port))
        deadline = time.monotonic() + 15
        while probes.count_pcap_packets(out_pcap) < result.datagrams and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        probes.stop_process(proc, signal.SIGINT)
    got = probes.count_pcap_packets(out_pcap)
    if got < result.datagrams:
        raise EnvironmentProblem(
            f"tcpdump recorded {got} of {result.datagrams} export datagrams "
            f"({log.read_text(errors='replace').strip()}); retry on a quieter machine"
        )
    log.unlink(missing_ok=True)
    return out_pcap


# ---- cloud records in the real formats ----------------------------------------------------------------------


def _stamp(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")


def _z(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _det_uuid(*parts: object) -> str:
    return str(uuid.UUID(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32], version=4))


def nova_notifications(story: CloudStory, templates: Path) -> list[str]:
    """Nova versioned notifications (oslo envelope, one JSON per line) for every OpenStack VM of the story,
    built from Nova's own samples with ids, names, hosts, owners, addresses and times changed."""
    samples = {p.stem: json.loads(p.read_text()) for p in Path(templates).glob("instance-*.json")}
    t0 = story.start
    events: list[tuple[dt.datetime, str, VM, dict[str, Any]]] = []
    openstack = [vm for vm in story.vms if vm.cloud == "openstack"]
    for i, vm in enumerate(openstack):
        created = t0 - dt.timedelta(hours=2) + dt.timedelta(minutes=3 * i)
        events.append((created, "instance-create-start", vm, {"addrs": False}))
        events.append((created + dt.timedelta(seconds=40), "instance-create-end", vm, {}))
        if vm.name == "db-01":  # a maintenance reboot inside the window
            events.append((t0 + dt.timedelta(minutes=35), "instance-reboot-end", vm, {}))
        if vm.name.startswith("dataproc-1"):  # a batch VM stopped and started again
            events.append((t0 + dt.timedelta(minutes=200), "instance-power_off-end", vm, {}))
            events.append((t0 + dt.timedelta(minutes=215), "instance-power_on-end", vm, {}))
    by_name = {vm.name: vm for vm in openstack}
    exfil, scanner = by_name["dataproc-04"], by_name["jupyter-07"]
    soft = t0 + dt.timedelta(minutes=225)
    events += [
        (soft, "instance-soft_delete-start", exfil, {}),
        (soft + dt.timedelta(seconds=2), "instance-soft_delete-end", exfil, {}),
    ]
    s_soft = t0 + dt.timedelta(minutes=230)
    s_del = t0 + dt.timedelta(minutes=260)
    events += [
        (s_soft, "instance-soft_delete-start", scanner, {}),
        (s_soft + dt.timedelta(seconds=2), "instance-soft_delete-end", scanner, {}),
        (s_del, "instance-delete-start", scanner, {"state": "soft-delete", "deleted_at": s_soft}),
        (s_del + dt.timedelta(seconds=3), "instance-delete-end", scanner, {"deleted_at": s_del}),
    ]
    # the scanner's address goes to a new VM of another project after the reclaim (jupyter-31)
    reuse = VM(
        _det_uuid(story.seed, "jupyter-31"),
        "jupyter-31",
        "astro-survey",
        "lchen",
        "openstack",
        "compute-2",
        SCAN_SRC,
        None,
        "jupyter",
        "fa:16:3e:5a:11:0b",
        _det_uuid(story.seed, "port-j11"),
    )
    r_at = t0 + dt.timedelta(minutes=280)
    events += [
        (r_at, "instance-create-start", reuse, {"addrs": False}),
        (r_at + dt.timedelta(seconds=40), "instance-create-end", reuse, {}),
    ]
    events.sort(key=lambda e: (e[0], e[2].name))
    created_at = {}
    lines = []
    for when, sample, vm, opts in events:
        msg = copy.deepcopy(samples[sample])
        data = msg["payload"]["nova_object.data"]
        created_at.setdefault(vm.vm_id, when)
        data.update(
            uuid=vm.vm_id,
            display_name=vm.name,
            display_description=vm.name,
            host_name=vm.name,
            tenant_id=vm.project,
            user_id=vm.user,
            action_initiator_user=vm.user,
            action_initiator_project=vm.project,
            created_at=_z(created_at[vm.vm_id]),
            updated_at=_z(when),
            request_id="req-" + _det_uuid(vm.vm_id, sample, when),
        )
        if data.get("host") is not None:
            data["host"] = vm.hypervisor
            data["node"] = vm.hypervisor
        if data.get("launched_at") is not None:
            data["launched_at"] = _z(created_at[vm.vm_id] + dt.timedelta(seconds=40))
        if "instance_name" in data:
            data["instance_name"] = "instance-" + hashlib.sha256(vm.vm_id.encode()).hexdigest()[:8]
        if "keypairs" in data:
            for kp in data["keypairs"]:
                kp["nova_object.data"]["user_id"] = vm.user
        if data.get("deleted_at") is not None:
            data["deleted_at"] = _z(opts.get("deleted_at", when))
        if data.get("terminated_at") is not None:
            data["terminated_at"] = _z(when)
        if "state" in opts:
            data["state"] = opts["state"]
        if data["ip_addresses"]:
            template = data["ip_addresses"][0]
            addrs = [(vm.addr, 4)] + ([(vm.addr6, 6)] if vm.addr6 else [])
            data["ip_addresses"] = []
            for addr, version in addrs:
                ip = copy.deepcopy(template)
                ip["nova_object.data"].update(
                    address=addr,
                    version=version,
                    mac=vm.mac,
                    port_uuid=vm.port_id,
                    label="tenant-net",
                    device_name="tap" + vm.port_id[:11],
                )
                data["ip_addresses"].append(ip)
        message = {
            "message_id": _det_uuid(vm.vm_id, sample, when),
            "publisher_id": f"nova-compute:{vm.hypervisor}",
            "event_type": msg["event_type"],
            "priority": msg.get("priority", "INFO"),
            "payload": msg["payload"],
            "timestamp": _stamp(when),
        }
        lines.append(json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(message)}))
    return lines


def neutron_notifications(story: CloudStory, templates: Path) -> list[str]:
    """Neutron floating IP events (one JSON per line): web-01's floating IP associated before the window."""
    sample = json.loads((Path(templates) / "floatingip.update.end_associate.json").read_text())
    vm = next(v for v in story.vms if v.addr == FLOATING_FIXED)
    when = story.start - dt.timedelta(minutes=90)
    msg = copy.deepcopy(sample)
    fip = msg["payload"]["floatingip"]
    fip.update(
        tenant_id=vm.project,
        fixed_ip_address=vm.addr,
        floating_ip_address=FLOATING_IP,
        port_id=vm.port_id,
        id=_det_uuid(story.seed, "fip"),
        router_id=_det_uuid(story.seed, "router"),
        floating_network_id=_det_uuid(story.seed, "ext-net"),
    )
    msg.update(
        message_id=_det_uuid(story.seed, "fip-assoc"),
        timestamp=_stamp(when),
        _context_timestamp=_stamp(when - dt.timedelta(milliseconds=50)),
        _context_tenant_id=vm.project,
        _context_user_id=vm.user,
        publisher_id="network.net-01.cloud.example",
    )
    return [json.dumps(msg)]


def opennebula_records(story: CloudStory) -> dict[str, str]:
    """The OpenNebula VM's log (/var/log/one/42.log) and its XML (`onevm show -x 42`)."""
    vm = next(v for v in story.vms if v.cloud == "opennebula")
    t = story.start - dt.timedelta(hours=1)

    def line(when: dt.datetime, module: str, level: str, text: str) -> str:
        return f"{when.strftime('%a %b %d %H:%M:%S %Y')} [Z0][{module}][{level}]: {text}"

    seq = [
        (0, "VM", "I", "New state is ACTIVE"),
        (0, "VM", "I", "New LCM state is PROLOG"),
        (14, "VM", "I", "New LCM state is BOOT"),
        (15, "VMM", "I", f"Generating deployment file: /var/lib/one/vms/{vm.vm_id}/deployment.0"),
        (17, "VMM", "I", "ExitCode: 0"),
        (17, "VMM", "I", "Successfully execute virtualization driver operation: deploy."),
        (18, "VM", "I", "New LCM state is RUNNING"),
    ]
    log = [line(t + dt.timedelta(seconds=s), m, lv, txt) for s, m, lv, txt in seq]
    stime = int((t + dt.timedelta(seconds=14)).timestamp())
    xml = f"""<VM>
  <ID>{vm.vm_id}</ID>
  <UID>7</UID>
  <GID>104</GID>
  <UNAME>{vm.user}</UNAME>
  <GNAME>{vm.project}</GNAME>
  <NAME>{vm.name}</NAME>
  <STATE>3</STATE>
  <LCM_STATE>3</LCM_STATE>
  <STIME>{int(t.timestamp())}</STIME>
  <ETIME>0</ETIME>
  <DEPLOY_ID>one-{vm.vm_id}</DEPLOY_ID>
  <TEMPLATE>
    <CPU><![CDATA[4]]></CPU>
    <MEMORY><![CDATA[8192]]></MEMORY>
    <DISK>
      <CLONE><![CDATA[YES]]></CLONE>
      <DATASTORE><![CDATA[default]]></DATASTORE>
      <DATASTORE_ID><![CDATA[1]]></DATASTORE_ID>
      <DEV_PREFIX><![CDATA[vd]]></DEV_PREFIX>
      <DISK_ID><![CDATA[0]]></DISK_ID>
      <IMAGE><![CDATA[alma9-render]]></IMAGE>
      <IMAGE_ID><![CDATA[17]]></IMAGE_ID>
      <IMAGE_UNAME><![CDATA[oneadmin]]></IMAGE_UNAME>
      <SOURCE><![CDATA[/var/lib/one//datastores/1/5f2c0e2b9d7d4a1e8c6b3f0a9e4d2c71]]></SOURCE>
      <TARGET><![CDATA[vda]]></TARGET>
      <TYPE><![CDATA[FILE]]></TYPE>
    </DISK>
    <NIC>
      <BRIDGE><![CDATA[br0]]></BRIDGE>
      <IP><![CDATA[{vm.addr}]]></IP>
      <MAC><![CDATA[{vm.mac}]]></MAC>
      <NETWORK><![CDATA[render-net]]></NETWORK>
      <NETWORK_ID><![CDATA[3]]></NETWORK_ID>
      <NIC_ID><![CDATA[0]]></NIC_ID>
    </NIC>
    <VMID><![CDATA[{vm.vm_id}]]></VMID>
  </TEMPLATE>
  <HISTORY_RECORDS>
    <HISTORY>
      <OID>{vm.vm_id}</OID>
      <SEQ>0</SEQ>
      <HOSTNAME>{vm.hypervisor}</HOSTNAME>
      <HID>3</HID>
      <STIME>{stime}</STIME>
      <ETIME>0</ETIME>
      <ACTION>0</ACTION>
    </HISTORY>
  </HISTORY_RECORDS>
</VM>
"""
    return {f"{vm.vm_id}.log": "\n".join(log) + "\n", f"{vm.vm_id}.xml": xml}


def _rfc3164(t: dt.datetime) -> str:
    return f"{t:%b} {t.day:2d} {t:%H:%M:%S}"  # RFC 3164 §4.1.2: day space-padded, no year


def syslog_files(story: CloudStory) -> dict[str, str]:
    """rsyslog files (RFC 3164 traditional format) from inside the two brute-forced VMs: one sshd line per try."""
    rng = np.random.default_rng(story.seed + 1)
    users = ["root", "admin", "ubuntu", "test", "oracle", "postgres", "git", "user"]
    by_addr = {vm.addr: vm for vm in story.vms}
    files = {}
    for victim, tries in story.truth["brute_force_tries"].items():
        vm = by_addr[victim]
        lines = []
        pid = int(rng.integers(2000, 30000))
        t_ok = story.start + dt.timedelta(minutes=20)
        lines.append(
            (
                t_ok,
                f"{_rfc3164(t_ok)} {vm.name} sshd[{pid}]: Accepted publickey for {vm.user} from {BASTION} port 50122 ssh2: "
                "ED25519 SHA256:Qm9vdHN0cmFwIGtleSBmb3IgdHJhY2VwaXBl",
            )
        )
        for k, iso_t in enumerate(tries):
            when = dt.datetime.fromisoformat(iso_t.replace("Z", "+00:00")) + dt.timedelta(seconds=1)
            user = users[int(rng.integers(0, len(users)))]
            port = 40000 + int(rng.integers(0, 20000))
            stamp = _rfc3164(when)
            pid = int(rng.integers(2000, 30000))
            if user == "root":
                text = f"Failed password for root from {BRUTE_SRC} port {port} ssh2"
            else:
                lines.append(
                    (when, f"{stamp} {vm.name} sshd[{pid}]: Invalid user {user} from {BRUTE_SRC} port {port}")
                )
                text = f"Failed password for invalid user {user} from {BRUTE_SRC} port {port} ssh2"
            lines.append((when, f"{stamp} {vm.name} sshd[{pid}]: {text}"))
            if k % 6 == 5:
                lines.append(
                    (
                        when,
                        f"{stamp} {vm.name} sshd[{pid}]: Disconnecting invalid user {user} {BRUTE_SRC} "
                        f"port {port}: Too many authentication failures [preauth]",
                    )
                )
        cron = story.start + dt.timedelta(minutes=17)
        lines.append(
            (
                cron,
                f"{_rfc3164(cron)} {vm.name} CRON[{pid + 1}]: (root) CMD (   cd / && run-parts --report /etc/cron.hourly)",
            )
        )
        lines.sort(key=lambda x: x[0])
        files[f"{vm.name}.log"] = "\n".join(text for _, text in lines) + "\n"
    return files


def misp_csv(story: CloudStory) -> str:
    """A MISP attribute CSV export (the columns MISP's CSV export writes) with the beacon's C2 address."""
    header = (
        "uuid,event_id,category,type,value,comment,to_ids,date,object_relation,attribute_tag,object_uuid,"
        "object_name,object_meta_category"
    )
    rows = [
        (
            BEACON_DST,
            "ip-dst",
            "Network activity",
            "C2 of a Cobalt Strike-like implant (HTTPS beacon)",
            "tlp:amber",
        ),
        ("192.0.2.0/28", "ip-dst", "Network activity", "hosting range used by the same actor", "tlp:amber"),
        ("203.0.113.250", "ip-src", "Network activity", "SSH scanner seen at partner sites", "tlp:green"),
        ("evil-updates.example", "domain", "Network activity", "phishing landing page", "tlp:green"),
    ]
    day = (story.start - dt.timedelta(days=2)).strftime("%Y%m%d")
    out = [header]
    for i, (value, kind, category, comment, tag) in enumerate(rows):
        out.append(
            ",".join(
                [
                    _det_uuid(story.seed, "misp", i),
                    "1842",
                    category,
                    kind,
                    value,
                    f'"{comment}"',
                    "1",
                    day,
                    "",
                    tag,
                    "",
                    "",
                    "",
                ]
            )
        )
    return "\n".join(out) + "\n"


# ---- the flow story: days of flow records, one planted incident per detector ---------------------------------
LOCAL_NETWORKS = ["10.10.0.0/16", "2001:db8:10::/48"]
# infrastructure of the flow story (its own /16: the two stories never share addresses)
FLOW_RESOLVER, FLOW_METRICS, FLOW_BASTION, FLOW_STORAGE = "10.10.0.2", "10.10.0.5", "10.10.0.9", "10.10.0.20"
HOUR = 3_600_000_000  # microseconds


@dataclass
class Planted:
    detector: str
    addr: str
    vm_id: str
    vm_name: str
    peer: str | None = None


@dataclass
class FlowStory:
    flows: pa.Table
    leases: pa.Table
    planted: list[Planted]
    hosts: list[str]  # every VM address (ordinary and planted)
    start: dt.datetime
    days: int
    intel_lines: str
    extra: dict = field(default_factory=dict)

    @property
    def last_day(self) -> tuple[dt.datetime, dt.datetime]:
        day = self.start + dt.timedelta(days=self.days - 1)
        return day, day + dt.timedelta(days=1)

    def ordinary(self) -> set[str]:
        return set(self.hosts) - {p.addr for p in self.planted}


class _Flows:
    """Column buffers; `session` adds a request and (optionally) its response, vectorised over n flows."""

    def __init__(self, addr_pool: list[str]) -> None:
        self.pool = list(dict.fromkeys(addr_pool))
        self.index = {a: i for i, a in enumerate(self.pool)}
        self.cols: dict[str, list[np.ndarray]] = {
            k: [] for k in ("ts", "dur", "src", "dst", "sport", "dport", "proto", "packets", "bytes", "flags")
        }

    def idx(self, addrs) -> np.ndarray:
        if isinstance(addrs, str):
            addrs = [addrs]
        out = []
        for a in addrs:
            if a not in self.index:
                self.index[a] = len(self.pool)
                self.pool.append(a)
            out.append(self.index[a])
        return np.asarray(out, dtype=np.int32)

    def add(self, ts, dur, src, dst, sport, dport, proto, packets, nbytes, flags) -> None:
        n = len(ts)
        if n == 0:
            return

        self.cols["ts"].append(np.asarray(ts, dtype=np.int64))
        self.cols["dur"].append(_column(dur, n, np.int64))
        self.cols["src"].append(_column(src, n, np.int32))
        self.cols["dst"].append(_column(dst, n, np.int32))
        self.cols["sport"].append(_column(sport, n, np.int32))
        self.cols["dport"].append(_column(dport, n, np.int32))
        self.cols["proto"].append(_column(proto, n, np.int16))
        self.cols["packets"].append(np.maximum(_column(packets, n, np.int64), 1))
        self.cols["bytes"].append(np.maximum(_column(nbytes, n, np.int64), 40))
        self.cols["flags"].append(_column(flags, n, np.int16))

    def session(
        self,
        rng,
        ts,
        dur,
        src,
        dst,
        dport,
        proto,
        req_bytes,
        resp_bytes,
        kind=None,
    ) -> None:
        """n conversations of `kind` (scalar or per flow; default TCP_FULL for TCP, UDP else): the opener's
        flow and, where the kind is answered, the answer's, flagged from FLOW_FLAGS."""
        n = len(ts)
        kind = _column(kind if kind is not None else (TCP_FULL if proto == 6 else UDP), n, np.int64)
        sport = rng.integers(32768, 60999, n)
        req_packets = np.maximum(np.asarray(req_bytes) // 500, 1)
        self.add(ts, dur, src, dst, sport, dport, proto, req_packets, req_bytes, FLOW_FLAGS[kind, 0])
        keep = ANSWERED[kind]
        if keep.any():
            rb = np.broadcast_to(np.asarray(resp_bytes), (n,))[keep]
            self.add(
                np.asarray(ts)[keep] + 500,
                np.broadcast_to(np.asarray(dur), (n,))[keep],
                np.broadcast_to(np.asarray(dst), (n,))[keep],
                np.broadcast_to(np.asarray(src), (n,))[keep],
                np.broadcast_to(np.asarray(dport), (n,))[keep],
                sport[keep],
                proto,
                np.maximum(rb // 1200, 1),
                rb,
                FLOW_FLAGS[kind[keep], 1],
            )

    def table(self, exporter: str = "10.10.0.1") -> pa.Table:
        c = {k: np.concatenate(v) for k, v in self.cols.items()}
        order = np.argsort(c["ts"], kind="stable")
        c = {k: v[order] for k, v in c.items()}
        pool = pa.array(self.pool, pa.string())
        src = pa.DictionaryArray.from_arrays(pa.array(c["src"]), pool).cast(pa.string())
        dst = pa.DictionaryArray.from_arrays(pa.array(c["dst"]), pool).cast(pa.string())
        is_v6 = np.array([":" in a for a in self.pool])[c["src"]]
        n = len(order)
        ts = pa.array(c["ts"], pa.timestamp("us", tz="UTC"))
        return pa.table(
            {
                "ts_start": ts,
                "ts_end": pa.array(c["ts"] + c["dur"], pa.timestamp("us", tz="UTC")),
                "src_addr": src,
                "dst_addr": dst,
                "src_port": c["sport"],
                "dst_port": c["dport"],
                "proto": c["proto"],
                "packets": c["packets"],
                "bytes": c["bytes"],
                "tcp_flags": c["flags"],
                "ip_version": np.where(is_v6, 6, 4).astype(np.int8),
                "exporter": pa.array([exporter] * n, pa.string())
                if n < 2_000_000
                else pa.DictionaryArray.from_arrays(
                    pa.array(np.zeros(n, np.int32)), pa.array([exporter])
                ).cast(pa.string()),
                "input_if": np.zeros(n, np.int32),
                "output_if": np.zeros(n, np.int32),
                "sampling_interval": np.ones(n, np.int32),
                "source": pa.DictionaryArray.from_arrays(
                    pa.array(np.zeros(n, np.int32)), pa.array(["flowgen"])
                ).cast(pa.string()),
            },
            schema=pa.schema(
                [f for f in FLOWS if f.name not in ("src_vm", "dst_vm", "attributed_at", *TUNNEL_COLUMNS)]
            ),
        )


def _ext_pool(rng, n: int, first: tuple[int, ...]) -> list[str]:
    a = rng.choice(first, n)
    return [
        f"{x}.{y}.{z}.{w}"
        for x, y, z, w in zip(
            a, rng.integers(0, 256, n), rng.integers(0, 256, n), rng.integers(1, 255, n), strict=True
        )
    ]


def _hourly_arrivals(
    rng, n_hosts: int, hours: int, t0: int, rate_day: float, rate_night: float, hour_of_day0: int = 0
):
    """Per (host, hour) Poisson counts with a day/night rhythm -> (host index, ts in us) arrays."""
    hod = (np.arange(hours) + hour_of_day0) % 24
    rate = np.where((hod >= 7) & (hod < 20), rate_day, rate_night)
    counts = rng.poisson(np.broadcast_to(rate, (n_hosts, hours)))
    host = np.repeat(np.repeat(np.arange(n_hosts), hours), counts.ravel())
    hour = np.repeat(np.tile(np.arange(hours), n_hosts), counts.ravel())
    ts = t0 + hour.astype(np.int64) * HOUR + rng.integers(0, HOUR, len(host))
    return host, ts


def generate(
    seed: int = 1,
    n_hosts: int = 40,
    days: int = 3,
    start: dt.datetime | None = None,
    rate: float = 1.0,
    planted: bool = True,
    v6_hosts: int = 4,
) -> FlowStory:
    """A story of `days` days for `n_hosts` VMs; incidents planted on the last day (if `planted`).
    `rate` scales every ordinary host's activity (benchmarks use it to reach tens of millions of flows)."""
    rng = np.random.default_rng(seed)
    start = start or dt.datetime(2026, 3, 9, tzinfo=dt.UTC)
    t0 = int(start.timestamp() * 1_000_000)
    hours = 24 * days
    hosts = [f"10.10.{1 + i // 200}.{10 + i % 200}" for i in range(n_hosts - v6_hosts)]
    hosts += [f"2001:db8:10::{0x100 + i:x}" for i in range(v6_hosts)]
    web = _ext_pool(rng, 400, (93, 104, 151, 172, 185))
    tail = _ext_pool(rng, 5000, (23, 34, 52, 99, 142))
    ntp = ["129.6.15.28", "132.163.97.1", "162.159.200.123"]
    forge = "140.82.121.3"
    partner = "192.0.2.50"
    f = _Flows([FLOW_RESOLVER, FLOW_METRICS, FLOW_BASTION, FLOW_STORAGE, *hosts, *web, *ntp, forge, partner])
    H = f.idx(hosts)
    web_i, tail_i = f.idx(web), f.idx(tail)
    favourites = rng.integers(0, len(web), (n_hosts, 15))

    # DNS to the local resolver
    h, ts = _hourly_arrivals(rng, n_hosts, hours, t0, 30 * rate, 8 * rate)
    f.session(
        rng,
        ts,
        2000,
        H[h],
        f.idx(FLOW_RESOLVER),
        53,
        17,
        rng.integers(60, 90, len(h)),
        rng.integers(90, 400, len(h)),
    )
    # web: mostly the host's favourite sites, sometimes the long tail; a few attempts go unanswered
    h, ts = _hourly_arrivals(rng, n_hosts, hours, t0, 15 * rate, 3 * rate)
    n = len(h)
    dst = np.where(
        rng.random(n) < 0.85,
        web_i[favourites[h, rng.integers(0, 15, n)]],
        tail_i[rng.integers(0, len(tail_i), n)],
    )
    answered = rng.random(n) > 0.02
    f.session(
        rng,
        ts,
        rng.integers(100_000, 30_000_000, n),
        H[h],
        dst,
        np.where(rng.random(n) < 0.9, 443, 80),
        6,
        rng.integers(500, 5000, n),
        np.exp(rng.normal(11, 1.5, n)).astype(np.int64),
        kind=np.where(answered, TCP_FULL, TCP_SYN_ONLY),
    )
    # NTP every 1024 s, metrics push every 300 s (both periodic, both expected)
    for period, dst_addr, port, proto, size in (
        (1024, ntp, 123, 17, 76),
        (300, [FLOW_METRICS], 2003, 6, 900),
    ):
        steps = np.arange(0, hours * 3600 // period)
        phase = rng.integers(0, period, n_hosts)
        hh = np.repeat(np.arange(n_hosts), len(steps))
        ts = t0 + (np.tile(steps, n_hosts) * period + phase[hh]).astype(np.int64) * 1_000_000
        ts += rng.integers(0, 200_000, len(ts))
        d = f.idx(dst_addr)[rng.integers(0, len(dst_addr), len(ts))]
        f.session(rng, ts, 50_000, H[hh], d, port, proto, size + rng.integers(-20, 20, len(ts)), size // 2)
    # SSH: inbound from the bastion to a fifth of the hosts, outbound to a forge from a tenth
    admin = np.flatnonzero(rng.random(n_hosts) < 0.2)
    h, ts = _hourly_arrivals(rng, len(admin), hours, t0, 0.4 * rate, 0.05 * rate)
    f.session(
        rng,
        ts,
        rng.integers(10_000_000, 900_000_000, len(h)),
        f.idx(FLOW_BASTION),
        H[admin[h]],
        22,
        6,
        rng.integers(5_000, 200_000, len(h)),
        rng.integers(5_000, 2_000_000, len(h)),
    )
    devs = np.flatnonzero(rng.random(n_hosts) < 0.1)
    h, ts = _hourly_arrivals(rng, len(devs), hours, t0, 0.8 * rate, 0.1 * rate)
    f.session(
        rng,
        ts,
        rng.integers(1_000_000, 20_000_000, len(h)),
        H[devs[h]],
        f.idx(forge),
        22,
        6,
        rng.integers(3_000, 50_000, len(h)),
        rng.integers(10_000, 5_000_000, len(h)),
    )
    # data movers: big transfers every day, to the partner site or local storage
    movers = np.flatnonzero(rng.random(n_hosts) < 0.1)
    h, ts = _hourly_arrivals(rng, len(movers), hours, t0, 0.5, 0.5)
    n = len(h)
    f.session(
        rng,
        ts,
        rng.integers(60_000_000, 1_800_000_000, n),
        H[movers[h]],
        np.where(rng.random(n) < 0.5, f.idx(partner)[0], f.idx(FLOW_STORAGE)[0]),
        443,
        6,
        rng.integers(2 * 10**8, 3 * 10**9, n),
        rng.integers(10**5, 10**6, n),
    )

    lease_rows = _leases(hosts, start, days)
    story = FlowStory(f.table(), pa.Table.from_pylist([], schema=VM_LEASES), [], hosts, start, days, "")
    if planted:
        _plant(rng, f, story, hosts, movers, devs, admin, t0 + (days - 1) * 24 * HOUR, lease_rows)
        story.flows = f.table()
    story.leases = pa.Table.from_pylist(lease_rows, schema=VM_LEASES)
    return story


def _leases(hosts: list[str], start: dt.datetime, days: int) -> list[dict]:
    rows = []
    for i, addr in enumerate(hosts):
        rows.append(
            {
                "addr": addr,
                "vm_id": f"vm-{i:04d}",
                "vm_name": f"node-{i:03d}",
                "project": f"proj-{i % 7}",
                "user": f"user{i % 13}",
                "hypervisor": f"hv-{i % 5:02d}",
                "cloud": "openstack",
                "addr_kind": "fixed",
                "valid_from": start - dt.timedelta(days=2),
                "valid_to": None,
                "end_reason": None,
                "vm_status": "active",
                "quarantine_until": None,
            }
        )
    return rows


def _plant(
    rng, f: _Flows, story: FlowStory, hosts: list[str], movers, devs, admin, day0: int, leases: list[dict]
) -> None:
    """One incident per detector kind, each on a host that is otherwise ordinary."""
    busy = set(movers.tolist()) | set(devs.tolist()) | set(admin.tolist())
    v4 = [i for i, a in enumerate(hosts) if ":" not in a and i not in busy]
    v6 = [i for i, a in enumerate(hosts) if ":" in a and i not in busy]
    pick = iter(rng.permutation(v4).tolist())
    planted = story.planted

    def host(detector: str, peer: str | None = None, index: int | None = None) -> int:
        i = next(pick) if index is None else index
        planted.append(Planted(detector, hosts[i], f"vm-{i:04d}", f"node-{i:03d}", peer))
        return i

    S = lambda x: int(x * 1_000_000)  # noqa: E731 - seconds -> us
    # horizontal scan: 1,500 addresses on port 22 in 15 minutes, 96% unanswered
    i = host("horizontal_scan")
    n = 1500
    targets = _ext_pool(rng, n, (45, 78, 201))
    ts = day0 + 3 * HOUR + rng.integers(0, S(900), n)
    answered = rng.random(n) < 0.04
    f.session(
        rng,
        ts,
        1_000,
        f.idx(hosts[i]),
        f.idx(targets),
        22,
        6,
        60,
        60,
        kind=np.where(answered, TCP_SYN_ACK_RST, TCP_SYN_ONLY),
    )
    # vertical scan: ports 1..1200 of one external host, most closed (RST|ACK back)
    victim = "203.0.113.77"
    i = host("vertical_scan", victim)
    ports = np.arange(1, 1201)
    ts = day0 + 9 * HOUR + np.sort(rng.integers(0, S(300), len(ports)))
    sport = np.full(len(ports), 40000)
    probe, closed = FLOW_FLAGS[TCP_SYN_RST]
    f.add(ts, 1_000, f.idx(hosts[i]), f.idx(victim), sport, ports, 6, 1, 60, probe)
    f.add(ts + 300, 0, f.idx(victim), f.idx(hosts[i]), ports, sport, 6, 1, 54, closed)
    # SSH brute force, outbound: 400 short logins in an hour
    bf_peer = "198.51.100.23"
    i = host("brute_force", bf_peer)
    ts = day0 + 13 * HOUR + np.sort(rng.integers(0, HOUR, 400))
    f.session(
        rng,
        ts,
        rng.integers(1_500_000, 4_000_000, 400),
        f.idx(hosts[i]),
        f.idx(bf_peer),
        22,
        6,
        rng.integers(2_500, 4_000, 400),
        rng.integers(3_000, 5_000, 400),
    )
    # RDP brute force, inbound from the internet
    rdp_peer = "203.0.113.200"
    i = host("brute_force", rdp_peer)
    ts = day0 + 20 * HOUR + np.sort(rng.integers(0, HOUR, 300))
    f.session(
        rng,
        ts,
        rng.integers(500_000, 2_000_000, 300),
        f.idx(rdp_peer),
        f.idx(hosts[i]),
        3389,
        6,
        rng.integers(1_500, 3_000, 300),
        rng.integers(2_000, 6_000, 300),
    )
    # beacon: every 300 s (+-3 s) all day to one address, ~1.2 kB each
    c2 = "45.77.12.34"
    i = host("beacon", c2)
    steps = np.arange(24 * 12)
    ts = day0 + rng.integers(0, S(300)) + steps * S(300) + rng.integers(-S(3), S(3), len(steps))
    f.session(
        rng,
        ts,
        400_000,
        f.idx(hosts[i]),
        f.idx(c2),
        443,
        6,
        1200 + rng.integers(-20, 20, len(steps)),
        400 + rng.integers(-10, 10, len(steps)),
    )
    # exfiltration: 6 GB in one hour to one address, then the VM is deleted (image in quarantine)
    drop = "185.220.101.5"
    i = host("exfiltration", drop)
    ts = day0 + 14 * HOUR + np.array([S(60), S(1300), S(2500)])
    f.session(rng, ts, S(1000), f.idx(hosts[i]), f.idx(drop), 443, 6, np.array([2, 2, 2]) * 10**9, 50_000)
    leases[i]["valid_to"] = dt.datetime.fromtimestamp((day0 + 20 * HOUR) / 1e6, dt.UTC)
    leases[i]["end_reason"] = "soft_delete"
    leases[i]["vm_status"] = "soft_deleted"
    leases[i]["quarantine_until"] = leases[i]["valid_to"] + dt.timedelta(days=7)
    story.extra["deleted_vm"] = f"vm-{i:04d}"
    # long-lived connection: one TCP connection for 10 h, exported every 30 min (active timeout)
    tunnel = "91.198.174.192"
    i = host("long_connection", tunnel)
    k = 20
    ts = day0 + 1 * HOUR + np.arange(k) * S(1800)
    sport = int(rng.integers(32768, 60999))
    f.add(
        ts,
        S(1799),
        f.idx(hosts[i]),
        f.idx(tunnel),
        sport,
        8443,
        6,
        rng.integers(100, 2000, k),
        rng.integers(20_000, 900_000, k),
        np.where(np.arange(k) == 0, SYN | ACK | PSH, ACK | PSH),
    )
    f.add(
        ts + 100,
        S(1799),
        f.idx(tunnel),
        f.idx(hosts[i]),
        8443,
        sport,
        6,
        rng.integers(100, 2000, k),
        rng.integers(20_000, 900_000, k),
        ACK | PSH,
    )
    # mining: Stratum to a pool on 3333 for 6 h, many small packets
    pool = "162.19.139.184"
    i = host("mining", pool)
    k = 12
    ts = day0 + 15 * HOUR + np.arange(k) * S(1800)
    sport = int(rng.integers(32768, 60999))
    packets = rng.integers(200, 260, k)
    f.add(
        ts,
        S(1799),
        f.idx(hosts[i]),
        f.idx(pool),
        sport,
        3333,
        6,
        packets,
        packets * 110,
        np.where(np.arange(k) == 0, SYN | ACK | PSH, ACK | PSH),
    )
    f.add(ts + 100, S(1799), f.idx(pool), f.idx(hosts[i]), 3333, sport, 6, packets, packets * 180, ACK | PSH)
    # intel: a v4 host talks to an address inside a listed CIDR; a v6 host to a listed v6 address
    bad4, bad6 = "198.18.7.7", "2001:db8:bad::66"
    i = host("intel", bad4)
    ts = day0 + 6 * HOUR + np.sort(rng.integers(0, HOUR, 5))
    f.session(rng, ts, 2_000_000, f.idx(hosts[i]), f.idx(bad4), 443, 6, 3000, 40_000)
    if v6:
        i = host("intel", bad6, index=v6[0])
        ts = day0 + 7 * HOUR + np.sort(rng.integers(0, HOUR, 3))
        f.session(rng, ts, 2_000_000, f.idx(hosts[i]), f.idx(bad6), 443, 6, 2000, 30_000)
    story.intel_lines = "# test indicators\n198.18.7.0/24\n2001:db8:bad::66\n203.0.113.250\n"
    # odd behaviour no rule names: at 02:00, 60 never-seen addresses on unusual ports, all answered
    i = next(pick)
    story.extra["anomaly"] = Planted("anomaly", hosts[i], f"vm-{i:04d}", f"node-{i:03d}")
    n = 80
    targets = _ext_pool(rng, n, (61, 88, 176))
    ts = day0 + 2 * HOUR + rng.integers(0, HOUR, n)
    f.session(
        rng,
        ts,
        rng.integers(1_000_000, 60_000_000, n),
        f.idx(hosts[i]),
        f.idx(targets),
        rng.choice([8080, 8888, 6379, 27017, 9200], n),
        6,
        rng.integers(20_000, 400_000, n),
        rng.integers(1_000, 10_000, n),
    )


def pipeline_text(report_dir: Path, extra: str = "") -> str:
    """A minimal pipeline file for tests: this generator's local networks, JSON report only."""
    return (
        f'[pipeline]\nname = "t"\nlocal_networks = {json.dumps(LOCAL_NETWORKS)}\n'
        f'[output]\nreport_dir = "{report_dir}"\nhtml = false\n{extra}'
    )


def story_lake(root: Path, seed: int = 21, days: int = 2) -> tuple[Lake, FlowStory, Path]:
    """A real lake holding a generated story (flows + leases) and a pipeline file next to it."""
    story = generate(seed=seed, days=days)
    lake = Lake(root / "lake")
    lake.append("flows", story.flows, key="story")
    lake.replace_dataset("vm_leases", story.leases)
    pipeline = root / "t.toml"
    pipeline.write_text(pipeline_text(root / "reports"))
    return lake, story, pipeline
