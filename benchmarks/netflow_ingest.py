"""NetFlow ingest speed: tracepipe (pcap -> Parquet lake) against nfdump reading the same records (issue 17).

1. Captures ONE real softflowd v9 export datagram (templates + data) on 127.0.0.1 with tcpdump.
2. For each size (default 1 M, 3 M and 10 M records) synthesises a capture in that template's layout (numpy:
   varying addresses, ports, protocols, counters and times), written as an Ethernet pcap (numpy as well), and
   replays its datagrams over UDP to a real nfcapd on 127.0.0.1 (`-B 33554432`, paced: none is dropped).
3. Runs, interleaved, best of 3 (`--rounds`), as a new user would (no pinning, default options):
   - `tracepipe ingest netflow FILE --lake L --format json` (whole pcap -> sorted zstd Parquet lake, start-up,
     hashing and attribution included; `--jobs` defaults to the number of cores),
   - `nfdump -r FILE -q -N -o 'fmt:%tsr,%ter,%pr,%sa,%da,%sp,%dp,%pkt,%byt,%flg' > /dev/null` (its fastest
     text form: raw times),
   - `tracepipe ingest netflow FILE.csv` on the same records as `nfdump -r -o csv` wrote them (written once,
     not timed; `--no-csv` leaves it out: 350 bytes a record), with the default `--jobs` and with `--jobs 1`
     (whether the decode workers pay on this machine), and next to it the floor of reading that text:
     pyarrow.csv alone tokenising the 13 columns tracepipe uses (all cores, nothing converted or written),
   and prints records/s (wall clock; CPU seconds of the whole process tree next to it), the peak RSS of the
   whole process tree (sampled every 20 ms: tracepipe's workers included) and the ratios tracepipe / nfdump,
   then one line per size (ratios and peak RSS: is memory flat from 1 M to 10 M?). `--timeline` adds, for the
   best tracepipe run of each size, how busy each process (main, worker 0, worker 1) was over time: where a
   core waits on another (the serial part of `--jobs 2`).

    python benchmarks/netflow_ingest.py                         # 1 M, 3 M, 10 M records
    python benchmarks/netflow_ingest.py --sizes 300000 --rounds 1   # quick, while developing
    python benchmarks/netflow_ingest.py --build-only OUT.pcap --sizes 300000   # just the capture
    python benchmarks/netflow_ingest.py --no-csv --timeline      # pcap only, with per-process timelines
    python benchmarks/netflow_ingest.py --sizes 1000000 --csv-floors   # and every candidate floor of the CSV
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
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
NFDUMP_FORMAT = "fmt:%tsr,%ter,%pr,%sa,%da,%sp,%dp,%pkt,%byt,%flg"  # raw times: nfdump's fastest text output


def _tree(root: int) -> dict[int, tuple[int, int]]:
    """{pid: (RSS KiB, CPU ticks user + sys)} of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    stat: dict[int, tuple[int, int]] = {}
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        stat[pid] = (int(fields[21]) * page_kib, int(fields[11]) + int(fields[12]))
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stat:
            out[pid] = stat[pid]
        todo.extend(children.get(pid, []))
    return out


def _tree_rss_kib(root: int) -> int:
    """RSS of a process and all its descendants (KiB)."""
    return sum(rss for rss, _ in _tree(root).values())


TIMELINE_COLUMNS = 80  # columns of the printed timeline (a step is the wall time / 80, at least 20 ms)
_LEVELS = " ▁▂▃▄▅▆▇█"


