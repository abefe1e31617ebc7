"""Run the real NetFlow tools on the loopback interface: softflowd, fprobe, pmacctd, nfcapd/nfdump, tcpdump.

Test scaffolding (not in the package), used by the tests, the benchmarks and the sample_data scripts to make *real* export traffic and to read what
the reference collector (nfdump 1.7.1) makes of it. Every process gets a timeout and is always stopped in a
`finally`; nothing here ever talks to an address other than 127.0.0.1 or ::1.

Facts about the tools that these wrappers encode (Debian bookworm: softflowd 1.1.0, fprobe 1.1, nfdump 1.7.1,
tcpdump 4.99):
- `softflowd -r FILE` needs `-c none`: with a control socket it calls accept() on an uninitialised poll result
  and blocks forever after reading the file. `-a` takes "now" and the boot time from the packet timestamps;
  without it, flow times are packet time minus wall-clock boot time, which wraps the 32-bit sysUptime fields.
  At EOF it exports every flow still in its table ("flushed") and exits. v5 carries IPv4 only (softflowd does
  not even track IPv6 packets for v5); v9 and IPFIX carry both.
- `fprobe` daemonises unless it logs to stdout (`-l 2:ID`); then it stays in the foreground and a plain
  SIGTERM to its pid stops it. It only captures live (no pcap files).
- `nfcapd` writes `nfcapd.current.PID` and renames it to `nfcapd.YYYYMMDDhhmm` when it rotates or on SIGTERM.
- `nfdump` prints local time: it is always run with TZ=UTC here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from tracepipe.errors import EnvironmentProblem
from tracepipe.tools import tool_path

LOOPBACK_V4 = "127.0.0.1"
LOOPBACK_V6 = "::1"
_LOOPBACKS = (LOOPBACK_V4, LOOPBACK_V6)
# the destination MAC of every Ethernet frame a test builds (00:00:5e:00:53:xx: documentation, RFC 7042): without
# one, scapy asks the network (ARP, neighbour discovery) for the MAC of the frame's IP destination
LAN_MAC = "00:00:5e:00:53:01"


# ---- small helpers ----------------------------------------------------------------------------------------------


def _check_loopback(host: str) -> str:
    if host not in _LOOPBACKS:
        raise ValueError(f"probes only talk to loopback ({', '.join(_LOOPBACKS)}), not {host!r}")
    return host


def _host_port(host: str, port: int) -> str:
    """`127.0.0.1:9995` or `[::1]:9995`, the syntax softflowd and fprobe accept."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_udp_port(host: str = LOOPBACK_V4) -> int:
    """A UDP port that is free on `host` right now (the kernel picks it; parallel runs do not collide)."""
    _check_loopback(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot bind UDP on {host}: {exc}. IPv6 tests need ::1 on the loopback interface "
                "(sysctl -w net.ipv6.conf.lo.disable_ipv6=0)."
            ) from exc
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    """Send `sig` to one process we started, wait for it, SIGKILL it if it does not exit in time."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL it when the process that started it dies, so that a
    killed test run (CI timeout, SIGKILL) leaves no tcpdump, nfcapd or fprobe behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start(cmd: list[str], log_handle) -> subprocess.Popen:
    """A long-running tool, its stdout and stderr into `log_handle`."""
    return subprocess.Popen(
        cmd,
        stdout=log_handle,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )


def _wait_for_text(log: Path, pattern: str, proc: subprocess.Popen, timeout: float, what: str) -> str:
    """Poll a log file until `pattern` (regex) appears; fail clearly if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(pattern, text):
            return text
        if proc.poll() is not None:
            raise EnvironmentProblem(
                f"{what} exited with code {proc.returncode} before it was ready:\n{text}"
            )
        if time.monotonic() > deadline:
            raise EnvironmentProblem(
                f"{what} not ready after {timeout:.0f} s (waiting for {pattern!r}):\n{text}"
            )
        time.sleep(0.02)


