#!/usr/bin/env python3
"""Hostile-argument fuzzing of the whole command line (issue 12): every command, every parameter, hostile values.

Builds the demo lake once, then runs `python -m tracepipe.cli` in a subprocess per case (what a user or a cron job
types), each case on its own copy of the lake (commands that write must not change the next case's input), with
one parameter of an otherwise valid command line replaced by a hostile value: rich markup, terminal escapes,
bidi overrides, invalid UTF-8, 100,000-character strings, SQL and path tricks, numbers out of range, times at the
edges of the calendar, and files that are not what they claim (FIFO, directory, /dev/null, empty, garbage,
non-UTF-8, a pickle, a symlink loop, a truncated pcap, a 0-byte part-*.parquet planted in the lake).

A case FAILS when the command ends in "internal error" (exit 4 from an unexpected exception), prints a Python
traceback, exits with a code outside README's table, hangs past --timeout, creates a file outside its own work
folder, or replaces /dev/null (an atomic write renames over its target; as root that broke the host once: run
this as an unprivileged user where you can). Usage and data errors (exit 2/3/4 with a message) are the expected answer to most cases.

    PYTHONPATH=$PWD python benchmarks/fuzz_cli.py                    # every case (~1,000; ~15 min on 2 cores)
    PYTHONPATH=$PWD python benchmarks/fuzz_cli.py --sample 80        # a seeded sample (what tests/ runs)
    PYTHONPATH=$PWD python benchmarks/fuzz_cli.py --command who --format json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tracepipe import errors

# README's exit-code table is tracepipe.errors' EXIT_* constants
DOCUMENTED_EXIT_CODES = {v for k, v in vars(errors).items() if k.startswith("EXIT_") and isinstance(v, int)}

LISTENING_S = 8.0  # collect: started and still listening after this long = it accepted its arguments
WHO_ADDR, WHO_AT = "10.20.1.23", "2025-06-17T08:00:00Z"
SINCE, UNTIL = "2025-06-17T06:00:00Z", "2025-06-17T11:00:00Z"
# a canary: an injected COPY/ATTACH/symlink trick that worked would create one of these
CANARY = Path(tempfile.gettempdir()) / "tracepipe-fuzz-canary"

# ---- hostile values -------------------------------------------------------------------------------------------

# surrogateescape: argv may carry bytes that are no UTF-8 at all (a file name on a Linux disk can)
NOT_UTF8 = b"vm-\xff\xfe\x80name".decode("utf-8", "surrogateescape")

HOSTILE_TEXT = [
    "[/x]",
    "[red]x[/red]",
    "[link=file:///etc/passwd]x[/link]",
    "\x1b[2J\x1b]0;pwned\x07",
    "a\rb\x7fc\x9b",  # argv cannot hold NUL; DEL and a C1 CSI can
    "\u202eevil\u202c.exe",
    "x" * 100_000,
    "",
    " ",
    "-",
    NOT_UTF8,
    "' OR 1=1 --",
    f"x'); COPY (SELECT 1) TO '{CANARY}.sql' (FORMAT csv); --",
    "%s%n%x",
    "../../../../etc/passwd",
    "😀\u200b\ufeff",
]
HOSTILE_NUMBERS = ["-1", "0", "nan", "inf", "-inf", "1e309", str(2**63), "9" * 400, "0x10", "1_000"]
HOSTILE_TIMES = [
    "0001-01-01",
    "9999-12-31T23:59:59Z",
    "2025-02-30T00:00:00Z",
    "2025-06-17T25:00:00Z",
    "-1",
    "now",
    "1e18",
    "2025-06-17T08:00:00+99:00",
]
HOSTILE_DURATIONS = ["0", "-1h", "2000000d", "1e309s", "nan", "1x", "99999999999999999999s"]
HOSTILE_ADDRESSES = [
    "not-an-ip",
    "999.1.1.1",
    "10.20.1.23/33",
    "::ffff:10.20.1.23",
    "2001:DB8::0001",
    "10.20.1.023",
]


@dataclass
class HostileFiles:
    """Files that are not what a parameter expects, made once per run in `root`."""

    root: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def make(self, demo_pcap: Path) -> dict[str, Path]:
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        p = self.paths
        p["missing"] = r / "does-not-exist"
        p["directory"] = r / "a-directory"
        p["directory"].mkdir(exist_ok=True)
        p["fifo"] = r / "a-fifo"
        if not p["fifo"].exists():
            os.mkfifo(p["fifo"])
        p["devnull"] = Path("/dev/null")
        p["empty"] = r / "empty.json"
        p["empty"].write_bytes(b"")
        p["garbage"] = r / "garbage.bin"
        p["garbage"].write_bytes(random.Random(7).randbytes(70_000))
        p["not-utf8"] = r / "not-utf8.txt"
        p["not-utf8"].write_bytes(b"SELECT '\xff\xfe' \x80\n" * 10)
        p["long-line"] = r / "long-line.txt"
        p["long-line"].write_bytes(b"A" * 5_000_000 + b"\n")
        p["deep-json"] = r / "deep.json"
        p["deep-json"].write_text("[" * 100_000 + "]" * 100_000)
        p["pickle"] = r / "model.joblib"
        p["pickle"].write_bytes(
            b"cos\nsystem\n(S'touch "
            + str(CANARY).encode()
            + b".pickle'\ntR."  # pickle protocol 0: os.system(...)
        )
        p["loop"] = r / "loop"
        if not os.path.lexists(p["loop"]):
            p["loop"].symlink_to(p["loop"])
        p["to-etc"] = r / "to-etc"
        if not os.path.lexists(p["to-etc"]):
            p["to-etc"].symlink_to("/etc")
        p["truncated-pcap"] = r / "truncated.pcap"
        data = demo_pcap.read_bytes()
        p["truncated-pcap"].write_bytes(data[: len(data) // 3 + 5])
        p["markup-name"] = r / "[red]x[b] \x1b[2J\u202e.pcap"
        p["markup-name"].write_bytes(data[:2000])
        p["nan-pipeline"] = r / "nan.toml"
        p["nan-pipeline"].write_text(
            '[pipeline]\nname = "nan"\nwindow = "nan"\n[detectors.scan]\nmin_targets = nan\n'
            "[detectors.beacon]\nmin_connections = -5\n"
        )
        p["toml-garbage"] = r / "garbage.toml"
        p["toml-garbage"].write_text("[[[[\n\x00")
        return p


# ---- cases --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    command: str  # "who", "ingest vm", ...
    param: str  # the parameter that holds the hostile value ("-" for the baseline)
    label: str  # which hostile value
    argv: list[str]  # after `tracepipe`; "{lake}" and "{work}" are filled in per case
    plant_bad_parquet: bool = False
    timeout_ok: bool = False  # collect: still running at the timeout means it is listening, as asked


@dataclass
class Outcome:
    case: Case
    exit_code: int | None
    seconds: float
    verdict: str  # ok | internal-error | traceback | undocumented-exit | hang | escaped-file
    stderr_tail: str


def _label(value: str) -> str:
    text = value if len(value) <= 40 else value[:30] + f"...({len(value)} chars)"
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")


def baselines(story: Path) -> dict[str, list[str]]:
    """A valid command line per command ({lake}, {work} filled in per case)."""
    pcap = str(story / "netflow" / "openstack-softflowd-v9.pcap")
    data = Path(__file__).resolve().parent.parent / "tests" / "data"
    return {
        "sql": ["sql", "SELECT count(*) AS n FROM flows", "--lake", "{lake}"],
        "who": ["who", WHO_ADDR, "--at", WHO_AT, "--lake", "{lake}"],
        "timeline": ["timeline", "web-05", "--lake", "{lake}"],
        "attribute": ["attribute", "--lake", "{lake}"],
        "compact": ["compact", "--lake", "{lake}"],
        "expire": ["expire", "--older-than", "400d", "--lake", "{lake}"],
        "vacuum": ["vacuum", "--lake", "{lake}"],
        "upgrade": ["upgrade", "--lake", "{lake}"],
        "collect": ["collect", "--listen", "127.0.0.1:0", "--lake", "{lake}", "--spool", "{work}/spool"],
        "sweep": [
            "sweep",
            str(story.parent / "pipelines" / "nightly.toml"),
            "--since",
            SINCE,
            "--until",
            UNTIL,
            "--lake",
            "{lake}",
        ],
        "init": ["init", "{work}/pipelines"],
        "demo": ["demo", "--lake", "{work}/demo-lake"],
        "ingest netflow": ["ingest", "netflow", pcap, "--lake", "{lake}"],
        "ingest zeek": ["ingest", "zeek", str(data / "zeek" / "conn-wrccdc2018.log"), "--lake", "{lake}"],
        "ingest argus": [
            "ingest",
            "argus",
            str(data / "argus" / "ra-softflowd-traffic.csv"),
            "--lake",
            "{lake}",
        ],
        "ingest vm": ["ingest", "vm", str(story / "nova"), "--lake", "{lake}"],
        "ingest syslog": ["ingest", "syslog", str(story / "syslog"), "--year", "2025", "--lake", "{lake}"],
        "model fit": ["model", "fit", "--since", SINCE, "--until", UNTIL, "--lake", "{lake}"],
        "model score": ["model", "score", "--since", SINCE, "--until", UNTIL, "--lake", "{lake}"],
        "intel import": ["intel", "import", str(story / "intel" / "misp.csv"), "--lake", "{lake}"],
    }


def _params(command: str) -> list[tuple[str, str, str]]:
    """(option or "#n" for the n-th argument, kind, annotation) of a command, read from the typer app itself so
    a new option is fuzzed without anyone listing it here."""
    import typer

    from tracepipe.cli import app

    node: Any = typer.main.get_command(app)
    for part in command.split():
        node = node.commands[part]
    out = []
    position = 0
    for p in node.params:
        if p.param_type_name == "argument":
            out.append((f"#{position}", p.name, _annotation(p)))
            position += 1
        else:
            out.append((p.opts[0], p.name, _annotation(p)))
    return out


def _annotation(param: Any) -> str:
    """What a parameter takes, as text naming its Python type ("int", "Path", "bool", ...): typer 0.29 and
    later keep the annotation on the parameter (type_descriptor); before, only its click parameter type says
    (typer's own copy of click's types: read by name)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        return str(descriptor.annotation)
    if getattr(param, "is_flag", False):
        return "bool"
    name = str(getattr(param.type, "name", "text"))
    return {"path": "Path", "integer": "int", "integer range": "int", "boolean": "bool"}.get(name, name)


