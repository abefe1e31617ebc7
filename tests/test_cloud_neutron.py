"""Neutron floating IPs (real designate samples): the floating lease lands on the VM that held the port or the
fixed address then; disassociate and delete (id only) close it."""

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import ingest_vm

from tracepipe import query
from tracepipe.correlate.leases import build_leases
from tracepipe.ingest.cloud import parse_cloud_text
from tracepipe.lake import Lake

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


def _nova_home(vm: str) -> pa.Table:
    """A Nova event naming `vm` in the samples' project (it lists no address): a port or floating IP of that
    project binds a VM only when the VM's own Nova events carry the project (leases._refused_bindings)."""
    nova = _nova_event("2012-11-18T01:00:00Z", vm, "c97027dd880d4c129ae7a4ba7edade05", [], "some-server")
    for field in ("ip_addresses", "host", "node"):  # (where the VM runs: the port's binding:host_id says)
        del nova["payload"]["nova_object.data"][field]
    events, rejects = parse_cloud_text(json.dumps(nova), "nova.jsonl")
    assert rejects.num_rows == 0
    return events


def test_floating_lease_through_port_device_id():
    events = parse(
        "neutron/port.create.end.json",
        "neutron/floatingip.update.end_associate.json",
        "neutron/floatingip.update.end_disassociate.json",
        "neutron/floatingip.delete.start.json",
    )
    leases, _ = build_leases(pa.concat_tables([_nova_home(VM), events]))
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
    leases, _ = build_leases(pa.concat_tables([_nova_home("vm-pd"), events]))
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


# --- Neutron's claims against the VMs' own projects (leases._refused_bindings), through the real ingest -------


def _nova_event(ts: str, vm: str, project: str, addrs: list[str], name: str) -> dict:
    """A Nova instance.create.end (the shape of nova/instance-update.json) of `vm` in `project`."""
    message = json.loads((DATA / "nova" / "instance-update.json").read_text())
    message.update(event_type="instance.create.end", timestamp=ts, message_id=f"m-{vm}-{ts}")
    message["payload"]["nova_object.data"].update(
        uuid=vm,
        tenant_id=project,
        display_name=name,
        user_id=f"user-of-{name}",
        ip_addresses=[{"nova_object.data": {"address": a, "version": 4}} for a in addrs],
    )
    return message


def _port_event(ts: str, port_id: str, project: str, vm: str, addrs: list[str]) -> dict:
    """A Neutron port.create.end (the shape of neutron/port.create.end.json): project, device_id and fixed
    addresses as any tenant may set them."""
    message = _sample("port.create.end.json")
    message.update(timestamp=ts, message_id=f"m-{port_id}", _context_tenant_id=project)
    message["payload"]["port"].update(
        id=port_id,
        tenant_id=project,
        device_owner="compute:nova",
        device_id=vm,
        fixed_ips=[{"subnet_id": "s", "ip_address": a} for a in addrs],
    )
    return message


def _associate_event(ts: str, fip_id: str, project: str, floating: str, fixed: str, port_id: str, vm=None):
    """A Neutron floatingip.update.end associating `floating` with a port; with `vm`, the fip-port-details
    extension's port_details naming the port's device (what the port says, as any tenant set it)."""
    message = _sample("floatingip.update.end_associate.json")
    message.update(timestamp=ts, message_id=f"m-{fip_id}-{ts}", _context_tenant_id=project)
    message["payload"]["floatingip"].update(
        id=fip_id, tenant_id=project, floating_ip_address=floating, fixed_ip_address=fixed, port_id=port_id
    )
    if vm is not None:
        message["payload"]["floatingip"]["port_details"] = {"device_owner": "compute:nova", "device_id": vm}
    return message


def _landed(tmp_path: Path, batches: list[list[dict]], flows: list[tuple]) -> Lake:
    """A lake of `flows` (ts, src, dst) and the notifications, each batch a file of its own landed by the real
    `ingest vm` (the first builds the leases, the next update them incrementally, or rebuild as they must)."""
    lake = Lake(tmp_path / "lake")
    rows = [
        {
            "ts_start": ts,
            "ts_end": ts,
            "src_addr": src,
            "dst_addr": dst,
            "packets": 1,
            "bytes": 60,
            "source": "t",
        }
        for ts, src, dst in flows
    ]
    if rows:
        lake.append("flows", pa.Table.from_pylist(rows), key="flows")
    for i, batch in enumerate(batches):
        path = tmp_path / f"batch-{i}.jsonl"
        path.write_text("".join(json.dumps(m) + "\n" for m in batch))
        ingest_vm(lake, [path])
    return lake


def _who(lake: Lake, addr: str, at: dt.datetime) -> tuple | None:
    con = query.connect(lake)
    return con.execute("SELECT vm_id, project FROM who_had($a, $t)", {"a": addr, "t": at}).fetchone()


def _attributed(lake: Lake) -> list[tuple]:
    con = query.connect(lake)
    return con.execute(
        "SELECT src_addr, src_vm, src_project FROM flows_attributed ORDER BY src_addr"
    ).fetchall()


def _as_rebuilt(lake: Lake) -> bool:
    """The lake's leases (built by its updates, in whatever order its files landed) are those of one full
    build of its events."""
    order = [("addr", "ascending"), ("valid_from", "ascending"), ("vm_id", "ascending")]
    leases, _ = build_leases(lake.read("vm_events"))
    return lake.read("vm_leases").sort_by(order).to_pylist() == leases.sort_by(order).to_pylist()


VICTIM, EVIL_VM = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"


