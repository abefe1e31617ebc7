"""Drop folders of many small files, as a user runs `tracepipe ingest` over them (session 39).

    python benchmarks/drop_folder.py --files 300          # first ingest of N small nfdump CSV files, then the rerun
    python benchmarks/drop_folder.py --files 20000 --rerun-only   # the rerun over N files landed before

Generates FILES nfdump CSV files of ROWS flows each in a temporary folder, runs `tracepipe ingest netflow DIR
--jobs 1` (unless --rerun-only: then the manifest rows of the files are written directly, as a year of hourly runs
would leave them), then runs it again over the same folder (every file skipped), and prints wall and CPU seconds
and peak RSS of each run, with files/s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from tracepipe import fsutil
from tracepipe.lake import FILE_IDENTITY, MANIFEST, MANIFEST_DIR, Lake, PartFile, hash_file
from tracepipe.schema import INGEST_MANIFEST

HEADER = "ts,te,td,sa,da,sp,dp,pr,flg,fwd,stos,ipkt,ibyt,in,out,ra\n"


def make_files(folder: Path, files: int, rows: int) -> None:
    folder.mkdir(parents=True)
    for f in range(files):
        lines = "".join(
            f"2024-03-12 10:{f % 60:02d}:{i % 60:02d},2024-03-12 10:{f % 60:02d}:{i % 60:02d},1.0,"
            f"10.{f // 250 % 250}.{f % 250}.{i % 250},192.0.2.{i % 250},{1000 + i},443,TCP,......S.,0,0,1,60,0,0,"
            "127.0.0.1\n"
            for i in range(rows)
        )
        (folder / f"nfcapd.{f:08d}.csv").write_text(HEADER + lines)


def write_manifest(lake_dir: Path, folder: Path) -> None:
    """The manifest rows a run that landed every file would have written (sorted by content hash, as merged)."""
    now = dt.datetime.now(dt.UTC)
    rows = []
    for path in sorted(folder.iterdir()):
        digest = hash_file(path)
        identity = {FILE_IDENTITY: fsutil.file_identity(path.stat())}
        rows.append(
            {"content_hash": digest, "dataset": "flows", "source": str(path.absolute()), "rows": 1, "rejects": 0,
             "files": [], "ingested_at": now, "stats": json.dumps(identity)}
        )  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=INGEST_MANIFEST).sort_by("content_hash")
    part = PartFile(lake_dir / MANIFEST_DIR, MANIFEST, None, "part-benchmark")
    part.write(table)
    Lake(lake_dir).commit(MANIFEST_DIR, [part.close()], info={})


def run(args: list[str]) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(args, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss // 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--rerun-only", action="store_true")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        folder, lake = Path(work) / "drop", Path(work) / "lake"
        make_files(folder, options.files, options.rows)
        command = [sys.executable, "-m", "tracepipe", "ingest", "netflow", str(folder), "--lake", str(lake)]
        command += ["--jobs", "1", "--format", "json"]
        runs = ["rerun"] if options.rerun_only else ["first", "rerun"]
        if options.rerun_only:
            write_manifest(lake, folder)
        for name in runs:
            wall, cpu, rss = run(command)
            print(
                f"{name:6} {options.files} files x {options.rows} rows: {wall:.2f} s wall, {cpu:.2f} CPU s, "
                f"{options.files / wall:,.0f} files/s, peak RSS of the runs so far {rss} MiB"
            )


if __name__ == "__main__":
    main()
