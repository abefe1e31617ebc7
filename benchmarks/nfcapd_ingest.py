"""nfcapd ingest speed (issue 17): tracepipe's native nfcapd reader against nfdump reading the same file, and
against the nfdump-subprocess path it replaced.

1. Builds the nfcapd files the way benchmarks/netflow_ingest.py does (reused): one real softflowd v9 datagram,
   a synthetic capture of N records in its template, replayed over UDP to a real nfcapd on 127.0.0.1 (nfcapd's
   default: uncompressed; `--lz4` adds the same file rewritten by `nfdump -y`).
2. Runs, interleaved, best of 3 (`--rounds`), each a child process measured for wall seconds, CPU seconds
   (user + sys of the tree) and peak RSS of the tree:
   - native: `tracepipe ingest netflow FILE --lake L --format json` (as a user runs it: hashing, Parquet,
     manifest and attribution included),
   - nfdump: `nfdump -r FILE -q -N -o 'fmt:%tsr,%ter,%pr,%sa,%da,%sp,%dp,%pkt,%byt,%flg' > /dev/null`,
   - old path: the same file through `nfdump -o fmt:` and tracepipe's text reader into a lake
     (tracepipe.ingest.nfdump.iter_nfcapd(native=False)), what `ingest netflow` did before issue 17,
   - the native reader alone: nffile.iter_nffile into Arrow batches, timed inside its process (no interpreter
     start, no lake): what the reader costs next to nfdump, whatever the lake costs,
   and prints records/s, CPU seconds, peak RSS and the ratios native / nfdump and native / old path.

    python benchmarks/nfcapd_ingest.py                          # 1 M and 3 M records
    python benchmarks/nfcapd_ingest.py --sizes 200000 --rounds 1  # quick, while developing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]

from netflow_ingest import (  # noqa: E402
    NFDUMP_FORMAT,
    _run_measured,
    build_capture,
    real_v9_datagram,
    replay_to_nfcapd,
)

from tracepipe.tools import tool_path  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), TZ="UTC")

OLD_PATH = """
import sys
from tracepipe.ingest.nfdump import iter_nfcapd
from tracepipe.lake import Lake, hash_file
path, lake = sys.argv[1], Lake(sys.argv[2])
with lake.ingest("flows", source=path, content_hash=hash_file(path)) as writer:
    for flows, rejects in iter_nfcapd(path, native=False):
        writer.write(flows)
        writer.reject(rejects)
    print(writer.commit({"kind": "nfcapd"}).rows)
