"""Shared fixtures that build REAL inputs: traffic pcaps (scapy), export captures of the real softflowd as tcpdump
records them, and what the real nfcapd/nfdump make of the same datagrams.

Everything runs on 127.0.0.1 / ::1 with ports the kernel picks, so parallel runs do not collide. Session-scoped
and built on first use: a test that needs the v9 export over IPv6 pays only for that one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from support import probes

REPO = Path(__file__).resolve().parents[1]

# The suite runs on every core (pyproject addopts: pytest-xdist). Tests are handed out in collection order, so the
# longest go first: started last, one of them keeps a worker busy alone at the end while the other cores idle
# (xdist's --dist loadscope would sort modules by their number of tests instead, the chaos test last). Measured
# 2026-12-01, seconds on a 2-core machine in one process: the chaos test 66, the CLI fuzz sample 52, the hostile
# story 42, Spark's modules ~30-60 each.
LONGEST_FIRST = (
    "test_lease_state_compaction.py",  # (134 s in one test, session 39: started last, it was the run's tail)
    "test_lake_concurrency.py",
    "test_fuzz_cli.py",
    "test_hostile_story.py",
    "test_spark.py",
    "test_spark_workers.py",
    "test_install.py",
    "test_leases.py",
    "test_cli_hostile.py",
    "test_demo.py",
    "test_ingest_jobs.py",
    "test_buckets.py",
)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """The modules of LONGEST_FIRST first, in that order; every other test keeps its place after them."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# softflowd exports compared with nfdump: (version, traffic, exporter transport)
#   traffic "ipv4": IPv4 flows only; "ipv6": IPv4 and IPv6 flows mixed (v5 cannot carry IPv6), > 16 datagrams
#   "ipv4-small": few enough IPv4 flows for one v1 datagram. softflowd packs 30 records into a v1 datagram, the
#   format allows 24, and nfdump 1.7.1 drops such datagrams whole ("Unexpected record count in header: 30"),
#   so v1 is compared with nfdump on an export that fits one datagram.
SOFTFLOWD_CASES = [
    (1, "ipv4-small", "ipv4"),
    (5, "ipv4", "ipv4"),
    (
        5,
        "ipv6",
        "ipv4",
    ),  # v5 is IPv4 only: softflowd does not even track the IPv6 packets, nothing is lost silently
    (9, "ipv4", "ipv4"),
    (9, "ipv6", "ipv4"),
    (10, "ipv4", "ipv4"),
    (10, "ipv6", "ipv4"),
    (9, "ipv6", "ipv6"),  # the exporter itself talks IPv6: softflowd -n [::1]:PORT, nfcapd -6 -b ::1
    (10, "ipv6", "ipv6"),
]

# the flow key and counters every comparison with nfdump (or between versions) looks at
FLOW_KEY_AND_COUNTERS = (
    "src_addr",
    "dst_addr",
    "src_port",
    "dst_port",
    "proto",
    "packets",
    "bytes",
    "tcp_flags",
)
# what is compared between nfdump and the lake: times at nfdump's resolution (ms), then the key and counters
COMPARED = ("ts_start_ms", "ts_end_ms", *FLOW_KEY_AND_COUNTERS)


def case_id(case: tuple[int, str, str]) -> str:
    version, traffic, transport = case
    name = {10: "ipfix"}.get(version, f"v{version}")
    return f"{name}-{traffic}-traffic" + ("-over-ipv6" if transport == "ipv6" else "")


@dataclass
class ExportCase:
    """One real export: the capture tcpdump made, and nfdump's records for the same datagrams."""

    name: str
    version: int
    export_pcap: Path
    nfcapd: probes.NfcapdRun
    softflowd: probes.SoftflowdResult
    expected: pa.Table  # nfdump_records(): schema.FLOWS column names
    exporter: str


def _no_neighbour_lookup(l2: Any, l3: Any) -> str:
    raise AssertionError(
        f"a test built {l2.__class__.__name__}/{l3.__class__.__name__} without a destination MAC: scapy would ask "
        "the network (ARP or neighbour discovery, off loopback) for one; give it dst=support.probes.LAN_MAC"
    )


@pytest.fixture(autouse=True, scope="session")
def _frames_never_resolve_macs_on_the_network() -> None:
    """Tests send traffic to loopback only: an Ethernet frame built without a destination MAC makes scapy send
    ARP/ND on the default interface (and wait 2 s for an answer), so any such frame fails the test instead."""
    from scapy.config import conf
    from scapy.layers import inet, inet6

    assert inet and inet6  # imported for what they register: IPv4 and IPv6 MAC resolvers

    conf.neighbor.resolve = _no_neighbour_lookup


