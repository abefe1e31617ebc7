"""NetFlow ingest speed: tracepipe (pcap -> Parquet lake) against nfdump reading the same records.

1. Captures ONE real softflowd v9 export datagram (templates + data) on 127.0.0.1 with tcpdump.
2. Synthesises a capture of several million v9 records in that template's layout (numpy: varying addresses,
   ports, protocols, counters and times), written as an Ethernet pcap (numpy as well).
3. Prints, in one run, records/s and peak RSS of
   - `tracepipe ingest netflow` (whole pcap -> Parquet, pinned to one core),
   - nfdump reading the same records with its fastest text output, after replaying the datagrams over UDP to a
     real nfcapd on 127.0.0.1 (`-B 33554432`),
   - the pure-Python `netflow` package (decode only, on a sample), for reference.

    python benchmarks/netflow_ingest.py [--records 3000000] [--keep DIR]
    python benchmarks/netflow_ingest.py --build-only OUT.pcap --records 300000   # just the capture
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # tracepipe from this checkout; tests/support

from support import probes  # noqa: E402

from tracepipe.ingest.netflow import DecoderState, decode_datagrams  # noqa: E402
from tracepipe.ingest.pcap import iter_udp_batches  # noqa: E402
from tracepipe.tools import tool_path  # noqa: E402

RECORDS_PER_DATAGRAM = 30  # what softflowd packs into a 1500-byte MTU with its 42-byte IPv4 template
NFDUMP_FORMAT = "fmt:%ts,%te,%pr,%sa,%da,%sp,%dp,%pkt,%byt,%flg"


def real_v9_datagram(workdir: Path) -> bytes:
    """The first datagram the real softflowd sends for a small IPv4 capture: templates, options, data."""
    traffic = probes.build_traffic_pcap(workdir / "traffic.pcap", seed=3, ipv6=False)
    port = probes.free_udp_port()
    with probes.capture_udp(port, workdir / "softflowd-v9.pcap") as capture:
        result = probes.softflowd_export(traffic, 9, (probes.LOOPBACK_V4, port))
        capture.wait_for_packets(result.datagrams)
    batch = next(iter_udp_batches(capture.path))
    return bytes(batch.payloads[0])


def _template_of(datagram: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(source id, template id, fields) of the IPv4 data template (the one with field 8 and ports)."""
    state = DecoderState()
    decode_datagrams([datagram], ["127.0.0.1"], np.zeros(1, np.int64), None, "template", state)
    for (_, version, domain, tid), tpl in sorted(state.templates.items()):
        ids = [f for f, _, _ in tpl.fields]
        if version == 9 and not tpl.options and 8 in ids and 7 in ids:
            return domain, tid, tpl.fields
    raise SystemExit("softflowd sent no IPv4 v9 template")


def _record_dtype(fields: list[tuple[int, int, int]]) -> np.dtype:
    formats = {1: "u1", 2: ">u2", 4: ">u4", 8: ">u8"}
    return np.dtype(
        [(f"f{i}_{fid}", formats.get(length, f"V{length}")) for i, (fid, length, _) in enumerate(fields)]
    )


