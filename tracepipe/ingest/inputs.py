"""What a path given to an ingest command is, told before anything opens it.

`open()` on a FIFO blocks until some writer appears (a cron job would hang for ever), and a directory, a
socket or a device such as /dev/null is no input file either; before, all of them were reported as "no such
file". `input_problem` looks with os.stat (which never blocks) and names what the path is, so the message
says what to do next. Every reader that takes files (netflow, vm, syslog, intel) asks it first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["input_problem"]

_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def input_problem(path: Path, directory_hint: str | None = None) -> str | None:
    """None when `path` is a regular file (or a symlink to one), else what it is instead, as a message.

    `directory_hint` completes "is a directory (...)" for readers that take files only (e.g. "give the capture
    files, e.g. DIR/*.pcap"); readers that expand directories check for one before calling this."""
    try:
        mode = os.stat(path).st_mode  # stat, never open: opening a FIFO waits for a writer
    except (FileNotFoundError, NotADirectoryError):
        if os.path.lexists(path):
            return f"is a symbolic link to {os.readlink(path)!r}, which does not exist"
        return "no such file or directory"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"is a directory ({directory_hint or 'give the files in it'})"
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    return f"is not a regular file ({kind}); copy what it holds into a file and give that file"
