"""SRv6 segment lists and VRF names (issue 16).

No committed capture carries them: akvorado's SRv6 capture exports the packet (IE 315, read by inner_headers:
the SRH is stepped over to the inner conversation) and none of RFC 9487's elements, and neither akvorado nor
nfdump 1.7.1 decodes those elements or IE 236. So the expected values come from the IANA definitions, and the
datagrams are built here byte for byte:
- 495 srhActiveSegmentIPv6 (ipv6Address), 497 srhSegmentIPv6ListSection (octetArray: the SRH's Segment List as on
  the wire, 16 bytes a segment), 496 srhSegmentIPv6BasicList (RFC 6313 basicList: semantic, element id 494
  srhSegmentIPv6 and its length 16, then the segments) -> srv6_active_segment, srv6_segments;
- options data of scope ingressVRFID (234) with VRFname (236, string: IOS XR sends 32 bytes NUL-padded) ->
  ingress_vrf_name / egress_vrf_name of the flows' VRF ids (234/235), like interface names: per exporter and
  domain, bounded, saved with the decoder state.
"""

from __future__ import annotations

import ipaddress
import struct

import numpy as np
from test_netflow_decode import (
    EXPORTER,
    SECS,
    decode,
    flowset,
    ipfix_message,
    ipfix_options_template,
    template_record,
    v9_datagram,
    v9_options_template,
)

from tracepipe.ingest.netflow import VRF_NAME_KEY, DecoderState

SEGMENTS = ["2001:db8:1::1", "2001:db8:2::1", "fc00:0:3::d6"]
SRC6, DST6 = "2001:db8::10", "2001:db8::20"


def a6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def var(value: bytes) -> bytes:
    """RFC 7011 §7 variable-length encoding."""
    return (
        bytes([len(value)]) + value if len(value) < 255 else b"\xff" + struct.pack(">H", len(value)) + value
    )


def basic_list(segments: list[str], element: int = 494, size: int = 16) -> bytes:
    """RFC 6313 §4.5.1: semantic 0x04 (ordered), field id, element length, then the elements."""
    return struct.pack(">BHH", 4, element, size) + b"".join(a6(s) for s in segments)


