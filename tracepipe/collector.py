"""`tracepipe collect`: a NetFlow v1/v5/v9/IPFIX collector that spools first and decodes later.

In: UDP datagrams on one or more `--listen` sockets (IPv4 and IPv6). The receive loop does nothing but
`recvmmsg` (through libc; batches of up to 1023 datagrams), drop senders outside `--allow`, and append the batch
to the current spool segment (tracepipe/spool.py) with one writev() straight from the receive slots; no Python
runs per datagram. Several collectors share a port with `--reuseport`. A separate committer process decodes each
closed segment with the same decoder as `tracepipe ingest netflow` and commits it to the lake, keyed by the
segment's content hash, then persists the decoder state (templates, sequence numbers) next to the spool.

Guarantee: a datagram that the receive loop has returned from the kernel is in the spool file (page cache) before
the loop waits for the next batch; after a kill -9 and restart, every such datagram lands in the lake exactly
once (torn tail blocks are cut before hashing; a committed segment is skipped by its hash). Datagrams still in the
kernel socket buffer at the kill are not received and are lost, as with any UDP collector.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import errno
import fcntl
import ipaddress
import json
import logging
import math
import mmap
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tracepipe import fsutil
from tracepipe import spool as sp
from tracepipe.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, EnvironmentProblem, LakeError, UsageError
from tracepipe.limits import DEFAULT as DEFAULT_LIMITS
from tracepipe.limits import Limits
from tracepipe.senders import OTHERS_TEXT, AllowList
from tracepipe.units import ListenSpec

log = logging.getLogger("tracepipe.collect")

DEFAULT_RCVBUF = 32 << 20
MAX_RCVBUF = 1 << 30  # setsockopt takes an int, and the kernel doubles it
DEFAULT_ROTATE_S = 300.0
DEFAULT_SEGMENT_BYTES = 256 << 20
DEFAULT_STATUS_S = 10.0
SYNC_INTERVAL_S = 1.0  # fdatasync of the open segment (power loss; a kill -9 loses nothing written)
BATCH = min(1024, sp.IOV_MAX - 1)  # datagrams per recvmmsg call; with the block head, one writev(2) per batch
SLOT = 65536  # bytes per datagram slot: the largest UDP payload fits, nothing is ever truncated
PREFAULT_BYTES = 9216  # of each slot, touched at start: a jumbo frame's datagram
# After a wakeup that found fewer than COALESCE_BELOW datagrams, the loop pauses before it polls again, so that the
# next recvmmsg takes many: the per-wakeup cost (~40 µs of poll, recvmmsg, numpy and writev) is paid per batch,
# not per datagram, at moderate rates. Bounded by the receive buffer: kernel memory per datagram (~2 KB for a
# 1.4 KB one) at 1 M datagrams/s.
COALESCE_S = 0.002
COALESCE_BELOW = 64
COALESCE_BYTES_PER_S = 2e9
DECODE_CHUNK = 20_000  # datagrams per decode_datagrams call in the committer (bounds its memory)
COMMITTER_STATS = "committer.json"
COMMITTER_STATS_BYTES = 64 << 20  # a committer.json larger than this is not read by the status line
# An exited committer is restarted after 1 s, then 2, 4 ... up to a minute while it keeps exiting (each start
# imports pyarrow and the decoder); one that ran for a minute before it exited starts over at 1 s.
COMMITTER_BACKOFF_MAX_S = 60.0
# The receive loop leaves this much of the spool's filesystem free (statvfs, checked every second and whenever
# the room it last saw is used up): at most 64 MiB, at most a tenth of the filesystem, plus twice the saved
# decoder state. That is the room the committer needs to save the state and remove committed segments, so a
# flood cannot fill the disk to where nothing can be committed and freed any more.
SPOOL_RESERVE_BYTES = 64 << 20
SPOOL_RESERVE_SHARE = 10
ROOM_CHECK_S = 1.0
COMMITTER_NICE = 10  # the committer's niceness above the collector's
FAILED_DIR = sp.FAILED_DIR
LOCK_FILE = ".collector.lock"
COMMIT_LOCK_FILE = ".committer.lock"

# Linux constants that the socket module does not export
SO_RCVBUFFORCE = 33
MSG_DONTWAIT = 0x40
PR_SET_PDEATHSIG = 1


# ---- options --------------------------------------------------------------------------------------------------


@dataclass
class CollectorConfig:
    listen: list[ListenSpec]
    lake: Path
    spool: Path | None = None  # default <lake>/_spool
    rotate_s: float = DEFAULT_ROTATE_S
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    rcvbuf: int = DEFAULT_RCVBUF
    allow: list[str] = field(default_factory=list)
    status_s: float = DEFAULT_STATUS_S
    stats_file: Path | None = None
    keep_segments: bool = False  # move committed segments to <spool>/done/ instead of deleting them
    limits: Limits = DEFAULT_LIMITS  # bounds of the decoder state (what senders control)
    # SO_REUSEPORT: several collectors (each its own --spool) share the --listen ports
    reuseport: bool = False
    coalesce_s: float = COALESCE_S  # pause after a small batch (0: none)
    # bytes the receive loop leaves free on the spool's filesystem; None: see SPOOL_RESERVE_BYTES
    spool_reserve: int | None = None

    @property
    def spool_dir(self) -> Path:
        return self.spool if self.spool is not None else self.lake / "_spool"


# ---- sockets ----------------------------------------------------------------------------------------------------


def open_socket(spec: ListenSpec, rcvbuf: int, reuseport: bool = False) -> tuple[socket.socket, int]:
    """Bind one UDP socket with a receive buffer of `rcvbuf` bytes if the kernel allows; returns (socket,
    granted bytes). SO_RCVBUFFORCE (root / CAP_NET_ADMIN) goes past net.core.rmem_max; else SO_RCVBUF, capped.

    `reuseport`: SO_REUSEPORT, so that more collectors of the same user bind the same port; the kernel hands each
    datagram to one of them by a hash of its sender address and port, so an exporter's datagrams (its templates
    and sequence numbers) all go to one collector while the exporters spread over them (and over the cores)."""
    if not 0 < rcvbuf <= MAX_RCVBUF:
        raise UsageError(f"--rcvbuf {rcvbuf} is out of range; the kernel takes 1 byte to 1G")
    sock = socket.socket(spec.family, socket.SOCK_DGRAM)
    try:
        if spec.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((spec.host, spec.port))
    except OSError as exc:
        sock.close()
        raise EnvironmentProblem(
            f"cannot listen on {spec}: {exc.strerror}. Is another collector (nfcapd?) "
            f"bound to it, or is the address not on this host? (Several tracepipe collectors share a port "
            f"when each is started with --reuseport and its own --spool.)"
        ) from exc
    sock.setblocking(False)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # the kernel reports double
    return sock, granted


def rmem_max() -> int | None:
    try:
        return int(Path("/proc/sys/net/core/rmem_max").read_text())
    except (OSError, ValueError):
        return None


def kernel_drops(sockets: Sequence[socket.socket]) -> dict[int, int]:
    """Datagrams the kernel dropped per socket (receive buffer full), from the `drops` column of
    /proc/net/udp and /proc/net/udp6, matched by the socket's inode. Keyed by fileno."""
    inodes = {os.fstat(s.fileno()).st_ino: s.fileno() for s in sockets if s.fileno() >= 0}
    drops: dict[int, int] = {}
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) >= 13 and cols[9].isdigit() and int(cols[9]) in inodes:
                drops[inodes[int(cols[9])]] = int(cols[12])
    return drops


