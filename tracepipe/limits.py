"""Limits on everything an exporter or a file controls, declared once (README: "Limits").

Anyone who can reach the collector's port, or write a file that tracepipe ingests, chooses sizes: how many
templates, exporters and fields, how long a line, how deep a JSON document, how large a capture record claims to
be. Each limit here has a default that real sources stay far below; a hit is counted (per reason) where the
reader reports, the offending piece is skipped, and the rest of the input is still processed.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from tracepipe.errors import UsageError

try:  # 3x faster than the stdlib on notification dumps; its errors subclass json.JSONDecodeError
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - without orjson, the stdlib decoder
    _fast_loads = json.loads


@dataclass(frozen=True)
class Limits:
    """The limits (see the README table for what happens when each is hit)."""

    # NetFlow v9 / IPFIX decoder state (per collector, or per `ingest netflow` run)
    exporters: int = 4096  # exporters with templates / sequence state
    exporter_idle_s: int = 3600  # an exporter that delivered flows keeps its place unless silent this long
    # ... once it has been heard over this long; until then a newcomer may take its place when all are taken
    exporter_settle_s: int = 600
    domains_per_exporter: int = 16  # v9 source ids / IPFIX observation domains per exporter
    templates_per_domain: int = 256  # data templates per (exporter, version, domain)
    options_templates_per_domain: int = 16  # options templates per (exporter, version, domain)
    templates_total: int = 16384  # templates of all exporters together
    fields_per_template: int = 1024  # fields in one template
    template_fields_total: int = 262_144  # fields of all templates together (what their memory grows with)
    # fields of one exporter's templates: a quarter of the total, so that one exporter filling it evicts its own
    template_fields_per_exporter: int = 65_536
    template_record_bytes: int = 65515  # one record: more cannot fit a 65535-byte datagram with its headers
    pending_flowsets: int = 20_000  # data sets waiting for their template
    pending_bytes: int = 16 << 20  # ... and their bytes
    decoder_state_bytes: int = 64 << 20  # decoder-state.json larger than this is not read
    # days a collector segment's flows may fall on outside the days its datagrams arrived (see collector.near_days)
    far_days_per_segment: int = 4
    # files
    line_bytes: int = 1 << 20  # one line of syslog, nfdump CSV, Nova/Neutron JSONL, generic CSV/JSONL, intel
    xml_bytes: int = 16 << 20  # an OpenNebula VM XML (`onevm show -x`)
    capture_record_bytes: int = 262_144  # one pcap/pcapng record (tcpdump's largest snaplen)

    def override(self, assignments: Iterable[str]) -> Limits:
        """A copy with `NAME=VALUE` assignments applied (e.g. from `collect --limit exporters=8192`)."""
        names = {f.name for f in dataclasses.fields(self)}
        changes: dict[str, int] = {}
        for assignment in assignments:
            name, sep, value = assignment.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in names:
                raise UsageError(
                    f"--limit {assignment!r}: use NAME=NUMBER with NAME one of {', '.join(sorted(names))}"
                )
            try:
                number = int(value.replace("_", ""))
            except ValueError:
                number = -1
            if number < 1:
                raise UsageError(f"--limit {assignment!r}: the value must be a whole number of at least 1")
            changes[name] = number
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Limits:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in obj.items() if k in names})


DEFAULT = Limits()

# byte and packet sums saturate instead of wrapping: the counters are the exporters' to set, and one forged
# record of 2^64-1 bytes (clipped to 2^63-1 by the decoder) made a host's Int64 sum wrap negative: its
# exfiltration alert was gone; sums past 2^64 ended every sweep report of their window (hostile reviews).
# 2^62 is beyond every threshold (detect.features.saturating_sum)
SUM_CAP = 2**62


# How long one flow record may last for the questions asked by time (`trace`: which flows reach into a window).
# Exporters cut a connection into records at their active timeout (routers: 30 min at most, fprobe 5 min); the
# longest default is softflowd's `maxlife`, 604800 s. The exporter writes ts_end, so a record is taken to last
# from ts_start to ts_end but no longer than this: a window looks this far back for flows started before it
# (a long-lived C&C session was invisible to `trace` asked inside it), and no further.
MAX_FLOW_DURATION = dt.timedelta(days=7)


def saturating_sum_sql(expr: str) -> str:
    """SQL sum(expr) as a BIGINT of at most SUM_CAP (DuckDB sums BIGINT exactly, as HUGEINT)."""
    return f"CAST(least(sum({expr}), {SUM_CAP}) AS BIGINT)"


# ---- JSON ---------------------------------------------------------------------------------------------------


JSON_DEPTH = 1024  # orjson's fixed nesting limit; the stdlib parser stops near its recursion limit (~1000)


class JsonTooDeep(json.JSONDecodeError):
    """A JSON document nested deeper than the parser takes: a JSONDecodeError, so every reader that turns
    those into rejects (with their line and message) does so for this one too."""


# a JSON string's escapes, in the order a parser reads them: an escaped backslash (so that the "\\u" of
# "\\\\ud800" is text, not an escape), a surrogate pair (kept), a lone surrogate (replaced)
_SURROGATE_ESCAPES = re.compile(
    r"(\\\\)|(\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)


def json_loads(text: str | bytes) -> Any:
    """json.loads that raises nothing but JSONDecodeError for a bad document (never RecursionError, nor the
    stdlib's ValueError for an integer of over 4,300 digits), so every reader that turns those into rejects
    (with their line and message) does so for all. orjson stops at JSON_DEPTH levels with a JSONDecodeError;
    the stdlib parser (without orjson) hits the interpreter's recursion limit, turned into JsonTooDeep here.
    No pre-scan of brackets: one inside a string (a VM named "[[[[...") must not make an event a reject.

    JSON may escape lone UTF-16 surrogates (`"\\udcff"`); orjson refuses such a document and Arrow cannot hold
    such text. A tenant who names a VM that way must not make its events vanish: each lone surrogate escape
    in the text becomes U+FFFD's and the document is parsed again, by the same parser and with the same
    limits (a hostile review: with a surrogate in a VM name, the stdlib's parse and a recursive clean-up of
    the result raised RecursionError at ~500 levels and ValueError for a 5,000-digit number, and the whole
    file was lost)."""
    try:
        return _loads(text)
    except json.JSONDecodeError:
        doc = text if isinstance(text, str) else text.decode("utf-8", errors="surrogateescape")
        repaired = _SURROGATE_ESCAPES.sub(lambda m: m.group(1) or m.group(2) or "\\ufffd", doc)
        if repaired == doc:
            raise
        return _loads(repaired)


def _loads(text: str | bytes) -> Any:
    try:
        return _fast_loads(text)
    except RecursionError:
        doc = text if isinstance(text, str) else text.decode("utf-8", errors="replace")
        raise JsonTooDeep(f"nested deeper than {JSON_DEPTH} levels", doc[:100], 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # the stdlib's integer digit limit; orjson's errors are JSONDecodeErrors
        doc = text if isinstance(text, str) else text.decode("utf-8", errors="replace")
        raise json.JSONDecodeError(str(exc), doc[:100], 0) from None


# ---- lines ----------------------------------------------------------------------------------------------------


@dataclass
class LineBlock:
    """Whole lines of a file. Lines longer than the limit are replaced by an empty line (so line numbers
    stay exact) and listed in `too_long` as (line number, length in bytes)."""

    first_line: int
    data: bytes
    too_long: list[tuple[int, int]]


def text_lines(text: str) -> list[str]:
    """A text's lines as files end them: at LF (a CR before it dropped). Not str.splitlines(), which also ends
    a line at U+2028/2029, NEL, VT, FF and FS/GS/RS: characters valid inside a JSON string (a VM name, `jq -c`
    and ensure_ascii=False write them raw) or a CSV cell, which then cut one record in two rejects."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


@dataclass(frozen=True)
class CsvLine:
    """One non-blank line of a CSV text: its 1-based number and its cells, or (`problem` set) why it is not a
    row on its own, with the csv module's words and the line's start in `detail`."""

    number: int
    cells: list[str]
    problem: str = ""
    detail: str = ""


# A quoted cell of a format whose every row quotes its text cells (MISP's CSV export: an analyst's comment
# of several lines) may run over this many line ends; see csv_lines
SPANNED_LINES = 50


def csv_lines(
    text: str, spanning: bool = False, delimiter: str = ",", span_lines: int | None = SPANNED_LINES
) -> Iterator[CsvLine]:
    """The CSV readers of observation lists, MISP CSV exports and generic VM inventories: each non-blank line
    read on its own, strictly. One line is one row in these formats, so a quoted cell still open at the line's
    end ("quoted cell not closed on its line"), a stray quote after a closing one or a cell over the csv
    module's field limit of 128 KiB ("not a CSV line") is that line's problem alone; read as one CSV document,
    an unclosed quote swallowed every later line into one cell (their records gone, no reject).

    `spanning` (MISP CSV, generic VM inventories): a quoted cell open at a line's end may go on over up to
    `span_lines` more lines (None: any number; and `line_bytes` in all), where it closes with the row read
    whole (numbered by its first line); a stray
    quote instead meets the next row's quoted cells, which ends the attempt at once (a quote not followed by
    a comma is an error in strict CSV): that line alone is the reject, and the next is read as before."""
    lines = text_lines(text)
    at = 0
    while at < len(lines):
        number, line = at + 1, lines[at]
        at += 1
        if not line.strip():
            continue
        try:
            cells = next(csv.reader((line,), strict=True, delimiter=delimiter), [])
        except csv.Error as exc:
            unclosed = "end of data" in str(exc)
            joined = _spanned(lines, at - 1, span_lines) if spanning and unclosed else None
            if joined is not None:
                cells, more = joined
                at += more
                yield CsvLine(number, cells)
                continue
            problem = "quoted cell not closed on its line" if unclosed else "not a CSV line"
            yield CsvLine(number, [], problem, f"{exc}: {line[:200]}")
            continue
        yield CsvLine(number, cells)


def _spanned(lines: list[str], first: int, span_lines: int | None) -> tuple[list[str], int] | None:
    """The cells of the row that begins at lines[first] with a quoted cell open at its end, read over the next
    lines until it closes (and how many lines more it took); None when it does not close cleanly within
    `span_lines` more lines (None: any number) and `line_bytes` (csv_lines). One pass of the csv module over
    the lines, whatever their number."""
    budget = DEFAULT.line_bytes
    last = len(lines) if span_lines is None else min(len(lines), first + 1 + span_lines)

    def feed() -> Iterator[str]:
        nonlocal budget
        for at in range(first, last):
            budget -= len(lines[at]) + 1
            if budget < 0:
                raise _Overlong
            yield lines[at] + "\n"

    reader = csv.reader(feed(), strict=True)
    try:
        cells = next(reader)
    except (csv.Error, _Overlong, StopIteration):
        return None
    return cells, reader.line_num - 1


class _Overlong(Exception):
    """A spanned row past limits.line_bytes (_spanned)."""


def iter_line_blocks(
    handle: BinaryIO, block_bytes: int = 32 << 20, limits: Limits = DEFAULT
) -> Iterator[LineBlock]:
    """Blocks of whole lines, about `block_bytes` each, never holding more than `limits.line_bytes` of one
    line in memory: a 1 GB line without a newline is read through and reported, not kept."""
    max_line = limits.line_bytes
    block_bytes = max(block_bytes, 1)
    first_line = 1
    carry = b""
    skipping = 0  # > 0: inside an over-long line, this many bytes of it seen so far
    while True:
        chunk = handle.read(block_bytes)
        if not chunk:
            break
        if skipping:
            cut = chunk.find(b"\n")
            if cut < 0:
                skipping += len(chunk)
                continue
            yield LineBlock(first_line, b"\n", [(first_line, skipping + cut)])
            first_line += 1
            skipping = 0
            chunk = chunk[cut + 1 :]
        data = carry + chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            if len(data) > max_line:
                carry, skipping = b"", len(data)
            else:
                carry = data
            continue
        block, carry = data[: cut + 1], data[cut + 1 :]
        if len(carry) > max_line:
            carry, skipping = b"", len(carry)
        too_long: list[tuple[int, int]] = []
        if len(block) > max_line and _may_hold_long_line(block, max_line):
            block, too_long = _drop_long_lines(block, first_line, max_line)
        yield LineBlock(first_line, block, too_long)
        first_line += block.count(b"\n")
    if skipping:
        yield LineBlock(first_line, b"", [(first_line, skipping)])
    elif carry:
        yield LineBlock(first_line, carry, [])


def _may_hold_long_line(block: bytes, max_line: int) -> bool:
    """False when every window of max_line // 2 bytes holds a newline: then no line is longer than max_line.
    A few dozen `find`s per block instead of a scan of every byte (the common case: short lines)."""
    step = max(max_line // 2, 1)
    return any(block.find(b"\n", start, start + step) < 0 for start in range(0, len(block), step))


def _drop_long_lines(block: bytes, first_line: int, max_line: int) -> tuple[bytes, list[tuple[int, int]]]:
    """The lines of `block` (which ends with a newline) with those over `max_line` bytes emptied; found in
    bulk (newline positions with numpy), rebuilt only when one is there."""
    ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts
    long = np.flatnonzero(lengths > max_line)
    if not len(long):
        return block, []
    parts, pos = [], 0
    for index in long.tolist():
        parts.append(block[pos : int(starts[index])])
        pos = int(ends[index])  # keep its newline
    parts.append(block[pos:])
    too_long = [(first_line + i, int(lengths[i])) for i in long.tolist()]
    return b"".join(parts), too_long


def read_text_bounded(handle: BinaryIO, limits: Limits = DEFAULT) -> tuple[str, list[tuple[int, int]]]:
    """A whole text file (UTF-8, bad bytes replaced) with over-long lines emptied, and those lines as
    (line number, length). For readers that take the text of a file at once."""
    parts, too_long = [], []
    for block in iter_line_blocks(handle, limits=limits):
        parts.append(block.data)
        too_long.extend(block.too_long)
    return b"".join(parts).decode("utf-8", errors="replace"), too_long


LINE_TOO_LONG = "limit line_bytes"  # the reject reason of an over-long line


def too_long_detail(length: int, limits: Limits = DEFAULT) -> str:
    return f"line of {length} bytes, more than the limit of {limits.line_bytes}; skipped"


def too_long_rejects(source: str, too_long: list[tuple[int, int]], limits: Limits = DEFAULT) -> pa.Table:
    """Rejects (source, line, reason, detail) of over-long lines, as the text readers' rejects are shaped."""
    return pa.table(
        {
            "source": pa.array([source] * len(too_long), pa.string()),
            "line": pa.array([line for line, _ in too_long], pa.int64()),
            "reason": pa.array([LINE_TOO_LONG] * len(too_long), pa.string()),
            "detail": pa.array([too_long_detail(n, limits) for _, n in too_long], pa.string()),
        }
    )
