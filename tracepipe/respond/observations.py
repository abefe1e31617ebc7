"""What a CSIRT hands a site, as one Arrow table of observations: (address, optional port and peer, a time or a
time range), from a CSV or JSON list, a MISP event (JSON export) or a list of tracepipe alert ids.

Out: `Observations` (the table, the rejects with line or attribute index and reason, and the domains a MISP
event named, kept for the export). Nothing here raises on bad content: a line that does not parse is a reject,
the rest is traced. Addresses are canonicalised once per unique value (stdlib ipaddress), times with units.to_utc.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from tracepipe.errors import InputError, UsageError
from tracepipe.intel import ADDRESS_TYPES, DOMAIN_TYPES
from tracepipe.lake import Lake
from tracepipe.limits import csv_lines, json_loads
from tracepipe.schema import TS
from tracepipe.units import canonical_addr, in_time_window, time_window, to_utc, to_utc_range

FORMATS = ("auto", "csv", "json", "misp", "alerts")
MAX_OBSERVATIONS = 100_000  # a ticket lists tens to thousands; more is not a ticket (the rest is rejected)
MAX_INPUT_BYTES = 64 * 1024 * 1024

OBSERVATIONS = pa.schema(
    [
        pa.field("obs", pa.int32(), nullable=False),  # 1-based, in input order: how answers refer back
        pa.field("ref", pa.string()),  # where it came from: "line 7", "attribute 3", "alert 9f2c..."
        pa.field("address", pa.string(), nullable=False),  # canonical text, as the lake stores it
        pa.field("port", pa.int32()),
        pa.field("peer", pa.string()),
        pa.field("start", TS, nullable=False),
        pa.field("end", TS, nullable=False),  # == start for a point in time
    ]
)

# column names a ticket uses for each field (first match wins)
# (header names are compared lower case, spaces and hyphens as `_`: "IP Address" is ip_address)
_ALIASES = {
    "address": ("address", "addr", "ip", "ip_address", "ipaddress", "ipv4", "ipv6", "src_ip", "source_ip",
                "src_addr", "source_address", "source_ip_address", "src_ip_address", "src", "source", "host"),
    "port": ("port", "dst_port", "dport", "destination_port", "dest_port"),
    "peer": ("peer", "dst_ip", "destination", "destination_ip", "destination_ip_address", "dest_ip", "dst_addr",
             "dst", "remote", "cc"),
    "time": ("time", "timestamp", "ts", "at", "datetime", "date_time", "time_utc", "timestamp_utc", "datetime_utc",
             "event_time", "date"),
    "start": ("start", "from", "first_seen", "since", "start_time"),
    "end": ("end", "to", "last_seen", "until", "end_time"),
}  # fmt: skip
_ALERT_ID = re.compile(r"[0-9a-f]{12,64}")
_CLOCK = re.compile(
    r"[0-2]?[0-9]:[0-5][0-9](?::[0-5][0-9](?:\.[0-9]+)?)?(?:\s*(?:Z|UTC|GMT|[+-][0-9]{2}:?[0-9]{2}))?",
    re.IGNORECASE,
)  # a time of day alone (08:05, 08:05:00.5, 08:05 UTC)


@dataclass
class Observations:
    table: pa.Table
    rejects: list[dict[str, Any]] = field(default_factory=list)
    domains: list[dict[str, Any]] = field(default_factory=list)  # MISP domain/hostname attributes, for export
    format: str = "csv"
    source: str = ""


def _address(text: Any) -> str | None:
    """A cell's address, canonical; a host prefix (10.0.0.1/32, 2001:db8::1/128, as MISP and firewalls write a
    host) is the host. None when it is no address (another prefix is a network, not one host)."""
    if text is None:
        return None
    value = str(text).strip()
    host, slash, bits = value.partition("/")
    if slash and bits in ("32", "128"):
        value = host if (bits == "32") == ("." in host and ":" not in host) else value
    try:
        return canonical_addr(value)
    except ValueError:
        return None


def _port(value: Any) -> int | str | None:
    """int, None (not given) or a reject reason."""
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    if not text.isascii():  # (int() reads any script's digits: "٤٤٣" was port 443)
        return "port is not a number"
    try:
        port = int(text)
    except ValueError:
        return "port is not a number"
    return port if 0 <= port <= 65535 else "port out of range 0-65535"


def _header_name(name: Any) -> str:
    """A ticket's column name as the aliases write it: lower case, a parenthesised note dropped ("Time (UTC)"),
    any run of other ASCII characters or of white space as `_` ("Date/Time", "Source IP Address", a
    spreadsheet's no-break space). Other characters past ASCII stay: a column "\u202eaddress" is no "address"
    (it silently replaced the real address column)."""
    text = re.sub(r"\([^)]*\)", " ", str(name).lower())
    return re.sub(r"[\s\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]+", "_", text).strip("_")


def _pick(record: dict[str, Any], name: str) -> Any:
    lowered = {_header_name(k): v for k, v in record.items() if k is not None}
    for alias in _ALIASES[name]:
        value = lowered.get(alias)
        if value not in (None, ""):
            return value
    return None


# an address with its port in one cell, as logs and abuse reports write them: 192.0.2.7:443, [2001:db8::7]:443
_WITH_PORT = re.compile(
    r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?|([0-9]{1,3}(?:\.[0-9]{1,3}){3}):([0-9]{1,5})"
)


def _address_and_port(text: Any) -> tuple[str | None, int | str | None]:
    """(canonical address, port it named or None) of a cell; (None, None) when it is no address."""
    address = _address(text)
    if address is not None or text is None:
        return address, None
    match = _WITH_PORT.fullmatch(str(text).strip())
    if match is None:
        return None, None
    host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    address = _address(host)
    return (address, _port(port)) if address is not None else (None, None)


def _record_row(record: dict[str, Any], ref: str) -> dict[str, Any] | str:
    """One CSV/JSON record -> an observation row, or a reject reason."""
    address, cell_port = _address_and_port(_pick(record, "address"))
    if address is None:
        given = _pick(record, "address")
        if given is not None and "/" in str(given):
            return "address is a network prefix, not one host: give the host (a /32 or /128 is one)"
        return "no address column" if given is None else "address is not an IPv4/IPv6 address"
    port = _port(_pick(record, "port"))
    if isinstance(port, str):
        return port
    peer_text = _pick(record, "peer")
    peer, peer_port = _address_and_port(peer_text)
    if peer_text is not None and peer is None:
        return "peer is not an IPv4/IPv6 address"
    for named in (peer_port, cell_port):  # (a port the column gives wins over one in an address cell)
        if isinstance(named, str):
            return named
        if port is None and named is not None:
            port = named
    at = _pick(record, "time")
    day = {_header_name(k): v for k, v in record.items() if k is not None}.get("date")
    if isinstance(at, str) and _CLOCK.fullmatch(at.strip()) and day not in (None, "") and day != at:
        at = f"{str(day).strip()} {at.strip()}"  # (a date column and a time-of-day column: a spreadsheet's)
    # a date alone is its whole day, as a MISP event's date is (_event_range)
    starts, ends = to_utc_range(_pick(record, "start") or at), to_utc_range(_pick(record, "end") or at)
    if starts is None and ends is None:
        given = [str(v) for v in (_pick(record, "start"), _pick(record, "end"), at) if v not in (None, "")]
        if given:  # (a time that is there but does not parse is not "no time")
            return (
                f"time {given[0][:60]!r} does not parse: give ISO 8601 (2025-06-17T08:05:00Z, 2025-06-17 "
                "10:05+02:00, 2025-06-17 08:05 UTC) or epoch seconds / milliseconds"
            )
        return "no time: give time, or start and end (ISO 8601 or epoch seconds)"
    start, end = (starts or ends)[0], (ends or starts)[1]  # type: ignore[index]
    if not (in_time_window(start) and in_time_window(end)):
        # (0001-01-01 or 9999-12-31 overflowed the trace's window arithmetic: an internal error)
        earliest, latest = time_window()
        return f"time outside plausible window {earliest:%Y-%m-%d} .. {latest:%Y-%m-%d}"
    if end < start:
        return "end is before start"
    return {"ref": ref, "address": address, "port": port, "peer": peer, "start": start, "end": end}


def _reject(ref: str, reason: str, detail: Any = "") -> dict[str, Any]:
    """A reject; its detail (the row as read) as JSON text when it is a record, for a script to parse (it was a
    Python repr)."""
    if isinstance(detail, dict | list):
        text = json.dumps(detail, ensure_ascii=False, default=str)
    else:
        text = str(detail)
    return {"ref": ref, "reason": reason, "detail": text[:300]}


class _Kept:
    """Rows and rejects of a list being read, each kept up to MAX_OBSERVATIONS: a file of millions of lines
    (64 MiB of them: 1.9 GB and 52 s, all parsed before the cap) is read no further than that."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.rejects: list[dict] = []
        self.full = False

    def add(self, result: dict[str, Any] | str, ref: str, detail: Any) -> None:
        if self.full:  # (the cap's reject is the last word)
            return
        if isinstance(result, str):
            self.rejects.append(_reject(ref, result, detail))
        else:
            self.rows.append(result)
        if len(self.rows) > MAX_OBSERVATIONS or len(self.rejects) >= MAX_OBSERVATIONS:
            what = "observations" if len(self.rows) > MAX_OBSERVATIONS else "rejects"
            self.rejects.append(_reject(ref, f"more than {MAX_OBSERVATIONS} {what}: the rest is not read"))
            self.rows = self.rows[:MAX_OBSERVATIONS]
            self.full = True


def parse_csv(text: str) -> tuple[list[dict], list[dict], list[dict]]:
    """A CSV observation list with a header, read line by line (limits.csv_lines): a line the csv module cannot
    read alone (an unclosed quote in a comment) is a reject with its line number and the lines after it are
    read, as for MISP CSV. Cells past the header's are ignored (an unquoted comma in a comment)."""
    kept = _Kept()
    header: list[str] | None = None
    misp = False
    for line in csv_lines(text, delimiter=_delimiter(text)):
        if kept.full:
            break
        ref = f"line {line.number}"
        if line.cells and line.cells[0].lstrip().startswith("#"):
            continue  # a comment line (a ticket's notes above the list or between its rows)
        if line.problem:
            kept.add(line.problem, ref, line.detail)
            continue
        if header is None:
            header = _positional_header(line.cells)
            if header is None:  # (a header line)
                header = line.cells
                misp = _is_misp_csv(header)
                continue
        if misp:
            record = dict(zip(header, line.cells, strict=False))
            result = _misp_csv_record(record)
            if result is not None:
                kept.add(_record_row(result, ref) if isinstance(result, dict) else result, ref, record)
        else:
            # a cell's trailing `# comment` ("2025-06-17T08:05Z # from the abuse mail") is not part of it
            cells = [cell.split("#", 1)[0].strip() for cell in line.cells]
            record = dict(zip(header, cells, strict=False))
            kept.add(_record_row(record, ref), ref, dict(zip(header, line.cells, strict=False)))
    return kept.rows, kept.rejects, []


def _positional_header(cells: list[str]) -> list[str] | None:
    """Names for the columns of a list without a header line, from its first line (None when it is a header):
    the first address is the address, a second one the peer, the first time the time, a number the port (a
    CSIRT review: the first observation of such a list was taken for the header and lost, and the error named
    line 2)."""
    names: list[str] = []
    for cell in cells:
        text = cell.split("#", 1)[0].strip()
        if _address_and_port(text)[0] is not None and "address" not in names:
            names.append("address")
        elif _address_and_port(text)[0] is not None and "peer" not in names:
            names.append("peer")
        elif to_utc_range(text) is not None and "time" not in names:
            names.append("time")
        elif text.isascii() and text.isdigit() and "port" not in names and isinstance(_port(text), int):
            names.append("port")
        else:
            names.append(f"_{len(names)}")
    return names if "address" in names and "time" in names else None


# MISP's CSV export (uuid,event_id,category,type,value,...): its attributes, as a MISP JSON event's are read
_MISP_CSV = {"type", "value", "category"}


def _is_misp_csv(header: list[str]) -> bool:
    return _MISP_CSV <= {_header_name(h) for h in header}


def _misp_csv_record(record: dict[str, Any]) -> dict[str, Any] | str | None:
    """A MISP CSV row -> a record for _record_row (address, port, start, end), a reject reason, or None for a
    type a flow lake cannot trace. Its `timestamp` is when the attribute was edited, never the time (parse_misp):
    first_seen / last_seen, else the row's `date` (the event's), else a reject."""
    fields = {_header_name(k): v for k, v in record.items() if k is not None}
    kind, value = str(fields.get("type") or "").strip(), str(fields.get("value") or "").strip()
    if kind not in ADDRESS_TYPES:
        return None
    address, _, port = value.partition("|")
    first, last = fields.get("first_seen") or None, fields.get("last_seen") or None
    when = first or last or fields.get("date") or fields.get("event_date") or None
    if when is None:
        return (
            "no time: the row has no first_seen, last_seen or date (MISP's `timestamp` is when the attribute was "
            "last edited, not when the address was seen)"
        )
    return {
        "address": address,
        "port": port if "|" in kind else None,
        "start": first or last or when,
        "end": last or first or when,
    }


def _delimiter(text: str) -> str:
    """`,`, or `;` / TAB when the header line (the first that is not blank or a comment) has one and no comma
    (a spreadsheet's export in a locale whose decimal mark is the comma; a TSV)."""
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            if "," not in line:
                for mark in ("\t", ";"):
                    if mark in line:
                        return mark
            return ","
    return ","


def _misp_events(doc: Any) -> list[dict[str, Any]] | None:
    """The events of a MISP JSON export, or None if `doc` is not one."""
    if isinstance(doc, dict) and "response" in doc:
        doc = doc["response"]
    items = doc if isinstance(doc, list) else [doc]
    if items and all(isinstance(i, dict) and isinstance(i.get("Event"), dict) for i in items):
        return [i["Event"] for i in items]
    return None


def parse_json(text: str) -> tuple[list[dict], list[dict], list[dict]]:
    try:
        doc = json_loads(text)  # (never a RecursionError: too deep is a JSONDecodeError)
    except json.JSONDecodeError as exc:
        return [], [_reject(f"line {exc.lineno}", "not valid JSON", exc.msg)], []
    if isinstance(doc, dict):
        doc = doc.get("observations", doc)
    if not isinstance(doc, list):
        return [], [_reject("document", "expected a list of observations or {'observations': [...]}")], []
    kept = _Kept()
    for index, record in enumerate(doc, start=1):
        ref = f"item {index}"
        kept.add(
            _record_row(record, ref) if isinstance(record, dict) else "item is not an object", ref, record
        )
        if kept.full:
            break
    return kept.rows, kept.rejects, []


def _event_range(event: dict[str, Any]) -> tuple[dt.datetime | None, dt.datetime | None]:
    """An event's date (YYYY-MM-DD) covers that whole UTC day."""
    return to_utc_range(event.get("date")) or (None, None)


def parse_misp(text: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Every address attribute of a MISP event is an observation: its first/last seen, else the times of its
    sightings, else the event's day. Never its `timestamp`: MISP sets that when the attribute was last edited, hours
    or days after the activity (a CSIRT review: an attribute entered at 11:00 for a scan at 08:00 named the VM
    that held the address at 11:00). `ip-*|port` carries the port. Domains are kept for the export, not traced."""
    try:
        events = _misp_events(json_loads(text))
    except json.JSONDecodeError as exc:
        return [], [_reject(f"line {exc.lineno}", "not valid JSON", exc.msg)], []
    if events is None:
        return [], [_reject("document", "not a MISP event export (no Event object)")], []
    kept, domains = _Kept(), []
    index = 0
    for number, event in enumerate(events, start=1):
        if kept.full:
            break
        attributes = _listed(event.get("Attribute"), f"event {number} Attribute", kept)
        for obj in _listed(event.get("Object"), f"event {number} Object", kept):
            if isinstance(obj, dict):
                attributes.extend(_listed(obj.get("Attribute"), f"event {number} Object Attribute", kept))
        day_start, day_end = _event_range(event)
        for attr in attributes:
            if kept.full:
                break
            index += 1
            ref = f"attribute {index}"
            if not isinstance(attr, dict):
                kept.add("attribute is not an object", ref, attr)
                continue
            kind, value = str(attr.get("type", "")).strip(), str(attr.get("value", "")).strip()
            if kind in DOMAIN_TYPES:
                name = hostname(value.split("|", 1)[0])
                if name is None:
                    kept.add("not a host name (letters, digits, '-' and '.', 253 at most)", ref, value)
                elif len(domains) < MAX_OBSERVATIONS:
                    domains.append({"value": name, "comment": attr.get("comment")})
                continue
            if kind not in ADDRESS_TYPES:
                continue  # hashes, urls, ...: not something a flow lake can trace
            address_text, _, port_text = value.partition("|")
            # (first_seen alone is that instant, as MISP shows it; so is last_seen alone)
            first, last = to_utc(attr.get("first_seen")), to_utc(attr.get("last_seen"))
            if first is None and last is None:
                first, last = _sighted(attr)
            start = first or last or day_start
            end = last or first or day_end
            if start is None and end is None:
                kept.add(
                    "no time: the attribute has no first_seen, last_seen or sighting and its event no date (its "
                    "`timestamp` is when it was last edited in MISP, not when the address was seen)",
                    ref,
                    value,
                )
                continue
            record = {
                "address": address_text,
                "port": port_text if "|" in kind else None,
                "start": start.isoformat() if start else None,
                "end": end.isoformat() if end else None,
            }
            kept.add(_record_row(record, ref), ref, value)
    return kept.rows, kept.rejects, domains


def _sighted(attr: dict[str, Any]) -> tuple[dt.datetime | None, dt.datetime | None]:
    """The first and last `date_sighting` of an attribute's sightings (when the reporter saw it), if any."""
    sightings = attr.get("Sighting")
    times = []
    for sighting in sightings if isinstance(sightings, list) else []:
        if isinstance(sighting, dict):
            when = to_utc(sighting.get("date_sighting"))
            if when is not None:
                times.append(when)
    return (min(times), max(times)) if times else (None, None)


def _listed(value: Any, where: str, kept: _Kept) -> list[Any]:
    """A MISP list field (Attribute, Object) as a list: absent is empty, another JSON type a reject."""
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return list(value)
    kept.add("not a list", where, value)
    return []


_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")  # (`_` too: _dmarc.example.org, dynamic-DNS C2 names)


def hostname(text: str) -> str | None:
    """A DNS host name as the exports carry it (lower case, internationalised names in their xn-- form), or
    None: labels of letters, digits, '-' and '_', 253 characters at most. A MISP domain with a newline, a quote or a
    bidi override went into the STIX bundle as it was (invalid there) and into the MISP export."""
    name = text.strip().lower().removesuffix(".")
    try:
        name = name.encode("idna").decode("ascii")  # (IDNA 2003, the stdlib's; an ASCII name is unchanged)
    except (UnicodeError, ValueError):
        return None
    labels = name.split(".")
    if not name or len(name) > 253 or len(labels) < 2 or not all(_LABEL.fullmatch(x) for x in labels):
        return None
    return name


def sniff(text: str, path: Path) -> str:
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        try:
            return "misp" if _misp_events(json_loads(stripped)) is not None else "json"
        except json.JSONDecodeError:
            return "json"
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    # alert ids, one a line (a mistyped one among them is its line's reject, not a CSV of no header)
    if any(_ALERT_ID.fullmatch(line) for line in lines) and not any(re.search(r"[,;\t\s]", x) for x in lines):
        return "alerts"
    return "csv"


def _alert_observations(lines: list[tuple[int, str]], lake: Lake | None) -> tuple[list[dict], list[dict]]:
    from tracepipe.query import alerts_by_id

    wanted = sorted({alert_id for _, alert_id in lines if _ALERT_ID.fullmatch(alert_id)})
    by_id = {row["alert_id"]: row for row in alerts_by_id(lake, wanted)} if lake is not None else {}
    rows, rejects = [], []
    for number, alert_id in lines:
        if not _ALERT_ID.fullmatch(alert_id):
            rejects.append(_reject(f"line {number}", "not an alert id", alert_id))
            continue
        alert = by_id.get(alert_id)
        if alert is None or not alert.get("addr"):
            rejects.append(_reject(f"line {number}", "no such alert in the lake", alert_id))
            continue
        rows.append(
            {
                "ref": f"alert {alert_id}",
                "address": alert["addr"],
                "port": None,
                "peer": alert.get("peer"),
                "start": alert["window_start"],
                "end": alert["window_end"],
            }
        )
    return rows, rejects


def read_observations(path: Path | str, fmt: str = "auto", lake: Lake | None = None) -> Observations:
    """Read one observation file. An alert id list is looked up in `lake`'s alerts dataset.
    UsageError for an unknown format, InputError when the file cannot be read."""
    path = Path(path)
    if fmt not in FORMATS:
        raise UsageError(f"unknown observation format {fmt!r}; use one of {', '.join(FORMATS)}")
    try:
        if path.stat().st_size > MAX_INPUT_BYTES:
            raise InputError(f"{path} is larger than {MAX_INPUT_BYTES >> 20} MiB: split the observation list")
        # utf-8-sig: the byte-order mark that Excel's "CSV UTF-8", PowerShell and Notepad write (it made the
        # header `\ufeffaddress`: every row rejected; and hid a JSON document from the sniff: nothing at all)
        data = path.read_bytes()
        # UTF-16 with its byte-order mark: Excel's "Unicode Text" and Windows PowerShell 5's `>` (read as UTF-8
        # it was every other byte a NUL: each line a reject, named at the wrong line)
        utf16 = data.startswith((b"\xff\xfe", b"\xfe\xff"))
        text = data.decode("utf-16" if utf16 else "utf-8-sig", errors="replace")
    except OSError as exc:
        raise InputError(
            f"cannot read {path}: {exc.strerror}. Give a CSV/JSON observation list, a MISP event or alert ids."
        ) from exc
    if fmt == "auto":
        fmt = sniff(text, path)
    domains: list[dict] = []
    if fmt == "alerts":
        numbered = [(n, line.split("#", 1)[0].strip()) for n, line in enumerate(text.splitlines(), start=1)]
        rows, rejects = _alert_observations([(n, t) for n, t in numbered if t], lake)
    else:
        rows, rejects, domains = {"csv": parse_csv, "json": parse_json, "misp": parse_misp}[fmt](text)
    if len(rows) > MAX_OBSERVATIONS:  # (alert ids; the parsers stop at the cap themselves)
        rejects.append(_reject(rows[MAX_OBSERVATIONS]["ref"], f"more than {MAX_OBSERVATIONS} observations"))
        rows = rows[:MAX_OBSERVATIONS]
    for number, row in enumerate(rows, start=1):
        row["obs"] = number
    table = pa.Table.from_pylist(rows, schema=OBSERVATIONS) if rows else OBSERVATIONS.empty_table()
    return Observations(table, rejects, domains, fmt, str(path))
