"""`tracepipe demo`: the whole pipeline on the bundled incident story (tracepipe/demo_story/) in a fresh lake.

Ingests the NetFlow export captures, the Nova / Neutron / OpenNebula lifecycle records, the syslog from inside
two VMs and the MISP indicators; builds the leases; runs the nightly pipeline template over the story window; returns
the findings (each naming VM, project and owner), the report paths, how they compare with the story's ground
truth, and commands to try next. Each step is run by the library function its own command uses; a step whose
module is missing or fails is reported and the rest still runs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from tracepipe.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, TracepipeError, UsageError
from tracepipe.lake import Lake
from tracepipe.pipeline_config import DEFAULT_PIPELINE
from tracepipe.schema import DATASETS
from tracepipe.units import parse_time

# package data (sample_data/story at the repository root links here; sample_data/make_sample.py rebuilds it)
STORY_DIR = Path(__file__).resolve().parent / "demo_story"
PIPELINE = DEFAULT_PIPELINE
DEFAULT_DEMO_LAKE = Path("demo-lake")
RECLAIM_INTERVAL = dt.timedelta(
    days=1
)  # the story's nova.conf reclaim_instance_interval (see sample_data/README.md)

# which detectors find which planted incident (ground_truth.json "kind")
EXPECTED_DETECTORS = {
    "ssh_bruteforce": {"brute_force"},
    "horizontal_scan": {"horizontal_scan"},
    "beacon": {"beacon", "intel"},
    "exfiltration": {"exfiltration"},
    "miner": {"mining", "long_connection"},
}

Progress = Callable[[str], None]


@dataclass
class Step:
    name: str
    status: str = "ok"  # ok | failed | missing
    detail: str = ""
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    lake: Path
    window: tuple[dt.datetime, dt.datetime]
    steps: list[Step] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, str] = field(default_factory=dict)
    truth_check: list[dict[str, Any]] = field(default_factory=list)
    false_positives: list[str] = field(default_factory=list)
    next_commands: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def truth_found(self) -> int:
        """Planted incidents found by an expected detector AND attributed to the right VM and owner."""
        return sum(1 for check in self.truth_check if check["found"] and check["attributed"])

    @property
    def truth_missed(self) -> list[dict[str, Any]]:
        return [check for check in self.truth_check if not (check["found"] and check["attributed"])]

    @property
    def exit_code(self) -> int:
        if all(s.status != "ok" for s in self.steps):
            return EXIT_FAILED
        return EXIT_OK if all(s.status == "ok" for s in self.steps) else EXIT_PARTIAL

    def to_dict(self) -> dict[str, Any]:
        return {
            "lake": str(self.lake),
            "window": {"start": self.window[0].isoformat(), "end": self.window[1].isoformat()},
            "steps": [vars(s) for s in self.steps],
            "findings": self.findings,
            "report": self.report,
            "truth_check": self.truth_check,
            "truth_found": self.truth_found,
            "false_positives": self.false_positives,
            "next_commands": self.next_commands,
            "seconds": round(self.seconds, 1),
            "exit_code": self.exit_code,
        }


DEMO_MARKER = ".tracepipe-demo"


def fresh_lake(path: Path) -> Lake:
    """Empty `path` for the demo. Only a directory the demo made itself (it holds DEMO_MARKER) or an empty one
    is ever deleted: pointing --lake at a real lake is refused, not wiped."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{path} exists and is not a directory; pick another --lake for the demo")
        if any(path.iterdir()) and not (path / DEMO_MARKER).exists():
            raise UsageError(
                f"{path} is not empty and was not made by `tracepipe demo`; the demo starts from an "
                "empty lake and deletes it on the next run: pick another --lake"
            )
        # empty it rather than remove it: --lake may be a symlink to the demo's directory (rmtree refuses one)
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / DEMO_MARKER).write_text("made by `tracepipe demo`; deleted and rebuilt by the next run\n")
    return Lake(path)


def _run(
    result: DemoResult, name: str, progress: Progress | None, fn: Callable[[], dict[str, Any] | None]
) -> Any:
    if progress:
        progress(name)
    step = Step(name)
    started = time.monotonic()
    try:
        step.numbers = fn() or {}
    except ImportError as exc:
        step.status, step.detail = "missing", f"not available in this checkout: {exc}"
    except (TracepipeError, OSError, ValueError, TypeError, KeyError, RuntimeError, AttributeError) as exc:
        step.status, step.detail = "failed", f"{type(exc).__name__}: {exc}"
    step.seconds = round(time.monotonic() - started, 2)
    result.steps.append(step)
    return step


