"""The collector's on-disk spool: append-only segment files of raw UDP datagrams, with arrival time and sender.

A segment is a sequence of blocks, one per receive batch: a 16-byte block header, `count` fixed 32-byte record
headers (arrival µs, length, sender port, family, sender address as 16 bytes, IPv4 mapped into ::ffff:0:0/96),
then the `count` payloads back to back. The writer appends whole blocks with one write() each, so a kill -9
can only tear the last block; `valid_length` finds the end of the last complete block and `recover_open`
truncates the segment there *before* it is hashed or committed, so a segment is committed with one content only.
The block CRC covers the record headers, not the payloads (checksumming every payload would cost about a fifth
of the receive path): a kill -9 cannot alter written bytes; a power loss can (zero-filled tail pages), and such
payloads decode as rejects.

Life of a segment: `seg-<serial>.open` (being written) -> `seg-<serial>.spool` (closed, immutable, waiting for
the committer) -> deleted, or moved to `done/` with --keep-segments, once its manifest row is in the lake.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import json
import logging
import os
import re
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tracepipe import fsutil
from tracepipe.limits import DEFAULT as DEFAULT_LIMITS
from tracepipe.limits import Limits

log = logging.getLogger("tracepipe.collect")

BLOCK_MAGIC = b"TPSB"
BLOCK_HEADER = struct.Struct("<4sIII")  # magic, datagram count, payload bytes, crc32 of the record headers
RECORD = np.dtype(
    [
        ("arrival_us", "<i8"),  # wall clock when the receive batch returned (µs since the epoch, UTC)
        ("length", "<u4"),
        ("port", "<u2"),
        ("family", "u1"),  # 4 or 6: the sender's family as it was on the wire
        ("flags", "u1"),  # reserved
        ("addr", "V16"),  # IPv6 bytes; IPv4 senders as ::ffff:a.b.c.d
    ]
)
assert RECORD.itemsize == 32
MAX_BLOCK_DATAGRAMS = 1 << 16

OPEN_SUFFIX = ".open"
CLOSED_SUFFIX = ".spool"
DONE_DIR = "done"
FAILED_DIR = "failed"  # what the decoder raised on (a bug), kept for the report: its datagrams (collector.commit_segment),
# or a whole segment when something outside the decoder failed
STATE_FILE = "decoder-state.json"
SERIAL_FILE = "last-segment.json"  # {"after_segment": name}: the last committed segment, for next_serial
RECOVERY_SUFFIX = ".recovered.json"  # sidecar: what recovery cut off the segment's torn tail
LAKE_FILE = "lake.json"  # {"lake": resolved path}: the lake this spool's segments are committed into


# the only names that are segments: what SegmentWriter writes. Anything else in the spool (a planted seg-x.spool,
# seg-1-2.open) is ignored and reported once, never parsed as a serial.
SEGMENT_NAME = re.compile(r"seg-([0-9]{9})\.(open|spool)")  # ASCII digits only (\d takes any script's)
MAX_SERIAL = 999_999_999
SIDECAR_BYTES = 4096  # a recovery sidecar is one small JSON object
_reported: set[tuple[str, str]] = set()  # (path, why) already logged by this process


def _report_once(path: Path, why: str) -> None:
    if (str(path), why) not in _reported:
        _reported.add((str(path), why))
        log.warning("spool: ignoring %s: %s (not written by the collector; remove it)", path, why)


def own_dir(path: Path) -> Path:
    """The spool's done/ or failed/ folder, made if missing, as a directory of its own: whatever else is under its
    name (a symlink to any folder of the host, a file; whoever can write the lake can write the spool) is
    removed and a directory made in its place, with a warning, so that nothing is moved or written through it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        path.mkdir(exist_ok=True)
        return path
    if not stat.S_ISDIR(mode):
        log.warning("%s was not a directory (planted?); replacing it", path)
        path.unlink()
        path.mkdir()
    return path


