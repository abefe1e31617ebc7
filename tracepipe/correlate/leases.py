"""vm_events -> vm_leases + vms: who held which address from when to when, and what became of each VM.

`build_leases` is a pure function of the whole event history: events are de-duplicated (same event_id for the
same VM, or identical content) and replayed in a total order (ts, phase, then content), so shuffled or repeated
notifications give the same leases. It guarantees that no address has two leases at one instant (valid_to is
exclusive): an address taken by another VM closes the previous holder's lease (end_reason "superseded").

The deletion and quarantine model (README, "VM lifecycle: tracepipe ingest vm"), with Q = `reclaim_interval`
(Nova's reclaim_instance_interval, or the site's retention of deleted VMs' images):
  soft_delete     leases stay open (Nova keeps the ports), status soft_deleted (= quarantined, restorable),
                  quarantine_until = soft-delete time + Q (when Nova's periodic task reclaims it).
  restore         status active again, quarantine cleared.
  delete          all leases close (end_reason delete), status deleted, deleted_at = the delete's time;
                  quarantine_until = deleted_at + Q; when the VM was soft-deleted until then (Nova's reclaim,
                  or a force delete, which Nova also reports as instance.delete.*), the image was kept until
                  then: min(soft-delete time + Q, deleted_at).
  force_delete    as delete, end_reason force_delete; nothing is kept: quarantine_until null.
Whether a quarantine is over is a question for query time (quarantine_until < now); leases stay pure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tracepipe.correlate import VMS_COMPLETE
from tracepipe.correlate.lease_at import days_meeting_spans
from tracepipe.correlate.vm_keys import keyed_vms, lost_keys_info, sorted_unique
from tracepipe.fsutil import write_atomic
from tracepipe.lake import conform, read_parquet_files, sort_indices
from tracepipe.schema import VM_EVENTS, VM_LEASES, VMS

SETTINGS_FILE = "_settings/leases.json"

# events that only announce an action; the VM's state changes with the .end
_PASSIVE_PHASES = (0, 1)  # normalise_events' _phase: 0 .start, 1 .error, 2 .end or no phase
_DEFAULT_STATUS = {
    "create": "active",
    "power_on": "active",
    "power_off": "stopped",
    "reboot": "active",
    "rebuild": "active",
    "shelve": "shelved",
    "shelve_offload": "shelved",
    "unshelve": "active",
    "restore": "active",
    "soft_delete": "soft_deleted",
    "delete": "deleted",
    "force_delete": "deleted",
    "purge": "purged",
}
_GONE = ("deleted", "purged")
_DELETES = ("delete", "force_delete", "purge")
_FLOATING_ACTIONS = frozenset({"fip_associate", "fip_disassociate", "fip_delete"})
# facts of a VM that the latest event naming them decides (image: a rebuild changes it)
_IDENTITY = ("vm_name", "project", "user", "cloud", "image")
_CONTENT = [f.name for f in VM_EVENTS if f.name not in ("source", "line")]
# the actions the replay tells apart, as small integers (column `_act`; any other action is -1): one pass over
# the text, then integer comparisons instead of a string comparison per question
_ACTION_CODE = {
    a: i
    for i, a in enumerate(
        sorted({*_DEFAULT_STATUS, *_FLOATING_ACTIONS, "attach", "detach", "port_update", "unknown"})
    )
}


def _act_in(*actions: str) -> pl.Expr:
    return pl.col("_act").is_in([_ACTION_CODE[a] for a in actions])


# flags of an event's action that the replay asks about (_vm_events, _deletes; _own is negated in _vm_events,
# _delete narrowed in _deletes)
_ACTION_FLAGS = {
    "_floating": _FLOATING_ACTIONS,
    "_delete": _DELETES,
    "_delete_or_detach": (*_DELETES, "detach"),
    "_port_update": ("port_update",),
    "_restore": ("restore",),
    "_soft_delete": ("soft_delete",),
    "_purge_act": ("purge",),
    "_create": ("create",),
    "_default": tuple(_DEFAULT_STATUS),
    "_own": ("port_update", "fip_associate"),
}


def _action_bits(act: pl.Series) -> np.ndarray:
    """The _ACTION_FLAGS of each event from its action code (-1: any other action) as a bit set (bit i: the
    i-th flag): one look-up per event (an is_in per flag costs several times more)."""
    table = np.zeros(len(_ACTION_CODE) + 1, np.uint16)
    for bit, actions in enumerate(_ACTION_FLAGS.values()):
        for action in actions:
            table[_ACTION_CODE[action] + 1] |= 1 << bit
    return table[act.to_numpy().astype(np.int16) + 1]


def _action_flag(bits: np.ndarray, name: str) -> np.ndarray:
    return (bits & (1 << list(_ACTION_FLAGS).index(name))) != 0


def _action_flags(act: pl.Series) -> list[pl.Series]:
    """The _ACTION_FLAGS of each event from its action code, a boolean column each."""
    bits = _action_bits(act)
    return [pl.Series(name, _action_flag(bits, name)) for name in _ACTION_FLAGS]


def _replay_order(events: pa.Table) -> tuple[pl.Series, pl.Series]:
    """The replay order of the events, duplicate deliveries left out: (row positions in `events`, in that
    order; the phase of each: 0 .start, 1 .error, 2 .end or no phase)."""
    # (only integers for every event: the time, the phase and the hash of the identity, made file by file
    # (_chunkwise); the texts of event_id and vm_id as polars columns of every event, rechunked, were ~1.8 GB
    # more at the peak of a year's rebuild and ~1 CPU s)
    head = pl.DataFrame(
        [
            pl.Series("ts", events.column("ts")),
            # (a null index of a dictionary chunk gives null: no event_type, no phase)
            _chunkwise(events.column("event_type"), lambda t: t.select(_phase(pl.first())).to_series())
            .fill_null(2)
            .alias("_phase"),
            _identity_hashes(events),
        ]
    ).rechunk()
    phase = _phase(pl.col("event_type")).alias("_phase")
    # the replay order: time, start/error before end, then the event's identity; exact ties broken by a hash
    # (sorting on every content column costs more than the whole replay). A hash collision can only swap two
    # events of one instant; which events are the same is decided on the content itself, never on the hash.
    # Sorted on the integers (ts, phase) first; only the rows sharing both (few) are sorted on the identity
    # columns, in place: such rows are adjacent, so sorting them apart leaves every other row where it is.
    order = head.select("ts", "_phase").with_row_index("_row")
    order = order.sort(_packed_time_order(order), nulls_last=True)
    same = pl.col("ts").eq_missing(pl.col("ts").shift(1)) & (pl.col("_phase") == pl.col("_phase").shift(1))
    same = same.fill_null(False)
    tied = order.with_row_index("_at").filter(same | same.shift(-1).fill_null(False))
    rows = order.get_column("_row")
    ties = None
    if tied.height:
        sub = _frame_of(events, tied.get_column("_row")).with_columns(tied.get_column("_row"))
        ties = (
            sub.select(
                "_row",
                "ts",
                phase,
                "event_id",
                "vm_id",
                "event_type",
                "action",
                (pl.col(_TIE) if _TIE in sub.columns else _tie_key()).alias("_key"),
            )
            .sort(["ts", "_phase", "event_id", "vm_id", "event_type", "action", "_key"], nulls_last=True)
            .select("_row", "ts", "_key", tied.get_column("_at"))  # in the replay order, as `_at`
        )
        rows = rows.scatter(ties.get_column("_at"), ties.get_column("_row"))
    # at-least-once delivery: the same message id twice for the same VM is one event (the first in the replay
    # order); so is identical content. Both are decided on the values, among the few rows whose hash repeats.
    # (An id is one event only with its VM: a replayed or forged notification, or a generic export numbering
    # each VM's events from 1, reusing an id for another VM made that VM's events vanish, and a VM left with
    # none broke every later build: hostile review, session 26. Ingest keys events alike: event_keys.)
    dropped: list[pl.Series] = []
    hashes = head.get_column("_identity").gather(rows)
    seen = hashes.drop_nulls().sort()
    repeated = seen.filter(seen == seen.shift(1))
    if len(repeated):
        at = hashes.is_in(repeated.implode()).arg_true()
        ids = _frame_of(events.select(["event_id", "vm_id"]), rows.gather(at))
        dropped.append(at.filter(~ids.select(pl.struct("event_id", "vm_id").is_first_distinct()).to_series()))
    if ties is not None:
        if dropped:
            ties = ties.filter(~pl.col("_at").is_in(dropped[0].cast(ties.schema["_at"]).implode()))
        maybe = ties.filter(pl.struct("ts", "_key").is_duplicated())
        if maybe.height:
            content = pl.struct([c if c != "addrs" else pl.col("addrs").list.join(",") for c in _CONTENT])
            suspects = _frame_of(events, maybe.get_column("_row")).with_columns(maybe.get_column("_at"))
            dropped.append(suspects.filter(~content.is_first_distinct()).get_column("_at"))
    keep = pl.repeat(True, head.height, eager=True)
    for at in dropped:
        keep = keep.scatter(at, False)
    return rows.filter(keep), order.get_column("_phase").filter(keep)


# The tie break of events of one instant: a hash of every column of their content (a subset that left the port
# out ordered two floating-IP associations through two ports as the input did, and the leases with them: found
# by Hypothesis, test_neutron_events_in_any_order_give_the_full_build). The incremental update replays events
# whose addresses it took out before what it recomputes (_strip_before): it hands their key as it was, in the
# column _TIE, so that its replay orders them as the full build does (with the stripped lists hashed, two
# live migrations of one instant ended on either hypervisor: Hypothesis again).
_TIE = "_tie"


def _tie_key() -> pl.Expr:
    """The tie-break hash of each event of a frame holding the content columns (_CONTENT)."""
    return pl.struct(
        [c if c != "addrs" else pl.col("addrs").list.join(",") for c in _CONTENT if c != "ts"]
    ).hash(18)


def _packed_time_order(order: pl.DataFrame) -> pl.Expr | list[str]:
    """The sort key (ts, nulls last; _phase 0-2) as one integer when the time span allows (it does unless a
    planted file puts events millennia apart): a sort on one Int64 instead of two columns."""
    us = pl.col("ts").dt.epoch("us")
    low, high = order.select(us.min().alias("low"), us.max().alias("high")).row(0)
    if low is None or (high - low + 2) * 4 >= 2**62:
        return ["ts", "_phase"]
    return pl.when(us.is_null()).then(high - low + 1).otherwise(us - low) * 4 + pl.col("_phase")


def _phase(event_type: pl.Expr) -> pl.Expr:
    """An event's _phase from its event_type: 0 .start, 1 .error, 2 .end or no phase."""
    ends = event_type.str.ends_with
    return pl.when(ends(".start")).then(0).when(ends(".error")).then(1).otherwise(2).cast(pl.Int32)


def _chunkwise(column: pa.ChunkedArray, make: Callable[[pl.DataFrame], pl.Series]) -> pl.Series:
    """make(a frame of one text column) over each chunk of `column` (a file's rows), the results put together:
    the text is a polars column one chunk at a time, never all of it. A dictionary chunk is worked out on its
    values and gathered by its indices."""
    parts = [
        make(pl.DataFrame([_polars_text(chunk.dictionary)])).gather(pl.Series(chunk.indices))
        if pa.types.is_dictionary(chunk.type)
        else make(pl.DataFrame([_polars_text(chunk)]))
        for chunk in column.chunks
    ]
    return pl.concat(parts, rechunk=False) if parts else make(pl.DataFrame([pl.Series([], dtype=pl.String)]))


def _identity_hashes(events: pa.Table) -> pl.Series:
    """A hash of each event's (event_id, vm_id), null without an event_id: the candidates of one event
    delivered twice (decided on the values, _replay_order). Two column hashes combined (a third of a struct's
    hash: 0.53 -> 0.17 CPU s on a year of events), made batch by batch (a file's rows)."""
    paired = pl.when(pl.col("e").is_not_null()).then(pl.col("e").hash(18) ^ pl.col("v").hash(7))
    parts = [
        pl.DataFrame([_polars_text(b.column(0)).alias("e"), _polars_text(b.column(1)).alias("v")])
        .select(paired)
        .to_series()
        for b in events.select(["event_id", "vm_id"]).to_batches()
    ]
    return (pl.concat(parts, rechunk=False) if parts else pl.Series(dtype=pl.UInt64)).alias("_identity")


def _frame_of(events: pa.Table, rows: pl.Series) -> pl.DataFrame:
    """The events at these row positions (a few), as a polars frame."""
    return _to_polars(_take_rows(events, rows.cast(pl.Int64).to_numpy()))


# A full rebuild reads the whole event history (a year at CERN: 12.5 M rows) with its repetitive text columns as
# dictionaries (read_parquet_files' `dictionary`): the replay reads them as codes (_dictionary_encode,
# _action_codes) or as polars text made from the few values (_to_polars), and the output tables take their texts
# (_take). Reading them as a string per row was two thirds of the read's CPU and a third of its memory.
EVENT_DICTIONARY = (
    "cloud",
    "project",
    "user",
    "hypervisor",
    "event_type",
    "action",
    "state",
    "addr_kind",
    "source",
)


def read_event_files(paths: list[Path]) -> pa.Table:
    """vm_events files as one table for a full build: EVENT_DICTIONARY columns dictionary-encoded, one
    dictionary per column over all files."""
    if not paths:
        return VM_EVENTS.empty_table()
    return pa.concat_tables(read_parquet_files(paths, VM_EVENTS, EVENT_DICTIONARY)).unify_dictionaries()


def _polars_text(column: pa.ChunkedArray | pa.Array) -> pl.Series:
    """A text column as polars String: a dictionary column by a gather of its few values by its indices (no
    Categorical: the replay compares, sorts and concatenates these as text)."""
    if not pa.types.is_dictionary(column.type):
        return pl.Series(column)
    whole = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column  # (one dictionary)
    values = pl.Series(whole.dictionary.cast(pa.string()))
    return values.gather(pl.Series(whole.indices))


def _to_polars(table: pa.Table) -> pl.DataFrame:
    """pl.from_arrow, dictionary text columns as String (_polars_text)."""
    if not any(pa.types.is_dictionary(t) for t in table.schema.types):
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        return frame
    return pl.DataFrame(
        [
            _polars_text(table.column(i)).alias(name)
            if pa.types.is_dictionary(table.schema.types[i])
            else pl.Series(name, table.column(i))
            for i, name in enumerate(table.column_names)
        ]
    )


def _take_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """table's rows at these positions, taken from the record batches that hold them: Arrow's take on a table
    of many chunks (one per file or row group) first concatenates every column, ~0.7 s for a year of events
    to take four rows. The work is one take per batch touched, whatever the table's size."""
    if len(rows) == 0:
        return table.slice(0, 0)
    batches = table.to_batches()
    if len(batches) <= 1:
        return table.take(pa.array(rows, pa.int64()))
    ends = np.cumsum([b.num_rows for b in batches])
    at = np.searchsorted(ends, rows, side="right")
    starts = ends - np.array([b.num_rows for b in batches])
    by_batch = np.argsort(at, kind="stable")
    touched, first = np.unique(at[by_batch], return_index=True)  # (return_index: numpy's sort path)
    parts = [
        batches[b].take(pa.array(rows[by_batch[i:j]] - starts[b], pa.int64()))
        for b, i, j in zip(touched, first, [*first[1:], len(rows)], strict=True)
    ]
    taken = pa.Table.from_batches(parts, schema=table.schema)
    back = np.empty(len(rows), np.int64)
    back[by_batch] = np.arange(len(rows), dtype=np.int64)
    return taken.combine_chunks().take(pa.array(back))


def _in_order(frame: pl.DataFrame, rows: pl.Series) -> pl.DataFrame:
    """frame's rows at `rows`: a filter when they are in ascending order (events read in time order: no
    gather of every column), else a gather."""
    if rows.len() and (rows.diff().drop_nulls() > 0).all():
        mask = pl.repeat(False, frame.height, eager=True).scatter(rows, True)
        return frame.filter(mask)
    return frame.rechunk().gather(rows)


def normalise_events(events: pa.Table) -> pl.DataFrame:
    """Drop duplicate deliveries and sort into the replay order (independent of the input order)."""
    frame = _to_polars(events.select([f.name for f in VM_EVENTS]))
    if frame.height == 0:
        return frame.with_columns(pl.lit(None, pl.Int32).alias("_phase"))
    rows, phases = _replay_order(events.select([f.name for f in VM_EVENTS]))
    return _in_order(frame, rows).with_columns(phases)


# ---- the vectorised replay ------------------------------------------------------------------------------------
# The replay works on integer codes of VM ids and addresses (_encode): in the text's sort order, so that every
# sort, join and group-by gives what it gives on the text, at a fraction of the cost; text comes back at the end.

_CODE = pl.Int64


def _encode(text: pa.Array | pa.ChunkedArray) -> tuple[pl.Series, pl.Series]:
    """Text -> (codes, the distinct texts sorted): codes[i] is the position of text[i] among them (null stays
    null). Arrow's hash encoding, then one sort of the distinct values (bytes order, as polars sorts text)."""
    encoded = _dictionary_encode(text)
    # (polars' sort of the distinct texts: a third of Arrow's time on a year of VM ids)
    names = pl.from_arrow(encoded.dictionary)
    assert isinstance(names, pl.Series)
    order = names.arg_sort().to_numpy()
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    indices = encoded.indices
    # (the look-up in numpy: a polars gather of a million codes costs twice as much)
    at = indices.fill_null(0).to_numpy(zero_copy_only=False)
    codes = rank[at] if len(rank) else np.zeros(len(at), np.int64)  # (no text at all: every code null)
    codes = pl.Series(codes)
    if indices.null_count:
        codes = codes.set(pl.Series(indices.is_null()), None)
    return codes, names.gather(order).cast(pl.String)


def _dictionary_encode(text: pa.Array | pa.ChunkedArray) -> pa.DictionaryArray:
    """Arrow's dictionary encoding as one array. A column of many chunks (one per file) is encoded chunk by
    chunk with one hash table, which gives every chunk the same dictionary: its indices are then put together
    instead of first concatenating the text (a year of VM ids: ~0.5 s and a copy of every byte)."""
    if pa.types.is_dictionary(text.type):  # (read so: read_event_files)
        whole = text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text
        values = whole.dictionary
        if values.null_count == 0 and pc.count_distinct(values).as_py() == len(values):
            return whole
        # (a value twice in a file's dictionary, or a null one: a planted file)
        text = whole.cast(pa.string())
    if isinstance(text, pa.Array):
        return pc.dictionary_encode(text)
    encoded = pc.dictionary_encode(text)
    if encoded.num_chunks == 0:
        return pc.dictionary_encode(text.combine_chunks())
    dictionary = encoded.chunk(0).dictionary
    if all(_same_buffers(chunk.dictionary, dictionary) for chunk in encoded.chunks[1:]):
        indices = pa.chunked_array([c.indices for c in encoded.chunks], encoded.type.index_type)
        return pa.DictionaryArray.from_arrays(indices.combine_chunks(), dictionary)
    return pc.dictionary_encode(text.combine_chunks())  # (an Arrow that gives each chunk its own dictionary)


def _same_buffers(a: pa.Array, b: pa.Array) -> bool:
    """a and b are views of the same memory (a check of addresses, not of values)."""
    if len(a) != len(b) or a.offset != b.offset:
        return False
    return [x and (x.address, x.size) for x in a.buffers()] == [
        x and (x.address, x.size) for x in b.buffers()
    ]


def _encode_addrs(events: pa.Table) -> tuple[pl.Series, pl.Series, pl.Series]:
    """The addr column and the addrs lists of the events as codes of one text set -> (addr codes, addrs as
    lists of codes, the distinct addresses sorted)."""
    lists = events.column("addrs").combine_chunks()
    flat = pc.list_flatten(lists)
    single = events.column("addr").combine_chunks()
    codes, addr_names = _encode(pa.concat_arrays([single, flat.cast(single.type)]))
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    listed = pa.LargeListArray.from_arrays(
        pa.array(offsets), codes.slice(len(single)).to_arrow(), mask=lists.is_null()
    )
    return codes.slice(0, len(single)).alias("addr"), pl.Series("addrs", listed), addr_names


def _action_codes(action: pa.ChunkedArray) -> pl.Series:
    """The _ACTION_CODE of each event's action (missing: "unknown"; any other action: -1), looked up once per
    distinct action."""
    encoded = pc.dictionary_encode(action.combine_chunks())
    distinct = pl.Series(encoded.dictionary).cast(pl.String)
    table = distinct.replace_strict(_ACTION_CODE, default=-1, return_dtype=pl.Int8).to_numpy()
    table = np.append(table, np.int8(_ACTION_CODE["unknown"]))  # (the code of a missing action, last)
    at = encoded.indices.fill_null(len(distinct)).to_numpy(zero_copy_only=False)
    return pl.Series("_act", table[at])


def _plain_columns(events: pa.Table) -> pl.DataFrame:
    """The few other columns the replay compares, and which identity columns (vm_name, project, ...) the event
    names (_has; their texts are read at the end, _output_tables), in the events' order."""
    # (a column with no value at all, as port ids and kinds in Nova's instance events, is made null in polars:
    # converting a million nulls of Arrow text costs as much as text)
    columns = ["ts", "action", "state", "addr_kind", "port_id", "resource_id"]
    narrow = [
        pl.repeat(None, events.num_rows, dtype=pl.String, eager=True).alias(n)
        if events.column(n).null_count == events.num_rows and n != "ts"
        else _polars_text(events.column(n)).alias(n)
        for n in columns
    ]
    # (bit i: the event names _IDENTITY[i]; one small integer gathered and read instead of five booleans)
    present = np.zeros(events.num_rows, np.uint8)
    for bit, name in enumerate(_IDENTITY):
        present |= pc.is_valid(events.column(name)).to_numpy(zero_copy_only=False).astype(np.uint8) << bit
    present = [pl.Series("_has", present)]
    return pl.DataFrame([*narrow, *present])


def _ordered_events(
    events: pa.Table, pool: ThreadPoolExecutor
) -> tuple[pl.DataFrame, dict[str, pl.Series], pl.Series]:
    """What the replay reads of the events, in the replay order: ts as µs, codes for VM ids, hypervisors and
    addresses (with their texts), the few other columns it compares, the _has bits (_plain_columns), _phase ->
    (that frame, texts per code column, the events' row positions in that order).
    The encodings and conversions do not depend on the order: the largest run in `pool` (Arrow releases the
    GIL) while this thread works out the order (_replay_order) and the others."""
    vm_id = pool.submit(_encode, events.column("vm_id"))
    addrs = pool.submit(_encode_addrs, events)
    action = pool.submit(_action_codes, events.column("action"))
    rows, phases = _replay_order(events)
    plain_columns = _plain_columns(events)
    hyp_codes, hyp_names = _encode(events.column("hypervisor"))
    (vm_codes, vm_names), (addr_codes, listed, addr_names) = vm_id.result(), addrs.result()
    unordered = pl.DataFrame(
        [
            *plain_columns.drop("_has"),
            vm_codes.alias("vm_id"),
            hyp_codes.alias("hypervisor"),
            addr_codes,
            listed,
            plain_columns.get_column("_has"),
            action.result(),
        ]
    )
    frame = _in_order(unordered, rows).rechunk()  # (see _replay_order's head)
    frame, vm_names = _dense_vm_codes(frame, vm_names)
    frame = frame.with_columns(phases, pl.col("ts").dt.epoch("us"))
    return frame, {"vm_id": vm_names, "hypervisor": hyp_names, "addr": addr_names}, rows


def _dense_vm_codes(frame: pl.DataFrame, names: pl.Series) -> tuple[pl.DataFrame, pl.Series]:
    """The replay takes VM codes as positions among the VMs (_vm_events): dense from 0. _encode gives them so
    over all events; a VM whose every event was left out as a duplicate (_replay_order) leaves a gap, which is
    closed here (codes renumbered in the same order, its name dropped). A gap made every later build fail
    with an out-of-bounds gather (hostile review, session 26)."""
    codes = frame.get_column("vm_id")
    present = np.bincount(codes.drop_nulls().to_numpy(), minlength=len(names)) > 0
    if present.all():
        return frame, names
    renumber = pl.Series(np.cumsum(present) - 1)
    dense = renumber.gather(codes.fill_null(0)).set(codes.is_null(), None)  # type: ignore[arg-type]
    return frame.with_columns(dense.cast(codes.dtype).alias("vm_id")), names.filter(pl.Series(present))


# Every step below is a polars expression over all events at once (window functions over vm_id, addr or floating
# IP key); nothing loops per event. `seq` is an event's position in the replay order: within one instant it
# decides what happened first, exactly as replaying the events one by one in that order would.

_LEASE_KEY = ["addr", "valid_from", "vm_id"]


def _ffill_within(value: pl.Expr, key: str = "vm_id") -> pl.Expr:
    """Forward fill of `value` over a frame sorted by `key`, not crossing from one key to the next."""
    source = pl.when(value.is_not_null()).then(pl.col(key)).forward_fill()
    return pl.when(source == pl.col(key)).then(value.forward_fill())


def _reduce(
    ev: pl.DataFrame, starts: np.ndarray, column: str | pl.Expr, where: pl.Expr | None, how: str
) -> pl.Series:
    """One value per VM: the min or max of an integer column over its events where `where` holds (null when
    it holds nowhere), for a frame sorted by VM whose VMs start at `starts`. numpy's reduceat over the VMs'
    slices: a group-by of 250 k groups, or a polars when/then per value, costs several times more."""
    if how == "min":
        ufunc, sentinel = np.minimum, np.iinfo(np.int64).max
    else:
        ufunc, sentinel = np.maximum, np.iinfo(np.int64).min
    if not len(starts):
        return pl.Series(dtype=pl.Int64)
    if isinstance(column, pl.Expr):
        value = column
    elif column == "_row":
        value = pl.int_range(pl.len(), dtype=pl.Int64)
    else:
        value = pl.col(column)
    # (a null, e.g. a time a planted file left out, counts as none); the mask applied in polars: a boolean
    # column to numpy costs more than the whole when/then
    value = value.cast(pl.Int64).fill_null(sentinel)
    if where is not None:
        value = pl.when(where.fill_null(False)).then(value).otherwise(pl.lit(sentinel, pl.Int64))
    values = ev.select(value).to_series().to_numpy()
    out = pl.Series(ufunc.reduceat(values, starts))
    return out.set(out == sentinel, None)  # type: ignore[arg-type]


def _reduce_np(values: np.ndarray, where: np.ndarray | None, starts: np.ndarray, how: str) -> pl.Series:
    """_reduce on numpy arrays: `values` with nulls already the sentinel of `how` (int64 max for min, min
    for max), `where` a boolean mask or None."""
    ufunc, sentinel = (
        (np.minimum, np.iinfo(np.int64).max) if how == "min" else (np.maximum, np.iinfo(np.int64).min)
    )
    if not len(starts):
        return pl.Series(dtype=pl.Int64)
    if where is not None:
        values = np.where(where, values, sentinel)
    out = pl.Series(ufunc.reduceat(values, starts))
    return out.set(out == sentinel, None)  # type: ignore[arg-type]


_OWN = 1 << 40  # more than any seq
_NEVER = np.iinfo(np.int64).max  # gone_seq (_deletes) of a VM not deleted


def _per_vm(ev: pl.DataFrame, starts: np.ndarray, where: pl.Expr, how: str, name: str) -> pl.Series:
    """_reduce of seq, repeated on each of the VM's events."""
    return _reduce(ev, starts, "seq", where, how).gather(ev.get_column("_vm")).alias(name)