@pytest.fixture(scope="session")
def traffic_pcaps(tmp_path_factory) -> dict[str, Path]:
    """Deterministic traffic captures: IPv4 only, IPv4 + IPv6 mixed, and a small IPv4 one (one v1 datagram)."""
    base = tmp_path_factory.mktemp("traffic")
    return {
        "ipv4": probes.build_traffic_pcap(base / "traffic-ipv4.pcap", seed=11, ipv6=False),
        # enough conversations for more than 16 export datagrams: softflowd re-sends its v9/IPFIX templates
        # every 16 datagrams, so the comparison covers template refreshes
        "ipv6": probes.build_traffic_pcap(
            base / "traffic-ipv6.pcap", probes.default_flow_specs(seed=12, ipv6=True, n=300)
        ),
        "ipv4-small": probes.build_traffic_pcap(
            base / "traffic-ipv4-small.pcap", probes.default_flow_specs(seed=13, ipv6=False, n=10)
        ),
    }


@pytest.fixture(scope="session")
def softflowd_export(traffic_pcaps, tmp_path_factory) -> Callable[[int, str, str], ExportCase]:
    """export(version, traffic, transport) -> ExportCase: softflowd sends to one loopback port on which both
    tcpdump (-> export capture) and a real nfcapd listen; built once per combination."""
    cache: dict[tuple[int, str, str], ExportCase] = {}

    def export(version: int, traffic: str, transport: str = "ipv4") -> ExportCase:
        key = (version, traffic, transport)
        if key not in cache:
            name = case_id(key)
            base = tmp_path_factory.mktemp(name)
            host = probes.LOOPBACK_V6 if transport == "ipv6" else probes.LOOPBACK_V4
            port = probes.free_udp_port(host)
            with probes.nfcapd_receiving(port, base / "nfcapd", host=host) as nfcapd:
                with probes.capture_udp(port, base / f"{name}.pcap") as capture:
                    result = probes.softflowd_export(traffic_pcaps[traffic], version, (host, port))
                    capture.wait_for_packets(result.datagrams)
            expected = probes.nfdump_records(nfcapd.out_dir)
            assert expected.num_rows > 0, f"nfdump printed no records for {name}: {nfcapd.log_text}"
            assert nfcapd.flows_received == expected.num_rows, (
                f"nfcapd reports {nfcapd.flows_received} flows but nfdump printed {expected.num_rows}"
            )
            cache[key] = ExportCase(name, version, capture.path, nfcapd, result, expected, host)
        return cache[key]

    return export


def run_demo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`tracepipe <args>` as a user runs it after installing: a subprocess in `cwd`, output piped, an
    80-column setting that piped output must ignore, no TRACEPIPE_LAKE from the caller's environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"}
    env.pop("TRACEPIPE_LAKE", None)
    return subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, float, Path]:
    """`tracepipe demo --format json` run once for the session, in an empty directory: (its JSON, seconds
    taken, the directory; the lake is demo-lake/ in it). Its users only read it: test_demo's checks and the
    suggested commands, and the CLI fuzz cases (each on a copy of the lake)."""
    work = tmp_path_factory.mktemp("demo")
    started = time.monotonic()
    run = run_demo("demo", "--format", "json", cwd=work)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(run.stdout), elapsed, work


def empty_lake(path: Path):
    """A lake with nothing in it yet (one empty table): readers refuse a directory holding none of the lake's
    tables ("not a tracepipe lake"), so a test whose readers may run before the first commit starts here."""
    from tracepipe.lake import Lake
    from tracepipe.schema import VM_LEASES

    lake = Lake(path)
    lake.replace_dataset("vm_leases", VM_LEASES.empty_table())
    return lake


