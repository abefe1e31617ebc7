"""Synthetic flow stories for the detection tests and benchmarks/sweep.py (numpy, vectorised).

Ordinary hosts do DNS (local resolver), web browsing, NTP, periodic metrics pushes to a local collector, SSH
(inbound from a bastion, outbound to a code forge), and some move data to a partner site every day. On the
last day a few hosts do one planted thing each (scan, brute force, beacon, exfiltration, long connection,
mining, intel contact, odd night-time behaviour). Both directions of a conversation are exported as two flow
records, the way softflowd does. Everything is seeded: same seed, same flows.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from tracepipe.lake import Lake
from tracepipe.schema import FLOWS, VM_LEASES

LOCAL_NETWORKS = ["10.10.0.0/16", "2001:db8:10::/48"]
RESOLVER, METRICS, BASTION, STORAGE = "10.10.0.2", "10.10.0.5", "10.10.0.9", "10.10.0.20"
SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08
DONE = SYN | ACK | FIN | PSH
HOUR = 3_600_000_000  # microseconds


@dataclass
class Planted:
    detector: str
    addr: str
    vm_id: str
    vm_name: str
    peer: str | None = None


@dataclass
class Story:
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

        def full(v, dtype):
            v = np.asarray(v)
            return np.broadcast_to(v, (n,)).astype(dtype) if v.ndim == 0 or len(v) == 1 else v.astype(dtype)

        self.cols["ts"].append(np.asarray(ts, dtype=np.int64))
        self.cols["dur"].append(full(dur, np.int64))
        self.cols["src"].append(full(src, np.int32))
        self.cols["dst"].append(full(dst, np.int32))
        self.cols["sport"].append(full(sport, np.int32))
        self.cols["dport"].append(full(dport, np.int32))
        self.cols["proto"].append(full(proto, np.int16))
        self.cols["packets"].append(np.maximum(full(packets, np.int64), 1))
        self.cols["bytes"].append(np.maximum(full(nbytes, np.int64), 40))
        self.cols["flags"].append(full(flags, np.int16))

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
        flags=DONE,
        resp_flags=None,
        answered=None,
    ) -> None:
        n = len(ts)
        sport = rng.integers(32768, 60999, n)
        req_packets = np.maximum(np.asarray(req_bytes) // 500, 1)
        self.add(ts, dur, src, dst, sport, dport, proto, req_packets, req_bytes, flags if proto == 6 else 0)
        keep = np.ones(n, bool) if answered is None else answered
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
                (resp_flags if resp_flags is not None else flags) if proto == 6 else 0,
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
            schema=pa.schema([f for f in FLOWS if f.name not in ("src_vm", "dst_vm")]),
        )


def _ext_pool(rng, n: int, first: tuple[int, ...]) -> list[str]:
    a = rng.choice(first, n)
    return [
        f"{x}.{y}.{z}.{w}"
        for x, y, z, w in zip(
            a, rng.integers(0, 256, n), rng.integers(0, 256, n), rng.integers(1, 255, n), strict=True
        )
    ]


def _poisson_times(
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
) -> Story:
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
    f = _Flows([RESOLVER, METRICS, BASTION, STORAGE, *hosts, *web, *ntp, forge, partner])
    H = f.idx(hosts)
    web_i, tail_i = f.idx(web), f.idx(tail)
    favourites = rng.integers(0, len(web), (n_hosts, 15))

    # DNS to the local resolver
    h, ts = _poisson_times(rng, n_hosts, hours, t0, 30 * rate, 8 * rate)
    f.session(
        rng,
        ts,
        2000,
        H[h],
        f.idx(RESOLVER),
        53,
        17,
        rng.integers(60, 90, len(h)),
        rng.integers(90, 400, len(h)),
    )
    # web: mostly the host's favourite sites, sometimes the long tail; a few attempts go unanswered
    h, ts = _poisson_times(rng, n_hosts, hours, t0, 15 * rate, 3 * rate)
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
        flags=np.where(answered, DONE, SYN),
        resp_flags=DONE | 0,
        answered=answered,
    )
    # NTP every 1024 s, metrics push every 300 s (both periodic, both expected)
    for period, dst_addr, port, proto, size in ((1024, ntp, 123, 17, 76), (300, [METRICS], 2003, 6, 900)):
        steps = np.arange(0, hours * 3600 // period)
        phase = rng.integers(0, period, n_hosts)
        hh = np.repeat(np.arange(n_hosts), len(steps))
        ts = t0 + (np.tile(steps, n_hosts) * period + phase[hh]).astype(np.int64) * 1_000_000
        ts += rng.integers(0, 200_000, len(ts))
        d = f.idx(dst_addr)[rng.integers(0, len(dst_addr), len(ts))]
        f.session(rng, ts, 50_000, H[hh], d, port, proto, size + rng.integers(-20, 20, len(ts)), size // 2)
    # SSH: inbound from the bastion to a fifth of the hosts, outbound to a forge from a tenth
    admin = np.flatnonzero(rng.random(n_hosts) < 0.2)
    h, ts = _poisson_times(rng, len(admin), hours, t0, 0.4 * rate, 0.05 * rate)
    f.session(
        rng,
        ts,
        rng.integers(10_000_000, 900_000_000, len(h)),
        f.idx(BASTION),
        H[admin[h]],
        22,
        6,
        rng.integers(5_000, 200_000, len(h)),
        rng.integers(5_000, 2_000_000, len(h)),
    )
    devs = np.flatnonzero(rng.random(n_hosts) < 0.1)
    h, ts = _poisson_times(rng, len(devs), hours, t0, 0.8 * rate, 0.1 * rate)
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
    h, ts = _poisson_times(rng, len(movers), hours, t0, 0.5, 0.5)
    n = len(h)
    f.session(
        rng,
        ts,
        rng.integers(60_000_000, 1_800_000_000, n),
        H[movers[h]],
        np.where(rng.random(n) < 0.5, f.idx(partner)[0], f.idx(STORAGE)[0]),
        443,
        6,
        rng.integers(2 * 10**8, 3 * 10**9, n),
        rng.integers(10**5, 10**6, n),
    )

    lease_rows = _leases(hosts, start, days)
    story = Story(f.table(), pa.Table.from_pylist([], schema=VM_LEASES), [], hosts, start, days, "")
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
    rng, f: _Flows, story: Story, hosts: list[str], movers, devs, admin, day0: int, leases: list[dict]
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
        flags=np.where(answered, SYN | ACK | RST, SYN),
        resp_flags=SYN | ACK,
        answered=answered,
    )
    # vertical scan: ports 1..1200 of one external host, most closed (RST|ACK back)
    victim = "203.0.113.77"
    i = host("vertical_scan", victim)
    ports = np.arange(1, 1201)
    ts = day0 + 9 * HOUR + np.sort(rng.integers(0, S(300), len(ports)))
    sport = np.full(len(ports), 40000)
    f.add(ts, 1_000, f.idx(hosts[i]), f.idx(victim), sport, ports, 6, 1, 60, SYN)
    f.add(ts + 300, 0, f.idx(victim), f.idx(hosts[i]), ports, sport, 6, 1, 54, RST | ACK)
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


def story_lake(root: Path, seed: int = 21, days: int = 2) -> tuple[Lake, Story, Path]:
    """A real lake holding a generated story (flows + leases) and a pipeline file next to it."""
    story = generate(seed=seed, days=days)
    lake = Lake(root / "lake")
    lake.append("flows", story.flows, key="story")
    lake.replace_dataset("vm_leases", story.leases)
    pipeline = root / "t.toml"
    pipeline.write_text(pipeline_text(root / "reports"))
    return lake, story, pipeline
