"""The only writer of the lake. A lake is a directory holding one Delta Lake table per dataset (schema.DATASETS,
plus `_ingest`, one manifest row per ingested source), the partitioned ones by UTC day
(`flows/date=2024-03-12/part-<id>.parquet`, `flows/_delta_log/`).

Guarantees: what a reader sees is what the transaction log lists, so opening the lake never lists directories
or opens every file, and a file joins the lake only in the commit that names it (written `*.tmp`, fsynced,
renamed, then committed; several files and partitions in one atomic commit). A source's files are named after
its content hash and a manifest row follows its commit, so re-ingesting it is skipped: rows are neither lost
nor doubled, whatever moment a run was killed at. Rewrites (attribution, compaction, expiry, derived tables)
remove and add files in one commit under a per-table lock; appends never wait for them.
Day partitions are compacted once they hold COMPACT_MIN_FILES small files; removed files stay on disk for
RETAIN_REMOVED (readers that started before a rewrite, and time travel) until `vacuum`, or until the commit that
removed them leaves the log (retire_log, after compaction and each rewrite of a derived table).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from deltalake.transaction import (
    AddAction,
    PostCommitHookProperties,
    RemoveAction,
    create_table_with_add_actions,
)

from tracepipe import DEFAULT_LAKE, bloom, fsutil
from tracepipe.address_text import address_text, is_integers, one_type
from tracepipe.errors import LakeError, UsageError
from tracepipe.schema import DATASETS, INGEST_MANIFEST, REJECTS, Dataset, null_column
from tracepipe.units import time_window, utc_text

MANIFEST_DIR = "_ingest"
LOCK_DIR = "_locks"
# How long a command waits for a table's lock before it gives up (exit 4, naming the holder): a holder stopped
# (SIGSTOP, a hung NFS mount, a process under a memory limit stuck in a futex) kept every later command and
# the collector's commits waiting for ever, saying nothing (failure-injection review, session 38). Set
# TRACEPIPE_LOCK_WAIT (seconds) for longer rewrites; after LOCK_NOTICE_S a waiter says on stderr whom it waits for.
LOCK_WAIT_ENV = "TRACEPIPE_LOCK_WAIT"
LOCK_WAIT_S = 900.0
LOCK_NOTICE_S = 10.0
_lock_log = logging.getLogger("tracepipe.lake")


def lock_wait_seconds() -> float:
    """LOCK_WAIT_S, or TRACEPIPE_LOCK_WAIT when it is a number of seconds >= 0."""
    text = os.environ.get(LOCK_WAIT_ENV, "").strip()
    try:
        value = float(text) if text else LOCK_WAIT_S
    except ValueError:
        raise UsageError(f"{LOCK_WAIT_ENV}={text[:40]!r} is no number of seconds") from None
    if not 0 <= value < float("inf"):
        raise UsageError(f"{LOCK_WAIT_ENV}={text[:40]!r} is no number of seconds >= 0")
    return value


def _lock_holder(handle: Any) -> str:
    """What the lock file says of its holder (written by whoever took it), printable and short."""
    try:
        handle.seek(0)
        text = handle.read(200)
    except (OSError, ValueError):
        return "another process"
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text or "another process"


DAMAGED_DIR = "_damaged"  # files `repair` took out of the lake (unreadable, replaced), kept as evidence
PARTITION = "date"  # the partition column of day-partitioned tables: 'YYYY-MM-DD', UTC
ROW_GROUP_ROWS = 1_000_000
# A day partition is compacted when it holds this many files of fewer than ROW_GROUP_ROWS rows (a collector
# committing every 5 minutes: every 80 minutes, into one file per row group).
COMPACT_MIN_FILES = 16
# How long files removed by a rewrite stay on disk (readers that opened the lake before, time travel).
RETAIN_REMOVED = dt.timedelta(days=7)
# How long a table's log keeps its commits (TABLE_CONFIG's delta.logRetentionDuration): `--as-of` reaches no
# further back
LOG_RETENTION = dt.timedelta(days=7)
# Every open replays the JSON commits after the last checkpoint (~0.3 ms each, measured on a year of VM
# events: 31 ms to open at 70 commits after it, 10 ms at none), and a checkpoint costs about one open of the
# table to write: so one every 20 commits. Tables made with Delta's default of 100 get theirs from Lake.commit.
CHECKPOINT_INTERVAL = 20
STATS_COLUMNS = "delta.dataSkippingNumIndexedCols"
TABLE_CONFIG = {
    # a reader replays at most 19 JSON commits after the last checkpoint
    "delta.checkpointInterval": str(CHECKPOINT_INTERVAL),
    # how far back `--as-of` reaches: as far as vacuum keeps removed files (RETAIN_REMOVED); delta-rs lists the
    # log directory on every open, so its entries, 288+ a day per table, are what this bounds
    "delta.logRetentionDuration": f"interval {LOG_RETENTION.days} days",
    # tombstones in checkpoints (every open reads them); vacuum uses its own retention (RETAIN_REMOVED) over the
    # whole directory, so a day of them is enough
    "delta.deletedFileRetentionDuration": "interval 1 days",
    # readers see the statistics of every column (file_stats writes them all), not Delta's default first 32:
    # flows has more, and the null counts of the later ones tell files apart (query.scan_sql: which files have
    # every column; query.has_vm_keys: which flow files carry vm keys). Set on older tables by _evolve
    STATS_COLUMNS: "-1",
}
# a table's commit (00000000000000000042.json) or checkpoint (classic or in parts) in its _delta_log
_LOG_FILE = re.compile(r"^(\d{20})\.(json|checkpoint(?:\.\d{10}\.\d{10})?\.parquet)$")
# Why no Delta application transaction ids for idempotence: delta-rs 1.6 keeps every (appId, version) in every
# checkpoint forever (setTransactionRetentionDuration is not applied), so one id per source made opening a table
# grow with the number of sources ever ingested. Data files are named part-<first 16 hex of the source's content
# hash>-<random>.parquet instead; see Lake.already_ingested and IngestWriter.
# a data file as tracepipe names them, relative to its table: what Lake.retire_log may delete
_DATA_FILE = re.compile(r"^(?:date=\d{4}-\d{2}-\d{2}/)?part-[0-9A-Za-z_-]+\.parquet$")
# a commit of the log larger than this is not read by retire_log (its removed files are left to vacuum)
LOG_COMMIT_BYTES = 1 << 28
_SOURCE_FILE = re.compile(r"^part-([0-9a-f]{64})-[0-9a-f]{8}\.parquet$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _file_name(relative: str) -> str:
    """Path(relative).name of a log entry's path, without making a Path (once per file of every listing)."""
    name = relative.rpartition("/")[2]
    return name if name not in ("", ".") else Path(relative).name


def source_key(content_hash: str) -> str:
    """The key a source's files are named by: its sha256 content hash (other ids are hashed to one)."""
    return content_hash if _SHA256.match(content_hash) else hash_bytes(content_hash.encode())


# an append that a concurrent rewrite made conflict is committed again on the latest version, up to this often
APPEND_CONFLICT_RETRIES = 20
UPGRADED = "part-upgraded-"  # prefix of the conformed copies `upgrade` writes before its commit
# (row groups of MANIFEST_GROUP_ROWS: a lookup of one source reads one group of each merged file, ~0.5 MB, not
# the file: a collector commits ~100,000 sources a year, a manifest of 10 years 1 M rows; _manifest_has)
MANIFEST_GROUP_ROWS = 8_192
# (a Bloom filter on `source`: has_source reads the one group of each merged file that may name a path)
MANIFEST = Dataset(
    MANIFEST_DIR, INGEST_MANIFEST, None, ("dataset", "content_hash"), MANIFEST_GROUP_ROWS, ("source",)
)


def default_lake_path() -> Path:
    return Path(os.environ.get("TRACEPIPE_LAKE", DEFAULT_LAKE))


class HashStopped(Exception):
    """hash_file was told to stop (its caller gave up on the file) before it reached the end."""


def hash_file(path: Path, chunk: int = 1 << 22, stop: threading.Event | None = None) -> str:
    """sha256 of a file's bytes, streamed: the identity of a source in the manifest. `stop`: HashStopped as
    soon as it is set (checked between chunks of 4 MB: a few ms), so that an abandoned file is not read on."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            if stop is not None and stop.is_set():
                raise HashStopped(str(path))
            digest.update(block)
    return digest.hexdigest()


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_parquet_files(
    paths: Iterable[Path | str], schema: pa.Schema, dictionary: Collection[str] = ()
) -> list[pa.Table]:
    """Each file's columns of `schema`, conformed to it (a column the file lacks, written before the column
    existed, is null), in the given order. Files are read side by side in a pool of one thread per core, each
    read single-threaded: a lake's files are small (one hour or day of a source), so Arrow's threads within one
    file cost more in hand-offs than they decode (a year of vm_events, 369 files: ~10 s wall on two cores
    against ~19 s one after the other, the same CPU). A file that cannot be read raises, as pq.read_table does.

    `dictionary`: text columns of few distinct values kept as TEXT_DICTIONARY (each file's own dictionary, as
    Parquet stores it): never made into one string per row. A year of vm_events read whole with its nine
    repetitive columns so: 7.5 s CPU instead of 22.6, 2.2 GB instead of 3.3 (session 22)."""
    paths = list(paths)
    cores = fsutil.cores()
    side_by_side = len(paths) > cores  # (else each file with Arrow's own threads, one after the other)
    coded = [c for c in dictionary if c in schema.names and pa.types.is_string(schema.field(c).type)]
    if coded:
        schema = pa.schema(
            [f.with_type(TEXT_DICTIONARY) if f.name in coded else f for f in schema], metadata=schema.metadata
        )

    def one(path: Path | str) -> pa.Table:
        with contextlib.closing(pq.ParquetFile(path)) as file:
            have = set(file.schema_arrow.names)
            columns = [c for c in schema.names if c in have]
            # (only text leaves: Arrow refuses to be asked for a column the file lacks, or a struct)
            text = _text_leaves(file.metadata.schema) if coded else set()
            as_dictionary = [c for c in coded if c in text]
            if not as_dictionary:
                return conform(file.read(columns=columns, use_threads=not side_by_side), schema)
        with contextlib.closing(
            pq.ParquetFile(path, metadata=file.metadata, read_dictionary=as_dictionary)
        ) as file:  # (the footer read once)
            table = file.read(columns=columns, use_threads=not side_by_side)
        if not all(_valid_dictionary(table.column(c)) for c in as_dictionary if c in table.column_names):
            # (a dictionary page naming a value twice, as a hand-made file may: Arrow keeps one and leaves
            # the indices past its end. Read as strings, the values are right)
            with contextlib.closing(pq.ParquetFile(path, metadata=file.metadata)) as plain:
                table = plain.read(columns=columns, use_threads=not side_by_side)
        return conform(table, schema)

    if not side_by_side:
        return [one(p) for p in paths]
    return _in_threads(one, paths, cores, "lake-read")


def _text_leaves(parquet_schema: pq.ParquetSchema) -> set[str]:
    """Top-level columns stored as one BYTE_ARRAY leaf of their own name: those read_dictionary can take."""
    out = set()
    for i in range(len(parquet_schema)):
        column = parquet_schema.column(i)
        if column.path == column.name and column.physical_type == "BYTE_ARRAY":
            out.add(column.name)
    return out


def _valid_dictionary(column: pa.ChunkedArray) -> bool:
    """Every index of a dictionary column points into its dictionary."""
    if not pa.types.is_dictionary(column.type):
        return True
    try:
        for chunk in column.chunks:
            chunk.validate(full=True)
    except pa.ArrowException:
        return False
    return True


def _in_threads(
    work: Callable[..., Any], items: list[Any], threads: int, name: str, *more: list[Any]
) -> list[Any]:
    """[work(item, ...) for each item] on `threads` threads, results in the items' order. The first error is
    raised once the calls already running have returned, and the calls not started yet are cancelled (a pool's
    `with` block would run every queued call first: a hundred more files to write after a full disk)."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    try:
        futures = [pool.submit(work, *args) for args in zip(items, *more, strict=True)]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def conform(table: pa.Table, schema: pa.Schema, text_as_dictionary: bool = False) -> pa.Table:
    """Reorder, add missing nullable columns as nulls, and cast to the declared schema.

    text_as_dictionary: string columns become dictionary<int32, string> (the in-memory form the writer
    sorts and writes fast); Parquet files store them as plain strings all the same. A string column given as
    integers holds addresses (address_text.is_integers; netflow.decode_walked `ipv4_as_integers`): formatted,
    or kept as integers with text_as_dictionary, for PartFile to format once per row group."""
    columns = []
    fields = []
    for fld in schema:
        if fld.name in table.column_names:
            column = table.column(fld.name)
        else:
            column = null_column(table.num_rows, fld.type)
        if pa.types.is_string(fld.type) and is_integers(column.type):
            if not text_as_dictionary:
                column = address_text(column)[0].cast(fld.type)
            fld = pa.field(fld.name, column.type, fld.nullable)
        elif text_as_dictionary and pa.types.is_string(fld.type):
            column = _text_dictionary(column)
            fld = pa.field(fld.name, column.type, fld.nullable)
        elif fld.type == TEXT_DICTIONARY and column.type != fld.type:  # (read_parquet_files' `dictionary`)
            if is_integers(column.type):  # (addresses stored as integers: their text, as a plain read gives)
                column = address_text(column)[0].cast(pa.string())
            column = _text_dictionary(column)
        elif column.type != fld.type:
            column = column.cast(fld.type)
        columns.append(column)
        fields.append(fld)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=schema.metadata))


TEXT_DICTIONARY = pa.dictionary(pa.int32(), pa.string())


def _text_dictionary(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    if column.type == TEXT_DICTIONARY:
        return column
    if pa.types.is_dictionary(column.type):
        return column.cast(TEXT_DICTIONARY)
    return pc.dictionary_encode(column.cast(pa.string()))


def _writer_schema(
    schema: pa.Schema, first: pa.Table | None = None, plain: set[str] | None = None
) -> pa.Schema:
    """The in-memory types a file's row groups are written from: text dictionary-encoded, but for text columns
    null in the whole `first` row group, which stay plain strings: pyarrow writes a null string column ~23%
    cheaper than a null dictionary one, and the bytes are the same (issue 17: 15 of flows' 26 null columns);
    and for the mostly distinct ones (`plain`: _mostly_distinct), written plain."""
    plain = plain or set()
    fields = []
    for f in schema:
        if pa.types.is_string(f.type):
            null = first is not None and first.column(f.name).null_count == first.num_rows
            f = pa.field(f.name, f.type if null or f.name in plain else TEXT_DICTIONARY, f.nullable)
        fields.append(f)
    return pa.schema(fields, metadata=schema.metadata)


def _mostly_distinct(first: pa.Table | None) -> set[str]:
    """The dictionary-encoded text columns of a file's first row group whose values are mostly distinct (more
    distinct values than half its rows: VM ids, names and addresses in vm_leases and vms, message ids in
    vm_events). pyarrow writes such a column from its Arrow dictionary as a Parquet dictionary as big as the
    column, then its indices; written as plain strings (PLAIN + zstd) a vm_leases file of 32 k rows took
    19 ms instead of 101 ms and 1.0 MB instead of 2.2 MB (session 16)."""
    if first is None or first.num_rows == 0:
        return set()
    plain = set()
    for name, column in zip(first.column_names, first.columns, strict=True):
        if pa.types.is_dictionary(column.type) and column.num_chunks:
            if max(len(chunk.dictionary) for chunk in column.chunks) * 2 > first.num_rows:
                plain.add(name)
    return plain


def _as_written(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A row group in the writer's types (_writer_schema): text columns the writer keeps plain."""
    if table.schema == schema:
        return table
    columns = []
    for column, f in zip(table.columns, schema, strict=True):
        if column.type != f.type:
            column = (
                null_column(len(column), f.type) if column.null_count == len(column) else column.cast(f.type)
            )
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def _day_numbers(column: pa.ChunkedArray) -> np.ndarray:
    """UTC day number (days since 1970-01-01) of each timestamp (0 where nulls make the column non-integer)."""
    micros = pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
    return micros // 86_400_000_000 if micros.dtype.kind == "i" else np.zeros(len(micros), np.int64)


def _day_name(day_number: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=int(day_number))).isoformat()


def partition_days(column: pa.Array | pa.ChunkedArray) -> list[str]:
    """The day partitions that rows with these values of their table's partition column are written to (the
    routing of a day-partitioned write): where a reader looks for those rows, and nowhere else."""
    return [_day_name(day) for day in np.unique(_day_numbers(column))]


def sort_indices(table: pa.Table, keys: tuple[str, ...], ranked: frozenset[str] = frozenset()) -> pa.Array:
    """Row order by `keys` ascending, nulls last (as Table.sort_by). Text keys are ranked through their
    distinct values and the ranks of all keys packed into one int64 when they fit (else numpy lexsort):
    Arrow's multi-key sort on a text column is ~10x slower, and every flows row group is sorted by
    (src_addr, ts_start). Stable, as every path here: rows with equal keys keep their input order (readers
    depend on the key order only; the order of ties was quicksort's before issue 17). `ranked`: dictionary
    columns whose dictionary is distinct values in ascending order already (address_text.ipv4_text_sorted)."""
    ranks: list[np.ndarray] = []  # per key, an integer >= 0 per row, nulls largest
    for name in keys:
        column = table.column(name).combine_chunks()
        if (
            pa.types.is_dictionary(column.type)
            or pa.types.is_string(column.type)
            or pa.types.is_large_string(column.type)
        ):
            encoded = column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column)
            if name in ranked and pa.types.is_dictionary(column.type):
                dense = np.arange(1, len(encoded.dictionary) + 1)
            else:
                dense = pc.rank(encoded.dictionary, sort_keys="ascending", tiebreaker="dense").to_numpy()
            lookup = np.append(
                dense.astype(np.int64) - 1, len(dense)
            )  # equal strings share a rank; nulls last
            indices = pc.fill_null(encoded.indices, len(dense)).to_numpy(zero_copy_only=False)
            ranks.append(lookup[indices])
        elif pa.types.is_integer(column.type) or pa.types.is_timestamp(column.type):
            values = pc.cast(column, pa.int64())
            numbers = pc.fill_null(values, 0).to_numpy(zero_copy_only=False)
            low = numbers.min() if len(numbers) else 0
            shifted = numbers - low  # >= 0; may overflow only for absurd spans, checked below
            if (shifted < 0).any():
                return pc.sort_indices(table, sort_keys=[(c, "ascending") for c in keys])
            nulls = ~pc.is_valid(values).to_numpy(zero_copy_only=False)
            ranks.append(np.where(nulls, shifted.max(initial=0) + 1, shifted))
        else:
            return pc.sort_indices(table, sort_keys=[(c, "ascending") for c in keys])
    bits = [int(r.max(initial=0)).bit_length() for r in ranks]
    if sum(bits) <= 63:
        packed = np.zeros(table.num_rows, dtype=np.int64)
        for rank, width in zip(ranks, bits, strict=True):
            packed = (packed << width) | rank
        if len(ranks) > 1 and bits[0] <= 32:
            return pa.array(_grouped_argsort(packed, ranks[0], bits[0]))
        return pa.array(np.argsort(packed, kind="stable"))
    return pa.array(np.lexsort(ranks[::-1]))


