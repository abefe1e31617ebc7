"""Neutron floating IPs (real designate samples): the floating lease lands on the VM that held the port or the
fixed address then; disassociate and delete (id only) close it."""

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa

from tracepipe.correlate.leases import build_leases
from tracepipe.ingest.cloud import parse_cloud_text

DATA = Path(__file__).parent / "data" / "cloud"
ASSOCIATED = dt.datetime(2012, 11, 18, 1, 29, 29, 497899, tzinfo=dt.UTC)
DISASSOCIATED = dt.datetime(2012, 11, 18, 1, 35, 8, 312766, tzinfo=dt.UTC)
VM = "8b3a6f52-0d4e-4f8c-9a43-2c1c4f3ad1e7"


def parse(*names: str) -> pa.Table:
    tables = []
    for name in names:
        path = DATA / name
        events, rejects = parse_cloud_text(path.read_text(), str(path))
        assert rejects.num_rows == (1 if name.endswith(".csv") else 0)  # the CSV has one bad line on purpose
        tables.append(events)
    return pa.concat_tables(tables)


def test_floating_ip_events_parsed():
    events = parse(
        "neutron/floatingip.update.end_associate.json",
        "neutron/floatingip.update.end_disassociate.json",
        "neutron/floatingip.delete.start.json",
        "neutron/port.create.end.json",
    )
    rows = events.to_pylist()
    assert [r["action"] for r in rows] == ["fip_associate", "fip_disassociate", "fip_delete", "port_update"]
    assert rows[0]["addr"] == "192.168.5.201" and rows[0]["addrs"] == ["172.16.59.10"]
    assert rows[0]["port_id"] == "289ed46b-274c-444d-9fd4-bddf8acc7d7c" and rows[0]["addr_kind"] == "floating"
    assert {r["resource_id"] for r in rows[:3]} == {"f38ff2b6-cd4d-433e-8a9c-9e00dfc05b1e"}
    assert rows[2]["addr"] is None  # delete carries only the id
    assert rows[3]["vm_id"] == VM and rows[3]["addrs"] == ["172.16.59.10"]


def test_floating_lease_through_port_device_id():
    events = parse(
        "neutron/port.create.end.json",
        "neutron/floatingip.update.end_associate.json",
        "neutron/floatingip.update.end_disassociate.json",
        "neutron/floatingip.delete.start.json",
    )
    leases, _ = build_leases(events)
    rows = {(r["addr"], r["addr_kind"]): r for r in leases.to_pylist()}
    floating = rows[("192.168.5.201", "floating")]
    assert floating["vm_id"] == VM
    assert (floating["valid_from"], floating["valid_to"], floating["end_reason"]) == (
        ASSOCIATED,
        DISASSOCIATED,
        "fip_disassociate",
    )
    fixed = rows[("172.16.59.10", "fixed")]
    assert fixed["vm_id"] == VM and fixed["valid_to"] is None and fixed["hypervisor"] == "compute-3"


def test_floating_lease_through_fixed_address_lease_and_vm_delete():
    """No port event: the VM is the one whose lease held the fixed address (generic CSV inventory) then."""
    events = parse("generic/inventory.csv", "neutron/floatingip.update.end_associate.json")
    leases, _ = build_leases(events)
    floating = [r for r in leases.to_pylist() if r["addr_kind"] == "floating"]
    assert len(floating) == 1
    assert floating[0]["vm_id"] == "vm-b" and floating[0]["vm_name"] == "fip-target"
    assert floating[0]["project"] == "physics" and floating[0]["hypervisor"] == "node-7"
    # the VM is deleted at 03:00 UTC: its floating IP stops pointing at it then
    assert floating[0]["valid_from"] == ASSOCIATED
    assert floating[0]["valid_to"] == dt.datetime(2012, 11, 18, 3, 0, tzinfo=dt.UTC)
    assert floating[0]["end_reason"] == "delete"


def test_delete_by_id_only_closes_the_remembered_address():
    events = parse(
        "neutron/port.create.end.json",
        "neutron/floatingip.update.end_associate.json",
        "neutron/floatingip.delete.start.json",
    )
    leases, _ = build_leases(events)
    floating = next(r for r in leases.to_pylist() if r["addr_kind"] == "floating")
    assert floating["end_reason"] == "fip_delete"
    assert floating["valid_to"] == dt.datetime(2014, 1, 17, 11, 30, 41, 456481, tzinfo=dt.UTC)


def test_unresolvable_floating_ip_keeps_where_it_pointed():
    events = parse("neutron/floatingip.update.end_associate.json")
    leases, _ = build_leases(events)
    assert leases.column("vm_id").to_pylist() == ["port:289ed46b-274c-444d-9fd4-bddf8acc7d7c"]


