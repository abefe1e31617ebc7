"""Files -> lake for VM lifecycle and VM syslog: the I/O edge around the pure parsers.

`ingest_vm_files` lands each source in `vm_events` (skipped when its content hash is in the manifest);
`ingest_syslog_files` lands syslog in `vm_logs`. Both return the UTC days they touched: the caller then asks
correlation (tracepipe.correlate.attribution.correlate) to update the leases and attribute those days.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from tracepipe import fsutil
from tracepipe.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, InputError, UsageError
from tracepipe.fsutil import input_problem
from tracepipe.ingest.cloud import FORMATS, detect_format, parse_cloud_text
from tracepipe.ingest.syslog import YearWraps, parse_syslog
from tracepipe.lake import (
    FILE_IDENTITY,
    IngestResult,
    Lake,
    SourceBatch,
    hash_bytes,
    hash_file,
    ingest_table,
)
from tracepipe.limits import DEFAULT as DEFAULT_LIMITS
from tracepipe.limits import LineBlock, iter_line_blocks, read_text_bounded, too_long_rejects
from tracepipe.printer import clean
from tracepipe.units import time_zone

Progress = Callable[[str], None]


@dataclass
class VmIngestReport:
    results: list[IngestResult] = field(default_factory=list)
    touched_days: list[str] = field(default_factory=list)  # UTC days of the partitions written
    duplicates: int = 0  # events already in the lake (re-sent, or a file that grew), not written again
    # files of a folder whose format could not be told (a README, a provenance note beside the dumps): (file,
    # why), not read and not recorded as ingested, so that a run with --format reads them later
    not_read: list[tuple[str, str]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.results)

    @property
    def rejects(self) -> int:
        return sum(r.rejects for r in self.results)

    @property
    def skipped(self) -> int:
        return sum(1 for r in self.results if r.skipped)

    @property
    def exit_code(self) -> int:
        """3 partial: some lines rejected (or files of a folder not read), the rest landed; 4 failed: every
        line rejected, nothing landed."""
        if not self.rejects and not self.not_read:
            return EXIT_OK
        nothing = self.rows == 0 and self.skipped == 0 and self.duplicates == 0
        return EXIT_FAILED if nothing else EXIT_PARTIAL

    def as_dict(self) -> dict[str, Any]:
        return {
            "sources": [
                {"source": r.source, "rows": r.rows, "rejects": r.rejects, "skipped": r.skipped}
                for r in self.results
            ],
            "rows": self.rows,
            "rejects": self.rejects,
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "touched_days": self.touched_days,
            "not_read": [{"source": source, "why": why} for source, why in self.not_read],
        }


def expand_paths(paths: Iterable[Path], passed_over: list[tuple[str, str]] | None = None) -> list[Path]:
    """Files as given; directories -> their regular files (sorted, not recursive, hidden files skipped; the
    others, a FIFO, a device, a link to /proc, into `passed_over` as (path, what it is)). A path given that is
    no regular file (missing, a FIFO, a socket, a device) is an InputError saying what it is."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.name.startswith(".") or child.is_dir():
                    continue
                problem = input_problem(child)
                if problem is None:
                    out.append(child)
                elif passed_over is not None:
                    passed_over.append((str(child.absolute()), problem))
            continue
        problem = input_problem(path)
        if problem is not None:
            raise InputError(f"{path}: {problem}")
        out.append(path)
    return out


def _read_text(path: Path) -> tuple[str, list[tuple[int, int]]]:
    """The text of a file with lines over limits.line_bytes emptied (never held whole), and those lines as
    (line number, length). OSError: the caller names the file as not read (_not_read)."""
    with open(path, "rb") as handle:
        return read_text_bounded(handle)


def _not_read(exc: OSError) -> str:
    """Why a file could not be read (permissions, an I/O error): that file is not read, the others land."""
    return f"cannot read: {exc.strerror or exc}"


def _read_xml(path: Path, source: str, rejects: list[pa.Table]) -> str | None:
    """An OpenNebula VM XML, unless it is larger than limits.xml_bytes (then a reject, and None)."""
    size = path.stat().st_size
    if size > DEFAULT_LIMITS.xml_bytes:
        detail = f"{path.name}: {size} bytes, more than the limit of {DEFAULT_LIMITS.xml_bytes}; not read"
        rejects.append(
            pa.table(
                {
                    "source": [source],
                    "line": pa.array([None], pa.int64()),
                    "reason": ["limit xml_bytes"],
                    "detail": [detail],
                }
            )
        )
        return None
    text, too_long = _read_text(path)
    if too_long:
        rejects.append(too_long_rejects(source, too_long))
    return text


