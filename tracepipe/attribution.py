"""Flow attribution: give both ends of every flow the VM whose lease was valid at `ts_start`.

`attribute_flows(lake, days)` rewrites the flow files of those UTC days (all days if None), one file at a time
through DuckDB (out of core): `src_vm`/`dst_vm` = vm_id of the lease on that address with
valid_from <= ts_start < valid_to (open leases: valid_to null). Row order, row groups and every other column
stay as they were; rerunning gives the same files (idempotent). Each rewritten file carries
query.ATTRIBUTED_KEY in its footer, so that `flows_attributed` trusts its src_vm/dst_vm (a null there means
"nobody held the address") and joins only never-attributed files at query time.

Run it when flows land (ingest does) and for the days a late or changed lifecycle event touches
(`leases.rebuild_leases` returns them; `ingest vm` does).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from tracepipe.lake import Lake
from tracepipe.query import ATTRIBUTED_KEY, connect, quote_literal

BATCH_ROWS = 1_000_000

# Leases do not overlap per address: the lease valid at ts_start is the last one that started at or before it
# (ASOF), provided it had not ended yet.
_ATTRIBUTE_FILE_SQL = """
SELECT f.* EXCLUDE (src_vm, dst_vm, file_row_number),
       CASE WHEN s.valid_to IS NULL OR f.ts_start < s.valid_to THEN s.vm_id END AS src_vm,
       CASE WHEN d.valid_to IS NULL OR f.ts_start < d.valid_to THEN d.vm_id END AS dst_vm
FROM read_parquet({path}, file_row_number = true, hive_partitioning = false) f
ASOF LEFT JOIN _leases s ON f.src_addr = s.addr AND f.ts_start >= s.valid_from
ASOF LEFT JOIN _leases d ON f.dst_addr = d.addr AND f.ts_start >= d.valid_from
ORDER BY f.file_row_number
"""


def arrow_reader(relation: Any, batch_rows: int = BATCH_ROWS) -> pa.RecordBatchReader:
    """Stream a DuckDB relation as Arrow batches (DuckDB >= 1.4 names it to_arrow_reader)."""
    method = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
    return method(batch_rows)


def flow_files(lake: Lake, days: Iterable[str] | None = None) -> list[Path]:
    """The flow partition files of `days` ('YYYY-MM-DD'; None = every day)."""
    files = lake.files("flows")
    if days is None:
        return files
    wanted = {f"date={day}" for day in days}
    return [path for path in files if path.parent.name in wanted]


def attribute_flows(
    lake: Lake,
    days: Iterable[str] | None = None,
    progress: Callable[[Path, int, int], None] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Set src_vm/dst_vm in the flow files of `days` (None = all) from the current vm_leases.

    Returns {"days", "files", "rows", "src_attributed", "dst_attributed", "seconds"}. `progress` is called
    after each file with (path, files done, files total).
    """
    started = time.perf_counter()
    days_list = sorted(set(days)) if days is not None else None
    paths = flow_files(lake, days_list)
    summary: dict[str, Any] = {
        "days": days_list
        if days_list is not None
        else sorted({p.parent.name.removeprefix("date=") for p in paths}),
        "files": 0,
        "rows": 0,
        "src_attributed": 0,
        "dst_attributed": 0,
        "seconds": 0.0,
    }
    if not paths:
        return summary
    con = connect(lake, read_only=False, threads=threads)
    try:
        con.execute(
            "CREATE TEMP TABLE _leases AS SELECT addr, vm_id, valid_from, valid_to FROM vm_leases "
            "ORDER BY addr, valid_from"
        )
        leases = con.execute("SELECT count(*) FROM _leases").fetchall()[0][0]
        marker = json.dumps({"attributed_at": dt.datetime.now(dt.UTC).isoformat(), "leases": leases})
        counts = {"src_attributed": 0, "dst_attributed": 0}

        def counted(reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
            for batch in reader:
                counts["src_attributed"] += len(batch) - batch.column("src_vm").null_count
                counts["dst_attributed"] += len(batch) - batch.column("dst_vm").null_count
                yield batch

        for done, path in enumerate(paths, start=1):
            reader = arrow_reader(con.sql(_ATTRIBUTE_FILE_SQL.format(path=quote_literal(str(path)))))
            summary["rows"] += lake.rewrite_file_batches(
                path, counted(reader), "flows", {ATTRIBUTED_KEY: marker}
            )
            summary["files"] += 1
            if progress is not None:
                progress(path, done, len(paths))
    finally:
        con.close()
    summary.update(counts)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary
