"""argus `ra` CSV output (and the CTU-13 / Stratosphere "binetflow" files made with it) -> flow rows
(schema.FLOWS), rejects, and the `Label` column, when there is one, as ground truth (schema.FLOW_LABELS) kept
apart for evaluation: detectors never see it.

Columns are read by the names ra prints with `-L0` (ra(1), argus-clients 3.0.8): StartTime, Dur, Proto, SrcAddr,
Sport, Dir, DstAddr, Dport, State, TotPkts, TotBytes, SrcBytes, and, when asked for (`-s +spkts +dpkts`),
SrcPkts, DstPkts, DstBytes. Make such a file with

    ra -r FILE.argus -u -n -c , -L0 -Z b -s stime dur proto saddr sport dir daddr dport state stos dtos \\
       pkts bytes sbytes spkts dpkts dbytes

- Times: `-u` epoch seconds, or a date and time (`2011/08/10 09:46:53.047277`, the binetflow form), read as
  UTC. ra's default `%T` (time of day, no date) cannot be placed on a day: those lines are rejected.
- An argus record is bidirectional: `src` is the side that initiated it (ra(1) "shost"). It becomes two rows
  as a NetFlow probe would export them: src -> dst (SrcPkts, SrcBytes) and, when dst sent anything,
  dst -> src (DstPkts, DstBytes = TotBytes - SrcBytes). Without SrcPkts/DstPkts (binetflow) the packets of
  each direction are unknown: null, unless dst sent nothing (then src's row has TotPkts).
- TCP flags from State: `-Z b` gives "<src flags>_<dst flags>" (S_RA: a SYN answered by RST+ACK); argus' own
  states (REQ, ACC, CON, CLO, FIN, RST) map as tracepipe.flowstate says. The State text stays in conn_state.
- Ports: decimal or hex (`0x0050`). ICMP: dst_port = type*256 + code as NetFlow carries it; ra prints Sport as
  code << 8 | type (0x010b), or the type alone, the code then from the unreachable State (URP = 3, ...) for
  ICMP and from Dport for ICMPv6 (`ra -n`), else 0.
- Bytes of each direction need SrcBytes or DstBytes beside TotBytes (ra's default columns have neither): without
  them they are null, not the total put on the initiator.
- A header line later in the file (outputs of other columns `cat`-ed together) sets the columns of the lines
  after it.
- Argus management records (`man`), ARP and IPX are not IP flows: skipped, counted in the reader's `skipped`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tracepipe.errors import InputError
from tracepipe.flowstate import ARGUS_FLAG_LETTERS, ARGUS_TCP_STATE_FLAGS
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
from tracepipe.ingest.zeek import LATEST_SECONDS
from tracepipe.limits import DEFAULT as DEFAULT_LIMITS
from tracepipe.limits import iter_line_blocks, too_long_rejects
from tracepipe.schema import FLOW_LABELS, FLOWS, TS

REQUIRED = ("StartTime", "Proto", "SrcAddr", "DstAddr")
OPTIONAL = ("Dur", "Sport", "Dport", "Dir", "State", "TotPkts", "TotBytes", "SrcBytes", "SrcPkts", "DstPkts")
OPTIONAL_MORE = ("DstBytes", "Label")
USED = (*REQUIRED, *OPTIONAL, *OPTIONAL_MORE)
# /etc/protocols names ra prints (first 4 characters of RFC 1700 names, ra(1) "proto"), and numbers with -nn
PROTOCOLS = {
    "icmp": 1, "igmp": 2, "ipnip": 4, "tcp": 6, "egp": 8, "udp": 17, "rtp": 17, "rtcp": 17, "udt": 17,
    "ipv6": 41, "rsvp": 46, "gre": 47, "esp": 50, "ah": 51, "ipv6-icmp": 58, "icmp6": 58, "ipv6-": 58,
    "ospf": 89, "pim": 103, "vrrp": 112, "l2tp": 115, "sctp": 132,
}  # fmt: skip
NOT_IP = ("man", "arp", "rarp", "llc", "lldp", "stp", "ipx/sp", "ipx")
# ICMP unreachable codes by argus State (ra(1) ICMP states), for dst_port = 3*256 + code
UNREACHABLE_CODES = {
    "URN": 0, "URH": 1, "URP": 3, "URF": 4, "URS": 5, "URNU": 6, "URHU": 7, "URISO": 8, "URNPRO": 9,
    "URHPRO": 10, "URNTOS": 11, "URHTOS": 12, "URFIL": 13, "URPRE": 14, "URCUT": 15,
}  # fmt: skip
_EPOCH_RE = r"^\d{1,12}(\.\d{1,9})?$"
_DATE_RE = r"^\d{4}[/-]\d\d[/-]\d\d[ T]\d\d:\d\d:\d\d(\.\d{1,9})?$"
_FLAGS_STATE_RE = r"^[FSRPAUEC78]*_[FSRPAUEC78]*$"


def looks_like_argus(head: bytes) -> bool:
    """ra's `-L0` header line: StartTime first, SrcAddr and DstAddr named, any one-character delimiter."""
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    return first.startswith(b"StartTime") and len(first) > 10 and b"SrcAddr" in first and b"DstAddr" in first


