"""A numpy parser of nfdump `-o csv` lines (issue 17, measured and not taken): the "numpy tokenizer" floor of
benchmarks/csv_floors.py. Not part of tracepipe: on this machine it costs ~2x the CPU of the pyarrow reader it
would replace (see README, "nfdump CSV, fifth round"); kept so that the comparison can be rerun.

In: a block of whole lines (bytes ending in a newline). Out: the FLOWS columns of every line exactly as nfdump
1.7.1 prints it (48 comma-separated fields; times `YYYY-MM-DD hh:mm:ss[.mmm]`; canonical dotted-quad IPv4;
decimal counts and ports or ICMP `type.code`; protocol names from its table; flag strings), and the indices of
every other line (which a real reader would hand to the careful path). One pass finds commas and newlines, the
fields are cut from their positions and parsed with vectorised arithmetic. On the benchmark's CSV it gives the
rows tracepipe's reader gives, value for value (`python benchmarks/csv_floors.py --check FILE.csv`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tracepipe.address_text import ipv4_text
from tracepipe.schema import TS

FIELDS = 48  # nfdump 1.7.1 output_csv.c
# where the needed fields sit among the 48 (nfdump.CSV_COLUMNS)
_TS, _TE, _SA, _DA, _SP, _DP, _PR, _FLG, _IPKT, _IBYT, _IN, _OUT, _RA = (
    0,
    1,
    3,
    4,
    5,
    6,
    7,
    8,
    11,
    12,
    15,
    16,
    44,
)
_COMMA, _NEWLINE, _DOT, _ZERO = 44, 10, 46, 48
_PAD = 32  # NUL bytes after a block: room for the widest field window (_matrix)
_FLAG_LETTERS = np.frombuffer(b"CEUAPRSF", np.uint8)  # FlagsString()'s order, bits 128 .. 1
_FLAG_BITS = np.array([128, 64, 32, 16, 8, 4, 2, 1], np.int16)


@dataclass(frozen=True)
class Lines:
    """What the fast path made of a block: `table` (FLOWS columns of the lines it took, in line order; src_addr
    and dst_addr as uint32 for the lake writer to format), `taken` (their 0-based line indices in the block),
    `others` (the indices of the lines it left to the careful reader), `lines` (the block's line count)."""

    table: pa.Table
    taken: np.ndarray
    others: np.ndarray
    lines: int


def _digits(
    buf: np.ndarray, start: np.ndarray, end: np.ndarray, widest: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned decimal fields buf[start:end] of 1..`widest` ASCII digits -> (int64 values, valid mask)."""
    width = end - start
    ok = (width >= 1) & (width <= widest)
    value = np.zeros(len(start), np.int64)
    last = len(buf) - 1
    for k in range(int(width[ok].max()) if ok.any() else 0):
        inside = k < width
        digit = buf[np.minimum(start + k, last)] - np.uint8(_ZERO)  # uint8: below '0' wraps above 9
        ok &= ~inside | (digit <= 9)
        value = np.where(inside, value * 10 + digit, value)
    return value, ok


def _matrix(buf: np.ndarray, start: np.ndarray, width: int) -> np.ndarray:
    """The `width` bytes from each start as an (n, width) uint8 matrix (a copy of `width` bytes a row; lines()
    pads the buffer with _PAD bytes, so that every field's window lies inside it)."""
    return np.lib.stride_tricks.sliding_window_view(buf, width)[start]


def _ipv4(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical dotted quads (str(IPv4Address): 1-3 digits an octet, no leading zeros, octets <= 255) ->
    (uint32, valid mask)."""
    width = end - start
    chars = _matrix(buf, start, 15)
    inside = np.arange(15) < width[:, None]
    dot = (chars == _DOT) & inside
    ok = (width >= 7) & (width <= 15) & np.all((chars - np.uint8(_ZERO) <= 9) | dot | ~inside, axis=1)
    segment = np.cumsum(dot, axis=1, dtype=np.int8)
    ok &= segment[:, 14] == 3
    # the octets: [0, dot1), (dot1, dot2), (dot2, dot3), (dot3, width)
    bounds = [np.zeros_like(width)] + [(segment < j).sum(axis=1) for j in (1, 2, 3)] + [width]
    rows = np.arange(len(start))
    value = np.zeros(len(start), np.int64)
    for j in range(4):
        first = bounds[j] + (j > 0)
        digits = bounds[j + 1] - first
        d = [chars[rows, np.minimum(first + k, 14)].astype(np.int64) - _ZERO for k in range(3)]
        octet = np.where(
            digits == 1, d[0], np.where(digits == 2, d[0] * 10 + d[1], d[0] * 100 + d[1] * 10 + d[2])
        )
        ok &= (digits >= 1) & (digits <= 3) & (octet <= 255) & ((digits == 1) | (d[0] != 0))
        value = value * 256 + octet
    return np.where(ok, value, 0).astype(np.uint32), ok


_DAYS_BEFORE_MONTH = np.array([0, 0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334], np.int64)
_DAYS_IN_MONTH = np.array([0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], np.int64)


_TIME_DIGITS = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22]


def _times(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`YYYY-MM-DD hh:mm:ss` or `YYYY-MM-DD hh:mm:ss.mmm` (UTC; years 1970-2999) -> (µs since the epoch,
    valid mask). Stricter than the careful reader: what it leaves, that reader decides."""
    width = end - start
    chars = _matrix(buf, start, 23)
    digit = chars[:, _TIME_DIGITS] - np.uint8(_ZERO)  # uint8: a non-digit is above 9
    millis = width == 23
    ok = ((width == 19) | millis) & np.all(digit[:, :14] <= 9, axis=1)
    ok &= (chars[:, 4] == ord("-")) & (chars[:, 7] == ord("-")) & (chars[:, 10] == ord(" "))
    ok &= (chars[:, 13] == ord(":")) & (chars[:, 16] == ord(":"))
    ok &= ~millis | ((chars[:, 19] == _DOT) & np.all(digit[:, 14:] <= 9, axis=1))
    d = digit.astype(np.int64)
    year = d[:, 0] * 1000 + d[:, 1] * 100 + d[:, 2] * 10 + d[:, 3]
    month, day = d[:, 4] * 10 + d[:, 5], d[:, 6] * 10 + d[:, 7]
    hour, minute, second = d[:, 8] * 10 + d[:, 9], d[:, 10] * 10 + d[:, 11], d[:, 12] * 10 + d[:, 13]
    ok &= (year >= 1970) & (year <= 2999) & (month >= 1) & (month <= 12) & (day >= 1)
    month = np.where(ok, month, 1)
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    ok &= day <= _DAYS_IN_MONTH[month] - ((month == 2) & ~leap)
    ok &= (hour <= 23) & (minute <= 59) & (second <= 59)
    # days since 1970-01-01: whole years (and the leap days before `year`), then months and days
    before = year - 1
    leaps = before // 4 - before // 100 + before // 400 - (1969 // 4 - 1969 // 100 + 1969 // 400)
    days = (year - 1970) * 365 + leaps + _DAYS_BEFORE_MONTH[month] + ((month > 2) & leap) + day - 1
    milli = np.where(millis, d[:, 14] * 100 + d[:, 15] * 10 + d[:, 16], 0)
    micros = ((days * 86400 + hour * 3600 + minute * 60 + second) * 1000 + milli) * 1000
    return np.where(ok, micros, 0), ok


def _dst_port(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A port (<= 65535), or ICMP `type.code` (1-3 digits each) folded to type*256+code <= 65535, as the careful
    reader's dst_port_from_text."""
    port, ok = _digits(buf, start, end, 5)
    ok &= port <= 65535
    if ok.all():
        return port, ok
    chars = _matrix(buf, start, 7)
    width = end - start
    position = np.arange(7)
    dot_at = np.where((chars == _DOT) & (position < width[:, None]), position, 99).min(axis=1)
    icmp = ~ok & (dot_at >= 1) & (dot_at <= 3) & (width - dot_at - 1 >= 1) & (width - dot_at - 1 <= 3)
    icmp_type, type_ok = _digits(buf, start, start + np.where(icmp, dot_at, 0), 3)
    icmp_code, code_ok = _digits(buf, start + np.where(icmp, dot_at + 1, 0), np.where(icmp, end, start), 3)
    folded = icmp_type * 256 + icmp_code
    icmp &= type_ok & code_ok & (folded <= 65535)
    return np.where(icmp, folded, port), ok | icmp


def _name_keys(chars: np.ndarray) -> np.ndarray:
    """Up to 5 bytes a row (NUL-padded) -> one int64 each, in the bytes' order."""
    key = np.zeros(len(chars), np.int64)
    for k in range(chars.shape[1]):
        key = (key << 8) | chars[:, k]
    return key


def _proto_table() -> tuple[np.ndarray, np.ndarray]:
    from tracepipe.ingest.nfdump import _PROTO_NAMES, _PROTO_NUMBERS  # nfdump's table, kept in one place

    chars = np.array([list(n.encode().ljust(5, b"\0")) for n in _PROTO_NAMES], np.uint8)
    keys = _name_keys(chars)
    order = np.argsort(keys)
    return keys[order], np.array(_PROTO_NUMBERS, np.int64)[order]


_PROTO_SORTED: tuple[np.ndarray, np.ndarray] | None = None


def _proto(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A protocol name from nfdump's table (at most 5 characters) or a number <= 255 -> (number, valid)."""
    global _PROTO_SORTED  # a cache of a constant, built on first use (the import would be circular at load)
    if _PROTO_SORTED is None:
        _PROTO_SORTED = _proto_table()
    names, numbers = _PROTO_SORTED
    width = end - start
    chars = _matrix(buf, start, 5)
    chars[np.arange(5) >= width[:, None]] = 0  # the block has no NUL byte (lines()), so 0 pads only
    key = _name_keys(chars)
    slot = np.minimum(np.searchsorted(names, key), len(names) - 1)
    named = (names[slot] == key) & (width >= 1) & (width <= 5)
    number, number_ok = _digits(buf, start, end, 3)
    number_ok &= number <= 255
    return np.where(named, numbers[slot], number), named | number_ok


def _flags(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """nfdump's 8-character flag string ("...AP.SF") -> (bit mask, valid)."""
    chars = _matrix(buf, start, 8)
    set_ = chars == _FLAG_LETTERS
    ok = ((end - start) == 8) & np.all(set_ | (chars == _DOT), axis=1)
    return (set_ * _FLAG_BITS).sum(axis=1, dtype=np.int16), ok


def _exporters(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[pa.DictionaryArray, np.ndarray]:
    """The exporter column (`ra`): canonical IPv4 text, dictionary-encoded; one exporter per file is the common
    case, so the rows are first compared with the first row's bytes."""
    n = len(start)
    if n and (end - start == end[0] - start[0]).all():
        chars = _matrix(buf, start, int(end[0] - start[0]))
        if (chars == chars[0]).all():
            value, ok = _ipv4(buf, start[:1], end[:1])
            indices = np.zeros(n, np.int32)
            return pa.DictionaryArray.from_arrays(indices, ipv4_text(value).dictionary), np.repeat(ok, n)
    value, ok = _ipv4(buf, start, end)
    return ipv4_text(value), ok


def lines(data: bytes, source: str) -> Lines | None:
    """The fast path over one block of whole lines (`data` ends with a newline), or None when the block holds a
    NUL or CR byte (the careful reader reads such blocks whole: CR ends lines for it too)."""
    if not data.endswith(b"\n") or b"\r" in data or b"\x00" in data:
        return None
    buf = np.frombuffer(data + bytes(_PAD), np.uint8)
    # one pass finds both separators; a line's fields lie between its newline's predecessor and itself
    cuts = np.flatnonzero((buf == _COMMA) | (buf == _NEWLINE))
    at_newline = np.flatnonzero(buf[cuts] == _NEWLINE)
    before = np.empty_like(at_newline)  # index in `cuts` of the previous line's newline (-1 for the first)
    before[:1] = -1
    before[1:] = at_newline[:-1]
    rows = np.flatnonzero(at_newline - before == FIELDS)
    first = before[rows] + 1  # index in `cuts` of the row's first comma
    line_start = np.where(first > 0, cuts[first - 1] + 1, 0)
    newline = at_newline

    def span(field: int) -> tuple[np.ndarray, np.ndarray]:
        begin = line_start if field == 0 else cuts[first + field - 1] + 1
        return begin, cuts[first + field]

    checks: list[np.ndarray] = []

    def parse(convert, field: int):
        value, ok = convert(buf, *span(field))
        checks.append(ok)
        return value

    ts_start = parse(_times, _TS)
    ts_end = parse(_times, _TE)
    src = parse(_ipv4, _SA)
    dst = parse(_ipv4, _DA)
    src_port = parse(lambda b, s, e: _digits(b, s, e, 10), _SP)
    dst_port = parse(_dst_port, _DP)
    proto = parse(_proto, _PR)
    flags = parse(_flags, _FLG)
    packets = parse(lambda b, s, e: _digits(b, s, e, 18), _IPKT)
    octets = parse(lambda b, s, e: _digits(b, s, e, 18), _IBYT)
    input_if = parse(lambda b, s, e: _digits(b, s, e, 10), _IN)
    output_if = parse(lambda b, s, e: _digits(b, s, e, 10), _OUT)
    exporter, ok = _exporters(buf, *span(_RA))
    checks.append(ok)
    good = np.logical_and.reduce(checks) if len(rows) else np.zeros(0, bool)
    good &= (src_port <= 2**31 - 1) & (input_if <= 2**31 - 1) & (output_if <= 2**31 - 1)
    taken = rows[good]
    left = np.ones(len(newline), bool)
    left[taken] = False
    others = np.flatnonzero(left)
    n = len(taken)
    keep = None if good.all() else pa.array(good)

    def column(values: np.ndarray, type_: pa.DataType) -> pa.Array:
        return pa.array(values[good] if keep is not None else values).cast(type_)

    table = pa.table(
        {
            "ts_start": pa.array(ts_start[good] if keep is not None else ts_start)
            .cast(pa.timestamp("us"))
            .cast(TS),
            "ts_end": pa.array(ts_end[good] if keep is not None else ts_end)
            .cast(pa.timestamp("us"))
            .cast(TS),
            "src_addr": pa.array(src[good] if keep is not None else src, pa.uint32()),
            "dst_addr": pa.array(dst[good] if keep is not None else dst, pa.uint32()),
            "src_port": column(src_port, pa.int32()),
            "dst_port": column(dst_port, pa.int32()),
            "proto": column(proto, pa.int16()),
            "packets": column(packets, pa.int64()),
            "bytes": column(octets, pa.int64()),
            "tcp_flags": column(flags, pa.int16()),
            "ip_version": pa.array(np.full(n, 4, np.int8)),
            "exporter": exporter.filter(keep) if keep is not None else exporter,
            "input_if": column(input_if, pa.int32()),
            "output_if": column(output_if, pa.int32()),
            "source": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([source])),
        }
    )
    return Lines(table, taken, others, len(newline))
