"""query.py: views over real Parquet (empty lakes included), the address macros against Python's ipaddress,
and `tracepipe sql` (formats, stdin, -f, --shell) refusing everything that is not a query."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_in_process

from tracepipe import query
from tracepipe.errors import UsageError
from tracepipe.lake import Lake, ingest_table
from tracepipe.schema import DATASETS, FLOWS, VM_LEASES, VMS

T0 = dt.datetime(2024, 3, 12, 7, 0, tzinfo=dt.UTC)


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The command's exit code and output: in this process (conftest.run_in_process) unless it reads stdin."""
    if stdin is None:
        return run_in_process(*args)
    return subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin if stdin is not None else "",
    )


@pytest.fixture(scope="module")
def small_lake(tmp_path_factory) -> Path:
    """Two leases on one address, a v6 lease, and a handful of flows, landed through the lake API."""
    root = tmp_path_factory.mktemp("lake")
    lake = Lake(root)
    lake.replace_dataset(
        "vm_leases",
        pa.Table.from_pylist(
            [
                {
                    "addr": "10.0.0.5",
                    "vm_id": "vm-a",
                    "vm_name": "alpha",
                    "project": "p1",
                    "user": "ann",
                    "valid_from": T0,
                    "valid_to": T0 + dt.timedelta(hours=1),
                },
                {
                    "addr": "2001:db8::5",
                    "vm_id": "vm-a",
                    "vm_name": "alpha",
                    "project": "p1",
                    "user": "ann",
                    "valid_from": T0,
                    "valid_to": None,
                },
            ],
            schema=VM_LEASES,
        ),
    )
    lake.replace_dataset(
        "vms",
        pa.Table.from_pylist(
            [
                {"vm_id": "vm-a", "vm_name": "alpha", "project": "p1", "user": "ann", "status": "active"},
            ],
            schema=VMS,
        ),
    )
    flows = pa.Table.from_pylist(
        [
            {
                "ts_start": T0 + dt.timedelta(minutes=m),
                "ts_end": T0 + dt.timedelta(minutes=m + 1),
                "src_addr": src,
                "dst_addr": "198.51.100.1",
                "dst_port": 443,
                "proto": 6,
                "packets": 2,
                "bytes": 100 * (i + 1),
            }
            for i, (m, src) in enumerate(
                [(10, "10.0.0.5"), (20, "10.0.0.5"), (90, "10.0.0.5"), (30, "2001:db8::5")]
            )
        ],
        schema=FLOWS,
    )
    ingest_table(lake, "flows", "test", "flows-1", [flows])
    return root


def test_views_exist_typed_on_an_empty_lake(tmp_path):
    con = query.connect(Lake(tmp_path))
    for name, dataset in DATASETS.items():
        columns = [row[0] for row in con.sql(f"DESCRIBE {name}").fetchall()]
        expected = [f.name for f in dataset.schema] + (["date"] if dataset.partition_ts else [])
        assert columns == expected, name
        assert con.sql(f"SELECT count(*) FROM {name}").fetchall() == [(0,)]
    types = dict((row[0], row[1]) for row in con.sql("DESCRIBE flows_attributed").fetchall())
    assert types["ts_start"] == "TIMESTAMP WITH TIME ZONE" and types["date"] == "DATE"
    assert [c for c in types if c.startswith("dst_")][-6:] == [
        "dst_vm_name",
        "dst_project",
        "dst_user",
        "dst_hypervisor",
        "dst_vm_status",
        "dst_image",
    ]
    assert con.execute("SELECT * FROM who_had(?, ?)", ["10.0.0.5", T0]).fetchall() == []


def test_missing_lake_is_a_clear_error(tmp_path):
    result = run_cli("sql", "SELECT 1", "--lake", str(tmp_path / "nope"))
    assert result.returncode == 4
    assert "no lake at" in result.stderr


def test_date_is_a_hive_partition_typed_date(small_lake):
    con = query.connect(Lake(small_lake))
    assert con.sql("SELECT DISTINCT date FROM flows").fetchall() == [(dt.date(2024, 3, 12),)]
    assert con.sql("SELECT count(*) FROM flows WHERE date = DATE '2024-03-12'").fetchall() == [(4,)]


