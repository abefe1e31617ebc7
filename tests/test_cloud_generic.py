"""The documented generic CSV/JSONL form: columns, time zones, unknown actions, rejects with line numbers."""

import datetime as dt
import json
import zoneinfo
from pathlib import Path

import pytest

from tracepipe.correlate.leases import build_leases
from tracepipe.ingest.cloud import detect_format, parse_cloud_text

DATA = Path(__file__).parent / "data" / "cloud" / "generic"


def test_csv_rows_rejects_and_unknown_action():
    text = (DATA / "inventory.csv").read_text()
    assert detect_format("inventory.csv", text) == "csv"
    events, rejects = parse_cloud_text(text, "inventory.csv")
    assert rejects.to_pydict()["line"] == [5] and rejects.to_pydict()["reason"] == ["bad or missing ts"]
    d = events.to_pydict()
    assert d["action"] == ["create", "power_off", "delete", "unknown"]
    assert d["ts"][:3] == [dt.datetime(2012, 11, 18, h, tzinfo=dt.UTC) for h in (1, 1, 3)]
    assert d["cloud"] == ["labcloud"] * 4 and d["line"] == [2, 3, 4, 6]
    leases, _vms = build_leases(events)
    lease = leases.to_pylist()[0]
    assert (lease["addr"], lease["vm_id"], lease["end_reason"]) == ("172.16.59.10", "vm-b", "delete")
    assert lease["valid_to"] == dt.datetime(2012, 11, 18, 3, tzinfo=dt.UTC)


def test_jsonl_with_local_zone_and_floating():
    lines = [
        {"ts": "2024-03-12 08:00:00", "vm_id": "v1", "vm_name": "n1", "action": "create", "addr": "10.1.0.5"},
        {
            "ts": "2024-03-12T08:30:00+01:00",
            "vm_id": "v1",
            "action": "attach",
            "addr": "203.0.113.50",
            "addr_kind": "floating",
        },
        {
            "ts": "2024-03-12 09:00:00",
            "vm_id": "v1",
            "action": "detach",
            "addr": "203.0.113.50",
            "addr_kind": "floating",
        },
        "not json",
    ]
    text = "\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines)
    assert detect_format("x.jsonl", text) == "jsonl"
    events, rejects = parse_cloud_text(text, "x.jsonl", tz=zoneinfo.ZoneInfo("Europe/Berlin"))
    assert rejects.to_pydict()["line"] == [4]
    assert events.column("action").to_pylist() == ["create", "fip_associate", "fip_disassociate"]
    assert events.column("ts").to_pylist()[0] == dt.datetime(2024, 3, 12, 7, tzinfo=dt.UTC)
    leases, _ = build_leases(events)
    floating = next(r for r in leases.to_pylist() if r["addr_kind"] == "floating")
    assert (floating["vm_id"], floating["valid_from"], floating["valid_to"]) == (
        "v1",
        dt.datetime(2024, 3, 12, 7, 30, tzinfo=dt.UTC),
        dt.datetime(2024, 3, 12, 8, tzinfo=dt.UTC),
    )


def test_csv_missing_required_column_rejects_file():
    events, rejects = parse_cloud_text("ts,vm_name\n2024-01-01T00:00:00Z,x\n", "bad.csv", fmt="csv")
    assert events.num_rows == 0 and rejects.to_pydict()["reason"] == ["missing columns"]


# ---- hostile input (issue 12, items 8 and 9) -------------------------------------------------------------------

_GOOD = [f"2024-03-12T0{i}:00:00Z,v{i},create,10.0.0.{i}" for i in range(1, 10)]


def test_one_bad_csv_line_rejects_that_line_and_the_other_eight_land(tmp_path):
    # before: polars failed on the whole file -> 0 rows, one "unreadable CSV" reject, exit 4
    from tracepipe.errors import EXIT_PARTIAL
    from tracepipe.ingest.vm import ingest_vm_files
    from tracepipe.lake import Lake

    rows = list(_GOOD)
    rows[4] = '2024-03-12T05:00:00Z,"v5,create'  # an unclosed quote: would swallow every line after it
    path = tmp_path / "inventory.csv"
    path.write_text("ts,vm_id,action,addr\n" + "\n".join(rows) + "\n")
    report = ingest_vm_files(Lake(tmp_path / "lake"), [path])
    assert (report.rows, report.rejects, report.exit_code) == (8, 1, EXIT_PARTIAL)
    stored = Lake(tmp_path / "lake").read("rejects").to_pylist()
    # (the reason as every line-by-line CSV reader words it: limits.csv_lines)
    assert [(r["line"], r["reason"]) for r in stored] == [(6, "quoted cell not closed on its line")]


