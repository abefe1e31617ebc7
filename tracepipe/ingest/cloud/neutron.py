"""Neutron notifications (floating IPs and ports) -> schema.VM_EVENTS rows.

Floating IP events name no VM: `floatingip.update.end` maps the floating address to a fixed address and a port,
`floatingip.delete.*` carries only the floating IP's id. So these rows keep `addr` = floating address,
`addrs` = [fixed address], `port_id`, `resource_id` = floating IP id, and leases.py resolves the VM (port's
device_id, else whoever held the fixed address then). Port events with a `compute:*` owner tie a port and its
fixed addresses to a VM (`device_id`). Any tenant can set a port's owner and device_id, and port_details repeat
them: the VM a row names here is a claim, which leases.py accepts only for a VM whose Nova events carry the
row's project (_refused_bindings).
"""

from __future__ import annotations

from typing import Any

from tracepipe.ingest.cloud.common import (
    BadRecord,
    EventColumns,
    RejectColumns,
    event_time,
    object_field,
    text_field,
)

CLOUD = "openstack"


def _port_addrs(port: dict[str, Any]) -> list[str]:
    fixed_ips = port.get("fixed_ips") or []
    if not isinstance(fixed_ips, list) or not all(isinstance(ip, dict) for ip in fixed_ips):
        raise BadRecord("wrong JSON type", "port.fixed_ips is not a list of objects")
    return [addr for ip in fixed_ips if (addr := text_field(ip, "ip_address", "fixed_ips[]."))]


def add_neutron_event(
    columns: EventColumns, rejects: RejectColumns, message: dict[str, Any], source: str, line: int
) -> None:
    """One `floatingip.*` / `port.*` message -> one vm_events row; BadRecord without a usable time, without
    the id of the floating IP or port it is about, or with fields of the wrong JSON type."""
    event_type = text_field(message, "event_type") or ""
    if message.get("timestamp") in (None, ""):
        raise BadRecord("notification without timestamp", event_type)
    ts = event_time(message["timestamp"])
    payload = object_field(message, "payload")
    row: dict[str, Any] = {
        "ts": ts,
        "cloud": CLOUD,
        "event_type": event_type,
        "event_id": text_field(message, "message_id") or text_field(message, "_unique_id"),
        "source": source,
        "line": line,
        "project": text_field(message, "_context_project_id") or text_field(message, "_context_tenant_id"),
        "user": text_field(message, "_context_user_id"),
    }
    if event_type.startswith("floatingip."):
        fip = object_field(payload, "floatingip", "payload.")
        where = "floatingip."
        row["resource_id"] = text_field(fip, "id", where) or text_field(payload, "floatingip_id", "payload.")
        if row["resource_id"] is None:
            raise BadRecord("floating IP event without id", event_type)
        row["addr"] = text_field(fip, "floating_ip_address", where)
        row["addr_kind"] = "floating"
        row["project"] = (
            text_field(fip, "tenant_id", where) or text_field(fip, "project_id", where) or row["project"]
        )
        fixed, port_id = text_field(fip, "fixed_ip_address", where), text_field(fip, "port_id", where)
        if ".delete." in event_type:
            row["action"] = "fip_delete"
        elif fixed and port_id:
            row["action"] = "fip_associate"
            row["addrs"] = [fixed]
            row["port_id"] = port_id
            # Neutron with the fip-port-details extension names the port's owner right here (as the port's
            # tenant set it: leases.py checks it against the VM's project, as a port event's device_id)
            details = object_field(fip, "port_details", where)
            owner = text_field(details, "device_owner", "port_details.") or ""
            device = text_field(details, "device_id", "port_details.")
            if owner.startswith("compute:") and device:
                row["vm_id"] = device
        elif fip:
            row["action"] = "fip_disassociate"
        else:
            row["action"] = "unknown"
    elif event_type.startswith("port."):
        port = object_field(payload, "port", "payload.")
        where = "port."
        row["port_id"] = text_field(port, "id", where) or text_field(payload, "port_id", "payload.")
        if row["port_id"] is None:
            raise BadRecord("port event without id", event_type)
        row["project"] = (
            text_field(port, "tenant_id", where) or text_field(port, "project_id", where) or row["project"]
        )
        owner = text_field(port, "device_owner", where) or ""
        device = text_field(port, "device_id", where)
        # only compute:* ports belong to VMs; router and DHCP ports carry their own device ids
        row["vm_id"] = device if owner.startswith("compute:") else None
        row["hypervisor"] = text_field(port, "binding:host_id", where)
        if ".delete." in event_type or (".update." in event_type and port and not device):
            row["action"] = "detach"  # port deleted, or unbound from its VM: its addresses leave the VM
            fixed = _port_addrs(port) if ".delete." in event_type and row["vm_id"] else []
            if fixed:
                # a VM's port deleted, its addresses named (fixed_ips): each leaves that VM, whatever its other
                # events said of the port (Nova names a port only when one holds all the VM's addresses: a
                # VM of two NICs kept the deleted one's address). One detach row an address, its id made its own
                # (the same message id twice for one VM is one event: leases._replay_order)
                message_id = row["event_id"]
                for addr in fixed:
                    own_id = None if message_id is None else f"{message_id}#{addr}"
                    columns.add(**{**row, "addr": addr, "addr_kind": "fixed", "event_id": own_id})
                return
        else:
            row["action"] = "port_update"
            addrs = _port_addrs(port)
            row["addrs"] = addrs if row["vm_id"] else None
            row["addr_kind"] = "fixed"
    else:
        row["action"] = "unknown"
    columns.add(**row)
