"""Sweeps and model fits in bounded memory: the window's flows split by host bucket, each bucket run alone.

In: a lake, a time range, the local hosts, a bucket count. One streaming pass (`spill_flows`) writes every flow
with a local end to the bucket of each local end (hash of the address; a flow between local hosts of two
buckets goes to both) in a temporary directory ($TMPDIR: a disk, not a RAM-backed tmpfs); then the SAME detector and feature code runs on each bucket's
flows in turn. What a rule finds for a host depends only on the flows with that host at one end, so a bucket
keeps the candidates whose `addr` it owns, and the union is what one unbucketed run finds: peak memory follows
the largest bucket, not the day. A bucket of at most IN_MEMORY_ROWS is read ONCE into memory and every detector
and the features take that frame (facts computed once, per-host aggregations on the rows of the bucket's own
hosts only); a bigger one (the bucket of a host at one end of very many flows) is streamed from the spill by
each of them, so memory stays bounded whatever that host's share. Two facts span hosts: exfiltration's peer
median (its per (host, window) sums are gathered bucket by bucket, then it runs once over them) and periodicity's
data span (each bucket keeps its pairs' stats and its own spans; they are scored together after the last bucket:
features.SpanBook). The spill finds the local hosts as it reads (FindHosts). Spark (engines/spark_sweep.py)
splits the same way.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import TypeVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tracepipe import fsutil
from tracepipe.detect import detectors as det
from tracepipe.detect.features import (
    FEATURE_PERIOD_IGNORED_PORTS,
    FEATURE_PERIOD_MIN_CONNECTIONS,
    FEATURE_PERIOD_S,
    SpanBook,
    as_text,
    conversation_part,
    floor_time,
    host_bucket,
    host_features,
    in_networks,
    local_addresses,
    observed_spans,
    periodicity_stats,
    scan_flows,
    utc,
    window_days,
    with_flow_facts,
    with_local_facts,
    with_periodicity,
    with_response,
)
from tracepipe.lake import Lake, conform
from tracepipe.pipeline_config import Beacon
from tracepipe.schema import FLOWS

# ~3 M flows per bucket keep each bucket's detectors and features under ~1 GB here (README, "Detection quality
# and speed"); a day of 10^8 flows is then 34 buckets. A host that is one end of very many flows (the cloud's
# DNS resolver) makes its bucket bigger than the others: its share of the day, whatever the bucket count.
ROWS_PER_BUCKET = 3_000_000
CROSS_HOST = ("exfiltration",)  # compares hosts with each other: runs over the whole window (or its sums)
# per-host detectors that call features.periodicity (passing spans=ctx.spans): their pairs are scored after the
# last bucket against the window-wide spans; one that is missing here fails loudly (SpanBook has nothing to give)
WINDOW_WIDE = ("beacon",)
BUCKET = "_bucket"
# The only FLOWS columns the detectors and features read (evidence rows come from the lake itself): the spill
# copies these and no other. FLOWS has ~50 columns (router, NAT, tunnel fields, provenance), mostly null for a
# cloud's exporters: copying them all cost the spill 7.6 s of CPU at 10^7 flows, these only 2.8 s. A detector
# that reads another column fails on a bucket (polars: column not found) in tests/test_buckets.py: add it here.
SPILLED = (
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
)
SPILL_BATCH_ROWS = 262_144  # rows read (and held) at a time
SPILL_WRITE_BATCH_ROWS = 64 * 1024  # rows per Parquet write batch of the spill's files
# A bucket of at most this many rows is read into memory ONCE (~64 bytes a row: ~0.5 GB) and every detector and
# the features work on that frame, their per-flow facts computed once; a bigger one (the bucket of a host that
# is one end of very many flows, such as the cloud's DNS resolver) is streamed from the spill by each of them,
# as before: memory follows this bound, not the heaviest host.
IN_MEMORY_ROWS = 8_000_000
# A bucket over IN_MEMORY_ROWS has its facts computed in parts of about this many rows (Spill.facts_file): who
# answered whom (features.with_response) is a window aggregate over each conversation, which polars can only
# compute with all of its input at hand. Over the DNS resolver's whole bucket (35.5 M rows at 5*10^7 flows) it
# held ~3 GB: a 5*10^7-flow sweep peaked at 4.6 GB (session 30; the aggregate came in session 25, measured at
# 10^7 only). Each part holds whole conversations (features.conversation_part), so the facts are the same.
RESPONSE_PART_ROWS = 4_000_000
T = TypeVar("T")
Timer = Callable[[str, Callable[[], T]], T]
# The spill's addresses: dictionary<uint32, string> tagged as polars' own Categorical (the field metadata polars
# writes on one), which polars maps to its categories per dictionary page; a plain Arrow dictionary (int32
# indices, no tag) it maps value by value: reading a bucket's addresses cost ~4x more (a 33.6 M-row bucket:
# 0.8-0.9 s per address column instead of ~0.2 s). Read back by this process's polars only (a test checks the
# values and the Categorical type; and each process checks once that its polars reads a tagged column right,
# else the spill stores it untagged: slower, never wrong).
SPILL_DICTIONARY = pa.dictionary(pa.uint32(), pa.string())
POLARS_CATEGORICAL = {b"_PL_CATEGORICAL2": b"0;0;u32;"}


@cache
def polars_reads_the_tag() -> bool:
    """Whether this polars reads a POLARS_CATEGORICAL-tagged dictionary column through its dictionary: a
    3-row file whose dictionary orders the values unlike polars' categories must read back as written."""
    import io

    field = pa.field("a", SPILL_DICTIONARY, metadata=POLARS_CATEGORICAL)
    pl.Series(["tag-check-a", "tag-check-b"], dtype=pl.Categorical)  # polars' codes: a before b
    values = pa.DictionaryArray.from_arrays(
        pa.array([1, 0, 1], pa.uint32()), pa.array(["tag-check-b", "tag-check-a"])
    )
    buffer = io.BytesIO()
    pq.write_table(pa.table([values], schema=pa.schema([field])), buffer, store_schema=True)
    try:
        column = pl.read_parquet(buffer.getvalue()).get_column("a")
    except Exception:  # any refusal means: do not tag
        return False
    return column.dtype == pl.Categorical and column.cast(pl.String).to_list() == [
        "tag-check-a",
        "tag-check-b",
        "tag-check-a",
    ]


