"""Sweeps and model fits bucket by bucket (tracepipe/detect/buckets.py) give exactly the alerts, features and
model of one unbucketed run: on the demo story (real softflowd exports, Nova/Neutron/OpenNebula leases) and on a
generated day with every detector kind planted, with bucket counts small enough to make several buckets."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from support import stories as gen

from tracepipe.demo import PIPELINE, run_demo
from tracepipe.detect import buckets, model
from tracepipe.detect import detectors as det
from tracepipe.detect.features import (
    compute_features,
    in_networks,
    local_addresses,
    local_addresses_in,
    periodicity,
    scan_flows,
)
from tracepipe.lake import Lake
from tracepipe.pipeline_config import SciencePeer, load_pipeline
from tracepipe.schema import FLOWS
from tracepipe.sweep import run_sweep

RULES = {
    "horizontal_scan",
    "vertical_scan",
    "brute_force",
    "beacon",
    "exfiltration",
    "long_connection",
    "mining",
}


def _alerts(result) -> list[dict]:
    """The alerts without their creation time, in id order (evidence rows included)."""
    return result.alerts.drop_columns(["created_at"]).sort_by("alert_id").to_pylist()


@pytest.fixture(scope="module")
def day(tmp_path_factory):
    """Two generated days (the model's baseline, then the day with every planted incident), model fitted."""
    lake, story, pipeline = gen.story_lake(tmp_path_factory.mktemp("buckets"))
    model.fit_lake(lake, story.start, story.start + dt.timedelta(days=1), gen.LOCAL_NETWORKS, buckets=1)
    config = load_pipeline(pipeline)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, enabled=True, min_score=0.5))
    return lake, story, config


@pytest.mark.parametrize("count", [2, 5])
def test_generated_day_same_alerts_in_buckets(day, count):
    lake, story, config = day
    since, until = story.last_day
    whole = run_sweep(lake, config, since, until, write=False, buckets=1)
    stages: list[str] = []
    split = run_sweep(lake, config, since, until, write=False, buckets=count, on_stage=stages.append)
    assert "spill" in split.timings and "spill" not in whole.timings  # it really ran in buckets
    # one spill serves the rules and the anomaly features (it covers the model's history too)
    assert stages.count("spill") == 1 and "anomaly" in stages
    found = set(whole.alerts.column("detector").to_pylist())
    assert RULES | {"anomaly"} <= found
    assert _alerts(split) == _alerts(whole)


def test_science_peers_same_alerts_in_buckets(day):
    """With a declared science peer (the generated data movers' partner site), exfiltration's per-bucket sums
    look each bucket's destinations up among the peer's prefixes: the same alerts and suppressions as one run."""
    lake, story, config = day
    since, until = story.last_day
    peer = SciencePeer(name="partner site", reason="the data movers' transfers", prefixes=["192.0.2.50/32"])
    config = dataclasses.replace(config, science_peers=[peer])
    whole = run_sweep(lake, config, since, until, write=False, buckets=1)
    split = run_sweep(lake, config, since, until, write=False, buckets=3)
    assert "spill" in split.timings
    science = [s for s in whole.suppressed if "partner site" in s["why"]]
    assert science  # the peer mattered: movers' volume went to it
    assert _alerts(split) == _alerts(whole)
    assert sorted(map(str, split.suppressed)) == sorted(map(str, whole.suppressed))


def test_demo_story_same_alerts_in_buckets(tmp_path):
    demo = run_demo(tmp_path / "demo-lake")
    lake = Lake(tmp_path / "demo-lake")
    since, until = demo.window
    config = load_pipeline(PIPELINE)
    config = dataclasses.replace(
        config, output=dataclasses.replace(config.output, report_dir=str(tmp_path / "reports"))
    )
    whole = run_sweep(lake, config, since, until, write=False, buckets=1)
    split = run_sweep(lake, config, since, until, write=False, buckets=3)
    assert whole.alerts.num_rows >= 5  # the story's planted incidents
    assert _alerts(split) == _alerts(whole)