def test_port_details_name_the_vm_and_port_unbind_detaches():
    """Neutron's fip-port-details extension carries the port's device_id; a port update that clears the
    device_id takes its fixed addresses away from the VM."""
    associate = json.loads((DATA / "neutron" / "floatingip.update.end_associate.json").read_text())
    associate["payload"]["floatingip"]["port_details"] = {"device_id": "vm-pd", "device_owner": "compute:az1"}
    port = json.loads((DATA / "neutron" / "port.create.end.json").read_text())
    port["payload"]["port"]["device_id"] = "vm-pd"
    unbind = json.loads(json.dumps(port))
    unbind.update(event_type="port.update.end", message_id="m-unbind", timestamp="2012-11-18 02:00:00.000000")
    unbind["payload"]["port"].update(device_id="", device_owner="")
    text = "\n".join(json.dumps(m) for m in (associate, port, unbind))
    events, rejects = parse_cloud_text(text, "mixed.jsonl")
    assert rejects.num_rows == 0
    assert events.column("action").to_pylist() == ["fip_associate", "port_update", "detach"]
    assert events.column("vm_id").to_pylist()[0] == "vm-pd"
    leases, _ = build_leases(events)
    got = {(r["addr"], r["vm_id"], r["valid_to"], r["end_reason"]) for r in leases.to_pylist()}
    unbound = dt.datetime(2012, 11, 18, 2, tzinfo=dt.UTC)
    assert got == {("192.168.5.201", "vm-pd", None, None), ("172.16.59.10", "vm-pd", unbound, "detach")}


def _sample(name: str) -> dict:
    return json.loads((DATA / "neutron" / name).read_text())


def test_hostile_neutron_fields_reject_their_line_and_addresses_are_canonical():
    base = _sample("floatingip.update.end_associate.json")

    def variant(**floatingip) -> str:
        message = json.loads(json.dumps(base))
        message["payload"]["floatingip"].update(floatingip)
        return json.dumps(message)

    lines = [
        variant(floating_ip_address="2001:DB8::00C8", fixed_ip_address="2001:db8:0:0::10"),
        variant(floating_ip_address="not-an-ip"),
        variant(fixed_ip_address="999.1.1.1"),
        variant(id=None),
        variant(port_id={"nested": "object"}),
        json.dumps({**base, "payload": ["a", "list"]}),
        json.dumps({**base, "timestamp": "9999-01-01 00:00:00"}),
        json.dumps({**base, "timestamp": "not a time"}),
        json.dumps({**base, "timestamp": None}),
    ]
    events, rejects = parse_cloud_text("\n".join(lines) + "\n", "n.jsonl", fmt="neutron")
    assert events.to_pydict()["addr"] == ["2001:db8::c8"] and events.to_pydict()["addrs"] == [
        ["2001:db8::10"]
    ]
    got = sorted(zip(rejects.to_pydict()["line"], rejects.to_pydict()["reason"], strict=True))
    assert got == [
        (2, "not an IP address"),
        (3, "not an IP address"),  # the fixed address of an association: the row means nothing without it
        (4, "floating IP event without id"),
        (5, "wrong JSON type"),
        (6, "wrong JSON type"),
        (7, "time out of range"),
        (8, "bad timestamp"),
        (9, "notification without timestamp"),
    ]


def test_a_port_of_another_project_naming_a_vm_does_not_give_it_the_address():
    # Neutron lets any tenant create a port with device_owner "compute:nova" and any device_id: such a port of
    # project "evil" named another project's VM, and `who` pinned the port's address on that VM
    nova = json.loads((DATA / "nova" / "instance-update.json").read_text())
    vm = nova["payload"]["nova_object.data"]["uuid"]
    project = nova["payload"]["nova_object.data"]["tenant_id"]
    nova["timestamp"] = "2012-11-18 01:00:00.000000"
    port = json.loads((DATA / "neutron" / "port.create.end.json").read_text())

    def port_event(port_id: str, tenant: str, addr: str) -> dict:
        event = json.loads(json.dumps(port))
        event.update(message_id=f"m-{port_id}", _context_tenant_id=tenant)
        event["payload"]["port"].update(
            id=port_id, tenant_id=tenant, device_id=vm, fixed_ips=[{"subnet_id": "s", "ip_address": addr}]
        )
        return event

    messages = [
        nova,
        port_event("p-own", project, "172.16.59.20"),
        port_event("p-evil", "evil", "172.16.59.66"),
    ]
    events, rejects = parse_cloud_text("\n".join(json.dumps(m) for m in messages), "mixed.jsonl")
    assert rejects.num_rows == 0 and events.column("vm_id").to_pylist() == [vm] * 3
    leases, _ = build_leases(events)
    got = {(r["addr"], r["vm_id"]) for r in leases.to_pylist()}
    assert ("172.16.59.20", vm) in got  # its own project's port: the VM's address
    assert not [r for r in got if r[0] == "172.16.59.66"]  # the other project's: nobody's
    # the same with vm_id read as a Parquet dictionary (it raised: the dictionary field kept for the text)
    index = events.schema.get_field_index("vm_id")
    coded = events.set_column(
        index,
        pa.field("vm_id", pa.dictionary(pa.int32(), pa.string())),
        events.column("vm_id").dictionary_encode(),
    )
    assert {(r["addr"], r["vm_id"]) for r in build_leases(coded)[0].to_pylist()} == got
