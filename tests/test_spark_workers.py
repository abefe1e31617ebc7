"""`--engine spark` however tracepipe was started (issue 13): on a local master Spark's Python workers run the
interpreter tracepipe runs in, even when that interpreter's bin/ is not on PATH (Spark's own default is
`python3` from PATH); workers that cannot import tracepipe are reported as an environment problem with the
fix (exit 4), not as an internal error. Real Spark in a child process with a PATH of /usr/bin:/bin only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import empty_lake

import tracepipe
from tracepipe.engines.spark import worker_python

ROOT = Path(tracepipe.__file__).resolve().parents[1]
# a scalar macro: Spark evaluates it in a Python worker (an Arrow UDF running DuckDB), so the worker must
# import tracepipe
SQL = "SELECT cidr_contains('10.0.0.0/8', '10.1.2.3') AS inside, ip_family('2001:db8::1') AS family"


def run_cli_bare_path(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`tracepipe sql --engine spark` with PATH=/usr/bin:/bin (no venv bin/), nothing else inherited."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tracepipe.cli import main; main()"
    base = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "COLUMNS": "400"}
    empty_lake(tmp_path / "lake")
    args = ["sql", "--engine", "spark", "--spark-master", "local[1]", "--lake", str(tmp_path / "lake")]
    return subprocess.run(
        [sys.executable, "-c", code, *args, "--format", "json", SQL],
        env={**base, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_local_workers_use_tracepipes_interpreter_whatever_path_holds(tmp_path):
    """Regression: the README's test command failed without .venv/bin on PATH (workers started python3)."""
    result = run_cli_bare_path(tmp_path, PYTHONPATH=str(ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == [{"inside": True, "family": 6}]


def test_workers_without_tracepipe_name_the_fix(tmp_path):
    """A Python without tracepipe on the workers (here: the system python3 and no PYTHONPATH) -> exit 4 and
    one line saying which module is missing and how to ship the environment, not `internal error`."""
    result = run_cli_bare_path(tmp_path, PYSPARK_PYTHON="/usr/bin/python3")
    message = " ".join(result.stderr.split())
    assert result.returncode == 4, result.stderr[-3000:]
    assert "Spark's Python workers cannot import 'tracepipe'" in message
    assert "they run /usr/bin/python3" in message
    assert "spark.archives" in message and "internal error" not in message
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("master", "conf", "env", "expected"),
    [
        ("local[2]", {}, {}, sys.executable),
        ("local", {}, {}, sys.executable),
        ("yarn", {}, {}, None),  # a cluster's executors cannot run this machine's interpreter
        ("yarn", {}, {"PYSPARK_PYTHON": "./env/bin/python"}, "./env/bin/python"),
        ("local[*]", {"spark.pyspark.python": "/opt/py/bin/python"}, {}, "/opt/py/bin/python"),
    ],
)
def test_worker_python_choice(monkeypatch, master, conf, env, expected):
    monkeypatch.delenv("PYSPARK_PYTHON", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert worker_python(master, conf) == expected
