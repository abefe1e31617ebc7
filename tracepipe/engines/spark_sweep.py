"""`tracepipe sweep --engine spark`: the sweep's detectors, features and model, unchanged, on Spark executors.

The detectors (tracepipe/detect) are polars code over `DetectContext.flows(...)`. What they find for a local
host depends only on the flows that have that host at one end, so Spark partitions the window's flows by local
host (each flow goes to the bucket of each of its local ends, once), and every bucket runs the SAME detector
and feature functions on its flows (`applyInArrow`); a candidate is kept by the bucket its `addr` belongs to.
The cross-host comparisons run on the driver: exfiltration's peers over Spark's per (source, destination,
port, window) byte sums, which is all that detector reads, and beacon's shared services in `finalize`, over
every bucket's candidates together. The persisted scikit-learn model scores the
features in `mapInArrow`, per partition. Allowlists, attribution, evidence and ids stay in `finalize`.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from tracepipe.detect import detectors as det
from tracepipe.detect.features import (
    RESPONSE_PERIOD_S,
    floor_time,
    host_features,
    in_networks,
    utc,
    with_flow_facts,
)
from tracepipe.engines.spark import get_session, read_dataset, spark_schema, to_arrow
from tracepipe.lake import Lake, conform
from tracepipe.pipeline_config import PipelineConfig
from tracepipe.schema import FLOWS

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

CROSS_HOST = ("exfiltration",)  # compares hosts with each other: runs on the driver
WINDOW_WIDE = ("beacon",)  # per-host results that also use a window-wide span (features.periodicity)
BUCKET_COLUMN = "_bucket"
HOST_COLUMNS = ("_src_in", "_dst_in")  # this row's src / dst is a local host of this bucket

CANDIDATE_ARROW = pa.schema(
    [
        ("detector", pa.string()),
        ("addr", pa.string()),
        ("peer", pa.string()),
        ("port", pa.int32()),
        ("window_start", pa.timestamp("us", "UTC")),
        ("window_end", pa.timestamp("us", "UTC")),
        ("score", pa.float64()),
        ("first_ts", pa.timestamp("us", "UTC")),
        ("reason", pa.string()),
        ("features", pa.string()),
    ]
)


class FramesContext(det.DetectContext):
    """A DetectContext whose flows come from an in-memory frame (a Spark bucket) instead of the lake: only
    `scan` differs, so time filter, facts and window_start are DetectContext.flows'."""

    def __init__(self, base: det.DetectContext, frame: pl.DataFrame) -> None:
        super().__init__(base.lake, base.config, base.since, base.until, list(base.local), base.intel)
        self._frame = frame  # (who answered whom: DetectContext.flows, over the whole hours it reads)
        self.suppressed = base.suppressed  # what a detector suppresses on the driver reaches the report

    def scan(self, start: dt.datetime, end: dt.datetime) -> pl.LazyFrame:
        return self._frame.lazy().filter((pl.col("ts_start") >= start) & (pl.col("ts_start") < end))


# ---- window-wide facts inside per-host code -----------------------------------------------------------------
# features.periodicity judges a pair's coverage against the span of ALL the flows it is given per window (a
# lake-wide fact a host bucket cannot see). On Spark every call is made twice: once to observe each bucket's
# (min, max) ts_start per window and call, then with two zero-byte rows of a sentinel pair at the global min and
# max added, so that the span is the lake's and the sentinel pair (2 connections) never becomes a candidate.
SENTINEL_SRC = "spark-sentinel"
SENTINEL_DST = "spark-sentinel-peer"


