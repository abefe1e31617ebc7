"""Make a race in a test certain: child processes that hold their first Parquet write open for a while."""

from __future__ import annotations

import os
from pathlib import Path

_SITECUSTOMIZE = """\
import time

import pyarrow.parquet as pq

_write = pq.ParquetWriter.write_table
_held = []


def write_table(self, *args, **kwargs):
    _write(self, *args, **kwargs)
    if not _held:
        _held.append(1)
        time.sleep({seconds})


pq.ParquetWriter.write_table = write_table
"""


def env_holding_first_write(tmp_path: Path, seconds: float = 3.0) -> dict[str, str]:
    """An environment for a child whose every process (the child and the fresh-interpreter decode workers it
    starts, which inherit PYTHONPATH) sleeps `seconds` right after its first Parquet row group is written, the
    file still a *.tmp: a test that signals or kills "while a worker writes" then always finds one writing,
    however fast the ingest or loaded the machine (the whole ingest of such a test takes ~1 s and a temp file
    lives ~0.1 s of it: a poll under CI's load missed it)."""
    folder = tmp_path / "slow-first-write"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(seconds=seconds))
    rest = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []  # ("x:" would add the cwd)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), *rest]))