def build_capture(datagram: bytes, records: int, path: Path, seed: int = 1, chunk: int = 20_000) -> int:
    """Write an Ethernet pcap: the real datagram first, then data-only datagrams in its template's layout.
    Returns the number of records in the file (the real datagram's included)."""
    domain, tid, fields = _template_of(datagram)
    rec = _record_dtype(fields)
    n_datagrams = max(1, records // RECORDS_PER_DATAGRAM)
    payload_len = 20 + 4 + RECORDS_PER_DATAGRAM * rec.itemsize
    packet = np.dtype(
        [
            ("ts_sec", "<u4"),
            ("ts_usec", "<u4"),
            ("caplen", "<u4"),
            ("wirelen", "<u4"),
            ("macs", "V12"),
            ("ethertype", ">u2"),
            ("ip_vhl", "u1"),
            ("ip_tos", "u1"),
            ("ip_len", ">u2"),
            ("ip_id", ">u2"),
            ("ip_frag", ">u2"),
            ("ip_ttl", "u1"),
            ("ip_proto", "u1"),
            ("ip_csum", ">u2"),
            ("ip_src", ">u4"),
            ("ip_dst", ">u4"),
            ("sport", ">u2"),
            ("dport", ">u2"),
            ("udp_len", ">u2"),
            ("udp_csum", ">u2"),
            ("version", ">u2"),
            ("count", ">u2"),
            ("uptime", ">u4"),
            ("unix_secs", ">u4"),
            ("sequence", ">u4"),
            ("source_id", ">u4"),
            ("set_id", ">u2"),
            ("set_len", ">u2"),
            ("records", rec, (RECORDS_PER_DATAGRAM,)),
        ]
    )
    rng = np.random.default_rng(seed)
    t0 = 1_700_000_000
    loopback = 0x7F000001
    with open(path, "wb") as out:
        out.write(np.array([0xA1B2C3D4, 0x00040002, 0, 0, 65535, 1], dtype="<u4").tobytes()[:24])
        frame = _frame(datagram, t0, loopback)
        out.write(frame)
        for start in range(0, n_datagrams, chunk):
            n = min(chunk, n_datagrams - start)
            idx = np.arange(start, start + n, dtype=np.int64)
            p = np.zeros(n, dtype=packet)
            p["ts_sec"] = t0 + idx // 10_000
            p["ts_usec"] = (idx % 10_000) * 100
            p["caplen"] = p["wirelen"] = 14 + 20 + 8 + payload_len
            p["ethertype"] = 0x0800
            p["ip_vhl"], p["ip_ttl"], p["ip_proto"] = 0x45, 64, 17
            p["ip_len"] = 20 + 8 + payload_len
            p["ip_src"] = p["ip_dst"] = loopback
            p["sport"], p["dport"], p["udp_len"] = 40000, 2055, 8 + payload_len
            p["version"], p["count"] = 9, RECORDS_PER_DATAGRAM
            uptime = 3_600_000 + idx * 10  # ms since the (synthetic) exporter booted
            p["uptime"] = uptime
            p["unix_secs"] = t0 + idx // 100
            p["sequence"] = idx + 2  # the real datagram was sequence 1
            p["source_id"] = domain
            p["set_id"], p["set_len"] = tid, 4 + RECORDS_PER_DATAGRAM * rec.itemsize
            r = p["records"]
            shape = (n, RECORDS_PER_DATAGRAM)
            for i, (fid, _length, _) in enumerate(fields):
                name = f"f{i}_{fid}"
                if fid in (8, 12):
                    r[name] = 0x0A000000 + rng.integers(0, 1 << 16, shape)
                elif fid in (7, 11):
                    r[name] = rng.integers(1, 65536, shape)
                elif fid == 4:
                    r[name] = rng.choice(np.array([6, 17], dtype=np.uint8), shape)
                elif fid == 6:
                    r[name] = rng.integers(0, 64, shape)
                elif fid == 2:
                    r[name] = rng.integers(1, 1000, shape)
                elif fid == 1:
                    r[name] = rng.integers(40, 1_000_000, shape)
                elif fid == 22:
                    r[name] = (uptime[:, None] - rng.integers(1000, 60_000, shape)).astype(np.uint32)
                elif fid == 21:
                    r[name] = (uptime[:, None] - rng.integers(0, 1000, shape)).astype(np.uint32)
                elif fid == 60:
                    r[name] = 4
            out.write(p.tobytes())
    return n_datagrams * RECORDS_PER_DATAGRAM + _records_in(datagram)


def _frame(payload: bytes, ts: int, addr: int) -> bytes:
    import struct

    ip = struct.pack(">BBHHHBBHII", 0x45, 0, 28 + len(payload), 0, 0, 64, 17, 0, addr, addr)
    udp = struct.pack(">HHHH", 40000, 2055, 8 + len(payload), 0)
    frame = b"\0" * 12 + b"\x08\x00" + ip + udp + payload
    return struct.pack("<IIII", ts, 0, len(frame), len(frame)) + frame


def _records_in(datagram: bytes) -> int:
    decoded = decode_datagrams([datagram], ["127.0.0.1"], np.zeros(1, np.int64), None, "x", DecoderState())
    return decoded.flows.num_rows


# ---- measuring ---------------------------------------------------------------------------------------------
def _run_measured(
    cmd: list[str], stdout=subprocess.DEVNULL, one_core: bool = True, env=None
) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds, peak RSS in MiB, exit code) of one child process. CPU time (user + sys)
    is what one core spends; on a shared machine it is steadier than the wall clock."""

    def pin() -> None:
        if one_core:
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, preexec_fn=pin, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 3):
        sys.stderr.write(proc.stderr.read().decode(errors="replace") if proc.stderr else "")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024, proc.returncode


def measure_tracepipe(pcap: Path, lake: Path) -> dict:
    env = dict(os.environ, POLARS_MAX_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "tracepipe.cli",
        "ingest",
        "netflow",
        str(pcap),
        "--lake",
        str(lake),
        "--format",
        "json",
    ]
    wall, cpu, rss, code = _run_measured(cmd, stdout=subprocess.PIPE, env=env)
    flows = 0
    for manifest in (lake / "_ingest").glob("*.parquet"):
        import pyarrow.parquet as pq

        flows += sum(pq.read_table(manifest, columns=["rows"]).column("rows").to_pylist())
    return {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mib": rss, "exit": code, "records": flows}


def replay_to_nfcapd(pcap: Path, workdir: Path, expected: int) -> Path:
    """Send every datagram of `pcap` to a real nfcapd on 127.0.0.1, paced so that none is dropped."""
    port = probes.free_udp_port()
    out_dir = workdir / "nfcapd"
    out_dir.mkdir()
    cmd = [
        tool_path("nfcapd"),
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        str(out_dir),
        "-t",
        "3600",
        "-B",
        "33554432",
    ]
    log = open(workdir / "nfcapd.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sent = 0
        for batch in iter_udp_batches(pcap):
            for payload in batch.payloads:
                sock.sendto(payload, ("127.0.0.1", port))
                sent += 1
                if sent % 100 == 0:
                    time.sleep(0.004)  # <= 25k datagrams/s: nfcapd keeps up even on a busy machine
        sock.close()
        time.sleep(2.0)
    finally:
        probes.stop_process(proc)
        log.close()
    files = sorted(p for p in out_dir.glob("nfcapd.*") if ".current." not in p.name)
    if not files:
        raise SystemExit(f"nfcapd wrote no file: {(workdir / 'nfcapd.log').read_text()}")
    return files[0]


def measure_nfdump(nfcapd_file: Path) -> dict:
    env = dict(os.environ, TZ="UTC")
    count = subprocess.run(
        [tool_path("nfdump"), "-r", str(nfcapd_file), "-q", "-N", "-o", NFDUMP_FORMAT],
        capture_output=True,
        text=True,
        env=env,
    ).stdout.count("\n")
    wall, cpu, rss, code = _run_measured(
        [tool_path("nfdump"), "-r", str(nfcapd_file), "-q", "-N", "-o", NFDUMP_FORMAT], env=env
    )
    return {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mib": rss, "exit": code, "records": count}


def measure_python_netflow(pcap: Path, datagrams: int = 5000) -> dict:
    try:
        import netflow  # the pure-Python `netflow` package from PyPI
    except ImportError:
        return {"available": False}
    payloads = []
    for batch in iter_udp_batches(pcap, batch_datagrams=datagrams):
        payloads = [bytes(p) for p in batch.payloads[:datagrams]]
        break
    templates: dict = {"netflow": {}, "ipfix": {}}
    netflow.parse_packet(payloads[0], templates)
    start = time.process_time()
    records = 0
    for payload in payloads[1:]:
        records += len(netflow.parse_packet(payload, templates).flows)
    return {"available": True, "seconds": time.process_time() - start, "records": records}


def _line(label: str, m: dict) -> str:
    return (
        f"{label:44s} {m['records'] / m['cpu_seconds'] / 1e6:5.2f} M records/s of CPU time, "
        f"{m['records'] / m['seconds'] / 1e6:5.2f} M/s wall ({m['records']:,} records, "
        f"{m['cpu_seconds']:.2f} s CPU, {m['seconds']:.2f} s wall), peak RSS {m['peak_rss_mib']} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=3_000_000)
    parser.add_argument("--build-only", type=Path, help="only write the synthetic capture to this path")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="tracepipe-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        datagram = real_v9_datagram(workdir)
        pcap = args.build_only or workdir / "v9-synthetic.pcap"
        records = build_capture(datagram, args.records, pcap)
        if args.build_only:
            print(json.dumps({"pcap": str(pcap), "records": records, "bytes": pcap.stat().st_size}))
            return
        size_mb = pcap.stat().st_size / 1e6
        print(f"capture: {records:,} v9 records (softflowd template), {size_mb:.0f} MB")
        tp = measure_tracepipe(pcap, workdir / "lake")
        print(_line("tracepipe ingest (pcap -> Parquet, 1 core)", tp))
        nffile = replay_to_nfcapd(pcap, workdir, records)
        nf = measure_nfdump(nffile)
        print(_line("nfdump -r FILE -o fmt:... > /dev/null", nf))
        if nf["records"] < records:
            print(f"  (nfcapd stored {nf['records']:,} of {records:,} replayed records: rate is over those)")
        py = measure_python_netflow(pcap)
        if py.get("available"):
            print(
                f"{'python `netflow` package (decode only)':44s} {py['records'] / py['seconds'] / 1e6:5.3f} M records/s "
                f"of CPU time ({py['records']:,} records sample)"
            )
        else:
            print("python `netflow` package: not installed (pip install netflow)")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(
            json.dumps(
                {
                    "records": records,
                    "tracepipe": tp,
                    "nfdump": nf,
                    "python_netflow": py,
                    "benchmark_process_rss_mib": peak,
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
