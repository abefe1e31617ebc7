"""`tracepipe ingest netflow --allow CIDR`: a capture lands the export datagrams of the senders it names only
(the collector's --allow, for captures: a SPAN port or a shared capture holds whatever anyone sent). Real
softflowd exports over IPv4 and IPv6 transport (senders 127.0.0.1 and ::1), merged into one capture."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import duckdb
import pytest

from tests.conftest import run_in_process
from tracepipe.ingest.flows import ingest_flow_files
from tracepipe.lake import Lake
from tracepipe.senders import AllowList


def _records(pcap: Path) -> tuple[bytes, list[bytes]]:
    """A classic pcap's file header and its records (header and bytes), in file order."""
    data = pcap.read_bytes()
    assert struct.unpack_from("<I", data)[0] == 0xA1B2C3D4, (
        "tcpdump -w writes microsecond pcap, little-endian"
    )
    records, pos = [], 24
    while pos + 16 <= len(data):
        length = struct.unpack_from("<I", data, pos + 8)[0]
        records.append(data[pos : pos + 16 + length])
        pos += 16 + length
    return data[:24], records


@pytest.fixture(scope="module")
def two_senders(softflowd_export, tmp_path_factory):  # type: ignore[no-untyped-def]
    """One capture holding a real softflowd v9 export from 127.0.0.1 and one from ::1 (the same traffic)."""
    v4, v6 = softflowd_export(9, "ipv4", "ipv4"), softflowd_export(9, "ipv4", "ipv6")
    (header, first), (header6, second) = _records(v4.export_pcap), _records(v6.export_pcap)
    assert header[20:24] == header6[20:24], "both captures of the same link type"
    merged = tmp_path_factory.mktemp("allow") / "two-senders.pcap"
    merged.write_bytes(header + b"".join(first + second))
    return merged, v4, v6, len(first), len(second)


def _flows_by_exporter(lake: Path) -> dict[str, int]:
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT exporter, count(*) FROM read_parquet('{lake}/flows/**/*.parquet') GROUP BY ALL"
    ).fetchall()
    return dict(rows)


@pytest.mark.parametrize(
    ("allow", "kept"), [("127.0.0.0/8", "127.0.0.1"), ("::1/128", "::1")], ids=["ipv4 sender", "ipv6 sender"]
)
def test_allow_lands_the_datagrams_of_the_senders_it_names(two_senders, tmp_path, allow, kept):  # type: ignore[no-untyped-def]
    """Only the named sender's flows land, as many as nfdump decodes from its own export; the other sender's
    datagrams are counted by sender (not_allowed), never decoded; the exit code is 0 (asked for, not bad input)."""
    merged, v4, v6, n4, n6 = two_senders
    ours, other, dropped = (v4, v6, n6) if kept == "127.0.0.1" else (v6, v4, n4)
    lake = tmp_path / "lake"
    run = run_in_process(
        "ingest", "netflow", str(merged), "--lake", str(lake), "--allow", allow, "--format", "json"
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    (result,) = answer["files"]
    assert result["status"] == "landed" and result["flows"] == ours.expected.num_rows
    assert result["not_allowed"] == {other.exporter: dropped}
    assert answer["totals"]["not_allowed"] == dropped
    assert "senders outside --allow left out" in result["message"]
    assert _flows_by_exporter(lake) == {kept: ours.expected.num_rows}


def test_without_allow_every_sender_lands_and_with_workers_the_same(two_senders, tmp_path):  # type: ignore[no-untyped-def]
    """No --allow: both senders land. Through the decode workers (--jobs 2, every size) --allow gives what the
    single process gives."""
    merged, v4, v6, n4, _ = two_senders
    everything = ingest_flow_files(Lake(tmp_path / "all"), [merged], jobs=1)
    assert everything.flows == v4.expected.num_rows + v6.expected.num_rows
    assert everything.files[0].not_allowed == {}
    parallel = ingest_flow_files(
        Lake(tmp_path / "jobs"), [merged], jobs=2, parallel_min_bytes=1, allow=AllowList(["::1/128"])
    )
    assert parallel.flows == v6.expected.num_rows and parallel.files[0].not_allowed == {"127.0.0.1": n4}
    assert _flows_by_exporter(tmp_path / "jobs") == {"::1": v6.expected.num_rows}


def test_a_capture_of_no_allowed_sender_lands_nothing_and_can_land_later(two_senders, tmp_path):  # type: ignore[no-untyped-def]
    """Every datagram outside --allow (a mistyped prefix): nothing is committed, not even the content hash, so
    the run with the right prefix lands the capture instead of skipping it as already ingested."""
    merged, v4, *_ = two_senders
    lake = tmp_path / "lake"
    run = run_in_process("ingest", "netflow", str(merged), "--lake", str(lake), "--allow", "192.0.2.0/24")
    assert run.returncode == 4, run.stdout + run.stderr
    assert "outside --allow" in run.stdout and "nothing landed" in run.stdout
    again = run_in_process("ingest", "netflow", str(merged), "--lake", str(lake), "--allow", "127.0.0.1/32")
    assert again.returncode == 0, again.stdout + again.stderr
    assert _flows_by_exporter(lake) == {"127.0.0.1": v4.expected.num_rows}


def test_allow_refuses_what_it_cannot_filter(two_senders, tmp_path):  # type: ignore[no-untyped-def]
    """A CIDR that does not parse is a usage error (exit 2) before anything is read; a file that is not a
    capture (nfdump CSV here) names no sender, so --allow does not read it and says why."""
    merged = two_senders[0]
    bad = run_in_process(
        "ingest", "netflow", str(merged), "--lake", str(tmp_path / "l"), "--allow", "10.0.0/33"
    )
    assert bad.returncode == 2 and "--allow" in bad.stderr
    assert not (tmp_path / "l" / "flows").exists()
    csv = tmp_path / "flows.csv"
    csv.write_text("ts,te,td,sa,da,sp,dp,pr,flg,fwd,stos,ipkt,ibyt\n", encoding="utf-8")
    run = run_in_process("ingest", "netflow", str(csv), "--lake", str(tmp_path / "l"), "--allow", "::1/128")
    assert run.returncode == 4
    assert "--allow takes the datagrams of captures by their sender" in run.stdout
