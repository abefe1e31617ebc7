#!/usr/bin/env python3
"""Detection quality on PUBLIC labelled traffic nobody here made: each data set lands in a fresh lake through
the sensor path it was published for, the rule detectors run over it with the shipped nightly thresholds, and
the hosts they name are scored against the data set's own labels.

    python benchmarks/detection.py                 # every data set; a table
    python benchmarks/detection.py --format json   # the same figures for scripts
    python benchmarks/detection.py --only esnet-pcaps --ctu13 DIR   # DIR/*.binetflow: CTU-13 scenarios

Per data set: host-level precision and recall (a host is "alerted" when any alert names it as the actor),
PR-AUC (average precision) of two host scores -- the highest rule-alert score, and the anomaly model's highest
(host, hour) score (IsolationForest fitted on the same data, unsupervised) -- alerts per 100 benign hosts, and
the published figure for the same data where one exists. CPU seconds (getrusage) next to wall time.

Data sets (small excerpts with PROVENANCE in tests/data/detection/):
  esnet-pcaps      ESnet curated-pcaps: masscan TCP/UDP and nmap runs, plus a benign whois exchange, replayed
                   through the real softflowd (NetFlow v9 over UDP on 127.0.0.1, captured by tcpdump) and read
                   by `tracepipe ingest netflow`. Labels: the scanning host (the README's command) is malicious.
  esnet-argus      The same captures through the real argus, printed by `ra` in CTU-13's binetflow columns.
  ctu50-zeek       Stratosphere CTU-50 "normal" Windows hosts (CTU-Normal-40 day 1, CTU-Normal-44 day 2),
                   Zeek conn.log labelled per flow (Benign / Malicious = attacks from the Internet).
  ctu-njrat-zeek   Stratosphere CTU-Malware-Capture-Botnet-230-1 (NjRAT), first 1,000 conn.log lines, labelled.
  ctu13-binetflow  CTU-13 scenarios (argus bidirectional flows, "binetflow"), labelled per flow: not
                   committed (hundreds of MB); give --ctu13 DIR holding capture*.binetflow files. Without it
                   the row says so and how to get them (this machine is offline).
The labels of a data set never reach the detectors: they are read by this script only.

Setup (the same for every data set): every address is a watched host (local_networks = everything; the data
sets are seen from one sensor, not from a cloud), beacon.external_only = false (nothing is external then),
the rest as shipped in pipelines/nightly.toml. Exfiltration needs an outside, so it cannot fire here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gzip
import io
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

DATA = REPO / "tests" / "data" / "detection"
EVERYTHING = ["0.0.0.0/0", "::/0"]
# Relative Zeek timestamps (seconds since capture start) are placed here: the lake refuses 1970.
REBASE = dt.datetime(2017, 1, 2, tzinfo=dt.UTC)
SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08


@dataclass
class Loaded:
    flows: pa.Table | None  # schema.FLOWS rows (None: landed by the sensor path already)
    malicious: set[str]
    benign: set[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class Dataset:
    name: str
    sensor: str
    source: str
    published: str
    load: Callable[[Path, argparse.Namespace], Loaded | str]  # str: why it could not run


# ---- loaders: labelled public data -> flow rows (labels kept apart) ----------------------------------------
def _flows_frame(frame: pl.DataFrame, source: str) -> pa.Table:
    """Columns ts_start, ts_end, src_addr, dst_addr, src_port, dst_port, proto, packets, bytes, tcp_flags ->
    schema.FLOWS (the rest null or constant)."""
    from tracepipe.schema import FLOWS

    frame = frame.with_columns(
        ip_version=pl.when(pl.col("src_addr").str.contains(":")).then(6).otherwise(4).cast(pl.Int8),
        exporter=pl.lit(None, pl.String),
        input_if=pl.lit(0, pl.Int32),
        output_if=pl.lit(0, pl.Int32),
        sampling_interval=pl.lit(1, pl.Int32),
        source=pl.lit(source),
        src_vm=pl.lit(None, pl.String),
        dst_vm=pl.lit(None, pl.String),
        attributed_at=pl.lit(None, pl.Datetime("us", "UTC")),
    )
    return frame.select(FLOWS.names).to_arrow().cast(FLOWS)


def _direction(
    base: pl.DataFrame,
    ends: tuple[str, str],
    src_port: pl.Expr,
    dst_port: pl.Expr,
    volume: tuple[pl.Expr, pl.Expr],
    flags: pl.Expr,
) -> pl.DataFrame:
    """One direction of bidirectional records (columns _ts, _end, _proto prepared) as flow columns."""
    return base.select(
        ts_start=pl.col("_ts"),
        ts_end=pl.col("_end"),
        src_addr=pl.col(ends[0]),
        dst_addr=pl.col(ends[1]),
        src_port=src_port.cast(pl.Int32),
        dst_port=dst_port.cast(pl.Int32),
        proto=pl.col("_proto"),
        packets=volume[0],
        bytes=volume[1],
        tcp_flags=flags.cast(pl.Int16),
    )


def _history_flags(history: pl.Expr, letters: dict[str, int]) -> pl.Expr:
    out = pl.lit(0, pl.Int16)
    for letter, bits in letters.items():
        out = out | pl.when(history.str.contains(letter, literal=True)).then(bits).otherwise(0).cast(pl.Int16)
    return out


def read_zeek_conn(path: Path) -> tuple[pl.DataFrame, pa.Table]:
    """A Zeek conn.log (TSV, `#fields` header, gz or not) -> (the log as a frame, flow rows: one per direction
    that sent packets, bytes = IP bytes as NetFlow counts them, TCP flags from `history`: upper case = the
    originator's packets, lower case = the responder's). Stand-in until tracepipe.ingest.zeek lands."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    fields = next(
        line.split("\t")[1:]
        for line in raw.decode("utf-8", "replace").splitlines()
        if line.startswith("#fields")
    )
    log = pl.read_csv(
        io.BytesIO(raw),
        separator="\t",
        comment_prefix="#",
        has_header=False,
        new_columns=fields,
        null_values=["-", "(empty)"],
        infer_schema=False,
        quote_char=None,
    )
    if log.get_column("ts").cast(pl.Float64).max() < 1e9:  # relative times (seconds since capture start)
        log = log.with_columns((pl.col("ts").cast(pl.Float64) + REBASE.timestamp()).cast(pl.String))
    ts = (pl.col("ts").cast(pl.Float64) * 1e6).cast(pl.Int64)
    dur = (pl.col("duration").cast(pl.Float64).fill_null(0.0) * 1e6).cast(pl.Int64)
    proto = pl.col("proto").replace_strict({"tcp": 6, "udp": 17, "icmp": 1}, default=0).cast(pl.Int16)
    history = pl.col("history").fill_null("")
    is_icmp = pl.col("proto") == "icmp"
    count = lambda c: pl.col(c).cast(pl.Int64).fill_null(0)  # noqa: E731
    base = log.with_columns(
        _ts=ts,
        _end=ts + dur,
        _proto=proto,
        _op=pl.col("id.orig_p").cast(pl.Int32),
        _rp=pl.col("id.resp_p").cast(pl.Int32),
    )
    tcp = pl.col("proto") == "tcp"
    letters = {"S": SYN, "H": SYN | ACK, "A": ACK, "D": ACK | PSH, "F": FIN, "R": RST}
    orig = _direction(
        base,
        ("id.orig_h", "id.resp_h"),
        pl.when(is_icmp).then(0).otherwise(pl.col("_op")),
        # ICMP: Zeek keeps type in orig_p and code in resp_p; NetFlow puts type*256+code in dst_port
        pl.when(is_icmp).then(pl.col("_op") * 256 + pl.col("_rp")).otherwise(pl.col("_rp")),
        (count("orig_pkts"), count("orig_ip_bytes")),
        pl.when(tcp).then(_history_flags(history, letters)).otherwise(0),
    )
    resp = _direction(
        base.filter(count("resp_pkts") > 0),
        ("id.resp_h", "id.orig_h"),
        pl.when(is_icmp).then(0).otherwise(pl.col("_rp")),
        pl.when(is_icmp).then(0).otherwise(pl.col("_op")),
        (count("resp_pkts"), count("resp_ip_bytes")),
        pl.when(tcp).then(_history_flags(history, {k.lower(): v for k, v in letters.items()})).otherwise(0),
    )
    frame = pl.concat([orig, resp]).with_columns(
        pl.col("ts_start").cast(pl.Datetime("us", "UTC")), pl.col("ts_end").cast(pl.Datetime("us", "UTC"))
    )
    return log, _flows_frame(frame, str(path.name))


