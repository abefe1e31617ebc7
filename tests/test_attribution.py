"""attribution.attribute_flows over real Parquet: each end of a flow gets the VM whose lease was valid at
ts_start (reused addresses: each VM in its own interval, never both), files keep their rows and order, reruns
change nothing, and flows_attributed answers the same before (query-time ASOF) and after attribution."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracepipe import query
from tracepipe.correlate.attribution import attribute_flows
from tracepipe.lake import Lake, ingest_table
from tracepipe.schema import FLOWS, VM_FACTS, VM_LEASES, VMS

DAY1 = dt.datetime(2024, 3, 12, tzinfo=dt.UTC)
DAY2 = dt.datetime(2024, 3, 13, tzinfo=dt.UTC)


def at(base: dt.datetime, hours: float) -> dt.datetime:
    return base + dt.timedelta(hours=hours)


# 10.0.0.5: vm-a 07:00-09:00 (deleted), nobody 09:00-10:00, vm-b from 10:00 (still holds it, into day 2).
# 2001:db8::7: vm-c 08:00-12:00. 10.0.0.9: vm-d from 06:00 on day 2.
LEASES = [
    {
        "addr": "10.0.0.5",
        "vm_id": "vm-a",
        "vm_name": "alpha",
        "project": "physics",
        "user": "ann",
        "hypervisor": "compute-1",
        "valid_from": at(DAY1, 7),
        "valid_to": at(DAY1, 9),
        "vm_status": "deleted",
    },
    {
        "addr": "10.0.0.5",
        "vm_id": "vm-b",
        "vm_name": "beta",
        "project": "biology",
        "user": "bob",
        "hypervisor": "compute-2",
        "valid_from": at(DAY1, 10),
        "valid_to": None,
        "vm_status": "active",
    },
    {
        "addr": "2001:db8::7",
        "vm_id": "vm-c",
        "vm_name": "gamma",
        "project": "physics",
        "user": "ann",
        "hypervisor": "compute-1",
        "valid_from": at(DAY1, 8),
        "valid_to": at(DAY1, 12),
        "vm_status": "stopped",
    },
    {
        "addr": "10.0.0.9",
        "vm_id": "vm-d",
        "vm_name": "delta",
        "project": "chemistry",
        "user": "cat",
        "hypervisor": "compute-3",
        "valid_from": at(DAY2, 6),
        "valid_to": None,
        "vm_status": "active",
    },
]
VMS_ROWS = [
    {
        "vm_id": "vm-a",
        "vm_name": "alpha",
        "project": "physics",
        "user": "ann",
        "hypervisor": "compute-1",
        "status": "deleted",
        "deleted_at": at(DAY1, 9),
    },
    {
        "vm_id": "vm-b",
        "vm_name": "beta",
        "project": "biology",
        "user": "bob",
        "hypervisor": "compute-2",
        "status": "active",
    },
    {
        "vm_id": "vm-c",
        "vm_name": "gamma",
        "project": "physics",
        "user": "ann",
        "hypervisor": "compute-1",
        "status": "stopped",
    },
]  # vm-d only in leases (an inventory CSV without a vms row): names still come through

# (ts_start, src, dst, expected src_vm, expected dst_vm)
FLOWS_EXPECTED = [
    (at(DAY1, 6.5), "10.0.0.5", "198.51.100.1", None, None),  # before anyone held it
    (at(DAY1, 7), "10.0.0.5", "198.51.100.1", "vm-a", None),  # lease start is inclusive
    (at(DAY1, 8.99), "10.0.0.5", "2001:db8::7", "vm-a", "vm-c"),
    (at(DAY1, 9), "10.0.0.5", "198.51.100.1", None, None),  # lease end is exclusive: nobody
    (at(DAY1, 9.5), "198.51.100.1", "10.0.0.5", None, None),  # gap between the two VMs
    (at(DAY1, 10), "10.0.0.5", "198.51.100.2", "vm-b", None),
    (at(DAY1, 11), "2001:db8::7", "10.0.0.5", "vm-c", "vm-b"),
    (at(DAY1, 12), "2001:db8::7", "10.0.0.5", None, "vm-b"),
    (at(DAY2, 5), "10.0.0.9", "10.0.0.5", None, "vm-b"),
    (at(DAY2, 7), "10.0.0.9", "10.0.0.5", "vm-d", "vm-b"),
]


def flows_table(rows) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "ts_start": ts,
                "ts_end": ts + dt.timedelta(seconds=30),
                "src_addr": src,
                "dst_addr": dst,
                "src_port": 40000 + i,
                "dst_port": 443,
                "proto": 6,
                "packets": 3,
                "bytes": 1000 + i,
                "ip_version": 4,
                "source": f"test-row-{i}",
            }
            for i, (ts, src, dst, *_rest) in enumerate(rows)
        ],
        schema=FLOWS,
    )


@pytest.fixture()
def lake(tmp_path) -> Lake:
    lake = Lake(tmp_path / "lake")
    lake.replace_dataset("vm_leases", pa.Table.from_pylist(LEASES, schema=VM_LEASES))
    lake.replace_dataset("vms", pa.Table.from_pylist(VMS_ROWS, schema=VMS))
    ingest_table(lake, "flows", "test", "flows-attribution-test", [flows_table(FLOWS_EXPECTED)])
    return lake


def attributed_view(lake: Lake) -> list[tuple]:
    con = query.connect(lake)
    return con.sql(
        "SELECT source, src_vm, dst_vm, src_vm_name, src_project, src_user, src_hypervisor, "
        "src_vm_status, dst_vm_name, dst_project FROM flows_attributed ORDER BY source"
    ).fetchall()


def expected_by_source() -> dict[str, tuple[str | None, str | None]]:
    return {f"test-row-{i}": (row[3], row[4]) for i, row in enumerate(FLOWS_EXPECTED)}


def test_query_time_and_attributed_answers_agree(lake):
    before = attributed_view(lake)  # nothing attributed yet: ASOF join at query time
    assert {r[0]: (r[1], r[2]) for r in before} == expected_by_source()
    summary = attribute_flows(lake)
    assert summary["files"] == 2 and summary["rows"] == len(FLOWS_EXPECTED)
    assert summary["days"] == ["2024-03-12", "2024-03-13"]
    assert summary["src_attributed"] == sum(1 for r in FLOWS_EXPECTED if r[3])
    assert summary["dst_attributed"] == sum(1 for r in FLOWS_EXPECTED if r[4])
    stored = {r["source"]: (r["src_vm"], r["dst_vm"]) for r in lake.read("flows").to_pylist()}
    assert stored == expected_by_source()
    after = attributed_view(lake)
    assert after == before
    by_source = {r[0]: r for r in after}
    assert by_source["test-row-2"][3:10] == (
        "alpha",
        "physics",
        "ann",
        "compute-1",
        "deleted",
        "gamma",
        "physics",
    )
    assert by_source["test-row-9"][3:6] == ("delta", "chemistry", "cat")  # from vm_leases, no vms row


def test_reused_address_each_vm_in_its_own_interval_never_both(lake):
    attribute_flows(lake)
    con = query.connect(lake)
    rows = con.sql(
        "SELECT src_vm, min(ts_start), max(ts_start), count(*) FROM flows_attributed "
        "WHERE src_addr = '10.0.0.5' GROUP BY src_vm ORDER BY 2"
    ).fetchall()
    assert [(r[0], r[3]) for r in rows] == [(None, 2), ("vm-a", 2), ("vm-b", 1)]
    a = next(r for r in rows if r[0] == "vm-a")
    b = next(r for r in rows if r[0] == "vm-b")
    assert a[2] < at(DAY1, 9) <= at(DAY1, 10) <= b[1]
    # a flow row is never counted for two VMs: the join keeps the row count
    assert con.sql("SELECT count(*) FROM flows_attributed").fetchall() == [(len(FLOWS_EXPECTED),)]


def test_rewrite_keeps_rows_order_sort_and_is_idempotent(lake):
    path = lake.files("flows")[0]
    original = pq.read_table(path)
    attribute_flows(lake)
    [path] = [p for p in lake.files("flows") if p.parent == path.parent]  # the day's new file
    first = pq.read_table(path)
    # what attribution sets: each end's VM (and its facts, issue 18 item 4) and when
    written = ["src_vm", "dst_vm", "attributed_at", "vm_facts_at"]
    written += [f"{end}_{fact}" for end in ("src", "dst") for fact in VM_FACTS]
    assert first.drop(written).equals(original.drop(written))
    keys = list(zip(first["src_addr"].to_pylist(), first["ts_start"].to_pylist(), strict=True))
    assert keys == sorted(keys)  # the lake's sort order (src_addr, ts_start) survives
    assert (
        first["attributed_at"].null_count == 0 and original["attributed_at"].null_count == original.num_rows
    )
    # the log knows the file is attributed without opening it
    done, todo = query.flow_halves(lake)
    assert path in done and not todo
    attribute_flows(lake)
    [again] = [p for p in lake.files("flows") if p.parent == path.parent]
    stamps = ["attributed_at", "vm_facts_at"]
    assert pq.read_table(again).drop(stamps).equals(first.drop(stamps))
    assert not list(path.parent.glob("*.tmp"))


def test_only_the_given_days_are_rewritten(lake):
    summary = attribute_flows(lake, {"2024-03-13"})
    assert summary["files"] == 1 and summary["days"] == ["2024-03-13"]
    day1, day2 = lake.files("flows")
    assert pq.read_table(day1)["src_vm"].null_count == pq.read_table(day1).num_rows
    assert pq.read_table(day2)["src_vm"].to_pylist() == [None, "vm-d"]
    assert attribute_flows(lake, ["2024-01-01"])["files"] == 0
    # day 1 still answers through the query-time join
    assert {r[0]: (r[1], r[2]) for r in attributed_view(lake)} == expected_by_source()


def test_attributed_nobody_is_not_looked_up_again(lake):
    """A null src_vm in an attributed file means "nobody held it then" (as of the last attribution); a lease
    added later shows up once its days are re-attributed, which is what `ingest vm` does."""
    attribute_flows(lake)
    late = [
        *LEASES,
        {
            "addr": "198.51.100.1",
            "vm_id": "vm-e",
            "vm_name": "epsilon",
            "project": "ext",
            "valid_from": at(DAY1, 6),
            "valid_to": at(DAY1, 10),
        },
    ]
    lake.replace_dataset("vm_leases", pa.Table.from_pylist(late, schema=VM_LEASES))
    con = query.connect(lake)
    assert con.sql("SELECT count(*) FROM flows_attributed WHERE dst_vm = 'vm-e'").fetchall() == [(0,)]
    attribute_flows(lake, {"2024-03-12"})
    con = query.connect(lake)
    assert con.sql("SELECT count(*) FROM flows_attributed WHERE dst_vm = 'vm-e'").fetchall() == [(3,)]
    assert con.sql(
        "SELECT dst_vm_name, dst_project FROM flows_attributed WHERE dst_vm = 'vm-e' LIMIT 1"
    ).fetchall() == [("epsilon", "ext")]


def test_new_files_of_an_attributed_day_are_joined_at_query_time(lake):
    attribute_flows(lake)
    extra = [(at(DAY1, 8), "10.0.0.5", "198.51.100.9", "vm-a", None)]
    table = flows_table(extra).set_column(10 + 5, "source", pa.array(["late-file"]))
    ingest_table(lake, "flows", "late", "flows-attribution-late", [table])
    con = query.connect(lake)
    assert con.sql(
        "SELECT src_vm, src_vm_name FROM flows_attributed WHERE source = 'late-file'"
    ).fetchall() == [("vm-a", "alpha")]
    assert con.sql("SELECT count(*) FROM _flows_todo").fetchall() == [(1,)]


def test_empty_lake_attributes_nothing(tmp_path):
    summary = attribute_flows(Lake(tmp_path))
    assert summary["files"] == 0 and summary["rows"] == 0


@pytest.mark.parametrize("with_vms", [False, True])
def test_lease_index_agrees_with_the_query_time_asof_join(tmp_path, monkeypatch, with_vms):
    """Random non-overlapping leases on a few reused addresses (v4 and v6), flows at random times including
    exact lease boundaries: the vectorised index and DuckDB's ASOF join give the same VM for every end. With a
    vms row for every lease's VM, attribution writes each end's VM as a code over vms' ids (lease_at.CODED_VM),
    found by the polars join that big lakes take (vm_keys._rows_in, its threshold lowered to these sizes)."""
    import random

    from tracepipe.correlate import vm_keys
    from tracepipe.correlate.lease_at import CODED_VM, lease_index

    rng = random.Random(11)
    addrs = [f"10.1.0.{i}" for i in range(1, 9)] + [f"2001:db8::{i:x}" for i in range(1, 5)]
    leases, bounds = [], []
    for addr in addrs:
        clock = at(DAY1, rng.uniform(0, 2))
        for _ in range(rng.randint(1, 6)):
            start = clock + dt.timedelta(minutes=rng.randint(0, 90))
            end = None if rng.random() < 0.15 else start + dt.timedelta(minutes=rng.randint(1, 240))
            leases.append({"addr": addr, "vm_id": f"vm-{len(leases)}", "valid_from": start, "valid_to": end})
            bounds += [start] + ([end] if end else [])
            if end is None:
                break
            clock = end
    times = [at(DAY1, rng.uniform(0, 23.9)) for _ in range(400)] + [
        b for b in bounds if b.date() == DAY1.date()
    ]
    rows = [(ts, rng.choice(addrs), rng.choice([*addrs, "198.51.100.1"]), None, None) for ts in times]
    lake = Lake(tmp_path / "lake")
    lake.replace_dataset("vm_leases", pa.Table.from_pylist(leases, schema=VM_LEASES))
    if with_vms:  # in an order of their own, and one VM no lease names
        ids = [*[lease["vm_id"] for lease in leases][::-1], "vm-none"]
        lake.replace_dataset(
            "vms", pa.Table.from_pylist([{"vm_id": i, "vm_name": f"n-{i}"} for i in ids], VMS)
        )
        monkeypatch.setattr(vm_keys, "_JOIN_ROWS", 1)
    assert (CODED_VM in lease_index(lake, vm_keys=True).leases.column_names) == with_vms
    ingest_table(lake, "flows", "random", "flows-random-asof", [flows_table(rows)])
    sql = "SELECT source, src_vm, dst_vm FROM flows_attributed ORDER BY source"
    by_asof = query.connect(lake).sql(sql).fetchall()
    attribute_flows(lake)
    con = query.connect(lake)
    assert con.sql("SELECT count(*) FROM _flows_todo").fetchall() == [(0,)]
    assert con.sql(sql).fetchall() == by_asof
    stored = lake.read("flows").sort_by("source")
    assert (
        list(zip(*(stored.column(c).to_pylist() for c in ("source", "src_vm", "dst_vm")), strict=True))
        == by_asof
    )
    if with_vms:
        assert stored.column("src_vm_name").to_pylist() == [
            v and f"n-{v}" for v in stored.column("src_vm").to_pylist()
        ]
    assert sum(1 for r in by_asof if r[1]) > 100  # the comparison is not between two empty answers


def _lease_history(rng, addrs: list[str], start: dt.datetime, days: int) -> list[dict]:
    """Non-overlapping leases of `addrs` over `days` days from `start`: hours to days long, some still held,
    some ending or starting exactly at a UTC midnight."""
    leases = []
    for addr in addrs:
        clock = start + dt.timedelta(hours=rng.uniform(0, 12))
        while clock < start + dt.timedelta(days=days):
            begin = clock + dt.timedelta(hours=rng.choice([0, 0, rng.uniform(0, 30)]))
            if rng.random() < 0.2:  # from a midnight
                begin = dt.datetime.combine(begin.date(), dt.time(), dt.UTC) + dt.timedelta(days=1)
            end = begin + dt.timedelta(hours=rng.uniform(1, 60))
            if rng.random() < 0.2:  # to a midnight
                end = dt.datetime.combine(end.date(), dt.time(), dt.UTC) + dt.timedelta(days=1)
            open_ = rng.random() < 0.05
            leases.append(
                {
                    "addr": addr,
                    "vm_id": f"vm-{len(leases)}",
                    "valid_from": begin,
                    "valid_to": None if open_ else end,
                }
            )
            if open_:
                break
            clock = end
    return leases


def _reference(leases: list[dict], flows: pa.Table) -> list[tuple]:
    """Each flow's (src VM, dst VM) by a LeaseIndex over every lease of the history."""
    from tracepipe.correlate.lease_at import lease_at

    table = pa.Table.from_pylist(leases, schema=VM_LEASES)
    ends = [
        lease_at(table, flows.column(f"{e}_addr"), flows.column("ts_start")).column("vm_id")
        for e in ("src", "dst")
    ]
    return list(zip(*(e.to_pylist() for e in ends), strict=True))


