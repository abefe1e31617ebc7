"""flows_attributed (sql/views.sql) against its plain definition, on a lake that holds every kind of flow file at
once: attributed with vm keys, attributed before the key columns existed, never attributed; flows with NULL keys
(addresses nobody held), a VM deleted mid-day, an owner change (OpenNebula chown) after attribution, and a VM
whose vms row was lost while flow files still carry its key.

The plain definition: each end's VM is the one the file stored when it was attributed, else lease_at (the one
answer to "who held X at T"); what that VM is (name, project, owner, status) is vms' row for it NOW, by the
text vm_id, LEFT joined. Any faster form of the view (issue 18 item 4) must give exactly these rows."""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import write_deltalake
from support.flow_tables import flows_of

from tracepipe.correlate.attribution import attribute_flows
from tracepipe.correlate.lease_at import lease_at, read_leases
from tracepipe.correlate.leases import refresh_leases, write_derived
from tracepipe.lake import Lake, hash_bytes, ingest_table
from tracepipe.query import connect, flow_parts
from tracepipe.schema import FLOWS, VM_EVENTS

DAY = dt.datetime(2024, 3, 12, tzinfo=dt.UTC)
FACTS = ("vm_name", "project", "user", "status")
COLUMNS = ["ts_start", "src_addr", "dst_addr", "src_vm", "dst_vm"] + [
    f"{end}_{name}" for end in ("src", "dst") for name in ("vm_name", "project", "user", "vm_status")
]


def at(day: int, hour: float) -> dt.datetime:
    return DAY + dt.timedelta(days=day, hours=hour)


def _events(lake: Lake, name: str, rows: list[dict]) -> None:
    base = {"cloud": "opennebula", "hypervisor": "h1"}
    table = pa.Table.from_pylist([{**base, **r} for r in rows], schema=VM_EVENTS)
    ingest_table(lake, "vm_events", name, hash_bytes(name.encode()), [table])
    refresh_leases(lake, dt.timedelta(days=7))


def _create(hour: float, vm: str, addr: str, project: str, user: str) -> dict:
    return {
        "ts": at(0, hour),
        "vm_id": vm,
        "vm_name": f"{vm}-name",
        "action": "create",
        "addrs": [addr],
        "project": project,
        "user": user,
    }


def _unkeyed_file(root: Path, flows: pa.Table, src_vm: list, dst_vm: list) -> None:
    """A flow file as tracepipe wrote it before the key columns existed: attributed (src_vm/dst_vm and
    attributed_at set), no src_vm_key/dst_vm_key in the file nor in the table's log."""
    old = pa.schema([f for f in FLOWS if f.name not in ("src_vm_key", "dst_vm_key")])
    given = {"src_vm": pa.array(src_vm, pa.string()), "dst_vm": pa.array(dst_vm, pa.string())}
    given["attributed_at"] = pa.array([at(0, 23)] * len(flows), pa.timestamp("us", tz="UTC"))
    full = pa.table(
        {
            n: given[n]
            if n in given
            else flows.column(n)
            if n in flows.column_names
            else pa.nulls(len(flows))
            for n in old.names
        }
    ).cast(old)
    days = pc.strftime(full.column("ts_start"), format="%Y-%m-%d")
    write_deltalake(str(root / "flows"), full.append_column("date", days), partition_by=["date"])