def _label_hosts(
    frame: pl.DataFrame, host: str, label: pl.Expr, bad: pl.Expr, good: pl.Expr
) -> tuple[set, set]:
    """Host-level truth: a host that originated any flow labelled bad is malicious; one that originated flows
    labelled good and none bad is benign; hosts with only background (unlabelled) flows are left out."""
    per = frame.group_by(host).agg(bad=bad.any(), good=good.any())
    malicious = set(per.filter(pl.col("bad")).get_column(host).to_list())
    benign = set(per.filter(~pl.col("bad") & pl.col("good")).get_column(host).to_list())
    return malicious, benign


def load_zeek(names: list[str]) -> Callable[[Path, argparse.Namespace], Loaded | str]:
    def load(work: Path, args: argparse.Namespace) -> Loaded | str:
        tables, malicious, benign = [], set(), set()
        for name in names:
            log, flows = read_zeek_conn(DATA / name)
            tables.append(flows)
            label = pl.col("label").fill_null("")
            # Stratosphere's Zeek labels: Malicious, Benign, Background (the lab's other devices, not
            # attacks): a host with no Malicious flow is benign
            bad, good = _label_hosts(
                log,
                "id.orig_h",
                label,
                label.str.starts_with("Malicious"),
                ~label.str.starts_with("Malicious"),
            )
            malicious |= bad
            benign |= good
        return Loaded(pa.concat_tables(tables), malicious, benign - malicious)

    return load


