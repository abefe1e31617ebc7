"""tracepipe: NetFlow and cloud VM lifecycle records in a Parquet lake, for incident response."""

import os as _os
import sys as _sys

from tracepipe import fsutil as _fsutil  # (the standard library only: loads neither polars nor pyarrow)

__version__ = "0.1.0"
DEFAULT_LAKE = "./lake"  # the lake when neither --lake nor TRACEPIPE_LAKE names one (here: the CLI imports it
# without loading the lake module and its pyarrow, numpy and deltalake)


# Polars' allocator (its own jemalloc, configured by this variable when polars loads) hands freed memory back to
# the system after 0.5-1 s by default, and a big polars job faults the same pages in again and again: the kernel
# zeroing fresh pages was ~a third of a year's lease rebuild CPU (system time). Freed pages are kept 10 s for
# reuse (dirty_decay_ms), then handed back at once (muzzy_decay_ms:0: not first marked MADV_FREE, which leaves
# them in the process's RSS until the kernel runs short), from one arena per core (narenas; jemalloc's default is
# four per core, each keeping its own freed pages). A 10^8-flow sweep with 10 s / 10 s and 8 arenas peaked at
# 2,143-2,334 MiB (4 runs), with this at 1,759-1,859 MiB (3 runs), CPU the same within the machine's noise; the
# lease rebuild the same (session 31). A user's own setting wins; a process that loaded polars before tracepipe
# keeps polars' own.
MALLOC_CONF = f"dirty_decay_ms:10000,muzzy_decay_ms:0,narenas:{_fsutil.cores()}"
if "polars" not in _sys.modules:
    _os.environ.setdefault("_RJEM_MALLOC_CONF", MALLOC_CONF)

# Arrow's memory pool: the C library's allocator instead of pyarrow's default (mimalloc in these wheels). mimalloc
# hands freed pages back to the system within milliseconds (MADV_DONTNEED) from arenas it marks for huge pages, so
# every row group sorted and written faulted fresh zeroed memory in again: measured on 3 M softflowd records
# (`ingest netflow`, issue 17) 130-150 huge-page faults and 0.6-1.3 s of system time per run against 7-9 and
# 0.45-0.55 s, the biggest process's peak RSS 300 -> 230 MB (the sweep: the same within this machine's noise).
# Read by pyarrow when it loads (so only a process that has not loaded it yet); a user's own setting wins, and the
# decode workers (fresh interpreters) inherit it. The full lease rebuild still picks jemalloc (leases.py).
ARROW_POOL = "system"
if "pyarrow" not in _sys.modules:
    _os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", ARROW_POOL)