def test_attribution_indexes_only_the_leases_of_its_days_with_the_same_answers(tmp_path):
    """Leases over three weeks, flows on two days (at random times, at midnights, at lease boundaries):
    attribute_flows indexes only the leases that overlap those days, and gives every flow the VM an index of
    the whole history gives."""
    import random

    rng = random.Random(23)
    addrs = [f"10.2.0.{i}" for i in range(1, 25)] + [f"2001:db8::{i:x}" for i in range(1, 9)]
    leases = _lease_history(rng, addrs, DAY1 - dt.timedelta(days=10), 21)
    lake = Lake(tmp_path / "lake")
    lake.replace_dataset("vm_leases", pa.Table.from_pylist(leases, schema=VM_LEASES))
    bounds = [
        t
        for lease in leases
        for t in (lease["valid_from"], lease["valid_to"])
        if t and DAY1 <= t < DAY2 + dt.timedelta(days=1)
    ]
    times = [at(DAY1, rng.uniform(0, 47.99)) for _ in range(600)] + bounds + [DAY1, DAY2]
    rows = [(t, rng.choice(addrs), rng.choice([*addrs, "198.51.100.7"]), None, None) for t in times]
    ingest_table(lake, "flows", "two-days", "flows-two-days", [flows_table(rows)])
    summary = attribute_flows(lake)
    assert summary["days"] == ["2024-03-12", "2024-03-13"]
    overlapping = [
        lease
        for lease in leases
        if lease["valid_from"] < DAY2 + dt.timedelta(days=1)
        and (lease["valid_to"] is None or lease["valid_to"] > DAY1)
    ]
    assert summary["leases"] == len(overlapping) < len(leases) / 3
    stored = lake.read("flows").sort_by("source")
    got = list(zip(stored.column("src_vm").to_pylist(), stored.column("dst_vm").to_pylist(), strict=True))
    assert got == _reference(leases, stored)
    assert sum(1 for src, _ in got if src) > 300  # not two empty answers


