"""The `tracepipe` command. Thin: each command parses options, calls one library function, prints.

Exit codes (every command): 0 done · 1 done, and a sweep found new alerts · 2 usage error ·
3 partial: some input was rejected, the rest landed (see the `rejects` dataset) · 4 failed: nothing landed,
or the environment is wrong (lake unwritable, binary missing).
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tracepipe.errors import EXIT_FAILED, TracepipeError
from tracepipe.lake import DEFAULT_LAKE, Lake

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 new alerts found (sweep); 2 usage error; "
    "3 partial: some input rejected, the rest landed; 4 failed: nothing landed or environment wrong."
)

app = typer.Typer(
    name="tracepipe",
    help="NetFlow + cloud VM lifecycle traceability for research clouds.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
ingest_app = typer.Typer(
    help="Land inputs in the lake (NetFlow, VM lifecycle, syslog).", no_args_is_help=True
)
app.add_typer(ingest_app, name="ingest")

console = Console(stderr=True)  # human messages and progress on stderr; data on stdout
out = Console()

_DEBUG = {"on": False}


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


LakeOption = Annotated[
    Path,
    typer.Option("--lake", envvar="TRACEPIPE_LAKE", help="Lake directory.", show_default=True),
]
FormatOption = Annotated[OutputFormat, typer.Option("--format", help="table for people, json for scripts.")]


def open_lake(path: Path | None) -> Lake:
    return Lake(path if path is not None else Path(DEFAULT_LAKE))


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    _DEBUG["on"] = debug


# ---- commands: ingest netflow -------------------------------------------------------------------------------


@ingest_app.command("netflow")
def ingest_netflow_command(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Capture files (pcap/pcapng of export traffic) or nfdump CSV files.", show_default=False
        ),
    ],
    lake: LakeOption = Path(DEFAULT_LAKE),
    output: FormatOption = OutputFormat.table,
) -> None:
    """Land NetFlow v1/v5/v7/v9 and IPFIX records from captures (tcpdump -w, any UDP port) and nfdump CSV.

    Files already in the lake (same content) are skipped. Exit codes: 0 all landed; 3 partial: some input was
    rejected (see the rejects dataset), the rest landed; 4 nothing landed or no usable input.

    Example: tracepipe ingest netflow /var/captures/netflow-*.pcap --lake /srv/lake
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn
    from rich.table import Table

    from tracepipe.ingest.flows import ingest_flow_files

    total = sum(p.stat().st_size for p in paths if p.is_file())
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("ingest netflow", total=total)
        summary = ingest_flow_files(open_lake(lake), paths, progress=lambda n: bar.advance(task, n))
    if output == OutputFormat.json:
        print_json(summary.to_dict())
        raise typer.Exit(summary.exit_code)
    files = Table(title="files")
    for col in ("file", "kind", "status", "datagrams", "flows", "rejects"):
        files.add_column(col, justify="right" if col in ("datagrams", "flows", "rejects") else "left")
    for f in summary.files:
        files.add_row(
            f.path,
            f.kind,
            f.status + (f" ({f.message})" if f.message else ""),
            str(f.datagrams),
            str(f.flows),
            str(f.rejects),
        )
    out.print(files)
    exporters = Table(title="exporters")
    for col in ("exporter", "versions", "datagrams", "flows", "rejects", "sequence gaps", "lost", "sampling"):
        exporters.add_column(col)
    for name, s in sorted(summary.exporters.items()):
        sampling = s.get("sampling", "unknown")
        exporters.add_row(
            name,
            ",".join(str(v) for v in s.get("versions", [])),
            str(s.get("datagrams", 0)),
            str(s.get("flows", 0)),
            str(s.get("rejects", 0)),
            str(s.get("sequence_gaps", 0)),
            str(s.get("lost", 0)),
            "unknown" if sampling == "unknown" else f"1:{sampling}",
        )
    out.print(exporters)
    unknown = [
        name for name, s in sorted(summary.exporters.items()) if s.get("sampling", "unknown") == "unknown"
    ]
    if unknown:
        out.print(
            f"sampling interval unknown for {', '.join(unknown)} (no options template): volumes are "
            "as exported, not scaled"
        )
    out.print(
        f"{len(summary.files)} files, {summary.datagrams} datagrams, {summary.flows} flows, "
        f"{summary.rejects} rejects" + (", flows attributed to VMs" if summary.attributed is True else "")
    )
    if isinstance(summary.attributed, str):
        console.print(f"[yellow]warning:[/yellow] {summary.attributed}")
    raise typer.Exit(summary.exit_code)


# ---- commands: ingest vm / syslog ---------------------------------------------------------------------------