def _lake(tmp_path: Path) -> Lake:
    """Day 0: flows attributed before keys existed; day 1: attributed with keys (VM d deleted at 03:00);
    day 2: never attributed. After attribution VM a changes owner (chown: project pz, user zed)."""
    root = tmp_path / "lake"
    _unkeyed_file(
        root,
        flows_of([("10.0.0.1", "10.0.0.2", at(0, 1)), ("10.0.0.2", "192.0.2.9", at(0, 2))]),
        ["a", "b"],
        ["b", None],
    )
    lake = Lake(root)
    _events(
        lake,
        "create",
        [
            _create(0, "a", "10.0.0.1", "pa", "ann"),
            _create(0.1, "b", "10.0.0.2", "pb", "bob"),
            _create(0.2, "d", "10.0.0.4", "pd", "dan"),
        ],
    )
    _events(lake, "delete", [{"ts": at(1, 3), "vm_id": "d", "action": "delete", "addrs": []}])
    keyed_day = [
        ("10.0.0.1", "192.0.2.9", at(1, 1)),  # dst: nobody's (NULL key)
        ("198.51.100.7", "10.0.0.2", at(1, 1.5)),  # src: nobody's
        ("10.0.0.4", "10.0.0.1", at(1, 2)),  # d before its deletion
        ("10.0.0.4", "10.0.0.1", at(1, 4)),  # the address after d was deleted: nobody's
        ("203.0.113.5", "198.51.100.7", at(1, 5)),  # neither end
    ]
    ingest_table(lake, "flows", "keyed", hash_bytes(b"keyed"), [flows_of(keyed_day)])
    attribute_flows(lake, [at(1, 0).strftime("%Y-%m-%d")])
    # a's owner changes after its flows were attributed (OpenNebula chown: the next event names the new ones)
    _events(
        lake,
        "chown",
        [{"ts": at(2, 0.5), "vm_id": "a", "action": "chown", "addrs": [], "project": "pz", "user": "zed"}],
    )
    todo_day = [("10.0.0.2", "10.0.0.1", at(2, 1)), ("10.0.0.4", "10.0.0.2", at(2, 1))]
    ingest_table(lake, "flows", "todo", hash_bytes(b"todo"), [flows_of(todo_day)])
    return lake


# both forms of flows_attributed: the VM facts stored in flow files (whatever the number of VMs), and the join
# to every VM (query.STORED_FACTS_FROM_VMS decides between them by the size of vms)
FORMS = (0, 10**12)


def _both_forms(lake: Lake, sql: str) -> list[tuple]:
    """`sql`'s rows, the same from both forms of flows_attributed (FORMS)."""
    answers = []
    for form in FORMS:
        with contextlib.closing(connect(lake, stored_facts_from=form)) as con:
            answers.append(con.execute(sql).fetchall())
    assert answers[0] == answers[1]
    return answers[0]


def _view(lake: Lake) -> list[tuple]:
    return _both_forms(
        lake, f"SELECT {', '.join(COLUMNS)} FROM flows_attributed ORDER BY ts_start, src_addr, dst_addr"
    )


def _plain(lake: Lake) -> list[tuple]:
    """The plain definition (module docstring), computed without the view's parts and keys."""
    flows = lake.read(
        "flows", columns=["ts_start", "src_addr", "dst_addr", "src_vm", "dst_vm", "attributed_at"]
    )
    leases = read_leases(lake)
    attributed = pc.is_valid(flows.column("attributed_at"))
    ends = {}
    for end in ("src", "dst"):
        held = lease_at(leases, flows.column(f"{end}_addr"), flows.column("ts_start")).column("vm_id")
        ends[f"{end}_vm"] = pc.if_else(attributed, flows.column(f"{end}_vm"), held)
    resolved = pa.table(
        {
            "ts_start": flows.column("ts_start"),
            "src_addr": flows.column("src_addr"),
            "dst_addr": flows.column("dst_addr"),
            **ends,
        }
    )
    vms = lake.read("vms", columns=["vm_id", *FACTS])
    with contextlib.closing(connect(lake)) as con:
        con.register("resolved", resolved)
        con.register("vms_now", vms)
        return con.execute(
            """
            SELECT f.ts_start, f.src_addr, f.dst_addr, f.src_vm, f.dst_vm,
                   s.vm_name, s.project, s."user", s.status, d.vm_name, d.project, d."user", d.status
            FROM resolved f LEFT JOIN vms_now s ON f.src_vm = s.vm_id LEFT JOIN vms_now d ON f.dst_vm = d.vm_id
            ORDER BY f.ts_start, f.src_addr, f.dst_addr
            """
        ).fetchall()


def _vm(vm: str | None, project: str | None, user: str | None, status: str | None) -> tuple:
    if vm is None:
        return (None,) * 4
    return (f"{vm}-name", project, user, status)


A = _vm("a", "pz", "zed", "active")  # after the chown: what a is NOW, in every file
B = _vm("b", "pb", "bob", "active")
D = _vm("d", "pd", "dan", "deleted")
NOBODY = _vm(None, None, None, None)


