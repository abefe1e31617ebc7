"""The Spark engine: the same lake, views and sweep as DuckDB, on Apache Spark (pyspark, the `spark` extra).

In: a lake path Spark can read (local, shared filesystem, or an object-store URI), a master (`local[*]`,
`yarn`, `k8s://...`, `spark://...`) and Spark conf. Out: the lake's datasets as temp views typed from
schema.py (timestamps UTC, partition `date` a DATE), H4's derived views and macros transpiled from their one
DuckDB definition (dialect.py), and query results as Arrow tables (no pandas on the way). pyspark is imported
here only, lazily: the base package runs without it and without Java.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from tracepipe.engines import BatchFn, duckdb_arrow
from tracepipe.engines.dialect import EngineUnsupported, parse_bundled, parse_table_macros, to_spark
from tracepipe.errors import EnvironmentProblem, UsageError
from tracepipe.lake import Lake
from tracepipe.schema import DATASETS
from tracepipe.tools import find_tool

if TYPE_CHECKING:  # pragma: no cover - typing only; pyspark is optional
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import DataType, StructType

DEFAULT_MASTER = "local[*]"
PARTITION_COLUMN = "date"
# Conf every tracepipe session gets (the user's --spark-conf wins): UTC everywhere, Arrow for Python transfer,
# quiet console (progress bars are ours, on stderr).
BASE_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.driver.extraJavaOptions": "-Duser.timezone=UTC",
    "spark.executor.extraJavaOptions": "-Duser.timezone=UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.pyspark.fallback.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.adaptive.enabled": "true",
}
# Relations views.sql expects besides the datasets: flow files attributed with vm keys (joined to vms on
# vm_key), other attributed files (src_vm/dst_vm final, joined on vm_id) and files that never were (attributed
# at query time by the range join).
FLOW_HALVES = ("_flows_keyed", "_flows_done", "_flows_todo")


# ---- pyspark, Java ----------------------------------------------------------------------------------------
def _pyspark() -> Any:
    try:
        import pyspark
    except ImportError as exc:
        raise EnvironmentProblem(
            "the Spark engine needs pyspark: pip install 'tracepipe[spark]' (and a Java 17+ runtime)"
        ) from exc
    return pyspark


def check_java() -> str:
    """Path of the java binary Spark will start; EnvironmentProblem if there is none."""
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    if candidate is not None and candidate.exists():
        return str(candidate)
    found = find_tool("java")
    if found is None:
        raise EnvironmentProblem(
            "the Spark engine needs a Java 17+ runtime and none was found: install one "
            "(Debian: apt-get install default-jre-headless) or set JAVA_HOME"
        )
    return found


# ---- schema: Arrow (schema.py) -> Spark ---------------------------------------------------------------------
def spark_type(arrow_type: pa.DataType) -> DataType:
    """The Spark type a column of schema.py is read as. Timestamps (tz=UTC) -> TimestampType."""
    from pyspark.sql import types as T

    simple = {
        pa.string(): T.StringType(),
        pa.large_string(): T.StringType(),
        pa.int8(): T.ByteType(),
        pa.int16(): T.ShortType(),
        pa.int32(): T.IntegerType(),
        pa.int64(): T.LongType(),
        pa.float32(): T.FloatType(),
        pa.float64(): T.DoubleType(),
        pa.bool_(): T.BooleanType(),
        pa.date32(): T.DateType(),
        pa.binary(): T.BinaryType(),
    }
    if arrow_type in simple:
        return simple[arrow_type]
    if pa.types.is_timestamp(arrow_type):
        return T.TimestampType() if arrow_type.tz else T.TimestampNTZType()
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return T.ArrayType(spark_type(arrow_type.value_type), True)
    if pa.types.is_struct(arrow_type):
        return T.StructType([T.StructField(f.name, spark_type(f.type), f.nullable) for f in arrow_type])
    if pa.types.is_dictionary(arrow_type):
        return spark_type(arrow_type.value_type)
    raise EngineUnsupported(f"no Spark type for Arrow {arrow_type}")


def spark_schema(schema: pa.Schema, partitioned: bool = False) -> StructType:
    """A StructType of an Arrow schema; `partitioned` adds the hive partition column `date` (DATE)."""
    from pyspark.sql import types as T

    # Nullable everywhere: Spark does not enforce nullability on read, and a non-null field would make an
    # outer join's output lie about its nulls.
    fields = [T.StructField(f.name, spark_type(f.type), True) for f in schema]
    if partitioned:
        fields.append(T.StructField(PARTITION_COLUMN, T.DateType(), True))
    return T.StructType(fields)


def dataset_schema(name: str) -> StructType:
    dataset = DATASETS[name]
    return spark_schema(dataset.schema, partitioned=dataset.partition_ts is not None)


# ---- session ---------------------------------------------------------------------------------------------
def _local_cores(master: str) -> int | None:
    match = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master.strip())
    if match is None:
        return None
    cores = match.group(1)
    if cores is None:
        return 1
    return os.cpu_count() or 1 if cores == "*" else int(cores)


def session_conf(master: str, conf: Mapping[str, str] | None = None) -> dict[str, str]:
    """BASE_CONF, a shuffle width that suits a local master (Spark's 200 is for clusters), then the user's."""
    merged = dict(BASE_CONF)
    cores = _local_cores(master)
    if cores is not None:
        merged["spark.sql.shuffle.partitions"] = str(max(2, 2 * cores))
        merged["spark.ui.enabled"] = "false"
    merged.update(conf or {})
    return merged


def worker_python(master: str, conf: Mapping[str, str] | None = None) -> str | None:
    """The Python that Spark's workers must start, or None to leave Spark's choice (a cluster's own Python).

    On a local master the workers run on this machine: they get the interpreter tracepipe runs in, so they
    can import tracepipe whatever PATH holds (Spark's default is `python3` from PATH). The user's choice wins:
    `--spark-conf spark.pyspark.python=...` or PYSPARK_PYTHON. On a cluster the executors need their own
    environment (README: "Spark on a cluster")."""
    chosen = (conf or {}).get("spark.pyspark.python") or os.environ.get("PYSPARK_PYTHON")
    if chosen:
        return chosen
    return sys.executable if _local_cores(master) is not None else None


def get_session(
    master: str | None = None, conf: Mapping[str, str] | None = None, app_name: str = "tracepipe"
) -> SparkSession:
    """A SparkSession (the active one if it exists: Spark allows one per process) with session_conf()."""
    from tracepipe.nopandas import allow_pandas

    allow_pandas()  # PySpark converts through pandas
    _pyspark()
    submitted = _submitted_conf()
    master = master or submitted.get("spark.master") or DEFAULT_MASTER
    if _local_cores(master) is not None:
        check_java()
    from pyspark.sql import SparkSession

    python = worker_python(master, {**submitted, **(conf or {})})
    if python is not None:
        # pyspark's SparkContext takes its workers' Python from PYSPARK_PYTHON only (the conf key alone is
        # read by spark-submit), so both are set before the context starts; a running context keeps its own.
        os.environ["PYSPARK_PYTHON"] = python
        conf = {**(conf or {}), "spark.pyspark.python": python}

    builder = SparkSession.builder.master(master)
    if "spark.app.name" not in submitted:
        builder = builder.appName(app_name)
    for key, value in session_conf(master, conf).items():
        # what spark-submit was given (--master, --conf) wins over tracepipe's defaults; the caller's conf
        # (--spark-conf) over both. A submitted driver ran on the driver host in local[*] with tracepipe's
        # shuffle width, its cluster never asked (Spark review)
        if key not in submitted or key in (conf or {}):
            builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # py4j/JVM start-up failures come as plain exceptions
        raise EnvironmentProblem(f"cannot start Spark (master {master}): {exc}") from exc
    spark.sparkContext.setLogLevel("ERROR")
    # Settings that a reused session may not have yet (runtime SQL conf can change after start). No SQL on
    # files (`SELECT * FROM parquet.`/path``): tracepipe reads the lake through DataFrames, users through its
    # views (defence in depth under engines/allowlist.py).
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    spark.conf.set("spark.sql.runSQLOnFiles", "false")
    return spark


def _submitted_conf() -> dict[str, str]:
    """The Spark settings of a driver started by spark-submit (or the pyspark shell): its --master and --conf,
    which the JVM that launched this Python holds; {} for a process tracepipe itself starts Spark in."""
    if not os.environ.get("PYSPARK_GATEWAY_PORT"):
        return {}
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # (the launching JVM's gateway: without it SparkConf() is empty)
    return dict(SparkConf().getAll())


_MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")


def missing_on_workers(exc: BaseException) -> EnvironmentProblem | None:
    """A failure of Spark's Python workers that could not import a module (they run another Python than
    tracepipe's), as the EnvironmentProblem that names the fix; None for any other failure."""
    match = _MISSING_MODULE.search(str(exc))
    if match is None:
        return None
    python = os.environ.get("PYSPARK_PYTHON", "python3 from PATH")
    return EnvironmentProblem(
        f"Spark's Python workers cannot import {match.group(1)!r}: they run {python}, which lacks "
        "tracepipe's environment. On a cluster, ship it to the executors (a venv-pack archive with "
        "--spark-conf spark.archives=tracepipe-env.tar.gz#env and PYSPARK_PYTHON=./env/bin/python, or an "
        "image with tracepipe installed; see README, 'Spark on a cluster'); locally, unset PYSPARK_PYTHON "
        "or point it at an interpreter that has tracepipe installed."
    )


@contextmanager
def worker_errors() -> Iterator[None]:
    """Runs Spark actions; a worker that lacks tracepipe (or a dependency) becomes an EnvironmentProblem."""
    try:
        yield
    except Exception as exc:
        problem = missing_on_workers(exc)
        if problem is None:
            raise
        raise problem from exc


# ---- reading the lake ----------------------------------------------------------------------------------
def lake_uri(lake: Lake | str) -> str:
    """Where Spark reads the lake: an absolute local path, or the URI as given (s3a://, hdfs://, abfss://)."""
    if isinstance(lake, str) and "://" in lake:
        return lake.rstrip("/")
    root = lake.root if isinstance(lake, Lake) else Path(lake)
    return str(Path(root).resolve())


def empty_frame(spark: SparkSession, name: str) -> DataFrame:
    return spark.createDataFrame([], dataset_schema(name))


def read_files(spark: SparkSession, name: str, base: str, files: list[str] | None = None) -> DataFrame:
    """One dataset, typed by schema.py. `files` limits the read to those files (paths under `base`)."""
    dataset = DATASETS[name]
    reader = (
        spark.read.schema(dataset_schema(name))
        .option("pathGlobFilter", "*.parquet")  # never a *.parquet.tmp of a write in progress
        .option("mergeSchema", "false")
    )
    if dataset.partition_ts is not None:
        reader = reader.option("basePath", base)  # so `date=YYYY-MM-DD` becomes the typed column `date`
    if files is not None:
        if not files:
            return empty_frame(spark, name)
        return reader.parquet(*(hadoop_glob_literal(f) for f in files))
    return reader.parquet(hadoop_glob_literal(base))


def hadoop_glob_literal(path: str) -> str:
    """`path` for Hadoop's globbing (every path spark.read takes is a pattern): its glob characters escaped
    with a backslash, so a lake at `/srv/lake[1]` reads its own files, not those of a planted `/srv/lake1`."""
    return _HADOOP_GLOB.sub(r"\\\1", path)


_HADOOP_GLOB = re.compile(r"([\\{}\[\]*?])")


def table_files(lake: Lake | str, name: str) -> list[str]:
    """The current files of a dataset, from its Delta transaction log (never a directory listing: files
    removed by compaction stay on disk until vacuum). Object-store lakes are opened by delta-rs with the
    URI as given (s3a:// read as s3://) and the files handed back in the URI's own scheme."""
    if isinstance(lake, Lake):
        return [str(p) for p in lake.files(name)]
    root = lake_uri(lake)
    if "://" not in root:
        return [str(p) for p in Lake(root).files(name)]
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    scheme, rest = root.split("://", 1)
    delta_scheme = {"s3a": "s3", "s3n": "s3"}.get(scheme, scheme)
    try:
        uris = DeltaTable(f"{delta_scheme}://{rest}/{name}").file_uris()
    except TableNotFoundError:
        return []
    return [f"{scheme}://{u.split('://', 1)[1]}" if "://" in u else u for u in uris]


def read_dataset(spark: SparkSession, lake: Lake | str, name: str) -> DataFrame:
    """The whole dataset `name` of the lake as a DataFrame with the schema.py schema; empty if nothing landed.
    The file list comes from the table's log (no Delta connector jar needed)."""
    return read_files(spark, name, f"{lake_uri(lake)}/{name}", table_files(lake, name))


def _flow_halves(lake: Lake) -> tuple[list[str], list[str], list[str]]:
    """Flow files attributed with vm keys, the other attributed ones, and those never attributed (see
    tracepipe.query.flow_parts)."""
    from tracepipe.query import flow_parts

    keyed, done, todo = flow_parts(lake)
    return [str(p) for p in keyed], [str(p) for p in done], [str(p) for p in todo]


# ---- macros: one DuckDB definition, evaluated by DuckDB inside Spark's Arrow UDFs --------------------------
@functools.cache
def _macro_connection() -> Any:
    """Per Python worker: an in-memory DuckDB with tracepipe's scalar macros."""
    import duckdb

    from tracepipe.query import sql_text

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(sql_text("macros"))
    return con


_DUCK_TO_ARROW = {
    "BOOLEAN": pa.bool_(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "VARCHAR": pa.string(),
    "DOUBLE": pa.float64(),
    "SMALLINT": pa.int16(),
    "TINYINT": pa.int8(),
}


@functools.cache
def scalar_macro_names() -> frozenset[str]:
    """Public scalar macros of sql/macros.sql (table macros are expanded by dialect.py instead)."""
    from sqlglot import exp

    from tracepipe.query import sql_text

    names = set()
    for statement in parse_bundled(sql_text("macros")):
        if not isinstance(statement, exp.Create) or (
            isinstance(statement.expression, exp.Query) and not isinstance(statement.expression, exp.Subquery)
        ):
            continue  # (a table macro; `AS (SELECT ...)` is a scalar one)
        signature = statement.this
        name = signature.this.name if isinstance(signature.this, exp.Expression) else signature.name
        if name and not name.startswith("_"):
            names.add(name.lower())
    return frozenset(names)


@functools.cache
def macro_result_type(name: str, nargs: int) -> pa.DataType | None:
    """Arrow type of `name(VARCHAR x nargs)` as DuckDB binds it; None if Spark has no such type (UHUGEINT)."""
    args = ", ".join(["NULL::VARCHAR"] * nargs)
    kind = _macro_connection().execute(f"DESCRIBE SELECT {name}({args}) AS r").fetchall()[0][1]
    return _DUCK_TO_ARROW.get(kind)


def evaluate_macro(name: str, out_type: pa.DataType, *columns: pa.Array) -> pa.Array:
    """`name(columns...)` evaluated by DuckDB on one Arrow batch (what runs inside the Spark UDF)."""
    con = _macro_connection()
    cursor = con.cursor()  # one per call: Spark may run UDFs of several columns in one worker
    cursor.register("batch", pa.table({f"a{i}": column for i, column in enumerate(columns)}))
    args = ", ".join(f"a{i}" for i in range(len(columns)))
    result = duckdb_arrow(cursor.execute(f"SELECT {name}({args}) AS r FROM batch")).column(0)
    return result.combine_chunks().cast(out_type)


def register_macro(spark: SparkSession, name: str, nargs: int) -> None:
    """`name` (a scalar macro of macros.sql) as a Spark Arrow UDF that runs the DuckDB macro per batch."""
    import warnings

    from pyspark.sql.functions import ArrowUDFType, arrow_udf

    out_type = macro_result_type(name, nargs)
    if out_type is None:
        raise EngineUnsupported(
            f"{name}() returns a type Spark does not have (128-bit integer); "
            "compare addresses with cidr_contains / ip_between instead"
        )
    fn = functools.partial(evaluate_macro, name, out_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "prefer type hints": a partial has none to give
        spark.udf.register(name, arrow_udf(fn, spark_type(out_type), ArrowUDFType.SCALAR))


def macro_calls(sql: str, table_macros: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Scalar macros a DuckDB query calls: name -> number of arguments; also those that the bodies of the table
    macros it calls (`table_macros`: who_had canonicalises its address with ip_canonical) call."""
    from sqlglot import exp

    from tracepipe.engines.dialect import parse_duckdb

    names = scalar_macro_names()
    calls: dict[str, int] = {}
    bodies: list[Any] = []
    for statement in parse_duckdb(sql):
        for func in statement.find_all(exp.Anonymous):
            if func.name.lower() in names:
                calls[func.name.lower()] = len(func.expressions)
            elif table_macros and (macro := table_macros.get(func.name.lower())) is not None:
                bodies.append(macro.body)
    for body in bodies:
        for func in body.find_all(exp.Anonymous):
            if func.name.lower() in names:
                calls[func.name.lower()] = len(func.expressions)
    return calls


# ---- the engine ---------------------------------------------------------------------------------------------
class SparkEngine:
    """tracepipe.engines.Engine on Spark: the lake's datasets and H4's views as temp views of one session."""

    name = "spark"

    def __init__(
        self,
        lake: Lake,
        master: str | None = None,
        conf: Mapping[str, str] | None = None,
        session: SparkSession | None = None,
        uri: str | None = None,
    ) -> None:
        self.lake = lake
        self.uri = uri or lake_uri(lake)
        if session is None:
            _pyspark()
            from pyspark.sql import SparkSession

            # stop() at close only a session this engine started (Spark has one per process)
            self._own_session = SparkSession.getActiveSession() is None
            session = get_session(master, conf)
        else:
            self._own_session = False
        self.spark = session
        self.registered: set[str] = set()
        self._register_views()

    # -- setup
    def _register_views(self) -> None:
        import sqlglot
        from sqlglot import exp

        from tracepipe.query import sql_text, vm_info_plain

        # one version of every table for the whole session (see query.connect)
        source: Lake | str = self.uri if "://" in self.uri else self.lake.snapshot()
        for name in DATASETS:
            read_dataset(self.spark, source, name).createOrReplaceTempView(name)
        if isinstance(source, str):
            keyed, done, todo = [], [], None  # object stores: every flow attributed at query time
        else:
            keyed, done, todo = _flow_halves(source)
        base = f"{self.uri}/flows"
        read_files(self.spark, "flows", base, keyed).createOrReplaceTempView("_flows_keyed")
        read_files(self.spark, "flows", base, done).createOrReplaceTempView("_flows_done")
        todo_frame = (
            self.spark.table("flows") if todo is None else read_files(self.spark, "flows", base, todo)
        )
        todo_frame.createOrReplaceTempView("_flows_todo")
        self.spark.table("vms").createOrReplaceTempView("_vms_changed")  # all of vms: views.sql filters it
        self.macros: set[str] = set()
        views_sql = sql_text("views")
        self.table_macros = {**parse_table_macros(sql_text("macros")), **parse_table_macros(views_sql)}
        # as query.connect (see query.vm_info_plain); in place of views.sql's own _vm_info, since a Spark view
        # binds the views it reads when it is created
        replacing = {}
        if isinstance(source, str) or not vm_info_plain(source):
            replacing = {
                s.this.name: s for s in sqlglot.parse(sql_text("vm_info_from_leases"), read="duckdb")
            }
        # flows_attributed's stored-facts half (views.sql _flows_facts_now) reads DuckDB's vm_status function:
        # on Spark the files with stored facts are read with the other keyed ones (flow_parts puts them in
        # _flows_keyed) and joined to vms, the same rows
        replacing["_flows_facts_now"] = sqlglot.parse_one(
            "CREATE OR REPLACE VIEW _flows_facts_now AS SELECT * FROM _flows_joined WHERE false",
            read="duckdb",
        )
        for statement in parse_bundled(views_sql):
            if isinstance(statement, exp.Create) and str(statement.args.get("kind", "")).upper() == "VIEW":
                self._create_view(replacing.get(statement.this.name, statement))

    def _create_view(self, statement: Any) -> None:
        name = statement.this.name
        select_sql = statement.expression.sql("duckdb")
        spark_sql = self._transpile(select_sql)[0]
        self._sql(spark_sql).createOrReplaceTempView(name)

    def _columns(self, spark_sql_or_table: str) -> list[str]:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", spark_sql_or_table):
            return self.spark.table(spark_sql_or_table).columns
        return self.spark.sql(spark_sql_or_table).columns

    def _transpile(self, sql: str, user: bool = False) -> list[str]:
        """DuckDB SQL -> Spark statements; `user` SQL (tracepipe sql) must pass allowlist.check_allowed."""
        if user:
            from tracepipe.engines.allowlist import check_allowed, lake_relations
            from tracepipe.engines.dialect import parse_duckdb

            check_allowed(parse_duckdb(sql), views=lake_relations()[0] | self.registered)
        # registered on first use (binding them is not free), those the called table macros call too
        for name, nargs in macro_calls(sql, self.table_macros).items():
            if name not in self.macros:
                register_macro(self.spark, name, nargs)
                self.macros.add(name)
        statements = to_spark(sql, self.table_macros, columns_of=self._columns, queries_only=True)
        if user:
            from tracepipe.engines.allowlist import check_spark_text

            for statement in statements:
                check_spark_text(statement)
        return statements

    # -- Engine
    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Queries of the lake's views only (engines/allowlist.py): Spark never writes, reads other files or
        calls Java here."""
        with worker_errors():
            return to_arrow(self.frame(sql, params))

    def frame(self, sql: str, params: Mapping[str, Any] | None = None) -> DataFrame:
        """The last statement of `sql` as a Spark DataFrame (for callers that keep working in Spark)."""
        frame = None
        for statement in self._transpile(sql, user=True):
            frame = self._sql(statement, params)
        return frame

    def _sql(self, statement: str, params: Mapping[str, Any] | None = None) -> DataFrame:
        from pyspark.errors import AnalysisException, ParseException

        try:
            return self.spark.sql(statement, args=_spark_params(params))
        except (AnalysisException, ParseException) as exc:
            message = str(exc).strip().splitlines()[0]
            raise UsageError(f"query failed on Spark: {message}") from exc

    def register(self, name: str, table: pa.Table) -> None:
        from_arrow(self.spark, table).createOrReplaceTempView(name)
        self.registered.add(name)

    def map_batches(
        self, sql: str, params: Mapping[str, Any] | None, fn: BatchFn, out_schema: pa.Schema
    ) -> pa.Table:
        frame = self.frame(sql, params)
        mapped = frame.mapInArrow(functools.partial(_map_iterator, fn), spark_schema(out_schema))
        with worker_errors():
            return to_arrow(mapped, out_schema)

    def close(self) -> None:
        if self._own_session:
            self.spark.stop()


def _map_iterator(fn: BatchFn, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        yield fn(batch)


def _spark_params(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not params:
        return None
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dt.datetime) and value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
        out[key] = value
    return out


def to_arrow(frame: DataFrame, schema: pa.Schema | None = None) -> pa.Table:
    """A DataFrame's rows as Arrow (Spark's own Arrow collect, no pandas); timestamps tz=UTC."""
    table = frame.toArrow()
    columns = []
    for column, field in zip(table.columns, table.schema, strict=True):
        if pa.types.is_timestamp(field.type) and field.type.tz is None:
            column = column.cast(pa.timestamp(field.type.unit, tz="UTC"))
        columns.append(column)
    table = pa.Table.from_arrays(columns, names=table.column_names)
    return table.cast(schema) if schema is not None else table


def from_arrow(spark: SparkSession, table: pa.Table) -> DataFrame:
    """An Arrow table as a DataFrame with the matching Spark schema (no pandas)."""
    return spark.createDataFrame(table, schema=spark_schema(table.schema))


def sweep_candidates(*args: Any, **kwargs: Any) -> Any:
    """The sweep's rule and anomaly candidates on Spark: see tracepipe.engines.spark_sweep.sweep_candidates."""
    from tracepipe.engines.spark_sweep import sweep_candidates as run

    with worker_errors():
        return run(*args, **kwargs)
