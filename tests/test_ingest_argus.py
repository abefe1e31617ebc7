"""`tracepipe ingest argus` (issue 14, item 3): the real argus (argus-server) reads a traffic capture, the real
`ra` (argus-client) writes the CSV a site or a data set (CTU-13 "binetflow") has; the lake must hold what ra
says of each record, per direction, as ra(1) defines the fields: `ra -s stime ltime proto saddr sport daddr
dport spkts dpkts sbytes dbytes` printed separately with numbers only (-nn) is the oracle."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import lake_flows, run_tracepipe
from support import probes

from tracepipe.ingest.argus import parse_argus, read_argus
from tracepipe.ingest.flows import sniff_kind
from tracepipe.lake import Lake
from tracepipe.tools import tool_path

# what the docstring of tracepipe/ingest/argus.py tells a user to run (CTU-13's binetflow columns + per direction)
FIELDS = "stime dur proto saddr sport dir daddr dport state stos dtos pkts bytes sbytes"
PER_DIRECTION = " spkts dpkts dbytes"


def ra(argus_file: Path, *args: str) -> str:
    return subprocess.run(
        [tool_path("ra"), "-r", str(argus_file), *args], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture(scope="module")
def argus_file(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("argus")
    pcap = probes.build_traffic_pcap(base / "traffic.pcap", seed=21, ipv6=True)
    out = base / "traffic.argus"
    subprocess.run([tool_path("argus"), "-r", str(pcap), "-w", str(out)], check=True, capture_output=True)
    return out


def oracle(argus_file: Path) -> Counter:
    """Per-direction rows from ra's own fields (numbers only): src->dst always, dst->src when dst sent."""
    text = ra(
        argus_file,
        "-u",
        "-nn",
        "-c",
        "|",
        "-s",
        "stime ltime proto saddr sport daddr dport spkts dpkts sbytes dbytes",
    )
    rows: Counter = Counter()
    for line in text.splitlines()[1:]:
        stime, ltime, proto, sa, sp, da, dp, spk, dpk, sb, db = line.split("|")
        if not proto.isdigit():  # argus management records (man)
            continue
        start, end = round(float(stime) * 1e6), round(float(ltime) * 1e6)
        proto_n = int(proto)

        def port(p: str) -> int:  # ra prints ICMP's type in hex (0x0008), ICMPv6's in decimal (128)
            return int(p, 16) if p.startswith("0x") else int(p)

        if proto_n in (1, 58):  # ICMP: type*256 (+ code, 0 unless an unreachable state says)
            fwd = (sa, da, 0, port(sp) * 256)
            back = (da, sa, 0, None)
        else:
            fwd = (sa, da, port(sp), port(dp))
            back = (da, sa, port(dp), port(sp))
        rows[(*fwd, proto_n, int(spk), int(sb), start, end)] += 1
        if int(dpk) or int(db):
            rows[(*back, proto_n, int(dpk), int(db), start, end)] += 1
    return rows


def rows(flows: pa.Table, packets: bool = True) -> Counter:
    d = flows.to_pydict()
    start = pc.cast(flows.column("ts_start"), pa.int64()).to_pylist()
    end = pc.cast(flows.column("ts_end"), pa.int64()).to_pylist()
    return Counter(
        zip(d["src_addr"], d["dst_addr"], d["src_port"], d["dst_port"], d["proto"],
            d["packets"] if packets else [None] * len(start), d["bytes"], start, end, strict=True)
    )  # fmt: skip


def test_lake_holds_what_ra_says_per_direction(argus_file, tmp_path):
    csv = tmp_path / "flows.csv"
    csv.write_text(ra(argus_file, "-u", "-n", "-c", ",", "-L0", "-Z", "b", "-s", FIELDS + PER_DIRECTION))
    assert sniff_kind(csv) == "argus"
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "argus", str(csv), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["totals"]["rejects"] == 0
    got = lake_flows(lake)
    expected = oracle(argus_file)
    assert sum(expected.values()) > 50 and {6, 17, 1, 58} <= {k[4] for k in expected}
    assert rows(got) == expected
    # ra -Z b states kept as argus wrote them, and mapped to flags: a TCP exchange with data has ACK both ways
    states = set(got.column("conn_state").to_pylist())
    assert any("_" in s for s in states if s)
    tcp = got.filter(pc.equal(got.column("proto"), 6))
    assert 0 not in set(tcp.column("tcp_flags").to_pylist())