def _layout(first_line: bytes) -> tuple[str, list[str]]:
    header = first_line.rstrip(b"\r\n").decode("latin-1")
    delimiter = header[len("StartTime")]
    names = header.split(delimiter)
    seen: set[str] = set()
    columns = []
    for i, name in enumerate(n.strip() for n in names):  # a repeated name must not shadow the first
        columns.append(name if name not in seen else f"{name}#{i}")
        seen.add(name)
    return delimiter, columns


def _micros(text: pa.Array) -> tuple[pa.Array, pa.Array]:
    """StartTime text (epoch seconds, or a UTC date and time) -> int64 µs; (values, valid mask)."""
    epoch = pc.fill_null(pc.match_substring_regex(text, _EPOCH_RE), False)
    dated = pc.fill_null(pc.match_substring_regex(text, _DATE_RE), False)
    seconds = pc.cast(pc.if_else(epoch, text, pa.scalar(None, pa.string())), pa.float64())
    from_epoch = pc.cast(pc.round(pc.multiply(seconds, 1e6)), pa.int64())
    iso = pc.replace_substring(pc.if_else(dated, text, pa.scalar(None, pa.string())), "/", "-")
    whole = pc.strptime(
        pc.utf8_slice_codeunits(iso, 0, 19), format="%Y-%m-%d %H:%M:%S", unit="us", error_is_null=True
    )
    whole = pc.if_else(
        pc.is_null(whole),
        pc.strptime(
            pc.utf8_slice_codeunits(iso, 0, 19), format="%Y-%m-%dT%H:%M:%S", unit="us", error_is_null=True
        ),
        whole,
    )
    fraction = pc.utf8_rpad(pc.utf8_slice_codeunits(iso, 20, 26), width=6, padding="0")
    fraction = pc.if_else(pc.equal(pc.utf8_length(iso), 19), "000000", fraction)
    from_date = pc.add(
        pc.cast(pc.cast(whole, pa.timestamp("us")), pa.int64()), pc.cast(fraction, pa.int64(), safe=False)
    )
    values = pc.if_else(epoch, from_epoch, from_date)
    sane = pc.and_(pc.greater_equal(values, 0), pc.less(values, int(LATEST_SECONDS) * 1_000_000))
    return values, pc.fill_null(sane, False)


def _seconds_micros(text: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Dur text -> int64 µs; (values, valid-or-empty mask). A duration of LATEST_SECONDS (130 years) or more is
    bad, as Zeek's is: Dur=999999999999 put ts_end in year ~33,700, past what Python's datetime holds, and the
    commit failed with an internal error (nothing of the command landed)."""
    ok = pc.fill_null(pc.match_substring_regex(text, _EPOCH_RE), True)
    seconds = pc.cast(pc.if_else(ok, text, pa.scalar(None, pa.string())), pa.float64())
    ok = pc.and_(ok, pc.fill_null(pc.less(seconds, LATEST_SECONDS), True))
    return pc.cast(pc.round(pc.multiply(seconds, 1e6)), pa.int64()), ok


def _count(text: pa.Array) -> tuple[pa.Array, pa.Array]:
    ok = pc.fill_null(pc.match_substring_regex(text, r"^\d{1,18}$"), True)
    return pc.cast(pc.if_else(ok, text, pa.scalar(None, pa.string())), pa.int64()), ok


def _port(text: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Decimal or 0x-hex port text -> int64 (null when empty); (values, valid-or-empty mask)."""
    hexa = pc.fill_null(pc.match_substring_regex(text, r"^0x[0-9a-fA-F]{1,4}$"), False)
    decimal = pc.fill_null(pc.match_substring_regex(text, r"^\d{1,5}$"), False)
    digits = pc.utf8_lower(pc.utf8_slice_codeunits(pc.if_else(hexa, text, "0x0"), 2, 6))
    value = pa.array(np.zeros(len(text), np.int64))
    for position in range(4):  # hex digits, vectorised: right-aligned, 4 at most
        padded = pc.utf8_lpad(digits, width=4, padding="0")
        char = pc.utf8_slice_codeunits(padded, position, position + 1)
        nibble = pc.index_in(char, value_set=pa.array(list("0123456789abcdef")))
        value = pc.add(pc.multiply(value, 16), pc.cast(pc.fill_null(nibble, 0), pa.int64()))
    number = pc.cast(pc.if_else(decimal, text, "0"), pa.int64())
    values = pc.if_else(hexa, value, pc.if_else(decimal, number, pa.scalar(None, pa.int64())))
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), True)
    ok = pc.or_(pc.or_(hexa, decimal), empty)
    ok = pc.and_(ok, pc.fill_null(pc.less_equal(values, 65535), True))
    return values, ok


