"""Router exports decoded as the peers decode them (issue 16): real NetFlow v5 / v9 / IPFIX captures of Juniper,
Nokia and other (unnamed) routers and of ipfixprobe (akvorado's test data, see tests/data/routers/PROVENANCE.md).

Two peers give the expected decode:
- the installed nfdump: each capture's datagrams are replayed over UDP on 127.0.0.1 to a real nfcapd and
  `nfdump` prints what it made of them. Where nfdump reads a record wrong, the comparison undoes that one
  difference and a test pins it (errata R1-R7 below), so that it fails once nfdump is fixed;
- akvorado's own published expectations (its outlet/flow/decoder/netflow/root_test.go), for the records nfdump
  cannot decode at all: packet samples that carry only `dataLinkFrameSection` (IE 315), where the 5-tuple, and
  for tunnelled traffic (SRv6, IP-in-IPv6) the inner 5-tuple, must be read from the packet bytes.
Every value is pinned: a change in our decode fails a test.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import ingest_in_process, run_tracepipe
from support import probes

DATA = Path(__file__).parent / "data" / "routers" / "akvorado"
PCAP_HEADER = 24

# case -> (capture files in the order the exporter sent them, vendor / exporter, version, record types)
CASES: dict[str, tuple[list[str], str, int, str]] = {
    "v9-sampled": (
        ["options-template.pcap", "options-data.pcap", "template.pcap", "data.pcap"],
        "router, vendor not named (akvorado's first v9 capture)",
        9,
        "options template with sampler table, IPv4 5-tuple, next hop, AS",
    ),
    "v9-record-sampling": (
        ["samplingrate-template.pcap", "samplingrate-data.pcap"],
        "router, vendor not named",
        9,
        "samplingInterval inside each data record, VLAN",
    ),
    "v9-multi-sampling": (
        [
            "multiplesamplingrates-options-template.pcap",
            "multiplesamplingrates-options-data.pcap",
            "multiplesamplingrates-template.pcap",
            "multiplesamplingrates-data.pcap",
        ],
        "router, vendor not named (several samplers)",
        9,
        "IPv6, sampler ids, sysUpTime times",
    ),
    "ipfix-icmp": (
        ["icmp-template.pcap", "icmp-data.pcap"],
        "router, vendor not named",
        10,
        "ICMP / ICMPv6 type-code",
    ),
    "ipfix-mpls": (
        ["mpls.pcap"],
        "router, vendor not named (akvorado PR #960)",
        10,
        "MPLS label stack, VRF, IPv6 over MPLS",
    ),
    "ipfix-physical": (
        ["physicalinterfaces.pcap"],
        "Nokia 7250 IXR, SR-OS (akvorado issue #1621)",
        10,
        "IPv4 and IPv6 fields in one template, MAC, VRF, physical interfaces",
    ),
    "v9-nat": (["nat.pcap"], "NAT events, vendor not named", 9, "NAT events, no counters, no times"),
    "nfv5": (["nfv5.pcap"], "router, vendor not named", 5, "fixed v5 records"),
    "ipfix-biflow": (
        ["ipfixprobe-templates.pcap", "ipfixprobe-data.pcap"],
        "ipfixprobe (CESNET)",
        10,
        "RFC 5103 biflows (reverse PEN 29305), µs NTP times",
    ),
    "ipfix-datalink": (
        ["datalink-template.pcap", "datalink-data.pcap"],
        "Juniper, Junos inline monitoring (akvorado issue #818)",
        10,
        "dataLinkFrameSection (IE 315, variable length), flowDirection, no counters",
    ),
    "ipfix-srv6": (
        ["ipfix-srv6-template.pcap", "ipfix-srv6-data.pcap"],
        "Juniper (same exporter and template as juniper-cpid)",
        10,
        "IE 315 of an SRv6 packet: IPv6 + SRH carrying IPv4",
    ),
    "ipfix-juniper-cpid": (
        ["juniper-cpid-template.pcap", "juniper-cpid-data.pcap"],
        "Juniper, Junos inline monitoring",
        10,
        "enterprise elements (PEN 2636), IE 315 of IPv4-in-IPv6",
    ),
    "ipfix-evpn": (
        [
            "ethernet-over-mpls-with-control-word-template.pcap",
            "ethernet-over-mpls-with-control-word-data.pcap",
        ],
        "router, vendor not named (EVPN)",
        10,
        "IE 315 of Ethernet over MPLS with a pseudowire control word",
    ),
}
SECTION_CASES = ("ipfix-datalink", "ipfix-srv6", "ipfix-juniper-cpid", "ipfix-evpn")
KEY = ("src_addr", "dst_addr", "src_port", "dst_port", "proto")
COUNTERS = ("packets", "bytes")
TIMES = ("ts_start_ms", "ts_end_ms")


def combined_capture(case: str, out_dir: Path) -> Path:
    """The case's capture files as one pcap, in order (all are classic pcap, Ethernet): a collector's capture."""
    files = CASES[case][0]
    parts = [(DATA / f).read_bytes() for f in files]
    path = out_dir / f"{case}.pcap"
    path.write_bytes(parts[0][:PCAP_HEADER] + b"".join(p[PCAP_HEADER:] for p in parts))
    return path


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict[str, tuple[pa.Table, pa.Table]]:
    """case -> (our lake's flows, nfdump's records for the same datagrams via a real nfcapd)."""
    base = tmp_path_factory.mktemp("routers")
    out: dict[str, tuple[pa.Table, pa.Table]] = {}
    for case in CASES:
        capture = combined_capture(case, base)
        ours = ingest_in_process([capture], base / f"lake-{case}")
        port = probes.free_udp_port()
        with probes.nfcapd_receiving(port, base / f"nfcapd-{case}") as nfcapd:
            probes.replay_udp(probes.export_payloads(capture), (probes.LOOPBACK_V4, port))
        theirs = probes.nfdump_records(nfcapd.out_dir)
        out[case] = (ours, _with_ms(theirs))
    return out


def _with_ms(table: pa.Table) -> pa.Table:
    def ms(column: str) -> pa.Array:
        return pc.divide(pc.cast(pc.cast(table.column(column), pa.timestamp("us")), pa.int64()), 1000)

    return table.append_column("ts_start_ms", ms("ts_start")).append_column("ts_end_ms", ms("ts_end"))


def rows(table: pa.Table, columns: tuple[str, ...]) -> Counter:
    data = table.select(list(columns)).to_pydict()
    return Counter(zip(*(data[c] for c in columns), strict=True))


def scaled(table: pa.Table) -> pa.Table:
    """Volumes times the sampling interval (nfdump prints them scaled, the lake keeps them as exported)."""
    factor = pc.fill_null(pc.cast(table.column("sampling_interval"), pa.int64()), 1)
    for name in COUNTERS:
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pc.multiply(table.column(name), factor))
    return table


def test_a_folder_of_router_exports_lands_without_rejects(tmp_path):
    """As a new user runs it: every capture in one folder, one command, exit 0, every record in the lake."""
    folder = tmp_path / "exports"
    folder.mkdir()
    for case in CASES:
        combined_capture(case, folder)
    proc = run_tracepipe(
        "ingest",
        "netflow",
        *sorted(map(str, folder.glob("*.pcap"))),
        "--lake",
        str(tmp_path / "lake"),
        "--format",
        "json",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    text = json.dumps(summary)
    assert '"rejects": 0' in text and '"rejects": 1' not in text
    assert "no addresses" not in text


# ---- where nfdump and we agree: 5-tuple, volumes, times ------------------------------------------------------
# case -> (compared columns, counters scaled by the sampling interval as nfdump prints them)
PLAIN: dict[str, tuple[tuple[str, ...], bool]] = {
    "v9-sampled": ((*KEY, *COUNTERS, *TIMES), True),  # R1: nfdump scales v9 volumes
    "v9-record-sampling": ((*KEY, *COUNTERS, *TIMES), False),  # R7: interval in the data records
    "v9-multi-sampling": ((*KEY, *TIMES), False),  # R6: volumes
    "ipfix-mpls": ((*KEY, *COUNTERS, *TIMES), False),  # nfdump does not scale these IPFIX volumes
    "nfv5": ((*KEY, *COUNTERS, *TIMES), False),
    "ipfix-icmp": (("src_addr", "dst_addr", "src_port", "proto", *COUNTERS, *TIMES), False),  # R2: dst_port
    "ipfix-physical": (("src_port", "dst_port", "proto", *COUNTERS, *TIMES), False),  # R3: addresses
    "v9-nat": ((*KEY, *COUNTERS), False),  # R4: times
    "ipfix-biflow": ((*KEY, *COUNTERS), False),  # R4: times
}


@pytest.mark.parametrize("case", list(PLAIN))
def test_same_records_as_nfdump(case, decoded):
    ours, theirs = decoded[case]
    assert ours.num_rows == theirs.num_rows > 0
    columns, scale = PLAIN[case]
    assert rows(scaled(ours) if scale else ours, columns) == rows(theirs, columns), case
    assert pc.all(pc.less_equal(ours.column("ts_start"), ours.column("ts_end"))).as_py()
    assert ours.column("tunnel_src_addr").null_count == ours.num_rows  # no tunnel in these


def test_erratum_r1_nfdump_prints_volumes_scaled_by_sampling(decoded):
    """R1: nfdump multiplies packets and bytes by the sampling interval; the lake keeps them as exported and
    says by how much to scale (sampling_interval), so a query can tell sampled counts from real ones."""
    ours, theirs = decoded["v9-sampled"]
    assert set(ours.column("sampling_interval").to_pylist()) == {30000}
    assert sorted(ours.column("packets").to_pylist()) == [1, 1, 1, 1]
    assert sorted(theirs.column("packets").to_pylist()) == [30000] * 4


def test_erratum_r6_sampler_tables_per_sampler_id(decoded):
    """R6: the exporter's options data is a sampler table (sampler id -> interval) and each record names its
    sampler (v9 FLOW_SAMPLER_ID). akvorado TestDecodeMultipleSamplingRates: ffff::68 at 4000 (18 packets as
    exported), ffff::5a at 2000 (4 packets). nfdump scales ffff::5a by 2000 but prints ffff::68 unscaled."""
    ours, theirs = decoded["v9-multi-sampling"]

    def first(table: pa.Table, src: str) -> dict:
        return table.filter(pc.equal(table.column("src_addr"), src)).to_pylist()[0]

    assert [
        (first(ours, s)["sampling_interval"], first(ours, s)["packets"]) for s in ("ffff::68", "ffff::5a")
    ] == [
        (4000, 18),
        (2000, 4),
    ]
    assert [first(theirs, s)["packets"] for s in ("ffff::68", "ffff::5a")] == [18, 8000], "nfdump changed: R6"


def test_erratum_r7_sampling_interval_inside_data_records(decoded):
    """R7: this v9 exporter puts samplingInterval (34) into every data record, not into options data. akvorado
    TestDecodeSamplingRate: 2048 (first record 232.131.215.65, 1 packet, input 13); nfdump prints the volumes
    unscaled, as if unsampled."""
    ours, theirs = decoded["v9-record-sampling"]
    assert set(ours.column("sampling_interval").to_pylist()) == {2048}
    first = ours.filter(pc.equal(ours.column("src_addr"), "232.131.215.65")).to_pylist()
    assert [(r["packets"], r["input_if"]) for r in first] == [(1, 13)]
    assert sorted(theirs.column("packets").to_pylist()) == [1] * 6, "nfdump scales now: compare scaled (R7)"


def test_erratum_r2_nfdump_drops_ipfix_icmp_type_code(decoded):
    """R2: nfdump 1.7.1 prints dst_port 0 for these ICMP records; the lake has type*256+code, as akvorado
    decodes them (ICMPv6 echo request 128 and reply 129, ICMPv4 echo request 8 and reply 0)."""
    ours, theirs = decoded["ipfix-icmp"]
    assert set(theirs.column("dst_port").to_pylist()) == {0}, "nfdump fixed: drop erratum R2"
    got = sorted(zip(ours.column("proto").to_pylist(), ours.column("dst_port").to_pylist(), strict=True))
    assert got == [(1, 0), (1, 8 * 256), (58, 128 * 256), (58, 129 * 256)]


def test_erratum_r3_nfdump_prints_no_address_for_mixed_family_templates(decoded):
    """R3: the template carries IPv4 and IPv6 address fields; nfdump prints '::' for both ends, the lake the
    IPv4 addresses that are set, as akvorado's expectation for the first record says."""
    ours, theirs = decoded["ipfix-physical"]
    assert set(theirs.column("src_addr").to_pylist()) == {"::"}, "nfdump fixed: drop erratum R3"
    first = ours.filter(pc.equal(ours.column("src_port"), 55629)).to_pylist()
    assert [
        (r["src_addr"], r["dst_addr"], r["dst_port"], r["packets"], r["bytes"], r["tcp_flags"]) for r in first
    ] == [("147.53.240.75", "212.82.101.24", 993, 3, 4506, 16)]
    assert set(ours.column("ip_version").to_pylist()) == {4}


