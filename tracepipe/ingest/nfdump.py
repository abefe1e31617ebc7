"""nfdump's output -> flow records (schema.FLOWS) plus rejects (schema.REJECTS columns), vectorised.

- `read_nfdump_csv(path)`: the text of `nfdump -o csv` (nfdump 1.7.1: optional header line `ts,te,td,sa,...`,
  one 48-field line per flow, a `Summary` trailer unless `-q`). Times there are local time of the machine that
  ran nfdump, whole seconds only; pass `tz=` if it was not UTC (run `TZ=UTC nfdump ...` to be safe).
- `read_nfcapd(path)`: nfcapd files (or a directory of them) through the nfdump binary's `fmt:` output, which
  keeps milliseconds.
Both map nfdump's text conventions back to numbers: protocol names (nfdump's own table), flag strings
("...AP.SF"), ICMP "type.code" -> type*256+code in dst_port.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from tracepipe.errors import EnvironmentProblem, InputError
from tracepipe.schema import FLOWS, TS

# nfdump 1.7.1 src/lib/output_util.c protoList: what ProtoString() prints for protocol numbers 0..137; any other
# number is printed as a number. "IDPR" is printed for both 35 and 38; we read it back as 35.
NFDUMP_PROTOCOLS = (
    "0", "ICMP", "IGMP", "GGP", "IPIP", "ST", "TCP", "CBT", "EGP", "IGP", "BBN", "NVPII", "PUP", "ARGUS", "ENCOM",
    "XNET", "CHAOS", "UDP", "MUX", "DCN", "HMP", "PRM", "XNS", "Trnk1", "Trnk2", "Leaf1", "Leaf2", "RDP", "IRTP",
    "ISO-4", "NETBK", "MFESP", "MEINP", "DCCP", "3PC", "IDPR", "XTP", "DDP", "IDPR", "TP++", "IL", "IPv6", "SDRP",
    "Rte6", "Frag6", "IDRP", "RSVP", "GRE", "MHRP", "BNA", "ESP", "AH", "INLSP", "SWIPE", "NARP", "MOBIL", "TLSP",
    "SKIP", "ICMP6", "NOHE6", "OPTS6", "HOST", "CFTP", "NET", "SATNT", "KLAN", "RVD", "IPPC", "FS", "SATM", "VISA",
    "IPCV", "CPNX", "CPHB", "WSN", "PVP", "BSATM", "SUNND", "WBMON", "WBEXP", "ISOIP", "VMTP", "SVMTP", "VINES",
    "TTP", "NSIGP", "DGP", "TCF", "EIGRP", "OSPF", "S-RPC", "LARP", "MTP", "AX.25", "OS", "MICP", "SCCSP", "ETHIP",
    "ENCAP", "99", "GMTP", "IFMP", "PNNI", "PIM", "ARIS", "SCPS", "QNX", "A/N", "IPcmp", "SNP", "CpqPP", "IPXIP",
    "VRRP", "PGM", "0hop", "L2TP", "DDX", "IATP", "STP", "SRP", "UTI", "SMP", "SM", "PTP", "ISIS4", "FIRE", "CRTP",
    "CRUDP", "128", "IPLT", "SPS", "PIPE", "SCTP", "FC", "134", "MHEAD", "UDP-L", "MPLS",
)
_PROTO_NAMES: list[str] = []
_PROTO_NUMBERS: list[int] = []
for _number, _name in enumerate(NFDUMP_PROTOCOLS):
    if _name not in _PROTO_NAMES:
        _PROTO_NAMES.append(_name)
        _PROTO_NUMBERS.append(_number)

# nfdump 1.7.1 `-o csv` columns (output_csv.c); the header line, when present, names them the same way.
CSV_COLUMNS = (
    "ts", "te", "td", "sa", "da", "sp", "dp", "pr", "flg", "fwd", "stos", "ipkt", "ibyt", "opkt", "obyt", "in",
    "out", "sas", "das", "smk", "dmk", "dtos", "dir", "nh", "nhb", "svln", "dvln", "ismc", "odmc", "idmc", "osmc",
    "mpls1", "mpls2", "mpls3", "mpls4", "mpls5", "mpls6", "mpls7", "mpls8", "mpls9", "mpls10", "cl", "sl", "al",
    "ra", "eng", "exid", "tr",
)
CSV_HEADER_PREFIX = b"ts,te,td,sa,da,sp,dp,pr,"

# What read_nfcapd asks nfdump to print: ms times, raw numbers (-N), one record per line.
NFDUMP_FMT = "fmt:%ts|%te|%sa|%da|%sp|%dp|%pr|%pkt|%byt|%flg|%ra|%in|%out"
_FMT_COLUMNS = ("ts", "te", "sa", "da", "sp", "dp", "pr", "ipkt", "ibyt", "flg", "ra", "in", "out")

_TCP_FLAG_BITS = (128, 64, 32, 16, 8, 4, 2, 1)  # C E U A P R S F, the order FlagsString() prints them
_FLAGS_RE = r"^[C.][E.][U.][A.][P.][R.][S.][F.]$"
_TIME_RE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{3})?$"
_UINT_RE = r"^\d{1,10}$"


def looks_like_nfdump_csv(head: bytes) -> bool:
    """True if the first bytes of a file are nfdump `-o csv` output (with or without its header line).

    Rule: it starts with the header `ts,te,td,sa,da,sp,dp,pr,`, or its first line has 48 comma-separated
    fields and starts with `YYYY-MM-DD hh:mm:ss,`. A pcap/pcapng file never starts like that.
    """
    if head.startswith(CSV_HEADER_PREFIX):
        return True
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    if len(first) < 20 or first.count(b",") != len(CSV_COLUMNS) - 1:
        return False
    stamp = first[:20]
    return (stamp[4:5] == b"-" and stamp[7:8] == b"-" and stamp[10:11] == b" " and stamp[13:14] == b":"
            and stamp[19:20] == b"," and stamp[:4].isdigit())


# ---- vectorised conversions of nfdump's text ------------------------------------------------------------------


def _trim(column: pa.Array) -> pa.Array:
    return pc.utf8_trim_whitespace(column)


def _uint(column: pa.Array, target: pa.DataType) -> tuple[pa.Array, pa.Array]:
    """Decimal text -> integers; returns (values with 0 where invalid, valid mask)."""
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
    text = _trim(column)
    icmp = pc.fill_null(pc.match_substring_regex(text, r"^\d{1,3}\.\d{1,3}$"), False)
    parts = pc.split_pattern(pc.if_else(icmp, text, "0.0"), ".")
    icmp_type, type_ok = _uint(pc.list_element(parts, 0), pa.int64())
    icmp_code, code_ok = _uint(pc.list_element(parts, 1), pa.int64())
    folded = pc.add(pc.multiply(icmp_type, 256), icmp_code)
    port, port_ok = _uint(text, pa.int64())
    values = pc.if_else(icmp, folded, port)
    ok = pc.or_(pc.and_(icmp, pc.and_(type_ok, code_ok)), pc.and_(pc.invert(icmp), port_ok))
    ok = pc.and_(ok, pc.less_equal(values, 65535))
    return pc.cast(pc.if_else(ok, values, 0), pa.int32()), ok


def _timestamps(column: pa.Array, tz: str) -> tuple[pa.Array, pa.Array]:
    """"YYYY-MM-DD hh:mm:ss[.mmm]" in local time `tz` -> timestamp[us, UTC]; returns (values, valid mask)."""
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
        values = pc.cast(pc.assume_timezone(naive, timezone=tz, ambiguous="earliest", nonexistent="earliest"), TS)
    return values, ok


def _addresses(column: pa.Array) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Address text -> (canonical text, ip_version int8, valid mask); `ipaddress` runs on unique values only."""
    text = _trim(column)
    unique = pc.unique(text)
    canonical: list[str | None] = []
    versions: list[int | None] = []
    for value in unique.to_pylist():
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            canonical.append(None)
            versions.append(None)
            continue
        canonical.append(str(address))
        versions.append(address.version)
    index = pc.index_in(text, value_set=unique)
    values = pc.take(pa.array(canonical, pa.string()), index)
    version = pc.take(pa.array(versions, pa.int8()), index)
    return values, version, pc.is_valid(values)


