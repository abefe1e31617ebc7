"""What `tracepipe sql --engine spark` lets a statement contain: an allowlist, not a denylist.

Spark SQL can read any file (`SELECT * FROM text.`/etc/hostname``, `"text"."/etc/hostname"`), call any Java
method (`reflect`, `java_method`) and change settings or the catalog; DuckDB's own sandbox (query.connect) does
not exist there. So before a statement is transpiled and reaches Spark, its syntax tree (sqlglot, DuckDB dialect,
as the user wrote it) must consist only of:
- a query (SELECT, WITH, UNION/INTERSECT/EXCEPT) or DESCRIBE of a view;
- table references that are the lake's views, the query's own CTE names or a tracepipe table macro
  (`who_had(...)`): no schema- or catalog-qualified names, no file paths, no other table functions, no hints,
  time travel or sampling clauses;
- functions of ALLOWED_FUNCTIONS (pure aggregates, string, date/time, math, conditional and window functions)
  and tracepipe's macros; syntax nodes of ALLOWED_NODES (operators, literals, joins, windows, ...).
Anything else is refused with a UsageError (exit 2) that names it. Comments are dropped when the statement is
transpiled (dialect.to_spark), so nothing in them can become a Spark hint.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection

from tracepipe.errors import UsageError

try:
    from sqlglot import exp
except ImportError:  # the spark extra brings sqlglot
    exp = None  # type: ignore[assignment]

# sqlglot node classes (by name, so that an older sqlglot without one of them still imports) that are syntax,
# not behaviour: what they compute is fixed by the SQL standard and touches no file, setting or JVM class.
ALLOWED_NODES = frozenset(
    """
    Select Union Except Intersect From Join Where Group Having Order Ordered Limit Offset Qualify With CTE
    TableAlias Subquery Table Column Identifier Star Alias Aliases Literal Null Boolean DataType DataTypeParam
    Placeholder Parameter Paren Tuple Bracket Slice Dot Distinct Filter Window WindowSpec Interval IntervalSpan
    Var IgnoreNulls RespectNulls Neg Not Is In Between Like ILike SimilarTo EQ NEQ GT GTE LT LTE NullSafeEQ
    NullSafeNEQ Add Sub Mul Div IntDiv Mod DPipe BitwiseAnd BitwiseOr BitwiseXor BitwiseNot BitwiseLeftShift
    BitwiseRightShift And Or Xor Any All Values PropertyEQ Describe Escape Collate
    """.split()
)

# sqlglot's function classes (DuckDB names sqlglot knows) that are pure: a value in, a value out.
ALLOWED_FUNCTION_CLASSES = frozenset(
    """
    Count CountIf Sum Avg Min Max AnyValue First Last FirstValue LastValue NthValue ArgMax ArgMin
    ApproxDistinct ApproxQuantile Median Quantile PercentileCont PercentileDisc Stddev StddevPop StddevSamp
    Variance VariancePop Corr CovarPop CovarSamp ArrayAgg GroupConcat LogicalAnd LogicalOr Mode
    RowNumber Rank DenseRank PercentRank CumeDist Ntile Lag Lead
    Lower Upper Length Substring Trim Concat ConcatWs Replace Split SplitPart RegexpExtract RegexpReplace
    RegexpLike RegexpILike RegexpSplit StartsWith EndsWith Contains StrPosition Left Right Pad Reverse Repeat
    Initcap Ascii Chr Translate Format MD5 SHA SHA2 Levenshtein
    TimestampTrunc DateTrunc TimeToStr StrToTime StrToDate TimeToUnix UnixToTime Extract DateDiff
    TimestampDiff DateAdd DateSub TimestampAdd TimestampSub CurrentTimestamp CurrentDate CurrentTime
    TsOrDsToDate TsOrDsToTimestamp Date DateFromParts TimestampFromParts Year Month Day Hour Minute Second
    DayOfWeek DayOfMonth DayOfYear WeekOfYear Quarter
    Abs Round Floor Ceil Ln Log Log2 Log10 Exp Pow Sqrt Cbrt Greatest Least Sign SafeDivide
    Coalesce Nullif If Case Cast TryCast Exists
    Array Struct ArrayContains ArraySize ArrayFirst ArrayLast ArraySort ArrayJoin ArrayToString ArrayDistinct
    And Or Xor
    """.split()
)

# Functions sqlglot does not know (exp.Anonymous), by name: DuckDB's pure ones that tracepipe's users write,
# then tracepipe's scalar macros are added (scalar_macro_names()).
ALLOWED_FUNCTION_NAMES = frozenset(
    """
    now today epoch epoch_ms epoch_us epoch_ns make_date make_timestamp date_part datepart time_bucket
    regexp_full_match regexp_matches list_contains len array_length cardinality ifnull nvl iff
    strpos instr position lpad rpad ltrim rtrim printf to_date to_timestamp max_by min_by
    approx_count_distinct bool_and bool_or every count_star string_agg list quantile_cont quantile_disc
    """.split()
)


# Nodes whose text sqlglot writes into the Spark SQL as it is, unquoted: a keyword (Var: a unit of EXTRACT or
# INTERVAL, a type parameter) must be one of these words, a type one of sqlglot's own (not "user-defined"). A
# review: `CAST(NULL AS "VOID) AS a, java_method(...) AS b, CAST(NULL AS VOID")` passed the tree check as one
# type and reached Spark as three columns, the middle one calling Java (a native library was loaded); so did
# `EXTRACT("...")`, `DECIMAL("...")` and `$"..."` placeholders (a parameter's name must be a plain name).
KEYWORDS = frozenset(
    """
    year years yr yrs y quarter quarters month months mon mons week weeks w day days d dayofweek dow isodow
    dayofyear doy doyr hour hours h hr hrs minute minutes m min mins second seconds s sec secs millisecond
    milliseconds ms msec msecs microsecond microseconds us usec usecs nanosecond nanoseconds ns epoch
    isoyear yearofweek weekofyear century centuries decade decades millennium millennia timezone
    timezone_hour timezone_minute all
    """.split()
)
# Spark functions that reach the JVM, and Spark's file-reading table syntax (`text.`/path``): whatever the
# DuckDB tree looked like, the Spark SQL sent is parsed again and refused if it holds one (check_spark_text)
JVM_FUNCTIONS = frozenset({"reflect", "java_method", "try_reflect"})


def _text_node_problem(node: exp.Expression) -> str | None:
    """Why a node whose text goes into the Spark SQL unquoted is refused, or None."""
    if isinstance(node, exp.Var) and node.name.lower() not in KEYWORDS:
        return f"the keyword {node.name[:40]!r}"
    if isinstance(node, exp.DataType) and (
        node.this == exp.DataType.Type.USERDEFINED or node.args.get("kind") is not None
    ):
        return f"the type {node.sql('duckdb')[:40]!r}"
    if isinstance(node, exp.DataTypeParam) and not isinstance(node.this, exp.Literal | exp.DataType):
        return f"the type parameter {node.sql('duckdb')[:40]!r}"
    if isinstance(node, exp.Placeholder | exp.Parameter) and not re.fullmatch(
        r"[A-Za-z0-9_]*", str(node.name or "")
    ):
        return f"the parameter name {str(node.name)[:40]!r}"
    return None


def check_spark_text(spark_sql: str) -> None:
    """The Spark SQL about to run, parsed again as Spark reads it: UsageError if it calls the JVM or names a
    table by schema or path (file reads), whatever the DuckDB tree that passed check_allowed looked like. A
    text that Spark's grammar (as sqlglot knows it) cannot read is refused too."""
    import sqlglot

    refused = UsageError(
        "tracepipe sql --engine spark refused the statement: its Spark form does not read as the query that was "
        "checked (a type, keyword or name that carries SQL?)"
    )
    try:
        statements = [s for s in sqlglot.parse(spark_sql, read="spark") if s is not None]
    except sqlglot.errors.SqlglotError:
        raise refused from None
    if len(statements) != 1:
        raise refused
    for node in statements[0].walk():
        if isinstance(node, exp.Func) and _name(node).lower() in JVM_FUNCTIONS:
            raise refused
        if isinstance(node, exp.Table) and (node.args.get("db") or node.args.get("catalog")):
            raise refused