def test_erratum_r4_nfdump_prints_1970_where_the_record_has_no_time_it_reads(decoded):
    """R4: NAT events carry no flow time, ipfixprobe's are flowStart/EndMicroseconds (NTP format): nfdump prints
    1970-01-01 for both. The lake: the export time of the message (NAT), the NTP times (ipfixprobe, 2009)."""
    for case, first_day in (
        ("v9-nat", datetime(2025, 6, 4, tzinfo=UTC)),
        ("ipfix-biflow", datetime(2009, 10, 5, tzinfo=UTC)),
    ):
        ours, theirs = decoded[case]
        assert {t.year for t in theirs.column("ts_start").to_pylist()} == {1970}, (
            f"nfdump fixed: drop R4 ({case})"
        )
        assert {t.date() for t in ours.column("ts_start").to_pylist()} == {first_day.date()}


# ---- packet sections (IE 315): akvorado's published expectations; nfdump cannot decode them ----------------
def test_erratum_r5_nfdump_decodes_no_packet_section(decoded):
    """R5: nfdump 1.7.1 lands records made only of a dataLinkFrameSection with address 0.0.0.0, no ports and no
    volume; the same number of records as the lake (so no record is lost by either), none of the content."""
    for case in SECTION_CASES:
        ours, theirs = decoded[case]
        assert ours.num_rows == theirs.num_rows > 0
        assert set(theirs.column("src_addr").to_pylist()) == {"0.0.0.0"}, f"nfdump fixed: compare {case}"
        assert set(theirs.column("bytes").to_pylist()) == {0}


