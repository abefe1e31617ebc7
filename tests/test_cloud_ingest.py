"""`ingest vm` end to end on the real Nova story: lake datasets, who held an address at times before, during
and after each change (DuckDB over vm_leases/vms), idempotent re-ingest, late and out-of-order files, rejects
with file and line number and exit code 3, and flows re-attributed for the days a late event touched."""

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from conftest import ingest_vm

from tests.conftest import run_tracepipe
from tracepipe.ingest.vm import ingest_vm_files
from tracepipe.lake import Lake
from tracepipe.query import scan_sql

DATA = Path(__file__).parent / "data" / "cloud"
STORY = DATA / "nova" / "notifications.jsonl"


def utc(h: int, m: int, s: int = 0, day: int = 12) -> dt.datetime:
    return dt.datetime(2024, 3, day, h, m, s, tzinfo=dt.UTC)


def who(lake: Lake, addr: str, at: dt.datetime) -> tuple | None:
    con = duckdb.connect()
    return (
        con.execute(
            f"""SELECT l.vm_name, l.project, l.user, l.end_reason, v.status, v.deleted_at, v.quarantine_until
            FROM ({scan_sql("vm_leases", lake.files("vm_leases"))}) l JOIN ({scan_sql("vms", lake.files("vms"))}) v USING (vm_id)
            WHERE l.addr = $addr AND l.valid_from <= $at AND (l.valid_to IS NULL OR $at < l.valid_to)""",
            {"addr": addr, "at": at},
        ).fetchall()
        or None
    )


def status_at(lake: Lake, vm_name: str, at: dt.datetime) -> str:
    con = duckdb.connect()
    return con.execute(
        f"""SELECT state FROM ({scan_sql("vm_events", lake.files("vm_events"))})
            WHERE vm_name = $n AND ts <= $at AND NOT event_type LIKE '%.start' ORDER BY ts DESC LIMIT 1""",
        {"n": vm_name, "at": at},
    ).fetchone()[0]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", *args], capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def story_lake(tmp_path_factory) -> Lake:
    lake = Lake(tmp_path_factory.mktemp("story") / "lake")
    run = run_cli(
        "ingest", "vm", str(STORY), "--reclaim-interval", "7d", "--lake", str(lake.root), "-o", "json"
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["rows"], report["rejects"], report["leases"], report["vms"]) == (16, 0, 4, 3)
    return lake


@pytest.mark.parametrize(
    ("addr", "at", "expected"),
    [
        ("192.168.1.3", utc(6, 59), None),  # before web-01 existed: nobody
        ("192.168.1.3", utc(7, 5), "web-01"),
        ("192.168.1.3", utc(7, 22), "web-01"),  # powered off: still its address
        ("192.168.1.3", utc(7, 45), "web-01"),  # soft-deleted = quarantined, address kept
        ("192.168.1.3", utc(8, 5), None),  # web-01 deleted, web-02 not yet created
        ("192.168.1.3", utc(8, 10, 40), "web-02"),  # reuse: the new holder from its first second
        ("192.168.1.3", utc(8, 0, 2), "web-01"),
        ("192.168.1.30", utc(7, 15), "web-01"),
        ("192.168.1.30", utc(7, 35), None),  # detached 07:30
        ("192.168.1.7", utc(7, 30), "batch-07"),
        ("192.168.1.7", utc(7, 56), None),
    ],
)
def test_who_held_the_address(story_lake, addr, at, expected):
    got = who(story_lake, addr, at)
    if expected is None:
        assert got is None
    else:
        assert len(got) == 1 and got[0][0] == expected  # never two holders


def test_deleted_vm_answer_carries_quarantine(story_lake):
    name, project, user, end_reason, status, deleted_at, quarantine = who(
        story_lake, "192.168.1.3", utc(7, 45)
    )[0]
    assert (name, user, end_reason, status) == ("web-01", "fake", "delete", "deleted")
    assert deleted_at == utc(8, 0, 3) and quarantine == utc(8, 0, 3, day=19)
    assert status_at(story_lake, "web-01", utc(7, 45)) == "soft_deleted"
    web02 = who(story_lake, "192.168.1.3", utc(9, 0))[0]
    assert web02[1] != project and web02[2] == "bob" and web02[4] == "active"


def test_reingest_is_skipped_and_changes_nothing(story_lake):
    before = story_lake.read("vm_leases")
    report, _ = ingest_vm(story_lake, [STORY])
    assert report.skipped == 1 and report.rows == 0
    after = story_lake.read("vm_leases")
    assert after.equals(before)  # the reclaim interval given once is remembered in the lake
    assert after.column("quarantine_until").null_count == 1