def _run_to_end(cmd: list[str], what: str, timeout: float) -> tuple[int, str]:
    """Run a tool that exits by itself (a probe replaying a pcap): (exit code, stdout + stderr); a tool still
    running after `timeout` is killed and reported."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:  # run() has killed it
        raise EnvironmentProblem(f"{what} did not finish within {timeout:.0f} s: {' '.join(cmd)}") from exc
    return proc.returncode, proc.stdout + proc.stderr


def udp_receive_queue(port: int, host: str = LOOPBACK_V4) -> int | None:
    """Bytes waiting in the receive queue of the UDP socket bound to host:port (Linux /proc/net/udp[6]), None
    if no such socket. Zero means the receiver has read everything sent to it so far."""
    table = Path("/proc/net/udp6" if ":" in host else "/proc/net/udp")
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[1].rsplit(":", 1)[1] == f"{port:04X}":
            return int(fields[4].split(":")[1], 16)
    return None


def count_pcap_packets(path: Path | str) -> int:
    """Number of complete records in a pcap file (classic format; what tcpdump -w writes)."""
    data = Path(path).read_bytes() if Path(path).exists() else b""
    if len(data) < 24:
        return 0
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    offset, count = 24, 0
    while offset + 16 <= len(data):
        incl_len = struct.unpack_from(endian + "I", data, offset + 8)[0]
        if offset + 16 + incl_len > len(data):
            break
        offset += 16 + incl_len
        count += 1
    return count


# ---- tcpdump ------------------------------------------------------------------------------------------------------


@dataclass
class Capture:
    """A running `tcpdump -w` (see capture_udp)."""

    path: Path
    proc: subprocess.Popen
    log: Path

    def packets(self) -> int:
        return count_pcap_packets(self.path)

    def wait_for_packets(self, n: int, timeout: float = 10.0) -> int:
        """Block until the capture file holds at least `n` packets; returns the count (fails on timeout)."""
        deadline = time.monotonic() + timeout
        while (got := self.packets()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"tcpdump captured {got} packets into {self.path}, expected >= {n}")
            time.sleep(0.05)
        return got

    def wait_until_quiet(self, quiet: float = 0.5, timeout: float = 20.0) -> int:
        """Block until no packet arrived for `quiet` seconds (live probes whose datagram count is unknown)."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now = self.packets()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return now
            time.sleep(0.05)
        return self.packets()


@contextlib.contextmanager
def capture_udp(
    port: int,
    out_pcap: Path | str,
    iface: str = "lo",
    link_type: str | None = None,
    bpf: str | None = None,
    buffer_kb: int = 65536,
    timeout: float = 15.0,
) -> Iterator[Capture]:
    """Record UDP datagrams to/from `port` on `iface` into `out_pcap` with the real tcpdump.

    iface="lo" gives Ethernet link type; iface="any" gives Linux cooked capture (LINUX_SLL2 by default,
    `link_type="LINUX_SLL"` for v1). Yields once tcpdump reports "listening on"; on exit stops it with SIGINT
    and waits for it to flush (-U writes every packet as it comes). `buffer_kb` is the kernel capture buffer
    (-B): softflowd flushing thousands of flows at EOF is a burst that the default 2 MB buffer drops.
    """
    out_pcap = Path(out_pcap)
    out_pcap.parent.mkdir(parents=True, exist_ok=True)
    log = out_pcap.with_name(out_pcap.name + ".tcpdump.log")
    cmd = [
        tool_path("tcpdump"),
        "-i",
        iface,
        "-U",
        "-n",
        "--immediate-mode",
        "-B",
        str(buffer_kb),
        "-w",
        str(out_pcap),
    ]
    if os.geteuid() == 0:
        cmd += ["-Z", "root"]  # keep root: the drop to user tcpdump could not write into a 0700 test dir
    if link_type:
        cmd += ["-y", link_type]
    cmd.append(bpf or f"udp port {port}")
    with open(log, "wb") as log_handle:
        proc = _start(cmd, log_handle)
    try:
        _wait_for_text(log, r"listening on", proc, timeout, "tcpdump")
        yield Capture(out_pcap, proc, log)
    finally:
        time.sleep(0.1)  # the kernel hands the last datagrams to tcpdump asynchronously
        stop_process(proc, signal.SIGINT, timeout=timeout)


# ---- nfcapd / nfdump ------------------------------------------------------------------------------------------


@dataclass
class NfcapdRun:
    """A real nfcapd receiving on loopback. `files` and `log_text` are filled in when the context exits."""

    out_dir: Path
    host: str
    port: int
    log: Path
    files: list[Path] = field(default_factory=list)
    log_text: str = ""

    @property
    def flows_received(self) -> int | None:
        """Flow count nfcapd reports at shutdown ("Ident: 'none' Flows: 8, ..."), None if absent."""
        found = re.findall(r"Flows: (\d+)", self.log_text)
        return sum(int(n) for n in found) if found else None


