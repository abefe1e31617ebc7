"""`tracepipe ingest zeek` (issue 14, item 1): Zeek conn.log, TSV and JSON, plain, gzip'ed and rotated, lands
exactly what the log says, read the way `zeek-cut` reads it (columns by their #fields name, `-` unset), on real
Zeek output (tests/data/zeek/, see PROVENANCE.md). Zeek itself is not packaged for Debian 12, so the oracle is
zeek-cut's documented semantics, written out below independently of the reader (csv module, per line)."""

from __future__ import annotations

import csv
import gzip
import json
from collections import Counter
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import lake_flows, run_tracepipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracepipe.flowstate import ZEEK_FAILED_STATES, failed_attempt
from tracepipe.ingest.zeek import parse_conn_log, read_conn_log
from tracepipe.lake import Lake

DATA = Path(__file__).parent / "data" / "zeek"
WRCCDC = DATA / "conn-wrccdc2018.log"
ZEEK_REPO = DATA / "conn-zeek-repo.log"
PROTO = {"tcp": 6, "udp": 17, "icmp": 1}


def zeek_cut(path: Path) -> list[dict[str, str | None]]:
    """zeek-cut semantics: every data line as {field: value} by the latest #fields header; `-` is unset."""
    rows = []
    fields: list[str] = []
    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    with opener(path, "rt", newline="") as handle:
        for line in handle:
            line = line.rstrip("\n")
            if line.startswith("#fields"):
                fields = line.split("\t")[1:]
            elif line and not line.startswith("#"):
                values = line.split("\t")
                rows.append({f: (None if v == "-" else v) for f, v in zip(fields, values, strict=True)})
    return rows


def micros(seconds: str) -> int:
    whole, _, fraction = seconds.partition(".")
    return int(whole) * 1_000_000 + int((fraction + "000000")[:6])


def expected_rows(records: list[dict[str, str | None]]) -> Counter:
    """Two directions per connection, as the conn.log documentation defines the columns."""
    out: Counter = Counter()
    for r in records:
        start = micros(r["ts"])
        end = start + (micros(r["duration"]) if r["duration"] else 0)
        proto = PROTO[r["proto"]]
        common = (start, end, proto, r["uid"], r["conn_state"], r["history"])
        out[(r["id.orig_h"], r["id.resp_h"], int(r["id.orig_p"]), int(r["id.resp_p"]), int(r["orig_pkts"]),
             int(r["orig_ip_bytes"]), *common)] += 1  # fmt: skip
        if int(r["resp_pkts"]) > 0:
            out[(r["id.resp_h"], r["id.orig_h"], int(r["id.resp_p"]), int(r["id.orig_p"]), int(r["resp_pkts"]),
                 int(r["resp_ip_bytes"]), *common)] += 1  # fmt: skip
    return out


def got_rows(flows: pa.Table) -> Counter:
    d = flows.to_pydict()
    us = pc.cast(flows.column("ts_start"), pa.int64()).to_pylist()
    end = pc.cast(flows.column("ts_end"), pa.int64()).to_pylist()
    return Counter(
        zip(
            d["src_addr"],
            d["dst_addr"],
            d["src_port"],
            d["dst_port"],
            d["packets"],
            d["bytes"],
            us,
            end,
            d["proto"],
            d["uid"],
            d["conn_state"],
            d["history"],
            strict=True,
        )
    )


def to_json_lines(records: list[dict[str, str | None]]) -> str:
    """The same connections as Zeek writes them with LogAscii::use_json=T: numbers as numbers, unset omitted."""
    numbers = {"id.orig_p", "id.resp_p", "orig_bytes", "resp_bytes", "missed_bytes", "orig_pkts",
               "orig_ip_bytes", "resp_pkts", "resp_ip_bytes"}  # fmt: skip
    lines = []
    for r in records:
        obj: dict[str, object] = {}
        for key, value in r.items():
            if value is None or key == "tunnel_parents":
                continue
            if key in ("ts", "duration"):
                obj[key] = float(value)
            elif key in numbers:
                obj[key] = int(value)
            else:
                obj[key] = value
        lines.append(json.dumps(obj))
    return "\n".join(lines) + "\n"


