"""Alerts + lake -> one self-contained HTML report (opens offline) and a JSON report with the same facts.

Per alert: who (VM, project, owner, hypervisor, lifecycle state incl. deleted/quarantined), why (the reason and
the features that stood out), evidence (top peers and ports of the host in the alert window, the detector's
evidence rows, syslog lines from inside the VM, a timeline of the host's flows with the alert window marked).
Charts are altair specs rendered to inline SVG by vl-convert (no network, no script in the page). Everything
that comes from data goes through Jinja2 autoescape; the page also forbids scripts by Content-Security-Policy.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from tracepipe.fsutil import write_atomic
from tracepipe.lake import Lake
from tracepipe.limits import saturating_sum_sql
from tracepipe.maintenance import version_token
from tracepipe.printer import clean
from tracepipe.query import scan_sql

TEMPLATES = Path(__file__).resolve().parent
MAX_CHART_ALERTS = 25  # per-alert timelines rendered; the rest get tables only (keeps big sweeps fast)
MAX_DETAILED_ALERTS = 200  # per-alert flow/syslog look-ups; beyond, who and why only (strongest alerts first)
TOP_N = 8
TIMELINE_BINS = 96
# the service side of a flow: the lower of the two ports (replies carry the client's ephemeral port as dst);
# ICMP keeps type/code in dst_port
SERVICE_PORT = "CASE WHEN proto IN (6, 17) AND src_port < dst_port THEN src_port ELSE dst_port END"

_DETECTOR_LABELS = {
    "horizontal_scan": "Horizontal scan",
    "vertical_scan": "Vertical (port) scan",
    "brute_force": "SSH/RDP brute force",
    "beacon": "Beaconing",
    "exfiltration": "Data exfiltration",
    "long_connection": "Long-lived connection",
    "mining": "Crypto-mining pool",
    "intel": "Threat-intelligence match",
    "anomaly": "Anomaly model",
}


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _iso(value: dt.datetime | None) -> str | None:
    value = _utc(value)
    return value.isoformat().replace("+00:00", "Z") if value else None


def _loads(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text  # not JSON: shown as text, escaped like everything else


# ---- facts from the lake ------------------------------------------------------------------------------------


def _connect(lake: Lake) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    return con


def _rows(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]


def _has(lake: Lake, dataset: str) -> bool:
    """Whether the table's log lists a file (each query checks the files it reads: scan_sql)."""
    return bool(lake.entries(dataset))


# the hive `date` partition column lets DuckDB skip the files of other days (flows are partitioned by ts_start)
IN_WINDOW = (
    "date >= CAST(CAST($start AS TIMESTAMPTZ) AS DATE) AND date <= CAST(CAST($end AS TIMESTAMPTZ) AS DATE) "
    "AND ts_start >= $start AND ts_start < $end"
)


def _source(lake: Lake, dataset: str) -> str:
    """The dataset's current files (from the table's log) as a DuckDB relation."""
    return f"({scan_sql(dataset, lake.entries(dataset))})"


def _flows_source(lake: Lake, start: dt.datetime, end: dt.datetime) -> str:
    """The flows files of the UTC days start..end only, those IN_WINDOW's `date` bounds let through: the same
    rows as every file's, without listing the rest of the history on each query."""
    first, last = start.astimezone(dt.UTC).date(), end.astimezone(dt.UTC).date()
    days = [(first + dt.timedelta(days=d)).isoformat() for d in range((last - first).days + 1)]
    return f"({scan_sql('flows', lake.entries('flows', days))})"


