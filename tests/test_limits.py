"""Issue 12, item 6 and the "limits" Must: everything an exporter or a file controls is bounded
(tracepipe/limits.py), each hit is counted, and the rest is still processed.

Decoder state: a template flood (v9 templates with distinct source ids from 500 addresses) leaves the state
bounded, a legitimate exporter keeps decoding through it, and a planted decoder-state.json (huge, or holding
more than the limits) cannot blow the committer's memory. The same flood over real UDP against the real
collector: the committer's peak memory and the saved state stay bounded.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_collector import collector, flow_keys, lake_flows, stop_collector, v9_datagram

from tests.conftest import run_tracepipe
from tracepipe import spool as sp
from tracepipe.collector import _load_state
from tracepipe.errors import UsageError
from tracepipe.ingest.netflow import DecoderState, decode_datagrams
from tracepipe.limits import DEFAULT, Limits, json_loads

LEGIT = "192.0.2.10"
ARRIVAL_US = 1_710_237_600 * 1_000_000


def flood_datagram(seq: int, source_id: int, templates: int, first_tid: int = 256, fields: int = 16) -> bytes:
    """A v9 datagram of `templates` templates (no data), each of its own layout so none can be shared."""
    sets = b""
    for t in range(templates):
        layout = [(8, 4), (12, 4)] + [(100 + (seq * 7 + t + k) % 300, 2) for k in range(fields - 2)]
        body = struct.pack(">HH", first_tid + t, len(layout)) + b"".join(
            struct.pack(">HH", *f) for f in layout
        )
        sets += body
    sets = struct.pack(">HH", 0, 4 + len(sets)) + sets
    return struct.pack(">HHIIII", 9, templates, 100_000, 1710237600, seq, source_id) + sets


def attacker(i: int) -> str:
    return f"203.0.{113 + i // 250}.{i % 250 + 1}"


def run_flood(state: DecoderState, datagrams: int, addresses: int, templates: int, chunk: int = 2000):
    """The flood of the issue, interleaved with a legitimate v9 exporter (template every 20 datagrams, two
    flows in each). Returns (legit flows decoded, legit flows sent, per-exporter stats of the last batch)."""
    decoded = sent = 0
    legit_seq = 0
    limits_hit: Counter = Counter()
    for start in range(0, datagrams, chunk):
        payloads, exporters = [], []
        for i in range(start, min(start + chunk, datagrams)):
            payloads.append(flood_datagram(i, source_id=i, templates=templates))
            exporters.append(attacker(i % addresses))
            if i % 10 == 0:
                flows = [(f"10.0.{legit_seq % 250}.{k}", 1000 + k) for k in range(2)]
                payloads.append(v9_datagram(legit_seq, flows, template=legit_seq % 20 == 0, source_id=1))
                exporters.append(LEGIT)
                legit_seq += 1
                sent += 2
        n = len(payloads)
        result = decode_datagrams(payloads, exporters, np.full(n, ARRIVAL_US, np.int64), None, "flood", state)
        legit = result.flows.filter(np_mask(result.flows.column("exporter").to_pylist(), LEGIT))
        decoded += legit.num_rows
        for stats in result.stats.values():
            limits_hit.update(stats["limits_hit"])
    return decoded, sent, limits_hit


def np_mask(values: list, wanted: str):
    import pyarrow as pa

    return pa.array([v == wanted for v in values])


# ---- the decoder state --------------------------------------------------------------------------------------


def test_template_flood_keeps_the_decoder_state_bounded_and_the_legit_exporter_decoding():
    limits = Limits(exporters=200, domains_per_exporter=4, templates_per_domain=8, templates_total=2000)
    state = DecoderState(limits)
    decoded, sent, hits = run_flood(state, datagrams=6_000, addresses=100, templates=8)  # within exporters
    more_decoded, more_sent, more_hits = run_flood(state, datagrams=6_000, addresses=500, templates=8)
    decoded, sent, hits = decoded + more_decoded, sent + more_sent, hits + more_hits
    assert decoded == sent  # every legit flow decoded during the flood
    assert len(state.exporters) <= 200 and LEGIT in state.exporters.live
    assert all(len(d) <= 4 for d in state.domains.values())
    assert len(state.templates) <= 2000 and state.fields_total <= limits.template_fields_total
    assert len(state.sequences) <= 200 * 4
    # the limits hit are counted by name, as the summary and the collector status show them
    assert hits["exporters"] > 0 and hits["domains_per_exporter"] > 0 and hits["templates_total"] > 0
    assert state.limits_hit["exporters"] == hits["exporters"]
    # and it persists within the same bounds
    assert len(state.to_json()) < 2_000 * 16 * 30
    again = DecoderState.from_json(state.to_json(), limits)
    assert set(again.templates) == set(state.templates) and LEGIT in again.exporters.live


def test_default_limits_bound_the_flood_of_the_issue():
    """12,000 datagrams of templates with distinct source ids from 500 addresses (10 templates each: 120,000
    templates; before: ~1.1 GB in the committer and a 99 MB decoder-state.json)."""
    state = DecoderState()
    decoded, sent, hits = run_flood(state, datagrams=12_000, addresses=500, templates=10)
    assert decoded == sent
    assert len(state.templates) <= DEFAULT.templates_total
    assert state.fields_total <= DEFAULT.template_fields_total
    assert hits["domains_per_exporter"] > 0 and hits["templates_total"] > 0
    size = len(state.to_json())
    assert size < 8 << 20, size  # vs 99 MB


def test_a_live_exporter_is_not_evicted_by_newcomers_but_an_idle_one_is():
    limits = Limits(exporters=3, exporter_idle_s=60, exporter_settle_s=5)
    state = DecoderState(limits)

    def send(exporter: str, arrival_s: int, data: bool) -> None:
        flows = [("10.0.0.1", 1)] if data else []
        payload = v9_datagram(0, flows, template=True)
        decode_datagrams([payload], [exporter], np.array([arrival_s * 10**6]), None, "t", state)

    send(LEGIT, 1000, data=True)  # delivered flows: live
    for i in range(10):
        send(attacker(i), 1001 + i, data=False)  # templates only: they evict each other, never LEGIT
    assert LEGIT in state.exporters and len(state.exporters) == 3
    send("192.0.2.11", 1020, data=True)
    send("192.0.2.12", 1021, data=True)
    assert set(state.exporters) == {LEGIT, "192.0.2.11", "192.0.2.12"}
    for exporter in (LEGIT, "192.0.2.11", "192.0.2.12"):  # heard over exporter_settle_s: settled
        send(exporter, 1027, data=True)
    # all three live, active and settled: a newcomer is refused, counted, and its template is a reject naming
    # the limit (test_netflow_decode: exporters not settled yet give their place)
    payload = v9_datagram(0, [], template=True)
    result = decode_datagrams([payload], ["198.51.100.1"], np.array([1030 * 10**6]), None, "t", state)
    assert result.rejects.column("reason").to_pylist() == ["limit exporters"]
    assert result.stats["198.51.100.1"]["limits_hit"] == {"exporters": 2}  # its template and its sequence
    # LEGIT silent for longer than exporter_idle_s: its place goes to the newcomer
    send("192.0.2.11", 1100, data=True)
    send("192.0.2.12", 1100, data=True)
    result = decode_datagrams([payload], ["198.51.100.1"], np.array([1101 * 10**6]), None, "t", state)
    assert result.rejects.num_rows == 0 and LEGIT not in state.exporters


def test_template_limits_fields_and_record_length_are_rejects_and_the_rest_decodes():
    limits = Limits(fields_per_template=20, template_record_bytes=100)
    wide = flood_datagram(0, source_id=1, templates=1, first_tid=400, fields=21)[20:]
    long = struct.pack(">HHHH", 0, 12, 401, 1) + struct.pack(">HH", 1, 200)  # one 200-byte field
    good = v9_datagram(0, [("10.0.0.1", 1)], template=True)
    payload = good[:20] + wide + long + good[20:]
    state = DecoderState(limits)
    result = decode_datagrams([payload], [LEGIT], np.zeros(1, np.int64), None, "t", state)
    assert sorted(result.rejects.column("reason").to_pylist()) == [
        "limit fields_per_template",
        "limit template_record_bytes",
    ]
    assert result.flows.num_rows == 1 and set(state.templates) == {(LEGIT, 9, 1, 256)}
    assert result.stats[LEGIT]["limits_hit"] == {"fields_per_template": 1, "template_record_bytes": 1}


def test_waiting_data_is_bounded_in_bytes():
    state = DecoderState(Limits(pending_bytes=40_000))
    # data sets for templates never sent, ~1.4 kB each: one exporter holds a quarter of the bytes at most
    payloads = [
        struct.pack(">HHIIII", 9, 1, 100_000, 1710237600, i, 1) + struct.pack(">HH", 300, 1404) + bytes(1400)
        for i in range(20)
    ]
    result = decode_datagrams(payloads, [LEGIT] * 20, np.zeros(20, np.int64), None, "t", state)
    assert state.pending_bytes <= 10_000 and state.pending_count == 7
    assert result.stats[LEGIT]["limits_hit"] == {"pending_bytes": 13}
    assert result.stats[LEGIT]["no_template"] == 13


def test_limit_overrides_parse_and_refuse_nonsense():
    assert DEFAULT.override(["exporters=8192", "templates-total=1_000"]).templates_total == 1000
    for bad in ("exporters", "nosuch=1", "exporters=0", "exporters=lots"):
        with pytest.raises(UsageError):
            DEFAULT.override([bad])


# ---- the persisted state ------------------------------------------------------------------------------------


def test_a_planted_huge_decoder_state_is_not_parsed(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    path = spool / sp.STATE_FILE
    with open(path, "wb") as handle:  # sparse: 1 GB on paper, no disk
        handle.truncate(1 << 30)
    state, after = _load_state(spool)
    assert len(state.templates) == 0 and after is None
    assert state.limits_hit["decoder_state_bytes"] == 1
    assert sp.next_serial(spool) == 1  # the spool's serial numbering does not read it either


def test_a_planted_decoder_state_over_the_limits_loads_within_them(tmp_path):
    limits = Limits(exporters=10, domains_per_exporter=2, templates_per_domain=3)
    fields = [[8, 4, 0], [12, 4, 0], [1, 4, 0]]
    planted = {
        "templates": {
            f"10.0.{e}.1|9|{d}|{256 + t}": {"fields": fields, "options": False, "scope": 0, "version": 9}
            for e in range(50)
            for d in range(5)
            for t in range(10)
        }
        | {
            "9.9.9.9|9|0|256": {"fields": [[1, 4, 0]] * 5000, "options": False, "scope": 0, "version": 9},
            "bad|9|x|1": {"fields": fields},
            "8.8.8.8|9|0|257": {"fields": [["a", 1, 0]], "options": False, "scope": 0, "version": 9},
        },
        "sequences": {
            f"10.0.{e}.1|9|{d}": [None, [], False, False, False, None] for e in range(50) for d in range(5)
        }
        | {"7.7.7.7|9|0": ["x"]},
        "pending": {"1.1.1.1|9|0|300": [["AAAA", [9, 0, 0, 0, 0, -1, -1], 0]] * 100_000},
        "sampling": {"x": "y"},
    }
    spool = tmp_path / "spool"
    spool.mkdir()
    sp.write_json_atomic(
        spool / sp.STATE_FILE, {"after_segment": "seg-3.spool", "state": json.dumps(planted)}
    )
    state, after = _load_state(spool, limits)
    assert after == "seg-3.spool"
    assert len(state.exporters) <= 10 and all(len(d) <= 2 for d in state.domains.values())
    assert len(state.templates) <= 10 * 2 * 3 and len(state.sequences) <= 10 * 2
    assert state.pending_count == DEFAULT.pending_flowsets // 4  # one exporter's share
    assert state.limits_hit["exporters"] > 0 and state.limits_hit["templates_per_domain"] > 0
    # 5000 fields, a bad key, a bad field, a bad sequence, a bad sampling key: dropped and counted
    assert state.limits_hit["decoder_state_entries"] == 5
    assert state.limits_hit["pending_flowsets"] == 100_000 - DEFAULT.pending_flowsets // 4
    # and it still decodes
    payload = v9_datagram(0, [("10.0.0.1", 1)], template=True)
    result = decode_datagrams([payload], [LEGIT], np.zeros(1, np.int64), None, "t", state)
    assert result.flows.num_rows == 1


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "not json", "[1, 2]", '{"state": "[[[["}'])
def test_a_garbled_decoder_state_starts_empty_and_says_so(tmp_path, text):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / sp.STATE_FILE).write_text(text)
    state, after = _load_state(spool)
    assert len(state.templates) == 0 and after is None
    assert state.limits_hit["decoder_state_entries"] == 1


# ---- over real UDP: the collector --------------------------------------------------------------------------


def committer_pid(collector_pid: int) -> int | None:
    for task in Path(f"/proc/{collector_pid}/task").iterdir():
        children = (task / "children").read_text().split()
        if children:
            return int(children[0])
    return None


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def test_template_flood_over_udp_keeps_the_committer_and_its_state_bounded(tmp_path):
    lake = tmp_path / "lake"
    limits = ["--limit", "templates_total=4000"]
    with collector(tmp_path, lake, "--rotate", "1s", *limits) as run:
        target = run.addr("4")
        committer = committer_pid(run.proc.pid)
        assert committer is not None
        time.sleep(1.0)
        rss_before = peak_rss_kb(committer)
        legit = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        legit.bind(("127.0.0.2", 0))
        senders = []
        for i in range(500):  # 500 attacker addresses: all of 127/8 is loopback
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"127.1.{i // 250}.{i % 250 + 1}", 0))
            senders.append(sock)
        expected: Counter = Counter()
        legit_seq = 0
        for i in range(12_000):
            senders[i % 500].sendto(flood_datagram(i, source_id=i, templates=10), target)
            if i % 20 == 0:
                flows = [(f"10.0.{legit_seq % 250}.{k}", 1000 + legit_seq // 250) for k in range(2)]
                legit.sendto(v9_datagram(legit_seq, flows, template=legit_seq % 20 == 0, source_id=1), target)
                expected.update(flows)
                legit_seq += 1
            if i % 100 == 99:
                time.sleep(0.02)  # the kernel's receive buffer on a test host is small
        for sock in [legit, *senders]:
            sock.close()
        time.sleep(3)
        rss_during = peak_rss_kb(committer)
        assert stop_collector(run) == 0, run.stderr.read_text()
        stats = run.stats()
    assert stats["kernel_drops"] == 0, "the test sent faster than this host receives; slow it down"
    flows = lake_flows(lake)
    legit_flows = flows.filter(np_mask(flows.column("exporter").to_pylist(), "127.0.0.2"))
    assert flow_keys(legit_flows) == expected  # the legit exporter kept decoding through the flood
    decoder = stats["committer"]["decoder"]
    assert decoder["templates"] <= 4000 and decoder["exporters"] == 501
    assert decoder["limits_hit"]["templates_total"] > 0 and decoder["limits_hit"]["domains_per_exporter"] > 0
    per_exporter = stats["committer"]["exporters"]
    assert per_exporter["127.0.0.2"]["rejects"] == 0 and per_exporter["127.0.0.2"]["limits_hit"] == {}
    assert len(per_exporter) == 501
    state_size = (lake / "_spool" / sp.STATE_FILE).stat().st_size
    assert state_size < 4 << 20, state_size  # was 99 MB
    grown_mb = (rss_during - rss_before) / 1024
    assert grown_mb < 150, f"committer grew {grown_mb:.0f} MB (was ~1.1 GB)"
    assert os.path.getsize(lake / "_spool" / sp.STATE_FILE) == state_size


# ---- files: line length, JSON depth, record sizes ----------------------------------------------------------

DATA = Path(__file__).resolve().parent / "data" / "cloud"
SAMPLE_CSV = Path(__file__).resolve().parent.parent / "sample_data" / "netflow" / "nfdump-v9.csv"
LONG = b"x" * (DEFAULT.line_bytes + 10)  # one line over the limit


def with_long_line(lines: list[bytes], at: int, long: bytes = LONG) -> bytes:
    """The lines with `long` inserted as line `at` (1-based), newline-terminated."""
    return b"".join(line + b"\n" for line in [*lines[: at - 1], long, *lines[at - 1 :]])


def test_a_gigabyte_line_is_read_through_not_held():
    import tracemalloc

    from tracepipe.limits import iter_line_blocks

    path = Path("/tmp") / f"tracepipe-limits-{os.getpid()}.log"
    try:
        with open(path, "wb") as handle:
            handle.write(b"first\nsecond\n")
            handle.seek(1 << 30, os.SEEK_CUR)  # a sparse GB of NULs: one line, no newline
            handle.write(b"\nafter\n")
        tracemalloc.start()
        with open(path, "rb") as handle:
            blocks = list(iter_line_blocks(handle))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        path.unlink(missing_ok=True)
    text = b"".join(b.data for b in blocks)
    assert text == b"first\nsecond\n\nafter\n"  # line numbers hold: "after" is still line 4
    assert [t for b in blocks for t in b.too_long] == [(3, 1 << 30)]
    assert peak < 200 << 20, peak


def test_over_long_syslog_line_is_a_reject_with_its_line_number(tmp_path):
    from tracepipe.ingest.vm import ingest_syslog_files
    from tracepipe.lake import Lake

    lines = (DATA / "syslog" / "web-02-auth.log").read_bytes().splitlines()
    path = tmp_path / "auth.log"
    path.write_bytes(with_long_line(lines, 3))
    lake = Lake(tmp_path / "lake")
    report = ingest_syslog_files(lake, [path], year=2024)
    baseline = ingest_syslog_files(Lake(tmp_path / "lake2"), [DATA / "syslog" / "web-02-auth.log"], year=2024)
    assert report.rows == baseline.rows  # the rest landed
    rejects = lake.read("rejects").to_pylist()
    long = [r for r in rejects if r["reason"] == "limit line_bytes"]
    assert [r["line"] for r in long] == [3] and report.rejects == baseline.rejects + 1


@pytest.mark.parametrize("kind", ["nova", "generic"])
def test_over_long_cloud_line_is_a_reject_and_the_rest_lands(tmp_path, kind):
    from tracepipe.ingest.vm import ingest_vm_files
    from tracepipe.lake import Lake

    source = DATA / ("nova/notifications.jsonl" if kind == "nova" else "generic/inventory.csv")
    lines = source.read_bytes().splitlines()
    path = tmp_path / source.name
    path.write_bytes(with_long_line(lines, 2))
    lake = Lake(tmp_path / "lake")
    report = ingest_vm_files(lake, [path])
    baseline = ingest_vm_files(Lake(tmp_path / "lake2"), [source])
    assert report.rows == baseline.rows
    long = [r for r in lake.read("rejects").to_pylist() if r["reason"] == "limit line_bytes"]
    assert [r["line"] for r in long] == [2]


def test_over_long_nfdump_csv_line_is_a_reject_and_the_rest_lands(tmp_path):
    from tracepipe.ingest.nfdump import read_nfdump_csv

    lines = SAMPLE_CSV.read_bytes().splitlines()
    path = tmp_path / "flows.csv"
    path.write_bytes(with_long_line(lines, 5))
    flows, rejects = read_nfdump_csv(path)
    want, want_rejects = read_nfdump_csv(SAMPLE_CSV)
    assert flows.num_rows == want.num_rows
    assert rejects.num_rows == want_rejects.num_rows + 1
    long = [r for r in rejects.to_pylist() if r["reason"] == "limit line_bytes"]
    assert [r["line"] for r in long] == [5]


def test_over_long_intel_line_is_a_reject_and_the_rest_lands(tmp_path):
    from tracepipe.intel import import_intel
    from tracepipe.lake import Lake

    path = tmp_path / "bad-ips.txt"
    path.write_bytes(with_long_line([b"198.51.100.7", b"203.0.113.0/24"], 2))
    lake = Lake(tmp_path / "lake")
    result = import_intel(lake, path, "list")
    assert result.to_dict()["rows"] == 2 and result.to_dict()["rejects"] == 1
    assert lake.read("rejects").column("line").to_pylist() == [2]


@pytest.mark.parametrize("json_impl", ["orjson", "stdlib"])
def test_deep_json_is_a_reject_not_a_recursion_error(monkeypatch, tmp_path, json_impl):
    import json as stdlib_json

    from tracepipe import limits
    from tracepipe.ingest.cloud import parse_cloud_text
    from tracepipe.intel import parse_misp_json

    if json_impl == "stdlib":
        monkeypatch.setattr(limits, "_fast_loads", stdlib_json.loads)
    deep = "[" * 200_000 + "]" * 200_000
    good = (DATA / "nova" / "notifications.jsonl").read_text().splitlines()
    events, rejects = parse_cloud_text("\n".join([good[0], deep, *good[1:]]), "n.jsonl", fmt="nova")
    want, _ = parse_cloud_text("\n".join(good), "n.jsonl", fmt="nova")
    assert events.num_rows == want.num_rows
    assert rejects.column("line").to_pylist() == [2]
    rows, bad, _ = parse_misp_json('{"Event": ' + deep + "}")
    assert rows == [] and len(bad) == 1
    with pytest.raises(stdlib_json.JSONDecodeError):
        limits.json_loads(deep)
    # a bracket inside a string is no nesting: a VM named "[[[[..." is an event like any other
    assert limits.json_loads('{"name": "' + "[" * 5000 + '"}')["name"] == "[" * 5000


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_a_capture_record_over_the_limit_is_skipped_and_the_rest_lands(tmp_path, fmt):
    from scapy.layers.inet import IP, UDP
    from test_pcap import read_all, write_pcap, write_pcapng

    frames = [
        bytes(IP(src="192.0.2.10", dst="127.0.0.1") / UDP(sport=5, dport=2055) / (bytes([i]) * 40))
        for i in range(6)
    ]
    huge = bytes(IP(src="192.0.2.10", dst="127.0.0.1") / UDP(sport=5, dport=2055)) + bytes(300_000)
    path = tmp_path / f"x.{fmt}"
    raw = 101  # LINKTYPE_RAW: the frame is the IP packet
    if fmt == "pcap":
        offsets = write_pcap(path, [*frames[:3], huge, *frames[3:]], raw, snaplen=1 << 20)
    else:
        offsets = write_pcapng(path, [*frames[:3], huge, *frames[3:]], raw)
    got = read_all(path)
    assert len(got["payloads"]) == 6  # the records after the oversized one still land
    assert [(r["reason"], r["offset"]) for r in got["rejects"]] == [
        ("limit capture_record_bytes", offsets[3])
    ]


def test_a_pcap_record_claiming_4_gb_stops_the_file_there_without_reading_it(tmp_path):
    from scapy.layers.inet import IP, UDP
    from test_pcap import read_all, write_pcap

    frames = [
        bytes(IP(src="192.0.2.10", dst="127.0.0.1") / UDP(sport=5, dport=2055) / b"ab") for _ in range(3)
    ]
    path = tmp_path / "x.pcap"
    offsets = write_pcap(path, frames, 101)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, offsets[2] + 8, 0xFFFFFFF0)  # the last record claims ~4 GB
    path.write_bytes(bytes(data))
    got = read_all(path)
    assert len(got["payloads"]) == 2
    assert [(r["reason"], r["offset"]) for r in got["rejects"]] == [("truncated pcap record", offsets[2])]


def test_escaped_lone_surrogates_are_read_not_rejected():
    """Regression (issue 12 property test): a project named "\\udcff" in a Nova notification made orjson refuse the
    line, so every event of that tenant's VMs was rejected and their flows landed unattributed (blinded)."""
    doc = json.dumps({"display_name": "web\udcff-05", "tags": ["\ud800", "ok"], "n": 1})
    assert json_loads(doc) == {"display_name": "web\ufffd-05", "tags": ["\ufffd", "ok"], "n": 1}
    assert json_loads(doc.encode()) == json_loads(doc)
    with pytest.raises(json.JSONDecodeError):
        json_loads('{"a": "\\udcff", }')  # still not JSON: still an error