class VmInputFormat(StrEnum):
    auto = "auto"
    nova = "nova"
    neutron = "neutron"
    opennebula = "opennebula"
    csv = "csv"
    jsonl = "jsonl"


OutputOption = Annotated[
    OutputFormat,
    typer.Option(
        "--output", "-o", help="table for people, json for scripts (--format names the INPUT format)."
    ),
]


def _print_vm_report(report: Any, output: OutputFormat, title: str, lake: Path) -> None:
    from rich.table import Table

    if output == OutputFormat.json:
        print_json(report.as_dict())
    else:
        table = Table(title=title)
        for col in ("source", "status", "rows", "rejects"):
            table.add_column(col, justify="right" if col in ("rows", "rejects") else "left")
        for r in report.results:
            table.add_row(
                r.source,
                "skipped (already in the lake)" if r.skipped else "landed",
                str(r.rows),
                str(r.rejects),
            )
        out.print(table)
        summary = f"{report.rows} rows, {report.rejects} rejects, {report.skipped} sources skipped; "
        if report.duplicates:
            summary += f"{report.duplicates} events already in the lake; "
        if report.attributed is not None:
            summary += f"{report.attributed} lines attributed to a VM"
        else:
            summary += f"{report.leases} leases, {report.vms} VMs"
        if report.attribution:
            summary += f"; flows re-attributed for {', '.join(report.touched_days)}"
        out.print(summary)
    if report.rejects:
        console.print(
            f"[yellow]{report.rejects} input lines rejected[/yellow] (the rest landed); list them: "
            f"tracepipe sql \"SELECT * FROM read_parquet('{lake}/rejects/*/*.parquet')\""
        )
    raise typer.Exit(report.exit_code)


@ingest_app.command("vm")
def ingest_vm_command(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Notification dumps, OpenNebula <id>.log (+ <id>.xml), "
            "CSV/JSONL files, or directories of them.",
            show_default=False,
        ),
    ],
    input_format: Annotated[
        VmInputFormat,
        typer.Option("--format", "-f", help="INPUT format; auto guesses from name and content."),
    ] = VmInputFormat.auto,
    cloud: Annotated[
        str | None,
        typer.Option(help="Cloud/site name written to every row (default: openstack, opennebula, generic)."),
    ] = None,
    reclaim_interval: Annotated[
        str | None,
        typer.Option(
            help="Deferred-deletion / image-retention interval (Nova's reclaim_instance_interval), e.g. 7d; "
            "sets quarantine_until. Remembered in the lake."
        ),
    ] = None,
    tz: Annotated[
        str,
        typer.Option("--tz", help="Time zone of OpenNebula logs and CSV times without offset (IANA name)."),
    ] = "UTC",
    lake: LakeOption = Path(DEFAULT_LAKE),
    output: OutputOption = OutputFormat.table,
) -> None:
    """Land VM lifecycle events (Nova/Neutron notifications, OpenNebula logs + XML, CSV/JSONL) and rebuild
    the address leases (who held which address when), then re-attribute flows of the days that changed.

    Exit codes: 0 all landed; 3 partial: some lines were rejected (the rest landed); 4 failed: nothing landed.

    Example: tracepipe ingest vm /var/log/nova/notifications.jsonl --reclaim-interval 7d --lake /srv/lake
    """
    from tracepipe.ingest.vm import ingest_vm_files
    from tracepipe.units import parse_duration

    interval = parse_duration(reclaim_interval) if reclaim_interval else None
    with console.status("ingest vm") as status:
        report = ingest_vm_files(
            open_lake(lake),
            paths,
            fmt=input_format.value,
            cloud=cloud,
            reclaim_interval=interval,
            tz=tz,
            progress=lambda step: status.update(f"ingest vm: {step}"),
        )
    _print_vm_report(report, output, "vm lifecycle sources", lake)


