"""Every command of the real CLI with hostile arguments and files (issue 12): a seeded sample of
benchmarks/fuzz_cli.py's cases (the whole set runs by hand: `python benchmarks/fuzz_cli.py`). No case may end in
"internal error", a traceback, an exit code outside README's table, a hang, or a file written outside its folder.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_cli.py"


def _fuzz_cli():
    spec = importlib.util.spec_from_file_location("fuzz_cli", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_cli"] = module
    spec.loader.exec_module(module)
    return module


def test_every_command_survives_hostile_arguments(tmp_path, demo):
    fuzz = _fuzz_cli()
    # the session's demo lake (conftest): every case runs on a copy of it, as on one made here
    outcomes = fuzz.run(
        tmp_path, sample=62, jobs=2, timeout=120, progress=False, demo_lake=demo[2] / "demo-lake"
    )
    summary = fuzz.summarize(outcomes)
    # every command ran, with its baseline and a planted 0-byte part file
    assert set(summary["by_command"]) == set(fuzz.baselines(Path("story")))
    assert summary["cases"] == 62
    failed = [
        f"{f['verdict']}: {f['command']} {f['param']}={f['label']}: {f['stderr'][-200:]}"
        for f in summary["failed_cases"]
    ]
    if failed:
        pytest.fail(f"{len(failed)} of {summary['cases']} cases failed:\n" + "\n".join(failed))
    baselines = [o for o in outcomes if o.case.label == "baseline"]
    # the valid command lines work: the fuzzing is not only hitting argument errors
    assert all(o.exit_code in (0, 1, None) for o in baselines if o.case.command != "model score"), [
        (o.case.command, o.exit_code, o.stderr_tail) for o in baselines
    ]
