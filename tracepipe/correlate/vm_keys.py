"""vms.vm_key: a dense integer per VM, so that flows_attributed joins vms on integers, not on 3 M text ids.

Attribution writes the key of the VM it finds into the flow files (src_vm_key/dst_vm_key, next to src_vm/dst_vm),
and sql/views.sql joins vms on it. That is only right if a key always means the same VM, so:
  * a VM keeps its key forever: every commit of vms rows (full rebuild or incremental update) reads the keys
    of the rows it replaces back and gives each VM the key it had;
  * a new VM gets the next number after the largest key anything in the lake still holds (vms rows, and the
    src_vm_key/dst_vm_key of flow files, from the logs' statistics: a key that flows carry is never handed
    out again, even if the VM's row was lost); new VMs are numbered in (created_at, vm_id) order;
  * keys come from that counter, never from a VM's id or name: whatever ids or names a tenant chooses, two VMs
    never share a key. Should a planted vms file give two VMs one key, the first (created_at, vm_id) keeps it.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from tracepipe.lake import conform
from tracepipe.schema import VMS

FIRST_KEY = 1
# keys above this are none of ours (a planted file): ignored, so that the counter never overflows int64 and a
# lease update never fails on them (a year at CERN is ~3 M VMs: 2**40 lasts)
MAX_KEY = 2**40
_KEYS = pa.schema([VMS.field("vm_id"), VMS.field("vm_key")])


def assign_vm_keys(vms: pa.Table, known: pa.Table, next_key: int) -> pa.Table:
    """`vms` (schema.VMS) with vm_key set: the key `known` (vm_id, vm_key) gives the VM, else the row's own,
    else a new one from `next_key` on (in created_at, vm_id order). A key that two VMs would share stays
    with the first VM by (created_at, vm_id); the other gets a new one."""
    frame = pl.from_arrow(conform(vms, VMS).select(["vm_id", "created_at", "vm_key"]))
    given = pl.from_arrow(conform(known, _KEYS))
    assert isinstance(frame, pl.DataFrame) and isinstance(given, pl.DataFrame)
    plausible = pl.when(pl.col("vm_key").is_between(FIRST_KEY, MAX_KEY)).then(pl.col("vm_key"))
    frame = frame.with_columns(plausible.alias("vm_key"))
    given = given.with_columns(plausible.alias("vm_key"))
    # one key per VM: of a VM listed twice (only a planted file), its smallest key
    seen_known = given.get_column("vm_key").max()
    given = given.drop_nulls("vm_key").group_by("vm_id").agg(pl.col("vm_key").min().alias("_known"))
    per_vm = (
        frame.join(given, on="vm_id", how="left")
        .with_columns(pl.coalesce("_known", "vm_key").alias("vm_key"))
        .group_by("vm_id")
        .agg(pl.col("created_at").min(), pl.col("vm_key").min())
        .sort("created_at", "vm_id", nulls_last=True)
    )
    # a key held by two VMs (planted rows): the first keeps it
    per_vm = per_vm.with_columns(
        pl.when(pl.col("vm_key").is_first_distinct() | pl.col("vm_key").is_null())
        .then(pl.col("vm_key"))
        .otherwise(None)
        .alias("vm_key")
    )
    # past every key seen, also those just taken from a VM: flows may carry them
    seen = [frame.get_column("vm_key").max(), seen_known]
    next_key = max([next_key, *(int(k) + 1 for k in seen if k is not None)])
    missing = per_vm.get_column("vm_key").is_null()
    fresh = pl.Series("vm_key", range(next_key, next_key + int(missing.sum())), pl.Int64)
    new_keys = per_vm.filter(missing).with_columns(fresh)
    keys = pl.concat([per_vm.filter(~missing), new_keys]).select("vm_id", "vm_key")
    column = frame.select("vm_id").join(keys, on="vm_id", how="left", maintain_order="left")
    values = column.get_column("vm_key").to_arrow().cast(pa.int64())
    table = conform(vms, VMS)
    return table.set_column(table.schema.get_field_index("vm_key"), VMS.field("vm_key"), values)


def _max_key(entries: list[Any], columns: tuple[str, ...]) -> int:
    """The largest of `columns` over files, from the log's statistics (no file opened)."""
    found = [
        int(value)
        for entry in entries
        for column in columns
        if isinstance(value := entry.maxs.get(column), int | float) and FIRST_KEY <= value <= MAX_KEY
    ]
    return max(found, default=FIRST_KEY - 1)


def next_vm_key(lake: Any) -> int:
    """The first key no vms row and no flow file of the lake holds."""
    return 1 + max(
        _max_key(lake.entries("vms"), ("vm_key",)),
        _max_key(lake.entries("flows"), ("src_vm_key", "dst_vm_key")),
    )


def keyed_vms(lake: Any, vms: pa.Table, replaced: list[Any]) -> pa.Table:
    """`vms` with vm_key set, for the commit that replaces the vms files `replaced` by these rows (the lease
    writer calls it under the vms lock): each VM keeps the key those files gave it, new VMs get new ones."""
    known = [conform(pq.read_table(e.path, columns=_present(e.path)), _KEYS) for e in replaced]
    known_table = pa.concat_tables(known) if known else _KEYS.empty_table()
    return assign_vm_keys(vms, known_table, next_vm_key(lake))


def keys_of(lake: Any, vm_ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The vm_key of each of `vm_ids` (null where vms has no key for it: a VM only vm_leases names, or vms
    written before keys existed, until the lease writer commits vms again)."""
    import pyarrow.compute as pc

    entries = lake.entries("vms")
    tables = [conform(pq.read_table(e.path, columns=_present(e.path)), _KEYS) for e in entries]
    known = pa.concat_tables(tables) if tables else _KEYS.empty_table()
    if isinstance(vm_ids, pa.ChunkedArray):
        vm_ids = vm_ids.combine_chunks()
    rows = pc.index_in(vm_ids, value_set=known.column("vm_id").combine_chunks())
    return known.column("vm_key").combine_chunks().take(rows)


def _present(path: Any) -> list[str]:
    """vm_id, and vm_key when the file has it (files written before the column existed do not)."""
    names = pq.read_schema(path).names
    return [c for c in _KEYS.names if c in names]