def _records(table: pa.Table) -> list[tuple]:
    columns = (
        *KEY,
        "packets",
        "bytes",
        "tcp_flags",
        "input_if",
        "tunnel_src_addr",
        "tunnel_dst_addr",
        "tunnel_proto",
    )
    data = table.select(list(columns)).to_pydict()
    return sorted(zip(*(data[c] for c in columns), strict=True), key=str)


def test_juniper_data_link_frame_gives_the_5_tuple(decoded):
    """akvorado TestDecodeDataLink (Juniper inline monitoring): UDP 51.51.51.51:55501 -> 52.52.52.52:11777, 96 bytes (L3 length), 1 packet."""
    ours, _ = decoded["ipfix-datalink"]
    assert _records(ours) == [
        ("51.51.51.51", "52.52.52.52", 55501, 11777, 17, 1, 96, 0, 582, None, None, None)
    ]


def test_srv6_flow_lands_the_inner_conversation_and_keeps_the_tunnel(decoded):
    """akvorado TestDecodeSRv6 (with SRv6 decapsulation): ICMP echo reply 8.8.8.8 -> 213.36.140.100, 64 bytes.
    The outer IPv6 + segment routing header stays in the tunnel columns: the tunnel endpoints, protocol 4."""
    ours, _ = decoded["ipfix-srv6"]
    assert _records(ours) == [
        ("8.8.8.8", "213.36.140.100", 0, 0, 1, 1, 64, 0, 0, "fc30:2200:1b::f", "fc30:2200:23:e009::", 4)
    ]


