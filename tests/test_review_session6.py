"""Regression tests of the session-6 review (hash beside decoding, early workers, hung-worker watchdog, the
row-group sort, brute_force push suppression). Each test reproduces its defect first (it failed before its fix)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import lake_rows

from tracepipe.ingest.flows import ingest_flow_files
from tracepipe.lake import Lake, hash_file

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "netflow"
FLOW_COLUMNS = "src_addr, dst_addr, src_port, dst_port, proto, packets, bytes, ts_start"


def _data_files(lake_dir: Path) -> set[str]:
    return {
        str(p.relative_to(lake_dir))
        for p in lake_dir.rglob("*.parquet*")
        if "_delta_log" not in p.parts and not str(p.relative_to(lake_dir)).startswith("_ingest")
    }


def test_two_commands_landing_the_same_content_at_once_land_it_once(tmp_path):
    """Two ingests of the same content that both passed their first already_ingested check (decoding at once,
    in two processes: the check ran before either committed) used to commit it twice. The later commit now
    checks again under the dataset's ingest lock and drops its files."""
    pcap = SAMPLE / "softflowd-v9.pcap"
    once = tmp_path / "once"
    ingest_flow_files(Lake(once), [pcap], jobs=1)
    expected = lake_rows(once, "flows", FLOW_COLUMNS)
    assert expected

    lake_dir = tmp_path / "lake"
    first, second = Lake(lake_dir), Lake(lake_dir)  # two commands' views of one lake
    digest = hash_file(pcap)
    assert not first.already_ingested("flows", digest) and not second.already_ingested("flows", digest)
    table = Lake(once).read("flows")
    a = first.ingest("flows", str(pcap), digest)
    b = second.ingest("flows", str(tmp_path / "same-bytes.pcap"), digest)
    with a, b:
        a.write(table)
        b.write(table)
        landed = a.commit()
        dropped = b.commit()
    assert (landed.skipped, landed.rows) == (False, len(expected))
    assert dropped.skipped
    assert lake_rows(lake_dir, "flows", FLOW_COLUMNS) == expected
    manifest = [r for r in Lake(lake_dir).manifest().to_pylist() if r["dataset"] == "flows"]
    assert len(manifest) == 1
    # the dropped writer's files are gone, not left beside the lake's own
    assert {f for f in _data_files(lake_dir) if f.startswith("flows/")} == set(landed.files) - {
        f for f in landed.files if not f.startswith("flows/")
    }


def test_a_copy_landed_by_another_command_during_decoding_is_reported_skipped(tmp_path):
    """ingest_flow_files whose commit finds the content landed meanwhile (another command): the file is
    reported skipped (not landed with 0 flows or as 'rejected'), exit 0, rows once."""
    pcap = SAMPLE / "softflowd-v9.pcap"
    lake_dir = tmp_path / "lake"
    copy = tmp_path / "copy.pcap"
    shutil.copy(pcap, copy)
    lake = Lake(lake_dir)
    # the other command lands the same bytes between this one's first check and its commit: done here by
    # landing it through a second Lake object as soon as this one opens its writer
    other = Lake(lake_dir)
    original_ingest = lake.ingest

    def ingest_then_other_lands(dataset: str, source: str, content_hash: str | None, **options):
        writer = original_ingest(dataset, source, content_hash, **options)
        ingest_flow_files(other, [pcap], jobs=1)
        return writer

    lake.ingest = ingest_then_other_lands  # type: ignore[method-assign]
    summary = ingest_flow_files(lake, [copy], jobs=1)
    assert [(f.status, f.flows) for f in summary.files] == [("skipped", 0)]
    assert summary.exit_code == 0
    once = tmp_path / "once"
    ingest_flow_files(Lake(once), [pcap], jobs=1)
    assert lake_rows(lake_dir, "flows", FLOW_COLUMNS) == lake_rows(once, "flows", FLOW_COLUMNS)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_file_appended_while_it_is_read_is_refused_and_lands_once_when_complete(tmp_path, jobs):
    """A capture still being written (appended while ingest reads it) used to land: rows of bytes its content
    hash did not cover (hash and decoding read the file at different times, beside each other with --jobs), so
    the rerun of the complete file landed them a second time under its new hash. Now it is refused (nothing
    committed, exit 3) and lands once when complete."""
    original = (SAMPLE / "softflowd-v9.pcap").read_bytes()
    capture = tmp_path / "growing.pcap"
    capture.write_bytes(original)
    appended = []

    def writer_appends(_n: int) -> None:  # the capture's writer, while ingest reads it
        if not appended:
            with open(capture, "ab") as handle:
                handle.write(original[24:])  # more records (the pcap header is 24 bytes)
            appended.append(True)

    lake_dir = tmp_path / "lake"
    summary = ingest_flow_files(
        Lake(lake_dir), [capture], progress=writer_appends, jobs=jobs, parallel_min_bytes=0
    )
    assert appended
    assert [(f.status, f.flows) for f in summary.files] == [("rejected", 0)]
    assert "changed while it was read" in summary.files[0].message
    assert summary.exit_code == 4  # nothing usable
    assert Lake(lake_dir).read("flows").num_rows == 0
    assert {f for f in _data_files(lake_dir) if f.startswith("flows/")} == set()

    rerun = ingest_flow_files(Lake(lake_dir), [capture], jobs=jobs, parallel_min_bytes=0)
    assert [f.status for f in rerun.files] == ["landed"]
    manifest = [r for r in Lake(lake_dir).manifest().to_pylist() if r["dataset"] == "flows"]
    assert [r["content_hash"] for r in manifest] == [hash_file(capture)]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("push_min_period", "0"),
        ("push_min_period", "-5"),
        ("push_min_period", "nan"),
        ("push_max_period_spread", "-0.1"),
        ("push_max_period_spread", "nan"),
        ("push_max_period_spread", "1e9"),
    ],
)
def test_brute_force_push_settings_out_of_range_are_a_usage_error(tmp_path, key, value):
    """push_min_period 0 (any regular login tool off the listed ports suppressed) and push_max_period_spread
    above 1 (every rhythm 'steady': all off-port brute force suppressed) were accepted; now exit 2 naming the
    key and its line."""
    template = Path(__file__).resolve().parent.parent / "tracepipe" / "pipelines" / "nightly.toml"
    text = template.read_text()
    line = next(x for x in text.splitlines() if x.startswith(f"{key} ="))
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(line, f"{key} = {value}"))
    run = subprocess.run(
        [sys.executable, "-m", "tracepipe.cli", "sweep", str(bad), "--lake", str(tmp_path / "lake")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert key in run.stdout + run.stderr
    assert "line " in run.stderr and "Fix the pipeline file" in run.stderr
