"""`tracepipe sweep` end to end: pipeline files (errors name the line), windows, exit codes, no duplicates on
rerun, the JSON report, and the whole pipeline on traffic made by the real softflowd (tests/support/stories.py build_story:
NetFlow v9 + IPFIX captures, Nova/Neutron/OpenNebula lifecycle) with ground truth."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from support import stories
from support import stories as gen

from tracepipe.errors import EXIT_FAILED, EXIT_FOUND, EXIT_OK, EXIT_PARTIAL
from tracepipe.lake import Lake
from tracepipe.pipeline_config import PipelineError, load_pipeline, parse_pipeline
from tracepipe.sweep import run_sweep, sweep_window

REPO = Path(__file__).resolve().parent.parent
STORY = REPO / "sample_data" / "story"
# ground-truth kinds of stories.build_story -> our detector names
KIND = {
    "ssh_bruteforce": "brute_force",
    "horizontal_scan": "horizontal_scan",
    "beacon": "beacon",
    "exfiltration": "exfiltration",
    "miner": "mining",
    "vertical_scan": "vertical_scan",
    "rdp_bruteforce": "brute_force",
    "long_connection": "long_connection",
}


pipeline_text = gen.pipeline_text


@pytest.fixture(scope="module")
def story_lake(tmp_path_factory):
    return gen.story_lake(tmp_path_factory.mktemp("sweep"))


def test_sweep_writes_new_alerts_once(story_lake):
    lake, story, pipeline = story_lake
    since, until = story.last_day
    first = run_sweep(lake, pipeline, since, until)
    assert first.exit_code == EXIT_FOUND
    detectors = {a["detector"] for a in first.new_alerts.to_pylist()}
    assert {
        "horizontal_scan",
        "vertical_scan",
        "brute_force",
        "beacon",
        "exfiltration",
        "long_connection",
        "mining",
    } <= detectors
    stored = lake.read("alerts")
    assert stored.num_rows == first.new_alerts.num_rows
    report = json.loads(first.report_paths["json"].read_text())
    assert report["summary"]["new_alerts"] == first.new_alerts.num_rows
    assert {a["alert_id"] for a in report["alerts"]} == set(stored.column("alert_id").to_pylist())
    assert report["alerts"][0]["evidence"]["flows"]
    # the same window again: nothing new, nothing doubled, exit 0
    second = run_sweep(lake, pipeline, since, until)
    assert second.exit_code == EXIT_OK
    assert second.new_alerts.num_rows == 0
    assert second.already_known == first.new_alerts.num_rows
    assert lake.read("alerts").num_rows == stored.num_rows
    # a sub-window of the day: hourly windows inside it keep their ids, still nothing new
    third = run_sweep(lake, pipeline, since + dt.timedelta(hours=3), since + dt.timedelta(hours=4))
    assert third.new_alerts.num_rows == 0 and third.already_known >= 1


def test_empty_window_says_so(story_lake, tmp_path):
    lake, story, pipeline = story_lake
    since = story.start - dt.timedelta(days=30)
    result = run_sweep(lake, pipeline, since, since + dt.timedelta(hours=1))
    assert result.exit_code == EXIT_OK
    assert result.flows == 0
    assert result.message == f"no flows between {since:%Y-%m-%d %H:%M} and {since:%Y-%m-%d} 01:00 UTC"
    assert json.loads(result.report_paths["json"].read_text())["summary"]["message"] == result.message
    strict = tmp_path / "strict.toml"
    strict.write_text(pipeline_text(tmp_path, "").replace('name = "t"', 'name = "t"\nfail_on_empty = true'))
    assert run_sweep(lake, strict, since, since + dt.timedelta(hours=1)).exit_code == EXIT_FAILED


def test_partial_input_is_exit_3(story_lake, tmp_path):
    lake, story, _ = story_lake
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "garbage.pcap").write_bytes(b"this is not a capture" * 10)
    pipeline = tmp_path / "p.toml"
    # nothing planted on day one; but it is the lake's first day, so the story's habitual uploaders (2 GB to
    # their backup host in a few hours of the day) have no history: exfiltration alerts them by design
    # (a window over min_bytes never sets a host's own reference), so it is off here
    quiet = f'[inputs]\nflow_dirs = ["{drop}"]\n[detectors.exfiltration]\nenabled = false\n'
    pipeline.write_text(pipeline_text(tmp_path, quiet))
    quiet_day = (story.start, story.start + dt.timedelta(days=1))
    result = run_sweep(lake, pipeline, *quiet_day)
    assert result.flows > 0 and result.new_alerts.num_rows == 0
    assert result.exit_code == EXIT_PARTIAL
    assert any("rejected" in note for note in result.notes)


def test_a_sweep_into_an_empty_directory_lands_its_inputs_and_refuses_when_nothing_landed(tmp_path):
    """A sweep whose pipeline lands captures starts a lake in an empty directory; one that lands nothing there
    (a lake's mount point not mounted) is refused, exit 4, where it said "no flows", exit 0 (session 35)."""
    from tracepipe.errors import LakeError

    capture = REPO / "sample_data" / "story" / "netflow" / "opennebula-softflowd-ipfix.pcap"
    drop = tmp_path / "drop"
    drop.mkdir()
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(pipeline_text(tmp_path / "reports", f'[inputs]\nflow_dirs = ["{drop}"]\n'))
    since = dt.datetime(2025, 6, 17, 6, tzinfo=dt.UTC)
    window = (since, since + dt.timedelta(hours=1))
    (tmp_path / "empty").mkdir()
    (tmp_path / "new").mkdir()
    with pytest.raises(LakeError, match="not a tracepipe lake"):
        run_sweep(Lake(tmp_path / "empty"), pipeline, *window)
    shutil.copy(capture, drop)
    result = run_sweep(Lake(tmp_path / "new"), pipeline, *window)
    assert result.exit_code == EXIT_OK and result.flows > 0 and (tmp_path / "new" / "flows").is_dir()


BAD_PIPELINES = [
    (
        '[pipeline]\nname = "x"\n\n[detectors.beacon]\nmin_scroe = 0.5\n',
        5,
        "detectors.beacon.min_scroe",
        "unknown key",
    ),
    (
        '[pipeline]\nname = "x"\n[detectors.horizontal_scan]\n# comment\nmin_hosts = "many"\n',
        5,
        "detectors.horizontal_scan.min_hosts",
        "expected integer",
    ),
    ('[window]\nlast = "1 fortnight"\n', 2, "window.last", "not a duration"),
    (
        '[pipeline]\nlocal_networks = ["10.0.0.0/8", "10.300.0.0/16"]\n',
        2,
        "pipeline.local_networks",
        "not an address or CIDR",
    ),
    ('[pipeline]\nname = "x"\n[detectorz]\nfoo = 1\n', 3, "detectorz", "unknown key"),
    ('[model]\nenabled = "yes"\n', 2, "model.enabled", "expected true/false"),
    # a review: 0.5 was floored to a zero window (ZeroDivisionError, exit 4)
    ("[detectors.long_connection]\nwindow = 0.5\n", 2, "detectors.long_connection.window", "must be >= 1"),
    ('[detectors.beacon]\nwindow = "90.5s"\n', 2, "detectors.beacon.window", "no whole number of seconds"),
    # a pipeline author's review (session 38): each of these was accepted, or an internal error, or its line the
    # [allowlist] header's. A misspelt detector in an entry suppressed nothing and said nothing
    (
        '[allowlist]\n[[allowlist.entries]]\nreason = "r"\ncidrs = ["10.0.0.1"]\ndetectors = ["horizontal-scan"]\n',
        5,
        "allowlist.entries[0].detectors",
        "unknown detector 'horizontal-scan'",
    ),
    (
        '[allowlist]\n[[allowlist.entries]]\nreason = "r"\ncidrs = ["10.0.0.1"]\n\n'
        '[[allowlist.entries]]\nreason = "s"\ncidrs = ["10.0.0.2"]\nports = [70000]\n',
        9,
        "allowlist.entries[1].ports",
        "out of range",
    ),
    (
        '[[science_peers]]\nname = "x"\nreason = "r"\nprefix = ["192.0.2.0/24"]\n',
        4,
        "science_peers[0].prefix",
        "unknown key",
    ),
    ('[allowlist]\naddresses = ["10.20.1.300"]\n', 2, "allowlist.addresses", "not an address or CIDR"),
    ("[output]\nmax_evidence_rows = 99999999999999999999\n", 2, "output.max_evidence_rows", "out of range"),
    (
        "[detectors.beacon]\nshared_service_hosts = 1\n",
        2,
        "detectors.beacon.shared_service_hosts",
        "0 (off) or",
    ),
]


@pytest.mark.parametrize(("text", "line", "key", "what"), BAD_PIPELINES)
def test_bad_pipeline_names_key_and_line(tmp_path, text, line, key, what):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PipelineError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert f"line {line}:" in message and key in message and what in message
    assert info.value.exit_code == 2


def test_pipeline_files_as_authors_write_them(tmp_path):
    """A pipeline author's review (session 38): an empty file (a truncated deploy) ran every detector on the
    code's defaults; a TOML date as `expires` was a type error; a science peers file's other settings were
    dropped in silence, and a FIFO or /dev/zero as that file hung or exhausted the sweep."""
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing but a comment\n")
    with pytest.raises(PipelineError, match="holds no setting"):
        load_pipeline(empty)
    dated = parse_pipeline(
        '[allowlist]\n[[allowlist.entries]]\nreason = "r"\ncidrs = ["10.0.0.1"]\nexpires = 2026-12-31\n'
    )
    assert dated.allowlist.entries[0].expires == "2026-12-31"
    peers = tmp_path / "peers.toml"
    peers.write_text(
        '[[science_peers]]\nname = "L"\nreason = "r"\nprefixes = ["192.0.2.0/24"]\n[detectors.horizontal_scan]\nmin_hosts = 5000\n'
    )
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[pipeline]\nscience_peers_file = "peers.toml"\n')
    with pytest.raises(PipelineError, match=r"science_peers\]\] entries only, not detectors"):
        load_pipeline(pipeline)
    peers.write_text('[[science_peers]]\nname = "L"\nreason = "r"\nprefixes = ["192.0.2.0/24"]\n')
    loaded = load_pipeline(pipeline)
    assert [p.name for p in loaded.science_peers] == ["L"] and len(loaded.digest) == 64
    peers.unlink()
    os.mkfifo(peers)
    with pytest.raises(PipelineError, match="not a regular file"):
        load_pipeline(pipeline)


def test_the_report_says_which_file_and_settings_made_it(story_lake, tmp_path):
    """Two files both named `nightly` (the template, a tuned copy) made reports nothing told apart."""
    lake, story, _ = story_lake
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "notes.txt").write_text("not a capture")
    pipeline = tmp_path / "p.toml"
    tuned = f'[inputs]\nflow_dirs = ["{drop}", "{tmp_path / "gone"}"]\nflow_pattern = "*.pacp"\n'
    tuned += "[detectors.horizontal_scan]\nmin_hosts = 2000\n"
    pipeline.write_text(pipeline_text(tmp_path, tuned))
    result = run_sweep(lake, pipeline, story.start, story.start + dt.timedelta(hours=1))
    report = json.loads(result.report_paths["json"].read_text())
    assert report["summary"]["pipeline_file"] == str(pipeline)
    assert report["summary"]["pipeline_sha256"] == hashlib.sha256(pipeline.read_bytes()).hexdigest()
    assert report["settings"]["detectors"]["horizontal_scan"]["min_hosts"] == 2000
    assert report["settings"]["detectors"]["brute_force"]["min_attempts"] == 60  # (a default, recorded too)
    # the drop folders: the one a pattern typo matched nothing in, the one that is not there, both named
    assert any(f"drop folder {drop}: 1 file(s), none matching '*.pacp'" in n for n in result.notes)
    assert any(f"drop folder {tmp_path / 'gone'} does not exist" in n for n in result.notes)
    assert result.exit_code == EXIT_PARTIAL


