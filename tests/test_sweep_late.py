"""Flows that land after their window was swept (a probe exporting a connection when it ends: softflowd's
default lifetime is a week; a collector's backlog after an outage; a capture ingested late). Before session 38
no scheduled sweep ever read them: detectors read flows by their start, and the window of that start had been
swept. Now a scheduled run sweeps again the earlier windows that rows landed in since the pipeline's last
scheduled run (by commit and source: attribution and compaction rewrite files of rows read before, which are
not late)."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest
from support import stories as gen

from tracepipe.lake import Lake
from tracepipe.pipeline_config import load_pipeline, parse_pipeline
from tracepipe.sweep import late_state_path, run_sweep

PIPELINE = (
    f'[pipeline]\nname = "late-test"\nlocal_networks = {json.dumps(gen.LOCAL_NETWORKS)}\n'
    '[window]\nlast = "1h"\nbaseline = "1h"\n'
    "[detectors.beacon]\nenabled = false\n[detectors.exfiltration]\nenabled = false\n"
    "[detectors.mining]\nenabled = false\n[detectors.intel]\nenabled = false\n"
    "[detectors.long_connection]\nenabled = false\n[model]\nenabled = false\n"
)
SECOND = 1_000_000


def _scan(f: gen._Flows, host: str, at: int) -> None:
    """A horizontal scan of port 23 over 150 outside hosts within one hour, nothing answering."""
    targets = [f"198.18.9.{i + 1}" for i in range(150)]
    ts = at + np.arange(150) * 10 * SECOND
    f.add(ts, 0, f.idx(host)[0], f.idx(targets), 40000 + np.arange(150), 23, 6, 1, 60, 2)


@pytest.fixture()
def lake_and_day(tmp_path):
    story = gen.generate(seed=11)
    lake = Lake(tmp_path / "lake")
    lake.append("flows", story.flows, key="story")
    lake.replace_dataset("vm_leases", story.leases)
    return lake, story.last_day[0], sorted(story.ordinary())[5]


def _scheduled(lake: Lake, config, now: dt.datetime):
    return run_sweep(lake, config, now=now, write=True)


def _scans(alerts) -> list[tuple[str, dt.datetime]]:
    return [(r["addr"], r["window_start"]) for r in alerts.to_pylist() if r["detector"] == "horizontal_scan"]


def test_a_scan_that_lands_after_its_hour_was_swept_is_found_by_the_next_scheduled_run(
    lake_and_day, tmp_path
):
    lake, day, host = lake_and_day
    config = parse_pipeline(PIPELINE + f'[output]\nreport_dir = "{tmp_path / "reports"}"\n')
    first = _scheduled(lake, config, day + dt.timedelta(hours=5, minutes=5))  # sweeps 04:00-05:00
    assert first.late == [] and (host, day + dt.timedelta(hours=2)) not in _scans(first.alerts)
    # the scan of 02:00-03:00 lands now (its probe's records came late)
    f = gen._Flows([])
    _scan(f, host, int((day + dt.timedelta(hours=2, minutes=10)).timestamp() * SECOND))
    lake.append("flows", f.table(), key="late-scan")
    second = _scheduled(lake, config, day + dt.timedelta(hours=6, minutes=5))  # sweeps 05:00-06:00
    scan_hour = day + dt.timedelta(hours=2)
    assert [w["since"] for w in second.late] == [scan_hour.isoformat()]
    assert second.late[0]["late_flows"] == 150
    assert (host, scan_hour) in _scans(second.new_alerts)
    assert second.exit_code == 1 and "swept again for 150 flows that landed late" in second.message
    # its report names the late window: a rerun of its own window (no late flows any more) keeps it
    assert second.report_paths["json"].name.endswith(f"-late-{scan_hour:%Y%m%dT%H%M}.json")
    rerun = run_sweep(lake, config, day + dt.timedelta(hours=5), day + dt.timedelta(hours=6), write=True)
    assert rerun.report_paths["json"] != second.report_paths["json"] and second.report_paths["json"].is_file()
    # found once: the next run has nothing late, and a rerun of that hour knows the alert
    third = _scheduled(lake, config, day + dt.timedelta(hours=7, minutes=5))
    assert third.late == [] and (host, scan_hour) not in _scans(third.new_alerts)
    state = json.loads(late_state_path(lake, config).read_text())
    assert state["flows_version"] == lake.version("flows") and state["pending"] == {}


def test_rewritten_files_and_explicit_windows_are_not_late(lake_and_day, tmp_path):
    lake, day, host = lake_and_day
    config = parse_pipeline(PIPELINE + f'[output]\nreport_dir = "{tmp_path / "reports"}"\n')
    _scheduled(lake, config, day + dt.timedelta(hours=5, minutes=5))
    version = lake.version("flows")
    # attribution rewrites every file of the day (rows read before): nothing landed
    lake.rewrite("flows", None, lambda batch: batch, info={"operation": "attribute"})
    assert lake.version("flows") > version
    assert lake.landed_since("flows", version) == ([], [], {})
    again = _scheduled(lake, config, day + dt.timedelta(hours=6, minutes=5))
    assert again.late == []
    # a late landing, then a rewrite of its file: the rows are still found, by their source
    f = gen._Flows([])
    _scan(f, host, int((day + dt.timedelta(hours=1, minutes=10)).timestamp() * SECOND))
    version = lake.version("flows")
    late = f.table()
    # (as every reader writes it: the rows' source is the ingest's)
    late = late.set_column(
        late.schema.get_field_index("source"), "source", pa.array(["append:late"] * len(late))
    )
    lake.append("flows", late, key="late")
    lake.rewrite("flows", None, lambda batch: batch, info={"operation": "attribute"})
    direct, carried, sources = lake.landed_since("flows", version)
    assert set(sources) == {"append:late"} and direct == [] and carried
    # an explicit window (a backfill, an analyst's rerun) neither sweeps late windows nor moves the mark
    explicit = run_sweep(lake, config, day + dt.timedelta(hours=6), day + dt.timedelta(hours=7), write=True)
    assert explicit.late == []
    scheduled = _scheduled(lake, config, day + dt.timedelta(hours=7, minutes=5))
    assert [w["since"] for w in scheduled.late] == [(day + dt.timedelta(hours=1)).isoformat()]
    assert (host, day + dt.timedelta(hours=1)) in _scans(scheduled.new_alerts)


def test_late_windows_are_bounded_per_run_and_the_rest_wait(lake_and_day, tmp_path):
    lake, day, host = lake_and_day
    config = parse_pipeline(
        PIPELINE.replace('baseline = "1h"\n', 'baseline = "1h"\nlate_windows = 2\n')
        + f'[output]\nreport_dir = "{tmp_path / "reports"}"\n'
    )
    _scheduled(lake, config, day + dt.timedelta(hours=8, minutes=5))
    f = gen._Flows([])
    for hour in (1, 3, 5):  # three late scans, in three hours
        _scan(f, host, int((day + dt.timedelta(hours=hour, minutes=10)).timestamp() * SECOND))
    lake.append("flows", f.table(), key="late-scans")
    second = _scheduled(lake, config, day + dt.timedelta(hours=9, minutes=5))
    # the oldest and the newest now, the one between left for the next run
    assert [w["since"][11:16] for w in second.late] == ["01:00", "05:00"]
    assert second.late_pending == 1 and any("left for the next runs" in n for n in second.notes)
    # meanwhile a flood of new late windows (one record an hour, as forged datagrams can): the waiting one is
    # still swept next, not kept waiting behind them until it ages out (newest first did that: a review)
    flood = gen._Flows([])
    flood.add(
        [int((day + dt.timedelta(hours=h, minutes=1)).timestamp() * SECOND) for h in (6, 7, 8)],
        0,
        flood.idx("10.10.1.200")[0],
        flood.idx("198.18.9.1")[0],
        40000,
        23,
        6,
        1,
        60,
        2,
    )
    lake.append("flows", flood.table(), key="flood")
    third = _scheduled(lake, config, day + dt.timedelta(hours=10, minutes=5))
    assert [w["since"][11:16] for w in third.late] == ["03:00", "08:00"] and third.late_pending == 2
    assert third.late[0]["since"][11:16] == "03:00" and third.late[0]["late_flows"] == 150
    assert (host, day + dt.timedelta(hours=3)) in _scans(third.new_alerts)


def test_a_planted_state_file_is_a_note_not_a_failure(lake_and_day, tmp_path):
    lake, day, _host = lake_and_day
    config = parse_pipeline(PIPELINE + f'[output]\nreport_dir = "{tmp_path / "reports"}"\n')
    state = late_state_path(lake, config)
    state.parent.mkdir(parents=True)
    for planted in (
        '{"flows_version": "x"}',
        "[1, 2",
        '{"flows_version": 0, "pending": ["never"]}',
        '{"flows_version": 0, "pending": {"2026-03-11T01:00:00+00:00": 1e400}}',
    ):
        state.write_text(planted)
        result = _scheduled(lake, config, day + dt.timedelta(hours=5, minutes=5))
        assert result.exit_code in (0, 1) and any("not a late-flow state" in n for n in result.notes)
        assert json.loads(state.read_text())["flows_version"] == lake.version("flows")


def test_a_connection_exported_when_it_ended_is_found_by_the_next_nightly_sweep(
    lake_and_day, tmp_path, monkeypatch
):
    """The case of the brief: a C2 session exported once, at its end (softflowd's default lifetime is a week),
    after the nightly sweep of the day it began. The stock nightly template, run as cron runs it."""
    lake, day, host = lake_and_day
    monkeypatch.chdir(tmp_path)
    config = load_pipeline(None)  # the packaged nightly template
    first = _scheduled(lake, config, day + dt.timedelta(hours=2, minutes=30))  # sweeps the day before
    began = day - dt.timedelta(hours=4)  # 20:00 the day before, for 14 h
    f = gen._Flows([])
    start = int(began.timestamp() * SECOND)
    f.add(
        [start],
        14 * 3600 * SECOND,
        f.idx(host)[0],
        f.idx("198.51.100.9")[0],
        45123,
        4444,
        6,
        9000,
        4_000_000,
        27,
    )
    f.add(
        [start + 500],
        14 * 3600 * SECOND,
        f.idx("198.51.100.9")[0],
        f.idx(host)[0],
        4444,
        45123,
        6,
        9000,
        900_000,
        27,
    )
    lake.append("flows", f.table(), key="exported-at-its-end")
    second = _scheduled(lake, config, day + dt.timedelta(days=1, hours=2, minutes=30))  # sweeps `day`
    assert [w["since"] for w in second.late] == [(day - dt.timedelta(days=1)).isoformat()]
    found = [
        a for a in second.new_alerts.to_pylist() if a["detector"] == "long_connection" and a["addr"] == host
    ]
    assert (
        found
        and found[0]["peer"] == "198.51.100.9"
        and not any(
            a["detector"] == "long_connection" and a["addr"] == host for a in first.alerts.to_pylist()
        )
    )


def test_a_path_ingested_again_does_not_make_its_earlier_rows_late(lake_and_day, tmp_path):
    """A capture ring (tcpdump -G -W) or a wiped spool reuses names: rows of the first file of a name, merged by
    compaction with the second's, were taken for late ones and their windows swept again (a review)."""
    from tracepipe.lake import hash_bytes, ingest_table

    lake, day, host = lake_and_day
    config = parse_pipeline(PIPELINE + f'[output]\nreport_dir = "{tmp_path / "reports"}"\n')

    def ring(hour: int, key: bytes) -> None:
        f = gen._Flows([])
        _scan(f, host, int((day + dt.timedelta(hours=hour, minutes=10)).timestamp() * SECOND))
        rows = f.table()
        rows = rows.set_column(
            rows.schema.get_field_index("source"), "source", pa.array(["ring.pcap"] * len(rows))
        )
        ingest_table(lake, "flows", "ring.pcap", hash_bytes(key), [rows])

    ring(2, b"first")
    _scheduled(lake, config, day + dt.timedelta(hours=5, minutes=5))  # reads the first
    ring(5, b"second")  # the same name again, flows of the window to come
    lake.compact("flows", [day.date().isoformat()], min_files=2)
    direct, carried, ranges = lake.landed_since(
        "flows", json.loads(late_state_path(lake, config).read_text())["flows_version"]
    )
    assert direct == [] and carried and set(ranges) == {"ring.pcap"}
    second = _scheduled(lake, config, day + dt.timedelta(hours=6, minutes=5))
    assert second.late == []


def test_late_flows_that_add_a_target_do_not_make_a_second_brute_force_alert(lake_and_day, tmp_path):
    """An outbound brute force names its target when it has one, none when it has several: late attempts on a
    second target made the re-swept hour's alert another id, a second alert of one incident (a review)."""
    lake, day, host = lake_and_day
    config = parse_pipeline(PIPELINE + f'[output]\nreport_dir = "{tmp_path / "reports"}"\n')

    def attempts(target: str, at: dt.datetime, n: int, first_port: int) -> None:
        f = gen._Flows([])
        ts = int(at.timestamp() * SECOND) + np.arange(n) * 30 * SECOND
        f.add(
            ts, 3 * SECOND, f.idx(host)[0], f.idx(target)[0], first_port + np.arange(n), 22, 6, 10, 2000, 27
        )
        f.add(
            ts + 1000,
            3 * SECOND,
            f.idx(target)[0],
            f.idx(host)[0],
            22,
            first_port + np.arange(n),
            6,
            8,
            1500,
            27,
        )
        lake.append("flows", f.table(), key=f"{target}-{at}")

    def brute(alerts) -> list[tuple[str | None, dt.datetime]]:
        return [
            (a["peer"], a["window_start"])
            for a in alerts.to_pylist()
            if a["detector"] == "brute_force" and a["addr"] == host
        ]

    attempts("203.0.113.50", day + dt.timedelta(hours=3, minutes=2), 70, 30000)
    first = _scheduled(lake, config, day + dt.timedelta(hours=4, minutes=5))
    assert brute(first.new_alerts) == [("203.0.113.50", day + dt.timedelta(hours=3))]
    attempts("203.0.113.51", day + dt.timedelta(hours=3, minutes=40), 15, 35000)  # they land late
    second = _scheduled(lake, config, day + dt.timedelta(hours=5, minutes=5))
    assert [w["since"][11:16] for w in second.late] == ["03:00"]
    assert brute(second.alerts) == [(None, day + dt.timedelta(hours=3))]  # (now against 2 targets)
    assert brute(second.new_alerts) == []  # the incident alerted at 04:05, not a new one


def test_the_state_is_each_files_own_and_a_folder_planted_for_it_is_a_note(lake_and_day, tmp_path):
    """Two files of one name (the template, a tuned copy) shared one state: the second never saw the late flows
    the first had swept. A folder where the state goes ended every run with exit 2 after its alerts (a review);
    and a window of no flows of its own (fail_on_empty) hid late alerts behind exit 4."""
    lake, day, host = lake_and_day
    text = PIPELINE.replace('name = "late-test"', 'name = "late-test"\nfail_on_empty = true')
    text += f'[output]\nreport_dir = "{tmp_path / "reports"}"\n'
    one, two = (parse_pipeline(text, str(tmp_path / name)) for name in ("a.toml", "b.toml"))
    assert late_state_path(lake, one) != late_state_path(lake, two)
    for config in (one, two):
        _scheduled(lake, config, day + dt.timedelta(hours=5, minutes=5))
    f = gen._Flows([])
    _scan(f, host, int((day + dt.timedelta(hours=2, minutes=10)).timestamp() * SECOND))
    lake.append("flows", f.table(), key="late-scan")
    late_state_path(lake, two).unlink()
    late_state_path(lake, two).mkdir()
    # a window of the future's day, with no flows: only the late window has some
    empty = day + dt.timedelta(days=3, hours=1, minutes=5)
    found = _scheduled(lake, one, empty)
    assert found.flows == 0 and [w["since"][11:16] for w in found.late] == ["02:00"]
    assert found.exit_code == 1 and (host, day + dt.timedelta(hours=2)) in _scans(found.new_alerts)
    planted = _scheduled(lake, two, empty)  # (its state cannot be read nor written: said, not exit 2)
    assert planted.late == [] and planted.exit_code == 4  # (no flows in its window, fail_on_empty)
    assert any("not a late-flow state" in n for n in planted.notes)
    assert any("cannot record what this run read" in n for n in planted.notes)
