"""How fast can `tracepipe collect` receive without loss, next to nfcapd (issue 5, Must 4)?

Makes real NetFlow v9 export datagrams once (the real softflowd over a traffic capture built with scapy),
replicates them to --count datagrams with consecutive sequence numbers, and replays them to 127.0.0.1 at
increasing rates, a bounded number per step, with sendmmsg(2) from a separate process. Each receiver gets the
same replay: `tracepipe collect` (default options: 32 MB receive buffer, 5 min rotation) and `nfcapd -B 33554432`.
Loss per step = datagrams the receiver's socket dropped (the `drops` column of /proc/net/udp) and, for tracepipe,
also sent minus spooled. Prints a table and the highest rate with zero loss for each; then the committer's decode
and commit rate for one step's worth of datagrams.

    python benchmarks/collector.py                  # 100 k datagrams per step, rates 25 k .. 300 k/s
    python benchmarks/collector.py --count 20000 --rates 50000,100000
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # tracepipe from this checkout; tests/support

from support import probes  # noqa: E402

from tracepipe import spool as sp  # noqa: E402
from tracepipe.collector import commit_pending, make_block  # noqa: E402
from tracepipe.lake import Lake  # noqa: E402
from tracepipe.tools import tool_path  # noqa: E402

DEFAULT_RATES = (25_000, 50_000, 100_000, 150_000, 200_000, 300_000)


# ---- real softflowd datagrams ----------------------------------------------------------------------------------


def softflowd_datagrams(workdir: Path, flows: int) -> list[bytes]:
    """Every v9 datagram the real softflowd exports for a capture of `flows` conversations."""
    specs = probes.default_flow_specs(seed=21, ipv6=True, n=flows, span=600.0)
    pcap = probes.build_traffic_pcap(workdir / "traffic.pcap", specs)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(0.5)
    got: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                got.append(receiver.recv(65536))
            except TimeoutError:
                return

    thread = threading.Thread(target=drain)
    thread.start()
    result = probes.softflowd_export(pcap, 9, ("127.0.0.1", receiver.getsockname()[1]))
    thread.join()
    receiver.close()
    if len(got) != result.datagrams:
        raise SystemExit(f"captured {len(got)} of softflowd's {result.datagrams} datagrams")
    return got


def replicate(datagrams: list[bytes], count: int) -> list[bytes]:
    """`count` datagrams cycling through the real ones, v9 sequence numbers consecutive (header bytes 12..16)."""
    out = []
    for i in range(count):
        d = datagrams[i % len(datagrams)]
        out.append(d[:12] + struct.pack(">I", i) + d[16:])
    return out


# ---- the paced sender (its own process, sendmmsg in chunks) ---------------------------------------------------


def _sender(
    datagrams: list[bytes], dest: tuple[str, int], rate: float, result: multiprocessing.Queue
) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.connect(dest)
    n = len(datagrams)
    blob = np.frombuffer(b"".join(datagrams), np.uint8)
    lengths = np.array([len(d) for d in datagrams], np.uint64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64)
    iov = np.zeros((n, 2), np.uint64)
    iov[:, 0] = blob.ctypes.data + starts
    iov[:, 1] = lengths
    headers = np.zeros((n, 8), np.uint64)  # struct mmsghdr: msg_name NULL (connected socket)
    headers[:, 2] = iov.ctypes.data + np.arange(n, dtype=np.uint64) * 16
    headers[:, 3] = 1
    chunk = 16
    sent = 0
    started = time.perf_counter()
    while sent < n:
        k = min(chunk, n - sent)
        done = libc.sendmmsg(sock.fileno(), ctypes.c_void_p(headers.ctypes.data + sent * 64), k, 0)
        if done <= 0:
            continue  # ENOBUFS/EAGAIN on a full queue: retry (loopback never drops on the send side)
        sent += done
        due = started + sent / rate
        while time.perf_counter() < due:
            pass
    elapsed = time.perf_counter() - started
    result.put((sent, elapsed))


def send(datagrams: list[bytes], dest: tuple[str, int], rate: float) -> tuple[int, float]:
    """Replay at `rate` datagrams/s from a separate process; returns (sent, achieved rate)."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    proc = context.Process(target=_sender, args=(datagrams, dest, rate, queue))
    proc.start()
    sent, elapsed = queue.get(timeout=600)
    proc.join()
    return sent, sent / elapsed


# ---- receivers --------------------------------------------------------------------------------------------------


def udp_socket(port: int) -> tuple[int, int]:
    """(bytes waiting in the receive queue, datagrams dropped) of the UDP socket on 127.0.0.1:`port`, from the
    kernel (/proc/net/udp: tx_queue:rx_queue in hex, and the drops column)."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1] == local:
            return int(cols[4].split(":")[1], 16), int(cols[12])
    raise RuntimeError(f"no UDP socket on 127.0.0.1:{port}")


def udp_drops(port: int) -> int:
    return udp_socket(port)[1]


def settle(port: int, read, quiet: float = 0.6, timeout: float = 120.0) -> int | None:
    """Wait until the receiver has taken everything from its socket (receive queue empty) and `read()` (its
    own count, if any) stopped changing for `quiet` seconds; returns that count."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now != last or udp_socket(port)[0]:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


