"""Flow input files (NetFlow/IPFIX export captures, nfdump CSV) -> the lake's `flows` dataset.

One file is one source: it is hashed, skipped if the manifest already holds it, otherwise streamed batch by
batch through the decoder into one lake writer, with its rejects and per-exporter counters in the manifest.
The kind of a file is told by its first bytes, not its name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from tracepipe.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, LakeError
from tracepipe.fsutil import input_problem
from tracepipe.ingest.decode_pool import DecodePool, default_jobs
from tracepipe.ingest.netflow import (
    Decoded,
    DecoderState,
    decode_datagrams,
    flush_pending,
    merge_stats,
    walk_datagrams,
)
from tracepipe.ingest.nfdump import iter_nfdump_csv, looks_like_nfdump_csv
from tracepipe.ingest.pcap import PCAP_MAGIC, PCAPNG_SHB, iter_udp_batches
from tracepipe.lake import IngestWriter, Lake, hash_file

Progress = Callable[[int], None]  # called with the number of input bytes just consumed
BATCH_DATAGRAMS = 4096  # ~5 MB of export datagrams per decode step: memory stays flat, overhead negligible
# captures from this size on are decoded by worker processes when jobs > 1 (spawning them costs ~1 s)
PARALLEL_MIN_BYTES = 64 << 20


@dataclass
class FileResult:
    path: str
    kind: str  # pcap, nfdump-csv, unknown, missing
    status: str  # landed, skipped (already ingested), rejected (nothing usable), missing
    flows: int = 0
    rejects: int = 0
    datagrams: int = 0
    message: str = ""


@dataclass
class IngestSummary:
    files: list[FileResult] = field(default_factory=list)
    exporters: dict[str, dict[str, Any]] = field(default_factory=dict)
    days: set[str] = field(default_factory=set)  # UTC days of the flows partitions written: the caller
    # attributes them (tracepipe.correlate.attribution.correlate); ingest never imports correlation

    @property
    def flows(self) -> int:
        return sum(f.flows for f in self.files)

    @property
    def rejects(self) -> int:
        return sum(f.rejects for f in self.files)

    @property
    def datagrams(self) -> int:
        return sum(f.datagrams for f in self.files)

    @property
    def exit_code(self) -> int:
        """0 everything landed (or was there already), 3 some input rejected, 4 nothing usable."""
        usable = [f for f in self.files if f.status in ("landed", "skipped")]
        if not usable or (self.flows == 0 and not any(f.status == "skipped" for f in self.files)):
            return EXIT_FAILED
        if self.rejects or any(f.status in ("missing", "not a file", "rejected") for f in self.files):
            return EXIT_PARTIAL
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": [vars(f) for f in self.files],
            "totals": {
                "files": len(self.files),
                "datagrams": self.datagrams,
                "flows": self.flows,
                "rejects": self.rejects,
            },
            "exporters": self.exporters,
            "days": sorted(self.days),
            "exit_code": self.exit_code,
        }


def sniff_kind(path: Path) -> str:
    """pcap / pcapng / nfdump-csv / unknown, from the first bytes of the file."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if len(head) >= 4:
        magic = int.from_bytes(head[:4], "little")
        if magic in PCAP_MAGIC or magic == PCAPNG_SHB:
            return "pcap"
    if looks_like_nfdump_csv(head):
        return "nfdump-csv"
    return "unknown"


def ingest_flow_files(
    lake: Lake,
    paths: list[Path],
    progress: Progress | None = None,
    jobs: int | None = None,
    parallel_min_bytes: int = PARALLEL_MIN_BYTES,
) -> IngestSummary:
    """Land every file in `paths` in the lake's flows dataset; never raises for bad input (see rejects).

    `jobs` (default: the cores available): captures of `parallel_min_bytes` or more are walked here, in input
    order with one decoder state, and turned into columns and Parquet by `jobs` worker processes."""
    jobs = default_jobs() if jobs is None else jobs
    with DecodePool(jobs, lake.root) as pool:
        return _ingest_files(lake, paths, progress, pool if jobs > 1 else None, parallel_min_bytes)