def _in_vm_order(frame: pl.DataFrame) -> pl.DataFrame:
    """The rows of a frame in seq order (seq = row number) whose vm_id is not null, sorted by (vm_id, seq).
    Both are small non-negative integers: packed into one Int64, whose sorted values carry the row numbers in
    their low bits (a sort of one column, then one gather, instead of a stable sort of every column)."""
    bits = max(frame.height, 1).bit_length()
    top = frame.get_column("vm_id").max()
    if top is None or int(top).bit_length() + bits > 62:  # (only ~2^31 events or more)
        return frame.filter(pl.col("vm_id").is_not_null()).sort("vm_id", maintain_order=True)
    packed = frame.select((pl.col("vm_id").cast(pl.Int64) * (1 << bits) + pl.col("seq")).drop_nulls().sort())
    packed = packed.to_series()
    seq = packed % (1 << bits)  # (vm_id and seq are the key's own bits: not gathered)
    ordered = frame.drop("vm_id", "seq").gather(seq)
    return ordered.with_columns(
        (packed // (1 << bits)).cast(frame.schema["vm_id"]).alias("vm_id"), seq.alias("seq")
    )


def _vm_events(
    frame: pl.DataFrame, context: Future[tuple[np.ndarray, np.ndarray]]
) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """Per-event VM context: the events with a VM, sorted by (vm_id, seq), with their action flags, the seq of
    the VM's delete (gone_seq) and whether each moves the VM's state (applicable); and where each VM's events
    start and end in that order. Only fast aggregations and fills over the whole frame (per-group expressions
    are evaluated group by group). The VM's story is told on integers and flags: a text column (names, state)
    is read from `frame` (whose row number is seq) only at the few rows that decide a VM's fact. `context`:
    gone_seq and applicable per event in seq order (_deletes, worked out meanwhile by the caller)."""
    base = frame.select(
        "vm_id",
        "seq",
        "ts",
        "passive",
        "hypervisor",  # a code (_encode)
        "_act",
        (pl.col("state").is_not_null() & (pl.col("state") != "unknown")).alias("_state"),
        "_has",
    )
    # the events by VM, each VM's in seq order: gathered once, on the few narrow columns above (the flags
    # below are then worked out on the gathered integers)
    ev = _in_vm_order(base)
    ev = ev.with_columns(_action_flags(ev.get_column("_act"))).with_columns(pl.col("_own").not_())
    # VM codes are dense from 0 and sorted (_encode): _vm is the VM's position among the VMs. (One chunk per
    # column: every step below then reads contiguous memory, and to numpy without a copy.)
    ev = ev.with_columns(pl.col("vm_id").alias("_vm")).rechunk()
    vms = ev.get_column("_vm").to_numpy()
    starts = np.flatnonzero(np.r_[True, vms[1:] != vms[:-1]]) if len(vms) else np.zeros(0, np.int64)
    ends = np.append(starts[1:], len(vms)) - 1 if len(starts) else starts
    seq = ev.get_column("seq").to_numpy()
    gone_seq, applicable = context.result()
    gone = pl.Series("gone_seq", gone_seq[seq])
    gone = gone.set(gone == _NEVER, None)  # type: ignore[arg-type]
    ev = ev.with_columns(gone, pl.Series("applicable", applicable[seq]))
    return ev, starts, ends


def _vm_hypervisors(ev: pl.DataFrame, starts: np.ndarray) -> tuple[pl.Series, pl.DataFrame]:
    """The VM's hypervisor after each of its events (hyp_now, in _vm_events' order), and the hypervisor moves
    (live migration, unshelve elsewhere) that split leases."""
    # hypervisor: an applicable event naming one sets it (a change = a move); start/error events and Neutron
    # port bindings only fill it in while none is known (so only the VM's first such value counts)
    known = pl.col("hypervisor").is_not_null()
    strong = pl.col("applicable") & ~pl.col("_port_update") & known
    weak = known & (
        (pl.col("passive") & ~pl.col("_floating") & ~pl.col("_port_update"))
        | (pl.col("applicable") & pl.col("_port_update"))
    )
    new_vm = pl.col("_vm") != pl.col("_vm").shift(1).fill_null(-1)
    ev = ev.select(
        "_vm",
        "seq",
        "ts",
        "vm_id",
        pl.when(strong).then(pl.col("hypervisor")).alias("_strong"),
        pl.when(weak).then(pl.col("hypervisor")).alias("_weak"),
    )
    # the VM's first weak row (the least row position: a VM's rows are in seq order), its seq and value
    first_weak = _reduce(ev, starts, "_row", pl.col("_weak").is_not_null(), "min")
    ev = ev.with_columns(
        ev.get_column(c).gather(first_weak).gather(ev.get_column("_vm")).alias(name)
        for c, name in (("seq", "_weak_seq"), ("_weak", "_weak_first_value"))
    )
    # eager steps: the lazy engine returned every column of ev in many chunks, and rechunking them all cost
    # more than these columns
    ev = ev.with_columns(
        _ffill_within(pl.col("_strong"), "_vm").alias("_strong_last"),
        pl.when(pl.col("seq") >= pl.col("_weak_seq")).then(pl.col("_weak_first_value")).alias("_weak_now"),
    )
    ev = ev.with_columns(pl.coalesce("_strong_last", "_weak_now").alias("hyp_now"))
    ev = ev.with_columns(pl.when(~new_vm).then(pl.col("hyp_now").shift(1)).alias("_hyp_before")).rechunk()
    moves = (
        ev.select("vm_id", "seq", "ts", "_strong", "_hyp_before")
        .filter(
            pl.col("_strong").is_not_null()
            & pl.col("_hyp_before").is_not_null()
            & (pl.col("_strong") != pl.col("_hyp_before"))
        )
        .select(
            "vm_id",
            pl.col("seq").alias("move_seq"),
            pl.col("ts").alias("move_ts"),
            pl.col("_strong").alias("hyp"),
        )
    )
    return ev.get_column("hyp_now"), moves


def _vm_facts(
    frame: pl.DataFrame, ev: pl.DataFrame, starts: np.ndarray, ends: np.ndarray, reclaim_us: int | None
) -> pl.DataFrame:
    """The VMs' final facts but the hypervisor (_vm_hypervisors), from _vm_events: sorted by vm_id; the identity
    columns (_at_vm_name, ...) are the seq of the event that decides each (null: none names it)."""
    alive = pl.col("gone_seq").is_null() | (pl.col("seq") < pl.col("gone_seq"))
    gone_row = pl.col("seq") == pl.col("gone_seq")
    # the rows that set the VM's status (its value is worked out at the VM's last such row, below)
    has_status = gone_row.fill_null(False) | (
        pl.col("applicable")
        & (pl.col("_soft_delete") | pl.col("_restore") | pl.col("_state") | pl.col("_default"))
    )
    ev = ev.with_columns(has_status.alias("_has_status"))
    # soft delete and restore: the quarantine runs from the first soft delete after the last restore
    restore = pl.col("applicable") & pl.col("_restore")
    ev = ev.with_columns(_per_vm(ev, starts, restore, "max", "_last_restore"))
    soft = (
        pl.col("applicable")
        & pl.col("_soft_delete")
        & (pl.col("_last_restore").is_null() | (pl.col("seq") > pl.col("_last_restore")))
    )
    # "the latest non-null value" = the value at the last row where it is not null: a max of seq, then a
    # gather from `frame`; the VM's own events first (a max of seq + _OWN on those, one pass for both).
    # The masks in one select, every reduction in numpy on them (a polars select per value costs 10x more)
    masks = ev.select(
        [pl.col(c).fill_null(False) for c in ("_own", "_has_status", "_create")]
        + [
            gone_row.fill_null(False).alias("_gone_row"),
            (pl.col("_purge_act") & ~pl.col("passive") & ~alive).fill_null(False).alias("_purged"),
            soft.fill_null(False).alias("_soft"),
        ]
    )
    mask = {c: masks.get_column(c).to_numpy() for c in masks.columns}
    has = ev.get_column("_has").to_numpy()
    mask |= {f"_has_{n}": (has & (1 << bit)) != 0 for bit, n in enumerate(_IDENTITY)}
    seq = ev.get_column("seq").to_numpy()
    ts = ev.get_column("ts")
    ts_low = ts.fill_null(np.iinfo(np.int64).max).to_numpy()  # (a null time counts as none)
    ts_high = ts.fill_null(np.iinfo(np.int64).min).to_numpy()
    own_first = seq + np.where(mask["_own"], _OWN, 0)
    firsts = pl.Series(starts)
    # (events that name one identity column mostly name them all: a reduction per distinct mask)
    identity: dict[str, pl.Series] = {}
    for n in _IDENTITY:
        same = next((o for o in identity if np.array_equal(mask[f"_has_{o}"], mask[f"_has_{n}"])), None)
        identity[n] = (
            identity[same] if same else _reduce_np(own_first, mask[f"_has_{n}"], starts, "max")
        ).alias(f"_at_{n}")
    facts = pl.DataFrame(
        [
            ev.get_column("vm_id").gather(firsts),
            *identity.values(),
            _reduce_np(seq, mask["_has_status"], starts, "max").alias("_status"),
            ev.get_column("gone_seq").gather(firsts),
            _reduce_np(ts_high, mask["_gone_row"], starts, "max").alias("gone_ts"),
            _reduce_np(ts_low, mask["_purged"], starts, "min").alias("purge_ts"),
            _reduce_np(ts_low, mask["_soft"], starts, "min").alias("soft_deleted_at"),
            _reduce_np(ts_low, mask["_create"], starts, "min").alias("created"),
            # (the replay order is the time order, a missing time last: a VM's first event is its earliest, and
            # its last its latest unless a time is missing)
            ts.gather(firsts).alias("first_event_at"),
            ts.gather(pl.Series(ends)).alias("last_event_at")
            if not ts.null_count()
            else _reduce_np(ts_high, None, starts, "max").alias("last_event_at"),
        ]
    )
    # the identity columns stay positions (seq) of the deciding events: build_leases reads their texts once,
    # in Arrow, into the output tables (text in polars frames would be joined, sorted and cast again)
    facts = facts.with_columns(pl.col(f"_at_{n}") % _OWN for n in _IDENTITY)
    # the status set by the VM's last row that sets one
    at = facts.get_column("_status")
    deciding = frame.select(pl.col("act").gather(at).fill_null("unknown"), pl.col("state").gather(at))
    deciding = deciding.with_columns((at == facts.get_column("gone_seq")).fill_null(False).alias("_gone"))
    status = (
        pl.when(pl.col("_gone"))
        .then(pl.when(pl.col("act") == "purge").then(pl.lit("purged")).otherwise(pl.lit("deleted")))
        .when(pl.col("act") == "soft_delete")
        .then(pl.lit("soft_deleted"))
        .when(pl.col("act") == "restore")
        .then(pl.coalesce("state", pl.lit("active")))
        .when(pl.col("state").is_not_null() & (pl.col("state") != "unknown"))
        .then(pl.col("state"))
        .otherwise(pl.col("act").replace_strict(_DEFAULT_STATUS, default=None, return_dtype=pl.String))
    )
    facts = facts.with_columns(
        deciding.select(status).to_series().alias("status"),
        # (null: not gone; a delete's action is never missing)
        frame.get_column("act").gather(facts.get_column("gone_seq")).alias("gone_act"),
    )
    facts = facts.drop("_status")
    reclaim = pl.lit(reclaim_us, pl.Int64)
    soft_end = pl.col("soft_deleted_at") + reclaim
    facts = facts.with_columns(
        pl.when(pl.col("gone_act").is_null())
        .then(pl.col("status"))
        .when((pl.col("gone_act") == "purge") | pl.col("purge_ts").is_not_null())
        .then(pl.lit("purged"))
        .otherwise(pl.lit("deleted"))
        .alias("status"),
        pl.col("gone_ts").alias("deleted_at"),
        pl.when(reclaim.is_null() | (pl.col("gone_act") == "force_delete"))
        .then(None)
        .when(pl.col("gone_act").is_in(["delete"]))
        .then(
            pl.when(pl.col("soft_deleted_at").is_not_null())
            .then(pl.min_horizontal(soft_end, pl.col("gone_ts")))
            .otherwise(pl.col("gone_ts") + reclaim)
        )
        .otherwise(soft_end)  # not deleted (or purged at once): only a soft delete starts a quarantine
        .alias("quarantine_until"),
        pl.coalesce("created", "first_event_at").alias("created_at"),
    )
    return facts


def _vm_side(
    frame: pl.DataFrame, context: Future[tuple[np.ndarray, np.ndarray]], reclaim_us: int | None
) -> tuple[pl.DataFrame, pl.Series, pl.Series, pl.DataFrame, pl.DataFrame]:
    """The events by VM (vm_id, seq) with the VM's hypervisor after each (hyp_now; the same by seq), the VMs'
    facts, and the hypervisor moves (_vm_events, _vm_hypervisors, _vm_facts)."""
    ev, starts, ends = _vm_events(frame, context)
    hyp_now, moves = _vm_hypervisors(ev, starts)
    facts = _vm_facts(frame, ev, starts, ends, reclaim_us)
    facts = facts.with_columns(hyp_now.gather(pl.Series(ends)).alias("hypervisor"))
    hyp_by_seq = pl.repeat(None, frame.height, dtype=_CODE, eager=True).scatter(ev.get_column("seq"), hyp_now)
    return ev.select("vm_id", "seq"), hyp_now, hyp_by_seq, facts, moves


def _deletes(frame: pl.DataFrame, vms: int) -> tuple[np.ndarray, np.ndarray, pl.DataFrame]:
    """The VM context the claims and releases need, read in seq order (frame's row number): per event, the
    seq of its VM's first delete (gone_seq; _NEVER: none) and whether it moves its VM's state (applicable:
    an .end or phase-less event of a VM not deleted yet, other than a floating-IP event, a delete or a detach,
    handled on their own); and the VMs' deletes, each (vm_id, seq, ts, act), by VM: a VM's first delete, then
    every later purge of it (by seq)."""
    seq = np.arange(frame.height)
    vm = frame.get_column("vm_id").fill_null(-1).to_numpy()
    passive = frame.get_column("passive").to_numpy()
    bits = _action_bits(frame.get_column("_act"))
    delete = _action_flag(bits, "_delete") & ~passive & ~_action_flag(bits, "_floating") & (vm >= 0)
    # the VM's first delete: the least seq of its deletes (as a VM code is its position among the VMs)
    gone = np.full(vms + 1, _NEVER)  # (+1: the events of no VM, at -1, are never gone)
    np.minimum.at(gone, vm[delete], seq[delete])
    gone_seq = gone[vm]
    applicable = (
        ~passive
        & ~_action_flag(bits, "_floating")
        & ~_action_flag(bits, "_delete_or_detach")
        & (seq < gone_seq)
        & (vm >= 0)
    )
    purged = _action_flag(bits, "_purge_act") & ~passive & (vm >= 0) & (seq > gone_seq) & (gone_seq != _NEVER)
    purged_at = np.flatnonzero(purged)
    purged_at = purged_at[np.lexsort((purged_at, vm[purged_at]))]
    gone_vms = np.flatnonzero(gone[:vms] != _NEVER)
    gone_at = pl.Series(gone[gone_vms])
    deletes = pl.concat(
        [
            pl.DataFrame(
                [
                    pl.Series("vm_id", gone_vms, dtype=_CODE),
                    gone_at.alias("seq"),
                    frame.get_column("ts").gather(gone_at),
                    frame.get_column("act").gather(gone_at),
                ]
            ),
            frame.select("vm_id", "seq", "ts", pl.lit("purge").alias("act")).gather(pl.Series(purged_at)),
        ]
    ).rechunk()
    return gone_seq, applicable, deletes


def _few(frame: pl.DataFrame, where: pl.Expr) -> pl.DataFrame:
    """frame.filter(where) for a condition few rows meet: the mask is worked out alone, then only those rows
    are gathered (a filter walks every column of every event)."""
    return frame.gather(frame.select(where.fill_null(False)).to_series().arg_true())


def _port_maps(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Ports: (port_id, ts, vm_id) of every non-floating event naming both, and what the events list with a
    port: (port_id, vm_id, seq, addr), the event's VM (null: none) and place in the replay order."""
    named = _few(
        frame.select("port_id", "act", "ts", "vm_id", "addrs", "seq"), pl.col("port_id").is_not_null()
    )
    named = named.filter(~pl.col("act").fill_null("").str.starts_with("fip_"))  # (on the few naming a port)
    history = (
        named.filter(pl.col("vm_id").is_not_null())
        .select("port_id", "ts", "vm_id")
        .sort("port_id", "ts", "vm_id")
    )
    listed = named.select("port_id", "vm_id", "seq", pl.col("addrs").alias("addr")).explode("addr")
    return history, listed.drop_nulls("addr")


def _port_vm(rows: pl.DataFrame, history: pl.DataFrame) -> pl.DataFrame:
    """rows (with _row, port_id, ts) + column port_vm: the VM bound to the port at ts (before its first
    binding: the first VM it was bound to)."""
    if history.height == 0:
        return rows.with_columns(pl.lit(None, _CODE).alias("port_vm"))
    keyed = rows.filter(pl.col("port_id").is_not_null()).select("_row", "port_id", "ts").sort("ts")
    at = keyed.join_asof(
        history.sort("ts"), on="ts", by="port_id", strategy="backward", check_sortedness=False
    ).select("_row", pl.col("vm_id").alias("_at"))
    first = history.group_by("port_id").agg(pl.col("vm_id").first().alias("_first"))
    return (
        rows.join(at, on="_row", how="left")
        .join(first, on="port_id", how="left")
        .with_columns(pl.coalesce("_at", "_first").alias("port_vm"))
        .drop("_at", "_first")
    )


# why a lease ended, and an address's kind (fixed, floating, or what an event calls it), as polars Enums:
# _resolve's sort and fills then move small integers, not text
_REASON = pl.Enum(
    sorted(
        {"superseded", "fip_reassociate", "detach", "migrate", "fip_disassociate", "fip_delete", *_DELETES}
    )
)


def _claim_schema(kind: pl.Enum) -> dict[str, Any]:
    return {"addr": _CODE, "seq": pl.Int64, "ts": pl.Int64, "vm_id": _CODE, "kind": kind, "reason": _REASON}


def _release_schema(kind: pl.Enum) -> dict[str, Any]:
    return {
        "addr": _CODE,
        "seq": pl.Int64,
        "ts": pl.Int64,
        "need_vm": _CODE,
        "need_kind": kind,
        "reason": _REASON,
    }


def _frame(rows: list[pl.DataFrame], schema: dict[str, Any]) -> pl.DataFrame:
    return pl.concat(
        [r.select([pl.col(k).cast(v) for k, v in schema.items()]) for r in rows]
        or [pl.DataFrame(schema=schema)]
    ).rechunk()  # (polars' eager operations rechunk a frame in chunks on every call: once here)


def _resolve(claims: pl.DataFrame, releases: pl.DataFrame) -> pl.DataFrame:
    """Per address, claims (a VM takes the address) and releases (a VM, or anyone, gives it up) in replay
    order -> leases (addr, vm_id, kind, valid_from/_to as µs, start_seq, end_seq, end_reason).

    A segment runs from one claim to the next. A release ends the holder's lease when it names the segment's
    VM (or anyone) and kind; later releases in the segment find the address free. A claim opens a lease unless
    the same VM still holds the address (then it is a repeat); a claim by another VM ends the holder's lease
    (`reason` of that claim: superseded, fip_reassociate). One sort, then shifts and forward fills over the
    whole frame (no per-group expressions: those are evaluated group by group)."""
    rows = pl.concat(
        [
            claims.select(
                "addr",
                "seq",
                pl.lit(1, pl.Int8).alias("sub"),
                "ts",
                "vm_id",
                "kind",
                "reason",
                pl.lit(None, _CODE).alias("need_vm"),
                pl.lit(None, releases.schema["need_kind"]).alias("need_kind"),
            ),
            releases.select(
                "addr",
                "seq",
                pl.lit(0, pl.Int8).alias("sub"),
                "ts",
                pl.lit(None, _CODE).alias("vm_id"),
                pl.lit(None, claims.schema["kind"]).alias("kind"),
                "reason",
                "need_vm",
                "need_kind",
            ),
        ]
    ).rechunk()
    rows = rows.sort(_packed_order(rows)) if rows.height else rows
    claim = pl.col("sub") == 1
    rows = rows.with_columns(
        claim.cast(pl.Int64).cum_sum().alias("seg"),
        pl.when(claim).then(pl.col("addr")).forward_fill().alias("seg_addr"),
        pl.when(claim).then(pl.col("vm_id")).forward_fill().alias("seg_vm"),
        pl.when(claim).then(pl.col("kind")).forward_fill().alias("seg_kind"),
    ).filter(pl.col("seg_addr") == pl.col("addr"))  # releases before an address's first claim: nothing held
    effective = (
        ~claim
        & (pl.col("need_vm").is_null() | (pl.col("need_vm") == pl.col("seg_vm")))
        & (pl.col("need_kind").is_null() | (pl.col("need_kind") == pl.col("seg_kind")))
    )
    # rows are in seg order (seg counts the claims so far): the first effective release of a segment is the
    # one whose seg differs from the previous effective release's (no hashing of seg)
    first_release = (
        rows.filter(effective)
        .filter(pl.col("seg") != pl.col("seg").shift(1).fill_null(0))
        .select(
            "seg",
            pl.col("seq").alias("rel_seq"),
            pl.col("ts").alias("rel_ts"),
            pl.col("reason").alias("rel_reason"),
        )
    )
    segments = rows.filter(claim).select(
        "seg",
        "addr",
        "vm_id",
        "kind",
        pl.col("seq").alias("start_seq"),
        pl.col("ts").alias("start_ts"),
        pl.col("reason").alias("claim_reason"),
    )
    # the claims' segs increase: a segment's release goes to its claim's row, found by a binary search (a
    # scatter, not a join and a sort)
    at = segments.get_column("seg").search_sorted(first_release.get_column("seg"))
    segments = segments.with_columns(
        pl.repeat(None, segments.height, dtype=first_release.schema[name], eager=True)
        .scatter(at, first_release.get_column(name))
        .alias(name)
        if first_release.height
        else pl.lit(None, first_release.schema[name]).alias(name)
        for name in ("rel_seq", "rel_ts", "rel_reason")
    ).rechunk()
    same_addr = pl.col("addr") == pl.col("addr").shift(1)
    next_same = pl.col("addr") == pl.col("addr").shift(-1)
    segments = segments.with_columns(
        (
            ~same_addr.fill_null(False)
            | (pl.col("vm_id") != pl.col("vm_id").shift(1))
            | pl.col("rel_seq").shift(1).is_not_null()
        )
        .cast(pl.Int64)
        .cum_sum()
        .alias("lease"),
        pl.when(next_same).then(pl.col("start_seq").shift(-1)).alias("next_seq"),
        pl.when(next_same).then(pl.col("start_ts").shift(-1)).alias("next_ts"),
        pl.when(next_same).then(pl.col("claim_reason").shift(-1)).alias("next_reason"),
    ).rechunk()  # (a shift returns two chunks)
    opening = segments.filter(pl.col("lease") != pl.col("lease").shift(1).fill_null(-1))
    closing = segments.filter(pl.col("lease") != pl.col("lease").shift(-1).fill_null(-1))
    released = pl.col("rel_seq").is_not_null()
    return pl.concat(
        [
            opening.select("addr", "vm_id", "kind", "start_seq", pl.col("start_ts").alias("valid_from")),
            closing.select(
                pl.when(released).then(pl.col("rel_seq")).otherwise(pl.col("next_seq")).alias("end_seq"),
                pl.when(released).then(pl.col("rel_ts")).otherwise(pl.col("next_ts")).alias("valid_to"),
                pl.when(released)
                .then(pl.col("rel_reason"))
                .otherwise(pl.col("next_reason"))
                .alias("end_reason"),
            ),
        ],
        how="horizontal",
    ).rechunk()


def _packed_order(rows: pl.DataFrame) -> pl.Expr | list[str]:
    """The sort key (addr, seq, sub) of _resolve's rows (codes and positions: none null or negative) packed into
    one integer when their widths allow: a sort on one Int64 costs a fraction of a sort on three columns."""
    low, high, nulls = rows.select(
        pl.min_horizontal(pl.col("addr").min(), pl.col("seq").min()),
        pl.max_horizontal(pl.col("addr").max(), pl.col("seq").max()).alias("high"),
        (pl.col("addr").null_count() + pl.col("seq").null_count()).alias("nulls"),
    ).row(0)
    bits = int(high or 0).bit_length()
    if nulls or low is None or low < 0 or 2 * bits + 1 > 62:
        return ["addr", "seq", "sub"]
    return (
        pl.col("addr").cast(pl.Int64) * (1 << (bits + 1))
        + pl.col("seq").cast(pl.Int64) * 2
        + pl.col("sub").cast(pl.Int64)
    )


def _held(claims: pl.DataFrame) -> pl.DataFrame:
    """The distinct (vm_id, addr) pairs of claims (null VMs left out: they join nothing), sorted. Both are codes:
    one integer key per pair de-duplicates ten times faster than a unique on two columns."""
    pairs = claims.select("vm_id", "addr").drop_nulls()
    if pairs.height == 0:
        return pairs
    width = int(pairs.get_column("addr").max()) + 1  # type: ignore[arg-type]
    keys = pairs.select(pl.col("vm_id") * width + pl.col("addr")).to_series().unique().sort()
    # (sorted keys: by VM, then address)
    return pl.DataFrame([(keys // width).alias("vm_id"), (keys % width).alias("addr")])


def _holder_at(leases: pl.DataFrame, rows: pl.DataFrame, addr: str) -> pl.DataFrame:
    """rows (_row, seq, <addr>) + column holder: the VM holding the address when event `seq` was replayed
    (a lease opened by an earlier event and not ended by an event before this one)."""
    if rows.height == 0:
        return rows.with_columns(pl.lit(None, leases.schema["vm_id"]).alias("holder"))
    keyed = (
        rows.filter(pl.col(addr).is_not_null()).select("_row", "seq", pl.col(addr).alias("addr")).sort("seq")
    )
    found = keyed.join_asof(
        leases.select("addr", pl.col("start_seq").alias("seq"), "vm_id", "end_seq").sort("seq"),
        on="seq",
        by="addr",
        strategy="backward",
        allow_exact_matches=False,
        check_sortedness=False,
    ).filter(pl.col("end_seq").is_null() | (pl.col("seq") <= pl.col("end_seq")))
    return rows.join(found.select("_row", pl.col("vm_id").alias("holder")), on="_row", how="left")


def _replay(
    frame: pl.DataFrame,
    reclaim_us: int | None,
    names: dict[str, pl.Series],
    pool: ThreadPoolExecutor,
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, pl.Series]]:
    """Sorted, de-duplicated events (_ordered_events) -> (leases with µs times, VM facts, the texts of their
    codes: vm_id, hypervisor, addr; in the texts' order)."""
    vm_names, addr_names = names["vm_id"], names["addr"]
    frame = frame.with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("seq"),
        (pl.col("_phase") < 2).alias("passive"),
        # (a missing action is "unknown": filled where `act` is read, on the few rows read, not on every event;
        # its code `_act` is _ordered_events')
        pl.col("action").alias("act"),
    )
    # the events by VM (their hypervisors, the VMs' facts) are not needed before the leases are resolved: worked
    # out in `pool` meanwhile (polars and numpy release the GIL); what the claims need is read in seq order
    # (_vm_side sorts the events by VM, then waits for `context`: gone_seq and applicable, from _deletes)
    context: Future[tuple[np.ndarray, np.ndarray]] = Future()
    vm_side = pool.submit(_vm_side, frame, context, reclaim_us)
    try:
        gone_seq, applicable_events, deletes = _deletes(frame, len(vm_names))
    except BaseException as error:  # (else the pool's task would wait for it for ever)
        context.set_exception(error)
        raise
    context.set_result((gone_seq, applicable_events))
    applicable = pl.Series("seq", np.flatnonzero(applicable_events), dtype=pl.Int64)
    port_history, port_listed = _port_maps(frame)

    # claims by VMs: every address an applicable event lists, and the one an attach names
    listed = (
        frame.select("seq", "ts", "vm_id", pl.col("addr_kind").alias("kind"), "addrs", "addr", "act")
        .gather(applicable)  # frame's row number is seq
        .with_columns(pl.col("kind").fill_null("fixed"))
    )
    fixed_claims = pl.concat(
        [
            listed.explode("addrs")
            .filter(pl.col("addrs").is_not_null())
            .with_columns(pl.col("addrs").alias("addr"))
            .drop("addrs"),
            listed.filter((pl.col("act") == "attach") & pl.col("addr").is_not_null()).drop("addrs"),
        ],
        how="diagonal_relaxed",
    ).with_columns(pl.lit("superseded").alias("reason"))
    # (the kinds events name, and the two the replay does)
    kind = pl.Enum(
        sorted({"fixed", "floating", *frame.get_column("addr_kind").drop_nulls().unique().to_list()})
    )
    fixed_claims = _frame([fixed_claims], _claim_schema(kind))

    # detaches: the address named; else what the VM held that Nova's full list no longer has (fixed only);
    # else the port's addresses (Neutron port.delete / unbind), for the VM bound to the port then: those its
    # events (or events naming no VM, the detach itself among them) listed with the port up to the detach. A later event on the port (bound
    # to another VM, or again) changes nothing the detach did: an incremental update need not replay it
    detaches = _few(frame, _act_in("detach") & ~pl.col("passive")).with_row_index("_row")
    detaches = _port_vm(detaches, port_history).with_columns(pl.coalesce("vm_id", "port_vm").alias("need_vm"))

    def detach_releases(claimed: pl.DataFrame) -> pl.DataFrame:
        named = detaches.filter(pl.col("addr").is_not_null()).select(
            "addr", "seq", "ts", "need_vm", pl.lit(None, pl.String).alias("need_kind")
        )
        by_list = detaches.filter(
            pl.col("addr").is_null() & pl.col("addrs").is_not_null() & pl.col("vm_id").is_not_null()
        )
        held = _held(claimed) if by_list.height else claimed.select("vm_id", "addr").head(0)
        held = held.rename({"vm_id": "need_vm"})  # (every claim, looked at only when a detach needs it)
        by_list = (
            by_list.select("seq", "ts", "need_vm", "addrs")
            .join(held, on="need_vm")
            .filter(~pl.col("addr").is_in(pl.col("addrs")).fill_null(False))
            .select("addr", "seq", "ts", "need_vm", pl.lit("fixed").alias("need_kind"))
        )
        by_port = (
            detaches.filter(
                pl.col("addr").is_null() & (pl.col("addrs").is_null() | pl.col("vm_id").is_null())
            )
            .select("seq", "ts", "need_vm", "port_id")
            .join(port_listed.rename({"seq": "listed_seq", "vm_id": "listed_by"}), on="port_id")
            .filter(
                (pl.col("listed_seq") <= pl.col("seq"))
                & (
                    pl.col("listed_by").is_null()
                    | (pl.col("listed_by") == pl.col("need_vm")).fill_null(False)
                )
            )
            .select("addr", "seq", "ts", "need_vm", pl.lit(None, pl.String).alias("need_kind"))
            .unique()
        )
        return pl.concat([named, by_list, by_port], how="diagonal_relaxed").with_columns(
            pl.lit("detach").alias("reason")
        )

    # a VM's delete ends what it holds; so does every later purge (_deletes)
    def delete_releases(claimed: pl.DataFrame) -> pl.DataFrame:
        # (a join of each delete with its VM's pairs, found by binary search: the pairs are sorted by VM)
        held = _held(claimed)
        vms = held.get_column("vm_id").to_numpy()
        gone = deletes.get_column("vm_id").to_numpy()
        first, count = np.searchsorted(vms, gone), np.searchsorted(vms, gone, "right")
        count -= first
        of_delete = np.repeat(np.arange(len(gone)), count)
        pair = np.arange(len(of_delete)) - np.repeat(np.cumsum(count) - count - first, count)
        return pl.concat(
            [
                held.select("addr").gather(pl.Series(pair)),
                deletes.gather(pl.Series(of_delete)).select(
                    "seq",
                    "ts",
                    pl.col("vm_id").alias("need_vm"),
                    pl.lit(None, pl.String).alias("need_kind"),
                    pl.col("act").alias("reason"),
                ),
            ],
            how="horizontal",
        )

    base_releases = _frame(
        [detach_releases(fixed_claims), delete_releases(fixed_claims)], _release_schema(kind)
    )
    fixed_leases = _resolve(fixed_claims, base_releases)

    # floating IPs, keyed by their id (or address): an associate points the address at the VM owning the
    # port then, else the VM holding the fixed address then; disassociate and delete (id only) end it
    fips = _few(
        frame,
        _act_in(*_FLOATING_ACTIONS)
        & (~pl.col("passive") | _act_in("fip_delete"))
        & (pl.col("resource_id").is_not_null() | pl.col("addr").is_not_null()),
    )
    fips = (
        fips.with_columns(
            pl.coalesce("resource_id", addr_names.gather(fips.get_column("addr"))).alias("fip_key")
        )
        .with_columns(pl.col("addr").forward_fill().shift(1).over("fip_key").alias("previous"))
        .with_columns(pl.coalesce("addr", "previous").alias("address"))
        .with_row_index("_row")
    )
    associate = fips.filter(
        (pl.col("act") == "fip_associate") & pl.col("address").is_not_null()
    ).with_columns(pl.col("addrs").list.first().alias("fixed"))
    associate = _holder_at(fixed_leases, _port_vm(associate, port_history), "fixed")
    # no VM known: the port or fixed address stands for the holder (a VM id of its own, appended to the texts)
    unknown = associate.select(
        pl.when(pl.col("port_id").is_not_null())
        .then(pl.lit("port:") + pl.col("port_id"))
        .otherwise(pl.lit("fixed:") + addr_names.gather(associate.get_column("fixed")).fill_null("None"))
    ).to_series()
    extra = unknown.head(0)
    if associate.height:  # (a look-up among every VM id: only when floating IPs are associated)
        extra = unknown.unique(maintain_order=True).filter(
            ~unknown.unique(maintain_order=True).is_in(vm_names.implode())
        )
        named = pl.DataFrame(
            {"_name": vm_names, "_code": pl.int_range(len(vm_names), eager=True, dtype=_CODE)}
        )
        named = pl.concat(
            [
                named,
                pl.DataFrame(
                    {"_name": extra, "_code": pl.int_range(len(extra), eager=True, dtype=_CODE) + len(named)}
                ),
            ]
        )
        unknown = pl.DataFrame({"_name": unknown}).join(named, on="_name", how="left", maintain_order="left")
        unknown_code = unknown.get_column("_code")
    else:
        unknown_code = pl.Series(dtype=_CODE)
    vm_names = pl.concat([vm_names, extra])
    associate = associate.with_columns(
        pl.coalesce("vm_id", "port_vm", "holder", unknown_code).alias("fip_vm")
    )
    floating_claims = _frame(
        [
            associate.select(
                pl.col("address").alias("addr"),
                "seq",
                "ts",
                pl.col("fip_vm").alias("vm_id"),
                pl.lit("floating").alias("kind"),
                pl.lit("fip_reassociate").alias("reason"),
            )
        ],
        _claim_schema(kind),
    )
    moved_away = associate.filter(
        pl.col("previous").is_not_null() & (pl.col("previous") != pl.col("address"))
    ).select(
        pl.col("previous").alias("addr"),
        "seq",
        "ts",
        pl.lit(None, _CODE).alias("need_vm"),
        pl.lit(None, pl.String).alias("need_kind"),
        pl.lit("fip_reassociate").alias("reason"),
    )
    ended = fips.filter(pl.col("act") != "fip_associate")
    ended = (
        pl.concat(
            [
                ended.select("seq", "ts", "act", pl.col("previous").alias("addr")),
                ended.select("seq", "ts", "act", "addr"),
            ]
        )
        .drop_nulls("addr")
        .unique()
        .select(
            "addr",
            "seq",
            "ts",
            pl.lit(None, _CODE).alias("need_vm"),
            pl.lit("floating").alias("need_kind"),
            pl.col("act").alias("reason"),
        )
    )
    if floating_claims.height or moved_away.height or ended.height:
        claims = pl.concat([fixed_claims, floating_claims])
        releases = _frame(
            [detach_releases(claims), delete_releases(claims), moved_away, ended], _release_schema(kind)
        )
        leases = _resolve(claims, releases)
    else:  # no floating IP: the same claims and releases as the fixed leases' (half the replay, saved)
        leases = fixed_leases

    # the hypervisor then: at the lease's opening event; a move of the VM while it holds the lease splits it
    # (a lease opened by its VM's own event takes that event's value; a floating IP's, the VM's value then)
    ev, hyp_now, hyp_by_seq, facts, moves = vm_side.result()
    start = leases.get_column("start_seq")
    own_event = (frame.get_column("vm_id").gather(start) == leases.get_column("vm_id")).fill_null(False)
    leases = leases.with_row_index("_lease").with_columns(
        pl.when(own_event).then(hyp_by_seq.gather(start)).alias("hypervisor")
    )
    if not own_event.all():
        other = (
            leases.filter(~own_event)
            .drop("hypervisor")
            .with_columns(pl.col("start_seq").alias("seq"))
            .sort("seq")
            .join_asof(
                ev.select("vm_id", "seq", hyp_now.alias("hypervisor")).sort("seq"),
                on="seq",
                by="vm_id",
                strategy="backward",
                check_sortedness=False,
            )
            .drop("seq")
        )
        leases = pl.concat([leases.filter(own_event), other.select(leases.columns)])
    cuts = (
        leases.select("_lease", "vm_id", "start_seq", "end_seq")
        .join(moves, on="vm_id")
        .filter(
            (pl.col("move_seq") > pl.col("start_seq"))
            & (pl.col("end_seq").is_null() | (pl.col("move_seq") < pl.col("end_seq")))
        )
    )
    if cuts.height:
        pieces = pl.concat(
            [
                leases.select(
                    "_lease",
                    pl.col("start_seq").alias("piece_seq"),
                    pl.col("valid_from").alias("piece_ts"),
                    "hypervisor",
                ),
                cuts.select(
                    "_lease",
                    pl.col("move_seq").alias("piece_seq"),
                    pl.col("move_ts").alias("piece_ts"),
                    pl.col("hyp").alias("hypervisor"),
                ),
            ]
        ).sort("_lease", "piece_seq")
        pieces = pieces.with_columns(
            pl.col("piece_ts").shift(-1).over("_lease").alias("next_ts"),
            pl.col("piece_seq").shift(-1).over("_lease").alias("next_seq"),
        )
        leases = (
            leases.drop("hypervisor")
            .join(pieces, on="_lease")
            .with_columns(
                pl.col("piece_ts").alias("valid_from"),
                pl.col("piece_seq").alias("start_seq"),
                pl.when(pl.col("next_ts").is_not_null())
                .then(pl.col("next_ts"))
                .otherwise(pl.col("valid_to"))
                .alias("valid_to"),
                pl.when(pl.col("next_seq").is_not_null())
                .then(pl.col("next_seq"))
                .otherwise(pl.col("end_seq"))
                .alias("end_seq"),
                pl.when(pl.col("next_ts").is_not_null())
                .then(pl.lit("migrate", _REASON))
                .otherwise(pl.col("end_reason"))
                .alias("end_reason"),
            )
            .drop("piece_ts", "piece_seq", "next_ts", "next_seq")
        )
    leases = _rejoined(
        leases.drop("_lease").filter(
            pl.col("valid_to").is_null() | (pl.col("valid_to") > pl.col("valid_from"))
        )
    )
    if len(extra):  # the holders' codes after the VMs' own: renumbered in the texts' order again
        rank = pl.Series(np.empty(len(vm_names), np.int64)).scatter(
            vm_names.arg_sort(), pl.int_range(len(vm_names), eager=True, dtype=pl.Int64)
        )
        leases = leases.with_columns(rank.gather(leases.get_column("vm_id")).alias("vm_id"))
        facts = facts.with_columns(rank.gather(facts.get_column("vm_id")).alias("vm_id"))
        vm_names = vm_names.sort()
    return leases, facts, {**names, "vm_id": vm_names}


def _rejoined(leases: pl.DataFrame) -> pl.DataFrame:
    """The leases with a VM's two leases of one address that meet end to end, the first "superseded", made one:
    another VM's claim took the address for no time (at the same instant, and the VM took it back: the
    zero-length lease between is gone). The split would depend on that other VM's event, which an incremental
    update does not replay when the other VM holds nothing of the address (it opened no lease). When the VM
    moved at that instant (the two leases' hypervisors differ), they stay two, and the first ends "migrate" as
    the move alone would end it."""
    ended = leases.filter(pl.col("end_reason") == "superseded").select("addr", "vm_id", "valid_to")
    if not ended.height:
        return leases
    key = ["addr", "vm_id", "hypervisor", "kind"]
    at = ended.get_column("valid_to").unique().implode()
    first = leases.with_row_index("_first").filter(pl.col("end_reason") == "superseded")
    then = leases.with_row_index("_then").filter(pl.col("valid_from").is_in(at))
    pairs = first.select(*key, pl.col("valid_to").alias("_at"), "_first").join(
        then.select(*key, pl.col("valid_from").alias("_at"), "_then"),
        on=["addr", "vm_id", "kind", "_at"],
        nulls_equal=True,
    )
    # the VM moved at that instant (its lease goes on on another hypervisor): without the other VM's claim its
    # lease would end there as a move does; the two stay apart
    moved = pairs.filter(pl.col("hypervisor").ne_missing(pl.col("hypervisor_right")))
    if moved.height:
        leases = leases.with_columns(
            pl.when(pl.int_range(pl.len()).is_in(moved.get_column("_first").cast(pl.Int64).implode()))
            .then(pl.lit("migrate", leases.schema["end_reason"]))
            .otherwise(pl.col("end_reason"))
            .alias("end_reason")
        )
    pairs = pairs.filter(pl.col("hypervisor").eq_missing(pl.col("hypervisor_right")))
    if not pairs.height:
        return leases
    # chains (superseded, taken back, superseded, taken back): a run of linked rows in (key, time) order
    # becomes its first row, ending where its last one ends
    linked = pairs.select(pl.col("_first").alias("_prev"), pl.col("_then").alias("_row"))
    rows = pl.concat([linked.get_column("_prev"), linked.get_column("_row")]).unique()
    chain = (
        leases.with_row_index("_row")
        .filter(pl.col("_row").is_in(rows.implode()))
        .join(linked, on="_row", how="left")
        .sort([*key, "valid_from"], nulls_last=True)
    )
    starts = pl.col("_prev").is_null() | (pl.col("_prev") != pl.col("_row").shift(1)).fill_null(True)
    runs = (
        chain.with_columns(starts.cum_sum().alias("_run"))
        .group_by("_run", maintain_order=True)
        .agg(
            pl.col("_row").first(),
            pl.col("valid_to").last(),
            pl.col("end_reason").last(),
            pl.col("end_seq").last(),
        )
        .drop("_run")
    )
    out = leases.with_row_index("_row").filter(~pl.col("_row").is_in(linked.get_column("_row").implode()))
    out = out.join(runs, on="_row", how="left", suffix="_end", maintain_order="left")
    ended_runs = pl.col("_row").is_in(runs.get_column("_row").implode())
    return out.with_columns(
        pl.when(ended_runs).then(pl.col(f"{c}_end")).otherwise(pl.col(c)).alias(c)
        for c in ("valid_to", "end_reason", "end_seq")
    ).select(leases.columns)


_JUDGED = ["event_type", "vm_id", "project", "cloud"]  # what _refused_bindings reads of an event


def _neutron_binding() -> pl.Expr:
    """A Neutron event naming a VM: a port's (port.*: device_id of a compute:* owner) or a floating IP's
    association (port_details' device_id). Neutron lets any tenant set a port's device_owner to "compute:nova"
    and its device_id to any text, and port_details only repeats them: the VM they name is a claim."""
    neutron = pl.col("event_type").str.starts_with("port.") | pl.col("event_type").str.starts_with(
        "floatingip."
    )
    return neutron.fill_null(False) & pl.col("vm_id").is_not_null()


def _homes(events: pl.DataFrame) -> pl.DataFrame:
    """(vm_id, project, cloud) of every Nova (instance.*) event: the projects a VM of that cloud is in."""
    nova = pl.col("event_type").str.starts_with("instance.").fill_null(False) & pl.col("vm_id").is_not_null()
    return events.filter(nova).select("vm_id", "project", "cloud").unique()


def _refused_bindings(events: pl.DataFrame, homes: pl.DataFrame | None = None) -> pl.DataFrame:
    """The Neutron events (_neutron_binding) whose VM is not theirs to name: `_row` (their row in `events`),
    vm_id, project, cloud, and `port` (a port event, else a floating IP's). A Neutron event binds a VM only when
    one of that VM's own Nova events, of the same cloud, carries the event's project (a null project is one
    value): Nova creates and attaches a VM's ports in the VM's project, and a floating IP is associated in its
    own. So another tenant's port naming your VM, or its floating IP on such a port (port_details), binds
    nothing; nor does a port naming an OpenNebula or CSV VM, or an id no Nova event named (a VM whose Nova
    events land later binds then: _apply). `homes`: _homes of the whole history (default: of `events`)."""
    columns = events.select(_JUDGED).with_row_index("_row")
    named = columns.filter(_neutron_binding())
    if not named.height:
        return named.select("_row", "vm_id", "project", "cloud", port=pl.lit(False))
    homes = _homes(columns) if homes is None else homes
    return named.join(homes, on=["vm_id", "project", "cloud"], how="anti", nulls_equal=True).select(
        "_row", "vm_id", "project", "cloud", port=pl.col("event_type").str.starts_with("port.")
    )


def _binding_hashes(refused: pl.DataFrame) -> np.ndarray:
    """Sorted distinct hashes of (vm_id, project, cloud): the keys of refused bindings, and of Nova homes."""
    key = pl.struct(
        pl.col("vm_id").cast(pl.String), pl.col("project").cast(pl.String), pl.col("cloud").cast(pl.String)
    )
    return sorted_unique(refused.select(key.hash(_HASH_SEED)).to_series().to_numpy())


def _without_refused(frame: pl.DataFrame, refused: pl.DataFrame) -> pl.DataFrame:
    """frame (polars) with the refused bindings (_refused_bindings, of this frame) unbound: no VM, and a port
    event lists nothing, as a router's or DHCP server's port (neutron.py): what a port is not a VM's port of
    lists no VM's address. A floating IP's association keeps its port and fixed address: its holder is then the
    port's VM, else the fixed address's (_replay), as without port_details."""
    if not refused.height:
        return frame
    rows = pl.int_range(pl.len(), dtype=pl.Int64)
    at = rows.is_in(refused.get_column("_row").cast(pl.Int64).implode())
    port = rows.is_in(refused.filter("port").get_column("_row").cast(pl.Int64).implode())
    return frame.with_columns(
        pl.when(at).then(None).otherwise(pl.col("vm_id")).alias("vm_id"),
        pl.when(port).then(None).otherwise(pl.col("addrs")).alias("addrs"),
    )


def _refused_in(events: pa.Table) -> pl.DataFrame:
    """_refused_bindings of an Arrow table of events; without a Neutron event type among them (a look at the
    few distinct types), none, without reading the rest."""
    kinds = events.column("event_type").unique()
    if pa.types.is_dictionary(kinds.type):
        kinds = kinds.dictionary_decode()
    neutron = pc.or_(pc.starts_with(kinds, "port."), pc.starts_with(kinds, "floatingip."))
    if not pc.any(pc.fill_null(neutron, False)).as_py():
        events = events.slice(0, 0)
    return _refused_bindings(_to_polars(events.select(_JUDGED)))


def _without_foreign_bindings(events: pa.Table, refused: pl.DataFrame | None = None) -> pa.Table:
    """The events (Arrow) with the refused bindings (`refused`, default _refused_in(events)) unbound, as
    _without_refused."""
    if refused is None:
        refused = _refused_in(events)
    if not refused.height:
        return events
    mask = np.zeros(events.num_rows, bool)
    mask[refused.get_column("_row").to_numpy()] = True
    ports = np.zeros(events.num_rows, bool)
    ports[refused.filter("port").get_column("_row").to_numpy()] = True
    for name, where in (("vm_id", mask), ("addrs", ports)):
        column = events.column(name)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        kept = pc.if_else(pa.array(where), pa.scalar(None, column.type), column)
        events = events.set_column(events.schema.get_field_index(name), pa.field(name, kept.type), kept)
    return events


def build_leases(events: pa.Table, reclaim_interval: dt.timedelta | None = None) -> tuple[pa.Table, pa.Table]:
    """Whole event history -> (vm_leases, vms) tables in schema.VM_LEASES / schema.VMS, sorted.

    Vectorised (polars and numpy over integer codes of the sorted events, see _replay), on two threads: what
    does not depend on this thread's chain (order -> claims and releases -> leases) runs in a pool of one worker
    meanwhile: the encodings of VM ids and addresses, the VM side of the replay (events by VM, hypervisors,
    facts) and the takes of the output texts (Arrow, numpy and polars release the GIL). A month of CERN-like
    churn (1.01 M events; README, "Leases under CERN-like churn"), interleaved with the version before (one
    thread and polars' own), best of 3-5 at load 0.7-1.1: 0.78-0.89 s wall (1.14-1.31 M events/s; the issue's
    goal: >= 1 M), 1.25-1.41 CPU s; it was 1.26-1.32 s wall, 1.46-1.64 CPU s. With the other core busy the pool
    saves no wall time and costs ~5-10% more CPU."""
    events = events.select([f.name for f in VM_EVENTS] + [_TIE] * (_TIE in events.column_names))
    if events.num_rows == 0:
        return VM_LEASES.empty_table(), VMS.empty_table()
    events = _without_foreign_bindings(events)
    reclaim_us = None if reclaim_interval is None else reclaim_interval // dt.timedelta(microseconds=1)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="build-leases") as pool:
        frame, names, rows = _ordered_events(events, pool)
        leases, facts, names = _replay(frame, reclaim_us, names, pool)
        return _output_tables(events, rows, leases, facts, names, pool)


def _output_tables(
    events: pa.Table,
    rows: pl.Series,
    leases: pl.DataFrame,
    facts: pl.DataFrame,
    names: dict[str, pl.Series],
    pool: ThreadPoolExecutor,
) -> tuple[pa.Table, pa.Table]:
    """_replay's leases and facts (codes, µs) -> the vm_leases and vms tables."""
    # every VM that holds a lease has a vms row, so that "what is this VM now" is a plain read of vms
    # (sql/views.sql, _vm_info): the holders no event names (a floating IP associated with a port or fixed
    # address of no known VM: "port:<id>", "fixed:<addr>") get a row of their own, facts unknown
    facts = facts.with_columns(pl.col("status").fill_null("unknown"))
    if facts.height < len(names["vm_id"]):  # (else every VM code has its row: facts' are distinct and sorted)
        lease_only = leases.select("vm_id").unique().join(facts.select("vm_id"), on="vm_id", how="anti")
        facts = pl.concat([facts, lease_only], how="diagonal").sort("vm_id")
    # sorted on the codes (= on the texts); a lease's VM row found by a binary search (its code, when every
    # code has a row). Every text column is one take (from the texts of the codes, or from the events' own
    # column at the deciding events: facts' _at_<column> are positions in the replay order, `rows` maps them to
    # the events' rows), a lease's VM facts one from the vms column. The takes from the events (1 M rows, at
    # scattered positions: the slowest), then the leases' VM ids and hypervisors, run in `pool` meanwhile
    # (Arrow releases the GIL)
    vm_columns: dict[str, Any] = {}
    for name in _IDENTITY:
        column = events.column(name)
        if column.null_count == len(column):  # (as image in Nova's instance events)
            vm_columns[name] = pa.nulls(facts.height, column.type)
        else:
            vm_columns[name] = pool.submit(_take, column, rows.gather(facts.get_column(f"_at_{name}")))
    leases = leases.sort(_LEASE_KEY)
    if facts.height == len(names["vm_id"]):
        at_vm = leases.get_column("vm_id")
    else:
        at_vm = facts.get_column("vm_id").search_sorted(leases.get_column("vm_id"))
    text = {n: _arrow_text(names[n]) for n in ("addr", "vm_id", "hypervisor")}
    vm_columns["vm_id"] = _take(text["vm_id"], facts.get_column("vm_id"))
    vm_columns["hypervisor"] = _take(text["hypervisor"], facts.get_column("hypervisor"))
    vm_columns["status"] = _arrow_text(facts.get_column("status"))
    for name in VMS.names:
        if name in ("vm_key", "identity_changed_at"):  # set when written: vm_keys.keyed_vms
            vm_columns[name] = pa.nulls(facts.height, VMS.field(name).type)
        elif name not in vm_columns:
            vm_columns[name] = _arrow_time(facts.get_column(name))
    lease_columns: dict[str, Any] = {
        "addr": _take(text["addr"], leases.get_column("addr")),
        "vm_id": pool.submit(_take, text["vm_id"], leases.get_column("vm_id")),
        "hypervisor": pool.submit(_take, text["hypervisor"], leases.get_column("hypervisor")),
        "addr_kind": _enum_text(leases.get_column("kind")),
        **{c: _arrow_time(leases.get_column(c)) for c in ("valid_from", "valid_to")},
        "end_reason": _enum_text(leases.get_column("end_reason")),
    }
    of_vm = {"vm_status": "status", "quarantine_until": "quarantine_until"}
    of_vm |= {"vm_name": "vm_name", "project": "project", "user": "user", "cloud": "cloud"}  # (from `pool`)
    for name, vm_name in of_vm.items():
        lease_columns[name] = _take(_result(vm_columns[vm_name]), at_vm)
    vms = pa.table({n: _result(vm_columns[n]) for n in VMS.names}, schema=VMS)
    leases_table = pa.table({n: _result(lease_columns[n]) for n in VM_LEASES.names}, schema=VM_LEASES)
    return leases_table, vms  # vm_key: vm_keys.py


def _take(values: pa.Array | pa.ChunkedArray, at: pl.Series) -> pa.Array:
    """values at the positions `at` (a null position gives null), as one array."""
    taken = values.take(at.to_arrow())
    taken = taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken
    return taken.cast(taken.type.value_type) if pa.types.is_dictionary(taken.type) else taken


def _result(column: Future[pa.Array] | pa.Array) -> pa.Array:
    return column.result() if isinstance(column, Future) else column


def _enum_text(series: pl.Series) -> pa.Array:
    """An Enum column as text: its few categories taken by its codes (no cast of every value)."""
    assert isinstance(series.dtype, pl.Enum)
    return _take(_arrow_text(series.dtype.categories), series.to_physical())


def _arrow_text(series: pl.Series) -> pa.Array:
    return series.to_arrow().cast(pa.string())


def _arrow_time(series: pl.Series) -> pa.Array:
    """µs since the epoch -> timestamp[us, UTC] (a view of the same buffer)."""
    return series.to_arrow().cast(pa.int64()).cast(pa.timestamp("us", tz="UTC"))


# ---- the lake edge -------------------------------------------------------------------------------------------


def load_reclaim_interval(lake: Any) -> dt.timedelta | None:
    """The interval given on an earlier run, remembered in the lake so that later rebuilds keep it."""
    path = lake.root / SETTINGS_FILE
    if not path.exists():
        return None
    seconds = json.loads(path.read_text()).get("reclaim_interval_seconds")
    return None if seconds is None else dt.timedelta(seconds=seconds)


def save_reclaim_interval(lake: Any, interval: dt.timedelta) -> None:
    path = lake.root / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"reclaim_interval_seconds": interval.total_seconds()}))


