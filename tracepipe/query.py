"""DuckDB over the lake: a connection with one view per dataset, `flows_attributed`, and the address macros
(`who_had(addr, ts)`, `cidr_contains(cidr, addr)`, `ip_to_num`, `ip_between`).

The SQL lives in tracepipe/sql/*.sql. Views exist even for datasets that have no file yet (empty, typed from
schema.py), so a query never fails because nothing has landed. `run_read_only` refuses every statement that is
not a query: `tracepipe sql` cannot COPY, CREATE, DELETE, ATTACH or change settings against the lake.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import os
import re
import shutil
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from tracepipe import fsutil
from tracepipe.correlate import VMS_COMPLETE
from tracepipe.errors import EXIT_OK, LakeError, TracepipeError, UsageError
from tracepipe.lake import MANIFEST_DIR, PARTITION, FileEntry, Lake, have_null_counts, regular_files
from tracepipe.limits import MAX_FLOW_DURATION
from tracepipe.schema import DATASETS
from tracepipe.units import parse_addr, parse_duration, parse_time, to_utc  # noqa: F401 (re-exported)

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


def glob_literal(path: str) -> str:
    """`path` as a DuckDB file pattern that matches only itself: read_parquet takes every name as a glob, so
    `*`, `?` and `[` in a lake path (`/srv/lake[1]`) would match other files, even a planted `/srv/lake1`.
    DuckDB's glob has no backslash escape; a one-character class (`[*]`, `[?]`, `[[]`) is the literal."""
    if "*" not in path and "?" not in path and "[" not in path:
        return path  # (the usual lake path: a reader names thousands of files)
    return path.translate(_GLOB_CLASSES)


_GLOB_CLASSES = str.maketrans({c: f"[{c}]" for c in "*?["})


def quote_name(name: str) -> str:
    """A SQL identifier (a declared column name)."""
    return '"' + name.replace('"', '""') + '"'


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


def scan_sql(name: str, files: list[Path] | list[FileEntry], checked: bool = False) -> str:
    """read_parquet over the given files of a dataset (a file list taken from the table's log, never a glob:
    files removed by compaction stay on disk for a while; each name quoted and glob-escaped, so a lake path with
    `'`, `*`, `?` or `[` reads exactly its own files), hive `date` typed DATE; empty typed relation if none.

    Files that have every declared column (the log's statistics name them all) are read in one scan that
    binds on the first footer only. Files written before a column was added to schema.py (vm_events.image)
    lack it: grouped by the columns their footers hold, each group is read with the missing ones as typed
    NULLs (DuckDB cannot read files of differing columns in one scan without opening every footer).

    `checked`: the caller has just found each file regular (check_files, for the same snapshot of the log);
    otherwise an lstat each here (regular_files)."""
    if not files:
        return empty_relation_sql(name)
    if not checked:
        regular_files([f.path if isinstance(f, FileEntry) else f for f in files])
    complete, older = _split_by_columns(name, files)
    rows = {f.path: f.rows for f in files if isinstance(f, FileEntry)}
    if not older:
        return _read_sql(name, complete, set(), rows)
    names = frozenset(f.name for f in DATASETS[name].schema)
    groups: dict[frozenset[str], list[Path]] = {}
    for path in older:
        groups.setdefault(_footer_columns(path, names), []).append(path)
    if complete:
        groups.setdefault(names, []).extend(complete)
    return " UNION ALL ".join(
        f"({_read_sql(name, paths, set(names - have), rows)})"
        for have, paths in sorted(groups.items(), key=lambda item: str(item[1][0]))
    )


def _split_by_columns(name: str, files: list[Path] | list[FileEntry]) -> tuple[list[Path], list[Path]]:
    """Files known (from the log's per-file null counts) to have every flat column, and the others (no log
    entry given, or a column the statistics do not name). Nested columns have no statistics: not checked."""
    flat = [f.name for f in DATASETS[name].schema if not pa.types.is_nested(f.type)]
    entries = [item for item in files if isinstance(item, FileEntry)]
    has_all = iter(have_null_counts(entries, flat))  # (in columns: once per listing, not per file and column)
    complete: list[Path] = []
    older: list[Path] = []
    for item in files:
        if isinstance(item, FileEntry):
            (complete if next(has_all) else older).append(item.path)
        else:
            older.append(item)
    return complete, older


def _footer_columns(path: Path, names: frozenset[str]) -> frozenset[str]:
    """The columns a file's footer declares; all `names` when the footer does not read (the scan then fails
    on it and says which file: query.lake_file_error)."""
    try:
        with fsutil.arrow_regular(path) as handle:  # (a planted FIFO: refused, never waited on)
            return frozenset(pq.read_schema(handle).names)
    except (OSError, pa.ArrowException):
        return names


_ANCHORS: dict[tuple[str, frozenset[str], tuple[str, ...]], Path] = {}
_ANCHOR_LOCK = threading.Lock()
_ANCHOR_DIR: list[Path] = []  # this process's own (mkdtemp, 0700), removed at exit


def anchor_dir() -> Path:
    """The directory of this process's schema anchors (made on first use)."""
    with _ANCHOR_LOCK:
        if not _ANCHOR_DIR or not _ANCHOR_DIR[0].is_dir():
            # (again when a temp cleaner removed it from a service running for weeks: a new private one, never
            # the old name recreated, which someone else may have taken in the shared temp directory)
            folder = fsutil.private_temp_dir("schema")
            atexit.register(_remove_anchors, folder, os.getpid())
            _ANCHOR_DIR[:] = [folder]
            _ANCHORS.clear()
        return _ANCHOR_DIR[0]


def _remove_anchors(folder: Path, owner: int) -> None:
    if os.getpid() == owner:  # (a forked child exiting leaves its parent's anchors alone)
        shutil.rmtree(folder, ignore_errors=True)


def schema_anchor(name: str, missing: frozenset[str], like: Path) -> Path | None:
    """An empty Parquet file of dataset `name`'s declared columns (but `missing`), written as the lake writes
    them, in this process's own directory (never the lake's, which a planted file could replace): read first by
    a scan whose chosen first file does not hold the declared types (_bound_on), it fixes the types DuckDB binds
    the view to. DuckDB binds read_parquet on the FIRST file and
    casts the others to it: a file of the log replaced by one whose `bytes` is text turned `flows.bytes` into
    VARCHAR for the whole lake (`who` stopped with an internal error on sum(VARCHAR)). With the anchor first,
    such a file is cast (its rows read as declared) or, when it cannot be, fails naming itself (lake_file_error:
    `tracepipe repair` takes it out).

    Its path holds the same `key=value` folders as `like` (a file of the scan): DuckDB takes every such folder
    of a path as a hive partition (`date=...`, and any in the lake's own path: /srv/env=prod/lake) and refuses a
    scan whose files differ in them. None (no anchor: DuckDB binds on the first file, as before) when this
    process's temp directory itself holds a `=`."""
    home = anchor_dir()
    if "=" in str(home):
        return None
    # (the day's own value made constant: a service running for years would make an anchor per day otherwise;
    # `date` is typed by hive_types, any other key keeps its value, and so its inferred type)
    keys = tuple(
        f"{PARTITION}=1970-01-01" if part.startswith(f"{PARTITION}=") else part
        for part in Path(like).parts
        if "=" in part
    )
    key = (name, missing, keys)
    with _ANCHOR_LOCK:
        known = _ANCHORS.get(key)
    if known is not None and known.exists():
        return known
    dataset = DATASETS[name]
    schema = pa.schema([f for f in dataset.schema if f.name not in missing])
    folder = home.joinpath(f"{name}-{len(_ANCHORS)}-{threading.get_ident()}", *keys)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "anchor.parquet"
    pq.write_table(schema.empty_table(), path, store_schema=False)
    with _ANCHOR_LOCK:
        _ANCHORS[key] = path
    return path


