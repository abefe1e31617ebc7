"""Issue 17: a decode worker hands the lake writer IPv4 addresses as integers (netflow.decode_walked
`ipv4_as_integers`), which formats each distinct address once per row group and orders the row group by the
address text without ranking text. What lands must be what landed when the decoder formatted every batch:
the same rows in the same order, batches of integers, of text and of both mixed into one file."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracepipe.address_text import ipv4_text, ipv4_text_sorted
from tracepipe.ingest import nffile
from tracepipe.ingest.netflow import DecoderState, Walked, decode_walked, walk_datagrams
from tracepipe.ingest.pcap import iter_udp_batches
from tracepipe.lake import DayParts, split_implausible
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
    assert sum(pa.types.is_uint32(t.schema.field("src_addr").type) for t in integers) > len(walked) // 2
    assert any(pa.types.is_dictionary(t.schema.field("src_addr").type) for t in integers)  # with IPv6: text
    mixed = [t if i % 3 else integers[i] for i, t in enumerate(text)]  # integers and text in one row group
    want = _land(text, tmp_path / "text")
    assert want.num_rows > 100
    assert set(want.column("ip_version").to_pylist()) == {4, 6}
    for name, batches in (("integers", integers), ("mixed", mixed)):
        got = _land(batches, tmp_path / name)
        assert got.equals(want), name


def test_a_batch_of_ipv4_and_ipv6_templates_decodes_to_text_whatever_is_asked() -> None:
    state = DecoderState()
    batch = next(iter(iter_udp_batches(SAMPLES / "softflowd-v9.pcap", batch_datagrams=64)))
    walked = walk_datagrams(batch.payloads, batch.exporters, batch.ts_us, batch.offsets, "sample", state)[0]
    text = decode_walked(walked).flows
    asked = decode_walked(walked, ipv4_as_integers=True).flows
    assert set(text.column("ip_version").to_pylist()) == {4, 6}
    assert asked.schema == text.schema
    assert asked.equals(text)


@pytest.mark.parametrize("traffic", ["ipv4", "ipv6"])
def test_nfcapd_ranges_with_integer_addresses_land_as_text_did(softflowd_export, traffic, tmp_path) -> None:
    """The native nfcapd reader (a real softflowd's export as the real nfcapd stored it) likewise."""
    path = softflowd_export(9, traffic, "ipv4").nfcapd.files[0]
    ranges = [r for r in nffile.iter_ranges(path, "sample", parts=4) if isinstance(r, nffile.BlockRange)]
    text = [nffile.read_range(r)[0] for r in ranges]
    integers = [nffile.read_range(r, ipv4_as_integers=True)[0] for r in ranges]
    assert pa.types.is_uint32(integers[0].schema.field("src_addr").type) == (traffic == "ipv4")
    want = _land(text, tmp_path / "text")
    assert want.num_rows > 10
    assert _land(integers, tmp_path / "integers").equals(want)