def test_features_and_fitted_model_same_in_buckets(day, tmp_path):
    lake, story, _ = day
    first = (story.start, story.start + dt.timedelta(days=1))
    whole = compute_features(lake, *first, gen.LOCAL_NETWORKS, history_start=story.start, buckets=1)
    split = compute_features(lake, *first, gen.LOCAL_NETWORKS, history_start=story.start, buckets=4)
    assert whole.height > 100 and whole["periodicity"].max() > 0
    assert split.equals(whole)
    _, one = model.fit_lake(lake, *first, gen.LOCAL_NETWORKS, path=tmp_path / "one.npz", buckets=1)
    _, four = model.fit_lake(lake, *first, gen.LOCAL_NETWORKS, path=tmp_path / "four.npz", buckets=4)
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "four.npz").read_bytes()
    assert (one.medians, one.host_high) == (four.medians, four.host_high)


def test_spill_sends_each_flow_to_the_bucket_of_each_local_end(tmp_path):
    """A flow between local hosts of two buckets is in both; one between hosts of one bucket there once;
    a flow with no local end nowhere."""
    lake = Lake(tmp_path / "lake")
    t0 = dt.datetime(2026, 3, 12, 1, tzinfo=dt.UTC)
    hosts = [f"10.10.0.{i}" for i in range(1, 41)]
    owners = buckets.assign(hosts, 4)
    of = dict(zip(owners["addr"].to_list(), owners[buckets.BUCKET].to_list(), strict=True))
    a = hosts[0]
    b = next(h for h in hosts if of[h] != of[a])
    c = next(h for h in hosts[1:] if of[h] == of[a])
    pairs = [(a, b), (a, c), ("192.0.2.1", "198.51.100.2"), ("192.0.2.1", b), (b, "203.0.113.9")]
    n = len(pairs)
    lake.append(
        "flows",
        pa.table(
            {
                "ts_start": pa.array(
                    [t0 + dt.timedelta(seconds=i) for i in range(n)], pa.timestamp("us", "UTC")
                ),
                "ts_end": pa.array(
                    [t0 + dt.timedelta(seconds=i + 1) for i in range(n)], pa.timestamp("us", "UTC")
                ),
                "src_addr": [p[0] for p in pairs],
                "dst_addr": [p[1] for p in pairs],
                "src_port": [40000 + i for i in range(n)],
                "dst_port": [443] * n,
                "proto": pa.array([6] * n, pa.int16()),
                "packets": [1] * n,
                "bytes": [100] * n,
                "tcp_flags": pa.array([0x1B] * n, pa.int16()),
                "ip_version": pa.array([4] * n, pa.int8()),
            }
        ),
        key="spill",
    )
    with buckets.spill_flows(lake, t0, t0 + dt.timedelta(hours=1), hosts, 4) as spill:
        got = {
            k: [tuple(r) for r in spill.source(k).select("src_addr", "dst_addr").collect().iter_rows()]
            for k in range(4)
        }
        assert set(spill.hosts(of[a]).to_list()) >= {a, c}
        # a bucket's addresses are Categorical (hashed as codes), an empty bucket's too
        assert all(spill.source(k).collect_schema()["src_addr"] == pl.Categorical for k in range(4))
        assert spill.source(99).collect_schema()["dst_addr"] == pl.Categorical
    assert sorted(got[of[a]]) == sorted([(a, b), (a, c)])
    assert sorted(got[of[b]]) == sorted([(a, b), ("192.0.2.1", b), (b, "203.0.113.9")])
    assert sum(len(v) for v in got.values()) == 5  # (a, b) twice, the outside-only flow nowhere
    assert not Path(spill.root).exists()  # removed on exit