NFCAPD_INTERVAL = 86_400  # nfcapd's -t: one file a UTC day
NFCAPD_ROTATION_GUARD = 180.0  # seconds before midnight UTC in which a run waits for it to pass


@contextlib.contextmanager
def nfcapd_receiving(
    port: int, out_dir: Path | str, host: str = LOOPBACK_V4, settle: float = 0.2, timeout: float = 15.0
) -> Iterator[NfcapdRun]:
    """Run nfcapd (nfdump 1.7.1) in the foreground on host:port writing into `out_dir`.

    On exit it waits until nfcapd's socket has no unread datagram (then `settle` seconds more for the last one
    to be processed), then SIGTERM, which makes nfcapd close and rename its current file; `run.files` lists
    the resulting nfcapd files.
    """
    _check_loopback(host)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir.parent / f"{out_dir.name}.nfcapd.log"
    # nfcapd rotates its file at every multiple of -t seconds of the epoch clock, whenever it started (-t 3600:
    # at each UTC hour, which split a test's export into two files when a run crossed it). -t 86400 rotates at
    # midnight UTC only, and a run that would start within NFCAPD_ROTATION_GUARD seconds of it waits past it:
    # one file per run, whatever the time of day. -B: room for a burst of export datagrams.
    to_midnight = NFCAPD_INTERVAL - time.time() % NFCAPD_INTERVAL
    if to_midnight < NFCAPD_ROTATION_GUARD:
        time.sleep(to_midnight + 1.0)
    cmd = [
        tool_path("nfcapd"),
        "-b",
        host,
        "-p",
        str(port),
        "-w",
        str(out_dir),
        "-t",
        str(NFCAPD_INTERVAL),
        "-B",
        "33554432",
    ]
    if ":" in host:
        cmd.append("-6")
    run = NfcapdRun(out_dir, host, port, log)
    with open(log, "wb") as log_handle:
        proc = _start(cmd, log_handle)
    try:
        _wait_for_text(log, r"Startup", proc, timeout, "nfcapd")
        yield run
        deadline = time.monotonic() + timeout
        while (udp_receive_queue(port, host) or 0) > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(settle)
    finally:
        stop_process(proc, signal.SIGTERM, timeout=timeout)
        run.log_text = log.read_text(errors="replace") if log.exists() else ""
        run.files = sorted(p for p in out_dir.glob("nfcapd.*") if ".current." not in p.name)


def nfdump_records(nfcapd_path: Path | str, timeout: float = 120.0) -> pa.Table:
    """Every record nfdump prints for an nfcapd file or directory, as a table with schema.FLOWS column names
    (ts_start/ts_end UTC with ms, canonical addresses, ICMP type/code folded into dst_port, flags as int)."""
    from tracepipe.ingest.nfdump import read_nfcapd

    table, rejects = read_nfcapd(nfcapd_path, timeout=timeout, window=False)
    if rejects.num_rows:
        raise AssertionError(f"could not parse nfdump's own output: {rejects.to_pylist()[:3]}")
    return table


def nfdump_csv(
    nfcapd_path: Path | str, out_csv: Path | str, quiet: bool = False, tz: str = "UTC", timeout: float = 120.0
) -> Path:
    """Write what `nfdump -o csv` prints for an nfcapd file or directory (times in local time `tz`; `quiet`
    adds -q: no header line, no Summary trailer)."""
    nfcapd_path, out_csv = Path(nfcapd_path), Path(out_csv)
    cmd = [tool_path("nfdump"), "-R" if nfcapd_path.is_dir() else "-r", str(nfcapd_path), "-o", "csv"]
    if quiet:
        cmd.append("-q")
    with open(out_csv, "wb") as handle:
        proc = subprocess.run(
            cmd,
            stdout=handle,
            stderr=subprocess.PIPE,
            timeout=timeout,
            env=dict(os.environ, TZ=tz, LC_ALL="C"),
            stdin=subprocess.DEVNULL,
        )
    if proc.returncode != 0:
        raise EnvironmentProblem(
            f"nfdump -o csv failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')}"
        )
    return out_csv


def nfcapd_of(datagrams: Sequence[bytes], out_dir: Path | str) -> Path:
    """The directory where a real nfcapd on 127.0.0.1 wrote the given export datagrams (sent in order), for
    nfdump to print what it made of them."""
    port = free_udp_port()
    with nfcapd_receiving(port, out_dir) as nfcapd:
        replay_udp(datagrams, (LOOPBACK_V4, port))
    return nfcapd.out_dir


