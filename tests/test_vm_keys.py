"""vms.vm_key (issue 18 item 4): flows_attributed joins vms on an integer key that attribution writes into the
flow files (src_vm_key/dst_vm_key). A key must always mean the same VM: it stays with its VM across incremental
lease updates and full rebuilds, names or ids a tenant chooses never make two VMs share one, and flow files
written before the key columns existed still get their VMs through the view (joined on the text vm_id) until
re-attribution keys them."""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import write_deltalake
from support.flow_tables import flows_of

from tracepipe.correlate.attribution import attribute_flows
from tracepipe.correlate.leases import refresh_leases
from tracepipe.correlate.vm_keys import assign_vm_keys
from tracepipe.lake import Lake, hash_bytes, ingest_table
from tracepipe.query import connect, flow_parts
from tracepipe.schema import FLOWS, VM_EVENTS, VMS

SEVEN_DAYS = dt.timedelta(days=7)


def utc(hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2024, 3, 12, hour, minute, tzinfo=dt.UTC)


def _events(rows: list[dict]) -> pa.Table:
    base = {"cloud": "test", "project": "p", "user": "u", "hypervisor": "h1"}
    return pa.Table.from_pylist([{**base, **r} for r in rows], schema=VM_EVENTS)


def _create(hour: int, minute: int, vm: str, addr: str, **facts: str) -> dict:
    return {"ts": utc(hour, minute), "vm_id": vm, "vm_name": vm, "action": "create", "addrs": [addr], **facts}


def _land_events(lake: Lake, name: str, rows: list[dict], reclaim: dt.timedelta | None = None) -> str:
    ingest_table(lake, "vm_events", name, hash_bytes(name.encode()), [_events(rows)])
    return refresh_leases(lake, reclaim).mode


def _keys(lake: Lake) -> dict[str, int]:
    vms = lake.read("vms", columns=["vm_id", "vm_key"])
    return dict(zip(vms.column("vm_id").to_pylist(), vms.column("vm_key").to_pylist(), strict=True))


def _attributed(lake: Lake) -> list[tuple]:
    with contextlib.closing(connect(lake)) as con:
        return con.execute(
            "SELECT src_addr, dst_addr, src_vm, src_vm_name, src_project, dst_vm, dst_vm_name, dst_project "
            "FROM flows_attributed ORDER BY ts_start, src_addr, dst_addr"
        ).fetchall()


def test_keys_stay_with_their_vms_across_incremental_updates_and_a_full_rebuild(tmp_path):
    """Each VM gets its key once; hourly (incremental) updates and a full rebuild give every VM the key it
    had, new VMs the next numbers, in creation order."""
    lake = Lake(tmp_path / "lake")
    modes = [
        _land_events(lake, "h0", [_create(0, 0, "a", "10.0.0.1"), _create(0, 5, "b", "10.0.0.2")], SEVEN_DAYS)
    ]
    first = _keys(lake)
    assert first == {"a": 1, "b": 2}
    modes.append(
        _land_events(lake, "h1", [{"ts": utc(0, 10), "vm_id": "a", "action": "delete", "addrs": []}])
    )
    modes.append(_land_events(lake, "h2", [_create(1, 15, "d", "10.0.0.3"), _create(1, 10, "c", "10.0.0.1")]))
    modes.append(
        _land_events(lake, "h3", [{"ts": utc(1, 20), "vm_id": "b", "action": "delete", "addrs": []}])
    )
    assert modes == ["full", "incremental", "incremental", "incremental"]
    hourly = _keys(lake)
    assert hourly == {"a": 1, "b": 2, "c": 3, "d": 4}  # c was created before d
    # a full rebuild (repair) replays every event: same keys
    assert refresh_leases(lake, full=True).mode == "full"
    assert _keys(lake) == hourly
    # and a VM after it gets the next number, incrementally or not
    assert _land_events(lake, "h4", [_create(2, 0, "e", "10.0.0.4")]) == "incremental"
    assert refresh_leases(lake, full=True).mode == "full"
    assert _keys(lake) == {**hourly, "e": 5}


