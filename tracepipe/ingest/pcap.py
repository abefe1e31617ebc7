"""pcap / pcapng capture files -> batches of UDP datagrams (exporter address, capture time, payload, offset).

Streams the file in chunks, so memory stays flat however large the capture. Link types: Ethernet (with VLAN
tags), Linux cooked SLL and SLL2 (`tcpdump -i any`), raw IP (DLT_RAW 12/14/101), BSD loopback/null. IPv4 and
IPv6 (extension headers skipped). Whatever is not a complete UDP datagram (truncated record, fragment, not UDP,
unknown link type) becomes a reject with its byte offset; a cut-off file yields everything before the cut.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, overload

import numpy as np
import pyarrow as pa

from tracepipe.limits import DEFAULT as DEFAULT_LIMITS
from tracepipe.limits import Limits
from tracepipe.schema import REJECTS

CHUNK = 8 << 20  # bytes read at a time
BATCH_BYTES = 24 << 20  # a batch is also cut when its payloads reach this many bytes
HEAD_BYTES = 24  # bytes of each payload's start copied into UdpBatch.heads (netflow._FastHeads reads them)
_NO_HEAD = bytes(HEAD_BYTES)
PCAPNG_BLOCK_OVERHEAD = 4096  # a pcapng block may hold this much beside its packet (headers, options)

PCAP_MAGIC = {  # magic as read little-endian -> (struct byte order, ticks per µs divisor is ns?)
    0xA1B2C3D4: ("<", False),
    0xD4C3B2A1: (">", False),
    0xA1B23C4D: ("<", True),
    0x4D3CB2A1: (">", True),
}
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER = 0x1A2B3C4D

# link types (www.tcpdump.org/linktypes.html)
LINK_NULL, LINK_ETHERNET, LINK_RAW, LINK_RAW_BSD, LINK_RAW_OPENBSD = 0, 1, 101, 12, 14
LINK_LOOP, LINK_SLL, LINK_SLL2 = 108, 113, 276
IPV6_EXTENSION_HEADERS = {0, 43, 60, 135, 139, 140, 253, 254}
IPV6_FRAGMENT, IPV6_AUTH = 44, 51
UDP = 17


class Payloads(Sequence):
    """A batch's UDP payloads: views of the capture's read buffers, each made only when asked for. The walker's
    fast path reads none of them (headers from UdpBatch.heads, records from the file: netflow.InFile), which
    saves a slice object per datagram (profiled for issue 17)."""

    def __init__(self, buffers: list[bytes], which: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        self._views = [memoryview(b) for b in buffers]
        self._which, self._starts, self._ends = which.tolist(), starts.tolist(), ends.tolist()
        self.sizes = ends - starts  # int64, one per payload

    def __len__(self) -> int:
        return len(self._starts)

    def subset(self, rows: np.ndarray) -> Payloads:
        """The payloads at positions `rows` (views of the same buffers)."""
        out = Payloads.__new__(Payloads)
        out._views = self._views
        out._which, out._starts, out._ends = (
            [v[i] for i in rows.tolist()] for v in (self._which, self._starts, self._ends)
        )
        out.sizes = self.sizes[rows]
        return out

    @overload
    def __getitem__(self, i: int) -> memoryview: ...

    @overload
    def __getitem__(self, i: slice) -> list[memoryview]: ...

    def __getitem__(self, i: int | slice) -> memoryview | list[memoryview]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._views[self._which[i]][self._starts[i] : self._ends[i]]


@dataclass
class UdpBatch:
    payloads: Sequence[bytes | memoryview]
    exporters: list[str]  # source address of the datagram, canonical text
    ts_us: np.ndarray  # int64 capture time, µs since the epoch
    offsets: np.ndarray  # int64 byte offset of the packet record in the file
    dst_ports: np.ndarray  # int32
    rejects: pa.Table  # offset, reason, detail (schema.REJECTS columns)
    bytes_read: int = 0  # how far into the file this batch reaches (for progress bars)
    # int64 byte offset in the file of each payload's first byte: a decode worker reads record bytes from the
    # file itself (netflow.InFile) instead of receiving them through a pipe (issue 17)
    payload_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # the first HEAD_BYTES of each payload (zeros for a shorter one), one after another: the walker's fast path
    # reads them as columns (gathered here with numpy instead of one slice per datagram)
    heads: bytes = b""

    def subset(self, keep: np.ndarray) -> UdpBatch:
        """The datagrams where `keep` (a boolean mask) is true; the capture's rejects stay with the batch."""
        rows = np.flatnonzero(keep)
        heads = (
            np.frombuffer(self.heads, np.uint8).reshape(-1, HEAD_BYTES)[rows].tobytes() if self.heads else b""
        )
        payloads = (
            self.payloads.subset(rows)
            if isinstance(self.payloads, Payloads)
            else [self.payloads[i] for i in rows.tolist()]
        )
        return UdpBatch(
            payloads,
            [self.exporters[i] for i in rows.tolist()],
            self.ts_us[rows],
            self.offsets[rows],
            self.dst_ports[rows],
            self.rejects,
            self.bytes_read,
            self.payload_offsets[rows] if len(self.payload_offsets) else self.payload_offsets,
            heads,
        )