def test_late_file_and_flow_reattribution(tmp_path):
    """web-02's create.end arrives in a later file than flows of 192.168.1.3: flows get re-attributed."""
    lines = STORY.read_text().splitlines()
    early, late = tmp_path / "early.jsonl", tmp_path / "late.jsonl"
    early.write_text("\n".join(lines[:-1]) + "\n")
    late.write_text(lines[-1] + "\n")
    lake = Lake(tmp_path / "lake")
    flows = pa.table(
        {
            "ts_start": [utc(7, 30), utc(9, 0)],
            "ts_end": [utc(7, 31), utc(9, 1)],
            "src_addr": ["192.168.1.3", "192.168.1.3"],
            "dst_addr": ["198.51.100.1", "198.51.100.1"],
            "packets": [1, 1],
            "bytes": [60, 60],
            "source": ["test", "test"],
        }
    )
    lake.append("flows", flows, key="testflows")
    _, first = ingest_vm(lake, [early])
    assert first.days == ["2024-03-12"]
    src = (
        duckdb.connect()
        .execute(f"SELECT src_vm FROM ({scan_sql('flows', lake.files('flows'))}) ORDER BY ts_start")
        .fetchall()
    )
    assert src[0][0].startswith("7311d8a3") and src[1][0] is None
    _, second = ingest_vm(lake, [late])
    assert second.days == ["2024-03-12"] and second.flows["files"] == 1
    assert second.leases["mode"] == "incremental"
    src = (
        duckdb.connect()
        .execute(f"SELECT src_vm FROM ({scan_sql('flows', lake.files('flows'))}) ORDER BY ts_start")
        .fetchall()
    )
    assert src[0][0].startswith("7311d8a3") and src[1][0].startswith("efba91fc")
    # the same leases as one in-order file
    whole = Lake(tmp_path / "whole")
    ingest_vm(whole, [STORY])
    order = [("addr", "ascending"), ("valid_from", "ascending"), ("vm_id", "ascending")]
    assert whole.read("vm_leases").sort_by(order).equals(lake.read("vm_leases").sort_by(order))
    # nothing new: no rebuild, no re-attribution
    assert ingest_vm(lake, [late, early])[1].days == []


def test_rejects_unknown_events_and_exit_partial(tmp_path):
    lines = STORY.read_text().splitlines()[:2]
    message = json.loads(json.loads(lines[1])["oslo.message"])
    message["event_type"] = "instance.lock"
    message["message_id"] = "m-lock"
    lines.append(json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(message)}))
    lines.append('{"oslo.version": "2.0", "oslo.message": "{\\"event_type\\": ')
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    lake = tmp_path / "lake"
    run = run_cli("ingest", "vm", str(bad), "--lake", str(lake))
    assert run.returncode == 3, run.stderr
    assert "1 input lines rejected" in " ".join(run.stderr.split())
    con = duckdb.connect()
    rejects = con.execute(
        f"SELECT source, line, reason FROM read_parquet('{lake}/rejects/*/*.parquet')"
    ).fetchall()
    assert rejects == [(str(bad), 4, "malformed JSON")]
    events = con.execute(
        f"SELECT action, event_type FROM read_parquet('{lake}/vm_events/*/*.parquet') ORDER BY line"
    ).fetchall()
    assert events == [
        ("create", "instance.create.start"),
        ("create", "instance.create.end"),
        ("unknown", "instance.lock"),
    ]
    # every line rejected: nothing landed, exit 4
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    failed = run_cli("ingest", "vm", str(garbage), "--lake", str(lake))
    assert failed.returncode == 4, failed.stderr
    # usage errors: exit 2, one line
    usage = run_cli("ingest", "vm", str(bad), "--lake", str(lake), "--reclaim-interval", "soon")
    assert usage.returncode == 2 and "does not parse" in " ".join(usage.stderr.split())
    missing = run_cli("ingest", "vm", str(tmp_path / "nope.jsonl"), "--lake", str(lake))
    assert missing.returncode == 4 and "no such file" in " ".join(missing.stderr.split())


def test_opennebula_pair_and_directory(tmp_path):
    lake = Lake(tmp_path / "lake")
    report, done = ingest_vm(lake, [DATA / "opennebula" / "42.log"], tz="Europe/Berlin")
    assert report.results[0].source.endswith("42.log+42.xml") and report.rows == 10
    assert done.lease_rows == 6
    leases = lake.read("vm_leases").to_pylist()
    assert leases[0]["valid_from"] == utc(8, 0, 41)


