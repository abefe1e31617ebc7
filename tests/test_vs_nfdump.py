"""Identical to nfdump (issue 3, Must 2): the real softflowd exports a scapy-built traffic capture to 127.0.0.1
(or ::1), where tcpdump records the datagrams and a real nfcapd receives the same ones. `tracepipe ingest netflow`
on tcpdump's capture must land exactly the records nfdump prints: same start and end (ms), addresses, ports,
protocol, packets, bytes and TCP flags, as a multiset (same count, duplicates included). Where nfdump 1.7.1
itself misreads softflowd, the comparison undoes that one bug (errata E1, E2 in conftest.py), and a test below
pins each erratum so that it is dropped when nfdump is fixed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import (
    FLOW_KEY_AND_COUNTERS,
    ICMPV6,
    SOFTFLOWD_CASES,
    blank_icmpv6_ports,
    case_id,
    ingest_in_process,
    lake_flows,
    multiset_diff,
    nfdump_reference,
    run_tracepipe,
)
from support import probes


def ingest(capture, lake) -> pa.Table:
    """`tracepipe ingest netflow CAPTURE --lake LAKE`, the real CLI in a subprocess, then the lake's flows."""
    proc = run_tracepipe("ingest", "netflow", str(capture), "--lake", str(lake))
    assert proc.returncode == 0, f"tracepipe ingest exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return lake_flows(lake)


def ingest_fast(capture, lake) -> pa.Table:
    """Same, through the library function the CLI calls: for the tests beyond the main comparison."""
    return ingest_in_process([capture], lake)


@pytest.mark.parametrize("case", SOFTFLOWD_CASES, ids=case_id)
def test_harness_sees_every_export_datagram(case, softflowd_export):
    """The oracle itself: tcpdump caught every datagram softflowd sent, nfcapd decoded every record, and the
    traffic's protocols are all there (so a comparison below cannot pass on an empty or partial export)."""
    export = softflowd_export(*case)
    assert export.nfcapd.files, f"nfcapd wrote no file: {export.nfcapd.log_text}"
    assert probes.count_pcap_packets(export.export_pcap) == export.softflowd.datagrams
    assert export.expected.num_rows == export.softflowd.records, (
        f"softflowd exported {export.softflowd.records} records, nfdump printed {export.expected.num_rows}"
    )
    protocols = set(export.expected.column("proto").to_pylist())
    versions = set(export.expected.column("ip_version").to_pylist())
    version, traffic, _ = case
    if traffic == "ipv6" and version == 5:
        assert {1, 6, 17} <= protocols and versions == {4}
    elif traffic == "ipv6":
        assert export.softflowd.datagrams > 16, "too few datagrams to see softflowd re-send its templates"
        assert {1, 6, 17, ICMPV6} <= protocols and versions == {4, 6}
    else:
        assert {1, 6, 17} <= protocols and versions == {4}
    assert set(export.expected.column("exporter").to_pylist()) == {export.exporter}
    # a closed TCP session carries SYN|ACK|PSH|FIN (27): flags are really there, not all zero
    assert 27 in set(export.expected.column("tcp_flags").to_pylist())
    # no record without time (the lead-in flow keeps nfdump from printing 1970)
    assert pc.min(export.expected.column("ts_start")).as_py().year == 2024


@pytest.mark.parametrize("case", SOFTFLOWD_CASES, ids=case_id)
def test_lake_holds_exactly_what_nfdump_prints(case, softflowd_export, tmp_path):
    export = softflowd_export(*case)
    got = ingest(export.export_pcap, tmp_path / "lake")
    expected = nfdump_reference(export.expected, export.version)
    compared = blank_icmpv6_ports(got) if export.version == 9 else got
    diff = multiset_diff(expected, compared)
    assert not diff, f"{export.name}: lake differs from nfdump\n{diff}"
    # every row names its exporter and keeps its evidence (the capture it came from)
    assert set(got.column("exporter").to_pylist()) == {export.exporter}
    sources = set(got.column("source").to_pylist())
    assert len(sources) == 1 and export.export_pcap.name in sources.pop()
    assert set(got.column("ip_version").to_pylist()) == set(export.expected.column("ip_version").to_pylist())