def _values_for(name: str, annotation: str, files: dict[str, Path]) -> list[tuple[str, str]]:
    """Hostile values that fit what the parameter is about (plus generic text for everything)."""
    text = [(_label(v), v) for v in HOSTILE_TEXT]
    path_values = [(f"file:{k}", str(v)) for k, v in files.items()]
    lowered = name.lower()
    if lowered in {"since", "until", "at", "as_of"}:
        return [(v, v) for v in HOSTILE_TIMES] + text[:8]
    if lowered in {"window", "older_than", "retain", "rotate", "reclaim_interval", "status_interval"}:
        return [(v, v) for v in HOSTILE_DURATIONS] + text[:6]
    if lowered in {"addr", "sender_addr"}:
        return [(v, v) for v in HOSTILE_ADDRESSES] + text
    if "int" in annotation or lowered in {"rotate_size", "rcvbuf"}:
        return [(v, v) for v in HOSTILE_NUMBERS] + text[:4]
    if "Path" in annotation or lowered in {"paths", "pipeline", "path", "story"}:
        return path_values + text[:6]
    if "bool" in annotation:
        return []
    return text


def build_cases(story: Path, files: dict[str, Path], only: str | None = None) -> list[Case]:
    cases: list[Case] = []
    for command, base in baselines(story).items():
        if only and command != only:
            continue
        timeout_ok = command == "collect"
        cases.append(Case(command, "-", "baseline", list(base), timeout_ok=timeout_ok))
        if "{lake}" in base:  # `demo` and `init` never open the lake: planted, theirs is the baseline again
            cases.append(
                Case(command, "-", "0-byte part-*.parquet in the lake", list(base), True, timeout_ok)
            )
        for option, name, annotation in _params(command):
            for label, value in _values_for(name, annotation, files):
                if (
                    command == "collect"
                    and option == "--listen"
                    and not label.startswith(("file:", "[", "\\"))
                ):
                    continue  # never bind anything but loopback
                argv = _substitute(base, command, option, value)
                # `sql -f <(make-query)` reads a pipe, as cat does: a FIFO without a writer waits, by design
                waits = timeout_ok or (command == "sql" and option == "-f" and label == "file:fifo")
                cases.append(Case(command, option, label, argv, timeout_ok=waits))
    return cases