def read_binetflow(path: Path) -> tuple[pl.DataFrame, pa.Table]:
    """argus `ra` CSV ("binetflow": one bidirectional row per conversation) -> (the rows, flow rows: the
    source's direction with SrcBytes, the reply with TotBytes - SrcBytes; packets split in the same ratio when
    there is no SrcPkts column; TCP flags from State "<source flags>_<destination flags>").
    Stand-in until tracepipe.ingest.argus lands."""
    raw = path.read_bytes()
    separator = "\t" if b"\t" in raw.split(b"\n", 1)[0] else ","
    rows = pl.read_csv(io.BytesIO(raw), separator=separator, infer_schema=False, quote_char=None)
    rows = rows.with_columns(pl.col(c).str.strip_chars() for c in rows.columns)

    def port(column: str) -> pl.Expr:  # decimal, or hex for ICMP ("0x0008")
        text = pl.col(column).fill_null("")
        hexa = text.str.starts_with("0x")
        return (
            pl.when(hexa)
            .then(text.str.slice(2).str.to_integer(base=16, strict=False))
            .otherwise(text.str.to_integer(strict=False))
            .fill_null(0)
            .clip(0, 65535)
            .cast(pl.Int32)
        )

    text = pl.col("StartTime")
    start = (
        pl.when(text.str.contains(r"^[0-9]+(\.[0-9]+)?$"))  # `ra -u`: epoch seconds
        .then((text.cast(pl.Float64, strict=False) * 1e6).cast(pl.Int64).cast(pl.Datetime("us", "UTC")))
        .otherwise(
            text.str.replace_all("/", "-").str.to_datetime(
                "%Y-%m-%d %H:%M:%S%.f", time_zone="UTC", strict=False
            )
        )
    )
    total = pl.col("TotBytes").cast(pl.Int64, strict=False).fill_null(0)
    src_bytes = pl.col("SrcBytes").cast(pl.Int64, strict=False).fill_null(0)
    packets = pl.col("TotPkts").cast(pl.Int64, strict=False).fill_null(0)
    src_packets = (
        pl.col("SrcPkts").cast(pl.Int64, strict=False).fill_null(0)
        if "SrcPkts" in rows.columns
        else (packets * src_bytes / total.clip(lower_bound=1)).round().cast(pl.Int64).clip(lower_bound=1)
    )
    proto = pl.col("Proto").str.to_lowercase().replace_strict({"tcp": 6, "udp": 17, "icmp": 1}, default=0)
    state = pl.col("State").fill_null("")
    letters = {"S": SYN, "A": ACK, "F": FIN, "R": RST, "P": PSH}
    base = rows.with_columns(
        _ts=start,
        _end=start
        + pl.duration(microseconds=(pl.col("Dur").cast(pl.Float64, strict=False).fill_null(0) * 1e6)),
        _proto=proto.cast(pl.Int16),
        _sp=port("Sport"),
        _dp=port("Dport"),
        _sflags=_history_flags(state.str.split("_").list.get(0, null_on_oob=True).fill_null(""), letters),
        _dflags=_history_flags(state.str.split("_").list.get(1, null_on_oob=True).fill_null(""), letters),
        _tcp=proto == 6,
    ).filter(pl.col("_ts").is_not_null() & pl.col("_proto").is_in([1, 6, 17]))
    icmp = pl.col("_proto") == 1  # ra prints the ICMP type as Sport and the code as Dport
    forward = _direction(
        base,
        ("SrcAddr", "DstAddr"),
        pl.when(icmp).then(0).otherwise(pl.col("_sp")),
        pl.when(icmp).then(pl.col("_sp") * 256 + pl.col("_dp")).otherwise(pl.col("_dp")),
        (src_packets, src_bytes),
        pl.when(pl.col("_tcp")).then(pl.col("_sflags")).otherwise(0),
    )
    back = _direction(
        base.filter(total > src_bytes),
        ("DstAddr", "SrcAddr"),
        pl.when(icmp).then(0).otherwise(pl.col("_dp")),
        pl.when(icmp).then(0).otherwise(pl.col("_sp")),
        ((packets - src_packets).clip(lower_bound=1), total - src_bytes),
        pl.when(pl.col("_tcp")).then(pl.col("_dflags")).otherwise(0),
    )
    return rows, _flows_frame(pl.concat([forward, back]), path.name)