def _grouped_argsort(packed: np.ndarray, first: np.ndarray, width: int) -> np.ndarray:
    """np.argsort(packed, kind="stable") where `first` (< 2**width, width <= 32) is packed's top key: rows are
    grouped by it first with numpy's radix sort (stable argsort of 16-bit integers, one pass per 16 bits), then
    timsort orders the packed keys, which are then in runs of groups already in order: 3.6x faster than
    quicksort on a row group of flows sorted by (src_addr, ts_start) (issue 17: 9.6 ms instead of 34 ms for
    491 k rows of 65 k addresses), and no slower than plain timsort when a group is the whole row group."""
    order = np.argsort(first.astype(np.uint16), kind="stable")  # the low 16 bits (all when width <= 16)
    if width > 16:
        order = order[np.argsort((first[order] >> 16).astype(np.uint16), kind="stable")]
    return order[np.argsort(packed[order], kind="stable")]


def _dataset(name: str) -> Dataset:
    if name == MANIFEST_DIR:
        return MANIFEST
    try:
        return DATASETS[name]
    except KeyError:
        raise LakeError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def table_schema(dataset: Dataset) -> pa.Schema:
    """The Delta table's schema: the dataset's columns, plus the `date` partition column (not stored in the
    files; its value is in the path and in the log)."""
    if dataset.partition_ts is None:
        return dataset.schema
    return dataset.schema.append(pa.field(PARTITION, pa.string()))


_EARLIEST = dt.datetime.min.replace(tzinfo=dt.UTC)
_LATEST = dt.datetime.max.replace(tzinfo=dt.UTC)


def _time_bounds(add: dict[str, Any], column: str) -> tuple[dt.datetime, dt.datetime]:
    """The (min, max) of `column` an add action's statistics give (whole time when they do not)."""
    try:
        stats = json.loads(add.get("stats") or "{}")
        low, high = stats["minValues"][column], stats["maxValues"][column]
        first, last = (dt.datetime.fromisoformat(t.replace("Z", "+00:00")) for t in (low, high))
        first, last = (t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC) for t in (first, last))
        return first, last + dt.timedelta(milliseconds=1)  # (kept to the millisecond)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):  # (planted statistics too)
        return _EARLIEST, _LATEST


def _stat_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def file_stats(meta: pq.FileMetaData) -> str:
    """Delta per-file statistics (numRecords, nullCount, minValues, maxValues) from a Parquet footer: what the
    log carries so that readers prune files and count rows without opening them."""
    nulls: dict[str, int] = {}
    lows: dict[str, Any] = {}
    highs: dict[str, Any] = {}
    unknown: set[str] = set()
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            name = column.path_in_schema
            if "." in name:  # list elements and nested fields: no statistics
                continue
            stats = column.statistics
            if stats is None or not stats.has_null_count:
                unknown.add(name)
                continue
            nulls[name] = nulls.get(name, 0) + stats.null_count
            if stats.has_min_max and name not in unknown:
                low, high = stats.min, stats.max
                lows[name] = low if name not in lows else min(lows[name], low)
                highs[name] = high if name not in highs else max(highs[name], high)
            elif group.num_rows > stats.null_count:
                unknown.add(name)
    for name in unknown:
        nulls.pop(name, None)
        lows.pop(name, None)
        highs.pop(name, None)
    return json.dumps(
        {
            "numRecords": meta.num_rows,
            "nullCount": nulls,
            "minValues": {k: _stat_value(v) for k, v in lows.items()},
            "maxValues": {k: _stat_value(v) for k, v in highs.items()},
        }
    )


# text columns stored plain (+ zstd) instead of dictionary-encoded: a flow's two addresses. Measured on 1.1 M
# flow rows sorted as the lake sorts them, best of 5 (issue 17): with 300 / 5 000 / 50 000 / ~1 M distinct
# addresses the files were 5% / 3% / 1% / 0.4% SMALLER plain and the Parquet encoding 3-11% cheaper: zstd
# finds the repeats of sorted addresses itself, and a dictionary of varied ones outgrows its page and is dropped.
PLAIN_TEXT = frozenset({"src_addr", "dst_addr"})


def _parquet_options(dataset: Dataset, first: pa.Table | None = None) -> dict[str, Any]:
    """How every lake file is encoded (measured on 1 M softflowd flow rows, issue 17): zstd (level 1, pyarrow's
    default; -1..-7 cost 20-65% more bytes for <10% less CPU); text dictionary-encoded but for PLAIN_TEXT;
    integer and timestamp columns DELTA_BINARY_PACKED (a standard Parquet encoding that DuckDB, polars, pyarrow
    and Spark read: 11% smaller files and ~15% less CPU than plain + zstd); 64 k rows per write batch instead
    of 1 024 (statistics and encoders run per batch: ~20% less CPU, same bytes). Min/max statistics stay on
    every column (4 MB pages, 256 k batches, no page index, no statistics on the counters: all within 2%).

    `first`: the file's first row group, given when a source's files are written (DayParts: a source's format
    fixes which columns it fills). Columns null in all of it are stored uncompressed (a null column's pages are
    a few bytes of levels, which zstd only makes bigger: ~20% less CPU for them, files ~0.06% smaller), and
    integer columns holding one value in all of it PLAIN (~35% less CPU than DELTA_BINARY_PACKED for them, zstd
    shrinks either to the same bytes). Measured on a 246 k-row flows row group of softflowd (26 null columns,
    5 constant integer ones): write_table 7% less CPU, 3.3 kB smaller (issue 17). Should a later row group fill
    such a column, it is stored less compactly until compaction or attribution rewrites the file."""
    fields = list(dataset.schema)
    options: dict[str, Any] = {
        "compression": "zstd",
        "use_dictionary": [f.name for f in fields if pa.types.is_string(f.type) and f.name not in PLAIN_TEXT],
        "column_encoding": {
            f.name: "DELTA_BINARY_PACKED"
            for f in fields
            if pa.types.is_integer(f.type) or pa.types.is_timestamp(f.type)
        },
        "write_batch_size": 64 * 1024,
    }
    if first is not None and first.num_rows:
        null = {f.name for f in fields if first.column(f.name).null_count == first.num_rows}
        options["compression"] = {f.name: "none" if f.name in null else "zstd" for f in fields}
        for f in fields:
            if pa.types.is_integer(f.type) and f.name not in null:
                column = first.column(f.name)
                low_high = pc.min_max(column)
                if column.null_count == 0 and low_high["min"] == low_high["max"]:
                    options["column_encoding"][f.name] = "PLAIN"
    return options


def _combined(tables: list[pa.Table], taken: bool = False) -> pa.Table:
    """The tables (one schema) as one table of one chunk per column. A column null in every table is made
    once instead of copied (flows: 26 of 47 columns are null for a plain NetFlow exporter; their concatenation
    was ~a third of the row group's concatenation cost, issue 17). `taken`: every column will be taken in
    a new order (sorted), so columns of fixed-width values stay in their chunks: Arrow takes from chunks
    without joining them first, and the join was a copy of the row group for nothing (issue 17: ~30% less
    CPU for joining and taking them); dictionary columns are joined all the same (one dictionary each)."""
    rows = sum(t.num_rows for t in tables)
    columns = []
    for i in range(tables[0].num_columns):
        chunks = [t.column(i) for t in tables]
        chunks = one_type(chunks)  # addresses as integers of both families, or as integers and as text
        if all(c.null_count == len(c) for c in chunks):
            columns.append(null_column(rows, chunks[0].type))
            continue
        column = pa.chunked_array([a for c in chunks for a in c.chunks], chunks[0].type)
        if not taken or pa.types.is_dictionary(column.type) or column.num_chunks == 1:
            column = column.combine_chunks()
        columns.append(column)
    fields = [pa.field(f.name, c.type, f.nullable) for f, c in zip(tables[0].schema, columns, strict=True)]
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=tables[0].schema.metadata))


def _same_in_any_order(column: pa.ChunkedArray) -> bool:
    """Whether a row group's column needs no reordering: nulls only, or one text value and no null (the
    exporter and source of a single-exporter file). Cheap checks; other columns are simply taken."""
    if column.null_count == len(column):
        return True
    if column.null_count == 0 and pa.types.is_dictionary(column.type) and column.num_chunks == 1:
        return len(column.chunk(0).dictionary) == 1
    return False


class RowGroupWriter:
    """Two threads that sort (PartFile._sorted_group) and write (PartFile._write_group) row groups while the
    caller decodes the next rows: Arrow's sort, take, encoding and compression and numpy's argsort release the
    GIL, so a single process uses its second core (issue 17: an ingest below the decode workers' size sorted and
    wrote each row group, ~65% of its work, while its decoding waited; one thread for both was then the longest
    of the two). Row groups go through both in the order given: at most one being sorted and one being written
    for all the files sharing it, so memory grows by two row groups, not two per day. An error of either thread
    is raised by the next submit() or wait()."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._sorting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="row-groups-sort")
        self._writing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="row-groups-write")
        self._sorted: Any = None  # the last sorting stage (a future)
        self._written: Any = None  # the last write (a future); set by the sorting thread

    def submit(self, sort: Callable[[Any], Any], write: Callable[[Any], None], pending: Any) -> None:
        """sort(pending) in the first thread, then write(its result) in the second, after what came before."""
        last, self._sorted = self._sorted, None
        if last is not None:
            last.result()
        self._sorted = self._sorting.submit(self._stage, sort, write, pending)

    def _stage(self, sort: Callable[[Any], Any], write: Callable[[Any], None], pending: Any) -> None:
        table = sort(pending)
        del pending
        last, self._written = self._written, None
        if last is not None:  # one write at a time, in order (and its error raised here, then to the caller)
            last.result()
        self._written = self._writing.submit(write, table)

    def wait(self) -> None:
        """Until every row group given is written; raises the first error of either thread."""
        last, self._sorted = self._sorted, None
        try:
            if last is not None:
                last.result()
        finally:
            written, self._written = self._written, None
            if written is not None:
                written.result()

    def shutdown(self) -> None:
        try:
            self.wait()
        finally:
            self._sorting.shutdown(wait=True)
            self._writing.shutdown(wait=True)


class PartFile:
    """One Parquet file of a dataset being written: rows buffered up to a row group, each row group sorted by
    the dataset's sort key (min/max statistics let readers skip), text dictionary-encoded in memory and stored
    as plain strings. `close()` fsyncs and renames the temp file and returns the Delta add action; until the
    commit that names it, the file is not part of the lake. `name(stem)` before `close()` gives the file
    another final name (the temp file keeps the first one): a source's content hash, known only at the end."""

    def __init__(
        self,
        root: Path,
        dataset: Dataset,
        day: str | None,
        stem: str,
        row_group_rows: int = ROW_GROUP_ROWS,
        layout_from_first: bool = False,
        behind: RowGroupWriter | None = None,
    ) -> None:
        self.dataset = dataset
        self.behind = behind  # the thread that sorts and writes row groups, if any (else the caller's)
        # encode columns after what the first row group holds (_parquet_options `first`): a source's files
        self.layout_from_first = layout_from_first
        self.day = day
        self.row_group_rows = row_group_rows
        self.root = root
        self.name(stem)
        self.tmp = self.path.with_name(self.path.name + fsutil.TMP_SUFFIX)
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None

    def name(self, stem: str) -> None:
        """The file's final name (<stem>.parquet in its day's folder), taken at close()."""
        self.relative = (f"{PARTITION}={self.day}/" if self.day is not None else "") + f"{stem}.parquet"
        self.path = self.root / self.relative

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(conform(table, self.dataset.schema, text_as_dictionary=True))
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        if self.behind is not None:
            self.behind.submit(self._sorted_group, self._write_group, pending)
        else:
            self._write_group(self._sorted_group(pending))

    def _sorted_group(self, pending: list[pa.Table]) -> pa.Table:
        """`pending` as one row group: addresses as text, sorted by the dataset's key (in the RowGroupWriter's
        first thread when there is one)."""
        table = _combined(pending, taken=bool(self.dataset.sort_by))  # one dictionary per text column
        pending.clear()  # the callers' references to the list keep its batches alive through the sort otherwise
        # addresses kept as integers (conform): each distinct one formatted once for the row group, the sort
        # keys' in text order where they can be, so that their dictionary index is their rank (sort_indices)
        ranked = set()
        for fld in self.dataset.schema:
            if pa.types.is_string(fld.type) and is_integers(table.column(fld.name).type):
                i = table.schema.get_field_index(fld.name)
                text, in_order = address_text(table.column(i), fld.name in self.dataset.sort_by)
                table = table.set_column(i, fld.name, text)
                if in_order:
                    ranked.add(fld.name)
        if self.dataset.sort_by:
            order = sort_indices(table, self.dataset.sort_by, frozenset(ranked))
            # column by column, each unsorted column freed once its sorted copy exists: the peak is the row
            # group plus one column, not two row groups
            schema, columns = table.schema, table.columns
            del table
            for i, column in enumerate(columns):
                if not _same_in_any_order(column):
                    columns[i] = column.take(order)
                del column
            table = pa.Table.from_arrays(columns, schema=schema)
        return table

    def _write_group(self, table: pa.Table) -> None:
        """Write one sorted row group (in the RowGroupWriter's second thread when there is one)."""
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            plain = _mostly_distinct(table)
            self._schema = _writer_schema(self.dataset.schema, table, plain)
            options = _parquet_options(self.dataset, table if self.layout_from_first else None)
            options["use_dictionary"] = [c for c in options["use_dictionary"] if c not in plain]
            if self.dataset.bloom_filters and table.num_rows > 1:  # (a file of one row: its statistics do)
                # sized for a full group of distinct values, 1% false positives: 16 kB a group of 8,192 (+3% bytes)
                rows = min(self.row_group_rows, self.dataset.group_rows or self.row_group_rows)
                sized = {"ndv": max(min(table.num_rows, rows), 1), "fpp": 0.01}
                options["bloom_filter_options"] = {c: sized for c in self.dataset.bloom_filters}
            # store_schema=False: every reader sees the text columns as the plain strings schema.py declares
            self._writer = pq.ParquetWriter(self.tmp, self._schema, store_schema=False, **options)
        group = min(self.row_group_rows, self.dataset.group_rows or self.row_group_rows)
        self._writer.write_table(_as_written(table, self._schema), row_group_size=group)
        self.rows += table.num_rows

    def close(self) -> AddAction | None:
        """Finish the file; None when no row was written (no file)."""
        self._flush()
        if self.behind is not None:
            self.behind.wait()  # its last row group written (or its error raised here)
        if self._writer is None:
            return None
        with fsutil.replacing(self.path, tmp=self.tmp):  # fsync, rename over, fsync the directory
            self._writer.close()
            self._writer = None
        meta = pq.read_metadata(self.path)
        size = self.path.stat().st_size
        return AddAction(
            self.relative,
            size,
            {PARTITION: self.day} if self.dataset.partition_ts is not None else {},
            int(time.time() * 1000),
            True,
            file_stats(meta),
        )

    def abort(self) -> None:
        if self.behind is not None:
            with contextlib.suppress(Exception):  # its error is moot: the file goes
                self.behind.wait()
        if self._writer is not None:
            with contextlib.suppress(Exception):  # a half-written temp file we are about to delete
                self._writer.close()
            self._writer = None
        self.tmp.unlink(missing_ok=True)


def _manifest_file(path: Path) -> contextlib.AbstractContextManager[Any]:
    """A manifest file to read, opened as a regular file only (fsutil.open_regular: O_NONBLOCK, no link): a FIFO
    planted under a name the manifest's log lists hung every ingest's already_ingested (a planted log entry,
    session-28 read), now an OSError naming it. An Arrow file, not a Python one (fsutil.arrow_file)."""
    return fsutil.arrow_regular(path)


def _group_bounds(footer: pq.FileMetaData, column: str = "content_hash") -> list[tuple[Any, Any]]:
    """(min, max) of `column` in each row group, found by its Parquet leaf (not the Arrow field's position,
    which a struct before it shifts); (None, None) where there are none or they cannot be read (statistics
    that are not UTF-8, of a planted file): _may_hold then says they may hold anything."""
    leaves = [footer.schema.column(i).path for i in range(len(footer.schema))]
    at = leaves.index(column) if column in leaves else -1
    bounds: list[tuple[Any, Any]] = []
    for group in range(footer.num_row_groups):
        try:
            stats = footer.row_group(group).column(at).statistics if at >= 0 else None
            known = stats is not None and stats.has_min_max
            bounds.append((stats.min, stats.max) if known else (None, None))  # type: ignore[union-attr]
        except (ValueError, pa.ArrowException):
            bounds.append((None, None))
    return bounds


def _stats_of(text: str | None) -> list[dict[str, Any]]:
    """A manifest row's `stats` as a dict, in a list; none if it is no JSON object (a planted row)."""
    try:
        stats = json.loads(text) if text else None
    except (ValueError, RecursionError):
        stats = None
    return [stats] if isinstance(stats, dict) else []


def _may_span(low: Any, high: Any, first: str, last: str) -> bool:
    """Whether text statistics [low, high] may hold some value of [first, last] (see _may_hold)."""
    if isinstance(low, bytes) and isinstance(high, bytes):
        low, high = low.decode("utf-8", "replace"), high.decode("utf-8", "replace")
    if not (isinstance(low, str) and isinstance(high, str)):
        return True
    return not (last < low or (first > high and not first.startswith(high)))