REJECT_SCHEMA = pa.schema([REJECTS.field("offset"), REJECTS.field("reason"), REJECTS.field("detail")])


@dataclass
class _Collector:
    buffers: list = field(default_factory=list)  # read buffers the payloads are in
    which: list = field(default_factory=list)  # per payload: its buffer's index (ints, int64 arrays)
    starts: list = field(default_factory=list)  # per payload: where it starts and ends in its buffer
    ends: list = field(default_factory=list)
    count: int = 0  # payloads
    exporters: list = field(default_factory=list)
    ts: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    ports: list = field(default_factory=list)
    rejects: list = field(default_factory=list)
    payload_offsets: list = field(default_factory=list)  # ints, and int64 arrays of the vectorised path
    heads: list = field(default_factory=list)  # bytes: HEAD_BYTES per payload
    nbytes: int = 0

    def flush(self, bytes_read: int) -> UdpBatch:
        if self.rejects:
            offs, reasons, details = zip(*self.rejects, strict=True)
            rejects = pa.table([list(offs), list(reasons), list(details)], schema=REJECT_SCHEMA)
        else:
            rejects = REJECT_SCHEMA.empty_table()
        batch = UdpBatch(
            Payloads(self.buffers, _int64s(self.which), _int64s(self.starts), _int64s(self.ends)),
            self.exporters,
            np.array(self.ts, dtype=np.int64),
            np.array(self.offsets, dtype=np.int64),
            np.array(self.ports, dtype=np.int32),
            rejects,
            bytes_read,
            _int64s(self.payload_offsets),
            b"".join(self.heads),
        )
        self.__init__()  # type: ignore[misc]
        return batch

    def buffer(self, buf: bytes) -> int:
        """The index of read buffer `buf` among this batch's."""
        if not self.buffers or self.buffers[-1] is not buf:
            self.buffers.append(buf)
        return len(self.buffers) - 1


def _int64s(items: list) -> np.ndarray:
    """ints and int64 arrays, in order, as one int64 array."""
    if not items:
        return np.zeros(0, np.int64)
    if all(isinstance(x, int) for x in items):
        return np.array(items, dtype=np.int64)
    return np.concatenate([np.asarray(x, np.int64).reshape(-1) for x in items])


