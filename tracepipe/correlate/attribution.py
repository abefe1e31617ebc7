"""Flow attribution: give both ends of every flow the VM whose lease was valid at `ts_start`.

`attribute_flows(lake, days)` rewrites the flow files of those UTC days (all days if None) through
Lake.rewrite (one commit per day, streamed one row group at a time), with vectorised lease look-ups
(LeaseIndex): `src_vm`/`dst_vm` = vm_id of the lease on that address with valid_from <= ts_start < valid_to
(open leases: valid_to null), and `attributed_at` set. Every other column stays as it was; rerunning gives the
same rows (idempotent). The log's null count of attributed_at tells `flows_attributed` which files to trust
(a null src_vm there means "nobody held the address") and which to join at query time.

Run it when flows land (ingest does) and for the days a late or changed lifecycle event touches
(`leases.rebuild_leases` returns them; `ingest vm` does).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tracepipe.errors import EXIT_OK, LakeError
from tracepipe.lake import Lake

BATCH_ROWS = 1_000_000
_NEVER = np.iinfo(np.int64).max  # valid_to of a lease still held


class LeaseIndex:
    """The leases of vm_leases, indexed so that "which lease was valid for (addr, ts)" is a few vectorised
    numpy searches per batch of flows, no per-row Python.

    Leases do not overlap per address, so the answer is the last lease of that address that started at or
    before ts, if it had not ended yet. To search on (address, start) with one sorted int64 key, times are
    replaced by their rank among all lease starts (rank(start) <= rank(ts) exactly when start <= ts), which
    keeps the key small (addresses x leases) whatever the time span.
    """

    def __init__(self, leases: pa.Table) -> None:
        self.addrs = pc.unique(leases["addr"].combine_chunks())
        addr_id = pc.index_in(leases["addr"], value_set=self.addrs).to_numpy().astype(np.int64)
        valid_from = _micros(leases["valid_from"], fill=0)
        valid_to = _micros(leases["valid_to"], fill=_NEVER)
        self.starts = np.sort(valid_from)
        self.stride = len(valid_from) + 1
        key = addr_id * self.stride + np.searchsorted(self.starts, valid_from, side="right")
        order = np.argsort(key, kind="stable")
        self.keys = key[order]
        self.addr_id = addr_id[order]
        self.valid_to = valid_to[order]
        self.vm_id = leases["vm_id"].combine_chunks().take(pa.array(order))

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, addr: pa.Array | pa.ChunkedArray, ts: pa.Array | pa.ChunkedArray) -> pa.Array:
        """vm_id of the lease valid for each (addr, ts) pair; null where nobody held the address."""
        if len(self.keys) == 0:
            return pa.nulls(len(addr), pa.string())
        aid = pc.fill_null(pc.index_in(addr, value_set=self.addrs), -1).to_numpy().astype(np.int64)
        when = _micros(ts, fill=0)
        key = aid * self.stride + np.searchsorted(self.starts, when, side="right")
        idx = np.searchsorted(self.keys, key, side="right") - 1
        safe = np.where(idx >= 0, idx, 0)
        held = (aid >= 0) & (idx >= 0) & (self.addr_id[safe] == aid) & (when < self.valid_to[safe])
        return self.vm_id.take(pa.array(safe, mask=~held))


def _micros(column: pa.Array | pa.ChunkedArray, fill: int) -> np.ndarray:
    """A timestamp column as int64 microseconds, nulls replaced by `fill`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    return pc.fill_null(values, fill).to_numpy()


def attribute_table(
    flows: pa.Table | pa.RecordBatch, index: LeaseIndex, when: dt.datetime | None = None
) -> pa.Table | pa.RecordBatch:
    """`flows` with src_vm / dst_vm set from the lease index and attributed_at = `when` (default now); every
    other column untouched."""
    src = index.lookup(flows.column("src_addr"), flows.column("ts_start"))
    dst = index.lookup(flows.column("dst_addr"), flows.column("ts_start"))
    stamp = pa.array([when or dt.datetime.now(dt.UTC)], pa.timestamp("us", tz="UTC")).take(
        pa.array(np.zeros(len(flows), np.int32))
    )
    columns = {"src_vm": src, "dst_vm": dst, "attributed_at": stamp}
    for name, values in columns.items():
        if name in flows.schema.names:
            flows = flows.set_column(flows.schema.names.index(name), name, values)
        else:
            flows = flows.append_column(name, values)
    return flows


def lease_index(lake: Lake) -> LeaseIndex:
    """The current vm_leases as a LeaseIndex."""
    return LeaseIndex(lake.read("vm_leases", columns=["addr", "vm_id", "valid_from", "valid_to"]))


def attribute_flows(
    lake: Lake,
    days: Iterable[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Set src_vm/dst_vm/attributed_at of the flows of `days` (None = all) from the current vm_leases.

    One commit per day through Lake.rewrite (memory: the leases plus one batch). Returns {"days", "files",
    "rows", "src_attributed", "dst_attributed", "leases", "seconds"}. `progress` is called after each day
    with (day, days done, days total).
    """
    started = time.perf_counter()
    days_list = sorted(set(days)) if days is not None else None
    summary: dict[str, Any] = {
        "days": days_list if days_list is not None else lake.days("flows"),
        "files": 0,
        "rows": 0,
        "src_attributed": 0,
        "dst_attributed": 0,
        "leases": 0,
        "seconds": 0.0,
    }
    if not lake.files("flows", days_list):
        return summary
    leases_version = lake.version("vm_leases")  # read before the leases: never newer than what is applied
    index = lease_index(lake)
    summary["leases"] = len(index)
    when = dt.datetime.now(dt.UTC)

    def attributed(batch: pa.RecordBatch) -> pa.RecordBatch:
        batch = attribute_table(batch, index, when)
        summary["src_attributed"] += len(batch) - batch.column("src_vm").null_count
        summary["dst_attributed"] += len(batch) - batch.column("dst_vm").null_count
        return batch

    done = lake.rewrite(
        "flows",
        days_list,
        attributed,
        info={"operation": "attribute", "leases": len(index), "leases_version": leases_version},
        progress=progress,
    )
    summary["files"] = done["files_removed"]
    summary["rows"] = done["rows"]
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


@dataclass
class AttributionResult:
    """What `tracepipe attribute` did. Exit code 0 also when the days hold no flows (rows 0: nothing to do is
    an answer); a day that does not parse is a UsageError (2); no lake, or one that cannot be rewritten, a
    LakeError (4)."""

    days: list[str] = field(default_factory=list)
    files: int = 0
    rows: int = 0
    src_attributed: int = 0
    dst_attributed: int = 0
    leases: int = 0
    seconds: float = 0.0
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def attribute_lake(
    lake: Lake,
    days: Iterable[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> AttributionResult:
    """`attribute_flows` for a person repairing a lake: refuses a path that holds no lake instead of
    reporting 0 flows, and returns a result object (what ingest and upgrade embed is the plain summary)."""
    if not lake.root.is_dir():
        raise LakeError(f"no lake at {lake.root}; pass --lake or set TRACEPIPE_LAKE")
    return AttributionResult(**attribute_flows(lake, days, progress))