def test_juniper_ip_in_ipv6_lands_the_inner_conversation(decoded):
    """akvorado TestJuniperCPIDDrop decodes without decapsulation: outer fc30:2200:1b::f -> fc30:2200:23:e009::,
    protocol 4 (IPv4 in IPv6), 104 bytes, input interface 737. The lake has exactly that outer header in the tunnel
    columns, and as the flow the inner ICMP echo request 8.8.8.8 -> 213.36.140.101 (64 of the 104 bytes)."""
    ours, _ = decoded["ipfix-juniper-cpid"]
    assert _records(ours) == [
        (
            "8.8.8.8",
            "213.36.140.101",
            0,
            8 * 256,
            1,
            1,
            64,
            0,
            737,
            "fc30:2200:1b::f",
            "fc30:2200:23:e009::",
            4,
        )
    ]


def test_evpn_over_mpls_with_control_word(decoded):
    """akvorado TestDecodeEVPN: 10 records; record 4 is TCP 198.51.100.1:443 -> 198.51.100.2:55427, ACK, 1492
    bytes, input interface 1022, behind MPLS labels 300012/17, a control word and an inner Ethernet header."""
    ours, _ = decoded["ipfix-evpn"]
    records = _records(ours)
    assert len(records) == 10
    assert ("198.51.100.1", "198.51.100.2", 443, 55427, 6, 1, 1492, 16, 1022, None, None, None) in records
    assert all(r[0].startswith("198.51.100.") and r[4] in (6, 17) for r in records)


def test_mpls_ipv6_as_akvorado_decodes_it(decoded):
    """akvorado TestDecodeMPLS: two UDP 49153 -> 862 (TWAMP) records over MPLS, sampling 10."""
    ours, _ = decoded["ipfix-mpls"]
    got = sorted(
        (r["dst_addr"], r["packets"], r["bytes"], r["output_if"], r["sampling_interval"])
        for r in ours.to_pylist()
    )
    assert got == [("fd00::1:0:1:5:1", 1, 89, 16, 10), ("fd00::1:0:1:6:1", 10, 890, 17, 10)]