def _alerts_flow_facts(
    con: duckdb.DuckDBPyConnection,
    lake: Lake,
    targets: list[tuple[int, str, str | None, dt.datetime, dt.datetime]],
    start: dt.datetime,
    end: dt.datetime,
    bin_s: int,
) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Per alert (index, host, peer, window start, end): its host's top peers (the alert's own peer first) and
    service ports (either end) in the alert's window, and the host's timeline over the report's window (the
    alert's own, for an alert outside it). One
    read of the flows for every alert: the flows that touch an alert's host are kept once (a temporary table),
    then grouped per alert. Three queries per alert each read the whole window before (flows x alerts: 2.9 s of
    a 13 s nightly at 1.5 M flows, ~1,000 s at 10^8 flows and 50 alerts; performance review, session 38)."""
    if not targets:
        return {}
    low = min([start, *(t[3] for t in targets)])
    high = max([end, *(t[4] for t in targets)])
    con.register(
        "_alert_hosts",
        pa.table(
            {
                "idx": pa.array([t[0] for t in targets], pa.int64()),
                "host": pa.array([t[1] for t in targets], pa.string()),
                "apeer": pa.array([t[2] or "" for t in targets], pa.string()),
                "w0": pa.array([t[3] for t in targets], pa.timestamp("us", tz="UTC")),
                "w1": pa.array([t[4] for t in targets], pa.timestamp("us", tz="UTC")),
                # the timeline's span: the report's window, or the alert's own when it lies outside it (an
                # earlier window a sweep swept again for late flows: its alerts had an empty timeline)
                "t0": pa.array(
                    [start if t[4] > start and t[3] < end else t[3] for t in targets],
                    pa.timestamp("us", tz="UTC"),
                ),
                "t1": pa.array(
                    [end if t[4] > start and t[3] < end else t[4] for t in targets],
                    pa.timestamp("us", tz="UTC"),
                ),
            }
        ),
    )
    # each flow that touches an alert's host, from that host's side (a flow between two alert hosts: once each;
    # one from a host to itself: once, as outbound)
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _seen AS
        WITH f AS (SELECT ts_start, ts_end, src_addr, dst_addr, src_port, dst_port, proto, bytes
                   FROM {_flows_source(lake, low, high)} WHERE {IN_WINDOW}),
        hosts AS (SELECT DISTINCT host FROM _alert_hosts)
        SELECT h.host, f.*, true AS outbound, f.dst_addr AS other FROM f JOIN hosts h ON f.src_addr = h.host
        UNION ALL
        SELECT h.host, f.*, false AS outbound, f.src_addr AS other FROM f JOIN hosts h
            ON f.dst_addr = h.host AND f.src_addr <> h.host""",
        {"start": low, "end": high},
    )
    in_alert = "s.host = a.host AND s.ts_start >= a.w0 AND s.ts_start < a.w1"
    peers = _rows(
        con.execute(
            f"""SELECT * FROM (
                SELECT a.idx, s.other AS peer, count(*) AS flows,
                       {saturating_sum_sql("CASE WHEN s.outbound THEN s.bytes ELSE 0 END")} AS bytes_out,
                       {saturating_sum_sql("CASE WHEN s.outbound THEN 0 ELSE s.bytes END")} AS bytes_in,
                       count(DISTINCT {SERVICE_PORT}) AS ports, min(s.ts_start) AS first_seen,
                       max(s.ts_end) AS last_seen, a.apeer
                FROM _seen s JOIN _alert_hosts a ON {in_alert} GROUP BY a.idx, s.other, a.apeer)
            QUALIFY row_number() OVER (
                PARTITION BY idx ORDER BY (peer = apeer) DESC, flows DESC, bytes_out DESC, peer) <= {TOP_N}
            ORDER BY idx, (peer = apeer) DESC, flows DESC, bytes_out DESC, peer"""
        )
    )
    ports = _rows(
        con.execute(
            f"""SELECT * FROM (
                SELECT a.idx, {SERVICE_PORT} AS port, proto, count(*) AS flows,
                       {saturating_sum_sql("s.bytes")} AS bytes, count(DISTINCT s.other) AS peers
                FROM _seen s JOIN _alert_hosts a ON {in_alert} GROUP BY ALL)
            QUALIFY row_number() OVER (PARTITION BY idx ORDER BY flows DESC, bytes DESC, port, proto) <= {TOP_N}
            ORDER BY idx, flows DESC, bytes DESC, port, proto"""
        )
    )
    timeline = _rows(
        con.execute(
            f"""SELECT a.idx, to_timestamp(floor(epoch(s.ts_start) / {bin_s}) * {bin_s}) AS t,
                   CASE WHEN s.outbound THEN 'outbound' ELSE 'inbound' END AS direction,
                   count(*) AS flows, {saturating_sum_sql("s.bytes")} AS bytes
            FROM _seen s JOIN _alert_hosts a ON s.host = a.host AND s.ts_start >= a.t0 AND s.ts_start < a.t1
            GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"""
        )
    )
    con.execute("DROP TABLE _seen")
    con.unregister("_alert_hosts")
    out: dict[int, dict[str, list[dict[str, Any]]]] = {
        t[0]: {"top_peers": [], "top_ports": [], "timeline": []} for t in targets
    }
    for row in peers:
        index = row.pop("idx")
        row.pop("apeer")
        row["first_seen"], row["last_seen"] = _iso(row["first_seen"]), _iso(row["last_seen"])
        out[index]["top_peers"].append(row)
    for row in ports:
        out[row.pop("idx")]["top_ports"].append(row)
    for r in timeline:
        out[r["idx"]]["timeline"].append(
            {"t": _iso(r["t"]), "direction": r["direction"], "flows": r["flows"], "bytes": r["bytes"]}
        )
    return out


