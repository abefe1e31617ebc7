"""Worker processes that turn walked NetFlow records into the lake's Parquet parts (`ingest netflow --jobs N`).

In: `Walked` batches (records grouped by template, from netflow.walk_datagrams), ranges of nfcapd blocks that the
worker reads from the file itself (nffile.BlockRange), or byte ranges of an nfdump CSV file (nfdump.CsvRange), in
input order. The decoder state
(templates, sequence numbers, options values) never leaves the process that walks the datagrams, so it stays
exactly per exporter and domain, as with one process. Out: per batch the rejects and counters found while making
columns, handed back in input order; per source the closed day files of every worker, which the caller commits
(IngestWriter.adopt) in one Delta commit with the rest. Each batch goes to the worker with the fewest batches
queued (round robin among equals), so that one busy sorting and writing a row group does not leave the other
idle; workers are fresh interpreters (delta-rs is not fork-safe) and hold at most IN_FLIGHT batches each, so
memory stays bounded. This module imports nothing heavy (numpy, pyarrow, deltalake load in the workers and where
batches are made), so that a command can start the workers before its own imports (start_early).
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracepipe.errors import LakeError
from tracepipe.fsutil import cores

if TYPE_CHECKING:
    from deltalake.transaction import AddAction

    from tracepipe.ingest.netflow import Decoded, Walked
    from tracepipe.ingest.nffile import BlockRange

# files from this size on are decoded by the workers when jobs > 1 (starting them costs ~0.3 s of CPU each)
PARALLEL_MIN_BYTES = 64 << 20

IN_FLIGHT = 3  # batches queued per worker: one being decoded, two waiting (memory: ~3 x 7 MB of records): a
# worker writing a row group (~0.1-0.2 s) must not run its queue dry before the walker can refill it
# a worker that neither takes a batch nor answers for this long is hung, and killed: a batch is bounded (~7 MB of
# records, an nfcapd range of RANGE_RECORDS, a CSV range of 16 MB: seconds even on a loaded machine, a row group
# write included), so this is far beyond any real batch
HANG_SECONDS = 120.0


class WorkerFailed(LakeError):
    """A decode worker raised (a bug in turning records into columns, or its environment: disk full). The
    capture is decoded again in this process (flows._ingest_one), where a decoder bug is isolated to its
    datagrams and the environment fails as it would have."""


class InputChanged(Exception):
    """The file changed (appended, truncated, rewritten) while it was hashed and decoded: the hash and the rows
    may be of different bytes, so nothing of it is committed. Raised by the walking process (flows), and by a
    worker that finds the records it was sent to read no longer in the file (netflow.FileRecords)."""


def default_jobs() -> int:
    """The cores this process may run on."""
    return cores()


def _drain(inbox: Connection, messages: queue.SimpleQueue) -> None:
    """Read the inbox as soon as anything arrives (a thread; the pipe holds 64 KB, a batch ~7 MB): the walker's
    send then returns at once instead of waiting until this worker has finished its current batch, and can go
    on feeding the other workers (profiled at 3 M records: the walker spent most of its wall clock blocked
    there while workers ran dry). The parent bounds what is queued (IN_FLIGHT)."""
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):  # the parent is gone
            message = ("stop",)
        messages.put(message)
        if message[0] == "stop":
            return


def _worker(inbox: Connection, outbox: Connection, root: str) -> None:
    """One worker: ("begin", key or None, rows) opens a source's day files, ("batch", walked) decodes and writes
    a batch, ("close", key) finishes the files under their final names (lake.DayParts: the source's key, which
    may be known only then), ("abort",) deletes them, ("stop",) ends. Errors go back as text."""
    import pyarrow as pa

    from tracepipe.ingest.netflow import decode_walked
    from tracepipe.ingest.nffile import read_range
    from tracepipe.lake import DayParts, split_implausible
    from tracepipe.schema import DATASETS

    messages: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_drain, args=(inbox, messages), daemon=True).start()
    parts: DayParts | None = None
    rows = 0
    while True:
        message = messages.get()
        op = message[0]
        try:
            if op == "begin":  # key, row group rows, and the tag that starts this worker's file names
                parts, rows = DayParts(Path(root), DATASETS["flows"], message[1], message[2], message[3]), 0
            elif op == "batch":
                job = message[1]  # a Walked batch, or a job that decodes itself (nfdump.CsvRange)
                decoded = (
                    job.decode() if hasattr(job, "decode") else decode_walked(job, ipv4_as_integers=True)
                )
                assert parts is not None, "batch before begin"
                flows, implausible = split_implausible(decoded.flows, DATASETS["flows"])
                rows += parts.write(flows)
                rejects = decoded.rejects
                if implausible.num_rows:  # as IngestWriter.write would: rejects, in this batch's place
                    n = implausible.num_rows
                    same = pa.table(
                        {
                            f.name: implausible.column(f.name).cast(f.type)
                            if f.name in implausible.column_names
                            else pa.nulls(n, f.type)
                            for f in rejects.schema
                        },
                        schema=rejects.schema,
                    )
                    rejects = pa.concat_tables([rejects, same])
                # no rejects of a NetFlow batch (the usual answer): None, not an empty table (its schema pickles
                # to ~2 KB and costs the walking process ~1 ms to read back, per batch). A job that decodes itself
                # (nfdump.CsvRange) answers its table whatever it holds: its landing reads its columns (line).
                empty = not rejects.num_rows and not hasattr(job, "decode")
                outbox.send(("done", None if empty else rejects, decoded.stats))
            elif op == "nfcapd_range":  # nfcapd blocks, read here from the file (nffile.read_range)
                assert parts is not None, "range before begin"
                flows, found = read_range(message[1], ipv4_as_integers=True)
                flows, found.implausible = split_implausible(flows, DATASETS["flows"])
                rows += parts.write(flows)
                outbox.send(("nfcapd_done", found))
            elif op == "close":
                adds = parts.close(message[1]) if parts is not None else []
                parts = None
                outbox.send(("closed", adds, rows))
            elif op in ("abort", "stop"):
                if parts is not None:
                    parts.abort()
                    parts = None
                if op == "stop":
                    return
        except InputChanged as exc:  # the input, not a bug: the parent refuses the source with this text
            outbox.send(("changed", str(exc)))
            if parts is not None:
                parts.abort()
                parts = None
        except Exception:  # a bug or the environment (disk full): the parent raises it, with this text
            outbox.send(("error", traceback.format_exc(limit=8)))
            if parts is not None:
                parts.abort()
                parts = None


PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size: a ~7 MB batch in 7 reads instead of 110 of 64 KB


def _widen(fd: int) -> None:
    """Ask for a larger pipe buffer (Linux; elsewhere, or over the user's limit, the default stays): each
    64 KB read of a batch is a GIL hand-over between the worker's reading thread and its decoding one."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except (ImportError, OSError):
        pass


def start_early(jobs: int | None, root: Path, paths: Iterable[Path]) -> DecodePool:
    """A pool for `ingest netflow`, its workers already started when a file given by name is big enough for
    them (PARALLEL_MIN_BYTES, told from os.stat alone; directories are not walked for it): their start-up
    (interpreter, numpy, pyarrow: ~0.3 s each) then runs beside the command's own imports (~0.35 s) instead of
    after them (profiled for issue 17: one core idle meanwhile). The pool prestart() started for this
    process's command line is taken when it has the same jobs and lake (else stopped: nothing was sent to it).
    Otherwise not started: ingest starts it when a file needs it. Use as a context manager."""
    global _prestarted
    early, _prestarted = _prestarted, None
    pool = DecodePool(default_jobs() if jobs is None else jobs, root)
    if early is not None:
        if (early.jobs, early.root) == (pool.jobs, pool.root):
            return early
        early.stop()
    if pool.jobs > 1 and any(_big_file(Path(p)) for p in paths):
        pool.start()
    return pool


_prestarted: DecodePool | None = None  # prestart()'s pool, until start_early() takes it


def prestart(argv: list[str]) -> None:
    """Start the decode workers for an `ingest netflow` command line (`argv`: sys.argv[1:]) before the CLI
    loads typer, rich and pydantic (~0.2 s of one core, the other idle: profiled for issue 17); the command's
    start_early() then takes them. Read conservatively: anything not understood (another command, an unknown
    option, --help) starts nothing, and the command starts its workers as before. Never raises."""
    global _prestarted
    try:
        jobs, root, paths = _netflow_command_line(argv)
    except ValueError:
        return
    if _prestarted is None and jobs > 1 and any(_big_file(p) for p in paths):
        _prestarted = DecodePool(jobs, root)
        try:
            _prestarted.start()
        except OSError:  # out of processes or descriptors: the command reports it when it starts them itself
            _prestarted.stop()
            _prestarted = None


def _netflow_command_line(argv: list[str]) -> tuple[int, Path, list[Path]]:
    """(jobs, lake, paths) of `[--debug] ingest netflow [options] PATH...`; ValueError for anything else."""
    from tracepipe import DEFAULT_LAKE

    args = list(argv)
    while args[:1] == ["--debug"]:
        args.pop(0)
    if args[:2] != ["ingest", "netflow"]:
        raise ValueError("not ingest netflow")
    values = {"--jobs": "", "--lake": os.environ.get("TRACEPIPE_LAKE", DEFAULT_LAKE), "--format": ""}
    values |= {"--tz": "", "--allow": ""}  # (read past: they do not decide whether workers start)
    paths: list[Path] = []
    rest = iter(args[2:])
    for arg in rest:
        name, equals, value = arg.partition("=")
        if arg.startswith("-j") and arg[2:].isdigit():  # -j4
            name, equals, value = "--jobs", "=", arg[2:]
        name = "--jobs" if name == "-j" else name  # one option (click: the last one given wins)
        if arg == "--":
            paths.extend(Path(a) for a in rest)
        elif name in values and equals:
            values[name] = value
        elif name in values:
            given = next(rest, None)
            if given is None:  # typer refuses it too
                raise ValueError(f"{arg} without a value")
            values[name] = given
        elif arg.startswith("-"):  # --help, or an option this reader does not know
            raise ValueError(arg)
        else:
            paths.append(Path(arg))
    jobs = int(values["--jobs"]) if values["--jobs"] else default_jobs()  # ValueError: typer refuses it too
    return jobs, Path(values["--lake"]), paths


def _big_file(path: Path) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size >= PARALLEL_MIN_BYTES


class _Watchdog:
    """One thread per pool holding the deadlines of the sends and receives in progress, each for one worker of
    one generation (DecodePool.start makes a new generation): an expired deadline calls kill(generation,
    worker), which kills only a worker of that same generation (a Timer per message, as before, started a
    thread per batch, and one firing across a restart could kill the new worker of the same index)."""

    def __init__(self, seconds: float, kill: Callable[[int, int], None]) -> None:
        self.seconds = seconds
        self._kill = kill
        self._changed = threading.Condition()
        self._deadlines: dict[int, tuple[float, int, int]] = {}  # token -> (deadline, generation, worker)
        self._next = 0
        self._thread: threading.Thread | None = None
        self._closing = False

    @contextlib.contextmanager
    def watch(self, generation: int, worker: int) -> Iterator[None]:
        with self._changed:
            token, self._next = self._next, self._next + 1
            self._deadlines[token] = (time.monotonic() + self.seconds, generation, worker)
            if self._thread is None or not self._thread.is_alive():
                self._closing = False
                self._thread = threading.Thread(target=self._run, name="decode-pool-watchdog", daemon=True)
                self._thread.start()
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._deadlines.pop(token, None)

    def close(self) -> None:
        """End the thread (the pool stopped; a later watch() starts it again)."""
        with self._changed:
            self._closing = True
            self._deadlines.clear()
            self._changed.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    if self._closing:
                        return
                    now = time.monotonic()
                    due = [t for t, (deadline, _, _) in self._deadlines.items() if deadline <= now]
                    if due:
                        expired = [self._deadlines.pop(t)[1:] for t in due]
                        break
                    soonest = min((d for d, _, _ in self._deadlines.values()), default=None)
                    self._changed.wait(None if soonest is None else soonest - now)
            for generation, worker in expired:  # outside the lock: a kill waits for the process to die
                self._kill(generation, worker)


class DecodePool:
    """`jobs` spawned workers writing into the lake at `root`. Use as a context manager (workers stop at exit).
    A worker that does not take a message or answer within `hang_seconds` is killed (the call raises LakeError);
    abort() then removes the files it left: its temp files and its closed but uncommitted parts."""

    def __init__(self, jobs: int, root: Path, hang_seconds: float = HANG_SECONDS) -> None:
        self.jobs = max(1, jobs)
        self.root = root
        self.hang_seconds = hang_seconds
        self._key: str | None = None  # the current source's (begin; None while it is being hashed)
        self._closed: list[str] = []  # files closed by workers in a finish() not yet returned to the caller
        self._tags: list[str] = []  # per worker: the hex its file names start with, for this source
        self._hung: set[int] = set()  # workers killed for not answering
        self._conns: list[tuple[Connection, Connection]] = []  # per worker: (from it, to it)
        self._procs: list[subprocess.Popen] = []
        self._queued: list[list[int]] = []  # per worker: sequence numbers of batches sent, not answered
        self._sent = 0
        self._sources_left: int | None = None  # expect(): sources still to come; at 0 the workers end
        self._counted = False  # the current source was counted down by finish() (source_over)
        self._released = False  # told to end (release): a next start() spawns new ones
        self._generation = 0  # of the workers in _procs: start() makes a new one (the watchdog's kills)
        self._lock = threading.Lock()  # a kill and a restart never interleave
        self._watchdog = _Watchdog(hang_seconds, self._kill)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the workers (their start-up, ~0.5 s each, then overlaps with hashing the first file)."""
        if self._procs and not self._released:
            return
        if self._released:
            self.stop()
        # a fresh interpreter per worker (no fork: delta-rs is not fork-safe), started as a module so that the
        # caller's __main__ is never re-imported (multiprocessing's spawn would, and needs a __main__ guard)
        with self._lock:
            self._generation += 1
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
        for _ in range(self.jobs):
            to_child_r, to_child_w = os.pipe()
            from_child_r, from_child_w = os.pipe()
            _widen(to_child_w)
            cmd = [
                sys.executable,
                "-m",
                "tracepipe.ingest.decode_worker",
                str(self.root),
                str(to_child_r),
                str(from_child_w),
            ]
            try:
                proc = subprocess.Popen(
                    cmd, pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL
                )
            finally:
                os.close(to_child_r)
                os.close(from_child_w)
            self._conns.append(
                (Connection(from_child_r, writable=False), Connection(to_child_w, readable=False))
            )
            self._procs.append(proc)
            self._queued.append([])

    def begin(self, key: str | None) -> None:
        """Start a source: each worker opens day files named after `key` (lake.source_key), or under
        provisional names when the key is still being computed (finish gives it)."""
        from tracepipe.lake import ROW_GROUP_ROWS

        self.start()
        self._sent = 0
        # each worker buffers a row group per day and sorts it column by column (a copy): 1/(2 jobs) of the usual
        # size keeps all processes together under 1 GiB (3 M records, --jobs 2: 1,049 -> 864 MiB measured with
        # the 11 issue-16 router columns; CPU the same or lower, fewer page faults)
        row_group_rows = max(ROW_GROUP_ROWS // (2 * self.jobs), 100_000)
        self._key = key
        self._tags = []
        while len(self._tags) < self.jobs:  # distinct, and random: another run's files never match
            tag = secrets.token_hex(2)
            if tag not in self._tags:
                self._tags.append(tag)
        for worker in range(self.jobs):
            self._send(worker, ("begin", key, row_group_rows, self._tags[worker]))

    def submit(self, walked: Walked) -> list[tuple[int, Decoded]]:
        """Queue batch number `self._sent` with the least busy worker; returns the (batch number, Decoded)
        answers that came in meanwhile (not necessarily in order: the caller lands them in order)."""
        return self._queue(("batch", walked))

    def submit_nfcapd(self, blocks: BlockRange) -> list[tuple[int, Any]]:
        """Queue a range of nfcapd blocks as batch number `self._sent` (the worker reads them from the file);
        answers are (batch number, nffile.RangeRead), as for submit."""
        return self._queue(("nfcapd_range", blocks))

    def _queue(self, message: tuple[Any, ...]) -> list[tuple[int, Any]]:
        answers = []
        while min(len(q) for q in self._queued) >= IN_FLIGHT:  # all full: take what any worker has done
            ready = wait([self._conns[w][0] for w in range(self.jobs)], timeout=self.hang_seconds)
            if not ready:  # none of them answered: all are hung (or the machine is)
                for worker in range(self.jobs):
                    self._kill(self._generation, worker)
                raise self._died(0, None)
            answers.extend(self._answer(w) for w in range(self.jobs) if self._conns[w][0] in ready)
        # fewest queued first, ties in turn from the last one used (round robin when all keep pace)
        worker = min(range(self.jobs), key=lambda w: (len(self._queued[w]), (w - self._sent) % self.jobs))
        self._send(worker, message)
        self._queued[worker].append(self._sent)
        self._sent += 1
        return answers

    def expect(self, sources: int) -> None:
        """`sources` sources will go through the pool: after the last one's finish() the workers are told to
        end at once (release), so that their exit (~0.1 s of interpreter teardown each) runs while the caller
        commits, not after it (profiled for issue 17: the tail of a run). The caller calls source_over() after
        each of them, whether it landed, was skipped or aborted."""
        self._sources_left = sources
        self._counted = False

    def source_over(self) -> None:
        """One of the expected sources is done with, however it ended: counted down here unless its finish()
        did; after the last, the workers are told to end (a skipped or aborted last source left them waiting
        for the pool's exit before)."""
        if self._counted:
            self._counted = False
        else:
            self._count_down()

    def _count_down(self) -> None:
        if self._sources_left is not None:
            self._sources_left -= 1
            if self._sources_left <= 0:
                self.release()

    def release(self) -> None:
        """Tell the workers to end, without waiting for them (stop() does); a later start() spawns new ones."""
        self._tell_all(("stop",))
        for _, to_worker in self._conns:
            to_worker.close()
        self._released = True

    def _tell_all(self, message: tuple[Any, ...]) -> None:
        """Send `message` to every worker that still reads (one that died or was told to end is skipped)."""
        for _, to_worker in self._conns:
            try:
                to_worker.send(message)
            except OSError:
                pass

    def finish(self, key: str | None = None) -> tuple[list[tuple[int, Decoded]], list[AddAction], int]:
        """All answers still due, then every worker's day files closed under the source's `key` (None: the
        one given to begin) and the rows in them."""
        answers = [self._answer(w) for w in range(self.jobs) for _ in range(len(self._queued[w]))]
        adds: list[AddAction] = []
        rows = 0
        for worker in range(self.jobs):
            self._send(worker, ("close", key))
        for worker in range(self.jobs):
            reply = self._receive(worker)
            if reply[0] != "closed":
                raise LakeError(f"decode worker {worker}: unexpected answer {reply[0]!r}")
            adds.extend(reply[1])
            self._closed.extend(add.path for add in reply[1])  # abort() removes them if another fails
            rows += reply[2]
        self._closed = []  # the caller owns them now (IngestWriter.adopt: its abort removes them)
        if self._sources_left is not None:  # before the caller's commit (see expect)
            self._counted = True
            self._count_down()
        return answers, adds, rows

    def abort(self) -> None:
        """Drop the current source: workers delete the files they wrote for it and stop (answers still on
        their way are dropped with them; a next source starts new workers). The files of a worker that was
        killed (hung, or died) are removed here, and so are parts a worker had already closed: nothing of this
        source is committed yet, so no file named with its key and a worker's tag is in the lake."""
        self._tell_all(("abort",))
        self.stop()  # (takes the names of parts closed in answers still unread)
        # what a killed worker could not delete: its temp files, under the provisional names of a source whose
        # key was still being computed (part-<tag>-<random>) or under the key's (part-<key>-<tag>...); only
        # temp files, never a finished name, which another writer of the same key may have committed
        flows = self.root / "flows"
        for tag in self._tags:
            patterns = [f"*/part-{tag}-*.tmp"] + ([f"*/part-{self._key}-{tag}*.tmp"] if self._key else [])
            for pattern in patterns:
                for path in flows.glob(pattern):  # the day folders
                    path.unlink(missing_ok=True)
        for relative in self._closed:  # closed by a worker in a finish() that failed for another
            (flows / relative).unlink(missing_ok=True)
        self._key, self._tags, self._closed = None, [], []

    def stop(self) -> None:
        """Tell the workers to end (release: a second time does nothing) and wait for them."""
        self.release()
        for proc in self._procs:
            try:
                proc.wait(timeout=self.hang_seconds)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for from_worker, _ in self._conns:
            # a worker that closed its parts before the source failed for another (hung, killed) sent their
            # names in an answer nobody read: taken here so that abort() removes them too (under load the
            # answer came after the parent gave up, and a closed part stayed in the lake, uncommitted)
            with contextlib.suppress(EOFError, OSError):
                while from_worker.poll(0):
                    reply = from_worker.recv()
                    if isinstance(reply, tuple) and reply and reply[0] == "closed":
                        self._closed.extend(add.path for add in reply[1])
            from_worker.close()
        with self._lock:
            self._conns, self._procs, self._queued = [], [], []
        self._watchdog.close()
        self._hung = set()
        self._released = False

    def _watch(self, worker: int) -> contextlib.AbstractContextManager[None]:
        """Kill `worker` if the send or receive inside does not return within hang_seconds: a stopped worker
        does not read its pipe and never answers. The blocked call then fails (EPIPE, end of file) and raises
        _died."""
        return self._watchdog.watch(self._generation, worker)

    def _kill(self, generation: int, worker: int) -> None:
        """Kill `worker` of `generation`: never one of a later generation (its deadline outlived a restart),
        nor any once the pool stopped."""
        with self._lock:
            if generation != self._generation or worker >= len(self._procs):
                return
            self._hung.add(worker)
            proc = self._procs[worker]
            proc.kill()  # SIGKILL: a stopped process dies too
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)  # dead before abort() removes its files (unless stuck in the kernel)

    def _send(self, worker: int, message: tuple[Any, ...]) -> None:
        try:
            with self._watch(worker):
                self._conns[worker][1].send(message)
        except OSError as exc:
            raise self._died(worker, exc) from exc

    def _died(self, worker: int, exc: BaseException | None) -> LakeError:
        if worker in self._hung:
            return LakeError(
                f"decode worker {worker} did not answer within {self.hang_seconds:.0f} s and was killed; the files "
                "it wrote are removed and nothing of this source landed. Rerun the same command (it lands the "
                "source once); if it hangs again, rerun with --jobs 1 and check the lake's storage (dmesg)"
            )
        return LakeError(
            f"decode worker {worker} died ({exc or 'no answer'}); rerun with --jobs 1 to decode in one process, "
            "or check memory (dmesg) and free space of the lake"
        )

    def _answer(self, worker: int) -> tuple[int, Any]:
        import pyarrow as pa

        from tracepipe.ingest.netflow import Decoded

        reply = self._receive(worker)
        seq = self._queued[worker].pop(0)
        if reply[0] == "nfcapd_done":
            return seq, reply[1]
        if reply[0] != "done":
            raise LakeError(f"decode worker {worker}: unexpected answer {reply[0]!r}")
        _, rejects, stats = reply
        empty = pa.table({})  # the flows are in the worker's files; no rejects: nothing to land
        return seq, Decoded(empty, empty if rejects is None else rejects, stats)

    def _receive(self, worker: int) -> tuple[Any, ...]:
        try:
            with self._watch(worker):
                reply = self._conns[worker][0].recv()
        except (EOFError, OSError) as exc:
            raise self._died(worker, exc) from exc
        if reply[0] == "changed":
            raise InputChanged(reply[1])
        if reply[0] == "error":
            raise WorkerFailed(
                f"decode worker {worker} failed: {reply[1].strip().splitlines()[-1]}. Rerun with --jobs 1 "
                "--debug to see where."
            )
        return reply