def load_ctu13(work: Path, args: argparse.Namespace) -> Loaded | str:
    files = sorted(Path(args.ctu13).glob("*.binetflow")) if args.ctu13 else []
    if not files:
        return (
            "not run: no CTU-13 binetflow here (hundreds of MB, not committed). Download e.g. "
            "https://mcfp.felk.cvut.cz/publicDatasets/CTU-Malware-Capture-Botnet-42/detailed-bidirectional-"
            "flow-labels/capture20110810.binetflow into a folder and pass --ctu13 FOLDER"
        )
    tables, malicious, benign = [], set(), set()
    for path in files:
        rows, flows = read_binetflow(path)
        tables.append(flows)
        label = pl.col("Label").fill_null("")
        # CTU-13 convention: From-Botnet = the infected host's own traffic, From-Normal = the known normal
        # hosts; Background (everyone else) is unlabelled and left out.
        bad, good = _label_hosts(
            rows, "SrcAddr", label, label.str.contains("From-Botnet"), label.str.contains("From-Normal")
        )
        malicious |= bad
        benign |= good
    return Loaded(pa.concat_tables(tables), malicious, benign - malicious)


# Who scanned in the ESnet captures (their READMEs give the commands; the targets answer).
ESNET = {
    "esnet-tcp_0_1000_20190821.pcap.gz": "172.31.15.102",  # masscan -p0-1000 198.128.153.23
    "esnet-udp_0_1000_20190821.pcap.gz": "172.31.15.102",  # masscan -pU:0-1000 198.128.153.23
    "esnet-nmap_80_all.pcap.gz": "10.87.1.10",  # nmap -p 80 -A -v 130.211.223.103
    "esnet-nmap_80_w_service_detection.pcap.gz": "10.87.1.10",  # nmap -p 80 -sV 130.211.223.103
    "esnet-nmap_80_vanilla.pcap.gz": "10.87.1.10",  # nmap -p 80 130.211.223.103
    "esnet-whois.pcap.gz": None,  # a whois lookup: benign
}