CIDR_CASES = [
    ("10.0.0.0/8", "10.1.2.3", True),
    ("10.0.0.0/8", "11.0.0.0", False),
    ("10.1.2.3/8", "10.200.0.1", True),  # host bits in the network part are ignored
    ("0.0.0.0/0", "255.255.255.255", True),
    ("1.2.3.4/32", "1.2.3.4", True),
    ("1.2.3.4/32", "1.2.3.5", False),
    ("1.2.3.4", "1.2.3.4", True),  # bare address = host route
    ("192.168.1.0/31", "192.168.1.1", True),
    ("192.168.1.0/31", "192.168.1.2", False),
    ("::/0", "2001:db8::1", True),
    ("::/0", "10.0.0.1", False),  # families differ
    ("0.0.0.0/0", "::1", False),
    ("2001:db8::/32", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", True),
    ("2001:db8::/32", "2001:db9::", False),
    ("2001:db8::1/128", "2001:db8::1", True),
    ("2001:db8::1/128", "2001:db8::2", False),
    ("2001:DB8::/32", "2001:db8::5", True),
    ("::ffff:0:0/96", "::ffff:1.2.3.4", True),
    ("fe80::/10", "febf::1", True),
    ("fe80::/10", "fec0::1", False),
    ("10.0.0.0/33", "10.0.0.1", None),
    ("2001:db8::/129", "2001:db8::1", None),
    ("10.0.0.0/-1", "10.0.0.1", None),
    ("10.0.0.0/x", "10.0.0.1", None),
    ("bogus/8", "10.0.0.1", None),
    ("10.0.0.0/8", "10.0.0.256", None),
    ("2001:db8::/32", "2001:db8::1::2", None),
    (None, "10.0.0.1", None),
]


@pytest.fixture(scope="module")
def macros(tmp_path_factory):
    """One connection with tracepipe's macros for the pure-function cases (opening one costs ~0.7 s)."""
    return query.connect(Lake(tmp_path_factory.mktemp("macros")))


@pytest.mark.parametrize(("cidr", "addr", "expected"), CIDR_CASES)
def test_cidr_contains(macros, cidr, addr, expected):
    assert macros.execute("SELECT cidr_contains(?, ?)", [cidr, addr]).fetchall() == [(expected,)]


def test_ip_to_num_agrees_with_ipaddress(tmp_path):
    rng = random.Random(4)
    addrs = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(300)]
    addrs += [
        str(ipaddress.IPv6Address(rng.getrandbits(128) >> rng.choice([0, 16, 64, 96, 112])))
        for _ in range(300)
    ]
    addrs += [
        "::",
        "::1",
        "1::",
        "1:2:3:4:5:6:7::",
        "::2:3:4:5:6:7:8",
        "::ffff:10.0.0.1",
        "64:ff9b::c000:201",
    ]
    con = query.connect(Lake(tmp_path))
    got = con.execute(
        "SELECT a, ip_to_num(a)::VARCHAR, ip_family(a) FROM unnest(?::VARCHAR[]) t(a)", [addrs]
    ).fetchall()
    for text, number, family in got:
        parsed = ipaddress.ip_address(text)
        assert (int(number), family) == (int(parsed), parsed.version), text
    bad = ["1.2.3", "1.2.3.4.5", "256.0.0.1", "1:2:3", "1:::2", "12345::", "gg::", "", "x"]
    assert con.execute("SELECT list(ip_to_num(a)) FROM unnest(?::VARCHAR[]) t(a)", [bad]).fetchall() == [
        ([None] * len(bad),)
    ]


def test_ip_canonical_agrees_with_what_the_lake_stores(tmp_path):
    """The SQL macro gives the text units.canonical_addr gives (what every reader lands), for random addresses
    in every written form, IPv4-mapped ones and RFC 5952's ties; NULL where Python refuses."""
    from tracepipe.units import canonical_addr

    rng = random.Random(7)
    forms = []
    for _ in range(400):
        groups = [rng.choice([0, 0, 0, 1, 0xFFFF, rng.randrange(65536)]) for _ in range(8)]
        ip = ipaddress.IPv6Address(b"".join(g.to_bytes(2, "big") for g in groups))
        forms += [ip.exploded, ip.compressed, ip.exploded.upper(), f" {ip} "]
    forms += ["::", "::1", "1::", "1:0:0:1:0:0:0:1", "1:0:0:0:1:0:0:1", "0:0:1:0:0:1:0:0", "1:0:1:0:1:0:1:0"]
    forms += ["::ffff:10.1.2.3", "::FFFF:a01:203", "::1.2.3.4", "64:ff9b::1.2.3.4", "10.1.2.3", "0.0.0.0"]
    forms += ["192.168.000.001", "10.1.2", "1.2.3.4.5", "10.1.2.300", "1::2::3", "12345::", "junk", ""]
    expected = []
    for text in forms:
        try:
            expected.append(canonical_addr(text))
        except ValueError:
            expected.append(None)
    con = query.connect(Lake(tmp_path))
    got = con.execute("SELECT list(ip_canonical(a) ORDER BY i) FROM (SELECT unnest(?::VARCHAR[]) AS a, "
                      "unnest(range(?)) AS i)", [forms, len(forms)]).fetchall()[0][0]  # fmt: skip
    assert got == expected