@ingest_app.command("syslog")
def ingest_syslog_command(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Syslog files written inside VMs (RFC 3164/5424, rsyslog formats), or directories of them.",
            show_default=False,
        ),
    ],
    year: Annotated[
        int | None,
        typer.Option(help="Year of RFC 3164 lines (they carry none); default: the file's modification time."),
    ] = None,
    sender_addr: Annotated[
        str | None,
        typer.Option(
            help="Address the lines came from (the VM's address); default: match the hostname to VM names."
        ),
    ] = None,
    tz: Annotated[
        str, typer.Option("--tz", help="Time zone of timestamps without offset (RFC 3164).")
    ] = "UTC",
    lake: LakeOption = Path(DEFAULT_LAKE),
    output: OutputOption = OutputFormat.table,
) -> None:
    """Land syslog from inside VMs in vm_logs, attributed to the VM by sender address (or hostname) and time,
    with sshd logins parsed (auth_event, auth_user, auth_src_addr, auth_method). Ingest the VM lifecycle first.

    Exit codes: 0 all landed; 3 partial: some lines in no known format were rejected; 4 failed: nothing landed.

    Example: tracepipe ingest syslog /var/log/remote/web-01/auth.log --year 2024 --sender-addr 192.168.1.3
    """
    from tracepipe.ingest.vm import ingest_syslog_files

    if sender_addr is not None:
        import ipaddress

        from tracepipe.errors import UsageError

        try:
            sender_addr = str(ipaddress.ip_address(sender_addr))
        except ValueError as exc:
            raise UsageError(f"--sender-addr {sender_addr!r} is not an IP address") from exc
    with console.status("ingest syslog") as status:
        report = ingest_syslog_files(
            open_lake(lake),
            paths,
            year=year,
            sender_addr=sender_addr,
            tz=tz,
            progress=lambda step: status.update(f"ingest syslog: {step}"),
        )
    _print_vm_report(report, output, "syslog sources", lake)


# ---- commands: sql / who / timeline -------------------------------------------------------------------------


class SqlFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


def _cell(value: Any) -> str:
    """Compact text for a table cell: UTC times without microseconds and offset, lists comma-joined."""
    import datetime as dt

    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return (
            f"{value.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S}" if value.tzinfo else f"{value:%Y-%m-%d %H:%M:%S}"
        )
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def _data_console() -> Console:
    """stdout for tables: the terminal's width, or wide enough not to squash columns when piped."""
    return out if out.is_terminal else Console(width=240)


def _print_relation(relation: Any, max_rows: int = 1000, title: str | None = None) -> None:
    """A DuckDB result as a rich table on stdout (first max_rows rows)."""
    from rich.table import Table

    if relation is None:
        return
    table = Table(title=title)
    for name in relation.columns:
        table.add_column(name)
    rows = relation.limit(max_rows + 1).fetchall()
    for row in rows[:max_rows]:
        table.add_row(*(_cell(v) for v in row))
    _data_console().print(table)
    if len(rows) > max_rows:
        console.print(f"(first {max_rows} rows shown; use --max-rows, or --format csv/json/parquet for all)")


def _print_rows(rows: list[dict[str, Any]], title: str, columns: list[str] | None = None) -> None:
    from rich.table import Table

    if not rows:
        out.print(f"[dim]{title}: none[/dim]")
        return
    columns = columns or list(rows[0])
    table = Table(title=title)
    for name in columns:
        table.add_column(name)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    _data_console().print(table)