def spilled_field(field: pa.Field) -> pa.Field:
    """How the spill stores an address column: SPILL_DICTIONARY, tagged as polars' Categorical when this
    polars reads the tag right (polars_reads_the_tag)."""
    tag = POLARS_CATEGORICAL if polars_reads_the_tag() else None
    return pa.field(field.name, SPILL_DICTIONARY, field.nullable, metadata=tag)


def as_spilled(table: pa.Table, text: list[str]) -> pa.Table:
    """`table`'s dictionary<int32> columns `text` as spilled_field (the same indices, viewed unsigned)."""
    for name in text:
        column = table.column(name).combine_chunks()
        index = table.schema.get_field_index(name)
        spilled = pa.DictionaryArray.from_arrays(column.indices.view(pa.uint32()), column.dictionary)
        table = table.set_column(index, spilled_field(table.schema.field(name)), spilled)
    return table


def _us(ts: dt.datetime) -> int:
    return int(utc(ts).timestamp()) * 1_000_000 + utc(ts).microsecond


def bucket_count(rows: int, rows_per_bucket: int = ROWS_PER_BUCKET) -> int:
    return max(1, -(-rows // max(1, rows_per_bucket)))


def count_rows(lake: Lake, start: dt.datetime, end: dt.datetime) -> int:
    return int(scan_flows(lake, start, end).select(pl.len()).collect(engine="streaming").item())


@dataclass
class Spill:
    """The flows of [start, end) with a local end, one folder of Parquet files per host bucket."""

    root: Path
    owners: pl.DataFrame  # addr -> _bucket, one row per local host
    buckets: int
    start: dt.datetime
    end: dt.datetime
    schema: pl.Schema
    rows: dict[int, int] = field(default_factory=dict)  # rows spilled per bucket
    in_memory_rows: int = IN_MEMORY_ROWS  # a bucket of more rows is streamed by each reader, never held
    response_part_rows: int = RESPONSE_PART_ROWS  # such a bucket's facts are computed in parts of this size
    # the features' hosts (feature_hosts) over a (start, until), when whoever spilled already looked them up
    feature_hosts: dict[tuple[dt.datetime, dt.datetime], list[str]] = field(default_factory=dict)
    # spilled with FindHosts: the in-network addresses seen in each of its ranges
    found: list[list[str]] = field(default_factory=list)

    def frame(self, bucket: int) -> pl.DataFrame | None:
        """The bucket's flows in memory when they are at most IN_MEMORY_ROWS (read once for all who need
        them), else None: stream them from source()."""
        if self.rows.get(bucket, 0) > self.in_memory_rows:
            return None
        return self.source(bucket).collect()

    def source(self, bucket: int) -> pl.LazyFrame:
        path = self.root / f"{bucket}.parquet"
        if not path.exists():
            return pl.LazyFrame(schema=self.schema)
        return pl.scan_parquet(str(path), hive_partitioning=False, glob=False)

    def hosts(self, bucket: int) -> pl.Series:
        return self.owners.filter(pl.col(BUCKET) == bucket).get_column("addr")

    def facts_file(self, bucket: int, local: list[str], night: tuple[int, int]) -> pl.LazyFrame:
        """A bucket too big to hold (over in_memory_rows), with its facts (with_flow_facts), written ONCE to a
        file beside the spill by a streaming sink, and scanned from there: each of its readers (every detector
        and the features) then streams facts already computed. Computing them (four lookups of the addresses
        among the local hosts) is what each reader paid again: ~17 s CPU of a 5*10^7-flow sweep whose DNS
        resolver's bucket holds 35.5 M rows. The previous bucket's file is removed (unlinked, never overwritten in
        place: a reader may still map it), so the disk holds one at a time. Over response_part_rows, the facts
        are computed and written in parts that each hold whole conversations (RESPONSE_PART_ROWS), one file each,
        the parts read in turn from the spill."""
        for old in self.root.glob("*.facts*.parquet"):
            old.unlink()
        owned = self.hosts(bucket)
        source = self.source(bucket)
        parts = max(1, -(-self.rows.get(bucket, 0) // max(self.response_part_rows, 1)))
        if parts == 1:
            path = self.root / f"{bucket}.facts.parquet"
            facts = with_flow_facts(source, local, night, owned=owned)
            with_response(facts).sink_parquet(path, compression="uncompressed", engine="streaming")
            return pl.scan_parquet(str(path), hive_partitioning=False, glob=False)
        paths = []
        for number, piece in enumerate(self._parts(bucket, parts)):  # memory: one part at a time
            facts = with_flow_facts(piece.lazy(), local, night, owned=owned)
            path = self.root / f"{bucket}.facts.{number}.parquet"
            with_response(facts).collect(engine="in-memory").write_parquet(path, compression="uncompressed")
            paths.append(str(path))
            del piece, facts
        return pl.scan_parquet(paths, hive_partitioning=False, glob=False)

    def _parts(self, bucket: int, parts: int) -> Iterator[pl.DataFrame]:
        """The bucket's flows in `parts` parts of whole conversations (conversation_part), in spill order within
        each, one at a time: split by ONE streaming pass over the bucket into a file per part (polars'
        partitioned sink), each read back whole. A filtered read of the whole bucket per part cost 15 reads of
        the DNS resolver's 58.7 M rows at 10^8 flows: 34 CPU s, against 11 s for the split and 2 s for the
        reads. A polars without partitioned sinks (before 2.x) reads the bucket once per part."""
        source = self.source(bucket)
        part = conversation_part(source.collect_schema(), parts)
        if not hasattr(pl, "PartitionBy"):
            for number in range(parts):
                yield source.filter(part == number).collect(engine="streaming")
            return
        base = self.root / f"{bucket}.parts"
        source.with_columns(_part=part).sink_parquet(
            pl.PartitionBy(str(base), key="_part", include_key=False),
            compression="uncompressed",
            mkdir=True,
            engine="streaming",
        )
        for number in range(parts):
            folder = base / f"_part={number}"
            files = sorted(str(path) for path in folder.glob("*.parquet"))
            piece = (
                pl.read_parquet(files, hive_partitioning=False) if files else pl.DataFrame(schema=self.schema)
            )
            shutil.rmtree(folder, ignore_errors=True)
            yield piece
        shutil.rmtree(base, ignore_errors=True)


def assign(hosts: list[str], buckets: int) -> pl.DataFrame:
    """Each local host's bucket: a hash of its address (fixed for one run: the spill and the owners agree)."""
    addrs = pl.Series("addr", sorted(set(hosts)), pl.String)
    return addrs.to_frame().select("addr", host_bucket(pl.col("addr"), buckets).cast(pl.Int32).alias(BUCKET))


@dataclass(frozen=True)
class FindHosts:
    """The hosts a spill finds as it reads (instead of a list looked up by a scan of its own before it): each
    address in `networks` or in `leased`. It records the in-network addresses with a flow starting in each of
    `ranges` (features.local_addresses_in's answer, in Spill.found) and buckets the rest of the hosts alike."""

    networks: list[str]
    leased: frozenset[str]
    ranges: list[tuple[dt.datetime, dt.datetime]]


@contextmanager
def spill_flows(
    lake: Lake,
    start: dt.datetime,
    end: dt.datetime,
    hosts: list[str],
    buckets: int,
    find: FindHosts | None = None,
) -> Iterator[Spill]:
    """One pass over the lake's flows of [start, end), SPILL_BATCH_ROWS at a time (pyarrow pulls the next only
    when asked: polars' own sinks read ahead and held ~1.2 GB here whatever the settings): each flow with a local
    end goes to the bucket of each of its local ends, in lake order. Addresses stay dictionary-encoded as the
    lake stores them: a bucket is looked up once per distinct address, and a bucket's rows are indices into the
    batch's dictionaries, not copies of the text. `find`: the hosts are found as the flows are read (`hosts`
    is then ignored; the Spill's owners and found say who they were). Removed on exit."""
    owners = assign(hosts if find is None else [], buckets)
    root = fsutil.private_temp_dir("buckets")
    keys, values = owners.get_column("addr"), owners.get_column(BUCKET)
    schema = pa.schema([FLOWS.field(name) for name in SPILLED])
    text = [f.name for f in schema if pa.types.is_string(f.type)]
    # The addresses are stored dictionary-encoded with their Arrow type (store_schema): polars reads them as
    # Categorical, so a bucket's group-bys, joins and lookups on addresses hash 32-bit codes, not text (a sweep
    # of 10^7 flows: ~0.6 s less CPU in 3 interleaved rounds, same alerts; a bucket's frame ~20% smaller).
    # What leaves a bucket's computation is cast back to String (features.as_text).
    stored = pa.schema([spilled_field(f) if f.name in text else f for f in schema])
    since, until = utc(start), utc(end)
    writers: dict[int, pq.ParquetWriter] = {}
    written: dict[int, int] = {}
    key_type = np.int16 if buckets <= np.iinfo(np.int16).max else np.int32

    # find: the leased addresses, every IPv6 address read so far and whether it is in `networks`, and per
    # range the in-network addresses seen there
    known = pl.DataFrame(schema={"addr": pl.String, "net": pl.Boolean})
    leased = pl.Series(sorted(find.leased) if find else [], dtype=pl.String)
    seen: list[list[pl.Series]] = [[] for _ in find.ranges] if find else []
    bounds_us = [(_us(a), _us(b)) for a, b in find.ranges] if find else []

    # per column, the last dictionary looked up and its answers: the batches of one row group share their
    # dictionary, whose lookup (~10 polars queries over thousands of values) was a quarter of the spill's CPU
    last: dict[str, tuple[pa.Array, pl.Series, np.ndarray, np.ndarray]] = {}

    def owner(name: str, column: pa.ChunkedArray, within: list[np.ndarray | None]) -> np.ndarray:
        """Each row's bucket (-1: not a local host), looked up on the dictionary's values only. `within`: per
        range of `find`, which rows start in it (None: all of them)."""
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        rows = pc.fill_null(column.indices, len(column.dictionary)).to_numpy()
        if name in last and last[name][0].equals(column.dictionary):
            names, lookup, net_np = last[name][1:]
        else:
            names, lookup, net_np = lookup_dictionary(column.dictionary)
            last[name] = (column.dictionary, names, lookup, net_np)
        for inside, into in zip(within, seen, strict=True):
            used = np.zeros(len(net_np), dtype=bool)
            used[rows if inside is None else rows[inside]] = True
            into.append(names.filter(pl.Series(used[:-1] & net_np[:-1])))
        return lookup[rows]

    def lookup_dictionary(dictionary: pa.Array) -> tuple[pl.Series, np.ndarray, np.ndarray]:
        """A batch dictionary's values, the bucket of each (-1: not a local host; the last entry: a null
        address) and (find) whether each is in `networks`."""
        names = pl.Series(dictionary.cast(pa.string()))
        net_np = np.zeros(len(names) + 1, dtype=bool)
        if find is None:
            found = names.replace_strict(keys, values, default=None, return_dtype=pl.Int32)
        else:
            # IPv4 text classified afresh (vectorised): keeping every address read so far and looking each
            # dictionary up among them hashed that growing table (57 k addresses at 5*10^7 flows) twice per
            # batch. IPv6 text, which in_networks parses one by one, is still classified once per address.
            nonlocal known
            six = names.str.contains(":", literal=True).fill_null(False).to_numpy()
            inside = np.zeros(len(names), dtype=bool)
            plain = np.flatnonzero(~six)
            inside[plain] = in_networks(names.to_arrow().take(plain), find.networks)
            if six.any():
                v6 = names.filter(pl.Series(six))
                fresh = v6.filter(~v6.is_in(known.get_column("addr").implode()))
                if len(fresh):
                    classified = in_networks(fresh.to_arrow(), find.networks)
                    known = pl.concat([known, pl.DataFrame({"addr": fresh, "net": classified})])
                inside[six] = v6.replace_strict(
                    known.get_column("addr"), known.get_column("net"), default=False
                ).to_numpy()
            net = pl.Series(inside)
            # the bucket of every host: the hash assign() gives it
            found = (
                pl.when(net | names.is_in(leased.implode()))
                .then(host_bucket(pl.col("addr"), buckets))
                .cast(pl.Int32)
                .alias("b")
            )
            found = names.to_frame("addr").select(found).to_series()
            net_np = np.append(net.fill_null(False).to_numpy(), False)
        return names, np.append(found.fill_null(-1).to_numpy(), np.int32(-1)), net_np

    try:
        for entry in lake.entries("flows", window_days(since, until)) if until > since else []:
            source = pq.ParquetFile(entry.path, read_dictionary=text)
            columns = [name for name in schema.names if name in source.schema_arrow.names]
            # decoded on this thread (use_threads=False): Arrow's pool decoding a batch's columns in parallel
            # bought this stage no wall time (its CPU equals its wall on 2 cores) and cost it ~0.3 s of CPU per
            # 10^7 flows in thread hand-offs (4.9 -> 4.6 s, 3 interleaved rounds), a batch being small
            batches = source.iter_batches(batch_size=SPILL_BATCH_ROWS, columns=columns, use_threads=False)
            for batch in batches:
                table = conform(pa.Table.from_batches([batch]), schema, text_as_dictionary=True)
                ts = table.column("ts_start")
                inside = pc.fill_null(pc.and_(pc.greater_equal(ts, since), pc.less(ts, until)), False)
                if not pc.all(inside).as_py():  # (a copy only when some rows fall outside)
                    table = table.filter(inside)
                starts = table.column("ts_start").combine_chunks().cast(pa.int64()).to_numpy()
                # the rows of each of find's ranges, once for both ends (they were masked per end), and no mask
                # at all for a range that holds the whole batch (the usual case: a batch is minutes of flows)
                first, end = (int(starts.min()), int(starts.max())) if len(starts) else (0, -1)
                within = [
                    None if lo <= first and end < hi else (starts >= lo) & (starts < hi)
                    for lo, hi in bounds_us
                ]
                src = owner("src_addr", table.column("src_addr"), within)
                dst = owner("dst_addr", table.column("dst_addr"), within)
                # (row, bucket) for each local end (a flow between two hosts of one bucket once), grouped by
                # bucket and kept in lake order within it: one take, then a slice per bucket. The ends are
                # listed in row order (src, dst of row 0, then of row 1...), so a stable sort by bucket alone
                # keeps lake order (numpy sorts 16-bit keys by radix: 3x cheaper than lexsort by (bucket, row))
                ends = np.stack([src, np.where(dst != src, dst, -1)], axis=1).ravel()
                kept = np.flatnonzero(ends >= 0)
                of = ends[kept]
                order = np.argsort(of.astype(key_type), kind="stable")
                rows, of = (kept >> 1)[order], of[order]
                taken = as_spilled(table.take(rows), text)
                bounds = np.searchsorted(of, np.arange(buckets + 1))
                for bucket in np.flatnonzero(np.diff(bounds)).tolist():
                    if bucket not in writers:
                        writers[bucket] = pq.ParquetWriter(
                            root / f"{bucket}.parquet",
                            stored,
                            compression="none",
                            use_dictionary=["src_addr", "dst_addr"],
                            # min/max of ts_start only: a reader of a part of the spilled range (the
                            # rules' day of a sweep that also spilled the model's history) skips the rest
                            write_statistics=["ts_start"],
                            store_schema=True,
                            # encoders and statistics run per write batch: 64 k rows instead of 1,024,
                            # as the lake writes (lake._parquet_options): ~0.3 s less CPU per 10^7 flows
                            write_batch_size=SPILL_WRITE_BATCH_ROWS,
                        )
                    lo, hi = int(bounds[bucket]), int(bounds[bucket + 1])
                    writers[bucket].write_table(taken.slice(lo, hi - lo))
                    written[bucket] = written.get(bucket, 0) + hi - lo
                del taken, table
        for writer in writers.values():
            writer.close()
        writers.clear()
        pa.default_memory_pool().release_unused()  # the buckets' polars scans come next: give back the batches
        found: list[list[str]] = []
        if find is not None:
            found = [sorted(pl.concat(parts).unique().to_list()) if parts else [] for parts in seen]
            owners = assign(sorted(set().union(find.leased, *found)), buckets)
        yield Spill(
            root,
            owners,
            buckets,
            since,
            until,
            pl.Schema(pl.from_arrow(stored.empty_table()).schema),
            written,
            found=found,
        )
    finally:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(root, ignore_errors=True)


class BucketContext(det.DetectContext):
    """A DetectContext over one bucket's spilled flows (time filter, facts and windows: DetectContext's).
    `facts`: the bucket's flows with their facts (with_flow_facts over the context's local hosts), in memory,
    shared by every detector of the bucket; None: each detector streams them from the spill."""

    def __init__(
        self,
        base: det.DetectContext,
        spill: Spill,
        bucket: int,
        spans: SpanBook,
        facts: pl.DataFrame | pl.LazyFrame | None = None,
        shared: dict | None = None,
    ) -> None:
        # every field of the base (lists such as its timings are shared, not copied), its spans swapped and
        # its `shared` results the bucket's own (one dict for all the detectors of one bucket)
        kept = {
            f.name: getattr(base, f.name)
            for f in fields(base)
            if f.init and f.name not in ("spans", "shared")
        }
        super().__init__(**kept, spans=spans, shared={} if shared is None else shared)
        self._spill, self._source, self._facts = spill, spill.source(bucket), facts
        self._hosts = spill.hosts(bucket)

    def _check(self, start: dt.datetime, end: dt.datetime) -> pl.Expr:
        if utc(start) < self._spill.start or utc(end) > self._spill.end:
            raise RuntimeError(
                f"a detector read flows from {start} to {end}, outside the spilled {self._spill.start} to "
                f"{self._spill.end}: widen sweep_range() in detect/buckets.py (or list it in CROSS_HOST)"
            )
        return (pl.col("ts_start") >= start) & (pl.col("ts_start") < end)

    def scan(self, start: dt.datetime, end: dt.datetime) -> pl.LazyFrame:
        return self._source.filter(self._check(start, end))

    def facts(self, start: dt.datetime, end: dt.datetime) -> pl.LazyFrame:
        if self._facts is None:
            return with_flow_facts(self.scan(start, end), self.local, self.night, owned=self._hosts)
        return self._facts.lazy().filter(self._check(start, end))


def no_timer(name: str, fn: Callable[[], T]) -> T:
    return fn()


def detect(
    ctx: det.DetectContext,
    names: list[str],
    spill: Spill,
    timed: Timer = no_timer,
    also: FeatureJob | None = None,
) -> pl.DataFrame:
    """The candidates of the rule detectors `names`, run bucket by bucket (cross-host ones over the window).
    `timed(stage, fn)` runs and times each step (a detector's time is summed over its buckets). `also`: the
    model's features, computed bucket by bucket from the same in-memory read (FeatureJob.result() after)."""
    also_add = also.also(ctx.local) if also is not None else None
    # exfiltration's per (host, window) sums from the buckets when the spill holds its range (each host's
    # outbound flows are all in its bucket), then its cross-host part once over them: no pass of its own
    sums: list[pl.DataFrame] | None = None
    low, high = det.exfiltration_range(ctx)
    if "exfiltration" in names and spill.start <= low and high <= spill.end:
        sums = []
    frames = [
        timed(name, lambda name=name: det.DETECTORS[name](ctx))
        for name in names
        if name in CROSS_HOST and not (name == "exfiltration" and sums is not None)
    ]
    per_host = [name for name in names if name not in CROSS_HOST]
    # periodicity's window-wide spans (features.SpanBook): each bucket's run of a WINDOW_WIDE detector keeps its
    # pairs' stats and spans and finds nothing; one run after the buckets scores them all (no pass of its own)
    deferred: dict[str, dict] = {name: {} for name in per_host if name in WINDOW_WIDE}
    # the beacon detector's stats computed with the model's features' (FeatureJob.share_beacon): no bucket run
    shared = also.share_beacon(ctx) if also is not None and "beacon" in deferred else None
    if shared is not None:
        deferred["beacon"] = shared
        per_host = [name for name in per_host if name != "beacon"]
    # what detectors record on the context besides their candidates (a list of rows with an `addr`, e.g.
    # suppressed candidates): like the candidates, kept from the bucket that owns the address only
    log = getattr(ctx, "suppressed", None)
    for bucket in range(spill.buckets):
        hosts = spill.hosts(bucket)
        owned = set(hosts.to_list())
        # the bucket read once, its facts computed once, for all its detectors (when it fits in memory)
        facts = timed(
            "bucket read", lambda bucket=bucket: _in_memory_facts(spill, bucket, ctx.local, ctx.night)
        )
        shared: dict = {}  # what detectors of this bucket compute alike (DetectContext.shared)
        for name in per_host:
            # a detector not in WINDOW_WIDE that calls periodicity fails loudly (its book has nothing to give)
            book = SpanBook(deferred=deferred[name]) if name in deferred else SpanBook()
            context = BucketContext(ctx, spill, bucket, book, facts, shared)
            before = len(log) if log is not None else 0
            found = timed(name, lambda name=name, context=context: det.DETECTORS[name](context))
            if name not in deferred:
                frames.append(as_text(found).filter(pl.col("addr").is_in(hosts.implode())))
            if log is not None:
                log[before:] = [
                    row for row in log[before:] if row.get("addr") in owned and name not in deferred
                ]
        if sums is not None:
            context = BucketContext(ctx, spill, bucket, SpanBook(), facts)
            found = timed("exfiltration", lambda context=context: det.exfiltration_volumes(context))
            sums.append(as_text(found).filter(pl.col("src_addr").is_in(hosts.implode())))
        if also_add is not None:
            also_add(bucket, facts)
        del facts, shared
    if sums is not None:
        every = pl.concat(sums)
        frames.append(timed("exfiltration", lambda: det.exfiltration(ctx, every=every)))
    for name, parts in deferred.items():
        book = SpanBook(deferred=parts, final=True)
        frames.append(timed(name, lambda name=name, book=book: det.DETECTORS[name](replace(ctx, spans=book))))
    return pl.concat(frames) if frames else det._empty()


def _in_memory_facts(
    spill: Spill, bucket: int, local: list[str], night: tuple[int, int]
) -> pl.DataFrame | pl.LazyFrame:
    """The bucket's flows with their facts (with_flow_facts), in memory; when the bucket is too big to hold,
    a scan of them written once beside the spill (Spill.facts_file): its readers stream it."""
    frame = spill.frame(bucket)
    if frame is None:
        return spill.facts_file(bucket, local, night)
    facts = with_flow_facts(frame.lazy(), local, night, owned=spill.hosts(bucket)).collect()
    # who answered whom, once for every detector and the features (its window aggregates run at half the CPU
    # in memory than on polars' default streaming engine)
    return with_response(facts.lazy()).collect(engine="in-memory")


def sweep_range(ctx: det.DetectContext, names: list[str]) -> tuple[dt.datetime, dt.datetime]:
    """The flows the per-host detectors `names` read: the whole windows overlapping the sweep."""
    spans = [ctx.span(det._window_of(ctx.config, name)) for name in names if name not in CROSS_HOST]
    if not spans:
        return ctx.since, ctx.since
    return min(s for s, _ in spans), max(e for _, e in spans)


def feature_hosts(lake: Lake, start: dt.datetime, until: dt.datetime, local_networks: list[str]) -> list[str]:
    """The hosts features are computed for over [start, until): the local addresses among its flows."""
    return local_addresses(scan_flows(lake, start, until), local_networks)


@dataclass
class FeatureJob:
    """The model's features over a spill, one bucket at a time: `add` takes each bucket's flows (its in-memory
    facts over `local`, or None: streamed from the spill), `result` gives features.compute_features' rows. A
    sweep hands it to the rules' bucket loop (detect(also=...)), so that a bucket is read into memory and its
    facts computed once for both."""

    spill: Spill
    local: list[str]
    since: dt.datetime
    start: dt.datetime
    until: dt.datetime
    window_s: float
    history: dt.datetime | None
    night: tuple[int, int]
    timed: Timer
    parts: list[pl.DataFrame] = field(default_factory=list)
    # periodicity's stats and spans per bucket (features.SpanBook, deferred), scored once in result()
    periodicity: dict = field(default_factory=dict)
    # the beacon detector's periodicity stats and spans per bucket, computed with the features' (share_beacon)
    # for its one run after the buckets; None: the detector runs on each bucket itself
    beacon: dict | None = None
    beacon_rules: tuple[Beacon, tuple[dt.datetime, dt.datetime]] | None = None

    def add(self, bucket: int, facts: pl.DataFrame | pl.LazyFrame | None) -> None:
        within = (pl.col("ts_start") >= self.start) & (pl.col("ts_start") < self.until)
        rows = self.spill.source(bucket).filter(within) if facts is None else facts.lazy().filter(within)
        hosts = self.spill.hosts(bucket)
        book = SpanBook(deferred=self.periodicity, provided=self.beacon is not None)
        found = self.timed(
            "features",
            lambda: _features_of(rows, self.local, self.window_s, self.history, self.night, book, hosts),
        )
        self.parts.append(as_text(found).filter(pl.col("host").is_in(hosts.implode())))
        if self.beacon is not None:
            self.timed("beacon", lambda: self._periodicity(rows, hosts))

    def share_beacon(self, ctx: det.DetectContext) -> dict | None:
        """When the beacon detector's pairs are a part of the features' periodicity pairs (a day window,
        outside destinations only, at least as many connections, the same local hosts, its days inside the
        features' range), the stats of both are computed once per bucket (each pair's stats depend on its own
        flows only): the dict its final run scores (SpanBook(deferred=..., final=True)); else None."""
        c = ctx.config.detectors.beacon
        start, end = ctx.span(c.window)
        if not (
            float(c.window) == FEATURE_PERIOD_S
            and c.min_connections >= FEATURE_PERIOD_MIN_CONNECTIONS
            and c.external_only
            and set(ctx.local) == set(self.local)
            and self.start <= start
            and end <= self.until
        ):
            return None
        self.beacon, self.beacon_rules = {}, (c, (start, end))
        return self.beacon

    def _periodicity(self, rows: pl.LazyFrame, hosts: pl.Series) -> None:
        """One bucket's periodicity stats over its outside-bound connections, once, split into the features'
        (DNS and NTP aside) and the beacon detector's (its ports aside, its days, its minimum), each with the
        data spans of its own flows."""
        assert self.beacon is not None and self.beacon_rules is not None
        c, (start, end) = self.beacon_rules
        facts = (
            rows
            if "src_local" in rows.collect_schema()
            else with_flow_facts(rows, self.local, self.night, hosts)
        )
        # who answered whom per day, as the features and the beacon detector (a day window here) judge it
        outside = with_response(facts).filter(
            pl.col("src_owned") & ~pl.col("response") & ~pl.col("dst_local")
        )
        ours = ~pl.col("dst_port").is_in(FEATURE_PERIOD_IGNORED_PORTS)
        theirs = ~pl.col("dst_port").is_in(c.ignore_ports)
        in_days = (pl.col("ts_start") >= start) & (pl.col("ts_start") < end)
        stats, _ = periodicity_stats(outside, FEATURE_PERIOD_S, FEATURE_PERIOD_MIN_CONNECTIONS)
        stats, spans, beacon_spans = (
            as_text(part)
            for part in pl.collect_all(
                [
                    stats,
                    observed_spans(outside.filter(ours), FEATURE_PERIOD_S),
                    observed_spans(outside.filter(theirs & in_days), FEATURE_PERIOD_S),
                ],
                engine="streaming",
            )
        )
        features = self.periodicity.setdefault(0, ([], []))  # host_features' one periodicity call
        features[0].append(stats.filter(ours))
        features[1].append(spans)
        beacon = self.beacon.setdefault(0, ([], []))  # the beacon detector's one call
        in_window = (pl.col("window_start") >= start) & (pl.col("window_start") < end)
        beacon[0].append(stats.filter(theirs & in_window & (pl.col("connections") >= c.min_connections)))
        beacon[1].append(beacon_spans)

    def also(self, local: list[str]) -> Callable[[int, pl.DataFrame | pl.LazyFrame | None], None]:
        """`add` for a loop whose in-memory facts are over other local hosts (the rules'): facts of ours."""

        def add(bucket: int, facts: pl.DataFrame | pl.LazyFrame | None) -> None:
            if facts is not None and set(local) != set(self.local):
                ours = with_local_facts(facts.lazy(), self.local, self.spill.hosts(bucket))
                # in memory: once for the features' parts; a streamed bucket's file: as its readers stream it
                facts = ours.collect() if isinstance(facts, pl.DataFrame) else ours
            self.add(bucket, facts)

        return add

    def result(self) -> pl.DataFrame:
        found = _features_result(self.parts, self.since, self.window_s)
        # the pairs of every bucket scored against the window-wide spans: the stage features spans was
        # before this, a pass over the window's flows of its own
        scored = self.timed(
            "features",
            lambda: with_periodicity(found, SpanBook(deferred=self.periodicity, final=True)),
        )
        return scored.sort("host", "window_start")


def feature_job(
    lake: Lake,
    since: dt.datetime,
    until: dt.datetime,
    local_networks: list[str],
    window_s: float,
    history_start: dt.datetime | None,
    night: tuple[int, int],
    spill: Spill,
    timed: Timer = no_timer,
) -> FeatureJob:
    """A FeatureJob over `spill`, which must cover the range and every local host."""
    start = utc(history_start) if history_start is not None else utc(since)
    local = spill.feature_hosts.get((start, utc(until))) or timed(
        "features hosts", lambda: feature_hosts(lake, start, until, local_networks)
    )
    if start < spill.start or utc(until) > spill.end or not set(local) <= set(spill.owners["addr"]):
        raise RuntimeError(
            f"the spill holds {spill.start} to {spill.end}, features need {start} to {until} and their "
            "hosts: spill what both read (sweep.spill_local)"
        )
    history = start if history_start is not None else None
    return FeatureJob(spill, local, utc(since), start, utc(until), window_s, history, night, timed)


def features(
    lake: Lake,
    since: dt.datetime,
    until: dt.datetime,
    local_networks: list[str],
    window_s: float,
    history_start: dt.datetime | None,
    night: tuple[int, int],
    buckets: int | None = None,
    spill: Spill | None = None,
    timed: Timer = no_timer,
) -> pl.DataFrame:
    """features.compute_features, bucket by bucket when the range holds more flows than one bucket takes (or
    from `spill`, a sweep's, which must cover the range and every local host): the same rows (per (host,
    window), sorted by host and window). `timed(stage, fn)` times the steps (features spans, features)."""
    start = utc(history_start) if history_start is not None else utc(since)
    if spill is None:
        buckets = buckets or bucket_count(count_rows(lake, start, until))
        if buckets <= 1:
            local = timed("features hosts", lambda: feature_hosts(lake, start, until, local_networks))
            history = start if history_start is not None else None
            flows = scan_flows(lake, start, until)
            part = timed("features", lambda: _features_of(flows, local, window_s, history, night, None))
            return _features_result([part], since, window_s)
    with ExitStack() as stack:
        if spill is None:
            local = timed("features hosts", lambda: feature_hosts(lake, start, until, local_networks))
            spill = stack.enter_context(spill_flows(lake, start, until, local, buckets or 1))
            spill.feature_hosts[start, utc(until)] = local
        job = feature_job(lake, since, until, local_networks, window_s, history_start, night, spill, timed)
        for bucket in range(spill.buckets):
            # in memory (read once, facts computed once for all the features' parts) when it fits
            job.add(
                bucket,
                timed("bucket read", lambda bucket=bucket: _in_memory_facts(spill, bucket, job.local, night)),
            )
        return job.result()


def _features_result(parts: list[pl.DataFrame], since: dt.datetime, window_s: float) -> pl.DataFrame:
    return (
        pl.concat(parts)
        .filter(pl.col("window_start") >= floor_time(since, window_s))
        .sort("host", "window_start")
    )


def _features_of(
    flows: pl.LazyFrame,
    local: list[str],
    window_s: float,
    history: dt.datetime | None,
    night: tuple[int, int],
    spans: SpanBook | None,
    owned: pl.Series | None = None,
) -> pl.DataFrame:
    # a frame that already has its facts (an in-memory bucket's) keeps them
    facts = flows if "src_local" in flows.collect_schema() else with_flow_facts(flows, local, night, owned)
    return host_features(facts, window_s, history_start=history, sequential=True, spans=spans).collect(
        engine="streaming"
    )