def test_a_key_flows_carry_is_never_handed_out_again(tmp_path):
    """A VM whose vms row is gone (its events removed, a damaged file repaired away) leaves its key in the
    flow files; the next new VM must not get that key, or those flows would name it."""
    lake = Lake(tmp_path / "lake")
    _land_events(lake, "h0", [_create(0, 0, "a", "10.0.0.1"), _create(0, 5, "b", "10.0.0.2")], SEVEN_DAYS)
    ingest_table(lake, "flows", "f", hash_bytes(b"f"), [flows_of([("10.0.0.2", "10.0.0.1", utc(0, 30))])])
    attribute_flows(lake)
    assert lake.read("flows", columns=["src_vm_key", "dst_vm_key"]).to_pylist() == [
        {"src_vm_key": 2, "dst_vm_key": 1}
    ]
    # vms loses b's row (as a repair of a damaged file would): the highest key left in vms is 1
    from tracepipe.correlate.leases import write_derived

    vms = lake.read("vms")
    write_derived(lake, "vms", vms.filter(pc.equal(vms.column("vm_id"), "a")), {})
    assert _keys(lake) == {"a": 1}
    _land_events(lake, "h1", [_create(1, 0, "c", "10.0.0.3")])
    assert _keys(lake)["c"] == 3  # not 2: b's flows carry 2


def test_a_planted_huge_key_does_not_stop_lease_updates(tmp_path):
    """A flow file (or vms row) planted with a key near the int64 limit must not make the next key overflow:
    the lease update would then fail on every run (correlation blinded). Keys above MAX_KEY are ignored."""
    from tracepipe.correlate.vm_keys import MAX_KEY

    lake = Lake(tmp_path / "lake")
    _land_events(lake, "h0", [_create(0, 0, "a", "10.0.0.1")], SEVEN_DAYS)
    planted = flows_of([("10.0.0.1", "192.0.2.1", utc(0, 30))])
    planted = planted.append_column("src_vm_key", pa.array([2**63 - 1], pa.int64()))
    ingest_table(lake, "flows", "planted", hash_bytes(b"planted"), [planted])
    assert lake.entries("flows")[0].maxs["src_vm_key"] == 2**63 - 1
    assert _land_events(lake, "h1", [_create(1, 0, "b", "10.0.0.2")]) == "incremental"
    assert _keys(lake) == {"a": 1, "b": 2}
    keyed = assign_vm_keys(
        pa.table({"vm_id": ["x", "y"]}), pa.table({"vm_id": ["x"], "vm_key": pa.array([MAX_KEY + 1])}), 5
    )
    assert keyed.column("vm_key").to_pylist() == [5, 6]


@pytest.mark.parametrize(
    "ids",
    [
        ["1", "2", "01", "1 ", " 1", "3"],  # ids that look like keys, or like each other once trimmed
        [
            "vm",
            "VM",
            "ｖｍ",
            "vm\u200b",
            "vm\x00",
            "v\u0301m",
        ],  # case, width, invisible and combining characters
    ],
    ids=["numeric", "lookalike"],
)
def test_vm_ids_and_names_a_tenant_chooses_never_share_a_key(tmp_path, ids):
    """Keys come from a counter, never from a VM's id or name: VMs named to look alike (or like keys) get
    distinct keys, and each flow is attributed to its own VM through the integer join."""
    lake = Lake(tmp_path / "lake")
    addrs = [f"10.0.0.{i + 1}" for i in range(len(ids))]
    rows = [
        _create(0, i, vm, addr, vm_name=vm, project=f"project-{i}")
        for i, (vm, addr) in enumerate(zip(ids, addrs, strict=True))
    ]
    _land_events(lake, "h0", rows, SEVEN_DAYS)
    keys = _keys(lake)
    assert sorted(keys) == sorted(ids)
    assert sorted(keys.values()) == list(range(1, len(ids) + 1))
    pairs = [(addr, addrs[(i + 1) % len(addrs)], utc(1, i)) for i, addr in enumerate(addrs)]
    ingest_table(lake, "flows", "f", hash_bytes(b"f"), [flows_of(pairs)])
    attribute_flows(lake)
    keyed, done, todo = flow_parts(lake)
    assert (len(keyed), done, todo) == (1, [], [])  # the integer join answers
    got = _attributed(lake)
    expected = [
        (
            addr,
            addrs[(i + 1) % len(addrs)],
            vm,
            vm,
            f"project-{i}",
            ids[(i + 1) % len(ids)],
            ids[(i + 1) % len(ids)],
            f"project-{(i + 1) % len(ids)}",
        )
        for i, (vm, addr) in enumerate(zip(ids, addrs, strict=True))
    ]
    assert got == expected
    flows = lake.read("flows", columns=["src_vm", "src_vm_key"])
    assert all(keys[vm] == key for vm, key in zip(*flows.to_pydict().values(), strict=True))


