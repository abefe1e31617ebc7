"""tracepipe as a user installs it (issue 13): a wheel built from this tree, installed non-editable into a fresh
virtualenv, runs `tracepipe demo` and `tracepipe sql --engine spark` from an empty directory with a PATH that
lacks the venv's bin/ (the story and the pipeline templates are package data; Spark's workers run the venv's
Python). `tracepipe init` writes editable copies of the templates. And the package holds only the product:
nothing in tracepipe/ imports test scaffolding.

The fresh venv gets the dependencies without network: a `.pth` line naming this interpreter's site-packages
(a plain path line runs no editable-install finder, so tracepipe itself comes from the wheel, checked below).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import empty_lake
from typer.testing import CliRunner

import tracepipe
from tracepipe.cli import app
from tracepipe.errors import UsageError
from tracepipe.pipeline_config import DEFAULT_PIPELINE, load_pipeline, template_paths, write_templates

PACKAGE = Path(tracepipe.__file__).resolve().parent
ROOT = PACKAGE.parent
TRUTH = json.loads((PACKAGE / "demo_story" / "ground_truth.json").read_text())


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYSPARK_PYTHON")}
    env.pop("TRACEPIPE_LAKE", None)
    return {**env, **extra}


def _run(cmd: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv holding the wheel of this tree (built from a copy: the tree stays clean)."""
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "tracepipe", ignore=shutil.ignore_patterns("__pycache__"))
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), "."], source
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (work / "dist").glob("tracepipe-*.whl")

    venv = work / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], work)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    pip = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], work)
    assert pip.returncode == 0, pip.stderr[-3000:]
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work)
    (Path(site.stdout.strip()) / "tracepipe-test-deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    where = _run([str(python), "-c", "import tracepipe; print(tracepipe.__file__)"], work)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr  # the wheel, not ours
    return venv / "bin"


def test_installed_demo_finds_the_story_from_an_empty_directory(installed: Path, tmp_path: Path) -> None:
    run = _run(
        [str(installed / "tracepipe"), "demo", "--format", "json"],
        tmp_path,
        PATH="/usr/bin:/bin",
        COLUMNS="200",
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert [s["status"] for s in result["steps"]] == ["ok"] * 5, result["steps"]
    assert result["steps"][-1]["name"] == "sweep nightly.toml"
    planted = {(i["addr"], i["vm_name"], i["user"]) for i in TRUTH["incidents"]}
    found = {(f["addr"], f["vm_name"], f["user"]) for f in result["findings"]}
    assert planted <= found, planted - found
    assert all(c["found"] and c["attributed"] for c in result["truth_check"]), result["truth_check"]
    assert result["false_positives"] == []
    assert Path(tmp_path / result["report"]["html"]).is_file()


def test_installed_spark_engine_runs_with_the_venvs_python(installed: Path, tmp_path: Path) -> None:
    sql = "SELECT cidr_contains('10.20.0.0/16', '10.20.1.23') AS inside, ip_family('::1') AS family"
    empty_lake(tmp_path / "lake")
    args = [
        "sql",
        "--engine",
        "spark",
        "--spark-master",
        "local[1]",
        "--lake",
        "lake",
        "--format",
        "json",
        sql,
    ]
    run = _run([str(installed / "tracepipe"), *args], tmp_path, PATH="/usr/bin:/bin")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout) == [{"inside": True, "family": 6}]


def test_installed_init_writes_the_templates(installed: Path, tmp_path: Path) -> None:
    run = _run(
        [str(installed / "tracepipe"), "init", "site", "--format", "json"], tmp_path, PATH="/usr/bin:/bin"
    )
    assert run.returncode == 0, run.stderr
    assert sorted(Path(p).name for p in json.loads(run.stdout)["written"]) == [
        "hourly.toml",
        "nightly.toml",
        "retro-hunt.toml",
    ]
    assert (tmp_path / "site" / "nightly.toml").read_text() == (
        PACKAGE / "pipelines" / "nightly.toml"
    ).read_text()


# ---- init and the default pipeline, in process --------------------------------------------------------------
def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = write_templates(tmp_path / "site")
    assert [p.name for p in first.written] == ["hourly.toml", "nightly.toml", "retro-hunt.toml"]
    edited = tmp_path / "site" / "nightly.toml"
    edited.write_text("# our site\n")
    with pytest.raises(UsageError, match=r"already exist.*--force"):
        write_templates(tmp_path / "site")
    assert edited.read_text() == "# our site\n"  # nothing written on refusal
    refused = CliRunner().invoke(app, ["init", str(tmp_path / "site")])
    assert refused.exit_code == 2 and "--force" in refused.output
    forced = CliRunner().invoke(app, ["init", str(tmp_path / "site"), "--force"])
    assert forced.exit_code == 0, forced.output
    assert edited.read_text() == DEFAULT_PIPELINE.read_text()
    assert [load_pipeline(p).pipeline.name for p in template_paths()] == ["hourly", "nightly", "retro-hunt"]


def test_init_help_has_an_example() -> None:
    result = CliRunner().invoke(app, ["init", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Example: tracepipe init" in result.output


def test_model_commands_default_to_the_packaged_template(tmp_path: Path, monkeypatch) -> None:
    """Regression: `model fit` defaulted to a relative pipelines/nightly.toml (missing outside a checkout)."""
    monkeypatch.chdir(tmp_path)  # an empty directory: no pipelines/ here
    assert load_pipeline().path == str(DEFAULT_PIPELINE) and DEFAULT_PIPELINE.is_relative_to(PACKAGE)
    result = CliRunner().invoke(
        app, ["model", "fit", "--since", "2025-06-17", "--until", "2025-06-18", "--lake", "lake"]
    )
    # the pipeline loaded; the fit then stops at the empty lake (not at a missing pipelines/nightly.toml)
    assert result.exit_code == 4 and "too little to fit a baseline" in result.output, result.output


# ---- only the product in the package ------------------------------------------------------------------------
def test_package_imports_no_test_code() -> None:
    """Nothing under tracepipe/ imports tests/, the old scaffolding modules, scapy or pytest."""
    banned = ("tests", "support", "probes", "synth", "detect_flowgen", "stories", "scapy", "pytest")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for name in names:
                if any(part in banned for part in name.split(".")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert offenders == []
    assert not (PACKAGE / "probes.py").exists() and not (PACKAGE / "stories.py").exists()
