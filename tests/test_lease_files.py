"""How the lease writer cuts vm_leases and vms into files (leases._chunks): settled rows of one status per file,
the rest apart, cut by time in FILE_ROWS, every file in key order; checked against a plain statement of that rule
on random tables, in key order (as a full build gives them) and shuffled."""

from __future__ import annotations

import datetime as dt
import itertools

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from tracepipe.correlate import leases
from tracepipe.schema import VM_LEASES, VMS

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def _times(rng: np.random.Generator, n: int, nulls: float) -> list[dt.datetime | None]:
    # few distinct instants: ties at file boundaries
    return [
        None if rng.random() < nulls else T0 + dt.timedelta(seconds=int(s)) for s in rng.integers(0, 40, n)
    ]


def _table(name: str, n: int, rng: np.random.Generator) -> pa.Table:
    status = rng.choice(["running", "deleted", "purged", "soft_deleted", None], n).tolist()
    if name == "vm_leases":
        columns = {
            "addr": [f"10.0.{a // 256}.{a % 256}" for a in rng.integers(0, 40, n)],
            "valid_from": _times(rng, n, 0.0),
            "valid_to": _times(rng, n, 0.3),
            "vm_id": [f"vm-{i}" for i in rng.integers(0, 1000, n)],
            "vm_status": status,
        }
        schema = VM_LEASES
    else:
        columns = {
            "vm_id": [f"vm-{i:05d}" for i in rng.permutation(n)],
            "created_at": _times(rng, n, 0.1),
            "deleted_at": _times(rng, n, 0.3),
            "status": status,
            "identity_changed_at": _times(rng, n, 0.7),
        }
        schema = VMS
    table = pa.table(
        {f.name: pa.array(columns.get(f.name, [None] * n), f.type) for f in schema}, schema=schema
    )
    key = [(k, "ascending") for k in leases._KEY_OF[name]]
    return table.sort_by(key)


def _expected(table: pa.Table, name: str) -> list[pl.DataFrame]:
    """Each file as (its part, its rows in key order): the rule, stated plainly."""
    frame = pl.from_arrow(table)
    settled = frame.select(leases._settled(name).fill_null(False)).to_series()
    parts = []
    for flag in (True, False):
        rows = frame.filter(settled == flag)
        groups = rows.partition_by(leases._STATUS[name], maintain_order=True) if flag else [rows]
        for group in groups:
            if name == "vms":
                changed = group.get_column("identity_changed_at").is_not_null()
                split = [group.filter(~changed), group.filter(changed)]
            else:
                split = [group]
            for part in split:
                by = leases._SETTLED_TIME[name] if flag else leases._TIME_OF[name]
                parts.append(part.sort(by, nulls_last=True, maintain_order=True))
    files = []
    for part in parts:
        for i in range(0, part.height, leases.FILE_ROWS):
            rows = part.slice(i, leases.FILE_ROWS).sort(
                leases._KEY_OF[name], nulls_last=True, maintain_order=True
            )
            files.append(rows)
    return files


def _described(files: list) -> list[int]:
    """Files compared by their sizes: which rows a tie at a boundary puts in which file is free (checked
    apart: one part per file, consecutive time ranges)."""
    return sorted(f.height if isinstance(f, pl.DataFrame) else f.num_rows for f in files)


@pytest.mark.parametrize("name", ["vm_leases", "vms"])
@pytest.mark.parametrize("shuffled", [False, True])
def test_files_follow_the_rule(name: str, shuffled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leases, "FILE_ROWS", 7)
    rng = np.random.default_rng(5 + shuffled)
    for _ in range(20):
        table = _table(name, int(rng.integers(1, 120)), rng)
        if shuffled:
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        files = leases._chunks(table, name)
        expected = _expected(table, name)
        assert sum(f.num_rows for f in files) == table.num_rows
        assert all(f.schema == table.schema for f in files)
        assert _described(files) == _described(expected)
        key = leases._KEY_OF[name]
        status, opened = leases._STATUS[name], leases._OPEN[name]
        for f in files:
            frame = pl.from_arrow(f)
            assert frame.equals(frame.sort(key, nulls_last=True, maintain_order=True)), (
                "a file out of key order"
            )
            settled = frame.select(leases._settled(name).fill_null(False)).to_series()
            # settled rows never share a file with others, and one status per settled file
            assert settled.all() or not settled.any()
            if settled.all():
                assert frame.get_column(status).n_unique() == 1 and frame.get_column(opened).null_count() == 0
            if name == "vms":
                assert frame.get_column("identity_changed_at").is_null().n_unique() == 1
        # every row exactly once
        got = pl.concat([pl.from_arrow(f) for f in files]).sort(pl.all(), nulls_last=True)
        assert got.equals(pl.from_arrow(table).sort(pl.all(), nulls_last=True))
        # the time cut: the files of one part hold consecutive time ranges (ties may fall either side)
        parts: dict[tuple, list[tuple]] = {}
        for frame in (pl.from_arrow(f) for f in files):
            s = bool(frame.select(leases._settled(name).fill_null(False)).to_series().all())
            by = leases._SETTLED_TIME[name] if s else leases._TIME_OF[name]
            part = (s, frame.get_column(status)[0] if s else None)
            if name == "vms":
                part += (frame.get_column("identity_changed_at").is_null()[0],)
            t = frame.get_column(by).dt.epoch("us").fill_null(2**62)
            parts.setdefault(part, []).append((t.min(), t.max(), frame.height))
        for ranges in parts.values():
            ranges.sort(key=lambda r: (r[0], r[1], r[2] != leases.FILE_ROWS))  # (the short file last)
            for (_, high, rows), (low, _, _) in itertools.pairwise(ranges):
                assert rows == leases.FILE_ROWS and high <= low
