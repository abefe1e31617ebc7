"""The `tracepipe` command. Thin: each command parses options, calls one library function, prints.

Exit codes (every command): 0 done · 1 done, and a sweep found new alerts · 2 usage error ·
3 partial: some input was rejected, the rest landed (see the `rejects` dataset) · 4 failed: nothing landed,
or the environment is wrong (lake unwritable, binary missing).
"""

from __future__ import annotations

import errno
import os
import sys

# `python -m tracepipe.cli`: through the entry point, which starts decode workers before typer loads
if __name__ == "__main__":
    from tracepipe.__main__ import main as _entry_point

    _entry_point()
    sys.exit(0)  # not reached: the app exits with its code

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from tracepipe import DEFAULT_LAKE
from tracepipe.errors import EXIT_FAILED, EXIT_FOUND, EXIT_PIPE, TracepipeError, UsageError
from tracepipe.nopandas import refuse_pandas
from tracepipe.printer import Printer

if TYPE_CHECKING:
    from tracepipe.ingest.decode_pool import DecodePool
    from tracepipe.lake import Lake
    from tracepipe.senders import AllowList

# click's exception base (typer >= 0.22 vendors click as typer._click): found from a public subclass
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 new alerts found (sweep); 2 usage error; "
    "3 partial: some input rejected, the rest landed; 4 failed: nothing landed or environment wrong; "
    "5 landed, but attributing it to VMs failed; 141 the reader of the output went away (| head)."
)


class _Tracepipe(TyperGroup):
    """Turns a TracepipeError into one red line and its exit code, anything else unexpected into "internal
    error" and 4; --debug (the Printer in the context) adds the traceback. click's usage errors (2) are
    printed through the Printer too: they quote what was typed (`No such command '[/x]'`), and typer's own
    error panel would send the control and bidi characters of an argument to the terminal."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except ClickException as exc:
            _usage_error(exc)
            sys.exit(exc.exit_code)
        except typer.Abort:
            Printer().error("aborted", label="")
            sys.exit(EXIT_FAILED)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: typer.Context) -> Any:
        _OPENED.clear()  # (one command's lakes: the CLI may run several commands in one process)
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise
        except TracepipeError as exc:
            printer = ctx.obj if isinstance(ctx.obj, Printer) else Printer()
            if printer.debug:
                printer.err.print_exception()
            printer.error(str(exc))
            ctx.exit(exc.exit_code)
        except Exception as exc:
            if isinstance(exc, BrokenPipeError) and _stdout_gone():  # (typer would exit 1: "alerts found")
                _closed_pipe()
            printer = ctx.obj if isinstance(ctx.obj, Printer) else Printer()
            if printer.debug:
                printer.err.print_exception()
            try:  # (the lake may be why it stopped; this must never replace the error with another)
                from tracepipe.query import damage_error

                damage = damage_error(dict.fromkeys(_OPENED), exc)
            except Exception:
                damage = None
            if damage is not None:
                printer.error(str(damage))
            elif (said := _environment_error(exc)) is not None:
                printer.error(said)
            else:
                printer.error(f"{exc!r} (rerun with --debug for the traceback)", label="internal error:")
            ctx.exit(EXIT_FAILED)
        except BaseException as exc:
            # a Rust panic in polars or delta-rs (pyo3's PanicException is no Exception: it ended the process
            # with exit 1, "new alerts", e.g. "failed to spawn polars-ooc cleaner thread" under a memory limit)
            if type(exc).__name__ != "PanicException":
                raise
            printer = ctx.obj if isinstance(ctx.obj, Printer) else Printer()
            if printer.debug:
                printer.err.print_exception()
            printer.error(
                f"{str(exc)[:500]} (a library panicked; out of memory or threads? rerun with --debug)",
                label="internal error:",
            )
            ctx.exit(EXIT_FAILED)


_UNWRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _environment_error(exc: BaseException) -> str | None:
    """The machine's part in a failure, said plainly (exit 4), not as an internal error: a full disk or a
    read-only folder met where no command expected it (compaction, a report), memory run out."""
    if isinstance(exc, MemoryError):
        return (
            "ran out of memory: give the command more memory (or fewer --jobs, a smaller --at-once), then run it "
            "again; what it committed before stays committed"
        )
    if isinstance(exc, OSError) and exc.errno in _UNWRITABLE:
        where = f" ({exc.filename})" if exc.filename else ""
        what = "denied" if exc.errno in (errno.EACCES, errno.EPERM) else "cannot write"
        return (
            f"{what}{where}: {os.strerror(exc.errno)}. Check that the lake and the report folders are writable "
            "and have free space, then run it again; nothing half-written is visible."
        )
    return None


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader went away (poll: POLLERR), rather than some other pipe or socket
    the command used (that one is an error like any other)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.__stdout__.fileno(), select.POLLOUT)  # type: ignore[union-attr]
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _closed_pipe() -> NoReturn:
    """The reader of stdout went away (`tracepipe sql ... | head`): stop quietly with EXIT_PIPE, as any Unix
    tool killed by SIGPIPE, not "internal error"; stdout is pointed at /dev/null first, so that the flush at
    exit does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(EXIT_PIPE)


