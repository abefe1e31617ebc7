"""Hostile input through the real CLI (issue 12, items 4, 8 and 9): names an attacker chooses (VM display
name, project, sshd user) are printed literally and escaped by `who`, `timeline`, `sweep` and `sql`; arguments
and files that used to end in "internal error" (exit 4) or in a wrong answer are usage errors (2) or lake
errors (4) that say what to do.

The hostile lake is made the way a site makes one: a generic JSONL lifecycle (`ingest vm`), syslog from inside
the VM (`ingest syslog`) and flows of a horizontal scan from the VM's address, landed through the lake API."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pyarrow as pa
import pytest
from support.lake_files import plant_retyped

from tests.conftest import run_in_process, run_tracepipe
from tracepipe.lake import Lake, ingest_table
from tracepipe.printer import clean
from tracepipe.schema import ALERTS, FLOWS

# what an attacker names things: markup that crashed rich, markup that rich silently ate, terminal escape
# sequences (clear screen, set the window title), a right-to-left override that reverses what follows
MARKUP_CLOSE = "[/x]"
MARKUP_STYLE = "[red]x"
ESCAPES = "\x1b[2J\x1b]0;pwned\x07"
BIDI = "evil\u202etxt.exe"
VM_NAME = f"vm{MARKUP_CLOSE}{BIDI}"
PROJECT = f"proj{ESCAPES}"
USER = f"owner{MARKUP_STYLE}"
SSH_USER = f"root{MARKUP_CLOSE}{ESCAPES}"
VM_ID = "11111111-2222-3333-4444-555555555555"
ADDR = "10.20.30.40"
DAY = "2025-06-17"
PIPELINE = Path(__file__).resolve().parents[1] / "tracepipe" / "pipelines" / "nightly.toml"


def cli(*args: str, input_bytes: bytes | None = None, process: bool = False) -> subprocess.CompletedProcess:
    """A command's exit code and output: in this process (run_in_process) unless it reads stdin or `process`
    is asked for (a FIFO that could block for ever: a subprocess has a timeout)."""
    if input_bytes is None:
        return run_tracepipe(*args) if process else run_in_process(*args)
    return subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", *args], input=input_bytes, capture_output=True, timeout=120
    )


@pytest.fixture(scope="module")
def hostile_lake(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("hostile")
    root = base / "lake"
    events = base / "inventory.jsonl"
    row = {"cloud": "lab", "vm_id": VM_ID, "vm_name": VM_NAME, "project": PROJECT, "user": USER}
    events.write_text(
        json.dumps({**row, "ts": f"{DAY}T01:00:00Z", "action": "create", "addr": ADDR, "state": "active"})
        + "\n"
    )
    result = run_tracepipe("ingest", "vm", str(events), "--format", "jsonl", "--lake", str(root))
    assert result.returncode == 0, result.stderr
    auth = base / "auth.log"
    auth.write_text(
        f"2025-06-17T03:00:00+00:00 host sshd[42]: Failed password for invalid user {SSH_USER} "
        "from 198.51.100.9 port 50000 ssh2\n"
    )
    result = run_tracepipe("ingest", "syslog", str(auth), "--sender-addr", ADDR, "--lake", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    # a horizontal scan from the VM: 150 hosts, telnet, SYN only (nightly template: 100 hosts, half failed)
    start = dt.datetime.fromisoformat(f"{DAY}T02:00:00+00:00")
    flows = pa.Table.from_pylist(
        [
            {
                "ts_start": start + dt.timedelta(seconds=i),
                "ts_end": start + dt.timedelta(seconds=i + 1),
                "src_addr": ADDR,
                "dst_addr": f"10.99.{i // 200}.{i % 200 + 1}",
                "src_port": 40000 + i,
                "dst_port": 23,
                "proto": 6,
                "packets": 1,
                "bytes": 44,
                "tcp_flags": 2,
                "ip_version": 4,
                "source": "hostile-test",
            }
            for i in range(150)
        ],
        schema=FLOWS,
    )
    ingest_table(Lake(root), "flows", "hostile-test", "hostile-flows", [flows])
    result = run_tracepipe("attribute", "--lake", str(root))
    assert result.returncode == 0, result.stderr
    return root


def assert_shown_escaped(result: subprocess.CompletedProcess, *values: str) -> None:
    """Each value is printed as `clean` shows it, nothing raw reaches the terminal, no internal error."""
    text = result.stdout + result.stderr
    assert "internal error" not in text and "Traceback" not in text, text
    for value in values:
        assert clean(value) in text, (clean(value), text)
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in text, text


# ---- item 4: data and arguments are never markup, never terminal control ----------------------------------


def test_who_prints_hostile_names_literally(hostile_lake):
    result = cli("who", ADDR, "--at", f"{DAY}T02:00:00Z", "--lake", str(hostile_lake))
    assert result.returncode == 0, result.stderr
    assert_shown_escaped(result, VM_NAME, PROJECT, USER)
    assert "[/x]" in result.stdout and "[red]x" in result.stdout  # not eaten as markup
    assert "\\x1b[2J\\x1b]0;pwned\\x07" in result.stdout and "\\u202e" in result.stdout


def test_timeline_prints_hostile_names_and_ssh_user_literally(hostile_lake):
    result = cli("timeline", VM_ID, "--lake", str(hostile_lake))
    assert result.returncode == 0, result.stderr
    assert_shown_escaped(result, VM_NAME, PROJECT, USER, SSH_USER)


def test_timeline_by_hostile_name_argument(hostile_lake):
    result = cli("timeline", VM_NAME, "--lake", str(hostile_lake))
    assert result.returncode == 0, result.stderr
    assert VM_ID in result.stdout


def test_sweep_prints_alert_with_hostile_names_and_exits_found(hostile_lake, tmp_path):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(PIPELINE.read_text().replace('report_dir = "', f'report_dir = "{tmp_path}/'))
    result = cli(
        "sweep",
        str(pipeline),
        "--since",
        f"{DAY}T00:00",
        "--until",
        f"{DAY}T06:00",
        "--lake",
        str(hostile_lake),
    )
    assert result.returncode == 1, result.stdout + result.stderr  # new alerts: the scan, named
    assert "horizontal_scan" in result.stdout
    assert_shown_escaped(result, VM_NAME, PROJECT)


def test_sql_prints_hostile_cells_and_headers_literally(hostile_lake):
    result = cli(
        "sql",
        'SELECT vm_name, project, "user", \'x\' AS "[/x]\x1b[2J" FROM vms',
        "--lake",
        str(hostile_lake),
    )
    assert result.returncode == 0, result.stderr
    assert_shown_escaped(result, VM_NAME, PROJECT, USER, "[/x]\x1b[2J")


def test_sql_json_keeps_values_exact(hostile_lake):
    result = cli("sql", "SELECT vm_name, project FROM vms", "--format", "json", "--lake", str(hostile_lake))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"vm_name": VM_NAME, "project": PROJECT}]


def _on_a_terminal(*args: str) -> bytes:
    """The CLI with stdout on a pseudo-terminal (what a person at a shell sees), its output bytes."""
    import os
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracepipe.cli", *args],
        stdout=follower,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=120)
    os.close(leader)
    assert proc.returncode == 0, proc.stderr.read()
    return out


def test_sql_csv_is_exact_into_a_pipe_and_escaped_on_a_terminal(hostile_lake):
    """CSV keeps values exact for scripts, but a person whose terminal shows it must not get the ESC and bidi
    characters of a tenant's VM name raw (regression: `sql --format csv` wrote them to the terminal)."""
    args = ("sql", "SELECT vm_name, project FROM vms", "--format", "csv", "--lake", str(hostile_lake))
    piped = cli(*args)
    assert piped.returncode == 0, piped.stderr
    assert VM_NAME in piped.stdout and PROJECT in piped.stdout  # exact: a script reads what the lake holds
    shown = _on_a_terminal(*args).decode()
    assert "\x1b" not in shown and "\u202e" not in shown  # no raw ESC, no raw right-to-left override
    assert r"\x1b" in shown and r"\u202e" in shown  # shown escaped instead


