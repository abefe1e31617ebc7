"""One block of delimited text lines -> a table of text columns with each row's line number, and the lines of
another width. Shared by the text flow readers (nfdump CSV and fmt: output, Zeek TSV, argus CSV)."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from tracepipe.address_text import canonical_texts
from tracepipe.limits import DEFAULT as DEFAULT_LIMITS
from tracepipe.limits import Limits, LineBlock, _drop_long_lines, _may_hold_long_line
from tracepipe.units import CANONICAL_IPV4_RE


def iter_file_blocks(
    path: str,
    block_bytes: int = 1 << 24,
    limits: Limits = DEFAULT_LIMITS,
    start: int = 0,
    end: int | None = None,
    counters: dict[str, int] | None = None,
) -> Iterator[LineBlock]:
    """limits.iter_line_blocks for a regular file, with one copy of each byte instead of three: a window of
    `block_bytes` is read at its offset (os.pread) and cut after its last newline; the next window starts
    there. Lines longer than limits.line_bytes are emptied and listed, and never held whole in memory.
    `start`/`end`: only the bytes in between (a range from file_ranges, cut at line ends); line 1 is the
    range's first line. `counters` (if given) gets "lines": the newlines read so far."""
    max_line = limits.line_bytes
    block_bytes = max(block_bytes, 2 * max_line + 2)  # a window always holds a whole line within limits
    with open(path, "rb") as handle:
        fd = handle.fileno()
        position, line = start, 1

        def pread(size: int, offset: int) -> bytes:
            return os.pread(fd, size if end is None else max(0, min(size, end - offset)), offset)

        while True:
            window = pread(block_bytes, position)
            if not window:
                return
            at_end = len(window) < block_bytes
            cut = window.rfind(b"\n")
            if cut < 0 and not at_end:  # one line longer than the window: read through to its end
                length, window = len(window), b""  # (the window is let go: only one piece is held)
                step = min(block_bytes, 1 << 20)
                while True:
                    more = pread(step, position + length)
                    newline = more.find(b"\n")
                    length += newline if newline >= 0 else len(more)
                    if newline >= 0 or len(more) < step:
                        break
                yield LineBlock(line, b"\n" if newline >= 0 else b"", [(line, length)])
                if newline < 0:
                    return
                position, line = position + length + 1, line + 1
                if counters is not None:
                    counters["lines"] = line - 1
                continue
            tail = b""
            if at_end and not window.endswith(b"\n"):  # the last line has no newline
                cut = len(window) - 1
                if len(window) - window.rfind(b"\n") - 1 > max_line:
                    tail, window = window, window[: window.rfind(b"\n") + 1]
                    cut = len(window) - 1
            block = window if cut == len(window) - 1 else window[: cut + 1]
            too_long: list[tuple[int, int]] = []
            if len(block) > max_line and _may_hold_long_line(block, max_line):
                block, too_long = _drop_long_lines(block, line, max_line)
            if block:
                yield LineBlock(line, block, too_long)
            line += block.count(b"\n")
            if counters is not None:
                counters["lines"] = line - 1
            if tail:
                yield LineBlock(line, b"", [(line, len(tail) - len(window))])
            if at_end:
                return
            position += cut + 1