def test_log_lines_are_reattributed_from_the_leases_of_their_days_with_the_same_answers(
    tmp_path, monkeypatch
):
    """VM log lines on two days of three weeks of leases, by sender address and by hostname (names shared by
    VMs at other times, a short name, VMs of two leases): reattribute_logs reads only the leases that overlap
    those days and gives every line the VM attribute_logs gives over every lease of the history; a planted
    line far outside its day widens the leases read, never a wrong answer."""
    import random

    from tracepipe.correlate import attribution
    from tracepipe.correlate.attribution import attribute_logs, reattribute_logs
    from tracepipe.schema import VM_LOGS

    rng = random.Random(29)
    addrs = [f"10.3.0.{i}" for i in range(1, 25)] + [f"2001:db8::{i:x}" for i in range(1, 9)]
    leases = _lease_history(rng, addrs, DAY1 - dt.timedelta(days=10), 21)
    for lease in leases:  # a VM of two leases now and then; names that several VMs have over time
        lease["vm_name"] = f"host-{rng.randrange(12)}"
        if rng.random() < 0.3:
            lease["vm_id"] = leases[max(0, leases.index(lease) - 1)]["vm_id"]
    lake = Lake(tmp_path / "lake")
    lake.replace_dataset("vm_leases", pa.Table.from_pylist(leases, schema=VM_LEASES))
    times = [at(DAY1, rng.uniform(0, 47.99)) for _ in range(500)] + [DAY1, DAY2]
    for lease in leases:
        times += [
            t
            for t in (lease["valid_from"], lease["valid_to"])
            if t and DAY1 <= t < DAY1 + dt.timedelta(days=2)
        ]
    rows = []
    for i, t in enumerate(times):
        by_addr = rng.random() < 0.5
        name = f"host-{rng.randrange(14)}" + rng.choice(["", ".cern.ch"])
        rows.append(
            {
                "ts": t,
                "sender_addr": rng.choice(addrs) if by_addr else None,
                "hostname": name,
                "message": "x",
                "source": "logs",
                "line": i,
            }
        )
    logs = pa.Table.from_pylist(rows, schema=VM_LOGS)
    ingest_table(lake, "vm_logs", "two-days", "logs-two-days", [logs])
    read = []
    real = attribution.read_leases

    def counted(*args, **kwargs):
        table = real(*args, **kwargs)
        read.append(table.num_rows)
        return table

    monkeypatch.setattr(attribution, "read_leases", counted)
    files, attributed = reattribute_logs(lake, ["2024-03-12", "2024-03-13"])
    assert files == 2 and len(read) == 1 and read[0] < len(leases) / 3
    every = pa.Table.from_pylist(leases, schema=VM_LEASES)
    stored = lake.read("vm_logs").sort_by("line")
    want = attribute_logs(stored, every).column("vm_id").to_pylist()
    assert stored.column("vm_id").to_pylist() == want
    assert attributed == sum(1 for v in want if v) and sum(1 for v in want if v) > 150
    # lines of other times in a day's files (planted): the leases read widen to them, the answers stay those
    # of every lease; after _REBUILDS reads, every lease is read
    outside = [
        {**rows[0], "ts": DAY1 + dt.timedelta(days=9, hours=h), "sender_addr": a, "line": 10_000 + j}
        for j, (h, a) in enumerate((rng.uniform(0, 24), rng.choice(addrs)) for _ in range(40))
    ]
    ends = pa.array([-(2**63) + 1, 2**63 - 1], pa.int64()).cast(VM_LOGS.field("ts").type)
    extreme = logs.slice(0, 2).set_column(0, VM_LOGS.field("ts"), ends)
    later = [{**row, "ts": row["ts"] + dt.timedelta(days=20)} for row in outside]
    batches = [
        logs.slice(0, 50),
        pa.Table.from_pylist(outside, schema=VM_LOGS),
        extreme,
        logs.slice(50, 50),
        pa.Table.from_pylist(later, schema=VM_LOGS),  # after every lease was read: nothing read again
    ]
    out = []

    def rewrite(name, days, again, select=None, info=None):
        out.extend(again(b) for t in batches for b in t.to_batches())
        return {"files_removed": 1}

    monkeypatch.setattr(lake, "rewrite", rewrite)
    read.clear()
    reattribute_logs(lake, ["2024-03-12"])
    assert len(read) == 3 and read[0] < read[1] < read[2] == len(leases)
    for batch, done in zip(batches, out, strict=True):
        assert done.column("vm_id").to_pylist() == attribute_logs(batch, every).column("vm_id").to_pylist()
    assert sum(1 for v in out[1].column("vm_id").to_pylist() if v) > 5


