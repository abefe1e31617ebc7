"""The one way tracepipe replaces a file: a temp file in the same directory, write, fsync, rename over the
target, fsync the directory. A reader sees the old file or the new one, never half of one; after return the
new one survives a power loss (unless `durable=False`, for monitoring files that may lag a crash).

And what a path someone gave is, told before anything opens it (`input_problem`, `directory_problem`):
`open()` on a FIFO blocks until some writer appears (a cron job would hang for ever), and a directory, a socket
or a device such as /dev/null is no input file either; os.stat never blocks and lets the message name the thing.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tracepipe.errors import UsageError

__all__ = [
    "arrow_file",
    "arrow_regular",
    "beneath",
    "directory_problem",
    "file_identity",
    "fsync_dir",
    "input_problem",
    "move_beneath",
    "move_durably",
    "open_beneath",
    "open_regular",
    "private_temp_dir",
    "read_regular",
    "replace_problem",
    "replacing",
    "unlink_beneath",
    "write_atomic",
]

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make a rename (or create, unlink) in directory `path` durable. Silently nothing where directories
    cannot be opened (some network filesystems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fresh_temp(path: Path) -> Path:
    """A new, empty, unpredictably named file beside `path`, created exclusively (O_EXCL: never a file or
    symlink someone planted at a name they could guess), with the mode a plain create would give."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return Path(name)


@contextlib.contextmanager
def replacing(path: Path, *, durable: bool = True, tmp: Path | None = None) -> Iterator[Path]:
    """`with replacing(path) as tmp:` write `tmp` (any writer that takes a file name: pyarrow, numpy); on
    exit it is fsynced and renamed over `path`, and the directory fsynced. On an error the temp file is
    removed and `path` keeps its old content. The temp file is created exclusively under a random name in
    `path`'s folder, so a folder others can write to (/tmp) cannot redirect the write through a planted
    symlink. A caller that already writes a temp file of an unguessable name (the lake's part files) passes
    it as `tmp`."""
    path = Path(path)
    problem = replace_problem(path)
    if problem:
        raise UsageError(f"{path} {problem}")
    tmp = _fresh_temp(path) if tmp is None else tmp
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | str, *, durable: bool = True) -> None:
    """Replace `path` with `data` (text is written as UTF-8)."""
    with replacing(path, durable=durable) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def move_durably(source: Path, target: Path) -> None:
    """Rename `source` to `target` (same filesystem) and make both directory entries durable."""
    os.replace(source, target)
    fsync_dir(Path(target).parent)
    if Path(source).parent != Path(target).parent:
        fsync_dir(Path(source).parent)


_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISLNK, "symbolic link"),
    (stat.S_ISDIR, "directory"),
)


NOT_UTF8 = (
    "its name is not UTF-8 (bytes a source's name in the lake cannot hold, such as a relay's file named after a "
    "hostname a VM sent): rename it to land it"
)