def export_payloads(capture: Path | str) -> list[bytes]:
    """The UDP payloads (export datagrams) of a capture, in order, whatever its link type (scapy reads it)."""
    from scapy.layers.inet import UDP
    from scapy.utils import rdpcap

    return [bytes(packet[UDP].payload) for packet in rdpcap(str(capture)) if UDP in packet]


def replay_udp(payloads: Sequence[bytes], dest: tuple[str, int], pace: int = 256) -> int:
    """Send datagrams to a loopback collector in order from one socket (a short pause every `pace` datagrams
    so that the receiver keeps up). With nfcapd_receiving this shows nfdump the exact datagrams of any export
    capture, e.g. a committed sample. Returns the number sent."""
    host, port = dest
    _check_loopback(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        for index, payload in enumerate(payloads, start=1):
            sock.sendto(payload, (host, port))
            if index % pace == 0:
                time.sleep(0.01)
    return len(payloads)


# ---- softflowd ------------------------------------------------------------------------------------------------


@dataclass
class SoftflowdResult:
    datagrams: int  # export datagrams softflowd says it sent
    flows: int  # flows exported
    records: int  # records exported (IPFIX/v9 may differ from flows for bidirectional accounting)
    output: str


def softflowd_export(
    traffic_pcap: Path | str,
    version: int,
    dest: tuple[str, int],
    timeouts: dict[str, int] | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> SoftflowdResult:
    """Replay `traffic_pcap` through the real softflowd, exporting NetFlow `version` (1, 5, 9 or 10 = IPFIX) to
    `dest` (127.0.0.1 or ::1). Returns once softflowd has exported every flow (it flushes all at EOF) and exited.

    `timeouts` sets softflowd's named timeouts (`-t tcp=60` ...); with `-r` they only matter for flows that end
    inside the file.
    """
    host, port = dest
    _check_loopback(host)
    if version not in (1, 5, 9, 10):
        raise ValueError(f"softflowd exports NetFlow v1, v5, v9 or 10 (IPFIX), not {version}")
    with tempfile.TemporaryDirectory(prefix="tracepipe-softflowd-") as tmp:
        cmd = [
            tool_path("softflowd"),
            "-r",
            str(traffic_pcap),
            "-n",
            _host_port(host, port),
            "-v",
            str(version),
            "-d",
            "-a",
            "-c",
            "none",
            "-p",
            str(Path(tmp) / "softflowd.pid"),
        ]
        for name, seconds in (timeouts or {}).items():
            cmd += ["-t", f"{name}={seconds}"]
        cmd += list(extra_args)
        returncode, output = _run_to_end(cmd, "softflowd", timeout)
    match = re.search(r"Flows exported: (\d+) \((\d+) records\) in (\d+) packets \((\d+) failures\)", output)
    if returncode != 0 or match is None:
        raise EnvironmentProblem(f"softflowd failed (exit {returncode}): {' '.join(cmd)}\n{output}")
    flows, records, datagrams, failures = (int(g) for g in match.groups())
    if failures:
        raise EnvironmentProblem(f"softflowd reported {failures} send failures:\n{output}")
    return SoftflowdResult(datagrams=datagrams, flows=flows, records=records, output=output)


# ---- pmacctd (pmacct's nfprobe plugin) ------------------------------------------------------------------------


def pmacctd_export(
    traffic_pcap: Path | str,
    version: int,
    timeout: float = 60.0,
) -> list[bytes]:
    """Replay `traffic_pcap` through the real pmacctd (pmacct 1.7.7, plugin nfprobe) exporting NetFlow `version`
    (5, 9 or 10 = IPFIX) to a UDP socket of ours on 127.0.0.1; returns the export datagrams in the order sent.

    pmacctd facts (1.7.7): with `pcap_savefile` it sleeps 2 s (plugins start), reads the file, and at its end
    flushes the nfprobe cache and exits (`pcap_savefile_wait: false`), so every flow is exported once it is gone.
    Its default v9/IPFIX template (no `aggregate`): flowStart/EndMilliseconds, octets, packets (8 bytes each),
    ipVersion, interfaces, flowDirection, addresses, ports, tos, TCP flags, protocol. Timeouts of 1 s: flows
    idle that long within the file end there, as a live probe would end them.
    """
    if version not in (5, 9, 10):
        raise ValueError(f"pmacctd's nfprobe exports NetFlow v5, v9 or 10 (IPFIX), not {version}")
    for attempt in range(PMACCTD_ATTEMPTS):
        try:
            return _pmacctd_export_once(traffic_pcap, version, timeout)
        except _PmacctdShutdownRace:
            if attempt == PMACCTD_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


# pmacctd 1.7.7's own shutdown race: at the end of the file the core tells the nfprobe plugin to stop; when the
# plugin ends before the core has finished waiting for it, the core logs "connection lost to
# 'default_nfprobe-nfprobe'" and exits 1 instead of "OK, Exiting ...". Seen ~1 run in 45 on a loaded machine
# (three pmacctd at once): the replay is deterministic, so a fresh run gives the same datagrams.
PMACCTD_ATTEMPTS = 3


class _PmacctdShutdownRace(EnvironmentProblem):
    pass


def _pmacctd_export_once(traffic_pcap: Path | str, version: int, timeout: float) -> list[bytes]:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
        tempfile.TemporaryDirectory(prefix="tracepipe-pmacctd-") as tmp,
    ):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024 * 1024)
        sock.bind((LOOPBACK_V4, 0))
        port = sock.getsockname()[1]
        config = Path(tmp) / "pmacctd.conf"
        config.write_text(
            "daemonize: false\n"
            f"pcap_savefile: {Path(traffic_pcap).resolve()}\n"
            "pcap_savefile_wait: false\n"
            "plugins: nfprobe\n"
            f"nfprobe_receiver: {_host_port(LOOPBACK_V4, port)}\n"
            f"nfprobe_version: {version}\n"
            "nfprobe_timeouts: tcp=1:tcp.rst=1:tcp.fin=1:udp=1:icmp=1:general=1:maxlife=1:expint=1\n"
        )
        cmd = [tool_path("pmacctd"), "-f", str(config)]
        returncode, output = _run_to_end(cmd, "pmacctd", timeout)
        if returncode != 0 or "Exporting flows to" not in output:
            race = "Shutting down on user request" in output and "connection lost to" in output
            problem = _PmacctdShutdownRace if race else EnvironmentProblem
            raise problem(f"pmacctd failed (exit {returncode}):\n{config.read_text()}\n{output}")
        # pmacctd has exited: everything it sent over loopback is in our socket's queue already
        sock.setblocking(False)
        datagrams = []
        while True:
            try:
                datagrams.append(sock.recv(65535))
            except BlockingIOError:
                return datagrams


