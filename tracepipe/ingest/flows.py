"""Flow input files -> the lake's `flows` dataset: NetFlow/IPFIX export captures, nfdump CSV, nfcapd files (and
nfsen/nfcapd directory trees), Zeek conn.log (TSV/JSON, gzip'ed or not) and argus `ra` CSV.

One file is one source: it is hashed, skipped if the manifest already holds it, otherwise streamed batch by
batch through its reader into one lake writer, with its rejects and per-exporter counters in the manifest.
A file big enough for the decode workers is hashed by a thread while it decodes, and skipped as soon as its
hash is found in the lake (always before anything is committed). The kind of a file is told by its first
bytes, not its name; a directory stands for the files under it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tracepipe import fsutil
from tracepipe.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, LakeError
from tracepipe.fsutil import input_problem
from tracepipe.ingest import nffile
from tracepipe.ingest.argus import iter_argus, looks_like_argus
from tracepipe.ingest.decode_pool import (
    HANG_SECONDS,
    PARALLEL_MIN_BYTES,
    DecodePool,
    InputChanged,
    WorkerFailed,
    default_jobs,
)
from tracepipe.ingest.netflow import (
    Decoded,
    DecoderState,
    InFile,
    Isolation,
    decode_walked,
    flush_pending,
    merge_exporter_totals,
    merge_stats,
    walk_datagrams,
)
from tracepipe.ingest.nfdump import (
    CsvRange,
    NfcapdRead,
    RangeLanding,
    iter_nfcapd,
    iter_nfdump_csv,
    looks_like_nfcapd,
    looks_like_nfdump_csv,
    nfcapd_exporters,
    nfdump_csv_ranges,
)
from tracepipe.ingest.pcap import HEAD_BYTES, PCAP_MAGIC, PCAPNG_SHB, UdpBatch, iter_udp_batches
from tracepipe.ingest.zeek import GZIP_MAGIC, iter_conn_log, other_log, zeek_head, zeek_kind
from tracepipe.lake import (
    FILE_IDENTITY,
    ROW_GROUP_ROWS,
    IngestResult,
    IngestWriter,
    Lake,
    SourceBatch,
    hash_file,
)
from tracepipe.limits import DEFAULT as DEFAULT_LIMITS
from tracepipe.printer import clean
from tracepipe.senders import OTHERS_TEXT, AllowList

Progress = Callable[[int], None]  # called with the number of input bytes just consumed
Batches = Iterator[tuple[pa.Table, ...]]  # (flows, rejects) or (flows, rejects, flow_labels)

# kind -> streamed reader of text-like inputs (pcap goes through the NetFlow decoder)
READERS: dict[str, Callable[[Path], Batches]] = {
    "nfdump-csv": iter_nfdump_csv,
    "nfcapd": iter_nfcapd,
    "zeek-tsv": iter_conn_log,
    "zeek-json": iter_conn_log,
    "argus": iter_argus,
}
# what each command takes, and the command a file of another kind needs
log = logging.getLogger("tracepipe.ingest")
NETFLOW_KINDS = ("pcap", "nfdump-csv", "nfcapd")
ZEEK_KINDS = ("zeek-tsv", "zeek-json")
ARGUS_KINDS = ("argus",)
RECORD_KINDS = ("nfcapd", "nfdump-csv", *ZEEK_KINDS, *ARGUS_KINDS)  # files of flow records (not datagrams)
COMMAND_OF_KIND = {
    **dict.fromkeys(NETFLOW_KINDS, "tracepipe ingest netflow"),
    **dict.fromkeys(ZEEK_KINDS, "tracepipe ingest zeek"),
    **dict.fromkeys(ARGUS_KINDS, "tracepipe ingest argus"),
}
BATCH_DATAGRAMS = 4096  # ~5 MB of export datagrams per decode step: memory stays flat, overhead negligible
# kinds the workers decode, and how many times that size a file of the kind must be: nfdump CSV spends ~8x the
# bytes of a capture on a record, and 64 MB of it (~180 k records, ~0.7 s of work) do not repay the workers'
# start-up; 256 MB (~0.7 M records) should, with a free core (benchmarks/netflow_ingest.py prints both)
PARALLEL_KINDS = {"pcap": 1, "nfcapd": 1, "nfdump-csv": 4}


class ContentHash:
    """A file's sha256 (lake.hash_file, the identity of a source), computed by a thread while the file decodes:
    hashlib and file reads release the GIL, so it runs beside the walk and the workers (it was serial before
    them: ~0.6 s per GB in which one core waited; profiled for issue 17)."""

    def __init__(self, path: Path) -> None:
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path,), name="content-hash", daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._digest = hash_file(path, stop=self._stop)
        except BaseException as exc:  # raised in the caller's thread by result()
            self._error = exc

    def cancel(self) -> None:
        """Stop reading (the source was aborted, skipped or refused): the thread ends within one chunk,
        instead of reading the rest of a file nobody will use, beside the next file's decoding."""
        self._stop.set()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest


class AlreadyIngested(Exception):
    """The content hash, found while the file decoded, is in the lake already: what was written is dropped."""


def _unchanged(path: Path, seen: os.stat_result) -> None:
    """InputChanged unless `path` is still the file `seen` before it was hashed: a capture still being written
    (tcpdump, nfcapd's current file) would otherwise land rows of bytes its content hash does not cover, and
    land them again under the complete file's hash."""
    try:
        now = path.stat()
    except OSError as exc:
        raise InputChanged(f"it went away while it was read ({exc.strerror})") from exc
    if fsutil.file_identity(now) != fsutil.file_identity(seen):
        raise InputChanged(f"it changed while it was read ({seen.st_size:,} -> {now.st_size:,} bytes)")


