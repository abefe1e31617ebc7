"""Typed sweep definitions: a `pipelines/*.toml` file -> `PipelineConfig` (frozen dataclasses).

Read with stdlib `tomllib`; every key is checked against the dataclass it fills, so an unknown key or a value of
the wrong type is a `PipelineError` naming the key AND its line in the file (tomllib gives values, not
positions, so `_KeyLines` finds the line of each `[table]` / `key =` by a light scan of the text).
Durations are written "90s", "15m", "1h", "7d" (or plain seconds): tracepipe.units, as on the command line.
Every number must be finite (TOML allows nan and inf) and within its key's range in `RANGES` (by key name:
windows > 0, shares and scores 0..1, ports 0..65535, hours 0..23, counts >= 1, anything else >= 0): a
negative threshold or a zero window would switch a detector off or divide by zero without a word.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracepipe.errors import EXIT_OK, UsageError
from tracepipe.fsutil import input_problem
from tracepipe.units import parse_date, parse_duration, parse_network, parse_time

# The pipeline templates ship inside the package (pipelines/ at the repository root links here); a site starts
# from editable copies (`tracepipe init DIR`). Commands given no pipeline file use the nightly template.
TEMPLATES_DIR = Path(__file__).resolve().parent / "pipelines"
DEFAULT_PIPELINE = TEMPLATES_DIR / "nightly.toml"


class PipelineError(UsageError):
    """The pipeline file does not parse or does not fit the schema (exit code 2)."""


class Duration(float):
    """Seconds; in the file a string like '1h' or a number."""


# ---- the schema ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelineSection:
    name: str = "sweep"
    description: str = ""
    # The cloud's own address space: a flow's local end is the "host" whose behaviour is scored.
    local_networks: list[str] = field(
        default_factory=lambda: ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
    )
    # Exit 4 instead of 0 when the window holds no flows (a silent collector is then noticed by cron).
    fail_on_empty: bool = False
    # A TOML file of [[science_peers]] entries (relative to this pipeline file), added to the inline ones.
    science_peers_file: str = ""


@dataclass(frozen=True)
class WindowSection:
    # Without --since/--until the sweep covers the last *completed* `last` (1h -> the previous hour,
    # 1d -> yesterday), aligned to UTC.
    last: Duration = 3600  # type: ignore[assignment]
    # Baseline: this much history before the window (exfiltration, new destinations, anomaly model).
    baseline: Duration = 7 * 86400  # type: ignore[assignment]
    # Night hours (UTC, [start, end)) for the night-time share feature.
    night_start_hour: int = 22
    night_end_hour: int = 6
    # Flows that land after their window was swept (a probe exporting a long connection when it ends, a
    # collector's backlog, a capture ingested late): a scheduled sweep (no --since/--until) also sweeps again
    # the windows of `last` (at most a day) that such flows fell in, up to `late` back (0: never), at most
    # `late_windows` of them per run, the newest first (the others wait for the next runs).
    late: Duration = 8 * 86400  # type: ignore[assignment]
    late_windows: int = 6


@dataclass(frozen=True)
class InputsSection:
    flow_dirs: list[str] = field(default_factory=list)  # drop folders / collector spool: ingested first
    flow_pattern: str = "*"
    vm_dirs: list[str] = field(default_factory=list)  # VM lifecycle drop folders
    vm_pattern: str = "*"
    attribute: bool = True  # attribute the window's flows to VMs (tracepipe.attribution) before detecting


@dataclass(frozen=True)
class OutputSection:
    report_dir: str = "reports"  # relative paths are relative to the current directory
    html: bool = True  # the HTML report (if tracepipe.report is installed); JSON is always written
    title: str = ""
    max_evidence_rows: int = 20
    # evidence (flow rows, top peers and ports) for at most this many alerts per run, the highest scores first:
    # an alert flood (tens of thousands, e.g. planted by a tenant) must not make the sweep's memory and time grow
    # with it; the other alerts keep every other field and say why their evidence is missing
    max_evidence_alerts: int = 1000


@dataclass(frozen=True)
class AllowEntry:
    """One allowlist decision with its why: alerts whose address or peer falls in `cidrs` (and, when given,
    of these `detectors`, on these `ports`) are suppressed until `expires` (a UTC time or day; empty = no
    end). The report lists every suppressed alert with this reason."""

    reason: str = ""
    cidrs: list[str] = field(default_factory=list)
    detectors: list[str] = field(default_factory=list)  # empty = every detector
    ports: list[int] = field(default_factory=list)  # empty = any port
    expires: str = ""


@dataclass(frozen=True)
class SciencePeer:
    """A research-network peer or bulk-transfer service the site declares (LHCONE/LHCOPN prefixes, a
    national lab's storage, a data-transfer node): outbound volume to it is science, not exfiltration."""

    name: str = ""
    reason: str = ""
    prefixes: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)  # empty = any port (GridFTP, XRootD, HTTP-TPC, FTS...)
    expires: str = ""


