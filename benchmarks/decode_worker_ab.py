"""CPU per record of one decode worker of `tracepipe ingest netflow --jobs 2`, this checkout against another one
(e.g. main), interleaved, on the same input (issue 17).

A worker's share is every other batch of a capture (walked first, not timed: that is the main process's part)
or every other block range of an nfcapd file; the worker's part is timed: columns (decode_walked / read_range),
the plausible-time split, the day files' row groups sorted and written as Parquet. Figures are process CPU
seconds (resource.getrusage: user + system, all threads) per record, min and median over `--rounds` alternating
fresh interpreters, and the bytes of the files written (a site keeps years of them). Captures come from
benchmarks/netflow_ingest.py (`--keep DIR`), nfcapd files from benchmarks/nfcapd_ingest.py.

    python benchmarks/decode_worker_ab.py --baseline /path/to/main FILE.pcap|nfcapd.FILE [--rounds 5]

`--ipv4-integers`: this checkout decodes with decode_walked / nffile.read_range(job, ipv4_as_integers=True)
(IPv4 addresses formatted by the writer once per row group), as a worker does once decode_pool passes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# runs inside a fresh interpreter with one checkout first on sys.path: TREE INPUT INTEGERS(0/1)
_MEASURE = """
import json, resource, shutil, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import tracepipe
assert tracepipe.__file__.startswith(sys.argv[1]), tracepipe.__file__
from tracepipe.ingest import nffile
from tracepipe.ingest.flows import BATCH_DATAGRAMS, sniff_kind
from tracepipe.ingest.netflow import DecoderState, decode_walked, walk_datagrams
from tracepipe.ingest.pcap import iter_udp_batches
from tracepipe.lake import DayParts, ROW_GROUP_ROWS, split_implausible
from tracepipe.schema import DATASETS
path = Path(sys.argv[2])
pcap = sniff_kind(path) == "pcap"
if pcap:
    state = DecoderState()
    jobs = [walk_datagrams(b.payloads, b.exporters, b.ts_us, b.offsets, "x", state)[0]
            for b in iter_udp_batches(path, batch_datagrams=BATCH_DATAGRAMS)][0::2]
else:
    jobs = list(nffile.iter_ranges(path, "x", parts=4))[0::2]
root = Path(tempfile.mkdtemp())
usage = resource.getrusage(resource.RUSAGE_SELF)
parts = DayParts(root, DATASETS["flows"], "0" * 16, max(ROW_GROUP_ROWS // 4, 100_000))  # as with --jobs 2
rows = 0
for job in jobs:
    integers = {"ipv4_as_integers": True} if sys.argv[3] == "1" else {}
    flows = decode_walked(job, **integers).flows if pcap else nffile.read_range(job, **integers)[0]
    rows += parts.write(split_implausible(flows, DATASETS["flows"])[0])
size = sum(add.size for add in parts.close())
after = resource.getrusage(resource.RUSAGE_SELF)
shutil.rmtree(root)
cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
print(json.dumps({"records": rows, "cpu_s": cpu, "bytes": size}))
"""


def measure(tree: Path, path: Path, integers: bool = False) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tree), str(path), "1" if integers else "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", type=Path, help="a pcap of NetFlow/IPFIX datagrams or an nfcapd file")
    parser.add_argument("--baseline", type=Path, required=True, help="checkout to compare with (e.g. main)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--ipv4-integers",
        action="store_true",
        help="this checkout: decode_walked(..., ipv4_as_integers=True)",
    )
    args = parser.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this": REPO}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(measure(tree, args.input, args.ipv4_integers and name == "this"))
    for name, results in runs.items():
        records = results[0]["records"]
        per = [r["cpu_s"] / records * 1e6 for r in results]
        print(
            f"{name:8s} {records:,} records: {min(per):.3f} us/record min, {statistics.median(per):.3f} median"
            f" (CPU of one worker's share); files {results[0]['bytes']:,} bytes"
            f" ({results[0]['bytes'] / records:.2f} a record)"
        )
    base = min(r["cpu_s"] for r in runs["baseline"])
    this = min(r["cpu_s"] for r in runs["this"])
    print(f"this / baseline CPU: {this / base:.3f} (min of {args.rounds} alternating rounds)")


if __name__ == "__main__":
    main()
