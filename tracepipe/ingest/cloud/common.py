"""Shared pieces of the VM-lifecycle parsers: a column builder for schema.VM_EVENTS rows, a rejects builder,
and the checks every source's records go through (the same in Nova, Neutron, OpenNebula and the generic form):
- a field of the wrong JSON type (an object where text belongs, a number as uuid) -> BadRecord;
- a time that does not parse or lies outside units.time_window (1990 .. now + 1 day) -> BadRecord;
- addresses -> the canonical text flows carry (`2001:DB8::0001` -> `2001:db8::1`); what is not an address is
  a reject (EventColumns.finish, once per table, on the distinct values).
A BadRecord is one reject (line, reason, detail); the rest of the file lands. Parsers stay pure: text in,
(events, rejects) Arrow tables out.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import polars as pl
import pyarrow as pa

from tracepipe.limits import json_loads  # orjson when there; never a RecursionError on deep nesting
from tracepipe.schema import VM_EVENTS
from tracepipe.units import canonical_addresses, in_time_window, to_utc

__all__ = [
    "BadRecord",
    "EventColumns",
    "RejectColumns",
    "event_time",
    "json_loads",
    "object_field",
    "text_field",
]

UTC = dt.UTC
_JSON_TYPES = {dict: "an object", list: "a list", bool: "true/false", int: "a number", float: "a number"}


class BadRecord(Exception):
    """One input record that cannot become a row: becomes one reject (reason, detail); the file goes on."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _type_name(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def text_field(record: dict[str, Any], key: str, where: str = "", numbers: bool = False) -> str | None:
    """A text field of a JSON object: its text (None when missing, null or blank). An object, a list or
    true/false there (or a number, unless `numbers`) is a BadRecord: a record whose fields have the wrong
    type is rejected, not stringified into the lake."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if numbers and isinstance(value, float) and not abs(value) < 2**53:
        # orjson reads an integer past 2**64 as a float: two ids 2**64 and 2**64+1 became one text and the
        # second event (a delete) a duplicate of the first; a float that large names no exact number
        raise BadRecord(
            "number too large", f"{where}{key} is {value!r}: too large to be exact, give it as text"
        )
    if numbers and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise BadRecord("wrong JSON type", f"{where}{key} is {_type_name(value)}, not text: {str(value)[:100]}")


def object_field(record: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
    """A JSON object field ({} when missing or null); anything else there is a BadRecord."""
    value = record.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRecord("wrong JSON type", f"{where}{key} is {_type_name(value)}, not an object")
    return value


def event_time(value: Any, naive_tz: dt.tzinfo = UTC, what: str = "timestamp") -> dt.datetime:
    """A record's time -> aware UTC; BadRecord when it does not parse or lies outside units.time_window."""
    ts = to_utc(value, naive_tz)
    if ts is None:
        raise BadRecord(f"bad {what}", str(value)[:100])
    if not in_time_window(ts):
        raise BadRecord("time out of range", f"{what} {value} (accepted: 1990 to now + 1 day)")
    return ts


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

    def finish(self, rejects: RejectColumns) -> pa.Table:
        """The rows as a table, addresses in canonical text. A row about one address (`addr`: floating IPs,
        the generic form) whose `addr` or `addrs` holds something that is not an IP address is rejected; in a
        VM's address list (`addrs` alone: Nova, Neutron ports, OpenNebula NICs) such an entry is dropped and
        counted, and the event (with its real addresses) lands."""
        table = self.table()
        if table.num_rows == 0:
            return table
        frame = pl.from_arrow(table.select(["addr", "addrs", "line"]))
        assert isinstance(frame, pl.DataFrame)
        frame = frame.with_row_index("row")
        flat = frame.select("row", "line", pl.col("addrs").alias("text")).explode("text")
        texts = pl.concat([flat.get_column("text"), frame.get_column("addr").alias("text")]).drop_nulls()
        unique = texts.unique()
        mapping = dict(zip(unique.to_list(), canonical_addresses(unique).to_list(), strict=True))
        bad_flat = flat.filter(
            pl.col("text").is_not_null() & pl.col("text").replace_strict(mapping).is_null()
        )
        bad_addr = frame.filter(
            pl.col("addr").is_not_null() & pl.col("addr").replace_strict(mapping).is_null()
        )
        single = set(frame.filter(pl.col("addr").is_not_null()).get_column("row").to_list())
        dropped = set(bad_addr.get_column("row").to_list())
        for line, text in bad_addr.select("line", "addr").iter_rows():
            rejects.add(line, "not an IP address", text)
        for row, line, text in bad_flat.iter_rows():
            if row in single:
                if row not in dropped:
                    dropped.add(row)
                    rejects.add(line, "not an IP address", text)
            else:
                rejects.add(line, "not an IP address in the address list (dropped)", text)
        addrs = frame.get_column("addrs").list.eval(
            pl.element()
            .replace_strict(mapping, default=None, return_dtype=pl.String)
            .drop_nulls()
            .unique(maintain_order=True)
        )
        addr = frame.get_column("addr").replace_strict(mapping, default=None, return_dtype=pl.String)
        table = table.set_column(table.schema.get_field_index("addrs"), "addrs", addrs.to_arrow())
        table = table.set_column(table.schema.get_field_index("addr"), "addr", addr.to_arrow())
        if dropped:
            keep = ~frame.get_column("row").is_in(sorted(dropped))
            table = table.filter(keep.to_arrow())
        return table.cast(VM_EVENTS)


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