def _read_sql(name: str, paths: list[Path], missing: set[str], rows: dict[Path, int] | None = None) -> str:
    """read_parquet over `paths` (each with the same columns: the declared ones but `missing`), every column
    cast to its declared type. `rows`: each file's row count as the log holds it, for _bound_on."""
    dataset = DATASETS[name]
    paths = _bound_on(name, paths, frozenset(missing), rows or {})
    files = "[" + ", ".join(quote_literal(glob_literal(str(p))) for p in paths) + "]"
    options = "union_by_name = false"
    if dataset.partition_ts is not None:
        options += ", hive_partitioning = true, hive_types = {'date': DATE}"
    # (a cast to the type a column already has is no cast for DuckDB: filters still reach the files)
    columns = ", ".join(
        f"CAST({'NULL' if f.name in missing else quote_name(f.name)} AS {_duck_type(f.type)}) AS {quote_name(f.name)}"
        for f in dataset.schema
    )
    if dataset.partition_ts is not None:
        columns += ', "date"'
    return f"SELECT {columns} FROM read_parquet({files}, {options})"


def _bound_on(name: str, paths: list[Path], missing: frozenset[str], rows: dict[Path, int]) -> list[Path]:
    """`paths` in the order DuckDB reads them. DuckDB binds read_parquet's columns to the FIRST file's footer
    and estimates the scan at that file's rows times the number of files. So the first file is the lake file
    nearest the mean row count of the scan (the log's counts; the first given when they are unknown) when its
    footer holds the declared columns and types: DuckDB then plans joins on a true size. Otherwise (a planted or
    damaged file there) an empty schema anchor comes first and fixes the types (schema_anchor), at the cost of an
    estimate of 0 rows: DuckDB, taking the scan for the smaller side of every join, hashed a month of flows
    instead of the VMs (trace: 125 s and 19.8 GB for 1,000 observations over 4.65 M flows, session 26; a
    count over flows_attributed 1.17 GB against 255 MB). Either way every column is also cast to its declared
    type in the SELECT (_read_sql), so a file swapped in between this check and the query binds no other type."""
    total = sum(rows.get(p, 0) for p in paths)
    counted = [i for i, p in enumerate(paths) if rows.get(p, 0) > 0]
    first = min(counted, key=lambda i: abs(rows[paths[i]] * len(paths) - total)) if counted else 0
    if _binds_as_declared(name, missing, paths[first]):
        return [paths[first], *paths[:first], *paths[first + 1 :]]
    anchor = schema_anchor(name, missing, paths[0])
    return [anchor, *paths] if anchor is not None else paths


def _binds_as_declared(name: str, missing: frozenset[str], path: Path) -> bool:
    """Whether the footer of `path` (a lake file) holds exactly the declared columns of dataset `name` but
    `missing`, in order, of the types the lake writes them as (those of the schema anchor's footer). False when
    it does not read (a FIFO or other non-regular file is refused, never waited on)."""
    expected = _anchor_footer(name, missing)
    try:
        with fsutil.arrow_regular(path) as handle:
            found = pq.read_schema(handle)
    except (OSError, pa.ArrowException):
        return False
    return found.names == expected.names and all(
        a.type == b.type for a, b in zip(found, expected, strict=True)
    )


_ANCHOR_FOOTERS: dict[tuple[str, frozenset[str]], pa.Schema] = {}


def _anchor_footer(name: str, missing: frozenset[str]) -> pa.Schema:
    """The schema a reader finds in the footer of a lake file of `name` without `missing` (as in the anchor)."""
    key = (name, missing)
    known = _ANCHOR_FOOTERS.get(key)
    if known is None:
        schema = pa.schema([f for f in DATASETS[name].schema if f.name not in missing])
        buffer = pa.BufferOutputStream()  # (Arrow's own buffer: fsutil.arrow_file says why)
        pq.write_table(schema.empty_table(), buffer, store_schema=False)
        known = _ANCHOR_FOOTERS.setdefault(key, pq.read_schema(pa.BufferReader(buffer.getvalue())))
    return known


def flow_halves(lake: Lake, entries: list[FileEntry] | None = None) -> tuple[list[Path], list[Path]]:
    """The flow files whose every row was attributed when written (the log's null count of attributed_at is
    0: src_vm/dst_vm are final, a null means nobody held the address) and the others, which flows_attributed
    joins to vm_leases at query time. Read from the transaction log (or `entries`, a snapshot of it already
    read); no file is opened."""
    done: list[Path] = []
    todo: list[Path] = []
    for entry in lake.entries("flows") if entries is None else entries:
        (done if entry.rows > 0 and entry.null_counts.get("attributed_at") == 0 else todo).append(entry.path)
    return done, todo


def has_vm_keys(entry: FileEntry) -> bool:
    """A flow file attributed with vm keys: by the log's null counts, each end has a key wherever it has a
    VM (attribution writes both from one lease, so the rows agree too). Files written before the key columns
    existed have no statistics for them: False, flows_attributed joins those on the text vm_id."""
    return all(
        entry.null_counts.get(f"{end}_vm_key") is not None
        and entry.null_counts.get(f"{end}_vm_key") == entry.null_counts.get(f"{end}_vm")
        for end in ("src", "dst")
    )


def flow_parts(
    lake: Lake, entries: list[FileEntry] | None = None
) -> tuple[list[Path], list[Path], list[Path]]:
    """flow_halves with the attributed files split in two: (keyed, other attributed, never attributed).
    Keyed files, whose src_vm_key/dst_vm_key flows_attributed joins to vms.vm_key, only when the lease builder
    wrote vms last (vms_complete: every VM has its key there); else every attributed file is joined on text."""
    entries = lake.entries("flows") if entries is None else entries
    done, todo = flow_halves(lake, entries)
    if not vms_complete(lake):
        return [], done, todo
    by_path = {e.path: e for e in entries}
    keyed = [p for p in done if has_vm_keys(by_path[p])]
    return keyed, [p for p in done if not has_vm_keys(by_path[p])], todo


# flows_attributed reads the VM facts stored in flow files (and their overlay) only from this many vms rows on:
# below, the join to every VM costs less (benchmarks/correlate.py: 100 k VMs 2.25x a plain scan by the join,
# 3.10x by stored facts; 3 M VMs 6.44x and 2.67x). Both forms give the same rows.
STORED_FACTS_FROM_VMS = 1_000_000


