"""Threat intel: MISP CSV / JSON exports and plain lists into the `intel` dataset (rejects with their line),
idempotent imports, matching v4/v6 addresses against IPs and (overlapping) CIDRs, and the retro-hunt sweep."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from support import stories as gen

from tests.conftest import run_tracepipe
from tracepipe.intel import import_intel, match_addresses, parse_intel, parse_stix, read_intel, sniff_format
from tracepipe.lake import Lake
from tracepipe.pipeline_config import load_pipeline
from tracepipe.sweep import run_sweep

REPO = Path(__file__).resolve().parent.parent

MISP_CSV = """uuid,event_id,category,type,value,comment,to_ids,date,object_relation,attribute_tag,object_uuid,object_name,object_meta_category
5f1a0c1e-0001-4b4e-9d6a-000000000001,1201,Network activity,ip-dst,203.0.113.66,C2 server,1,1718611200,,,,,
5f1a0c1e-0001-4b4e-9d6a-000000000002,1201,Network activity,ip-dst|port,198.51.100.9|4444,,1,1718611200,,,,,
5f1a0c1e-0001-4b4e-9d6a-000000000003,1201,Network activity,ip-src,192.0.2.0/24,scanner range,1,1718611200,,,,,
5f1a0c1e-0001-4b4e-9d6a-000000000004,1201,Network activity,ip-dst,not-an-ip,,1,1718611200,,,,,
5f1a0c1e-0001-4b4e-9d6a-000000000005,1201,Network activity,domain,evil.example,,1,1718611200,,,,,
5f1a0c1e-0001-4b4e-9d6a-000000000006,1201,Payload delivery,url,http://evil.example/x,,1,1718611200,,,,,
5f1a0c1e-0001-4b4e-9d6a-000000000007,1202,Network activity,ip-dst,2001:db8:bad::/48,v6 block,1,1718611200,,,,,
"""

MISP_JSON = {
    "Event": {
        "id": "77",
        "info": "Botnet infrastructure",
        "Attribute": [
            {
                "type": "ip-dst",
                "value": "203.0.113.5",
                "category": "Network activity",
                "comment": "panel",
                "timestamp": "1718611200",
            },
            {"type": "ip-src", "value": "300.1.1.1", "category": "Network activity"},
            {"type": "sha256", "value": "ab" * 32, "category": "Payload delivery"},
        ],
        "Object": [
            {
                "name": "ip-port",
                "Attribute": [
                    {"type": "ip-dst", "value": "2001:db8:bad::66", "category": "Network activity"}
                ],
            }
        ],
    }
}

PLAIN = """# our CERT's list
10.66.0.0/16      # a whole range
198.51.100.77
2001:DB8:0BAD::1  # upper case and zeros: stored canonical

