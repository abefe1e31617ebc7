"""What routers say about a flow beyond its 5-tuple (issue 16): flowDirection (IE 61), flowEndReason (136), the
MPLS label stack (70-79), ingress/egress VRF (234/235) and interface names from options data (82/83).

Expected values come from the committed router captures (tests/data/routers/PROVENANCE.md) and, where nfdump
prints the field (`dir`, `mpls1..mpls10` of `nfdump -o csv`), from a real nfcapd fed the same datagrams over
UDP on 127.0.0.1. nfdump prints neither end reason, VRF nor interface names: those are pinned from the bytes.
No committed capture carries an interface table (IE 82/83), so those datagrams are built here by hand."""

from __future__ import annotations

import csv
import dataclasses
import pickle
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import probes
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
from test_router_exports import CASES, DATA, combined_capture

from tracepipe.ingest import netflow
from tracepipe.ingest.netflow import DecoderState, decode_walked, walk_datagrams
from tracepipe.limits import DEFAULT

# cases whose templates carry IE 61 and/or 70-79 (read from the templates), and what nfdump prints for them
NFDUMP_CASES = ("ipfix-mpls", "v9-sampled", "v9-multi-sampling", "v9-record-sampling", "ipfix-icmp")
KEY = ("src_addr", "dst_addr", "src_port", "dst_port")


def _payloads(case: str) -> list[bytes]:
    return [p for f in CASES[case][0] for p in probes.export_payloads(DATA / f)]


def _ours(case: str) -> list[dict]:
    result, _ = decode(_payloads(case))
    assert result.rejects.num_rows == 0
    return result.flows.to_pylist()


@pytest.fixture(scope="module")
def nfdump_csv(tmp_path_factory) -> dict[str, list[dict]]:
    """case -> nfdump's CSV rows for the case's datagrams, sent to a real nfcapd."""
    base = tmp_path_factory.mktemp("router-fields")
    out = {}
    for case in NFDUMP_CASES:
        capture = combined_capture(case, base)
        port = probes.free_udp_port()
        with probes.nfcapd_receiving(port, base / f"nfcapd-{case}") as nfcapd:
            probes.replay_udp(probes.export_payloads(capture), (probes.LOOPBACK_V4, port))
        text = probes.nfdump_csv(nfcapd.out_dir, base / f"{case}.csv").read_text()
        body = text.split("\nSummary", 1)[0]
        out[case] = list(csv.DictReader(body.splitlines()))
    return out


def _nfdump_mpls(row: dict) -> str | None:
    entries = [row[f"mpls{i}"] for i in range(1, 11)]
    while entries and entries[-1] == "0-0-0":
        entries.pop()
    return " ".join(entries) or None


@pytest.mark.parametrize("case", NFDUMP_CASES)
def test_direction_and_mpls_labels_as_nfdump_prints_them(case, nfdump_csv):
    """nfdump's `dir` is IE 61 (0 ingress, 1 egress); its mpls1..mpls10 are "label-exp-S", which our
    mpls_labels lists top first up to the last non-zero entry."""
    ours = _ours(case)
    theirs = nfdump_csv[case]
    assert len(ours) == len(theirs) > 0
    direction = {"ingress": "0", "egress": "1"}
    got = sorted(
        (r["src_port"], r["dst_port"], direction[r["flow_direction"]], r["mpls_labels"] or "") for r in ours
    )
    want = sorted(
        (
            int(r["sp"]),
            int(r["dp"]) if r["pr"] not in ("ICMP", "ICMP6") else 0,
            r["dir"],
            _nfdump_mpls(r) or "",
        )
        for r in theirs
    )
    if case == "ipfix-icmp":  # R2 (test_router_exports): nfdump drops IPFIX ICMP type/code; compare the rest
        got = sorted((s, 0, d, m) for s, _, d, m in got)
    assert got == want


def test_mpls_label_stack_and_vrf_of_the_mpls_capture():
    """akvorado's mpls.pcap: two TWAMP flows over MPLS, egress, two labels each (bottom of stack on the
    second), egress VRF 1, ingress VRF 0 (as akvorado's TestDecodeMPLS and nfdump's mpls1/mpls2 read them)."""
    got = sorted(
        (r["dst_addr"], r["flow_direction"], r["mpls_labels"], r["ingress_vrf"], r["egress_vrf"])
        for r in _ours("ipfix-mpls")
    )
    assert got == [
        ("fd00::1:0:1:5:1", "egress", "20005-0-0 524250-0-1", 0, 1),
        ("fd00::1:0:1:6:1", "egress", "20006-0-0 524275-0-1", 0, 1),
    ]