def test_cidr_filter_over_flows_view(small_lake):
    con = query.connect(Lake(small_lake))
    rows = con.execute(
        "SELECT src_addr, count(*) FROM flows WHERE cidr_contains(?, src_addr) GROUP BY 1", ["2001:db8::/64"]
    ).fetchall()
    assert rows == [("2001:db8::5", 1)]
    assert con.execute(
        "SELECT ip_between('10.0.0.5', '10.0.0.0', '10.0.0.255'), "
        "ip_between('10.0.1.5', '10.0.0.0', '10.0.0.255'), ip_between('::5', '10.0.0.0', '::ff')"
    ).fetchall() == [(True, False, False)]


def test_who_had_binds_and_answers(small_lake):
    con = query.connect(Lake(small_lake))
    held = con.execute(
        "SELECT vm_id, vm_name, project, vm_status FROM who_had(?, ?)",
        ["10.0.0.5", T0 + dt.timedelta(minutes=30)],
    ).fetchall()
    assert held == [("vm-a", "alpha", "p1", "active")]
    assert (
        con.execute("SELECT * FROM who_had(?, ?)", ["10.0.0.5", T0 + dt.timedelta(hours=1)]).fetchall() == []
    )
    assert con.execute("SELECT count(*) FROM who_had(?, ?)", ["10.0.0.5' OR '1'='1", T0]).fetchall() == [(0,)]
    # an address as people type it (before: no row for any form but the lake's own text; `who` found them)
    at = T0 + dt.timedelta(minutes=30)
    for typed in ("2001:DB8::5", "2001:db8:0:0:0:0:0:5", "2001:0db8::0005", " 2001:db8::5"):
        assert con.execute("SELECT vm_id FROM who_had(?, ?)", [typed, at]).fetchall() == [("vm-a",)], typed
    assert con.execute("SELECT vm_id FROM who_had(?, ?)", ["::ffff:10.0.0.5", at]).fetchall() == [("vm-a",)]


def lake_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    "statement",
    [
        "COPY flows TO '{lake}/flows/date=2024-03-12/evil.parquet' (FORMAT parquet)",
        "COPY (SELECT 1 AS a) TO '{lake}/vms/part-0.parquet' (FORMAT parquet)",
        "CREATE TABLE t AS SELECT * FROM flows",
        "DELETE FROM flows",
        "INSERT INTO vms SELECT * FROM vms",
        "ATTACH '{lake}/x.duckdb' AS x",
        "SET enable_external_access = true",
        "EXPLAIN ANALYZE COPY flows TO '{lake}/y.csv'",
        "SELECT 1; DROP VIEW flows",
        "EXPORT DATABASE '{lake}/dump'",
        "INSTALL inet",
    ],
)
def test_sql_refuses_writes_and_leaves_the_lake_unchanged(small_lake, statement):
    before = lake_digest(small_lake)
    result = run_cli("sql", statement.format(lake=small_lake), "--lake", str(small_lake))
    assert result.returncode == 2, result.stderr
    assert "read-only" in result.stderr and "refused" in result.stderr
    assert lake_digest(small_lake) == before