999.1.2.3
"""


def test_misp_csv_rows_rejects_and_skipped_types():
    table, rejects, skipped = parse_intel(MISP_CSV, "misp-csv", "misp.csv")
    rows = table.to_pylist()
    assert [r["indicator"] for r in rows] == [
        "203.0.113.66",
        "198.51.100.9",
        "192.0.2.0/24",
        "evil.example",
        "2001:db8:bad::/48",
    ]
    cidr = rows[2]
    assert (cidr["kind"], cidr["net_lo"], cidr["net_hi"], cidr["ip_version"]) == (
        "cidr",
        "192.0.2.0",
        "192.0.2.255",
        4,
    )
    assert rows[0]["description"] == "C2 server" and rows[0]["event_id"] == "1201"
    assert rows[0]["first_seen"] == dt.datetime(2024, 6, 17, 8, 0, tzinfo=dt.UTC)
    assert rows[4]["net_hi"] == "2001:db8:bad:ffff:ffff:ffff:ffff:ffff"
    assert rejects.to_pylist()[0]["line"] == 5 and "not an address" in rejects.to_pylist()[0]["reason"]
    assert skipped.types == 1  # the url


def test_misp_json_event_attributes_and_objects():
    table, rejects, skipped = parse_intel(json.dumps(MISP_JSON), "misp-json", "event.json")
    assert table.column("indicator").to_pylist() == ["203.0.113.5", "2001:db8:bad::66"]
    assert table.column("event_id").to_pylist() == ["77", "77"]
    assert table.column("description").to_pylist()[0] == "panel"
    assert rejects.num_rows == 1 and rejects.column("offset").to_pylist() == [2]
    assert skipped.types == 1
    # the REST shape {"response": [{"Event": ...}]} too
    wrapped, _, _ = parse_intel(json.dumps({"response": [MISP_JSON]}), "misp-json", "r.json")
    assert wrapped.num_rows == 2


def test_plain_list_with_comments_and_bad_line():
    table, rejects, _ = parse_intel(PLAIN, "list", "list.txt")
    assert table.column("indicator").to_pylist() == ["10.66.0.0/16", "198.51.100.77", "2001:db8:bad::1"]
    assert rejects.column("line").to_pylist() == [6]


def test_sniff_format():
    assert sniff_format(MISP_CSV, Path("x.txt")) == "misp-csv"
    assert sniff_format(json.dumps(MISP_JSON), Path("x")) == "misp-json"
    assert sniff_format(PLAIN, Path("bad.txt")) == "list"


def test_import_is_idempotent_and_stores_rejects(tmp_path):
    path = tmp_path / "misp.csv"
    path.write_text(MISP_CSV)
    lake = Lake(tmp_path / "lake")
    first = import_intel(lake, path)
    assert (first.format, first.rows, first.rejects, first.already_imported) == ("misp-csv", 5, 1, False)
    again = import_intel(lake, path)
    assert again.already_imported
    assert lake.read("intel").num_rows == 5
    rejects = lake.read("rejects").to_pylist()
    assert [(r["dataset"], r["line"]) for r in rejects] == [("intel", 5)]


def test_cli_import_exit_codes(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("203.0.113.1\n")
    bad.write_text(PLAIN)
    base = [sys.executable, "-m", "tracepipe.cli", "intel", "import", "--lake", str(tmp_path / "lake")]
    proc = subprocess.run([*base, str(good), "--output", "json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["rows"] == 1
    proc = subprocess.run([*base, str(bad), "--format", "list"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    proc = subprocess.run([*base, str(tmp_path / "missing.csv")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4 and "cannot read" in proc.stderr


def test_match_addresses_ips_nested_cidrs_v6():
    rows, _, _ = parse_intel(
        "10.0.0.0/8\n10.1.0.0/16\n192.0.2.7\n2001:db8:bad::/48\n172.16.5.0/24\n", "list", "l"
    )
    addrs = [
        "10.1.2.3",
        "10.200.0.1",
        "192.0.2.7",
        "192.0.2.8",
        "2001:db8:bad:1::5",
        "2001:db8:bae::1",
        "172.16.5.255",
        "172.16.6.0",
        "11.0.0.0",
    ]
    found = dict(match_addresses(addrs, rows).select("addr", "indicator").iter_rows())
    assert set(found) == {"10.1.2.3", "10.200.0.1", "192.0.2.7", "2001:db8:bad:1::5", "172.16.5.255"}
    assert found["10.200.0.1"] == "10.0.0.0/8"
    assert found["10.1.2.3"] in {"10.0.0.0/8", "10.1.0.0/16"}
    assert found["2001:db8:bad:1::5"] == "2001:db8:bad::/48"
    assert match_addresses([], rows).is_empty()
    assert match_addresses(addrs, pa.Table.from_pylist([], schema=rows.schema)).is_empty()


@pytest.fixture(scope="module")
def story_lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("intel")
    story = gen.generate(seed=8, days=2)
    lake = Lake(root / "lake")
    lake.append("flows", story.flows, key="story")
    lake.replace_dataset("vm_leases", story.leases)
    return root, lake, story


def test_retro_hunt_finds_old_contacts_after_import(story_lake):
    root, lake, story = story_lake
    config = load_pipeline(REPO / "pipelines" / "retro-hunt.toml")
    import dataclasses

    config = dataclasses.replace(
        config, output=dataclasses.replace(config.output, report_dir=str(root / "r"), html=False)
    )
    since, until = story.start, story.last_day[1]
    before = run_sweep(lake, config, since, until)
    assert before.exit_code == 0 and before.alerts.num_rows == 0  # no indicators yet
    (root / "cert.txt").write_text(story.intel_lines)
    import_intel(lake, root / "cert.txt")
    after = run_sweep(lake, config, since, until)
    assert after.exit_code == 1
    planted = {p.addr: p for p in story.planted if p.detector == "intel"}
    got = {a["addr"]: a for a in after.new_alerts.to_pylist()}
    assert set(got) == set(planted)
    for addr, alert in got.items():
        assert alert["detector"] == "intel" and alert["vm_name"] == planted[addr].vm_name
        assert alert["peer"] == planted[addr].peer
        assert "listed in threat intel" in alert["reason"]
    assert run_sweep(lake, config, since, until).new_alerts.num_rows == 0


# ---- hostile input (issue 12, items 8 and 9) -------------------------------------------------------------------


def test_absurdly_wide_networks_are_rejected_not_indicators():
    # before: 0.0.0.0/0 and ::/0 landed and made every address an IOC hit
    text = "0.0.0.0/0\n::/0\n10.0.0.0/7\n2000::/3\n2001:db8::/15\n10.0.0.0/8\n2001:db8::/16\n"
    table, rejects, _ = parse_intel(text, "list", "wide.txt")
    assert table.column("indicator").to_pylist() == ["10.0.0.0/8", "2001::/16"]
    assert rejects.column("line").to_pylist() == [1, 2, 3, 4, 5]
    assert rejects.column("reason").to_pylist() == [
        "CIDR too wide (shorter than /8 for IPv4)",
        "CIDR too wide (shorter than /16 for IPv6)",
        "CIDR too wide (shorter than /8 for IPv4)",
        "CIDR too wide (shorter than /16 for IPv6)",
        "CIDR too wide (shorter than /16 for IPv6)",
    ]
    misp = "type,value\nip-dst,0.0.0.0/0\nip-src|port,::/0|443\nip-dst,192.0.2.0/24\n"
    table, rejects, _ = parse_intel(misp, "misp-csv", "wide.csv")
    assert table.column("indicator").to_pylist() == ["192.0.2.0/24"]
    assert rejects.column("line").to_pylist() == [2, 3]


@pytest.mark.parametrize(
    ("doc", "rows", "reasons"),
    [
        (
            {"Event": {"Attribute": {"type": "ip-dst", "value": "192.0.2.1"}}},
            0,
            ["unexpected MISP JSON shape"],
        ),
        ({"Event": {"Attribute": "192.0.2.1"}}, 0, ["unexpected MISP JSON shape"]),
        ({"Event": None}, 0, ["unexpected MISP JSON shape"]),
        ({"Event": "a string"}, 0, ["unexpected MISP JSON shape"]),
        ([1, "x", None], 0, ["unexpected MISP JSON shape"] * 3),
        ("just a string", 0, ["unexpected MISP JSON shape"]),
        (42, 0, ["unexpected MISP JSON shape"]),
        ({"response": {"Event": 7}}, 0, ["unexpected MISP JSON shape"]),
        ({"Event": {"Object": [{"Attribute": 5}, "x"]}}, 0, ["unexpected MISP JSON shape"] * 2),
        ({"Event": {"Object": {"Attribute": []}}}, 0, ["unexpected MISP JSON shape"]),
        (
            {
                "Event": {
                    "info": {"nested": "object"},
                    "Attribute": [
                        {"type": "ip-dst", "value": {"ip": "192.0.2.1"}},
                        {"type": ["ip-dst"], "value": "192.0.2.2"},
                        {"type": "ip-dst", "value": "192.0.2.3", "comment": ["a", "list"]},
                        {"type": "ip-dst", "value": "192.0.2.4", "comment": "ok", "category": True},
                        {"type": "ip-dst", "value": 3221225989},  # a number is not an address text
                        {"type": "ip-dst", "value": "192.0.2.6", "comment": "fine", "first_seen": {"x": 1}},
                        {"type": "ip-dst", "value": "192.0.2.7", "comment": "old", "timestamp": "1"},
                    ],
                }
            },
            2,
            [
                "wrong JSON type: value is dict, not text",
                "wrong JSON type: type is list, not text",
                "wrong JSON type: comment is list, not text",
                "wrong JSON type: category is bool, not text",
                "ip-dst value is not an address or CIDR",
            ],
        ),
    ],
)
def test_misp_json_of_unexpected_shapes_gives_counted_rejects_never_a_crash(doc, rows, reasons):
    table, rejects, _ = parse_intel(json.dumps(doc), "misp-json", "odd.json")
    assert table.num_rows == rows
    assert rejects.column("reason").to_pylist() == reasons
    if rows:
        assert table.column("indicator").to_pylist() == ["192.0.2.6", "192.0.2.7"]
        assert table.column("first_seen").to_pylist() == [None, None]  # an object; 1970: out of range


def test_cli_misp_json_with_wrong_shapes_is_partial_not_an_internal_error(tmp_path):
    doc = {
        "Event": {
            "id": "9",
            "Attribute": [{"type": "ip-dst", "value": "192.0.2.1"}, {"type": "ip-dst", "value": {"x": 1}}],
            "Object": [{"Attribute": "oops"}],
        }
    }
    path = tmp_path / "event.json"
    path.write_text(json.dumps(doc))
    proc = run_tracepipe("intel", "import", str(path), "--lake", str(tmp_path / "lake"), "--output", "json")
    assert proc.returncode == 3, proc.stderr
    assert "internal error" not in proc.stderr
    assert (json.loads(proc.stdout)["rows"], json.loads(proc.stdout)["rejects"]) == (1, 2)


@pytest.mark.parametrize(
    "change",
    [
        {"id": 7},
        {"description": {"x": 1}},
        {"name": ["a", "b"]},
        {"indicator_types": 5},
        {"labels": [1, "c2"]},
        {"valid_from": 1710000000},
        {"valid_from": {"t": 1}},
        {"pattern": ["[ipv4-addr:value = '198.51.100.7']"]},
    ],
)
def test_a_stix_indicator_of_the_wrong_shape_is_a_reject_or_lands_never_an_internal_error(change):
    # hostile review: a number, list or object where STIX has a string made `intel import` an internal error and
    # nothing of the feed landed
    good = {"type": "indicator", "id": "indicator--1", "pattern": "[ipv4-addr:value = '192.0.2.1']",
            "valid_from": "2024-03-12T00:00:00Z", "pattern_type": "stix"}  # fmt: skip
    bundle = {"type": "bundle", "objects": [good, {**good, "id": "indicator--2", **change}]}
    rows, rejects, _ = parse_stix(json.dumps(bundle))
    assert "192.0.2.1" in [r["indicator"] for r in rows]  # the good indicator lands
    assert all(isinstance(r.get("description"), str | None) for r in rows)
    deep = '{"type": "bundle", "objects": ' + "[" * 100_000 + "]" * 100_000 + "}"
    rows, rejects, _ = parse_stix(deep)
    assert rows == [] and rejects  # nested too deep: a reject, not a RecursionError


# ---- hostile review of session 25: intel import and matching ----------------------------------------------------
MISP_HEADER = "uuid,event_id,category,type,value,comment,to_ids,date\n"


def test_a_misp_csv_cell_over_the_csv_field_limit_is_one_reject_and_the_rest_lands(tmp_path):
    # before: one 200 kB comment (under limits.line_bytes) ended the import "internal error: field larger than
    # field limit", exit 4, nothing landed
    path = tmp_path / "big.csv"
    path.write_text(
        MISP_HEADER
        + "u0,1,Network activity,ip-dst,198.51.100.1,first,1,20250615\n"
        + f'u1,1,Network activity,ip-dst,192.0.2.99,"{"A" * 200_000}",1,20250615\n'
        + "u2,1,Network activity,ip-dst,203.0.113.2,after,1,20250615\n"
    )
    lake = Lake(tmp_path / "lake")
    result = import_intel(lake, path)
    assert (result.rows, result.rejects, result.exit_code) == (2, 1, 3)
    assert sorted(lake.read("intel").column("indicator").to_pylist()) == ["198.51.100.1", "203.0.113.2"]
    assert [(r["line"], r["reason"]) for r in lake.read("rejects").to_pylist()] == [(3, "not a CSV line")]


def test_a_stray_quote_in_a_misp_csv_row_is_a_reject_and_does_not_swallow_the_next_rows():
    # before: the unterminated quote of line 3 made lines 3-4 one row (203.0.113.2 gone, 0 rejects)
    text = (
        MISP_HEADER
        + 'u0,1842,Network activity,ip-dst,198.51.100.1,"harmless first entry",1,20250615\n'
        + 'u1,9999,Network activity,ip-dst,192.0.2.99,"community note with a stray quote\n'
        + 'u2,1842,Network activity,ip-dst,203.0.113.2,"real indicator 2",1,20250615\n'
        + "u3,1842,Network activity,ip-dst\n"  # cut short: no value
        + 'u4,1842,Network activity,ip-dst,203.0.113.4,"a comment ""quoted"", and a comma",1,20250615\n'
    )
    table, rejects, _ = parse_intel(text, "misp-csv", "quote.csv")
    assert table.column("indicator").to_pylist() == ["198.51.100.1", "203.0.113.2", "203.0.113.4"]
    assert table.column("description").to_pylist()[2] == 'a comment "quoted", and a comma'
    assert [(r["line"], r["reason"]) for r in rejects.to_pylist()] == [
        (3, "quoted cell not closed on its line"),
        (5, "missing cells (type, value)"),
    ]


def test_a_misp_csv_comment_of_several_lines_is_one_row_and_a_stray_quote_still_one_reject():
    """Closed in session 34 (a README limit since the session-25 review): MISP quotes every cell of its CSV
    export, and an analyst's comment of several lines was a reject per line, its indicator lost. Now a quoted
    cell runs over line ends, the row numbered by its first line; a stray quote meets the next row's quoted
    cells at once and stays that line's reject; a cell still open after limits.SPANNED_LINES lines is one too,
    and the lines it held are read again as rows."""
    from tracepipe.limits import SPANNED_LINES

    def row(uuid: str, value: str, comment: str) -> str:
        return f'"{uuid}","1842","Network activity","ip-dst","{value}","{comment}","1","20250615"\n'

    text = (
        MISP_HEADER
        + row("u0", "198.51.100.1", "C2 of the campaign\nseen from 3 sites\n\ncontact: csirt@example.org")
        + row("u1", "192.0.2.99", "a stray quote")[:-2]  # (its last cell left open)
        + "\n"
        + row("u2", "203.0.113.2", 'a ""quoted"" word, and a comma')
        + '"u3","1842","Network activity","ip-dst","203.0.113.3","never closed\n'
        + "".join(f"line {i}\n" for i in range(SPANNED_LINES))
        + row("u4", "203.0.113.4", "after it")
    )
    table, rejects, _ = parse_intel(text, "misp-csv", "comments.csv")
    assert table.column("indicator").to_pylist() == ["198.51.100.1", "203.0.113.2", "203.0.113.4"]
    assert (
        table.column("description").to_pylist()[0]
        == "C2 of the campaign\nseen from 3 sites\n\ncontact: csirt@example.org"
    )
    assert table.column("description").to_pylist()[1] == 'a "quoted" word, and a comma'
    got = [(r["line"], r["reason"]) for r in rejects.to_pylist()]
    assert got[:2] == [(6, "quoted cell not closed on its line"), (8, "quoted cell not closed on its line")]
    assert {reason for _, reason in got[2:]} == {"missing cells (type, value)"}  # the 50 lines, read as rows
    assert len(got) == 2 + SPANNED_LINES


def test_auto_format_tells_stix_from_misp_json_by_the_parsed_top_level(tmp_path):
    # before: '"type": "bundle"' anywhere in the first 2,000 characters made a MISP feed STIX (0 indicators)
    misp = {"Event": {"id": "90", "info": "community event", "Attribute": [
        {"type": "bundle", "value": "x", "comment": "odd attribute of an unknown type"},
        {"type": "ip-dst", "value": "203.0.113.208", "comment": "real C2"}]}}  # fmt: skip
    text = json.dumps(misp)
    assert sniff_format(text, Path("feed.json")) == "misp-json"
    assert sniff_format(json.dumps([misp]), Path("feed.json")) == "misp-json"
    assert sniff_format(json.dumps({"response": [misp]}), Path("feed.json")) == "misp-json"
    bundle = {"objects": [], "id": "bundle--1", "type": "bundle"}  # "type" after other keys
    assert sniff_format(json.dumps(bundle), Path("b.json")) == "stix"
    assert sniff_format(json.dumps({"type": "bundle", "objects": "x"}), Path("b.json")) == "misp-json"
    path = tmp_path / "sniff.json"
    path.write_text(text)
    result = import_intel(Lake(tmp_path / "lake"), path)
    assert (result.format, result.rows, result.rejects) == ("misp-json", 1, 0)


@pytest.mark.parametrize(
    ("given", "indicator", "kind", "net_hi"),
    [
        ("::ffff:203.0.113.208", "203.0.113.208", "ip", "203.0.113.208"),
        ("::FFFF:cb00:71d0", "203.0.113.208", "ip", "203.0.113.208"),
        ("::ffff:203.0.113.0/120", "203.0.113.0/24", "cidr", "203.0.113.255"),
        ("::ffff:203.0.113.208/128", "203.0.113.208", "ip", "203.0.113.208"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8", "cidr", "10.255.255.255"),
        ("2001:db8::13%eth0", "2001:db8::13", "ip", "2001:db8::13"),
        ("2001:db8:bad::%eth0/48", "2001:db8:bad::/48", "cidr", "2001:db8:bad:ffff:ffff:ffff:ffff:ffff"),
    ],
)
def test_ipv4_mapped_and_zoned_indicators_are_stored_as_flows_carry_them(given, indicator, kind, net_hi):
    # before: ::ffff:203.0.113.208 and ::ffff:203.0.113.0/120 were stored as IPv6 and never matched a flow
    table, rejects, _ = parse_intel(given + "\n", "list", "m.txt")
    assert rejects.num_rows == 0
    row = table.to_pylist()[0]
    assert (row["indicator"], row["kind"], row["net_hi"]) == (indicator, kind, net_hi)
    matched = match_addresses(["203.0.113.208", "2001:db8::13", "2001:db8:bad::1", "10.9.9.9"], table)
    assert set(matched.get_column("indicator")) == {indicator}


def test_an_ipv4_mapped_network_is_held_to_the_ipv4_width_limit():
    table, rejects, _ = parse_intel("::ffff:0.0.0.0/97\n::ffff:10.0.0.0/103\n", "list", "m.txt")
    assert table.num_rows == 0
    assert rejects.column("reason").to_pylist() == ["CIDR too wide (shorter than /8 for IPv4)"] * 2


@pytest.mark.parametrize("include", [False, True])
def test_misp_attributes_marked_not_for_detection_or_deleted_are_skipped_and_counted(tmp_path, include):
    # before: to_ids 0 (context only) and deleted attributes became indicators and alerted
    csv_text = (
        MISP_HEADER
        + 'u1,77,Network activity,ip-dst,203.0.113.208,"partner SSH server - context only",0,20250615\n'
        + "u2,77,Network activity,ip-dst,203.0.113.9,C2,1,20250615\n"
        + "u3,77,Network activity,domain,partner.example,context,False,20250615\n"
        + "u4,77,Network activity,ip-dst,203.0.113.10,no flag,,20250615\n"
    )
    event = {"Event": {"id": "78", "info": "test", "Attribute": [
        {"type": "ip-dst", "value": "203.0.113.208", "to_ids": False, "deleted": True},
        {"type": "ip-dst", "value": "203.0.113.209", "to_ids": True, "deleted": "1"},
        {"type": "ip-dst", "value": "203.0.113.210", "to_ids": "0"},
        {"type": "ip-dst", "value": "203.0.113.211", "to_ids": True, "deleted": False}]}}  # fmt: skip
    (tmp_path / "toids.csv").write_text(csv_text)
    (tmp_path / "deleted.json").write_text(json.dumps(event))
    lake = tmp_path / "lake"
    extra = ["--include-non-ids"] if include else []
    runs = {
        name: run_tracepipe(
            "intel", "import", str(tmp_path / name), "--lake", str(lake), "-o", "json", *extra
        )
        for name in ("toids.csv", "deleted.json")
    }
    counts = {n: json.loads(r.stdout) for n, r in runs.items()}
    counts = {
        n: (c["rows"], c["skipped_not_ids"], c["skipped_deleted"], c["exit_code"]) for n, c in counts.items()
    }
    if include:
        assert counts == {"toids.csv": (4, 0, 0, 0), "deleted.json": (4, 0, 0, 0)}
        return
    assert counts == {"toids.csv": (2, 2, 0, 0), "deleted.json": (1, 1, 2, 0)}
    assert sorted(Lake(lake).read("intel").column("indicator").to_pylist()) == [
        "203.0.113.10",
        "203.0.113.211",
        "203.0.113.9",
    ]
    (tmp_path / "again.csv").write_text(csv_text + "\n")
    text = run_tracepipe("intel", "import", str(tmp_path / "again.csv"), "--lake", str(lake)).stdout
    assert ", 2 marked to_ids false and 0 deleted or revoked skipped (--include-non-ids keeps them)" in text
    revoked = {"type": "bundle", "objects": [{"type": "indicator", "id": "indicator--1", "revoked": True,
               "pattern": "[ipv4-addr:value = '192.0.2.1']", "valid_from": "2024-03-12T00:00:00Z"}]}  # fmt: skip
    rows, _, skipped = parse_stix(json.dumps(revoked))
    assert rows == [] and skipped.deleted == 1


def test_a_feed_covering_more_than_a_slash_8_together_is_refused_whole(tmp_path):
    # before: 223 /8s (each within the /8 limit) landed: every peer matched, 2,509 alerts in the demo window
    lake = tmp_path / "lake"
    all8 = tmp_path / "all8.txt"
    all8.write_text("".join(f"{first}.0.0.0/8\n" for first in range(11, 224) if first != 127))
    run = run_tracepipe("intel", "import", str(all8), "--lake", str(lake))
    assert run.returncode == 4 and "more than the 16,777,216 (an IPv4 /8)" in run.stderr
    assert not Lake(lake).read("intel").num_rows
    # nested and repeated networks count once: a /8 with networks and addresses inside it fits
    nested = tmp_path / "nested.txt"
    nested.write_text("11.0.0.0/8\n11.1.0.0/16\n11.0.0.0/8\n11.2.3.4\n2a00::/16\n2a00:1::/48\n")
    run = run_tracepipe("intel", "import", str(nested), "--lake", str(lake), "-o", "json")
    assert run.returncode == 0 and json.loads(run.stdout)["rows"] == 6
    two = tmp_path / "two.txt"
    two.write_text("2a00::/16\n2a01::/16\n")
    run = run_tracepipe("intel", "import", str(two), "--lake", str(lake))
    assert run.returncode == 4 and "IPv6 addresses together" in run.stderr


def test_indicators_overlapping_the_local_networks_are_rejects_unless_allowed(tmp_path):
    # before: the site's own 10.0.0.0/8 in a feed made every VM-to-VM flow an intel alert (256 in the demo)
    path = tmp_path / "own.txt"
    path.write_text("10.0.0.0/9\n192.0.2.7\n10.20.1.19\n172.16.0.0/16\nfd00::/48\n2a00:db8::/32\n")
    lake = tmp_path / "lake"
    run = run_tracepipe("intel", "import", str(path), "--lake", str(lake), "-o", "json")
    assert run.returncode == 3 and json.loads(run.stdout)["rows"] == 2
    assert sorted(Lake(lake).read("intel").column("indicator").to_pylist()) == ["192.0.2.7", "2a00:db8::/32"]
    rejects = sorted((r["line"], r["reason"]) for r in Lake(lake).read("rejects").to_pylist())
    assert rejects == [
        (1, "overlaps the local network 10.0.0.0/8 (--allow-local imports it)"),
        (3, "overlaps the local network 10.0.0.0/8 (--allow-local imports it)"),
        (4, "overlaps the local network 172.16.0.0/12 (--allow-local imports it)"),
        (5, "overlaps the local network fc00::/7 (--allow-local imports it)"),
    ]
    pipeline = tmp_path / "site.toml"
    pipeline.write_text('[pipeline]\nlocal_networks = ["10.20.0.0/16"]\n')
    _, rejects, _ = parse_intel(path.read_text(), "list", "own.txt", local_networks=["10.20.0.0/16"])
    assert rejects.column("line").to_pylist() == [1, 3]
    other = tmp_path / "lake2"
    run = run_tracepipe("intel", "import", str(path), "--lake", str(other), "--pipeline", str(pipeline))
    assert run.returncode == 3, run.stderr
    run = run_tracepipe(
        "intel", "import", str(path), "--lake", str(other / "x"), "--allow-local", "-o", "json"
    )
    assert run.returncode == 0 and json.loads(run.stdout)["rows"] == 6


def test_a_feed_imported_again_replaces_its_previous_rows_in_one_commit(tmp_path):
    # before: 3 imports of a 1,000-line feed (one comment line changed) made 3,004 rows; withdrawn indicators stayed
    lake = Lake(tmp_path / "lake")
    feed, other = tmp_path / "feed.txt", tmp_path / "other.txt"
    other.write_text("198.51.100.1\n")
    import_intel(lake, other)
    for day, withdrawn in ((1, False), (2, False), (3, True)):
        lines = (
            [f"# day {day}"]
            + [f"2a00:{n:x}::/48" for n in range(1000)]
            + ([] if withdrawn else ["192.0.2.9"])
        )
        feed.write_text("\n".join(lines) + "\n")
        version = lake.version("intel")
        result = import_intel(lake, feed)
        assert result.rows == 1000 + (not withdrawn) and lake.version("intel") == version + 1
    table = lake.read("intel")
    assert table.num_rows == 1001 and "192.0.2.9" not in table.column("indicator").to_pylist()
    assert sorted(set(table.column("source").to_pylist())) == sorted([str(feed), str(other)])
    # a new version wholly rejected keeps the feed's rows
    feed.write_text("not-an-address\n")
    assert import_intel(lake, feed).exit_code == 4
    assert lake.read("intel").num_rows == 1001


def test_a_feed_back_to_an_earlier_version_lands_that_version_again(tmp_path):
    # a review: v1, v2, then v1's bytes again was "already imported" (by content hash) and the lake kept v2's
    # rows: 198.51.100.9 never alerted again. Unchanged bytes are still skipped
    lake = Lake(tmp_path / "lake")
    feed = tmp_path / "feed.txt"
    versions = ["203.0.113.7\n198.51.100.9\n", "203.0.113.7\n", "203.0.113.7\n198.51.100.9\n"]
    for text in versions:
        feed.write_text(text)
        assert not import_intel(lake, feed).already_imported
        assert sorted(lake.read("intel").column("indicator").to_pylist()) == sorted(text.split())
    assert import_intel(lake, feed).already_imported  # the same bytes as the rows held: nothing to do
    # another path with the same bytes lands too (its own source)
    copy = tmp_path / "copy.txt"
    copy.write_text(versions[0])
    assert not import_intel(lake, copy).already_imported
    assert lake.read("intel").num_rows == 4


def test_read_intel_keeps_each_sources_latest_import(tmp_path):
    # lakes written before imports replaced a feed hold every import of it: detection reads the latest
    old, _, _ = parse_intel("192.0.2.1\n192.0.2.2\n", "list", "feed", dt.datetime(2025, 6, 1, tzinfo=dt.UTC))
    new, _, _ = parse_intel("192.0.2.2\n", "list", "feed", dt.datetime(2025, 6, 2, tzinfo=dt.UTC))
    lone, _, _ = parse_intel("192.0.2.3\n", "list", "other", dt.datetime(2025, 5, 1, tzinfo=dt.UTC))
    lake = Lake(tmp_path / "lake")
    for table in (old, new, lone):
        lake.append("intel", table)
    assert lake.read("intel").num_rows == 4
    assert sorted(read_intel(lake).column("indicator").to_pylist()) == ["192.0.2.2", "192.0.2.3"]


def test_ipv6_cidr_matching_answers_as_ipaddress_does_on_nested_and_overlapping_networks():
    # before: peers x CIDRs in Python (10k peers x 4k /48s: 13.9 s), answering the first network listed (IPv4:
    # the widest); now a join per prefix length, the widest
    rng = random.Random(25)
    bases = [rng.getrandbits(128) & ~((1 << 96) - 1) | (0x2A << 120) for _ in range(6)]
    nets = set()
    for _ in range(300):  # networks nested in and overlapping each other below a few common /32s
        prefix = rng.choice([16, 24, 32, 33, 40, 47, 48, 56, 63, 64, 65, 96, 112, 127])
        address = rng.choice(bases) | rng.getrandbits(96)
        nets.add(ipaddress.IPv6Network((address, prefix), strict=False))
    nets = sorted(nets, key=lambda n: (n.prefixlen, n))[:250]
    nets = [n for n in nets if n.prefixlen >= 24] + [ipaddress.IPv6Network("2a00::/16")]
    rng.shuffle(nets)  # the widest covering network is the answer (as for IPv4), not the first listed
    text = "".join(f"{n}\n" for n in nets) + "".join(f"{n}\n" for n in nets[:20])  # repeated ones too
    intel, rejects, _ = parse_intel(text, "list", "feed")
    assert rejects.num_rows == 0
    peers = {str(ipaddress.IPv6Address(rng.choice(bases) | rng.getrandbits(rng.choice([8, 40, 70, 96]))))
             for _ in range(3000)}  # fmt: skip
    peers |= {str(n.network_address) for n in nets} | {str(n.broadcast_address) for n in nets}
    peers |= {str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(500)} | {"192.0.2.1", "x"}
    peers = sorted(peers)
    matched = match_addresses(peers, intel)
    got = dict(zip(matched.get_column("addr"), matched.get_column("indicator"), strict=True))
    single = {str(n.network_address) for n in nets if n.num_addresses == 1}
    for addr in peers:
        try:
            address = ipaddress.ip_address(addr)
        except ValueError:
            assert addr not in got
            continue
        covering = [n for n in nets if n.version == address.version and address in n]
        if not covering:
            assert addr not in got
        elif addr in single:
            assert addr in got  # an exact indicator, or a network around it
        else:
            widest = min(n.prefixlen for n in covering if n.num_addresses > 1)
            assert ipaddress.ip_network(got[addr]).prefixlen == widest, addr
    assert len(got) > 1000


def _contacts(rows: list[dict], start: dt.datetime, at: int = 0, **values) -> pa.Table:
    """Flow rows (src_addr, dst_addr, dst_port each) one second apart from start + `at` seconds."""
    from tracepipe.schema import FLOWS

    base = {"proto": 6, "packets": 2, "bytes": 120, "tcp_flags": 2, "ip_version": 4, "source": "t"} | values
    return pa.Table.from_pylist(
        [
            {
                **base,
                **r,
                "ts_start": start + dt.timedelta(seconds=at + i),
                "ts_end": start + dt.timedelta(seconds=at + i + 1),
                "src_port": 40000 + at + i,
            }
            for i, r in enumerate(rows)
        ],
        schema=FLOWS,
    )


@pytest.mark.parametrize("buckets", [None, 3])
def test_a_host_sweeping_a_listed_network_is_one_alert_per_window(tmp_path, buckets):
    """Hostile review (session 25 known limit): a host that touched 600 addresses of a listed /22 was 600 intel
    alerts in one window (65,536 for a /16, each with a reason written in Python). Now one alert per host,
    indicator and window, naming the lowest address and counting the others; a host that met one listed
    address is still one alert naming it."""
    import dataclasses

    start = dt.datetime(2025, 6, 17, 8, tzinfo=dt.UTC)
    rows = [
        {"src_addr": "10.20.1.5", "dst_addr": f"203.0.{112 + i // 256}.{i % 256}", "dst_port": 445}
        for i in range(600)
    ] + [{"src_addr": f"10.20.1.{9 + i}", "dst_addr": "198.51.100.7", "dst_port": 443} for i in range(2)]
    flows = _contacts(rows, start)
    lake = Lake(tmp_path / "lake")
    lake.append("flows", flows, key="t")
    (tmp_path / "feed.txt").write_text("203.0.112.0/22  # bulletproof hosting\n198.51.100.7  # c2\n")
    assert import_intel(lake, tmp_path / "feed.txt").rows == 2
    config = load_pipeline(REPO / "pipelines" / "retro-hunt.toml")
    config = dataclasses.replace(
        config, output=dataclasses.replace(config.output, report_dir=str(tmp_path / "r"), html=False)
    )
    result = run_sweep(lake, config, start, start + dt.timedelta(hours=1), buckets=buckets)
    alerts = sorted(
        (a for a in result.new_alerts.to_pylist() if a["detector"] == "intel"), key=lambda a: a["addr"]
    )
    assert [(a["addr"], a["peer"]) for a in alerts] == [
        ("10.20.1.10", "198.51.100.7"),
        ("10.20.1.5", "203.0.112.0"),
        ("10.20.1.9", "198.51.100.7"),
    ]
    swept = json.loads(alerts[1]["features"])
    assert (swept["flows"], swept["peers"], swept["indicator"]) == (600, 600, "203.0.112.0/22")
    assert swept["some_peers"] == [
        "203.0.112.0",
        "203.0.112.1",
        "203.0.112.10",
        "203.0.112.100",
        "203.0.112.101",
    ]
    assert "and 599 more addresses" in alerts[1]["reason"]
    assert json.loads(alerts[0]["features"])["peers"] == 1 and "more addresses" not in alerts[0]["reason"]


def test_an_allowlisted_lower_address_hides_nothing_and_a_later_lower_one_is_the_same_alert(tmp_path):
    """Review of the session-26 grouping: the group's alert was named after its lowest address, so one contact
    with an allowlisted mirror inside a listed /22 made the allowlist drop the whole group (10 C2 contacts -> 0
    alerts), and a later flow to a lower address of the network gave the group another alert id (a second
    alert for the same host, indicator and window on the next sweep). Allowlisted peers are grouped apart, and
    an intel alert's id is made of its indicator."""
    import dataclasses

    start = dt.datetime(2025, 6, 17, 8, tzinfo=dt.UTC)

    def flows(peers: list[str], at: int) -> pa.Table:
        rows = [{"src_addr": "10.20.1.5", "dst_addr": peer, "dst_port": 443} for peer in peers]
        return _contacts(rows, start, at, packets=20, bytes=12000, tcp_flags=27)

    lake = Lake(tmp_path / "lake")
    lake.append("flows", flows(["203.0.112.1"] + [f"203.0.112.{200 + i}" for i in range(10)], 0), key="a")
    (tmp_path / "feed.txt").write_text("203.0.112.0/22  # bulletproof hosting\n")
    import_intel(lake, tmp_path / "feed.txt")
    config = load_pipeline(REPO / "pipelines" / "retro-hunt.toml")
    config = dataclasses.replace(
        config,
        output=dataclasses.replace(config.output, report_dir=str(tmp_path / "r"), html=False),
        allowlist=dataclasses.replace(config.allowlist, addresses=["203.0.112.1"]),
    )
    until = start + dt.timedelta(hours=1)
    first = [
        a for a in run_sweep(lake, config, start, until).new_alerts.to_pylist() if a["detector"] == "intel"
    ]
    assert [(a["addr"], a["peer"]) for a in first] == [("10.20.1.5", "203.0.112.200")]
    lake.append("flows", flows(["203.0.112.100"], 100), key="b")  # a late flow to a lower listed address
    again = run_sweep(lake, config, start, until)
    assert [a for a in again.new_alerts.to_pylist() if a["detector"] == "intel"] == []