def connect(
    lake: Lake,
    read_only: bool = True,
    threads: int | None = None,
    stored_facts_from: int = STORED_FACTS_FROM_VMS,
    days: tuple[dt.date, dt.date] | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB session whose views read the lake's Parquet files as they are now.

    Views: flows, vm_events, vm_leases, vms, vm_logs, intel, alerts, rejects, flows_attributed; macros from
    sql/macros.sql and who_had from sql/views.sql. With read_only (the default) the session may read only the
    lake directory and its settings are locked; run user SQL through `run_read_only`. `stored_facts_from`: the
    number of vms rows from which flows_attributed reads the VM facts stored in flow files (same rows).
    `days` (first, last): the views of day-partitioned datasets (flows, flows_attributed, vm_events, alerts, ...)
    list only the files of those days, for a session that asks about them alone (`who`'s window): its rows of
    those days are the whole lake's, and neither making the views nor binding a query costs a parse of every
    file's path (0.3-0.8 s at 3,000 days a table). Every file the logs list is still checked (check_files).
    """
    lake.require(allow_empty=True)
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    con.execute(sql_text("macros"))
    # Every view from one version of each table: a Lake follows new commits on every read, so two reads may
    # see two versions (a commit in between: flows_attributed counted rows that flows did not hold)
    lake = lake.snapshot()
    check_files(lake)
    listed = {name: _of_days(lake.entries(name), days) for name in DATASETS}
    flow_entries = listed["flows"]
    files: list[Path] = []
    scans: dict[str, tuple[str, list[FileEntry]]] = {}  # view -> (dataset, the log's entries of its files)
    for name in DATASETS:
        entries = listed[name]
        files += [e.path for e in entries]
        scans[name] = (name, entries)
    keyed, done, todo = flow_parts(lake, flow_entries)
    by_path = {e.path: e for e in flow_entries}  # the log's entries: scan_sql reads no footer for them
    many = sum(e.rows for e in lake.entries("vms")) >= stored_facts_from
    lost = lost_vm_keys(lake) if keyed and many else None
    facts = [p for p in keyed if has_vm_facts(by_path[p])] if lost is not None else []
    with_facts = set(facts)
    keyed = [p for p in keyed if p not in with_facts]
    scans["_flows_facts"] = ("flows", [by_path[p] for p in facts])
    # the vms files that hold a VM whose identity changed (the log's null counts; the lease writer keeps those
    # VMs in files of their own): what flows_attributed's overlay reads, not every VM
    changed = [e for e in lake.entries("vms") if e.null_counts.get("identity_changed_at") != e.rows]
    scans["_vms_changed"] = ("vms", changed)
    scans["_flows_keyed"] = ("flows", [by_path[p] for p in keyed])
    scans["_flows_done"] = ("flows", [by_path[p] for p in done])
    scans["_flows_todo"] = ("flows", [by_path[p] for p in todo])
    # The views of sql/*.sql are made over typed empty stand-ins of these scans, which take their place last:
    # DuckDB binds a view when it is made, and so the scans under it again, each file's path parsed for its
    # hive partition every time (views.sql bound _flows_todo five times: 0.5 s of every connect at 9,000 files).
    # A query binds the views anew, over the scans then in place: the same columns, types and rows.
    for view, (name, _entries) in scans.items():
        con.execute(f"CREATE OR REPLACE VIEW {quote_name(view)} AS {empty_relation_sql(name)}")
    status = VmStatus([e.path for e in lake.entries("vms")])
    con.create_function(
        "vm_status", status, ["BIGINT"], "VARCHAR", type="arrow", null_handling="special", side_effects=False
    )
    con.execute(sql_text("views"))
    if lost:
        # at most MAX_LOST_KEYS keys, in as many ranges: made once per session (a view of one range() per
        # range made every query bind thousands of unions after a repair had scattered the lost keys)
        con.execute(
            "CREATE TEMP TABLE _vm_lost_key_table AS SELECT unnest(range(r.a, r.b + 1)) AS vm_key "
            "FROM (SELECT unnest(CAST($1 AS BIGINT[])) AS a, unnest(CAST($2 AS BIGINT[])) AS b) r",
            [[a for a, _ in lost], [b for _, b in lost]],
        )
        con.execute("CREATE OR REPLACE VIEW _vm_lost_keys AS SELECT vm_key FROM _vm_lost_key_table")
    if facts and not (keyed or done or todo):
        # every file carries its VMs' facts (the usual lake once attributed): without the joined half, which
        # DuckDB plans and runs even when it reads no file (a scan of vms per join: 0.2x a flows scan at 3 M VMs)
        con.execute("CREATE OR REPLACE VIEW flows_attributed AS SELECT * FROM _flows_facts_now")
    if not vm_info_plain(lake):
        con.execute(sql_text("vm_info_from_leases"))  # leases not written by the builder: see that file
    for view, (name, entries) in scans.items():  # (files checked above: check_files, same snapshot)
        if view != "flows" and name == "flows" and _same_files(entries, flow_entries):
            # (one part of flows_attributed holds every flow file, as it does in most lakes: the same scan,
            # whose text DuckDB would parse and bind again, a file list as long as the table's)
            con.execute(f'CREATE OR REPLACE VIEW {quote_name(view)} AS SELECT * FROM "flows"')
        else:
            con.execute(
                f"CREATE OR REPLACE VIEW {quote_name(view)} AS {scan_sql(name, entries, checked=True)}"
            )
    if read_only:
        # Defence in depth under the statement check: the session reads the lake (and its spill directory)
        # and nothing else, and a query cannot switch that back on. The spill directory is this session's
        # own, new and 0700 (mkdtemp): a fixed name under the shared temp dir could be a symlink someone
        # planted (issue #12), which would have put whatever it points to on the allowed list.
        spill = fsutil.private_temp_dir("duckdb")
        # removed when the session is garbage (who, timeline: right after close) or at exit
        weakref.finalize(con, shutil.rmtree, spill, ignore_errors=True)
        con.execute(f"SET temp_directory = {quote_literal(str(spill))}")
        # (a table directory moved to another disk and linked back: DuckDB checks the resolved path, so its
        # target is allowed too; who and timeline failed with a PermissionException on such a lake)
        linked = [(lake.root / name).resolve() for name in DATASETS if (lake.root / name).is_symlink()]
        anchors = anchor_dir()  # (the schema anchors every scan reads first: _read_sql)
        allowed = (
            "["
            + ", ".join(quote_literal(str(p)) for p in (lake.root.resolve(), spill, anchors, *linked))
            + "]"
        )
        con.execute(f"SET allowed_directories = {allowed}")
        # DuckDB checks the name it is given, here the glob-escaped one (scan_sql) when the lake's path has
        # `*?[`: each such file name is allowed as it is written, not its escaped directory (a sibling directory
        # literally named `lake[[]1]` would have become readable, as a name no glob matches is read as is)
        with _ANCHOR_LOCK:
            anchored = list(_ANCHORS.values())
        escaped = [glob_literal(str(p)) for p in [*files, *anchored] if glob_literal(str(p)) != str(p)]
        if escaped:
            con.execute(f"SET allowed_paths = [{', '.join(quote_literal(p) for p in escaped)}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def _of_days(entries: list[FileEntry], days: tuple[dt.date, dt.date] | None) -> list[FileEntry]:
    """The entries of files of days first..last (all of them when `days` is None or the table has no days)."""
    if days is None:
        return entries
    first, last = (day.isoformat() for day in days)
    return [e for e in entries if e.day is None or first <= e.day <= last]


def _same_files(entries: list[FileEntry], others: list[FileEntry]) -> bool:
    """Whether two lists hold the same entries in the same order (the objects of one listing)."""
    return len(entries) == len(others) > 0 and all(a is b for a, b in zip(entries, others, strict=True))


def has_vm_facts(entry: FileEntry) -> bool:
    """A flow file whose every row was attributed with its VMs' facts (vm_facts_at set: attribution copied them
    from vms), by the log's null count; files attributed before the columns existed, or compacted from such
    files, have nulls (or no statistics) there: flows_attributed joins those to vms."""
    return entry.rows > 0 and entry.null_counts.get("vm_facts_at") == 0


def lost_vm_keys(lake: Lake) -> list[tuple[int, int]] | None:
    """The key ranges below the vm_key counter that no vms row holds, as the lease writer recorded them with its
    last vms commit (correlate/vm_keys.py recorded_lost_keys); None when it did not record them or the record
    is not trusted: then flows_attributed joins every file to vms, as stored facts cannot tell which keys vms
    lost."""
    from tracepipe.correlate.vm_keys import recorded_lost_keys

    return recorded_lost_keys(lake)


class VmStatus:
    """vm_status(vm_key) for DuckDB (an Arrow function): each key's vms.status now, null where vms has no such
    key. Built on the first call from the vms files of the session's snapshot (an array indexed by key, as
    vm_keys are dense; else the keys sorted once and searched), so a query that reads no status never pays for
    it: DuckDB drops unused function calls, where it keeps a LEFT join to vms (issue 18 item 4)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.keys: Any = None
        self.codes: Any = None
        self.dense: Any = None
        self.statuses: pa.Array | None = None
        # DuckDB calls the function from several threads at once: one builds, the others wait for it
        self._building = threading.Lock()

    def _ready(self) -> pa.Array:
        """The status dictionary, once every look-up structure is in place (built once, under the lock:
        `statuses` is published last, so a thread that sees it also sees `dense` or `keys`/`codes`)."""
        statuses = self.statuses
        if statuses is None:
            with self._building:
                if self.statuses is None:
                    self._build()
                statuses = self.statuses
        assert statuses is not None
        return statuses

    def _build(self) -> None:
        import numpy as np
        import pyarrow.compute as pc

        from tracepipe.lake import read_parquet_files
        from tracepipe.schema import VMS

        schema = pa.schema([VMS.field("vm_key"), VMS.field("status")])
        tables = read_parquet_files(self.paths, schema)
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        table = table.filter(pc.is_valid(table.column("vm_key")))
        encoded = table.column("status").combine_chunks().dictionary_encode()
        keys = table.column("vm_key").to_numpy()
        codes = pc.fill_null(encoded.indices, -1).to_numpy().astype(np.int32)
        if len(keys) and 0 <= keys.min() and keys.max() < 2 * len(keys) + 1024:
            # vm_keys are dense (a counter): the key is the index of an array of codes
            dense = np.full(int(keys.max()) + 1, -1, np.int32)
            dense[keys[::-1]] = codes[::-1]  # a key listed twice (a planted file): its first row
            self.dense = dense
        else:
            order = np.argsort(keys, kind="stable")
            self.keys = keys[order]
            self.codes = codes[order]
        self.statuses = encoded.dictionary  # last: see _ready

    def __call__(self, keys: pa.Array) -> pa.Array:
        import numpy as np
        import pyarrow.compute as pc

        statuses = self._ready()
        if keys.null_count == len(keys):  # flows from addresses nobody held: most of a border's traffic
            return pa.nulls(len(keys), pa.string())
        # a null key has no VM, whatever key a (planted) vms row holds: masked, not looked up as a sentinel
        missing = keys.is_null().to_numpy(zero_copy_only=False)
        wanted = pc.fill_null(keys, 0).to_numpy(zero_copy_only=False)
        if self.dense is not None:
            inside = (wanted >= 0) & (wanted < len(self.dense))
            codes = np.where(inside, self.dense[np.where(inside, wanted, 0)], -1)
        elif len(self.keys) == 0:
            return pa.nulls(len(keys), pa.string())
        else:
            at = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
            codes = np.where(self.keys[at] == wanted, self.codes[at], -1)
        return statuses.take(pa.array(codes, mask=(codes < 0) | missing))


