"""The vectorised fast path of decode_datagrams (runs of datagrams that hold one data set of a known template, read
with numpy over their headers) decodes exactly what the per-datagram walk decodes: the same flows, and the same
sequence gaps and losses, whatever the order, duplicates, losses and 32-bit wraps, with exporters and domains
interleaved, template refreshes and junk in between. The oracle: the same stream fed one datagram per call, where
every run is one datagram long (so each sequence number goes through the per-datagram rules)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_netflow_decode import (
    SECS,
    UPTIME,
    flowset,
    ipfix_message,
    pack_values,
    rows,
    template_record,
    v9_datagram,
)
from tracepipe.ingest.netflow import DecoderState, decode_datagrams

LAYOUT = [(8, 4), (12, 4), (1, 4), (2, 4), (7, 2), (11, 2), (4, 1), (22, 4), (21, 4)]
IPFIX_LAYOUT = [(8, 4), (12, 4), (1, 4), (2, 4), (7, 2), (11, 2), (4, 1), (152, 8), (153, 8)]
COUNTERS = ("datagrams", "flows", "rejects", "sequence_gaps", "lost", "waiting_for_template")


def records(layout: list[tuple], n: int, salt: int, ipfix: bool = False) -> bytes:
    out = b""
    for i in range(n):
        values = {8: 0x0A000000 + salt * 64 + i, 12: 0xC0A80001 + i, 1: 100 * (i + 1), 2: i + 1}
        values.update({7: 1000 + salt, 11: 443, 4: 6})
        if ipfix:
            values.update({152: SECS * 1000 - 5000 + i, 153: SECS * 1000 - 1000 + i})
        else:
            values.update({22: UPTIME - 30_000 + i, 21: UPTIME - 1_000 + i})
        out += pack_values(layout, values)
    return out


def decode_all(payloads: list[bytes], exporters: list[str], one_at_a_time: bool) -> tuple:
    state = DecoderState()
    tables, stats = [], {}
    chunks = [[i] for i in range(len(payloads))] if one_at_a_time else [list(range(len(payloads)))]
    for chunk in chunks:
        result = decode_datagrams(
            [payloads[i] for i in chunk],
            [exporters[i] for i in chunk],
            np.zeros(len(chunk), np.int64),
            np.asarray(chunk, np.int64) * 100,
            "fast-path",
            state,
        )
        tables.append(result.flows)
        for exporter, s in result.stats.items():
            acc = stats.setdefault(exporter, dict.fromkeys(COUNTERS, 0))
            for k in COUNTERS:
                acc[k] += s[k]
    return sorted(r for t in tables for r in rows(t)), stats


def same_as_one_at_a_time(payloads: list[bytes], exporters: list[str]) -> tuple[list, dict]:
    """Decode the stream as one batch and one datagram per call; assert both agree; return the batch's."""
    fast_rows, fast = decode_all(payloads, exporters, one_at_a_time=False)
    slow_rows, slow = decode_all(payloads, exporters, one_at_a_time=True)
    assert fast == slow
    assert fast_rows == slow_rows
    return fast_rows, fast


def v9_stream(seqs: list[int], source_id: int = 0, salt: int = 0) -> list[bytes]:
    """The first datagram carries the template (full walk), the others one data set each (fast path)."""
    template = flowset(0, template_record(256, LAYOUT))
    out = [v9_datagram(template, flowset(256, records(LAYOUT, 2, salt)), seq=seqs[0], source_id=source_id)]
    for k, seq in enumerate(seqs[1:], 1):
        data = flowset(256, records(LAYOUT, 1 + k % 3, salt + k))
        out.append(v9_datagram(data, seq=seq, source_id=source_id))
    return out