def test_flows_attributed_is_its_plain_definition_on_every_kind_of_file(tmp_path):
    lake = _lake(tmp_path)
    keyed, done, todo = flow_parts(lake)
    assert (len(keyed), len(done), len(todo)) == (1, 1, 1)
    expected = [
        (at(0, 1), "10.0.0.1", "10.0.0.2", "a", "b", *A, *B),
        (at(0, 2), "10.0.0.2", "192.0.2.9", "b", None, *B, *NOBODY),
        (at(1, 1), "10.0.0.1", "192.0.2.9", "a", None, *A, *NOBODY),
        (at(1, 1.5), "198.51.100.7", "10.0.0.2", None, "b", *NOBODY, *B),
        (at(1, 2), "10.0.0.4", "10.0.0.1", "d", "a", *D, *A),
        (at(1, 4), "10.0.0.4", "10.0.0.1", None, "a", *NOBODY, *A),
        (at(1, 5), "203.0.113.5", "198.51.100.7", None, None, *NOBODY, *NOBODY),
        (at(2, 1), "10.0.0.2", "10.0.0.1", "b", "a", *B, *A),
        (at(2, 1), "10.0.0.4", "10.0.0.2", None, "b", *NOBODY, *B),
    ]
    assert _plain(lake) == expected
    assert _view(lake) == expected


def test_a_key_whose_vms_row_was_lost_keeps_its_flows(tmp_path):
    """vm_keys does NOT guarantee that every key a flow file carries is in vms: a VM row can be lost (a repair
    moves a damaged vms file away; tests/test_vm_keys.py) while the flow files keep its key. The view is a LEFT
    join: those flows stay, with their stored vm_id and no facts. A rewrite of the view as INNER joins on the
    non-null keys (to get DuckDB's perfect hash join) would silently drop them."""
    lake = _lake(tmp_path)
    vms = lake.read("vms")
    write_derived(lake, "vms", vms.filter(pc.not_equal(vms.column("vm_id"), "b")), {})
    keys = set(lake.read("vms", columns=["vm_key"]).column("vm_key").to_pylist())
    with contextlib.closing(
        connect(lake)
    ) as con:  # the unkeyed file has no key columns: read through the view
        pairs = con.execute("SELECT src_vm_key, dst_vm_key FROM flows").fetchall()
    carried = {k for pair in pairs for k in pair if k is not None}
    assert carried - keys, "the scenario must hold a flow key that vms no longer has"
    rows = _view(lake)
    assert rows == _plain(lake)
    assert len(rows) == lake.read("flows", columns=["ts_start"]).num_rows == 9
    lost = [r for r in rows if r[1:3] == ("198.51.100.7", "10.0.0.2")]
    assert lost == [(at(1, 1.5), "198.51.100.7", "10.0.0.2", None, "b", *NOBODY, *NOBODY)]


# ---- issue 18 item 4: facts stored in the flow files at attribution, overridden for VMs that changed since ----
IDENTITY = ("vm_name", "project", "user", "hypervisor", "image")
NOW = [f"{end}_{name}" for end in ("src", "dst") for name in (*IDENTITY, "vm_status")]


