"""Neutron notifications (floating IPs and ports) -> schema.VM_EVENTS rows.

Floating IP events name no VM: `floatingip.update.end` maps the floating address to a fixed address and a port,
`floatingip.delete.*` carries only the floating IP's id. So these rows keep `addr` = floating address,
`addrs` = [fixed address], `port_id`, `resource_id` = floating IP id, and leases.py resolves the VM (port's
device_id, else whoever held the fixed address then). Port events with a `compute:*` owner tie a port and its
fixed addresses to a VM (`device_id`).
"""

from __future__ import annotations

from typing import Any

from tracepipe.ingest.cloud.common import EventColumns, RejectColumns
from tracepipe.units import to_utc

CLOUD = "openstack"


def _port_addrs(port: dict[str, Any]) -> list[str]:
    return [
        ip["ip_address"]
        for ip in port.get("fixed_ips") or []
        if isinstance(ip, dict) and ip.get("ip_address")
    ]


def add_neutron_event(
    columns: EventColumns, rejects: RejectColumns, message: dict[str, Any], source: str, line: int
) -> None:
    """One `floatingip.*` / `port.*` message -> one vm_events row (or a reject without a usable time)."""
    event_type = str(message.get("event_type"))
    ts = to_utc(message.get("timestamp"))
    if ts is None:
        rejects.add(line, "notification without timestamp", event_type)
        return
    payload = message.get("payload") if isinstance(message.get("payload"), dict) else {}
    row: dict[str, Any] = {
        "ts": ts,
        "cloud": CLOUD,
        "event_type": event_type,
        "event_id": message.get("message_id") or message.get("_unique_id"),
        "source": source,
        "line": line,
        "project": message.get("_context_project_id") or message.get("_context_tenant_id"),
        "user": message.get("_context_user_id"),
    }
    if event_type.startswith("floatingip."):
        fip = payload.get("floatingip") if isinstance(payload.get("floatingip"), dict) else {}
        row["resource_id"] = fip.get("id") or payload.get("floatingip_id")
        row["addr"] = fip.get("floating_ip_address")
        row["addr_kind"] = "floating"
        row["project"] = fip.get("tenant_id") or fip.get("project_id") or row["project"]
        if ".delete." in event_type:
            row["action"] = "fip_delete"
        elif fip.get("fixed_ip_address") and fip.get("port_id"):
            row["action"] = "fip_associate"
            row["addrs"] = [fip["fixed_ip_address"]]
            row["port_id"] = fip["port_id"]
            # Neutron with the fip-port-details extension names the port's owner right here
            details = fip.get("port_details") if isinstance(fip.get("port_details"), dict) else {}
            if str(details.get("device_owner") or "").startswith("compute:") and details.get("device_id"):
                row["vm_id"] = details["device_id"]
        elif fip:
            row["action"] = "fip_disassociate"
        else:
            row["action"] = "unknown"
    elif event_type.startswith("port."):
        port = payload.get("port") if isinstance(payload.get("port"), dict) else {}
        row["port_id"] = port.get("id") or payload.get("port_id")
        row["project"] = port.get("tenant_id") or port.get("project_id") or row["project"]
        owner = str(port.get("device_owner") or "")
        # only compute:* ports belong to VMs; router and DHCP ports carry their own device ids
        row["vm_id"] = (
            port.get("device_id") if owner.startswith("compute:") and port.get("device_id") else None
        )
        row["hypervisor"] = port.get("binding:host_id") or None
        if ".delete." in event_type or (".update." in event_type and port and not port.get("device_id")):
            row["action"] = "detach"  # port deleted, or unbound from its VM: its addresses leave the VM
        else:
            row["action"] = "port_update"
            addrs = _port_addrs(port)
            row["addrs"] = addrs if row["vm_id"] else None
            row["addr_kind"] = "fixed"
    else:
        row["action"] = "unknown"
    columns.add(**row)
