"""A WLCG site's own services seen by the detectors (SOC review of session 37): what they do every hour looks,
counted carelessly, like an attack. Each is planted on its own ordinary host of one generated story
(tests/support/stories.py) beside the attack it resembles, read back through the lake, swept whole and in host
buckets. Each test failed before its fix: the resolver was a horizontal scan every hour ("100% failed"), the
squid a brute force against its stratum-1 servers."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from support import stories as gen
from support.planted import alerts_alike_in_buckets, planted_lake

from tracepipe.detect import detectors as det
from tracepipe.pipeline_config import parse_pipeline

PIPELINE = f'[pipeline]\nname = "test"\nlocal_networks = {json.dumps(gen.LOCAL_NETWORKS)}\n'
SCIENCE_STORAGE = "192.16.166.41"
PIPELINE += '[[science_peers]]\nname = "LHCONE"\nreason = "WLCG storage"\nprefixes = ["192.16.166.0/24"]\n'
SECOND = 1_000_000


def plant(f: gen._Flows, story: gen.FlowStory) -> dict[str, str]:
    day = int(story.last_day[0].timestamp() * SECOND)
    t0 = day + 10 * 3600 * SECOND
    hosts = iter(sorted(story.ordinary())[3:])
    rng = np.random.default_rng(5)
    who: dict[str, str] = {}
    # a recursive resolver: 150 queries to 150 authoritative servers in the hour, each answered over UDP
    who["resolver"] = host = next(hosts)
    servers = [f"198.18.7.{i + 1}" for i in range(150)]
    ts = t0 + np.arange(150) * 20 * SECOND
    f.session(rng, ts, 30_000, f.idx(host), f.idx(servers), 53, 17, 80, 400)
    # a UDP scan of port 161 over 150 hosts: nothing answers
    who["udp_scan"] = host = next(hosts)
    targets = [f"198.18.8.{i + 1}" for i in range(150)]
    f.add(ts, 0, f.idx(host)[0], f.idx(targets), 40000 + np.arange(150), 161, 17, 1, 60, 0)
    # a squid (CVMFS/Frontier): 100 requests of ~800 B to 3 stratum-1 servers on port 8000, each answered by
    # 200 kB-1 MB
    who["squid"] = host = next(hosts)
    ts = t0 + np.sort(rng.integers(0, 3600 * SECOND, 100))
    stratum1 = f.idx(["129.79.53.1", "131.225.188.1", "128.142.33.1"])[np.arange(100) % 3]
    answers = rng.integers(200_000, 1_000_000, 100)
    f.session(rng, ts, 2 * SECOND, f.idx(host), stratum1, 8000, 6, 800 + rng.integers(0, 40, 100), answers)
    # a web-form brute force on the same port: 100 logins of ~800 B, each answered by a 3 kB page
    who["http_brute"] = host = next(hosts)
    f.session(rng, ts, 1 * SECOND, f.idx(host), f.idx("203.0.113.80"), 8000, 6, 800, 3_000)
    # a data-transfer node: 8 parallel streams of 10 h to a declared science peer's storage; and a host that
    # holds 3 connections of 10 h to an outside address (the exporter cuts each every 30 min: 20 records a way)
    for name, peer, port, sent in (
        ("dtn", SCIENCE_STORAGE, 1094, 10**9),
        ("streams", "198.51.100.50", 7000, 2 * 10**6),
    ):
        who[name] = host = next(hosts)
        for stream in range(8 if name == "dtn" else 3):
            pieces = day + 3600 * SECOND + np.arange(20) * 1800 * SECOND
            sport = 50000 + stream
            f.add(
                pieces, 1800 * SECOND, f.idx(host)[0], f.idx(peer)[0], sport, port, 6, sent // 700, sent, 0x18
            )
            f.add(
                pieces + 500, 1800 * SECOND, f.idx(peer)[0], f.idx(host)[0], port, sport, 6, 4000, 10**6, 0x18
            )
    return who


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    lake, story, who = planted_lake(tmp_path_factory.mktemp("site"), plant, "site-services")
    ctx = det.prepare_context(lake, parse_pipeline(PIPELINE), *story.last_day)
    alerts, stats = det.finalize(det.run_detectors(ctx), ctx, "test")
    return lake, story, who, alerts.to_pylist(), stats["suppressed"]


def of(alerts: list[dict], detector: str, addr: str) -> list[dict]:
    return [a for a in alerts if a["detector"] == detector and a["addr"] == addr]


def test_a_resolver_whose_queries_are_answered_is_no_horizontal_scan(site):
    _, _, who, alerts, _ = site
    assert of(alerts, "horizontal_scan", who["resolver"]) == []
    scan = of(alerts, "horizontal_scan", who["udp_scan"])
    assert len(scan) == 1 and "150 distinct hosts on port 161/udp" in scan[0]["reason"], scan
    assert "100% failed" in scan[0]["reason"]


def test_requests_answered_by_downloads_are_no_brute_force(site):
    _, _, who, alerts, _ = site
    assert of(alerts, "brute_force", who["squid"]) == []
    brute = of(alerts, "brute_force", who["http_brute"])
    assert len(brute) == 1 and "100 port 8000 login attempts against 203.0.113.80" in brute[0]["reason"]


def test_long_connections_to_a_science_peer_are_suppressed_and_parallel_ones_counted(site):
    _, _, who, alerts, suppressed = site
    assert of(alerts, "long_connection", who["dtn"]) == []
    why = [s["why"] for s in suppressed if s["detector"] == "long_connection" and s["addr"] == who["dtn"]]
    assert len(why) == 1 and why[0].startswith(
        "8 connections with declared science peer LHCONE (WLCG storage)"
    )
    held = of(alerts, "long_connection", who["streams"])
    assert len(held) == 1, held
    # (it said "held one connection ... 120 flow records" for 3: the bytes of all, the records of one way of one)
    assert "held 3 connections with 198.51.100.50:7000 for 10 h" in held[0]["reason"], held[0]["reason"]
    assert "(180.0 MB both ways, 120 flow records)" in held[0]["reason"], held[0]["reason"]


def test_the_site_services_give_the_same_alerts_in_buckets(site):
    lake, story, who, _, _ = site
    alerts = alerts_alike_in_buckets(lake, parse_pipeline(PIPELINE), *story.last_day)
    planted = {(a["detector"], a["addr"]) for a in alerts if a["addr"] in who.values()}
    assert planted == {
        ("horizontal_scan", who["udp_scan"]),
        ("brute_force", who["http_brute"]),
        ("long_connection", who["streams"]),
    }


def test_an_intel_match_from_a_stix_feed_names_its_stix_id_not_a_misp_event(site):
    # SOC review: "listed in threat intel as 93.184.216.34 (...), MISP event indicator--a1b2c3d4-..."
    from tracepipe.intel import parse_intel

    lake, story, who, _, _ = site
    bundle = {
        "type": "bundle",
        "id": "bundle--5d0092c5-5f74-4287-9642-33f4c354e56d",
        "objects": [
            {
                "type": "indicator",
                "spec_version": "2.1",
                "id": "indicator--a1b2c3d4-0000-4000-8000-000000000001",
                "created": "2026-01-01T00:00:00.000Z",
                "modified": "2026-01-01T00:00:00.000Z",
                "name": "web login brute-forcer's target",
                "pattern": "[ipv4-addr:value = '203.0.113.80']",
                "pattern_type": "stix",
                "valid_from": "2026-01-01T00:00:00Z",
            }
        ],
    }
    intel = parse_intel(json.dumps(bundle), "stix", "feed.json")[0]
    ctx = det.prepare_context(lake, parse_pipeline(PIPELINE), *story.last_day, intel)
    alerts, _ = det.finalize(det.run_detectors(ctx, ["intel"]), ctx, "test")
    found = of(alerts.to_pylist(), "intel", who["http_brute"])
    assert len(found) == 1 and "STIX indicator--a1b2c3d4-0000-4000-8000-000000000001" in found[0]["reason"]
    assert "MISP event" not in found[0]["reason"]


def test_a_sweep_of_an_earlier_hour_reports_no_flow_after_its_end(site):
    # SOC review: an hourly sweep's 24 h intel window read the rest of the day, so a rerun (or a backfill, or
    # systemd's catch-up) of 03:00-04:00 reported as new the flows of 10:00 to a listed address
    from tracepipe.intel import parse_intel

    lake, story, who, _, _ = site
    day = story.last_day[0]
    intel = parse_intel("203.0.113.80\n", "list", "feed.txt")[0]
    pipeline = parse_pipeline(PIPELINE + '[detectors.intel]\nwindow = "24h"\n')

    def intel_alerts(since_hour: int) -> list[dict]:
        window = (day + dt.timedelta(hours=since_hour), day + dt.timedelta(hours=since_hour + 1))
        ctx = det.prepare_context(lake, pipeline, *window, intel)
        alerts, _ = det.finalize(det.run_detectors(ctx, ["intel"]), ctx, "test")
        return of(alerts.to_pylist(), "intel", who["http_brute"])

    assert intel_alerts(3) == []
    assert len(intel_alerts(10)) == 1
