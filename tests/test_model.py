"""The anomaly model: fitted on baseline days of a generated story (real Parquet lake), persisted with its
sidecar, ranks the host that does what no rule names, explains it, and raises "anomaly" alerts in a sweep."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import polars as pl
import pytest
from support import stories as gen

from tracepipe.detect import model
from tracepipe.detect.features import FEATURES
from tracepipe.errors import InputError
from tracepipe.lake import Lake
from tracepipe.sweep import run_sweep


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    story = gen.generate(seed=3, days=4)
    lake = Lake(root / "lake")
    lake.append("flows", story.flows, key="story")
    lake.replace_dataset("vm_leases", story.leases)
    path, info = model.fit_lake(lake, story.start, story.last_day[0], gen.LOCAL_NETWORKS)
    return root, lake, story, path, info


def test_fit_persists_model_and_sidecar(fitted):
    _, lake, story, path, info = fitted
    assert path == lake.root / "_models" / "isolation-forest.joblib" and path.exists()
    side = json.loads(model.sidecar(path).read_text())
    assert side["features"] == list(FEATURES)
    assert side["sklearn_version"] and side["fit_since"].startswith(story.start.date().isoformat())
    assert side["rows"] == info.rows > 40 * 24 * 2
    forest, loaded = model.load(path)
    assert loaded.host_medians.keys() == info.host_medians.keys()
    assert forest.n_estimators == 200


def test_score_ranks_the_odd_host_and_explains_it(fitted):
    _, lake, story, _, _ = fitted
    since, until = story.last_day
    scored = model.score_lake(lake, since, until)
    assert scored.get_column("anomaly_score").is_sorted(descending=True)
    by_host = scored.unique("host", keep="first", maintain_order=True)
    rule_hosts = {p.addr for p in story.planted}
    odd = story.extra["anomaly"].addr
    ranking = [h for h in by_host.get_column("host").to_list() if h not in rule_hosts]
    assert odd in ranking[:3], ranking[:5]
    row = by_host.filter(pl.col("host") == odd).row(0, named=True)
    explanation = json.loads(row["explanation"])
    assert len(explanation) == 3
    assert {e["feature"] for e in explanation} & {
        "new_dst_share",
        "distinct_dst",
        "distinct_dst_ports",
        "bytes_out",
        "packets_out",
        "bytes_out_ext",
    }
    assert all(e["value"] >= e["baseline"] for e in explanation)
    # the planted scanners stand out too, although the model never saw a rule
    scanner = next(p.addr for p in story.planted if p.detector == "horizontal_scan")
    assert by_host.get_column("host").to_list().index(scanner) < 10


def test_sweep_raises_anomaly_alerts(fitted):
    root, lake, story, _, _ = fitted
    pipeline = root / "m.toml"
    pipeline.write_text(
        f'[pipeline]\nlocal_networks = {json.dumps(gen.LOCAL_NETWORKS)}\n[output]\nreport_dir = "{root}/r"\n'
        "html = false\n[model]\nenabled = true\nmin_score = 0.6\nmax_alerts = 3\n"
    )
    result = run_sweep(lake, pipeline, *story.last_day)
    anomalies = [a for a in result.alerts.to_pylist() if a["detector"] == "anomaly"]
    assert 1 <= len(anomalies) <= 3
    assert story.extra["anomaly"].addr in {a["addr"] for a in anomalies}
    odd = next(a for a in anomalies if a["addr"] == story.extra["anomaly"].addr)
    assert odd["vm_name"] == story.extra["anomaly"].vm_name
    assert "behaved unlike the baseline" in odd["reason"] and "anomaly score" in odd["reason"]
    assert json.loads(odd["features"])["explanation"]
    rule_hosts = {a["addr"] for a in result.alerts.to_pylist() if a["detector"] != "anomaly"}
    assert not rule_hosts & {a["addr"] for a in anomalies}  # the model names what the rules did not


def test_sweep_without_a_model_notes_it(tmp_path):
    story = gen.generate(seed=4, days=1)
    lake = Lake(tmp_path / "lake")
    lake.append("flows", story.flows, key="s")
    pipeline = tmp_path / "m.toml"
    pipeline.write_text(
        f"[pipeline]\nlocal_networks = {json.dumps(gen.LOCAL_NETWORKS)}\n[output]\n"
        f'report_dir = "{tmp_path}/r"\nhtml = false\n[model]\nenabled = true\n'
    )
    result = run_sweep(lake, pipeline, *story.last_day)
    assert any("anomaly model skipped" in n and "model fit" in n for n in result.notes)
    assert result.exit_code == 1  # the rules still ran


def test_too_little_baseline_is_a_clear_error(tmp_path):
    story = gen.generate(seed=4, days=1, n_hosts=6, v6_hosts=1, planted=False)
    lake = Lake(tmp_path)
    lake.append("flows", story.flows.slice(0, 50), key="tiny")
    with pytest.raises(InputError, match="too little to fit a baseline"):
        model.fit_lake(lake, story.start, story.last_day[1], gen.LOCAL_NETWORKS)


def test_cli_model_fit_and_score(fitted, tmp_path):
    _, lake, story, _, _ = fitted
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        f"[pipeline]\nlocal_networks = {json.dumps(gen.LOCAL_NETWORKS)}\n"
        f'[model]\npath = "{tmp_path}/m.joblib"\n'
    )
    base = [sys.executable, "-m", "tracepipe.cli", "model"]
    common = ["--lake", str(lake.root), "--pipeline", str(pipeline), "--format", "json"]
    one_day = (story.start + dt.timedelta(days=1)).isoformat()
    fit = subprocess.run(
        [*base, "fit", "--since", story.start.isoformat(), "--until", one_day, *common],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fit.returncode == 0, fit.stderr
    assert json.loads(fit.stdout)["model"] == f"{tmp_path}/m.joblib"
    score = subprocess.run(
        [
            *base,
            "score",
            "--since",
            story.last_day[0].isoformat(),
            "--until",
            story.last_day[1].isoformat(),
            "--top",
            "5",
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert score.returncode == 0, score.stderr
    rows = json.loads(score.stdout)
    assert len(rows) == 5 and rows[0]["anomaly_score"] >= rows[-1]["anomaly_score"]
    assert rows[0]["explanation"][0]["feature"] in FEATURES
