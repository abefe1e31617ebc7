"""Row groups sorted and written by a thread (lake.RowGroupWriter, issue 17): an ingest decoded in one process
writes each row group while it decodes the next. Same files, same rows, same row groups as when written by the
caller; an error of the thread reaches the caller; nothing is left behind by an abort."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracepipe.ingest.netflow import DecoderState, decode_walked, walk_datagrams
from tracepipe.ingest.pcap import iter_udp_batches
from tracepipe.lake import DayParts, RowGroupWriter, split_implausible
from tracepipe.schema import DATASETS

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data" / "netflow"


def _batches() -> list[pa.Table]:
    state = DecoderState()
    out = []
    for capture in ("softflowd-v9.pcap", "softflowd-ipfix.pcap"):
        for b in iter_udp_batches(SAMPLES / capture, batch_datagrams=2):
            walked = walk_datagrams(b.payloads, b.exporters, b.ts_us, b.offsets, "sample", state)[0]
            out.append(decode_walked(walked, ipv4_as_integers=True).flows)
    return out


def _land(batches: list[pa.Table], root: Path, background: bool) -> list[tuple[str, pa.Table, int]]:
    parts = DayParts(root, DATASETS["flows"], "cd" * 32, row_group_rows=40, background=background)
    threads = threading.active_count()
    for flows in batches:
        parts.write(split_implausible(flows, DATASETS["flows"])[0])
    if background:
        assert threading.active_count() == threads + 2  # two threads for all the days' files
    adds = parts.close()
    assert parts.behind is None  # stopped with the files
    out = []
    for add in sorted(adds, key=lambda a: a.partition_values["date"]):
        path = root / "flows" / add.path
        out.append((add.partition_values["date"], pq.read_table(path), pq.read_metadata(path).num_row_groups))
    return out


def test_row_groups_written_by_the_thread_are_those_the_caller_writes(tmp_path: Path) -> None:
    batches = _batches()
    want = _land(batches, tmp_path / "caller", background=False)
    got = _land(batches, tmp_path / "thread", background=True)
    assert sum(t.num_rows for _, t, _ in want) > 100
    assert max(groups for _, _, groups in want) > 2  # several row groups in flight one after the other
    assert [(day, groups) for day, _, groups in got] == [(day, groups) for day, _, groups in want]
    for (_, a, _), (_, b, _) in zip(got, want, strict=True):
        assert a.equals(b)
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_error_in_either_thread_is_raised_to_the_caller() -> None:
    behind = RowGroupWriter()
    written: list[int] = []

    def disk_full(_: object) -> None:
        raise OSError(28, "No space left on device")

    def bad_row(_: object) -> None:
        raise ValueError("a row group that cannot be sorted")

    behind.submit(lambda n: n, disk_full, 1)  # the write fails
    behind.submit(lambda n: n, written.append, 2)  # its sorting stage learns it, before writing
    with pytest.raises(OSError, match="No space left"):
        behind.wait()
    assert written == []  # nothing written after a failed write
    behind.submit(bad_row, written.append, 3)
    with pytest.raises(ValueError, match="cannot be sorted"):
        behind.submit(lambda n: n, written.append, 4)  # the next row group learns it first
    for n in range(5, 9):
        behind.submit(lambda n: n * 10, written.append, n)
    behind.shutdown()
    assert written == [50, 60, 70, 80]  # in the order given


def test_abort_waits_for_the_row_group_in_flight_and_leaves_no_file(tmp_path: Path) -> None:
    parts = DayParts(tmp_path, DATASETS["flows"], "ef" * 32, row_group_rows=40, background=True)
    for flows in _batches():
        parts.write(split_implausible(flows, DATASETS["flows"])[0])
    parts.abort()
    assert parts.behind is None
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