@dataclass(frozen=True)
class AllowlistSection:
    addresses: list[str] = field(default_factory=list)  # never alert on these, either end
    cidrs: list[str] = field(default_factory=list)
    projects: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)  # the alert's service port
    known_scanners: list[str] = field(
        default_factory=list
    )  # addresses/CIDRs allowed to scan (scan detectors only)
    entries: list[AllowEntry] = field(default_factory=list)  # [[allowlist.entries]]: reason, optional expiry


@dataclass(frozen=True)
class HorizontalScan:
    enabled: bool = True
    window: Duration = 3600  # type: ignore[assignment]
    min_hosts: int = 100  # distinct destinations on one port
    min_failed_share: float = 0.5  # of the TCP attempts (SYN without ACK, or RST); UDP counts as unanswered


@dataclass(frozen=True)
class VerticalScan:
    enabled: bool = True
    window: Duration = 3600  # type: ignore[assignment]
    min_ports: int = 100  # distinct destination ports on one host
    min_failed_share: float = 0.5


# Authentication services by their registered ports: ssh, rdp, vnc, ftp, telnet, smtp submission (587, 465),
# pop3 (110, 995), imap (143, 993), mysql, postgres, mssql, ldap (389, 636), smb, winrm (5985, 5986)
LOGIN_PORTS = (
    22,
    3389,
    5900,
    21,
    23,
    587,
    465,
    110,
    995,
    143,
    993,
    3306,
    5432,
    1433,
    389,
    636,
    445,
    5985,
    5986,
)


@dataclass(frozen=True)
class BruteForce:
    enabled: bool = True
    window: Duration = 3600  # type: ignore[assignment]
    # Known login ports raise the score; they are not required (the same attack on port 2222 is found). On them
    # a steady rhythm never clears a host (a login tool with a fixed delay is steady too).
    ports: list[int] = field(default_factory=lambda: list(LOGIN_PORTS))
    min_attempts: int = 60  # connections from one source to the port in a window (outbound: over all targets)
    min_attempts_per_target: float = 10.0  # tells a brute force (many tries per host) from a scan (one each)
    max_bytes_per_attempt: int = 10000  # bytes of one attempt: logins are small (bigger sessions never count)
    # bytes the server sends back in one attempt (its answer's record): a login's answer, even a web form's
    # page, is small; a connection answered by more is a download, never counted
    max_answer_bytes: int = 100_000
    max_duration: Duration = 30  # type: ignore[assignment]  # seconds of one attempt: logins are short
    max_size_spread: float = 0.5  # MAD/median of the attempts' bytes: a tool repeats one exchange
    # Off `ports`, connections to each target at a steady period (MAD/median of the intervals at most
    # push_max_period_spread) of push_min_period or more are a periodic push (metrics, logs), not an attack:
    # listed as suppressed. Login tools fire as fast as the server answers (seconds, or bursts in parallel).
    push_min_period: Duration = 5  # type: ignore[assignment]
    push_max_period_spread: float = 0.1
    inbound: bool = True
    outbound: bool = True


@dataclass(frozen=True)
class Beacon:
    enabled: bool = True
    window: Duration = 86400  # type: ignore[assignment]
    min_connections: int = 20
    min_score: float = 0.8
    external_only: bool = True  # internal periodic traffic (metrics, backups) is expected
    # A destination that this many local hosts or more reach with the same beacon shape is a shared
    # service (NTP pool, update mirror): suppressed, and listed in the report as such. 0 = off.
    shared_service_hosts: int = 5
    ignore_ports: list[int] = field(
        default_factory=list
    )  # exempt ports: a blind spot, prefer allowlist entries


@dataclass(frozen=True)
class Exfiltration:
    enabled: bool = True
    window: Duration = 3600  # type: ignore[assignment]
    min_bytes: int = 1_000_000_000  # outbound bytes to non-local addresses in one window
    host_factor: float = 10.0  # times the host's own baseline (its p99 window)
    peer_factor: float = 10.0  # times the p95 of all hosts in the same window