def timeline_text(samples: list[tuple[float, dict[int, int]]], names: dict[int, str], wall: float) -> str:
    """Per process, how busy it was in each step (wall / TIMELINE_COLUMNS) of the run (█ one core the whole step, blank idle,
    · not running), from CPU ticks sampled every 20 ms; then the cores in use together, and the idle time of
    the second core (what a serial part costs on 2 cores)."""
    hz = os.sysconf("SC_CLK_TCK")
    step_s = max(0.02, wall / TIMELINE_COLUMNS)
    steps = max(1, int(np.ceil(wall / step_s)))
    busy: dict[int, np.ndarray] = {}
    alive: dict[int, np.ndarray] = {}
    last: dict[int, tuple[float, int]] = {}
    for t, ticks in samples:
        for pid, cpu in ticks.items():
            step = min(steps - 1, int(t / step_s))
            busy.setdefault(pid, np.zeros(steps))
            alive.setdefault(pid, np.zeros(steps, bool))
            if pid in last:  # the CPU since the previous sample, spread over the steps in between
                first = min(step, int(last[pid][0] / step_s) + 1)  # the step after the previous sample's
                busy[pid][first : step + 1] += (cpu - last[pid][1]) / hz / (step - first + 1)
            else:  # ticks before the first sample (a process younger than 20 ms)
                first = step
                busy[pid][step] += cpu / hz
            alive[pid][first : step + 1] = True
            last[pid] = (t, cpu)
    lines = [f"  timeline, one column per {step_s:.2f} s (█ = one core busy the whole step):"]
    total = np.zeros(steps)
    for pid in sorted(busy, key=lambda p: (names.get(p, "z"), p)):
        share = np.clip(busy[pid] / step_s, 0, 1)
        total += busy[pid] / step_s
        bar = "".join(_LEVELS[int(s * 8 + 0.5)] if a else "·" for s, a in zip(share, alive[pid], strict=True))
        lines.append(f"  {names.get(pid, str(pid))[:10]:10s} |{bar}| {busy[pid].sum():5.2f} s CPU")
    cores = os.cpu_count() or 1
    bar = "".join(str(min(9, int(c + 0.5))) for c in total)
    lines.append(f"  {'cores':10s} |{bar}|")
    idle = float(np.clip(cores - total, 0, None).sum() * step_s)
    lines.append(f"  idle core-seconds over the run: {idle:.2f} of {cores * wall:.2f} ({cores} cores)")
    return "\n".join(lines)


def _process_name(pid: int, root: int) -> str:
    if pid == root:
        return "main"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    if any(b"decode_worker" in a for a in argv):
        return f"worker {pid}"
    return f"{Path(argv[0].decode(errors='replace')).name} {pid}"


def _run_measured(cmd: list[str], stdout=subprocess.DEVNULL, env=None, timeline: bool = False) -> dict:
    """Wall seconds, CPU seconds (user + sys of the process and every child it waited for), peak RSS of the
    whole process tree in MiB (sampled), and exit code of one command; `timeline`: also the text of a
    per-process busy/idle timeline (timeline_text)."""
    peak = [0]
    samples: list[tuple[float, dict[int, int]]] = []
    names: dict[int, str] = {}
    start = time.perf_counter()
    # cwd: `python -m tracepipe.cli` imports tracepipe from the current directory before PYTHONPATH, so a run
    # started from another checkout would time that checkout's code
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, env=env, cwd=REPO)
    done = threading.Event()

    own_cmdline = Path("/proc/self/cmdline").read_bytes()

    def sample() -> None:
        while not done.is_set():
            try:  # between fork and exec the child is a copy of this process: not what is measured
                started = Path(f"/proc/{proc.pid}/cmdline").read_bytes() != own_cmdline
            except OSError:
                started = False
            if started:
                tree = _tree(proc.pid)
                peak[0] = max(peak[0], sum(rss for rss, _ in tree.values()))
                if timeline:
                    samples.append((time.perf_counter() - start, {p: c for p, (_, c) in tree.items()}))
                    for pid in tree.keys() - names.keys():
                        names[pid] = _process_name(pid, proc.pid)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 3):
        sys.stderr.write(proc.stderr.read().decode(errors="replace") if proc.stderr else "")
    result = {
        "seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": peak[0] // 1024,  # the whole tree (ru_maxrss is one process's, and can be the fork's)
        "exit": code,
    }
    if timeline:
        workers = sorted(p for p, n in names.items() if n.startswith("worker"))
        names.update({p: f"worker {i}" for i, p in enumerate(workers)})
        result["timeline"] = timeline_text(samples, names, wall)
    return result