def utf8_name(path: Path | str) -> bool:
    """Whether a path's name is text the lake can hold as a source (UTF-8): a name of other bytes (a relay's
    file named after what a VM sent as its hostname) made every later run of `ingest` an internal error (a
    UnicodeEncodeError on the first Arrow column it reached), so the whole drop folder stopped landing."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def file_identity(info: os.stat_result) -> list[int]:
    """What tells one file as it is on disk from any other or a changed one, never its name: device, inode,
    size, mtime and ctime (what changes when its bytes do; ctime cannot be set back by its writer)."""
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def kind(mode: int) -> str:
    """What a file of st_mode `mode` is, in words ("regular file", "FIFO", "symbolic link", ...)."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in _KINDS if test(mode)), "special file")


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o640) -> int:
    """A descriptor of `path` when it is a regular file itself, else OSError. For files in a directory that
    others can write to (a spool, a lake): O_NOFOLLOW, so a planted symlink (to /dev/zero, to a file to
    truncate) is refused instead of followed; O_NONBLOCK, so a planted FIFO cannot make the open wait for a
    writer for ever; then fstat of what was opened (no race between a check and the open)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise OSError(errno.EINVAL, f"not a regular file (a {kind(st_mode)})", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def arrow_file(fd: int) -> Any:
    """A pyarrow file (NativeFile) reading the file of descriptor `fd` through a descriptor of its own (the
    caller still closes `fd`): /proc/self/fd/<fd> names the very file `fd` was opened on, checked already (a
    regular file, open_regular), whatever was put at its path since. Not a Python file object: Arrow reads one
    by calling back into Python from its I/O threads, and such a call still running when the interpreter exits
    aborted the process ("terminate called without an active exception", exit 134: `intel import` 3-4 runs in
    20 under load, session 29). Without /proc, a Python file object of a copy of the descriptor."""
    import pyarrow as pa

    proc = f"/proc/self/fd/{fd}"
    if os.path.exists(proc):
        return pa.OSFile(proc, "rb")
    return pa.PythonFile(os.fdopen(os.dup(fd), "rb"), mode="r")


@contextlib.contextmanager
def arrow_regular(path: Path) -> Iterator[Any]:
    """arrow_file of `path` opened as a regular file only (open_regular), closed after the block."""
    fd = open_regular(path)
    try:
        file = arrow_file(fd)
    finally:
        os.close(fd)
    with file:
        yield file


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _plain(parts: tuple[str, ...] | list[str], path: str) -> None:
    if any(part in ("", ".", "..") or "/" in part or "\0" in part for part in parts):
        raise OSError(errno.EINVAL, "not a plain path below the directory", path)


@contextlib.contextmanager
def beneath(root: Path, parts: tuple[str, ...] | list[str]) -> Iterator[int]:
    """A descriptor of the directory root/parts[0]/... reached one component at a time without following a
    symbolic link (O_NOFOLLOW at each step, so a link planted anywhere below `root`, or swapped in while this
    walks, is refused with OSError ELOOP/ENOTDIR instead of leading out of it). `root` itself may be a link
    (a lake given as /srv/lake -> /data/lake). A ".." or "." component, or one with a "/", is refused."""
    _plain(parts, "/".join(parts))
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            nxt = os.open(part, _DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def open_beneath(root: Path, relative: str) -> int:
    """A descriptor of the regular file root/relative reached without a symbolic link anywhere below `root`
    (see beneath), opened without blocking (a planted FIFO cannot hang the caller): OSError otherwise, whose
    strerror says what was found instead."""
    *dirs, name = relative.split("/")
    try:
        with beneath(root, dirs) as fd:
            file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(exc.errno, "reached through a symbolic link", str(root / relative)) from None
        raise
    st_mode = os.fstat(file_fd).st_mode
    if not stat.S_ISREG(st_mode):
        os.close(file_fd)
        raise OSError(errno.EINVAL, f"not a regular file (a {kind(st_mode)})", str(root / relative))
    return file_fd


def regular_beneath(root: Path, relatives: list[str]) -> list[os.stat_result | OSError]:
    """For each of `relatives` (files below `root`), what open_beneath would find, without opening any: the
    lstat of a regular file this process may read, else the OSError open_beneath raises (its errno and
    strerror: a symbolic link, or a file where a directory should be, ELOOP/ENOTDIR "reached through a
    symbolic link"; a FIFO, socket, device or directory, EINVAL "not a regular file (a FIFO)"; missing,
    ENOENT; unreadable, EACCES). `root` is opened once and each directory reached once from it (one component
    at a time, O_NOFOLLOW, as beneath) for the run of consecutive names it holds; then an lstat and an access
    check per file, where open_beneath makes about eight system calls."""
    out: list[os.stat_result | OSError] = []
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        found = _way_problem(exc)
        return [OSError(found.errno, found.strerror, str(root / relative)) for relative in relatives]
    folder: str | None = None
    fd: int | OSError = root_fd
    try:
        for relative in relatives:
            head, _, name = relative.rpartition("/")
            if head != folder:
                if isinstance(fd, int) and fd != root_fd:
                    os.close(fd)
                folder, fd = head, _walk(root_fd, head.split("/") if head else [])
            if isinstance(fd, OSError):
                out.append(OSError(fd.errno, fd.strerror, str(root / relative)))
            else:
                out.append(_regular_at(fd, name, root, relative))
    finally:
        if isinstance(fd, int) and fd != root_fd:
            os.close(fd)
        os.close(root_fd)
    return out


def _walk(root_fd: int, dirs: list[str]) -> int | OSError:
    """A new descriptor of the directory root/dirs, reached as beneath reaches it, or the OSError open_beneath
    would raise on the way."""
    fd = root_fd
    try:
        _plain(dirs, "/".join(dirs))
        for part in dirs:
            nxt = os.open(part, _DIRECTORY, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = nxt
        return fd if fd != root_fd else os.dup(root_fd)
    except OSError as exc:
        if fd != root_fd:
            os.close(fd)
        return _way_problem(exc)


def _way_problem(exc: OSError) -> OSError:
    """The OSError open_beneath raises when `exc` stopped it on the way to a file."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return OSError(exc.errno, "reached through a symbolic link")
    return OSError(exc.errno, exc.strerror)


