"""The Security Service Challenge drill (issue #15): `tracepipe trace` on the demo story (through the CLI, as a
new user runs it) and on a generated cloud of 5,000 VMs with address reuse, every answer checked against what
the generator / ground truth knows; the incident package (escaping, privacy, rendering in headless Chromium,
refusals); MISP and STIX exports loaded by the real pymisp, stix2 and stix2-validator, and read back by
`intel import` (round trip)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import ssc

from tests.conftest import run_in_process, run_tracepipe
from tests.test_report import _chromium
from tracepipe.lake import Lake, hash_bytes, ingest_table
from tracepipe.respond.observations import read_observations
from tracepipe.respond.trace import trace
from tracepipe.schema import FLOWS, VM_LEASES, VMS

JUPYTER07 = "09575d72-77d4-46c0-b6e8-1a0e584d7306"
EVIL = "<script>alert(1)</script>\x1b[31mred"


def iso(text: str) -> str:
    """`--format json` prints times as Python does (2025-06-17 10:20:03+00:00); the package as ISO 8601."""
    return text.replace(" ", "T")


# ---- the demo story, through the CLI ---------------------------------------------------------------------------


STORY_OBSERVATIONS = [
    # address, port, peer, time, expected holder (vm name) or None
    ("10.20.1.31", "445", "", "2025-06-17T08:05:00Z", "jupyter-07"),  # deleted since
    ("10.20.1.31", "", "", "2025-06-17T11:00:00Z", "jupyter-31"),  # the same address, reused later
    ("10.20.1.31", "", "", "2025-06-17T04:00:00Z", None),  # before anybody held it
    ("10.20.1.26", "", "", "2025-06-17T08:45:00Z", "dataproc-04"),  # soft-deleted (quarantined)
    ("2001:db8:20:1::a", "", "", "2025-06-17T08:00:00Z", "web-01"),  # IPv6
    ("198.51.100.20", "", "", "2025-06-17T08:00:00Z", "web-01"),  # floating IP
    ("10.20.1.19", "443", "192.0.2.77", "2025-06-17T07:00:00Z", "web-05"),  # the beacon to its C&C
    ("192.0.2.77", "443", "", "2025-06-17T07:00:00Z", None),  # the C&C itself: outside, contacted by web-05
]


@pytest.fixture(scope="module")
def story_trace(story_lake: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    work = tmp_path_factory.mktemp("ssc")
    ticket = work / "ticket.csv"
    with ticket.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["address", "port", "peer", "time"])
        writer.writerows(row[:4] for row in STORY_OBSERVATIONS)
    run = run_tracepipe(
        "trace", str(ticket), "--out", str(work / "pkg"), "--format", "json", "--lake", str(story_lake)
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout), work / "pkg", str(story_lake)


def test_story_every_answer_right(story_trace: tuple[dict, Path, str]) -> None:
    result = story_trace[0]
    answers = result["observations"]
    assert [a["obs"] for a in answers] == list(range(1, len(STORY_OBSERVATIONS) + 1))
    for answer, (*_, expected) in zip(answers, STORY_OBSERVATIONS, strict=True):
        assert [h["vm_name"] for h in answer["holders"]] == ([expected] if expected else []), answer
    scan, reused, before, soft, v6, floating, beacon, cc = answers
    assert scan["holders"][0]["vm_id"] == JUPYTER07 and scan["holders"][0]["vm_status"] == "deleted"
    assert scan["holders"][0]["user"] == "apatel" and scan["holders"][0]["project"] == "climate-ml"
    assert iso(scan["holders"][0]["valid_to"]).startswith("2025-06-17T10:20:03")
    assert scan["matching_flows"] > 1400 and scan["ports"] == [445]
    assert iso(reused["holders"][0]["valid_from"]).startswith("2025-06-17T10:40:40")
    assert before["in_cloud"] and any(n.startswith("no holder") for n in before["ambiguities"])
    assert "the next began 2025-06-17 05:03:40 UTC" in before["ambiguities"][0]
    assert soft["holders"][0]["vm_status"] == "soft_deleted"
    assert iso(soft["holders"][0]["quarantine_until"]).startswith("2025-06-18T09:45")
    assert v6["holders"][0]["hypervisor"] == "compute-1" and v6["matching_flows"] > 0
    assert any(n.startswith("floating IP") for n in floating["ambiguities"])
    assert beacon["peers"] == ["192.0.2.77"] and beacon["matching_flows"] > 50
    assert not cc["in_cloud"] and cc["contacts"] == ["eb6603f7-b272-4de1-9fe6-ac2f88a68182"]
    assert result["exit_code"] == 0


def test_story_vm_facts_and_containment(story_trace: tuple[dict, Path, str]) -> None:
    vms = {vm["vm_name"]: vm for vm in story_trace[0]["vms"]}
    assert set(vms) == {"jupyter-07", "jupyter-31", "dataproc-04", "web-01", "web-05"}
    jupyter = vms["jupyter-07"]
    assert jupyter["traffic"]["peers"] > 1400 and jupyter["connections"][0]["flows"] >= 1
    assert {c["port"] for c in jupyter["connections"]} >= {445}
    # the owner's other VMs alive then or now: what to contain (apatel owns the dataproc-1x VMs)
    assert jupyter["owner_vms"] and all(s["user"] == "apatel" for s in jupyter["owner_vms"])
    assert all(s["alive_then"] or s["alive_now"] for s in jupyter["owner_vms"])
    assert jupyter["spread"] == []  # not asked for
    assert vms["web-01"]["traffic"]["flows"] > 0


def test_story_package_files_and_privacy(story_trace: tuple[dict, Path, str]) -> None:
    result, pkg, lake = story_trace
    assert sorted(p.name for p in pkg.iterdir()) == [
        "evidence-flows.csv",
        "evidence-flows.parquet",
        "index.html",
        "trace.json",
    ]
    data = json.loads((pkg / "trace.json").read_text())
    assert data["observations"][0]["holders"][0]["vm_name"] == "jupyter-07"
    evidence = pq.read_table(pkg / "evidence-flows.parquet")
    assert evidence.num_rows == result["summary"]["evidence_flows"]
    assert set(evidence.column("lake_version").to_pylist()) == {result["lake_version"]}
    assert None not in evidence.column("source").to_pylist()
    found = {vm["vm_id"] for vm in result["vms"]}
    for side in ("src_vm", "dst_vm"):  # no other tenant is named without --include-spread
        assert set(evidence.column(side).drop_null().to_pylist()) <= found
    html = (pkg / "index.html").read_text()
    assert "jupyter-07" in html and "apatel" in html and "<script" not in html.lower()
    # with --include-spread other VMs that talked to the same outside peers are named
    ticket = pkg.parent / "ticket.csv"
    run = run_in_process("trace", str(ticket), "--include-spread", "--format", "json", "--lake", lake)
    spread = {vm["vm_name"]: vm["spread"] for vm in json.loads(run.stdout)["vms"]}
    assert run.returncode == 0 and any(spread.values())


def test_story_package_renders_in_headless_chromium(
    story_trace: tuple[dict, Path, str], tmp_path: Path
) -> None:
    pkg = story_trace[1]
    dom = _chromium(["--dump-dom", (pkg / "index.html").as_uri()], tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('id="obs-') == len(STORY_OBSERVATIONS)
    charted = sum(1 for vm in story_trace[0]["vms"] if vm["timeline"])  # jupyter-31 had no flows yet
    assert dom.stdout.count('class="card vm"') == 5 and dom.stdout.count("<svg") == charted == 4
    assert "Refused to" not in dom.stderr  # nothing blocked by the CSP: the page needs nothing from outside


# image_uuid of every instance in the story's notifications
NOVA_IMAGE = "155d900f-4e14-4e4c-a73d-069cbf4541e6"


def test_story_names_each_vms_image(story_trace: tuple[dict, Path, str], tmp_path: Path) -> None:
    """Issue 15: "owner, project, image, hypervisor, cloud" of the VM that held the address: Nova's image_uuid
    (also of the deleted and quarantined VMs), OpenNebula's DISK IMAGE_ID, in the JSON, the console, the
    package's JSON and HTML, and in `who`."""
    result, pkg, lake = story_trace
    holders = [h for answer in result["observations"] for h in answer["holders"]]
    assert len(holders) == 6 and {h["image"] for h in holders} == {NOVA_IMAGE}
    assert {vm["vm_name"]: vm["image"] for vm in result["vms"]} == dict.fromkeys(
        ("jupyter-07", "jupyter-31", "dataproc-04", "web-01", "web-05"), NOVA_IMAGE
    )
    assert json.loads((pkg / "trace.json").read_text())["vms"][0]["image"] == NOVA_IMAGE
    assert f"<code>{NOVA_IMAGE}</code>" in (pkg / "index.html").read_text()
    # the OpenNebula render node (42.xml: DISK IMAGE_ID 17, IMAGE alma9-render)
    ticket = tmp_path / "render.csv"
    ticket.write_text("address,time\n10.40.0.12,2025-06-17T09:00:00Z\n")
    run = run_in_process("trace", str(ticket), "--format", "json", "--lake", lake)
    assert run.returncode == 0, run.stderr[-2000:]
    (holder,) = json.loads(run.stdout)["observations"][0]["holders"]
    assert (holder["vm_name"], holder["cloud"], holder["image"]) == ("render-node-2", "opennebula", "17")
    table = run_in_process("trace", str(ticket), "--lake", lake)
    assert "project hpc-lab · image 17 · one-kvm-3 · opennebula" in table.stdout
    # who: the deleted jupyter-07 (table and JSON) and the render node
    who = run_in_process(
        "who", "10.20.1.31", "--at", "2025-06-17T08:05:00Z", "--format", "json", "--lake", lake
    )
    assert who.returncode == 0 and json.loads(who.stdout)["leases"][0]["image"] == NOVA_IMAGE
    who = run_in_process("who", "10.20.1.31", "--at", "2025-06-17T08:05:00Z", "--lake", lake)
    assert f"  image       {NOVA_IMAGE}" in who.stdout
    who = run_in_process(
        "who", "10.40.0.12", "--at", "2025-06-17T09:00:00Z", "--format", "json", "--lake", lake
    )
    assert json.loads(who.stdout)["leases"][0]["image"] == "17"
    timeline = run_in_process("timeline", "render-node-2", "--format", "json", "--lake", lake)
    answer = json.loads(timeline.stdout)
    assert answer["vm"]["image"] == "17" and {e["image"] for e in answer["events"]} == {"17"}
    assert "image 17" in run_in_process("timeline", "render-node-2", "--lake", lake).stdout


