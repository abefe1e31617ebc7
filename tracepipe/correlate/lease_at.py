"""Who held address X at time T: the one answer, for flows, VM log lines, alerts and `tracepipe who`.

Semantics (the SQL in tracepipe/sql/views.sql reads the same vm_leases rows the same way):
  * a lease holds its address on the half-open interval [valid_from, valid_to); valid_to null = still held.
    At the instant one lease ends and the next begins (reuse, migration split), the NEW lease holds it.
  * build_leases never lets two leases of one address overlap. Should a lake hold overlapping rows anyway (a
    hand-edited or planted file), the lease that started last wins; equal starts: the greater vm_id.
  * addresses are compared as canonical text (10.1.2.3, 2001:db8::1), as the lake stores them.
  * no lease, or the address's last lease before T ended at or before T: null (nobody held it).

`lease_at(leases, addresses, times)` takes Arrow/polars columns and returns columns (one row per input,
nulls where nobody held the address): numpy searches over a sorted (address, start) key, no per-row Python.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tracepipe.schema import VM_LEASES

_NEVER = np.iinfo(np.int64).max  # valid_to of a lease still held
# LeaseIndex columns holding each lease's VM's identity facts, schema.VM_FACTS (lease_index(..., vm_keys=True))
FACT_PREFIX = "fact_"
# and the lease's vm_id as a dictionary code over vms' ids, when vms has every lease's VM: attribution then takes
# 4-byte codes per flow and writes a dictionary of the VMs a file uses, never copying an id string per flow
CODED_VM = "coded_vm_id"
_CACHE_KEYS = 1 << 18  # more leases than this (2 MiB of keys) and queries are searched in sorted order
if TYPE_CHECKING:  # polars is imported by who uses it: `ingest netflow` into a lake without leases never does
    import polars as pl

    Column = pa.Array | pa.ChunkedArray | pl.Series


def _arrow(column: Column) -> pa.Array:
    polars = sys.modules.get("polars")  # a polars Series exists only once polars is imported
    if polars is not None and isinstance(column, polars.Series):
        column = column.to_arrow()
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column


def _micros(column: Column, fill: int) -> np.ndarray:
    """A timestamp column as int64 microseconds, nulls replaced by `fill`."""
    values = _arrow(column).cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    return pc.fill_null(values, fill).to_numpy()


class LeaseIndex:
    """vm_leases rows indexed so that "which row was valid for (addr, ts)" is one vectorised numpy search per
    batch, whatever the batch size.

    Leases do not overlap per address, so the answer is the last lease of that address that started at or
    before ts, if it had not ended yet: a search on one sorted int64 key, address number x stride + time.
    The time is the µs since the first lease start when addresses x span fit in 62 bits (a /16 over four
    years); else its rank among all lease starts (rank(start) <= rank(ts) exactly when start <= ts), one more
    search per batch but a key as small as addresses x leases whatever the span."""

    def __init__(self, leases: pa.Table) -> None:
        self.leases = leases
        self.addrs = pc.unique(_arrow(leases["addr"]))
        addr_id = pc.index_in(_arrow(leases["addr"]), value_set=self.addrs).to_numpy().astype(np.int64)
        valid_from = _micros(leases["valid_from"], fill=0)
        valid_to = _micros(leases["valid_to"], fill=_NEVER)
        started = pc.is_valid(_arrow(leases["valid_from"])).to_numpy(zero_copy_only=False)
        if not started.all():
            # a lease without a start (only a planted or hand-edited row) holds no time, as in the SQL views'
            # ASOF join; it used to hold its address from 1970 on (its start read as 0)
            addr_id = np.where(started, addr_id, -2)
            valid_from = np.where(started, valid_from, valid_from[started].min() if started.any() else 0)
        self.first = int(valid_from.min()) if len(valid_from) else 0
        span = int(valid_from.max()) - self.first + 2 if len(valid_from) else 2
        self.starts: np.ndarray | None = None
        if (len(self.addrs) + 1) * span < 2**62:
            self.stride = span
            key = addr_id * self.stride + (valid_from - self.first + 1)
        else:
            self.starts = np.sort(valid_from)
            self.stride = len(valid_from) + 1
            key = addr_id * self.stride + np.searchsorted(self.starts, valid_from, side="right")
        order = np.argsort(key, kind="stable")
        keys = key[order]
        if "vm_id" in leases.column_names and bool(np.any(keys[1:] == keys[:-1])):
            # two leases of one address from the same instant (only a planted or hand-edited file): the
            # tie-break of the module docstring, the greater vm_id comes last. Rare, so paid only then
            by_vm = pc.sort_indices(leases, [("vm_id", "ascending")]).to_numpy()
            order = by_vm[np.argsort(key[by_vm], kind="stable")]
            keys = key[order]
        self.order = order
        self.keys = keys
        self.addr_id = addr_id[order]
        self.valid_to = valid_to[order]

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, addresses: Column, times: Column) -> pa.Array:
        """Row number in `leases` of the lease valid for each (address, time); null where nobody held it."""
        if len(self.keys) == 0:
            return pa.nulls(len(addresses), pa.int64())
        aid = pc.fill_null(pc.index_in(_arrow(addresses), value_set=self.addrs), -1).to_numpy()
        aid = aid.astype(np.int64)
        when = _micros(times, fill=0)
        if self.starts is None:
            # before the first start: 0 (no lease of the address started yet); after the last: the last
            offset = np.clip(when - self.first + 1, 0, self.stride - 1)
        else:
            offset = np.searchsorted(self.starts, when, side="right")
        key = aid * self.stride + offset
        if len(self.keys) > _CACHE_KEYS:
            # a big index (millions of leases): searching in sorted query order walks it forward instead of
            # missing the cache on every query (3 M leases: 4x faster, sort included)
            by_key = np.argsort(key)
            idx = np.empty(len(key), np.int64)
            idx[by_key] = np.searchsorted(self.keys, key[by_key], side="right") - 1
        else:
            idx = np.searchsorted(self.keys, key, side="right") - 1
        safe = np.where(idx >= 0, idx, 0)
        held = (aid >= 0) & (idx >= 0) & (self.addr_id[safe] == aid) & (when < self.valid_to[safe])
        return pa.array(self.order[safe], pa.int64(), mask=~held)

    def lookup(self, addresses: Column, times: Column, columns: Sequence[str] = ("vm_id",)) -> pa.Table:
        """`columns` of the lease valid for each (address, time), one row per input; nulls where none."""
        rows = self.rows(addresses, times)
        if self.leases.num_rows == 0:
            return pa.table({c: pa.nulls(len(rows), self.leases.schema.field(c).type) for c in columns})
        return self.leases.select(list(columns)).take(rows)


def lease_at(
    leases: pa.Table, addresses: Column, times: Column, columns: Sequence[str] = ("vm_id",)
) -> pa.Table:
    """Who held each address at each time: `columns` of vm_leases (vm_id, vm_name, project, ...), one row per
    (address, time), nulls where nobody held the address then. See the module docstring for the rules."""
    return LeaseIndex(leases).lookup(addresses, times, columns)


def read_leases(
    lake: Any,
    addresses: Iterable[str] | None = None,
    columns: Sequence[str] | None = None,
    during: tuple[dt.datetime, dt.datetime] | None = None,
) -> pa.Table:
    """vm_leases of the lake: only the rows of `addresses`, and only the leases that overlap `during` = [lo, hi)
    (valid_from < hi, still held or valid_to > lo), skipping files and row groups by their statistics (files
    are cut by valid_from; settled ones hold closed leases). A file whose statistics in the log rule out such
    a lease is not even opened (lease_files): what `during` costs follows the leases held then, not the history.

    Within `during`, the leases that overlap it give every answer the whole table gives: leases never
    overlap (build_leases), so one that ended by lo is never the last lease of its address started at or
    before a time in [lo, hi) while holding it. (Rows planted to overlap: the module docstring's rule among
    the leases that overlap `during`.)"""
    wanted = list(columns) if columns is not None else VM_LEASES.names
    paths = [str(p) for p in lease_files(lake, during)]
    schema = pa.schema([VM_LEASES.field(c) for c in wanted])
    if not paths:
        return schema.empty_table()
    import pyarrow.dataset as ds  # here, not at the top: it imports pandas (~1 s), which an ingest without leases never needs

    dataset = ds.dataset(paths, format="parquet", schema=VM_LEASES)
    where = None
    if addresses is not None:
        where = pc.field("addr").isin(pa.array(sorted(set(addresses)), pa.string()))
    if during is not None:
        lo, hi = (pa.scalar(t, pa.timestamp("us", tz="UTC")) for t in during)
        overlap = (pc.field("valid_from") < hi) & (
            pc.field("valid_to").is_null() | (pc.field("valid_to") > lo)
        )
        where = overlap if where is None else where & overlap
    return dataset.to_table(columns=wanted, filter=where).cast(schema)


def lease_files(lake: Any, during: tuple[dt.datetime, dt.datetime] | None = None) -> list[Path]:
    """The vm_leases files that may hold a lease overlapping `during` = [lo, hi), by the log's statistics (no
    file opened): not those whose leases all start at or after hi, nor those whose leases all ended by lo.
    A file without such statistics (or with statistics of another type, as a planted log entry could give)
    is kept."""
    if during is None:
        return lake.files("vm_leases")
    from tracepipe.lake import regular_files  # (lease_at alone, on tables, never needs the lake's imports)

    # a naive time is UTC, as pyarrow takes it in read_leases' filter
    lo, hi = (t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t for t in during)
    kept = []
    for entry in lake.entries("vm_leases"):
        first, last = entry.mins.get("valid_from"), entry.maxs.get("valid_to")
        if isinstance(first, dt.datetime) and first.tzinfo is not None and first >= hi:
            continue
        closed = entry.null_counts.get("valid_to") == 0 and entry.rows > 0
        if closed and isinstance(last, dt.datetime) and last.tzinfo is not None and last <= lo:
            continue
        kept.append(entry.path)
    return regular_files(kept)


def lease_index(
    lake: Any,
    addresses: Iterable[str] | None = None,
    vm_keys: bool = False,
    during: tuple[dt.datetime, dt.datetime] | None = None,
) -> LeaseIndex:
    """The lake's vm_leases (or the rows of some addresses, or the leases that overlap `during`: read_leases)
    as a LeaseIndex; with `vm_keys`, each lease also carries its VM's vms.vm_key and identity facts (vm_key,
    fact_<name> for schema.VM_FACTS: what attribution writes into flow files, attribution.attribute_table)."""
    leases = read_leases(lake, addresses, ["addr", "vm_id", "valid_from", "valid_to"], during)
    if vm_keys:
        from tracepipe.correlate.vm_keys import vms_of
        from tracepipe.schema import VM_FACTS

        since = None if during is None else during[0]
        of_vm = vms_of(lake, leases.column("vm_id"), ["vm_id", "vm_key", *VM_FACTS], since)
        for name in of_vm.column_names:
            if name == "vm_id":
                if of_vm.column(name).null_count == leases.column(name).null_count:
                    leases = leases.append_column(CODED_VM, of_vm.column(name))
                continue
            column = name if name == "vm_key" else FACT_PREFIX + name
            leases = leases.append_column(column, of_vm.column(name))
    return LeaseIndex(leases)


# ---- the times a lease update changed (leases._changed_spans), and the lake files that hold data of them -------

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def span_bounds(spans: Any) -> tuple[np.ndarray, np.ndarray]:
    """leases._changed_spans (a polars frame: valid_from, valid_to; null: open) -> their union as sorted,
    disjoint [start, end) in µs (ends ascending)."""
    start = spans.get_column("valid_from").dt.epoch("us").to_numpy().astype(np.int64)
    end = (
        spans.get_column("valid_to")
        .dt.epoch("us")
        .fill_null(np.iinfo(np.int64).max)
        .to_numpy()
        .astype(np.int64)
    )
    if len(start) == 0:
        return start, end
    order = np.argsort(start, kind="stable")
    start, end = start[order], end[order]
    reach = np.maximum.accumulate(end)
    first = np.flatnonzero(np.r_[True, start[1:] > reach[:-1]])  # (each a span that starts after all before)
    return start[first], np.maximum.reduceat(end, first)


def file_meets_spans(entry: Any, column: str, bounds: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether a lake file's range of `column` (the log's statistics, kept to the millisecond: its maximum taken
    1 ms later) meets one of span_bounds' spans; unknown statistics: it may."""
    low, high = entry.mins.get(column), entry.maxs.get(column)
    if not isinstance(low, dt.datetime) or not isinstance(high, dt.datetime):
        return True
    low, high = (t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC) for t in (low, high))
    starts, ends = bounds
    low_us = (low - _EPOCH) // dt.timedelta(microseconds=1)
    high_us = (high - _EPOCH) // dt.timedelta(microseconds=1) + 1000
    at = int(np.searchsorted(ends, low_us, side="right"))
    return at < len(starts) and bool(starts[at] <= high_us)


def days_meeting_spans(lake: Any, name: str, column: str, spans: Any, days: Iterable[str]) -> set[str]:
    """Of `days`, those on which a file of table `name` holds `column` values within the spans."""
    bounds = span_bounds(spans)
    return {
        e.day for e in lake.entries(name, sorted(set(days))) if e.day and file_meets_spans(e, column, bounds)
    }