def run_tracepipe(*args: str, timeout: float = 120.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (what a user types), with a timeout."""
    return subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """The CLI's own entry point (the typer app, through the group that turns errors into one line and their
    exit code) run in this process: exit code, stdout and stderr as run_tracepipe gives them, without an
    interpreter start-up per call (1-3 s on a loaded CI machine). For tests about what a command answers or
    refuses; a test about the process itself (a hang bounded by a timeout, signals, stdin, the installed
    script) uses run_tracepipe, and benchmarks/fuzz_cli.py (test_fuzz_cli) runs every command as a process."""
    import traceback

    from typer.testing import CliRunner

    from tracepipe.cli import app

    result = CliRunner().invoke(app, list(args))
    # decoded strictly, as run_tracepipe's text mode does: output that is no UTF-8 fails the test here too
    stdout, stderr = result.stdout_bytes.decode(), result.stderr_bytes.decode()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # the group catches every error itself; what escapes it is shown as the interpreter would show it
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["tracepipe", *args], result.exit_code, stdout, stderr)


def ingest_vm(lake: Any, paths: list[Path], reclaim_interval: Any = None, **options: Any) -> tuple[Any, Any]:
    """What `tracepipe ingest vm` does in-process: land the sources, then correlate (leases, attribution).
    Returns (ingest report, correlation result); the correlation must not have failed."""
    from tracepipe.correlate.attribution import correlate
    from tracepipe.ingest.vm import ingest_vm_files

    report = ingest_vm_files(lake, paths, **options)
    done = correlate(lake, reclaim_interval=reclaim_interval)
    assert done.error is None, done.error
    return report, done


def ingest_syslog(lake: Any, paths: list[Path], **options: Any) -> tuple[Any, Any]:
    """What `tracepipe ingest syslog` does in-process: land the lines, then attribute their days."""
    from tracepipe.correlate.attribution import correlate_landed_logs, log_attributor
    from tracepipe.ingest.vm import ingest_syslog_files

    before = lake.version("vm_leases")
    attributor = log_attributor(lake)
    report = ingest_syslog_files(lake, paths, attribute=attributor, **options)
    done = correlate_landed_logs(lake, report.touched_days, attributor, before)
    assert done.error is None, done.error
    return report, done


@pytest.fixture(scope="module")
def story_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lake of the demo story (tracepipe/demo_story): its VM lifecycle, NetFlow captures and syslog, landed
    as `tracepipe ingest vm|netflow|syslog` land them. Read it; copy it to change it."""
    import datetime as dt

    from tracepipe.ingest.flows import ingest_flow_files
    from tracepipe.ingest.vm import ingest_syslog_files
    from tracepipe.lake import Lake

    story = Path(__file__).resolve().parents[1] / "tracepipe" / "demo_story"
    root = tmp_path_factory.mktemp("story") / "lake"
    lake = Lake(root)
    # ingest_vm_files lands the sources, correlation builds the leases (as `tracepipe ingest vm` does)
    ingest_vm(
        lake, [story / "nova", story / "neutron", story / "opennebula"], reclaim_interval=dt.timedelta(days=1)
    )
    assert ingest_flow_files(lake, sorted((story / "netflow").glob("*.pcap"))).exit_code == 0
    ingest_syslog_files(lake, [story / "syslog"], year=2025)
    return root


def decode_export(datagrams: list[bytes], source: str, exporter: str = probes.LOOPBACK_V4) -> list[dict]:
    """The rows decode_datagrams makes of one exporter's datagrams in one batch, asserting no rejects."""
    import numpy as np

    from tracepipe.ingest.netflow import DecoderState, decode_datagrams

    n = len(datagrams)
    decoded = decode_datagrams(datagrams, [exporter] * n, np.zeros(n, np.int64), None, source, DecoderState())
    assert decoded.rejects.num_rows == 0, decoded.rejects.to_pylist()
    return decoded.flows.to_pylist()


def decode_and_nfdump(cases: dict[str, list[bytes]], base: Path) -> dict[str, tuple[list[dict], list[dict]]]:
    """case -> (our rows of the case's export datagrams, no rejects; nfdump's rows of the same datagrams sent in
    order to a real nfcapd on 127.0.0.1), the two sides every router-vendor test compares."""
    out = {}
    for case, datagrams in cases.items():
        nfcapd = probes.nfcapd_of(datagrams, base / case)
        out[case] = (decode_export(datagrams, case), probes.nfdump_records(nfcapd).to_pylist())
    return out


def ingest_in_process(paths: list[Path], lake: Path) -> pa.Table:
    """The library call behind `tracepipe ingest netflow` (no interpreter start-up): land `paths`, assert that
    everything landed, return the lake's flows as lake_flows() does."""
    from tracepipe.correlate.attribution import correlate
    from tracepipe.ingest.flows import ingest_flow_files
    from tracepipe.lake import Lake

    summary = ingest_flow_files(Lake(lake), [Path(p) for p in paths])
    assert correlate(Lake(lake), days=summary.days).error is None
    assert summary.exit_code == 0, (
        f"ingest of {paths} ended with exit code {summary.exit_code}: {summary.to_dict()}"
    )
    return lake_flows(lake)


def lake_flows(lake: Path) -> pa.Table:
    """Every flow in a lake, read with DuckDB the way a user would (the files the log lists: a glob would also
    see files of killed runs and files merged since), plus ms-epoch times for comparison."""
    from tracepipe.lake import Lake
    from tracepipe.query import scan_sql

    with duckdb.connect() as con:
        relation = con.sql(
            f"select *, epoch_ms(ts_start) as ts_start_ms, epoch_ms(ts_end) as ts_end_ms "
            f"from ({scan_sql('flows', Lake(lake).files('flows'))})"
        )
        # duckdb >= 1.4 names it to_arrow_table; older releases arrow()
        fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
        return fetch()