@dataclass(frozen=True)
class LongConnection:
    enabled: bool = True
    window: Duration = 86400  # type: ignore[assignment]
    min_duration: Duration = 8 * 3600  # type: ignore[assignment]  # one 5-tuple seen without a gap of more than `max_gap`
    max_gap: Duration = 900  # type: ignore[assignment]
    # NTP (ntpd keeps port 123 on both ends) and DNS look like hours-long UDP "connections" to a flow cache;
    # exempt only while quiet: a tunnel over port 53 that carries data is still alerted.
    ignore_ports: list[int] = field(default_factory=lambda: [53, 123])
    ignore_max_bytes: int = 1_000_000  # both ways over the connection's life


@dataclass(frozen=True)
class Mining:
    enabled: bool = True
    window: Duration = 86400  # type: ignore[assignment]
    # Known pool ports raise the score; off them the session must also last `min_duration_any_port` and
    # keep a steady packet rate (idle SSH or IMAP IDLE sessions are small-packet too, but nearly silent).
    ports: list[int] = field(default_factory=lambda: [3333, 4444, 5555, 7777, 9999, 14444, 45700])
    min_duration: Duration = 600  # type: ignore[assignment]
    max_bytes_per_packet: int = 400  # Stratum: short JSON lines
    min_duration_any_port: Duration = 3600  # type: ignore[assignment]
    min_packets_per_minute: float = 3.0
    max_packet_size_spread: float = 0.25  # MAD/median of the flow records' bytes per packet


@dataclass(frozen=True)
class IntelMatch:
    enabled: bool = True
    window: Duration = 86400  # type: ignore[assignment]  # one alert per (host, indicator, day)


@dataclass(frozen=True)
class Detectors:
    horizontal_scan: HorizontalScan = field(default_factory=HorizontalScan)
    vertical_scan: VerticalScan = field(default_factory=VerticalScan)
    brute_force: BruteForce = field(default_factory=BruteForce)
    beacon: Beacon = field(default_factory=Beacon)
    exfiltration: Exfiltration = field(default_factory=Exfiltration)
    long_connection: LongConnection = field(default_factory=LongConnection)
    mining: Mining = field(default_factory=Mining)
    intel: IntelMatch = field(default_factory=IntelMatch)


# what an allowlist entry's `detectors` may name: every detector's section, and the anomaly model's alerts
DETECTOR_NAMES = (*(f.name for f in dataclasses.fields(Detectors)), "anomaly")


@dataclass(frozen=True)
class ModelSection:
    enabled: bool = False
    path: str = ""  # default <lake>/_models/isolation-forest.npz
    min_score: float = 0.65  # anomaly score in [0, 1] (0.5 = ordinary) above which an alert is raised
    max_alerts: int = 10  # the top N (host, window)s at most
    top_features: int = 3


@dataclass(frozen=True)
class PipelineConfig:
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    window: WindowSection = field(default_factory=WindowSection)
    inputs: InputsSection = field(default_factory=InputsSection)
    output: OutputSection = field(default_factory=OutputSection)
    allowlist: AllowlistSection = field(default_factory=AllowlistSection)
    science_peers: list[SciencePeer] = field(default_factory=list)  # [[science_peers]]
    detectors: Detectors = field(default_factory=Detectors)
    model: ModelSection = field(default_factory=ModelSection)
    path: str = ""  # the file it came from (not a TOML key)
    # sha256 of the text it was read from, with its science peers file's (not a TOML key): a report says
    # which version of the file made it
    digest: str = ""

    def settings(self) -> dict[str, Any]:
        """Every setting in force, defaults included (the report records them: a tuned copy that keeps the
        template's name is told apart by them and by `digest`)."""
        out = dataclasses.asdict(self)
        del out["path"], out["digest"]
        return out


