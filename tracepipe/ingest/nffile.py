"""nfcapd files (nfdump 1.7's nffile layout 2, as nfcapd 1.7.1 writes them) -> flow records, natively.

In: one file. Out: batches of (flows in schema.FLOWS with dictionary text, rejects with the file offset of the
block where each problem was), the same rows the nfdump-subprocess path lands (`nfdump -r FILE -o fmt:...`),
plus the exporters and samplers the file announces. `native_problem(path)` says why a file must go through the
nfdump binary instead (layout 1, encryption, LZO without python-lzo, 1.6 block types); the caller falls back.

Wire facts (nfdump 1.7.1 src/lib/nffileV2.h, nfxV3.h, id.h), all little-endian as written on x86:
- file header, 40 bytes: magic 0xA50C, layout 2, nfdump version, created, compression (0 none, 1 LZO, 2 BZ2,
  3 LZ4), encryption, appendix blocks, unused, appendix offset, block size, number of data blocks; then the
  data blocks back to back (the appendix, after them, holds only the ident and the stat record).
- block header, 12 bytes: records, size of the (compressed) data that follows, type (3: records; 4: arrays,
  which nfdump skips), flags. A block is at most 5 MiB uncompressed (nfdump's BUFFSIZE): the bomb cap.
- record: type, size (including the header); V3 flow records (type 11) have a 12-byte header (type, size,
  element count, engine type/id, exporter sysid, flags, netflow version) and then elements, each a 4-byte
  header (type, length including the header) and its fixed fields. Exporter (7) and sampler (15) records
  describe the exporters.
Speed: records of one layout (same size and element sequence, the normal case: one exporter, one template) are
found in runs by comparing the layout bytes at the record stride with numpy, and each run is read with one
structured dtype; only the first record of a run is walked in Python.
"""

from __future__ import annotations

import bz2
import ipaddress
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tracepipe.address_text import addresses
from tracepipe.ingest.netflow import FLOWS_TEXT_DICTIONARY, _ipv4_text, _ipv6_text, _text
from tracepipe.lake import implausible_detail
from tracepipe.limits import DEFAULT as DEFAULT_LIMITS
from tracepipe.schema import REJECTS, null_column
from tracepipe.units import time_window

WINDOW_REJECT = "time outside plausible window"  # lake.split_implausible's reason

try:  # LZO-compressed files (nfcapd -z) are read natively only if python-lzo is installed
    import lzo  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    lzo = None

MAGIC = 0xA50C
LAYOUT_VERSION_2 = 2
FILE_HEADER = np.dtype(
    [
        ("magic", "<u2"),
        ("version", "<u2"),
        ("nfdversion", "<u4"),
        ("created", "<i8"),
        ("compression", "u1"),
        ("encryption", "u1"),
        ("appendix_blocks", "<u2"),
        ("unused", "<u4"),
        ("off_appendix", "<i8"),
        ("block_size", "<u4"),
        ("num_blocks", "<u4"),
    ]
)
BLOCK_HEADER = np.dtype([("records", "<u4"), ("size", "<u4"), ("type", "<u2"), ("flags", "<u2")])
NOT_COMPRESSED, LZO_COMPRESSED, BZ2_COMPRESSED, LZ4_COMPRESSED = 0, 1, 2, 3
COMPRESSION_NAMES = {0: "none", 1: "lzo", 2: "bz2", 3: "lz4"}
DATA_BLOCK_TYPE_3 = 3  # V3 records
DATA_BLOCK_TYPE_4 = 4  # array records: nfdump skips them when it prints flows
MAX_BLOCK_BYTES = 5 * 1048576  # nfdump's BUFFSIZE: no block is larger, compressed or not (the bomb cap)
# A block expands at most this many times (flow records compress 5-20x; LZ4's format cannot pass ~255x): a
# 221-byte bz2 block of zeros expanded to 5 MiB, 1 MB of such blocks to 23 GB of records to walk
MAX_RATIO = 1024
# Records a block may make the reader walk one at a time in Python (records that are no flows, a run of flows
# starting, an element of a new flow layout): at most this plus STEPS_PER_BYTE per byte of the block as stored.
# Runs of one layout, and of one kind of record that is no flow, are read or stepped over with numpy; a file
# built of ever-changing tiny records (4-byte records of unknown types, 16 k elements each of 4096 V3 records)
# kept a core busy for minutes per kilobyte
STEPS_PER_BLOCK = 4096
STEPS_PER_BYTE = 1
# runs of blocks stepped over (no records, over 5 MiB; each run one reject): past it the rest of a file is given up
MAX_SKIPPED_RUNS = 1024
LAYOUT_CACHE_CHECKS = 1024  # layouts with more header bytes to compare than this are not kept (memory)
RANGE_RECORDS = 1 << 18  # records a decode worker reads at a time (iter_ranges): ~30 MB in its memory
RANGE_BLOCKS = (
    4096  # and at most this many blocks (nfcapd's are ~5 MB: only a planted file of tiny ones has more)
)

