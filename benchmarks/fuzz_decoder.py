"""Fuzz the NetFlow/IPFIX decoder: real softflowd datagrams (v1, v5, v9, IPFIX; IPv4 and IPv6 flows) and the
committed router exports (NSEL, NAT, MPLS, SRv6, options tables), mutated,
cut, spliced and mixed with random bytes, fed in small batches through one long-lived DecoderState (also
round-tripped through JSON); half the batches walked and decoded twice, addresses as text and as integers
(decode_walked `ipv4_as_integers`), which must give the same flows. Prints how many cases raised (must be 0)
and the first few tracebacks.

    python benchmarks/fuzz_decoder.py [--cases 100000] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # tracepipe from this checkout; tests/support

from support import probes  # noqa: E402

from tracepipe.ingest.netflow import (  # noqa: E402
    DecoderState,
    decode_datagrams,
    decode_walked,
    flush_pending,
    walk_datagrams,
)
from tracepipe.ingest.pcap import iter_udp_batches  # noqa: E402
from tracepipe.lake import conform  # noqa: E402
from tracepipe.schema import FLOWS  # noqa: E402


def real_datagrams(workdir: Path) -> list[bytes]:
    """Export datagrams of the real softflowd for every version it speaks."""
    traffic = {
        False: probes.build_traffic_pcap(workdir / "v4.pcap", seed=5, ipv6=False),
        True: probes.build_traffic_pcap(workdir / "v6.pcap", seed=6, ipv6=True),
    }
    out: list[bytes] = []
    for version, ipv6 in ((1, False), (5, False), (9, True), (10, True), (9, False), (10, False)):
        port = probes.free_udp_port()
        path = workdir / f"export-v{version}-{ipv6}.pcap"
        with probes.capture_udp(port, path) as capture:
            result = probes.softflowd_export(traffic[ipv6], version, (probes.LOOPBACK_V4, port))
            capture.wait_for_packets(result.datagrams)
        for batch in iter_udp_batches(path):
            out += [bytes(p) for p in batch.payloads]
    return out


def router_datagrams() -> list[bytes]:
    """The committed router exports (tests/data/routers: NSEL, NAT events, MPLS, SRv6, sampler and interface
    tables, ...) and hand-built SRv6 segment lists and VRF tables (tests/test_router_srv6_vrf.py), so that the
    mutations reach every element the router columns read (issue 16)."""
    import test_router_srv6_vrf as built

    routers = REPO / "tests" / "data" / "routers"
    out = [p.read_bytes() for p in sorted((routers / "logstash").glob("*.dat"))]
    for capture in sorted((routers / "akvorado").glob("*.pcap")):
        for batch in iter_udp_batches(capture):
            out += [bytes(p) for p in batch.payloads]
    segments = b"".join(built.a6(s) for s in built.SEGMENTS)
    out.append(
        built.srv6_message([(built.a6(built.SEGMENTS[1]), segments, built.basic_list(built.SEGMENTS))])
    )
    out.append(built.vrf_datagram({0x60000002: b"CUSTOMER-A"}, [(0x60000002, 0x60000000)]))
    out.append(built.rd_message([bytes.fromhex("0000fde800000064"), bytes.fromhex("0001c00002010007")]))
    return out


def mutate(rng: random.Random, corpus: list[bytes]) -> bytes:
    kind = rng.random()
    if kind < 0.05:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    data = bytearray(rng.choice(corpus))
    if kind < 0.12:  # splice two datagrams
        other = rng.choice(corpus)
        cut = rng.randrange(len(data) + 1)
        data = data[:cut] + other[rng.randrange(len(other) + 1) :]
    for _ in range(rng.randint(1, 10)):
        action = rng.random()
        if action < 0.45 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif action < 0.6 and data:
            start = rng.randrange(len(data))
            del data[start : start + rng.randint(1, 64)]
        elif action < 0.7:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        elif action < 0.9 and len(data) > 2:  # a length, count or id set to an extreme
            pos = rng.randrange(len(data) - 1)
            data[pos : pos + 2] = rng.choice(
                [b"\0\0", b"\xff\xff", b"\0\4", b"\0\1", b"\x80\0", b"\0\x10", b"\1\0"]
            )
        elif len(data) > 4:
            del data[rng.randrange(len(data)) :]  # truncate
    return bytes(data)


def run(cases: int, seed: int, corpus: list[bytes], batch: int = 8) -> tuple[int, list[str]]:
    rng = random.Random(seed)
    raised, tracebacks = 0, []
    state = DecoderState()
    done = 0
    while done < cases:
        n = min(batch, cases - done)
        payloads = [mutate(rng, corpus) if rng.random() < 0.9 else rng.choice(corpus) for _ in range(n)]
        exporters = [rng.choice(["127.0.0.1", "::1", "192.0.2.1"]) for _ in range(n)]
        try:
            if rng.random() < 0.5:
                decode_datagrams(
                    payloads,
                    exporters,
                    np.zeros(n, np.int64),
                    np.arange(n, dtype=np.int64),
                    "fuzz",
                    state,
                    text_as_dictionary=rng.random() < 0.5,
                )
            else:  # walk + decode_walked, addresses as text and as integers (issue 17): the same flows
                args = (payloads, exporters, np.zeros(n, np.int64), np.arange(n, dtype=np.int64), "fuzz")
                walked = walk_datagrams(*args, state)[0]
                text = conform(decode_walked(walked).flows, FLOWS)
                integers = conform(decode_walked(walked, ipv4_as_integers=True).flows, FLOWS)
                assert integers.equals(text), "addresses as integers decode to other flows than as text"
            if rng.random() < 0.02:
                state = DecoderState.from_json(state.to_json())
            if rng.random() < 0.01:
                flush_pending(state, "fuzz")
        except Exception:
            raised += n
            if len(tracebacks) < 3:
                tracebacks.append(traceback.format_exc())
            state = DecoderState()
        done += n
    return raised, tracebacks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tracepipe-fuzz-") as tmp:
        softflowd = real_datagrams(Path(tmp))
    routers = router_datagrams()
    corpus = softflowd + routers
    start = time.perf_counter()
    raised, tracebacks = run(args.cases, args.seed, corpus)
    seconds = time.perf_counter() - start
    for text in tracebacks:
        print(text)
    print(
        f"{args.cases} cases from {len(softflowd)} real softflowd datagrams and {len(routers)} router export"
        f" datagrams in {seconds:.1f} s: {raised} raised"
    )
    raise SystemExit(1 if raised else 0)


if __name__ == "__main__":
    main()
