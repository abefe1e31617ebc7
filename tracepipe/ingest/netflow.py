"""NetFlow v1/v5/v7/v9 (RFC 3954) and IPFIX (RFC 7011) export datagrams -> flow records (schema.FLOWS).

In: UDP payloads with the exporter address and arrival time of each. Out: one Arrow table of flows and one of
rejects (what could not be decoded, with its byte offset and why), plus per-exporter counters. Bad input is
never an exception. Templates, sequence numbers, sampling intervals and data still waiting for its template
live in a `DecoderState` that the caller keeps across batches (and that round-trips through JSON).

Speed: the steady state (datagrams holding one data set of a known template) is read with numpy over the headers
of a whole run of datagrams; only templates, options, multi-set datagrams and junk are walked in Python, one
datagram at a time, in input order. All data records that share a template in a batch are joined into one
buffer and read with one structured big-endian numpy dtype. walk_datagrams (stateful) and decode_walked
(stateless columns) are the two halves of decode_datagrams, so that the second can run in another process.
"""

from __future__ import annotations

import base64
import dataclasses
import heapq
import json
import os
import struct
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tracepipe.address_text import addresses, ipv4_text, ipv6_text, is_integers, one_type
from tracepipe.ingest import inner_headers, router_fields
from tracepipe.ingest.decode_pool import InputChanged
from tracepipe.limits import DEFAULT, Limits
from tracepipe.schema import FLOWS, REJECTS, TS, null_column
from tracepipe.units import time_window

# ---- field ids: the one table. id -> (IANA / RFC 3954 name, role in the decoder) ----------------------------
# Roles name what a field becomes: a FLOWS column, a time ingredient, or an options value. Fields not listed
# are skipped (their bytes are stepped over by the record layout).
FIELDS: dict[int, tuple[str, str]] = {
    1: ("octetDeltaCount", "bytes"),
    2: ("packetDeltaCount", "packets"),
    4: ("protocolIdentifier", "proto"),
    6: ("tcpControlBits", "tcp_flags"),
    7: ("sourceTransportPort", "src_port"),
    8: ("sourceIPv4Address", "src_addr4"),
    10: ("ingressInterface", "input_if"),
    11: ("destinationTransportPort", "dst_port"),
    12: ("destinationIPv4Address", "dst_addr4"),
    14: ("egressInterface", "output_if"),
    21: ("flowEndSysUpTime", "end_uptime"),  # v9 LAST_SWITCHED: ms since exporter boot
    22: ("flowStartSysUpTime", "start_uptime"),  # v9 FIRST_SWITCHED
    27: ("sourceIPv6Address", "src_addr6"),
    28: ("destinationIPv6Address", "dst_addr6"),
    32: ("icmpTypeCodeIPv4", "icmp"),  # type*256+code; lands in dst_port as nfdump puts it
    34: ("samplingInterval", "sampling"),  # v9 SAMPLING_INTERVAL (options)
    50: ("samplerRandomInterval", "sampling"),  # v9 FLOW_SAMPLER_RANDOM_INTERVAL (options)
    60: ("ipVersion", "ip_version"),
    5: ("ipClassOfService", "tos"),  # the IPv4 ToS / IPv6 traffic class byte
    85: ("octetTotalCount", "bytes_total"),
    231: ("initiatorOctets", "bytes_initiator"),  # Cisco ASA NSEL: the initiator's bytes, its only volume
    298: ("initiatorPackets", "packets_initiator"),
    86: ("packetTotalCount", "packets_total"),
    139: ("icmpTypeCodeIPv6", "icmp"),
    176: ("icmpTypeIPv4", "icmp_type"),
    177: ("icmpCodeIPv4", "icmp_code"),
    178: ("icmpTypeIPv6", "icmp_type"),
    179: ("icmpCodeIPv6", "icmp_code"),
    150: ("flowStartSeconds", "start_s"),
    151: ("flowEndSeconds", "end_s"),
    152: ("flowStartMilliseconds", "start_ms"),
    153: ("flowEndMilliseconds", "end_ms"),
    154: ("flowStartMicroseconds", "start_ntp"),  # NTP format: seconds since 1900 . fraction
    155: ("flowEndMicroseconds", "end_ntp"),
    156: ("flowStartNanoseconds", "start_ntp"),
    157: ("flowEndNanoseconds", "end_ntp"),
    158: ("flowStartDeltaMicroseconds", "start_delta_us"),  # µs before the message's export time
    159: ("flowEndDeltaMicroseconds", "end_delta_us"),
    160: ("systemInitTimeMilliseconds", "sys_init_ms"),  # unix ms of exporter boot (record or options)
    161: ("flowDurationMilliseconds", "duration_ms"),
    162: ("flowDurationMicroseconds", "duration_us"),
    # when an event was observed (NAT and firewall loggers: Cisco ASA NSEL's NF_F_EVENT_TIME_MSEC is 323): the
    # record's time when it has no start or end of its own (before: the export time, up to its buffering late)
    322: ("observationTimeSeconds", "obs_s"),
    323: ("observationTimeMilliseconds", "obs_ms"),
    324: ("observationTimeMicroseconds", "obs_ntp"),
    325: ("observationTimeNanoseconds", "obs_ntp"),
    305: ("samplingPacketInterval", "sampling_packets"),  # IPFIX: sample N packets ...
    311: ("samplingProbability", "sampling_probability"),  # IPFIX (RFC 5477): float64, interval = 1 / it
    306: ("samplingPacketSpace", "sampling_space"),  # ... then skip M: interval = (N + M) / N
    48: ("samplerId", "sampler_id"),  # v9 FLOW_SAMPLER_ID: which sampler (options: its interval) (issue 16)
    302: ("selectorId", "sampler_id"),  # IPFIX (RFC 5477)
    # issue 16: packet bytes routers export for tunnelled traffic (read by inner_headers.py); a variable-length
    # one is rewritten to a length-prefixed fixed slot under a pseudo id no template can carry (>= 2**16)
    313: ("ipHeaderPacketSection", "ip_header"),
    315: ("dataLinkFrameSection", "frame"),
    inner_headers.SECTION_SLOT_BASE + 313: ("ipHeaderPacketSection (variable length)", "ip_header_slot"),
    inner_headers.SECTION_SLOT_BASE + 315: ("dataLinkFrameSection (variable length)", "frame_slot"),
    # issue 16: what routers say about a flow beyond its 5-tuple (schema.ROUTER_COLUMNS)
    61: ("flowDirection", "flow_direction"),  # 0 ingress, 1 egress
    136: ("flowEndReason", "flow_end_reason"),  # RFC 5102: 1 idle timeout .. 5 lack of resources
    # mplsTopLabelStackSection, mplsLabelStackSection2..10: 3 bytes each, label (20 bits) exp (3) bottom (1)
    **{70 + i: (f"mplsLabelStackSection{i + 1}", f"mpls{i + 1}") for i in range(10)},
    90: ("mplsVpnRouteDistinguisher", "mpls_vpn_rd"),  # 8 bytes, RFC 4364 §4.2 (read by router_fields.py)
    234: ("ingressVRFID", "ingress_vrf"),
    235: ("egressVRFID", "egress_vrf"),
    82: ("interfaceName", "if_name"),  # options data: the name of ifindex IE 10/14 (read by _interface_names)
    83: ("interfaceDescription", "if_description"),
    # issue 16: NAT translations and firewall events (schema.ROUTER_EXTRA_COLUMNS, read by router_fields.py)
    225: ("postNATSourceIPv4Address", "nat_src_addr4"),
    226: ("postNATDestinationIPv4Address", "nat_dst_addr4"),
    281: ("postNATSourceIPv6Address", "nat_src_addr6"),
    282: ("postNATDestinationIPv6Address", "nat_dst_addr6"),
    227: ("postNAPTSourceTransportPort", "nat_src_port"),
    228: ("postNAPTDestinationTransportPort", "nat_dst_port"),
    230: ("natEvent", "nat_event"),
    233: ("firewallEvent", "fw_event"),
    # Cisco ASA NSEL's own v9 ids (older ASA software; in IPFIX an id >= 32768 is an enterprise field instead)
    40001: ("NF_F_XLATE_SRC_ADDR_IPV4", "nat_src_addr4"),
    40002: ("NF_F_XLATE_DST_ADDR_IPV4", "nat_dst_addr4"),
    40003: ("NF_F_XLATE_SRC_PORT", "nat_src_port"),
    40004: ("NF_F_XLATE_DST_PORT", "nat_dst_port"),
    40005: ("NF_F_FW_EVENT", "fw_event"),
    33002: ("NF_F_FW_EXT_EVENT", "fw_ext_event"),  # Cisco's reason code of the event (2025: FIN, ...)
    # SRv6 (RFC 9487): the active segment and the segment list (any length: kept as a slot, like IE 313/315)
    495: ("srhActiveSegmentIPv6", "srv6_active_addr6"),
    496: ("srhSegmentIPv6BasicList", "srv6_basic_list"),
    497: ("srhSegmentIPv6ListSection", "srv6_list"),
    inner_headers.SECTION_SLOT_BASE + 496: (
        "srhSegmentIPv6BasicList (variable length)",
        "srv6_basic_list_slot",
    ),
    inner_headers.SECTION_SLOT_BASE + 497: ("srhSegmentIPv6ListSection (variable length)", "srv6_list_slot"),
    236: ("VRFname", "vrf_name"),  # options data: the name of VRF id IE 234 (read by _interface_names)
}
MPLS_ROLES = tuple(f"mpls{i + 1}" for i in range(10))
# octet strings of any length
TEXT_ROLES = {
    *("if_name", "if_description", "vrf_name"),
    *("srv6_basic_list", "srv6_list", "srv6_basic_list_slot", "srv6_list_slot"),
}
DIRECTIONS = ("ingress", "egress")  # IE 61 codes (RFC 5102)
END_REASONS = ("0", "idleTimeout", "activeTimeout", "endOfFlowDetected", "forcedEnd", "lackOfResources")
IF_NAME_CHARS = 128
VRF_NAME_KEY = 1 << 32  # the names table keys a VRF's name by VRF_NAME_KEY + VRF id (ifindex < 2**32)
# the samplers table keys an interface's sampling interval (options scoped to ingressInterface, IPFIX IE 10, or to
# v9 scope type 2 "Interface") by IF_SAMPLING_KEY + ifindex, apart from sampler ids
IF_SAMPLING_KEY = 1 << 62
ADDRESS_ROLES = {"src_addr4", "dst_addr4", "src_addr6", "dst_addr6"}
# roles whose wire length must be an address's: 4 or 16 bytes, else the field is skipped
ADDRESS_LENGTHS = {
    **{f"{end}_addr4": 4 for end in ("src", "dst", "nat_src", "nat_dst")},
    **{f"{end}_addr6": 16 for end in ("src", "dst", "nat_src", "nat_dst", "srv6_active")},
}
# variable-length elements kept as length-prefixed slots (issue 16): packet sections, SRv6 segment lists
SLOTTED_IDS = (313, 315, 496, 497)
VARIABLE_LENGTH = 65535
ENTERPRISE_BIT = 0x8000
NTP_UNIX_OFFSET_S = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
WRAP = 1 << 32  # sysUptime is a 32-bit ms counter: wraps after 49.7 days
MAX_TIME_MS = 4_102_444_800_000  # 2100-01-01: flow times beyond are garbage

# v1/v5/v7 fixed layouts (header length, record length, max records, record fields as (role, offset, dtype))
_V157_COMMON = [
    ("src_addr4", 0, ">u4"),
    ("dst_addr4", 4, ">u4"),
    ("input_if", 12, ">u2"),
    ("output_if", 14, ">u2"),
    ("packets", 16, ">u4"),
    ("bytes", 20, ">u4"),
    ("start_uptime", 24, ">u4"),
    ("end_uptime", 28, ">u4"),
    ("src_port", 32, ">u2"),
    ("dst_port", 34, ">u2"),
]
FIXED_LAYOUTS: dict[int, tuple[int, int, list[tuple[str, int, str]]]] = {
    1: (16, 48, [*_V157_COMMON, ("proto", 38, "u1"), ("tos", 39, "u1"), ("tcp_flags", 40, "u1")]),
    5: (24, 48, [*_V157_COMMON, ("tcp_flags", 37, "u1"), ("proto", 38, "u1"), ("tos", 39, "u1")]),
    7: (24, 52, [*_V157_COMMON, ("tcp_flags", 37, "u1"), ("proto", 38, "u1"), ("tos", 39, "u1")]),
}


# ---- templates --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Template:
    """One v9/IPFIX template: (field id, length, enterprise number) in wire order."""

    fields: list[tuple[int, int, int]]
    options: bool = False
    scope_count: int = 0
    version: int = 9
    record_len: int = 0  # 0 when a field has variable length
    dtype: np.dtype | None = None  # structured dtype over the roles this decoder uses
    roles: dict[str, int] = field(default_factory=dict)  # role -> byte length on the wire
    enterprise_fields: int = 0
    variable_fields: int = 0
    min_record_len: int = 0  # bytes of one record at least (variable-length fields counted as 1)

    @classmethod
    def build(
        cls, fields: list[tuple[int, int, int]], options: bool = False, scope_count: int = 0, version: int = 9
    ) -> Template:
        tpl = cls(fields=fields, options=options, scope_count=scope_count, version=version)
        tpl.enterprise_fields = sum(1 for _, _, pen in fields if pen)
        tpl.variable_fields = sum(1 for _, length, _ in fields if length == VARIABLE_LENGTH)
        tpl.min_record_len = sum(length if length != VARIABLE_LENGTH else 1 for _, length, _ in fields)
        if tpl.variable_fields == 0:
            tpl.record_len = sum(length for _, length, _ in fields)
            tpl.dtype, tpl.roles = _layout(fields)
        return tpl

    def fixed_projection(self) -> Template:
        """The same template without its variable-length fields (records are rewritten to it)."""
        return Template.build(
            _projected_fields(self.fields),
            self.options,
            self.scope_count,
            self.version,
        )

    def to_obj(self) -> dict[str, Any]:
        return {
            "fields": self.fields,
            "options": self.options,
            "scope": self.scope_count,
            "version": self.version,
        }

    @classmethod
    def from_obj(cls, obj: dict[str, Any], limits: Limits = DEFAULT) -> Template:
        """A template saved by to_obj; ValueError/TypeError for anything else (checked before it is built)."""
        fields = obj["fields"]
        if not isinstance(fields, list) or len(fields) > limits.fields_per_template:
            raise ValueError("template fields: not a list, or too many")
        checked = []
        for f in fields:
            field_id, length, pen = f
            if not all(isinstance(x, int) for x in f) or not (
                0 <= field_id < 2**16 and 0 <= length < 2**16 and 0 <= pen < 2**32
            ):
                raise ValueError(f"template field {f!r}")
            checked.append((field_id, length, pen))
        version, scope = obj["version"], obj["scope"]
        if version not in (9, 10) or not isinstance(scope, int) or not 0 <= scope <= len(checked):
            raise ValueError("template version or scope")
        return cls.build(checked, bool(obj["options"]), scope, version)