V3_RECORD = 11
EXPORTER_INFO = 7
SAMPLER_INFO = 15
V3_HEADER_BYTES = 12
ELEMENT_HEADER_BYTES = 4
# element id -> (bytes of its fields, fields we read: name -> (offset in the element's fields, numpy type))
ELEMENTS: dict[int, tuple[int, dict[str, tuple[int, str]]]] = {
    1: (  # EXgenericFlow
        48,
        {
            "first": (0, "<u8"),
            "last": (8, "<u8"),
            "packets": (24, "<u8"),
            "bytes": (32, "<u8"),
            "src_port": (40, "<u2"),
            "dst_port": (42, "<u2"),  # ICMP: type*256 + code, as nfdump prints it ("type.code")
            "proto": (44, "u1"),
            "tcp_flags": (45, "u1"),
        },
    ),
    2: (8, {"src4": (0, "<u4"), "dst4": (4, "<u4")}),  # EXipv4Flow: host order
    3: (32, {"src6": (0, "V16"), "dst6": (16, "V16")}),  # EXipv6Flow: two host-order uint64 halves each
    4: (16, {"input_if": (0, "<u4"), "output_if": (4, "<u4")}),  # EXflowMisc
    12: (4, {"router4": (0, "<u4")}),  # EXipReceivedV4: the exporter as nfcapd received it
    13: (16, {"router6": (0, "V16")}),  # EXipReceivedV6
}
_FORMATS = {name: fmt for _, fields in ELEMENTS.values() for name, (_, fmt) in fields.items()}
MAX_TIME_TEXT_MS = 253_402_300_800_000  # 10000-01-01: nfdump prints a 5-digit year the text path rejects
MAX_COUNT = 10**18 - 1  # the text path reads at most 18 digits (nfdump._uint)
MAX_INT32 = 2**31 - 1


@dataclass
class Exporters:
    """What the file says of its exporters: address -> {"sysid", "sampling": [packet intervals]}."""

    by_sysid: dict[int, str] = field(default_factory=dict)
    out: dict[str, dict[str, object]] = field(default_factory=dict)
    ignored: int = 0  # exporter records past limits.exporters distinct addresses

    def apply(self, infos: list[tuple[int, bytes]]) -> None:
        """Exporter and sampler records (type, bytes), in file order: a sampler names its exporter by the sysid
        an earlier exporter record gave it, so blocks read apart (decode workers) are applied here in order."""
        for kind, raw in infos:
            if kind == EXPORTER_INFO:
                _exporter_record(raw, self)
            else:
                _sampler_record(raw, self)
        infos.clear()


@dataclass
class _Layout:
    size: int
    check: np.ndarray  # byte positions that must be equal for a record to share this layout
    expect: np.ndarray  # ... and their values
    dtype: np.dtype  # the fields we read, at their offsets in the record; itemsize = the record size
    roles: frozenset[str]  # the names in dtype: a field a layout lacks reads as 0 (nfdump's cleared record)


def read_header(head: bytes) -> np.void | None:
    if len(head) < FILE_HEADER.itemsize:
        return None
    return np.frombuffer(head, FILE_HEADER, count=1)[0]


def native_problem(path: Path | str) -> str | None:
    """None if this reader handles the file, else why it goes through nfdump (the fallback): another layout
    or byte order, encryption, a compression it has no codec for, or blocks of nfdump 1.6 (type 2)."""
    try:
        with open(path, "rb") as handle:
            header = read_header(handle.read(FILE_HEADER.itemsize))
            if header is None:
                return "shorter than an nfcapd file header"
            if int(header["magic"]) != MAGIC:
                return "not little-endian nffile (magic byte order)"
            if int(header["version"]) != LAYOUT_VERSION_2:
                return f"nffile layout {int(header['version'])} (nfdump 1.6); native reads layout 2"
            if int(header["encryption"]):
                return "encrypted"
            compression = int(header["compression"])
            if compression == LZO_COMPRESSED and lzo is None:
                return "LZO-compressed (python-lzo is not installed)"
            if compression not in COMPRESSION_NAMES:
                return f"unknown compression {compression}"
            for _ in range(int(header["num_blocks"])):  # block headers only: a seek per block
                raw = handle.read(BLOCK_HEADER.itemsize)
                if len(raw) < BLOCK_HEADER.itemsize:
                    break  # truncated: the native reader rejects it where it is
                block = np.frombuffer(raw, BLOCK_HEADER, count=1)[0]
                if int(block["type"]) not in (DATA_BLOCK_TYPE_3, DATA_BLOCK_TYPE_4):
                    if int(block["type"]) == 2:
                        return "block type 2 (nfdump 1.6 records)"
                    break  # junk: rejected natively
                handle.seek(int(block["size"]), 1)
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    return None


# ---- blocks ------------------------------------------------------------------------------------------------


def _decompress(compression: int, data: bytes) -> tuple[memoryview | bytes | None, int, str]:
    """(uncompressed bytes, their length as far as known, problem). LZ4 through pyarrow gives back its whole
    output buffer (the real length is not returned): the caller bounds its walk and then checks it with
    _lz4_holds."""
    if compression == NOT_COMPRESSED:
        return data, len(data), ""
    most = min(MAX_BLOCK_BYTES, MAX_RATIO * len(data))
    try:
        if compression == LZ4_COMPRESSED:
            out = pa.Codec("lz4_raw").decompress(data, decompressed_size=most)
            return memoryview(out), most, ""
        if compression == BZ2_COMPRESSED:
            decompressor = bz2.BZ2Decompressor()
            out = decompressor.decompress(data, max_length=most)
            if not decompressor.eof:
                if decompressor.needs_input:
                    return None, 0, "bz2 block cut short"
                if most < MAX_BLOCK_BYTES:
                    return None, 0, f"bz2 block expands more than {MAX_RATIO} times (a decompression bomb)"
                return None, 0, "bz2 block larger than 5 MiB"
            return out, len(out), ""
        if compression == LZO_COMPRESSED and lzo is not None:
            out = lzo.decompress(data, False, most)
            return out, len(out), ""
    except (OSError, ValueError, EOFError) as exc:
        return None, 0, f"{COMPRESSION_NAMES.get(compression, compression)} data corrupt: {exc}"
    except Exception as exc:  # python-lzo raises lzo.error
        return None, 0, f"{COMPRESSION_NAMES.get(compression, compression)} data corrupt: {exc}"
    return None, 0, f"compression {compression} not supported"


