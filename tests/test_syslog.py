"""Syslog from inside VMs: RFC 3164 (rsyslog file format, no year), RFC 5424, rejects with line numbers,
sshd fields, and attribution to the VM of the Nova story by sender address or hostname."""

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from conftest import ingest_syslog, ingest_vm

from tracepipe.correlate.attribution import attribute_logs
from tracepipe.correlate.leases import build_leases
from tracepipe.ingest.cloud import parse_cloud_text
from tracepipe.ingest.syslog import parse_syslog
from tracepipe.lake import Lake
from tracepipe.query import scan_sql

DATA = Path(__file__).parent / "data" / "cloud"
AUTH = DATA / "syslog" / "web-02-auth.log"
FORWARDED = DATA / "syslog" / "forwarded-5424.log"


def utc(h: int, m: int, s: int = 0, us: int = 0) -> dt.datetime:
    return dt.datetime(2024, 3, 12, h, m, s, us, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def story_leases():
    events, _ = parse_cloud_text((DATA / "nova" / "notifications.jsonl").read_text(), "story")
    return build_leases(events, dt.timedelta(days=7))[0]


def test_rfc3164_file_format_and_sshd_fields():
    logs, rejects = parse_syslog(AUTH.read_text(), "auth.log", year=2024)
    assert rejects.to_pydict()["line"] == [9] and rejects.to_pydict()["reason"] == ["unknown syslog format"]
    rows = logs.to_pylist()
    assert len(rows) == 9
    assert rows[0]["ts"] == utc(8, 20, 1) and rows[0]["hostname"] == "web-02"
    assert (rows[0]["app"], rows[0]["pid"], rows[0]["facility"]) == ("sshd", 2201, None)
    auth = [(r["line"], r["auth_event"], r["auth_user"], r["auth_src_addr"], r["auth_method"]) for r in rows]
    assert auth == [
        (1, "invalid_user", "admin", "203.0.113.9", None),
        (2, "failed", "admin", "203.0.113.9", "password"),
        (3, "preauth_closed", "admin", "203.0.113.9", None),
        (4, "failed", "root", "203.0.113.9", "password"),
        (5, "failed", "root", "203.0.113.9", "password"),
        (6, "accepted", "ubuntu", "198.51.100.7", "publickey"),
        (7, None, None, None, None),
        (8, None, None, None, None),
        (10, "preauth_closed", "git", "203.0.113.12", None),
    ]


def test_rfc5424_and_mixed_lines():
    logs, rejects = parse_syslog(FORWARDED.read_text(), "fwd.log", year=2024, tz="Europe/Berlin")
    assert rejects.to_pydict()["line"] == [5] and rejects.to_pydict()["reason"] == ["bad syslog timestamp"]
    rows = logs.to_pylist()
    assert [r["ts"] for r in rows] == [
        utc(7, 45, 10),
        utc(7, 45, 12, 513000),
        utc(8, 5),
        utc(8, 30),
        utc(7, 31),
    ]
    assert (rows[0]["facility"], rows[0]["severity"], rows[0]["pid"]) == (4, 6, 1999)
    assert rows[1]["auth_event"] == "accepted" and rows[1]["auth_method"] == "password"
    assert rows[2]["message"] == "job finished" and rows[2]["app"] == "app" and rows[2]["auth_event"] is None
    assert rows[3]["auth_method"] == "publickey" and rows[3]["auth_user"] == "bob"
    # RFC 3164 line with PRI, local time Europe/Berlin (UTC+1)
    assert rows[4]["auth_event"] == "invalid_user" and rows[4]["facility"] == 4


def test_year_rolls_back_for_lines_after_the_reference():
    text = "Dec 31 23:59:00 h app: late\nJan  1 00:01:00 h app: early\n"
    logs, _ = parse_syslog(text, "x", year=2025, reference=dt.datetime(2025, 1, 1, 1, tzinfo=dt.UTC))
    assert logs.column("ts").to_pylist() == [
        dt.datetime(2024, 12, 31, 23, 59, tzinfo=dt.UTC),
        dt.datetime(2025, 1, 1, 0, 1, tzinfo=dt.UTC),
    ]


def test_attribution_by_sender_address(story_leases):
    text = (
        "<38>1 2024-03-12T07:45:00Z web-01 sshd 1 - - x\n<38>1 2024-03-12T08:05:00Z web-01 sshd 1 - - x\n"
        "<38>1 2024-03-12T08:20:00Z web-02 sshd 1 - - x\n"
    )
    logs, _ = parse_syslog(text, "x", sender_addr="192.168.1.3")
    vms = attribute_logs(logs, story_leases).column("vm_id").to_pylist()
    # 07:45 web-01 (soft-deleted, still holding the address); 08:05 nobody; 08:20 web-02
    assert vms[0].startswith("7311d8a3") and vms[1] is None and vms[2].startswith("efba91fc")


def test_attribution_by_hostname(story_leases):
    logs, _ = parse_syslog(FORWARDED.read_text(), "fwd.log", year=2024)
    vms = attribute_logs(logs, story_leases).column("vm_id").to_pylist()
    assert vms[0].startswith("7311d8a3")  # web-01 at 07:45
    assert vms[2] is None  # web-01 after its delete
    assert vms[3].startswith("efba91fc")  # web-02 at 08:30


def test_ingest_syslog_into_lake_and_cli_exit_partial(tmp_path):
    lake = Lake(tmp_path / "lake")
    ingest_vm(lake, [DATA / "nova" / "notifications.jsonl"], reclaim_interval=dt.timedelta(days=7))
    auth = tmp_path / "auth.log"
    auth.write_bytes(AUTH.read_bytes())
    os.utime(auth, (dt.datetime(2024, 3, 13, tzinfo=dt.UTC).timestamp(),) * 2)  # year from the mtime
    report, _ = ingest_syslog(lake, [auth])
    assert (report.rows, report.rejects) == (9, 1)
    con = duckdb.connect()
    got = con.execute(
        "SELECT count(*), count(DISTINCT vm_id), min(ts), sum((auth_event = 'failed')::int) "
        f"FROM ({scan_sql('vm_logs', lake.files('vm_logs'))})"
    ).fetchone()
    assert got[0] == 9 and got[1] == 1 and got[3] == 3
    assert got[2] == utc(8, 20, 1)
    again, _ = ingest_syslog(lake, [auth])
    assert again.skipped == 1 and again.rows == 0
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tracepipe.cli",
            "ingest",
            "syslog",
            str(FORWARDED),
            "--year",
            "2024",
            "--lake",
            str(lake.root),
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 3, run.stderr
    assert '"rejects": 1' in run.stdout
    assert "dated in" not in run.stderr  # --year given
    # without --year the year taken from the file's modification time is said (README's story once landed
    # 2025's evidence in the year of the clone, silently)
    copy = auth.parent / "copy.log"
    copy.write_bytes(
        auth.read_bytes() + b"Mar 13 09:00:00 web-01 sshd[1]: Accepted password for a from 1.2.3.4\n"
    )
    os.utime(copy, (dt.datetime(2023, 3, 14, tzinfo=dt.UTC).timestamp(),) * 2)
    guessed = subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", "ingest", "syslog", str(copy), "--lake", str(lake.root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "dated in 2023, the year of each file's modification time" in " ".join(guessed.stderr.split())
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "tracepipe.cli",
            "ingest",
            "syslog",
            str(FORWARDED),
            "--sender-addr",
            "web-01",
            "--lake",
            str(lake.root),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "not an IP address" in " ".join(bad.stderr.split())


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(),
            st.sampled_from(
                [
                    "<38>1 2024-03-12T07:45:10Z web-01 sshd 1 - - Failed password for root from 203.0.113.9 port 1 ssh2",
                    "Mar 12 07:41:02 web-01 sshd[1]: Accepted publickey for a from 198.51.100.7 port 2 ssh2",
                    "<999>Feb 30 25:61:61 h x: y",
                    "<13>1 - - - - - -",
                    "Mar 12 07:41:02 h",
                ]
            ),
        )
    )
)
def test_any_lines_give_rows_or_rejects_never_a_crash(lines):
    text = "\n".join(lines)
    logs, rejects = parse_syslog(text, "fuzz", year=2024)
    nonblank = sum(1 for line in text.split("\n") if line.rstrip("\r").strip(" \t"))
    assert logs.num_rows + rejects.num_rows == nonblank


