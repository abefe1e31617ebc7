"""The only writer of Parquet. A lake is a directory with one folder per dataset (schema.DATASETS),
hive-partitioned by UTC day (`flows/date=2024-03-12/part-<hash>.parquet`), plus `_ingest/` (one manifest file
per ingested source) and `rejects/`.

Guarantees: a reader never sees half a file (write `*.parquet.tmp`, fsync, rename); a source whose content hash
is in the manifest is skipped, and leftovers of a run killed before its manifest row landed are removed when the
same source is ingested again, so re-ingesting neither loses nor doubles rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tracepipe import fsutil
from tracepipe.errors import LakeError
from tracepipe.schema import DATASETS, INGEST_MANIFEST, REJECTS, Dataset

DEFAULT_LAKE = "./lake"
MANIFEST_DIR = "_ingest"
ROW_GROUP_ROWS = 1_000_000
HASH_PREFIX = 16  # hex chars of the content hash used in file names


def default_lake_path() -> Path:
    return Path(os.environ.get("TRACEPIPE_LAKE", DEFAULT_LAKE))


def hash_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, streamed: the identity of a source in the manifest."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fsutil.fsync_dir(path)


def conform(table: pa.Table, schema: pa.Schema, text_as_dictionary: bool = False) -> pa.Table:
    """Reorder, add missing nullable columns as nulls, and cast to the declared schema.

    text_as_dictionary: string columns become dictionary<int32, string> (the in-memory form the writer
    sorts and writes fast); Parquet files store them as plain strings all the same."""
    columns = []
    fields = []
    for fld in schema:
        if fld.name in table.column_names:
            column = table.column(fld.name)
        else:
            column = pa.nulls(table.num_rows, type=fld.type)
        if text_as_dictionary and pa.types.is_string(fld.type):
            column = _text_dictionary(column)
            fld = pa.field(fld.name, column.type, fld.nullable)
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


def _writer_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema(
        [pa.field(f.name, TEXT_DICTIONARY, f.nullable) if pa.types.is_string(f.type) else f for f in schema],
        metadata=schema.metadata,
    )


def _day_strings(column: pa.ChunkedArray) -> pa.Array:
    """UTC day (YYYY-MM-DD) of each timestamp. Formatted once per distinct day: strftime per row of a
    tz-aware column costs ~2.5 µs, more than decoding the NetFlow record it belongs to."""
    micros = pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
    day_numbers = micros // 86_400_000_000 if micros.dtype.kind == "i" else np.zeros(len(micros), np.int64)
    uniq, inverse = np.unique(day_numbers, return_inverse=True)
    epoch = dt.date(1970, 1, 1)
    names = pa.array([(epoch + dt.timedelta(days=int(d))).isoformat() for d in uniq], pa.string())
    return names.take(pa.array(inverse.astype(np.int32)))


def sort_indices(table: pa.Table, keys: tuple[str, ...]) -> pa.Array:
    """Row order by `keys` ascending, nulls last (as Table.sort_by). Text keys are ranked through their
    distinct values and the ranks of all keys packed into one int64 when they fit (else numpy lexsort):
    Arrow's multi-key sort on a text column is ~10x slower, and every flows row group is sorted by
    (src_addr, ts_start)."""
    ranks: list[np.ndarray] = []  # per key, an integer >= 0 per row, nulls largest
    for name in keys:
        column = table.column(name).combine_chunks()
        if (
            pa.types.is_dictionary(column.type)
            or pa.types.is_string(column.type)
            or pa.types.is_large_string(column.type)
        ):
            encoded = column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column)
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
        return pa.array(np.argsort(packed))
    return pa.array(np.lexsort(ranks[::-1]))


def write_parquet_atomic(table: pa.Table, path: Path, row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """Write one complete Parquet file: temp name, fsync, rename over `path` (atomic replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with fsutil.replacing(path) as tmp:
            pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_rows)
    except OSError as exc:
        raise LakeError(
            f"cannot write {path}: {exc}. Check that the lake is writable and has free space."
        ) from exc


@dataclass
class IngestResult:
    dataset: str
    source: str
    content_hash: str
    rows: int = 0
    rejects: int = 0
    skipped: bool = False  # already in the manifest: nothing written
    files: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


