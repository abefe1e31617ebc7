"""The one file replacer (tracepipe.fsutil.replacing): a planted symlink at a guessable temp name is never
written through, the result has the mode a plain create gives, and an error leaves no temp file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tracepipe import fsutil


def _plant(folder: Path, target: Path) -> list[Path]:
    """Symlinks at every temp name a predictable writer would use, all pointing at `target`."""
    links = []
    for name in ("out.csv.tmp", ".out.csv.tmp", "out.csv~", ".out.csv.swp"):
        link = folder / name
        link.symlink_to(target)
        links.append(link)
    return links


def test_planted_symlink_at_the_temp_name_is_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    links = _plant(tmp_path, victim)
    fsutil.write_atomic(tmp_path / "out.csv", "a,b\n1,2\n")
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "out.csv").read_text() == "a,b\n1,2\n"
    assert not (tmp_path / "out.csv").is_symlink()
    assert all(link.is_symlink() for link in links)  # left alone, not followed, not removed
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(fsutil.TMP_SUFFIX) and not p.is_symlink()]


def test_mode_follows_the_umask_like_a_plain_create(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        fsutil.write_atomic(tmp_path / "a.json", "{}")
        plain = tmp_path / "plain"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o640


def test_an_error_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), fsutil.replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_two_writers_never_share_a_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "x"
    with fsutil.replacing(target) as one, fsutil.replacing(target) as two:
        assert one != two
        one.write_text("1")
        two.write_text("2")
    assert target.read_text() == "1"  # the outer replace ran last


_HOLDER = """
import sys, time
from tracepipe import fsutil
where = fsutil.private_temp_dir("buckets")
(where / "bucket-0.parquet").write_bytes(b"x" * 4096)
print(where, flush=True)
time.sleep(120)
"""


def _holder(env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    """A process that made its private temp dir (with a spill file in it) and is still running."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_temp_dirs_of_killed_runs_are_removed_by_the_next_and_no_others(tmp_path: Path) -> None:
    """Before: a sweep killed while it spilled its buckets (a cron `timeout`, the OOM killer) left them in the
    temp directory for good, and every killed query an empty directory. The next run removes them; a running
    process's directory, a planted symlink of such a name and other names are left alone."""
    from conftest import empty_lake

    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    killed, left = _holder(env)
    running, kept = _holder(env)
    try:
        killed.kill()
        killed.wait()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "precious").write_text("x")
        planted = temp / f"tracepipe-duckdb-{killed.pid}.1-planted"
        planted.symlink_to(elsewhere, target_is_directory=True)
        other = temp / "tracepipe-duckdb-abcdefgh"  # (the names before session 36: nothing says whose)
        other.mkdir()
        assert left.is_dir() and kept.is_dir()
        lake = empty_lake(tmp_path / "lake").root
        run = subprocess.run(
            [sys.executable, "-m", "tracepipe.cli", "sql", "SELECT 1 AS one", "--lake", str(lake)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert not left.exists()
        assert kept.is_dir() and (kept / "bucket-0.parquet").exists()
        assert planted.is_symlink() and (elsewhere / "precious").exists() and other.is_dir()
        # the query's own directories went at its exit, as before
        assert sorted(p.name for p in temp.iterdir()) == sorted([kept.name, planted.name, other.name])
    finally:
        running.kill()
        running.wait()