def test_out_refused_when_it_exists_or_is_in_the_lake(story_trace: tuple[dict, Path, str]) -> None:
    _, pkg, lake = story_trace
    ticket = pkg.parent / "ticket.csv"
    before = (pkg / "trace.json").stat().st_mtime_ns
    run = run_in_process("trace", str(ticket), "--out", str(pkg), "--lake", lake)
    assert run.returncode == 2 and "--force" in run.stderr
    assert (pkg / "trace.json").stat().st_mtime_ns == before
    run = run_in_process("trace", str(ticket), "--out", str(Path(lake) / "pkg"), "--lake", lake)
    assert run.returncode == 2 and "lake" in run.stderr and not (Path(lake) / "pkg").exists()
    run = run_in_process("trace", str(ticket), "--out", str(pkg), "--force", "--lake", lake)
    assert run.returncode == 0 and (pkg / "trace.json").stat().st_mtime_ns != before
    assert not list(pkg.parent.glob(".pkg.*"))  # no staging folder left behind


def test_bad_observation_lines_are_rejects(story_lake: Path, tmp_path: Path) -> None:
    ticket = tmp_path / "ticket.csv"
    ticket.write_text(
        "address,port,time\n10.20.1.26,,2025-06-17T08:45:00Z\nnot-an-ip,,2025-06-17T08:00Z\n"
        "10.20.1.26,99999,2025-06-17T08:00Z\n10.20.1.26,,\n"
    )
    run = run_in_process("trace", str(ticket), "--format", "json", "--lake", str(story_lake))
    result = json.loads(run.stdout)
    assert run.returncode == 3 and result["summary"]["observations"] == 1
    assert [(r["ref"], r["reason"]) for r in result["rejects"]] == [
        ("line 3", "address is not an IPv4/IPv6 address"),
        ("line 4", "port out of range 0-65535"),
        ("line 5", "no time: give time, or start and end (ISO 8601 or epoch seconds)"),
    ]


# ---- the generated cloud: 5,000 VMs, 100 observations ------------------------------------------------------


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> tuple[Lake, list[dict], Path]:
    cloud = ssc.make_cloud(n_vms=5000)
    observations = ssc.observations(cloud, 100)
    lake = Lake(tmp_path_factory.mktemp("drill") / "lake")
    ssc.land(lake, cloud, observations, per_day=2000)
    ticket = lake.root.parent / "ticket.json"
    ticket.write_text(
        json.dumps(
            {
                "observations": [
                    {"address": o["address"], "port": ssc.CC_PORT, "time": o["time"].isoformat()}
                    for o in observations
                ]
            }
        )
    )
    return lake, observations, ticket


def test_drill_every_answer_right(drill: tuple[Lake, list[dict], Path]) -> None:
    lake, observations, ticket = drill
    assert {o["kind"] for o in observations} == {
        "active",
        "deleted",
        "soft_deleted",
        "reused",
        "ipv6",
        "gap",
        "never",
    }
    started = time.perf_counter()
    result = trace(lake, read_observations(ticket))
    assert time.perf_counter() - started < 10
    assert result.exit_code == 0 and len(result.observations) == 100
    statuses = {vm["vm_id"]: vm["status"] for vm in result.vms}
    for truth, answer in zip(observations, result.observations, strict=True):
        holders = [h["vm_id"] for h in answer["holders"]]
        assert holders == ([truth["expect_vm"]] if truth["expect_vm"] else []), (truth, answer)
        assert answer["in_cloud"] == truth["in_cloud"]
        if truth["expect_vm"]:
            # exactly the two C&C flows of this VM (port 4444 filters the background out)
            assert answer["matching_flows"] == 2 and answer["peers"] == [ssc.CC], (truth, answer)
            holder = answer["holders"][0]
            if truth["kind"] in ("deleted", "soft_deleted", "active"):
                assert holder["vm_status"] == statuses[truth["expect_vm"]] == truth["kind"]
            if truth["kind"] == "soft_deleted":
                assert holder["quarantine_until"] is not None and holder["valid_to"] is None
            assert holder["image"] == f"img-{int(truth['expect_vm'].removeprefix('vm-')) % 7}"
        elif truth["in_cloud"]:
            assert answer["ambiguities"][0].startswith("no holder") and answer["matching_flows"] == 0
        else:
            assert answer["ambiguities"][0].startswith("outside the cloud") and answer["contacts"] == []
    reused = [a for t, a in zip(observations, result.observations, strict=True) if t["kind"] == "reused"]
    assert all(a["holders"][0]["valid_from"] > dt.datetime(2024, 3, 1, tzinfo=dt.UTC) for a in reused)


# ---- hostile input ---------------------------------------------------------------------------------------------