def test_opennebula_log_paired_with_a_given_xml_by_vm_id(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "xml").mkdir()
    log = tmp_path / "logs" / "42.log"
    log.write_bytes((DATA / "opennebula" / "42.log").read_bytes())
    xml = tmp_path / "xml" / "vm42-show.xml"
    xml.write_bytes((DATA / "opennebula" / "42.xml").read_bytes())
    lake = Lake(tmp_path / "lake")
    report, done = ingest_vm(lake, [xml, log], tz="Europe/Berlin")
    assert [r.source for r in report.results] == [f"{log}+vm42-show.xml"]
    assert done.lease_rows == 6 and done.vms == 1


def test_grown_or_resent_file_adds_only_new_events(tmp_path):
    """A listener's dump grows (and at-least-once delivery re-sends messages): only news land in vm_events."""
    lines = STORY.read_text().splitlines()
    dump = tmp_path / "notifications.jsonl"
    dump.write_text("\n".join(lines[:10]) + "\n")
    lake = Lake(tmp_path / "lake")
    assert ingest_vm(lake, [dump])[0].rows == 10
    dump.write_text("\n".join(lines) + "\n")
    resent = tmp_path / "resent.jsonl"
    resent.write_text("\n".join(lines[3:5] + lines[3:5]) + "\n")
    report, _ = ingest_vm(lake, [dump, resent])
    assert [r.rows for r in report.results] == [6, 0]
    assert lake.read("vm_events").num_rows == 16
    # OpenNebula logs have no message ids: content decides
    one = tmp_path / "42.log"
    one.write_text("\n".join((DATA / "opennebula" / "42.log").read_text().splitlines()[:11]) + "\n")
    assert ingest_vm(lake, [one])[0].rows == 5
    one.write_text((DATA / "opennebula" / "42.log").read_text())
    assert ingest_vm(lake, [one])[0].rows == 5


# ---- inputs that are not regular files (issue 12, item 8) ------------------------------------------------------


@pytest.fixture
def odd_paths(tmp_path_factory):
    """A FIFO, a directory, /dev/null, a listening UNIX socket, a dangling symlink (short paths: sockets)."""
    import socket
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="tp-odd-"))
    fifo = where / "fifo"
    os.mkfifo(fifo)
    (where / "dir").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(where / "sock"))
    (where / "dangling").symlink_to(where / "gone")
    yield {
        "fifo": fifo,
        "dir": where / "dir",
        "devnull": Path("/dev/null"),
        "socket": where / "sock",
        "dangling": where / "dangling",
    }
    sock.close()
    shutil.rmtree(where)


@pytest.mark.parametrize(
    "command", [("ingest", "netflow"), ("ingest", "vm"), ("ingest", "syslog"), ("intel", "import")]
)
def test_a_fifo_is_named_and_never_blocks_any_ingest_command(tmp_path, odd_paths, command):
    # before: `intel import FIFO` blocked for ever in open(); the ingest commands said "no such file"
    run = run_tracepipe(*command, str(odd_paths["fifo"]), "--lake", str(tmp_path / "lake"), timeout=60)
    assert run.returncode == 4, run.stderr + run.stdout
    said = " ".join((run.stderr + run.stdout).split())
    assert "is not a regular file (FIFO)" in said and "no such file" not in said
    assert "internal error" not in said


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("devnull", "is not a regular file (character device)"),
        ("socket", "is not a regular file (socket)"),
        ("dangling", "is a symbolic link to"),
        ("dir", "is a directory (give the capture files in it, e.g. DIR/*.pcap)"),
    ],
)
def test_odd_inputs_are_named_for_what_they_are(tmp_path, odd_paths, kind, expected):
    from tracepipe.errors import InputError
    from tracepipe.ingest.flows import ingest_flow_files
    from tracepipe.ingest.vm import ingest_syslog_files
    from tracepipe.intel import import_intel

    lake = Lake(tmp_path / "lake")
    path = odd_paths[kind]
    summary = ingest_flow_files(lake, [path, STORY])  # the Nova dump is no capture: rejected, not landed
    if kind == "dir":  # a folder stands for the files under it (an nfsen tree); this one holds none
        expected = "is a directory with no pcap, nfdump-csv, nfcapd file under it"
    assert summary.files[0].message.startswith(expected) and summary.exit_code == 4
    assert summary.files[0].path == str(path)
    if kind == "dir":  # vm and syslog read the files in a directory; intel wants the export itself
        assert ingest_syslog_files(lake, [path]).rows == 0
        with pytest.raises(InputError, match=r"is a directory \(give the export file itself\)"):
            import_intel(lake, path)
        return
    for ingest in (ingest_vm_files, ingest_syslog_files, import_intel):
        with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            ingest(lake, [path]) if ingest is not import_intel else ingest(lake, path)


NO_READ_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search"]
NO_READ_OVERRIDE += ["--bounding-set=-dac_override,-dac_read_search", "--"]