_XML_VM_ID = re.compile(rb"<VM>\s*<ID>\s*(\d+)\s*</ID>")


def _opennebula_pairs(files: list[Path]) -> tuple[list[tuple[Path, Path | None]], set[Path]]:
    """Pair each `<id>.log` with its VM's XML: `<id>.xml` next to it, or any given XML whose VM/ID is <id>
    (`onevm show -x 42 > vm42.xml`). Returns (log, partner or None) pairs and the XML files consumed."""
    by_id: dict[str, Path] = {}
    for path in files:
        if path.suffix.lower() == ".xml":
            try:
                with open(path, "rb") as handle:
                    match = _XML_VM_ID.search(handle.read(4096))
            except OSError:
                continue  # (said when the loop reads it)
            if match:
                by_id.setdefault(match.group(1).decode(), path)
    consumed: set[Path] = set()
    pairs: list[tuple[Path, Path | None]] = []
    for path in files:
        if path.suffix.lower() != ".log":
            continue
        partner: Path | None = path.with_suffix(".xml")
        if not partner.is_file():
            partner = by_id.get(path.stem)
        if partner is not None:
            consumed.add(partner.resolve())
        pairs.append((path, partner))
    return pairs, consumed


def ingest_vm_files(
    lake: Lake,
    paths: Iterable[Path],
    fmt: str = "auto",
    cloud: str | None = None,
    tz: str = "UTC",
    progress: Progress | None = None,
    named: Iterable[Path] | None = None,
) -> VmIngestReport:
    """Land lifecycle sources in vm_events; the caller then updates the leases (correlate). `named`: the files
    the user named (default: `paths`; a sweep names none, its drop folders' files are listed for it): one of
    them whose format cannot be told stops the run, another is named as not read."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    zone = time_zone(tz)
    paths = [Path(p) for p in paths]
    named = set(paths if named is None else (Path(p) for p in named))
    report = VmIngestReport()
    unnamed = {p: input_problem(p) for p in paths if p not in named and not p.is_dir()}
    report.not_read += [(str(p.absolute()), why) for p, why in unnamed.items() if why is not None]
    files = _utf8_named(expand_paths([p for p in paths if unnamed.get(p) is None], report.not_read), report)
    pairs, consumed = _opennebula_pairs(files) if fmt in ("auto", "opennebula") else ([], set())
    partners = dict(pairs)
    # keys of the events in the lake: a grown or re-sent file adds only news. An event lands in the partition
    # of its own day, so only the days the new events fall on are read (not the whole history)
    seen: set[str] = set()
    read_days: set[str] = set()
    # (a rerun over a big folder: the manifest rows of its files read in one pass, Lake.know_sources)
    lake.know_sources("vm_events", [str(path.absolute()) for path in files])
    # (sources committed together, SourceBatch: OpenNebula keeps a log per VM, a relay a file per hour; one run
    # at a time, as for syslog: an event file that grows is read whole, its news told from what is committed)
    with _run_lock(lake, "vm_events", files), SourceBatch(lake) as batch:
        for path in files:
            result = _land_vm_source(
                lake,
                batch,
                path,
                partners,
                consumed,
                named,
                fmt,
                cloud,
                zone,
                seen,
                read_days,
                report,
                progress,
            )
            if result is not None:
                report.results.append(result)
    report.touched_days = _days_of(report.results, "vm_events")
    return report


def _land_vm_source(
    lake: Lake,
    batch: SourceBatch,
    path: Path,
    partners: dict[Path, Path | None],
    consumed: set[Path],
    named: set[Path],
    fmt: str,
    cloud: str | None,
    zone: dt.tzinfo,
    seen: set[str],
    read_days: set[str],
    report: VmIngestReport,
    progress: Progress | None,
) -> IngestResult | None:
    """One file of ingest_vm_files (with its OpenNebula XML partner, if any): its result (skipped, or landed
    once `batch` commits it), or None when it was passed over (read with its log, or in report.not_read)."""
    if path.resolve() in consumed and path not in partners:
        return None  # an OpenNebula XML read together with its log
    partner = partners.get(path)
    source = str(path.absolute())  # evidence: findable again whatever the cwd was
    try:
        info = path.stat()
    except OSError:
        info = None  # (hash_file says why below)
    if partner is None and info is not None and lake.landed_as_it_is("vm_events", source, info):
        # the very file landed before, unchanged since: skipped without reading it (Lake.landed_as_it_is)
        return IngestResult("vm_events", source, "", skipped=True)
    limit_rejects: list[pa.Table] = []
    # (the source's reads in `try`, not the lake's: a file that cannot be read is that file's problem; the
    # hostile review's mode-000 file in a drop folder stopped ingest and sweep as an internal error)
    try:
        content_hash = hash_file(path)
        if partner is not None:
            content_hash = hash_bytes(f"{content_hash}+{hash_file(partner)}".encode())
    except OSError as exc:
        report.not_read.append((source, _not_read(exc)))
        return None
    if partner is not None:
        source = f"{path}+{partner.name}"
    if progress:
        progress(source)
    if batch.pending(source, content_hash):
        batch.flush()  # (SourceBatch.pending)
    if lake.already_ingested("vm_events", content_hash):
        if partner is None and info is not None and lake.has_source("vm_events", source):
            lake.record_identity("vm_events", content_hash, source, info)
        return IngestResult("vm_events", source, content_hash, skipped=True)
    try:
        if path.suffix.lower() == ".xml":
            text = _read_xml(path, str(path), limit_rejects) or ""
        else:
            text, too_long = _read_text(path)
            if too_long:
                limit_rejects.append(too_long_rejects(str(path), too_long))
        xml_text = _read_xml(partner, str(path), limit_rejects) if partner is not None else None
    except OSError as exc:
        report.not_read.append((source, _not_read(exc)))
        return None
    file_fmt = "opennebula" if partner is not None else fmt
    if file_fmt == "auto" and path not in named:
        try:
            detect_format(str(path), text[:4096])
        except UsageError as exc:  # (one file of a folder: the others still land)
            report.not_read.append((source, str(exc)))
            return None
    events, rejects = parse_cloud_text(text, str(path), fmt=file_fmt, cloud=cloud, tz=zone, xml_text=xml_text)
    if limit_rejects:
        rejects = pa.concat_tables([rejects, *limit_rejects], promote_options="permissive")
    days = _event_days(events) - read_days
    if days:
        stored = lake.read("vm_events", columns=_KEY_READ, days=sorted(days))
        seen.update(event_keys(stored).to_list())
        read_days |= days
    events, duplicates = _drop_known(events, seen)
    report.duplicates += duplicates
    return ingest_table(
        lake,
        "vm_events",
        source,
        content_hash,
        [events],
        [rejects],
        batch=batch,
        stats={
            "format": file_fmt,
            "events": events.num_rows,
            "duplicates": duplicates,
            **({FILE_IDENTITY: fsutil.file_identity(info)} if info is not None and partner is None else {}),
        },
    )


def _utf8_named(files: list[Path], report: VmIngestReport) -> list[Path]:
    """The files whose names the lake can hold (fsutil.utf8_name); the others in report.not_read."""
    for path in files:
        if not fsutil.utf8_name(path):
            report.not_read.append((clean(str(path.absolute())), fsutil.NOT_UTF8))
    return [path for path in files if fsutil.utf8_name(path)]


def _days_of(results: list[IngestResult], dataset: str) -> list[str]:
    days = set()
    for result in results:
        for relative in result.files:
            match = re.match(rf"^{dataset}/date=(\d{{4}}-\d{{2}}-\d{{2}})/", relative)
            if match:
                days.add(match.group(1))
    return sorted(days)


# an event without a message id is the same event as another only with the same content: every column the lease
# builder compares (leases._CONTENT), so that what ingest drops as known the builder would have dropped too (two
# records differing only in their hypervisor, name, owner or image were one event here: review, session 35)
_KEY_COLUMNS = (
    "cloud", "vm_id", "vm_name", "project", "user", "hypervisor", "event_type", "action", "state", "addr",
    "addr_kind", "port_id", "resource_id", "image",
)  # fmt: skip
_KEY_READ = ["ts", "event_id", "addrs", *_KEY_COLUMNS]


def _event_days(events: pa.Table) -> set[str]:
    """The UTC days (partitions of vm_events) that events fall on."""
    days = pc.unique(events.column("ts").cast(pa.date32())).to_pylist()
    return {d.isoformat() for d in days if d is not None}


def _drop_known(events: pa.Table, seen: set[str]) -> tuple[pa.Table, int]:
    """Events whose key is not in `seen` (first of repeats within the table); `seen` learns the new keys."""
    keys = event_keys(events)
    fresh = ~keys.is_in(pl.Series(list(seen), dtype=pl.String).implode()) & keys.is_first_distinct()
    seen.update(keys.filter(fresh).to_list())
    return events.filter(fresh.to_arrow()), events.num_rows - int(fresh.sum())


def event_keys(events: pa.Table) -> pl.Series:
    """One key per event for de-duplication across sources: its message id with its VM, else its content
    (what the lease builder de-duplicates on too: leases._replay_order)."""
    frame = pl.from_arrow(events.select(["ts", "event_id", "addrs", *_KEY_COLUMNS]))
    assert isinstance(frame, pl.DataFrame)
    content = pl.concat_str(
        [
            pl.col("ts").dt.epoch("us").cast(pl.String),
            pl.col("addrs").list.join(",").fill_null("~"),
            *[pl.col(c).fill_null("~") for c in _KEY_COLUMNS],
        ],
        separator="\x1f",
    )
    keys = frame.select(
        pl.when(pl.col("event_id").is_not_null())
        .then(
            pl.concat_str(pl.lit("id:"), pl.col("event_id"), pl.lit("\x1f"), pl.col("vm_id").fill_null("~"))
        )
        .otherwise(pl.lit("content:") + content)
        .alias("key")
    )
    return keys.get_column("key")


SYSLOG_BLOCK_BYTES = 32 << 20
RUN_LOCK = "ingest-run-{}"  # (the lock of a whole `ingest syslog` / `ingest vm` run, per dataset)


def _run_lock(lake: Lake, dataset: str, files: list[Path]) -> contextlib.AbstractContextManager[Any]:
    """RUN_LOCK of `dataset` for a run with files to read (none: no lock, nothing made in the lake)."""
    return lake.lock(RUN_LOCK.format(dataset)) if files else contextlib.nullcontext()


def _line_blocks(path: Path, block_bytes: int = SYSLOG_BLOCK_BYTES) -> Iterator[LineBlock]:
    """Consecutive blocks of whole lines of a file, lines over limits.line_bytes emptied and listed."""
    try:
        with open(path, "rb") as handle:
            yield from iter_line_blocks(handle, block_bytes)
    except OSError as exc:  # (the source's read, told from the lake's writes around it)
        raise _SourceUnreadable(exc) from exc


class _SourceUnreadable(Exception):
    """A source file's read failed midway (an I/O error): that file lands nothing, the others go on."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(str(exc))
        self.exc = exc


