"""Threat-intelligence indicators -> the `intel` dataset, and matching addresses against them.

In: a MISP CSV export (uuid,event_id,category,type,value,comment,to_ids,date,...), a MISP JSON export (an Event
with Attribute[] and Object[].Attribute[], a list of them, or {"response": [...]}) or a plain list (one address
or CIDR per line, `#` comments). Out: rows of schema.INTEL (CIDRs with net_lo/net_hi) plus rejects (line or
attribute index, reason). Landing goes through the lake's manifest, so importing the same file twice adds nothing.
Matching (`match_addresses`) works on unique addresses: v4 with numpy's sorted search, v6 with a hash join per
prefix length.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from tracepipe.detect.features import ipv4_to_int
from tracepipe.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, InputError, UsageError
from tracepipe.fsutil import input_problem
from tracepipe.lake import FileEntry, Lake, hash_file, ingest_table, read_parquet_files
from tracepipe.limits import (
    LINE_TOO_LONG,
    csv_lines,
    json_loads,
    read_text_bounded,
    text_lines,
    too_long_detail,
)
from tracepipe.schema import INTEL, REJECTS
from tracepipe.units import canonical_addr, in_time_window, parse_network, to_utc

FORMATS = ("auto", "misp-csv", "misp-json", "stix", "list")
# MISP attribute types that carry an address ("ip-dst|port" carries "addr|port").
ADDRESS_TYPES = {"ip-dst", "ip-src", "ip-dst|port", "ip-src|port", "ip", "ip-any"}
DOMAIN_TYPES = {"domain", "hostname", "domain|ip"}
# The widest network an indicator may name. 0.0.0.0/0 or ::/0 (a slip in a MISP event, or a poisoned feed)
# would flag every flow and bury the real alerts. The largest blocks real blocklists carry are far narrower
# (Spamhaus DROP: /10 and longer for IPv4, /19 and longer for IPv6; the RIRs themselves hold /8 and /12), so
# a prefix shorter than /8 (IPv4) or /16 (IPv6) is a reject ("CIDR too wide"), not an indicator.
MIN_PREFIX = {4: 8, 6: 16}
# The most address space one import may cover, over the union of its networks: as much as one network of the
# widest prefix allowed (an IPv4 /8, an IPv6 /16). Every entry within MIN_PREFIX did not bound a feed: 223 /8s
# (the whole unicast IPv4 space) made every peer an IOC hit, 2,509 alerts in a demo window instead of 1.
MAX_COVERED = {4: 1 << 24, 6: 1 << 112}


class TooWide(ValueError):
    """A CIDR shorter than MIN_PREFIX."""


@dataclass
class Skipped:
    """What a feed holds and import leaves out on purpose (counted, not rejects)."""

    # MISP attributes of types that are not addresses or domains (urls, hashes...), STIX non-indicators
    types: int = 0
    # MISP attributes marked to_ids false: context (a victim, a partner's server), not something to alert on
    not_ids: int = 0
    deleted: int = 0  # MISP attributes marked deleted, STIX indicators revoked: withdrawn by their author


class Skip(Enum):
    """Why _attribute_row leaves an attribute out (a Skipped counter's name)."""

    TYPES = "types"
    NOT_IDS = "not_ids"
    DELETED = "deleted"


@dataclass
class IntelImport:
    source: str
    format: str
    rows: int
    rejects: int
    skipped_types: int  # Skipped's counts
    skipped_not_ids: int
    skipped_deleted: int
    already_imported: bool

    @property
    def exit_code(self) -> int:
        """0 all imported (or already); 3 some lines rejected; 4 every line rejected, nothing usable."""
        if self.rejects and self.rows == 0:
            return EXIT_FAILED
        return EXIT_PARTIAL if self.rejects else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "exit_code": self.exit_code}


