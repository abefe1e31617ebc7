#!/usr/bin/env python3
"""Detection quality on PUBLIC labelled traffic nobody here made: each data set lands in a fresh lake through
the sensor path it was published for and the product's own reader (`tracepipe ingest netflow|zeek|argus`, the
CLI a user runs), the rule detectors run over it with the shipped nightly thresholds, and the hosts they name
are scored against the data set's own labels, as the reader kept them in the lake's flow_labels dataset.

    python benchmarks/detection.py                 # every data set; a table
    python benchmarks/detection.py --format json   # the same figures for scripts
    python benchmarks/detection.py --only ctu13-binetflow --ctu13 DIR   # whole CTU-13 scenarios instead

Per data set: host-level precision and recall (a host is "alerted" when any alert names it as the actor),
PR-AUC (average precision) of two host scores -- the highest rule-alert score, and the anomaly model's highest
(host, hour) score (IsolationForest fitted on the same data, unsupervised) -- alerts per 100 benign hosts, and
the published figure for the same data where one exists. CPU seconds (getrusage) next to wall time.

Data sets (small excerpts with PROVENANCE in tests/data/detection/):
  esnet-pcaps      ESnet curated-pcaps: masscan TCP/UDP and nmap runs, plus a benign whois exchange, replayed
                   through the real softflowd (NetFlow v9 over UDP on 127.0.0.1, captured by tcpdump) and read
                   by `tracepipe ingest netflow`. Labels: the scanning host (the README's command) is malicious.
  esnet-argus      The same captures through the real argus, printed by `ra` in CTU-13's binetflow columns,
                   read by `tracepipe ingest argus`.
  ctu50-zeek       Stratosphere CTU-50 "normal" Windows hosts (CTU-Normal-40 day 1, CTU-Normal-44 day 2),
                   Zeek conn.log labelled per flow (Benign / Malicious = attacks from the Internet), read by
                   `tracepipe ingest zeek` (its `label` column goes to flow_labels).
  ctu-njrat-zeek   Stratosphere CTU-Malware-Capture-Botnet-230-1 (NjRAT), first 1,000 conn.log lines, labelled;
                   its relative times are placed on 2017-01-02 before ingest.
  ctu13-binetflow  CTU-13 scenario 6 (capture20110816, Menti), 10:10-10:30 with every host's flows: argus
                   bidirectional flows ("binetflow") labelled per flow, read by `tracepipe ingest argus`
                   (`Label` goes to flow_labels). `--ctu13 DIR` runs DIR/*.binetflow (whole scenarios) instead.
The labels of a data set never reach the detectors: they sit in flow_labels, which only this script reads.

Setup (the same for every data set): every address is a watched host (local_networks = everything; the data
sets are seen from one sensor, not from a cloud), beacon.external_only = false (nothing is external then),
the rest as shipped in pipelines/nightly.toml. Exfiltration needs an outside, so it cannot fire here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

DATA = REPO / "tests" / "data" / "detection"
EVERYTHING = ["0.0.0.0/0", "::/0"]
# Relative Zeek timestamps (seconds since capture start) are placed here: the lake refuses 1970.
REBASE = dt.datetime(2017, 1, 2, tzinfo=dt.UTC)


@dataclass
class Loaded:
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


# ---- loaders: labelled public data -> the lake at work/lake, as a user lands it (labels kept apart) ---------
def ingest(command: str, paths: list[Path], work: Path) -> dict:
    """`tracepipe ingest <command> PATHS --lake work/lake --format json`, the CLI a user runs; its summary.
    Exit 3 (some lines rejected, the rest landed) is data, not a failure: the rejects are counted in notes."""
    lake_options = ["--lake", str(work / "lake"), "--format", "json"]
    proc = subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", "ingest", command, *map(str, paths), *lake_options],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if proc.returncode not in (0, 3):
        raise RuntimeError(
            f"tracepipe ingest {command} exited {proc.returncode}: {proc.stdout[-500:]}{proc.stderr[-500:]}"
        )
    return json.loads(proc.stdout)


def _ingest_note(command: str, summary: dict) -> str:
    totals = summary["totals"]
    return f"tracepipe ingest {command}: {totals['flows']} flow rows, {totals['rejects']} rejected lines"


def label_hosts(work: Path, bad: pl.Expr, good: pl.Expr) -> tuple[set[str], set[str]]:
    """Host-level truth from the lake's flow_labels (what the reader kept of the data set's own labels; the
    detectors never read it): a host that originated any flow labelled bad is malicious; one that originated
    flows labelled good and none bad is benign; hosts with neither are left out."""
    from tracepipe.lake import Lake

    files = [str(f) for f in Lake(work / "lake").files("flow_labels")]
    if not files:
        return set(), set()
    per = pl.scan_parquet(files).group_by("src_addr").agg(bad=bad.any(), good=good.any()).collect()
    malicious = set(per.filter(pl.col("bad")).get_column("src_addr").to_list())
    benign = set(per.filter(~pl.col("bad") & pl.col("good")).get_column("src_addr").to_list())
    return malicious, benign - malicious


def _unpacked(name: str, work: Path) -> Path:
    """A committed .gz excerpt, unpacked into `work` (`tracepipe ingest argus` reads plain text)."""
    target = work / name.removesuffix(".gz")
    target.write_bytes(gzip.decompress((DATA / name).read_bytes()))
    return target


def _rebased(path: Path, work: Path) -> Path:
    """A conn.log whose `ts` counts seconds from the capture's start (the NjRAT excerpt) placed on REBASE, as
    a user would before landing it (the lake keeps no 1970 partitions); any other log is returned as is."""
    lines = gzip.decompress(path.read_bytes()).decode().split("\n")
    first = next(line for line in lines if line and not line.startswith("#"))
    if float(first.split("\t", 1)[0]) >= 1e9:
        return path
    shift = REBASE.timestamp()
    out = [
        line
        if not line or line.startswith("#")
        else f"{float(line.split(chr(9), 1)[0]) + shift:.6f}\t{line.split(chr(9), 1)[1]}"
        for line in lines
    ]
    target = work / path.name.removesuffix(".gz")
    target.write_text("\n".join(out))
    return target


# Stratosphere's Zeek labels: Malicious, Benign, Background (the lab's other devices, not attacks): a host
# with no Malicious flow is benign.
ZEEK_BAD = pl.col("label").fill_null("").str.starts_with("Malicious")
# CTU-13 convention: From-Botnet = the infected host's own traffic, From-Normal = the known normal hosts;
# Background (everyone else) is unlabelled and left out.
CTU13_BAD = pl.col("label").fill_null("").str.contains("From-Botnet")
CTU13_GOOD = pl.col("label").fill_null("").str.contains("From-Normal")


def load_zeek(names: list[str]) -> Callable[[Path, argparse.Namespace], Loaded | str]:
    def load(work: Path, args: argparse.Namespace) -> Loaded | str:
        paths = [_rebased(DATA / name, work) for name in names]
        summary = ingest("zeek", paths, work)
        malicious, benign = label_hosts(work, ZEEK_BAD, ~ZEEK_BAD)
        return Loaded(malicious, benign, [_ingest_note("zeek", summary)])

    return load


CTU13_EXCERPT = "ctu13-s6-capture20110816-1010-1030.binetflow.gz"


def load_ctu13(work: Path, args: argparse.Namespace) -> Loaded | str:
    """The committed CTU-13 excerpt (scenario 6, 20 minutes, every host's flows), or with --ctu13 DIR the
    capture*.binetflow files there instead."""
    files = sorted(Path(args.ctu13).glob("*.binetflow")) if args.ctu13 else [_unpacked(CTU13_EXCERPT, work)]
    if not files:
        return f"not run: no *.binetflow in {args.ctu13}"
    summary = ingest("argus", files, work)
    malicious, benign = label_hosts(work, CTU13_BAD, CTU13_GOOD)
    return Loaded(malicious, benign, [_ingest_note("argus", summary)])


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


def _esnet_truth(work: Path) -> tuple[set[str], set[str]]:
    """Every address in the lake: the scanners of ESNET are malicious, everyone else benign."""
    from tracepipe.lake import Lake

    flows = pl.scan_parquet([str(p) for p in Lake(work / "lake").files("flows")]).select(
        "src_addr", "dst_addr"
    )
    hosts = set(flows.collect().unpivot().get_column("value").to_list())
    malicious = {s for s in ESNET.values() if s}
    return malicious & hosts, hosts - malicious


def load_esnet(work: Path, args: argparse.Namespace) -> Loaded | str:
    """The captures through the real softflowd (NetFlow v9 to 127.0.0.1, recorded by tcpdump), landed by
    `tracepipe ingest netflow`."""
    from support import probes

    missing = _missing_tools("softflowd", "tcpdump")
    if missing:
        return missing
    exports = []
    for name in ESNET:
        traffic = _unpacked(name, work)
        port = probes.free_udp_port()
        with probes.capture_udp(port, work / f"export-{traffic.name}") as capture:
            result = probes.softflowd_export(traffic, 9, (probes.LOOPBACK_V4, port))
            capture.wait_for_packets(result.datagrams)
        exports.append(capture.path)
    summary = ingest("netflow", exports, work)
    return Loaded(*_esnet_truth(work), [f"softflowd -> {_ingest_note('netflow', summary)}"])


# ra's binetflow columns as tracepipe.ingest.argus documents them (per-direction packets and bytes, TCP flags
# per direction with -Z b, epoch times with -u, a header line with -L0)
RA_COLUMNS = (
    "stime dur proto saddr sport dir daddr dport state stos dtos pkts bytes sbytes spkts dpkts dbytes"
)


def load_esnet_argus(work: Path, args: argparse.Namespace) -> Loaded | str:
    """The same captures through the real argus, printed by `ra` as binetflow, landed by `tracepipe ingest
    argus`."""
    from tracepipe.tools import tool_path

    missing = _missing_tools("argus", "ra")
    if missing:
        return missing
    argus, ra = tool_path("argus"), tool_path("ra")
    binetflows = []
    for name in ESNET:
        traffic = _unpacked(name, work)
        flows_file = work / f"{traffic.name}.argus"
        subprocess.run([argus, "-r", str(traffic), "-w", str(flows_file)], check=True, capture_output=True)
        text = subprocess.run(
            [ra, "-r", str(flows_file), "-u", "-n", "-c", ",", "-L0", "-Z", "b", "-s", *RA_COLUMNS.split()],
            check=True,
            capture_output=True,
        ).stdout
        binetflow = work / f"{traffic.name}.binetflow"
        binetflow.write_bytes(text)
        binetflows.append(binetflow)
    summary = ingest("argus", binetflows, work)
    return Loaded(*_esnet_truth(work), [_ingest_note("argus", summary)])


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
        "pcap -> argus -> ra binetflow (CTU-13's format) -> tracepipe ingest argus",
        "github.com/esnet-security/curated-pcaps (the same captures, another sensor)",
        "none published",
        load_esnet_argus,
    ),
    Dataset(
        "ctu50-zeek",
        "Zeek conn.log (labelled) -> tracepipe ingest zeek",
        "github.com/stratosphereips/security-datasets-for-testing 008, 012 (CTU-Normal-40 d1, -44 d2)",
        "none published for these days",
        load_zeek(["ctu-normal-40-day1.conn.log.labeled.gz", "ctu-normal-44-day2.conn.log.labeled.gz"]),
    ),
    Dataset(
        "ctu-njrat-zeek",
        "Zeek conn.log (labelled) -> tracepipe ingest zeek",
        "github.com/stratosphereips/security-datasets-for-testing 001 (CTU-Malware-Capture-Botnet-230-1)",
        "none published for this excerpt",
        load_zeek(["ctu-malware-230-1-njrat.conn.log.labeled.gz"]),
    ),
    Dataset(
        "ctu13-binetflow",
        "argus binetflow (labelled) -> tracepipe ingest argus",
        "CTU-13 scenario 6 (Garcia et al., Computers & Security 45, 2014), 20-minute excerpt via "
        "github.com/jingzbu/BiNetflowToSIGs",
        "no host-level figure; Garcia et al. 2014 report scenario 6 for BClus, CAMNEP, BotHunter with their own "
        "IP-based, time-windowed metric over the whole capture on the older unidirectional flows: not comparable",
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
        notes = "".join(f"; {n}" for n in r.get("notes", []))
        print(
            f"{r['data_set']}: {r['sensor']}; source {r['source']}; published: {r['published']}{detail}{notes}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
