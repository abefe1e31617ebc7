"""Zeek (Bro) conn.log -> flow rows (schema.FLOWS) plus rejects (schema.REJECTS columns), vectorised, streamed.

Reads both forms Zeek writes: TSV (`#separator`, `#fields`, `#unset_field` `-`, `#empty_field` `(empty)`
headers; several logs concatenated, as rotation and `cat` make them, each with its own header) and JSON lines
(`LogAscii::use_json=T`, epoch or ISO 8601 `ts`); plain or gzip'ed (told by the first bytes). Column meanings
follow Zeek's own documentation of conn.log (base/protocols/conn/main.zeek), read by name as `zeek-cut` does.

A connection is two directions: the originator's row (id.orig_h -> id.resp_h, orig_pkts, orig_ip_bytes) and,
when the responder sent anything, the responder's row (resp_pkts, resp_ip_bytes), as a NetFlow probe exports
them. Both carry `uid`, `conn_state` and `history`; their tcp_flags come from the history letters (or the
conn_state when Zeek wrote no history), see tracepipe.flowstate. Bytes are IP bytes (`*_ip_bytes`, what
NetFlow counts); a log without them falls back to the payload bytes (`orig_bytes`). ICMP: Zeek writes the
type as id.orig_p and the code as id.resp_p; the originator row carries type*256+code in dst_port as NetFlow
does, the responder row no port (Zeek does not say which type the replies had).

Labelled logs (Stratosphere's `*.labeled` conn.logs, IoT-23): a `label` column is ground truth, kept apart as
schema.FLOW_LABELS (one row per connection, keyed like its originator row) for evaluation; detectors never see
it. IoT-23 writes its three extra columns as one TSV field, `tunnel_parents   label   detailed-label` with
spaces inside, in the header and in every row: the label is then the middle word of that field. Any other
column the reader does not use is ignored.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from tracepipe.errors import InputError
from tracepipe.flowstate import ZEEK_HISTORY_FLAGS, ZEEK_STATE_FLAGS
from tracepipe.ingest.delimited import (
    address_text,
    as_flows,
    empty_rejects,
    first_failure,
    header_segments,
    joined_segments,
    line_rejects,
    read_block,
    rejects_table,
    sift_lines,
    usable_delimiter,
)
from tracepipe.lake import implausible_detail, plausible_times
from tracepipe.limits import iter_line_blocks, too_long_rejects
from tracepipe.schema import FLOW_LABELS, FLOWS, TS

GZIP_MAGIC = b"\x1f\x8b"
REQUIRED = ("ts", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto")
COUNTS = ("orig_pkts", "orig_ip_bytes", "orig_bytes", "resp_pkts", "resp_ip_bytes", "resp_bytes")
TEXTS = ("uid", "conn_state", "history")
USED = (*REQUIRED, "duration", *COUNTS, *TEXTS, "ip_proto")
# Zeek 7.1 logs IP protocols other than TCP, UDP and ICMP as proto `unknown_transport` with the number in the
# `ip_proto` column (read when the proto text is not one of PROTOCOLS)
IP_PROTO = "ip_proto"
# Log::default_scope_sep = "_" writes the connection id as id_orig_h ...: read as id.orig_h
SCOPED = {f"id_{end}_{part}": f"id.{end}_{part}" for end in ("orig", "resp") for part in ("h", "p")}
# what only a conn log holds (Zeek logs them always, with defaults): a JSON log whose first record has none of
# them (dns.log, notice.log, syslog.log also carry id.* and proto) is another log, not read as connections
CONN_ONLY = ("conn_state", "history", "orig_pkts", "resp_pkts", "missed_bytes", "orig_ip_bytes", "duration")
LABEL = "label"
# IoT-23's three label columns joined by spaces into one TSV field (header and rows alike)
JOINED_LABEL_FIELDS = ["tunnel_parents", "label", "detailed-label"]
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1}
ICMP6 = 58
_NUMBER_RE = r"^\d{1,12}(\.\d{1,9})?$"
_COUNT_RE = r"^\d{1,18}$"


class _CutGzip:
    """A gzip'ed file read in the pieces gzip decompresses (read1): a read of n bytes that meets the end of a
    truncated file gives what came before the cut, and the NEXT read raises the EOFError. GzipFile.read(n)
    raised at once and dropped what it had decompressed: a cut .gz under one read (16 MB) landed nothing."""

    def __init__(self, path: Path) -> None:
        self._file = gzip.open(path, "rb")
        self._error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        parts: list[bytes] = []
        have = 0
        while size < 0 or have < size:
            try:
                piece = self._file.read1(size - have if size >= 0 else 1 << 20)
            except (EOFError, gzip.BadGzipFile, OSError) as exc:
                if not parts:
                    raise
                self._error = exc
                break
            if not piece:
                break
            parts.append(piece)
            have += len(piece)
        return b"".join(parts)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _CutGzip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open(path: Path) -> BinaryIO:
    handle = open(path, "rb")
    if handle.read(2) == GZIP_MAGIC:
        handle.close()
        return _CutGzip(path)  # type: ignore[return-value]
    handle.seek(0)
    return handle


def zeek_kind(head: bytes) -> str | None:
    """ "zeek-tsv" / "zeek-json" / None from the first (decompressed) bytes of a file."""
    if head.startswith(b"#separator"):
        return "zeek-tsv"
    first = head.lstrip().split(b"\n", 1)[0]
    if first.startswith(b"{") and (b'"id.orig_h"' in first or b'"id_orig_h"' in first) and b'"ts"' in first:
        return "zeek-json"
    return None


def other_log(head: bytes) -> str | None:
    """Why a Zeek log is not a conn log (its `#path`, or a JSON record without conn.log's fields), from its
    first (decompressed) bytes; None for a conn log, or when the head does not tell."""
    kind = zeek_kind(head)
    if kind == "zeek-tsv":
        separator = _unescape(head.split(b"\n", 1)[0][len(b"#separator") :].strip(b" ").decode("latin-1"))
        for line in head.split(b"\n")[1:16]:
            text = line.rstrip(b"\r").decode("latin-1")
            name, _, value = text.partition(separator) if separator else (text, "", "")
            if name == "#path":
                return None if value == "conn" else f"not a conn log (#path {value[:40]})"
        return None
    if kind == "zeek-json":
        try:
            record = json.loads(head.lstrip().split(b"\n", 1)[0])
        except (ValueError, RecursionError):
            return None
        if not isinstance(record, dict):
            return None
        path = record.get("_path")
        if isinstance(path, str) and path != "conn":
            return f"not a conn log (_path {path[:40]})"
        if path is None and not any(name in record for name in CONN_ONLY):
            return "not a conn log (none of conn.log's fields: " + ", ".join(CONN_ONLY[:3]) + ", ...)"
    return None


def sniff_zeek(path: Path) -> str | None:
    """zeek_kind of a plain or gzip'ed file; None when it is neither form (or a broken gzip)."""
    return zeek_kind(zeek_head(path))


def zeek_head(path: Path) -> bytes:
    """The first 4 KiB of a plain or gzip'ed file, decompressed (b"" for a broken gzip)."""
    try:
        with _open(path) as handle:
            return handle.read(4096)
    except (OSError, EOFError, gzip.BadGzipFile):
        return b""


# ---- text -> typed columns ------------------------------------------------------------------------------------


def _unset(text: pa.Array, unset: str, empty: str) -> pa.Array:
    """Zeek's unset (`-`) and empty (`(empty)`) markers -> null."""
    return pc.if_else(pc.is_in(text, pa.array([unset, empty])), pa.scalar(None, pa.string()), text)


def _micros_from_text(text: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Zeek `time`/`interval` text (seconds, up to 9 decimals) -> int64 µs; returns (values, valid-or-null)."""
    ok = pc.fill_null(pc.match_substring_regex(text, _NUMBER_RE), True)  # null (unset) is not an error
    number = pc.cast(pc.if_else(ok, text, pa.scalar(None, pa.string())), pa.float64())
    values = _micros(number)
    return values, pc.and_(ok, pc.or_(pc.is_null(number), pc.is_valid(values)))


LATEST_SECONDS = 4_102_444_800.0  # 2100-01-01: a time or duration beyond that is an error, not data


def _micros(seconds: pa.Array) -> pa.Array:
    """Seconds -> int64 µs; null outside [0, 2100) (so that no value can overflow what follows).
    |epoch| * 1e6 < 2**53: the nearest double to a 6-decimal time rounds back to its exact µs."""
    sane = pc.and_(pc.greater_equal(seconds, 0.0), pc.less(seconds, LATEST_SECONDS))
    seconds = pc.if_else(sane, seconds, pa.scalar(None, pa.float64()))
    return pc.cast(pc.round(pc.multiply(seconds, 1e6)), pa.int64())


def _count_from_text(text: pa.Array) -> tuple[pa.Array, pa.Array]:
    ok = pc.fill_null(pc.match_substring_regex(text, _COUNT_RE), True)
    return pc.cast(pc.if_else(ok, text, pa.scalar(None, pa.string())), pa.int64()), ok


def _typed_from_text(table: pa.Table, unset: str, empty: str) -> tuple[dict[str, pa.Array], list]:
    """TSV text columns -> the typed columns _connections takes, and the text checks (reason, ok, field)."""
    text = {
        name: _unset(table.column(name).combine_chunks(), unset, empty)
        if name in table.column_names
        else pa.nulls(table.num_rows, pa.string())
        for name in USED
    }
    checks = []
    typed: dict[str, pa.Array] = {name: text[name] for name in ("id.orig_h", "id.resp_h", "proto", *TEXTS)}
    typed["ts"], ok = _micros_from_text(text["ts"])
    checks.append(("bad time", ok, "ts"))
    typed["duration"], ok = _micros_from_text(text["duration"])
    checks.append(("bad duration", ok, "duration"))
    for name in ("id.orig_p", "id.resp_p", *COUNTS, IP_PROTO):
        typed[name], ok = _count_from_text(text[name])
        checks.append((f"bad {name}", ok, name))
    return typed, [(reason, ok, text[name]) for reason, ok, name in checks]


# ---- typed columns -> flow rows -------------------------------------------------------------------------------


def _flags(history: pa.Array, conn_state: pa.Array, is_tcp: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(originator flags, responder flags) as int16, from history letters, else conn_state (unique values)."""
    encoded = pc.dictionary_encode(history)
    words = encoded.dictionary
    orig = np.zeros(len(words), np.int64)
    resp = np.zeros(len(words), np.int64)
    for letter, bits in ZEEK_HISTORY_FLAGS.items():
        seen = np.asarray(pc.match_substring(words, letter), dtype=bool)
        target = orig if letter.isupper() else resp
        target[seen] |= bits
    by_history_o = pc.take(pa.array(orig), encoded.indices)
    by_history_r = pc.take(pa.array(resp), encoded.indices)
    states = pa.array(list(ZEEK_STATE_FLAGS))
    index = pc.index_in(conn_state, value_set=states)
    by_state_o = pc.take(pa.array([o for o, _ in ZEEK_STATE_FLAGS.values()], pa.int64()), index)
    by_state_r = pc.take(pa.array([r for _, r in ZEEK_STATE_FLAGS.values()], pa.int64()), index)
    orig_flags = pc.coalesce(by_history_o, by_state_o, 0)
    resp_flags = pc.coalesce(by_history_r, by_state_r, 0)
    zero = pa.scalar(0, pa.int64())
    return (
        pc.cast(pc.if_else(is_tcp, orig_flags, zero), pa.int16()),
        pc.cast(pc.if_else(is_tcp, resp_flags, zero), pa.int16()),
    )


def _connections(
    typed: dict[str, pa.Array], lines: pa.Array, source: str, text_checks: list, label: pa.Array | None = None
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Typed conn.log columns (one row per connection) -> (flow rows, rejects naming line and field, the
    connections' ground-truth labels when the log has a `label` column)."""
    n = len(lines)
    orig_addr, version, orig_ok = address_text(typed["id.orig_h"])
    resp_addr, _, resp_ok = address_text(typed["id.resp_h"])
    proto_text = pc.utf8_lower(pc.fill_null(typed["proto"], ""))
    proto = pc.take(
        pa.array(list(PROTOCOLS.values()), pa.int16()), pc.index_in(proto_text, pa.array(list(PROTOCOLS)))
    )
    number = typed.get(IP_PROTO)
    if number is not None and number.null_count < len(number):  # (Zeek 7.1: unknown_transport, ip_proto 50)
        usable = pc.and_(pc.greater_equal(number, 0), pc.less_equal(number, 255))
        proto = pc.coalesce(
            proto, pc.cast(pc.if_else(usable, number, pa.scalar(None, pa.int64())), pa.int16())
        )
    is_icmp = pc.fill_null(pc.equal(proto, 1), False)
    proto = pc.if_else(pc.and_(is_icmp, pc.equal(version, 6)), pa.scalar(ICMP6, pa.int16()), proto)
    ports_ok = [
        pc.fill_null(pc.and_(pc.greater_equal(p, 0), pc.less_equal(p, 65535)), False)
        for p in (typed["id.orig_p"], typed["id.resp_p"])
    ]
    counts_ok = pa.array(np.ones(n, bool))
    for name in COUNTS:
        counts_ok = pc.and_(counts_ok, pc.fill_null(pc.greater_equal(typed[name], 0), True))
    duration = pc.fill_null(typed["duration"], 0)
    checks = [
        *text_checks,
        ("bad time", pc.less(typed["ts"], int(LATEST_SECONDS) * 1_000_000), typed["ts"]),  # null: bad too
        ("bad originator address", orig_ok, typed["id.orig_h"]),
        ("bad responder address", resp_ok, typed["id.resp_h"]),
        ("bad originator port", ports_ok[0], typed["id.orig_p"]),
        ("bad responder port", ports_ok[1], typed["id.resp_p"]),
        ("unknown protocol", pc.is_valid(proto), typed["proto"]),
        ("negative count", counts_ok, typed["orig_pkts"]),
        ("negative duration", pc.greater_equal(duration, 0), typed["duration"]),
    ]
    valid, reason, detail = first_failure(checks, n)
    # a start outside units.time_window is rejected here, once per line (the lake's own check, split_implausible,
    # named no line and counted a connection twice: one row per direction)
    starts = pc.cast(typed["ts"], TS)
    outside = pc.and_(valid, pc.invert(plausible_times(starts)))
    if n and pc.any(outside).as_py():
        valid = pc.and_(valid, pc.invert(outside))
        reason = pc.if_else(outside, "time outside plausible window", reason)
        detail = pc.if_else(outside, implausible_detail(starts, "ts_start"), detail)
    rejects = rejects_table(
        lines.filter(pc.invert(valid)),
        detail.filter(pc.invert(valid)),
        reason.filter(pc.invert(valid)),
        source,
    )

    def keep(array: pa.Array) -> pa.Array:
        return array.filter(valid)

    ts = keep(typed["ts"])
    start = pc.cast(ts, TS)
    end = pc.cast(pc.add(ts, keep(duration)), TS)
    is_tcp = pc.fill_null(pc.equal(keep(proto), 6), False)
    orig_flags, resp_flags = _flags(keep(typed["history"]), keep(typed["conn_state"]), is_tcp)
    icmp = pc.fill_null(pc.is_in(keep(proto), pa.array([1, ICMP6], pa.int16())), False)
    orig_p = pc.cast(keep(typed["id.orig_p"]), pa.int32())
    resp_p = pc.cast(keep(typed["id.resp_p"]), pa.int32())
    icmp_port = pc.add(pc.multiply(orig_p, 256), resp_p)  # type*256 + code, as NetFlow carries it
    zero = pa.scalar(0, pa.int32())
    null_port = pa.scalar(None, pa.int32())
    m = len(ts)
    common = {
        "ts_start": start,
        "ts_end": end,
        "proto": keep(proto),
        "ip_version": keep(version),
        "sampling_interval": pa.array(np.ones(m, np.int32)),  # Zeek sees every packet it is given
        "source": pa.array([source] * m, pa.string()),
        "uid": keep(typed["uid"]),
        "conn_state": keep(typed["conn_state"]),
        "history": keep(typed["history"]),
    }
    originator = pa.table(
        {
            **common,
            "src_addr": keep(orig_addr),
            "dst_addr": keep(resp_addr),
            "src_port": pc.if_else(icmp, zero, orig_p),
            "dst_port": pc.if_else(icmp, icmp_port, resp_p),
            "packets": keep(typed["orig_pkts"]),
            "bytes": pc.coalesce(keep(typed["orig_ip_bytes"]), keep(typed["orig_bytes"])),
            "tcp_flags": orig_flags,
        }
    )
    resp_packets = keep(typed["resp_pkts"])
    resp_bytes = pc.coalesce(keep(typed["resp_ip_bytes"]), keep(typed["resp_bytes"]))
    answered = pc.fill_null(pc.or_(pc.greater(resp_packets, 0), pc.greater(resp_bytes, 0)), False)
    responder = pa.table(
        {
            **common,
            "src_addr": keep(resp_addr),
            "dst_addr": keep(orig_addr),
            "src_port": pc.if_else(icmp, zero, resp_p),
            "dst_port": pc.if_else(icmp, null_port, orig_p),
            "packets": resp_packets,
            "bytes": resp_bytes,
            "tcp_flags": resp_flags,
        }
    ).filter(answered)
    flows = pa.concat_tables([as_flows(originator), as_flows(responder)])
    labels = FLOW_LABELS.empty_table()
    if label is not None:
        labels = pa.table(
            {
                "ts_start": start,
                "src_addr": originator.column("src_addr"),
                "dst_addr": originator.column("dst_addr"),
                "src_port": originator.column("src_port"),
                "dst_port": originator.column("dst_port"),
                "proto": keep(proto),
                "label": keep(label),
                "source": common["source"],
                "line": keep(lines),
            }
        ).cast(FLOW_LABELS)
    return flows, rejects, labels


# ---- TSV ------------------------------------------------------------------------------------------------------

# the header lines that set how the lines under them are read; other lines starting with # (#open, #close, #types,
# anything) are comments, dropped with the blank lines
_LAYOUT_HEADERS = (b"#separator", b"#fields", b"#unset_field", b"#empty_field", b"#path")


def _layout_header_starts(data: bytes) -> list[int]:
    """Where the lines that may be layout headers begin, found in numpy: a block of blank or junk lines costs no
    Python (a regex looking for ^# at every line start took 10 s a GiB of blank lines)."""
    raw = np.frombuffer(data, np.uint8)
    hashes = np.flatnonzero(raw == 35)
    heads = hashes[(hashes == 0) | (raw[hashes - 1] == 10)]
    chosen = np.zeros(len(heads), bool)
    for name in _LAYOUT_HEADERS:
        same = heads + len(name) <= len(raw)
        for offset in range(1, len(name)):
            same &= raw[np.minimum(heads + offset, len(raw) - 1)] == name[offset]
        chosen |= same
    return heads[chosen].tolist()


def _unescape(value: str) -> str:
    """Zeek writes the separator header value as `\\x09`."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


class _Layout:
    def __init__(self) -> None:
        self.separator = "\t"
        self.unset = "-"
        self.empty = "(empty)"
        self.fields: list[str] | None = None
        self.path = "conn"
        self.problem: str | None = "no #fields header before this line"
        self.label: str | None = None  # the field holding ground-truth labels, if any

    def key(self) -> tuple:
        """What decides how a line is read: lines under equal keys are parsed together."""
        fields = tuple(self.fields) if self.fields is not None else None
        return (self.separator, self.unset, self.empty, fields, self.label, self.problem)

    def header(self, line: str) -> None:
        # (a later #separator is checked as any other header: an empty, two-character, NUL or non-ASCII one
        # reached pyarrow, whose ValueError was an internal error; the lines under it are now rejects)
        name, _, value = line.partition(self.separator) if self.separator else (line, "", "")
        if line.startswith("#separator"):
            self.separator = _unescape(line[len("#separator") :].strip(" "))
        elif name == "#fields":
            fields = value.split(self.separator)
            if "id.orig_h" not in fields:
                fields = [SCOPED.get(f, f) for f in fields]
            seen: set[str] = set()
            self.fields = []
            for i, f in enumerate(fields):  # a repeated name (a hostile header) must not shadow a real one
                self.fields.append(f if f not in seen else f"{f}#{i}")
                seen.add(f)
            joined = [f for f in self.fields if f.split() == JOINED_LABEL_FIELDS]
            self.label = LABEL if LABEL in self.fields else (joined[0] if joined else None)
        elif name == "#unset_field":
            self.unset = value
        elif name == "#empty_field":
            self.empty = value
        elif name == "#path":
            self.path = value
        else:
            return
        self.problem = None
        if not usable_delimiter(self.separator):
            self.problem = f"unsupported #separator {self.separator!r}"
        elif self.path != "conn":
            self.problem = f"not a conn log (#path {self.path[:40]})"
        elif self.fields is None:
            self.problem = "no #fields header before this line"
        elif missing := [f for f in REQUIRED if f not in self.fields]:
            self.problem = f"#fields lacks {', '.join(missing)}"


def _label_text(column: pa.ChunkedArray, name: str, unset: str, empty: str) -> pa.Array:
    """The label field's text; of IoT-23's joined field, its middle word."""
    text = column.combine_chunks()
    if name != LABEL:
        words = pc.split_pattern_regex(pc.utf8_trim_whitespace(text), r"\s+")
        text = pc.list_element(pc.if_else(pc.greater_equal(pc.list_value_length(words), 2), words, None), 1)
    return _unset(text, unset, empty)


def _tsv_segment(
    segments: list[bytes], first_lines: list[int], layout: _Layout, source: str
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Data lines under one layout (the `segments` of a block read under it, each whole lines starting at line
    `first_lines[i]`) -> (flows, rejects, labels), all segments in one parse: a header line before every data
    line made one pyarrow parse and one _connections a line (~10 ms: 20,000 such pairs took 200 s of CPU).
    Blank lines, lines of another width and lines with a lone CR are sifted out in numpy (delimited.sift_lines)
    before pyarrow sees the rest: each had been a Python callback of pyarrow's reader, and a block of blank lines
    made it raise "Empty CSV file", after which every line was walked in Python (a 261 KB .gz of 256 MiB of
    newlines: 20 s of CPU; 63 M junk lines in a 2.6 MB .gz: over 10 minutes)."""
    segment, file_line = joined_segments(segments, first_lines)  # (file_line: of a 0-based line of `segment`)

    def sift(delimiter: str, fields: int, refuse: str | None) -> tuple[bytes, np.ndarray, pa.Table]:
        compact, numbers, rejects = sift_lines(segment, 0, source, delimiter, fields, refuse, b"#")
        where = np.asarray(rejects.column("line").combine_chunks(), np.int64)
        rejects = rejects.set_column(1, "line", pa.array(file_line(where), pa.int64()))
        return compact, file_line(numbers), rejects

    if layout.problem is not None:  # every non-blank line of the segment is a reject, with the reason
        _, _, rejects = sift("\t", 0, layout.problem)
        return FLOWS.empty_table(), rejects, FLOW_LABELS.empty_table()
    assert layout.fields is not None
    include = [f for f in USED if f in layout.fields] + ([layout.label] if layout.label else [])
    compact, numbers, rejects = sift(layout.separator, len(layout.fields), None)
    parts = [rejects]
    flows, labels = FLOWS.empty_table(), FLOW_LABELS.empty_table()
    if not compact:
        return flows, rejects, labels
    try:
        table, lines, invalid = read_block(compact, 1, layout.separator, layout.fields, include)
    except pa.ArrowException as exc:  # what pyarrow cannot split at all: every line of it, with the reason
        _, _, rejects = sift("\t", 0, f"unreadable: {str(exc)[:80]}")
        return flows, rejects, labels
    # (line numbers of the compacted segment -> the file's; every line has the width now: invalid is empty)
    lines = pa.array(numbers[np.asarray(lines, np.int64) - 1])
    if invalid:
        kept = [(int(numbers[n - 1]), t) for n, t in invalid]
        parts.append(line_rejects(kept, f"expected {len(layout.fields)} fields", source))
    if table.num_rows:  # a blank line reads as a row of empty fields: not data, not a reject
        blank = pc.and_(pc.equal(table.column("ts"), ""), pc.equal(table.column("id.orig_h"), ""))
        if pc.any(blank).as_py():
            table, lines = table.filter(pc.invert(blank)), lines.filter(pc.invert(blank))
    if table.num_rows:
        typed, checks = _typed_from_text(table, layout.unset, layout.empty)
        label = (
            _label_text(table.column(layout.label), layout.label, layout.unset, layout.empty)
            if layout.label
            else None
        )
        flows, rejects, labels = _connections(typed, lines, source, checks, label)
        parts.append(rejects)
    return flows, pa.concat_tables(parts) if parts else empty_rejects(), labels


Batch = tuple[pa.Table, pa.Table, pa.Table]  # (flows, rejects, flow labels)


def _iter_tsv(handle: BinaryIO, source: str, block_size: int) -> Iterator[Batch]:
    layout = _Layout()
    for block in iter_line_blocks(handle, block_size):
        data = block.data
        out_flows, out_rejects, out_labels = [], [], []
        if block.too_long:
            out_rejects.append(too_long_rejects(source, block.too_long))
        # the block's segments (the lines between layout headers) grouped by the layout they are read under
        groups = header_segments(
            data,
            block.first_line,
            _layout_header_starts(data),
            lambda: (layout.key(), copy.copy(layout)),
            lambda line: layout.header(line.rstrip(b"\r\n").decode("latin-1")),
        )
        for group_layout, segments, first_lines in groups:
            flows, rejects, labels = _tsv_segment(segments, first_lines, group_layout, source)
            out_flows.append(flows)
            out_rejects.append(rejects)
            out_labels.append(labels)
        yield (
            pa.concat_tables([FLOWS.empty_table(), *out_flows]),
            pa.concat_tables([empty_rejects(), *out_rejects]).sort_by("line"),
            pa.concat_tables([FLOW_LABELS.empty_table(), *out_labels]),
        )


# ---- JSON -----------------------------------------------------------------------------------------------------

_JSON_COUNTS = {name: pa.int64() for name in ("id.orig_p", "id.resp_p", *COUNTS, IP_PROTO)}


def _json_schema(ts_type: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            ("ts", ts_type),
            ("duration", pa.float64()),
            ("id.orig_h", pa.string()),
            ("id.resp_h", pa.string()),
            ("proto", pa.string()),
            *[(name, pa.string()) for name in TEXTS],
            *_JSON_COUNTS.items(),
        ]
    )


def _read_json_chunk(chunk: bytes, schema: pa.Schema) -> pa.Table:
    return pajson.read_json(
        pa.BufferReader(chunk),  # (Arrow's own reader, no Python file: fsutil.arrow_file says why)
        read_options=pajson.ReadOptions(use_threads=False, block_size=max(len(chunk), 1 << 16)),
        parse_options=pajson.ParseOptions(
            explicit_schema=schema, unexpected_field_behavior="ignore", newlines_in_values=False
        ),
    )


_INT64 = (-(1 << 63), (1 << 63) - 1)


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):  # Arrow reads the first one, orjson and json the last
        raise ValueError(f"a key given twice: {sorted({k for k in keys if keys.count(k) > 1})[:3]}")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_line_error(line: bytes, schema: pa.Schema) -> str | None:
    """Why Arrow's reader (explicit `schema`) would refuse this line, found in Python (the stdlib's json: a few µs
    a line, run only on a block Arrow refused), or None when it looks fine. As strict as Arrow where an attacker
    could make the two differ: a key given twice, a lone surrogate escape, NaN."""
    try:
        obj = json.loads(line, object_pairs_hook=_no_repeated_keys, parse_constant=_no_constant)
        json.dumps(obj, ensure_ascii=False).encode()  # a lone surrogate (\ud800), which Arrow refuses
    except (ValueError, RecursionError) as exc:
        return (str(exc).split("\n", 1)[0] or type(exc).__name__)[:160]
    if not isinstance(obj, dict):
        return f"not a JSON object: {line[:60]!r}"
    for field in schema:
        value = obj.get(field.name)
        if value is None:
            continue
        if pa.types.is_string(field.type):
            ok = isinstance(value, str)
        elif pa.types.is_integer(field.type):
            ok = isinstance(value, int) and not isinstance(value, bool) and _INT64[0] <= value <= _INT64[1]
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            return f"{field.name}: {type(value).__name__} where {field.type} is expected"
    return None


JSON_PIECES = 64


def _parse_json_lines(
    data: bytes, starts: np.ndarray, ends: np.ndarray, schema: pa.Schema
) -> Iterator[tuple[np.ndarray, pa.Table | None, str | None]]:
    """Parse lines [i] = data[starts[i]:ends[i]]. Yields (line indices, table, None) or ([index], None, error).
    The whole block is one Arrow parse; when it fails, each of its JSON_PIECES pieces is, and the lines of a
    piece that fails are checked in Python (json and the schema's types, a few µs a line) and the good ones
    parsed together again. Halving the block until each bad line
    stood alone cost two Arrow parses (~85 µs each) per bad line: 100,000 junk lines (545 bytes gzipped) took
    17 s of CPU. Lines Python passes and Arrow still refuses (rare) are then halved among themselves."""
    try:
        table = _read_json_chunk(data[starts[0] : ends[-1]] + b"\n", schema)
        if table.num_rows == len(starts):
            yield np.arange(len(starts)), table, None
            return
    except pa.ArrowInvalid:
        pass
    # the block in JSON_PIECES pieces, each parsed by Arrow: only the lines of a piece it refuses are checked in
    # Python (one line cut short by a Zeek still writing sent all ~50 k lines of its 16 MiB block through the
    # stdlib: 3.5x the file's CPU at one bad line in 100 k; performance review, session 38)
    for piece in np.array_split(np.arange(len(starts)), min(JSON_PIECES, len(starts))):
        try:
            table = _read_json_chunk(data[starts[piece[0]] : ends[piece[-1]]] + b"\n", schema)
            if table.num_rows == len(piece):
                yield piece, table, None
                continue
        except pa.ArrowInvalid:
            pass
        good = []
        for i in piece.tolist():
            error = _json_line_error(data[starts[i] : ends[i]], schema)
            if error is None:
                good.append(i)
            else:
                yield np.array([i]), None, error
        # (the piece's good lines together, apart from other pieces': every table is lines of one piece, in order)
        stack = [np.array(good, np.int64)] if good else []
        while stack:
            rows = stack.pop()
            chunk = b"\n".join(data[starts[i] : ends[i]] for i in rows.tolist()) + b"\n"
            try:
                table = _read_json_chunk(chunk, schema)
                if table.num_rows != len(rows):  # two objects on one line: which line is which is lost
                    raise pa.ArrowInvalid(f"{table.num_rows} JSON values on {len(rows)} lines")
                yield rows, table, None
            except pa.ArrowInvalid as exc:
                if len(rows) == 1:
                    yield rows, None, str(exc).split("\n", 1)[0][:160]
                else:
                    stack += [rows[len(rows) // 2 :], rows[: len(rows) // 2]]


def _iter_json(handle: BinaryIO, source: str, block_size: int) -> Iterator[Batch]:
    ts_type: pa.DataType | None = None
    for block in iter_line_blocks(handle, block_size):
        data = block.data
        if b'"id_orig_h":' in data or b'"id_resp_h":' in data:  # (Log::default_scope_sep = "_": same length)
            for scoped, dotted in SCOPED.items():
                data = data.replace(f'"{scoped}":'.encode(), f'"{dotted}":'.encode())
        rejects = [too_long_rejects(source, block.too_long)] if block.too_long else []
        raw = np.frombuffer(data, np.uint8)
        ends = np.flatnonzero(raw == 10)
        if len(data) and data[-1:] != b"\n":
            ends = np.append(ends, len(data))
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        lines = block.first_line + np.arange(len(starts), dtype=np.int64)
        stripped_ends = ends - (raw[np.maximum(ends - 1, 0)] == 13)  # CRLF
        filled = stripped_ends > starts
        starts, ends, lines = starts[filled], stripped_ends[filled], lines[filled]
        if not len(starts):
            yield (
                FLOWS.empty_table(),
                pa.concat_tables([empty_rejects(), *rejects]),
                FLOW_LABELS.empty_table(),
            )
            continue
        if ts_type is None:
            ts_type = (
                pa.string() if b'"ts":"' in data[starts[0] : ends[0]].replace(b" ", b"") else pa.float64()
            )
        tables, firsts, bad = [], [], []
        for rows, table, error in _parse_json_lines(data, starts, ends, _json_schema(ts_type)):
            if table is None:
                bad.append((int(rows[0]), error))
            else:
                tables.append(table)
                firsts.append(rows)
        if bad:
            rejects.append(
                rejects_table(
                    pa.array([lines[i] for i, _ in bad], pa.int64()),
                    pa.array([data[starts[i] : ends[i]].decode("latin-1") for i, _ in bad], pa.string()),
                    pa.array([f"bad json: {e}" for _, e in bad], pa.string()),
                    source,
                )
            )
        if tables:
            order = np.argsort([int(rows[0]) for rows in firsts])
            table = pa.concat_tables([tables[i] for i in order])
            numbers = np.concatenate([lines[firsts[i]] for i in order])
            typed = {name: table.column(name).combine_chunks() for name in table.column_names}
            if ts_type == pa.string():  # JSON::TS_ISO8601: "2024-03-12T10:00:00.123456Z"
                typed["ts"] = _iso_micros(typed["ts"])
            else:  # epoch seconds; JSON::TS_MILLIS writes milliseconds (1591367999305: year 52,000 in seconds)
                seconds = typed["ts"]
                millis = pc.fill_null(pc.greater_equal(seconds, 1e11), False)
                typed["ts"] = _micros(pc.if_else(millis, pc.divide(seconds, 1000.0), seconds))
            given = typed["duration"]
            typed["duration"] = _micros(given)
            checks = [("bad duration", pc.or_(pc.is_null(given), pc.is_valid(typed["duration"])), given)]
            flows, more, _ = _connections(typed, pa.array(numbers), source, checks)
            rejects.append(more)
        else:
            flows = FLOWS.empty_table()
        yield flows, pa.concat_tables([empty_rejects(), *rejects]).sort_by("line"), FLOW_LABELS.empty_table()


def _iso_micros(text: pa.Array) -> pa.Array:
    """ISO 8601 UTC text -> int64 µs, null where it is not one."""
    ok = pc.fill_null(pc.match_substring_regex(text, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$"), False)
    clean = pc.if_else(ok, pc.utf8_rtrim(text, "Z"), pa.scalar(None, pa.string()))
    try:
        stamps = pc.cast(clean, pa.timestamp("us"))
    except pa.ArrowInvalid:
        return pa.nulls(len(text), pa.int64())
    return pc.cast(stamps, pa.int64())


# ---- the readers ----------------------------------------------------------------------------------------------


def iter_conn_log(path: Path | str, block_size: int = 1 << 24) -> Iterator[Batch]:
    """A Zeek conn.log (TSV or JSON, plain or gzip), streamed: batches of (flows in schema.FLOWS, rejects with
    line numbers, ground-truth labels in schema.FLOW_LABELS when the log is labelled), ~`block_size` bytes of
    text each. Malformed lines become rejects, every other line lands."""
    path = Path(path)
    kind = sniff_zeek(path)
    if kind is None:
        raise InputError(f"{path} is not a Zeek conn.log (neither a #separator header nor JSON lines)")
    try:
        with _open(path) as handle:
            reader = _iter_tsv if kind == "zeek-tsv" else _iter_json
            yield from reader(handle, str(path), block_size)
    except (EOFError, gzip.BadGzipFile, OSError) as exc:  # a truncated .gz: what came before it landed
        yield (
            FLOWS.empty_table(),
            rejects_table(
                pa.array([0], pa.int64()), pa.array([str(exc)[:200]]), pa.array(["truncated gzip"]), str(path)
            ),
            FLOW_LABELS.empty_table(),
        )


def _collect(batches: list[Batch]) -> Batch:
    return (
        pa.concat_tables([FLOWS.empty_table(), *[b[0] for b in batches]]),
        pa.concat_tables([empty_rejects(), *[b[1] for b in batches]]),
        pa.concat_tables([FLOW_LABELS.empty_table(), *[b[2] for b in batches]]),
    )


def parse_conn_log(data: bytes, source: str, block_size: int = 1 << 24) -> Batch:
    """Text of a conn.log (either form) -> (flows, rejects, labels). Pure."""
    kind = zeek_kind(data[:4096])
    if kind is None:
        raise InputError(f"{source} is not a Zeek conn.log")
    reader = _iter_tsv if kind == "zeek-tsv" else _iter_json
    return _collect(list(reader(io.BytesIO(data), source, block_size)))


def read_conn_log(path: Path | str) -> Batch:
    """iter_conn_log, collected into one (flows, rejects, labels) triple."""
    return _collect(list(iter_conn_log(path)))