# IPv4-mapped IPv6 (RFC 4291 §2.5.5.2): ::ffff:203.0.113.7 is the IPv4 address flows carry
IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR as flows would carry its addresses: ::ffff:0:0/96+n is the IPv4 /n (::ffff:203.0.113.0/120 ->
    203.0.113.0/24) and an IPv6 zone (%eth0, an interface of the machine that wrote it) is dropped, as
    units.canonical_addr does for one address. ValueError if it is no network."""
    net = ipaddress.ip_network(value, strict=False)
    if isinstance(net, ipaddress.IPv6Network):
        if net.prefixlen >= IPV4_MAPPED.prefixlen and net.subnet_of(IPV4_MAPPED):
            return ipaddress.IPv4Network((int(net.network_address) & 0xFFFF_FFFF, net.prefixlen - 96))
        if net.network_address.scope_id is not None:
            return ipaddress.IPv6Network((int(net.network_address), net.prefixlen))
    return net


def _indicator_row(value: str, **extra: Any) -> dict[str, Any]:
    """An address or CIDR -> an INTEL row (canonical text, IPv4-mapped addresses as IPv4, zones dropped: what
    flows carry, or the indicator would never match). ValueError if it is neither."""
    value = value.strip()
    if "/" in value:
        net = _network(value)
        if net.prefixlen < MIN_PREFIX[net.version]:  # (after mapping: ::ffff:0:0/97 is an IPv4 /1)
            raise TooWide(f"CIDR too wide (shorter than /{MIN_PREFIX[net.version]} for IPv{net.version})")
        if net.num_addresses == 1:
            value, net = str(net.network_address), None
        else:
            return {
                "indicator": str(net),
                "kind": "cidr",
                "net_lo": str(net.network_address),
                "net_hi": str(net.broadcast_address),
                "ip_version": net.version,
                **extra,
            }
    address = ipaddress.ip_address(canonical_addr(value))
    return {
        "indicator": str(address),
        "kind": "ip",
        "net_lo": str(address),
        "net_hi": str(address),
        "ip_version": address.version,
        **extra,
    }


def _reject(line: int | None, reason: str, detail: str, offset: int | None = None) -> dict[str, Any]:
    return {"line": line, "offset": offset, "reason": reason, "detail": detail[:500]}


def parse_list(text: str, include_non_ids: bool = False) -> tuple[list[dict], list[dict], Skipped]:
    rows, rejects = [], []
    for number, line in enumerate(text_lines(text), start=1):
        value = line.split("#", 1)[0].strip()
        if not value:
            continue
        try:
            rows.append(_indicator_row(value, _line=number))
        except TooWide as exc:
            rejects.append(_reject(number, str(exc), line))
        except ValueError:
            rejects.append(_reject(number, "not an address or CIDR", line))
    return rows, rejects, Skipped()


class WrongType(ValueError):
    """A MISP field of a JSON type it never has (an object where text belongs)."""


def _text(record: dict[str, Any], key: str) -> str | None:
    """A MISP text field: its text, None when missing or null; WrongType for an object, a list or true/false
    (numbers are taken as text: MISP writes ids both ways)."""
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise WrongType(f"{key} is {type(value).__name__}, not text")


def _event_text(event: dict[str, Any], key: str) -> str | None:
    """An event-level default for its attributes (info, id): None when it has the wrong type, so that one bad
    event field does not reject every attribute under it."""
    try:
        return _text(event, key) or None
    except WrongType:
        return None


def _flag(value: Any) -> bool | None:
    """A MISP flag (to_ids, deleted): JSON true/false, 1/0 or their text as CSV and older exports write them;
    None when absent or unreadable."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes"):
            return True
        if text in ("0", "false", "no"):
            return False
    return None


def _first_seen(attr: dict[str, Any]) -> dt.datetime | None:
    """When the indicator was first seen; None when absent, unparseable or outside 1990..now+1 day."""
    for key in ("first_seen", "timestamp", "date"):
        value = attr.get(key)
        if value not in (None, ""):
            ts = to_utc(value)
            return ts if ts is not None and in_time_window(ts) else None
    return None


