#!/usr/bin/env python3
"""Regenerate sample_data/story/ (the incident story `tracepipe demo` runs on) from a seed.

Builds the story with tests/support/stories.py, writes the packet-level capture to a temporary directory (it is ~13 MB
and not committed), runs the real softflowd over what each of
the two sites' probes sees (OpenStack: NetFlow v9, OpenNebula: IPFIX) while the real tcpdump records
the export datagrams on 127.0.0.1, then writes the matching Nova, Neutron, OpenNebula, syslog and MISP records
and the ground truth. Everything but the tcpdump record timestamps is byte-identical between runs.

    python sample_data/make_sample.py [--seed 7] [--out sample_data/story] [--keep-traffic PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]  # a fresh clone's tracepipe; tests/support

from support import stories  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=(HERE / "story").resolve())  # the package data
    parser.add_argument("--keep-traffic", type=Path, help="also keep the packet-level pcap here")
    args = parser.parse_args(argv)
    out: Path = args.out
    templates = HERE / "templates"

    story = stories.build_story(seed=args.seed)
    if out.exists():
        shutil.rmtree(out)
    for sub in ("netflow", "nova", "neutron", "opennebula", "syslog", "intel"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="tracepipe-story-") as tmp:
        # two probes, two formats: the OpenStack border exports NetFlow v9, the OpenNebula site IPFIX
        for probe, version, name in (
            ("openstack", 9, "openstack-softflowd-v9.pcap"),
            ("opennebula", 10, "opennebula-softflowd-ipfix.pcap"),
        ):
            traffic = stories.write_traffic_pcap(story, Path(tmp) / f"traffic-{probe}.pcap", probe)
            stories.export_netflow(traffic, version, out / "netflow" / name)
            if args.keep_traffic:
                shutil.copyfile(
                    traffic, args.keep_traffic.with_name(f"{args.keep_traffic.stem}-{probe}.pcap")
                )

    (out / "nova" / "notifications.jsonl").write_text(
        "\n".join(stories.nova_notifications(story, templates / "nova")) + "\n"
    )
    (out / "neutron" / "floatingip.jsonl").write_text(
        "\n".join(stories.neutron_notifications(story, templates / "neutron")) + "\n"
    )
    for name, text in stories.opennebula_records(story).items():
        (out / "opennebula" / name).write_text(text)
    for name, text in stories.syslog_files(story).items():
        (out / "syslog" / name).write_text(text)
    (out / "intel" / "misp.csv").write_text(stories.misp_csv(story))
    (out / "ground_truth.json").write_text(json.dumps(story.truth, indent=1) + "\n")

    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(
        f"wrote {out} ({total / 1e6:.1f} MB, {story.n_conns} connections, "
        f"{len(story.truth['incidents'])} planted incidents)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
