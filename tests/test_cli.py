"""The command line as a user runs it: output readable in a log (no wrapping at 80 columns when piped), data
never read as markup nor sent raw to the terminal, errors as one line with the documented exit code, --debug
for the traceback, and every command's help with an example."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_tracepipe
from typer.testing import CliRunner

from tracepipe.cli import app


@pytest.fixture(autouse=True)
def eighty_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 80-column setting (what wrapped `tracepipe demo | cat`) that piped output must ignore."""
    monkeypatch.setenv("COLUMNS", "80")


def test_piped_output_keeps_long_lines_whole(tmp_path: Path) -> None:
    """Regression: `tracepipe demo | cat` broke lines at 80 columns ("owner" and "tnguyen" on two lines)."""
    path = tmp_path / ("site-blocklist-" + "very-long-name-" * 8 + ".txt")
    path.write_text("192.0.2.1\n198.51.100.0/24\n")
    run = run_tracepipe("intel", "import", str(path), "--format", "list", "--lake", str(tmp_path / "lake"))
    assert run.returncode == 0, run.stderr
    line = f"{path} (list): 2 indicators, 0 rejected, 0 attributes of other types skipped"
    assert len(line) > 160 and run.stdout.splitlines() == [line]


def test_data_is_never_markup_and_control_characters_are_escaped(tmp_path: Path) -> None:
    path = tmp_path / "[bold red]evil[blink]\x1b[2J.txt"  # a name from outside: markup and an ESC sequence
    path.write_text("192.0.2.1\n")
    run = run_tracepipe("intel", "import", str(path), "--lake", str(tmp_path / "lake"))
    assert run.returncode == 0, run.stderr
    assert "[bold red]evil[blink]\\x1b[2J.txt (list): 1 indicators" in run.stdout
    assert "\x1b" not in run.stdout


def test_errors_are_one_line_with_their_exit_code_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    plain = CliRunner().invoke(app, ["who", "10.0.0.1", "--at", "yesterday", "--lake", str(lake)])
    assert plain.exit_code == 2
    assert (
        plain.stderr.startswith("error: time 'yesterday' does not parse") and "Traceback" not in plain.stderr
    )
    debug = CliRunner().invoke(app, ["--debug", "who", "10.0.0.1", "--at", "yesterday", "--lake", str(lake)])
    assert debug.exit_code == 2 and "Traceback" in debug.stderr and "error: time 'yesterday'" in debug.stderr
    # debug state does not leak from one invocation to the next (it lives in the context, not a global)
    again = CliRunner().invoke(app, ["who", "10.0.0.1", "--at", "yesterday", "--lake", str(lake)])
    assert again.exit_code == 2 and "Traceback" not in again.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["attribute", "--day", "2024-13-01"], 2, "date '2024-13-01' does not parse"),
        (["ingest", "syslog", "x.log", "--sender-addr", "web-01"], 2, "not an IP address"),
        (["ingest", "vm", "x.jsonl", "--reclaim-interval", "soon"], 2, "duration 'soon' does not parse"),
        (["collect", "--rotate", "0s"], 2, "more than zero"),
        (["collect", "--rotate-size", "lots"], 2, "size 'lots' does not parse"),
        (["sql", "--file", "missing.sql"], 2, "cannot read missing.sql"),
    ],
)
def test_options_go_through_the_one_parser_of_their_unit(tmp_path, args, code, message) -> None:
    result = CliRunner().invoke(app, [*args, "--lake", str(tmp_path / "lake")])
    assert result.exit_code == code and message in result.stderr, result.stderr


def _commands(group, prefix=()):
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield (*prefix, name)  # the group's own --help too (a review: `ingest --help` showed none)
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


def test_every_command_help_has_an_example() -> None:
    import typer.main

    commands = list(_commands(typer.main.get_command(app)))
    assert len(commands) >= 12
    for command in commands:
        result = CliRunner().invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Example:" in result.stdout, command


def test_a_broken_pipe_is_a_quiet_141_only_when_stdout_is_the_pipe_that_broke(monkeypatch):
    """Review of session 22: BrokenPipeError from any pipe or socket a command uses (a Spark gateway, a
    subprocess) is an error like any other; only stdout's reader going away (`| head`) is the quiet 141."""
    import os
    import sys

    from tracepipe import cli as cli_module

    read_end, write_end = os.pipe()

    class Stdout:
        def fileno(self) -> int:
            return write_end

    monkeypatch.setattr(sys, "__stdout__", Stdout())
    try:
        assert not cli_module._stdout_gone()  # (its reader is there)
        os.close(read_end)
        assert cli_module._stdout_gone()
    finally:
        os.close(write_end)
    monkeypatch.setattr(sys, "__stdout__", None)
    assert not cli_module._stdout_gone()  # (no stdout at all: not a closed pipe)
