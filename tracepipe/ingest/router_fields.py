"""What firewall/NAT routers and SRv6 routers add to a flow record (issue 16): NAT translations, firewall and NAT
events, SRv6 segment lists. In: the structured numpy array of one template's records and its roles (netflow.py
maps field ids to roles in its FIELDS table and reads the bytes); out: Arrow columns of schema.FLOWS
(ROUTER_EXTRA_COLUMNS but the VRF names, which netflow.py looks up in its options tables). `columns` runs once per
template that carries one of ROLES, so a template without them costs nothing; text is formatted once per
distinct value.

Wire facts: RFC 8158 / IANA IPFIX registry (natEvent 230, firewallEvent 233, postNAT* 225-228, 281-282), Cisco
ASA NSEL (v9 ids 40001-40005, 33002 NF_F_FW_EXT_EVENT), RFC 9487 (SRv6: 495 srhActiveSegmentIPv6,
496 srhSegmentIPv6BasicList, 497 srhSegmentIPv6ListSection).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# IANA "firewallEvent" values, as nfdump prints them (`%evt`, NSEL): 0 ignore .. 5 update
FIREWALL_EVENTS = ("IGNORE", "CREATE", "DELETE", "DENIED", "ALERT", "UPDATE")
# IANA "natEvent" values (RFC 8158 §4.1), as nfdump -o json prints them (`nat_event`)
NAT_EVENTS = (
    "0",
    "NAT translation create",  # historic (RFC 8158): what NEL loggers of the RFC 5102 era send
    "NAT translation delete",
    "NAT Addresses exhausted",
    "NAT44 session create",
    "NAT44 session delete",
    "NAT64 session create",
    "NAT64 session delete",
    "NAT44 BIB create",
    "NAT44 BIB delete",
    "NAT64 BIB create",
    "NAT64 BIB delete",
    "NAT ports exhausted",
    "Quota Exceeded",
    "Address binding create",
    "Address binding delete",
    "Port block allocation",
    "Port block de-allocation",
    "Threshold Reached",
)


def _names(known: tuple[str, ...]) -> pa.Array:
    """Text of every one-byte code: the registry's name, else the number (a code the registry added later)."""
    return pa.array([*known, *(str(code) for code in range(len(known), 256))], pa.string())


FIREWALL_EVENT_TEXT = _names(FIREWALL_EVENTS)
NAT_EVENT_TEXT = _names(NAT_EVENTS)

SRV6_SEGMENTS_MAX = 15  # a 254-byte slot holds 15 segments (and a basicList header); SRHs carry fewer
BASIC_LIST_HEADER = 5  # RFC 6313 §4.5.1: semantic (1), field id (2), element length (2)


def event_text(codes: np.ndarray, names: pa.Array) -> pa.Array:
    """One-byte event codes as dictionary-encoded text; a code past 255 (a padded field) is null."""
    codes = codes.astype(np.int64)
    over = codes > 255
    indices = np.minimum(codes, 255).astype(np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(indices, mask=over) if over.any() else indices, names)


def srv6_segments(slot: np.ndarray, basic_list: bool) -> pa.Array:
    """SRv6 segment lists from length-prefixed slots (rows of 2 length bytes + the element's bytes), as text:
    the segments' IPv6 addresses in the order exported (RFC 9487: the SRH's order, Segment List[0] first),
    space-separated; null where the element is empty or not a list of IPv6 addresses. IE 497 is the SRH's list
    as it is on the wire; IE 496 is an RFC 6313 basicList whose element must be IE 494 srhSegmentIPv6 (or 27,
    sourceIPv6Address, 16 bytes) - anything else is not read. Formatted once per distinct list."""
    width = slot.shape[1]
    rows = np.ascontiguousarray(slot).view(f"S{width}").ravel()
    encoded = pc.dictionary_encode(pa.array(rows, pa.binary(width)))  # fixed width: keeps every byte
    texts = []
    for value in encoded.dictionary.to_pylist():
        size = int.from_bytes(value[:2], "big")
        texts.append(_segment_text(value[2 : 2 + size], basic_list))
    return pa.DictionaryArray.from_arrays(encoded.indices, pa.array(texts, pa.string()))


