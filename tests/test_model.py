"""The anomaly model: fitted on baseline days of a generated story (real Parquet lake), persisted with its
sidecar, ranks the host that does what no rule names, explains it, and raises "anomaly" alerts in a sweep."""

from __future__ import annotations

import datetime as dt
import json
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from support import stories as gen

from tracepipe.detect import forest as trees
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
    assert path == lake.root / "_models" / "isolation-forest.npz" and path.exists()
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


def test_score_explains_only_from_the_sweeps_min_score_and_the_same_text(fitted):
    """A sweep explains only the rows that can become alerts (score >= min_score): building one JSON per
    (host, window) was a third of the anomaly stage. Those rows' scores and explanations are unchanged."""
    _, lake, story, path, info = fitted
    since, until = story.last_day
    features = model.compute_features(lake, since, until, info.local_networks, info.window_seconds)
    forest, _ = model.load(path)
    every = model.score(features, forest, info)
    cut = float(every.get_column("anomaly_score").quantile(0.9))
    some = model.score(features, forest, info, explain_from=cut)
    assert some.drop("explanation").equals(every.drop("explanation"))
    above = pl.col("anomaly_score") >= cut
    assert some.filter(above).get_column("explanation").to_list() == (
        every.filter(above).get_column("explanation").to_list()
    )
    assert 0 < some.filter(above).height < some.height
    assert some.filter(~above).get_column("explanation").null_count() == some.filter(~above).height


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
        f'[pipeline]\nlocal_networks = {json.dumps(gen.LOCAL_NETWORKS)}\n[model]\npath = "{tmp_path}/m.npz"\n'
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
    assert json.loads(fit.stdout)["model"] == f"{tmp_path}/m.npz"
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


# ---- issue #12 item 1: the model is stored as arrays and never unpickled ---------------------------------------