def _identity_lake(tmp_path: Path) -> Lake:
    """Four VMs created on day 0, their flows of day 1 attributed (with their facts), then on day 2: b renamed,
    c rebuilt from another image, e live-migrated to another hypervisor; f unchanged. A second file of day 1's
    flows is written the way tracepipe wrote them before the fact columns existed (keys, no facts)."""
    lake = Lake(tmp_path / "lake")
    vms = {"b": "10.0.0.2", "c": "10.0.0.3", "e": "10.0.0.5", "f": "10.0.0.6"}
    _events(
        lake,
        "create",
        [
            {**_create(0.1 * i, vm, addr, f"p{vm}", f"u{vm}"), "image": "img-1"}
            for i, (vm, addr) in enumerate(vms.items())
        ],
    )
    day = [(addr, "192.0.2.9", at(1, 1 + i)) for i, addr in enumerate(vms.values())]
    day += [("192.0.2.9", "10.0.0.6", at(1, 6)), ("10.0.0.2", "10.0.0.3", at(1, 7))]
    ingest_table(lake, "flows", "day1", hash_bytes(b"day1"), [flows_of(day)])
    attribute_flows(lake, [at(1, 0).strftime("%Y-%m-%d")])
    # the same flows an hour later, as an older tracepipe attributed them: vm keys, no facts columns at all
    stored = lake.read("flows").filter(pc.equal(lake.read("flows").column("dst_addr"), "192.0.2.9"))
    old = pa.schema([f for f in FLOWS if f.name != "vm_facts_at" and not f.name.endswith(IDENTITY)])
    moved = stored.set_column(
        0, "ts_start", pc.add(stored.column("ts_start"), pa.scalar(dt.timedelta(hours=12)))
    )
    moved = moved.select(old.names).cast(old)
    write_deltalake(
        str(lake.root / "flows"),
        moved.append_column("date", pc.strftime(moved.column("ts_start"), format="%Y-%m-%d")),
        partition_by=["date"],
        mode="append",
        schema_mode="merge",  # the log keeps the table's columns; the file lacks the facts
    )
    _events(
        lake,
        "changes",
        [
            {"ts": at(2, 1), "vm_id": "b", "action": "update", "addrs": [], "vm_name": "b-renamed"},
            {"ts": at(2, 2), "vm_id": "c", "action": "rebuild", "addrs": [], "image": "img-2"},
            {
                "ts": at(2, 3),
                "vm_id": "e",
                "action": "migrate",
                "event_type": "instance.live_migration_post.end",
                "addrs": [],
                "hypervisor": "h2",
            },
        ],
    )
    return lake


def _now_rows(lake: Lake, sql_from: str) -> list[tuple]:
    return _both_forms(
        lake,
        f"SELECT ts_start, src_addr, dst_addr, src_vm, dst_vm, {', '.join(NOW)} FROM {sql_from} "
        "ORDER BY ts_start, src_addr, dst_addr",
    )


def test_a_rename_a_rebuild_and_a_migration_after_attribution_show_what_the_vm_is_now(tmp_path):
    lake = _identity_lake(tmp_path)
    vms = {r["vm_id"]: r for r in lake.read("vms").to_pylist()}
    assert (vms["b"]["vm_name"], vms["c"]["image"], vms["e"]["hypervisor"]) == ("b-renamed", "img-2", "h2")
    # the lease writer marks exactly the VMs whose identity changed after their first vms row
    assert {v for v, r in vms.items() if r["identity_changed_at"] is not None} == {"b", "c", "e"}
    # the attributed file stored what the VMs were then; the view says what they are now
    stored = lake.read(
        "flows", columns=["src_vm", "src_vm_name", "src_image", "src_hypervisor", "vm_facts_at"]
    )
    then = {r["src_vm"]: r for r in stored.to_pylist() if r["vm_facts_at"] is not None}
    assert (then["b"]["src_vm_name"], then["c"]["src_image"], then["e"]["src_hypervisor"]) == (
        "b-name",
        "img-1",
        "h1",
    )
    with contextlib.closing(connect(lake, stored_facts_from=0)) as con:
        facts_rows, joined_rows = con.execute(
            "SELECT (SELECT count(*) FROM _flows_facts), (SELECT count(*) FROM _flows_to_join)"
        ).fetchone()
    assert (facts_rows, joined_rows) == (6, 4)  # both forms of the view answer here
    plain = """(SELECT f.ts_start, f.src_addr, f.dst_addr, f.src_vm, f.dst_vm,
        s.vm_name AS src_vm_name, s.project AS src_project, s."user" AS src_user, s.hypervisor AS src_hypervisor,
        s.image AS src_image, s.status AS src_vm_status, d.vm_name AS dst_vm_name, d.project AS dst_project,
        d."user" AS dst_user, d.hypervisor AS dst_hypervisor, d.image AS dst_image, d.status AS dst_vm_status
        FROM flows f LEFT JOIN vms s ON f.src_vm = s.vm_id LEFT JOIN vms d ON f.dst_vm = d.vm_id)"""
    rows = _now_rows(lake, "flows_attributed")
    assert rows == _now_rows(lake, plain)
    now = {(r[3], r[4]): r for r in rows if r[0] < at(1, 12)}  # the file with stored facts
    assert now[("b", None)][5:11] == ("b-renamed", "pb", "ub", "h1", "img-1", "active")
    assert now[("c", None)][5:11] == ("c-name", "pc", "uc", "h1", "img-2", "active")
    assert now[("e", None)][5:11] == ("e-name", "pe", "ue", "h2", "img-1", "active")
    assert now[("f", None)][5:11] == ("f-name", "pf", "uf", "h1", "img-1", "active")
    assert now[(None, "f")][11:] == ("f-name", "pf", "uf", "h1", "img-1", "active")
    assert now[("b", "c")][5:] == (
        "b-renamed",
        "pb",
        "ub",
        "h1",
        "img-1",
        "active",
        "c-name",
        "pc",
        "uc",
        "h1",
        "img-2",
        "active",
    )
    older = [r for r in rows if r[0] >= at(1, 12)]  # the file without fact columns: joined, same answers
    assert [r[5:11] for r in older] == [now[(r[3], None)][5:11] for r in older]


