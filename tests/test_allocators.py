"""The allocators a tracepipe process runs with (tracepipe/__init__.py): Arrow's pool is the C library's, polars'
jemalloc keeps freed pages for reuse, and a user's own setting of either wins. Checked in fresh interpreters,
since both are read when pyarrow and polars load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracepipe import fsutil

REPO = Path(__file__).resolve().parent.parent
PROBE = (
    "import json, os, tracepipe, pyarrow as pa\n"
    "print(json.dumps({'pool': pa.default_memory_pool().backend_name,"
    " 'rjem': os.environ.get('_RJEM_MALLOC_CONF')}))\n"
)


def _probe(env_extra: dict[str, str], code: str = PROBE) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL", "_RJEM_MALLOC_CONF")}
    env.update(env_extra, PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_tracepipe_process_gives_arrow_the_c_librarys_allocator() -> None:
    import tracepipe

    seen = _probe({})
    assert seen["pool"] == tracepipe.ARROW_POOL == "system"
    assert seen["rjem"] == tracepipe.MALLOC_CONF


@pytest.mark.parametrize("pool", ["mimalloc", "jemalloc"])
def test_a_users_own_arrow_pool_wins(pool: str) -> None:
    """(pyarrow's Linux wheels carry both pools; the setting names one that exists, or pyarrow ignores it)"""
    assert _probe({"ARROW_DEFAULT_MEMORY_POOL": pool})["pool"] == pool
    assert _probe({"_RJEM_MALLOC_CONF": "dirty_decay_ms:0"})["rjem"] == "dirty_decay_ms:0"


def test_polars_jemalloc_takes_every_setting_tracepipe_gives_it() -> None:
    """jemalloc reads _RJEM_MALLOC_CONF when polars loads and reports a pair it does not take on stderr (and
    goes on with its default): each of tracepipe's settings must be one this polars' jemalloc takes."""
    import tracepipe

    code = "import tracepipe, polars as pl\nprint(pl.Series(range(10**6)).sum())\n"
    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for conf, good in ((tracepipe.MALLOC_CONF, True), (tracepipe.MALLOC_CONF + ",narenas:many", False)):
        run = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, "_RJEM_MALLOC_CONF": conf},
            capture_output=True,
            text=True,
            check=True,
        )
        assert run.stdout.strip() == "499999500000"
        assert ("<jemalloc>" not in run.stderr) is good, (conf, run.stderr)
    assert (
        "muzzy_decay_ms:0" in tracepipe.MALLOC_CONF and f"narenas:{fsutil.cores()}" in tracepipe.MALLOC_CONF
    )