def _missing_tools(*names: str) -> str | None:
    from tracepipe.tools import tool_path

    try:
        for name in names:
            tool_path(name)
    except Exception as exc:  # the tool's own message says what to install
        return f"not run: {exc}"
    return None


def _esnet_captures(work: Path) -> list[Path]:
    """The committed captures, unpacked into `work`."""
    paths = []
    for name in ESNET:
        traffic = work / name.removesuffix(".gz")
        traffic.write_bytes(gzip.decompress((DATA / name).read_bytes()))
        paths.append(traffic)
    return paths


def load_esnet(work: Path, args: argparse.Namespace) -> Loaded | str:
    """The captures through the real softflowd (NetFlow v9 to 127.0.0.1, recorded by tcpdump) into the lake
    the caller opened at work/lake, by tracepipe's own NetFlow ingest."""
    from support import probes

    from tracepipe.ingest.flows import ingest_flow_files
    from tracepipe.lake import Lake

    missing = _missing_tools("softflowd", "tcpdump")
    if missing:
        return missing
    exports = []
    for traffic in _esnet_captures(work):
        port = probes.free_udp_port()
        with probes.capture_udp(port, work / f"export-{traffic.name}") as capture:
            result = probes.softflowd_export(traffic, 9, (probes.LOOPBACK_V4, port))
            capture.wait_for_packets(result.datagrams)
        exports.append(capture.path)
    lake = Lake(work / "lake")
    summary = ingest_flow_files(lake, exports)
    flows = pl.scan_parquet([str(p) for p in lake.files("flows")]).select("src_addr", "dst_addr").collect()
    hosts = set(flows.get_column("src_addr").to_list()) | set(flows.get_column("dst_addr").to_list())
    malicious = {s for s in ESNET.values() if s}
    notes = [f"softflowd -> {summary.to_dict().get('flows', '?')} flow records"]
    return Loaded(None, malicious & hosts, hosts - malicious, notes)


def load_esnet_argus(work: Path, args: argparse.Namespace) -> Loaded | str:
    """The same captures through the real argus, printed by `ra` as CTU-13's binetflow columns (TCP flags
    per direction with -Z b, epoch times with -u), read by the binetflow loader."""
    import subprocess

    from tracepipe.tools import tool_path

    missing = _missing_tools("argus", "ra")
    if missing:
        return missing
    argus, ra = tool_path("argus"), tool_path("ra")
    tables = []
    for traffic in _esnet_captures(work):
        flows_file = work / f"{traffic.name}.argus"
        subprocess.run([argus, "-r", str(traffic), "-w", str(flows_file)], check=True, capture_output=True)
        columns = "stime dur proto saddr sport dir daddr dport state stos dtos pkts bytes sbytes spkts"
        text = subprocess.run(
            [ra, "-r", str(flows_file), "-n", "-u", "-Z", "b", "-c", ",", "-s", *columns.split()],
            check=True,
            capture_output=True,
        ).stdout
        binetflow = work / f"{traffic.name}.binetflow"
        binetflow.write_bytes(text)
        tables.append(read_binetflow(binetflow)[1])
    flows = pa.concat_tables(tables)
    hosts = set(flows.column("src_addr").to_pylist()) | set(flows.column("dst_addr").to_pylist())
    malicious = {s for s in ESNET.values() if s}
    return Loaded(flows, malicious & hosts, hosts - malicious)