def _regular_at(dir_fd: int, name: str, root: Path, relative: str) -> os.stat_result | OSError:
    """The lstat of `name` in directory `dir_fd` when it is a regular file this process may read, else the
    OSError open_beneath would raise for it (its O_NOFOLLOW refuses a link with ELOOP, its fstat the rest)."""
    try:
        found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        return OSError(exc.errno, exc.strerror, str(root / relative))
    if stat.S_ISREG(found.st_mode):
        if os.access(name, os.R_OK, dir_fd=dir_fd):
            return found
        return OSError(errno.EACCES, os.strerror(errno.EACCES), str(root / relative))
    if stat.S_ISLNK(found.st_mode):
        return OSError(errno.ELOOP, "reached through a symbolic link", str(root / relative))
    return OSError(errno.EINVAL, f"not a regular file (a {kind(found.st_mode)})", str(root / relative))


def move_beneath(root: Path, relative: str, target_root: Path, target: str) -> str:
    """Rename root/relative to target_root/target, both reached without a symbolic link below their roots
    (see beneath); the target's folders are made one at a time (a link planted among them is refused, never
    followed) and an existing file there is never replaced (a suffix is added). Returns the target used. A
    rename moves a link or a FIFO itself, without opening it."""
    *dirs, name = relative.split("/")
    *target_dirs, target_name = target.split("/")
    _plain([name, *target_dirs, target_name], target)
    with beneath(root, dirs) as source_fd, beneath(target_root, []) as fd:
        made = os.dup(fd)
        try:
            for part in target_dirs:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o750, dir_fd=made)
                nxt = os.open(part, _DIRECTORY, dir_fd=made)
                os.close(made)
                made = nxt
            chosen, n = target_name, 0
            while True:
                try:
                    os.lstat(chosen, dir_fd=made)
                except FileNotFoundError:
                    break
                n += 1
                chosen = f"{target_name}.{n}"
            os.rename(name, chosen, src_dir_fd=source_fd, dst_dir_fd=made)
        finally:
            os.close(made)
    return "/".join([*target_dirs, chosen])


def unlink_beneath(root: Path, relative: str) -> bool:
    """Remove the file root/relative when every directory on the way is a real directory below `root` (no
    symbolic link: see beneath) and the file itself is not a directory; a link as the last component is
    removed itself, never what it names. False (nothing removed) when the path leads through a link or does
    not exist. Tables are vacuumed this way: delta-rs' full vacuum lists a table's folder following links, so a
    link planted in a partition folder had it delete files anywhere the lake's user may (hostile review)."""
    *dirs, name = relative.split("/")
    try:
        with beneath(root, dirs) as fd:
            if stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                return False
            os.unlink(name, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.EINVAL):
            return False
        raise
    return True


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file `path` (see open_regular), or OSError; one larger than `max_bytes` is
    refused (EFBIG) before it is read."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise OSError(errno.EFBIG, f"{size} bytes, more than the limit of {max_bytes}", str(path))
        return handle.read(max_bytes + 1)[:max_bytes]


def input_problem(path: Path, directory_hint: str | None = None) -> str | None:
    """None when `path` is a regular file (or a symlink to one), else what it is instead, as a message.

    `directory_hint` completes "is a directory (...)" for readers that take files only (e.g. "give the capture
    files, e.g. DIR/*.pcap"); readers that expand directories check for one before calling this."""
    try:
        info = os.stat(path)  # stat, never open: opening a FIFO waits for a writer
        mode = info.st_mode
    except (FileNotFoundError, NotADirectoryError):
        if os.path.lexists(path):
            return f"is a symbolic link to {os.readlink(path)!r}, which does not exist"
        return "no such file or directory"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if stat.S_ISREG(mode) and info.st_dev in _kernel_filesystems():
        # (hostile review: a drop folder's link to /proc/self/mem failed the run as the lake's I/O error, and
        # /proc/kmsg, "a regular empty file", hung it)
        return "is a kernel interface file (/proc, /sys), not data"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"is a directory ({directory_hint or 'give the files in it'})"
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    return f"is not a regular file ({kind}); copy what it holds into a file and give that file"