_INTERVAL = ["addr", "vm_id", "valid_from", "valid_to"]


def _changed_spans(old: pa.Table, new: pa.Table) -> pl.DataFrame:
    """(valid_from, valid_to) of the times at which two lease tables give an address different VMs (or a VM in
    one and none in the other); valid_to null: from then on. Only addr/vm/interval matter.

    Only leases in one table and not the other (two anti joins, nulls equal: a lease still held is the same in
    both) can give different answers: leases of one address never overlap, so where a lease of both tables holds,
    both answer its VM. Within them, the times two such leases of the same VM both cover give the same answer
    and are left out: a VM deleted after months changes its lease's end, and only the time from the old end to
    the new (before session 32 every day since the VM's creation was re-attributed, at each hourly update).
    Vectorised: per address a sweep over the boundaries (leases in one table only: +1 while held; overlaps of
    two of the same VM: +1 while both hold); the answer differs where the first count is positive and the
    second zero."""
    a, b = (pl.from_arrow(t.select(_INTERVAL)) for t in (old, new))
    assert isinstance(a, pl.DataFrame) and isinstance(b, pl.DataFrame)
    b = b.cast(a.schema)  # type: ignore[arg-type]
    # each table as the times its leases answer (_answering): rows planted to overlap or to end before they
    # start shadow the lease before them for lease_at, and as plain intervals cancelled a real change out of
    # the sweep (its days were never attributed again, not even by a repair's rebuild)
    a, b = (_answering(x) for x in (a, b))
    only_a, only_b = (x.join(y, on=_INTERVAL, how="anti", nulls_equal=True) for x, y in ((a, b), (b, a)))
    empty = pl.DataFrame(schema={"valid_from": a.schema["valid_from"], "valid_to": a.schema["valid_to"]})
    if only_a.height + only_b.height == 0:
        return empty
    end = np.iinfo(np.int64).max  # (a lease still held: to the end of time)

    def times(frame: pl.DataFrame) -> pl.DataFrame:
        return frame.select(
            "addr",
            "vm_id",
            pl.col("valid_from").dt.epoch("us").alias("f"),
            pl.col("valid_to").dt.epoch("us").fill_null(end).alias("t"),
        )

    ta, tb = times(only_a), times(only_b)
    same = (
        ta.join(tb, on=["addr", "vm_id"], suffix="_b")
        .select("addr", pl.max_horizontal("f", "f_b").alias("f"), pl.min_horizontal("t", "t_b").alias("t"))
        .filter(pl.col("f") < pl.col("t"))
    )
    held = pl.concat([ta, tb]).select("addr", "f", "t")

    def steps(frame: pl.DataFrame, column: str) -> pl.DataFrame:
        other = "_same" if column == "_held" else "_held"
        return pl.concat(
            [
                frame.select(
                    "addr", pl.col("f").alias("at"), pl.lit(1).alias(column), pl.lit(0).alias(other)
                ),
                frame.select(
                    "addr", pl.col("t").alias("at"), pl.lit(-1).alias(column), pl.lit(0).alias(other)
                ),
            ]
        ).select("addr", "at", "_held", "_same")

    sweep = (
        pl.concat([steps(held, "_held"), steps(same, "_same")])
        .group_by("addr", "at")
        .agg(pl.col("_held").sum(), pl.col("_same").sum())
        .sort("addr", "at")
        .with_columns(
            pl.col("_held").cum_sum().over("addr"),
            pl.col("_same").cum_sum().over("addr"),
            pl.col("at").shift(-1).over("addr").alias("until"),
        )
        .filter((pl.col("_held") > 0) & (pl.col("_same") == 0) & pl.col("until").is_not_null())
    )
    kind = a.schema["valid_from"]
    return sweep.select(
        pl.from_epoch("at", "us").dt.replace_time_zone("UTC").cast(kind).alias("valid_from"),
        pl.when(pl.col("until") < end)
        .then(pl.from_epoch("until", "us").dt.replace_time_zone("UTC"))
        .cast(kind)
        .alias("valid_to"),
    )