def vms_complete(lake: Lake) -> bool:
    """True when the lease builder wrote vm_leases last (its commit says so): then vms holds a row for every
    VM of vm_leases and _vm_info is a plain read of vms (sql/views.sql); else the views add the VMs found only
    in vm_leases (sql/vm_info_from_leases.sql). Both engines ask this."""
    return bool(next(iter(lake.commit_infos("vm_leases")), {}).get(VMS_COMPLETE))


def vm_info_plain(lake: Lake) -> bool:
    """True when _vm_info is the plain read of vms (sql/views.sql): the lease builder wrote vm_leases last
    (vms_complete) and every vms row has its vm_key (the log's null counts: no file opened); else
    sql/vm_info_from_leases.sql. Both engines ask this."""
    entries = lake.entries("vms")
    return vms_complete(lake) and all(e.null_counts.get("vm_key") == 0 for e in entries)


def check_files(lake: Lake) -> None:
    """LakeError naming every file the lake's logs list that is missing or not the size the log recorded (a
    stat each): DuckDB would fail every query on it, or with the first file of a table, every view. A lake read
    --as-of a version whose files vacuum deleted since is a UsageError saying so (repair would not help)."""
    found = [(name, entry, reason) for name in DATASETS for entry, reason in lake.damaged(name)]
    if found and lake.as_of is not None:
        vacuumed = _vacuumed(lake, found)
        if vacuumed:
            from tracepipe.maintenance import as_of_text

            raise UsageError(
                f"--as-of {as_of_text(lake.as_of)}: the lake no longer holds that version: {len(vacuumed)} of "
                "its files were removed by later commits and then deleted by `tracepipe vacuum` (removed longer "
                f"ago than vacuum's --retain, 7 days by default), e.g. {vacuumed[0].path}. Time travel reaches "
                "back as far as --retain; export evidence that must outlive it: tracepipe sql ... --format "
                "parquet --output FILE"
            )
    damaged = [(entry, reason) for _name, entry, reason in found]
    if damaged:
        files = "; ".join(f"{entry.path} ({reason})" for entry, reason in damaged[:5])
        more = f" and {len(damaged) - 5} more" if len(damaged) > 5 else ""
        raise LakeError(f"damaged lake files: {files}{more}. {repair_advice(lake.root)}")


def _vacuumed(lake: Lake, found: list[tuple[str, FileEntry, str]]) -> list[FileEntry]:
    """Of the damaged files of a lake read --as-of, those that are missing and that the latest version of their
    table no longer lists: removed by a later commit, then deleted by vacuum (not damage)."""
    latest = Lake(lake.root)
    listed: dict[str, set[str]] = {}
    out = []
    for name, entry, _reason in found:
        if os.path.lexists(entry.path):
            continue
        if name not in listed:
            listed[name] = {e.relative for e in latest.entries(name)}
        if entry.relative not in listed[name]:
            out.append(entry)
    return out


