"""A lake written before a column was added to schema.py (issue 15: vm_events.image, vms.image; session 29:
vms.first_event_at) keeps working:
reads before any new write fill the column with nulls, the next append adds it to the table's log schema
(Delta schema evolution, metadata only) and lands, the incremental lease update reads the older event files
next to the new ones, and `who` / `timeline` answer for the VMs of both.

The old lake is made the way the code before the change made it: Delta tables written through deltalake with
the old schemas (no image column in the files nor in the log)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import CommitProperties, DeltaTable, write_deltalake

from tests.conftest import ingest_vm, run_in_process
from tracepipe.correlate.leases import build_leases
from tracepipe.ingest.cloud import parse_openstack
from tracepipe.lake import Lake
from tracepipe.schema import VM_EVENTS, VMS

NOVA = Path(__file__).parent / "data" / "cloud" / "nova" / "notifications.jsonl"
WEB01 = "7311d8a3-c2ce-4f44-bed4-d57b1e2feb89"
WEB02 = "efba91fc-8034-48b6-b610-a9f7f9270f4e"
OLD_EVENTS = pa.schema([f for f in VM_EVENTS if f.name != "image"])
OLD_VMS = pa.schema([f for f in VMS if f.name not in ("image", "first_event_at")])


def _old_lake(root: Path) -> None:
    """vm_events, vm_leases and vms as the previous tracepipe wrote them (no image anywhere), with the lease
    build recorded against the events' version (so that the next ingest updates incrementally)."""
    events, rejects = parse_openstack(NOVA.read_text(), str(NOVA))
    assert rejects.num_rows == 0 and events.num_rows > 10
    leases, vms = build_leases(events)
    days = pc.strftime(events.column("ts"), format="%Y-%m-%d")
    old_events = events.select(OLD_EVENTS.names).cast(OLD_EVENTS).append_column("date", days)
    write_deltalake(str(root / "vm_events"), old_events, partition_by=["date"])
    version = DeltaTable(str(root / "vm_events")).version()
    write_deltalake(str(root / "vms"), vms.select(OLD_VMS.names).cast(OLD_VMS))
    built = CommitProperties(custom_metadata={"tracepipe": json.dumps({"vm_events_version": version})})
    write_deltalake(str(root / "vm_leases"), leases, commit_properties=built)


def _who(lake: Path, addr: str, at: str) -> dict:
    run = run_in_process("who", addr, "--at", at, "--format", "json", "--lake", str(lake))
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.fixture
def old_lake(tmp_path: Path) -> Path:
    root = tmp_path / "lake"
    _old_lake(root)
    assert "image" not in DeltaTable(str(root / "vm_events")).schema().to_arrow().names
    return root


def test_old_lake_reads_before_any_write(old_lake: Path) -> None:
    (lease,) = _who(old_lake, "192.168.1.3", "2024-03-12T08:30:00Z")["leases"]
    assert (lease["vm_id"], lease["vm_name"], lease["image"]) == (WEB02, "web-02", None)
    timeline = run_in_process("timeline", WEB01, "--format", "json", "--lake", str(old_lake))
    assert timeline.returncode == 0, timeline.stderr
    answer = json.loads(timeline.stdout)
    assert (
        answer["vm"]["image"] is None
        and answer["events"]
        and {e["image"] for e in answer["events"]} == {None}
    )


