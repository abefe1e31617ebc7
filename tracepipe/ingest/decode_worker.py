"""Entry point of one decode worker process: `python -m tracepipe.ingest.decode_worker LAKE_ROOT READ_FD WRITE_FD`.

Started by decode_pool.DecodePool (a fresh interpreter: delta-rs is not fork-safe). Before anything imports
pyarrow it keeps pandas out: a worker converts numpy to Arrow and writes Parquet, nothing more, yet pyarrow
imports pandas on its first conversion of any array (its pandas shim looks at every input), which cost each
worker ~0.3-0.45 s of CPU at start-up (issue 17).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

from tracepipe.nopandas import refuse_pandas

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Let glibc malloc keep freed memory for the next batch instead of returning it to the kernel: numpy's
    column arrays (1-8 MB each) were mmap'ed and unmapped per batch, each page faulted and zeroed again, ~25 k
    faults and ~0.1-0.2 s of system CPU per 1.5 M records (issue 17). Arrays up to 32 MB (glibc's ceiling)
    come from the heap, which is trimmed only above 1 GiB free; the peak memory is the same, it is just not
    given back between batches. False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def main(argv: list[str]) -> None:
    # Ctrl-C (the terminal signals the whole process group) and a service stop (SIGTERM to the whole cgroup)
    # are for the parent: it tells the workers to delete what they wrote ("abort"), and a worker whose parent
    # is gone does so at end-of-file on its inbox. Dying of the signal left the *.parquet.tmp files behind.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    refuse_pandas()
    keep_freed_memory()
    from multiprocessing.connection import Connection

    from tracepipe.ingest.decode_pool import _worker

    _worker(Connection(int(argv[1]), writable=False), Connection(int(argv[2]), readable=False), argv[0])


if __name__ == "__main__":
    main(sys.argv[1:])