def _flows_from_columns(fields: dict[str, pa.Array], source: str, tz: str
                        ) -> tuple[pa.Table, pa.Array, pa.Array]:
    """Common tail of both readers: text columns -> (FLOWS table of all rows, valid mask, reason per row)."""
    checks: list[tuple[str, pa.Array]] = []
    ts_start, ok = _timestamps(fields["ts"], tz)
    checks.append(("bad start time", ok))
    ts_end, ok = _timestamps(fields["te"], tz)
    checks.append(("bad end time", ok))
    src, src_version, ok = _addresses(fields["sa"])
    checks.append(("bad source address", ok))
    dst, _, ok = _addresses(fields["da"])
    checks.append(("bad destination address", ok))
    src_port, ok = _uint(fields["sp"], pa.int32())
    checks.append(("bad source port", ok))
    dst_port, ok = dst_port_from_text(fields["dp"])
    checks.append(("bad destination port", ok))
    proto, ok = proto_from_text(fields["pr"])
    checks.append(("bad protocol", ok))
    packets, ok = _uint(fields["ipkt"], pa.int64())
    checks.append(("bad packet count", ok))
    octets, ok = _uint(fields["ibyt"], pa.int64())
    checks.append(("bad byte count", ok))
    flags, ok = tcp_flags_from_text(fields["flg"])
    checks.append(("bad tcp flags", ok))
    exporter, _, ok = _addresses(fields["ra"])
    checks.append(("bad exporter address", ok))
    input_if, ok = _uint(fields["in"], pa.int32())
    checks.append(("bad input interface", ok))
    output_if, ok = _uint(fields["out"], pa.int32())
    checks.append(("bad output interface", ok))

    n = len(ts_start)
    valid = pa.array([True] * n, pa.bool_())
    reason = pa.nulls(n, pa.string())
    for text, ok in checks:  # first failing check names the row's reason
        reason = pc.if_else(pc.and_(pc.is_null(reason), pc.invert(ok)), text, reason)
        valid = pc.and_(valid, ok)
    table = pa.table(
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
            "sampling_interval": pa.nulls(n, pa.int32()),
            "source": pa.array([source] * n, pa.string()),
            "src_vm": pa.nulls(n, pa.string()),
            "dst_vm": pa.nulls(n, pa.string()),
        }
    )
    return table, valid, reason


