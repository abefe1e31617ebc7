"""DuckDB SQL -> Spark SQL, so that views and detector queries are written once (in DuckDB SQL).

sqlglot does the general transpiling (casts, `$name` -> `:name`, `//`, FILTER, date_trunc ...). On top of it,
the few DuckDB constructs tracepipe uses that Spark lacks are rewritten here:
- `ASOF [LEFT] JOIN vm_leases l ON f.addr_col = l.addr AND f.ts >= l.valid_from` becomes a range join that
  also requires `f.ts < coalesce(l.valid_to, 9999-12-31)`: the same rows, because the leases of one address
  never overlap (leases.py guarantees it), so at most one lease holds an address at any instant;
- `epoch_us(ts)` -> `unix_micros(ts)`, `epoch(ts)` -> `unix_micros(ts) / 1e6` (Spark's unix_timestamp truncates);
- table macros (`who_had(addr, ts)`) are expanded inline from their DuckDB definition.
Scalar macros (`cidr_contains`, ...) stay calls; the Spark engine registers them as Arrow UDFs that evaluate the
DuckDB macro itself on each batch (see spark.py), so their definition exists once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tracepipe.errors import UsageError

try:
    import sqlglot
    from sqlglot import exp
except ImportError:  # the spark extra brings sqlglot; the base package does not need it
    sqlglot = None  # type: ignore[assignment]
    exp = None  # type: ignore[assignment]

# ASOF joins tracepipe writes: the right side's "valid from" column -> its "valid until" column (null = open).
ASOF_INTERVALS = {"valid_from": "valid_to"}
FAR_FUTURE = "9999-12-31 00:00:00"


class EngineUnsupported(UsageError):
    """SQL that runs on DuckDB but that the Spark engine cannot translate (the message says what to change)."""


@dataclass(frozen=True)
class TableMacro:
    name: str
    params: tuple[str, ...]
    body: exp.Expression  # the macro's SELECT, parameters still as bare column references
    defaults: tuple[tuple[str, exp.Expression], ...] = ()  # DuckDB's `name := value` parameters, in order


_MACRO_HEADER = re.compile(
    r"(CREATE\s+(?:OR\s+REPLACE\s+)?MACRO\s+\w+\s*)\(([^()]*(?:\([^()]*\)[^()]*)*)\)", re.I
)


def plain_macro_headers(sql_text: str) -> tuple[str, dict[str, dict[str, str]]]:
    """DuckDB macros may give parameters defaults (`f(a, b := NULL)`), which sqlglot does not parse: the script
    with plain parameter lists, and each macro's defaults as SQL text (macro name -> parameter -> default)."""
    defaults: dict[str, dict[str, str]] = {}

    def plain(match: re.Match[str]) -> str:
        name = match.group(1).split()[-1].lower()
        params = []
        for part in _split_params(match.group(2)):
            param, sep, default = part.partition(":=")
            params.append(param.strip())
            if sep:
                defaults.setdefault(name, {})[param.strip()] = default.strip()
        return f"{match.group(1)}({', '.join(params)})"

    return _MACRO_HEADER.sub(plain, sql_text), defaults


def _split_params(text: str) -> list[str]:
    """A parameter list split on its top-level commas (a default may hold a call with commas)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def parse_bundled(sql_text: str) -> list[exp.Expression]:
    """The statements of one of tracepipe's own SQL scripts (macro defaults made plain first)."""
    _require_sqlglot()
    return [s for s in sqlglot.parse(plain_macro_headers(sql_text)[0], read="duckdb") if s is not None]


def _require_sqlglot() -> None:
    if sqlglot is None:
        from tracepipe.errors import EnvironmentProblem

        raise EnvironmentProblem("the Spark engine needs sqlglot: pip install 'tracepipe[spark]'")


def parse_table_macros(sql_text: str) -> dict[str, TableMacro]:
    """`CREATE [OR REPLACE] MACRO name(a, b) AS TABLE SELECT ...` statements of a DuckDB script."""
    _require_sqlglot()
    macros: dict[str, TableMacro] = {}
    defaults = plain_macro_headers(sql_text)[1]
    for statement in parse_bundled(sql_text):
        if not isinstance(statement, exp.Create) or str(statement.args.get("kind", "")).upper() != "MACRO":
            continue
        if not isinstance(statement.expression, exp.Query) or isinstance(statement.expression, exp.Subquery):
            continue  # a scalar macro (`AS (SELECT ...)`: one value, as ip_canonical binds its argument once)
        signature = statement.this
        name = (signature.this.name if isinstance(signature.this, exp.Expression) else signature.name).lower()
        params = tuple(p.name for p in signature.expressions)
        given = defaults.get(name, {})
        fill = tuple((p, sqlglot.parse_one(given[p], read="duckdb")) for p in params if p in given)
        macros[name] = TableMacro(name, params, statement.expression, fill)
    return macros