def segment_serial(path: Path) -> int | None:
    """The serial of a segment's name, None when the name is not one the collector writes."""
    match = SEGMENT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def segments(directory: Path, suffix: str) -> list[tuple[Path, int]]:
    """(path, size) of the segments ending in `suffix` in `directory`, by serial: regular files with a segment
    name only (lstat: a symlink to /dev/zero, a FIFO, a directory is no segment); others are reported once. A
    file that vanishes while listed (a commit deleting it) is left out."""
    found: list[tuple[int, Path, int]] = []
    try:
        entries = list(directory.glob(f"seg-*{suffix}"))
    except OSError:
        return []
    for path in entries:
        serial = segment_serial(path)
        if serial is None:
            _report_once(path, "not a segment name (seg-<9 digits>.open or .spool)")
            continue
        try:
            info = path.lstat()
        except OSError:  # gone in between
            continue
        if not stat.S_ISREG(info.st_mode):
            _report_once(path, f"not a regular file (a {fsutil.kind(info.st_mode)})")
            continue
        found.append((serial, path, info.st_size))
    return [(path, size) for _serial, path, size in sorted(found)]


def open_segments(spool: Path) -> list[Path]:
    return [path for path, _size in segments(spool, OPEN_SUFFIX)]


def closed_segments(spool: Path) -> list[Path]:
    return [path for path, _size in segments(spool, CLOSED_SUFFIX)]


def next_serial(spool: Path, max_state_bytes: int = DEFAULT_LIMITS.decoder_state_bytes) -> int:
    """One more than any segment this spool ever had: the segments in it, in done/ and failed/, and the last
    committed one as the committer recorded it in SERIAL_FILE (small, apart from the decoder state: a state file
    refused at load does not take it along) or, from older versions, in the decoder state. Serials never
    repeat, so "state is after segment N" stays unambiguous and a flow's `source` names one segment only."""
    serials = [
        serial
        for d in (spool, spool / DONE_DIR, spool / FAILED_DIR)
        for p in (d.glob("seg-*") if d.is_dir() else [])
        if (serial := segment_serial(p)) is not None
    ]
    for saved in (
        read_json_object(spool / SERIAL_FILE, SIDECAR_BYTES)[0],
        read_state_file(spool, max_state_bytes)[0],
    ):
        after = saved.get("after_segment") if saved is not None else None
        if isinstance(after, str) and (serial := segment_serial(Path(after))) is not None:
            serials.append(serial)
    return max(serials, default=0) + 1


def read_json_object(path: Path, max_bytes: int) -> tuple[dict | None, str]:
    """The JSON object in `path`, or (None, why not): missing (""), not a regular file, larger than `max_bytes`
    (checked before reading: a planted huge file is never parsed), or not a JSON object."""
    try:
        data = fsutil.read_regular(path, max_bytes)
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, exc.strerror if exc.errno == errno.EFBIG else f"cannot read it: {exc.strerror}"
    try:
        saved = json.loads(data)
    except (ValueError, RecursionError) as exc:
        return None, f"not readable JSON: {str(exc)[:200]}"
    if not isinstance(saved, dict):
        return None, "not a JSON object"
    return saved, ""


def read_state_file(
    spool: Path, max_bytes: int = DEFAULT_LIMITS.decoder_state_bytes
) -> tuple[dict | None, str]:
    """The saved decoder state of `spool` as a dict, or (None, why not): see read_json_object."""
    saved, problem = read_json_object(spool / STATE_FILE, max_bytes)
    return saved, f"{problem} (decoder_state_bytes)" if "more than the limit" in problem else problem


def block_head(records: np.ndarray, payload_bytes: int) -> bytes:
    """The start of a block: header + record headers; the `payload_bytes` of payloads follow it."""
    heads = records.tobytes()
    return BLOCK_HEADER.pack(BLOCK_MAGIC, len(records), payload_bytes, zlib.crc32(heads)) + heads


def encode_block(records: np.ndarray, payload: bytes) -> bytes:
    """One block: header + record headers + payloads. `records` is a RECORD array."""
    return block_head(records, len(payload)) + payload


def libc_function(name: str, argtypes: list[Any], restype: Any) -> Any:
    """libc's `name` through ctypes with errno kept, or None where it is missing or the struct layouts that the
    callers build with numpy (64-bit Linux) do not hold."""
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = restype
    return function


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (OSError, ValueError):
        return 1024
    return value if value > 0 else 1024


# writev(2), to write a block straight from the receive buffers (no copy, no Python object per datagram); where
# ctypes cannot call it, append_gather gathers the payloads in Python instead
_WRITEV = libc_function("writev", [ctypes.c_int, ctypes.c_void_p, ctypes.c_int], ctypes.c_ssize_t)
IOV_MAX = _iov_max()