# ---- allowed ranges of numbers ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """low <= value <= high (low excluded when `above`)."""

    low: float = 0
    high: float = math.inf
    above: bool = False

    def __contains__(self, value: float) -> bool:
        return (value > self.low if self.above else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        low = f"> {self.low:g}" if self.above else f">= {self.low:g}"
        return low if self.high == math.inf else f"{low} and <= {self.high:g}"


# By key name, wherever the key occurs (every detector's `window`, ...); a number not named here: >= 0.
RANGES: dict[str, Range] = {
    "last": Range(0, above=True),  # the sweep window
    # detector windows, whole seconds: a zero window divides by zero, and 0.5 s was floored to 0 (a review)
    "window": Range(1),
    "max_gap": Range(0, above=True),
    "night_start_hour": Range(0, 23),
    "night_end_hour": Range(0, 23),
    "late": Range(0, 400 * 86400),
    "late_windows": Range(1, 1000),
    "min_failed_share": Range(0, 1),
    "min_score": Range(0, 1),
    "ports": Range(0, 65535),
    "ignore_ports": Range(0, 65535),
    "min_hosts": Range(1),
    "min_ports": Range(1),
    "min_attempts": Range(1),
    "min_connections": Range(2),  # a period needs two connections
    "max_bytes_per_packet": Range(1),
    # brute_force push suppression: a zero period would clear any login tool off the listed ports whose
    # intervals are regular, and a spread above 1 (MAD above the median) calls anything steady
    "push_min_period": Range(0, above=True),
    "push_max_period_spread": Range(0, 1),
}
ANY_NUMBER = Range(0)
MAX_INT = 2**53  # any integer setting; a number beyond it is no count or size of anything


# ---- line numbers -------------------------------------------------------------------------------------------
_TABLE_RE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-\s\"]+?)\s*\]\s*(#.*)?$")
_ARRAY_TABLE_RE = re.compile(r"^\s*\[\[\s*([A-Za-z0-9_.\-\s\"]+?)\s*\]\]\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_\-\"]+)\s*=")