@functools.cache
def _kernel_filesystems() -> frozenset[int]:
    """The devices of the kernel's pseudo filesystems (procfs, sysfs): their "regular files" are no input."""
    devices = set()
    for root in ("/proc", "/sys"):
        with contextlib.suppress(OSError):
            devices.add(os.stat(root).st_dev)
    return frozenset(devices)


def directory_problem(path: Path) -> str | None:
    """None when `path` is a directory (or a symlink to one) or does not exist yet (a writer creates it), else
    what it is instead, as a message: a lake given as a file, a FIFO or a symlink loop."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP, ENOTDIR (a parent is a file), EACCES
        return f"cannot be used: {exc.strerror}"
    if stat.S_ISDIR(mode):
        return None
    kind = next(
        (name for test, name in _KINDS if test(mode)), "regular file" if stat.S_ISREG(mode) else "file"
    )
    return f"is not a directory (a {kind})"


def replace_problem(path: Path) -> str | None:
    """None when `path` may be replaced by a rename (missing, or a regular file), else why not. Renaming over
    /dev/null (a `--stats-file /dev/null` or `--output /dev/null` as root) would put a regular file in its place
    and break every program on the host that writes there; a FIFO or socket someone listens on likewise."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # missing (or unreadable: the write itself will say so)
    if stat.S_ISREG(mode):
        return None
    kind = (
        "directory" if stat.S_ISDIR(mode) else next((n for test, n in _KINDS if test(mode)), "special file")
    )
    return (
        f"is not a regular file (a {kind}): tracepipe writes a file by replacing it atomically and never "
        "replaces a device, FIFO, socket or directory; give the path of a file"
    )


def cores() -> int:
    """The cores this process may run on (the size of a pool of readers or decoders)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def memory_bytes() -> int:
    """The memory this process may use: the machine's, or its cgroup's limit when lower (a container, a systemd
    slice: cgroup v2's memory.max of this process's group, else cgroup v1's limit)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limits = [Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, group = line.split(":", 2)
            group = group.strip().lstrip("/")
            if controllers == "":
                limits.append(Path("/sys/fs/cgroup") / group / "memory.max")
            elif "memory" in controllers.split(","):
                limits.append(Path("/sys/fs/cgroup/memory") / group / "memory.limit_in_bytes")
    except (OSError, ValueError):  # (not Linux, or a line of another form)
        pass
    for limit in limits:
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


# ---- private temporary directories ------------------------------------------------------------------------------

# tracepipe-<kind>-<pid>.<start>-XXXXXXXX: the process that made it (its pid and start time, in clock ticks since
# boot: a pid reused by another process is no match), so a later process can tell a directory left by one that was
# killed (a cron `timeout`, the OOM killer) from one still in use
_TEMP_NAME = re.compile(r"tracepipe-[a-z]+-([0-9]{1,10})\.([0-9]{1,20})-[A-Za-z0-9_]+")
_swept: list[bool] = []


def _started(pid: int) -> int | None:
    """The start time of process `pid` (field 22 of /proc/PID/stat), None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    try:  # (the command name in parentheses may hold spaces and parentheses: fields count after the last ')')
        return int(text[text.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def private_temp_dir(kind: str) -> Path:
    """A new directory of this process's own (mkdtemp: 0700, a name nobody held) in the temp directory, named
    after this process. The first call of a process also removes the directories that processes of this user
    since gone left there: a sweep killed while it spilled its buckets left gigabytes in /tmp for good, and every
    killed query an empty directory. Only directories of this user with such a name whose process is no longer
    running are removed (lstat: a planted symlink is never followed)."""
    me = os.getpid()
    if not _swept:
        _swept.append(True)
        with contextlib.suppress(OSError):
            _remove_left_temp_dirs(Path(tempfile.gettempdir()))
    started = _started(me)
    if started is None:  # (no /proc: no name to recognise later)
        return Path(tempfile.mkdtemp(prefix=f"tracepipe-{kind}-")).resolve()
    return Path(tempfile.mkdtemp(prefix=f"tracepipe-{kind}-{me}.{started}-")).resolve()


def _remove_left_temp_dirs(where: Path) -> None:
    import shutil

    uid = os.geteuid()
    with os.scandir(where) as entries:
        left = [e for e in entries if e.name.startswith("tracepipe-") and _TEMP_NAME.fullmatch(e.name)]
    for entry in left:
        match = _TEMP_NAME.fullmatch(entry.name)
        assert match is not None
        pid, started = int(match.group(1)), int(match.group(2))
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or _started(pid) == started:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
