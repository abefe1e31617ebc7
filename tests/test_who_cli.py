"""`tracepipe who` / `timeline` on the real Nova story (tests/data/cloud/nova/notifications.jsonl, from
../shared/realdata: web-01 created 07:00 with 192.168.1.3, 192.168.1.30 attached 07:10, powered off 07:20,
on 07:25, detached 07:30, soft-deleted 07:40, restored 07:50, deleted 08:00; batch-07 (192.168.1.7) 07:05 to
07:55; web-02 of another project gets 192.168.1.3 at 08:10), landed through `tracepipe ingest vm`.

Flows land BEFORE the lifecycle (notification lag) and are attributed then to nobody; `ingest vm` must
re-attribute them."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_in_process, run_tracepipe
from tracepipe import query
from tracepipe.correlate.attribution import attribute_flows
from tracepipe.lake import Lake, ingest_table
from tracepipe.schema import FLOWS

NOVA = Path(__file__).parent / "data" / "cloud" / "nova" / "notifications.jsonl"
WEB01 = "7311d8a3-c2ce-4f44-bed4-d57b1e2feb89"
WEB02 = "efba91fc-8034-48b6-b610-a9f7f9270f4e"
BATCH07 = "f06d3fef-7019-46a0-8381-e88f38c0c8fd"


def t(hhmm: str) -> dt.datetime:
    return dt.datetime.fromisoformat(f"2024-03-12T{hhmm}:00+00:00")


# (time, src, dst, dst_port): web-01 talks out, someone scans it, web-02 later on the same address
STORY_FLOWS = [
    ("06:50", "192.168.1.3", "203.0.113.9", 443),  # nobody held it yet
    ("07:15", "192.168.1.3", "203.0.113.9", 22),
    ("07:16", "192.168.1.30", "192.168.1.7", 5432),  # web-01's second address -> batch-07
    ("07:22", "198.51.100.7", "192.168.1.3", 22),  # powered off, still its address
    ("07:45", "192.168.1.3", "203.0.113.9", 443),  # soft-deleted (quarantined)
    ("07:52", "192.168.1.3", "203.0.113.10", 80),  # restored
    ("08:05", "192.168.1.3", "203.0.113.9", 443),  # deleted: nobody
    ("08:30", "192.168.1.3", "203.0.113.9", 443),  # web-02
]


@pytest.fixture(scope="module")
def story_lake(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nova") / "lake"
    lake = Lake(root)
    flows = pa.Table.from_pylist(
        [
            {
                "ts_start": t(hhmm),
                "ts_end": t(hhmm) + dt.timedelta(seconds=20),
                "src_addr": src,
                "dst_addr": dst,
                "src_port": 50000 + i,
                "dst_port": port,
                "proto": 6,
                "packets": 4,
                "bytes": 1000 * (i + 1),
                "ip_version": 4,
                "source": f"story-{i}",
            }
            for i, (hhmm, src, dst, port) in enumerate(STORY_FLOWS)
        ],
        schema=FLOWS,
    )
    ingest_table(lake, "flows", "story-flows", "story-flows-nova", [flows])
    assert attribute_flows(lake)["src_attributed"] == 0  # the flows came first: nobody known yet
    result = run_tracepipe("ingest", "vm", str(NOVA), "--reclaim-interval", "7d", "--lake", str(root))
    assert result.returncode == 0, result.stderr
    return root


@pytest.mark.parametrize(
    ("addr", "hhmm", "vm_id"),
    [
        ("192.168.1.3", "06:59", None),  # before create
        ("192.168.1.3", "07:01", WEB01),
        ("192.168.1.3", "07:22", WEB01),  # powered off
        ("192.168.1.3", "07:45", WEB01),  # soft-deleted: quarantined, still its address
        ("192.168.1.3", "07:55", WEB01),  # restored
        ("192.168.1.3", "08:05", None),  # after delete, before web-02
        ("192.168.1.3", "08:30", WEB02),  # reused by another project's VM
        ("192.168.1.30", "07:15", WEB01),
        ("192.168.1.30", "07:35", None),  # detached 07:30
        ("192.168.1.7", "07:30", BATCH07),
        ("192.168.1.7", "07:56", None),
        ("192.168.1.99", "07:30", None),  # never anyone's
    ],
)
def test_who_before_during_after_each_change(story_lake, addr, hhmm, vm_id):
    answer = query.who(Lake(story_lake), addr, t(hhmm))
    assert [lease["vm_id"] for lease in answer.leases] == ([vm_id] if vm_id else [])
    assert answer.held is (vm_id is not None)
    assert answer.exit_code == 0  # "nobody held it" is an answer too


def test_who_tells_the_deleted_vm_and_its_quarantine(story_lake):
    result = run_in_process(
        "who",
        "192.168.1.3",
        "--at",
        "2024-03-12T07:45:00Z",
        "--window",
        "10m",
        "--format",
        "json",
        "--lake",
        str(story_lake),
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    (lease,) = answer["leases"]
    assert (lease["vm_name"], lease["project"], lease["user"], lease["hypervisor"]) == (
        "web-01",
        "6f70656e737461636b20342065766572",
        "fake",
        "compute-1",
    )
    assert lease["valid_from"].startswith("2024-03-12 07:00:40") and lease["valid_to"].startswith(
        "2024-03-12 08:00:03"
    )
    assert lease["vm_status"] == "deleted" and lease["quarantine_until"].startswith("2024-03-19 08:00:03")
    assert (
        lease["now"]
        == "deleted 2024-03-12 08:00 UTC, image kept until 2024-03-19 08:00 UTC (reclaimed since)"
    )
    flows = answer["flows"]  # 07:35 .. 07:55: the soft-deleted and the restored flow
    assert (flows["flows"], flows["bytes"], flows["flows_out"], flows["flows_in"]) == (2, 11000, 2, 0)
    assert flows["top_peers"][0] == {"peer": "203.0.113.10", "flows": 1, "bytes": 6000}
    table = run_in_process("who", "192.168.1.3", "--at", "1710229500", "--lake", str(story_lake))
    assert "web-01" in table.stdout and "image kept until 2024-03-19 08:00 UTC" in table.stdout
    assert "2024-03-12 07:00:40 UTC -> 2024-03-12 08:00:03 UTC (delete)" in table.stdout


def test_who_sums_only_the_flows_of_the_lease_asked_about(story_lake):
    """web-02 got 192.168.1.3 at 08:10: its ±1 h summary at 08:30 must not count web-01's flows of 07:45 and
    07:52, nor the 08:05 flow nobody's lease covered (session-26 known limit: the summary was per address)."""
    answer = query.who(Lake(story_lake), "192.168.1.3", t("08:30"))
    (lease,) = answer.leases
    assert lease["vm_id"] == WEB02
    flows = answer.flows
    assert flows["from"] == lease["valid_from"] and flows["to"] == t("09:30")
    assert (flows["flows"], flows["bytes"]) == (1, 8000)
    # nobody held it at 08:05 (web-01 deleted after 07:55, web-02 from 08:10): the summary is of that gap only, not
    # of the neighbours' flows (before: a ±1 h window said "nobody held" and counted web-01's 07:45 and 07:52)
    for window in (dt.timedelta(minutes=10), dt.timedelta(hours=1)):
        nobody = query.who(Lake(story_lake), "192.168.1.3", t("08:05"), window)
        gap = (nobody.previous_lease["valid_to"], nobody.next_lease["valid_from"])
        assert t("07:55") <= gap[0] < t("08:05") < t("08:10") <= gap[1] < t("08:15")
        assert not nobody.held and (nobody.flows["from"], nobody.flows["to"]) == gap
        assert nobody.flows["flows"] == 1 and nobody.flows["begun_from"] == gap[0]
    table = run_in_process("who", "192.168.1.3", "--at", "2024-03-12T08:05:00Z", "--lake", str(story_lake))
    assert "while nobody held it" in table.stdout and ": 1 flows" in table.stdout
    table = run_in_process("who", "192.168.1.3", "--at", "2024-03-12T08:30:00Z", "--lake", str(story_lake))
    assert "while the lease above held it" in table.stdout and "1 flows" in table.stdout