def test_logs_landed_before_the_lifecycle_get_attributed_when_it_arrives(tmp_path):
    lake = Lake(tmp_path / "lake")
    assert ingest_syslog(lake, [FORWARDED], year=2024)[1].logs_attributed == 0
    _, done = ingest_vm(lake, [DATA / "nova" / "notifications.jsonl"])
    assert done.days == ["2024-03-12"] and done.logs_files == 1
    vms = (
        duckdb.connect()
        .execute(f"SELECT vm_id FROM ({scan_sql('vm_logs', lake.files('vm_logs'))}) ORDER BY line")
        .fetchall()
    )
    assert vms[0][0].startswith("7311d8a3") and vms[2][0] is None and vms[3][0].startswith("efba91fc")


def test_big_files_are_read_in_blocks_of_whole_lines_with_exact_line_numbers(tmp_path):
    from tracepipe.ingest.vm import _line_blocks

    path = tmp_path / "auth.log"
    path.write_bytes(AUTH.read_bytes() + b"Mar 12 08:30:00 web-02 sshd[9]: last line without newline")
    whole, _ = parse_syslog(path.read_text(), "x", year=2024)
    parts = [
        parse_syslog(b.data.decode(), "x", year=2024, first_line=b.first_line)
        for b in _line_blocks(path, 150)
    ]
    assert len(parts) > 3
    assert pa.concat_tables([p[0] for p in parts]).equals(whole)
    assert pa.concat_tables([p[1] for p in parts]).column("line").to_pylist() == [9]
    assert whole.column("line").to_pylist()[-1] == 11