class _KnownLines:
    """The lines of one source path already in vm_logs, by (line number, time): a log that grew since it was
    ingested (`tracepipe ingest syslog /var/log/remote/` from cron every hour) lands only its new lines; every
    earlier line landed again on each run before. A file rotated or rewritten under the same path has other
    times at its line numbers: it lands whole. Only the days the lines fall on are read (not the history):
    the line and ts of this source's rows."""

    def __init__(self, lake: Lake, source: str) -> None:
        self.lake, self.source = lake, source
        self.read_days: set[str] = set()
        self.keys = pl.DataFrame(schema={"line": pl.Int64, "ts": pl.Datetime("us", "UTC")})
        self.duplicates = 0
        self.old_lines = 0  # the last line number found in the lake already

    def new(self, logs: pa.Table) -> pa.Table:
        """The rows of `logs` not in the lake yet."""
        if not logs.num_rows:
            return logs
        days = {d.isoformat() for d in pc.unique(logs.column("ts").cast(pa.date32())).to_pylist() if d}
        paths = [str(p) for p in self.lake.files("vm_logs", sorted(days - self.read_days))]
        self.read_days |= days
        if paths:
            stored = (
                pl.scan_parquet(paths, hive_partitioning=False, glob=False)
                .filter(pl.col("source") == self.source)
                .select(pl.col("line").cast(pl.Int64), pl.col("ts").cast(pl.Datetime("us", "UTC")))
                .collect()
            )
            self.keys = pl.concat([self.keys, stored]).unique()
        if not self.keys.height:
            return logs
        frame = pl.from_arrow(logs.select(["line", "ts"]))
        assert isinstance(frame, pl.DataFrame)
        frame = frame.select(pl.col("line").cast(pl.Int64), pl.col("ts").cast(pl.Datetime("us", "UTC")))
        known = frame.join(
            self.keys.with_columns(pl.lit(True).alias("_known")),
            on=["line", "ts"],
            how="left",
            maintain_order="left",
        ).get_column("_known")
        fresh = known.is_null()
        kept = int(fresh.sum())
        self.duplicates += logs.num_rows - kept
        if kept < logs.num_rows:
            last = frame.get_column("line").filter(~fresh).max()
            self.old_lines = max(self.old_lines, int(last))  # type: ignore[arg-type]
        return logs if kept == logs.num_rows else logs.filter(fresh.to_arrow())

    def new_rejects(self, rejects: pa.Table) -> pa.Table:
        """The rejects of lines after the ones the lake holds already (up to the last line found there, the file
        was the one ingested before: its rejects were recorded then)."""
        if not self.old_lines or not rejects.num_rows:
            return rejects
        return rejects.filter(pc.greater(rejects.column("line"), self.old_lines))


