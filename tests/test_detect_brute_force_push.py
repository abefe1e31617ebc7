"""brute_force tells a login attack from a periodic push (session 5 defect): a host that pushes metrics or logs
to one collector port at a steady period (short TCP connections, alike small sizes: Prometheus pushgateway,
Graphite, InfluxDB, Fluentd) was alerted as brute force. Flows written as real Parquet, read by the sweep's
detectors: the pushes are not alerted (and the report says why), the planted attacks still are, and a login
attack at a fixed delay on an authentication port is alerted however steady its rhythm."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
from support import stories as gen
from test_detectors import PIPELINE, build_lake

from tracepipe.detect import detectors as det
from tracepipe.ingest.delimited import as_flows
from tracepipe.intel import parse_intel
from tracepipe.pipeline_config import parse_pipeline

SYN_ACK_PSH_FIN = 0x1B


def steady_connections(
    src: str, dst: str, port: int, start_us: int, period_s: float, count: int, size: int, seed: int
) -> pa.Table:
    """`count` short TCP sessions from `src` to `dst`:`port` every `period_s` (jitter of up to 50 ms), each of
    about `size` bytes (+-2%), as a flow exporter records the initiator's side."""
    rng = np.random.default_rng(seed)
    ts = start_us + (np.arange(count) * period_s * 1e6).astype(np.int64) + rng.integers(0, 50_000, count)
    duration = rng.integers(20_000, 200_000, count)
    utc = pa.timestamp("us", tz="UTC")
    return as_flows(
        pa.table(
            {
                "ts_start": pa.array(ts, utc),
                "ts_end": pa.array(ts + duration, utc),
                "src_addr": [src] * count,
                "dst_addr": [dst] * count,
                "src_port": rng.integers(32768, 61000, count),
                "dst_port": np.full(count, port),
                "proto": np.full(count, 6),
                "packets": rng.integers(5, 8, count),
                "bytes": (size * (1 + rng.uniform(-0.02, 0.02, count))).astype(np.int64),
                "tcp_flags": np.full(count, SYN_ACK_PSH_FIN),
                "ip_version": np.full(count, 4),
                "exporter": ["10.10.0.1"] * count,
            }
        )
    )


def test_periodic_metric_pushes_are_not_brute_force_and_the_attacks_still_are(tmp_path):
    lake, story = build_lake(tmp_path, seed=11)
    since, until = story.last_day
    day = int(since.timestamp() * 1_000_000)
    hosts = sorted(story.ordinary())
    # pushers: every day-long hour holds 120-360 connections to one collector port, alike in size
    pushes = {
        hosts[0]: (9091, 15.0, 700),  # Prometheus pushgateway, every 15 s
        hosts[1]: (2003, 10.0, 420),  # Graphite plaintext, every 10 s
        hosts[2]: (8086, 10.0, 1500),  # InfluxDB line protocol, every 10 s
        hosts[3]: (24224, 30.0, 2600),  # Fluentd forward, every 30 s
    }
    extra = [
        steady_connections(host, gen.FLOW_METRICS, port, day, period, int(86400 / period), size, seed=i)
        for i, (host, (port, period, size)) in enumerate(pushes.items())
    ]
    # one host pushing to two collectors (an outbound group of two targets: no single peer)
    for i, collector in enumerate((gen.FLOW_METRICS, gen.FLOW_STORAGE)):
        extra.append(
            steady_connections(hosts[5], collector, 9091, day + i * 7 * 10**6, 20.0, 4320, 800, seed=7 + i)
        )
    pushes[hosts[5]] = (9091, 20.0, 800)
    # a patient SSH brute force: one try every 6 s for 40 min from a local host, as steady as a push
    slow_ssh = hosts[4]
    extra.append(
        steady_connections(slow_ssh, "198.51.100.44", 22, day + 3600 * 10**6, 6.0, 400, 2100, seed=9)
    )
    lake.append("flows", pa.concat_tables(extra), key="pushes")

    config = parse_pipeline(PIPELINE)
    intel, _, _ = parse_intel(story.intel_lines, "list", "test-intel")
    ctx = det.prepare_context(lake, config, since, until, intel)
    alerts = det.finalize(det.run_detectors(ctx), ctx, "test")[0].to_pylist()
    got = {(a["detector"], a["addr"]) for a in alerts}
    truth = {(p.detector, p.addr) for p in story.planted}
    assert got == truth | {("brute_force", slow_ssh)}, got ^ (truth | {("brute_force", slow_ssh)})
    ssh = next(a for a in alerts if a["addr"] == slow_ssh)
    assert json.loads(ssh["features"])["known_port"] is True and "SSH login attempts" in ssh["reason"]
    # the pushes are not silently dropped: the report lists them with the rhythm that cleared them
    cleared = {(s["addr"], s["port"]) for s in ctx.suppressed if s["detector"] == "brute_force"}
    assert cleared == {(host, port) for host, (port, _, _) in pushes.items()}
    why = next(s["why"] for s in ctx.suppressed if s["addr"] == hosts[0])
    assert "every 15 s" in why and "9091" in why and "periodic push" in why