def _substitute(base: list[str], command: str, option: str, value: str) -> list[str]:
    argv = list(base)
    skip = len(command.split())
    if option.startswith("#"):
        index = int(option[1:])
        positions = [i for i in range(skip, len(argv)) if _is_positional(argv, i)]
        if index < len(positions):
            argv[positions[index]] = value
        else:
            argv.insert(skip + index, value)
        return argv
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


def _is_positional(argv: list[str], i: int) -> bool:
    return not argv[i].startswith("--") and not argv[i - 1].startswith("--")


# ---- running ------------------------------------------------------------------------------------------------


def run_case(case: Case, lake: Path, scratch: Path, timeout: float) -> Outcome:
    work = Path(tempfile.mkdtemp(prefix="case-", dir=scratch))
    case_lake = work / "lake"
    shutil.copytree(lake, case_lake, symlinks=True)
    if case.plant_bad_parquet:
        day = next((case_lake / "flows").glob("date=*"))
        (day / "part-0000000000000000.parquet").write_bytes(b"")
    argv = [a.replace("{lake}", str(case_lake)).replace("{work}", str(work)) for a in case.argv]
    env = dict(os.environ, HOME=str(work), TMPDIR=str(work))
    if case.timeout_ok:
        timeout = min(timeout, LISTENING_S)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tracepipe.cli", *argv],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        seconds = time.monotonic() - started
        tail = (exc.stderr or b"").decode("utf-8", "replace")[-300:]
        verdict = "ok" if case.timeout_ok else "hang"
        shutil.rmtree(work, ignore_errors=True)
        return Outcome(case, None, seconds, verdict, tail)
    seconds = time.monotonic() - started
    out = proc.stdout.decode("utf-8", "replace")
    err = proc.stderr.decode("utf-8", "replace")
    if "internal error" in err:
        verdict = "internal-error"
    elif "Traceback (most recent call last)" in out + err:
        verdict = "traceback"
    elif proc.returncode not in DOCUMENTED_EXIT_CODES:
        verdict = "undocumented-exit"
    elif any(CANARY.parent.glob(CANARY.name + "*")):
        verdict = "escaped-file"
    elif not stat.S_ISCHR(os.stat("/dev/null").st_mode):  # a write target replaced by a rename (run as root)
        verdict = "replaced-/dev/null"
    else:
        verdict = "ok"
    shutil.rmtree(work, ignore_errors=True)
    return Outcome(case, proc.returncode, seconds, verdict, err.strip()[-300:])