class _KeyLines:
    """Line (1-based) of each `[table]` and `key =` in a TOML text, by dotted path."""

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        table = ""
        entries: dict[str, int] = {}  # [[name]] tables seen so far: their entries are name[0], name[1], ...
        for number, line in enumerate(text.splitlines(), start=1):
            if match := _ARRAY_TABLE_RE.match(line):
                name = ".".join(p.strip().strip('"') for p in match.group(1).split("."))
                table = f"{name}[{entries.get(name, 0)}]"
                entries[name] = entries.get(name, 0) + 1
                self.lines.setdefault(table, number)
                self.lines.setdefault(name, number)
            elif match := _TABLE_RE.match(line):
                table = ".".join(p.strip().strip('"') for p in match.group(1).split("."))
                self.lines.setdefault(table, number)
            elif match := _KEY_RE.match(line):
                key = match.group(1).strip('"')
                self.lines.setdefault(f"{table}.{key}" if table else key, number)

    def of(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path.rpartition(".")[0]
        return None


# ---- building the dataclasses -------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    if tp is Duration:
        return "duration like '1h' or seconds"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "true/false", int: "integer", float: "number", str: "string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _in_range(value: float, where: str, fail) -> float:
    allowed = RANGES.get(where.rpartition(".")[2], ANY_NUMBER)
    if not math.isfinite(value) or value not in allowed:
        fail(where, f"{value!r} is out of range: must be {allowed}")
    return value


def _convert(value: Any, tp: Any, where: str, fail) -> Any:
    if tp is Duration:
        if isinstance(value, float) and not math.isfinite(value):
            fail(where, f"{value!r} is out of range: must be a finite {_type_name(tp)}")
        try:
            seconds = parse_duration(value).total_seconds()
        except UsageError as exc:
            fail(where, str(exc))
        _in_range(seconds, where, fail)
        if where.rpartition(".")[2] == "window" and seconds != int(seconds):
            fail(where, f"{value!r} is no whole number of seconds (windows start on whole seconds)")
        return Duration(seconds)
    if tp is bool:
        if not isinstance(value, bool):
            fail(where, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(where, f"expected {_type_name(tp)}, got {value!r}")
        if abs(value) > MAX_INT:  # (past what every column and counter holds: int too big to convert)
            fail(where, f"{value} is out of range: at most {MAX_INT:,}")
        _in_range(value, where, fail)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail(where, f"expected {_type_name(tp)}, got {value!r}")
        return _in_range(float(value), where, fail)
    if tp is str:
        if isinstance(value, dt.date | dt.datetime) and where.rpartition(".")[2] == "expires":
            # a TOML date or time (expires = 2026-12-31): the text it stands for (a time without a zone: UTC)
            if isinstance(value, dt.datetime) and value.tzinfo is None:
                value = value.replace(tzinfo=dt.UTC)
            return value.isoformat()
        if not isinstance(value, str):
            fail(where, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            fail(where, f"expected {_type_name(tp)}, got {value!r}")
        inner = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(inner):  # ([[table]] entries: each named by its index, as the lines are)
            return [_convert(v, inner, f"{where}[{i}]", fail) for i, v in enumerate(value)]
        return [_convert(v, inner, where, fail) for v in value]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(where, f"expected a table [{where}], got {value!r}")
        return _build(tp, value, where, fail)
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in this module, not in the file


def _build(cls: type, data: dict[str, Any], prefix: str, fail) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: f
        for f in dataclasses.fields(cls)
        if not (cls is PipelineConfig and f.name in ("path", "digest"))
    }
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            fail(where, f"unknown key {key!r} (known here: {known})")
        tp = hints[key]
        if isinstance(tp, types.UnionType):
            tp = typing.get_args(tp)[0]
        kwargs[key] = _convert(value, tp, where, fail)
    return cls(**kwargs)


# a pipeline's name is part of its report files' names: no path separator, control character or leading dot
_PIPELINE_NAME = re.compile(r"[^./\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]{0,63}")


def parse_pipeline(text: str, path: str = "<pipeline>") -> PipelineConfig:
    """TOML text -> PipelineConfig. Raises PipelineError naming the key and the line."""
    lines = _KeyLines(text)

    def fail(where: str, message: str) -> typing.NoReturn:
        line = lines.of(where)
        at = f"line {line}" if line else "top level"
        raise PipelineError(
            f"{path}, {at}: {where}: {message}. Fix the pipeline file (see pipelines/*.toml)."
        )

    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))  # (a byte order mark some editors write)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{path}: not valid TOML: {exc}. Fix the pipeline file.") from exc
    if not data:
        # a truncated copy or deploy ran every detector on the code's defaults, which are not the templates'
        raise PipelineError(
            f"{path}: holds no setting (empty, or only comments): a pipeline file names at least its [pipeline]. "
            "Copy a template (tracepipe init DIR) and edit it."
        )
    config = _build(PipelineConfig, data, "", fail)
    if not _PIPELINE_NAME.fullmatch(config.pipeline.name):
        # (it names the report files and the alerts: a "/" or ".." wrote them outside output.report_dir)
        fail(
            "pipeline.name",
            f"{config.pipeline.name[:80]!r} cannot name files: no '/', '\\', control character or leading '.', at most 64 characters",
        )
    for name in ("local_networks",):
        _check_networks(getattr(config.pipeline, name), f"pipeline.{name}", fail)
    for name in ("addresses", "cidrs", "known_scanners"):
        _check_networks(getattr(config.allowlist, name), f"allowlist.{name}", fail)
    _check_entries(config, fail)
    shared = config.detectors.beacon.shared_service_hosts
    if shared == 1:  # (one host alike with itself: every beacon was a "shared service")
        fail("detectors.beacon.shared_service_hosts", "1 is out of range: 0 (off) or at least 2 hosts")
    return dataclasses.replace(config, path=path, digest=hashlib.sha256(text.encode()).hexdigest())


def _check_entries(config: PipelineConfig, fail) -> None:
    """Every allowlist entry and science peer says why, names real networks, and has a valid expiry."""
    groups: list[tuple[str, list[Any], str]] = [
        ("allowlist.entries", list(config.allowlist.entries), "cidrs"),
        ("science_peers", list(config.science_peers), "prefixes"),
    ]
    for where, entries, nets in groups:
        for i, entry in enumerate(entries):
            at = f"{where}[{i}]"
            if not entry.reason.strip():
                fail(at, "has no reason: say why it is allowed (the report shows it next to what it hides)")
            if not getattr(entry, nets):
                fail(at, f"has no {nets}: list the addresses or CIDRs it covers")
            _check_networks(getattr(entry, nets), f"{at}.{nets}", fail)
            unknown = [d for d in getattr(entry, "detectors", []) if d not in DETECTOR_NAMES]
            if unknown:
                # (a misspelt name suppressed nothing, and said nothing: the engineer believed the rule in place)
                fail(
                    f"{at}.detectors",
                    f"unknown detector {unknown[0]!r} (known: {', '.join(DETECTOR_NAMES)})",
                )
            if entry.expires:
                try:
                    expiry_of(entry.expires)
                except UsageError as exc:
                    fail(f"{at}.expires", str(exc))


