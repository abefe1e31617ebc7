"""The Spark engine gives the same rows as DuckDB: the lake's views (flows_attributed over attributed and
not-yet-attributed files, vm_leases, who_had, the address macros) and a whole sweep's alerts (rule detectors,
exfiltration's peer comparison, the anomaly model scored in mapInArrow), row for row. Real Spark (local[2],
a real JVM), real Parquet, real DuckDB; one SparkSession for the module."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys

import pyarrow as pa
import pytest
from support import stories as gen

from tracepipe.correlate.attribution import attribute_flows
from tracepipe.detect import detectors as det
from tracepipe.detect import model
from tracepipe.engines import open_engine, parse_conf, run_sql
from tracepipe.engines.allowlist import check_allowed, check_spark_text
from tracepipe.engines.dialect import EngineUnsupported, parse_duckdb, parse_table_macros, to_spark
from tracepipe.engines.spark import SparkEngine, dataset_schema, get_session, read_dataset
from tracepipe.engines.spark_sweep import sweep_candidates
from tracepipe.errors import UsageError
from tracepipe.lake import Lake, hash_bytes, ingest_table
from tracepipe.pipeline_config import load_pipeline

UTC = dt.UTC


def at(hour: int, minute: int = 0, day: int = 12) -> dt.datetime:
    return dt.datetime(2024, 3, day, hour, minute, tzinfo=UTC)


@pytest.fixture(scope="module")
def spark():
    session = get_session("local[2]", {"spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2"})
    yield session
    session.stop()


def _flows(n: int, offset_min: int, first_port: int) -> pa.Table:
    ts = [at(0) + dt.timedelta(minutes=offset_min + 37 * i) for i in range(n)]
    return pa.table(
        {
            "ts_start": ts,
            "ts_end": [t + dt.timedelta(seconds=3) for t in ts],
            "src_addr": ["10.0.0.5" if i % 3 else "2001:db8::7" for i in range(n)],
            "dst_addr": ["10.0.0.6" if i % 2 else "192.0.2.1" for i in range(n)],
            "src_port": [first_port + i for i in range(n)],
            "dst_port": [22 if i % 4 else 443 for i in range(n)],
            "proto": [6] * n,
            "packets": [i + 1 for i in range(n)],
            "bytes": [100 * (i + 1) for i in range(n)],
            "tcp_flags": [2 if i % 5 else 27 for i in range(n)],
            "ip_version": [4 if i % 3 else 6 for i in range(n)],
        }
    )


@pytest.fixture(scope="module")
def view_lake(tmp_path_factory) -> Lake:
    """10.0.0.5 held by vm-a until 08:00 (deleted, quarantined), by vm-b from 09:00; flows over two days,
    half of them in files attribution.py already set, half landed after it (attributed at query time)."""
    lake = Lake(tmp_path_factory.mktemp("spark") / "lake")
    lake.replace_dataset(
        "vm_leases",
        pa.table(
            {
                "addr": ["10.0.0.5", "10.0.0.5", "10.0.0.6", "2001:db8::7"],
                "vm_id": ["vm-a", "vm-b", "vm-c", "vm-c"],
                "vm_name": ["alpha", "beta", "gamma", "gamma"],
                "project": ["p1", "p2", "p1", "p1"],
                "user": ["ann", "bob", "cy", "cy"],
                "valid_from": [at(1), at(9), at(0), at(0)],
                "valid_to": [at(8), None, None, None],
                "vm_status": ["deleted", "active", "active", "active"],
            }
        ),
    )
    lake.replace_dataset(
        "vms",
        pa.table(
            {
                "vm_id": ["vm-a", "vm-b"],
                "vm_name": ["alpha", "beta"],
                "project": ["p1", "p2"],
                "user": ["ann", "bob"],
                "status": ["deleted", "active"],
                "deleted_at": [at(8), None],
                "quarantine_until": [at(8, day=19), None],
            }
        ),
    )
    ingest_table(lake, "flows", "test:one", hash_bytes(b"one"), [_flows(40, 0, 40000)])
    attribute_flows(lake)
    ingest_table(lake, "flows", "test:two", hash_bytes(b"two"), [_flows(30, 11, 50000)])
    return lake


@pytest.fixture(scope="module")
def engines(view_lake, spark):
    duck = open_engine(view_lake, "duckdb")
    sparky = SparkEngine(view_lake, session=spark)
    yield duck, sparky
    duck.close()


VIEW_QUERIES = [
    "SELECT * FROM flows_attributed ORDER BY ts_start, src_port",
    "SELECT * FROM flows ORDER BY ts_start, src_port",
    "SELECT * FROM vm_leases ORDER BY addr, valid_from",
    "SELECT src_project, dst_project, count(*) AS n, sum(bytes)::BIGINT AS b FROM flows_attributed "
    "GROUP BY ALL ORDER BY ALL",
    "SELECT * FROM who_had('10.0.0.5', TIMESTAMPTZ '2024-03-12 07:30:00+00')",
    "SELECT * FROM who_had('10.0.0.5', TIMESTAMPTZ '2024-03-12 10:00:00+00')",
    "SELECT * FROM who_had('10.0.0.5', TIMESTAMPTZ '2024-03-12 08:30:00+00')",
    "SELECT * FROM who_had('::FFFF:10.0.0.5', TIMESTAMPTZ '2024-03-12 07:30:00+00')",
    "SELECT src_addr, cidr_contains('10.0.0.0/8', src_addr) AS inside, ip_family(src_addr) AS family, "
    "count(*) AS n FROM flows GROUP BY ALL ORDER BY src_addr",
    "SELECT date, count(*) AS n, min(ts_start) AS first FROM flows GROUP BY date ORDER BY date",
    "SELECT src_addr, epoch_us(min(ts_start)) // 1000000 AS first_s FROM flows GROUP BY 1 ORDER BY 1",
]


@pytest.mark.parametrize("sql", VIEW_QUERIES)
def test_views_equal_duckdb(engines, sql):
    duck, sparky = engines
    expected, got = duck.query(sql), sparky.query(sql)
    assert expected.num_rows > 0 or "08:30" in sql  # 08:30: between two leases, nobody held the address
    assert got.column_names == expected.column_names
    assert got.to_pylist() == expected.to_pylist()


def test_attribution_on_spark_names_each_vm_in_its_interval(engines):
    _, sparky = engines
    rows = sparky.query(
        "SELECT ts_start, src_vm, src_vm_name, src_vm_status FROM flows_attributed "
        "WHERE src_addr = $addr ORDER BY ts_start",
        {"addr": "10.0.0.5"},
    ).to_pylist()
    for row in rows:
        ts = row["ts_start"]
        expected = "vm-a" if at(1) <= ts < at(8) else "vm-b" if ts >= at(9) else None
        assert row["src_vm"] == expected, row
    assert {r["src_vm_status"] for r in rows if r["src_vm"] == "vm-a"} == {"deleted"}
    assert sum(r["src_vm"] is None for r in rows) >= 2  # before 01:00 and in the 08:00-09:00 gap: nobody


def test_datasets_typed_from_schema(view_lake, spark):
    flows = read_dataset(spark, view_lake, "flows")
    types = {f.name: f.dataType.simpleString() for f in flows.schema.fields}
    assert types["ts_start"] == "timestamp" and types["date"] == "date"
    assert types["ip_version"] == "tinyint" and types["bytes"] == "bigint" and types["proto"] == "smallint"
    assert flows.count() == 70
    empty = read_dataset(spark, view_lake, "vm_logs")  # nothing landed: empty, typed
    assert empty.count() == 0 and empty.schema == dataset_schema("vm_logs")
    assert spark.conf.get("spark.sql.session.timeZone") == "UTC"


def test_lake_path_with_glob_characters_reads_its_own_files(view_lake, spark, tmp_path):
    """Every path spark.read takes is a Hadoop glob: a lake at `v[1]*` read the same files again from a planted
    look-alike `v1planted` (140 flows for 70) until the names were escaped (issue 12, item 5 on Spark)."""
    import shutil

    lake_dir = tmp_path / "v[1]*"
    shutil.copytree(view_lake.root, lake_dir)
    shutil.copytree(view_lake.root, tmp_path / "v1planted")
    flows = read_dataset(spark, Lake(lake_dir), "flows")
    assert flows.count() == 70
    assert flows.select("date").distinct().count() >= 1  # partition column still discovered


def test_parameters_and_timestamps_utc(engines):
    duck, sparky = engines
    sql = (
        "SELECT count(*) AS n, max(ts_start) AS last FROM flows WHERE ts_start < $until AND dst_port = $port"
    )
    params = {"until": dt.datetime(2024, 3, 12, 12, tzinfo=UTC), "port": 22}
    got = sparky.query(sql, params)
    assert got.to_pylist() == duck.query(sql, params).to_pylist()
    assert got.schema.field("last").type == pa.timestamp("us", tz="UTC")


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE x AS SELECT 1",
        "DROP VIEW flows",
        "INSERT INTO alerts SELECT * FROM alerts",
        "COPY flows TO '/tmp/x.csv'",
    ],
)
def test_spark_is_read_only(engines, sql):
    _, sparky = engines
    with pytest.raises(UsageError, match="read-only"):
        sparky.query(sql)


# ---- issue #12 item 2: user SQL on Spark runs against an allowlist ----------------------------------------
# (what each attack did before: read any file, chmod / symlink through Hadoop's FileUtil, sleep the JVM, ...)
SPARK_ATTACKS = [
    ('SELECT max(value) FROM "text"."/etc/hostname"', "schema-qualified table"),
    ("SELECT * FROM csv.`/etc/passwd`", "does not parse"),
    ("SELECT reflect('org.apache.hadoop.fs.FileUtil', 'chmod', '/tmp/x', '777')", "reflect()"),
    ("SELECT java_method('org.apache.hadoop.fs.FileUtil', 'symLink', '/etc', '/tmp/l')", "java_method()"),
    ("SELECT try_reflect('java.lang.Thread', 'sleep', 1000)", "try_reflect()"),
    ("SELECT count(*) FROM flows WHERE assert_true(bytes > 0) IS NULL", "assert_true()"),
    (
        "SELECT xpath_string('<!DOCTYPE a [<!ENTITY x SYSTEM \"file:///etc/passwd\">]><a>&x;</a>', 'a')",
        "xpath",
    ),
    ("SELECT * FROM read_csv('/etc/passwd')", "table function"),
    ("SELECT * FROM '/etc/passwd'", "not one of the lake's views"),
    ("SELECT * FROM spark_catalog.default.flows", "schema-qualified"),
    ("SELECT * FROM _flows_done", "not one of the lake's views"),
    ('WITH x AS (SELECT * FROM "parquet"."/srv/other") SELECT * FROM x', "schema-qualified"),
    ("SELECT (SELECT java_method('java.lang.System', 'exit', 0))", "java_method()"),
    ("SELECT * FROM flows TABLESAMPLE (10 PERCENT)", "SAMPLE"),
    ("SELECT * FROM range(10)", "table function"),
    ("SELECT * FROM flows, LATERAL (SELECT 1)", "LATERAL"),
    ("SET spark.sql.runSQLOnFiles = true", "read-only"),
    ("CACHE TABLE flows", "read-only"),
    ("CREATE TEMPORARY FUNCTION f AS 'x.Y'", "read-only"),
    ("ADD JAR /tmp/evil.jar", "does not parse"),
    ("SELECT 1; DROP VIEW flows", "read-only"),
    # a review: text sqlglot writes into the Spark SQL unquoted (a type, a keyword, a placeholder) carried a
    # java_method() call past the tree check; through the engine it loaded a native library
    (
        "SELECT CAST(NULL AS \"VOID) AS a, java_method('java.lang.System', 'getProperty', 'user.name') AS b, "
        'CAST(NULL AS VOID") FROM vms',
        "the type",
    ),
    ('SELECT EXTRACT("hour) x, reflect(1) y FROM (select 1" FROM ts) FROM vms', "the keyword"),
    ('SELECT CAST(ts AS DECIMAL("10) + reflect(1")) FROM vms', "the type"),
    ('SELECT $"x) reflect(1" FROM vms', "the parameter name"),
]


@pytest.mark.parametrize(("sql", "named"), SPARK_ATTACKS)
def test_spark_allowlist_refuses_and_names_it(sql, named):
    with pytest.raises(UsageError, match=r"refused|does not parse") as refused:
        check_allowed(parse_duckdb(sql))
    assert named in str(refused.value)


def test_the_spark_text_sent_is_checked_again():
    # whatever the DuckDB tree looked like: the Spark SQL about to run must not call the JVM or read a path
    for sql in (
        "SELECT CAST(NULL AS VOID) AS a, reflect('java.lang.System', 'getenv', 'HOME') AS b FROM `vms`",
        "SELECT java_method('java.lang.System', 'load', '/tmp/x.so') FROM `vms`",
        "SELECT * FROM text.`/etc/passwd`",
        "SELECT 1 FROM `vms`; SELECT 2",
        "SELECT CAST(x AS",
    ):
        with pytest.raises(UsageError, match="refused"):
            check_spark_text(sql)
    for sql in VIEW_QUERIES[:3]:
        for spark_sql in to_spark(sql):
            check_spark_text(spark_sql)


def test_spark_allowlist_keeps_what_users_write():
    readme = [
        "SELECT src_project, sum(bytes) FROM flows_attributed GROUP BY 1 ORDER BY 2 DESC",
        "SELECT src_addr, src_vm_name, src_project, src_user, count(DISTINCT dst_addr) AS targets, "
        "min(ts_start) AS first_seen FROM flows_attributed WHERE cidr_contains('198.18.0.0/16', dst_addr) "
        "GROUP BY ALL ORDER BY targets DESC",
        "WITH h AS (SELECT src_addr, date_trunc('hour', ts_start) AS hour, count(*) FILTER (WHERE proto = 6) "
        "AS tcp, row_number() OVER (PARTITION BY src_addr ORDER BY ts_start) AS rn FROM flows) "
        "SELECT h.*, coalesce(v.vm_name, '?') FROM h LEFT JOIN vms v ON v.vm_id = h.src_addr WHERE rn = 1 "
        "UNION ALL SELECT NULL, NULL, 0, 0, NULL",
        "DESCRIBE flows",
        "SELECT CAST(bytes AS DECIMAL(20, 2)), EXTRACT(hour FROM ts_start), ts_start + INTERVAL 1 HOUR, "
        "ts_start - INTERVAL '2 days', CAST(src_port AS VARCHAR), CAST(ts_start AS TIMESTAMPTZ), "
        "CAST(NULL AS INT[]), date_part('dow', ts_start) FROM flows",
    ]
    for sql in [*VIEW_QUERIES, *readme]:
        check_allowed(parse_duckdb(sql))


def test_spark_attacks_change_nothing(engines, spark, tmp_path):
    """The attacks through the real engine (one JVM): refused before Spark sees them, the file keeps its mode,
    no symlink appears, the secret is not read; SQL on files is off in the session too."""
    _, sparky = engines
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    attacks = [
        f"SELECT reflect('org.apache.hadoop.fs.FileUtil', 'chmod', '{secret}', '777')",
        f"SELECT java_method('org.apache.hadoop.fs.FileUtil', 'symLink', '{secret}', '{tmp_path}/link')",
        f'SELECT max(value) FROM "text"."{secret}"',
    ]
    for sql in attacks:
        with pytest.raises(UsageError, match="refused"):
            sparky.query(sql)
    assert secret.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]
    assert spark.conf.get("spark.sql.runSQLOnFiles") == "false"
    with pytest.raises(Exception, match=r"(?i)run sql on files|not supported|cannot be found|UNSUPPORTED"):
        spark.sql(f"SELECT * FROM text.`{secret}`").collect()
    from typer.testing import CliRunner

    from tracepipe.cli import app

    refused = CliRunner().invoke(
        app, ["sql", "--engine", "spark", "--lake", str(sparky.lake.root), attacks[0]]
    )
    assert refused.exit_code == 2 and "reflect()" in refused.stderr, refused.output
    assert secret.stat().st_mode & 0o777 == 0o600


def test_unknown_column_is_a_usage_error(engines):
    _, sparky = engines
    with pytest.raises(UsageError, match="query failed on Spark"):
        sparky.query("SELECT no_such_column FROM flows")


def test_run_sql_spark_opens_its_own_session_then_leaves_the_shared_one(view_lake, spark):
    table = run_sql(view_lake, "SELECT count(*) AS n FROM vm_leases", "spark", spark_master="local[2]")
    assert table.to_pylist() == [{"n": 4}]


# ---- dialect (no Spark needed) ----------------------------------------------------------------------------
def test_asof_join_becomes_a_bounded_range_join():
    sql = (
        "SELECT f.src_addr, l.vm_id FROM flows f ASOF LEFT JOIN vm_leases l "
        "ON f.src_addr = l.addr AND f.ts_start >= l.valid_from"
    )
    (out,) = to_spark(sql)
    assert "ASOF" not in out
    assert "LEFT JOIN `vm_leases` AS `l`" in out
    assert "`f`.`ts_start` < COALESCE(`l`.`valid_to`, CAST('9999-12-31 00:00:00' AS TIMESTAMP))" in out


def test_asof_join_on_other_columns_is_refused():
    with pytest.raises(EngineUnsupported, match="ASOF"):
        to_spark("SELECT * FROM a ASOF JOIN b ON a.k = b.k AND a.t >= b.t")


def test_table_macro_expands_with_bound_parameters():
    macros = parse_table_macros(
        "CREATE MACRO held(a, t) AS TABLE SELECT vm_id FROM vm_leases WHERE addr = a AND valid_from <= t"
    )
    (out,) = to_spark("SELECT * FROM held($addr, $at) h", macros)
    assert out == (
        "SELECT * FROM (SELECT `vm_id` FROM `vm_leases` WHERE `addr` = :addr AND `valid_from` <= :at) AS `h`"
    )


def test_table_macro_parameters_with_defaults_take_them_when_left_out():
    """DuckDB macros may give parameters defaults (views.sql's nat_inside): sqlglot cannot parse that header, so
    the Spark engine could not start at all once such a macro existed (test_install caught it)."""
    macros = parse_table_macros(
        "CREATE OR REPLACE MACRO near(a, t, p := NULL, w := INTERVAL 5 MINUTE) AS TABLE "
        "SELECT addr FROM flows WHERE addr = a AND (p IS NULL OR port = p) AND ts <= t + w"
    )
    assert macros["near"].params == ("a", "t", "p", "w")
    (left_out,) = to_spark("SELECT * FROM near('x', $at) n", macros)
    assert "(NULL IS NULL OR `port` = NULL)" in left_out and "INTERVAL '5' MINUTE" in left_out
    (positional,) = to_spark("SELECT * FROM near('x', $at, 22) n", macros)
    assert "`port` = 22" in positional and "INTERVAL '5' MINUTE" in positional
    (named,) = to_spark("SELECT * FROM near('x', $at, w := INTERVAL 1 HOUR) n", macros)
    assert "INTERVAL '1' HOUR" in named and "`port` = NULL" in named
    with pytest.raises(EngineUnsupported, match="takes 2 arguments and optionally p"):
        to_spark("SELECT * FROM near('x') n", macros)
    # the bundled scripts parse, nat_inside among their table macros
    from tracepipe.query import sql_text

    assert "nat_inside" in parse_table_macros(sql_text("views"))


def test_epoch_functions_keep_duckdb_meaning():
    (out,) = to_spark("SELECT epoch_us(ts_start), epoch(ts_start) FROM flows")
    assert out == "SELECT UNIX_MICROS(`ts_start`), UNIX_MICROS(`ts_start`) / 1e6 FROM `flows`"


def test_spark_conf_pairs():
    assert parse_conf(["spark.executor.memory=8g", "a.b = c=d"]) == {
        "spark.executor.memory": "8g",
        "a.b": "c=d",
    }
    with pytest.raises(UsageError, match="key=value"):
        parse_conf(["nonsense"])


def test_base_package_needs_no_pyspark():
    code = (
        "import sys, tracepipe.cli, tracepipe.engines, tracepipe.sweep, tracepipe.query; "
        "assert 'pyspark' not in sys.modules and 'sqlglot' not in sys.modules, 'imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- the sweep: same alerts, row for row --------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_lake(tmp_path_factory):
    lake, story, pipeline = gen.story_lake(tmp_path_factory.mktemp("spark-sweep"))
    config = load_pipeline(pipeline)
    first_day = (story.start, story.start + dt.timedelta(days=1))
    model.fit_lake(lake, *first_day, gen.LOCAL_NETWORKS)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, enabled=True, min_score=0.5))
    return lake, story, config


def _duckdb_candidates(lake: Lake, config, since, until):
    """What sweep.run_sweep does on the default engine, up to the candidates."""
    import polars as pl

    from tracepipe.sweep import anomaly_stage

    ctx = det.prepare_context(lake, config, since, until, None)
    frames = [fn(ctx) for name, fn in det.DETECTORS.items() if getattr(config.detectors, name).enabled]
    candidates = pl.concat(frames)
    rule_hosts = set(candidates.get_column("addr").to_list())
    notes: list[str] = []
    candidates = pl.concat([candidates, anomaly_stage(ctx, rule_hosts, notes)])
    return ctx, candidates, notes


def test_sweep_alerts_equal_duckdb_row_for_row(sweep_lake, spark):
    lake, story, config = sweep_lake
    since, until = story.last_day
    created = dt.datetime(2026, 1, 1, tzinfo=UTC)
    ctx_d, cand_d, notes_d = _duckdb_candidates(lake, config, since, until)
    notes_s: list[str] = []
    timings: dict[str, float] = {}
    ctx_s, cand_s = sweep_candidates(
        lake, config, since, until, None, session=spark, notes=notes_s, timings=timings
    )
    assert ctx_s.local == ctx_d.local
    assert notes_s == notes_d == []
    expected, _ = det.finalize(cand_d, ctx_d, "t", created_at=created)
    got, _ = det.finalize(cand_s, ctx_s, "t", created_at=created)
    detectors = set(expected.column("detector").to_pylist())
    assert {
        "horizontal_scan",
        "vertical_scan",
        "brute_force",
        "beacon",
        "exfiltration",
        "long_connection",
        "mining",
        "anomaly",
    } <= detectors
    expected_rows, got_rows = expected.sort_by("alert_id").to_pylist(), got.sort_by("alert_id").to_pylist()
    # evidence included: finalize breaks every tie (bytes, time, addresses, ports); on a difference the
    # message names the alert and the fields that differ (a whole-row repr is cut before them)
    assert got_rows == expected_rows, _row_differences(got_rows, expected_rows)
    assert set(timings) >= {"local", "spans", "rules", "exfiltration", "anomaly"}


def _row_differences(got: list[dict], expected: list[dict]) -> str:
    ids = lambda rows: {r["alert_id"]: r for r in rows}  # noqa: E731
    g, e = ids(got), ids(expected)
    lines = [f"only on spark: {g[i]}" for i in sorted(g.keys() - e.keys())]
    lines += [f"only on duckdb: {e[i]}" for i in sorted(e.keys() - g.keys())]
    for i in sorted(g.keys() & e.keys()):
        for field in e[i]:
            if g[i][field] != e[i][field]:
                lines.append(
                    f"{e[i]['detector']} {e[i]['addr']} {field}: spark {g[i][field]!r} != duckdb {e[i][field]!r}"
                )
    return "\n".join(lines)


# ---- the CLI ----------------------------------------------------------------------------------------------
def test_cli_sql_engine_spark(view_lake, spark):
    from typer.testing import CliRunner

    from tracepipe.cli import app

    sql = "SELECT vm_id, count(*) AS n FROM vm_leases GROUP BY 1 ORDER BY 1"
    result = CliRunner().invoke(
        app,
        [
            "sql",
            "--engine",
            "spark",
            "--spark-master",
            "local[2]",
            "--lake",
            str(view_lake.root),
            "--format",
            "json",
            sql,
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"vm_id": "vm-a", "n": 1},
        {"vm_id": "vm-b", "n": 1},
        {"vm_id": "vm-c", "n": 2},
    ]
    refused = CliRunner().invoke(
        app, ["sql", "--engine", "spark", "--lake", str(view_lake.root), "DELETE FROM flows"]
    )
    # the app itself turns the error into one line and exit code 2 (not only main())
    assert refused.exit_code == 2 and "read-only" in refused.stderr


def test_cli_sweep_engine_spark_finds_the_planted_hosts(sweep_lake, spark, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from tracepipe.cli import app

    lake, story, _ = sweep_lake
    copy = tmp_path / "lake"
    shutil.copytree(lake.root, copy)
    pipeline = tmp_path / "t.toml"
    pipeline.write_text(
        f'[pipeline]\nname = "t"\nlocal_networks = {json.dumps(gen.LOCAL_NETWORKS)}\n'
        f'[output]\nreport_dir = "{tmp_path / "reports"}"\nhtml = false\n'
    )
    since, until = story.last_day
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            str(pipeline),
            "--since",
            since.isoformat(),
            "--until",
            until.isoformat(),
            "--engine",
            "spark",
            "--spark-master",
            "local[2]",
            "--lake",
            str(copy),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 1, result.output  # new alerts found
    summary = json.loads(result.stdout)
    assert {
        "horizontal_scan",
        "vertical_scan",
        "brute_force",
        "beacon",
        "exfiltration",
        "long_connection",
        "mining",
    } <= set(summary["new_by_detector"])
    assert Lake(copy).read("alerts").num_rows == summary["new_alerts"]


def test_a_driver_started_by_spark_submit_keeps_its_master_and_conf(tmp_path):
    # Spark review: README's spark-submit route ("a 3-line driver that calls run_sweep(..., engine="spark")")
    # ran in local[*] with tracepipe's shuffle width and app name whatever --master and --conf said: on a
    # cluster, the whole sweep ran on the driver host and the cluster was never asked
    import os
    from pathlib import Path

    import pyspark

    driver = tmp_path / "driver.py"
    driver.write_text(
        "from tracepipe.engines.spark import get_session\n"
        "spark = get_session()\n"
        "c = spark.sparkContext\n"
        "print('RESULT', c.master, spark.conf.get('spark.sql.shuffle.partitions'), c.appName)\n"
        "spark.stop()\n"
    )
    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env["PYSPARK_PYTHON"] = sys.executable
    args = ["--master", "local[1]", "--name", "mydriver", "--conf", "spark.sql.shuffle.partitions=3"]
    run = subprocess.run(
        [str(submit), *args, str(driver)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert result == ["RESULT local[1] 3 mydriver"], run.stdout[-2000:]


def test_a_spark_sweep_reads_the_flows_of_its_pinned_versions_only(spark, tmp_path):
    # Spark review: window_flows read the lake by its path, which reopened the newest version: flows committed
    # while a Spark sweep ran made anomaly alerts of rows its recorded version (lake_version) does not hold
    from tracepipe.engines.spark_sweep import window_flows

    lake = Lake(tmp_path / "lake")
    ingest_table(lake, "flows", "test:first", hash_bytes(b"first"), [_flows(20, 0, 40000)])
    pinned = Lake(lake.root, as_of=lake.versions())
    ingest_table(lake, "flows", "test:later", hash_bytes(b"later"), [_flows(30, 1, 50000)])
    window = (at(0), at(0, day=14))
    assert window_flows(spark, pinned, *window).count() == 20
    assert window_flows(spark, Lake(lake.root), *window).count() == 50