def ingest_syslog_files(
    lake: Lake,
    paths: Iterable[Path],
    year: int | None = None,
    sender_addr: str | None = None,
    tz: str = "UTC",
    progress: Progress | None = None,
    attribute: Callable[[pa.Table], pa.Table] | None = None,
) -> VmIngestReport:
    """Land syslog files in vm_logs; the caller then attributes the days touched (correlate). `attribute`:
    what sets each line's vm_id as it lands (correlate.attribution.log_attributor; else vm_id null until then)."""
    time_zone(tz)
    report = VmIngestReport()
    files = _utf8_named(expand_paths(paths, report.not_read), report)
    # (a rerun over a big folder: the manifest rows of its files read in one pass, Lake.know_sources)
    lake.know_sources("vm_logs", [str(path.absolute()) for path in files])
    # (sources committed together: SourceBatch; a relay's folder holds a file per VM). One run at a time: two
    # runs over a log that grows land the same new lines each (what is new is told from what is committed;
    # a review: 13-37% of the lines twice with two cron runs overlapping); the later one waits (RUN_LOCK)
    with _run_lock(lake, "vm_logs", files), SourceBatch(lake) as batch:
        for path in files:
            result = _land_syslog(lake, batch, path, report, year, sender_addr, tz, progress, attribute)
            if result is not None:
                report.results.append(result)
    report.touched_days = _days_of(report.results, "vm_logs")
    return report