def _tcp_flags(state: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(src flags, dst flags) int64 from State, on its distinct values (a few dozen in a whole file)."""
    encoded = pc.dictionary_encode(pc.fill_null(state, ""))
    words = encoded.dictionary.to_pylist()
    src = np.zeros(len(words), np.int64)
    dst = np.zeros(len(words), np.int64)
    for i, word in enumerate(words):  # distinct values only
        if word in ARGUS_TCP_STATE_FLAGS:
            src[i], dst[i] = ARGUS_TCP_STATE_FLAGS[word]
        elif "_" in word:
            left, _, right = word.partition("_")
            src[i] = sum(ARGUS_FLAG_LETTERS.get(c, 0) for c in set(left))
            dst[i] = sum(ARGUS_FLAG_LETTERS.get(c, 0) for c in set(right))
    return pc.take(pa.array(src), encoded.indices), pc.take(pa.array(dst), encoded.indices)


def _records(table: pa.Table, lines: pa.Array, source: str) -> tuple[pa.Table, pa.Table, pa.Table, int]:
    """ra text columns -> (flow rows, rejects, labels, records skipped as not IP)."""
    n = table.num_rows

    def text(name: str) -> pa.Array:
        if name not in table.column_names:
            return pa.nulls(n, pa.string())
        return pc.utf8_trim_whitespace(table.column(name).combine_chunks())

    proto_text = pc.utf8_lower(text("Proto"))
    header = pc.fill_null(pc.equal(text("StartTime"), "StartTime"), False)  # files concatenated with headers
    skipped = pc.or_(pc.fill_null(pc.is_in(proto_text, pa.array(NOT_IP)), False), header)
    n_skipped = (
        pc.sum(pc.cast(pc.fill_null(pc.is_in(proto_text, pa.array(NOT_IP)), False), pa.int64())).as_py() or 0
    )
    numeric = pc.fill_null(pc.match_substring_regex(proto_text, r"^\d{1,3}$"), False)
    by_name = pc.take(
        pa.array(list(PROTOCOLS.values()), pa.int64()), pc.index_in(proto_text, pa.array(list(PROTOCOLS)))
    )
    proto = pc.if_else(numeric, pc.cast(pc.if_else(numeric, proto_text, "0"), pa.int64()), by_name)
    proto = pc.if_else(pc.fill_null(pc.less_equal(proto, 255), False), proto, pa.scalar(None, pa.int64()))
    start, start_ok = _micros(text("StartTime"))
    duration, duration_ok = _seconds_micros(text("Dur"))
    src_addr, version, src_ok = address_text(text("SrcAddr"))
    dst_addr, _, dst_ok = address_text(text("DstAddr"))
    sport, sport_ok = _port(text("Sport"))
    dport, dport_ok = _port(text("Dport"))
    counts = {}
    checks = [
        ("bad start time (ra -u gives epoch seconds)", start_ok, text("StartTime")),
        ("bad duration", duration_ok, text("Dur")),
        ("unknown protocol", pc.is_valid(proto), text("Proto")),
        ("bad source address", src_ok, text("SrcAddr")),
        ("bad destination address", dst_ok, text("DstAddr")),
        ("bad source port", sport_ok, text("Sport")),
        ("bad destination port", dport_ok, text("Dport")),
    ]
    for name in ("TotPkts", "TotBytes", "SrcBytes", "SrcPkts", "DstPkts", "DstBytes"):
        counts[name], ok = _count(text(name))
        checks.append((f"bad {name}", ok, text(name)))
    for part, total in (
        ("SrcBytes", "TotBytes"),
        ("DstBytes", "TotBytes"),
        ("SrcPkts", "TotPkts"),
        ("DstPkts", "TotPkts"),
    ):
        # (a part above its total made the other part, total - part, negative: packets=-4 landed)
        checks.append(
            (
                f"{part} above {total}",
                pc.fill_null(pc.less_equal(counts[part], counts[total]), True),
                text(part),
            )
        )
    checks = [(reason, pc.or_(ok, skipped), values) for reason, ok, values in checks]
    valid, reason, detail = first_failure(checks, n)
    bad = pc.invert(valid)
    rejects = rejects_table(lines.filter(bad), detail.filter(bad), reason.filter(bad), source)
    keep_mask = pc.and_(valid, pc.invert(skipped))

    def keep(array: pa.Array) -> pa.Array:
        return array.filter(keep_mask)

    ts = keep(start)
    ts_start = pc.cast(ts, TS)
    ts_end = pc.cast(pc.add(ts, pc.fill_null(keep(duration), 0)), TS)
    proto = pc.cast(keep(proto), pa.int16())
    state = keep(text("State"))
    src_flags, dst_flags = _tcp_flags(state)
    is_tcp = pc.fill_null(pc.equal(proto, 6), False)
    zero = pa.scalar(0, pa.int64())
    src_flags = pc.if_else(is_tcp, src_flags, zero)
    dst_flags = pc.if_else(is_tcp, dst_flags, zero)
    icmp = pc.fill_null(pc.is_in(proto, pa.array([1, 58], pa.int16())), False)
    by_state = pc.fill_null(
        pc.take(
            pa.array(list(UNREACHABLE_CODES.values()), pa.int64()),
            pc.index_in(state, pa.array(list(UNREACHABLE_CODES))),
        ),
        0,
    )
    sport, dport = keep(sport), keep(dport)
    # ICMP: ra prints Sport as code << 8 | type (0x010b: type 11, code 1; 0x0303: port unreachable); a Sport
    # under 256 is the type alone, its code then the unreachable State's (IPv4, where Dport is the ICMP id) or
    # Dport (ICMPv6: `ra -n` prints type 1, code 4 as Sport 1, Dport 4)
    given = pc.fill_null(sport, 0)
    both = pc.greater(given, 255)
    icmp_type = pc.if_else(both, pc.bit_wise_and(given, 255), given)
    v6_code = pc.if_else(
        pc.fill_null(pc.and_(pc.equal(proto, 58), pc.less_equal(dport, 255)), False), dport, by_state
    )
    code = pc.if_else(both, pc.bit_wise_and(pc.shift_right(given, 8), 255), v6_code)
    icmp_port = pc.add(pc.multiply(icmp_type, 256), code)
    # bytes of each direction: SrcBytes and DstBytes, or one of them and TotBytes. ra's default columns give
    # TotBytes alone: each direction's bytes are then unknown (null), never the total put on the initiator (a
    # download read as an upload of its size: an exfiltration that never was)
    total_bytes, src_bytes = keep(counts["TotBytes"]), keep(counts["SrcBytes"])
    dst_bytes = pc.coalesce(keep(counts["DstBytes"]), pc.subtract(total_bytes, src_bytes))
    src_bytes = pc.coalesce(src_bytes, pc.subtract(total_bytes, keep(counts["DstBytes"])))
    total_packets = keep(counts["TotPkts"])
    dst_packets = keep(counts["DstPkts"])
    one_way = pc.fill_null(pc.equal(dst_bytes, 0), False)
    src_packets = pc.coalesce(
        keep(counts["SrcPkts"]),
        pc.if_else(one_way, total_packets, pa.scalar(None, pa.int64())),
        pc.if_else(
            pc.is_valid(dst_packets), pc.subtract(total_packets, dst_packets), pa.scalar(None, pa.int64())
        ),
    )
    m = len(ts)
    common = {
        "ts_start": ts_start,
        "ts_end": ts_end,
        "proto": proto,
        "ip_version": keep(version),
        "sampling_interval": pa.array(np.ones(m, np.int32)),  # argus sees every packet it is given
        "source": pa.array([source] * m, pa.string()),
        "conn_state": state,
    }
    forward = pa.table(
        {
            **common,
            "src_addr": keep(src_addr),
            "dst_addr": keep(dst_addr),
            "src_port": pc.if_else(icmp, zero, sport),
            "dst_port": pc.if_else(icmp, icmp_port, dport),
            "packets": src_packets,
            "bytes": src_bytes,
            "tcp_flags": src_flags,
        }
    )
    answered = pc.fill_null(
        pc.or_(pc.greater(dst_bytes, 0), pc.greater(pc.fill_null(dst_packets, 0), 0)), False
    )
    backward = pa.table(
        {
            **common,
            "src_addr": keep(dst_addr),
            "dst_addr": keep(src_addr),
            "src_port": pc.if_else(icmp, zero, dport),
            "dst_port": pc.if_else(icmp, pa.scalar(None, pa.int64()), sport),
            "packets": pc.coalesce(dst_packets, pc.if_else(one_way, zero, pa.scalar(None, pa.int64()))),
            "bytes": dst_bytes,
            "tcp_flags": dst_flags,
        }
    ).filter(answered)
    flows = pa.concat_tables([as_flows(forward), as_flows(backward)])
    labels = FLOW_LABELS.empty_table()
    if "Label" in table.column_names:
        labels = pa.table(
            {
                "ts_start": ts_start,
                "src_addr": keep(src_addr),
                "dst_addr": keep(dst_addr),
                "src_port": pc.cast(forward.column("src_port"), pa.int32()),
                "dst_port": pc.cast(forward.column("dst_port"), pa.int32()),
                "proto": proto,
                "label": keep(text("Label")),
                "source": pa.array([source] * m, pa.string()),
                "line": keep(lines),
            }
        ).cast(FLOW_LABELS)
    return flows, rejects, labels, n_skipped


def _header_problem(delimiter: str, columns: list[str]) -> str:
    missing = [c for c in REQUIRED if c not in columns]
    if not usable_delimiter(delimiter):
        # (a byte past ASCII, a NUL or a CR after StartTime stopped the run with an internal error, and the files
        # after it in the same command were never read)
        return (
            f"unsupported field delimiter {delimiter!r} (ra -c: one ASCII character, not a letter or digit)"
        )
    return f"header lacks {', '.join(missing)}" if missing else ""


def _header_starts(data: bytes) -> list[int]:
    """Offsets of the lines of `data` that are ra header lines (files of other columns `cat`-ed after it)."""
    starts = [0] if data.startswith(b"StartTime") else []
    at = data.find(b"\nStartTime")
    while at >= 0:
        starts.append(at + 1)
        at = data.find(b"\nStartTime", at + 1)
    return [i for i in starts if looks_like_argus(data[i : data.find(b"\n", i) + 1 or len(data)])]


def _segment(
    segments: list[bytes],
    first_lines: list[int],
    source: str,
    delimiter: str,
    columns: list[str],
    problem: str,
) -> tuple[pa.Table, list[pa.Table], pa.Table]:
    """Whole data lines read under one header (`segments` of a block, each starting at line `first_lines[i]`)
    -> (flows, rejects, labels), all in one parse: a header line before every data line must not make one
    parse a line (Zeek's reader learnt that at ~10 ms a line)."""
    data, file_line = joined_segments(segments, first_lines)  # (file_line: of a 0-based line of `data`)

    def sift(fields: int, refuse: str | None) -> tuple[bytes, np.ndarray, pa.Table]:
        compact, numbers, rejects = sift_lines(data, 0, source, delimiter if fields else "\t", fields, refuse)
        where = np.asarray(rejects.column("line").combine_chunks(), np.int64)
        rejects = rejects.set_column(1, "line", pa.array(file_line(where), pa.int64()))
        return compact, file_line(np.asarray(numbers, np.int64)), rejects

    if problem:  # every line under a header that cannot be read is a reject, with the reason
        _, _, rejects = sift(0, problem)
        return FLOWS.empty_table(), [rejects], FLOW_LABELS.empty_table()
    # (blank lines, lines of another width and lines with a lone CR, which pyarrow ends a row at, are rejected or
    # dropped in numpy first: a lone CR made one line two records, forging a flow)
    compact, numbers, sifted = sift(len(columns), None)
    parts = [sifted]
    flows, labels = FLOWS.empty_table(), FLOW_LABELS.empty_table()
    if compact:
        include = [c for c in USED if c in columns]
        table, lines, invalid = read_block(compact, 1, delimiter, columns, include)
        lines = pa.array(numbers[np.asarray(lines, np.int64) - 1])
        if invalid:  # (none: every line has the header's width now)
            kept = [(int(numbers[n - 1]), t) for n, t in invalid]
            parts.append(line_rejects(kept, f"expected {len(columns)} fields", source))
        if table.num_rows:
            flows, rejects, labels, _ = _records(table, lines, source)
            parts.append(rejects)
    return flows, parts, labels


def _iter(handle, source: str, block_size: int) -> Iterator[tuple[pa.Table, pa.Table, pa.Table]]:
    first_line = handle.readline(DEFAULT_LIMITS.line_bytes + 1)
    if not looks_like_argus(first_line):
        raise InputError(
            f"{source} has no ra header line (StartTime,...,SrcAddr,...,DstAddr): run ra with -L0"
        )
    delimiter, columns = _layout(first_line)
    problem = _header_problem(delimiter, columns)
    if problem:  # (the file's own header: one reject, line 1, and nothing read)
        yield (
            FLOWS.empty_table(),
            rejects_table(
                pa.array([1]),
                pa.array([first_line.decode("latin-1")[:200]]),
                pa.array([problem]),
                source,
            ),
            FLOW_LABELS.empty_table(),
        )
        return
    for block in iter_line_blocks(handle, block_size):
        parts = (
            [too_long_rejects(source, [(n + 1, size) for n, size in block.too_long])]
            if block.too_long
            else []
        )
        data = block.data
        if not data.strip():
            yield FLOWS.empty_table(), pa.concat_tables([empty_rejects(), *parts]), FLOW_LABELS.empty_table()
            continue

        # the lines under each header: a later header line (files of other columns `cat`-ed together, or ra -L N
        # repeating its header) sets the columns of the lines after it (read with the first header, two files
        # whose columns differ in order landed each direction's bytes swapped)
        # (grouped by header: the segments under equal headers are read in one parse)
        def read_header(line: bytes) -> None:
            nonlocal delimiter, columns, problem
            delimiter, columns = _layout(line)
            problem = _header_problem(delimiter, columns)

        groups = header_segments(
            data,
            block.first_line + 1,
            _header_starts(data),
            lambda: ((delimiter, tuple(columns), problem), (delimiter, list(columns), problem)),
            read_header,
        )
        out_flows, out_labels = [], []
        for (layout_delimiter, layout_columns, layout_problem), segments, first_lines in groups:
            flows, rejects, labels = _segment(
                segments, first_lines, source, layout_delimiter, layout_columns, layout_problem
            )
            out_flows.append(flows)
            out_labels.append(labels)
            parts += rejects
        yield (
            pa.concat_tables([FLOWS.empty_table(), *out_flows]),
            pa.concat_tables([empty_rejects(), *parts]).sort_by("line"),
            pa.concat_tables([FLOW_LABELS.empty_table(), *out_labels]),
        )


def iter_argus(path: Path | str, block_size: int = 1 << 24) -> Iterator[tuple[pa.Table, pa.Table, pa.Table]]:
    """An ra CSV / binetflow file, streamed: batches of (flows in schema.FLOWS, rejects with line numbers,
    labels in schema.FLOW_LABELS), ~`block_size` bytes of text each."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    with handle:
        yield from _iter(handle, str(path), block_size)


def parse_argus(data: bytes, source: str, block_size: int = 1 << 24) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Text of ra CSV output -> (flows, rejects, labels). Pure."""
    batches = list(_iter(io.BytesIO(data), source, block_size))
    return (
        pa.concat_tables([FLOWS.empty_table(), *[b[0] for b in batches]]),
        pa.concat_tables([empty_rejects(), *[b[1] for b in batches]]),
        pa.concat_tables([FLOW_LABELS.empty_table(), *[b[2] for b in batches]]),
    )


def read_argus(path: Path | str) -> tuple[pa.Table, pa.Table, pa.Table]:
    """iter_argus collected into one (flows, rejects, labels) triple."""
    batches = list(iter_argus(path))
    return (
        pa.concat_tables([FLOWS.empty_table(), *[b[0] for b in batches]]),
        pa.concat_tables([empty_rejects(), *[b[1] for b in batches]]),
        pa.concat_tables([FLOW_LABELS.empty_table(), *[b[2] for b in batches]]),
    )