def make_demo_lake(scratch: Path) -> Path:
    lake = scratch / "demo-lake"
    proc = subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", "demo", "--lake", str(lake), "--format", "json"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"the demo failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return lake


def run(
    scratch: Path,
    sample: int | None = None,
    only: str | None = None,
    jobs: int = 2,
    timeout: float = 60.0,
    seed: int = 12,
    progress: bool = True,
    demo_lake: Path | None = None,
) -> list[Outcome]:
    """`demo_lake`: a lake `tracepipe demo` made, if the caller has one (each case runs on a copy); else one is
    made in `scratch`."""
    from tracepipe.demo import STORY_DIR

    for leftover in CANARY.parent.glob(CANARY.name + "*"):
        leftover.unlink()
    lake = demo_lake or make_demo_lake(scratch)
    files = HostileFiles(scratch / "hostile").make(STORY_DIR / "netflow" / "openstack-softflowd-v9.pcap")
    cases = build_cases(STORY_DIR, files, only)
    if sample is not None and sample < len(cases):
        rng = random.Random(seed)
        baseline = [c for c in cases if c.param == "-"]
        rest = [c for c in cases if c.param != "-"]
        cases = baseline + rng.sample(rest, max(0, sample - len(baseline)))
    outcomes: list[Outcome] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_case, c, lake, scratch, timeout) for c in cases]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            outcome = future.result()
            outcomes.append(outcome)
            if progress and (done % 25 == 0 or done == len(futures)):
                print(f"  {done}/{len(futures)} cases", file=sys.stderr, flush=True)
    return outcomes


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    by_command: dict[str, Counter] = {}
    for o in outcomes:
        counter = by_command.setdefault(o.case.command, Counter())
        counter["cases"] += 1
        counter[o.verdict] += 1
        counter[f"exit {o.exit_code}"] += 1
    failures = [
        {**asdict(o.case), "exit_code": o.exit_code, "verdict": o.verdict, "stderr": o.stderr_tail}
        for o in outcomes
        if o.verdict != "ok"
    ]
    for f in failures:
        f["argv"] = [_label(a) for a in f["argv"]]
    return {
        "cases": len(outcomes),
        "internal_errors": sum(o.verdict == "internal-error" for o in outcomes),
        "failures": len(failures),
        "by_verdict": dict(Counter(o.verdict for o in outcomes)),
        "by_command": {k: dict(v) for k, v in sorted(by_command.items())},
        "seconds": round(sum(o.seconds for o in outcomes), 1),
        "failed_cases": failures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sample", type=int, help="run the baselines plus a seeded sample of this many cases"
    )
    parser.add_argument("--command", help="only this command (e.g. 'who', 'ingest vm')")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--format", choices=["table", "json"], default="table")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="tracepipe-fuzz-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        summary = summarize(run(scratch, args.sample, args.command, args.jobs, args.timeout, args.seed))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.format == "json":
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'command':<16} {'cases':>6} {'ok':>6} {'failed':>7}  exit codes")
        for command, c in summary["by_command"].items():
            exits = ", ".join(f"{k[5:]}:{v}" for k, v in sorted(c.items()) if k.startswith("exit "))
            print(
                f"{command:<16} {c['cases']:>6} {c.get('ok', 0):>6} {c['cases'] - c.get('ok', 0):>7}  {exits}"
            )
        print(
            f"\n{summary['cases']} cases ran, {summary['internal_errors']} ended in internal error "
            f"(goal: 0), {summary['failures']} failed in all: {summary['by_verdict']}"
        )
        for f in summary["failed_cases"][:60]:
            print(
                f"  [{f['verdict']}] {f['command']} {f['param']}={f['label']}: exit {f['exit_code']}: "
                f"{f['stderr'][-160:]!r}"
            )
    return 0 if summary["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