def story_window(truth: dict[str, Any]) -> tuple[dt.datetime, dt.datetime]:
    """The story's window, widened to whole hours (flows that start before the end may end after it)."""
    start = parse_time(truth["window"]["start"])
    end = parse_time(truth["window"]["end"]) + dt.timedelta(hours=1)
    return start, end


def finding_rows(alerts: pa.Table) -> list[dict[str, Any]]:
    """Alerts -> one finding per (host, detector), strongest first, with who held the address."""
    rows = sorted(alerts.to_pylist(), key=lambda r: (-(r.get("score") or 0.0), r.get("addr") or ""))
    seen: set[tuple[str, str]] = set()
    findings = []
    for row in rows:
        key = (row.get("addr") or "", row.get("detector") or "")
        if key in seen:
            continue
        seen.add(key)
        # a quarantine ends when the VM is really deleted (reclaimed or force-deleted)
        quarantine = row.get("quarantine_until") if row.get("vm_status") == "soft_deleted" else None
        findings.append(
            {
                "detector": row.get("detector"),
                "addr": row.get("addr"),
                "peer": row.get("peer"),
                "vm_name": row.get("vm_name"),
                "vm_id": row.get("vm_id"),
                "project": row.get("project"),
                "user": row.get("user"),
                "hypervisor": row.get("hypervisor"),
                "vm_status": row.get("vm_status"),
                "quarantine_until": quarantine.isoformat() if quarantine else None,
                "score": row.get("score"),
                "reason": row.get("reason"),
                "window_start": row["window_start"].isoformat() if row.get("window_start") else None,
            }
        )
    return findings


def check_against_truth(
    findings: list[dict[str, Any]], truth: dict[str, Any]
) -> tuple[list[dict], list[str]]:
    """Per planted incident: found by an expected detector, and attributed to the right VM and owner?
    Plus the ordinary addresses that raised any alert (false positives)."""
    checks = []
    for incident in truth["incidents"]:
        expected = EXPECTED_DETECTORS.get(incident["kind"], set())
        hits = [f for f in findings if f["addr"] == incident["addr"] and f["detector"] in expected]
        checks.append(
            {
                "kind": incident["kind"],
                "addr": incident["addr"],
                "vm_name": incident["vm_name"],
                "user": incident["user"],
                "found": bool(hits),
                "detectors": sorted({f["detector"] for f in hits}),
                "attributed": bool(hits)
                and all(
                    f["vm_name"] == incident["vm_name"]
                    and f["user"] == incident["user"]
                    and f["project"] == incident["project"]
                    for f in hits
                ),
            }
        )
    ordinary = set(truth.get("ordinary_addrs", []))
    false_positives = sorted({f["addr"] for f in findings if f["addr"] in ordinary})
    return checks, false_positives


