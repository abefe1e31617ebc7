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

# ---- commands: sql / who / timeline -------------------------------------------------------------------------

# ---- commands: collect --------------------------------------------------------------------------------------

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