def _lines(data: bytes) -> pa.Array:
    """Every line of a text as one string array (empty lines kept, so that index + 1 is the line number)."""
    if not data:
        return pa.array([], pa.string())
    table = pacsv.read_csv(
        pa.py_buffer(data),
        read_options=pacsv.ReadOptions(column_names=["line"], block_size=1 << 24),
        parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False,
                                          newlines_in_values=False, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(column_types={"line": pa.string()}, strings_can_be_null=False),
    )
    return pc.fill_null(table.column("line").combine_chunks(), "")


def _split_records(lines: pa.Array, line_numbers: pa.Array, delimiter: str, columns: tuple[str, ...],
                   source: str, tz: str) -> tuple[pa.Table, pa.Table]:
    """Lines of `delimiter`-separated fields -> (flows, rejects). Lines with a wrong field count are rejects."""
    parts = pc.split_pattern(lines, delimiter)
    width_ok = pc.equal(pc.list_value_length(parts), len(columns))
    good_parts = parts.filter(width_ok)
    fields = {name: pc.list_element(good_parts, i) for i, name in enumerate(columns) if name in _NEEDED}
    flows, valid, reason = _flows_from_columns(fields, source, tz)
    good_lines = line_numbers.filter(width_ok)
    bad_width = pc.invert(width_ok)
    n_bad_width = pc.sum(pc.cast(bad_width, pa.int64())).as_py() or 0
    invalid = pc.invert(valid)
    rejects = pa.concat_tables([
        _rejects(line_numbers.filter(bad_width), lines.filter(bad_width),
                 pa.array([f"expected {len(columns)} fields"] * n_bad_width, pa.string()), source),
        _rejects(good_lines.filter(invalid), lines.filter(width_ok).filter(invalid), reason.filter(invalid), source),
    ])
    return flows.filter(valid), rejects.sort_by("line")


_NEEDED = frozenset(("ts", "te", "sa", "da", "sp", "dp", "pr", "ipkt", "ibyt", "flg", "ra", "in", "out"))