def _answering(leases: pl.DataFrame) -> pl.DataFrame:
    """Leases (addr, vm_id, valid_from, valid_to) cut to the times each answers by lease_at's rule: the last
    lease of the address started at or before t, if it has not ended; so from its start to its end or the
    next start of its address, whichever comes first (equal starts: the greater vm_id holds), and none that
    answers no time. A lease without a start holds none (as in the SQL views' ASOF join); and a planted row
    must not make the day range of _changed_spans reach back 290,000 years. Built leases never overlap: they
    come out as they are."""
    # in (address, start, vm_id) order, ties as lease_at takes them (its sort is stable); a build's leases come
    # so, those read back from the lake's files do not (a sort of 3 M leases: 0.5 s)
    key = ["addr", "valid_from", "vm_id"]
    ordered = leases.filter(pl.col("valid_from").is_not_null())
    if not _in_key_order(ordered, key):
        ordered = ordered.sort(key, maintain_order=True)
    following = pl.when(pl.col("addr").shift(-1) == pl.col("addr")).then(pl.col("valid_from").shift(-1))
    until = (
        pl.when(following.is_not_null() & (pl.col("valid_to").is_null() | (following < pl.col("valid_to"))))
        .then(following)
        .otherwise(pl.col("valid_to"))
    )
    ordered = ordered.with_columns(until.alias("valid_to"))
    return ordered.filter(pl.col("valid_to").is_null() | (pl.col("valid_to") > pl.col("valid_from")))


def _left_behind(lake: Any) -> dict[str, set[str]]:
    """Per table (flows, vm_logs), the days the vm_leases commit about to be replaced recorded as changed that no
    attribution with it has rewritten yet (a run killed between that commit and its attribution): the next
    commit records them too. Else a later update's commit hid them (attribution.days_left_to_attribute reads
    the latest commit only) and their flows kept VMs of leases older than both."""
    from tracepipe.correlate.attribution import days_left_to_attribute

    return {name: days_left_to_attribute(lake, name) for name in ("flows", "vm_logs")}


def _partition_days(lake: Any, datasets: tuple[str, ...] = ("flows", "vm_logs")) -> list[str]:
    """Days that have flow or VM-log partitions: only those can need re-attribution (data landing later is
    attributed when it lands)."""
    days: set[str] = set()
    for name in datasets:
        days.update(lake.days(name))
    return sorted(days)


def changed_days(
    old: pa.Table, new: pa.Table, flow_days: list[str] | None, now: dt.datetime | None = None
) -> set[str]:
    """UTC days on which attribution may differ between two lease tables (only addr/vm/interval matter):
    the days a lease in one and not the other covers (to `now` while still held), among `flow_days` if given.
    Vectorised: a difference array over the days spanned (leases tables hold millions of rows)."""
    return days_of_spans(_changed_spans(old, new), flow_days, now)


def days_of_spans(
    spans: pl.DataFrame, flow_days: list[str] | None, now: dt.datetime | None = None
) -> set[str]:
    """The UTC days that _changed_spans' spans cover (to `now` while open), among `flow_days` if given."""
    if spans.height == 0:
        return set()
    now = now or dt.datetime.now(dt.UTC)
    bounds = spans.select(
        pl.col("valid_from").dt.date().cast(pl.Int32).alias("first"),
        pl.coalesce("valid_to", pl.lit(now)).dt.date().cast(pl.Int32).alias("last"),
    ).with_columns(pl.max_horizontal("first", "last").alias("last"))
    first = bounds.get_column("first").to_numpy().astype(np.int64)
    last = bounds.get_column("last").to_numpy().astype(np.int64)
    low = int(first.min())
    size = int(last.max()) - low + 2
    steps = np.bincount(first - low, minlength=size) - np.bincount(last - low + 1, minlength=size)
    covered = np.flatnonzero(np.cumsum(steps)[:-1] > 0) + low
    epoch = dt.date(1970, 1, 1)
    days = {(epoch + dt.timedelta(days=int(d))).isoformat() for d in covered}
    return days if flow_days is None else days & set(flow_days)


# The file layout of vm_leases and vms, for an hourly update that rewrites little and a `who` that reads little:
#   * rows that can still change (an open lease, a VM not deleted: "hot") are kept apart from settled rows
#     (closed leases of deleted VMs, deleted VMs: "cold"), so that the hourly update finds the VMs it touches in
#     the hot file, and adds the rows that settled to the newest cold file (a year of churn: 3 M cold rows,
#     the hot ones are the VMs alive now);
#   * files are cut by time (valid_from / deleted_at) in FILE_ROWS, and each is sorted by its key (addr /
#     vm_id) in small row groups, so that one address or VM is one row group of each file (min/max statistics).
FILE_ROWS = 32_768
SMALL_ROWS = 4_096  # a settled file the hourly update still adds rows to (see _files_of)
MERGE_FILES = 8  # settled files not full: merged once there are this many
ROW_GROUP_ROWS = 8_192
_TIME_OF = {"vm_leases": "valid_from", "vms": "created_at"}
_SETTLED_TIME = {"vm_leases": "valid_from", "vms": "deleted_at"}
_KEY_OF = {"vm_leases": ["addr", "valid_from"], "vms": ["vm_id"]}
_OPEN = {"vm_leases": "valid_to", "vms": "deleted_at"}  # null in a row that can still change


_STATUS = {"vm_leases": "vm_status", "vms": "status"}


def _settled(name: str) -> pl.Expr:
    """Rows that no in-order event changes any more (a purge of a deleted VM still can: then its file is
    rewritten like any other)."""
    return pl.col(_OPEN[name]).is_not_null() & pl.col(_STATUS[name]).is_in(list(_GONE)).fill_null(False)


def _is_settled_file(entry: Any, name: str) -> bool:
    """A file whose statistics prove that every row is settled (one gone status, nothing open): whoever wrote
    it, the incremental update may read only the rows it looks for from it."""
    status = _STATUS[name]
    low, high = entry.mins.get(status), entry.maxs.get(status)
    return (
        entry.rows > 0
        and entry.null_counts.get(_OPEN[name]) == 0
        and entry.null_counts.get(status) == 0
        and low == high
        and low in _GONE
    )


_VM_COLUMNS = ("vm_name", "project", "user", "cloud", "vm_status", "quarantine_until")