def test_sql_csv_cells_a_spreadsheet_would_run_are_text(hostile_lake):
    """A review: `sql --format csv` wrote a tenant's `=HYPERLINK(...)` or `@SUM(...)` raw, which a spreadsheet
    opening the alerts runs (the incident package's CSV already guarded them). Such text cells start with '
    now, in both; numbers and JSON stay exact."""
    query = (
        "SELECT '=HYPERLINK(\"http://x/?\"&A1)' AS a, '@SUM(1+1)' AS b, '-2+3' AS c, '+1' AS d, "
        "'\tx' AS e, 'web-05' AS f, -5 AS n"
    )
    result = cli("sql", query, "--format", "csv", "--lake", str(hostile_lake))
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[1] == ['\'=HYPERLINK("http://x/?"&A1)', "'@SUM(1+1)", "'-2+3", "'+1", "'\tx", "web-05", "-5"]
    exact = cli("sql", query, "--format", "json", "--lake", str(hostile_lake))
    assert json.loads(exact.stdout)[0]["a"] == '=HYPERLINK("http://x/?"&A1)'


@pytest.mark.parametrize(
    "args",
    [
        ["who", "[/x]", "--at", f"{DAY}T02:00Z"],
        ["who", ESCAPES, "--at", f"{DAY}T02:00Z"],
        ["timeline", f"{MARKUP_CLOSE}{BIDI}"],
        ["sweep", f"/nonexistent/[/x]{ESCAPES}.toml"],
        [f"{MARKUP_STYLE}{ESCAPES}"],  # click: no such command
        ["sql", "SELECT 1", f"{BIDI}{ESCAPES}"],  # click: unexpected extra argument
        ["sql", "--format", f"{MARKUP_CLOSE}{ESCAPES}", "SELECT 1"],  # click: invalid choice
        ["timeline", "x\udcff"],  # argv bytes that are not UTF-8
    ],
)
def test_hostile_arguments_are_usage_errors_printed_escaped(hostile_lake, args):
    result = cli(*args, "--lake", str(hostile_lake))
    assert result.returncode == 2, result.stdout + result.stderr
    assert_shown_escaped(result)
    assert "error:" in result.stderr