@pytest.mark.parametrize("order", ["one file", "neutron first", "nova first"])
def test_a_floating_ip_on_a_port_naming_another_projects_vm_is_not_that_vms(tmp_path, order):
    """Review finding F1: tenant evil's VIP port names the victim's VM as its device (device_owner compute:nova,
    which Neutron lets any tenant set); evil associates its floating IP with that port, and Neutron's
    port_details repeat the victim's id. The port event was refused, but the association took the VM from
    port_details unchecked: `who 203.0.113.50` and evil's SSH flow named victim-db (project victim). Now the
    association's VM is checked as a port's is: its holder is the port's (none), so `port:p-vip`. evil's
    floating IP on its own VM's port, port_details naming that VM, still names it."""
    nova = [
        _nova_event("2025-06-17T08:00:00Z", VICTIM, "victim", ["10.0.0.5"], "victim-db"),
        _nova_event("2025-06-17T08:01:00Z", EVIL_VM, "evil", ["10.9.0.7"], "evil-vm"),
    ]
    neutron = [
        _port_event("2025-06-17T08:02:00Z", "p-vip", "evil", VICTIM, ["10.9.0.99"]),
        _associate_event(
            "2025-06-17T08:03:00Z", "fip-1", "evil", "203.0.113.50", "10.9.0.99", "p-vip", VICTIM
        ),
        _port_event("2025-06-17T08:02:30Z", "p-own", "evil", EVIL_VM, ["10.9.0.7"]),
        _associate_event(
            "2025-06-17T08:04:00Z", "fip-2", "evil", "203.0.113.51", "10.9.0.7", "p-own", EVIL_VM
        ),
    ]
    batches = {"one file": [nova + neutron], "neutron first": [neutron, nova], "nova first": [nova, neutron]}
    at = dt.datetime(2025, 6, 17, 9, tzinfo=dt.UTC)
    flows = [(at, "203.0.113.50", "192.0.2.10"), (at, "203.0.113.51", "192.0.2.10")]
    lake = _landed(tmp_path, batches[order], flows)
    assert _who(lake, "203.0.113.50", at) == ("port:p-vip", None)
    assert _who(lake, "10.9.0.99", at) is None
    assert _who(lake, "203.0.113.51", at) == (EVIL_VM, "evil")
    assert _attributed(lake) == [
        ("203.0.113.50", "port:p-vip", None),
        ("203.0.113.51", EVIL_VM, "evil"),
    ]
    assert _as_rebuilt(lake)


@pytest.mark.parametrize("order", ["one file", "neutron later"])
def test_a_port_naming_a_vm_no_nova_event_named_binds_nothing(tmp_path, order):
    """Review finding F2: a port of project evil naming device "42" (any text passes Neutron) pinned
    10.66.0.99, and a floating IP on that port, on OpenNebula's VM 42 (render node of astro-lab, user alice):
    the project check knew projects from Nova's events only and let a VM with none keep every port naming it.
    A Neutron port binds only a VM of its own cloud whose Nova events carry the port's project."""
    one = [(DATA / "opennebula" / name) for name in ("42.log", "42.xml")]
    neutron = [
        _port_event("2024-03-12T09:30:00Z", "p-evil", "evil", "42", ["10.66.0.99"]),
        _associate_event("2024-03-12T09:31:00Z", "fip-evil", "evil", "198.51.100.77", "10.66.0.99", "p-evil"),
        _port_event("2024-03-12T09:32:00Z", "p-ghost", "evil", "no-such-vm", ["10.66.0.98"]),
    ]
    at = dt.datetime(2024, 3, 12, 10, 30, tzinfo=dt.UTC)
    lake = Lake(tmp_path / "lake")
    path = tmp_path / "neutron.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in neutron))
    if order == "one file":
        ingest_vm(lake, [*one, path])
    else:
        ingest_vm(lake, one)
        ingest_vm(lake, [path])
    assert _who(lake, "10.10.0.42", at) == ("42", "astro-lab")  # the VM's own address (its XML) stays its
    assert _who(lake, "10.66.0.99", at) is None
    assert _who(lake, "10.66.0.98", at) is None
    assert _who(lake, "198.51.100.77", at) == ("port:p-evil", None)
    assert _as_rebuilt(lake)


@pytest.mark.parametrize("project", ["web", "other"])
def test_a_port_landed_before_its_vms_first_nova_event_binds_it_then(tmp_path, project):
    """A port (project web) naming a VM that no Nova event named yet binds nothing; when the VM's Nova create
    lands later, in the port's project, the port binds it from the port's own time on (the update is then a
    full rebuild: the port's event must be judged again); in another project it never does. Either way the
    lake holds the leases of one build of all the events."""
    vm = "33333333-3333-3333-3333-333333333333"
    port = [_port_event("2025-06-17T08:00:00Z", "p-web", "web", vm, ["10.1.0.9"])]
    nova = [_nova_event("2025-06-17T08:00:20Z", vm, project, ["10.1.0.10"], "web-01")]
    at = dt.datetime(2025, 6, 17, 8, 0, 10, tzinfo=dt.UTC)
    lake = _landed(tmp_path, [port], [])
    assert _who(lake, "10.1.0.9", at) is None
    path = tmp_path / "nova.jsonl"
    path.write_text(json.dumps(nova[0]) + "\n")
    _, done = ingest_vm(lake, [path])
    assert _who(lake, "10.1.0.9", at) == ((vm, "web") if project == "web" else None)
    assert done.leases["mode"] == ("full" if project == "web" else "incremental")
    assert _as_rebuilt(lake)