def measure_tracepipe(pcap: Path, lake: Path, jobs: int | None = None, timeline: bool = False) -> dict:
    shutil.rmtree(lake, ignore_errors=True)
    cmd = [sys.executable, "-m", "tracepipe.cli", "ingest", "netflow", str(pcap), "--lake", str(lake)]
    cmd += ["--format", "json", *(["--jobs", str(jobs)] if jobs else [])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = _run_measured(cmd, stdout=subprocess.PIPE, env=env, timeline=timeline)
    import pyarrow.parquet as pq

    result["records"] = sum(
        sum(pq.read_table(m, columns=["rows"]).column("rows").to_pylist())
        for m in (lake / "_ingest").glob("*.parquet")
    )
    shutil.rmtree(lake, ignore_errors=True)
    return result


def replay_to_nfcapd(pcap: Path, workdir: Path) -> Path:
    """Send every datagram of `pcap` to a real nfcapd on 127.0.0.1, paced so that none is dropped."""
    port = probes.free_udp_port()
    out_dir = workdir / f"nfcapd-{pcap.stem}"
    out_dir.mkdir()
    cmd = [tool_path("nfcapd"), "-b", "127.0.0.1", "-p", str(port), "-w", str(out_dir), "-t", "3600"]
    cmd += ["-B", "33554432"]
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
    if len(files) > 1:
        # the replay crossed nfcapd's rotation (-t 3600 rotates at the wall clock's full hour): nfdump merges the
        # parts into one file (session 24: a 10 M run at 08:59 measured nfdump on the first 5.7 M records only)
        merged = workdir / f"nfcapd-{pcap.stem}.merged"
        subprocess.run([tool_path("nfdump"), "-R", str(out_dir), "-w", str(merged)], check=True, timeout=600)
        return merged
    return files[0]


def write_nfdump_csv(nfcapd_file: Path, out: Path) -> Path:
    """The records of `nfcapd_file` as `nfdump -o csv` prints them (UTC), the input of tracepipe's CSV reader."""
    with open(out, "wb") as handle:
        subprocess.run(
            [tool_path("nfdump"), "-r", str(nfcapd_file), "-o", "csv"],
            stdout=handle,
            env=dict(os.environ, TZ="UTC"),
            check=True,
        )
    return out


# The floor of any reader of nfdump CSV: pyarrow.csv alone tokenising the same file into the 13 columns tracepipe
# uses, as text, on all cores, and nothing else (no conversion, no lake). Python + pyarrow start-up included.
CSV_FLOOR = """
import json, sys, pyarrow as pa, pyarrow.csv as c
CSV_COLUMNS, _NEEDED = json.loads(sys.argv[2])
reader = c.open_csv(sys.argv[1],
    read_options=c.ReadOptions(column_names=list(CSV_COLUMNS), skip_rows=1, block_size=1 << 21),
    parse_options=c.ParseOptions(quote_char=False, invalid_row_handler=lambda row: "skip"),
    convert_options=c.ConvertOptions(include_columns=list(_NEEDED), strings_can_be_null=False,
                                     column_types={name: pa.string() for name in _NEEDED}))
print(sum(batch.num_rows for batch in reader))
"""


def measure_csv_floor(csv_file: Path) -> dict:
    from tracepipe.ingest.nfdump import _NEEDED, CSV_COLUMNS

    columns = json.dumps([CSV_COLUMNS, _NEEDED])
    result = _run_measured([sys.executable, "-c", CSV_FLOOR, str(csv_file), columns])
    result["records"] = sum(1 for _ in open(csv_file, "rb")) - 4  # header and the 3 lines of the Summary
    return result


def measure_nfdump(nfcapd_file: Path) -> dict:
    cmd = [tool_path("nfdump"), "-r", str(nfcapd_file), "-q", "-N", "-o", NFDUMP_FORMAT]
    env = dict(os.environ, TZ="UTC")
    result = _run_measured(cmd, env=env)
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, env=env
    ) as lister:  # counted as it streams (GBs of text)
        assert lister.stdout is not None
        result["records"] = sum(
            chunk.count(b"\n") for chunk in iter(lambda: lister.stdout.read(1 << 20), b"")
        )
    return result


