"""Issue 17: a decode worker hands the lake writer addresses as integers (netflow.decode_walked and
nffile.read_range `ipv4_as_integers`: uint32, or IPv4 and IPv6 in address_text.ADDRESSES), which formats each
distinct address once per row group and orders IPv4 row groups by the address text without ranking text. What lands must be what landed when the decoder formatted every batch:
the same rows in the same order, batches of integers, of text and of both mixed into one file."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracepipe.address_text import (
    ADDRESSES,
    address_text,
    addresses,
    canonical_texts,
    ipv4_text,
    ipv4_text_sorted,
    ipv6_text,
    ipv6_texts,
)
from tracepipe.ingest import nffile
from tracepipe.ingest.netflow import DecoderState, Walked, decode_walked, walk_datagrams
from tracepipe.ingest.pcap import iter_udp_batches
from tracepipe.lake import DayParts, conform, split_implausible
from tracepipe.schema import DATASETS

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data" / "netflow"
# octets whose text orders unlike their value: "1" < "10" < "100" < "2", "25" < "255" < "3"
EDGES = [0, 1, 2, 9, 10, 11, 19, 20, 25, 99, 100, 101, 199, 200, 249, 250, 255]


def _texts(values: np.ndarray) -> list[str]:
    return [str(ipaddress.IPv4Address(int(v))) for v in values]


def test_address_text_is_ipaddress_text_and_its_sorted_dictionary_is_string_order() -> None:
    rng = np.random.default_rng(17)
    edges = np.array(
        [
            (a << 24) | (b << 16) | (c << 8) | d
            for a in EDGES
            for b in EDGES[::4]
            for c in EDGES[::8]
            for d in EDGES
        ],
        dtype=np.uint32,
    )
    for values in (edges, rng.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32), edges[:1]):
        values = values[rng.integers(0, len(values), 3 * len(values))]  # repeats, any order
        want = _texts(values)
        assert ipv4_text(values).cast(pa.string()).to_pylist() == want
        ordered = ipv4_text_sorted(values)
        assert ordered.cast(pa.string()).to_pylist() == want
        # each distinct text once, ascending as strings (Arrow's and Parquet's order): "10.x" before "9.x"
        assert ordered.dictionary.to_pylist() == sorted(set(want))


def _land(batches: list[pa.Table], root: Path) -> pa.Table:
    parts = DayParts(
        root, DATASETS["flows"], "ab" * 32, row_group_rows=40
    )  # many row groups, many batches each
    for flows in batches:
        parts.write(split_implausible(flows, DATASETS["flows"])[0])
    tables = []
    for add in sorted(parts.close(), key=lambda a: a.path):
        meta = pq.read_metadata(root / "flows" / add.path)
        assert meta.num_row_groups > 1
        tables.append(pq.read_table(root / "flows" / add.path))
    return pa.concat_tables(tables)


def _ipv4_only(walked: Walked) -> Walked:
    """The batch's records of IPv4 templates only (softflowd puts IPv4 and IPv6 data sets in every datagram)."""
    groups = [g for g in walked.groups if "src_addr4" in g[0].roles]
    return dataclasses.replace(walked, groups=groups)


@pytest.mark.parametrize("capture", ["softflowd-v9.pcap", "softflowd-ipfix.pcap"])
def test_integer_addresses_land_the_same_rows_in_the_same_order_as_text(capture: str, tmp_path: Path) -> None:
    state = DecoderState()
    walked = []
    for i, b in enumerate(iter_udp_batches(SAMPLES / capture, batch_datagrams=2)):
        batch = walk_datagrams(b.payloads, b.exporters, b.ts_us, b.offsets, "sample", state)[0]
        walked.append(batch if i % 4 == 3 else _ipv4_only(batch))  # IPv4-only batches, and mixed ones
    text = [decode_walked(w).flows for w in walked]
    integers = [decode_walked(w, ipv4_as_integers=True).flows for w in walked]
    kinds = [t.schema.field("src_addr").type for t in integers]
    assert kinds.count(pa.uint32()) > len(walked) // 2
    assert ADDRESSES in kinds  # batches with IPv6 too: both families as integers
    mixed = [t if i % 3 else integers[i] for i, t in enumerate(text)]  # integers and text in one row group
    want = _land(text, tmp_path / "text")
    assert want.num_rows > 100
    assert set(want.column("ip_version").to_pylist()) == {4, 6}
    for name, batches in (("integers", integers), ("mixed", mixed)):
        got = _land(batches, tmp_path / name)
        assert got.equals(want), name


def test_a_batch_of_ipv4_and_ipv6_templates_gives_both_families_as_integers_and_the_same_text() -> None:
    state = DecoderState()
    batch = next(iter(iter_udp_batches(SAMPLES / "softflowd-v9.pcap", batch_datagrams=64)))
    walked = walk_datagrams(batch.payloads, batch.exporters, batch.ts_us, batch.offsets, "sample", state)[0]
    text = decode_walked(walked).flows
    asked = decode_walked(walked, ipv4_as_integers=True).flows
    assert set(text.column("ip_version").to_pylist()) == {4, 6}
    assert asked.schema.field("src_addr").type == ADDRESSES
    schema = DATASETS["flows"].schema
    assert conform(asked, schema).equals(conform(text, schema))


