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
Bad rows (time missing or not parsing, no vm_id) are rejects with their line number; the rest lands.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

import polars as pl
import pyarrow as pa

from tracepipe.ingest.cloud.common import EventColumns, RejectColumns, json_loads
from tracepipe.schema import VM_ACTIONS, VM_STATES
from tracepipe.units import to_utc

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
    if fmt == "csv":
        frame = pl.read_csv(io.StringIO(text), infer_schema=False)
        frame = frame.rename({c: c.strip().lower() for c in frame.columns})
        # header is line 1; rows with embedded newlines are not part of this format
        return frame.to_dicts(), list(range(2, frame.height + 2))
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
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


def parse_generic(
    text: str, source: str = "", fmt: str = "csv", tz: dt.tzinfo = dt.UTC, default_cloud: str = "generic"
) -> tuple[pa.Table, pa.Table]:
    """CSV or JSONL in the documented columns -> (vm_events, rejects)."""
    columns = EventColumns()
    rejects = RejectColumns(source)
    try:
        rows, lines = _read_rows(text, fmt, rejects)
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError) as exc:
        rejects.add(None, "unreadable CSV", str(exc))
        return columns.table(), rejects.table()
    if rows and fmt == "csv":
        missing = [c for c in REQUIRED if c not in rows[0]]
        if missing:
            rejects.add(1, "missing columns", ", ".join(missing))
            return columns.table(), rejects.table()

    def text_of(row: dict[str, Any], key: str) -> str | None:
        value = row.get(key)
        if value is None:
            return None
        value = str(value).strip()
        return value or None

    for row, line in zip(rows, lines, strict=True):
        raw_ts = text_of(row, "ts")
        ts = to_utc(raw_ts, naive_tz=tz)  # no offset written: the given local zone
        vm_id = text_of(row, "vm_id")
        if ts is None:
            rejects.add(line, "bad or missing ts", str(raw_ts))
            continue
        if vm_id is None:
            rejects.add(line, "missing vm_id", json.dumps(row, default=str)[:200])
            continue
        action = (text_of(row, "action") or "unknown").lower()
        if action not in VM_ACTIONS:
            action = "unknown"
        kind = (text_of(row, "addr_kind") or "fixed").lower()
        addr = text_of(row, "addr")
        if kind == "floating" and action in ("create", "attach", "update", "port_update"):
            action = "fip_associate"
        elif kind == "floating" and action == "detach":
            action = "fip_disassociate"
        state = (text_of(row, "state") or "").lower() or None
        if state is not None and state not in VM_STATES:
            state = "unknown"
        columns.add(
            ts=ts,
            cloud=text_of(row, "cloud") or default_cloud,
            vm_id=vm_id,
            vm_name=text_of(row, "vm_name"),
            project=text_of(row, "project"),
            user=text_of(row, "user"),
            hypervisor=text_of(row, "hypervisor"),
            event_type=text_of(row, "action"),
            action=action,
            state=state,
            addrs=[addr] if addr and kind == "fixed" and action in _OPENING else None,
            addr=addr,
            addr_kind=kind if addr else None,
            event_id=text_of(row, "event_id"),
            source=source,
            line=line,
            resource_id=addr if kind == "floating" else None,
        )
    return columns.table(), rejects.table()
