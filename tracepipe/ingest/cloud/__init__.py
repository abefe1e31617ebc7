"""VM-lifecycle sources -> schema.VM_EVENTS: format detection and dispatch.

`parse_cloud_text(text, source, fmt)` is pure (text in, (events, rejects) out). Formats: "nova"/"neutron"
(both read as OpenStack notifications: one dump may mix `instance.*`, `floatingip.*` and `port.*`),
"opennebula" (a VM log `<id>.log`, and/or its `onevm show -x` XML), "csv"/"jsonl" (the generic form, see
generic.py). "auto" sniffs the file name and its first line.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import PurePath

import pyarrow as pa

from tracepipe.errors import UsageError
from tracepipe.ingest.cloud.common import BadRecord, EventColumns, RejectColumns, json_loads
from tracepipe.ingest.cloud.neutron import add_neutron_event
from tracepipe.ingest.cloud.nova import add_nova_event, iter_messages

FORMATS = ("auto", "nova", "neutron", "opennebula", "csv", "jsonl")
_ONE_LOG_LINE = re.compile(r"^\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4} \[Z\d+\]")


def parse_openstack(text: str, source: str = "") -> tuple[pa.Table, pa.Table]:
    """OpenStack notification dump (Nova, Neutron, mixed) -> (vm_events, rejects)."""
    columns = EventColumns()
    rejects = RejectColumns(source)
    for line, message in iter_messages(text, source, rejects):
        event_type = str(message.get("event_type") or "")
        try:
            if event_type.startswith(("floatingip.", "port.")):
                add_neutron_event(columns, rejects, message, source, line)
            else:
                # instance.* and anything else: other event types are kept with action "unknown"
                add_nova_event(columns, rejects, message, source, line)
        except BadRecord as bad:  # this message only: the rest of the dump lands
            rejects.add(line, bad.reason, f"{event_type[:80]}: {bad.detail}")
    return columns.finish(rejects), rejects.table()


def detect_format(name: str, head: str) -> str:
    """Guess the input format from the file name and its first kilobytes."""
    suffix = PurePath(name).suffix.lower()
    first = next((line.strip() for line in head.splitlines() if line.strip()), "")
    if suffix == ".xml" or first.startswith("<VM>") or first.startswith("<?xml"):
        return "opennebula"
    if _ONE_LOG_LINE.match(first):
        return "opennebula"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if first.startswith(("{", "[")):
        # told by the first record's keys, never by text in the values: a VM named "oslo.message" in a generic
        # inventory made the whole file Nova's, every row a reject (hostile review)
        try:
            obj = json_loads(first)
        except json.JSONDecodeError:
            return "nova"  # (a notification printed over several lines)
        if isinstance(obj, dict) and "action" in obj and "ts" in obj and "event_type" not in obj:
            return "jsonl"
        return "nova"
    if first.lower().startswith("ts,") or ",action" in first.lower():
        return "csv"
    if "oslo.messaging.notification." in first and '{"' in first:  # (a service log: driver = log)
        return "nova"
    raise UsageError(f"cannot tell the format of {name}; pass --format nova|neutron|opennebula|csv|jsonl")


def parse_cloud_text(
    text: str,
    source: str = "",
    fmt: str = "auto",
    cloud: str | None = None,
    tz: dt.tzinfo = dt.UTC,
    xml_text: str | None = None,
) -> tuple[pa.Table, pa.Table]:
    """One source's text -> (vm_events, rejects). For OpenNebula, `text` is the VM log (or the XML) and
    `xml_text` the VM's XML when both are given. `cloud` overrides the cloud name written to rows."""
    from tracepipe.ingest.cloud import generic, opennebula

    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(source, text[:4096])
    if fmt in ("nova", "neutron"):
        events, rejects = parse_openstack(text, source)
    elif fmt == "opennebula":
        if text.lstrip().startswith("<"):
            events, rejects = opennebula.parse_opennebula(None, text, source, tz=tz)
        else:
            events, rejects = opennebula.parse_opennebula(text, xml_text, source, tz=tz)
    else:
        events, rejects = generic.parse_generic(text, source, fmt=fmt, tz=tz)
    if cloud:
        events = events.set_column(
            events.schema.get_field_index("cloud"), "cloud", pa.array([cloud] * events.num_rows, pa.string())
        )
    return events, rejects


__all__ = ["FORMATS", "detect_format", "parse_cloud_text", "parse_openstack"]