def test_tsv_lands_exactly_what_zeek_cut_reads(tmp_path):
    """The real Zeek logs through the real CLI: every connection, both directions, as zeek-cut reads them."""
    lake = tmp_path / "lake"
    proc = run_tracepipe(
        "ingest", "zeek", str(WRCCDC), str(ZEEK_REPO), "--lake", str(lake), "--format", "json"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    records = zeek_cut(WRCCDC) + zeek_cut(ZEEK_REPO)
    expected = expected_rows(records)
    assert len(records) == 19 and sum(expected.values()) == 34
    assert summary["totals"]["flows"] == 34 and summary["totals"]["rejects"] == 0
    flows = lake_flows(lake)
    assert got_rows(flows) == expected
    # uid pivots back to Zeek's other logs: every connection's uid is there, on both of its rows
    assert Counter(flows.column("uid").to_pylist())["C9zBQP1nnfBHxUTEY1"] == 2
    assert set(flows.column("source").to_pylist()) == {str(WRCCDC.absolute()), str(ZEEK_REPO.absolute())}


def test_json_gzip_and_rotated_files_give_the_same_rows(tmp_path):
    records = zeek_cut(WRCCDC)
    tsv, _, _ = read_conn_log(WRCCDC)
    as_json = tmp_path / "conn.json.log"
    as_json.write_text(to_json_lines(records))
    gz = tmp_path / "conn.12:00:00-13:00:00.log.gz"
    gz.write_bytes(gzip.compress(WRCCDC.read_bytes()))
    # a rotated day concatenated (`cat`): two logs, each with its own header, the second with another column
    # order and without the #close of the first
    text = WRCCDC.read_text().splitlines(keepends=True)
    header = [line for line in text if line.startswith("#")]
    body = [line for line in text if not line.startswith("#")]
    fields = header[6].rstrip("\n").split("\t")[1:]
    order = list(reversed(range(len(fields))))
    second = [*header[:6], "#fields\t" + "\t".join(fields[i] for i in order) + "\n"]
    second += ["\t".join(line.rstrip("\n").split("\t")[i] for i in order) + "\n" for line in body[10:]]
    rotated = tmp_path / "conn.rotated.log"
    rotated.write_text("".join([*header, *body[:10], "#close\t2019-11-08-11-44-16\n", *second]))
    for path in (as_json, gz, rotated):
        flows, rejects, _ = read_conn_log(path)
        assert rejects.num_rows == 0, (path.name, rejects.to_pylist())
        assert got_rows(flows) == got_rows(tsv), path.name


def test_zeek_failed_states_are_failed_attempts_by_the_shared_rule():
    """The detectors' one rule (tracepipe.flowstate.failed_attempt) says what Zeek's conn_state says: the
    originator of S0, REJ, RSTOS0 and SH never completed a handshake; SF/RSTO/RSTR ones did."""
    flows, _, _ = read_conn_log(WRCCDC)
    frame = pl.from_arrow(flows).with_columns(failed=failed_attempt())
    originators = frame.filter(pl.col("src_addr").is_in(["10.128.0.207", "10.174.251.215", "10.47.25.80"]))
    states = dict(zip(originators["conn_state"], originators["failed"], strict=True))
    assert {"S0", "REJ"} <= set(states) and all(states[s] for s in states if s in ZEEK_FAILED_STATES)
    rstos0 = frame.filter((pl.col("conn_state") == "RSTOS0") & (pl.col("history") == "R"))
    assert rstos0.height == 1 and rstos0["failed"].all()
    established = frame.filter(
        pl.col("history").str.contains("ShAD") & (pl.col("src_addr") == "10.164.94.120")
    )
    assert established.height >= 5 and not established["failed"].any()
    # the REJ's answer (RST from the responder) is not an attempt of the responder's
    answers = frame.filter((pl.col("conn_state") == "REJ") & (pl.col("src_addr") == "10.128.0.218"))
    assert answers.height == 3 and not answers["failed"].any()
    # flags as NetFlow would have them: SYN only for S0, SYN|ACK|PSH for an originator that sent data
    assert set(frame.filter(pl.col("conn_state") == "S0")["tcp_flags"]) == {2}


def test_history_missing_falls_back_to_conn_state():
    text = (
        ZEEK_REPO.read_text()
        .replace("\tSF\t-\t-\t0\tDd\t", "\tREJ\t-\t-\t0\t-\t")
        .replace("\tudp\t", "\ttcp\t")
    )
    flows, rejects, _ = parse_conn_log(text.encode(), "x")
    assert rejects.num_rows == 0
    assert flows.column("tcp_flags").to_pylist() == [2, 20]  # SYN; RST|ACK
    assert flows.column("history").to_pylist() == [None, None]


BAD = """#separator \\x09
#set_separator\t,
#empty_field\t(empty)
#unset_field\t-
#path\tconn
#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tduration\torig_pkts\torig_ip_bytes\tresp_pkts\tresp_ip_bytes\tconn_state\thistory
1632928690.500620\tC1\t192.168.1.99\t62978\t192.168.1.1\t53\tudp\t0.1\t1\t83\t1\t162\tSF\tDd
1632928690.500620\tC2\t999.1.1.1\t62978\t192.168.1.1\t53\tudp\t0.1\t1\t83\t1\t162\tSF\tDd
1632928690.500620\tC3\t192.168.1.99\t70000\t192.168.1.1\t53\tudp\t0.1\t1\t83\t1\t162\tSF\tDd
yesterday\tC4\t192.168.1.99\t1\t192.168.1.1\t53\tudp\t0.1\t1\t83\t1\t162\tSF\tDd
1632928690.5\tC5\t192.168.1.99\t1\t192.168.1.1

1632928690.5\tC6\t2001:DB8::1\t1\t2001:db8::2\t53\tudp\t-\t1\t83\t0\t0\tS0\t-
1632928690.5\tC7\t192.168.1.99\t1\t192.168.1.1\t53\tsctp\t0.1\t1\t83\t1\t162\tSF\tDd
#path\tdns
1632928690.5\tC8\t192.168.1.99\t1\t192.168.1.1\t53\tudp\t0.1\t1\t83\t1\t162\tSF\tDd
"""


def test_bad_lines_are_rejects_with_line_and_reason_the_rest_lands(tmp_path):
    path = tmp_path / "conn.log"
    path.write_text(BAD)
    flows, rejects, _ = read_conn_log(path)
    assert sorted(flows.column("uid").unique().to_pylist()) == ["C1", "C6"]
    assert flows.filter(pc.equal(flows.column("uid"), "C6")).column("src_addr").to_pylist() == ["2001:db8::1"]
    got = {(r["line"], r["reason"]) for r in rejects.to_pylist()}
    assert got == {
        (8, "bad originator address"),
        (9, "bad originator port"),
        (10, "bad time"),
        (11, "expected 14 fields"),
        (14, "unknown protocol"),
        (16, "not a conn log (#path dns)"),
    }
    proc = run_tracepipe("ingest", "zeek", str(path), "--lake", str(tmp_path / "lake"))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    # the file's rejects are in the lake with where they were
    files = [str(p) for p in Lake(tmp_path / "lake").files("rejects")]
    lake_rejects = duckdb.sql(f"SELECT line, reason FROM read_parquet({files}) ORDER BY line").fetchall()
    assert (8, "bad originator address") in lake_rejects and len(lake_rejects) == 6


def test_json_bad_lines_are_rejects_by_line(tmp_path):
    good = to_json_lines(zeek_cut(ZEEK_REPO)).strip()
    bad_type = good.replace('"id.orig_p": 62978', '"id.orig_p": "x"')
    text = "\n".join([good, "{not json", bad_type, "", good.replace("192.168.1.99", "nope"), good, "[1, 2]"])
    path = tmp_path / "conn.json"
    path.write_text(text + "\n")
    flows, rejects, _ = read_conn_log(path)
    assert flows.num_rows == 4  # lines 1 and 6, two directions each
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejects.to_pylist()] == [
        (2, "bad json"),
        (3, "bad json"),
        (5, "bad originator address"),
        (7, "bad json"),
    ]


