"""NAT translations and firewall events of firewall/NAT routers (issue 16): nat_src_addr, nat_dst_addr,
nat_src_port, nat_dst_port, nat_event, fw_event, fw_ext_event, decoded as nfdump (built with NSEL/NEL) decodes
the same datagrams, and the pivot a CSIRT report needs (public address + time -> inside host) in SQL.

Captures (tests/data/routers/PROVENANCE.md): Cisco ASA NSEL v9 from Logstash's NetFlow codec test data, in both
generations of the ASA's field ids (asa-1: Cisco's own 40001-40005; asa-2: the IANA ids 225-228, 233, 281/282),
and akvorado's NAT event capture (a NEL logger, natEvent 230). Peers: nfdump via a real nfcapd on 127.0.0.1
(`nfdump -o json`: src4_xlt_ip, src_xlt_port, event, xevent_id, nat_event), akvorado's TestDecodeNAT.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import decode_export, run_tracepipe
from support import probes

ROUTERS = Path(__file__).parent / "data" / "routers"
LOGSTASH = ROUTERS / "logstash"

CASES: dict[str, list[str]] = {
    "cisco-asa-1": ["netflow9_test_cisco_asa_1_tpl.dat", "netflow9_test_cisco_asa_1_data.dat"],
    "cisco-asa-2": [
        "netflow9_test_cisco_asa_2_tpl_26x.dat",
        "netflow9_test_cisco_asa_2_tpl_27x.dat",
        "netflow9_test_cisco_asa_2_data.dat",
    ],
    "nel-nat": [],  # akvorado/nat.pcap
    "mikrotik": [
        "ipfix_test_mikrotik_tpl.dat",
        "ipfix_test_mikrotik_data258.dat",
        "ipfix_test_mikrotik_data259.dat",
    ],
    "paloalto-81": [
        "netflow9_test_paloalto_81_tpl256-263.dat",
        "netflow9_test_paloalto_81_data257_1flowset_in_large_zerofilled_packet.dat",
    ],
}
COLUMNS = ("src_addr", "dst_addr", "proto", "nat_src_addr", "nat_dst_addr", "nat_src_port", "nat_dst_port")


def payloads(case: str) -> list[bytes]:
    if case == "nel-nat":
        return probes.export_payloads(ROUTERS / "akvorado" / "nat.pcap")
    return [(LOGSTASH / f).read_bytes() for f in CASES[case]]


def nfdump_json(folder: Path) -> list[dict]:
    proc = subprocess.run(
        [probes.tool_path("nfdump"), "-R", str(folder), "-o", "json"],
        capture_output=True,
        timeout=120,
        env=dict(os.environ, TZ="UTC", LC_ALL="C"),
        check=True,
    )
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict[str, tuple[list[dict], list[dict]]]:
    """case -> (our rows, nfdump's JSON records of the same datagrams sent to a real nfcapd)."""
    base = tmp_path_factory.mktemp("nat")
    out = {}
    for case in CASES:
        datagrams = payloads(case)
        out[case] = (decode_export(datagrams, case), nfdump_json(probes.nfcapd_of(datagrams, base / case)))
    return out


def _theirs(record: dict) -> tuple:
    def addr(end: str) -> str | None:
        return record.get(f"{end}4_addr") or record.get(f"{end}6_addr")

    def xlt(end: str) -> str | None:
        return record.get(f"{end}4_xlt_ip") or record.get(f"{end}6_xlt_ip")

    def port(key: str) -> int | None:
        return int(record[key]) if key in record else None

    return (
        addr("src"),
        addr("dst"),
        record["proto"],
        xlt("src"),
        xlt("dst"),
        port("src_xlt_port"),
        port("dst_xlt_port"),
    )


@pytest.mark.parametrize("case", list(CASES))
def test_translations_as_nfdump_decodes_them(case, decoded):
    """Every record's post-NAT addresses and ports equal nfdump's (v4 and v6, both ASA id generations)."""
    ours, theirs = decoded[case]
    assert len(ours) == len(theirs) > 0
    assert sorted(tuple(r[c] for c in COLUMNS) for r in ours) == sorted(map(_theirs, theirs))
    assert any(r["nat_src_addr"] is not None for r in ours) == (case != "paloalto-81")  # its template: no NAT


@pytest.mark.parametrize("case", ["cisco-asa-1", "cisco-asa-2", "paloalto-81"])
def test_firewall_events_as_nfdump_decodes_them(case, decoded):
    """fw_event is nfdump's `event` (IANA firewallEvent 1 CREATE, 2 DELETE, 5 UPDATE here), fw_ext_event its
    `xevent_id` (Cisco's reason: 2025, 2030, 2016), per record, for Cisco ASA and Palo Alto PAN-OS 8.1 (IE 233,
    no NAT fields in its template); no NAT event in these firewall events."""
    ours, theirs = decoded[case]
    key = ("src_addr", "dst_addr", "nat_src_port", "nat_dst_port", "fw_event", "fw_ext_event")
    # nfdump prints an extended event the template lacks (PAN-OS) as 0: the lake null
    assert sorted((*(r[k] for k in key[:-1]), r["fw_ext_event"] or 0) for r in ours) == sorted(
        (*_theirs(t)[:2], *_theirs(t)[5:7], t["event"], int(t["xevent_id"])) for t in theirs
    )
    if case == "paloalto-81":
        assert [r["fw_ext_event"] for r in ours] == [None]
    assert {r["nat_event"] for r in ours} == {None}


def test_firewall_event_counts_of_the_asa_captures(decoded):
    """The values themselves (so that a change in nfdump cannot make both sides wrong together)."""
    counts = {}
    for case in ("cisco-asa-1", "cisco-asa-2"):
        for r in decoded[case][0]:
            counts[(case, r["fw_event"], r["fw_ext_event"])] = (
                counts.get((case, r["fw_event"], r["fw_ext_event"]), 0) + 1
            )
    assert counts[("cisco-asa-2", "CREATE", 0)] == 4
    assert counts[("cisco-asa-2", "UPDATE", 2030)] == 7
    assert counts[("cisco-asa-2", "DELETE", 2030)] == 8
    assert ("cisco-asa-1", "DELETE", 2016) in counts  # the ICMP unreachable's event


def test_nat_events_as_nfdump_and_akvorado_decode_them(decoded):
    """natEvent (IE 230) text as nfdump prints it (`nat_event`, the IANA names); akvorado's TestDecodeNAT
    first record: 172.16.100.198:35303 -> 10.89.87.1:53 translated to 10.143.52.29:35303 -> 10.89.87.1:53."""
    ours, theirs = decoded["nel-nat"]
    assert sorted((r["src_addr"], r["src_port"], r["nat_event"]) for r in ours) == sorted(
        (t["src4_addr"], t["src_port"], t["nat_event"]) for t in theirs
    )
    assert {r["nat_event"] for r in ours} == {"NAT translation create", "NAT translation delete"}
    first = [r for r in ours if r["src_addr"] == "172.16.100.198" and r["src_port"] == 35303]
    assert [
        (
            r["dst_addr"],
            r["dst_port"],
            r["nat_src_addr"],
            r["nat_dst_addr"],
            r["nat_src_port"],
            r["nat_dst_port"],
        )
        for r in first
    ] == [("10.89.87.1", 53, "10.143.52.29", "10.89.87.1", 35303, 53)]
    assert {r["fw_event"] for r in ours} == {None}


def test_a_template_without_nat_fields_leaves_the_columns_null():
    """Huawei NetStream v9 (no 225-233, 40001-40005): the new columns are null, not 0.0.0.0 / 0."""
    from tracepipe.schema import ROUTER_EXTRA_COLUMNS

    files = ["netflow9_test_huawei_netstream_tpl.dat", "netflow9_test_huawei_netstream_data.dat"]
    rows = decode_export([(LOGSTASH / f).read_bytes() for f in files], "x")
    assert len(rows) == 1 and all(rows[0][c] is None for c in ROUTER_EXTRA_COLUMNS)


def test_public_address_and_time_lead_to_the_inside_host(tmp_path):
    """The CSIRT pivot: '10.143.52.29 port 35303 at 15:09:30' -> nat_inside() -> inside 172.16.100.198:35303
    (the NAT logger's translation), through the real CLI on a real lake; another port, none; any port, all the
    translations of that public address within 5 minutes."""
    captures = tmp_path / "in"
    captures.mkdir()
    (captures / "nat.pcap").write_bytes((ROUTERS / "akvorado" / "nat.pcap").read_bytes())
    lake = str(tmp_path / "lake")
    assert run_tracepipe("ingest", "netflow", str(captures / "nat.pcap"), "--lake", lake).returncode == 0

    def ask(sql: str) -> list[tuple]:
        proc = run_tracepipe("sql", sql, "--format", "json", "--lake", lake)
        assert proc.returncode == 0, proc.stderr
        return [tuple(r.values()) for r in json.loads(proc.stdout)]

    at = "TIMESTAMPTZ '2025-06-04 15:09:30+00'"
    assert ask(f"SELECT inside_addr, inside_port, dst_addr FROM nat_inside('10.143.52.29', {at}, 35303)") == [
        ("172.16.100.198", 35303, "10.89.87.1")
    ]
    assert ask(f"SELECT inside_addr FROM nat_inside('10.143.52.29', {at}, 1)") == []
    assert len(ask(f"SELECT inside_addr FROM nat_inside('10.143.52.29', {at})")) == 9
    late = "TIMESTAMPTZ '2025-06-04 16:00:00+00'"
    assert ask(f"SELECT inside_addr FROM nat_inside('10.143.52.29', {late}, 35303)") == []
    wider = f"SELECT inside_addr FROM nat_inside('10.143.52.29', {late}, within := INTERVAL 1 HOUR)"
    assert ("172.16.100.198",) in ask(wider) and len(ask(wider)) == 9
