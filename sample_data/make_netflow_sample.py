#!/usr/bin/env python3
"""Regenerate the bundled NetFlow samples: real softflowd export traffic, as a collector host records it.

A deterministic traffic capture (tests/support/probes.py build_traffic_pcap, fixed seed: TCP sessions, DNS/NTP, ICMP
echo and unreachables, IPv4 and IPv6, 2024-03-12 from 10:00 UTC) is replayed through the real softflowd, which
exports to 127.0.0.1 where tcpdump records the datagrams and a real nfcapd receives them too. Writes:

  sample_data/netflow/softflowd-v9.pcap     NetFlow v9 export capture (templates + data)
  sample_data/netflow/softflowd-ipfix.pcap  IPFIX export capture of the same traffic
  sample_data/netflow/nfdump-v9.csv         what `TZ=UTC nfdump -o csv` prints for the v9 export

The flow records are the same on every run; capture timestamps, ephemeral ports and IP ids of the export
datagrams are not. Needs root (tcpdump) and softflowd, nfdump, tcpdump installed (`bash .ci/install`).
Run from the repository root:  python sample_data/make_netflow_sample.py
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]  # a fresh clone's tracepipe; tests/support

from support import probes  # noqa: E402

SEED = 2024
FLOWS = 150  # conversations; about 300 flow records, a few kB per capture


def make(out_dir: Path, seed: int = SEED, flows: int = FLOWS) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="tracepipe-sample-") as tmp:
        work = Path(tmp)
        traffic = probes.build_traffic_pcap(
            work / "traffic.pcap", probes.default_flow_specs(seed=seed, ipv6=True, n=flows)
        )
        for version, name in ((9, "softflowd-v9"), (10, "softflowd-ipfix")):
            port = probes.free_udp_port()
            with probes.nfcapd_receiving(port, work / f"nfcapd-{name}") as nfcapd:
                with probes.capture_udp(port, work / f"{name}.pcap") as capture:
                    result = probes.softflowd_export(traffic, version, (probes.LOOPBACK_V4, port))
                    capture.wait_for_packets(result.datagrams)
            records = probes.nfdump_records(nfcapd.out_dir).num_rows
            if records != result.records:
                raise SystemExit(f"{name}: softflowd exported {result.records} records, nfcapd got {records}")
            target = out_dir / f"{name}.pcap"
            shutil.copyfile(capture.path, target)
            written[name] = target
            print(f"{target}: {result.datagrams} datagrams, {result.records} flow records", file=sys.stderr)
            if version == 9:
                csv = probes.nfdump_csv(nfcapd.out_dir, out_dir / "nfdump-v9.csv")
                written["nfdump-v9.csv"] = csv
                print(f"{csv}: nfdump -o csv of the same {records} records", file=sys.stderr)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "netflow", help="output directory")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--flows", type=int, default=FLOWS, help="conversations in the traffic capture")
    args = parser.parse_args()
    make(args.out, args.seed, args.flows)


if __name__ == "__main__":
    main()