class _SpanPatch:
    """Swaps features.periodicity (and detectors' import of it) for a recording or a span-injecting wrapper."""

    def __init__(self, spans: dict[tuple[int, int], tuple[int, int]] | None) -> None:
        self.spans = spans  # None: observe; else (call, window_start_us) -> (min_us, max_us) to inject
        self.seen: list[tuple[int, int, int, int]] = []
        self.calls = 0

    def __enter__(self) -> _SpanPatch:
        from tracepipe.detect import features

        self._original = features.periodicity
        features.periodicity = det.periodicity = self._wrapped  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        from tracepipe.detect import features

        features.periodicity = det.periodicity = self._original  # type: ignore[assignment]

    def _wrapped(self, flows: pl.LazyFrame, window_s: float, *args: Any, **kwargs: Any) -> pl.LazyFrame:
        from tracepipe.detect.features import bucket_expr

        call = self.calls
        self.calls += 1
        step = int(window_s) * 1_000_000
        if self.spans is None:
            spans = (
                flows.group_by(bucket_expr("ts_start", window_s).dt.epoch("us").alias("w"))
                .agg(lo=pl.col("ts_start").min().dt.epoch("us"), hi=pl.col("ts_start").max().dt.epoch("us"))
                .collect()
            )
            self.seen.extend((call, w, lo, hi) for w, lo, hi in spans.iter_rows())
            return self._original(flows, window_s, *args, **kwargs)
        marks = [t for (c, _w), (lo, hi) in self.spans.items() if c == call for t in (lo, hi)]
        if marks:
            schema = flows.collect_schema()
            sentinel = pl.DataFrame({"ts_start": marks}, schema={"ts_start": pl.Int64}).with_columns(
                ts_start=pl.col("ts_start").cast(pl.Datetime("us", "UTC"))
            )
            sentinel = sentinel.with_columns(
                [
                    pl.lit(SENTINEL_SRC).alias("src_addr"),
                    pl.lit(SENTINEL_DST).alias("dst_addr"),
                    pl.lit(0).alias("bytes"),
                ]
            )
            sentinel = sentinel.with_columns(
                [
                    pl.lit(None).cast(dtype).alias(name)
                    for name, dtype in schema.items()
                    if name not in sentinel.columns
                ]
            ).select([pl.col(name).cast(dtype) for name, dtype in schema.items()])
            flows = pl.concat([flows, sentinel.lazy()])
        del step
        return self._original(flows, window_s, *args, **kwargs)


SPAN_ARROW = pa.schema([("call", pa.int64()), ("w", pa.int64()), ("lo", pa.int64()), ("hi", pa.int64())])


def _global_spans(
    routed: DataFrame, run: Callable[[pa.Table], None]
) -> dict[tuple[int, int], tuple[int, int]]:
    """Phase 1: each bucket runs `run` under an observing _SpanPatch; the lake-wide span per (call, window)."""

    def observe(table: pa.Table) -> pa.Table:
        with _SpanPatch(None) as patch:
            run(table)
        return pa.Table.from_pylist(
            [dict(zip(SPAN_ARROW.names, row, strict=True)) for row in patch.seen], schema=SPAN_ARROW
        )

    seen = to_arrow(routed.groupBy(BUCKET_COLUMN).applyInArrow(observe, spark_schema(SPAN_ARROW)), SPAN_ARROW)
    spans: dict[tuple[int, int], tuple[int, int]] = {}
    for call, w, lo, hi in zip(*(seen.column(n).to_pylist() for n in SPAN_ARROW.names), strict=True):
        old = spans.get((call, w))
        spans[(call, w)] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    return spans


# ---- flows, routed to host buckets --------------------------------------------------------------------------
def window_flows(spark: SparkSession, lake: Lake, start: dt.datetime, end: dt.datetime) -> DataFrame:
    """Flows with start <= ts_start < end; the `date` partitions outside are pruned. From `lake`'s own files:
    the sweep's lake is pinned at the versions its report records (its path reopened the newest version, so
    flows committed during a Spark sweep made alerts of rows the recorded version does not hold: Spark
    review)."""
    from pyspark.sql import functions as F

    flows = read_dataset(spark, lake, "flows")
    last_day = (end - dt.timedelta(microseconds=1)).date()
    return flows.where(F.col("date").between(F.lit(start.date()), F.lit(last_day))).where(
        (F.col("ts_start") >= F.lit(start)) & (F.col("ts_start") < F.lit(end))
    )


