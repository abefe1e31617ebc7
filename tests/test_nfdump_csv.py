"""nfdump's CSV (`nfdump -o csv`, nfdump 1.7.1) -> flows: the rows nfdump prints, at the precision it prints
them (whole seconds, local time), malformed lines rejected with their line numbers while the rest lands."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import FLOW_KEY_AND_COUNTERS, lake_flows, lake_rows, multiset_diff, run_tracepipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import probes

from tracepipe.ingest.nfdump import (
    CSV_COLUMNS,
    NFDUMP_PROTOCOLS,
    looks_like_nfdump_csv,
    parse_nfdump_csv,
    proto_from_text,
    read_nfdump_csv,
    tcp_flags_from_text,
)
from tracepipe.schema import FLOWS

# CSV times are whole seconds: compare them so, with everything else nfdump prints
CSV_COMPARED = ("start_s", "end_s", *FLOW_KEY_AND_COUNTERS, "exporter", "input_if", "output_if")


def with_seconds(table: pa.Table) -> pa.Table:
    def seconds(column: str) -> pa.Array:
        micros = pc.cast(pc.cast(table.column(column), pa.timestamp("us")), pa.int64())
        return pc.divide(micros, 1_000_000)

    return table.append_column("start_s", seconds("ts_start")).append_column("end_s", seconds("ts_end"))


@pytest.fixture(scope="module")
def nfcapd_dir(softflowd_export):
    """nfcapd files of the v9 export of IPv4 + IPv6 traffic (TCP, UDP, ICMP, ICMPv6)."""
    return softflowd_export(9, "ipv6").nfcapd.out_dir


@pytest.mark.parametrize("quiet", [False, True], ids=["with-header-and-summary", "quiet"])
def test_reader_gives_the_rows_nfdump_prints(quiet, nfcapd_dir, tmp_path):
    csv = probes.nfdump_csv(nfcapd_dir, tmp_path / "flows.csv", quiet=quiet)
    text = csv.read_text()
    assert text.startswith("ts,te,td,sa,da,sp,dp,pr,") != quiet
    assert ("\nSummary\n" in text) != quiet
    flows, rejects = read_nfdump_csv(csv)
    assert rejects.num_rows == 0, rejects.to_pylist()
    assert flows.schema == FLOWS
    expected = probes.nfdump_records(nfcapd_dir)
    assert flows.num_rows == expected.num_rows > 0
    diff = multiset_diff(with_seconds(expected), with_seconds(flows), CSV_COMPARED)
    assert not diff, f"CSV reader differs from nfdump's own records:\n{diff}"
    assert set(flows.column("source").to_pylist()) == {str(csv)}
    assert set(flows.column("ip_version").to_pylist()) == {4, 6}
    assert looks_like_nfdump_csv(text.encode()[:512])


@pytest.mark.parametrize("quiet", [False, True], ids=["with-header-and-summary", "quiet"])
def test_cli_ingest_of_nfdump_csv_lands_the_same_rows(quiet, nfcapd_dir, tmp_path):
    """`tracepipe ingest netflow flows.csv` tells nfdump's CSV by its content, with or without the header
    line that `nfdump -q` leaves out."""
    csv = probes.nfdump_csv(nfcapd_dir, tmp_path / "flows.csv", quiet=quiet)
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "netflow", str(csv), "--lake", str(lake))
    assert proc.returncode == 0, f"tracepipe ingest exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    got = lake_flows(lake)
    diff = multiset_diff(with_seconds(probes.nfdump_records(nfcapd_dir)), with_seconds(got), CSV_COMPARED)
    assert not diff, f"lake from nfdump CSV differs from nfdump's records:\n{diff}"
    # ingesting the same file again adds nothing
    again = run_tracepipe("ingest", "netflow", str(csv), "--lake", str(lake))
    assert again.returncode == 0 and lake_flows(lake).num_rows == got.num_rows


def test_malformed_lines_are_rejected_with_their_line_numbers(nfcapd_dir, tmp_path):
    lines = probes.nfdump_csv(nfcapd_dir, tmp_path / "good.csv").read_text().splitlines()
    total = len(lines) - 1 - 3  # header, Summary trailer of 3 lines
    fields = lines[8].split(",")
    fields[3] = "10.0.0.999"  # line 9: an address that does not parse
    lines[8] = ",".join(fields)
    lines.insert(4, "this is not nfdump output")  # becomes line 5; the bad address moves to line 10
    fields = lines[14].split(",")
    fields[11] = "12x"  # line 15: a packet count that is no number
    lines[14] = ",".join(fields)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")

    flows, rejects = read_nfdump_csv(bad)
    assert rejects.column("line").to_pylist() == [5, 10, 15]
    assert rejects.column("reason").to_pylist() == [
        f"expected {len(CSV_COLUMNS)} fields",
        "bad source address",
        "bad packet count",
    ]
    assert rejects.column("detail").to_pylist() == ["this is not nfdump output", "sa=10.0.0.999", "ipkt=12x"]
    assert flows.num_rows == total - 2

    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "netflow", str(bad), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 3, (
        f"expected exit 3 (partial), got {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    assert json.loads(proc.stdout)  # the summary is JSON for scripts
    assert lake_flows(lake).num_rows == total - 2
    with duckdb.connect() as con:
        stored = con.sql(
            f"select line, reason from read_parquet('{lake}/rejects/**/*.parquet', hive_partitioning=true) "
            "order by line"
        ).fetchall()
    assert stored == [
        (5, f"expected {len(CSV_COLUMNS)} fields"),
        (10, "bad source address"),
        (15, "bad packet count"),
    ]


def test_counts_of_more_than_ten_digits_land(nfcapd_dir, tmp_path):
    """Regression: counts were read with at most 10 digits, so a flow of 10 GB or more was rejected as "bad byte
    count" (the native nfcapd reader lands it; both read up to 18 digits)."""
    lines = probes.nfdump_csv(nfcapd_dir, tmp_path / "good.csv").read_text().splitlines()
    fields = lines[1].split(",")
    fields[12] = "12345678901"  # ibyt: 12.3 GB
    lines[1] = ",".join(fields)
    big = tmp_path / "big.csv"
    big.write_text("\n".join(lines) + "\n")
    flows, rejects = read_nfdump_csv(big)
    assert rejects.num_rows == 0
    assert 12345678901 in flows.column("bytes").to_pylist()


