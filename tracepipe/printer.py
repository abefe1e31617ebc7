"""The one printer of the command line: data on stdout, messages and progress on stderr.

Both are rich Consoles made by `make_console`: on a terminal they use its width; in a pipe, a file or cron's
mail, a very wide page with soft wrap, so that no line is broken at 80 columns. Nothing printed is read as
markup (styles are given as (text, style) pairs, never inside the text), and control characters in text that
came from outside (VM names, log lines, user names, paths) are shown escaped (`\\x1b`), not sent to the terminal;
so are the invisible Unicode characters that can make text read as something else (bidi overrides and
isolates, zero-width and other format characters, line/paragraph separators: `\\u202e`) and lone surrogates
(bytes of a file name or argument that are not UTF-8: `\\udcff`), which would also stop a print to a UTF-8
stream with UnicodeEncodeError.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import Progress, ProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

PIPE_WIDTH = 1_000_000  # not a terminal: lines as long as they are (soft wrap), tables never squashed
# What `clean` escapes: C0 controls, DEL and C1 controls (an ESC or CR in a VM name cannot move the cursor or
# rewrite a line); every Unicode format character (category Cf: bidi embeddings, overrides and isolates
# U+202A-202E / U+2066-2069, marks U+200E/200F/061C, zero-width space/joiners U+200B-200D, word joiner, BOM,
# soft hyphen, tag characters U+E0000-E007F that hide text, ...), line/paragraph separators U+2028/2029 and
# surrogates (U+D800-DFFF: undecodable bytes of argv or a file name under surrogateescape). A zero-width
# joiner inside an emoji is escaped too: in a security tool a name must read as what it is.
# test_cli_hostile checks this class against unicodedata for every code point.
_UNSAFE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    r"\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ud800-\udfff\ufeff\ufff9-\ufffb"
    r"\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    r"\U000e0001\U000e0020-\U000e007f]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


Part = str | tuple[str, str]  # plain text, or (text, rich style)


class _Stdout:
    """sys.stdout for the printer, every write whole: Python's text stream drops what a write to a pipe did
    not take (a reader that goes away in the middle of a big write: the write returns short, the rest is lost
    and the command ends 0); here the rest is written again, and that write fails with BrokenPipeError (the
    CLI then stops with 141). Where stdout is no file (a test's capture), plain writes."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        stream = sys.stdout
        try:
            fd = stream.fileno()
        except (OSError, ValueError, AttributeError):
            return stream.write(text)
        stream.flush()  # (whatever was written through sys.stdout itself goes first)
        data = memoryview(
            text.encode(
                getattr(stream, "encoding", None) or "utf-8", getattr(stream, "errors", None) or "strict"
            )
        )
        while len(data):
            data = data[os.write(fd, data) :]
        return len(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader went away (`| head`): rich would exit 1 here, which is "alerts found" to a sweep's caller;
        the CLI's main stops with EXIT_PIPE instead (cli._closed_pipe)."""
        self.quiet = True
        raise BrokenPipeError


def make_console(*, stderr: bool = False) -> Console:
    """A Console on stdout (or stderr): the terminal's width there, else one very long soft-wrapped line per
    line printed. Markup, emoji codes and highlighting are off: text is shown as it is."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return _Console(
        file=stream if stderr else _Stdout(),  # type: ignore[arg-type]
        width=None if terminal else PIPE_WIDTH,
        soft_wrap=not terminal,
        markup=False,
        emoji=False,
        highlight=False,
    )


def clean(value: Any) -> str:
    """Text of a value from outside, control, invisible format and surrogate characters escaped."""
    return _UNSAFE.sub(_escape, str(value))


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

    def data(self, text: str) -> None:
        """Text a script reads (CSV, JSON lines) on stdout: exactly as it is into a pipe or a file, so values stay
        exact; on a terminal each line cleaned like any text from outside (as `ls` shows odd file names), so a
        VM name cannot move the cursor or retitle the window of whoever looks at it."""
        if not self.out.file.isatty():
            self.out.file.write(text)
            return
        self.out.file.write("".join(clean(line) + "\n" for line in text.splitlines()))

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

    @contextlib.contextmanager
    def status(self, message: str) -> Iterator[Callable[[str], None]]:
        """A spinner with `message` on stderr (a terminal only); yields update(text). rich reads a plain
        string given to a spinner as markup, so the text goes in cleaned, as Text."""
        with self.err.status(styled(message)) as spinner:
            yield lambda text: spinner.update(styled(text))

    def progress(self, *columns: str | ProgressColumn) -> Progress:
        """A transient progress bar on stderr whose first column is the task description, shown as text
        (rich's default description column reads it as markup)."""
        return Progress(
            TextColumn("{task.description}", markup=False, style="progress.description"),
            *columns,
            console=self.err,
            transient=True,
        )

    def json(self, obj: Any) -> None:
        """`--format json`: plain JSON on stdout (times as ISO text), written as it is encoded, in pieces of
        ~64 KiB: never the whole text in memory (`trace` of 100,000 observations prints ~120 MB)."""
        pieces: list[str] = []
        size = 0
        for piece in json.JSONEncoder(indent=2, default=str).iterencode(obj):
            pieces.append(piece)
            size += len(piece)
            if size >= 1 << 16:
                self.out.file.write("".join(pieces))
                pieces.clear()
                size = 0
        pieces.append("\n")
        self.out.file.write("".join(pieces))
        self.out.file.flush()

    def table(
        self,
        rows: Iterable[Sequence[Any]],
        columns: Sequence[str],
        title: str | None = None,
        right: Iterable[str] = (),
    ) -> None:
        """Rows (sequences of values) as a table on stdout; columns named in `right` are right-aligned."""
        aligned = set(right)
        # headers and title are data too (column names of `tracepipe sql` come from the user's SQL)
        table = Table(title=styled(title) if title is not None else None)
        for name in columns:
            table.add_column(styled(name), justify="right" if name in aligned else "left")
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