def _ingest_files(
    lake: Lake,
    paths: list[Path],
    progress: Progress | None,
    pool: DecodePool | None,
    parallel_min_bytes: int,
) -> IngestSummary:
    summary = IngestSummary()
    state = DecoderState()  # templates learnt from one file serve the next (a capture split by tcpdump -C)
    if pool is not None and any(_size(Path(p)) >= parallel_min_bytes for p in paths):
        pool.start()
    for path in paths:
        path = Path(path)
        problem = input_problem(path, "give the capture files in it, e.g. DIR/*.pcap")
        if problem is not None:  # told from os.stat: a FIFO is never opened (that would block)
            status = "missing" if problem.startswith("no such") else "not a file"
            summary.files.append(FileResult(str(path), status, status, message=problem))
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:  # unreadable (permissions): this file fails, the others go on
            summary.files.append(
                FileResult(str(path), "unknown", "missing", message=f"cannot read: {exc.strerror}")
            )
            continue
        try:
            parallel = pool if pool is not None and _size(path) >= parallel_min_bytes else None
            result = _ingest_one(lake, path, state, summary, progress, parallel)
        except OSError as exc:  # the lake side: a directory or temp file that cannot be written
            raise LakeError(
                f"cannot write flows of {path} into {lake.root}: {exc}. Check that the lake is writable and has "
                "free space."
            ) from exc
        summary.files.append(result)
    return summary


def _ingest_one(
    lake: Lake,
    path: Path,
    state: DecoderState,
    summary: IngestSummary,
    progress: Progress | None,
    pool: DecodePool | None = None,
) -> FileResult:
    size = path.stat().st_size
    content_hash = hash_file(path)
    kind = sniff_kind(path)
    result = FileResult(str(path), kind, "landed")
    if lake.already_ingested("flows", content_hash):
        result.status = "skipped"
        result.message = "already in the lake (same content hash)"
        if progress:
            progress(size)
        return result
    source = str(path.absolute())  # evidence: an investigator must find the file again, whatever the cwd was
    stats: dict[str, dict[str, Any]] = {}
    with lake.ingest("flows", source=source, content_hash=content_hash) as writer:
        if kind == "pcap" and pool is not None:
            result.datagrams = _land_pcap_parallel(writer, pool, path, source, state, stats, progress)
            _land_leftover(writer, state, source, stats)
            if progress:
                progress(size)
        elif kind == "pcap":
            done = 0
            for batch in iter_udp_batches(path, batch_datagrams=BATCH_DATAGRAMS):
                if batch.rejects.num_rows:
                    writer.reject(batch.rejects)
                decoded = decode_datagrams(
                    batch.payloads,
                    batch.exporters,
                    batch.ts_us,
                    batch.offsets,
                    source,
                    state,
                    text_as_dictionary=True,
                )
                writer.write(decoded.flows)
                writer.reject(decoded.rejects)
                merge_stats(stats, decoded.stats)
                result.datagrams += len(batch.payloads)
                if progress and batch.bytes_read > done:
                    progress(batch.bytes_read - done)
                    done = batch.bytes_read
            _land_leftover(writer, state, source, stats)
            if progress and size > done:
                progress(size - done)
        elif kind == "nfdump-csv":
            for flows, rejects in iter_nfdump_csv(path):  # streamed: ~16 MB of text at a time
                flows = _with_source(flows, source)
                writer.write(flows)
                writer.reject(_with_source(rejects, source))
                for exporter, n in _value_counts(flows.column("exporter")).items():
                    entry = stats.setdefault(exporter or "unknown", {"flows": 0, "versions": ["nfdump-csv"]})
                    entry["flows"] += n
                for exporter, n in (
                    _value_counts(rejects.column("exporter")).items()
                    if "exporter" in rejects.column_names
                    else ()
                ):
                    entry = stats.setdefault(exporter or "unknown", {"flows": 0, "versions": ["nfdump-csv"]})
                    entry["rejects"] = entry.get("rejects", 0) + n
            if progress:
                progress(size)
        else:
            writer.reject(
                pa.table(
                    {
                        "offset": [0],
                        "reason": ["not a pcap"],
                        "detail": ["neither pcap/pcapng nor nfdump CSV (checked the first bytes)"],
                    }
                )
            )
            result.status = "rejected"
            result.message = "not a pcap, pcapng or nfdump CSV file"
            if progress:
                progress(size)
        ingested = writer.commit({"kind": kind, "datagrams": result.datagrams, "exporters": stats})
    result.flows = ingested.rows
    result.rejects = ingested.rejects
    if result.status == "landed" and result.flows == 0:
        result.status = "rejected"
        result.message = result.message or "no flow records in this file"
    for rel in ingested.files:
        match = re.search(r"^flows/date=(\d{4}-\d{2}-\d{2})/", rel)
        if match:
            summary.days.add(match.group(1))
    merge_stats(summary.exporters, stats)
    return result


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def _land_leftover(writer: IngestWriter, state: DecoderState, source: str, stats: dict[str, Any]) -> None:
    """Data still waiting for its template at the end of a file: rejects "no template"."""
    leftover = flush_pending(state, source)
    if leftover.num_rows:
        writer.reject(leftover)
        for exporter in leftover.column("exporter").to_pylist():
            entry = stats.setdefault(exporter, {})
            entry["no_template"] = entry.get("no_template", 0) + 1
            entry["waiting_for_template"] = 0
            entry["rejects"] = entry.get("rejects", 0) + 1