_RECVMMSG = sp.libc_function(
    "recvmmsg", [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p], ctypes.c_int
)


class BatchReceiver:
    """recvmmsg(2) on one socket into preallocated buffers: up to `batch` datagrams per system call.

    The `struct mmsghdr` array (64 bytes each on 64-bit Linux: msghdr of 56 + msg_len + pad) lives in a numpy
    array, so that lengths and sender addresses of a whole batch are read as columns, and the payloads are handed
    to the spool as (address, length) rows of the same iovecs: nothing in Python runs per datagram.
    Falls back to recvfrom_into one datagram at a time where libc has no recvmmsg.
    """

    def __init__(self, sock: socket.socket, batch: int = BATCH) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.family = sock.family
        self.batch = batch
        self.buffer = np.empty(batch * SLOT, dtype=np.uint8)  # untouched pages cost no memory
        # fault in the pages that datagrams up to jumbo size fill now, not during the first burst
        self.buffer.reshape(batch, SLOT)[:, : PREFAULT_BYTES : mmap.PAGESIZE] = 0
        self.view = memoryview(self.buffer)
        self.names = np.zeros((batch, 128), dtype=np.uint8)  # struct sockaddr_storage per datagram
        self.iov = np.zeros((batch, 2), dtype=np.uint64)  # struct iovec {base, len}
        self.iov[:, 0] = self.buffer.ctypes.data + np.arange(batch, dtype=np.uint64) * SLOT
        self.iov[:, 1] = SLOT
        self.headers = np.zeros((batch, 8), dtype=np.uint64)
        self.headers[:, 0] = self.names.ctypes.data + np.arange(batch, dtype=np.uint64) * 128  # msg_name
        self.headers[:, 2] = self.iov.ctypes.data + np.arange(batch, dtype=np.uint64) * 16  # msg_iov
        self.headers[:, 3] = 1  # msg_iovlen
        self.words = self.headers.view(np.uint32)  # [:, 2] msg_namelen, [:, 12] msg_flags, [:, 14] msg_len
        self.pointer = self.headers.ctypes.data

    def receive(self) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(count, addr16 (n,16) uint8, ports, payloads) of what is queued now; count 0 when empty. `payloads`
        is an (n, 2) uint64 array of (address, length) in this receiver's buffer, valid until the next call."""
        if _RECVMMSG is None:
            return self._receive_one_by_one()
        self.words[:, 2] = 128
        count = _RECVMMSG(self.fd, self.pointer, self.batch, MSG_DONTWAIT, None)
        if count <= 0:
            err = ctypes.get_errno()
            if count < 0 and err not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                raise OSError(err, os.strerror(err))
            return 0, np.empty((0, 16), np.uint8), np.empty(0, np.uint16), np.empty((0, 2), np.uint64)
        names = self.names[:count]
        ports = names[:, 2].astype(np.uint16) << 8 | names[:, 3]  # sin_port / sin6_port, network order
        addr16 = np.zeros((count, 16), dtype=np.uint8)
        if self.family == socket.AF_INET6:
            addr16[:] = names[:, 8:24]
        else:
            addr16[:, 10:12] = 0xFF
            addr16[:, 12:16] = names[:, 4:8]
        payloads = np.empty((count, 2), np.uint64)
        payloads[:, 0] = self.iov[:count, 0]
        payloads[:, 1] = self.words[:count, 14]
        return count, addr16, ports, payloads

    def _receive_one_by_one(self) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        addrs, ports, lengths = [], [], []
        for i in range(self.batch):
            slot = self.view[i * SLOT : (i + 1) * SLOT]
            try:
                n, sender = self.sock.recvfrom_into(slot)
            except (BlockingIOError, InterruptedError):
                break
            ip = ipaddress.ip_address(sender[0].split("%")[0])
            packed = ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed
            addrs.append(np.frombuffer(packed, np.uint8))
            ports.append(sender[1])
            lengths.append(n)
        if not lengths:
            return 0, np.empty((0, 16), np.uint8), np.empty(0, np.uint16), np.empty((0, 2), np.uint64)
        payloads = np.empty((len(lengths), 2), np.uint64)
        payloads[:, 0] = self.iov[: len(lengths), 0]
        payloads[:, 1] = lengths
        return len(lengths), np.stack(addrs), np.array(ports, np.uint16), payloads


def block_records(
    arrival_us: int, family: int, addr16: np.ndarray, ports: np.ndarray, lengths: Any
) -> np.ndarray:
    """The spool record headers (spool.RECORD) of one receive batch."""
    records = np.zeros(len(ports), dtype=sp.RECORD)
    records["arrival_us"] = arrival_us
    records["length"] = lengths
    records["port"] = ports
    records["family"] = 6 if family == socket.AF_INET6 else 4
    records["addr"] = np.ascontiguousarray(addr16).view("V16").reshape(-1)
    return records


def make_block(
    arrival_us: int, family: int, addr16: np.ndarray, ports: np.ndarray, payloads: list[memoryview]
) -> bytes:
    """One spool block of `payloads` as bytes (tests and benchmarks; the receive loop writes blocks straight
    from its buffer with SegmentWriter.append_gather)."""
    records = block_records(arrival_us, family, addr16, ports, [len(p) for p in payloads])
    return sp.encode_block(records, b"".join(payloads))


# ---- the committer (a separate process) ------------------------------------------------------------------------


# the decoder state's file, shared with `ingest netflow`'s captures (spool.py)
_load_state = sp.load_decoder_state
state_file_bytes = sp.state_file_bytes


