"""The anomaly model: an IsolationForest (scikit-learn) fitted on per (host, window) features of a baseline
period, persisted as plain arrays (detect/forest.py: an .npz read without pickle, so a file planted in the lake
cannot run code) next to a JSON sidecar (feature names, sklearn version, fit window, the baseline's medians and
MADs, the .npz's SHA-256). `score` ranks (host, window)s by how easily the forest isolates them (0.5 ~ ordinary,
towards 1 = stands out) and explains each with robust z-scores against the baseline: which features made it stand out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from tracepipe import fsutil
from tracepipe.detect.features import FEATURES, LOG_FEATURES, compute_features, utc
from tracepipe.detect.forest import REFIT, Forest, ModelError, read, write
from tracepipe.errors import EXIT_OK, InputError, LakeError, TracepipeError, UsageError
from tracepipe.lake import Lake

if TYPE_CHECKING:
    from sklearn.ensemble import IsolationForest

DEFAULT_MODEL = "_models/isolation-forest.npz"
MAX_SIDECAR_BYTES = 64 * 1024 * 1024  # ~1,000 hosts x 3 ranges x 14 features is ~1 MiB
MIN_FIT_ROWS = 24  # fewer (host, window)s than this is not a baseline


@dataclass
class ModelInfo:
    features: list[str]
    sklearn_version: str
    fit_since: str
    fit_until: str
    window_seconds: float
    rows: int
    hosts: int
    fitted_at: str
    local_networks: list[str]
    medians: list[float]
    mads: list[float]
    # each baseline host's own usual range (model space): host -> [F floats] (5th percentile, median, 95th)
    host_low: dict[str, list[float]]
    host_medians: dict[str, list[float]]
    host_high: dict[str, list[float]]
    model_sha256: str = ""  # of the .npz: a sidecar and a forest that do not belong together are refused


def model_path(lake: Lake, path: str | Path | None = None) -> Path:
    return Path(path) if path else lake.root / DEFAULT_MODEL


def _matrix(features: pl.DataFrame) -> np.ndarray:
    """The model's view of the features: log1p of counts and volumes, shares as they are."""
    columns = [
        pl.col(f).cast(pl.Float64).log1p() if f in LOG_FEATURES else pl.col(f).cast(pl.Float64)
        for f in FEATURES
    ]
    return features.select(columns).fill_null(0.0).fill_nan(0.0).to_numpy()


def _spread(mads: np.ndarray, medians: np.ndarray) -> np.ndarray:
    # A feature that never varied in the baseline (MAD 0) still needs a scale: 5% of its median or 0.1.
    return np.maximum.reduce([1.4826 * mads, 0.05 * np.abs(medians), np.full_like(mads, 0.1)])


def fit(
    features: pl.DataFrame,
    since: dt.datetime,
    until: dt.datetime,
    window_s: float,
    local_networks: list[str],
    seed: int = 0,
) -> tuple[IsolationForest, ModelInfo]:
    """Fit on baseline features (pure: no I/O)."""
    # imported here: scoring needs only detect/forest.py's arrays, and importing scikit-learn (and the SciPy it
    # pulls in) cost every sweep process ~1.4 s of CPU, 7% of a 10^7-flow sweep
    import sklearn
    from sklearn.ensemble import IsolationForest

    if features.height < MIN_FIT_ROWS:
        raise InputError(
            f"only {features.height} (host, window)s between {since:%Y-%m-%d %H:%M} and "
            f"{until:%Y-%m-%d %H:%M}: too little to fit a baseline. Choose a longer --since/--until "
            f"period with flows in the lake."
        )
    x = _matrix(features)
    medians = np.median(x, axis=0)
    mads = np.median(np.abs(x - medians), axis=0)
    hosts = features.get_column("host").to_numpy()
    ranges: dict[str, list[list[float]]] = {"low": [], "median": [], "high": []}
    names = []
    for host in np.unique(hosts):  # per host, not per record: ~1,000 hosts
        low, med, high = np.percentile(x[hosts == host], [5, 50, 95], axis=0)
        names.append(str(host))
        for key, value in (("low", low), ("median", med), ("high", high)):
            ranges[key].append(np.round(value, 6).tolist())
    info = ModelInfo(
        list(FEATURES),
        sklearn.__version__,
        utc(since).isoformat(),
        utc(until).isoformat(),
        window_s,
        features.height,
        len(names),
        dt.datetime.now(dt.UTC).isoformat(),
        list(local_networks),
        medians.tolist(),
        mads.tolist(),
        dict(zip(names, ranges["low"], strict=True)),
        dict(zip(names, ranges["median"], strict=True)),
        dict(zip(names, ranges["high"], strict=True)),
    )
    forest = IsolationForest(n_estimators=200, random_state=seed, contamination="auto").fit(
        _model_input(x, hosts, info)[0]
    )
    return forest, info