def test_a_lone_surrogate_beside_hostile_json_is_a_decode_error_or_a_document(tmp_path):
    """Hostile review (session 26): with a lone surrogate escape in a VM name, the document went to the stdlib
    parser and a recursive clean-up: a 5,000-digit number raised ValueError, a list ~900 levels deep
    RecursionError, and `ingest vm` lost the whole file (exit 4). Now only JSONDecodeError, or the document;
    an escaped backslash before "u" stays text and a surrogate pair stays its character."""
    named = '{"name": "\\ud800evil", '
    with pytest.raises(json.JSONDecodeError):
        json_loads(named + '"n": 1' + "0" * 5000 + "}")
    deep = json_loads(named + '"x": ' + "[" * 900 + "]" * 900 + "}")
    assert deep["name"] == "\ufffdevil" and len(json.dumps(deep["x"])) == 1800
    with pytest.raises(json.JSONDecodeError):
        json_loads(named + '"x": ' + "[" * 5000 + "]" * 5000 + "}")
    assert json_loads('{"a": "\\\\ud800", "b": "\\ud83d\\ude00", "c": "\\udc00\\ud800"}') == {
        "a": "\\ud800",
        "b": "\U0001f600",
        "c": "\ufffd\ufffd",
    }
    # the file around such a line lands: one reject, exit 3 (not "internal error", exit 4)
    good = {
        "vm_id": "vm-1",
        "ts": "2025-06-17T08:00:00Z",
        "action": "create",
        "vm_name": "ok",
        "addr": "10.0.0.1",
    }
    path = tmp_path / "vms.jsonl"
    path.write_text(
        json.dumps(good)
        + "\n"
        + named
        + '"ts": 1'
        + "0" * 5000
        + "}\n"
        + json.dumps(good | {"vm_id": "vm-2", "addr": "10.0.0.2"})
        + "\n"
    )
    result = run_tracepipe("ingest", "vm", str(path), "--output", "json", "--lake", str(tmp_path / "lake"))
    assert result.returncode == 3, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["rows"], summary["rejects"]) == (2, 1)