@pytest.mark.parametrize("traffic", ["ipv4", "ipv6"])
def test_nfcapd_ranges_with_integer_addresses_land_as_text_did(softflowd_export, traffic, tmp_path) -> None:
    """The native nfcapd reader (a real softflowd's export as the real nfcapd stored it) likewise."""
    path = softflowd_export(9, traffic, "ipv4").nfcapd.files[0]
    ranges = [r for r in nffile.iter_ranges(path, "sample", parts=4) if isinstance(r, nffile.BlockRange)]
    text = [nffile.read_range(r)[0] for r in ranges]
    integers = [nffile.read_range(r, ipv4_as_integers=True)[0] for r in ranges]
    assert integers[0].schema.field("src_addr").type == (pa.uint32() if traffic == "ipv4" else ADDRESSES)
    want = _land(text, tmp_path / "text")
    assert want.num_rows > 10
    assert _land(integers, tmp_path / "integers").equals(want)


def test_ipv6_addresses_that_embed_ipv4_ones_stay_ipv6_text() -> None:
    """An exporter may send ::1.2.3.4 or ::ffff:1.2.3.4 as an IPv6 address: it is not the IPv4 address 1.2.3.4
    (which a flow of that VM would be attributed by), and the same 32 bits in a row's IPv4 field are."""
    six = [ipaddress.IPv6Address(t) for t in ("::1.2.3.4", "::ffff:1.2.3.4", "2001:db8::1", "::")]
    v6 = np.frombuffer(b"".join(a.packed for a in six) + bytes(16), dtype="V16")
    v4 = np.array([0, 0, 0, 0, 0x01020304], dtype=np.uint32)
    is6 = np.array([True, True, True, True, False])
    for in_order in (False, True):
        text, _ = address_text(addresses(v4, v6, is6), in_order)
        assert text.cast(pa.string()).to_pylist() == [*map(str, six), "1.2.3.4"]


def test_ipv6_text_is_python_311s_ipaddress_text_without_calling_it() -> None:
    """IPv6 text is formatted with numpy and Arrow, not `ipaddress` per distinct address (77% of an IPv6
    capture's ingest: performance review, session 38): every zero-run shape, the first of two equal runs,
    a lone zero hextet, the IPv4-mapped and -compatible forms (hex, as 3.11 prints them), "::" and "::1"."""
    rng = np.random.default_rng(23)
    raw = rng.integers(0, 256, (60_000, 16), dtype=np.uint8)
    hextets = raw.reshape(-1, 8, 2)
    hextets[rng.random((60_000, 8)) < 0.45] = 0  # zero hextets anywhere: runs of every length and place
    for start in range(8):
        for end in range(start, 9):
            raw[start * 9 + end, 2 * start : 2 * end] = 0
    raw[-1] = 0
    raw[-2, :15], raw[-2, 15] = 0, 1
    raw[-3, :10], raw[-3, 10:12] = 0, 255
    want = [str(ipaddress.IPv6Address(bytes(r))) for r in raw]
    assert ipv6_texts(raw).to_pylist() == want
    assert want[-3].startswith("::ffff:") and want[-1] == "::" and want[-2] == "::1"
    repeated = raw[rng.integers(0, len(raw), 2 * len(raw))]
    values = np.frombuffer(repeated.tobytes(), dtype="V16")
    assert ipv6_text(values).cast(pa.string()).to_pylist() == [
        str(ipaddress.IPv6Address(bytes(r))) for r in repeated
    ]


def test_address_texts_of_any_form_read_as_ipaddress_reads_them() -> None:
    """The readers of text (nfdump CSV, Zeek, argus) read IPv6 text with inet_pton and format it as above;
    what the C library refuses (zones, garbage) goes to `ipaddress`, which decides as before."""
    rng = np.random.default_rng(29)
    raw = rng.integers(0, 256, (3_000, 16), dtype=np.uint8)
    raw.reshape(-1, 8, 2)[rng.random((3_000, 8)) < 0.5] = 0
    forms = [str(ipaddress.IPv6Address(bytes(r))) for r in raw]
    forms += [f.upper() for f in forms[:300]] + [ipaddress.IPv6Address(bytes(r)).exploded for r in raw[:300]]
    forms += ["::ffff:1.2.3.4", "::1.2.3.4", "fe80::1%eth0", "1::2:3:4:5:6:7", "::", "1.2.3.4", "010.1.2.3"]
    forms += [
        "::1.02.3.4",
        "2001:db8::1::2",
        "12345::",
        "",
        " ::1",
        "1:2:3:4:5:6:7:8:9",
        "::g",
        "2001:db8::/64",
    ]
    texts, versions = canonical_texts(forms)
    for form, text, version in zip(forms, texts, versions, strict=True):
        try:
            address = ipaddress.ip_address(form)
        except ValueError:
            assert (text, version) == (None, None), form
        else:
            assert (text, version) == (str(address), address.version), form