def test_local_time_of_nfdump_is_read_back_with_tz(nfcapd_dir, tmp_path):
    """nfdump prints local time; a CSV made in Europe/Berlin read with tz='Europe/Berlin' gives UTC instants."""
    utc, _ = read_nfdump_csv(probes.nfdump_csv(nfcapd_dir, tmp_path / "utc.csv"))
    berlin_csv = probes.nfdump_csv(nfcapd_dir, tmp_path / "berlin.csv", tz="Europe/Berlin")
    naive, _ = read_nfdump_csv(berlin_csv)
    berlin, _ = read_nfdump_csv(berlin_csv, tz="Europe/Berlin")
    assert berlin.column("ts_start").to_pylist() == utc.column("ts_start").to_pylist()
    # March 2024 in Berlin is UTC+1: read as UTC it is one hour late
    first_naive, first_utc = naive.column("ts_start")[0].as_py(), utc.column("ts_start")[0].as_py()
    assert first_naive - first_utc == dt.timedelta(hours=1)


def test_every_flag_string_and_protocol_name_reads_back():
    """nfdump's FlagsString/ProtoString for all 256 values, parsed back (IDPR is printed for 35 and 38)."""
    letters = "CEUAPRSF"
    texts = [
        "".join(ch if value & (128 >> i) else "." for i, ch in enumerate(letters)) for value in range(256)
    ]
    flags, ok = tcp_flags_from_text(pa.array(texts))
    assert pc.all(ok).as_py() and flags.to_pylist() == list(range(256))
    names = [NFDUMP_PROTOCOLS[n] if n < len(NFDUMP_PROTOCOLS) else f"{n:<5d}" for n in range(256)]
    protos, ok = proto_from_text(pa.array(names))
    assert pc.all(ok).as_py()
    assert protos.to_pylist() == [35 if n == 38 else n for n in range(256)]
    _, ok = proto_from_text(pa.array(["NOPE", "256", ""]))
    assert ok.to_pylist() == [False, False, False]


def test_not_csv_is_not_detected(softflowd_export):
    assert not looks_like_nfdump_csv(softflowd_export(9, "ipv6").export_pcap.read_bytes()[:512])
    assert not looks_like_nfdump_csv(b"a,b,c\n1,2,3\n")