def test_csv_lines_with_wrong_cell_counts_and_quoted_commas():
    text = (
        "\ufeffts,vm_id,vm_name,action,addr\n"
        '2024-03-12T01:00:00Z,v1,"web, the first",create,10.0.0.1\n'
        "2024-03-12T02:00:00Z,v2,x,create,10.0.0.2,extra\n"
        "2024-03-12T03:00:00Z,v3\n"
        "2024-03-12T04:00:00Z,v4,y,create,10.0.0.4\n"
    )
    events, rejects = parse_cloud_text(text, "x.csv", fmt="csv")
    assert events.column("vm_name").to_pylist() == ["web, the first", "y"]
    assert rejects.to_pydict()["line"] == [3, 4]
    assert rejects.to_pydict()["reason"] == ["wrong number of columns"] * 2


def test_generic_addresses_times_ids_and_json_types():
    rows = [
        {"ts": "2024-03-12T01:00:00Z", "vm_id": "v1", "action": "create", "addr": "2001:DB8::0001"},
        {"ts": "2024-03-12T02:00:00Z", "vm_id": "v2", "action": "create", "addr": "not-an-ip"},
        {"ts": "0001-01-01T00:00:00Z", "vm_id": "v3", "action": "create", "addr": "10.0.0.3"},
        {"ts": "9999-12-31T23:59:59Z", "vm_id": "v4", "action": "create", "addr": "10.0.0.4"},
        {"ts": "2024-03-12T05:00:00Z", "vm_id": {"a": 1}, "action": "create"},
        {"ts": "2024-03-12T06:00:00Z", "vm_id": "v6", "action": ["create"]},
        {"ts": "2024-03-12T07:00:00Z", "vm_id": 7, "action": "create", "addr": "10.0.0.7"},  # numeric ids: ok
        {"ts": "2024-03-12T08:00:00Z", "vm_id": " ", "action": "create"},
        {"ts": True, "vm_id": "v9", "action": "create"},
    ]
    events, rejects = parse_cloud_text("\n".join(json.dumps(r) for r in rows), "x.jsonl", fmt="jsonl")
    d = events.to_pydict()
    assert (d["vm_id"], d["addr"], d["addrs"]) == (
        ["v1", "7"],
        ["2001:db8::1", "10.0.0.7"],
        [["2001:db8::1"], ["10.0.0.7"]],
    )
    assert list(zip(rejects.to_pydict()["line"], rejects.to_pydict()["reason"], strict=True)) == [
        (3, "time out of range"),
        (4, "time out of range"),
        (5, "wrong JSON type"),
        (6, "wrong JSON type"),
        (8, "missing vm_id"),
        (9, "wrong JSON type"),
        (2, "not an IP address"),  # found when the table is finished (all addresses at once)
    ]


def test_optional_image_column_and_the_latest_wins():
    """Issue 15: `image` is optional (absent: null); the VM's image is the latest row naming one."""
    text = (
        "ts,vm_id,action,addr,image\n"
        "2024-03-12T07:00:00Z,vm-a,create,10.0.0.5,img-1\n"
        "2024-03-12T08:00:00Z,vm-a,power_off,,\n"
        "2024-03-12T09:00:00Z,vm-a,rebuild,10.0.0.5,img-2\n"
        "2024-03-12T10:00:00Z,vm-a,power_on,,\n"
    )
    events, rejects = parse_cloud_text(text, "inv.csv", fmt="csv")
    assert rejects.num_rows == 0
    assert events.column("image").to_pylist() == ["img-1", None, "img-2", None]
    assert build_leases(events)[1].column("image").to_pylist() == ["img-2"]
    without, _ = parse_cloud_text((DATA / "inventory.csv").read_text(), "inventory.csv", fmt="csv")
    assert without.num_rows > 0 and without.column("image").null_count == without.num_rows
    jsonl, _ = parse_cloud_text(
        '{"ts": "2024-03-12T07:00:00Z", "vm_id": 7, "action": "create", "image": 42}', "x", fmt="jsonl"
    )
    assert jsonl.column("image").to_pylist() == ["42"]  # numbers as text, like OpenNebula's image ids


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_names_holding_unicode_line_separators_stay_one_record(fmt):
    # Python's csv writer leaves U+2028 or RS unquoted; str.splitlines() cut such a row in two rejects
    names = ["db\u2028primary", "web\x1e02", "ok-03", "x\x85y"]
    if fmt == "csv":
        text = "ts,action,vm_id,vm_name,addr\n" + "".join(
            f"2024-03-12T07:0{i}:00Z,create,vm-{i},{name},10.0.0.{i + 1}\n" for i, name in enumerate(names)
        )
    else:
        text = "".join(
            json.dumps({"ts": f"2024-03-12T07:0{i}:00Z", "action": "create", "vm_id": f"vm-{i}", "vm_name": n,
                        "addr": f"10.0.0.{i + 1}"}, ensure_ascii=False) + "\n"
            for i, n in enumerate(names)
        )  # fmt: skip
    events, rejects = parse_cloud_text(text, f"inventory.{fmt}", fmt=fmt)
    assert rejects.num_rows == 0, rejects.to_pylist()
    assert events.column("vm_name").to_pylist() == names
    assert events.column("line").to_pylist() == ([2, 3, 4, 5] if fmt == "csv" else [1, 2, 3, 4])