def test_clean_escapes_every_control_format_and_surrogate_character():
    unsafe = ("Cc", "Cf", "Cs", "Zl", "Zp")
    for code in range(0x110000):
        char = chr(code)
        if unicodedata.category(char) in unsafe:
            assert clean(char).startswith("\\"), hex(code)
    assert clean("web-05 ä 名前 🙂 [/x]") == "web-05 ä 名前 🙂 [/x]"
    assert clean("a\u202eb\u2066c\u200bd\udcff\U000e0041") == "a\\u202eb\\u2066c\\u200bd\\udcff\\U000e0041"


# ---- item 8: no wrong answer from a directory that is no lake ------------------------------------------------


READ_COMMANDS = [
    ["who", ADDR, "--at", f"{DAY}T02:00Z"],
    ["sql", "SELECT count(*) FROM flows"],
    ["timeline", VM_ID],
    ["sweep", str(PIPELINE), "--since", f"{DAY}T00:00", "--until", f"{DAY}T06:00"],
]
# (a sweep of an empty directory whose pipeline lands nothing is refused too: a lake's mount point not mounted
# said "no flows", exit 0; a sweep whose inputs land starts the lake, test_sweep)
NOT_LAKES = [(kind, args) for kind in ("empty-dir", "other-dir", "one-table") for args in READ_COMMANDS]


STORY = Path(__file__).resolve().parents[1] / "tracepipe" / "demo_story"
WRITE_COMMANDS = [
    ["ingest", "syslog", str(STORY / "syslog"), "--year", "2025"],
    ["ingest", "vm", str(STORY / "nova")],
    ["intel", "import", str(STORY / "intel" / "misp.csv")],
    ["compact"],
    ["who", ADDR, "--at", f"{DAY}T02:00Z"],
]


@pytest.mark.parametrize("kind", ["file", "fifo", "devnull", "loop", "under-a-file"])
@pytest.mark.parametrize("args", WRITE_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_a_lake_that_is_no_directory_is_named_not_an_internal_error(tmp_path, kind, args):
    """Regression (fuzz_cli): `ingest syslog --lake FILE` and `intel import --lake FIFO` ended in "internal
    error: NotADirectoryError"."""
    import os

    lake = {"file": tmp_path / "f", "fifo": tmp_path / "p", "devnull": Path("/dev/null")}.get(kind)
    if kind == "file":
        lake.write_text("not a lake")
    elif kind == "fifo":
        os.mkfifo(lake)
    elif kind == "loop":
        lake = tmp_path / "loop"
        lake.symlink_to(lake)
    elif kind == "under-a-file":
        (tmp_path / "f").write_text("x")
        lake = tmp_path / "f" / "lake"
    result = cli(*args, "--lake", str(lake), process=kind == "fifo")
    assert result.returncode == 4, result.stderr
    assert "internal error" not in result.stderr and f"--lake {lake}" in result.stderr, result.stderr
    assert "a lake is a directory" in result.stderr


def test_a_pipeline_file_that_is_a_fifo_is_named_and_never_blocks(hostile_lake, tmp_path):
    """Regression (fuzz_cli): `model fit --pipeline FIFO` waited for a writer for ever."""
    import os

    fifo = tmp_path / "pipeline.toml"
    os.mkfifo(fifo)
    for args in (["model", "fit", "--since", DAY, "--until", "2025-06-18"], ["sweep", str(fifo)]):
        if args[0] == "model":
            args += ["--pipeline", str(fifo)]
        result = cli(*args, "--lake", str(hostile_lake), process=True)
        assert result.returncode == 2 and "is not a regular file (FIFO)" in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["netflow", "zeek", "argus"])
def test_a_flow_input_that_is_a_fifo_is_named_and_never_blocks(tmp_path, command):
    """Regression (fuzz_cli, session 5): the check for files big enough for the decode workers sniffed every
    given path's kind before the per-file checks, so `ingest zeek FIFO` opened the FIFO and waited for a writer
    for ever. A FIFO is a reject from os.stat, never opened; the regular file beside it lands."""
    import os

    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    args = ["ingest", command, str(fifo), "--lake", str(tmp_path / "lake"), "--format", "json"]
    result = subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    summary = json.loads(result.stdout)
    assert result.returncode == 4 and [f["status"] for f in summary["files"]] == ["not a file"], result.stdout


@pytest.mark.parametrize(("kind", "args"), NOT_LAKES, ids=[f"{k}-{a[0]}" for k, a in NOT_LAKES])
def test_read_commands_refuse_a_directory_that_is_no_lake(hostile_lake, tmp_path, kind, args):
    where = {
        "empty-dir": tmp_path / "empty",
        "other-dir": Path(__file__).parent,
        "one-table": hostile_lake / "flows",
    }[kind]
    where.mkdir(exist_ok=True)
    result = cli(*args, "--lake", str(where))
    assert result.returncode == 4, result.stdout + result.stderr
    assert "nobody held" not in result.stdout
    assert "not a tracepipe lake" in result.stderr or "not a lake" in result.stderr, result.stderr
    assert "internal error" not in result.stderr


MAINTENANCE_COMMANDS = [
    ["attribute"],
    ["compact"],
    ["expire", "--older-than", "400d"],
    ["vacuum"],
    ["leases", "rebuild"],
    ["trace", "OBSERVATIONS"],
]