def _identify(writer: IngestWriter, hashing: ContentHash | None) -> None:
    """Give the writer its source's content hash once computed; AlreadyIngested when the lake holds it. Checked
    before any commit, so a source lands once whether it was hashed first or beside its decoding. A read error
    of the hash thread is the input's (InputChanged), not the lake's."""
    if hashing is None or writer.key is not None:
        return
    try:
        digest = hashing.result()
    except OSError as exc:
        raise InputChanged(f"it could not be read to its end ({exc.strerror or exc})") from exc
    writer.identify(digest)
    if writer.lake.already_ingested(writer.dataset.name, writer.content_hash):
        raise AlreadyIngested


@dataclass
class FileResult:
    path: str
    kind: str  # pcap, nfdump-csv, nfcapd, zeek-tsv, zeek-json, zeek-other, argus, unknown, missing
    status: str  # landed, skipped (already ingested), empty (a log of no records), rejected (nothing usable), missing
    flows: int = 0
    rejects: int = 0
    datagrams: int = 0
    message: str = ""
    reader: str = ""  # nfcapd files: "native", or "nfdump" (the fallback; message says why)
    not_allowed: dict[str, int] = field(default_factory=dict)  # captures: sender outside --allow -> datagrams


@dataclass
class IngestSummary:
    files: list[FileResult] = field(default_factory=list)
    exporters: dict[str, dict[str, Any]] = field(default_factory=dict)
    days: set[str] = field(default_factory=set)  # UTC days of the flows partitions written: the caller
    # attributes them (tracepipe.correlate.attribution.correlate); ingest never imports correlation
    # why the run stopped (the lake could not be written: a full disk, a lock held too long): the files before
    # it landed and are listed, the one it stopped at and those after it are not (status failed / not read)
    error: str = ""

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
        """0 everything landed (or was there already), 3 some input rejected, 4 nothing usable or the lake
        could not be written (`error`: what landed before is listed all the same)."""
        if self.error:
            return EXIT_FAILED
        usable = [f for f in self.files if f.status in ("landed", "skipped", "empty")]
        if not usable or (self.flows == 0 and not any(f.status in ("skipped", "empty") for f in self.files)):
            return EXIT_FAILED
        if self.rejects or any(f.status in ("missing", "not a file", "rejected") for f in self.files):
            return EXIT_PARTIAL
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"error": self.error} if self.error else {}),
            "files": [vars(f) for f in self.files],
            "totals": {
                "files": len(self.files),
                "datagrams": self.datagrams,
                "flows": self.flows,
                "rejects": self.rejects,
                "nfdump_fallbacks": sum(f.reader == "nfdump" for f in self.files),
                "not_allowed": sum(sum(f.not_allowed.values()) for f in self.files),
            },
            "exporters": self.exporters,
            "days": sorted(self.days),
            "exit_code": self.exit_code,
        }


def sniff_kind(path: Path) -> str:
    """pcap / nfcapd / zeek-tsv / zeek-json / zeek-other / nfdump-csv / argus / unknown, from the first bytes of
    the file (a gzip'ed file by its decompressed first bytes: Zeek rotates logs into .gz). zeek-other: a Zeek log
    that is not a conn log (dns.log, ...: other_log), which no command reads."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if len(head) >= 4:
        magic = int.from_bytes(head[:4], "little")
        if magic in PCAP_MAGIC or magic == PCAPNG_SHB:
            return "pcap"
    if looks_like_nfcapd(head):
        return "nfcapd"
    if head.startswith(GZIP_MAGIC):
        head = zeek_head(path)
        return ("zeek-other" if other_log(head) else zeek_kind(head)) or "unknown"
    kind = zeek_kind(head)
    if kind is not None:
        return "zeek-other" if other_log(head) else kind
    if looks_like_nfdump_csv(head):
        return "nfdump-csv"
    if looks_like_argus(head):
        return "argus"
    return "unknown"


def _kind_or_none(path: Path) -> str | None:
    """The file's kind, or None when it is not a regular file or cannot be read (the caller reports it)."""
    # a FIFO, a device or a kernel file (/proc/kmsg: "a regular empty file" whose read waits) is never opened:
    # it could block for ever (input_problem, from stat alone)
    if input_problem(path) is not None:
        return None
    try:
        return sniff_kind(path)
    except OSError:
        return None


def expand_paths(paths: list[Path], unreadable: list[OSError] | None = None) -> list[Path]:
    """Directories -> the regular files under them (sorted; hidden files, nfcapd's still-open `nfcapd.current.*`
    and the files of a `current` folder below the one given, Zeek's live logs, left out; ingest_flow_files then
    skips the ones of a kind the command does not read, such as nfsen's .nfstat files), so that an nfsen tree
    `profiles-data/live/router1/2024/03/12/` or Zeek's archive `/opt/zeek/logs/` lands file by file: each is its
    own source, and the next run skips what is already in the lake. (A file still being written is another
    source at each run, its lines landed again: Zeek's `current/conn.log` under the archive did so every hour.)
    `unreadable`: gets the error of each folder under them that cannot be listed (the glob passes over it)."""
    out: list[Path] = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            out.append(path)
            continue
        # one walk (links to folders not followed), sorted as Paths sort (by their parts), in str: a folder of
        # 100,000 files took ~10 s of pathlib per listing (rglob, Path comparisons), and each run lists twice
        top = str(path)
        found: list[tuple[list[str], str]] = []
        for folder, folders, names in os.walk(
            top, onerror=unreadable.append if unreadable is not None else None
        ):
            folders[:] = [f for f in folders if f != LIVE_FOLDER]  # (a `current` folder below: nothing of it)
            parts = [] if folder == top else os.path.relpath(folder, top).split(os.sep)
            for name in names:
                full = os.path.join(folder, name)
                if name.startswith(".") or name.startswith("nfcapd.current") or not os.path.isfile(full):
                    continue
                found.append(([*parts, name], full))
        found.sort(key=lambda item: item[0])
        out.extend(Path(full) for _parts, full in found)
    return out