def test_hostname_that_is_an_address_counts_as_sender(story_leases):
    """rsyslog without name resolution writes the sender's address (%fromhost-ip%) as the hostname."""
    text = (
        "Mar 12 07:45:00 192.168.1.3 sshd[5]: Failed password for root from 203.0.113.9 port 1 ssh2\n"
        "<38>1 2024-03-12T08:20:00Z 192.168.001.3 sshd 1 - - x\n"
        "<38>1 2024-03-12T08:20:00Z 2001:DB8::1 sshd 1 - - x\n"
    )
    logs, _ = parse_syslog(text, "x", year=2024)
    assert logs.column("sender_addr").to_pylist() == ["192.168.1.3", None, "2001:db8::1"]
    vms = attribute_logs(logs, story_leases).column("vm_id").to_pylist()
    assert vms[0].startswith("7311d8a3") and vms[1] is None and vms[2] is None


# ---- hostile input (issue 12, items 8 and 9) -------------------------------------------------------------------


def test_pri_above_191_is_kept_without_a_made_up_severity_and_counted():
    # before: <999> became facility 124, severity 7 (debug), as if it were valid; rsyslog marks it invalid
    sshd = "Mar 12 08:20:04 web-02 sshd[2201]: Failed password for root from 203.0.113.9 port 52008 ssh2"
    text = "\n".join([f"<999>{sshd}", f"<191>{sshd}", f"<0>{sshd}", f"<1234567>{sshd}", f"<abc>{sshd}", sshd])
    logs, rejects = parse_syslog(text, "auth.log", year=2024)
    rows = logs.to_pylist()
    assert [(r["line"], r["facility"], r["severity"]) for r in rows] == [
        (1, None, None),
        (2, 23, 7),
        (3, 0, 0),
        (4, None, None),
        (6, None, None),
    ]
    # the invalid PRI does not hide the attempt from the detectors
    assert [r["auth_event"] for r in rows] == ["failed"] * 5
    got = list(zip(rejects.column("line").to_pylist(), rejects.column("reason").to_pylist(), strict=True))
    assert got == [
        (1, "invalid PRI (above 191): line kept, facility and severity unknown"),
        (4, "invalid PRI (above 191): line kept, facility and severity unknown"),
        (5, "unknown syslog format"),
    ]
    assert rejects.column("detail").to_pylist()[0].startswith("<999>Mar 12")


def test_syslog_times_outside_1990_to_tomorrow_are_rejects():
    text = "\n".join(
        [
            "<34>1 0001-03-12T07:41:02Z web-01 sshd 1 - - year one",
            "<34>1 9999-03-12T07:41:02Z web-01 sshd 1 - - year 9999",
            "1970-01-01T00:00:00+00:00 web-01 sshd[1]: epoch zero",
            "<34>1 2024-03-12T07:41:02Z web-01 sshd 1 - - fine",
        ]
    )
    logs, rejects = parse_syslog(text, "fwd.log", year=2024)
    assert logs.column("message").to_pylist() == ["fine"]
    assert rejects.column("line").to_pylist() == [1, 2, 3]
    assert set(rejects.column("reason").to_pylist()) == {"time out of range"}


