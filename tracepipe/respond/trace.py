"""Observations (address, port, peer, time) -> who held each address then, and what that VM did: the answer a
Security Service Challenge asks for, for all observations at once.

One DuckDB session over the lake's public views (vm_leases, _vm_info, vms, flows_attributed, vm_logs): the
observations are one table, joined to the leases on (address, interval) and to the flows on (address, window),
so 1,000 observations cost a few scans, not 1,000 `who` calls. A flow belongs to a window it reaches into (a
session that began before it counts; limits.MAX_FLOW_DURATION bounds how far back). Observations that ask the
same question (address, port, peer, holders) have their windows merged first, so overlapping windows never
count a flow twice and the work follows the flows, not observations x flows. Answers state what is ambiguous
(nobody held the address, it never was the cloud's, a floating IP, several holders in the range) and never
guess. VMs that the observations do not lead to (other tenants talking to the same peers) appear only with
include_spread.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from tracepipe.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL
from tracepipe.lake import Lake
from tracepipe.limits import MAX_FLOW_DURATION
from tracepipe.maintenance import version_token
from tracepipe.printer import clean
from tracepipe.query import FLOW_END, after_reclaim, connect, coverage, flows_note, lifecycle_note, vm_now
from tracepipe.report.html import SERVICE_PORT
from tracepipe.respond.observations import Observations

MAX_CONNECTIONS = 500  # per VM, biggest first: the package stays readable; the CSV has every evidence flow
MAX_LOGS = 200  # VM log lines per VM
MAX_LOG_BYTES = 64 * 1024  # ... and their text per VM: lines after that are counted, not copied
LOG_TEXT_CHARS = 2048  # one log field in the package; the lake keeps the whole line (limits.line_bytes)
MAX_EVIDENCE = 200_000  # matching flow rows kept as evidence, in observation order
MAX_EVIDENCE_PER_OBS = 50_000  # ... per observation, its earliest: one busy address does not take all
MAX_LISTED = 50  # peers and ports listed per answer (the lowest)
# a VM's connections, biggest first, then by every key of the group: the same package from the same lake (an in
# and an out row of one peer with equal bytes came out in either order, and either could be the 500th kept)
_CONNECTION_ORDER = "bytes DESC, flows DESC, peer, direction, proto, port NULLS FIRST, peer_in_cloud"
TIMELINE_BINS = 48

# Which flows reach into a window [w_start, w_end): query.FLOW_END, the rule `who` answers by too. FLOW_SCAN
# bounds every scan of flows_attributed by the whole trace's span: partitions by day, row groups by their
# statistics.
_FLOW_END = FLOW_END
_FLOW_SCAN = """f."date" BETWEEN $first_day AND $last_day AND f.ts_start >= $flows_from AND f.ts_start < $span_end
  AND f.ts_end >= $span_start"""
# ... into span `s` of _islands (below), and not into the span before it: each flow once, however many windows
_IN_SPAN = f"""f.ts_start < s.i_end AND {_FLOW_END} >= s.i_start
     AND (s.prev_end IS NULL OR f.ts_start >= s.prev_end)"""


def _islands(source: str, group: str, start: str, end: str) -> str:
    """SQL: the intervals [start, end] of `source` merged per `group` into disjoint islands (an interval that
    begins at or before the reach of the earlier ones joins their island): group columns, i_start, i_end, and
    prev_end, the end of the group's island before (NULL for the first). Something that reaches into an island
    and not into the one before it is counted there once, however many intervals overlapped."""
    return f"""
    SELECT {group}, min({start}) AS i_start, max({end}) AS i_end,
           lag(max({end})) OVER (PARTITION BY {group} ORDER BY min({start})) AS prev_end
    FROM (
        SELECT *, sum(CAST(coalesce({start} > reach, true) AS INTEGER))
                      OVER (PARTITION BY {group} ORDER BY {start}, {end} ROWS UNBOUNDED PRECEDING) AS island
        FROM (
            SELECT {group}, {start}, {end},
                   max({end}) OVER (PARTITION BY {group} ORDER BY {start}, {end}
                                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS reach
            FROM {source}))
    GROUP BY {group}, island"""


# the lease(s) valid at some instant of each observation's range, with what the VM is now
_HOLDERS_SQL = """
CREATE TEMP TABLE _holders AS
SELECT o.obs, l.addr, l.vm_id, coalesce(v.vm_name, l.vm_name) AS vm_name, coalesce(v.project, l.project) AS project,
       coalesce(v."user", l."user") AS "user", coalesce(v.hypervisor, l.hypervisor) AS hypervisor,
       coalesce(x.cloud, l.cloud) AS cloud, l.addr_kind, l.valid_from, l.valid_to, l.end_reason,
       coalesce(v.status, l.vm_status) AS vm_status, x.created_at, v.deleted_at,
       coalesce(v.quarantine_until, l.quarantine_until) AS quarantine_until, v.image
FROM _obs o
JOIN vm_leases l ON l.addr = o.address AND l.valid_from <= o."end" AND (l.valid_to IS NULL OR o.start < l.valid_to)
LEFT JOIN _vm_info v ON v.vm_id = l.vm_id
LEFT JOIN vms x ON x.vm_id = l.vm_id
"""

# what the cloud knows of each address around the observation: ever leased, the lease just before and after,
# and leases of other VMs within the window (flows of those are left out: another tenant's)
_ADDRESS_FACTS_SQL = """
SELECT o.obs,
       count(l.addr) AS leases_ever,
       max(l.valid_to) FILTER (WHERE l.valid_to <= o.start) AS held_until_before,
       arg_max(l.end_reason, l.valid_to) FILTER (WHERE l.valid_to <= o.start) AS end_reason_before,
       min(l.valid_from) FILTER (WHERE l.valid_from > o."end") AS held_again_from,
       count(l.addr) FILTER (WHERE l.valid_from < o.w_end AND (l.valid_to IS NULL OR o.w_start < l.valid_to)
                             AND NOT list_contains(o.holder_ids, l.vm_id)) AS other_holders_in_window
FROM _obs o LEFT JOIN vm_leases l ON l.addr = o.address
GROUP BY o.obs ORDER BY o.obs
"""

# A question is what matching depends on: (address, port, peer, holders); observations that ask the same one
# differ only in their windows, merged here into disjoint spans
_QUESTIONS_SQL = f"""
CREATE OR REPLACE TEMP TABLE _obs AS
SELECT o.*, coalesce(h.ids, []) AS holder_ids,
       dense_rank() OVER (ORDER BY o.address, o.port NULLS FIRST, o.peer NULLS FIRST, coalesce(h.ids, [])) AS q
FROM _obs o LEFT JOIN (SELECT obs, list(DISTINCT vm_id ORDER BY vm_id) AS ids FROM _holders GROUP BY obs) h USING (obs);
CREATE TEMP TABLE _questions AS
SELECT q, any_value(address) AS address, any_value(port) AS port, any_value(peer) AS peer,
       any_value(holder_ids) AS holder_ids
FROM _obs GROUP BY q;
CREATE TEMP TABLE _spans AS
SELECT s.*, x.address, x.port, x.peer, x.holder_ids
FROM ({_islands("_obs", "q", "w_start", "w_end")}) s JOIN _questions x USING (q);
"""


def _matching(side: str) -> str:
    """SQL: the flows whose `side` end is the observed address, that reach into a span of its question and fit
    its port, peer and holders (the observed end's VM is a holder, or nobody when nobody held it), each once per
    question (in the first span it reaches into): the question, where the observed end is, the other end, and
    every flow column."""
    other = "dst" if side == "src" else "src"
    return f"""
    SELECT s.q, {side == "src"} AS observed_is_src, {_FLOW_END} AS flow_end, f.{other}_addr AS remote,
           f.{other}_port AS remote_port, f.{other}_vm AS remote_vm, f.*
    FROM flows_attributed f JOIN _spans s ON f.{side}_addr = s.address AND {_IN_SPAN}
    WHERE {_FLOW_SCAN}
      AND (s.port IS NULL OR f.src_port = s.port OR f.dst_port = s.port)
      AND (s.peer IS NULL OR f.{other}_addr = s.peer)
      AND (CASE WHEN len(s.holder_ids) = 0 THEN f.{side}_vm IS NULL ELSE list_contains(s.holder_ids, f.{side}_vm) END)"""


# The matching flows of each question, once each: one pass over the flows of the trace's span. What follows
# reads this table, not the flows: its size follows the flows that match, never observations x flows (the pairs
# went into a table, ~70 columns each: 3.8 GB for 100,000 observations of a 14,000-flow lake).
_QUESTION_FLOWS_SQL = f"""
CREATE TEMP TABLE _question_flows AS
{_matching("src")}
UNION ALL
{_matching("dst")}
"""

# per observation: its question's flows that reach into its window (one pass over the pairs, nothing kept)
_OBS_STATS_SQL = """
CREATE TEMP TABLE _obs_stats AS
SELECT o.obs, count(*) AS flows, sum(k.bytes) AS bytes, min(k.ts_start) AS first_seen, max(k.ts_end) AS last_seen
FROM _question_flows k JOIN _obs o ON k.q = o.q AND k.ts_start < o.w_end AND k.flow_end >= o.w_start
GROUP BY o.obs
"""


def _distinct_per_obs(value: str, where: str = "true") -> str:
    """SQL: (obs, value) once for each distinct `value` among an observation's matching flows. The flows of a
    (question, value) merged into islands of time, an observation takes the first island that reaches into its
    window: no (observation, flow) pair is held, and 10,000 observations of a scanner cost 10,000 x its peers,
    not x its flows."""
    source = f"(SELECT q, {value} AS value, ts_start, flow_end FROM _question_flows WHERE {where})"
    return f"""
    SELECT o.obs, i.value
    FROM ({_islands(source, "q, value", "ts_start", "flow_end")}) i JOIN _obs o
      ON i.q = o.q AND i.i_start < o.w_end AND i.i_end >= o.w_start
     AND (i.prev_end IS NULL OR i.prev_end < o.w_start)"""


_PEERS_PORTS_SQL = f"""
SELECT coalesce(p.obs, r.obs) AS obs, p.peers, r.ports
FROM (SELECT obs, min(value, {MAX_LISTED}) AS peers FROM ({_distinct_per_obs("remote")}) GROUP BY obs) p
FULL JOIN (SELECT obs, min(value, {MAX_LISTED}) AS ports
           FROM ({_distinct_per_obs("remote_port", "remote_port IS NOT NULL")}) GROUP BY obs) r USING (obs)
"""

# How many of the cloud's VMs exchanged flows with each outside end a holder reached on its observation's port
# (that end's own port), from a day (COMMON_SPAN) before the trace's span to a day after: the export shares such
# an end as a C&C, and one that 20 VMs use on 443 is a service of the site's users, not one (a CSIRT review: four
# such went out with to_ids; within a 10-minute window two of them met 1 and 3 VMs, over the day 25 and 29)
COMMON_SPAN = dt.timedelta(days=1)
_COMMON_SQL = f"""
WITH wanted AS (
    SELECT DISTINCT k.remote AS addr, k.remote_port AS port
    FROM _question_flows k JOIN _questions x USING (q)
    WHERE x.port IS NOT NULL AND len(x.holder_ids) > 0 AND k.remote_vm IS NULL AND k.remote_port = x.port),
talk AS (
    SELECT w.addr, w.port, f.src_vm AS vm FROM flows_attributed f JOIN wanted w
      ON f.dst_addr = w.addr AND f.dst_port = w.port
    WHERE {_FLOW_SCAN} AND f.src_vm IS NOT NULL
    UNION ALL
    SELECT w.addr, w.port, f.dst_vm FROM flows_attributed f JOIN wanted w
      ON f.src_addr = w.addr AND f.src_port = w.port
    WHERE {_FLOW_SCAN} AND f.dst_vm IS NOT NULL)
SELECT addr AS address, port, count(DISTINCT vm) AS vms FROM talk GROUP BY addr, port ORDER BY addr, port
"""

# the cloud's VMs on the other end of the matching flows of addresses nobody in the cloud held then: they
# contacted the observed address
_CONTACTS_SQL = f"""
CREATE TEMP TABLE _contacts AS
{_distinct_per_obs("remote_vm", "remote_vm IS NOT NULL AND q IN (SELECT q FROM _questions WHERE len(holder_ids) = 0)")}
"""


# The evidence: one row per (observation, matching flow) with every flow column, in observation order, for the
# observations up to $last_obs (the first whose rows fill $total) and of each its earliest $per_obs (`until`:
# the per_obs-th ts_start, looked for only where there are more; flows of that same instant come too)
_EVIDENCE_SQL = """
SELECT o.obs, k.* EXCLUDE (q, flow_end, remote, remote_port, remote_vm)
FROM _question_flows k JOIN (
    SELECT o.*, c.until FROM _obs o LEFT JOIN (
        SELECT o.obs, list_last(min(k.ts_start, $per_obs)) AS until
        FROM _question_flows k JOIN _obs o ON k.q = o.q AND k.ts_start < o.w_end AND k.flow_end >= o.w_start
        WHERE o.obs IN (SELECT obs FROM _obs_stats WHERE obs <= $last_obs AND flows > $per_obs)
        GROUP BY o.obs) c USING (obs)
    WHERE o.obs <= $last_obs) o
  ON k.q = o.q AND k.ts_start < o.w_end AND k.flow_end >= o.w_start AND (o.until IS NULL OR k.ts_start <= o.until)
ORDER BY o.obs, k.ts_start, k.ts_end, k.src_addr, k.src_port, k.dst_addr, k.dst_port, k.proto, k.bytes,
         k.packets, k.exporter, k.source LIMIT $total
"""


# every flow of each VM found that reaches into the windows of the observations that led to it, merged per VM
# (a flow once per VM and direction, however many windows overlap)
_VM_FLOWS_SQL = f"""
CREATE TEMP TABLE _vm_flows AS
SELECT s.vm_id, true AS outbound, f.dst_addr AS peer, f.dst_vm AS peer_vm, f.proto, {SERVICE_PORT} AS port,
       f.ts_start, f.bytes, f.packets
FROM flows_attributed f JOIN _vm_spans s
  ON f.src_vm = s.vm_id AND {_IN_SPAN}
WHERE {_FLOW_SCAN}
UNION ALL
SELECT s.vm_id, false, f.src_addr, f.src_vm, f.proto, {SERVICE_PORT}, f.ts_start, f.bytes, f.packets
FROM flows_attributed f JOIN _vm_spans s
  ON f.dst_vm = s.vm_id AND {_IN_SPAN}
WHERE {_FLOW_SCAN}
"""


def _cut(column: str) -> str:
    """SQL: a text column of a VM's log line as the package shows it, LOG_TEXT_CHARS at most (the VM writes it:
    100 lines of 1 MB made a 100 MB page)."""
    return (
        f"CASE WHEN length({column}) > {LOG_TEXT_CHARS} THEN left({column}, {LOG_TEXT_CHARS}) || ' … ' || "
        f"(strlen({column}) - strlen(left({column}, {LOG_TEXT_CHARS}))) || ' bytes more' ELSE {column} END"
    )


@dataclass
class TraceResult:
    """Answers per observation, facts per VM found, the evidence flows (Arrow) and how the input went.
    Exit code 0 when every observation was answered ("nobody held it" is an answer), 3 when some input lines
    were rejected, 4 when none could be read."""

    observations: list[dict[str, Any]]
    vms: list[dict[str, Any]]
    evidence: pa.Table
    lake_version: str
    window: dt.timedelta
    include_spread: bool
    input_format: str = ""
    source: str = ""
    rejects: list[dict[str, Any]] = field(default_factory=list)
    domains: list[dict[str, Any]] = field(default_factory=list)
    destinations: list[dict[str, Any]] = field(default_factory=list)  # (address, port, vms: _COMMON_SQL)
    package_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    site_id: str | None = None
    generated_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    seconds: float = 0.0
    package: dict[str, Any] = field(default_factory=dict)  # kind -> path of the written package files

    @property
    def exit_code(self) -> int:
        if not self.observations:
            return EXIT_FAILED
        return EXIT_PARTIAL if self.rejects else EXIT_OK

    @property
    def summary(self) -> dict[str, int]:
        answers = self.observations
        return {
            "observations": len(answers),
            "held": sum(1 for a in answers if a["holders"]),
            "not_held": sum(1 for a in answers if not a["holders"] and a["in_cloud"]),
            "outside_cloud": sum(1 for a in answers if not a["in_cloud"]),
            "vms": len(self.vms),
            "evidence_flows": self.evidence.num_rows,
            "rejects": len(self.rejects),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": clean(self.source),  # (a file name that is not UTF-8: its bytes as visible escapes)
            "input_format": self.input_format,
            "generated_at": self.generated_at,
            "lake_version": self.lake_version,
            "window_seconds": self.window.total_seconds(),
            "include_spread": self.include_spread,
            "summary": self.summary,
            "observations": self.observations,
            "vms": self.vms,
            "rejects": self.rejects,
            "domains": self.domains,
            # (what the exports' ids derive from: a package's own, never another's, share.py)
            "package_id": self.package_id,
            "site_id": self.site_id,  # (the lake's: Lake.site_id)
            # (outside ends reached on an observation's port: how many VMs of the cloud did, share.py)
            "destinations": self.destinations,
            "seconds": round(self.seconds, 3),
            "package": {kind: clean(path) for kind, path in self.package.items()},
            "exit_code": self.exit_code,
        }


def _rows(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _arrow(relation: duckdb.DuckDBPyRelation) -> pa.Table:
    # duckdb >= 1.4 names it to_arrow_table; older releases arrow()
    fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
    table = fetch()
    return table.read_all() if isinstance(table, pa.RecordBatchReader) else table


def _ambiguities(answer: dict[str, Any], facts: dict[str, Any], matched: int) -> list[str]:
    """What the answer cannot say for sure, in words. Never a guess."""
    notes = []
    holders = answer["holders"]
    if not facts["leases_ever"]:
        notes.append(
            "outside the cloud: no VM ever held this address (not a cloud address, or its lifecycle records "
            "were never ingested); VMs that exchanged flows with it are listed as contacts"
        )
    elif not holders:
        before = facts["held_until_before"]
        after = facts["held_again_from"]
        text = "no holder: no VM held this address then"
        if before:
            text += f"; the last lease ended {before:%Y-%m-%d %H:%M:%S} UTC ({facts['end_reason_before']})"
        if after:
            text += f"; the next began {after:%Y-%m-%d %H:%M:%S} UTC"
        notes.append(text)
    if len({h["vm_id"] for h in holders}) > 1:
        notes.append(
            f"{len({h['vm_id'] for h in holders})} VMs held this address during the observed range: "
            "each is named with its lease; narrow the time to tell them apart"
        )
    for holder in holders:
        if after_reclaim(holder, answer["start"]):
            notes.append(
                f"{holder['vm_name'] or holder['vm_id']} was soft-deleted and its quarantine ended "
                f"{holder['quarantine_until']:%Y-%m-%d %H:%M} UTC, before this time, with no delete recorded: the "
                "cloud reclaimed it then and may have released the address (its lease is still open in the records)"
            )
        if holder["addr_kind"] == "floating":
            notes.append(
                f"floating IP (NAT): {answer['address']} was mapped to VM {holder['vm_name']}; its traffic may "
                "be exported under the VM's fixed address, which its connections include"
            )
    if facts["other_holders_in_window"]:
        notes.append(
            f"the address changed hands within the ±window ({facts['other_holders_in_window']} other lease(s)): "
            "flows while another VM held it are left out"
        )
    if holders and not matched:
        notes.append(
            "no flow in the lake matches (address, port, peer, time): the exporters may not see this path "
            "(NAT, another site), or the flows were not ingested"
        )
    return notes


def _lease_view(holder: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    return {
        "vm_id": holder["vm_id"],
        "vm_name": holder["vm_name"],
        "project": holder["project"],
        "user": holder["user"],
        "hypervisor": holder["hypervisor"],
        "image": holder["image"],
        "cloud": holder["cloud"],
        "addr_kind": holder["addr_kind"],
        "valid_from": holder["valid_from"],
        "valid_to": holder["valid_to"],
        "end_reason": holder["end_reason"],
        "vm_status": holder["vm_status"],
        "deleted_at": holder["deleted_at"],
        "quarantine_until": holder["quarantine_until"],
        "image_kept": bool(holder["quarantine_until"] and holder["quarantine_until"] > now),
        "now": vm_now(holder["vm_status"], holder["deleted_at"], holder["quarantine_until"], now),
    }


def trace(
    lake: Lake,
    observations: Observations,
    window: dt.timedelta = dt.timedelta(hours=1),
    include_spread: bool = False,
    threads: int | None = None,
    max_evidence: int = MAX_EVIDENCE,
    max_evidence_per_obs: int = MAX_EVIDENCE_PER_OBS,
) -> TraceResult:
    """Answer every observation (see the module docstring). Reads one snapshot of the lake; writes nothing.
    The evidence holds up to `max_evidence` (observation, flow) rows, `max_evidence_per_obs` per observation."""
    import time

    started = time.perf_counter()
    lake = lake.snapshot()
    now = dt.datetime.now(dt.UTC)
    obs = observations.table
    result = TraceResult(
        observations=[],
        vms=[],
        evidence=pa.table({}),
        lake_version=version_token(lake.versions()),
        window=window,
        include_spread=include_spread,
        input_format=observations.format,
        source=observations.source,
        rejects=observations.rejects,
        domains=observations.domains,
        site_id=lake.site_id(),
    )
    if obs.num_rows == 0:
        return result
    lake.require()  # (an empty directory too, which connect takes as a lake before its first ingest: a lake's
    # mount point not mounted answered every observation "outside the cloud", exit 0)
    con = connect(lake, read_only=False, threads=threads)
    # Joins as written: flows on the left (probed), the small side on the right (hashed). A flows view reads a
    # schema anchor of 0 rows first (query.scan_sql), so DuckDB estimates every flows scan at 0 rows and hashed
    # the flows instead: all flows of the span in memory (a month of 4.6 M flows, 1,000 observations: 19.8 GB)
    con.execute("SET disabled_optimizers = 'join_order,build_side_probe_side'")
    try:
        _load_observations(con, obs, window)
        ((span_start, span_end),) = con.execute("SELECT min(w_start), max(w_end) FROM _obs").fetchall()
        scan = {
            "first_day": (span_start - MAX_FLOW_DURATION).date(),
            "last_day": span_end.date(),
            "flows_from": span_start - MAX_FLOW_DURATION,
            "span_start": span_start,
            "span_end": span_end,
        }
        con.execute(_HOLDERS_SQL)
        con.execute(_QUESTIONS_SQL)
        holders = _rows(con.execute("SELECT * FROM _holders ORDER BY obs, valid_from"))
        facts = {row["obs"]: row for row in _rows(con.execute(_ADDRESS_FACTS_SQL))}
        con.execute(_QUESTION_FLOWS_SQL, scan)
        con.execute(_OBS_STATS_SQL)
        match_stats = {row["obs"]: row for row in _rows(con.execute("SELECT * FROM _obs_stats"))}
        for row in _rows(con.execute(_PEERS_PORTS_SQL)):
            match_stats[row["obs"]].update(peers=row["peers"], ports=row["ports"])
        ((last_obs,),) = con.execute(
            """SELECT coalesce(min(obs) FILTER (WHERE upto >= $total), max(obs), 0) FROM (
                   SELECT obs, sum(least(flows, $per_obs)) OVER (ORDER BY obs ROWS UNBOUNDED PRECEDING) AS upto
                   FROM _obs_stats)""",
            {"total": max_evidence, "per_obs": max_evidence_per_obs},
        ).fetchall()
        wide = {  # (how common a destination is: the day before the trace's span to the day after)
            "first_day": (span_start - COMMON_SPAN - MAX_FLOW_DURATION).date(),
            "last_day": (span_end + COMMON_SPAN).date(),
            "flows_from": span_start - COMMON_SPAN - MAX_FLOW_DURATION,
            "span_start": span_start - COMMON_SPAN,
            "span_end": span_end + COMMON_SPAN,
        }
        result.destinations = _rows(con.execute(_COMMON_SQL, wide))
        evidence = _arrow(
            con.sql(
                _EVIDENCE_SQL,
                params={"last_obs": last_obs, "per_obs": max_evidence_per_obs, "total": max_evidence},
            )
        )
        # VMs the observations lead to: the holders, and for addresses nobody in the cloud held, the cloud's
        # VMs on the other end of the matching flows (they contacted the observed address)
        con.execute(_CONTACTS_SQL)
        con.execute(
            f"""CREATE TEMP TABLE _vm_windows AS
                SELECT h.vm_id, o.obs, 'holder' AS role, o.w_start, o.w_end FROM _holders h JOIN _obs o USING (obs)
                UNION
                SELECT c.value, o.obs, 'contact', o.w_start, o.w_end FROM _contacts c JOIN _obs o USING (obs);
                CREATE TEMP TABLE _vm_spans AS {_islands("_vm_windows", "vm_id", "w_start", "w_end")}"""
        )
        contacts = {
            row["obs"]: row["vms"]
            for row in _rows(
                con.execute("SELECT obs, list(value ORDER BY value) AS vms FROM _contacts GROUP BY obs")
            )
        }
        vms = _vm_facts(con, scan, include_spread, now)
        evidence = _privacy_filter(evidence, {v["vm_id"] for v in vms}, include_spread)
    finally:
        con.close()
    covered = coverage(lake)
    by_obs: dict[int, list[dict[str, Any]]] = {}
    for holder in holders:
        by_obs.setdefault(holder["obs"], []).append(holder)
    for row in obs.to_pylist():
        number = row["obs"]
        stats = match_stats.get(number) or {}
        answer = {
            **row,
            "window_start": row["start"] - window,
            "window_end": row["end"] + window,
            "holders": [_lease_view(h, now) for h in by_obs.get(number, [])],
            "in_cloud": bool(facts[number]["leases_ever"]),
            "contacts": contacts.get(number, []),
            "matching_flows": stats.get("flows", 0),
            "matching_bytes": stats.get("bytes") or 0,
            "first_seen": stats.get("first_seen"),
            "last_seen": stats.get("last_seen"),
            "peers": stats.get("peers") or [],  # (the lowest MAX_LISTED, sorted)
            "ports": stats.get("ports") or [],
        }
        answer["ambiguities"] = _ambiguities(answer, facts[number], answer["matching_flows"])
        # (what the lake cannot say of that time: before its lifecycle records, outside its flows)
        known = lifecycle_note(covered, answer["window_start"]) if not answer["holders"] else None
        unseen = flows_note(covered, answer["window_start"], answer["window_end"])
        if known:  # (not "no VM held it": none is on record, and the records do not reach back that far)
            answer["ambiguities"] = [
                a.replace("no holder: no VM held this address then", "no holder on record")
                for a in answer["ambiguities"]
            ]
        answer["ambiguities"] += [n for n in (known, unseen) if n]
        result.observations.append(answer)
    result.vms = vms
    result.evidence = evidence
    result.seconds = time.perf_counter() - started
    return result


def _load_observations(con: duckdb.DuckDBPyConnection, obs: pa.Table, window: dt.timedelta) -> None:
    con.register("_obs_in", obs)
    con.execute(
        'CREATE TEMP TABLE _obs AS SELECT *, start - $w AS w_start, "end" + $w AS w_end FROM _obs_in',
        {"w": window},
    )
    con.unregister("_obs_in")


def _vm_facts(
    con: duckdb.DuckDBPyConnection, scan: dict[str, Any], include_spread: bool, now: dt.datetime
) -> list[dict[str, Any]]:
    """Per VM found: who it is and what became of it, its connections, timeline and logs in the windows, the
    owner's and project's other VMs alive then and now, and (opt-in) VMs that talked to the same peers."""
    vms = _rows(
        con.execute(
            """SELECT w.vm_id, list(DISTINCT w.obs ORDER BY w.obs) AS observations,
                      list(DISTINCT w.role ORDER BY w.role) AS roles,
                      min(w.w_start) AS first_window, max(w.w_end) AS last_window,
                      any_value(v.vm_name) AS vm_name, any_value(v.project) AS project,
                      any_value(v."user") AS "user", any_value(v.hypervisor) AS hypervisor,
                      any_value(v.status) AS status, any_value(v.deleted_at) AS deleted_at,
                      any_value(v.quarantine_until) AS quarantine_until, any_value(x.cloud) AS cloud,
                      any_value(x.created_at) AS created_at, any_value(v.image) AS image
               FROM _vm_windows w LEFT JOIN _vm_info v USING (vm_id) LEFT JOIN vms x USING (vm_id)
               GROUP BY w.vm_id ORDER BY min(w.obs), w.vm_id"""
        )
    )
    if not vms:
        return []
    con.execute(_VM_FLOWS_SQL, scan)
    totals = {
        r["vm_id"]: r
        for r in _rows(
            con.execute(
                """SELECT vm_id, count(*) AS flows, count(*) FILTER (WHERE outbound) AS flows_out,
                          coalesce(sum(bytes) FILTER (WHERE outbound), 0) AS bytes_out,
                          coalesce(sum(bytes) FILTER (WHERE NOT outbound), 0) AS bytes_in,
                          count(DISTINCT peer) AS peers FROM _vm_flows GROUP BY vm_id"""
            )
        )
    }
    connections: dict[str, list[dict[str, Any]]] = {}
    for row in _rows(
        con.execute(
            f"""SELECT * FROM (
                  SELECT vm_id, CASE WHEN outbound THEN 'out' ELSE 'in' END AS direction, peer,
                         peer_vm IS NOT NULL AS peer_in_cloud, proto, port, count(*) AS flows,
                         sum(packets) AS packets, sum(bytes) AS bytes, min(ts_start) AS first_seen,
                         max(ts_start) AS last_seen
                  FROM _vm_flows GROUP BY ALL)
                QUALIFY row_number() OVER (PARTITION BY vm_id ORDER BY {_CONNECTION_ORDER}) <= {MAX_CONNECTIONS}
                ORDER BY vm_id, {_CONNECTION_ORDER}"""
        )
    ):
        connections.setdefault(row.pop("vm_id"), []).append(row)
    timelines: dict[str, list[dict[str, Any]]] = {}
    for row in _rows(
        con.execute(
            f"""WITH span AS (SELECT vm_id, min(w_start) AS first,
                                     greatest(60, epoch(max(w_end) - min(w_start)) / {TIMELINE_BINS}) AS bin
                              FROM _vm_windows GROUP BY vm_id)
                -- (a flow that began before the first window is drawn where the windows begin)
                SELECT f.vm_id, to_timestamp(floor(epoch(greatest(f.ts_start, s.first)) / s.bin) * s.bin) AS t,
                       CASE WHEN f.outbound THEN 'outbound' ELSE 'inbound' END AS direction,
                       count(*) AS flows, sum(f.bytes) AS bytes
                FROM _vm_flows f JOIN span s USING (vm_id) GROUP BY ALL ORDER BY 1, 2"""
        )
    ):
        timelines.setdefault(row.pop("vm_id"), []).append(row)
    # the VM's log lines in its windows as the package shows them: each text cut, MAX_LOGS lines and about
    # MAX_LOG_BYTES of text at most (the rest counted in logs_left_out; the lake keeps every line whole)
    logs: dict[str, list[dict[str, Any]]] = {}
    logs_total: dict[str, int] = {}
    for row in _rows(
        con.execute(
            f"""SELECT * EXCLUDE (n, upto) FROM (
                  SELECT *, row_number() OVER w AS n, count(*) OVER (PARTITION BY vm_id) AS total,
                         sum(strlen(coalesce(hostname, '')) + strlen(coalesce(app, ''))
                             + strlen(coalesce(auth_user, '')) + strlen(coalesce(message, ''))) OVER w AS upto
                  FROM (SELECT l.vm_id, l.ts, {_cut("l.hostname")} AS hostname, {_cut("l.app")} AS app,
                               l.auth_event, {_cut("l.auth_user")} AS auth_user, l.auth_src_addr,
                               {_cut("l.message")} AS message, l.source, l.line
                        FROM vm_logs l SEMI JOIN _vm_spans s
                          ON l.vm_id = s.vm_id AND l.ts >= s.i_start AND l.ts < s.i_end)
                  WINDOW w AS (PARTITION BY vm_id ORDER BY ts, line ROWS UNBOUNDED PRECEDING))
                WHERE n <= {MAX_LOGS} AND (n = 1 OR upto <= {MAX_LOG_BYTES})
                ORDER BY vm_id, ts, line"""
        )
    ):
        logs_total[row["vm_id"]] = row.pop("total")
        logs.setdefault(row.pop("vm_id"), []).append(row)
    siblings = _siblings(con)
    spread = _spread(con, scan) if include_spread else {}
    for vm in vms:
        vm_id = vm["vm_id"]
        vm["now"] = vm_now(vm["status"], vm["deleted_at"], vm["quarantine_until"], now)
        vm["image_kept"] = bool(vm["quarantine_until"] and vm["quarantine_until"] > now)
        vm["traffic"] = totals.get(
            vm_id, {"flows": 0, "flows_out": 0, "bytes_out": 0, "bytes_in": 0, "peers": 0}
        )
        vm["traffic"].pop("vm_id", None)
        vm["connections"] = connections.get(vm_id, [])
        vm["timeline"] = timelines.get(vm_id, [])
        vm["logs"] = logs.get(vm_id, [])
        vm["logs_left_out"] = logs_total.get(vm_id, 0) - len(vm["logs"])
        vm["owner_vms"] = [s for s in siblings.get(vm_id, []) if s.pop("same_user")]
        vm["project_vms"] = siblings.get(vm_id, [])
        for s in vm["owner_vms"] + vm["project_vms"]:
            s["now"] = vm_now(s["status"], s["deleted_at"], s["quarantine_until"], now)
        vm["project_vms"] = [s for s in vm["project_vms"] if s not in vm["owner_vms"]]
        vm["spread"] = spread.get(vm_id, [])
    return vms


def _siblings(con: duckdb.DuckDBPyConnection) -> dict[str, list[dict[str, Any]]]:
    """The owner's and the project's other VMs alive in the observation windows ("then") or now: what to
    contain. Alive then = a lease overlapping the windows, or created before their end and not deleted before
    their start."""
    rows = _rows(
        con.execute(
            """WITH found AS (
                   SELECT w.vm_id, min(w.w_start) AS w_start, max(w.w_end) AS w_end,
                          any_value(v."user") AS "user", any_value(v.project) AS project
                   FROM _vm_windows w JOIN _vm_info v USING (vm_id) GROUP BY w.vm_id),
               cand AS (  -- two equi-joins: an OR in the join condition would compare every pair
                   SELECT f.vm_id AS found_vm, f.w_start, f.w_end, o.*, true AS same_user
                   FROM found f JOIN _vm_info o ON o."user" = f."user" AND o.vm_id <> f.vm_id
                   UNION ALL
                   SELECT f.vm_id, f.w_start, f.w_end, o.*, false
                   FROM found f JOIN _vm_info o ON o.project = f.project AND o.vm_id <> f.vm_id
                   WHERE o."user" IS DISTINCT FROM f."user")
               SELECT c.found_vm, c.vm_id, c.vm_name, c.project, c."user", c.hypervisor, c.status, c.deleted_at,
                      c.quarantine_until, c.same_user,
                      (count(l.addr) > 0
                        OR (x.created_at <= c.w_end AND (x.deleted_at IS NULL OR x.deleted_at > c.w_start)))
                        AS alive_then,
                      coalesce(c.status, '') NOT IN ('deleted', 'purged') AS alive_now,
                      list(DISTINCT l.addr ORDER BY l.addr) FILTER (WHERE l.addr IS NOT NULL) AS addrs_then
               FROM cand c
               LEFT JOIN vm_leases l ON l.vm_id = c.vm_id AND l.valid_from < c.w_end
                                     AND (l.valid_to IS NULL OR c.w_start < l.valid_to)
               LEFT JOIN vms x ON x.vm_id = c.vm_id
               GROUP BY c.found_vm, c.vm_id, c.vm_name, c.project, c."user", c.hypervisor, c.status,
                        c.deleted_at, c.quarantine_until, c.same_user, c.w_start, c.w_end, x.created_at,
                        x.deleted_at
               HAVING alive_then OR alive_now
               ORDER BY c.found_vm, NOT c.same_user, c.vm_name, c.vm_id"""
        )
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        row["addrs_then"] = row["addrs_then"] or []
        out.setdefault(row.pop("found_vm"), []).append(row)
    return out


def _spread(con: duckdb.DuckDBPyConnection, scan: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Other VMs of the cloud that exchanged flows with the outside peers of a found VM's matching flows,
    anywhere in the trace's time span (opt-in: these are other tenants)."""
    rows = _rows(
        con.execute(
            f"""WITH peers AS (
                   SELECT DISTINCT h.vm_id AS found_vm, k.remote AS peer
                   FROM _question_flows k JOIN (SELECT q, unnest(holder_ids) AS vm_id FROM _questions) h USING (q)
                   WHERE k.remote_vm IS NULL),
               talk AS (
                   SELECT f.src_vm AS vm_id, f.dst_addr AS peer, f.ts_start FROM flows_attributed f
                   WHERE {_FLOW_SCAN} AND {_FLOW_END} >= $span_start
                     AND f.src_vm IS NOT NULL AND f.dst_addr IN (SELECT peer FROM peers)
                   UNION ALL
                   SELECT f.dst_vm, f.src_addr, f.ts_start FROM flows_attributed f
                   WHERE {_FLOW_SCAN} AND {_FLOW_END} >= $span_start
                     AND f.dst_vm IS NOT NULL AND f.src_addr IN (SELECT peer FROM peers))
               SELECT p.found_vm, t.vm_id, any_value(v.vm_name) AS vm_name, any_value(v.project) AS project,
                      any_value(v."user") AS "user", any_value(v.status) AS status,
                      list(DISTINCT t.peer ORDER BY t.peer) AS peers, count(*) AS flows,
                      min(t.ts_start) AS first_seen, max(t.ts_start) AS last_seen
               FROM talk t JOIN peers p ON p.peer = t.peer AND p.found_vm <> t.vm_id
               LEFT JOIN _vm_info v ON v.vm_id = t.vm_id
               GROUP BY p.found_vm, t.vm_id ORDER BY p.found_vm, flows DESC, t.vm_id""",
            scan,
        )
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row.pop("found_vm"), []).append(row)
    return out


# What an evidence row keeps of an end that is another tenant's VM: where it was (address, port) and that it was
# the cloud's. Every other column of that end (src_vm, src_vm_key, src_vm_name, src_project, ... and whatever
# `{end}_` column attribution adds next) is blanked: an allowlist, so a new identity column starts out private
# (a denylist of names left src_vm_key/dst_vm_key, which `tracepipe sql` turns into the VM, in the package).
_PEER_KEPT = ("addr", "port", "in_cloud")


def _privacy_filter(evidence: pa.Table, found: set[str], include_spread: bool) -> pa.Table:
    """Evidence flows name the VM of each end; the end of a VM the observations did not lead to (another
    tenant) keeps its address but loses its identity, unless include_spread. `src_in_cloud`/`dst_in_cloud`
    keep whether an end was the cloud's (exports leave local addresses out by it)."""
    import pyarrow.compute as pc

    if evidence.num_rows == 0:
        return evidence
    for side in ("src", "dst"):
        evidence = evidence.append_column(f"{side}_in_cloud", pc.is_valid(evidence.column(f"{side}_vm")))
    if include_spread:
        return evidence
    for side in ("src", "dst"):
        keep = pc.is_in(evidence.column(f"{side}_vm"), value_set=pa.array(sorted(found), pa.string()))
        keep = pc.fill_null(keep, False)
        kept = {f"{side}_{name}" for name in _PEER_KEPT}
        for index, column in enumerate(evidence.column_names):
            if column.startswith(f"{side}_") and column not in kept:
                values = evidence.column(index)
                evidence = evidence.set_column(
                    index, column, pc.if_else(keep, values, pa.nulls(len(values), values.type))
                )
    return evidence
