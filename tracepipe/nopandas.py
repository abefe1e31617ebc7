"""Keep pandas out of a process that never uses it (issue 17: start-up cost).

tracepipe never uses pandas, yet pyarrow imports it on its first conversion of any array when it is installed (its
pandas shim looks at every input): ~0.3-0.45 s of CPU at the start of every ingest process and decode worker.
`refuse_pandas()` installs an import finder that refuses it, so pyarrow (and polars, DuckDB, deltalake, which
look for it the same way) take pandas as not installed. Only for processes whose whole work is known: the decode
workers, the flow ingest commands and the sweep on the local engine. Not for `sql` or the Spark engine, where a
user's query or PySpark may want pandas.
"""

from __future__ import annotations

import sys


class _NoPandas:
    """Import finder that refuses pandas."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError("this tracepipe process does not load pandas", name=name)


def refuse_pandas() -> bool:
    """Refuse pandas from now on in this process; False (and nothing changed) if it is already loaded."""
    if "pandas" in sys.modules:
        return False
    if not any(isinstance(finder, _NoPandas) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoPandas())
    return True


def allow_pandas() -> None:
    """Undo refuse_pandas (the Spark engine needs pandas for PySpark's Arrow exchange: a process that ran a
    local command before, such as a test session or a notebook, had it refused)."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _NoPandas)]