def test_toml_syntax_error_names_line():
    with pytest.raises(PipelineError, match=r"line 2"):
        parse_pipeline('[pipeline]\nname = "unterminated\n')


def test_cli_bad_pipeline_exits_2_with_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[pipeline]\nname = "x"\nlocal_network = ["10.0.0.0/8"]\n')
    proc = subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", "sweep", str(path), "--lake", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "line 3" in proc.stderr and "pipeline.local_network" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_sweep_json_summary_and_codes(story_lake, tmp_path):
    lake, story, pipeline = story_lake
    since, until = story.last_day
    cmd = [
        sys.executable,
        "-m",
        "tracepipe.cli",
        "sweep",
        str(pipeline),
        "--since",
        since.isoformat(),
        "--until",
        until.isoformat(),
        "--lake",
        str(lake.root),
        "--format",
        "json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    summary = json.loads(proc.stdout)
    assert proc.returncode == summary["exit_code"]
    assert summary["alerts"] >= 8 and summary["flows"] > 0  # every planted kind but intel (none imported)
    empty_cmd = [
        *cmd[:5],
        "--since",
        "2020-01-01T00:00",
        "--until",
        "2020-01-01T01:00",
        "--lake",
        str(lake.root),
    ]
    empty = subprocess.run(empty_cmd, capture_output=True, text=True, timeout=60)
    assert empty.returncode == 0
    assert "no flows between 2020-01-01 00:00 and 2020-01-01 01:00 UTC" in empty.stdout.replace("\n", " ")


def test_default_windows():
    now = dt.datetime(2025, 6, 18, 13, 7, tzinfo=dt.UTC)
    hourly = load_pipeline(REPO / "pipelines" / "hourly.toml")
    nightly = load_pipeline(REPO / "pipelines" / "nightly.toml")
    retro = load_pipeline(REPO / "pipelines" / "retro-hunt.toml")
    assert sweep_window(hourly, None, None, now) == (now.replace(hour=12, minute=0), now.replace(minute=0))
    day = now.replace(hour=0, minute=0)
    assert sweep_window(nightly, None, None, now) == (day - dt.timedelta(days=1), day)
    assert sweep_window(retro, None, None, now) == (day - dt.timedelta(days=30), day)
    assert retro.detectors.intel.enabled and not retro.detectors.beacon.enabled


def _story_pipeline(tmp_path: Path, flows_dir: Path, vm_dir: Path):
    config = load_pipeline(REPO / "pipelines" / "nightly.toml")
    return dataclasses.replace(
        config,
        inputs=dataclasses.replace(config.inputs, flow_dirs=[str(flows_dir)], vm_dirs=[str(vm_dir)]),
        output=dataclasses.replace(config.output, report_dir=str(tmp_path / "reports"), html=False),
        model=dataclasses.replace(config.model, enabled=False),
    )


def _check_story(result, truth: dict, also: frozenset[tuple[str, str]] = frozenset()) -> None:
    alerts = result.alerts.to_pylist()
    for incident in truth["incidents"]:
        detector = KIND[incident["kind"]]
        hits = [a for a in alerts if a["addr"] == incident["addr"] and a["detector"] == detector]
        assert hits, (
            f"{incident['kind']} on {incident['addr']} not found: {[(a['detector'], a['addr']) for a in alerts]}"
        )
        assert hits[0]["vm_name"] == incident["vm_name"]
        assert hits[0]["user"] == incident["user"]
        assert hits[0]["project"] == incident["project"]
    ordinary = set(truth["ordinary_addrs"])
    assert [(a["detector"], a["addr"]) for a in alerts if a["addr"] in ordinary] == []
    explained = {(i["addr"], KIND[i["kind"]]) for i in truth["incidents"]}
    explained |= {(i["addr"], "intel") for i in truth["incidents"] if i.get("intel_match")}
    assert {(a["addr"], a["detector"]) for a in alerts} <= explained | also


def _window(truth: dict) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.fromisoformat(truth["window"]["start"].replace("Z", "+00:00"))
    return start, start + dt.timedelta(hours=5)


def test_end_to_end_on_the_softflowd_story(tmp_path):
    """The committed story: real softflowd NetFlow v9 + IPFIX captures and Nova/Neutron/OpenNebula records,
    landed by the sweep from its drop folders."""
    truth = json.loads((STORY / "ground_truth.json").read_text())
    flows_dir, vm_dir = tmp_path / "drop-flows", tmp_path / "drop-vm"
    shutil.copytree(STORY / "netflow", flows_dir)
    vm_dir.mkdir()
    for sub in ("nova", "neutron", "opennebula"):
        for path in (STORY / sub).iterdir():
            shutil.copy(path, vm_dir / path.name)
    lake = Lake(tmp_path / "lake")
    from tracepipe.intel import import_intel

    assert import_intel(lake, STORY / "intel" / "misp.csv").rows >= 1
    result = run_sweep(lake, _story_pipeline(tmp_path, flows_dir, vm_dir), *_window(truth))
    assert result.exit_code == EXIT_FOUND
    assert result.ingest["flows"]["flows"] > 10000
    _check_story(result, truth)
    scan = next(a for a in result.alerts.to_pylist() if a["detector"] == "horizontal_scan")
    assert scan["vm_name"] == "jupyter-07"  # its address went to another VM later the same day
    assert scan["vm_status"] == "deleted"
    exfil = next(a for a in result.alerts.to_pylist() if a["detector"] == "exfiltration")
    assert exfil["vm_status"] == "soft_deleted"  # quarantine_until needs the reclaim interval (ingest vm)
    assert (
        run_sweep(lake, _story_pipeline(tmp_path, flows_dir, vm_dir), *_window(truth)).new_alerts.num_rows
        == 0
    )


def _plant_more(story: stories.CloudStory) -> None:
    """Add the kinds the cloud story lacks (vertical scan, inbound RDP brute force, a long-lived connection) to
    three ordinary VMs, as planned connections that go through softflowd like the rest."""
    t0 = story.start.timestamp()
    rng = np.random.default_rng(story.seed + 1000)
    busy = {"10.20.1.10", *story.truth["brute_force_tries"]}
    picks = [a for a in story.truth["ordinary_addrs"] if ":" not in a and a not in busy][:3]
    vscan, rdp, tunnel = picks
    ports = np.arange(1, 1201)
    extra = [  # t0, dur, src, dst, sport, dport, proto, kind, pk_f, pk_r, by_f, by_r
        (
            t0 + 3 * 3600 + np.sort(rng.uniform(0, 300, len(ports))),
            0.0,
            vscan,
            "203.0.113.99",
            41234,
            ports,
            6,
            stories.TCP_SYN_RST,
            1,
            1,
            0,
            0,
        ),
        (
            t0 + 7800 + np.sort(rng.uniform(0, 2400, 300)),
            rng.uniform(1, 3, 300),
            "198.51.100.66",
            rdp,
            rng.integers(32768, 60999, 300),
            3389,
            6,
            stories.TCP_FULL,
            8,
            8,
            rng.integers(1200, 2000, 300),
            rng.integers(2000, 4000, 300),
        ),
        (
            np.array([t0 + 600]),
            3.5 * 3600,
            tunnel,
            "91.198.174.192",
            45678,
            8443,
            6,
            stories.TCP_FULL,
            1500,
            1500,
            2_000_000,
            6_000_000,
        ),
    ]
    conns = {k: [v] for k, v in story.conns.items()}
    for row in extra:
        n = len(row[0])
        for key, value in zip(
            ("t0", "dur", "src", "dst", "sport", "dport", "proto", "kind", "pk_f", "pk_r", "by_f", "by_r"),
            row,
            strict=True,
        ):
            arr = np.asarray(value)
            arr = np.repeat(arr, n) if arr.ndim == 0 else arr
            conns[key].append(arr.astype(story.conns[key].dtype))
    merged = {k: np.concatenate(v) for k, v in conns.items()}
    order = np.argsort(merged["t0"], kind="stable")
    story.conns.update({k: v[order] for k, v in merged.items()})
    vms = {vm.addr: vm for vm in story.vms}
    for kind, addr in (("vertical_scan", vscan), ("rdp_bruteforce", rdp), ("long_connection", tunnel)):
        vm = vms[addr]
        story.truth["incidents"].append(
            {"kind": kind, "addr": addr, "vm_name": vm.name, "user": vm.user, "project": vm.project}
        )
    story.truth["ordinary_addrs"] = [a for a in story.truth["ordinary_addrs"] if a not in picks]


def test_every_detector_kind_through_live_softflowd(tmp_path):
    """One of each detector's kind among ordinary VMs, on a story seed the thresholds were not tuned on, turned
    into packets, exported by the real softflowd (v9 and IPFIX), landed and swept from drop folders."""
    story = stories.build_story(seed=41, n_ordinary=35)
    _plant_more(story)
    flows_dir, vm_dir = tmp_path / "flows", tmp_path / "vm"
    flows_dir.mkdir()
    vm_dir.mkdir()
    for probe, version in (("openstack", 9), ("opennebula", 10)):
        traffic = stories.write_traffic_pcap(story, tmp_path / f"traffic-{probe}.pcap", probe)
        stories.export_netflow(traffic, version, flows_dir / f"{probe}.pcap")
    templates = REPO / "sample_data" / "templates"
    (vm_dir / "nova.jsonl").write_text(
        "\n".join(stories.nova_notifications(story, templates / "nova")) + "\n"
    )
    (vm_dir / "neutron.jsonl").write_text(
        "\n".join(stories.neutron_notifications(story, templates / "neutron")) + "\n"
    )
    for name, text in stories.opennebula_records(story).items():
        (vm_dir / name).write_text(text)
    (tmp_path / "misp.csv").write_text(stories.misp_csv(story))
    lake = Lake(tmp_path / "lake")
    from tracepipe.intel import import_intel

    import_intel(lake, tmp_path / "misp.csv")
    config = _story_pipeline(tmp_path, flows_dir, vm_dir)
    # the story is 4 h long: a "long" connection here is 3 h (a threshold of the pipeline file, not of the code)
    config = dataclasses.replace(
        config,
        detectors=dataclasses.replace(
            config.detectors,
            long_connection=dataclasses.replace(config.detectors.long_connection, min_duration=3 * 3600),
        ),
    )
    result = run_sweep(lake, config, *_window(story.truth))
    # at 3 h, the miner's 3 h 50 min pool session is a long connection as well
    _check_story(result, story.truth, also=frozenset({("10.40.0.12", "long_connection")}))
    assert {a["detector"] for a in result.alerts.to_pylist()} == {
        "horizontal_scan",
        "vertical_scan",
        "brute_force",
        "beacon",
        "exfiltration",
        "long_connection",
        "mining",
        "intel",
    }


def test_unknown_engine_is_a_usage_error(story_lake):
    lake, story, pipeline = story_lake
    from tracepipe.errors import UsageError

    with pytest.raises(UsageError, match="engine 'bogus'"):
        run_sweep(lake, pipeline, *story.last_day, engine="bogus")


def test_unwritable_report_dir_is_exit_4_and_alerts_stay(story_lake, tmp_path):
    lake, story, _ = story_lake
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the report folder should be")
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(pipeline_text(blocker / "reports"))
    from tracepipe.errors import LakeError

    good = tmp_path / "good.toml"
    good.write_text(pipeline_text(tmp_path / "reports"))
    run_sweep(lake, good, *story.last_day)  # (the alerts of that window, whichever tests ran before here)
    before = lake.read("alerts").num_rows
    with pytest.raises(LakeError, match="cannot write the sweep report") as info:
        run_sweep(lake, pipeline, *story.last_day)
    assert info.value.exit_code == EXIT_FAILED
    assert lake.read("alerts").num_rows == before > 0


def test_a_report_that_fails_inside_keeps_the_summary_and_exit_code(story_lake, tmp_path, monkeypatch):
    # hostile review: the HTML report raised a chart library's ValueError (a sum of forged counters past
    # 2^64) after the alerts were written: the sweep ended "internal error", exit 4, with no summary. A
    # report that cannot be made is a note; the JSON report, the alerts and the exit code stand
    import tracepipe.report

    def broken(*args, **kwargs):
        raise ValueError("integer 19999999999999999980 as u128")

    monkeypatch.setattr(tracepipe.report, "render_report", broken)
    lake, story, _ = story_lake
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(pipeline_text(tmp_path / "reports").replace("html = false", "html = true"))
    result = run_sweep(lake, pipeline, *story.last_day)
    assert result.exit_code in (EXIT_OK, EXIT_FOUND)
    assert any("HTML report failed: internal error (ValueError: integer" in n for n in result.notes)
    assert result.report_paths["json"].is_file()


def test_a_report_the_disk_had_no_room_for_is_said_on_stderr_in_json_mode_too(
    story_lake, tmp_path, monkeypatch
):
    """A full disk for the HTML report: exit 1 (the alerts landed) with nothing on stderr under --format json,
    only a note inside the JSON a cron job files away (failure-injection review, session 38)."""
    from conftest import run_in_process

    import tracepipe.report

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracepipe.report, "render_report", full)
    lake, story, _ = story_lake
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(pipeline_text(tmp_path / "reports").replace("html = false", "html = true"))
    since, until = (t.isoformat() for t in story.last_day)
    run = run_in_process(
        "sweep",
        str(pipeline),
        "--since",
        since,
        "--until",
        until,
        "--lake",
        str(lake.root),
        "--format",
        "json",
    )
    assert run.returncode in (EXIT_OK, EXIT_FOUND)
    assert "warning: HTML report failed" in run.stderr and "No space left" in run.stderr
    assert json.loads(run.stdout)["exit_code"] == run.returncode