def _attribute_row(
    attr: dict[str, Any], event: dict[str, Any], include_non_ids: bool = False
) -> dict[str, Any] | str | Skip:
    """One MISP attribute -> a row, a reject reason, or why it is skipped: a type we do not match on, or (unless
    include_non_ids) marked deleted or to_ids false: MISP's own word that it is no indicator to detect on."""
    try:
        kind = (_text(attr, "type") or "").strip()
        value = (_text(attr, "value") or "").strip()
        extra = {
            "description": _text(attr, "comment") or _event_text(event, "info"),
            "tags": _text(attr, "category") or None,
            "event_id": _text(attr, "event_id") or _event_text(event, "id"),
            "first_seen": _first_seen(attr),
        }
    except WrongType as exc:
        return f"wrong JSON type: {exc}"
    if kind in ADDRESS_TYPES | DOMAIN_TYPES and not include_non_ids:
        if _flag(attr.get("deleted")):
            return Skip.DELETED
        if _flag(attr.get("to_ids")) is False:
            return Skip.NOT_IDS
    if kind in ADDRESS_TYPES:
        if "|" in kind or (kind == "ip" and "|" in value):
            value = value.split("|", 1)[0]
        try:
            return _indicator_row(value, **extra)
        except TooWide as exc:
            return str(exc)
        except ValueError:
            return f"{kind} value is not an address or CIDR"
    if kind in DOMAIN_TYPES:
        domain = value.split("|", 1)[0].strip().lower()
        if not domain or " " in domain:
            return f"{kind} value is not a domain"
        return {"indicator": domain, "kind": "domain", **extra}
    if not kind:
        return "attribute has no type"
    return Skip.TYPES


# the cells of a MISP CSV row without which it says nothing
REQUIRED_CELLS = ("type", "value")


def parse_misp_csv(text: str, include_non_ids: bool = False) -> tuple[list[dict], list[dict], Skipped]:
    """A MISP CSV export, read line by line (limits.csv_lines): a comment of several lines (a quoted cell over
    line ends) is one row, numbered by its first line; a stray quote, a line the csv module cannot read and a
    row lacking a required cell are each one reject with its line number; the lines after them are read."""
    lines = csv_lines(text, spanning=True)
    first = next(lines, None)
    if first is not None and first.problem:
        return [], [_reject(first.number, "not a MISP CSV export", f"header: {first.detail}")], Skipped()
    header = [cell.strip() for cell in first.cells] if first is not None else []
    missing = set(REQUIRED_CELLS) - set(header)
    if missing:
        return (
            [],
            [
                _reject(
                    first.number if first else 1,
                    "not a MISP CSV export",
                    f"header lacks {', '.join(sorted(missing))}",
                )
            ],
            Skipped(),
        )
    needed = max(header.index(name) for name in REQUIRED_CELLS) + 1
    rows, rejects, skipped = [], [], Skipped()
    for line in lines:
        number, cells = line.number, line.cells
        if line.problem:
            rejects.append(_reject(number, line.problem, line.detail))
            continue
        if len(cells) > len(header):
            rejects.append(_reject(number, "too many columns", str(cells[len(header) :])))
            continue
        if len(cells) < needed:
            rejects.append(
                _reject(
                    number,
                    f"missing cells ({', '.join(REQUIRED_CELLS)})",
                    f"{len(cells)} cells, the header names {len(header)}: {','.join(cells)[:200]}",
                )
            )
            continue
        record = dict(zip(header, cells, strict=False))
        result = _attribute_row(record, {}, include_non_ids)
        if isinstance(result, Skip):
            _count(skipped, result)
        elif isinstance(result, str):
            rejects.append(_reject(number, result, f"{record.get('type')},{record.get('value')}"))
        else:
            rows.append(result | {"_line": number})
    return rows, rejects, skipped


def _count(skipped: Skipped, why: Skip) -> None:
    setattr(skipped, why.value, getattr(skipped, why.value) + 1)


