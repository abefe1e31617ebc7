"""OpenStack notifications -> schema.VM_EVENTS rows (Nova versioned `instance.*` here; Neutron in neutron.py).

Input: what a notification listener dumps: one JSON per line, either the oslo messaging envelope
(`{"oslo.version": "2.0", "oslo.message": "<JSON string>"}`) or the bare message, or a service log written by
`[oslo_messaging_notifications] driver = log` (each line the log's prefix, then the message as JSON); a JSON
array of messages or one pretty-printed message per file (like Nova's doc samples) works too. Versioned
(`instance.*`, payload `nova_object.data`) and legacy unversioned (`compute.instance.*`, payload `instance_id`,
`fixed_ips`) notifications alike.
Output: (events, rejects). A line that is not JSON, a message without a usable time (or with one outside
1990..now+1 day), without an instance uuid, or with fields of the wrong JSON type is a reject with its line
number; an `instance.*` event type we do not know is kept with action "unknown".
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

from tracepipe.ingest.cloud.common import (
    BadRecord,
    EventColumns,
    RejectColumns,
    event_time,
    json_loads,
    object_field,
    text_field,
)
from tracepipe.limits import text_lines

CLOUD = "openstack"

# Nova event name (without "instance." and the .start/.end/.error phase) -> normalised action.
NOVA_ACTIONS = {
    "create": "create",
    "update": "update",
    "exists": "exists",
    "power_on": "power_on",
    "power_off": "power_off",
    "reboot": "reboot",
    "rebuild": "rebuild",
    "shelve": "shelve",
    "shelve_offload": "shelve_offload",
    "unshelve": "unshelve",
    "soft_delete": "soft_delete",
    "restore": "restore",
    "delete": "delete",
    "force_delete": "force_delete",
    "interface_attach": "attach",
    "interface_detach": "detach",
    # state changes that move no address: kept as updates so that the VM's state follows
    "pause": "update",
    "unpause": "update",
    "suspend": "update",
    "resume": "update",
    "resize_finish": "migrate",
    "resize_confirm": "update",
    "evacuate": "migrate",
    # legacy (unversioned) names of the same steps, where they differ (`compute.instance.<name>`)
    "finish_resize": "migrate",
    "resize.confirm": "update",
    "resize.prep": "update",
    "shutdown": "update",
}

# Nova vm_state (InstancePayload.state) -> schema.VM_STATES
NOVA_STATES = {
    "active": "active",
    "building": "building",
    "stopped": "stopped",
    "paused": "paused",
    "suspended": "suspended",
    "shelved": "shelved",
    "shelved_offloaded": "shelved",
    "soft-delete": "soft_deleted",
    "soft_deleted": "soft_deleted",
    "deleted": "deleted",
    "error": "error",
    "rescued": "active",
    "resized": "active",
}


def split_event_type(event_type: str) -> tuple[str, str | None]:
    """ "instance.power_off.end" -> ("power_off", "end"); "instance.update" -> ("update", None); the legacy
    (unversioned) "compute.instance.power_off.end" alike."""
    name = event_type.removeprefix("compute.").removeprefix("instance.")
    for phase in ("start", "end", "error"):
        if name.endswith("." + phase):
            return name[: -len(phase) - 1], phase
    return name, None


def nova_action(event_type: str) -> str:
    name, _ = split_event_type(event_type)
    if name.startswith("live_migration"):
        return "migrate"
    return NOVA_ACTIONS.get(name, "unknown")


def iter_messages(text: str, source: str, rejects: RejectColumns) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, message dict) from a notification dump; bad lines go to `rejects`.

    The oslo envelope is unwrapped (`oslo.message` is a JSON string inside JSON). A file whose first
    non-blank character is `[`, or that holds one pretty-printed object, is read as a whole."""
    stripped = text.lstrip()
    if not stripped:
        return
    first_line = stripped.split("\n", 1)[0].strip()
    whole_file = stripped.startswith("[") or first_line in ("{", "{\n")
    if whole_file:
        try:
            loaded = json_loads(text)
        except json.JSONDecodeError as exc:
            rejects.add(exc.lineno, "malformed JSON", str(exc))
            return
        items = loaded if isinstance(loaded, list) else [loaded]
        for item in items:
            message = _unwrap(item)
            if message is None:
                rejects.add(1, "not a notification", json.dumps(item)[:300])
            else:
                yield 1, message
        return
    for number, line in enumerate(text_lines(text), start=1):
        if not line.strip():
            continue
        try:
            item = json_loads(line)
        except json.JSONDecodeError as exc:
            item = _logged(line)
            if item is None:
                rejects.add(number, "malformed JSON", f"{exc}: {line[:200]}")
                continue
        message = _unwrap(item)
        if message is None:
            rejects.add(number, "not a notification", line[:300])
            continue
        yield number, message


def _logged(line: str) -> Any:
    """The message of a line written by oslo.messaging's `log` notification driver: the service's log prefix
    (time, pid, level, logger `oslo.messaging.notification.<event_type>`, request ids), then the message as
    JSON. None when no JSON object follows a prefix."""
    at = line.find('{"')
    if at <= 0:
        return None
    try:
        return json_loads(line[at:])
    except json.JSONDecodeError:
        return None