def test_jsonl_ids_too_large_to_be_exact_are_rejects_not_duplicates():
    """orjson reads an integer past 2**64 as a float: ids 2**64 and 2**64 + 1 became one text, and the delete
    was dropped as a duplicate of the create (`who` then named the deleted VM). Such a number is a reject that
    says to give the id as text; an id given as text is kept exactly."""
    create = {"ts": "2024-03-12T07:00:00Z", "vm_id": "vm-x", "action": "create", "addr": "10.9.9.1"}
    delete = {**create, "ts": "2024-03-12T08:00:00Z", "action": "delete"}
    text = "\n".join(
        [
            json.dumps({**create, "event_id": 2**64}),
            json.dumps({**delete, "event_id": 2**64 + 1}),
            json.dumps({**create, "event_id": str(2**64)}),
            json.dumps({**delete, "event_id": str(2**64 + 1)}),
            json.dumps({**create, "event_id": 2**63}),
        ]
    )
    events, rejects = parse_cloud_text(text, "x.jsonl")
    assert rejects.to_pydict()["line"] == [1, 2]
    assert all("too large to be exact" in d for d in rejects.column("detail").to_pylist())
    assert events.column("action").to_pylist() == ["create", "delete", "create"]


def test_records_without_an_id_differing_only_in_host_or_owner_are_two_events(tmp_path):
    """Cloud review (session 35): an event without a message id was the same as a known one on a key that left
    the hypervisor, VM name, project, owner and image out, so a record differing only there was dropped as a
    duplicate by `ingest vm` (while the lease builder, comparing every column, keeps both)."""
    from tracepipe.ingest.vm import ingest_vm_files
    from tracepipe.lake import Lake

    head = "ts,vm_id,action,state,addrs,hypervisor,user\n"
    first = tmp_path / "a.csv"
    first.write_text(head + "2024-03-12T07:00:00Z,vm-1,create,active,10.0.0.5,c1,alice\n")
    second = tmp_path / "b.csv"
    second.write_text(
        head
        + "2024-03-12T07:00:00Z,vm-1,create,active,10.0.0.5,c2,alice\n"  # another host: another event
        + "2024-03-12T07:00:00Z,vm-1,create,active,10.0.0.5,c1,alice\n"  # the first one again: known
    )
    lake = Lake(tmp_path / "lake")
    ingest_vm_files(lake, [first])
    report = ingest_vm_files(lake, [second])
    assert (report.rows, report.duplicates) == (1, 1)
    assert sorted(lake.read("vm_events").column("hypervisor").to_pylist()) == ["c1", "c2"]


def test_a_name_holding_a_line_end_and_a_forged_row_stays_one_cell_of_its_own_row(tmp_path):
    # hostile review: a tenant's image name "x\n<a whole inventory row>\ny", written by Python's csv module
    # (quoted, as every standard writer does), was read line by line: the tenant's own row became two rejects
    # and the middle line an event of another VM: `who` named the victim's VM and owner for the attacker's
    # address. Now the quoted cell is read whole, line ends and all
    import csv
    import io

    from tracepipe.ingest.vm import ingest_vm_files
    from tracepipe.lake import Lake

    header = ["ts", "vm_id", "vm_name", "project", "user", "action", "addr", "image"]
    forged = "2025-06-17T05:00:01Z,victim-1,payroll-db,finance,alice,attach,10.99.0.66,img"
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerow(
        ["2025-06-17T04:00:00Z", "victim-1", "payroll-db", "finance", "alice", "create", "10.99.0.10", "img"]
    )
    writer.writerow(
        [
            "2025-06-17T05:00:00Z",
            "evil-1",
            "evil",
            "tenant",
            "mallory",
            "create",
            "10.99.0.66",
            f"x\n{forged}\ny",
        ]
    )
    writer.writerow(["2025-06-17T06:00:00Z", "other-1", "web", "web", "bob", "create", "10.99.0.77", "img"])
    path = tmp_path / "inventory.csv"
    path.write_text(out.getvalue())
    lake = Lake(tmp_path / "lake")
    report = ingest_vm_files(lake, [path])
    assert (report.rows, report.rejects) == (3, 0)
    events = lake.read("vm_events").sort_by("ts").to_pylist()
    assert [(e["vm_id"], e["addr"]) for e in events] == [
        ("victim-1", "10.99.0.10"),
        ("evil-1", "10.99.0.66"),
        ("other-1", "10.99.0.77"),
    ]
    assert events[1]["image"] == f"x\n{forged}\ny"