@pytest.mark.parametrize("line_bytes", [64, 65])
def test_a_line_one_byte_over_the_limit_is_found_wherever_it_sits(line_bytes):
    """Regression for the block pre-check that skips the byte-by-byte scan when every window of line_bytes/2
    bytes holds a newline: a line of line_bytes + 1 bytes is still emptied and listed at any offset in a block
    of short lines, and a line of exactly line_bytes is kept."""
    import io

    from tracepipe.limits import iter_line_blocks

    limits = Limits(line_bytes=line_bytes)
    for offset in range(line_bytes):
        short = [b"y" * (offset % 7)] * (offset + 3)
        lines = [*short, b"a" * line_bytes, b"b" * (line_bytes + 1), *short]
        data = b"".join(line + b"\n" for line in lines)
        blocks = list(iter_line_blocks(io.BytesIO(data), 4 * line_bytes + 7, limits))
        kept = b"".join(b.data for b in blocks).split(b"\n")[:-1]
        long_at = len(short) + 2
        assert [t for b in blocks for t in b.too_long] == [(long_at, line_bytes + 1)], offset
        assert kept == [*short, b"a" * line_bytes, b"", *short], offset


# ---- one exporter's templates (hostile-input review, session 23) ---------------------------------------------


def _ipfix(*sets: bytes, seq: int = 0, domain: int = 0) -> bytes:
    body = b"".join(sets)
    return struct.pack(">HHIII", 10, 16 + len(body), 1710237600, seq, domain) + body