def _events(doc: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The events of a MISP JSON export (an Event, a list of them, {"response": [...]}) and what was not one."""
    if isinstance(doc, dict) and "response" in doc:
        doc = doc["response"]
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        return [], [f"the document is {type(doc).__name__}, not a MISP event or a list of events"]
    events, problems = [], []
    for item in doc:
        event = item.get("Event", item) if isinstance(item, dict) else item
        if isinstance(event, dict):
            events.append(event)
        else:
            problems.append(f"an event is {type(event).__name__}, not an object")
    return events, problems


def _attributes(event: dict[str, Any], problems: list[str]) -> list[Any]:
    """Event.Attribute[] and Event.Object[].Attribute[]; a part of another shape is named in `problems`."""

    def listed(container: dict[str, Any], key: str, where: str) -> list[Any]:
        value = container.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            problems.append(f"{where}{key} is {type(value).__name__}, not a list")
            return []
        return value

    attributes = list(listed(event, "Attribute", "Event."))
    for obj in listed(event, "Object", "Event."):
        if isinstance(obj, dict):
            attributes.extend(listed(obj, "Attribute", "Event.Object[]."))
        else:
            problems.append(f"an Event.Object entry is {type(obj).__name__}, not an object")
    return attributes


def parse_misp_json(text: str, include_non_ids: bool = False) -> tuple[list[dict], list[dict], Skipped]:
    try:
        doc = json_loads(text)
    except json.JSONDecodeError as exc:  # JsonTooDeep too
        return [], [_reject(exc.lineno, "not valid JSON", exc.msg)], Skipped()
    except RecursionError:
        return [], [_reject(None, "not valid JSON", "nested too deeply")], Skipped()
    rows, rejects, skipped = [], [], Skipped()
    index = 0
    events, problems = _events(doc)
    for event in events:
        for attr in _attributes(event, problems):
            index += 1
            if not isinstance(attr, dict):
                rejects.append(_reject(None, "attribute is not an object", repr(attr), offset=index))
                continue
            result = _attribute_row(attr, event, include_non_ids)
            if isinstance(result, Skip):
                _count(skipped, result)
            elif isinstance(result, str):
                detail = f"attribute {index}: {str(attr.get('type'))[:50]},{str(attr.get('value'))[:200]}"
                rejects.append(_reject(None, result, detail, offset=index))
            else:
                rows.append(result | {"_offset": index})
    rejects.extend(_reject(None, "unexpected MISP JSON shape", problem) for problem in problems)
    if index == 0 and not rejects:
        rejects.append(_reject(None, "no MISP Event/Attribute found", text[:200]))
    return rows, rejects, skipped


# the comparisons of a STIX pattern that name an address or a domain: [ipv4-addr:value = '192.0.2.7'],
# network-traffic:dst_ref.value = '...' (what `tracepipe export stix` writes for an address with a port)
_STIX_VALUE = re.compile(
    r"(ipv4-addr|ipv6-addr|domain-name|network-traffic:(?:dst|src)_ref)(?::|\.)value\s*=\s*'((?:[^'\\]|\\.)*)'"
)


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_stix(text: str, include_non_ids: bool = False) -> tuple[list[dict], list[dict], Skipped]:
    """A STIX 2.x bundle: every indicator whose pattern compares an address, CIDR or domain (several per
    pattern when OR-ed). Other objects are skipped, and revoked indicators unless include_non_ids; an indicator
    naming no address is a reject."""
    try:
        doc = json_loads(text)
    except json.JSONDecodeError as exc:
        return [], [_reject(exc.lineno, "not valid JSON", exc.msg)], Skipped()
    except ValueError as exc:  # (nested past the JSON depth limit)
        return [], [_reject(None, "not valid JSON", str(exc)[:200])], Skipped()
    objects = doc.get("objects") if isinstance(doc, dict) else None
    if not isinstance(objects, list):
        return [], [_reject(None, "not a STIX bundle (no objects list)", text[:200])], Skipped()
    rows, rejects, skipped = [], [], Skipped()
    for index, obj in enumerate(objects, start=1):
        if not isinstance(obj, dict) or obj.get("type") != "indicator":
            skipped.types += 1
            continue
        if obj.get("revoked") is True and not include_non_ids:
            skipped.deleted += 1
            continue
        marks = obj.get("labels")
        if isinstance(marks, list) and "context-only" in marks and not include_non_ids:
            # (tracepipe's word for MISP's to_ids false: a site's own VM address, a common destination)
            skipped.not_ids += 1
            continue
        # every field as the bundle's author wrote it: text where text is due, else none (a number, a list or an
        # object where STIX has a string made the whole import an internal error)
        labels = obj.get("indicator_types") or obj.get("labels") or []
        valid_from = obj.get("valid_from")
        try:
            first_seen = to_utc(valid_from) if isinstance(valid_from, str) else None
        except (ValueError, TypeError, OverflowError):
            rejects.append(_reject(None, "bad valid_from", str(valid_from)[:200], offset=index))
            continue
        extra = {
            "description": _string(obj.get("description")) or _string(obj.get("name")),
            "tags": ",".join(t for t in labels if isinstance(t, str)) or None
            if isinstance(labels, list)
            else None,
            "event_id": _string(obj.get("id")),
            "first_seen": first_seen,
        }
        found = (
            _STIX_VALUE.findall(str(obj.get("pattern", ""))) if isinstance(obj.get("pattern"), str) else []
        )
        if not found:
            rejects.append(
                _reject(
                    None,
                    "indicator pattern names no address or domain",
                    str(obj.get("pattern"))[:300],
                    offset=index,
                )
            )
        for kind, value in found:
            value = value.replace("\\'", "'").replace("\\\\", "\\")
            try:
                if kind == "domain-name":
                    rows.append({"indicator": value.lower(), "kind": "domain", "_offset": index, **extra})
                else:
                    rows.append(_indicator_row(value, _offset=index, **extra))
            except ValueError:
                rejects.append(
                    _reject(None, "indicator value is not an address or CIDR", value, offset=index)
                )
    return rows, rejects, skipped


def sniff_format(text: str, path: Path) -> str:
    """The format of an intel file. JSON is told from its parsed top level: a STIX bundle is an object of type
    "bundle" with an objects list; anything else (an Event, {"response": [...]}, a list of events) is MISP and
    its parser names what does not fit. (A search for '"type": "bundle"' in the text took a MISP feed holding an
    attribute of type "bundle" for STIX: 0 indicators.)"""
    head = text.lstrip()[:1]
    if head in ("{", "["):
        try:
            doc = json_loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError, JsonTooDeep: the MISP parser's reject says so
            return "misp-json"
        if isinstance(doc, dict) and doc.get("type") == "bundle" and isinstance(doc.get("objects"), list):
            return "stix"
        return "misp-json"
    first = text.splitlines()[0].lower() if text else ""
    if path.suffix.lower() == ".csv" or ("type" in first and "value" in first and "," in first):
        return "misp-csv"
    return "list"


PARSERS: dict[str, Callable[[str, bool], tuple[list[dict], list[dict], Skipped]]] = {
    "list": parse_list,
    "misp-csv": parse_misp_csv,
    "misp-json": parse_misp_json,
    "stix": parse_stix,
}


def parse_intel(
    text: str,
    fmt: str,
    source: str,
    imported_at: dt.datetime | None = None,
    include_non_ids: bool = False,
    local_networks: Sequence[str] = (),
) -> tuple[pa.Table, pa.Table, Skipped]:
    """Text of one file -> (INTEL rows, REJECTS rows, what was skipped). Pure. An address or network that
    overlaps one of `local_networks` (the site's own) is a reject: every VM-to-VM flow would be an IOC hit."""
    rows, rejects, skipped = PARSERS[fmt](text, include_non_ids)
    if local_networks:
        rows = _outside(rows, [parse_network(n) for n in local_networks], rejects)
    imported_at = imported_at or dt.datetime.now(dt.UTC)
    for row in rows:
        row.setdefault("imported_at", imported_at)
        row.setdefault("source", source)
    table = pa.Table.from_pylist(rows, schema=INTEL) if rows else INTEL.empty_table()
    for reject in rejects:
        reject.update(ingested_at=imported_at, dataset="intel", source=source)
    rejected = pa.Table.from_pylist(rejects, schema=REJECTS) if rejects else REJECTS.empty_table()
    return table, rejected, skipped


def _outside(
    rows: list[dict[str, Any]],
    local: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    rejects: list[dict],
) -> list[dict[str, Any]]:
    """The rows whose address or network overlaps no local network; the others go to `rejects`."""
    kept = []
    for row in rows:
        net = _network(row["indicator"]) if row["kind"] in ("ip", "cidr") else None
        inside = next(
            (n for n in local if net is not None and n.version == net.version and n.overlaps(net)), None
        )
        if inside is None:
            kept.append(row)
        else:
            reason = f"overlaps the local network {inside} (--allow-local imports it)"
            rejects.append(_reject(row.get("_line"), reason, row["indicator"], offset=row.get("_offset")))
    return kept


def covered(table: pa.Table) -> dict[int, int]:
    """{IP version: how many addresses the table's indicators cover together} (nested and repeated networks
    counted once)."""
    out = {}
    for version in (4, 6):
        mask = pc.and_(
            pc.is_in(table.column("kind"), pa.array(["ip", "cidr"])),
            pc.equal(table.column("ip_version"), version),
        )
        texts = table.filter(mask).column("indicator").unique().to_pylist()
        nets = ipaddress.collapse_addresses(ipaddress.ip_network(t) for t in texts)
        out[version] = sum(n.num_addresses for n in nets)
    return out


def _check_coverage(table: pa.Table, path: Path) -> None:
    """InputError when the feed covers more than MAX_COVERED addresses of a version: nothing of it lands."""
    for version, count in covered(table).items():
        if count > MAX_COVERED[version]:
            raise InputError(
                f"{path}: its networks cover {count:,} IPv{version} addresses together, more than the "
                f"{MAX_COVERED[version]:,} (an IPv{version} /{MIN_PREFIX[version]}) one intel import may name; "
                "nothing imported. A feed that lists that much of the internet makes every flow an alert: "
                "import the narrower lists it is made of."
            )


def import_intel(
    lake: Lake,
    path: Path | str,
    fmt: str = "auto",
    include_non_ids: bool = False,
    local_networks: Sequence[str] = (),
) -> IntelImport:
    """Land one indicator file in the `intel` dataset (idempotent by content hash). MISP attributes marked
    to_ids false or deleted (STIX: revoked) are counted and left out unless include_non_ids; indicators that
    overlap `local_networks` are rejects. InputError (nothing lands) when the feed covers more than
    MAX_COVERED addresses."""
    path = Path(path)
    if fmt not in FORMATS:
        raise UsageError(f"unknown intel format {fmt!r}; use one of {', '.join(FORMATS)}")
    problem = input_problem(path, "give the export file itself")
    if problem is not None:  # told from os.stat: a FIFO is never opened (that would block)
        raise InputError(f"cannot read {path}: {problem}. Give the path of a MISP export or a list.")
    try:
        with open(path, "rb") as handle:  # lines over limits.line_bytes are never held whole
            text, too_long = read_text_bounded(handle)
    except OSError as exc:
        raise InputError(
            f"cannot read {path}: {exc.strerror}. Give the path of a MISP export or a list."
        ) from exc
    if fmt == "auto":
        fmt = sniff_format(text, path)
    table, rejects, skipped = parse_intel(
        text, fmt, str(path), include_non_ids=include_non_ids, local_networks=local_networks
    )
    _check_coverage(table, path)
    if too_long:
        now = dt.datetime.now(dt.UTC)
        extra = [
            _reject(line, LINE_TOO_LONG, too_long_detail(length))
            | {"ingested_at": now, "dataset": "intel", "source": str(path)}
            for line, length in too_long
        ]
        rejects = pa.concat_tables([rejects, pa.Table.from_pylist(extra, schema=REJECTS)])
    stats = {"format": fmt, **{f"skipped_{name}": count for name, count in vars(skipped).items()}}
    with lake.lock("intel"):
        # a feed's new import replaces its previous rows in the same commit (re-importing a refreshed feed
        # added every row again, and what the feed withdrew stayed for ever); one wholly rejected keeps them
        removed, kept, held = _previous_rows(lake, str(path))
        replacing = (removed, kept) if table.num_rows or not rejects.num_rows else None
        content_hash = hash_file(path)
        if lake.already_ingested("intel", content_hash) and not _same_indicators(held, table):
            # these bytes landed before, but the lake's rows of this feed are others': the feed went back to an
            # earlier version (a review: v1, v2, v1 again kept v2's rows, "already imported"), or another path
            # with the same bytes landed. Landed again, under a key of its own
            content_hash = hashlib.sha256(f"{content_hash} {path} {time.time_ns()}".encode()).hexdigest()
        result = ingest_table(
            lake, "intel", str(path), content_hash, [table], [rejects], stats=stats, replacing=replacing
        )
    if not result.skipped:
        lake.compact("intel", wait=False)
    return IntelImport(
        str(path),
        fmt,
        table.num_rows,
        rejects.num_rows,
        skipped.types,
        skipped.not_ids,
        skipped.deleted,
        result.skipped,
    )


# ---- matching ----------------------------------------------------------------------------------------------
MATCH_COLUMNS = {
    "addr": pl.String,
    "indicator": pl.String,
    "description": pl.String,
    "tags": pl.String,
    "event_id": pl.String,
}


def _empty_matches() -> pl.DataFrame:
    return pl.DataFrame(schema=MATCH_COLUMNS)


def match_addresses(addrs: list[str] | pa.Array, intel: pa.Table) -> pl.DataFrame:
    """Which of the (unique) addresses an indicator names: exact IPs and CIDRs, v4 and v6.
    One row per matched address (the first indicator that covers it)."""
    arr = pa.array(addrs, pa.string()) if isinstance(addrs, list) else addrs.cast(pa.string())
    ind = pl.from_arrow(intel).filter(pl.col("kind").is_in(["ip", "cidr"]))
    if not len(arr) or ind.is_empty():
        return _empty_matches()
    info = ["indicator", "description", "tags", "event_id"]
    found: list[pl.DataFrame] = []
    exact = ind.filter(pl.col("kind") == "ip").unique("indicator", keep="first")
    if not exact.is_empty():
        found.append(
            pl.DataFrame({"addr": arr})
            .join(exact.select(info), left_on="addr", right_on="indicator", how="inner")
            .with_columns(indicator=pl.col("addr"))
        )
    cidrs = ind.filter(pl.col("kind") == "cidr")
    v4 = cidrs.filter(pl.col("ip_version") == 4)
    addr_int, valid = ipv4_to_int(arr)
    if not v4.is_empty() and valid.any():
        lo, _ = ipv4_to_int(v4.get_column("net_lo").to_arrow())
        hi, _ = ipv4_to_int(v4.get_column("net_hi").to_arrow())
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order].astype(np.int64), hi[order].astype(np.int64)
        # running maximum of hi (and where it came from) handles nested/overlapping CIDRs
        run_hi = np.maximum.accumulate(hi)
        run_at = _running_argmax(hi)
        x = addr_int.astype(np.int64)
        k = np.searchsorted(lo, x, side="right") - 1
        hit = valid & (k >= 0) & (run_hi[np.clip(k, 0, None)] >= x)
        if hit.any():
            which = order[run_at[k[hit]]]
            rows = v4.select(info)[which.tolist()]
            found.append(rows.with_columns(addr=pl.Series(arr.filter(pa.array(hit)))))
    v6 = cidrs.filter(pl.col("ip_version") == 6)
    if not v6.is_empty() and not valid.all():
        rows6 = _match_v6(arr.filter(pa.array(~valid)), v6.select(info))
        if rows6 is not None:
            found.append(rows6)
    if not found:
        return _empty_matches()
    return pl.concat([f.select(list(MATCH_COLUMNS)).cast(MATCH_COLUMNS) for f in found]).unique(
        "addr", keep="first"
    )


def _ipv6_halves(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IPv6 address text -> (high 64 bits, low 64 bits, parsed): inet_pton on each distinct value, in C."""
    packed = bytearray(16 * len(texts))
    ok = np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):  # (the distinct peers of a window, parsed once; no per-network work)
        try:
            packed[16 * i : 16 * i + 16] = socket.inet_pton(socket.AF_INET6, text)
            ok[i] = True
        except (OSError, TypeError, ValueError):
            continue
    words = np.frombuffer(bytes(packed), dtype=">u8").reshape(-1, 2).astype(np.uint64)
    return words[:, 0], words[:, 1], ok


def _mask(bits: int) -> tuple[np.uint64, np.uint64]:
    """The (high, low) 64-bit halves of an IPv6 netmask of `bits` bits."""
    full = (1 << 128) - 1
    mask = (full << (128 - bits)) & full
    return np.uint64(mask >> 64), np.uint64(mask & ((1 << 64) - 1))


def _match_v6(addrs: pa.Array, nets: pl.DataFrame) -> pl.DataFrame | None:
    """IPv6 addresses (unique) against IPv6 CIDR rows (indicator, ...): per prefix length present, the addresses
    masked to it joined with the networks of that length (hash join on two uint64 halves), shortest prefix
    first: each address gets its widest covering network, as the IPv4 path does. Cost: addresses x distinct
    prefix lengths (at most 113), not addresses x networks (10k peers x 4k /48s took 13.9 s one by one)."""
    texts = addrs.to_pylist()
    hi, lo, ok = _ipv6_halves(texts)
    if not ok.any():
        return None
    parsed = [ipaddress.IPv6Network(t) for t in nets.get_column("indicator").to_list()]
    table = nets.with_columns(
        prefix=pl.Series([n.prefixlen for n in parsed], dtype=pl.Int32),
        net_hi=pl.Series([int(n.network_address) >> 64 for n in parsed], dtype=pl.UInt64),
        net_lo=pl.Series([int(n.network_address) & ((1 << 64) - 1) for n in parsed], dtype=pl.UInt64),
    ).unique(["prefix", "net_hi", "net_lo"], keep="first", maintain_order=True)
    peers = pl.DataFrame({"addr": pl.Series(texts, dtype=pl.String), "hi": hi, "lo": lo}).filter(
        pl.Series(ok)
    )
    found = []
    for bits in sorted(table.get_column("prefix").unique().to_list()):
        mask_hi, mask_lo = _mask(bits)
        masked = peers.with_columns(net_hi=pl.col("hi") & mask_hi, net_lo=pl.col("lo") & mask_lo)
        hits = masked.join(table.filter(pl.col("prefix") == bits), on=["net_hi", "net_lo"], how="inner")
        if not hits.is_empty():
            found.append(hits.with_columns(prefix=pl.lit(bits, pl.Int32)))
            peers = peers.filter(~pl.col("addr").is_in(hits.get_column("addr").implode()))
    if not found:
        return None
    return pl.concat(found).drop("hi", "lo", "net_hi", "net_lo", "prefix")


def _running_argmax(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    best = 0
    for k in range(len(values)):  # runs once per indicator list, not per flow
        if values[k] > values[best]:
            best = k
        out[k] = best
    return out


def _previous_rows(lake: Lake, source: str) -> tuple[list[FileEntry], pa.Table, pa.Table]:
    """The intel files holding rows of `source`, their rows of other sources (to be written again), and the
    rows of `source` itself."""
    removed, kept, mine = [], [], []
    entries = lake.entries("intel")
    for entry, rows in zip(entries, read_parquet_files([e.path for e in entries], INTEL), strict=True):
        ours = pc.fill_null(pc.equal(rows.column("source"), source), False)
        if pc.any(ours).as_py():
            removed.append(entry)
            kept.append(rows.filter(pc.invert(ours)))
            mine.append(rows.filter(ours))
    return (
        removed,
        pa.concat_tables(kept) if kept else INTEL.empty_table(),
        pa.concat_tables(mine) if mine else INTEL.empty_table(),
    )


def _same_indicators(held: pa.Table, parsed: pa.Table) -> bool:
    """Whether the lake's rows of a feed are the indicators just parsed from it (as multisets of indicator and
    kind)."""
    if held.num_rows != parsed.num_rows:
        return False
    key = ["indicator", "kind"]
    return (
        held.select(key)
        .sort_by([(k, "ascending") for k in key])
        .equals(parsed.select(key).cast(held.select(key).schema).sort_by([(k, "ascending") for k in key]))
    )


def read_intel(lake: Lake) -> pa.Table:
    """The `intel` dataset as detection uses it: of each source only its latest import (lakes written before
    imports replaced a feed's rows hold every import of a feed)."""
    table = lake.read("intel")
    if not table.num_rows:
        return table
    frame = pl.from_arrow(table)
    latest = frame.filter(pl.col("imported_at") == pl.col("imported_at").max().over("source"))
    return latest.to_arrow().cast(table.schema)