def _land_syslog(
    lake: Lake,
    batch: SourceBatch,
    path: Path,
    report: VmIngestReport,
    year: int | None,
    sender_addr: str | None,
    tz: str,
    progress: Progress | None,
    attribute: Callable[[pa.Table], pa.Table] | None,
) -> IngestResult | None:
    """One file of ingest_syslog_files: its result (skipped, or landed once `batch` commits it), or None when it
    could not be read (in report.not_read)."""
    source = str(path.absolute())
    try:
        info = path.stat()
    except OSError:
        info = None  # (hash_file says why below)
    if info is not None and lake.landed_as_it_is("vm_logs", source, info):  # (unread: unchanged since)
        return IngestResult("vm_logs", source, "", skipped=True)
    try:
        content_hash = hash_file(path)
    except OSError as exc:
        report.not_read.append((source, _not_read(exc)))
        return None
    if progress:
        progress(str(path))
    if batch.pending(source, content_hash):
        batch.flush()  # (SourceBatch.pending)
    if lake.already_ingested("vm_logs", content_hash):
        if info is not None and lake.has_source("vm_logs", source):
            lake.record_identity("vm_logs", content_hash, source, info)
        return IngestResult("vm_logs", str(path), content_hash, skipped=True)
    try:
        mtime = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
    except OSError as exc:  # (removed since it was hashed: that file is not read, the others go on)
        report.not_read.append((source, _not_read(exc)))
        return None
    known = _KnownLines(lake, source)
    wraps = YearWraps(year) if year is not None else None  # (--year: the first line's; Dec -> Jan: +1)
    counts: dict[str, int] = {}
    try:
        with lake.ingest("vm_logs", source, content_hash) as writer:
            # in blocks of whole lines: memory stays bounded on big files, line numbers stay exact
            for block in _line_blocks(path):
                logs, rejects = parse_syslog(
                    block.data.decode("utf-8", errors="replace"),
                    source,
                    year=year or mtime.year,
                    reference=mtime if year is None else None,
                    tz=tz,
                    sender_addr=sender_addr,
                    first_line=block.first_line,
                    wraps=wraps,
                    counts=counts,
                )
                new = known.new(logs)
                writer.write(attribute(new) if attribute is not None and new.num_rows else new)
                if block.too_long:
                    writer.reject(known.new_rejects(too_long_rejects(source, block.too_long)))
                writer.reject(known.new_rejects(rejects))
            # (lines without a year took the file's modification time's: said, so that a wrong one is seen;
            # not when every line carried its own, as RFC 5424's do)
            stats = {"lines": writer.result.rows, "duplicates": known.duplicates}
            if info is not None:
                stats[FILE_IDENTITY] = fsutil.file_identity(info)
            guessed = not year and counts.get("no_year", 0) > 0
            result = batch.add(writer, {**stats, **({"mtime_year": mtime.year} if guessed else {})})
    except _SourceUnreadable as exc:  # (nothing of it committed: the writer's files are removed)
        report.not_read.append((source, _not_read(exc.exc)))
        return None
    report.duplicates += known.duplicates
    return result
