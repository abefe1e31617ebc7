"""Packet sections in flow records (issue 16): the inner conversation of tunnelled packets, read column-wise.

Packets are built with scapy (fine in tests: it only makes inputs) and put into real IPFIX messages decoded by
tracepipe's decoder: fixed-length ipHeaderPacketSection (IE 313, as Cisco sends it) and variable-length
dataLinkFrameSection (IE 315, as Juniper sends it). Hostile bytes in a section never crash the decoder: a record
whose only addresses were in a section that is not IP is a counted reject, the rest lands.
"""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.contrib.mpls import MPLS
from scapy.layers.inet import GRE, ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrSegmentRouting
from scapy.layers.l2 import Dot1Q, Ether
from support.probes import LAN_MAC
from test_netflow_decode import EXPORTER, decode, flowset, ipfix_message, template_record

from tracepipe.ingest.inner_headers import decode_sections

INNER_UDP = IP(src="10.9.8.7", dst="192.0.2.1") / UDP(sport=2222, dport=1111) / b"c2"
INNER_TCP6 = IPv6(src="2001:db8::7", dst="2001:db8::1") / TCP(sport=40000, dport=445, flags="S")

# packet (as bytes from the IP header) -> (src, dst, proto, sport, dport, tunnel src, tunnel dst, tunnel proto)
IP_CASES = {
    "plain udp": (INNER_UDP, ("10.9.8.7", "192.0.2.1", 17, 2222, 1111, None, None, None)),
    "ip-in-ip": (
        IP(src="198.51.100.1", dst="198.51.100.2") / INNER_UDP,
        ("10.9.8.7", "192.0.2.1", 17, 2222, 1111, "198.51.100.1", "198.51.100.2", 4),
    ),
    "ipv6-in-ipv4 (6in4)": (
        IP(src="198.51.100.1", dst="198.51.100.2") / INNER_TCP6,
        ("2001:db8::7", "2001:db8::1", 6, 40000, 445, "198.51.100.1", "198.51.100.2", 41),
    ),
    "gre": (
        IP(src="198.51.100.1", dst="198.51.100.2") / GRE(key_present=1, key=7) / INNER_UDP,
        ("10.9.8.7", "192.0.2.1", 17, 2222, 1111, "198.51.100.1", "198.51.100.2", 47),
    ),
    "srv6": (
        IPv6(src="fc00::1", dst="fc00::2")
        / IPv6ExtHdrSegmentRouting(addresses=["fc00::3", "fc00::2"], nh=4)
        / INNER_UDP,
        ("10.9.8.7", "192.0.2.1", 17, 2222, 1111, "fc00::1", "fc00::2", 4),
    ),
    "icmp echo": (
        IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, code=0),
        ("10.0.0.1", "10.0.0.2", 1, 0, 2048, None, None, None),
    ),
}
FRAME_CASES = {
    "vlan + mpls + ipv4-in-ipv4": (
        Ether(dst=LAN_MAC)
        / Dot1Q(vlan=7)
        / MPLS(label=100, s=0)
        / MPLS(label=200, s=1)
        / IP(src="198.51.100.1", dst="198.51.100.2")
        / INNER_UDP,
        ("10.9.8.7", "192.0.2.1", 17, 2222, 1111, "198.51.100.1", "198.51.100.2", 4),
    ),
    "mpls pseudowire with control word": (
        Ether(dst=LAN_MAC, type=0x8847)
        / MPLS(label=300012, s=1)
        / b"\0\0\0\0"
        / Ether(dst=LAN_MAC)
        / INNER_TCP6,
        ("2001:db8::7", "2001:db8::1", 6, 40000, 445, None, None, None),
    ),
}


def _matrix(packets: list[bytes], width: int = 160) -> tuple[np.ndarray, np.ndarray]:
    data = np.zeros((len(packets), width), dtype=np.uint8)
    for i, p in enumerate(packets):
        data[i, : min(len(p), width)] = np.frombuffer(p[:width], dtype=np.uint8)
    return data, np.array([min(len(p), width) for p in packets], dtype=np.int64)


def _ipfix_records(field: tuple[int, int], packets: list[bytes]) -> list[bytes]:
    """A template (packet counters + the section field) then one data set with a record per packet."""
    fields = [(2, 8), (1, 8), field]
    template = flowset(2, template_record(300, fields))
    body = b""
    for p in packets:
        body += struct.pack(">QQ", 1, len(p))
        if field[1] == 65535:
            body += (bytes([len(p)]) + p) if len(p) < 255 else (b"\xff" + struct.pack(">H", len(p)) + p)
        else:
            body += p[: field[1]].ljust(field[1], b"\0")
    return [ipfix_message(template, seq=0), ipfix_message(flowset(300, body), seq=0)]