def test_spilled_addresses_read_back_as_the_lake_has_them(tmp_path, monkeypatch):
    """The spill stores each batch's addresses as its lake file's dictionary indices (tagged as polars'
    Categorical, buckets.POLARS_CATEGORICAL); polars must map them through each page's dictionary, not take them
    for its own category codes. Three lake files whose dictionaries order the same addresses differently, read
    in batches of 5 rows, after polars' global categories already hold those addresses in yet another order:
    every bucket holds exactly its hosts' rows, addresses as the lake has them."""
    lake = Lake(tmp_path / "lake")
    t0 = dt.datetime(2026, 3, 12, 1, tzinfo=dt.UTC)
    hosts = [f"10.20.{i // 7}.{i % 7 + 1}" for i in range(30)]
    outside = [f"203.0.113.{i}" for i in range(1, 12)]
    # global categories: every address already has a code, in reverse order of the files' first appearance
    pl.Series([*reversed(outside), *reversed(hosts)], dtype=pl.Categorical)
    rows = []
    for part, order in enumerate((hosts, list(reversed(hosts)), hosts[1::2] + hosts[::2])):
        pairs = [(src, outside[i % len(outside)]) for i, src in enumerate(order)]
        pairs += [(outside[(i * 3) % len(outside)], dst) for i, dst in enumerate(order[:12])]
        n = len(pairs)
        table = pa.table(
            {
                "ts_start": pa.array(
                    [t0 + dt.timedelta(minutes=part, seconds=i) for i in range(n)], pa.timestamp("us", "UTC")
                ),
                "ts_end": pa.array(
                    [t0 + dt.timedelta(minutes=part, seconds=i + 1) for i in range(n)],
                    pa.timestamp("us", "UTC"),
                ),
                "src_addr": [p[0] for p in pairs],
                "dst_addr": [p[1] for p in pairs],
                "src_port": [1000 * part + i for i in range(n)],
                "dst_port": [443] * n,
                "proto": pa.array([6] * n, pa.int16()),
                "packets": [1] * n,
                "bytes": [100] * n,
            }
        )
        lake.append("flows", table, key=f"spill-{part}")
        rows += [(s, d, p) for (s, d), p in zip(pairs, table.column("src_port").to_pylist(), strict=True)]
    monkeypatch.setattr(buckets, "SPILL_BATCH_ROWS", 5)
    assert buckets.polars_reads_the_tag()  # else the spill is untagged (correct, ~4x slower reads)
    owners = buckets.assign(hosts, 3)
    of = dict(zip(owners["addr"].to_list(), owners[buckets.BUCKET].to_list(), strict=True))
    with buckets.spill_flows(lake, t0, t0 + dt.timedelta(hours=1), hosts, 3) as spill:
        for bucket in range(3):
            frame = spill.source(bucket).collect()
            assert frame.schema["src_addr"] == pl.Categorical
            got = sorted(frame.select(pl.col("src_addr", "dst_addr").cast(pl.String), "src_port").iter_rows())
            want = sorted(r for r in rows if of.get(r[0]) == bucket or of.get(r[1]) == bucket)
            assert got == want and len(want) > 10