LIVE_FOLDER = "current"  # Zeek's (ZeekControl's) folder of the logs it is writing, beside the dated archive


def ingest_flow_files(
    lake: Lake,
    paths: list[Path],
    progress: Progress | None = None,
    accept: tuple[str, ...] = NETFLOW_KINDS,
    jobs: int | None = None,
    parallel_min_bytes: int = PARALLEL_MIN_BYTES,
    hang_seconds: float = HANG_SECONDS,
    pool: DecodePool | None = None,
    allow: AllowList | None = None,
    tz: str = "UTC",
) -> IngestSummary:
    """Land every file in `paths` (directories: the files under them) in the lake's flows dataset; never
    raises for bad input (see rejects). `accept`: the kinds this command takes (NETFLOW_KINDS, ZEEK_KINDS,
    ARGUS_KINDS); a file of another known kind is not read, and its result names the command that reads it.

    `jobs` (default: the cores available): captures of `parallel_min_bytes` or more are walked here, in input
    order with one decoder state, and turned into columns and Parquet by `jobs` worker processes; nfcapd
    files of that size (read natively) are split into ranges of blocks that the workers read themselves, and
    nfdump CSV files of 4x that size into byte ranges cut at line ends. A worker silent for `hang_seconds` is
    killed, its files removed, and LakeError raised (decode_pool.DecodePool). `pool`: the caller's (decode_pool.
    start_early: workers started before the caller's imports; its own hang_seconds), with its jobs; the caller
    stops it. `allow`: the senders whose datagrams a capture lands (senders.AllowList; the others are counted
    per sender in the file's `not_allowed`); a file of another kind is then not read (it names no sender).
    `tz`: the time zone of nfdump CSV times (nfdump prints the local time of the machine it ran on)."""
    if pool is not None:
        return _ingest_files(
            lake, paths, progress, accept, pool if pool.jobs > 1 else None, parallel_min_bytes, allow, tz
        )
    jobs = default_jobs() if jobs is None else jobs
    with DecodePool(jobs, lake.root, hang_seconds) as own:
        return _ingest_files(
            lake, paths, progress, accept, own if jobs > 1 else None, parallel_min_bytes, allow, tz
        )


def _ingest_files(
    lake: Lake,
    paths: list[Path],
    progress: Progress | None,
    accept: tuple[str, ...],
    pool: DecodePool | None,
    parallel_min_bytes: int,
    allow: AllowList | None = None,
    tz: str = "UTC",
) -> IngestSummary:
    summary = IngestSummary()
    # templates learnt from one file serve the next (a capture split by tcpdump -C), and the next run's
    state = _capture_state(lake) if "pcap" in accept else DecoderState()
    given = {Path(p) for p in paths}
    unreadable: list[OSError] = []
    kinds: dict[Path, str | None] = {}  # (each file sniffed once here: a folder of 100,000 files)

    def kind_of(path: Path) -> str | None:
        if path not in kinds:
            kinds[path] = _kind_or_none(path)
        return kinds[path]

    listed = expand_paths(paths, unreadable)
    for path in (p for p in listed if not fsutil.utf8_name(p)):  # (said and passed over, the others land)
        summary.files.append(FileResult(clean(str(path)), "", "rejected", message=fsutil.NOT_UTF8))
    listed = [p for p in listed if fsutil.utf8_name(p)]
    files = [p for p in listed if p in given or kind_of(p) in (*accept, None)]
    for exc in unreadable:  # (a folder under a given one that cannot be listed was passed over in silence)
        message = f"is a folder that cannot be read: {exc.strerror or exc}"
        summary.files.append(FileResult(str(exc.filename), "directory", "missing", message=message))
    for folder in sorted(p for p in given if p.is_dir() and not any(f.is_relative_to(p) for f in files)):
        # a directory with nothing this command reads under it is said so, not passed over in silence
        summary.files.append(
            FileResult(
                str(folder),
                "directory",
                "rejected",
                message=f"is a directory with no {', '.join(accept)} file under it (give the files, or the "
                "folder that holds them)",
            )
        )
    # (a rerun over a drop folder of many files landed before: their manifest rows read in one pass; the join
    # is str(p.absolute()) without a cwd each)
    cwd = os.getcwd()
    lake.know_sources("flows", [os.path.join(cwd, p) for p in files])
    big_captures = {Path(p) for p in files if _parallel(p, kind_of(Path(p)), parallel_min_bytes)}
    if pool is not None and big_captures:
        pool.start()
        pool.expect(len(big_captures))
    # small files other than captures are committed together (_Batching): a backfill of 5-minute nfcapd files,
    # or a folder of Zeek logs, paid two commits and a compaction check a file (300 small files: 20 of 26 s)
    batching = _Batching(SourceBatch(lake))
    try:
        for path in files:
            path = Path(path)
            parallel = pool if pool is not None and path in big_captures else None
            try:
                if summary.error:
                    summary.files.append(
                        FileResult(str(path), "", "not read", message="the run stopped before it")
                    )
                    continue
                summary.files.append(
                    _ingest_one(lake, path, state, summary, progress, accept, parallel, allow, tz, batching)
                )
            except (OSError, LakeError) as exc:
                # the lake side: a folder or file that cannot be written, a lock (the files before landed: they
                # are listed, with this one failed, so that a script reading the summary knows what to run again;
                # a full disk made the run end with no summary at all, exit 4)
                summary.error = summary.error or _write_error(exc, path, lake)
                summary.files.append(
                    FileResult(str(path), "", "failed", message="the lake could not be written")
                )
            finally:
                if parallel is not None:  # landed, skipped or aborted: one less to come (DecodePool.expect)
                    parallel.source_over()
        try:
            batching.batch.flush()
        except (OSError, LakeError) as exc:
            last = Path(batching.pending[-1][0].path) if batching.pending else Path(".")
            summary.error = summary.error or _write_error(exc, last, lake)
    except BaseException:
        batching.batch.abort()
        raise
    batching.finish(summary)
    if "pcap" in accept:
        _keep_capture_state(lake, state)
    return summary