def _rejects(line_numbers: pa.Array, lines: pa.Array, reasons: pa.Array, source: str) -> pa.Table:
    n = len(line_numbers)
    return pa.table(
        {
            "source": pa.array([source] * n, pa.string()),
            "line": pc.cast(line_numbers, pa.int64()),
            "reason": pc.cast(reasons, pa.string()),
            "detail": pc.utf8_slice_codeunits(pc.cast(lines, pa.string()), 0, 200),
        }
    )


def empty_rejects() -> pa.Table:
    return _rejects(pa.array([], pa.int64()), pa.array([], pa.string()), pa.array([], pa.string()), "")


# ---- the readers ---------------------------------------------------------------------------------------------


def parse_nfdump_csv(data: bytes, source: str, tz: str = "UTC") -> tuple[pa.Table, pa.Table]:
    """Text of `nfdump -o csv` -> (flows in schema.FLOWS, rejects with 1-based line numbers). Pure."""
    lines = _lines(data)
    numbers = pa.array(range(1, len(lines) + 1), pa.int64())
    columns = CSV_COLUMNS
    stripped = pc.utf8_rtrim(lines, characters="\r")
    # the header names the columns (nfdump writes it unless -q); the "Summary" line starts the trailer
    is_header = pc.starts_with(stripped, "ts,te,")
    header_rows = pc.indices_nonzero(is_header).to_pylist()
    if header_rows:
        columns = tuple(stripped[header_rows[0]].as_py().split(","))
    summary_rows = pc.indices_nonzero(pc.equal(stripped, "Summary")).to_pylist()
    keep = pc.and_(pc.invert(is_header), pc.not_equal(pc.utf8_trim_whitespace(stripped), ""))
    if summary_rows:
        keep = pc.and_(keep, pc.less(numbers, summary_rows[0] + 1))
    missing = sorted(c for c in _NEEDED if c not in columns)
    if missing:  # not nfdump's CSV layout: nothing can be read, say so at the header line
        reason = pa.array([f"header lacks {', '.join(missing)}"], pa.string())
        line = header_rows[0]
        return FLOWS.empty_table(), _rejects(numbers[line:line + 1], stripped[line:line + 1], reason, source)
    flows, rejects = _split_records(stripped.filter(keep), numbers.filter(keep), ",", columns, source, tz)
    return pa.Table.from_arrays([flows.column(f.name) for f in FLOWS], schema=FLOWS), rejects


def read_nfdump_csv(path: Path | str, tz: str = "UTC") -> tuple[pa.Table, pa.Table]:
    """A file written by `nfdump -o csv` -> (flows in schema.FLOWS, rejects with line numbers).

    `tz`: the time zone nfdump ran in (it prints local time); default UTC. Malformed lines become rejects
    (line number, reason), every other line lands.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    return parse_nfdump_csv(data, str(path), tz=tz)


def read_nfcapd(path: Path | str, timeout: float = 300.0) -> tuple[pa.Table, pa.Table]:
    """nfcapd file or directory -> (flows in schema.FLOWS, rejects), through the nfdump binary (ms precision).

    nfdump runs with TZ=UTC so that its local-time text is UTC; `-N` prints plain numbers.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    from tracepipe.probes import tool_path  # the one place that locates binaries

    # -6: full IPv6 addresses (without it fmt: abbreviates them to "2001:db..fff::20")
    cmd = [tool_path("nfdump"), "-R" if path.is_dir() else "-r", str(path), "-q", "-N", "-6", "-o", NFDUMP_FMT]
    env = dict(os.environ, TZ="UTC", LC_ALL="C")
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise EnvironmentProblem(f"nfdump did not finish within {timeout:.0f} s reading {path}") from exc
    if proc.returncode != 0:
        raise EnvironmentProblem(f"nfdump failed (exit {proc.returncode}) on {path}: "
                                 f"{proc.stderr.decode(errors='replace').strip()}")
    lines = _lines(proc.stdout)
    numbers = pa.array(range(1, len(lines) + 1), pa.int64())
    keep = pc.not_equal(pc.utf8_trim_whitespace(lines), "")
    flows, rejects = _split_records(lines.filter(keep), numbers.filter(keep), "|", _FMT_COLUMNS, str(path), "UTC")
    return pa.Table.from_arrays([flows.column(f.name) for f in FLOWS], schema=FLOWS), rejects