def _expand_table_macro(table: exp.Table, macros: Mapping[str, TableMacro]) -> exp.Expression | None:
    call = table.this
    if not isinstance(call, exp.Anonymous | exp.Func):
        return None
    macro = macros.get(call.name.lower()) if call.name else None
    if macro is None:
        return None
    args = list(call.expressions) if isinstance(call, exp.Anonymous) else list(call.args.values())
    named = {}
    while (
        args
        and isinstance(args[-1], exp.PropertyEQ)
        and isinstance(args[-1].this, exp.Identifier | exp.Column)
    ):
        given = args.pop()  # DuckDB's f(a, b, within := x)
        named[given.this.name] = given.expression
    optional = dict(macro.defaults)
    required = [p for p in macro.params if p not in optional]
    if len(args) < len(required) or len(args) > len(macro.params) or set(named) - set(optional):
        raise EngineUnsupported(
            f"{macro.name} takes {len(required)} arguments"
            + (f" and optionally {', '.join(f'{p} := ...' for p in optional)}" if optional else "")
            + f", got {len(args) + len(named)}"
        )
    binding = dict(zip(macro.params, args, strict=False))
    for param, default in macro.defaults:
        binding.setdefault(param, named.get(param, default))

    def substitute(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Column) and not node.table and node.name in binding:
            return binding[node.name].copy()
        return node

    body = macro.body.copy().transform(substitute)
    alias = table.args.get("alias") or exp.TableAlias(this=exp.to_identifier(macro.name))
    return exp.Subquery(this=body, alias=alias)


def _rewrite_asof(join: exp.Join) -> exp.Join:
    """ASOF JOIN -> equi+range join bounded by the right side's validity interval (see module doc)."""
    right = join.this
    right_name = right.alias_or_name
    on = join.args.get("on")
    bound = None
    for condition in on.find_all(exp.GTE, exp.GT) if on is not None else ():
        left_ts, right_from = condition.this, condition.expression
        if (
            isinstance(right_from, exp.Column)
            and right_from.table == right_name
            and right_from.name in ASOF_INTERVALS
        ):
            upper = exp.column(ASOF_INTERVALS[right_from.name], table=right_name)
            far = exp.cast(exp.Literal.string(FAR_FUTURE), exp.DataType.build("timestamp"))
            bound = exp.LT(this=left_ts.copy(), expression=exp.Coalesce(this=upper, expressions=[far]))
            break
    if bound is None:
        raise EngineUnsupported(
            "the Spark engine rewrites ASOF joins only as `... ASOF JOIN t ON ... AND x >= t.valid_from`; "
            f"got: {join.sql('duckdb')}"
        )
    rewritten = join.copy()
    rewritten.set("method", None)
    rewritten.set("on", exp.and_(on.copy(), bound))
    return rewritten


ColumnsOf = Callable[[str], list[str]]


def _table_of_alias(select: exp.Select, alias: str) -> str | None:
    sources = [select.args.get("from_") or select.args.get("from")]
    sources += [j for j in select.args.get("joins") or []]
    for source in sources:
        table = source.this if source is not None else None
        if isinstance(table, exp.Table) and table.alias_or_name == alias:
            return table.name
    return None


def _expand_star_modifiers(select: exp.Select, columns_of: ColumnsOf | None) -> exp.Select:
    """`f.* REPLACE (expr AS c)` / `* EXCLUDE (c)` (DuckDB) -> the explicit column list Spark needs."""
    projections = []
    changed = False
    for projection in select.expressions:
        star = projection.this if isinstance(projection, exp.Column) else projection
        if not isinstance(star, exp.Star) or not (star.args.get("replace") or star.args.get("except")):
            projections.append(projection)
            continue
        alias = projection.table if isinstance(projection, exp.Column) else ""
        sources = [select.args.get("from_") or select.args.get("from"), *(select.args.get("joins") or [])]
        table = (
            _table_of_alias(select, alias)
            if alias
            else (
                sources[0].this.name if len(sources) == 1 and isinstance(sources[0].this, exp.Table) else None
            )
        )
        if table is None or columns_of is None:
            raise EngineUnsupported(
                f"the Spark engine expands `* REPLACE/EXCLUDE` only over a named table: {select.sql('duckdb')[:120]}"
            )
        replaced = {e.alias_or_name: e for e in star.args.get("replace") or []}
        excluded = {e.name for e in star.args.get("except") or []}
        for column in columns_of(table):
            if column in excluded:
                continue
            if column in replaced:
                projections.append(replaced[column].copy())
            else:
                projections.append(exp.column(column, table=alias or None))
        changed = True
    if changed:
        select.set("expressions", projections)
    return select