def _name(node: exp.Expression) -> str:
    return node.name if isinstance(node, exp.Anonymous) else node.sql_name()


@functools.cache
def lake_relations() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(view names a user may read, table macros, scalar macros): the lake's datasets, the public views of
    sql/views.sql, and the macros of sql/macros.sql and views.sql. Underscore names are tracepipe's own."""

    from tracepipe.engines.dialect import parse_bundled, parse_table_macros
    from tracepipe.engines.spark import scalar_macro_names
    from tracepipe.query import sql_text
    from tracepipe.schema import DATASETS

    views = set(DATASETS)
    for statement in parse_bundled(sql_text("views")):
        if isinstance(statement, exp.Create) and str(statement.args.get("kind", "")).upper() == "VIEW":
            views.add(statement.this.name)
    tables = {**parse_table_macros(sql_text("macros")), **parse_table_macros(sql_text("views"))}
    public = {name for name in views if not name.startswith("_")}
    return frozenset(public), frozenset(tables), scalar_macro_names()


def check_allowed(
    statements: list[exp.Expression],
    views: Collection[str] | None = None,
    table_macros: Collection[str] | None = None,
    macros: Collection[str] | None = None,
) -> None:
    """UsageError naming the first thing in `statements` that the allowlist does not hold (module doc).
    Defaults: lake_relations()."""
    if not statements:
        raise UsageError("no SQL statement given")
    default_views, default_tables, default_macros = lake_relations()
    views = {v.lower() for v in (default_views if views is None else views)}
    table_macros = {t.lower() for t in (default_tables if table_macros is None else table_macros)}
    functions = (
        ALLOWED_FUNCTION_NAMES
        | table_macros
        | {m.lower() for m in (default_macros if macros is None else macros)}
    )
    for statement in statements:
        text = statement.sql("duckdb")[:80]

        def refuse(what: str, text: str = text) -> UsageError:
            return UsageError(
                f"tracepipe sql --engine spark refused {what} in {text!r}: only queries over the lake's views "
                f"({', '.join(sorted(views))}) with plain SQL functions and tracepipe's macros run on Spark"
            )

        if not isinstance(statement, exp.Query | exp.Describe):
            raise UsageError(
                f"tracepipe sql is read-only: {statement.key.upper()} statements are refused "
                f"({text!r}). Write queries only (SELECT, WITH, DESCRIBE)."
            )
        ctes = {cte.alias.lower() for cte in statement.find_all(exp.CTE)}
        for node in statement.walk():
            if isinstance(node, exp.Table):
                _check_table(node, views | ctes, table_macros, refuse)
            elif isinstance(node, exp.Func):
                name = _name(node)
                allowed = (
                    name.lower() in functions
                    if isinstance(node, exp.Anonymous)
                    else type(node).__name__ in ALLOWED_FUNCTION_CLASSES
                )
                if not allowed:
                    raise refuse(f"the function {name}()")
            elif type(node).__name__ not in ALLOWED_NODES:
                raise refuse(f"{type(node).__name__.upper()} ({node.sql('duckdb')[:40]!r})")
            else:
                problem = _text_node_problem(node)
                if problem:
                    raise refuse(problem)


def _check_table(table: exp.Table, names: set[str], table_macros: set[str], refuse) -> None:
    extra = [key for key, value in table.args.items() if value and key not in ("this", "alias")]
    if extra:
        what = {"db": "a schema-qualified table", "catalog": "a catalog-qualified table"}.get(extra[0])
        raise refuse(what or f"a table with {extra[0].upper()}")
    target = table.this
    if isinstance(target, exp.Func):
        if not (isinstance(target, exp.Anonymous) and target.name.lower() in table_macros):
            raise refuse(f"the table function {_name(target)}()")
        return
    if not isinstance(target, exp.Identifier) or target.name.lower() not in names:
        raise refuse(f"the table {table.name!r} (not one of the lake's views)")