def damage_error(roots: Iterable[Path], exc: Exception) -> LakeError | None:
    """When a command stopped on an error that is not one of tracepipe's, the damaged files of the lakes it read
    (Lake.damaged, footers read) as one LakeError that names them and says what to run; None when they are sound
    (a real internal error). A planted file whose `bytes` is text stopped polars with a SchemaError, a file of
    garbage pyarrow or DuckDB, none of them naming the file."""
    found: list[tuple[Path, str]] = []
    for root in roots:
        try:
            lake = Lake(root)
            for name in [*DATASETS, MANIFEST_DIR]:
                if (lake.root / name / "_delta_log").is_dir():
                    found += [
                        (lake.root, f"{e.path} ({why})") for e, why in lake.damaged(name, read_footers=True)
                    ]
        except Exception:  # (a lake that cannot even be listed: the original error stands)
            continue
    if not found:
        return None
    shown = "; ".join(text for _, text in found[:5]) + (
        f"; and {len(found) - 5} more" if len(found) > 5 else ""
    )
    first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return LakeError(f"stopped on damaged lake files ({first}): {shown}. {repair_advice(found[0][0])}")


def repair_advice(root: Path) -> str:
    return (
        "A file the table's log lists was truncated, replaced or deleted, or holds columns of other types than "
        "its table's (a planted file, a broken disk). Copy it "
        f"as evidence if you like, then run `tracepipe repair --lake {root}`: it moves such files to "
        f"{root / '_damaged'}/ and removes them from the log (their rows leave the lake)."
    )


_QUOTED_PARQUET = re.compile(r"'([^']+\.parquet)'|\"([^\"]+\.parquet)\"")  # DuckDB quotes it either way


def lake_file_error(exc: Exception, root: Path) -> LakeError | None:
    """A LakeError when DuckDB failed on a file of the lake at `root` (a damaged file of the log's size that
    check_files cannot see, or one whose columns are not of their declared types: schema_anchor), else None."""
    if not isinstance(exc, duckdb.IOException | duckdb.InvalidInputException | duckdb.ConversionException):
        return None
    lake = Path(root).resolve()
    for quoted in _QUOTED_PARQUET.findall(str(exc)):
        path = quoted[0] or quoted[1]
        if Path(path).resolve().is_relative_to(lake):
            first = str(exc).splitlines()[0]
            return LakeError(f"cannot read lake file {path}: {first}. {repair_advice(Path(root))}")
    return None


@contextlib.contextmanager
def reading(root: Path, user_sql: bool = False) -> Iterator[None]:
    """DuckDB errors while a query runs or its rows are fetched: a damaged lake file -> LakeError (4); with
    `user_sql`, any other -> UsageError (2) with DuckDB's message (a bad CAST, error('x'), a type mismatch)."""
    try:
        yield
    except duckdb.Error as exc:
        lake_error = lake_file_error(exc, root)
        if lake_error is not None:
            raise lake_error from exc
        if user_sql:
            # one line: DuckDB's text without the caret line under the query
            lines = [line.strip() for line in str(exc).splitlines()]
            raise UsageError(f"query failed: {' '.join(x for x in lines if x.strip('^'))}") from exc
        raise


def fetch_rows(relation: duckdb.DuckDBPyRelation, limit: int, root: Path) -> list[tuple[Any, ...]]:
    """The first `limit` rows of the result of a user's query (errors as `reading` says)."""
    with reading(root, user_sql=True):
        return relation.limit(limit).fetchall()


# EXPLAIN [ANALYZE] / EXPLAIN (options) and what it explains, comments allowed before and between
_SKIP = r"(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)*"
_EXPLAIN = re.compile(
    rf"^{_SKIP}explain\b{_SKIP}(?:\([^)]*\){_SKIP})?(?:analy[sz]e\b)?", re.IGNORECASE | re.DOTALL
)


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
            # EXPLAIN ANALYZE runs its statement: check what it explains (each level strips one EXPLAIN, so
            # this ends; a form the pattern does not know is refused, never passed on)
            match = _EXPLAIN.match(statement.query)
            if match is None:
                raise UsageError(
                    f"cannot tell what this EXPLAIN explains ({statement.query.strip()[:60]!r}); write "
                    "EXPLAIN [ANALYZE] SELECT ... or EXPLAIN (FORMAT json) SELECT ..."
                )
            check_read_only(con, statement.query[match.end() :])
            continue
        if kind not in READ_ONLY_TYPES:
            verb = kind.name if kind is not None else "this statement"
            raise UsageError(
                f"tracepipe sql is read-only: {verb} statements are refused "
                f"({statement.query.strip()[:60]!r}). Write queries only (SELECT, WITH, DESCRIBE, EXPLAIN); "
                "to save a result, use --format csv|json|parquet --output FILE."
            )
    return statements


def run_read_only(
    con: duckdb.DuckDBPyConnection, sql: str, root: Path | None = None
) -> duckdb.DuckDBPyRelation | None:
    """Run the one query of `sql` after check_read_only; its relation (None if it returns no rows). Several
    statements are refused: only the last one's rows would be shown, the others' silently dropped. Errors of
    DuckDB (unknown column, ...) become UsageError with DuckDB's message, or LakeError when a file of the lake
    at `root` does not read. Rows are computed when fetched: use fetch_rows or export_result, which do the
    same."""
    statements = check_read_only(con, sql)
    if len(statements) > 1:
        raise UsageError(
            f"{len(statements)} statements given: one query at a time (only the last one's rows would be "
            "shown); run them one by one, or use --shell"
        )
    relation = None
    with reading(root if root is not None else Path("/nonexistent-lake"), user_sql=True):
        for statement in statements:
            relation = con.sql(statement.query)
    return relation


# ---- the incident questions: who held an address, everything about one VM ----------------------------------


def _rows(relation: duckdb.DuckDBPyRelation | duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in relation.description]
    return [dict(zip(names, row, strict=True)) for row in relation.fetchall()]


def _day(value: dt.datetime) -> dt.date:
    return value.astimezone(dt.UTC).date()


def after_reclaim(lease: dict[str, Any], at: dt.datetime) -> bool:
    """Whether an open lease of a soft-deleted VM is asked about after its quarantine ended: the cloud reclaimed
    (deleted) the VM then, but no delete event came, so the records still show the lease open."""
    until = lease.get("quarantine_until")
    return (
        lease.get("valid_to") is None
        and lease.get("vm_status") == "soft_deleted"
        and until is not None
        and until <= at
    )


def alerts_by_id(
    lake: Lake, ids: list[str], con: duckdb.DuckDBPyConnection | None = None
) -> list[dict[str, Any]]:
    """The rows of the lake's alerts with these ids (a query: the alerts of years are never read into Python)."""
    if not ids or not lake.files("alerts"):
        return []
    with contextlib.ExitStack() as stack:
        if con is None:
            con = stack.enter_context(contextlib.closing(connect(lake)))
        return _rows(
            con.execute(
                "SELECT * FROM alerts WHERE alert_id IN (SELECT unnest($ids::VARCHAR[]))", {"ids": ids}
            )
        )


def vm_now(
    status: str | None,
    deleted_at: dt.datetime | None,
    quarantine_until: dt.datetime | None,
    now: dt.datetime | None = None,
) -> str:
    """What a VM is now, in words: 'deleted 2024-03-12 09:12 UTC, image quarantined until 2024-03-19'."""
    now = now or dt.datetime.now(dt.UTC)
    text = (status or "unknown").replace("_", "-")
    if deleted_at is not None and status in ("deleted", "purged", "soft_deleted"):
        text += f" {deleted_at.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"
    if quarantine_until is not None:
        until = f"{quarantine_until.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"
        kept = (
            f"image quarantined until {until}"
            if quarantine_until > now
            else f"image kept until {until} (reclaimed since)"
        )
        # (restorable only while its quarantine lasts: past it, the cloud reclaimed it)
        restorable = status == "soft_deleted" and quarantine_until > now
        text += (", restorable; " if restorable else ", ") + kept
    elif status == "soft_deleted":
        text += " (quarantined, restorable)"
    return text