@dataclass
class LeaseUpdate:
    """What a lease update did: `mode` full (every event replayed) or incremental (only the addresses and VMs
    the new events touch), the UTC days whose attribution may have changed, and its size."""

    mode: str = "none"
    days: set[str] = field(default_factory=set)
    events: int = 0  # events replayed
    new_events: int = 0
    addresses: int = 0  # addresses whose leases were recomputed (incremental)
    vms: int = 0
    reason: str = ""  # why a full rebuild (when incremental was asked)
    seconds: float = 0.0
    # (an incremental update's _changed_spans: the times whose answers changed, for the attribution of its
    # days to rewrite only the files that hold flows of those times; None: whole days)
    spans: pl.DataFrame | None = field(default=None, repr=False, compare=False)
    spans_version: int | None = None  # (the vm_leases version whose commit the spans are the changes of)

    def to_dict(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["days"] = sorted(self.days)
        del out["spans"], out["spans_version"]
        return out


def _chunks(table: pa.Table, name: str) -> list[pa.Table]:
    """A derived table as files: settled rows apart from those that can change, cut by time in FILE_ROWS,
    each file sorted by its key (see FILE_ROWS).

    One stable sort on integers, not one text sort per file: the rows in key order first (a full build's
    tables come so: checked, not sorted again), then stably by (part, the file of the part's time order): each
    file's rows come out in key order. 95 sorts of 32 k rows on (addr, valid_from) cost 1.8 s of a year's
    rebuild, this ~0.3 s."""
    if table.num_rows == 0:
        return []
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    key = _KEY_OF[name]
    rows = np.arange(frame.height)
    if not _in_key_order(frame, key):  # (ranks of the text, one integer sort: lake.sort_indices)
        rows = sort_indices(table, tuple(key)).to_numpy()
        frame = frame[rows]
    # the part of each row: settled rows of one status per file (deleted, purged: _is_settled_file knows them
    # from the statistics), then the rows that can change; vms: VMs whose identity changed apart too
    # (flows_attributed reads only their files, query.connect)
    settled = frame.select(_settled(name).fill_null(False)).to_series()
    status = frame.get_column(_STATUS[name]).cast(pl.String)
    codes = status.rank("dense").fill_null(0).cast(pl.Int64).to_numpy()  # (a settled row has a status)
    part = np.where(settled.to_numpy(), codes, 0)
    if name == "vms":
        part = part * 2 + frame.get_column("identity_changed_at").is_not_null().to_numpy()
    # the time each part is cut by (nulls last), its rank within the part, the file it gives
    by = np.where(settled.to_numpy(), 0, 1)
    when = [
        frame.get_column(_SETTLED_TIME[name]).dt.epoch("us"),
        frame.get_column(_TIME_OF[name]).dt.epoch("us"),
    ]
    times = np.where(
        by == 0,
        when[0].fill_null(np.iinfo(np.int64).max).to_numpy(),
        when[1].fill_null(np.iinfo(np.int64).max).to_numpy(),
    )
    in_time = np.lexsort((times, part))  # (stable: by part, then time)
    sorted_part = part[in_time]
    starts = np.flatnonzero(np.r_[True, sorted_part[1:] != sorted_part[:-1]])
    rank = np.arange(len(in_time)) - np.repeat(starts, np.diff(np.r_[starts, len(in_time)]))
    file_of = np.empty(len(in_time), np.int64)
    file_of[in_time] = (sorted_part << 32) | (rank // FILE_ROWS)
    order = np.argsort(file_of, kind="stable")  # (key order kept within each file)
    files = file_of[order]
    bounds = [*np.flatnonzero(files[1:] != files[:-1]) + 1, len(files)]
    # (polars' gather, then Arrow per file: Arrow's take of a 3 M-row table at scattered rows cost 3.2 s)
    ordered = frame.drop("_row", strict=False)[order]
    return [
        ordered.slice(a, b - a).to_arrow().cast(table.schema)
        for a, b in zip([0, *bounds[:-1]], bounds, strict=True)
    ]


def _in_key_order(frame: pl.DataFrame, key: list[str]) -> bool:
    """Whether frame's rows are in ascending order of `key` (no null in it): one pass of comparisons."""
    if frame.height < 2 or frame.select(pl.any_horizontal(pl.col(key).is_null().any())).item():
        return frame.height < 2
    later = pl.lit(False)
    for column in reversed(key):
        here, before = pl.col(column), pl.col(column).shift(1)
        later = (here > before) | ((here == before) & (later | pl.lit(column == key[-1])))
    return bool(frame.select(later.slice(1).all()).item())


def write_derived(lake: Any, name: str, table: pa.Table, info: dict[str, Any]) -> int:
    """Replace the whole of vm_leases or vms by `table`, in the layout of FILE_ROWS, in one commit; its version."""
    with lake.lock(name):
        return _write_derived_locked(lake, name, table, info)


def _write_derived_locked(lake: Any, name: str, table: pa.Table, info: dict[str, Any]) -> int:
    """write_derived for a caller that holds the table's lock."""
    if name == "vms" and not _is_staging(lake):
        table = keyed_vms(lake, table, lake.entries(name))
        info = {**info, **lost_keys_info(lake, table)}
    return lake.replace_files(name, lake.entries(name), _chunks(table, name), info, ROW_GROUP_ROWS)


def _events_since(lake: Any, version: int | None, read: set[str]) -> tuple[int | None, list[Any] | None]:
    """vm_events' latest version, and the files holding events that landed after `version` which a rebuild
    that read the files `read` has not seen (None when the log of `version` is gone: read them all again)."""
    lake.refresh("vm_events")
    latest = lake.version("vm_events")  # (before the files: never newer than they are)
    if version is None:
        return latest, [e for e in lake.entries("vm_events") if e.relative not in read]
    added = lake.files_added_since("vm_events", version)
    return latest, None if added is None else [e for e in added if e.relative not in read]


def rebuild_leases(lake: Any, reclaim_interval: dt.timedelta | None = None) -> set[str]:
    """Repair: rebuild vm_leases and vms from every vm_event in the lake (vectorised, see build_leases); return
    the UTC days (among those with flows or VM logs) whose attribution may change."""
    return _full(lake, reclaim_interval).days


# A full rebuild replays every event: all at once in memory (~0.6 KB per event at peak, measured on a year of
# CERN-like churn, session 22: 7.7-7.9 GB for 12.55 M events, 3.7 GB for the first 6.17 M; it was 0.85 KB before
# the dictionary read and the jemalloc pool) up to `at_once` events, by default FULL_EVENTS, else as many as a
# quarter of the machine's memory holds at EVENT_BYTES each (a quarter more than measured); a longer history
# in time slices of whole days
# (_slices, _in_slices): the first, of up to `at_once` events, built like that, each next one, of at most
# SLICE_EVENTS, applied to it as the hourly update applies new events, so that memory stays bounded by `at_once`
# whatever the history.
FULL_EVENTS: int | None = None
EVENT_BYTES = 768
SLICE_EVENTS = 1_000_000
REBUILD_DIR = "_settings/lease_rebuild"
_state_log = logging.getLogger("tracepipe.leases")


def at_once_events() -> int:
    """How many events a full rebuild replays at once, in memory, by default (see FULL_EVENTS)."""
    if FULL_EVENTS is not None:
        return FULL_EVENTS
    from tracepipe.fsutil import memory_bytes

    return max(SLICE_EVENTS, memory_bytes() // 4 // EVENT_BYTES)


JEMALLOC_DECAY_MS = 10_000


@contextlib.contextmanager
def _arrow_jemalloc() -> Iterator[None]:
    """Arrow's jemalloc pool as the default for a full rebuild, when pyarrow has it. Its default here (mimalloc)
    kept ~1.5 GB more at the peak of a year's rebuild at once (9.2-9.5 GB against 7.7, measured twice each,
    alternated) and took 4.9-5.9 s longer (34.7 / 39.1 s against 28.8 / 34.2 s): the read of 366 day files in
    threads and the replay's many short-lived arrays. Buffers keep the pool they came from: restored after.
    The switch is process-wide: another thread (the collector's receive loop beside its committer's rebuild)
    allocates from jemalloc meanwhile, which changes nothing but where its memory comes from."""
    try:
        pool = pa.jemalloc_memory_pool()
        # (Arrow's jemalloc hands freed pages back at once by default, and the build faults them in again: a
        # year's build at once made 2.06 M page faults and 17.9 s of system time, 1.94 M and 13.6 s with a
        # 10 s decay; set before its arenas exist, it applies to them)
        pa.jemalloc_set_decay_ms(JEMALLOC_DECAY_MS)
    except (NotImplementedError, pa.ArrowException):
        yield
        return
    before = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(before)


def _full(
    lake: Any,
    reclaim_interval: dt.timedelta | None,
    reason: str = "",
    at_once: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> LeaseUpdate:
    with _arrow_jemalloc():
        return _full_rebuild(lake, reclaim_interval, reason, at_once, progress)


def _full_rebuild(
    lake: Any,
    reclaim_interval: dt.timedelta | None,
    reason: str,
    at_once: int | None,
    progress: Callable[[str], None] | None,
) -> LeaseUpdate:
    started = time.perf_counter()
    if reclaim_interval is not None:
        save_reclaim_interval(lake, reclaim_interval)
    else:
        reclaim_interval = load_reclaim_interval(lake)
    events_version = lake.version("vm_events")  # read before the events: never newer than what is built
    entries = lake.entries("vm_events")
    slices = _slices(entries, at_once_events() if at_once is None else at_once)
    if len(slices) > 1:
        staged = _in_slices(lake, reclaim_interval, slices, progress)
        if not isinstance(staged, str):
            staged = _adopt(lake, staged, events_version, {e.relative for e in entries})
        if not isinstance(staged, str):
            rows = sum(e.rows for part in slices for e in part) + staged.new_events
            note = f"replayed in {len(slices)} time slices of whole days"
            return LeaseUpdate(
                "full",
                staged.days,
                rows,
                new_events=staged.new_events,
                reason=f"{reason}; {note}" if reason else note,
                seconds=round(time.perf_counter() - started, 3),
            )
        # (a slice the update cannot apply, see _apply; or the events that landed meanwhile)
        note = f"replayed at once in memory: {staged}"
        reason = f"{reason}; {note}" if reason else note
        events_version = lake.version("vm_events")  # (what landed during the slices, read with the rest)
        entries = lake.entries("vm_events")
    old = _old_leases(lake)
    if progress is not None:
        progress("all events at once")
    events = read_event_files([e.path for e in entries])
    leases, vms = build_leases(events, reclaim_interval)
    # the commits under both locks, in the order every update takes them: no update commits in between
    with lake.lock("vm_leases"), lake.lock("vms"):
        latest, landed = _events_since(lake, events_version, {e.relative for e in entries})
        if landed is None or landed:
            # events landed during the build, and an update may have committed their leases meanwhile: built
            # again with them, here, instead of committing leases that leave them out (hostile review F6)
            events_version, old = latest, _old_leases(lake)
            del leases, vms, events  # (memory: one build at a time)
            events = read_event_files(lake.files("vm_events"))
            leases, vms = build_leases(events, reclaim_interval)
        # the days that change and the update state are worked out in threads while vms is written (polars and
        # Arrow release the GIL; a year, alternated with the serial order: 0.4-4.8 s off 21.8-32.0 s, noisy)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="rebuild") as pool:
            state = pool.submit(_full_state, events, leases, vms)
            days_held = _partition_days(lake)  # (the lake is read here only: the threads compute)
            changed = pool.submit(
                lambda: set(days_held) if old is None else changed_days(old, leases, days_held)
            )
            _write_derived_locked(lake, "vms", vms, {})
            # vm_leases last, recording what it was built from and the days it changed: a run killed before
            # that commit is redone by the next (events newer than the leases), one killed after it
            # re-attributes the days that no attribution with these leases rewrote yet
            # (attribution.days_left_to_attribute)
            days = changed.result() | set().union(*_left_behind(lake).values())
            version = _write_derived_locked(
                lake,
                "vm_leases",
                leases,
                {"vm_events_version": events_version, "days": sorted(days), VMS_COMPLETE: True},
            )
            _save_state(lake, version, state.result())
    return LeaseUpdate(
        "full", days, events.num_rows, reason=reason, seconds=round(time.perf_counter() - started, 3)
    )


def _old_leases(lake: Any) -> pa.Table | None:
    """What changed_days compares a full rebuild's leases with: the lake's, None when they cannot be read (the
    repair of a lease table that cannot be read: every day may change)."""
    try:
        return lake.read("vm_leases", columns=["addr", "vm_id", "valid_from", "valid_to"])
    except Exception:
        return None


def _slices(entries: list[Any], at_once: int) -> list[list[Any]]:
    """The vm_events files of a full rebuild in time slices: one when they hold at most `at_once` events (0: no
    limit), else whole days in date order: the first slice up to `at_once` events (built at once, ~1 µs an
    event), each next up to SLICE_EVENTS and `at_once` (applied as an update, ~4 µs an event and more memory
    per event); a day bigger than that alone."""
    if at_once <= 0 or sum(e.rows for e in entries) <= at_once:
        return [entries]
    by_day: dict[str, list[Any]] = {}
    for entry in entries:  # per file, not per event
        by_day.setdefault(entry.day or "", []).append(entry)
    out: list[list[Any]] = []
    rows = 0
    for day in sorted(by_day):
        size = sum(e.rows for e in by_day[day])
        if out and rows + size <= (at_once if len(out) == 1 else min(SLICE_EVENTS, at_once)):
            out[-1].extend(by_day[day])
            rows += size
        else:
            out.append(list(by_day[day]))
            rows = size
    return out


def _in_slices(
    lake: Any,
    reclaim: dt.timedelta | None,
    slices: list[list[Any]],
    progress: Callable[[str], None] | None = None,
) -> Any:
    """vm_leases, vms and the update state built from the events of `slices` (in time order), in a staging lake
    beside the real one (REBUILD_DIR; its vm_events is the lake's, linked): the first slice by build_leases, each
    next by _apply, as the hourly update applies new events. Returns the staging Lake; or why a slice cannot be
    applied (then the staging is removed and the caller rebuilds at once in memory). Readers of the lake see
    the old leases until _adopt commits the new ones."""
    from tracepipe.lake import Lake

    parent = lake.root / REBUILD_DIR
    parent.mkdir(parents=True, exist_ok=True)
    if not _in_lake(lake, parent):  # (a link planted in the lake: nothing is written or removed out there)
        return f"{parent} leads out of the lake"
    remove_stale_rebuilds(lake, dt.timedelta(days=1))
    root = Path(tempfile.mkdtemp(prefix="build-", dir=parent))
    try:
        events_dir = lake.dataset_dir("vm_events")
        try:
            os.symlink(events_dir.resolve(), root / events_dir.name, target_is_directory=True)
        except OSError as exc:  # (a filesystem without symbolic links)
            shutil.rmtree(root, ignore_errors=True)
            return f"no staging lake beside it: {exc}"
        stage = Lake(root)
        stage.lease_staging = True  # type: ignore[attr-defined]  # (_is_staging)
        if reclaim is not None:
            save_reclaim_interval(stage, reclaim)
        say = progress or (lambda _step: None)
        say(f"time slice 1 of {len(slices)}")
        events = read_event_files([e.path for e in slices[0]])
        leases, vms = build_leases(events, reclaim)
        write_derived(stage, "vms", vms, {})
        version = write_derived(stage, "vm_leases", leases, {"vm_events_version": -1, VMS_COMPLETE: True})
        _save_state(stage, version, _full_state(events, leases, vms))
        del events, leases, vms
        for i, part in enumerate(slices[1:], 2):
            say(f"time slice {i} of {len(slices)}")
            update = _apply(stage, _read_events([e.path for e in part]), -1, version)
            if isinstance(update, str):
                shutil.rmtree(root, ignore_errors=True)
                return update
            version = stage.version("vm_leases")
        return stage
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _is_staging(lake: Any) -> bool:
    """Whether `lake` is the staging lake of a rebuild in time slices (_in_slices): its vms rows get no VM keys
    (keyed_vms), since _adopt keys them afresh against the lake's own rows (keying the staging's 3 M VMs on each
    of a year's six slices, out of id order, cost ~4 s of a 45 s rebuild)."""
    return bool(getattr(lake, "lease_staging", False))


def remove_stale_rebuilds(lake: Any, older_than: dt.timedelta) -> int:
    """Remove the staging folders of rebuilds killed before they ended (untouched for `older_than`: none still
    runs; `tracepipe vacuum` and each rebuild call it), only real `build-*` folders inside the lake. Their count."""
    parent = lake.root / REBUILD_DIR
    if not parent.is_dir() or not _in_lake(lake, parent):
        return 0
    removed = 0
    for stale in parent.iterdir():
        if stale.name.startswith("build-") and not stale.is_symlink() and stale.is_dir():
            if time.time() - stale.lstat().st_mtime > older_than.total_seconds():
                shutil.rmtree(stale, ignore_errors=True)
                removed += 1
    return removed


def _in_lake(lake: Any, path: Path) -> bool:
    """Whether `path`, links followed, is inside the lake's directory (a folder the lake keeps its own files in
    may have been replaced by a link to anywhere by whoever can write the lake: never remove files there)."""
    try:
        return path.resolve().is_relative_to(lake.root.resolve())
    except OSError:
        return False


@dataclass
class _Adopted:
    days: set[str]  # whose attribution may change
    new_events: int  # events that landed during the slices, applied to the staging before its commit


def _adopt(lake: Any, stage: Any, events_version: int | None, read: set[str]) -> _Adopted | str:
    """Commit the staging lake's vms rows and vm_leases files (moved, not copied) to the lake, as a full
    rebuild would write them, and its update state; remove the staging. Events that landed after
    `events_version` in files other than `read` (those the slices replayed) are applied to the staging first,
    under the lake's locks: an update of theirs may have committed leases meanwhile, which the staging's would
    otherwise roll back until the next update (hostile review F6). Returns the days whose attribution may
    change, or why those events cannot be applied (then the caller replays everything at once)."""
    try:
        # the commits under both locks, in the order every update takes them: no update commits in between
        with lake.lock("vm_leases"), lake.lock("vms"):
            latest, landed = _events_since(lake, events_version, read)
            if landed is None:
                return "the event log of the rebuild's start expired"
            if landed:
                try:
                    caught = _apply(
                        stage, _read_events([e.path for e in landed]), -1, stage.version("vm_leases")
                    )
                except StateChanged as exc:
                    caught = str(exc)
                if isinstance(caught, str):
                    return f"events landed during the rebuild: {caught}"
            staged = stage.entries("vm_leases")
            days = set(_partition_days(lake))
            old = _old_leases(lake)
            if old is not None:
                days = changed_days(old, stage.read("vm_leases", columns=old.column_names), days)
                del old
            # the VMs' keys and identity changes as the lake's own rows give them (the staging's are its own)
            # in vm_id order, as a build at once gives them: keyed_vms then finds each VM's row by position and
            # _chunks sorts nothing (the staging's files, cut by time, read in file order cost ~5 s more a year)
            vms = _in_id_order(stage.read("vms"))
            for name in ("vm_key", "identity_changed_at"):
                column = vms.schema.get_field_index(name)
                vms = vms.set_column(
                    column, vms.schema.field(name), pa.nulls(vms.num_rows, vms.schema.field(name).type)
                )
            days |= set().union(*_left_behind(lake).values())
            _write_derived_locked(lake, "vms", vms, {})
            del vms
            version = lake.adopt_files(
                "vm_leases",
                lake.entries("vm_leases"),
                [e.path for e in staged],
                {"vm_events_version": latest, "days": sorted(days), VMS_COMPLETE: True},
            )
            state = _load_state(stage, stage.version("vm_leases"))
            if state is not None:  # (else the next update rebuilds in full, as after any lost state)
                _save_state(lake, version, state)
        return _Adopted(days, sum(e.rows for e in landed))
    finally:
        shutil.rmtree(stage.root, ignore_errors=True)


def _in_id_order(vms: pa.Table) -> pa.Table:
    """vms rows sorted by vm_id (polars' gather: Arrow's take of a 3 M-row table at scattered rows is slower)."""
    frame = pl.from_arrow(vms)
    assert isinstance(frame, pl.DataFrame)
    return frame.sort("vm_id", maintain_order=True).to_arrow().cast(vms.schema)


def refresh_leases(
    lake: Any,
    reclaim_interval: dt.timedelta | None = None,
    full: bool = False,
    at_once: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> LeaseUpdate:
    """Bring vm_leases and vms up to the events in the lake: incrementally when they were built before
    (only the addresses and VMs that the events landed since touch), else (or with `full`, or a changed
    reclaim interval) a full rebuild, replaying at most `at_once` events at once (None: at_once_events(); 0: all
    of them; `progress` is told each time slice). Nothing to do when no event landed since the last build."""
    built = next(iter(lake.commit_infos("vm_leases")), {})
    version = lake.version("vm_events")
    changed_interval = reclaim_interval is not None and reclaim_interval != load_reclaim_interval(lake)
    if full or changed_interval or "vm_events_version" not in built:
        reason = "asked" if full else "reclaim interval" if changed_interval else "no leases built yet"
        return _full(lake, reclaim_interval, reason, at_once, progress)
    if built["vm_events_version"] == version:
        return LeaseUpdate()
    return _incremental(lake, built["vm_events_version"], version, built["version"])


def _new_event_files(lake: Any, since: int) -> list[Any] | None:
    """vm_events files added after version `since` (None when the log of that version is gone)."""
    return lake.files_added_since("vm_events", since)


def _addr_set(events: pl.DataFrame) -> pl.Series:
    return pl.concat(
        [events.get_column("addr").drop_nulls(), events.get_column("addrs").explode().drop_nulls()]
    ).unique()


def _touched(new: pl.DataFrame, index: pl.DataFrame, vms: pl.Series, first: pl.DataFrame) -> pl.Series:
    """The addresses an update recomputes: those the new events name, those their VMs held, and the floating
    addresses of the associations with a port bound for the first time (_first_bound)."""
    held = index.filter(pl.col("vm_id").is_in(vms.implode())).get_column("addr")
    return pl.concat([_addr_set(new), held, first.get_column("addr")]).unique()


def _incremental(lake: Any, since: int, version: int | None, built: int) -> LeaseUpdate:
    """Recompute only the leases of the addresses the new events touch, from the time each was last free.

    For each touched address A, b(A) is where its run of back-to-back leases covering the earliest new event
    starts (or that time, when A was free then): before b(A) nobody held A, so its leases from b(A) on follow
    from the events after b(A) that name A, and the whole history of every VM involved (status, moves,
    deletes). Those are replayed with build_leases (the same code as a full rebuild, with A's claims before
    b(A) taken out), and replace A's leases from b(A) on and the involved VMs' rows. What the update needs of
    the past comes from the rows that can still change (the "hot" files) and the saved state of the last build
    (_State: live VMs' events, known VM ids, each address's last run), so its reads do not grow with the
    history; the settled files are read only for a VM of the new events that is already settled (rare: read
    as before) or a run of leases that reaches into them.

    Neutron's events update incrementally: ports created or updated for a VM (its own events), a floating IP
    associated (naming the port's VM, or only the port and fixed address as Neutron without port_details does),
    disassociated or deleted (naming its address, or only its id: the address is the state's, filled in by
    _with_floating_addresses). Floating-IP events of no VM's own are in no VM's history: the state keeps those
    an update can replay again (_kept) and they join the replay from b(A) on; an association's fixed
    address is replayed with it (the holder then may hold the floating IP), and every live VM bound to a port
    a new association names is involved (the port's VM then holds it). A floating IP's key must name one
    address, the one its earlier events named, and be later than them (_floating_in_order). A VM's port deleted
    or unbound (by an event naming the VM, or none: the port's VM then, read like an association's, and the
    event kept like the floating-IP events, _released_by_detaches) releases what that VM's own events listed
    with the port before it, all in its history: incremental, and so is any later event on the port (a port
    re-bound to another VM). A port of no VM that lists nothing (a router's, a DHCP server's) changes nothing.
    The first binding of a port a floating IP was associated with before (its holder since then is that VM)
    replays the floating address from before the association, which the state keeps (_first_bound). Rebuilt
    in full (_port_guard and the reasons _update_under_locks returns): an event naming a port that an event
    naming no VM listed addresses with; the first binding of a port after an association the state no longer
    keeps; an association or a detach naming no VM with a port a deleted VM was bound to, unless a live VM
    bound it since; an event on a port older than a stored association or detach that read it; a floating IP
    whose address nothing names, or that names another address than before."""
    started = time.perf_counter()
    files = _new_event_files(lake, since)
    if files is None:
        return _full(lake, None, "event log of the last build expired")
    new = _read_events([e.path for e in files])
    if new.height == 0:
        return LeaseUpdate("incremental", seconds=round(time.perf_counter() - started, 3))
    try:
        update = _apply(lake, new, version, built)
    except StateChanged as exc:  # (the state's files changed under the update: rebuild from the events)
        update = str(exc)
    if isinstance(update, str):  # after the locks are released: the full rebuild takes them itself
        return _full(lake, None, update)
    update.seconds = round(time.perf_counter() - started, 3)
    return update


def _read_events(paths: list[Path]) -> pl.DataFrame:
    new = pl.from_arrow(
        pa.concat_tables(read_parquet_files(paths, VM_EVENTS)) if paths else VM_EVENTS.empty_table()
    )
    assert isinstance(new, pl.DataFrame)
    return new


def _apply(lake: Any, new: pl.DataFrame, version: int | None, built: int) -> LeaseUpdate | str:
    """_incremental's update of the leases of vm_leases version `built` by the events `new` (commits recording
    `version` of vm_events); or why it cannot, and a full rebuild must (returned before or after the locks)."""
    state = _load_state(lake, built)
    if state is None:
        return "no saved state of the last build (first update after an upgrade)"
    if _member(state.refused, _binding_hashes(_homes(new))).any():
        return "a VM's Nova event in the project of Neutron events that named the VM before: they bind it now"
    keys = _event_keys(new)
    if (_member(state.dropped, keys) | _member(state.dropped_recent, keys)).any():
        return "an event of the id of an event of the VM the saved state left out (_compacted)"
    new = _with_floating_addresses(_judged(lake, new, state), state.fips)
    fip = pl.col("action").is_in(list(_FLOATING_ACTIONS))
    neutron = (
        (fip & pl.col("addr").is_null())
        | (pl.col("resource_id").is_not_null() & ~fip)
        | ((pl.col("action") == "detach") & pl.col("vm_id").is_null() & pl.col("port_id").is_null())
        | _vmless_port_event()
    )
    if new.select(neutron.any()).item():
        return "Neutron events that name no VM or no floating address"
    reason = _port_guard(new, state)
    if reason is not None:
        return reason
    if _claims_before_a_stored_association(new, state):
        return "an address claimed at or before a floating-IP association that names it"
    if not _floating_in_order(new, state):
        return "a floating IP's events out of order, or naming another address than before"
    reclaim = load_reclaim_interval(lake)
    update: LeaseUpdate | str = "leases changed during the update"
    with lake.lock("vm_leases"), lake.lock("vms"):
        if lake.version("vm_leases") == built:
            update = _update_under_locks(lake, new, state, reclaim, version)
        elif _built_from(lake, version):
            update = LeaseUpdate()  # another update, or a rebuild, committed these events meanwhile
        # (else another update committed since we looked, from fewer events: in full)
    return update


def _built_from(lake: Any, version: int | None) -> bool:
    """Whether the latest vm_leases commit was built from vm_events `version` or a later one."""
    built = next(iter(lake.commit_infos("vm_leases")), {}).get("vm_events_version")
    return isinstance(built, int) and isinstance(version, int) and built >= version


def _judged(lake: Any, new: pl.DataFrame, state: _State) -> pl.DataFrame:
    """The new events as the full build judges them (_refused_bindings), so that the update and its state see
    the refused bindings as events of no VM: the projects of the VMs their Neutron events name come from the
    new events, the live VMs' stored ones and, for a VM no longer live, its events in the day partitions
    (_history). The keys of the refused ones join state.refused (their VM's first Nova event of that project
    is then a full rebuild, _apply)."""
    named = new.filter(_neutron_binding()).get_column("vm_id").unique()
    if not named.len():
        return new
    live = state.live.filter(pl.col("vm_id").is_in(named.implode()))
    context = [new.select(_JUDGED), live.select(_JUDGED)]
    settled = named.filter(~named.is_in(state.live_ids().implode()))
    settled = settled.filter(_is_known(state, settled))
    if settled.len():
        vm_columns = ["vm_id", "first_event_at", "created_at", "deleted_at", "last_event_at"]
        where = ("vm_id", settled.to_list())
        index = _index(lake, lake.entries("vms"), vm_columns, "vms", where, settled_only=True)
        context.append(_history(lake, new.head(0), settled, index, live.head(0)).select(_JUDGED))
    refused = _refused_bindings(new, _homes(pl.concat(context)))
    state.refused = _union(state.refused, _binding_hashes(refused))
    return _without_refused(new, refused)


def _update_under_locks(
    lake: Any, new: pl.DataFrame, state: _State, reclaim: dt.timedelta | None, version: int | None
) -> LeaseUpdate | str:
    """_incremental's reads, replay and commits (the caller holds the vm_leases and vms locks); or why the
    update cannot replay only what the new events touch (the new events reach back before what the lake holds
    for their addresses or VMs, ...): then a full rebuild."""
    lease_entries = lake.entries("vm_leases")
    vm_entries = lake.entries("vms")
    t0 = new.get_column("ts").min()
    vms0 = new.get_column("vm_id").drop_nulls().unique()
    lease_columns = ["addr", "vm_id", "valid_from", "valid_to"]
    vm_columns = ["vm_id", "first_event_at", "created_at", "deleted_at", "last_event_at"]
    live = state.live_ids()
    unseen = vms0.filter(~vms0.is_in(live.implode()))
    # a new association with a port, or a detach, naming no VM: every live VM bound to the port, whose events
    # say which one the port's was then (_port_guard sent one a deleted VM was bound to to a full rebuild); a
    # detach's release what they hold (`unbound_from`: their addresses are recomputed)
    binders = _bindings(state.live)
    read = new.filter(_port_read() | _vmless_detach()).get_column("port_id").unique()
    read_by = binders.filter(pl.col("port_id").is_in(read.implode())).get_column("vm_id").unique()
    detached = new.filter(_vmless_detach()).get_column("port_id").unique()
    unbound_from = pl.concat([binders, _bindings(new)]).filter(pl.col("port_id").is_in(detached.implode()))
    unbound_from = unbound_from.get_column("vm_id").unique()
    # (the VM id sets of the update are polars Series: a time slice of a full rebuild involves ~300,000 VMs,
    # whose ids in Python sets and lists cost ~5 s a year of slices to convert, measured)
    brand_new = unseen.filter(~_is_known(state, unseen))
    first = _first_bound(new, state, binders)
    if isinstance(first, str):
        return first
    # a VM of the new events that is neither live nor new is settled (a purge after the delete): then every
    # lease and VM row is read, as before this state existed
    maybe_settled = unseen.filter(~unseen.is_in(brand_new.implode())).to_list()
    if maybe_settled and len(
        _index(lake, vm_entries, vm_columns, "vms", ("vm_id", maybe_settled), settled_only=True)
    ):
        index = _index(lake, lease_entries, lease_columns)
        vm_index = _index(lake, vm_entries, vm_columns)
        addrs = _touched(new, index, pl.concat([vms0, unbound_from]), first)
    else:
        index = _index(lake, lease_entries, lease_columns, "vm_leases", ("addr", []))  # the hot files
        addrs = _touched(new, index, pl.concat([vms0, unbound_from]), first)
        index = _with_settled_runs(lake, state, index, lease_entries, addrs, t0)
        vm_index = None
    starts = _free_since(index, addrs, t0)
    if first.join(starts, on="addr").filter(pl.col("ts") < pl.col("free_from")).height:
        return "a port bound for the first time after a floating-IP association the update cannot replay"
    # the floating-IP events of no VM's own since b(A) (in no VM's history: the state keeps them); the fixed
    # address an association names is replayed too (its holder then may hold the floating IP): from before
    # the association, else the update is a full rebuild
    stored = (
        state.floating.join(starts, on="addr").filter(pl.col("ts") >= pl.col("free_from")).drop("free_from")
    )
    fixed = stored.filter(pl.col("action") == "fip_associate").select(pl.col("addrs").explode()).to_series()
    fixed = fixed.drop_nulls().unique()
    more = fixed.filter(~fixed.is_in(addrs.implode()))
    if more.len():
        addrs = pl.concat([addrs, more])
        if vm_index is None:
            index = _with_settled_runs(lake, state, index, lease_entries, more, t0)
        starts = _free_since(index, addrs, t0)
    stored = pl.concat(
        [
            stored,
            state.detaches.join(starts, left_on="_released", right_on="addr")
            .filter(pl.col("ts") >= pl.col("free_from"))
            .select(stored.columns)
            .unique(maintain_order=True),
        ]
    )
    # (an association with a port a live VM was bound to by then: the holder is the port's VM, whatever the
    # fixed address did; its binding is in the replay, as that VM holds the floating IP)
    associations = stored.filter(pl.col("action") == "fip_associate")
    by_port = _port_bound(associations, pl.concat([binders, _bindings(new)]))
    by_port = by_port.select(pl.coalesce("at_vm", "first_vm").is_not_null()).to_series()
    reread = (
        associations.filter(~by_port)
        .select("ts", pl.col("addrs").alias("addr"))
        .explode("addr")
        .join(starts, on="addr")
        .filter(pl.col("ts") < pl.col("free_from"))
    )
    if reread.height:
        return "a floating IP associated with a fixed address the update replays from after the association"
    # the VMs whose events can move a touched address after b(A): those of the new events, and every VM
    # that held it since (a claim that opened no lease, by a deleted VM or at the instant another VM
    # took the address, changes nothing)
    holders = index.join(starts, on="addr").filter(pl.col("valid_from") >= pl.col("free_from"))
    # (and a new association with a port (no VM named): every live VM bound to the port, whose events say
    # which one held it then (_port_guard sent one a deleted VM was bound to to a full rebuild))
    involved_vms = pl.concat([vms0, holders.get_column("vm_id"), read_by]).drop_nulls().unique().sort()
    if vm_index is None:  # the hot files, and of the settled ones the rows of involved VMs not live (rare)
        settled = ~involved_vms.is_in(live.implode()) & ~involved_vms.is_in(brand_new.implode())
        settled_ids = involved_vms.filter(settled).to_list()
        vm_index = _index(lake, vm_entries, vm_columns, "vms", ("vm_id", settled_ids))
    # in order = later than anything stored about these addresses and VMs: then no claim that opened no
    # lease before can open one now. A batch that reaches back before that is replayed in full instead
    latest = [
        holders.get_column("valid_from").max(),
        vm_index.filter(pl.col("vm_id").is_in(involved_vms.implode())).get_column("last_event_at").max(),
    ]
    if any(t is not None and t >= t0 for t in latest):
        return "events older than what the lake holds for their addresses or VMs"
    return _update_files(
        lake,
        new,
        stored,
        addrs,
        starts,
        involved_vms,
        vm_index,
        index,
        reclaim,
        version,
        lease_entries,
        vm_entries,
        state,
        ("port:" + first.get_column("port_id").unique()).to_list(),
    )


def _update_files(
    lake: Any,
    new: pl.DataFrame,
    stored: pl.DataFrame,
    addrs: pl.Series,
    starts: pl.DataFrame,
    involved_vms: pl.Series,
    vm_index: pl.DataFrame,
    index: pl.DataFrame,
    reclaim: dt.timedelta | None,
    version: int | None,
    lease_entries: list[Any],
    vm_entries: list[Any],
    state: _State,
    unbound_holders: list[str],
) -> LeaseUpdate | str:
    """The incremental update's replay and commits (the caller holds the vm_leases and vms locks), then the
    state of this build (_State) for the next update; or why it cannot (_update_under_locks).
    `unbound_holders`: the "port:<id>" holders of ports bound for the first time (_first_bound), whose every
    lease the replay recomputes: their vms rows go unless the replay gives them one again."""
    events = pl.concat(
        [_history(lake, new, involved_vms, vm_index, state.live), _with_extra(stored.select(new.columns))]
    )
    events = _without_refused(events, _refused_bindings(events))  # (a settled VM's, read as they landed)
    if _dropped_instant(events, index, addrs, state, new.get_column("ts").min()):
        return "an event at the instant of an event the saved state left out (_compacted) of its address's holder"
    if _listed_before_start(events, new, starts):
        return "a detach by port whose port listed an address before what the update replays of it"
    leases, vms = build_leases(_strip_before(events, starts).to_arrow(), reclaim)
    leases = pl.from_arrow(leases)
    vms = pl.from_arrow(vms)
    assert isinstance(leases, pl.DataFrame) and isinstance(vms, pl.DataFrame)
    leases = leases.filter(pl.col("addr").is_in(addrs.implode()))
    involved = vms.get_column("vm_id")
    # the lease rows replaced: those of the touched addresses from b(A) on
    replaced = index.join(starts, on="addr").filter(pl.col("valid_from") >= pl.col("free_from"))
    lease_files = _files_of(replaced, index, involved, lease_entries, "vm_leases")
    involved = pl.concat([involved, pl.Series("vm_id", unbound_holders, pl.String)]).unique()
    vm_files = _files_of(None, vm_index, involved, vm_entries, "vms")
    kept = _read_files(lease_entries, lease_files, VM_LEASES).join(
        replaced.select("addr", "valid_from", "vm_id"), on=["addr", "valid_from", "vm_id"], how="anti"
    )
    facts = vms.select(
        "vm_id",
        "vm_name",
        "project",
        "user",
        "cloud",
        pl.col("status").alias("vm_status"),
        "quarantine_until",
    )
    kept = (
        kept.join(facts, on="vm_id", how="left", suffix="_new")
        .with_columns(
            [
                pl.when(pl.col("vm_id").is_in(involved.implode()))
                .then(pl.col(f"{c}_new"))
                .otherwise(pl.col(c))
                .alias(c)
                for c in _VM_COLUMNS
            ]
        )
        .select([f.name for f in VM_LEASES])
    )
    # VMs a delete made vm_status "deleted" keep "deleted" in the rows just recomputed, as in a full build
    new_leases = pl.concat([kept, leases.select(kept.columns)]).to_arrow().cast(VM_LEASES)
    new_vms = (
        pl.concat(
            [
                _read_files(vm_entries, vm_files, VMS).filter(~pl.col("vm_id").is_in(involved.implode())),
                vms,
            ]
        )
        .to_arrow()
        .cast(VMS)
    )
    # the days to attribute again, per table: those holding a file of flows (lines) of the changed times, so
    # that attribution rewrites only those files (attribute_flows' spans) and each such day gets its commit
    # (days_left_to_attribute); and the days the commit before left (_left_behind). A lake of no such day (a
    # rebuild's staging lake) has no span to find: ~0.4 s a slice of a year's rebuild
    partition_days = _partition_days(lake)
    spans = (
        _changed_spans(
            replaced.select("addr", "vm_id", "valid_from", "valid_to").to_arrow(),
            leases.select("addr", "vm_id", "valid_from", "valid_to").to_arrow(),
        )
        if partition_days
        else pl.DataFrame(
            schema={"valid_from": pl.Datetime("us", "UTC"), "valid_to": pl.Datetime("us", "UTC")}
        )
    )
    candidates = days_of_spans(spans, partition_days)
    carried = _left_behind(lake)
    per_table = {
        name: days_meeting_spans(lake, name, column, spans, candidates & set(lake.days(name))) | carried[name]
        for name, column in (("flows", "ts_start"), ("vm_logs", "ts"))
    }
    days = per_table["flows"] | per_table["vm_logs"]
    staging = _is_staging(lake)
    if not staging:
        new_vms = keyed_vms(lake, new_vms, [vm_entries[i] for i in vm_files])
    lake.replace_files(
        "vms",
        [vm_entries[i] for i in vm_files],
        _chunks(new_vms, "vms"),
        {} if staging else lost_keys_info(lake, new_vms, [vm_entries[i] for i in vm_files]),
        ROW_GROUP_ROWS,
    )
    built = lake.replace_files(
        "vm_leases",
        [lease_entries[i] for i in lease_files],
        _chunks(new_leases, "vm_leases"),
        {
            "vm_events_version": version,
            "days": sorted(days),
            **{f"{name}_days": sorted(d) for name, d in per_table.items()},
            "incremental": True,
            VMS_COMPLETE: True,
        },
        ROW_GROUP_ROWS,
    )
    _save_state(lake, built, _next_state(state, new, events, involved_vms, vms, leases, addrs, starts))
    return LeaseUpdate(
        "incremental",
        days,
        events.height,
        new.height,
        starts.height,
        vms.height,
        spans=spans,
        spans_version=built,
    )


def _index(
    lake: Any,
    entries: list[Any],
    columns: list[str],
    name: str | None = None,
    where: tuple[str, list[str]] | None = None,
    settled_only: bool = False,
    skip: set[int] | None = None,
) -> pl.DataFrame:
    """Some columns of the files of a derived table, with the file's position in `entries`. With `where`
    (column, values): of the settled files (_is_settled_file) only the rows whose column is one of the values
    (and with `settled_only`, nothing of the other files): what the hourly update needs of the settled past,
    without reading it all. Files at the positions in `skip` are not read."""
    whole, filtered = [], []
    for i, e in enumerate(entries):
        if skip and i in skip:
            continue
        settled = where is not None and name is not None and _is_settled_file(e, name)
        if settled:
            filtered.append(i)
        elif not settled_only:
            whole.append(i)
    frames = []
    both = {**{f.name: f for f in VMS}, **{f.name: f for f in VM_LEASES}}
    schema = {
        c: pl.Datetime("us", "UTC") if pa.types.is_timestamp(both[c].type) else pl.String for c in columns
    }
    # one polars scan per kind (a reader per file costs more than the rows), the file's position from its path;
    # a column added to schema.py after a file was written (vms.first_event_at) reads as nulls there
    for positions, condition in (
        (whole, None),
        (filtered, None if where is None else pl.col(where[0]).is_in(where[1])),
    ):
        if not positions or (condition is not None and where is not None and not where[1]):
            continue
        position = {str(entries[i].path): i for i in positions}
        scan = pl.scan_parquet(
            list(position),
            hive_partitioning=False,
            glob=False,
            include_file_paths="_path",
            schema=schema,
            missing_columns="insert",
            extra_columns="ignore",
            cast_options=pl.ScanCastOptions(datetime_cast=["nanosecond-downcast", "convert-timezone"]),
        )
        if condition is not None:
            scan = scan.filter(condition)
        try:
            frame = scan.select(
                *columns, pl.col("_path").replace_strict(position, return_dtype=pl.Int32).alias("_file")
            ).collect()
        except pl.exceptions.SchemaError:  # (times of another unit or zone: a table another tool wrote)
            frame = _conformed_index(entries, positions, columns, condition)
        frames.append(frame)
    if not frames:
        return pl.DataFrame(schema={**schema, "_file": pl.Int32})
    return pl.concat(frames).with_columns(
        pl.col(c).cast(pl.Datetime("us", "UTC")) for c in columns if "valid" in c or c.endswith("_at")
    )


def _conformed_index(
    entries: list[Any], positions: list[int], columns: list[str], condition: pl.Expr | None
) -> pl.DataFrame:
    """_index's rows of files whose columns the typed scan refused (a time in ms, or in another zone: a table
    another tool wrote), each read and conformed to its declared schema (read_parquet_files) instead."""
    declared = VMS if all(c in VMS.names for c in columns) else VM_LEASES
    tables = read_parquet_files([entries[i].path for i in positions], declared)
    frames = []
    for i, table in zip(positions, tables, strict=True):
        frame = pl.from_arrow(table.select(columns))
        assert isinstance(frame, pl.DataFrame)
        frame = frame.with_columns(pl.lit(i, pl.Int32).alias("_file"))
        frames.append(frame if condition is None else frame.filter(condition))
    return pl.concat(frames)


def _lost_unbound_reads(before: pl.DataFrame, kept: pl.DataFrame, bound: pl.Series) -> pl.Series:
    """The ports of the associations naming no VM with a port nothing is bound to (`bound`: the ports with a
    binding) that are in `before` but leave the state (not in `kept`: their address's last run moved on).
    The port's first binding would change the lease such an association opened, which no update can replay
    any more: any event naming the port is a full rebuild from then on (state.ports)."""
    key = ["ts", "port_id", "addr", "resource_id"]
    reads = before.filter(_port_read() & ~pl.col("port_id").is_in(bound.implode())).select(key)
    lost = reads.join(kept.filter(_port_read()).select(key), on=key, how="anti", nulls_equal=True)
    return lost.get_column("port_id").unique()


def _first_bound(new: pl.DataFrame, state: _State, binders: pl.DataFrame) -> pl.DataFrame | str:
    """The stored associations naming no VM (state.floating) with a port the new events bind for the first
    time (no live or deleted VM was bound to it): the full build's holder of the floating IP from then on is
    that port's first VM, so their floating addresses are replayed from before them (_update_under_locks);
    or why the update cannot (an association no longer kept: its address's run ended since)."""
    bound = _bindings(new).get_column("port_id").unique()
    hashes = _id_hashes(bound)
    candidates = bound.filter(
        pl.Series(_member(state.unbound, hashes) | _member(state.unbound_recent, hashes))
        & pl.Series(_gone_since(state, hashes) == np.iinfo(np.int64).min)
    )
    firsts = candidates.filter(~candidates.is_in(binders.get_column("port_id").implode()))
    kept = state.floating.filter(_port_read() & pl.col("port_id").is_in(firsts.implode()))
    if firsts.filter(~firsts.is_in(kept.get_column("port_id").implode())).len():
        return "a port bound for the first time after a floating-IP association the update cannot replay"
    return kept.select("addr", pl.col("ts").cast(pl.Datetime("us", "UTC")), "port_id")


def _with_settled_runs(
    lake: Any, state: _State, index: pl.DataFrame, entries: list[Any], addrs: pl.Series, t0: dt.datetime
) -> pl.DataFrame:
    """index (the hot files' leases) with the rows of the addresses' last runs that are in settled files. Of
    the settled past, b(A) needs only A's last run of back-to-back leases (the state has it); the rows of it
    in settled files (a lease superseded or moved back to back) are read from those files (only a run still
    covering t0 matters: A held then, by an open lease or one ending at t0 or later)."""
    runs = state.runs.filter(pl.col("addr").is_in(addrs.implode()))
    t0_us = pl.lit(t0).cast(pl.Datetime("us", "UTC"))
    runs = runs.filter((pl.col("valid_to").is_null() | (pl.col("valid_to") >= t0_us)).any().over("addr"))
    settled_runs = runs.join(index, on=["addr", "valid_from", "vm_id"], how="anti")
    if not settled_runs.height:
        return index
    return pl.concat(
        [index, _settled_run_rows(lake, entries, ["addr", "vm_id", "valid_from", "valid_to"], settled_runs)]
    )


def _free_since(index: pl.DataFrame, addrs: pl.Series, t0: dt.datetime) -> pl.DataFrame:
    """addr -> free_from = b(A): the start of A's run of back-to-back leases that covers t0, else t0."""
    t0_col = pl.lit(t0).cast(pl.Datetime("us", "UTC"))
    leases = (
        index.filter(pl.col("addr").is_in(addrs.implode()))
        .select("addr", "valid_from", "valid_to")
        .sort("addr", "valid_from")
        .with_columns(
            # a run starts where the previous lease ended before this one began (or there was none)
            (
                pl.col("valid_to").shift(1).over("addr").is_null()
                & pl.col("valid_from").shift(1).over("addr").is_null()
                | (pl.col("valid_to").shift(1).over("addr") < pl.col("valid_from"))
            ).alias("_run_start")
        )
        .with_columns(
            pl.when("_run_start").then(pl.col("valid_from")).forward_fill().over("addr").alias("_run")
        )
    )
    covering = (
        leases.filter(
            (pl.col("valid_from") <= t0_col) & (pl.col("valid_to").is_null() | (pl.col("valid_to") >= t0_col))
        )
        .group_by("addr")
        .agg(pl.col("_run").min().alias("free_from"))
    )
    return (
        pl.DataFrame({"addr": addrs})
        .join(covering, on="addr", how="left")
        .with_columns(pl.coalesce("free_from", t0_col).alias("free_from"))
    )


def _history(
    lake: Any, new: pl.DataFrame, vms: pl.Series, vm_index: pl.DataFrame, live: pl.DataFrame
) -> pl.DataFrame:
    """The events an incremental update replays: the new ones, and every stored event of each VM involved:
    a live VM's from the saved state, a settled one's (rare) read from the day partitions it can be in (a day
    before its creation or its delete, whichever is first: events of a VM created after its delete, as a
    replay of notifications can give, count from the delete, to its last event)."""
    stored = live.filter(pl.col("vm_id").is_in(vms.implode()))
    vms = vms.filter(~vms.is_in(stored.get_column("vm_id").implode()))
    first = pl.min_horizontal("first_event_at", "created_at", "deleted_at", "last_event_at")
    days = (
        vm_index.filter(pl.col("vm_id").is_in(vms.implode()) & first.is_not_null())
        .select(
            pl.date_ranges(
                (first - pl.duration(days=1)).dt.date(), pl.coalesce("last_event_at", first).dt.date(), "1d"
            ).alias("day")
        )
        .get_column("day")
        .explode()
        .drop_nulls()
        .unique()
        .sort()
    )
    scanned = _scan_events(lake, days.dt.strftime("%Y-%m-%d").to_list(), vms)
    return pl.concat([_with_extra(new), _with_extra(stored), _with_extra(scanned)])


def _scan_events(lake: Any, days: list[str], vms: pl.Series) -> pl.DataFrame:
    """The events of `vms` in the partitions of `days`."""
    paths = [str(p) for p in lake.files("vm_events", days)]
    if not paths or not vms.len():
        return pl.from_arrow(VM_EVENTS.empty_table())  # type: ignore[return-value]
    # files written before a column was added to schema.py lack it: read as nulls (missing_columns)
    schema = pl.from_arrow(VM_EVENTS.empty_table()).schema  # type: ignore[union-attr]
    frame = (
        pl.scan_parquet(paths, hive_partitioning=False, glob=False, schema=schema, missing_columns="insert")
        .filter(pl.col("vm_id").is_in(vms.implode()))
        .collect()
    )
    frame = pl.from_arrow(conform(frame.to_arrow(), VM_EVENTS))
    assert isinstance(frame, pl.DataFrame)
    return frame


def _strip_before(events: pl.DataFrame, starts: pl.DataFrame) -> pl.DataFrame:
    """Events with each touched address A taken out of those before b(A) (nobody held A then); each with its
    tie-break key as it was (_TIE)."""
    b = dict(starts.select("addr", "free_from").iter_rows())
    events = events.with_columns(_tie_key().alias(_TIE)).with_row_index("_event")
    listed = (
        events.select("_event", "ts", pl.col("addrs").alias("a"))
        .explode("a")
        .join(starts.rename({"addr": "a"}), on="a", how="left")
        .filter(
            pl.col("a").is_not_null()
            & (pl.col("free_from").is_null() | (pl.col("ts") >= pl.col("free_from")))
        )
        .group_by("_event")
        .agg(pl.col("a").alias("_kept"))
    )
    single = pl.col("addr").replace_strict(b, default=None, return_dtype=pl.Datetime("us", "UTC"))
    events = events.join(listed, on="_event", how="left").with_columns(
        pl.when(pl.col("addrs").is_null())
        .then(None)
        .otherwise(pl.col("_kept").fill_null(pl.lit([], pl.List(pl.String))))
        .alias("addrs"),
        pl.when(single.is_not_null() & (pl.col("ts") < single))
        .then(None)
        .otherwise(pl.col("addr"))
        .alias("addr"),
    )
    return events.select([f.name for f in VM_EVENTS] + [_TIE])


def _files_of(
    replaced: pl.DataFrame | None, index: pl.DataFrame, involved: pl.Series, entries: list[Any], name: str
) -> list[int]:
    """Positions of the files holding rows to replace or rows of involved VMs, plus the newest file of rows
    that can change, and of the settled files not full yet: the newest while it is small (new settled rows go
    there; else they start a file of their own), or all of them once there are MERGE_FILES (merged into full
    files). So an hourly update rewrites at most SMALL_ROWS settled rows, a merge every few days FILE_ROWS,
    and files stay few."""
    files = set(index.filter(pl.col("vm_id").is_in(involved.implode())).get_column("_file").to_list())
    if replaced is not None:
        files |= set(replaced.get_column("_file").to_list())
    is_open = [not _is_settled_file(e, name) for e in entries]
    for want_open, column in ((True, _TIME_OF[name]), (False, _SETTLED_TIME[name])):
        candidates = [
            i
            for i, e in enumerate(entries)
            if is_open[i] == want_open
            and (want_open or (e.mins.get(_STATUS[name]) == "deleted" and e.rows < FILE_ROWS))
        ]
        if not want_open and len(candidates) >= MERGE_FILES:
            files.update(candidates)
        elif candidates:
            newest = max(candidates, key=lambda i: str(entries[i].maxs.get(column) or ""))
            if want_open or entries[newest].rows < SMALL_ROWS:
                files.add(newest)
    return sorted(files)


def _read_files(entries: list[Any], positions: list[int], schema: pa.Schema) -> pl.DataFrame:
    tables = read_parquet_files([entries[i].path for i in positions], schema)
    frame = pl.from_arrow(pa.concat_tables(tables) if tables else schema.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def _settled_run_rows(lake: Any, entries: list[Any], columns: list[str], rows: pl.DataFrame) -> pl.DataFrame:
    """`rows` (lease keys of settled files) with the columns of _index, read from the settled files whose
    valid_from range holds one of them (settled files are cut by valid_from: few)."""
    lows = rows.get_column("valid_from").min()
    highs = rows.get_column("valid_from").max()
    slack = dt.timedelta(milliseconds=1)  # (statistics may be kept at a coarser precision)
    skip = {
        i
        for i, e in enumerate(entries)
        if _is_settled_file(e, "vm_leases")
        and isinstance(e.mins.get("valid_from"), dt.datetime)
        and isinstance(e.maxs.get("valid_from"), dt.datetime)
        and (e.maxs["valid_from"] + slack < lows or e.mins["valid_from"] - slack > highs)
    }
    found = _index(
        lake,
        entries,
        columns,
        "vm_leases",
        ("addr", rows.get_column("addr").unique().to_list()),
        settled_only=True,
        skip=skip,
    )
    return found.join(
        rows.select("addr", "valid_from", "vm_id"), on=["addr", "valid_from", "vm_id"], how="semi"
    )


# ---- the hourly update's state -------------------------------------------------------------------------------
# What the incremental update needs of the past, kept beside the derived tables so that its reads do not grow
# with the history. A cache: derivable from vm_leases, vms and vm_events, valid only for the vm_leases version it
# is named after; missing, stale or unreadable, the update rebuilds in full (which writes it again).
#   live.parquet  every stored event of the VMs whose vms row can still change (not settled): an involved VM's
#                 replay reads them here, not from every day partition of its life (months for some);
#   known.npy     sorted 64-bit hashes of every vm_id in vms: whether a VM of the new events is new (no stored
#   recent.npy    history), live, or settled (rare: then read as before). The ids an update adds go to the small
#                 recent.npy; known.npy is hard-linked from the last state, rewritten only when recent.npy is
#                 merged in (at a sixteenth of it): an update writes a few kB of ids, not every id ever seen;
#   runs.parquet  each address's last run of back-to-back leases (addr, vm_id, valid_from, valid_to): all that
#                 b(A) (_free_since) needs of the settled past.
STATE_DIR = "_settings/lease_state"
_HASH_SEED = 18
_RUN_COLUMNS = ["addr", "vm_id", "valid_from", "valid_to"]
_FIPS_SCHEMA = {
    "key": pl.String,
    "addr": pl.String,
    "ts": pl.Datetime("us", "UTC"),
    "multi": pl.Boolean,
    "gone": pl.Boolean,  # a delete named the key: it leaves the state for the `fips_gone` hashes
}
_PORT_READS_SCHEMA = {"port_id": pl.String, "ts": pl.Datetime("us", "UTC"), "vm_id": pl.String}


def _fip_facts(events: pl.DataFrame) -> pl.DataFrame:
    """Of the floating-IP events among `events`: per key (the floating IP's id, else its address, as the replay
    keys them) the address it names (null: none yet), whether it ever named two, the time of its last event,
    and whether a delete named it."""
    fips = events.filter(pl.col("action").is_in(list(_FLOATING_ACTIONS))).select(
        pl.coalesce("resource_id", "addr").alias("key"),
        "addr",
        pl.col("ts").cast(pl.Datetime("us", "UTC")),
        "action",
    )
    keys = (
        fips.filter(pl.col("key").is_not_null())
        .group_by("key")
        .agg(
            pl.col("addr").drop_nulls().first().alias("addr"),
            pl.col("ts").max(),
            (pl.col("addr").drop_nulls().n_unique() > 1).alias("multi"),
            (pl.col("action") == "fip_delete").any().alias("gone"),
        )
    )
    return keys.select(list(_FIPS_SCHEMA)).cast(_FIPS_SCHEMA)


def _merge_fip_facts(state: pl.DataFrame, more: pl.DataFrame) -> pl.DataFrame:
    keys = (
        pl.concat([state, more])
        .group_by("key")
        .agg(
            pl.col("addr").drop_nulls().first(),
            pl.col("ts").max(),
            (pl.col("multi").any() | (pl.col("addr").drop_nulls().n_unique() > 1)).alias("multi"),
            pl.col("gone").any(),
        )
    )
    return keys.select(list(_FIPS_SCHEMA))


def _with_floating_addresses(events: pl.DataFrame, fips: pl.DataFrame) -> pl.DataFrame:
    """events with the address of each floating-IP event that names only its key (Neutron's
    floatingip.delete.start carries the id alone) filled in: the one address the key names, in `fips` (the
    state's floating IPs) or in the key's other events here. The full build's replay takes that address from
    the key's earlier events; filled in, the event releases the same address, and the update knows what it
    touches. A key naming two addresses (or none) is left as it is."""
    fip = pl.col("action").is_in(list(_FLOATING_ACTIONS))
    if not events.select((fip & pl.col("addr").is_null() & pl.col("resource_id").is_not_null()).any()).item():
        return events
    named = pl.concat(
        [
            fips.filter(pl.col("addr").is_not_null()).select(
                pl.col("key").alias("resource_id"), "addr", "multi"
            ),
            events.filter(fip & pl.col("addr").is_not_null() & pl.col("resource_id").is_not_null()).select(
                "resource_id", "addr", pl.lit(False).alias("multi")
            ),
        ]
    )
    one = (
        named.group_by("resource_id")
        .agg(pl.col("addr").first().alias("_one"), (pl.col("multi").any() | (pl.col("addr").n_unique() > 1)))
        .filter(~pl.col("multi"))
        .drop("multi")
    )
    return (
        events.join(one, on="resource_id", how="left", maintain_order="left")
        .with_columns(pl.when(fip).then(pl.coalesce("addr", "_one")).otherwise(pl.col("addr")).alias("addr"))
        .drop("_one")
    )


def _vmless_floating(events: pl.DataFrame) -> pl.DataFrame:
    """The floating-IP events of no VM's own (an association naming a port or fixed address, a disassociation,
    a delete): in no VM's history, so the state keeps them (_State.floating)."""
    return events.filter(pl.col("action").is_in(list(_FLOATING_ACTIONS)) & pl.col("vm_id").is_null())


def _kept(events: pl.DataFrame, runs: pl.DataFrame, addr: str = "addr") -> pl.DataFrame:
    """The events of no VM's own that an update can replay again: those at or after the start of the last
    run of back-to-back leases of their address (`addr`: the floating address; for a detach, each address it
    released). An in-order update replays an address from b(A) on, which is that start or later; the others
    never are. Bounded like the runs."""
    start = runs.group_by("addr").agg(pl.col("valid_from").min().alias("_run"))
    return (
        events.join(start, left_on=addr, right_on="addr")
        .filter(pl.col("ts") >= pl.col("_run"))
        .drop("_run")
        .unique(maintain_order=True)
    )


def _port_read() -> pl.Expr:
    """A floating IP associated with a port by no VM's own event: its holder is read from the port's history
    (the VM bound to it then, else the first ever bound: _port_vm)."""
    return (pl.col("action") == "fip_associate") & pl.col("vm_id").is_null() & pl.col("port_id").is_not_null()


def _vmless_port_event() -> pl.Expr:
    """An event naming a port and addresses but no VM, other than a floating IP's: what it lists with the port
    is in no VM's history (such an event is a full rebuild, and so is a later one naming the port). A port of
    no VM that lists nothing (Neutron's router and DHCP ports: neutron.py keeps their addresses out) does
    nothing in the replay: it updates incrementally."""
    floating = pl.col("action").is_in(list(_FLOATING_ACTIONS))
    lists = pl.col("addrs").is_not_null() | pl.col("addr").is_not_null()
    return pl.col("port_id").is_not_null() & pl.col("vm_id").is_null() & ~floating & lists


def _vmless_detach() -> pl.Expr:
    """A port deleted or unbound by an event naming no VM (Neutron's port.update with its device cleared): it
    releases what the port's VM then holds of the addresses its events listed with the port before."""
    return (pl.col("action") == "detach") & pl.col("vm_id").is_null() & pl.col("port_id").is_not_null()


def _listed_before_start(events: pl.DataFrame, new: pl.DataFrame, starts: pl.DataFrame) -> bool:
    """Whether a new detach that releases by port (no address named; no VM or no list: the replay's by-port
    detaches) names a port whose events listed a touched address A before b(A): _strip_before takes that
    listing out of the replay, so the detach would not release A from the VM that claims it again after b(A)
    (the full build does). Rare (a port deleted or unbound again after its address was freed and claimed
    anew); then the update is a full rebuild."""
    by_port = (
        (pl.col("action") == "detach")
        & pl.col("addr").is_null()
        & pl.col("port_id").is_not_null()
        & (pl.col("addrs").is_null() | pl.col("vm_id").is_null())
    )
    detaches = new.filter(by_port)
    if not detaches.height:
        return False
    ports = detaches.get_column("port_id").unique()
    listed = (
        events.filter(
            pl.col("port_id").is_in(ports.implode()) & ~pl.col("action").fill_null("").str.starts_with("fip_")
        )
        .select("ts", pl.col("addrs").alias("addr"))
        .explode("addr")
        .join(starts.select("addr", "free_from"), on="addr")
        .filter(pl.col("ts") < pl.col("free_from"))
    )
    if not listed.height:
        return False
    # (only when the replay claims such an address again from b(A) up to the last of these detaches: else the
    # listing has nothing left to release, as when the port's address was freed before and stays free)
    last = detaches.get_column("ts").max()
    claimed = (
        events.filter(~pl.col("action").fill_null("").str.starts_with("fip_") & (pl.col("ts") <= last))
        .select("ts", pl.concat_list(pl.col("addrs").fill_null([]), pl.col("addr")).alias("addr"))
        .explode("addr")
        .join(listed.select("addr", "free_from").unique(), on="addr")
        .filter(pl.col("ts") >= pl.col("free_from"))
    )
    return bool(claimed.height)


def _port_bound(rows: pl.DataFrame, bindings: pl.DataFrame) -> pl.DataFrame:
    """For rows (port_id, ts), in their order: (ts, the VM bound to the port then: `at_vm`, its first binding
    ever: `first_ts`, `first_vm`), as _port_vm reads them (its holder: at_vm, else first_vm)."""
    keyed = rows.select("port_id", pl.col("ts").cast(pl.Datetime("us", "UTC"))).with_row_index("_r")
    bindings = bindings.sort("port_id", "ts", "vm_id")
    at = keyed.sort("ts").join_asof(
        bindings.sort("ts").rename({"vm_id": "at_vm"}),
        on="ts",
        by="port_id",
        strategy="backward",
        check_sortedness=False,
    )
    first = bindings.group_by("port_id").agg(
        pl.col("ts").first().alias("first_ts"), pl.col("vm_id").first().alias("first_vm")
    )
    return at.join(first, on="port_id", how="left").sort("_r").drop("_r")


def _port_holder(rows: pl.DataFrame, bindings: pl.DataFrame) -> pl.Series:
    """For rows (port_id, ts), in their order: the VM bound to the port then, else the first ever bound
    (null: none), as _port_vm."""
    return _port_bound(rows, bindings).select(pl.coalesce("at_vm", "first_vm").alias("vm_id")).to_series()


def _released_by_detaches(
    detaches: pl.DataFrame, bindings: pl.DataFrame, leases: pl.DataFrame
) -> pl.DataFrame:
    """The vm-less detaches (schema.VM_EVENTS rows), one row per address each released (`_released`: a lease
    of the port's VM then that the detach ended, in `leases`); those that released nothing are left out (a
    later replay could only release what it did, as the port's VM is then involved: see _update_under_locks)."""
    if not detaches.height:
        return detaches.with_columns(pl.lit(None, pl.String).alias("_released")).head(0)
    need = detaches.with_columns(
        _port_holder(detaches, bindings).alias("_need"),
        pl.col("ts").cast(pl.Datetime("us", "UTC")).alias("_ts"),
    )
    ended = leases.filter(pl.col("end_reason") == "detach").select(
        pl.col("vm_id").alias("_need"),
        pl.col("valid_to").cast(pl.Datetime("us", "UTC")).alias("_ts"),
        pl.col("addr").alias("_released"),
    )
    return need.join(ended, on=["_need", "_ts"]).drop("_need", "_ts")


def _bindings(events: pl.DataFrame) -> pl.DataFrame:
    """(port_id, ts, vm_id) of the events that bind a port to a VM, as _port_maps reads them."""
    return events.filter(
        pl.col("port_id").is_not_null()
        & pl.col("vm_id").is_not_null()
        & ~pl.col("action").fill_null("").str.starts_with("fip_")
    ).select("port_id", pl.col("ts").cast(pl.Datetime("us", "UTC")), "vm_id")


def _port_reads(reads: pl.DataFrame, bindings: pl.DataFrame) -> tuple[pl.DataFrame, pl.Series]:
    """Associations and detaches naming a port and no VM (`reads`: port_id, ts) against the ports' bindings ->
    (per port the latest time a binding event can matter to them, `ts`: the read's own when a binding at or
    before it decides the port's VM, else the first binding's; and the VM of that binding; the ports bound by
    nothing yet). A later event on the port changes none of them (a detach releases what its VM listed with the
    port before it); an earlier one, or the first binding of an unbound port, can."""
    reads = reads.select("port_id", pl.col("ts").cast(pl.Datetime("us", "UTC"))).drop_nulls()
    empty = pl.DataFrame(schema=_PORT_READS_SCHEMA)
    if not reads.height:
        return empty, pl.Series("port_id", [], pl.String)
    resolved = _port_bound(reads, bindings).select(
        "port_id",
        pl.when(pl.col("at_vm").is_not_null()).then(pl.col("ts")).otherwise(pl.col("first_ts")).alias("ts"),
        pl.coalesce("at_vm", "first_vm").alias("vm_id"),
    )
    unbound = resolved.filter(pl.col("ts").is_null()).get_column("port_id").unique()
    return _merge_port_reads(empty, resolved.filter(pl.col("ts").is_not_null())), unbound


def _unbound_detaches(unbound: pl.Series, events: pl.DataFrame) -> pl.DataFrame:
    """port_reads rows (vm_id null) of the detaches naming no VM among `events` of the ports bound to no VM yet
    (`unbound`, _port_reads): such a detach releases nothing, but a binding of its port as old as it or older,
    landing later, is one it releases (at one instant the replay's order can put the detach last): an event on
    the port up to the detach's time is then a full rebuild (_port_guard). One row a port deleted or unbound
    while no VM was bound to it (a router's, a DHCP server's, one never used), kept as long as the state."""
    return (
        events.filter(_vmless_detach() & pl.col("port_id").is_in(unbound.implode()))
        .group_by("port_id")
        .agg(pl.col("ts").cast(pl.Datetime("us", "UTC")).max())
        .select("port_id", "ts", pl.lit(None, pl.String).alias("vm_id"))
    )


def _merge_port_reads(state: pl.DataFrame, more: pl.DataFrame) -> pl.DataFrame:
    return (
        pl.concat([state, more.select(list(_PORT_READS_SCHEMA)).cast(_PORT_READS_SCHEMA)])
        .sort("ts", "vm_id")
        .group_by("port_id")
        .agg(pl.col("ts").last(), pl.col("vm_id").last())
        .select(list(_PORT_READS_SCHEMA))
    )


def _port_guard(new: pl.DataFrame, state: _State) -> str | None:
    """Why the new events that bind a port or read its history cannot be replayed without that history (the
    update is then a full rebuild), else None: an event naming a port that an event naming no VM listed
    addresses with (what a detach by port releases can be that listing, in no VM's history); an association
    or a detach naming no VM with a port a deleted VM was bound to, unless a live VM bound it since (the
    deleted VM's binding is in no live VM's history); an event on a port older than a stored association or
    detach naming no VM that read the port (it could change the VM bound to it then, or what it listed)."""
    reads = new.filter(_port_read() | _vmless_detach())
    binds = new.filter(pl.col("port_id").is_not_null() & ~pl.col("action").is_in(list(_FLOATING_ACTIONS)))
    named = _id_hashes(pl.concat([binds.get_column("port_id"), reads.get_column("port_id")]).unique())
    if (_member(state.ports, named) | _member(state.ports_recent, named)).any():
        return (
            "a port that an event naming no VM listed addresses with, or that a floating IP was associated with"
            " before any VM was bound to it and the update can no longer replay"
        )
    # a read of a port a VM no longer live was bound to: its VM then is a live VM's only when one bound it
    # after that VM's last binding (the replay has the live VMs' bindings, not the others')
    gone = reads.select("port_id", pl.col("ts").dt.epoch("us").alias("_t")).with_columns(
        pl.Series("_gone", _gone_since(state, _id_hashes(reads.get_column("port_id"))))
    )
    gone = gone.filter(pl.col("_gone") > np.iinfo(np.int64).min).with_row_index("_r")
    if gone.height:
        live = pl.concat([_bindings(state.live), _bindings(new)]).select(
            "port_id", pl.col("ts").dt.epoch("us").alias("_b")
        )
        rebound = gone.join(live, on="port_id").filter(
            (pl.col("_b") > pl.col("_gone")) & (pl.col("_b") <= pl.col("_t"))
        )
        if rebound.get_column("_r").n_unique() < gone.height:
            return (
                "a floating IP associated with, or a detach naming no VM of, a port a deleted VM was bound to"
            )
    late = (
        binds.select("port_id", pl.col("ts").cast(pl.Datetime("us", "UTC")))
        .join(state.port_reads, on="port_id", suffix="_read")
        .filter(pl.col("ts") <= pl.col("ts_read"))
    )
    if late.height:
        return "an event on a port older than an association or a detach naming no VM that read it"
    if state.reads_gone_until is not None:
        hashes = _id_hashes(binds.filter(pl.col("ts") <= state.reads_gone_until).get_column("port_id"))
        if (_member(state.ports_gone, hashes) | _member(state.ports_gone_recent, hashes)).any():
            return "an event on a port older than an association or a detach naming no VM that read it"
    return None


def _claims_before_a_stored_association(new: pl.DataFrame, state: _State) -> bool:
    """Whether a new event lists an address at or before the time of a stored association (state.floating)
    that names it as its fixed address: the association's holder can be that address's holder then, which the
    update would not replay (found by the random histories: a VM created at the instant of an association with
    a port nothing was bound to)."""
    named = state.floating.filter(pl.col("action") == "fip_associate").select(
        pl.col("ts").cast(pl.Datetime("us", "UTC")).alias("_assoc"), pl.col("addrs").alias("addr")
    )
    named = named.explode("addr").drop_nulls("addr")
    if not named.height:
        return False
    listed = pl.concat(
        [
            new.select("ts", pl.col("addrs").alias("addr")).explode("addr"),
            new.filter(~pl.col("action").is_in(list(_FLOATING_ACTIONS))).select("ts", "addr"),
        ]
    ).drop_nulls("addr")
    listed = listed.with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
    return listed.join(named, on="addr").filter(pl.col("ts") <= pl.col("_assoc")).height > 0


def _floating_in_order(new: pl.DataFrame, state: _State) -> bool:
    """Whether the new floating-IP events can be replayed without their keys' earlier events: each key names
    one address, the one its earlier events named (the replay takes an event's address from its own `addr`; a
    change of address would release the previous one, which only the key's history knows), and every
    earlier event of the key is older than the new ones; a key deleted before (the state keeps its hash only)
    is replayed in full."""
    keys = _fip_facts(new)
    if not keys.height:
        return True
    if keys.get_column("multi").any():
        return False
    gone = _id_hashes(keys.get_column("key"))
    if (_member(state.fips_gone, gone) | _member(state.fips_gone_recent, gone)).any():
        return False  # a key deleted before (its history left the state)
    t0 = new.get_column("ts").min()
    old = keys.join(state.fips, on="key", suffix="_old")
    return not old.filter(
        pl.col("multi_old")
        | (pl.col("ts_old") >= pl.lit(t0).cast(pl.Datetime("us", "UTC")))
        | (
            pl.col("addr_old").is_not_null()
            & pl.col("addr").is_not_null()
            & (pl.col("addr_old") != pl.col("addr"))
        )
    ).height


@dataclass
class _State:
    live: pl.DataFrame  # rows of schema.VM_EVENTS + _LIVE_EXTRA: the live VMs' events _compacted keeps
    known: np.ndarray | _HashFile  # sorted uint64
    runs: pl.DataFrame  # _RUN_COLUMNS
    recent: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # sorted uint64
    known_file: Path | None = None  # where `known` was read from (linked into the next state unchanged)
    # sorted uint64 hashes of the ports an event naming no VM listed addresses with (what a detach by port
    # releases can be that listing, which no VM's history holds), and of the ports still bound by nothing whose
    # association left `floating` (_lost_unbound_reads): any event naming them is a full rebuild (_port_guard)
    ports: np.ndarray | _HashFile = field(default_factory=lambda: np.zeros(0, np.uint64))
    ports_file: Path | None = None  # where `ports` was read from (linked into the next state unchanged)
    ports_recent: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # added since: sorted
    # sorted uint64 hashes of the ports a floating IP was associated with (by an event naming no VM) before any
    # VM was bound to them: the first binding decides who held it since (_first_bound)
    unbound: np.ndarray | _HashFile = field(default_factory=lambda: np.zeros(0, np.uint64))
    unbound_file: Path | None = None
    unbound_recent: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    # floating IPs (_fip_facts): per key its address and last event
    fips: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=_FIPS_SCHEMA))
    # the floating-IP events of no VM's own that an update can replay again (_kept): schema.VM_EVENTS
    floating: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=_state_schemas()[0]))
    # the detaches naming no VM that an update can replay again, one row per address each released
    # (_released_by_detaches; kept like `floating`, by the released address's last run)
    detaches: pl.DataFrame = field(
        default_factory=lambda: pl.DataFrame(schema={**_state_schemas()[0], "_released": pl.String})
    )
    # per port that vm-less associations and detaches read: until when an event on it can change them (vm_id
    # null: a detach that found no VM bound to the port, _unbound_detaches)
    port_reads: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=_PORT_READS_SCHEMA))
    # sorted uint64 hashes of the ports that VMs no longer live were bound to (their bindings left the state),
    # and beside each (`_ts`, int64 µs) the latest of those bindings: a later binding by a live VM decides
    # the port's VM from then on (_port_guard)
    # (read by page like `known`: a Neutron site adds a port a VM, 3 M a year; the times then by the same pages)
    ports_gone: np.ndarray | _HashFile = field(default_factory=lambda: np.zeros(0, np.uint64))
    ports_gone_file: Path | None = None
    ports_gone_recent: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    ports_gone_ts: np.ndarray | _HashFile = field(default_factory=lambda: np.zeros(0, np.int64))
    ports_gone_recent_ts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # hashes of the floating-IP keys deleted (their rows left `fips`: it holds the floating IPs that exist)
    fips_gone: np.ndarray | _HashFile = field(default_factory=lambda: np.zeros(0, np.uint64))
    fips_gone_file: Path | None = None
    fips_gone_recent: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    # the latest `port_reads` time of the rows left out since their VM is no longer live (their ports are in
    # ports_gone): an event on such a port up to then is a full rebuild (one time instead of a row per port)
    reads_gone_until: dt.datetime | None = None
    # sorted uint64 hashes of (vm_id, project, cloud) of the Neutron events that named a VM not theirs
    # (_refused_bindings): a Nova event that later gives the VM that project makes them bind it (_apply)
    refused: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    # sorted uint64 hashes of (vm_id, event_id) and of (vm_id, ts) of the events _compacted dropped from `live`:
    # a new event of one of those ids is a full rebuild (the replay keeps the first event of an id, which the
    # update would lack), and so is another VM's event naming the VM's address at one of those instants
    # (_dropped_instant). Read by page, like `known`
    dropped: np.ndarray | _HashFile = field(default_factory=lambda: np.zeros(0, np.uint64))
    dropped_file: Path | None = None
    dropped_recent: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    def live_ids(self) -> pl.Series:
        return self.live.get_column("vm_id").unique()