def _writev_all(fd: int, iov: np.ndarray) -> None:
    """Write every (address, length) of the (n, 2) uint64 `iov` to `fd`, IOV_MAX entries per writev(2); a short
    write (disk full) continues where it stopped until the kernel returns an error. Mutates `iov`."""
    assert _WRITEV is not None
    pos, n = 0, len(iov)
    while pos < n:
        chunk = iov[pos : pos + IOV_MAX]
        done = _WRITEV(fd, chunk.ctypes.data, len(chunk))
        if done < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise OSError(err, os.strerror(err))
        ends = np.cumsum(chunk[:, 1], dtype=np.uint64)
        if done >= int(ends[-1]):
            pos += len(chunk)
            continue
        if done == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        full = int(np.searchsorted(ends, done, side="right"))  # entries written whole
        part = done - (int(ends[full - 1]) if full else 0)
        chunk[full, 0] += np.uint64(part)
        chunk[full, 1] -= np.uint64(part)
        pos += full


class SegmentWriter:
    """Appends blocks to `seg-<serial>.open`; `close()` makes it an immutable `.spool` segment.

    Writes go straight to the kernel (write or writev, no user-space buffer): a datagram is in the page cache, and so
    survives a kill -9 of the collector, as soon as the receive batch that returned it is appended.
    `sync()` (fdatasync) protects against power loss; the collector calls it, and `close()` of rotated segments,
    from a helper thread (every second), never from its receive loop.
    """

    def __init__(self, spool: Path, serial: int) -> None:
        self.path = spool / f"seg-{serial:09d}{OPEN_SUFFIX}"
        # O_EXCL: a new file, never one (or a symlink) planted under the name the next segment would take
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self.bytes = 0
        self.datagrams = 0

    def append(self, block: bytes, count: int) -> None:
        """Append one block whole, or not at all: on an error (disk full) the partial block is cut off again,
        so that later blocks stay readable, and the OSError is raised."""
        view = memoryview(block)
        try:
            while view:  # a regular-file write is complete unless the disk is full; loop for the partial case
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.bytes)
            raise
        self.bytes += len(block)
        self.datagrams += count

    def append_gather(self, head: bytes, payloads: np.ndarray, count: int) -> None:
        """Append one block whose payloads are still in memory at the (address, length) rows of the (n, 2)
        uint64 `payloads` (the receive buffer): one writev(2) of `head` + payloads for up to IOV_MAX - 1
        datagrams, without copying them into a bytes object first. All or nothing, like `append`. The caller
        keeps the memory behind `payloads` alive and unchanged during the call."""
        head_array = np.frombuffer(head, np.uint8)
        iov = np.empty((len(payloads) + 1, 2), np.uint64)
        iov[0] = (head_array.ctypes.data, len(head))
        iov[1:] = payloads
        size = int(iov[:, 1].sum())
        try:
            if _WRITEV is not None:
                _writev_all(self.fd, iov)
            else:
                gathered = b"".join(ctypes.string_at(int(a), int(n)) for a, n in iov[1:].tolist())
                view = memoryview(head + gathered)
                while view:
                    view = view[os.write(self.fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.bytes)
            raise
        self.bytes += size
        self.datagrams += count

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError:  # closed by a rotation in between: that rotation synced it
            pass

    def close(self) -> Path | None:
        """fsync, rename to `.spool`; an empty segment is removed instead. Returns the closed path."""
        os.fsync(self.fd)
        os.close(self.fd)
        if self.datagrams == 0:
            self.path.unlink(missing_ok=True)
            return None
        closed = self.path.with_suffix(CLOSED_SUFFIX)
        fsutil.move_durably(self.path, closed)
        return closed


@dataclass
class Block:
    offset: int  # file offset of the block header
    records: np.ndarray  # RECORD
    payload: memoryview
    payload_offset: int  # file offset of the first payload byte


def _check_block(data: memoryview, pos: int) -> tuple[int, int, int] | None:
    """(count, payload bytes, block end) if a complete, well-formed block starts at `pos`, else None."""
    if len(data) - pos < BLOCK_HEADER.size:
        return None
    magic, count, payload_bytes, crc = BLOCK_HEADER.unpack_from(data, pos)
    heads_start = pos + BLOCK_HEADER.size
    heads_end = heads_start + count * RECORD.itemsize
    end = heads_end + payload_bytes
    if magic != BLOCK_MAGIC or count == 0 or count > MAX_BLOCK_DATAGRAMS or end > len(data):
        return None
    if zlib.crc32(data[heads_start:heads_end]) != crc:
        return None
    lengths = np.frombuffer(data[heads_start:heads_end], dtype=RECORD)["length"]
    if int(lengths.sum(dtype=np.int64)) != payload_bytes:
        return None
    return count, payload_bytes, end


def iter_blocks(data: bytes | memoryview) -> Iterator[Block]:
    """The complete blocks of a segment's bytes, in order; stops at the first torn or damaged one."""
    data = memoryview(data)
    pos = 0
    while (checked := _check_block(data, pos)) is not None:
        count, _payload_bytes, end = checked
        heads_start = pos + BLOCK_HEADER.size
        heads_end = heads_start + count * RECORD.itemsize
        records = np.frombuffer(data[heads_start:heads_end], dtype=RECORD)
        yield Block(pos, records, data[heads_end:end], heads_end)
        pos = end


def read_blocks(path: Path) -> Iterator[Block]:
    """The complete blocks of a segment file, read one at a time (memory: one block). Only a regular file is
    read (fsutil.open_regular: a FIFO or symlink planted under a segment's name is an OSError)."""
    with os.fdopen(fsutil.open_regular(path), "rb") as handle:
        pos = 0
        while len(head := handle.read(BLOCK_HEADER.size)) == BLOCK_HEADER.size:
            magic, count, payload_bytes, _crc = BLOCK_HEADER.unpack(head)
            if magic != BLOCK_MAGIC or count > MAX_BLOCK_DATAGRAMS:
                return
            body = handle.read(count * RECORD.itemsize + payload_bytes)
            data = memoryview(head + body)
            if _check_block(data, 0) is None:
                return
            for block in iter_blocks(data):
                block.offset += pos
                block.payload_offset += pos
                yield block
            pos += len(data)


def valid_length(data: bytes | memoryview) -> tuple[int, int]:
    """(bytes of complete blocks, datagrams in them) at the start of a segment's bytes."""
    length = datagrams = 0
    for block in iter_blocks(data):
        length = block.payload_offset + len(block.payload)
        datagrams += len(block.records)
    return length, datagrams


@dataclass
class Recovery:
    segment: Path  # the closed segment it became (or the removed open one when nothing was complete)
    datagrams: int
    kept_bytes: int
    cut_bytes: int  # torn tail removed: a write the kill interrupted


def recover_open(path: Path) -> Recovery:
    """A segment left `.open` by a crash: truncate to its last complete block, fsync, close it.

    The torn tail (if any) is counted in a sidecar JSON that the committer turns into a reject row.
    """
    with os.fdopen(fsutil.open_regular(path, os.O_RDWR), "r+b") as handle:
        data = handle.read()
        kept, datagrams = valid_length(data)
        cut = len(data) - kept
        closed = path.with_suffix(CLOSED_SUFFIX)
        if datagrams == 0:
            path.unlink()
            return Recovery(closed, 0, 0, cut)
        handle.truncate(kept)
        handle.flush()
        os.fsync(handle.fileno())
    if cut:
        sidecar = closed.with_name(closed.name + RECOVERY_SUFFIX)
        fsutil.write_atomic(
            sidecar, json.dumps({"cut_bytes": cut, "kept_bytes": kept, "datagrams": datagrams})
        )
    fsutil.move_durably(path, closed)
    return Recovery(closed, datagrams, kept, cut)


def read_recovery(segment: Path) -> dict[str, int] | None:
    """What recovery cut off `segment` (its sidecar: cut_bytes, kept_bytes, datagrams), or None: no sidecar,
    or one that is not what recover_open writes (planted or damaged; reported once and treated as absent, so
    that the segment itself still lands)."""
    sidecar = segment.with_name(segment.name + RECOVERY_SUFFIX)
    saved, problem = read_json_object(sidecar, SIDECAR_BYTES)
    if saved is not None:
        counts = {name: saved.get(name) for name in ("cut_bytes", "kept_bytes", "datagrams")}
        if all(type(value) is int and value >= 0 for value in counts.values()):
            return counts  # type: ignore[return-value]
        problem = "not the counts that recovery writes"
    if problem:
        _report_once(sidecar, problem)
    return None


def addresses_text(addr16: np.ndarray) -> np.ndarray:
    """Canonical text of 16-byte sender addresses (IPv4-mapped shown as IPv4); ipaddress on unique values only."""
    if len(addr16) == 0:
        return np.array([], dtype=object)
    keys = np.ascontiguousarray(addr16, dtype=np.uint8).view("V16").reshape(-1)
    uniques, inverse = np.unique(keys, return_inverse=True)
    texts = []
    for raw in uniques:
        ip = ipaddress.IPv6Address(raw.tobytes())
        texts.append(str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip))
    return np.array(texts, dtype=object)[inverse.reshape(-1)]