# Which flows reach into a window [start, stop): begun before its end, and ended (counted no longer than
# limits.MAX_FLOW_DURATION after their start) at or after its beginning: a session begun before the window counts
# (a C&C connection that softflowd exports as one record of hours). `who` and `trace` answer by this one rule.
FLOW_END = f"least(f.ts_end, f.ts_start + INTERVAL {int(MAX_FLOW_DURATION.total_seconds())} SECOND)"

_FLOW_WINDOW_SQL = """
WITH w AS (
    SELECT *, CASE WHEN src_addr = $addr THEN dst_addr ELSE src_addr END AS peer,
              src_addr = $addr AS outbound
    FROM flows f
    WHERE (src_addr = $addr OR dst_addr = $addr)
      AND ts_start >= $since AND ts_start < $stop AND ts_end >= $start AND FLOW_END >= $start
      AND "date" BETWEEN $first_day AND $last_day
)
SELECT
    (SELECT count(*) FROM w) AS flows,
    (SELECT coalesce(sum(bytes), 0) FROM w) AS bytes,
    (SELECT coalesce(sum(packets), 0) FROM w) AS packets,
    (SELECT count(*) FILTER (WHERE outbound) FROM w) AS flows_out,
    (SELECT count(*) FILTER (WHERE NOT outbound) FROM w) AS flows_in,
    (SELECT coalesce(sum(bytes) FILTER (WHERE outbound), 0) FROM w) AS bytes_out,
    (SELECT coalesce(sum(bytes) FILTER (WHERE NOT outbound), 0) FROM w) AS bytes_in,
    (SELECT count(DISTINCT peer) FROM w) AS peers,
    (SELECT list({'peer': peer, 'flows': n, 'bytes': b} ORDER BY n DESC, b DESC, peer) FROM (
        SELECT peer, count(*) AS n, coalesce(sum(bytes), 0) AS b FROM w GROUP BY peer
        ORDER BY n DESC, b DESC, peer LIMIT $top)) AS top_peers,
    (SELECT list({'proto': proto, 'port': dst_port, 'flows': n, 'bytes': b} ORDER BY n DESC, b DESC, dst_port, proto) FROM (
        SELECT proto, dst_port, count(*) AS n, coalesce(sum(bytes), 0) AS b FROM w GROUP BY proto, dst_port
        ORDER BY n DESC, b DESC, dst_port, proto LIMIT $top)) AS top_ports
""".replace("FLOW_END", FLOW_END)


def flows_since(start: dt.datetime) -> dt.datetime:
    """The earliest start of a flow that can reach into a window beginning at `start` (FLOW_END)."""
    return start - MAX_FLOW_DURATION


def flow_summary(
    con: duckdb.DuckDBPyConnection,
    addr: str,
    start: dt.datetime,
    stop: dt.datetime,
    top: int = 5,
    since: dt.datetime | None = None,
) -> dict[str, Any]:
    """Flows of `addr` (either end) that reach into [start, stop) (FLOW_END), begun at or after `since` (the
    start of the lease asked about: a flow begun before it was another holder's) and at most MAX_FLOW_DURATION
    before `start`: counts, bytes, top peers and ports. `begun_from` in the answer: the earliest start counted."""
    since = flows_since(start) if since is None else max(since, flows_since(start))
    params = {
        "addr": addr,
        "start": start,
        "stop": stop,
        "since": since,
        "first_day": _day(since),
        "last_day": _day(stop),
        "top": top,
    }
    summary = _rows(con.execute(_FLOW_WINDOW_SQL, params))[0]
    summary["top_peers"] = summary["top_peers"] or []
    summary["top_ports"] = summary["top_ports"] or []
    return {"from": start, "to": stop, "begun_from": since, **summary}


def who_days(at: dt.datetime, window: dt.timedelta) -> tuple[dt.date, dt.date]:
    """The days of flows `who` reads (connect days): those of at ± window, and of the flows begun before that
    can reach into it (flows_since)."""
    return _day(flows_since(at - window)), _day(at + window)


def held_span(
    leases: list[dict[str, Any]], start: dt.datetime, stop: dt.datetime
) -> tuple[dt.datetime, dt.datetime]:
    """[start, stop) cut to the time the lease(s) asked about held the address: the flows summed under a VM
    are its own, not those of whoever held the address before or after it inside the window (a handover
    within `who`'s ±1 h summed two tenants' traffic under the one asked about). No lease: unchanged (the
    address's flows then belong to nobody)."""
    if not leases:
        return start, stop
    held_from = min(lease["valid_from"] for lease in leases)
    ends = [lease["valid_to"] for lease in leases]
    held_to = None if any(end is None for end in ends) else max(ends)
    return max(start, held_from), stop if held_to is None else min(stop, held_to)


@dataclass
class WhoAnswer:
    """What `who` found for one address at one time. "Nobody held it" is an answer (held False, exit code 0):
    the previous and next leases then say who had it around that time. Bad input raises UsageError (2), a
    missing lake LakeError (4)."""

    addr: str
    at: dt.datetime
    window: dt.timedelta
    leases: list[dict[str, Any]] = field(default_factory=list)
    previous_lease: dict[str, Any] | None = None
    next_lease: dict[str, Any] | None = None
    flows: dict[str, Any] = field(default_factory=dict)
    exit_code: int = EXIT_OK
    notes: list[str] = field(default_factory=list)  # (what the lake cannot say of that time: coverage_notes)

    @property
    def held(self) -> bool:
        return bool(self.leases)

    def to_dict(self) -> dict[str, Any]:
        return {
            "addr": self.addr,
            "at": self.at,
            "window_seconds": self.window.total_seconds(),
            "held": self.held,
            "leases": self.leases,
            "previous_lease": self.previous_lease,
            "next_lease": self.next_lease,
            "flows": self.flows,
            "notes": self.notes,
            "exit_code": self.exit_code,
        }


def coverage(lake: Lake) -> dict[str, dt.datetime | None]:
    """The time the lake's records cover, from the log's file statistics (no data read): the first lifecycle
    event (`events_from`: before it, who held an address is not known, however "nobody" it looks) and the
    first and last flow (`flows_from`, `flows_to`). None where a table is empty or its statistics are missing."""

    def bound(name: str, column: str, pick: Any) -> dt.datetime | None:
        stats = (
            [(e.mins if pick is min else e.maxs).get(column) for e in lake.entries(name) if e.rows]
            if lake.table(name) is not None
            else []
        )
        values = [to_utc(v) for v in stats if isinstance(v, dt.datetime)]
        return pick(values) if values else None

    return {
        "events_from": bound("vm_events", "ts", min),
        "flows_from": bound("flows", "ts_start", min),
        "flows_to": bound("flows", "ts_end", max),
    }