def test_hostile_vm_names_are_escaped(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    t0 = dt.datetime(2025, 1, 2, 3, 0, tzinfo=dt.UTC)
    lease = {
        "addr": "10.0.0.5",
        "vm_id": "vm-evil",
        "vm_name": EVIL,
        "project": "p&q",
        "user": "=cmd|' /C calc'!A0",
        "hypervisor": "h",
        "cloud": "c",
        "addr_kind": "fixed",
        "valid_from": t0,
        "vm_status": "active",
    }
    lake.replace_dataset("vm_leases", pa.Table.from_pylist([lease], schema=VM_LEASES))
    lake.replace_dataset(
        "vms",
        pa.Table.from_pylist(
            [
                {
                    "vm_id": "vm-evil",
                    "vm_name": EVIL,
                    "project": "p&q",
                    "user": lease["user"],
                    "status": "active",
                }
            ],
            schema=VMS,
        ),
    )
    flow = {
        "ts_start": t0 + dt.timedelta(minutes=5),
        "ts_end": t0 + dt.timedelta(minutes=6),
        "src_addr": "10.0.0.5",
        "dst_addr": "203.0.113.9",
        "proto": 6,
        "src_vm": "vm-evil",
        "source": "<b>planted</b>.pcap",
    }
    ingest_table(lake, "flows", "evil", hash_bytes(b"evil"), [pa.Table.from_pylist([flow], schema=FLOWS)])
    ticket = tmp_path / "t.csv"
    ticket.write_text("address,time\n10.0.0.5,2025-01-02T03:05:00Z\n")
    run = run_in_process("trace", str(ticket), "--out", str(tmp_path / "pkg"), "--lake", str(lake.root))
    assert run.returncode == 0, run.stderr
    assert (
        "\x1b" not in run.stdout and "\\x1b[31mred" in run.stdout
    )  # shown escaped, not sent to the terminal
    html = (tmp_path / "pkg" / "index.html").read_text()
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "p&amp;q" in html
    csv_text = (tmp_path / "pkg" / "evidence-flows.csv").read_text()
    assert "<b>planted</b>.pcap" in csv_text  # data kept as data
    data = json.loads((tmp_path / "pkg" / "trace.json").read_text())
    assert data["vms"][0]["vm_name"] == EVIL  # JSON keeps the raw value
    assert data["vms"][0]["user"].startswith("=cmd")


# ---- sharing: MISP and STIX, and back in -----------------------------------------------------------------------


def test_misp_export_loads_in_pymisp_and_round_trips(
    story_trace: tuple[dict, Path, str], tmp_path: Path
) -> None:
    from pymisp import MISPEvent

    _, pkg, lake = story_trace
    out = tmp_path / "event.json"
    run = run_in_process(
        "export", "misp", str(pkg), "--tlp", "green", "--distribution", "1", "--out", str(out), "--lake", lake
    )
    assert run.returncode == 0, run.stderr
    event = MISPEvent()
    event.load(json.loads(out.read_text()))
    assert [t.name for t in event.tags] == ["tlp:green"] and int(event.distribution) == 1
    values = {(a.type, a.value): a for a in event.attributes}
    # the C&C the beacon went to, with its port; the C&C observed directly; no local VM address
    assert ("ip-dst|port", "192.0.2.77|443") in values and ("ip-dst|port", "192.0.2.77|443") in values
    cc = values[("ip-dst|port", "192.0.2.77|443")]
    assert cc.to_ids is True and cc.first_seen.year == 2025 and len(cc.sightings) == 1
    # observations 7 and 8 match the same flows (the beacon, seen from each end): each counts once. They
    # were summed: comment "seen in 160 flows", sighting and STIX "(320 flows)"
    parquet = str(pkg / "evidence-flows.parquet")
    ((rows, flows),) = duckdb.sql(
        f"SELECT (SELECT count(*) FROM read_parquet('{parquet}') WHERE '192.0.2.77' IN (src_addr, dst_addr)), "
        f"(SELECT count(*) FROM (SELECT DISTINCT * EXCLUDE (obs, observed_is_src) FROM read_parquet('{parquet}') "
        "WHERE '192.0.2.77' IN (src_addr, dst_addr)))"
    ).fetchall()
    assert rows == 2 * flows > 0
    # last seen: when its last flow ended (before: that flow's start; a session of hours was cut to its start)
    ((ended, started),) = duckdb.sql(
        f"SELECT max(ts_end), max(ts_start) FROM read_parquet('{parquet}') WHERE '192.0.2.77' IN (src_addr, dst_addr)"
    ).fetchall()
    assert ended > started and cc.last_seen == ended
    assert (
        cc.comment.endswith(f"seen in {flows} flows")
        and cc.sightings[0].source == f"tracepipe ({flows} flows)"
    )
    assert not [v for t, v in values if t.startswith("ip-src")]
    assert not [v for _, v in values if v.startswith(("10.20.", "2001:db8:20:", "198.51.100.20"))]
    assert "scan" in run.stderr  # the 1,500 scan victims are said to be left out, not shared
    # asked for: the traced VMs' own addresses as ip-src, not for IDS
    run = run_in_process(
        "export", "misp", str(pkg), "--include-local", "--force", "--out", str(out), "--lake", lake
    )
    local = [a for a in json.loads(out.read_text())["Event"]["Attribute"] if a["type"] == "ip-src"]
    assert run.returncode == 0 and {a["value"] for a in local} >= {"10.20.1.31", "10.20.1.26"}
    assert all(a["to_ids"] is False for a in local)
    # round trip: the event imports back as intel, its local context (to_ids false) skipped unless asked for
    attributes = json.loads(out.read_text())["Event"]["Attribute"]
    run = run_in_process("intel", "import", str(out), "-o", "json", "--lake", str(tmp_path / "ids-only"))
    imported = json.loads(run.stdout)
    assert run.returncode == 0 and imported["format"] == "misp-json"
    assert imported["rows"] == sum(a["to_ids"] is not False for a in attributes)
    assert imported["skipped_not_ids"] == len(local)
    intel_lake = tmp_path / "intel-lake"
    run = run_in_process(
        "intel",
        "import",
        str(out),
        "-o",
        "json",
        "--lake",
        str(intel_lake),
        "--include-non-ids",
        "--allow-local",
    )
    imported = json.loads(run.stdout)
    assert run.returncode == 0 and imported["rows"] == len(attributes)
    # and a MISP event is also an observation list for trace
    observations = read_observations(out)
    assert observations.format == "misp" and observations.table.num_rows == imported["rows"]


def test_stix_bundle_is_valid_and_imports(story_trace: tuple[dict, Path, str], tmp_path: Path) -> None:
    import stix2
    import stix2validator

    _, pkg, lake = story_trace
    out = tmp_path / "bundle.json"
    run = run_in_process("export", "stix", str(pkg), "--tlp", "amber", "--out", str(out), "--lake", lake)
    assert run.returncode == 0, run.stderr
    bundle = stix2.parse(out.read_text(), allow_custom=False)
    kinds = [o.type for o in bundle.objects]
    assert kinds.count("indicator") == kinds.count("sighting") == kinds.count("observed-data") >= 1
    report = stix2validator.validate_file(str(out))
    assert report.is_valid, [str(e) for r in report.results for e in r.errors]
    patterns = [o.pattern for o in bundle.objects if o.type == "indicator"]
    assert any("192.0.2.77" in p and "dst_port = 443" in p for p in patterns)
    run = run_in_process("intel", "import", str(out), "--output", "json", "--lake", str(tmp_path / "intel"))
    imported = json.loads(run.stdout)
    assert run.returncode == 0 and imported["format"] == "stix" and imported["rows"] == len(patterns)
    con_rows = Lake(tmp_path / "intel").read("intel").column("indicator").to_pylist()
    assert "192.0.2.77" in con_rows


def test_a_vms_targets_and_private_addresses_are_never_shared_as_indicators(
    story_lake: Path, tmp_path: Path
) -> None:
    """A review: ci-runner-3's outbound SSH brute force (12 outside hosts on port 22) exported its victims as
    malicious `ip-dst|port` with to_ids, and the site's own 10.20.0.9 (private, never a VM) as an outside one."""
    from pymisp import MISPEvent

    ticket = tmp_path / "ticket.csv"
    ticket.write_text("address,port,peer,time\n10.20.1.23,22,,2025-06-17T07:30:00Z\n")
    run = run_tracepipe("trace", str(ticket), "--out", str(tmp_path / "pkg"), "--lake", str(story_lake))
    assert run.returncode == 0, run.stderr[-2000:]
    parquet = tmp_path / "pkg" / "evidence-flows.parquet"
    evidence = duckdb.sql(
        f"SELECT DISTINCT dst_addr FROM read_parquet('{parquet}') WHERE observed_is_src AND dst_port = 22"
    ).fetchall()
    outside = {a for (a,) in evidence if a.startswith("203.0.113.")}
    ends = duckdb.sql(
        f"SELECT list(DISTINCT src_addr) || list(DISTINCT dst_addr) FROM read_parquet('{parquet}')"
    )
    assert len(outside) > 5 and "10.20.0.9" in ends.fetchall()[0][0]  # (the site's bastion: it logs in)
    for include_local in (False, True):
        out = tmp_path / f"event-{include_local}.json"
        args = ["--include-local"] if include_local else []
        run = run_in_process(
            "export", "misp", str(tmp_path / "pkg"), "--out", str(out), *args, "--lake", str(story_lake)
        )
        assert run.returncode == 0, run.stderr
        assert (
            f"{len(outside)} outside hosts the traced VM connected to on port 22 (its targets" in run.stderr
        )
        event = MISPEvent()
        event.load(json.loads(out.read_text()))
        values = {a.value.split("|")[0]: a for a in event.attributes}
        assert not outside & set(values)
        # the bastion logs into the VM's port 22: a client of the VM's service, not an end on port 22 (since the
        # CSIRT review of session 39 such ends are not shared at all, and the command says so)
        assert "10.20.0.9" not in values
        assert "on the traced VM's side only" in run.stderr


def test_stix_amber_strict_is_tlp2_amber_strict_not_amber(
    story_trace: tuple[dict, Path, str], tmp_path: Path
) -> None:
    """Before: --tlp amber+strict marked every object with TLP 1.0 AMBER, which lets recipients share with their
    clients. Now the TLP 2.0 AMBER+STRICT marking definition, carried in the bundle, valid under --strict."""
    import stix2
    import stix2validator

    _, pkg, lake = story_trace
    out = tmp_path / "strict.json"
    run = run_in_process(
        "export", "stix", str(pkg), "--tlp", "amber+strict", "--out", str(out), "--lake", lake
    )
    assert run.returncode == 0, run.stderr
    strict = "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003"
    bundle = json.loads(out.read_text())
    (marking,) = [o for o in bundle["objects"] if o["type"] == "marking-definition"]
    assert marking["id"] == strict and marking["name"] == "TLP:AMBER+STRICT"
    marked = [o for o in bundle["objects"] if o["type"] != "marking-definition"]
    assert marked and all(
        o.get("object_marking_refs") == [strict] for o in marked if o["type"] != "ipv4-addr"
    )
    assert "f88d31f6-486f-44da-b317-01333bde0b82" not in out.read_text()
    report = stix2validator.validate_file(str(out), stix2validator.ValidationOptions(strict=True))
    assert report.is_valid, [str(e) for r in report.object_results for e in r.errors]
    stix2.parse(out.read_text(), allow_custom=False)


def test_push_refusals(story_trace: tuple[dict, Path, str]) -> None:
    _, pkg, lake = story_trace
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MISP_KEY"}

    out = pkg.parent / "refused.misp.json"

    def push(url: str, key: str | None) -> subprocess.CompletedProcess:
        extra = {"MISP_KEY": key} if key else {}
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "tracepipe.cli",
                "export",
                "misp",
                str(pkg),
                "--push",
                url,
                "--out",
                str(out),
                "--lake",
                lake,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **extra},
            stdin=subprocess.DEVNULL,
        )

    run = push("https://misp.example.org", None)
    assert run.returncode == 2 and "$MISP_KEY" in run.stderr
    run = push("http://misp.example.org", "secret")
    assert run.returncode == 2 and "in clear" in run.stderr and "secret" not in run.stderr
    run = push("ftp://127.0.0.1/", "secret")
    assert run.returncode == 2
    assert not out.exists()  # refused before anything is written (the file was written, then exit 2)


