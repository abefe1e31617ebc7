"""The native nfcapd reader (tracepipe.ingest.nffile, issue 17) against the nfdump-subprocess path it replaces:
real nfcapd files (real softflowd -> real nfcapd on 127.0.0.1; router exports replayed through nfcapd; recompressed
by the real nfdump -y/-j/-z) must give the same rows, column for column. Hostile files (truncated, lying sizes,
bad record sizes, decompression bombs, random bytes behind a valid header, mutations) give rejects naming the
block, the rest lands, nothing raises or hangs."""

from __future__ import annotations

import bz2
import json
import random
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import lake_flows, run_tracepipe
from support import probes
from test_router_exports import CASES as ROUTER_CASES
from test_router_exports import combined_capture

from tracepipe.ingest import nffile
from tracepipe.ingest.nfdump import NfcapdRead, iter_nfcapd, nfcapd_exporters, read_nfcapd
from tracepipe.lake import Lake
from tracepipe.schema import FLOWS
from tracepipe.tools import tool_path

CASES = [(5, "ipv4", "ipv4"), (9, "ipv6", "ipv4"), (10, "ipv4", "ipv4")]
COLUMNS = [f.name for f in FLOWS if f.name != "source"]


def rows(table: pa.Table) -> Counter:
    """The table as a multiset of rows (every column but `source`), text columns as plain strings."""
    plain = pa.table({c: table.column(c).cast(FLOWS.field(c).type) for c in COLUMNS})
    return Counter(tuple(r.values()) for r in plain.to_pylist())


def assert_same_as_nfdump(path: Path) -> pa.Table:
    """Native rows == the nfdump path's rows for `path`; returns the native flows."""
    assert nffile.native_problem(path) is None
    native, rejects, _ = nffile.read_nffile(path)
    expected, expected_rejects = read_nfcapd(path)
    assert rejects.num_rows == 0 and expected_rejects.num_rows == 0
    assert native.num_rows == expected.num_rows > 0
    ours, theirs = rows(native), rows(expected)
    assert ours == theirs, (list((ours - theirs).items())[:3], list((theirs - ours).items())[:3])
    return native


def nfdump_rewrite(source: Path, out: Path, *options: str) -> Path:
    """The real nfdump writing `source` (file or directory) again: -y lz4, -j bz2, -z lzo; merges a folder."""
    flag = "-R" if source.is_dir() else "-r"
    subprocess.run([tool_path("nfdump"), flag, str(source), *options, "-w", str(out)], check=True, timeout=60)
    return out


def split(path: Path) -> tuple[np.ndarray, list[bytes], bytes]:
    """(file header, the data blocks with their headers, the appendix) of an nfcapd file."""
    data = path.read_bytes()
    header = np.frombuffer(data, nffile.FILE_HEADER, count=1).copy()
    at = nffile.FILE_HEADER.itemsize
    blocks = []
    for _ in range(int(header["num_blocks"][0])):
        size = int(np.frombuffer(data, nffile.BLOCK_HEADER, count=1, offset=at)["size"][0])
        blocks.append(data[at : at + nffile.BLOCK_HEADER.itemsize + size])
        at += len(blocks[-1])
    return header, blocks, data[at:]


def join(header: np.ndarray, blocks: list[bytes], appendix: bytes) -> bytes:
    """An nfcapd file from its parts, block count and appendix offset set to match (nfdump reads it too)."""
    header = header.copy()
    header["num_blocks"] = len(blocks)
    header["off_appendix"] = nffile.FILE_HEADER.itemsize + sum(len(b) for b in blocks)
    return header.tobytes() + b"".join(blocks) + appendix


def block(records: int, data: bytes, kind: int = 3) -> bytes:
    return np.array([(records, len(data), kind, 0)], nffile.BLOCK_HEADER).tobytes() + data