def test_vrf_ids_of_the_v9_and_nokia_captures():
    """Cisco-style VRF ids 0x6000000n in akvorado's v9 capture; the Nokia SR-OS capture names VRF 311."""
    v9 = _ours("v9-sampled")
    assert {(r["ingress_vrf"], r["egress_vrf"]) for r in v9} == {
        (0x60000002, 0x60000002),
        (0x60000002, 0x60000000),
    }
    assert {r["flow_direction"] for r in v9} == {"ingress"}
    nokia = _ours("ipfix-physical")
    assert {r["ingress_vrf"] for r in nokia} == {311}
    assert {r["egress_vrf"] for r in nokia} == {None}  # not in the template: null, not 0


def test_flow_end_reason_of_the_ipfixprobe_capture():
    """ipfixprobe (CESNET) sets flowEndReason 4 (forcedEnd) on the records it flushes at export; nfdump does not
    print the field, so the value is pinned from the bytes of the capture."""
    ours = _ours("ipfix-biflow")
    assert [r["flow_end_reason"] for r in ours] == ["forcedEnd"] * len(ours) and ours
    assert {r["flow_direction"] for r in ours} == {None}  # no IE 61 in its templates


def test_columns_stay_null_where_the_template_says_nothing():
    ours = _ours("nfv5")
    assert all(
        r[c] is None for r in ours for c in ("flow_direction", "mpls_labels", "ingress_vrf", "input_if_name")
    )


# ---- interface names from options data (built by hand: no committed capture has an interface table) --------
DATA_V4 = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (10, 4), (14, 4), (61, 1), (136, 1), (21, 4), (22, 4)]


def _data_record(src: int, input_if: int, output_if: int, direction: int = 0, reason: int = 2) -> bytes:
    return struct.pack(
        ">IIHHBIIBBII",
        src,
        0x0A000002,
        1234,
        80,
        6,
        input_if,
        output_if,
        direction,
        reason,
        4_999_000,
        4_998_000,
    )


def _v9_names(names: dict[int, bytes]) -> bytes:
    """v9: options template 300, scope "Interface" (type 2, 4 bytes), IF_NAME 32 bytes NUL-padded (as Cisco
    IOS XE's `option interface-table` sends it), IF_DESC 16 bytes; then data template 301 and records."""
    records = b"".join(
        struct.pack(">I", i) + n.ljust(32, b"\0")[:32] + b"uplink".ljust(16, b"\0") for i, n in names.items()
    )
    return v9_datagram(
        v9_options_template(300, [(2, 4)], [(82, 32), (83, 16)]),
        flowset(300, records),
        flowset(0, template_record(301, DATA_V4)),
        flowset(301, _data_record(0x0A000001, 7, 9, 0, 2) + _data_record(0x0A000003, 9, 42, 1, 1)),
    )


def test_v9_interface_table_names_input_and_output_interfaces():
    result, state = decode([_v9_names({7: b"Gi0/0/0", 9: b"Te0/1/0.100"})])
    rows = sorted(
        (r["src_addr"], r["input_if_name"], r["output_if_name"], r["flow_direction"], r["flow_end_reason"])
        for r in result.flows.to_pylist()
    )
    assert rows == [
        ("10.0.0.1", "Gi0/0/0", "Te0/1/0.100", "ingress", "activeTimeout"),
        ("10.0.0.3", "Te0/1/0.100", None, "egress", "idleTimeout"),  # ifindex 42 was never named
    ]
    assert state.if_names == {(EXPORTER, 0, 7): "Gi0/0/0", (EXPORTER, 0, 9): "Te0/1/0.100"}
    again = DecoderState.from_json(state.to_json())  # the collector's saved state keeps them
    assert again.if_names == state.if_names


def test_ipfix_variable_length_interface_name_and_description_fallback():
    """IPFIX: scope ingressInterface (IE 10), interfaceName and interfaceDescription variable length; a record
    with an empty name is known by its description; names that are not UTF-8 or carry controls land as text."""
    records = (
        struct.pack(">I", 5)
        + b"\x03et0"
        + b"\x04core"
        + struct.pack(">I", 6)
        + b"\x00"
        + b"\x08backbone"
        + struct.pack(">I", 8)
        + b"\xff\x00\x03"
        + b"\x1b[3"
        + b"\x00"  # long-form length, ESC in the name
        + struct.pack(">I", 9)
        + b"\x02\xc3\x28"
        + b"\x00"  # invalid UTF-8
    )
    message = ipfix_message(
        ipfix_options_template(310, [(10, 4)], [(82, 65535), (83, 65535)]),
        flowset(310, records),
        flowset(2, template_record(311, [(8, 4), (12, 4), (10, 4), (14, 4), (150, 4), (151, 4)])),
        flowset(
            311,
            struct.pack(">IIIIII", 0x0A000001, 0x0A000002, 5, 6, SECS, SECS)
            + struct.pack(">IIIIII", 0x0A000001, 0x0A000002, 8, 9, SECS, SECS),
        ),
    )
    result, _ = decode([message])
    assert result.rejects.num_rows == 0
    got = [(r["input_if_name"], r["output_if_name"]) for r in result.flows.to_pylist()]
    assert got == [("et0", "backbone"), ("\x1b[3", "\ufffd(")]