def _model_input(
    x: np.ndarray, hosts: np.ndarray, info: ModelInfo
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The forest sees each window as it is AND by how far it leaves the host's own usual range (5th-95th
    percentile of its baseline windows; the global median for hosts the baseline lacks): a data mover's big
    hour is ordinary, a web server's is not. Returns (model input, outside-range distance, host median)."""
    glob = np.asarray(info.medians)
    # per distinct host, then spread to its rows (a mask over every row per host was hosts x rows)
    uniques, row_host = np.unique(hosts, return_inverse=True)
    low, med, high = (np.tile(glob, (len(uniques), 1)) for _ in range(3))
    for i, host in enumerate(uniques.tolist()):
        key = str(host)
        if key in info.host_medians:
            low[i], med[i], high[i] = info.host_low[key], info.host_medians[key], info.host_high[key]
    low, med, high = low[row_host], med[row_host], high[row_host]
    outside = np.maximum(x - high, 0) - np.maximum(low - x, 0)
    return np.hstack([x, outside]), outside, med


def save(forest: IsolationForest | Forest, info: ModelInfo, path: Path) -> Path:
    """The forest's arrays (`.npz`, detect/forest.py) + `<path>.json` sidecar with their SHA-256, each replaced
    atomically (tracepipe.fsutil)."""
    if sidecar(path) == path:
        raise UsageError(f"model path {path}: name it *.npz (the sidecar beside it is {path.stem}.json)")
    arrays = forest if isinstance(forest, Forest) else Forest.from_sklearn(forest)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with fsutil.replacing(path) as tmp:
            write(arrays, tmp)
        info.model_sha256 = _sha256(path)
        fsutil.write_atomic(sidecar(path), json.dumps(asdict(info), indent=2))
    except OSError as exc:
        raise LakeError(f"cannot write the model to {path}: {exc}") from exc
    return path


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(path: Path) -> tuple[Forest, ModelInfo]:
    """The model at `path` and its sidecar, both checked (never unpickled): a missing model is an InputError
    saying how to fit one; an old joblib file, a sidecar or forest that does not match what `save` writes,
    or a forest whose SHA-256 is not the sidecar's, a ModelError saying how to refit."""
    if not path.exists() or not sidecar(path).exists():
        raise InputError(f"no model at {path}. Fit one first: tracepipe model fit --since ... --until ...")
    info = _read_sidecar(sidecar(path))
    if info.features != list(FEATURES):
        raise ModelError(
            f"the model at {path} was fitted on other features ({len(info.features)}); "
            f"refit it with tracepipe model fit"
        )
    forest = read(path)  # refuses a pickle before anything else: its first byte is not a zip's
    if _sha256(path) != info.model_sha256:
        raise ModelError(f"{path} is not the forest its sidecar {sidecar(path).name} describes; {REFIT}")
    if forest.n_features != 2 * len(FEATURES):
        raise ModelError(f"{path} scores {forest.n_features} columns, not {2 * len(FEATURES)}; {REFIT}")
    return forest, info