# ---- fprobe ---------------------------------------------------------------------------------------------------


@dataclass
class FprobeRun:
    proc: subprocess.Popen
    log: Path
    pidfile: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request_stop(self) -> None:
        """SIGTERM without waiting: fprobe exports the flows it still holds, which takes it a few seconds, so
        several probes are best stopped together (the context exit then only waits)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)


@contextlib.contextmanager
def fprobe_export(
    version: int,
    dest_port: int,
    bpf: str,
    iface: str = "lo",
    dest_host: str = LOOPBACK_V4,
    idle_timeout: int = 1,
    active_timeout: int = 2,
    scan_interval: int = 1,
    timeout: float = 15.0,
) -> Iterator[FprobeRun]:
    """Run the real fprobe capturing `iface` (filter `bpf`, which must exclude the export traffic itself) and
    exporting NetFlow `version` (1, 5 or 7) to dest_host:dest_port. Short idle/active timeouts make it export
    within seconds. Yields once capture is up; on exit stops it by its pid (SIGTERM)."""
    _check_loopback(dest_host)
    if version not in (1, 5, 7):
        raise ValueError(f"fprobe exports NetFlow v1, v5 or v7, not {version}")
    ident = f"tracepipe{dest_port}"
    workdir = Path(tempfile.mkdtemp(prefix="tracepipe-fprobe-"))
    log = workdir / "fprobe.log"
    # -l 2:ID logs to stdout, which keeps fprobe in the foreground: its pid is the one we started
    cmd = [
        tool_path("fprobe"),
        "-i",
        iface,
        "-f",
        bpf,
        "-n",
        str(version),
        "-d",
        str(idle_timeout),
        "-e",
        str(active_timeout),
        "-s",
        str(scan_interval),
        "-l",
        f"2:{ident}",
        _host_port(dest_host, dest_port),
    ]
    with open(log, "wb") as log_handle:
        proc = _start(cmd, log_handle)
    run = FprobeRun(proc, log, Path("/var/run") / f"fprobe[{ident}].pid")
    try:
        _wait_for_text(log, r"collector #1", proc, timeout, "fprobe")
        time.sleep(0.2)  # capture thread starts after the log line
        yield run
    finally:
        stop_process(proc, signal.SIGTERM, timeout=timeout)
        run.pidfile.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


# ---- traffic builder ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowSpec:
    """One conversation to put into a traffic pcap.

    kind: "tcp" (handshake, data, FIN close), "tcp-rst" (handshake, data, RST), "tcp-syn" (unanswered SYNs),
    "udp" (request/response datagrams), "icmp" (echo request/reply, or one message of icmp_type/icmp_code).
    Addresses decide the IP version (ICMP over IPv6 becomes ICMPv6).
    """

    kind: str
    src: str
    dst: str
    sport: int = 0
    dport: int = 0
    start: float = 0.0  # seconds after the capture's t0
    packets: int = 4  # data packets (tcp) / datagrams (udp) / echo pairs (icmp)
    payload: int = 100  # bytes per data packet
    gap: float = 0.2  # seconds between packets
    icmp_type: int | None = None  # None: echo request/reply pairs
    icmp_code: int = 0
    reply: bool = True  # udp/icmp: the other end answers


# 2024-03-12 10:00:00 UTC, a fixed date so that outputs are reproducible
DEFAULT_T0 = 1710237600.0


def default_flow_specs(seed: int = 1, ipv6: bool = True, n: int = 40, span: float = 180.0) -> list[FlowSpec]:
    """A deterministic mixed workload: TCP sessions (closed, reset, unanswered), DNS/NTP over UDP, ICMP echo and
    unreachables, and the same over IPv6 when `ipv6`. Documentation prefixes only (RFC 5737 / RFC 3849)."""
    rng = random.Random(seed)
    # Lead-in: softflowd -a takes its boot time from the first packet, so a flow made only of that packet has
    # LAST_SWITCHED 0, and nfdump 1.7.1 reads "last == 0" as "no time" (prints 1970-01-01). A two-packet
    # exchange at t0 keeps every exported end time above 0.
    lead_in = FlowSpec("udp", "10.0.0.1", "192.0.2.53", 40000, 53, start=0.0, packets=1, payload=30)
    clients4 = [f"10.0.{i}.{j}" for i, j in ((0, 5), (0, 6), (1, 7), (2, 9))]
    servers4 = ["192.0.2.10", "198.51.100.20", "203.0.113.30"]
    clients6 = ["2001:db8:0:1::5", "2001:db8:0:1::6"]
    servers6 = ["2001:db8:ffff::10", "2001:db8:ffff::20"]
    specs: list[FlowSpec] = [lead_in]
    families = [(clients4, servers4)] + ([(clients6, servers6)] if ipv6 else [])
    for i in range(n):
        clients, servers = families[i % len(families)]
        src, dst = rng.choice(clients), rng.choice(servers)
        start = rng.uniform(0.5, span)
        sport = rng.randint(32768, 60999)
        pick = rng.random()
        if pick < 0.35:
            spec = FlowSpec(
                "tcp",
                src,
                dst,
                sport,
                rng.choice([22, 80, 443, 8080]),
                start,
                packets=rng.randint(1, 6),
                payload=rng.randint(1, 1400),
            )
        elif pick < 0.45:
            spec = FlowSpec(
                "tcp-rst", src, dst, sport, rng.choice([25, 443]), start, packets=rng.randint(0, 2)
            )
        elif pick < 0.55:
            spec = FlowSpec(
                "tcp-syn", src, dst, sport, rng.randint(1, 1024), start, packets=rng.randint(1, 3), gap=1.0
            )
        elif pick < 0.75:
            port = rng.choice([53, 123])
            spec = FlowSpec(
                "udp",
                src,
                dst,
                sport,
                port,
                start,
                packets=rng.randint(1, 3),
                payload=48 if port == 123 else rng.randint(20, 80),
            )
        elif pick < 0.9:
            spec = FlowSpec("icmp", src, dst, start=start, packets=rng.randint(1, 4), payload=56, gap=1.0)
        else:
            v6 = ":" in src
            spec = FlowSpec(
                "icmp",
                dst,
                src,
                start=start,
                packets=1,
                payload=28,
                reply=False,
                icmp_type=1 if v6 else 3,
                icmp_code=4 if v6 else 3,
            )
        specs.append(spec)
    return specs


@dataclass(frozen=True)
class TrafficPacket:
    """One packet of a conversation, before it is rendered into frame bytes."""

    time: float
    forward: bool  # client -> server
    layer: str  # "tcp", "udp", "icmp"
    flags: str = ""  # tcp flags, scapy letters ("SA", "PA", ...)
    payload: bytes = b""
    icmp_type: int = 0
    icmp_code: int = 0
    icmp_echo: tuple[int, int] | None = None  # (id, seq) of an echo request/reply


def conversation_packets(spec: FlowSpec, t0: float = DEFAULT_T0) -> list[TrafficPacket]:
    """The packets of one FlowSpec, in order, with their times (epoch seconds, µs resolution)."""
    v6 = ipaddress.ip_address(spec.src).version == 6
    out: list[TrafficPacket] = []
    t = t0 + spec.start

    def add(dt: float, forward: bool, layer: str, **fields) -> None:
        nonlocal t
        t += dt
        out.append(TrafficPacket(round(t, 6), forward, layer, **fields))

    if spec.kind == "tcp-syn":
        for k in range(max(spec.packets, 1)):
            add(spec.gap if k else 0.0, True, "tcp", flags="S")
    elif spec.kind in ("tcp", "tcp-rst"):
        add(0.0, True, "tcp", flags="S")
        add(0.01, False, "tcp", flags="SA")
        add(0.01, True, "tcp", flags="A")
        for _ in range(spec.packets):
            add(spec.gap, True, "tcp", flags="PA", payload=b"x" * spec.payload)
            add(0.005, False, "tcp", flags="A")
        if spec.kind == "tcp":
            add(spec.gap, True, "tcp", flags="FA")
            add(0.01, False, "tcp", flags="FA")
            add(0.01, True, "tcp", flags="A")
        else:
            add(spec.gap, False, "tcp", flags="RA")
    elif spec.kind == "udp":
        for k in range(max(spec.packets, 1)):
            add(spec.gap if k else 0.0, True, "udp", payload=b"q" * spec.payload)
            if spec.reply:
                add(0.003, False, "udp", payload=b"r" * (spec.payload + 16))
    elif spec.kind == "icmp":
        body = b"p" * spec.payload
        if spec.icmp_type is not None:
            if v6 and spec.icmp_type != 1:
                raise ValueError(f"ICMPv6 type {spec.icmp_type} not supported by the builder (only 1)")
            for k in range(max(spec.packets, 1)):
                add(
                    spec.gap if k else 0.0,
                    True,
                    "icmp",
                    payload=body,
                    icmp_type=spec.icmp_type,
                    icmp_code=spec.icmp_code,
                )
        else:
            request, reply = (128, 129) if v6 else (8, 0)
            for k in range(max(spec.packets, 1)):
                add(spec.gap if k else 0.0, True, "icmp", payload=body, icmp_type=request, icmp_echo=(7, k))
                if spec.reply:
                    add(0.002, False, "icmp", payload=body, icmp_type=reply, icmp_echo=(7, k))
    else:
        raise ValueError(f"unknown flow kind {spec.kind!r}")
    return out


_MAC_CLIENT, _MAC_SERVER = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
_TCP_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20, "E": 0x40, "C": 0x80}


def _checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def render_frame(spec: FlowSpec, packet: TrafficPacket) -> bytes:
    """Ethernet frame bytes of one packet, with correct lengths and checksums (the same bytes scapy builds
    with its defaults: IPv4 id 1, TTL/hop limit 64, TCP window 8192, seq 1000, ack 2000 when ACK is set)."""
    a, b = (spec.src, spec.dst) if packet.forward else (spec.dst, spec.src)
    src, dst = ipaddress.ip_address(a).packed, ipaddress.ip_address(b).packed
    v6 = len(src) == 16
    sport, dport = (spec.sport, spec.dport) if packet.forward else (spec.dport, spec.sport)
    if packet.layer == "tcp":
        proto = 6
        flags = sum(_TCP_FLAG_BITS[c] for c in packet.flags)
        ack = 2000 if "A" in packet.flags else 0
        header = struct.pack("!HHIIBBHHH", sport, dport, 1000, ack, 5 << 4, flags, 8192, 0, 0)
    elif packet.layer == "udp":
        proto = 17
        header = struct.pack("!HHHH", sport, dport, 8 + len(packet.payload), 0)
    else:
        proto = 58 if v6 else 1
        rest = struct.pack("!HH", *packet.icmp_echo) if packet.icmp_echo else b"\0\0\0\0"
        header = struct.pack("!BBH", packet.icmp_type, packet.icmp_code, 0) + rest
    segment = header + packet.payload
    if v6:
        pseudo = src + dst + struct.pack("!I3xB", len(segment), proto)
    else:
        pseudo = src + dst + struct.pack("!xBH", proto, len(segment))
    if proto == 1:  # ICMPv4: no pseudo-header
        checksum = _checksum(segment)
    else:
        checksum = _checksum(pseudo + segment)
        if proto == 17 and checksum == 0:
            checksum = 0xFFFF
    offset = {6: 16, 17: 6, 1: 2, 58: 2}[proto]
    segment = segment[:offset] + struct.pack("!H", checksum) + segment[offset + 2 :]
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, len(segment), proto, 64) + src + dst
        ethertype = 0x86DD
    else:
        head = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(segment), 1, 0, 64, proto, 0) + src + dst
        ip = head[:10] + struct.pack("!H", _checksum(head)) + head[12:]
        ethertype = 0x0800
    macs = _MAC_SERVER + _MAC_CLIENT if packet.forward else _MAC_CLIENT + _MAC_SERVER
    return macs + struct.pack("!H", ethertype) + ip + segment


def render_frame_scapy(spec: FlowSpec, packet: TrafficPacket) -> bytes:
    """The same frame built by scapy: the reference render_frame is tested against."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    a, b = (spec.src, spec.dst) if packet.forward else (spec.dst, spec.src)
    v6 = ipaddress.ip_address(a).version == 6
    macs = ("02:00:00:00:00:01", "02:00:00:00:00:02")
    eth = Ether(src=macs[0], dst=macs[1]) if packet.forward else Ether(src=macs[1], dst=macs[0])
    frame = eth / (IPv6(src=a, dst=b) if v6 else IP(src=a, dst=b))
    sport, dport = (spec.sport, spec.dport) if packet.forward else (spec.dport, spec.sport)
    if packet.layer == "tcp":
        ack = 2000 if "A" in packet.flags else 0
        frame = frame / TCP(sport=sport, dport=dport, flags=packet.flags, seq=1000, ack=ack)
    elif packet.layer == "udp":
        frame = frame / UDP(sport=sport, dport=dport)
    elif v6 and packet.icmp_echo:
        kind = ICMPv6EchoRequest if packet.icmp_type == 128 else ICMPv6EchoReply
        frame = frame / kind(id=packet.icmp_echo[0], seq=packet.icmp_echo[1])
    elif v6:
        frame = frame / ICMPv6DestUnreach(code=packet.icmp_code)
    elif packet.icmp_echo:
        frame = frame / ICMP(type=packet.icmp_type, id=packet.icmp_echo[0], seq=packet.icmp_echo[1])
    else:
        frame = frame / ICMP(type=packet.icmp_type, code=packet.icmp_code)
    if packet.payload:
        frame = frame / Raw(packet.payload)
    return bytes(frame)