def test_binetflow_form_splits_bytes_and_keeps_labels_apart(argus_file, tmp_path):
    """CTU-13's form: TotPkts, TotBytes, SrcBytes and a Label; per-direction packets are unknown (null unless
    the destination sent nothing). Labels land in flow_labels, never in flows."""
    text = ra(argus_file, "-u", "-n", "-c", ",", "-L0", "-Z", "b", "-s", FIELDS).splitlines()
    labelled = [text[0] + ",Label"] + [
        line + (",flow=From-Botnet-V42-TCP-Established" if ",tcp," in line else ",flow=Background")
        for line in text[1:]
    ]
    csv = tmp_path / "capture.binetflow"
    csv.write_text("\n".join(labelled) + "\n")
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "argus", str(csv), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = lake_flows(lake)
    assert "label" not in got.column_names and "Label" not in got.column_names
    expected = Counter()
    for key, n in oracle(argus_file).items():
        expected[(*key[:5], None, *key[6:])] += n
    assert rows(got, packets=False) == expected
    one_way = [k for k in oracle(argus_file) if k[5] is not None]
    assert pc.sum(pc.is_valid(got.column("packets"))).as_py() > 0 and one_way
    files = [str(p) for p in Lake(lake).files("flow_labels")]
    labels = duckdb.sql(
        f"SELECT label, count(*) FROM read_parquet({files}) GROUP BY ALL ORDER BY 1"
    ).fetchall()
    records = sum(1 for line in text[1:] if ",man," not in line)  # not the management records
    assert sum(n for _, n in labels) == records
    assert {label for label, _ in labels} == {"flow=Background", "flow=From-Botnet-V42-TCP-Established"}


BAD = b"""StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,sTos,dTos,TotPkts,TotBytes,SrcBytes,Label
2011/08/10 09:46:53.047277,3.870976,udp,93.45.239.29,1611,   <->,147.32.84.118,6881,CON,0,0,4,276,156,flow=Background
2011/08/10 09:46:53.048843,0.000883,tcp,62.240.166.118,1031,   ->,147.32.84.229,13363,S_RA,0,0,2,120,60,flow=Background
09:46:53.1,0.0,udp,1.2.3.4,1,   ->,5.6.7.8,2,INT,0,,1,60,60,flow=Background
2011/08/10 09:46:53.2,0.0,udp,1.2.3.999,1,   ->,5.6.7.8,2,INT,0,,1,60,60,flow=Background
2011/08/10 09:46:53.2,0.0,udp,1.2.3.4,99999,   ->,5.6.7.8,2,INT,0,,1,60,60,flow=Background
2011/08/10 09:46:53.2,0.0,udp,1.2.3.4,1,   ->,5.6.7.8
2011/08/10 09:46:53.2,0.0,arp,1.2.3.4,,   who,5.6.7.8,,INT,0,,1,60,60,flow=Background
2011/08/10 09:46:53.2,0.0,udp,1.2.3.4,1,   ->,5.6.7.8,2,INT,0,,1,60,600,flow=Background
2011/08/10 09:46:53.2,0.0,xyzp,1.2.3.4,1,   ->,5.6.7.8,2,INT,0,,1,60,60,flow=Background
"""


def test_bad_lines_are_rejects_with_line_and_reason():
    flows, rejects, labels = parse_argus(BAD, "bad.binetflow")
    assert [(r["line"], r["reason"]) for r in rejects.to_pylist()] == [
        (4, "bad start time (ra -u gives epoch seconds)"),
        (5, "bad source address"),
        (6, "bad source port"),
        (7, "expected 15 fields"),
        (9, "SrcBytes above TotBytes"),
        (10, "unknown protocol"),
    ]
    assert labels.num_rows == 2 and labels.column("line").to_pylist() == [2, 3]
    # the S_RA attempt: SYN answered by RST|ACK; the shared rule calls the originator's side failed
    tcp = flows.filter(pc.equal(flows.column("proto"), 6)).to_pylist()
    assert [(r["src_addr"], r["tcp_flags"], r["bytes"], r["packets"]) for r in tcp] == [
        ("62.240.166.118", 2, 60, None),
        ("147.32.84.229", 20, 60, None),
    ]
    assert flows.column("ts_start")[0].as_py().isoformat() == "2011-08-10T09:46:53.047277+00:00"