def test_many_junk_lines_cost_one_python_check_each_not_two_arrow_parses(tmp_path, monkeypatch):
    # 100,000 lines of "x" between two good ones (545 bytes gzipped) took 17 s of CPU: every bad line was found
    # by halving the block, two Arrow parses (~85 us) per bad line
    from tracepipe.ingest import zeek

    parses = []
    real = zeek._read_json_chunk
    monkeypatch.setattr(
        zeek, "_read_json_chunk", lambda chunk, schema: parses.append(1) or real(chunk, schema)
    )
    good = to_json_lines(zeek_cut(ZEEK_REPO)).strip()
    junk = ["x", "{not json", "[1, 2]", '{"ts": "x"}', '{"proto": 6}', '{"orig_bytes": 1e400}', "{}{}", "NaN"]
    junk += [
        '{"uid": "\\ud800"}',
        '{"proto": 5, "proto": "tcp"}',
    ]  # Python read them, Arrow does not (review)
    lines = [good] + [junk[i % len(junk)] for i in range(20_000)] + [good]
    (tmp_path / "conn.json").write_text("\n".join(lines) + "\n")
    flows, rejects, _ = read_conn_log(tmp_path / "conn.json")
    assert flows.num_rows == 4  # the two good lines, two directions each
    assert rejects.num_rows == 20_000
    assert {r.split(":")[0] for r in rejects.column("reason").to_pylist()} == {"bad json"}
    assert rejects.column("line").to_pylist() == list(range(2, 20_002))
    # the block, its pieces, then each failing piece's good lines together: bounded whatever the junk
    assert len(parses) <= 1 + 2 * zeek.JSON_PIECES


