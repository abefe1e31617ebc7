"""Give findings back to the community: an incident package or a list of alert ids -> a MISP event (MISP core
format JSON) or a STIX 2.1 bundle (identity, indicators, observed-data, sightings).

What leaves: the outside addresses the evidence names (the observed C&C, the peers of the matching flows when
the observation named a port or a peer), with first/last seen and how often they were seen. What does not
leave unless asked (include_local): the cloud's own VM addresses, and never VM names, owners or projects.
Both formats are built as plain JSON here (no library needed to write them); the tests load them with pymisp,
stix2 and stix2-validator. `push_misp` sends an event to a MISP instance through PyMISP (extra `share`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from tracepipe.errors import EXIT_OK, EnvironmentProblem, InputError, UsageError
from tracepipe.lake import Lake
from tracepipe.limits import MAX_FLOW_DURATION
from tracepipe.printer import clean
from tracepipe.respond.observations import hostname
from tracepipe.units import to_utc

TLP_LEVELS = ("clear", "white", "green", "amber", "amber+strict", "red")
# The TLP 2.0 marking definition of the OASIS CTI TC's common objects: not predefined by STIX 2.1, so the bundle
# holds it (its extension says the level; a consumer that knows neither still reads the name)
TLP2_EXTENSION = "extension-definition--60a3c5c5-0d10-413e-aab3-9e08dde9e88d"
STIX_TLP2_OBJECTS = {
    "amber+strict": {
        "type": "marking-definition",
        "spec_version": "2.1",
        "id": "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003",
        "created": "2022-10-01T00:00:00.000Z",
        "name": "TLP:AMBER+STRICT",
        "extensions": {TLP2_EXTENSION: {"extension_type": "property-extension", "tlp_2_0": "amber+strict"}},
    }
}
# STIX 2.1 predefined TLP marking definitions (STIX 2.1 spec, section 7.2.1.4)
STIX_TLP = {
    "clear": "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9",
    "white": "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9",
    "green": "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da",
    "amber": "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82",
    # TLP 1.0 has no AMBER+STRICT (its AMBER lets recipients share with their clients, which +STRICT forbids):
    # the OASIS CTI TC's TLP 2.0 marking definition, whose object the bundle carries (STIX_TLP2_OBJECTS)
    "amber+strict": "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003",
    "red": "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed",
}
DISTRIBUTIONS = {0: "your organisation only", 1: "this community", 2: "connected communities", 3: "all"}
STIX_SCO_NAMESPACE = uuid.UUID("00abedb4-aa42-466c-9c01-fed23315a9b7")  # STIX 2.1 §2.9, deterministic SCO ids
TRACEPIPE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://tracepipe.invalid/share")
MISP_KEY_ENV = "MISP_KEY"
# the creation time of the objects whose id is fixed and that nothing here saw (the site's identity, a domain
# the input event named): one id, one creation time
STIX_FIXED_CREATED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
MAX_PEERS_PER_PORT = 20  # more outside peers on one observed port than this is a scan, not a C&C
# more outside hosts than this that the traced VM itself connected to on the observed port are its targets (a
# brute force, a scan): a C&C is one or a few (a review: the 12 victims of a VM's outbound SSH brute force went
# out as malicious `ip-dst|port` with to_ids)
MAX_TARGETS_PER_PORT = 5
# an outside end that more of the cloud's VMs than this reached on the same port in the trace's span is a service
# the site's users use (a mirror, a CDN, a science server), not a C&C: shared as context, not for detection (a
# CSIRT review: four destinations that 20-29 VMs used on 443 went out with to_ids beside the one real C&C)
COMMON_DESTINATION_VMS = 3
# addresses that name a different host at every site (RFC 1918, shared address space, loopback, link-local, ULA):
# never an indicator for others, whether or not a VM of this cloud held one (a review: the site's own 10.20.0.9
# went out as an outside C&C). Documentation ranges (192.0.2.0/24, ...) are not among them: the demo's outside
# world lives there.
SITE_ONLY = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
              "0.0.0.0/8", "fc00::/7", "fe80::/10", "::1/128", "::/128")
)  # fmt: skip


def site_only(value: str) -> bool:
    """Whether an address means a host of this site only (SITE_ONLY)."""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in SITE_ONLY)


@dataclass
class Indicator:
    """One address (or domain) to share, with what the site saw of it."""

    value: str
    kind: str  # ip / domain
    role: str  # dst (a remote the VMs contacted or were contacted by) / src (a local VM address)
    port: int | None = None
    first_seen: dt.datetime | None = None
    last_seen: dt.datetime | None = None
    count: int = 0
    comment: str = ""
    local: bool = False
    # the evidence flows behind `count` (ids of distinct flows): a flow two observations matched counts once
    flows: set[int] = field(default_factory=set, repr=False, compare=False)
    detect: bool = True  # for detection (MISP to_ids): not a local address, not a common destination

    @property
    def for_ids(self) -> bool:
        return self.detect and not self.local


@dataclass
class ShareResult:
    """The exported document, where it went, and what it holds."""

    format: str
    document: dict[str, Any]
    indicators: int
    local_left_out: int
    path: Path | None = None
    pushed_to: str | None = None
    notes: list[str] = field(default_factory=list)
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "indicators": self.indicators,
            "local_left_out": self.local_left_out,
            "path": str(self.path) if self.path else None,
            "pushed_to": self.pushed_to,
            "notes": self.notes,
            "exit_code": self.exit_code,
        }


# ---- what to share -------------------------------------------------------------------------------------------


def _family(value: str) -> int | None:
    try:
        return ipaddress.ip_address(value).version
    except ValueError:
        return None


def _merge(found: dict[tuple, Indicator], item: Indicator) -> None:
    key = (item.value, item.port, item.role)
    old = found.get(key)
    if old is None:
        found[key] = item
        return
    if old.flows or item.flows:
        old.flows |= item.flows
        old.count = len(old.flows)
        why, seen, _ = old.comment.partition("; seen in ")
        old.comment = f"{why}; seen in {old.count} flows" if seen else old.comment
    else:
        old.count += item.count
    old.detect = old.detect and item.detect
    old.first_seen = (
        min(t for t in (old.first_seen, item.first_seen) if t)
        if (old.first_seen or item.first_seen)
        else None
    )
    old.last_seen = (
        max(t for t in (old.last_seen, item.last_seen) if t) if (old.last_seen or item.last_seen) else None
    )


def indicators_from_package(package: Path) -> tuple[list[Indicator], dict[str, Any]]:
    """The indicators an incident package supports, from its trace.json and evidence-flows.parquet."""
    import pyarrow.parquet as pq

    folder = package if package.is_dir() else package.parent
    try:
        data = json.loads((folder / "trace.json").read_text(encoding="utf-8"))
        evidence = pq.read_table(folder / "evidence-flows.parquet")
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{package} is not an incident package (trace.json + evidence-flows.parquet): {exc}. "
            "Make one with `tracepipe trace OBSERVATIONS --out DIR`."
        ) from exc
    try:
        return _package_indicators(data, evidence)
    except (KeyError, TypeError, AttributeError, ValueError, pa.ArrowException) as exc:
        # trace.json of another shape (a list, an observation without its number): not one trace wrote
        raise InputError(
            f"{package} is not an incident package as `tracepipe trace` writes it (trace.json or evidence-"
            f"flows.parquet of another shape: {type(exc).__name__} {str(exc)[:200]}). Make one with `tracepipe "
            "trace OBSERVATIONS --out DIR`."
        ) from exc


def _package_indicators(data: Any, evidence: pa.Table) -> tuple[list[Indicator], dict[str, Any]]:
    found: dict[tuple, Indicator] = {}
    notes: list[str] = []
    rows = _evidence_groups(evidence)
    common = {
        (str(d.get("address")), d.get("port")): int(d.get("vms") or 0)
        for d in data.get("destinations") or []
        if isinstance(d, dict)
    }
    for obs in data.get("observations", []):
        number, port = obs["obs"], obs.get("port")
        if not obs.get("in_cloud", True) and obs.get("matching_flows"):
            # the observed address is not the cloud's and VMs talked to it: the CSIRT's C&C, seen here; with the
            # observed port only where that was its own port (a port of the VMs it connected to is not its)
            stats = rows.get((number, "__local__"), {})
            own = port is None or port in stats.get("ports", ())
            why = "observed address, exchanged flows with cloud VMs" + (
                "" if own else f" (on their port {port}, not its own)"
            )
            _merge(found, _from_rows(obs["address"], port if own else None, stats, why))
        if obs.get("peer") or port is not None:
            remotes = [
                (peer, stats)
                for (n, peer), stats in rows.items()
                if n == number and peer not in (obs["address"], "__local__") and not stats["peer_in_cloud"]
            ]
            if port is not None and not obs.get("peer"):
                # an end is shared with the port only where the port was its own (the traced VM reached it there):
                # on the VM's own port, the other ends are its service's clients, or the hosts it reached from
                # that port, never a C&C (a CSIRT review: a web server's visitors went out as `ip-dst|port` 443)
                theirs = [(peer, stats) for peer, stats in remotes if port in stats.get("ports", ())]
                if len(theirs) < len(remotes):
                    notes.append(
                        f"observation {number}: {len(remotes) - len(theirs)} outside ends whose flows used port "
                        f"{port} on the traced VM's side only (its clients, or the hosts it reached from that "
                        "port): not shared"
                    )
                remotes = theirs
            targets = _targets(evidence, number, obs.get("port")) if obs.get("holders") else set()
            targets &= {peer for peer, _ in remotes}
            if not obs.get("peer") and len(targets) > MAX_TARGETS_PER_PORT:
                remotes = [(peer, stats) for peer, stats in remotes if peer not in targets]
                notes.append(
                    f"observation {number}: {len(targets)} outside hosts the traced VM connected to on port "
                    f"{obs['port']} (its targets, a scan's or a brute force's, not a C&C): not shared"
                )
            if obs.get("peer") or len(remotes) <= MAX_PEERS_PER_PORT:
                for peer, stats in remotes:
                    theirs = port if port is None or port in stats.get("ports", ()) else None
                    item = _from_rows(peer, theirs, stats, "contacted by a traced VM")
                    users = common.get((peer, theirs), 0) if theirs is not None else 0
                    if users > COMMON_DESTINATION_VMS:
                        item.detect = False
                        item.comment += (
                            f"; {users} VMs of this cloud reached it on port {theirs} in the trace's span: a "
                            "common destination, not for detection"
                        )
                    _merge(found, item)
            else:
                notes.append(
                    f"observation {number}: {len(remotes)} outside peers on port {obs['port']} (a scan's victims, "
                    "not a C&C): not shared"
                )
        if obs.get("holders"):
            stats = rows.get((number, "__local__"), {})
            _merge(found, _from_rows(obs["address"], None, stats, "address of the traced VM", local=True))
    for domain in data.get("domains") or []:
        name = hostname(
            str(domain.get("value") or "")
        )  # (read checks it; a package edited since may not hold)
        if name is not None:
            found[(name, None, "dst")] = Indicator(name, "domain", "dst", comment="named by the input event")
    # what the exports' ids derive from (export): the package's own id (trace writes one), or for a package of
    # before, what tells it from any other (when and over which lake version and input it was made)
    findings = str(data.get("package_id") or "")
    if not findings:
        made = "|".join(str(data.get(k)) for k in ("generated_at", "lake_version", "source", "window_seconds"))
        findings = "package|" + hashlib.sha256(made.encode("utf-8", "surrogatepass")).hexdigest()
    return list(found.values()), {**data, "notes": notes, "findings": findings}


def _targets(evidence: pa.Table, number: int, port: int | None) -> set[str]:
    """The remote ends the observed address (a traced VM) connected to on `port`, in observation `number`'s
    evidence: flows from it to that destination port."""
    if port is None or evidence.num_rows == 0 or "observed_is_src" not in evidence.column_names:
        return set()
    mask = pc.and_(
        pc.and_(
            pc.equal(evidence.column("obs"), number), pc.fill_null(evidence.column("observed_is_src"), False)
        ),
        pc.equal(evidence.column("dst_port"), port),
    )
    return set(pc.unique(evidence.column("dst_addr").filter(pc.fill_null(mask, False))).to_pylist())


def _evidence_groups(evidence: pa.Table) -> dict[tuple[int, str], dict[str, Any]]:
    """Per (observation, remote end of its matching flows): flows, first and last seen, whether the remote end
    was a cloud VM; plus (obs, '__local__') for the observed end."""
    if evidence.num_rows == 0 or "observed_is_src" not in evidence.column_names:
        return {}
    is_src = evidence.column("observed_is_src")
    remote = pc.if_else(is_src, evidence.column("dst_addr"), evidence.column("src_addr"))
    remote_cloud = pc.if_else(is_src, evidence.column("dst_in_cloud"), evidence.column("src_in_cloud"))
    # the port of each end (a flow's record may go either way: the remote end's port is where it listened, or
    # where it connected from)
    remote_port = pc.if_else(is_src, evidence.column("dst_port"), evidence.column("src_port"))
    local_port = pc.if_else(is_src, evidence.column("src_port"), evidence.column("dst_port"))
    # one id per flow (its columns, not the observation's): two observations may match the same flows
    flow = evidence.drop_columns([c for c in ("obs", "observed_is_src") if c in evidence.column_names])
    flow = flow.select([f.name for f in flow.schema if not pa.types.is_nested(f.type)])
    ids = pl.from_arrow(flow).hash_rows(seed=0)  # type: ignore[union-attr]
    start = pl.Series(evidence.column("ts_start"))
    end = pl.Series(evidence.column("ts_end")) if "ts_end" in evidence.column_names else start
    table = pl.DataFrame(
        {
            "obs": pl.Series(evidence.column("obs")),
            "remote": pl.Series(remote),
            "remote_cloud": pl.Series(remote_cloud),
            "remote_port": pl.Series(remote_port),
            "local_port": pl.Series(local_port),
            "ts": start,
            "end": end,
            "flow": ids,
        }
    )
    # last seen: when the last flow ended (a mining session of hours was "last seen" at its start), within the
    # flow's first MAX_FLOW_DURATION and never before its start (a record's end is the exporter's word)
    table = table.with_columns(
        pl.min_horizontal(
            pl.max_horizontal(pl.col("end").fill_null(pl.col("ts")), pl.col("ts")),
            pl.col("ts") + MAX_FLOW_DURATION,
        ).alias("end")
    )
    out: dict[tuple[int, str], dict[str, Any]] = {}
    aggregates = [
        pl.col("ts").min().alias("first"),
        pl.col("end").max().alias("last"),
        pl.col("flow").unique().alias("flows"),
    ]
    grouped = table.group_by("obs", "remote").agg(
        *aggregates, pl.col("remote_cloud").max(), pl.col("remote_port").drop_nulls().unique().alias("ports")
    )
    for row in grouped.iter_rows(named=True):
        out[(row["obs"], row["remote"])] = {
            "first": row["first"],
            "last": row["last"],
            "count": len(row["flows"]),
            "flows": set(row["flows"]),
            "peer_in_cloud": bool(row["remote_cloud"]),
            "ports": set(row["ports"]),  # (the remote end's own ports)
        }
    local = table.group_by("obs").agg(*aggregates, pl.col("local_port").drop_nulls().unique().alias("ports"))
    for row in local.iter_rows(named=True):
        out[(row["obs"], "__local__")] = {
            "first": row["first"],
            "last": row["last"],
            "count": len(row["flows"]),
            "flows": set(row["flows"]),
            "ports": set(row["ports"]),  # (the observed end's own ports)
        }
    return out


def _from_rows(
    value: str, port: int | None, stats: dict[str, Any], why: str, local: bool = False
) -> Indicator:
    if not local and site_only(value):
        why = f"{why} (a private address: this site's host, no indicator for others)"
    return Indicator(
        value=value,
        kind="ip",
        role="src" if local else "dst",
        port=port,
        first_seen=stats.get("first"),
        last_seen=stats.get("last"),
        count=stats.get("count", 0),
        comment=f"{why}; seen in {stats.get('count', 0)} flows" if stats else why,
        local=local or site_only(value),
        flows=set(stats.get("flows", ())),
    )


def indicators_from_alerts(lake: Lake, ids_file: Path) -> tuple[list[Indicator], dict[str, Any]]:
    """Indicators of alerts named in a file (one alert id per line): the alert's peer as dst, its address as
    a local src."""
    try:
        text = ids_file.read_text(encoding="utf-8-sig", errors="replace")  # (as trace reads the same list)
    except OSError as exc:
        raise InputError(f"cannot read {ids_file}: {exc.strerror}") from exc
    ids = {line.split("#", 1)[0].strip() for line in text.splitlines()}
    ids.discard("")
    import contextlib

    from tracepipe.query import FLOW_END, alerts_by_id, connect, flows_since

    with contextlib.closing(connect(lake)) as con:
        # (a query, not a read of every alert and every lease ever written into Python: both grow for years)
        rows = alerts_by_id(lake, sorted(ids), con)
        missing = ids - {r["alert_id"] for r in rows}
        if not rows:
            raise InputError(
                f"none of the {len(ids)} alert ids in {ids_file} is in the lake's alerts dataset"
            )
        addrs = sorted({a for r in rows for a in (r["addr"], r["peer"]) if a})
        local = {
            a
            for (a,) in con.execute(
                "SELECT DISTINCT addr FROM vm_leases WHERE addr IN (SELECT unnest($a::VARCHAR[]))",
                {"a": addrs},
            ).fetchall()
        }
        found: dict[tuple, Indicator] = {}
        victims: list[dict[str, str]] = []
        for r in rows:
            peer_role = _peer_role(r)
            if r.get("peer") and peer_role is None:
                victims.append({"alert_id": r["alert_id"], "detector": r["detector"], "peer": r["peer"]})
            why = (
                f"tracepipe {r['detector']} alert (score {r['score']:.2f})"
                if r.get("score") is not None
                else "tracepipe alert"
            )
            # what the flows of the alert's window say: when its address (and peer) were seen, in how many flows
            # (before: the window's bounds and "1 flows" for a beacon of 159 connections)
            params = {
                "addr": r["addr"],
                "peer": r.get("peer"),
                "start": r["window_start"],
                "stop": r["window_end"],
                "since": flows_since(r["window_start"]),
                "first_day": flows_since(r["window_start"]).date(),
                "last_day": r["window_end"].date(),
            }
            seen = con.execute(_ALERT_FLOWS_SQL.replace("FLOW_END", FLOW_END), params).fetchone()
            count, first, last = seen if seen and seen[0] else (0, None, None)
            flow_ids: list[int] = []
            if 0 < count <= MAX_FLOW_IDS:  # (a scan's millions of flows are counted, not held one by one)
                sql = _ALERT_FLOW_IDS_SQL.replace("FLOW_END", FLOW_END)
                flow_ids = con.execute(sql, params).fetchone()[0] or []
            for value, role in ((r.get("peer"), peer_role), (r.get("addr"), "src")):
                if value and role:
                    first_seen, last_seen = (first, last) if count else (r["window_start"], r["window_end"])
                    comment = f"{why}; seen in {count} flows" if count else why
                    item = Indicator(
                        value, "ip", role, None, first_seen, last_seen, count, comment, value in local
                    )
                    item.local = item.local or site_only(value)
                    # (two alerts on one peer, a beacon's and intel's, share their flows: counted once)
                    item.flows = set(flow_ids)
                    _merge(found, item)
    shared = {i.value for i in found.values()}  # (a victim another alert names as its peer, intel's: shared)
    victims = [v for v in victims if v["peer"] not in shared]
    meta = {"missing_alerts": sorted(missing), "victims_not_shared": victims, "site_id": lake.site_id()}
    return list(found.values()), {**meta, "findings": "alerts|" + "|".join(sorted(ids - missing))}


def _peer_role(alert: dict[str, Any]) -> str | None:
    """What an alert's peer is to the community: the destination the VM reached ("dst": a C&C, a pool, a drop
    host), the source of an inbound attack ("src"), or None for a victim of the VM (the host it scanned or tried
    logins on), never shared: a vertical scan's target and a single-target brute force's went out as
    malicious `ip-dst` with to_ids (SOC review)."""
    detector = alert["detector"]
    if detector == "vertical_scan":
        return None
    try:
        features = json.loads(alert.get("features") or "{}")
    except ValueError:
        features = {}
    features = features if isinstance(features, dict) else {}
    if detector == "brute_force":
        return "src" if features.get("direction") == "inbound" else None
    if detector == "intel" and features.get("outbound") is False:
        return "src"  # (a listed address that only reached the VM: its source)
    return "dst"


# the flows of an alert's address (with its peer, if it names one) that reach into its window (FLOW_END)
_ALERT_FLOWS_WHERE = """
FROM flows f
WHERE (f.src_addr = $addr OR f.dst_addr = $addr)
  AND ($peer IS NULL OR f.src_addr = $peer OR f.dst_addr = $peer)
  AND f.ts_start >= $since AND f.ts_start < $stop AND FLOW_END >= $start
  AND f."date" BETWEEN $first_day AND $last_day