def test_an_attributor_indexes_again_only_for_new_days_or_changed_leases(tmp_path):
    """The collector's committer keeps one Attributor: flows of the days it indexed reuse its index; flows of
    another day widen its days and index again; a change of vm_leases (refresh) indexes again. Every answer is
    the whole history's."""
    import random

    from tracepipe.correlate.attribution import Attributor

    rng = random.Random(5)
    addrs = [f"10.3.0.{i}" for i in range(1, 17)]
    leases = _lease_history(rng, addrs, DAY1 - dt.timedelta(days=5), 12)
    lake = Lake(tmp_path / "lake")
    lake.replace_dataset("vm_leases", pa.Table.from_pylist(leases, schema=VM_LEASES))
    attributor = Attributor(lake)
    attributor.refresh()

    def batch(day: dt.datetime) -> pa.Table:
        rows = [
            (at(day, rng.uniform(0, 23.99)), rng.choice(addrs), rng.choice(addrs), None, None)
            for _ in range(200)
        ]
        return flows_table(rows)

    def check(flows: pa.Table, builds: int, leases_now: list[dict]) -> None:
        out = attributor(flows)
        assert attributor.builds == builds
        assert list(zip(out.column("src_vm").to_pylist(), out.column("dst_vm").to_pylist(), strict=True)) == (
            _reference(leases_now, flows)
        )

    check(batch(DAY1), 1, leases)
    check(batch(DAY1), 1, leases)
    first = len(attributor.index)
    check(batch(DAY1 + dt.timedelta(days=3)), 2, leases)
    assert attributor.span == (DAY1, DAY1 + dt.timedelta(days=4)) and len(attributor.index) > first
    attributor.refresh()
    check(batch(DAY1 + dt.timedelta(days=1)), 2, leases)
    moved = [dict(lease, vm_id=f"{lease['vm_id']}-b") for lease in leases]  # every lease given to another VM
    lake.replace_dataset("vm_leases", pa.Table.from_pylist(moved, schema=VM_LEASES))
    attributor.refresh()
    check(batch(DAY1 + dt.timedelta(days=2)), 3, moved)
    # a lake made again at the same path, at the same versions
    version = lake.version("vm_leases")
    shutil.rmtree(lake.root)
    lake = Lake(lake.root)
    for table in (moved, leases):
        lake.replace_dataset("vm_leases", pa.Table.from_pylist(table, schema=VM_LEASES))
    assert lake.version("vm_leases") == version
    attributor.lake = lake
    attributor.refresh()
    check(batch(DAY1 + dt.timedelta(days=2)), 4, leases)
    # the collector's: one segment after the other, its days follow the flows, never wider than two days
    attributor = Attributor(lake, widest=dt.timedelta(days=2))

    def segment(day: dt.datetime, builds: int) -> None:
        attributor.refresh()
        check(batch(day), builds, leases)
        assert not attributor.whole

    segment(DAY1, 1)
    segment(DAY1, 1)
    segment(DAY2, 2)
    assert attributor.span == (DAY1, DAY2 + dt.timedelta(days=1))
    segment(DAY2 + dt.timedelta(days=1), 3)
    assert attributor.span == (DAY2 + dt.timedelta(days=1), DAY2 + dt.timedelta(days=2))
    segment(DAY1 - dt.timedelta(days=4), 4)  # an exporter's clock days behind
    assert attributor.span == (DAY1 - dt.timedelta(days=4), DAY1 - dt.timedelta(days=3))
    # flows jumping around the calendar within one segment: two indexes of days, then every lease, once
    check(batch(DAY1 + dt.timedelta(days=5)), 5, leases)
    assert not attributor.whole
    check(batch(DAY1 - dt.timedelta(days=2)), 6, leases)
    assert attributor.whole and len(attributor.index) == len(leases)
    for day in (7, -5, 1, 6):
        check(batch(DAY1 + dt.timedelta(days=day)), 6, leases)
    attributor.refresh()  # unchanged leases: the whole index serves the next segments too
    check(batch(DAY1 + dt.timedelta(days=3)), 6, leases)
    # a segment with one flow days old widens its days to them; once the leases change, the days follow the
    # flows again (not the wide days of before)
    wide = pa.concat_tables([batch(DAY1 + dt.timedelta(days=6)), batch(DAY1)])
    lake.replace_dataset("vm_leases", pa.Table.from_pylist(moved, schema=VM_LEASES))
    attributor.refresh()
    check(wide, 7, moved)
    assert attributor.span == (DAY1, DAY1 + dt.timedelta(days=7)) and not attributor.whole
    lake.replace_dataset("vm_leases", pa.Table.from_pylist(leases, schema=VM_LEASES))
    attributor.refresh()
    check(batch(DAY1 + dt.timedelta(days=6)), 8, leases)
    assert attributor.span == (DAY1 + dt.timedelta(days=6), DAY1 + dt.timedelta(days=7))