DATASETS = [
    Dataset(
        "esnet-pcaps",
        "pcap -> softflowd (NetFlow v9) -> tracepipe ingest netflow",
        "github.com/esnet-security/curated-pcaps (masscan, nmap, whois)",
        "none published (curated examples, not a benchmark)",
        load_esnet,
    ),
    Dataset(
        "esnet-argus",
        "pcap -> argus -> ra binetflow (CTU-13's format)",
        "github.com/esnet-security/curated-pcaps (the same captures, another sensor)",
        "none published",
        load_esnet_argus,
    ),
    Dataset(
        "ctu50-zeek",
        "Zeek conn.log (labelled)",
        "github.com/stratosphereips/security-datasets-for-testing 008, 012 (CTU-Normal-40 d1, -44 d2)",
        "none published for these days",
        load_zeek(["ctu-normal-40-day1.conn.log.labeled.gz", "ctu-normal-44-day2.conn.log.labeled.gz"]),
    ),
    Dataset(
        "ctu-njrat-zeek",
        "Zeek conn.log (labelled)",
        "github.com/stratosphereips/security-datasets-for-testing 001 (CTU-Malware-Capture-Botnet-230-1)",
        "none published for this excerpt",
        load_zeek(["ctu-malware-230-1-njrat.conn.log.labeled.gz"]),
    ),
    Dataset(
        "ctu13-binetflow",
        "argus binetflow (labelled)",
        "mcfp.felk.cvut.cz CTU-13 (Garcia et al., Computers & Security 45, 2014)",
        "Garcia et al. 2014 compare BClus, CAMNEP and BotHunter per scenario (their time-windowed metrics)",
        load_ctu13,
    ),
]


# ---- the sweep and the scores --------------------------------------------------------------------------------
def config_for_benchmark():
    from tracepipe.pipeline_config import load_pipeline

    config = load_pipeline(REPO / "pipelines" / "nightly.toml")
    return dataclasses.replace(
        config,
        pipeline=dataclasses.replace(config.pipeline, local_networks=EVERYTHING),
        detectors=dataclasses.replace(
            config.detectors, beacon=dataclasses.replace(config.detectors.beacon, external_only=False)
        ),
    )


def average_precision(truth: np.ndarray, score: np.ndarray) -> float | None:
    if truth.sum() == 0 or truth.sum() == len(truth):
        return None
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(truth, score))


