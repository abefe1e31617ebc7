"""Small flows tables for tests (test scaffolding: not in the package)."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa


def flows_of(pairs: list[tuple[str, str, dt.datetime]]) -> pa.Table:
    """One TCP flow of one packet, 100 bytes, per (src, dst, ts): the columns an attribution test needs."""
    n = len(pairs)
    ts = pa.array([t for _, _, t in pairs], pa.timestamp("us", tz="UTC"))
    return pa.table(
        {
            "ts_start": ts,
            "ts_end": ts,
            "src_addr": pa.array([s for s, _, _ in pairs]),
            "dst_addr": pa.array([d for _, d, _ in pairs]),
            "proto": pa.array([6] * n, pa.int16()),
            "packets": pa.array([1] * n, pa.int64()),
            "bytes": pa.array([100] * n, pa.int64()),
        }
    )
