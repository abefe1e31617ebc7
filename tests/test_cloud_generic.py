"""The documented generic CSV/JSONL form: columns, time zones, unknown actions, rejects with line numbers."""

import datetime as dt
import json
import zoneinfo
from pathlib import Path

from tracepipe.correlate.leases import build_leases
from tracepipe.ingest.cloud import detect_format, parse_cloud_text

DATA = Path(__file__).parent / "data" / "cloud" / "generic"


def test_csv_rows_rejects_and_unknown_action():
    text = (DATA / "inventory.csv").read_text()
    assert detect_format("inventory.csv", text) == "csv"
    events, rejects = parse_cloud_text(text, "inventory.csv")
    assert rejects.to_pydict()["line"] == [5] and rejects.to_pydict()["reason"] == ["bad or missing ts"]
    d = events.to_pydict()
    assert d["action"] == ["create", "power_off", "delete", "unknown"]
    assert d["ts"][:3] == [dt.datetime(2012, 11, 18, h, tzinfo=dt.UTC) for h in (1, 1, 3)]
    assert d["cloud"] == ["labcloud"] * 4 and d["line"] == [2, 3, 4, 6]
    leases, _vms = build_leases(events)
    lease = leases.to_pylist()[0]
    assert (lease["addr"], lease["vm_id"], lease["end_reason"]) == ("172.16.59.10", "vm-b", "delete")
    assert lease["valid_to"] == dt.datetime(2012, 11, 18, 3, tzinfo=dt.UTC)


def test_jsonl_with_local_zone_and_floating():
    lines = [
        {"ts": "2024-03-12 08:00:00", "vm_id": "v1", "vm_name": "n1", "action": "create", "addr": "10.1.0.5"},
        {
            "ts": "2024-03-12T08:30:00+01:00",
            "vm_id": "v1",
            "action": "attach",
            "addr": "203.0.113.50",
            "addr_kind": "floating",
        },
        {
            "ts": "2024-03-12 09:00:00",
            "vm_id": "v1",
            "action": "detach",
            "addr": "203.0.113.50",
            "addr_kind": "floating",
        },
        "not json",
    ]
    text = "\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines)
    assert detect_format("x.jsonl", text) == "jsonl"
    events, rejects = parse_cloud_text(text, "x.jsonl", tz=zoneinfo.ZoneInfo("Europe/Berlin"))
    assert rejects.to_pydict()["line"] == [4]
    assert events.column("action").to_pylist() == ["create", "fip_associate", "fip_disassociate"]
    assert events.column("ts").to_pylist()[0] == dt.datetime(2024, 3, 12, 7, tzinfo=dt.UTC)
    leases, _ = build_leases(events)
    floating = next(r for r in leases.to_pylist() if r["addr_kind"] == "floating")
    assert (floating["vm_id"], floating["valid_from"], floating["valid_to"]) == (
        "v1",
        dt.datetime(2024, 3, 12, 7, 30, tzinfo=dt.UTC),
        dt.datetime(2024, 3, 12, 8, tzinfo=dt.UTC),
    )


def test_csv_missing_required_column_rejects_file():
    events, rejects = parse_cloud_text("ts,vm_name\n2024-01-01T00:00:00Z,x\n", "bad.csv", fmt="csv")
    assert events.num_rows == 0 and rejects.to_pydict()["reason"] == ["missing columns"]