class _MispStandIn:
    """A MISP server on 127.0.0.1 that answers the calls PyMISP makes (version, the key's user, event add) and
    records what it received: the real PyMISP and requests stack speaks real HTTP to it."""

    def __init__(self, refuse: bool = False) -> None:
        import http.server
        import threading

        import pymisp

        self.requests: list[dict] = []
        stand_in = self
        describe = json.loads((Path(pymisp.__file__).parent / "data" / "describeTypes.json").read_text())

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                stand_in.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "key": self.headers.get("Authorization"),
                        "body": body,
                    }
                )
                if self.headers.get("Authorization") != "s3cret-key":
                    self._answer(403, {"errors": ["Authentication failed"]})
                elif self.path.startswith("/servers/getVersion"):
                    self._answer(200, {"version": "2.5.2", "pymisp_recommended_version": pymisp.__version__})
                elif self.path.startswith("/users/view/me"):
                    user = {"id": "7", "email": "csirt@example.org", "org_id": "1", "role_id": "3"}
                    self._answer(200, {"User": user, "Role": {"id": "3", "name": "User"}, "UserSetting": {}})
                elif self.path.startswith("/attributes/describeTypes"):
                    self._answer(200, describe)
                elif self.path.startswith("/events/add") and refuse:
                    self._answer(403, {"errors": ["You do not have permission to use this functionality."]})
                elif self.path.startswith("/events/add"):
                    posted = json.loads(body)
                    event = posted.get("Event", posted)  # MISP takes the event bare or wrapped
                    self._answer(200, {"Event": {**event, "id": "4242", "org_id": "1"}})
                else:
                    self._answer(404, {"errors": [f"no route {self.path}"]})

            do_GET = do_POST = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("refuse", [False, True], ids=["accepted", "refused"])
def test_push_sends_the_exported_event_to_misp(
    story_trace: tuple[dict, Path, str], tmp_path: Path, refuse
) -> None:
    import os
    import subprocess
    import sys

    _, pkg, lake = story_trace
    misp = _MispStandIn(refuse=refuse)
    # no proxy may carry loopback traffic elsewhere; the key only in the environment
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "MISP_KEY"}
    out = tmp_path / "event.json"
    try:
        args = ["export", "misp", str(pkg), "--out", str(out), "--push", misp.url, "--format", "json"]
        run = subprocess.run(
            [sys.executable, "-m", "tracepipe.cli", *args, "--lake", lake],
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "MISP_KEY": "s3cret-key"},
            stdin=subprocess.DEVNULL,
        )
    finally:
        misp.close()
    assert "s3cret-key" not in run.stdout + run.stderr
    assert all(r["key"] == "s3cret-key" for r in misp.requests)
    added = [r for r in misp.requests if r["method"] == "POST" and r["path"].startswith("/events/add")]
    assert len(added) == 1, [r["path"] for r in misp.requests]
    posted = json.loads(added[0]["body"])
    sent = posted.get("Event", posted)
    written = json.loads(out.read_text())["Event"]
    assert sent["info"] == written["info"] and sent["uuid"] == written["uuid"]
    assert sorted((a["type"], a["value"]) for a in sent["Attribute"]) == sorted(
        (a["type"], a["value"]) for a in written["Attribute"]
    )
    assert len(sent["Attribute"]) == len(written["Attribute"]) > 0
    if refuse:
        assert run.returncode == 4, run.stderr
        assert "refused" in run.stderr and "permission" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["pushed_to"] == f"{misp.url} (event 4242)"