def test_who_nobody_names_the_neighbours(story_lake):
    result = run_in_process(
        "who", "192.168.1.3", "--at", "2024-03-12T09:05:00+01:00", "--lake", str(story_lake)
    )
    assert result.returncode == 0, result.stderr
    assert "nobody held 192.168.1.3 at 2024-03-12 08:05:00 UTC" in result.stdout
    assert "before: web-01" in result.stdout and "after: web-02" in result.stdout
    as_json = run_in_process(
        "who", "192.168.1.99", "--at", "2024-03-12T07:30:00Z", "--format", "json", "--lake", str(story_lake)
    )
    assert as_json.returncode == 0, as_json.stderr
    answer = json.loads(as_json.stdout)
    assert (answer["held"], answer["leases"], answer["exit_code"]) == (False, [], 0)


def test_who_refuses_a_time_more_than_a_day_ahead(story_lake):
    # a review: `who ADDR --at 2030-01-01` named the VM whose lease is open now; trace refuses such times
    result = run_in_process("who", "192.168.1.3", "--at", "2099-01-01T00:00:00Z", "--lake", str(story_lake))
    assert result.returncode == 2 and "more than a day ahead" in result.stderr


def test_who_timeline_and_attribute_without_a_lake_fail_with_4(tmp_path):
    missing = str(tmp_path / "no-lake")
    for args in (("who", "10.0.0.1", "--at", "2024-03-12T07:30:00Z"), ("timeline", "web-01"), ("attribute",)):
        result = run_tracepipe(*args, "--lake", missing)
        assert result.returncode == 4 and f"no lake at {missing}" in result.stderr, (args, result.stderr)