def _lz4_holds(data: bytes, used: int) -> bool:
    """True if the LZ4 block decompresses to at least `used` bytes (the records walked stayed in real data,
    not in the tail of pyarrow's buffer): decompressing into `used - 1` bytes must then fail."""
    if used <= 0:
        return True
    try:
        pa.Codec("lz4_raw").decompress(data, decompressed_size=used - 1)
    except OSError:
        return True
    return False


def _element_layout(buf: np.ndarray, start: int, size: int) -> tuple[_Layout | None, str]:
    """Walk the elements of the V3 record at `start` (one Python walk per run of records, not per record)."""
    count = int(buf[start + 4]) | int(buf[start + 5]) << 8
    check = [0, 1, 2, 3, 4, 5]
    names: list[str] = []
    formats: list[str] = []
    offsets: list[int] = []
    at = V3_HEADER_BYTES
    seen: dict[str, int] = {}
    for _ in range(count):
        if at + ELEMENT_HEADER_BYTES > size:
            return None, f"element header past the record end ({count} elements in {size} bytes)"
        kind = int(buf[start + at]) | int(buf[start + at + 1]) << 8
        length = int(buf[start + at + 2]) | int(buf[start + at + 3]) << 8
        check.extend(range(at, at + ELEMENT_HEADER_BYTES))
        if length < ELEMENT_HEADER_BYTES or at + length > size:
            return None, f"element {kind} length {length} outside the record ({size} bytes)"
        known = ELEMENTS.get(kind)
        if known is not None:
            if length < ELEMENT_HEADER_BYTES + known[0]:
                return None, f"element {kind} length {length} shorter than its fields"
            for name, (offset, _) in known[1].items():
                seen[name] = at + ELEMENT_HEADER_BYTES + offset  # a repeated element: the last wins (nfdump)
        at += length  # unknown elements are stepped over, as nfdump does
    for name, offset in seen.items():
        names.append(name)
        offsets.append(offset)
        formats.append(_FORMATS[name])
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": size})
    positions = np.array(check, dtype=np.int64)
    return (
        _Layout(
            size,
            positions,
            buf[start + positions].copy(),
            dtype,
            frozenset(names),
        ),
        "",
    )


def _run_length(
    buf: np.ndarray, start: int, size: int, most: int, check: np.ndarray, expect: np.ndarray
) -> int:
    """How many records of `size` bytes from `start` on hold `expect` at their byte positions `check` (at least
    1, at most `most`): a run of one flow layout, or of one kind of record that is no flow (_HEADER: its type
    and size). Compared at the record stride, in growing chunks so that a short run costs little."""
    done = 1
    chunk = 64
    while done < most:
        n = min(chunk, most - done)
        base = start + done * size
        view = np.lib.stride_tricks.as_strided(
            buf[base:], shape=(n, size), strides=(size, 1), writeable=False
        )
        same = (view[:, check] == expect).all(axis=1)
        if not same.all():
            return done + int(np.argmin(same))
        done += n
        chunk *= 4
    return done


_HEADER = np.arange(4)  # a record's type and size


_NUMERIC = {
    "first": np.uint64,
    "last": np.uint64,
    "packets": np.uint64,
    "bytes": np.uint64,
    "src_port": np.uint16,
    "dst_port": np.uint16,
    "proto": np.uint8,
    "tcp_flags": np.uint8,
    "input_if": np.uint32,
    "output_if": np.uint32,
    "src4": np.uint32,
    "dst4": np.uint32,
    "router4": np.uint32,
}


@dataclass
class _Columns:
    """The runs of records read so far (one batch): structured views into their blocks, made columns at once."""

    runs: list[tuple[np.ndarray, _Layout, int]] = field(
        default_factory=list
    )  # (records, layout, block offset)
    rows: int = 0

    def add(self, arr: np.ndarray, layout: _Layout, block_offset: int) -> None:
        self.runs.append((arr, layout, block_offset))
        self.rows += len(arr)

    def drop_since(self, rows: int) -> None:
        """Forget the records after the first `rows` (a block found lying after it was read)."""
        kept, total = [], 0
        for arr, layout, offset in self.runs:
            if total >= rows:
                break
            kept.append((arr[: rows - total], layout, offset))
            total += len(kept[-1][0])
        self.runs, self.rows = kept, total

    def take(self) -> dict[str, np.ndarray]:
        """One array per field: each run copied once into place, fields a layout lacks left 0 (nfdump's cleared
        record); the V16 IPv6 columns only when some run has them."""
        runs, total = self.runs, self.rows
        self.runs, self.rows = [], 0
        bounds = np.cumsum([0] + [len(arr) for arr, _, _ in runs])
        out: dict[str, np.ndarray] = {name: np.zeros(total, dtype) for name, dtype in _NUMERIC.items()}
        # run by run, every field of a run while its block is in the CPU's cache: field by field over all runs
        # read every block from memory once per field (issue 17: 0.13 us a record, 12% of a decode worker)
        for (arr, layout, _), a, b in zip(runs, bounds[:-1], bounds[1:], strict=True):
            for name in _NUMERIC:
                if name in layout.roles:
                    out[name][a:b] = arr[name]
        for end in ("src", "dst", "router"):
            name = f"{end}6"
            is6 = np.zeros(total, bool)
            column = np.zeros(total if any(name in r[1].roles for r in runs) else 0, "V16")
            for (arr, layout, _), a, b in zip(runs, bounds[:-1], bounds[1:], strict=True):
                if name in layout.roles:  # two host-order uint64 halves -> 16 bytes in network order
                    halves = np.frombuffer(arr[name].tobytes(), "<u8").reshape(-1, 2).astype(">u8")
                    column[a:b] = halves.view("V16").reshape(-1)
                    is6[a:b] = True
            out[name], out[f"{end}_is6"] = column, is6
        out["offset"] = np.repeat([offset for _, _, offset in runs], np.diff(bounds)).astype(np.int64)
        return out