@pytest.fixture(scope="module")
def three_blocks(softflowd_export, tmp_path_factory) -> Path:
    """A real v9 nfcapd file whose data block is repeated three times (a multi-block file, as big ones are)."""
    header, blocks, appendix = split(softflowd_export(*CASES[1]).nfcapd.files[0])
    assert len(blocks) == 1
    path = tmp_path_factory.mktemp("nffile") / "nfcapd.202403120000"
    path.write_bytes(join(header, blocks * 3, appendix))
    return path


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"v{c[0]}-{c[1]}")
def test_native_rows_are_the_nfdump_paths_rows(case, softflowd_export):
    export = softflowd_export(*case)
    (path,) = export.nfcapd.files
    native = assert_same_as_nfdump(path)
    assert native.num_rows == export.softflowd.records
    _, _, exporters = nffile.read_nffile(path)
    assert {a: i["sysid"] for a, i in exporters.out.items()} == {
        a: i["sysid"] for a, i in nfcapd_exporters(path).items()
    }


@pytest.mark.parametrize("flag,codec", [("-y", "lz4"), ("-j", "bz2"), ("-z", "lzo")])
def test_each_codec_nfcapd_offers(flag, codec, softflowd_export, tmp_path):
    """nfcapd 1.7.1 offers -z LZO, -y LZ4, -j BZ2 (no zstd in Debian's build: `nfcapd -h`). LZ4 and BZ2 are read
    natively; LZO too if python-lzo is installed, else through nfdump, and the CLI says so and counts it."""
    source = softflowd_export(*CASES[2]).nfcapd.files[0]
    path = nfdump_rewrite(source, tmp_path / f"nfcapd.{codec}", flag)
    header = nffile.read_header(path.read_bytes()[:40])
    assert nffile.COMPRESSION_NAMES[int(header["compression"])] == codec
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "netflow", str(path), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    (result,) = summary["files"]
    if codec == "lzo" and nffile.lzo is None:
        assert result["reader"] == "nfdump" and "LZO" in result["message"]
        assert summary["totals"]["nfdump_fallbacks"] == 1
    else:
        assert result["reader"] == "native" and summary["totals"]["nfdump_fallbacks"] == 0
        assert_same_as_nfdump(path)
    assert rows(lake_flows(lake)) == rows(read_nfcapd(source)[0])


def test_a_file_of_several_exporters(softflowd_export, tmp_path):
    """Two exporters (127.0.0.1 with v5, ::1 with v9) merged by nfdump into one file: EXipReceivedV4 and V6."""
    folder = tmp_path / "both"
    folder.mkdir()
    shutil.copy(softflowd_export(5, "ipv4", "ipv4").nfcapd.files[0], folder / "nfcapd.202403120000")
    shutil.copy(softflowd_export(9, "ipv4", "ipv6").nfcapd.files[0], folder / "nfcapd.202403120005")
    path = nfdump_rewrite(folder, tmp_path / "nfcapd.merged")
    native = assert_same_as_nfdump(path)
    assert set(native.column("exporter").to_pylist()) == {"127.0.0.1", "::1"}
    _, _, exporters = nffile.read_nffile(path)
    assert set(exporters.out) == {"127.0.0.1", "::1"}


def test_router_exports_replayed_through_nfcapd(tmp_path):
    """The router captures of tests/data/routers (IPFIX with MPLS, MAC, SRv6, NSEL-like elements...) through a
    real nfcapd: elements the reader does not use are stepped over exactly as nfdump does; the samplers nfcapd
    stored are those `nfdump -E` lists (regression: its 1.7.1 "Sampler: ... packet space" lines were not read)."""
    sampling = {}
    for case in ROUTER_CASES:
        capture = combined_capture(case, tmp_path)
        port = probes.free_udp_port()
        with probes.nfcapd_receiving(port, tmp_path / f"nfcapd-{case}") as nfcapd:
            probes.replay_udp(probes.export_payloads(capture), (probes.LOOPBACK_V4, port))
        for path in nfcapd.files:
            if read_nfcapd(path)[0].num_rows:
                assert_same_as_nfdump(path)
            exporters = nffile.read_nffile(path)[2].out
            assert exporters == nfcapd_exporters(path)
            sampling[case] = exporters["127.0.0.1"]["sampling"]
    assert sampling["v9-sampled"] == [30000] and sampling["v9-multi-sampling"] == [2000]