def _write_error(exc: Exception, path: Path, lake: Lake) -> str:
    if isinstance(exc, LakeError):
        return str(exc)
    return f"cannot write flows of {path} into {lake.root}: {exc}. Check that the lake is writable and has free space."


@dataclass
class _Batching:
    """A run's SourceBatch of small non-capture files, and the results waiting for its commits."""

    batch: SourceBatch
    # (each file's result, what its commit made of it, its exporters' counts)
    pending: list[tuple[FileResult, IngestResult, dict[str, dict[str, Any]]]] = field(default_factory=list)

    def finish(self, summary: IngestSummary) -> None:
        """The results as the commits made them: skipped when another command landed the same content first,
        failed when their batch could not be committed, else landed: the days their rows went to and their
        exporters' counts (counted when the file was read, the exporters' flows exceeded what landed: review)."""
        for result, ingested, stats in self.pending:
            if ingested.skipped:
                result.status, result.message = "skipped", "already in the lake (same content hash)"
                result.flows = result.rejects = 0
            elif ingested.version is None and result.status in ("landed", "empty"):
                result.status, result.message = "failed", "the lake could not be written"
                result.flows = result.rejects = 0
            else:
                _count_landed(summary, ingested, stats)
        self.pending.clear()


# The templates (and options: sampling, boot times, interface names) the captures' exporters sent, kept in the
# lake for the next `ingest netflow` run: a capture rotated every hour (tcpdump -G) into a drop folder begins
# with the data of templates sent in an earlier file, which a run of its own rejected as `no template` until the
# exporter's next refresh (up to 30 min of a router's flows, and a README limit until session 37). The
# collector keeps the same state in its spool. Sequence numbers and data waiting for a template stay with
# their run: files of one exporter ingested out of order must not count each other's numbers as losses.
CAPTURE_STATE_DIR = "_settings/netflow"


def _capture_state(lake: Lake) -> DecoderState:
    from tracepipe import spool

    state, _ = spool.load_decoder_state(lake.root / CAPTURE_STATE_DIR)
    return state