"""
_ALERT_FLOWS_SQL = "SELECT count(*), min(f.ts_start), max(FLOW_END)" + _ALERT_FLOWS_WHERE
# ... and an id of each (flows named by two alerts count once), for alerts of at most MAX_FLOW_IDS flows
_ALERT_FLOW_IDS_SQL = (
    "SELECT list(DISTINCT hash(f.ts_start, f.ts_end, f.src_addr, f.dst_addr, f.src_port, f.dst_port, f.proto, "
    "f.bytes, f.packets, f.exporter))" + _ALERT_FLOWS_WHERE
)
MAX_FLOW_IDS = 100_000


def select(indicators: list[Indicator], include_local: bool) -> tuple[list[Indicator], int]:
    kept = [i for i in indicators if include_local or not i.local]
    return sorted(kept, key=lambda i: (i.local, i.value, i.port or 0)), len(indicators) - len(kept)


# ---- MISP ----------------------------------------------------------------------------------------------------


def tlp_level(text: str) -> str:
    """A TLP level as written anywhere (`AMBER`, `TLP:AMBER`, `tlp:amber+strict`) -> TLP_LEVELS' spelling."""
    level = str(text).strip().lower().removeprefix("tlp:").strip()
    if level not in TLP_LEVELS:
        raise UsageError(f"unknown TLP level {text!r}; one of {', '.join(TLP_LEVELS)}")
    return level