def test_empty_header_only_and_foreign_header_inputs():
    header = ",".join(CSV_COLUMNS).encode()
    for data in (b"", header + b"\n", b"\n\n", header + b"\nSummary\nflows,bytes\n0,0\n"):
        flows, rejects = parse_nfdump_csv(data, "mem")
        assert flows.num_rows == 0 and rejects.num_rows == 0, data
    flows, rejects = parse_nfdump_csv(b"ts,te,td,sa,da,sp,dp,pr,flg\n2024-03-12 10:00:00,x\n", "mem")
    assert flows.num_rows == 0
    assert rejects.column("line").to_pylist() == [1] and "lacks" in rejects.column("reason")[0].as_py()


def test_bundled_sample_capture_and_its_nfdump_csv_agree(tmp_path):
    """sample_data/netflow (made by sample_data/make_netflow_sample.py): the v9 export capture lands the rows
    that nfdump printed as CSV for the same datagrams, and the IPFIX capture of the same traffic lands as many."""
    from pathlib import Path

    from conftest import blank_icmpv6_ports, ingest_in_process

    sample = Path(__file__).resolve().parent.parent / "sample_data" / "netflow"
    from_csv, rejects = read_nfdump_csv(sample / "nfdump-v9.csv")
    assert rejects.num_rows == 0 and from_csv.num_rows > 200
    got = ingest_in_process([sample / "softflowd-v9.pcap"], tmp_path / "lake-v9")
    # v9 ICMPv6 type/code: erratum E2 (conftest.py), nfdump prints 0
    diff = multiset_diff(
        with_seconds(blank_icmpv6_ports(from_csv)), with_seconds(blank_icmpv6_ports(got)), CSV_COMPARED
    )
    assert not diff, f"bundled v9 sample differs from its nfdump CSV:\n{diff}"
    ipfix = ingest_in_process([sample / "softflowd-ipfix.pcap"], tmp_path / "lake-ipfix")
    assert ipfix.num_rows == got.num_rows


def _sample_csv_lines(n: int = 20) -> list[bytes]:
    from pathlib import Path

    sample = Path(__file__).resolve().parent.parent / "sample_data" / "netflow" / "nfdump-v9.csv"
    lines = sample.read_bytes().split(b"\n")
    return lines[: n + 1]  # header + n data lines


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=20),  # data line (0 is the header)
            st.integers(min_value=0, max_value=400),  # position in the line
            st.binary(min_size=0, max_size=6).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
            st.integers(min_value=0, max_value=6),  # bytes replaced
        ),
        min_size=1,
        max_size=6,
    )
)
def test_damaged_csv_gives_rows_or_rejects_never_an_exception(mutations):
    """Any damage to nfdump CSV lines (bytes replaced, inserted, cut; invalid UTF-8): every data line becomes
    a flow or a reject with its own line number, nothing raises."""
    lines = _sample_csv_lines()
    touched = set()
    for index, position, new, cut in mutations:
        line = lines[index]
        position = min(position, len(line))
        lines[index] = line[:position] + new + line[position + cut :]
        touched.add(index + 1)
    data_lines = [i + 1 for i, line in enumerate(lines) if i > 0 and line.strip()]
    flows, rejects = parse_nfdump_csv(b"\n".join(lines) + b"\n", "fuzz")
    assert flows.num_rows + rejects.num_rows == len(data_lines)
    assert set(rejects.column("line").to_pylist()) <= touched
    assert flows.schema == FLOWS


@pytest.mark.parametrize("block_size", [50_000, 1 << 24])
def test_line_numbers_hold_across_batches(block_size):
    """The reader streams in blocks; junk lines, blank lines and bad values anywhere in a long file keep their
    own line numbers, and the Summary trailer is never a reject."""
    lines = _sample_csv_lines(200)
    header, body = lines[0], lines[1:]
    data, bad = [header], []
    for i in range(3000):
        data.append(body[i % len(body)])
        if i % 397 == 5:
            data.append(b"junk,line")
            bad.append(len(data))
        if i % 511 == 7:
            data.append(b"")
        if i % 733 == 9:
            fields = body[0].split(b",")
            fields[3] = b"1.2.3.999"
            data.append(b",".join(fields))
            bad.append(len(data))
    data += [b"Summary", b"flows,bytes,packets,avg_bps,avg_pps,avg_bpp", b"1,2,3,4,5,6"]
    flows, rejects = parse_nfdump_csv(b"\n".join(data) + b"\n", "mem", block_size=block_size)
    assert flows.num_rows == 3000
    assert rejects.column("line").to_pylist() == bad


