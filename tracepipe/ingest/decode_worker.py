"""Entry point of one decode worker process: `python -m tracepipe.ingest.decode_worker LAKE_ROOT READ_FD WRITE_FD`.

Started by decode_pool.DecodePool (a fresh interpreter: delta-rs is not fork-safe). Before anything imports
pyarrow it keeps pandas out: a worker converts numpy to Arrow and writes Parquet, nothing more, yet pyarrow
imports pandas on its first conversion of any array (its pandas shim looks at every input), which cost each
worker ~0.3-0.45 s of CPU at start-up (issue 17).
"""

from __future__ import annotations

import signal
import sys

from tracepipe.nopandas import refuse_pandas


def main(argv: list[str]) -> None:
    # Ctrl-C (the terminal signals the whole process group) and a service stop (SIGTERM to the whole cgroup)
    # are for the parent: it tells the workers to delete what they wrote ("abort"), and a worker whose parent
    # is gone does so at end-of-file on its inbox. Dying of the signal left the *.parquet.tmp files behind.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    refuse_pandas()
    from multiprocessing.connection import Connection

    from tracepipe.ingest.decode_pool import _worker

    _worker(Connection(int(argv[1]), writable=False), Connection(int(argv[2]), readable=False), argv[0])


if __name__ == "__main__":
    main(sys.argv[1:])