def test_an_update_that_rewrites_one_vms_file_keeps_the_other_vms_facts(tmp_path):
    """Regression: the VMs whose identity changed live in vms files of their own; an incremental lease update
    that rewrites another file (f is powered off) once recorded every key it did not rewrite as lost, which gave the
    changed VMs no facts and their flows twice (the overlay then held their keys twice)."""
    lake = _identity_lake(tmp_path)
    _events(lake, "stop", [{"ts": at(2, 4), "vm_id": "f", "action": "power_off", "addrs": []}])
    assert lake.commit_infos("vms")[0]["lost_vm_keys"] == []
    rows = _now_rows(lake, "flows_attributed")
    assert len(rows) == lake.read("flows", columns=["ts_start"]).num_rows == 10
    by_src = {r[3]: r for r in rows if r[0] < at(1, 12) and r[4] is None}
    assert by_src["b"][5] == "b-renamed" and by_src["e"][8] == "h2"
    assert by_src["f"][10] == "stopped"


# ---- the review of session 8: what a hand-edited vms log or a concurrent first call must not do ----
def _rewrite_vms(lake: Lake, info: dict) -> None:
    """vms as it is, committed again with `info` as that commit's record (a hand-edited or planted log)."""
    with lake.lock("vms"):
        lake.replace_files("vms", lake.entries("vms"), [lake.read("vms")], info)


def test_a_hostile_lost_keys_record_falls_back_to_the_join(tmp_path):
    """The lost keys a vms commit records steer which flows keep their stored facts. A record that is not
    what the writer writes (Infinity, floats, booleans, keys beyond BIGINT or the key space, not pairs) used to
    crash connect (OverflowError) or every query (a BinderException on range()): it is not trusted, and
    flows_attributed joins every file to vms, with the same rows."""
    from tracepipe.correlate import LOST_KEYS
    from tracepipe.query import lost_vm_keys

    lake = _lake(tmp_path)
    expected = _plain(lake)
    for hostile in (
        [[1, float("inf")]],
        [[2**70, 2**70]],
        [[True, True]],
        [[1.0, 2.0]],
        [[3, 2]],
        [[0, 1]],
        [[1, 2, 3]],
        ["1-2"],
        {"a": 1},
    ):
        _rewrite_vms(lake, {LOST_KEYS: hostile})
        assert lost_vm_keys(lake) is None, hostile
        assert _view(lake) == expected, hostile


def test_a_commit_record_that_is_not_an_object_reads_as_none(tmp_path):
    """commitInfo.tracepipe is a JSON object in a string when tracepipe wrote it; a log edited to hold a
    number, a list or broken JSON there made Lake.commit_infos raise in every connect."""
    import json

    lake = _lake(tmp_path)
    expected = _plain(lake)
    _rewrite_vms(lake, {})
    log = sorted((lake.root / "vms" / "_delta_log").glob("*.json"))[-1]
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    for planted in (5, "[]", "5", "{not json", ["x"]):
        for action in lines:
            if "commitInfo" in action:
                action["commitInfo"]["tracepipe"] = planted
        log.write_text("\n".join(json.dumps(a) for a in lines) + "\n")
        info = lake.commit_infos("vms")[0]
        assert set(info) == {"version"}, planted
        assert _view(lake) == expected, planted