# ---- a live VM's stored events, compacted ---------------------------------------------------------------------
# The state keeps a live VM's events for the replay of its next ones (_history). A VM that sends millions of
# notifications that change nothing (a reboot loop: power_off / power_on / reboot listing the same addresses)
# would make every update read, replay and rewrite them all. So only the events a replay of later events can
# still depend on are kept (_compacted): an event whose every fact is decided by another kept event (the first
# and last event, the latest value of each identity column, the last status, the last restore and the first soft
# delete after it, the first hypervisor and every change of it, one Nova event per project and cloud (the VM's
# homes, _refused_bindings), every create, delete, port, floating-IP, attach and detach event) and whose every
# claim is a repeat (the VM held that address, of that kind, from before the event until after it, in the
# replay's leases) changes nothing in any replay of the history with later events added (an update replays
# events later than everything stored of its VMs: _update_under_locks; else it is a full rebuild).
# Two things of other VMs could still make a dropped event count, and are guarded:
#   * another VM's event at the same instant naming addresses: then the VM's events of that instant are kept
#     for good (`_pinned`; judged among the events the build or update sees);
#   * such an event the judging update did not see. It always sees it: one landed before is in the replay (the
#     address's holders since b(A) are, and a claim at the instant the VM claims again makes the other VM a
#     holder unless it landed with it), one landing later names an address the VM held then (a full rebuild).
#     Should that reasoning miss a case, the state keeps a hash of (VM, instant) of every event it dropped, and
#     an update whose replay holds another VM's event naming an address at such an instant of the address's
#     holder is a full rebuild (_dropped_instant), which judges with every event and pins them.
# The state also keeps a hash of (VM, event id) of every event dropped: a later event of that id is a duplicate
# of the dropped one, which the replay keeps (the first of an id): a full rebuild (_apply). The hashes grow
# with the events dropped (16 bytes each), read by page like the known VM ids (_HashFile).
_LIVE_EXTRA = {"_pinned": pl.Boolean}
# actions an event of which is never dropped (they are few per VM, and each decides something on its own)
_KEPT_ACTIONS = sorted({"create", *_DELETES, "detach", "attach", "port_update", *_FLOATING_ACTIONS})