def _epoch(value: dt.datetime | None) -> str:
    return str(int((value or dt.datetime.now(dt.UTC)).timestamp()))


def _iso(value: dt.datetime | None) -> str | None:
    value = to_utc(value) if value is not None else None
    return value.isoformat().replace("+00:00", "Z") if value else None


def _misp_type(item: Indicator) -> str:
    if item.kind == "domain":
        return "domain"
    base = "ip-src" if item.role == "src" else "ip-dst"
    return f"{base}|port" if item.port is not None else base


def misp_event(
    indicators: list[Indicator],
    info: str,
    tlp: str = "amber",
    distribution: int = 0,
    now: dt.datetime | None = None,
    findings: str = "",
    producer: str = "",
) -> dict[str, Any]:
    """A MISP event in MISP core format ({"Event": {...}}), one attribute per indicator. Its uuid derives from
    `findings` (the package's id, or the alert ids) and `producer` (export: the site): the same package exported again updates its
    event; another package, or another site's, is another event (they were the title and values: two packages of
    one ticket file, at two sites or two days apart, had one uuid and a push overwrote the other). Its date is the
    day of the earliest finding (MISP's reference date of the event), else today."""
    tlp = tlp_level(tlp)
    if distribution not in DISTRIBUTIONS:
        raise UsageError(f"distribution {distribution} unknown; 0 (your organisation only) .. 3 (all)")
    now = now or dt.datetime.now(dt.UTC)
    key = findings or info + "|" + "|".join(i.value for i in indicators)
    event_uuid = str(uuid.uuid5(TRACEPIPE_NAMESPACE, f"{producer}|{key}"))
    seen = [to_utc(i.first_seen) for i in indicators if i.first_seen is not None]
    day = min((t for t in seen if t is not None), default=now).date()
    attributes = []
    for item in indicators:
        value = f"{item.value}|{item.port}" if item.port is not None and item.kind == "ip" else item.value
        attribute: dict[str, Any] = {
            "uuid": str(uuid.uuid5(TRACEPIPE_NAMESPACE, f"{event_uuid}|{_misp_type(item)}|{value}")),
            "type": _misp_type(item),
            "category": "Network activity",
            "value": value,
            # (a site's own VM address, or a destination many VMs use, is context, not something to block)
            "to_ids": item.for_ids,
            "comment": item.comment,
            "distribution": "5",  # inherit the event's
            "timestamp": _epoch(now),
        }
        if item.first_seen:
            attribute["first_seen"] = _iso(item.first_seen)
        if item.last_seen:
            attribute["last_seen"] = _iso(item.last_seen)
        if item.count:
            attribute["Sighting"] = [
                {
                    "type": "0",
                    "date_sighting": _epoch(item.last_seen or now),
                    "source": f"tracepipe ({item.count} flows)",
                }
            ]
        attributes.append(attribute)
    return {
        "Event": {
            "uuid": event_uuid,
            "info": info,
            "date": day.isoformat(),
            "threat_level_id": "2",
            "analysis": "2",
            "distribution": str(distribution),
            "published": False,
            "timestamp": _epoch(now),
            "Tag": [{"name": f"tlp:{tlp}"}],
            "Attribute": attributes,
        }
    }