def test_table_output_names_the_contacting_vms(story_trace: tuple[dict, Path, str], tmp_path: Path) -> None:
    # the README shows "contacted by VMs: <id> (web-05)"; the output gave the id alone
    _, pkg, lake = story_trace
    ticket = pkg.parent / "c2.csv"
    ticket.write_text("address,port,peer,time\n192.0.2.77,443,,2025-06-17T07:00:00Z\n")
    run = run_tracepipe("trace", str(ticket), "--out", str(tmp_path / "pkg"), "--lake", lake)
    assert run.returncode == 0, run.stderr[-2000:]
    line = next(x for x in run.stdout.splitlines() if "contacted by VMs" in x)
    assert line.strip().endswith("(web-05)"), line


def test_an_open_lease_asked_about_after_the_quarantine_ended_says_so(
    story_lake: Path, tmp_path: Path
) -> None:
    """A review: dataproc-04, soft-deleted, its quarantine over on 06-18 09:45 (no delete event came): `who`
    said "still held" on 06-19 beside "reclaimed since", trace with no note. Both now say what is uncertain."""
    later, during = "2025-06-19T10:00:00Z", "2025-06-17T08:45:00Z"
    for at, reclaimed in ((later, True), (during, False)):
        run = run_tracepipe("who", "10.20.1.26", "--at", at, "--format", "json", "--lake", str(story_lake))
        assert run.returncode == 0, run.stderr
        (lease,) = json.loads(run.stdout)["leases"]
        assert lease["vm_name"] == "dataproc-04" and lease["after_reclaim"] is reclaimed
    run = run_tracepipe("who", "10.20.1.26", "--at", later, "--lake", str(story_lake))
    assert "with no delete recorded" in " ".join(run.stdout.split()) and "still held" not in run.stdout
    ticket = tmp_path / "late.csv"
    ticket.write_text(f"address,time\n10.20.1.26,{later}\n10.20.1.26,{during}\n")
    run = run_tracepipe(
        "trace", str(ticket), "--format", "json", "--out", str(tmp_path / "pkg"), "--lake", str(story_lake)
    )
    assert run.returncode == 0, run.stderr[-2000:]
    notes = [" ".join(o["ambiguities"]) for o in json.loads(run.stdout)["observations"]]
    assert "quarantine ended" in notes[0] and "quarantine ended" not in notes[1]


def test_a_range_over_midnight_prints_the_date_of_its_end(
    story_trace: tuple[dict, Path, str], tmp_path: Path
) -> None:
    # a review: "at 2025-06-16 08:00:00 - 08:00:00 UTC" for a range of one day (JSON and HTML were right)
    _, _, lake = story_trace
    ticket = tmp_path / "range.csv"
    ticket.write_text("address,start,end\n10.20.1.19,2025-06-16T08:00:00Z,2025-06-17T08:00:00Z\n"
                      "10.20.1.19,2025-06-17T07:00:00Z,2025-06-17T07:30:00Z\n")  # fmt: skip
    run = run_tracepipe("trace", str(ticket), "--out", str(tmp_path / "pkg"), "--lake", lake)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "at 2025-06-16 08:00:00 - 2025-06-17 08:00:00 UTC" in run.stdout
    assert "at 2025-06-17 07:00:00 - 07:30:00 UTC" in run.stdout


def test_a_deeply_nested_observation_file_is_a_reject_not_an_internal_error(tmp_path: Path) -> None:
    # hostile review: a MISP event from a peer nested 100,000 deep made `trace` exit 4 with a RecursionError
    deep = tmp_path / "deep.json"
    deep.write_text('{"Event": ' + "[" * 100_000 + "]" * 100_000 + "}")
    for fmt in ("misp", "json"):
        observations = read_observations(deep, fmt)
        assert observations.table.num_rows == 0 and observations.rejects


def _misp(*attributes: dict, **event: object) -> str:
    return json.dumps({"Event": {"date": "2025-06-17", "Attribute": list(attributes), **event}})