def test_ingest_syslog_with_invalid_pri_exits_partial_and_keeps_the_line(tmp_path):
    from tracepipe.errors import EXIT_PARTIAL

    log = tmp_path / "auth.log"
    log.write_text(
        "<999>Mar 12 08:20:04 web-02 sshd[2201]: Accepted publickey for ubuntu from 10.0.0.9 port 1 ssh2\n"
    )
    report, _ = ingest_syslog(Lake(tmp_path / "lake"), [log], year=2024)
    assert (report.rows, report.rejects, report.exit_code) == (1, 1, EXIT_PARTIAL)
    stored = Lake(tmp_path / "lake").read("rejects").to_pylist()
    assert [(r["dataset"], r["line"], r["reason"][:11]) for r in stored] == [("vm_logs", 1, "invalid PRI")]


def test_a_user_name_or_a_key_id_cannot_forge_the_source_address():
    # sshd logs the name the client sent, spaces and all (`ssh 'x from 192.0.2.66 port 1'@web-01`), and a
    # certificate's key ID after the address: both the client's. The lazy patterns took the first "from A port P"
    # (the user's); the last one is a key ID's. A line with two is read with no address and no user: the attempt
    # counts, never against an address the client chose
    forged = [
        "Failed password for invalid user x from 192.0.2.66 port 1 from 203.0.113.5 port 44441 ssh2",
        "Failed password for x from 192.0.2.66 port 1 ssh2: junk from 203.0.113.5 port 44442 ssh2",
        "Invalid user y from 192.0.2.77 port 1 from 203.0.113.5 port 5555",
        "Connection closed by invalid user z 192.0.2.88 port 1 203.0.113.5 port 5556 [preauth]",
        "error: maximum authentication attempts exceeded for invalid user q from 192.0.2.1 port 2 "
        "from 203.0.113.5 port 50002 ssh2 [preauth]",
        "Failed publickey for root from 203.0.113.5 port 4444 ssh2: ED25519-CERT SHA256:abc ID x from 192.0.2.66 "
        "port 1 (serial 0) CA ED25519 SHA256:def",
        "Accepted publickey for root from 203.0.113.5 port 4445 ssh2: RSA-CERT SHA256:abc ID k from 192.0.2.66 "
        "port 1 ssh2: RSA SHA256:x (serial 7) CA RSA SHA256:def",
    ]
    real = [
        "pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= rhost=203.0.113.5  "
        "user=a rhost=192.0.2.3",
        "Accepted publickey for bob from 203.0.113.5 port 50000 ssh2: RSA SHA256:abcdEFGH/x+y",
        "Failed publickey for root from 203.0.113.5 port 50001 ssh2: ED25519-CERT SHA256:zz ID web ops (serial 3) "
        "CA ED25519 SHA256:ca",
        "Disconnected from authenticating user root 203.0.113.5 port 50004 [preauth]",
        "Invalid user admin from 203.0.113.5 port 50005",
        "Failed password for invalid user a b c from 2001:db8::5 port 50006 ssh2",
        "pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= rhost=203.0.113.5  "
        "user=root ",
    ]
    lines = forged + real
    text = "".join(f"2024-03-12T07:43:{i:02d}Z web-01 sshd[{3000 + i}]: {m}\n" for i, m in enumerate(lines))
    logs, rejects = parse_syslog(text, "auth.log")
    assert rejects.num_rows == 0
    rows = logs.select(["auth_event", "auth_user", "auth_src_addr"]).to_pylist()
    assert [r["auth_event"] for r in rows] == [
        "failed", "failed", "invalid_user", "preauth_closed", "failed", "failed", "accepted",
        "failed", "accepted", "failed", "preauth_closed", "invalid_user", "failed", "failed",
    ]  # fmt: skip
    assert [(r["auth_user"], r["auth_src_addr"]) for r in rows[: len(forged)]] == [(None, None)] * len(forged)
    assert [(r["auth_user"], r["auth_src_addr"]) for r in rows[len(forged) :]] == [
        ("a rhost=192.0.2.3", "203.0.113.5"),
        ("bob", "203.0.113.5"),
        ("root", "203.0.113.5"),
        ("root", "203.0.113.5"),
        ("admin", "203.0.113.5"),
        ("a b c", "2001:db8::5"),
        ("root", "203.0.113.5"),
    ]