def _traffic_rows(
    con: duckdb.DuckDBPyConnection, lake: Lake, start: dt.datetime, end: dt.datetime, bin_s: int
) -> list[dict[str, Any]]:
    rows = _rows(
        con.execute(
            f"""SELECT to_timestamp(floor(epoch(ts_start) / {bin_s}) * {bin_s}) AS t,
                   CASE WHEN ip_version = 6 THEN 'IPv6' ELSE 'IPv4' END AS family,
                   count(*) AS flows, {saturating_sum_sql("bytes")} AS bytes
            FROM {_flows_source(lake, start, end)} WHERE {IN_WINDOW} GROUP BY 1, 2 ORDER BY 1""",
            {"start": start, "end": end},
        )
    )
    return [
        {"t": _iso(r["t"]), "family": r["family"], "flows": r["flows"], "mbytes": round(r["bytes"] / 1e6, 3)}
        for r in rows
    ]


def _vm_facts(lake: Lake, vm_ids: Iterable[str | None]) -> dict[str, dict[str, Any]]:
    """vms rows of the VMs the alerts name, by vm_id: only theirs are read (correlate.vm_keys.vms_rows)."""
    if not _has(lake, "vms"):
        return {}
    from tracepipe.correlate.vm_keys import vms_rows

    return {row["vm_id"]: row for row in vms_rows(lake, vm_ids).to_pylist()}


def _vm_logs(
    con: duckdb.DuckDBPyConnection,
    lake: Lake,
    vm_id: str | None,
    addr: str | None,
    start: dt.datetime,
    end: dt.datetime,
    limit: int = 12,
) -> list[dict[str, Any]]:
    """Syslog lines from inside the alerted VM, or lines elsewhere that name the alerted address (sshd)."""
    if not _has(lake, "vm_logs"):
        return []
    rows = _rows(
        con.execute(
            f"""SELECT ts, hostname, app, message, auth_event, auth_user, auth_src_addr
            FROM {_source(lake, "vm_logs")}
            WHERE ts >= $start AND ts < $end
              AND (vm_id = $vm OR auth_src_addr = $addr)
            ORDER BY (auth_event IS NULL), ts, source, line LIMIT {limit}""",
            {"vm": vm_id or "", "addr": addr or "", "start": start, "end": end},
        )
    )
    for row in rows:
        row["ts"] = _iso(row["ts"])
    return rows


# ---- charts -------------------------------------------------------------------------------------------------


def _svg(spec: Any) -> Markup:
    """Vega-Lite spec (altair chart or dict) -> inline SVG. vl-convert renders data text as escaped SVG text."""
    import vl_convert

    if not isinstance(spec, dict):
        spec = spec.to_dict(validate=False)
    svg = vl_convert.vegalite_to_svg(spec)
    # the XML prolog is not allowed inside HTML; the <svg> element itself is
    return Markup(svg[svg.index("<svg") :])