def _read_sidecar(path: Path) -> ModelInfo:
    """ModelInfo from the sidecar JSON, every field's type and size checked (it lives in the lake: whoever
    can write there can plant it)."""

    def refuse(what: str) -> ModelError:
        return ModelError(f"the model sidecar {path} {what}; {REFIT}")

    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            raise refuse(f"is larger than {MAX_SIDECAR_BYTES:,} bytes")
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise refuse(f"is not readable JSON ({type(exc).__name__})") from exc
    names = [f.name for f in fields(ModelInfo)]
    if not isinstance(raw, dict) or set(raw) != set(names):
        missing = sorted(set(names) - set(raw)) if isinstance(raw, dict) else names
        raise refuse(f"does not have the fields of this tracepipe's models (missing {missing[:3]})")
    width = len(FEATURES)

    def numbers(value: Any, n: int = width) -> bool:
        return (
            isinstance(value, list)
            and len(value) == n
            and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
            )
        )

    strings = ("sklearn_version", "fit_since", "fit_until", "fitted_at", "model_sha256")
    checks = {
        "features": isinstance(raw["features"], list) and all(isinstance(f, str) for f in raw["features"]),
        "strings": all(isinstance(raw[k], str) for k in strings),
        "window_seconds": isinstance(raw["window_seconds"], int | float)
        and math.isfinite(raw["window_seconds"])
        and raw["window_seconds"] > 0,
        "rows/hosts": all(isinstance(raw[k], int) and raw[k] >= 0 for k in ("rows", "hosts")),
        "local_networks": isinstance(raw["local_networks"], list)
        and all(isinstance(n, str) for n in raw["local_networks"]),
        "medians/mads": numbers(raw["medians"]) and numbers(raw["mads"]),
        "host ranges": all(isinstance(raw[k], dict) for k in ("host_low", "host_medians", "host_high"))
        and raw["host_low"].keys() == raw["host_medians"].keys() == raw["host_high"].keys()
        and all(numbers(v) for k in ("host_low", "host_medians", "host_high") for v in raw[k].values()),
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise refuse(f"has fields of the wrong type or size: {', '.join(bad)}")
    try:
        for network in raw["local_networks"]:
            ipaddress.ip_network(network, strict=False)
    except ValueError as exc:
        raise refuse(f"names a local network that does not parse ({exc})") from exc
    return ModelInfo(**{name: raw[name] for name in names})


def score(
    features: pl.DataFrame,
    forest: Forest | IsolationForest,
    info: ModelInfo,
    top_features: int = 3,
    explain_from: float | None = None,
) -> pl.DataFrame:
    """Features -> the same rows plus anomaly_score (0..1) and explanation (JSON list of the features that
    stand out most: name, value, baseline median, robust z), highest score first. `explain_from`: explain only
    the rows scoring at least this (a sweep's min_score: the others never become alerts), null elsewhere."""
    if features.is_empty():
        return features.with_columns(
            anomaly_score=pl.lit(None, pl.Float64), explanation=pl.lit(None, pl.String)
        )
    x = _matrix(features)
    model_input, outside, reference = _model_input(x, features.get_column("host").to_numpy(), info)
    anomaly = -forest.score_samples(model_input)
    # robust z of the distance outside the host's usual range, scaled by the population's spread
    medians = np.asarray(info.medians)
    z = outside / _spread(np.asarray(info.mads), medians)
    order = np.argsort(-np.abs(z), axis=1)[:, :top_features]
    raw = features.select([pl.col(f).cast(pl.Float64) for f in FEATURES]).to_numpy()
    is_log = np.array([f in LOG_FEATURES for f in FEATURES])
    base = np.where(is_log, np.expm1(reference), reference)
    explained = anomaly >= explain_from if explain_from is not None else np.ones(len(order), dtype=bool)
    explanations = [
        None
        if not explained[i]
        else json.dumps(
            [
                {
                    "feature": FEATURES[j],
                    "value": round(float(raw[i, j]), 4),
                    "baseline": round(float(base[i, j]), 4),
                    "z": round(float(z[i, j]), 2),
                }
                for j in order[i]
            ]
        )
        for i in range(len(order))
    ]
    return features.with_columns(
        anomaly_score=pl.Series(anomaly), explanation=pl.Series(explanations, dtype=pl.String)
    ).sort("anomaly_score", descending=True)


def fit_lake(
    lake: Lake,
    since: dt.datetime,
    until: dt.datetime,
    local_networks: list[str],
    window_s: float = 3600.0,
    path: str | Path | None = None,
    buckets: int | None = None,
) -> tuple[Path, ModelInfo]:
    """`tracepipe model fit`: features of [since, until) from the lake -> fitted, persisted model. The features
    are computed per host bucket (`buckets`, default by flow count: detect/buckets.py), in bounded memory; the
    fit then sees all (host, window) rows, a few per host and hour."""
    features = compute_features(
        lake, since, until, local_networks, window_s, history_start=since, buckets=buckets
    )
    forest, info = fit(features, since, until, window_s, local_networks)
    target = save(forest, info, model_path(lake, path))
    return target, info


def score_lake(
    lake: Lake,
    since: dt.datetime,
    until: dt.datetime,
    path: str | Path | None = None,
    history: float = 7 * 86400.0,
    top_features: int = 3,
) -> pl.DataFrame:
    """`tracepipe model score`: rank the (host, window)s of [since, until) with a persisted model."""
    forest, info = load(model_path(lake, path))
    start = utc(since) - dt.timedelta(seconds=history)
    features = compute_features(
        lake, since, until, info.local_networks, info.window_seconds, history_start=start
    )
    return score(features, forest, info, top_features).filter(_sent_something())


def _sent_something() -> pl.Expr:
    """A (host, window) in which the host sent at least one packet: one that only received (a scan's victims,
    an unleased address probed) shows someone else's behaviour, not its own; it is never ranked or alerted
    (SOC review: the five anomaly alerts of a sweep went to five addresses that received one SYN each)."""
    return pl.col("packets_out") > 0


@dataclass
class FitResult:
    """What `tracepipe model fit` reports."""

    path: Path
    info: ModelInfo
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.path),
            "rows": self.info.rows,
            "hosts": self.info.hosts,
            "features": self.info.features,
            "sklearn": self.info.sklearn_version,
            "fit_since": self.info.fit_since,
            "fit_until": self.info.fit_until,
        }


