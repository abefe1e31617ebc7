"""Fuzz the way `ingest netflow` hands a capture's records to its decode workers (issue 17): datagrams of
benchmarks/fuzz_decoder.py's corpus (real softflowd and router exports, also re-cut to one set a datagram so that
the walker's fast path takes them), mutated the same way, written as a pcap, walked with their file offsets
(netflow.InFile) and decoded from the file (decode_walked) must give the same flows as decode_datagrams of the
same bytes. Prints the cases that raised or differed (both must be 0).

    python benchmarks/fuzz_in_file.py [--cases 400] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import fuzz_decoder  # noqa: E402

from tracepipe.ingest.netflow import (  # noqa: E402
    DecoderState,
    FileRecords,
    InFile,
    decode_datagrams,
    decode_walked,
    walk_datagrams,
)
from tracepipe.ingest.pcap import iter_udp_batches  # noqa: E402
from tracepipe.schema import FLOWS  # noqa: E402

PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)  # Ethernet


def frame(payload: bytes) -> bytes:
    """One pcap record: Ethernet, IPv4 127.0.0.1 -> 127.0.0.1, UDP to 2055."""
    udp = struct.pack(">HHHH", 9, 2055, 8 + len(payload), 0) + payload
    ip = struct.pack(">BBHHHBBHII", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, 0x7F000001, 0x7F000001) + udp
    eth = bytes(12) + b"\x08\x00" + ip
    return struct.pack("<IIII", 1_700_000_000, 0, len(eth), len(eth)) + eth


def one_set_each(corpus: list[bytes]) -> list[bytes]:
    """v9 and IPFIX datagrams re-cut to one (flow)set each, as a busy exporter sends its data."""
    out = []
    for datagram in corpus:
        version = struct.unpack_from(">H", datagram)[0] if len(datagram) >= 2 else 0
        header = {9: 20, 10: 16}.get(version, 0)
        pos = header
        while header and pos + 4 <= len(datagram):
            length = struct.unpack_from(">H", datagram, pos + 2)[0]
            if length < 4 or pos + length > len(datagram):
                break
            head = bytearray(datagram[:header])
            if version == 10:
                head[2:4] = struct.pack(">H", header + length)
            out.append(bytes(head) + datagram[pos : pos + length])
            pos += length
    return out


def flows(table) -> list[str]:
    return sorted(map(repr, table.cast(FLOWS).to_pylist()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    raised = differed = from_file = 0
    with tempfile.TemporaryDirectory(prefix="tracepipe-fuzz-") as tmp:
        corpus = fuzz_decoder.real_datagrams(Path(tmp)) + fuzz_decoder.router_datagrams()
        corpus += one_set_each(corpus) * 3
        for case in range(args.cases):
            n = rng.randint(1, 60)
            # mostly intact (templates stick, the fast path runs), some mutated
            payloads = [
                fuzz_decoder.mutate(rng, corpus) if rng.random() < 0.3 else rng.choice(corpus)
                for _ in range(n)
            ]
            path = Path(tmp) / f"case{case}.pcap"
            path.write_bytes(PCAP_HEADER + b"".join(frame(p) for p in payloads))
            bytes_state, file_state = DecoderState(), DecoderState()
            try:
                for b in iter_udp_batches(path, batch_datagrams=rng.choice([4, 16, 64])):
                    want = decode_datagrams(
                        b.payloads, b.exporters, b.ts_us, b.offsets, "f", bytes_state, True
                    )
                    where = InFile(str(path), b.payload_offsets, b.heads)
                    walked, _ = walk_datagrams(
                        b.payloads, b.exporters, b.ts_us, b.offsets, "f", file_state, where
                    )
                    from_file += any(isinstance(r, FileRecords) for _, r, _, _ in walked.groups)
                    differed += flows(decode_walked(walked).flows) != flows(want.flows)
            except Exception:
                raised += 1
                if raised <= 3:
                    traceback.print_exc()
            path.unlink()
    print(
        f"{args.cases} cases ({from_file} batches with records read from the file): {raised} raised, "
        f"{differed} batches decoded differently"
    )
    raise SystemExit(1 if raised or differed else 0)


if __name__ == "__main__":
    main()