def _save_state(spool: Path, state: Any, segment: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """Persist the decoder state after `segment`, then the segment's name alone in its own small file (what
    spool.next_serial trusts even when the state file is refused). OSError (disk full) is the caller's."""
    fsutil.write_atomic(spool / sp.STATE_FILE, state_file_bytes(state, segment, limits.decoder_state_bytes))
    sp.write_json_atomic(spool / sp.SERIAL_FILE, {"after_segment": segment})


def _attribution(lake: Any) -> Any:
    """flows -> flows with src_vm/dst_vm/attributed_at when the lake has vm_leases, to attribute flows before
    they land (as `ingest netflow` does right after landing); None otherwise. One Attributor per lake serves
    every segment: it indexes the leases of the days the flows fall on, again only when vm_leases or vms changed
    or flows fall outside those days (not every lease of the lake's history for every segment). A failure lets
    the flows land unattributed (joined to VMs at query time): attribution is an optimisation, never a reason
    not to commit."""
    if not lake.files("vm_leases"):
        _ATTRIBUTORS.pop(lake.root, None)
        return None
    try:
        from tracepipe.correlate.attribution import Attributor

        attributor = _ATTRIBUTORS.get(lake.root)
        if attributor is None:
            attributor = _ATTRIBUTORS.setdefault(lake.root, Attributor(lake, widest=dt.timedelta(days=2)))
        attributor.lake = lake
        attributor.refresh()
    except Exception as exc:
        log.warning("flows land unattributed (joined to VMs at query time): cannot read vm_leases: %s", exc)
        return None

    def attribute(flows: Any) -> Any:
        try:
            return attributor(flows)
        except Exception as exc:
            log.warning(
                "flows land unattributed (joined to VMs at query time): cannot index vm_leases: %s", exc
            )
            _ATTRIBUTORS.pop(lake.root, None)
            return flows

    return attribute


_ATTRIBUTORS: dict[Path, Any] = {}  # lake root -> its correlate.attribution.Attributor (see _attribution)


@dataclass
class SegmentResult:
    segment: str
    content_hash: str
    datagrams: int
    flows: int
    rejects: int
    skipped: bool  # already in the lake (a restart after the commit, before the segment was marked done)
    stats: dict[str, Any]


class _SetAside:
    """The datagrams of one segment the decoder raised on (netflow.Isolation): their reject rows (take) and
    their record bytes, written to failed/<segment> by save()."""

    def __init__(self, segment: Path) -> None:
        from tracepipe.ingest.netflow import Isolation

        self.segment = segment
        self.isolation = Isolation(passthrough=(LakeError,))
        self.records: list[np.ndarray] = []
        self.payloads: list[bytes] = []
        self.kept = 0  # datagrams set aside so far

    def take(self, records: np.ndarray, payloads: list[bytes], exporters: np.ndarray, at: np.ndarray) -> Any:
        """Reject rows for the last decode's failures (one per piece: its first datagram's offset), their
        datagrams kept for save()."""
        for part, _exc in self.isolation.failures:
            self.records.append(records[part])
            self.payloads.extend(payloads[part])
            self.kept += part.stop - part.start
        where = f"set aside in {FAILED_DIR}/{self.segment.name} for a bug report"
        return self.isolation.rejects(exporters, at, [len(p) for p in payloads], where)

    def save(self) -> None:
        """failed/<segment>: the set-aside datagrams as one block of the spool's format (written aside, then
        renamed: never half a file)."""
        folder = sp.own_dir(self.segment.parent / FAILED_DIR)
        records = np.concatenate(self.records)
        with fsutil.replacing(folder / self.segment.name) as tmp:
            tmp.write_bytes(sp.encode_block(records, b"".join(self.payloads)))


def commit_segment(lake: Any, path: Path, state: Any, isolate: bool = False) -> SegmentResult:
    """Decode one closed spool segment with the NetFlow decoder and commit it to `lake` as one source
    (content hash = the segment's sha256, source = its path). Mutates `state` (templates, sequence numbers).

    Already in the manifest: decoded anyway, to bring `state` to where that commit left it, but nothing is
    written. That is what makes a kill between commit and state save harmless.

    `isolate` (commit_pending, after an exception escaped the decoder on this segment with the state it saved
    before it): the decoder's state is copied before each piece of datagrams and put back when the piece
    raises, which is then decoded again in halves (netflow.Isolation), down to the datagrams that raise on
    their own. Those are set aside (failed/<segment>: the same block format, for a bug report), one reject each with
    its offset and the exception, and everything else lands as it would have.
    """
    import hashlib

    import pyarrow as pa

    from tracepipe.ingest.netflow import decode_datagrams

    # sha256 of the bytes, as lake.hash_file, but of a regular file only (a FIFO planted under a segment's name
    # blocked here for ever, a symlink to /dev/zero was hashed for minutes)
    with os.fdopen(fsutil.open_regular(path), "rb") as handle:
        content_hash = hashlib.file_digest(handle, "sha256").hexdigest()
    source = str(path.resolve())
    skipped = lake.already_ingested("flows", content_hash)
    per_exporter: dict[str, dict[str, Any]] = {}
    stats: dict[str, Any] = {"kind": "collector spool", "exporters": per_exporter}
    datagrams = flows = rejects = 0
    leases_version = lake.version("vm_leases")  # read before the leases the flows are attributed with
    attribute = None if skipped else _attribution(lake)
    writer = None if skipped else lake.ingest("flows", source, content_hash)
    with contextlib.ExitStack() as stack:
        if writer is not None:
            stack.enter_context(writer)
        pending: list[sp.Block] = []
        far_days: set[int] = set()  # the days outside the arrival days this segment's flows were kept on
        bad = _SetAside(path)  # datagrams the decoder raised on (isolate)

        def decode(blocks: list[sp.Block]) -> None:
            nonlocal datagrams, flows, rejects
            records = np.concatenate([b.records for b in blocks])
            payloads: list[bytes] = []
            offsets: list[np.ndarray] = []
            for block in blocks:
                ends = np.cumsum(block.records["length"].astype(np.int64))
                starts = ends - block.records["length"]
                mv = block.payload
                payloads.extend(bytes(mv[a:b]) for a, b in zip(starts.tolist(), ends.tolist(), strict=True))
                offsets.append(starts + block.payload_offset)
            exporters = sp.addresses_text(
                np.ascontiguousarray(records["addr"]).view(np.uint8).reshape(-1, 16)
            )
            at = np.concatenate(offsets)
            arrival = records["arrival_us"].astype(np.int64)

            def decode_part(part: slice) -> Any:
                return decode_datagrams(
                    payloads[part],
                    list(exporters[part]),
                    arrival[part],
                    at[part],
                    source,
                    state,
                    text_as_dictionary=True,  # as `ingest netflow` does: the lake writer takes them fastest
                )

            if isolate:
                parts = bad.isolation.decode(decode_part, len(records), state)
            else:
                parts = [decode_part(slice(0, len(records)))]
            for decoded in parts:
                kept, far = near_days(  # (the days near the whole chunk's arrivals, as without isolation)
                    decoded.flows, records["arrival_us"], far_days, state.limits.far_days_per_segment
                )
                flows += kept.num_rows
                rejects += decoded.rejects.num_rows + far.num_rows
                merge_exporter_totals(per_exporter, decoded.stats, state.limits)
                if writer is not None:
                    writer.write(kept if attribute is None else attribute(kept))
                    writer.reject(decoded.rejects)
                    writer.reject(far)
            datagrams += len(records)
            if bad.isolation.failures:
                set_aside = bad.take(records, payloads, exporters, at)
                rejects += set_aside.num_rows
                if writer is not None:
                    writer.reject(set_aside)

        count = 0
        for block in sp.read_blocks(path):
            pending.append(block)
            count += len(block.records)
            if count >= DECODE_CHUNK:
                decode(pending)
                pending, count = [], 0
        if pending:
            decode(pending)
        cut = sp.read_recovery(path)
        if cut is not None:
            stats["spool_tail_cut_bytes"] = cut["cut_bytes"]
            rejects += 1
            if writer is not None:
                writer.reject(
                    pa.table(
                        {
                            "offset": pa.array([cut["kept_bytes"]], pa.int64()),
                            "reason": ["truncated spool tail"],
                            "detail": [
                                f"{cut['cut_bytes']} bytes of a receive batch torn by a crash were cut at restart"
                            ],
                        }
                    )
                )
        stats["datagrams"] = datagrams
        if bad.kept:
            stats["decoder_errors"] = bad.kept
            # kept before the commit: a kill in between redoes the segment, and writes this file again
            if writer is not None:
                try:
                    bad.save()
                except (OSError, UsageError) as exc:
                    raise SpoolNotWritable(
                        f"cannot keep the datagrams the decoder failed on in {FAILED_DIR}/{path.name} ({exc}); the "
                        "segment stays in the spool until there is room"
                    ) from exc
        if writer is not None:
            result = writer.commit(stats)
            if lake.version("vm_leases") != leases_version:
                # `ingest vm` changed the leases while this segment was decoded, and its re-attribution of the
                # day may have read the day's files before this commit: attribute what landed with the new ones
                from tracepipe.correlate.attribution import attribute_flows

                days = {f.split("/")[1].removeprefix("date=") for f in result.files if f.startswith("flows/")}
                attribute_flows(lake, days)
    return SegmentResult(path.name, content_hash, datagrams, flows, rejects, skipped, stats)


DAY_US = 86_400_000_000


def near_days(flows: Any, arrival_us: np.ndarray, far: set[int], limit: int) -> tuple[Any, Any]:
    """(flows kept, rejects) of a decoded chunk of a collector segment. A flow may start up to MAX_FLOW_DURATION
    and a day before its datagram arrived, and up to a day after (an exporter's clock ahead): those days are
    near, and a segment lands flows on any of them. Flow times are the exporter's to set, and each day a flow
    falls on is a file of its own: a sender dating each of 3,000 one-flow datagrams on another day made one
    segment 3,000 files (its commit 22 s instead of well under one, every later query listing them; session-23
    review). Beyond the near days a segment keeps `limit` days (`far`, updated: those first taken, then the
    chunk's days of the most flows; an exporter whose clock is off by weeks still lands), and rejects the flows
    of any other day, one reject per day and exporter (`limit far_days_per_segment`, how many flows and when).
    What arrives on time always lands, however many far days a sender makes up."""
    import pyarrow as pa

    from tracepipe.limits import MAX_FLOW_DURATION

    empty = pa.table({"reason": pa.array([], pa.string())})
    if flows.num_rows == 0 or len(arrival_us) == 0:
        return flows, empty
    day = flows.column("ts_start").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy() // DAY_US
    back = MAX_FLOW_DURATION // dt.timedelta(days=1) + 1
    low = int(arrival_us.min()) // DAY_US - back
    high = int(arrival_us.max()) // DAY_US + 1
    outside = (day < low) | (day > high)
    if not outside.any():
        return flows, empty
    days, counts = np.unique(day[outside], return_counts=True)
    for at in np.lexsort((days, -counts)):  # (a few distinct days: one step each, not one per flow)
        if len(far) >= limit:
            break
        far.add(int(days[at]))
    refused = outside & ~np.isin(day, np.fromiter(far, np.int64, len(far)))
    if not refused.any():
        return flows, empty
    gone = pa.table(
        {
            "day": pa.array(day[refused]),
            "exporter": flows.column("exporter").filter(pa.array(refused)).cast(pa.string()),
        }
    )
    groups = gone.group_by(["day", "exporter"]).aggregate([([], "count_all")]).sort_by("day")
    details = [
        f"{n} flow{'' if n == 1 else 's'} dated {dt.date(1970, 1, 1) + dt.timedelta(days=d)}, outside the days their datagrams "
        f"arrived ({dt.date(1970, 1, 1) + dt.timedelta(days=low)} .. "
        f"{dt.date(1970, 1, 1) + dt.timedelta(days=high)}), and the segment already lands flows on {limit} "
        "other days"
        for d, n in zip(groups.column("day").to_pylist(), groups.column("count_all").to_pylist(), strict=True)
    ]
    rejects = pa.table(
        {
            "exporter": groups.column("exporter"),
            "reason": pa.array(["limit far_days_per_segment"] * groups.num_rows, pa.string()),
            "detail": pa.array(details, pa.string()),
        }
    )
    return flows.filter(pa.array(~refused)), rejects


def _finish_segment(path: Path, keep: bool) -> None:
    sidecar = path.with_name(path.name + sp.RECOVERY_SUFFIX)
    if keep:
        done = sp.own_dir(path.parent / sp.DONE_DIR)
        fsutil.move_durably(path, done / path.name)
        if sidecar.exists():
            fsutil.move_durably(sidecar, done / sidecar.name)
    else:
        path.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        fsutil.fsync_dir(path.parent)


class SpoolNotWritable(Exception):
    """The spool took no write after a commit (disk full, read-only): the decoder state, the serial or the
    segment's removal waits. Nothing is lost: the segment stays in the spool and the next pass, once there is
    room, decodes it again (skipped in the lake by its hash), saves the state and removes it."""


def write_committer_stats(spool: Path, totals: dict[str, Any]) -> None:
    """committer.json for the status line. Monitoring only: a write that fails (disk full) is logged and
    otherwise ignored, never a reason to stop committing."""
    try:
        sp.write_json_atomic(spool / COMMITTER_STATS, totals, durable=False)
    except (OSError, UsageError) as exc:
        log.warning("cannot write %s (%s); the status line lags", COMMITTER_STATS, exc)


def commit_pending(
    lake: Any,
    spool: Path,
    keep: bool,
    totals: dict[str, Any] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> int:
    """Commit every closed segment of `spool`, oldest first, persisting the decoder state after each.
    Returns the number of segments handled. Used by the committer process and by tests. Raises LakeError when
    the lake refuses, SpoolNotWritable when the spool does (both: retry later, nothing is lost)."""
    state, after = _load_state(spool, limits)
    handled = 0
    for path in sp.closed_segments(spool):
        try:
            if after == path.name:  # committed and state saved; killed before it was marked done
                _finish_segment(path, keep)
                handled += 1
                continue
        except OSError as exc:
            raise SpoolNotWritable(f"cannot remove the committed {path.name}: {exc}") from exc
        started = time.monotonic()
        try:
            try:
                result = commit_segment(lake, path, state)
            except LakeError:
                raise
            except Exception:  # a decoder bug: decode again from the saved state, setting aside what raises
                log.exception(
                    "the decoder failed on %s; decoding it again piece by piece, the datagrams it fails on go "
                    "to %s/",
                    path.name,
                    FAILED_DIR,
                )
                state, after = _load_state(spool, limits)
                result = commit_segment(lake, path, state, isolate=True)
        except (LakeError, SpoolNotWritable):
            raise
        except Exception:  # a bug outside the decoder must not block the spool: the segment aside, keep going
            log.exception(
                "cannot decode %s; moved to %s/ for a bug report, continuing", path.name, FAILED_DIR
            )
            try:
                sp.own_dir(spool / FAILED_DIR)
                fsutil.move_durably(path, spool / FAILED_DIR / path.name)
            except OSError as exc:
                raise SpoolNotWritable(f"cannot move {path.name} to {FAILED_DIR}/: {exc}") from exc
            state, after = _load_state(spool, limits)
            continue
        try:
            _save_state(spool, state, path.name, limits)
            after = path.name
            _finish_segment(path, keep)
        except OSError as exc:
            raise SpoolNotWritable(
                f"{path.name} is in the lake, but the decoder state cannot be saved after it ({exc}); it stays "
                "in the spool until there is room"
            ) from exc
        handled += 1
        log.info(
            "committed %s: %d datagrams, %d flows, %d rejects%s in %.1f s",
            path.name,
            result.datagrams,
            result.flows,
            result.rejects,
            " (already in the lake)" if result.skipped else "",
            time.monotonic() - started,
        )
        if result.stats.get("decoder_errors"):
            log.warning(
                '%s: %d datagrams the decoder failed on set aside in %s/%s (rejects "decoder error"), the rest '
                "landed",
                path.name,
                result.stats["decoder_errors"],
                FAILED_DIR,
                path.name,
            )
        if totals is not None:
            totals["segments"] = totals.get("segments", 0) + 1
            totals["datagrams"] = totals.get("datagrams", 0) + result.datagrams
            totals["flows"] = totals.get("flows", 0) + result.flows
            totals["rejects"] = totals.get("rejects", 0) + result.rejects
            merge_exporter_totals(totals.setdefault("exporters", {}), result.stats["exporters"], limits)
            totals["decoder"] = decoder_summary(state)
            totals["last_segment"] = path.name
            totals["last_commit_at"] = time.time()
            write_committer_stats(spool, totals)
    return handled


def merge_exporter_totals(
    total: dict[str, dict[str, Any]], part: dict[str, dict[str, Any]], limits: Limits = DEFAULT_LIMITS
) -> None:
    """netflow.merge_exporter_totals, imported when first needed (the receive loop never loads the decoder)."""
    from tracepipe.ingest.netflow import merge_exporter_totals as merge

    merge(total, part, limits)


def decoder_summary(state: Any) -> dict[str, Any]:
    """What the decoder state holds and which of its limits were hit (collector status, `committer`)."""
    return {
        "exporters": len(state.exporters),
        "templates": len(state.templates),
        "template_fields": state.fields_total,
        "pending_flowsets": state.pending_count,
        "limits_hit": dict(state.limits_hit),
    }


def open_lock_file(path: Path) -> int:
    """A descriptor of the lock file `path`, created if missing and never truncated. A symlink or FIFO planted
    under its name (whoever writes the lake can) is removed and a file made in its place: opened with mode "w",
    a symlink to any file made us truncate that file (as root, any file of the host)."""
    try:
        return fsutil.open_regular(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EINVAL):  # ELOOP: a symlink; EINVAL: not a regular file
            raise
    log.warning("%s was not a regular file (planted?); replacing it", path)
    path.unlink()
    return fsutil.open_regular(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl: nobody would stop us
        os._exit(0)


def _lower_priority(increment: int) -> None:
    """Nice every thread of this process by `increment`: on a busy host the receive loop wins the CPU (a late
    commit loses nothing, a late recv can). Linux nices threads one by one, and the pools that numpy, Arrow and
    polars start at import would otherwise stay at the collector's priority and compete with its receive loop."""
    with contextlib.suppress(OSError):
        niceness = os.nice(increment)
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(task), niceness)


def committer_main(
    spool: str, lake_root: str, keep: bool, parent: int, level: int, limits: Limits = DEFAULT_LIMITS
) -> int:
    """The committer process (`python -m tracepipe.collector SPOOL LAKE KEEP PARENT LEVEL [LIMITS-JSON]`):
    commit closed segments until its stdin reaches end-of-file (the collector asks it to finish) and none is
    left. Returns the exit code: 0, or 4 when the lake refused the last commits."""
    from tracepipe.lake import Lake

    _die_with_parent(parent)
    _lower_priority(COMMITTER_NICE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the collector decides when we stop (drain first)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=level, format="%(asctime)s tracepipe collect: %(message)s")
    spool_dir = Path(spool)
    lock = open_lock_file(spool_dir / COMMIT_LOCK_FILE)  # held (locked) for the life of the process
    fcntl.flock(lock, fcntl.LOCK_EX)  # a committer of a killed collector may still be finishing
    lake = Lake(lake_root)
    totals: dict[str, Any] = {"started_at": time.time()}
    write_committer_stats(spool_dir, totals)
    stdin = sys.stdin.fileno()
    finishing = False

    def wait(seconds: float) -> bool:
        """Sleep up to `seconds`; True once the collector closed our stdin (finish what is spooled, then exit)."""
        if select.select([stdin], [], [], seconds)[0]:
            return not os.read(stdin, 4096)  # end-of-file
        return False

    while True:
        finishing = finishing or wait(0)
        try:
            commit_pending(lake, spool_dir, keep, totals, limits)
        except (LakeError, SpoolNotWritable) as exc:
            where = "the lake" if isinstance(exc, LakeError) else "the spool"
            log.error("cannot write %s, datagrams stay in the spool, retrying in 10 s: %s", where, exc)
            if finishing:
                return EXIT_FAILED
            finishing = wait(10)
            continue
        if finishing:
            return 0
        finishing = wait(0.5)


# ---- the collector (receive loop) -----------------------------------------------------------------------------


# senders are counted by name in the receive loop's statistics up to limits.exporters; the others under one key
# (not an address: 17 bytes)
OTHER_SENDERS = b"other senders...."


@dataclass
class ReceiveStats:
    datagrams: int = 0
    bytes: int = 0
    per_exporter: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # sender outside --allow -> datagrams
    spool_errors: int = 0  # datagrams dropped because the spool could not be written (disk full)
    reserve_drops: int = (
        0  # datagrams dropped because the spool's filesystem was down to its free-space reserve
    )
    senders_named: int = DEFAULT_LIMITS.exporters  # --limit exporters
    _raw: dict[bytes, int] = field(default_factory=dict)
    _raw_dropped: dict[bytes, int] = field(default_factory=dict)

    def count(self, addr16: np.ndarray, target: dict[bytes, int]) -> None:
        """Count datagrams per sender: at most `senders_named` (limits.exporters) by name, the others together
        (a flood from 100,000 addresses, an IPv6 /64's worth, grew these counters, the status lines and the
        stats file without bound)."""
        if len(addr16) == 0:
            return
        first = addr16[0].tobytes()
        if (addr16 == addr16[0]).all():  # the common case: a batch from one exporter
            key = first if first in target or len(target) < self.senders_named else OTHER_SENDERS
            target[key] = target.get(key, 0) + len(addr16)
            return
        uniques, counts = np.unique(np.ascontiguousarray(addr16).view("V16").reshape(-1), return_counts=True)
        for raw, n in zip(uniques, counts.tolist(), strict=True):
            key = bytes(raw)
            key = key if key in target or len(target) < self.senders_named else OTHER_SENDERS
            target[key] = target.get(key, 0) + n

    def named(self) -> None:
        """Turn the raw 16-byte keys into address text (status time only)."""
        for raw, target in ((self._raw, self.per_exporter), (self._raw_dropped, self.dropped)):
            keys = [k for k in raw if k != OTHER_SENDERS]
            texts = sp.addresses_text(np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16)) if keys else []
            target.clear()
            target.update({t: raw[k] for k, t in zip(keys, texts, strict=True)})
            if OTHER_SENDERS in raw:
                target[OTHERS_TEXT] = raw[OTHER_SENDERS]


class Collector:
    """The receive loop plus rotation, status and the committer process; `run()` until SIGTERM/SIGINT."""

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self.spool = config.spool_dir
        self.allow = AllowList(config.allow)
        self.stop_requested = 0
        self.sockets: list[socket.socket] = []
        self.granted: list[int] = []
        self.receivers: list[BatchReceiver] = []
        self.stats = ReceiveStats(senders_named=config.limits.exporters)
        self.writer: sp.SegmentWriter | None = None
        self.serial = 0
        self.committer: subprocess.Popen | None = None
        self.started = time.time()
        self._lock_handle: Any = None
        self._last_status: dict[str, float] = {}
        self._drops = 0
        self._listening: list[str] = []
        self._last_spool_error = 0.0
        self._reserve_rotated_at = 0.0  # (monotonic) the last segment handed over at the spool's reserve
        self._short_of_room = False  # datagrams were dropped at the spool's reserve, and none spooled since
        self._room = 0  # bytes the loop may still spool before it looks at statvfs again
        self._next_room_check = 0.0
        self._committer_started = 0.0
        self._committer_backoff = 0.5  # doubled at the first exit: 1 s
        self._committer_restart_at: float | None = None
        self._next_warning: dict[str, float] = {}  # what -> when it may be logged again
        self._to_close: queue.Queue[sp.SegmentWriter | None] = queue.Queue()  # rotated, for the sync thread

    # -- setup --
    def _lock_spool(self) -> None:
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
            handle = open_lock_file(self.spool / LOCK_FILE)  # held (locked) while running
        except OSError as exc:
            raise LakeError(
                f"cannot create the spool {self.spool}: {exc.strerror}; check --spool / --lake"
            ) from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise EnvironmentProblem(
                f"another tracepipe collect is using the spool {self.spool}; give this one its own --spool"
            ) from exc
        self._lock_handle = handle

    def _bind_lake(self) -> None:
        """Refuse to commit into this --lake the segments spooled for another one. The spool names its lake
        (sp.LAKE_FILE); a restart with another --lake and the same --spool while segments wait would have
        committed them (another site's, another test lake's flows) into the new lake. A spool under the lake
        (the default LAKE/_spool) moves with it and is always its own."""
        lake = self.config.lake.resolve()
        spool = self.spool.resolve()
        saved, _why = sp.read_json_object(self.spool / sp.LAKE_FILE, sp.SIDECAR_BYTES)
        named = saved.get("lake") if saved is not None else None
        if isinstance(named, str) and named != str(lake) and not spool.is_relative_to(lake):
            waiting = len(sp.open_segments(self.spool)) + len(sp.closed_segments(self.spool))
            if waiting:
                raise EnvironmentProblem(
                    f"the spool {self.spool} holds {waiting} segment(s) spooled for the lake {named}, not yet "
                    f"committed: run `tracepipe collect --lake {named} --spool {self.spool}` until they are, or "
                    f"give the lake {self.config.lake} its own --spool (if {named} was moved to "
                    f"{self.config.lake}, remove {self.spool / sp.LAKE_FILE})"
                )
        if named != str(lake):
            sp.write_json_atomic(self.spool / sp.LAKE_FILE, {"lake": str(lake)})

    def _recover(self) -> None:
        for path in sp.open_segments(self.spool):
            try:
                recovered = sp.recover_open(path)
            except OSError as exc:  # swapped for a FIFO or symlink since it was listed: not ours
                log.warning("spool: ignoring %s: %s", path, exc.strerror)
                continue
            log.warning(
                "recovered %s after an unclean stop: %d datagrams kept%s",
                path.name,
                recovered.datagrams,
                f", {recovered.cut_bytes} bytes of a torn last batch cut" if recovered.cut_bytes else "",
            )
        backlog = sp.closed_segments(self.spool)
        if backlog:
            log.info("%d spooled segment(s) from an earlier run will be committed first", len(backlog))

    def _open_sockets(self) -> None:
        limit = rmem_max()
        for spec in self.config.listen:
            sock, granted = open_socket(spec, self.config.rcvbuf, self.config.reuseport)
            self.sockets.append(sock)
            self.granted.append(granted)
            self.receivers.append(BatchReceiver(sock))
            bound = ListenSpec(spec.family, spec.host, sock.getsockname()[1])
            log.info("listening on %s (receive buffer %d bytes)", bound, granted)
            if granted < self.config.rcvbuf:
                log.warning(
                    "the kernel capped the receive buffer of %s at %d bytes (asked %d; net.core.rmem_max="
                    "%s): bursts may be dropped. Run as root/CAP_NET_ADMIN or raise it: sysctl -w "
                    "net.core.rmem_max=%d",
                    bound,
                    granted,
                    self.config.rcvbuf,
                    limit,
                    self.config.rcvbuf,
                )
        if self.allow.accepts_all:
            log.warning(
                "accepting datagrams from any sender: NetFlow is unauthenticated UDP, so anyone who can "
                "reach these ports can plant flows; restrict with --allow CIDR"
            )

    def _start_committer(self) -> None:
        """A separate process (`python -m tracepipe.collector`): decoding never competes with the receive loop
        for the GIL, and it imports only what it needs. Closing its stdin asks it to finish."""
        cmd = [
            sys.executable,
            "-m",
            "tracepipe.collector",
            str(self.spool),
            str(self.config.lake),
            "1" if self.config.keep_segments else "0",
            str(os.getpid()),
            str(log.getEffectiveLevel()),
            json.dumps(self.config.limits.to_dict()),
        ]
        self.committer = subprocess.Popen(cmd, stdin=subprocess.PIPE, close_fds=True)
        self._committer_started = time.monotonic()

    def _watch_committer(self) -> None:
        """Restart the committer when it exited, after a pause that doubles while it keeps exiting (a spool it
        cannot write, a lake it cannot open: 50 restarts in 40 s, each importing pyarrow, helped nobody)."""
        assert self.committer is not None
        if self.committer.poll() is None:
            return
        now = time.monotonic()
        if self._committer_restart_at is None:
            if now - self._committer_started >= COMMITTER_BACKOFF_MAX_S:
                self._committer_backoff = 1.0
            else:
                self._committer_backoff = min(COMMITTER_BACKOFF_MAX_S, self._committer_backoff * 2)
            self._committer_restart_at = now + self._committer_backoff
            log.error(
                "the committer exited (code %s); restarting it in %.0f s",
                self.committer.returncode,
                self._committer_backoff,
            )
        elif now >= self._committer_restart_at:
            self._committer_restart_at = None
            self._start_committer()

    def _new_segment(self) -> None:
        # the directory scan once at start; afterwards only this process creates segments
        serial = (
            self.serial + 1
            if self.serial
            else sp.next_serial(self.spool, self.config.limits.decoder_state_bytes)
        )
        while True:
            if serial > sp.MAX_SERIAL:
                raise EnvironmentProblem(
                    f"the spool {self.spool} holds a segment numbered {serial - 1}, the last one a name can "
                    "hold; move its segments (and done/, failed/) away once they are committed"
                )
            try:
                self.writer = sp.SegmentWriter(self.spool, serial)
                break
            except FileExistsError:  # planted under the next name (a symlink would have been followed)
                log.warning(
                    "spool: %s exists already and was not written by this collector; skipping it",
                    self.spool / f"seg-{serial:09d}{sp.OPEN_SUFFIX}",
                )
                serial += 1
            except FileNotFoundError:
                # the spool folder was removed while the collector ran (an operator's cleanup): made again, so
                # that what arrives from now on is kept; the segments it held are gone with it (it stopped with
                # "internal error", and nothing landed until a restart: failure-injection review, session 38)
                if self.spool.exists():
                    raise
                log.error(
                    "spool: %s was removed while running; making it again (its segments are lost)", self.spool
                )
                self.spool.mkdir(parents=True, exist_ok=True)
        self.serial = serial

    def rotate(self) -> None:
        """Start a new segment; the full one is closed (fsync, rename) by the spool-sync thread, so that the
        receive loop never waits for a disk flush (seconds for a large segment on a busy disk)."""
        if self.writer is not None and self.writer.datagrams:
            full = self.writer
            self._new_segment()
            self._to_close.put(full)

    def _close_segment(self, writer: sp.SegmentWriter) -> None:
        try:
            closed = writer.close()
        except OSError as exc:  # left `.open`: the next start recovers and commits it
            log.error(
                "cannot close the spool segment %s (%s); it is recovered at the next start", writer.path, exc
            )
            return
        log.debug("closed %s", closed)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requested += 1
        if self.stop_requested == 1:
            log.info("%s: stopping; rotating and committing what is spooled", signal.Signals(signum).name)

    # -- loop --
    def _receive_ready(self, receiver: BatchReceiver) -> int:
        """Drain one socket (up to 16 batches, then rotation and status get their turn), appending each batch to
        the spool. Returns datagrams."""
        total = 0
        for _ in range(16):
            count, addr16, ports, payloads = receiver.receive()
            if count == 0:
                break
            arrival = time.time_ns() // 1000
            allowed = self.allow.allowed(addr16)
            if not allowed.all():
                self.stats.count(addr16[~allowed], self.stats._raw_dropped)
                addr16, ports, payloads = addr16[allowed], ports[allowed], payloads[allowed]
            kept = len(payloads)
            if kept:
                records = block_records(arrival, receiver.family, addr16, ports, payloads[:, 1])
                payload_bytes = int(payloads[:, 1].sum())
                head = sp.block_head(records, payload_bytes)
                assert self.writer is not None
                if not self._spool_has_room(len(head) + payload_bytes):
                    # the open segment is handed to the committer at once, whatever --rotate says: its commit
                    # frees the spool (a spool smaller than one rotation's traffic dropped every datagram until
                    # the next rotation, the lake having room: review, session 35)
                    # (at most once a second: a trickle on a disk that stays full must not become a segment, and a
                    # commit, per datagram)
                    if time.monotonic() - self._reserve_rotated_at >= 1.0:
                        self._reserve_rotated_at = time.monotonic()
                        self.rotate()
                    self._short_of_room = True
                    self.stats.reserve_drops += kept
                    self._warn_every(
                        "reserve",
                        10,
                        "the spool's filesystem is down to its free-space reserve (%d bytes): datagrams are "
                        "being dropped (%d so far) until the committer frees segments or there is room",
                        self._reserve(),
                        self.stats.reserve_drops,
                    )
                    total += count
                    continue
                try:
                    self.writer.append_gather(head, payloads, kept)
                except OSError as exc:  # spool disk full: drop this batch, keep receiving, say so
                    self.stats.spool_errors += kept
                    if time.monotonic() - self._last_spool_error > 10:
                        self._last_spool_error = time.monotonic()
                        log.error(
                            "cannot write the spool %s (%s): datagrams are being dropped (%d so far); "
                            "free space there",
                            self.spool,
                            exc.strerror,
                            self.stats.spool_errors,
                        )
                    total += count
                    continue
                if self._short_of_room:  # (the drops above said so; now that it is over, say that too)
                    self._short_of_room = False
                    log.warning(
                        "the spool has room again: datagrams are spooled again (%d were dropped so far)",
                        self.stats.reserve_drops,
                    )
                self.stats.count(addr16, self.stats._raw)
                self.stats.datagrams += kept
                self.stats.bytes += len(head) + payload_bytes
            total += count
            if count < receiver.batch:
                break
        return total

    def _reserve(self, fs: os.statvfs_result | None = None) -> int:
        """Bytes the receive loop leaves free on the spool's filesystem (see SPOOL_RESERVE_BYTES)."""
        if self.config.spool_reserve is not None:
            base = self.config.spool_reserve
        else:
            with contextlib.suppress(OSError):
                fs = fs or os.statvfs(self.spool)
            size = fs.f_blocks * fs.f_frsize if fs is not None else 0
            base = min(SPOOL_RESERVE_BYTES, size // SPOOL_RESERVE_SHARE)
        try:
            state = os.lstat(self.spool / sp.STATE_FILE).st_size
        except OSError:
            state = 0
        return base + 2 * state

    def _spool_has_room(self, size: int) -> bool:
        """Whether `size` more bytes leave the reserve free; statvfs once a second, or sooner when the room
        seen last is used up (then once per batch while the disk stays full)."""
        now = time.monotonic()
        if self._room < size or now >= self._next_room_check:
            try:
                fs = os.statvfs(self.spool)
            except OSError:
                return True  # cannot tell: the write will say
            self._room = fs.f_bavail * fs.f_frsize - self._reserve(fs)
            self._next_room_check = now + ROOM_CHECK_S
        if self._room < size:
            return False
        self._room -= size
        return True

    def _warn_every(
        self, what: str, seconds: float, message: str, *args: Any, exc_info: bool = False
    ) -> None:
        """log.warning, at most once per `seconds` for `what`."""
        now = time.monotonic()
        if now >= self._next_warning.get(what, 0.0):
            self._next_warning[what] = now + seconds
            log.warning(message, *args, exc_info=exc_info)

    def _sync_loop(self) -> None:
        """The spool-sync thread: close rotated segments as they come, fdatasync the open one every second.
        Ends at the None that `run` queues when it stops, after closing every segment queued before it."""
        next_sync = time.monotonic() + SYNC_INTERVAL_S
        while True:
            try:
                full = self._to_close.get(timeout=max(0.0, next_sync - time.monotonic()))
            except queue.Empty:
                writer = self.writer
                if writer is not None:
                    writer.sync()
                next_sync = time.monotonic() + SYNC_INTERVAL_S
                continue
            if full is None:
                return
            self._close_segment(full)

    def status(self, final: bool = False) -> dict[str, Any]:
        now = time.time()
        self.stats.named()
        committer = self._committer_stats()
        open_sockets = [s for s in self.sockets if s.fileno() >= 0]
        if open_sockets:  # after the final drain the sockets are closed: keep the last figures
            self._drops = sum(kernel_drops(open_sockets).values())
            self._listening = [str(ListenSpec(s.family, *s.getsockname()[:2])) for s in open_sockets]
        decoder = committer.get("exporters", {})
        gaps = sum(_count(s.get("sequence_gaps")) for s in decoder.values() if isinstance(s, dict))
        backlog = sp.segments(self.spool, sp.CLOSED_SUFFIX)  # sizes from the listing: a commit may delete one
        backlog_bytes = sum(size for _path, size in backlog)
        last = self._last_status or {"t": self.started, "datagrams": 0, "flows": 0}
        elapsed = max(now - last["t"], 1e-9)
        flows = _count(committer.get("flows"))
        # (a committer started since counts from 0: the first status read the last run's count as its baseline,
        # -4986 flows/s after every restart)
        flows_since = flows - last["flows"] if flows >= last["flows"] else flows
        # how long the oldest closed segment has waited for the committer: a monitor's sign of one stuck or
        # behind (the backlog's size alone does not tell a committer busy with one big segment from a dead one)
        oldest = 0.0
        if backlog:
            with contextlib.suppress(OSError):
                oldest = max(0.0, now - backlog[0][0].stat().st_mtime)
        report = {
            "time": now,
            "uptime_s": round(now - self.started, 3),
            "listen": self._listening,
            "rcvbuf_bytes": self.granted,
            "spool": str(self.spool),
            "datagrams": self.stats.datagrams,
            "datagrams_per_s": round((self.stats.datagrams - last["datagrams"]) / elapsed, 1),
            "flows_committed": flows,
            "flows_per_s": round(flows_since / elapsed, 1),
            "exporters": dict(self.stats.per_exporter),
            "sequence_gaps": gaps,
            "kernel_drops": self._drops,
            "dropped_senders": dict(self.stats.dropped),
            "spool_write_errors": self.stats.spool_errors,
            "spool_reserve_drops": self.stats.reserve_drops,
            "spool_backlog_segments": len(backlog),
            "spool_backlog_bytes": backlog_bytes,
            "spool_backlog_oldest_s": round(oldest, 1),
            "open_segment_bytes": self.writer.bytes if self.writer else 0,
            "committer": committer,
            "stopping": bool(self.stop_requested),
            "final": final,
        }
        self._last_status = {"t": now, "datagrams": self.stats.datagrams, "flows": flows}
        if self.config.stats_file is not None:
            try:
                sp.write_json_atomic(self.config.stats_file, report, durable=False)
            except (OSError, UsageError) as exc:
                self._warn_every("stats", 60, "cannot write --stats-file %s: %s", self.config.stats_file, exc)
        return report

    def _committer_stats(self) -> dict[str, Any]:
        """committer.json, or {} when it is missing or not what the committer writes (planted, damaged: a
        warning once a minute). The status line must never fail on it."""
        saved, problem = sp.read_json_object(self.spool / COMMITTER_STATS, COMMITTER_STATS_BYTES)
        if saved is not None:
            exporters = saved.get("exporters", {})
            if type(saved.get("flows", 0)) is not int or not isinstance(exporters, dict):
                saved, problem = None, "its flows or exporters are not what the committer writes"
        if saved is None:
            if problem:
                self._warn_every(
                    "committer.json", 60, "%s not used: %s", self.spool / COMMITTER_STATS, problem
                )
            return {}
        return saved

    def _status_now(self, final: bool = False, log_it: bool = False) -> None:
        """status() (and its line) from the receive loop: a failure is logged, never raised into the loop."""
        try:
            report = self.status(final)
            if log_it:
                self.log_status(report)
        except Exception:
            self._warn_every("status", 60, "status failed (the loop goes on):", exc_info=True)

    def log_status(self, report: dict[str, Any]) -> None:
        dropped = ", ".join(f"{a}={n}" for a, n in sorted(report["dropped_senders"].items())) or "none"
        if report["spool_write_errors"]:
            dropped += f"; {report['spool_write_errors']} datagrams lost: spool not writable"
        if report["spool_reserve_drops"]:
            dropped += (
                f"; {report['spool_reserve_drops']} datagrams lost since the start: spool disk at its free-space "
                "reserve"
            )
        log.info(
            "%.0f datagrams/s, %.0f flows/s, %d exporters, %s sequence gaps, %d kernel drops, dropped "
            "senders: %s, spool backlog %d segments (%.1f MB, the oldest waiting %.0f s)",
            report["datagrams_per_s"],
            report["flows_per_s"],
            len(report["exporters"]),
            report["sequence_gaps"],
            report["kernel_drops"],
            dropped,
            report["spool_backlog_segments"],
            report["spool_backlog_bytes"] / 1e6,
            report["spool_backlog_oldest_s"],
        )

    def run(self) -> int:
        self._lock_spool()
        self._bind_lake()
        self._recover()
        self._open_sockets()
        self._new_segment()
        self._start_committer()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        syncer = threading.Thread(target=self._sync_loop, name="spool-sync", daemon=True)
        syncer.start()
        poller = select.poll()
        by_fd = {r.fd: r for r in self.receivers}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        # the pause after a small batch is shorter than the smallest granted buffer lasts at 1 M datagrams/s
        coalesce_s = min(self.config.coalesce_s, min(self.granted, default=0) / COALESCE_BYTES_PER_S)
        rotate_s = self.config.rotate_s
        next_rotate = math.floor(time.time() / rotate_s + 1) * rotate_s  # on the clock, like nfcapd
        next_status = time.monotonic() + self.config.status_s
        self._status_now()  # the stats file exists (with the bound ports) as soon as we listen
        try:
            while not self.stop_requested:
                received = sum(self._receive_ready(by_fd[fd]) for fd, _event in poller.poll(200))
                if 0 < received < COALESCE_BELOW:
                    time.sleep(coalesce_s)  # let a batch build up: a wakeup costs as much as ~25 datagrams
                if time.time() >= next_rotate or (
                    self.writer and self.writer.bytes >= self.config.segment_bytes
                ):
                    self.rotate()
                    while next_rotate <= time.time():
                        next_rotate += rotate_s
                if time.monotonic() >= next_status:
                    self._status_now(log_it=True)
                    next_status = time.monotonic() + self.config.status_s
                self._watch_committer()
            # stop: take what the kernel already holds, then close the segment and let the committer drain
            for receiver in self.receivers:
                while self._receive_ready(receiver):
                    pass
            self._status_now()  # kernel drop counters, read while the sockets are still open
            for sock in self.sockets:
                sock.close()
            self._to_close.put(None)
            syncer.join()  # every rotated segment is closed
            assert self.writer is not None
            self._close_segment(self.writer)
            self.writer = None
            if self.committer.poll() is not None:  # exited, waiting for its restart: one more try, to drain
                self._start_committer()
            self.committer.stdin.close()  # finish what is spooled, then exit
            while self.committer.poll() is None and self.stop_requested < 2:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.committer.wait(0.2)
            if self.committer.poll() is None:
                log.warning(
                    "second signal: not waiting for the committer; %d segment(s) stay spooled and are "
                    "committed at the next start",
                    len(sp.closed_segments(self.spool)),
                )
                self.committer.kill()
                self.committer.wait()
            self._status_now(final=True, log_it=True)
            if self.stop_requested >= 2 and self.committer.returncode != 0:
                return EXIT_PARTIAL  # stopped before everything was committed; the spool keeps the rest
            return EXIT_OK if self.committer.returncode == 0 else EXIT_FAILED
        finally:
            if syncer.is_alive():
                self._to_close.put(None)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for sock in self.sockets:
                sock.close()
            if self.committer is not None and self.committer.poll() is None:
                self.committer.kill()
                self.committer.wait()


def _count(value: Any) -> int:
    """A counter read from committer.json: a non-negative int, else 0."""
    return value if type(value) is int and value >= 0 else 0


def run_collector(config: CollectorConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code: 0 clean stop, everything committed; 3 a second signal
    stopped it before the committer finished (the rest stays spooled for the next start); 4 the lake refused."""
    return Collector(config).run()


if __name__ == "__main__":
    _spool, _lake, _keep, _parent, _level = sys.argv[1:6]
    _limits = Limits.from_dict(json.loads(sys.argv[6])) if len(sys.argv) > 6 else DEFAULT_LIMITS
    sys.exit(committer_main(_spool, _lake, _keep == "1", int(_parent), int(_level), _limits))
