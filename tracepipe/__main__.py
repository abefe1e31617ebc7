"""The `tracepipe` command's entry point (also `python -m tracepipe` and `python -m tracepipe.cli`).

Light on purpose: for `ingest netflow` on a big file it starts the decode workers (decode_pool.prestart) before
the CLI loads typer, rich and pydantic, so that their start-up uses the core that would otherwise wait (issue
17); then it runs the typer app in tracepipe/cli.py.
"""

from __future__ import annotations

import sys


def main() -> None:
    from tracepipe.ingest.decode_pool import prestart

    prestart(sys.argv[1:])
    from tracepipe.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