def test_ingest_zeek_names_the_command_for_an_argus_file(tmp_path):
    path = tmp_path / "x.binetflow"
    path.write_bytes(BAD)
    proc = run_tracepipe("ingest", "zeek", str(path), "--lake", str(tmp_path / "lake"))
    assert proc.returncode == 4 and "tracepipe ingest argus" in proc.stdout


def test_read_argus_streams_with_line_numbers_across_blocks(tmp_path):
    path = tmp_path / "big.binetflow"
    good = BAD.splitlines()[1]
    path.write_bytes(
        BAD.splitlines()[0] + b"\n" + b"\n".join([good] * 500 + [b"garbage"] + [good] * 10) + b"\n"
    )
    flows, rejects, labels = read_argus(path)
    assert labels.num_rows == 510 and flows.num_rows == 1020
    assert rejects.column("line").to_pylist() == [502]


CTU13 = Path(__file__).parent / "data" / "detection" / "ctu13-s6-capture20110816-1010-1030.binetflow.gz"


def test_real_ctu13_binetflow_lands_with_its_labels_apart(tmp_path):
    """The committed CTU-13 excerpt (scenario 6, the benchmark's data, PROVENANCE.md there) as a user lands it:
    every line but the two with argus' odd hex destination ports and the 23 ARP records (not IP flows) lands, and each landed record's Label is in
    flow_labels with its originator, so the infected host and the normal ones are told from the labels alone."""
    import gzip

    text = gzip.decompress(CTU13.read_bytes())
    path = tmp_path / "capture20110816.binetflow"
    path.write_bytes(text)
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "argus", str(path), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 3, proc.stdout + proc.stderr  # partial: two lines rejected, the rest landed
    summary = json.loads(proc.stdout)
    assert summary["totals"]["rejects"] == 2
    records = text.count(b"\n") - 1 - text.count(b",arp,")  # ARP is not an IP flow: skipped, not rejected
    files = [str(p) for p in Lake(lake).files("flow_labels")]
    per_host = dict(
        duckdb.sql(
            f"SELECT src_addr, count(*) FROM read_parquet({files}) WHERE label LIKE 'flow=From-Botnet%' "
            "OR label LIKE 'flow=From-Normal%' GROUP BY ALL"
        ).fetchall()
    )
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet({files})").fetchall() == [(records - 2,)]
    assert per_host == {
        "147.32.84.165": text.count(b",flow=From-Botnet"),
        **{h: n for h, n in per_host.items() if h != "147.32.84.165"},
    }
    assert set(per_host) == {
        "147.32.84.165",
        "147.32.84.134",
        "147.32.84.164",
        "147.32.84.170",
        "147.32.80.9",
        "147.32.87.36",
    }


@pytest.mark.parametrize("delimiter", [b"\xe9", b"\x00", b"\r", b"a"])
def test_a_header_with_an_unusable_delimiter_is_a_reject_and_the_next_file_lands(tmp_path, delimiter):
    """Session-24 hostile review: a Latin-1 byte, a NUL or a CR after StartTime stopped `ingest argus` with an
    internal error, and the files after it in the same command were never read."""
    columns = [
        "StartTime",
        "Dur",
        "Proto",
        "SrcAddr",
        "Sport",
        "Dir",
        "DstAddr",
        "Dport",
        "State",
        "TotPkts",
        "TotBytes",
    ]
    row = ["1700000000", "1.5", "tcp", "10.0.0.1", "1234", "->", "10.0.0.2", "80", "S_RA", "3", "300"]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(
        delimiter.join(c.encode() for c in columns) + b"\n" + delimiter.join(v.encode() for v in row) + b"\n"
    )
    good = tmp_path / "good.csv"
    good.write_text(",".join(columns) + "\n" + ",".join(row) + "\n")
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "argus", str(bad), str(good), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "internal error" not in proc.stderr
    files = {Path(f["path"]).name: f for f in json.loads(proc.stdout)["files"]}
    assert files["good.csv"]["flows"] == 1 and files["bad.csv"]["flows"] == 0
    rejects = Lake(lake).read("rejects").to_pylist()
    assert [r["reason"][:28] for r in rejects] == ["unsupported field delimiter "]