@pytest.mark.parametrize("kind", ["empty-dir", "other-dir"])
@pytest.mark.parametrize("args", MAINTENANCE_COMMANDS, ids=lambda a: a[0])
def test_commands_that_rewrite_or_read_a_lake_refuse_a_directory_that_is_no_lake(tmp_path, kind, args):
    """README walkthrough (session 35): `attribute` and `compact` on a directory holding no lake said "0 flows
    in 0 files" with exit 0 and left _locks/ there, and `trace` over an empty directory (a lake's mount point
    not mounted) answered every observation "outside the cloud", exit 0."""
    where = tmp_path / "lake"
    where.mkdir()
    if kind == "other-dir":
        (where / "notes.txt").write_text("not a lake\n")
    observations = tmp_path / "ticket.csv"
    observations.write_text("address,time\n192.0.2.10,2025-06-17T08:00:00Z\n")
    args = [str(observations) if a == "OBSERVATIONS" else a for a in args]
    result = cli(*args, "--lake", str(where))
    assert result.returncode == 4, result.stdout + result.stderr
    assert "not a tracepipe lake" in result.stderr, result.stderr
    assert sorted(p.name for p in where.iterdir()) == ([] if kind == "empty-dir" else ["notes.txt"])


# ---- item 9: usage and data errors, not internal errors ---------------------------------------------------------

# (arguments after the command, expected exit code, a piece of the message)
PROBES = [
    (["sql", "SELECT error('boom-x')"], 2, "boom-x"),
    (["sql", "SELECT CAST(vm_name AS INT) FROM vms"], 2, "Conversion Error"),
    (["sql", "SELECT CAST(vm_name AS INT) FROM vms", "--format", "json"], 2, "Conversion Error"),
    (["sql", "/* c */ EXPLAIN SELECT 1", "--format", "json"], 0, "explain_key"),
    (["sql", "EXPLAIN(FORMAT JSON) SELECT 1", "--format", "json"], 0, "explain_value"),
    (["sql", "EXPLAIN ANALYZE /* x */ COPY (SELECT 1) TO 'x.csv'"], 2, "read-only"),
    (["sql", "EXPLAIN (FORMAT json) COPY (SELECT 1) TO 'x.csv'"], 2, "read-only"),
    (["sql", "SELECT [1, 2] AS l, {'a': 'b'} AS s", "--format", "csv"], 0, '"[1,2]","{""a"":""b""}"'),
    (["who", ADDR, "--at", "9999-12-31T23:59:59Z"], 2, "out of range"),
    (["who", ADDR, "--at", f"{DAY}T02:00Z", "--window", "2000000d"], 2, "at most 36500d"),
    (["who", ADDR, "--at", f"{DAY}T02:00Z", "--window", "nan"], 2, "does not parse"),
    (["timeline", VM_ID, "--limit", "-1"], 2, "--limit"),
    (["sql", "SELECT 1", "--max-rows", "0"], 2, "--max-rows"),
    (["sweep", str(PIPELINE), "--since", "0001-01-01"], 2, "1970-01-01"),
]


@pytest.mark.parametrize(("args", "code", "message"), PROBES, ids=[" ".join(p[0])[:50] for p in PROBES])
def test_probe(hostile_lake, args, code, message):
    result = cli(*args, "--lake", str(hostile_lake))
    text = result.stdout + result.stderr
    assert result.returncode == code, text
    assert message in text, text
    assert "internal error" not in text and "Traceback" not in text, text


def test_output_into_a_missing_folder(hostile_lake, tmp_path):
    result = cli(
        "sql",
        "SELECT 1",
        "--format",
        "csv",
        "--output",
        str(tmp_path / "no" / "x.csv"),
        "--lake",
        str(hostile_lake),
    )
    assert result.returncode == 2
    assert "does not exist: create it" in result.stderr