def _keep_capture_state(lake: Lake, state: DecoderState) -> None:
    from tracepipe import fsutil, spool
    from tracepipe.limits import DEFAULT

    folder = lake.root / CAPTURE_STATE_DIR
    if not state.templates and not (folder / spool.STATE_FILE).exists():
        return  # (no capture read: no file)
    data = spool.state_file_bytes(state, "", DEFAULT.decoder_state_bytes, leave_out=("pending", "sequences"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fsutil.write_atomic(folder / spool.STATE_FILE, data)
    except OSError as exc:  # (what landed is committed: the next run relearns the templates)
        log.warning("decoder state not kept for the next run: %s", exc)


def _ingest_one(
    lake: Lake,
    path: Path,
    state: DecoderState,
    summary: IngestSummary,
    progress: Progress | None,
    accept: tuple[str, ...],
    pool: DecodePool | None = None,
    allow: AllowList | None = None,
    tz: str = "UTC",
    batching: _Batching | None = None,
) -> FileResult:
    problem = input_problem(path, "give the capture files in it, e.g. DIR/*.pcap")
    if problem is not None:  # told from os.stat: a FIFO is never opened (that would block)
        status = "missing" if problem.startswith("no such") else "not a file"
        return FileResult(str(path), status, status, message=problem)
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:  # unreadable (permissions): this file fails, the others go on
        return FileResult(str(path), "unknown", "missing", message=f"cannot read: {exc.strerror}")
    seen = path.stat()  # before any read: _unchanged compares it before the commit
    size = seen.st_size
    kind = sniff_kind(path)
    result = FileResult(str(path), kind, "landed")
    if kind == "zeek-other":  # (named on the command line: a folder's are left out, as files of other kinds)
        result.status = "rejected"
        result.message = f"{other_log(zeek_head(path))}: tracepipe ingest zeek reads conn logs only"
        if progress:
            progress(size)
        return result
    if kind not in accept and kind in COMMAND_OF_KIND:  # read by another command: say which, land nothing
        result.status = "rejected"
        result.message = f"a {kind} file: run `{COMMAND_OF_KIND[kind]} {path}`"
        if progress:
            progress(size)
        return result
    if allow is not None and not allow.accepts_all and kind != "pcap":
        result.status = "rejected"
        result.message = (
            f"--allow takes the datagrams of captures by their sender; a {kind} file names none: ingest it "
            "without --allow"
        )
        if progress:
            progress(size)
        return result
    source = str(path.absolute())  # evidence: an investigator must find the file again, whatever the cwd was
    hashing: ContentHash | None = None
    known = lake.has_source("flows", source)
    if known and lake.landed_as_it_is("flows", source, seen):
        # the very file landed before, unchanged since (device, inode, size, mtime and ctime): skipped without
        # reading it. A sweep's drop folder hashed every file in it at every run (an ops review: 264 + 264 hourly
        # files, 3.9 s and 2.2 GB read an hour to land nothing)
        return _skipped(result, progress, size)
    if pool is not None and not known:
        # a big new file: its hash is computed while it decodes (_identify checks it before the commit)
        hashing, content_hash = ContentHash(path), None
    else:  # a small file, or a path landed before (a rerun, most likely a skip): hash first, decode if new
        content_hash = hash_file(path)
        if batching is not None and batching.batch.pending(source, content_hash):
            batching.batch.flush()  # (the same path or content waits: committed first, SourceBatch.pending)
        if lake.already_ingested("flows", content_hash):
            if known:
                lake.record_identity("flows", content_hash, source, seen)
            return _skipped(result, progress, size)
    # a skipped file leaves the decoder state as it found it (templates, sequence numbers): as if never read;
    # and a capture the decoder failed on is decoded again from it
    before = copy.deepcopy(state) if kind == "pcap" else None
    try:
        try:
            return _land_one(
                lake,
                path,
                kind,
                source,
                content_hash,
                hashing,
                state,
                summary,
                progress,
                accept,
                pool,
                seen,
                allow=allow,
                tz=tz,
                batching=batching if kind != "pcap" and pool is None and hashing is None else None,
            )
        except (AlreadyIngested, InputChanged, OSError):
            raise
        except LakeError as exc:
            if not isinstance(exc, WorkerFailed) or before is None:
                raise
            failure: Exception = exc
        except Exception as exc:  # a bug in the decoder (none known): below
            if before is None:
                raise
            failure = exc
        # Decoded again here, from the state before the file, with netflow.Isolation: the datagrams the decoder
        # raises on are rejects ("decoder error", with their offsets), the rest of the capture lands
        _put_back(state, before)
        if hashing is not None:
            hashing.cancel()
            hashing, content_hash = None, hash_file(path)
            if lake.already_ingested("flows", content_hash):
                return _skipped(result, progress, size)
        landed = _land_one(
            lake,
            path,
            kind,
            source,
            content_hash,
            None,
            state,
            summary,
            progress,
            accept,
            None,
            seen,
            True,
            allow,
            tz,
        )
        said = str(failure).strip().splitlines()[-1:] or [type(failure).__name__]
        landed.message = "; ".join(
            m
            for m in (
                landed.message,
                f"the decoder failed on it ({said[0][:200]}) and decoded it again: the datagrams it fails on "
                'are rejects ("decoder error"), the rest landed',
            )
            if m
        )
        return landed
    except AlreadyIngested:
        _put_back(state, before)
        return _skipped(result, progress, size)
    except InputChanged as exc:
        _put_back(state, before)
        result.status = "rejected"
        result.message = (
            f"{exc}: nothing of it landed (its content hash and its rows must be of the same bytes). Ingest it "
            "again once it is complete (a capture or nfcapd file still being written: its rotated copy)"
        )
        return result
    finally:
        if hashing is not None:  # landed, skipped, refused or failed: the hash thread reads no further
            hashing.cancel()


def _put_back(state: DecoderState, before: DecoderState | None) -> None:
    """The decoder state as it was before the file (a copy taken then), in place."""
    if before is not None:
        state.__dict__.clear()
        state.__dict__.update(copy.deepcopy(before).__dict__)


def _skipped(result: FileResult, progress: Progress | None, size: int) -> FileResult:
    result.status = "skipped"
    result.message = "already in the lake (same content hash)"
    if progress:
        progress(size)
    return result


def _land_one(
    lake: Lake,
    path: Path,
    kind: str,
    source: str,
    content_hash: str | None,
    hashing: ContentHash | None,
    state: DecoderState,
    summary: IngestSummary,
    progress: Progress | None,
    accept: tuple[str, ...],
    pool: DecodePool | None,
    seen: os.stat_result,
    isolate: bool = False,
    allow: AllowList | None = None,
    tz: str = "UTC",
    batching: _Batching | None = None,
) -> FileResult:
    """_ingest_one's landing of a file not (known to be) in the lake: content_hash None while `hashing`;
    `seen`: its stat before it was hashed (InputChanged if it changed since). `isolate` (a capture, after the
    decoder raised on it): decoded here with netflow.Isolation, datagrams it raises on becoming rejects.
    `batching`: committed with the run's other small files (its result completed by _Batching.finish)."""
    size = path.stat().st_size
    result = FileResult(str(path), kind, "landed")
    stats: dict[str, dict[str, Any]] = {}
    # decoded here (no workers): row groups are sorted and written by a thread meanwhile, a quarter of the usual
    # size (as in a decode worker) so that all but the last overlap the decoding (issue 17: 1 M records)
    behind = {"row_group_rows": ROW_GROUP_ROWS // 4, "background": True} if pool is None else {}
    with lake.ingest("flows", source=source, content_hash=content_hash, **behind) as writer:
        if kind == "pcap" and pool is not None:
            result.datagrams = _land_pcap_parallel(
                writer, pool, path, source, state, stats, progress, hashing, allow, result.not_allowed
            )
            _land_leftover(writer, state, source, stats)
            if progress:
                progress(size)
        elif kind == "pcap":
            done = 0
            isolation = Isolation(passthrough=(LakeError, InputChanged, OSError)) if isolate else None
            for batch in _udp_batches(path, allow, result.not_allowed):
                if batch.rejects.num_rows:
                    writer.reject(batch.rejects)

                # walked and decoded as a decode worker does (decode_datagrams == the two, merged), with the
                # addresses kept as integers: the writer formats each distinct one once per row group instead
                # of once per batch (issue 17: this path, taken below the workers' size, still did the latter)
                def decode(part: slice, batch: Any = batch) -> tuple[Decoded, Decoded]:
                    if part.start == 0 and part.stop == len(batch.payloads):  # the batch as read (no copies)
                        columns = (batch.payloads, batch.exporters, batch.ts_us, batch.offsets)
                        in_file = InFile(str(path.absolute()), batch.payload_offsets, batch.heads)
                    else:  # a piece of it (Isolation)
                        columns = (
                            batch.payloads[part],
                            batch.exporters[part],
                            batch.ts_us[part],
                            batch.offsets[part],
                        )
                        heads = batch.heads[part.start * HEAD_BYTES : part.stop * HEAD_BYTES]
                        in_file = InFile(str(path.absolute()), batch.payload_offsets[part], heads)
                    walked, walk = walk_datagrams(*columns, source, state, in_file)
                    return walk, decode_walked(walked, ipv4_as_integers=True)

                whole = slice(0, len(batch.payloads))
                pieces = [decode(whole)] if isolation is None else isolation.decode(decode, whole.stop, state)
                for walk, columns in pieces:
                    for part in (walk, columns):
                        writer.reject(part.rejects)
                        merge_stats(stats, part.stats)
                    writer.write(
                        columns.flows
                    )  # after: rows outside the time window are rejects of their own
                if isolation is not None and isolation.failures:
                    writer.reject(
                        isolation.rejects(
                            batch.exporters,
                            batch.offsets,
                            batch.payloads.sizes.tolist(),
                            "the rest of the capture landed: please report it as a tracepipe bug (the capture "
                            "and this offset)",
                        )
                    )
                result.datagrams += len(batch.payloads)
                if progress and batch.bytes_read > done:
                    progress(batch.bytes_read - done)
                    done = batch.bytes_read
            _land_leftover(writer, state, source, stats)
            if progress and size > done:
                progress(size - done)
        elif kind == "nfcapd" and pool is not None and nffile.native_problem(path) is None:
            read = NfcapdRead()
            _land_nfcapd_parallel(writer, pool, path, source, stats, read, hashing)
            result.reader = read.reader
            if progress:
                progress(size)
        elif kind == "nfdump-csv" and pool is not None and (ranges := nfdump_csv_ranges(path, source, tz)):
            _land_csv_parallel(writer, pool, ranges, source, stats, hashing)
            if progress:
                progress(size)
        elif kind in READERS:
            _identify(writer, hashing)  # the labels' own check needs it first
            read = NfcapdRead()
            labels = _read_text_kind(lake, path, kind, source, writer.content_hash, writer, stats, read, tz)
            if labels:
                result.message = f"{labels} labels kept in flow_labels (for evaluation only)"
            result.reader = read.reader
            if read.reader == "nfdump":  # counted in the totals and said, never silent
                result.message = f"read through nfdump: {read.fallback}"
            if progress:
                progress(size)
        else:
            writer.reject(
                pa.table(
                    {
                        "offset": [0],
                        # NetFlow's reason stays "not a pcap" (sites count it); the others name their kind
                        "reason": [
                            "not a pcap" if "pcap" in accept else f"not a {accept[0].split('-')[0]} file"
                        ],
                        "detail": [f"none of {', '.join(accept)} (checked the first bytes)"],
                    }
                )
            )
            result.status = "rejected"
            result.message = (
                f"not a {', '.join(accept)} file; `tracepipe ingest --help` lists what each command reads"
            )
            if progress:
                progress(size)
        if result.not_allowed and not result.datagrams:
            # every datagram of a sender outside --allow (a mistyped prefix, most likely): nothing is committed,
            # not even the manifest row, so that a run with the right prefixes lands the capture
            result.status = "rejected"
            result.message = (
                f"every datagram of it ({sum(result.not_allowed.values())}) is of senders outside --allow: "
                f"{', '.join(sorted(result.not_allowed)[:5])}{', ...' if len(result.not_allowed) > 5 else ''}; "
                "nothing landed"
            )
            return result  # (the writer, left without a commit, removes what it wrote)
        _identify(writer, hashing)
        _unchanged(path, seen)  # after the hash and every read of the file, before anything is committed
        capped: dict[str, dict[str, Any]] = {}
        merge_exporter_totals(capped, stats)
        stats.clear()
        stats.update(capped)
        landing = {
            "kind": kind,
            "datagrams": result.datagrams,
            "exporters": stats,
            FILE_IDENTITY: fsutil.file_identity(seen),
        }
        if batching is not None:
            ingested = batching.batch.add(writer, landing)
            batching.pending.append((result, ingested, stats))
        else:
            ingested = writer.commit(landing)
    if ingested.skipped:  # another command landed the same content while this one decoded it
        raise AlreadyIngested
    result.flows = ingested.rows
    result.rejects = ingested.rejects
    if result.not_allowed:
        dropped = sorted(result.not_allowed.items(), key=lambda item: (-item[1], item[0]))
        listed = ", ".join(f"{name} ({n})" for name, n in dropped[:5]) + (", ..." if len(dropped) > 5 else "")
        said = f"{sum(result.not_allowed.values())} datagrams of senders outside --allow left out: {listed}"
        result.message = "; ".join(m for m in (result.message, said) if m)
    if result.status == "landed" and result.flows == 0:
        # a log or archive file of no records, and nothing in it rejected (a quiet sensor's header-only conn.log,
        # nfcapd's file of a quiet five minutes) is empty, not bad input: a capture that gave nothing is
        result.status = "empty" if kind in RECORD_KINDS and result.rejects == 0 else "rejected"
        why = (
            f": {result.rejects} rejected (the rejects dataset says where and why)" if result.rejects else ""
        )
        result.message = result.message or f"no flow records in this file{why}"
    if batching is None:  # (batched: _Batching.finish counts them once they are committed)
        _count_landed(summary, ingested, stats)
    return result


def _count_landed(summary: IngestSummary, ingested: IngestResult, stats: dict[str, dict[str, Any]]) -> None:
    """The days a landed file's rows went to, and its exporters' counts, into the run's summary."""
    for rel in ingested.files:
        match = re.search(r"^flows/date=(\d{4}-\d{2}-\d{2})/", rel)
        if match:
            summary.days.add(match.group(1))
    merge_exporter_totals(summary.exporters, stats)


def _read_text_kind(
    lake: Lake,
    path: Path,
    kind: str,
    source: str,
    content_hash: str,
    writer,
    stats: dict[str, dict[str, Any]],
    read: NfcapdRead | None = None,
    tz: str = "UTC",
) -> int:
    """Stream one file of a READERS kind into `writer`; ground-truth labels (argus Label) go to their own
    dataset, flow_labels, which detectors never read (committed before the flows: a rerun after a kill in
    between finds them there and does not write them twice). Returns how many labels landed."""
    labelled = 0
    keep_labels = not lake.already_ingested("flow_labels", content_hash)
    with contextlib.ExitStack() as stack:
        label_writer = None
        batches = (
            iter_nfcapd(path, read=read)
            if kind == "nfcapd"
            else iter_nfdump_csv(path, tz)
            if kind == "nfdump-csv"
            else READERS[kind](path)
        )
        for batch in batches:  # streamed: ~16 MB of text (or ~0.5 M nfcapd records) at a time
            flows, rejects = _with_source(batch[0], source), _with_source(batch[1], source)
            writer.write(flows)
            writer.reject(rejects)
            if keep_labels and len(batch) > 2 and batch[2].num_rows:
                if label_writer is None:
                    label_writer = stack.enter_context(
                        lake.ingest("flow_labels", source=source, content_hash=content_hash)
                    )
                label_writer.write(_with_source(batch[2], source))
                labelled += batch[2].num_rows
            _count(stats, kind, _value_counts(flows.column("exporter")), rejects)
        if kind == "nfcapd":
            _nfcapd_sampling(stats, path, read)
        if kind in ZEEK_KINDS + ARGUS_KINDS:  # sensors that see every packet they are given: unsampled
            for entry in stats.values():
                entry.setdefault("sampling", 1)
        if label_writer is not None:
            label_writer.commit({"kind": kind, "labels": labelled})
    return labelled


def _count(
    stats: dict[str, dict[str, Any]], kind: str, flows: dict[str | None, int], rejects: pa.Table
) -> None:
    """Flows and rejects of a batch per exporter (rows without one under the kind's name)."""
    for exporter, n in flows.items():
        entry = stats.setdefault(exporter or kind, {"flows": 0, "versions": [kind]})
        entry["flows"] += n
    rejected = rejects.column("exporter") if "exporter" in rejects.column_names else None
    counts = _value_counts(rejected) if rejected is not None else {None: rejects.num_rows}
    for exporter, n in counts.items():
        if n:
            entry = stats.setdefault(exporter or kind, {"flows": 0, "versions": [kind]})
            entry["rejects"] = entry.get("rejects", 0) + n


def _land_csv_parallel(
    writer: IngestWriter,
    pool: DecodePool,
    ranges: list[CsvRange],
    source: str,
    stats: dict[str, Any],
    hashing: ContentHash | None = None,
) -> None:
    """One nfdump CSV file through the worker pool: byte ranges cut at line ends are read, parsed and written
    as Parquet by the workers; rejects land here in file order with the file's line numbers."""
    lines = RangeLanding(ranges[0].columns)

    def land(_: int, part: Any) -> None:
        rejects = _with_source(lines.land(part.rejects, part.stats), source)
        writer.reject(rejects)
        # per exporter, the parser's rejects only (each has its line), as for one process: the rows the worker
        # found outside the plausible time window (no line) count in the totals, as IngestWriter counts them
        parsed = rejects.filter(pc.is_valid(rejects.column("line")))
        _count(stats, "nfdump-csv", {e: c["flows"] for e, c in part.stats.items()}, parsed)

    _through_pool(writer, pool, iter(ranges), land, hashing=hashing)


def _through_pool(
    writer: IngestWriter,
    pool: DecodePool,
    jobs: Iterator[Any],
    land: Callable[[int, Any], None],
    submit: Callable[[Any], list[tuple[int, Any]]] | None = None,
    hashing: ContentHash | None = None,
) -> None:
    """Send `jobs` to the pool for one source (`submit`: pool.submit, or another of its queues) and call
    land(number, answer) in job order as answers come back; the workers' files join the writer's commit. On
    any error the workers drop what they wrote. `hashing`: the source's content hash, still being computed;
    the workers name their files after it when they close them, and AlreadyIngested stops the source as
    soon as it is known to be in the lake."""
    submit = pool.submit if submit is None else submit
    answers: dict[int, Any] = {}
    landed = 0  # jobs landed so far, in order

    def arrived(new: list[tuple[int, Any]]) -> None:
        nonlocal landed
        answers.update(new)
        while landed in answers:
            land(landed, answers.pop(landed))
            landed += 1

    pool.begin(writer.key)
    try:
        for job in jobs:
            arrived(submit(job))
            if hashing is not None and hashing.done():
                _identify(writer, hashing)
        _identify(writer, hashing)
        last, adds, rows = pool.finish(writer.key)
        arrived(last)
    except BaseException:
        pool.abort()
        raise
    writer.adopt(adds, rows)


def _parallel(path: Path, kind: str | None, parallel_min_bytes: int) -> bool:
    """True when the decode workers take this file (PARALLEL_KINDS)."""
    return kind in PARALLEL_KINDS and _size(path) >= parallel_min_bytes * PARALLEL_KINDS[kind]


def _nfcapd_sampling(stats: dict[str, dict[str, Any]], path: Path, read: NfcapdRead | None) -> None:
    """The sampler list nfdump keeps in the file, per exporter (one interval: known)."""
    native = read is not None and read.reader == "native"
    for exporter, info in (read.exporters if native else nfcapd_exporters(path)).items():
        samplers = info["sampling"]
        if isinstance(samplers, list) and len(samplers) == 1:
            stats.setdefault(exporter, {"flows": 0, "versions": ["nfcapd"]})["sampling"] = samplers[0]


def _land_nfcapd_parallel(
    writer: IngestWriter,
    pool: DecodePool,
    path: Path,
    source: str,
    stats: dict[str, Any],
    read: NfcapdRead,
    hashing: ContentHash | None = None,
) -> None:
    """One nfcapd file through the worker pool: its block headers walked here, ranges of blocks read,
    decoded and written by the workers (no record bytes through pipes); rejects, counters and the exporter
    and sampler records (in file order) land here in input order, the workers' files in the writer's commit."""
    exporters = nffile.Exporters()
    fatal: list[pa.Table] = []  # blocks that end the walk or are stepped over (nffile.Skipped)

    def land(_: int, found: nffile.RangeRead) -> None:
        exporters.apply(found.infos)
        if found.implausible is not None:
            writer.reject(found.implausible)
        rejects = _with_source(found.rejects, source)
        writer.reject(rejects)
        _count(stats, "nfcapd", found.flows_by_exporter, rejects)

    def ranges() -> Iterator[Any]:
        for blocks in nffile.iter_ranges(path, source, parts=2 * pool.jobs):
            if isinstance(blocks, pa.Table):  # a block stepped over, or one that ends the walk
                fatal.append(_with_source(blocks, source))
                continue
            yield blocks

    _through_pool(writer, pool, ranges(), land, pool.submit_nfcapd, hashing)
    for rejects in fatal:
        writer.reject(rejects)
        _count(stats, "nfcapd", {}, rejects)
    read.reader, read.exporters = "native", exporters.out
    _nfcapd_sampling(stats, path, read)


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
    hashing: ContentHash | None = None,
    allow: AllowList | None = None,
    not_allowed: dict[str, int] | None = None,
) -> int:
    """One capture through the worker pool: walked here in input order (one decoder state), columns and
    Parquet in the workers; rejects and counters land in input order, the workers' files in the writer's
    commit. Returns the datagrams read."""
    waiting: dict[
        int, tuple[pa.Table, Decoded]
    ] = {}  # batch number -> (capture rejects, what the walk found)
    datagrams = 0
    done = 0

    def land(number: int, columns: Decoded) -> None:
        capture_rejects, walk = waiting.pop(number)
        writer.reject(capture_rejects)
        for part in (walk, columns):
            writer.reject(part.rejects)
            merge_stats(stats, part.stats)

    def walked_batches() -> Iterator[Any]:
        nonlocal datagrams, done
        for number, batch in enumerate(_udp_batches(path, allow, not_allowed)):
            # the records stay in the file: the worker reads them there (offsets, not bytes, through the pipe)
            in_file = InFile(str(path.absolute()), batch.payload_offsets, batch.heads)
            walked, walk = walk_datagrams(
                batch.payloads, batch.exporters, batch.ts_us, batch.offsets, source, state, in_file
            )
            waiting[number] = (batch.rejects, walk)
            datagrams += len(batch.payloads)
            yield walked
            if progress and batch.bytes_read > done:
                progress(batch.bytes_read - done)
                done = batch.bytes_read

    _through_pool(writer, pool, walked_batches(), land, hashing=hashing)
    return datagrams


def _udp_batches(
    path: Path, allow: AllowList | None, not_allowed: dict[str, int] | None
) -> Iterator[UdpBatch]:
    """The capture's batches of datagrams (pcap.iter_udp_batches), those of senders outside `allow` left out
    and counted per sender into `not_allowed` (the first `limits.exporters` senders by name, the rest summed
    under senders.OTHERS_TEXT: a capture of spoofed senders names no more)."""
    for batch in iter_udp_batches(path, batch_datagrams=BATCH_DATAGRAMS):
        if allow is None or allow.accepts_all or not len(batch.exporters):
            yield batch
            continue
        senders = pa.array(batch.exporters, pa.string()).dictionary_encode()
        index = senders.indices.to_numpy()
        keep = allow.allows_text(senders.dictionary.to_pylist())[index]
        if keep.all():
            yield batch
            continue
        if not_allowed is not None:
            dropped = np.bincount(index[~keep], minlength=len(senders.dictionary))
            for name, count in zip(senders.dictionary.to_pylist(), dropped.tolist(), strict=True):
                if count:
                    named = name in not_allowed or len(not_allowed) < DEFAULT_LIMITS.exporters
                    key = name if named else OTHERS_TEXT
                    not_allowed[key] = not_allowed.get(key, 0) + count
        yield batch.subset(keep)


def _with_source(flows: pa.Table, source: str) -> pa.Table:
    # one value for every row: dictionary-encoded, the form the lake writer takes text in (no list of n strings)
    indices = pa.array(np.zeros(flows.num_rows, np.int32))
    column = pa.DictionaryArray.from_arrays(indices, pa.array([source], pa.string()))
    if "source" in flows.column_names:
        return flows.set_column(flows.column_names.index("source"), "source", column)
    return flows.append_column("source", column)


def _value_counts(column: pa.ChunkedArray) -> dict[str | None, int]:
    counts = column.value_counts()
    return {v["values"]: v["counts"] for v in counts.to_pylist()}
