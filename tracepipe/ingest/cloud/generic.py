"""The documented CSV / JSONL form for any other cloud or an inventory export -> schema.VM_EVENTS rows.

One row per event and address. Columns (header names; only `ts`, `vm_id` and `action` are required):
  ts          ISO 8601 ("2024-03-12T07:00:40Z", "2024-03-12 07:00:40+01:00"; no offset = `tz`, default UTC)
  cloud       cloud or site name (default "generic")
  vm_id, vm_name, project, user, hypervisor
  action      one of schema.VM_ACTIONS (create, delete, attach, detach, soft_delete, ...); others -> "unknown"
  addr        the address the row is about (opens a lease on create/attach/..., closes it on detach)
  addr_kind   fixed (default) or floating (floating + create/attach = associate; + detach = disassociate)
  state       one of schema.VM_STATES (optional)
  event_id    optional; rows with the same event_id are one event (de-duplication)
  image       optional: the image id (or name) the VM runs; the latest row naming one is what `who` shows
Bad rows (time missing, not parsing or outside 1990..now+1 day, no vm_id, an `addr` that is not an IP address,
a malformed CSV line, a JSON value that is an object or a list) are rejects with their line number; the rest
lands. Addresses are stored in canonical text (2001:DB8::0001 -> 2001:db8::1), as flows carry them.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pyarrow as pa

from tracepipe.ingest.cloud.common import (
    BadRecord,
    EventColumns,
    RejectColumns,
    event_time,
    json_loads,
    text_field,
)
from tracepipe.limits import csv_lines, text_lines
from tracepipe.schema import VM_ACTIONS, VM_STATES

COLUMNS = (
    "ts",
    "cloud",
    "vm_id",
    "vm_name",
    "project",
    "user",
    "hypervisor",
    "action",
    "addr",
    "addr_kind",
    "state",
    "event_id",
    "image",
)
REQUIRED = ("ts", "vm_id", "action")
_OPENING = {
    "create",
    "update",
    "exists",
    "power_on",
    "reboot",
    "rebuild",
    "unshelve",
    "attach",
    "migrate",
    "restore",
    "port_update",
    "shelve",
    "shelve_offload",
    "power_off",
    "soft_delete",
}


def _read_rows(text: str, fmt: str, rejects: RejectColumns) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows as dicts (lower-case keys) and their (first) line numbers. One line is one record in JSONL, and in
    CSV but for quoted cells that hold line ends; a bad line (an unclosed quote, too many or too few cells, not
    JSON) is a reject of its own and the lines after it still land."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    if fmt != "csv":
        for number, line in enumerate(text_lines(text), start=1):
            if not line.strip():
                continue
            try:
                obj = json_loads(line)
            except json.JSONDecodeError as exc:
                rejects.add(number, "malformed JSON", f"{exc}: {line[:200]}")
                continue
            if not isinstance(obj, dict):
                rejects.add(number, "not a JSON object", line[:200])
                continue
            rows.append({str(k).lower(): v for k, v in obj.items()})
            lines.append(number)
        return rows, lines
    header: list[str] | None = None
    # a quoted cell may hold line ends (a name written by a standard CSV writer), any number of them: read
    # line by line, a tenant's name holding a line end and a whole row after it landed that row as an event of
    # another VM (hostile review); a cell that never closes is its first line's reject, the next lines read on
    for line in csv_lines(text, spanning=True, span_lines=None):
        if line.problem:
            rejects.add(line.number, line.problem, line.detail)
            continue
        if header is None:
            header = [cell.strip().lstrip("\ufeff").lower() for cell in line.cells]
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                rejects.add(line.number, "missing columns", ", ".join(missing))
                return [], []
            continue
        if len(line.cells) != len(header):
            rejects.add(
                line.number, "wrong number of columns", f"{len(line.cells)} cells, header has {len(header)}"
            )
            continue
        rows.append(dict(zip(header, line.cells, strict=True)))
        lines.append(line.number)
    return rows, lines


def parse_generic(
    text: str, source: str = "", fmt: str = "csv", tz: dt.tzinfo = dt.UTC, default_cloud: str = "generic"
) -> tuple[pa.Table, pa.Table]:
    """CSV or JSONL in the documented columns -> (vm_events, rejects)."""
    columns = EventColumns()
    rejects = RejectColumns(source)
    rows, lines = _read_rows(text, fmt, rejects)
    for row, line in zip(rows, lines, strict=True):
        try:
            _add_row(columns, row, line, source, tz, default_cloud)
        except BadRecord as bad:
            rejects.add(line, bad.reason, bad.detail)
    return columns.finish(rejects), rejects.table()


def _add_row(
    columns: EventColumns, row: dict[str, Any], line: int, source: str, tz: dt.tzinfo, default_cloud: str
) -> None:
    """One row -> one vm_events row; BadRecord when ts or vm_id is missing or bad, or a value is an object,
    a list or true/false (JSONL: numbers are taken as text, e.g. OpenNebula's numeric VM ids)."""

    def text_of(key: str) -> str | None:
        return text_field(row, key, numbers=True)

    raw_ts = text_of("ts")
    if raw_ts is None:
        raise BadRecord("bad or missing ts", "no ts")
    try:
        ts = event_time(raw_ts, naive_tz=tz)  # no offset written: the given local zone
    except BadRecord as bad:
        raise BadRecord(
            "bad or missing ts" if bad.reason.startswith("bad") else bad.reason, bad.detail
        ) from None
    vm_id = text_of("vm_id")
    if vm_id is None:
        raise BadRecord("missing vm_id", json.dumps(row, default=str)[:200])
    action = (text_of("action") or "unknown").lower()
    if action not in VM_ACTIONS:
        action = "unknown"
    kind = (text_of("addr_kind") or "fixed").lower()
    addr = text_of("addr")
    if kind == "floating" and action in ("create", "attach", "update", "port_update"):
        action = "fip_associate"
    elif kind == "floating" and action == "detach":
        action = "fip_disassociate"
    state = (text_of("state") or "").lower() or None
    if state is not None and state not in VM_STATES:
        state = "unknown"
    columns.add(
        ts=ts,
        cloud=text_of("cloud") or default_cloud,
        vm_id=vm_id,
        vm_name=text_of("vm_name"),
        project=text_of("project"),
        user=text_of("user"),
        hypervisor=text_of("hypervisor"),
        event_type=text_of("action"),
        action=action,
        state=state,
        addrs=[addr] if addr and kind == "fixed" and action in _OPENING else None,
        addr=addr,
        addr_kind=kind if addr else None,
        event_id=text_of("event_id"),
        source=source,
        line=line,
        resource_id=addr if kind == "floating" else None,
        image=text_of("image"),
    )
