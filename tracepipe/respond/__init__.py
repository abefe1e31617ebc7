"""Respond to an incident: trace observations into an incident package, share findings as MISP or STIX.

`trace_observations` is what `tracepipe trace` calls; `share.export` what `tracepipe export misp|stix` calls.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from tracepipe.lake import Lake
from tracepipe.respond.observations import read_observations
from tracepipe.respond.trace import TraceResult

__all__ = ["TraceResult", "trace_observations"]


def trace_observations(
    lake: Lake,
    source: Path,
    fmt: str = "auto",
    window: dt.timedelta = dt.timedelta(hours=1),
    include_spread: bool = False,
    out: Path | None = None,
    force: bool = False,
) -> TraceResult:
    """Read the observations in `source`, trace them against the lake, and write the incident package into
    `out` when given (checked before the lake is read: a refused folder costs nothing)."""
    from tracepipe.respond.package import check_out_dir, write_package
    from tracepipe.respond.trace import trace

    if out is not None:
        check_out_dir(out, lake.root, force)
    result = trace(lake, read_observations(source, fmt, lake), window, include_spread)
    if out is not None and result.observations:
        result.package = write_package(result, out, lake.root, force)
    return result
