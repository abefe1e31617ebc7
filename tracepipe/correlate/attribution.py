"""Attribution: give flows and VM log lines the VM whose lease held their address then (lease_at.py).

`correlate(lake, days)` is what runs after ingest (the CLI, the collector's committer and sweeps call it;
ingest itself never does): it brings vm_leases/vms up to the events landed (incrementally, leases.py), then
rewrites the flow and vm_logs files of the days whose leases changed plus the days ingest touched.
`attribute_flows(lake, days)` rewrites flow files through Lake.rewrite (one commit per day, streamed one row
group at a time): `src_vm`/`dst_vm` = vm_id of the lease valid at ts_start, and `attributed_at` set; every
other column stays as it was, rerunning gives the same rows. The log's null count of attributed_at tells
`flows_attributed` which files to trust (a null src_vm there means "nobody held the address") and which to
join at query time. A failure of any of this is an AttributionError (exit code 5): the input has landed and
`tracepipe attribute` (or `tracepipe leases rebuild`) finishes the job.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tracepipe.correlate.lease_at import (
    CODED_VM,
    FACT_PREFIX,
    LeaseIndex,
    file_meets_spans,
    lease_index,
    read_leases,
    span_bounds,
)
from tracepipe.errors import EXIT_ATTRIBUTION, EXIT_OK, AttributionError, LakeError, TracepipeError
from tracepipe.lake import Lake, conform
from tracepipe.schema import VM_LOGS

# What correlate reports when the lake has no lifecycle events: LeaseUpdate().to_dict() (tests/test_attribution.py
# holds them equal), written out so that an ingest into a lake without leases never imports leases.py and
# polars (0.2-0.35 s of every such run; issue 17).
NO_LEASE_UPDATE: dict[str, Any] = {
    "mode": "none",
    "days": [],
    "events": 0,
    "new_events": 0,
    "addresses": 0,
    "vms": 0,
    "reason": "",
    "seconds": 0.0,
}

__all__ = [
    "AttributionResult",
    "Attributor",
    "CorrelationResult",
    "LeaseIndex",
    "attribute_flows",
    "attribute_lake",
    "attribute_logs",
    "attribute_table",
    "correlate",
    "days_left_to_attribute",
    "lease_index",
    "reattribute_logs",
]


def attribute_table(
    flows: pa.Table | pa.RecordBatch, index: LeaseIndex, when: dt.datetime | None = None
) -> pa.Table | pa.RecordBatch:
    """`flows` with src_vm / dst_vm set from the lease index and attributed_at = `when` (default now); every
    other column untouched. An index built with vm keys (lease_index(..., vm_keys=True)) also sets
    src_vm_key / dst_vm_key, the VMs' vms.vm_key that flows_attributed joins on (null where vms has none), and
    each end's identity facts as vms holds them now (src_vm_name, src_project, ... : schema.VM_FACTS) with
    vm_facts_at = `when`: flows_attributed reads them instead of joining every VM (issue 18 item 4)."""
    names = index.leases.column_names
    # each end's column -> the index's: taken per flow, or (dictionary columns) through used_facts
    coded = {"vm": CODED_VM} if CODED_VM in names else {}
    coded |= {c.removeprefix(FACT_PREFIX): c for c in names if c.startswith(FACT_PREFIX)}
    taken = {"vm": "vm_id"} if "vm" not in coded else {}
    taken |= {"vm_key": "vm_key"} if "vm_key" in names else {}
    stamp = pa.array([when or dt.datetime.now(dt.UTC)], pa.timestamp("us", tz="UTC")).take(
        pa.array(np.zeros(len(flows), np.int32))
    )
    columns: dict[str, pa.Array] = {"attributed_at": stamp}
    for end in ("src", "dst"):
        rows = index.rows(flows.column(f"{end}_addr"), flows.column("ts_start"))
        found = index.leases.select(list(taken.values())).take(rows)
        for name, column in taken.items():
            columns[f"{end}_{name}"] = found.column(column).combine_chunks()
        if coded:
            values = used_facts(rows, index.leases.select(list(coded.values())))
            for name, column in coded.items():
                columns[f"{end}_{name}"] = values[column]
    facts = [c for c in names if c.startswith(FACT_PREFIX)]
    if facts:
        columns["vm_facts_at"] = stamp
    for name, values in columns.items():
        if name in flows.schema.names:
            flows = flows.set_column(flows.schema.names.index(name), name, values)
        else:
            flows = flows.append_column(name, values)
    return flows


def used_facts(rows: pa.Array, facts: pa.Table) -> dict[str, pa.Array]:
    """Each of `facts` (dictionary columns, one row per lease: vm_keys.vms_of) at `rows` (a lease row per
    flow, null: none), as dictionary arrays whose dictionary holds only the values these flows use: the flow
    file then stores a dictionary of a day's VMs, not of every VM. Hashes integers only, once per distinct
    lease of the batch; strings are copied once per distinct value."""
    per_flow = pc.dictionary_encode(rows)  # distinct leases of the batch, and which one each flow has
    used = per_flow.dictionary
    out = {}
    for name in facts.column_names:
        column = facts.column(name)
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        codes = pc.dictionary_encode(column.indices.take(used))  # the distinct values these leases have
        indices = codes.indices.take(per_flow.indices).cast(pa.int32())
        out[name] = pa.DictionaryArray.from_arrays(indices, column.dictionary.take(codes.dictionary))
    return out


_DAY = dt.timedelta(days=1)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class Attributor:
    """attribute_table over a lake's current leases, indexing only the leases that overlap the whole UTC days
    the flows fall on (lease_at.read_leases `during`): an attribution reads the leases of the days it
    attributes, not every lease of the lake's history (a year of CERN churn: 3 M leases and VMs, ~5 s to
    index on every run, growing with the years). The days are given up front (`days`) or taken from the
    batches; a batch outside them widens them, and the index is built again. `refresh()` drops the index when
    vm_leases or vms changed: the collector's committer keeps one Attributor across its segments, with
    `widest` (2 days), so that its days follow the flows instead of growing from the day it started: a batch
    that would widen them beyond that replaces them by its own.

    Flows whose times jump around the calendar (an exporter's clock, or datagrams forged to make the committer
    index again and again) cost at most _REBUILDS indexes of days between two refreshes (a collector segment):
    then every lease is indexed once, as before days were, until the leases change."""

    def __init__(
        self,
        lake: Lake,
        when: dt.datetime | None = None,
        days: Iterable[str] = (),
        widest: dt.timedelta | None = None,
    ) -> None:
        self.lake = lake
        self.when = when
        self.widest = widest
        self.index: LeaseIndex | None = None
        self.versions: tuple[Any, ...] | None = None
        self.span: tuple[dt.datetime, dt.datetime] | None = _span_of_days(days)
        self.whole = False  # every lease indexed (see the class docstring)
        self.builds = 0
        self.rebuilt = 0  # indexes built since the last refresh()

    def refresh(self) -> None:
        # the versions, and a file of each (named at random): a lake made again at the same path starts over
        # at the same versions
        versions = tuple(
            (self.lake.version(name), next((e.relative for e in self.lake.entries(name)), None))
            for name in ("vm_leases", "vms")
        )
        if versions != self.versions:
            self.index, self.versions, self.whole = None, versions, False
            if self.widest is not None:  # (days that followed the flows: from the next flows on, again)
                self.span = None
        self.rebuilt = 0

    def __call__(self, flows: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
        span = _days_of(flows.column("ts_start"))
        outside = span is not None and (self.span is None or span[0] < self.span[0] or span[1] > self.span[1])
        if outside and not self.whole:
            assert span is not None
            if self.index is not None and self.rebuilt >= _REBUILDS:
                self.whole = True
            both = _hull(span, self.span)
            self.span = both if self.widest is None or both[1] - both[0] <= self.widest else span
            self.index = None
        if self.index is None:
            during = None if self.whole else (self.span or (_EPOCH, _EPOCH))
            self.index = lease_index(self.lake, vm_keys=True, during=during)
            self.builds += 1
            self.rebuilt += 1
        return attribute_table(flows, self.index, self.when)


_REBUILDS = 2  # indexes of days an Attributor builds between two refreshes before it indexes every lease


Span = tuple[dt.datetime, dt.datetime]


def _span_of_days(days: Iterable[str]) -> Span | None:
    """[first day, day after the last) of days of a lake's log, as UTC midnights; a day that is no date (a
    planted partition) is left to the batches' guard (_days_of). None without any."""
    starts = sorted(filter(None, map(_day_start, days)))
    return (starts[0], starts[-1] + _DAY) if starts else None


