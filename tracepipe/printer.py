"""The one printer of the command line: data on stdout, messages and progress on stderr.

Both are rich Consoles made by `make_console`: on a terminal they use its width; in a pipe, a file or cron's
mail, a very wide page with soft wrap, so that no line is broken at 80 columns. Nothing printed is read as
markup (styles are given as (text, style) pairs, never inside the text), and control characters in text that
came from outside (VM names, log lines, user names, paths) are shown escaped (`\\x1b`), not sent to the terminal.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

PIPE_WIDTH = 1_000_000  # not a terminal: lines as long as they are (soft wrap), tables never squashed
# C0 controls, DEL and C1 controls -> \xNN: an ESC or CR in a VM name cannot move the cursor or rewrite a line
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}

Part = str | tuple[str, str]  # plain text, or (text, rich style)


def make_console(*, stderr: bool = False) -> Console:
    """A Console on stdout (or stderr): the terminal's width there, else one very long soft-wrapped line per
    line printed. Markup, emoji codes and highlighting are off: text is shown as it is."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(
        file=stream,
        width=None if terminal else PIPE_WIDTH,
        soft_wrap=not terminal,
        markup=False,
        emoji=False,
        highlight=False,
    )


def clean(value: Any) -> str:
    """Text of a value from outside, control characters escaped."""
    return str(value).translate(_CONTROL)


def cell(value: Any) -> Text:
    """A table cell: UTC times without microseconds and offset, lists comma-joined, None empty."""
    if value is None:
        return Text("")
    if isinstance(value, dt.datetime):
        value = value.astimezone(dt.UTC) if value.tzinfo else value
        return Text(f"{value:%Y-%m-%d %H:%M:%S}")
    if isinstance(value, list):
        return Text(", ".join(cell(v).plain for v in value))
    return Text(clean(value))


def styled(*parts: Part) -> Text:
    """One line from parts: plain strings, or (string, style) pairs; every string is cleaned."""
    return Text.assemble(*((clean(p[0]), p[1]) if isinstance(p, tuple) else clean(p) for p in parts))


@dataclass
class Printer:
    """What every command prints through; passed to commands as the typer context object."""

    debug: bool = False
    out: Console = field(default_factory=make_console)
    err: Console = field(default_factory=lambda: make_console(stderr=True))

    def line(self, *parts: Part) -> None:
        """A line of data on stdout."""
        self.out.print(styled(*parts))

    def note(self, *parts: Part) -> None:
        """A message for the person on stderr."""
        self.err.print(styled(*parts))

    def warning(self, message: str) -> None:
        self.note(("warning:", "yellow"), " ", message)

    def error(self, message: str, label: str = "error:") -> None:
        self.note((label, "red"), " ", message)

    def json(self, obj: Any) -> None:
        """`--format json`: plain JSON on stdout (times as ISO text)."""
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        sys.stdout.flush()

    def table(
        self,
        rows: Iterable[Sequence[Any]],
        columns: Sequence[str],
        title: str | None = None,
        right: Iterable[str] = (),
    ) -> None:
        """Rows (sequences of values) as a table on stdout; columns named in `right` are right-aligned."""
        aligned = set(right)
        table = Table(title=title)
        for name in columns:
            table.add_column(name, justify="right" if name in aligned else "left")
        for row in rows:
            table.add_row(*(cell(v) for v in row))
        self.out.print(table)

    def records(self, rows: list[dict[str, Any]], title: str, columns: list[str] | None = None) -> None:
        """Dicts as a table (the keys of the first, or `columns`); 'title: none' when there are none."""
        if not rows:
            self.line((f"{title}: none", "dim"))
            return
        columns = columns or list(rows[0])
        self.table(([row.get(c) for c in columns] for row in rows), columns, title)