def _projected_fields(fields: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Fixed-length fields, and packet sections as slots; other variable-length fields are skipped."""
    return [_section_slot(f) for f in fields if f[1] != VARIABLE_LENGTH or _section_slot(f) != f]


def _section_slot(f: tuple[int, int, int]) -> tuple[int, int, int]:
    """A variable-length packet section (IE 313/315) or SRv6 segment list (496/497) as its fixed,
    length-prefixed slot (issue 16)."""
    field_id, length, pen = f
    if length == VARIABLE_LENGTH and not pen and field_id in SLOTTED_IDS:
        return (inner_headers.SECTION_SLOT_BASE + field_id, inner_headers.SECTION_SLOT_BYTES, 0)
    return f


_INTERNED: dict[tuple, Template] = {}
_INTERNED_MAX = 4096  # a template flood must not grow memory without bound


def _intern(tpl: Template) -> Template:
    """One Template object per distinct layout (fields, options, scope, version), across exporters."""
    key = (tuple(tpl.fields), tpl.options, tpl.scope_count, tpl.version)
    found = _INTERNED.get(key)
    if found is not None:
        return found
    if len(_INTERNED) >= _INTERNED_MAX:
        _INTERNED.clear()
    _INTERNED[key] = tpl
    return tpl


_NUMERIC = {1: "u1", 2: ">u2", 4: ">u4", 8: ">u8"}


def _layout(fields: list[tuple[int, int, int]]) -> tuple[np.dtype, dict[str, int]]:
    """Structured dtype naming the fields this decoder uses (first occurrence of each role wins)."""
    names, formats, offsets, roles = [], [], [], {}
    offset = 0
    for field_id, length, pen in fields:
        info = FIELDS.get(field_id) if not pen else None
        if info is not None and info[1] not in roles and length > 0:
            role = info[1]
            usable = ADDRESS_LENGTHS.get(role)
            if (
                length == usable
                or (usable is None and length <= 8)
                or role in inner_headers.SECTION_ROLES  # packet bytes: any length (issue 16)
                or role in TEXT_ROLES
            ):  # else: not what the id promises, skipped
                roles[role] = length
                names.append(role)
                formats.append(_NUMERIC.get(length, f"V{length}"))
                offsets.append(offset)
        offset += length
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": max(offset, 1)})
    return dtype, roles


def _fixed_template(version: int) -> Template:
    _, record_len, layout = FIXED_LAYOUTS[version]
    tpl = Template(fields=[], version=version, record_len=record_len)
    tpl.dtype = np.dtype(
        {
            "names": [r for r, _, _ in layout],
            "formats": [d for _, _, d in layout],
            "offsets": [o for _, o, _ in layout],
            "itemsize": record_len,
        }
    )
    tpl.roles = {r: np.dtype(d).itemsize for r, _, d in layout}
    return tpl


FIXED_TEMPLATES = {v: _fixed_template(v) for v in FIXED_LAYOUTS}


# ---- state ------------------------------------------------------------------------------------------------
@dataclass
class _Sequence:
    expected: int | None = None
    missing: list[list[int]] = field(
        default_factory=list
    )  # open gaps [start, end) still hoped for (reordering)
    # IPFIX only: how this exporter counts, learnt from two messages in a row. RFC 7011 numbers a message by
    # the data records sent *before* it, options records included; softflowd numbers it by the records sent
    # up to and including it, options records left out.
    locked: bool = False
    after: bool = False
    with_options: bool = False
    last: list[int] | None = None  # sequence, data records, all records of the previous message

    def to_obj(self) -> list:
        return [self.expected, self.missing, self.locked, self.after, self.with_options, self.last]

    @classmethod
    def from_obj(cls, obj: list) -> _Sequence:
        """A tracker saved by to_obj; ValueError/TypeError for anything else."""
        expected, missing, locked, after, with_options, last = obj
        if expected is not None and not isinstance(expected, int):
            raise TypeError("sequence expected")
        gaps = [[int(a) % WRAP, int(b) % WRAP] for a, b in missing[-64:]]
        if last is not None:
            last = [int(x) for x in last]
            if len(last) != 3:
                raise ValueError("sequence last")
        return cls(expected, gaps, bool(locked), bool(after), bool(with_options), last)


class _Standing:
    """Keys in least-recently-used order, in two tiers: `fresh` ones (that never carried flow data) are given up
    before `live` ones. A flood of templates or exporters that send no flows so only ever evicts its own kind;
    what an exporter uses every batch stays at the recent end."""

    def __init__(self) -> None:
        self.fresh: OrderedDict[Hashable, None] = OrderedDict()
        self.live: OrderedDict[Hashable, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.fresh) + len(self.live)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.fresh or key in self.live

    def __iter__(self):  # fresh first, each tier oldest first
        yield from list(self.fresh)
        yield from list(self.live)

    def touch(self, key: Hashable, live: bool = False) -> None:
        if key in self.live:
            self.live.move_to_end(key)
        elif live:
            self.fresh.pop(key, None)
            self.live[key] = None
        elif key in self.fresh:
            self.fresh.move_to_end(key)
        else:
            self.fresh[key] = None

    def discard(self, key: Hashable) -> None:
        self.fresh.pop(key, None)
        self.live.pop(key, None)

    def victim(self) -> Hashable | None:
        """The key to give up first: the oldest fresh one, else the oldest live one."""
        for tier in (self.fresh, self.live):
            if tier:
                return next(iter(tier))
        return None


class _PerExporter(dict):
    """A table of options values keyed (exporter, domain, id) -> value (sampler intervals, interface names):
    at most `own` entries an exporter and `total` in all; when all are taken, the oldest entry of the exporter
    holding the most makes room. A review found one sender's 65,536 sampler-table rows took every place (a
    global cap of first come): another exporter's own rows were refused and its flows got the wrong interval."""

    def __init__(self, own: int, total: int) -> None:
        super().__init__()
        self.own, self.total = own, total
        self.of: dict[str, dict[tuple, None]] = {}  # exporter -> its keys, oldest first
        # (exporter, domain) -> its keys: a sender cycling its source ids forgets a domain per datagram, and
        # walking all its keys for each (4,096 interface names) cost ~120 us a datagram (a review)
        self.in_domain: dict[tuple[str, int], dict[tuple, None]] = {}

    def __setitem__(self, key: tuple, value: Any) -> None:  # keeps the indices (a review: tests assigned)
        self.put(key, value)

    def put(self, key: tuple, value: Any) -> bool:
        """Set key to value within the bounds; False when the exporter's own share is full."""
        if key in self:
            dict.__setitem__(self, key, value)
            return True
        keys = self.of.get(key[0])
        if keys is not None and len(keys) >= self.own:
            return False
        if len(self) >= self.total:
            largest = max(self.of, key=lambda e: len(self.of[e]))
            self.drop(next(iter(self.of[largest])))
            keys = self.of.get(key[0])
        dict.__setitem__(self, key, value)
        (keys if keys is not None else self.of.setdefault(key[0], {}))[key] = None
        self.in_domain.setdefault(key[:2], {})[key] = None
        return True

    def drop(self, key: tuple) -> None:
        dict.pop(self, key, None)
        for index, group in ((self.of, key[0]), (self.in_domain, key[:2])):
            keys = index.get(group)
            if keys is not None:
                keys.pop(key, None)
                if not keys:
                    del index[group]

    def drop_domain(self, exporter: str, domain: int) -> None:
        for key in list(self.in_domain.get((exporter, domain), ())):
            self.drop(key)

    def of_exporters(self, exporters: Iterable[str]) -> dict[tuple, Any]:
        """The entries of these exporters (a plain dict)."""
        return {k: self[k] for e in exporters for k in self.of.get(e, ())}


# Decode attempts per input when the decoder raises (Isolation), each after a copy of the decoder state (~0.35 s
# for a state at its 4,096-exporter limit, milliseconds for a site's few routers): one failing datagram among
# 20,000 takes ~30; past the budget a piece that raises is set aside whole instead of halved again, so an input of
# datagrams that all raise costs about this many attempts, not two per datagram.
ISOLATE_MAX_ATTEMPTS = 256


class Isolation:
    """Decoding again, piece by piece, datagrams on which the decoder raised (a bug; none known, the fuzz
    benchmark finds none): the collector's segments and `ingest netflow`'s captures use it after a first
    attempt failed, so that such a datagram costs itself, not everything decoded with it. decode() runs a
    decode function over a batch's datagrams with the state copied before each piece and put back when the
    piece raises; a piece that raised is decoded again in halves, down to single datagrams, which go to
    `failures` with their exception (past `max_attempts` over the whole input, a failing piece goes there
    whole). Exceptions of `passthrough` (the lake's, the input changing) are not the decoder's: raised."""

    def __init__(
        self, passthrough: tuple[type[BaseException], ...] = (), max_attempts: int = ISOLATE_MAX_ATTEMPTS
    ) -> None:
        self.passthrough = passthrough
        self.max_attempts = max_attempts
        self.attempts = 0
        self.failures: list[
            tuple[slice, BaseException]
        ] = []  # of the last decode() call: the caller's to take

    def decode(self, decode: Callable[[slice], Any], count: int, state: DecoderState) -> list[Any]:
        """decode(part) over datagrams [0, count) in input order; returns what decoded, in order."""
        import copy

        done: list[Any] = []
        todo = [slice(0, count)]
        while todo:
            part = todo.pop()
            saved = copy.deepcopy(state)
            self.attempts += 1
            try:
                done.append(decode(part))
                continue
            except self.passthrough:
                raise
            except Exception as exc:
                state.__dict__.clear()  # back to the copy, in place: the caller holds the object
                state.__dict__.update(saved.__dict__)
                n = part.stop - part.start
                if n == 1 or self.attempts >= self.max_attempts:
                    self.failures.append((part, exc))
                    continue
            mid = part.start + n // 2
            todo += [slice(mid, part.stop), slice(part.start, mid)]  # the first half next: input order kept
        return done

    def rejects(
        self, exporters: Sequence[str], offsets: np.ndarray, lengths: Sequence[int], where: str
    ) -> pa.Table:
        """One reject row per failure of the last decode() (exporter, offset of the piece's first datagram, the
        exception; `where`: what the detail says became of the datagrams), the failures cleared."""
        rows: dict[str, list[Any]] = {"exporter": [], "offset": [], "reason": [], "detail": []}
        for part, exc in self.failures:
            n = part.stop - part.start
            first = f"datagram of {lengths[part.start]} bytes" if n == 1 else f"{n} datagrams from here on"
            rows["exporter"].append(str(exporters[part.start]))
            rows["offset"].append(int(offsets[part.start]))
            rows["reason"].append("decoder error")
            rows["detail"].append(f"{first} not decoded ({type(exc).__name__}: {exc}"[:400] + f"); {where}")
        self.failures = []
        return pa.table(
            {
                "exporter": pa.array(rows["exporter"], pa.string()),
                "offset": pa.array(rows["offset"], pa.int64()),
                "reason": pa.array(rows["reason"], pa.string()),
                "detail": pa.array(rows["detail"], pa.string()),
            }
        )


