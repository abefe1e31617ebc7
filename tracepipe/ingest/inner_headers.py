"""Packet bytes that routers export inside flow records -> the conversation they carry, vectorised.

In: the bytes of IPFIX `ipHeaderPacketSection` (IE 313, starts at an IP header) or `dataLinkFrameSection`
(IE 315, starts at an Ethernet header), one row per record, as a 2-D uint8 array with each row's real length.
Out: per record the innermost IP conversation (version, addresses, protocol, ports or ICMP type/code, TCP
flags) and, when the packet was tunnelled (IP-in-IP, IPv6-in-IP, GRE, SRv6, MPLS), the outermost IP header's
addresses and protocol. A row whose bytes do not parse is marked not `ok`; nothing here raises on any input.

Juniper (inline J-Flow), Huawei and Cisco routers export these sections for sampled packets instead of (or next
to) the usual 5-tuple fields: without this, tunnelled traffic lands as protocol 4/41/47 with ports 0.
Every step is array arithmetic over all rows; the Python loops run over header layers (at most a few), never
over records.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# IPFIX information elements carrying packet bytes (IANA registry), and the pseudo field ids that a
# variable-length one becomes once its records are rewritten to a fixed layout (see netflow._fixed_from_variable):
# ids >= 2**16 never come from the wire, so a template cannot spoof them.
IP_HEADER_SECTION = 313  # ipHeaderPacketSection
FRAME_SECTION = 315  # dataLinkFrameSection
SECTION_SLOT_BASE = 1 << 16
SECTION_SLOT_BYTES = 256  # a variable-length section keeps its first 254 bytes (length-prefixed, 2 bytes)
SECTION_ROLES = {"ip_header", "frame", "ip_header_slot", "frame_slot"}

ETHERTYPE_IPV4, ETHERTYPE_IPV6 = 0x0800, 0x86DD
ETHERTYPE_VLAN = (0x8100, 0x88A8, 0x9100)
ETHERTYPE_MPLS = (0x8847, 0x8848)
ETHERTYPE_TEB = 0x6558  # transparent Ethernet bridging (GRE carrying Ethernet)
PROTO_IPIP, PROTO_IPV6, PROTO_GRE = 4, 41, 47
IPV6_EXTENSIONS = (0, 43, 60)  # hop-by-hop, routing (SRv6 SRH is routing type 4), destination options
IPV6_FRAGMENT = 44
PORT_PROTOCOLS = (6, 17, 132, 136)  # TCP, UDP, SCTP, UDP-Lite
MAX_MPLS_LABELS = 8
MAX_VLAN_TAGS = 2
MAX_IPV6_EXTENSIONS = 4
MAX_DECAPSULATIONS = 2


@dataclass
class Inner:
    """The innermost conversation of each row (arrays of equal length)."""

    ok: np.ndarray  # bool: an IP header was found and its addresses lie within the row's bytes
    ip_version: np.ndarray  # int8: 4 or 6
    src: np.ndarray  # (n, 16) uint8: IPv4 in the first 4 bytes
    dst: np.ndarray
    proto: np.ndarray  # int16
    src_port: np.ndarray  # int32 (0 when not carried)
    dst_port: np.ndarray  # int32 (ICMP: type*256 + code, as NetFlow puts it)
    tcp_flags: np.ndarray  # int16
    has_ports: np.ndarray  # bool: the L4 header was within the bytes
    tunnelled: np.ndarray  # bool: an outer IP header was taken off
    outer_version: np.ndarray  # int8
    outer_src: np.ndarray  # (n, 16) uint8
    outer_dst: np.ndarray
    outer_proto: np.ndarray  # int16
    mpls_top_label: np.ndarray  # int32, -1 without MPLS
    length: np.ndarray  # int64: bytes of the innermost IP packet (its header's length field)


def section_bytes(arr: np.ndarray, roles: dict[str, int]) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(kind "ip" or "frame", bytes (n, width) uint8, real length per row) of the section a layout carries."""
    for role, kind in (
        ("ip_header", "ip"),
        ("frame", "frame"),
        ("ip_header_slot", "ip"),
        ("frame_slot", "frame"),
    ):
        if role not in roles:
            continue
        width = roles[role]
        raw = np.frombuffer(arr[role].tobytes(), dtype=np.uint8).reshape(len(arr), width)
        if role.endswith("_slot"):  # 2-byte length, then the bytes (zero padded)
            length = (raw[:, 0].astype(np.int64) << 8) | raw[:, 1]
            raw = raw[:, 2:]
            length = np.minimum(length, raw.shape[1])
        else:
            length = np.full(len(arr), width, dtype=np.int64)
        return kind, raw, length
    return None


