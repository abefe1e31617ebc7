"""More vendors' exports decoded as nfdump decodes them (issue 16): Cisco IOS (1941/K9), Cisco ACI (NX-OS),
Cisco NBAR, nProbe, ipt_netflow, Mikrotik RouterOS, FortiGate, Palo Alto PAN-OS, VMware vDS, Nokia BRAS, OpenBSD
pflow, Ubiquiti EdgeRouter, H3C, Juniper MX80. The datagrams are the Logstash NetFlow codec's test data
(tests/data/routers/PROVENANCE.md, Apache-2.0).

Peer: the installed nfdump 1.7.1, each case's datagrams sent over UDP on 127.0.0.1 to a real nfcapd. Every record's
5-tuple, volumes, interfaces and times equal nfdump's, except where an erratum below says why not; the Logstash
codec's published decode (spec/codecs/netflow_spec.rb) is quoted where it shows a field nfdump does not print.

Errata (nfdump's output against the lake's, each pinned by a test):
- V1: an interface the template does not carry: nfdump prints 0, the lake null (0 is an ifindex some exporters use).
- V2 (as R4/N1 of the other router tests): records without a time nfdump reads - no flow times at all (Cisco 1941),
  IPFIX flowStart/EndSysUpTime without the exporter's boot time (Mikrotik), no end time (Nokia BRAS) - nfdump
  prints 1970-01-01; the lake keeps the message's export time (start and end), or end = start.
- V3 (as R2): ICMP type/code that Cisco NBAR puts in the destination port (no IE 32): nfdump prints 0, the lake
  type*256 + code as for every other exporter.
- V4 (as R1): NetFlow v5 with a sampling interval in the header (Juniper MX80, 1 in 1000): nfdump prints volumes
  multiplied by it, the lake as exported with sampling_interval 1000.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import decode_and_nfdump, decode_export
from support.probes import LAN_MAC
from test_router_vendors import KEY, ms

DATA = Path(__file__).parent / "data" / "routers" / "logstash"

# case -> (datagram files in the order the exporter sent them, vendor, version, record types)
CASES: dict[str, tuple[list[str], str, str, str]] = {
    "cisco-1941": (
        ["netflow9_test_cisco_1941K9.dat"],
        "Cisco 1941/K9, IOS 15.1",
        "v9",
        "template and data in one datagram, no flow times, MAC addresses, next hop",
    ),
    "cisco-aci": (
        ["netflow9_test_cisco_aci_tpl256-258.dat", "netflow9_test_cisco_aci_data256.dat"],
        "Cisco ACI (Nexus 9000, NX-OS)",
        "v9",
        "IPv4 / IPv6 / layer-2 templates, flowDirection, zero-filled datagram",
    ),
    "cisco-nbar": (
        [
            "netflow9_test_cisco_nbar_opttpl260.dat",
            "netflow9_test_cisco_nbar_tpl262.dat",
            "netflow9_test_cisco_nbar_data262.dat",
        ],
        "Cisco IOS XE, Flexible NetFlow with NBAR",
        "v9",
        "application options table, sampler id, ICMP in the destination port",
    ),
    "nprobe": (
        ["netflow9_test_nprobe_tpl.dat", "netflow9_test_nprobe_data.dat"],
        "ntop nProbe",
        "v9",
        "IPv4 5-tuple, sysUptime times",
    ),
    "ipt-netflow": (
        ["netflow9_test_iptnetflow_reduced_size_encoding_tpldata260.dat"],
        "ipt_netflow (Linux)",
        "v9",
        "reduced-size encoding (1-2 byte counters), template and data in one datagram",
    ),
    "mikrotik": (
        ["ipfix_test_mikrotik_tpl.dat", "ipfix_test_mikrotik_data258.dat", "ipfix_test_mikrotik_data259.dat"],
        "Mikrotik RouterOS 6.39.2",
        "IPFIX",
        "postNAT addresses (IE 225/226), IPv6, sysUpTime times without boot time",
    ),
    "mikrotik-v5": (["netflow5_test_microtik.dat"], "Mikrotik RouterOS", "v5", "fixed records"),
    "fortigate": (
        [
            "netflow9_test_fortigate_fortios_521_tpl.dat",
            "netflow9_test_fortigate_fortios_521_data256.dat",
            "netflow9_test_fortigate_fortios_521_data257.dat",
        ],
        "Fortinet FortiGate, FortiOS 5.2.1",
        "v9",
        "options template, IPv4 flows",
    ),
    "paloalto": (
        ["netflow9_test_paloalto_panos_tpl.dat", "netflow9_test_paloalto_panos_data.dat"],
        "Palo Alto Networks PAN-OS (app-id)",
        "v9",
        "firewallEvent (IE 233), enterprise fields (user, app id), 8-byte counters",
    ),
    "paloalto-81": (
        [
            "netflow9_test_paloalto_81_tpl256-263.dat",
            "netflow9_test_paloalto_81_data257_1flowset_in_large_zerofilled_packet.dat",
        ],
        "Palo Alto Networks PAN-OS 8.1",
        "v9",
        "8 templates (NAT 225-228 / 281-282), one flowset in a zero-filled datagram",
    ),
    "vmware-vds": (
        [
            "ipfix_test_vmware_vds_tpl.dat",
            "ipfix_test_vmware_vds_data264.dat",
            "ipfix_test_vmware_vds_data266.dat",
        ],
        "VMware vSphere distributed switch",
        "IPFIX",
        "IPv4 and IPv6, enterprise fields (PEN 6876), flowEndReason",
    ),
    "nokia-bras": (
        ["ipfix_test_nokia_bras_tpl.dat", "ipfix_test_nokia_bras_data256.dat"],
        "Nokia BRAS (SR OS)",
        "IPFIX",
        "NAT session events with enterprise fields (PEN 637, variable length), no end time",
    ),
    "openbsd-pflow": (
        ["ipfix_test_openbsd_pflow_tpl.dat", "ipfix_test_openbsd_pflow_data.dat"],
        "OpenBSD pflow",
        "IPFIX",
        "IPv4 / IPv6 templates, flowStart/EndMilliseconds",
    ),
    "ubnt-edgerouter": (
        [
            "netflow9_test_ubnt_edgerouter_tpl.dat",
            "netflow9_test_ubnt_edgerouter_data1024.dat",
            "netflow9_test_ubnt_edgerouter_data1025.dat",
        ],
        "Ubiquiti EdgeRouter",
        "v9",
        "MAC addresses, VLAN, MPLS label field 201",
    ),
    "h3c": (
        ["netflow9_test_h3c_tpl3281.dat", "netflow9_test_h3c_data3281.dat"],
        "H3C NetStream",
        "v9",
        "IPv4 5-tuple, flowStart/EndMilliseconds",
    ),
    "juniper-mx80-v5": (["netflow5_test_juniper_mx80.dat"], "Juniper MX80", "v5", "header sampling interval"),
    "cisco-asr1001x": (
        ["netflow9_cisco_asr1001x_tpl259.dat"],
        "Cisco ASR1001-X, IOS XE",
        "v9",
        "Flexible NetFlow template and data in one datagram",
    ),
    "fortigate-54": (
        [
            "netflow9_test_fortigate_fortios_542_appid_tpl258-269.dat",
            "netflow9_test_fortigate_fortios_542_appid_data258_262.dat",
        ],
        "Fortinet FortiGate, FortiOS 5.4",
        "v9",
        "12 templates, application id",
    ),
    "barracuda": (
        ["ipfix_test_barracuda_tpl.dat", "ipfix_test_barracuda_data256.dat"],
        "Barracuda firewall",
        "IPFIX",
        "enterprise fields, flowStartSysUpTime without boot time",
    ),
    "yaf": (
        [
            "ipfix_test_yaf_tpls_option_tpl.dat",
            "ipfix_test_yaf_tpl45841.dat",
            "ipfix_test_yaf_data45841.dat",
            "ipfix_test_yaf_data45873.dat",
            "ipfix_test_yaf_data53248.dat",
        ],
        "CERT YAF",
        "IPFIX",
        "options templates, flowStart/EndMilliseconds, applabel",
    ),
    "viptela": (
        ["ipfix_test_viptela_tpl257.dat", "ipfix_test_viptela_data257.dat"],
        "Cisco vIPtela (SD-WAN)",
        "IPFIX",
        "VPN id (enterprise), times without boot time",
    ),
    "ixia": (
        ["ipfix_test_ixia_tpldata256.dat", "ipfix_test_ixia_tpldata271.dat"],
        "Ixia (Keysight) NetStack",
        "IPFIX",
        "variable-length enterprise fields (HTTP host, URI)",
    ),
    "h3c-varstring": (
        [
            "netflow9_test_h3c_netstream_varstring_tpl3281.dat",
            "netflow9_test_h3c_netstream_varstring_data3281.dat",
        ],
        "H3C NetStream",
        "v9",
        "variable-length VRF name (IE 236, 65535) in v9",
    ),
    "streamcore": (
        ["netflow9_test_streamcore_tpl_data256.dat", "netflow9_test_streamcore_tpl_data260.dat"],
        "Streamcore",
        "v9",
        "template and data in one datagram",
    ),
}
NO_TIMES = {
    "cisco-1941": "both",
    "mikrotik": "both",
    "nokia-bras": "end",
    "barracuda": "both",
    "viptela": "both",
}  # V2
ICMP_IN_PORT = {"cisco-nbar"}  # V3
SAMPLED_V5 = {"juniper-mx80-v5": 1000}  # V4


def payloads(case: str) -> list[bytes]:
    return [(DATA / f).read_bytes() for f in CASES[case][0]]


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict[str, tuple[list[dict], list[dict]]]:
    """case -> (our rows, nfdump's rows for the same datagrams via a real nfcapd). No case has a reject."""
    return decode_and_nfdump(
        {case: payloads(case) for case in CASES}, tmp_path_factory.mktemp("vendors-more")
    )


def as_nfdump_prints(case: str, row: dict) -> tuple:
    """Our row with nfdump's errata applied, to compare with what nfdump prints."""
    values = {k: row[k] for k in KEY}
    values["input_if"] = values["input_if"] or 0  # V1
    values["output_if"] = values["output_if"] or 0
    if case in ICMP_IN_PORT and row["proto"] in (1, 58):  # V3
        values["dst_port"] = 0
    if case in SAMPLED_V5:  # V4
        values["packets"] *= SAMPLED_V5[case]
        values["bytes"] *= SAMPLED_V5[case]
    start, end = ms(row["ts_start"]), ms(row["ts_end"])
    if NO_TIMES.get(case) == "both":  # V2
        start = end = 0
    elif NO_TIMES.get(case) == "end":
        end = 0
    return (*values.values(), start, end)


@pytest.mark.parametrize("case", list(CASES))
def test_same_records_as_nfdump(case, decoded):
    ours, theirs = decoded[case]
    assert len(ours) == len(theirs) > 0
    assert sorted(as_nfdump_prints(case, r) for r in ours) == sorted(
        (*(r[k] for k in KEY), ms(r["ts_start"]), ms(r["ts_end"])) for r in theirs
    )


def test_erratum_v2_records_without_times_keep_the_export_time(decoded):
    """Cisco 1941 (no time fields): start = end = the message's export time (v9 header unix seconds). Mikrotik
    IPFIX (sysUpTime, no boot time): the record's end is taken as the export time and the start keeps its distance
    to it. Nokia BRAS (flowStartMilliseconds only): end = start. nfdump prints 1970-01-01 for all of them."""
    for case in ("cisco-1941", "mikrotik"):
        ours, theirs = decoded[case]
        exported = {struct.unpack_from(">I", p, 8 if p[1] == 9 else 4)[0] * 1000 for p in payloads(case)}
        assert {ms(r["ts_end"]) for r in ours} <= exported
        assert {ms(r["ts_start"]) for r in theirs} == {0}
    assert all(r["ts_end"] == r["ts_start"] for r in decoded["cisco-1941"][0])
    assert any(r["ts_end"] > r["ts_start"] for r in decoded["mikrotik"][0])
    ours, _ = decoded["nokia-bras"]
    assert [(ms(r["ts_start"]), ms(r["ts_end"])) for r in ours] == [(1513236225148, 1513236225148)]


def test_erratum_v3_nbar_icmp_type_code_from_the_destination_port(decoded):
    ours, theirs = decoded["cisco-nbar"]
    assert {r["dst_port"] for r in ours if r["proto"] == 1} == {2048}  # echo request, 8*256 + 0
    assert {r["dst_port"] for r in theirs if r["proto"] == 1} == {0}


def test_erratum_v4_v5_sampling_interval_is_kept_not_applied(decoded):
    ours, theirs = decoded["juniper-mx80-v5"]
    assert {r["sampling_interval"] for r in ours} == {1000}
    assert sum(r["bytes"] for r in ours) * 1000 == sum(r["bytes"] for r in theirs)


def test_mikrotik_nat_record_as_logstash_decodes_it(decoded):
    """Logstash's "IPFIX Mikrotik RouterOS 6.39.2" first record: UDP 10.10.8.197:123 -> 192.168.128.17:123, 2
    packets, 152 bytes, interfaces 13 -> 7, postNATSourceIPv4Address 192.168.230.216, postNATDestination
    192.168.128.17. The IPv6 records (template 259) carry no NAT fields: null."""
    ours, _ = decoded["mikrotik"]
    row = [r for r in ours if r["src_addr"] == "10.10.8.197" and r["src_port"] == 123 and r["bytes"] == 152]
    assert [
        (
            r["dst_addr"],
            r["dst_port"],
            r["proto"],
            r["packets"],
            r["input_if"],
            r["output_if"],
            r["nat_src_addr"],
            r["nat_dst_addr"],
        )
        for r in row
    ] == [("192.168.128.17", 123, 17, 2, 13, 7, "192.168.230.216", "192.168.128.17")]
    assert {r["nat_src_addr"] for r in ours if r["ip_version"] == 6} == {None}


def test_paloalto_81_flow_event_as_logstash_decodes_it(decoded):
    """Logstash's "Palo Alto 1 flowset in large zero filled packet" record: TCP 134.220.2.6:88 ->
    134.220.1.156:50234, 3 packets, 363 bytes, interfaces 500010024 -> 500010002, fw_event 2 (flow deleted),
    first switched 2018-06-06T13:20:03Z; the lake and nfdump 13:20:02 (erratum L1 of test_router_vendors.py: the same
    sysUptime arithmetic, Logstash rounds the export time). The zero fill after the flowset is padding, no reject."""
    ours, _ = decoded["paloalto-81"]
    assert [
        (
            r["src_addr"],
            r["dst_addr"],
            r["src_port"],
            r["dst_port"],
            r["packets"],
            r["bytes"],
            r["input_if"],
            r["output_if"],
            r["fw_event"],
            ms(r["ts_start"]) // 1000,
        )
        for r in ours
    ] == [("134.220.2.6", "134.220.1.156", 88, 50234, 3, 363, 500010024, 500010002, "DELETE", 1528291202)]


def test_zero_fill_is_padding_but_a_lying_length_is_still_rejected():
    """Regression: a datagram padded with zeros after its last set (PAN-OS 8.1, Cisco ACI) was a `bad flowset
    length` reject. Zeros to the end are padding; a zero length followed by anything else is still rejected."""
    import numpy as np

    from tracepipe.ingest.netflow import DecoderState, decode_datagrams

    tpl, data = payloads("paloalto-81")
    assert data.endswith(bytes(1000)) and len(decode_export([tpl, data], "x")) == 1
    broken = data[:-8] + b"\0\0\0\0\0\0\0\1"
    result = decode_datagrams(
        [tpl, broken], ["192.0.2.9"] * 2, np.zeros(2, np.int64), None, "x", DecoderState()
    )
    assert result.rejects.column("reason").to_pylist() == ["bad flowset length"]
    assert result.flows.num_rows == 1  # the flowset before it still lands


def test_a_folder_of_all_these_exports_lands_without_rejects(tmp_path, decoded):
    """As a new user runs it: every case as its own capture (pcap, Ethernet, UDP to 2055, one exporter address
    each) in one folder, one command: exit 0, no reject, every flow nfdump sees lands. Except ipt_netflow: its
    datagram also carries data sets of templates 259 and 262 that the exporter sent before the capture began (only
    260 is in it); nfdump drops them silently, tracepipe reports each as a `no template` reject (exit 3)."""
    from conftest import run_tracepipe
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    folder, late = tmp_path / "exports", tmp_path / "late"
    folder.mkdir()
    late.mkdir()
    for number, case in enumerate(CASES, start=1):
        frames = [
            Ether(dst=LAN_MAC)
            / IP(src=f"192.0.2.{number}", dst="192.0.2.254")
            / UDP(sport=50000, dport=2055)
            / p
            for p in payloads(case)
        ]
        wrpcap(str((late if case == "ipt-netflow" else folder) / f"{case}.pcap"), frames)

    def ingest(path: Path, lake: Path) -> tuple[int, dict]:
        proc = run_tracepipe("ingest", "netflow", str(path), "--lake", str(lake), "--format", "json")
        return proc.returncode, json.loads(proc.stdout)

    code, summary = ingest(folder, tmp_path / "lake")
    assert code == 0, summary
    assert summary["totals"]["rejects"] == 0 and summary["totals"]["files"] == len(CASES) - 1
    assert summary["totals"]["flows"] == sum(len(decoded[c][1]) for c in CASES if c != "ipt-netflow") == 276
    code, summary = ingest(late, tmp_path / "lake-late")
    assert code == 3
    assert (summary["totals"]["flows"], summary["totals"]["rejects"]) == (12, 6)
    assert [e["no_template"] for e in summary["exporters"].values()] == [6]