def _rows(flows) -> list[tuple]:
    columns = [
        "src_addr",
        "dst_addr",
        "proto",
        "src_port",
        "dst_port",
        "tunnel_src_addr",
        "tunnel_dst_addr",
        "tunnel_proto",
    ]
    data = flows.select(columns).to_pydict()
    return list(zip(*(data[c] for c in columns), strict=True))


def test_ip_header_sections_fixed_length_give_inner_conversations():
    """Cisco-style: ipHeaderPacketSection of fixed length 128 (short packets zero-padded)."""
    packets = [bytes(p) for p, _ in IP_CASES.values()]
    result, _ = decode(_ipfix_records((313, 128), packets))
    assert result.rejects.num_rows == 0, result.rejects.to_pylist()
    assert _rows(result.flows) == [want for _, want in IP_CASES.values()]


def test_data_link_frame_sections_variable_length_give_inner_conversations():
    """Juniper-style: dataLinkFrameSection of variable length (the records are rewritten to a fixed slot)."""
    packets = [bytes(p) for p, _ in FRAME_CASES.values()]
    result, _ = decode(_ipfix_records((315, 65535), packets))
    assert result.rejects.num_rows == 0, result.rejects.to_pylist()
    assert _rows(result.flows) == [want for _, want in FRAME_CASES.values()]
    assert result.stats[EXPORTER]["variable_fields_skipped"] == 0  # the sections were read, not skipped
    # the record's own counters win over the packet's length
    assert result.flows.column("bytes").to_pylist() == [len(p) for p in packets]


def test_a_later_fragment_has_no_ports():
    """Only a first fragment carries the L4 header: a later one's payload bytes are not ports."""
    fragment = bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=17, frag=100) / (b"\x08\xae\x04\x57" * 4))
    data, length = _matrix([fragment])
    inner = decode_sections("ip", data, length)
    assert inner.ok.tolist() == [True] and (inner.src_port[0], inner.dst_port[0], inner.proto[0]) == (
        0,
        0,
        17,
    )


def test_a_section_that_is_not_ip_is_a_counted_reject_and_the_rest_lands():
    good = bytes(Ether(dst=LAN_MAC) / INNER_UDP)
    junk = b"\x00" * 12 + b"\x88\x47" + b"\xff" * 40  # an MPLS stack that never ends within the bytes
    result, _ = decode(_ipfix_records((315, 65535), [good, junk, b"", good, b"\x45" * 19]))
    assert result.flows.num_rows == 2
    # the sections too short for an IP header are rejected before they are projected (a 256-byte slot each)
    assert result.rejects.column("reason").to_pylist() == ["no addresses", "no addresses"]
    assert result.rejects.column("detail").to_pylist() == [
        "2 records: packet section shorter than an IP header",
        "1 records in datagrams at offsets 100..100: packet section not IP",  # (the second datagram)
    ]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=8), st.sampled_from(["ip", "frame"]))
def test_any_bytes_parse_or_are_marked_not_ok_never_crash(packets, kind):
    data, length = _matrix(packets, width=200)
    inner = decode_sections(kind, data, length)
    assert inner.ok.shape == (len(packets),)
    assert ((inner.src_port >= 0) & (inner.src_port < 65536)).all()
    assert set(np.unique(inner.ip_version[inner.ok]).tolist()) <= {4, 6}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5), st.sampled_from([(313, 64), (315, 65535)]))
def test_any_section_bytes_in_a_datagram_never_crash_the_decoder(packets, field):
    result, _ = decode(_ipfix_records(field, packets))
    assert result.flows.num_rows + sum(
        int(d.split()[0])
        for d in result.rejects.column("detail").to_pylist()
        if d.endswith(("not IP", "shorter than an IP header"))
    ) == len(packets)


def test_sampler_tables_survive_a_saved_decoder_state():
    """The collector saves its DecoderState between rotations: sampler tables (issue 16) go with it."""
    from tracepipe.ingest.netflow import DecoderState, Template

    state = DecoderState()
    state.add_template(("192.0.2.1", 9, 0, 256), Template.build([(8, 4, 0), (12, 4, 0), (48, 2, 0)]))
    state.samplers[("192.0.2.1", 0, 3)] = 4000
    loaded = DecoderState.from_json(state.to_json())
    assert loaded.samplers == {("192.0.2.1", 0, 3): 4000}
