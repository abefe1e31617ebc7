"""The HTML/JSON report: facts from a real lake, everything from data escaped, and a real headless Chromium
renders it (alerts and SVG charts in the DOM, no console errors, a non-blank screenshot)."""

from __future__ import annotations

import datetime as dt
import json
import re
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tracepipe.lake import Lake, ingest_table
from tracepipe.report import build_report_data, render_report
from tracepipe.schema import ALERTS, FLOWS, VM_LOGS, VMS

UTC = dt.UTC
T0 = dt.datetime(2025, 6, 17, 6, 0, tzinfo=UTC)
WINDOW = (T0, T0 + dt.timedelta(hours=4))
EVIL_NAME = "<script>alert(1)</script>"
EVIL_LOG = 'Failed password for invalid user <img src=x onerror="alert(2)"> from 10.9.0.5 port 4242 ssh2'
CHROMIUM = "/usr/bin/chromium"


def _flows() -> pa.Table:
    """A scanner 10.9.0.5 (300 SYNs on port 445 in 08:00-08:10), an uploader 10.9.0.7, background DNS."""
    rng = np.random.default_rng(3)
    t0 = T0.timestamp()
    rows: dict[str, list] = {c: [] for c in ("ts", "src", "dst", "sport", "dport", "proto", "pk", "by")}

    def add(ts, src, dst, sport, dport, proto, pk, by):
        n = len(ts)
        for key, value in (
            ("ts", ts),
            ("src", src),
            ("dst", dst),
            ("sport", sport),
            ("dport", dport),
            ("proto", proto),
            ("pk", pk),
            ("by", by),
        ):
            rows[key].extend(np.broadcast_to(np.asarray(value, dtype=object), (n,)).tolist())

    scan_t = t0 + 7200 + np.sort(rng.uniform(0, 600, 300))
    add(
        scan_t, "10.9.0.5", [f"198.18.1.{i % 250}" for i in range(300)], 40000 + np.arange(300), 445, 6, 1, 40
    )
    dns_t = t0 + np.sort(rng.uniform(0, 14400, 200))
    add(dns_t, ["10.9.0.5", "10.9.0.7"] * 100, "10.9.0.2", 50000 + np.arange(200), 53, 17, 1, 70)
    up_t = t0 + 9000 + np.arange(5) * 300.0
    add(up_t, "10.9.0.7", "198.51.100.200", 45000 + np.arange(5), 443, 6, 5000, 300_000_000)
    ts = pa.array(
        [dt.datetime.fromtimestamp(float(t), UTC) for t in rows["ts"]], FLOWS.field("ts_start").type
    )
    return pa.table(
        {
            "ts_start": ts,
            "ts_end": ts,
            "src_addr": rows["src"],
            "dst_addr": rows["dst"],
            "src_port": pa.array(rows["sport"], pa.int32()),
            "dst_port": pa.array(rows["dport"], pa.int32()),
            "proto": pa.array(rows["proto"], pa.int16()),
            "packets": pa.array(rows["pk"], pa.int64()),
            "bytes": pa.array(rows["by"], pa.int64()),
            "ip_version": pa.array([4] * len(ts), pa.int8()),
            "exporter": ["127.0.0.1"] * len(ts),
            "source": ["test"] * len(ts),
        }
    )


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Lake:
    lake = Lake(tmp_path_factory.mktemp("lake"))
    ingest_table(lake, "flows", "test-flows", "h-flows", [_flows()])
    lake.replace_dataset(
        "vms",
        pa.Table.from_pylist(
            [
                {
                    "vm_id": "vm-evil",
                    "cloud": "openstack",
                    "vm_name": EVIL_NAME,
                    "project": "p&q",
                    "user": "mallory",
                    "hypervisor": "compute-1",
                    "status": "deleted",
                    "created_at": T0 - dt.timedelta(hours=2),
                    "deleted_at": T0 + dt.timedelta(hours=3),
                },
                {
                    "vm_id": "vm-up",
                    "cloud": "openstack",
                    "vm_name": "dataproc-04",
                    "project": "genomics-lab",
                    "user": "okafor",
                    "hypervisor": "compute-2",
                    "status": "soft_deleted",
                    "quarantine_until": T0 + dt.timedelta(days=1),
                },
            ],
            schema=VMS,
        ),
    )
    ingest_table(
        lake,
        "vm_logs",
        "test-logs",
        "h-logs",
        [
            pa.Table.from_pylist(
                [
                    {
                        "ts": T0 + dt.timedelta(hours=2, minutes=1),
                        "hostname": "web-03",
                        "app": "sshd",
                        "pid": 4242,
                        "message": EVIL_LOG,
                        "vm_id": "vm-victim",
                        "auth_event": "failed",
                        "auth_user": "<img>",
                        "auth_src_addr": "10.9.0.5",
                        "source": "test",
                        "line": 1,
                    },
                ],
                schema=VM_LOGS,
            )
        ],
    )
    return lake