def _set(set_id: int, body: bytes) -> bytes:
    return struct.pack(">HH", set_id, 4 + len(body)) + body


def _template(tid: int, fields: list[tuple[int, int]]) -> bytes:
    return struct.pack(">HH", tid, len(fields)) + b"".join(struct.pack(">HH", *f) for f in fields)


LEGIT_FIELDS = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (2, 4), (1, 4), (152, 8), (153, 8)]


def _legit(seq: int, template: bool, flows: int = 3) -> bytes:
    records = b"".join(
        struct.pack(
            ">4s4sHHBIIQQ",
            bytes([10, 0, 0, 5]),
            bytes([198, 51, 100, k + 1]),
            1000 + k,
            443,
            6,
            1,
            60,
            1710237600_000,
            1710237601_000,
        )
        for k in range(flows)
    )
    sets = [_set(2, _template(256, LEGIT_FIELDS))] if template else []
    return _ipfix(*sets, _set(256, records), seq=seq)


@pytest.mark.parametrize("junk_has_addresses", [False, True])
def test_one_exporters_template_flood_evicts_its_own_templates_not_another_exporters(junk_has_addresses):
    """One sender, one domain: 256 templates of 1,024 fields (the whole default template_fields_total), each with
    a record. Before: the records made every template "live" (even records of no address, all rejected), the
    legit exporter's older template was evicted and its next flows were "no template" rejects."""
    state = DecoderState()
    assert (
        decode_datagrams([_legit(0, True)], [LEGIT], np.array([ARRIVAL_US]), None, "t", state).flows.num_rows
        == 3
    )
    attacker_ip, payloads = "203.0.113.66", []
    for t in range(256):
        fields = [(8, 4), (12, 4)] if junk_has_addresses else []
        fields += [(100 + k % 300, 1) for k in range(1024 - len(fields))]
        payloads.append(
            _ipfix(_set(2, _template(256 + t, fields)), _set(256 + t, bytes(range(256)) * 4), domain=1)
        )
    n = len(payloads)
    flood = decode_datagrams(payloads, [attacker_ip] * n, np.full(n, ARRIVAL_US), None, "t", state)
    assert state.fields_total <= DEFAULT.template_fields_total
    assert state.exporter_fields[attacker_ip] <= DEFAULT.template_fields_per_exporter
    assert flood.stats[attacker_ip]["limits_hit"].get("template_fields_per_exporter", 0) > 0
    assert (LEGIT, 10, 0, 256) in state.templates
    after = decode_datagrams([_legit(3, False)], [LEGIT], np.array([ARRIVAL_US]), None, "t", state)
    assert after.flows.num_rows == 3 and after.rejects.num_rows == 0
    if not junk_has_addresses:  # records that can give no flow are rejected at once and keep nothing live
        assert set(flood.rejects.column("reason").to_pylist()) == {"no addresses"}
        assert not any(k[0] == attacker_ip for k in state.all_templates.live)
    # the per-exporter share survives a save and load
    again = DecoderState.from_json(state.to_json())
    assert again.exporter_fields == state.exporter_fields and (LEGIT, 10, 0, 256) in again.templates