def lifecycle_note(covered: dict[str, dt.datetime | None], start: dt.datetime) -> str | None:
    """What the lake cannot say of who held an address at `start` (coverage): before its lifecycle records
    begin, "nobody" is not known (a CSIRT review: "nobody held" was said of a day the lake knew nothing of)."""
    events_from = covered.get("events_from")
    if events_from is None:
        return "the lake holds no VM lifecycle records: who held the address is not known"
    if start < events_from:
        return (
            f"the lake's VM lifecycle records begin {events_from:%Y-%m-%d %H:%M:%S} UTC: who held the address "
            "before then is not known (no record is not nobody)"
        )
    return None


def flows_note(covered: dict[str, dt.datetime | None], start: dt.datetime, end: dt.datetime) -> str | None:
    """What the lake cannot say of the flows of [start, end] (coverage): none were ingested for that time."""
    flows_from, flows_to = covered.get("flows_from"), covered.get("flows_to")
    if flows_from is None or flows_to is None:
        return "the lake holds no flows"
    if end < flows_from or start > flows_to:
        return (
            f"the lake holds no flows of this time: its flows span {flows_from:%Y-%m-%d %H:%M} - "
            f"{flows_to:%Y-%m-%d %H:%M} UTC"
        )
    return None


def who(lake: Lake, addr: str, at: dt.datetime, window: dt.timedelta = dt.timedelta(hours=1)) -> WhoAnswer:
    """Who held `addr` at `at`: the lease(s) valid then with what the VM is now, the leases just before and
    after (useful when nobody held it), and the address's flows that reach into at ± window, cut to the time
    the lease(s) held it (held_span; flows begun since the lease began). All input is bound."""
    addr = parse_addr(addr)
    lake.require()
    # (flow_summary reads flows of these days only: who_days)
    days = who_days(at, window)
    with reading(lake.root), contextlib.closing(connect(lake, days=days)) as con:
        leases = _rows(con.execute("SELECT * FROM who_had($addr, $at)", {"addr": addr, "at": at}))
        for lease in leases:
            lease["now"] = vm_now(lease["vm_status"], lease["deleted_at"], lease["quarantine_until"])
            lease["after_reclaim"] = after_reclaim(lease, at)
        before = _rows(
            con.execute(
                "SELECT vm_id, vm_name, project, valid_from, valid_to FROM vm_leases "
                "WHERE addr = $addr AND valid_to <= $at ORDER BY valid_to DESC LIMIT 1",
                {"addr": addr, "at": at},
            )
        )
        after = _rows(
            con.execute(
                "SELECT vm_id, vm_name, project, valid_from, valid_to FROM vm_leases "
                "WHERE addr = $addr AND valid_from > $at ORDER BY valid_from LIMIT 1",
                {"addr": addr, "at": at},
            )
        )
        held_from = min((lease["valid_from"] for lease in leases), default=None)
        start, stop = held_span(leases, at - window, at + window)
        if not leases:
            # nobody held it: the time nobody did, not the neighbours' (a review: "nobody held" then "34 flows",
            # all of the VM that held it until minutes before)
            if before and before[0]["valid_to"] is not None:
                start = held_from = max(start, before[0]["valid_to"])
            if after:
                stop = min(stop, after[0]["valid_from"])
        flows = flow_summary(con, addr, start, stop, since=held_from)
    covered = coverage(lake)
    # (a lease found: the records say who; else whether they reach back to `at` at all)
    notes = [
        n for n in (None if leases else lifecycle_note(covered, at), flows_note(covered, start, stop)) if n
    ]
    return WhoAnswer(
        addr=addr,
        at=at,
        window=window,
        leases=leases,
        previous_lease=before[0] if before else None,
        next_lease=after[0] if after else None,
        flows=flows,
        notes=notes,
    )


def resolve_vm(con: duckdb.DuckDBPyConnection, vm: str) -> str:
    """A vm_id, or a name that one VM (in vms or vm_leases) carries -> vm_id; UsageError if none or several."""
    if re.search(r"[\ud800-\udfff]", vm):
        # bytes of the command line that are not UTF-8: no name in the lake can be them
        raise UsageError(f"VM {vm!r} is not UTF-8 text; no VM in the lake has that id or name")
    if con.execute("SELECT 1 FROM _vm_info WHERE vm_id = $vm LIMIT 1", {"vm": vm}).fetchall():
        return vm
    ids = [
        row[0]
        for row in con.execute(
            "SELECT DISTINCT vm_id FROM (SELECT vm_id, vm_name FROM _vm_info UNION ALL "
            "SELECT vm_id, vm_name FROM vm_events) WHERE vm_name = $vm ORDER BY vm_id",
            {"vm": vm},
        ).fetchall()
    ]
    if not ids:
        raise UsageError(
            f'no VM with id or name {vm!r} in the lake; try `tracepipe sql "SELECT vm_id, vm_name FROM vms"`'
        )
    if len(ids) > 1:
        raise UsageError(f"{len(ids)} VMs are named {vm!r} ({', '.join(ids)}); give the vm_id")
    return ids[0]


@dataclass
class Timeline:
    """Everything the lake knows about one VM. A VM that no id or name matches (or a name several VMs carry)
    is a usage error (UsageError, 2), a missing lake LakeError (4); otherwise exit code 0."""

    vm_id: str
    vm: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    leases: list[dict[str, Any]] = field(default_factory=list)
    flows_per_hour: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def timeline(lake: Lake, vm: str, limit: int = 200) -> Timeline:
    """Everything the lake knows about one VM (vm_id or unique name): what it is now, lifecycle events,
    leases, flows per hour while it held its addresses, and its syslog lines (first `limit` of each list)."""
    if limit < 1:
        raise UsageError(f"limit {limit} is out of range: give 1 or more rows per section")
    lake.require()
    with reading(lake.root), contextlib.closing(connect(lake)) as con:
        vm_id = resolve_vm(con, vm)
        params = {"vm": vm_id, "limit": limit}
        info = _rows(
            con.execute(
                "SELECT v.*, x.created_at, x.last_event_at, x.cloud FROM _vm_info v "
                "LEFT JOIN vms x USING (vm_id) WHERE vm_id = $vm",
                {"vm": vm_id},
            )
        )[0]
        info["now"] = vm_now(info["status"], info["deleted_at"], info["quarantine_until"])
        events = _rows(
            con.execute(
                "SELECT ts, action, state, event_type, addrs, addr, addr_kind, hypervisor, image, source, line "
                "FROM vm_events WHERE vm_id = $vm ORDER BY ts, event_type, action, source, line LIMIT $limit",
                params,
            )
        )
        leases = _rows(
            con.execute(
                "SELECT addr, addr_kind, valid_from, valid_to, end_reason FROM vm_leases WHERE vm_id = $vm "
                "ORDER BY valid_from, addr",
                {"vm": vm_id},
            )
        )
        flows = _vm_flows_per_hour(con, vm_id, leases, limit)
        logs = _rows(
            con.execute(
                "SELECT ts, hostname, app, severity, auth_event, auth_user, auth_src_addr, message FROM vm_logs "
                "WHERE vm_id = $vm ORDER BY ts, source, line LIMIT $limit",
                params,
            )
        )
    return Timeline(vm_id=vm_id, vm=info, events=events, leases=leases, flows_per_hour=flows, logs=logs)