def test_a_planted_vms_file_giving_two_vms_one_key_is_not_believed():
    """Two VMs with one key in the rows read back (only a planted or hand-edited file makes that): the VM
    created first keeps it, the other gets a new key; a VM listed with two keys keeps its smallest."""
    ts = pa.timestamp("us", tz="UTC")
    vms = pa.table(
        {
            "vm_id": ["late", "early", "new", "twice"],
            "created_at": pa.array([utc(5), utc(1), utc(9), utc(2)], ts),
        }
    )
    known = pa.table(
        {"vm_id": ["late", "early", "twice", "twice"], "vm_key": pa.array([7, 7, 9, 4], pa.int64())}
    )
    keyed = assign_vm_keys(vms, known, next_key=8)
    assert keyed.schema == VMS
    got = dict(zip(keyed.column("vm_id").to_pylist(), keyed.column("vm_key").to_pylist(), strict=True))
    assert got == {"early": 7, "twice": 4, "late": 10, "new": 11}  # next after the highest key seen (9)


def _old_flow_file(root: Path, flows: pa.Table) -> None:
    """Flow files as tracepipe wrote them before the key columns existed: attributed (src_vm/dst_vm and
    attributed_at set), no src_vm_key/dst_vm_key in the file nor in the table's log."""
    old = pa.schema([f for f in FLOWS if f.name not in ("src_vm_key", "dst_vm_key")])
    full = pa.table(
        {
            n: flows.column(n) if n in flows.column_names else pa.nulls(len(flows), old.field(n).type)
            for n in old.names
        }
    )
    days = pc.strftime(full.column("ts_start"), format="%Y-%m-%d")
    write_deltalake(str(root / "flows"), full.cast(old).append_column("date", days), partition_by=["date"])