def _alerts() -> pa.Table:
    now = dt.datetime(2025, 6, 17, 12, 0, tzinfo=UTC)
    scan_window = (T0 + dt.timedelta(hours=2), T0 + dt.timedelta(hours=3))
    return pa.Table.from_pylist(
        [
            {
                "alert_id": "scan-1",
                "detector": "horizontal_scan",
                "window_start": scan_window[0],
                "window_end": scan_window[1],
                "addr": "10.9.0.5",
                "score": 7.5,
                "reason": f"10.9.0.5 (vm {EVIL_NAME}) contacted 250 distinct hosts on port 445 in 1 h",
                "vm_id": "vm-evil",
                "vm_name": EVIL_NAME,
                "project": "p&q",
                "user": "mallory",
                "hypervisor": "compute-1",
                "vm_status": "deleted",
                "features": json.dumps({"distinct_dst": 250, "syn_only_share": 1.0, "note": "<b>bold?</b>"}),
                "evidence": json.dumps(
                    {"port": 445, "flows": [{"src_addr": "10.9.0.5", "dst_addr": "<i>x</i>"}]}
                ),
                "pipeline": "nightly",
                "created_at": now,
            },
            {
                "alert_id": "exfil-1",
                "detector": "exfiltration",
                "window_start": T0 + dt.timedelta(hours=2, minutes=30),
                "window_end": T0 + dt.timedelta(hours=3, minutes=30),
                "addr": "10.9.0.7",
                "peer": "198.51.100.200",
                "score": 4.0,
                "reason": "10.9.0.7 (vm dataproc-04) sent 1.5 GB to 198.51.100.200",
                "vm_id": "vm-up",
                "vm_name": "dataproc-04",
                "project": "genomics-lab",
                "user": "okafor",
                "hypervisor": "compute-2",
                "vm_status": "soft_deleted",
                "quarantine_until": T0 + dt.timedelta(days=1),
                "features": json.dumps({"bytes_out": 1.5e9, "baseline_ratio": 40.0}),
                "evidence": None,
                "pipeline": "nightly",
                "created_at": now,
            },
        ],
        schema=ALERTS,
    )