def _heads(data: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> bytes:
    """The first HEAD_BYTES of each payload (starts, sizes: in `data`), zeros for one shorter than that."""
    index = np.minimum(starts[:, None] + np.arange(HEAD_BYTES), len(data) - 1)
    rows = data[index]
    rows[sizes < HEAD_BYTES] = 0
    return rows.tobytes()


class _Reader:
    """A forward-only window over a file: `need(n)` makes n bytes from `pos` available in `buf`."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.buf = b""
        self.pos = 0  # position in buf
        self.base = 0  # file offset of buf[0]
        self.eof = False

    def need(self, n: int) -> bool:
        if self.pos + n <= len(self.buf):
            return True
        if self.eof:
            return False
        # the unread rest (part of a record) is read again from the file with the next chunk, rather than
        # copied in front of it: `rest + chunk` copied every 8 MB chunk once more (profiled for issue 17)
        have = len(self.buf) - self.pos
        self.base += self.pos
        self.pos = 0
        self.handle.seek(self.base)
        self.buf = self.handle.read(max(CHUNK, n))
        if len(self.buf) <= have:
            self.eof = True
        return n <= len(self.buf)

    def skip(self, n: int) -> bool:
        """Step over n bytes from `pos` without reading them into memory (a record too large to keep);
        False when the file ends before."""
        if self.pos + n <= len(self.buf):
            self.pos += n
            return True
        target = self.base + self.pos + n
        try:
            if target > os.fstat(self.handle.fileno()).st_size:
                return False
            self.handle.seek(target)
        except (OSError, ValueError):
            return False
        self.base, self.buf, self.pos = target, b"", 0
        return True

    @property
    def offset(self) -> int:
        return self.base + self.pos


def iter_udp_batches(
    path: Path | str, batch_datagrams: int = 65536, limits: Limits = DEFAULT_LIMITS
) -> Iterator[UdpBatch]:
    """Yield UDP datagrams of a pcap or pcapng file in batches; a file that is no capture yields one reject.
    A record larger than `limits.capture_record_bytes` is a reject, stepped over without being read."""
    with open(path, "rb") as handle:
        reader = _Reader(handle)
        if not reader.need(4):
            yield _only_reject(0, "not a pcap", "file shorter than 4 bytes")
            return
        magic_le = struct.unpack_from("<I", reader.buf, 0)[0]
        if magic_le in PCAP_MAGIC:
            yield from _read_pcap(reader, batch_datagrams, limits)
        elif magic_le == PCAPNG_SHB:
            yield from _read_pcapng(reader, batch_datagrams, limits)
        else:
            yield _only_reject(0, "not a pcap", f"magic {reader.buf[:4].hex()}")


def _only_reject(offset: int, reason: str, detail: str) -> UdpBatch:
    col = _Collector()
    col.rejects.append((offset, reason, detail))
    return col.flush(0)


def _read_pcap(reader: _Reader, batch_datagrams: int, limits: Limits) -> Iterator[UdpBatch]:
    if not reader.need(24):
        yield _only_reject(0, "truncated pcap record", "global header cut short")
        return
    magic = struct.unpack_from("<I", reader.buf, 0)[0]
    order, nanos = PCAP_MAGIC[magic]
    linktype = struct.unpack_from(order + "I", reader.buf, 20)[0] & 0xFFFF
    reader.pos = 24
    caplen_at = struct.Struct(order + "I").unpack_from
    max_record = limits.capture_record_bytes
    col = _Collector()
    decode = _LinkDecoder()
    divisor = 1000 if nanos else 1
    while True:
        # every complete record in the buffer: the walk over record lengths (a record's length says where the
        # next one starts) is the only per-packet Python, except over runs of records of one length
        buf, pos, end = reader.buf, reader.pos, len(reader.buf)
        found: list = []  # record positions: ints, and arrays of runs
        oversized = 0
        last = -1
        while pos + 16 <= end:
            caplen = caplen_at(buf, pos + 8)[0]
            if caplen > max_record:  # never read into memory: stepped over below if the file holds it
                oversized = caplen
                break
            if pos + 16 + caplen > end:
                break
            # the second record of this length in a row: a run (an exporter's full datagrams)
            if caplen == last:
                run = _same_length_run(buf, pos, end, caplen, order == ">")
                found.append(run)
                pos += len(run) * (16 + caplen)
                last = -1
                continue
            found.append(pos)
            pos += 16 + caplen
            last = caplen
        records = _int64s(found)
        done = 0
        while done < len(records):
            room = max(1, batch_datagrams - col.count)
            part = records[done : done + room]
            done += len(part)
            _packets(col, decode, buf, reader.base, part, linktype, order == ">", divisor)
            if col.count >= batch_datagrams or col.nbytes >= BATCH_BYTES:
                yield col.flush(reader.base + (int(part[-1]) if done < len(records) else pos))
        reader.pos = pos
        if oversized:
            offset = reader.offset
            if reader.skip(16 + oversized):
                col.rejects.append(
                    (
                        offset,
                        "limit capture_record_bytes",
                        f"record of {oversized} bytes skipped (limit {max_record})",
                    )
                )
                continue
            # a length past the end of the file: no next record can be found, the file is corrupt from here
            col.rejects.append((offset, "truncated pcap record", f"record claims {oversized} bytes"))
            break
        # a partial record (or nothing) is left: read on
        if not reader.need(16):
            if reader.pos < len(reader.buf):
                left = len(reader.buf) - reader.pos
                col.rejects.append(
                    (
                        reader.offset,
                        "truncated pcap record",
                        f"{left} bytes of a record header at end of file",
                    )
                )
            break
        caplen = caplen_at(reader.buf, reader.pos + 8)[0]
        if caplen <= max_record and not reader.need(16 + caplen):
            have = len(reader.buf) - reader.pos - 16
            col.rejects.append(
                (reader.offset, "truncated pcap record", f"record needs {caplen} bytes, file has {have}")
            )
            break
    yield col.flush(reader.offset)


# link type -> (bytes before the IP header, offset of the ethertype in them or None)
_FAST_LINKS = {
    LINK_ETHERNET: (14, 12),
    LINK_SLL: (16, 14),
    LINK_SLL2: (20, 0),
    LINK_RAW: (0, None),
    LINK_RAW_BSD: (0, None),
    LINK_RAW_OPENBSD: (0, None),
    LINK_NULL: (4, None),
    LINK_LOOP: (4, None),
}


RUN_WINDOW = 64  # records checked at once ahead of a run of one record length (then 4x more each time)


def _same_length_run(buf: bytes, pos: int, end: int, caplen: int, big: bool) -> np.ndarray:
    """Positions of the complete records from `pos` (whose length is caplen, complete) on that all have that
    length, one after another: checked with numpy in growing windows (a capture of full export datagrams is
    mostly such runs), so a mix of lengths costs one window of RUN_WINDOW per run, never more."""
    data = np.frombuffer(buf, np.uint8)
    stride = 16 + caplen
    runs = []
    window = RUN_WINDOW
    while True:
        ahead = min(window, (end - pos) // stride)  # records of that length that would fit in the buffer
        at = pos + stride * np.arange(ahead, dtype=np.int64)
        differs = np.flatnonzero(_u32(data, at + 8, big) != caplen)
        same = int(differs[0]) if len(differs) else ahead
        runs.append(at[:same])
        pos += same * stride
        if same < ahead or ahead < window:
            return np.concatenate(runs)
        window *= 4


def _u32(data: np.ndarray, at: np.ndarray, big: bool) -> np.ndarray:
    b = [data[at + i].astype(np.int64) for i in range(4)]
    if big:
        return (b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]
    return (b[3] << 24) | (b[2] << 16) | (b[1] << 8) | b[0]


def _packets(
    col: _Collector,
    decode: _LinkDecoder,
    buf: bytes,
    base: int,
    records: np.ndarray,
    linktype: int,
    big: bool,
    divisor: int,
) -> None:
    """Records at `records` (positions in buf) -> datagrams. Vectorised when every packet is plain IPv4 UDP
    without options or fragments (what an export capture holds); otherwise packet by packet."""
    pos = np.asarray(records, dtype=np.int64)
    data = np.frombuffer(buf, dtype=np.uint8)
    secs = _u32(data, pos, big)
    ts_us = secs * 1_000_000 + _u32(data, pos + 4, big) // divisor
    caplen = _u32(data, pos + 8, big)
    layout = _FAST_LINKS.get(linktype)
    if layout is not None:
        link_len, ethertype_at = layout
        first = pos + 16
        if (caplen >= link_len + 28).all():
            ip = first + link_len
            ok = data[ip] == 0x45  # IPv4, 20-byte header
            if ethertype_at is not None:
                ok &= (data[first + ethertype_at] == 0x08) & (data[first + ethertype_at + 1] == 0x00)
            ok &= ((data[ip + 6] & 0x3F) == 0) & (data[ip + 7] == 0) & (data[ip + 9] == UDP)
            udp_len = (data[ip + 24].astype(np.int64) << 8) | data[ip + 25]
            ok &= (udp_len >= 8) & (link_len + 20 + udp_len <= caplen)
            if ok.all():
                col.which.append(np.full(len(pos), col.buffer(buf), np.int64))
                col.starts.append(ip + 28)
                col.ends.append(ip + 20 + udp_len)
                col.count += len(pos)
                col.payload_offsets.append(ip + 28 + base)
                col.heads.append(_heads(data, ip + 28, udp_len - 8))
                sources = _u32(data, ip + 12, True)
                uniq, inverse = np.unique(sources, return_inverse=True)
                texts = [decode.ipv4_text(int(u)) for u in uniq]
                col.exporters.extend([texts[i] for i in inverse.tolist()])
                col.ts.extend(ts_us.tolist())
                col.offsets.extend((pos + base).tolist())
                col.ports.extend(((data[ip + 22].astype(np.int64) << 8) | data[ip + 23]).tolist())
                col.nbytes += int(udp_len.sum())
                return
    for record, length, ts in zip(records.tolist(), caplen.tolist(), ts_us.tolist(), strict=True):
        decode.packet(col, buf, record + 16, length, linktype, base + record, ts, base)


def _read_pcapng(reader: _Reader, batch_datagrams: int, limits: Limits) -> Iterator[UdpBatch]:
    col = _Collector()
    decode = _LinkDecoder()
    order = "<"
    interfaces: list[tuple[int, int]] = []  # (link type, ticks per second)
    while True:
        if not reader.need(12):
            if reader.pos < len(reader.buf):
                col.rejects.append((reader.offset, "truncated pcap record", "pcapng block header cut short"))
            break
        offset = reader.offset
        block_type_le = struct.unpack_from("<I", reader.buf, reader.pos)[0]
        if block_type_le == PCAPNG_SHB:
            bom = reader.buf[reader.pos + 8 : reader.pos + 12]
            order = "<" if struct.unpack("<I", bom)[0] == PCAPNG_BYTE_ORDER else ">"
            interfaces = []
        block_type, block_len = struct.unpack_from(order + "II", reader.buf, reader.pos)
        if block_len < 12 or block_len % 4:
            col.rejects.append((offset, "truncated pcap record", f"pcapng block length {block_len}"))
            break
        if block_len > limits.capture_record_bytes + PCAPNG_BLOCK_OVERHEAD:
            if not reader.skip(block_len):
                col.rejects.append(
                    (offset, "truncated pcap record", f"pcapng block claims {block_len} bytes")
                )
                break
            col.rejects.append(
                (offset, "limit capture_record_bytes", f"pcapng block of {block_len} bytes skipped")
            )
            continue
        if not reader.need(block_len):
            col.rejects.append(
                (
                    offset,
                    "truncated pcap record",
                    f"pcapng block needs {block_len} bytes, file has {len(reader.buf) - reader.pos}",
                )
            )
            break
        body = reader.pos + 8
        end = reader.pos + block_len - 4
        reader.pos += block_len
        buf = reader.buf
        if end - body < PCAPNG_FIXED_BODY.get(block_type, 0):  # (a 12-byte packet block crashed the read)
            col.rejects.append(
                (offset, "truncated pcap record", f"pcapng block of type {block_type} has {block_len} bytes")
            )
            continue
        if block_type == 1:  # interface description
            linktype = struct.unpack_from(order + "H", buf, body)[0]
            interfaces.append((linktype, _tsresol(buf, body + 8, end, order)))
        elif block_type in (6, 2):  # enhanced / obsolete packet block
            if block_type == 6:
                iface, hi, lo, caplen = struct.unpack_from(order + "IIII", buf, body)
                data = body + 20
            else:
                iface, _, hi, lo, caplen = struct.unpack_from(order + "HHIII", buf, body)
                data = body + 20
            if iface >= len(interfaces) or data + caplen > end:
                col.rejects.append(
                    (offset, "truncated pcap record", f"packet block: interface {iface}, {caplen} bytes")
                )
                continue
            linktype, ticks = interfaces[iface]
            ts = (hi << 32) | lo
            ts_us = ts * 1_000_000 // ticks if ticks != 1_000_000 else ts
            if ts_us >= MAX_CAPTURE_US:  # (64 bits of ticks: past int64 µs, or a time no capture was made at)
                col.rejects.append((offset, "bad capture time", f"packet block timestamp {ts} ticks"))
                continue
            decode.packet(col, buf, data, caplen, linktype, offset, ts_us, reader.base)
        elif block_type == 3:  # simple packet block: interface 0, no time
            if not interfaces:
                col.rejects.append(
                    (offset, "truncated pcap record", "simple packet block before any interface")
                )
                continue
            origlen = struct.unpack_from(order + "I", buf, body)[0]
            caplen = min(origlen, end - body - 4)
            decode.packet(col, buf, body + 4, caplen, interfaces[0][0], offset, 0, reader.base)
        if col.count >= batch_datagrams or col.nbytes >= BATCH_BYTES:
            yield col.flush(reader.offset)
    yield col.flush(reader.offset)


def _tsresol(buf: bytes, pos: int, end: int, order: str) -> int:
    """Ticks per second of an interface (option if_tsresol = 9; default µs)."""
    while pos + 4 <= end:
        code, length = struct.unpack_from(order + "HH", buf, pos)
        if code == 0:
            break
        if code == 9 and length >= 1:
            value = buf[pos + 4]
            return 2 ** (value & 0x7F) if value & 0x80 else 10**value
        pos += 4 + ((length + 3) & ~3)
    return 1_000_000


# the fixed fields of the pcapng blocks read here, in bytes of their body: interface description (link type,
# reserved, snap length), enhanced and obsolete packet blocks (interface, time, lengths), simple packet block
PCAPNG_FIXED_BODY = {1: 8, 6: 20, 2: 20, 3: 4}
# pcapng's 64-bit packet times past this (2100-01-01) are garbage: a planted one would overflow the int64
# arrival times or move the decoder's clock (idle exporters' eviction) far ahead
MAX_CAPTURE_US = 4_102_444_800_000_000
_ETHER_VLAN = {0x8100, 0x88A8, 0x9100}
_U16 = struct.Struct(">H")
_UDP = struct.Struct(">HHH")


class _LinkDecoder:
    """Link layer -> IP -> UDP, per packet. Lean on purpose: this loop runs once per datagram."""

    def __init__(self) -> None:
        self.addr_text: dict[bytes, str] = {}
        self.v4_text: dict[int, str] = {}

    def ipv4_text(self, value: int) -> str:
        text = self.v4_text.get(value)
        if text is None:
            text = self.v4_text[value] = str(ipaddress.IPv4Address(value))
        return text

    def packet(
        self,
        col: _Collector,
        buf: bytes,
        start: int,
        caplen: int,
        linktype: int,
        offset: int,
        ts_us: int,
        base: int,
    ) -> None:
        """One packet at buf[start:start+caplen] (`offset`: of its record in the file, `base`: of buf[0])."""
        end = start + caplen
        pos = start
        if linktype == LINK_ETHERNET:
            if caplen < 14:
                col.rejects.append((offset, "truncated packet", "Ethernet header cut short"))
                return
            ethertype = _U16.unpack_from(buf, pos + 12)[0]
            pos += 14
            while ethertype in _ETHER_VLAN and pos + 4 <= end:
                ethertype = _U16.unpack_from(buf, pos + 2)[0]
                pos += 4
        elif linktype == LINK_SLL:
            if caplen < 16:
                col.rejects.append((offset, "truncated packet", "Linux cooked header cut short"))
                return
            ethertype = _U16.unpack_from(buf, pos + 14)[0]
            pos += 16
        elif linktype == LINK_SLL2:
            if caplen < 20:
                col.rejects.append((offset, "truncated packet", "Linux cooked v2 header cut short"))
                return
            ethertype = _U16.unpack_from(buf, pos)[0]
            pos += 20
        elif linktype in (LINK_RAW, LINK_RAW_BSD, LINK_RAW_OPENBSD):
            ethertype = 0x0800 if caplen and buf[pos] >> 4 == 4 else 0x86DD
        elif linktype in (LINK_NULL, LINK_LOOP):
            if caplen < 4:
                col.rejects.append((offset, "truncated packet", "loopback header cut short"))
                return
            pos += 4
            ethertype = 0x0800 if caplen > 4 and buf[pos] >> 4 == 4 else 0x86DD
        else:
            col.rejects.append((offset, "unknown link type", f"link type {linktype}"))
            return

        if ethertype == 0x0800:
            if end - pos < 20 or buf[pos] >> 4 != 4:
                col.rejects.append((offset, "truncated packet", "IPv4 header cut short"))
                return
            ihl = (buf[pos] & 0x0F) * 4
            if ihl < 20 or pos + ihl > end:  # the UDP header would be read from inside the IP header
                col.rejects.append((offset, "bad IPv4 header", f"header length {ihl} bytes"))
                return
            if buf[pos + 9] != UDP:
                col.rejects.append((offset, "not UDP", f"IP protocol {buf[pos + 9]}"))
                return
            if _U16.unpack_from(buf, pos + 6)[0] & 0x3FFF:  # more-fragments flag or fragment offset
                col.rejects.append((offset, "ip fragment", "fragmented datagrams are not reassembled"))
                return
            src = buf[pos + 12 : pos + 16]
            pos += ihl
        elif ethertype == 0x86DD:
            if end - pos < 40:
                col.rejects.append((offset, "truncated packet", "IPv6 header cut short"))
                return
            next_header = buf[pos + 6]
            src = buf[pos + 8 : pos + 24]
            pos += 40
            while next_header in IPV6_EXTENSION_HEADERS or next_header == IPV6_AUTH:
                if pos + 2 > end:
                    col.rejects.append((offset, "truncated packet", "IPv6 extension header cut short"))
                    return
                length = (buf[pos + 1] + 2) * 4 if next_header == IPV6_AUTH else (buf[pos + 1] + 1) * 8
                next_header = buf[pos]
                pos += length
            if next_header == IPV6_FRAGMENT:
                col.rejects.append((offset, "ip fragment", "fragmented datagrams are not reassembled"))
                return
            if next_header != UDP:
                col.rejects.append((offset, "not UDP", f"IPv6 next header {next_header}"))
                return
        else:
            col.rejects.append((offset, "not UDP", f"ethertype 0x{ethertype:04x}"))
            return

        if pos + 8 > end:
            col.rejects.append((offset, "truncated packet", "UDP header cut short"))
            return
        _, dst_port, udp_len = _UDP.unpack_from(buf, pos)
        if udp_len < 8 or pos + udp_len > end:
            col.rejects.append(
                (
                    offset,
                    "truncated packet",
                    f"UDP length {udp_len}, {end - pos} bytes captured (snap length too small?)",
                )
            )
            return
        exporter = self.addr_text.get(src)
        if exporter is None:
            exporter = self.addr_text[src] = str(ipaddress.ip_address(bytes(src)))
        col.which.append(col.buffer(buf))
        col.starts.append(pos + 8)
        col.ends.append(pos + udp_len)
        col.count += 1
        col.payload_offsets.append(base + pos + 8)
        col.heads.append(buf[pos + 8 : pos + 8 + HEAD_BYTES] if udp_len - 8 >= HEAD_BYTES else _NO_HEAD)
        col.exporters.append(exporter)
        col.ts.append(ts_us)
        col.offsets.append(offset)
        col.ports.append(dst_port)
        col.nbytes += udp_len