def push_key(url: str) -> str:
    """The API key for a push to `url`, or UsageError when the push cannot be made as asked: checked before
    anything is written (a refused push wrote its --out file, then exited 2). Plain http is refused except to
    this machine (127.0.0.0/8, ::1, localhost): the key would cross the network in clear."""
    key = os.environ.get(MISP_KEY_ENV, "").strip()
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"--push {url!r} is not an http(s) URL of a MISP instance")
    loopback = parsed.hostname == "localhost" or (
        _family(parsed.hostname) is not None and ipaddress.ip_address(parsed.hostname).is_loopback
    )
    if parsed.scheme == "http" and not loopback:
        raise UsageError(f"--push {url}: plain http would send the API key in clear; use https")
    if not key:
        raise UsageError(f"--push needs the MISP API key in ${MISP_KEY_ENV} (never on the command line)")
    return key


def push_misp(event: dict[str, Any], url: str, verify_tls: bool = True) -> str:
    """Send the event to a MISP instance with PyMISP; the API key comes from $MISP_KEY (push_key)."""
    key = push_key(url)
    try:
        from pymisp import MISPEvent, PyMISP
    except ImportError as exc:
        raise EnvironmentProblem("--push needs PyMISP: pip install 'tracepipe[share]'") from exc
    misp_event_obj = MISPEvent()
    misp_event_obj.load(event)
    try:
        client = PyMISP(url, key, ssl=verify_tls, timeout=30)
        answer = client.add_event(misp_event_obj, pythonify=False)
    except Exception as exc:  # PyMISP raises its own and requests' errors
        raise EnvironmentProblem(f"MISP at {url} refused or did not answer: {exc}") from exc
    if isinstance(answer, dict) and answer.get("errors"):
        raise EnvironmentProblem(f"MISP at {url} refused the event: {answer['errors']}")
    event_id = (answer or {}).get("Event", {}).get("id") if isinstance(answer, dict) else None
    return f"{url} (event {event_id})" if event_id else url