def test_old_lake_takes_new_events_and_answers_for_both(old_lake: Path, tmp_path: Path) -> None:
    # web-02 (an old VM) is rebuilt with another image, and a new VM appears: the generic form's `image`
    update = tmp_path / "rebuild.csv"
    update.write_text(
        "ts,cloud,vm_id,vm_name,project,user,hypervisor,action,addr,state,image\n"
        f"2024-03-12T09:00:00Z,openstack,{WEB02},web-02,,,compute-2,rebuild,192.168.1.3,active,img-rebuilt\n"
        "2024-03-12T09:05:00Z,openstack,vm-new,new-01,p,u,compute-3,create,192.168.1.50,active,img-new\n"
    )
    report, done = ingest_vm(Lake(old_lake), [update])
    assert report.exit_code == 0 and report.rows == 2
    # a lake from before the saved lease state (correlate/leases.py) is rebuilt once on its first update, which
    # reads web-02's older event files next to the new one and writes the state; the next hour is incremental
    assert done.leases["mode"] == "full"
    later = tmp_path / "later.csv"
    later.write_text(
        "ts,cloud,vm_id,vm_name,project,user,hypervisor,action,addr,state,image\n"
        "2024-03-12T09:10:00Z,openstack,vm-later,later-01,p,u,compute-3,create,192.168.1.51,active,img-new\n"
    )
    report, done = ingest_vm(Lake(old_lake), [later])
    assert report.exit_code == 0 and report.rows == 1 and done.leases["mode"] == "incremental"
    # the append evolved the log schema; the older files stay as they were
    assert "image" in DeltaTable(str(old_lake / "vm_events")).schema().to_arrow().names
    assert "image" in DeltaTable(str(old_lake / "vms")).schema().to_arrow().names
    (lease,) = _who(old_lake, "192.168.1.3", "2024-03-12T09:30:00Z")["leases"]
    assert (lease["vm_id"], lease["image"]) == (WEB02, "img-rebuilt")
    (lease,) = _who(old_lake, "192.168.1.50", "2024-03-12T09:30:00Z")["leases"]
    assert (lease["vm_name"], lease["image"]) == ("new-01", "img-new")
    (lease,) = _who(old_lake, "192.168.1.3", "2024-03-12T07:30:00Z")["leases"]  # web-01: landed before images
    assert (lease["vm_id"], lease["image"]) == (WEB01, None)
    timeline = json.loads(
        run_in_process("timeline", WEB02, "--format", "json", "--lake", str(old_lake)).stdout
    )
    assert [e["image"] for e in timeline["events"]][-1] == "img-rebuilt"
    assert None in {e["image"] for e in timeline["events"]}  # its events from the older files
    # a full rebuild reads both generations of files too, and Delta readers see the column
    run = run_in_process("leases", "rebuild", "--lake", str(old_lake))
    assert run.returncode == 0, run.stderr
    (lease,) = _who(old_lake, "192.168.1.3", "2024-03-12T09:30:00Z")["leases"]
    assert lease["image"] == "img-rebuilt"
    images = DeltaTable(str(old_lake / "vm_events")).to_pyarrow_table(columns=["image"]).column("image")
    assert images.null_count == images.length() - 3  # the two events above and vm-later's


def test_upgrade_adds_the_columns_without_rewriting(old_lake: Path) -> None:
    files = sorted(DeltaTable(str(old_lake / "vm_events")).file_uris())
    run = run_in_process("upgrade", "--lake", str(old_lake))
    assert run.returncode == 0, run.stderr
    table = DeltaTable(str(old_lake / "vm_events"))
    assert "image" in table.schema().to_arrow().names and sorted(table.file_uris()) == files
    assert _who(old_lake, "192.168.1.3", "2024-03-12T08:30:00Z")["leases"][0]["image"] is None


def test_old_flows_lake_takes_tunnelled_flows(tmp_path: Path) -> None:
    """Issue 16 adds flows.tunnel_src_addr/tunnel_dst_addr/tunnel_proto. A flows table written without them
    (deltalake, the old schema) reads with nulls, takes flows that carry them, and SQL sees both generations."""
    from tracepipe.lake import ingest_table
    from tracepipe.schema import FLOWS, TUNNEL_COLUMNS

    old_schema = pa.schema([f for f in FLOWS if f.name not in TUNNEL_COLUMNS])
    row = {
        "ts_start": pa.scalar(1_710_230_400_000_000, pa.timestamp("us", tz="UTC")).as_py(),
        "ts_end": pa.scalar(1_710_230_401_000_000, pa.timestamp("us", tz="UTC")).as_py(),
        "src_addr": "10.0.0.1",
        "dst_addr": "10.0.0.2",
        "src_port": 1,
        "dst_port": 2,
        "proto": 17,
        "ip_version": 4,
    }
    old = pa.Table.from_pylist([row], schema=old_schema)
    days = pc.strftime(old.column("ts_start"), format="%Y-%m-%d")
    write_deltalake(str(tmp_path / "lake" / "flows"), old.append_column("date", days), partition_by=["date"])
    lake = Lake(tmp_path / "lake")
    tunnelled = {**row, "src_addr": "10.9.8.7", "dst_port": 1111, "tunnel_src_addr": "fc00::1"}
    tunnelled |= {"tunnel_dst_addr": "fc00::2", "tunnel_proto": 4}
    ingest_table(lake, "flows", "new", "hash-new", [pa.Table.from_pylist([tunnelled], schema=FLOWS)])
    run = run_in_process(
        "sql",
        "SELECT src_addr, tunnel_src_addr, tunnel_proto FROM flows ORDER BY src_addr",
        "--format",
        "json",
        "--lake",
        str(tmp_path / "lake"),
    )
    assert run.returncode == 0, run.stderr
    rows = [(r["src_addr"], r["tunnel_src_addr"], r["tunnel_proto"]) for r in json.loads(run.stdout)]
    assert rows == [("10.0.0.1", None, None), ("10.9.8.7", "fc00::1", 4)]


