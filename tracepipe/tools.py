"""Where the external programs tracepipe runs (nfdump, and java for the Spark engine) are installed.

A name -> an absolute path: PATH first, then the sbin directories that a non-root PATH lacks (Debian puts
nfcapd's helpers and tcpdump in /usr/sbin). A missing program is an EnvironmentProblem naming the package.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tracepipe.errors import EnvironmentProblem

SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

# Debian package of each program whose package is not named like the program
_PACKAGE = {"nfcapd": "nfdump", "pmacctd": "pmacct", "java": "default-jre-headless"}


def find_tool(name: str) -> str | None:
    """Absolute path of program `name`, or None when it is neither on PATH nor in an sbin directory."""
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def tool_path(name: str) -> str:
    """Absolute path of program `name`; raises EnvironmentProblem (with what to install) when it is missing."""
    found = find_tool(name)
    if found is None:
        raise EnvironmentProblem(
            f"{name} is not installed (looked on PATH and in {', '.join(SBIN_DIRS)}); "
            f"install it, e.g. `apt-get install {_PACKAGE.get(name, name)}`, or run `bash .ci/install`."
        )
    return found