def test_concatenated_nfdump_outputs_read_as_one(nfcapd_dir, tmp_path):
    """`cat day1.csv day2.csv`: the second header and the first Summary trailer are neither rows nor rejects."""
    one = probes.nfdump_csv(nfcapd_dir, tmp_path / "one.csv").read_bytes()
    flows_one, _ = parse_nfdump_csv(one, "one")
    flows, rejects = parse_nfdump_csv(one + one + b"\n" + one, "three")
    assert rejects.num_rows == 0, rejects.to_pylist()[:3]
    assert flows.num_rows == 3 * flows_one.num_rows


def test_fast_parallel_read_and_its_serial_fallback_give_the_same_line_numbers():
    """read_block parses a pure-ASCII block on all cores when its only invalid lines are its last ones
    (nfdump's Summary trailer); a junk line inside, the trailer's text repeated inside, or a non-ASCII byte send
    it to the serial reader. Every path must number rows and invalid lines as the file does."""
    from tracepipe.ingest.delimited import read_block
    from tracepipe.ingest.nfdump import _NEEDED

    header, *body = _sample_csv_lines(40)
    body = [line for line in body if line.strip()][:30]
    trailer = [b"Summary", b"flows,bytes,packets,avg_bps,avg_pps,avg_bpp", b"1,2,3,4,5,6"]

    def numbered(lines: list[bytes], first_line: int = 7) -> tuple[list[int], list[tuple[int, str]], list]:
        table, numbers, invalid = read_block(
            b"\n".join(lines) + b"\n", first_line, ",", CSV_COLUMNS, _NEEDED, 1
        )
        return numbers.to_pylist(), invalid, table.column("sa").to_pylist()

    # fast path: header skipped, rows on lines 8.., the trailer's three lines after them
    numbers, invalid, _ = numbered([header, *body, *trailer])
    assert numbers == list(range(8, 8 + len(body)))
    assert invalid == [(8 + len(body) + i, t.decode()) for i, t in enumerate(trailer)]

    # fallback: junk inside, and the trailer's first line repeated inside (its text matches a last line)
    for junk in (b"junk,line", b"Summary"):
        lines = [header, *body[:10], junk, *body[10:], *trailer]
        numbers, invalid, _ = numbered(lines)
        assert numbers == [*range(8, 18), *range(19, 19 + len(body) - 10)], junk
        assert invalid[0] == (18, junk.decode())
        assert [n for n, _ in invalid[1:]] == [19 + len(body) - 10 + i for i in range(3)]

    # fallback: a Latin-1 byte in one address is read as that character (then rejected by the address check)
    damaged = body[4].split(b",")
    damaged[3] = b"10.0.0.\xe9"
    lines = [header, *body[:4], b",".join(damaged), *body[5:], *trailer]
    numbers, invalid, addresses = numbered(lines)
    assert numbers == list(range(8, 8 + len(body)))
    assert addresses[4] == "10.0.0.é"
    assert [n for n, _ in invalid] == [8 + len(body) + i for i in range(3)]


def test_numbers_read_by_one_cast_or_row_by_row_checks_agree():
    """_uint casts a whole column at once when every row is 1-18 ASCII digits, and otherwise trims and matches
    each row (then " 80" is a port, "+5", "-1", "٣", "" and 19 digits are not). Both paths give the same values
    for the same text, and a port column without ICMP takes the cast while one with "3.1" still folds it."""
    from tracepipe.ingest.nfdump import _uint, dst_port_from_text

    plain = ["0", "80", "65535", "0000000007", "4294967295"]
    values, ok = _uint(pa.array(plain), pa.int64())
    assert values.to_pylist() == [0, 80, 65535, 7, 4294967295] and all(ok.to_pylist())
    values, ok = _uint(pa.array([*plain, "999999999999999999"]), pa.int64())  # 18 digits: still one cast
    assert values.to_pylist()[-1] == 10**18 - 1 and all(ok.to_pylist())
    mixed = [*plain, " 80", "+5", "-1", "٣", "", "0" * 18 + "1", "8O"]
    values, ok = _uint(pa.array(mixed), pa.int64())
    assert values.to_pylist() == [0, 80, 65535, 7, 4294967295, 80, 0, 0, 0, 0, 0, 0]
    assert ok.to_pylist() == [True] * 6 + [False] * 6
    narrow, ok = _uint(pa.chunked_array([["32767", "32768"], ["1"]]), pa.int16())
    assert narrow.to_pylist() == [32767, 0, 1] and ok.to_pylist() == [True, False, True]

    ports, ok = dst_port_from_text(pa.array(["443", "65536", "53"]))
    assert ports.to_pylist() == [443, 0, 53] and ok.to_pylist() == [True, False, True]
    ports, ok = dst_port_from_text(pa.array(["443", "3.1", "0.0", "65536", "x"]))
    assert ports.to_pylist() == [443, 3 * 256 + 1, 0, 0, 0]
    assert ok.to_pylist() == [True, True, True, False, False]