def test_a_direction_count_above_its_total_is_a_reject_not_a_negative_count():
    """DstPkts 9 of TotPkts 5 landed as packets=-4 (the source direction's share, total - dst), exit 0."""
    text = (
        "StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,TotPkts,TotBytes,DstPkts,DstBytes\n"
        "1700000000,1,tcp,10.0.0.1,1,->,10.0.0.2,2,FIN,5,500,9,100\n"
        "1700000000,1,tcp,10.0.0.1,1,->,10.0.0.2,2,FIN,5,500,2,900\n"
        "1700000000,1,tcp,10.0.0.1,1,->,10.0.0.2,2,FIN,5,500,2,100\n"
    )
    flows, rejects, _ = parse_argus(text.encode(), "x.csv")
    assert [(r["line"], r["reason"]) for r in rejects.to_pylist()] == [
        (2, "DstPkts above TotPkts"),
        (3, "DstBytes above TotBytes"),
    ]
    assert flows.num_rows >= 1 and min(flows.column("packets").to_pylist()) >= 0
    assert min(flows.column("bytes").to_pylist()) >= 0


BINETFLOW_HEADER = (
    "StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,TotPkts,TotBytes,SrcBytes,Label\n"
)


def _binetflow_row(second: int, src: str = "10.0.0.1", label: str = "benign", duration: str = "1.0") -> str:
    return f"2024/03/12 10:00:{second:02d}.000000,{duration},tcp,{src},{40000 + second},->,192.0.2.1,22,S_RA,2,120,60,{label}"


def test_a_huge_duration_is_a_reject_not_an_overflow(tmp_path):
    """Session-27 review: Dur=999999999999 put ts_end in year ~33,700 and the commit failed with `internal
    error: OverflowError('date value out of range')`, exit 4, nothing landed. A duration of 130 years or more
    (LATEST_SECONDS, Zeek's bound) is a reject naming it; the other lines land."""
    path = tmp_path / "a.csv"
    path.write_text(
        BINETFLOW_HEADER + _binetflow_row(0, duration="999999999999") + "\n" + _binetflow_row(1) + "\n"
    )
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "argus", str(path), "--lake", str(lake))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    rejects = Lake(lake).read("rejects").to_pylist()
    assert [(r["line"], r["reason"], r["detail"]) for r in rejects] == [(2, "bad duration", "999999999999")]
    flows = lake_flows(lake)
    assert flows.num_rows == 2  # line 3, both directions
    assert set(flows.column("ts_end_ms").to_pylist()) == {1710237602000}


def test_a_lone_cr_is_one_reject_not_a_forged_flow():
    """Session-27 review: pyarrow ended a row at a lone CR while line numbers count LF: one line became two
    records (a flow from 10.6.6.6 the file holds nowhere as a line) and every later line number was one off."""
    lines = [
        _binetflow_row(1),
        _binetflow_row(2, label="x\r" + _binetflow_row(3, src="10.6.6.6", label="forged")),
        _binetflow_row(4),
        "garbage line",
        _binetflow_row(5),
    ]
    flows, rejects, labels = parse_argus((BINETFLOW_HEADER + "\n".join(lines) + "\n").encode(), "a.csv")
    assert [(r["line"], r["reason"]) for r in rejects.to_pylist()] == [
        (3, "lone CR (0x0d) inside the line"),
        (5, "expected 13 fields"),
    ]
    assert "10.6.6.6" not in flows.column("src_addr").to_pylist()
    assert labels.column("line").to_pylist() == [2, 4, 6]
    assert set(labels.column("label").to_pylist()) == {"benign"}


def _by_direction(flows: pa.Table) -> dict[tuple, tuple]:
    """(src, dst, proto, dst_port) -> (packets, bytes) of each row."""
    return {
        (r["src_addr"], r["dst_addr"], r["proto"], r["dst_port"]): (r["packets"], r["bytes"])
        for r in flows.to_pylist()
    }