def _hull(span: Span, other: Span | None) -> Span:
    return span if other is None else (min(span[0], other[0]), max(span[1], other[1]))


def _day_start(day: str) -> dt.datetime | None:
    """Midnight UTC of a day of the lake's log; None for one that is no date, or whose next day Python has not
    (9999-12-31: a planted partition or line), which is left to the batches' guard (_days_of clamps)."""
    try:
        date = dt.date.fromisoformat(day)
    except (TypeError, ValueError):
        return None
    if date >= dt.date.max:
        return None
    return dt.datetime.combine(date, dt.time(), dt.UTC)


_DAY_US = 86_400_000_000
_FIRST_US = -62_135_596_800_000_000 + _DAY_US  # 0001-01-02 (the days are whole days as Python dates)
_LAST_US = 253_402_214_400_000_000 - _DAY_US  # 9999-12-30: the day after it is still a datetime


def _days_of(ts: pa.Array | pa.ChunkedArray) -> tuple[dt.datetime, dt.datetime] | None:
    """[first day, day after the last) of timestamps, as UTC midnights; None without any. In integers, clamped
    to the days Python has: a planted file's time of year 294,247 must not stop attribution."""
    bounds = pc.min_max(ts.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()))
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if low is None or high is None:
        return None
    first, last = (min(max(v // _DAY_US * _DAY_US, _FIRST_US), _LAST_US) for v in (low, high))
    return _EPOCH + dt.timedelta(microseconds=first), _EPOCH + dt.timedelta(microseconds=last + _DAY_US)


def unattributed(entries: list[Any]) -> list[Any]:
    """The files among `entries` that hold a flow never attributed (attributed_at null; unknown without the
    log's null count): what an ingest landed since the leases last changed."""
    return [e for e in entries if e.null_counts.get("attributed_at") != 0]


def attribute_flows(
    lake: Lake,
    days: Iterable[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    new_only: Iterable[str] = (),
    spans: Any = None,
    span_days: Iterable[str] = (),
    basis: int | None = None,
) -> dict[str, Any]:
    """Set src_vm/dst_vm/attributed_at of the flows of `days` (None = all) from the current vm_leases.

    One commit per day through Lake.rewrite (memory: the leases plus one batch). Returns {"days", "files",
    "rows", "src_attributed", "dst_attributed", "leases" (those that overlap the days: Attributor), "seconds"}.
    `progress` is called after each day
    with (day, days done, days total). `new_only`: days of which only the files holding unattributed flows are
    rewritten (unattributed): the days an ingest touched whose leases did not change since their other files
    were attributed (correlate). `spans` (a lease update's leases._changed_spans) and `span_days`: days of which
    only those files and the files holding flows of the spans' times are rewritten (an hourly update that
    changed the leases of the last hour rewrote every flow of the day). `basis`: the vm_leases version those
    narrowings were judged against; when the leases are another by now (a concurrent update), whole days: this
    run's commits of a day say it is attributed with the leases read here, which a narrowed rewrite may not be.
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
    attributor = Attributor(lake, dt.datetime.now(dt.UTC), summary["days"])

    def attributed(batch: pa.RecordBatch) -> pa.RecordBatch:
        batch = attributor(batch)
        summary["leases"] = len(attributor.index or ())
        summary["src_attributed"] += len(batch) - batch.column("src_vm").null_count
        summary["dst_attributed"] += len(batch) - batch.column("dst_vm").null_count
        return batch

    new_only, span_days = set(new_only), set(span_days) if spans is not None else set()
    if basis is not None and leases_version != basis:
        new_only, span_days = set(), set()
    bounds = span_bounds(spans) if span_days else None

    def chosen(entries: list[Any]) -> list[Any]:
        day = entries[0].day if entries else None
        if day in new_only:
            return unattributed(entries)
        if bounds is not None and day in span_days:
            fresh = {id(e) for e in unattributed(entries)}
            return [e for e in entries if id(e) in fresh or file_meets_spans(e, "ts_start", bounds)]
        return entries

    done = lake.rewrite(
        "flows",
        days_list,
        attributed,
        select=chosen if new_only or span_days else None,
        info={"operation": "attribute", "leases_version": leases_version},
        progress=progress,
    )
    summary["files"] = done["files_removed"]
    summary["rows"] = done["rows"]
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def attribute_logs(logs: pa.Table, leases: pa.Table) -> pa.Table:
    """(Re)set vm_id of VM log lines: the VM whose lease held `sender_addr` at the line's time (lease_at);
    lines without a sender address go by hostname (or its first label) = vm_name among the VMs holding a
    lease then, when exactly one does; else null. Every answer at a time comes from the leases that hold
    then: any `leases` that include those give the same (reattribute_logs reads those of the days only)."""
    if logs.num_rows == 0 or leases.num_rows == 0:
        return logs.set_column(
            logs.schema.get_field_index("vm_id"), "vm_id", pa.nulls(logs.num_rows, pa.string())
        )
    import polars as pl  # here: the flow paths of attribution need no polars

    by_addr = LeaseIndex(leases).lookup(logs.column("sender_addr"), logs.column("ts")).column("vm_id")
    frame = pl.from_arrow(logs).with_row_index("_row").with_columns(pl.Series("_by_addr", by_addr))
    lease = pl.from_arrow(leases.select(["vm_id", "vm_name", "valid_from", "valid_to"]))
    assert isinstance(frame, pl.DataFrame) and isinstance(lease, pl.DataFrame)
    # by name: the VMs of that name holding a lease (any address) at the line's time. (Until session 20 a VM's
    # span from its first lease to its last: a VM between two leases days apart matched too, which made an
    # answer depend on leases far from the line, and every re-attribution read every lease of the history.)
    spans = lease.filter(pl.col("vm_name").is_not_null()).select(
        "vm_name", "vm_id", "valid_from", "valid_to", pl.col("valid_to").is_null().alias("_open")
    )
    named = frame.filter(pl.col("sender_addr").is_null() & pl.col("hostname").is_not_null()).select(
        "_row", "ts", pl.col("hostname").str.split(".").list.first().alias("_short"), "hostname"
    )
    candidates = pl.concat(
        [
            named.join(spans, left_on="hostname", right_on="vm_name"),
            named.filter(pl.col("_short") != pl.col("hostname")).join(
                spans, left_on="_short", right_on="vm_name"
            ),
        ],
        how="diagonal_relaxed",
    )
    by_name = (
        candidates.filter(
            (pl.col("ts") >= pl.col("valid_from")) & (pl.col("_open") | (pl.col("ts") < pl.col("valid_to")))
        )
        .group_by("_row")
        .agg(pl.col("vm_id").unique().alias("_ids"))
        .filter(pl.col("_ids").list.len() == 1)  # two VMs of that name alive then: do not guess
        .select("_row", pl.col("_ids").list.first().alias("_by_name"))
    )
    frame = (
        frame.join(by_name, on="_row", how="left")
        .with_columns(pl.coalesce("_by_addr", "_by_name").alias("vm_id"))
        .sort("_row")
    )
    return frame.select([f.name for f in VM_LOGS]).to_arrow().cast(VM_LOGS)


class LogAttributor:
    """attribute_logs with the leases of the lines' days, read once and widened when a batch of lines falls
    outside them (a planted file), up to _REBUILDS times, then every lease. Call it on VM_LOGS tables."""

    COLUMNS = ("addr", "vm_id", "vm_name", "valid_from", "valid_to")

    def __init__(self, lake: Lake, days: Iterable[str] = ()) -> None:
        self.lake = lake
        self.span = _span_of_days(sorted(set(days))) if days else None
        self.leases: pa.Table | None = None
        self.reads = 0
        self.whole = False  # every lease read: nothing widens any more
        self.attributed = 0  # lines given a VM
        # the vm_leases versions the lines were attributed with (read before and after each read of them: a
        # commit in between shows as two): one, still the table's after correlation's lease update, means the
        # lines need no re-attribution (correlate's `logs_landed_with`)
        self.versions: set[int | None] = set()

    def _leases_for(self, logs: pa.Table) -> pa.Table:
        span, now = _days_of(logs.column("ts")), self.span
        outside = span is not None and (now is None or span[0] < now[0] or span[1] > now[1])
        if outside and not self.whole:
            self.span = _hull(span, now)
            self.leases = None
        if self.leases is None:
            self.whole = self.reads >= _REBUILDS or self.span is None
            self.versions.add(self.lake.version("vm_leases"))
            self.leases = read_leases(
                self.lake, columns=list(self.COLUMNS), during=None if self.whole else self.span
            )
            self.versions.add(self.lake.version("vm_leases"))
            self.reads += 1
        return self.leases

    def __call__(self, logs: pa.Table) -> pa.Table:
        logs = conform(logs, VM_LOGS)
        table = attribute_logs(logs, self._leases_for(logs) if logs.num_rows else pa.table({}))
        self.attributed += table.num_rows - table.column("vm_id").null_count
        return table


def log_attributor(lake: Lake) -> LogAttributor | None:
    """What `ingest syslog` gives its writer: lines land attributed with the leases of the moment (as the
    collector's flows do), so that a run killed after their commit, before correlate re-attributed their days,
    leaves no line without its VM (a rerun skips the file; session-27 review). None when there are no leases."""
    return LogAttributor(lake) if lake.files("vm_leases") else None


# what correlate's `logs_landed_with` takes when the caller cannot say which leases the lines landed with
UNKNOWN_LEASES = object()


def landed_with(lake: Lake, attributor: LogAttributor | None, before: int | None) -> Any:
    """The vm_leases version the log lines an ingest just landed were attributed with, for correlate's
    `logs_landed_with`: the attributor's one version (UNKNOWN_LEASES when its reads saw two), or, without an
    attributor (no lease file then: the lines landed without a VM), `before`, the version read before it was
    made, when the table is still at it."""
    if attributor is None:
        return before if lake.version("vm_leases") == before else UNKNOWN_LEASES
    if not attributor.versions:  # (no line was attributed: none landed)
        return before
    return next(iter(attributor.versions)) if len(attributor.versions) == 1 else UNKNOWN_LEASES


def reattribute_logs(
    lake: Lake,
    days: Iterable[str],
    spans: Any = None,
    span_days: Iterable[str] = (),
    basis: int | None = None,
) -> tuple[int, int]:
    """Re-set vm_id of the vm_logs lines of `days` from the current leases, one commit per day. Returns
    (files rewritten, lines attributed to a VM). `spans`, `span_days`, `basis`: as attribute_flows, of the
    days in `span_days` only the files holding lines of the spans' times are rewritten (every hourly update
    rewrote the whole day's lines: 77 k -> 400 k lines re-attributed from the first hour to the sixth of a day
    of 500 k lines an hour, a cost growing with the day; performance review, session 38)."""
    days = sorted(set(days))
    if not days or not lake.files("vm_logs", days):
        return 0, 0
    leases_version = lake.version("vm_leases")  # read before the leases: never newer than what is applied
    # the leases that overlap the days' lines (read_leases `during`), not every lease of the history
    attribute = LogAttributor(lake, days)

    def again(batch: pa.RecordBatch) -> pa.Table:
        return attribute(pa.Table.from_batches([batch]))

    narrowed = set(span_days) if spans is not None and (basis is None or basis == leases_version) else set()
    bounds = span_bounds(spans) if narrowed else None

    def chosen(entries: list[Any]) -> list[Any]:
        day = entries[0].day if entries else None
        if bounds is not None and day in narrowed:
            return [e for e in entries if file_meets_spans(e, "ts", bounds)]
        return entries

    info = {"operation": "attribute logs", "leases_version": leases_version}
    select = chosen if narrowed else None
    files = lake.rewrite("vm_logs", days, again, select=select, info=info)["files_removed"]
    return files, attribute.attributed


ATTRIBUTION_HISTORY = 300  # flows commits searched for the re-attribution of the last lease update


_ATTRIBUTIONS = {
    "flows": "attribute",
    "vm_logs": "attribute logs",
}  # the rewrite each table's attribution commits


def days_left_to_attribute(lake: Lake, name: str = "flows") -> set[str]:
    """The days of `name` (flows, vm_logs) that the last lease update changed and that no attribution with
    those leases has rewritten since (or not within the last ATTRIBUTION_HISTORY commits of the table: then
    again, idempotent): what a run killed between the lease commit and the re-attribution left to do."""
    built = next(iter(lake.commit_infos("vm_leases")), {})
    # (an incremental update records the days of each table apart: leases.days_meeting_spans)
    days = set(built.get(f"{name}_days", built.get("days", []))) & set(lake.days(name))
    if not days:
        return days
    for info in lake.commit_infos(name, ATTRIBUTION_HISTORY):
        if info.get("operation") == _ATTRIBUTIONS[name] and info.get("leases_version") == built["version"]:
            days.discard(info.get("day"))
    return days


@dataclass
class CorrelationResult:
    """What correlation did after ingest: the lease update (full or incremental), the days re-attributed,
    flows and VM log lines attributed. `error` and exit code 5 when it failed (what landed stays landed)."""

    leases: dict[str, Any] = field(default_factory=dict)
    days: list[str] = field(default_factory=list)
    flows: dict[str, Any] | None = None
    logs_files: int = 0
    logs_attributed: int | None = None
    lease_rows: int = 0
    vms: int = 0
    error: str | None = None
    exit_code: int = EXIT_OK
    # the failure itself (error adds what to do after an ingest), and whether it was the lake that could not be
    # written (a full disk, a read-only folder): a `leases rebuild` that fails so is exit 4, not "run leases rebuild"
    cause: str | None = None
    unwritable: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def correlate(
    lake: Lake,
    days: Iterable[str] = (),
    log_days: Iterable[str] = (),
    reclaim_interval: dt.timedelta | None = None,
    full: bool = False,
    at_once: int | None = None,
    progress: Callable[[str], None] | None = None,
    logs_landed_with: Any = UNKNOWN_LEASES,
) -> CorrelationResult:
    """After ingest: update the leases from the events landed since they were built, then attribute the flows
    of `days` and the VM log lines of `log_days` (what ingest touched) and of every day whose leases changed.
    `logs_landed_with`: the vm_leases version the lines of `log_days` were attributed with as they landed
    (landed_with); when the table is still at that version after the lease update, those days are not
    rewritten again for them (a file of lines dated on 3,000 days made 3,000 rewrites of one commit each: 230 s
    and a 405 MB log, session-27 review). Never raises for a failure of its own: the result carries it (exit
    code 5) so that the caller still reports what landed; environment errors (TracepipeError) keep their own
    code."""
    result = CorrelationResult()
    try:
        result.leases, updated_days, spans = dict(NO_LEASE_UPDATE, days=[]), set(), None
        left = days_left_to_attribute(lake)  # (before the update: what a killed run left, done whole)
        left_logs = days_left_to_attribute(lake, "vm_logs")
        if lake.files("vm_events"):
            from tracepipe.correlate.leases import refresh_leases  # imports polars

            update = refresh_leases(lake, reclaim_interval, full=full, at_once=at_once, progress=progress)
            result.leases, updated_days, spans = update.to_dict(), update.days, update.spans
            # (the spans narrow only the days of the commit they are the changes of: another update's commit
            # since brings days of its own, which days_left_to_attribute reads from it)
            spans = spans if spans is not None and update.spans_version == lake.version("vm_leases") else None
        basis = lake.version("vm_leases")  # (before what changed is read: the leases it is judged against)
        changed = updated_days | days_left_to_attribute(lake)
        flow_days = (changed | set(days)) & set(lake.days("flows"))
        if flow_days and lake.files("vm_leases"):
            # of a day whose leases did not change, the files attributed before are so with these leases: only
            # what ingest landed is attributed (an hourly capture into a day of 10^8 flows rewrote all of them);
            # of a day an incremental update changed, what landed and the files of the times it changed
            result.flows = attribute_flows(
                lake,
                flow_days,
                new_only=flow_days - changed,
                spans=spans,
                span_days=updated_days - left,
                basis=basis,
            )
        whole_logs = days_left_to_attribute(lake, "vm_logs") - updated_days
        whole_logs |= left_logs
        if logs_landed_with is UNKNOWN_LEASES or logs_landed_with != lake.version("vm_leases"):
            whole_logs |= set(log_days)
        logs = (updated_days | whole_logs) & set(lake.days("vm_logs"))
        if logs:
            # of a day only the lease update changed, the files of the times it changed (as for flows); days a
            # killed run left, and lines landed with other leases, whole
            result.logs_files, result.logs_attributed = reattribute_logs(
                lake, logs, spans=spans, span_days=updated_days - whole_logs, basis=basis
            )
        result.days = sorted(flow_days | logs)
        result.lease_rows = sum(e.rows for e in lake.entries("vm_leases"))
        result.vms = sum(e.rows for e in lake.entries("vms"))
    except TracepipeError as exc:
        result.error = str(exc)
        result.exit_code = exc.exit_code if not isinstance(exc, LakeError) else EXIT_ATTRIBUTION
        result.unwritable = isinstance(exc, LakeError)
    except Exception as exc:  # a bug or a planted file: report it with its own exit code, never swallow it
        # (delta-rs' messages carry terminal colours: plain text in a cron mail)
        result.error = _ANSI.sub("", f"{type(exc).__name__}: {exc}")
        result.exit_code = EXIT_ATTRIBUTION
        result.unwritable = isinstance(exc, OSError) or "LocalFileSystem error" in result.error
    result.cause = result.error
    if result.error:
        result.error = (
            f"attribution failed: {result.error}. What was ingested has landed; finish with "
            f"`tracepipe leases rebuild --lake {lake.root}` (it rebuilds the leases and attributes every day)"
        )
    return result


def correlate_landed_logs(
    lake: Lake, log_days: Iterable[str], attributor: LogAttributor | None, before: int | None
) -> CorrelationResult:
    """correlate() after VM log lines landed attributed by `attributor` (log_attributor; `before`: the vm_leases
    version read before it was made): their days are rewritten only when the leases changed since (landed_with).
    When no day was rewritten, `logs_attributed` is the lines the attributor gave a VM as they landed."""
    log_days = set(log_days)
    result = correlate(lake, log_days=log_days, logs_landed_with=landed_with(lake, attributor, before))
    if result.logs_attributed is None and result.error is None and log_days:
        result.logs_attributed = attributor.attributed if attributor is not None else 0
    return result


@dataclass
class AttributionResult:
    """What `tracepipe attribute` did. Exit code 0 also when the days hold no flows (rows 0: nothing to do is
    an answer); a day that does not parse is a UsageError (2); no lake, or one that cannot be rewritten, a
    LakeError (4); a failure of attribution itself an AttributionError (5)."""

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
    try:
        return AttributionResult(**attribute_flows(lake, days, progress))
    except TracepipeError:
        raise
    except Exception as exc:
        raise AttributionError(
            f"attribution failed: {type(exc).__name__}: {exc}. Rebuild the leases with "
            f"`tracepipe leases rebuild --lake {lake.root}`, then run this again"
        ) from exc
