"""Per (host, window) behaviour features over the lake's flows, with polars LAZY (streaming, out of core).

In: the `flows` dataset (hive-partitioned Parquet; the date partition and `ts_start` filters are pushed down to
the scan) and the cloud's address space (`local_networks`). A *host* is a local address; a flow whose source is
local is outbound for it, whose destination is local inbound. Out: one row per (host, window) with the columns
of FEATURES, plus the shared flow expressions (failed TCP attempt, SYN-only; server response: with_response)
the detectors use.
Addresses are classified on their unique values only (numpy for IPv4, stdlib ipaddress for IPv6).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from tracepipe.flowstate import failed_attempt
from tracepipe.lake import Lake
from tracepipe.limits import SUM_CAP
from tracepipe.schema import FLOWS
from tracepipe.units import parse_network

if TYPE_CHECKING:
    from tracepipe.detect.buckets import Spill, Timer

# TCP flag bits (RFC 793), as the cumulative OR NetFlow exports in tcp_flags.
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
# ICMP "destination unreachable": type 3 (v4), type 1 (v6); dst_port carries type*256+code.
ICMP_UNREACH = ((1, 3), (58, 1))

FEATURES = (
    "flows_out",
    "packets_out",
    "bytes_out",
    "bytes_out_ext",
    "bytes_in",
    "flows_in",
    "distinct_dst",
    "distinct_dst_ports",
    "distinct_src_in",
    "failed_share",
    "syn_only",
    "icmp_unreach",
    "night_share",
    "new_dst_share",
    "mean_duration",
    "long_flows",
    "periodicity",
)
# Counts and volumes are heavy-tailed: the model sees log1p of these.
LOG_FEATURES = frozenset(FEATURES) - {"failed_share", "night_share", "new_dst_share", "periodicity"}
LONG_FLOW_SECONDS = 600.0
FEATURE_PERIOD_S = 86400.0  # the periodicity feature is judged per day of the host (its window, below)
FEATURE_PERIOD_MIN_CONNECTIONS = 10  # a pair's connections in a day for its periodicity to count
# DNS and NTP are periodic by nature: left out of the periodicity feature
FEATURE_PERIOD_IGNORED_PORTS = (53, 123)


# ---- time --------------------------------------------------------------------------------------------------
# byte and packet sums saturate instead of wrapping (limits.SUM_CAP): summed exactly in Int128 (whatever the
# order rows come in: the streaming engine's, a host bucket's), then capped


def saturating_sum(expr: pl.Expr) -> pl.Expr:
    """expr.sum() as Int64 that never wraps: at most SUM_CAP."""
    return expr.cast(pl.Int128).sum().clip(upper_bound=SUM_CAP).cast(pl.Int64)


def utc(ts: dt.datetime) -> dt.datetime:
    return ts.replace(tzinfo=dt.UTC) if ts.tzinfo is None else ts.astimezone(dt.UTC)


def floor_time(ts: dt.datetime, seconds: float) -> dt.datetime:
    """Epoch-aligned floor: windows of 1h start on the hour, of 1d at 00:00 UTC."""
    step = int(seconds)
    epoch = int(utc(ts).timestamp())
    return dt.datetime.fromtimestamp(epoch - epoch % step, dt.UTC)


def ceil_time(ts: dt.datetime, seconds: float) -> dt.datetime:
    floor = floor_time(ts, seconds)
    return floor if floor == utc(ts) else floor + dt.timedelta(seconds=int(seconds))


def bucket_expr(column: str, seconds: float) -> pl.Expr:
    """Epoch-aligned window start of a timestamp column (same alignment as floor_time)."""
    step = int(seconds) * 1_000_000
    return ((pl.col(column).dt.epoch("us") // step) * step).cast(pl.Datetime("us", "UTC"))


# ---- addresses ---------------------------------------------------------------------------------------------
def ipv4_to_int(addrs: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Dotted-quad text -> (uint32 values, valid mask), vectorised. Non-v4 text is invalid (value 0)."""
    arr = pa.array(addrs, pa.string()) if not isinstance(addrs, pa.Array) else addrs.cast(pa.string())
    parts = pc.split_pattern(arr, ".")
    lengths = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    valid = (lengths == 4) & ~pc.is_null(arr).to_numpy(zero_copy_only=False)
    values = np.zeros(len(arr), dtype=np.uint64)
    if valid.any():
        flat = pc.list_flatten(parts.filter(pa.array(valid)))
        octets = pc.cast(flat, pa.int64(), safe=False) if _all_digits(flat) else None
        if octets is None:  # something like "1.2.3.x": fall back to the slow path for this batch
            return _ipv4_to_int_slow(arr)
        octets_np = octets.to_numpy().reshape(-1, 4).astype(np.uint64)
        ok = (octets_np <= 255).all(axis=1)
        packed = (octets_np[:, 0] << 24) | (octets_np[:, 1] << 16) | (octets_np[:, 2] << 8) | octets_np[:, 3]
        idx = np.flatnonzero(valid)
        values[idx] = np.where(ok, packed, 0)
        valid[idx] = ok
    return values.astype(np.uint32), valid


def _all_digits(flat: pa.Array) -> bool:
    return bool(pc.all(pc.match_substring_regex(flat, r"^[0-9]{1,3}$")).as_py() or len(flat) == 0)


