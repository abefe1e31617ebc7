"""DuckDB over the lake: a connection with one view per dataset, `flows_attributed`, and the address macros
(`who_had(addr, ts)`, `cidr_contains(cidr, addr)`, `ip_to_num`, `ip_between`).

The SQL lives in tracepipe/sql/*.sql. Views exist even for datasets that have no file yet (empty, typed from
schema.py), so a query never fails because nothing has landed. `run_read_only` refuses every statement that is
not a query: `tracepipe sql` cannot COPY, CREATE, DELETE, ATTACH or change settings against the lake.
"""

from __future__ import annotations

import re
import tempfile
from importlib import resources
from pathlib import Path

import duckdb
import pyarrow as pa

from tracepipe.errors import LakeError, UsageError
from tracepipe.lake import Lake
from tracepipe.schema import DATASETS

# Key in a flow file's Parquet footer (key-value metadata) that says "src_vm/dst_vm of this file were set by
# attribute_flows": a null src_vm there means nobody held the address, not "not looked up yet". Files that
# lack it (just landed) are attributed at query time by flows_attributed. Written by attribution.py.
ATTRIBUTED_KEY = "tracepipe.attributed"

# Statement types `tracepipe sql` runs; everything else (COPY, CREATE, INSERT, DELETE, UPDATE, ATTACH, SET,
# LOAD, EXPORT, PRAGMA, CALL, ...) is refused before it reaches DuckDB.
READ_ONLY_TYPES = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}

_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.int8(): "TINYINT",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.list_(pa.string()): "VARCHAR[]",
}


def sql_text(name: str) -> str:
    """The text of tracepipe/sql/<name>.sql."""
    return resources.files("tracepipe").joinpath("sql", f"{name}.sql").read_text(encoding="utf-8")


def quote_literal(text: str) -> str:
    """A SQL string literal (for paths the lake produced; user input is bound as a parameter instead)."""
    return "'" + text.replace("'", "''") + "'"


def _duck_type(arrow_type: pa.DataType) -> str:
    if pa.types.is_timestamp(arrow_type):
        return "TIMESTAMPTZ" if arrow_type.tz else "TIMESTAMP"
    try:
        return _DUCK_TYPES[arrow_type]
    except KeyError as exc:
        raise LakeError(f"no DuckDB type for {arrow_type}; add it to query._DUCK_TYPES") from exc


def empty_relation_sql(name: str) -> str:
    """A typed SELECT of no rows with the dataset's columns (and `date` for partitioned datasets)."""
    dataset = DATASETS[name]
    columns = [f'CAST(NULL AS {_duck_type(f.type)}) AS "{f.name}"' for f in dataset.schema]
    if dataset.partition_ts is not None:
        columns.append('CAST(NULL AS DATE) AS "date"')
    return f"SELECT {', '.join(columns)} WHERE false"


def scan_sql(name: str, paths: list[Path]) -> str:
    """read_parquet over the given files of a dataset, hive `date` typed DATE; empty typed relation if none."""
    if not paths:
        return empty_relation_sql(name)
    files = "[" + ", ".join(quote_literal(str(p)) for p in paths) + "]"
    options = "union_by_name = true"
    if DATASETS[name].partition_ts is not None:
        options += ", hive_partitioning = true, hive_types = {'date': DATE}"
    columns = ", ".join(f'"{f.name}"' for f in DATASETS[name].schema)
    if DATASETS[name].partition_ts is not None:
        columns += ', "date"'
    return f"SELECT {columns} FROM read_parquet({files}, {options})"


def attributed_files(con: duckdb.DuckDBPyConnection, paths: list[Path]) -> set[str]:
    """The flow files whose footer carries ATTRIBUTED_KEY (one footer read per file)."""
    if not paths:
        return set()
    files = "[" + ", ".join(quote_literal(str(p)) for p in paths) + "]"
    rows = con.execute(
        f"SELECT DISTINCT file_name FROM parquet_kv_metadata({files}) WHERE decode(key) = ?",
        [ATTRIBUTED_KEY],
    ).fetchall()
    return {row[0] for row in rows}


def connect(lake: Lake, read_only: bool = True, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB session whose views read the lake's Parquet files as they are now.

    Views: flows, vm_events, vm_leases, vms, vm_logs, intel, alerts, rejects, flows_attributed; macros from
    sql/macros.sql and who_had from sql/views.sql. With read_only (the default) the session may read only the
    lake directory and its settings are locked; run user SQL through `run_read_only`.
    """
    if not lake.root.exists():
        raise LakeError(f"no lake at {lake.root}; ingest something first or pass --lake / set TRACEPIPE_LAKE")
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    con.execute(sql_text("macros"))
    for name in DATASETS:
        if name == "flows":
            continue
        con.execute(f'CREATE OR REPLACE VIEW "{name}" AS {scan_sql(name, lake.files(name))}')
    flow_files = lake.files("flows")
    done = attributed_files(con, flow_files)
    con.execute(f"CREATE OR REPLACE VIEW flows AS {scan_sql('flows', flow_files)}")
    con.execute(
        "CREATE OR REPLACE VIEW _flows_done AS "
        + scan_sql("flows", [p for p in flow_files if str(p) in done])
    )
    con.execute(
        "CREATE OR REPLACE VIEW _flows_todo AS "
        + scan_sql("flows", [p for p in flow_files if str(p) not in done])
    )
    con.execute(sql_text("views"))
    if read_only:
        # Defence in depth under the statement check: the session reads the lake (and its spill directory)
        # and nothing else, and a query cannot switch that back on.
        spill = Path(tempfile.gettempdir()) / "tracepipe-duckdb"
        con.execute(f"SET temp_directory = {quote_literal(str(spill))}")
        allowed = "[" + ", ".join(quote_literal(str(p)) for p in (lake.root.resolve(), spill)) + "]"
        con.execute(f"SET allowed_directories = {allowed}")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> list[duckdb.Statement]:
    """The statements of `sql`, if every one is a query (SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE,
    EXPLAIN of those); UsageError naming the first one that is not."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise UsageError(f"SQL does not parse: {exc}") from exc
    if not statements:
        raise UsageError("no SQL statement given")
    for statement in statements:
        kind = statement.type
        if kind == duckdb.StatementType.EXPLAIN:
            # EXPLAIN ANALYZE runs its statement: check what it explains.
            inner = re.sub(r"^\s*explain\s+(analy[sz]e\s+)?", "", statement.query, flags=re.IGNORECASE)
            check_read_only(con, inner)
            continue
        if kind not in READ_ONLY_TYPES:
            verb = kind.name if kind is not None else "this statement"
            raise UsageError(
                f"tracepipe sql is read-only: {verb} statements are refused "
                f"({statement.query.strip()[:60]!r}). Write queries only (SELECT, WITH, DESCRIBE, EXPLAIN); "
                "to save a result, use --format csv|json|parquet --output FILE."
            )
    return statements


def run_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation | None:
    """Run every statement of `sql` after check_read_only; the relation of the last one (None if it returns
    no rows). Errors of DuckDB (unknown column, ...) become UsageError with DuckDB's message."""
    statements = check_read_only(con, sql)
    relation = None
    try:
        for statement in statements:
            relation = con.sql(statement.query)
    except duckdb.Error as exc:
        raise UsageError(f"query failed: {exc}") from exc
    return relation