@pytest.mark.parametrize("block_bytes", [202, 250, 400, 1000])
def test_file_blocks_cut_lines_as_the_stream_reader_does(tmp_path, block_bytes):
    """delimited.iter_file_blocks (files read at offsets, one copy) gives the same lines, the same first line
    numbers and the same over-long lines as limits.iter_line_blocks, whatever the line lengths (within the
    limit, just over it, longer than a window; last line with or without its newline)."""
    import random

    from tracepipe.ingest.delimited import iter_file_blocks
    from tracepipe.limits import Limits, iter_line_blocks

    limits = Limits(line_bytes=100)
    rng = random.Random(block_bytes)
    for trial in range(300):
        lengths = [
            rng.choice([0, 1, 5, 50, 99, 100, 101, 150, 250, 500, 1000]) for _ in range(rng.randint(0, 12))
        ]
        text = b"\n".join(b"x" * n for n in lengths) + rng.choice([b"", b"\n"])
        path = tmp_path / f"{trial}.txt"
        path.write_bytes(text)
        with open(path, "rb") as handle:
            expected = list(iter_line_blocks(handle, block_bytes, limits))
        got = list(iter_file_blocks(str(path), block_bytes, limits))
        assert b"".join(b.data for b in got) == b"".join(b.data for b in expected), lengths
        assert [t for b in got for t in b.too_long] == [t for b in expected for t in b.too_long], lengths
        line = 1
        for block in got:
            assert block.first_line == line
            line += block.data.count(b"\n")


def test_a_malformed_line_deep_in_a_big_file_keeps_its_line_number(tmp_path):
    """Regression for the file reader's fast paths: ~40 MB of nfdump CSV (3 blocks of 16 MB) read from disk,
    with a junk line, a bad address and an over-long line in the middle of the second block. The blocks around
    them stay on the fast (parallel) path, the damaged block falls back to the serial reader; every line number
    is the file's, and everything else lands."""
    from tracepipe.limits import DEFAULT as LIMITS

    header, *body = _sample_csv_lines(200)
    body = [line for line in body if line.strip()]
    data = [header]
    n = 40_000_000 // (len(body[0]) + 1)
    data += [body[i % len(body)] for i in range(n)]
    middle = len(data) * 3 // 5  # inside the second 16 MB block
    fields = body[0].split(b",")
    fields[3] = b"10.1.2.300"
    data[middle : middle + 1] = [
        b"junk,line",
        data[middle],
        b",".join(fields),
        b"x" * (LIMITS.line_bytes + 5),
    ]
    data += [b"Summary", b"flows,bytes,packets,avg_bps,avg_pps,avg_bpp", b"1,2,3,4,5,6"]
    path = tmp_path / "big.csv"
    path.write_bytes(b"\n".join(data) + b"\n")
    flows, rejects = read_nfdump_csv(path)
    assert flows.num_rows == n
    assert rejects.column("line").to_pylist() == [middle + 1, middle + 3, middle + 4]
    assert rejects.column("reason").to_pylist()[:2] == ["expected 48 fields", "bad source address"]
    assert rejects.column("detail").to_pylist()[1] == "sa=10.1.2.300"


def test_workers_land_what_one_process_lands(tmp_path):
    """`ingest netflow FILE.csv --jobs 2`: decode workers read byte ranges of the file (cut at line ends) and
    write the Parquet; the lake must hold the same flows, and the same rejects on the same line numbers, as
    one process reading it. The file: three nfdump outputs concatenated (a Summary trailer and a header in
    the middle), a junk line, a bad address, a blank and an over-long line, over 16 ranges."""

    from tracepipe.ingest.flows import ingest_flow_files
    from tracepipe.ingest.nfdump import nfdump_csv_ranges
    from tracepipe.lake import Lake

    text, bad_lines = _concatenated_csv()
    path = tmp_path / "nfdump.csv"
    path.write_bytes(text)

    def land(jobs: int) -> tuple[list, list]:
        lake = Lake(tmp_path / f"lake-{jobs}")
        summary = ingest_flow_files(lake, [path], jobs=jobs, parallel_min_bytes=1)
        assert summary.files[0].status == "landed"
        flow_columns = "src_addr, dst_addr, src_port, dst_port, proto, packets, bytes, ts_start, exporter"
        rows = lake_rows(lake.root, "flows", flow_columns)
        return rows, lake_rows(lake.root, "rejects", "line, reason, detail", "line")

    assert len(nfdump_csv_ranges(path, "s")) >= 5  # the workers get several ranges
    one_rows, one_rejects = land(1)
    assert len(one_rows) == 10 * 200
    assert [line for line, _, _ in one_rejects] == bad_lines
    assert land(2) == (one_rows, one_rejects)


def _concatenated_csv() -> tuple[bytes, list[int]]:
    from tracepipe.limits import DEFAULT as LIMITS

    header, *body = _sample_csv_lines(200)
    body = [line for line in body if line.strip()][:200]
    trailer = [b"Summary", b"flows,bytes,packets,avg_bps,avg_pps,avg_bpp", b"1,2,3,4,5,6"]
    fields = body[0].split(b",")
    fields[3] = b"10.1.2.300"
    data = [header, *body * 3, b"junk,line", *body, b",".join(fields), b"", b"x" * (LIMITS.line_bytes + 5)]
    data += [*body, *trailer, header, *body * 2, *trailer, *body * 3, *trailer]
    bad = [1 + 3 * len(body) + 1, 1 + 4 * len(body) + 2, 1 + 4 * len(body) + 4]
    return b"\n".join(data) + b"\n", bad


@pytest.mark.parametrize("inside", range(0, 4))
def test_a_range_that_starts_inside_a_summary_trailer(tmp_path, inside):
    """Ranges are cut at any line end, also inside nfdump's 3-line Summary trailer: the trailer lines at the
    head of the next range are dropped as the serial reader drops them, and line numbers run on."""
    from tracepipe.ingest.nfdump import RangeLanding, nfdump_csv_ranges

    text, bad_lines = _concatenated_csv()
    path = tmp_path / "nfdump.csv"
    path.write_bytes(text)
    at = text.index(b"\nSummary\n") + 1
    for _ in range(inside):
        at = text.index(b"\n", at) + 1
    whole = nfdump_csv_ranges(path, "s")[0]
    ranges = [replace(whole, end=at), replace(whole, start=at, end=len(text), skip_rows=0)]
    landing, rejects, flows = RangeLanding(whole.columns), [], 0
    for part in (r.decode() for r in ranges):
        flows += part.flows.num_rows
        rejects += landing.land(part.rejects, part.stats).column("line").to_pylist()
    assert flows == 10 * 200
    assert rejects == bad_lines
    assert read_nfdump_csv(path)[1].column("line").to_pylist() == bad_lines


def test_a_range_that_is_one_huge_line_is_never_held_whole(tmp_path):
    """Hostile input: 160 MB without a newline in the middle of an nfdump CSV. file_ranges puts it in one range
    (ranges are cut at line ends); the worker's read of that range goes through it in bounded windows (peak well
    under the line's size), rejects it as over-long on its own line number, and the lines around it land."""
    import tracemalloc

    from tracepipe.ingest.nfdump import RangeLanding, nfdump_csv_ranges

    header, *body = _sample_csv_lines(20)
    body = [line for line in body if line.strip()][:10]
    path = tmp_path / "huge-line.csv"
    with open(path, "wb") as out:
        out.write(b"\n".join([header, *body]) + b"\n")
        for _ in range(160):
            out.write(b"x" * (1 << 20))
        out.write(b"\n" + b"\n".join(body) + b"\n")
    ranges = nfdump_csv_ranges(path, "s")
    landing, lines, flows = RangeLanding(ranges[0].columns), [], 0
    tracemalloc.start()
    try:
        for job in ranges:
            part = job.decode()
            flows += part.flows.num_rows
            lines += landing.land(part.rejects, part.stats).column("line").to_pylist()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert flows == 2 * len(body)
    assert lines == [2 + len(body)]
    assert peak < 80 << 20, peak  # two 32 MB windows at most (the one read, the one in use), not the line


