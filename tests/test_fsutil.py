"""The one file replacer (tracepipe.fsutil.replacing): a planted symlink at a guessable temp name is never
written through, the result has the mode a plain create gives, and an error leaves no temp file."""

from __future__ import annotations

import os
import stat
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