def test_a_log_that_grew_lands_only_its_new_lines_and_a_rotated_one_lands_whole(tmp_path):
    # `tracepipe ingest syslog /var/log/remote/` from cron every hour: each run landed every earlier line of a
    # growing auth.log again (and its rejects): failed-login counts doubled
    lake = Lake(tmp_path / "lake")
    log = tmp_path / "auth.log"
    first = [
        f"Mar 12 07:{m:02d}:00 web-01 sshd[{m}]: Failed password for root from 203.0.113.5 port {m} ssh2"
        for m in range(10)
    ]
    log.write_text("\n".join([*first[:5], "no syslog shape", *first[5:]]) + "\n")

    def rows() -> list[tuple]:
        got = duckdb.sql(
            f"SELECT line, message FROM ({scan_sql('vm_logs', lake.files('vm_logs'))}) ORDER BY line"
        ).fetchall()
        return [(line, message.split("port ")[1]) for line, message in got]

    def rejects() -> list[int]:
        return sorted(r["line"] for r in lake.read("rejects", ["line"]).to_pylist())

    report, _ = ingest_syslog(lake, [log], year=2024)
    assert (report.rows, report.rejects, report.duplicates) == (10, 1, 0)
    with open(log, "a") as handle:
        handle.write(
            "Mar 12 08:00:00 web-01 sshd[99]: Failed password for root from 203.0.113.5 port 99 ssh2\n"
        )
        handle.write("junk again\n")
    report, _ = ingest_syslog(lake, [log], year=2024)
    assert (report.rows, report.rejects, report.duplicates) == (1, 1, 10)
    assert len(rows()) == 11 and len(set(rows())) == 11 and rejects() == [6, 13]
    # grown by a rejected line only: nothing lands, yet the file is recorded (its rerun was read again, exit 3)
    with open(log, "a") as handle:
        handle.write("more junk\n")
    report, _ = ingest_syslog(lake, [log], year=2024)
    assert (report.rows, report.rejects, report.duplicates) == (0, 2, 11) and report.exit_code == 3
    report, _ = ingest_syslog(lake, [log], year=2024)
    assert report.skipped == 1 and report.exit_code == 0
    # rotated: another file under the same path, its first lines at other times: all of it lands
    log.write_text("Mar 13 00:00:01 web-01 sshd[1]: Failed password for root from 203.0.113.5 port 7 ssh2\n")
    report, _ = ingest_syslog(lake, [log], year=2024)
    assert (report.rows, report.duplicates) == (1, 0) and len(rows()) == 12


def test_a_file_across_new_year_read_with_year_goes_on_into_the_next(tmp_path):
    """Session-24 hostile review: with `--year 2024`, "Jan  1" after "Dec 31" landed in January 2024, eleven
    months early (and on that time's leases): no single --year dated such a file. --year is now the year of
    the first line, and a line earlier in the calendar than 30 days before it is in the next, across blocks
    too."""
    from tracepipe.ingest.syslog import YearWraps

    text = "Dec 31 23:59:58 h sshd[1]: a\nJan  1 00:00:01 h sshd[1]: b\nJan  1 00:00:02 h sshd[1]: c\n"
    logs, _ = parse_syslog(text, "x", wraps=YearWraps(2024))
    assert [t.year for t in logs.column("ts").to_pylist()] == [2024, 2025, 2025]
    wraps = YearWraps(2024)
    first, _ = parse_syslog("Dec 31 23:59:58 h sshd[1]: a\n", "x", wraps=wraps)
    second, _ = parse_syslog("Jan  1 00:00:01 h sshd[1]: b\n", "x", wraps=wraps, first_line=2)
    assert (first.column("ts")[0].as_py().year, second.column("ts")[0].as_py().year) == (2024, 2025)
    path = tmp_path / "auth.log"
    path.write_text(text)
    lake = tmp_path / "lake"
    ingest_syslog(Lake(lake), [path], year=2024, sender_addr="192.0.2.1")  # what `--year 2024` passes
    years = duckdb.sql(
        f"SELECT year(ts) FROM ({scan_sql('vm_logs', Lake(lake).entries('vm_logs'))}) ORDER BY line"
    )
    assert [r[0] for r in years.fetchall()] == [2024, 2025, 2025]


