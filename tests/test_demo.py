"""`tracepipe demo` end to end, as a user runs it (a subprocess): every planted incident of the sample story is
found, attributed to the right VM, project and owner, no ordinary host is alerted, and the report and the
suggested next commands work. Checked against sample_data/story/ground_truth.json, not the demo's own verdict."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import run_demo

REPO = Path(__file__).resolve().parents[1]
TRUTH = json.loads((REPO / "sample_data" / "story" / "ground_truth.json").read_text())
EXPECTED = {
    "ssh_bruteforce": "brute_force",
    "horizontal_scan": "horizontal_scan",
    "beacon": "beacon",
    "exfiltration": "exfiltration",
    "miner": "mining",
}


def test_demo_runs_every_step(demo: tuple[dict, float, Path]) -> None:
    # how long it takes is for benchmarks, not a timed assertion (the 180 s subprocess timeout only catches a hang)
    result, _, work = demo
    assert [s["status"] for s in result["steps"]] == ["ok"] * 5, result["steps"]
    assert result["lake"] == "demo-lake" and (work / "demo-lake" / "flows").is_dir()
    numbers = {s["name"].split(" (")[0]: s["numbers"] for s in result["steps"]}
    assert numbers["ingest netflow"]["flows"] == 13_879 and numbers["ingest netflow"]["rejects"] == 0
    assert numbers["ingest vm"]["vms"] == 37 and numbers["ingest vm"]["rejects"] == 0
    assert numbers["ingest syslog"]["lines"] > 100


@pytest.mark.parametrize("incident", TRUTH["incidents"], ids=[i["kind"] for i in TRUTH["incidents"]])
def test_every_planted_incident_found_and_attributed(demo: tuple[dict, float, Path], incident: dict) -> None:
    findings = demo[0]["findings"]
    hits = [
        f for f in findings if f["addr"] == incident["addr"] and f["detector"] == EXPECTED[incident["kind"]]
    ]
    assert hits, f"{incident['kind']} on {incident['addr']} not found; findings: {findings}"
    for hit in hits:
        assert (hit["vm_name"], hit["project"], hit["user"]) == (
            incident["vm_name"],
            incident["project"],
            incident["user"],
        )
        assert hit["vm_id"] == incident["vm_id"]
        assert incident["vm_name"] in hit["reason"]


def test_deleted_culprits_still_named(demo: tuple[dict, float, Path]) -> None:
    by_addr = {(f["addr"], f["detector"]): f for f in demo[0]["findings"]}
    scanner = by_addr[("10.20.1.31", "horizontal_scan")]  # deleted at 10:20, address reused by jupyter-31
    assert scanner["vm_name"] == "jupyter-07" and scanner["vm_status"] == "deleted"
    exfil = by_addr[("10.20.1.26", "exfiltration")]  # soft-deleted at 09:45: in quarantine
    assert exfil["vm_status"] == "soft_deleted" and exfil["quarantine_until"].startswith("2025-06-18T09:45")


def test_no_alert_on_ordinary_hosts(demo: tuple[dict, float, Path]) -> None:
    result = demo[0]
    ordinary = set(TRUTH["ordinary_addrs"])
    assert ordinary and not [f for f in result["findings"] if f["addr"] in ordinary]
    planted = {i["addr"] for i in TRUTH["incidents"]}
    assert {f["addr"] for f in result["findings"]} <= planted
    assert (
        all(c["found"] and c["attributed"] for c in result["truth_check"]) and result["false_positives"] == []
    )


def test_report_written_inside_the_demo_lake(demo: tuple[dict, float, Path]) -> None:
    result, _, work = demo
    html = (
        Path(work / result["report"]["html"])
        if not Path(result["report"]["html"]).is_absolute()
        else Path(result["report"]["html"])
    )
    assert html.is_file() and (work / "demo-lake") in html.parents
    text = html.read_text()
    for incident in TRUTH["incidents"]:
        assert incident["vm_name"] in text and incident["user"] in text
    assert text.count("<svg") >= 2 + len(TRUTH["incidents"])
    assert not (work / "reports").exists()  # nothing written into the current directory


def test_suggested_commands_work(demo: tuple[dict, float, Path]) -> None:
    result, _, work = demo
    assert len(result["next_commands"]) == 3
    argvs = [shlex.split(command) for command in result["next_commands"]]
    assert all(argv[0] == "tracepipe" for argv in argvs)
    with ThreadPoolExecutor(3) as pool:  # three independent read-only commands: run them side by side
        runs = list(pool.map(lambda argv: run_demo(*argv[1:], cwd=work), argvs))
    for command, run in zip(result["next_commands"], runs, strict=True):
        assert run.returncode == 0, command + "\n" + run.stdout + run.stderr
    outputs = [run.stdout for run in runs]
    assert "jupyter-07" in outputs[0] and "apatel" in outputs[0]
    assert "dataproc-04" in outputs[1] and "okafor" in outputs[1]
    assert "ci-runner-3" in outputs[2] and "tnguyen" in outputs[2]


def test_demo_in_a_lake_path_with_sql_and_glob_characters(tmp_path: Path) -> None:
    """Issue #12 item 5: a quote in the lake's path broke the demo and a crafted one ran `COPY ... TO`; `[`, `*`
    and `?` were read as a glob. The whole demo (ingest, sweep, HTML report, a suggested command) works in such
    a lake and creates nothing outside it. One lake name carries both (a space and glob characters, then the
    quote injection): either bug alone fails the demo or writes pwn.csv, so one demo run checks both."""
    name = "my lake [1]*?x'); COPY (SELECT 1) TO 'PWN"
    pwn = tmp_path / "pwn.csv"
    lake = tmp_path / name.replace("PWN", str(pwn))
    run = run_demo("demo", "--lake", str(lake), "--format", "json", cwd=tmp_path)
    assert not pwn.exists()
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert (
        all(c["found"] and c["attributed"] for c in result["truth_check"]) and not result["false_positives"]
    )
    assert Path(result["report"]["html"]).is_file() and lake in Path(result["report"]["html"]).parents
    who = run_demo(*shlex.split(result["next_commands"][0])[1:], cwd=tmp_path)
    assert who.returncode == 0 and "jupyter-07" in who.stdout, who.stdout + who.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        lake.relative_to(tmp_path).parts[0]
    ]  # nothing beside it


def test_a_story_without_its_captures_is_a_failed_step(tmp_path: Path) -> None:
    """README walkthrough (session 35): a story folder without netflow/ reported "ok, flows 0" for the NetFlow
    step (its syslog/ and intel/ missing were "failed"): every missing part is a failed step, exit 3."""
    import shutil

    story = tmp_path / "story"
    shutil.copytree(REPO / "sample_data" / "story", story, ignore=shutil.ignore_patterns("netflow"))
    run = run_demo(
        "demo", "--lake", str(tmp_path / "lake"), "--story", str(story), "--format", "json", cwd=tmp_path
    )
    assert run.returncode == 3, run.stdout[-2000:] + run.stderr[-2000:]
    steps = {s["name"].split(" (")[0]: s for s in json.loads(run.stdout)["steps"]}
    assert steps["ingest netflow"]["status"] == "failed" and "netflow" in steps["ingest netflow"]["detail"]
    assert steps["ingest vm"]["status"] == "ok"


def test_demo_refuses_to_wipe_a_directory_it_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "lake"
    (precious / "flows").mkdir(parents=True)
    (precious / "flows" / "keep.parquet").write_bytes(b"PAR1")
    run = run_demo("demo", "--lake", str(precious), cwd=tmp_path)
    assert run.returncode == 2
    assert "not made by `tracepipe demo`" in run.stderr.replace("\n", " ")
    assert (precious / "flows" / "keep.parquet").read_bytes() == b"PAR1"


def test_committed_story_matches_the_generator() -> None:
    """The committed sample is what `make_sample.py` makes today (regenerate it after changing tests/support/stories.py)."""
    from support import stories

    story = stories.build_story(seed=TRUTH["seed"])
    assert json.loads(json.dumps(story.truth)) == TRUTH
    story_dir = REPO / "sample_data" / "story"
    lines = stories.nova_notifications(story, REPO / "sample_data" / "templates" / "nova")
    assert "\n".join(lines) + "\n" == (story_dir / "nova" / "notifications.jsonl").read_text()
    for name, text in stories.syslog_files(story).items():
        assert text == (story_dir / "syslog" / name).read_text()
    assert stories.misp_csv(story) == (story_dir / "intel" / "misp.csv").read_text()


def test_traffic_capture_is_deterministic_and_complete() -> None:
    from support import stories

    one, two = (stories.build_story(seed=11, hours=1.0, n_ordinary=8) for _ in range(2))
    data = stories.packet_bytes(one)
    assert data == stories.packet_bytes(two)
    assert data != stories.packet_bytes(stories.build_story(seed=12, hours=1.0, n_ordinary=8))
    # walk the pcap: every record complete, times never go backwards, both probes' views add up
    offset, count, last = 24, 0, 0.0
    while offset < len(data):
        sec, usec, caplen, wirelen = struct.unpack_from("<IIII", data, offset)
        assert caplen <= wirelen and (sec + usec / 1e6) >= last
        last = sec + usec / 1e6
        offset += 16 + caplen
        count += 1
    assert offset == len(data)
    split = len(stories.packet_bytes(one, "openstack")) + len(stories.packet_bytes(one, "opennebula")) - 24
    assert split == len(data) and count > one.n_conns * 2


def test_demo_piped_prints_each_finding_on_one_line(demo: tuple[dict, float, Path]) -> None:
    """Regression: `tracepipe demo | cat` wrapped at 80 columns and split "owner tnguyen" over two lines."""
    result, _, work = demo
    run = run_demo("demo", "--lake", "demo-lake-text", cwd=work)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    for finding in result["findings"]:
        who = f"VM {finding['vm_name']} · project {finding['project']} · owner {finding['user']}"
        assert any(finding["addr"] in line and who in line for line in lines), (who, lines)
        assert any(line.strip() == finding["reason"] for line in lines)
    assert max(len(line) for line in lines) > 120


@pytest.mark.parametrize(
    ("argv0", "program"),
    [
        ("/srv/app/.venv/bin/tracepipe", "/srv/app/.venv/bin/tracepipe"),
        ("tracepipe", "tracepipe"),
        ("/home/a b/.local/bin/tracepipe", "'/home/a b/.local/bin/tracepipe'"),  # pastes as one word
        ("/usr/lib/python3.11/site-packages/tracepipe/cli.py", "tracepipe"),  # python -m tracepipe.cli
        ("", "tracepipe"),
    ],
)
def test_next_commands_name_the_program_as_invoked(argv0, program):
    from tracepipe.demo import program_name

    assert program_name(argv0) == program
    assert shlex.split(f"{program_name(argv0)} who 10.0.0.1")[0] == shlex.split(program)[0]


def test_export_of_the_demos_alert_ids_counts_the_indicators_it_holds(demo: tuple[dict, float, Path]) -> None:
    """The title said "tracepipe alerts (8 indicators)" for an event of 3: the local addresses left out counted."""
    from tracepipe.lake import Lake

    _, _, work = demo
    lake = work / "demo-lake"
    ids = Lake(lake).read("alerts", ["alert_id"]).column("alert_id").to_pylist()
    (work / "alert-ids.txt").write_text("\n".join(ids) + "\n")
    out = work / "alerts.misp.json"
    run = run_demo("export", "misp", "alert-ids.txt", "--out", str(out), "--lake", str(lake), cwd=work)
    assert run.returncode == 0, run.stderr[-2000:]
    event = json.loads(out.read_text())["Event"]
    shared = len(event["Attribute"])
    assert shared > 0 and event["info"] == f"tracepipe alerts ({shared} indicators)"
    assert "local addresses (VMs, private ranges) left out" in run.stderr
    # an alert's indicator says when its flows were seen and how many there were (before: the alert's window
    # bounds, and "1 flows" for a beacon of 159 connections)
    from tracepipe.query import connect

    beacon = next(a for a in event["Attribute"] if "beacon" in a["comment"])
    address = beacon["value"].split("|")[0]
    with connect(
        Lake(lake)
    ) as con:  # (the lake's files as its log lists them: a glob reads replaced ones too)
        flows, first, last = con.execute(
            "SELECT count(*), min(f.ts_start), max(f.ts_end) FROM flows f, alerts a "
            "WHERE a.detector = 'beacon' AND a.peer = $a AND $a IN (f.src_addr, f.dst_addr) "
            "AND a.addr IN (f.src_addr, f.dst_addr) AND f.ts_start < a.window_end AND f.ts_end >= a.window_start",
            {"a": address},
        ).fetchone()
    assert flows > 100 and beacon["comment"].endswith(f"seen in {flows} flows")
    assert beacon["Sighting"][0]["source"] == f"tracepipe ({flows} flows)"
    seen = [dt.datetime.fromisoformat(beacon[k].replace("Z", "+00:00")) for k in ("first_seen", "last_seen")]
    assert seen == [first, last]


def test_sql_as_of_a_version_later_than_the_lake_is_a_usage_error(demo: tuple[dict, float, Path]) -> None:
    # it was the log reader's raw "LogSegment end version ..." and exit 4
    _, _, work = demo
    run = run_demo("sql", "SELECT 1", "--as-of", "flows=99999", "--lake", "demo-lake", cwd=work)
    assert run.returncode == 2 and "flows=99999 is later than the lake (flows=" in " ".join(
        run.stderr.split()
    )
    run = run_demo("sql", "SELECT count(*) FROM flows", "--as-of", "flows=1", "--lake", "demo-lake", cwd=work)
    assert run.returncode == 0, run.stderr


def test_alert_ids_with_comments_and_a_mistyped_line_are_read_as_alert_ids(
    demo: tuple[dict, float, Path],
) -> None:
    # a review: `trace ids.txt` (auto) read such a file as a CSV of no address column: exit 4
    from tracepipe.lake import Lake

    _, _, work = demo
    lake = work / "demo-lake"
    ids = sorted(Lake(lake).read("alerts", ["alert_id"]).column("alert_id").to_pylist())[:2]
    assert len(ids) == 2
    ticket = work / "ids-commented.txt"
    ticket.write_text(f"# from the hourly sweep\n{ids[0]}  # brute force\n{ids[1]}\nnot-an-alert\n")
    run = run_demo(
        "trace",
        str(ticket),
        "--format",
        "json",
        "--out",
        str(work / "ids-pkg"),
        "--lake",
        str(lake),
        cwd=work,
    )
    assert run.returncode == 3, run.stderr[-2000:]  # (answered, one line rejected)
    answer = json.loads(run.stdout)
    assert len(answer["observations"]) == 2
    assert [(r["ref"], r["reason"]) for r in answer["rejects"]] == [("line 4", "not an alert id")]
