"""Files planted in the lake by whoever can write it (hostile review of maintenance, session 26): links and FIFOs
in table folders must never make vacuum, expire or repair touch anything outside the lake, nor hang a reader."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

import pyarrow as pa

from tests.conftest import run_in_process
from tracepipe.lake import Lake, ingest_table
from tracepipe.schema import FLOWS

DAY = dt.datetime(2024, 3, 12, tzinfo=dt.UTC)
MONTH_AGO = time.time() - 30 * 86400


def _lake(root: Path) -> Lake:
    lake = Lake(root)
    ts = [DAY + dt.timedelta(minutes=i) for i in range(10)]
    flows = pa.table(
        {
            "ts_start": pa.array(ts, FLOWS.field("ts_start").type),
            "ts_end": pa.array(ts, FLOWS.field("ts_end").type),
            "src_addr": [f"10.0.0.{i}" for i in range(10)],
            "dst_addr": ["192.0.2.1"] * 10,
            "source": ["t"] * 10,
        }
    )
    ingest_table(lake, "flows", "t", "t-hash", [flows])
    return lake


def _old_file(path: Path, text: str = "precious") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (MONTH_AGO, MONTH_AGO))
    return path


def test_vacuum_and_expire_never_delete_through_a_planted_link(tmp_path):
    """A link planted as a partition folder (or any folder of a table) to a folder outside the lake: delta-rs'
    full vacuum listed the files behind it as untracked and deleted them (`vacuum` and `expire`). Now only
    files reached without a link go; a real orphan inside the table still does."""
    lake = _lake(tmp_path / "lake")
    outside = tmp_path / "home"
    victims = [_old_file(outside / "precious.txt"), _old_file(outside / "sub" / "notes.parquet")]
    (lake.root / "flows" / "date=2025-01-01").symlink_to(outside)
    (lake.root / "flows" / "date=2024-03-12" / "sub").symlink_to(outside)
    (lake.root / "vm_leases").mkdir(exist_ok=True)
    orphan = _old_file(
        lake.root / "flows" / "date=2024-03-12" / "part-orphan.parquet", "left by a killed writer"
    )
    result = run_in_process("vacuum", "--retain", "1h", "--lake", str(lake.root), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["deleted"]["flows"] == 1
    assert not orphan.exists() and all(v.read_text() == "precious" for v in victims)
    result = run_in_process("expire", "--older-than", "4000d", "--lake", str(lake.root), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert all(v.read_text() == "precious" for v in victims)
    assert run_in_process("sql", "SELECT count(*) AS n FROM flows", "--lake", str(lake.root)).returncode == 0


def _plant_entry(table: Path, relative: str, size: int, day: str | None = "2024-03-12") -> None:
    """Append a hand-written commit adding `relative` to a table's log (what anyone who can write the lake can)."""
    log = table / "_delta_log"
    last = max(int(p.stem) for p in log.glob("*.json"))
    now = int(time.time() * 1000)
    lines = [
        {"commitInfo": {"timestamp": now, "operation": "WRITE"}},
        {
            "add": {
                "path": relative,
                "partitionValues": {"date": day} if day else {},
                "size": size,
                "modificationTime": now,
                "dataChange": True,
                "stats": None,
            }
        },
    ]
    (log / f"{last + 1:020d}.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_repair_never_moves_or_writes_through_a_planted_link(tmp_path):
    """`repair` moved a damaged file to _damaged/<table>/<path>, following a link planted there (an attacker's
    authorized_keys written over the admin's), and moved a file from outside the lake in through a link
    planted as a partition folder. Now both entries leave the log and nothing outside the lake changes."""
    lake = _lake(tmp_path / "lake")
    home = tmp_path / "home" / ".ssh"
    keys = _old_file(home / "authorized_keys", "ssh-ed25519 AAAA admin@site")
    table = lake.root / "flows"
    (table / "date=2024-03-12" / "authorized_keys").write_text("ssh-ed25519 EVIL attacker")
    _plant_entry(table, "date=2024-03-12/authorized_keys", 999)
    (lake.root / "_damaged" / "flows").mkdir(parents=True)
    (lake.root / "_damaged" / "flows" / "date=2024-03-12").symlink_to(home)
    outside = tmp_path / "etc"
    passwd = _old_file(outside / "passwd", "root:x:0:0")
    (table / "date=2031-01-01").symlink_to(outside)
    _plant_entry(table, "date=2031-01-01/passwd", 3, "2031-01-01")
    result = run_in_process("repair", "--lake", str(lake.root), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert keys.read_text() == "ssh-ed25519 AAAA admin@site" and passwd.read_text() == "root:x:0:0"
    report = json.loads(result.stdout)
    assert sorted(report["outside_entries_removed"]["flows"]) == [
        "date=2024-03-12/authorized_keys",
        "date=2031-01-01/passwd",
    ]
    assert "left in place" in report["why"]["flows"]["date=2031-01-01/passwd"]
    count = run_in_process(
        "sql", "SELECT count(*) AS n FROM flows", "--format", "json", "--lake", str(lake.root)
    )
    assert count.returncode == 0 and json.loads(count.stdout) == [{"n": 10}]


def test_a_planted_fifo_stops_readers_with_its_name_never_hangs_them(tmp_path):
    """A FIFO under a name the log lists hung every query, sweep and `repair` (DuckDB, polars and pyarrow wait
    on its open for a writer); a FIFO as _last_checkpoint hung delta-rs' open of the table; as the next
    commit file, every commit failed "check that the lake is writable". Each is now an error naming it, and
    `repair` takes the listed FIFO's entry out of the log."""
    from tests.conftest import run_tracepipe

    lake = _lake(tmp_path / "lake")
    table = lake.root / "flows"
    os.mkfifo(table / "date=2024-03-12" / "part-fifo.parquet")
    _plant_entry(table, "date=2024-03-12/part-fifo.parquet", 0)
    who = run_tracepipe("who", "10.0.0.1", "--at", "2024-03-12T00:05Z", "--lake", str(lake.root), timeout=60)
    assert who.returncode == 4 and "part-fifo.parquet" in who.stderr and "FIFO" in who.stderr
    repair = run_tracepipe("repair", "--lake", str(lake.root), timeout=60)
    assert repair.returncode == 0 and "left where it is" in repair.stdout, repair.stderr
    assert (
        run_tracepipe("who", "10.0.0.1", "--at", "2024-03-12T00:05Z", "--lake", str(lake.root)).returncode
        == 0
    )

    checkpoint = table / "_delta_log" / "_last_checkpoint"
    checkpoint.unlink(missing_ok=True)
    os.mkfifo(checkpoint)
    who = run_tracepipe("who", "10.0.0.1", "--at", "2024-03-12T00:05Z", "--lake", str(lake.root), timeout=60)
    assert who.returncode == 4 and "_last_checkpoint is no regular file (a FIFO" in who.stderr
    checkpoint.unlink()

    log = table / "_delta_log"
    os.mkfifo(log / f"{max(int(p.stem) for p in log.glob('*.json')) + 1:020d}.json")
    ingest = Lake(lake.root)
    try:
        ingest_table(ingest, "flows", "more", "more-hash", [lake.read("flows").slice(0, 1)])
    except Exception as exc:
        assert "is no regular file (a FIFO" in str(exc)
    else:
        raise AssertionError("a commit over a planted FIFO landed")


def test_lock_files_and_upgrade_never_follow_a_planted_link(tmp_path):
    """The rewrite lock was opened with mode "a+" through a planted link (compact created the file it named:
    /etc/nologin when run as root); `upgrade` walked a dataset folder planted as a link (removing .tmp files
    there) and failed on a planted folder of a current lake. Now the link is replaced by a lock file (refusing
    it stopped every rewrite for good), and upgrade leaves both alone."""
    lake = _lake(tmp_path / "lake")
    (lake.root / "_locks").mkdir(exist_ok=True)
    victim = tmp_path / "etc" / "nologin"
    victim.parent.mkdir()
    (lake.root / "_locks" / "flows.lock").unlink(missing_ok=True)
    (lake.root / "_locks" / "flows.lock").symlink_to(victim)
    result = run_in_process("compact", "--lake", str(lake.root))
    assert result.returncode == 0, result.stderr  # the planted link holds no lock: replaced by a lock file
    assert not victim.exists() and not (lake.root / "_locks" / "flows.lock").is_symlink()
    elsewhere = _old_file(tmp_path / "theirs" / "notes.parquet.tmp", "not the lake's")
    (lake.root / "flow_labels").symlink_to(elsewhere.parent)
    _old_file(lake.root / "rejects" / "x.parquet", "planted")
    result = run_in_process("upgrade", "--lake", str(lake.root), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert elsewhere.read_text() == "not the lake's" and sorted(
        p.name for p in elsewhere.parent.iterdir()
    ) == ["notes.parquet.tmp"]
