"""How fast can `tracepipe collect` receive without loss, next to nfcapd (issue 18 item 5, issue 17)?

Makes real NetFlow v9 export datagrams once (the real softflowd over a traffic capture built with scapy),
replicates them to --count datagrams with consecutive sequence numbers, and replays them to 127.0.0.1 at a ladder
of rates with a tiny C sendmmsg(2) sender that it compiles with gcc into a temporary directory at run time. Each
rate step goes to each receiver in turn: `tracepipe collect` (default 32 MB buffer), `tracepipe collect` with the
buffer nfcapd gets (SO_RCVBUF is capped by net.core.rmem_max; tracepipe forces its own as root), and
`nfcapd -B 33554432`. Kept = spooled datagrams for tracepipe (checked against the socket's kernel drop counter), sent
minus the kernel drops for nfcapd; CPU = user + system seconds of the receiver's processes during the step, per
datagram kept. Then: the committer's sustained rate while the receive loop runs (replays back to back into a
collector rotating every second, until everything is in the lake), the committer's rate on its own, and the receive
loop's CPU per datagram. The load average is printed: the machine may be shared.

    python benchmarks/collector.py                 # 104 800 datagrams per step, 100 k .. 800 k/s
    python benchmarks/collector.py --count 30000 --rates 100000,200000 --sustained-rounds 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
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

DEFAULT_RATES = (100_000, 200_000, 400_000, 800_000)


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


# ---- the paced sender: a tiny C program (sendmmsg), built at run time ------------------------------------------

SENDER_C = r"""
/* Paced sendmmsg(2) replay of a file of datagrams (u32 little-endian length + bytes each) to 127.0.0.1:PORT.
   Usage: sender FILE PORT RATE [CHUNK [EXPORTERS]]; EXPORTERS source sockets (ports) take the chunks in turn.
   Prints "sent elapsed_s" on stdout. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    FILE *f = fopen(argv[1], "rb");
    if (!f) return 3;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *blob = malloc(size);
    if (fread(blob, 1, size, f) != (size_t)size) return 3;
    fclose(f);
    size_t n = 0;
    for (long pos = 0; pos + 4 <= size; n++) { uint32_t len; memcpy(&len, blob + pos, 4); pos += 4 + len; }
    struct mmsghdr *msgs = calloc(n, sizeof *msgs);
    struct iovec *iov = calloc(n, sizeof *iov);
    long pos = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t len; memcpy(&len, blob + pos, 4);
        iov[i].iov_base = blob + pos + 4; iov[i].iov_len = len; pos += 4 + len;
        msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
    }
    struct sockaddr_in dest = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    dest.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    double rate = atof(argv[3]);
    unsigned chunk = argc > 4 ? (unsigned)atoi(argv[4]) : 32;
    int exporters = argc > 5 ? atoi(argv[5]) : 1;
    if (exporters < 1 || exporters > 1024) return 2;
    int socks[1024];
    for (int i = 0; i < exporters; i++) {
        int sndbuf = 4 << 20;
        socks[i] = socket(AF_INET, SOCK_DGRAM, 0);
        setsockopt(socks[i], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
        if (connect(socks[i], (struct sockaddr *)&dest, sizeof dest)) return 4;
    }
    unsigned turn = 0;
    size_t sent = 0;
    double start = now();
    while (sent < n) {
        unsigned k = n - sent < chunk ? (unsigned)(n - sent) : chunk;
        int done = sendmmsg(socks[turn++ % exporters], msgs + sent, k, 0);
        if (done <= 0) continue; /* ENOBUFS on a full queue: retry */
        sent += done;
        double due = start + sent / rate;
        double wait;
        while ((wait = due - now()) > 0) {
            if (wait > 200e-6) {
                struct timespec t = {0, (long)((wait - 100e-6) * 1e9)};
                nanosleep(&t, NULL);
            }
        }
    }
    printf("%zu %.6f\n", sent, now() - start);
    return 0;
}
"""


def build_sender(work: Path) -> Path:
    """Compile SENDER_C with gcc into `work` (nothing binary is committed); a Python sender cannot go past
    ~200 k datagrams/s on this machine, which is where the receivers start to differ."""
    source = work / "sender.c"
    source.write_text(SENDER_C)
    binary = work / "sender"
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit(
            "benchmarks/collector.py needs gcc (or cc) to build its sendmmsg sender: apt-get install gcc"
        )
    subprocess.run([gcc, "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def write_datagrams(path: Path, datagrams: list[bytes]) -> Path:
    """The replay file the sender reads: for each datagram a little-endian u32 length, then its bytes."""
    with open(path, "wb") as handle:
        for d in datagrams:
            handle.write(struct.pack("<I", len(d)) + d)
    return path


def send(sender: Path, replay: Path, port: int, rate: float, exporters: int = 1) -> tuple[int, float]:
    """Replay every datagram of `replay` to 127.0.0.1:`port` at `rate` datagrams/s, from `exporters` source
    ports taking chunks of 32 in turn; (sent, achieved rate)."""
    out = subprocess.run(
        [str(sender), str(replay), str(port), str(rate), "32", str(exporters)],
        capture_output=True,
        text=True,
        check=True,
    )
    sent, elapsed = out.stdout.split()
    return int(sent), int(sent) / float(elapsed)


# ---- receivers --------------------------------------------------------------------------------------------------


def udp_socket(port: int) -> tuple[int, int]:
    """(bytes waiting in the receive queues, datagrams dropped) of the UDP sockets on 127.0.0.1:`port` (summed
    when several share the port), from the kernel (/proc/net/udp: tx_queue:rx_queue in hex, and drops)."""
    local = f"0100007F:{port:04X}"
    queued = drops = found = 0
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1] == local:
            queued += int(cols[4].split(":")[1], 16)
            drops += int(cols[12])
            found += 1
    if not found:
        raise RuntimeError(f"no UDP socket on 127.0.0.1:{port}")
    return queued, drops


def udp_drops(port: int) -> int:
    return udp_socket(port)[1]


def settle(port: int, read, quiet: float = 1.2, timeout: float = 120.0) -> int | None:
    """Wait until the receiver has taken everything from its socket (receive queue empty) and `read()` (its
    own count, if any) stopped changing for `quiet` seconds (more than two of tracepipe's 0.5 s status writes);
    returns that count."""
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


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and its live descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15)
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


class Receiver:
    """One receiver under test (one or more processes sharing a port on 127.0.0.1); `spooled()` is None where only
    kernel drops count."""

    def __init__(
        self, name: str, procs: list[subprocess.Popen], port: int, stats_files: list[Path], dirs: list[Path]
    ):
        self.name, self.procs, self.port, self.stats_files = name, procs, port, stats_files
        self.dirs = dirs  # removed at stop: gigabytes of dirty spool pages would stall the next measurement

    @staticmethod
    def read_stats(path: Path) -> dict:
        for _ in range(50):  # replaced atomically, but it may be between two writes of a very busy collector
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                time.sleep(0.02)
        raise RuntimeError(f"cannot read {path}")

    def stats(self) -> list[dict]:
        return [self.read_stats(path) for path in self.stats_files]

    def spooled(self) -> int | None:
        return sum(s["datagrams"] for s in self.stats()) if self.stats_files else None

    def cpu(self) -> float:
        return sum(process_tree_cpu(proc.pid) for proc in self.procs)

    def stop(self, kill: bool = True) -> None:
        # tracepipe: SIGKILL, its spool is thrown away with the work directory (this measures the receive path)
        for proc in self.procs:
            proc.send_signal(signal.SIGKILL if self.stats_files and kill else signal.SIGTERM)
        for proc in self.procs:
            proc.wait(timeout=600)
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)


def start_tracepipe(work: Path, name: str, rcvbuf: str, *extra: str, instances: int = 1) -> Receiver:
    """`instances` collectors on one port (with --reuseport when more than one), each its own spool and lake."""
    procs, stats_files, port = [], [], 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for i in range(instances):
        stats_file = work / f"{name}-{i}-stats.json"
        cmd = [sys.executable, "-m", "tracepipe.cli", "collect", "--listen", f"127.0.0.1:{port}"]
        cmd += ["--rcvbuf", rcvbuf, "--lake", str(work / f"{name}-{i}-lake"), "--stats-file", str(stats_file)]
        cmd += ["--status-interval", "0.5s", "--rotate", "1h", "--rotate-size", "8G", *extra]
        cmd += ["--reuseport"] if instances > 1 else []
        log = work / f"{name}-{i}.log"
        with open(log, "wb") as handle:
            proc = subprocess.Popen(cmd, stdout=handle, stderr=handle, stdin=subprocess.DEVNULL, env=env)
        while not stats_file.exists():
            if proc.poll() is not None:
                raise SystemExit(log.read_text())
            time.sleep(0.05)
        procs.append(proc)
        stats_files.append(stats_file)
        port = int(Receiver.read_stats(stats_file)["listen"][0].rsplit(":", 1)[1])
    return Receiver(name, procs, port, stats_files, [work / f"{name}-{i}-lake" for i in range(instances)])


def start_nfcapd(work: Path, buffer: int) -> Receiver:
    port = probes.free_udp_port()
    out = work / "nfcapd"
    out.mkdir()
    log = work / "nfcapd.log"
    cmd = [tool_path("nfcapd"), "-b", "127.0.0.1", "-p", str(port), "-w", str(out), "-t", "3600"]
    cmd += ["-B", str(buffer)]
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=handle, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while "Startup" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(log.read_text())
        time.sleep(0.05)
    return Receiver("nfcapd", [proc], port, [], [out])


def socket_buffer(port: int) -> int:
    """The receive buffer the kernel granted the socket on 127.0.0.1:`port` (ss's skmem rb)."""
    out = subprocess.run(["ss", "-uamn", f"sport = :{port}"], capture_output=True, text=True).stdout
    found = re.search(r"rb(\d+)", out)
    return int(found.group(1)) if found else -1


def rmem_max() -> int:
    return int(Path("/proc/sys/net/core/rmem_max").read_text())


def sender_ceiling(sender: Path, replay: Path, exporters: int) -> float:
    """What the sender alone gets out on this machine now (to a socket nobody reads, which drops): targets above
    it are not what the receivers were offered."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        return send(sender, replay, sink.getsockname()[1], 10_000_000, exporters)[1]


def bench_receivers(
    sender: Path, replay: Path, rates: list[int], receivers: list[Receiver], exporters: int
) -> list[dict]:
    """Each rate step is replayed to each receiver in turn (all run at once; idle ones cost nothing), so that a
    noisy neighbour on a shared machine hurts them alike."""
    rows = []
    for rate in rates:
        for receiver in receivers:
            before, drops_before = receiver.spooled(), udp_drops(receiver.port)
            cpu_before, load = receiver.cpu(), os.getloadavg()[0]
            sent, achieved = send(sender, replay, receiver.port, rate, exporters)
            after = settle(receiver.port, receiver.spooled)
            cpu = receiver.cpu() - cpu_before
            drops = udp_drops(receiver.port) - drops_before
            got = sent - drops if before is None or after is None else after - before
            rows.append(
                {
                    "receiver": receiver.name,
                    "rate": rate,
                    "achieved": achieved,
                    "sent": sent,
                    "received": got,
                    "kept_percent": 100.0 * got / max(sent, 1),
                    "kernel_drops": drops,
                    "cpu_s": cpu,
                    "cpu_us_per_datagram": cpu / max(got, 1) * 1e6,
                    "load1": load,
                }
            )
            print(
                f"  {receiver.name:<22} {rate:>7}/s (sent at {achieved:>7.0f}/s): kept {got:>7} of {sent} "
                f"({100.0 * got / max(sent, 1):6.2f}%), kernel drops {drops:>6}, CPU {cpu:5.2f} s, load {load:.1f}",
                flush=True,
            )
    return rows


def bench_sustained(work: Path, sender: Path, replay: Path, count: int, rate: int, rounds: int) -> dict:
    """The committer under the receive loop: `rounds` replays back to back at `rate` into a collector that
    rotates every second, and the time until every received datagram is decoded and committed to the lake."""
    receiver = start_tracepipe(work, "sustained", "32M", "--rotate", "1s")
    try:
        drops_before = udp_drops(receiver.port)
        started = time.time()
        sent = 0
        for _ in range(rounds):
            sent += send(sender, replay, receiver.port, rate)[0]
        send_s = time.time() - started
        spooled = settle(receiver.port, receiver.spooled) or 0
        deadline = time.monotonic() + 1800
        committer: dict = {}
        while time.monotonic() < deadline:
            committer = receiver.stats()[0].get("committer", {})
            if committer.get("datagrams", 0) >= spooled:
                break
            time.sleep(0.2)
        drops = udp_drops(receiver.port) - drops_before
    finally:
        receiver.stop(kill=False)
    flows = int(committer.get("flows", 0))
    wall = max(float(committer.get("last_commit_at", time.time())) - started, 1e-9)
    return {
        "rate": rate,
        "sent": sent,
        "send_s": send_s,
        "spooled": spooled,
        "kernel_drops": drops,
        "committed_datagrams": int(committer.get("datagrams", 0)),
        "flows": flows,
        "seconds_to_last_commit": wall,
        "flows_per_s": flows / wall,
        "datagrams_per_s": int(committer.get("datagrams", 0)) / wall,
    }


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
    before = resource.getrusage(resource.RUSAGE_SELF)
    received = 0
    while n := collector._receive_ready(receiver):
        received += n
    after = resource.getrusage(resource.RUSAGE_SELF)
    receiver.sock.close()
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {
        "datagrams": received,
        "cpu_us_per_datagram": (user + system) / max(received, 1) * 1e6,
        "user_us_per_datagram": user / max(received, 1) * 1e6,
        "system_us_per_datagram": system / max(received, 1) * 1e6,
    }


def bench_commit(work: Path, datagrams: list[bytes]) -> dict:
    """Decode + commit rate of the committer on one spool segment holding `datagrams` (nothing else running)."""
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
    started, cpu_started = time.perf_counter(), time.process_time()
    commit_pending(lake, spool, keep=False)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    flows = int(lake.manifest().column("rows")[0].as_py())
    return {
        "datagrams": len(datagrams),
        "flows": flows,
        "seconds": elapsed,
        "cpu_s": cpu,
        "flows_per_s": flows / elapsed,
        "flows_per_cpu_s": flows / max(cpu, 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=104_800, help="datagrams per rate step")
    parser.add_argument(
        "--rates", default=",".join(map(str, DEFAULT_RATES)), help="datagrams/s, comma-separated"
    )
    parser.add_argument("--flows", type=int, default=2000, help="conversations in the traffic capture")
    parser.add_argument(
        "--commit-count", type=int, default=20_000, help="datagrams for the offline decode+commit step"
    )
    parser.add_argument(
        "--sustained-rate", type=int, default=100_000, help="datagrams/s of the committer-under-load step"
    )
    parser.add_argument(
        "--sustained-rounds", type=int, default=3, help="replays of --count datagrams in that step (0: skip)"
    )
    parser.add_argument(
        "--exporters", type=int, default=1, help="source ports the sender spreads the replay over (exporters)"
    )
    parser.add_argument(
        "--reuseport",
        type=int,
        default=0,
        help="also measure N tracepipe collectors sharing the port (--reuseport); useful with --exporters > 1",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    work = Path(tempfile.mkdtemp(prefix="tracepipe-bench-collector-"))
    nfcapd_request = 32 << 20
    same = min(nfcapd_request, rmem_max())  # what nfcapd's SO_RCVBUF gets; tracepipe forces the same
    try:
        sender = build_sender(work)
        real = softflowd_datagrams(work, args.flows)
        datagrams = replicate(real, args.count)
        replay = write_datagrams(work / "replay.bin", datagrams)
        records = sum(struct.unpack(">H", d[2:4])[0] for d in datagrams)
        print(
            f"{len(real)} real softflowd v9 datagrams (avg {np.mean([len(d) for d in real]):.0f} bytes), "
            f"replayed as {len(datagrams)} per step ({records} records incl. templates) by a C sendmmsg sender "
            f"from {args.exporters} source port(s)",
            flush=True,
        )
        load_before = os.getloadavg()
        ceiling = sender_ceiling(sender, replay, args.exporters)
        print(f"the C sender alone gets {ceiling:,.0f} datagrams/s out on this machine now", flush=True)
        receivers = [
            start_tracepipe(work, "tracepipe", "32M"),
            start_tracepipe(work, "tracepipe-same-buffer", str(same)),
            start_nfcapd(work, nfcapd_request),
        ]
        if args.reuseport > 1:
            receivers.insert(
                1,
                start_tracepipe(
                    work, f"tracepipe-reuseport-x{args.reuseport}", "32M", instances=args.reuseport
                ),
            )
        buffers = {r.name: socket_buffer(r.port) for r in receivers}
        time.sleep(3)  # imports of the committer processes are done
        try:
            rows = bench_receivers(sender, replay, rates, receivers, args.exporters)
        finally:
            for receiver in receivers:
                receiver.stop()
        load_after = os.getloadavg()
        sustained = (
            bench_sustained(work, sender, replay, args.count, args.sustained_rate, args.sustained_rounds)
            if args.sustained_rounds
            else None
        )
        commit = bench_commit(work, datagrams[: args.commit_count])
        cpu = bench_receive_cpu(work, datagrams)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    names = [r.name for r in receivers]
    print()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.1f}' for x in load_before)}, after {'/'.join(f'{x:.1f}' for x in load_after)} "
        f"on {os.cpu_count()} CPUs"
    )
    print(f"sender ceiling (to a socket nobody reads): {ceiling:,.0f} datagrams/s")
    print(
        f"{args.count} datagrams per step; kernel receive buffers granted: "
        + ", ".join(f"{n} {buffers[n] / 2**20:.0f} MiB" for n in names)
    )
    print(f"{'target/s':>9} | " + " | ".join(f"{n[:22]:>22} {'kept':>8} {'µs CPU':>6}" for n in names))
    print(f"{'':>9} | " + " | ".join(f"{'sent/s':>22} {'':>8} {'/dgram':>6}" for n in names))
    for rate in rates:
        cells = []
        for name in names:
            row = next(r for r in rows if r["receiver"] == name and r["rate"] == rate)
            cells.append(
                f"{row['achieved']:>22.0f} {row['kept_percent']:>7.2f}% {row['cpu_us_per_datagram']:>6.1f}"
            )
        print(f"{rate:>9} | " + " | ".join(cells))
    for name in names:
        best = {"rate": 0, "achieved": 0.0}
        for rate in rates:  # the highest step below which every step was lossless
            row = next(r for r in rows if r["receiver"] == name and r["rate"] == rate)
            if row["received"] < row["sent"] or row["kernel_drops"]:
                break
            best = {"rate": rate, "achieved": row["achieved"]}
        print(
            f"highest rate with zero loss (all steps up to it lossless): {name:<22} target "
            f"{best['rate']:>7}/s, sent at {best['achieved']:>7.0f}/s"
        )
    if sustained:
        print(
            f"committer under the receive loop: {sustained['sent']} datagrams sent at {sustained['rate']}/s "
            f"({sustained['spooled']} spooled, {sustained['kernel_drops']} kernel drops, rotating every 1 s) -> "
            f"{sustained['flows']} flows in the lake {sustained['seconds_to_last_commit']:.1f} s after the first "
            f"datagram: sustained {sustained['flows_per_s']:,.0f} flows/s ({sustained['datagrams_per_s']:,.0f} "
            f"datagrams/s)"
        )
    print(
        f"committer alone: {commit['datagrams']} datagrams -> {commit['flows']} flows decoded and committed in "
        f"{commit['seconds']:.1f} s ({commit['flows_per_s']:,.0f} flows/s, {commit['flows_per_cpu_s']:,.0f} "
        "per CPU second)"
    )
    print(
        f"receive loop: {cpu['cpu_us_per_datagram']:.2f} µs CPU per datagram ({cpu['user_us_per_datagram']:.2f} "
        f"user, {cpu['system_us_per_datagram']:.2f} system; recvmmsg + spool writev, "
        f"{cpu['datagrams']} datagrams drained), i.e. ~{1e6 / cpu['cpu_us_per_datagram']:,.0f} datagrams/s "
        f"on one free core"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "steps": rows,
                    "buffers": buffers,
                    "load_before": load_before,
                    "sender_ceiling": ceiling,
                    "load_after": load_after,
                    "sustained": sustained,
                    "commit": commit,
                    "receive_cpu": cpu,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