def test_attribute_reports_what_it_did(story_lake):
    result = run_in_process("attribute", "--format", "json", "--lake", str(story_lake))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    # the story's eight flows; web-01/web-02 as sources five times, batch-07 once as destination, web-01 once
    assert (summary["rows"], summary["src_attributed"], summary["dst_attributed"], summary["exit_code"]) == (
        8,
        5,
        2,
        0,
    )
    nothing = run_in_process("attribute", "--day", "2023-01-01", "--lake", str(story_lake))
    assert nothing.returncode == 0 and nothing.stdout.startswith("0 flows in 0 files"), nothing.stdout


def test_late_lifecycle_events_end_up_in_the_flow_files(story_lake):
    """The flows landed before `ingest vm` (attributed to nobody then); ingest vm re-attributed their day."""
    (path,) = Lake(story_lake).files("flows")
    stored = {r["source"]: (r["src_vm"], r["dst_vm"]) for r in pq.read_table(path).to_pylist()}
    assert stored == {
        "story-0": (None, None),
        "story-1": (WEB01, None),
        "story-2": (WEB01, BATCH07),
        "story-3": (None, WEB01),
        "story-4": (WEB01, None),
        "story-5": (WEB01, None),
        "story-6": (None, None),
        "story-7": (WEB02, None),
    }
    con = query.connect(Lake(story_lake))
    assert con.sql("SELECT count(*) FROM _flows_todo").fetchall() == [(0,)]
    rows = con.sql(
        "SELECT src_project, count(*) FROM flows_attributed WHERE src_vm IS NOT NULL GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert rows == [("6f70656e737461636b20342065766572", 4), ("b0d1e5c2a7f34e1f9e2a3c4d5e6f7a8b", 1)]


@pytest.mark.parametrize(
    "args",
    [
        ("who", "192.168.1.3' OR '1'='1", "--at", "2024-03-12T07:45:00Z"),
        ("who", "192.168.1.3", "--at", "2024-03-12T07:45:00Z'; DROP VIEW flows; --"),
        ("who", "192.168.1.3", "--at", "2024-03-12T07:45:00Z", "--window", "1h; DELETE FROM flows"),
        ("timeline", "web-01' OR vm_name LIKE '%"),
    ],
)
def test_injection_attempts_are_harmless(story_lake, args):
    before = {p: p.read_bytes() for p in story_lake.rglob("*.parquet")}
    result = run_in_process(*args, "--lake", str(story_lake))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "does not parse" in result.stderr or "no VM with id or name" in result.stderr
    assert {p: p.read_bytes() for p in story_lake.rglob("*.parquet")} == before


def test_timeline_of_a_deleted_vm(story_lake):
    answer = query.timeline(Lake(story_lake), "web-01")
    assert (answer.vm_id, answer.exit_code) == (WEB01, 0)
    assert answer.vm["status"] == "deleted"
    actions = [e["action"] for e in answer.events]
    assert (
        actions[0] == "create"
        and "soft_delete" in actions
        and "restore" in actions
        and actions[-1] == "delete"
    )
    assert [(lease["addr"], lease["end_reason"]) for lease in answer.leases] == [
        ("192.168.1.3", "delete"),
        ("192.168.1.30", "detach"),
    ]
    (hour,) = answer.flows_per_hour
    assert (hour["hour"].hour, hour["flows_out"], hour["flows_in"]) == (7, 4, 1)
    assert query.timeline(Lake(story_lake), BATCH07).flows_per_hour[0]["flows_in"] == 1
    result = run_in_process("timeline", "web-02", "--format", "json", "--lake", str(story_lake))
    assert result.returncode == 0, result.stderr
    web02 = json.loads(result.stdout)
    assert web02["vm_id"] == WEB02 and web02["vm"]["user"] == "bob" and web02["exit_code"] == 0
    assert web02["flows_per_hour"][0]["flows_out"] == 1


def test_who_names_the_hypervisor_of_the_lease_and_where_the_vm_is_now(tmp_path):
    """Cloud review (session 35): who_had gave the VM's hypervisor of now beside a lease of before its live
    migration ("hypervisor c2" above "lease 07:00 -> 08:02 (migrate)", while vm_leases said c1): the compute
    node whose logs and disks tell of that time is the lease's; where the VM is now is said beside it."""

    def note(event: str, at: str, host: str, n: int) -> str:
        data = {
            "uuid": "vm-a",
            "display_name": "mover",
            "tenant_id": "p",
            "user_id": "u",
            "host": host,
            "state": "active",
            "ip_addresses": [{"nova_object.data": {"address": "10.0.0.5", "port_uuid": "pa"}}],
        }
        return json.dumps(
            {
                "event_type": event,
                "timestamp": f"2024-03-12 {at}:00",
                "message_id": f"m{n}",
                "payload": {"nova_object.data": data},
            }
        )

    notifications = tmp_path / "nova.jsonl"
    notifications.write_text(
        note("instance.create.end", "07:00", "c1", 1)
        + "\n"
        + note("instance.live_migration_post_dest.end", "08:02", "c2", 2)
        + "\n"
    )
    lake = tmp_path / "lake"
    assert run_in_process("ingest", "vm", str(notifications), "--lake", str(lake)).returncode == 0
    before = run_in_process("who", "10.0.0.5", "--at", "2024-03-12T07:30:00Z", "--lake", str(lake))
    assert before.returncode == 0, before.stderr
    assert "hypervisor  c1" in before.stdout and "on c2" in before.stdout, before.stdout
    after = run_in_process(
        "who", "10.0.0.5", "--at", "2024-03-12T08:30:00Z", "--format", "json", "--lake", str(lake)
    )
    (lease,) = json.loads(after.stdout)["leases"]
    assert (lease["hypervisor"], lease["hypervisor_now"]) == ("c2", "c2")