class _Reader:
    """Bounds-checked reads at per-row offsets: outside a row's real length a read gives 0 and clears `ok`."""

    def __init__(self, data: np.ndarray, length: np.ndarray) -> None:
        self.data = data
        self.width = data.shape[1]
        self.length = length
        self.rows = np.arange(data.shape[0])

    def fits(self, at: np.ndarray, size: int) -> np.ndarray:
        return (at >= 0) & (at + size <= self.length)

    def u8(self, at: np.ndarray) -> np.ndarray:
        safe = np.clip(at, 0, max(self.width - 1, 0))
        if self.width == 0:
            return np.zeros(len(at), dtype=np.int64)
        value = self.data[self.rows, safe].astype(np.int64)
        return np.where(self.fits(at, 1), value, 0)

    def u16(self, at: np.ndarray) -> np.ndarray:
        return (self.u8(at) << 8) | self.u8(at + 1)

    def u32(self, at: np.ndarray) -> np.ndarray:
        return (self.u16(at) << 16) | self.u16(at + 2)

    def take(self, at: np.ndarray, size: int) -> np.ndarray:
        """`size` bytes from each row at its offset as (n, 16) uint8 (zeros where they do not fit)."""
        out = np.zeros((len(at), 16), dtype=np.uint8)
        if self.width == 0:
            return out
        cols = np.clip(at[:, None] + np.arange(size)[None, :], 0, self.width - 1)
        out[:, :size] = self.data[self.rows[:, None], cols]
        out[~self.fits(at, size)] = 0
        return out


def decode_sections(kind: str, data: np.ndarray, length: np.ndarray) -> Inner:
    """Walk each row's headers down to the innermost IP conversation (see the module docstring)."""
    n = data.shape[0]
    r = _Reader(data, length)
    at = np.zeros(n, dtype=np.int64)
    ok = np.ones(n, dtype=bool)
    mpls_top = np.full(n, -1, dtype=np.int64)
    if kind == "frame":
        ethertype, at = _ethernet(r, at)
        ethertype, at, mpls_top, ok = _mpls(r, ethertype, at, mpls_top, ok)
        ok &= (ethertype == ETHERTYPE_IPV4) | (ethertype == ETHERTYPE_IPV6)
    version = r.u8(at) >> 4
    ok &= (version == 4) | (version == 6)

    first = _ip(r, at, version)
    outer = first
    current = first
    tunnelled = np.zeros(n, dtype=bool)
    for _ in range(MAX_DECAPSULATIONS):
        nested = ok & ((current.proto == PROTO_IPIP) | (current.proto == PROTO_IPV6)) & current.fits
        payload = current.payload_at
        gre = ok & (current.proto == PROTO_GRE) & current.fits
        if gre.any():
            gre_version_ok, gre_ethertype, gre_at = _gre(r, payload)
            inner_eth = gre & gre_version_ok & (gre_ethertype == ETHERTYPE_TEB)
            if inner_eth.any():
                eth_type, eth_at = _ethernet(r, gre_at)
                gre_ethertype = np.where(inner_eth, eth_type, gre_ethertype)
                gre_at = np.where(inner_eth, eth_at, gre_at)
            gre_ip = (
                gre & gre_version_ok & ((gre_ethertype == ETHERTYPE_IPV4) | (gre_ethertype == ETHERTYPE_IPV6))
            )
            nested |= gre_ip
            payload = np.where(gre_ip, gre_at, payload)
        if not nested.any():
            break
        inner_version = r.u8(payload) >> 4
        nested &= (inner_version == 4) | (inner_version == 6)
        inner = _ip(r, payload, inner_version)
        current = _IP.where(nested, inner, current)
        tunnelled |= nested

    ok &= current.fits
    l4 = current.payload_at
    proto = current.proto
    with_ports = np.isin(proto, PORT_PROTOCOLS) & ~current.later_fragment
    icmp = ((proto == 1) | (proto == 58)) & ~current.later_fragment
    has_ports = ok & ((with_ports & r.fits(l4, 4)) | (icmp & r.fits(l4, 2)))
    src_port = np.where(has_ports & with_ports, r.u16(l4), 0)
    dst_port = np.where(has_ports & with_ports, r.u16(l4 + 2), np.where(has_ports & icmp, r.u16(l4), 0))
    tcp_flags = np.where(ok & (proto == 6) & r.fits(l4, 14) & ~current.later_fragment, r.u8(l4 + 13), 0)
    return Inner(
        ok=ok,
        ip_version=current.version.astype(np.int8),
        src=current.src,
        dst=current.dst,
        proto=proto.astype(np.int16),
        src_port=src_port.astype(np.int32),
        dst_port=dst_port.astype(np.int32),
        tcp_flags=tcp_flags.astype(np.int16),
        has_ports=has_ports,
        tunnelled=tunnelled & ok,
        outer_version=outer.version.astype(np.int8),
        outer_src=outer.src,
        outer_dst=outer.dst,
        outer_proto=outer.proto.astype(np.int16),
        mpls_top_label=mpls_top.astype(np.int32),
        length=np.where(ok, current.length, 0).astype(np.int64),
    )