def test_flow_files_without_keys_still_attribute_through_the_view(tmp_path):
    """A lake whose flow files were attributed before the key columns existed: flows_attributed joins them on
    the text vm_id (same answers), next to a day attributed with keys; re-attribution then keys them all."""
    root = tmp_path / "lake"
    lake = Lake(root)
    rows = [
        _create(0, 0, "a", "10.0.0.1", project="pa"),
        _create(0, 5, "b", "10.0.0.2", project="pb"),
    ]
    _land_events(lake, "h0", rows, SEVEN_DAYS)
    old_day = flows_of([("10.0.0.1", "10.0.0.2", utc(1)), ("10.0.0.2", "192.0.2.9", utc(2))])
    stamp = pa.array([utc(3)] * 2, pa.timestamp("us", tz="UTC"))
    old_day = old_day.append_column("src_vm", pa.array(["a", "b"])).append_column(
        "dst_vm", pa.array(["b", None])
    )
    _old_flow_file(root, old_day.append_column("attributed_at", stamp))
    lake = Lake(root)
    expected_old = [
        ("10.0.0.1", "10.0.0.2", "a", "a", "pa", "b", "b", "pb"),
        ("10.0.0.2", "192.0.2.9", "b", "b", "pb", None, None, None),
    ]
    assert flow_parts(lake)[0] == []
    assert _attributed(lake) == expected_old
    # a new day lands and is attributed with keys; the old day stays as it was
    next_day = [("10.0.0.1", "10.0.0.2", utc(1) + dt.timedelta(days=1))]
    ingest_table(lake, "flows", "new", hash_bytes(b"new"), [flows_of(next_day)])
    attribute_flows(lake, ["2024-03-13"])
    keyed, done, todo = flow_parts(lake)
    assert (len(keyed), len(done), todo) == (1, 1, [])
    # the old table's first write gave readers every column's statistics (Delta's default stops at 32; the
    # key columns come after the 32nd): without them no file could be told keyed
    from deltalake import DeltaTable

    from tracepipe.lake import STATS_COLUMNS

    assert DeltaTable(str(root / "flows")).metadata().configuration[STATS_COLUMNS] == "-1"
    assert FLOWS.names.index("dst_vm_key") >= 32
    expected_new = [("10.0.0.1", "10.0.0.2", "a", "a", "pa", "b", "b", "pb")]
    assert _attributed(lake) == expected_old + expected_new
    # re-attribution (what `tracepipe attribute` and `leases rebuild` do) writes the keys into the old day
    attribute_flows(lake)
    keyed, done, todo = flow_parts(lake)
    assert (len(keyed), done, todo) == (2, [], [])
    assert _attributed(lake) == expected_old + expected_new
    keys = lake.read("flows", columns=["src_vm_key", "dst_vm_key"]).to_pylist()
    a_to_b, b_out = {"src_vm_key": 1, "dst_vm_key": 2}, {"src_vm_key": 2, "dst_vm_key": None}
    assert keys == [a_to_b, b_out, a_to_b]


def test_vms_without_keys_attribute_through_the_text_join(tmp_path):
    """vms written before the key existed (its files lack vm_key) and leases by the builder: attribution
    finds no keys, so the files are joined on vm_id, and the next lease commit gives every VM its key."""
    lake = Lake(tmp_path / "lake")
    _land_events(lake, "h0", [_create(0, 0, "a", "10.0.0.1", project="pa")], SEVEN_DAYS)
    # vms as an older tracepipe wrote it: no vm_key column
    entries = lake.entries("vms")
    old = lake.read("vms").drop_columns(["vm_key"])
    with lake.lock("vms"):
        lake.replace_files("vms", entries, [old], {})
    assert set(_keys(lake).values()) == {None}
    ingest_table(lake, "flows", "f", hash_bytes(b"f"), [flows_of([("10.0.0.1", "192.0.2.1", utc(1))])])
    attribute_flows(lake)
    assert flow_parts(lake)[0] == []  # a VM without its key: not a keyed file
    assert _attributed(lake) == [("10.0.0.1", "192.0.2.1", "a", "a", "pa", None, None, None)]
    _land_events(lake, "h1", [_create(2, 0, "b", "10.0.0.2", project="pb")])
    assert _keys(lake) == {"a": 1, "b": 2}


def test_new_keys_follow_creation_then_vm_id_order_on_ties_and_missing_times():
    """The (created_at, vm_id) order that numbers new VMs, worked out on the times and then on the ids of the
    rows of one instant only, is polars' sort on both columns (many ties, missing times last); and the
    integer de-duplication that replaced np.unique gives what np.unique gives."""
    import numpy as np
    import polars as pl

    from tracepipe.correlate.vm_keys import _by_creation, sorted_unique

    rng = np.random.default_rng(7)
    frame = pl.DataFrame(
        {
            "vm_id": [f"vm-{i}" for i in rng.permutation(3000)],
            "created_at": pl.Series(rng.integers(0, 40, 3000)).cast(pl.Datetime("us", "UTC")),
            "vm_key": pl.Series([None] * 3000, dtype=pl.Int64),
        }
    ).with_columns(
        pl.when(pl.col("vm_id").str.ends_with("3"))
        .then(None)
        .otherwise(pl.col("created_at"))
        .alias("created_at")
    )
    assert _by_creation(frame).equals(frame.sort("created_at", "vm_id", nulls_last=True))
    assert _by_creation(frame.head(0)).height == 0
    values = rng.integers(-50, 50, 5000)
    assert np.array_equal(sorted_unique(values), np.unique(values))
    assert np.array_equal(sorted_unique(values.astype(np.uint64)), np.unique(values.astype(np.uint64)))
    assert len(sorted_unique(np.zeros(0, np.int64))) == 0