# ---- STIX 2.1 ------------------------------------------------------------------------------------------------


def _stix_time(value: dt.datetime | None) -> str:
    value = to_utc(value) or dt.datetime.now(dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _stable_id(kind: str, *parts: Any) -> str:
    """A STIX object id from what the object describes: the same on every export of the same findings, in the
    UUIDv4 form STIX 2.1 asks of non-SCO ids (stix2-validator --strict): 122 bits of a SHA-256, version 4."""
    digest = hashlib.sha256("|".join([kind, *map(str, parts)]).encode("utf-8", "surrogatepass")).digest()
    return f"{kind}--{uuid.UUID(bytes=digest[:16], version=4)}"


def _sco_id(kind: str, value: str) -> str:
    return f"{kind}--{uuid.uuid5(STIX_SCO_NAMESPACE, json.dumps({'value': value}, separators=(',', ':')))}"


def _pattern(item: Indicator) -> tuple[str, str]:
    """(SCO type, STIX pattern) of an indicator."""
    if item.kind == "domain":
        kind = "domain-name"
    else:
        kind = "ipv6-addr" if _family(item.value) == 6 else "ipv4-addr"
    value = item.value.replace("\\", "\\\\").replace("'", "\\'")
    if item.port is not None and item.kind == "ip":
        return kind, (
            f"[network-traffic:dst_ref.type = '{kind}' AND network-traffic:dst_ref.value = '{value}' "
            f"AND network-traffic:dst_port = {int(item.port)}]"
        )
    return kind, f"[{kind}:value = '{value}']"


def stix_bundle(
    indicators: list[Indicator],
    info: str,
    tlp: str = "amber",
    now: dt.datetime | None = None,
    findings: str = "",
    producer: str = "",
    site: str | None = None,
) -> dict[str, Any]:
    """A STIX 2.1 bundle: the reporting identity (named `site`, its id from `producer`, export), and per
    indicator an indicator, the observed-data of what the site saw (the address as an SCO) and a sighting that
    ties them together."""
    tlp = tlp_level(tlp)
    now = now or dt.datetime.now(dt.UTC)
    stamp = _stix_time(now)
    marking = [STIX_TLP[tlp]]
    # ids from what they describe (_stable_id): the producer, then an indicator's pattern and when it was first
    # seen (its `created`), an observation's and its sighting's times and count. The same finding shared again
    # updates its objects (same id, later `modified`), whatever else is exported with it; a finding first seen at
    # another time, or another site's, is an object of its own (a CSIRT review: one id came out of two incidents
    # with two `created`, and out of every site: STIX 2.1 3.6 forbids both)
    key = findings or info + "|" + "|".join(f"{i.value}|{i.port}" for i in indicators)
    identity_id = _stable_id("identity", producer or "tracepipe site")
    objects: list[dict[str, Any]] = [dict(STIX_TLP2_OBJECTS[tlp])] if tlp in STIX_TLP2_OBJECTS else []
    objects += [
        {
            "type": "identity",
            "spec_version": "2.1",
            "id": identity_id,
            "created": _stix_time(STIX_FIXED_CREATED),
            "modified": _stix_time(STIX_FIXED_CREATED),
            "name": site or "tracepipe site",
            "identity_class": "organization",
            "object_marking_refs": marking,
        }
    ]
    scos: set[str] = set()
    for item in indicators:
        kind, pattern = _pattern(item)
        first = _stix_time(item.first_seen or now)
        last = _stix_time(item.last_seen or item.first_seen or now)
        # (never after `modified`; a domain nothing here saw: one fixed time, as the id is)
        created = _stix_time(min(item.first_seen or STIX_FIXED_CREATED, now))
        indicator_id = _stable_id("indicator", identity_id, pattern, created)
        indicator = {
            "type": "indicator",
            "spec_version": "2.1",
            "id": indicator_id,
            "created": created,
            "modified": stamp,
            "name": item.value if item.port is None else f"{item.value} port {item.port}",
            "description": item.comment or info,
            "indicator_types": [
                "compromised" if item.local else "malicious-activity" if item.detect else "unknown"
            ],
            "pattern": pattern,
            "pattern_type": "stix",
            "valid_from": first,
            "created_by_ref": identity_id,
            "object_marking_refs": marking,
        }
        if not item.for_ids:
            # (MISP's to_ids false: STIX has no such flag, so a label says it, and a VM's address stops meaning
            # anything once its lease is over: valid until it was last seen. A review: --include-local made plain
            # detection indicators of addresses the site's VMs still use, and `intel import` took them as such)
            indicator["labels"] = ["context-only"]
            if item.local and item.last_seen is not None:
                until = max(to_utc(item.last_seen), to_utc(item.first_seen or item.last_seen)) + dt.timedelta(
                    milliseconds=1
                )
                indicator["valid_until"] = _stix_time(until)
        objects.append(indicator)
        if item.first_seen is None:
            # nothing of it was seen here (a domain the input event named: tracepipe has no DNS data): no
            # observed-data, no sighting (one dated now, count 1, claimed an observation nobody made)
            continue
        sco = {
            "type": kind,
            "spec_version": "2.1",
            "id": _sco_id(kind, item.value),
            "value": item.value,
            "object_marking_refs": marking,  # (an SCO imported alone keeps its TLP: a review)
        }
        # one SCO per id (its value): an address shared with and without a port made two objects of one id
        if sco["id"] not in scos:
            scos.add(sco["id"])
            objects.append(sco)
        observed_id = _stable_id("observed-data", identity_id, pattern, first, last, item.count)
        objects.append(
            {
                "type": "observed-data",
                "spec_version": "2.1",
                "id": observed_id,
                "created": created,
                "modified": stamp,
                "first_observed": first,
                "last_observed": last,
                "number_observed": max(1, item.count),
                "object_refs": [sco["id"]],
                "created_by_ref": identity_id,
                "object_marking_refs": marking,
            }
        )
        objects.append(
            {
                "type": "sighting",
                "spec_version": "2.1",
                "id": _stable_id("sighting", identity_id, pattern, first, last, item.count),
                "created": created,
                "modified": stamp,
                "first_seen": first,
                "last_seen": last,
                "count": max(1, item.count),
                "sighting_of_ref": indicator_id,
                "observed_data_refs": [observed_id],
                "where_sighted_refs": [identity_id],
                "created_by_ref": identity_id,
                "object_marking_refs": marking,
            }
        )
    bundle_id = _stable_id("bundle", identity_id, key)
    return {"type": "bundle", "id": bundle_id, "objects": objects}


# ---- the command ---------------------------------------------------------------------------------------------


def export(
    fmt: str,
    source: Path,
    lake: Lake | None = None,
    out: Path | None = None,
    include_local: bool = False,
    tlp: str = "amber",
    distribution: int = 0,
    info: str | None = None,
    push: str | None = None,
    site: str | None = None,
    force: bool = False,
) -> ShareResult:
    """`tracepipe export misp|stix SOURCE`: SOURCE is an incident package folder (or its trace.json), or a
    file of alert ids (then `lake` is read). Writes `out` (replaced atomically) when given: an existing file only
    with `force`. `site`: the producer's name (the STIX identity; with the findings, what ids derive from)."""
    from tracepipe.fsutil import write_atomic

    if fmt not in ("misp", "stix"):
        raise UsageError(f"unknown export format {fmt!r}: misp or stix")
    if push and fmt != "misp":
        raise UsageError("--push sends MISP events only: use `tracepipe export misp ... --push URL`")
    if push:
        push_key(push)
    tlp = tlp_level(tlp)
    site = clean(site.strip()) if site and site.strip() else None
    if out is not None and Path(out).exists() and not force:
        raise UsageError(f"--out {out} exists; give --force to replace it")
    source = Path(source)
    notes: list[str] = []
    if source.is_dir() or source.name == "trace.json":
        indicators, meta = indicators_from_package(source)
        title = info or f"tracepipe trace of {Path(str(meta.get('source') or 'observations')).name}"
        notes += meta["notes"]
    else:
        if lake is None:
            raise UsageError("an alert id list needs the lake (--lake)")
        indicators, meta = indicators_from_alerts(lake, source)
        title = info or "tracepipe alerts ({} indicators)"  # (counted once the local ones are left out)
        if meta.get("missing_alerts"):
            notes.append(
                f"{len(meta['missing_alerts'])} alert ids not in the lake: {', '.join(meta['missing_alerts'][:5])}"
            )
        for victim in meta["victims_not_shared"]:
            notes.append(
                f"{victim['peer']} of {victim['detector']} alert {victim['alert_id']}: the VM's target, not shared"
            )
    kept, left_out = select(indicators, include_local)
    title = title.replace("({} indicators)", f"({len(kept)} indicators)") if not info else title
    # text, not bytes: a file name or --info that is not UTF-8 (lone surrogates) shown as visible escapes, as
    # the printer does (the event's uuid5 of the title failed with UnicodeEncodeError: exit 4)
    title = clean(title)
    if left_out:
        notes.append(
            f"{left_out} local addresses (VMs, private ranges) left out (--include-local to share them)"
        )
    findings = str(meta.get("findings") or "")
    # the producer the ids derive from: the site's name, else its lake's own id (trace.json carries it), else
    # this package alone (one of before site ids: its objects are its own)
    site_id = meta.get("site_id")
    producer = f"site|{site}" if site else f"lake|{site_id}" if site_id else f"package|{findings}"
    if not site:
        notes.append(
            "no --site (or $TRACEPIPE_SITE): the producer is named 'tracepipe site'; name your site so that "
            "receivers can tell your findings from others'"
        )
    if fmt == "misp":
        document = misp_event(kept, title, tlp, distribution, findings=findings, producer=producer)
    else:
        document = stix_bundle(kept, title, tlp, findings=findings, producer=producer, site=site)
    result = ShareResult(fmt, document, len(kept), left_out, notes=notes)
    if out is not None:
        if lake is not None and Path(out).resolve().is_relative_to(lake.root.resolve()):
            raise UsageError(f"--out {out} is inside the lake; write the export elsewhere")
        try:
            write_atomic(Path(out), json.dumps(document, indent=1) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from exc
        result.path = Path(out)
    if push:
        result.pushed_to = push_misp(document, push)
    return result