def test_attribute_command(lake):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tracepipe.cli",
            "attribute",
            "--day",
            "2024-03-13",
            "--format",
            "json",
            "--lake",
            str(lake.root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["files"], summary["rows"], summary["src_attributed"], summary["dst_attributed"]) == (
        1,
        2,
        1,
        2,
    )
    day1, day2 = lake.files("flows")
    assert pq.read_table(day2)["attributed_at"].null_count == 0
    assert pq.read_table(day1)["attributed_at"].null_count == pq.read_table(day1).num_rows
    assert query.flow_halves(lake) == ([day2], [day1])


def test_a_failed_attribution_is_exit_code_5_the_flows_stay_and_rebuild_repairs(tmp_path):
    """Regression (issue 18): attribution failures ended `ingest netflow` with exit 0 and a warning. A lease
    file that cannot be read (planted, or torn by hand) now fails the command with exit 5 and the way out,
    the flows stay landed, and `tracepipe leases rebuild` repairs the lake."""
    from conftest import ingest_vm, run_tracepipe

    from tracepipe.demo import STORY_DIR

    lake = Lake(tmp_path / "lake")
    ingest_vm(lake, [STORY_DIR / "nova" / "notifications.jsonl"], reclaim_interval=dt.timedelta(days=7))
    for path in lake.files("vm_leases"):
        path.write_bytes(b"PAR1 not a parquet file")
    capture = STORY_DIR / "netflow" / "openstack-softflowd-v9.pcap"
    run = run_tracepipe("ingest", "netflow", str(capture), "--lake", str(lake.root))
    assert run.returncode == 5, run.stderr
    assert "attribution failed" in run.stderr and "tracepipe leases rebuild" in " ".join(run.stderr.split())
    landed = Lake(lake.root)
    assert sum(e.rows for e in landed.entries("flows")) > 0
    assert all(e.null_counts.get("attributed_at") == e.rows for e in landed.entries("flows"))
    fixed = run_tracepipe("leases", "rebuild", "--lake", str(lake.root), "--format", "json")
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout)["flows"]["rows"] > 0
    again = Lake(lake.root)
    assert all(e.null_counts.get("attributed_at") == 0 for e in again.entries("flows"))
    assert again.read("vm_leases").num_rows > 0