def test_two_sweeps_at_once_write_each_alert_once(tmp_path, monkeypatch):
    """An ops review: two sweeps of overlapping windows started together (a catch-up loop, the hourly and nightly
    timers at once) each found the other's alerts unknown and both wrote them (47 rows, 45 ids). Here both are
    held right after their look-up of known ids until the other is there too (or 3 s): without the lock from
    look-up to commit, both write the alerts they share."""
    import threading

    from tracepipe import sweep as sweep_module

    # a lake of its own, never swept (a copy of the module's, swept by the tests before, holds in its manifest
    # the append keys of their alerts: an identical set of new alerts is then taken for landed already)
    lake, story, pipeline = gen.story_lake(tmp_path / "fresh")
    copy = lake.root
    since, until = story.last_day
    barrier = threading.Barrier(2, timeout=3)
    looked_up = sweep_module.known_alert_ids

    def held(writer, alerts):
        known = looked_up(writer, alerts)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:  # (the other waits for the lock: go on)
            pass
        return known

    monkeypatch.setattr(sweep_module, "known_alert_ids", held)
    results: list = []
    windows = [(since, since + dt.timedelta(hours=12)), (since, until)]
    threads = [
        threading.Thread(target=lambda w=w: results.append(run_sweep(Lake(copy), pipeline, *w)))
        for w in windows
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 2
    ids = Lake(copy).read("alerts").column("alert_id").to_pylist()
    shared = {a["alert_id"] for a in results[0].alerts.to_pylist()} & {
        a["alert_id"] for a in results[1].alerts.to_pylist()
    }
    assert shared and len(ids) == len(set(ids))
    assert sum(r.new_alerts.num_rows for r in results) == len(ids)  # each said new once, by one of them


def test_a_sweep_stopped_before_its_report_says_its_alerts_at_the_rerun(tmp_path, monkeypatch):
    """An ops review: a sweep killed right after its alerts were committed wrote no report, and its rerun found
    them known ("0 new", exit 0): whatever acts on exit 1 or the report never heard of them. The report now
    comes first: stopped before it, the alerts are not saved and the rerun says them (at least once)."""
    from tracepipe import sweep as sweep_module

    # a lake of its own, never swept (a copy of the module's, swept by the tests before, holds in its manifest
    # the append keys of their alerts: an identical set of new alerts is then taken for landed already)
    lake, story, pipeline = gen.story_lake(tmp_path / "fresh")
    copy = lake.root
    since, until = story.last_day

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patched:
        patched.setattr(sweep_module, "write_reports", killed)
        with pytest.raises(Killed):
            run_sweep(Lake(copy), pipeline, since, until)
    rerun = run_sweep(Lake(copy), pipeline, since, until)
    assert rerun.exit_code == EXIT_FOUND and rerun.new_alerts.num_rows > 0
    report = json.loads(rerun.report_paths["json"].read_text())
    assert report["summary"]["new_alerts"] == rerun.new_alerts.num_rows


def test_a_file_of_no_known_format_in_a_vm_drop_folder_does_not_stop_the_sweep(tmp_path):
    # hostile review: a README (or any file whose format cannot be told) in a vm_dirs folder stopped every sweep
    # ("cannot tell the format", exit 2, no detection, no report): the sweep listed the folder's files and
    # ingest took them for files the user named
    from tracepipe.sweep import ingest_inputs

    vm_dir = tmp_path / "drop-vm"
    vm_dir.mkdir()
    shutil.copy(STORY / "nova" / "notifications.jsonl", vm_dir / "notifications.jsonl")
    (vm_dir / "README").write_text("hello\n")
    config = _story_pipeline(tmp_path, tmp_path / "no-flows", vm_dir)
    config = dataclasses.replace(config, inputs=dataclasses.replace(config.inputs, flow_dirs=[]))
    summary, partial = ingest_inputs(Lake(tmp_path / "lake"), config)
    assert partial and summary["vm"]["rows"] > 0
    assert [Path(n["source"]).name for n in summary["vm"]["not_read"]] == ["README"]
    assert "cannot tell the format" in summary["vm"]["not_read"][0]["why"]


def test_the_summarys_top_alerts_break_score_ties_by_id_whatever_the_row_order():
    # Spark review: alerts of equal score came out in another order per engine (the rows are equal, the list
    # "strongest first" was not)
    from tracepipe.schema import ALERTS
    from tracepipe.sweep import SweepResult

    start = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    rows = [
        {"alert_id": i, "detector": "beacon", "window_start": start, "window_end": start, "addr": f"10.0.0.{n}",
         "score": 1.0, "created_at": start}
        for n, i in enumerate(["c3", "a1", "b2"])
    ]  # fmt: skip
    tops = []
    for order in (rows, rows[::-1]):
        result = SweepResult("t", start, start)
        result.new_alerts = pa.Table.from_pylist(order, schema=ALERTS)
        tops.append([t["addr"] for t in result.summary()["top"]])
    assert tops[0] == tops[1] == ["10.0.0.1", "10.0.0.2", "10.0.0.0"]


def test_sweep_check_reads_the_file_only(tmp_path):
    """A detection engineer's CI for pipeline files (review, session 38): `sweep --check` prints the settings in
    force, defaults included, touching no lake; a mistake is exit 2 naming the key and line."""
    from conftest import run_in_process

    good = tmp_path / "good.toml"
    good.write_text('[pipeline]\nname = "site"\n[detectors.horizontal_scan]\nmin_hosts = 2000\n')
    run = run_in_process("sweep", str(good), "--check", "--format", "json", "--lake", str(tmp_path / "lake"))
    assert run.returncode == 0, run.stderr
    checked = json.loads(run.stdout)
    assert checked["settings"]["detectors"]["horizontal_scan"]["min_hosts"] == 2000
    assert checked["settings"]["detectors"]["brute_force"]["min_attempts"] == 60
    assert checked["pipeline_sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert not (tmp_path / "lake").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text('[pipeline]\nname = "site"\n[detectors.beacon]\nmin_scroe = 1\n')
    run = run_in_process("sweep", str(bad), "--check")
    assert run.returncode == 2 and "line 4" in run.stderr and "min_scroe" in run.stderr