def expiry_of(text: str) -> dt.datetime | None:
    """An entry's `expires` -> aware UTC time (a bare day means the end of that day); '' -> None."""
    if not text:
        return None
    if len(text.strip()) == 10:
        return dt.datetime.combine(parse_date(text), dt.time(), dt.UTC) + dt.timedelta(days=1)
    return parse_time(text)


def active(entries: list[Any], now: dt.datetime) -> tuple[list[Any], list[Any]]:
    """Split entries into (still in force at `now`, expired)."""
    live, expired = [], []
    for entry in entries:
        end = expiry_of(entry.expires)
        (expired if end is not None and end <= now else live).append(entry)
    return live, expired


def _check_networks(values: list[str], where: str, fail) -> None:
    for value in values:
        try:
            parse_network(value)
        except UsageError:
            fail(where, f"{value!r} is not an address or CIDR")


def load_pipeline(path: Path | str | None = None) -> PipelineConfig:
    """Read and check a pipeline file; None reads the packaged nightly template (DEFAULT_PIPELINE)."""
    path = Path(path) if path is not None else DEFAULT_PIPELINE
    problem = input_problem(path)  # stat first: reading a FIFO would wait for a writer for ever
    if problem:
        raise PipelineError(f"pipeline file {path} {problem}. Give the path of a pipelines/*.toml file.")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineError(
            f"cannot read pipeline file {path}: {exc.strerror}. Give the path of a pipelines/*.toml file."
        ) from exc
    except UnicodeDecodeError as exc:
        raise PipelineError(
            f"pipeline file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "TOML files are UTF-8: save it as UTF-8."
        ) from exc
    config = parse_pipeline(text, str(path))
    if config.pipeline.science_peers_file:
        config = with_science_peers_file(config, path.parent / config.pipeline.science_peers_file)
    return config


def with_science_peers_file(config: PipelineConfig, path: Path) -> PipelineConfig:
    """Add the [[science_peers]] of a separate file (the site's list, shared by its pipelines)."""
    problem = input_problem(
        path
    )  # stat first: a FIFO waited for a writer for ever, /dev/zero filled the memory
    if problem:
        raise PipelineError(
            f"science peers file {path} {problem}: fix pipeline.science_peers_file in {config.path}."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(
            f"cannot read science peers file {path} ({exc}): fix pipeline.science_peers_file in {config.path}."
        ) from exc
    try:
        keys = set(tomllib.loads(text.removeprefix("\ufeff")))
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{path}: not valid TOML: {exc}. Fix the science peers file.") from exc
    if keys - {"science_peers"}:
        # (its thresholds and allowlists were dropped without a word: they belong in the pipeline file)
        raise PipelineError(
            f"{path}: a science peers file holds [[science_peers]] entries only, not "
            f"{', '.join(sorted(keys - {'science_peers'}))}: put those in the pipeline file {config.path}."
        )
    extra = parse_pipeline(text, str(path))
    digest = hashlib.sha256(f"{config.digest}{extra.digest}".encode()).hexdigest()
    return dataclasses.replace(
        config, science_peers=[*config.science_peers, *extra.science_peers], digest=digest
    )


# ---- templates ----------------------------------------------------------------------------------------------
@dataclass
class InitResult:
    """What `write_templates` wrote (or refused to overwrite) into a site's pipeline directory."""

    directory: Path
    written: list[Path]
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "written": [str(p) for p in self.written],
            "exit_code": self.exit_code,
        }


def template_paths() -> list[Path]:
    """The packaged pipeline templates (hourly, nightly, retro-hunt), sorted by name."""
    return sorted(TEMPLATES_DIR.glob("*.toml"))


def write_templates(directory: Path | str, force: bool = False) -> InitResult:
    """Copy every pipeline template into `directory` (made if missing) for a site to edit.

    Refuses (UsageError, nothing written) when any of the files exists already, unless `force`."""
    directory = Path(directory)
    templates = template_paths()
    existing = [directory / t.name for t in templates if (directory / t.name).exists()]
    if existing and not force:
        raise UsageError(
            f"{', '.join(str(p) for p in existing)} already exist(s); nothing was written. "
            "Pass --force to overwrite them with the templates."
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for template in templates:
            target = directory / template.name
            target.write_text(template.read_text(encoding="utf-8"), encoding="utf-8")
            written.append(target)
    except OSError as exc:
        raise UsageError(f"cannot write pipeline templates into {directory}: {exc.strerror}") from exc
    return InitResult(directory, written)
