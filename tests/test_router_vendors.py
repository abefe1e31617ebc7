"""Cisco (ASA NSEL, ASR 9000 / IOS XR) and Huawei (NetStream) NetFlow v9 exports decoded as the peers decode them
(issue 16). The datagrams are the Logstash NetFlow codec's test data (tests/data/routers/PROVENANCE.md).

Two peers give the expected decode:
- the installed nfdump (built with NSEL/NEL): each case's datagrams are sent over UDP on 127.0.0.1 to a real
  nfcapd and `nfdump` prints what it made of them; where it differs, an erratum below pins the difference;
- the Logstash codec's published decode of one record per case (spec/codecs/netflow_spec.rb), quoted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import decode_and_nfdump, ingest_in_process, run_tracepipe
from support.probes import LAN_MAC

from tracepipe.ingest.netflow import DecoderState, decode_datagrams

DATA = Path(__file__).parent / "data" / "routers" / "logstash"

# case -> (datagram files in the order the exporter sent them, vendor and model, record types)
CASES: dict[str, tuple[list[str], str, str]] = {
    "cisco-asa-1": (
        ["netflow9_test_cisco_asa_1_tpl.dat", "netflow9_test_cisco_asa_1_data.dat"],
        "Cisco ASA (NSEL)",
        "flow events (IE 233), NAT addresses (225-228), ICMP type/code (176/177), flowStartMilliseconds",
    ),
    "cisco-asa-2": (
        [
            "netflow9_test_cisco_asa_2_tpl_26x.dat",
            "netflow9_test_cisco_asa_2_tpl_27x.dat",
            "netflow9_test_cisco_asa_2_data.dat",
        ],
        "Cisco ASA (NSEL)",
        "30 templates, IPv4 and IPv6, initiator/responder octets (231/232)",
    ),
    "huawei-netstream": (
        ["netflow9_test_huawei_netstream_tpl.dat", "netflow9_test_huawei_netstream_data.dat"],
        "Huawei NetStream",
        "IPv4 5-tuple, next hops, AS, flowDirection",
    ),
    "cisco-asr9k": (
        [
            "netflow9_test_cisco_asr9k_opttpl256.dat",
            "netflow9_test_cisco_asr9k_data256.dat",
            "netflow9_test_cisco_asr9k_tpl260.dat",
            "netflow9_test_cisco_asr9k_data260.dat",
        ],
        "Cisco ASR 9000 (IOS XR)",
        "interface table in options data (IE 83), VRF ids, sampler id, flowDirection",
    ),
}
KEY = ("src_addr", "dst_addr", "src_port", "dst_port", "proto", "packets", "bytes", "input_if", "output_if")
NSEL = ("cisco-asa-1", "cisco-asa-2")


def payloads(case: str) -> list[bytes]:
    return [(DATA / f).read_bytes() for f in CASES[case][0]]


def ms(value) -> int:
    return int(value.timestamp() * 1000)


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict[str, tuple[list[dict], list[dict]]]:
    """case -> (our decode, nfdump's records for the same datagrams via a real nfcapd)."""
    return decode_and_nfdump({case: payloads(case) for case in CASES}, tmp_path_factory.mktemp("vendors"))


@pytest.mark.parametrize("case", list(CASES))
def test_same_records_as_nfdump(case, decoded):
    """5-tuple, volumes, interfaces and start time of every record as nfdump prints them (end time: N1)."""
    ours, theirs = decoded[case]
    assert len(ours) == len(theirs) > 0
    assert sorted((*(r[k] for k in KEY), ms(r["ts_start"])) for r in ours) == sorted(
        (*(r[k] for k in KEY), ms(r["ts_start"])) for r in theirs
    )
    if case not in NSEL:
        assert sorted(ms(r["ts_end"]) for r in ours) == sorted(ms(r["ts_end"]) for r in theirs)


def test_erratum_n1_nfdump_prints_1970_as_the_end_of_nsel_events(decoded):
    """N1: an ASA flow event carries its start (flowStartMilliseconds) and the event time, no end; nfdump prints
    the end as 1970-01-01 (as R4 for other records without the time it reads). The lake keeps end = start."""
    for case in NSEL:
        ours, theirs = decoded[case]
        assert {ms(r["ts_end"]) for r in theirs} == {0}
        assert all(r["ts_end"] == r["ts_start"] for r in ours)


def test_cisco_asa_icmp_event_as_logstash_decodes_it(decoded):
    """Logstash's "Netflow 9 Cisco ASA" record: ICMP echo request (type 8, code 0) 192.168.23.22 ->
    164.164.37.11, identifier 17549 in the source port field, 56 bytes (IE 85), interfaces 2 -> 3, flow start
    1444384068169 ms. ICMP type/code land in dst_port (8*256), the identifier is not a port: src_port 0; the
    echo reply's type 0 gives dst_port 0 (as nfdump prints it), not the identifier."""
    ours, _ = decoded["cisco-asa-1"]
    request = [r for r in ours if r["src_addr"] == "192.168.23.22" and ms(r["ts_start"]) == 1444384068169]
    assert [
        (r["dst_addr"], r["proto"], r["src_port"], r["dst_port"], r["bytes"], r["input_if"], r["output_if"])
        for r in request
    ] == [("164.164.37.11", 1, 0, 2048, 56, 2, 3)]
    replies = [r for r in ours if r["src_addr"] == "164.164.37.11" and r["dst_addr"] == "192.168.23.22"]
    assert replies and {r["dst_port"] for r in replies} == {0}


def test_cisco_asa_initiator_octets_are_the_volume(decoded):
    """ASA templates without IE 1/85 carry initiatorOctets (231): it is the volume of the initiator -> responder
    row, as nfdump prints it (its 'in bytes'); events without any octets field stay 0 bytes."""
    ours, theirs = decoded["cisco-asa-2"]
    assert sorted(r["bytes"] for r in ours) == sorted(r["bytes"] for r in theirs)
    assert {r["bytes"] for r in ours} >= {0, 69, 75, 81}


def test_huawei_netstream_record_as_the_peers_decode_it(decoded):
    """Logstash's "Netflow 9 Huawei Netstream" record: TCP 10.108.219.53:45587 -> 10.111.112.204:2598, 4 packets,
    200 bytes, flags 24, interfaces 8 -> 31, direction 1 (egress). Erratum L1: Logstash puts first/last switched
    at 02:56:52.940 / 03:02:20.000; nfdump and the lake at 02:56:51.940 / 03:02:19.000 (the same sysUptime
    arithmetic, RFC 3954 §5.1; Logstash's export-time rounding differs by one second)."""
    ours, _ = decoded["huawei-netstream"]
    assert [
        (
            r["src_addr"],
            r["dst_addr"],
            r["src_port"],
            r["dst_port"],
            r["proto"],
            r["packets"],
            r["bytes"],
            r["tcp_flags"],
            r["input_if"],
            r["output_if"],
            r["flow_direction"],
            ms(r["ts_start"]),
            ms(r["ts_end"]),
        )
        for r in ours
    ] == [
        (
            "10.108.219.53",
            "10.111.112.204",
            45587,
            2598,
            6,
            4,
            200,
            24,
            8,
            31,
            "egress",
            1517194611940,
            1517194939000,
        )
    ]


def test_cisco_asr9k_flow_vrf_direction_and_interface_names(decoded):
    """Logstash's "ASR 9000 template 260" record: TCP 10.0.29.46:443 -> 10.0.15.38:52364, 2 packets, 112 bytes,
    flags 18, interfaces 75 -> 158, direction 1, ingress and egress VRF 1610612736 (0x60000000, IOS XR's default
    VRF). Its "options template 256" record names interface 104 "TenGigE0_6_0_2" (IE 83): the flows in on 104
    carry that name. Interfaces 106 and 158 are not in the table: null."""
    ours, _ = decoded["cisco-asr9k"]
    row = [r for r in ours if r["src_addr"] == "10.0.29.46" and r["dst_port"] == 52364]
    assert [
        (
            r["dst_addr"],
            r["src_port"],
            r["packets"],
            r["bytes"],
            r["tcp_flags"],
            r["input_if"],
            r["output_if"],
            r["flow_direction"],
            r["ingress_vrf"],
            r["egress_vrf"],
        )
        for r in row
    ] == [("10.0.15.38", 443, 2, 112, 18, 75, 158, "egress", 1610612736, 1610612736)]
    assert {r["input_if_name"] for r in ours if r["input_if"] == 104} == {"TenGigE0_6_0_2"}
    assert {r["output_if_name"] for r in ours if r["output_if"] == 158} == {None}
    # the table names 19 interfaces (54-162, not 106 nor 158): 13 of the 21 flows come in on a named one
    assert {r["input_if"] for r in ours if r["input_if_name"] is None} == {106, 158}
    assert sum(r["input_if_name"] is not None for r in ours) == 13


def _capture(case: str, folder: Path) -> Path:
    """The case's datagrams as a collector's capture (pcap, Ethernet, UDP to 2055 from the exporter)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    path = folder / f"{case}.pcap"
    frames = [
        Ether(dst=LAN_MAC) / IP(src="192.0.2.9", dst="192.0.2.1") / UDP(sport=50000, dport=2055) / p
        for p in payloads(case)
    ]
    wrpcap(str(path), frames)
    return path


def test_a_folder_of_vendor_exports_lands_without_rejects_and_keeps_the_new_columns(tmp_path):
    """As a new user runs it: the four captures in one folder, one command, exit 0, no rejects; then the lake
    (Delta, read by DuckDB) answers with the router columns."""
    folder = tmp_path / "exports"
    folder.mkdir()
    captures = [_capture(case, folder) for case in CASES]
    proc = run_tracepipe(
        "ingest", "netflow", *map(str, captures), "--lake", str(tmp_path / "lake"), "--format", "json"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = json.dumps(json.loads(proc.stdout))
    assert '"rejects": 0' in text and '"rejects": 1' not in text
    flows: pa.Table = ingest_in_process([captures[3]], tmp_path / "lake-asr9k")
    rows = flows.to_pylist()
    assert len(rows) == 21
    assert {r["input_if_name"] for r in rows if r["input_if"] == 104} == {"TenGigE0_6_0_2"}
    n = len(payloads("cisco-asr9k"))
    decoded = decode_datagrams(
        payloads("cisco-asr9k"), ["192.0.2.9"] * n, np.zeros(n, np.int64), None, "x", DecoderState()
    ).flows.to_pylist()
    columns = ("src_addr", "src_port", "flow_direction", "ingress_vrf", "egress_vrf", "input_if_name")
    assert sorted(tuple(r[c] for c in columns) for r in rows) == sorted(
        tuple(r[c] for c in columns) for r in decoded
    )