def write_json_atomic(path: Path, obj: object, durable: bool = True) -> None:
    """Replace `path` atomically (readers see the old or the new file). `durable=False` skips the fsync: fine for
    monitoring files, and keeps a journal commit from stalling the receive loop."""
    fsutil.write_atomic(path, json.dumps(obj, indent=1, default=str), durable=durable)


# ---- the decoder state file (the collector's spool; a lake's _settings for `ingest netflow`) ----------------
def load_decoder_state(spool: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[Any, str | None]:
    """The decoder state saved after the last commit, loaded within `limits`. A file too large to be ours
    (limits.decoder_state_bytes) or that does not parse is not used: the decoder starts empty (templates come
    back with the exporters' next refresh), and that is logged and counted in `limits_hit`."""
    from tracepipe.ingest.netflow import DecoderState

    saved, problem = read_state_file(spool, limits.decoder_state_bytes)
    if saved is None:
        state = DecoderState(limits)
        if problem:
            log.warning("decoder state %s not used (%s); starting without templates", STATE_FILE, problem)
            limit = "decoder_state_bytes" if "decoder_state_bytes" in problem else "decoder_state_entries"
            state.limits_hit[limit] += 1
        return state, None
    body = saved.get("state")
    try:
        if isinstance(body, dict):
            state = DecoderState.from_json(json.dumps(body), limits)
        elif isinstance(body, str):  # saved by versions before 2026-12: the state's JSON text as a string
            state = DecoderState.from_json(body, limits)
        else:
            raise ValueError("no decoder state in it")
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("decoder state %s not used (%s); starting without templates", STATE_FILE, exc)
        state = DecoderState(limits)
        state.limits_hit["decoder_state_entries"] += 1
        return state, None
    if state.limits_hit:
        log.warning("decoder state %s loaded within limits: %s", STATE_FILE, dict(state.limits_hit))
    after = saved.get("after_segment")
    return state, after if isinstance(after, str) else None


# Parts of the decoder state left out, in this order, when the saved state would outgrow the limit it is loaded
# with (limits.decoder_state_bytes): a state refused at load loses every template; without these it loses only
# interface names, then data waiting for a template, then sampler intervals and sequence numbers.
STATE_PARTS_TO_SHED = ("if_names", "pending", "samplers", "sequences")


def _encode_json(obj: object) -> bytes:
    """Compact JSON as UTF-8 (an emoji is 4 bytes, not a 12-byte escape pair); with escapes only where the text
    holds a lone surrogate, which UTF-8 cannot carry."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def state_file_bytes(state: Any, segment: str, max_bytes: int, leave_out: tuple[str, ...] = ()) -> bytes:
    """decoder-state.json for `state` after `segment`: the state as one JSON object (not its JSON text encoded
    as a string again, which made every astral character 14 bytes), kept within `max_bytes` so that the next
    load takes it: over that, the parts of STATE_PARTS_TO_SHED are left out in turn (logged, and counted in
    limits_hit["decoder_state_bytes"]). Templates are never shed: if they alone exceed it (a --limit raising
    the template bounds past decoder_state_bytes) the file is still written and the error logged, as the next
    start will not load it."""
    body = json.loads(state.to_json())
    for part in leave_out:  # (parts the reader never wants: a capture's sequences and waiting data)
        body[part] = {}
    data = _encode_json({"after_segment": segment, "state": body})
    shed = []
    for part in STATE_PARTS_TO_SHED:
        if len(data) <= max_bytes:
            break
        body[part] = {}
        shed.append(part)
        data = _encode_json({"after_segment": segment, "state": body})
    if shed:
        log.warning(
            "decoder state saved without %s: with them it would exceed the %d bytes it may have (limit "
            "decoder_state_bytes)",
            ", ".join(shed),
            max_bytes,
        )
        state.limits_hit["decoder_state_bytes"] += 1
    if len(data) > max_bytes:
        log.error(
            "decoder state is %d bytes with its templates alone, over decoder_state_bytes (%d): the next start "
            "will not load it; raise --limit decoder_state_bytes or lower the template limits",
            len(data),
            max_bytes,
        )
    return data
