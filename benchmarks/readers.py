"""Reader speed (issue 14): Zeek conn.log (TSV, JSON, gzip'ed TSV), argus ra CSV and nfcapd files, each landed
in a lake by the real CLI (`tracepipe ingest zeek|argus|netflow`, one core), next to the floor each reader
cannot beat: the same file read by the tool that wrote it (nfdump's text output for nfcapd) or parsed by pyarrow
alone (its CSV reader into strings, no checks, no lake) for the text forms.

1. Generates N connections (numpy: addresses, ports, protocols, Zeek states/histories, counters, times) and
   writes them as a Zeek TSV conn.log (+ .gz), Zeek JSON lines and an argus `ra -u -c , -L0` CSV.
2. For nfcapd: synthesises a NetFlow v9 capture of N records in the real softflowd template
   (benchmarks/netflow_ingest.py) and replays it over UDP to a real nfcapd on 127.0.0.1.
3. Every measurement is a child process (wall seconds, CPU seconds user+sys, peak RSS), the rows per CPU second
   and the ratio to the floor are printed per input, all interleaved in one run so that load affects both alike.

    python benchmarks/readers.py [--connections 1000000] [--skip-nfcapd] [--keep DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]

from netflow_ingest import _run_measured, build_capture, real_v9_datagram, replay_to_nfcapd  # noqa: E402

from tracepipe.ingest.nfdump import NFDUMP_FMT  # noqa: E402
from tracepipe.tools import tool_path  # noqa: E402

ZEEK_HEADER = (
    "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n#path\tconn\n"
    "#open\t2024-03-12-00-00-00\n"
    "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice\tduration\torig_bytes\t"
    "resp_bytes\tconn_state\tlocal_orig\tlocal_resp\tmissed_bytes\thistory\torig_pkts\torig_ip_bytes\t"
    "resp_pkts\tresp_ip_bytes\ttunnel_parents\n"
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount\tcount\tstring\tbool\tbool\t"
    "count\tstring\tcount\tcount\tcount\tcount\tset[string]\n"
)
STATES = np.array(["SF", "S0", "REJ", "RSTO", "RSTR", "SF", "SF", "OTH"])
HISTORIES = np.array(["ShADadFf", "S", "Sr", "ShADadR", "ShADadr", "ShAdDaFf", "Dd", "D"])


def connections(n: int, seed: int = 7) -> pa.Table:
    """n synthetic conn.log rows (Zeek's column names), vectorised."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, len(STATES), n)
    proto = np.where(kind >= 6, "udp", "tcp")

    def addr(prefix: str, k: int) -> pa.Array:
        pool = pa.array([f"{prefix}.{i // 250}.{i % 250 + 1}" for i in range(k)])
        return pool.take(pa.array(rng.integers(0, k, n)))

    ts = 1_710_201_600 + np.sort(rng.random(n)) * 86_400
    orig_pkts = rng.integers(1, 40, n)
    resp_pkts = np.where(np.isin(kind, (1,)), 0, rng.integers(1, 40, n))
    return pa.table(
        {
            "ts": pa.array(np.char.mod("%.6f", ts)),
            "uid": pa.array(np.char.add("C", np.char.mod("%012d", np.arange(n)))),
            "id.orig_h": addr("10.20", 2000),
            "id.orig_p": rng.integers(1024, 65535, n),
            "id.resp_h": addr("192.0", 20000),
            "id.resp_p": rng.choice([22, 53, 80, 443, 8080, 2222, 5000], n),
            "proto": pa.array(proto),
            "service": pa.array(["-"] * n),
            "duration": pa.array(np.char.mod("%.6f", rng.exponential(2.0, n))),
            "orig_bytes": orig_pkts * 60,
            "resp_bytes": resp_pkts * 400,
            "conn_state": pa.array(STATES[kind]),
            "local_orig": pa.array(["T"] * n),
            "local_resp": pa.array(["F"] * n),
            "missed_bytes": np.zeros(n, np.int64),
            "history": pa.array(HISTORIES[kind]),
            "orig_pkts": orig_pkts,
            "orig_ip_bytes": orig_pkts * 112,
            "resp_pkts": resp_pkts,
            "resp_ip_bytes": resp_pkts * 452,
            "tunnel_parents": pa.array(["-"] * n),
        }
    )


def write_inputs(table: pa.Table, workdir: Path) -> dict[str, Path]:
    paths = {"zeek-tsv": workdir / "conn.log", "zeek-json": workdir / "conn.json.log"}
    with open(paths["zeek-tsv"], "wb") as handle:
        handle.write(ZEEK_HEADER.encode())
        pacsv.write_csv(
            table,
            handle,
            pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none"),
        )
        handle.write(b"#close\t2024-03-13-00-00-00\n")
    paths["zeek-tsv.gz"] = workdir / "conn.log.gz"
    with open(paths["zeek-tsv"], "rb") as src, gzip.open(paths["zeek-tsv.gz"], "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    frame = pl.from_arrow(table.drop_columns(["service", "tunnel_parents", "local_orig", "local_resp"]))
    frame = frame.with_columns(pl.col("ts").cast(pl.Float64), pl.col("duration").cast(pl.Float64))
    frame.write_ndjson(paths["zeek-json"])
    total = pa.compute.add(table.column("orig_pkts"), table.column("resp_pkts"))
    argus = pa.table(
        {
            "StartTime": table.column("ts"),
            "Dur": table.column("duration"),
            "Proto": table.column("proto"),
            "SrcAddr": table.column("id.orig_h"),
            "Sport": table.column("id.orig_p"),
            "Dir": pa.array(["   ->"] * table.num_rows),
            "DstAddr": table.column("id.resp_h"),
            "Dport": table.column("id.resp_p"),
            "State": pa.array(np.where(np.array(table.column("conn_state")) == "S0", "S_", "SPA_SPA")),
            "TotPkts": total,
            "TotBytes": pa.compute.add(table.column("orig_ip_bytes"), table.column("resp_ip_bytes")),
            "SrcBytes": table.column("orig_ip_bytes"),
            "SrcPkts": table.column("orig_pkts"),
            "DstPkts": table.column("resp_pkts"),
            "DstBytes": table.column("resp_ip_bytes"),
        }
    )
    paths["argus"] = workdir / "flows.ra.csv"
    with open(paths["argus"], "wb") as handle:  # ra's -L0 header is not quoted (pyarrow's would be)
        handle.write((",".join(argus.column_names) + "\n").encode())
        pacsv.write_csv(argus, handle, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    return paths


def measure_ingest(command: str, path: Path, lake: Path) -> dict:
    env = dict(os.environ, POLARS_MAX_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "tracepipe.cli", "ingest", command, str(path), "--lake", str(lake)]
    cmd += ["--format", "json"]
    out = lake.parent / f"{lake.name}.json"
    with open(out, "wb") as handle:
        result = _run_measured(cmd, stdout=handle, env=env)
    summary = json.loads(out.read_text())
    return {**result, "rows": summary["totals"]["flows"], "rejects": summary["totals"]["rejects"]}


FLOOR = """
import sys, pyarrow as pa, pyarrow.csv as c
delimiter, skip = sys.argv[2], int(sys.argv[3])
opts = c.ReadOptions(skip_rows=skip, autogenerate_column_names=True, use_threads=False)
reader = c.open_csv(sys.argv[1], read_options=opts,
    parse_options=c.ParseOptions(delimiter=delimiter, quote_char=False, invalid_row_handler=lambda r: "skip"),
    convert_options=c.ConvertOptions(strings_can_be_null=False, column_types={f"f{i}": pa.string() for i in range(30)}))
print(sum(b.num_rows for b in reader))
"""


def measure_floor(path: Path, delimiter: str, skip: int) -> dict:
    cmd = [sys.executable, "-c", FLOOR, str(path), delimiter, str(skip)]
    return _run_measured(cmd)


def measure_nfdump(nfcapd_file: Path) -> dict:
    env = dict(os.environ, TZ="UTC")
    cmd = [tool_path("nfdump"), "-r", str(nfcapd_file), "-q", "-N", "-6", "-o", NFDUMP_FMT]
    return _run_measured(cmd, env=env)


def line(label: str, m: dict, rows: int, floor: dict | None, floor_label: str, fixed: float) -> str:
    net = max(m["cpu_seconds"] - fixed, 1e-9)
    m["net_rows_per_cpu_second"] = rows / net
    text = (
        f"{label:34s} {rows:>10,} rows  {m['seconds']:6.2f} s wall  {m['cpu_seconds']:6.2f} s CPU  "
        f"net {rows / net / 1e6:5.2f} M rows/CPU-s  peak {m['peak_rss_mib']:5d} MiB"
    )
    if floor:
        text += f"  | {floor_label}: {floor['cpu_seconds']:5.2f} s CPU, ratio {m['cpu_seconds'] / max(floor['cpu_seconds'], 1e-9):4.1f}x"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=1_000_000)
    parser.add_argument("--skip-nfcapd", action="store_true", help="no nfcapd part (needs nfcapd, tcpdump)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="tracepipe-readers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    try:
        table = connections(args.connections)
        paths = write_inputs(table, workdir)
        sizes = {k: round(p.stat().st_size / 1e6, 1) for k, p in paths.items()}
        print(f"{args.connections:,} connections; input sizes MB: {sizes}")
        runs = [
            ("zeek TSV", "zeek", paths["zeek-tsv"], ("\t", 8)),
            ("zeek TSV .gz", "zeek", paths["zeek-tsv.gz"], None),
            ("zeek JSON", "zeek", paths["zeek-json"], None),
            ("argus ra CSV", "argus", paths["argus"], (",", 1)),
        ]
        # the fixed cost of one CLI run (interpreter, imports, lake commit): a one-connection log
        tiny = workdir / "tiny.log"
        tiny.write_bytes(paths["zeek-tsv"].read_bytes()[: len(ZEEK_HEADER) + 400].rsplit(b"\n", 1)[0] + b"\n")
        fixed = measure_ingest("zeek", tiny, workdir / "lake-tiny")
        results["fixed cost"] = fixed
        print(
            f"{'fixed cost of one CLI run':34s} {fixed['rows']:>10,} rows  {fixed['seconds']:6.2f} s wall  "
            f"{fixed['cpu_seconds']:6.2f} s CPU  (subtracted below in 'net')"
        )
        for i, (label, command, path, floor_args) in enumerate(runs):
            floor = measure_floor(path, *floor_args) if floor_args else None
            m = measure_ingest(command, path, workdir / f"lake-{i}")
            results[label] = {**m, "floor": floor, "input_mb": round(path.stat().st_size / 1e6, 1)}
            print(
                line(label + " -> lake", m, m["rows"], floor, "pyarrow CSV parse alone", fixed["cpu_seconds"])
            )
        if not args.skip_nfcapd:
            records = max(args.connections // 2, 1000)
            pcap = workdir / "v9.pcap"
            build_capture(real_v9_datagram(workdir), records, pcap)
            nffile = replay_to_nfcapd(pcap, workdir)
            floor = measure_nfdump(nffile)
            m = measure_ingest("netflow", nffile, workdir / "lake-nfcapd")
            results["nfcapd"] = {**m, "floor": floor, "input_mb": round(nffile.stat().st_size / 1e6, 1)}
            print(
                line(
                    "nfcapd (native) -> lake",
                    m,
                    m["rows"],
                    floor,
                    "nfdump -r -o fmt alone",
                    fixed["cpu_seconds"],
                )
            )
        print(json.dumps({"connections": args.connections, "results": results}))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
