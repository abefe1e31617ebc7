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