def _land_pcap_parallel(
    writer: IngestWriter,
    pool: DecodePool,
    path: Path,
    source: str,
    state: DecoderState,
    stats: dict[str, Any],
    progress: Progress | None,
) -> int:
    """One capture through the worker pool: walked here in input order (one decoder state), columns and
    Parquet in the workers; rejects and counters land in input order, the workers' files in the writer's
    commit. Returns the datagrams read."""
    waiting: dict[
        int, tuple[pa.Table, Decoded]
    ] = {}  # batch number -> (capture rejects, what the walk found)
    answers: dict[int, Decoded] = {}
    landed = 0  # batches landed so far, in order
    datagrams = 0
    done = 0

    def land(new: list[tuple[int, Decoded]]) -> None:
        nonlocal landed
        answers.update(new)
        while landed in answers:
            capture_rejects, walk = waiting.pop(landed)
            columns = answers.pop(landed)
            writer.reject(capture_rejects)
            for part in (walk, columns):
                writer.reject(part.rejects)
                merge_stats(stats, part.stats)
            landed += 1

    pool.begin(writer.key)
    try:
        for number, batch in enumerate(iter_udp_batches(path, batch_datagrams=BATCH_DATAGRAMS)):
            walked, walk = walk_datagrams(
                batch.payloads, batch.exporters, batch.ts_us, batch.offsets, source, state
            )
            waiting[number] = (batch.rejects, walk)
            datagrams += len(batch.payloads)
            land(pool.submit(walked))
            if progress and batch.bytes_read > done:
                progress(batch.bytes_read - done)
                done = batch.bytes_read
        last, adds, rows = pool.finish()
        land(last)
    except BaseException:
        pool.abort()
        raise
    writer.adopt(adds, rows)
    return datagrams


def _with_source(flows: pa.Table, source: str) -> pa.Table:
    column = pa.array([source] * flows.num_rows, pa.string())
    if "source" in flows.column_names:
        return flows.set_column(flows.column_names.index("source"), "source", column)
    return flows.append_column("source", column)


def _value_counts(column: pa.ChunkedArray) -> dict[str | None, int]:
    counts = column.value_counts()
    return {v["values"]: v["counts"] for v in counts.to_pylist()}
