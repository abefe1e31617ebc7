"""Identical to nfdump (issue 3, Must 2): the real softflowd exports a scapy-built traffic capture to 127.0.0.1
(or ::1), where tcpdump records the datagrams and a real nfcapd receives the same ones. `tracepipe ingest netflow`
on tcpdump's capture must land exactly the records nfdump prints: same start and end (ms), addresses, ports,
protocol, packets, bytes and TCP flags, as a multiset (same count, duplicates included).
"""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
from conftest import (
    SOFTFLOWD_CASES,
    case_id,
    lake_flows,
    multiset_diff,
    run_tracepipe,
    with_ms_columns,
)

from tracepipe import probes


@pytest.mark.parametrize("case", SOFTFLOWD_CASES, ids=case_id)
def test_harness_sees_every_export_datagram(case, softflowd_export):
    """The oracle itself: tcpdump caught every datagram softflowd sent, nfcapd decoded every record, and the
    traffic's protocols are all there (so a comparison below cannot pass on an empty or partial export)."""
    export = softflowd_export(*case)
    assert export.nfcapd.files, f"nfcapd wrote no file: {export.nfcapd.log_text}"
    assert probes.count_pcap_packets(export.export_pcap) == export.softflowd.datagrams
    assert export.expected.num_rows == export.softflowd.records, (
        f"softflowd exported {export.softflowd.records} records, nfdump printed {export.expected.num_rows}")
    protocols = set(export.expected.column("proto").to_pylist())
    versions = set(export.expected.column("ip_version").to_pylist())
    _, traffic, _ = case
    if traffic == "ipv6":
        assert {1, 6, 17, 58} <= protocols and versions == {4, 6}
    else:
        assert {1, 6, 17} <= protocols and versions == {4}
    assert set(export.expected.column("exporter").to_pylist()) == {export.exporter}
    # a closed TCP session carries SYN|ACK|PSH|FIN (27): flags are really there, not all zero
    assert 27 in set(export.expected.column("tcp_flags").to_pylist())


@pytest.mark.parametrize("case", SOFTFLOWD_CASES, ids=case_id)
def test_lake_holds_exactly_what_nfdump_prints(case, softflowd_export, tmp_path):
    export = softflowd_export(*case)
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "netflow", str(export.export_pcap), "--lake", str(lake))
    assert proc.returncode == 0, f"tracepipe ingest exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    got = lake_flows(lake)
    expected = with_ms_columns(export.expected)
    diff = multiset_diff(expected, got)
    assert not diff, f"{export.name}: lake differs from nfdump\n{diff}"
    # every row names its exporter and keeps its evidence (the capture it came from)
    assert set(got.column("exporter").to_pylist()) == {export.exporter}
    sources = set(got.column("source").to_pylist())
    assert len(sources) == 1 and export.export_pcap.name in sources.pop()
    assert set(got.column("ip_version").to_pylist()) == set(export.expected.column("ip_version").to_pylist())


@pytest.mark.parametrize("link_type", [None, "LINUX_SLL"], ids=["linux-cooked-v2", "linux-cooked-v1"])
def test_capture_on_any_interface_linux_cooked(link_type, traffic_pcaps, tmp_path):
    """A collector host that ran `tcpdump -i any` records Linux cooked frames, not Ethernet: same records."""
    port = probes.free_udp_port()
    with probes.nfcapd_receiving(port, tmp_path / "nfcapd") as nfcapd:
        with probes.capture_udp(port, tmp_path / "export-any.pcap", iface="any", link_type=link_type) as capture:
            result = probes.softflowd_export(traffic_pcaps["ipv6"], 9, (probes.LOOPBACK_V4, port))
            capture.wait_for_packets(result.datagrams)
    expected = with_ms_columns(probes.nfdump_records(nfcapd.out_dir))
    assert expected.num_rows == result.records
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "netflow", str(capture.path), "--lake", str(lake))
    assert proc.returncode == 0, f"tracepipe ingest exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    diff = multiset_diff(expected, lake_flows(lake))
    assert not diff, f"tcpdump -i any ({link_type or 'LINUX_SLL2'}): lake differs from nfdump\n{diff}"


def test_all_versions_in_one_capture(traffic_pcaps, tmp_path):
    """One collector receiving v5, v9 and IPFIX from three exporter processes on one port: one capture, one
    ingest, and still exactly nfdump's records (templates and sequence numbers kept apart per exporter)."""
    port = probes.free_udp_port()
    with probes.nfcapd_receiving(port, tmp_path / "nfcapd") as nfcapd:
        with probes.capture_udp(port, tmp_path / "mixed.pcap") as capture:
            sent = 0
            for version, traffic in ((5, "ipv4"), (9, "ipv6"), (10, "ipv6")):
                sent += probes.softflowd_export(traffic_pcaps[traffic], version, (probes.LOOPBACK_V4, port)).datagrams
            capture.wait_for_packets(sent)
    expected = with_ms_columns(probes.nfdump_records(nfcapd.out_dir))
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "netflow", str(capture.path), "--lake", str(lake))
    assert proc.returncode == 0, f"tracepipe ingest exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    got = lake_flows(lake)
    diff = multiset_diff(expected, got)
    assert not diff, f"v5 + v9 + IPFIX in one capture: lake differs from nfdump\n{diff}"
    assert pc.count_distinct(got.column("ts_start")).as_py() > 10