"""


READER_ALONE = """
import resource, sys, time
from tracepipe.ingest.nffile import iter_nffile
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
cpu0, wall0 = cpu(), time.perf_counter()
rows = sum(flows.num_rows for flows, _ in iter_nffile(sys.argv[1], batch_rows=1 << 19))
print(rows, cpu() - cpu0, time.perf_counter() - wall0)
"""


def measure_reader(path: Path, workdir: Path) -> dict:
    out = workdir / "reader.txt"
    with open(out, "wb") as handle:
        result = _run_measured([sys.executable, "-c", READER_ALONE, str(path)], stdout=handle, env=ENV)
    rows, cpu, wall = out.read_text().split()[-3:]
    # the reading alone, measured inside the child: interpreter start and imports (~0.6 s CPU) left out
    result.update(records=int(rows), seconds=float(wall), cpu_seconds=float(cpu))
    return result


def measure_native(path: Path, workdir: Path) -> dict:
    lake, out = workdir / "lake-native", workdir / "native.json"
    shutil.rmtree(lake, ignore_errors=True)
    cmd = [sys.executable, "-m", "tracepipe.cli", "ingest", "netflow", str(path), "--lake", str(lake)]
    with open(out, "wb") as handle:
        result = _run_measured([*cmd, "--format", "json"], stdout=handle, env=ENV)
    summary = json.loads(out.read_text())
    result["records"] = summary["totals"]["flows"]
    result["reader"] = summary["files"][0].get("reader", "")
    shutil.rmtree(lake, ignore_errors=True)
    return result


def measure_old_path(path: Path, workdir: Path) -> dict:
    lake, out = workdir / "lake-old", workdir / "old.txt"
    shutil.rmtree(lake, ignore_errors=True)
    with open(out, "wb") as handle:
        result = _run_measured([sys.executable, "-c", OLD_PATH, str(path), str(lake)], stdout=handle, env=ENV)
    result["records"] = int(out.read_text().split()[-1])
    shutil.rmtree(lake, ignore_errors=True)
    return result


def measure_nfdump(path: Path, workdir: Path) -> dict:
    cmd = [tool_path("nfdump"), "-r", str(path), "-q", "-N", "-o", NFDUMP_FORMAT]
    result = _run_measured(cmd, env=ENV)  # output to /dev/null
    count = subprocess.run(f"{' '.join(map(repr, cmd))} | wc -l", shell=True, capture_output=True, env=ENV)
    result["records"] = int(count.stdout.split()[0])
    return result


def _line(label: str, m: dict) -> str:
    return (
        f"  {label:44s} {m['records'] / m['seconds'] / 1e6:5.2f} M records/s  {m['seconds']:6.2f} s wall  "
        f"{m['cpu_seconds']:6.2f} s CPU ({m['records'] / m['cpu_seconds'] / 1e6:5.2f} M/CPU-s)  "
        f"peak RSS {m['peak_rss_mib']:5d} MiB"
    )


def bench(path: Path, label: str, workdir: Path, rounds: int) -> dict:
    measures = {
        "native": measure_native,
        "nfdump": measure_nfdump,
        "old path": measure_old_path,
        "reader": measure_reader,
    }
    runs: dict[str, list[dict]] = {name: [] for name in measures}
    for _ in range(rounds):  # interleaved: all see the same machine load
        for name, measure in measures.items():
            runs[name].append(measure(path, workdir))
    best = {name: min(r, key=lambda m: m["seconds"]) for name, r in runs.items()}
    native, nfdump, old = best["native"], best["nfdump"], best["old path"]

    def ratio(a: dict, b: dict, key: str) -> float:
        return (a["records"] / a[key]) / (b["records"] / b[key])

    print(
        f"{native['records']:>10,} records, {label} ({path.stat().st_size / 1e6:.0f} MB), best of {rounds}:"
    )
    print(_line(f"tracepipe ingest netflow (native: {native['reader']})", native))
    print(_line("nfdump -r FILE -o fmt:%tsr,... > /dev/null", nfdump))
    print(_line("old path: nfdump -o fmt: | text reader -> lake", old))
    print(_line("native reader alone (no start-up, no lake)", best["reader"]))
    print(
        f"  native / nfdump: {ratio(native, nfdump, 'seconds'):.2f}x wall, "
        f"{ratio(native, nfdump, 'cpu_seconds'):.2f}x per CPU second;  native / old path: "
        f"{ratio(native, old, 'seconds'):.2f}x wall, {ratio(native, old, 'cpu_seconds'):.2f}x per CPU second;  "
        f"reader alone / nfdump: {ratio(best['reader'], nfdump, 'seconds'):.2f}x wall, "
        f"{ratio(best['reader'], nfdump, 'cpu_seconds'):.2f}x per CPU second"
    )
    if len({native["records"], nfdump["records"], old["records"]}) != 1:
        print(
            f"  (records: native {native['records']:,}, nfdump {nfdump['records']:,}, old {old['records']:,})"
        )
    return {
        "file": label,
        "records": native["records"],
        "best": best,
        "ratio_wall": ratio(native, nfdump, "seconds"),
        "ratio_cpu": ratio(native, nfdump, "cpu_seconds"),
        "ratio_old_wall": ratio(native, old, "seconds"),
        "ratio_reader_cpu": ratio(best["reader"], nfdump, "cpu_seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(float(x)) for x in text.split(",")],
        default=[1_000_000, 3_000_000],
        help="records per nfcapd file, comma-separated (default 1000000,3000000)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per file; the best counts")
    parser.add_argument("--lz4", action="store_true", help="also the same file LZ4-compressed (nfdump -y)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="tracepipe-nfcapd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        datagram = real_v9_datagram(workdir)
        load = os.getloadavg()
        print(f"{os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
        results = []
        for size in args.sizes:
            pcap = workdir / f"v9-{size}.pcap"
            build_capture(datagram, size, pcap)
            path = replay_to_nfcapd(pcap, workdir)
            pcap.unlink()
            results.append(bench(path, "uncompressed", workdir, args.rounds))
            if args.lz4:
                lz4 = workdir / f"nfcapd-{size}.lz4"
                subprocess.run([tool_path("nfdump"), "-r", str(path), "-y", "-w", str(lz4)], check=True)
                results.append(bench(lz4, "LZ4", workdir, args.rounds))
                lz4.unlink()
            shutil.rmtree(path.parent)
        print(json.dumps({"load_average": load, "results": results}))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