class Receiver:
    """One receiver under test, listening on 127.0.0.1; `spooled()` is None where only kernel drops count."""

    def __init__(
        self, name: str, proc: subprocess.Popen, port: int, log: Path, stats_file: Path | None = None
    ):
        self.name, self.proc, self.port, self.log, self.stats_file = name, proc, port, log, stats_file

    def spooled(self) -> int | None:
        if self.stats_file is None:
            return None
        return json.loads(self.stats_file.read_text())["datagrams"]

    def stop(self) -> None:
        # tracepipe: SIGKILL, its spool is thrown away with the work directory (this measures the receive path)
        self.proc.send_signal(signal.SIGKILL if self.stats_file else signal.SIGTERM)
        self.proc.wait(timeout=60)


def start_tracepipe(work: Path, name: str, rcvbuf: str) -> Receiver:
    stats_file = work / f"{name}-stats.json"
    log = work / f"{name}.log"
    cmd = [
        sys.executable,
        "-m",
        "tracepipe.cli",
        "collect",
        "--listen",
        "127.0.0.1:0",
        "--rcvbuf",
        rcvbuf,
        "--lake",
        str(work / f"{name}-lake"),
        "--stats-file",
        str(stats_file),
        "--status-interval",
        "0.2s",
        "--rotate",
        "1h",
        "--rotate-size",
        "8G",
    ]
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=handle, stdin=subprocess.DEVNULL)
    while not stats_file.exists():
        if proc.poll() is not None:
            raise SystemExit(log.read_text())
        time.sleep(0.05)
    port = int(json.loads(stats_file.read_text())["listen"][0].rsplit(":", 1)[1])
    return Receiver(name, proc, port, log, stats_file)


def start_nfcapd(work: Path) -> Receiver:
    port = probes.free_udp_port()
    out = work / "nfcapd"
    out.mkdir()
    log = work / "nfcapd.log"
    cmd = [
        tool_path("nfcapd"),
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        str(out),
        "-t",
        "3600",
        "-B",
        "33554432",
    ]
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=handle, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while "Startup" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(log.read_text())
        time.sleep(0.05)
    return Receiver("nfcapd", proc, port, log)


def socket_buffer(port: int) -> int:
    """The receive buffer the kernel granted the socket on 127.0.0.1:`port` (ss's skmem rb)."""
    out = subprocess.run(["ss", "-uamn", f"sport = :{port}"], capture_output=True, text=True).stdout
    found = re.search(r"rb(\d+)", out)
    return int(found.group(1)) if found else -1


def bench_receivers(
    work: Path, datagrams: list[bytes], rates: list[int]
) -> tuple[list[dict], dict[str, int]]:
    """All receivers run at once (idle ones cost nothing); each rate step is replayed to each in turn, so that
    a noisy neighbour on a shared machine hurts them alike."""
    receivers = [
        start_tracepipe(work, "tracepipe", "32M"),
        start_tracepipe(work, "tracepipe-8M", "4M"),
        start_nfcapd(work),
    ]
    buffers = {r.name: socket_buffer(r.port) for r in receivers}
    time.sleep(3)  # imports of the committer processes are done
    rows = []
    try:
        for rate in rates:
            for receiver in receivers:
                before, drops_before = receiver.spooled(), udp_drops(receiver.port)
                sent, achieved = send(datagrams, ("127.0.0.1", receiver.port), rate)
                after = settle(receiver.port, receiver.spooled)
                drops = udp_drops(receiver.port) - drops_before
                got = sent - drops if before is None or after is None else after - before
                rows.append(
                    {
                        "receiver": receiver.name,
                        "rate": rate,
                        "achieved": achieved,
                        "sent": sent,
                        "received": got,
                        "lost": sent - got,
                        "kernel_drops": drops,
                    }
                )
                print(
                    f"  {receiver.name:<13} {rate:>7}/s (sent at {achieved:>7.0f}/s): lost {sent - got:>6}, "
                    f"kernel drops {drops:>6}",
                    flush=True,
                )
    finally:
        for receiver in receivers:
            receiver.stop()
    return rows, buffers


