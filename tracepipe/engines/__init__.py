"""Query engines over the lake: DuckDB on one machine (the default), Apache Spark when a site outgrows it.

Both run the SAME SQL: views, features and detector queries are written once in DuckDB SQL (tracepipe/sql/,
tracepipe/detect/) and the Spark engine transpiles them (tracepipe/engines/dialect.py). Results come back as
Arrow tables, so what happens after a query (thresholds, reasons, alert ids, reports) is engine-agnostic code.
pyspark is imported only when the Spark engine is asked for: the base package needs neither it nor Java.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TextIO

import pyarrow as pa

from tracepipe.errors import UsageError
from tracepipe.lake import Lake

ENGINES = ("duckdb", "spark")
BatchFn = Callable[[pa.RecordBatch], pa.RecordBatch]


class Engine(Protocol):
    """What the sweep and `tracepipe sql` need from an engine."""

    name: str

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Run one DuckDB-dialect SELECT (named `$params`) over the lake's views; the result as Arrow."""
        ...

    def register(self, name: str, table: pa.Table) -> None:
        """Make a small Arrow table (allowlist, baseline, intel subset) a view named `name`."""
        ...

    def map_batches(
        self, sql: str, params: Mapping[str, Any] | None, fn: BatchFn, out_schema: pa.Schema
    ) -> pa.Table:
        """Run `sql`, then `fn` on each Arrow batch of its result (e.g. a scikit-learn model scoring rows).
        DuckDB: in this process; Spark: `mapInArrow`, per partition on the executors."""
        ...

    def close(self) -> None: ...


class DuckDBEngine:
    """The default engine: the DuckDB connection of tracepipe.query, with its views and macros."""

    name = "duckdb"

    def __init__(self, lake: Lake) -> None:
        from tracepipe import query  # H4's module: the one place that defines the DuckDB views

        self.lake = lake
        self.con = query.connect(lake)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        return duckdb_arrow(self.con.sql(sql, params=dict(params) if params else None))

    def register(self, name: str, table: pa.Table) -> None:
        self.con.register(name, table)

    def map_batches(
        self, sql: str, params: Mapping[str, Any] | None, fn: BatchFn, out_schema: pa.Schema
    ) -> pa.Table:
        table = self.query(sql, params)
        batches = [fn(batch) for batch in table.to_batches()]
        return pa.Table.from_batches(batches, schema=out_schema)

    def close(self) -> None:
        self.con.close()


def duckdb_arrow(result: Any) -> pa.Table:
    """A DuckDB result as an Arrow table (`to_arrow_table` since DuckDB 1.4, `fetch_arrow_table` before)."""
    fetch = getattr(result, "to_arrow_table", None) or result.fetch_arrow_table
    return fetch()


def open_engine(
    lake: Lake,
    engine: str = "duckdb",
    *,
    spark_master: str | None = None,
    spark_conf: Mapping[str, str] | None = None,
) -> Engine:
    """The engine named `engine` over `lake`. Spark options are ignored by DuckDB."""
    if engine == "duckdb":
        return DuckDBEngine(lake)
    if engine == "spark":
        from tracepipe.engines.spark import SparkEngine

        return SparkEngine(lake, master=spark_master, conf=spark_conf)
    raise UsageError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")


@contextmanager
def engine_session(lake: Lake, engine: str = "duckdb", **options: Any) -> Iterator[Engine]:
    """`open_engine` as a context manager that closes the engine afterwards."""
    opened = open_engine(lake, engine, **options)
    try:
        yield opened
    finally:
        opened.close()


def parse_conf(pairs: list[str] | None) -> dict[str, str]:
    """`--spark-conf k=v` options as a dict; a pair without `=` is a usage error."""
    conf: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--spark-conf expects key=value, got {pair!r} (e.g. spark.executor.memory=8g)")
        conf[key.strip()] = value.strip()
    return conf


def run_sql(
    lake: Lake,
    sql: str,
    engine: str = "duckdb",
    params: Mapping[str, Any] | None = None,
    *,
    spark_master: str | None = None,
    spark_conf: Mapping[str, str] | None = None,
) -> pa.Table:
    """One query on a freshly opened engine: what `tracepipe sql --engine ...` calls."""
    if engine == "spark":  # refuse what the allowlist does not hold before paying for a JVM
        from tracepipe.engines.allowlist import check_allowed
        from tracepipe.engines.dialect import parse_duckdb

        check_allowed(parse_duckdb(sql))
    with engine_session(lake, engine, spark_master=spark_master, spark_conf=spark_conf) as opened:
        return opened.query(sql, params)


def engine_relation(
    lake: Lake,
    sql: str,
    engine: str,
    *,
    spark_master: str | None = None,
    spark_conf: Mapping[str, str] | None = None,
) -> Any:
    """`run_sql` on `engine`, as a DuckDB relation over the Arrow result, so that `tracepipe sql` prints and
    exports it exactly like a DuckDB result."""
    import duckdb

    table = run_sql(lake, sql, engine, spark_master=spark_master, spark_conf=spark_conf)
    return duckdb.arrow(table)


def read_sql(query: str | None, file: Path | None, stdin: TextIO) -> str:
    """The SQL of `tracepipe sql`: from `file`, from stdin (query '-', or no query and stdin is not a
    terminal), else the query argument itself. UsageError for text that is not UTF-8 (stdin and argv come
    with undecodable bytes as surrogates, which DuckDB refuses with a TypeError)."""
    where = "the query argument"
    try:
        if file is not None:
            where = str(file)
            try:
                text = Path(file).read_text(encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"cannot read {file}: {exc.strerror or exc}") from exc
        elif query == "-" or (query is None and not stdin.isatty()):
            where = "stdin"
            text = stdin.read()
        elif query is not None:
            text = query
        else:
            raise UsageError("give a query, -f FILE, '-' for stdin, or --shell")
        text.encode("utf-8")
    except UnicodeError as exc:
        raise UsageError(
            f"the SQL from {where} is not UTF-8 text (at offset {exc.start}); save or type it as UTF-8"
        ) from exc
    return text


def query_lake(
    lake: Lake,
    sql: str,
    engine: str = "duckdb",
    *,
    spark_master: str | None = None,
    spark_conf: Mapping[str, str] | None = None,
) -> Any:
    """Read-only SQL over the lake's views on `engine`, as a DuckDB relation (None when the last statement
    returns no rows): what `tracepipe sql` prints or exports. LakeError when `lake` is no lake."""
    lake.require()
    if engine == "duckdb":
        from tracepipe import query

        with query.reading(lake.root):  # the views read each table's first file: it may be damaged
            con = query.connect(lake)
        return query.run_read_only(con, sql, lake.root)
    return engine_relation(lake, sql, engine, spark_master=spark_master, spark_conf=spark_conf)
