"""tracepipe: NetFlow and cloud VM lifecycle records in a Parquet lake, for incident response."""

import os as _os
import sys as _sys

__version__ = "0.1.0"
DEFAULT_LAKE = "./lake"  # the lake when neither --lake nor TRACEPIPE_LAKE names one (here: the CLI imports it
# without loading the lake module and its pyarrow, numpy and deltalake)

# Polars' allocator (its own jemalloc, configured by this variable when polars loads) hands freed memory back to
# the system after 0.5-1 s by default, and a big polars job faults the same pages in again and again: the kernel
# zeroing fresh pages was ~a third of a year's lease rebuild CPU (system time). Jemalloc's own default (10 s)
# keeps them for reuse; they still go back to the system 10 s after a job, so a long-lived collector does not
# keep its peak. A user's own setting wins; a process that loaded polars before tracepipe keeps polars' own.
MALLOC_CONF = "dirty_decay_ms:10000,muzzy_decay_ms:10000"
if "polars" not in _sys.modules:
    _os.environ.setdefault("_RJEM_MALLOC_CONF", MALLOC_CONF)