def _ethernet(r: _Reader, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ethertype after the MAC addresses and up to MAX_VLAN_TAGS 802.1Q/802.1ad tags; offset of what follows."""
    ethertype = r.u16(at + 12)
    at = at + 14
    for _ in range(MAX_VLAN_TAGS):
        tagged = np.isin(ethertype, ETHERTYPE_VLAN)
        if not tagged.any():
            break
        ethertype = np.where(tagged, r.u16(at + 2), ethertype)
        at = np.where(tagged, at + 4, at)
    return ethertype, at


def _mpls(
    r: _Reader, ethertype: np.ndarray, at: np.ndarray, top: np.ndarray, ok: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Step over an MPLS label stack (RFC 3032) to what it carries: IPv4/IPv6 by the first nibble, or a pseudowire
    control word (first nibble 0, RFC 4385) followed by an Ethernet frame (EVPN / EoMPLS)."""
    in_stack = np.isin(ethertype, ETHERTYPE_MPLS)
    if not in_stack.any():
        return ethertype, at, top, ok
    top = np.where(in_stack, r.u32(at) >> 12, top)
    for _ in range(MAX_MPLS_LABELS):
        bottom = (r.u8(at + 2) & 1) == 1
        at = np.where(in_stack, at + 4, at)
        in_stack = in_stack & ~bottom
        if not in_stack.any():
            break
    ok = ok & ~in_stack  # a stack deeper than MAX_MPLS_LABELS (or cut short) is not followed
    was_mpls = np.isin(ethertype, ETHERTYPE_MPLS)
    nibble = r.u8(at) >> 4
    ethertype = np.where(was_mpls & (nibble == 4), ETHERTYPE_IPV4, ethertype)
    ethertype = np.where(was_mpls & (nibble == 6), ETHERTYPE_IPV6, ethertype)
    pseudowire = was_mpls & (nibble == 0)
    if pseudowire.any():
        eth_type, eth_at = _ethernet(r, at + 4)
        ethertype = np.where(pseudowire, eth_type, ethertype)
        at = np.where(pseudowire, eth_at, at)
    return ethertype, at, top, ok


def _gre(r: _Reader, at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GRE (RFC 2784/2890) header: (version 0, protocol type, offset of the payload)."""
    flags = r.u16(at)
    version_ok = (flags & 0x7) == 0
    size = 4 + 4 * ((flags >> 15) & 1) + 4 * ((flags >> 13) & 1) + 4 * ((flags >> 12) & 1)
    return version_ok & r.fits(at, 4), r.u16(at + 2), at + size


@dataclass
class _IP:
    version: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    proto: np.ndarray
    payload_at: np.ndarray
    fits: np.ndarray
    later_fragment: np.ndarray
    length: np.ndarray  # bytes of the packet from this header on (IPv4 total length, IPv6 payload + 40)

    @staticmethod
    def where(mask: np.ndarray, a: _IP, b: _IP) -> _IP:
        m2 = mask[:, None]
        return _IP(
            np.where(mask, a.version, b.version),
            np.where(m2, a.src, b.src),
            np.where(m2, a.dst, b.dst),
            np.where(mask, a.proto, b.proto),
            np.where(mask, a.payload_at, b.payload_at),
            np.where(mask, a.fits, b.fits),
            np.where(mask, a.later_fragment, b.later_fragment),
            np.where(mask, a.length, b.length),
        )


def _ip(r: _Reader, at: np.ndarray, version: np.ndarray) -> _IP:
    """An IPv4 or IPv6 header at `at` (IPv6: extension headers incl. the SRv6 routing header stepped over)."""
    v4 = version == 4
    ihl = (r.u8(at) & 0xF) * 4
    v4_fits = v4 & (ihl >= 20) & r.fits(at, 20)
    v4_fragment = v4 & ((r.u16(at + 6) & 0x1FFF) != 0)
    v6_fits = (version == 6) & r.fits(at, 40)
    proto = np.where(v4, r.u8(at + 9), r.u8(at + 6))
    payload = np.where(v4, at + ihl, at + 40)
    later_fragment = v4_fragment
    v6 = version == 6
    for _ in range(MAX_IPV6_EXTENSIONS):
        extension = v6 & np.isin(proto, IPV6_EXTENSIONS)
        fragment = v6 & (proto == IPV6_FRAGMENT)
        if not (extension.any() or fragment.any()):
            break
        later_fragment = later_fragment | (fragment & ((r.u16(payload + 2) & 0xFFF8) != 0))
        step = np.where(fragment, 8, (r.u8(payload + 1) + 1) * 8)
        moving = extension | fragment
        proto = np.where(moving, r.u8(payload), proto)
        payload = np.where(moving, payload + step, payload)
    src = np.where(v4[:, None], r.take(at + 12, 4), r.take(at + 8, 16))
    dst = np.where(v4[:, None], r.take(at + 16, 4), r.take(at + 24, 16))
    length = np.where(v4, r.u16(at + 2), r.u16(at + 4) + 40)
    return _IP(version, src, dst, proto, payload, v4_fits | v6_fits, later_fragment, length)


@dataclass
class Overlay:
    """What a flow record's columns become once its packet section is read (netflow._decode_group applies it)."""

    use_inner: np.ndarray  # bool: the record's address/port/protocol columns are replaced by the section's
    keep: np.ndarray  # bool: the record has addresses (its own, or from the section)
    src: pa.Array  # text, valid where use_inner
    dst: pa.Array
    ip_version: np.ndarray
    proto: np.ndarray
    src_port: np.ndarray
    dst_port: np.ndarray
    tcp_flags: np.ndarray
    tunnel_src: pa.Array  # text, null unless tunnelled
    tunnel_dst: pa.Array
    tunnel_proto: pa.Array  # int16, null unless tunnelled
    # a record without counters of its own is one sampled packet (Juniper, Huawei): 1 packet of the inner IP
    # packet's length, as akvorado counts it
    sample_packets: np.ndarray
    sample_bytes: np.ndarray


def overlay(section: tuple[str, np.ndarray, np.ndarray], record_has_addresses: bool) -> Overlay:
    """A record keeps its own 5-tuple unless the section shows a tunnel (then the inner conversation is the
    flow and the outer header goes to the tunnel columns) or the record has no addresses of its own (then the
    section's are all there is)."""
    kind, data, length = section
    inner = decode_sections(kind, data, length)
    use_inner = inner.ok & (inner.tunnelled | (not record_has_addresses))
    keep = np.ones(len(use_inner), dtype=bool) if record_has_addresses else inner.ok
    tunnel = use_inner & inner.tunnelled
    return Overlay(
        use_inner=use_inner,
        keep=keep,
        src=address_text(inner.src, inner.ip_version),
        dst=address_text(inner.dst, inner.ip_version),
        ip_version=inner.ip_version,
        proto=inner.proto,
        src_port=inner.src_port,
        dst_port=inner.dst_port,
        tcp_flags=inner.tcp_flags,
        tunnel_src=pc.if_else(pa.array(tunnel), address_text(inner.outer_src, inner.outer_version), None),
        tunnel_dst=pc.if_else(pa.array(tunnel), address_text(inner.outer_dst, inner.outer_version), None),
        tunnel_proto=pa.array(inner.outer_proto, mask=~tunnel),
        sample_packets=inner.ok.astype(np.int64),
        sample_bytes=inner.length,
    )


def address_text(raw: np.ndarray, version: np.ndarray) -> pa.Array:
    """(n, 16) address bytes (IPv4 in the first 4) -> canonical text, formatted once per distinct value."""
    n = raw.shape[0]
    if n == 0:
        return pa.array([], pa.string())
    keyed = np.ascontiguousarray(
        np.concatenate([raw, (version.astype(np.uint8) == 6).astype(np.uint8)[:, None]], axis=1)
    )
    encoded = pc.dictionary_encode(
        pa.FixedSizeBinaryArray.from_buffers(pa.binary(17), n, [None, pa.py_buffer(keyed.tobytes())])
    )
    text = [
        str(ipaddress.IPv6Address(key[:16])) if key[16] else str(ipaddress.IPv4Address(key[:4]))
        for key in encoded.dictionary.to_pylist()
    ]
    return pa.DictionaryArray.from_arrays(encoded.indices, pa.array(text, pa.string())).cast(pa.string())