def _usage_error(exc: Any) -> None:
    """click's usage error as `main` prints it (usage line, how to get help, the error), cleaned."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # the help text was printed already
        return
    printer = Printer()
    context = getattr(exc, "ctx", None)
    if context is not None:
        printer.note(context.get_usage())
        if context.command.get_help_option(context) is not None:
            printer.note(f"Try '{context.command_path} {context.help_option_names[0]}' for help.")
    printer.error(exc.format_message())


app = typer.Typer(
    cls=_Tracepipe,
    name="tracepipe",
    help="NetFlow + cloud VM lifecycle traceability for research clouds.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
ingest_app = typer.Typer(
    help="Land inputs in the lake (NetFlow, VM lifecycle, syslog).\n\n"
    "Example: tracepipe ingest netflow /srv/nfcapd/2025/06/17/ --lake /srv/lake",
    no_args_is_help=True,
)
app.add_typer(ingest_app, name="ingest")


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


LakeOption = Annotated[
    Path,
    typer.Option("--lake", envvar="TRACEPIPE_LAKE", help="Lake directory.", show_default=True),
]
FormatOption = Annotated[OutputFormat, typer.Option("--format", help="table for people, json for scripts.")]


# the lakes this command opened (open_lake): where an unexpected error looks for damage (query.damage_error)
_OPENED: list[Path] = []


def open_lake(path: Path | None, existing: bool = False) -> Lake:
    """The lake at --lake. `existing`: a LakeError (exit 4) unless it holds one of the lake's tables, for the
    commands that only rewrite a lake (attribute, compact, ...): on an empty directory (a lake's mount point not
    mounted) or some other one they said "0 flows in 0 files" with exit 0 and left lock files there."""
    # imported here, not at the top: `ingest netflow` starts its decode workers before loading it
    from tracepipe.lake import Lake

    root = path if path is not None else Path(DEFAULT_LAKE)
    _OPENED.append(root)
    lake = Lake(root)
    if existing:
        lake.require()
    return lake


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    # every command prints through this Printer (data on stdout, messages on stderr, no markup from data)
    ctx.obj = Printer(debug=debug)


# ---- commands: ingest netflow -------------------------------------------------------------------------------


@ingest_app.command("netflow")
def ingest_netflow_command(
    ctx: typer.Context,
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Capture files (pcap/pcapng of export traffic), nfdump CSV files, nfcapd files, or directories "
            "of nfcapd files (an nfsen profile tree).",
            show_default=False,
        ),
    ],
    lake: LakeOption = Path(DEFAULT_LAKE),
    output: FormatOption = OutputFormat.table,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="Worker processes turning large captures, nfcapd files and nfdump CSV files (256 MB or more) "
            "into Parquet (default: the number of cores). Templates and sequence numbers are still read in input "
            "order, in one process; an nfcapd file's blocks and a CSV file's line ranges are read by the workers "
            "themselves.",
            show_default=False,
        ),
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            help="Land only the export datagrams a capture holds from senders in this CIDR (repeatable: your "
            "routers' and probes' prefixes); the others are counted per sender (not_allowed), not decoded. "
            "Captures only.",
            show_default=False,
        ),
    ] = None,
    tz: Annotated[
        str,
        typer.Option(
            "--tz",
            help="Time zone of the times in nfdump CSV files: nfdump prints the local time of the machine it runs "
            "on (`TZ=UTC nfdump ... -o csv` writes UTC). Captures and nfcapd files carry UTC themselves.",
        ),
    ] = "UTC",
) -> None:
    """Land NetFlow v1/v5/v7/v9 and IPFIX records from captures (tcpdump -w, any UDP port), nfdump CSV, and
    nfcapd files or whole nfsen/nfcapd directory trees, file by file (nfdump 1.7 files natively; others, such as
    nfdump 1.6 or LZO files, through the installed nfdump: the result says which).

    The kind of each file is told by its first bytes. Files already in the lake (same content) are skipped.
    Exit codes: 0 all landed; 3 partial: some input was rejected (see the rejects dataset), the rest landed;
    4 nothing landed or no usable input; 5 landed, but attributing the flows to VMs failed.

    Example: tracepipe ingest netflow /var/captures/netflow-*.pcap /var/nfsen/profiles-data/live --lake /srv/lake

    Example: tracepipe ingest netflow /var/captures/netflow-*.pcap --lake /srv/lake --jobs 2

    Example: tracepipe ingest netflow span-port.pcap --allow 192.0.2.0/28 --allow 2001:db8:10::/64

    Example: tracepipe ingest netflow nfcapd.202403120800.csv --tz Europe/Zurich
    """
    refuse_pandas()  # before anything imports pyarrow's conversions: see tracepipe/nopandas.py
    from tracepipe.ingest.decode_pool import start_early
    from tracepipe.senders import AllowList
    from tracepipe.units import time_zone

    senders = AllowList(allow or [])  # (a CIDR that does not parse: exit 2 before any work)
    time_zone(tz)  # (nor a zone that is not one; ingest.vm's own check would import polars: tests say why)
    with start_early(jobs, lake, paths) as pool:  # the workers start up while this process imports the rest
        from tracepipe.ingest.flows import NETFLOW_KINDS

        _ingest_flows(ctx.obj, paths, lake, output, NETFLOW_KINDS, "ingest netflow", jobs, pool, senders, tz)


@ingest_app.command("zeek")
def ingest_zeek_command(
    ctx: typer.Context,
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Zeek conn.log files (TSV or JSON, plain or .gz) or directories of them (Zeek's log archive).",
            show_default=False,
        ),
    ],
    lake: LakeOption = Path(DEFAULT_LAKE),
    output: FormatOption = OutputFormat.table,
) -> None:
    """Land Zeek conn.log connections as flows: one row per direction, with Zeek's uid, conn_state and history
    kept (tcp_flags derived from them), IP bytes as NetFlow counts them. A `label` column (Stratosphere's
    labelled logs, IoT-23) goes to the flow_labels dataset, for evaluation only; detectors never read it.

    Files already in the lake (same content) are skipped. Exit codes: 0 all landed; 3 partial: some lines
    were rejected (see the rejects dataset: file, line, reason), the rest landed; 4 nothing landed; 5 landed,
    but attributing the flows to VMs failed.

    Example: tracepipe ingest zeek /opt/zeek/logs/2024-03-12/conn.*.log.gz --lake /srv/lake
    """
    refuse_pandas()  # before anything imports pyarrow's conversions: see tracepipe/nopandas.py
    from tracepipe.ingest.flows import ZEEK_KINDS

    _ingest_flows(ctx.obj, paths, lake, output, ZEEK_KINDS, "ingest zeek")


@ingest_app.command("argus")
def ingest_argus_command(
    ctx: typer.Context,
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="CSV files written by argus `ra -u -c , -L0` (binetflow files of CTU-13/Stratosphere too).",
            show_default=False,
        ),
    ],
    lake: LakeOption = Path(DEFAULT_LAKE),
    output: FormatOption = OutputFormat.table,
) -> None:
    """Land argus flow records (ra CSV output) as flows: one row per direction, argus' State kept in
    conn_state and mapped to TCP flags. A `Label` column (labelled data sets) goes to the flow_labels dataset,
    for evaluation only: detectors never see it.

    Make such a file with: ra -r FILE.argus -u -n -c , -L0 -Z b -s stime dur proto saddr sport dir daddr
    dport state stos dtos pkts bytes sbytes spkts dpkts dbytes. Exit codes as for `ingest zeek`.

    Example: tracepipe ingest argus capture20110810.binetflow --lake /srv/lake
    """
    refuse_pandas()  # before anything imports pyarrow's conversions: see tracepipe/nopandas.py
    from tracepipe.ingest.flows import ARGUS_KINDS

    _ingest_flows(ctx.obj, paths, lake, output, ARGUS_KINDS, "ingest argus")


# at most this many skipped files are listed one a row by an ingest's table (the rest are counted)
LISTED_SKIPPED = 20


def _unskipped(results: list[tuple[Any, bool]]) -> tuple[list[Any], int]:
    """An ingest's results as its table lists them, and how many skipped ones it leaves out: a rerun over a
    drop folder of 100,000 files landed before printed a table of 100,000 rows (90 s of CPU, for the two lines
    that matter). Past LISTED_SKIPPED, skipped files are counted, not listed (--format json lists every one)."""
    skipped = sum(1 for _result, was_skipped in results if was_skipped)
    if skipped <= LISTED_SKIPPED:
        return [result for result, _skipped in results], 0
    return [result for result, was_skipped in results if not was_skipped], skipped


def _say_unlisted(p: Printer, unlisted: int) -> None:
    if unlisted:
        p.line(f"{unlisted} files skipped, not listed: already in the lake (--format json lists them)")


def _ingest_flows(
    p: Printer,
    paths: list[Path],
    lake: Path,
    output: OutputFormat,
    accept: tuple[str, ...],
    title: str,
    jobs: int | None = None,
    pool: DecodePool | None = None,
    allow: AllowList | None = None,
    tz: str = "UTC",
) -> None:
    """The common body of the flow ingest commands: land, attribute, print the summary, exit."""
    from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn

    from tracepipe.correlate.attribution import correlate
    from tracepipe.errors import combined_exit
    from tracepipe.ingest.flows import COMMAND_OF_KIND, expand_paths, ingest_flow_files

    total = sum(f.stat().st_size for f in expand_paths(paths) if f.is_file())
    with p.progress(BarColumn(), DownloadColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task(title, total=total)
        summary = ingest_flow_files(
            open_lake(lake),
            paths,
            progress=lambda n: bar.advance(task, n),
            accept=accept,
            jobs=jobs,
            pool=pool,
            allow=allow,
            tz=tz,
        )
        bar.update(task, description="attribute flows to VMs")
        correlation = correlate(open_lake(lake), days=summary.days)
    exit_code = combined_exit(summary.exit_code, correlation.exit_code)
    if summary.error:
        p.error(summary.error)
    if output == OutputFormat.json:
        p.json({**summary.to_dict(), "correlation": correlation.to_dict(), "exit_code": exit_code})
        raise typer.Exit(exit_code)
    listed, unlisted = _unskipped([(f, f.status == "skipped") for f in summary.files])
    p.table(
        (
            [
                f.path,
                f.kind,
                f.status + (f" ({f.message})" if f.message else ""),
                f.datagrams,
                f.flows,
                f.rejects,
            ]
            for f in listed
        ),
        ["file", "kind", "status", "datagrams", "flows", "rejects"],
        "files",
        right=["datagrams", "flows", "rejects"],
    )
    _say_unlisted(p, unlisted)
    p.table(
        (
            [
                name,
                ",".join(str(v) for v in s.get("versions", [])),
                s.get("datagrams", 0),
                s.get("flows", 0),
                s.get("rejects", 0),
                s.get("sequence_gaps", 0),
                s.get("lost", 0),
                "unknown" if s.get("sampling", "unknown") == "unknown" else f"1:{s['sampling']}",
            ]
            for name, s in sorted(summary.exporters.items())
        ),
        ["exporter", "versions", "datagrams", "flows", "rejects", "sequence gaps", "lost", "sampling"],
        "exporters",
    )
    # (of exporters: the rejects of an nfcapd or CSV file that names none are counted under its kind's name)
    unknown = [
        name
        for name, s in sorted(summary.exporters.items())
        if s.get("sampling", "unknown") == "unknown" and name not in COMMAND_OF_KIND
    ]
    if unknown:
        p.line(
            f"sampling interval unknown for {', '.join(unknown)} (no options template): volumes are "
            "as exported, not scaled"
        )
    p.line(
        f"{len(summary.files)} files, {summary.datagrams} datagrams, {summary.flows} flows, "
        f"{summary.rejects} rejects" + (", flows attributed to VMs" if correlation.flows else "")
    )
    if correlation.error:
        p.error(correlation.error)
    raise typer.Exit(exit_code)


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


def _print_vm_report(
    p: Printer, report: Any, correlation: Any, output: OutputFormat, title: str, lake: Path
) -> None:
    from tracepipe.errors import combined_exit

    exit_code = combined_exit(report.exit_code, correlation.exit_code)
    if output == OutputFormat.json:
        p.json(
            {
                **report.as_dict(),
                "leases": correlation.lease_rows,
                "vms": correlation.vms,
                "attributed_lines": correlation.logs_attributed,
                "correlation": correlation.to_dict(),
                "exit_code": exit_code,
            }
        )
    else:
        listed, unlisted = _unskipped([(r, r.skipped) for r in report.results])
        p.table(
            (
                [r.source, "skipped (already in the lake)" if r.skipped else "landed", r.rows, r.rejects]
                for r in listed
            ),
            ["source", "status", "rows", "rejects"],
            title,
            right=["rows", "rejects"],
        )
        _say_unlisted(p, unlisted)
        summary = f"{report.rows} rows, {report.rejects} rejects, {report.skipped} sources skipped; "
        if report.duplicates:
            summary += f"{report.duplicates} events already in the lake; "
        if correlation.logs_attributed is not None:
            summary += f"{correlation.logs_attributed} lines attributed to a VM"
        else:
            summary += f"{correlation.lease_rows} leases, {correlation.vms} VMs"
        if correlation.leases.get("mode") not in (None, "none"):
            summary += f" (leases updated: {correlation.leases['mode']})"
        if correlation.flows:
            summary += f"; flows re-attributed for {', '.join(correlation.flows['days'])}"
        p.line(summary)
    for source, why in report.not_read:
        p.note((f"{source}: not read", "yellow"), f": {why}")
    if report.rejects:
        p.note(
            (f"{report.rejects} input lines rejected", "yellow"),
            " (the rest landed)" if report.rows else " (nothing landed)",
            f'; list them: tracepipe sql "SELECT * FROM rejects" --lake {lake}',
        )
    if correlation.error:
        p.error(correlation.error)
    raise typer.Exit(exit_code)


@ingest_app.command("vm")
def ingest_vm_command(
    ctx: typer.Context,
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

    Exit codes: 0 all landed; 3 partial: some lines were rejected (the rest landed); 4 failed: nothing landed;
    5 landed, but updating the leases or attributing failed (run `tracepipe leases rebuild`).

    Example: tracepipe ingest vm /var/log/nova/notifications.jsonl --reclaim-interval 7d --lake /srv/lake
    """
    refuse_pandas()  # an hourly job: pyarrow's pandas probe cost ~0.3 s of each run (tracepipe/nopandas.py)
    from tracepipe.correlate.attribution import correlate
    from tracepipe.ingest.vm import ingest_vm_files
    from tracepipe.units import parse_duration

    p: Printer = ctx.obj
    interval = parse_duration(reclaim_interval) if reclaim_interval else None
    target = open_lake(lake)  # one Lake for both steps: tables opened and their file lists read once
    with p.status("ingest vm") as status:
        report = ingest_vm_files(
            target,
            paths,
            fmt=input_format.value,
            cloud=cloud,
            tz=tz,
            progress=lambda step: status(f"ingest vm: {step}"),
        )
        status("ingest vm: updating leases, re-attributing the days they change")
        correlation = correlate(target, reclaim_interval=interval)
    _print_vm_report(p, report, correlation, output, "vm lifecycle sources", lake)