def file_ranges(path: str, range_bytes: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges of about `range_bytes` that cover the file, each cut after a newline (or at
    its end), so that each can be read alone (iter_file_blocks). Reads only near the cuts."""
    ranges: list[tuple[int, int]] = []
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        position = 0
        while position < size:
            cut = min(position + max(range_bytes, 1), size)
            while cut < size:  # on to the next newline (through a long line, 64 KiB at a time)
                piece = os.pread(handle.fileno(), 1 << 16, cut)
                newline = piece.find(b"\n")
                if newline >= 0:
                    cut += newline + 1
                    break
                cut = size if not piece else cut + len(piece)
            ranges.append((position, cut))
            position = cut
    return ranges


def read_block(
    chunk: bytes,
    first_line: int,
    delimiter: str,
    columns: list[str] | tuple[str, ...],
    include: list[str] | tuple[str, ...],
    skip_rows: int = 0,
    threads: bool = True,
) -> tuple[pa.Table, pa.Array, list[tuple[int, str]]]:
    """`chunk` (whole lines; its first line is line `first_line` of the file) -> (the `include` columns as
    text, their line numbers, the lines of another width as (line number, text)). `threads=False`: one
    thread (in a decode worker, where the processes already share the cores: ~20% less CPU than threads).

    pyarrow's CSV reader parses the chunk serially, so its invalid-row handler knows line numbers; valid row j
    then sits on line first + skip + j + #(invalid lines with at most j valid rows before them). No quoting:
    the formats read here have none. Decoded as Latin-1, so that a damaged byte only spoils its own field
    (rejected by the field checks) and never stops the reader."""
    # Fast path (the common case): pure ASCII text is read as UTF-8 (the same characters as
    # Latin-1, without the Python-level transcoding pyarrow does for other encodings) and parsed on all cores.
    # Threads do not know the line numbers of invalid rows; that costs nothing when the only invalid lines are
    # the block's last ones (nfdump's Summary trailer): then every row's line follows from its position.
    # Anything else (a malformed line inside, non-ASCII bytes, CR line ends) is read serially, as before.
    if skip_rows and not chunk.endswith(b"\n") and chunk.count(b"\n") < skip_rows:
        chunk += b"\n"  # pyarrow cannot skip a header that is the last line and lacks its newline: it raises
    ascii_only = chunk.isascii() and b"\r" not in chunk
    if ascii_only and threads:
        invalid_text: list[str] = []
        table = _read_csv(chunk, columns, include, skip_rows, delimiter, "utf8", True, invalid_text)
        tail = _last_lines(chunk, len(invalid_text))
        if tail is not None and sorted(tail) == sorted(invalid_text):
            numbers = first_line + skip_rows + np.arange(table.num_rows, dtype=np.int64)
            last = first_line + skip_rows + table.num_rows
            return table, pa.array(numbers), list(zip(range(last, last + len(tail)), tail, strict=True))
    invalid: list[tuple[int, str]] = []
    table = _read_csv(
        chunk, columns, include, skip_rows, delimiter, "utf8" if ascii_only else "latin-1", False, invalid
    )
    bad = np.array([number for number, _ in invalid if number > 0], dtype=np.int64)
    valid_before = bad - (skip_rows + 1) - np.arange(len(bad), dtype=np.int64)
    rows = np.arange(table.num_rows, dtype=np.int64)
    numbers = first_line + skip_rows + rows + np.searchsorted(valid_before, rows, side="right")
    return table, pa.array(numbers), [(first_line - 1 + n, text) for n, text in invalid]


def _last_lines(chunk: bytes, count: int) -> list[str] | None:
    """The last `count` lines of `chunk` (ASCII, whole lines), or None when it has fewer."""
    if count == 0:
        return []
    body = chunk[:-1] if chunk.endswith(b"\n") else chunk
    lines = body.rsplit(b"\n", count)
    if len(lines) <= count:
        return None
    return [line.decode("ascii") for line in lines[1:]]


def _read_csv(
    chunk: bytes,
    columns: list[str] | tuple[str, ...],
    include: list[str] | tuple[str, ...],
    skip_rows: int,
    delimiter: str,
    encoding: str,
    threads: bool,
    invalid: list,
) -> pa.Table:
    """pyarrow's CSV reader over one chunk; invalid rows are appended to `invalid` as (line number, text)
    when reading serially, as text alone with threads (which do not know line numbers)."""

    def on_invalid(row) -> str:
        if threads:
            invalid.append(row.text)
        else:
            invalid.append((row.number if row.number is not None else -1, row.text))
        return "skip"

    return pacsv.read_csv(
        pa.py_buffer(chunk),
        read_options=pacsv.ReadOptions(
            column_names=list(columns),
            skip_rows=skip_rows,
            use_threads=threads,
            encoding=encoding,
            block_size=2 * DEFAULT_LIMITS.line_bytes + 2,  # a row must fit a block: any line within limits
        ),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter,
            quote_char=False,
            escape_char=False,
            newlines_in_values=False,
            ignore_empty_lines=False,
            invalid_row_handler=on_invalid,
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in include},
            include_columns=list(include),
            strings_can_be_null=False,
        ),
    )


def usable_delimiter(delimiter: str) -> bool:
    """A field delimiter the CSV reader takes: tab or a printable ASCII character that is no letter, digit or
    quote (what ra -c and Zeek's #separator give; Arrow refuses CR, LF, NUL and anything past ASCII with a
    ValueError, which was an internal error that stopped the files after it)."""
    return delimiter == "\t" or (
        len(delimiter) == 1 and " " <= delimiter <= "~" and not delimiter.isalnum() and delimiter not in "\"'"
    )


_SPACE = np.zeros(256, bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True  # what bytes.strip() strips
_DETAIL_BYTES = 200  # rejects_table keeps 200 characters of a line


def sift_lines(
    segment: bytes,
    first_line: int,
    source: str,
    delimiter: str,
    fields: int,
    refuse: str | None = None,
    comment: bytes = b"",
) -> tuple[bytes, np.ndarray, pa.Table]:
    """Whole lines of delimited text (`segment`, its first line is line `first_line` of the file) -> (the lines
    of `fields` fields joined, ready for read_block; each one's line number in the file; rejects of the other
    non-blank lines). Blank lines (empty, CR, spaces) and lines starting with `comment` (one byte) are dropped.
    With `refuse`, every other line is a reject for that reason. All in numpy over the bytes: no Python per
    line, whatever the lines are.

    A lone CR (no LF after it) makes its line a reject: pyarrow's reader ends a row there while tracepipe (and
    grep -n, sed) count lines by LF, so one line became two rows (a second flow forged from half a line) and the
    line numbers after it shifted. Neither Zeek (which escapes control bytes as \\x0d) nor ra writes one."""
    # (only the span from the first to the last non-blank byte is looked at, a MiB at a time: a gzip'ed file of
    # blank lines is ~1000:1, and numpy's arrays of one int64 a line for 16 MB of them took 0.9 GB)
    begin = len(segment) - len(segment.lstrip())
    begin = segment.rfind(b"\n", 0, begin) + 1
    line = first_line + segment.count(b"\n", 0, begin)
    end = len(segment.rstrip())
    compact, numbers, rejects = [], [], []
    while begin < end:
        stop = segment.rfind(b"\n", begin, begin + _SIFT_BYTES) + 1
        if stop <= begin or end < begin + _SIFT_BYTES:  # (one line past the piece, or the last piece)
            stop = segment.find(b"\n", begin + _SIFT_BYTES if stop <= begin else end) + 1 or len(segment)
        piece = segment[begin:stop]
        kept, kept_numbers, piece_rejects = _sift_piece(
            piece, line, source, delimiter, fields, refuse, comment
        )
        compact.append(kept)
        numbers.append(kept_numbers)
        rejects.append(piece_rejects)
        line += piece.count(b"\n")
        begin = stop
    numbers.append(np.zeros(0, np.int64))
    if len(compact) == 1 and len(compact[0]) == len(segment):
        return segment, numbers[0], rejects[0]
    return b"".join(compact), np.concatenate(numbers), pa.concat_tables([empty_rejects(source), *rejects])


_SIFT_BYTES = 1 << 20


def header_segments(
    data: bytes,
    first_line: int,
    header_starts: list[int],
    snapshot: Callable[[], tuple[Hashable, Any]],
    header: Callable[[bytes], None],
) -> list[tuple[Any, list[bytes], list[int]]]:
    """The lines of a block between its header lines (`header_starts`: their offsets; the block's first line is
    line `first_line` of the file), grouped by the layout in force: `header(line)` reads each header line,
    `snapshot()` gives the layout's (key, state) for the lines after it. -> per distinct key: (its state, its
    segments of whole lines, the file line each segment starts at). A header between every data line (a
    hostile file, or many small outputs `cat`-ed) then costs one parse per layout and block, not one per line
    (Zeek's reader once took ~10 ms a line so; the argus reader did too, session 35)."""
    groups: dict[Hashable, tuple[Any, list[bytes], list[int]]] = {}
    position, line = 0, first_line
    for start in [*header_starts, len(data)]:
        if start > position:
            segment = data[position:start]
            key, state = snapshot()
            group = groups.setdefault(key, (state, [], []))
            group[1].append(segment)
            group[2].append(line)
            line += segment.count(b"\n")
        if start == len(data):
            break
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end + 1
        header(data[start:end])
        position, line = end, line + 1
    return list(groups.values())


def joined_segments(
    segments: list[bytes], first_lines: list[int]
) -> tuple[bytes, Callable[[np.ndarray], np.ndarray]]:
    """Segments of whole lines (header_segments') as one text, and the map from a 0-based line index of that
    text to its line number in the file."""
    segments = [x if x.endswith(b"\n") else x + b"\n" for x in segments]
    data = segments[0] if len(segments) == 1 else b"".join(segments)
    counts = np.array([x.count(b"\n") for x in segments], np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
    firsts = np.array(first_lines, np.int64)

    def file_line(index: np.ndarray) -> np.ndarray:
        which = np.searchsorted(offsets, index, side="right") - 1
        return firsts[which] + index - offsets[which]

    return data, file_line


def empty_rejects(source: str = "") -> pa.Table:
    """A rejects table of no row (rejects_table's columns)."""
    return rejects_table(
        pa.array([], pa.int64()), pa.array([], pa.string()), pa.array([], pa.string()), source
    )


def _sift_piece(
    segment: bytes,
    first_line: int,
    source: str,
    delimiter: str,
    fields: int,
    refuse: str | None,
    comment: bytes,
) -> tuple[bytes, np.ndarray, pa.Table]:
    data = np.frombuffer(segment, np.uint8)
    newlines = np.flatnonzero(data == 10)
    starts = np.concatenate(([0], newlines + 1))
    if starts[-1] == len(data):  # (the segment ends with its newline: no line after it)
        starts = starts[:-1]
    stops = np.append(newlines, len(data))[: len(starts)]  # each line's end, its LF excluded
    solid = np.add.reduceat(~_SPACE[data], starts, dtype=np.int64) > 0
    if comment:
        solid &= data[starts] != comment[0]
    cr = data == 13
    lone_cr = cr & np.append(data[1:] != 10, True)
    cut = np.add.reduceat(lone_cr, starts, dtype=np.int64) > 0
    width = np.add.reduceat(data == ord(delimiter), starts, dtype=np.int64) + 1
    reason = np.full(len(starts), -1, np.int8)  # -1: kept; 0, 1, 2: the reasons below
    if refuse is not None:
        reason[solid] = 2
    else:
        reason[solid & (width != fields)] = 1
        reason[solid & cut] = 0
    reason[~solid] = -2  # blank: neither kept nor a reject
    reasons = ["lone CR (0x0d) inside the line", f"expected {fields} fields", refuse or ""]
    bad = np.flatnonzero(reason >= 0)
    rejects = _rejects(data, starts[bad], stops[bad], first_line + bad, reasons, reason[bad], source)
    kept = reason == -1
    if kept.all():
        return segment, first_line + np.arange(len(starts), dtype=np.int64), rejects
    if not kept.any():
        return b"", np.zeros(0, np.int64), rejects
    lengths = np.diff(np.append(starts, len(data)))  # each line with its LF
    return data[np.repeat(kept, lengths)].tobytes(), first_line + np.flatnonzero(kept), rejects


def _rejects(
    data: np.ndarray,
    starts: np.ndarray,
    stops: np.ndarray,
    numbers: np.ndarray,
    reasons: list[str],
    which: np.ndarray,
    source: str,
) -> pa.Table:
    """rejects_table of the lines data[starts[i]:stops[i]] (their first 200 bytes, Latin-1), built in numpy."""
    lengths = np.minimum(stops - starts, _DETAIL_BYTES)
    lengths -= (lengths > 0) & (data[np.maximum(starts + lengths - 1, 0)] == 13) & (lengths == stops - starts)
    ends = np.cumsum(lengths)
    text = data[np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)]
    high = text >= 128  # Latin-1 -> UTF-8: such a byte is two bytes, 0b110000xx 0b10xxxxxx
    position = np.concatenate(([0], np.cumsum(1 + high.astype(np.int64))))
    utf8 = np.empty(position[-1], np.uint8)
    utf8[position[:-1][~high]] = text[~high]
    utf8[position[:-1][high]] = 0xC0 | (text[high] >> 6)
    utf8[position[:-1][high] + 1] = 0x80 | (text[high] & 0x3F)
    offsets = position[np.concatenate(([0], ends))].astype(np.int32)
    lines = pa.Array.from_buffers(pa.string(), len(starts), [None, pa.py_buffer(offsets), pa.py_buffer(utf8)])
    reason = pc.take(pa.array(reasons or [""], pa.string()), pa.array(which.astype(np.int64)))
    return rejects_table(pa.array(numbers, pa.int64()), lines, reason, source)


def dictionary_encode(column: pa.Array | pa.ChunkedArray) -> pa.DictionaryArray:
    """One dictionary array of a (chunked) text column: the chunks are hashed as they are and only their
    int32 indices joined (combining the text first would copy every string once more)."""
    encoded = pc.dictionary_encode(column)
    if isinstance(encoded, pa.Array):
        return encoded
    if encoded.num_chunks == 0:
        return pc.dictionary_encode(pa.array([], column.type))
    # the chunks of a chunked dictionary_encode share one dictionary (its hash table spans the chunks)
    indices = pa.concat_arrays([chunk.indices for chunk in encoded.chunks])
    return pa.DictionaryArray.from_arrays(indices, encoded.chunk(encoded.num_chunks - 1).dictionary)


def address_text(
    column: pa.Array | pa.ChunkedArray, dictionary: bool = False
) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Address text -> (canonical text, ip_version int8, valid mask). Canonical IPv4 text is recognised by a
    vectorised regex; `ipaddress` runs only on the other distinct values (IPv6, leading zeros, garbage).
    The rows are hashed once (dictionary_encode); everything else runs on the distinct values. `dictionary`:
    the text comes back dictionary<int32, string> (null where invalid), the form the lake writer takes."""
    encoded = dictionary_encode(column)
    unique = pc.utf8_trim_whitespace(encoded.dictionary)
    ipv4 = pc.fill_null(pc.match_substring_regex(unique, CANONICAL_IPV4_RE), False)
    canonical = pc.if_else(ipv4, unique, pa.scalar(None, pa.string()))
    versions = pc.if_else(ipv4, pa.scalar(4, pa.int8()), pa.scalar(None, pa.int8()))
    others = np.flatnonzero(~np.asarray(ipv4, dtype=bool))
    if len(others):
        # distinct non-IPv4 values only (a null value is no address)
        found_text, found_version = canonical_texts(
            [v if v is not None else "" for v in unique.take(pa.array(others)).to_pylist()]
        )
        slot = np.full(len(unique), -1, np.int64)
        slot[others] = np.arange(len(others))
        index = pa.array(slot, mask=slot < 0)
        canonical = pc.coalesce(canonical, pc.take(pa.array(found_text, pa.string()), index))
        versions = pc.coalesce(versions, pc.take(pa.array(found_version, pa.int8()), index))
    position = encoded.indices
    if dictionary and position.null_count == 0 and canonical.null_count == 0:  # all valid: nothing per row
        values = pa.DictionaryArray.from_arrays(position, canonical)
        return values, pc.take(versions, position), pa.array(np.ones(len(position), dtype=bool))
    valid = pc.fill_null(pc.take(pc.is_valid(canonical), position), False)  # a null row has a null index
    if dictionary:  # an invalid row's index is null, so that is_valid() holds on the dictionary array too
        indices = pc.if_else(valid, position, pa.scalar(None, position.type)).cast(pa.int32())
        values = pa.DictionaryArray.from_arrays(indices, pc.fill_null(canonical, ""))
    else:
        values = pc.take(canonical, position)
    return values, pc.take(versions, position), valid


def first_failure(
    checks: list[tuple[str, pa.Array, pa.Array]], n: int
) -> tuple[pa.Array, pa.Array, pa.Array]:
    """`checks`: (reason, ok mask, the field's values) in the order fields are named. Returns (valid mask,
    reason per row, detail per row: `value` of the first field that failed), null where the row is valid."""
    valid = pa.array(np.ones(n, dtype=bool))
    reason = pa.nulls(n, pa.string())
    detail = pa.nulls(n, pa.string())
    for text, ok, values in checks:
        failed = pc.and_(pc.is_null(reason), pc.invert(pc.fill_null(ok, False)))
        if not pc.any(failed).as_py():
            continue
        valid = pc.and_(valid, pc.invert(failed))
        reason = pc.if_else(failed, text, reason)
        shown = pc.fill_null(pc.cast(values, pa.string()), "")
        detail = pc.if_else(failed, pc.utf8_slice_codeunits(shown, 0, 200), detail)
    return valid, reason, detail


def rejects_table(line_numbers: pa.Array, lines: pa.Array, reasons: pa.Array, source: str) -> pa.Table:
    """Rejects of a text input as the lake takes them: source, line, reason, detail (the text, cut at 200)."""
    n = len(line_numbers)
    return pa.table(
        {
            "source": pa.array([source] * n, pa.string()),
            "line": pc.cast(line_numbers, pa.int64()),
            "reason": pc.cast(reasons, pa.string()),
            "detail": pc.utf8_slice_codeunits(pc.cast(lines, pa.string()), 0, 200),
        }
    )


def as_flows(table: pa.Table) -> pa.Table:
    """A table of some FLOWS columns -> schema.FLOWS (the others null), for readers that fill few of them."""
    from tracepipe.schema import FLOWS

    n = table.num_rows
    return pa.Table.from_arrays(
        [
            table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type)
            for f in FLOWS
        ],
        schema=FLOWS,
    )


def line_rejects(lines: list[tuple[int, str]], reason: str, source: str) -> pa.Table:
    """rejects_table for whole lines that share one reason (another width, no header yet, ...)."""
    return rejects_table(
        pa.array([n for n, _ in lines], pa.int64()),
        pa.array([t for _, t in lines], pa.string()),
        pa.array([reason] * len(lines), pa.string()),
        source,
    )