@pytest.mark.parametrize(
    ("name", "text", "observed", "rejected"),
    [
        # session-24 hostile review: each was an internal error (exit 4) or lost the file's good lines
        (
            "bigcell.csv",
            "address,time\n10.0.0.1,2025-06-17T08:00Z," + "A" * 200_000 + "\n10.0.0.2,2025-06-17T08:30Z\n",
            1,
            [("line 2", "not a CSV line")],
        ),
        (
            "big-later.csv",
            "address,time\n10.0.0.2,2025-06-17T08:30Z\n10.0.0.1,"
            + "A" * 200_000
            + "\n10.0.0.3,2025-06-17T08:31Z\n",
            2,
            [("line 3", "not a CSV line")],
        ),
        (
            "year1.csv",
            "address,time\n10.0.0.1,0001-01-01T00:00:00Z\n10.0.0.2,2025-06-17T08:30Z\n",
            1,
            [("line 2", "time outside plausible window")],
        ),
        (
            "year9999.csv",
            "address,time\n10.0.0.1,9999-12-31T23:00:00Z\n",
            0,
            [("line 2", "time outside plausible window")],
        ),
        (
            "epoch5138.csv",
            "address,time\n10.0.0.1,99999999999\n",
            0,
            [("line 2", "time outside plausible window")],
        ),
        (
            # (an attribute's timestamp is when it was edited, never the time of the observation: the event's
            # date is, and this one is no plausible date)
            "future-event.json",
            _misp({"type": "ip-dst", "value": "10.0.0.1", "timestamp": "1750147200"}, date="9999-12-31"),
            0,
            [("attribute 1", "time outside plausible window")],
        ),
        (
            "attr-int.json",
            json.dumps({"Event": {"date": "2025-06-17", "Attribute": 5}}),
            0,
            [("event 1 Attribute", "not a list")],
        ),
        (
            "object-int.json",
            _misp({"type": "ip-dst", "value": "10.0.0.1"}, Object=7),
            1,
            [("event 1 Object", "not a list")],
        ),
        (
            "object-attr-int.json",
            _misp(Object=[{"Attribute": 3}]),
            0,
            [("event 1 Object Attribute", "not a list")],
        ),
        ("bom.csv", "\ufeffaddress,time\n10.0.0.1,2025-06-17T08:00Z\n", 1, []),
        ("bom.json", "\ufeff" + _misp({"type": "ip-dst", "value": "10.0.0.1"}), 1, []),
    ],
)
def test_hostile_observation_files_reject_their_bad_part_and_keep_the_rest(
    tmp_path: Path, name: str, text: str, observed: int, rejected: list[tuple[str, str]]
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    observations = read_observations(path)
    assert observations.table.num_rows == observed
    got = [(r["ref"], r["reason"]) for r in observations.rejects]
    assert [
        (ref, reason[: len(want)]) for (ref, reason), (_, want) in zip(got, rejected, strict=False)
    ] == rejected
    assert len(got) == len(rejected), got
    if name.startswith("bom"):
        assert observations.format == ("csv" if name.endswith(".csv") else "misp")


def test_a_huge_observation_list_is_read_no_further_than_the_cap(tmp_path: Path) -> None:
    """A list of millions of lines was parsed whole before the 100,000 cap (63 MiB: 52 s, 1.9 GB); the reader
    now stops at the cap, for good lines and for bad ones alike, and says so."""
    from tracepipe.respond import observations as obs

    good = tmp_path / "many.csv"
    good.write_text("address,time\n" + "".join(f"10.0.{i % 200}.1,{1750147200 + i}\n" for i in range(300)))
    bad = tmp_path / "bad.csv"
    bad.write_text("address,time\n" + "nope,1\n" * 300)
    cap = obs.MAX_OBSERVATIONS
    obs.MAX_OBSERVATIONS = 100
    try:
        many, junk = read_observations(good), read_observations(bad)
    finally:
        obs.MAX_OBSERVATIONS = cap
    assert many.table.num_rows == 100
    assert [r["ref"] for r in many.rejects] == ["line 102"]
    assert many.rejects[0]["reason"] == "more than 100 observations: the rest is not read"
    assert junk.table.num_rows == 0 and len(junk.rejects) == 101
    assert junk.rejects[-1]["reason"] == "more than 100 rejects: the rest is not read"
    misp = tmp_path / "misp.json"  # events after the cap add nothing (each added two rejects)
    bad_events = [{"Event": {"date": "2025-06-17", "Attribute": "x", "Object": 7}}] * 300
    misp.write_text(json.dumps(bad_events))
    obs.MAX_OBSERVATIONS = 100
    try:
        capped = read_observations(misp)
    finally:
        obs.MAX_OBSERVATIONS = cap
    assert len(capped.rejects) == 101 and capped.rejects[-1]["reason"].startswith("more than 100 rejects")


def test_misp_domains_that_are_no_host_names_are_rejects_never_exported(
    story_lake: Path, tmp_path: Path
) -> None:
    """A MISP domain with a newline and a STIX pattern fragment, or a bidi override, went into the STIX bundle
    (invalid there: not an idn-hostname) and the MISP export as it was. Host names are checked when read (the
    internationalised ones kept in their xn-- form) and again when a package is exported."""
    import stix2validator

    event = tmp_path / "domains.json"
    event.write_text(
        _misp(
            {"type": "ip-dst", "value": "192.0.2.77", "timestamp": "1750147200"},
            {"type": "domain", "value": "evil.example']\n OR [x:value = 'a"},
            {"type": "hostname", "value": "\u202eexe.evil.com"},
            {"type": "domain", "value": "Bücher.Example."},
            {"type": "domain", "value": "c2.example.org"},
            {"type": "hostname", "value": "_dmarc.my_host.example.org"},
        )
    )
    observations = read_observations(event)
    assert [d["value"] for d in observations.domains] == [
        "xn--bcher-kva.example",
        "c2.example.org",
        "_dmarc.my_host.example.org",  # (underscores are DNS names too: review of session 24)
    ]
    assert [r["ref"] for r in observations.rejects] == ["attribute 2", "attribute 3"]
    pkg = tmp_path / "pkg"
    run = run_in_process("trace", str(event), "--out", str(pkg), "--lake", str(story_lake))
    assert run.returncode == 3, run.stderr
    trace_json = json.loads((pkg / "trace.json").read_text())
    trace_json["domains"] = [{"value": "bad\nname.example"}, {"value": "ok.example"}]  # edited since
    (pkg / "trace.json").write_text(json.dumps(trace_json))
    out = tmp_path / "bundle.json"
    run = run_in_process("export", "stix", str(pkg), "--out", str(out), "--lake", str(story_lake))
    assert run.returncode == 0, run.stderr
    report = stix2validator.validate_file(str(out))
    assert report.is_valid, [str(e) for r in report.results for e in r.errors]
    assert "ok.example" in out.read_text() and "bad\\nname" not in out.read_text()
    # a domain the event named is no observation of this site's (no DNS data): an indicator, never a sighting
    # or observed-data (before: count 1, dated at the export)
    objects = json.loads(out.read_text())["objects"]
    domain_ids = {o["id"] for o in objects if o["type"] == "indicator" and "domain-name" in o["pattern"]}
    assert domain_ids and not [o for o in objects if o.get("sighting_of_ref") in domain_ids]
    assert not [o for o in objects if o["type"] == "domain-name"]
    assert [o for o in objects if o["type"] == "sighting"]  # (the address seen here still has its sighting)


def test_export_of_odd_inputs_is_an_input_error_not_an_internal_one(
    story_trace: tuple[dict, Path, str], tmp_path: Path
) -> None:
    """An alert-id list with a byte that is not UTF-8 stopped `export` with UnicodeDecodeError (trace read the
    same list); a package whose trace.json is a list with AttributeError. Now: the ids read as trace reads
    them, and a package of another shape is an input error (exit 4) that says what a package is."""
    import shutil

    _, pkg, lake = story_trace
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"\xef\xbb\xbf0123456789abcdef\n\xff\xfe bad\n")
    run = run_in_process("export", "misp", str(ids), "--out", str(tmp_path / "e.json"), "--lake", lake)
    assert "internal error" not in run.stderr and "UnicodeDecodeError" not in run.stderr, run.stderr
    odd = tmp_path / "odd"
    shutil.copytree(pkg, odd)
    (odd / "trace.json").write_text("[]")
    run = run_in_process("export", "misp", str(odd), "--out", str(tmp_path / "o.json"), "--lake", lake)
    assert run.returncode == 4 and "is not an incident package" in run.stderr, run.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a review: each was rejected whole or in part (exit 4 or 3), though a CSIRT's tickets look like this
        ("# SSC-2025-06 from EGI CSIRT\n# times in UTC\nip,time\n10.20.1.31,2025-06-17T08:05:00Z\n", 1),
        ("ip,time\n# between rows\n10.20.1.31,2025-06-17T08:05:00Z # from the abuse mail\n", 1),
        ("ip;time\n10.20.1.31;2025-06-17T08:05:00Z\n", 1),  # a spreadsheet in a decimal-comma locale
        ("ip\ttime\n10.20.1.31\t2025-06-17T08:05:00Z\n", 1),
        ("IP Address,Event Time\n10.20.1.31,2025-06-17 08:05:00 UTC\n", 1),
        ("ip_address,time_utc\n10.20.1.31,1750147500000\n", 1),  # epoch milliseconds
        ("src,datetime\n10.20.1.31,2025-06-17 08:05:00 GMT\n", 1),
        ("Source IP Address,Time (UTC)\n10.20.1.31,2025-06-17 08:05:00\n", 1),
        ("IP,Date/Time\n10.20.1.31,2025-06-17T08:05:00Z\n", 1),
        ("IP\u00a0Address,Event\u00a0Time\n10.20.1.31,2025-06-17T08:05:00Z\n", 1),  # a spreadsheet's NBSP
    ],
)
def test_ticket_forms_a_csirt_sends_are_read(tmp_path: Path, text: str, expected: int) -> None:
    ticket = tmp_path / "ticket.csv"
    ticket.write_text(text)
    observations = read_observations(ticket)
    assert observations.rejects == [] and observations.table.num_rows == expected
    row = observations.table.to_pylist()[0]
    assert row["address"] == "10.20.1.31"
    assert row["start"] == dt.datetime(2025, 6, 17, 8, 5, tzinfo=dt.UTC)


def test_a_time_that_does_not_parse_is_named_not_called_missing(tmp_path: Path) -> None:
    ticket = tmp_path / "ticket.csv"
    ticket.write_text("ip,time\n10.20.1.31,17/06/2025 08:05\n10.20.1.31,\n")
    reasons = [r["reason"] for r in read_observations(ticket).rejects]
    assert reasons[0].startswith("time '17/06/2025 08:05' does not parse") and reasons[1].startswith(
        "no time"
    )