def _hostile_lines() -> dict[str, tuple[bytes, list[str] | None]]:
    """Lines an attacker (or a damaged disk) puts among nfdump's: each with the reasons its line(s) must be
    rejected with ([] when the line lands as nfdump's own line would, None for a blank line: neither)."""
    from tracepipe.limits import DEFAULT as LIMITS

    good = next(line for line in _sample_csv_lines(20)[1:] if line.strip())
    f = good.split(b",")

    def with_field(index: int, value: bytes) -> bytes:
        return b",".join([*f[:index], value, *f[index + 1 :]])

    width = f"expected {len(CSV_COLUMNS)} fields"
    return {
        "nul-in-time": (good[:25] + b"\x00" + good[25:], ["bad end time"]),
        "nul-in-address": (with_field(3, b"10.0.0.1\x00"), ["bad source address"]),
        "nul-only": (b"\x00" * 100, [width]),
        "quote-opening-the-line": (b'"' + good, ["bad start time"]),
        "quoted-address": (with_field(3, b'"10.0.0.1"'), ["bad source address"]),
        "quote-never-closed": (with_field(4, b'"10.0.0.1'), ["bad destination address"]),
        "latin-1-address": (with_field(3, b"10.0.0.\xe9"), ["bad source address"]),
        "non-utf-8-port": (with_field(5, b"\xc3\x28"), ["bad source port"]),
        "source-port-past-65535": (with_field(5, b"99999999"), ["bad source port"]),  # (it landed)
        "destination-port-past-65535": (with_field(6, b"65536"), ["bad destination port"]),
        "non-utf-8-unused-field": (with_field(20, b"\xff\xfe"), []),  # nfdump's smk: not read, lands
        # a lone CR: one line still (line numbers after it are grep's, in one process and in the workers)
        "cr-inside-a-field": (with_field(3, b"10.0.\r0.1"), ["bad source address"]),
        "cr-in-unused-field": (with_field(20, b"\r"), []),
        "crlf": (good + b"\r", []),
        "49-fields": (good + b",x", [width]),
        "47-fields": (good.rsplit(b",", 1)[0], [width]),
        "one-field": (b"x", [width]),
        "blank": (b"", None),
        "blank-crlf": (b"\r", None),
        "spaces-only": (b"   ", None),
        "48-empty-fields": (b"," * 47, ["bad start time"]),  # was dropped as if blank: no flow, no reject
        "48-fields-time-and-address-empty": (with_field(0, b"").replace(f[3], b"", 1), ["bad start time"]),
        "over-long": (b"9," * (LIMITS.line_bytes // 2 + 8), ["limit line_bytes"]),
        "over-long-no-comma": (b"9" * (LIMITS.line_bytes + 8), ["limit line_bytes"]),
    }


@pytest.mark.parametrize("name", list(_hostile_lines()))
def test_hostile_lines_are_rejects_with_their_line_and_the_rest_lands(tmp_path, name):
    """Each hostile line in the middle of a file: rejected on its own line number(s) with its reason (or landed,
    where nfdump would print it so), never raising, every other line landing; the same through the decode
    workers' byte ranges (CsvRange, what a worker runs) as through the serial reader. Regression: a line of 48
    fields whose time and source address were empty (",,,,...") was dropped as if it were blank."""
    from tracepipe.ingest.nfdump import RangeLanding, nfdump_csv_ranges

    line, reasons = _hostile_lines()[name]
    landed = 2 * 10 + (1 if reasons == [] else 0)
    reasons = reasons or []
    header, *body = _sample_csv_lines(20)
    body = [row for row in body if row.strip()][:10]
    data = [
        header,
        *body,
        line,
        *body,
        b"Summary",
        b"flows,bytes,packets,avg_bps,avg_pps,avg_bpp",
        b"1,2,3,4,5,6",
    ]
    path = tmp_path / "hostile.csv"
    path.write_bytes(b"\n".join(data) + b"\n")
    flows, rejects = read_nfdump_csv(path)
    assert flows.num_rows == landed
    assert rejects.column("reason").to_pylist() == reasons
    assert rejects.column("line").to_pylist() == list(range(12, 12 + len(reasons)))

    # cut after the line before the hostile one, and after the hostile one: three ranges
    text = path.read_bytes()
    before = len(b"\n".join(data[:11])) + 1
    after = before + len(line) + 1
    whole = nfdump_csv_ranges(path, "s")[0]
    ranges = [
        replace(whole, end=before),
        replace(whole, start=before, end=after, skip_rows=0),
        replace(whole, start=after, end=len(text), skip_rows=0),
    ]
    landing, lines, found, parts = RangeLanding(whole.columns), [], [], 0
    for part in (job.decode() for job in ranges):
        parts += part.flows.num_rows
        got = landing.land(part.rejects, part.stats)
        lines += got.column("line").to_pylist()
        found += got.column("reason").to_pylist()
    assert (parts, lines, found) == (landed, rejects.column("line").to_pylist(), reasons)


def test_hostile_lines_through_the_decode_workers(tmp_path):
    """All the hostile lines in one file, ingested with two decode workers and with one process: the same
    flows and the same rejects (line, reason) in the lake, and the command says partial (exit 3)."""
    from tracepipe.ingest.flows import ingest_flow_files
    from tracepipe.lake import Lake

    header, *body = _sample_csv_lines(20)
    body = [row for row in body if row.strip()][:10]
    data, expected = [header], []
    for line, reasons in _hostile_lines().values():
        data += [*body, line]
        expected += [(len(data) + i, reason) for i, reason in enumerate(reasons or [])]
    data += body
    path = tmp_path / "hostile.csv"
    path.write_bytes(b"\n".join(data) + b"\n")

    def land(jobs: int) -> tuple[list, list, int]:
        lake = Lake(tmp_path / f"lake-{jobs}")
        summary = ingest_flow_files(lake, [path], jobs=jobs, parallel_min_bytes=1)
        flows = lake_rows(lake.root, "flows", "src_addr, dst_addr, src_port, dst_port, ts_start, bytes")
        return flows, lake_rows(lake.root, "rejects", "line, reason", "line"), summary.exit_code

    one = land(1)
    assert [tuple(row) for row in one[1]] == expected
    assert one[2] == 3
    assert land(2) == one


def test_quiet_outputs_of_empty_slots_and_flags_of_records_not_tcp(tmp_path):
    """Review of nfdump's forms (session 35): `nfdump -q -o csv` of a slot of no flows prints only "No matching
    flows", and a day of such outputs concatenated was "not a pcap, nfdump-csv, nfcapd file" when its first slot
    was quiet (exit 4, every flow of the day lost); and `-o csv` prints a flags field for every record, so a UDP
    record's flags byte landed as tcp_flags where nfdump's binary file and `fmt:` give 0."""
    lines = _sample_csv_lines(6)[1:]  # (-q: no header)
    fields = lines[0].split(b",")
    fields[7], fields[8] = b"UDP", b"...AP.SF"  # (pr, flg) of a record not TCP
    lines[0] = b",".join(fields)
    day = tmp_path / "day.csv"
    day.write_bytes(b"No matching flows\n" + b"\n".join(lines) + b"\nNo matching flows\n")
    quiet = tmp_path / "quiet.csv"
    quiet.write_bytes(b"No matching flows\n")
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "netflow", str(day), str(quiet), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    statuses = [(f["kind"], f["status"], f["flows"]) for f in json.loads(proc.stdout)["files"]]
    assert statuses == [("nfdump-csv", "landed", 6), ("nfdump-csv", "empty", 0)]
    udp = [r for r in lake_flows(lake).to_pylist() if r["proto"] == 17]
    assert udp and all(r["tcp_flags"] == 0 for r in udp)


def test_ingest_netflow_tz_reads_a_csv_nfdump_wrote_in_local_time(nfcapd_dir, tmp_path):
    """Review of nfdump's forms (session 35): `ingest netflow` took nfdump CSV times as UTC with no way to say
    otherwise, so a CSV nfdump wrote in New York landed five hours early. `--tz` reads them as that zone's, in one
    process and through the decode workers alike."""
    from tracepipe.ingest.flows import ingest_flow_files
    from tracepipe.lake import Lake

    utc = lake_flows_of(probes.nfdump_csv(nfcapd_dir, tmp_path / "utc.csv"), tmp_path / "l0")
    local = probes.nfdump_csv(nfcapd_dir, tmp_path / "ny.csv", tz="America/New_York")
    proc = run_tracepipe(
        "ingest", "netflow", str(local), "--tz", "America/New_York", "--lake", str(tmp_path / "l1")
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(lake_flows(tmp_path / "l1").column("ts_start").to_pylist()) == utc
    workers = ingest_flow_files(
        Lake(tmp_path / "l2"), [local], jobs=2, parallel_min_bytes=1, tz="America/New_York"
    )
    assert (
        workers.exit_code == 0 and sorted(lake_flows(tmp_path / "l2").column("ts_start").to_pylist()) == utc
    )
    naive = run_tracepipe("ingest", "netflow", str(local), "--lake", str(tmp_path / "l3"))
    assert naive.returncode == 0 and sorted(lake_flows(tmp_path / "l3").column("ts_start").to_pylist()) != utc


def lake_flows_of(csv, lake) -> list:
    """The sorted flow start times a CSV lands (as UTC)."""
    proc = run_tracepipe("ingest", "netflow", str(csv), "--lake", str(lake))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(lake_flows(lake).column("ts_start").to_pylist())