def local_hosts(flows: DataFrame, local_networks: list[str]) -> list[str]:
    """Distinct addresses of either end that fall in local_networks (same rule as features.local_addresses)."""
    from pyspark.sql import functions as F

    addrs = flows.select(F.col("src_addr").alias("addr")).union(flows.select(F.col("dst_addr").alias("addr")))
    unique = to_arrow(addrs.distinct()).column("addr").combine_chunks()
    mask = in_networks(unique, local_networks)
    return [a for a, m in zip(unique.to_pylist(), mask, strict=True) if m and a]


def route(flows: DataFrame, local: list[str], buckets: int) -> DataFrame:
    """Each flow once per bucket of its local end(s), with flags saying which end belongs to the bucket."""
    from pyspark.sql import functions as F

    spark = flows.sparkSession
    local_df = F.broadcast(spark.createDataFrame(pa.table({"addr": pa.array(local, pa.string())})))
    marked = flows.join(
        local_df.withColumnRenamed("addr", "_s"), F.col("src_addr") == F.col("_s"), "left"
    ).join(local_df.withColumnRenamed("addr", "_d"), F.col("dst_addr") == F.col("_d"), "left")
    src_bucket = F.when(F.col("_s").isNotNull(), F.pmod(F.xxhash64("src_addr"), F.lit(buckets)))
    dst_bucket = F.when(F.col("_d").isNotNull(), F.pmod(F.xxhash64("dst_addr"), F.lit(buckets)))
    routed = (
        marked.where(F.col("_s").isNotNull() | F.col("_d").isNotNull())
        .withColumn(
            BUCKET_COLUMN,
            F.explode(F.array_distinct(F.filter(F.array(src_bucket, dst_bucket), lambda b: b.isNotNull()))),
        )
        .withColumn("_src_in", F.coalesce(src_bucket == F.col(BUCKET_COLUMN), F.lit(False)))
        .withColumn("_dst_in", F.coalesce(dst_bucket == F.col(BUCKET_COLUMN), F.lit(False)))
    )
    return routed.select(*[f.name for f in FLOWS], BUCKET_COLUMN, *HOST_COLUMNS)


def _bucket_frame(table: pa.Table) -> tuple[pl.DataFrame, set[str]]:
    """A bucket's rows as a FLOWS-typed polars frame, and the local hosts the bucket owns."""
    src_in = table.column("_src_in").to_numpy(zero_copy_only=False)
    dst_in = table.column("_dst_in").to_numpy(zero_copy_only=False)
    hosts = set(table.column("src_addr").filter(pa.array(src_in)).to_pylist())
    hosts |= set(table.column("dst_addr").filter(pa.array(dst_in)).to_pylist())
    frame = pl.from_arrow(conform(table.select([f.name for f in FLOWS]), FLOWS))
    assert isinstance(frame, pl.DataFrame)
    return frame, hosts


def _arrow(frame: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    return frame.to_arrow().select(schema.names).cast(schema)


def _bucket_detectors(
    base: det.DetectContext, names: list[str], spans: dict[tuple[int, int], tuple[int, int]] | None = None
) -> Callable[[pa.Table], pa.Table]:
    def run(table: pa.Table) -> pa.Table:
        frame, hosts = _bucket_frame(table)
        context = FramesContext(base, frame)
        context.local = [*context.local, SENTINEL_SRC]
        if spans is None:
            found = det.run_detectors(context, names)
        else:
            with _SpanPatch(spans):
                found = det.run_detectors(context, names)
        return _arrow(found.filter(pl.col("addr").is_in(sorted(hosts))), CANDIDATE_ARROW)

    return run


def _bucket_features(
    base: det.DetectContext,
    local: list[str],
    window_s: float,
    history: dt.datetime,
    since: dt.datetime,
    schema: pa.Schema,
    spans: dict[tuple[int, int], tuple[int, int]] | None = None,
) -> Callable[[pa.Table], pa.Table]:
    """What features.compute_features does for the lake, for one bucket's flows."""

    def run(table: pa.Table) -> pa.Table:
        frame, hosts = _bucket_frame(table)
        facts = with_flow_facts(frame.lazy(), [*local, SENTINEL_SRC], base.night)
        if spans is None:
            features = host_features(facts, window_s, history_start=history).collect()
        else:
            with _SpanPatch(spans):
                features = host_features(facts, window_s, history_start=history).collect()
        features = features.filter(pl.col("window_start") >= floor_time(since, window_s)).filter(
            pl.col("host").is_in(sorted(hosts))
        )
        return _arrow(features, schema)

    return run


def _features_schema(base: det.DetectContext, window_s: float) -> pa.Schema:
    """The Arrow schema host_features produces (from an empty frame, so it cannot drift from the code)."""
    empty = FramesContext(base, pl.from_arrow(FLOWS.empty_table()))  # type: ignore[arg-type]
    facts = with_flow_facts(empty._frame.lazy(), [], base.night)
    frame = host_features(facts, window_s, history_start=None).collect()
    schema = frame.to_arrow().schema
    return pa.schema([pa.field(f.name, _signed(f.type)) for f in schema])


def _signed(arrow_type: pa.DataType) -> pa.DataType:
    """A type Spark has: text as string, unsigned counts (polars n_unique/len are UInt32) as int64."""
    if pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type):
        return pa.string()
    if pa.types.is_unsigned_integer(arrow_type):
        return pa.int64()
    return arrow_type