def test_sql_session_reads_only_the_lake(small_lake):
    con = query.connect(Lake(small_lake))
    with pytest.raises(UsageError, match=r"disabled by configuration|Permission"):
        query.run_read_only(con, "SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(UsageError, match="SET statements are refused"):
        query.run_read_only(con, "SET lock_configuration = false")


def test_spill_directory_is_private_and_a_planted_symlink_leads_nowhere(small_lake, tmp_path):
    """Issue #12 item 7: DuckDB's temp directory was a fixed `tracepipe-duckdb` under the shared temp dir and
    on the allowed list; a symlink planted there (here: under the TMPDIR the command runs with) let read_text
    leave the lake. Now each session spills into a new 0700 directory of its own, removed afterwards."""
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "secret.txt").write_text("s3cret")
    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir()
    (shared_tmp / "tracepipe-duckdb").symlink_to(secret)
    read = f"SELECT content FROM read_text('{shared_tmp}/tracepipe-duckdb/secret.txt')"
    proc = subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", "sql", read, "--format", "json", "--lake", str(small_lake)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(shared_tmp)},
    )
    assert proc.returncode == 2 and "s3cret" not in proc.stdout, proc.stdout
    assert "Permission" in proc.stderr or "disabled" in proc.stderr, proc.stderr
    assert sorted(p.name for p in shared_tmp.iterdir()) == ["tracepipe-duckdb"]  # the session's own is gone
    con = query.connect(Lake(small_lake))
    spill = Path(con.execute("SELECT current_setting('temp_directory')").fetchone()[0])
    assert spill.is_dir() and not spill.is_symlink() and spill.name.startswith("tracepipe-duckdb-")
    assert spill.stat().st_mode & 0o777 == 0o700
    other = query.connect(Lake(small_lake))
    assert other.execute("SELECT current_setting('temp_directory')").fetchone()[0] != str(spill)
    con.close()
    del con
    assert not spill.exists()
    other.close()


def test_lake_path_with_glob_characters_reads_its_own_files_only(tmp_path):
    """Issue #12 item 5: read_parquet takes each name as a glob, so the files of a lake at `lake[1]` were
    looked up by a pattern that matches `lake1` and not `lake[1]` itself: a directory planted beside the lake
    with the same file names took the lake's place. Names are now glob-escaped (and quoted)."""
    real = tmp_path / "it's lake[1]*?"
    lake = Lake(real)
    rows = pa.table({"vm_id": ["real-vm"], "vm_name": ["real"]})
    lake.replace_dataset("vms", rows)
    decoy = tmp_path / "it's lake1zy"  # what the unescaped pattern `lake[1]*?` matches
    shutil.copytree(real, decoy)
    for part in (decoy / "vms").glob("*.parquet"):
        real_rows = pq.read_table(part)
        pq.write_table(real_rows.set_column(0, "vm_id", pa.array(["forged-vm"])), part)
    con = query.connect(lake)
    try:
        assert con.execute("SELECT vm_id FROM vms").fetchall() == [("real-vm",)]
    finally:
        con.close()
    assert query.glob_literal("/a[1]/b*?c") == "/a[[]1]/b[*][?]c"