def test_erratum_e1_nfdump_swaps_ipfix_sysuptime_start_and_end(softflowd_export, tmp_path):
    """Pins E1: nfdump 1.7.1 prints softflowd's IPFIX records with start after end; swapped back they equal
    nfdump's own reading of the v9 export of the same traffic. The lake never has start after end."""
    ipfix, v9 = softflowd_export(10, "ipv4"), softflowd_export(9, "ipv4")
    raw = ipfix.expected
    assert pc.any(pc.greater(raw.column("ts_start"), raw.column("ts_end"))).as_py(), (
        "nfdump no longer swaps IPFIX flowStart/EndSysUpTime: remove erratum E1 from conftest.nfdump_reference"
    )

    # v9 carries whole export seconds only, so compare durations (exact in both) rather than absolute times
    def with_duration(table: pa.Table) -> pa.Table:
        return table.append_column(
            "duration_ms", pc.subtract(table.column("ts_end_ms"), table.column("ts_start_ms"))
        )

    columns = ("duration_ms", *FLOW_KEY_AND_COUNTERS)
    diff = multiset_diff(
        with_duration(nfdump_reference(v9.expected, 9)), with_duration(nfdump_reference(raw, 10)), columns
    )
    assert not diff, (
        f"nfdump's IPFIX records, swapped back, differ from its v9 records of the same traffic:\n{diff}"
    )
    got = ingest_fast(ipfix.export_pcap, tmp_path / "lake")
    assert pc.all(pc.less_equal(got.column("ts_start"), got.column("ts_end"))).as_py()


def test_v9_icmpv6_type_code_as_nfdump_reads_it_from_ipfix(softflowd_export, tmp_path):
    """Pins E2 and checks what it hides: nfdump 1.7.1 prints every ICMPv6 v9 record with dst_port 0; the lake's
    ICMPv6 type*256+code from the v9 export equals nfdump's reading of the IPFIX export of the same traffic."""
    v9, ipfix = softflowd_export(9, "ipv6"), softflowd_export(10, "ipv6")

    def icmpv6(table: pa.Table) -> Counter:
        rows = table.filter(pc.equal(table.column("proto"), ICMPV6)).select(
            ["src_addr", "dst_addr", "dst_port"]
        )
        return Counter(zip(*rows.to_pydict().values(), strict=True))

    nfdump_v9 = icmpv6(v9.expected)
    assert nfdump_v9 and {port for _, _, port in nfdump_v9} == {0}, (
        "nfdump now reads v9 element 139: remove erratum E2 from conftest.nfdump_reference"
    )
    from_ipfix = icmpv6(ipfix.expected)
    # echo request 128.0, echo reply 129.0, destination unreachable 1.4 (see probes.default_flow_specs)
    assert {port for _, _, port in from_ipfix} <= {128 * 256, 129 * 256, 1 * 256 + 4}
    assert icmpv6(ingest_fast(v9.export_pcap, tmp_path / "lake")) == from_ipfix


@pytest.mark.parametrize("link_type", [None, "LINUX_SLL"], ids=["linux-cooked-v2", "linux-cooked-v1"])
def test_capture_on_any_interface_linux_cooked(link_type, traffic_pcaps, tmp_path):
    """A collector host that ran `tcpdump -i any` records Linux cooked frames, not Ethernet: same records."""
    port = probes.free_udp_port()
    with probes.nfcapd_receiving(port, tmp_path / "nfcapd") as nfcapd:
        with probes.capture_udp(
            port, tmp_path / "export-any.pcap", iface="any", link_type=link_type
        ) as capture:
            result = probes.softflowd_export(traffic_pcaps["ipv4"], 5, (probes.LOOPBACK_V4, port))
            capture.wait_for_packets(result.datagrams)
    expected = nfdump_reference(probes.nfdump_records(nfcapd.out_dir), 5)
    assert expected.num_rows == result.records
    diff = multiset_diff(expected, ingest_fast(capture.path, tmp_path / "lake"))
    assert not diff, f"tcpdump -i any ({link_type or 'LINUX_SLL2'}): lake differs from nfdump\n{diff}"


