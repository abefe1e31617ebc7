"""Floors of reading nfdump CSV (issue 17): how fast can any reader turn `nfdump -o csv` text into the 13 columns
tracepipe keeps, next to nfdump printing the same records, and what the rest of tracepipe's CSV path costs.

Each candidate runs in a fresh interpreter on the same file (start-up included, as a user pays it), interleaved
with the others and with nfdump, best of `--rounds` by CPU; wall clock and CPU seconds of the process tree:
  - pyarrow.csv, the 13 columns as text (all cores): today's tokeniser, nothing converted,
  - pyarrow.csv typed (times as timestamps, counts as integers): converted in the tokeniser,
  - polars read_csv typed (all cores), DuckDB read_csv typed (2 threads) into Arrow,
  - numpy: separator positions only (one pass for commas and newlines, 48 fields a line checked), 16 MB blocks,
  - numpy: every field parsed as well (benchmarks/csv_numpy_parser.py, a prototype), 16 MB blocks, one thread,
  - tracepipe's reader, one thread: nfdump.CsvRange.decode over the file's ranges (what a decode worker does),
  - the fixed parts of an ingest: SHA-256 of the file (as lake.hash_file, the manifest's identity) and a whole
    `tracepipe ingest netflow` of a one-record CSV (start-up, lake, commit).

    python benchmarks/csv_floors.py                          # makes a 1 M-record nfdump CSV (real softflowd + nfcapd)
    python benchmarks/csv_floors.py --csv F.csv --nfcapd F   # on files you have (nfdump -r F -o csv > F.csv)
    python benchmarks/csv_floors.py --check F.csv            # the numpy prototype gives tracepipe's rows?
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

import netflow_ingest as bench  # noqa: E402  (also puts this checkout first on sys.path)

from tracepipe.ingest.nfdump import _NEEDED, CSV_COLUMNS  # noqa: E402

# Each floor: Python source run as `python -c SOURCE FILE`; it prints the records it read.
_PRELUDE = f"""
import sys
sys.path[:0] = [{str(bench.REPO)!r}, {str(HERE)!r}]
COLUMNS, NEEDED = {list(CSV_COLUMNS)!r}, {list(_NEEDED)!r}
path = sys.argv[1]
"""
_PYARROW = """
import pyarrow as pa, pyarrow.csv as c
types = {name: pa.string() for name in NEEDED}
if TYPED:
    types.update({name: pa.int64() for name in ("sp", "ipkt", "ibyt", "in", "out")})
    types.update(ts=pa.timestamp("s"), te=pa.timestamp("s"))
reader = c.open_csv(path, read_options=c.ReadOptions(column_names=COLUMNS, skip_rows=1, block_size=1 << 21),
    parse_options=c.ParseOptions(quote_char=False, invalid_row_handler=lambda row: "skip"),
    convert_options=c.ConvertOptions(include_columns=NEEDED, strings_can_be_null=False, column_types=types))
print(sum(batch.num_rows for batch in reader))
"""
_POLARS = """
import polars as pl
schema = {name: pl.String for name in COLUMNS}
schema.update({name: pl.Int64 for name in ("sp", "ipkt", "ibyt", "in", "out")})
frame = pl.read_csv(path, has_header=False, skip_rows=1, schema=schema, quote_char=None, ignore_errors=True,
                    columns=[COLUMNS.index(name) for name in NEEDED])
frame = frame.with_columns(pl.col(c).str.strptime(pl.Datetime, "%Y-%m-%d %H:%M:%S", strict=False)
                           for c in ("ts", "te"))
print(frame.height)
"""
_DUCKDB = """
import duckdb
types = {name: "VARCHAR" for name in COLUMNS}
types.update({name: "BIGINT" for name in ("sp", "ipkt", "ibyt", "in", "out")}, ts="TIMESTAMP", te="TIMESTAMP")
con = duckdb.connect(config={"threads": 2})
query = ("select " + ",".join(f'"{n}"' for n in NEEDED) + " from read_csv(?, header=false, skip=1, columns="
         + str(types) + ", delim=',', quote='', escape='', auto_detect=false, ignore_errors=true)")
print(con.sql(query, params=[path]).to_arrow_table().num_rows)
"""
_BLOCKS = """
import os
def blocks(size=1 << 24):
    with open(path, "rb") as handle:
        handle.readline()
        carry = b""
        while data := handle.read(size):
            data = carry + data
            cut = data.rfind(b"\\n") + 1
            carry = data[cut:]
            yield data[:cut]
"""
_NUMPY_TOKENS = (
    _BLOCKS
    + """
import numpy as np
rows = 0
for data in blocks():
    buf = np.frombuffer(data, np.uint8)
    cuts = np.flatnonzero((buf == 44) | (buf == 10))
    at_newline = np.flatnonzero(buf[cuts] == 10)
    before = np.concatenate(([-1], at_newline[:-1]))
    rows += int(np.count_nonzero(at_newline - before == 48))
print(rows)
"""
)
_NUMPY_FIELDS = (
    _BLOCKS
    + """
import csv_numpy_parser
print(sum(csv_numpy_parser.lines(data, "s").table.num_rows for data in blocks()))
"""
)
_READER = """
from tracepipe.ingest.nfdump import nfdump_csv_ranges
print(sum(job.decode().flows.num_rows for job in nfdump_csv_ranges(path, "s")))
"""
_SHA256 = """
import hashlib  # what lake.hash_file does (4 MB reads), without tracepipe's imports
digest = hashlib.sha256()
with open(path, "rb") as handle:
    while block := handle.read(1 << 22):
        digest.update(block)
