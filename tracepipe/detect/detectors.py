"""Explainable detectors over the lake's flows: each is a polars lazy query (streaming, out of core) that
returns candidate alerts; `finalize` then applies the allowlists, names the VM that held the address then (ASOF
join on vm_leases in DuckDB, deleted VMs included), writes the one-line reason and the evidence flow rows, and
gives each alert a deterministic id (hash of detector, address, peer, port, window) so reruns add nothing.

Thresholds come from the pipeline file (tracepipe.pipeline_config); the defaults there are documented.
Every detector window is epoch-aligned (1 h windows start on the hour, 24 h windows at 00:00 UTC) and reads
the whole windows that overlap [since, until), so a rerun of the same sweep finds the same alerts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from tracepipe.detect.features import (
    RESPONSE_PERIOD_S,
    SYN,
    SpanBook,
    floor_time,
    in_networks,
    local_addresses_in,
    periodicity,
    saturating_sum,
    scan_flows,
    utc,
    with_flow_facts,
    with_response,
)
from tracepipe.intel import match_addresses
from tracepipe.lake import Lake
from tracepipe.pipeline_config import BruteForce, HorizontalScan, PipelineConfig, VerticalScan
from tracepipe.schema import ALERTS

# The columns every detector returns (a candidate alert, before attribution). `reason` may hold "{who}",
# replaced by the address and the VM that held it. `port` is the service port the alert is about (or null).
CANDIDATE = {
    "detector": pl.String,
    "addr": pl.String,
    "peer": pl.String,
    "port": pl.Int32,
    "window_start": pl.Datetime("us", "UTC"),
    "window_end": pl.Datetime("us", "UTC"),
    "score": pl.Float64,
    "first_ts": pl.Datetime("us", "UTC"),
    "reason": pl.String,
    "features": pl.String,
}
SCAN_DETECTORS = ("horizontal_scan", "vertical_scan")
EVIDENCE_COLUMNS = (
    "ts_start",
    "ts_end",
    "src_addr",
    "dst_addr",
    "src_port",
    "dst_port",
    "proto",
    "packets",
    "bytes",
    "tcp_flags",
    "source",
)


# ---- human-readable numbers (the reason line) ---------------------------------------------------------------
def fmt_int(n: float) -> str:
    return f"{int(n):,}"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 86400 and seconds % 86400 == 0:
        return f"{seconds // 86400} d"
    if seconds >= 3600:
        h, m = divmod(seconds // 60, 60)
        return f"{h} h" if m == 0 else f"{h} h {m} min"
    if seconds >= 60:
        m, s = divmod(seconds, 60)
        return f"{m} min" if s == 0 or m >= 10 else f"{m} min {s} s"
    return f"{seconds} s"


def fmt_share(x: float) -> str:
    return f"{100 * x:.0f}%"


# ---- context -----------------------------------------------------------------------------------------------
@dataclass
class DetectContext:
    """What every detector needs: the lake, the sweep window, the pipeline, the local addresses, the intel."""

    lake: Lake
    config: PipelineConfig
    since: dt.datetime
    until: dt.datetime
    local: list[str] = field(default_factory=list)
    intel: pa.Table | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # what a detector or an allowlist kept out of the alerts, and why (the report lists it)
    suppressed: list[dict] = field(default_factory=list)
    # what two detectors of one run compute alike from the same flows (both scans' per-destination counts),
    # computed by the first that asks: one per host bucket (a BucketContext has its own), keyed by what it is
    shared: dict[tuple, pl.DataFrame] = field(default_factory=dict, repr=False)

    def suppress(self, frame: pl.DataFrame, detector: str, why: Callable[[dict], str]) -> None:
        """Record candidates a detector judged benign for a declared or measured reason."""
        for r in frame.to_dicts():
            self.suppressed.append(
                {
                    "detector": detector,
                    "addr": r.get("addr"),
                    "peer": r.get("peer"),
                    "port": r.get("port"),
                    "window_start": r.get("window_start"),
                    "why": why(r),
                }
            )

    spans: SpanBook | None = None  # window-wide spans for periodicity when the flows are one host bucket's
    # the model's features' hosts over a (start, until), when prepare_context looked them up (features.py)
    feature_hosts: dict[tuple[dt.datetime, dt.datetime], list[str]] = field(default_factory=dict)

    @property
    def night(self) -> tuple[int, int]:
        return self.config.window.night_start_hour, self.config.window.night_end_hour

    def span(self, window_s: float) -> tuple[dt.datetime, dt.datetime]:
        """The flows a detector of `window_s` windows reads: from the start of the window the sweep begins in,
        up to the sweep's end. Never past it: an hourly sweep's 24 h intel or beacon window read the rest of the
        day, so a rerun or a backfill of 03:00-04:00 reported flows of 09:00 as new (SOC review), which a
        sweep run live at 04:00 never could."""
        return floor_time(self.since, window_s), self.until

    def flows(
        self,
        window_s: float,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        response: bool = False,
    ) -> pl.LazyFrame:
        """Flows of the whole windows overlapping the sweep, with the shared facts and `window_start`;
        `response`: and who answered whom (features.with_response, per day; a host bucket's or Spark
        partition's facts have it already, computed once for all their detectors)."""
        start, end = self.span(window_s)
        start, end = since or start, until or end
        facts = self.facts(start, end)
        if response and "response" not in facts.collect_schema().names():
            # judged over whole hours (features.RESPONSE_PERIOD_S), whatever this detector's window: the rows
            # a host bucket or Spark partition judges them over (a review: an hour cut at the sweep's start
            # turned a server's answers into connections it opened)
            first = floor_time(start, RESPONSE_PERIOD_S)
            facts = with_response(self.facts(first, end)).filter(pl.col("ts_start") >= start)
        step = int(window_s) * 1_000_000
        return facts.with_columns(
            window_start=((pl.col("ts_start").dt.epoch("us") // step) * step).cast(pl.Datetime("us", "UTC")),
        )

    def facts(self, start: dt.datetime, end: dt.datetime) -> pl.LazyFrame:
        """scan() with the shared per-flow facts (features.with_flow_facts over the local hosts)."""
        return with_flow_facts(self.scan(start, end), self.local, self.night)

    def scan(self, start: dt.datetime, end: dt.datetime) -> pl.LazyFrame:
        """The flows with start <= ts_start < end: the lake's here; one host bucket's, or a Spark partition's,
        in the contexts of detect/buckets.py and engines/spark_sweep.py."""
        return scan_flows(self.lake, start, end)


def prepare_context(
    lake: Lake,
    config: PipelineConfig,
    since: dt.datetime,
    until: dt.datetime,
    intel: pa.Table | None = None,
    feature_range: tuple[dt.datetime, dt.datetime] | None = None,
) -> DetectContext:
    """The context of a sweep's detectors. `feature_range`: the model's features' hosts over that range are
    looked up in the same scan (ctx.feature_hosts)."""
    ctx = DetectContext(lake, config, utc(since), utc(until), intel=intel)
    ranges = local_ranges(ctx, feature_range)
    return with_local(ctx, local_addresses_in(lake, ranges, config.pipeline.local_networks), feature_range)


def local_ranges(
    ctx: DetectContext, feature_range: tuple[dt.datetime, dt.datetime] | None = None
) -> list[tuple[dt.datetime, dt.datetime]]:
    """Where the local addresses are looked up: the whole windows of the widest detector around the sweep,
    then the model's features' range (when given)."""
    widest = max(_window_of(ctx.config, name) for name in DETECTORS)
    extra = [(utc(feature_range[0]), utc(feature_range[1]))] if feature_range else []
    return [ctx.span(widest), *extra]


def lease_range(ctx: DetectContext) -> tuple[dt.datetime, dt.datetime]:
    """The times whose leases make an address local (leased_addresses): every flow a rule detector reads
    starts in it, the whole windows of each detector around the sweep and exfiltration's baseline before them.
    Not the model's features' range: their hosts are local_networks' only."""
    spans = [ctx.span(_window_of(ctx.config, name)) for name in DETECTORS] + [exfiltration_range(ctx)]
    return min(start for start, _ in spans), max(end for _, end in spans)


def leased_addresses(lake: Lake, during: tuple[dt.datetime, dt.datetime]) -> set[str]:
    """Addresses a VM held at some time in `during` (lease_range; floating IPs outside local_networks too):
    local as well. Only the leases that overlap it are read (lease_at.read_leases skips the other files and
    row groups by their statistics): every address ever leased made an hourly sweep read the whole history
    (3 M addresses: 19 s and 945 MB), and made a rerun of an old window count addresses leased since."""
    from tracepipe.correlate.lease_at import read_leases

    leases = read_leases(lake, columns=["addr"], during=(utc(during[0]), utc(during[1])))
    return {a for a in leases.column("addr").unique().to_pylist() if a}


def with_local(
    ctx: DetectContext,
    found: list[list[str]],
    feature_range: tuple[dt.datetime, dt.datetime] | None,
    leased: set[str] | frozenset[str] | None = None,
) -> DetectContext:
    """ctx with its local hosts from `found` (features.local_addresses_in over local_ranges) and the leases
    of lease_range (`leased`: leased_addresses, when already read)."""
    if feature_range:
        ctx.feature_hosts[utc(feature_range[0]), utc(feature_range[1])] = found[1]
    if leased is None:
        leased = leased_addresses(ctx.lake, lease_range(ctx))
    ctx.local = sorted(set(found[0]) | leased)
    return ctx


def _window_of(config: PipelineConfig, name: str) -> float:
    return float(getattr(config.detectors, name).window)


def _with_window_end(frame: pl.LazyFrame, window_s: float) -> pl.LazyFrame:
    return frame.with_columns(window_end=pl.col("window_start") + pl.duration(seconds=int(window_s)))


def _ratio_score(value: pl.Expr, threshold: float) -> pl.Expr:
    """0.5 at the threshold, 1.0 at 4x it (log scale): how far past the line a host went."""
    return (0.5 + 0.25 * (value / max(threshold, 1e-9)).log(2)).clip(0.5, 1.0)


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema=CANDIDATE)


def _finish(
    frame: pl.DataFrame, detector: str, reason: Callable[[dict], str], features: Callable[[dict], dict]
) -> pl.DataFrame:
    """Detector rows -> CANDIDATE columns; reason and features are written per alert (few rows)."""
    if frame.is_empty():
        return _empty()
    rows = frame.to_dicts()
    return pl.DataFrame(
        {
            "detector": [detector] * len(rows),
            "addr": [r["addr"] for r in rows],
            "peer": [r.get("peer") for r in rows],
            "port": [r.get("port") for r in rows],
            "window_start": [r["window_start"] for r in rows],
            "window_end": [r["window_end"] for r in rows],
            "score": [float(r["score"]) for r in rows],
            "first_ts": [r["first_ts"] for r in rows],
            "reason": [reason(r) for r in rows],
            "features": [json.dumps(features(r), default=str) for r in rows],
        },
        schema=CANDIDATE,
    )


# ---- the detectors -----------------------------------------------------------------------------------------
FAN_OUT_KEY = ["src_addr", "dst_addr", "dst_port", "window_start"]


def _fan_out_counts(ctx: DetectContext, window_s: float) -> pl.DataFrame:
    """Per (src_addr, dst_addr, dst_port, window) of the local hosts' outgoing TCP and UDP (replies aside):
    flows, tcp, failed, first_ts, the proto of the first of those flows (earliest start, then lowest proto: a
    value, not a row position, so that every engine and row order picks the same), and whether that
    destination port answered over UDP (`replied`). Both scans'
    groups are unions of these rows (a horizontal scan's per port, a vertical scan's per destination), so
    they are counted from the flows once for both (ctx.shared) and the scans group this smaller table."""
    key = ("fan_out", float(window_s))
    if key not in ctx.shared:
        # the (address, port)s that answered over UDP: the peer's record back to the host's port (with_response),
        # its ends swapped, joined to the counts as `replied`. A resolver's 150 answered queries to 150 servers
        # were "100% failed", a horizontal scan every hour (SOC review). One collect for both: one scan of the
        # flows, one judgement of who answered whom
        flows = ctx.flows(window_s, response=True).filter(pl.col("proto").is_in([6, 17]))
        counts = (
            flows.filter(pl.col("src_owned") & ~pl.col("response"))
            .group_by(FAN_OUT_KEY)
            .agg(
                flows=pl.len(),
                tcp=(pl.col("proto") == 6).sum(),
                failed=pl.col("failed").sum(),
                first_ts=pl.col("ts_start").min(),
                proto=pl.col("proto").sort_by("ts_start", "proto").first(),
            )
        )
        answers = (
            flows.filter(pl.col("response") & (pl.col("proto") == 17) & pl.col("dst_owned"))
            .select(
                src_addr=pl.col("dst_addr"),
                dst_addr=pl.col("src_addr"),
                dst_port=pl.col("src_port"),
                window_start=pl.col("window_start"),
            )
            .unique()
        )
        counts_of, answered = pl.collect_all([counts, answers], engine="streaming")
        ctx.shared[key] = counts_of.join(
            answered.with_columns(replied=pl.lit(True)), on=FAN_OUT_KEY, how="left", nulls_equal=True
        ).with_columns(pl.col("replied").fill_null(False))
    return ctx.shared[key]


def _fan_out(
    ctx: DetectContext,
    c: HorizontalScan | VerticalScan,
    fixed: str,
    spread: str,
    count: str,
    minimum: int,
    **extra: pl.Expr,
) -> pl.DataFrame:
    """Local hosts that, per window, sent to one `fixed` value (a port, or a destination) from many distinct
    `spread` values (destinations, or ports), mostly failed: the shape of both scans. The failed share is
    that of the `spread` values every attempt to which failed, not of the flows: 1,600 answered connections
    to one decoy hid 1,500 unanswered probes as a 48% failed share (hostile review). UDP has no handshake: a
    value reached over UDP only counts as failed unless it answered over UDP (a record back from its port).
    `extra`: more aggregations over _fan_out_counts' rows of a group."""
    found = (
        _fan_out_counts(ctx, c.window)
        .lazy()
        .group_by("src_addr", fixed, "window_start")
        .agg(
            # one row per distinct (fixed, spread) value pair: the distinct spread values, a null one included
            # (as n_unique counts it)
            pl.len().alias(count),
            flows=pl.col("flows").sum(),
            # the spread values never answered: every TCP attempt to it failed, or none was TCP, and no UDP answer
            unanswered=((pl.col("failed") >= pl.col("tcp")) & ~pl.col("replied")).sum(),
            first_ts=pl.col("first_ts").min(),
            **extra,
        )
        .filter(pl.col(count) >= minimum)
        .with_columns(failed_share=pl.col("unanswered") / pl.col(count))
        .filter(pl.col("failed_share") >= c.min_failed_share)
        .with_columns(score=_ratio_score(pl.col(count).cast(pl.Float64), minimum), addr=pl.col("src_addr"))
    )
    return _with_window_end(found, c.window).collect(engine="streaming")


def horizontal_scan(ctx: DetectContext) -> pl.DataFrame:
    """One local host, one port, many destinations, mostly unanswered."""
    c = ctx.config.detectors.horizontal_scan
    frame = _fan_out(
        ctx,
        c,
        "dst_port",
        "dst_addr",
        "hosts",
        c.min_hosts,
        proto=pl.col("proto").sort_by("first_ts", "proto").first(),
    ).with_columns(port=pl.col("dst_port"))
    return _finish(
        frame,
        "horizontal_scan",
        lambda r: (
            f"{{who}} contacted {fmt_int(r['hosts'])} distinct hosts on port {r['port']}"
            f"{'/udp' if r['proto'] == 17 else ''} in {fmt_duration(c.window)}, "
            f"{fmt_share(r['failed_share'])} failed"
        ),
        lambda r: {k: r[k] for k in ("hosts", "flows", "failed_share")},
    )


def vertical_scan(ctx: DetectContext) -> pl.DataFrame:
    """One local host probing many ports of one destination, mostly refused or unanswered."""
    c = ctx.config.detectors.vertical_scan
    frame = _fan_out(
        ctx,
        c,
        "dst_addr",
        "dst_port",
        "ports",
        c.min_ports,
        low=pl.col("dst_port").min(),
        high=pl.col("dst_port").max(),
    ).with_columns(peer=pl.col("dst_addr"), port=pl.lit(None, pl.Int32))
    return _finish(
        frame,
        "vertical_scan",
        lambda r: (
            f"{{who}} probed {fmt_int(r['ports'])} ports ({r['low']}–{r['high']}) of {r['peer']} "
            f"in {fmt_duration(c.window)}, {fmt_share(r['failed_share'])} failed"
        ),
        lambda r: {k: r[k] for k in ("ports", "flows", "failed_share")},
    )


SERVICE_NAMES = {22: "SSH", 3389: "RDP", 5900: "VNC", 21: "FTP", 23: "telnet", 587: "SMTP", 465: "SMTP"}
SERVICE_NAMES |= {110: "POP3", 995: "POP3", 143: "IMAP", 993: "IMAP", 3306: "MySQL", 5432: "PostgreSQL"}
SERVICE_NAMES |= {1433: "MSSQL", 389: "LDAP", 636: "LDAP", 445: "SMB", 5985: "WinRM", 5986: "WinRM"}
KNOWN_PORT_BONUS = 0.1  # a behaviour on its service's own port is a little more certain; never required


def _spread(values: pl.Expr) -> pl.Expr:
    """MAD / median (robust relative spread) of a column within a group: 0 = all alike."""
    values = values.cast(pl.Float64)
    return (values - values.median()).abs().median() / values.median().clip(lower_bound=1e-9)


def _with_known_port(score: pl.Expr, port: pl.Expr, known: list[int]) -> pl.Expr:
    """Off the known ports a behaviour scores KNOWN_PORT_BONUS lower; on them it keeps its score."""
    return score - pl.when(port.is_in(known)).then(0.0).otherwise(KNOWN_PORT_BONUS)


# what brute_force's groups and _periodic_pushes read of each attempt: the only columns kept of the rows of the
# groups with enough attempts
ATTEMPT_COLUMNS = (
    "src_addr",
    "dst_addr",
    "src_port",
    "dst_port",
    "window_start",
    "ts_start",
    "bytes",
    "duration",
    "failed",
)
# the client's end and the server's of a TCP connection, as an attempt's record has them (an answer's swapped)
_CONNECTION = ["src_addr", "src_port", "dst_addr", "dst_port", "window_start"]


def brute_force(ctx: DetectContext) -> pl.DataFrame:
    """Many short, alike sessions from one client to one server port, whatever the port: a login tool
    repeats one exchange (near-identical bytes and durations). The share refused outright (no handshake) is
    reported, not required: a login refused after the handshake is, in a flow record, any closed session.
    Outbound: one local source against one or more targets (a campaign spreads its tries), counted per
    (source, port). Inbound: one outside source against one local host, per (source, victim, port).
    Known login ports (SSH, RDP, ...) raise the score; they are not required. Off them, connections at a steady
    period to every target are a periodic push (metrics, logs), not an attack: listed as suppressed."""
    c = ctx.config.detectors.brute_force
    flags = pl.col("tcp_flags").fill_null(0).cast(pl.Int32)
    tcp = ctx.flows(c.window, response=True).filter(
        (pl.col("proto") == 6) & (pl.col("src_local") | pl.col("dst_local"))
    )
    # connections whose server answered more than a login's answer (max_answer_bytes): a download, never a
    # login try however small the request (a squid's 100 GETs of 800 B answered by 200 kB-1 MB were "100 port
    # 8000 login attempts", every hour: SOC review). The answer's own record (with_response), its ends swapped
    big_answers = tcp.filter(pl.col("response") & (pl.col("bytes") > c.max_answer_bytes)).select(
        src_addr=pl.col("dst_addr"),
        src_port=pl.col("dst_port"),
        dst_addr=pl.col("src_addr"),
        dst_port=pl.col("src_port"),
        window_start=pl.col("window_start"),
    )
    flows = tcp.filter(
        ~pl.col("response")
        # an attempt opens a connection: a record whose flags are known but hold no SYN is an answer (the
        # RST|ACK of a closed port probed from a high port) or a later piece, not a login try
        & ((flags == 0) | ((flags & SYN) != 0))
        # and is short and small: bulk sessions never count, whatever their number (cheap: most flows go here)
        & (pl.col("bytes") <= c.max_bytes_per_attempt)
        & (pl.col("duration") <= c.max_duration)
    )
    size = pl.col("bytes").cast(pl.Float64)
    shape = {
        "attempts": pl.len(),
        "median_bytes": size.median(),
        "size_spread": _spread(size),
        "median_duration": pl.col("duration").median(),
        "failed": pl.col("failed").sum(),
        "first_ts": pl.col("ts_start").min(),
    }

    def enough(frame: pl.LazyFrame, keys: list[str]) -> pl.LazyFrame:
        """The groups with enough attempts (per target), counted first and cheaply: the medians and the
        mode below then run on the few groups that pass, not on every client of every port."""
        counted = (
            frame.group_by(keys)
            .agg(n=pl.len(), hosts=pl.col("dst_addr").n_unique())
            .filter(
                (pl.col("n") >= c.min_attempts) & (pl.col("n") / pl.col("hosts") >= c.min_attempts_per_target)
            )
        )
        return (
            frame.join(counted.select(keys), on=keys, how="semi")
            .join(big_answers, on=_CONNECTION, how="anti", nulls_equal=True)
            .select(ATTEMPT_COLUMNS)
        )

    # the attempts of the groups that pass, read from the flows ONCE (both directions in one collect): the
    # shapes below and the periodic-push check of the groups off the login ports both take these rows (that
    # check re-read the window's flows: 7.7 s of a 91 s sweep at 5*10^7 flows with every VM pushing metrics)
    selected = {
        "outbound": enough(flows.filter(pl.col("src_owned")), ["src_addr", "dst_port", "window_start"])
        if c.outbound
        else None,
        "inbound": enough(
            flows.filter(~pl.col("src_local") & pl.col("dst_owned")),
            ["src_addr", "dst_addr", "dst_port", "window_start"],
        )
        if c.inbound
        else None,
    }
    wanted = {k: v for k, v in selected.items() if v is not None}
    attempts = dict(zip(wanted, pl.collect_all(list(wanted.values())), strict=True)) if wanted else {}
    frames = []
    if "outbound" in attempts:
        outbound = ["src_addr", "dst_port", "window_start"]
        frames.append(
            attempts["outbound"]
            .lazy()
            .group_by(outbound)
            .agg(
                targets=pl.col("dst_addr").n_unique(),
                # the most tried target, ties to the lowest address: the same in every engine, bucket and dtype
                top_target=pl.col("dst_addr").mode().sort().first(),
                **shape,
            )
            .with_columns(
                direction=pl.lit("outbound"),
                addr=pl.col("src_addr"),
                peer=pl.when(pl.col("targets") == 1).then(pl.col("top_target")).otherwise(None),
            )
        )
    if "inbound" in attempts:
        inbound = ["src_addr", "dst_addr", "dst_port", "window_start"]
        frames.append(
            attempts["inbound"]
            .lazy()
            .group_by(inbound)
            .agg(**shape)
            .with_columns(
                direction=pl.lit("inbound"),
                addr=pl.col("dst_addr"),
                peer=pl.col("src_addr"),
                targets=pl.lit(1, pl.UInt32),
                top_target=pl.col("dst_addr"),
            )
        )
    if not frames:
        return _empty()
    columns = [
        "addr",
        "peer",
        "dst_port",
        "window_start",
        "attempts",
        "targets",
        "median_bytes",
        "size_spread",
        "median_duration",
        "failed",
        "first_ts",
        "direction",
        "top_target",
    ]
    found = (
        pl.concat([f.select(columns) for f in frames])
        .filter(
            (pl.col("attempts") >= c.min_attempts)
            & (pl.col("median_bytes") <= c.max_bytes_per_attempt)
            & (pl.col("attempts") / pl.col("targets") >= c.min_attempts_per_target)
            & (pl.col("median_duration") <= c.max_duration)
            & (pl.col("size_spread") <= c.max_size_spread)
        )
        .with_columns(
            port=pl.col("dst_port"),
            known_port=pl.col("dst_port").is_in(c.ports),
            failed_share=pl.col("failed") / pl.col("attempts"),
            score=_with_known_port(
                _ratio_score(pl.col("attempts").cast(pl.Float64), c.min_attempts), pl.col("dst_port"), c.ports
            ),
        )
    )
    frame = _with_window_end(found, c.window).collect(engine="streaming")
    pushes = _periodic_pushes(pl.concat(list(attempts.values())).lazy(), frame, c)
    if not pushes.is_empty():
        ctx.suppress(
            pushes,
            "brute_force",
            lambda r: (
                f"{r['attempts']} short connections of {r['addr'] if r['direction'] == 'outbound' else r['peer']} "
                f"to port {r['port']} in {fmt_duration(c.window)}, to each target every "
                f"{fmt_duration(r['period'])} (intervals within {fmt_share(r['period_spread'])}), "
                f"~{fmt_bytes(r['median_bytes'])} each, not a login port: a periodic push (metrics, logs), "
                "not a login attack"
            ),
        )
        frame = frame.join(  # peer is null for an outbound group of several targets
            pushes.select(frame.columns),
            on=["direction", "addr", "peer", "port", "window_start"],
            how="anti",
            nulls_equal=True,
        )

    def reason(r: dict) -> str:
        service = SERVICE_NAMES.get(r["port"], f"port {r['port']}")
        each = (
            f"median {fmt_bytes(r['median_bytes'])} and {r['median_duration']:.1f} s each, "
            f"sizes within {fmt_share(r['size_spread'])}"
        )
        if r["direction"] == "outbound":
            against = r["peer"] if r["targets"] == 1 else f"{r['targets']} hosts (most: {r['top_target']})"
            return (
                f"{{who}} made {fmt_int(r['attempts'])} {service} login attempts against {against} in "
                f"{fmt_duration(c.window)} ({each}): outbound brute force"
            )
        return (
            f"{r['peer']} made {fmt_int(r['attempts'])} {service} login attempts against {{who}} in "
            f"{fmt_duration(c.window)} ({each}): inbound brute force"
        )

    keys = (
        "attempts",
        "targets",
        "median_bytes",
        "size_spread",
        "median_duration",
        "failed",
        "failed_share",
        "known_port",
        "direction",
    )
    return _finish(frame, "brute_force", reason, lambda r: {k: r[k] for k in keys})


def _periodic_pushes(flows: pl.LazyFrame, found: pl.DataFrame, c: BruteForce) -> pl.DataFrame:
    """The brute-force groups of `found` off the login ports whose connections to each of their targets come
    at a steady period: a host pushing metrics or logs to a collector (pushgateway 9091, Graphite 2003,
    InfluxDB 8086, Fluentd 24224) every N seconds, which a SOC analyst tells from a login tool by its rhythm; a
    tool fires as fast as the server answers, or in parallel bursts. With `period` (median interval, worst
    target) and `period_spread` (MAD/median of the intervals, worst target). `flows`: the attempts that
    brute_force grouped (ATTEMPT_COLUMNS), which hold every flow of these groups: an outbound group's initiator
    is a host it owns (all its attempts are there), an inbound group is one (source, victim) pair."""
    off = found.filter(~pl.col("known_port"))
    if off.is_empty():
        return off.with_columns(period=pl.lit(0.0), period_spread=pl.lit(0.0))
    # the initiator of every group: the local source (outbound) or the outside one (inbound)
    initiator = pl.when(pl.col("direction") == "outbound").then(pl.col("addr")).otherwise(pl.col("peer"))
    keys = off.select(src_addr=initiator, dst_port="dst_port", window_start="window_start").unique()
    pair = ["src_addr", "dst_addr", "dst_port", "window_start"]
    interval = pl.col("ts_start").sort().diff().dt.total_microseconds().drop_nulls().cast(pl.Float64) / 1e6
    rhythm = (
        flows.join(keys.lazy(), on=["src_addr", "dst_port", "window_start"], how="semi")
        .group_by(pair)
        .agg(n=pl.len(), period=interval.median(), period_spread=_spread(interval))
        .with_columns(
            steady=(pl.col("n") >= 3)
            & (pl.col("period") >= float(c.push_min_period))
            & (pl.col("period_spread") <= c.push_max_period_spread)
        )
        .collect()
    )
    per_source = rhythm.group_by(["src_addr", "dst_port", "window_start"]).agg(
        steady=pl.col("steady").all(),
        period=pl.col("period").max(),
        period_spread=pl.col("period_spread").max(),
    )
    outbound = off.filter(pl.col("direction") == "outbound").join(
        per_source,
        left_on=["addr", "dst_port", "window_start"],
        right_on=["src_addr", "dst_port", "window_start"],
    )
    inbound = off.filter(pl.col("direction") == "inbound").join(
        rhythm.drop("n"),
        left_on=["peer", "addr", "dst_port", "window_start"],
        right_on=["src_addr", "dst_addr", "dst_port", "window_start"],
    )
    columns = [*off.columns, "period", "period_spread"]
    return (
        pl.concat([outbound.select([*columns, "steady"]), inbound.select([*columns, "steady"])])
        .filter(pl.col("steady"))
        .drop("steady")
    )


def beacon(ctx: DetectContext) -> pl.DataFrame:
    """Connections from a local host to one destination at regular intervals with regular sizes (RITA-like)."""
    c = ctx.config.detectors.beacon
    flows = ctx.flows(c.window, response=True).filter(
        pl.col("src_owned") & ~pl.col("response") & ~pl.col("dst_port").is_in(c.ignore_ports)
    )
    if c.external_only:
        flows = flows.filter(~pl.col("dst_local"))
    found = (
        periodicity(flows.drop("window_start"), c.window, c.min_connections, spans=ctx.spans)
        .filter(pl.col("score") >= c.min_score)
        .with_columns(addr=pl.col("src_addr"), peer=pl.col("dst_addr"), port=pl.col("dst_port"))
    )
    frame = _with_window_end(found, c.window).collect(engine="streaming")
    return _finish(
        frame,
        "beacon",
        lambda r: (
            f"{{who}} connected to {r['peer']}:{r['port']} {fmt_int(r['connections'])} times in "
            f"{fmt_duration(c.window)}, every {fmt_duration(r['interval_median'])} "
            f"(spread {r['interval_mad']:.1f} s), ~{fmt_bytes(r['bytes_median'])} each: beaconing, "
            f"score {r['score']:.2f}"
        ),
        lambda r: {
            k: r[k]
            for k in (
                "connections",
                "interval_median",
                "interval_mad",
                "interval_skew",
                "bytes_median",
                "bytes_mad",
                "bytes_skew",
                "score",
            )
        },
    )


def science_destinations(ctx: DetectContext, flows: pl.LazyFrame) -> pl.DataFrame:
    """The destinations of `flows` that a declared science peer covers: dst_addr, science (the peer's name),
    science_reason, science_ports (empty = any). Matched on the unique addresses only; the first entry that
    covers an address wins. Expired entries no longer cover anything."""
    from tracepipe.pipeline_config import active

    peers, _ = active(list(ctx.config.science_peers), ctx.until)
    addr_type = flows.collect_schema()["dst_addr"]  # (a host bucket's are Categorical, detect/buckets.py)
    schema = {
        "dst_addr": addr_type,
        "science": pl.String,
        "science_reason": pl.String,
        "science_ports": pl.List(pl.Int64),
    }
    if not peers:
        return pl.DataFrame(schema=schema)
    uniques = flows.select("dst_addr").unique().collect(engine="streaming").get_column("dst_addr")
    arr = uniques.to_arrow()
    taken = np.zeros(len(arr), dtype=bool)
    parts = []
    for peer in peers:
        mask = in_networks(arr, peer.prefixes) & ~taken
        taken |= mask
        if mask.any():
            parts.append(
                pl.DataFrame(
                    {
                        "dst_addr": uniques.filter(pl.Series(mask)),
                        "science": peer.name or ", ".join(peer.prefixes),
                        "science_reason": peer.reason,
                        "science_ports": [list(peer.ports)] * int(mask.sum()),
                    },
                    schema=schema,
                )
            )
    return pl.concat(parts) if parts else pl.DataFrame(schema=schema)


def _held_during(times: pl.Series) -> tuple[dt.datetime, dt.datetime]:
    """The span [first, last + 1 µs) of the times a lease lookup asks about: read_leases(during=) then opens only
    the lease files that can hold a lease valid at one of them (a deleted VM's included), not the history's.
    No time at all (no rows, or null times: nobody held an address then): an empty span at the epoch."""
    known = times.drop_nulls()
    if known.is_empty():
        epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        return epoch, epoch
    zone = getattr(known.dtype, "time_zone", None)  # a naive time is UTC, as lease_at takes it
    known = (
        known.dt.convert_time_zone("UTC") if zone else known.dt.replace_time_zone("UTC")
    ).dt.cast_time_unit("us")
    first, last = known.min(), known.max()
    assert isinstance(first, dt.datetime) and isinstance(last, dt.datetime)
    return first, last + dt.timedelta(microseconds=1)


def _leases_of(
    ctx: DetectContext, frame: pl.DataFrame, addr: str, at: str, columns: tuple[str, ...] = ("project",)
) -> pl.DataFrame:
    """`columns` of the VM lease that held `addr` at `at`, per row (correlate.lease_at: the one answer)."""
    from tracepipe.correlate.lease_at import lease_at, read_leases

    wanted = ["addr", "valid_from", "valid_to", *[c for c in columns if c != "valid_from"]]
    during = _held_during(frame.get_column(at))
    leases = read_leases(ctx.lake, frame.get_column(addr).unique().to_list(), wanted, during)
    found = pl.from_arrow(lease_at(leases, frame.get_column(addr), frame.get_column(at), list(columns)))
    assert isinstance(found, pl.DataFrame)
    return found


MIN_PROJECT_HOSTS = 3


def exfiltration_range(ctx: DetectContext) -> tuple[dt.datetime, dt.datetime]:
    """The flows exfiltration reads: its baseline before the sweep's windows, then those windows."""
    start, end = ctx.span(ctx.config.detectors.exfiltration.window)
    return start - dt.timedelta(seconds=float(ctx.config.window.baseline)), end


def exfiltration_volumes(ctx: DetectContext) -> pl.DataFrame:
    """exfiltration's per (host, window) sums over one host bucket's flows (a BucketContext's, whose hosts
    are the owned ones): the rows of the whole window's for these hosts, for exfiltration(ctx, every=...)."""
    c = ctx.config.detectors.exfiltration
    outbound = ctx.flows(c.window, *exfiltration_range(ctx)).filter(
        pl.col("src_owned") & ~pl.col("dst_local")
    )
    return _volumes(_science_tagged(ctx, outbound, outbound)).collect(engine="streaming")


def _is_science(port: pl.Expr) -> pl.Expr:
    """Whether a row tagged by science_destinations goes to its science peer on one of the peer's ports."""
    return (
        pl.col("science").is_not_null()
        & ((pl.col("science_ports").list.len() == 0) | pl.col("science_ports").list.contains(port))
    ).fill_null(False)


def _science_tagged(ctx: DetectContext, outbound: pl.LazyFrame, destinations: pl.LazyFrame) -> pl.LazyFrame:
    """The outbound flows with the science peer their destination is (science, science_reason, is_science),
    looked up among the destinations of `destinations` (the outbound flows' or a superset)."""
    science = science_destinations(ctx, destinations)
    is_science = _is_science(pl.col("dst_port"))
    if science.is_empty():  # nothing declared (or nothing of it seen): no join over every outbound flow
        return outbound.with_columns(
            science=pl.lit(None, pl.String), science_reason=pl.lit(None, pl.String), is_science=pl.lit(False)
        )
    return outbound.join(science.lazy(), on="dst_addr", how="left").with_columns(is_science=is_science)


def _volumes(tagged: pl.LazyFrame) -> pl.LazyFrame:
    # the sums as when/then (is_science is never null): the streaming engine reduces them as rows pass, a
    # filtered sum gathers each group's rows first (20-30% of this group-by's CPU, measured)
    # The science peer named is the lowest (name, reason), not the first row's, so that every engine and row
    # order names the same: one min over "name NUL reason" (a sort_by inside the group-by cost 3x this
    # group-by's time, measured on 10^7 rows), split after it.
    named = pl.concat_str([pl.col("science"), pl.lit("\x00"), pl.col("science_reason")])
    return (
        tagged.group_by("src_addr", "window_start")
        .agg(
            bytes_out=saturating_sum(pl.when(~pl.col("is_science")).then(pl.col("bytes"))),
            science_bytes=saturating_sum(pl.when(pl.col("is_science")).then(pl.col("bytes"))),
            _science=pl.when(pl.col("is_science")).then(named).min(),
            first_ts=pl.col("ts_start").min(),
            flows=pl.len(),
        )
        .with_columns(_parts=pl.col("_science").str.splitn("\x00", 2))
        .with_columns(
            science=pl.col("_parts").struct.field("field_0"),
            science_reason=pl.col("_parts").struct.field("field_1"),
        )
        .select(
            "src_addr",
            "window_start",
            "bytes_out",
            "science_bytes",
            "science",
            "science_reason",
            "first_ts",
            "flows",
        )
    )


def exfiltration(ctx: DetectContext, every: pl.DataFrame | None = None) -> pl.DataFrame:
    """Outbound volume to unknown outside addresses far above the VM's own history AND its peers' in that
    window. Volume to declared science peers (LHCONE/LHCOPN sites, a lab's storage) is science, not counted;
    a window that only crossed the line thanks to it is listed as suppressed with the peer's reason. Peers
    are the VM's project (all hosts when the project has none active); a VM with no history of its own is
    judged against its project's history, not flagged for being new. `every`: the per (host, window) sums,
    when already gathered bucket by bucket (exfiltration_volumes)."""
    c = ctx.config.detectors.exfiltration
    start, end = ctx.span(c.window)
    baseline_start = exfiltration_range(ctx)[0]
    outbound = ctx.flows(c.window, baseline_start, end).filter(pl.col("src_local") & ~pl.col("dst_local"))
    if every is None:
        # the science peers among every destination of the range (a superset of the outbound ones, which is
        # all the join matches): the plain scan of one column costs half of the outbound flows' with facts
        tagged = _science_tagged(ctx, outbound, ctx.scan(baseline_start, end))
        every = _volumes(tagged).collect(engine="streaming")
    current = every.filter(pl.col("window_start") >= start)
    if current.is_empty():
        return _empty()
    history = every.filter(pl.col("window_start") < start)
    current = pl.concat(
        [current, _leases_of(ctx, current, "src_addr", "first_ts", ("project", "valid_from"))],
        how="horizontal",
    )
    # The VM's own history: the address's past since the lease of the VM that holds it now began (an
    # address handed to a new VM does not hand it the old VM's habits).
    since_lease = current.group_by("src_addr").agg(lease_start=pl.col("valid_from").max())
    own = (
        history.join(since_lease, on="src_addr", how="inner")
        .filter(pl.col("lease_start").is_null() | (pl.col("window_start") >= pl.col("lease_start")))
        .group_by("src_addr")
        .agg(host_ref=pl.col("bytes_out").quantile(0.99), baseline_windows=pl.len())
    )
    project_history = pl.DataFrame(schema={"project": pl.String, "project_history_ref": pl.Float64})
    newcomers = current.filter(~pl.col("src_addr").is_in(own.get_column("src_addr").implode()))
    projects = newcomers.get_column("project").drop_nulls().unique()
    if len(projects):  # only a first-seen VM needs its project's history: look the past up then
        history = history.with_columns(_leases_of(ctx, history, "src_addr", "first_ts").get_column("project"))
        project_history = (
            history.filter(pl.col("project").is_in(projects.implode()))
            .group_by("project")
            .agg(project_history_ref=pl.col("bytes_out").quantile(0.99))
        )
    site = current.group_by("window_start").agg(site_ref=pl.col("bytes_out").median(), peer_hosts=pl.len())
    # The project's hosts in that window. A median is moved by at most one rank by the host itself, so with
    # MIN_PROJECT_HOSTS or more it stays the peers' level; smaller projects are judged by the site's median.
    project = (
        current.filter(pl.col("project").is_not_null())
        .group_by("project", "window_start")
        .agg(project_ref=pl.col("bytes_out").median(), project_hosts=pl.len())
        .filter(pl.col("project_hosts") >= MIN_PROJECT_HOSTS)
    )
    # Without history the host is compared with itself inside the sweep: its third-busiest window (0 if it
    # has fewer), so a burst over one or two windows stands out while a host that is always busy does not.
    # Only its windows under min_bytes set that level: else three windows of exfiltration made the third of
    # them the host's "typical" window and hid all (hostile review: 2 GB in each of 3 hours, 0 alerts).
    typical = current.group_by("src_addr").agg(
        sweep_ref=pl.col("bytes_out")
        .filter(pl.col("bytes_out") < c.min_bytes)
        .sort(descending=True)
        .implode()
        .list.get(2, null_on_oob=True)
    )
    joined = (
        current.join(own, on="src_addr", how="left")
        .join(site, on="window_start", how="left")
        .join(typical, on="src_addr", how="left")
        .join(project_history, on="project", how="left")
        .join(project, on=["project", "window_start"], how="left")
    )
    joined = joined.with_columns(
        first_seen=pl.col("baseline_windows").is_null(),
        baseline_windows=pl.col("baseline_windows").fill_null(0),
        host_ref=pl.max_horizontal(
            pl.col("host_ref").fill_null(0.0),
            # a VM new to the lake is judged by its typical window in this sweep and by what its project's VMs
            # have done, not by having no past; a VM with a past by its past only (the sweep's level, taken
            # for every host, hid exfiltration spread over 3 windows or more of one sweep: hostile review)
            pl.when(pl.col("baseline_windows").is_null())
            .then(pl.max_horizontal(pl.col("sweep_ref").cast(pl.Float64), pl.col("project_history_ref")))
            .otherwise(None)
            .fill_null(0.0),
        ),
        peer_ref=pl.max_horizontal(pl.col("site_ref").cast(pl.Float64), pl.col("project_ref").fill_null(0.0)),
    )

    def over(volume: str) -> pl.Expr:
        return (
            (pl.col(volume) >= c.min_bytes)
            & (pl.col(volume) >= c.host_factor * pl.col("host_ref"))
            & (pl.col(volume) >= c.peer_factor * pl.col("peer_ref"))
        )

    found = joined.filter(over("bytes_out"))
    declared = joined.with_columns(total=pl.col("bytes_out") + pl.col("science_bytes")).filter(
        ~over("bytes_out") & over("total") & (pl.col("science_bytes") > 0)
    )
    ctx.suppress(
        declared.with_columns(addr=pl.col("src_addr"), peer=pl.lit(None, pl.String), port=pl.lit(None)),
        "exfiltration",
        lambda r: (
            f"{fmt_bytes(r['science_bytes'])} went to declared science peer {r['science']} "
            f"({r['science_reason']}); {fmt_bytes(r['bytes_out'])} to other destinations"
        ),
    )
    if found.is_empty():
        return _empty()
    # the biggest receivers of each suspicious host-window, for the reason line
    keys = found.select("src_addr", "window_start")
    # only the found hosts' flows of the found windows: the lake's files are sorted by src_addr and ts_start,
    # so these bounds skip most row groups before the semi join
    theirs = outbound.filter(
        pl.col("src_addr").is_in(keys.get_column("src_addr").unique().implode())
        & (pl.col("ts_start") >= keys.get_column("window_start").min())
        & (pl.col("ts_start") < keys.get_column("window_start").max() + dt.timedelta(seconds=int(c.window)))
    )
    top = (
        _science_tagged(ctx, theirs, theirs)
        .filter(~pl.col("is_science"))
        .join(keys.lazy(), on=["src_addr", "window_start"], how="semi")
        .group_by("src_addr", "window_start", "dst_addr")
        .agg(to_peer=saturating_sum(pl.col("bytes")))
        .group_by("src_addr", "window_start")
        .agg(
            # the biggest peer, a tie to the lowest address: a value, whatever order the rows come in
            peer=pl.col("dst_addr").sort_by("to_peer", "dst_addr", descending=[True, False]).first(),
            to_peer=pl.col("to_peer").max(),
            peers=pl.len(),
        )
        .collect(engine="streaming")
    )
    found = found.join(top, on=["src_addr", "window_start"], how="left").with_columns(
        addr=pl.col("src_addr"),
        port=pl.lit(None, pl.Int32),
        score=_ratio_score(pl.col("bytes_out").cast(pl.Float64), c.min_bytes),
        window_end=pl.col("window_start") + pl.duration(seconds=int(c.window)),
    )

    def reason(r: dict) -> str:
        if r["baseline_windows"]:
            base = f"its own baseline {fmt_bytes(r['host_ref'])}"
        elif r["project_history_ref"]:
            base = f"first seen: its project's VMs up to {fmt_bytes(r['host_ref'])}"
        else:
            base = f"its typical window {fmt_bytes(r['host_ref'])} (no history before)"
        peers = (
            f"project {r['project']} peers' median {fmt_bytes(r['peer_ref'])}"
            if r["project_ref"] is not None and r["project_ref"] >= (r["site_ref"] or 0)
            else f"peers' median {fmt_bytes(r['peer_ref'])}"
        )
        science = (
            f"; plus {fmt_bytes(r['science_bytes'])} to science peer {r['science']} (not counted)"
            if r["science_bytes"]
            else ""
        )
        return (
            f"{{who}} sent {fmt_bytes(r['bytes_out'])} out of the cloud in {fmt_duration(c.window)} "
            f"({fmt_bytes(r['to_peer'])} to {r['peer']}); {base}, {peers}{science}"
        )

    keys_out = (
        "bytes_out",
        "host_ref",
        "peer_ref",
        "site_ref",
        "project_ref",
        "baseline_windows",
        "first_seen",
        "science_bytes",
        "peers",
    )
    return _finish(found, "exfiltration", reason, lambda r: {k: r[k] for k in keys_out})


MIN_PIECE_SECONDS = 60.0  # flows shorter than this cannot be part of a long connection (cheap pre-filter)


def long_connection(ctx: DetectContext) -> pl.DataFrame:
    """One 5-tuple seen for hours (exporters split it at their active timeout: the pieces are joined)."""
    c = ctx.config.detectors.long_connection
    flows = ctx.flows(c.window, response=True).filter(
        (pl.col("src_local") | pl.col("dst_local")) & (pl.col("duration") >= MIN_PIECE_SECONDS)
    )
    order = pl.col("ts_start")
    gap = (pl.col("ts_start").sort_by(order).shift(-1) - pl.col("ts_end").sort_by(order)).dt.total_seconds()
    found = (
        flows.group_by("src_addr", "dst_addr", "src_port", "dst_port", "proto", "window_start")
        .agg(
            first_ts=pl.col("ts_start").min(),
            last_end=pl.col("ts_end").max(),
            pieces=pl.len(),
            bytes=saturating_sum(pl.col("bytes")),
            max_gap=gap.max(),
            src_local=pl.col("src_local").first(),
            response=pl.col("response").first(),
        )
        .with_columns(span=(pl.col("last_end") - pl.col("first_ts")).dt.total_seconds())
        .filter((pl.col("span") >= c.min_duration) & (pl.col("max_gap").fill_null(0) <= c.max_gap))
        # NTP/DNS flow-cache entries are exempt while quiet; one that carries data (a tunnel) is not
        .filter(
            ~(
                (pl.col("dst_port").is_in(c.ignore_ports) | pl.col("src_port").is_in(c.ignore_ports))
                & (pl.col("bytes") <= c.ignore_max_bytes)
            )
        )
        .with_columns(
            addr=pl.when(pl.col("src_local")).then(pl.col("src_addr")).otherwise(pl.col("dst_addr")),
            peer=pl.when(pl.col("src_local")).then(pl.col("dst_addr")).otherwise(pl.col("src_addr")),
            # the server's port: the destination of the initiator direction
            port=pl.when(pl.col("response")).then(pl.col("src_port")).otherwise(pl.col("dst_port")),
            score=_ratio_score(pl.col("span"), c.min_duration),
        )
        # both directions of each connection, and a host's parallel connections to one peer (a transfer's
        # streams): one alert, counting the connections (by the client's end) and all their records
        .with_columns(
            client=pl.struct(
                port=pl.when(pl.col("response")).then(pl.col("dst_port")).otherwise(pl.col("src_port")),
                server=pl.col("port"),
            )
        )
        .group_by("addr", "peer", "window_start")
        .agg(
            pl.col("port").min(),
            pl.col("first_ts").min(),
            pl.col("span").max(),
            connections=pl.col("client").n_unique(),
            pieces=pl.col("pieces").sum(),
            bytes=saturating_sum(pl.col("bytes")),
            score=pl.col("score").max(),
        )
    )
    frame = _with_window_end(found, c.window).collect(engine="streaming")
    # a declared science peer (a transfer to CERN's storage, the HTCondor pool's central manager) holds
    # connections for hours by design: listed as suppressed, as exfiltration to it is (SOC review: 48 alerts a
    # day on grid traffic, scored as high as a C2)
    science = science_destinations(ctx, frame.lazy().select(dst_addr=pl.col("peer")))
    if not science.is_empty():
        tagged = frame.join(science.rename({"dst_addr": "peer"}), on="peer", how="left").with_columns(
            is_science=_is_science(pl.col("port").cast(pl.Int64))
        )
        ctx.suppress(
            tagged.filter(pl.col("is_science")),
            "long_connection",
            lambda r: (
                f"{_connections(r)} with declared science peer {r['science']} ({r['science_reason']}) for "
                f"{fmt_duration(r['span'])}"
            ),
        )
        frame = tagged.filter(~pl.col("is_science")).select(frame.columns)
    return _finish(
        frame,
        "long_connection",
        lambda r: (
            f"{{who}} held {_connections(r)} with {r['peer']}:{r['port']} for {fmt_duration(r['span'])} "
            f"({fmt_bytes(r['bytes'])} both ways, {r['pieces']} flow records)"
        ),
        lambda r: {k: r[k] for k in ("span", "connections", "pieces", "bytes")},
    )


def _connections(r: dict) -> str:
    return "one connection" if r["connections"] == 1 else f"{r['connections']} connections"


def mining(ctx: DetectContext) -> pl.DataFrame:
    """Sustained small-packet sessions to an outside host (Stratum: short JSON lines, long-lived), on any
    port; the known pool ports raise the score and shorten the time it takes to be sure."""
    c = ctx.config.detectors.mining
    flows = (
        ctx.flows(c.window, response=True)
        .filter(pl.col("src_owned") & ~pl.col("dst_local") & (pl.col("proto") == 6) & ~pl.col("response"))
        .with_columns(
            # Off the pool ports only ONE connection counts (its pieces share the source port): many short
            # connections to one place over hours are a beacon's shape, not a miner's session.
            session=pl.when(pl.col("dst_port").is_in(c.ports)).then(-1).otherwise(pl.col("src_port"))
        )
        # off the pool ports a session of an hour or more is exported in long pieces (active timeout):
        # the many short flows of ordinary traffic never make one (cheap pre-filter)
        .filter((pl.col("session") == -1) | (pl.col("duration") >= MIN_PIECE_SECONDS))
    )
    found = (
        flows.group_by("src_addr", "dst_addr", "dst_port", "session", "window_start")
        .agg(
            first_ts=pl.col("ts_start").min(),
            last_end=pl.col("ts_end").max(),
            packets=saturating_sum(pl.col("packets")),
            bytes=saturating_sum(pl.col("bytes")),
            flows=pl.len(),
            # how alike the flow records' packet sizes are: a miner repeats the same short lines all day
            packet_size_spread=_spread(pl.col("bytes") / pl.col("packets").clip(lower_bound=1)),
        )
        .with_columns(
            span=(pl.col("last_end") - pl.col("first_ts")).dt.total_seconds(),
            bytes_per_packet=pl.col("bytes") / pl.col("packets").clip(lower_bound=1),
        )
        .with_columns(
            known_port=pl.col("dst_port").is_in(c.ports),
            packets_per_minute=pl.col("packets") / (pl.col("span") / 60.0).clip(lower_bound=1.0),
        )
        .filter(
            (pl.col("span") >= c.min_duration)
            & (pl.col("bytes_per_packet") <= c.max_bytes_per_packet)
            # off the pool ports: longer, and steadily chatty (idle SSH / IMAP IDLE are small-packet too)
            & (
                pl.col("known_port")
                | (
                    (pl.col("span") >= c.min_duration_any_port)
                    & (pl.col("packets_per_minute") >= c.min_packets_per_minute)
                    & (pl.col("packet_size_spread") <= c.max_packet_size_spread)
                )
            )
        )
        .with_columns(
            addr=pl.col("src_addr"),
            peer=pl.col("dst_addr"),
            port=pl.col("dst_port"),
            score=_with_known_port(_ratio_score(pl.col("span"), c.min_duration), pl.col("dst_port"), c.ports),
        )
    )
    frame = _with_window_end(found, c.window).collect(engine="streaming")
    return _finish(
        frame,
        "mining",
        lambda r: (
            f"{{who}} kept a session to {r['peer']}:{r['port']}"
            f"{' (a mining-pool port)' if r['known_port'] else ''} for "
            f"{fmt_duration(r['span'])}, {fmt_int(r['packets'])} small packets "
            f"(avg {r['bytes_per_packet']:.0f} B, {r['packets_per_minute']:.1f}/min): Stratum-like"
        ),
        lambda r: {
            k: r[k]
            for k in (
                "span",
                "packets",
                "bytes",
                "bytes_per_packet",
                "packets_per_minute",
                "flows",
                "known_port",
            )
        },
    )


def intel_match(ctx: DetectContext) -> pl.DataFrame:
    """Flows between a local host and an address or CIDR of the `intel` dataset (v4 and v6)."""
    c = ctx.config.detectors.intel
    if ctx.intel is None or ctx.intel.num_rows == 0:
        return _empty()
    # Each flow seen from its local end(s): a listed address inside the cloud (a VM a CERT reported) is a
    # peer of the local hosts that talked to it.
    base = ctx.flows(c.window)
    flows = pl.concat(
        [
            base.filter(pl.col("src_owned")).with_columns(addr=pl.col("src_addr"), peer=pl.col("dst_addr")),
            base.filter(pl.col("dst_owned")).with_columns(addr=pl.col("dst_addr"), peer=pl.col("src_addr")),
        ]
    )
    peers = flows.select("peer").unique().collect(engine="streaming").get_column("peer").to_arrow()
    matches = match_addresses(peers, ctx.intel)
    if matches.is_empty():
        return _empty()
    # (the addresses' type: a host bucket's are Categorical, detect/buckets.py). A peer the site allowlisted
    # is grouped apart (its group is the alert the allowlist drops and lists): grouped with the others, an
    # allowlisted lowest address dropped the whole group, so one contact with an allowed mirror in a listed
    # range hid every other contact there (review of the session-26 change)
    allowed = _allowlisted_peers(matches.get_column("addr").to_arrow(), ctx.config, ctx.until)
    matches = matches.with_columns(
        pl.col("addr").cast(flows.collect_schema()["peer"]), _allowed=pl.Series(allowed, dtype=pl.Boolean)
    )
    # One alert per (local host, indicator, window): a host that swept a listed network (a /16 of a bulletproof
    # host) was one alert per address it touched, 65,536 per window, each with a reason written in Python.
    # The alert's peer is the lowest of them (the same whatever the engine or row order); the others counted.
    peer = pl.col("peer").cast(pl.String)
    found = (
        flows.join(matches.lazy().rename({"addr": "peer"}), on="peer", how="inner")
        .group_by("addr", "indicator", "_allowed", "window_start")
        .agg(
            flows=pl.len(),
            bytes=saturating_sum(pl.col("bytes")),
            first_ts=pl.col("ts_start").min(),
            peer=peer.min(),
            peers=peer.n_unique(),
            some_peers=peer.unique().sort().head(5),
            ports=pl.col("dst_port").unique().sort().head(5),
            description=pl.col("description").first(),
            tags=pl.col("tags").first(),
            event_id=pl.col("event_id").first(),
            outbound=pl.col("src_local").any(),
        )
        .with_columns(port=pl.lit(None, pl.Int32), score=pl.lit(0.9))
    )
    frame = _with_window_end(found, c.window).collect(engine="streaming")

    def reason(r: dict) -> str:
        what = f" ({r['description']})" if r["description"] else ""
        # (a STIX feed's indicators carry their STIX id, "indicator--<uuid>": never "MISP event")
        source = "STIX" if "--" in (r["event_id"] or "") else "MISP event"
        event = f", {source} {r['event_id']}" if r["event_id"] else ""
        more = f" and {fmt_int(r['peers'] - 1)} more addresses" if r["peers"] > 1 else ""
        return (
            f"{{who}} exchanged {fmt_int(r['flows'])} flows ({fmt_bytes(r['bytes'])}) with {r['peer']}{more}, "
            f"listed in threat intel as {r['indicator']}{what}{event}"
        )

    return _finish(
        frame,
        "intel",
        reason,
        lambda r: {
            k: r[k]
            for k in (
                "flows",
                "bytes",
                "peers",
                "some_peers",
                "ports",
                "indicator",
                "tags",
                "event_id",
                "outbound",
            )
        },
    )


def _allowlisted_peers(peers: pa.Array, config: PipelineConfig, now: dt.datetime) -> np.ndarray:
    """Which intel peers apply_allowlist would drop an intel alert for (as the alert's peer): the allowlist's
    addresses and CIDRs, and its entries in force at `now` for the intel detector (or all) without ports."""
    from tracepipe.pipeline_config import active

    allow = config.allowlist
    mask = np.zeros(len(peers), dtype=bool)
    nets = allow.addresses + allow.cidrs
    if nets:
        mask |= in_networks(peers, nets)
    for entry in active(list(allow.entries), now)[0]:
        if entry.ports or (entry.detectors and "intel" not in entry.detectors):
            continue
        mask |= in_networks(peers, entry.cidrs)
    return mask


DETECTORS: dict[str, Callable[[DetectContext], pl.DataFrame]] = {
    "horizontal_scan": horizontal_scan,
    "vertical_scan": vertical_scan,
    "brute_force": brute_force,
    "beacon": beacon,
    "exfiltration": exfiltration,
    "long_connection": long_connection,
    "mining": mining,
    "intel": intel_match,
}


def run_detectors(
    ctx: DetectContext, names: list[str] | None = None, on_stage: Callable[[str, float], None] | None = None
) -> pl.DataFrame:
    """Run the enabled detectors (or `names`), return all candidates."""
    import time

    frames = []
    for name, detector in DETECTORS.items():
        if names is not None and name not in names:
            continue
        if not getattr(ctx.config.detectors, name).enabled:
            continue
        t0 = time.perf_counter()
        frames.append(detector(ctx))
        elapsed = time.perf_counter() - t0
        ctx.timings[name] = elapsed
        if on_stage:
            on_stage(name, elapsed)
    return pl.concat(frames) if frames else _empty()


# ---- cross-host rules, allowlists, attribution, evidence, ids ----------------------------------------------
# Beacons "keep the same rhythm" when their median intervals are within SHARED_RHYTHM_TOLERANCE of each other
# and their median sizes within SHARED_SIZE_TOLERANCE (relative to the larger): NTP clients of one pool poll
# alike, five implants on five timers do not.
SHARED_RHYTHM_TOLERANCE = 0.1
SHARED_SIZE_TOLERANCE = 0.25
SHARED_PAIRS_GROUP = 512  # beacons of one (peer, port, window) compared pair by pair; more: by bins


def shared_services(candidates: pl.DataFrame, ctx: DetectContext) -> pl.DataFrame:
    """Beacons to a destination that `beacon.shared_service_hosts` or more local hosts keep the same rhythm with
    (alike median interval and size: SHARED_RHYTHM_TOLERANCE, SHARED_SIZE_TOLERANCE) are a shared service (NTP
    pool, update mirror), whatever its port: dropped here and recorded in ctx.suppressed. Hosts merely reaching
    one destination periodically are not alike (five VMs beaconing to one C2 every 5, 7, 10, 15 and 20 min
    were all suppressed: hostile review), and a destination threat intel lists is never a shared service. A
    cross-host rule, so it runs over every engine's candidates together (a Spark host bucket sees one host)."""
    limit = ctx.config.detectors.beacon.shared_service_hosts
    if not limit or candidates.is_empty():
        return candidates
    group = ["peer", "port", "window_start"]
    marked = candidates.with_row_index("_row")
    shape = marked.filter(pl.col("detector") == "beacon").select(
        "_row",
        "addr",
        *group,
        _interval=pl.col("features").str.json_path_match("$.interval_median").cast(pl.Float64),
        _size=pl.col("features").str.json_path_match("$.bytes_median").cast(pl.Float64),
    )
    if ctx.intel is not None and ctx.intel.num_rows and not shape.is_empty():
        peers = shape.get_column("peer").drop_nulls().unique().to_arrow()
        listed = match_addresses(peers, ctx.intel).get_column("addr")
        shape = shape.filter(~pl.col("peer").is_in(listed.implode()).fill_null(False))

    def alike(column: str, tolerance: float) -> pl.Expr:
        mine, theirs = pl.col(column), pl.col(f"{column}_other")
        return (mine - theirs).abs() <= tolerance * pl.max_horizontal(mine, theirs)

    # each beacon against the others of its group, for groups of up to SHARED_PAIRS_GROUP; a bigger group (a
    # site's thousands of VMs on one mirror's cron rhythm) would make pairs by the million, so there hosts are
    # alike when their interval and size fall in the same bins of the tolerances' widths (log scale)
    sizes = shape.group_by(group, maintain_order=True).agg(_n=pl.len())
    shape = shape.join(sizes, on=group, how="left", nulls_equal=True)
    small, large = (
        shape.filter(pl.col("_n") <= SHARED_PAIRS_GROUP),
        shape.filter(pl.col("_n") > SHARED_PAIRS_GROUP),
    )
    paired = (
        small.join(small, on=group, how="inner", suffix="_other", nulls_equal=True)
        .filter(alike("_interval", SHARED_RHYTHM_TOLERANCE) & alike("_size", SHARED_SIZE_TOLERANCE))
        .group_by("_row")
        .agg(_fleet=pl.col("addr_other").n_unique())
    )
    bins = [
        (pl.col(column).clip(lower_bound=1e-9).log() / math.log1p(tolerance)).floor().alias(f"{column}_bin")
        for column, tolerance in (("_interval", SHARED_RHYTHM_TOLERANCE), ("_size", SHARED_SIZE_TOLERANCE))
    ]
    binned = large.with_columns(bins).select(
        "_row", _fleet=pl.col("addr").n_unique().over([*group, "_interval_bin", "_size_bin"])
    )
    fleets = pl.concat([paired, binned.cast(paired.schema)])
    marked = (
        marked.join(fleets, on="_row", how="left").with_columns(pl.col("_fleet").fill_null(0)).sort("_row")
    )
    ctx.suppress(
        marked.filter(pl.col("_fleet") >= limit),
        "beacon",
        lambda r: (
            f"shared periodic service: {r['_fleet']} local hosts keep the same rhythm with "
            f"{r['peer']}:{r['port']} (beacon.shared_service_hosts = {limit})"
        ),
    )
    return marked.filter(pl.col("_fleet") < limit).drop("_fleet", "_row")


def apply_allowlist(
    candidates: pl.DataFrame,
    config: PipelineConfig,
    suppressed: list[dict] | None = None,
    now: dt.datetime | None = None,
) -> tuple[pl.DataFrame, int]:
    """Drop candidates the site allowed (addresses, CIDRs, ports, known scanners, and [[allowlist.entries]]
    still in force at `now`). Each dropped candidate goes into `suppressed` with the rule that dropped it;
    an expired entry drops nothing and is listed once as expired. Projects: after attribution."""
    from tracepipe.pipeline_config import active

    allow = config.allowlist
    live, expired = active(list(allow.entries), now or dt.datetime.now(dt.UTC))
    if suppressed is not None:
        for entry in expired:
            suppressed.append(
                {
                    "detector": None,
                    "addr": None,
                    "peer": None,
                    "port": None,
                    "window_start": None,
                    "why": f"allowlist entry expired {entry.expires}, no longer applied: {entry.reason}",
                }
            )
    if candidates.is_empty():
        return candidates, 0
    why = np.full(candidates.height, None, dtype=object)

    def drop(mask: np.ndarray, reason: str) -> None:
        why[mask & (why == None)] = reason  # noqa: E711 - numpy elementwise test of an object array

    addr = candidates.get_column("addr").fill_null("").to_arrow()
    peer = candidates.get_column("peer").fill_null("").to_arrow()
    port = candidates.get_column("port")
    detector = candidates.get_column("detector")
    nets = allow.addresses + allow.cidrs
    if nets:
        drop(in_networks(addr, nets) | in_networks(peer, nets), "allowlist.addresses/cidrs")
    if allow.ports:
        drop(port.is_in(allow.ports).fill_null(False).to_numpy(), "allowlist.ports")
    if allow.known_scanners:
        scanner = in_networks(addr, allow.known_scanners)
        drop(scanner & detector.is_in(list(SCAN_DETECTORS)).to_numpy(), "allowlist.known_scanners")
    for entry in live:
        mask = in_networks(addr, entry.cidrs) | in_networks(peer, entry.cidrs)
        if entry.detectors:
            mask &= detector.is_in(entry.detectors).to_numpy()
        if entry.ports:
            mask &= port.is_in(entry.ports).fill_null(False).to_numpy()
        until = f" (until {entry.expires})" if entry.expires else ""
        drop(mask, f"allowlisted: {entry.reason}{until}")
    dropped = why != None  # noqa: E711
    if suppressed is not None and dropped.any():
        rows = candidates.filter(pl.Series(dropped)).to_dicts()
        for row, reason in zip(rows, why[dropped], strict=True):
            suppressed.append(
                {k: row.get(k) for k in ("detector", "addr", "peer", "port", "window_start")}
                | {"why": reason}
            )
    return candidates.filter(pl.Series(~dropped)), int(dropped.sum())


LEASE_COLUMNS = ("vm_id", "vm_name", "project", "user", "hypervisor", "vm_status", "quarantine_until")


def attribute(candidates: pl.DataFrame, lake: Lake) -> pl.DataFrame:
    """Give each candidate the VM whose lease on `addr` was valid at its first flow (deleted VMs included),
    through correlate.lease_at: the same answer and rules as the flows' src_vm/dst_vm, read from only the
    leases of the candidates' addresses. (Not the src_vm written into the flow files: a candidate is a
    (host, window), its host may be either end of its flows, and files landed since may not be attributed.)"""
    from tracepipe.correlate.lease_at import lease_at, read_leases

    addrs = candidates.get_column("addr").drop_nulls().unique().to_list()
    during = _held_during(candidates.get_column("first_ts"))
    leases = read_leases(lake, addrs, ["addr", "valid_from", "valid_to", *LEASE_COLUMNS], during)
    found = pl.from_arrow(
        lease_at(leases, candidates.get_column("addr"), candidates.get_column("first_ts"), LEASE_COLUMNS)
    )
    assert isinstance(found, pl.DataFrame)
    found = found.with_columns(pl.col("quarantine_until").cast(pl.Datetime("us", "UTC")))
    return pl.concat([candidates, found], how="horizontal")


def describe_host(row: dict) -> str:
    """'10.10.3.7 (vm web-03, project atlas-sim, user jdoe)', saying when the VM is gone."""
    addr = row["addr"]
    if not row.get("vm_id"):
        return f"{addr} (no VM lease known for it then)"
    parts = [f"vm {row.get('vm_name') or row['vm_id']}"]
    status = row.get("vm_status")
    if status in ("deleted", "soft_deleted", "purged"):
        gone = "deleted since"
        if row.get("quarantine_until"):
            gone += f", image in quarantine until {row['quarantine_until']:%Y-%m-%d %H:%M} UTC"
        parts.append(gone)
    if row.get("project"):
        parts.append(f"project {row['project']}")
    if row.get("user"):
        parts.append(f"user {row['user']}")
    return f"{addr} ({', '.join(parts)})"


def _identity_peer(row: dict) -> str | None:
    """The peer an alert's id is made of: its peer, but for an intel alert (one per host, indicator and window,
    named after the lowest address of the group) the indicator, so that a later flow to a lower address of the
    same listed network is the same alert, not a new one (review of the session-26 change)."""
    if row["detector"] == "intel":
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            indicator = json.loads(row["features"]).get("indicator")
            if isinstance(indicator, str) and indicator:
                return indicator  # (an address indicator is its own peer: the id it always had)
    return row["peer"]


def alert_id(
    detector: str, addr: str | None, peer: str | None, port: int | None, window_start: dt.datetime
) -> str:
    key = (
        f"{detector}|{addr or ''}|{peer or ''}|{'' if port is None else port}|{utc(window_start).isoformat()}"
    )
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def evidence_rows(lake: Lake, alerts: pl.DataFrame, limit: int, top: int = 5) -> dict[int, dict]:
    """Evidence per alert (row index -> {"flows", "top_peers", "top_ports", "matched_flows"}): up to `limit`
    flow rows between addr and peer (or on the alert's port) in its window, biggest first, and the peers and
    ports of ALL those flows ranked by flow count. One scan for all alerts."""
    if alerts.is_empty() or limit <= 0:
        return {}
    start, end = alerts.get_column("window_start").min(), alerts.get_column("window_end").max()
    addrs = alerts.get_column("addr").unique().to_list()
    flows = (
        scan_flows(lake, start, end)
        .filter(pl.col("src_addr").is_in(addrs) | pl.col("dst_addr").is_in(addrs))
        .select(list(EVIDENCE_COLUMNS))
    )
    keys = alerts.with_row_index("_alert").select(
        "_alert", "addr", "peer", "port", "window_start", "window_end"
    )
    sides = []
    for mine, other in (("src_addr", "dst_addr"), ("dst_addr", "src_addr")):
        sides.append(
            flows.join(keys.lazy(), left_on=mine, right_on="addr", how="inner").with_columns(
                _other=pl.col(other)
            )
        )
    matched = (
        pl.concat(sides)
        .filter((pl.col("ts_start") >= pl.col("window_start")) & (pl.col("ts_start") < pl.col("window_end")))
        .filter(pl.col("peer").is_null() | (pl.col("_other") == pl.col("peer")))
        .filter(
            pl.col("port").is_null()
            | (pl.col("dst_port") == pl.col("port"))
            | (pl.col("src_port") == pl.col("port"))
        )
        # read from the lake once for the four results below (four scans of the window's flows were most
        # of finalize); the sort of the evidence flows below holds these rows anyway
        .collect(engine="streaming")
        .lazy()
    )
    # total orders (ties broken by time, addresses, ports): the same candidates give the same evidence on
    # every engine and in every row order
    rows = (
        matched.sort(
            ["bytes", "ts_start", "src_addr", "dst_addr", "src_port", "dst_port"],
            descending=[True, False, False, False, False, False],
            nulls_last=True,
        )
        .group_by("_alert", maintain_order=True)
        .head(limit)
        .collect(engine="streaming")
    )

    def ranked(column: str, name: str) -> pl.DataFrame:
        return (
            matched.group_by("_alert", pl.col(column).alias(name))
            .agg(flows=pl.len(), bytes=saturating_sum(pl.col("bytes")))
            .sort(["_alert", "flows", "bytes", name], descending=[False, True, True, False], nulls_last=True)
            .group_by("_alert", maintain_order=True)
            .head(top)
            .collect(engine="streaming")
        )

    peers, ports = ranked("_other", "peer"), ranked("dst_port", "port")
    totals = matched.group_by("_alert").agg(matched_flows=pl.len()).collect(engine="streaming")
    out: dict[int, dict] = {
        int(a): {"flows": [], "top_peers": [], "top_ports": [], "matched_flows": int(n)}
        for a, n in totals.iter_rows()
    }
    # stable: flows of one start time (both directions of a connection) keep the total order above
    for alert, group in rows.sort("_alert", "ts_start", maintain_order=True).group_by(
        "_alert", maintain_order=True
    ):
        out[int(alert[0])]["flows"] = group.select(list(EVIDENCE_COLUMNS)).to_dicts()
    for key, frame in (("top_peers", peers), ("top_ports", ports)):
        for alert, group in frame.group_by("_alert", maintain_order=True):
            out[int(alert[0])][key] = group.drop("_alert").to_dicts()
    return out


def _bounded_evidence(ctx: DetectContext, alerts: pl.DataFrame) -> tuple[dict[int, dict], dict | None]:
    """evidence_rows for at most output.max_evidence_alerts alerts, the highest scores first (ties in a total
    order, so every engine picks the same); the evidence of the others says why it is missing (None: nothing
    was left out)."""
    cap = max(ctx.config.output.max_evidence_alerts, 0)
    if alerts.height <= cap:
        return evidence_rows(ctx.lake, alerts, ctx.config.output.max_evidence_rows), None
    chosen = (
        alerts.with_row_index("_index")
        .with_columns(_score=pl.col("score").fill_nan(None))
        .sort(
            ["_score", "detector", "addr", "peer", "port", "window_start"],
            descending=[True, False, False, False, False, False],
            nulls_last=True,
        )
        .head(cap)
        .get_column("_index")
        .sort()
    )
    picked = evidence_rows(ctx.lake, alerts[chosen], ctx.config.output.max_evidence_rows)
    evidence = {
        int(i): {"flows": [], "top_peers": [], "top_ports": []} for i in chosen
    }  # chosen, none matched
    evidence.update({int(chosen[i]): found for i, found in picked.items()})
    missing = {
        "flows": [],
        "top_peers": [],
        "top_ports": [],
        "not_collected": (
            f"alert flood: {alerts.height} alerts in this run; evidence is kept for the {cap} highest scores "
            "(output.max_evidence_alerts)"
        ),
    }
    return evidence, missing


def finalize(
    candidates: pl.DataFrame, ctx: DetectContext, pipeline: str, created_at: dt.datetime | None = None
) -> tuple[pa.Table, dict[str, int]]:
    """Candidates -> schema.ALERTS rows: allowlists, VM attribution, reason, evidence, deterministic ids."""
    created_at = created_at or dt.datetime.now(dt.UTC)
    suppressed = ctx.suppressed
    candidates = shared_services(candidates, ctx)
    kept, allowed = apply_allowlist(candidates, ctx.config, suppressed, ctx.until)
    if kept.is_empty():
        return ALERTS.empty_table(), {"allowlisted": allowed, "suppressed": suppressed}
    attributed = attribute(kept, ctx.lake)
    if ctx.config.allowlist.projects:
        by_project = attributed.get_column("project").is_in(ctx.config.allowlist.projects).fill_null(False)
        for row in attributed.filter(by_project).to_dicts():
            suppressed.append(
                {k: row.get(k) for k in ("detector", "addr", "peer", "port", "window_start")}
                | {"why": f"allowlist.projects: project {row['project']}"}
            )
        attributed = attributed.filter(~by_project)
        allowed += int(by_project.sum())
    evidence, flood = _bounded_evidence(ctx, attributed)
    rows = []
    for index, row in enumerate(attributed.to_dicts()):
        rows.append(
            {
                "alert_id": alert_id(
                    row["detector"], row["addr"], _identity_peer(row), row["port"], row["window_start"]
                ),
                "detector": row["detector"],
                "window_start": row["window_start"],
                "window_end": row["window_end"],
                "addr": row["addr"],
                "peer": row["peer"],
                "score": None if row["score"] is None or math.isnan(row["score"]) else round(row["score"], 4),
                "reason": row["reason"].replace("{who}", describe_host(row)),
                **{c: row.get(c) for c in LEASE_COLUMNS},
                "features": row["features"],
                "evidence": json.dumps(
                    {
                        "port": row["port"],
                        **evidence.get(index, flood or {"flows": [], "top_peers": [], "top_ports": []}),
                    },
                    default=str,
                ),
                "pipeline": pipeline,
                "created_at": created_at,
            }
        )
    table = pa.Table.from_pylist(rows, schema=ALERTS)
    # one alert per id (e.g. both directions of one connection)
    _, first = np.unique(np.asarray(table.column("alert_id").to_pylist(), dtype=object), return_index=True)
    table = table.take(pa.array(np.sort(first)))
    return table, {"allowlisted": allowed, "suppressed": suppressed}