# ---- the sweep ---------------------------------------------------------------------------------------------
def sweep_candidates(
    lake: Lake,
    config: PipelineConfig,
    since: dt.datetime,
    until: dt.datetime,
    intel: pa.Table | None = None,
    *,
    master: str | None = None,
    conf: dict[str, str] | None = None,
    session: SparkSession | None = None,
    notes: list[str] | None = None,
    buckets: int | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[det.DetectContext, pl.DataFrame]:
    """Rule and anomaly candidates of a sweep window, computed on Spark (schema detectors.CANDIDATE), and the
    DetectContext that `detectors.finalize` needs. The same detectors as the DuckDB/polars engine.
    `timings` (if given) receives seconds per stage: session, local, rules, exfiltration, anomaly."""
    timings = timings if timings is not None else {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock
        clock = now

    spark = session or get_session(master, conf)
    lap("session")
    buckets = buckets or int(spark.conf.get("spark.sql.shuffle.partitions", "200"))
    notes = notes if notes is not None else []
    since, until = utc(since), utc(until)
    ctx = det.DetectContext(lake, config, since, until, intel=intel)

    # the local addresses, as detectors.prepare_context defines them
    widest = max(det._window_of(config, name) for name in det.DETECTORS)
    span_start, span_end = ctx.span(widest)
    local = set(local_hosts(window_flows(spark, lake, span_start, span_end), config.pipeline.local_networks))
    local |= det.leased_addresses(lake, det.lease_range(ctx))
    ctx.local = sorted(a for a in local if a)
    lap("local")

    enabled = [n for n in det.DETECTORS if getattr(config.detectors, n).enabled]
    per_host = [n for n in enabled if n not in CROSS_HOST]
    frames = []
    if per_host:
        spans = [ctx.span(det._window_of(config, n)) for n in per_host]
        # from a whole hour, as the local spill: who answered whom is judged per hour (features.with_response)
        start = floor_time(min(s for s, _ in spans), RESPONSE_PERIOD_S)
        end = max(e for _, e in spans)
        routed = route(window_flows(spark, lake, start, end), ctx.local, buckets)
        spans = _global_spans(routed, _bucket_detectors(ctx, [n for n in per_host if n in WINDOW_WIDE]))
        lap("spans")
        found = routed.groupBy(BUCKET_COLUMN).applyInArrow(
            _bucket_detectors(ctx, per_host, spans), spark_schema(CANDIDATE_ARROW)
        )
        frames.append(pl.from_arrow(to_arrow(found, CANDIDATE_ARROW)))
        lap("rules")
    if "exfiltration" in enabled:
        frames.append(_exfiltration(spark, ctx))
        lap("exfiltration")
    candidates = _concat(frames)
    if config.model.enabled:
        rule_hosts = set(candidates.get_column("addr").to_list())
        candidates = _concat([candidates, _anomaly(spark, ctx, rule_hosts, notes, buckets)])
        lap("anomaly")
    return ctx, candidates


def _concat(frames: list[Any]) -> pl.DataFrame:
    frames = [f.cast(det.CANDIDATE) for f in frames if f is not None]  # type: ignore[arg-type]
    return pl.concat(frames) if frames else det._empty()


def _exfiltration(spark: SparkSession, ctx: det.DetectContext) -> pl.DataFrame:
    """exfiltration on the driver over per (src, dst, window) sums: the columns it reads, losslessly."""
    from pyspark.sql import functions as F

    window_s = det._window_of(ctx.config, "exfiltration")
    start, end = ctx.span(window_s)
    baseline_start = start - dt.timedelta(seconds=float(ctx.config.window.baseline))
    step = int(window_s) * 1_000_000
    local_df = F.broadcast(spark.createDataFrame(pa.table({"addr": pa.array(ctx.local, pa.string())})))
    flows = window_flows(spark, ctx.lake, baseline_start, end)
    outbound = flows.join(local_df, flows.src_addr == local_df.addr, "left_semi").join(
        local_df, flows.dst_addr == local_df.addr, "left_anti"
    )
    window = F.timestamp_micros(F.floor(F.unix_micros("ts_start") / F.lit(step)).cast("long") * F.lit(step))
    # dst_port: a science peer may be declared for some services (ports) only
    sums = outbound.groupBy("src_addr", "dst_addr", "dst_port", window.alias("_window")).agg(
        F.sum("bytes").alias("bytes"), F.min("ts_start").alias("ts_start")
    )
    table = to_arrow(sums.select("src_addr", "dst_addr", "dst_port", "bytes", "ts_start"))
    frame = pl.from_arrow(conform(table, FLOWS))
    assert isinstance(frame, pl.DataFrame)
    frame = frame.with_columns(ts_end=pl.col("ts_start"))
    return det.exfiltration(FramesContext(ctx, frame))


def _anomaly(
    spark: SparkSession, ctx: det.DetectContext, rule_hosts: set[str], notes: list[str], buckets: int
) -> pl.DataFrame:
    """sweep.anomaly_stage on Spark: features per host bucket, model.score in mapInArrow, then the same
    anomaly_candidates."""
    from tracepipe.detect import model

    cfg = ctx.config.model
    loaded = model.load_for_sweep(ctx.lake, cfg.path, notes)
    if loaded is None:
        return det._empty()
    forest, info = loaded
    window_s = info.window_seconds
    history = ctx.since - dt.timedelta(seconds=float(ctx.config.window.baseline))
    flows = window_flows(spark, ctx.lake, history, ctx.until)
    local = sorted(local_hosts(flows, ctx.config.pipeline.local_networks))
    schema = _features_schema(ctx, window_s)
    routed = route(flows, local, buckets)
    spans = _global_spans(routed, _bucket_features(ctx, local, window_s, history, ctx.since, schema))
    features = routed.groupBy(BUCKET_COLUMN).applyInArrow(
        _bucket_features(ctx, local, window_s, history, ctx.since, schema, spans), spark_schema(schema)
    )
    scored_schema = pa.schema(
        [*schema, pa.field("anomaly_score", pa.float64()), pa.field("explanation", pa.string())]
    )
    top = cfg.top_features

    def score_batches(batches: Any) -> Any:
        for batch in batches:
            frame = pl.from_arrow(pa.Table.from_batches([batch]))
            scored = model.score(frame, forest, info, top)  # type: ignore[arg-type]
            yield from _arrow(scored, scored_schema).to_batches()

    scored = pl.from_arrow(
        to_arrow(features.mapInArrow(score_batches, spark_schema(scored_schema)), scored_schema)
    )
    assert isinstance(scored, pl.DataFrame)
    scored = scored.sort(["anomaly_score", "host", "window_start"], descending=[True, False, False])
    return model.anomaly_candidates(scored, cfg.min_score, cfg.max_alerts, window_s, rule_hosts)