print(digest.hexdigest()[:12])
"""
FLOORS = {
    "pyarrow.csv, 13 columns as text (all cores)": "TYPED = False\n" + _PYARROW,
    "pyarrow.csv typed: times, integers (all cores)": "TYPED = True\n" + _PYARROW,
    "polars read_csv typed (all cores)": _POLARS,
    "DuckDB read_csv typed (2 threads)": _DUCKDB,
    "numpy: separator positions only": _NUMPY_TOKENS,
    "numpy: every field parsed (prototype)": _NUMPY_FIELDS,
    "tracepipe's reader, one thread (CsvRange)": _READER,
    "SHA-256 of the file (manifest)": _SHA256,
}


def measure_floor(name: str, csv_file: Path) -> dict:
    return bench._run_measured([sys.executable, "-c", _PRELUDE + FLOORS[name], str(csv_file)])


def measure_fixed_ingest(workdir: Path, csv_file: Path) -> dict:
    """A whole `tracepipe ingest netflow` of the CSV's header and first record: what every ingest pays (start-up,
    lake, commit) whatever the size."""
    one = workdir / "one-record.csv"
    with open(csv_file, "rb") as handle:
        one.write_bytes(handle.readline() + handle.readline())
    return bench.measure_tracepipe(one, workdir / "lake-one", 1)


def check(csv_file: Path) -> None:
    """The numpy prototype against tracepipe's reader, value for value, on every line it takes."""
    import csv_numpy_parser
    import pyarrow as pa

    from tracepipe.ingest.nfdump import read_nfdump_csv
    from tracepipe.lake import conform
    from tracepipe.schema import FLOWS

    expected, _ = read_nfdump_csv(csv_file)
    data = csv_file.read_bytes()
    body = data[data.index(b"\n") + 1 :]
    parts, at = [], 0
    while at < len(body):
        cut = body.rfind(b"\n", at, at + (1 << 24)) + 1 or len(body)
        parts.append(conform(csv_numpy_parser.lines(body[at:cut], str(csv_file)).table, FLOWS))
        at = cut
    got = pa.concat_tables(parts)
    same = [name for name in FLOWS.names if got.column(name).equals(expected.column(name))]
    print(
        json.dumps({"rows": [got.num_rows, expected.num_rows], "columns equal": len(same), "of": len(FLOWS)})
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--records", type=int, default=1_000_000, help="records of the CSV made (default 1 M)"
    )
    parser.add_argument("--csv", type=Path, help="an nfdump CSV to read instead of making one")
    parser.add_argument("--nfcapd", type=Path, help="the nfcapd file it was printed from (nfdump's timing)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs; the least CPU counts")
    parser.add_argument("--check", type=Path, help="only compare the numpy prototype with the reader")
    args = parser.parse_args()
    if args.check:
        check(args.check)
        return
    workdir = Path(tempfile.mkdtemp(prefix="tracepipe-csv-floors-"))
    try:
        csv_file, nffile = args.csv, args.nfcapd
        if csv_file is None:
            pcap = workdir / "v9.pcap"
            bench.build_capture(bench.real_v9_datagram(workdir), args.records, pcap)
            nffile = bench.replay_to_nfcapd(pcap, workdir)
            csv_file = bench.write_nfdump_csv(nffile, workdir / "v9.csv")
        records = sum(1 for _ in open(csv_file, "rb")) - 4  # header and the 3 lines of the Summary
        load = os.getloadavg()
        print(
            f"{os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {records:,} records, "
            f"{csv_file.stat().st_size / 1e6:.0f} MB of CSV"
        )
        runs: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            if nffile is not None:
                runs.setdefault("nfdump -o fmt:%tsr,... (the nfcapd file)", []).append(
                    bench.measure_nfdump(nffile)
                )
            for name in FLOORS:
                runs.setdefault(name, []).append(measure_floor(name, csv_file))
            runs.setdefault("tracepipe ingest of one record (fixed cost)", []).append(
                measure_fixed_ingest(workdir, csv_file)
            )
            runs.setdefault("tracepipe ingest netflow FILE.csv --jobs 1", []).append(
                bench.measure_tracepipe(csv_file, workdir / "lake", 1)
            )
        best = {name: min(found, key=lambda m: m["cpu_seconds"]) for name, found in runs.items()}
        nf = next((m for name, m in best.items() if name.startswith("nfdump")), None)
        per = 1e6 / records
        print(f"best of {args.rounds} by CPU, per 1 M records:")
        for name, m in best.items():
            ratio = (
                f"  {nf['seconds'] / m['seconds']:5.2f}x nfdump wall, {nf['cpu_seconds'] / m['cpu_seconds']:5.2f}x "
                f"per CPU s"
                if nf
                else ""
            )
            print(
                f"  {name:48s} {m['seconds'] * per:6.2f} s wall {m['cpu_seconds'] * per:6.2f} s CPU "
                f"{m['peak_rss_mib']:5d} MiB{ratio}"
            )
        if nf:
            print(
                f"  2x nfdump wall would leave {nf['seconds'] / 2 * per:.2f} s for the whole CSV path per 1 M "
                f"records; the fixed ingest alone takes "
                f"{best['tracepipe ingest of one record (fixed cost)']['seconds']:.2f} s, the hash "
                f"{best['SHA-256 of the file (manifest)']['seconds'] * per:.2f} s"
            )
        print(json.dumps({"load_average": load, "records": records, "best": best}))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
