"""nfdump's output -> flow records (schema.FLOWS) plus rejects (schema.REJECTS columns), vectorised.

- `read_nfdump_csv(path)`: the text of `nfdump -o csv` (nfdump 1.7.1: optional header line `ts,te,td,sa,...`,
  one 48-field line per flow, a `Summary` trailer unless `-q`). Times there are local time of the machine that
  ran nfdump, whole seconds only; pass `tz=` if it was not UTC (run `TZ=UTC nfdump ...` to be safe).
- `iter_nfcapd(path)`: nfcapd files natively (tracepipe.ingest.nffile) when they are nfdump 1.7 layout 2, else
  (or for a directory) through the nfdump binary's `fmt:` output, which keeps milliseconds; `read_nfcapd` is
  that nfdump path alone (the tests' oracle).
Both map nfdump's text conventions back to numbers: protocol names (nfdump's own table), flag strings
("...AP.SF"), ICMP "type.code" -> type*256+code in dst_port.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tracepipe.errors import EnvironmentProblem, InputError
from tracepipe.ingest import nffile
from tracepipe.ingest.delimited import (
    address_text,
    dictionary_encode,
    empty_rejects,
    file_ranges,
    iter_file_blocks,
    line_rejects,
    read_block,
    rejects_table,
)
from tracepipe.lake import conform, implausible_detail, plausible_times
from tracepipe.limits import DEFAULT as DEFAULT_LIMITS
from tracepipe.limits import LineBlock, iter_line_blocks, too_long_rejects
from tracepipe.schema import FLOWS, TS
from tracepipe.tools import tool_path

# nfdump 1.7.1 src/lib/output_util.c protoList: what ProtoString() prints for protocol numbers 0..137; any other
# number is printed as a number. "IDPR" is printed for both 35 and 38; we read it back as 35.
# fmt: off
NFDUMP_PROTOCOLS = (
    "0", "ICMP", "IGMP", "GGP", "IPIP", "ST", "TCP", "CBT", "EGP", "IGP", "BBN", "NVPII", "PUP", "ARGUS",
    "ENCOM", "XNET", "CHAOS", "UDP", "MUX", "DCN", "HMP", "PRM", "XNS", "Trnk1", "Trnk2", "Leaf1", "Leaf2",
    "RDP", "IRTP", "ISO-4", "NETBK", "MFESP", "MEINP", "DCCP", "3PC", "IDPR", "XTP", "DDP", "IDPR", "TP++",
    "IL", "IPv6", "SDRP", "Rte6", "Frag6", "IDRP", "RSVP", "GRE", "MHRP", "BNA", "ESP", "AH", "INLSP", "SWIPE",
    "NARP", "MOBIL", "TLSP", "SKIP", "ICMP6", "NOHE6", "OPTS6", "HOST", "CFTP", "NET", "SATNT", "KLAN", "RVD",
    "IPPC", "FS", "SATM", "VISA", "IPCV", "CPNX", "CPHB", "WSN", "PVP", "BSATM", "SUNND", "WBMON", "WBEXP",
    "ISOIP", "VMTP", "SVMTP", "VINES", "TTP", "NSIGP", "DGP", "TCF", "EIGRP", "OSPF", "S-RPC", "LARP", "MTP",
    "AX.25", "OS", "MICP", "SCCSP", "ETHIP", "ENCAP", "99", "GMTP", "IFMP", "PNNI", "PIM", "ARIS", "SCPS",
    "QNX", "A/N", "IPcmp", "SNP", "CpqPP", "IPXIP", "VRRP", "PGM", "0hop", "L2TP", "DDX", "IATP", "STP", "SRP",
    "UTI", "SMP", "SM", "PTP", "ISIS4", "FIRE", "CRTP", "CRUDP", "128", "IPLT", "SPS", "PIPE", "SCTP", "FC",
    "134", "MHEAD", "UDP-L", "MPLS",
)
# fmt: on
_PROTO_NAMES: list[str] = []
_PROTO_NUMBERS: list[int] = []
for _number, _name in enumerate(NFDUMP_PROTOCOLS):
    if _name not in _PROTO_NAMES:
        _PROTO_NAMES.append(_name)
        _PROTO_NUMBERS.append(_number)

# nfdump 1.7.1 `-o csv` columns (output_csv.c); the header line, when present, names them the same way.
# fmt: off
CSV_COLUMNS = (
    "ts", "te", "td", "sa", "da", "sp", "dp", "pr", "flg", "fwd", "stos", "ipkt", "ibyt", "opkt", "obyt", "in",
    "out", "sas", "das", "smk", "dmk", "dtos", "dir", "nh", "nhb", "svln", "dvln", "ismc", "odmc", "idmc",
    "osmc", "mpls1", "mpls2", "mpls3", "mpls4", "mpls5", "mpls6", "mpls7", "mpls8", "mpls9", "mpls10", "cl",
    "sl", "al", "ra", "eng", "exid", "tr",
)
# fmt: on
CSV_HEADER_PREFIX = b"ts,te,td,sa,da,sp,dp,pr,"

# What read_nfcapd asks nfdump to print: ms times, raw numbers (-N), one record per line.
NFDUMP_FMT = "fmt:%ts|%te|%sa|%da|%sp|%dp|%pr|%pkt|%byt|%flg|%ra|%in|%out"
_FMT_COLUMNS = ("ts", "te", "sa", "da", "sp", "dp", "pr", "ipkt", "ibyt", "flg", "ra", "in", "out")

_TCP_FLAG_BITS = (128, 64, 32, 16, 8, 4, 2, 1)  # C E U A P R S F, the order FlagsString() prints them
_FLAGS_RE = r"^[C.][E.][U.][A.][P.][R.][S.][F.]$"
_TIME_RE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{3})?$"
_UINT_RE = r"^\d{1,18}$"  # any count below 10**18 (a 10 GB flow has 11 digits); int64 holds it


def looks_like_nfdump_csv(head: bytes) -> bool:
    """True if the first bytes of a file are nfdump `-o csv` output (with or without its header line).

    Rule: it starts with the header `ts,te,td,sa,da,sp,dp,pr,`, or its first line has 48 comma-separated
    fields and starts with `YYYY-MM-DD hh:mm:ss,`. A pcap/pcapng file never starts like that.
    """
    if head.startswith(CSV_HEADER_PREFIX):
        return True
    # `nfdump -q -o csv` of a file of no flows prints only "No matching flows" (a quiet slot, often the first
    # of a day's outputs concatenated): read past such lines
    lines = head.split(b"\n")
    said = 0
    while len(lines) > 1 and lines[0].strip() in (b"", NO_FLOWS.encode()):
        said += lines.pop(0).strip() != b""
    if said and (len(lines) == 1 and lines[0].strip() in (b"", NO_FLOWS.encode())):
        return True  # (nothing else: an empty slot)
    head = b"\n".join(lines)
    if head.startswith(CSV_HEADER_PREFIX):
        return True
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    if len(first) < 20 or first.count(b",") != len(CSV_COLUMNS) - 1:
        return False
    stamp = first[:20]
    return (
        stamp[4:5] == b"-"
        and stamp[7:8] == b"-"
        and stamp[10:11] == b" "
        and stamp[13:14] == b":"
        and stamp[19:20] == b","
        and stamp[:4].isdigit()
    )


# ---- vectorised conversions of nfdump's text ------------------------------------------------------------------


def _per_unique(convert, column: pa.Array, *args) -> tuple[pa.Array, pa.Array]:
    """Run a text conversion on the distinct values only and spread the result back (nfdump output repeats
    itself a lot: times in seconds, flag strings, protocols, ports)."""
    encoded = dictionary_encode(column)
    values, ok = convert(encoded.dictionary, *args)
    if encoded.null_count == 0 and ok.null_count == 0 and pc.all(ok).as_py():  # the common case: all good
        return pc.take(values, encoded.indices), pa.array(np.ones(len(encoded), dtype=bool))
    return pc.take(values, encoded.indices), pc.fill_null(pc.take(ok, encoded.indices), False)


def _trim(column: pa.Array) -> pa.Array:
    return pc.utf8_trim_whitespace(column)


def _uint(column: pa.Array | pa.ChunkedArray, target: pa.DataType) -> tuple[pa.Array, pa.Array]:
    """Decimal text -> integers; returns (values with 0 where invalid, valid mask). Runs on every row: when all
    are 1-18 ASCII digits (what nfdump prints; _UINT_RE) that is one check and one cast of the column (cheaper than
    hashing it to convert the distinct values); else each row is trimmed and matched as before."""
    plain = pc.and_(pc.ascii_is_decimal(column), pc.less_equal(pc.binary_length(column), 18))
    if len(column) and pc.all(plain).as_py():  # the same rows as _UINT_RE after trimming: all of them
        ok, values = plain, pc.cast(column, pa.int64())
    else:
        text = _trim(column)
        ok = pc.fill_null(pc.match_substring_regex(text, _UINT_RE), False)
        values = pc.cast(pc.if_else(ok, text, "0"), pa.int64())
    if target != pa.int64():
        limit = 2**31 - 1 if target == pa.int32() else 2**15 - 1
        ok = pc.and_(ok, pc.less_equal(values, limit))
        values = pc.if_else(ok, values, 0)
    return pc.cast(values, target), ok


def tcp_flags_from_text(column: pa.Array) -> tuple[pa.Array, pa.Array]:
    """nfdump's 8-character flag strings ("...AP.SF") -> int16 bit masks; returns (values, valid mask)."""
    text = _trim(column)
    ok = pc.fill_null(pc.match_substring_regex(text, _FLAGS_RE), False)
    text = pc.if_else(ok, text, "........")
    total = pa.array([0] * len(text), pa.int64())
    for position, bit in enumerate(_TCP_FLAG_BITS):
        char = pc.utf8_slice_codeunits(text, position, position + 1)
        total = pc.add(total, pc.multiply(pc.cast(pc.not_equal(char, "."), pa.int64()), bit))
    return pc.cast(total, pa.int16()), ok