class _Planted:
    """What an attacker pickles: unpickling it runs `touch <marker>` (os.system), as joblib.load would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _copy_model(fitted, tmp_path: Path) -> Path:
    path = fitted[3]
    target = tmp_path / "m.npz"
    shutil.copy(path, target)
    shutil.copy(model.sidecar(path), model.sidecar(target))
    return target


def test_stored_forest_scores_exactly_like_sklearn(fitted):
    """The forest rebuilt from the .npz gives sklearn's score_samples and decision_function bit for bit, on
    the baseline and on rows far outside it."""
    _, lake, story, path, info = fitted
    features = model.compute_features(lake, *story.last_day, gen.LOCAL_NETWORKS, history_start=story.start)
    x = model._matrix(features)
    fresh, _ = model.fit(features, *story.last_day, 3600.0, gen.LOCAL_NETWORKS)
    stored = trees.Forest.from_sklearn(fresh)
    target = path.parent / "again.npz"
    trees.write(stored, target)
    loaded = trees.read(target)
    inputs = model._model_input(x, features.get_column("host").to_numpy(), info)[0]
    wild = np.vstack([inputs, inputs * 7.5 + 3.0, -inputs, np.zeros_like(inputs[:3])])
    assert loaded.n_estimators == 200
    assert np.array_equal(loaded.score_samples(wild), fresh.score_samples(wild))
    assert np.array_equal(loaded.decision_function(wild), fresh.decision_function(wild))
    assert len(np.unique(loaded.score_samples(wild))) > 100  # not a constant that would match trivially


def test_planted_pickle_is_refused_and_never_run(fitted, tmp_path):
    """A joblib/pickle file where the model belongs (the attack of issue #12) is refused with a message that
    says how to refit; the code in it never runs: model.load, model score (CLI) and a sweep."""
    _, lake, story, _, _ = fitted
    planted = _copy_model(fitted, tmp_path)
    marker = tmp_path / "pwned"
    planted.write_bytes(pickle.dumps(_Planted(marker), protocol=4))
    with pytest.raises(trees.ModelError, match=r"old joblib/pickle model.*tracepipe model fit"):
        model.load(planted)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        f"[pipeline]\nlocal_networks = {json.dumps(gen.LOCAL_NETWORKS)}\n"
        f'[output]\nreport_dir = "{tmp_path}/r"\nhtml = false\n'
        f'[model]\nenabled = true\npath = "{planted}"\n'
    )
    score = subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", "model", "score", "--lake", str(lake.root),
         "--pipeline", str(pipeline), "--since", story.last_day[0].isoformat(),
         "--until", story.last_day[1].isoformat()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert score.returncode == 4 and "tracepipe model fit" in score.stderr, score.stderr
    result = run_sweep(lake, pipeline, *story.last_day)
    assert any("anomaly model skipped" in n and "pickle" in n for n in result.notes), result.notes
    assert not [a for a in result.alerts.to_pylist() if a["detector"] == "anomaly"]
    assert not marker.exists()
    # the same pickle under the default name of old versions is simply not the model
    old = lake.root / "_models" / "isolation-forest.joblib"
    old.write_bytes(pickle.dumps(_Planted(marker), protocol=4))
    try:
        assert model.load(model.model_path(lake))[0].n_estimators == 200
    finally:
        old.unlink()
    assert not marker.exists()


def _npy_header(name: str, dtype: str, shape: tuple[int, ...]) -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def _rewrite(path: Path, change) -> None:
    """Rewrite the .npz with member `name` replaced by change(name, data) (bytes, or None to keep it)."""
    with zipfile.ZipFile(path) as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, change(name, data) or data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # a header asking for 2^40 thresholds: refused before any allocation
        (
            lambda n, d: _npy_header(n, "<f8", (1 << 40,)) if n == "threshold.npy" else None,
            "more than allowed",
        ),
        (
            lambda n, d: _npy_header(n, "|O", (3,)) + b"x" * 24 if n == "feature.npy" else None,
            "expected int64",
        ),
        (lambda n, d: d[:-8] if n == "threshold.npy" else None, "truncated"),
        # a child pointing back at the root: a cycle that would never reach a leaf
        (
            lambda n, d: (
                d[:128] + np.zeros(1, "<i8").tobytes() + d[136:] if n == "children_left.npy" else None
            ),
            "after its parent",
        ),
        (
            lambda n, d: (
                d[:128] + np.full(1, 10**6, "<i8").tobytes() + d[136:] if n == "feature.npy" else None
            ),
            "feature outside",
        ),
    ],
    ids=["huge-shape", "object-dtype", "truncated", "cycle", "feature-range"],
)
def test_altered_forest_is_refused(fitted, tmp_path, change, message):
    planted = _copy_model(fitted, tmp_path)
    _rewrite(planted, change)
    with pytest.raises(trees.ModelError, match=message) as refused:
        trees.read(planted)
    assert "tracepipe model fit" in str(refused.value)
    with pytest.raises(trees.ModelError):
        model.load(planted)


def test_forest_and_sidecar_must_belong_together(fitted, tmp_path):
    planted = _copy_model(fitted, tmp_path)
    _rewrite(planted, lambda n, d: None)  # same arrays, other bytes: not the forest the sidecar hashed
    with pytest.raises(trees.ModelError, match="not the forest its sidecar"):
        model.load(planted)
    side = model.sidecar(_copy_model(fitted, tmp_path))
    for broken, message in [
        ("[" * 100_000, "not readable JSON"),
        ('{"features": []}', "does not have the fields"),
        (side.read_text().replace('"window_seconds": 3600.0', '"window_seconds": "x"'), "window_seconds"),
    ]:
        side.write_text(broken)
        with pytest.raises(trees.ModelError, match=message):
            model.load(planted.with_name("m.npz"))


def test_addresses_that_only_received_are_never_ranked_nor_alerted(fitted, tmp_path):
    # SOC review: a scan's victims (addresses no VM held, each sent one SYN, sending nothing) took the whole
    # anomaly alert budget of a sweep ("packets_out 0.00 (baseline 1,433)"); a host that sent nothing shows
    # another host's behaviour, not its own
    _, lake, story, _, _ = fitted
    copy = Lake(shutil.copytree(lake.root, tmp_path / "lake"))
    f = gen._Flows([])
    victims = [f"10.10.200.{i}" for i in range(1, 201)]
    at = int((story.last_day[0] + dt.timedelta(hours=15)).timestamp() * 1_000_000)
    ts = at + np.arange(200) * 1_000_000
    f.add(ts, 0, f.idx("203.0.113.66")[0], f.idx(victims), 40000, 22, 6, 1, 60, 0x02)
    copy.append("flows", f.table(), key="inbound-scan")
    scored = model.score_lake(copy, *story.last_day)
    assert not set(victims) & set(scored.get_column("host").to_list())
    assert scored.filter(pl.col("packets_out") == 0).is_empty()
    pipeline = tmp_path / "m.toml"
    pipeline.write_text(
        f'[pipeline]\nlocal_networks = {json.dumps(gen.LOCAL_NETWORKS)}\n[output]\nreport_dir = "{tmp_path}/r"\n'
        "html = false\n[model]\nenabled = true\nmin_score = 0.5\nmax_alerts = 5\n"
    )
    result = run_sweep(copy, pipeline, *story.last_day)
    anomalies = {a["addr"] for a in result.alerts.to_pylist() if a["detector"] == "anomaly"}
    assert anomalies and not anomalies & set(victims)