def test_a_line_planted_with_another_month_moves_no_other_line_of_the_file():
    """Session-25 review: with --year the year went on by the order of the lines (+1 at each month falling
    back 6 or more), so one VM writing "Dec 31" into a file shared with others moved every later line a year
    on (and onto that time's leases, or out of the window). Each line is now dated on its own, in the year
    from 30 days before the file's first line: the planted line moves only itself."""
    from tracepipe.ingest.syslog import YearWraps

    text = (
        "Mar 12 07:41:02 web-01 sshd[1]: a\n"
        "Mar 12 07:41:01 web-01 sshd[1]: written a second earlier by another thread\n"
        "Dec 31 23:59:59 evil sshd[6]: planted\n"
        "Mar 12 07:41:03 web-01 sshd[1]: b\n"
        "Feb 14 08:00:00 web-01 sshd[1]: a month before the first line\n"
        "Jan 20 08:00:00 web-01 sshd[1]: past the 30 days: the next January\n"
    )
    logs, rejects = parse_syslog(text, "x", wraps=YearWraps(2024))
    assert not rejects.num_rows
    assert [t.isoformat() for t in logs.column("ts").to_pylist()] == [
        "2024-03-12T07:41:02+00:00",
        "2024-03-12T07:41:01+00:00",
        "2024-12-31T23:59:59+00:00",
        "2024-03-12T07:41:03+00:00",
        "2024-02-14T08:00:00+00:00",
        "2025-01-20T08:00:00+00:00",
    ]
    # in blocks (a big file): the first line of the first block anchors every block
    wraps = YearWraps(2024)
    blocks = text.splitlines(keepends=True)
    years = [
        parse_syslog(line, "x", wraps=wraps, first_line=i)[0].column("ts")[0].as_py().year
        for i, line in enumerate(blocks, 1)
    ]
    assert years == [2024, 2024, 2024, 2024, 2024, 2025]
    # a Feb 29 with none in the file's year is no date; with one, it is read there
    _, rejects = parse_syslog("Mar  1 00:00:00 h a: x\nFeb 29 10:00:00 h a: y\n", "x", wraps=YearWraps(2022))
    assert rejects.column("reason").to_pylist() == ["bad syslog timestamp"]
    logs, _ = parse_syslog("Mar  1 00:00:00 h a: x\nFeb 29 10:00:00 h a: y\n", "x", wraps=YearWraps(2024))
    assert logs.column("ts")[1].as_py() == dt.datetime(2024, 2, 29, 10, tzinfo=dt.UTC)


def test_feb_29_is_read_in_the_leap_year_it_names():
    """A "Feb 29" line read with a 2025 mtime was "bad syslog timestamp": parsed in 2025 (no such day) before
    the roll back to 2024; and rolled back from 2024 it became 2023-02-28, a day the line never named."""
    logs, rejects = parse_syslog(
        "Feb 29 10:00:00 h app: leap\n", "x", year=2025, reference=dt.datetime(2025, 1, 15, tzinfo=dt.UTC)
    )
    assert (
        logs.column("ts").to_pylist() == [dt.datetime(2024, 2, 29, 10, tzinfo=dt.UTC)]
        and not rejects.num_rows
    )
    logs, rejects = parse_syslog(
        "Feb 29 10:00:00 h app: leap\n", "x", year=2024, reference=dt.datetime(2024, 1, 15, tzinfo=dt.UTC)
    )
    assert logs.num_rows == 0 and rejects.column("reason").to_pylist() == ["bad syslog timestamp"]


def test_a_pri_of_many_digits_keeps_its_line():
    """<42949672950> (11 digits) made the line "unknown syslog format" and its sshd failure vanished; any PRI
    above 191 keeps the line (facility and severity unknown), as the README says."""
    text = "<42949672950>Mar 12 07:41:02 web-01 sshd[1]: Failed password for root from 198.51.100.9 port 1 ssh2\n"
    logs, rejects = parse_syslog(text, "x", year=2024)
    assert logs.column("auth_event").to_pylist() == ["failed"]
    assert rejects.column("reason").to_pylist()[0].startswith("invalid PRI")


def test_lines_land_attributed_so_a_kill_before_their_days_are_rewritten_loses_no_vm(tmp_path):
    """Session-27 review: `ingest syslog` committed its lines with vm_id null and attributed them afterwards,
    one rewrite per day; killed in between, the rerun skipped the file (already in the lake) and the lines kept
    no VM for good (9 of web-02's lines). Now they land attributed with the leases of the moment (as the
    collector's flows do): stopped right after the commit, before any day was rewritten, every line has its VM."""
    from tracepipe.correlate.attribution import log_attributor
    from tracepipe.ingest.vm import ingest_syslog_files

    lake = Lake(tmp_path / "lake")
    ingest_vm(lake, [DATA / "nova" / "notifications.jsonl"])
    report = ingest_syslog_files(lake, [FORWARDED], year=2024, attribute=log_attributor(lake))  # no correlate
    assert report.rows > 0
    sql = f"SELECT count(*), count(vm_id) FROM ({scan_sql('vm_logs', lake.files('vm_logs'))})"
    landed = duckdb.connect().execute(sql).fetchall()
    fresh = Lake(tmp_path / "fresh")
    ingest_vm(fresh, [DATA / "nova" / "notifications.jsonl"])
    ingest_syslog(fresh, [FORWARDED], year=2024)
    fresh_sql = f"SELECT count(*), count(vm_id) FROM ({scan_sql('vm_logs', fresh.files('vm_logs'))})"
    expected = duckdb.connect().execute(fresh_sql).fetchall()
    assert landed == expected and landed[0][1] > 0, (landed, expected)


