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
    assert _loaded_by("tracepipe.__main__") == []  # the entry point, which spawns the workers first


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


def test_the_entry_point_reads_only_an_ingest_netflow_command_line(tmp_path, monkeypatch):
    """prestart's reading of sys.argv: (jobs, lake, paths) of `ingest netflow`, anything else refused (then the
    command starts its workers itself, as before)."""
    read = decode_pool._netflow_command_line
    monkeypatch.setenv("TRACEPIPE_LAKE", str(tmp_path / "env-lake"))
    assert read(["ingest", "netflow", "a.pcap", "b"]) == (
        decode_pool.default_jobs(),
        tmp_path / "env-lake",
        [Path("a.pcap"), Path("b")],
    )
    line = ["--debug", "ingest", "netflow", "--lake", "L", "-j", "3", "x", "--format=json", "--", "-y"]
    assert read(line) == (3, Path("L"), [Path("x"), Path("-y")])
    assert read(["ingest", "netflow", "--jobs=2", "--lake=M", "-j4", "x"])[:2] == (4, Path("M"))
    refused = [
        ["ingest", "vm", "x"],
        ["sql", "ingest", "netflow"],
        ["ingest", "netflow", "--help"],
        ["ingest", "netflow", "--jobs"],
        ["ingest", "netflow", "--jobs", "two", "x"],
        ["ingest", "netflow", "--unknown", "x"],
        [],
    ]
    for argv in refused:
        try:
            read(argv)
        except ValueError:
            continue
        raise AssertionError(argv)


def test_a_prestarted_pool_is_taken_only_by_the_same_jobs_and_lake(tmp_path, monkeypatch):
    big = tmp_path / "big.pcap"
    with open(big, "wb") as handle:
        handle.truncate(PARALLEL_MIN_BYTES)
    lake = tmp_path / "lake"
    monkeypatch.setattr(decode_pool, "_prestarted", None)
    decode_pool.prestart(["ingest", "netflow", str(big), "--lake", str(lake), "--jobs", "2"])
    early = decode_pool._prestarted
    assert early is not None and len(early._procs) == 2
    with start_early(2, lake, [big]) as pool:
        assert pool is early and decode_pool._prestarted is None  # taken, not started again
    decode_pool.prestart(["ingest", "netflow", str(big), "--lake", str(lake), "--jobs", "2"])
    early = decode_pool._prestarted
    assert early is not None
    procs = list(early._procs)
    with start_early(2, tmp_path / "other-lake", [big]) as pool:  # the command read another lake
        assert pool is not early and pool.root == tmp_path / "other-lake" and len(pool._procs) == 2
        assert all(p.poll() is not None for p in procs)  # the prestarted workers were stopped
    decode_pool.prestart(["ingest", "netflow", str(tmp_path / "missing.pcap"), "--lake", str(lake)])
    assert decode_pool._prestarted is None  # nothing big given by name: nothing started


def test_ingest_netflow_through_the_entry_point_with_prestarted_workers(softflowd_export, tmp_path):
    """End to end, `python -m tracepipe.cli` as a user runs it: a big file given by name starts the workers in
    the entry point; the rows land as with `--jobs 1` (a small real capture padded past the size threshold
    with a second, sparse file that is refused: the workers are started, used for nothing, and stopped)."""
    capture = softflowd_export(9, "ipv4").export_pcap
    big = tmp_path / "zeros.bin"
    with open(big, "wb") as handle:
        handle.truncate(PARALLEL_MIN_BYTES)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    results = []
    for jobs, lake in (("2", tmp_path / "two"), ("1", tmp_path / "one")):
        command = [sys.executable, "-m", "tracepipe.cli", "ingest", "netflow", str(capture), str(big)]
        command += ["--lake", str(lake), "--jobs", jobs, "--format", "json"]
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 3, out.stderr  # landed, one file refused
        results.append(Lake(lake).read("flows").drop(["source"]).sort_by("ts_start"))
    assert results[0].num_rows > 0
    assert results[0].equals(results[1])
