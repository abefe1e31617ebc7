"""Session-26 hostile review of `tracepipe trace`, the incident package and its exports (respond/): each test
names the finding it pins, runs on real Parquet through DuckDB (the demo story's lake, or a small lake built
here) and fails on the code before its fix."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from tests.conftest import run_in_process
from tracepipe.intel import parse_misp_csv
from tracepipe.lake import Lake
from tracepipe.respond.observations import _event_range, parse_csv, read_observations
from tracepipe.respond.trace import trace
from tracepipe.units import to_utc_range

UTC = dt.UTC
# render-node-2 (OpenNebula): the demo's miner, one flow 06:04:59 -> 09:55 to 203.0.113.50:3333
RENDER_NODE = "42"


def _ticket(tmp_path: Path, text: str, name: str = "ticket.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _trace(lake: Path, ticket: Path, **options: object):  # type: ignore[no-untyped-def]
    return trace(Lake(lake), read_observations(ticket), **options)  # type: ignore[arg-type]


# ---- 3: one strict line-by-line CSV reader -----------------------------------------------------------------------


QUOTE_CSV = (
    "address,port,peer,time,comment\n"
    '10.20.1.19,443,192.0.2.77,2025-06-17T07:00:00Z,"6"" screen, see ticket\n'
    "10.20.1.31,445,,2025-06-17T08:05:00Z,scan\n"
    "10.20.1.26,,,2025-06-17T08:45:00Z,exfil\n"
    "10.20.1.23,,,2025-06-17T07:12:00Z,brute\n"
)


def test_an_unclosed_quote_rejects_its_line_and_the_rest_is_answered(
    story_lake: Path, tmp_path: Path
) -> None:
    """Finding 3: csv.DictReader over the whole file read an unclosed quote as a cell running to the end:
    exit 0, 1 of 4 observations, no reject, and the one answer labelled "line 5" though it was line 2."""
    run = run_in_process(
        "trace", str(_ticket(tmp_path, QUOTE_CSV)), "--format", "json", "--lake", str(story_lake)
    )
    result = json.loads(run.stdout)
    assert run.returncode == 3
    assert [(o["ref"], o["address"]) for o in result["observations"]] == [
        ("line 3", "10.20.1.31"),
        ("line 4", "10.20.1.26"),
        ("line 5", "10.20.1.23"),
    ]
    assert [(r["ref"], r["reason"]) for r in result["rejects"]] == [
        ("line 2", "quoted cell not closed on its line")
    ]


def test_observation_lists_and_misp_csv_read_lines_alike() -> None:
    """Finding 3: one reader (limits.csv_lines) for both: the same bad lines are the same rejects."""
    bad = ['"10.0.0.1,x', '"10.0.0.2"x,y', "10.0.0.3," + "A" * 200_000]
    observations = "address,time\n" + "\n".join(f"{b},2025-06-17T08:00:00Z" for b in bad) + "\n"
    misp = "uuid,type,value\n" + "\n".join(f"u{i},ip-dst,{b}" for i, b in enumerate(bad)) + "\n"
    _, obs_rejects, _ = parse_csv(observations)
    _, misp_rejects, _ = parse_misp_csv(misp)
    reasons = ["quoted cell not closed on its line", "not a CSV line", "not a CSV line"]
    assert [(r["ref"], r["reason"]) for r in obs_rejects] == [
        (f"line {n}", w) for n, w in zip((2, 3, 4), reasons, strict=True)
    ]
    assert [(r["line"], r["reason"]) for r in misp_rejects] == list(zip((2, 3, 4), reasons, strict=True))


# ---- 5: a date alone is the whole day ----------------------------------------------------------------------------


def test_a_date_alone_is_that_whole_day(story_lake: Path, tmp_path: Path) -> None:
    """Finding 5: "10.20.1.31,2025-06-17" was read as midnight: "no holder", though jupyter-07 held it
    05:03-10:20 and jupyter-31 from 10:40. It is the whole UTC day, as a MISP event's date is."""
    result = _trace(story_lake, _ticket(tmp_path, "address,time\n10.20.1.31,2025-06-17\n"))
    (answer,) = result.observations
    day = dt.datetime(2025, 6, 17, tzinfo=UTC)
    assert (answer["start"], answer["end"]) == (day, day + dt.timedelta(days=1, microseconds=-1))
    assert [h["vm_name"] for h in answer["holders"]] == ["jupyter-07", "jupyter-31"]
    assert to_utc_range("2025-06-17") == _event_range({"date": "2025-06-17"})
    assert to_utc_range("2025-06-17T08:00:00Z") == (day + dt.timedelta(hours=8),) * 2


@pytest.mark.parametrize("text", ["2025-06-17", "20250617", " 2025-06-17 "])
def test_date_forms_are_whole_days(text: str) -> None:
    start, end = to_utc_range(text) or (None, None)
    assert start == dt.datetime(2025, 6, 17, tzinfo=UTC) and end - start == dt.timedelta(
        days=1, microseconds=-1
    )
