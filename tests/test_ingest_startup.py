"""`ingest netflow --jobs N` start-up and end (issue 17, the serial part of a run): the decode workers start
before the command loads the lake module (pyarrow, numpy, deltalake), so the CLI and the pool must import light;
they start only for a file given by name that is big enough, told from os.stat alone (a FIFO is never opened);
and after the last file they are told to end before the main process commits, so their exit overlaps it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tracepipe.ingest import decode_pool
from tracepipe.ingest.decode_pool import PARALLEL_MIN_BYTES, start_early
from tracepipe.ingest.flows import ingest_flow_files
from tracepipe.lake import Lake

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("pyarrow", "numpy", "deltalake", "tracepipe.lake", "tracepipe.ingest.netflow")


def _loaded_by(module: str) -> list[str]:
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return out.stdout.split()


def test_the_cli_and_the_decode_pool_import_nothing_heavy():
    """Regression: cli.py imported tracepipe.lake at the top (0.25 s with pyarrow, numpy, deltalake), so the
    workers could only be spawned after it."""
    assert _loaded_by("tracepipe.cli") == []
    assert _loaded_by("tracepipe.ingest.decode_pool") == []


def test_workers_start_early_only_for_a_big_regular_file_given_by_name(tmp_path):
    small, big, fifo = tmp_path / "small.pcap", tmp_path / "big.pcap", tmp_path / "fifo"
    small.write_bytes(b"\xd4\xc3\xb2\xa1" + bytes(100))
    with open(big, "wb") as handle:  # sparse: the size is what counts
        handle.truncate(PARALLEL_MIN_BYTES)
    os.mkfifo(fifo)  # stat only: opening it would block
    cases = [([small], 2, False), ([big], 1, False), ([fifo, small], 2, False), ([tmp_path], 2, False)]
    cases += [([small, big], 2, True), ([tmp_path / "missing", big], None, (decode_pool.default_jobs() > 1))]
    for paths, jobs, started in cases:
        with start_early(jobs, tmp_path / "lake", paths) as pool:
            assert bool(pool._procs) == started, (paths, jobs)
            procs = list(pool._procs)
        assert all(p.poll() is not None for p in procs)  # stopped and reaped at exit


def test_after_the_last_file_the_workers_are_told_to_end_before_the_commit(softflowd_export, tmp_path):
    capture = softflowd_export(9, "ipv4").export_pcap
    with decode_pool.DecodePool(2, tmp_path / "lake") as pool:
        pool.start()
        procs = list(pool._procs)
        summary = ingest_flow_files(Lake(tmp_path / "lake"), [capture], parallel_min_bytes=0, pool=pool)
        assert summary.files[0].status == "landed" and summary.flows > 0
        assert pool._released  # "stop" sent after the workers closed their files, before the commit
        for proc in procs:
            proc.wait(timeout=30)  # they end by themselves, nobody else tells them
        assert [p.returncode for p in procs] == [0, 0]
    assert Lake(tmp_path / "lake").read("flows").num_rows == summary.flows