@pytest.fixture(scope="module")
def report(lake: Lake, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return render_report(lake, _alerts(), tmp_path_factory.mktemp("report"), "Nightly sweep <test>", WINDOW)


def test_report_data_facts_from_lake(lake: Lake) -> None:
    data = build_report_data(lake, _alerts(), "t", WINDOW)
    assert data["summary"]["alerts"] == 2
    assert data["summary"]["by_detector"] == {"horizontal_scan": 1, "exfiltration": 1}
    assert data["summary"]["traffic"]["flows"] == 505
    scan = next(a for a in data["alerts"] if a["detector"] == "horizontal_scan")
    assert scan["who"]["vm_name"] == EVIL_NAME and scan["who"]["user"] == "mallory"
    assert scan["who"]["lifecycle"]["gone"] is True and scan["who"]["lifecycle"]["cloud"] == "openstack"
    assert scan["top_ports"][0]["port"] == 445 and scan["top_ports"][0]["flows"] == 300
    assert scan["top_ports"][0]["peers"] == 250
    assert scan["logs"][0]["message"] == EVIL_LOG
    exfil = next(a for a in data["alerts"] if a["detector"] == "exfiltration")
    assert exfil["top_peers"][0]["peer"] == "198.51.100.200"
    assert exfil["top_peers"][0]["bytes_out"] == 5 * 300_000_000
    assert exfil["who"]["lifecycle"]["quarantine_until"] == "2025-06-18T06:00:00Z"
    assert "quarantine" in exfil["who"]["lifecycle"]["label"]
    assert sum(r["flows"] for r in scan["timeline"]) == 300 + 100


def test_report_escapes_everything_from_data(report: dict[str, Path]) -> None:
    html = report["html"].read_text()
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img" not in html and "&lt;img src=x onerror=" in html
    assert "<b>bold?</b>" not in html and "<i>x</i>" not in html
    assert "p&amp;q" in html and "Nightly sweep &lt;test&gt;" in html
    assert "default-src 'none'" in html  # and no script could run anyway
    assert html.count("<svg") == 4  # by detector, traffic, two timelines
    assert "http://" not in html.replace("http://www.w3.org/", "")  # nothing to fetch: opens offline
    data = json.loads(report["json"].read_text())
    assert data["alerts"][0]["who"]["vm_name"] == EVIL_NAME  # JSON keeps the raw value
    assert report["html"].name == "report-20250617T0600-20250617T1000.html"


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def _png_pixels(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat, width, height = 8, b"", 0, 0
    while offset < len(data):
        (length,), kind = struct.unpack(">I", data[offset : offset + 4]), data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    return width, height, zlib.decompress(idat)


def test_report_renders_in_headless_chromium(report: dict[str, Path], tmp_path: Path) -> None:
    url = report["html"].resolve().as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = dom.stdout
    assert rendered.count('class="card alert"') == 2
    assert len(re.findall(r"<svg\b", rendered)) == 4
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered and "<script" not in rendered
    assert "mallory" in rendered and "okafor" in rendered and "quarantine" in rendered
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Refused to" in line]
    assert console == []

    shot = tmp_path / "report.png"  # kept under the test's tmp dir, like a CI artifact
    run = _chromium(
        [f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars", url],
        tmp_path / "profile-shot",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    width, height, raw = _png_pixels(shot)
    assert (width, height) == (1280, 2000)
    assert len(set(raw[::7])) > 50  # many distinct byte values: text and charts, not a blank page


def test_report_without_alerts_says_so(lake: Lake, tmp_path: Path) -> None:
    paths = render_report(lake, ALERTS.empty_table(), tmp_path, "Quiet night", WINDOW)
    html = paths["html"].read_text()
    assert "No alerts in this window." in html
    assert html.count("<svg") == 1  # the traffic chart only
    assert json.loads(paths["json"].read_text())["summary"]["alerts"] == 0


def test_forged_counters_summing_past_2_64_still_give_a_report(tmp_path: Path) -> None:
    # hostile review: 20 records of ~10^18 bytes (nfdump CSV's cap) or 3 of 2^63-1 (NetFlow's) beside a scan:
    # DuckDB summed them exactly (HUGEINT) and the chart renderer refused the number: every sweep of that
    # window ended "internal error" after writing its alerts, no summary and no report. Sums saturate as the
    # detectors' do
    flows = _flows()
    forged = flows.slice(0, 3)
    forged = forged.set_column(
        forged.schema.get_field_index("bytes"), "bytes", pa.array([2**63 - 1] * 3, pa.int64())
    )
    lake = Lake(tmp_path / "lake")
    ingest_table(lake, "flows", "test-flows", "h-flows", [flows, forged])
    paths = render_report(lake, _alerts(), tmp_path / "out", "forged", WINDOW)
    data = json.loads(paths["json"].read_text())
    assert paths["html"].read_text().count("<svg") >= 2
    scan = next(a for a in data["alerts"] if a["alert_id"] == "scan-1")
    cap = 2**62
    assert max(p["bytes_out"] for p in scan["top_peers"]) == cap
    assert max(r["bytes"] for r in scan["timeline"]) == cap


def test_two_pipelines_writing_into_one_folder_keep_their_own_reports(lake: Lake, tmp_path: Path) -> None:
    # SOC review: a second pipeline sharing the nightly's report_dir replaced its report of 218 alerts by its
    # own of one: the file name had the window only
    nightly = render_report(lake, _alerts(), tmp_path, "nightly", WINDOW, name="nightly")
    other = render_report(lake, ALERTS.empty_table(), tmp_path, "exfil-24h", WINDOW, name="exfil-24h")
    assert nightly["html"].name == "report-nightly-20250617T0600-20250617T1000.html"
    assert other["html"].name == "report-exfil-24h-20250617T0600-20250617T1000.html"
    assert json.loads(nightly["json"].read_text())["summary"]["alerts"] == _alerts().num_rows


@pytest.mark.parametrize("name", ["../../outside", "a/b", "", ".hidden", "x" * 65])
def test_a_pipeline_name_that_is_no_file_name_is_refused(name: str) -> None:
    from tracepipe.pipeline_config import PipelineError, parse_pipeline

    with pytest.raises(PipelineError, match=r"pipeline\.name"):
        parse_pipeline(f'[pipeline]\nname = "{name}"\n')
    assert parse_pipeline('[pipeline]\nname = "CERN nightly v2"\n').pipeline.name == "CERN nightly v2"


def test_every_alerts_flow_facts_come_from_one_read_and_match_each_alerts_own_query(lake: Lake) -> None:
    """Three queries per alert read the whole window (flows x alerts: ~1,000 s at 10^8 flows and 50 alerts;
    performance review, session 38): now one read for all. Each alert's peers, ports and timeline are still
    what its own query over its own host and window gives, with alert hosts that talk to each other (DNS),
    one whose own peer is not its busiest, and two alerts on one host in other windows."""
    import polars as pl

    base = _alerts().to_pylist()[0]
    extra = [
        {
            **base,
            "alert_id": "dns",
            "addr": "10.9.0.2",
            "peer": "10.9.0.7",
            "window_start": T0,
            "window_end": T0 + dt.timedelta(hours=4),
        },
        {
            **base,
            "alert_id": "late",
            "addr": "10.9.0.5",
            "peer": "10.9.0.2",
            "window_start": T0 + dt.timedelta(hours=3),
            "window_end": T0 + dt.timedelta(hours=4),
        },
    ]
    alerts = pa.concat_tables([_alerts(), pa.Table.from_pylist(extra, schema=ALERTS)])
    data = build_report_data(lake, alerts, "t", WINDOW)
    flows = pl.from_arrow(lake.read("flows"))
    service = pl.when(pl.col("proto").is_in([6, 17]) & (pl.col("src_port") < pl.col("dst_port")))
    service = service.then(pl.col("src_port")).otherwise(pl.col("dst_port"))
    for item in data["alerts"]:
        host, peer = item["addr"], item["peer"] or ""
        w0, w1 = (
            dt.datetime.fromisoformat(item[k].replace("Z", "+00:00")) for k in ("window_start", "window_end")
        )
        mine = flows.filter((pl.col("src_addr") == host) | (pl.col("dst_addr") == host)).with_columns(
            out=pl.col("src_addr") == host,
            other=pl.when(pl.col("src_addr") == host).then(pl.col("dst_addr")).otherwise(pl.col("src_addr")),
        )
        inside = mine.filter((pl.col("ts_start") >= w0) & (pl.col("ts_start") < w1))
        peers = (
            inside.group_by("other")
            .agg(
                flows=pl.len(),
                bytes_out=pl.when(pl.col("out")).then(pl.col("bytes")).otherwise(0).sum(),
                bytes_in=pl.when(pl.col("out")).then(0).otherwise(pl.col("bytes")).sum(),
                ports=service.n_unique(),
            )
            .with_columns(own=pl.col("other") == peer)
            .sort(["own", "flows", "bytes_out", "other"], descending=[True, True, True, False])
            .head(8)
        )
        got = [(p["peer"], p["flows"], p["bytes_out"], p["bytes_in"], p["ports"]) for p in item["top_peers"]]
        assert got == [
            tuple(r[:5]) for r in peers.select("other", "flows", "bytes_out", "bytes_in", "ports").rows()
        ]
        ports = (
            inside.group_by(service.alias("port"), "proto")
            .agg(flows=pl.len(), bytes=pl.col("bytes").sum(), peers=pl.col("other").n_unique())
            .sort(["flows", "bytes", "port", "proto"], descending=[True, True, False, False])
            .head(8)
        )
        assert [
            (p["port"], p["proto"], p["flows"], p["bytes"], p["peers"]) for p in item["top_ports"]
        ] == ports.rows()
        in_report = mine.filter((pl.col("ts_start") >= WINDOW[0]) & (pl.col("ts_start") < WINDOW[1]))
        assert sum(r["flows"] for r in item["timeline"]) == in_report.height
        assert (
            sum(r["flows"] for r in item["timeline"] if r["direction"] == "outbound")
            == in_report["out"].sum()
        )
    dns = next(a for a in data["alerts"] if a["alert_id"] == "dns")
    assert dns["top_peers"][0]["peer"] == "10.9.0.7" and {p["peer"] for p in dns["top_peers"]} == {
        "10.9.0.5",
        "10.9.0.7",
    }


def test_an_alert_of_an_earlier_window_than_the_reports_gets_its_own_windows_timeline(lake: Lake) -> None:
    """A sweep that swept an earlier window again (flows that landed late) reports its alerts beside the
    window's own: their host timeline covered the report's window only, and came out empty (a review)."""
    base = _alerts().to_pylist()[0]
    early = {**base, "alert_id": "early", "window_start": T0, "window_end": T0 + dt.timedelta(hours=1)}
    data = build_report_data(
        lake,
        pa.Table.from_pylist([early], schema=ALERTS),
        "t",
        (T0 + dt.timedelta(hours=3), T0 + dt.timedelta(hours=4)),
    )
    timeline = data["alerts"][0]["timeline"]
    assert timeline and all(
        T0.isoformat()[:13] <= r["t"][:13] < (T0 + dt.timedelta(hours=1)).isoformat()[:13] for r in timeline
    )