def test_sql_formats_stdin_and_file(small_lake, tmp_path):
    sql = "SELECT src_addr, src_vm_name, bytes FROM flows_attributed ORDER BY bytes"
    as_json = run_cli("sql", sql, "--format", "json", "--lake", str(small_lake))
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == [
        {"src_addr": "10.0.0.5", "src_vm_name": "alpha", "bytes": 100},
        {"src_addr": "10.0.0.5", "src_vm_name": "alpha", "bytes": 200},
        {"src_addr": "10.0.0.5", "src_vm_name": None, "bytes": 300},  # 08:30, after the lease ended
        {"src_addr": "2001:db8::5", "src_vm_name": "alpha", "bytes": 400},
    ]
    as_csv = run_cli("sql", "-", "--format", "csv", "--lake", str(small_lake), stdin=sql)
    assert as_csv.stdout.splitlines()[0] == '"src_addr","src_vm_name","bytes"'
    assert as_csv.stdout.splitlines()[3] == '"10.0.0.5",,300'
    script = tmp_path / "q.sql"
    script.write_text(
        "-- comment\nSELECT count(*) AS n FROM flows WHERE cidr_contains('10.0.0.0/8', src_addr);\n"
    )
    out = tmp_path / "out.parquet"
    as_parquet = run_cli(
        "sql", "-f", str(script), "--format", "parquet", "--output", str(out), "--lake", str(small_lake)
    )
    assert as_parquet.returncode == 0, as_parquet.stderr
    assert pq.read_table(out).to_pylist() == [{"n": 3}]
    table = run_cli("sql", "SELECT vm_id, status FROM vms", "--lake", str(small_lake))
    assert "vm-a" in table.stdout and "active" in table.stdout
    missing_output = run_cli("sql", "SELECT 1", "--format", "parquet", "--lake", str(small_lake))
    assert missing_output.returncode == 2 and "--output" in missing_output.stderr
    bad = run_cli("sql", "SELECT nope FROM flows", "--lake", str(small_lake))
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_sql_output_is_written_atomically_and_replaced(small_lake, tmp_path):
    out = tmp_path / "out.csv"
    out.write_text("old content\n")
    sql = "SELECT src_addr, bytes FROM flows ORDER BY bytes DESC, src_addr LIMIT 2"
    kept = run_cli("sql", sql, "--format", "csv", "--output", str(out), "--lake", str(small_lake))
    assert kept.returncode == 2 and "already exists; add --force" in kept.stderr, kept.stderr
    assert out.read_text() == "old content\n"
    written = run_cli("sql", sql, "--format", "csv", "-o", str(out), "--force", "--lake", str(small_lake))
    assert written.returncode == 0 and written.stdout == "", written.stderr
    assert out.read_text().splitlines()[0] == '"src_addr","bytes"'
    # a symlink planted at a guessable temp name, pointing into the lake, is never written through (the temp
    # file is created exclusively under a random name) and is left as it was
    victim = Lake(small_lake).files("flows")[0]
    before = victim.read_bytes()
    out_parquet = tmp_path / "out.parquet"
    (tmp_path / "out.parquet.tmp").symlink_to(victim)
    as_parquet = run_cli("sql", sql, "--format", "parquet", "-o", str(out_parquet), "--lake", str(small_lake))
    assert as_parquet.returncode == 0, as_parquet.stderr
    assert len(pq.read_table(out_parquet).to_pylist()) == 2
    assert victim.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "out.parquet", "out.parquet.tmp"]
    assert (tmp_path / "out.parquet.tmp").is_symlink()


def test_sql_never_writes_inside_the_lake(small_lake, tmp_path):
    victim = Lake(small_lake).files("flows")[0]
    before = {p: p.read_bytes() for p in small_lake.rglob("*") if p.is_file()}
    link = tmp_path / "innocent-looking"
    link.symlink_to(victim.parent)  # a directory someone planted that leads into the lake
    file_link = tmp_path / "result.parquet"
    file_link.symlink_to(victim)  # a file name someone planted that is a lake file
    dangling = tmp_path / "later.csv"
    dangling.symlink_to(victim.parent / "new.parquet")  # into the lake, to a file that is not there yet
    for target in (victim, small_lake / "new.csv", link / "x.csv", small_lake, file_link, dangling):
        refused = run_cli(
            "sql", "SELECT 1 AS n", "--format", "csv", "-o", str(target), "--force", "--lake", str(small_lake)
        )
        assert refused.returncode == 2, (target, refused.stderr)
        assert "is inside the lake" in refused.stderr and "Traceback" not in refused.stderr
    with pytest.raises(UsageError, match="inside the lake"):
        query.check_output("parquet", small_lake / ".." / small_lake.name / "x.parquet", small_lake)
    assert {p: p.read_bytes() for p in small_lake.rglob("*") if p.is_file()} == before


def test_sql_table_into_a_file_is_refused_not_silently_empty(small_lake, tmp_path):
    out = tmp_path / "table.txt"
    result = run_cli("sql", "SELECT 1 AS n", "--output", str(out), "--lake", str(small_lake))
    assert result.returncode == 2 and "--format csv, json or parquet" in result.stderr, result.stderr
    assert not out.exists()