def _overview_charts(
    alerts: list[dict[str, Any]], traffic: list[dict[str, Any]], window: tuple[str, str]
) -> dict[str, Markup]:
    import altair as alt

    charts: dict[str, Markup] = {}
    counts: dict[str, int] = {}
    for alert in alerts:
        counts[alert["detector_label"]] = counts.get(alert["detector_label"], 0) + 1
    if counts:
        data = alt.Data(values=[{"detector": k, "alerts": v} for k, v in sorted(counts.items())])
        bar = (
            alt.Chart(data)
            .mark_bar(color="#b9472c")
            .encode(
                x=alt.X("alerts:Q", title="alerts", axis=alt.Axis(tickMinStep=1, format="d")),
                y=alt.Y("detector:N", title=None, sort="-x"),
            )
            .properties(width=360, height=max(40, 26 * len(counts)), title="Alerts by detector")
        )
        charts["by_detector"] = _svg(bar)
    if traffic:
        data = alt.Data(values=traffic)
        area = (
            alt.Chart(data)
            .mark_area(opacity=0.8)
            .encode(
                x=alt.X(
                    "t:T",
                    title="time (UTC)",
                    scale=alt.Scale(domain=list(window)),
                    axis=alt.Axis(format="%H:%M"),
                ),
                y=alt.Y("mbytes:Q", title="MB per bin", stack=True),
                color=alt.Color("family:N", title=None, scale=alt.Scale(range=["#2f6690", "#7fb069"])),
            )
            .properties(width=620, height=180, title="Traffic over time (all flows)")
        )
        charts["traffic"] = _svg(area)
    return charts


@functools.cache
def _timeline_spec(window: tuple[str, str]) -> str:
    """The per-alert timeline as a Vega-Lite spec over two named datasets, built (and validated) once per
    report: altair's schema validation costs more than rendering, so alerts only fill in the data."""
    import altair as alt

    shade = (
        alt.Chart(alt.NamedData("alert_window"))
        .mark_rect(color="#f2c14e", opacity=0.35)
        .encode(x="start:T", x2="end:T")
    )
    bars = (
        alt.Chart(alt.NamedData("flows"))
        .mark_bar()
        .encode(
            x=alt.X(
                "t:T", title="time (UTC)", scale=alt.Scale(domain=list(window)), axis=alt.Axis(format="%H:%M")
            ),
            y=alt.Y("flows:Q", title="flows per bin", stack=True),
            color=alt.Color(
                "direction:N",
                title=None,
                scale=alt.Scale(domain=["outbound", "inbound"], range=["#b9472c", "#2f6690"]),
            ),
        )
    )
    chart = alt.layer(shade, bars).properties(
        width=620, height=150, title="This host's flows; shaded: the alert window"
    )
    return json.dumps(chart.to_dict())


def _timeline_chart(
    rows: list[dict[str, Any]], alert_window: tuple[str, str], window: tuple[str, str]
) -> Markup:
    spec = json.loads(_timeline_spec(window))
    spec["datasets"] = {"alert_window": [{"start": alert_window[0], "end": alert_window[1]}], "flows": rows}
    return _svg(spec)


# ---- the report ---------------------------------------------------------------------------------------------


def _lifecycle(alert: dict[str, Any], vm: dict[str, Any] | None) -> dict[str, Any]:
    status = alert.get("vm_status") or (vm or {}).get("status")
    quarantine = _utc(alert.get("quarantine_until") or (vm or {}).get("quarantine_until"))
    label = {
        "soft_deleted": "deleted by its owner, image in quarantine (restorable, keep for forensics)",
        "deleted": "deleted (only the lifecycle record remains)",
        "purged": "purged",
        "active": "running",
        "stopped": "stopped",
    }.get(status or "", status or "unknown")
    if status == "soft_deleted" and quarantine:
        label += f" until {_iso(quarantine)}"
    return {
        "status": status,
        "label": label,
        "quarantine_until": _iso(quarantine),
        "gone": status in ("soft_deleted", "deleted", "purged"),
        "created_at": _iso((vm or {}).get("created_at")),
        "deleted_at": _iso((vm or {}).get("deleted_at")),
        "cloud": (vm or {}).get("cloud"),
    }


def _standout(features: Any) -> tuple[list[tuple[str, Any]], Any]:
    """Feature dict -> (scalar rows to show as a table, anything else to show as JSON text)."""
    if not isinstance(features, dict):
        return [], features
    rows = [(k, v) for k, v in features.items() if not isinstance(v, dict | list)]
    rest = {k: v for k, v in features.items() if isinstance(v, dict | list)}
    return rows, (rest or None)