@app.command("sql")
def sql_command(
    query: Annotated[
        str | None, typer.Argument(help="SQL text; '-' reads it from stdin.", show_default=False)
    ] = None,
    file: Annotated[Path | None, typer.Option("-f", "--file", help="Read the SQL from this file.")] = None,
    fmt: Annotated[
        SqlFormat, typer.Option("--format", help="table, csv, json, or parquet (with --output).")
    ] = SqlFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the result here (parquet).")
    ] = None,
    shell: Annotated[bool, typer.Option("--shell", help="Interactive session with the same views.")] = False,
    max_rows: Annotated[int, typer.Option("--max-rows", help="Rows shown by --format table.")] = 1000,
    lake: LakeOption = Path(DEFAULT_LAKE),
    engine: Annotated[
        str,
        typer.Option(
            "--engine", help="duckdb, or spark (the same SQL, transpiled; needs tracepipe[spark] and Java)."
        ),
    ] = "duckdb",
    spark_master: Annotated[
        str | None,
        typer.Option(
            "--spark-master", help="Spark master: local[*], yarn, k8s://https://host:443, spark://..."
        ),
    ] = None,
    spark_conf: Annotated[
        list[str] | None, typer.Option("--spark-conf", help="Spark conf key=value (repeatable).")
    ] = None,
) -> None:
    """Run read-only DuckDB SQL over the lake (or the same SQL on Spark with --engine spark).

    Views: flows, flows_attributed, vm_events, vm_leases, vms, vm_logs, intel, alerts, rejects. Macros:
    who_had(addr, ts), cidr_contains(cidr, addr), ip_to_num(addr), ip_between(addr, lo, hi).
    Only queries run (SELECT, WITH, DESCRIBE, SUMMARIZE, EXPLAIN): COPY, CREATE, INSERT, DELETE, ATTACH, SET
    ... are refused with exit code 2.

    Example: tracepipe sql "SELECT src_project, sum(bytes) FROM flows_attributed GROUP BY 1 ORDER BY 2 DESC"
    """
    from tracepipe import query as q
    from tracepipe.errors import UsageError

    lake_ = open_lake(lake)
    if shell:
        q.shell(
            lake_,
            lambda r: (
                console.print(f"[red]{r}[/red]") if isinstance(r, Exception) else _print_relation(r, max_rows)
            ),
        )
        return
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read {file}: {exc}") from exc
    elif query == "-" or (query is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
    elif query is not None:
        text = query
    else:
        raise UsageError("give a query, -f FILE, '-' for stdin, or --shell")
    if engine != "duckdb":
        from tracepipe.engines import engine_relation, parse_conf

        relation = engine_relation(
            lake_, text, engine, spark_master=spark_master, spark_conf=parse_conf(spark_conf)
        )
    else:
        con = q.connect(lake_)
        relation = q.run_read_only(con, text)
    if relation is None:
        return
    if fmt == SqlFormat.table:
        _print_relation(relation, max_rows)
        return
    text_out = q.export_result(relation, fmt.value, output)
    if text_out is not None:
        if output is not None:
            output.write_text(text_out, encoding="utf-8")
        else:
            sys.stdout.write(text_out)


@app.command("who")
def who_command(
    addr: Annotated[str, typer.Argument(help="IPv4 or IPv6 address.", show_default=False)],
    at: Annotated[str, typer.Option("--at", help="ISO 8601 (Z or offset; none = UTC) or epoch seconds.")],
    window: Annotated[
        str, typer.Option("--window", help="Flow summary over TIME ± this (30m, 1h, 2d).")
    ] = "1h",
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Which VM held ADDR at TIME, whose it is, what became of it, and what the address did around then.

    Deleted and soft-deleted (quarantined) VMs included. "nobody held ADDR" is an answer: exit code 0.

    Example: tracepipe who 192.168.1.3 --at 2024-03-12T07:45:00Z --window 30m
    """
    from tracepipe import query as q

    answer = q.who(open_lake(lake), addr, q.parse_time(at), q.parse_duration(window))
    if output == OutputFormat.json:
        print_json(answer)
        return
    screen = _data_console()
    at_text = f"{answer['at']:%Y-%m-%d %H:%M:%S} UTC"
    if not answer["held"]:
        screen.print(f"nobody held {answer['addr']} at {at_text}")
        for key, label in (("previous_lease", "before"), ("next_lease", "after")):
            lease = answer[key]
            if lease:
                screen.print(
                    f"  {label}: {lease['vm_name'] or ''} ({lease['vm_id']}) held it "
                    f"{lease['valid_from']:%Y-%m-%d %H:%M:%S} - "
                    f"{'now' if lease['valid_to'] is None else format(lease['valid_to'], '%Y-%m-%d %H:%M:%S')}"
                )
    for lease in answer["leases"]:
        until = "still held" if lease["valid_to"] is None else f"{lease['valid_to']:%Y-%m-%d %H:%M:%S} UTC"
        screen.print(f"[bold]{answer['addr']}[/bold] at {at_text} was held by")
        screen.print(f"  VM          {lease['vm_name'] or '?'} ({lease['vm_id']})")
        screen.print(f"  project     {lease['project'] or '?'}")
        screen.print(f"  user        {lease['user'] or '?'}")
        screen.print(
            f"  hypervisor  {lease['hypervisor'] or '?'}   cloud {lease['cloud'] or '?'}   "
            f"address {lease['addr_kind'] or '?'}"
        )
        screen.print(
            f"  lease       {lease['valid_from']:%Y-%m-%d %H:%M:%S} UTC -> {until}"
            + (f" ({lease['end_reason']})" if lease["end_reason"] else "")
        )
        screen.print(f"  VM now      {lease['now']}")
    flows = answer["flows"]
    screen.print(
        f"flows of {answer['addr']} {flows['from']:%Y-%m-%d %H:%M} - {flows['to']:%H:%M} UTC: "
        f"{flows['flows']} flows ({flows['flows_out']} out, {flows['flows_in']} in), {flows['bytes']} bytes, "
        f"{flows['peers']} peers"
    )
    _print_rows(flows["top_peers"], "top peers", ["peer", "flows", "bytes"])
    _print_rows(flows["top_ports"], "top destination ports", ["proto", "port", "flows", "bytes"])


@app.command("timeline")
def timeline_command(
    vm: Annotated[
        str, typer.Argument(help="vm_id, or a VM name that only one VM carries.", show_default=False)
    ],
    limit: Annotated[int, typer.Option("--limit", help="At most this many rows per section.")] = 200,
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Everything known about one VM: what it is now, lifecycle events, leases, flows per hour, VM logs.

    Example: tracepipe timeline web-01
    """
    from tracepipe import query as q

    answer = q.timeline(open_lake(lake), vm, limit)
    if output == OutputFormat.json:
        print_json(answer)
        return
    screen = _data_console()
    info = answer["vm"]
    screen.print(
        f"[bold]{info['vm_name'] or '?'}[/bold] ({answer['vm_id']}) project {info['project'] or '?'}, "
        f"user {info['user'] or '?'}, hypervisor {info['hypervisor'] or '?'}: {info['now']}"
    )
    _print_rows(answer["events"], "lifecycle", ["ts", "action", "state", "event_type", "addrs", "addr"])
    _print_rows(answer["leases"], "leases", ["addr", "addr_kind", "valid_from", "valid_to", "end_reason"])
    _print_rows(answer["flows_per_hour"], "flows per hour")
    _print_rows(
        answer["logs"], "VM logs", ["ts", "app", "auth_event", "auth_user", "auth_src_addr", "message"]
    )


@app.command("attribute")
def attribute_command(
    day: Annotated[
        list[str] | None, typer.Option("--day", help="UTC day YYYY-MM-DD (repeatable); default all.")
    ] = None,
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Set src_vm/dst_vm in the flow files from the current leases (ingest does this by itself; use it after
    editing leases by hand or to repair a lake). Idempotent.

    Example: tracepipe attribute --day 2024-03-12 --day 2024-03-13
    """
    import datetime as dt

    from rich.progress import BarColumn, MofNCompleteColumn, Progress

    from tracepipe.attribution import attribute_flows
    from tracepipe.errors import UsageError

    for text in day or []:
        try:
            dt.date.fromisoformat(text)
        except ValueError:
            raise UsageError(f"--day {text!r} is not a date: give YYYY-MM-DD") from None
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("attribute flows", total=None)
        summary = attribute_flows(
            open_lake(lake),
            day or None,
            progress=lambda _path, done, total: bar.update(task, completed=done, total=total),
        )
    if output == OutputFormat.json:
        print_json(summary)
        return
    out.print(
        f"{summary['rows']} flows in {summary['files']} files: {summary['src_attributed']} sources and "
        f"{summary['dst_attributed']} destinations attributed to a VM ({summary['seconds']} s)"
    )


# ---- commands: collect --------------------------------------------------------------------------------------


@app.command("collect")
def collect_command(
    listen: Annotated[
        list[str],
        typer.Option("--listen", help="HOST:PORT to receive on; repeat for more. [::]:PORT is IPv6 only."),
    ] = ["0.0.0.0:2055"],  # noqa: B006
    lake: LakeOption = Path(DEFAULT_LAKE),
    spool: Annotated[
        Path | None, typer.Option("--spool", help="Spool directory (default: LAKE/_spool).")
    ] = None,
    rotate: Annotated[
        str, typer.Option("--rotate", help="Commit to the lake every interval (on the clock).")
    ] = "5m",
    rotate_size: Annotated[
        str, typer.Option("--rotate-size", help="... or when a spool segment is this big.")
    ] = "256M",
    rcvbuf: Annotated[str, typer.Option("--rcvbuf", help="Socket receive buffer to ask for.")] = "32M",
    allow: Annotated[
        list[str],
        typer.Option(
            "--allow", help="Accept only senders in this CIDR; repeat. Default: any sender (with a warning)."
        ),
    ] = [],  # noqa: B006
    status_interval: Annotated[
        str, typer.Option("--status-interval", help="One status line per interval.")
    ] = "10s",
    stats_file: Annotated[
        Path | None, typer.Option("--stats-file", help="JSON status, replaced atomically.")
    ] = None,
    keep_segments: Annotated[
        bool,
        typer.Option(
            "--keep-segments",
            help="Keep committed spool segments (raw "
            "datagrams, evidence) in SPOOL/done/ instead of deleting.",
        ),
    ] = False,
) -> None:
    """Receive NetFlow v1/v5/v9 and IPFIX over UDP, spool the datagrams, and commit them to the lake.

    Runs in the foreground, logs to stderr, stops cleanly on SIGTERM/SIGINT (rotates, commits, exits 0).

    Example: tracepipe collect --listen 0.0.0.0:2055 --listen [::]:4739 --allow 10.0.0.0/8 --lake /srv/lake --rotate 5m
    """
    import logging

    from tracepipe.collector import CollectorConfig, parse_listen, run_collector
    from tracepipe.units import parse_duration, parse_size

    logging.basicConfig(
        level=logging.DEBUG if _DEBUG["on"] else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s tracepipe collect: %(message)s",
    )
    config = CollectorConfig(
        listen=[parse_listen(text) for text in listen],
        lake=lake,
        spool=spool,
        rotate_s=parse_duration(rotate, positive=True).total_seconds(),
        segment_bytes=parse_size(rotate_size),
        rcvbuf=parse_size(rcvbuf),
        allow=list(allow),
        status_s=parse_duration(status_interval, positive=True).total_seconds(),
        stats_file=stats_file,
        keep_segments=keep_segments,
    )
    raise typer.Exit(run_collector(config))


# ---- commands: sweep / model / intel ------------------------------------------------------------------------

model_app = typer.Typer(
    help="The anomaly model: fit on a baseline period, score windows.", no_args_is_help=True
)
app.add_typer(model_app, name="model")
intel_app = typer.Typer(
    help="Threat-intelligence indicators (MISP exports, address lists).", no_args_is_help=True
)
app.add_typer(intel_app, name="intel")

SinceOption = Annotated[
    str | None,
    typer.Option(
        "--since", help="Window start, ISO 8601 (no offset = UTC) or epoch seconds.", show_default=False
    ),
]
UntilOption = Annotated[
    str | None, typer.Option("--until", help="Window end (exclusive).", show_default=False)
]


def _time_or_none(text: str | None) -> Any:
    from tracepipe.query import parse_time

    return parse_time(text) if text else None


@app.command("sweep")
def sweep_command(
    pipeline: Annotated[
        Path, typer.Argument(help="Pipeline file, e.g. pipelines/nightly.toml.", show_default=False)
    ],
    since: SinceOption = None,
    until: UntilOption = None,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="duckdb, or spark (same detectors on Spark executors; needs tracepipe[spark] and Java).",
        ),
    ] = "duckdb",
    spark_master: Annotated[
        str | None,
        typer.Option("--spark-master", help="Spark master: local[*], yarn, k8s://https://host:443, ..."),
    ] = None,
    spark_conf: Annotated[
        list[str] | None, typer.Option("--spark-conf", help="Spark conf key=value (repeatable).")
    ] = None,
    lake: LakeOption = Path(DEFAULT_LAKE),
    output_format: FormatOption = OutputFormat.table,
) -> None:
    """Run a sweep: ingest the pipeline's drop folders, run its detectors and model over the window, append
    new alerts to the lake, write the JSON (and HTML) report, print a summary.

    Without --since/--until the window is the last completed `window.last` of the pipeline (hourly: the
    previous hour; nightly: yesterday). Rerunning a window adds no duplicate alerts.

    Exit codes: 0 nothing new (also: no flows in the window, said in the summary); 1 new alerts;
    2 bad pipeline file (the message names the key and line); 3 some input rejected and nothing new; 4 failed.

    Example: tracepipe sweep pipelines/nightly.toml --since 2025-06-17T00:00 --until 2025-06-18T00:00 --lake /srv/lake
    """
    from tracepipe.engines import parse_conf
    from tracepipe.sweep import run_sweep

    with console.status("sweep") as status:
        result = run_sweep(
            open_lake(lake),
            pipeline,
            _time_or_none(since),
            _time_or_none(until),
            engine=engine,
            on_stage=lambda name: status.update(f"sweep: {name}"),
            spark_master=spark_master,
            spark_conf=parse_conf(spark_conf),
        )
    summary = result.summary()
    if output_format == OutputFormat.json:
        print_json(summary)
    else:
        out.print(f"[bold]{result.pipeline}[/bold]: {result.message}", soft_wrap=True)
        for row in summary["top"]:
            out.print(
                f"  [{'red' if row['score'] and row['score'] >= 0.8 else 'yellow'}]{row['detector']:>15}"
                f"[/] {row['score']:.2f}  {row['reason']}",
                soft_wrap=True,
            )
        for note in result.notes:
            out.print(f"  note: {note}", soft_wrap=True)
        for kind, path in result.report_paths.items():
            out.print(f"  report ({kind}): {path}", soft_wrap=True)
    raise typer.Exit(result.exit_code)


@model_app.command("fit")
def model_fit_command(
    since: Annotated[
        str, typer.Option("--since", help="Baseline start (ISO 8601 / epoch).", show_default=False)
    ],
    until: Annotated[str, typer.Option("--until", help="Baseline end (exclusive).", show_default=False)],
    pipeline: Annotated[
        Path, typer.Option("--pipeline", help="Pipeline file giving local_networks and the model path.")
    ] = Path("pipelines/nightly.toml"),
    lake: LakeOption = Path(DEFAULT_LAKE),
    output_format: FormatOption = OutputFormat.table,
) -> None:
    """Fit the IsolationForest on per (host, hour) features of a baseline period and save it in the lake
    (joblib + a JSON sidecar of feature names, scikit-learn version and fit window).

    Example: tracepipe model fit --since 2025-06-01 --until 2025-06-15 --pipeline pipelines/nightly.toml
    """
    from tracepipe.detect.model import fit_lake
    from tracepipe.pipeline_config import load_pipeline
    from tracepipe.query import parse_time

    config = load_pipeline(pipeline)
    with console.status("model fit"):
        path, info = fit_lake(
            open_lake(lake),
            parse_time(since),
            parse_time(until),
            config.pipeline.local_networks,
            path=config.model.path or None,
        )
    answer = {
        "model": str(path),
        "rows": info.rows,
        "hosts": info.hosts,
        "features": info.features,
        "sklearn": info.sklearn_version,
        "fit_since": info.fit_since,
        "fit_until": info.fit_until,
    }
    if output_format == OutputFormat.json:
        print_json(answer)
    else:
        out.print(f"fitted on {info.rows:,} (host, hour)s of {info.hosts:,} hosts -> {path}")


@model_app.command("score")
def model_score_command(
    since: Annotated[str, typer.Option("--since", help="Start of the windows to score.", show_default=False)],
    until: Annotated[str, typer.Option("--until", help="End (exclusive).", show_default=False)],
    top: Annotated[int, typer.Option("--top", help="Show the N highest.")] = 20,
    pipeline: Annotated[
        Path, typer.Option("--pipeline", help="Pipeline file (model path, baseline).")
    ] = Path("pipelines/nightly.toml"),
    lake: LakeOption = Path(DEFAULT_LAKE),
    output_format: FormatOption = OutputFormat.table,
) -> None:
    """Rank the (host, hour)s of a period with the fitted model; each says which features stood out.

    Example: tracepipe model score --since 2025-06-17 --until 2025-06-18 --top 10
    """
    from tracepipe.detect.model import score_lake
    from tracepipe.pipeline_config import load_pipeline
    from tracepipe.query import parse_time

    config = load_pipeline(pipeline)
    with console.status("model score"):
        scored = score_lake(
            open_lake(lake),
            parse_time(since),
            parse_time(until),
            config.model.path or None,
            history=float(config.window.baseline),
            top_features=config.model.top_features,
        )
    rows = [
        {
            "host": r["host"],
            "window_start": r["window_start"],
            "anomaly_score": round(r["anomaly_score"], 4),
            "explanation": json.loads(r["explanation"]),
        }
        for r in scored.head(top).to_dicts()
    ]
    if output_format == OutputFormat.json:
        print_json(rows)
        return
    for r in rows:
        why = "; ".join(
            f"{e['feature']}={e['value']:g} (baseline {e['baseline']:g})" for e in r["explanation"]
        )
        out.print(
            f"{r['anomaly_score']:.3f}  {r['host']:<20} {r['window_start']:%Y-%m-%d %H:%M}  {why}",
            soft_wrap=True,
        )


@intel_app.command("import")
def intel_import_command(
    path: Annotated[
        Path, typer.Argument(help="MISP CSV/JSON export or a list of addresses/CIDRs.", show_default=False)
    ],
    input_format: Annotated[
        str, typer.Option("--format", help="auto, misp-csv, misp-json or list.")
    ] = "auto",
    lake: LakeOption = Path(DEFAULT_LAKE),
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="table or json.")
    ] = OutputFormat.table,
) -> None:
    """Load threat-intel indicators into the lake's `intel` dataset (importing the same file twice adds
    nothing). Bad lines go to the `rejects` dataset with their line number.

    Exit codes: 0 all imported; 3 some lines rejected; 4 nothing usable.

    Example: tracepipe intel import misp-export.csv && tracepipe sweep pipelines/retro-hunt.toml
    """
    from tracepipe.errors import EXIT_PARTIAL
    from tracepipe.intel import import_intel

    result = import_intel(open_lake(lake), path, input_format)
    code = EXIT_FAILED if result.rows == 0 and result.rejects else (EXIT_PARTIAL if result.rejects else 0)
    answer = {**vars(result), "exit_code": code}
    if output == OutputFormat.json:
        print_json(answer)
    elif result.already_imported:
        out.print(f"{path}: already imported (same content), nothing added")
    else:
        out.print(
            f"{path} ({result.format}): {result.rows} indicators, {result.rejects} rejected, "
            f"{result.skipped_types} attributes of other types skipped"
        )
    raise typer.Exit(code)


# ---- commands: demo -----------------------------------------------------------------------------------------


@app.command("demo")
def demo_command(
    lake: Annotated[Path, typer.Option("--lake", help="Demo lake; emptied and rebuilt on every run.")] = Path(
        "demo-lake"
    ),
    output: FormatOption = OutputFormat.table,
    story: Annotated[
        Path | None,
        typer.Option("--story", help="Sample story folder (default: the bundled one).", show_default=False),
    ] = None,
) -> None:
    """Run the whole pipeline on the bundled incident story and show what it finds.

    Ingests sample_data/story (softflowd NetFlow v9 + IPFIX captures, Nova, Neutron, OpenNebula, syslog, MISP)
    into a fresh lake, builds the leases, runs pipelines/nightly.toml over the story window, prints each finding
    with its VM, project and owner, the report path and three commands to try next.

    Example: tracepipe demo --lake /tmp/demo-lake
    """
    from tracepipe.demo import STORY_DIR, run_demo

    with console.status("demo") as status:
        # the next commands are printed the way the user called us (.venv/bin/tracepipe, tracepipe, ...)
        program = sys.argv[0] if Path(sys.argv[0]).name == "tracepipe" else "tracepipe"
        result = run_demo(
            lake, story or STORY_DIR, progress=lambda step: status.update(f"demo: {step}"), program=program
        )
    if output == OutputFormat.json:
        print_json(result.to_dict())
        raise typer.Exit(result.exit_code)
    _print_demo(result)
    raise typer.Exit(result.exit_code)


def _print_demo(result: Any) -> None:
    from rich.markup import escape

    start, end = result.window
    out.print(
        f"[bold]tracepipe demo[/bold]: sample story {start:%Y-%m-%d %H:%M}–{end:%H:%M} UTC, lake {result.lake}"
    )
    marks = {"ok": "[green]ok[/green]", "failed": "[red]failed[/red]", "missing": "[yellow]missing[/yellow]"}
    for step in result.steps:
        numbers = ", ".join(
            f"{k} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k} {v}"
            for k, v in step.numbers.items()
        )
        detail = f" — {escape(step.detail)}" if step.detail else ""
        out.print(
            f"  {marks.get(step.status, step.status)}  {escape(step.name)}: {escape(numbers)}{detail}"
            f" [dim]({step.seconds:.1f} s)[/dim]"
        )
    out.print(f"\n[bold]Findings[/bold]: {len(result.findings)} (host, detector) pairs, strongest first")
    for n, f in enumerate(result.findings, 1):
        state = f["vm_status"] or "unknown"
        if f.get("quarantine_until"):
            state += f", quarantined until {f['quarantine_until'][:16]}"
        who = (
            f"VM {f['vm_name']} · project {f['project']} · owner {f['user']} · {f['hypervisor']} · {state}"
            if f["vm_name"]
            else "no VM held this address"
        )
        out.print(
            f"{n:>2}. [bold]{escape(f['detector'] or '')}[/bold]  {escape(f['addr'] or '')}  {escape(who)}"
        )
        out.print(f"    {escape(f['reason'] or '')}", soft_wrap=True)
    out.print()
    found = sum(1 for c in result.truth_check if c["found"] and c["attributed"])
    out.print(
        f"Ground truth (sample_data/story/ground_truth.json): {found}/{len(result.truth_check)} planted "
        f"incidents found and attributed to the right VM and owner; "
        f"{len(result.false_positives)} ordinary hosts alerted"
        + (f" ({', '.join(result.false_positives)})" if result.false_positives else "")
        + "."
    )
    for check in result.truth_check:
        if not (check["found"] and check["attributed"]):
            out.print(
                f"  [yellow]not found/attributed:[/yellow] {check['kind']} {check['addr']} ({check['vm_name']})"
            )
    if result.report.get("html"):
        out.print(
            f"Report: [bold]{escape(result.report['html'])}[/bold] (open it in a browser; JSON: "
            f"{escape(result.report.get('json', ''))})"
        )
    out.print("Try next:")
    for command in result.next_commands:
        out.print(f"  {escape(command)}", soft_wrap=True)
    out.print(f"[dim]{result.seconds:.1f} s[/dim]")


def main() -> None:
    """Entry point: turns TracepipeError into one red line and its exit code (click handles usage errors)."""
    try:
        app()
    except TracepipeError as exc:
        if _DEBUG["on"]:
            console.print_exception()
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(exc.exit_code)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:
        if _DEBUG["on"]:
            console.print_exception()
        console.print(f"[red]internal error:[/red] {exc!r} (rerun with --debug for the traceback)")
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