def test_variants_of_ra_output_as_ra_prints_them():
    """Review of argus' variants (session 35), on lines real `ra` 3.0.8 printed for loopback traffic: ICMP's Sport
    is code << 8 | type (0x010b: time exceeded, code 1; 0x0303: port unreachable) and ICMPv6's code is in Dport
    (`ra -n`: 1 and 4), where 0x0303 gave dst_port 197379; two outputs of other column orders `cat`-ed together
    were read with the first header (each direction's bytes swapped); ra's default columns (TotBytes, no
    SrcBytes) put both directions' bytes on the initiator; an IPX record was a reject."""
    head = "StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,TotPkts,TotBytes,SrcBytes,SrcPkts,DstPkts,DstBytes"
    text = "\n".join(
        [
            head,
            "1796406620.279116,0,icmp,127.0.0.1,0x0303,   ->,127.0.0.2,0x1f4e,URP,1,170,170,1,0,0",
            "1796406639.062827,0,icmp,127.0.0.1,0x010b,   ->,127.0.0.3,0x0000,TXD,1,50,50,1,0,0",
            "1796406620.279147,0,ipv6-icmp,::1,1,   ->,::2,4,URP,1,160,160,1,0,0",
            "1796406620.3,0,ipx/sp,0,0,   ->,0,0,INT,1,60,60,1,0,0",
            "StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,TotPkts,TotBytes,DstBytes,SrcBytes",
            "1796406621.0,1.0,tcp,127.0.0.1,45138,   ->,127.0.0.9,18080,FIN,12,2731,2208,523",
        ]
    )
    flows, rejects, _ = parse_argus((text + "\n").encode(), "cat.csv")
    assert rejects.num_rows == 0, rejects.to_pylist()
    got = _by_direction(flows)
    assert got[("127.0.0.1", "127.0.0.2", 1, 3 * 256 + 3)] == (1, 170)
    assert got[("127.0.0.1", "127.0.0.3", 1, 11 * 256 + 1)] == (1, 50)
    assert got[("::1", "::2", 58, 1 * 256 + 4)] == (1, 160)
    assert got[("127.0.0.1", "127.0.0.9", 6, 18080)][1] == 523
    assert got[("127.0.0.9", "127.0.0.1", 6, 45138)][1] == 2208
    assert len(got) == 5  # (the IPX record is not an IP flow: skipped)
    default = "StartTime,Flgs,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,TotPkts,TotBytes,State\n"
    default += "1796406621.0, e ,tcp,127.0.0.1,45138,   ->,127.0.0.9,18080,12,2731,FIN\n"
    flows, rejects, _ = parse_argus(default.encode(), "default.csv")
    assert rejects.num_rows == 0 and flows.num_rows == 1
    assert flows.column("bytes").to_pylist() == [None]  # (each direction's bytes unknown: not 2731 one way)


def test_headers_between_every_line_are_read_in_one_parse_per_header(monkeypatch):
    """A later header sets the columns of the lines after it (above); a file alternating two headers line by line
    (hostile, or many small ra outputs `cat`-ed) is read in one parse per distinct header and block, not one per
    line (Zeek's reader once took ~10 ms a line so), and every line keeps its number."""
    from tracepipe.ingest import argus

    parses = []
    real = argus.read_block
    monkeypatch.setattr(argus, "read_block", lambda *a, **k: parses.append(1) or real(*a, **k))
    a = "StartTime,Proto,SrcAddr,Sport,DstAddr,Dport,TotPkts,TotBytes,SrcBytes"
    b = "StartTime,Proto,DstAddr,Dport,SrcAddr,Sport,TotPkts,TotBytes,SrcBytes"
    lines = [a]
    for i in range(500):
        lines += [f"1796406621.{i},udp,10.0.0.1,5000,10.0.0.2,53,1,80,80", b]
        lines += [f"1796406621.{i},udp,10.0.0.2,53,10.0.0.1,5000,1,80,80", a]
    lines[-2] = "1796406621.9,udp,not-an-address,53,10.0.0.1,5000,1,80,80"  # (under header b)
    flows, rejects, _ = parse_argus(("\n".join(lines) + "\n").encode(), "alt.csv")
    assert len(parses) == 2
    assert rejects.to_pylist() == [
        {
            "source": "alt.csv",
            "line": len(lines) - 1,
            "reason": "bad destination address",
            "detail": "not-an-address",
        }
    ]
    assert flows.num_rows == 999 and set(flows.column("src_addr").to_pylist()) == {"10.0.0.1"}