def _evidence_tables(evidence: Any) -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
    """Detector evidence -> (key/value facts, list of tables {name, columns, rows})."""
    facts: list[tuple[str, Any]] = []
    tables: list[dict[str, Any]] = []

    def table(name: str, rows: list[Any]) -> None:
        rows = [r for r in rows if isinstance(r, dict)][:20]
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        tables.append({"name": name, "columns": columns, "rows": [[r.get(c) for c in columns] for r in rows]})

    if isinstance(evidence, list):
        table("evidence", evidence)
    elif isinstance(evidence, dict):
        for key, value in evidence.items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                table(key, value)
            else:
                facts.append((key, value if not isinstance(value, dict | list) else json.dumps(value)))
    elif evidence is not None:
        facts.append(("evidence", evidence))
    return facts, tables


def build_report_data(
    lake: Lake,
    alerts: pa.Table,
    title: str,
    window: tuple[dt.datetime, dt.datetime],
    suppressed: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything the report shows, as JSON-able data (this is also the JSON report). `suppressed`: what
    allowlists and declared science peers kept out of the alerts, each with its why."""
    start, end = _utc(window[0]), _utc(window[1])
    span = max((end - start).total_seconds(), 60.0)
    bin_s = max(60, int(span / TIMELINE_BINS) // 60 * 60)
    vms = _vm_facts(lake, alerts.column("vm_id").to_pylist() if "vm_id" in alerts.column_names else [])
    has_flows = _has(lake, "flows")
    con = _connect(lake)
    rows = sorted(
        alerts.to_pylist(),
        key=lambda r: (-(r.get("score") or 0.0), r.get("detector") or "", r.get("addr") or ""),
    )
    out_alerts = []
    targets: list[tuple[int, str, str | None, dt.datetime, dt.datetime]] = []
    for index, row in enumerate(rows):
        w0, w1 = _utc(row.get("window_start")), _utc(row.get("window_end"))
        detailed = index < MAX_DETAILED_ALERTS
        vm = vms.get(row.get("vm_id") or "")
        features = _loads(row.get("features"))
        evidence = _loads(row.get("evidence"))
        item = {
            "alert_id": row.get("alert_id"),
            "detector": row.get("detector"),
            "detector_label": _DETECTOR_LABELS.get(row.get("detector") or "", row.get("detector")),
            "score": row.get("score"),
            "reason": row.get("reason"),
            "addr": row.get("addr"),
            "peer": row.get("peer"),
            "window_start": _iso(w0),
            "window_end": _iso(w1),
            "who": {
                "vm_id": row.get("vm_id"),
                "vm_name": row.get("vm_name"),
                "project": row.get("project"),
                "user": row.get("user"),
                "hypervisor": row.get("hypervisor"),
                "image": (vm or {}).get("image"),  # what the VM runs now (vms), not frozen into the alert
                "lifecycle": _lifecycle(row, vm),
            },
            "features": features,
            "evidence": evidence,
            "pipeline": row.get("pipeline"),
            "created_at": _iso(row.get("created_at")),
            "top_peers": [],
            "top_ports": [],
            "logs": [],
            "timeline": [],
        }
        if detailed and has_flows and row.get("addr") and w0 and w1:
            targets.append((index, row["addr"], row.get("peer"), w0, w1))
        if detailed and w0 and w1:
            item["logs"] = _vm_logs(
                con, lake, row.get("vm_id"), row.get("addr"), min(w0, start), max(w1, end)
            )
        out_alerts.append(item)
    for index, facts in _alerts_flow_facts(con, lake, targets, start, end, bin_s).items():
        out_alerts[index].update(facts)
    by_detector: dict[str, int] = {}
    for item in out_alerts:
        by_detector[item["detector"] or "?"] = by_detector.get(item["detector"] or "?", 0) + 1
    traffic = _traffic_rows(con, lake, start, end, bin_s) if has_flows else []
    totals = {
        "flows": sum(r["flows"] for r in traffic),
        "mbytes": round(sum(r["mbytes"] for r in traffic), 1),
    }
    con.close()
    return {
        "title": title,
        "window": {"start": _iso(start), "end": _iso(end)},
        "generated_at": _iso(dt.datetime.now(dt.UTC)),
        # the table versions this report read: `tracepipe sql --as-of <lake_version>` sees the same rows
        "lake_version": version_token(lake.versions()),
        "summary": {
            "alerts": len(out_alerts),
            "by_detector": by_detector,
            "hosts": len({a["addr"] for a in out_alerts}),
            "vms_gone": sorted(
                {a["who"]["vm_name"] or "?" for a in out_alerts if a["who"]["lifecycle"]["gone"]}
            ),
            "traffic": totals,
            "bin_seconds": bin_s,
        },
        "traffic": traffic,
        "alerts": out_alerts,
        "suppressed": [
            {**row, "window_start": _iso(_utc(row.get("window_start")))} for row in (suppressed or [])
        ],
    }


def render_html(data: dict[str, Any]) -> str:
    """Report data -> one HTML page (charts inline as SVG)."""
    window = (data["window"]["start"], data["window"]["end"])
    charts = _overview_charts(data["alerts"], data["traffic"], window)
    alert_views = []
    for index, alert in enumerate(data["alerts"]):
        feature_rows, feature_rest = _standout(alert["features"])
        facts, tables = _evidence_tables(alert["evidence"])
        timeline = None
        if alert["timeline"] and index < MAX_CHART_ALERTS:
            timeline = _timeline_chart(
                alert["timeline"], (alert["window_start"], alert["window_end"]), window
            )
        alert_views.append(
            {
                **alert,
                "feature_rows": feature_rows,
                "feature_rest": json.dumps(feature_rest, indent=1) if feature_rest else None,
                "evidence_facts": facts,
                "evidence_tables": tables,
                "timeline_svg": timeline,
                "anchor": f"alert-{index + 1}",
            }
        )
    env = template_environment()
    return env.get_template("report.html.j2").render(data=data, charts=charts, alerts=alert_views)


def template_environment() -> Environment:
    """The Jinja2 environment of every tracepipe page (the sweep report, the incident package): templates
    from tracepipe/report/, autoescape on, the number/bytes/cell filters."""
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_shown,
    )
    env.filters["num"] = _num
    env.filters["bytes"] = _bytes
    env.filters["cell"] = _cell
    return env


def _shown(value: Any) -> Any:
    """Every value a page shows, as the console shows it (printer.clean): control, bidi and invisible format
    characters from data (a VM or user name with U+202E or ESC) escaped as text (\\u202e), so that a name cannot
    reverse or hide the rest of an alert's line. HTML the page makes itself (Markup: charts) is left alone."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return clean(value)
    return value


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


_TS_TEXT = re.compile(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d")


def _cell(value: Any) -> str:
    """Evidence cell text: timestamps to the second, file paths to their name (the full path is the tooltip)."""
    if value is None:
        return ""
    text = str(value)
    if _TS_TEXT.match(text):
        return text[:19].replace("T", " ")
    if "/" in text and len(text) > 32:
        return text.rsplit("/", 1)[-1]
    return text


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    return str(value)


def _file_stem(window: tuple[dt.datetime, dt.datetime], name: str = "") -> str:
    """report-[<pipeline>-]<start>-<end>: two pipelines writing into one folder keep their own reports (the
    nightly report of 218 alerts was replaced by another pipeline's of one, SOC review). The name is the
    pipeline's own (a file name's characters only, pipeline_config)."""
    start, end = _utc(window[0]), _utc(window[1])
    return f"report-{name + '-' if name else ''}{start:%Y%m%dT%H%M}-{end:%Y%m%dT%H%M}"


def render_report(
    lake: Lake,
    alerts: pa.Table,
    out_dir: Path,
    title: str,
    window: tuple[dt.datetime, dt.datetime],
    suppressed: list[dict[str, Any]] | None = None,
    name: str = "",
) -> dict[str, Path]:
    """Write `report-[<name>-]<start>-<end>.html` and `.json` into `out_dir` (`name`: the sweep's pipeline);
    returns {"html": path, "json": path}. Atomic: each file is replaced with tracepipe.fsutil.write_atomic."""
    data = build_report_data(lake, alerts, title, window, suppressed)
    html = render_html(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _file_stem(window, name)
    paths = {"html": out_dir / f"{stem}.html", "json": out_dir / f"{stem}.json"}
    for kind, text in (("html", html), ("json", json.dumps(data, indent=1, default=str))):
        write_atomic(paths[kind], text)
    return paths