def test_an_address_with_its_port_in_one_cell_is_read(tmp_path: Path) -> None:
    # abuse reports and logs write 192.0.2.7:443 and [2001:db8::7]:443: they were rejects ("not an address")
    ticket = tmp_path / "ticket.csv"
    ticket.write_text(
        "address,peer,time\n"
        "10.20.1.31:51234,[2001:db8::7]:443,2025-06-17T08:05:00Z\n"  # the peer's (service) port is taken
        "10.20.1.31:445,,2025-06-17T08:05:00Z\n"
        "[2001:db8:20:1::a],,2025-06-17T08:05:00Z\n"
        "10.20.1.31:99999,,2025-06-17T08:05:00Z\n"
    )
    observations = read_observations(ticket)
    rows = [(r["address"], r["port"], r["peer"]) for r in observations.table.to_pylist()]
    assert rows == [
        ("10.20.1.31", 443, "2001:db8::7"),
        ("10.20.1.31", 445, None),
        ("2001:db8:20:1::a", None, None),
    ]
    assert [(r["ref"], r["reason"]) for r in observations.rejects] == [
        ("line 5", "port out of range 0-65535")
    ]


def test_a_look_alike_column_and_other_scripts_digits_are_not_read_as_the_address_and_port(
    tmp_path: Path,
) -> None:
    # hostile review: a column "\u202eaddress" normalised to "address" and silently replaced the real one, and
    # "1.2.3.4:٤٤٣" (Arabic-Indic digits) was port 443
    ticket = tmp_path / "ticket.csv"
    ticket.write_text(
        "address,time,\u202eaddress\n10.20.1.31,2025-06-17T08:05:00Z,1.1.1.1\n1.2.3.4:\u0664\u0664\u0663,2025-06-17T08:05:00Z,\n",
        encoding="utf-8",
    )
    observations = read_observations(ticket)
    assert observations.table.column("address").to_pylist() == ["10.20.1.31"]
    assert [r["ref"] for r in observations.rejects] == ["line 3"]


def test_a_misp_attribute_s_timestamp_is_not_taken_for_when_the_address_was_seen(
    story_lake: Path, tmp_path: Path
) -> None:
    """A CSIRT review: MISP sets an attribute's `timestamp` when it was last edited, hours after the activity.
    Taken for the time of the observation, an attribute entered at 11:00 for a scan seen at 08:00 named the VM
    that held 10.20.1.31 at 11:00 (jupyter-31) and no one else. Without first_seen, the attribute's sightings
    say when; without those, the event's day (both VMs of that day, with the ambiguity said)."""
    edited = {"type": "ip-src", "value": "10.20.1.31", "timestamp": "1750158000"}  # (11:00 UTC)
    cases = {
        "edited.json": (_misp(edited), {"jupyter-07", "jupyter-31"}),
        "sighted.json": (
            _misp({**edited, "Sighting": [{"type": "0", "date_sighting": "1750147200"}]}),  # (08:00 UTC)
            {"jupyter-07"},
        ),
        "first-seen.json": (_misp({**edited, "first_seen": "2025-06-17T08:00:00Z"}), {"jupyter-07"}),
    }
    for name, (text, held_by) in cases.items():
        (tmp_path / name).write_text(text)
        run = run_in_process("trace", str(tmp_path / name), "--format", "json", "--lake", str(story_lake))
        assert run.returncode == 0, run.stderr[-2000:]
        (answer,) = json.loads(run.stdout)["observations"]
        assert {h["vm_name"] for h in answer["holders"]} == held_by, name
    (tmp_path / "undated.json").write_text(json.dumps({"Event": {"Attribute": [edited]}}))
    observations = read_observations(tmp_path / "undated.json")
    assert observations.table.num_rows == 0
    assert (
        "no time" in observations.rejects[0]["reason"] and "last edited" in observations.rejects[0]["reason"]
    )