def _ipv4_to_int_slow(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    values = np.zeros(len(arr), dtype=np.uint32)
    valid = np.zeros(len(arr), dtype=bool)
    for i, text in enumerate(arr.to_pylist()):
        try:
            values[i] = int(ipaddress.IPv4Address(text))
            valid[i] = True
        except (ValueError, TypeError):
            pass
    return values, valid


def networks_of(cidrs: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [parse_network(c) for c in cidrs]


def in_networks(addrs: list[str] | pa.Array, cidrs: Iterable[str]) -> np.ndarray:
    """Boolean mask: which addresses (canonical text, unique values) fall in any of the CIDRs, v4 and v6."""
    arr = pa.array(addrs, pa.string()) if isinstance(addrs, list) else addrs
    nets = networks_of(cidrs)
    mask = np.zeros(len(arr), dtype=bool)
    if not len(arr) or not nets:
        return mask
    v4, valid4 = ipv4_to_int(arr)
    for net in nets:
        if net.version == 4:
            lo, hi = int(net.network_address), int(net.broadcast_address)
            mask |= valid4 & (v4 >= lo) & (v4 <= hi)
    nets6 = [n for n in nets if n.version == 6]
    if nets6:
        for i in np.flatnonzero(~valid4):
            text = arr[int(i)].as_py()
            try:
                address = ipaddress.ip_address(text)
            except (ValueError, TypeError):
                continue
            mask[i] = any(address in n for n in nets6 if address.version == 6)
    return mask


# ---- the flows of a window ---------------------------------------------------------------------------------
def window_days(since: dt.datetime, until: dt.datetime) -> list[str]:
    """The UTC days (partition names) that [since, until) touches."""
    first, last = utc(since).date(), (utc(until) - dt.timedelta(microseconds=1)).date()
    return [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def scan_flows(lake: Lake, since: dt.datetime, until: dt.datetime) -> pl.LazyFrame:
    """Flows with since <= ts_start < until, lazily; only the files the log lists for those days are read."""
    since, until = utc(since), utc(until)
    paths = lake.files("flows", window_days(since, until)) if until > since else []
    if not paths:
        return pl.LazyFrame(pl.from_arrow(FLOWS.empty_table()))
    # glob=False: the names are files from the log, and a `*`, `?` or `[` in the lake's path is no pattern
    # schema + missing_columns: files written before a column was added to FLOWS read it as null
    return pl.scan_parquet(
        [str(p) for p in paths],
        hive_partitioning=False,
        glob=False,
        schema=pl.Schema(pl.from_arrow(FLOWS.empty_table()).schema),
        missing_columns="insert",
    ).filter((pl.col("ts_start") >= since) & (pl.col("ts_start") < until))


def with_flow_facts(
    flows: pl.LazyFrame,
    local_addrs: list[str],
    night: tuple[int, int] = (22, 6),
    owned: pl.Series | None = None,
) -> pl.LazyFrame:
    """Adds the per-flow facts every detector shares, defined once here. `src_owned`/`dst_owned`: that end is
    a host whose rows the caller keeps, the filter of every per-host aggregation keyed on that end: a local
    end, and when `owned` is given (a host bucket's hosts, detect/buckets.py) one of those. A bucket also
    holds the flows of its hosts' peers in other buckets, whose aggregations it would compute and drop."""
    flags = pl.col("tcp_flags").fill_null(0).cast(pl.Int32)
    is_tcp = pl.col("proto") == 6
    hour = pl.col("ts_start").dt.epoch("s") // 3600 % 24  # UTC (as ts_start is): 3x cheaper than dt.hour()
    start, end = night
    is_night = (hour >= start) | (hour < end) if start > end else (hour >= start) & (hour < end)
    unreach = pl.lit(False)
    for proto, icmp_type in ICMP_UNREACH:
        unreach = unreach | ((pl.col("proto") == proto) & (pl.col("dst_port") // 256 == icmp_type))
    return with_local_facts(
        flows.with_columns(
            duration=(pl.col("ts_end") - pl.col("ts_start")).dt.total_milliseconds() / 1000.0,
            # An attempt that never completed, defined once for NetFlow, Zeek and argus rows (tracepipe.flowstate)
            failed=failed_attempt(),
            syn_only=is_tcp & ((flags & 0x3F) == SYN),
            icmp_unreach=unreach,
            night=is_night,
        ),
        local_addrs,
        owned,
    )


# one direction of a conversation (NetFlow is one-way): its reverse has these columns swapped
FIVE_TUPLE = ("src_addr", "dst_addr", "src_port", "dst_port", "proto")


# who answered whom is judged per UTC hour (with_response): every range a detector, host bucket or Spark
# partition reads is widened to whole hours for it, so that every engine and run mode sees the same rows
RESPONSE_PERIOD_S = 3600


def with_response(flows: pl.LazyFrame, period_s: float = RESPONSE_PERIOD_S) -> pl.LazyFrame:
    """`flows` with `response`: the TCP or UDP record is the answering side of a conversation, judged within
    each epoch-aligned period of `period_s` (an hour; callers give whole periods: DetectContext.flows, the
    spill and Spark ranges are widened to them). Evidence first: the direction of the conversation's earliest
    record in the period opened it, the other answers, unless that earliest record is a TCP piece without SYN
    (a connection opened before, cut by the exporter's active timeout): then the ports decide, as they do
    when both directions start at once (a well-known or registered source port, below the ephemeral range
    32768+, towards a higher port answers). A TCP record with SYN and no ACK never answers; a direction whose
    reverse was never seen answers nothing. Ports alone made any flow from source port 53, 80 or 443 a
    "response" that the scan, brute-force, beacon and mining detectors never looked at (hostile review: 1,500
    SYN probes from port 53, 0 alerts). A flow's two directions are one conversation key (a hash of both
    (address, port) ends in a fixed order, protocol and period), and one window aggregate over it finds the
    earliest record: not a grouping, a self-join and a join back per detector window (the sweep at 10^7 flows
    went from 14 to 121 CPU seconds with those)."""
    schema = flows.collect_schema()
    if "response" in schema:
        return flows
    ends = conversation_ends(schema)
    flows = flows.with_columns(_src_end=ends[0], _dst_end=ends[1])
    forward = pl.col("_src_end") < pl.col("_dst_end")
    conversation = pl.struct(
        lo=pl.min_horizontal("_src_end", "_dst_end"),
        hi=pl.max_horizontal("_src_end", "_dst_end"),
        proto=pl.col("proto"),
        period=bucket_expr("ts_start", period_s),
    ).hash(seed=19)
    flags = pl.col("tcp_flags").fill_null(0).cast(pl.Int32) if "tcp_flags" in schema else pl.lit(0, pl.Int32)
    tcp = pl.col("proto") == 6
    opener = tcp & ((flags & SYN) != 0) & ((flags & ACK) == 0)
    continued = (tcp & (flags != 0) & ((flags & SYN) == 0)).fill_null(False)
    by_ports = (
        ((pl.col("src_port") < 1024) & (pl.col("dst_port") >= 1024))
        | ((pl.col("src_port") < 32768) & (pl.col("dst_port") >= 32768))
    ).fill_null(False)  # a null port left the row out of the aggregate (never an answer)
    # One window aggregate: the conversation's earliest record, its start packed above whether the ports call
    # it an answer (at a tie the side the ports call the opener comes first), whether it continues a connection
    # opened before, and its direction
    flows = flows.with_columns(
        _conversation=conversation,
        _packed=pl.col("ts_start").dt.epoch("us") * 8
        + by_ports.cast(pl.Int64) * 4
        + continued.cast(pl.Int64) * 2
        + forward.cast(pl.Int64),
    )
    # The record answers when the earliest one's ports call it an answer (bit 1 of `earliest`) and its own ports
    # do, or else when it runs the other way than the earliest (bit 0). Written as one lookup of a code that
    # uses the window aggregate once: referenced twice (when/then), polars computed it twice, ~45% of this
    # function's CPU; as a column of its own before, a host bucket's sweep peaked ~350 MB higher.
    earliest = pl.col("_packed").min().over("_conversation")
    code = (earliest % 4) * 4 + by_ports.cast(pl.Int64) * 2 + pl.col("_packed") % 2
    evidence = code.is_in([1, 3, 4, 6, 10, 11, 14, 15])  # (earliest's bits, own ports, own direction)
    answers = pl.col("proto").is_in([6, 17]) & ~opener & evidence
    return flows.with_columns(response=answers.fill_null(False)).drop(
        "_src_end", "_dst_end", "_conversation", "_packed"
    )


def conversation_ends(schema: pl.Schema) -> list[pl.Expr]:
    """A flow's two ends (address and port) as one integer each, for with_response's conversations: a host
    bucket's addresses are Categorical (one dictionary for both columns), their codes exact; text (Spark
    partitions, the lake) is hashed. Hashing the text of 10^7 rows cost ~8 s."""
    ends = []
    for side in ("src", "dst"):
        addr, port = pl.col(f"{side}_addr"), pl.col(f"{side}_port").fill_null(0).cast(pl.UInt64)
        if schema[f"{side}_addr"] == pl.Categorical:
            ends.append(addr.to_physical().cast(pl.UInt64) * 65536 + port)
        else:
            ends.append(addr.hash(seed=18) ^ (port * 0x9E3779B97F4A7C15))
    return ends


def conversation_part(schema: pl.Schema, parts: int) -> pl.Expr:
    """Which of `parts` parts a flow falls in, the same for both directions of its conversation (with_response
    judges each conversation on its own): a bucket too big to hold is judged part by part (buckets.Spill)."""
    src, dst = conversation_ends(schema)
    return (src ^ dst) % parts


def as_text(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` with its Categorical columns (a host bucket's addresses, detect/buckets.py) as String: what
    leaves a bucket's computation is plain text, as the lake's flows are."""
    cats = [name for name, dtype in frame.schema.items() if dtype == pl.Categorical]
    return frame.with_columns(pl.col(cats).cast(pl.String)) if cats else frame


def host_bucket(addrs: pl.Expr, buckets: int) -> pl.Expr:
    """The host bucket of each address (detect/buckets.py): a hash of its text, the same for one run."""
    return addrs.hash(seed=18) % buckets


def with_local_facts(
    flows: pl.LazyFrame, local_addrs: list[str], owned: pl.Series | None = None
) -> pl.LazyFrame:
    """The facts of with_flow_facts that depend on who is local (src_local, dst_local, src_owned, dst_owned),
    set or replaced: flows whose other facts are computed once serve callers with other local hosts (the rules
    count leased addresses as local, the model's features only local_networks)."""
    locals_series = pl.Series(local_addrs, dtype=pl.String)
    return flows.with_columns(
        src_local=pl.col("src_addr").is_in(locals_series.implode()),
        dst_local=pl.col("dst_addr").is_in(locals_series.implode()),
    ).with_columns(
        src_owned=pl.col("src_local")
        if owned is None
        else pl.col("src_local") & pl.col("src_addr").is_in(owned.implode()),
        dst_owned=pl.col("dst_local")
        if owned is None
        else pl.col("dst_local") & pl.col("dst_addr").is_in(owned.implode()),
    )


def local_addresses_in(
    lake: Lake, ranges: list[tuple[dt.datetime, dt.datetime]], local_networks: list[str]
) -> list[list[str]]:
    """local_addresses of the lake's flows over each of `ranges`, from ONE scan of their span: an address
    counts for a range when one of its flows starts inside it (a sweep's rules and its model's features ask
    over two overlapping ranges)."""
    start, end = min(utc(a) for a, _ in ranges), max(utc(b) for _, b in ranges)
    flows = scan_flows(lake, start, end)
    ends = pl.concat(
        [flows.select(pl.col(side).alias("addr"), "ts_start") for side in ("src_addr", "dst_addr")]
    )
    inside = [
        ((pl.col("ts_start") >= utc(a)) & (pl.col("ts_start") < utc(b))).any().alias(f"in_{i}")
        for i, (a, b) in enumerate(ranges)
    ]
    seen = ends.group_by("addr").agg(inside).collect(engine="streaming")
    local = in_networks(seen.get_column("addr").to_arrow(), local_networks)
    addrs = seen.get_column("addr").to_list()
    return [
        [a for a, m, i in zip(addrs, local, seen.get_column(f"in_{n}").to_list(), strict=True) if m and i]
        for n in range(len(ranges))
    ]


def local_addresses(flows: pl.LazyFrame, local_networks: list[str]) -> list[str]:
    """The distinct local addresses (either end) among the flows."""
    uniques = (
        pl.concat(
            [flows.select(pl.col("src_addr").alias("addr")), flows.select(pl.col("dst_addr").alias("addr"))]
        )
        .unique()
        .collect(engine="streaming")
    )
    arr = uniques.get_column("addr").to_arrow()
    mask = in_networks(arr, local_networks)
    return [a for a, m in zip(arr.to_pylist(), mask, strict=True) if m]


# ---- periodicity (RITA-style) ------------------------------------------------------------------------------
@dataclass
class SpanBook:
    """periodicity's coverage compares a pair's active time with the span of the data its window holds, over
    ALL the flows it is asked about: a window-wide fact that one host bucket cannot see. So each bucket's
    periodicity call keeps its pairs' stats and its own (window_start, lo, hi) spans in `deferred` (by call
    order) and scores nothing; once every bucket ran, a `final` book scores the stats of all buckets against
    the spans combined (the min of the los, the max of the his: exactly the window-wide span, as every flow's
    source is owned by one bucket, detect/buckets.py). No pass over the window's flows of its own. A book
    without `deferred` fails loudly: a detector that calls periodicity must be listed in WINDOW_WIDE."""

    calls: int = 0
    # call -> (each bucket's pair stats, each bucket's spans); shared by the books of one detector's buckets
    deferred: dict[int, tuple[list[pl.DataFrame], list[pl.DataFrame]]] | None = None
    final: bool = False  # score the deferred stats (the run after the buckets)
    # the caller puts each bucket's stats and spans in `deferred` itself (computed once for the features and
    # the beacon detector: detect/buckets.py); a bucket's periodicity call then computes nothing
    provided: bool = False

    def scored(self, call: int) -> pl.LazyFrame | None:
        """The deferred call's pairs of every bucket, scored against the spans of all (None: no bucket ran)."""
        stats, spans = (self.deferred or {}).get(call, ([], []))
        if not stats:
            return None
        window = pl.concat(spans).group_by("window_start").agg(pl.col("lo").min(), pl.col("hi").max())
        return _score(pl.concat(stats).lazy(), window.lazy())

    def defer(self, stats: pl.LazyFrame, observed: pl.LazyFrame) -> pl.LazyFrame:
        """periodicity's result for this call: empty while buckets run (their stats and spans kept), the
        scores of every bucket's pairs in the final run."""
        assert self.deferred is not None
        parts = self.deferred.setdefault(self.calls, ([], []))
        self.calls += 1
        if self.final:
            scored = self.scored(self.calls - 1)
            return (
                scored
                if scored is not None
                else pl.DataFrame(schema=_score(stats, observed).collect_schema()).lazy()
            )
        if self.provided:
            return pl.DataFrame(schema=_score(stats, observed).collect_schema()).lazy()
        # one plan (the flows' common part computed once), streaming: a bucket too big to hold is streamed
        found, seen = pl.collect_all([stats, observed], engine="streaming")
        parts[0].append(as_text(found))
        parts[1].append(as_text(seen))
        return pl.DataFrame(schema=_score(stats, observed).collect_schema()).lazy()


def _bowley_of(q1: pl.Expr, q2: pl.Expr, q3: pl.Expr) -> pl.Expr:
    """Bowley (quartile) skewness in [-1, 1] from the quartiles (aggregated already: _quartiles); 0 for a
    symmetric distribution. 0 when the quartiles coincide."""
    spread = q3 - q1
    return pl.when(spread > 0).then((q3 + q1 - 2 * q2) / spread).otherwise(0.0)


def _quartiles(col: pl.Expr, name: str) -> dict[str, pl.Expr]:
    """The quartiles of `col` as plain aggregations `_{name}_q1..3`, for _bowley_of after the group-by."""
    return {f"_{name}_q{i}": col.quantile(q) for i, q in ((1, 0.25), (2, 0.5), (3, 0.75))}


# Pieces of one connection (an exporter's active timeout cuts it) follow each other closely: a record of
# unknown flags (UDP, a sensor without them) that starts more than this after the previous record of its
# source port ended opens a new connection.
CONNECTION_IDLE_S = 60.0


def continued_pieces(group: list[str]) -> pl.Expr:
    """Per row of a frame sorted by `group` then ts_start: the record continues the connection of the record
    before it (same `group`, the same source port) rather than opening one. A TCP record whose flags are
    known opens one when it holds SYN (a later piece of a connection holds none, whatever the gap: an idle SSH
    session exported every 30 min stays one); other records when they start more than CONNECTION_IDLE_S after
    the previous record's end. Reads ts_start, ts_end, proto and `_flags` (tcp_flags, null as 0)."""
    same = pl.lit(True)
    for column in group:
        same = same & pl.col(column).eq_missing(pl.col(column).shift(1))
    known = (pl.col("proto") == 6) & (pl.col("_flags") != 0)
    idle = (pl.col("ts_start") - pl.col("ts_end").shift(1)).dt.total_microseconds() > CONNECTION_IDLE_S * 1e6
    opens = pl.when(known).then((pl.col("_flags") & SYN) != 0).otherwise(idle)
    return (same & ~opens).fill_null(False)


def periodicity(
    flows: pl.LazyFrame,
    window_s: float,
    min_connections: int,
    pair: tuple[str, ...] = ("src_addr", "dst_addr", "dst_port", "proto"),
    spans: SpanBook | None = None,
) -> pl.LazyFrame:
    """Score how regular the connections of each pair are within each window, RITA-like: the intervals between
    connection starts and the connection sizes should be symmetric (Bowley skew ~ 0) and tightly spread (MAD
    small against the median), and there should be many of them. Score in [0, 1], 1 = a metronome.

    Expects initiator flows (responses removed). Columns out: pair..., window_start, connections, interval_median,
    interval_mad, interval_skew, bytes_median, bytes_mad, bytes_skew, score, first_ts, last_ts, bytes.
    `spans`: the data span of each window over ALL the flows of the window, when `flows` is one host bucket's
    (detect/buckets.py); None: observed from `flows`.
    """
    if spans is None:
        return _score(*periodicity_stats(flows, window_s, min_connections, pair))
    if spans.deferred is None:
        raise RuntimeError(
            "periodicity was called on one host bucket without a book for the window-wide spans: "
            "list the detector in WINDOW_WIDE (detect/buckets.py)"
        )
    if spans.final or spans.provided:
        # the book answers from the buckets' stats (final) or its caller fills it (provided): these flows are
        # not read. periodicity_stats collects its pairs when called, so it only gets an empty frame of their
        # schema here (it had a sweep's final beacon run group the whole window's flows of the lake, and each
        # bucket's features group theirs, for nothing: ~10 s CPU at 5*10^7 flows)
        flows = pl.LazyFrame(schema=flows.collect_schema())
    return spans.defer(*periodicity_stats(flows, window_s, min_connections, pair))


def periodicity_stats(
    flows: pl.LazyFrame,
    window_s: float,
    min_connections: int,
    pair: tuple[str, ...] = ("src_addr", "dst_addr", "dst_port", "proto"),
) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """periodicity's two parts: each pair's stats per window (what depends on the pair's flows only) and the
    window's data span (observed_spans); _score joins them."""
    flows = flows.with_columns(window_start=bucket_expr("ts_start", window_s))
    keys = [*pair, "window_start"]
    # the pairs with enough connections, each numbered (`_pair`), collected once here (one row per pair): the
    # steps below group, sort and compare one integer instead of the pair's addresses (the sort by the
    # addresses was a third of this function's cost); the pair's columns come back by `_pair` at the end
    pairs = (
        flows.group_by(keys)
        .agg(pl.len().alias("connections"))
        .filter(pl.col("connections") >= min_connections)
        .select(keys)
        .collect(engine="streaming")
        .with_row_index("_pair")
        .lazy()
    )
    # One connection split by the exporter's active timeout is several flows with the same source port:
    # collapse them, so that a long session exported every 30 min does not look like a beacon. But one source
    # port is not one connection: a beacon that reuses its port (bind() before connect()) made 288 connections
    # five minutes apart one "connection", never a beacon (hostile review). So a source port's records are
    # cut into connections where one opens (continued_pieces).
    # (callers that give starts and sizes only, such as a test's metronome, get the idle-gap rule)
    names = flows.collect_schema().names()
    flags = pl.col("tcp_flags").fill_null(0).cast(pl.Int32) if "tcp_flags" in names else pl.lit(0, pl.Int32)
    candidates = (
        flows.join(pairs, on=keys, how="inner")
        .select(
            "_pair",
            "src_port",
            "ts_start",
            "bytes",
            ts_end=pl.col("ts_end") if "ts_end" in names else pl.col("ts_start"),
            proto=pl.col("proto") if "proto" in names else pl.lit(None, pl.Int16),
            _flags=flags,
        )
        # a total order, so that every engine and row order cuts the same connections
        .sort("_pair", "src_port", "ts_start", "ts_end", "_flags", "bytes", nulls_last=True)
        .with_columns(_connection=continued_pieces(["_pair", "src_port"]).not_().cum_sum())
        .group_by("_pair", "_connection")
        .agg(pl.col("ts_start").min(), saturating_sum(pl.col("bytes")))
    )
    # intervals between a pair's connection starts, computed once per row over the sorted connections, so that
    # the quantiles below aggregate a plain column: the difference with the row before, null where the pair
    # changes (what diff().over(keys) gives, without grouping the sorted rows again: half the cost)
    same_pair = pl.col("_pair") == pl.col("_pair").shift(1)
    candidates = candidates.sort("_pair", "ts_start").with_columns(
        interval=pl.when(same_pair).then(pl.col("ts_start").dt.epoch("ms").diff().cast(pl.Float64) / 1000.0),
        size=pl.col("bytes").cast(pl.Float64),
    )
    # The group-by below takes plain aggregations only (medians, quantiles of a column): an expression over
    # a group's aggregate inside it (a MAD's deviations from the median, a skew's quartile arithmetic) made
    # polars evaluate it group by group, ~35% of the group-by's cost (measured). So the deviations from the
    # pair's medians are columns computed before it, and the skews are computed from the quartiles after it:
    # the same operations on the same values, the same results (and interval_mad no longer varies from run to
    # run: polars 2.1 gave a different value for a few pairs in about one collect in six, measured)
    candidates = candidates.with_columns(
        _interval_dev=(pl.col("interval") - pl.col("interval").median().over("_pair")).abs(),
        _size_dev=(pl.col("size") - pl.col("size").median().over("_pair")).abs(),
    )
    ts, size = pl.col("interval").drop_nulls(), pl.col("size")
    stats = (
        candidates.group_by("_pair")
        .agg(
            connections=pl.len(),
            interval_median=ts.median(),
            interval_mad=pl.col("_interval_dev").drop_nulls().median(),
            **_quartiles(ts, "interval"),
            bytes_median=size.median(),
            bytes_mad=pl.col("_size_dev").median(),
            **_quartiles(size, "bytes"),
            first_ts=pl.col("ts_start").min(),
            last_ts=pl.col("ts_start").max(),
            bytes=saturating_sum(pl.col("bytes")),
        )
        .with_columns(
            interval_skew=_bowley_of(*(pl.col(f"_interval_q{i}") for i in (1, 2, 3))),
            bytes_skew=_bowley_of(*(pl.col(f"_bytes_q{i}") for i in (1, 2, 3))),
        )
        .select(
            "_pair",
            "connections",
            "interval_median",
            "interval_mad",
            "interval_skew",
            "bytes_median",
            "bytes_mad",
            "bytes_skew",
            "first_ts",
            "last_ts",
            "bytes",
        )
        .filter(pl.col("connections") >= min_connections)
        .join(pairs, on="_pair")
        .select(*keys, pl.exclude(*keys, "_pair"))
    )
    return stats, observed_spans(flows, window_s)


def observed_spans(flows: pl.LazyFrame, window_s: float) -> pl.LazyFrame:
    """(window_start, lo, hi): the first and last flow start of each window, what periodicity's coverage is
    judged against."""
    flows = flows.with_columns(window_start=bucket_expr("ts_start", window_s))
    return flows.group_by("window_start").agg(lo=pl.col("ts_start").min(), hi=pl.col("ts_start").max())


def _score(stats: pl.LazyFrame, observed: pl.LazyFrame) -> pl.LazyFrame:
    """periodicity's score of each pair from its stats and the (window_start, lo, hi) span of the data."""
    # Dispersion relative to the typical value, x3: a spread of a third of the interval already scores 0
    # (random arrivals have MAD/median ~0.5; a beacon with 10% jitter keeps ~0.85).
    interval_regular = (
        1 - 3 * pl.col("interval_mad") / pl.col("interval_median").clip(lower_bound=1e-3)
    ).clip(0, 1)
    size_regular = (1 - 3 * pl.col("bytes_mad") / pl.col("bytes_median").clip(lower_bound=1.0)).clip(0, 1)
    # Coverage: the pair keeps its pace over the time the window actually holds data (a lake with 4 h of a
    # day is judged on those 4 h): a burst of 20 regular connections in 10 min is not a beacon.
    observed = observed.select("window_start", data_span=(pl.col("hi") - pl.col("lo")).dt.total_seconds())
    active = (pl.col("last_ts") - pl.col("first_ts")).dt.total_seconds()
    coverage = (active / pl.col("data_span").clip(lower_bound=1.0)).clip(0, 1)
    stats = stats.join(observed, on="window_start", how="left")
    return stats.with_columns(
        score=(
            (1 - pl.col("interval_skew").abs()) * 0.2
            + interval_regular * 0.35
            + (1 - pl.col("bytes_skew").abs()) * 0.05
            + size_regular * 0.2
            + coverage * 0.2
        ).fill_null(0.0)
    )


# ---- per (host, window) features ---------------------------------------------------------------------------
_on_host_window = {"on": ["host", "window_start"], "how": "left"}


def distinct_count(flows: pl.LazyFrame, column: str, name: str) -> pl.LazyFrame:
    """Per (src_addr as host, window_start): how many distinct `column` values (a null counts as one, as
    n_unique does), from the distinct triples: memory follows the triples, not the rows."""
    return (
        flows.group_by(pl.col("src_addr").alias("host"), "window_start", column)
        .agg()
        .group_by("host", "window_start")
        .agg(pl.len().cast(pl.UInt32).alias(name))
    )


def host_features(
    flows: pl.LazyFrame,
    window_s: float,
    history_start: dt.datetime | None = None,
    warmup_s: float = 86400.0,
    min_beacon_connections: int = FEATURE_PERIOD_MIN_CONNECTIONS,
    sequential: bool = False,
    spans: SpanBook | None = None,
) -> pl.LazyFrame:
    """One row per (host, window_start) with FEATURES. `flows` must come from with_flow_facts.

    sequential: collect each partial aggregate on its own (streaming) before joining the small results, so
    that peak memory is that of the largest part, not of all scans at once (what compute_features does).

    new_dst_share: the share of a window's destinations the host had not contacted since `history_start`
    (only for windows at least `warmup_s` after it; 0 before, when there is no history to compare with).
    """
    bucket = bucket_expr("ts_start", window_s)
    # who answered whom, judged per day (the periodicity feature's window: FeatureJob shares these facts with
    # the beacon detector's day windows, detect/buckets.py)
    flows = with_response(flows).with_columns(window_start=bucket)
    initiator = ~pl.col("response")
    milliseconds = (pl.col("ts_end") - pl.col("ts_start")).dt.total_milliseconds()
    # Every aggregation below is one the streaming engine reduces as rows pass (len, sum, min, max, mean,
    # n_unique of a plain column): a filtered one such as `col.filter(c).n_unique()` makes polars gather the
    # group's rows first (~35 MB per million flows of a host bucket, measured). Distinct counts under a
    # condition are counted from the distinct (host, window, value) triples instead (distinct_count).
    outbound = flows.filter(pl.col("src_owned"))
    # the distinct (host, window, destination) triples of the initiated flows, each with its first start,
    # grouped from the flows ONCE: distinct_dst counts them per (host, window), and new_dst_share's first
    # contact of a (host, destination) is the min over its windows. Both grouped the flows by their address
    # text on their own before (the costliest part of the features after the inbound one, measured)
    destinations = (
        outbound.filter(initiator)
        .group_by(pl.col("src_addr").alias("host"), "window_start", "dst_addr")
        .agg(first=pl.col("ts_start").min())
    )
    if sequential:
        destinations = destinations.collect(engine="streaming").lazy()
    distinct_dst = destinations.group_by("host", "window_start").agg(
        pl.len().cast(pl.UInt32).alias("distinct_dst")
    )
    ports = distinct_count(outbound.filter(initiator), "dst_port", "distinct_dst_ports")
    if sequential:
        # on its own: joined to `out` below as a plan, it shares `outbound`'s scan with it, and polars then
        # caches that scan whole to feed both (a streamed host bucket of 58.7 M flows, 10^8 in the day:
        # 1.9 GB instead of 0.26 GB for this step; the whole sweep peaked at 2.27 GB)
        ports = ports.collect(engine="streaming").lazy()
    out = (
        outbound.group_by(pl.col("src_addr").alias("host"), "window_start")
        .agg(
            flows_out=pl.len(),
            packets_out=saturating_sum(pl.col("packets")),
            bytes_out=saturating_sum(pl.col("bytes")),
            bytes_out_ext=saturating_sum(pl.when(~pl.col("dst_local")).then(pl.col("bytes"))),
            tcp_attempts=(pl.col("proto") == 6).and_(initiator).sum(),
            failed=pl.col("failed").sum(),
            syn_only=pl.col("syn_only").sum(),
            # from the exact integer sum of milliseconds: a float mean depends on the order rows are summed
            # in (the streaming engine's, or a host bucket's), a sum of integers does not
            mean_duration=pl.when(milliseconds.count() > 0).then(
                milliseconds.sum() / milliseconds.count() / 1000.0
            ),
            long_flows=(pl.col("duration") >= LONG_FLOW_SECONDS).sum(),
            # the night share's parts, summed per day below (no group-by of its own over the flows)
            initiated=initiator.sum(),
            initiated_at_night=(initiator & pl.col("night")).sum(),
        )
        .join(distinct_dst, **_on_host_window)
        .join(ports, **_on_host_window)
    )
    inbound = (
        flows.filter(pl.col("dst_owned"))
        .group_by(pl.col("dst_addr").alias("host"), "window_start")
        .agg(
            bytes_in=saturating_sum(pl.col("bytes")),
            flows_in=pl.len(),
            distinct_src_in=pl.col("src_addr").n_unique(),
            icmp_unreach=pl.col("icmp_unreach").sum(),
        )
    )
    first_seen = (
        destinations.group_by("host", "dst_addr")
        .agg(first=pl.col("first").min())
        .with_columns(window_start=bucket_expr("first", window_s))
    )
    if history_start is not None:
        cutoff = utc(history_start) + dt.timedelta(seconds=warmup_s)
        first_seen = first_seen.filter(pl.col("window_start") >= cutoff)
    else:
        first_seen = first_seen.filter(pl.lit(False))
    new_dsts = first_seen.group_by("host", "window_start").agg(new_dsts=pl.len())
    # periodicity towards the outside only, DNS/NTP aside: inside the cloud periodic traffic is by design
    # (metrics, backups), and leaving it out keeps this, the costliest feature, cheap.
    outward = (
        pl.col("src_owned")
        & initiator
        & ~pl.col("dst_local")
        & ~pl.col("dst_port").is_in(FEATURE_PERIOD_IGNORED_PORTS)
    )
    beacons = host_periodicity(
        periodicity(flows.filter(outward), FEATURE_PERIOD_S, min_beacon_connections, spans=spans)
    )
    # Night-time share is a property of the host's day (an hourly window is all night or all day).
    if sequential:
        out, inbound, new_dsts, beacons = (
            part.collect(engine="streaming").lazy() for part in (out, inbound, new_dsts, beacons)
        )
    # the share of the initiated flows of the host's day started at night: the exact ratio of the day's counts
    # (what a mean over the flows gives), from the per-window sums
    initiated = pl.col("initiated").sum()
    nights = (
        out.group_by("host", bucket_expr("window_start", 86400.0).alias("day"))
        .agg(night_share=pl.when(initiated > 0).then(pl.col("initiated_at_night").sum() / initiated))
        .filter(pl.col("night_share").is_not_null())
    )
    joined = (
        out.join(inbound, on=["host", "window_start"], how="full", coalesce=True)
        .join(new_dsts, on=["host", "window_start"], how="left")
        .with_columns(day=bucket_expr("window_start", 86400.0))
        .join(beacons, on=["host", "day"], how="left")
        .join(nights, on=["host", "day"], how="left")
        .drop("day")
    )
    zero = [
        c
        for c in (
            "flows_out",
            "packets_out",
            "bytes_out",
            "bytes_out_ext",
            "distinct_dst",
            "distinct_dst_ports",
            "tcp_attempts",
            "failed",
            "syn_only",
            "long_flows",
            "bytes_in",
            "flows_in",
            "distinct_src_in",
            "icmp_unreach",
            "new_dsts",
        )
    ]
    joined = joined.with_columns([pl.col(c).fill_null(0) for c in zero])
    return joined.with_columns(
        failed_share=(pl.col("failed") / pl.col("tcp_attempts")).fill_nan(0.0).fill_null(0.0),
        night_share=pl.col("night_share").fill_null(0.0),
        new_dst_share=(pl.col("new_dsts") / pl.col("distinct_dst")).fill_nan(0.0).fill_null(0.0),
        mean_duration=pl.col("mean_duration").fill_null(0.0),
        periodicity=pl.col("periodicity").fill_null(0.0),
    ).select("host", "window_start", *FEATURES)


def host_periodicity(scored: pl.LazyFrame) -> pl.LazyFrame:
    """The periodicity feature of each (host, day): its most regular outward pair's score."""
    return scored.group_by(pl.col("src_addr").alias("host"), pl.col("window_start").alias("day")).agg(
        periodicity=pl.col("score").max()
    )


def with_periodicity(features: pl.DataFrame, book: SpanBook) -> pl.DataFrame:
    """`features` (host_features' rows, its periodicity deferred to `book`: every bucket ran) with the
    periodicity feature scored from the book: what host_features joins in."""
    scored = book.scored(0)  # host_features calls periodicity once
    if scored is None:
        return features
    return (
        features.lazy()
        .drop("periodicity")
        .with_columns(day=bucket_expr("window_start", FEATURE_PERIOD_S))
        .join(host_periodicity(scored), on=["host", "day"], how="left")
        .with_columns(pl.col("periodicity").fill_null(0.0))
        .select("host", "window_start", *FEATURES)
        .collect()
    )


def compute_features(
    lake: Lake,
    since: dt.datetime,
    until: dt.datetime,
    local_networks: list[str],
    window_s: float = 3600.0,
    history_start: dt.datetime | None = None,
    night: tuple[int, int] = (22, 6),
    buckets: int | None = None,
    spill: Spill | None = None,
    timed: Timer | None = None,
) -> pl.DataFrame:
    """Features of every (host, window) with ts in [since, until), collected with the streaming engine, sorted
    by host and window. `history_start` (<= since) widens the read so that new destinations are judged against
    the host's past; only the windows inside [since, until) are returned. More flows than one host bucket takes
    (or `buckets` > 1) are computed bucket by bucket, in bounded memory (detect/buckets.py): the same rows.
    `spill`: host buckets already spilled (a sweep shares its rules' spill) covering the read. `timed(stage, fn)`:
    a sweep's stage timer."""
    from tracepipe.detect.buckets import features, no_timer

    return features(
        lake, since, until, local_networks, window_s, history_start, night, buckets, spill, timed or no_timer
    )