def test_interface_names_are_bounded_and_cut():
    """An exporter that floods interface tables fills at most limits.exporters * 16 entries (as sampler tables);
    a name is cut at IF_NAME_CHARS."""
    state = DecoderState(dataclasses.replace(DEFAULT, exporters=1))
    decode([_v9_names({i: b"x" * 40 for i in range(100)})], state)
    assert len(state.if_names) == 16 and all(v == "x" * 32 for v in state.if_names.values())
    long = ipfix_message(
        ipfix_options_template(310, [(10, 4)], [(82, 65535)]),
        flowset(310, struct.pack(">I", 1) + b"\xff\x01\x00" + b"n" * 256),
    )
    _, state = decode([long])
    assert state.if_names == {(EXPORTER, 0, 1): "n" * netflow.IF_NAME_CHARS}


def test_workers_look_names_and_samplers_up_without_the_decoder_state():
    """--jobs: the columns half runs in a worker that has no decoder state; what it looks up (interface names,
    sampler intervals) travels with the walked batch. Regression: with a sampler table, decode_walked used to
    reach into the state it does not have (AttributeError on None)."""
    state = DecoderState()
    payloads = [_v9_names({7: b"Gi0/0/0"}), *_payloads("v9-multi-sampling")]
    n = len(payloads)
    walked, _ = walk_datagrams(payloads, [EXPORTER] * n, np.zeros(n, np.int64), None, "test-source", state)
    flows = decode_walked(pickle.loads(pickle.dumps(walked))).flows
    one, _ = decode(payloads)
    assert (
        flows.cast(one.flows.schema).sort_by("src_addr").to_pylist()
        == one.flows.sort_by("src_addr").to_pylist()
    )
    assert (
        "Gi0/0/0"
        in flows.column("input_if_name").cast(one.flows.schema.field("input_if_name").type).to_pylist()
    )
    assert (
        len(set(flows.column("sampling_interval").to_pylist())) > 1
    )  # several samplers, looked up per record


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.binary(max_size=400),
    lengths=st.lists(st.sampled_from([1, 2, 4, 32, 65535]), min_size=1, max_size=4),
    version=st.sampled_from([9, 10]),
)
def test_any_interface_table_bytes_decode_without_a_crash(records, lengths, version):
    """Whatever an exporter puts in an interface table's records, the decoder keeps bounded text or nothing."""
    options = [(82, n) for n in lengths if version == 10 or n != 65535] or [(82, 8)]
    if version == 9:
        message = v9_datagram(v9_options_template(300, [(2, 4)], options), flowset(300, records))
    else:
        message = ipfix_message(ipfix_options_template(300, [(10, 4)], options), flowset(300, records))
    _, state = decode([message])
    assert all(isinstance(v, str) and len(v) <= netflow.IF_NAME_CHARS for v in state.if_names.values())


def test_an_ifindex_no_column_can_hold_is_kept_apart_without_a_crash():
    """Regression (found by fuzzing the committed captures): an interface table whose ifindex field is 8 bytes of
    0xff made the look-up build an int64 array of 2**64 - 1 (OverflowError, the whole batch lost). Such an id
    names no record's interface; the other names still apply."""
    records = b"\xff" * 8 + b"big0" + struct.pack(">Q", 5) + b"et-5"
    message = ipfix_message(
        ipfix_options_template(310, [(10, 8)], [(82, 4)]),
        flowset(310, records),
        flowset(2, template_record(311, [(8, 4), (12, 4), (10, 4), (14, 4), (150, 4), (151, 4)])),
        flowset(311, struct.pack(">IIIIII", 0x0A000001, 0x0A000002, 5, 0xFFFFFFFF, SECS, SECS)),
    )
    result, state = decode([message])
    assert result.rejects.num_rows == 0
    assert [(r["input_if_name"], r["output_if_name"]) for r in result.flows.to_pylist()] == [("et-5", None)]
    assert state.if_names[(EXPORTER, 0, 2**64 - 1)] == "big0"