def _with_extra(events: pl.DataFrame) -> pl.DataFrame:
    """events (schema.VM_EVENTS) with the _LIVE_EXTRA columns, null where missing (not judged yet)."""
    missing = [
        pl.lit(None, kind).alias(name) for name, kind in _LIVE_EXTRA.items() if name not in events.columns
    ]
    return events.with_columns(missing) if missing else events


_ADDRESSED = ["ts", "vm_id", "addrs", "addr"]


def _event_keys(events: pl.DataFrame) -> np.ndarray:
    """hashes of (vm_id, event_id) of the events with an id (the replay's key of one event, _replay_order)."""
    keyed = events.filter(pl.col("event_id").is_not_null() & pl.col("vm_id").is_not_null())
    key = pl.struct(pl.col("vm_id").cast(pl.String), pl.col("event_id").cast(pl.String))
    return keyed.select(key.hash(_HASH_SEED)).to_series().to_numpy()


def _instant_keys(events: pl.DataFrame) -> np.ndarray:
    """hashes of (vm_id, ts as µs) of the events: the instants _compacted dropped an event of a VM at."""
    key = pl.struct(pl.col("vm_id").cast(pl.String), pl.col("ts").dt.epoch("us"))
    return events.select(key.hash(_HASH_SEED)).to_series().to_numpy()


def _shared_ports(bindings: pl.DataFrame) -> pl.Series:
    """The ports of `bindings` (_bindings) that more than one VM was bound to."""
    per_port = bindings.group_by("port_id").agg(pl.col("vm_id").n_unique().alias("_vms"))
    return per_port.filter(pl.col("_vms") > 1).get_column("port_id")


def _addressed(events: pl.DataFrame) -> pl.DataFrame:
    """(ts, vm_id) of the events naming an address (a list or one), distinct."""
    names = (pl.col("addrs").list.len() > 0).fill_null(False) | pl.col("addr").is_not_null()
    return events.filter(names).select(pl.col("ts").cast(pl.Datetime("us", "UTC")), "vm_id").unique()


def _compacted(
    live: pl.DataFrame,
    leases: pl.DataFrame,
    addressed: pl.DataFrame,
    floating: pl.Series,
    shared: pl.Series,
    starts: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, np.ndarray]:
    """The events of live VMs (schema.VM_EVENTS + _LIVE_EXTRA) that the state keeps (see above), with their
    `_pinned`; and the sorted hashes of the dropped ones (_event_keys and _instant_keys). `leases`: (addr,
    vm_id, addr_kind, valid_from, valid_to) of the replay that judged them; `addressed`: _addressed of every
    event it saw; `floating`: the addresses its floating-IP events name; `shared`: the ports another VM was
    bound to (a VM's binding of a port of its own only: _port_vm). `starts` (an update: addr, free_from): a
    claim is judged only for those addresses, from free_from on (the update's leases are those); else (a full
    build) for every address."""
    if not live.height:
        return _with_extra(live), np.zeros(0, np.uint64)
    ts = pl.col("ts").cast(pl.Datetime("us", "UTC"))
    # each VM's events in time order, in the columns the facts need (which identity columns an event names,
    # not their text: a sort moves every column); `_g` numbers the VMs (the aggregates below per VM: a
    # group-by on it, gathered back, instead of a window per fact)
    narrow = [
        "vm_id",
        "ts",
        "event_type",
        "action",
        "state",
        "hypervisor",
        "port_id",
        "resource_id",
        "addr",
        "addrs",
        "addr_kind",
        "event_id",
        "project",
        "cloud",
        "_pinned",
    ]
    named = [pl.col(c).is_not_null().alias(f"_has{c}") for c in _IDENTITY]
    everything = _with_extra(live).with_row_index("_r")
    frame = everything.select("_r", *narrow, *named).with_columns(ts.alias("_t"))
    frame = frame.sort("vm_id", "_t", "_r").with_columns(pl.col("vm_id").rle_id().alias("_g"))
    # a delivery of an event twice (the same content, so the same instant): the replay keeps one, so does the state
    same = (pl.col("_g") == pl.col("_g").shift(1)) & pl.col("_t").eq_missing(pl.col("_t").shift(1))
    tie = (same | same.shift(-1)).fill_null(False)
    ties = frame.filter(tie)
    if ties.height:
        content = pl.struct([c if c != "addrs" else pl.col("addrs").list.join(",") for c in _CONTENT])
        ties = everything.join(ties.select("_r"), on="_r", how="semi").sort("vm_id", "ts", "_r")
        twice = ties.filter(~content.is_first_distinct()).get_column("_r")
        frame = frame.filter(~pl.col("_r").is_in(twice.implode()))
    # pinned: another VM's event (or one of no VM) at the same instant names an address: two entries of
    # `addressed` at that instant, as the VM's own event there is one (an event naming no address claims
    # nothing: its pin would not matter)
    crowded = addressed.filter(pl.col("ts").is_duplicated()).get_column("ts")
    frame = frame.with_columns(
        pl.coalesce("_pinned", pl.col("_t").is_in(crowded.implode()).fill_null(False)).alias("_pinned"),
        tie.alias("_tie"),
    )
    passive = pl.col("event_type").str.ends_with(".start") | pl.col("event_type").str.ends_with(".error")
    passive = passive.fill_null(False)
    act = pl.col("action").fill_null("unknown")
    applicable = ~passive & ~act.is_in([*_FLOATING_ACTIONS, *_DELETES, "detach"])
    foreign_kind = act.is_in(["port_update", "fip_associate"])  # (the VM's facts prefer its own events)
    hyp = pl.col("hypervisor")
    status = applicable & (
        act.is_in(["soft_delete", "restore", *_DEFAULT_STATUS])
        | (pl.col("state").is_not_null() & (pl.col("state") != "unknown"))
    )
    soft = applicable & (act == "soft_delete")
    strong = applicable & (act != "port_update") & hyp.is_not_null()
    weak = passive & ~act.is_in([*_FLOATING_ACTIONS, "port_update"]) & hyp.is_not_null()
    nova = pl.col("event_type").str.starts_with("instance.").fill_null(False)
    ported = pl.col("port_id").is_not_null()
    # per VM: the time of the event deciding each fact (the latest or the earliest of those that can)
    t = pl.col("_t")
    deciders = {
        "_first": t.min(),
        "_last": t.max(),
        **{f"_{c}": t.filter(pl.col(f"_has{c}") & ~foreign_kind).max() for c in _IDENTITY},
        "_status": t.filter(status).max(),
        "_restore": t.filter(applicable & (act == "restore")).max(),
        "_weak": t.filter(weak).min(),
    }
    # (a VM whose events list addresses of two kinds: a claim of one sets the kind the next release must name,
    # so none of its claims is left out)
    listing = applicable & (pl.col("addrs").list.len() > 0).fill_null(False)
    kinds = pl.col("addr_kind").fill_null("fixed").filter(listing).n_unique().alias("_kinds")
    per_vm = frame.group_by("_g").agg(kinds, **deciders).sort("_g")
    frame = frame.with_columns(
        per_vm.get_column(c).gather(frame.get_column("_g")) for c in ("_kinds", *deciders)
    )
    after_restore = pl.col("_restore").is_null() | (t >= pl.col("_restore"))
    strictly_after = pl.col("_restore").is_null() | (t > pl.col("_restore"))
    firsts = (
        frame.filter(soft)
        .group_by("_g")
        .agg(
            t.filter(after_restore).min().alias("_soft"), t.filter(strictly_after).min().alias("_soft_after")
        )
    )
    frame = frame.join(firsts, on="_g", how="left", maintain_order="left")
    # the hypervisor before each event: the last one an earlier event of the VM moved it to
    last_strong = pl.when(strong).then(hyp).forward_fill().shift(1)
    of_vm = pl.when(strong).then(pl.col("_g")).forward_fill().shift(1) == pl.col("_g")
    before = pl.when(of_vm).then(last_strong)
    keep = [
        pl.col("_pinned"),
        pl.col("_t").is_null() | pl.col("vm_id").is_null(),
        pl.col("resource_id").is_not_null() | pl.col("addr").is_not_null(),
        # a port (Nova names the port of a VM of one NIC): the VM's binding of it, and what it lists with it
        # (_port_maps), are its first binding with each list of addresses and its last binding
        pl.col("port_id").is_in(shared.implode()),
        ported & pl.struct("_g", "port_id", "addrs").is_first_distinct(),
        ported & pl.struct("_g", "port_id").is_last_distinct(),
        act.is_in(_KEPT_ACTIONS) | pl.col("action").is_null(),
        pl.col("_tie"),  # (events of one instant: their order is the replay's, not ours)
        listing & (pl.col("_kinds") > 1),
        pl.col("event_id").is_not_null() & pl.struct("_g", "event_id").is_duplicated(),  # (the first counts)
        *(t == pl.col(c) for c in deciders),
        t == pl.col("_soft"),
        t == pl.col("_soft_after"),
        strong & (before.is_null() | (before != hyp)),
        nova & pl.struct("_g", "project", "cloud", nova).is_first_distinct(),
    ]
    frame = frame.with_columns(pl.any_horizontal([k.fill_null(False) for k in keep]).alias("_keep"))
    # claims: each address an applicable event lists, held by the VM (of that kind) from before it to after it
    claims = (
        frame.filter(~pl.col("_keep") & applicable)
        .select(
            "_r",
            "vm_id",
            "_t",
            pl.col("addr_kind").fill_null("fixed").alias("_kind"),
            pl.col("addrs").alias("addr"),
        )
        .explode("addr")
        .filter(pl.col("addr").is_not_null())
    )
    held = leases.select(
        "addr",
        "vm_id",
        pl.col("addr_kind").fill_null("fixed").alias("_lease_kind"),
        pl.col("valid_from").cast(pl.Datetime("us", "UTC")).alias("_t"),
        pl.col("valid_to").cast(pl.Datetime("us", "UTC")).alias("_to"),
    ).sort("_t")
    found = claims.sort("_t").join_asof(
        held,
        on="_t",
        by=["vm_id", "addr"],
        strategy="backward",
        allow_exact_matches=False,
        check_sortedness=False,
    )
    repeat = (
        (pl.col("_lease_kind") == pl.col("_kind"))
        & (pl.col("_to").is_null() | (pl.col("_to") > pl.col("_t")))
        & ~pl.col("addr").is_in(floating.implode())
    )
    if starts is not None:
        found = found.join(starts.select("addr", "free_from"), on="addr", how="left")
        repeat = repeat & (pl.col("_t") >= pl.col("free_from"))
    changed = found.filter(~repeat.fill_null(False)).get_column("_r").unique()
    frame = frame.with_columns((pl.col("_keep") | pl.col("_r").is_in(changed.implode())).alias("_keep"))
    dropped = frame.filter(~pl.col("_keep"))
    keys = sorted_unique(np.concatenate([_event_keys(dropped), _instant_keys(dropped)]))
    kept = frame.filter("_keep").sort("_r")
    rows = kept.get_column("_r").cast(pl.Int64).to_numpy()
    mask = np.zeros(everything.height, bool)
    mask[rows] = True
    kept = everything.filter(pl.Series(mask)).with_columns(kept.get_column("_pinned"))
    return kept.select([*live.columns, *(c for c in _LIVE_EXTRA if c not in live.columns)]), keys


def _dropped_instant(
    events: pl.DataFrame, index: pl.DataFrame, addrs: pl.Series, state: _State, t0: dt.datetime
) -> bool:
    """Whether an event of the replay names a touched address at an instant the address's holder then (in
    `index`, the lease rows) had an event _compacted dropped: that event may have been the holder's claim after
    this one (the address taken for no time, _rejoined), which the update then lacks. Only the events before
    the update's first (`t0`) can: the holders' stored events are older (_update_under_locks)."""
    events = events.filter(pl.col("ts") < pl.lit(t0).cast(pl.Datetime("us", "UTC")))
    named = pl.concat(
        [
            events.select("vm_id", "ts", pl.col("addrs").alias("addr")).explode("addr"),
            events.select("vm_id", "ts", "addr"),
        ]
    ).filter(pl.col("addr").is_in(addrs.implode()))
    named = named.select(pl.col("vm_id").alias("_by"), pl.col("ts").cast(pl.Datetime("us", "UTC")), "addr")
    holders = index.select("addr", "vm_id", "valid_from", "valid_to")
    crossed = named.join(holders, on="addr").filter(
        (pl.col("_by").is_null() | (pl.col("_by") != pl.col("vm_id")))
        & (pl.col("valid_from") <= pl.col("ts"))
        & (pl.col("valid_to").is_null() | (pl.col("valid_to") >= pl.col("ts")))
    )
    if not crossed.height:
        return False
    keys = _instant_keys(crossed.select("vm_id", "ts").unique())
    return bool((_member(state.dropped, keys) | _member(state.dropped_recent, keys)).any())


def _id_hashes(ids: pl.Series) -> np.ndarray:
    return ids.cast(pl.String).hash(_HASH_SEED).to_numpy()


def _member(sorted_hashes: np.ndarray | _HashFile, hashes: np.ndarray) -> np.ndarray:
    if isinstance(sorted_hashes, _HashFile):
        return sorted_hashes.member(hashes)
    if not len(sorted_hashes):
        return np.zeros(len(hashes), bool)
    at = np.minimum(np.searchsorted(sorted_hashes, hashes), len(sorted_hashes) - 1)
    return sorted_hashes[at] == hashes