def test_old_flows_lake_takes_router_columns(tmp_path: Path) -> None:
    """Issue 16 adds flows.flow_direction ... output_if_name (schema.ROUTER_COLUMNS) after the tunnel columns. A
    flows table written as main wrote it before (tunnel columns, no router columns) reads them as null, takes
    flows that carry them, and SQL sees both generations."""
    from tracepipe.lake import ingest_table
    from tracepipe.schema import FLOWS, ROUTER_COLUMNS

    old_schema = pa.schema([f for f in FLOWS if f.name not in ROUTER_COLUMNS])
    row = {
        "ts_start": pa.scalar(1_710_230_400_000_000, pa.timestamp("us", tz="UTC")).as_py(),
        "ts_end": pa.scalar(1_710_230_401_000_000, pa.timestamp("us", tz="UTC")).as_py(),
        "src_addr": "10.0.0.1",
        "dst_addr": "10.0.0.2",
        "proto": 6,
    }
    old = pa.Table.from_pylist([row], schema=old_schema)
    days = pc.strftime(old.column("ts_start"), format="%Y-%m-%d")
    write_deltalake(str(tmp_path / "lake" / "flows"), old.append_column("date", days), partition_by=["date"])
    routed = {
        **row,
        "src_addr": "10.0.29.46",
        "flow_direction": "egress",
        "mpls_labels": "20005-0-0 524250-0-1",
    }
    routed |= {"ingress_vrf": 1610612736, "input_if_name": "TenGigE0_6_0_2", "flow_end_reason": "idleTimeout"}
    ingest_table(
        Lake(tmp_path / "lake"), "flows", "new", "hash-new", [pa.Table.from_pylist([routed], schema=FLOWS)]
    )
    run = run_in_process(
        "sql",
        "SELECT src_addr, flow_direction, mpls_labels, ingress_vrf, input_if_name FROM flows ORDER BY src_addr",
        "--format",
        "json",
        "--lake",
        str(tmp_path / "lake"),
    )
    assert run.returncode == 0, run.stderr
    rows = [tuple(r.values()) for r in json.loads(run.stdout)]
    assert rows == [
        ("10.0.0.1", None, None, None, None),
        ("10.0.29.46", "egress", "20005-0-0 524250-0-1", 1610612736, "TenGigE0_6_0_2"),
    ]


def test_old_flows_lake_takes_nat_firewall_vrf_srv6_columns(tmp_path: Path) -> None:
    """Issue 16 (second part) adds schema.ROUTER_EXTRA_COLUMNS (nat_*, fw_*, VRF names, SRv6) after the router
    columns. A flows table written before them reads them as null, takes a NAT'd flow, and the nat_inside macro
    finds the inside host of the new row only."""
    from tracepipe.lake import ingest_table
    from tracepipe.schema import FLOWS, ROUTER_EXTRA_COLUMNS

    old_schema = pa.schema([f for f in FLOWS if f.name not in ROUTER_EXTRA_COLUMNS])
    row = {
        "ts_start": pa.scalar(1_710_230_400_000_000, pa.timestamp("us", tz="UTC")).as_py(),
        "ts_end": pa.scalar(1_710_230_401_000_000, pa.timestamp("us", tz="UTC")).as_py(),
        "src_addr": "10.0.0.1",
        "dst_addr": "192.0.2.80",
        "proto": 6,
    }
    old = pa.Table.from_pylist([row], schema=old_schema)
    days = pc.strftime(old.column("ts_start"), format="%Y-%m-%d")
    write_deltalake(str(tmp_path / "lake" / "flows"), old.append_column("date", days), partition_by=["date"])
    natted = {**row, "src_addr": "10.0.0.2", "src_port": 40000, "nat_src_addr": "198.51.100.7"}
    natted |= {"nat_src_port": 51234, "fw_event": "CREATE", "ingress_vrf_name": "blue"}
    ingest_table(
        Lake(tmp_path / "lake"), "flows", "new", "hash-new", [pa.Table.from_pylist([natted], schema=FLOWS)]
    )
    run = run_in_process(
        "sql",
        "SELECT src_addr, nat_src_addr, nat_src_port, fw_event, ingress_vrf_name, srv6_segments FROM flows"
        " ORDER BY src_addr",
        "--format",
        "json",
        "--lake",
        str(tmp_path / "lake"),
    )
    assert run.returncode == 0, run.stderr
    assert [tuple(r.values()) for r in json.loads(run.stdout)] == [
        ("10.0.0.1", None, None, None, None, None),
        ("10.0.0.2", "198.51.100.7", 51234, "CREATE", "blue", None),
    ]
    pivot = run_in_process(
        "sql",
        "SELECT inside_addr, inside_port FROM nat_inside('198.51.100.7', TIMESTAMPTZ '2024-03-12 08:02:00+00', 51234)",
        "--format",
        "json",
        "--lake",
        str(tmp_path / "lake"),
    )
    assert pivot.returncode == 0, pivot.stderr
    assert [tuple(r.values()) for r in json.loads(pivot.stdout)] == [("10.0.0.2", 40000)]
