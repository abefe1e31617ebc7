"""nfcapd ingest speed (issue 17): tracepipe's native nfcapd reader, with its decode workers (`--jobs`, default
the cores) and in one process, against nfdump reading the same file, and against the nfdump-subprocess path.

1. Builds the nfcapd files the way benchmarks/netflow_ingest.py does (reused): one real softflowd v9 datagram,
   a synthetic capture of the smallest size's records in its template, replayed over UDP to a real nfcapd on
   127.0.0.1 (nfcapd's default: uncompressed; `--lz4` adds each file rewritten by `nfdump -y`). The bigger
   sizes repeat that file's data blocks (whole blocks, as nfcapd wrote them) up to their record count: a 10 M
   record replay takes minutes and nfcapd drops datagrams on a busy machine.
2. Runs, interleaved, best of 3 (`--rounds`), each a child process measured for wall seconds, CPU seconds
   (user + sys of the tree) and peak RSS of the whole process tree (decode workers included):
   - native: `tracepipe ingest netflow FILE --lake L --format json` (as a user runs it: hashing, decode
     workers, Parquet, commit, manifest and attribution included),
   - native, one process: the same with `--jobs 1`,
   - nfdump: `nfdump -r FILE -q -N -o 'fmt:%tsr,%ter,%pr,%sa,%da,%sp,%dp,%pkt,%byt,%flg' > /dev/null`,
   - old path (files of at most `--old-max` records): the same file through `nfdump -o fmt:` and tracepipe's
     text reader into a lake (iter_nfcapd(native=False)), what `ingest netflow` did before issue 17,
   - the native reader alone: nffile.iter_nffile into Arrow batches, timed inside its process (no interpreter
     start, no lake): what the reader costs next to nfdump, whatever the lake costs,
   and prints records/s, CPU seconds, peak RSS and the ratios native / nfdump, native / one process and
   native / old path.

    python benchmarks/nfcapd_ingest.py                          # 1 M, 3 M and 10 M records (~4 GB of disk)
    python benchmarks/nfcapd_ingest.py --sizes 200000 --rounds 1  # quick, while developing
    python benchmarks/nfcapd_ingest.py --timeline                  # and how busy each process was over time
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

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]

from netflow_ingest import (  # noqa: E402
    NFDUMP_FORMAT,
    _run_measured,
    build_capture,
    real_v9_datagram,
    replay_to_nfcapd,
)

from tracepipe.ingest import nffile  # noqa: E402
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


def measure_native(path: Path, workdir: Path, jobs: int | None = None, timeline: bool = False) -> dict:
    lake, out = workdir / "lake-native", workdir / "native.json"
    shutil.rmtree(lake, ignore_errors=True)
    cmd = [sys.executable, "-m", "tracepipe.cli", "ingest", "netflow", str(path), "--lake", str(lake)]
    cmd += ["--jobs", str(jobs)] if jobs else []
    with open(out, "wb") as handle:
        result = _run_measured([*cmd, "--format", "json"], stdout=handle, env=ENV, timeline=timeline)
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


def compose(base: Path, records: int, out: Path) -> Path:
    """An nfcapd file of at least `records` records: `base`'s data blocks repeated, whole (nfdump reads it as
    it reads `base`: block count and appendix offset set to match)."""
    data = base.read_bytes()
    header = np.frombuffer(data[: nffile.FILE_HEADER.itemsize], nffile.FILE_HEADER).copy()
    at, blocks, counts = nffile.FILE_HEADER.itemsize, [], []
    for _ in range(int(header["num_blocks"][0])):
        block = np.frombuffer(data[at : at + nffile.BLOCK_HEADER.itemsize], nffile.BLOCK_HEADER)[0]
        end = at + nffile.BLOCK_HEADER.itemsize + int(block["size"])
        blocks.append(data[at:end])
        counts.append(int(block["records"]))
        at = end
    appendix = data[at:]
    with open(out, "wb") as handle:
        handle.write(bytes(header.nbytes))  # the header, written again once the blocks are counted
        written = n = 0
        while written < records:
            for raw, count in zip(blocks, counts, strict=True):
                handle.write(raw)
                written, n = written + count, n + 1
                if written >= records:
                    break
        header["num_blocks"] = n
        header["off_appendix"] = handle.tell()
        handle.write(appendix)
        handle.seek(0)
        handle.write(header.tobytes())
    return out


def bench(path: Path, label: str, workdir: Path, rounds: int, old_path: bool, timeline: bool = False) -> dict:
    measures = {
        "native": lambda path, workdir: measure_native(path, workdir, timeline=timeline),
        "one process": lambda path, workdir: measure_native(path, workdir, jobs=1),
        "nfdump": measure_nfdump,
        "reader": measure_reader,
    }
    if old_path:
        measures["old path"] = measure_old_path
    runs: dict[str, list[dict]] = {name: [] for name in measures}
    for _ in range(rounds):  # interleaved: all see the same machine load
        for name, measure in measures.items():
            runs[name].append(measure(path, workdir))
    best = {name: min(r, key=lambda m: m["seconds"]) for name, r in runs.items()}
    native, single, nfdump, old = best["native"], best["one process"], best["nfdump"], best.get("old path")

    def ratio(a: dict, b: dict, key: str) -> float:
        return (a["records"] / a[key]) / (b["records"] / b[key])

    print(
        f"{native['records']:>10,} records, {label} ({path.stat().st_size / 1e6:.0f} MB), best of {rounds}:"
    )
    print(_line(f"tracepipe ingest netflow (native: {native['reader']})", native))
    print(_line("tracepipe ingest netflow --jobs 1", single))
    print(_line("nfdump -r FILE -o fmt:%tsr,... > /dev/null", nfdump))
    if old is not None:
        print(_line("old path: nfdump -o fmt: | text reader -> lake", old))
    print(_line("native reader alone (no start-up, no lake)", best["reader"]))
    print(
        f"  native / nfdump: {ratio(native, nfdump, 'seconds'):.2f}x wall, "
        f"{ratio(native, nfdump, 'cpu_seconds'):.2f}x per CPU second;  --jobs 1 / nfdump: "
        f"{ratio(single, nfdump, 'seconds'):.2f}x wall;  native / --jobs 1: {ratio(native, single, 'seconds'):.2f}x "
        f"wall;  reader alone / nfdump: {ratio(best['reader'], nfdump, 'cpu_seconds'):.2f}x per CPU second"
        + (
            f";  native / old path: {ratio(native, old, 'seconds'):.2f}x wall, "
            f"{ratio(native, old, 'cpu_seconds'):.2f}x per CPU second"
            if old is not None
            else ""
        )
    )
    if "timeline" in native:  # where a core waited on another (--jobs 2)
        print(native["timeline"])
    for run in runs["native"]:
        run.pop("timeline", None)
    counts = {name: m["records"] for name, m in best.items() if name != "reader"}
    if len(set(counts.values())) != 1:
        print(f"  (records differ: {counts})")
    return {
        "file": label,
        "records": native["records"],
        "best": best,
        "ratio_wall": ratio(native, nfdump, "seconds"),
        "ratio_cpu": ratio(native, nfdump, "cpu_seconds"),
        "ratio_one_process_wall": ratio(single, nfdump, "seconds"),
        "ratio_old_wall": ratio(native, old, "seconds") if old is not None else None,
        "ratio_reader_cpu": ratio(best["reader"], nfdump, "cpu_seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(float(x)) for x in text.split(",")],
        default=[1_000_000, 3_000_000, 10_000_000],
        help="records per nfcapd file, comma-separated (default 1000000,3000000,10000000)",
    )
    parser.add_argument(
        "--old-max",
        type=lambda text: int(float(text)),
        default=3_000_000,
        help="run the old nfdump-text path on files of at most this many records (default 3000000)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per file; the best counts")
    parser.add_argument("--lz4", action="store_true", help="also the same file LZ4-compressed (nfdump -y)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    parser.add_argument(
        "--timeline", action="store_true", help="print how busy each process of the best native run was"
    )
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="tracepipe-nfcapd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        sizes = sorted(args.sizes)
        need = sum(sizes) * 105 * (2 if args.lz4 else 1) * 1.5  # ~104 bytes a record, plus the lakes
        free = shutil.disk_usage(workdir).free
        if free < need:
            sys.exit(
                f"{free / 1e9:.1f} GB free in {workdir}, these sizes need ~{need / 1e9:.1f} GB: use --sizes"
            )
        datagram = real_v9_datagram(workdir)
        load = os.getloadavg()
        print(f"{os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
        pcap = workdir / f"v9-{sizes[0]}.pcap"
        build_capture(datagram, sizes[0], pcap)
        base = replay_to_nfcapd(pcap, workdir)
        pcap.unlink()
        results = []
        for size in sizes:
            path = base if size == sizes[0] else compose(base, size, workdir / f"nfcapd-{size}")
            results.append(
                bench(path, "uncompressed", workdir, args.rounds, size <= args.old_max, args.timeline)
            )
            if args.lz4:
                lz4 = workdir / f"nfcapd-{size}.lz4"
                subprocess.run([tool_path("nfdump"), "-r", str(path), "-y", "-w", str(lz4)], check=True)
                results.append(bench(lz4, "LZ4", workdir, args.rounds, size <= args.old_max))
                lz4.unlink()
            if path != base:
                path.unlink()
        shutil.rmtree(base.parent)
        print(json.dumps({"load_average": load, "results": results}))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