@pytest.mark.parametrize(
    ("seqs", "gaps", "lost"),
    [
        ([1, 2, 3, 4, 5, 6], 0, 0),
        ([1, 2, 4, 5, 6], 1, 1),  # one datagram lost
        ([1, 2, 6, 7, 9, 10], 2, 4),
        ([1, 2, 4, 3, 5], 0, 0),  # reordered: the late one fills the gap
        ([1, 2, 3, 3, 4], 0, 0),  # duplicated
        ([0xFFFFFFFD, 0xFFFFFFFE, 0xFFFFFFFF, 0, 1], 0, 0),  # 32-bit wrap inside a run
        ([1, 2, 6, 4, 7], 1, 2),  # 3 and 5 lost, 4 late
    ],
)
def test_v9_runs_count_sequence_gaps_like_the_per_datagram_walk(seqs, gaps, lost):
    payloads = v9_stream(seqs)
    fast_rows, fast = same_as_one_at_a_time(payloads, ["192.0.2.7"] * len(payloads))
    assert (fast["192.0.2.7"]["sequence_gaps"], fast["192.0.2.7"]["lost"]) == (gaps, lost)
    assert len(fast_rows) == 2 + sum(1 + k % 3 for k in range(1, len(seqs)))


def ipfix_stream(drop: set[int], swap: int | None = None) -> list[bytes]:
    """RFC 7011 numbering: a message carries the count of data records sent before it."""
    template = flowset(2, template_record(300, IPFIX_LAYOUT))
    out, sent = [], 0
    for k in range(8):
        n = 1 + k % 3
        data = flowset(300, records(IPFIX_LAYOUT, n, k, ipfix=True))
        sets = (template, data) if k == 0 else (data,)
        if k not in drop:
            out.append(ipfix_message(*sets, seq=sent, domain=5))
        sent += n
    if swap is not None:
        out[swap], out[swap + 1] = out[swap + 1], out[swap]
    return out


@pytest.mark.parametrize(
    ("drop", "swap", "gaps", "lost"),
    [
        (set(), None, 0, 0),
        ({4}, None, 1, 2),  # message 4 held 2 records
        ({3, 6}, None, 2, 2),
        (set(), 4, 0, 0),  # reordered
    ],
)
def test_ipfix_runs_count_lost_records_like_the_per_datagram_walk(drop, swap, gaps, lost):
    payloads = ipfix_stream(drop, swap)
    fast_rows, fast = same_as_one_at_a_time(payloads, ["198.51.100.9"] * len(payloads))
    assert (fast["198.51.100.9"]["sequence_gaps"], fast["198.51.100.9"]["lost"]) == (gaps, lost)
    assert len(fast_rows) == sum(1 + k % 3 for k in range(8) if k not in drop)


def test_interleaved_exporters_domains_refreshes_and_junk_decode_as_one_at_a_time():
    """Two exporters x two source ids with their own sequences, interleaved; a template refresh, a redefinition
    and junk in the middle of the runs; data before its template. Same flows and counters either way."""
    streams = {
        ("192.0.2.1", 0): v9_stream(list(range(10, 40)), 0, 1),
        ("192.0.2.1", 7): v9_stream(list(range(500, 530)), 7, 2),
        ("192.0.2.2", 0): v9_stream([1, 2, 3, 5, 4, *range(6, 31)], 0, 3),
        ("192.0.2.3", 0): v9_stream(list(range(100, 130)), 0, 4)[1:] + v9_stream([130], 0, 4)[:1],
    }
    payloads, exporters = [], []
    rng = np.random.default_rng(7)
    cursors = dict.fromkeys(streams, 0)
    while any(cursors[k] < len(streams[k]) for k in streams):
        key = list(streams)[int(rng.integers(len(streams)))]
        if cursors[key] < len(streams[key]):
            payloads.append(streams[key][cursors[key]])
            exporters.append(key[0])
            cursors[key] += 1
        if len(payloads) == 40:
            payloads.append(b"\x00\x09junk")  # a datagram that is no NetFlow in the middle of the runs
            exporters.append("192.0.2.1")
        if len(payloads) == 60:  # refresh of the same layout from exporter .2
            payloads.append(v9_datagram(flowset(0, template_record(256, LAYOUT)), seq=9999))
            exporters.append("192.0.2.2")
    _, fast = same_as_one_at_a_time(payloads, exporters)
    assert fast["192.0.2.1"]["rejects"] == 1
    assert fast["192.0.2.3"]["flows"] > 0  # its data waited for the template at its end, then decoded