def test_a_lease_update_killed_before_it_re_attributed_the_lines_is_finished_by_the_next_run(tmp_path):
    """The leases committed (their days recorded), the re-attribution of the VM log lines of those days not
    done (a kill): the next correlation finishes it, as it already did for flows (days_left_to_attribute
    looked at flow days only, so these lines kept no VM until a `leases rebuild`)."""
    from tracepipe.correlate.attribution import correlate
    from tracepipe.correlate.leases import refresh_leases
    from tracepipe.ingest.vm import ingest_vm_files

    lake = Lake(tmp_path / "lake")
    ingest_syslog(lake, [FORWARDED], year=2024)  # no leases yet: lines without a VM
    ingest_vm_files(lake, [DATA / "nova" / "notifications.jsonl"])
    refresh_leases(lake)  # ... and killed here, before the lines' days were rewritten
    sql = f"SELECT count(vm_id) FROM ({scan_sql('vm_logs', lake.files('vm_logs'))})"
    assert duckdb.connect().execute(sql).fetchall() == [(0,)]
    done = correlate(lake)  # the next run of any ingest command
    assert done.error is None and done.logs_files == 1
    sql = f"SELECT count(vm_id) FROM ({scan_sql('vm_logs', lake.files('vm_logs'))})"
    assert duckdb.connect().execute(sql).fetchall()[0][0] > 0
    assert correlate(lake).logs_files == 0  # then nothing is left


CLI = [sys.executable, "-m", "tracepipe.cli"]


def _lines_on_days(path: Path, days: int, sender_host: str = "web-02") -> Path:
    """RFC 5424 lines of one VM's sshd, one a day from 2024-03-10 on, each day's at 08:20."""
    start = dt.datetime(2024, 3, 10, 8, 20, tzinfo=dt.UTC)
    path.write_text(
        "".join(
            f"<38>1 {(start + dt.timedelta(days=d)).isoformat()} {sender_host} sshd 7 - - Failed password for root"
            " from 203.0.113.9 port 4242 ssh2\n"
            for d in range(days)
        )
    )
    return path


def test_lines_landed_with_the_leases_of_now_are_not_rewritten_again(tmp_path):
    """A file of lines dated on many days lands attributed; correlation rewrote each of those days again with
    the same leases, one commit a day (3,000 days: 230 s and a 405 MB log, session-27 review). Now a day is
    rewritten only when the leases changed since the lines landed."""
    from tracepipe.correlate.attribution import UNKNOWN_LEASES, correlate, landed_with, log_attributor
    from tracepipe.ingest.vm import ingest_syslog_files

    lake = Lake(tmp_path / "lake")
    ingest_vm(lake, [DATA / "nova" / "notifications.jsonl"], reclaim_interval=dt.timedelta(days=7))
    path = _lines_on_days(tmp_path / "auth.log", 12)
    before = lake.version("vm_leases")
    attributor = log_attributor(lake)
    report = ingest_syslog_files(lake, [path], sender_addr="192.168.1.3", attribute=attributor)
    assert len(report.touched_days) == 12
    assert attributor.versions == {before} and landed_with(lake, attributor, before) == before
    commits = lake.version("vm_logs")
    done = correlate(lake, log_days=report.touched_days, logs_landed_with=before)
    assert done.error is None and done.logs_files == 0
    assert lake.version("vm_logs") == commits  # nothing rewritten
    # as landed, each line is the VM's that held 192.168.1.3 then: what attribution over every lease gives
    landed = lake.read("vm_logs").sort_by("ts")
    vms = landed.column("vm_id").to_pylist()
    assert vms == attribute_logs(landed, lake.read("vm_leases")).column("vm_id").to_pylist()
    assert vms[:2] == [None, None] and None not in vms[2:]  # (the story's VMs hold it from 2024-03-12)
    # lines that landed with other leases than the lake's now (or with leases nobody can name) are rewritten
    for stale in (before - 1, UNKNOWN_LEASES):
        again = correlate(lake, log_days=report.touched_days, logs_landed_with=stale)
        assert again.error is None and again.logs_files == 12