def test_one_bad_line_sends_only_its_piece_of_the_block_through_python(tmp_path, monkeypatch):
    """A line cut short by a Zeek still writing sent every line of its 16 MiB block (~50 k) through the stdlib
    (3.5x the file's CPU at one bad line in 100 k; performance review, session 38): only its piece now."""
    from tracepipe.ingest import zeek

    checked = []
    real = zeek._json_line_error
    monkeypatch.setattr(
        zeek, "_json_line_error", lambda line, schema: checked.append(1) or real(line, schema)
    )
    good = to_json_lines(zeek_cut(ZEEK_REPO)).strip().splitlines()
    lines = (good * (6400 // len(good) + 1))[:6400]
    lines[3210] = '{"ts": 1751234567.1, "uid": "Ccut", "id.orig_h": "10.64.1.2",'  # cut short
    (tmp_path / "conn.json").write_text("\n".join(lines) + "\n")
    flows, rejects, _ = read_conn_log(tmp_path / "conn.json")
    assert rejects.column("line").to_pylist() == [3211]
    assert flows.num_rows == 2 * 6399
    assert len(checked) <= 6400 // zeek.JSON_PIECES + 1


def test_ingest_netflow_names_the_command_for_a_zeek_log(tmp_path):
    proc = run_tracepipe("ingest", "netflow", str(WRCCDC), "--lake", str(tmp_path / "lake"))
    assert proc.returncode == 4
    assert "tracepipe ingest zeek" in proc.stdout


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.booleans())
def test_any_bytes_after_a_header_give_rows_or_rejects_never_a_crash(tail, as_json):
    head = b"" if as_json else ZEEK_REPO.read_bytes()[:600]
    data = (b'{"ts":1.5,"id.orig_h":"1.2.3.4"}\n' if as_json else head) + tail
    flows, rejects, _ = parse_conn_log(data, "fuzz")
    assert flows.num_rows >= 0 and rejects.num_rows >= 0


@pytest.mark.parametrize("name", ["conn-wrccdc2018.log", "conn-zeek-repo.log"])
def test_sample_data_has_provenance(name):
    assert name in (DATA / "PROVENANCE.md").read_text()
    rows = list(csv.reader((DATA / name).open(), delimiter="\t"))
    assert rows[0][0] == "#separator \\x09"


def test_out_of_range_numbers_are_rejects_not_overflows():
    """Regression: a JSON ts or duration of 1e300 (valid JSON, hostile) overflowed the µs cast and raised
    instead of being one rejected line."""
    line = '{"ts":%s,"id.orig_h":"1.2.3.4","id.orig_p":1,"id.resp_h":"1.2.3.5","id.resp_p":2,"proto":"tcp"%s}'
    text = "\n".join(
        [line % ("1e300", ""), line % ("1.5", ',"duration":1e300'), line % ("1.5", ',"duration":-1')]
    )
    flows, rejects, _ = parse_conn_log((text + "\n" + line % ("1710237600.5", "") + "\n").encode(), "x")
    assert [(r["line"], r["reason"]) for r in rejects.to_pylist()] == [
        (1, "bad time"),
        (2, "bad duration"),
        (3, "bad duration"),
    ]
    assert flows.num_rows == 1


def test_a_lake_from_before_the_zeek_columns_takes_zeek_flows(tmp_path):
    """flows gained uid, conn_state, history (issue 14): a lake whose flow files lack them takes a Zeek log,
    and both readers (DuckDB views, the detectors' polars scan) see old and new rows, the old with nulls."""
    import datetime as dt

    from deltalake import write_deltalake

    from tracepipe.detect.features import scan_flows
    from tracepipe.schema import FLOWS

    old_schema = pa.schema([f for f in FLOWS if f.name not in ("uid", "conn_state", "history")])
    old = read_conn_log(ZEEK_REPO)[0].select(old_schema.names).cast(old_schema)
    old = old.set_column(
        old.column_names.index("src_addr"), "src_addr", pa.array(["10.9.9.9"] * old.num_rows)
    )
    root = tmp_path / "lake"
    days = pc.strftime(old.column("ts_start"), format="%Y-%m-%d")
    write_deltalake(str(root / "flows"), old.append_column("date", days), partition_by=["date"])
    shifted = tmp_path / "conn.log"  # the same day, so that both generations of files are read together
    shifted.write_text(ZEEK_REPO.read_text().replace("CvVbVi3kNVC4LPU90f", "Cnew"))
    proc = run_tracepipe("ingest", "zeek", str(shifted), "--lake", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    flows = lake_flows(root)
    assert sorted(flows.column("uid").to_pylist(), key=str) == ["Cnew", "Cnew", None, None]
    day = dt.datetime(2021, 9, 29, tzinfo=dt.UTC)
    frame = scan_flows(Lake(root), day, day + dt.timedelta(days=1)).collect()
    assert frame.height == 4 and sorted(frame["conn_state"].to_list(), key=str) == [None, None, "SF", "SF"]


LABELLED = Path(__file__).parent / "data" / "detection" / "ctu-normal-44-day2.conn.log.labeled.gz"


def test_stratosphere_labelled_log_lands_and_its_labels_go_to_flow_labels(tmp_path):
    """Stratosphere's *.labeled conn.logs add `tunnel_parents label detailedlabel` columns: the reader ignores
    what it does not use, every connection lands, and `label` goes to flow_labels (never into flows), keyed
    by the connection's originator row, one label per connection as zeek-cut reads it."""
    records = zeek_cut(LABELLED)
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "zeek", str(LABELLED), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["totals"]["rejects"] == 0
    assert summary["totals"]["flows"] == sum(expected_rows(records).values())
    assert "label" not in lake_flows(lake).column_names
    files = [str(p) for p in Lake(lake).files("flow_labels")]
    labels = duckdb.sql(f"SELECT src_addr, dst_addr, src_port, label FROM read_parquet({files})").fetchall()
    assert Counter(r[3] for r in labels) == Counter(r["label"] for r in records)
    assert Counter(labels) == Counter(
        (r["id.orig_h"], r["id.resp_h"], int(r["id.orig_p"]) if r["proto"] != "icmp" else 0, r["label"])
        for r in records
    )
    assert Counter(r[3] for r in labels)["Malicious"] > 0


def test_iot23_joined_label_field_gives_the_middle_word():
    """IoT-23 writes `tunnel_parents   label   detailed-label` as ONE tab-separated field (spaces inside), in
    the header and in every row: the rows land, and the label is the middle word."""
    head = WRCCDC.read_text().splitlines()
    fields = next(line for line in head if line.startswith("#fields")).split("\t")[1:]
    assert fields[-1] == "tunnel_parents"
    header = [
        (line + "   label   detailed-label") if line.startswith("#fields") else line
        for line in head
        if line.startswith("#") and not line.startswith(("#types", "#close"))
    ]
    rows = [line for line in head if not line.startswith("#")][:3]
    text = "\n".join(
        [
            *header,
            rows[0] + "   Malicious   PartOfAHorizontalPortScan",
            rows[1] + "   Benign   -",
            rows[2] + "   -   -",
        ]
    )
    flows, rejects, labels = parse_conn_log((text + "\n").encode(), "iot23")
    assert rejects.num_rows == 0
    assert labels.column("label").to_pylist() == ["Malicious", "Benign", None]
    assert labels.column("line").to_pylist() == [len(header) + 1, len(header) + 2, len(header) + 3]
    assert flows.num_rows >= 3


def test_blank_lines_cost_nothing_and_the_line_numbers_stay_the_files(tmp_path):
    """Session-24 hostile review: each blank line was an invalid row of pyarrow's reader, a Python callback and
    a kept tuple (a 196 KB gzip'ed log of 200 MB of blank lines: 2.2 GB, minutes). They are dropped with numpy
    before parsing; the rows and the rejects keep the file's line numbers."""
    lines = WRCCDC.read_bytes().split(b"\n")
    header = [x for x in lines if x.startswith(b"#") and not x.startswith(b"#close")]
    rows = [x for x in lines if x and not x.startswith(b"#")]
    body = [rows[0], b"", b"", b"junk", b"\r", rows[1], *[b""] * 5000, rows[2]]
    data = b"\n".join([*header, *body]) + b"\n"
    flows, rejects, _ = parse_conn_log(data, "x")
    plain, _, _ = parse_conn_log(b"\n".join([*header, rows[0], rows[1], rows[2]]) + b"\n", "x")
    assert flows.num_rows == plain.num_rows > 0
    assert [(r["line"], r["reason"]) for r in rejects.to_pylist()] == [
        (len(header) + 4, "expected 21 fields")
    ]


def test_a_truncated_gzip_lands_what_came_before_the_cut(tmp_path):
    """GzipFile.read(16 MB) raised at the cut and dropped all it had decompressed: a cut .gz under one read
    landed nothing (the README promised what came before it)."""
    lines = WRCCDC.read_bytes().split(b"\n")
    header = [x for x in lines if x.startswith(b"#") and not x.startswith(b"#close")]
    rows = [x for x in lines if x and not x.startswith(b"#")]
    whole = b"\n".join([*header, *rows * 200]) + b"\n"
    packed = gzip.compress(whole)
    cut = tmp_path / "conn.log.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    flows, rejects, _ = read_conn_log(cut)
    complete, _, _ = parse_conn_log(whole, "x")
    assert 0 < flows.num_rows < complete.num_rows
    assert rejects.column("reason").to_pylist()[-1] == "truncated gzip"


def test_a_start_outside_the_window_is_one_reject_with_its_line():
    """The lake's writer rejected such a connection once per direction (two rows) and named no line."""
    lines = WRCCDC.read_bytes().split(b"\n")
    header = [x for x in lines if x.startswith(b"#") and not x.startswith(b"#close")]
    rows = [x for x in lines if x and not x.startswith(b"#")]
    old = b"1.0" + rows[0][rows[0].index(b"\t") :]
    flows, rejects, _ = parse_conn_log(b"\n".join([*header, old, rows[1]]) + b"\n", "x")
    assert [(r["line"], r["reason"]) for r in rejects.to_pylist()] == [
        (len(header) + 1, "time outside plausible window")
    ]
    assert rejects.column("detail")[0].as_py().startswith("ts_start=1970-01-01 00:00:01")
    assert flows.num_rows >= 1


def _sample() -> tuple[list[bytes], list[bytes]]:
    """(header lines, data lines) of the real WRCCDC log."""
    lines = WRCCDC.read_bytes().split(b"\n")
    header = [x for x in lines if x.startswith(b"#") and not x.startswith(b"#close")]
    return header, [x for x in lines if x and not x.startswith(b"#")]


def test_a_lone_cr_is_one_reject_and_the_files_after_it_land(tmp_path):
    """Session-27 review: pyarrow ended a row at a lone CR while the reader counts lines by LF: `internal error:
    IndexError('index 6 is out of bounds')`, exit 4, and the next file of the command never landed. A line
    holding a lone CR (Zeek escapes control bytes as \\x0d, so never its own) is one reject with its line; the
    half after the CR, a whole forged row here, does not land."""
    header, rows = _sample()
    forged = rows[3].replace(rows[3].split(b"\t")[2], b"10.66.66.66")
    body = [rows[0], rows[1] + b"\r" + forged, rows[2], b"junk"]
    bad = tmp_path / "bad.log"
    bad.write_bytes(b"\n".join([*header, *body]) + b"\n")
    good = tmp_path / "good.log"
    good.write_bytes(b"\n".join([*header, rows[4]]) + b"\n")
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "zeek", str(bad), str(good), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    files = {Path(f["path"]).name: f for f in json.loads(proc.stdout)["files"]}
    assert files["good.log"]["flows"] > 0
    rejects = [(r["line"], r["reason"]) for r in Lake(lake).read("rejects").to_pylist()]
    assert sorted(rejects) == [
        (len(header) + 2, "lone CR (0x0d) inside the line"),
        (len(header) + 4, "expected 21 fields"),
    ]
    flows = lake_flows(lake)
    assert "10.66.66.66" not in flows.column("src_addr").to_pylist()
    uid = rows[1].split(b"\t")[1].decode()
    assert uid not in flows.column("uid").to_pylist()


@pytest.mark.parametrize("separator", ["", "\\x00", "ab", "\\xff", "\\x80", "\\x0a", "\\x0d", "\\x22"])
def test_a_later_unusable_separator_makes_the_lines_under_it_rejects(separator):
    """Session-27 review: `#separator` after a valid header was taken as it was (the check ran for the other
    headers only): an empty, two-character, NUL or non-ASCII one reached pyarrow's ParseOptions, whose
    ValueError was an internal error. The lines under it are rejects naming it; the lines before it land."""
    header, rows = _sample()
    data = b"\n".join([*header, rows[0], b"#separator " + separator.encode(), rows[1], rows[2]]) + b"\n"
    flows, rejects, _ = parse_conn_log(data, "x")
    before, _, _ = parse_conn_log(b"\n".join([*header, rows[0]]) + b"\n", "x")
    assert flows.num_rows == before.num_rows > 0
    assert rejects.column("line").to_pylist() == [len(header) + 3, len(header) + 4]
    assert {r[:24] for r in rejects.column("reason").to_pylist()} == {"unsupported #separator '"}


def test_a_non_ascii_separator_rejects_the_file_and_the_next_file_lands(tmp_path):
    """Session-27 review: a header whose separator was \\xff passed the one-character check and pyarrow raised
    `ValueError('Expecting an ASCII character')`: internal error, exit 4, the next file never read."""
    header, rows = _sample()
    bad = tmp_path / "bad.log"
    swap = [x.replace(b"\t", b"\xff") for x in header[1:] + rows[:3]]
    bad.write_bytes(b"\n".join([b"#separator \\xff", *swap]) + b"\n")
    good = tmp_path / "good.log"
    good.write_bytes(b"\n".join([*header, rows[4]]) + b"\n")
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "zeek", str(bad), str(good), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    files = {Path(f["path"]).name: f for f in json.loads(proc.stdout)["files"]}
    assert files["good.log"]["flows"] > 0 and files["bad.log"]["flows"] == 0
    rejects = Lake(lake).read("rejects").to_pylist()
    assert [r["line"] for r in rejects] == [len(header) + 1, len(header) + 2, len(header) + 3]
    assert {r["reason"] for r in rejects} == {"unsupported #separator 'ÿ'"}


def test_blank_and_junk_lines_are_sifted_in_numpy_not_one_python_call_each(monkeypatch):
    """Session-27 review: a block of only blank lines made pyarrow raise "Empty CSV file" and the fallback walked
    every line in Python (a 261 KB .gz of 256 MiB of newlines: 20 s of CPU), and each junk line was a Python
    callback of pyarrow's reader and a tuple (63 M junk lines in a 2.6 MB .gz: over 10 CPU-minutes). Both are
    now found in numpy: pyarrow sees only lines of the header's width, the rejects are built in one go."""
    from tracepipe.ingest import zeek

    calls = {"line_rejects": 0, "invalid": 0}
    real_read_block = zeek.read_block

    def read_block(*args, **kwargs):
        table, lines, invalid = real_read_block(*args, **kwargs)
        calls["invalid"] += len(invalid)
        return table, lines, invalid

    monkeypatch.setattr(zeek, "read_block", read_block)
    monkeypatch.setattr(
        zeek,
        "line_rejects",
        lambda *a: calls.__setitem__("line_rejects", 1) or pytest.fail("per-line rejects"),
    )
    header, rows = _sample()
    junk = b"-\t" * 8
    body = [rows[0], *[b""] * 100_000, *[junk] * 50_000, b"#types\tjunk", rows[1]]
    data = b"\n".join([*header, *body]) + b"\n"
    flows, rejects, _ = parse_conn_log(gzip.decompress(gzip.compress(data)), "x", block_size=1 << 16)
    plain, _, _ = parse_conn_log(b"\n".join([*header, rows[0], rows[1]]) + b"\n", "x")
    assert flows.num_rows == plain.num_rows > 0
    first_junk = len(header) + 2 + 100_000
    assert rejects.column("line").to_pylist() == list(range(first_junk, first_junk + 50_000))
    assert set(rejects.column("reason").to_pylist()) == {"expected 21 fields"}
    assert rejects.column("detail")[0].as_py() == junk.decode()
    assert calls == {"line_rejects": 0, "invalid": 0}


def test_a_header_before_every_line_is_one_parse_per_layout_not_one_per_line(monkeypatch):
    """Session-27: a layout header line before every data line made one pyarrow parse and one _connections per
    line (~10 ms each: 20,000 such pairs took 200 s of CPU). The segments of a block read under the same layout
    are parsed together; the line numbers stay the file's."""
    from tracepipe.ingest import zeek

    parses = []
    real_read_block = zeek.read_block
    monkeypatch.setattr(zeek, "read_block", lambda *a, **k: parses.append(1) or real_read_block(*a, **k))
    header, rows = _sample()
    body = []
    for i in range(2_000):
        body += [b"#path\tconn", rows[i % 5]] + ([b"#path\tdns", rows[0], b"junk"] if i % 100 == 0 else [])
    flows, rejects, _ = parse_conn_log(b"\n".join([*header, *body]) + b"\n", "x")
    assert len(parses) == 1
    plain, _, _ = parse_conn_log(b"\n".join([*header, *[rows[i % 5] for i in range(2_000)]]) + b"\n", "x")
    assert got_rows(flows) == got_rows(plain)
    dns = [len(header) + 1 + i for i, line in enumerate(body) if line == b"#path\tdns"]
    assert [(r["line"], r["reason"]) for r in rejects.to_pylist()] == [
        (n + k, reason)
        for n in dns
        for k, reason in ((1, "not a conn log (#path dns)"), (2, "not a conn log (#path dns)"))
    ]


_HEADER = (
    "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n#path\t{path}\n"
    "#fields\t{fields}\n#types\t{types}\n"
)
_CONN_FIELDS = (
    "ts uid id.orig_h id.orig_p id.resp_h id.resp_p proto service duration orig_bytes resp_bytes conn_state "
    "local_orig local_resp missed_bytes history orig_pkts orig_ip_bytes resp_pkts resp_ip_bytes ip_proto"
).split()


def _tsv(path: str, fields: list[str], rows: list[str]) -> str:
    return _HEADER.format(
        path=path, fields="\t".join(fields), types="\t".join(["x"] * len(fields))
    ) + "".join(row.replace(" ", "\t") + "\n" for row in rows)


def test_archive_variants_of_zeek_7_and_its_log_options(tmp_path):
    """Review of Zeek's variants (session 35): an archive's dns.log in JSON landed as flows (JSON has no #path)
    and one in TSV made every line a reject, exit 3 on every rerun; Zeek 7.1's `unknown_transport` rows (the
    protocol number in ip_proto) were rejects; JSON::TS_MILLIS times were "bad time"; Log::default_scope_sep
    "_" (id_orig_h) made every line a reject; a header-only conn.log (a quiet sensor) failed the run."""
    day = tmp_path / "logs" / "2024-03-12"
    day.mkdir(parents=True)
    conn = [
        "1710237600.5 C1 10.0.0.5 51234 93.184.216.34 443 tcp ssl 1.5 517 4096 SF T F 0 ShADadFf 10 1049 8 4516 6",
        "1710237610.0 C2 10.0.0.5 0 198.51.100.7 0 unknown_transport - 12.5 - - OTH T F 0 - 40 5600 38 5320 50",
    ]
    (day / "conn.10:00:00-11:00:00.log").write_text(_tsv("conn", _CONN_FIELDS, conn))
    dns_fields = "ts uid id.orig_h id.orig_p id.resp_h id.resp_p proto trans_id query".split()
    dns_row = "1710237601.0 C3 10.0.0.5 53000 8.8.8.8 53 udp 7 example.com"
    with gzip.open(day / "dns.10:00:00-11:00:00.log.gz", "wt") as handle:
        handle.write(_tsv("dns", dns_fields, [dns_row]))
    dns_json = {"ts": 1710237601.0, "uid": "C3", "id.orig_h": "10.0.0.5", "id.orig_p": 53000,
                "id.resp_h": "8.8.8.8", "id.resp_p": 53, "proto": "udp", "query": "example.com"}  # fmt: skip
    (day / "dns.json.log").write_text(json.dumps(dns_json) + "\n")
    millis = {"ts": 1591367999305, "uid": "C4", "id_orig_h": "192.168.4.76", "id_orig_p": 36844,
              "id_resp_h": "192.168.4.1", "id_resp_p": 53, "proto": "udp", "duration": 0.066,
              "conn_state": "SF", "orig_pkts": 2, "orig_ip_bytes": 118, "resp_pkts": 2,
              "resp_ip_bytes": 197}  # fmt: skip
    (day / "conn.json.log").write_text(json.dumps(millis) + "\n")
    scoped = [f.replace("id.", "id_") for f in _CONN_FIELDS]
    (day / "conn.scoped.log").write_text(_tsv("conn", scoped, conn[:1]))
    (day / "conn.quiet.log").write_text(_tsv("conn", _CONN_FIELDS, []))
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "zeek", str(tmp_path / "logs"), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = {
        Path(f["path"]).name: (f["status"], f["flows"], f["rejects"])
        for f in json.loads(proc.stdout)["files"]
    }
    assert files == {
        "conn.10:00:00-11:00:00.log": ("landed", 4, 0),
        "conn.json.log": ("landed", 2, 0),
        "conn.scoped.log": ("landed", 2, 0),
        "conn.quiet.log": ("empty", 0, 0),
    }
    flows = {(r["uid"], r["src_addr"]): r for r in lake_flows(lake).to_pylist()}
    assert flows[("C2", "10.0.0.5")]["proto"] == 50 and flows[("C1", "10.0.0.5")]["proto"] == 6
    assert str(flows[("C4", "192.168.4.76")]["ts_start"]).startswith("2020-06-05 14:39:59.305")
    assert ("C3", "10.0.0.5") not in flows
    # a dns log named on the command line is refused, saying why
    named = run_tracepipe(
        "ingest", "zeek", str(day / "dns.json.log"), "--lake", str(lake), "--format", "json"
    )
    (refused,) = json.loads(named.stdout)["files"]
    assert (
        named.returncode == 4 and refused["status"] == "rejected" and "not a conn log" in refused["message"]
    )


def test_the_archive_leaves_zeeks_live_folder_out(tmp_path):
    """Review of Zeek's variants (session 35): `ingest zeek /opt/zeek/logs/` (README's cron line) read
    current/conn.log, still growing: a new source at each run, its earlier lines landed again every time."""
    logs = tmp_path / "logs"
    (logs / "2024-03-12").mkdir(parents=True)
    (logs / "current").mkdir()
    row = "1710237600.5 C1 10.0.0.5 51234 93.184.216.34 443 tcp ssl 1.5 517 4096 SF T F 0 ShADadFf 10 1049 8 4516 6"
    (logs / "2024-03-12" / "conn.10:00:00-11:00:00.log").write_text(_tsv("conn", _CONN_FIELDS, [row]))
    live = logs / "current" / "conn.log"
    live.write_text(_tsv("conn", _CONN_FIELDS, [row.replace("C1", "C9")]))
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "zeek", str(logs), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [Path(f["path"]).name for f in json.loads(proc.stdout)["files"]] == ["conn.10:00:00-11:00:00.log"]
    named = run_tracepipe("ingest", "zeek", str(logs / "current"), "--lake", str(lake), "--format", "json")
    assert named.returncode == 0 and json.loads(named.stdout)["totals"]["flows"] == 2  # (given by name: read)


def test_history_letters_give_the_flags_zeek_says():
    """Zeek's history (base/protocols/conn/main.zeek): s/S a SYN without ACK, i/I an inconsistent packet (FIN+RST),
    q/Q a multi-flag packet (SYN+FIN or SYN+RST). `s` read as SYN+ACK, `I` as SYN+RST, `Q` as nothing (review of
    Zeek's variants, session 35)."""
    from tracepipe.flowstate import ACK, FIN, RST, SYN

    rows = [
        f"1710237600.{i} C{i} 10.0.0.{i} 4000{i} 192.0.2.1 80 tcp - 1.0 0 0 OTH T F 0 {history} 1 40 1 40 6"
        for i, history in enumerate(["Ss", "I", "Q"], 1)
    ]
    flows, rejects, _ = parse_conn_log(_tsv("conn", _CONN_FIELDS, rows).encode(), "h.log")
    assert rejects.num_rows == 0
    flags = {(r["uid"], r["src_addr"] == "192.0.2.1"): r["tcp_flags"] for r in flows.to_pylist()}
    assert flags[("C1", False)] == SYN and flags[("C1", True)] == SYN
    assert flags[("C2", False)] == FIN | RST and flags[("C3", False)] == SYN
    assert not flags[("C1", True)] & ACK