def _exported(story_lake: Path, folder: Path, ticket: str, *args: str, window: str = "10m") -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ticket.csv").write_text(ticket)
    run = run_in_process(
        "trace", str(folder / "ticket.csv"), "--window", window, "--out", str(folder / "pkg"), "--lake",
        str(story_lake),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    run = run_in_process("export", *args[:1], str(folder / "pkg"), *args[1:], "--lake", str(story_lake))
    assert run.returncode == 0, run.stderr[-2000:]
    return {"document": json.loads(run.stdout), "stderr": run.stderr}


def test_only_ends_on_their_own_observed_port_are_shared_and_common_destinations_are_not_for_ids(
    story_lake: Path, tmp_path: Path
) -> None:
    """A CSIRT review: every remote end of the observed port went out as a C&C `ip-dst|port` with to_ids: a web
    server's visitors (the port was the VM's), the server a VM reached from an ephemeral port given in a MISP
    `ip-src|port` (with that ephemeral port), and four destinations that 20-29 of the cloud's VMs use on 443."""
    web = _exported(story_lake, tmp_path / "web", "address,port,time\n198.51.100.20,443,2025-06-17T08:00:00Z\n",
                    "misp", window="5m")  # fmt: skip
    shared = [a for a in web["document"]["Event"]["Attribute"] if a["type"].startswith("ip-dst")]
    assert shared == [] and "on the traced VM's side only" in web["stderr"]
    # the VM's own ephemeral port: the server it reached is no end on that port
    ephemeral = _exported(
        story_lake,
        tmp_path / "eph",
        "address,port,time\n2001:db8:20:1::13,37124,2025-06-17T07:05:21Z\n",
        "misp",
    )
    assert not [a for a in ephemeral["document"]["Event"]["Attribute"] if "37124" in a["value"]]
    # a VM's C&C on 443 among destinations the cloud's users share: the C&C for IDS, the others as context
    mixed = _exported(
        story_lake, tmp_path / "c2", "address,time\n10.20.1.19:443,2025-06-17T07:00:00Z\n", "misp"
    )
    ids = {a["value"]: a["to_ids"] for a in mixed["document"]["Event"]["Attribute"]}
    assert ids.pop("192.0.2.77|443") is True
    assert ids and not any(ids.values()), ids
    for attribute in mixed["document"]["Event"]["Attribute"]:
        if not attribute["to_ids"]:
            assert "common destination" in attribute["comment"]
    # (what the package says of them: how many VMs reached each, from the day before its span to the day after)
    reached = {
        f"{d['address']}|{d['port']}": d["vms"]
        for d in json.loads((tmp_path / "c2" / "pkg" / "trace.json").read_text())["destinations"]
    }
    assert reached["192.0.2.77|443"] == 1 and all(reached[value] > 3 for value in ids)


def test_exports_of_two_incidents_or_two_sites_never_share_ids_and_keep_created_with_the_id(
    story_lake: Path, tmp_path: Path
) -> None:
    """A CSIRT review: two packages of one ticket file (two incidents) gave one MISP event uuid (a push replaced
    the other) and one STIX indicator id with two `created`; every site's identity had one id and one name. Now
    the producer is the site (--site, else its lake's own id), a STIX object's id derives from it and from when
    the finding was first seen, and the MISP event's from the package; the event's date is the incident's."""
    ticket = "address,port,peer,time\n10.20.1.19,443,192.0.2.77,{}\n"
    first = _exported(story_lake, tmp_path / "a", ticket.format("2025-06-17T07:00:00Z"), "misp", window="1h")
    second = _exported(story_lake, tmp_path / "b", ticket.format("2025-06-17T09:30:00Z"), "misp")
    event_a, event_b = first["document"]["Event"], second["document"]["Event"]
    assert event_a["uuid"] != event_b["uuid"] and event_a["date"] == event_b["date"] == "2025-06-17"
    again = run_in_process("export", "misp", str(tmp_path / "a" / "pkg"), "--lake", str(story_lake))
    assert json.loads(again.stdout)["Event"]["uuid"] == event_a["uuid"]  # (the same package: the same event)

    def stix(folder: str, *site: str) -> dict[str, dict]:
        run = run_in_process(
            "export", "stix", str(tmp_path / folder / "pkg"), *site, "--lake", str(story_lake)
        )
        assert run.returncode == 0, run.stderr
        return {o["id"]: o for o in json.loads(run.stdout)["objects"]}

    a, b = stix("a"), stix("b")
    for objects in (a, b):
        for obj in objects.values():  # every object, the addresses too, carries the TLP
            assert obj["type"] == "marking-definition" or obj.get("object_marking_refs"), obj
    indicators_a = {o["pattern"]: o for o in a.values() if o["type"] == "indicator"}
    indicators_b = {o["pattern"]: o for o in b.values() if o["type"] == "indicator"}
    common = set(indicators_a) & set(indicators_b)
    assert common  # (the same C&C in both incidents, first seen at other times: two objects)
    for pattern in common:
        assert indicators_a[pattern]["id"] != indicators_b[pattern]["id"]
    assert stix("a").keys() == a.keys()  # (the same package again: the same objects, `created` with them)
    assert all(stix("a")[k]["created"] == a[k]["created"] for k in a if "created" in a[k])
    cern, desy = stix("a", "--site", "CERN CSIRT"), stix("a", "--site", "DESY")
    for objects, name in ((cern, "CERN CSIRT"), (desy, "DESY")):
        (identity,) = [o for o in objects.values() if o["type"] == "identity"]
        assert identity["name"] == name
    assert not {k for k in cern if not k.startswith(("marking-definition", "ipv"))} & set(desy)


def test_local_addresses_in_stix_are_context_until_their_lease_ended_and_tlp_is_read_as_written(
    story_trace: tuple[dict, Path, str], tmp_path: Path
) -> None:
    """--include-local made STIX detection indicators of the cloud's own VM addresses (MISP marks them to_ids
    false; `intel import` of the bundle took a floating IP still in use as threat intelligence); `--tlp AMBER`
    and `--tlp TLP:AMBER` were refused; --out replaced an existing file without a word."""
    _, pkg, lake = story_trace
    out = tmp_path / "bundle.json"
    run = run_in_process(
        "export", "stix", str(pkg), "--include-local", "--tlp", "TLP:AMBER", "--out", str(out), "--lake", lake
    )
    assert run.returncode == 0, run.stderr
    indicators = [o for o in json.loads(out.read_text())["objects"] if o["type"] == "indicator"]
    local = [o for o in indicators if o["indicator_types"] == ["compromised"]]
    assert local and all(
        o["labels"] == ["context-only"] and o["valid_until"] > o["valid_from"] for o in local
    )
    assert all("labels" not in o for o in indicators if o["indicator_types"] == ["malicious-activity"])
    refused = run_in_process("export", "stix", str(pkg), "--tlp", "AMBER", "--out", str(out), "--lake", lake)
    assert refused.returncode == 2 and "exists" in refused.stderr
    assert run_in_process("export", "stix", str(pkg), "--tlp", "AMBER", "--out", str(out), "--force",
                          "--lake", lake).returncode == 0  # fmt: skip
    imported = run_in_process("intel", "import", str(out), "--lake", str(tmp_path / "intel"))
    assert imported.returncode == 0, imported.stderr
    kept = Lake(tmp_path / "intel").read("intel").column("indicator").to_pylist()
    assert kept and not {o["name"].split(" ")[0] for o in local} & set(kept)


def test_times_the_lake_has_no_records_of_are_said_so_not_answered_nobody(
    story_lake: Path, tmp_path: Path
) -> None:
    """A CSIRT review: `who` and `trace` answered "nobody held" for a day before the lake's first lifecycle
    record, and "the exporters may not see this path" for a time after its last flow: both are facts the lake
    does not have. Said now, from the log's statistics; within the records, answers are as before."""
    before = run_in_process("who", "10.20.1.31", "--at", "2025-06-16T08:05:00Z", "--lake", str(story_lake))
    assert before.returncode == 0 and "no VM on record held" in before.stdout
    assert "lifecycle records begin 2025-06-17 04:00:00 UTC" in before.stderr + before.stdout
    answer = json.loads(
        run_in_process(
            "who", "10.20.1.31", "--at", "2025-06-16T08:05:00Z", "--format", "json", "--lake", str(story_lake)
        ).stdout
    )
    assert any("lifecycle records begin" in n for n in answer["notes"])
    assert any("no flows of this time" in n for n in answer["notes"])
    inside = json.loads(
        run_in_process(
            "who", "10.20.1.31", "--at", "2025-06-17T08:05:00Z", "--format", "json", "--lake", str(story_lake)
        ).stdout
    )
    assert inside["held"] and inside["notes"] == []
    ticket = tmp_path / "o.csv"
    ticket.write_text("address,time\n10.20.1.31,2025-06-18T08:05:00Z\n10.20.1.31,2025-06-16T08:05:00Z\n")
    run = run_in_process("trace", str(ticket), "--format", "json", "--lake", str(story_lake))
    later, earlier = json.loads(run.stdout)["observations"]
    assert any("no flows of this time" in n for n in later["ambiguities"])
    assert any("lifecycle records begin" in n for n in earlier["ambiguities"])
    assert not any("no VM held this address then" in n for n in earlier["ambiguities"])


@pytest.mark.parametrize(
    ("name", "data", "expected", "reasons"),
    [
        # a list without a header line: its first observation was taken for the header and lost
        ("headerless.csv", b"10.20.1.31,2025-06-17T08:05:00Z\n10.20.1.19:443,2025-06-17T07:00:00Z\n",
         [("10.20.1.31", None, "08:05"), ("10.20.1.19", 443, "07:00")], []),
        # MISP's CSV export: its value column, and never its timestamp (when the attribute was edited)
        ("misp.csv",
         b"uuid,event_id,category,type,value,comment,to_ids,timestamp,first_seen,last_seen\n"
         b"5f0e,1,Network activity,ip-src,10.20.1.31,,1,1750158000,2025-06-17T08:00:00Z,\n"
         b"5f0f,1,Network activity,ip-dst|port,192.0.2.77|443,,1,1750158000,,\n"
         b"5f10,1,Payload delivery,md5,d41d8cd98f00b204e9800998ecf8427e,,1,1750158000,,\n",
         [("10.20.1.31", None, "08:00")], ["no time"]),
        # a date column and a time-of-day column; host prefixes; a network is no host
        ("split.csv",
         b"address,date,time\n10.20.1.31/32,2025-06-17,08:05:00\n2001:db8:20:1::1f/128,2025-06-17,08:05\n"
         b"10.20.1.0/24,2025-06-17,08:05\n",
         [("10.20.1.31", None, "08:05"), ("2001:db8:20:1::1f", None, "08:05")], ["address is a network prefix"]),
        # Excel's "Unicode Text" / PowerShell 5: UTF-16 with its byte-order mark
        ("utf16.csv", "address,time\r\n10.20.1.31,2025-06-17T08:05:00Z\r\n".encode("utf-16"),
         [("10.20.1.31", None, "08:05")], []),
    ],
)  # fmt: skip
def test_observation_lists_as_csirts_send_them(tmp_path: Path, name, data, expected, reasons) -> None:
    """A CSIRT review: these were rejected or misread (see each case)."""
    (tmp_path / name).write_bytes(data)
    observations = read_observations(tmp_path / name)
    got = [(r["address"], r["port"], f"{r['start']:%H:%M}") for r in observations.table.to_pylist()]
    assert got == expected
    assert [
        r["reason"][: len(want)] for r, want in zip(observations.rejects, reasons, strict=True)
    ] == reasons
    for reject in observations.rejects:  # (a row's detail is JSON a script can read, not a Python repr)
        assert isinstance(json.loads(reject["detail"]), dict)