def lake_rows(lake: Path, dataset: str, columns: str, order: str = "all") -> list[tuple]:
    """`columns` of every row of a dataset, from the files the log lists, sorted (`order by {order}`)."""
    from tracepipe.lake import Lake
    from tracepipe.query import scan_sql

    with duckdb.connect() as con:
        files = Lake(lake).files(dataset)
        return con.sql(f"select {columns} from ({scan_sql(dataset, files)}) order by {order}").fetchall()


def with_ms_columns(table: pa.Table) -> pa.Table:
    """Add ts_start_ms/ts_end_ms (epoch ms, truncated like nfdump prints them) to a FLOWS-shaped table."""

    def ms(column: str) -> pa.Array:
        micros = pc.cast(pc.cast(table.column(column), pa.timestamp("us")), pa.int64())
        return pc.divide(micros, 1000)  # integer division: truncates like nfdump's msec fields

    return table.append_column("ts_start_ms", ms("ts_start")).append_column("ts_end_ms", ms("ts_end"))


# ---- nfdump 1.7.1 errata ----------------------------------------------------------------------------------------
# Where nfdump 1.7.1 (Debian bookworm) itself decodes softflowd's export wrongly, the comparison undoes exactly
# that bug in nfdump's output and nothing else. Each erratum is pinned by a test in test_vs_nfdump.py that fails
# the day nfdump no longer has the bug, so that the correction is removed then.
#   E1 IPFIX: ipfix.c maps flowEndSysUpTime (21) to the first-seen and flowStartSysUpTime (22) to the last-seen
#      slot (its element table, lines 151-152), so every softflowd IPFIX record has start and end swapped.
#   E2 v9: netflow_v9.c has no entry for element 139 (icmpTypeCodeIPv6), which softflowd uses for ICMPv6 in v9
#      as in IPFIX, so nfdump prints ICMPv6 dst_port 0. The ICMPv6 type/code cannot be compared with nfdump's
#      v9 output; test_v9_icmpv6_type_code_as_nfdump_reads_it_from_ipfix checks it against nfdump's IPFIX reading.
#   E3 v1/v5/v7 ICMP: netflow_v5_v7.c "fixes odd CISCO behaviour" by moving a non-zero ICMP src port,
#      byte-swapped, into dst_port and zeroing src_port. fprobe (built with ICMP_TRICK) exports the ICMP type in
#      src port and the code in dst port, so nfdump keeps type*256 and drops the code. test_fprobe.py compares
#      ICMP types with nfdump and checks the code against the packet the test sent.
#   Avoided by construction, not corrected: a v9/IPFIX record whose end uptime is 0 gets no time at all in
#   nfdump (see the lead-in flow of probes.default_flow_specs), and v1 datagrams of more than 24 records (which
#   softflowd sends, 30 per datagram) are dropped whole by nfdump (see "ipv4-small").
ICMPV6 = 58


def nfdump_reference(expected: pa.Table, version: int) -> pa.Table:
    """nfdump's records for one export version with errata E1/E2 undone, plus ms columns for the comparison."""
    if version == 10:  # E1
        start, end = expected.column("ts_start"), expected.column("ts_end")
        expected = expected.set_column(expected.schema.get_field_index("ts_start"), "ts_start", end)
        expected = expected.set_column(expected.schema.get_field_index("ts_end"), "ts_end", start)
    if version == 9:  # E2
        expected = blank_icmpv6_ports(expected)
    return with_ms_columns(expected)


def blank_icmpv6_ports(table: pa.Table) -> pa.Table:
    """dst_port set to null on ICMPv6 rows (erratum E2: not comparable with nfdump's v9 output)."""
    index = table.schema.get_field_index("dst_port")
    ports = pc.if_else(
        pc.equal(table.column("proto"), ICMPV6),
        pa.scalar(None, pa.int32()),
        pc.cast(table.column("dst_port"), pa.int32()),
    )
    return table.set_column(index, pa.field("dst_port", pa.int32()), ports)


def multiset_diff(expected: pa.Table, got: pa.Table, columns: tuple[str, ...] = COMPARED) -> str:
    """'' when both tables hold the same rows (as a multiset over `columns`), else a readable report."""
    from collections import Counter

    def rows(table: pa.Table) -> Counter:
        data = table.select(list(columns)).to_pydict()
        return Counter(zip(*(data[c] for c in columns), strict=True))

    want, have = rows(expected), rows(got)
    if want == have:
        return ""
    missing = list((want - have).elements())
    extra = list((have - want).elements())
    lines = [
        f"nfdump printed {expected.num_rows} records, the lake holds {got.num_rows};",
        f"columns: {', '.join(columns)}",
        f"{len(missing)} printed by nfdump but not in the lake:",
    ]
    lines += [f"  - {row}" for row in sorted(missing, key=str)[:15]]
    lines.append(f"{len(extra)} in the lake but not printed by nfdump:")
    lines += [f"  + {row}" for row in sorted(extra, key=str)[:15]]
    return "\n".join(lines)