@ingest_app.command("syslog")
def ingest_syslog_command(
    ctx: typer.Context,
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Syslog files written inside VMs (RFC 3164/5424, rsyslog formats), or directories of them.",
            show_default=False,
        ),
    ],
    year: Annotated[
        int | None,
        typer.Option(
            help="Year of each file's first RFC 3164 line (they carry none; the others are dated within a year "
            "from 30 days before it), 1970-2199; default: the file's modification time.",
            min=1970,
            max=2199,
        ),
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

    Exit codes: 0 all landed; 3 partial: some lines in no known format were rejected; 4 failed: nothing landed;
    5 landed, but attributing the lines to VMs failed (run `tracepipe leases rebuild`).

    Example: tracepipe ingest syslog /var/log/remote/web-01/auth.log --year 2024 --sender-addr 192.168.1.3
    """
    refuse_pandas()  # see ingest vm
    from tracepipe.correlate.attribution import correlate_landed_logs, log_attributor
    from tracepipe.ingest.vm import ingest_syslog_files
    from tracepipe.units import parse_addr

    p: Printer = ctx.obj
    target = open_lake(lake)  # as in ingest vm
    with p.status("ingest syslog") as status:
        before = target.version("vm_leases")
        attributor = log_attributor(target)
        report = ingest_syslog_files(
            target,
            paths,
            year=year,
            sender_addr=parse_addr(sender_addr) if sender_addr is not None else None,
            tz=tz,
            progress=lambda step: status(f"ingest syslog: {step}"),
            attribute=attributor,
        )
        status("ingest syslog: attributing lines to VMs")
        # (lines that landed attributed with the leases of now are not rewritten again: landed_with)
        correlation = correlate_landed_logs(target, report.touched_days, attributor, before)
    assumed = sorted({r.stats["mtime_year"] for r in report.results if r.rows and "mtime_year" in r.stats})
    if assumed:
        p.warning(
            f"lines without a year (RFC 3164, rsyslog's default) were dated in {', '.join(map(str, assumed))}, "
            "the year of each file's modification time; give --year if that is wrong"
        )
    _print_vm_report(p, report, correlation, output, "syslog sources", lake)


# ---- commands: sql / who / timeline -------------------------------------------------------------------------


class SqlFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


def _print_relation(
    p: Printer, relation: Any, root: Path, max_rows: int = 1000, title: str | None = None
) -> None:
    """A DuckDB result as a table on stdout (first max_rows rows)."""
    from tracepipe.query import fetch_rows

    if relation is None:
        return
    rows = fetch_rows(relation, max_rows + 1, root)
    p.table(rows[:max_rows], relation.columns, title)
    if len(rows) > max_rows:
        p.note(f"(first {max_rows} rows shown; use --max-rows, or --format csv/json/parquet for all)")


@app.command("sql")
def sql_command(
    ctx: typer.Context,
    query: Annotated[
        str | None, typer.Argument(help="SQL text; '-' reads it from stdin.", show_default=False)
    ] = None,
    file: Annotated[Path | None, typer.Option("-f", "--file", help="Read the SQL from this file.")] = None,
    fmt: Annotated[
        SqlFormat,
        typer.Option(
            "--format",
            help="table, csv (formula-like text cells prefixed with '), json, or parquet (with --output).",
        ),
    ] = SqlFormat.table,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the result to this file (csv, json or parquet; replaced atomically; never inside the lake).",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the --output file if it exists (refused otherwise).")
    ] = False,
    shell: Annotated[bool, typer.Option("--shell", help="Interactive session with the same views.")] = False,
    max_rows: Annotated[int, typer.Option("--max-rows", help="Rows shown by --format table.", min=1)] = 1000,
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
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of",
            help="Read the lake as it was at a time, or at the version a report recorded (flows=812,...); "
            "the log keeps 7 days: older is refused (exit 2).",
        ),
    ] = None,
) -> None:
    """Run read-only DuckDB SQL over the lake (or the same SQL on Spark with --engine spark).

    Views: flows, flows_attributed, vm_events, vm_leases, vms, vm_logs, intel, alerts, rejects. Macros:
    who_had(addr, ts), cidr_contains(cidr, addr), ip_to_num(addr), ip_family(addr), ip_between(addr, lo, hi),
    ip_canonical(addr) (the text the lake stores: compare typed addresses through it).
    Only queries run (SELECT, WITH, DESCRIBE, SUMMARIZE, EXPLAIN): COPY, CREATE, INSERT, DELETE, ATTACH, SET
    ... are refused with exit code 2, and so is an --output inside the lake directory (symlinks followed), an
    --output file that exists (unless --force), or --format table with --output.

    Example: tracepipe sql "SELECT src_project, sum(bytes) FROM flows_attributed GROUP BY 1 ORDER BY 2 DESC"
    """
    from tracepipe import engines
    from tracepipe import query as q
    from tracepipe.lake import Lake
    from tracepipe.maintenance import parse_as_of

    p: Printer = ctx.obj
    when = parse_as_of(as_of) if as_of else None
    if isinstance(when, dict):  # a lake version: each table's must exist (else a raw error of the log reader)
        now = open_lake(lake).versions()
        later = {name: v for name, v in when.items() if name not in now or v > now[name]}
        if later:
            raise UsageError(
                f"--as-of: {', '.join(f'{n}={v}' for n, v in later.items())} is later than the lake "
                f"({', '.join(f'{n}={now[n]}' if n in now else f'{n}: no table' for n in later)})"
            )
    snapshot = Lake(lake, as_of=when) if when is not None else open_lake(lake)
    q.check_output(fmt.value, output, snapshot.root, force)  # before the query runs: it may take a while
    if shell:
        q.shell(
            snapshot,
            lambda r: (
                p.error(str(r))
                if isinstance(r, Exception)
                else _print_relation(p, r, snapshot.root, max_rows)
            ),
        )
        return
    relation = engines.query_lake(
        snapshot,
        engines.read_sql(query, file, sys.stdin),
        engine,
        spark_master=spark_master,
        spark_conf=engines.parse_conf(spark_conf),
    )
    if relation is None:
        return
    if fmt == SqlFormat.table:
        _print_relation(p, relation, snapshot.root, max_rows)
        return
    text = q.export_result(relation, fmt.value, output, snapshot.root, force)
    if text is not None:
        p.data(text)


@app.command("who")
def who_command(
    ctx: typer.Context,
    addr: Annotated[str, typer.Argument(help="IPv4 or IPv6 address.", show_default=False)],
    at: Annotated[str, typer.Option("--at", help="ISO 8601 (Z or offset; none = UTC) or epoch seconds.")],
    window: Annotated[
        str,
        typer.Option(
            "--window",
            help="Flow summary over TIME ± this (30m, 1h, 2d): flows that reach into it, begun up to 7 days before.",
        ),
    ] = "1h",
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Which VM held ADDR at TIME, whose it is, what became of it, and what the address did around then.

    Deleted and soft-deleted (quarantined) VMs included. "nobody held ADDR" is an answer, not a failure: it
    names the VMs that held ADDR before and after, and exits 0.

    Exit codes: 0 answered (held or not); 2 ADDR, --at or --window does not parse; 4 no lake at --lake.

    Example: tracepipe who 192.168.1.3 --at 2024-03-12T07:45:00Z --window 30m
    """
    from tracepipe import query as q
    from tracepipe.units import parse_duration, parse_time, time_window

    p: Printer = ctx.obj
    when = parse_time(at)
    if when > time_window()[1]:  # (an open lease named its holder for 2030; trace refuses such times too)
        raise UsageError(f"--at {at!r} is more than a day ahead of now: no lease is known for it yet")
    answer = q.who(open_lake(lake), addr, when, parse_duration(window))
    if output == OutputFormat.json:
        p.json(answer.to_dict())
    else:
        _print_who(p, answer)
    raise typer.Exit(answer.exit_code)


def _print_who(p: Printer, answer: Any) -> None:
    at_text = f"{answer.at:%Y-%m-%d %H:%M:%S} UTC"
    if not answer.held:
        unknown = any("lifecycle records" in note for note in answer.notes)  # (query.lifecycle_note)
        p.line(f"{'no VM on record' if unknown else 'nobody'} held {answer.addr} at {at_text}")
        for lease, label in ((answer.previous_lease, "before"), (answer.next_lease, "after")):
            if lease:
                p.line(
                    f"  {label}: {lease['vm_name'] or ''} ({lease['vm_id']}) held it "
                    f"{lease['valid_from']:%Y-%m-%d %H:%M:%S} - "
                    f"{'now' if lease['valid_to'] is None else format(lease['valid_to'], '%Y-%m-%d %H:%M:%S')}"
                )
    for lease in answer.leases:
        until = "still held" if lease["valid_to"] is None else f"{lease['valid_to']:%Y-%m-%d %H:%M:%S} UTC"
        if lease.get("after_reclaim"):
            until = (
                f"open in the records, but its quarantine ended {lease['quarantine_until']:%Y-%m-%d %H:%M} UTC "
                "with no delete recorded: the cloud reclaimed it then and may have released the address"
            )
        p.line((answer.addr, "bold"), f" at {at_text} was held by")
        p.line(f"  VM          {lease['vm_name'] or '?'} ({lease['vm_id']})")
        p.line(f"  project     {lease['project'] or '?'}")
        p.line(f"  user        {lease['user'] or '?'}")
        p.line(f"  image       {lease['image'] or '?'}")
        p.line(
            f"  hypervisor  {lease['hypervisor'] or '?'}   cloud {lease['cloud'] or '?'}   "
            f"address {lease['addr_kind'] or '?'}"
        )
        p.line(
            f"  lease       {lease['valid_from']:%Y-%m-%d %H:%M:%S} UTC -> {until}"
            + (f" ({lease['end_reason']})" if lease["end_reason"] else "")
        )
        moved = lease["hypervisor_now"] and lease["hypervisor_now"] != lease["hypervisor"]
        p.line(f"  VM now      {lease['now']}" + (f", on {lease['hypervisor_now']}" if moved else ""))
    flows = answer.flows
    p.line(
        f"flows of {answer.addr}{' while the lease above held it,' if answer.held else ' while nobody held it,'}"
        " reaching into "
        f"{flows['from']:%Y-%m-%d %H:%M} - "
        f"{flows['to']:{'%H:%M' if flows['to'].date() == flows['from'].date() else '%Y-%m-%d %H:%M'}} UTC "
        f"(begun from {flows['begun_from']:%Y-%m-%d %H:%M} on): "
        f"{flows['flows']} flows ({flows['flows_out']} out, {flows['flows_in']} in), {flows['bytes']} bytes, "
        f"{flows['peers']} peers"
    )
    p.records(flows["top_peers"], "top peers", ["peer", "flows", "bytes"])
    p.records(flows["top_ports"], "top destination ports", ["proto", "port", "flows", "bytes"])
    for note in answer.notes:
        p.note((note, "yellow"))


@app.command("timeline")
def timeline_command(
    ctx: typer.Context,
    vm: Annotated[
        str, typer.Argument(help="vm_id, or a VM name that only one VM carries.", show_default=False)
    ],
    limit: Annotated[
        int, typer.Option("--limit", help="At most this many rows per section (1 or more).", min=1)
    ] = 200,
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Everything known about one VM: what it is now, lifecycle events, leases, flows per hour, VM logs.

    Exit codes: 0 shown; 2 no VM has that id or name, or several VMs carry the name (give the vm_id);
    4 no lake at --lake.

    Example: tracepipe timeline web-01
    """
    from tracepipe import query as q

    p: Printer = ctx.obj
    answer = q.timeline(open_lake(lake), vm, limit)
    if output == OutputFormat.json:
        p.json(answer.to_dict())
        raise typer.Exit(answer.exit_code)
    info = answer.vm
    p.line(
        (info["vm_name"] or "?", "bold"),
        f" ({answer.vm_id}) project {info['project'] or '?'}, "
        f"user {info['user'] or '?'}, image {info['image'] or '?'}, hypervisor {info['hypervisor'] or '?'}: "
        f"{info['now']}",
    )
    p.records(answer.events, "lifecycle", ["ts", "action", "state", "event_type", "addrs", "addr", "image"])
    p.records(answer.leases, "leases", ["addr", "addr_kind", "valid_from", "valid_to", "end_reason"])
    p.records(answer.flows_per_hour, "flows per hour")
    p.records(answer.logs, "VM logs", ["ts", "app", "auth_event", "auth_user", "auth_src_addr", "message"])
    raise typer.Exit(answer.exit_code)


@app.command("attribute")
def attribute_command(
    ctx: typer.Context,
    day: Annotated[
        list[str] | None, typer.Option("--day", help="UTC day YYYY-MM-DD (repeatable); default all.")
    ] = None,
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Set src_vm/dst_vm in the flow files from the current leases (ingest does this by itself; use it after
    editing leases by hand or to repair a lake). Idempotent.

    Exit codes: 0 done (also when those days hold no flows: it says 0 flows); 2 a --day does not parse;
    4 no lake at --lake, or its files cannot be rewritten; 5 attribution itself failed.

    Example: tracepipe attribute --day 2024-03-12 --day 2024-03-13
    """
    from rich.progress import BarColumn, MofNCompleteColumn

    from tracepipe.correlate.attribution import attribute_lake
    from tracepipe.units import parse_date

    p: Printer = ctx.obj
    days = [parse_date(text).isoformat() for text in day or []]
    with p.progress(BarColumn(), MofNCompleteColumn()) as bar:
        task = bar.add_task("attribute flows", total=None)
        result = attribute_lake(
            open_lake(lake, existing=True),
            days or None,
            progress=lambda _path, done, total: bar.update(task, completed=done, total=total),
        )
    if output == OutputFormat.json:
        p.json(result.to_dict())
    else:
        p.line(
            f"{result.rows} flows in {result.files} files: {result.src_attributed} sources and "
            f"{result.dst_attributed} destinations attributed to a VM ({result.seconds} s)"
        )
    raise typer.Exit(result.exit_code)


leases_app = typer.Typer(
    help="VM address leases: who held which address when.\n\nExample: tracepipe leases rebuild --lake /srv/lake",
    no_args_is_help=True,
)
app.add_typer(leases_app, name="leases")


@leases_app.command("rebuild")
def leases_rebuild_command(
    ctx: typer.Context,
    at_once: Annotated[
        int | None,
        typer.Option(
            "--at-once",
            min=0,
            help="Replay at most this many events at once, in memory (~0.6 KB each); a longer history is "
            "replayed in time slices of whole days. 0: all at once. Default: as many as a quarter of this "
            "machine's memory holds.",
        ),
    ] = None,
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Rebuild vm_leases and vms from every lifecycle event in the lake (vectorised; ingest updates them
    incrementally by itself), then re-attribute the flows and VM log lines of the days that changed. A repair:
    use it after a failed update (exit code 5) or to check an incremental lake against a full build.
    Up to --at-once events are replayed at once, in memory (~0.6 KB an event); a longer history in time
    slices of whole days (1 M events each, applied as the hourly update applies new events), so that memory
    stays bounded whatever the years kept (slower: ~0.3 M events/s). Readers see the old leases until the new
    ones are committed.

    Exit codes: 0 done; 4 no lake at --lake or it cannot be written; 5 the rebuild or attribution failed.

    Example: tracepipe leases rebuild --lake /srv/lake --at-once 4000000
    """
    from tracepipe.correlate.attribution import correlate

    p: Printer = ctx.obj
    path = open_lake(lake, existing=True)
    with p.status("rebuilding leases") as status:
        result = correlate(
            path, full=True, at_once=at_once, progress=lambda step: status(f"rebuilding leases: {step}")
        )
    if result.unwritable:
        # (the repair itself could not write: not "finish with leases rebuild", and no summary of nothing)
        result.error = f"cannot rebuild the leases in {path.root}: {result.cause}. Free space or make the lake writable, then run it again."
        result.exit_code = EXIT_FAILED
    if output == OutputFormat.json:
        p.json(result.to_dict())
    elif not result.unwritable:
        p.line(
            f"{result.lease_rows} leases, {result.vms} VMs from {result.leases.get('events', 0)} events in "
            f"{result.leases.get('seconds', 0)} s ({result.leases.get('reason') or 'full'}); re-attributed: "
            f"{', '.join(result.days) or 'nothing'}"
        )
    if result.error:
        p.error(result.error)
    raise typer.Exit(result.exit_code)


# ---- commands: lake maintenance -----------------------------------------------------------------------------


@app.command("compact")
def compact_command(
    ctx: typer.Context,
    dataset: Annotated[
        list[str] | None, typer.Option("--dataset", help="flows, vm_logs, ... (repeatable); default all.")
    ] = None,
    day: Annotated[
        list[str] | None, typer.Option("--day", help="UTC day YYYY-MM-DD (repeatable); default all.")
    ] = None,
    min_files: Annotated[
        int, typer.Option("--min-files", help="Merge a day once it holds this many small files.", min=2)
    ] = 2,
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Merge each day's small files into files of sorted row groups, one commit per day. Ingest and the
    collector do this by themselves once a day holds 16 small files; readers running meanwhile see every row
    exactly once.

    Example: tracepipe compact --dataset flows --day 2024-03-12 --lake /srv/lake
    """
    from tracepipe.maintenance import compact_lake
    from tracepipe.units import parse_date

    p: Printer = ctx.obj
    days = [parse_date(text).isoformat() for text in day or []] or None
    result = compact_lake(open_lake(lake, existing=True), dataset or None, days, min_files=min_files)
    if output == OutputFormat.json:
        p.json(result.to_dict())
    else:
        for name, done in result.datasets.items():
            p.line(
                f"{name}: {done['days']} days compacted, {done['files_removed']} files merged into "
                f"{done['files_added']} ({done['rows']} rows)"
            )
    raise typer.Exit(result.exit_code)


@app.command("expire")
def expire_command(
    ctx: typer.Context,
    older_than: Annotated[
        str, typer.Option("--older-than", help="Remove days older than this (e.g. 400d, 56w).")
    ],
    no_vacuum: Annotated[
        bool, typer.Option("--no-vacuum", help="Only commit the removal; delete the files later (vacuum).")
    ] = False,
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Retention: remove flows, VM logs and rejects of the days older than --older-than, one commit per table
    (the log records what went and when), then delete the files no version of the last 7 days lists. VM
    events, leases, VMs and alerts are kept.

    Example: tracepipe expire --older-than 400d --lake /srv/lake --format json >> /var/log/tracepipe-expire.jsonl
    """
    from tracepipe.maintenance import expire_lake
    from tracepipe.units import parse_duration

    p: Printer = ctx.obj
    result = expire_lake(
        open_lake(lake, existing=True), parse_duration(older_than, positive=True), vacuum=not no_vacuum
    )
    if output == OutputFormat.json:
        p.json(result.to_dict())
    else:
        p.line(f"expired everything before {result.before} (UTC):")
        for gone in result.datasets:
            days = gone["days"]
            span = f"{days[0]} .. {days[-1]}" if days else "nothing"
            p.line(
                f"  {gone['dataset']}: {len(days)} days ({span}), {gone['files']} files, {gone['rows']} rows"
            )
        if result.vacuumed:
            p.line(f"  files deleted from disk: {sum(result.vacuumed.values())}")
    raise typer.Exit(result.exit_code)


@app.command("vacuum")
def vacuum_command(
    ctx: typer.Context,
    retain: Annotated[
        str, typer.Option("--retain", help="Keep files a version of this recent past still lists.")
    ] = "7d",
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Delete files that no table version within --retain lists (merged by compaction, expired, rewritten by
    attribution, or left by a killed writer), and the staging of lease rebuilds killed before they ended (older
    than --retain, at least a day). Time travel (sql --as-of) reaches back as far as --retain.

    Example: tracepipe vacuum --retain 30d --lake /srv/lake
    """
    from tracepipe.maintenance import vacuum_lake
    from tracepipe.units import parse_duration

    p: Printer = ctx.obj
    result = vacuum_lake(open_lake(lake, existing=True), parse_duration(retain, positive=True))
    if output == OutputFormat.json:
        p.json(result)
    else:
        for name, deleted in result["deleted"].items():
            p.line(f"{name}: {deleted} files deleted")
        if result["lease_rebuilds_removed"]:
            p.line(f"staging of killed lease rebuilds: {result['lease_rebuilds_removed']} removed")
    raise typer.Exit(result["exit_code"])


@app.command("repair")
def repair_command(
    ctx: typer.Context,
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Only look: list the damaged files, change nothing (exit 1 if there are any). For monitoring.",
        ),
    ] = False,
) -> None:
    """Take damaged files out of the lake: files a table's log lists that are missing, truncated, replaced,
    not Parquet, or hold columns of other types than their table's (every query fails on them) are moved to
    LAKE/_damaged/ (kept as evidence) and removed from the log in one commit per table. Their rows leave the
    lake. Safe to run twice. With --check nothing is changed: exit 0 when no file is damaged, 1 when some are
    (a monitoring job's health check).

    Example: tracepipe repair --lake /srv/lake --check --format json
    """
    p: Printer = ctx.obj
    target = open_lake(lake)
    target.require()
    if check:
        from tracepipe.lake import DATASETS, MANIFEST_DIR

        found = {
            name: {entry.relative: reason for entry, reason in bad}
            for name in [*DATASETS, MANIFEST_DIR]
            if (bad := target.damaged(name, read_footers=True))
        }
        code = EXIT_FOUND if found else 0
        if output == OutputFormat.json:
            p.json({"damaged": found, "exit_code": code})
            raise typer.Exit(code)
        if not found:
            p.line("no damaged file: every file the logs list is there, of its size, and reads as Parquet")
        for name, files in found.items():
            for relative, why in files.items():
                p.line(f"{name}: {relative} is damaged ({why}): `tracepipe repair` takes it out")
        raise typer.Exit(code)
    moved = target.repair()
    outside = target.outside_removed
    if output == OutputFormat.json:
        p.json(
            {"moved": moved, "why": target.damage_reasons, "outside_entries_removed": outside, "exit_code": 0}
        )
        raise typer.Exit(0)
    if not moved and not outside:
        p.line("no damaged file: every file the logs list is there, of its size, and reads as Parquet")
    for name, files in moved.items():
        for relative in files:
            why = target.damage_reasons.get(name, {}).get(relative, "damaged")
            p.line(f"{name}: {relative} moved to {target.root / '_damaged' / name / relative} ({why})")
    for name, files in outside.items():
        for relative in files:
            why = target.damage_reasons.get(name, {}).get(relative, "outside the table")
            p.line(f"{name}: log entry {relative!r} removed, the file left where it is ({why})")
    raise typer.Exit(0)


@app.command("upgrade")
def upgrade_command(
    ctx: typer.Context,
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Put a lake written by tracepipe before 0.2 (loose Parquet files) under transaction logs, in place: no
    row is copied except flows, which gain their attributed_at column. Safe to run twice.

    Example: tracepipe upgrade --lake /srv/lake
    """
    from tracepipe.maintenance import upgrade_lake

    p: Printer = ctx.obj
    result = upgrade_lake(open_lake(lake))
    if output == OutputFormat.json:
        p.json(result.to_dict())
    else:
        if not result.converted:
            p.line("nothing to upgrade: every dataset already has a transaction log")
        for name, files in result.converted.items():
            p.line(f"{name}: {files} files now under a transaction log")
    raise typer.Exit(result.exit_code)


# ---- commands: collect --------------------------------------------------------------------------------------


@app.command("collect")
def collect_command(
    ctx: typer.Context,
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
    limit: Annotated[
        list[str],
        typer.Option(
            "--limit",
            help="Raise or lower one decoder limit, NAME=NUMBER (e.g. exporters=8192); repeat. "
            "Names and defaults: README, Limits.",
        ),
    ] = [],  # noqa: B006
    reuseport: Annotated[
        bool,
        typer.Option(
            "--reuseport",
            help="Share the --listen ports with other collectors started so (each with its own --spool): "
            "the kernel spreads the exporters over them, one CPU each.",
        ),
    ] = False,
) -> None:
    """Receive NetFlow v1/v5/v9 and IPFIX over UDP, spool the datagrams, and commit them to the lake.

    Runs in the foreground, logs to stderr, stops cleanly on SIGTERM/SIGINT (rotates, commits, exits 0).

    Example: tracepipe collect --listen 0.0.0.0:2055 --listen [::]:4739 --allow 10.0.0.0/8 --lake /srv/lake --rotate 5m

    Example: tracepipe collect --listen 0.0.0.0:4739 --limit exporters=8192 --limit templates_total=32768

    Example: tracepipe collect --listen 0.0.0.0:2055 --reuseport --spool /srv/spool/2 --lake /srv/lake
    """
    import logging

    from tracepipe.collector import CollectorConfig, run_collector
    from tracepipe.limits import DEFAULT as DEFAULT_LIMITS
    from tracepipe.units import parse_duration, parse_listen, parse_size

    logging.basicConfig(
        level=logging.DEBUG if ctx.obj.debug else logging.INFO,
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
        limits=DEFAULT_LIMITS.override(limit),
        reuseport=reuseport,
    )
    raise typer.Exit(run_collector(config))


# ---- commands: sweep / model / intel ------------------------------------------------------------------------

model_app = typer.Typer(
    help="The anomaly model: fit on a baseline period, score windows.\n\n"
    "Example: tracepipe model fit --since 2025-06-01 --until 2025-06-15 --pipeline site/nightly.toml",
    no_args_is_help=True,
)
app.add_typer(model_app, name="model")
intel_app = typer.Typer(
    help="Threat-intelligence indicators (MISP exports, address lists).\n\n"
    "Example: tracepipe intel import misp-event.json --lake /srv/lake",
    no_args_is_help=True,
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


@app.command("sweep")
def sweep_command(
    ctx: typer.Context,
    pipeline: Annotated[
        Path,
        typer.Argument(
            help="Pipeline file, e.g. site/nightly.toml (`tracepipe init site` writes the templates).",
            show_default=False,
        ),
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
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Only read and check the pipeline file, touching no lake: print its settings (defaults "
            "included) and exit 0, or 2 naming the key and line (a pipeline file's CI).",
        ),
    ] = False,
) -> None:
    """Run a sweep: ingest the pipeline's drop folders, run its detectors and model over the window, append
    new alerts to the lake, write the JSON (and HTML) report, print a summary.

    Without --since/--until the window is the last completed `window.last` of the pipeline (hourly: the
    previous hour; nightly: yesterday). Rerunning a window adds no duplicate alerts. Such a scheduled run
    also sweeps again the earlier windows that flows landed in after they were swept (a connection exported
    when it ended, a collector's backlog): `[window] late` and `late_windows`.

    Exit codes: 0 nothing new (also: no flows in the window, said in the summary); 1 new alerts;
    2 bad pipeline file (the message names the key and line); 3 some input rejected and nothing new; 4 failed.

    Example: tracepipe sweep site/nightly.toml --since 2025-06-17T00:00 --until 2025-06-18T00:00 --lake /srv/lake

    Example: tracepipe sweep site/nightly.toml --check --format json
    """
    if check:
        from tracepipe.pipeline_config import DETECTOR_NAMES, load_pipeline

        config = load_pipeline(pipeline)
        settings = config.settings()
        checked = {"pipeline_file": config.path, "pipeline_sha256": config.digest, "settings": settings}
        p: Printer = ctx.obj
        if output_format == OutputFormat.json:
            p.json(checked)
        else:
            on = [n for n in DETECTOR_NAMES if settings["detectors"].get(n, {}).get("enabled")]
            p.line(
                (config.pipeline.name, "bold"),
                f": {config.path} is a valid pipeline file (sha256 {config.digest[:16]})",
            )
            p.line(
                f"  window {settings['window']['last']:g} s, detectors: {', '.join(on) or 'none'}; model: "
                f"{'on' if config.model.enabled else 'off'}; --format json prints every setting"
            )
        raise typer.Exit(0)
    if engine != "spark":  # the local engine never uses pandas (its import: ~0.25 s CPU of every sweep)
        refuse_pandas()
    from tracepipe.engines import parse_conf
    from tracepipe.sweep import run_sweep
    from tracepipe.units import parse_time

    p: Printer = ctx.obj
    with p.status("sweep") as status:
        result = run_sweep(
            open_lake(lake),
            pipeline,
            parse_time(since) if since else None,
            parse_time(until) if until else None,
            engine=engine,
            on_stage=lambda name: status(f"sweep: {name}"),
            spark_master=spark_master,
            spark_conf=parse_conf(spark_conf),
        )
    summary = result.to_dict()
    from tracepipe.sweep import FAILURE_NOTES

    for note in result.notes:
        if note.startswith(FAILURE_NOTES):
            p.error(note, label="warning:")
    if output_format == OutputFormat.json:
        p.json(summary)
    else:
        p.line((result.pipeline, "bold"), f": {result.message}")
        for row in summary["top"]:
            colour = "red" if row["score"] and row["score"] >= 0.8 else "yellow"
            p.line("  ", (f"{row['detector']:>15}", colour), f" {row['score']:.2f}  {row['reason']}")
        for note in result.notes:
            p.line(f"  note: {note}")
        for kind, path in result.report_paths.items():
            p.line(f"  report ({kind}): {path}")
    raise typer.Exit(result.exit_code)


@model_app.command("fit")
def model_fit_command(
    ctx: typer.Context,
    since: Annotated[
        str, typer.Option("--since", help="Baseline start (ISO 8601 / epoch).", show_default=False)
    ],
    until: Annotated[str, typer.Option("--until", help="Baseline end (exclusive).", show_default=False)],
    pipeline: Annotated[
        Path | None,
        typer.Option(
            "--pipeline",
            help="Pipeline file giving local_networks and the model path (default: the packaged nightly "
            "template; `tracepipe init` writes editable copies).",
            show_default=False,
        ),
    ] = None,
    lake: LakeOption = Path(DEFAULT_LAKE),
    output_format: FormatOption = OutputFormat.table,
) -> None:
    """Fit the IsolationForest on per (host, hour) features of a baseline period and save it in the lake
    (plain arrays in an .npz that loads without pickle, + a JSON sidecar of feature names, scikit-learn
    version, fit window and the .npz's SHA-256). A model file that is not such a pair is refused, never loaded.

    Example: tracepipe model fit --since 2025-06-01 --until 2025-06-15 --pipeline site/nightly.toml
    """
    from tracepipe.detect.model import fit_pipeline
    from tracepipe.units import parse_time

    p: Printer = ctx.obj
    with p.status("model fit"):
        result = fit_pipeline(open_lake(lake), pipeline, parse_time(since), parse_time(until))
    if output_format == OutputFormat.json:
        p.json(result.to_dict())
    else:
        p.line(
            f"fitted on {result.info.rows:,} (host, hour)s of {result.info.hosts:,} hosts -> {result.path}"
        )
    raise typer.Exit(result.exit_code)


@model_app.command("score")
def model_score_command(
    ctx: typer.Context,
    since: Annotated[str, typer.Option("--since", help="Start of the windows to score.", show_default=False)],
    until: Annotated[str, typer.Option("--until", help="End (exclusive).", show_default=False)],
    top: Annotated[int, typer.Option("--top", help="Show the N highest.", min=1)] = 20,
    pipeline: Annotated[
        Path | None,
        typer.Option(
            "--pipeline",
            help="Pipeline file (model path, baseline; default: the packaged nightly template).",
            show_default=False,
        ),
    ] = None,
    lake: LakeOption = Path(DEFAULT_LAKE),
    output_format: FormatOption = OutputFormat.table,
) -> None:
    """Rank the (host, hour)s of a period with the fitted model; each says which features stood out.

    Example: tracepipe model score --since 2025-06-17 --until 2025-06-18 --top 10
    """
    from tracepipe.detect.model import score_pipeline
    from tracepipe.units import parse_time

    p: Printer = ctx.obj
    with p.status("model score"):
        result = score_pipeline(open_lake(lake), pipeline, parse_time(since), parse_time(until), top)
    if output_format == OutputFormat.json:
        p.json(result.to_dict())
        raise typer.Exit(result.exit_code)
    for r in result.rows:
        why = "; ".join(
            f"{e['feature']}={e['value']:g} (baseline {e['baseline']:g})" for e in r["explanation"]
        )
        p.line(f"{r['anomaly_score']:.3f}  {r['host']:<20} {r['window_start']:%Y-%m-%d %H:%M}  {why}")
    raise typer.Exit(result.exit_code)


@intel_app.command("import")
def intel_import_command(
    ctx: typer.Context,
    path: Annotated[
        Path,
        typer.Argument(
            help="MISP CSV/JSON export, STIX bundle, or a list of addresses/CIDRs.", show_default=False
        ),
    ],
    input_format: Annotated[
        str, typer.Option("--format", help="auto, misp-csv, misp-json, stix (STIX 2.x bundle) or list.")
    ] = "auto",
    include_non_ids: Annotated[
        bool,
        typer.Option(
            "--include-non-ids",
            help="Keep MISP attributes marked to_ids false (context) or deleted, and revoked STIX indicators "
            "(skipped and counted by default: they would alert).",
        ),
    ] = False,
    pipeline: Annotated[
        Path | None,
        typer.Option(
            "--pipeline",
            help="Pipeline file whose local_networks (the site's own address space) no indicator may overlap "
            "(default: the packaged nightly template).",
            show_default=False,
        ),
    ] = None,
    allow_local: Annotated[
        bool,
        typer.Option("--allow-local", help="Import indicators that overlap the local networks too."),
    ] = False,
    lake: LakeOption = Path(DEFAULT_LAKE),
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="table or json.")
    ] = OutputFormat.table,
) -> None:
    """Load threat-intel indicators into the lake's `intel` dataset (importing the same file twice adds
    nothing). Bad lines go to the `rejects` dataset with their line number. MISP attributes marked to_ids
    false or deleted are skipped and counted unless --include-non-ids. An indicator overlapping the pipeline's
    local_networks is a reject unless --allow-local; a feed whose networks cover more than an IPv4 /8 (IPv6
    /16) together is refused whole (exit 4).

    Exit codes: 0 all imported; 3 some lines rejected; 4 nothing usable.

    Example: tracepipe intel import misp-export.csv && tracepipe sweep site/retro-hunt.toml
    """
    from tracepipe.intel import import_intel

    p: Printer = ctx.obj
    from tracepipe.pipeline_config import load_pipeline

    local = [] if allow_local else load_pipeline(pipeline).pipeline.local_networks
    result = import_intel(
        open_lake(lake), path, input_format, include_non_ids=include_non_ids, local_networks=local
    )
    if output == OutputFormat.json:
        p.json(result.to_dict())
    elif result.already_imported:
        p.line(f"{path}: already imported (same content), nothing added")
    else:
        not_for_detection = (
            f", {result.skipped_not_ids} marked to_ids false and {result.skipped_deleted} deleted or revoked "
            "skipped (--include-non-ids keeps them)"
            if result.skipped_not_ids or result.skipped_deleted
            else ""
        )
        p.line(
            f"{path} ({result.format}): {result.rows} indicators, {result.rejects} rejected, "
            f"{result.skipped_types} attributes of other types skipped{not_for_detection}"
        )
    raise typer.Exit(result.exit_code)


# ---- commands: init ----------------------------------------------------------------------------------------


@app.command("init")
def init_command(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="Where the pipeline files go (made if missing).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite pipeline files already there.")] = False,
    output: FormatOption = OutputFormat.table,
) -> None:
    """Write editable copies of the pipeline templates (hourly.toml, nightly.toml, retro-hunt.toml) into
    DIRECTORY for a site to start from. Files already there are kept unless --force.

    Exit codes: 0 written; 2 a file exists (nothing written) or the directory is not writable.

    Example: tracepipe init /srv/tracepipe/pipelines && tracepipe sweep /srv/tracepipe/pipelines/nightly.toml
    """
    from tracepipe.pipeline_config import write_templates

    p: Printer = ctx.obj
    result = write_templates(directory, force=force)
    if output == OutputFormat.json:
        p.json(result.to_dict())
    else:
        for path in result.written:
            p.line(f"wrote {path}")
    raise typer.Exit(result.exit_code)


# ---- commands: demo -----------------------------------------------------------------------------------------


@app.command("demo")
def demo_command(
    ctx: typer.Context,
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

    Ingests the bundled story (softflowd NetFlow v9 + IPFIX captures, Nova, Neutron, OpenNebula, syslog, MISP)
    into a fresh lake, builds the leases, runs the nightly pipeline template over the story window, prints each finding
    with its VM, project and owner, the report path and three commands to try next.

    Example: tracepipe demo --lake /tmp/demo-lake
    """
    from tracepipe.demo import STORY_DIR, run_demo

    p: Printer = ctx.obj
    with p.status("demo") as status:
        result = run_demo(lake, story or STORY_DIR, progress=lambda step: status(f"demo: {step}"))
    if output == OutputFormat.json:
        p.json(result.to_dict())
    else:
        _print_demo(p, result)
    raise typer.Exit(result.exit_code)


def _print_demo(p: Printer, result: Any) -> None:
    start, end = result.window
    p.line(
        ("tracepipe demo", "bold"),
        f": sample story {start:%Y-%m-%d %H:%M}–{end:%H:%M} UTC, lake {result.lake}",
    )
    marks = {"ok": "green", "failed": "red", "missing": "yellow"}
    for step in result.steps:
        numbers = ", ".join(
            f"{k} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k} {v}"
            for k, v in step.numbers.items()
        )
        detail = f" — {step.detail}" if step.detail else ""
        p.line(
            "  ",
            (step.status, marks.get(step.status, "")),
            f"  {step.name}: {numbers}{detail} ",
            (f"({step.seconds:.1f} s)", "dim"),
        )
    p.line("")
    p.line(("Findings", "bold"), f": {len(result.findings)} (host, detector) pairs, strongest first")
    for n, f in enumerate(result.findings, 1):
        state = f["vm_status"] or "unknown"
        if f.get("quarantine_until"):
            state += f", quarantined until {f['quarantine_until'][:16]}"
        who = (
            f"VM {f['vm_name']} · project {f['project']} · owner {f['user']} · {f['hypervisor']} · {state}"
            if f["vm_name"]
            else "no VM held this address"
        )
        p.line(f"{n:>2}. ", (f["detector"] or "", "bold"), f"  {f['addr'] or ''}  {who}")
        p.line(f"    {f['reason'] or ''}")
    p.line("")
    p.line(
        f"Ground truth (the story's ground_truth.json): {result.truth_found}/{len(result.truth_check)} "
        "planted incidents found and attributed to the right VM and owner; "
        f"{len(result.false_positives)} ordinary hosts alerted"
        + (f" ({', '.join(result.false_positives)})" if result.false_positives else "")
        + "."
    )
    for check in result.truth_missed:
        p.line(
            "  ",
            ("not found/attributed:", "yellow"),
            f" {check['kind']} {check['addr']} ({check['vm_name']})",
        )
    if result.report.get("html"):
        p.line(
            "Report: ",
            (result.report["html"], "bold"),
            f" (open it in a browser; JSON: {result.report.get('json', '')})",
        )
    p.line("Try next:")
    for command in result.next_commands:
        p.line(f"  {command}")
    p.line((f"{result.seconds:.1f} s", "dim"))


# ---- commands: trace / export (respond to an incident, share with MISP/STIX) --------------------------------

export_app = typer.Typer(
    help="Share findings: a MISP event or a STIX 2.1 bundle from an incident package or alert ids.\n\n"
    "Example: tracepipe export misp ssc-2025-06 --tlp amber --out event.json",
    no_args_is_help=True,
)
app.add_typer(export_app, name="export")


@app.command("trace")
def trace_command(
    ctx: typer.Context,
    source: Annotated[
        Path,
        typer.Argument(
            help="Observations: CSV/JSON (address, port, peer, time or start/end), a MISP event JSON, or a "
            "file of tracepipe alert ids.",
            show_default=False,
        ),
    ],
    window: Annotated[
        str, typer.Option("--window", help="Look at each observation's time (range) ± this.")
    ] = "1h",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write the incident package (HTML, JSON, CSV, Parquet) into this folder."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a package already in --out.")] = False,
    include_spread: Annotated[
        bool,
        typer.Option(
            "--include-spread", help="Also name other tenants' VMs that talked to the same peers (privacy!)."
        ),
    ] = False,
    input_format: Annotated[
        str, typer.Option("--input-format", help="auto, csv, json, misp or alerts.")
    ] = "auto",
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Answer a list of observations (a Security Service Challenge, a CSIRT ticket) in one go: for each, the
    VM that held the address then (deleted and quarantined ones included), owner, project, image, hypervisor, cloud,
    the matching flows; for each VM found, its connections and logs in the window and the owner's and
    project's other VMs alive then and now. What is uncertain is said, never guessed.

    Exit codes: 0 every observation answered; 2 bad option, or --out exists (use --force) or is in the lake;
    3 some input lines rejected (listed), the rest answered; 4 no observation could be read, or no lake.

    Example: tracepipe trace ssc-ticket.csv --window 30m --out ssc-2025-06 --lake /srv/lake
    """
    from tracepipe.respond import trace_observations
    from tracepipe.units import parse_duration

    p: Printer = ctx.obj
    with p.err.status("trace"):
        result = trace_observations(
            open_lake(lake),
            source,
            input_format,
            parse_duration(window),
            include_spread=include_spread,
            out=out,
            force=force,
        )
    if output == OutputFormat.json:
        p.json(result.to_dict())
    else:
        _print_trace(p, result)
    if not result.observations and not result.rejects:
        p.error(
            f"{source} holds no observation (a CSV or JSON list of address and time, a MISP event, or tracepipe alert ids)"
        )
    raise typer.Exit(result.exit_code)


def _print_trace(p: Printer, result: Any) -> None:
    names = {vm.get("vm_id"): vm.get("vm_name") for vm in result.vms}
    for answer in result.observations:
        where = f"{answer['address']}" + (f" port {answer['port']}" if answer["port"] is not None else "")
        where += f" peer {answer['peer']}" if answer["peer"] else ""
        start, end = answer["start"], answer["end"]
        # the end's date too when it is another day (a day-long range printed "00:00:00 - 00:00:00")
        end_format = "%H:%M:%S" if end.date() == start.date() else "%Y-%m-%d %H:%M:%S"
        when = f"{start:%Y-%m-%d %H:%M:%S}" + (f" - {end:{end_format}}" if end != start else "")
        p.line((f"{answer['obs']:>4}. ", "bold"), f"{where} at {when} UTC ({answer['ref']})")
        for h in answer["holders"]:
            p.line(
                "      VM ",
                (h["vm_name"] or h["vm_id"], "bold"),
                f" ({h['vm_id']}) · owner {h['user'] or '?'} · project {h['project'] or '?'} · "
                f"image {h['image'] or '?'} · {h['hypervisor'] or '?'} · {h['cloud'] or '?'} · now: {h['now']}",
            )
        if answer["contacts"]:
            contacts = [f"{c} ({names[c]})" if names.get(c) else c for c in answer["contacts"]]
            p.line(f"      contacted by VMs: {', '.join(contacts)}")
        p.line(f"      {answer['matching_flows']} matching flows")
        for note in answer["ambiguities"]:
            p.line("      ", ("note:", "yellow"), f" {note}")
    for vm in result.vms:
        t = vm["traffic"]
        p.line(
            ("VM ", "bold"),
            (vm["vm_name"] or vm["vm_id"], "bold"),
            f": {t['flows']} flows, {t['peers']} peers, {t['bytes_out']} bytes out; "
            f"owner's other VMs {len(vm['owner_vms'])}, project's {len(vm['project_vms'])}"
            + (f", spread {len(vm['spread'])}" if result.include_spread else ""),
        )
    for reject in result.rejects:
        p.note(("rejected:", "yellow"), f" {reject['ref']}: {reject['reason']}")
    summary = result.summary
    p.line(
        f"{summary['observations']} observations: {summary['held']} with a holder, {summary['not_held']} "
        f"nobody held, {summary['outside_cloud']} outside the cloud; {summary['vms']} VMs; "
        f"{summary['evidence_flows']} evidence flows ({result.seconds:.1f} s)"
    )
    if result.package:
        p.line(
            "package: ",
            (str(result.package["html"]), "bold"),
            f" (and {', '.join(str(path.name) for kind, path in result.package.items() if kind != 'html')})",
        )


def _export(ctx: typer.Context, fmt: str, output: OutputFormat, **options: Any) -> None:
    from tracepipe.respond.share import export

    p: Printer = ctx.obj
    result = export(fmt, **options)
    if output == OutputFormat.json and result.path is None:
        p.json(result.document)
    elif output == OutputFormat.json:
        p.json(result.to_dict())
    else:
        if result.path is None and not result.pushed_to:
            p.json(result.document)
        else:
            p.note(f"{result.indicators} indicators -> {result.path or result.pushed_to}")
    for note in result.notes:
        p.note(note)
    raise typer.Exit(result.exit_code)


ExportSource = Annotated[
    Path,
    typer.Argument(
        help="An incident package folder (tracepipe trace --out), or a file of alert ids.", show_default=False
    ),
]
ExportOut = Annotated[
    Path | None, typer.Option("--out", help="Write the document here (default: stdout).", show_default=False)
]
IncludeLocal = Annotated[
    bool, typer.Option("--include-local", help="Also share the cloud's own VM addresses (ip-src, no IDS).")
]
TlpOption = Annotated[str, typer.Option("--tlp", help="TLP: clear, green, amber, amber+strict, red.")]
InfoOption = Annotated[str | None, typer.Option("--info", help="Event title.", show_default=False)]
SiteOption = Annotated[
    str | None,
    typer.Option(
        "--site",
        envvar="TRACEPIPE_SITE",
        help="Your site's name as the producer of what you share (the STIX identity; ids derive from it and the "
        "package: set it once, e.g. in $TRACEPIPE_SITE).",
        show_default=False,
    ),
]
ForceOut = Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")]


@export_app.command("misp")
def export_misp_command(
    ctx: typer.Context,
    source: ExportSource,
    out: ExportOut = None,
    include_local: IncludeLocal = False,
    tlp: TlpOption = "amber",
    distribution: Annotated[
        int, typer.Option("--distribution", help="0 your organisation, 1 community, 2 connected, 3 all.")
    ] = 0,
    info: InfoOption = None,
    push: Annotated[
        str | None,
        typer.Option(
            "--push", help="Also send it to this MISP (https URL; API key in $MISP_KEY).", show_default=False
        ),
    ] = None,
    site: SiteOption = None,
    force: ForceOut = False,
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Write a MISP event (MISP core format JSON): the outside addresses the evidence names as ip-dst /
    ip-dst|port with first/last seen and sightings, TLP tag and distribution. Local VM addresses stay home
    unless --include-local; VM names, owners and projects never leave.

    Exit codes: 0 written (or pushed); 2 bad option, or --push without https or without $MISP_KEY;
    4 the source is not a package / no alert found, or the MISP refused.

    Example: tracepipe export misp ssc-2025-06 --tlp amber --out ssc-2025-06.misp.json
    """
    _export(
        ctx,
        "misp",
        output,
        source=source,
        lake=open_lake(lake),
        out=out,
        include_local=include_local,
        tlp=tlp,
        distribution=distribution,
        info=info,
        push=push,
        site=site,
        force=force,
    )


@export_app.command("stix")
def export_stix_command(
    ctx: typer.Context,
    source: ExportSource,
    out: ExportOut = None,
    include_local: IncludeLocal = False,
    tlp: TlpOption = "amber",
    info: InfoOption = None,
    site: SiteOption = None,
    force: ForceOut = False,
    output: FormatOption = OutputFormat.table,
    lake: LakeOption = Path(DEFAULT_LAKE),
) -> None:
    """Write a STIX 2.1 bundle: per outside address an indicator, the observed-data of what the site saw and
    a sighting; TLP as the standard marking definitions. Local VM addresses only with --include-local.

    Exit codes: 0 written; 2 bad option; 4 the source is not a package / no alert found.

    Example: tracepipe export stix ssc-2025-06 --out ssc-2025-06.stix.json
    """
    _export(
        ctx,
        "stix",
        output,
        source=source,
        lake=open_lake(lake),
        out=out,
        include_local=include_local,
        tlp=tlp,
        info=info,
        site=site,
        force=force,
    )


def main() -> None:
    """Entry point (errors become one red line and their exit code in the app's group, see _Tracepipe)."""
    app()


if __name__ == "__main__":
    main()