def run_without_read_override(*args: str) -> subprocess.CompletedProcess:
    """The CLI as a service user runs it: the tests run as root, whose override of file modes is dropped."""
    return subprocess.run(
        [*NO_READ_OVERRIDE, sys.executable, "-m", "tracepipe.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("command", ["vm", "syslog"])
def test_a_file_that_cannot_be_read_in_a_folder_is_named_and_the_others_land(tmp_path, command):
    # hostile review: a mode-000 file (the tests run as root: its read override dropped, as a service user) in
    # a drop folder was an internal error (exit 4) that stopped `ingest vm`/`ingest syslog` and the sweep; a
    # link to /proc/self/mem failed the run with an I/O error
    drop = tmp_path / "drop"
    drop.mkdir()
    story = Path(__file__).parent.parent / "sample_data" / "story"
    good = story / ("nova/notifications.jsonl" if command == "vm" else "syslog/web-03.log")
    shutil.copy(good, drop / "b-good")
    (drop / "a-locked").write_text(good.read_text())
    os.chmod(drop / "a-locked", 0)
    (drop / "c-mem").symlink_to("/proc/self/mem")
    run = run_without_read_override(
        "ingest", command, str(drop), "--lake", str(tmp_path / "lake"), "--output", "json"
    )
    assert run.returncode == 3, run.stderr + run.stdout
    report = json.loads(run.stdout)
    assert report["rows"] > 0 and "internal error" not in run.stderr
    why = {Path(n["source"]).name: n["why"] for n in report["not_read"]}
    assert why == {
        "a-locked": "cannot read: Permission denied",
        "c-mem": "is a kernel interface file (/proc, /sys), not data",
    }, why


def test_a_vm_named_like_a_nova_key_does_not_make_a_generic_inventory_nova(tmp_path):
    # hostile review: "oslo.message" anywhere in the first 4 KiB (a tenant's VM name) made the file Nova
    # notifications: all 3 rows rejected, exit 4, nobody held the addresses
    rows = [
        {
            "ts": "2024-03-12T08:00:00Z",
            "vm_id": f"v{i}",
            "vm_name": name,
            "action": "create",
            "addr": f"10.1.0.{i}",
        }
        for i, name in enumerate(["web-1", "oslo.message", '"event_type"'], start=1)
    ]
    path = tmp_path / "inventory.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lake = Lake(tmp_path / "lake")
    report = ingest_vm_files(lake, [path])
    assert (report.rows, report.rejects) == (3, 0)


def test_a_folder_that_cannot_be_listed_under_a_netflow_folder_is_named(tmp_path):
    # hostile review: an unreadable subfolder of a folder given to `ingest netflow` was passed over in silence
    # (exit 0): its captures never landed, and nothing said so
    drop = tmp_path / "drop"
    (drop / "locked").mkdir(parents=True)
    sample = Path(__file__).parent.parent / "sample_data" / "netflow" / "softflowd-v9.pcap"
    shutil.copy(sample, drop / "a.pcap")
    shutil.copy(sample, drop / "locked" / "b.pcap")
    os.chmod(drop / "locked", 0)
    run = run_without_read_override(
        "ingest", "netflow", str(drop), "--lake", str(tmp_path / "lake"), "--format", "json"
    )
    os.chmod(drop / "locked", 0o755)
    assert run.returncode == 3, run.stderr + run.stdout
    files = {Path(f["path"]).name: f for f in json.loads(run.stdout)["files"]}
    assert files["a.pcap"]["status"] == "landed"
    assert files["locked"]["status"] == "missing" and "cannot be read" in files["locked"]["message"]


def test_a_link_to_a_kernel_file_in_a_netflow_folder_is_named_never_read(tmp_path):
    # hostile review: a drop folder's link to /proc/kmsg ("a regular empty file" to stat) was opened to sniff
    # its kind: `ingest netflow` and the sweep hung (as root it also swallowed the kernel's log messages)
    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copy(
        Path(__file__).parent.parent / "sample_data" / "netflow" / "softflowd-v9.pcap", drop / "a.pcap"
    )
    (drop / "b-kmsg.pcap").symlink_to("/proc/kmsg")
    run = run_tracepipe(
        "ingest", "netflow", str(drop), "--lake", str(tmp_path / "lake"), "--format", "json", timeout=60
    )
    assert run.returncode == 3, run.stderr + run.stdout
    files = {Path(f["path"]).name: f for f in json.loads(run.stdout)["files"]}
    assert files["a.pcap"]["status"] == "landed"
    assert files["b-kmsg.pcap"]["message"] == "is a kernel interface file (/proc, /sys), not data"