def test_bucket_count_follows_flows():
    assert buckets.bucket_count(0) == 1
    assert buckets.bucket_count(buckets.ROWS_PER_BUCKET) == 1
    assert buckets.bucket_count(10**8) == -(-(10**8) // buckets.ROWS_PER_BUCKET)


def test_periodicity_without_recorded_spans_fails_loudly():
    """A detector calling periodicity on one bucket without the window-wide spans would score coverage on the
    bucket's own span (other alerts than one run): an error naming what to do instead."""
    rows = pl.from_arrow(FLOWS.empty_table()).lazy()
    with pytest.raises(RuntimeError, match="WINDOW_WIDE"):
        periodicity(rows, 3600, 2, spans=buckets.SpanBook()).collect()


@pytest.mark.parametrize("book", [{"final": True}, {"provided": True}])
def test_periodicity_with_a_book_that_answers_for_it_reads_no_flow(book):
    """Regression (b0d9dab): periodicity_stats collects its pairs when called, so a sweep's final beacon run
    (its book scores the buckets' stats) grouped the lake's whole window, and each bucket's features sharing
    beacon's stats (their book is filled by the caller) grouped theirs, for nothing (~6 s CPU at 5*10^7
    flows). Flows that fail when read (a strict cast of 1,000 bytes to UInt8) must not be read."""
    start = dt.datetime(2026, 3, 12, tzinfo=dt.UTC)
    schema = pl.from_arrow(FLOWS.empty_table()).schema
    flows = pl.DataFrame(
        {
            "ts_start": [start + dt.timedelta(minutes=5 * i) for i in range(12)],
            "src_addr": ["10.0.0.1"] * 12,
            "dst_addr": ["198.51.100.7"] * 12,
            "src_port": list(range(40000, 40012)),
            "dst_port": [443] * 12,
            "proto": [6] * 12,
            "bytes": [1000] * 12,
        },
        schema={
            k: schema[k]
            for k in ("ts_start", "src_addr", "dst_addr", "src_port", "dst_port", "proto", "bytes")
        },
    ).lazy()
    assert periodicity(flows, 3600, 10).collect().height == 1  # read, the pair is scored
    trap = flows.filter(pl.col("bytes").cast(pl.UInt8, strict=True) > 0)
    with pytest.raises(pl.exceptions.InvalidOperationError):
        periodicity(trap, 3600, 10).collect()
    answered = periodicity(trap, 3600, 10, spans=buckets.SpanBook(deferred={}, **book)).collect()
    assert answered.is_empty() and "score" in answered.columns


@pytest.mark.parametrize(
    ("in_memory_rows", "part_rows"),
    [(0, buckets.RESPONSE_PART_ROWS), (0, 300), (10**9, buckets.RESPONSE_PART_ROWS)],
)
def test_buckets_read_once_in_memory_or_streamed_give_the_same_candidates_and_features(
    day, in_memory_rows, part_rows
):
    """A bucket read into memory once (its facts shared by every detector and the features) and one that
    each of them streams from the spill (a bucket over IN_MEMORY_ROWS: the DNS resolver's), its facts computed
    whole or in parts of whole conversations (RESPONSE_PART_ROWS; session 30: the resolver's bucket held ~3 GB),
    find exactly what the unbucketed run finds; each bucket's per-host aggregations keep only the hosts it owns."""
    lake, story, config = day
    since, until = story.last_day
    ctx = det.prepare_context(lake, config, since, until, lake.read("intel"))
    names = sorted(RULES - set(buckets.CROSS_HOST))
    whole = pl.concat([det.DETECTORS[name](ctx) for name in names])
    assert set(whole.get_column("detector").to_list()) == set(names)  # every per-host kind is planted
    history = since - dt.timedelta(days=1)
    hosts = set(ctx.local) | set(buckets.feature_hosts(lake, history, until, gen.LOCAL_NETWORKS))
    with buckets.spill_flows(lake, history, until, sorted(hosts), 3) as spill:
        spill = dataclasses.replace(spill, in_memory_rows=in_memory_rows, response_part_rows=part_rows)
        assert min(spill.rows.values()) > 0 and len(spill.rows) == 3
        split = buckets.detect(ctx, names, spill)
        parts = sorted(spill.root.glob("*.facts.*.parquet"))  # the last streamed bucket's, if in parts
        if part_rows < spill.rows[2] and not in_memory_rows:
            assert len(parts) == -(-spill.rows[2] // part_rows) >= 2
        else:
            assert parts == []
        features = buckets.features(
            lake, since, until, gen.LOCAL_NETWORKS, 3600.0, history, ctx.night, spill=spill
        )
    assert sorted(split.rows()) == sorted(whole.rows())
    alone = compute_features(lake, since, until, gen.LOCAL_NETWORKS, history_start=history, buckets=1)
    assert alone.height > 100 and features.equals(alone)


def test_local_addresses_of_two_ranges_from_one_scan_equal_two_scans(day):
    """prepare_context looks up the rules' local addresses and the model's features' hosts in one scan (each
    range its own): the same addresses as a scan of each range alone, for nested, overlapping and empty
    ranges."""
    lake, story, config = day
    since, until = story.last_day
    networks = config.pipeline.local_networks
    hour = dt.timedelta(hours=1)
    ranges = [
        (since, until),
        (story.start, until),
        (since + 3 * hour, since + 4 * hour),
        (since - 30 * hour, since - 29 * hour),
        (until + hour, until + 2 * hour),
    ]
    found = local_addresses_in(lake, ranges, networks)
    alone = [local_addresses(scan_flows(lake, a, b), networks) for a, b in ranges]
    assert [sorted(f) for f in found] == [sorted(a) for a in alone]
    assert len(alone[1]) > len(alone[2]) > 0 and alone[4] == []
    ctx = det.prepare_context(lake, config, since, until, None, (story.start, until))
    assert sorted(ctx.feature_hosts[story.start, until]) == sorted(alone[1])


def test_a_spill_that_finds_its_hosts_equals_a_scan_then_a_listed_spill(day):
    """The sweep's spill finds the local hosts as it reads (no scan of the window before it): the in-network
    addresses of each range are local_addresses_in's, and the owners and every bucket's rows, in order, are
    those of the spill given the hosts that scan and the leases name."""
    lake, story, config = day
    since, until = story.last_day
    networks = config.pipeline.local_networks
    hour = dt.timedelta(hours=1)
    ranges = [(since, until), (story.start, until), (since + 3 * hour, since + 4 * hour)]
    # the leases, and an outside address as a floating IP outside local_networks would be
    outside = scan_flows(lake, since, until).select("dst_addr").unique().collect().get_column("dst_addr")
    floating = next(a for a in sorted(outside.to_list()) if not in_networks([a], networks)[0])
    during = det.lease_range(det.DetectContext(lake, config, since, until))
    leased = det.leased_addresses(lake, during) | {floating}
    find = buckets.FindHosts(networks, frozenset(leased), ranges)
    expected = local_addresses_in(lake, ranges, networks)
    hosts = sorted(leased.union(*expected))
    with buckets.spill_flows(lake, story.start, until, [], 3, find) as found:
        with buckets.spill_flows(lake, story.start, until, hosts, 3) as listed:
            assert found.found == [sorted(e) for e in expected] and len(expected[2]) > 0
            assert found.owners.equals(listed.owners) and found.rows == listed.rows
            assert floating in found.owners.get_column("addr").to_list()
            for bucket in range(3):
                assert found.source(bucket).collect().equals(listed.source(bucket).collect())


@pytest.mark.parametrize(
    "beacon",
    [
        {"ignore_ports": [53], "min_connections": 12},  # stats shared with the features', split by port
        {"window": 43200},  # half-day windows: the beacon detector computes its own, bucket by bucket
    ],
)
def test_beacon_sharing_the_features_periodicity_or_not_finds_what_one_run_finds(day, beacon):
    """When the beacon detector's pairs are a part of the model's periodicity pairs, each bucket computes
    their stats once for both (FeatureJob.share_beacon); otherwise the detector runs on each bucket. Either
    way the alerts are those of one unbucketed run."""
    lake, story, config = day
    since, until = story.last_day
    rules = dataclasses.replace(config.detectors.beacon, **beacon)
    config = dataclasses.replace(config, detectors=dataclasses.replace(config.detectors, beacon=rules))
    whole = run_sweep(lake, config, since, until, write=False, buckets=1)
    split = run_sweep(lake, config, since, until, write=False, buckets=3)
    assert "beacon" in whole.alerts.column("detector").to_pylist()
    assert _alerts(split) == _alerts(whole)


def test_a_streamed_bucket_has_its_facts_computed_once_for_rules_and_features(day):
    """A bucket too big to hold (every bucket here: in_memory_rows=0) has its facts written once to a file
    beside the spill (Spill.facts_file) that every rule detector and the model's features (handed the rules'
    bucket read, as a sweep does: detect(also=...)) stream: the candidates and features of one unbucketed run.
    Regression: each reader computed the facts of the DNS resolver's 35.5 M rows again (~17 s CPU at
    5*10^7 flows)."""
    lake, story, config = day
    since, until = story.last_day
    ctx = det.prepare_context(lake, config, since, until, lake.read("intel"))
    # a leased address outside local_networks: the rules' local hosts are not the features' (with_local_facts)
    ctx = dataclasses.replace(ctx, local=sorted({*ctx.local, "198.51.100.99"}))
    names = sorted(RULES - set(buckets.CROSS_HOST))
    whole = pl.concat([det.DETECTORS[name](ctx) for name in names])
    history = since - dt.timedelta(days=1)
    alone = compute_features(lake, since, until, gen.LOCAL_NETWORKS, history_start=history, buckets=1)
    hosts = set(ctx.local) | set(buckets.feature_hosts(lake, history, until, gen.LOCAL_NETWORKS))
    with buckets.spill_flows(lake, history, until, sorted(hosts), 3) as spill:
        spill = dataclasses.replace(spill, in_memory_rows=0)
        job = buckets.feature_job(lake, since, until, gen.LOCAL_NETWORKS, 3600.0, history, ctx.night, spill)
        assert set(job.local) != set(ctx.local)  # the features swap in their own local hosts
        split = buckets.detect(ctx, names, spill, also=job)
        assert [p.name for p in spill.root.glob("*.facts.parquet")] == ["2.facts.parquet"]  # the last's only
        written = pl.read_parquet(spill.root / "2.facts.parquet")
        features = job.result()
    assert sorted(split.rows()) == sorted(whole.rows())
    differ = [c for c in alone.columns if c not in features.columns or not features[c].equals(alone[c])]
    assert alone.height > 100 and features.equals(alone), (
        alone.height,
        features.height,
        differ,
    )  # (names them)
    assert written.height == spill.rows[2] and written["src_owned"].any() and written["dst_owned"].any()


def test_a_streamed_buckets_readers_never_cache_its_flows_whole(day, monkeypatch):
    """Every query over a bucket too big to hold streams it: none reads its flows through a cache (polars, when
    one plan uses a scan twice, e.g. two aggregates of it joined, materialises that scan whole to feed both).
    Regression: host_features joined the distinct destination ports of a host (an aggregate of the bucket) to
    its other outbound aggregates in one plan: the DNS resolver's streamed bucket (58.7 M flows, 10^8 in the
    day) was cached whole, 1.9 GB for that step; the sweep peaked at 2.27 GB."""
    lake, story, config = day
    since, until = story.last_day
    ctx = det.prepare_context(lake, config, since, until, lake.read("intel"))
    names = sorted(RULES - set(buckets.CROSS_HOST))
    history = since - dt.timedelta(days=1)
    hosts = set(ctx.local) | set(buckets.feature_hosts(lake, history, until, gen.LOCAL_NETWORKS))
    plans: list[str] = []
    collect = pl.LazyFrame.collect

    def recording(self, *args, **kwargs):
        plans.append(self.explain(engine=kwargs.get("engine", "auto")))
        return collect(self, *args, **kwargs)

    with buckets.spill_flows(lake, history, until, sorted(hosts), 3) as spill:
        spill = dataclasses.replace(spill, in_memory_rows=0)
        job = buckets.feature_job(lake, since, until, gen.LOCAL_NETWORKS, 3600.0, history, ctx.night, spill)
        monkeypatch.setattr(pl.LazyFrame, "collect", recording)
        buckets.detect(ctx, names, spill, also=job)
        monkeypatch.undo()
    scans = [plan for plan in plans if "Parquet SCAN" in plan]
    assert len(scans) > 20  # the detectors' and the features' queries of each bucket
    cached = [plan for plan in scans if "CACHE" in plan]
    assert not cached, cached[0]