def test_rows_in_by_a_join_agrees_with_index_in():
    """vm_keys._rows_in finds each VM's vms row by a polars join when both sides are big: the same rows as
    pc.index_in, also for ids vms lacks, nulls, and a vms that holds an id twice (then: its first row)."""
    import numpy as np

    from tracepipe.correlate import vm_keys

    rng = np.random.default_rng(7)
    known = pa.array([f"vm-{i}" for i in rng.permutation(300_000)])
    values = pa.array([f"vm-{i}" if i % 11 else None for i in rng.integers(0, 330_000, 300_000)])
    assert len(values) >= vm_keys._JOIN_ROWS
    for value_set in (known, pa.concat_arrays([known, known.slice(5, 20)])):
        got = vm_keys._rows_in(values, value_set)
        assert got.equals(pc.index_in(values, value_set=value_set).cast(pa.int32()))
        assert 0 < got.null_count < len(values)


def test_coded_text_holds_the_values_at_the_rows():
    """vm_keys._coded: text at rows as a dictionary array, over the distinct values when they are few, over
    the column itself when they are mostly distinct (VM names: no hashing)."""
    from tracepipe.correlate import vm_keys

    rows = pa.array([3, None, 0, 18, 2, 19], pa.int32())
    few = pa.array(["a", "b", "a", None] * 5)
    many = pa.array([f"vm-{i}" for i in range(18)] + [None, "vm-0"])
    for column, size in ((few, 2), (many, 20)):
        coded = vm_keys._coded(column, rows)
        assert coded.to_pylist() == column.take(rows).to_pylist()
        assert len(coded.dictionary) == size
        # a null value is a null index, never a null in the dictionary (Parquet cannot write that)
        assert coded.indices.null_count == coded.null_count == column.take(rows).null_count > 1