def program_name(argv0: str | None = None) -> str:
    """How the user invoked tracepipe, for commands they can paste: the path they typed when it was the
    `tracepipe` script (.venv/bin/tracepipe, ~/.local/bin/tracepipe; quoted for the shell), else plain
    `tracepipe` (python -m tracepipe.cli, a test runner). `argv0` defaults to this process's sys.argv[0]."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    return shlex.quote(argv0) if argv0 and Path(argv0).name == "tracepipe" else "tracepipe"


def next_commands(lake: Path, truth: dict[str, Any], program: str = "tracepipe") -> list[str]:
    """Three commands worth typing after the demo, built from the story (they name the demo lake).
    `program` is how the user invoked tracepipe (e.g. .venv/bin/tracepipe), so they paste as they are."""
    by_kind = {i["kind"]: i for i in truth["incidents"]}
    scan, exfil = by_kind["horizontal_scan"], by_kind["exfiltration"]
    lake_arg = f"--lake {shlex.quote(str(lake))}"
    return [
        f"{program} who {scan['addr']} --at {scan['start'][:16]}Z {lake_arg}",
        f"{program} who {exfil['addr']} --at {exfil['start'][:16]}Z {lake_arg}",
        f'{program} sql "SELECT src_vm_name, src_user, dst_addr, count(*) AS flows, sum(bytes) AS bytes '
        f'FROM flows_attributed WHERE dst_port = 22 GROUP BY ALL ORDER BY flows DESC LIMIT 5" {lake_arg}',
    ]


def _correlated(lake: Lake, **kwargs: Any) -> Any:
    """correlate() after an ingest step; its failure fails the step (the demo says which)."""
    from tracepipe.correlate.attribution import correlate
    from tracepipe.errors import AttributionError

    done = correlate(lake, **kwargs)
    if done.error:
        raise AttributionError(done.error)
    return done


def run_demo(
    lake_dir: Path = DEFAULT_DEMO_LAKE,
    story_dir: Path = STORY_DIR,
    pipeline: Path = PIPELINE,
    progress: Progress | None = None,
    program: str | None = None,
) -> DemoResult:
    """Run the whole demo; see the module docstring. Never raises for a missing or failing step. The next
    commands start with `program` (default: program_name(), how this process was invoked)."""
    started = time.monotonic()
    story_dir = Path(story_dir)
    truth_path = story_dir / "ground_truth.json"
    if not truth_path.is_file():
        raise UsageError(
            f"{story_dir} is not a sample story (no ground_truth.json); "
            "regenerate it with `python sample_data/make_sample.py`"
        )
    truth = json.loads(truth_path.read_text())
    window = story_window(truth)
    lake = fresh_lake(Path(lake_dir))
    result = DemoResult(Path(lake_dir), window)

    def vm() -> dict[str, Any]:
        from tracepipe.ingest.vm import ingest_vm_files

        report = ingest_vm_files(lake, [story_dir / "nova", story_dir / "neutron", story_dir / "opennebula"])
        done = _correlated(lake, reclaim_interval=RECLAIM_INTERVAL)
        return {"events": report.rows, "rejects": report.rejects, "leases": done.lease_rows, "vms": done.vms}

    def netflow() -> dict[str, Any]:
        from tracepipe.ingest.flows import ingest_flow_files

        captures = sorted((story_dir / "netflow").glob("*.pcap"))
        if not captures:  # (a story without its captures is a failed step, as a missing syslog folder is)
            raise FileNotFoundError(f"no captures (*.pcap) in {story_dir / 'netflow'}")
        summary = ingest_flow_files(lake, captures)
        done = _correlated(lake, days=summary.days)
        return {
            "flows": summary.flows,
            "datagrams": summary.datagrams,
            "rejects": summary.rejects,
            "attributed": bool(done.flows),
        }

    def syslog() -> dict[str, Any]:
        from tracepipe.correlate.attribution import correlate_landed_logs, log_attributor
        from tracepipe.errors import AttributionError
        from tracepipe.ingest.vm import ingest_syslog_files

        before = lake.version("vm_leases")
        attributor = log_attributor(lake)
        report = ingest_syslog_files(lake, [story_dir / "syslog"], year=window[0].year, attribute=attributor)
        done = correlate_landed_logs(lake, report.touched_days, attributor, before)  # (as `ingest syslog`)
        if done.error:
            raise AttributionError(done.error)
        return {"lines": report.rows, "rejects": report.rejects, "attributed": done.logs_attributed}

    def intel() -> dict[str, Any]:
        from tracepipe.intel import import_intel

        imported = import_intel(lake, story_dir / "intel" / "misp.csv")
        return {"indicators": imported.rows if hasattr(imported, "rows") else vars(imported)}

    sweep_out: dict[str, Any] = {}

    def sweep() -> dict[str, Any]:
        from tracepipe.pipeline_config import load_pipeline
        from tracepipe.sweep import run_sweep

        config = load_pipeline(pipeline)
        # the report goes into the demo lake, not into the current directory
        config = dataclasses.replace(
            config,
            output=dataclasses.replace(
                config.output, report_dir=str(Path(lake_dir) / "reports" / config.pipeline.name)
            ),
        )
        res = run_sweep(lake, config, since=window[0], until=window[1])
        sweep_out["alerts"] = res.alerts
        sweep_out["report"] = {k: str(v) for k, v in (res.report_paths or {}).items()}
        return {
            "alerts": res.alerts.num_rows,
            "new_alerts": res.new_alerts.num_rows,
            "exit_code": res.exit_code,
        }

    for name, fn in (
        ("ingest vm (Nova, Neutron, OpenNebula)", vm),
        ("ingest netflow (softflowd v9 + IPFIX)", netflow),
        ("ingest syslog", syslog),
        ("intel import (MISP CSV)", intel),
        (f"sweep {pipeline.name}", sweep),
    ):
        _run(result, name, progress, fn)

    if "alerts" in sweep_out:
        result.findings = finding_rows(sweep_out["alerts"])
        result.report = sweep_out["report"]
    if not result.report.get("html"):
        # no report from the sweep: render one over what the lake holds, so the newcomer still gets a page
        def report() -> dict[str, Any]:
            from tracepipe.report import render_report

            alerts = lake.read("alerts") if lake.files("alerts") else DATASETS["alerts"].schema.empty_table()
            paths = render_report(lake, alerts, Path(lake_dir) / "reports", "tracepipe demo", window)
            result.report = {k: str(v) for k, v in paths.items()}
            return {"alerts": alerts.num_rows}

        _run(result, "report", progress, report)
    result.truth_check, result.false_positives = check_against_truth(result.findings, truth)
    result.next_commands = next_commands(Path(lake_dir), truth, program or program_name())
    result.seconds = time.monotonic() - started
    return result