def _timed(sorted_hashes: np.ndarray, times: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """The time beside each of `hashes` in (sorted_hashes, times); the smallest int64 where it is not one."""
    found = np.full(len(hashes), np.iinfo(np.int64).min, np.int64)
    if len(sorted_hashes):
        at = np.minimum(np.searchsorted(sorted_hashes, hashes), len(sorted_hashes) - 1)
        hit = sorted_hashes[at] == hashes
        found[hit] = times[at[hit]]
    return found


def _gone_since(state: _State, hashes: np.ndarray) -> np.ndarray:
    """Of each port hash: the latest binding by a VM no longer live (int64 µs; the smallest int64: none)."""
    if isinstance(state.ports_gone, _HashFile):
        assert isinstance(state.ports_gone_ts, _HashFile)
        big = state.ports_gone.timed(state.ports_gone_ts, hashes)
    else:
        assert isinstance(state.ports_gone_ts, np.ndarray)
        big = _timed(state.ports_gone, state.ports_gone_ts, hashes)
    return np.maximum(
        big,
        _timed(state.ports_gone_recent, state.ports_gone_recent_ts, hashes),
    )


def _latest_per_hash(hashes: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct hashes, the largest time of each)."""
    order = np.lexsort((times, hashes))
    hashes, times = hashes[order], times[order]
    last = np.ones(len(hashes), bool)
    last[:-1] = hashes[1:] != hashes[:-1]
    return hashes[last], times[last]


def _grown_timed(state: _State, hashes: np.ndarray, times: np.ndarray) -> dict[str, Any]:
    """_grown for ports_gone and their times: an entry later than the one stored goes to the recent arrays,
    folded into the big ones (whose files are then written anew) at a sixteenth of them."""
    hashes, times = _latest_per_hash(hashes, times.astype(np.int64))
    later = times > _gone_since(state, hashes)
    recent, recent_ts = _latest_per_hash(
        np.concatenate([state.ports_gone_recent, hashes[later]]),
        np.concatenate([state.ports_gone_recent_ts, times[later]]),
    )
    big, big_ts, big_file = state.ports_gone, state.ports_gone_ts, state.ports_gone_file
    if len(recent) > max(len(big) // 16, 1 << 16):
        big, big_ts = _latest_per_hash(
            np.concatenate([_whole(big), recent]), np.concatenate([_whole(big_ts).view(np.int64), recent_ts])
        )
        recent, recent_ts, big_file = recent[:0], recent_ts[:0], None
    return {
        "ports_gone": big,
        "ports_gone_ts": big_ts,
        "ports_gone_file": big_file,
        "ports_gone_recent": recent,
        "ports_gone_recent_ts": recent_ts,
    }


def _is_known(state: _State, ids: pl.Series) -> pl.Series:
    """Whether each id may have a vms row (a hash collision says yes: the caller then reads, never skips)."""
    hashes = _id_hashes(ids)
    return pl.Series(_member(state.known, hashes) | _member(state.recent, hashes))


def _last_runs(leases: pl.DataFrame) -> pl.DataFrame:
    """Each address's last run of back-to-back leases (a run starts where the address's previous lease ended
    before this one began, as in _free_since)."""
    frame = leases.select(_RUN_COLUMNS).sort("addr", "valid_from")
    same = pl.col("addr") == pl.col("addr").shift(1)
    begins = (~same | (pl.col("valid_to").shift(1) < pl.col("valid_from"))).fill_null(True)
    frame = frame.with_columns(begins.cast(pl.Int64).cum_sum().alias("_run"))
    last = frame.group_by("addr").agg(pl.col("_run").max().alias("_last"))
    return frame.join(last, on="addr").filter(pl.col("_run") == pl.col("_last")).select(_RUN_COLUMNS)


def _full_state(events: pa.Table, leases: pa.Table, vms: pa.Table) -> _State:
    # (the events as the build judged them: a refused binding is no VM's event, _refused_bindings)
    refused = _refused_in(events)
    events = _without_foreign_bindings(events, refused)
    frame = pl.from_arrow(vms.select(["vm_id", "status", "deleted_at"]))
    runs = pl.from_arrow(leases.select(_RUN_COLUMNS))
    assert isinstance(frame, pl.DataFrame) and isinstance(runs, pl.DataFrame)
    hot = frame.filter(~_settled("vms")).get_column("vm_id")
    live = pl.from_arrow(conform(events.filter(pc.is_in(events.column("vm_id"), hot.to_arrow())), VM_EVENTS))
    assert isinstance(live, pl.DataFrame)
    # (what _compacted judges the live VMs' events by: their leases, and the events of their instants)
    held = pl.from_arrow(leases.select(["addr", "vm_id", "addr_kind", "valid_from", "valid_to"]))
    assert isinstance(held, pl.DataFrame)
    instants = live.get_column("ts").unique().to_arrow()
    same_time = events.filter(pc.is_in(events.column("ts"), instants.cast(events.schema.field("ts").type)))
    same_time = pl.from_arrow(
        conform(same_time.select(_ADDRESSED), pa.schema([VM_EVENTS.field(c) for c in _ADDRESSED]))
    )
    assert isinstance(same_time, pl.DataFrame)
    # (the few events naming a port, and the floating-IP events: a year of events is ~12 M rows)
    port_columns = ["action", "vm_id", "addr", "addrs", "port_id", "ts"]
    ported = pl.from_arrow(
        conform(
            events.filter(pc.is_valid(events.column("port_id"))).select(port_columns),
            pa.schema([VM_EVENTS.field(c) for c in port_columns]),
        )
    )
    floating = pl.from_arrow(
        conform(
            events.filter(pc.is_in(events.column("action"), pa.array(sorted(_FLOATING_ACTIONS)))), VM_EVENTS
        )
    )
    vmless_detaches = pl.from_arrow(
        conform(
            events.filter(
                pc.and_(
                    pc.equal(events.column("action"), "detach"),
                    pc.and_(pc.is_null(events.column("vm_id")), pc.is_valid(events.column("port_id"))),
                )
            ),
            VM_EVENTS,
        )
    )
    assert isinstance(ported, pl.DataFrame) and isinstance(floating, pl.DataFrame)
    fips = _fip_facts(floating)
    bindings = _bindings(ported)
    compact, dropped = _compacted(
        live,
        held.filter(pl.col("vm_id").is_in(hot.implode())),
        _addressed(same_time),
        floating.get_column("addr").drop_nulls().unique(),
        _shared_ports(bindings),
    )
    assert isinstance(vmless_detaches, pl.DataFrame)
    # (the leases a detach ended, read only when a detach named no VM)
    closed = (
        leases.filter(pc.equal(leases.column("end_reason"), "detach"))
        if vmless_detaches.height
        else leases[:0]
    )
    closed = pl.from_arrow(closed.select(["addr", "vm_id", "valid_to", "end_reason"]))
    assert isinstance(closed, pl.DataFrame)
    released = _released_by_detaches(vmless_detaches, bindings, closed)
    reads, unbound = _port_reads(ported.filter(_port_read() | _vmless_detach()), bindings)
    reads = _merge_port_reads(reads, _unbound_detaches(unbound, ported))
    unbound = unbound.filter(unbound.is_in(ported.filter(_port_read()).get_column("port_id").implode()))
    live_reads = pl.col("vm_id").is_in(hot.implode())
    gone_ports = bindings.filter(~pl.col("vm_id").is_in(hot.implode()))
    last = _last_runs(runs)
    gone = fips.filter(pl.col("gone"))
    vmless_floating = _with_floating_addresses(_vmless_floating(floating), fips)
    kept = _kept(vmless_floating, last)
    lost = _lost_unbound_reads(vmless_floating, kept, bindings.get_column("port_id"))
    ports = pl.concat([ported.filter(_vmless_port_event()).get_column("port_id"), lost])
    return _State(
        live=compact,
        known=np.sort(_id_hashes(frame.get_column("vm_id"))),
        runs=last,
        ports=sorted_unique(_id_hashes(ports)),
        unbound=sorted_unique(_id_hashes(unbound)),
        fips=fips.filter(~pl.col("gone")),
        floating=kept,
        detaches=_kept(released, last, "_released"),
        port_reads=reads.filter(live_reads | pl.col("vm_id").is_null()),
        reads_gone_until=reads.filter(~live_reads).get_column("ts").max(),  # type: ignore[arg-type]
        **_grown_timed(
            _State(live=live.head(0), known=np.zeros(0, np.uint64), runs=last.head(0)),
            _id_hashes(gone_ports.get_column("port_id")),
            gone_ports.get_column("ts").dt.epoch("us").to_numpy(),
        ),
        fips_gone=sorted_unique(_id_hashes(gone.get_column("key"))),
        refused=_binding_hashes(refused),
        dropped=dropped,
    )


def _next_state(
    state: _State,
    new: pl.DataFrame,
    events: pl.DataFrame,
    involved: pl.Series,
    vms: pl.DataFrame,
    leases: pl.DataFrame,
    addrs: pl.Series,
    starts: pl.DataFrame,
) -> _State:
    """The state after an incremental update: `new` the update's events (floating addresses filled in),
    `events` every event it replayed (those of the involved VMs, stored and new, and the stored vm-less
    floating-IP events), `vms` the involved VMs' new rows, `leases` the touched addresses' leases from b(A) on
    (starts: addr, free_from)."""
    hot = vms.filter(~_settled("vms")).get_column("vm_id")
    others = state.live.filter(~pl.col("vm_id").is_in(involved.implode()))
    mine = _with_extra(events).filter(pl.col("vm_id").is_in(hot.implode())).select(state.live.columns)
    floating_addrs = events.filter(pl.col("action").is_in(list(_FLOATING_ACTIONS))).get_column("addr")
    # (a port a VM no longer live was bound to is shared: its bindings left the state)
    ports = mine.get_column("port_id").drop_nulls().unique()
    gone_bound = ports.filter(pl.Series(_gone_since(state, _id_hashes(ports)) > np.iinfo(np.int64).min))
    compact, dropped_keys = _compacted(
        mine,
        leases,
        _addressed(pl.concat([events.select(_ADDRESSED), others.select(_ADDRESSED)])),
        floating_addrs.drop_nulls().unique(),
        pl.concat([_shared_ports(pl.concat([_bindings(events), _bindings(others)])), gone_bound]),
        starts,
    )
    live = pl.concat([others, compact])
    dropped, dropped_recent, dropped_file = _grown(
        state.dropped, state.dropped_recent, state.dropped_file, dropped_keys
    )
    hashes = sorted_unique(_id_hashes(vms.get_column("vm_id")))
    known, recent, known_file = _grown(state.known, state.recent, state.known_file, hashes)
    touched = pl.col("addr").is_in(addrs.implode())
    before = (
        state.runs.filter(touched)
        .join(starts.select("addr", "free_from"), on="addr")
        .filter(pl.col("valid_from") < pl.col("free_from"))
        .select(_RUN_COLUMNS)
    )
    recomputed = _last_runs(pl.concat([before, leases.select(_RUN_COLUMNS).cast(before.schema)]))  # type: ignore[arg-type]
    runs = pl.concat([state.runs.filter(~touched), recomputed])
    fips = _merge_fip_facts(state.fips, _fip_facts(events))
    vmless_floating = pl.concat([state.floating, _vmless_floating(new).select(state.floating.columns)])
    floating = _kept(vmless_floating, runs)
    released = _released_by_detaches(
        new.filter(_vmless_detach()).select(state.floating.columns), _bindings(events), leases
    )
    detaches = _kept(pl.concat([state.detaches, released.select(state.detaches.columns)]), runs, "_released")
    # the ports read (their bindings are in `events`: every live VM bound to them is involved, _port_guard);
    # those bound by nothing yet: any event naming them from now on is a full rebuild
    gone_vms = involved.filter(~involved.is_in(hot.implode())).implode()
    bindings = _bindings(events)
    # (the stored associations replayed too: one with a port bound for the first time now reads it now)
    reads, unbound = _port_reads(events.filter(_port_read() | _vmless_detach()), bindings)
    reads = _merge_port_reads(state.port_reads, pl.concat([reads, _unbound_detaches(unbound, new)]))
    unbound = unbound.filter(unbound.is_in(new.filter(_port_read()).get_column("port_id").implode()))
    unbound, unbound_recent, unbound_file = _grown(
        state.unbound, state.unbound_recent, state.unbound_file, sorted_unique(_id_hashes(unbound))
    )
    lost = _lost_unbound_reads(
        vmless_floating, floating, pl.concat([_bindings(state.live), bindings]).get_column("port_id")
    )
    lost = lost.filter(pl.Series(_gone_since(state, _id_hashes(lost)) == np.iinfo(np.int64).min))
    ports, ports_recent, ports_file = _grown(
        state.ports, state.ports_recent, state.ports_file, sorted_unique(_id_hashes(lost))
    )
    gone_ports = bindings.filter(pl.col("vm_id").is_in(gone_vms))
    gone_ports = _grown_timed(
        state,
        _id_hashes(gone_ports.get_column("port_id")),
        gone_ports.get_column("ts").dt.epoch("us").to_numpy(),
    )
    gone = sorted_unique(_id_hashes(fips.filter(pl.col("gone")).get_column("key")))
    fips_gone, fips_gone_recent, fips_gone_file = _grown(
        state.fips_gone, state.fips_gone_recent, state.fips_gone_file, gone
    )
    return _State(
        live=live,
        known=known,
        runs=runs,
        recent=recent,
        known_file=known_file,
        ports=ports,
        ports_file=ports_file,
        ports_recent=ports_recent,
        unbound=unbound,
        unbound_file=unbound_file,
        unbound_recent=unbound_recent,
        fips=fips.filter(~pl.col("gone")),
        floating=floating,
        detaches=detaches,
        port_reads=reads.filter(~pl.col("vm_id").is_in(gone_vms).fill_null(False)),
        reads_gone_until=max(
            (
                t
                for t in (state.reads_gone_until, reads.filter(pl.col("vm_id").is_in(gone_vms))["ts"].max())
                if t
            ),
            default=None,
        ),
        **gone_ports,
        fips_gone=fips_gone,
        fips_gone_file=fips_gone_file,
        fips_gone_recent=fips_gone_recent,
        refused=state.refused,
        dropped=dropped,
        dropped_file=dropped_file,
        dropped_recent=dropped_recent,
    )


def _union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.union1d by a sort (sorted_unique: numpy's np.unique hashes, seconds at millions of hashes)."""
    return sorted_unique(np.concatenate([a, b]))


def _grown(
    big: np.ndarray | _HashFile, recent: np.ndarray, big_file: Path | None, hashes: np.ndarray
) -> tuple[np.ndarray | _HashFile, np.ndarray, Path | None]:
    """A set of hashes that only grows (every VM id known, the ports stored events read the history of), kept
    as a big sorted array, linked into the next state unchanged, and a small one of those added since: each
    update writes the small one; it is folded into the big one once it holds a sixteenth of it. -> (big,
    recent, the big one's file: None once it changed)."""
    fresh = hashes[~(_member(big, hashes) | _member(recent, hashes))]
    recent = _union(recent, fresh)
    if len(recent) > max(len(big) // 16, 1 << 16):
        return _union(big.whole() if isinstance(big, _HashFile) else big, recent), recent[:0], None
    return big, recent, big_file


def _state_schemas() -> tuple[pl.Schema, pl.Schema]:
    events = pl.from_arrow(VM_EVENTS.empty_table())
    leases = pl.from_arrow(VM_LEASES.empty_table().select(_RUN_COLUMNS))
    assert isinstance(events, pl.DataFrame) and isinstance(leases, pl.DataFrame)
    return events.schema, leases.schema


STALE_STATE_S = 3600  # a state folder still `.tmp-` after this long is of a save that was killed


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except OSError:
        return False


def _save_state(lake: Any, version: int, state: _State) -> None:
    """The state of vm_leases `version`, written whole into a new directory renamed into place (readers see
    all of it or none); older states are removed. Failing to write it costs the next update a full rebuild."""
    root = lake.root / STATE_DIR
    work: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not _in_lake(lake, root):  # (old states are removed there: never out of the lake)
            return
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        state.live.write_parquet(work / "live.parquet", compression="zstd")
        _save_hashes(work / "known.npy", state.known, state.known_file, paged=True)
        np.save(work / "recent.npy", state.recent.astype(np.uint64), allow_pickle=False)
        _save_hashes(work / "ports.npy", state.ports, state.ports_file, paged=True)
        np.save(work / "ports_recent.npy", state.ports_recent.astype(np.uint64), allow_pickle=False)
        _save_hashes(work / "unbound.npy", state.unbound, state.unbound_file, paged=True)
        np.save(work / "unbound_recent.npy", state.unbound_recent.astype(np.uint64), allow_pickle=False)
        _save_hashes(work / "fips_gone.npy", state.fips_gone, state.fips_gone_file, paged=True)
        np.save(work / "fips_gone_recent.npy", state.fips_gone_recent.astype(np.uint64), allow_pickle=False)
        np.save(work / "refused.npy", state.refused.astype(np.uint64), allow_pickle=False)
        _save_hashes(work / "dropped.npy", state.dropped, state.dropped_file, paged=True)
        np.save(work / "dropped_recent.npy", state.dropped_recent.astype(np.uint64), allow_pickle=False)
        state.runs.write_parquet(work / "runs.parquet", compression="zstd")
        state.fips.write_parquet(work / "fips.parquet", compression="zstd")
        state.floating.write_parquet(work / "floating.parquet", compression="zstd")
        state.detaches.write_parquet(work / "detaches.parquet", compression="zstd")
        state.port_reads.write_parquet(work / "port_reads.parquet", compression="zstd")
        _save_hashes(work / "ports_gone.npy", state.ports_gone, state.ports_gone_file, paged=True)
        np.save(work / "ports_gone_recent.npy", state.ports_gone_recent.astype(np.uint64), allow_pickle=False)
        gone_ts = state.ports_gone_file and state.ports_gone_file.with_name(_GONE_TIMES)
        times = state.ports_gone_ts
        _save_hashes(
            work / _GONE_TIMES, times if isinstance(times, _HashFile) else times.view(np.uint64), gone_ts
        )
        np.save(work / "ports_gone_recent_ts.npy", state.ports_gone_recent_ts, allow_pickle=False)
        meta = {"vm_leases_version": version, "polars": pl.__version__}  # (hashes are polars' own)
        meta["stamps"] = {name: _stamp(work / name) for name in (*_BIG_HASHES, *_INDEXES, _GONE_TIMES)}
        if state.reads_gone_until is not None:
            meta["reads_gone_until"] = state.reads_gone_until.isoformat()
        (work / "meta.json").write_text(json.dumps(meta))
        final = root / str(version)
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
        for old in root.iterdir():
            if old.name.isdigit() and int(old.name) < version:
                shutil.rmtree(old, ignore_errors=True)
            elif old.name.startswith(".tmp-") and _older_than(old, STALE_STATE_S):
                # a save killed before its rename (an ops review: such folders, a whole state each, outlived
                # later saves and vacuum); an hour old, no save of now is writing it
                shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        # (a full disk: its own half-written folder, a whole state, goes at once, not an hour later; said, as the
        # next update is a full rebuild: failure-injection review, session 38)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        _state_log.warning("the lease update state was not saved (%s): the next update rebuilds in full", exc)


def _save_hashes(
    path: Path, hashes: np.ndarray | _HashFile, linked: Path | None, paged: bool = False
) -> None:
    """A big hash array of the state: the file it was read from, linked (the same inode), when unchanged;
    `paged`: and its index of pages (_HashFile), linked beside it or written from the array."""
    try:
        if linked is None:
            raise OSError
        os.link(linked, path)
    except OSError:
        hashes = hashes.whole() if isinstance(hashes, _HashFile) else hashes.astype(np.uint64)
        np.save(path, hashes, allow_pickle=False)
        linked = None
    if not paged:
        return
    index = _index_path(path)
    if isinstance(hashes, _HashFile) and linked is not None:
        try:  # (the index _HashFile.open took with the file: never one beside a file read whole, e.g. a copy's)
            os.link(_index_path(linked), index)
            return
        except OSError:
            hashes = hashes.whole()
    if isinstance(hashes, _HashFile):
        hashes = hashes.whole()
    np.save(index, np.ascontiguousarray(hashes[::_PAGE]).astype(np.uint64), allow_pickle=False)


_BIG_HASHES = ("known.npy", "ports.npy", "unbound.npy", "fips_gone.npy", "ports_gone.npy", "dropped.npy")
# the big sets an update only looks up (and grows): read by page (_HashFile), each with an index beside it
_PAGED = ("known.npy", "ports.npy", "unbound.npy", "fips_gone.npy", "ports_gone.npy", "dropped.npy")
_GONE_TIMES = "ports_gone_ts.npy"  # (beside ports_gone.npy, its times: read by the same pages, no index)
_PAGE = 512  # hashes a page (4 KiB): what a lookup of one hash reads


def _index_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".npy") + ".index.npy")


_INDEXES = tuple(_index_path(Path(name)).name for name in _PAGED)


class StateChanged(OSError):
    """A file of the saved state is no longer what its save wrote (cut or replaced under the update)."""


class _HashFile:
    """A big sorted hash array of a saved state, looked up by reading only the pages the looked-up hashes fall
    in (os.pread), found in its index of every _PAGE-th hash (`<name>.index.npy`, 1/512 of its size). An hourly
    update looks up ~1,000 ids against known.npy (every VM id ever seen: 3 M, 24 MB, after a year of CERN
    churn): reading it whole cost 3-55 ms an hour and grew with every year kept; this reads ~1,000 pages, the
    same whatever the history. Used only for files the state's own save wrote (their stamps in meta.json): the
    order is the save's. `whole` reads it all, to grow it (a sixteenth of it added) or to write it anew."""

    def __init__(self, path: Path, offset: int, size: int, index: np.ndarray) -> None:
        self.path, self.offset, self.size, self.index = path, offset, size, index

    @classmethod
    def open(cls, path: Path) -> _HashFile | None:
        """The file and its index, checked for what can be checked without reading it (its header, its size,
        the index's type, length and order); None: read it whole instead."""
        found = _array_file(path)
        try:
            index = np.load(_index_path(path), allow_pickle=False)
        except (OSError, ValueError):
            return None
        if found is None:
            return None
        pages = -(-found[1] // _PAGE)
        if index.dtype != np.uint64 or index.shape != (pages,) or not _ascending(index):
            return None
        return cls(path, *found, index)

    def beside(self, path: Path) -> _HashFile | None:
        """The file of as many uint64 values beside it (ports_gone's times), read by the same pages: no index."""
        found = _array_file(path)
        if found is None or found[1] != self.size:
            return None
        return _HashFile(path, *found, self.index[:0])

    def __len__(self) -> int:
        return self.size

    def _spans(self, hashes: np.ndarray) -> list[tuple[int, int]]:
        """(first position, count) of the runs of pages the hashes fall in: a page per hash at most."""
        pages = sorted_unique(np.maximum(np.searchsorted(self.index, hashes, side="right") - 1, 0))
        starts = np.flatnonzero(np.diff(pages, prepend=pages[0] - 2) != 1)  # runs of consecutive pages
        ends = np.append(starts[1:], len(pages))
        return [
            (first * _PAGE, min((last + 1) * _PAGE, self.size) - first * _PAGE)
            for first, last in zip(pages[starts].tolist(), pages[ends - 1].tolist(), strict=True)
        ]

    def _read(self, spans: list[tuple[int, int]]) -> np.ndarray:
        """The values at those spans, in file order, one read each."""
        chunks = []
        with open(self.path, "rb") as handle:
            for first, count in spans:
                chunk = os.pread(handle.fileno(), 8 * count, self.offset + 8 * first)
                if len(chunk) != 8 * count:  # (cut under the update)
                    raise StateChanged(f"{self.path}: {len(chunk)} of {8 * count} bytes read")
                chunks.append(chunk)
        return np.frombuffer(b"".join(chunks), np.uint64)

    def member(self, hashes: np.ndarray) -> np.ndarray:
        """Which of `hashes` the file holds, from the pages they fall in."""
        if not self.size or not len(hashes):
            return np.zeros(len(hashes), bool)
        # the pages in file order are a sorted part of it, holding every hash it has of those looked up
        return _member(self._read(self._spans(hashes)), hashes)

    def timed(self, times: _HashFile, hashes: np.ndarray) -> np.ndarray:
        """_timed over this file and `times` (its beside()): the same pages of both."""
        if not self.size or not len(hashes):
            return _timed(np.zeros(0, np.uint64), np.zeros(0, np.int64), hashes)
        spans = self._spans(hashes)
        return _timed(self._read(spans), times._read(spans).view(np.int64), hashes)

    def whole(self) -> np.ndarray:
        try:
            hashes = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StateChanged(f"{self.path}: {exc}") from exc
        if hashes.dtype != np.uint64 or hashes.shape != (self.size,):
            raise StateChanged(f"{self.path}: not the {self.size} hashes the state saved")
        return hashes


def _array_file(path: Path) -> tuple[int, int] | None:
    """(data offset, length) of a .npy file of one dimension of uint64 whose size is that, from its header."""
    try:
        with open(path, "rb") as handle:
            major, _minor = np.lib.format.read_magic(handle)
            if major == 1:
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            offset = handle.tell()
            size = os.fstat(handle.fileno()).st_size
    except (OSError, ValueError):
        return None
    if dtype != np.uint64 or fortran or len(shape) != 1 or size != offset + 8 * shape[0]:
        return None
    return offset, shape[0]


def _whole(values: np.ndarray | _HashFile) -> np.ndarray:
    return values.whole() if isinstance(values, _HashFile) else values


def _gone_times(directory: Path, gone: np.ndarray | _HashFile, stamps: dict[str, Any]) -> tuple[Any, Any]:
    """ports_gone and its times: both by page when the times file is the save's own too, else both whole."""
    path = directory / _GONE_TIMES
    if isinstance(gone, _HashFile):
        try:
            own = stamps.get(_GONE_TIMES) == _stamp(path)
        except OSError:
            own = False
        times = gone.beside(path) if own else None
        if times is not None:
            return gone, times
        gone = gone.whole()
    return gone, np.load(path, allow_pickle=False)


def _open_big(directory: Path, name: str, stamps: dict[str, Any]) -> np.ndarray | _HashFile:
    """A big hash set of a saved state: paged (_HashFile) when it and its index are the files the state's
    save wrote, else read whole (and then checked like every array of the state)."""
    path = directory / name
    if name in _PAGED:
        index = _index_path(path)
        try:
            own = stamps.get(name) == _stamp(path) and stamps.get(index.name) == _stamp(index)
        except OSError:
            own = False
        paged = _HashFile.open(path) if own else None
        if paged is not None:
            return paged
    return np.load(path, allow_pickle=False)


def _stamp(path: Path) -> list[int]:
    """What tells a big hash file of the state from another: inode, size, modification time (a link made by
    the next state keeps them; a file written anew over it, or a copy of the lake, does not)."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _ascending(hashes: np.ndarray) -> bool:
    return len(hashes) < 2 or not bool(np.any(hashes[1:] < hashes[:-1]))


def _load_state(lake: Any, version: int) -> _State | None:
    """The saved state of vm_leases `version`, or None (missing, of another build or polars, or not what this
    code writes: whoever can write the lake can plant files here, and the update then rebuilds in full)."""
    directory = lake.root / STATE_DIR / str(version)
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("vm_leases_version") != version or meta.get("polars") != pl.__version__:
            return None
        stamps = meta.get("stamps") if isinstance(meta.get("stamps"), dict) else {}
        # (through pyarrow: polars would read a lake path holding `[`, `*` or `?` as a pattern)
        live = pl.from_arrow(pq.read_table(directory / "live.parquet"))
        # (the big sets by page, read with os.pread (_HashFile), not mapped: a file truncated under a mapping
        # by whoever can write the lake kills the reader with SIGBUS; a read returns short, StateChanged)
        known = _open_big(directory, "known.npy", stamps)
        recent = np.load(directory / "recent.npy", allow_pickle=False)
        # (a state saved before ports.npy existed: the update rebuilds in full once)
        ports = _open_big(directory, "ports.npy", stamps)
        ports_recent = np.load(directory / "ports_recent.npy", allow_pickle=False)
        unbound = _open_big(directory, "unbound.npy", stamps)
        unbound_recent = np.load(directory / "unbound_recent.npy", allow_pickle=False)
        fips_gone = _open_big(directory, "fips_gone.npy", stamps)
        fips_gone_recent = np.load(directory / "fips_gone_recent.npy", allow_pickle=False)
        # (a state saved before refused bindings were kept: a full rebuild once)
        refused = np.load(directory / "refused.npy", allow_pickle=False)
        # (a state saved before live VMs' events were compacted: a full rebuild once)
        dropped = _open_big(directory, "dropped.npy", stamps)
        dropped_recent = np.load(directory / "dropped_recent.npy", allow_pickle=False)
        runs = pl.from_arrow(pq.read_table(directory / "runs.parquet"))
        fips = pl.from_arrow(pq.read_table(directory / "fips.parquet"))
        # (a state saved before the vm-less floating-IP events and port reads were kept: a full rebuild once)
        floating = pl.from_arrow(pq.read_table(directory / "floating.parquet"))
        detaches = pl.from_arrow(pq.read_table(directory / "detaches.parquet"))
        port_reads = pl.from_arrow(pq.read_table(directory / "port_reads.parquet"))
        ports_gone, ports_gone_ts = _gone_times(
            directory, _open_big(directory, "ports_gone.npy", stamps), stamps
        )
        ports_gone_recent = np.load(directory / "ports_gone_recent.npy", allow_pickle=False)
        ports_gone_recent_ts = np.load(directory / "ports_gone_recent_ts.npy", allow_pickle=False)
        gone_until = meta.get("reads_gone_until")
        reads_gone_until = None if gone_until is None else dt.datetime.fromisoformat(gone_until)
        if reads_gone_until is not None and reads_gone_until.utcoffset() != dt.timedelta(0):
            return None
    except Exception:  # (any damage of a cache: unreadable, truncated, not Parquet)
        return None
    events_schema, runs_schema = _state_schemas()
    frames = (live, runs, fips, floating, port_reads, detaches)
    if not all(isinstance(f, pl.DataFrame) for f in frames):
        return None
    assert isinstance(fips, pl.DataFrame) and isinstance(floating, pl.DataFrame)
    assert isinstance(port_reads, pl.DataFrame) and isinstance(detaches, pl.DataFrame)
    schemas = (
        pl.Schema({**events_schema, **_LIVE_EXTRA}),
        runs_schema,
        pl.Schema(_FIPS_SCHEMA),
        events_schema,
        pl.Schema(_PORT_READS_SCHEMA),
        pl.Schema({**events_schema, "_released": pl.String}),
    )
    if any(f.schema != want for f, want in zip(frames, schemas, strict=True)):
        return None
    # every array of hashes: uint64, one dimension, in order. The order of a big one (every VM id ever seen) is
    # checked only when it is not the file the state's save wrote (_stamp), which the save checked (_grown
    # keeps it sorted); a copy of the lake, or a file written over it, is checked
    big_sets = dict(zip(_BIG_HASHES, (known, ports, unbound, fips_gone, ports_gone, dropped), strict=True))
    small_sets = (
        recent,
        ports_recent,
        unbound_recent,
        fips_gone_recent,
        ports_gone_recent,
        refused,
        dropped_recent,
    )
    for name, hashes in (*big_sets.items(), *(("", h) for h in small_sets)):
        if isinstance(hashes, _HashFile):  # (checked by _HashFile.open; its order is its own save's)
            continue
        if hashes.dtype != np.uint64 or hashes.ndim != 1:
            return None
        try:
            saved = bool(name) and stamps.get(name) == _stamp(directory / name)
        except OSError:
            return None
        if not saved and not _ascending(hashes):
            return None
    if ports_gone_recent_ts.dtype != np.int64 or ports_gone_recent_ts.shape != ports_gone_recent.shape:
        return None
    if isinstance(ports_gone_ts, np.ndarray):  # (else beside() checked it: as many uint64 as ports_gone)
        if ports_gone_ts.dtype != np.uint64 or ports_gone_ts.shape != (len(ports_gone),):
            return None
        ports_gone_ts = ports_gone_ts.view(np.int64)
    return _State(
        live=live,
        known=known,
        runs=runs,
        recent=recent,
        known_file=directory / "known.npy",
        ports=ports,
        ports_file=directory / "ports.npy",
        ports_recent=ports_recent,
        unbound=unbound,
        unbound_file=directory / "unbound.npy",
        unbound_recent=unbound_recent,
        fips=fips,
        floating=floating,
        detaches=detaches,
        port_reads=port_reads,
        ports_gone=ports_gone,
        ports_gone_file=directory / "ports_gone.npy",
        ports_gone_recent=ports_gone_recent,
        ports_gone_ts=ports_gone_ts,
        ports_gone_recent_ts=ports_gone_recent_ts,
        fips_gone=fips_gone,
        fips_gone_file=directory / "fips_gone.npy",
        fips_gone_recent=fips_gone_recent,
        reads_gone_until=reads_gone_until,
        refused=refused,
        dropped=dropped,
        dropped_file=directory / "dropped.npy",
        dropped_recent=dropped_recent,
    )