class DecoderState:
    """What a decoder remembers between batches: templates per (exporter, version, domain, template id), the
    next expected sequence number per (exporter, version, domain), sampling interval and boot time per
    (exporter, domain) from options data, and data flowsets still waiting for their template.

    Everything here is chosen by whoever sends datagrams, so all of it is bounded by `limits` (tracepipe/limits.py):
    exporters, domains per exporter, templates per domain and in total, waiting data. When a bound is reached
    the least recently used entry of the same scope makes room, templates and exporters that never delivered
    flows first; an exporter that delivered flows within `exporter_idle_s` is never evicted (a newcomer is
    refused instead). Each hit is counted in `limits_hit` and in the batch's per-exporter stats."""

    def __init__(self, limits: Limits = DEFAULT) -> None:
        self.limits = limits
        self.templates: dict[tuple[str, int, int, int], Template] = {}
        self.sequences: dict[tuple[str, int, int], _Sequence] = {}
        self.sampling: dict[tuple[str, int], int] = {}
        self.sys_init_ms: dict[tuple[str, int], int] = {}
        # (exporter, domain, sampler id) -> interval, from sampler tables in options data (issue 16)
        self.samplers = _PerExporter(256, limits.exporters * 16)
        # (exporter, domain, ifindex) -> interface name, from interface tables in options data, and
        # (exporter, domain, VRF_NAME_KEY + VRF id) -> VRF name, from VRF tables (issue 16)
        self.if_names = _PerExporter(4096, limits.exporters * 16)
        # (exporter, version, domain, template id) -> [(flowset body, ctx values, offset)]
        self.pending: dict[tuple[str, int, int, int], list[tuple[bytes, tuple, int]]] = {}
        self.pending_count = 0
        self.pending_bytes = 0
        self.pending_of: Counter[str] = Counter()  # exporter -> its data sets waiting (none: no entry)
        self.pending_bytes_of: Counter[str] = Counter()
        self.pending_keys_of: dict[str, dict[tuple[str, int, int, int], None]] = {}  # oldest first
        # IPFIX templates the exporter withdrew and has not defined again: their data is no one's to wait for
        # (at most limits.templates_total, oldest forgotten first)
        self.withdrawn: dict[tuple[str, int, int, int], None] = {}
        # bookkeeping of the bounds
        self.exporters = _Standing()  # exporter names
        self.last_seen_ms: dict[str, int] = {}  # arrival of an exporter's latest datagram
        self.first_seen_ms: dict[str, int] = {}  # ... and of its first one (kept since)
        # exporters not heard over exporter_settle_s yet, first seen first: where a newcomer finds a place when
        # every place is taken by live ones (a walk over all live exporters per datagram cost ~1 ms: a review)
        self.unsettled: dict[str, None] = {}
        self.domains: dict[str, _Standing] = {}  # exporter -> (version, domain)
        self.domain_templates: dict[tuple[str, int, int], _Standing] = {}  # -> data template ids
        self.domain_options: dict[tuple[str, int, int], _Standing] = {}  # -> options template ids
        self.all_templates = _Standing()  # (exporter, version, domain, template id)
        self.fields_total = 0  # fields of all templates kept (what their memory grows with)
        self.exporter_templates: dict[str, _Standing] = {}  # exporter -> its template keys
        self.exporter_fields: Counter[str] = Counter()  # exporter -> fields of its templates kept
        self.now_ms = 0  # latest arrival seen
        self.limits_hit: Counter[str] = Counter()  # since this state was made, per limit name

    # -- bounds --
    def admit_domain(self, exporter: str, version: int, domain: int) -> tuple[list[str], str | None]:
        """Make room for state of (exporter, version, domain). Returns (limits whose entries were evicted for
        it, the limit that refused it or None)."""
        evicted: list[str] = []
        domains = self.domains.get(exporter)
        if domains is None:
            if len(self.exporters) >= self.limits.exporters:
                victim = self.exporters.victim()
                if victim in self.exporters.live and self._recent(victim):
                    # every place is taken by exporters that delivered flows lately: one heard for less than
                    # exporter_settle_s gives its place (a review: 4,096 spoofed senders of one datagram each
                    # locked every new exporter out for an hour); settled ones are never evicted while heard
                    victim = next((e for e in self.unsettled if e in self.exporters.live), None)
                    if victim is None:
                        return evicted, "exporters"
                self.forget_exporter(victim)
                evicted.append("exporters")
            domains = self.domains[exporter] = _Standing()
            self.exporters.touch(exporter)
        if (version, domain) not in domains:
            if len(domains) >= self.limits.domains_per_exporter:
                old_version, old_domain = domains.victim()
                self.forget_domain(exporter, old_version, old_domain)
                evicted.append("domains_per_exporter")
            domains.touch((version, domain))
        return evicted, None

    def _recent(self, exporter: str) -> bool:
        return self.now_ms - self.last_seen_ms.get(exporter, 0) < self.limits.exporter_idle_s * 1000

    def _settled(self, exporter: str) -> bool:
        """Heard over at least exporter_settle_s (an exporter of a state saved before this was kept: settled)."""
        first = self.first_seen_ms.get(exporter, 0)
        return self.last_seen_ms.get(exporter, 0) - first >= self.limits.exporter_settle_s * 1000

    def add_template(self, key: tuple[str, int, int, int], tpl: Template) -> tuple[list[str], str | None]:
        """Store a template (new, refreshed or redefined) within the bounds: (limits evicted for it, the limit
        that refused it or None)."""
        lim = self.limits
        if len(tpl.fields) > lim.fields_per_template:
            return [], "fields_per_template"
        if tpl.min_record_len > lim.template_record_bytes:
            return [], "template_record_bytes"
        exporter, version, domain, tid = key
        self.withdrawn.pop(key, None)
        evicted, refused = self.admit_domain(exporter, version, domain)
        if refused:
            return evicted, refused
        scope = key[:3]
        old = self.templates.get(key)
        if old is not None and old.options != tpl.options:
            self.forget_template(key)
        standings = self.domain_options if tpl.options else self.domain_templates
        standing = standings.get(scope)
        if standing is None:
            standing = standings[scope] = _Standing()
        if tid not in standing:
            cap, name = (
                (lim.options_templates_per_domain, "options_templates_per_domain")
                if tpl.options
                else (lim.templates_per_domain, "templates_per_domain")
            )
            if len(standing) >= cap:
                self.forget_template((*scope, standing.victim()))
                evicted.append(name)
            if len(self.all_templates) >= lim.templates_total:
                victim = self._fair_victim(
                    lambda e: len(self.exporter_templates.get(e, ())), len(self.all_templates), key
                )
                if victim is not None:
                    self.forget_template(victim)
                evicted.append("templates_total")
        old = self.templates.get(key)
        self.fields_total -= len(old.fields) if old is not None else 0
        self.exporter_fields[exporter] -= len(old.fields) if old is not None else 0
        own = self.exporter_templates.setdefault(exporter, _Standing())
        # first within the exporter's own share (so that one exporter's flood evicts its own templates, not
        # other exporters'), then within the total: from the exporter holding the most fields
        while self.exporter_fields[exporter] + len(tpl.fields) > lim.template_fields_per_exporter and len(
            own
        ):
            victim = own.victim()
            if victim == key:  # itself the oldest: make it the newest, give up the next
                own.touch(key)
                if len(own) == 1:
                    break
                continue
            self.forget_template(victim)
            evicted.append("template_fields_per_exporter")
        while self.fields_total + len(tpl.fields) > lim.template_fields_total:
            victim = self._fair_victim(self.exporter_fields.__getitem__, self.fields_total, key)
            if victim is None:
                break
            self.forget_template(victim)
            evicted.append("template_fields_total")
        standing.touch(tid)
        self.all_templates.touch(key)
        # (the loops may have evicted the exporter's last other template, and forget_template dropped its
        # standing: this one is the exporter's again)
        self.exporter_templates[exporter] = own
        own.touch(key)
        self.domains[exporter].touch((version, domain))
        self.exporters.touch(exporter)
        self.templates[key] = tpl
        self.fields_total += len(tpl.fields)
        self.exporter_fields[exporter] += len(tpl.fields)
        return evicted, None

    def _fair_victim(
        self, share: Callable[[str], int], total: int, keep: tuple[str, int, int, int]
    ) -> tuple[str, int, int, int] | None:
        """The template to give up when a bound of all exporters together is reached: the least recently used
        (never-used first) of the exporter holding the most by `share`, never `keep`. A review found five
        spoofed sender addresses filling the total evicted a router's live template, by least recent use over
        all exporters: its flows were "no template" until its next refresh. Now a flood evicts its own."""
        # the exporter adding holds its fair share or more (a flood's sender, nearly always): its own oldest,
        # without ranking every exporter (a review: ranking 4,096 exporters per template a flood sends cost 1-2 ms
        # each, 400-1,146 templates a second)
        own = self.exporter_templates.get(keep[0])
        if own is not None and len(own) > 1 and share(keep[0]) * len(self.exporter_templates) >= total:
            victim = own.victim()
            if victim != keep:
                return victim
        for exporter in heapq.nlargest(2, self.exporter_templates, key=share):
            standing = self.exporter_templates[exporter]
            victim = standing.victim()
            if victim != keep:
                return victim
            for victim in standing:  # `keep` is the oldest: the next one
                if victim != keep:
                    return victim
        return None

    def used(self, key: tuple[str, int, int, int]) -> None:
        """A template carried flow data (or options values): it and its exporter become live, most recent."""
        exporter, version, domain, tid = key
        self.all_templates.touch(key, live=True)
        own = self.exporter_templates.get(exporter)
        if own is not None and key in own:
            own.touch(key, live=True)
        standing = self.domain_templates.get(key[:3]) or self.domain_options.get(key[:3])
        if standing is not None:
            standing.touch(tid, live=True)
        domains = self.domains.get(exporter)
        if domains is not None:
            domains.touch((version, domain), live=True)
            self.exporters.touch(exporter, live=True)

    def forget_template(self, key: tuple[str, int, int, int]) -> None:
        old = self.templates.pop(key, None)
        self.fields_total -= len(old.fields) if old is not None else 0
        self.all_templates.discard(key)
        own = self.exporter_templates.get(key[0])
        if own is not None:
            own.discard(key)
            if old is not None:
                self.exporter_fields[key[0]] -= len(old.fields)
            if not own:
                del self.exporter_templates[key[0]]
                self.exporter_fields.pop(key[0], None)
        for standings in (self.domain_templates, self.domain_options):
            standing = standings.get(key[:3])
            if standing is not None:
                standing.discard(key[3])

    def forget_domain(self, exporter: str, version: int, domain: int) -> None:
        scope = (exporter, version, domain)
        for standings in (self.domain_templates, self.domain_options):
            for tid in standings.pop(scope, _Standing()):
                self.forget_template((*scope, tid))
        self.sequences.pop(scope, None)
        for key in [k for k in self.pending_keys_of.get(exporter, ()) if k[:3] == scope]:
            self._unkeep(key)  # an exporter's data no template of it will come for
        domains = self.domains.get(exporter)
        if domains is not None:
            domains.discard((version, domain))
            if not any(d == domain for _, d in domains):
                self.sampling.pop((exporter, domain), None)
                self.sys_init_ms.pop((exporter, domain), None)
                self.samplers.drop_domain(exporter, domain)
                self.if_names.drop_domain(exporter, domain)

    def forget_exporter(self, exporter: str) -> None:
        for version, domain in self.domains.get(exporter, _Standing()):
            self.forget_domain(exporter, version, domain)
        self.domains.pop(exporter, None)
        self.exporters.discard(exporter)
        self.last_seen_ms.pop(exporter, None)
        self.first_seen_ms.pop(exporter, None)
        self.unsettled.pop(exporter, None)
        for key in list(self.pending_keys_of.get(exporter, ())):
            self._unkeep(key)

    # -- data sets waiting for their template --
    def keep_pending(
        self, key: tuple[str, int, int, int], entry: tuple[bytes, tuple, int]
    ) -> tuple[str | None, list[tuple[tuple[str, int, int, int], tuple[bytes, tuple, int]]]]:
        """Keep a data set (body, context values, offset) until template `key` arrives, within the bounds: one
        exporter holds at most a quarter of limits.pending_flowsets and pending_bytes (its flood refuses its own
        newcomers), and when all are taken the oldest of the exporter holding the most makes room. A review
        found 24,000 empty sets from one sender (two datagrams) took every place for good: another exporter's
        data that came before its template was then rejected, never kept. Returns (the limit that refused it or
        None, the [(key, entry)] given up to make room: the caller rejects them)."""
        exporter, size, lim = key[0], len(entry[0]), self.limits
        if self.pending_of[exporter] >= max(1, lim.pending_flowsets // 4):
            return "pending_flowsets", []
        if self.pending_bytes_of[exporter] + size > lim.pending_bytes // 4:
            return "pending_bytes", []
        given_up = []
        while self.pending and (
            self.pending_count >= lim.pending_flowsets or self.pending_bytes + size > lim.pending_bytes
        ):
            largest = max(self.pending_of, key=self.pending_of.__getitem__)
            oldest = next(iter(self.pending_keys_of[largest]))
            given_up.append((oldest, self._unkeep(oldest, 1)[0]))
        self.pending.setdefault(key, []).append(entry)
        self.pending_keys_of.setdefault(exporter, {})[key] = None
        self.pending_count += 1
        self.pending_bytes += size
        self.pending_of[exporter] += 1
        self.pending_bytes_of[exporter] += size
        return None, given_up

    def _unkeep(
        self, key: tuple[str, int, int, int], count: int | None = None
    ) -> list[tuple[bytes, tuple, int]]:
        """Take the first `count` (None: all) data sets waiting for `key` out of the state."""
        waiting = self.pending.get(key, [])
        taken, rest = (waiting, []) if count is None else (waiting[:count], waiting[count:])
        exporter = key[0]
        if rest:
            self.pending[key] = rest
        else:
            self.pending.pop(key, None)
            keys = self.pending_keys_of.get(exporter)
            if keys is not None:
                keys.pop(key, None)
                if not keys:
                    del self.pending_keys_of[exporter]
        size = sum(len(body) for body, _, _ in taken)
        self.pending_count -= len(taken)
        self.pending_bytes -= size
        self.pending_of[exporter] -= len(taken)
        self.pending_bytes_of[exporter] -= size
        if self.pending_of[exporter] <= 0:
            del self.pending_of[exporter]
            self.pending_bytes_of.pop(exporter, None)
        return taken

    def take_pending(self, key: tuple[str, int, int, int]) -> list[tuple[bytes, tuple, int]]:
        """Every data set waiting for template `key`, out of the state (its template came)."""
        return self._unkeep(key) if key in self.pending else []

    def clear_pending(self) -> None:
        self.pending.clear()
        self.pending_count = self.pending_bytes = 0
        self.pending_of.clear()
        self.pending_bytes_of.clear()
        self.pending_keys_of.clear()

    # -- persistence --
    def to_json(self) -> str:
        def key(k: tuple) -> str:
            return "|".join(str(x) for x in k)

        order = list(self.all_templates)  # least recently used first: a load replays them in that order
        return json.dumps(
            {
                "templates": {key(k): self.templates[k].to_obj() for k in order if k in self.templates},
                "live_templates": [key(k) for k in self.all_templates.live],
                "live_exporters": list(self.exporters.live),
                "last_seen_ms": self.last_seen_ms,
                "first_seen_ms": self.first_seen_ms,
                "sequences": {key(k): s.to_obj() for k, s in self.sequences.items()},
                "sampling": {key(k): v for k, v in self.sampling.items()},
                "sys_init_ms": {key(k): v for k, v in self.sys_init_ms.items()},
                "samplers": {key(k): v for k, v in self.samplers.items()},
                "if_names": {key(k): v for k, v in self.if_names.items()},
                "pending": {
                    key(k): [[base64.b64encode(b).decode(), list(c), o] for b, c, o in v]
                    for k, v in self.pending.items()
                },
            }
        )

    @classmethod
    def from_json(cls, text: str, limits: Limits = DEFAULT) -> DecoderState:
        """A state saved by to_json, loaded within `limits` (the same bounds as a live decoder: a file
        planted or grown elsewhere cannot make this state larger). Entries that do not parse are dropped and
        counted in `limits_hit["decoder_state_entries"]`; text that is no JSON object raises ValueError."""

        def key(k: str, ints: int, last_bound: int = 2**32) -> tuple:
            parts = k.split("|")
            head = "|".join(parts[: len(parts) - ints])  # exporter text never holds "|", but be safe
            tail = tuple(int(x) for x in parts[len(parts) - ints :])
            bounds = [2**32] * (ints - 1) + [last_bound]
            if len(tail) != ints or any(not 0 <= x < b for x, b in zip(tail, bounds, strict=False)):
                raise ValueError(f"bad key {k[:100]!r}")
            return (head, *tail)

        try:
            obj = json.loads(text)
        except RecursionError:
            raise ValueError("decoder state nested too deep") from None
        if not isinstance(obj, dict):
            raise ValueError("decoder state is no JSON object")
        state = cls(limits)
        bad = 0

        def entries(name: str) -> list:
            section = obj.get(name, {})
            return list(section.items()) if isinstance(section, dict) else []

        live_templates = set(obj.get("live_templates", []) or [])
        live_exporters = set(obj.get("live_exporters", []) or [])
        for k, v in entries("last_seen_ms"):
            if isinstance(v, int) and len(state.last_seen_ms) < limits.exporters:
                state.last_seen_ms[k] = v
        for k, v in entries("first_seen_ms"):
            if isinstance(v, int) and k in state.last_seen_ms:
                state.first_seen_ms[k] = v
        state.unsettled = {e: None for e in state.first_seen_ms if not state._settled(e)}
        state.now_ms = max(state.last_seen_ms.values(), default=0)
        for k, v in entries("templates"):
            try:
                tkey = key(k, 3)
                tpl = _intern(Template.from_obj(v, limits))
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                bad += 1
                continue
            evicted, refused = state.add_template(tkey, tpl)
            for name in [*evicted, *([refused] if refused else [])]:
                state.limits_hit[name] += 1
            if not refused and k in live_templates:
                state.used(tkey)
        for exporter in live_exporters:
            if exporter in state.exporters:
                state.exporters.touch(exporter, live=True)
        for k, v in entries("sequences"):
            try:
                skey = key(k, 2)
                track = _Sequence.from_obj(v)
            except (ValueError, TypeError):
                bad += 1
                continue
            if state.admit_domain(*skey)[1] is None:
                state.sequences[skey] = track
        for name, target in (("sampling", state.sampling), ("sys_init_ms", state.sys_init_ms)):
            for k, v in entries(name):
                try:
                    exporter, domain = key(k, 1)
                except ValueError:
                    bad += 1
                    continue
                if isinstance(v, int) and exporter in state.domains:
                    target[(exporter, domain)] = v
        for k, v in entries("samplers"):
            try:
                exporter, domain, sampler = key(k, 2, IF_SAMPLING_KEY + 2**32)  # (interfaces' too)
            except ValueError:
                bad += 1
                continue
            if isinstance(v, int) and 0 < v < 2**31 and exporter in state.domains:
                state.samplers.put((exporter, domain, sampler), v)
        for k, v in entries("if_names"):
            try:
                exporter, domain, ifindex = key(k, 2, 2 * VRF_NAME_KEY)  # VRF names too
            except ValueError:
                bad += 1
                continue
            if isinstance(v, str) and exporter in state.domains:
                state.if_names.put((exporter, domain, ifindex), v[:IF_NAME_CHARS])
        for k, v in entries("pending"):
            try:
                pkey = key(k, 3)
                for b, c, o in v:
                    body = base64.b64decode(b)
                    refused, given_up = state.keep_pending(pkey, (body, tuple(int(x) for x in c), int(o)))
                    if refused:
                        state.limits_hit[refused] += 1
                    if given_up:
                        state.limits_hit["pending_flowsets"] += len(given_up)
            except (ValueError, TypeError):
                bad += 1
        if bad:
            state.limits_hit["decoder_state_entries"] += bad
        return state


@dataclass
class Decoded:
    flows: pa.Table  # schema.FLOWS columns (src_vm/dst_vm null)
    rejects: pa.Table  # schema.REJECTS columns offset, exporter, reason, detail, source
    stats: dict[str, dict[str, Any]]  # per exporter, see _new_stats


def _new_stats() -> dict[str, Any]:
    return {
        "datagrams": 0,
        "flows": 0,
        "rejects": 0,
        "sequence_gaps": 0,
        "lost": 0,
        "no_template": 0,
        "waiting_for_template": 0,
        "enterprise_fields_skipped": 0,
        "variable_fields_skipped": 0,
        "sampling": "unknown",
        "versions": [],
        "limits_hit": {},  # limit name (tracepipe/limits.py) -> times it evicted or refused something
    }


def merge_stats(total: dict[str, dict[str, Any]], part: dict[str, dict[str, Any]]) -> None:
    """Add one batch's per-exporter counters into a running total (sampling: the latest known wins)."""
    for exporter, stats in part.items():
        acc = total.setdefault(exporter, _new_stats())
        for k, v in stats.items():
            if k == "versions":  # (numbers from captures, kinds such as "nfcapd" from files: numbers first)
                acc[k] = sorted(set(acc[k]) | set(v), key=lambda x: (isinstance(x, str), x))
            elif k == "limits_hit":
                for name, n in v.items():
                    acc[k][name] = acc[k].get(name, 0) + n
            elif k == "sampling":
                if v != "unknown":
                    acc[k] = v
            else:
                acc[k] += v


OTHER_EXPORTERS = "(others)"  # per-exporter counters beyond limits.exporters are summed under this name


def merge_exporter_totals(
    total: dict[str, dict[str, Any]], part: dict[str, dict[str, Any]], limits: Limits = DEFAULT
) -> None:
    """merge_stats into running per-exporter totals that keep at most `limits.exporters` names, the counters of
    the rest summed under OTHER_EXPORTERS: a flood of addresses (a collector's senders, an nfcapd file naming
    200,000 exporters) must not grow a status file, a commit's info in the lake's log or a command's summary
    (70 MB of JSON, 1.5 GB to print)."""
    for exporter, stats in part.items():
        if exporter in total or len(total) < limits.exporters:
            merge_stats(total, {exporter: stats})
        else:
            merge_stats(total, {OTHER_EXPORTERS: stats})


# ---- the batch decoder --------------------------------------------------------------------------------------
# ctx: one per (datagram, options state) holding what record times and sampling need, and where the datagram
# is (rejects of its records name it): (exporter index, version, domain, boot_ms or export_ms, sys_uptime_ms,
# export_ms, sys_init_ms, sampling, the datagram's offset in its input or -1)
(
    _CTX_EXPORTER,
    _CTX_VERSION,
    _CTX_DOMAIN,
    _CTX_BOOT,
    _CTX_UPTIME,
    _CTX_EXPORT,
    _CTX_INIT,
    _CTX_SAMPLING,
    _CTX_OFFSET,
) = range(9)
_CTX_WIDTH = 9

_U16 = struct.Struct(">H")
_HDR_FIXED = struct.Struct(">HHIII")  # version, count, sysUptime, unix_secs, unix_nsecs
_HDR_V9 = struct.Struct(">HHIIII")  # version, count, sysUptime, unix_secs, sequence, source id
_HDR_IPFIX = struct.Struct(">HHIII")  # version, length, export time, sequence, observation domain
_SET = struct.Struct(">HH")
_U32 = struct.Struct(">I")


@dataclass
class InFile:
    """Where a batch's payloads lie in their input file (a capture: pcap.UdpBatch.payload_offsets). Given to
    walk_datagrams, it lets the records of the fast path travel to a decode worker as file offsets, which the
    worker reads itself (FileRecords), instead of as bytes copied through a pipe (issue 17: pickling and pipe
    writes were a quarter of the walking process's CPU)."""

    path: str
    starts: np.ndarray  # int64 file offset of each payload's first byte
    heads: bytes = b""  # the first 24 bytes of each payload (pcap.UdpBatch.heads), b"" if not at hand


class _FileSpans(NamedTuple):
    """Records of the fast path as (file offset, length) spans of InFile.path, in order."""

    starts: np.ndarray
    lengths: np.ndarray


@dataclass
class FileRecords:
    """A group's records as spans, in order: start >= 0 is an offset in the file `path`, start < 0 the offset
    -1 - start in `inline` (records the walker holds in memory: those of the full walk, data that waited for
    its template, projections of variable-length records). Lengths are whole records. read() gives the bytes."""

    path: str
    starts: np.ndarray
    lengths: np.ndarray
    inline: bytes

    def read(self, record_len: int) -> np.ndarray:
        """The records, joined (a uint8 array, one pread of the file range the spans cover and one numpy
        gather). InputChanged when the file no longer holds that range (truncated, gone): it changed since it
        was walked. Nothing is read outside the range, whatever the spans say."""
        in_file = self.starts >= 0
        file_starts = self.starts[in_file]
        low = int(file_starts.min()) if len(file_starts) else 0
        high = int((file_starts + self.lengths[in_file]).max()) if len(file_starts) else 0
        region = b""
        if high > low:
            try:
                with open(self.path, "rb") as handle:
                    region = os.pread(handle.fileno(), high - low, low)
            except OSError as exc:
                raise InputChanged(f"it could not be read again ({exc.strerror or exc})") from exc
            if len(region) < high - low:
                raise InputChanged(f"it ends at byte {low + len(region):,}, before {high:,} read before")
        buf = np.frombuffer(region + self.inline if self.inline else region, np.uint8)
        counts = self.lengths // record_len
        total = int(counts.sum())
        if not total:
            return np.zeros(0, np.uint8)
        # the start of every record in buf: its span's start + record_len x its rank in the span
        first = np.where(in_file, self.starts - low, len(region) - 1 - self.starts)
        rank = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        at = np.repeat(first, counts) + rank * record_len
        # a guard against a bug: whatever the spans say, nothing is read outside what was read from the file
        if (self.lengths % record_len).any() or int(at.min()) < 0 or int(at.max()) + record_len > len(buf):
            raise InputChanged("its records are not where they were walked")
        rows = np.lib.stride_tricks.as_strided(
            buf, shape=(len(buf) - record_len + 1, record_len), strides=(1, 1), writeable=False
        )
        return rows[at].reshape(-1)


@dataclass
class Walked:
    """Data records of one batch, grouped by template: what turning them into columns needs, no more (plain
    bytes and arrays: pickled cheaply to a worker process). Per group: the template, its records joined (or
    where they are in the input file: FileRecords), the records of each data set and the ctx row of each data
    set; ctx: one row per context (see _CTX_*)."""

    groups: list[tuple[Template, bytes | FileRecords, np.ndarray, np.ndarray]]
    ctx: np.ndarray
    exporters: list[str]
    source: str
    # the decoder state's tables that columns look values up in, for this batch's exporters (issue 16):
    # (exporter, domain, sampler id) -> interval, (exporter, domain, ifindex) -> interface name
    samplers: dict[tuple[str, int, int], int] = field(default_factory=dict)
    if_names: dict[tuple[str, int, int], str] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return sum(int(counts.sum()) for _, _, counts, _ in self.groups)


def _int_array(items: list) -> np.ndarray:
    """ints and int arrays, in order, as one int64 array."""
    if any(isinstance(x, np.ndarray) for x in items):
        return np.concatenate([np.asarray(x, np.int64).reshape(-1) for x in items])
    return np.asarray(items, np.int64)


class _Batch:
    """Working memory of one decode_datagrams call."""

    def __init__(self, state: DecoderState, source: str, in_file: InFile | None = None) -> None:
        self.state = state
        self.source = source
        self.in_file = in_file  # the fast path's records stay in the file (walk_datagrams)
        self.offsets: np.ndarray | None = None  # each datagram's offset in its input (_walk_batch): rejects
        self.reject_tables: list[pa.Table] = []  # rejects made for many records at once (_implausible)
        self.exporters: list[str] = []
        self.exporter_index: dict[str, int] = {}
        self.ctx: list[tuple] = []  # ctx rows not yet in a block
        self.ctx_blocks: list[np.ndarray] = []
        self.ctx_rows = 0
        # template object id -> (template, [slices], [record counts], [ctx index], [offsets])
        self.groups: dict[int, tuple[Template, list, list, list]] = {}
        self.rejects: list[tuple[int | None, str, str, str]] = []
        self.stats: dict[str, dict[str, Any]] = {}
        self.replay: list[tuple] = []  # (template, exporter, domain, its id, data that waited for it, boot)
        # variable-length template id -> (template, [(record bytes, bounds, ctx)]): rewritten in one go (issue 16)
        self.variable: dict[int, tuple[Template, list]] = {}
        self.samplers: dict[tuple[str, int, int], int] = {}  # lookups for the columns (see Walked)
        self.if_names: dict[tuple[str, int, int], str] = {}

    def walked(self) -> Walked:
        if self.variable:  # variable-length records -> their templates' fixed projections, grouped as usual
            _project_variable(self)
        groups = [
            (tpl, self._records(bodies), _int_array(counts), _int_array(ctx_ids))
            for tpl, bodies, counts, ctx_ids in self.groups.values()
        ]
        self._ctx_to_block()
        ctx = np.concatenate(self.ctx_blocks) if self.ctx_blocks else np.zeros((0, _CTX_WIDTH), np.int64)
        mine = self.exporter_index
        samplers = self.state.samplers.of_exporters(mine) if self.state.samplers else {}
        names = self.state.if_names.of_exporters(mine) if self.state.if_names else {}
        return Walked(groups, ctx, self.exporters, self.source, samplers, names)

    def _records(self, bodies: list) -> bytes | FileRecords:
        """A group's bodies joined, or as FileRecords when some of them are spans of the input file."""
        if self.in_file is None or not any(isinstance(b, _FileSpans) for b in bodies):
            return b"".join(bodies)
        starts, lengths, inline = [], [], []
        held = 0
        for body in bodies:  # one item per fast-path run, or per data set of the full walk: not per record
            if isinstance(body, _FileSpans):
                starts.append(body.starts)
                lengths.append(body.lengths)
            else:
                starts.append(-1 - held)
                lengths.append(len(body))
                inline.append(body)
                held += len(body)
        return FileRecords(self.in_file.path, _int_array(starts), _int_array(lengths), b"".join(inline))

    def stat(self, exporter: str) -> dict[str, Any]:
        s = self.stats.get(exporter)
        if s is None:
            s = self.stats[exporter] = _new_stats()
        return s

    def reject(self, offset: int | None, exporter: str, reason: str, detail: str = "") -> None:
        self.rejects.append((offset, exporter, reason, detail))
        self.stat(exporter)["rejects"] += 1

    def limit(self, exporter: str, names: list[str]) -> None:
        """Count limits hit on behalf of `exporter` (in its stats and in the state's running total)."""
        hits = self.stat(exporter)["limits_hit"]
        for name in names:
            hits[name] = hits.get(name, 0) + 1
            self.state.limits_hit[name] += 1

    def refuse(self, offset: int | None, exporter: str, name: str, detail: str) -> None:
        """A template or datagram refused by limit `name`: counted, and a reject naming the limit."""
        self.limit(exporter, [name])
        self.reject(offset, exporter, f"limit {name}", f"{detail} (limit {getattr(self.state.limits, name)})")

    def exporter_id(self, exporter: str) -> int:
        idx = self.exporter_index.get(exporter)
        if idx is None:
            idx = self.exporter_index[exporter] = len(self.exporters)
            self.exporters.append(exporter)
        return idx

    def add_ctx(self, exporter: str, values: tuple, offset: int | None) -> int:
        self.ctx.append((self.exporter_id(exporter), *values, -1 if offset is None else offset))
        self.ctx_rows += 1
        return self.ctx_rows - 1

    def add_ctx_block(self, rows: np.ndarray) -> np.ndarray:
        """Many ctx rows at once (an (n, _CTX_WIDTH) int64 array); returns their indices."""
        self._ctx_to_block()
        self.ctx_blocks.append(rows)
        self.ctx_rows += len(rows)
        return np.arange(self.ctx_rows - len(rows), self.ctx_rows)

    def _ctx_to_block(self) -> None:
        if self.ctx:
            self.ctx_blocks.append(np.array(self.ctx, dtype=np.int64).reshape(-1, _CTX_WIDTH))
            self.ctx = []

    def add_data(
        self,
        tpl: Template,
        body: bytes | memoryview | list | _FileSpans,
        count: int | np.ndarray,
        ctx: int | np.ndarray,
    ) -> None:
        """Records of `tpl`: one data set (count records, ctx index) or many (a list of bodies, arrays)."""
        group = self.groups.get(id(tpl))
        if group is None:
            group = self.groups[id(tpl)] = (tpl, [], [], [])
        (group[1].extend if isinstance(body, list) else group[1].append)(body)  # _FileSpans: one item
        group[2].append(count)
        group[3].append(ctx)


def decode_datagrams(
    payloads: Sequence[bytes | memoryview],
    exporters: Sequence[str],
    arrival_us: np.ndarray,
    offsets: np.ndarray | None,
    source: str,
    state: DecoderState,
    text_as_dictionary: bool = False,
    in_file: InFile | None = None,
) -> Decoded:
    """Decode a batch of export datagrams (any mix of versions and exporters) into flows and rejects.

    `offsets` are the byte offsets of each datagram's record in its file (for rejects); `state` is updated in
    place (templates learnt, sequence numbers, options values, data waiting for templates).
    `text_as_dictionary`: leave the text columns (addresses, exporter, source) dictionary-encoded, as
    Lake writers take them fastest; by default they are plain strings exactly as schema.FLOWS declares.
    `in_file`: where the payloads are in their input file (walk_datagrams); the fast path's records are then
    read from it in one go instead of sliced datagram by datagram (InputChanged if the file no longer has them).
    """
    batch = _walk_batch(payloads, exporters, arrival_us, offsets, source, state, in_file)
    flows = _decode_walked(batch, _records_read(batch.walked()))
    if not text_as_dictionary:
        flows = flows.cast(FLOWS)
    return Decoded(flows, _batch_rejects(batch, source), batch.stats)


def walk_datagrams(
    payloads: Sequence[bytes | memoryview],
    exporters: Sequence[str],
    arrival_us: np.ndarray,
    offsets: np.ndarray | None,
    source: str,
    state: DecoderState,
    in_file: InFile | None = None,
) -> tuple[Walked, Decoded]:
    """The stateful half of decode_datagrams: headers, templates, sequences, options, data waiting for
    templates. Returns the data records grouped by template (`Walked`: plain bytes and arrays, cheap to send
    to another process, where `decode_walked` turns them into columns) and what the walk itself found
    (flows empty; rejects and per-exporter counters). decode_datagrams == walk + decode_walked, merged.
    `in_file`: where the payloads are in their input file; the fast path's records then travel as offsets
    in it (FileRecords), read by decode_walked, which must be able to open that file."""
    batch = _walk_batch(payloads, exporters, arrival_us, offsets, source, state, in_file)
    empty = FLOWS_TEXT_DICTIONARY.empty_table()
    return batch.walked(), Decoded(empty, _rejects_table(batch.rejects, source), batch.stats)


def decode_walked(walked: Walked, ipv4_as_integers: bool = False) -> Decoded:
    """The stateless half of decode_datagrams: records grouped by template -> flows (text columns
    dictionary-encoded), with the rejects and counters found on the way (times out of range, no addresses).

    `ipv4_as_integers`: src_addr and dst_addr of templates of one address family stay integers instead of
    text, for a lake writer (lake.PartFile, DayParts) to format once per row group instead of once per batch
    (issue 17): uint32 when the batch is all IPv4, else address_text.ADDRESSES; templates carrying both
    families or a packet section give text, and then the batch's addresses are all text. InputChanged when
    records to be read from the input file (FileRecords) are no longer there."""
    batch = _Batch(None, walked.source)  # type: ignore[arg-type]  # columns need no decoder state
    batch.exporters = list(walked.exporters)
    flows = _decode_walked(batch, _records_read(walked), ipv4_as_integers)
    return Decoded(flows, _batch_rejects(batch, walked.source), batch.stats)


def _records_read(walked: Walked) -> Walked:
    """`walked` with the records of its FileRecords groups read from the file (the others as they are)."""
    if not any(isinstance(records, FileRecords) for _, records, _, _ in walked.groups):
        return walked
    groups = [
        (tpl, records.read(tpl.record_len) if isinstance(records, FileRecords) else records, counts, ctx)
        for tpl, records, counts, ctx in walked.groups
    ]
    return dataclasses.replace(walked, groups=groups)


def _walk_batch(
    payloads: Sequence[bytes | memoryview],
    exporters: Sequence[str],
    arrival_us: np.ndarray,
    offsets: np.ndarray | None,
    source: str,
    state: DecoderState,
    in_file: InFile | None = None,
) -> _Batch:
    batch = _Batch(state, source, in_file)
    batch.offsets = None if offsets is None else np.asarray(offsets, np.int64)
    n = len(payloads)
    if n:
        state.now_ms = max(state.now_ms, int(np.max(arrival_us)) // 1000)
    offs = offsets.tolist() if offsets is not None else [None] * n
    # Fast path: a v9/IPFIX datagram holding exactly one data set of a known template (the steady state of
    # every exporter), taken in runs, with numpy over the headers of the whole run (no Python per datagram but
    # one slice of its records). Whatever else (templates, options, several sets, v1/v5/v7, junk) takes the
    # full walk, one datagram at a time, in input order: it may change templates, options values or bounds.
    heads = _FastHeads(payloads, exporters, in_file.heads if in_file is not None else None)
    i = 0
    while i < n:
        if heads.candidate[i]:
            stop = heads.run_end(i)
            i = _fast_run(batch, heads, payloads, i, stop)
            if i == stop:
                continue
        try:
            _walk_datagram(batch, payloads[i], exporters[i], offs[i])
        except (
            struct.error,
            ValueError,
            IndexError,
            OverflowError,
        ) as exc:  # a length that lied past our checks
            batch.reject(offs[i], exporters[i], "malformed datagram", repr(exc)[:200])
        if batch.replay:  # templates learnt before the walk stopped still serve the data that waited
            _replay_pending(batch)
        i += 1
    for exporter, datagrams in Counter(exporters).items():
        batch.stat(exporter)["datagrams"] += datagrams
        if exporter in state.domains:  # only exporters the state keeps (bounded) are remembered
            state.last_seen_ms[exporter] = state.now_ms
            if exporter not in state.first_seen_ms:
                state.first_seen_ms[exporter] = state.now_ms
                state.unsettled[exporter] = None
            elif exporter in state.unsettled and state._settled(exporter):
                del state.unsettled[exporter]
    # the largest interval known per exporter of the batch, in one pass over the table (a pass per exporter cost
    # O(table) each: a review's 4,096 senders x 16 domains brought the committer to 94 datagrams a second)
    known: dict[str, int] = {}
    if state.sampling:
        for (exporter, _), value in state.sampling.items():
            if exporter in batch.stats and value > known.get(exporter, value - 1):
                known[exporter] = value
    for exporter, s in batch.stats.items():
        if exporter in known:
            s["sampling"] = known[exporter]
    return batch


# the first 24 bytes of a datagram, read as v9 (header + first flowset header) and as IPFIX (header + first set
# header + 4 bytes of it), big-endian
_HEAD = np.dtype(
    [
        ("version", ">u2"),
        ("count", ">u2"),
        ("w1", ">u4"),
        ("w2", ">u4"),
        ("w3", ">u4"),
        ("w4", ">u4"),
        ("w5", ">u4"),
    ]
)
_PAD = bytes(24)


class _FastHeads:
    """Headers of a batch's datagrams as columns; which ones may take the fast path (one data set, v9/IPFIX)."""

    def __init__(
        self, payloads: Sequence[bytes | memoryview], exporters: Sequence[str], raw: bytes | None = None
    ) -> None:
        """`raw`: the first 24 bytes of each payload (zeros for a shorter one), when the reader has them."""
        n = len(payloads)
        sizes = getattr(payloads, "sizes", None)  # pcap.Payloads knows them without a slice each
        self.sizes = sizes if sizes is not None else np.fromiter(map(len, payloads), np.int64, n)
        if raw is None or len(raw) != 24 * n:
            raw = b"".join([p[:24] if len(p) >= 24 else _PAD for p in payloads])
        heads = np.frombuffer(raw, _HEAD, n)
        version = heads["version"]
        # v9: version, count, sysUptime, unix_secs, sequence, source id, (set id, set length)
        v9 = (version == 9) & ((heads["w5"] & 0xFFFF) == self.sizes - 20) & ((heads["w5"] >> 16) >= 256)
        # IPFIX: version, length, export time, sequence, domain, (set id, set length)
        v10 = (
            (version == 10)
            & (heads["count"] == self.sizes)
            & ((heads["w4"] & 0xFFFF) == self.sizes - 16)
            & ((heads["w4"] >> 16) >= 256)
        )
        self.candidate = (self.sizes >= 24) & (v9 | v10)
        self.version = version.astype(np.int64)
        self.time = np.where(v9, heads["w2"], heads["w1"]).astype(np.int64)  # unix secs / export time
        self.uptime = np.where(v9, heads["w1"], 0).astype(np.int64)
        self.sequence = np.where(v9, heads["w3"], heads["w2"]).astype(np.int64)
        self.domain = np.where(v9, heads["w4"], heads["w3"]).astype(np.int64)
        sets = np.where(v9, heads["w5"], heads["w4"]).astype(np.int64)
        self.set_id, self.set_len = sets >> 16, sets & 0xFFFF
        encoded = pc.dictionary_encode(pa.array(exporters, pa.string())) if n else None
        self.exporter_code = (
            encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64) if n else np.zeros(0, np.int64)
        )
        self.exporter_names: list[str] = encoded.dictionary.to_pylist() if n else []
        # one number per (exporter, version, domain, set id): the fast path's cache key
        scope = (self.version << 48) | (self.set_id << 32) | self.domain
        self.key = self.exporter_code * max(n, 1) + np.unique(scope, return_inverse=True)[1].reshape(-1)
        # ... and per (exporter, version, domain): the scope of one sequence (a router's IPv4 and IPv6 templates
        # share it)
        domains = (self.version << 48) | self.domain
        self.scope = self.exporter_code * max(n, 1) + np.unique(domains, return_inverse=True)[1].reshape(-1)
        self.breaks = np.flatnonzero(~self.candidate)

    def run_end(self, i: int) -> int:
        """The first datagram from i on that is no candidate (or the batch's end)."""
        at = np.searchsorted(self.breaks, i)
        return int(self.breaks[at]) if at < len(self.breaks) else len(self.candidate)

    def key_of(self, i: int) -> tuple[str, int, int, int]:
        return (
            self.exporter_names[self.exporter_code[i]],
            int(self.version[i]),
            int(self.domain[i]),
            int(self.set_id[i]),
        )


def _fast_run(
    batch: _Batch, heads: _FastHeads, payloads: Sequence[bytes | memoryview], start: int, stop: int
) -> int:
    """Take datagrams start.. of a run of candidates as fast as their templates allow; returns where it stopped
    (stop, or the first datagram that must take the full walk: unknown template, sequence not yet followed)."""
    keys = heads.key[start:stop]
    first = np.unique(keys, return_index=True)[1]
    end = stop
    for j in np.argsort(first):  # in order of first appearance: a key that cannot be taken ends the run there
        at = start + int(first[j])
        if at >= end:
            break
        if _fast_template(batch.state, *heads.key_of(at)) is None:
            end = at
    if end == start:
        return start
    keys = keys[: end - start]
    groups = _groups(keys, start)
    counts = np.empty(end - start, np.int64)  # data records of each datagram, by its template
    templates = []
    for idx in groups:
        tpl, _track = _fast_template(batch.state, *heads.key_of(int(idx[0])))  # type: ignore[misc]
        counts[idx - start] = (heads.set_len[idx] - 4) // tpl.record_len
        templates.append(tpl)
    # sequence numbers per (exporter, version, domain) over its datagrams in input order, whatever template
    # each carries: followed per template, a router alternating IPv4 and IPv6 data sets showed hundreds of
    # gaps that no datagram was missing for (a review: 435 "lost" of 1,000, none lost)
    for idx in _groups(heads.scope[start:end], start):
        _fast_sequences(batch, heads, idx, counts[idx - start])
    for idx, tpl in zip(groups, templates, strict=True):  # keys in order of first appearance (as the
        _fast_key(batch, heads, payloads, idx, tpl, counts[idx - start])  # templates and domains are touched)
    return end


def _groups(keys: np.ndarray, start: int) -> list[np.ndarray]:
    """Positions (from `start`) of the datagrams of each key, each in input order, keys by first appearance."""
    order = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    return sorted(np.split(order + start, bounds), key=lambda idx: idx[0])


def _fast_template(
    state: DecoderState, exporter: str, version: int, domain: int, set_id: int
) -> tuple[Template, _Sequence] | None:
    """The template and sequence tracker the fast path needs, None if it cannot be taken. No side effects."""
    tpl = state.templates.get((exporter, version, domain, set_id))
    if tpl is None or tpl.options or tpl.variable_fields or tpl.enterprise_fields or not tpl.record_len:
        return None
    if _addressed(tpl) is not True:  # records that give no flow: the full walk rejects them
        return None
    track = state.sequences.get((exporter, version, domain))
    if track is None or track.expected is None or (version == 10 and not track.locked):
        return None  # the first datagrams of a sequence go the full way (they set `expected`)
    return tpl, track


def _fast_sequences(batch: _Batch, heads: _FastHeads, idx: np.ndarray, counts: np.ndarray) -> None:
    """Follow the sequence of one (exporter, version, domain) over its datagrams `idx` (input order) of the fast
    path, `counts` their data records."""
    exporter, version, domain, _set_id = heads.key_of(int(idx[0]))
    scope = (exporter, version, domain)
    track = batch.state.sequences[scope]  # (there: _fast_template took each of their templates)
    seqs = heads.sequence[idx]
    if version == 9:  # v9 counts datagrams
        if seqs[0] == track.expected and bool((np.diff(seqs) % WRAP == 1).all()):
            track.expected = int(seqs[-1] + 1) % WRAP
        else:  # a gap, a duplicate or a late datagram: one at a time, as the full walk does
            for seq in seqs.tolist():
                if track.expected == seq:
                    track.expected = (seq + 1) & 0xFFFFFFFF
                else:
                    _track_sequence(batch, exporter, scope, seq, 1)
    else:  # IPFIX counts data records; locked convention (see _Sequence)
        firsts = (seqs - counts) % WRAP if track.after else seqs
        if firsts[0] == track.expected and bool(((firsts[1:] - firsts[:-1] - counts[:-1]) % WRAP == 0).all()):
            track.expected = int(firsts[-1] + counts[-1]) % WRAP
        else:
            for seq, first, count in zip(seqs.tolist(), firsts.tolist(), counts.tolist(), strict=True):
                if track.expected == first:
                    track.expected = (first + count) & 0xFFFFFFFF
                else:
                    _track_ipfix(batch, exporter, scope, seq, count, 0)


def _fast_key(
    batch: _Batch,
    heads: _FastHeads,
    payloads: Sequence[bytes | memoryview],
    idx: np.ndarray,
    tpl: Template,
    counts: np.ndarray,
) -> None:
    """Datagrams `idx` (input order) of one (exporter, version, domain, template) known to the fast path, with
    `counts` data records each (their sequence followed by _fast_sequences)."""
    state = batch.state
    exporter, version, domain, set_id = heads.key_of(int(idx[0]))
    state.used((exporter, version, domain, set_id))
    stats = batch.stat(exporter)
    if version not in stats["versions"]:
        stats["versions"].append(version)
    has = counts > 0
    if not has.all():
        idx, counts = idx[has], counts[has]
    if not len(idx):
        return
    export_ms = heads.time[idx] * 1000
    rows = np.empty((len(idx), _CTX_WIDTH), np.int64)
    rows[:, _CTX_EXPORTER] = batch.exporter_id(exporter)
    rows[:, _CTX_VERSION] = version
    rows[:, _CTX_DOMAIN] = domain
    rows[:, _CTX_BOOT] = export_ms - heads.uptime[idx]
    rows[:, _CTX_UPTIME] = heads.uptime[idx]
    rows[:, _CTX_EXPORT] = export_ms
    rows[:, _CTX_INIT] = state.sys_init_ms.get((exporter, domain), -1)
    rows[:, _CTX_SAMPLING] = state.sampling.get((exporter, domain), -1)
    rows[:, _CTX_OFFSET] = -1 if batch.offsets is None else batch.offsets[idx]
    hdr, record_len = 24 if version == 9 else 20, tpl.record_len
    if batch.in_file is not None:  # where the records are in the file: no slice per datagram, no copy
        spans = _FileSpans(batch.in_file.starts[idx] + hdr, counts * record_len)
        batch.add_data(tpl, spans, counts, batch.add_ctx_block(rows))
        return
    bodies = [
        payloads[d][hdr : hdr + c * record_len] for d, c in zip(idx.tolist(), counts.tolist(), strict=True)
    ]
    batch.add_data(tpl, bodies, counts, batch.add_ctx_block(rows))


def _walk_datagram(batch: _Batch, payload: bytes | memoryview, exporter: str, offset: int | None) -> None:
    size = len(payload)
    stats = batch.stat(exporter)
    if size < 4:
        batch.reject(offset, exporter, "not netflow", f"{size} bytes")
        return
    version = _U16.unpack_from(payload, 0)[0]
    if version not in stats["versions"]:
        if version in (1, 5, 7, 9, 10):
            stats["versions"].append(version)
    if version in FIXED_LAYOUTS:
        _walk_fixed(batch, payload, exporter, offset, version)
    elif version == 9:
        _walk_v9(batch, payload, exporter, offset)
    elif version == 10:
        _walk_ipfix(batch, payload, exporter, offset)
    else:
        batch.reject(offset, exporter, "not netflow", f"unknown version {version}")


def _walk_fixed(
    batch: _Batch, payload: bytes | memoryview, exporter: str, offset: int | None, version: int
) -> None:
    header_len, record_len, _ = FIXED_LAYOUTS[version]
    size = len(payload)
    if size < header_len:
        batch.reject(
            offset, exporter, "truncated datagram", f"v{version} header needs {header_len} bytes, got {size}"
        )
        return
    _, count, uptime, secs, nsecs = _HDR_FIXED.unpack_from(payload, 0)
    if count == 0:
        return
    if header_len + count * record_len > size:
        batch.reject(
            offset,
            exporter,
            "truncated datagram",
            f"v{version} header says {count} records, {size} bytes hold {(size - header_len) // record_len}",
        )
        return
    sampling = -1
    if version != 1:
        seq = _U32.unpack_from(payload, 16)[0]
        # v5: each engine (type, id: bytes 20-21) of an exporter numbers its flows on its own, as nfdump keeps
        # them apart: one sequence for all made up losses of 997 between two engines of one sender
        engine = _U16.unpack_from(payload, 20)[0] if version == 5 else 0
        _track_sequence(batch, exporter, (exporter, version, engine), seq, count)
        if version == 5:
            interval = _U16.unpack_from(payload, 22)[0] & 0x3FFF  # top 2 bits: sampling mode
            if interval > 0:
                # every v5 header carries its interval: no state. Kept as (exporter, domain 0) it was applied to
                # the unsampled v9 source 0 / IPFIX domain 0 flows of the same address (a review)
                sampling = batch.stat(exporter)["sampling"] = interval
    # v5 boot time: unix_secs + nsecs - sysUptime, in ms (RFC-less, as Cisco documents it)
    boot_ms = secs * 1000 + nsecs // 1_000_000 - uptime
    ctx = batch.add_ctx(exporter, (version, 0, boot_ms, uptime, secs * 1000, -1, sampling), offset)
    if exporter in batch.state.domains:
        batch.state.exporters.touch(exporter, live=True)
    body = payload[header_len : header_len + count * record_len]
    batch.add_data(FIXED_TEMPLATES[version], body, count, ctx)


def _walk_v9(batch: _Batch, payload: bytes | memoryview, exporter: str, offset: int | None) -> None:
    size = len(payload)
    if size < 20:
        batch.reject(offset, exporter, "truncated datagram", f"v9 header needs 20 bytes, got {size}")
        return
    _, _count, uptime, secs, seq, domain = _HDR_V9.unpack_from(payload, 0)
    # v9 sequence numbers count export packets (RFC 3954 §5.1)
    _track_sequence(batch, exporter, (exporter, 9, domain), seq, 1)
    _walk_sets(
        batch, payload, 20, size, exporter, offset, 9, domain, secs * 1000 - uptime, uptime, secs * 1000
    )


def _walk_ipfix(batch: _Batch, payload: bytes | memoryview, exporter: str, offset: int | None) -> None:
    size = len(payload)
    if size < 16:
        batch.reject(offset, exporter, "truncated datagram", f"IPFIX header needs 16 bytes, got {size}")
        return
    _, length, export_s, seq, domain = _HDR_IPFIX.unpack_from(payload, 0)
    if length < 16 or length > size:
        batch.reject(offset, exporter, "bad length", f"IPFIX message length {length}, datagram {size} bytes")
        return
    records, options = _walk_sets(
        batch, payload, 16, length, exporter, offset, 10, domain, export_s * 1000, 0, export_s * 1000
    )
    _track_ipfix(batch, exporter, (exporter, 10, domain), seq, records, options)


def _walk_sets(
    batch: _Batch,
    payload: bytes | memoryview,
    pos: int,
    end: int,
    exporter: str,
    offset: int | None,
    version: int,
    domain: int,
    boot_ms: int,
    uptime: int,
    export_ms: int,
) -> tuple[int | None, int]:
    """Walk the (flow)sets of one v9/IPFIX message. Returns (data records, options data records) seen, data
    records None if some could not be counted (no template yet)."""
    state = batch.state
    template_set, options_set = (0, 1) if version == 9 else (2, 3)
    records: int | None = 0
    options_records = 0
    ctx = -1
    ctx_key: tuple | None = None
    while pos + 4 <= end:
        set_id, set_len = _SET.unpack_from(payload, pos)
        if set_len == 0 and not any(bytes(payload[pos:end])):
            break  # zero fill to the end: Palo Alto PAN-OS 8.1 and Cisco ACI pad datagrams to a fixed size
        if set_len < 4 or pos + set_len > end:
            # a zero or lying length: the rest of the datagram cannot be delimited
            batch.reject(
                offset,
                exporter,
                "bad flowset length",
                f"set {set_id} at byte {pos} says {set_len} bytes, {end - pos} left",
            )
            if batch.replay:
                _replay_pending(batch)
            return None, options_records
        body_start, body_end = pos + 4, pos + set_len
        pos = body_end
        if set_id == template_set or set_id == options_set:
            _read_templates(
                batch,
                payload,
                body_start,
                body_end,
                exporter,
                offset,
                version,
                domain,
                set_id == options_set,
                boot_ms,
                uptime,
            )
            continue
        if set_id < 256:
            batch.reject(offset, exporter, "unknown flowset id", f"v{version} set id {set_id}")
            continue
        key = (exporter, version, domain, set_id)
        tpl = state.templates.get(key)
        sampling = state.sampling.get((exporter, domain), -1)
        sys_init = state.sys_init_ms.get((exporter, domain), -1)
        values = (version, domain, boot_ms, uptime, export_ms, sys_init, sampling)
        if tpl is None:
            if key in state.withdrawn:
                if body_end > body_start:
                    detail = f"template {set_id} (domain {domain}) withdrawn"
                    _no_template(batch, exporter, offset, detail, waited=False)
            else:
                _keep_pending(batch, key, bytes(payload[body_start:body_end]), values, offset)
            records = None
            continue
        if tpl.options:
            options_records += _read_options_data(batch, tpl, payload[body_start:body_end], exporter, domain)
            state.used(key)
            continue
        if values != ctx_key:
            ctx = batch.add_ctx(exporter, values, offset)
            ctx_key = values
        count, flows = _add_template_data(batch, tpl, payload[body_start:body_end], ctx, exporter, offset)
        if flows:  # (records that can give no flow do not keep a template: a flood of them is not "live")
            state.used(key)
        if records is not None:
            records += count
    if batch.replay:
        _replay_pending(batch)
    return records, options_records


def _add_template_data(
    batch: _Batch, tpl: Template, body: bytes | memoryview, ctx: int, exporter: str, offset: int | None
) -> tuple[int, int]:
    """Queue a data set's records for decoding: (records in the set, records queued: those that can give a
    flow). A template whose records hold no address (no address fields, no IP or frame section) gives none:
    its records are rejected here, before they take any memory."""
    stats = batch.stat(exporter)
    addressed = _addressed(tpl)
    if tpl.variable_fields:
        raw = bytes(body)
        bounds = _variable_bounds(tpl, raw)
        if bounds is None:
            batch.reject(offset, exporter, "bad variable-length record", f"{len(body)} bytes")
            return 0, 0
        starts, at, size = bounds
        count = len(starts)
        sections = sum(_section_slot(f) != f for f in tpl.fields)  # kept, not skipped (issue 16)
        stats["variable_fields_skipped"] += count * (tpl.variable_fields - sections)
        stats["enterprise_fields_skipped"] += count * tpl.enterprise_fields
        if count and addressed is not True:
            # addresses only in IP/frame sections: a record whose sections are all shorter than an IP header
            # has none. Dropped here: such records take one byte on the wire and a 256-byte slot once projected
            room = (size[:, addressed] >= MIN_IP_SECTION).any(axis=1) if addressed else np.zeros(count, bool)
            short = count - int(np.count_nonzero(room))
            if short:
                why = (
                    f"{short} records: packet section shorter than an IP header"
                    if addressed
                    else f"template without address fields: {short} records"
                )
                batch.reject(offset, exporter, "no addresses", why)
                starts, at, size = starts[room], at[room], size[room]
        if len(starts):
            batch.variable.setdefault(id(tpl), (tpl, []))[1].append((raw, (starts, at, size), ctx))
        return count, len(starts)
    count = len(body) // tpl.record_len  # the remainder is padding (RFC 3954 §5.3, RFC 7011 §3.3.1)
    if count and not addressed:
        batch.reject(offset, exporter, "no addresses", f"template without address fields: {count} records")
        return count, 0
    if count:
        stats["enterprise_fields_skipped"] += count * tpl.enterprise_fields
        batch.add_data(tpl, body[: count * tpl.record_len], count, ctx)
    return count, count


# the shortest IP header (IPv4, no options): a packet section shorter than that holds no address
MIN_IP_SECTION = 20
_SECTION_ROLES = ("ip_header", "frame", "ip_header_slot", "frame_slot")


def _addressed(tpl: Template) -> bool | list[int]:
    """True when a template's records carry both addresses in fields; else the positions, among its variable-length
    fields, of the IP and frame sections the addresses can be read from (issue 16); [] when there is none: its
    records give no flow."""
    roles = tpl.roles if not tpl.variable_fields else _projection(tpl).roles
    if ("src_addr4" in roles and "dst_addr4" in roles) or ("src_addr6" in roles and "dst_addr6" in roles):
        return True
    if any(roles.get(r, 0) >= MIN_IP_SECTION for r in _SECTION_ROLES[:2]):  # a fixed-length section
        return True
    variable = [f for f in tpl.fields if f[1] == VARIABLE_LENGTH]
    return [k for k, f in enumerate(variable) if _section_slot(f) != f and f[0] in (313, 315)]


_PROJECTIONS: dict[int, Template] = {}


def _projection(tpl: Template) -> Template:
    projected = _PROJECTIONS.get(id(tpl))
    if projected is None or projected.fields != _projected_fields(tpl.fields):
        if len(_PROJECTIONS) >= _INTERNED_MAX:  # keyed by template: bounded like the interned layouts
            _PROJECTIONS.clear()
        projected = _PROJECTIONS[id(tpl)] = _intern(tpl.fixed_projection())
    return projected


def _variable_layout(tpl: Template) -> tuple[list[int], int, list[bool]]:
    """(fixed bytes before each variable-length field, fixed bytes after the last, which ones are kept sections)."""
    runs, keep = [0], []
    for f in tpl.fields:
        if f[1] == VARIABLE_LENGTH:
            keep.append(_section_slot(f) != f)
            runs.append(0)
        else:
            runs[-1] += f[1]
    return runs[:-1], runs[-1], keep


def _variable_bounds(tpl: Template, raw: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Where each record starts (n,), and each variable-length field's data offset and length (n, fields)
    (RFC 7011 §7), or None if a length runs past the set. The boundaries depend on each record's length bytes,
    so this is one Python step per record and variable field (into int64 arrays: 8 bytes an entry, where a list
    of ints took 36, for records that can be one byte each); the bytes are gathered later, for all records of
    the batch at once."""
    gaps, tail, keep = _variable_layout(tpl)
    end = len(raw)
    min_len = max(sum(gaps) + tail + len(keep), 1)
    starts = array("q")
    var_at = array("q")
    var_len = array("q")
    pos = 0
    while end - pos >= min_len:
        starts.append(pos)
        for gap in gaps:
            pos += gap
            if pos >= end:
                return None
            vlen = raw[pos]
            pos += 1
            if vlen == 255:  # long form, two more bytes of length
                if pos + 2 > end:
                    return None
                vlen = (raw[pos] << 8) | raw[pos + 1]
                pos += 2
            var_at.append(pos)
            var_len.append(vlen)
            pos += vlen
        pos += tail
        if pos > end:
            return None
    n, fields = len(starts), len(gaps)
    return (
        np.frombuffer(starts, np.int64) if n else np.zeros(0, np.int64),
        (np.frombuffer(var_at, np.int64) if n else np.zeros(0, np.int64)).reshape(n, fields),
        (np.frombuffer(var_len, np.int64) if n else np.zeros(0, np.int64)).reshape(n, fields),
    )


def _project_variable(batch: _Batch) -> None:
    """Rewrite all variable-length records of the batch to their templates' fixed projections (the fixed fields,
    and packet sections as length-prefixed slots), one numpy gather per template, then group them as usual."""
    slot_bytes = inner_headers.SECTION_SLOT_BYTES - 2
    for tpl, parts in batch.variable.values():
        gaps, tail, keep = _variable_layout(tpl)
        raws = [raw for raw, _, _ in parts]
        shift = np.cumsum([0] + [len(raw) for raw in raws[:-1]])
        counts = [len(bounds[0]) for _, bounds, _ in parts]
        count = sum(counts)
        starts = np.concatenate([b[0] + off for (_, b, _), off in zip(parts, shift, strict=True)])
        at = np.concatenate([b[1] + off for (_, b, _), off in zip(parts, shift, strict=True)])
        size = np.concatenate([b[2] for _, b, _ in parts])
        buf = np.frombuffer(b"".join(raws), dtype=np.uint8)
        last = len(buf) - 1
        pieces = []
        run_start = starts
        for k, gap in enumerate(gaps):
            if gap:
                pieces.append(buf[run_start[:, None] + np.arange(gap)])
            if keep[k]:
                kept = np.minimum(size[:, k], slot_bytes)
                width = int(kept.max())  # exporters cut sections short (128 bytes is common): gather no more
                slot = np.zeros((count, slot_bytes), dtype=np.uint8)
                index = np.minimum(at[:, k, None] + np.arange(width), last)
                slot[:, :width] = buf[index] * (np.arange(width) < kept[:, None])
                pieces.append(np.stack([kept >> 8, kept & 0xFF], axis=1).astype(np.uint8))
                pieces.append(slot)
            run_start = at[:, k] + size[:, k]
        if tail:
            pieces.append(buf[run_start[:, None] + np.arange(tail)])
        if not pieces:  # nothing but skipped variable-length fields: no columns to decode
            continue
        projected = _projection(tpl)
        group = batch.groups.get(id(projected))
        if group is None:
            group = batch.groups[id(projected)] = (projected, [], [], [])
        group[1].append(np.concatenate(pieces, axis=1).tobytes())
        group[2].extend(counts)
        group[3].extend(ctx for _, _, ctx in parts)
    batch.variable.clear()


def _read_templates(
    batch: _Batch,
    payload: bytes | memoryview,
    pos: int,
    end: int,
    exporter: str,
    offset: int | None,
    version: int,
    domain: int,
    options: bool,
    boot_ms: int = -1,
    uptime: int = -1,
) -> None:
    """The templates of one set. `boot_ms`, `uptime`: the exporter's boot time by this message (v9: export time
    less sysUptime) and its sysUptime, against which the data that waited for a template is checked
    (_replay_pending)."""
    state = batch.state
    while end - pos >= 4:
        scope_count = 0
        if version == 9 and options:
            if end - pos < 6:
                return  # padding
            tid, scope_len, option_len = struct.unpack_from(">HHH", payload, pos)
            pos += 6
            if scope_len % 4 or option_len % 4 or pos + scope_len + option_len > end:
                batch.reject(
                    offset,
                    exporter,
                    "bad template",
                    f"v9 options template {tid}: scope {scope_len} + options {option_len} bytes, "
                    f"{end - pos} left",
                )
                return
            scope_count = scope_len // 4
            n_fields = (scope_len + option_len) // 4
        else:
            tid, n_fields = _SET.unpack_from(payload, pos)
            pos += 4
            if version == 10 and options and n_fields:
                if end - pos < 2:
                    batch.reject(offset, exporter, "bad template", f"IPFIX options template {tid} cut short")
                    return
                scope_count = _U16.unpack_from(payload, pos)[0]
                pos += 2
        if tid == 0 and n_fields == 0 and version == 9:
            return  # padding after the last template
        if version == 10 and n_fields == 0:
            _withdraw(batch, exporter, domain, tid, options, offset)
            continue
        if tid < 256:
            batch.reject(offset, exporter, "bad template", f"template id {tid} < 256")
            return
        if n_fields > state.limits.fields_per_template:
            # the walk over its fields goes on (the set length bounds it); the template is not kept
            batch.refuse(
                offset, exporter, "fields_per_template", f"template {tid} declares {n_fields} fields"
            )
        fields: list[tuple[int, int, int]] = []
        for _ in range(n_fields):
            if pos + 4 > end:
                batch.reject(
                    offset,
                    exporter,
                    "bad template",
                    f"template {tid} declares {n_fields} fields, set ends after {len(fields)}",
                )
                return
            field_id, length = _SET.unpack_from(payload, pos)
            pos += 4
            pen = 0
            if version == 10 and field_id & ENTERPRISE_BIT:
                if pos + 4 > end:
                    batch.reject(
                        offset, exporter, "bad template", f"template {tid}: enterprise number cut short"
                    )
                    return
                pen = _U32.unpack_from(payload, pos)[0]
                pos += 4
                field_id &= ~ENTERPRISE_BIT
            # RFC 3954 has no variable length, but H3C NetStream v9 sends its VRF name (IE 236) as 65535 and
            # encodes the records as IPFIX does (RFC 7011 §7), which nfdump and Logstash read: so does this
            fields.append((field_id, length, pen))
        if n_fields > state.limits.fields_per_template:
            continue
        tpl = Template.build(fields, options, scope_count, version)
        if tpl.variable_fields == 0 and tpl.record_len == 0:
            batch.reject(offset, exporter, "bad template", f"template {tid}: records of 0 bytes")
            continue
        key = (exporter, version, domain, tid)
        # a redefinition replaces the old layout (RFC 7011 §8.1); a refresh of the same layout (softflowd re-sends
        # its templates every ~20 datagrams) keeps one shared object, so that all records of one layout in a
        # batch are decoded as one group
        evicted, refused = state.add_template(key, _intern(tpl))
        if evicted:
            batch.limit(exporter, evicted)
        if refused:
            what = (
                f"{len(fields)} fields, {tpl.min_record_len} bytes a record" if refused != "exporters" else ""
            )
            batch.refuse(
                offset, exporter, refused, f"template {tid} (domain {domain}) not kept {what}".strip()
            )
            continue
        waiting = state.take_pending(key)
        if waiting:
            batch.stat(exporter)["waiting_for_template"] -= len(waiting)
            # decoded once the whole datagram is read: options data (sampling, boot time) that came with the
            # template in the same datagram then applies to them too
            batch.replay.append((tpl, exporter, domain, tid, waiting, (boot_ms, uptime)))


# a v9 exporter whose boot time (export time less sysUptime, to the second) moved more than this between the data
# that waited and the template that came has restarted in between
RESTART_MS = 5_000


def _waited_for_another(tpl: Template, body: bytes, values: tuple, boot: tuple[int, int]) -> str | None:
    """Why data that waited for template `tpl` is not its data, or None. A router that reloads numbers its
    templates anew (Cisco IOS-XE: in the order its monitors come up), so the data of the last boot and the
    template of this one may share an id and nothing else: decoded with it, that data became flows no exporter
    sent (a review's IPv4 records read as IPv6 ones). Such data is given up, as nfdump gives it up (it never
    keeps data for a template to come)."""
    boot_ms, uptime = boot
    moved = boot_ms - values[2]
    # (sysUptime wraps after 49.7 days: the boot time then moves by 2**32 ms, and the exporter did not restart;
    # an exporter that reports a sysUptime of 0 tells no boot time at all: its estimate moves with the clock)
    restarted = min(abs(moved), abs(abs(moved) - WRAP)) > RESTART_MS and uptime != 0 and values[3] != 0
    if values[0] == 9 and boot_ms >= 0 and values[2] >= 0 and restarted:
        return f"the exporter restarted before it came (boot time moved {moved / 1000:+.0f} s)"
    if not tpl.variable_fields and tpl.record_len and len(body) % tpl.record_len >= 4:
        # (padding aligns a set to 4 bytes, RFC 3954 §5.3, RFC 7011 §3.3.1: more left over is another layout)
        return (
            f"its records of {tpl.record_len} bytes do not fill the {len(body)} bytes that waited "
            f"({len(body) % tpl.record_len} left)"
        )
    return None


def _replay_pending(batch: _Batch) -> None:
    """Decode data flowsets that were waiting for a template that has now arrived."""
    state = batch.state
    replay, batch.replay = batch.replay, []
    for tpl, exporter, domain, tid, waiting, boot in replay:
        for body, values, pending_offset in waiting:
            other = _waited_for_another(tpl, body, values, boot)
            if other is not None:
                detail = f"template {tid} (domain {domain}) came, but not for this data: {other}"
                _no_template(batch, exporter, pending_offset if pending_offset >= 0 else None, detail, False)
                continue
            if tpl.options:
                _read_options_data(batch, tpl, body, exporter, domain)
                continue
            sys_init = values[5] if values[5] >= 0 else state.sys_init_ms.get((exporter, domain), -1)
            sampling = values[6] if values[6] >= 0 else state.sampling.get((exporter, domain), -1)
            ctx = batch.add_ctx(exporter, (*values[:5], sys_init, sampling), pending_offset)
            _add_template_data(batch, tpl, body, ctx, exporter, pending_offset)


def _withdraw(batch: _Batch, exporter: str, domain: int, tid: int, options: bool, offset: int | None) -> None:
    """IPFIX template withdrawal: one template, or all of a set type when tid is the set id (RFC 7011 §8.1).
    Data of a withdrawn id until the exporter defines it again is no template's: rejected as it comes, never
    kept for the next definition (which may be another layout: a review's orphan set became a flow of proto 0)."""
    state = batch.state
    if tid in (2, 3):
        standing = (state.domain_options if options else state.domain_templates).get((exporter, 10, domain))
        gone = [(exporter, 10, domain, template_id) for template_id in list(standing or ())]
    else:
        # a withdrawal in an options template set withdraws an options template only (and a data template set's
        # a data template): a review withdrew a data template through set 3
        old = state.templates.get((exporter, 10, domain, tid))
        gone = [(exporter, 10, domain, tid)] if old is None or old.options == options else []
    for key in gone:
        if key in state.templates:
            state.forget_template(key)
        state.withdrawn.pop(key, None)
        state.withdrawn[key] = None
        while len(state.withdrawn) > state.limits.templates_total:
            del state.withdrawn[next(iter(state.withdrawn))]
        for _body, _values, waited_at in state.take_pending(key):  # (waited for a template now withdrawn)
            detail = f"template {key[3]} (domain {domain}) withdrawn before it was defined"
            _no_template(batch, exporter, waited_at if waited_at >= 0 else offset, detail, waited=True)


def _no_template(batch: _Batch, exporter: str, offset: int | None, detail: str, waited: bool) -> None:
    """A data set rejected as `no template` (`waited`: it was counted as waiting for one)."""
    batch.reject(offset, exporter, "no template", detail)
    stats = batch.stat(exporter)
    stats["no_template"] += 1
    if waited:
        stats["waiting_for_template"] -= 1


def _keep_pending(
    batch: _Batch, key: tuple[str, int, int, int], body: bytes, values: tuple, offset: int | None
) -> None:
    if not body:  # a set of no records: nothing to wait for
        return
    state = batch.state
    exporter = key[0]
    full, given_up = state.keep_pending(key, (body, values, offset if offset is not None else -1))
    for old_key, (_, _, old_offset) in given_up:  # other exporters' (or its own) oldest, for room
        detail = f"template {old_key[3]} (domain {old_key[2]}) not seen before the waiting data was given up"
        _no_template(batch, old_key[0], old_offset if old_offset >= 0 else None, detail, waited=True)
        batch.limit(old_key[0], ["pending_flowsets"])
    if full is not None:
        _no_template(batch, exporter, offset, f"template {key[3]} (domain {key[2]}) never seen", waited=False)
        batch.limit(exporter, [full])
        return
    batch.stat(exporter)["waiting_for_template"] += 1


def _read_options_data(
    batch: _Batch, tpl: Template, body: bytes | memoryview, exporter: str, domain: int
) -> int:
    """Options records are few: read sampling interval and boot time per record in Python. Returns how many."""
    if any(f[0] in (82, 83, 236) and not f[2] for f in tpl.fields):  # an interface or VRF table (issue 16)
        _keep_interface_names(batch.state, tpl, body, exporter, domain)
    if tpl.record_len == 0 or tpl.dtype is None:
        return 0
    count = len(body) // tpl.record_len
    if count == 0:
        return 0
    arr = np.frombuffer(bytes(body[: count * tpl.record_len]), dtype=tpl.dtype)
    roles = tpl.roles
    state = batch.state
    if exporter not in state.domains:  # evicted meanwhile: no state for it (bounded)
        return count
    # a row of a sampler table (or of an interface's sampling) gives that sampler's interval, not the domain's:
    # taken as the domain's, the last row read set the interval of every flow naming no sampler (a review)
    interface_at = _interface_scope(tpl)
    domain_wide = interface_at is None and not any(
        r in roles for r in ("sampler_id", "input_if", "output_if")
    )
    for i in range(count):
        rec = arr[i]
        interval = 0
        if "sampling" in roles:
            value = _scalar(rec["sampling"])
            if value > 0:
                interval = min(value, 2**31 - 1)
        if "sampling_probability" in roles and roles["sampling_probability"] == 8:
            chance = struct.unpack(">d", _scalar(rec["sampling_probability"]).to_bytes(8, "big"))[0]
            if 0 < chance <= 1:  # (NaN, 0 and more than 1 are no probability)
                interval = min(round(1 / chance), 2**31 - 1)
        if "sampling_packets" in roles:
            packets = _scalar(rec["sampling_packets"])
            space = _scalar(rec["sampling_space"]) if "sampling_space" in roles else 0
            if packets > 0:
                interval = min((packets + space) // packets, 2**31 - 1)
        if interval and domain_wide:
            state.sampling[(exporter, domain)] = interval
        if interval and "sampler_id" in roles:
            state.samplers.put(
                (exporter, domain, _scalar(rec["sampler_id"])), interval
            )  # a sampler table row
        elif interval and interface_at is not None:  # an interface's sampling (Cisco per-interface, IPFIX)
            offset, length = interface_at
            ifindex = (
                int.from_bytes(rec.tobytes()[offset : offset + length], "big") if tpl.version == 9 else None
            )
            if ifindex is None:
                ifindex = _scalar(rec["input_if"])
            if ifindex == 0:  # "no interface in particular": softflowd scopes its one interval so
                state.sampling[(exporter, domain)] = interval
            elif 0 < ifindex < 2**32:
                state.samplers.put((exporter, domain, IF_SAMPLING_KEY + ifindex), interval)
        if "sys_init_ms" in roles:
            value = _scalar(rec["sys_init_ms"])
            if 0 < value < 2**50:  # a unix time in ms (anything larger is garbage)
                state.sys_init_ms[(exporter, domain)] = value
    return count


def _interface_scope(tpl: Template) -> tuple[int, int] | None:
    """Where an options template's records name the interface they are of: (byte offset, length) of the v9
    scope field of type 2 "Interface" (RFC 3954 §6.1: its ids are scope types, not field ids), or (0, 0) for an
    IPFIX template with ingressInterface (IE 10) but no samplerId; None when its records are of no interface."""
    if tpl.version == 9:
        offset = 0
        for i, (field_id, length, _pen) in enumerate(tpl.fields):
            if i < tpl.scope_count and field_id == 2 and 0 < length <= 4:
                return offset, length
            offset += length
        return None
    if "input_if" in tpl.roles and "sampler_id" not in tpl.roles:
        return 0, 0
    return None


def _keep_interface_names(
    state: DecoderState, tpl: Template, body: bytes | memoryview, exporter: str, domain: int
) -> None:
    """Interface names of an options record set into the state (bounded as _PerExporter says)."""
    if exporter not in state.domains:  # evicted meanwhile: no state for it (bounded)
        return
    for ifindex, name in _interface_names(tpl, bytes(body)):
        key = (exporter, domain, ifindex)
        state.if_names.put(key, name)


def _interface_names(tpl: Template, raw: bytes) -> list[tuple[int, str]]:
    """(ifindex, name) of each options record naming an interface: IE 82 interfaceName, else IE 83
    interfaceDescription, of the ifindex in IE 10 ingressInterface / 14 egressInterface (in v9 also the scope
    type 2 "Interface", RFC 3954 §6.1). Fixed or variable length (RFC 7011 §7); one Python step per field, as
    options records are few (an interface table is sent every few minutes)."""
    out: list[tuple[int, str]] = []
    pos, end = 0, len(raw)
    while end - pos >= max(tpl.min_record_len, 1):  # less is padding
        ifindex, vrf, names = None, None, {}
        for i, (field_id, length, pen) in enumerate(tpl.fields):
            if length == VARIABLE_LENGTH:
                if pos >= end:
                    return out
                length, pos = raw[pos], pos + 1
                if length == 255:  # long form, two more bytes of length
                    length, pos = int.from_bytes(raw[pos : pos + 2], "big"), pos + 2
            if pos + length > end:
                return out
            value, pos = raw[pos : pos + length], pos + length
            v9_scope = tpl.version == 9 and i < tpl.scope_count
            if pen or not length:
                continue
            if (field_id == 2 if v9_scope else field_id in (10, 14)) and ifindex is None:
                ifindex = int.from_bytes(value, "big")
            elif not v9_scope and field_id == 234 and vrf is None and length <= 4:
                vrf = int.from_bytes(value, "big")
            elif not v9_scope and field_id in (82, 83, 236):
                names.setdefault(field_id, value)
        if vrf is not None and 236 in names:  # a VRF table row (IOS XR: scope system, 234 + 236)
            ifindex, names = VRF_NAME_KEY + vrf, {82: names[236]}
        name = _name_text(names.get(82, b"")) or _name_text(names.get(83, b""))
        if ifindex is not None and name:
            out.append((ifindex, name))
    return out


def _name_text(value: bytes) -> str:
    """An exporter's octet string as text: up to the first NUL (v9 pads names with them), UTF-8 (bad bytes
    replaced), at most IF_NAME_CHARS characters. Printed through the one printer, which escapes controls."""
    return value.split(b"\0", 1)[0].decode("utf-8", "replace").strip()[:IF_NAME_CHARS]


def _scalar(value: Any) -> int:
    if isinstance(value, np.void | bytes):
        return int.from_bytes(bytes(value), "big")
    return int(value)


def _track_ipfix(
    batch: _Batch, exporter: str, key: tuple[str, int, int], seq: int, data: int | None, options: int
) -> None:
    """IPFIX sequence numbers count data records (RFC 7011 §3.1). Exporters differ in what they count (see
    _Sequence): the first two messages of a stream tell, then gaps are counted in that convention."""
    track = batch.state.sequences.get(key)
    if track is None:
        track = _new_track(batch, key)
        if track is None:
            return
    if data is None:  # records that could not be counted (no template yet): re-synchronise
        track.expected = None
        track.last = None
        return
    everything = data + options
    if not track.locked and track.last is not None:
        last_seq, last_data, last_all = track.last
        matches = []
        for after, with_options in ((False, True), (False, False), (True, False), (True, True)):
            base = last_seq if after else last_seq + (last_all if with_options else last_data)
            own = (everything if with_options else data) if after else 0
            if (seq - own - base) % WRAP == 0:
                matches.append((after, with_options, (last_seq if after else base) % WRAP))
        if matches:
            track.after, track.with_options, track.expected = matches[0]
            afters = {m[0] for m in matches}
            if len(afters) == 1:  # else equal record counts fit both numberings: decide on a later message
                track.locked = True
                options_fit = {m[1] for m in matches}
                # options records counted or not is only told by a message that has some; until then, what
                # each convention's reference does: RFC 7011 counts them, softflowd does not
                track.with_options = options_fit.pop() if len(options_fit) == 1 else not track.after
    track.last = [seq, data, everything]
    count = everything if track.with_options else data
    _track_sequence(batch, exporter, key, (seq - count) % WRAP if track.after else seq, count)


def _new_track(batch: _Batch, key: tuple[str, int, int]) -> _Sequence | None:
    """Sequence tracking for a new (exporter, version, domain), within the state's bounds; None if refused
    (the datagram still decodes; only its losses go uncounted)."""
    evicted, refused = batch.state.admit_domain(*key)
    batch.limit(key[0], [*evicted, *([refused] if refused else [])])
    if refused:
        return None
    track = batch.state.sequences[key] = _Sequence()
    return track


def _track_sequence(
    batch: _Batch, exporter: str, key: tuple[str, int, int], seq: int, count: int | None
) -> None:
    """Count lost units between the expected and the received sequence number; a late (reordered) arrival
    fills the gap it belongs to instead of counting as a new one; duplicates count nothing."""
    state = batch.state
    track = state.sequences.get(key)
    if track is None:
        track = _new_track(batch, key)
        if track is None:
            return
    if count is None:
        track.expected = None
        return
    stats = batch.stat(exporter)
    if track.expected is None:
        track.expected = (seq + count) % WRAP
        return
    ahead = (seq - track.expected) % WRAP
    if ahead == 0:
        track.expected = (seq + count) % WRAP
    elif ahead < WRAP // 2:
        stats["sequence_gaps"] += 1
        stats["lost"] += ahead
        track.missing.append([track.expected, seq])
        del track.missing[:-64]
        track.expected = (seq + count) % WRAP
    else:  # behind: a late datagram; if it falls in an open gap, that much was not lost after all
        for gap in track.missing:
            gap_start, gap_stop = gap
            width = (gap_stop - gap_start) % WRAP
            into = (seq - gap_start) % WRAP
            if into < width:
                filled = min(max(count, 1), width - into)
                stats["lost"] -= filled
                pieces = [p for p in ([gap_start, seq], [(seq + filled) % WRAP, gap_stop]) if p[0] != p[1]]
                index = track.missing.index(gap)
                track.missing[index : index + 1] = pieces
                if not pieces:
                    stats["sequence_gaps"] -= 1
                break


# ---- columns ------------------------------------------------------------------------------------------------
def _decode_walked(batch: _Batch, walked: Walked, ipv4_as_integers: bool = False) -> pa.Table:
    """All groups' records as one table with FLOWS_TEXT_DICTIONARY types (rejects and flow counts into batch);
    `ipv4_as_integers`: see decode_walked."""
    if not walked.groups:
        return FLOWS_TEXT_DICTIONARY.empty_table()
    exporters = pa.array(walked.exporters, pa.string())
    batch.samplers, batch.if_names = walked.samplers, walked.if_names
    tables = []
    for tpl, records, counts, ctx_ids in walked.groups:
        table = _decode_group(batch, tpl, records, counts, ctx_ids, walked.ctx, exporters, ipv4_as_integers)
        if table is not None and table.num_rows:
            tables.append(table)
    if not tables:
        return FLOWS_TEXT_DICTIONARY.empty_table()
    if any(t.schema != tables[0].schema for t in tables):  # addresses as integers of both families, text
        columns = [one_type([t.column(i) for t in tables]) for i in range(tables[0].num_columns)]
        tables = [
            pa.Table.from_arrays([c[j] for c in columns], names=tables[0].column_names)
            for j in range(len(tables))
        ]
    return pa.concat_tables(tables)


def _uint(arr: np.ndarray, role: str, roles: dict[str, int], dtype: type = np.int64) -> np.ndarray | None:
    """A numeric field as `dtype` (int64 by default; uint64 beyond 2**63 is clipped), whatever its wire length
    (reduced-size encoding, RFC 7011 §6.2). Narrow dtypes are for fields whose wire type fits them."""
    if role not in roles:
        return None
    col = arr[role]
    if col.dtype.kind == "V":
        raw = np.frombuffer(col.tobytes(), dtype=np.uint8).reshape(len(col), roles[role])
        raw = raw[:, -8:]
        out = np.zeros(len(col), dtype=np.uint64)
        for j in range(raw.shape[1]):
            out = (out << np.uint64(8)) | raw[:, j].astype(np.uint64)
        col = out
    if col.dtype.itemsize >= np.dtype(dtype).itemsize:
        limit = np.iinfo(dtype).max
        if col.dtype.itemsize > np.dtype(dtype).itemsize or col.dtype.kind == "u":
            col = np.minimum(col, col.dtype.type(limit))
    return col.astype(dtype)


class _PerRecord:
    """Context values (one row per datagram) repeated out to one value per record, column by column."""

    def __init__(self, ctx: np.ndarray, ctx_ids: np.ndarray, counts: np.ndarray) -> None:
        self.rows = ctx[ctx_ids]
        self.counts = counts
        self.cache: dict[int, np.ndarray] = {}

    def __getitem__(self, column: int) -> np.ndarray:
        values = self.cache.get(column)
        if values is None:
            values = self.cache[column] = np.repeat(self.rows[:, column], self.counts)
        return values


def _decode_group(
    batch: _Batch,
    tpl: Template,
    records: bytes,
    counts: np.ndarray,
    ctx_ids: np.ndarray,
    ctx: np.ndarray,
    exporters: pa.Array,
    ipv4_as_integers: bool = False,
) -> pa.Table | None:
    roles = tpl.roles
    total = int(counts.sum())
    arr = np.frombuffer(records, dtype=tpl.dtype, count=total)
    c = _PerRecord(ctx, ctx_ids, counts)

    has4 = "src_addr4" in roles and "dst_addr4" in roles
    has6 = "src_addr6" in roles and "dst_addr6" in roles
    section = inner_headers.section_bytes(arr, roles)  # issue 16: IE 313/315 packet bytes, if any
    if not (has4 or has6) and section is None:
        for cid, count in zip(ctx_ids, counts, strict=True):
            exporter = batch.exporters[int(ctx[cid, _CTX_EXPORTER])]
            offset = int(ctx[cid, _CTX_OFFSET])
            batch.reject(
                offset if offset >= 0 else None,
                exporter,
                "no addresses",
                f"template without address fields: {count} records",
            )
        return None

    if has4 and has6:
        # a template carrying both families: the ip version field (or a zero v4 address) decides
        ip_version = _uint(arr, "ip_version", roles, np.int16)
        use6 = (ip_version == 6) if ip_version is not None else (arr["src_addr4"] == 0)
        src = _address_text_mixed(arr, use6)
        dst = _address_text_mixed(arr, use6, "dst")
        version_col = np.where(use6, 6, 4).astype(np.int8)
    elif has4 and ipv4_as_integers and section is None:  # formatted by the lake writer, once per row group
        src = pa.array(arr["src_addr4"].astype(np.uint32))
        dst = pa.array(arr["dst_addr4"].astype(np.uint32))
        version_col = np.full(total, 4, dtype=np.int8)
    elif has4:
        src, dst = _ipv4_text(arr["src_addr4"]), _ipv4_text(arr["dst_addr4"])
        version_col = np.full(total, 4, dtype=np.int8)
    elif has6 and ipv4_as_integers and section is None:  # likewise (decode_walked)
        none, every = np.zeros(0, np.uint32), np.ones(total, bool)
        src = addresses(none, arr["src_addr6"], every)
        dst = addresses(none, arr["dst_addr6"], every)
        version_col = np.full(total, 6, dtype=np.int8)
    elif has6:
        src, dst = _ipv6_text(arr["src_addr6"]), _ipv6_text(arr["dst_addr6"])
        version_col = np.full(total, 6, dtype=np.int8)
    else:  # the packet section is all there is (filled in below)
        src = dst = pa.nulls(total, pa.string())
        version_col = np.zeros(total, dtype=np.int8)

    packets = _uint(arr, "packets", roles)
    if packets is None:
        packets = _uint(arr, "packets_total", roles)
    if packets is None:
        packets = _uint(arr, "packets_initiator", roles)
    nbytes = _uint(arr, "bytes", roles)
    if nbytes is None:
        nbytes = _uint(arr, "bytes_total", roles)
    if (
        nbytes is None
    ):  # a firewall's flow events (NSEL): the initiator -> responder direction, as this row is
        nbytes = _uint(arr, "bytes_initiator", roles)
    src_port = _uint(arr, "src_port", roles, np.int32)
    dst_port = _uint(arr, "dst_port", roles, np.int32)
    proto = _uint(arr, "proto", roles, np.int16)
    proto = np.zeros(total, np.int16) if proto is None else proto
    src_port = np.zeros(total, np.int32) if src_port is None else src_port
    dst_port = np.zeros(total, np.int32) if dst_port is None else dst_port
    # ICMP type/code travel in dst_port (type*256 + code), as nfdump shows them. Exporters that use the source
    # port: fprobe puts the type there and the code in the destination port; Cisco puts type/code there in
    # host byte order (nfdump swaps the bytes). Both end up as type*256 + code, source port 0. A destination port
    # that holds type/code already (above 255) is kept whatever the source port holds: an exporter copying the
    # ICMP identifier there let the sender choose its type (a review: 0x1234 made echo request 8/0 type 18)
    is_icmp = (proto == 1) | (proto == 58) if tpl.version in (9, 10) else (proto == 1)
    if is_icmp.any():
        split = is_icmp & (src_port != 0) & (src_port < 256) & (dst_port < 256)
        in_src = split | (is_icmp & (src_port != 0) & (dst_port == 0))
        swapped = ((src_port & 0xFF) << 8) | ((src_port >> 8) & 0xFF)
        dst_port = np.where(split, src_port * 256 + dst_port, np.where(in_src, swapped, dst_port))
        src_port = np.where(is_icmp, 0, src_port)  # ICMP has no ports (nfdump shows none either)
        icmp = _uint(arr, "icmp", roles, np.int32)
        if icmp is None and ("icmp_type" in roles or "icmp_code" in roles):
            icmp_type = _uint(arr, "icmp_type", roles, np.int32)
            icmp_code = _uint(arr, "icmp_code", roles, np.int32)
            icmp = (0 if icmp_type is None else icmp_type * 256) + (0 if icmp_code is None else icmp_code)
            # separate type and code fields say it all, echo reply (0/0) included: what the ports hold then is
            # not type/code (Cisco ASA puts the ICMP identifier in the source port), nfdump prints 0 too
            dst_port = np.where(is_icmp, icmp, dst_port)
        elif icmp is not None:
            dst_port = np.where(is_icmp & (icmp != 0), icmp, dst_port)
    tcp_flags = _uint(arr, "tcp_flags", roles, np.int16)
    input_if = _uint(arr, "input_if", roles, np.int32)
    output_if = _uint(arr, "output_if", roles, np.int32)

    tunnel: dict[str, pa.Array] = {}
    kept = None
    if section is not None:  # ---- hook (issue 16): the inner conversation of tunnelled/sampled packets
        over = inner_headers.overlay(section, has4 or has6)
        use = pa.array(over.use_inner)
        src, dst = (
            pc.if_else(use, over.src, _text(src).cast(pa.string())),
            pc.if_else(use, over.dst, _text(dst).cast(pa.string())),
        )
        version_col = np.where(over.use_inner, over.ip_version, version_col).astype(np.int8)
        proto = np.where(over.use_inner, over.proto, proto).astype(np.int16)
        src_port = np.where(over.use_inner, over.src_port, src_port).astype(np.int32)
        dst_port = np.where(over.use_inner, over.dst_port, dst_port).astype(np.int32)
        flags = np.zeros(total, np.int16) if tcp_flags is None else tcp_flags
        tcp_flags = np.where(over.use_inner & (flags == 0), over.tcp_flags, flags).astype(np.int16)
        tunnel = {
            "tunnel_src_addr": over.tunnel_src,
            "tunnel_dst_addr": over.tunnel_dst,
            "tunnel_proto": over.tunnel_proto,
        }
        kept = None if over.keep.all() else over.keep
        if packets is None and nbytes is None:
            packets, nbytes = over.sample_packets, over.sample_bytes
    start_ms, end_ms = _times(tpl, arr, c)

    exporter_ids = c[_CTX_EXPORTER]
    # the interval: the domain's, else the interface's the flow came in on, else the record's own, else that of
    # the record's sampler (issue 16), each over the one before where known
    sampling = c[_CTX_SAMPLING]
    # (per-interface tables: a review found them lost in IPFIX, and in v9 their last row applied to every flow)
    if "input_if" in roles and batch.samplers:
        ifindex = _uint(arr, "input_if", roles)
        keys = np.where(ifindex >= 0, ifindex + IF_SAMPLING_KEY, -1)  # type: ignore[operator]
        values, index = _looked_up(batch, batch.samplers, keys, c)
        known = np.array([*values, -1], dtype=np.int64)[index]  # index -1: the appended -1, unknown
        sampling = np.where(known > 0, known, sampling)
    in_record = _uint(arr, "sampling", roles)  # issue 16: some routers put the interval in each data record
    if in_record is not None:
        sampling = np.where(in_record > 0, np.minimum(in_record, 2**31 - 1), sampling)
    if "sampler_id" in roles and batch.samplers:
        values, index = _looked_up(batch, batch.samplers, _uint(arr, "sampler_id", roles), c)
        known = np.array([*values, -1], dtype=np.int64)[index]
        sampling = np.where(known > 0, known, sampling)
    columns = {
        "ts_start": pa.array(start_ms * 1000, type=TS),
        "ts_end": pa.array(end_ms * 1000, type=TS),
        "src_addr": src,
        "dst_addr": dst,
        "src_port": pa.array(src_port),
        "dst_port": pa.array(dst_port),
        "proto": pa.array(proto),
        "packets": pa.array(np.zeros(total, np.int64) if packets is None else packets),
        "bytes": pa.array(np.zeros(total, np.int64) if nbytes is None else nbytes),
        "tcp_flags": pa.array(np.zeros(total, np.int16) if tcp_flags is None else tcp_flags),
        "ip_version": pa.array(version_col),
        "exporter": pa.DictionaryArray.from_arrays(pa.array(exporter_ids.astype(np.int32)), exporters),
        "input_if": None if input_if is None else pa.array(input_if),
        "output_if": None if output_if is None else pa.array(output_if),
        "sampling_interval": pa.array(sampling.astype(np.int32), mask=sampling < 0),
        "source": pa.DictionaryArray.from_arrays(
            pa.array(np.zeros(total, dtype=np.int32)), pa.array([batch.source], pa.string())
        ),
        **tunnel,
        **_router_columns(batch, arr, roles, input_if, output_if, c),
    }
    # times a lake partition cannot hold (before 1970, after 2100: garbage or a lying exporter) are rejects
    sane = (start_ms >= 0) & (start_ms < MAX_TIME_MS) & (end_ms >= 0) & (end_ms < MAX_TIME_MS)
    all_sane = bool(sane.all())
    if not all_sane:
        _reject_per_exporter(
            batch, ~sane, exporter_ids, c, "bad time", " with a start or end before 1970 or after 2100"
        )
    if kept is not None:  # issue 16: records whose only addresses were in a packet section that is not IP
        _reject_per_exporter(batch, sane & ~kept, exporter_ids, c, "no addresses", ": packet section not IP")
        sane &= kept
        all_sane = bool(sane.all())
    # a start outside the plausible window (units.time_window) is a reject naming its time and its datagram, as
    # the lake writer would make it without the datagram (lake.split_implausible, still there for other inputs)
    plausible = _plausible_ms(start_ms)
    if plausible is not None:
        wrong = sane & ~plausible
        if wrong.any():
            batch.reject_tables.append(
                _implausible(batch, start_ms[wrong], exporter_ids[wrong], c[_CTX_OFFSET][wrong])
            )
            sane &= plausible
            all_sane = False
    per_exporter = np.bincount(
        exporter_ids[sane] if not all_sane else exporter_ids, minlength=len(batch.exporters)
    )
    for exporter_idx in np.flatnonzero(per_exporter):
        batch.stat(batch.exporters[int(exporter_idx)])["flows"] += int(per_exporter[exporter_idx])
    arrays = []
    fields = []
    for f in FLOWS_TEXT_DICTIONARY:
        array = columns.get(f.name)
        if array is None:
            array = null_column(total, f.type)
        elif f.type == TEXT_DICTIONARY and not is_integers(array.type):
            array = _text(array)
        arrays.append(array)
        fields.append(f if array.type == f.type else pa.field(f.name, array.type, f.nullable))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    return table if all_sane else table.filter(pa.array(sane))


def _looked_up(
    batch: _Batch, table: dict[tuple[str, int, int], Any], ids: np.ndarray, c: _PerRecord
) -> tuple[list[Any], np.ndarray]:
    """Per record, what its exporter's options table (sampler intervals, interface names) says of `ids`: the
    known values and each record's index into them, -1 where unknown. The (exporter, domain) pairs are taken
    from the context rows (one per data set, few), then one vectorised search per pair over the ids it named."""
    rows = c.rows[:, [_CTX_EXPORTER, _CTX_DOMAIN]]
    pairs = rows[:1] if (rows == rows[:1]).all() else np.unique(rows, axis=0)  # one exporter: the usual
    values: list[Any] = []
    index = np.full(len(ids), -1, dtype=np.int32)
    for exporter_id, domain in pairs.tolist():
        exporter = batch.exporters[exporter_id]
        # ids are as long as the exporter made the field: ids no record column can hold never match
        known = sorted(
            (i, v) for (e, d, i), v in table.items() if e == exporter and d == domain and 0 <= i < 2**63
        )
        if not known:
            continue
        keys = np.array([i for i, _ in known], dtype=np.int64)  # ifindex: up to 2**32 - 1
        if len(pairs) == 1:
            sel, mine = slice(None), ids
        else:
            sel = (c[_CTX_EXPORTER] == exporter_id) & (c[_CTX_DOMAIN] == domain)
            mine = ids[sel]
        if len(keys) == 1:
            found = np.where(mine == keys[0], len(values), -1)
        else:
            at = np.minimum(np.searchsorted(keys, mine), len(keys) - 1)
            found = np.where(keys[at] == mine, at + len(values), -1)
        index[sel] = found
        values.extend(v for _, v in known)
    return values, index


_DIRECTION_TEXT = pa.array([*DIRECTIONS, *(str(code) for code in range(len(DIRECTIONS), 256))])
_END_REASON_TEXT = pa.array([*END_REASONS, *(str(code) for code in range(len(END_REASONS), 256))])


def _router_columns(
    batch: _Batch,
    arr: np.ndarray,
    roles: dict[str, int],
    input_if: np.ndarray | None,
    output_if: np.ndarray | None,
    c: _PerRecord,
) -> dict[str, pa.Array]:
    """schema.ROUTER_COLUMNS the template carries (issue 16); absent ones stay null."""
    out: dict[str, pa.Array] = {}
    for role, names in (("flow_direction", _DIRECTION_TEXT), ("flow_end_reason", _END_REASON_TEXT)):
        if roles.get(role) == 1:  # the element's own size: every code has its text
            out[role] = pa.DictionaryArray.from_arrays(pa.array(arr[role].astype(np.int32)), names)
        elif role in roles:  # reduced-size or padded: a code past 255 is not one of the element's: null
            code = _uint(arr, role, roles)
            out[role] = pa.DictionaryArray.from_arrays(
                pa.array(np.minimum(code, 255).astype(np.int32), mask=code > 255), names
            )
    for role in ("ingress_vrf", "egress_vrf"):
        vrf = _uint(arr, role, roles)
        if vrf is not None:
            out[role] = pa.array(vrf)
    tos = _uint(arr, "tos", roles)
    if tos is not None:  # a byte; a wider (padded) field that is not one is clipped like any other counter
        out["tos"] = pa.array(np.minimum(tos, 255).astype(np.int16))
    stack = [_uint(arr, role, roles) for role in MPLS_ROLES if role in roles]
    if stack:
        out["mpls_labels"] = _mpls_text(np.stack(stack, axis=1))
    if batch.if_names:
        for column, ifindex in (("input_if_name", input_if), ("output_if_name", output_if)):
            if ifindex is not None:
                names, index = _looked_up(batch, batch.if_names, ifindex, c)
                unknown = index < 0
                indices = pa.array(np.maximum(index, 0), mask=unknown) if unknown.any() else pa.array(index)
                out[column] = pa.DictionaryArray.from_arrays(indices, pa.array(names, pa.string()))
    if batch.if_names:  # VRF names share the names table, keyed VRF_NAME_KEY + VRF id
        for column, vrf_column in (("ingress_vrf_name", "ingress_vrf"), ("egress_vrf_name", "egress_vrf")):
            if vrf_column in out:
                vrf = out[vrf_column].to_numpy() + VRF_NAME_KEY
                names, index = _looked_up(batch, batch.if_names, vrf, c)
                unknown = index < 0
                indices = pa.array(np.maximum(index, 0), mask=unknown) if unknown.any() else pa.array(index)
                out[column] = pa.DictionaryArray.from_arrays(indices, pa.array(names, pa.string()))
    if router_fields.ROLES.intersection(roles):  # issue 16: NAT, firewall events, SRv6 (decided per template)
        out.update(router_fields.columns(arr, roles, _uint, _ipv4_text, _ipv6_text))
    return out


def _mpls_text(entries: np.ndarray) -> pa.Array:
    """Label stack entries (records x stack depth, 24 bits each) as nfdump prints its mpls1..mpls10 columns,
    "label-exp-S", top first, space-separated, up to the last non-zero entry; null when there is none.
    Formatted once per distinct stack."""
    uniq, index = np.unique(entries, axis=0, return_inverse=True)
    texts = []
    for row in uniq.tolist():
        while row and row[-1] == 0:
            row.pop()
        texts.append(" ".join(f"{v >> 4}-{(v >> 1) & 7}-{v & 1}" for v in row) or None)
    return pa.array(texts, pa.string()).take(pa.array(index.reshape(-1)))


def _times(tpl: Template, arr: np.ndarray, c: _PerRecord) -> tuple[np.ndarray, np.ndarray]:
    """Absolute start and end of each record in unix ms, from whatever time fields the layout carries."""
    roles = tpl.roles
    version = tpl.version
    if version in FIXED_LAYOUTS or (version == 9 and ("start_uptime" in roles or "end_uptime" in roles)):
        first = _uint(arr, "start_uptime", roles)
        last = _uint(arr, "end_uptime", roles)
        if first is None or last is None:  # (v9 with one of them: the other from a duration, else equal)
            span = _duration(arr, roles)
            first = last - span if first is None else first  # type: ignore[operator]
            last = first + span if last is None else last
        boot = c[_CTX_BOOT]
        # a start later than the end means sysUptime wrapped in between (as nfdump reads it)
        start = boot + first - np.where(first > last, WRAP, 0)
        end = boot + last
        if version in (1, 5, 7):
            # the counter wrapped after the flow ended but before export (v5/v7: >100 s, Cisco bug CSCei12353; v7
            # was left out: such flows landed 49.7 days late, a review against nfdump)
            uptime = c[_CTX_UPTIME]
            margin = 0 if version == 1 else 100_000
            late = (last > uptime) & ((last - uptime) > margin)
            start = start - np.where(late, WRAP, 0)
            end = end - np.where(late, WRAP, 0)
        return start, end

    export_ms = c[_CTX_EXPORT]
    start = _point_in_time(arr, roles, "start", c)
    end = _point_in_time(arr, roles, "end", c)
    if start is None and end is None:
        observed = _point_in_time(arr, roles, "obs", c)
        start = observed if observed is not None else export_ms.copy()
        end = start + _duration(arr, roles)
    elif start is None:
        start = end - _duration(arr, roles)
    elif end is None:
        end = start + _duration(arr, roles)
    return start, end


def _duration(arr: np.ndarray, roles: dict[str, int]) -> np.ndarray | int:
    """The record's duration in ms (IE 161, else 162 in µs), 0 when it has none."""
    duration = _uint(arr, "duration_ms", roles)
    if duration is not None:
        return duration
    micro = _uint(arr, "duration_us", roles)
    return micro // 1000 if micro is not None else 0


def _point_in_time(arr: np.ndarray, roles: dict[str, int], which: str, c: _PerRecord) -> np.ndarray | None:
    value = _uint(arr, f"{which}_ms", roles)
    if value is not None:
        return value
    value = _uint(arr, f"{which}_s", roles)
    if value is not None:
        return value * 1000
    if f"{which}_ntp" in roles and roles[f"{which}_ntp"] == 8:
        raw = arr[f"{which}_ntp"].astype(np.uint64)  # all 64 bits: seconds since 1900 . fraction
        seconds = (raw >> np.uint64(32)).astype(np.int64) - NTP_UNIX_OFFSET_S
        fraction_ms = ((raw & np.uint64(0xFFFFFFFF)) * np.uint64(1000)) >> np.uint64(32)
        return seconds * 1000 + fraction_ms.astype(np.int64)
    value = _uint(arr, f"{which}_delta_us", roles)
    if value is not None:
        return c[_CTX_EXPORT] - value // 1000
    value = _uint(arr, f"{which}_uptime", roles)
    if value is not None:
        # IPFIX sysUpTime fields: ms since systemInitTimeMilliseconds, from the record or from options data
        init = _uint(arr, "sys_init_ms", roles)
        if init is None:
            init = c[_CTX_INIT]
        if (init < 0).any():
            # no boot time known: assume the latest end in the record is the export time
            other = _uint(arr, "end_uptime", roles)
            init = np.where(init < 0, c[_CTX_EXPORT] - (other if other is not None else value), init)
        return init + value
    return None


TEXT_DICTIONARY = pa.dictionary(pa.int32(), pa.string())
FLOWS_TEXT_DICTIONARY = pa.schema(
    [pa.field(f.name, TEXT_DICTIONARY, f.nullable) if pa.types.is_string(f.type) else f for f in FLOWS]
)


def _text(array: pa.Array) -> pa.Array:
    """Text columns travel dictionary-encoded (each distinct address formatted once, cheap to sort/write)."""
    if array.type == TEXT_DICTIONARY:
        return array
    if pa.types.is_dictionary(array.type):
        return array.cast(TEXT_DICTIONARY)
    return pc.dictionary_encode(array.cast(pa.string()))


_ipv4_text = ipv4_text  # dotted quads, each distinct address formatted once (address_text)


_ipv6_text = ipv6_text  # canonical IPv6 text, `ipaddress` once per distinct address (address_text)


def _address_text_mixed(arr: np.ndarray, use6: np.ndarray, end: str = "src") -> pa.Array:
    v4 = _ipv4_text(arr[f"{end}_addr4"])
    v6 = _ipv6_text(arr[f"{end}_addr6"])
    return pc.if_else(pa.array(use6), v6.cast(pa.string()), v4.cast(pa.string()))


def _reject_per_exporter(
    batch: _Batch, bad: np.ndarray, exporter_ids: np.ndarray, c: _PerRecord, reason: str, what: str
) -> None:
    """One reject per exporter for its records where `bad`: how many, and the offsets of the first and last
    datagram holding one (the reject's offset is the first's). One sort of the bad records, not a pass over
    every record per exporter (a capture may hold thousands of senders)."""
    ids, offsets = exporter_ids[bad], c[_CTX_OFFSET][bad]
    order = np.argsort(ids, kind="stable")
    ids, offsets = ids[order], offsets[order]
    senders, starts, counts = np.unique(ids, return_index=True, return_counts=True)
    if not len(senders):
        return
    known = offsets >= 0
    firsts = np.minimum.reduceat(np.where(known, offsets, np.iinfo(np.int64).max), starts)
    lasts = np.maximum.reduceat(np.where(known, offsets, -1), starts)
    for sender, n, first, last in zip(
        senders.tolist(), counts.tolist(), firsts.tolist(), lasts.tolist(), strict=True
    ):
        where = "" if last < 0 else f" in datagrams at offsets {first}..{last}"
        batch.reject(
            None if last < 0 else first, batch.exporters[sender], reason, f"{n} records{where}{what}"
        )


def _plausible_ms(start_ms: np.ndarray) -> np.ndarray | None:
    """Where a start (ms since 1970) lies in units.time_window; None when every one does (the usual case)."""
    earliest, latest = time_window()
    low, high = int(earliest.timestamp() * 1000), int(latest.timestamp() * 1000)
    if not len(start_ms) or (int(start_ms.min()) >= low and int(start_ms.max()) <= high):
        return None
    return (start_ms >= low) & (start_ms <= high)


def _implausible(
    batch: _Batch, start_ms: np.ndarray, exporter_ids: np.ndarray, offsets: np.ndarray
) -> pa.Table:
    """One reject per record whose start is outside the plausible window, with its datagram's offset."""
    from tracepipe.lake import implausible_detail  # (only here: the lake's module is not a decoder's)

    n = len(start_ms)
    for exporter_idx, count in zip(*np.unique(exporter_ids, return_counts=True), strict=True):
        batch.stat(batch.exporters[int(exporter_idx)])["rejects"] += int(count)
    fields = ["offset", "exporter", "reason", "detail", "source"]
    schema = pa.schema([REJECTS.field(f) for f in fields])
    exporters = pa.array(batch.exporters, pa.string()).take(pa.array(exporter_ids))
    starts = pa.array(start_ms * 1000, TS)
    return pa.table(
        [
            pa.array(offsets, mask=offsets < 0).cast(schema.field("offset").type),
            exporters.cast(schema.field("exporter").type),
            pa.repeat(pa.scalar("time outside plausible window", schema.field("reason").type), n),
            implausible_detail(starts, "ts_start").cast(schema.field("detail").type),
            pa.repeat(pa.scalar(batch.source, schema.field("source").type), n),
        ],
        schema=schema,
    )


def _batch_rejects(batch: _Batch, source: str) -> pa.Table:
    """The rejects of a decode: those made one by one, then those made for many records at once."""
    rejects = _rejects_table(batch.rejects, source)
    return pa.concat_tables([rejects, *batch.reject_tables]) if batch.reject_tables else rejects


def _rejects_table(rows: list[tuple[int | None, str, str, str]], source: str) -> pa.Table:
    fields = ["offset", "exporter", "reason", "detail", "source"]
    schema = pa.schema([REJECTS.field(f) for f in fields])
    if not rows:
        return schema.empty_table()
    offsets, exporters, reasons, details = zip(*rows, strict=True)
    return pa.table(
        [list(offsets), list(exporters), list(reasons), list(details), [source] * len(rows)], schema=schema
    )


def flush_pending(state: DecoderState, source: str) -> pa.Table:
    """Data flowsets still waiting for a template at the end of an input: rejects "no template" (and forgotten)."""
    rows = [
        (
            offset if offset >= 0 else None,
            key[0],
            "no template",
            f"v{key[1]} template {key[3]} (domain {key[2]}) never seen; {len(body)} bytes",
        )
        for key, entries in state.pending.items()
        for body, _, offset in entries
    ]
    state.clear_pending()
    return _rejects_table(rows, source)