@dataclass
class ScoreResult:
    """What `tracepipe model score` reports: the top (host, window)s, each with the features that stood out."""

    rows: list[dict[str, Any]]
    exit_code: int = EXIT_OK

    def to_dict(self) -> list[dict[str, Any]]:
        return self.rows


def fit_pipeline(lake: Lake, pipeline: Path, since: dt.datetime, until: dt.datetime) -> FitResult:
    """`fit_lake` with the local networks and model path of a pipeline file."""
    from tracepipe.pipeline_config import load_pipeline

    config = load_pipeline(pipeline)
    path, info = fit_lake(lake, since, until, config.pipeline.local_networks, path=config.model.path or None)
    return FitResult(path, info)


def score_pipeline(
    lake: Lake, pipeline: Path, since: dt.datetime, until: dt.datetime, top: int = 20
) -> ScoreResult:
    """`score_lake` with the model path, baseline and explanation length of a pipeline file; the `top`."""
    from tracepipe.pipeline_config import load_pipeline

    config = load_pipeline(pipeline)
    scored = score_lake(
        lake,
        since,
        until,
        config.model.path or None,
        history=float(config.window.baseline),
        top_features=config.model.top_features,
    )
    rows = [
        {
            "host": r["host"],
            "window_start": r["window_start"],
            "anomaly_score": round(r["anomaly_score"], 4),
            "explanation": json.loads(r["explanation"]),
        }
        for r in scored.head(top).to_dicts()
    ]
    return ScoreResult(rows)


def anomaly_candidates(
    scored: pl.DataFrame,
    min_score: float,
    max_alerts: int,
    window_s: float,
    skip_hosts: set[str] | None = None,
) -> pl.DataFrame:
    """Scored features -> candidate alerts of detector "anomaly" (schema detectors.CANDIDATE): the top
    `max_alerts` (host, window)s above `min_score`, hosts a rule already named left out."""
    from tracepipe.detect.detectors import _finish, fmt_duration

    if scored.is_empty():
        return _finish(scored, "anomaly", str, dict)
    picked = scored.filter((pl.col("anomaly_score") >= min_score) & _sent_something())
    if skip_hosts:
        picked = picked.filter(~pl.col("host").is_in(sorted(skip_hosts)))
    picked = (
        picked.sort("anomaly_score", descending=True)
        .unique("host", keep="first", maintain_order=True)
        .head(max_alerts)
        .with_columns(
            addr=pl.col("host"),
            peer=pl.lit(None, pl.String),
            port=pl.lit(None, pl.Int32),
            score=pl.col("anomaly_score"),
            first_ts=pl.col("window_start"),
            window_end=pl.col("window_start") + pl.duration(seconds=int(window_s)),
        )
    )

    def reason(r: dict) -> str:
        parts = [
            f"{e['feature']} {_num(e['value'])} (baseline {_num(e['baseline'])})"
            for e in json.loads(r["explanation"])
        ]
        return (
            f"{{who}} behaved unlike the baseline in the {fmt_duration(window_s)} from "
            f"{r['window_start']:%Y-%m-%d %H:%M} (anomaly score {r['anomaly_score']:.2f}): {'; '.join(parts)}"
        )

    return _finish(
        picked,
        "anomaly",
        reason,
        lambda r: {
            "anomaly_score": r["anomaly_score"],
            "explanation": json.loads(r["explanation"]),
            **{f: r[f] for f in FEATURES},
        },
    )


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.2f}"


def load_for_sweep(lake: Lake, path: str | None, notes: list[str]) -> tuple[Forest, ModelInfo] | None:
    """The persisted model for a sweep, whichever engine runs it: no model is a note, not a failure."""
    try:
        return load(model_path(lake, path or None))
    except TracepipeError as exc:
        notes.append(f"anomaly model skipped: {exc}")
        return None
