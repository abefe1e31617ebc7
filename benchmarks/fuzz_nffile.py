"""Fuzz the native nfcapd reader (tracepipe.ingest.nffile): real nfcapd files (real softflowd v5, v9 with IPv6
flows and IPFIX -> a real nfcapd on 127.0.0.1; the same records uncompressed, LZ4 and BZ2 as `nfdump -y/-j` writes
them) with flipped bytes, lengths and counts set to extremes, cuts, insertions, splices and random bytes behind a
valid header. Each case is read as one process reads it (read_nffile) and as decode workers do (iter_ranges,
then read_range per range of blocks); both must give the same number of flows and rejects. Prints how many cases
raised or differed (must be 0), the slowest case, and the first few tracebacks.

    python benchmarks/fuzz_nffile.py [--cases 5000] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # tracepipe from this checkout; tests/support

from support import probes  # noqa: E402

from tracepipe.ingest import nffile  # noqa: E402
from tracepipe.tools import tool_path  # noqa: E402

HEADER = nffile.FILE_HEADER.itemsize


def real_files(workdir: Path) -> list[bytes]:
    """nfcapd files the real tools wrote: one per softflowd version, merged, then recompressed."""
    folder = workdir / "nfcapd"
    for version, ipv6 in ((5, False), (9, True), (10, False)):
        traffic = probes.build_traffic_pcap(workdir / f"traffic-{version}.pcap", seed=version, ipv6=ipv6)
        port = probes.free_udp_port()
        with probes.nfcapd_receiving(port, workdir / f"out-{version}") as nfcapd:
            probes.softflowd_export(traffic, version, (probes.LOOPBACK_V4, port))
        for i, path in enumerate(nfcapd.files):
            folder.mkdir(exist_ok=True)
            path.rename(folder / f"nfcapd.2024031200{version:02d}{i}")
    out = []
    for flag in ("", "-y", "-j"):
        target = workdir / f"merged{flag}"
        cmd = [tool_path("nfdump"), "-R", str(folder), *([flag] if flag else []), "-w", str(target)]
        subprocess.run(cmd, check=True, timeout=60)
        out.append(target.read_bytes())
    return out


def mutate(rng: random.Random, corpus: list[bytes]) -> bytes:
    data = bytearray(rng.choice(corpus))
    kind = rng.random()
    if kind < 0.05:  # a valid header, then anything
        return bytes(data[:HEADER]) + rng.randbytes(rng.randint(0, 100_000))
    if kind < 0.12:  # splice two files
        other = rng.choice(corpus)
        cut = rng.randrange(HEADER, len(data) + 1)
        data = data[:cut] + other[rng.randrange(HEADER, len(other) + 1) :]
    for _ in range(rng.randint(1, 10)):
        action = rng.random()
        if action < 0.4:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif action < 0.5:
            start = rng.randrange(HEADER, len(data))
            del data[start : start + rng.randint(1, 64)]
        elif action < 0.6:
            pos = rng.randrange(HEADER, len(data) + 1)
            data[pos:pos] = rng.randbytes(rng.randint(1, 32))
        elif action < 0.9 and len(data) > HEADER + 4:  # a size, count or type set to an extreme
            pos = rng.randrange(len(data) - 3)
            data[pos : pos + 4] = rng.choice(
                [
                    b"\0\0\0\0",
                    b"\xff\xff\xff\xff",
                    b"\0\0\x50\0",
                    b"\1\0\0\0",
                    b"\x0b\0\0\0",
                    b"\x0c\0\xff\xff",
                ]
            )
        elif len(data) > HEADER:
            del data[rng.randrange(HEADER, len(data)) :]  # truncate
    return bytes(data)


def by_ranges(path: Path) -> tuple[int, int]:
    """(flows, rejects) of a file read as `ingest netflow --jobs N` reads it, in this process."""
    flows = rejects = 0
    for blocks in nffile.iter_ranges(path, str(path), parts=4):
        if isinstance(blocks, nffile.BlockRange):
            table, found = nffile.read_range(blocks)
            flows, rejects = flows + table.num_rows, rejects + found.rejects.num_rows
        else:
            rejects += blocks.num_rows
    return flows, rejects


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    raised, differed, tracebacks, slowest = 0, 0, [], 0.0
    with tempfile.TemporaryDirectory(prefix="tracepipe-fuzz-nffile-") as tmp:
        corpus = real_files(Path(tmp))
        path = Path(tmp) / "nfcapd.fuzz"
        start = time.perf_counter()
        for _ in range(args.cases):
            path.write_bytes(mutate(rng, corpus))
            began = time.perf_counter()
            try:
                flows, rejects, _ = nffile.read_nffile(path)
                if (flows.num_rows, rejects.num_rows) != by_ranges(path):
                    differed += 1
                    if len(tracebacks) < 3:
                        tracebacks.append(f"differs: {(flows.num_rows, rejects.num_rows)} {by_ranges(path)}")
            except Exception:
                raised += 1
                if len(tracebacks) < 3:
                    tracebacks.append(traceback.format_exc())
            slowest = max(slowest, time.perf_counter() - began)
        seconds = time.perf_counter() - start
    for text in tracebacks:
        print(text)
    print(
        f"{args.cases} cases from {len(corpus)} real nfcapd files in {seconds:.1f} s (slowest {slowest:.2f} s): "
        f"{raised} raised, {differed} read differently by ranges (decode workers)"
    )
    raise SystemExit(1 if raised or differed else 0)


if __name__ == "__main__":
    main()
