"""Shared pieces of the VM-lifecycle parsers: a column builder for schema.VM_EVENTS rows, a rejects builder,
(timestamps: tracepipe.units.to_utc). Parsers stay pure: text in, (events, rejects) Arrow tables out.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa

from tracepipe.limits import json_loads  # orjson when there; never a RecursionError on deep nesting
from tracepipe.schema import VM_EVENTS

__all__ = ["EventColumns", "RejectColumns", "json_loads"]

UTC = dt.UTC


class EventColumns:
    """Accumulates VM_EVENTS rows column by column (lifecycle sources are small: thousands of events a day)."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {f.name: [] for f in VM_EVENTS}

    def add(self, **values: Any) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise KeyError(f"not a vm_events column: {sorted(unknown)}")
        for name, column in self.columns.items():
            column.append(values.get(name))

    def __len__(self) -> int:
        return len(self.columns["ts"])

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=VM_EVENTS)


class RejectColumns:
    """Rejected input lines: line number, short countable reason, detail (the offending text, shortened)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[int | None] = []
        self.reasons: list[str] = []
        self.details: list[str | None] = []

    def add(self, line: int | None, reason: str, detail: str | None = None) -> None:
        self.lines.append(line)
        self.reasons.append(reason)
        self.details.append(detail[:300] if detail else detail)

    def __len__(self) -> int:
        return len(self.lines)

    def table(self) -> pa.Table:
        n = len(self.lines)
        return pa.table(
            {
                "source": pa.array([self.source] * n, pa.string()),
                "line": pa.array(self.lines, pa.int64()),
                "reason": pa.array(self.reasons, pa.string()),
                "detail": pa.array(self.details, pa.string()),
            }
        )