V6_LAYOUT = [(27, 16), (28, 16), (1, 4), (2, 4), (7, 2), (11, 2), (4, 1), (22, 4), (21, 4)]


@pytest.mark.parametrize("version", [9, 10])
@pytest.mark.parametrize(("drop", "gaps"), [(None, 0), (333, 1)])
def test_one_sequence_over_templates_that_alternate(version, drop, gaps):
    """A router's IPv4 and IPv6 monitors: data sets of two templates in alternate datagrams, one sequence per
    source id / domain. Before: the fast path followed it per template, and the gap list (64 kept) could not
    absorb what looked reordered: 1,000 datagrams, none lost, showed 435 gaps. Now: none, or the one there is."""
    layouts = {256: LAYOUT, 257: V6_LAYOUT}
    if version == 10:
        layouts = {256: IPFIX_LAYOUT, 257: [(27, 16), (28, 16), *IPFIX_LAYOUT[2:]]}
    templates = flowset(0 if version == 9 else 2, b"".join(template_record(t, f) for t, f in layouts.items()))
    payloads, sent = [], 0
    for k in range(1000):
        tid = 256 + k % 2
        n = 1 + k % 3
        body = b""
        for i in range(n):
            values = {
                8: 0x0A000000 + k,
                12: 0xC0A80001,
                27: (k * 8 + i).to_bytes(16, "big"),
                28: bytes(15) + b"\1",
            }
            values.update({1: 100, 2: 1, 7: 1000 + i, 11: 443, 4: 6, 22: UPTIME - 2000, 21: UPTIME - 1000})
            values.update({152: SECS * 1000 - 2000, 153: SECS * 1000 - 1000})
            body += pack_values(layouts[tid], values)
        sets = (templates, flowset(tid, body)) if k == 0 else (flowset(tid, body),)
        if k != drop:
            if version == 9:
                payloads.append(v9_datagram(*sets, seq=k))
            else:
                payloads.append(ipfix_message(*sets, seq=sent, domain=3))
        sent += n
    fast_rows, fast = same_as_one_at_a_time(payloads, ["192.0.2.9"] * len(payloads))
    stats = fast["192.0.2.9"]
    lost = 0 if drop is None else (1 if version == 9 else 1 + drop % 3)
    assert (stats["sequence_gaps"], stats["lost"]) == (gaps, lost)
    assert len(fast_rows) == sum(1 + k % 3 for k in range(1000) if k != drop)


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_records_of_an_implausible_clock_are_rejects_naming_their_datagram(one_at_a_time):
    """In a run the fast path takes (and one datagram at a time, the full walk), the records of a datagram whose
    header clock says 2099 or 1985 are rejects "time outside plausible window", one per record, each with the
    time it claimed and the offset of its datagram; the run's other records land."""
    stream = v9_stream(list(range(1, 7)))
    secs = {2: 4_080_000_000, 4: 490_000_000}  # 2099-04-16, 1985-07-12
    for k, clock in secs.items():
        stream[k] = stream[k][:8] + clock.to_bytes(4, "big") + stream[k][12:]
    state = DecoderState()
    chunks = [[i] for i in range(len(stream))] if one_at_a_time else [list(range(len(stream)))]
    flows, rejects = 0, []
    for chunk in chunks:
        result = decode_datagrams(
            [stream[i] for i in chunk],
            ["192.0.2.1"] * len(chunk),
            np.zeros(len(chunk), np.int64),
            np.asarray(chunk, np.int64) * 100 + 24,
            "clock",
            state,
        )
        flows += result.flows.num_rows
        rejects += result.rejects.to_pylist()
        assert result.stats["192.0.2.1"]["rejects"] == result.rejects.num_rows
    counts = [2] + [1 + k % 3 for k in range(1, 6)]  # records per datagram (v9_stream)
    assert flows == sum(counts) - counts[2] - counts[4]
    assert [(r["offset"], r["reason"], r["detail"][:14]) for r in rejects] == [
        *[(224, "time outside plausible window", "ts_start=2099-")] * counts[2],
        *[(424, "time outside plausible window", "ts_start=1985-")] * counts[4],
    ]