def _may_hold(low: Any, high: Any, value: str) -> bool:
    """Whether text statistics [low, high] may hold `value` (missing or of another type: they may). A statistic
    cut short is a prefix of the value: below the minimum, or above the maximum without starting with it, is
    outside either way."""
    return _may_span(low, high, value, value)


OUTSIDE = "the log names a path outside the table (a planted entry)"
# a listed path that is no regular file reached inside the table without a link (a planted FIFO, or a link to
# elsewhere): its entry goes, the thing itself is left where it is (opening a FIFO hangs, moving a file through
# a link moves or overwrites something outside the lake)
LEFT_IN_PLACE = "left in place"


def regular_files(paths: list[Path]) -> list[Path]:
    """`paths` when each is a regular file (one lstat each, ~4 us), else LakeError naming the first that is
    not. DuckDB, polars and pyarrow open a listed FIFO and wait for a writer for ever: a FIFO planted under a
    name the log lists (a planted log entry) hung every query and sweep that read its day. A missing file is
    left to the reader's own error (query.damage_error names it)."""
    for path in paths:
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            continue
        if not stat.S_ISREG(mode):
            raise LakeError(
                f"{path} is listed by its table's log but is no regular file (a {fsutil.kind(mode)}: planted by "
                "someone who can write the lake). Nothing reads it; `tracepipe repair` removes its entry from "
                "the log and leaves it where it is"
            )
    return paths


def _log_problem(log: Path, all_entries: bool = False) -> str | None:
    """What is wrong with a table's _delta_log that delta-rs would wait on for ever, or fail on without saying:
    a `_last_checkpoint` that is no regular file (a FIFO hung every reader; one lstat per open), and with
    `all_entries` (after a failed commit) any entry of the log that is no regular file (a FIFO named as the
    next commit made every commit fail as if the disk were full)."""
    names = [entry.name for entry in os.scandir(log)] if all_entries else ["_last_checkpoint"]
    for entry in sorted(names):
        try:
            mode = os.lstat(log / entry).st_mode
        except OSError:
            continue
        if not stat.S_ISREG(mode) and not (all_entries and stat.S_ISDIR(mode)):
            return (
                f"{log / entry} is no regular file (a {fsutil.kind(mode)}: planted by someone who can write the "
                f"lake). Remove it (and restore {log} from a backup if commits are missing); `tracepipe repair` "
                "cannot rewrite a history it cannot read"
            )
    return None


def _open_problem(exc: OSError) -> str:
    """Why a listed file cannot be read, from the OSError of fsutil.open_beneath (or regular_beneath)."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EINVAL):
        return f"{LEFT_IN_PLACE}: {exc.strerror}"
    return exc.strerror or "cannot be read"


def _left_in_place(reason: str) -> bool:
    return reason == OUTSIDE or reason.startswith(LEFT_IN_PLACE)


def delta_text(exc: BaseException) -> str:
    """A delta-rs error's message without the Rust backtrace it may carry (numbered frames, `<unknown>`, one
    per line after the message): the first line, at most 500 characters."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:500]


def _kind(arrow_type: pa.DataType) -> str:
    """What a column's type is for the lake's readers (which cast within a kind: a file of an older tracepipe
    with int64 where schema.py now says int32 still reads)."""
    if pa.types.is_dictionary(arrow_type):
        return _kind(arrow_type.value_type)
    if pa.types.is_integer(arrow_type):
        return "integer"
    if pa.types.is_floating(arrow_type):
        return "floating-point"
    if pa.types.is_timestamp(arrow_type):
        return "timestamp"
    if (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or pa.types.is_string_view(arrow_type)
    ):
        return "text"
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return f"list of {_kind(arrow_type.value_type)}"
    return str(arrow_type)


def columns_unlike(footer: pa.Schema, dataset: Dataset, entry: FileEntry) -> str | None:
    """Why a file cannot be the one its log entry names, from its footer's columns, or None: a declared column of
    another kind (text where the table has integers: a planted file, padded to the logged size), or a column the
    log's statistics of that file name but the file lacks. A column the file lacks and the log does not name is
    a file written before the column existed (read as nulls)."""
    have = {f.name: f.type for f in footer}
    for fld in dataset.schema:
        if fld.name in have:
            if _kind(have[fld.name]) != _kind(fld.type):
                return f"column {fld.name} holds {have[fld.name]}, the table declares {fld.type}"
        elif entry.null_counts.get(fld.name) is not None:
            return f"column {fld.name} is missing, the log's statistics of the file name it"
    return None


def _inside(path: Path, table_dir: str) -> bool:
    """Whether a log entry's path stays in its table's directory, by its text (`..` resolved, symlinks not: a
    table directory moved to another disk and linked back stays the table's)."""
    normal = os.path.normpath(path)
    return normal.startswith(table_dir + os.sep)


def _remove(relative: str, day: str | None, size: int | None, data_change: bool = True) -> RemoveAction:
    return RemoveAction(
        relative, data_change, int(time.time() * 1000), size, {PARTITION: day} if day is not None else None
    )


def _log_files(log: Path) -> tuple[dict[int, Path], dict[int, Path]] | None:
    """({version: commit file}, {version: checkpoint file}) of a table's _delta_log, from one listing; None
    when it cannot be listed."""
    commits: dict[int, Path] = {}
    checkpoints: dict[int, Path] = {}
    try:
        with os.scandir(log) as found:
            for item in found:
                match = _LOG_FILE.match(item.name)
                if match is not None:
                    kind = commits if match.group(2) == "json" else checkpoints
                    kind[int(match.group(1))] = log / item.name
    except OSError:
        return None
    return commits, checkpoints


def _mtime(path: Path) -> float:
    """A file's modification time (what Delta's log retention and time travel go by); +inf when unreadable."""
    try:
        return path.stat().st_mtime
    except OSError:
        return float("inf")


def _removed_paths(commit: Path) -> set[str]:
    """The files commit `commit` of a log removed, relative to its table (empty when it does not read)."""
    try:
        text = fsutil.read_regular(commit, LOG_COMMIT_BYTES)
    except OSError:
        return set()
    out = set()
    for line in text.splitlines():
        try:
            action = json.loads(line)
        except ValueError:
            continue
        remove = action.get("remove") if isinstance(action, dict) else None
        if isinstance(remove, dict) and isinstance(remove.get("path"), str):
            out.add(urllib.parse.unquote(remove["path"]))
    return out


@dataclass
class IngestResult:
    dataset: str
    source: str
    content_hash: str
    rows: int = 0
    rejects: int = 0
    skipped: bool = False  # already in the lake: nothing written
    files: list[str] = field(default_factory=list)  # relative to the lake root: flows/date=D/part-x.parquet
    stats: dict[str, Any] = field(default_factory=dict)
    version: int | None = None  # the table version of the commit


@dataclass
class FileEntry:
    """One data file of a table as the log lists it."""

    path: Path
    relative: str
    day: str | None
    rows: int
    size: int
    null_counts: Mapping[str, int | None]
    mins: Mapping[str, Any] = field(default_factory=dict)  # per-column statistics from the log
    maxs: Mapping[str, Any] = field(default_factory=dict)


class _StatColumns:
    """One kind of per-column statistics (null counts, minimums or maximums) of a listing's files, as the log's
    add actions hold them: a column becomes Python values the first time any file's statistic of it is asked
    for. A listing builds an entry per file, and building every statistic of every file (~60 columns x 3 kinds
    for vm_events) was most of what a listing cost as a table grew; callers read one or two columns."""

    __slots__ = ("_arrays", "_files", "_present", "_values")

    def __init__(self, actions: pa.Table, prefix: str) -> None:
        self._arrays = {
            c.removeprefix(prefix): actions.column(c) for c in actions.column_names if c.startswith(prefix)
        }
        self._values: dict[str, list[Any]] = {}
        self._present: dict[tuple[str, ...], list[bool]] = {}
        self._files = actions.num_rows

    def present(self, names: tuple[str, ...]) -> list[bool]:
        """For every file, whether it has a (non-null) statistic of each of `names`: computed in columns once
        per listing (a reader asks it for every file of every table it opens)."""
        known = self._present.get(names)
        if known is None:
            valid: Any = pa.array([True] * self._files)
            for name in names:
                if name not in self._arrays:
                    valid = pa.array([False] * self._files)
                    break
                valid = pc.and_(valid, pc.is_valid(self._arrays[name]))
            known = self._present.setdefault(names, valid.to_pylist())
        return known

    def column(self, name: str) -> list[Any]:
        """Every file's statistic of column `name` (KeyError: the log has none for it)."""
        values = self._values.get(name)
        if values is None:
            values = self._values[name] = self._arrays[name].to_pylist()
        return values

    def names(self) -> list[str]:
        return list(self._arrays)


class _FileStats(Mapping[str, Any]):
    """One file's statistics of one kind, read-only, as a dict of column -> value (see _StatColumns)."""

    __slots__ = ("_columns", "_row")

    def __init__(self, columns: _StatColumns, row: int) -> None:
        self._columns = columns
        self._row = row

    def __getitem__(self, name: str) -> Any:
        return self._columns.column(name)[self._row]

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns.names())

    def __len__(self) -> int:
        return len(self._columns.names())

    def __repr__(self) -> str:
        return repr(dict(self))

    def __reduce__(self) -> tuple[Any, ...]:  # pickled as the plain dict it stands for, not the whole listing
        return (dict, (dict(self),))


def have_null_counts(entries: list[FileEntry], columns: list[str]) -> list[bool]:
    """For each entry, whether the log holds its file's null count of every one of `columns` (a file written
    before a column was added to schema.py has none for it). Taken from the listing's columns of statistics, not
    file by file."""
    wanted = tuple(columns)
    out = []
    for entry in entries:
        counts = entry.null_counts
        if isinstance(counts, _FileStats):
            out.append(counts._columns.present(wanted)[counts._row])
        else:
            out.append(all(counts.get(c) is not None for c in wanted))
    return out