def _vm_flows_per_hour(
    con: duckdb.DuckDBPyConnection, vm_id: str, leases: list[dict[str, Any]], limit: int
) -> list[dict[str, Any]]:
    """Flows per hour of one VM, read only from the days and addresses of its leases (partition pruning)."""
    if not leases:
        return []
    first = min(lease["valid_from"] for lease in leases)
    last = max(lease["valid_to"] or dt.datetime.now(dt.UTC) for lease in leases)
    addrs = sorted({lease["addr"] for lease in leases})
    return _rows(
        con.execute(
            """
        SELECT date_trunc('hour', ts_start) AS hour,
               count(*) FILTER (WHERE src_vm = $vm) AS flows_out,
               count(*) FILTER (WHERE dst_vm = $vm) AS flows_in,
               coalesce(sum(bytes) FILTER (WHERE src_vm = $vm), 0) AS bytes_out,
               coalesce(sum(bytes) FILTER (WHERE dst_vm = $vm), 0) AS bytes_in,
               count(DISTINCT CASE WHEN src_vm = $vm THEN dst_addr ELSE src_addr END) AS peers
        FROM flows_attributed
        WHERE (src_vm = $vm OR dst_vm = $vm)
          AND (list_contains($addrs, src_addr) OR list_contains($addrs, dst_addr))
          AND "date" BETWEEN $first_day AND $last_day
        GROUP BY hour ORDER BY hour LIMIT $limit
        """,
            {"vm": vm_id, "addrs": addrs, "first_day": _day(first), "last_day": _day(last), "limit": limit},
        )
    )


# ---- results out of `tracepipe sql` ---------------------------------------------------------------------------


EXPORT_FORMATS = ("csv", "json", "parquet")


def check_output(fmt: str, output: Path | None, lake_root: Path, force: bool = False) -> None:
    """Refuse (UsageError) an export that could not be written or must not be: parquet without a file, a
    table into a file (the table is for a terminal), any file inside the lake — a typing mistake or a path
    someone planted (a symlink into the lake) must never overwrite the lake's files; both paths are resolved
    (symlinks followed) before they are compared — and, without `force`, a file (or symlink) already there."""
    if fmt not in (*EXPORT_FORMATS, "table"):
        raise UsageError(f"unknown format {fmt!r}: table, csv, json or parquet")
    if output is None:
        if fmt == "parquet":
            raise UsageError("--format parquet needs --output FILE")
        return
    if fmt == "table":
        raise UsageError(
            f"--output {output}: a table is for the terminal; to write a file give --format csv, json or parquet"
        )
    target = Path(output).resolve()
    lake = Path(lake_root).resolve()
    if target == lake or target.is_relative_to(lake):
        raise UsageError(
            f"--output {output} is inside the lake ({lake}); tracepipe sql never writes there: "
            "choose a file outside the lake directory"
        )
    if not force and os.path.lexists(output):
        raise UsageError(
            f"--output {output} already exists; add --force to replace it, or choose another file"
        )


def spreadsheet_safe(table: pa.Table) -> pa.Table:
    """`table` for a CSV someone may open in a spreadsheet: text cells starting with = + - @ TAB or CR (a formula
    to Excel and LibreOffice: a VM name, user or log line is the attacker's to choose) get a leading ' (OWASP's
    advice), which spreadsheets show as text and hide. Other cells, and every value of JSON or Parquet output,
    stay exact."""
    import pyarrow.compute as pc

    for index, name in enumerate(table.column_names):
        column = table.column(name)
        if pa.types.is_dictionary(column.type) and pa.types.is_string(column.type.value_type):
            column = column.cast(pa.string())
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            guarded = pc.if_else(
                pc.match_substring_regex(column, r"^[=+\-@\t\r]"),
                pc.binary_join_element_wise("'", column, ""),
                column,
            )
            table = table.set_column(index, name, guarded)
    return table


def export_result(
    relation: duckdb.DuckDBPyRelation, fmt: str, output: Path | None, lake_root: Path, force: bool = False
) -> str | None:
    """A query result as csv or json text: returned when `output` is None, else written to `output` (a user's
    file outside the lake, see check_output) through fsutil.replacing — a reader of `output` sees the old file
    or the whole new one, and a symlink planted at `output` is replaced, not followed. Parquet needs `output`.
    Written with pyarrow, because the session itself may not write files."""
    from tracepipe.fsutil import replacing

    check_output(fmt, output, lake_root, force)
    if fmt == "csv":
        relation = _nested_as_json(relation)
    with reading(lake_root, user_sql=True):
        table = relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
    text: str | None = None
    if fmt == "csv":
        import io

        import pyarrow.csv as pacsv

        buffer = io.BytesIO()
        try:
            pacsv.write_csv(spreadsheet_safe(table), buffer)
        except pa.ArrowException as exc:
            raise UsageError(
                f"cannot write this result as CSV: {exc}; cast the column to text in the query "
                "(CAST(x AS VARCHAR)) or use --format json or parquet"
            ) from exc
        text = buffer.getvalue().decode("utf-8")
    elif fmt == "json":
        import json

        text = json.dumps(table.to_pylist(), indent=2, default=str) + "\n"
    if output is None:
        return text
    try:
        with replacing(Path(output)) as tmp:
            if text is not None:
                tmp.write_text(text, encoding="utf-8")
            else:
                import pyarrow.parquet as pq

                pq.write_table(table, tmp, compression="zstd")
    except OSError as exc:
        folder = Path(output).parent
        hint = (
            ""
            if folder.is_dir()
            else f" (folder {folder} does not exist: create it or choose another --output)"
        )
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}{hint}") from exc
    return None


def _nested_as_json(relation: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """`relation` with its list, array, struct and map columns as JSON text (a CSV cell holds text: pyarrow
    refuses nested columns), computed by DuckDB; other columns as they are."""

    def nested(duck_type: str) -> bool:
        return duck_type.endswith("]") or duck_type.startswith(("STRUCT", "MAP", "UNION"))

    types = [str(t) for t in relation.types]
    if not any(nested(t) for t in types):
        return relation
    columns = []
    for name, duck_type in zip(relation.columns, types, strict=True):
        quoted = '"' + name.replace('"', '""') + '"'
        columns.append(f"to_json({quoted})::VARCHAR AS {quoted}" if nested(duck_type) else quoted)
    return relation.project(", ".join(columns))


def shell(lake: Lake, show: Any, read_line: Any = input) -> None:
    """A small interactive session with the same views: statements end with ';', `.quit` or EOF ends.
    Each result goes to `show(relation)`, each refusal or error to `show(exc)`."""
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    lake.require()
    with reading(lake.root):
        con = connect(lake)
    buffer: list[str] = []
    try:
        while True:
            try:
                line = read_line("tracepipe> " if not buffer else "      ...> ")
            except EOFError:
                break
            if not buffer and line.strip() in (".quit", ".exit", "\\q"):
                break
            buffer.append(line)
            text = "\n".join(buffer).strip()
            if not text.endswith(";"):
                continue
            buffer.clear()
            try:
                # show() fetches the rows: a query that fails only then (error('x'), a bad CAST) is shown
                # like one that fails at once, and the session goes on
                with reading(lake.root, user_sql=True):
                    for statement in check_read_only(con, text):  # (a line of several: each result shown)
                        show(run_read_only(con, statement.query, lake.root))
            except TracepipeError as exc:
                show(exc)
    finally:
        con.close()