def write_pcap(path: Path | str, frames: Sequence[tuple[float, bytes]], linktype: int = 1) -> Path:
    """A classic little-endian pcap (µs timestamps) of (epoch seconds, frame bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype))
        for when, frame in frames:
            seconds, micros = divmod(round(when * 1_000_000), 1_000_000)
            handle.write(struct.pack("<IIII", seconds, micros, len(frame), len(frame)))
            handle.write(frame)
    return path


def build_traffic_pcap(
    path: Path | str,
    flows: Sequence[FlowSpec] | None = None,
    seed: int = 1,
    ipv6: bool = True,
    t0: float = DEFAULT_T0,
) -> Path:
    """Write an Ethernet pcap of the given conversations (default: default_flow_specs(seed, ipv6)), packets in
    time order from `t0` (epoch seconds). Deterministic: same specs and t0, same bytes. Frames are built with
    struct (render_frame, byte-identical to scapy's and tested so): ~100x faster than scapy per packet."""
    specs = list(flows) if flows is not None else default_flow_specs(seed=seed, ipv6=ipv6)
    packets = [(packet.time, spec, packet) for spec in specs for packet in conversation_packets(spec, t0)]
    packets.sort(key=lambda item: item[0])  # stable: ties keep the per-flow order
    return write_pcap(path, [(when, render_frame(spec, packet)) for when, spec, packet in packets])