def test_all_versions_in_one_capture(traffic_pcaps, tmp_path):
    """A collector host receiving v5, v9 and IPFIX from one exporter address: one capture, one ingest, and still
    exactly nfdump's records (templates and sequence numbers kept apart per version and exporter). One nfcapd
    per version, so that nfdump's records of each version get that version's errata."""
    runs = [(5, "ipv4"), (9, "ipv6"), (10, "ipv6")]
    ports = [probes.free_udp_port() for _ in runs]
    bpf = " or ".join(f"udp port {port}" for port in ports)
    expected, sent = [], 0
    with probes.capture_udp(ports[0], tmp_path / "mixed.pcap", bpf=bpf) as capture:
        for (version, traffic), port in zip(runs, ports, strict=True):
            with probes.nfcapd_receiving(port, tmp_path / f"nfcapd-{version}") as nfcapd:
                sent += probes.softflowd_export(
                    traffic_pcaps[traffic], version, (probes.LOOPBACK_V4, port)
                ).datagrams
            expected.append(
                blank_icmpv6_ports(nfdump_reference(probes.nfdump_records(nfcapd.out_dir), version))
            )
        capture.wait_for_packets(sent)
    got = ingest_fast(capture.path, tmp_path / "lake")
    diff = multiset_diff(pa.concat_tables(expected, promote_options="permissive"), blank_icmpv6_ports(got))
    assert not diff, f"v5 + v9 + IPFIX in one capture: lake differs from nfdump\n{diff}"


def test_softflowd_v1_datagrams_nfdump_drops_still_land(softflowd_export, tmp_path):
    """softflowd packs 30 records into a v1 datagram (the format says at most 24) and nfdump 1.7.1 drops those
    datagrams whole. tracepipe reads them: the lake equals the v5 export of the same traffic, record for record
    (v1 and v5 carry the same fields and the same header clock)."""
    v1, v5 = softflowd_export(1, "ipv4"), softflowd_export(5, "ipv4")
    assert v1.expected.num_rows < v1.softflowd.records, (
        "nfdump now reads 30-record v1 datagrams: compare with it"
    )
    got_v1 = ingest_fast(v1.export_pcap, tmp_path / "lake-v1")
    assert got_v1.num_rows == v1.softflowd.records
    diff = multiset_diff(ingest_fast(v5.export_pcap, tmp_path / "lake-v5"), got_v1)
    assert not diff, f"softflowd v1 export differs from its v5 export of the same traffic:\n{diff}"


def test_flow_at_exporter_boot_keeps_its_time(tmp_path):
    """softflowd -a boots its clock at the first packet, so a one-packet flow there has end uptime 0, which
    nfdump 1.7.1 takes for "no time" (it prints 1970-01-01). The lake keeps the packet's time: IPFIX carries
    the boot time in ms (systemInitTimeMilliseconds), so the flow starts and ends exactly at t0."""
    t0 = probes.DEFAULT_T0
    flows = [
        probes.FlowSpec(
            "icmp", "10.9.0.1", "192.0.2.99", start=0.0, packets=1, reply=False, icmp_type=3, icmp_code=1
        ),
        probes.FlowSpec("udp", "10.9.0.1", "192.0.2.53", 41000, 53, start=2.5, packets=2),
    ]
    traffic = probes.build_traffic_pcap(tmp_path / "boot.pcap", flows, t0=t0)
    port = probes.free_udp_port()
    with probes.nfcapd_receiving(port, tmp_path / "nfcapd") as nfcapd:
        with probes.capture_udp(port, tmp_path / "boot-export.pcap") as capture:
            result = probes.softflowd_export(traffic, 10, (probes.LOOPBACK_V4, port))
            capture.wait_for_packets(result.datagrams)
    printed = probes.nfdump_records(nfcapd.out_dir)
    at_boot = printed.filter(pc.equal(printed.column("proto"), 1))
    assert at_boot.column("ts_start")[0].as_py().year == 1970, "nfdump now times flows at boot: compare them"
    got = ingest_fast(capture.path, tmp_path / "lake")
    icmp = got.filter(pc.equal(got.column("proto"), 1))
    assert icmp.column("ts_start_ms").to_pylist() == [int(t0 * 1000)]
    assert icmp.column("ts_end_ms").to_pylist() == [int(t0 * 1000)]
    assert icmp.column("dst_port").to_pylist() == [3 * 256 + 1]
    # the other flows as nfdump prints them (E1 undone)
    rest = nfdump_reference(printed.filter(pc.not_equal(printed.column("proto"), 1)), 10)
    diff = multiset_diff(rest, got.filter(pc.not_equal(got.column("proto"), 1)))
    assert not diff, diff