def test_ingest_syslog_of_lines_on_many_days_is_one_commit(tmp_path):
    """`tracepipe ingest syslog` as a user runs it: the lines of 40 days land in one commit and stay
    attributed (no rewrite of each day after)."""
    lake = Lake(tmp_path / "lake")
    ingest_vm(lake, [DATA / "nova" / "notifications.jsonl"], reclaim_interval=dt.timedelta(days=7))
    path = _lines_on_days(tmp_path / "auth.log", 40)
    _lines_on_days(tmp_path / "first.log", 1, "other")  # (vm_logs exists before: its version is counted)
    ingest_syslog(lake, [tmp_path / "first.log"])
    commits = lake.version("vm_logs")
    run = subprocess.run(
        [*CLI, "ingest", "syslog", str(path), "--sender-addr", "192.168.1.3", "--lake", str(lake.root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    # every line carried its year (RFC 5424): no warning that a year was taken from the file's time
    assert "modification time" not in run.stderr, run.stderr
    lake.refresh()
    operations = [i.get("operation") for i in lake.commit_infos("vm_logs", 100)]
    assert "attribute logs" not in operations and lake.version("vm_logs") == commits + 1, operations
    # the two days before the story's VMs held the address, and the first file's line of an unknown host
    assert lake.read("vm_logs").column("vm_id").null_count == 3


def test_with_year_a_tenants_first_line_of_a_shared_file_does_not_move_the_others():
    """Hostile review (session 37): the first line anchors --year, and a tenant can write it ("Dec 31" first in
    a file shared with its neighbours' "Jun 17" lines): every other line landed a year on, on that time's
    leases. The first line anchors only when at least half the first block's lines lie near it; else the line
    most of them lie around does. A file across new year keeps its first line (the test above)."""
    from tracepipe.ingest.syslog import YearWraps

    text = "Dec 31 23:59:59 evil-vm sshd[1]: hello\n"
    text += "".join(f"Jun 17 08:{i:02d}:00 web-03 sshd[2]: line {i}\n" for i in range(20))
    logs, rejects = parse_syslog(text, "x", wraps=YearWraps(2025))
    assert not rejects.num_rows
    days = [t.date().isoformat() for t in logs.column("ts").to_pylist()]
    assert days[0] == "2025-12-31" and set(days[1:]) == {"2025-06-17"}


def test_an_hourly_lease_update_rewrites_only_the_log_files_of_the_times_it_changed(tmp_path):
    """Every hourly `ingest vm` rewrote all of the day's VM log lines (77 k -> 400 k lines re-attributed from
    the day's first hour to its sixth at 500 k lines an hour: a cost growing with the day; performance review,
    session 38). As for flows, a day only the lease update changed has only the files of the times whose
    answers changed rewritten, and the lines come out as attribution over every lease gives them."""
    lake = Lake(tmp_path / "lake")
    inventory = "ts,vm_id,vm_name,action,addr\n"
    inventory += (
        "2024-03-10T00:00:00Z,vm-a,alpha,create,10.1.0.1\n2024-03-10T00:00:00Z,vm-b,beta,create,10.1.0.2\n"
    )
    (tmp_path / "first.csv").write_text(inventory)
    ingest_vm(lake, [tmp_path / "first.csv"])
    for hour in range(6):  # the day's log files as an hourly relay writes them
        at = dt.datetime(2024, 3, 10, hour, 30, tzinfo=dt.UTC).isoformat()
        text = "".join(
            f"<38>1 {at} {host} sshd 7 - - Accepted publickey for ops\n" for host in ("10.1.0.1", "10.1.0.2")
        )
        (tmp_path / f"relay-{hour}.log").write_text(text)
        ingest_syslog(lake, [tmp_path / f"relay-{hour}.log"])
    files = len(lake.files("vm_logs"))
    assert files >= 4  # (small files of one day: tiered compaction may merge some)
    (tmp_path / "second.csv").write_text("ts,vm_id,action,addr\n2024-03-10T05:10:00Z,vm-b,delete,10.1.0.2\n")
    _, done = ingest_vm(lake, [tmp_path / "second.csv"])
    assert done.logs_files == 1  # the file of 05:30, not the day's
    landed = lake.read("vm_logs").sort_by([("ts", "ascending"), ("hostname", "ascending")])
    want = attribute_logs(landed, lake.read("vm_leases")).column("vm_id").to_pylist()
    assert landed.column("vm_id").to_pylist() == want
    assert want[-2:] == ["vm-a", None] and want[:2] == ["vm-a", "vm-b"]