def test_an_nfsen_tree_is_read_natively(softflowd_export, tmp_path):
    tree = tmp_path / "profiles-data" / "live" / "router1" / "2024" / "03" / "12"
    tree.mkdir(parents=True)
    for minute, case in zip(("0000", "0005"), CASES[:2], strict=True):
        shutil.copy(softflowd_export(*case).nfcapd.files[0], tree / f"nfcapd.20240312{minute}")
    lake = tmp_path / "lake"
    proc = run_tracepipe(
        "ingest", "netflow", str(tmp_path / "profiles-data"), "--lake", str(lake), "--format", "json"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert [f["reader"] for f in summary["files"]] == ["native", "native"]
    assert rows(lake_flows(lake)) == rows(read_nfcapd(tree)[0])


def test_native_reader_streams_block_by_block(three_blocks):
    batches = list(iter_nfcapd(three_blocks, batch_rows=1))
    assert len(batches) == 3
    assert sum(b[0].num_rows for b in batches) == read_nfcapd(three_blocks)[0].num_rows
    assert_same_as_nfdump(three_blocks)


def test_the_fallback_is_reported(softflowd_export, tmp_path):
    """A layout nfdump reads but the native reader does not (here: a big-endian magic stands for any of them):
    read = nfdump, with the reason."""
    read = NfcapdRead()
    path = softflowd_export(*CASES[0]).nfcapd.files[0]
    list(iter_nfcapd(path, read=read))
    assert read.reader == "native" and read.fallback == ""
    read = NfcapdRead()
    list(iter_nfcapd(path, read=read, native=False))
    assert read.reader == "nfdump" and read.fallback


# ---- hostile files -------------------------------------------------------------------------------------------


def hostile(three_blocks: Path, tmp_path: Path, how: str) -> tuple[Path, int]:
    """A damaged copy of the three-block file, and the file offset of the block that is damaged."""
    header, blocks, appendix = split(three_blocks)
    second = nffile.FILE_HEADER.itemsize + len(blocks[0])
    records = int(np.frombuffer(blocks[1][:4], "<u4")[0])
    data = blocks[1][nffile.BLOCK_HEADER.itemsize :]
    if how == "truncated":
        raw = join(header, blocks, appendix)[: second + 100]
    elif how == "block size past the end":
        blocks[1] = np.array([(records, 0xFFFFFFF0, 3, 0)], nffile.BLOCK_HEADER).tobytes() + data
        raw = join(header, blocks, appendix)
    elif how == "more records than the block holds":
        blocks[1] = block(records + 5, data)
        raw = join(header, blocks, appendix)
    elif how in ("record size 0", "record past the block"):
        first = int.from_bytes(data[2:4], "little")
        second_record = first + int.from_bytes(data[first + 2 : first + 4], "little")  # the third record
        bad = (0 if how == "record size 0" else 0xFFFF).to_bytes(2, "little")
        blocks[1] = block(records, data[: second_record + 2] + bad + data[second_record + 4 :])
        raw = join(header, blocks, appendix)
    elif how in ("lz4 bomb", "bz2 bomb"):
        bomb = bytes(6 << 20)  # 6 MiB of zeros: more than nfdump's 5 MiB block buffer
        header["compression"] = nffile.LZ4_COMPRESSED if how == "lz4 bomb" else nffile.BZ2_COMPRESSED
        compress = (
            (lambda b: pa.Codec("lz4_raw").compress(b, asbytes=True)) if how == "lz4 bomb" else bz2.compress
        )
        blocks = [block(int(np.frombuffer(b[:4], "<u4")[0]), compress(b[12:])) for b in blocks]
        blocks[1] = block(60000, compress(bomb))
        second = nffile.FILE_HEADER.itemsize + len(blocks[0])
        raw = join(header, blocks, appendix)
    elif how == "bz2 ratio bomb":  # 1 MiB of zeros in ~50 bytes: under 5 MiB, but over the 1024:1 ratio
        header["compression"] = nffile.BZ2_COMPRESSED
        blocks = [block(int(np.frombuffer(b[:4], "<u4")[0]), bz2.compress(b[12:])) for b in blocks]
        blocks[1] = block(60000, bz2.compress(bytes(1 << 20)))
        second = nffile.FILE_HEADER.itemsize + len(blocks[0])
        raw = join(header, blocks, appendix)
    elif how == "more records than an lz4 block holds":  # its count lies; its records do not
        header["compression"] = nffile.LZ4_COMPRESSED
        lz4 = lambda b: pa.Codec("lz4_raw").compress(b, asbytes=True)  # noqa: E731
        blocks = [block(int(np.frombuffer(b[:4], "<u4")[0]), lz4(b[12:])) for b in blocks]
        # cut in its middle, count kept: the records past its end are read from the tail of pyarrow's 5 MiB
        # output buffer, which may hold the previous block's records (session 24: the whole block was dropped)
        blocks[1] = block(records, lz4(data[: len(data) // 2]))
        second = nffile.FILE_HEADER.itemsize + len(blocks[0])
        raw = join(header, blocks, appendix)
    elif how in ("no records announced", "a block over 5 MiB"):  # delimited, so stepped over
        blocks[1] = block(0, data) if how == "no records announced" else block(records, bytes(6 << 20))
        raw = join(header, blocks, appendix)
    elif how == "random bytes":
        raw = header.tobytes() + random.Random(7).randbytes(200_000)
        second = nffile.FILE_HEADER.itemsize
    else:
        raise AssertionError(how)
    path = tmp_path / "nfcapd.202403120010"
    path.write_bytes(raw)
    return path, second


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "block size past the end",
        "more records than the block holds",
        "record size 0",
        "record past the block",
        "lz4 bomb",
        "bz2 bomb",
        "bz2 ratio bomb",
        "more records than an lz4 block holds",
        "no records announced",
        "a block over 5 MiB",
        "random bytes",
    ],
)
def test_hostile_files_are_rejects_where_they_are_and_the_rest_lands(how, three_blocks, tmp_path):
    path, damaged_at = hostile(three_blocks, tmp_path, how)
    assert nffile.native_problem(path) is None  # read natively, not passed to nfdump
    flows, rejects, _ = nffile.read_nffile(path, source=str(path))
    assert rejects.num_rows >= 1
    assert damaged_at in rejects.column("offset").to_pylist(), rejects.to_pylist()
    assert set(rejects.column("source").to_pylist()) == {str(path)}
    per_block = read_nfcapd(three_blocks)[0].num_rows // 3
    if how != "random bytes":
        assert flows.num_rows >= per_block  # the first block at least
    if how not in ("truncated", "block size past the end", "random bytes"):  # the block after the damage too
        assert flows.num_rows >= 2 * per_block
    if how in ("record size 0", "record past the block", "more records than the block holds"):
        assert flows.num_rows >= 2 * per_block + 1  # the damaged block's records before the damage
    if how == "more records than an lz4 block holds":  # session 24: LZ4 lost the block's good records
        half = split(three_blocks)[1][1][nffile.BLOCK_HEADER.itemsize :]
        half = half[: len(half) // 2]
        inside = nffile._Columns()
        nffile._walk_block(half, len(half), per_block * 2, 0, 0, inside, [], {})
        assert 0 < inside.rows and flows.num_rows == 2 * per_block + inside.rows
    if how == "bz2 ratio bomb":
        assert "expands more than 1024 times" in rejects.column("detail")[0].as_py()


def _records_block(*records: bytes) -> bytes:
    return b"".join(records)


def test_records_that_are_no_flows_are_stepped_over_in_runs_and_a_costly_block_stops(three_blocks):
    """Session-24 hostile review: 4-byte records of an unknown type were stepped over one Python step each
    (a 19 KB file of bz2 blocks kept a core busy past 60 s). A run of one kind and size is now stepped over at
    once, and a block that would need more steps one by one than its budget (STEPS_PER_BLOCK plus one per byte
    as stored) is a reject from there on, its records before that point kept."""
    _, blocks, _ = split(three_blocks)
    records = int(np.frombuffer(blocks[0][:4], "<u4")[0])
    flows = blocks[0][nffile.BLOCK_HEADER.itemsize :]
    unknown = (99).to_bytes(2, "little") + (4).to_bytes(2, "little")
    alone = nffile._Columns()
    nffile._walk_block(flows, len(flows), records, 40, 0, alone, [], {})
    per = alone.rows  # the block's flows (its other records: exporter, sampler)
    filler = unknown * 500_000  # 2 MB of one kind: stepped over as one run
    data = flows + filler + flows
    columns, infos = nffile._Columns(), []
    used, rejects = nffile._walk_block(
        data, len(data), 2 * records + 500_000, 40, 0, columns, infos, {}, budget=2 * records + 50
    )
    assert not rejects and used == len(data) and columns.rows == 2 * per
    other = (98).to_bytes(2, "little") + (8).to_bytes(2, "little") + bytes(4)
    changing = (unknown + other) * 1000  # a kind and size that change at every record: one step each
    data = flows + changing + flows
    columns = nffile._Columns()
    used, rejects = nffile._walk_block(
        data, len(data), 2 * records + 2000, 40, 0, columns, infos, {}, budget=records + 500
    )
    assert columns.rows == per  # the flows before the costly part
    assert [(r[0], r[1]) for r in rejects] == [(40, "nfcapd block too costly")]
    assert f"more than {records + 500} records walked one by one" in rejects[0][2]


def test_a_flow_layout_of_many_elements_is_not_kept_and_counts_against_the_budget():
    """4096 V3 records of ~16 k elements each, every one a new layout: each was walked element by element and
    its layout kept (~580 KB each: 2.4 GB). Layouts with more than LAYOUT_CACHE_CHECKS header bytes are not
    kept, and the elements walked count against the block's budget."""
    elements = 300
    size = nffile.V3_HEADER_BYTES + elements * 4
    header = bytes([11, 0]) + size.to_bytes(2, "little") + elements.to_bytes(2, "little") + bytes(6)
    # each record a layout of its own (another unknown element type): walked one by one
    data = b"".join(
        header + ((900 + i).to_bytes(2, "little") + (4).to_bytes(2, "little")) * elements for i in range(3)
    )
    layouts: dict = {}
    columns = nffile._Columns()
    _, rejects = nffile._walk_block(data, len(data), 3, 40, 0, columns, [], layouts)
    assert not rejects and columns.rows == 3 and not layouts  # read, not kept
    _, rejects = nffile._walk_block(data, len(data), 3, 40, 0, nffile._Columns(), [], {}, budget=400)
    assert [r[1] for r in rejects] == ["nfcapd block too costly"]


def test_a_file_naming_more_exporters_than_the_limit_keeps_the_first(three_blocks, tmp_path):
    """200,000 exporter records in a 558 KB file: 1.5 GB and a 70 MB summary (and commit info in the lake's
    log). The reader keeps limits.exporters of them (the rest counted as ignored), and any per-exporter summary
    sums the others under "(others)"."""
    from tracepipe.limits import DEFAULT

    header, blocks, appendix = split(three_blocks)
    many = DEFAULT.exporters + 500

    def exporter(
        i: int,
    ) -> bytes:  # ExporterInfo: type 7, size 32, version, ip (v4 in bytes 16..19), family 2
        return (
            (7).to_bytes(2, "little")
            + (32).to_bytes(2, "little")
            + bytes(12)
            + (0x0A000000 + i).to_bytes(4, "little")
            + bytes(4)
            + (2).to_bytes(2, "little")
            + (i % 65536).to_bytes(2, "little")
            + bytes(4)
        )

    path = tmp_path / "nfcapd.exporters"
    path.write_bytes(
        join(header, [block(many, b"".join(exporter(i) for i in range(many))), *blocks], appendix)
    )
    flows, rejects, exporters = nffile.read_nffile(path)
    assert len(exporters.out) == DEFAULT.exporters and exporters.ignored >= 500  # (and the real ones after)
    assert flows.num_rows == read_nfcapd(three_blocks)[0].num_rows and rejects.num_rows == 0


def test_a_damaged_file_through_the_cli(three_blocks, tmp_path):
    path, _ = hostile(three_blocks, tmp_path, "record size 0")
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "netflow", str(path), "--lake", str(lake), "--format", "json")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    (result,) = json.loads(proc.stdout)["files"]
    assert result["reader"] == "native" and result["rejects"] == 1 and result["flows"] > 0


def test_mutated_real_files_never_raise(three_blocks, tmp_path):
    """A small fuzz pass (benchmarks/fuzz_nffile.py runs more): flipped bytes, cuts and splices of real files,
    plain and LZ4; every case ends with rows or rejects."""
    rng = random.Random(17)
    originals = [three_blocks.read_bytes()]
    lz4 = nfdump_rewrite(three_blocks, tmp_path / "nfcapd.lz4", "-y")
    originals.append(lz4.read_bytes())
    path = tmp_path / "nfcapd.fuzz"
    for case in range(300):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(40, len(data))
            data[at] = rng.randrange(256)
        if case % 5 == 0:
            data = data[: rng.randrange(40, len(data))]
        if case % 7 == 0:
            at = rng.randrange(40, len(data))
            data[at:at] = rng.randbytes(rng.randrange(1, 64))
        path.write_bytes(bytes(data))
        flows, rejects, _ = nffile.read_nffile(path)
        assert flows.num_rows + rejects.num_rows > 0


def test_byte_counts_land_up_to_18_digits_as_the_text_path_reads_them(three_blocks, tmp_path):
    """A 12 GB flow lands (regression, see test_nfdump_csv); 10**19 bytes is rejected as on the text path."""
    header, blocks, appendix = split(three_blocks)
    data = bytearray(blocks[0])
    at = nffile.BLOCK_HEADER.itemsize
    while int.from_bytes(data[at : at + 2], "little") != nffile.V3_RECORD:  # first flow record
        at += int.from_bytes(data[at + 2 : at + 4], "little")
    element = at + nffile.V3_HEADER_BYTES
    while int.from_bytes(data[element : element + 2], "little") != 1:  # EXgenericFlow
        element += int.from_bytes(data[element + 2 : element + 4], "little")
    for value, lands in ((12_345_678_901, True), (10**19, False)):
        data[element + 4 + 32 : element + 4 + 40] = value.to_bytes(8, "little")  # inBytes
        path = tmp_path / "nfcapd.big"
        path.write_bytes(join(header, [bytes(data), *blocks[1:]], appendix))
        flows, rejects, _ = nffile.read_nffile(path)
        assert (value in flows.column("bytes").to_pylist()) is lands
        if lands:
            assert rejects.num_rows == 0 and rows(flows) == rows(read_nfcapd(path)[0])
        else:
            assert rejects.to_pylist()[0]["reason"] == "bad byte count"
            assert flows.num_rows == read_nfcapd(three_blocks)[0].num_rows - 1


def test_times_outside_the_window_are_rejects_that_name_their_block(three_blocks):
    """The lake's writer turned such rows into rejects without an offset (an nfcapd flow row has none): the
    reader now rejects them itself, naming the block, worded as the writer words them."""
    _, blocks, _ = split(three_blocks)
    data = blocks[0][nffile.BLOCK_HEADER.itemsize :]
    columns = nffile._Columns()
    nffile._walk_block(data, len(data), int(np.frombuffer(blocks[0][:4], "<u4")[0]), 40, 0, columns, [], {})
    cols = columns.take()
    cols["first"][0] = 315_532_800_000  # 1980-01-01
    cols["first"][1] = 253_402_300_000_000  # 9999-12-31
    flows, rejects = nffile._flows(cols, "x")
    assert flows.num_rows == len(cols["first"]) - 2
    assert [(r["offset"], r["reason"]) for r in rejects.to_pylist()] == [(40, nffile.WINDOW_REJECT)] * 2
    assert rejects.column("detail")[0].as_py().startswith("ts_start=1980-01-01 00:00:00")


def test_a_compression_nobody_knows_is_a_reject_through_nfdump(three_blocks, tmp_path):
    """The native reader hands a compression it does not know to nfdump, which says "Unable to read appendix
    block" on stderr and exits 0: the file ended with exit 4 and not one reject saying why."""
    header, blocks, appendix = split(three_blocks)
    header["compression"] = 200
    path = tmp_path / "nfcapd.unknown"
    path.write_bytes(join(header, blocks, appendix))
    lake = tmp_path / "lake"
    proc = run_tracepipe("ingest", "netflow", str(path), "--lake", str(lake), "--format", "json")
    (result,) = json.loads(proc.stdout)["files"]
    assert result["reader"] == "nfdump" and result["rejects"] == 1, result
    (reject,) = Lake(lake).read("rejects").to_pylist()
    assert reject["reason"] == "nfdump could not read the file" and reject["detail"], reject


def test_blocks_stepped_over_are_one_reject_per_run_and_a_file_of_runs_is_given_up(three_blocks, tmp_path):
    """Session-24 review: every block announcing no record became a reject of its own, and the walk went on:
    200,000 empty 13-byte blocks (2.6 MB) took 245 s and 940 MB. A run of such blocks is one reject now, and a
    file of more than MAX_SKIPPED_RUNS runs is given up from there (reads and rejects stay bounded)."""
    header, blocks, appendix = split(three_blocks)
    per_block = read_nfcapd(three_blocks)[0].num_rows // 3
    empty = block(0, b"\0")
    path = tmp_path / "nfcapd.runs"
    path.write_bytes(join(header, [blocks[0], *[empty] * 20_000, blocks[1]], appendix))
    flows, rejects, _ = nffile.read_nffile(path)
    assert flows.num_rows == 2 * per_block
    assert [r["detail"] for r in rejects.to_pylist()] == [
        "blocks 1..20000: 20000 announce no record or more than 5 MiB"
    ]
    ranged = [r for r in nffile.iter_ranges(path, "x", parts=4) if isinstance(r, pa.Table)]
    assert sum(t.num_rows for t in ranged) == 1
    many = nffile.MAX_SKIPPED_RUNS + 5
    path.write_bytes(join(header, [blocks[0], *[empty, blocks[1]] * many], appendix))
    flows, rejects, _ = nffile.read_nffile(path)
    assert rejects.num_rows == nffile.MAX_SKIPPED_RUNS + 1
    assert "the rest of the file is not read" in rejects.column("detail")[-1].as_py()
    assert flows.num_rows == (1 + nffile.MAX_SKIPPED_RUNS) * per_block


def test_a_router_without_ntp_dates_every_row_1970_and_the_rejects_cost_no_python_per_row(three_blocks):
    """Every row outside the window: the rejects are made per check with Arrow, not per row in Python (7 s per
    5 MiB block before: benchmarks/fuzz_nffile.py's timing shows it), in file order, each named by the first
    check it fails and its block."""
    _, blocks, _ = split(three_blocks)
    data = blocks[0][nffile.BLOCK_HEADER.itemsize :] * 60  # ~28,000 records
    records = int(np.frombuffer(blocks[0][:4], "<u4")[0]) * 60
    columns = nffile._Columns()
    nffile._walk_block(data, len(data), records, 40, 0, columns, [], {})
    cols = columns.take()
    n = len(cols["first"])
    cols["first"][:] = 1_000  # 1970
    cols["packets"][5] = 10**19  # one row failing an earlier check: named by that one
    flows, rejects = nffile._flows(cols, "x")
    assert flows.num_rows == 0 and rejects.num_rows == n
    reasons = rejects.column("reason").to_pylist()
    assert reasons[5] == "bad packet count" and rejects.column("detail")[5].as_py() == f"ipkt={10**19}"
    assert reasons.count(nffile.WINDOW_REJECT) == n - 1 and set(rejects.column("offset").to_pylist()) == {40}


def test_blocks_of_one_record_inflating_to_the_cap_are_not_all_held(three_blocks, tmp_path):
    """Session-27 review: BZ2 blocks each announcing one flow record and inflating to the 5 MiB cap (a random
    tail keeps them under the 1024:1 ratio) were read as views into their decompressed buffers, kept until the
    batch was written: 5 MiB per record (a 1 MB file of 150 blocks peaked at 930 MB). The records are copied
    out now; memory stays that of one block, and every record lands."""
    import tracemalloc

    header, blocks, appendix = split(three_blocks)
    data = blocks[0][nffile.BLOCK_HEADER.itemsize :]
    at = 0
    while int.from_bytes(data[at : at + 2], "little") != nffile.V3_RECORD:  # the first flow record
        at += int.from_bytes(data[at + 2 : at + 4], "little")
    record = data[at : at + int.from_bytes(data[at + 2 : at + 4], "little")]
    cap = 5 << 20
    inflated = record + bytes(cap - len(record) - 6000) + random.Random(3).randbytes(6000)
    header["compression"] = nffile.BZ2_COMPRESSED
    path = tmp_path / "nfcapd.202403120020"
    path.write_bytes(join(header, [block(1, bz2.compress(inflated))] * 40, appendix))
    tracemalloc.start()
    try:
        landed = sum(flows.num_rows for flows, _ in nffile.iter_nffile(str(path), batch_rows=1 << 19))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert landed == 40
    assert peak < 4 * cap, f"{peak / 2**20:.0f} MiB traced at the peak"  # was ~40 blocks x 5 MiB