@pytest.mark.parametrize(
    ("layout", "case"),
    [("pcapng", (9, "ipv6", "ipv4")), ("raw-ip", (10, "ipv6", "ipv6")), ("raw-ip", (5, "ipv4", "ipv4"))],
    ids=["pcapng-v9", "raw-ip-ipfix-over-ipv6", "raw-ip-v5"],
)
def test_other_capture_layouts(layout, case, softflowd_export, tmp_path):
    """The same export datagrams as pcapng (what Wireshark/dumpcap write) or with raw IP frames (LINKTYPE_RAW,
    as captured on a tunnel interface): the same records as nfdump."""
    from scapy.layers.l2 import Ether
    from scapy.utils import PcapNgWriter, rdpcap, wrpcap

    export = softflowd_export(*case)
    frames = rdpcap(str(export.export_pcap))
    path = tmp_path / f"export-{layout}.{'pcapng' if layout == 'pcapng' else 'pcap'}"
    if layout == "pcapng":
        writer = PcapNgWriter(str(path))
        writer.write(list(frames))
        writer.close()
    else:
        packets = []
        for frame in frames:
            packet = frame[Ether].payload
            packet.time = frame.time
            packets.append(packet)
        wrpcap(str(path), packets, linktype=101)  # LINKTYPE_RAW: the frame starts with the IP header
    assert path.read_bytes()[:4] == (
        b"\x0a\x0d\x0d\x0a" if layout == "pcapng" else export.export_pcap.read_bytes()[:4]
    )
    got = ingest_fast(path, tmp_path / "lake")
    expected = nfdump_reference(export.expected, export.version)
    diff = multiset_diff(expected, blank_icmpv6_ports(got) if export.version == 9 else got)
    assert not diff, f"{layout} of {export.name}: lake differs from nfdump\n{diff}"


def test_traffic_builder_frames_are_scapys_bytes(tmp_path):
    """probes.build_traffic_pcap renders frames with struct for speed; every frame of the mixed workload is
    byte-identical to what scapy builds from the same description (lengths, checksums, ICMP/ICMPv6 layouts)."""
    from scapy.utils import rdpcap

    specs = probes.default_flow_specs(seed=12, ipv6=True, n=60)
    frames = [(spec, packet) for spec in specs for packet in probes.conversation_packets(spec)]
    assert {p.layer for _, p in frames} == {"tcp", "udp", "icmp"}
    mismatched = [
        (spec, p) for spec, p in frames if probes.render_frame(spec, p) != probes.render_frame_scapy(spec, p)
    ]
    assert not mismatched, f"{len(mismatched)} frames differ from scapy's, first: {mismatched[0]}"
    # and scapy reads the file back: same number of packets, timestamps in order
    path = probes.build_traffic_pcap(tmp_path / "t.pcap", specs)
    packets = rdpcap(str(path))
    assert len(packets) == len(frames)
    times = [float(p.time) for p in packets]
    assert times == sorted(times) and times[0] == probes.DEFAULT_T0


SAMPLES = sorted((Path(__file__).resolve().parent.parent / "sample_data").glob("**/*softflowd*.pcap"))


@pytest.mark.parametrize("capture", SAMPLES, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.name}")
def test_bundled_export_captures_decode_as_nfdump(capture, tmp_path):
    """Every committed export capture (the softflowd samples and the story's), replayed datagram by datagram
    to a real nfcapd: the lake holds what nfdump prints (with its errata undone)."""
    payloads = probes.export_payloads(capture)
    versions = {int.from_bytes(p[:2], "big") for p in payloads}
    assert len(versions) == 1, f"{capture} mixes NetFlow versions {versions}"
    version = versions.pop()
    port = probes.free_udp_port()
    with probes.nfcapd_receiving(port, tmp_path / "nfcapd") as nfcapd:
        probes.replay_udp(payloads, (probes.LOOPBACK_V4, port))
    expected = nfdump_reference(probes.nfdump_records(nfcapd.out_dir), version)
    assert expected.num_rows > 0
    got = ingest_fast(capture, tmp_path / "lake")
    diff = multiset_diff(expected, blank_icmpv6_ports(got) if version == 9 else got)
    assert not diff, f"{capture}: lake differs from nfdump\n{diff}"