def test_one_byte_section_records_are_rejected_before_they_take_a_slot_each():
    """A template whose only field is a variable-length dataLinkFrameSection (IE 315), records of an empty
    section: one byte each on the wire. Each used to become a 256-byte slot before being found to hold no
    address: ~17 MB of memory per 64 KB datagram (a 6.5 MB file ran a 4 GB process out of memory). The legit
    exporter's flows around them land."""
    import tracemalloc

    records = 65_000
    bomb = _ipfix(_set(2, _template(400, [(315, 65535)])), _set(400, bytes(records)), domain=1)
    payloads = [_legit(0, True)] + [bomb] * 20 + [_legit(3, False)]
    exporters = [LEGIT] + ["203.0.113.66"] * 20 + [LEGIT]
    tracemalloc.start()
    try:
        result = decode_datagrams(
            payloads, exporters, np.full(len(payloads), ARRIVAL_US), None, "t", DecoderState()
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.flows.num_rows == 6
    assert (
        result.rejects.column("detail").to_pylist()
        == [f"{records} records: packet section shorter than an IP header"] * 20
    )
    assert peak < 64 << 20, peak  # 20 x 65,000 slots of 256 bytes were 333 MB


def test_the_per_exporter_share_stays_counted_when_the_total_evicts_an_exporters_last_template():
    # review: the total's eviction of the exporter's only template dropped its standing while the new template was
    # being added; from then on its templates were not counted and it took 40 fields under a cap of 20
    from tracepipe.ingest.netflow import Template

    limits = Limits(template_fields_total=40, template_fields_per_exporter=20)
    state = DecoderState(limits)
    made = iter(range(1000))

    def add(exporter: str, tid: int) -> None:
        n = next(made)
        fields = [(8, 4, 0), (12, 4, 0)] + [(1000 + n * 10 + k, 2, 0) for k in range(8)]  # 10 fields
        state.add_template((exporter, 9, 0, tid), Template.build(fields))

    a, b, c = "192.0.2.1", "192.0.2.2", "192.0.2.3"
    for exporter, tid in [(a, 256), (b, 256), (b, 257), (c, 256)] + [(a, t) for t in range(257, 270)]:
        add(exporter, tid)
        for name in (a, b, c):
            held = sum(len(t.fields) for k, t in state.templates.items() if k[0] == name)
            assert state.exporter_fields[name] == held <= limits.template_fields_per_exporter
            assert {k for k in state.templates if k[0] == name} == set(state.exporter_templates.get(name, ()))
    assert state.fields_total <= limits.template_fields_total