def test_non_utf8_sql_file_and_stdin_and_pipeline(hostile_lake, tmp_path):
    bad = tmp_path / "q.sql"
    bad.write_bytes(b"SELECT '\xff'")
    result = cli("sql", "-f", str(bad), "--lake", str(hostile_lake))
    assert result.returncode == 2 and "not UTF-8" in result.stderr, result.stderr
    result = cli("sql", "-", "--lake", str(hostile_lake), input_bytes=b"SELECT '\xff'")
    assert result.returncode == 2 and b"from stdin is not UTF-8" in result.stderr, result.stderr
    toml = tmp_path / "p.toml"
    toml.write_bytes(b'[pipeline]\nname = "\xff"\n')
    result = cli("sweep", str(toml), "--lake", str(hostile_lake))
    assert result.returncode == 2 and "not UTF-8" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("toml", "key", "allowed"),
    [
        ("[detectors.horizontal_scan]\nwindow = 0", "detectors.horizontal_scan.window", ">= 1"),
        ("[detectors.horizontal_scan]\nwindow = -3600", "detectors.horizontal_scan.window", "at least zero"),
        ("[detectors.beacon]\nmin_score = nan", "detectors.beacon.min_score", ">= 0 and <= 1"),
        ("[detectors.exfiltration]\nhost_factor = -1.0", "detectors.exfiltration.host_factor", ">= 0"),
        ("[detectors.exfiltration]\nmin_bytes = -5", "detectors.exfiltration.min_bytes", ">= 0"),
        ("[window]\nlast = inf", "window.last", "finite"),
        ("[window]\nnight_start_hour = 24", "window.night_start_hour", "<= 23"),
        ("[detectors.brute_force]\nports = [22, 70000]", "detectors.brute_force.ports", "<= 65535"),
    ],
)
def test_pipeline_numbers_out_of_range_name_file_key_and_range(hostile_lake, tmp_path, toml, key, allowed):
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    result = cli(
        "sweep", str(path), "--since", f"{DAY}T00:00", "--until", f"{DAY}T06:00", "--lake", str(hostile_lake)
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(path) in result.stderr and "line 2" in result.stderr and key in result.stderr, result.stderr
    assert allowed in result.stderr, result.stderr


def test_damaged_lake_file_is_named_with_its_repair(hostile_lake, tmp_path):
    """A 0-byte file in place of one the log lists made every query fail with an internal error; one the log
    does not list (planted, or left by a killed writer) is never read."""
    lake = tmp_path / "lake"
    shutil.copytree(hostile_lake, lake)
    day = lake / "flows" / f"date={DAY}"
    (day / "part-planted.parquet").write_bytes(b"garbage")
    assert cli("sql", "SELECT count(*) FROM flows", "--format", "json", "--lake", str(lake)).returncode == 0
    listed = Lake(lake).files("flows")[0]
    listed.write_bytes(b"")
    for args in (
        ["sql", "SELECT count(*) FROM vms"],
        ["who", ADDR, "--at", f"{DAY}T02:00Z"],
        ["sweep", str(PIPELINE), "--since", f"{DAY}T00:00", "--until", f"{DAY}T06:00"],
    ):
        result = cli(*args, "--lake", str(lake))
        assert result.returncode == 4, result.stdout + result.stderr
        assert str(listed) in result.stderr and "tracepipe repair" in result.stderr, result.stderr
        assert "internal error" not in result.stderr
    # a monitoring job's check: names it, changes nothing, exit 1 (an ops review: no read-only check existed)
    relative = listed.relative_to(lake / "flows").as_posix()
    result = cli("repair", "--check", "--lake", str(lake), "--format", "json")
    assert result.returncode == 1, result.stderr
    assert list(json.loads(result.stdout)["damaged"]) == ["flows"] and relative in result.stdout
    assert listed.exists() and not (lake / "_damaged").exists()
    result = cli("repair", "--lake", str(lake), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["moved"] == {"flows": [relative]}
    assert cli("repair", "--check", "--lake", str(lake)).returncode == 0
    assert (lake / "_damaged" / "flows" / listed.relative_to(lake / "flows")).exists()  # kept as evidence
    result = cli("sql", "SELECT count(*) AS n FROM vms", "--format", "json", "--lake", str(lake))
    assert result.returncode == 0 and json.loads(result.stdout) == [{"n": 1}], result.stderr


def test_repair_never_moves_a_file_from_outside_the_lake(hostile_lake, tmp_path):
    # a planted log entry "../../config/important.conf" (wrong size): repair moved that file into the lake's
    # _damaged/, i.e. a lake writer could move any file the repairing user owns. Now the entry goes, the file stays
    srv = tmp_path / "srv"
    lake = srv / "lake"
    shutil.copytree(hostile_lake, lake)
    victim = srv / "config" / "important.conf"
    victim.parent.mkdir()
    victim.write_text("not the lake's\n")
    log = lake / "flows" / "_delta_log"
    version = max(int(p.stem) for p in log.glob("0*.json")) + 1
    entry = {"path": "../../config/important.conf", "partitionValues": {"date": DAY}, "size": 1,
             "modificationTime": 0, "dataChange": True}  # fmt: skip
    (log / f"{version:020d}.json").write_text(
        json.dumps({"commitInfo": {"timestamp": 0, "operation": "WRITE"}})
        + "\n"
        + json.dumps({"add": entry})
        + "\n"
    )
    result = cli("who", ADDR, "--at", f"{DAY}T02:00Z", "--lake", str(lake))
    assert result.returncode == 4 and "tracepipe repair" in result.stderr, result.stdout + result.stderr
    result = cli("repair", "--lake", str(lake), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outside_entries_removed"] == {"flows": ["../../config/important.conf"]}
    assert victim.read_text() == "not the lake's\n" and not list((lake / "_damaged").rglob("important.conf"))
    assert cli("who", ADDR, "--at", f"{DAY}T02:00Z", "--lake", str(lake)).returncode == 0


def test_garbage_of_the_logged_size_names_the_file(hostile_lake, tmp_path):
    lake = tmp_path / "lake"
    shutil.copytree(hostile_lake, lake)
    listed = Lake(lake).files("flows")[0]
    listed.write_bytes(b"x" * listed.stat().st_size)  # what the log says, so only reading it tells
    result = cli("sql", "SELECT count(*) FROM flows", "--lake", str(lake))
    assert result.returncode == 4, result.stdout + result.stderr
    assert str(listed) in result.stderr and "tracepipe repair" in result.stderr, result.stderr


def test_sweep_over_garbage_of_the_logged_size_says_repair(hostile_lake, tmp_path):
    """Regression: the sweep's polars stage ended in "internal error" on a listed flow file of the logged size
    whose bytes are not Parquet; now exit 4 naming `tracepipe repair`, which finds the file."""
    lake = tmp_path / "lake"
    shutil.copytree(hostile_lake, lake)
    listed = Lake(lake).files("flows")[0]
    listed.write_bytes(b"x" * listed.stat().st_size)
    window = ("--since", f"{DAY}T00:00Z", "--until", f"{DAY}T06:00Z")
    result = cli("sweep", str(PIPELINE), *window, "--lake", str(lake))
    assert result.returncode == 4, result.stdout + result.stderr
    assert "internal error" not in result.stderr and "tracepipe repair" in result.stderr, result.stderr
    repaired = cli("repair", "--lake", str(lake))
    assert repaired.returncode == 0 and str(listed.name) in repaired.stdout + repaired.stderr, repaired.stderr


def test_shell_keeps_going_after_a_fetch_error(hostile_lake):
    result = cli(
        "sql",
        "--shell",
        "--lake",
        str(hostile_lake),
        input_bytes=b"SELECT error('first-fails');\nSELECT 41 + 1 AS answer;\n",
    )
    assert result.returncode == 0, result.stderr
    assert b"first-fails" in result.stderr and b"42" in result.stdout, result.stdout + result.stderr


def test_demo_lake_may_be_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    for _ in range(2):  # the second run empties the demo's directory through the link
        result = cli("demo", "--lake", str(link), "--format", "json", process=True)
        assert result.returncode == 0, result.stderr
    assert link.is_symlink() and (real / "flows" / "_delta_log").is_dir()


def test_no_write_replaces_a_device_or_fifo(hostile_lake, tmp_path):
    """Regression (fuzz_cli run as root): a hostile write target replaced /dev/null with a regular file — every
    atomic write renames over its target. The one writer (fsutil.replacing) now refuses anything but a regular
    file; checked on a FIFO, for `sql --output --force` and for the helper every writer uses."""
    import os
    import stat

    from tracepipe.errors import UsageError
    from tracepipe.fsutil import write_atomic

    fifo = tmp_path / "listener"
    os.mkfifo(fifo)
    result = cli(
        "sql",
        "SELECT 1",
        "--format",
        "csv",
        "--output",
        str(fifo),
        "--force",
        "--lake",
        str(hostile_lake),
        process=True,
    )
    assert result.returncode == 2 and "is not a regular file (a FIFO)" in result.stderr, result.stderr
    with pytest.raises(UsageError, match="never replaces a device"):
        write_atomic(fifo, "stats")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


BIG_QUERY = "select range as n, repeat('x', 40) as pad from range(200000)"


@pytest.mark.parametrize(
    "args",
    [
        ["sql", BIG_QUERY, "--format", "json"],
        ["sql", BIG_QUERY],
        ["who", ADDR, "--at", f"{DAY}T02:00:00Z", "--format", "json"],
    ],
    ids=["sql-json", "sql-table", "who-json"],
)
def test_a_reader_that_closes_the_pipe_early_stops_the_command_quietly_with_141(hostile_lake, args):
    """`tracepipe sql ... | head`: the reader goes away before the output is written. The command stops as any
    Unix tool killed by SIGPIPE does, 141 and nothing on stderr; not "internal error" (4), nor rich's exit 1,
    which a sweep's caller reads as "alerts found"."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracepipe.cli", *args, "--lake", str(hostile_lake)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # (before the child writes: its first write fails, whatever the pipe's buffer)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


@pytest.mark.parametrize("output", ["json", "csv", "table"])
def test_a_reader_that_goes_away_in_the_middle_of_a_big_write_stops_it_with_141(hostile_lake, output):
    """Review of session 22: the reader takes the first bytes and goes (`| head -c 10`) while one big write is
    under way. The write returns short; Python's text stream dropped the rest and the command ended 0 as if
    all was read. Every write is whole now: the rest fails, 141."""
    rows = ["--max-rows", "5000"] if output == "table" else []  # (a table shows 1,000 rows by default)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tracepipe.cli",
            "sql",
            BIG_QUERY,
            *rows,
            "--format",
            output,
            "--lake",
            str(hostile_lake),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_a_table_directory_moved_to_another_disk_and_linked_back_still_reads(hostile_lake, tmp_path):
    # hostile review: DuckDB checks the resolved path against the session's allowed directories: who and
    # timeline ended in an internal error (PermissionException) and sql could not read flows
    lake = tmp_path / "lake"
    shutil.copytree(hostile_lake, lake)
    other = tmp_path / "other-disk"
    other.mkdir()
    shutil.move(str(lake / "flows"), str(other / "flows"))
    (lake / "flows").symlink_to(other / "flows")
    result = cli("who", ADDR, "--at", f"{DAY}T02:00Z", "--lake", str(lake))
    assert result.returncode == 0, result.stdout + result.stderr
    before = cli("sql", "SELECT count(*) AS n FROM flows", "--format", "json", "--lake", str(hostile_lake))
    after = cli("sql", "SELECT count(*) AS n FROM flows", "--format", "json", "--lake", str(lake))
    assert after.returncode == 0 and json.loads(after.stdout) == json.loads(before.stdout), after.stderr


def test_a_planted_file_with_numbers_as_text_reads_as_its_table_declares(hostile_lake, tmp_path):
    """Bug (session-23 known limit): DuckDB binds a scan of many files on the FIRST file's footer and casts
    the others to it. A file of the log replaced by one whose `bytes` is text turned `flows.bytes` into VARCHAR
    for every file: `who` stopped with an internal error (sum(VARCHAR)), user queries summing bytes failed.
    Every scan now reads an empty file of the declared types first (query.schema_anchor)."""
    lake = tmp_path / "lake"
    shutil.copytree(hostile_lake, lake)
    listed = Lake(lake).files("flows")[0]
    rows = plant_retyped(listed, "bytes", "{i}")
    result = cli(
        "sql",
        "SELECT typeof(bytes) AS t, CAST(sum(bytes) AS BIGINT) AS s FROM flows GROUP BY 1",
        "--lake",
        str(lake),
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"t": "BIGINT", "s": sum(range(rows))}]
    result = cli("who", ADDR, "--at", f"{DAY}T02:00Z", "--lake", str(lake))
    assert result.returncode == 0 and "internal error" not in result.stderr, result.stderr


def test_a_planted_file_of_another_column_type_is_named_and_repair_takes_it_out(hostile_lake, tmp_path):
    """Bug (session-23 known limit): a file whose `bytes` holds text that is no number made every query fail
    with DuckDB's conversion error and the sweep with polars' SchemaError ("internal error"), neither naming
    the file nor saying what to do; `repair` found nothing (it read footers, not their columns). Now both name
    the file with the repair advice, repair moves it out with its reason, and the sweep runs again."""
    lake = tmp_path / "lake"
    shutil.copytree(hostile_lake, lake)
    listed = Lake(lake).files("flows")[0]
    plant_retyped(listed, "bytes", "lots")
    result = cli("sql", "SELECT sum(bytes) FROM flows", "--lake", str(lake))
    assert result.returncode == 4, result.stdout + result.stderr
    assert listed.name in result.stderr and "tracepipe repair" in result.stderr, result.stderr
    window = ("--since", f"{DAY}T00:00Z", "--until", f"{DAY}T06:00Z")
    result = cli("sweep", str(PIPELINE), *window, "--lake", str(lake))
    assert result.returncode == 4, result.stdout + result.stderr
    assert "internal error" not in result.stderr, result.stderr
    assert listed.name in result.stderr and "column bytes holds string" in result.stderr, result.stderr
    repaired = cli("repair", "--lake", str(lake), "--format", "json")
    assert repaired.returncode == 0, repaired.stderr
    why = json.loads(repaired.stdout)["why"]["flows"]
    assert list(why.values()) == ["column bytes holds string, the table declares int64"]
    assert (lake / "_damaged" / "flows" / next(iter(why))).exists()
    result = cli("sweep", str(PIPELINE), *window, "--lake", str(lake))
    assert result.returncode in (0, 1), result.stdout + result.stderr  # no flows left: nothing, or an alert
    assert cli("repair", "--lake", str(lake)).stdout.startswith("no damaged file")


def test_repair_takes_out_a_file_that_lacks_a_column_its_log_names(hostile_lake, tmp_path):
    """A file lacking a column is legitimate when it was written before the column existed (read as nulls),
    not when the log's statistics of that very file name the column: then it was replaced."""
    lake = tmp_path / "lake"
    shutil.copytree(hostile_lake, lake)
    listed = Lake(lake).files("flows")[0]
    plant_retyped(listed, "dst_port", None)
    result = cli("sql", "SELECT sum(dst_port) FROM flows", "--lake", str(lake))
    assert result.returncode == 4 and "tracepipe repair" in result.stderr, result.stdout + result.stderr
    repaired = cli("repair", "--lake", str(lake), "--format", "json")
    assert list(json.loads(repaired.stdout)["why"]["flows"].values()) == [
        "column dst_port is missing, the log's statistics of the file name it"
    ]
    assert cli("repair", "--lake", str(lake)).stdout.startswith("no damaged file")


def test_a_commit_file_delta_rs_cannot_read_is_named_without_a_backtrace(hostile_lake, tmp_path):
    """A log entry of the wrong JSON type ("size": "big") planted in a table's commit file: every reader of
    the table stopped with delta-rs's message followed by its Rust backtrace (`0: <unknown>` ... `clone3`),
    escaped onto one line, and no word on what to do. Now: one clear error naming the log folder and the way
    out (a backup: repair cannot rewrite history it cannot read), exit 4."""
    lake = tmp_path / "lake"
    shutil.copytree(hostile_lake, lake)
    commits = sorted((lake / "flows" / "_delta_log").glob("*.json"))
    planted = next(c for c in commits if '"add"' in c.read_text())
    text = planted.read_text()
    planted.write_text(re.sub(r'"size":\s*\d+', '"size": "big"', text, count=1))
    result = cli("sql", "SELECT count(*) FROM flows", "--lake", str(lake))
    assert result.returncode == 4, result.stdout + result.stderr
    assert str(lake / "flows" / "_delta_log") in result.stderr and "backup" in result.stderr, result.stderr
    assert "<unknown>" not in result.stderr and "\\x0a" not in result.stderr, result.stderr


@pytest.mark.parametrize("where", ["lake", "tmpdir"])
def test_key_value_folders_in_the_lake_path_or_the_temp_dir_do_not_break_the_views(
    hostile_lake, tmp_path, where
):
    """Session-24 review: DuckDB takes every `key=value` folder of a path as a hive partition and refuses a scan
    whose files differ in them: the schema anchor (query.schema_anchor) under a temp dir had `date=` only, so a
    lake under /srv/env=prod/... (or a TMPDIR with a `=`) failed every query with "Hive partition mismatch"."""
    lake = tmp_path / "env=prod" / "lake" if where == "lake" else tmp_path / "lake"
    shutil.copytree(hostile_lake, lake)
    env = dict(os.environ)
    if where == "tmpdir":
        (tmp_path / "t=1").mkdir()
        env["TMPDIR"] = str(tmp_path / "t=1")
    for query in ("SELECT count(*) AS n FROM flows", "SELECT count(*) AS n FROM vms"):
        result = subprocess.run(
            [sys.executable, "-m", "tracepipe.cli", "sql", query, "--lake", str(lake), "--format", "json"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)[0]["n"] >= 1


def test_a_lake_path_with_a_percent_sign_is_a_usage_error_not_a_damaged_lake(tmp_path):
    # review: delta-rs reads the path as a URL, so "lake%41" opened "lakeA" and the error said the transaction
    # log was "altered or planted ... restore that folder from a backup" (exit 4)
    result = run_in_process("sql", "SELECT 1", "--lake", str(tmp_path / "lake%41"))
    assert result.returncode == 2 and "'%' in the lake's path" in result.stderr, result.stderr
    assert "backup" not in result.stderr


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        (
            OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device"),
            "No space left",
        ),
        (OSError(30, "Read-only file system"), "Read-only file system"),
        (MemoryError(), "ran out of memory"),
        ("panic", "a library panicked"),
    ],
)
def test_the_machines_part_in_a_failure_is_said_plainly_with_exit_4(tmp_path, monkeypatch, failure, said):
    """`compact` on a full disk or a read-only lake said "internal error: OSError(28, ...)"; a Rust panic under a
    memory limit ended `ingest syslog` with exit 1, the code of "new alerts" (failure-injection review, session
    38). Now: what the machine lacks, exit 4."""
    import polars as pl
    from conftest import run_in_process

    from tracepipe.lake import Lake

    lake = Lake(tmp_path / "lake")
    lake.append("alerts", ALERTS.empty_table(), key="x")  # (a lake)

    def fail(self, *args, **kwargs):
        raise (
            pl.exceptions.PanicException("failed to spawn polars-ooc cleaner thread")
            if failure == "panic"
            else failure
        )

    monkeypatch.setattr(Lake, "compact", fail)
    run = run_in_process("compact", "--lake", str(lake.root))
    assert run.returncode == 4, (run.stdout, run.stderr)
    assert said in run.stderr and "Traceback" not in run.stderr
    assert failure == "panic" or "internal error" not in run.stderr


def test_a_file_whose_name_is_not_utf8_in_a_drop_folder_is_said_and_the_others_land(tmp_path):
    """A relay that names its files after what a VM sent as its hostname can write a name of any bytes: such a
    file made every run of `ingest netflow` / `ingest syslog` / `ingest vm` over the folder an internal error
    (UnicodeEncodeError, exit 4), so nothing of the folder landed any more. It is now named as not read, and the
    others land (exit 3)."""
    import os

    from tests.conftest import run_in_process

    flows, logs = tmp_path / "flows", tmp_path / "logs"
    flows.mkdir()
    logs.mkdir()
    header = "ts,te,td,sa,da,sp,dp,pr,flg,fwd,stos,ipkt,ibyt,in,out,ra\n"
    row = "2024-03-12 10:00:0{0},2024-03-12 10:00:09,1.0,10.0.0.{0},192.0.2.1,1000,443,TCP,......S.,0,0,1,60,0,0,127.0.0.1\n"
    (flows / "good.csv").write_text(header + row.format(1))
    with open(os.fsencode(flows) + b"/evil\xff\xfe.csv", "w") as handle:
        handle.write(header + row.format(2))
    line = "Mar 12 10:00:0{0} vm-{0} sshd[1]: Failed password for root from 203.0.113.5 port 4 ssh2\n"
    (logs / "good.log").write_text(line.format(1))
    with open(os.fsencode(logs) + b"/vm-\xff.log", "w") as handle:
        handle.write(line.format(2))
    events = tmp_path / "events"
    events.mkdir()
    story = Path(__file__).resolve().parent.parent / "sample_data" / "story" / "nova" / "notifications.jsonl"
    first, second = story.read_text().splitlines()[:2]
    (events / "good.jsonl").write_text(first + "\n")
    with open(os.fsencode(events) + b"/n-\xff.jsonl", "w") as handle:
        handle.write(second + "\n")
    lake = str(tmp_path / "lake")
    for args, dataset in (
        (["netflow", str(flows), "--jobs", "1"], "flows"),
        (["syslog", str(logs), "--year", "2024"], "vm_logs"),
        (["vm", str(events)], "vm_events"),
    ):
        run = run_in_process("ingest", *args, "--lake", lake)
        assert run.returncode == 3 and "not UTF-8" in run.stdout + run.stderr, (args, run.stderr[-800:])
        if dataset:
            assert Lake(lake).read(dataset).num_rows == 1