class Lake:
    """A lake directory. Cheap to construct; creates tables only when writing.

    `as_of` pins every table to what it was at a time (datetime) or at versions ({dataset: version}); such a
    lake is read-only."""

    def __init__(
        self, root: Path | str | None = None, as_of: dt.datetime | dict[str, int] | None = None
    ) -> None:
        self.root = Path(root) if root is not None else default_lake_path()
        problem = fsutil.directory_problem(self.root)
        if problem:  # a lake given as a file, a FIFO, /dev/null or a symlink loop: say so, before any write
            raise LakeError(f"--lake {self.root} {problem}: a lake is a directory; pass another --lake")
        if "%" in str(self.root.absolute()):
            # delta-rs reads a path as a URL: "lake%41" opened "lakeA", which looked like a damaged log (a review)
            raise UsageError(
                f"--lake {self.root}: a '%' in the lake's path is read as a URL escape by the Delta library "
                "(%41 means A); rename the folder (or the one above it) without '%'"
            )
        self.as_of = as_of
        self._tables: dict[str, DeltaTable | None] = {}
        self._seen: dict[str, int | None] = {}
        self._held: set[str] = set()  # tables whose rewrite lock this object holds
        self._evolved: set[str] = set()  # tables whose log schema was checked against schema.py
        # (manifest version, {(dataset, content_hash)}, {source_key}, manifest files already read)
        self._manifest_cache: tuple[int, set[tuple[str, str]], set[str], set[str]] | None = None
        self._manifest_sources: set[tuple[str, str]] = set()  # (dataset, source) of the rows read into it
        self._confirmed_keys: set[str] = set()  # source keys _confirmed found in the manifest (of this run)
        self._manifest_hashed: dict[str, set[str]] = {}  # (file: its _hashed_keys)
        # (dataset, content_hash) of each manifest file read by _manifest_has
        self._manifest_columns: dict[tuple[str, int], pa.Table] = {}  # (file, row group): its two columns
        # (file: its footer and the content_hash statistics of each row group, _group_bounds)
        self._manifest_footers: dict[str, tuple[pq.FileMetaData, list[tuple[Any, Any]]]] = {}
        # {dataset: {source: its rows' stats}} of the paths know_sources asked after, {dataset: those paths}
        self._known_sources: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self._site_known = False  # (site_id found or made)
        self._asked_sources: dict[str, set[str]] = {}
        # {table: (its open DeltaTable, version, every file entry, {source key: entries}, day-partitioned)}: what
        # entries() built from the log, until the table moves to another version (an hourly update asks ~20 times)
        self._entries_cache: dict[
            str, tuple[DeltaTable, int, list[FileEntry], dict[str, list[FileEntry]], bool]
        ] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (Spark ships closures that hold a Lake): open tables are per process, reopened there."""
        return {"root": self.root, "as_of": self.as_of}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["as_of"])  # type: ignore[misc]

    # ---- tables ------------------------------------------------------------------------------------------
    def dataset_dir(self, name: str) -> Path:
        _dataset(name)
        return self.root / name

    def _open(self, name: str) -> DeltaTable | None:
        """The table at the lake's snapshot (as_of) or its latest version; None when it does not exist."""
        directory = self.dataset_dir(name)
        if not (directory / "_delta_log").is_dir():
            if self.is_old_layout():
                raise LakeError(
                    f"{self.root} is a lake of the old layout (Parquet files without a transaction log); "
                    f"upgrade it in place with: tracepipe upgrade --lake {self.root}"
                )
            return None
        planted = _log_problem(directory / "_delta_log")
        if planted:
            raise LakeError(planted)
        try:
            if isinstance(self.as_of, dict):
                version = self.as_of.get(name)
                if version is None or version < 0:
                    return None
                self._within_log(name, version=version)
                return DeltaTable(str(directory), version=version)
            table = DeltaTable(str(directory))
            if isinstance(self.as_of, dt.datetime):
                self._within_log(name, when=self.as_of)
                try:
                    table.load_as_version(self.as_of)
                except DeltaError:  # the table did not exist yet at that time
                    return None
            return table
        except TableNotFoundError:
            return None
        except DeltaError as exc:
            raise LakeError(
                f"cannot read the transaction log of {directory}: {delta_text(exc)}. A commit file of "
                f"{directory / '_delta_log'} holds what delta-rs cannot read (altered or planted by someone who "
                "can write the lake, or a damaged disk): every reader of this table stops here. Restore that "
                "folder from a backup; `tracepipe repair` cannot rewrite history it cannot read"
            ) from exc

    def oldest_kept(self, name: str) -> tuple[int, dt.datetime] | None:
        """The oldest version of table `name` that its log can still rebuild, and when it was committed as time
        travel sees it (delta-rs goes by the commit file's modification time); None without a readable log.
        Log retention (cleanup_metadata) deletes the commits before a checkpoint older than LOG_RETENTION, so
        that is version 0 while every commit since is there, else the oldest checkpoint that every later commit
        follows. One listing of the log folder, which delta-rs lists on every open anyway."""
        log = self.root / name / "_delta_log"
        listed = _log_files(log)
        if not listed or not listed[0]:
            return None
        commits, checkpoints = listed
        ordered = np.unique(np.fromiter(commits, dtype=np.int64, count=len(commits)))
        gaps = np.flatnonzero(np.diff(ordered) != 1)
        first = int(ordered[gaps[-1] + 1]) if len(gaps) else int(ordered[0])  # every commit from here on
        if first == 0:
            oldest = 0
        else:  # a checkpoint holds the state at its version: the commits after it must all be there
            usable = [c for c in checkpoints if c >= first - 1]
            if not usable:
                return None  # no version can be rebuilt: the reader's own error says so
            oldest = min(usable)
        stamped = log / f"{oldest:020d}.json"
        if not stamped.exists():
            stamped = next(log.glob(f"{oldest:020d}.checkpoint*.parquet"), stamped)
        try:
            mtime_ns = stamped.stat().st_mtime_ns
        except OSError:
            return None
        # milliseconds, as delta-rs compares them
        return oldest, dt.datetime.fromtimestamp(mtime_ns // 1_000_000 / 1000, dt.UTC)

    def _within_log(self, name: str, version: int | None = None, when: dt.datetime | None = None) -> None:
        """UsageError when time travel asks table `name` for a version, or a time, older than its log keeps:
        delta-rs would answer the version as a table that does not exist (no rows) and the time with the oldest
        version left, both silently. A time before version 0 of a complete log is before the table existed."""
        kept = self.oldest_kept(name)
        if kept is None or kept[0] == 0:
            return
        oldest, committed = kept
        if version is not None and version < oldest:
            asked = f"{name}={version}"
        elif when is not None and when < committed:
            asked = utc_text(when)
        else:
            return
        raise UsageError(
            f"--as-of {asked}: the log of {name} no longer reaches back that far (its oldest version is "
            f"{oldest}, committed {utc_text(committed, 'seconds')}): a table's log keeps {LOG_RETENTION.days} "
            "days of commits for time travel. Export evidence that must outlive that: "
            "tracepipe sql ... --format parquet --output FILE"
        )

    def require(self, allow_empty: bool = False) -> None:
        """LakeError unless `root` is a lake: a directory holding at least one of its tables (or a lake of the
        old layout, which a read then asks to upgrade). A read of some other directory would answer "nobody,
        nothing" instead of failing. `allow_empty` also accepts an empty directory (nothing landed yet)."""
        root = self.root
        if not root.is_dir():
            raise LakeError(f"no lake at {root}; ingest something first or pass --lake / set TRACEPIPE_LAKE")
        if self.is_old_layout() or any((root / n / "_delta_log").is_dir() for n in [*DATASETS, MANIFEST_DIR]):
            return
        if (root / "_delta_log").is_dir():
            raise LakeError(
                f"{root} is one table of a lake, not a lake: pass the directory above it as --lake"
            )
        if allow_empty and next(root.iterdir(), None) is None:
            return
        raise LakeError(
            f"{root} is not a tracepipe lake (it holds none of the lake's tables, such as {root / 'flows'}/"
            "_delta_log): pass the lake's directory as --lake or TRACEPIPE_LAKE, or ingest something first"
        )

    def damaged(self, name: str, read_footers: bool = False) -> list[tuple[FileEntry, str]]:
        """The files the table's log lists that cannot be what the log says: missing, or of another size than
        the log recorded (one stat() each; a 0-byte or replaced file, planted or left by a broken disk);
        with `read_footers` also those whose Parquet footer does not read. Each with the reason. Without
        `read_footers` no file is opened: an lstat each (fsutil.regular_beneath finds what open_beneath would),
        as every reader of the lake runs this."""
        if not read_footers:
            return self._listed_problems(name)
        out = []
        table_dir = os.path.normpath(self.root / name)
        for entry in self.entries(name):
            if not _inside(entry.path, table_dir):
                out.append((entry, OUTSIDE))
                continue
            relative = os.path.relpath(os.path.normpath(entry.path), table_dir).replace(os.sep, "/")
            try:
                fd = fsutil.open_beneath(Path(table_dir), relative)
            except OSError as exc:
                out.append((entry, _open_problem(exc)))
                continue
            try:
                size = os.fstat(fd).st_size
                handle = fsutil.arrow_file(fd) if read_footers and size == entry.size else None
            finally:
                os.close(fd)
            with contextlib.nullcontext() if handle is None else handle:
                if size != entry.size:
                    out.append((entry, f"{size} bytes, the log says {entry.size}"))
                elif read_footers:
                    try:
                        footer = pq.read_metadata(handle)
                        unlike = columns_unlike(footer.schema.to_arrow_schema(), _dataset(name), entry)
                    except (OSError, pa.ArrowException) as exc:
                        out.append((entry, f"not a Parquet file ({exc})"))
                        continue
                    if unlike:
                        out.append((entry, unlike))
        return out

    def _listed_problems(self, name: str) -> list[tuple[FileEntry, str]]:
        """damaged(name) without footers, the same reasons in the same order, from one lstat per file."""
        table_dir = os.path.normpath(self.root / name)
        entries = self.entries(name)
        normal = [os.path.normpath(entry.path) for entry in entries]
        inside = [path.startswith(table_dir + os.sep) for path in normal]  # (as _inside)
        found = iter(
            fsutil.regular_beneath(
                Path(table_dir),
                [path[len(table_dir) + 1 :] for path, ok in zip(normal, inside, strict=True) if ok],
            )
        )
        out = []
        for entry, ok in zip(entries, inside, strict=True):
            result = next(found) if ok else None
            if result is None:
                out.append((entry, OUTSIDE))
            elif isinstance(result, OSError):
                out.append((entry, _open_problem(result)))
            elif result.st_size != entry.size:
                out.append((entry, f"{result.st_size} bytes, the log says {entry.size}"))
        return out

    def repair(self) -> dict[str, list[str]]:
        """Take the files that `damaged` finds (footers read) out of the lake: each is moved to
        `<lake>/_damaged/<table>/` (kept as evidence, never deleted) and one commit per table removes it from the
        log. Their rows are gone from the lake. Returns {dataset: [file moved, ...]}."""
        out: dict[str, list[str]] = {}
        self.outside_removed: dict[str, list[str]] = {}  # entries of paths outside their table: dropped
        self.damage_reasons: dict[str, dict[str, str]] = {}  # {dataset: {file moved or entry removed: why}}
        for name in [*DATASETS, MANIFEST_DIR]:
            with self.lock(name):
                self.refresh(name)
                bad = self.damaged(name, read_footers=True)
                if not bad:
                    continue
                table_dir = os.path.normpath(self.root / name)
                for at, (entry, reason) in enumerate(bad):
                    if _left_in_place(reason):
                        continue
                    # moved without following a link on either side: a link planted among _damaged's folders
                    # made the move write an attacker's file anywhere the repairing user may (~/.ssh); such a
                    # file is then left where it is, out of the log
                    relative = os.path.relpath(os.path.normpath(entry.path), table_dir).replace(os.sep, "/")
                    try:
                        fsutil.move_beneath(
                            Path(table_dir), relative, self.root, f"{DAMAGED_DIR}/{name}/{relative}"
                        )
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        if exc.errno == errno.EXDEV:  # (a table folder on another disk, linked back)
                            bad[at] = (entry, f"{LEFT_IN_PLACE}: {DAMAGED_DIR}/ is on another file system")
                            continue
                        if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EINVAL):
                            raise
                        why = f"{DAMAGED_DIR}/ holds a symbolic link or a file on the way there"
                        bad[at] = (entry, f"{LEFT_IN_PLACE}: {why}")
                outside = [entry for entry, reason in bad if _left_in_place(reason)]
                if outside:
                    # a planted log entry naming a file outside the table ("../../etc/x"), or no regular file of
                    # the table (a FIFO, a link): the entry goes, the file is not touched (moving it into the lake
                    # would let a lake writer move any file the repairing user owns)
                    removes = [_remove(e.relative, e.day, e.size if e.size >= 0 else None) for e in outside]
                    self.commit(name, [], removes, {"operation": "repair", "outside_the_table": len(removes)})
                table = self.table(name)
                try:
                    table.repair(dry_run=False)  # Delta's FSCK: removes the entries of files not there
                except DeltaError as exc:
                    raise LakeError(
                        f"cannot commit the repair of {self.root / name}: {delta_text(exc)}"
                    ) from exc
                self.refresh(name)
                out[name] = [entry.relative for entry, reason in bad if not _left_in_place(reason)]
                self.damage_reasons[name] = {e.relative: r for e, r in bad}
                if outside:
                    self.outside_removed.setdefault(name, []).extend(e.relative for e in outside)
        return out

    def is_old_layout(self) -> bool:
        """A lake written before the table format: manifest rows as loose Parquet files in `_ingest/`."""
        manifest = self.root / MANIFEST_DIR
        if (manifest / "_delta_log").is_dir() or not manifest.is_dir():
            return False
        return any(not p.name.startswith("part-") for p in manifest.glob("*.parquet"))  # <dataset>-<hash>

    def table(self, name: str) -> DeltaTable | None:
        """The Delta table of dataset `name` (cached for this Lake object: one snapshot per command)."""
        table = self._tables.get(name)
        if table is None:
            table = self._tables[name] = self._open(name)
            self._seen[name] = self._log_stamp(name)
        elif self.as_of is None:
            stamp = self._log_stamp(name)
            if stamp != self._seen.get(name):  # another commit since: read only the new log entries
                try:
                    table.update_incremental()
                except (DeltaError, OSError):
                    # the entries after this handle's version were cleaned up meanwhile (log retention): a
                    # handle idle for longer than that starts again from the latest checkpoint
                    table = self._tables[name] = self._open(name)
                self._seen[name] = stamp
        return table

    def _landed(self, name: str, adds: list[AddAction], removes: list[RemoveAction]) -> bool:
        """Whether a commit of these actions is in the table's latest version (file names are unique)."""
        current = {e.relative for e in self.entries(name)}
        if adds:
            return adds[0].path in current
        return bool(removes) and all(r.path not in current for r in removes)

    def _fresh(self, name: str, table: DeltaTable) -> DeltaTable:
        """`table` brought to the latest version, or reopened when its log entries are gone."""
        try:
            table.update_incremental()
        except (DeltaError, OSError):
            self._tables.pop(name, None)
            table = self._writable(name)
        return table

    def _log_stamp(self, name: str) -> int | None:
        """Changes whenever a commit lands in the table's log (a new file in _delta_log/): one stat()."""
        try:
            return (self.root / name / "_delta_log").stat().st_mtime_ns
        except OSError:
            return None

    def catch_up(self, name: str) -> None:
        """Bring the cached snapshot of `name` to the latest commit by reading only the log entries since it,
        whether or not the log's stamp shows them (table() trusts a directory mtime; a writer that must not
        miss a commit, under a lock, calls this)."""
        table = self._tables.get(name)
        if table is None or self.as_of is not None:
            return  # the next table() opens it at the latest version
        stamp = self._log_stamp(name)
        try:
            table.update_incremental()
        except (DeltaError, OSError):
            self._tables.pop(name, None)  # log entries cleaned up since: table() starts from the checkpoint
            return
        self._seen[name] = stamp

    def refresh(self, name: str | None = None) -> None:
        """Forget cached snapshots so that the next read sees the latest commits."""
        if name is None:
            self._tables.clear()
            self._entries_cache.clear()
        else:
            self._tables.pop(name, None)
            self._entries_cache.pop(name, None)

    def snapshot(self) -> Lake:
        """This lake pinned at the versions its tables have now, for reads that must agree with each other
        (one DuckDB or Spark session: flows, both halves of flows_attributed and vm_leases from the same
        commits). Shares the open tables: compute what you need from it right away."""
        if self.as_of is not None:
            return self
        pinned = Lake(self.root, as_of=self.versions())
        pinned._tables = {name: table for name, table in self._tables.items() if table is not None}
        # the listings too, both ways (each is kept with the table object and version it was made from, so
        # neither lake takes the other's listing of another version): a sweep's connect after connect lists
        # each table once per version, not once per session
        pinned._entries_cache = self._entries_cache
        return pinned

    def version(self, name: str) -> int | None:
        table = self.table(name)
        return None if table is None else table.version()

    def versions(self) -> dict[str, int]:
        """{dataset: version} of every table that exists: the lake version a report records, and what
        `tracepipe sql --as-of` takes back."""
        out = {}
        for name in DATASETS:
            version = self.version(name)
            if version is not None:
                out[name] = version
        return out

    def entries(self, name: str, days: Iterable[str] | None = None) -> list[FileEntry]:
        """The data files of a table from its log (no directory listing), optionally of some days only. The
        whole list is built once per table version (an entry per file: what costs as the table grows); some
        days of a version not listed whole yet are built alone (a collector's commit asks for its days only)."""
        if days is not None:
            table = self.table(name)
            if table is None:
                return []
            if self._cached_entries(name, table) is None:
                return self._read_entries(name, table, days)[0]
        everything, _, partitioned = self._all_entries(name)
        if days is None or not partitioned:
            return list(everything)
        wanted = set(days)
        return [e for e in everything if e.day in wanted]

    def _all_entries(self, name: str) -> tuple[list[FileEntry], dict[str, list[FileEntry]], bool]:
        """Every file entry of the table's current version, sorted by path, those of each source key (files
        named part-<content hash>-<random>.parquet), and whether the table is day-partitioned; cached until the
        version changes."""
        table = self.table(name)
        if table is None:
            return [], {}, False
        cached = self._cached_entries(name, table)
        if cached is not None:
            return cached
        out, partitioned = self._read_entries(name, table)
        by_source: dict[str, list[FileEntry]] = {}
        for entry in out:  # per file, once per version
            match = _SOURCE_FILE.match(_file_name(entry.relative))
            if match is not None:
                by_source.setdefault(match.group(1), []).append(entry)
        self._entries_cache[name] = (table, table.version(), out, by_source, partitioned)
        return out, by_source, partitioned

    def _cached_entries(
        self, name: str, table: DeltaTable
    ) -> tuple[list[FileEntry], dict[str, list[FileEntry]], bool] | None:
        """What _all_entries built for this open table at its current version, if it did."""
        cached = self._entries_cache.get(name)
        if cached is None or cached[0] is not table or cached[1] != table.version():
            return None
        return cached[2], cached[3], cached[4]

    def _read_entries(
        self, name: str, table: DeltaTable, days: Iterable[str] | None = None, source: str | None = None
    ) -> tuple[list[FileEntry], bool]:
        """The table's file entries from its log: all of them, or those of some days, or (`source`, a source
        key) those one source's commit added."""
        actions = pa.table(table.get_add_actions(flatten=True))
        if actions.num_rows == 0:
            return [], False
        partitioned = f"partition.{PARTITION}" in actions.column_names
        if days is not None and partitioned:
            wanted = pa.array(sorted(set(days)), pa.string())
            actions = actions.filter(pc.is_in(actions.column(f"partition.{PARTITION}"), wanted))
        if source is not None:  # the file names _SOURCE_FILE matches for this key (hex: nothing to escape)
            named = f"(^|/)part-{source}-[0-9a-f]{{8}}\\.parquet$"
            actions = actions.filter(pc.match_substring_regex(actions.column("path"), named))
        paths = actions.column("path").to_pylist()
        day_list = (
            actions.column(f"partition.{PARTITION}").to_pylist() if partitioned else [None] * len(paths)
        )
        rows = actions.column("num_records").to_pylist()
        sizes = actions.column("size_bytes").to_pylist()
        nulls, lows, highs = (_StatColumns(actions, p) for p in ("null_count.", "min.", "max."))
        base = self.root / name
        out = [
            FileEntry(
                base / rel,
                rel,
                day,
                n if n is not None else -1,
                size,
                _FileStats(nulls, i),
                _FileStats(lows, i),
                _FileStats(highs, i),
            )
            for i, (rel, day, n, size) in enumerate(zip(paths, day_list, rows, sizes, strict=True))
        ]
        return sorted(out, key=lambda e: e.relative), partitioned

    def files(self, name: str, days: Iterable[str] | None = None) -> list[Path]:
        """Absolute paths of the table's current data files (from the log), sorted; each a regular file
        (regular_files), as every reader is given them."""
        return regular_files([entry.path for entry in self.entries(name, days)])

    def days(self, name: str) -> list[str]:
        """The UTC days that have data in a day-partitioned table (from the log)."""
        return sorted({e.day for e in self.entries(name) if e.day is not None})

    def read(
        self, name: str, columns: list[str] | None = None, days: Iterable[str] | None = None
    ) -> pa.Table:
        """Whole dataset as one Arrow table (small datasets and tests; big ones go through DuckDB/polars)."""
        schema = _dataset(name).schema
        wanted = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        paths = self.files(name, days)
        if not paths:
            return wanted.empty_table()
        return pa.concat_tables(read_parquet_files(paths, wanted))

    # ---- manifest ----------------------------------------------------------------------------------------
    def already_ingested(self, dataset: str, content_hash: str, holding: bool = False) -> bool:
        """True when a source with this content was committed to `dataset`: its manifest row (read once per
        manifest version), or, for a run killed between its rows' commit and its manifest row, its data files
        in the table (named after the content hash; compaction leaves such files alone until the manifest
        row exists). Such a row is then written, marked recovered (`holding`: the caller holds the dataset's
        ingest lock, commit_sources; the row is written either way)."""
        if self._manifest_cache is not None:  # (read whole already: a collector, or a compaction of this run)
            if (dataset, content_hash) in self._manifest_keys():
                return True
        elif self._manifest_has(dataset, content_hash):
            return True
        landed = self._source_entries(dataset, content_hash)
        if not landed:
            return False
        if self.as_of is None:
            # (two ingests at once may both write this row for one source: a second row of the same content,
            # harmless to what lands; a recovery that waited for, or skipped, a busy ingest lock left segments of
            # a killed committer without their row, their flows never re-attributed: the kill -9 chaos test)
            self._write_manifest_row(
                dataset,
                content_hash,
                "(recovered: the run that committed these rows was stopped before its manifest row)",
                sum(max(e.rows, 0) for e in landed),
                0,
                [f"{dataset}/{e.relative}" for e in landed],
                {"recovered": True},
            )
        return True

    def _manifest_has(self, dataset: str, content_hash: str) -> bool:
        """Whether a manifest row names (dataset, content_hash), without reading the manifest into Python: a
        file whose statistics exclude the hash is skipped (the one-row file of each source not compacted
        yet), and of the others only the row groups whose statistics hold it are read, their two columns
        compared in Arrow. Merged files are sorted by (dataset, content_hash) in groups of MANIFEST_GROUP_ROWS:
        a lookup reads one group a file, whatever the sources ever ingested (reading whole files was 50 ms a
        year of hourly sources, and grew with them: a collector's segments are ~100,000 a year)."""
        columns = self._manifest_columns
        try:
            for entry in self.entries(MANIFEST_DIR):
                if not _may_hold(
                    entry.mins.get("content_hash"), entry.maxs.get("content_hash"), content_hash
                ):
                    continue
                footer, bounds = self._manifest_footer(entry)
                for group, (low, high) in enumerate(bounds):
                    if not _may_hold(low, high, content_hash):
                        continue
                    key = (entry.relative, group)
                    if key not in columns:
                        with (
                            _manifest_file(entry.path) as handle,
                            contextlib.closing(pq.ParquetFile(handle, metadata=footer)) as file,
                        ):
                            columns[key] = file.read_row_group(group, columns=["dataset", "content_hash"])
                    rows = columns[key]
                    same = pc.and_(
                        pc.equal(rows.column("content_hash"), content_hash),
                        pc.equal(rows.column("dataset"), dataset),
                    )
                    if pc.any(same).as_py():
                        return True
        except (pa.ArrowException, OSError, KeyError):
            # (a planted file of other types or columns: the whole manifest, read as Python values)
            return (dataset, content_hash) in self._manifest_keys()
        return False

    def _source_entries(self, name: str, content_hash: str) -> list[FileEntry]:
        """The table's files that one source's commit added (named part-<content hash>-<random>.parquet): from
        the version's listing when it was built, else only those files' entries (every new source asks, and
        building every file's entry for it grew with the table)."""
        table = self.table(name)
        if table is None:
            return []
        key = source_key(content_hash)
        cached = self._cached_entries(name, table)
        if cached is not None:
            return list(cached[1].get(key, []))
        return self._read_entries(name, table, source=key)[0]

    def _confirmed(self, keys: Collection[str]) -> set[str]:
        """Which of `keys` (source keys, as a source's data files are named) have a manifest row: their files may
        be merged by compaction. Asked like _manifest_has, of the statistics and then of the row groups that may
        hold them (at most one group a merged file per key), never by reading the manifest: compaction asks after
        commits for the files of one day, and reading every source ever ingested cost 3 s at 1 M sources. A key
        not found so may be the hash of a content hash that is no sha256 (source_key): those are looked for in
        the content_hash column alone (_hashed_keys), only when some file is of a run killed before its
        manifest row (or of such a source)."""
        keys = set(keys)
        found = keys & self._confirmed_keys
        if found == keys:
            return found
        if self._manifest_cache is None:
            try:
                found |= self._manifest_holds(keys - found)
                if found != keys:
                    found |= (keys - found) & self._hashed_keys()
                # (a collector's year of keys at most: asked again rather than kept for ever)
                if len(self._confirmed_keys) > 100_000:
                    self._confirmed_keys.clear()
                self._confirmed_keys |= found  # (manifest rows are never deleted: confirmed stays confirmed)
                return found
            except (pa.ArrowException, OSError, KeyError):
                pass  # (a planted file of other types or columns: the whole manifest decides)
        self._manifest_keys()
        return keys & self._manifest_cache[2] if self._manifest_cache is not None else set()

    def _hashed_keys(self) -> set[str]:
        """source_key of each manifest content hash that is no sha256 (a caller's own id: its files are named
        by its hash); each manifest file's content_hash column read once per run, in Arrow."""
        keys: set[str] = set()
        for entry in self.entries(MANIFEST_DIR):
            known = self._manifest_hashed.get(entry.relative)
            if known is None:
                with _manifest_file(entry.path) as handle:
                    hashes = pq.read_table(handle, columns=["content_hash"]).column("content_hash")
                other = hashes.filter(pc.invert(pc.match_substring_regex(hashes, _SHA256.pattern)))
                known = self._manifest_hashed[entry.relative] = {source_key(h) for h in other.to_pylist()}
            keys |= known
        return keys

    def _manifest_footer(self, entry: FileEntry) -> tuple[pq.FileMetaData, list[tuple[Any, Any]]]:
        """A manifest file's footer and the content_hash statistics of each row group: read once per run (a
        backfill asks per source)."""
        known = self._manifest_footers.get(entry.relative)
        if known is None:
            with _manifest_file(entry.path) as handle:
                footer = pq.read_metadata(handle)
            known = self._manifest_footers[entry.relative] = (footer, _group_bounds(footer))
        return known

    def _manifest_holds(self, keys: set[str]) -> set[str]:
        """The `keys` that some manifest row (of any dataset) has as its content hash: the files and row groups
        whose statistics may hold one of them, their content_hash column compared in Arrow."""
        found: set[str] = set()
        for entry in self.entries(MANIFEST_DIR):
            low, high = entry.mins.get("content_hash"), entry.maxs.get("content_hash")
            inside = [k for k in keys - found if _may_hold(low, high, k)]
            if not inside:
                continue
            footer, bounds = self._manifest_footer(entry)
            for group, (low, high) in enumerate(bounds):
                wanted = [k for k in inside if k not in found and _may_hold(low, high, k)]
                if not wanted:
                    continue
                rows = self._manifest_columns.get((entry.relative, group))
                if rows is None:  # (not kept: a daily merge asks for a day's sources, in as many groups)
                    with (
                        _manifest_file(entry.path) as handle,
                        contextlib.closing(pq.ParquetFile(handle, metadata=footer)) as file,
                    ):
                        rows = file.read_row_group(group, columns=["content_hash"])
                hashes = rows.column("content_hash")
                found.update(hashes.filter(pc.is_in(hashes, pa.array(wanted, pa.string()))).to_pylist())
            if found == keys:
                break
        return found

    def _write_manifest_row(
        self,
        dataset: str,
        content_hash: str,
        source: str,
        rows: int,
        rejects: int,
        files: list[str],
        stats: dict[str, Any],
        ingested_at: dt.datetime | None = None,
    ) -> None:
        self._write_manifest_rows(
            [
                {
                    "content_hash": content_hash,
                    "dataset": dataset,
                    "source": source,
                    "rows": rows,
                    "rejects": rejects,
                    "files": files,
                    "ingested_at": ingested_at or dt.datetime.now(dt.UTC),
                    "stats": json.dumps(stats, default=str),
                }
            ]
        )

    def _write_manifest_rows(self, rows: list[dict[str, Any]]) -> None:
        """Manifest rows (INGEST_MANIFEST's columns, `stats` as JSON text) in one file and one commit."""
        if not rows:
            return
        part = PartFile(self.root / MANIFEST_DIR, MANIFEST, None, f"part-{uuid.uuid4().hex}")
        part.write(pa.Table.from_pylist(rows, schema=INGEST_MANIFEST))
        action = part.close()
        first = rows[0]
        info = {"source": first["source"], "content_hash": first["content_hash"]}
        if len(rows) > 1:
            info["sources"] = len(rows)
        version = self.commit(MANIFEST_DIR, [action] if action else [], info=info)
        self._remember(
            [(row["dataset"], row["content_hash"], row["source"]) for row in rows], version, part.relative
        )
        for row in rows:
            dataset, source = row["dataset"], row["source"]
            if source in self._asked_sources.get(dataset, ()):  # (know_sources' answers follow our own rows)
                self._known_sources[dataset].setdefault(source, []).extend(_stats_of(row["stats"]))

    def _manifest_keys(self) -> set[tuple[str, str]]:
        """(dataset, content_hash) of every manifest row; read once per manifest version (a long-running
        collector reads it once and then adds its own commits)."""
        manifest = self.table(MANIFEST_DIR)
        if manifest is None:
            return set()
        version = manifest.version()
        if self._manifest_cache is None or self._manifest_cache[0] != version:
            # manifest rows are never deleted (compaction moves them): read only the files not read before
            _old, keys, confirmed, seen = self._manifest_cache or (-1, set(), set(), set())
            for entry in self.entries(MANIFEST_DIR):
                if entry.relative in seen:
                    continue
                with _manifest_file(entry.path) as handle:
                    rows = pq.read_table(handle, columns=["dataset", "content_hash", "source"])
                hashes, datasets = rows.column("content_hash").to_pylist(), rows.column("dataset").to_pylist()
                keys.update(zip(datasets, hashes, strict=True))
                self._manifest_sources.update(zip(datasets, rows.column("source").to_pylist(), strict=True))
                confirmed.update(source_key(h) for h in hashes)
                seen.add(entry.relative)
            self._manifest_cache = (version, keys, confirmed, seen)
        return self._manifest_cache[1]

    def has_source(self, dataset: str, source: str) -> bool:
        """Whether a manifest row of `dataset` names `source` (a path): a hint that its content may be there
        already, nothing more (the content hash decides: already_ingested). Asked without reading the manifest:
        a file of one source is skipped by its statistics; of a merged file (sorted by content hash, so that
        its groups' statistics span most paths) only the row groups that its Bloom filters on `source` do not
        exclude are read (files merged before the filters: every group, until merged again)."""
        if (dataset, source) in self._manifest_sources:
            return True
        if source in self._asked_sources.get(dataset, ()):  # (know_sources read it with the run's others)
            return source in self._known_sources[dataset]
        if self._manifest_cache is not None:  # (read whole already: what it holds is the answer)
            self._manifest_keys()
            return (dataset, source) in self._manifest_sources
        try:
            return self._manifest_names(dataset, source)
        except (pa.ArrowException, OSError, KeyError):
            # (a planted file of other types or columns: the whole manifest, read as Python values)
            self._manifest_keys()
            return (dataset, source) in self._manifest_sources

    def _manifest_names(self, dataset: str, source: str) -> bool:
        """has_source's lookup (_manifest_rows)."""
        for _rows in self._manifest_rows(dataset, source):
            self._manifest_sources.add((dataset, source))
            return True
        return False

    def landed_as_it_is(self, dataset: str, source: str, info: os.stat_result) -> bool:
        """Whether a manifest row of `dataset` for `source` recorded this very file as it is now
        (FILE_IDENTITY: fsutil.file_identity of its stat when it landed): no need to read it to know it is in
        the lake. Anything else (another inode, a write since, a row of before the identity was recorded) is
        hashed, as before. A sweep's drop folder was hashed whole at every run (an ops review: 264 + 264 hourly
        files, 3.9 s and 2.2 GB read an hour to land nothing)."""
        identity = fsutil.file_identity(info)
        return any(stats.get(FILE_IDENTITY) == identity for stats in self.source_stats(dataset, source))

    def record_identity(self, dataset: str, content_hash: str, source: str, info: os.stat_result) -> None:
        """A file found in the lake by its content (hashed) whose path has no identity recorded yet (landed by a
        version before identities were): one manifest row more, of no rows, so that its next run skips it
        unread (an upgraded site's drop folders were hashed whole at every run, 2.2 GB an hour: a review). Once
        per path: one whose identity changes at every run (touched, same content) is hashed, as before."""
        if self.as_of is not None or any(FILE_IDENTITY in s for s in self.source_stats(dataset, source)):
            return
        stats = {FILE_IDENTITY: fsutil.file_identity(info), "identity_only": True}
        self._write_manifest_row(dataset, content_hash, source, 0, 0, [], stats)

    def source_stats(self, dataset: str, source: str) -> list[dict[str, Any]]:
        """The `stats` of the manifest rows of `dataset` naming `source`, looked up as has_source does (never a
        read of the whole manifest): what an ingest recorded of the file, such as its identity on disk."""
        if source in self._asked_sources.get(dataset, ()):  # (know_sources read it with the run's others)
            return list(self._known_sources[dataset].get(source, []))
        found = []
        try:
            for rows in self._manifest_rows(dataset, source, ["stats"]):
                for text in rows.column("stats").to_pylist():
                    found.extend(_stats_of(text))
        except (pa.ArrowException, OSError, KeyError):
            return []  # (a planted manifest file: the caller hashes, as before)
        return found

    def know_sources(self, dataset: str, sources: Iterable[str]) -> None:
        """Before a run over many files: which of `sources` (paths) have manifest rows of `dataset`, with their
        stats, read in one pass over the manifest's `source` column; has_source and source_stats then answer
        for them from memory. Asked a file at a time, each path read a row group (8,192 rows) of each merged
        manifest file that may name it, twice (has_source, then landed_as_it_is): a rerun over a drop folder of
        20,000 files landed before took 105 s, ~5 ms a file, and grew with the manifest. Done only when the
        files outnumber the manifest's row groups (a few new files are asked a file at a time: the Bloom filters
        spare those most reads); a pass that fails (a planted file) leaves them to be asked a file at a time."""
        asked = self._asked_sources.setdefault(dataset, set())
        wanted = sorted(set(sources) - asked)
        entries = self.entries(MANIFEST_DIR) if wanted else []
        groups = sum(-(-entry.rows // MANIFEST_GROUP_ROWS) for entry in entries)
        if 2 * len(wanted) < groups or not wanted:
            return
        known = self._known_sources.setdefault(dataset, {})
        found: dict[str, list[dict[str, Any]]] = {}
        values = pa.array(wanted, pa.string())
        try:
            for entry in entries:
                if not (
                    _may_hold(entry.mins.get("dataset"), entry.maxs.get("dataset"), dataset)
                    and _may_span(entry.mins.get("source"), entry.maxs.get("source"), wanted[0], wanted[-1])
                ):
                    continue
                footer, _hashes = self._manifest_footer(entry)
                paths, datasets = _group_bounds(footer, "source"), _group_bounds(footer, "dataset")
                with (
                    _manifest_file(entry.path) as handle,
                    contextlib.closing(pq.ParquetFile(handle, metadata=footer)) as file,
                ):
                    for group, ((low, high), (first, last)) in enumerate(zip(paths, datasets, strict=True)):
                        if not (
                            _may_span(low, high, wanted[0], wanted[-1]) and _may_hold(first, last, dataset)
                        ):
                            continue
                        rows = file.read_row_group(group, columns=["dataset", "source"])
                        same = pc.and_(
                            pc.equal(rows.column("dataset"), dataset), pc.is_in(rows.column("source"), values)
                        )
                        if not pc.any(same).as_py():
                            continue
                        rows = file.read_row_group(group, columns=["source", "stats"]).filter(same)
                        for source, text in zip(
                            rows.column("source").to_pylist(), rows.column("stats").to_pylist(), strict=True
                        ):
                            found.setdefault(source, []).extend(_stats_of(text))
        except (pa.ArrowException, OSError, KeyError, ValueError):
            return  # (a planted file of other types or columns: asked a file at a time, as before)
        known.update(found)
        asked.update(wanted)

    def _manifest_rows(
        self, dataset: str, source: str, columns: list[str] | None = None
    ) -> Iterator[pa.Table]:
        """The manifest rows of `dataset` naming `source` (and `columns` of them), a row group at a time:
        statistics of `dataset` and `source` per file and row group, then the Bloom filters of the groups left
        (tracepipe.bloom), then the groups' two columns compared in Arrow."""
        for entry in self.entries(MANIFEST_DIR):
            if not (
                _may_hold(entry.mins.get("source"), entry.maxs.get("source"), source)
                and _may_hold(entry.mins.get("dataset"), entry.maxs.get("dataset"), dataset)
            ):
                continue
            footer, _hashes = self._manifest_footer(entry)
            paths, datasets = _group_bounds(footer, "source"), _group_bounds(footer, "dataset")
            groups = [
                g
                for g, ((low, high), (first, last)) in enumerate(zip(paths, datasets, strict=True))
                if _may_hold(low, high, source) and _may_hold(first, last, dataset)
            ]
            if not groups:
                continue
            with _manifest_file(entry.path) as handle:  # (16 kB of filter a group, then its two columns)
                groups = [g for g in groups if not bloom.excludes(handle, footer, g, "source", source)]
            for group in groups:
                with (
                    _manifest_file(entry.path) as handle,
                    contextlib.closing(pq.ParquetFile(handle, metadata=footer)) as file,
                ):
                    rows = file.read_row_group(group, columns=["dataset", "source", *(columns or [])])
                same = pc.and_(
                    pc.equal(rows.column("source"), source), pc.equal(rows.column("dataset"), dataset)
                )
                if pc.any(same).as_py():
                    yield rows.filter(same)

    def _remember(self, rows: list[tuple[str, str, str]], version: int, relative: str | None = None) -> None:
        """Our own manifest commit of `rows` (dataset, content hash, source): the cache follows without reading
        the manifest again."""
        self._manifest_sources.update((dataset, source) for dataset, _hash, source in rows)
        if self._manifest_cache is not None and self._manifest_cache[0] == version - 1:
            _old, keys, confirmed, seen = self._manifest_cache
            keys.update((dataset, content_hash) for dataset, content_hash, _source in rows)
            confirmed.update(source_key(content_hash) for _dataset, content_hash, _source in rows)
            if relative is not None:
                seen.add(relative)
            self._manifest_cache = (version, keys, confirmed, seen)

    def manifest(self) -> pa.Table:
        return self.read(MANIFEST_DIR)

    def site_id(self, create: bool = False) -> str | None:
        """This lake's own random id (SITE_FILE, made by its first commit): what the producer identity of the
        site's STIX exports derives from when no site name is given (respond.share). None when there is none
        yet (a lake not written to since) or it is no UUID (a planted file: replaced when `create`)."""
        path = self.root / SITE_FILE
        try:
            fd = fsutil.open_regular(path)
            try:
                found = str(uuid.UUID(str(json.loads(os.read(fd, 4096))["site_id"])))
            finally:
                os.close(fd)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            found = None
        if found is None and create and self.as_of is None:
            found = str(uuid.uuid4())
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fsutil.write_atomic(path, json.dumps({"site_id": found}) + "\n")
            except OSError as exc:  # (a commit is not stopped by it: the next one tries again)
                _lock_log.warning("site id not kept in %s: %s", path, exc)
                return None
        self._site_known = self._site_known or found is not None
        return found

    # ---- writing -----------------------------------------------------------------------------------------
    def _writable(self, name: str) -> DeltaTable:
        """The latest version of the table, created (empty) if it does not exist yet."""
        if self.as_of is not None:
            raise LakeError("a lake opened --as-of a past version is read-only")
        directory = self.dataset_dir(name)
        table = self.table(name)
        if table is None:
            dataset = _dataset(name)
            directory.mkdir(parents=True, exist_ok=True)
            try:
                create_table_with_add_actions(
                    str(directory),
                    DeltaSchema.from_arrow(table_schema(dataset)),
                    [],
                    mode="ignore",
                    partition_by=[PARTITION] if dataset.partition_ts is not None else None,
                    configuration=TABLE_CONFIG,
                )
            except (CommitFailedError, DeltaError) as exc:  # created at the same moment by another writer
                if not (directory / "_delta_log").is_dir():
                    raise LakeError(f"cannot create table {directory}: {delta_text(exc)}") from exc
            self._tables.pop(name, None)
            table = self.table(name)
            if table is None:
                raise LakeError(f"cannot open the table just created at {directory}")
        if name not in self._evolved:
            table = self._evolve(name, table)
            self._evolved.add(name)
        return table

    def _evolve(self, name: str, table: DeltaTable) -> DeltaTable:
        """Add to the table's log schema the columns schema.py declares and it lacks (a lake written before
        they existed: vm_events.image), as nullable columns, in one metadata commit: Delta readers (Spark,
        delta-rs) then see them, null in the older files. Those files are not rewritten; tracepipe's own
        readers fill the missing columns (conform, query.scan_sql). A table made before STATS_COLUMNS was in
        TABLE_CONFIG gets it here too (its files' statistics are in the log already)."""
        for _attempt in range(3):
            have = set(table.schema().to_arrow().names)  # type: ignore[attr-defined]
            missing = [f for f in table_schema(_dataset(name)) if f.name not in have]
            stats = table.metadata().configuration.get(STATS_COLUMNS) == TABLE_CONFIG[STATS_COLUMNS]
            if not missing and stats:
                return table
            try:
                if missing:
                    # nullable whatever schema.py says: the rows already there have no value
                    added = DeltaSchema.from_arrow(pa.schema([f.with_nullable(True) for f in missing]))
                    table.alter.add_columns(list(added.fields))
                if not stats:  # a table created before every column's statistics were read (TABLE_CONFIG)
                    table.alter.set_table_properties({STATS_COLUMNS: TABLE_CONFIG[STATS_COLUMNS]})
            except DeltaError:  # another writer added them at the same moment: look again
                pass
            self._tables.pop(name, None)
            reopened = self.table(name)
            if reopened is None:
                raise LakeError(f"cannot reopen {self.root / name} after adding columns")
            table = reopened
        return table

    def commit(
        self,
        name: str,
        adds: list[AddAction],
        removes: list[RemoveAction] = (),  # type: ignore[assignment]
        info: dict[str, Any] | None = None,
    ) -> int:
        """One atomic commit of added and removed files to table `name` (`info` goes into the commit's
        metadata: operation, source, what went). Returns the version."""
        table = self._writable(name)
        if not self._site_known:  # (once per Lake object: a lake written to has its site id)
            self.site_id(create=True)
        dataset = _dataset(name)
        self._check_adds(name, adds)
        properties = CommitProperties(
            custom_metadata={"tracepipe": json.dumps(info or {}, default=str)},
            max_commit_retries=100,
        )
        try:
            for attempt in range(APPEND_CONFLICT_RETRIES + 1):
                try:
                    table.create_write_transaction(
                        [*adds, *removes],
                        mode="append",
                        schema=table_schema(dataset),
                        partition_by=[PARTITION] if dataset.partition_ts is not None else None,
                        commit_properties=properties,
                        # expired log entries are deleted by compaction under the table's lock, never by a
                        # commit: two writers cleaning at once made one of them fail after its commit landed
                        post_commithook_properties=PostCommitHookProperties(
                            create_checkpoint=True, cleanup_expired_logs=False
                        ),
                    )
                    break
                except DeltaError as exc:
                    if not isinstance(exc, CommitFailedError):
                        # the log entries between this handle's version and the latest were cleaned up (a
                        # handle older than the log retention), or a post-commit step failed after the commit
                        # landed: reopen from the latest checkpoint; commit again only if it did not land
                        self._tables.pop(name, None)
                        table = self._writable(name)
                        if self._landed(name, adds, removes):
                            break
                        if "not found" not in str(exc) or attempt == APPEND_CONFLICT_RETRIES:
                            raise
                        continue
                    # delta-rs checks a commit as if it had read every file of its snapshot, so an append whose
                    # snapshot predates a rewrite (attribution removed that day's files) fails with "a
                    # concurrent transaction deleted data this operation read". An append reads nothing:
                    # nothing was committed, so commit it again on the latest version. A rewrite (removes)
                    # that holds the table's lock may do the same: only lock holders remove files, so the
                    # files it removes are still there and the concurrent commits only added others.
                    if (removes and name not in self._held) or attempt == APPEND_CONFLICT_RETRIES:
                        raise
                    table = self._fresh(name, table)
            table = self._fresh(name, table)
            self._seen[name] = self._log_stamp(name)
            if (table.version() + 1) % CHECKPOINT_INTERVAL == 0:  # (Delta's rule: after every N commits)
                self._checkpoint(table)
                # a handle kept across many commits gets slower with each (measured: 10 -> 110 ms per append
                # after 700); after a checkpoint, a fresh open reads just that checkpoint
                self._tables.pop(name, None)
        except (CommitFailedError, DeltaError, OSError) as exc:
            planted = _log_problem(self.root / name / "_delta_log", all_entries=True)
            raise LakeError(
                f"cannot commit to {self.root / name}: {delta_text(exc)}. "
                + (planted or "Check that the lake is writable and has free space.")
            ) from exc
        return table.version()

    def _check_adds(self, name: str, adds: list[AddAction]) -> None:
        """LakeError, before anything is committed, when a file the commit adds is no longer the regular file
        of the size it was written at (an lstat each). Appends hold no lock that `vacuum` takes: a writer's
        finished but uncommitted files are protected only by their age, so a `vacuum --retain` shorter than a
        long ingest could delete them, and the commit would list files that are gone (every later read of the
        table failing on them)."""
        gone = []
        for add in adds:
            try:
                info = os.lstat(self.root / name / add.path)
                whole = stat.S_ISREG(info.st_mode) and info.st_size == add.size
            except OSError:
                whole = False
            if not whole:
                gone.append(add.path)
        if gone:
            raise LakeError(
                f"cannot commit to {self.root / name}: {len(gone)} of the {len(adds)} files it adds "
                f"{'is' if len(gone) == 1 else 'are'} gone or changed since written (e.g. {gone[0]}; a "
                "`tracepipe vacuum --retain` shorter than this write deletes files not yet committed). Nothing "
                "was committed: run the command again."
            )

    @staticmethod
    def _checkpoint(table: DeltaTable) -> None:
        """A checkpoint at the table's version when its own interval (a table made before CHECKPOINT_INTERVAL
        was lowered, or by another writer) gave it none: changing the table's property would be a commit of
        its own, and a new version of vm_leases means a full lease rebuild (leases._load_state)."""
        try:  # (never fails the commit, which has landed: only opens get slower; the next interval tries again)
            configured = str(table.metadata().configuration.get("delta.checkpointInterval") or "100")
            every = (
                int(configured)
                if configured.isascii() and configured.isdigit() and len(configured) < 10
                else 0
            )
            if every > 0 and (table.version() + 1) % every == 0:
                return  # the commit's own post-commit hook wrote it
            table.create_checkpoint()
        except Exception:  # (a full disk, a concurrent cleanup, a planted property)
            pass

    @contextlib.contextmanager
    def lock(self, name: str, wait: bool = True) -> Iterator[bool]:
        """Exclusive lock of the table's rewriters (attribution, compaction, expiry, derived tables): two of
        them never remove the same file. Appends do not take it. Yields False when wait=False and busy."""
        directory = self.root / LOCK_DIR
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # never through a link (_locks or the lock file planted as one: opening it for writing created or
            # touched the file it names, such as /etc/nologin when run as root), never waiting on a FIFO
            # A lock entry that is no regular file (a link, a FIFO) holds no lock: it is removed (unlinkat: the
            # entry itself) and made again, so a planted one cannot stop every rewrite either
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            with fsutil.beneath(self.root, [LOCK_DIR]) as folder:
                try:
                    fd = os.open(f"{name}.lock", flags, 0o640, dir_fd=folder)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENXIO):
                        raise
                    fd = -1
                if fd >= 0 and not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    fd = -1
                if fd < 0:
                    if stat.S_ISDIR(os.lstat(f"{name}.lock", dir_fd=folder).st_mode):
                        raise OSError(errno.EISDIR, "a folder planted as the lock file", f"{name}.lock")
                    os.unlink(f"{name}.lock", dir_fd=folder)
                    fd = os.open(f"{name}.lock", flags | os.O_EXCL, 0o640, dir_fd=folder)
            handle = os.fdopen(fd, "r+")
        except OSError as exc:
            raise LakeError(f"cannot take the rewrite lock of {name} in {directory}: {exc}") from exc
        with handle:
            if not self._flock(handle, name, wait):
                yield False
                return
            try:
                # who holds it, for a waiter's message (a planted text is only ever printed, cut short)
                handle.seek(0)
                handle.truncate()
                started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                handle.write(f"pid {os.getpid()} ({' '.join(sys.argv[:3])[:120]}) since {started}\n")
                handle.flush()
            except OSError:
                pass  # (a full disk: the lock holds all the same)
            try:
                self.refresh(name)  # what is rewritten is read after the lock is held
                self._held.add(name)
                yield True
            finally:
                self._held.discard(name)
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _flock(self, handle: Any, name: str, wait: bool) -> bool:
        """Take the lock file's exclusive flock: at once (wait False: False when busy), else waiting at most
        lock_wait_seconds(), saying on stderr after LOCK_NOTICE_S whom it waits for; LakeError after that."""
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not wait:
                return False
        limit = lock_wait_seconds()
        started, delay, told = time.monotonic(), 0.01, False
        while True:
            waited = time.monotonic() - started
            if waited >= limit:
                raise LakeError(
                    f"the {name} lock of {self.root} is still held after {waited:.0f} s, by {_lock_holder(handle)}: "
                    f"if that process is stopped or hung, end it; for longer rewrites set {LOCK_WAIT_ENV} "
                    "(seconds). Nothing was changed by this run after it began to wait."
                )
            if not told and waited >= LOCK_NOTICE_S:
                _lock_log.warning(
                    "waiting for the %s lock of %s, held by %s (up to %.0f s)",
                    name,
                    self.root,
                    _lock_holder(handle),
                    limit,
                )
                told = True
            time.sleep(min(delay, max(limit - waited, 0.0)))
            delay = min(delay * 2, 1.0)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                continue

    def ingest(
        self,
        dataset: str,
        source: str,
        content_hash: str | None,
        row_group_rows: int = ROW_GROUP_ROWS,
        background: bool = False,
    ) -> IngestWriter:
        """Open a writer for one source. Use as a context manager; call `commit()` at the end (content_hash
        None: give it with `identify()` before). `background`: row groups are sorted and written by a thread
        while the caller goes on (RowGroupWriter)."""
        return IngestWriter(self, _dataset(dataset), source, content_hash, row_group_rows, background)

    def replace_dataset(self, name: str, table: pa.Table, info: dict[str, Any] | None = None) -> Path:
        """Replace an unpartitioned derived dataset (vm_leases, vms, intel) with `table`, in one commit
        (`info` is recorded with it, see commit_infos)."""
        dataset = _dataset(name)
        if dataset.partition_ts is not None:
            raise LakeError(f"{name} is partitioned; use ingest() or rewrite()")
        with self.lock(name):
            old = self.entries(name)
            part = PartFile(self.root / name, dataset, None, f"part-{uuid.uuid4().hex}")
            try:
                part.write(table)
                add = part.close()
            except BaseException:
                part.abort()
                raise
            self.commit(
                name,
                [add] if add is not None else [],
                [_remove(e.relative, None, e.size) for e in old],
                info={"operation": "replace", "rows": table.num_rows, **(info or {})},
            )
            self.retire_log(name)
        return part.path

    def files_added_since(self, name: str, version: int) -> list[FileEntry] | None:
        """The table's current files that commits after `version` added with new rows: a file that
        compaction made only from files already there at `version` is not new (its rows were). None when the
        log entries after `version` are gone (then everything counts as new)."""
        latest = self.version(name)
        if latest is None:
            return None
        added: set[str] = set()
        for v in range(version + 1, latest + 1):
            actions = self._log_actions(name, v)
            if actions is None:
                return None
            adds = [a["add"]["path"] for a in actions if "add" in a]
            removes = {a["remove"]["path"] for a in actions if "remove" in a}
            info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
            operation = json.loads(info.get("tracepipe") or "{}").get("operation")
            if operation == "compact" and not (removes & added):
                continue  # the same rows in fewer files
            added.update(adds)
        return [e for e in self.entries(name) if e.relative in added]

    def landed_since(
        self, name: str, version: int
    ) -> tuple[list[FileEntry], list[FileEntry], dict[str, tuple[dt.datetime, dt.datetime]]] | None:
        """What ingest landed in a table after `version`: (the current files an ingest added, whose rows are
        all new; the current files that rewrites made of such files, whose new rows are those of the sources
        within their ranges; per source, the range of the table's time its ingests wrote). Rows move when files
        are rewritten (attribution, compaction): a rewrite that removed a file holding new rows adds files that
        may hold them beside rows that were there before, told apart by `source` and time (a path ingested
        again names rows of before too). None when the log entries after `version` are gone."""
        latest = self.version(name)
        if latest is None:
            return None
        column = _dataset(name).partition_ts or "ts_start"
        direct: set[str] = set()
        carried: set[str] = set()
        ranges: dict[str, tuple[dt.datetime, dt.datetime]] = {}
        for v in range(version + 1, latest + 1):
            actions = self._log_actions(name, v)
            if actions is None:
                return None
            adds = {a["add"]["path"]: a["add"] for a in actions if "add" in a}
            removes = {a["remove"]["path"] for a in actions if "remove" in a}
            info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
            try:
                meta = json.loads(info.get("tracepipe") or "{}")
            except ValueError:
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            if "operation" not in meta and isinstance(meta.get("source"), str):  # (an ingest's commit)
                direct |= set(adds)
                low, high = ranges.get(meta["source"], (_LATEST, _EARLIEST))
                for add in adds.values():
                    first, last = _time_bounds(add, column)
                    low, high = min(low, first), max(high, last)
                if adds:
                    ranges[meta["source"]] = (low, high)
            elif removes & (direct | carried):  # (a rewrite of files holding such rows)
                carried |= set(adds)
            direct -= removes
            carried -= removes
        entries = self.entries(name)
        return (
            [e for e in entries if e.relative in direct],
            [e for e in entries if e.relative in carried],
            ranges,
        )

    def replace_files(
        self,
        name: str,
        removed: list[FileEntry],
        tables: Iterable[pa.Table],
        info: dict[str, Any] | None = None,
        row_group_rows: int = ROW_GROUP_ROWS,
    ) -> int:
        """One commit of an unpartitioned derived dataset (vm_leases, vms) that removes `removed` and adds one
        file per table: the incremental update of a few files. The caller holds the table's lock (it read
        `removed` under it). Returns the version."""
        dataset = _dataset(name)
        if dataset.partition_ts is not None or name not in self._held:
            raise LakeError(f"replace_files({name}) needs an unpartitioned table and its lock")
        tables = list(tables)
        parts = [
            PartFile(self.root / name, dataset, None, f"part-{uuid.uuid4().hex}", row_group_rows)
            for _ in tables
        ]

        def write(part: PartFile, table: pa.Table) -> AddAction | None:
            part.write(table)
            return part.close()

        # the files side by side, one thread per core (Arrow's encoding, compression and writes release the
        # GIL): a full rebuild writes a hundred files per table
        try:
            if len(parts) > 1:
                written = _in_threads(write, parts, min(fsutil.cores(), len(parts)), "lake-write", tables)
            else:
                written = [write(part, table) for part, table in zip(parts, tables, strict=True)]
        except BaseException:
            for part in parts:
                part.abort()
            raise
        adds = [add for add in written if add is not None]
        rows = sum(p.rows for p in parts)
        version = self.commit(
            name,
            adds,
            [_remove(e.relative, None, e.size) for e in removed],
            info={"operation": "update", "rows": rows, **(info or {})},
        )
        self.retire_log(name)  # (rewritten every hour, never compacted: its log and replaced files)
        return version

    def adopt_files(
        self, name: str, removed: list[FileEntry], paths: list[Path], info: dict[str, Any] | None = None
    ) -> int:
        """One commit of an unpartitioned derived dataset that removes `removed` and adds the finished files
        `paths`, written for this dataset by PartFile elsewhere in the lake (a staged rebuild): moved into the
        table's folder under new names (copied where they cannot be moved), listed with the statistics their
        footers hold. Until the commit they are in no table version, as any part file. The caller holds the
        table's lock. Returns the version."""
        dataset = _dataset(name)
        if dataset.partition_ts is not None or name not in self._held:
            raise LakeError(f"adopt_files({name}) needs an unpartitioned table and its lock")
        directory = self.dataset_dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        adds: list[AddAction] = []
        moved: list[Path] = []
        rows = 0
        try:
            for source in paths:
                relative = f"part-{uuid.uuid4().hex}.parquet"
                target = directory / relative
                try:
                    os.replace(source, target)
                except OSError:  # (another filesystem)
                    with fsutil.replacing(target) as tmp:
                        tmp.write_bytes(Path(source).read_bytes())
                moved.append(target)
                meta = pq.read_metadata(target)
                rows += meta.num_rows
                adds.append(
                    AddAction(
                        relative, target.stat().st_size, {}, int(time.time() * 1000), True, file_stats(meta)
                    )
                )
            fsutil.fsync_dir(directory)
        except BaseException:  # (every file moved so far, the one whose footer failed too)
            for target in moved:
                target.unlink(missing_ok=True)
            raise
        version = self.commit(
            name,
            adds,
            [_remove(e.relative, None, e.size) for e in removed],
            info={"operation": "update", "rows": rows, **(info or {})},
        )
        self.retire_log(name)
        return version

    def commit_infos(self, name: str, limit: int = 1) -> list[dict[str, Any]]:
        """What was recorded with the latest `limit` commits of a table (Lake.commit's `info`, plus its
        "version"), newest first; [] when the table does not exist."""
        latest = self.version(name)
        if latest is None:
            return []
        # read from the log's own commit files, not DeltaTable.history(): delta-rs 1.x lists the log as an
        # object-store URL, and a lake path holding `[`, `*` or `?` gave an empty history (so leases were
        # rebuilt in full every hour and recorded facts were lost)
        out = []
        for version in range(latest, max(-1, latest - limit), -1):
            actions = self._log_actions(name, version)
            if actions is None:  # that commit's file is gone (log retention): nothing older either
                break
            commit = next((a["commitInfo"] for a in actions if isinstance(a, dict) and "commitInfo" in a), {})
            try:  # written by tracepipe as a JSON object in a string; anything else (a hand-edited log): none
                info = json.loads(commit.get("tracepipe") or "{}") if isinstance(commit, dict) else {}
            except (TypeError, ValueError):
                info = {}
            info = info if isinstance(info, dict) else {}
            info["version"] = version
            out.append(info)
        return out

    def _log_actions(self, name: str, version: int) -> list[dict[str, Any]] | None:
        """The actions of commit `version` of a table (its _delta_log JSON lines); None when unreadable."""
        path = self.root / name / "_delta_log" / f"{version:020d}.json"
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            return None

    def rewrite(
        self,
        name: str,
        days: Iterable[str] | None,
        transform: Callable[[pa.RecordBatch], pa.RecordBatch | pa.Table],
        select: Callable[[list[FileEntry]], list[FileEntry]] | None = None,
        data_change: bool = True,
        info: dict[str, Any] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        wait: bool = True,
    ) -> dict[str, int]:
        """Rewrite the files of `days` (None = every day) through `transform`, one commit per day that
        removes the old files and adds the new ones, under the table's rewrite lock. Streamed: memory is one
        row group. `select` narrows the files of a day (compaction: the small ones). Appends that land
        meanwhile are untouched. Returns {"days", "files_removed", "files_added", "rows"}."""
        dataset = _dataset(name)
        summary = {"days": 0, "files_removed": 0, "files_added": 0, "rows": 0}
        with self.lock(name, wait=wait) as got:
            if not got:
                return summary
            entries = self.entries(name, days)
            by_day: dict[str | None, list[FileEntry]] = {}
            for entry in entries:
                by_day.setdefault(entry.day, []).append(entry)
            for done, (day, day_entries) in enumerate(sorted(by_day.items(), key=lambda kv: kv[0] or ""), 1):
                chosen = select(day_entries) if select is not None else day_entries
                if chosen:
                    rows, added = self._rewrite_day(name, dataset, day, chosen, transform, data_change, info)
                    summary["days"] += 1
                    summary["files_removed"] += len(chosen)
                    summary["files_added"] += added
                    summary["rows"] += rows
                if progress is not None:
                    progress(day or "", done, len(by_day))
        return summary

    def _rewrite_day(
        self,
        name: str,
        dataset: Dataset,
        day: str | None,
        entries: list[FileEntry],
        transform: Callable[[pa.RecordBatch], pa.RecordBatch | pa.Table],
        data_change: bool,
        info: dict[str, Any] | None,
    ) -> tuple[int, int]:
        base = self.root / name
        parts: list[PartFile] = []
        part: PartFile | None = None
        adds: list[AddAction] = []
        named = [_SOURCE_FILE.match(Path(e.relative).name) for e in entries]
        confirmed = self._confirmed({m.group(1) for m in named if m is not None})
        try:
            for entry in entries:
                # the file of a source whose manifest row is not there yet (its run may have been killed in
                # between) is rewritten on its own and keeps its source's name: see already_ingested
                match = _SOURCE_FILE.match(_file_name(entry.relative))
                own = match is not None and match.group(1) not in confirmed
                alone = (
                    PartFile(base, dataset, day, f"part-{match.group(1)}-{uuid.uuid4().hex[:8]}")
                    if own
                    else None
                )
                if alone is not None:
                    parts.append(alone)
                for batch in pq.ParquetFile(entry.path).iter_batches(batch_size=256_000):
                    out = transform(batch)
                    table = out if isinstance(out, pa.Table) else pa.Table.from_batches([out])
                    if alone is not None:
                        alone.write(table)
                        continue
                    if part is None or part.rows + part._pending_rows >= ROW_GROUP_ROWS * 8:
                        if part is not None:
                            action = part.close()
                            if action is not None:
                                adds.append(action)
                        part = PartFile(base, dataset, day, f"part-{uuid.uuid4().hex}")
                        parts.append(part)
                    part.write(table)
                if alone is not None:
                    action = alone.close()
                    if action is not None:
                        adds.append(action)
            if part is not None:
                action = part.close()
                if action is not None:
                    adds.append(action)
        except BaseException:
            for p in parts:
                p.abort()
            raise
        rows = sum(p.rows for p in parts)
        self.commit(
            name,
            adds,
            [_remove(e.relative, e.day, e.size, data_change) for e in entries],
            info={**(info or {}), "day": day, "rows": rows},
        )
        return rows, len(adds)

    def append(self, name: str, table: pa.Table, key: str | None = None) -> list[Path]:
        """Add rows that are not tied to an input file (alerts): one commit, idempotent by `key` (any text
        naming the batch, e.g. a hash of its alert ids; default a random id)."""
        content_hash = hash_bytes(f"append:{name}:{key or uuid.uuid4().hex}".encode())
        result = ingest_table(self, name, f"append:{key}", content_hash, [table])
        return [self.root / f for f in result.files if f.startswith(f"{name}/")]

    # ---- maintenance -------------------------------------------------------------------------------------
    def retire_log(self, name: str) -> int:
        """After a rewrite, under the table's lock: the commits that log retention lets go (those before the
        newest checkpoint older than LOG_RETENTION, themselves that old: what delta-rs' cleanup_metadata
        deletes) leave the log, and the files those commits removed leave the disk with them. No version the
        log can still rebuild lists such a file (so time travel, which reaches back as far, never misses one),
        and only files the table's own log names are looked at, each in its table's folder (fsutil.
        unlink_beneath), never a listing of the folders. So a table rewritten every hour (vm_leases, vms)
        keeps about LOG_RETENTION of commits and of replaced files, not every one since it was made; the rest
        is `tracepipe vacuum`'s (orphans of killed writers, files removed less than --retain ago). Never fails
        the commit before it: what it cannot do, the next call or vacuum does. Returns the files deleted."""
        if name not in self._held:
            raise LakeError(f"retire_log({name}) needs the table's lock")
        table = self.table(name)
        listing = _log_files(self.root / name / "_delta_log")
        if table is None or listing is None:
            return 0
        commits, checkpoints = listing
        cutoff = time.time() - LOG_RETENTION.total_seconds()
        until = max((v for v, path in checkpoints.items() if _mtime(path) <= cutoff), default=-1)
        expired = [path for v, path in commits.items() if v < until and _mtime(path) <= cutoff]
        if not expired:
            return 0
        deleted = 0
        try:
            # (a table another tool made with a longer log retention keeps its commits longer: its files too)
            configured = table.metadata().configuration.get("delta.logRetentionDuration")
            if configured == TABLE_CONFIG["delta.logRetentionDuration"]:
                removed = set().union(*(_removed_paths(path) for path in expired))
                removed -= {entry.relative for entry in self.entries(name)}
                directory = self.root / name
                for relative in sorted(removed):
                    if _DATA_FILE.match(relative):
                        deleted += fsutil.unlink_beneath(directory, relative)
            table.cleanup_metadata()
        except (DeltaError, OSError):
            pass
        return deleted

    def compact(
        self,
        name: str,
        days: Iterable[str] | None = None,
        min_files: int = COMPACT_MIN_FILES,
        wait: bool = True,
        tiered: bool = False,
    ) -> dict[str, int]:
        """Merge the small files (< ROW_GROUP_ROWS rows) of each day that has at least `min_files` of them into
        files of sorted row groups, one commit per day (the rows are the same: data_change=false). With
        wait=False, returns at once when another process is rewriting the table.

        tiered (what ingest uses after each commit): only files of similar size are merged, `min_files` of a
        size tier (rows within a factor of 4) at a time, so that a merged file is not rewritten again by the next
        few small commits: each row is rewritten O(log n) times instead of once per merge (the manifest,
        which only grows, was rewritten whole every 16 commits)."""
        if _dataset(name).partition_ts is None:
            days = None

        def mergeable(entries: list[FileEntry]) -> list[FileEntry]:
            # a source's file whose manifest row is not there yet (its run may have been killed in between)
            # keeps its name until the rerun finds it: see already_ingested. Only these files' sources are asked
            # of the manifest, and only when their day has enough small files to merge: the manifest just
            # written by this ingest is not read back for nothing (issue 17: the commit tail)
            named = [(e, _SOURCE_FILE.match(_file_name(e.relative))) for e in entries]
            confirmed = self._confirmed({m.group(1) for _e, m in named if m is not None})
            return [e for e, m in named if m is None or m.group(1) in confirmed]

        def small(entries: list[FileEntry]) -> list[FileEntry]:
            sized = [e for e in entries if 0 <= e.rows < ROW_GROUP_ROWS]
            if len(sized) < max(min_files, 2):
                return []
            chosen = mergeable(sized)
            if tiered:
                tiers: dict[int, list[FileEntry]] = {}
                for entry in chosen:
                    tiers.setdefault(max(entry.rows, 1).bit_length() // 2, []).append(entry)
                chosen = [e for group in tiers.values() if len(group) >= max(min_files, 2) for e in group]
            return chosen if len(chosen) >= max(min_files, 2) else []

        empty = {"days": 0, "files_removed": 0, "files_added": 0, "rows": 0}
        if not wait:  # appenders call this after every commit: look at the log before taking any lock
            by_day: dict[str | None, list[FileEntry]] = {}
            for entry in self.entries(name, days):
                by_day.setdefault(entry.day, []).append(entry)
            if not any(small(group) for group in by_day.values()):
                return empty
        done = self.rewrite(
            name,
            days,
            lambda batch: batch,
            select=small,
            data_change=False,
            info={"operation": "compact"},
            wait=wait,
        )
        if done["days"]:
            with self.lock(name, wait=False) as got:
                if got:
                    # log entries older than delta.logRetentionDuration (delta-rs lists the log folder on
                    # every open and commit), and the files they removed: here, under the lock, rather than
                    # by every commit
                    self.retire_log(name)
        return done

    def expire(self, name: str, before: dt.date) -> dict[str, Any]:
        """Remove every partition of `name` older than `before` (UTC day) from the table, in one commit; the
        files go at the next vacuum. Returns {"dataset", "days", "files", "rows"}: what went."""
        if _dataset(name).partition_ts is None:
            raise LakeError(f"{name} is not partitioned by day; nothing to expire")
        cutoff = before.isoformat()
        with self.lock(name):
            old = [e for e in self.entries(name) if e.day is not None and e.day < cutoff]
            if old:
                self.commit(
                    name,
                    [],
                    [_remove(e.relative, e.day, e.size) for e in old],
                    info={"operation": "expire", "before": cutoff},
                )
        return {
            "dataset": name,
            "days": sorted({e.day for e in old if e.day}),
            "files": len(old),
            "rows": sum(max(e.rows, 0) for e in old),
        }

    def vacuum(self, retain: dt.timedelta = RETAIN_REMOVED) -> dict[str, int]:
        """Delete files that no table version within `retain` still lists (removed by compaction, expiry and
        rewrites; and orphans of killed writers), and expired log entries. Returns {dataset: files deleted}."""
        # at least an hour: a file a writer is still finishing is untracked too, and only its age protects it
        hours = max(int(retain.total_seconds() // 3600), 1)
        out: dict[str, int] = {}
        for name in [*DATASETS, MANIFEST_DIR]:
            with self.lock(name):
                table = self.table(name)
                if table is None:
                    continue
                # listed by delta-rs, removed here: only files reached without a link (fsutil.unlink_beneath)
                listed = table.vacuum(
                    retention_hours=hours, dry_run=True, enforce_retention_duration=False, full=True
                )
                table.cleanup_metadata()
                out[name] = sum(fsutil.unlink_beneath(self.root / name, relative) for relative in listed)
        return out

    def upgrade(self) -> dict[str, int]:
        """Put a lake of the old layout (Parquet files, `_ingest/*.parquet`) under transaction logs, in place:
        each dataset's existing files are added to a new table in one commit (no data is copied; flow files
        get the attributed_at column by one streamed rewrite). Tables of the current layout get the columns
        added to schema.py since they were written (as the next write to them would). Idempotent. Returns
        {dataset: files}."""
        out: dict[str, int] = {}
        # A lake whose manifest is a table is of the current layout: a dataset folder without a log there holds
        # nothing the lake wrote (a folder planted by whoever can write the lake made every upgrade fail), and
        # a folder that is a link is never walked (its files and .tmp leftovers are not the lake's to remove).
        old_layout = self.is_old_layout() or not (self.root / MANIFEST_DIR / "_delta_log").is_dir()
        for name in [MANIFEST_DIR, *DATASETS]:
            dataset = _dataset(name)
            directory = self.root / name
            if not old_layout or directory.is_symlink():
                continue
            if (directory / "_delta_log").is_dir() or not directory.is_dir():
                continue
            # what an upgrade killed before its commit left: conformed copies (the originals are still there)
            for stale in [*directory.rglob(f"{UPGRADED}*.parquet"), *directory.rglob("*.parquet.tmp")]:
                stale.unlink()
            files = sorted(p for p in directory.rglob("*.parquet") if p.is_file())
            adds = []
            replaced: list[Path] = []
            for path in files:
                relative = path.relative_to(directory).as_posix()
                day = None
                if dataset.partition_ts is not None:
                    day = path.parent.name.removeprefix(f"{PARTITION}=")
                if name == "flows" or not _same_columns(path, dataset.schema):
                    # older files lack columns added since (flows: attributed_at): rewrite them conformed
                    part = PartFile(directory, dataset, day, f"{UPGRADED}{uuid.uuid4().hex}")
                    for batch in pq.ParquetFile(path).iter_batches(batch_size=256_000):
                        part.write(pa.Table.from_batches([batch]))
                    action = part.close()
                    replaced.append(path)  # deleted only once the commit names its copy
                    if action is not None:
                        adds.append(action)
                    continue
                meta = pq.read_metadata(path)
                adds.append(
                    AddAction(
                        relative,
                        path.stat().st_size,
                        {PARTITION: day} if day is not None else {},
                        int(path.stat().st_mtime * 1000),
                        True,
                        file_stats(meta),
                    )
                )
            create_table_with_add_actions(
                str(directory),
                DeltaSchema.from_arrow(table_schema(dataset)),
                adds,
                mode="error",
                partition_by=[PARTITION] if dataset.partition_ts is not None else None,
                configuration=TABLE_CONFIG,
            )
            for path in replaced:  # not in the log: never read again; removed now rather than at vacuum
                path.unlink(missing_ok=True)
            out[name] = len(adds)
        self.refresh()
        for name in [MANIFEST_DIR, *DATASETS]:  # tables of an older tracepipe: the columns added since
            table = self.table(name)
            if table is not None and self.as_of is None:
                self._evolve(name, table)
        return out


def _same_columns(path: Path, schema: pa.Schema) -> bool:
    return set(pq.read_schema(path).names) >= set(schema.names)


def plausible_times(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """True where a time lies inside units.time_window (1990 .. now + 1 day); false where not, or null."""
    earliest, latest = time_window()
    return pc.fill_null(
        pc.and_(
            pc.greater_equal(column, pa.scalar(earliest, column.type)),
            pc.less_equal(column, pa.scalar(latest, column.type)),
        ),
        False,
    )


def implausible_detail(column: pa.Array | pa.ChunkedArray, name: str) -> pa.Array:
    """The reject detail of times outside the window: `name=<time> (plausible: 1990-01-01 .. now + 1 day)`."""
    earliest, _ = time_window()
    shown = pc.fill_null(pc.cast(column, pa.string()), "null")
    return pc.binary_join_element_wise(
        f"{name}=", shown, f" (plausible: {earliest:%Y-%m-%d} .. now + 1 day)", ""
    )


def split_implausible(table: pa.Table, dataset: Dataset) -> tuple[pa.Table, pa.Table]:
    """(rows kept, rejects): rows whose partition time is missing or outside units.time_window (1990 .. now +
    1 day) become rejects carrying the time they claimed. Whatever a source says (a NetFlow header's clock is
    the sender's to set, a router without NTP says 1970), no row creates a partition in the far past or
    future, where retention, time travel and every "last N days" query would miss or mishandle it. Used by
    IngestWriter and by the decode workers that write their own day files (tracepipe.ingest.decode_pool)."""
    empty = pa.table({"reason": pa.array([], pa.string())})
    if table.num_rows == 0 or dataset.partition_ts is None:
        return table, empty
    column = table.column(dataset.partition_ts)
    ok = plausible_times(column)
    if pc.all(ok).as_py():
        return table, empty
    bad = table.filter(pc.invert(ok))
    detail = implausible_detail(bad.column(dataset.partition_ts), dataset.partition_ts)
    rejects = {
        "reason": pa.array(["time outside plausible window"] * bad.num_rows, pa.string()),
        "detail": detail,
    }
    for name in ("exporter", "offset", "line", "source"):
        if name in bad.column_names:
            rejects[name] = bad.column(name)
    return table.filter(ok), pa.table(rejects)


# a source's rejects written one by one (beyond: counted per reason, one row each), in row groups of
# REJECT_GROUP_ROWS: a file of 2-byte junk lines held every reject in memory until its commit (~240 bytes each:
# 8 M lines of a 16 MB syslog file 2.15 GB, a 173 KB gzip'ed conn.log 1.1 GB; session-27 review)
MAX_REJECT_ROWS = 1_000_000
REJECT_GROUP_ROWS = 65_536


# a manifest row's record of the file it landed (fsutil.file_identity), for Lake.landed_as_it_is
FILE_IDENTITY = "file"
SITE_FILE = "_settings/site.json"  # (Lake.site_id)


class IngestWriter:
    """Streams tables of one source into per-day files (part-<content hash>-<random>.parquet), then commits its
    rejects, its rows (all days in one Delta commit) and its manifest row. Memory stays flat: rows are buffered
    per day up to ROW_GROUP_ROWS, then written as one sorted row group.

    `content_hash` None: it is computed while the rows are written (a big file: hashing overlaps decoding);
    `identify()` gives it before `commit()`, which needs it. The caller checks Lake.already_ingested with it
    before committing, so a source still lands once."""

    def __init__(
        self,
        lake: Lake,
        dataset: Dataset,
        source: str,
        content_hash: str | None,
        row_group_rows: int = ROW_GROUP_ROWS,
        background: bool = False,
    ) -> None:
        self.lake = lake
        self.dataset = dataset
        self.source = source
        self.content_hash = content_hash or ""
        self.key = source_key(content_hash) if content_hash else None
        self.row_group_rows = row_group_rows
        self.result = IngestResult(dataset.name, source, self.content_hash)
        self._parts = DayParts(lake.root, dataset, self.key, row_group_rows, background=background)
        self._adopted: list[AddAction] = []  # parts written by worker processes (DayParts there)
        self._rejects: PartFile | None = None  # the source's rejects file, written as they come
        self._reject_rows = 0  # rejects written to it row by row
        self._beyond: dict[str, dict[str, int]] = {}  # rejects beyond MAX_REJECT_ROWS: per reason, counted
        self._removes: list[RemoveAction] = []
        self._committed = False
        self._set_aside = False  # (handed to a SourceBatch: set_aside)
        self.ingested_at = dt.datetime.now(dt.UTC)

    def __enter__(self) -> IngestWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed and (exc_type is not None or not self._set_aside):
            self.abort()  # (set aside: the SourceBatch that holds it commits or aborts it)

    def write(self, table: pa.Table) -> None:
        table, implausible = split_implausible(table, self.dataset)
        self.reject(implausible)
        self.result.rows += self._parts.write(table)

    def _part(self, day: str | None) -> PartFile:
        return self._parts._part(day)

    def replace(self, removed: list[FileEntry], kept: pa.Table) -> None:
        """The source's commit also removes `removed` (files of an unpartitioned table) and writes their `kept`
        rows again: a feed's new import replaces its previous rows in the same commit. The caller holds the
        table's lock (it read `removed` under it)."""
        if self.dataset.partition_ts is not None or self.dataset.name not in self.lake._held:
            raise LakeError(f"replace() on {self.dataset.name} needs an unpartitioned table and its lock")
        self._parts.write(kept)
        self._removes.extend(_remove(e.relative, None, e.size) for e in removed)

    def identify(self, content_hash: str) -> None:
        """The source's content hash, when it was not known at the start."""
        self.content_hash = self.result.content_hash = content_hash
        self.key = source_key(content_hash)

    def adopt(self, adds: list[AddAction], rows: int) -> None:
        """Parts of this source written elsewhere (a worker process's DayParts, closed): committed with the rest."""
        self._adopted.extend(adds)
        self.result.rows += rows

    def reject(self, rejects: pa.Table) -> None:
        """Rows that could not be parsed (schema.REJECTS columns; missing ones are filled in). Written to the
        source's rejects file as they come (row groups of REJECT_GROUP_ROWS), the first MAX_REJECT_ROWS of a
        source row by row, the others counted per reason (one row each at commit, saying how many and where)."""
        if rejects.num_rows == 0:
            return
        n = rejects.num_rows
        self.result.rejects += n
        room = max(MAX_REJECT_ROWS - self._reject_rows, 0)
        if n > room:
            self._beyond_cap(rejects.slice(room))
            rejects = rejects.slice(0, room)
            n = room
            if n == 0:
                return
        self._reject_rows += n
        self._reject_file().write(self._reject_columns(rejects))

    def _reject_columns(self, rejects: pa.Table) -> pa.Table:
        n = rejects.num_rows
        if "ingested_at" not in rejects.column_names:
            rejects = rejects.append_column(
                "ingested_at", pa.array([self.ingested_at] * n, REJECTS.field("ingested_at").type)
            )
        if "dataset" not in rejects.column_names:
            rejects = rejects.append_column("dataset", pa.array([self.dataset.name] * n, pa.string()))
        if "source" not in rejects.column_names:
            rejects = rejects.append_column("source", pa.array([self.source] * n, pa.string()))
        return conform(rejects, REJECTS)

    def _reject_file(self) -> PartFile:
        if self._rejects is None:  # named after the source's key at commit (PartFile.name)
            self._rejects = PartFile(
                self.lake.root / "rejects",
                DATASETS["rejects"],
                self.ingested_at.strftime("%Y-%m-%d"),
                f"part-pending-{uuid.uuid4().hex}",
                row_group_rows=REJECT_GROUP_ROWS,
            )
        return self._rejects

    def _beyond_cap(self, rejects: pa.Table) -> None:
        """Count rejects past MAX_REJECT_ROWS per reason, with the first and last line and offset they were at."""
        have = set(rejects.column_names)
        aggregates: list[tuple[str, str]] = [("reason", "count")]
        aggregates += [(c, how) for c in ("line", "offset") if c in have for how in ("min", "max")]
        grouped = rejects.group_by("reason").aggregate(aggregates).to_pylist()
        for row in grouped:
            seen = self._beyond.setdefault(row["reason"], {"count": 0})
            seen["count"] += row["reason_count"]
            for c in ("line", "offset"):
                low, high = row.get(f"{c}_min"), row.get(f"{c}_max")
                if low is not None:
                    seen[f"{c}_min"] = min(low, seen.get(f"{c}_min", low))
                    seen[f"{c}_max"] = max(high, seen.get(f"{c}_max", high))

    def _beyond_rows(self) -> pa.Table:
        """One reject row per reason counted beyond MAX_REJECT_ROWS: at its first line / offset, how many."""
        rows = []
        for reason, seen in sorted(self._beyond.items()):
            where = "; ".join(
                f"{c}s {seen[f'{c}_min']}..{seen[f'{c}_max']}"
                for c in ("line", "offset")
                if f"{c}_min" in seen
            )
            rows.append(
                {
                    "reason": reason,
                    "line": seen.get("line_min"),
                    "offset": seen.get("offset_min"),
                    "detail": f"{seen['count']} more rejects of this reason, not listed one by one (the first "
                    f"{MAX_REJECT_ROWS:,} rejects of a source are){': ' + where if where else ''}",
                }
            )
        schema = pa.schema(
            [("reason", pa.string()), ("line", pa.int64()), ("offset", pa.int64()), ("detail", pa.string())]
        )
        return pa.Table.from_pylist(rows, schema=schema)

    def commit(self, stats: dict[str, Any] | None = None) -> IngestResult:
        """Finish the files, then commit: rejects, the rows (the commit that makes the source count as
        ingested), the manifest row; then compact the days touched if they crossed the threshold."""
        return commit_sources(self.lake, [(self, stats)])[0]

    def set_aside(self) -> None:
        """Finish the source's data files now (fsynced and renamed, not committed: no reader sees them), for a
        SourceBatch that commits it later with others; its rejects stay buffered until then."""
        if self.key is None:
            raise LakeError(f"{self.source}: set aside before its content hash was known (a bug)")
        self._adopted.extend(self._parts.close(self.key))
        self._parts = DayParts(self.lake.root, self.dataset, self.key, self.row_group_rows)
        self._set_aside = True

    def _close_rejects(self) -> AddAction | None:
        """The source's rejects file, finished under its final name; None when there is none, or when a run
        killed after committing them left them in the lake already."""
        lake = self.lake
        part, self._rejects = self._rejects, None
        if part is None:
            return None
        if lake._source_entries("rejects", self.content_hash):
            part.abort()  # (a run killed after committing them: they are in the lake already)
            return None
        if self._beyond:
            part.write(self._reject_columns(self._beyond_rows()))
        part.name(f"part-{self.key}-{uuid.uuid4().hex[:8]}")
        action = part.close()
        self.result.files.append(f"rejects/{part.relative}")
        return action

    def abort(self) -> None:
        self._set_aside = False
        self._parts.abort()
        part, self._rejects = self._rejects, None
        if part is not None:
            part.abort()
        for add in self._adopted:  # renamed into place by a worker, never committed: not part of the lake
            (self.lake.root / self.dataset.name / add.path).unlink(missing_ok=True)
        self._adopted.clear()


def commit_sources(lake: Lake, items: list[tuple[IngestWriter, dict[str, Any] | None]]) -> list[IngestResult]:
    """Commit the sources of `items` (writers of one dataset, with each one's stats): their rejects in one
    commit, their rows in one (the commit that makes them count as ingested), their manifest rows in one; then
    compact the days touched if they crossed the threshold. Each source's files are named after its content
    hash and each has its manifest row, so a kill between the commits is recovered source by source
    (Lake.already_ingested). A source already in the lake, or given twice, is skipped (result.skipped)."""
    if not items:
        return []
    dataset = items[0][0].dataset
    for writer, _stats in items:
        if writer.key is None or writer.dataset.name != dataset.name:
            raise LakeError(f"{writer.source}: committed before its content hash was known (a bug)")
    try:
        with lake.lock(f"ingest-{dataset.name}"):
            adds = _commit_locked(lake, dataset, items)
    except BaseException as exc:
        # (files not committed are removed; those of a commit made are not the writers' any more)
        for writer, _stats in items:
            writer.abort()
        if not isinstance(exc, OSError):
            raise
        others = f" and {len(items) - 1} other sources" if len(items) > 1 else ""
        raise LakeError(f"cannot commit {items[0][0].source}{others} to {lake.root}: {exc}") from exc
    for writer, _stats in items:
        writer._committed = True
    if adds is not None:
        days = sorted({a.partition_values[PARTITION] for a in adds if a.partition_values.get(PARTITION)})
        try:
            for name, touched in ((dataset.name, days), (MANIFEST_DIR, None)):
                lake.compact(name, touched or None, wait=False, tiered=True)
            if days:
                # the day before the newest one this source wrote is closed (a collector has moved on): merge
                # what is small there into one file, once, so that a past day is a file or two, not ~20 tiers.
                # Not when the day holds only this source's files (a one-shot ingest across midnight, one file
                # per decode worker): merging them would write the same rows twice, right after writing them.
                closed = (dt.date.fromisoformat(days[-1]) - dt.timedelta(days=1)).isoformat()
                ours = {a.path for a in adds}
                if any(e.relative not in ours for e in lake.entries(dataset.name, [closed])):
                    lake.compact(dataset.name, [closed], min_files=2, wait=False)
        except (LakeError, OSError) as exc:  # compaction is housekeeping: the rows are committed, a later run
            # merges (a full disk here ended the run with exit 4 and "nothing landed" after its commit: a review)
            _lock_log.warning("compaction after the commit of %s left for later: %s", dataset.name, exc)
    return [writer.result for writer, _stats in items]


def _commit_locked(
    lake: Lake, dataset: Dataset, items: list[tuple[IngestWriter, dict[str, Any] | None]]
) -> list[AddAction] | None:
    """commit_sources' commits, under the dataset's ingest lock: two commands landing the same content at once
    (the same file given to both, or under two paths) both pass their first already_ingested check while
    they decode; it is made again here, where no other ingest of the dataset commits in between, and the
    later one drops its files (result.skipped) instead of landing the rows twice. None: every source skipped."""
    # the latest commits, read incrementally (a full re-open would read the whole checkpoint: a cost that
    # grows with the table's history, paid by every commit of a collector running for years)
    lake.catch_up(MANIFEST_DIR)
    lake.catch_up(dataset.name)
    landing: list[tuple[IngestWriter, dict[str, Any], list[AddAction]]] = []
    hashes: set[str] = set()
    for writer, stats in items:
        if writer.content_hash in hashes or lake.already_ingested(
            dataset.name, writer.content_hash, holding=True
        ):
            writer.abort()
            writer._committed = True
            writer.result.skipped = True
            continue
        hashes.add(writer.content_hash)
        writer._adopted.extend(writer._parts.close(writer.key))  # (removed by an abort until committed)
        landing.append((writer, stats or {}, list(writer._adopted)))
    if not landing:
        return None
    first = landing[0][0]
    info: dict[str, Any] = {
        "source": first.source,
        "content_hash": first.content_hash,
        "rows": sum(w.result.rows for w, _s, _a in landing),
    }
    if len(landing) > 1:
        info["sources"] = len(landing)
    # rejects first, then the rows (the commit that makes the source count as landed), then the
    # manifest row; a rerun after a kill in between finds what landed by its file names
    rejected = [a for a in (w._close_rejects() for w, _s, _a in landing) if a is not None]
    if rejected:
        lake.commit("rejects", rejected, info=info)
    adds: list[AddAction] = []
    removes: list[RemoveAction] = []
    landed: list[tuple[IngestWriter, list[AddAction]]] = []
    for writer, stats, written in landing:
        writer.result.stats = stats
        if not written and not writer.result.rows and writer.result.rejects and not stats.get("duplicates"):
            # wholly rejected (no capture, no known format, every record bad): its rejects are recorded (once:
            # their file is named after the content), but the source does not count as ingested. A rerun reads
            # it again and says so again (exit 4), instead of "skipped, already in the lake" and exit 0; and
            # every other file of that content (an empty one) is not taken for landed either. (A source whose
            # records are all in the lake already, a log that grew by rejected lines, is recorded: its rerun is
            # skipped)
            continue
        adds += written
        removes += writer._removes
        landed.append((writer, written))
    if not landed:
        return adds
    version = lake.commit(dataset.name, adds, removes, info=info)
    for writer, written in landed:
        writer._adopted = []  # (committed: part of the lake now, never removed by an abort after this)
        writer.result.version = version
        writer.result.files[:0] = [f"{dataset.name}/{a.path}" for a in written]
    lake._write_manifest_rows(
        [
            {
                "content_hash": w.content_hash,
                "dataset": dataset.name,
                "source": w.source,
                "rows": w.result.rows,
                "rejects": w.result.rejects,
                "files": w.result.files,
                "ingested_at": w.ingested_at,
                "stats": json.dumps(w.result.stats, default=str),
            }
            for w, _written in landed
        ]
    )
    return adds


class SourceBatch:
    """Sources of one dataset landed by one run, committed together (commit_sources) every `max_sources`
    sources or once they hold `max_rows` rows and rejects, and at the end (use as a context manager: an error in
    the caller's loop still commits the sources taken before it, an interrupt aborts them). A relay's folder of a
    syslog file per VM paid two commits, their fsyncs and a compaction check per file: 200 files of 500 lines
    took 13.9 s (1.4 s as one file), 6.2 s in batches."""

    def __init__(self, lake: Lake, max_sources: int = 64, max_rows: int = ROW_GROUP_ROWS) -> None:
        self.lake = lake
        self.max_sources = max_sources
        self.max_rows = max_rows
        self._items: list[tuple[IngestWriter, dict[str, Any] | None]] = []
        self._rows = 0
        self._hashes: set[str] = set()
        self._sources: set[str] = set()

    def __enter__(self) -> SourceBatch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or issubclass(exc_type, Exception):
            # (an error in one source's read: the sources before it land, as they did one commit each; a
            # review: one vanished file threw away the 63 parsed before it)
            try:
                self.flush()
            except BaseException:
                self.abort()
                if exc_type is None:
                    raise
        else:  # (interrupted, killed: nothing more is committed)
            self.abort()

    def pending(self, source: str, content_hash: str) -> bool:
        """Whether this path, or this content, waits in the batch. The caller flushes first: a path read again
        (named twice, grown since) must know the lines of its first read, and content that was wholly
        rejected is no twin to skip (review)."""
        return source in self._sources or content_hash in self._hashes

    def add(self, writer: IngestWriter, stats: dict[str, Any] | None = None) -> IngestResult:
        """Take a source whose rows are written (its result is complete once the batch commits it)."""
        try:
            writer.set_aside()
        except OSError as exc:
            writer.abort()
            raise LakeError(f"cannot write {writer.source} to {self.lake.root}: {exc}") from exc
        self._items.append((writer, stats))
        self._hashes.add(writer.content_hash)
        self._sources.add(writer.source)
        self._rows += writer.result.rows + writer.result.rejects
        if len(self._items) >= self.max_sources or self._rows >= self.max_rows:
            self.flush()
        return writer.result

    def flush(self) -> None:
        items, self._items, self._rows = self._items, [], 0
        self._hashes.clear()
        self._sources.clear()
        commit_sources(self.lake, items)

    def abort(self) -> None:
        """Remove the files of the sources not committed yet (an interrupt: nothing more is committed)."""
        items, self._items, self._rows = self._items, [], 0
        self._hashes.clear()
        self._sources.clear()
        for writer, _stats in items:
            writer.abort()


class DayParts:
    """The files one source writes into a dataset: one PartFile per UTC day of `partition_ts`, each buffering
    up to a row group. Used by IngestWriter, and by worker processes that write a share of a source's rows
    (their closed parts are then committed by the IngestWriter that adopts them).

    Files are named part-<key>-<random>.parquet (_SOURCE_FILE). `key` None: the source's content hash is still
    being computed (decoding overlaps hashing); the temp files get a provisional name and close(key) the final
    one. Either way a file carries its source's key before any commit can list it, so the crash-recovery of
    Lake.already_ingested (files of the source in the table, no manifest row) holds. `tag` (a decode worker's,
    hex): the start of every random part, and of the provisional names (part-<tag>-<random>), so that the parent
    that kills a hung worker can remove its temp files itself."""

    def __init__(
        self,
        root: Path,
        dataset: Dataset,
        key: str | None,
        row_group_rows: int = ROW_GROUP_ROWS,
        tag: str = "",
        background: bool = False,
    ) -> None:
        self.root = root
        self.dataset = dataset
        self.key = key
        self.row_group_rows = row_group_rows
        # background: row groups sorted and written by a thread (RowGroupWriter), for a process that has a
        # core to spare; not in the decode workers, which keep every core busy already
        self.behind = RowGroupWriter() if background else None
        # the first hex digits of every file's random part (a decode worker's: the parent that kills a hung
        # worker removes part-<key>-<tag>* itself)
        self.tag = tag
        self._parts: dict[str, PartFile] = {}

    def write(self, table: pa.Table) -> int:
        """Route rows to their day's file; returns the number of rows taken."""
        if table.num_rows == 0:
            return 0
        if self.dataset.partition_ts is None:
            self._part(None).write(table)
            return table.num_rows
        days = _day_numbers(table.column(self.dataset.partition_ts))
        first, last = (int(days.min()), int(days.max())) if len(days) else (0, 0)
        if first == last:  # the common case: one day, no sort of day numbers, no filter (copy)
            self._part(_day_name(first)).write(table)
            return table.num_rows
        for day in np.unique(days):
            self._part(_day_name(day)).write(table.filter(pa.array(days == day)))
        return table.num_rows

    def _part(self, day: str | None) -> PartFile:
        key = day or ""
        part = self._parts.get(key)
        if part is None:
            if self.key:
                stem = f"part-{self.key}-{(self.tag + uuid.uuid4().hex)[:8]}"
            else:  # provisional: no key yet, and a name that _SOURCE_FILE never takes for a source's file
                stem = f"part-{self.tag}-{uuid.uuid4().hex}" if self.tag else f"part-{uuid.uuid4().hex}"
            part = PartFile(
                self.root / self.dataset.name,
                self.dataset,
                day,
                stem,
                self.row_group_rows,
                layout_from_first=True,
                behind=self.behind,
            )
            self._parts[key] = part
        return part

    def close(self, key: str | None = None) -> list[AddAction]:
        """Finish every file (fsync, rename to part-<key>-<random>.parquet, `key` if given: the source's, once
        known); the add actions of those that hold rows."""
        key = key or self.key
        if key is None:
            raise LakeError("a source's files were closed before its content hash was known (a bug)")
        if self.behind is not None:
            self.behind.wait()  # no row group in flight while the files are renamed
        for part in self._parts.values():
            part.name(f"part-{key}-{(self.tag + uuid.uuid4().hex)[:8]}")
        try:
            return [a for a in (p.close() for p in self._parts.values()) if a is not None]
        finally:
            self._stop_behind()

    def abort(self) -> None:
        for part in self._parts.values():
            part.abort()
        self._parts.clear()
        self._stop_behind()

    def _stop_behind(self) -> None:
        if self.behind is not None:
            behind, self.behind = self.behind, None
            with contextlib.suppress(Exception):  # raised to the caller by close() or moot in abort()
                behind.shutdown()


def ingest_table(
    lake: Lake,
    dataset: str,
    source: str,
    content_hash: str,
    tables: Iterable[pa.Table],
    rejects: Iterable[pa.Table] = (),
    stats: dict[str, Any] | None = None,
    replacing: tuple[list[FileEntry], pa.Table] | None = None,
    batch: SourceBatch | None = None,
) -> IngestResult:
    """Convenience for small sources: skip if already ingested, else write all tables and commit (with
    `replacing`: removing those files and writing their rows to keep again in the same commit, see
    IngestWriter.replace; with `batch`: committed with the run's other sources, SourceBatch)."""
    if batch is not None and batch.pending(source, content_hash):
        batch.flush()
    if lake.already_ingested(dataset, content_hash):
        return IngestResult(dataset, source, content_hash, skipped=True)
    with lake.ingest(dataset, source, content_hash) as writer:
        for table in tables:
            writer.write(table)
        if replacing is not None:
            writer.replace(*replacing)
        for reject in rejects:
            writer.reject(reject)
        return writer.commit(stats) if batch is None else batch.add(writer, stats)