def test_sql_output_needs_force_and_replaces_a_symlink_not_its_target(small_lake, tmp_path):
    """Issue #12 item 3: an existing --output is kept without --force; with it, a symlink at that name is
    replaced by the result and the file it pointed to (outside the lake) is left alone."""
    elsewhere = tmp_path / "someone-elses.txt"
    elsewhere.write_text("theirs\n")
    out = tmp_path / "out.json"
    out.symlink_to(elsewhere)
    sql = "SELECT 1 AS n"
    kept = run_cli("sql", sql, "--format", "json", "-o", str(out), "--lake", str(small_lake))
    assert kept.returncode == 2 and "--force" in kept.stderr
    forced = run_cli("sql", sql, "--format", "json", "-o", str(out), "--force", "--lake", str(small_lake))
    assert forced.returncode == 0, forced.stderr
    assert not out.is_symlink() and json.loads(out.read_text()) == [{"n": 1}]
    assert elsewhere.read_text() == "theirs\n"
    with pytest.raises(UsageError, match="already exists"):
        query.check_output("csv", out, small_lake)


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_blob('/etc/hostname')",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM glob('/etc/*')",
        "SELECT * FROM read_parquet('{lake}/../*/*.parquet')",
        "COPY (SELECT 1) TO '/tmp/tracepipe-pwn.csv'",
        "ATTACH '/tmp/tracepipe-pwn.duckdb' AS x",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "SET allowed_directories = ['/']",
        "PRAGMA enable_profiling",
        "CALL pragma_version()",
        "SELECT 1; COPY (SELECT 1) TO '/tmp/tracepipe-pwn.csv'",
        "EXPLAIN ANALYZE COPY (SELECT 1) TO '/tmp/tracepipe-pwn.csv'",
    ],
)
def test_duckdb_sql_holds_against_the_spark_attacks(small_lake, statement):
    """The DuckDB side of issue #12 item 2: statements other than queries are refused, and queries cannot
    read outside the lake (enable_external_access off, allowed_directories = the lake, locked)."""
    con = query.connect(Lake(small_lake))
    try:
        with pytest.raises(
            UsageError, match=r"refused|disabled by configuration|Permission|not allowed|does not exist"
        ):
            query.run_read_only(con, statement.format(lake=small_lake))
    finally:
        con.close()
    assert not Path("/tmp/tracepipe-pwn.csv").exists() and not Path("/tmp/tracepipe-pwn.duckdb").exists()


def test_shell_runs_queries_and_refuses_writes(small_lake):
    shown: list[object] = []
    lines = iter(
        ["SELECT count(*) AS n", "FROM flows;", "DELETE FROM flows;", "SELECT 2 AS b;", "SELECT 5; SELECT 6;",
         ".quit", "SELECT 3;"]
    )  # fmt: skip

    def read_line(prompt: str) -> str:
        return next(lines)

    query.shell(
        Lake(small_lake), lambda r: shown.append(r if isinstance(r, Exception) else r.fetchall()), read_line
    )
    assert shown[0] == [(4,)]
    assert isinstance(shown[1], UsageError) and "DELETE" in str(shown[1])
    assert shown[2] == [(2,)]
    assert shown[3:] == [[(5,)], [(6,)]]  # a line of two queries: both shown
    assert len(shown) == 5  # .quit ended the session
    result = run_cli("sql", "--shell", "--lake", str(small_lake), stdin="SELECT 40 + 2 AS answer;\n")
    assert result.returncode == 0 and "42" in result.stdout
    # outside the shell one query at a time: the first one's rows were silently dropped
    result = run_cli("sql", "SELECT 1 AS a; SELECT 2 AS b", "--lake", str(small_lake))
    assert result.returncode == 2 and "2 statements given" in " ".join(result.stderr.split())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-12T07:30:00Z", dt.datetime(2024, 3, 12, 7, 30, tzinfo=dt.UTC)),
        ("2024-03-12T08:30:00+01:00", dt.datetime(2024, 3, 12, 7, 30, tzinfo=dt.UTC)),
        ("2024-03-12 07:30", dt.datetime(2024, 3, 12, 7, 30, tzinfo=dt.UTC)),  # naive = UTC
        ("1710228600", dt.datetime(2024, 3, 12, 7, 30, tzinfo=dt.UTC)),
        ("1710228600.5", dt.datetime(2024, 3, 12, 7, 30, 0, 500000, tzinfo=dt.UTC)),
    ],
)
def test_parse_time(text, expected):
    assert query.parse_time(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "2024-13-01", "12", "2024-03-12T07:30:00Z'; DROP TABLE x"])
def test_parse_time_refuses(text):
    with pytest.raises(UsageError, match="does not parse"):
        query.parse_time(text)


def test_parse_duration_and_addr():
    assert query.parse_duration("90s") == dt.timedelta(seconds=90)
    assert query.parse_duration("30m") == dt.timedelta(minutes=30)
    assert query.parse_duration("2d") == dt.timedelta(days=2)
    assert query.parse_addr("2001:DB8:0::1") == "2001:db8::1"
    with pytest.raises(UsageError):
        query.parse_duration("soon")
    with pytest.raises(UsageError):
        query.parse_addr("10.0.0.0/8")
