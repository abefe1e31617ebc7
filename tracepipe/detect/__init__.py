"""Features, rule detectors and the anomaly model over the lake's flows (polars, streaming).

polars' streaming Parquet reader prefetches many row groups ahead by default: on a day of 10^7 to 5*10^7 flows
in 1 M-row groups that alone held 0.25 GB more at the peak of a scan, for no CPU saved on this 2-core machine
(measured, README "Sweeps in bounded memory"). Two row groups ahead keep the decoder busy; a user who wants
another value sets the variable before running tracepipe.
"""

import os

os.environ.setdefault("POLARS_ROW_GROUP_PREFETCH_SIZE", "2")