def _address(v4: np.ndarray, v6: np.ndarray, is6: np.ndarray, ipv4_as_integers: bool = False) -> pa.Array:
    """Canonical address text (dictionary), each distinct address formatted once (netflow's helpers); with
    `ipv4_as_integers`, integers for the lake writer to format (netflow.decode_walked)."""
    if ipv4_as_integers:  # IPv6 too, when there are: address_text.ADDRESSES
        return pa.array(v4.astype(np.uint32)) if not is6.any() else addresses(v4, v6, is6)
    if not is6.any():
        return _ipv4_text(v4)
    if is6.all():
        return _ipv6_text(v6)
    text = pc.if_else(pa.array(is6), _ipv6_text(v6).cast(pa.string()), _ipv4_text(v4).cast(pa.string()))
    return _text(text)


def _flows(
    cols: dict[str, np.ndarray], source: str, ipv4_as_integers: bool = False
) -> tuple[pa.Table, pa.Table]:
    """Record arrays -> (FLOWS_TEXT_DICTIONARY table, rejects of rows nfdump's text would not parse); with
    `ipv4_as_integers`, src_addr and dst_addr as integers (netflow.decode_walked)."""
    n = len(cols["first"])
    earliest, latest = (int(t.timestamp() * 1000) for t in time_window())
    checks = [
        ("bad start time", "ts", cols["first"], cols["first"] < MAX_TIME_TEXT_MS),
        ("bad end time", "te", cols["last"], cols["last"] < MAX_TIME_TEXT_MS),
        ("bad packet count", "ipkt", cols["packets"], cols["packets"] <= MAX_COUNT),
        ("bad byte count", "ibyt", cols["bytes"], cols["bytes"] <= MAX_COUNT),
        ("bad input interface", "in", cols["input_if"], cols["input_if"] <= MAX_INT32),
        ("bad output interface", "out", cols["output_if"], cols["output_if"] <= MAX_INT32),
        # (here, not in the lake's writer, so that the reject says which block: the writer's has no offset)
        (WINDOW_REJECT, "ts_start", cols["first"], (cols["first"] >= earliest) & (cols["first"] <= latest)),
    ]
    valid = np.ones(n, bool)
    for _, _, _, ok in checks:
        valid &= ok
    rejects = _empty_rejects()
    if not valid.all():
        # each bad row named by the first field that fails, as the text path does; vectorised per check (a
        # router without NTP dates every row 1970: one Python step per row was 7 s per 5 MiB block)
        named = np.zeros(n, bool)
        parts, order = [], []
        for reason, name, values, ok in checks:
            hit = ~ok & ~named
            if not hit.any():
                continue
            named |= hit
            if reason == WINDOW_REJECT:  # (as the lake's writer words it)
                ts = pa.array(values[hit].astype(np.int64) * 1000, pa.timestamp("us", "UTC"))
                detail = implausible_detail(ts, name)
            else:
                detail = pc.binary_join_element_wise(f"{name}=", pa.array(values[hit]).cast(pa.string()), "")
            parts.append(
                pa.table(
                    {
                        "offset": pa.array(cols["offset"][hit], pa.int64()),
                        "reason": pa.array([reason] * int(hit.sum()), pa.string()),
                        "detail": detail,
                        "source": pa.array([source] * int(hit.sum()), pa.string()),
                    },
                    schema=_empty_rejects().schema,
                )
            )
            order.append(np.flatnonzero(hit))
        rows_in_order = np.argsort(np.concatenate(order), kind="stable")  # (file order, as before)
        rejects = pa.concat_tables(parts).take(pa.array(rows_in_order))
        cols = {name: values[valid] if len(values) else values for name, values in cols.items()}
        n = int(valid.sum())
    src = _address(cols["src4"], cols["src6"], cols["src_is6"], ipv4_as_integers)
    dst = _address(cols["dst4"], cols["dst6"], cols["dst_is6"], ipv4_as_integers)
    router = _address(cols["router4"], cols["router6"], cols["router_is6"])
    proto = cols["proto"].astype(np.int16)
    flags = np.where(proto == 6, cols["tcp_flags"], 0).astype(np.int16)  # nfdump prints flags of TCP only
    columns = {
        "ts_start": pa.array(cols["first"].astype(np.int64) * 1000, pa.timestamp("us", "UTC")),
        "ts_end": pa.array(cols["last"].astype(np.int64) * 1000, pa.timestamp("us", "UTC")),
        "src_addr": src,
        "dst_addr": dst,
        "src_port": pa.array(cols["src_port"].astype(np.int32)),
        "dst_port": pa.array(cols["dst_port"].astype(np.int32)),
        "proto": pa.array(proto),
        "packets": pa.array(cols["packets"].astype(np.int64)),
        "bytes": pa.array(cols["bytes"].astype(np.int64)),
        "tcp_flags": pa.array(flags),
        "ip_version": pa.array(np.where(cols["src_is6"], 6, 4).astype(np.int8)),
        "exporter": router,
        "input_if": pa.array(cols["input_if"].astype(np.int32)),
        "output_if": pa.array(cols["output_if"].astype(np.int32)),
    }
    arrays = [columns[f.name] if f.name in columns else null_column(n, f.type) for f in FLOWS_TEXT_DICTIONARY]
    schema = pa.schema(
        [pa.field(f.name, a.type, f.nullable) for f, a in zip(FLOWS_TEXT_DICTIONARY, arrays, strict=True)]
    )
    return pa.Table.from_arrays(arrays, schema=schema), rejects


