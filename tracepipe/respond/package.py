"""A TraceResult -> the incident package a CSIRT asks for, in one folder to attach to a ticket:

  index.html              offline page (who / what became of it / evidence; inline SVG; no script, CSP)
  trace.json              the same facts as JSON (what `tracepipe export misp|stix` reads back)
  evidence-flows.csv      the matching flows, one row each, with their source file
  evidence-flows.parquet  the same rows with every flow column, the source file and the lake version

The folder is built beside the target and renamed into place, so a reader never sees half a package; an
existing package is replaced only with force (a folder holding anything else, or a symbolic link, never), and
a folder inside the lake is refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa

from tracepipe.errors import UsageError
from tracepipe.fsutil import fsync_dir
from tracepipe.query import spreadsheet_safe
from tracepipe.respond.trace import TraceResult

MAX_CHARTS = 25
HTML_CONNECTIONS = 40  # per VM in the page; trace.json has up to trace.MAX_CONNECTIONS
CSV_COLUMNS = (
    "obs",
    "ts_start",
    "ts_end",
    "src_addr",
    "src_port",
    "dst_addr",
    "dst_port",
    "proto",
    "packets",
    "bytes",
    "tcp_flags",
    "src_vm",
    "src_vm_name",
    "dst_vm",
    "dst_vm_name",
    "exporter",
    "source",
)
FILES = {
    "html": "index.html",
    "json": "trace.json",
    "csv": "evidence-flows.csv",
    "parquet": "evidence-flows.parquet",
}


def check_out_dir(out: Path, lake_root: Path, force: bool) -> Path:
    """The package folder as given (absolute; a symbolic link there is not followed), or UsageError: it
    overlaps the lake, is a symbolic link, is not a folder, or holds files and force was not given, or holds
    anything but a package's own files (FILES). force replaces a package, never a folder of other things: with
    any folder a planted `shared/ssc -> ~/thesis` and --force deleted the thesis."""
    target = Path(os.path.abspath(out))
    if target.is_symlink():
        raise UsageError(
            f"--out {out} is a symbolic link (to {os.readlink(target)}); give the folder itself: a package is "
            "written to, and replaced in, a real folder only"
        )
    lake = Path(lake_root).resolve()
    resolved = target.resolve()  # (a parent may be a link: it decides where the lake check looks)
    if resolved == lake or resolved.is_relative_to(lake) or lake.is_relative_to(resolved):
        raise UsageError(
            f"--out {out} overlaps the lake ({lake}); the package never goes into the lake: choose another folder"
        )
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the package")
    entries = list(os.scandir(target)) if target.is_dir() else []
    if entries and not force:
        raise UsageError(
            f"--out {out} already holds files; give a new folder, or --force to replace that package"
        )
    foreign = sorted(
        e.name for e in entries if e.name not in FILES.values() or not e.is_file(follow_symlinks=False)
    )
    if foreign:
        raise UsageError(
            f"--out {out} holds {len(foreign)} entries that are not a package's ({', '.join(foreign[:5])}): --force "
            "replaces only a package that `tracepipe trace` wrote; give a new folder"
        )
    return target


def _remove_package(folder: Path) -> None:
    """Delete a replaced package: its own files, then the folder. Never through a link (a folder swapped for
    one since the check: the link alone goes), never anything else (a file planted since keeps the folder, by
    its temporary name)."""
    if folder.is_symlink() or not folder.is_dir():
        folder.unlink(missing_ok=True)
        return
    for name in FILES.values():
        (folder / name).unlink(missing_ok=True)  # (a file or a link; a folder by that name stays)
    with contextlib.suppress(OSError):
        folder.rmdir()


def _iso(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return value


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_ready(v) for v in obj]
    return _iso(obj)


def package_data(result: TraceResult) -> dict[str, Any]:
    """The JSON of the package (times as ISO 8601 UTC text)."""
    return _json_ready({"title": "tracepipe trace", **result.to_dict(), "files": FILES})


def _timeline_svg(rows: list[dict[str, Any]], start: str, end: str) -> Any:
    from tracepipe.report.html import _svg

    spec = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "width": 620,
        "height": 130,
        "title": "This VM's flows in the observation windows",
        "data": {"values": rows},
        "mark": "bar",
        "encoding": {
            "x": {"field": "t", "type": "temporal", "title": "time (UTC)", "scale": {"domain": [start, end]}},
            "y": {"field": "flows", "type": "quantitative", "title": "flows per bin", "stack": True},
            "color": {
                "field": "direction",
                "type": "nominal",
                "title": None,
                "scale": {"domain": ["outbound", "inbound"], "range": ["#b9472c", "#2f6690"]},
            },
        },
    }
    return _svg(spec)


def render_trace_html(data: dict[str, Any]) -> str:
    from tracepipe.report.html import template_environment

    charts = {}
    for vm in data["vms"][:MAX_CHARTS]:
        if vm["timeline"]:
            charts[vm["vm_id"]] = _timeline_svg(vm["timeline"], vm["first_window"], vm["last_window"])
    names = {vm["vm_id"]: vm["vm_name"] for vm in data["vms"]}
    env = template_environment()
    return env.get_template("trace.html.j2").render(
        data=data, charts=charts, names=names, max_connections=HTML_CONNECTIONS
    )


def _evidence_tables(result: TraceResult) -> tuple[pa.Table, pa.Table]:
    """(CSV table, Parquet table): the Parquet one keeps every column plus the lake version."""
    evidence = result.evidence
    if evidence.num_rows == 0 and not evidence.column_names:
        evidence = pa.table({c: pa.array([], pa.string()) for c in CSV_COLUMNS})
    full = evidence.append_column(
        "lake_version", pa.array([result.lake_version] * evidence.num_rows, pa.string())
    )
    csv_table = evidence.select([c for c in CSV_COLUMNS if c in evidence.column_names])
    return spreadsheet_safe(csv_table), full


def write_package(result: TraceResult, out: Path, lake_root: Path, force: bool = False) -> dict[str, Path]:
    """Write the package folder (see the module docstring); returns {kind: path}."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    target = check_out_dir(out, lake_root, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        data = package_data(result)
        (staging / FILES["json"]).write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
        (staging / FILES["html"]).write_text(render_trace_html(data), encoding="utf-8")
        csv_table, full = _evidence_tables(result)
        # (file objects, not paths: pyarrow encodes a path as UTF-8, and a name that is not failed)
        with open(staging / FILES["csv"], "wb") as handle:
            pacsv.write_csv(csv_table, handle)
        with open(staging / FILES["parquet"], "wb") as handle:
            pq.write_table(full, handle, compression="zstd")
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(staging)
        old = None
        if os.path.lexists(target):
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(staging, target)
        fsync_dir(target.parent)
        if old is not None:
            _remove_package(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {kind: target / name for kind, name in FILES.items()}