def _union_by_name(
    union: exp.Union, macros: Mapping[str, TableMacro], columns_of: ColumnsOf | None
) -> exp.Expression:
    """`a UNION ALL BY NAME b` -> both sides projected onto one column list (missing ones NULL)."""
    if columns_of is None:
        raise EngineUnsupported("UNION BY NAME needs the Spark engine's column resolver")
    left = _rewrite_tree(union.this.copy(), macros, columns_of)
    right = _rewrite_tree(union.expression.copy(), macros, columns_of)
    left_cols = columns_of(left.sql(dialect="spark", identify=True))
    right_cols = columns_of(right.sql(dialect="spark", identify=True))
    names = left_cols + [c for c in right_cols if c not in left_cols]

    def side(query: exp.Expression, have: list[str], alias: str) -> exp.Select:
        items = [exp.column(c, table=alias) if c in have else exp.alias_(exp.Null(), c) for c in names]
        return exp.select(*items).from_(
            exp.Subquery(this=query, alias=exp.TableAlias(this=exp.to_identifier(alias)))
        )

    return exp.Union(
        this=side(left, left_cols, "_by_name_l"),
        expression=side(right, right_cols, "_by_name_r"),
        distinct=union.args.get("distinct", False),
    )


def _rewrite_basic(node: exp.Expression, macros: Mapping[str, TableMacro]) -> exp.Expression:
    """Node-local rewrites: ASOF joins, table macros, epoch functions."""
    if isinstance(node, exp.Join) and str(node.args.get("method") or "").upper() == "ASOF":
        return _rewrite_asof(node)
    if isinstance(node, exp.Table):
        expanded = _expand_table_macro(node, macros)
        if expanded is not None:
            expanded.set("this", expanded.this.transform(lambda n: _rewrite_basic(n, macros)))
            return expanded
    if isinstance(node, exp.Anonymous) and node.name.lower() == "epoch_us":
        return exp.Anonymous(this="unix_micros", expressions=[a.copy() for a in node.expressions])
    if isinstance(node, exp.TimeToUnix):  # DuckDB epoch(ts): seconds as a double, sub-second kept
        micros = exp.Anonymous(this="unix_micros", expressions=[node.this.copy()])
        return exp.Div(this=micros, expression=exp.Literal.number("1e6"))
    return node


def _rewrite_tree(
    tree: exp.Expression, macros: Mapping[str, TableMacro], columns_of: ColumnsOf | None
) -> exp.Expression:
    tree = tree.transform(lambda n: _rewrite_basic(n, macros))
    for select in list(tree.find_all(exp.Select)):
        _expand_star_modifiers(select, columns_of)
    if isinstance(tree, exp.Union) and tree.args.get("by_name"):
        return _union_by_name(tree, macros, columns_of)
    for union in [u for u in tree.find_all(exp.Union) if u.args.get("by_name")]:
        union.replace(
            exp.Subquery(this=_union_by_name(union, macros, columns_of))
            if not isinstance(union.parent, exp.Subquery | exp.Create)
            else _union_by_name(union, macros, columns_of)
        )
    return tree


def parse_duckdb(sql: str) -> list[exp.Expression]:
    """The statements of a DuckDB script; UsageError if it does not parse."""
    _require_sqlglot()
    try:
        return [s for s in sqlglot.parse(sql, read="duckdb") if s is not None]
    except sqlglot.errors.ParseError as exc:
        raise UsageError(f"SQL does not parse: {exc}") from exc


def check_queries(statements: list[exp.Expression]) -> None:
    """Only queries reach Spark: no CREATE/INSERT/DROP, no writes to the lake (same rule as DuckDB's side)."""
    if not statements:
        raise UsageError("no SQL statement given")
    for statement in statements:
        if not isinstance(statement, exp.Query | exp.Describe):
            raise UsageError(
                f"tracepipe sql is read-only: {statement.key.upper()} statements are refused "
                f"({statement.sql('duckdb')[:60]!r}). Write queries only (SELECT, WITH, DESCRIBE)."
            )


def to_spark(
    sql: str,
    table_macros: Mapping[str, TableMacro] | None = None,
    columns_of: ColumnsOf | None = None,
    queries_only: bool = False,
) -> list[str]:
    """Transpile a DuckDB script (one or more statements) to Spark SQL statements. `columns_of` (Spark SQL
    or a view name -> its column names) lets `* REPLACE` and `UNION BY NAME` be expanded."""
    macros = table_macros or {}
    statements = parse_duckdb(sql)
    if queries_only:
        check_queries(statements)
    out = []
    for statement in statements:
        rewritten = _rewrite_tree(statement, macros, columns_of)
        # comments=False: nothing a user wrote in a comment reaches Spark (a `/*+ ... */` would be a hint)
        out.append(rewritten.sql(dialect="spark", identify=True, comments=False))
    return out


def view_to_spark(create_view_sql: str, table_macros: Mapping[str, TableMacro] | None = None) -> str:
    """`CREATE [OR REPLACE] VIEW v AS ...` (DuckDB) -> `CREATE OR REPLACE TEMPORARY VIEW v AS ...` (Spark)."""
    _require_sqlglot()
    statement = sqlglot.parse_one(create_view_sql, read="duckdb")
    if not isinstance(statement, exp.Create) or str(statement.args.get("kind", "")).upper() != "VIEW":
        raise EngineUnsupported(f"expected CREATE VIEW, got: {create_view_sql[:80]}")
    statement = statement.copy()
    statement.set("replace", True)
    properties = exp.Properties(expressions=[exp.TemporaryProperty()])
    statement.set("properties", properties)
    return to_spark(statement.sql("duckdb"), table_macros)[0]