def _rate(m: dict) -> str:
    return (
        f"{m['records'] / m['seconds'] / 1e6:5.2f} M records/s ({m['seconds']:6.2f} s wall, "
        f"{m['records'] / m['cpu_seconds'] / 1e6:5.2f} M/s of CPU, {m['cpu_seconds']:6.2f} s CPU), "
        f"peak RSS {m['peak_rss_mib']:5d} MiB"
    )


def bench_size(
    datagram: bytes,
    size: int,
    workdir: Path,
    rounds: int,
    jobs: int | None,
    csv: bool = True,
    timeline: bool = False,
    csv_floors: bool = False,
) -> dict:
    pcap = workdir / f"v9-{size}.pcap"
    records = build_capture(datagram, size, pcap)
    nffile = replay_to_nfcapd(pcap, workdir)
    csv_file = write_nfdump_csv(nffile, workdir / f"v9-{size}.csv") if csv else None
    runs: dict[str, list[dict]] = {
        "tracepipe": [],
        "nfdump": [],
        **({"tracepipe_csv": [], "tracepipe_csv_jobs1": [], "csv_floor": []} if csv else {}),
    }
    for _ in range(rounds):  # interleaved: all see the same machine load
        runs["tracepipe"].append(measure_tracepipe(pcap, workdir / "lake", jobs, timeline))
        runs["nfdump"].append(measure_nfdump(nffile))
        if csv_file is not None:
            runs["tracepipe_csv"].append(measure_tracepipe(csv_file, workdir / "lake", jobs))
            runs["tracepipe_csv_jobs1"].append(measure_tracepipe(csv_file, workdir / "lake", 1))
            runs["csv_floor"].append(measure_csv_floor(csv_file))
            if csv_floors:  # every candidate floor of benchmarks/csv_floors.py, in the same rounds
                import csv_floors as floors

                for name in floors.FLOORS:
                    runs.setdefault(f"floor: {name}", []).append(floors.measure_floor(name, csv_file))
    best = {name: min(r, key=lambda m: m["seconds"]) for name, r in runs.items()}
    nf = best["nfdump"]

    def ratios(tp: dict) -> tuple[float, float]:
        return (
            (tp["records"] / tp["seconds"]) / (nf["records"] / nf["seconds"]),
            (tp["records"] / tp["cpu_seconds"]) / (nf["records"] / nf["cpu_seconds"]),
        )

    tp = best["tracepipe"]
    ratio, cpu_ratio = ratios(tp)
    print(f"{records:>10,} records ({pcap.stat().st_size / 1e6:.0f} MB pcap), best of {rounds}:")
    print(f"  tracepipe ingest netflow (pcap -> Parquet)  {_rate(tp)}")
    print(f"  nfdump -r FILE -o fmt:%tsr,... > /dev/null  {_rate(nf)}")
    if nf["records"] != records or tp["records"] != records:
        print(f"  (records seen: tracepipe {tp['records']:,}, nfdump {nf['records']:,} of {records:,})")
    print(f"  ratio tracepipe / nfdump: {ratio:.2f}x wall, {cpu_ratio:.2f}x per CPU second")
    if "timeline" in tp:
        print(tp.pop("timeline"))
        for run in runs["tracepipe"]:
            run.pop("timeline", None)
    result = {"records": records, "best": best, "runs": runs, "ratio": ratio, "cpu_ratio": cpu_ratio}
    if csv_file is not None:
        tc = best["tracepipe_csv"]
        result["csv_ratio"], result["csv_cpu_ratio"] = ratios(tc)
        print(f"  tracepipe ingest netflow (nfdump CSV, {csv_file.stat().st_size / 1e6:.0f} MB)  {_rate(tc)}")
        print(
            f"  ratio tracepipe CSV / nfdump: {result['csv_ratio']:.2f}x wall, "
            f"{result['csv_cpu_ratio']:.2f}x per CPU second"
        )
        one = best["tracepipe_csv_jobs1"]
        print(f"  the same, --jobs 1 (one process)              {_rate(one)}")
        print(f"  ratio --jobs 1 / nfdump: {ratios(one)[0]:.2f}x wall, {ratios(one)[1]:.2f}x per CPU second")
        floor = best["csv_floor"]
        result["floor_ratio"], result["floor_cpu_ratio"] = ratios(floor)
        print(f"  floor: pyarrow.csv alone, 13 columns as text   {_rate(floor)}")
        print(
            f"  ratio floor / nfdump: {result['floor_ratio']:.2f}x wall, {result['floor_cpu_ratio']:.2f}x per CPU "
            f"second; tracepipe CSV takes {tc['cpu_seconds'] / floor['cpu_seconds']:.1f}x the floor's CPU"
        )
        for name in (n for n in best if n.startswith("floor: ")):
            found = best[name]
            found["records"] = floor["records"]
            print(
                f"  {name[7:]:46s} {found['seconds']:6.2f} s wall, {found['cpu_seconds']:6.2f} s CPU: "
                f"{ratios(found)[0]:.2f}x nfdump wall, {ratios(found)[1]:.2f}x per CPU second"
            )
        if tc["exit"] not in (0, 3) or tc["records"] != records:
            print(f"  (tracepipe CSV exit {tc['exit']}, landed {tc['records']:,} of {records:,} records)")
        csv_file.unlink()
    pcap.unlink()
    nffile.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(float(x)) for x in text.split(",")],
        default=[1_000_000, 3_000_000, 10_000_000],
        help="records per capture, comma-separated (default 1000000,3000000,10000000)",
    )
    parser.add_argument("--records", type=int, help="one size only (the same as --sizes N)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per size; the best counts")
    parser.add_argument(
        "--jobs", type=int, help="tracepipe --jobs (default: tracepipe's, the number of cores)"
    )
    parser.add_argument(
        "--no-csv", action="store_true", help="leave out tracepipe reading the records as nfdump CSV"
    )
    parser.add_argument(
        "--csv-floors",
        action="store_true",
        help="also every candidate floor of reading the CSV (benchmarks/csv_floors.py: pyarrow typed, polars, "
        "DuckDB, numpy, the reader on one thread, SHA-256)",
    )
    parser.add_argument(
        "--timeline", action="store_true", help="print how busy each tracepipe process was over time"
    )
    parser.add_argument("--build-only", type=Path, help="only write the synthetic capture to this path")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    if args.records:
        args.sizes = [args.records]
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="tracepipe-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        datagram = real_v9_datagram(workdir)
        if args.build_only:
            records = build_capture(datagram, args.sizes[0], args.build_only)
            size = args.build_only.stat().st_size
            print(json.dumps({"pcap": str(args.build_only), "records": records, "bytes": size}))
            return
        # tracepipe's modules as bytecode, as `pip install` leaves them: with PYTHONDONTWRITEBYTECODE set (some
        # CI and container images set it) every process would compile them again (~0.1 s of CPU each)
        compileall.compile_dir(str(REPO / "tracepipe"), quiet=1)
        load = os.getloadavg()
        print(f"{os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
        results = [
            bench_size(
                datagram,
                size,
                workdir,
                args.rounds,
                args.jobs,
                not args.no_csv,
                args.timeline,
                args.csv_floors,
            )
            for size in args.sizes
        ]
        print(f"summary, best of {args.rounds} (load average at the start {load[0]:.1f}):")
        for r in results:
            tp, nf = r["best"]["tracepipe"], r["best"]["nfdump"]
            print(
                f"  {r['records']:>10,} records  tracepipe / nfdump {r['ratio']:.2f}x wall, {r['cpu_ratio']:.2f}x "
                f"per CPU second  tracepipe {tp['seconds']:.2f} s, {tp['cpu_seconds']:.2f} s CPU, peak RSS "
                f"{tp['peak_rss_mib']} MiB (all processes)  nfdump {nf['seconds']:.2f} s"
            )
        rss = [r["best"]["tracepipe"]["peak_rss_mib"] for r in results]
        print(f"  peak RSS from the smallest to the biggest size: {rss[0]} -> {rss[-1]} MiB")
        print(json.dumps({"load_average": load, "sizes": results}))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