def _unwrap(item: Any) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    if "oslo.message" in item:
        inner = item["oslo.message"]
        if isinstance(inner, str):
            try:
                inner = json_loads(inner)
            except json.JSONDecodeError:
                return None
        return inner if isinstance(inner, dict) and "event_type" in inner else None
    return item if "event_type" in item else None


def _payload_data(message: dict[str, Any]) -> dict[str, Any]:
    """The instance payload: `payload.nova_object.data` (versioned) or `payload` (legacy); BadRecord when
    either is there but not an object."""
    payload = object_field(message, "payload")
    if "nova_object.data" in payload:
        return object_field(payload, "nova_object.data", "payload.")
    return payload


def _ip_payloads(data: dict[str, Any], listed: str | None) -> list[dict[str, Any]]:
    """The entries of the payload's address list `listed` (versioned ip_addresses, legacy fixed_ips) that hold
    an address."""
    addresses = data.get(listed) if listed else None
    if addresses is None:
        return []
    if not isinstance(addresses, list):
        raise BadRecord("wrong JSON type", f"payload {listed} is not a list")
    out = []
    for item in addresses:
        if not isinstance(item, dict):
            raise BadRecord("wrong JSON type", f"an {listed} entry is not an object")
        inner = object_field(item, "nova_object.data", f"{listed}[].") if "nova_object.data" in item else item
        if text_field(inner, "address", f"{listed}[]."):
            out.append(inner)
    return out


def _time(message: dict[str, Any], data: dict[str, Any]) -> dt.datetime:
    """The notification's `timestamp`; Nova's doc samples carry none, and only then the instance's
    updated_at/created_at stand in. A timestamp that is there but does not parse is a BadRecord: falling back
    to the instance's creation date would put the event years away from when it happened."""
    for record, key in ((message, "timestamp"), (data, "updated_at"), (data, "created_at")):
        if record.get(key) not in (None, ""):
            return event_time(record[key], what=key)
    raise BadRecord("notification without timestamp", str(message.get("event_type")))


def add_nova_event(
    columns: EventColumns, rejects: RejectColumns, message: dict[str, Any], source: str, line: int
) -> None:
    """One `instance.*` message -> one vm_events row; BadRecord when it has no usable time, no instance uuid,
    or fields of the wrong JSON type."""
    event_type = text_field(message, "event_type") or ""
    data = _payload_data(message)
    ts = _time(message, data)
    where = "payload."
    # (legacy, unversioned notifications: `instance_id` and `fixed_ips`, Nova's notification_format=unversioned)
    vm_id = text_field(data, "uuid", where) or text_field(data, "instance_id", where)
    if vm_id is None:
        raise BadRecord("notification without instance uuid", event_type)
    listed = "ip_addresses" if "ip_addresses" in data else "fixed_ips" if "fixed_ips" in data else None
    ips = _ip_payloads(data, listed)
    addrs = [text_field(ip, "address") for ip in ips]
    # the port of the addresses, when one port holds them all (a dual-stack port: IPv4 and IPv6): a port.delete
    # then ends them (an event names one port; a VM of several ports names none)
    ports = {text_field(ip, "port_uuid", f"{listed}[].") for ip in ips}
    action = nova_action(event_type)
    state = text_field(data, "state", where)
    columns.add(
        ts=ts,
        cloud=CLOUD,
        vm_id=vm_id,
        vm_name=text_field(data, "display_name", where),
        project=text_field(data, "tenant_id", where),
        user=text_field(data, "user_id", where),
        hypervisor=text_field(data, "host", where) or text_field(data, "node", where),
        event_type=event_type,
        action=action,
        state=NOVA_STATES.get(state, "unknown") if state else None,
        # ip_addresses is the instance's full list; a deleted instance reports none.
        addrs=addrs if listed else None,
        addr=None,
        addr_kind="fixed" if addrs else None,
        port_id=ports.pop() if len(ports) == 1 else None,
        event_id=text_field(message, "message_id") or text_field(message, "_unique_id"),
        source=source,
        line=line,
        resource_id=None,
        image=_image(data),
    )


def _image(data: dict[str, Any]) -> str | None:
    """The image the instance was booted from (or rebuilt with): versioned InstancePayload.image_uuid; the
    legacy payload's image_meta.base_image_ref, else the last part of image_ref_url. Null (not "") for a
    volume-backed instance, which Nova reports with an empty image_uuid."""
    image = text_field(data, "image_uuid", "payload.")
    if image is None and "image_meta" in data:
        image = text_field(
            object_field(data, "image_meta", "payload."), "base_image_ref", "payload.image_meta."
        )
    url = text_field(data, "image_ref_url", "payload.") if image is None else None
    if url is not None:  # http://glance:9292/images/<uuid>
        image = url.rstrip("/").rsplit("/", 1)[-1] or None
    return image