def proto_from_text(column: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Protocol as nfdump prints it (name from its table, or a number) -> int16; returns (values, valid mask)."""
    text = _trim(column)
    index = pc.index_in(text, value_set=pa.array(_PROTO_NAMES))
    by_name = pc.take(pa.array(_PROTO_NUMBERS, pa.int64()), index)
    numeric, numeric_ok = _uint(text, pa.int64())
    numeric_ok = pc.and_(numeric_ok, pc.less_equal(numeric, 255))
    values = pc.if_else(pc.is_valid(by_name), by_name, numeric)
    ok = pc.or_(pc.is_valid(by_name), numeric_ok)
    return pc.cast(pc.if_else(ok, values, 0), pa.int16()), ok


def dst_port_from_text(column: pa.Array) -> tuple[pa.Array, pa.Array]:
    """`%dp` text -> int32: a port, or ICMP "type.code" folded into type*256+code as NetFlow carries it."""
    port, port_ok = _uint(column, pa.int64())
    if pc.all(port_ok).as_py():  # no ICMP "type.code" among them: ports only, one cast of the column
        ok = pc.less_equal(port, 65535)
        return pc.cast(pc.if_else(ok, port, 0), pa.int32()), ok
    return _per_unique(_port_or_icmp, column)


def _port_or_icmp(column: pa.Array) -> tuple[pa.Array, pa.Array]:
    port, port_ok = _uint(column, pa.int64())
    text = _trim(column)
    icmp = pc.fill_null(pc.match_substring_regex(text, r"^\d{1,3}\.\d{1,3}$"), False)
    parts = pc.split_pattern(pc.if_else(icmp, text, "0.0"), ".")
    icmp_type, type_ok = _uint(pc.list_element(parts, 0), pa.int64())
    icmp_code, code_ok = _uint(pc.list_element(parts, 1), pa.int64())
    folded = pc.add(pc.multiply(icmp_type, 256), icmp_code)
    values = pc.if_else(icmp, folded, port)
    ok = pc.or_(pc.and_(icmp, pc.and_(type_ok, code_ok)), pc.and_(pc.invert(icmp), port_ok))
    ok = pc.and_(ok, pc.less_equal(values, 65535))
    return pc.cast(pc.if_else(ok, values, 0), pa.int32()), ok


def _timestamps(column: pa.Array, tz: str) -> tuple[pa.Array, pa.Array]:
    """ "YYYY-MM-DD hh:mm:ss[.mmm]" in local time `tz` -> timestamp[us, UTC]; returns (values, valid mask)."""
    text = _trim(column)
    ok = pc.fill_null(pc.match_substring_regex(text, _TIME_RE), False)
    text = pc.if_else(ok, text, "1970-01-01 00:00:00.000")
    seconds_text = pc.utf8_slice_codeunits(text, 0, 19)
    seconds = pc.strptime(seconds_text, format="%Y-%m-%d %H:%M:%S", unit="us", error_is_null=True)
    ok = pc.and_(ok, pc.is_valid(seconds))
    ms_text = pc.utf8_slice_codeunits(text, 20, 23)
    ms_text = pc.if_else(pc.equal(pc.utf8_length(ms_text), 3), ms_text, "000")
    micros = pc.multiply(pc.cast(ms_text, pa.int64()), 1000)
    naive = pc.cast(pc.add(pc.cast(pc.fill_null(seconds, 0), pa.int64()), micros), pa.timestamp("us"))
    if tz.upper() == "UTC":
        values = pc.cast(naive, TS)
    else:
        values = pc.cast(
            pc.assume_timezone(naive, timezone=tz, ambiguous="earliest", nonexistent="earliest"), TS
        )
    return values, ok


_addresses = address_text


def _flows_from_columns(
    fields: dict[str, pa.Array], source: str, tz: str, window: bool = True
) -> tuple[pa.Table, pa.Array, pa.Array, pa.Array]:
    """Common tail of both readers: text columns -> (FLOWS table of all rows, valid mask, reason per row,
    detail per row: `field=value` of the first field that did not parse)."""
    checks: list[tuple[str, pa.Array]] = []
    ts_start, ok = _per_unique(_timestamps, fields["ts"], tz)
    checks.append(("bad start time", ok))
    ts_end, ok = _per_unique(_timestamps, fields["te"], tz)
    checks.append(("bad end time", ok))
    src, src_version, ok = _addresses(fields["sa"], dictionary=True)
    checks.append(("bad source address", ok))
    dst, _, ok = _addresses(fields["da"], dictionary=True)
    checks.append(("bad destination address", ok))
    src_port, ok = _uint(fields["sp"], pa.int32())
    ok = pc.and_(ok, pc.less_equal(src_port, 65535))  # (99999999 fits an int32: it is no port)
    checks.append(("bad source port", ok))
    dst_port, ok = dst_port_from_text(fields["dp"])
    checks.append(("bad destination port", ok))
    proto, ok = _per_unique(proto_from_text, fields["pr"])
    checks.append(("bad protocol", ok))
    packets, ok = _uint(fields["ipkt"], pa.int64())
    checks.append(("bad packet count", ok))
    octets, ok = _uint(fields["ibyt"], pa.int64())
    checks.append(("bad byte count", ok))
    flags, ok = _per_unique(tcp_flags_from_text, fields["flg"])
    checks.append(("bad tcp flags", ok))
    exporter, _, ok = _addresses(fields["ra"], dictionary=True)
    checks.append(("bad exporter address", ok))
    input_if, ok = _uint(fields["in"], pa.int32())
    checks.append(("bad input interface", ok))
    output_if, ok = _uint(fields["out"], pa.int32())
    checks.append(("bad output interface", ok))

    # TCP flags of TCP records only, as nfdump's binary files and its `fmt:` output give them: its `-o csv` prints
    # the field of any record (a UDP record's flags byte landed as tcp_flags 27 from the CSV, 0 from the file)
    flags = pc.if_else(pc.fill_null(pc.equal(proto, 6), True), flags, pa.scalar(0, flags.type))
    n = len(ts_start)
    valid = pa.array(np.ones(n, dtype=bool))
    for _, ok in checks:
        valid = pc.and_(valid, ok)
    reason = pa.nulls(n, pa.string())
    detail = pa.nulls(n, pa.string())
    if n and not pc.all(valid).as_py():  # name the first field that failed, on the bad rows only
        bad = pc.invert(valid)
        bad_reason = pa.nulls(pc.sum(pc.cast(bad, pa.int64())).as_py(), pa.string())
        bad_detail = bad_reason
        for (text, ok), name in zip(checks, _CHECKED_FIELDS, strict=True):
            first = pc.and_(pc.is_null(bad_reason), pc.invert(ok.filter(bad)))
            bad_reason = pc.if_else(first, text, bad_reason)
            value = pc.fill_null(pc.cast(fields[name], pa.string()).filter(bad), "")
            bad_detail = pc.if_else(first, pc.binary_join_element_wise(name, value, "="), bad_detail)
        # spread back: rows that are valid keep null
        positions = pc.subtract(pc.cumulative_sum(pc.cast(bad, pa.int64())), 1)
        reason = pc.if_else(
            bad, pc.take(bad_reason, pc.if_else(bad, positions, 0)), pa.scalar(None, pa.string())
        )
        detail = pc.if_else(
            bad, pc.take(bad_detail, pc.if_else(bad, positions, 0)), pa.scalar(None, pa.string())
        )
    # a start outside units.time_window is rejected here, with its line (the lake's own check, split_implausible,
    # has no line to name for a CSV row)
    inside = plausible_times(ts_start)
    outside = pc.and_(valid, pc.invert(inside))
    if window and n and pc.any(outside).as_py():
        valid = pc.and_(valid, inside)
        reason = pc.if_else(outside, "time outside plausible window", reason)
        detail = pc.if_else(outside, implausible_detail(ts_start, "ts_start"), detail)
    table = pa.table(  # the FLOWS columns nfdump's text has; conform adds the others as nulls
        {
            "ts_start": ts_start,
            "ts_end": ts_end,
            "src_addr": src,
            "dst_addr": dst,
            "src_port": src_port,
            "dst_port": dst_port,
            "proto": proto,
            "packets": packets,
            "bytes": octets,
            "tcp_flags": flags,
            "ip_version": src_version,
            "exporter": exporter,
            "input_if": input_if,
            "output_if": output_if,
            "source": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([source])),
        }
    )
    return table, valid, reason, detail


_NEEDED = ("ts", "te", "sa", "da", "sp", "dp", "pr", "ipkt", "ibyt", "flg", "ra", "in", "out")
_CHECKED_FIELDS = ("ts", "te", "sa", "da", "sp", "dp", "pr", "ipkt", "ibyt", "flg", "ra", "in", "out")


Source = bytes | str | tuple[str, int, int] | BinaryIO  # text, a file, a file's byte range, a pipe


def _chunks(source: Source, block_size: int, counters: dict[str, int] | None = None) -> Iterator[LineBlock]:
    """Whole lines, about `block_size` bytes at a time, from bytes, a file path, a (path, start, end) range of
    one, or an open binary stream (a pipe from nfdump): memory stays flat; lines longer than
    limits.line_bytes are emptied (and listed)."""
    if isinstance(source, str):  # a file: read at offsets, one copy of each byte
        yield from iter_file_blocks(source, block_size)
        return
    if isinstance(source, tuple):
        path, start, end = source
        yield from iter_file_blocks(path, block_size, start=start, end=end, counters=counters)
        return
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    yield from iter_line_blocks(source, block_size)


def _iter_rows(
    source: Source,
    delimiter: str,
    columns: tuple[str, ...],
    skip_rows: int,
    block_size: int = 1 << 24,
    counters: dict[str, int] | None = None,
) -> Iterator[tuple[pa.Table, pa.Array, list[tuple[int, str]], LineBlock]]:
    """Stream a delimited text as (the columns we use, all as text; their 1-based line numbers; the lines of
    another width as (line number, text); the block they came from, whose `too_long` lists the lines over
    limits.line_bytes as (line number, length)), one block of ~`block_size` bytes at a time
    (delimited.read_block). With `counters` (a decode worker's range, CsvRange) each block is read on one
    thread: the worker processes already share the cores."""
    for index, block in enumerate(_chunks(source, block_size, counters)):
        if b"\r" in block.data:  # rare: nfdump ends lines with \n only
            block = LineBlock(block.first_line, _LONE_CR.sub(b"\x00", block.data), block.too_long)
        chunk = block.data
        skip = skip_rows if index == 0 else 0
        if not chunk:  # only the rest of an over-long last line
            yield pa.table({}), pa.array([], pa.int64()), [], block
            continue
        table, numbers, invalid = read_block(
            chunk, block.first_line, delimiter, columns, _NEEDED, skip, threads=counters is None
        )
        yield table, numbers, invalid, block


def _iter_flows(
    source: Source,
    delimiter: str,
    columns: tuple[str, ...],
    skip_rows: int,
    name: str,
    tz: str,
    trailer: str | None,
    block_size: int = 1 << 24,
    counters: dict[str, int] | None = None,
    window: bool = True,
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Batches of (FLOWS, rejects) (`window`: starts outside units.time_window are rejects, with their line). Not data, and not rejected: blank lines, nfdump's summary trailer (the
    `trailer` line, the names line that follows and its values line) and repeated header lines, so that
    several nfdump outputs concatenated into one file read as one. `counters` (if given) gets "lines" (the
    lines read so far) and "trailer_left" (trailer lines still due when the input ends: a range that ends
    inside a trailer tells the next one)."""
    summary_lines_left = 0
    for table, line_numbers, invalid, block in _iter_rows(
        source, delimiter, columns, skip_rows, block_size, counters
    ):
        parts: list[pa.Table] = []
        kept = []
        if block.too_long:  # emptied by the reader: blank here, a reject there
            parts.append(too_long_rejects(name, block.too_long))
        for number, text in invalid:
            stripped = text.strip()
            if counters is not None and stripped and counters["head"] < _HEAD_FULL:
                counters["head"] = _head_add(counters["head"], stripped, trailer)
            if trailer is not None and stripped == trailer:
                summary_lines_left = 2
            elif summary_lines_left and stripped:
                summary_lines_left -= 1
            elif stripped and stripped != NO_FLOWS:
                kept.append((number, text))
        if kept:
            parts.append(line_rejects(kept, _width_reason(columns), name))
        flows = FLOWS.empty_table()
        if table.num_rows:
            fields = {field: table.column(field) for field in _NEEDED}
            flows, valid, reason, detail = _flows_from_columns(fields, name, tz, window)
            if not pc.all(valid).as_py():  # blank and header lines among the invalid rows are not rejects
                invalid = pc.invert(valid)
                ts, sa = fields["ts"].filter(invalid), fields["sa"].filter(invalid)
                numbers = line_numbers.filter(invalid)
                header = pc.and_(pc.equal(ts, "ts"), pc.equal(sa, "sa"))
                empty = pc.and_(pc.equal(_trim(ts), ""), pc.equal(_trim(sa), ""))
                shown = pc.invert(pc.or_(header, _blank_lines(block, numbers, empty)))
                numbers, details, reasons = (
                    c.filter(shown) for c in (numbers, detail.filter(invalid), reason.filter(invalid))
                )
                if len(numbers):
                    parts.append(_rejects(numbers, details, reasons, name))
                flows = flows.filter(valid)
            flows = conform(_with_null_text(flows), FLOWS, text_as_dictionary=True)
        rejects = pa.concat_tables(parts).sort_by("line") if parts else empty_rejects()
        if counters is not None:
            counters["trailer_left"] = summary_lines_left
        yield flows, rejects


_rejects = rejects_table
# pyarrow's CSV reader ends a line at \r\n, \r or \n. A lone \r is made a NUL byte (no field holds one) before it
# reads a block: the line stays one line, a reject if a field we read holds it, and every line number after it
# is the one `grep -n` and `sed` show (and the same in the decode workers, whose ranges count \n only).
_LONE_CR = re.compile(rb"\r(?!\n)")


def _blank_lines(block: LineBlock, numbers: pa.Array, empty: pa.Array) -> pa.Array:
    """Which rows whose time and source address are `empty` come from empty lines (pyarrow makes a row of empty
    fields of an empty line, and the reader empties over-long ones): those are not rejects. A line of empty
    fields (",,,...") is one, and was dropped unseen before this looked at the line's length."""
    if not pc.any(empty).as_py():
        return empty
    data = np.frombuffer(block.data, np.uint8)
    ends = np.flatnonzero(data == 10)
    if not block.data.endswith(b"\n"):
        ends = np.append(ends, len(data))
    starts = np.concatenate(([0], ends[:-1] + 1))
    length = ends - starts
    length -= (length > 0) & (data[np.maximum(ends - 1, 0)] == 13)  # \r\n ends the line too
    index = numbers.to_numpy(zero_copy_only=False) - block.first_line
    inside = (index >= 0) & (index < len(length))
    blank = np.zeros(len(index), dtype=bool)
    blank[inside] = length[index[inside]] == 0
    return pa.array(blank & np.asarray(empty, dtype=bool))


# A range's head: its first two non-blank lines of another width, as base-4 digits (1 a reject, 2 nfdump's "No
# matching flows", 3 the trailer line), so that RangeLanding can replay them against the trailer lines the range
# before ended inside (the worker read them as if none were due). 4 or more: two digits, full.
_HEAD_FULL = 4


def _head_add(head: int, stripped: str, trailer: str | None) -> int:
    kind = 3 if stripped == trailer else 2 if stripped == NO_FLOWS else 1
    return head + kind * (4 if head else 1)


def _width_reason(columns: tuple[str, ...]) -> str:
    """The reject reason of a line with another number of fields than `columns`."""
    return f"expected {len(columns)} fields"


_NULL_TEXT_DICTIONARY = pa.array([], pa.string())


def _with_null_text(flows: pa.Table) -> pa.Table:
    """The FLOWS text columns nfdump's text lacks, as all-null dictionary columns (what conform would make
    of them by hashing n nulls per column: ~25 columns of every batch)."""
    n = flows.num_rows
    missing = [f.name for f in FLOWS if pa.types.is_string(f.type) and f.name not in flows.column_names]
    nulls = pa.DictionaryArray.from_arrays(pa.nulls(n, pa.int32()), _NULL_TEXT_DICTIONARY)
    for name in missing:
        flows = flows.append_column(name, nulls)
    return flows


# ---- the readers ---------------------------------------------------------------------------------------------


def _csv_layout(first_line: bytes) -> tuple[tuple[str, ...], int, list[str]]:
    """(column names, header lines to skip, needed columns the header lacks) from the first line."""
    first = first_line.rstrip(b"\r\n")
    if not first.startswith(b"ts,te,"):  # nfdump writes the header unless -q
        return CSV_COLUMNS, 0, []
    columns = tuple(first.decode("latin-1").split(","))
    missing = sorted(c for c in _NEEDED if c not in columns)
    if len(set(columns)) != len(columns):
        columns = tuple(f"{c}#{i}" if c not in _NEEDED else c for i, c in enumerate(columns))
    return columns, 1, missing


def _iter_csv(
    source: bytes | str, first_line: bytes, name: str, tz: str, block_size: int = 1 << 24
) -> Iterator[tuple[pa.Table, pa.Table]]:
    columns, skip, missing = _csv_layout(first_line)
    if missing:  # not nfdump's CSV layout: nothing can be read, say so at the header line
        header = first_line.rstrip(b"\r\n").decode("latin-1")
        reason = f"header lacks {', '.join(missing)}"
        yield FLOWS.empty_table(), _rejects(pa.array([1]), pa.array([header]), pa.array([reason]), name)
        return
    yield from _iter_flows(source, ",", columns, skip, name, tz, trailer="Summary", block_size=block_size)


# ---- nfdump CSV in decode workers (decode_pool): byte ranges cut at line ends, landed in file order ---------------
RANGE_COUNTERS = (
    "\x00csv range"  # the key of a range's own counters in its stats (never an exporter's address)
)


@dataclass(frozen=True)
class RangeDecoded:
    flows: pa.Table
    rejects: pa.Table  # line numbers counted from the range's first line
    stats: dict[
        str, dict[str, int]
    ]  # {exporter: {"flows": n}}, and RANGE_COUNTERS: {"lines", "trailer_left"}


@dataclass(frozen=True)
class CsvRange:
    """One byte range of an nfdump CSV file, cut at line ends (delimited.file_ranges): what a decode worker
    turns into flows (decode_pool calls decode()). Plain values, pickled cheaply; the worker reads the bytes."""

    path: str
    start: int
    end: int
    columns: tuple[str, ...]
    skip_rows: int  # the header line: only in the first range
    source: str
    tz: str = "UTC"

    def decode(self) -> RangeDecoded:
        counters = {"lines": 0, "trailer_left": 0, "head": 0}
        batches = list(
            _iter_flows(
                (self.path, self.start, self.end),
                ",",
                self.columns,
                self.skip_rows,
                self.source,
                self.tz,
                trailer="Summary",
                # one batch for a range of file_ranges' size; a range that is one huge line (no newline for
                # hundreds of MB) is read through in windows of 32 MB, never held whole
                block_size=min(self.end - self.start + 1, 1 << 25),
                counters=counters,
            )
        )
        # a batch without flows is FLOWS.empty_table() (plain text columns, not the dictionaries of the others):
        # left out, or a range of only junk, blank or header lines cannot be joined and counted
        found = [f for f, _ in batches if f.num_rows]
        flows = pa.concat_tables(found) if found else FLOWS.empty_table()
        rejects = pa.concat_tables([r for _, r in batches]) if batches else empty_rejects()
        stats: dict[str, dict[str, int]] = {RANGE_COUNTERS: counters}
        exporter = flows.column("exporter").combine_chunks()
        if pa.types.is_dictionary(exporter.type):
            exporter = exporter.dictionary_decode()
        for item in pc.value_counts(exporter).to_pylist():
            stats[item["values"] or ""] = {"flows": item["counts"]}
        return RangeDecoded(flows, rejects, stats)


def nfdump_csv_ranges(
    path: Path | str, source: str, tz: str = "UTC", range_bytes: int = 1 << 24
) -> list[CsvRange]:
    """The ranges of a `nfdump -o csv` file for decode workers, or [] when its first line is not nfdump's
    layout (iter_nfdump_csv then reads it and says why). At most `range_bytes` each (a worker holds two), and
    at least 16 of them (64 KiB or more) so that the workers finish together."""
    with open(path, "rb") as handle:
        first_line = handle.readline(DEFAULT_LIMITS.line_bytes + 1)
        size = os.fstat(handle.fileno()).st_size
    columns, skip, missing = _csv_layout(first_line)
    if missing or not first_line.strip():
        return []
    range_bytes = min(range_bytes, max(size // 16, 1 << 16))
    return [
        CsvRange(str(path), start, end, columns, skip if start == 0 else 0, source, tz)
        for start, end in file_ranges(str(path), range_bytes)
    ]


@dataclass
class RangeLanding:
    """Lands ranges' rejects in file order: line numbers shifted by the lines before the range; the trailer
    lines a range ended inside are dropped from the head of the next one (where the serial reader drops them)."""

    columns: tuple[str, ...] = CSV_COLUMNS  # the file's (CsvRange.columns)
    lines: int = 0
    trailer_left: int = 0

    def land(self, rejects: pa.Table, stats: dict[str, dict[str, int]]) -> pa.Table:
        counters = stats.pop(RANGE_COUNTERS, {"lines": 0, "trailer_left": 0, "head": 0})
        # replay the range's head as the serial reader reads it with the trailer lines still due: each non-blank
        # line of another width is one of them (a reject to drop, if the worker made it one), until a trailer
        # line of the range's own starts over (from there the worker's reading holds)
        due, drop, head, own = self.trailer_left, 0, counters.get("head", 0), False
        while due and head:
            kind, head = head % 4, head // 4
            if kind == 3:
                own = True
                break
            due, drop = due - 1, drop + (kind == 1)
        if drop and rejects.num_rows:
            width = pc.equal(rejects.column("reason"), _width_reason(self.columns))
            first = np.flatnonzero(np.asarray(pc.fill_null(width, False), dtype=bool))[:drop]
            keep = np.ones(rejects.num_rows, dtype=bool)
            keep[first] = False
            rejects = rejects.filter(pa.array(keep))
        if rejects.num_rows:
            line = pc.add(rejects.column("line"), self.lines)
            rejects = rejects.set_column(rejects.column_names.index("line"), "line", line)
        self.lines += counters["lines"]
        # a range too short to hold the trailer lines due passes the rest on
        self.trailer_left = counters["trailer_left"] if own or not due else due
        return rejects


def _collect(batches: Iterator[tuple[pa.Table, pa.Table]]) -> tuple[pa.Table, pa.Table]:
    flows, rejects = [FLOWS.empty_table()], [empty_rejects()]
    for batch_flows, batch_rejects in batches:
        flows.append(conform(batch_flows, FLOWS))  # the batches' text is dictionary-encoded
        rejects.append(batch_rejects)
    return pa.concat_tables(flows), pa.concat_tables(rejects)


def parse_nfdump_csv(
    data: bytes, source: str, tz: str = "UTC", block_size: int = 1 << 24
) -> tuple[pa.Table, pa.Table]:
    """Text of `nfdump -o csv` -> (flows in schema.FLOWS, rejects with 1-based line numbers). Pure.
    `block_size`: bytes of text per batch (the reader's unit; line numbers hold across batches)."""
    if not data.strip():
        return FLOWS.empty_table(), empty_rejects()
    return _collect(_iter_csv(data, data.split(b"\n", 1)[0], source, tz, block_size))


def iter_nfdump_csv(path: Path | str, tz: str = "UTC") -> Iterator[tuple[pa.Table, pa.Table]]:
    """A file written by `nfdump -o csv`, streamed: batches of (flows in schema.FLOWS, rejects with line
    numbers), ~16 MB of text each, so memory stays flat however big the file.

    `tz`: the time zone nfdump ran in (it prints local time); default UTC. Malformed lines become rejects
    (line number, reason, detail), every other line lands.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            first_line = handle.readline(DEFAULT_LIMITS.line_bytes + 1)
            more = handle.read(1)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    if not first_line.strip() and not more:
        return
    yield from _iter_csv(str(path), first_line, str(path), tz)


def read_nfdump_csv(path: Path | str, tz: str = "UTC") -> tuple[pa.Table, pa.Table]:
    """iter_nfdump_csv, collected into one (flows, rejects) pair."""
    return _collect(iter_nfdump_csv(path, tz))


# nfcapd files (nfdump 1.6 layout 1 and 1.7 layout 2) start with magic 0xA50C and the layout version, in the
# byte order of the machine that wrote them (nffile.h); nfdump reads both orders.
NFCAPD_MAGIC = (b"\x0c\xa5\x01\x00", b"\x0c\xa5\x02\x00", b"\xa5\x0c\x00\x01", b"\xa5\x0c\x00\x02")
_EXPORTER_RE = re.compile(r"SysID:\s*(\d+),\s*IP:\s*(\S+),")
# nfdump 1.7.1 PrintExporters: each exporter's samplers on the lines after it, "Sampler: ... packet interval: P,
# packet space: S" (1 in (P + S) / P packets)
_SAMPLER_RE = re.compile(r"Sampler:.*?packet interval:\s*(\d+),\s*packet space:\s*(\d+)")


NO_FLOWS = "No matching flows"  # what nfdump prints (stdout, even with -q) when a file yields no record
# nfdump 1.7.1 reports a damaged file on stderr and still exits 0 ("Open file X: appendix offset error",
# "Short read from file: X", "GetNextFile() error in nfdump.c line 295", "Unable to read appendix block" for
# a compression it does not know)
_NFDUMP_READ_ERROR = re.compile(
    r"error|short read|corrupt|cannot|failed|unable|invalid|not supported|unsupported", re.I
)


def looks_like_nfcapd(head: bytes) -> bool:
    return head[:4] in NFCAPD_MAGIC


def _nfdump_env() -> dict[str, str]:
    return dict(os.environ, TZ="UTC", LC_ALL="C")  # nfdump prints local time: make it UTC


def nfcapd_exporters(path: Path | str, timeout: float = 120.0) -> dict[str, dict[str, object]]:
    """What `nfdump -E FILE` keeps of the exporters of an nfcapd file: {address: {"sysid", "sampling"}},
    sampling = the intervals of its samplers ([] when it announced none: volumes are as exported); the native
    reader (nffile.Exporters) finds the same from the file's exporter and sampler records."""
    proc = subprocess.run(
        [tool_path("nfdump"), "-E", str(path)],
        capture_output=True,
        timeout=timeout,
        env=_nfdump_env(),
        stdin=subprocess.DEVNULL,
    )
    text = proc.stdout.decode("latin-1")
    out: dict[str, dict[str, object]] = {}
    address = None
    for line in text.splitlines():  # in order: a sampler belongs to the exporter printed before it
        exporter = _EXPORTER_RE.search(line)
        if exporter is not None:
            sysid, address = exporter.groups()
            out.setdefault(address, {"sysid": int(sysid), "sampling": []})
            continue
        sampler = _SAMPLER_RE.search(line)
        if sampler is not None and address is not None and int(sampler.group(1)):
            interval = (int(sampler.group(1)) + int(sampler.group(2))) // int(sampler.group(1))
            if interval not in out[address]["sampling"]:  # type: ignore[operator]
                out[address]["sampling"].append(interval)  # type: ignore[union-attr]
    return out


@dataclass
class NfcapdRead:
    """How iter_nfcapd read one file: `reader` "native" (tracepipe.ingest.nffile) or "nfdump" (the installed
    binary, the fallback), `fallback` why the native reader did not take it, `exporters` what the file says of
    its exporters ({address: {"sysid", "sampling"}}, as nfcapd_exporters; native reads only)."""

    reader: str = ""
    fallback: str = ""
    exporters: dict[str, dict[str, object]] = field(default_factory=dict)


def iter_nfcapd(
    path: Path | str,
    timeout: float = 3600.0,
    block_size: int = 1 << 24,
    read: NfcapdRead | None = None,
    native: bool = True,
    batch_rows: int = 1 << 19,
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """One nfcapd file (or a directory tree of them), streamed: batches of (flows in schema.FLOWS, rejects).

    nfdump 1.7 layout-2 files are read natively (nffile.iter_nffile: ~`batch_rows` records a batch, rejects
    name the block's file offset); anything else (layout 1, encryption, LZO without python-lzo, nfdump 1.6
    blocks, a directory) goes through the installed nfdump, and `read` (if given) says which and why, so that
    the fallback is reported, never silent. `native=False` forces the nfdump path."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    read = NfcapdRead() if read is None else read
    if path.is_dir():
        problem: str | None = "a directory (read with nfdump -R)"
    else:
        problem = nffile.native_problem(path) if native else "native reader turned off"
    if problem is None:
        read.reader = "native"
        exporters = nffile.Exporters()
        yield from nffile.iter_nffile(path, str(path), exporters, batch_rows)
        read.exporters = exporters.out
        return
    read.reader, read.fallback = "nfdump", problem
    yield from _iter_nfcapd_nfdump(path, timeout, block_size)


def _iter_nfcapd_nfdump(
    path: Path, timeout: float, block_size: int, window: bool = True
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """The nfdump-subprocess path: `nfdump -r|-R PATH -o fmt:...` streamed through the text reader, ~`block_size`
    bytes of nfdump's text a batch. Times in ms (`fmt:` output, TZ=UTC), `-N` plain numbers, `-6` full IPv6.

    A file nfdump cannot read (corrupt, truncated) gives one reject with nfdump's message; what it printed
    before that landed. A missing nfdump binary raises EnvironmentProblem."""
    cmd = [
        tool_path("nfdump"),
        "-R" if path.is_dir() else "-r",
        str(path),
        "-q",
        "-N",
        "-6",
        "-o",
        NFDUMP_FMT,
    ]
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL, env=_nfdump_env()
        )
        assert proc.stdout is not None
        try:
            yield from _iter_flows(
                proc.stdout, "|", _FMT_COLUMNS, 0, str(path), "UTC", None, block_size, window=window
            )
            proc.stdout.close()
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise EnvironmentProblem(f"nfdump did not finish within {timeout:.0f} s reading {path}") from exc
        finally:
            if proc.poll() is None:  # the caller stopped early, or an error: do not leave nfdump behind
                proc.kill()
                proc.wait()
        errors.seek(0)
        message = errors.read(2000).decode("latin-1", "replace").strip()
    if code != 0 or _NFDUMP_READ_ERROR.search(message):
        yield (
            FLOWS.empty_table(),
            _rejects(
                pa.array([0]),
                pa.array([message[:200] or f"exit {code}"]),
                pa.array(["nfdump could not read the file"]),
                str(path),
            ),
        )


def read_nfcapd(path: Path | str, timeout: float = 300.0, window: bool = True) -> tuple[pa.Table, pa.Table]:
    """The nfdump-subprocess path collected into one (flows in schema.FLOWS, rejects): nfcapd file or directory,
    ms precision. The tests' oracle (with `window` False: every record as nfdump prints it, 1970 included):
    raises EnvironmentProblem when nfdump fails on it as a whole."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    flows, rejects = _collect(_iter_nfcapd_nfdump(path, timeout, 1 << 24, window))
    failed = pc.equal(rejects.column("reason"), "nfdump could not read the file")
    if rejects.num_rows and pc.any(failed).as_py():
        detail = rejects.filter(failed).column("detail")[0].as_py()
        raise EnvironmentProblem(f"nfdump failed on {path}: {detail}")
    return flows, rejects