def evaluate(dataset: Dataset, args: argparse.Namespace) -> dict:
    from tracepipe.detect import detectors as det
    from tracepipe.detect.features import ceil_time, compute_features, floor_time
    from tracepipe.detect.model import MIN_FIT_ROWS, fit, score
    from tracepipe.lake import Lake

    wall0, cpu0 = time.perf_counter(), _cpu()
    row: dict = {"data_set": dataset.name, "sensor": dataset.sensor, "source": dataset.source}
    with tempfile.TemporaryDirectory(prefix=f"tracepipe-detect-{dataset.name}-") as tmp:
        work = Path(tmp)
        loaded = dataset.load(work, args)
        if isinstance(loaded, str):
            return row | {"status": loaded, "published": dataset.published}
        lake = Lake(work / "lake")
        if loaded.flows is not None:
            lake.append("flows", loaded.flows, key=dataset.name)
        flows = pl.scan_parquet([str(p) for p in lake.files("flows")])
        span = flows.select(
            pl.col("ts_start").min().alias("a"), pl.col("ts_start").max().alias("b"), pl.len().alias("n")
        ).collect()
        n_flows = int(span.item(0, "n"))
        since = floor_time(span.item(0, "a"), 86400)
        until = ceil_time(span.item(0, "b") + dt.timedelta(seconds=1), 86400)
        config = config_for_benchmark()
        ctx = det.prepare_context(lake, config, since, until)
        alerts, _ = det.finalize(det.run_detectors(ctx), ctx, "benchmark")
        rows = alerts.select(["addr", "detector", "score", "reason"]).to_pylist()
        # the anomaly model, unsupervised, fitted and scored on the data set itself
        features = compute_features(lake, since, until, EVERYTHING, 3600.0, history_start=since)
        model_score: dict[str, float] = {}
        if features.height >= MIN_FIT_ROWS:
            forest, info = fit(features, since, until, 3600.0, EVERYTHING)
            scored = score(features, forest, info).group_by("host").agg(pl.col("anomaly_score").max())
            model_score = dict(zip(*scored.get_columns(), strict=True))
    hosts = sorted(loaded.malicious | loaded.benign)
    truth = np.array([h in loaded.malicious for h in hosts])
    rule_score: dict[str, float] = {}
    by_detector: dict[str, int] = {}
    for a in rows:
        rule_score[a["addr"]] = max(rule_score.get(a["addr"], 0.0), a["score"] or 0.0)
        by_detector[a["detector"]] = by_detector.get(a["detector"], 0) + 1
    alerted = np.array([h in rule_score for h in hosts])
    tp = int((alerted & truth).sum())
    benign_alerts = sum(1 for a in rows if a["addr"] in loaded.benign)
    return row | {
        "status": "ok",
        "flows": n_flows,
        "malicious_hosts": int(truth.sum()),
        "benign_hosts": len(hosts) - int(truth.sum()),
        "alerts": len(rows),
        "by_detector": by_detector,
        "precision": round(tp / alerted.sum(), 3) if alerted.sum() else None,
        "recall": round(tp / truth.sum(), 3) if truth.sum() else None,
        "pr_auc_rules": _round(average_precision(truth, np.array([rule_score.get(h, 0.0) for h in hosts]))),
        "pr_auc_model": _round(average_precision(truth, np.array([model_score.get(h, 0.0) for h in hosts])))
        if model_score
        else None,
        "base_rate": round(float(truth.mean()), 3) if len(hosts) else None,
        "false_alarms": [f"{a['detector']}: {a['reason'][:200]}" for a in rows if a["addr"] in loaded.benign][
            :10
        ],
        "alerts_per_100_benign": round(100 * benign_alerts / max(1, len(hosts) - int(truth.sum())), 2),
        "published": dataset.published,
        "wall_s": round(time.perf_counter() - wall0, 2),
        "cpu_s": round(_cpu() - cpu0, 2),
        "notes": loaded.notes,
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _cell(value: object) -> str:
    return "—" if value is None else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=[d.name for d in DATASETS], help="repeatable")
    parser.add_argument("--ctu13", type=Path, help="a folder of CTU-13 capture*.binetflow files")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    args = parser.parse_args()
    results = [evaluate(d, args) for d in DATASETS if not args.only or d.name in args.only]
    if args.format == "json":
        print(json.dumps(results, indent=1, default=str))
        return 0
    columns = [
        "data_set",
        "flows",
        "malicious_hosts",
        "benign_hosts",
        "base_rate",
        "alerts",
        "precision",
        "recall",
        "pr_auc_rules",
        "pr_auc_model",
        "alerts_per_100_benign",
        "wall_s",
        "cpu_s",
    ]
    print(" | ".join(columns))
    for r in results:
        if r["status"] != "ok":
            print(f"{r['data_set']} | {r['status']}")
            continue
        print(" | ".join(_cell(r.get(c)) for c in columns))
    print()
    for r in results:
        detail = f"; by detector {r['by_detector']}" if r.get("by_detector") else ""
        print(f"{r['data_set']}: {r['sensor']}; source {r['source']}; published: {r['published']}{detail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