_REJECT_FIELDS = ("offset", "reason", "detail", "source")


def _empty_rejects() -> pa.Table:
    return pa.schema([REJECTS.field(f) for f in _REJECT_FIELDS]).empty_table()


def rejects_table(rows: list[tuple[int, str, str]], source: str) -> pa.Table:
    """(file offset of the block, reason, detail) rows -> rejects (schema.REJECTS columns)."""
    if not rows:
        return _empty_rejects()
    offsets, reasons, details = zip(*rows, strict=True)
    return pa.table(
        [list(offsets), list(reasons), [d[:200] for d in details], [source] * len(rows)],
        schema=pa.schema([REJECTS.field(f) for f in _REJECT_FIELDS]),
    )


# ---- exporter and sampler records ------------------------------------------------------------------------------


def _exporter_record(raw: bytes, exporters: Exporters) -> None:
    """ExporterInfo (type 7, 32 bytes): version, ip_addr_t (v4 in bytes 8..11), sa_family, sysid, id."""
    if len(raw) < 32:
        return
    family = int.from_bytes(raw[24:26], "little")
    sysid = int.from_bytes(raw[26:28], "little")
    if family == 2:  # AF_INET
        address = str(ipaddress.IPv4Address(int.from_bytes(raw[16:20], "little")))
    elif family == 10:  # AF_INET6: two host-order uint64 halves
        high = int.from_bytes(raw[8:16], "little")
        low = int.from_bytes(raw[16:24], "little")
        address = str(ipaddress.IPv6Address(high << 64 | low))
    else:
        return
    if address not in exporters.out and len(exporters.out) >= DEFAULT_LIMITS.exporters:
        exporters.ignored += 1  # (a file naming 200,000 exporters: their samplers are not kept either)
        return
    if len(exporters.by_sysid) < DEFAULT_LIMITS.exporters or sysid in exporters.by_sysid:
        exporters.by_sysid[sysid] = address
    exporters.out.setdefault(address, {"sysid": sysid, "sampling": []})


def _sampler_record(raw: bytes, exporters: Exporters) -> None:
    """SamplerInfo (type 15): 24 bytes (sysid, algorithm, id, packet interval, packet space) or the older 16
    (id, interval, algorithm, sysid); the sampling interval is (packets + space) / packets."""
    if len(raw) == 24:
        sysid = int.from_bytes(raw[4:6], "little")
        packets = int.from_bytes(raw[16:20], "little")
        space = int.from_bytes(raw[20:24], "little")
    elif len(raw) == 16:
        sysid = int.from_bytes(raw[14:16], "little")
        packets, space = 1, max(int.from_bytes(raw[8:12], "little") - 1, 0)
    else:
        return
    address = exporters.by_sysid.get(sysid)
    if address is None or packets == 0:
        return
    interval = (packets + space) // packets
    sampling = exporters.out[address]["sampling"]
    if isinstance(sampling, list) and interval not in sampling and len(sampling) < 16:
        sampling.append(interval)


# ---- the reader ----------------------------------------------------------------------------------------------