def test_thousands_of_scattered_lost_keys_give_the_same_rows(tmp_path):
    """A repair can scatter the lost keys (vms files are cut by deletion time): 20,000 one-key ranges are read
    once per session, and the view's rows are still its plain definition's."""
    from tracepipe.correlate import LOST_KEYS

    lake = _lake(tmp_path)
    expected = _plain(lake)
    _rewrite_vms(lake, {LOST_KEYS: [[k, k] for k in range(10_000, 50_000, 2)]})
    assert _view(lake) == expected


def test_vm_status_answers_the_same_from_threads_racing_its_first_call(tmp_path):
    """DuckDB calls the Arrow function from several threads at once; the first calls used to see the status
    dictionary before the key array was filled (nulls, or a TypeError). A null key has no VM even where a
    planted vms row holds the key -1 (the old sentinel)."""
    import threading

    import numpy as np
    import pyarrow.parquet as pq

    from tracepipe.query import VmStatus

    n = 400_000
    keys = np.arange(1, n + 1, dtype=np.int64)
    statuses = np.where(keys % 3 == 0, "deleted", "active")
    path = tmp_path / "vms.parquet"
    pq.write_table(pa.table({"vm_key": keys, "status": statuses}), path)
    probe = pa.array([*np.r_[keys[::-7], [0, n + 5]].tolist(), None], pa.int64())
    expected = [("deleted" if k % 3 == 0 else "active") if k and k <= n else None for k in probe.to_pylist()]
    for _ in range(5):
        status = VmStatus([path])
        start = threading.Barrier(6)
        answers: list = [None] * 6

        def ask(
            i: int, status: VmStatus = status, start: threading.Barrier = start, answers: list = answers
        ) -> None:
            start.wait()
            answers[i] = status(probe).to_pylist()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(a == expected for a in answers)
    planted = tmp_path / "planted.parquet"
    pq.write_table(
        pa.table({"vm_key": pa.array([-1, 5], pa.int64()), "status": ["hijacked", "active"]}), planted
    )
    assert VmStatus([planted])(pa.array([None, 5, -1], pa.int64())).to_pylist() == [
        None,
        "active",
        "hijacked",
    ]


def test_an_hourly_update_records_the_lost_keys_a_full_count_gives_without_reading_kept_files(tmp_path):
    """An incremental update records the keys no vms row holds from the previous record and the files it
    rewrites (the files it keeps are never opened: tests/test_leases.py damages them); the record must be
    what counting every vms row gives, and a key lost before stays lost."""
    from tracepipe.correlate.vm_keys import lost_keys, next_vm_key, recorded_lost_keys

    lake = _lake(tmp_path)
    vms = lake.read("vms")
    write_derived(lake, "vms", vms.filter(pc.not_equal(vms.column("vm_id"), "b")), {})
    (b_key,) = vms.filter(pc.equal(vms.column("vm_id"), "b")).column("vm_key").to_pylist()
    assert (b_key, b_key) in recorded_lost_keys(lake)
    for n, (vm, action) in enumerate([("a", "power_off"), ("c", "power_on"), ("a", "power_on")]):
        table = pa.Table.from_pylist(
            [{"ts": at(3, n), "vm_id": vm, "action": action, "addrs": [], "cloud": "opennebula"}],
            schema=VM_EVENTS,
        )
        ingest_table(lake, "vm_events", f"hour-{n}", hash_bytes(f"hour-{n}".encode()), [table])
        assert refresh_leases(lake, dt.timedelta(days=7)).mode == "incremental"
        counted = lost_keys(lake.read("vms", columns=["vm_key"]), next_vm_key(lake))
        assert recorded_lost_keys(lake) == [tuple(r) for r in counted]
        assert (b_key, b_key) in recorded_lost_keys(lake)
    assert _view(lake) == _plain(lake)