def srv6_message(records: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """IPFIX template 400: IPv6 addresses, protocol, times, 495, 497 and 496 (both variable length)."""
    fields = [(27, 16), (28, 16), (4, 1), (150, 4), (151, 4), (495, 16), (497, 65535), (496, 65535)]
    body = b"".join(
        a6(SRC6) + a6(DST6) + struct.pack(">BII", 17, SECS, SECS) + active + var(section) + var(blist)
        for active, section, blist in records
    )
    return ipfix_message(flowset(2, template_record(400, fields)), flowset(400, body))


def test_segment_list_section_and_active_segment():
    """The first record's bytes: 497 = 3 x 16 bytes (2001:db8:1::1, 2001:db8:2::1, fc00:0:3::d6), 496 the same
    list as a basicList (04 01ee 0010 + segments), 495 = 2001:db8:2::1. The list lands in wire order."""
    section = b"".join(a6(s) for s in SEGMENTS)
    assert section.hex()[:32] == "20010db8000100000000000000000001"
    assert basic_list(SEGMENTS)[:5].hex() == "0401ee0010"
    result, _ = decode([srv6_message([(a6(SEGMENTS[1]), section, basic_list(SEGMENTS))])])
    assert result.rejects.num_rows == 0, result.rejects.to_pylist()
    rows = result.flows.to_pylist()
    assert [(r["src_addr"], r["dst_addr"], r["srv6_active_segment"], r["srv6_segments"]) for r in rows] == [
        (SRC6, DST6, "2001:db8:2::1", " ".join(SEGMENTS))
    ]


def test_basic_list_alone_and_lists_that_are_not_segments():
    """Without 497 the basicList gives the list; a basicList of another element (IE 8, 4 bytes) or a section
    that is not a multiple of 16 bytes is no segment list (null), and the flow still lands."""
    fields = [(27, 16), (28, 16), (4, 1), (150, 4), (151, 4), (496, 65535)]
    body = b"".join(
        a6(SRC6) + a6(DST6) + struct.pack(">BII", 17, SECS, SECS) + var(blist)
        for blist in (
            basic_list(SEGMENTS[:2]),
            struct.pack(">BHH", 4, 8, 4) + b"\x0a\x00\x00\x01",
            b"",
        )
    )
    message = ipfix_message(flowset(2, template_record(401, fields)), flowset(401, body))
    result, _ = decode([message])
    assert result.rejects.num_rows == 0
    assert [r["srv6_segments"] for r in result.flows.to_pylist()] == [
        "2001:db8:1::1 2001:db8:2::1",
        None,
        None,
    ]
    short, _ = decode([srv6_message([(a6(SEGMENTS[0]), b"\x20" * 15, b"")])])
    assert [r["srv6_segments"] for r in short.flows.to_pylist()] == [None]


def test_long_segment_lists_are_cut_and_fixed_length_lists_read():
    """20 segments (320 bytes, long-form length) keep the first 15 (a 254-byte slot); a fixed-length 497 of 32
    bytes (two segments) is read the same way."""
    many = [f"2001:db8::{i:x}" for i in range(1, 21)]
    result, _ = decode([srv6_message([(a6(many[0]), b"".join(a6(s) for s in many), b"")])])
    assert [r["srv6_segments"] for r in result.flows.to_pylist()] == [" ".join(many[:15])]
    fields = [(27, 16), (28, 16), (4, 1), (150, 4), (151, 4), (497, 32)]
    record = a6(SRC6) + a6(DST6) + struct.pack(">BII", 6, SECS, SECS) + a6(SEGMENTS[0]) + a6(SEGMENTS[2])
    fixed, _ = decode([ipfix_message(flowset(2, template_record(402, fields)), flowset(402, record))])
    assert [r["srv6_segments"] for r in fixed.flows.to_pylist()] == ["2001:db8:1::1 fc00:0:3::d6"]


DATA_VRF = [(8, 4), (12, 4), (4, 1), (22, 4), (21, 4), (234, 4), (235, 4)]


def vrf_datagram(names: dict[int, bytes], flows: list[tuple[int, int]]) -> bytes:
    """v9 as IOS XR sends its VRF table: options template 300, scope System (type 1, 4 bytes), ingressVRFID (234,
    4 bytes) and VRFname (236, 32 bytes NUL-padded); then data template 301 with ingress/egress VRF ids."""
    table = b"".join(struct.pack(">II", 0, vrf) + name.ljust(32, b"\0")[:32] for vrf, name in names.items())
    data = b"".join(
        struct.pack(">IIBIIII", 0x0A000001 + i, 0x0A000101, 6, 1000, 2000, ingress, egress)
        for i, (ingress, egress) in enumerate(flows)
    )
    return v9_datagram(
        v9_options_template(300, [(1, 4)], [(234, 4), (236, 32)]),
        flowset(300, table),
        flowset(0, template_record(301, DATA_VRF)),
        flowset(301, data),
    )


def test_v9_vrf_table_names_ingress_and_egress_vrfs():
    """VRF 0x60000000 is IOS XR's default VRF; 0x60000002 names a customer VRF; 0x60000009 was never named."""
    message = vrf_datagram(
        {0x60000000: b"default", 0x60000002: b"CUSTOMER-A"},
        [(0x60000002, 0x60000000), (0x60000009, 0x60000002)],
    )
    result, state = decode([message])
    assert result.rejects.num_rows == 0
    rows = [
        (r["src_addr"], r["ingress_vrf"], r["ingress_vrf_name"], r["egress_vrf_name"])
        for r in result.flows.to_pylist()
    ]
    assert sorted(rows) == [
        ("10.0.0.1", 0x60000002, "CUSTOMER-A", "default"),
        ("10.0.0.2", 0x60000009, None, "CUSTOMER-A"),
    ]
    assert {r["input_if_name"] for r in result.flows.to_pylist()} == {None}  # a VRF id is no ifindex
    assert state.if_names[(EXPORTER, 0, VRF_NAME_KEY + 0x60000002)] == "CUSTOMER-A"
    again = DecoderState.from_json(state.to_json())  # the collector's saved state keeps them
    assert again.if_names == state.if_names


def test_ipfix_vrf_table_with_variable_length_names():
    """IPFIX: options template scope ingressVRFID, VRFname variable length."""
    table = struct.pack(">I", 7) + var(b"blue") + struct.pack(">I", 8) + var(b"red\x00pad")
    data = struct.pack(">IIBIIII", 0x0A000001, 0x0A000101, 6, SECS, SECS, 7, 8)
    fields = [(8, 4), (12, 4), (4, 1), (150, 4), (151, 4), (234, 4), (235, 4)]
    message = ipfix_message(
        ipfix_options_template(310, [(234, 4)], [(236, 65535)]),
        flowset(310, table),
        flowset(2, template_record(311, fields)),
        flowset(311, data),
    )
    result, _ = decode([message])
    assert result.rejects.num_rows == 0
    assert [(r["ingress_vrf_name"], r["egress_vrf_name"]) for r in result.flows.to_pylist()] == [
        ("blue", "red")
    ]


def test_flows_without_the_elements_leave_the_columns_null():
    result, _ = decode([vrf_datagram({}, [(1, 2)])])
    row = result.flows.to_pylist()[0]
    assert (
        row["ingress_vrf"],
        row["ingress_vrf_name"],
        row["srv6_segments"],
        row["srv6_active_segment"],
    ) == (
        1,
        None,
        None,
        None,
    )
    assert np.all(np.array([row["nat_src_addr"], row["fw_event"]], dtype=object) == None)  # noqa: E711


def rd_message(rds: list[bytes]) -> bytes:
    """IPFIX template 410: IPv4 addresses, protocol, times and IE 90 mplsVpnRouteDistinguisher (8 bytes)."""
    fields = [(8, 4), (12, 4), (4, 1), (150, 4), (151, 4), (90, 8)]
    body = b"".join(
        ipaddress.IPv4Address("10.1.0.1").packed
        + ipaddress.IPv4Address("10.2.0.1").packed
        + struct.pack(">BII", 6, SECS, SECS)
        + rd
        for rd in rds
    )
    return ipfix_message(flowset(2, template_record(410, fields)), flowset(410, body))


def test_route_distinguishers_as_routers_print_them():
    """RFC 4364 §4.2, bytes written out: type 0 = 0000 | AS 65000 (fde8) | 100 (00000064) -> 65000:100; type 1 =
    0001 | 192.0.2.1 (c0000201) | 7 (0007) -> 192.0.2.1:7; type 2 = 0002 | AS 4200000000 (fa56ea00) | 42 (002a)
    -> 4200000000:42; all zero (no VPN) -> null; an unknown type 5 keeps its value; the largest values of each
    part do not wrap."""
    rds = [
        bytes.fromhex("0000fde800000064"),
        bytes.fromhex("0001c00002010007"),
        bytes.fromhex("0002fa56ea00002a"),
        bytes(8),
        bytes.fromhex("0005000000000102"),
        bytes.fromhex("0000ffffffffffff"),
        bytes.fromhex("0001ffffffffffff"),
    ]
    result, _ = decode([rd_message(rds)])
    assert result.rejects.num_rows == 0, result.rejects.to_pylist()
    assert result.flows.column("mpls_vpn_rd").to_pylist() == [
        "65000:100",
        "192.0.2.1:7",
        "4200000000:42",
        None,
        "type-5:258",
        "65535:4294967295",
        "255.255.255.255:65535",
    ]
    # a template without IE 90 leaves the column null
    section = b"".join(a6(s) for s in SEGMENTS)
    plain, _ = decode([srv6_message([(a6(SEGMENTS[1]), section, basic_list(SEGMENTS))])])
    assert plain.flows.column("mpls_vpn_rd").to_pylist() == [None]