def test_vms_of_since_reads_the_vms_alive_since_and_the_rows_of_one_missing(tmp_path, monkeypatch):
    """vms in files cut by deleted_at (FILE_ROWS lowered): with `since`, vms_of reads first the files whose
    statistics allow a VM alive since then, and gives the same rows as a read of every file, also for a VM
    deleted long before (a lease outliving its VM's deletion: then its rows alone from the other files)."""
    from tracepipe.correlate import leases as lease_module
    from tracepipe.correlate import vm_keys
    from tracepipe.correlate.leases import write_derived

    monkeypatch.setattr(lease_module, "FILE_ROWS", 4)
    rows = [
        {
            "vm_id": f"vm-{i:02d}",
            "vm_name": f"name-{i}",
            "project": f"p{i % 3}",
            "status": "deleted" if i < 16 else "active",
            "created_at": utc(0),
            "deleted_at": utc(i // 4 + 1) if i < 16 else None,
        }
        for i in range(24)
    ]
    lake = Lake(tmp_path / "lake")
    write_derived(lake, "vms", pa.Table.from_pylist(rows, schema=VMS), {})
    since = utc(4)  # files of VMs deleted at 01:00-03:00 are not read first
    assert (
        [vm_keys._alive_since(e, since) for e in lake.entries("vms")].count(False)
        == 3
        == len(lake.entries("vms")) - 3
    )
    columns = ["vm_id", "vm_key", "vm_name", "project"]
    read: list[int] = []
    real = vm_keys.read_parquet_files
    monkeypatch.setattr(
        vm_keys, "read_parquet_files", lambda paths, schema: read.append(len(paths)) or real(paths, schema)
    )
    for ids in (
        ["vm-20", "vm-13", None, "vm-12"],
        ["vm-20", "vm-02"],
        ["vm-05", None, "vm-02", "vm-99", "vm-05", "vm-21", "vm-10"],
    ):
        read.clear()
        got = vm_keys.vms_of(lake, pa.array(ids, pa.string()), columns, since)
        # the files alive since; a VM deleted before: only its rows from the others (a filtered scan)
        assert read == [3]
        want = vm_keys.vms_of(lake, pa.array(ids, pa.string()), columns)
        assert read == [3, 6]
        assert [got.column(c).to_pylist() for c in columns] == [want.column(c).to_pylist() for c in columns]
        names = [(i and i != "vm-99" and f"name-{int(i[3:])}") or None for i in ids]
        assert got.column("vm_name").to_pylist() == names
    # a vms file the filtered scan cannot read (planted with other types): the other files are read whole
    import pyarrow.dataset as ds

    def refuse(*args, **kwargs):
        raise pa.ArrowNotImplementedError("greater_equal (string, int64)")

    monkeypatch.setattr(ds, "dataset", refuse)
    read.clear()
    got = vm_keys.vms_of(lake, pa.array(ids, pa.string()), columns, since)
    assert read == [3, 3] and got.column("vm_name").to_pylist() == names


def _random_vms(rng, n: int, ids: list[str], keys: bool) -> pa.Table:
    names = rng.choice(["a", "b", None], n).tolist()
    created = [None if rng.random() < 0.1 else utc(1, int(m)) for m in rng.integers(0, 5, n)]
    key = [int(k) if keys and rng.random() < 0.9 else None for k in rng.choice([0, 1, 2, 3, 5, 9, 2**41], n)]
    changed = [utc(2) if rng.random() < 0.2 else None for _ in range(n)]
    columns = {
        "vm_id": ids,
        "vm_name": names,
        "created_at": created,
        "vm_key": key,
        "identity_changed_at": changed,
    }
    columns |= {
        "project": rng.choice(["p", "q"], n).tolist(),
        "hypervisor": rng.choice(["h", None], n).tolist(),
    }
    return pa.table({f.name: pa.array(columns.get(f.name, [None] * n), f.type) for f in VMS}, schema=VMS)


def test_keys_by_position_are_the_general_paths():
    """keyed_by_position (one join, the rest positional: a full rebuild's 3 M VMs) gives exactly what
    assign_vm_keys + with_identity_changes give, or declines (None) and leaves it to them: random VMs against
    random previous rows, with keys out of range, shared, VMs listed twice, new VMs, unordered ids."""
    import numpy as np

    from tracepipe.correlate.vm_keys import keyed_by_position, with_identity_changes

    rng = np.random.default_rng(11)
    now = utc(5)
    taken = declined = 0
    for _ in range(400):
        pool = [f"vm-{i:02d}" for i in range(int(rng.integers(1, 30)))]
        ids = sorted(rng.choice(pool, int(rng.integers(0, len(pool) + 1)), replace=False).tolist())
        if rng.random() < 0.1:
            ids = ids[::-1]
        vms = _random_vms(rng, len(ids), ids, keys=rng.random() < 0.3)
        old_ids = rng.choice(pool, int(rng.integers(0, len(pool) + 3))).tolist()
        if rng.random() < 0.7:  # (mostly distinct, as a lake gives them)
            old_ids = list(dict.fromkeys(old_ids))
        previous = _random_vms(rng, len(old_ids), old_ids, keys=True)
        next_key = int(rng.integers(1, 12))
        fast = keyed_by_position(vms, previous, next_key, now=now)
        general = with_identity_changes(
            assign_vm_keys(vms, previous.select(["vm_id", "vm_key"]), next_key), previous, now=now
        )
        if fast is None:
            declined += 1
            continue
        taken += 1
        assert fast.equals(general), (fast.to_pylist(), general.to_pylist())
    assert taken > 100 and declined > 20, (taken, declined)