def test_an_ingest_into_a_lake_without_leases_never_imports_polars(tmp_path):
    """Issue 17: `ingest netflow` paid polars' import (0.2-0.35 s) in the attribution step even when the lake had
    no lifecycle events. The real CLI, in a fresh interpreter: the flows land, correlation reports the empty
    lease update, and polars was never loaded."""
    import subprocess
    import sys
    from pathlib import Path

    sample = Path(__file__).resolve().parent.parent / "sample_data" / "netflow" / "nfdump-v9.csv"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['tracepipe', 'ingest', 'netflow', {str(sample)!r}, '--lake', {str(tmp_path / 'lake')!r},"
        " '--format', 'json']\n"
        "try:\n    runpy.run_module('tracepipe.cli', run_name='__main__')\n"
        "except SystemExit as exit:\n    code = exit.code\n"
        "print('POLARS', 'polars' in sys.modules, code, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "POLARS False 0" in proc.stderr, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["totals"]["flows"] > 0
    assert summary["correlation"]["leases"]["mode"] == "none"


def test_the_empty_lease_update_is_what_leases_py_reports():
    """attribution.NO_LEASE_UPDATE is written out (to keep leases.py and polars unloaded); it must stay equal to
    what a LeaseUpdate with nothing done reports."""
    from tracepipe.correlate.attribution import NO_LEASE_UPDATE
    from tracepipe.correlate.leases import LeaseUpdate

    assert LeaseUpdate().to_dict() == NO_LEASE_UPDATE


def test_planted_days_and_times_do_not_stop_attribution(tmp_path):
    """A day in the log that is no date (a planted partition) and flow times at the ends of what a timestamp
    holds (year 1, year 294,247: a planted file) leave attribution working, with the answers of an index of
    every lease; a vms file whose statistics are of another type is read rather than skipped."""
    import random
    from types import SimpleNamespace

    from tracepipe.correlate import vm_keys
    from tracepipe.correlate.attribution import Attributor

    rng = random.Random(3)
    addrs = [f"10.4.0.{i}" for i in range(1, 9)]
    leases = _lease_history(rng, addrs, DAY1 - dt.timedelta(days=2), 5)
    lake = Lake(tmp_path / "lake")
    lake.replace_dataset("vm_leases", pa.Table.from_pylist(leases, schema=VM_LEASES))
    attributor = Attributor(lake, days=["date-planted", "2024-03-12", "", "9999-12-31"])
    assert attributor.span == (DAY1, DAY2)
    rows = [
        (at(DAY1, rng.uniform(0, 23)), rng.choice(addrs), rng.choice(addrs), None, None) for _ in range(50)
    ]
    flows = flows_table(rows)
    ends = pa.array([-(2**63) + 1, 2**63 - 1, 0], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    extreme = flows.slice(0, 3).set_column(
        flows.schema.get_field_index("ts_start"), flows.schema.field("ts_start"), ends
    )
    for batch in (flows, extreme, pa.concat_tables([flows, extreme])):
        out = attributor(batch)
        got = list(zip(out.column("src_vm").to_pylist(), out.column("dst_vm").to_pylist(), strict=True))
        assert got == _reference(leases, batch)
    assert sum(1 for src, _ in got if src) > 20
    since = DAY1
    odd = SimpleNamespace(null_counts={"deleted_at": 0}, maxs={"deleted_at": "2020-01-01"})
    assert vm_keys._alive_since(odd, since)
    odd.maxs = {"deleted_at": DAY1 - dt.timedelta(days=9), "quarantine_until": 7}
    assert vm_keys._alive_since(odd, since)
    odd.maxs = {"deleted_at": DAY1 - dt.timedelta(days=9)}
    assert not vm_keys._alive_since(odd, since)


def test_an_ingest_attributes_what_it_landed_not_every_flow_of_its_days(story_lake, tmp_path):
    """`ingest netflow` lands flows, then correlation attributes the days it touched: every file of those
    days was rewritten, so an hourly capture into a day of 10^8 flows rewrote all of them, every hour (the
    day's ingest cost grew with the day). Now, of a day whose leases did not change, only the files holding
    unattributed flows are rewritten; the others were attributed with these leases already."""
    import polars as pl

    from tracepipe.correlate.attribution import correlate
    from tracepipe.ingest.flows import ingest_flow_files

    root = tmp_path / "lake"
    shutil.copytree(story_lake, root)
    lake = Lake(root)
    first = correlate(lake, days=lake.days("flows"))  # (the story lands its flows unattributed)
    assert first.error is None and first.flows["rows"] == sum(e.rows for e in lake.entries("flows"))
    story = (
        Path(__file__).resolve().parents[1]
        / "tracepipe"
        / "demo_story"
        / "netflow"
        / "openstack-softflowd-v9.pcap"
    )
    again = tmp_path / "again.pcap"
    data = bytearray(story.read_bytes())
    data[8:12] = (
        b"\x01\x00\x00\x00"  # (the header's time zone, which no reader uses: another file, same flows)
    )
    again.write_bytes(bytes(data))
    landed = ingest_flow_files(lake, [again])
    assert landed.exit_code == 0 and landed.flows > 0
    done = correlate(lake, days=landed.days)
    assert done.error is None and done.flows["rows"] == landed.flows  # its flows only, not the days' others
    # every flow attributed, each copy exactly as its original was
    flows = pl.from_arrow(lake.read("flows"))
    assert flows.get_column("attributed_at").null_count() == 0
    key = ["src_addr", "dst_addr", "src_port", "dst_port", "proto", "ts_start", "bytes", "packets"]
    copies = flows.group_by(key).agg(
        pl.len().alias("n"), pl.struct("src_vm", "dst_vm").n_unique().alias("vms")
    )
    assert copies.get_column("n").max() >= 2 and copies.get_column("vms").max() == 1


def test_days_a_killed_run_left_unattributed_are_carried_by_the_next_lease_commit(tmp_path):
    """A run killed between its lease commit and the attribution leaves days to attribute (the commit records
    them, attribution.days_left_to_attribute). The next update's commit used to record only its own days: the
    left ones were never attributed, their flows kept VMs of older leases. Now the commit carries them."""
    from tracepipe.correlate.attribution import correlate, days_left_to_attribute
    from tracepipe.correlate.leases import refresh_leases
    from tracepipe.lake import hash_bytes
    from tracepipe.schema import VM_EVENTS

    lake = Lake(tmp_path / "lake")

    def land(name: str, rows: list[dict]) -> None:
        base = {"cloud": "test", "project": "p", "user": "u", "hypervisor": "h1", "event_type": "x"}
        table = pa.Table.from_pylist([{**base, **r} for r in rows], schema=VM_EVENTS)
        ingest_table(lake, "vm_events", name, hash_bytes(name.encode()), [table])

    land(
        "create",
        [
            {"ts": at(DAY1, 0), "vm_id": v, "action": "create", "addrs": [a]}
            for v, a in (("a", "10.0.0.5"), ("b", "10.0.0.9"))
        ],
    )
    flows = [
        {"ts_start": at(day, 12), "ts_end": at(day, 12), "src_addr": a, "dst_addr": "192.0.2.1"}
        for day in (DAY1, DAY2)
        for a in ("10.0.0.5", "10.0.0.9")
    ]
    ingest_table(lake, "flows", "flows", hash_bytes(b"flows"), [pa.Table.from_pylist(flows, schema=FLOWS)])
    assert correlate(lake, days=["2024-03-12", "2024-03-13"]).error is None
    # a's late delete (06:00 on day 1): its lease is now over on both days; the run is killed before it attributes
    land("delete-a", [{"ts": at(DAY1, 6), "vm_id": "a", "action": "delete"}])
    assert refresh_leases(lake).days == {"2024-03-12", "2024-03-13"}
    assert days_left_to_attribute(lake) == {"2024-03-12", "2024-03-13"}
    # the next run: b deleted on day 2 (changes day 2 only), then its correlation
    land("delete-b", [{"ts": at(DAY2, 18), "vm_id": "b", "action": "delete"}])
    done = correlate(lake)
    assert done.error is None and "2024-03-12" in done.days
    assert set(lake.commit_infos("vm_leases")[0]["days"]) >= {"2024-03-12", "2024-03-13"}
    assert days_left_to_attribute(lake) == set()
    got = sorted(
        zip(
            *(lake.read("flows").column(c).to_pylist() for c in ("ts_start", "src_addr", "src_vm")),
            strict=True,
        )
    )
    assert [vm for _, _, vm in got] == [
        None,
        "b",
        None,
        "b",
    ]  # a gone since 06:00 on day 1, b until 18:00 on day 2


def test_an_hourly_lease_update_rewrites_the_files_of_the_times_it_changed(tmp_path):
    """A VM created at 18:00 changes who holds its address from 18:00 on: the day's morning file holds no flow
    of those times and is not rewritten (an hourly update rewrote every flow of the day, growing with the
    day); what is rewritten gives what attributing everything again gives."""
    from tracepipe.correlate.attribution import correlate
    from tracepipe.lake import hash_bytes
    from tracepipe.schema import VM_EVENTS

    lake = Lake(tmp_path / "lake")

    def land(name: str, rows: list[dict]) -> None:
        base = {"cloud": "test", "project": "p", "user": "u", "hypervisor": "h1", "event_type": "x"}
        table = pa.Table.from_pylist([{**base, **r} for r in rows], schema=VM_EVENTS)
        ingest_table(lake, "vm_events", name, hash_bytes(name.encode()), [table])

    def flows_at(name: str, hour: int) -> None:
        rows = [
            {"ts_start": at(DAY1, hour), "ts_end": at(DAY1, hour), "src_addr": a, "dst_addr": "192.0.2.1"}
            for a in ("10.0.0.5", "10.0.0.9")
        ]
        ingest_table(
            lake, "flows", name, hash_bytes(name.encode()), [pa.Table.from_pylist(rows, schema=FLOWS)]
        )

    land("create-a", [{"ts": at(DAY1, 0), "vm_id": "a", "action": "create", "addrs": ["10.0.0.5"]}])
    for name, hour in (("morning", 8), ("evening", 20)):  # (two ingests: each attributes its own file)
        flows_at(name, hour)
        assert correlate(lake, days=["2024-03-12"]).error is None
    assert len(lake.entries("flows")) == 2
    morning = next(e.relative for e in lake.entries("flows") if e.maxs["ts_start"].hour == 8)
    land("create-b", [{"ts": at(DAY1, 18), "vm_id": "b", "action": "create", "addrs": ["10.0.0.9"]}])
    done = correlate(lake)
    assert done.error is None and done.leases["mode"] == "incremental" and done.days == ["2024-03-12"]
    assert done.flows["rows"] == 2  # the evening file's, not the day's four
    assert morning in {e.relative for e in lake.entries("flows")}
    got = sorted(
        zip(
            *(lake.read("flows").column(c).to_pylist() for c in ("ts_start", "src_addr", "src_vm")),
            strict=True,
        )
    )
    assert [vm for _, _, vm in got] == ["a", None, "a", "b"]
    again = attribute_flows(lake)  # everything again: the same answers
    assert again["src_attributed"] == 3
    assert (
        sorted(
            zip(
                *(lake.read("flows").column(c).to_pylist() for c in ("ts_start", "src_addr", "src_vm")),
                strict=True,
            )
        )
        == got
    )
    # a VM created at 23:00: no file holds flows of that time: nothing to rewrite, and nothing left for later
    # (the day is not recorded as changed for flows: a day recorded and not rewritten was redone whole)
    from tracepipe.correlate.attribution import days_left_to_attribute

    land("create-c", [{"ts": at(DAY1, 23), "vm_id": "c", "action": "create", "addrs": ["10.0.0.7"]}])
    late = correlate(lake)
    assert late.error is None and late.leases["mode"] == "incremental"
    assert not late.flows or late.flows["rows"] == 0
    assert days_left_to_attribute(lake) == set()


def test_a_narrowed_attribution_is_whole_days_when_the_leases_changed_since_it_was_judged(
    story_lake, tmp_path
):
    """correlate judges which files need attribution against one vm_leases version (`basis`); when another
    update committed since, the day's commit would say it is attributed with leases whose changes the narrowed
    rewrite did not look at: whole days instead."""
    root = tmp_path / "lake"
    shutil.copytree(story_lake, root)
    lake = Lake(root)
    days = lake.days("flows")
    total = sum(e.rows for e in lake.entries("flows"))
    assert attribute_flows(lake, days)["rows"] == total  # (the story lands its flows unattributed)
    current = lake.version("vm_leases")
    assert attribute_flows(lake, days, new_only=days, basis=current)["rows"] == 0  # nothing unattributed
    assert attribute_flows(lake, days, new_only=days, basis=current - 1)["rows"] == total