def _walk_block(
    data: memoryview | bytes,
    limit: int,
    records: int,
    block_offset: int,
    number: int,
    columns: _Columns,
    infos: list[tuple[int, bytes]],
    layouts: dict[bytes, _Layout],
    copy: bool = False,
    budget: int | None = None,
) -> tuple[int, list[tuple[int, str, str]]]:
    """Read the records of one uncompressed block into `columns` (views into `data`, or copies of the records
    if `copy` (an LZ4 block comes in a 5 MiB buffer, mostly unused) or where they fill less than an eighth of it) and its exporter and sampler records into
    `infos` (Exporters.apply). `budget`: the steps walked in Python it may take (STEPS_PER_BLOCK, ...); the
    rest of the block is a reject past it. Returns (bytes used, rejects)."""
    buf = np.frombuffer(data, np.uint8, count=min(limit, len(data)))
    limit = len(buf)
    budget = STEPS_PER_BLOCK + STEPS_PER_BYTE * limit if budget is None else budget
    at = 0
    done = 0
    steps = 0
    rejects: list[tuple[int, str, str]] = []
    while done < records:
        steps += 1
        if steps > budget:
            rejects.append(
                (
                    block_offset,
                    "nfcapd block too costly",
                    f"block {number}: {records - done} of {records} records not read (more than {budget} "
                    "records walked one by one: records that are no flows, or flows of ever new layouts)",
                )
            )
            break
        if at + 4 > limit:
            rejects.append(
                (
                    block_offset,
                    "nfcapd block sizes lie",
                    f"block {number}: {records - done} of {records} records announced past its {limit} bytes",
                )
            )
            break
        kind = int(buf[at]) | int(buf[at + 1]) << 8
        size = int(buf[at + 2]) | int(buf[at + 3]) << 8
        if size < 4 or at + size > limit:
            rejects.append(
                (
                    block_offset,
                    "bad nfcapd record size",
                    f"block {number}: record {done} of type {kind} has "
                    f"size {size} at byte {at} of {limit}; {records - done} records skipped",
                )
            )
            break
        if kind == V3_RECORD:
            if size < V3_HEADER_BYTES:
                rejects.append(
                    (block_offset, "bad nfcapd record", f"block {number}: V3 record of {size} bytes")
                )
                at += size
                done += 1
                continue
            key = bytes(buf[at : at + 6])  # type, size, element count: then the element headers are checked
            layout = layouts.get(key)
            if layout is None or layout.size != size or not (buf[at + layout.check] == layout.expect).all():
                steps += int(buf[at + 4]) | int(buf[at + 5]) << 8  # its elements, walked in Python
                if steps > budget:
                    continue  # (the reject above, at the top of the loop)
                layout, problem = _element_layout(buf, at, size)
                if layout is None:
                    rejects.append(
                        (block_offset, "bad nfcapd record", f"block {number} record {done}: {problem}")
                    )
                    at += size
                    done += 1
                    continue
                if len(layouts) < 4096 and len(layout.check) <= LAYOUT_CACHE_CHECKS:
                    layouts[key] = layout
            most = min(records - done, (limit - at) // size)
            run = _run_length(buf, at, size, most, layout.check, layout.expect)
            arr = np.frombuffer(buf, layout.dtype, count=run, offset=at)
            # a view keeps the whole decompressed block alive until the batch is written: copied when the records
            # are a small part of it (a BZ2 block announcing one record and inflating to the 5 MiB cap kept 5 MiB
            # per record: a 1 MB file of 150 such blocks peaked at 930 MB; session-27 review)
            view = not copy and run * size * 8 >= len(data)
            columns.add(arr if view else arr.copy(), layout, block_offset)
            at += run * size
            done += run
            continue
        if kind in (EXPORTER_INFO, SAMPLER_INFO):
            infos.append((kind, bytes(buf[at : at + size])))
            at += size
            done += 1
            continue
        # other types (exporter stats, nbar, interface/vrf names, legacy): no flows; nfdump skips them too. A
        # run of them of one type and size is stepped over at once
        most = min(records - done, (limit - at) // size)
        run = _run_length(buf, at, size, most, _HEADER, buf[at : at + 4])
        at += run * size
        done += run
    return at, rejects


class Span(NamedTuple):
    """One data block whose header holds and whose data is all in the file."""

    number: int
    offset: int  # file offset of the block header (where rejects say the problem was)
    size: int  # bytes of (compressed) data after the header
    records: int
    kind: int


@dataclass(frozen=True)
class BlockRange:
    """Consecutive blocks of one nfcapd file (iter_ranges): what a decode worker reads with read_range."""

    path: str
    source: str
    compression: int
    spans: tuple[Span, ...]


@dataclass
class RangeRead:
    """What read_range found besides the flows: rejects (block offsets), the exporter and sampler records in
    file order (Exporters.apply), flows per exporter (counted before the lake's time-window check), and the
    rows that check turned into rejects (filled in by the worker that writes the flows)."""

    rejects: pa.Table
    infos: list[tuple[int, bytes]]
    flows_by_exporter: dict[str | None, int]
    implausible: pa.Table | None = None


def _open(handle: BinaryIO, source: str) -> tuple[int, int] | pa.Table:
    """(compression, number of blocks) from the file header, or the reject of a file too short for one."""
    header = read_header(handle.read(FILE_HEADER.itemsize))
    if header is None:
        return rejects_table([(0, "truncated nfcapd file", "shorter than its 40-byte header")], source)
    return int(header["compression"]), int(header["num_blocks"])


class Skipped(NamedTuple):
    """A block stepped over with its reject (its size holds and its data is in the file, but it announces no
    record, or more than a block may hold): the walk goes on after it."""

    offset: int
    reason: str
    detail: str


def _spans(handle: BinaryIO, blocks: int) -> Iterator[Span | Skipped | tuple[int, str, str]]:
    """The data blocks from their headers only (a read and a seek each). A block that cannot be delimited
    (header cut short, a size of 0, data past the end of the file) ends the walk with its reject (offset,
    reason, detail): nothing after it can be found. One that can but cannot be read (no records announced,
    larger than 5 MiB) is Skipped: the blocks after it land (nfdump 1.7.1 stops there)."""
    file_size = os.fstat(handle.fileno()).st_size
    offset = FILE_HEADER.itemsize
    runs = 0
    run: list[Any] = []  # the run of blocks being stepped over: [offset, first number, count, detail]

    def stepped_over() -> Iterator[Skipped]:
        # a run of such blocks is ONE reject (200,000 empty 13-byte blocks made as many rejects: minutes, GBs)
        if run:
            first, number, count, detail = run
            if count > 1:
                detail = (
                    f"blocks {number}..{number + count - 1}: {count} announce no record or more than 5 MiB"
                )
            yield Skipped(first, "nfcapd block sizes lie", detail)
            run.clear()

    for number in range(blocks):
        handle.seek(offset)
        raw = handle.read(BLOCK_HEADER.itemsize)
        if len(raw) < BLOCK_HEADER.itemsize:
            what = (
                f"ends after {number} of {blocks} blocks" if not raw else f"block {number}: header cut short"
            )
            yield from stepped_over()
            yield (offset, "truncated nfcapd file", what)
            return
        block = np.frombuffer(raw, BLOCK_HEADER, count=1)[0]
        size, records, kind = int(block["size"]), int(block["records"]), int(block["type"])
        have = min(size, file_size - offset - BLOCK_HEADER.itemsize)
        if size <= 0 or have <= 0:
            yield from stepped_over()
            yield (offset, "nfcapd block sizes lie", f"block {number}: {records} records in {size} bytes")
            return
        if have < size:
            yield from stepped_over()
            yield (offset, "truncated nfcapd file", f"block {number}: {have} of {size} bytes")
            return
        if size > MAX_BLOCK_BYTES or not records:
            if not run:
                runs += 1
                if runs > MAX_SKIPPED_RUNS:  # (each run is a reject: their number is what costs)
                    yield (
                        offset,
                        "nfcapd block sizes lie",
                        f"block {number}: more than {MAX_SKIPPED_RUNS} runs of blocks that announce no record or "
                        "more than 5 MiB: the rest of the file is not read",
                    )
                    return
                run.extend([offset, number, 0, f"block {number}: {records} records in {size} bytes"])
            run[2] += 1
        else:
            yield from stepped_over()
            yield Span(number, offset, size, records, kind)
        offset += BLOCK_HEADER.itemsize + size
    yield from stepped_over()


def _read_span(
    fd: int,
    span: Span,
    compression: int,
    columns: _Columns,
    infos: list[tuple[int, bytes]],
    layouts: dict[bytes, _Layout],
) -> list[tuple[int, str, str]]:
    """One block's records into `columns` (read at its offset: blocks are independent); its rejects."""
    if span.kind == DATA_BLOCK_TYPE_4:  # array records: nfdump skips them too
        return []
    if span.kind != DATA_BLOCK_TYPE_3:
        return [(span.offset, "unknown nfcapd block type", f"block {span.number}: type {span.kind}")]
    data = os.pread(fd, span.size, span.offset + BLOCK_HEADER.itemsize)
    if len(data) < span.size:  # the file shrank after its blocks were walked
        return [
            (span.offset, "truncated nfcapd file", f"block {span.number}: {len(data)} of {span.size} bytes")
        ]
    return _read_block(data, compression, span.records, span.offset, span.number, columns, infos, layouts)


def iter_nffile(
    path: Path | str,
    source: str | None = None,
    exporters: Exporters | None = None,
    batch_rows: int = 1 << 20,
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Batches of (flows, rejects) of one nfcapd file (check native_problem first), ~`batch_rows` records
    each: memory stays flat. A truncated file, lying sizes, corrupt or oversized compressed data become
    rejects naming the block (its file offset) and what was wrong; every block before and after lands."""
    path = Path(path)
    source = str(path) if source is None else source
    exporters = Exporters() if exporters is None else exporters
    columns = _Columns()
    infos: list[tuple[int, bytes]] = []
    layouts: dict[bytes, _Layout] = {}
    with open(path, "rb") as handle:
        opened = _open(handle, source)
        if isinstance(opened, pa.Table):
            yield FLOWS_TEXT_DICTIONARY.empty_table(), opened
            return
        compression, blocks = opened
        for span in _spans(handle, blocks):
            if isinstance(span, Skipped):
                yield from _emit(columns, [tuple(span)], source)
                continue
            if not isinstance(span, Span):
                yield from _emit(columns, [span], source)
                return
            rejects = _read_span(handle.fileno(), span, compression, columns, infos, layouts)
            exporters.apply(infos)
            if rejects or columns.rows >= batch_rows:
                yield from _emit(columns, rejects, source)
        if columns.rows:
            yield from _emit(columns, [], source)


def iter_ranges(
    path: Path | str, source: str, parts: int = 4, records: int = RANGE_RECORDS
) -> Iterator[BlockRange | pa.Table]:
    """The blocks of one nfcapd file (check native_problem first) in ranges for decode workers (read_range),
    found from the block headers alone (a read and a seek per block, all walked first): no record bytes pass
    between processes. A range holds ~`records` records, fewer in a smaller file, so that it still splits into
    about `parts` ranges (whole blocks: at least one each). A file or block that cannot be delimited ends the
    ranges with its rejects (a table), as in iter_nffile."""
    # The block headers are walked once and never all held: a file of tiny blocks (13 bytes each: 5 M blocks
    # in 64 MB) held ~160 bytes per block here and in the ranges sent. The first blocks wait until it is known
    # whether the file is big enough for ranges of `records` (it is as soon as they hold `parts` such ranges).
    with open(path, "rb") as handle:
        opened = _open(handle, source)
        if isinstance(opened, pa.Table):
            yield opened
            return
        compression, blocks = opened
        walk = _spans(handle, blocks)
        head: list[Span | Skipped | tuple[int, str, str]] = []
        total = 0
        for span in walk:
            head.append(span)
            if isinstance(span, Skipped):
                if len(head) >= parts * RANGE_BLOCKS:
                    break
                continue
            if not isinstance(span, Span):
                break
            total += span.records
            if total >= parts * records or len(head) >= parts * RANGE_BLOCKS:
                break
        target = records if total >= parts * records else max(1, min(records, -(-total // max(parts, 1))))
        taken: list[Span] = []
        count = 0
        for span in itertools.chain(head, walk):
            if isinstance(span, Skipped):  # (its reject lands apart: ranges() in ingest/flows.py)
                yield rejects_table([tuple(span)], source)
                continue
            if not isinstance(span, Span):  # the walk ends here: the blocks before it, then its reject
                if taken:
                    yield BlockRange(str(path), source, compression, tuple(taken))
                    taken = []
                yield rejects_table([span], source)
                break
            taken.append(span)
            count += span.records
            if count >= target or len(taken) >= RANGE_BLOCKS:
                yield BlockRange(str(path), source, compression, tuple(taken))
                taken, count = [], 0
        if taken:
            yield BlockRange(str(path), source, compression, tuple(taken))


def read_range(blocks: BlockRange, ipv4_as_integers: bool = False) -> tuple[pa.Table, RangeRead]:
    """The flows of a range of blocks (source column set) and what else was found (RangeRead): the same rows
    and rejects iter_nffile gives for those blocks. `ipv4_as_integers`: as netflow.decode_walked's."""
    columns = _Columns()
    infos: list[tuple[int, bytes]] = []
    layouts: dict[bytes, _Layout] = {}
    rejects: list[tuple[int, str, str]] = []
    fd = os.open(blocks.path, os.O_RDONLY)
    try:
        for span in blocks.spans:
            rejects += _read_span(fd, span, blocks.compression, columns, infos, layouts)
    finally:
        os.close(fd)
    flows, row_rejects = FLOWS_TEXT_DICTIONARY.empty_table(), _empty_rejects()
    if columns.rows:
        flows, row_rejects = _flows(columns.take(), blocks.source, ipv4_as_integers)
    n = flows.num_rows
    source = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([blocks.source]))
    flows = flows.set_column(flows.schema.get_field_index("source"), "source", source)
    counts = {v["values"]: v["counts"] for v in flows.column("exporter").value_counts().to_pylist()}
    found = pa.concat_tables([rejects_table(rejects, blocks.source), row_rejects])
    return flows, RangeRead(found, infos, counts)


def _read_block(
    data: bytes,
    compression: int,
    records: int,
    offset: int,
    number: int,
    columns: _Columns,
    infos: list[tuple[int, bytes]],
    layouts: dict[bytes, _Layout],
) -> list[tuple[int, str, str]]:
    plain, limit, problem = _decompress(compression, data)
    if plain is None:
        return [(offset, "corrupt nfcapd block", f"block {number}: {problem}")]
    before, infos_before = columns.rows, len(infos)
    lz4 = compression == LZ4_COMPRESSED
    budget = STEPS_PER_BLOCK + STEPS_PER_BYTE * len(data)  # (per byte as stored: a bomb buys no more)
    used, rejects = _walk_block(plain, limit, records, offset, number, columns, infos, layouts, lz4, budget)
    if compression == LZ4_COMPRESSED and not _lz4_holds(data, used):
        # records announced past the real data (walked in the tail of pyarrow's buffer): walk again up to
        # where the data really ends, so that the records inside it land (the block's count lies, not them)
        columns.drop_since(before)
        del infos[infos_before:]
        real = _lz4_length(data, used)
        used, rejects = _walk_block(
            plain, real, records, offset, number, columns, infos, layouts, lz4, budget
        )
    return rejects


def _lz4_length(data: bytes, over: int) -> int:
    """The length an LZ4 block decompresses to, known to be below `over`: the smallest output size it
    decompresses into (a binary search, ~22 decompressions at most; only for a block whose count lies)."""
    low, high = 0, over - 1  # decompressing into `high` bytes succeeds (_lz4_holds said so)
    while low < high:
        mid = (low + high) // 2
        try:
            pa.Codec("lz4_raw").decompress(data, decompressed_size=mid)
        except OSError:
            low = mid + 1
        else:
            high = mid
    return low


def _emit(
    columns: _Columns, rejects: list[tuple[int, str, str]], source: str
) -> Iterator[tuple[pa.Table, pa.Table]]:
    flows = FLOWS_TEXT_DICTIONARY.empty_table()
    row_rejects = _empty_rejects()
    if columns.rows:
        flows, row_rejects = _flows(columns.take(), source)
    if flows.num_rows or rejects or row_rejects.num_rows:
        yield flows, pa.concat_tables([rejects_table(rejects, source), row_rejects])


def read_nffile(path: Path | str, source: str | None = None) -> tuple[pa.Table, pa.Table, Exporters]:
    """iter_nffile collected: (flows, rejects, exporters)."""
    exporters = Exporters()
    parts = list(iter_nffile(path, source, exporters))
    flows = pa.concat_tables([FLOWS_TEXT_DICTIONARY.empty_table(), *(p[0] for p in parts)])
    rejects = pa.concat_tables([_empty_rejects(), *(p[1] for p in parts)])
    return flows, rejects, exporters
