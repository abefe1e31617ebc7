"""The `tracepipe` command. Thin: each command parses options, calls one library function, prints.

Exit codes (every command): 0 done · 1 done, and a sweep found new alerts · 2 usage error ·
3 partial: some input was rejected, the rest landed (see the `rejects` dataset) · 4 failed: nothing landed,
or the environment is wrong (lake unwritable, binary missing).
"""

from __future__ import annotations

import json
import sys
from enum import Enum
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
ingest_app = typer.Typer(help="Land inputs in the lake (NetFlow, VM lifecycle, syslog).", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")

console = Console(stderr=True)  # human messages and progress on stderr; data on stdout
out = Console()

_DEBUG = {"on": False}


class OutputFormat(str, Enum):
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
    paths: Annotated[list[Path], typer.Argument(help="Capture files (pcap/pcapng of export traffic) or "
                                                "nfdump CSV files.", show_default=False)],
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
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("ingest netflow", total=total)
        summary = ingest_flow_files(open_lake(lake), paths, progress=lambda n: bar.advance(task, n))
    if output == OutputFormat.json:
        print_json(summary.to_dict())
        raise typer.Exit(summary.exit_code)
    files = Table(title="files")
    for col in ("file", "kind", "status", "datagrams", "flows", "rejects"):
        files.add_column(col, justify="right" if col in ("datagrams", "flows", "rejects") else "left")
    for f in summary.files:
        files.add_row(f.path, f.kind, f.status + (f" ({f.message})" if f.message else ""), str(f.datagrams),
                      str(f.flows), str(f.rejects))
    out.print(files)
    exporters = Table(title="exporters")
    for col in ("exporter", "versions", "datagrams", "flows", "rejects", "sequence gaps", "lost", "sampling"):
        exporters.add_column(col)
    for name, s in sorted(summary.exporters.items()):
        sampling = s.get("sampling", "unknown")
        exporters.add_row(name, ",".join(str(v) for v in s.get("versions", [])), str(s.get("datagrams", 0)),
                          str(s.get("flows", 0)), str(s.get("rejects", 0)), str(s.get("sequence_gaps", 0)),
                          str(s.get("lost", 0)),
                          "unknown" if sampling == "unknown" else f"1:{sampling}")
    out.print(exporters)
    unknown = [name for name, s in sorted(summary.exporters.items()) if s.get("sampling", "unknown") == "unknown"]
    if unknown:
        out.print(f"sampling interval unknown for {', '.join(unknown)} (no options template): volumes are "
                  "as exported, not scaled")
    out.print(f"{len(summary.files)} files, {summary.datagrams} datagrams, {summary.flows} flows, "
              f"{summary.rejects} rejects" + (", flows attributed to VMs" if summary.attributed else ""))
    raise typer.Exit(summary.exit_code)


# ---- commands: ingest vm / syslog ---------------------------------------------------------------------------


class VmInputFormat(str, Enum):  # noqa: UP042 - same as OutputFormat, typer choices
    auto = "auto"
    nova = "nova"
    neutron = "neutron"
    opennebula = "opennebula"
    csv = "csv"
    jsonl = "jsonl"


OutputOption = Annotated[
    OutputFormat,
    typer.Option("--output", "-o", help="table for people, json for scripts (--format names the INPUT format)."),
]


def _print_vm_report(report: Any, output: OutputFormat, title: str, lake: Path) -> None:
    from rich.table import Table

    from tracepipe.errors import EXIT_OK, EXIT_PARTIAL

    if output == OutputFormat.json:
        print_json(report.as_dict())
    else:
        table = Table(title=title)
        for col in ("source", "status", "rows", "rejects"):
            table.add_column(col, justify="right" if col in ("rows", "rejects") else "left")
        for r in report.results:
            table.add_row(r.source, "skipped (already in the lake)" if r.skipped else "landed", str(r.rows),
                          str(r.rejects))
        out.print(table)
        out.print(f"{report.rows} rows, {report.rejects} rejects, {report.skipped} sources skipped; "
                  f"{report.leases} leases, {report.vms} VMs"
                  + (f"; flows re-attributed for {', '.join(report.touched_days)}" if report.attribution else ""))
    if report.rejects:
        console.print(f"[yellow]{report.rejects} input lines rejected[/yellow] (the rest landed); list them: "
                      f"tracepipe sql \"SELECT * FROM read_parquet('{lake}/rejects/*/*.parquet')\"")
    raise typer.Exit(EXIT_PARTIAL if report.rejects else EXIT_OK)


@ingest_app.command("vm")
def ingest_vm_command(
    paths: Annotated[list[Path], typer.Argument(help="Notification dumps, OpenNebula <id>.log (+ <id>.xml), "
                                                "CSV/JSONL files, or directories of them.", show_default=False)],
    input_format: Annotated[VmInputFormat, typer.Option(
        "--format", "-f", help="INPUT format; auto guesses from name and content.")] = VmInputFormat.auto,
    cloud: Annotated[str | None, typer.Option(help="Cloud/site name written to every row "
                                                   "(default: openstack, opennebula, generic).")] = None,
    reclaim_interval: Annotated[str | None, typer.Option(
        help="Deferred-deletion / image-retention interval (Nova's reclaim_instance_interval), e.g. 7d; "
             "sets quarantine_until. Remembered in the lake.")] = None,
    tz: Annotated[str, typer.Option("--tz", help="Time zone of OpenNebula logs and CSV times without "
                                                 "offset (IANA name).")] = "UTC",
    lake: LakeOption = Path(DEFAULT_LAKE),
    output: OutputOption = OutputFormat.table,
) -> None:
    """Land VM lifecycle events (Nova/Neutron notifications, OpenNebula logs + XML, CSV/JSONL) and rebuild
    the address leases (who held which address when), then re-attribute flows of the days that changed.

    Exit codes: 0 all landed; 3 partial: some lines were rejected (the rest landed); 4 failed.

    Example: tracepipe ingest vm /var/log/nova/notifications.jsonl --reclaim-interval 7d --lake /srv/lake
    """
    from tracepipe.ingest.cloud.common import parse_interval
    from tracepipe.ingest.vm import ingest_vm_files

    interval = parse_interval(reclaim_interval) if reclaim_interval else None
    with console.status("ingest vm"):
        report = ingest_vm_files(open_lake(lake), paths, fmt=input_format.value, cloud=cloud,
                                 reclaim_interval=interval, tz=tz)
    _print_vm_report(report, output, "vm lifecycle sources", lake)


@ingest_app.command("syslog")
def ingest_syslog_command(
    paths: Annotated[list[Path], typer.Argument(help="Syslog files written inside VMs (RFC 3164/5424, "
                                                "rsyslog formats), or directories of them.", show_default=False)],
    year: Annotated[int | None, typer.Option(help="Year of RFC 3164 lines (they carry none); "
                                                  "default: the file's modification time.")] = None,
    sender_addr: Annotated[str | None, typer.Option(help="Address the lines came from (the VM's address); "
                                                         "default: match the hostname to VM names.")] = None,
    tz: Annotated[str, typer.Option("--tz", help="Time zone of timestamps without offset (RFC 3164).")] = "UTC",
    lake: LakeOption = Path(DEFAULT_LAKE),
    output: OutputOption = OutputFormat.table,
) -> None:
    """Land syslog from inside VMs in vm_logs, attributed to the VM by sender address (or hostname) and time,
    with sshd logins parsed (auth_event, auth_user, auth_src_addr, auth_method). Ingest the VM lifecycle first.

    Exit codes: 0 all landed; 3 partial: some lines in no known format were rejected; 4 failed.

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
    with console.status("ingest syslog"):
        report = ingest_syslog_files(open_lake(lake), paths, year=year, sender_addr=sender_addr, tz=tz)
    _print_vm_report(report, output, "syslog sources", lake)


# ---- commands: sql / who / timeline -------------------------------------------------------------------------

# ---- commands: collect --------------------------------------------------------------------------------------


@app.command("collect")
def collect_command(
    listen: Annotated[list[str], typer.Option("--listen", help="HOST:PORT to receive on; repeat for more. "
                                              "[::]:PORT is IPv6 only.")] = ["0.0.0.0:2055"],  # noqa: B006
    lake: LakeOption = Path(DEFAULT_LAKE),
    spool: Annotated[Path | None, typer.Option("--spool", help="Spool directory (default: LAKE/_spool).")] = None,
    rotate: Annotated[str, typer.Option("--rotate", help="Commit to the lake every interval (on the clock).")] = "5m",
    rotate_size: Annotated[str, typer.Option("--rotate-size", help="... or when a spool segment is this big.")] = "256M",
    rcvbuf: Annotated[str, typer.Option("--rcvbuf", help="Socket receive buffer to ask for.")] = "32M",
    allow: Annotated[list[str], typer.Option("--allow", help="Accept only senders in this CIDR; repeat. "
                                             "Default: any sender (with a warning).")] = [],  # noqa: B006
    status_interval: Annotated[str, typer.Option("--status-interval", help="One status line per interval.")] = "10s",
    stats_file: Annotated[Path | None, typer.Option("--stats-file", help="JSON status, replaced atomically.")] = None,
    keep_segments: Annotated[bool, typer.Option("--keep-segments", help="Keep committed spool segments (raw "
                                                "datagrams, evidence) in SPOOL/done/ instead of deleting.")] = False,
) -> None:
    """Receive NetFlow v1/v5/v9 and IPFIX over UDP, spool the datagrams, and commit them to the lake.

    Runs in the foreground, logs to stderr, stops cleanly on SIGTERM/SIGINT (rotates, commits, exits 0).

    Example: tracepipe collect --listen 0.0.0.0:2055 --listen [::]:4739 --allow 10.0.0.0/8 --lake /srv/lake --rotate 5m
    """
    import logging

    from tracepipe.collector import CollectorConfig, parse_duration, parse_listen, parse_size, run_collector

    logging.basicConfig(level=logging.DEBUG if _DEBUG["on"] else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s tracepipe collect: %(message)s")
    config = CollectorConfig(
        listen=[parse_listen(text) for text in listen], lake=lake, spool=spool, rotate_s=parse_duration(rotate),
        segment_bytes=parse_size(rotate_size), rcvbuf=parse_size(rcvbuf), allow=list(allow),
        status_s=parse_duration(status_interval), stats_file=stats_file, keep_segments=keep_segments)
    raise typer.Exit(run_collector(config))


# ---- commands: sweep / model / intel ------------------------------------------------------------------------

# ---- commands: demo -----------------------------------------------------------------------------------------


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