def bench_receive_cpu(work: Path, datagrams: list[bytes], count: int = 40_000) -> dict:
    """CPU time (user + system, so waiting for a busy CPU does not count) of tracepipe's receive loop per
    datagram: fill a socket's buffer, then drain it into a spool segment with the collector's own code."""
    from tracepipe.collector import Collector, CollectorConfig
    from tracepipe.units import parse_listen

    logging.getLogger("tracepipe.collect").setLevel(logging.ERROR)  # no "accepting any sender" warning here

    collector = Collector(CollectorConfig([parse_listen("127.0.0.1:0")], work / "cpu-lake", rcvbuf=512 << 20))
    collector.spool.mkdir(parents=True)
    collector._open_sockets()
    collector._new_segment()
    receiver = collector.receivers[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for i in range(count):
            sender.sendto(datagrams[i % len(datagrams)], ("127.0.0.1", receiver.sock.getsockname()[1]))
    started = time.process_time()
    received = 0
    while n := collector._receive_ready(receiver):
        received += n
    cpu = time.process_time() - started
    receiver.sock.close()
    return {"datagrams": received, "cpu_us_per_datagram": cpu / max(received, 1) * 1e6}


def bench_commit(work: Path, datagrams: list[bytes]) -> dict:
    """Decode + commit rate of the committer on one spool segment holding `datagrams`."""
    spool = work / "commit-spool"
    spool.mkdir()
    writer = sp.SegmentWriter(spool, 1)
    addr = np.zeros((1, 16), np.uint8)
    addr[0, 10:] = [255, 255, 127, 0, 0, 1]
    batch = 1024
    for i in range(0, len(datagrams), batch):
        part = datagrams[i : i + batch]
        block = make_block(
            time.time_ns() // 1000,
            socket.AF_INET,
            np.repeat(addr, len(part), axis=0),
            np.full(len(part), 9995, np.uint16),
            [memoryview(d) for d in part],
        )
        writer.append(block, len(part))
    writer.close()
    lake = Lake(work / "commit-lake")
    started = time.perf_counter()
    commit_pending(lake, spool, keep=False)
    elapsed = time.perf_counter() - started
    flows = int(lake.manifest().column("rows")[0].as_py())
    return {"datagrams": len(datagrams), "flows": flows, "seconds": elapsed, "flows_per_s": flows / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=100_000, help="datagrams per rate step")
    parser.add_argument(
        "--rates", default=",".join(map(str, DEFAULT_RATES)), help="datagrams/s, comma-separated"
    )
    parser.add_argument("--flows", type=int, default=2000, help="conversations in the traffic capture")
    parser.add_argument(
        "--commit-count", type=int, default=20_000, help="datagrams for the decode+commit step"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    work = Path(tempfile.mkdtemp(prefix="tracepipe-bench-collector-"))
    try:
        real = softflowd_datagrams(work, args.flows)
        datagrams = replicate(real, args.count)
        records = sum(struct.unpack(">H", d[2:4])[0] for d in datagrams)
        print(
            f"{len(real)} real softflowd v9 datagrams (avg {np.mean([len(d) for d in real]):.0f} bytes), "
            f"replayed as {len(datagrams)} per step ({records} records incl. templates)",
            flush=True,
        )
        load_before = os.getloadavg()[0]
        rows, buffers = bench_receivers(work, datagrams, rates)
        commit = bench_commit(work, datagrams[: args.commit_count])
        cpu = bench_receive_cpu(work, datagrams)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    names = ["tracepipe", "tracepipe-8M", "nfcapd"]
    print()
    print(
        f"load average (1 min) before / after the replay: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    print(
        f"{args.count} datagrams per step; kernel receive buffers: "
        + ", ".join(f"{n} {buffers[n] / 2**20:.0f} MiB" for n in names)
    )
    print(f"{'target/s':>9} | " + " | ".join(f"{n + ' sent/s':>19} {'lost':>6}" for n in names))
    for rate in rates:
        cells = []
        for name in names:
            row = next(r for r in rows if r["receiver"] == name and r["rate"] == rate)
            cells.append(f"{row['achieved']:>19.0f} {row['lost']:>6}")
        print(f"{rate:>9} | " + " | ".join(cells))
    totals = {n: sum(r["lost"] for r in rows if r["receiver"] == n) for n in names}
    print(f"{'total':>9} | " + " | ".join(f"{'':>19} {totals[n]:>6}" for n in names))
    best: dict[str, dict] = {}
    for name in names:
        best[name] = {"rate": 0, "achieved": 0.0}
        for rate in rates:  # the highest step below which every step was lossless
            row = next(r for r in rows if r["receiver"] == name and r["rate"] == rate)
            if row["lost"] or row["kernel_drops"]:
                break
            best[name] = {"rate": rate, "achieved": row["achieved"]}
        print(
            f"highest rate with zero loss (all steps up to it lossless): {name:<13} target "
            f"{best[name]['rate']:>7}/s, sent at {best[name]['achieved']:>7.0f}/s"
        )
    print(
        f"committer: {commit['datagrams']} datagrams -> {commit['flows']} flows decoded and committed in "
        f"{commit['seconds']:.1f} s ({commit['flows_per_s']:,.0f} flows/s)"
    )
    print(
        f"receive loop: {cpu['cpu_us_per_datagram']:.1f} µs CPU per datagram (recvmmsg + spool write, "
        f"{cpu['datagrams']} datagrams drained), i.e. ~{1e6 / cpu['cpu_us_per_datagram']:,.0f} datagrams/s "
        f"on one free core"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "steps": rows,
                    "zero_loss_max": best,
                    "buffers": buffers,
                    "commit": commit,
                    "receive_cpu": cpu,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