def _segment_text(raw: bytes, basic_list: bool) -> str | None:
    if basic_list:
        if len(raw) < BASIC_LIST_HEADER:
            return None
        element, size = int.from_bytes(raw[1:3], "big"), int.from_bytes(raw[3:5], "big")
        if element & 0x8000 or element not in (494, 27) or size != 16:
            return None
        raw = raw[BASIC_LIST_HEADER:]
    count = min(len(raw) // 16, SRV6_SEGMENTS_MAX)
    if count == 0:
        return None
    return " ".join(str(ipaddress.IPv6Address(raw[i * 16 : i * 16 + 16])) for i in range(count))


# the decoder roles (netflow.FIELDS) this module reads
ROLES = frozenset(
    (
        *("nat_src_addr4", "nat_dst_addr4", "nat_src_addr6", "nat_dst_addr6", "nat_src_port", "nat_dst_port"),
        *("nat_event", "fw_event", "fw_ext_event"),
        *("srv6_active_addr6", "srv6_basic_list", "srv6_list", "srv6_basic_list_slot", "srv6_list_slot"),
        "mpls_vpn_rd",
    )
)


def route_distinguishers(values: np.ndarray, ipv4_text: Callable[[np.ndarray], pa.Array]) -> pa.Array:
    """8-byte route distinguishers (RFC 4364 §4.2: a 2-byte type, then administrator and assigned number) as the
    text routers print: type 0 `65000:100` (2-byte AS : 4-byte number), type 1 `192.0.2.1:7` (IPv4 : 2-byte),
    type 2 `4200000000:42` (4-byte AS : 2-byte); another type `type-T:V` (V the 6-byte value); 0 (no VPN) is
    null. Column-wise: nothing per record, whatever the values."""
    values = values.astype(np.uint64)
    kind = values >> np.uint64(48)
    wide = (values >> np.uint64(16)) & np.uint64(0xFFFFFFFF)  # types 1 and 2: 4-byte administrator
    admin = np.where(kind == 0, (values >> np.uint64(32)) & np.uint64(0xFFFF), wide)
    number = np.where(kind == 0, values & np.uint64(0xFFFFFFFF), values & np.uint64(0xFFFF))
    admin_text = pc.if_else(
        pa.array(kind == 1), ipv4_text(wide).cast(pa.string()), pc.cast(pa.array(admin), pa.string())
    )
    text = pc.binary_join_element_wise(admin_text, pc.cast(pa.array(number), pa.string()), ":")
    other = pc.binary_join_element_wise(
        pc.binary_join_element_wise("type-", pc.cast(pa.array(kind), pa.string()), ""),
        pc.cast(pa.array(values & np.uint64(0xFFFFFFFFFFFF)), pa.string()),
        ":",
    )
    text = pc.if_else(pa.array(kind > 2), other, text)
    return pc.if_else(pa.array(values == 0), pa.scalar(None, pa.string()), text)


def columns(
    arr: np.ndarray,
    roles: dict[str, int],
    uint: Callable[..., np.ndarray | None],
    ipv4_text: Callable[[np.ndarray], pa.Array],
    ipv6_text: Callable[[np.ndarray], pa.Array],
) -> dict[str, pa.Array]:
    """The columns the template carries: post-NAT addresses and ports, NAT and firewall events (Cisco ASA NSEL,
    NEL loggers, PAN-OS, Mikrotik), SRv6 active segment and segment list, MPLS VPN route distinguisher. `uint`, `ipv4_text` and `ipv6_text` are
    the decoder's own readers (any wire length -> integers; addresses -> dictionary-encoded text)."""
    out: dict[str, pa.Array] = {}
    for end in ("nat_src", "nat_dst"):
        v4, v6 = f"{end}_addr4", f"{end}_addr6"
        if v4 in roles and v6 in roles:  # both families in one template: the non-zero IPv4 one, else IPv6
            out[f"{end}_addr"] = pc.if_else(
                pa.array(arr[v4] == 0),
                ipv6_text(arr[v6]).cast(pa.string()),
                ipv4_text(arr[v4]).cast(pa.string()),
            )
        elif v4 in roles:
            out[f"{end}_addr"] = ipv4_text(arr[v4])
        elif v6 in roles:
            out[f"{end}_addr"] = ipv6_text(arr[v6])
    for role in ("nat_src_port", "nat_dst_port", "fw_ext_event"):
        value = uint(arr, role, roles, np.int32)
        if value is not None:
            out[role] = pa.array(value)
    for role, names in (("nat_event", NAT_EVENT_TEXT), ("fw_event", FIREWALL_EVENT_TEXT)):
        if role in roles:
            out[role] = event_text(uint(arr, role, roles), names)
    if roles.get("mpls_vpn_rd") == 8:  # any other length is not a route distinguisher: left null
        out["mpls_vpn_rd"] = route_distinguishers(uint(arr, "mpls_vpn_rd", roles, np.uint64), ipv4_text)
    if "srv6_active_addr6" in roles:
        out["srv6_active_segment"] = ipv6_text(arr["srv6_active_addr6"])
    for role, basic in (
        ("srv6_list_slot", False),
        ("srv6_list", False),
        ("srv6_basic_list_slot", True),
        ("srv6_basic_list", True),
    ):
        if role in roles and "srv6_segments" not in out:
            raw = np.frombuffer(arr[role].tobytes(), np.uint8).reshape(len(arr), roles[role])
            if not role.endswith("_slot"):  # a fixed length: every record's element is that long
                size = np.full((len(arr), 1), roles[role], np.uint16)
                raw = np.concatenate(
                    [(size >> 8).astype(np.uint8), (size & 0xFF).astype(np.uint8), raw], axis=1
                )
            out["srv6_segments"] = srv6_segments(raw, basic)
    return out