class Lake:
    """A lake directory. Cheap to construct; creates folders only when writing."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_lake_path()

    # ---- reading helpers (the readers themselves are DuckDB, polars, pyarrow, Spark) ----
    def dataset_dir(self, name: str) -> Path:
        if name not in DATASETS:
            raise LakeError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
        return self.root / name

    def files(self, name: str) -> list[Path]:
        directory = self.dataset_dir(name)
        if not directory.exists():
            return []
        return sorted(p for p in directory.rglob("*.parquet") if p.is_file())

    def glob(self, name: str) -> str:
        """Pattern for DuckDB's read_parquet(..., hive_partitioning=true)."""
        dataset = DATASETS[name]
        directory = self.dataset_dir(name)
        return str(directory / ("*/*.parquet" if dataset.partition_ts else "*.parquet"))

    def read(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """Whole dataset as one Arrow table (small datasets and tests; big ones go through DuckDB/polars)."""
        paths = self.files(name)
        schema = DATASETS[name].schema
        if not paths:
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        tables = [
            conform(
                pq.read_table(p, columns=columns),
                schema if columns is None else pa.schema([schema.field(c) for c in columns]),
            )
            for p in paths
        ]
        return pa.concat_tables(tables)

    # ---- manifest ----
    def _manifest_path(self, dataset: str, content_hash: str) -> Path:
        return self.root / MANIFEST_DIR / f"{dataset}-{content_hash}.parquet"

    def already_ingested(self, dataset: str, content_hash: str) -> bool:
        return self._manifest_path(dataset, content_hash).exists()

    def manifest(self) -> pa.Table:
        directory = self.root / MANIFEST_DIR
        paths = sorted(directory.glob("*.parquet")) if directory.exists() else []
        if not paths:
            return INGEST_MANIFEST.empty_table()
        return pa.concat_tables([conform(pq.read_table(p), INGEST_MANIFEST) for p in paths])

    # ---- writing ----
    def ingest(
        self, dataset: str, source: str, content_hash: str, metadata: dict[str, str] | None = None
    ) -> IngestWriter:
        """Open a writer for one source. Use as a context manager; call `commit()` at the end.
        `metadata` goes into the footer of every file written (e.g. query.ATTRIBUTED_KEY for flows that were
        attributed before they landed)."""
        return IngestWriter(self, DATASETS[dataset], source, content_hash, metadata=metadata)

    def replace_dataset(self, name: str, table: pa.Table) -> Path:
        """Replace an unpartitioned derived dataset (vm_leases, vms, intel) with `table`, atomically."""
        dataset = DATASETS[name]
        if dataset.partition_ts is not None:
            raise LakeError(f"{name} is partitioned; use ingest() or rewrite_file()")
        table = conform(table, dataset.schema)
        if dataset.sort_by and table.num_rows:
            table = table.take(sort_indices(table, dataset.sort_by))
        path = self.dataset_dir(name) / "part-0.parquet"
        write_parquet_atomic(table, path)
        return path

    def rewrite_file(self, path: Path, table: pa.Table, name: str) -> None:
        """Replace one existing partition file with a new version of its rows (e.g. flows with src_vm set)."""
        write_parquet_atomic(conform(table, DATASETS[name].schema), path)

    def rewrite_file_batches(
        self,
        path: Path,
        batches: Iterable[pa.RecordBatch],
        name: str,
        metadata: dict[str, str] | None = None,
        row_group_rows: int = ROW_GROUP_ROWS,
    ) -> int:
        """Replace one existing partition file with a stream of batches (out of core: e.g. a DuckDB result
        read from that very file), atomically: temp file, fsync, rename. `metadata` goes into the footer's
        key-value metadata (attribution marks files so). Returns the rows written."""
        schema = DATASETS[name].schema
        if metadata:
            schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
        tmp = path.with_name(path.name + ".tmp")
        rows = 0
        pending: list[pa.Table] = []
        pending_rows = 0
        try:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                for batch in batches:
                    table = conform(pa.Table.from_batches([batch]), DATASETS[name].schema)
                    pending.append(table)
                    pending_rows += table.num_rows
                    if pending_rows >= row_group_rows:
                        writer.write_table(
                            pa.concat_tables(pending).cast(schema), row_group_size=row_group_rows
                        )
                        rows += pending_rows
                        pending, pending_rows = [], 0
                if pending:
                    writer.write_table(pa.concat_tables(pending).cast(schema), row_group_size=row_group_rows)
                    rows += pending_rows
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise LakeError(
                f"cannot rewrite {path}: {exc}. Check that the lake is writable and has free space."
            ) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return rows

    def append(self, name: str, table: pa.Table, key: str | None = None) -> list[Path]:
        """Add rows that are not tied to an input file (alerts, collector batches): a new file per
        partition named by `key` (a content hash makes the write idempotent; default a random id)."""
        key = key or uuid.uuid4().hex
        writer = IngestWriter(self, DATASETS[name], f"append:{key}", key, manifest=False)
        with writer:
            writer.write(table)
            writer.commit()
        return [self.root / f for f in writer.result.files]


class IngestWriter:
    """Streams tables of one source into per-day temp files, then commits them all and the manifest row.

    Memory stays flat: rows are buffered per day up to ROW_GROUP_ROWS, then written as one row group
    (sorted by the dataset's sort key so that min/max statistics let readers skip row groups).
    """

    def __init__(
        self,
        lake: Lake,
        dataset: Dataset,
        source: str,
        content_hash: str,
        manifest: bool = True,
        row_group_rows: int = ROW_GROUP_ROWS,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.lake = lake
        self.metadata = metadata
        self.dataset = dataset
        self.source = source
        self.content_hash = content_hash
        self.key = content_hash[:HASH_PREFIX] if manifest else content_hash
        self.use_manifest = manifest
        self.row_group_rows = row_group_rows
        self.result = IngestResult(dataset.name, source, content_hash)
        self._buffers: dict[str, list[pa.Table]] = {}
        self._buffered: dict[str, int] = {}
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._tmp_paths: dict[str, Path] = {}
        self._rejects: list[pa.Table] = []
        self._committed = False
        self.ingested_at = dt.datetime.now(dt.UTC)

    # context manager: abort (delete temp files) on any exception or missing commit
    def __enter__(self) -> IngestWriter:
        self._remove_leftovers()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

    def _final_name(self) -> str:
        return f"part-{self.key}.parquet"

    def _remove_leftovers(self) -> None:
        """Files of this source written by a run that died before its manifest row: remove them, the
        rerun writes them again. Without a manifest row the source counts as not ingested."""
        name = self._final_name()
        for dataset in {self.dataset.name, "rejects"}:
            directory = self.lake.root / dataset
            if not directory.exists():
                continue
            for stale in list(directory.rglob(name)) + list(directory.rglob(name + ".tmp")):
                stale.unlink(missing_ok=True)

    def _partition_dir(self, day: str | None) -> Path:
        base = self.lake.root / self.dataset.name
        return base / f"date={day}" if day is not None else base

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = conform(table, self.dataset.schema, text_as_dictionary=True)
        self.result.rows += table.num_rows
        if self.dataset.partition_ts is None:
            self._buffer(None, table)
            return
        days = _day_strings(table.column(self.dataset.partition_ts))
        distinct = pc.unique(days).to_pylist()
        if len(distinct) == 1:  # the common case: no filter (copy) needed
            self._buffer(distinct[0], table)
            return
        for day in distinct:
            part = table.filter(pc.equal(days, day))
            self._buffer(day, part)

    def _buffer(self, day: str | None, table: pa.Table) -> None:
        key = day or ""
        self._buffers.setdefault(key, []).append(table)
        self._buffered[key] = self._buffered.get(key, 0) + table.num_rows
        if self._buffered[key] >= self.row_group_rows:
            self._flush(key)

    def _flush(self, key: str) -> None:
        tables = self._buffers.pop(key, [])
        self._buffered.pop(key, None)
        if not tables:
            return
        table = pa.concat_tables(tables).combine_chunks()  # one dictionary per text column
        if self.dataset.sort_by:
            table = table.take(sort_indices(table, self.dataset.sort_by))
        writer = self._writers.get(key)
        if writer is None:
            directory = self._partition_dir(key or None)
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / (self._final_name() + ".tmp")
            self._tmp_paths[key] = tmp
            # text columns arrive dictionary-encoded (cheap to sort and write); store_schema=False so that
            # every reader sees them as the plain strings schema.py declares
            text = [f.name for f in self.dataset.schema if pa.types.is_string(f.type)]
            writer = pq.ParquetWriter(
                tmp,
                _writer_schema(self.dataset.schema),
                compression="zstd",
                store_schema=False,
                use_dictionary=text,
            )
            if self.metadata:  # footer key-value metadata (store_schema=False keeps no schema metadata)
                writer.add_key_value_metadata(self.metadata)  # pyarrow >= 13
            self._writers[key] = writer
        writer.write_table(table, row_group_size=self.row_group_rows)

    def reject(self, rejects: pa.Table) -> None:
        """Rows that could not be parsed (schema.REJECTS columns; missing ones are filled in)."""
        if rejects.num_rows == 0:
            return
        n = rejects.num_rows
        if "ingested_at" not in rejects.column_names:
            rejects = rejects.append_column(
                "ingested_at", pa.array([self.ingested_at] * n, REJECTS.field("ingested_at").type)
            )
        if "dataset" not in rejects.column_names:
            rejects = rejects.append_column("dataset", pa.array([self.dataset.name] * n, pa.string()))
        if "source" not in rejects.column_names:
            rejects = rejects.append_column("source", pa.array([self.source] * n, pa.string()))
        self._rejects.append(conform(rejects, REJECTS))
        self.result.rejects += n

    def commit(self, stats: dict[str, Any] | None = None) -> IngestResult:
        """Close all temp files, fsync, rename, then write rejects and the manifest row (last)."""
        try:
            for key in list(self._buffers):
                self._flush(key)
            for writer in self._writers.values():
                writer.close()
            self._writers.clear()
            for tmp in self._tmp_paths.values():
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            for tmp in self._tmp_paths.values():
                final = tmp.with_name(self._final_name())
                os.replace(tmp, final)
                _fsync_dir(final.parent)
                self.result.files.append(str(final.relative_to(self.lake.root)))
            self._tmp_paths.clear()
            if self._rejects:
                rejects = pa.concat_tables(self._rejects)
                day = self.ingested_at.strftime("%Y-%m-%d")
                path = self.lake.root / "rejects" / f"date={day}" / self._final_name()
                write_parquet_atomic(rejects, path)
                self.result.files.append(str(path.relative_to(self.lake.root)))
            self.result.stats = stats or {}
            if self.use_manifest:
                row = {
                    "content_hash": [self.content_hash],
                    "dataset": [self.dataset.name],
                    "source": [self.source],
                    "rows": [self.result.rows],
                    "rejects": [self.result.rejects],
                    "files": [self.result.files],
                    "ingested_at": [self.ingested_at],
                    "stats": [json.dumps(self.result.stats, default=str)],
                }
                write_parquet_atomic(
                    pa.table(row, schema=INGEST_MANIFEST),
                    self.lake._manifest_path(self.dataset.name, self.content_hash),
                )
        except OSError as exc:
            self.abort()
            raise LakeError(f"cannot commit {self.source} to {self.lake.root}: {exc}") from exc
        self._committed = True
        return self.result

    def abort(self) -> None:
        for writer in self._writers.values():
            try:
                writer.close()
            except Exception:  # closing a half-written temp file we are about to delete
                pass
        self._writers.clear()
        for tmp in self._tmp_paths.values():
            tmp.unlink(missing_ok=True)
        self._tmp_paths.clear()
        self._buffers.clear()


def ingest_table(
    lake: Lake,
    dataset: str,
    source: str,
    content_hash: str,
    tables: Iterable[pa.Table],
    rejects: Iterable[pa.Table] = (),
    stats: dict[str, Any] | None = None,
) -> IngestResult:
    """Convenience for small sources: skip if already ingested, else write all tables and commit."""
    if lake.already_ingested(dataset, content_hash):
        return IngestResult(dataset, source, content_hash, skipped=True)
    with lake.ingest(dataset, source, content_hash) as writer:
        for table in tables:
            writer.write(table)
        for reject in rejects:
            writer.reject(reject)
        return writer.commit(stats)
