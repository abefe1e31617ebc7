"""`ingest netflow --jobs N`: a big file's content hash is computed by a thread while the workers decode it
(issue 17: it was a serial ~0.6 s per GB before the first batch). The source's identity and its guarantees stay
as they were: the manifest holds the sha256 of the file's bytes, its files are named after it before any commit
lists them (crash recovery finds them by name), and content already in the lake is never landed twice, even
under a new path: it is found while decoding, and what was written for it is dropped."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import struct
import time

import pytest
from scapy.layers.inet import UDP
from scapy.utils import rdpcap, wrpcap

from tracepipe.ingest.decode_pool import DecodePool
from tracepipe.ingest.flows import ingest_flow_files
from tracepipe.ingest.netflow import DecoderState, walk_datagrams
from tracepipe.ingest.pcap import iter_udp_batches
from tracepipe.lake import Lake, source_key


@pytest.fixture(scope="module")
def split_capture(softflowd_export, tmp_path_factory) -> tuple:
    """A real softflowd v9 export split in two files: its templates in the first, most data in the second."""
    base = tmp_path_factory.mktemp("overlap")
    packets = rdpcap(str(softflowd_export(9, "ipv6").export_pcap))
    wrpcap(str(base / "part1.pcap"), packets[:3])
    wrpcap(str(base / "part2.pcap"), packets[3:])
    # the data datagrams only: templates (flowset id 0) and options templates (1) left out
    wrpcap(str(base / "data-only.pcap"), [p for p in packets[3:] if not _has_template(bytes(p[UDP].payload))])
    return base / "part1.pcap", base / "part2.pcap", base / "data-only.pcap"


def _has_template(datagram: bytes) -> bool:
    at = 20  # v9 header, RFC 3954 section 5.1
    while at + 4 <= len(datagram):
        flowset_id, length = struct.unpack_from(">HH", datagram, at)
        if flowset_id < 256:
            return True
        at += max(length, 4)
    return False


def _files(lake_dir) -> set[str]:
    return {str(p.relative_to(lake_dir)) for p in lake_dir.rglob("*") if p.is_file()}


def test_files_are_named_after_the_sha256_of_their_source_when_hashed_beside_decoding(
    split_capture, tmp_path
):
    lake = Lake(tmp_path / "lake")
    summary = ingest_flow_files(lake, list(split_capture[:2]), jobs=2, parallel_min_bytes=0)
    assert [f.status for f in summary.files] == ["landed", "landed"]
    manifest = {r["source"]: r for r in lake.manifest().to_pylist() if r["dataset"] == "flows"}
    for path in split_capture[:2]:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()  # the identity old manifests hold
        row = manifest[str(path.absolute())]
        assert row["content_hash"] == digest
        flow_files = [f for f in row["files"] if f.startswith("flows/")]
        assert flow_files and all(
            re.search(rf"/part-{digest}-[0-9a-f]{{8}}\.parquet$", f) for f in flow_files
        )
    listed = {f"flows/{e.relative}" for e in lake.entries("flows")}
    assert listed == {f for r in manifest.values() for f in r["files"] if f.startswith("flows/")}
    assert not [f for f in _files(tmp_path / "lake") if f.endswith(".tmp")]


@pytest.mark.parametrize("jobs", [1, 2])
def test_content_already_landed_under_a_new_path_is_skipped_and_leaves_nothing(split_capture, tmp_path, jobs):
    """The copy is decoded by the workers until its hash is known (jobs 2), then dropped: the same result as
    hashing first (jobs 1), the decoder state included (the copy's templates are not learnt: the second file's
    data waits for them in both cases)."""
    part1 = split_capture[0]
    lake_dir = tmp_path / "lake"
    ingest_flow_files(Lake(lake_dir), [part1], jobs=jobs, parallel_min_bytes=0)
    before = _files(lake_dir)
    rows = Lake(lake_dir).read("flows").num_rows
    copy = tmp_path / "copy-of-part1.pcap"
    shutil.copy(part1, copy)
    summary = ingest_flow_files(Lake(lake_dir), [copy], jobs=jobs, parallel_min_bytes=0)
    assert [(f.status, f.flows) for f in summary.files] == [("skipped", 0)]
    assert summary.exit_code == 0
    assert Lake(lake_dir).read("flows").num_rows == rows
    assert {
        f for f in _files(lake_dir) - before if not f.startswith(("flows/_delta_log", "_ingest/"))
    } == set()


def test_a_skipped_copy_leaves_the_decoder_state_as_hashing_first_does(split_capture, tmp_path):
    """The copy's templates, walked before its hash was known, are forgotten: the data after it waits for
    them and is rejected "no template", as when the copy was never read (the templates the first run kept for
    the next, flows.CAPTURE_STATE_DIR, removed: this run knows none of its own)."""
    from tracepipe.ingest.flows import CAPTURE_STATE_DIR

    part1, _, data_only = split_capture
    results = []
    for jobs in (1, 2):
        lake_dir = tmp_path / f"lake{jobs}"
        ingest_flow_files(Lake(lake_dir), [part1], jobs=jobs, parallel_min_bytes=0)
        shutil.rmtree(lake_dir / CAPTURE_STATE_DIR)
        copy = tmp_path / f"copy{jobs}.pcap"
        shutil.copy(part1, copy)
        summary = ingest_flow_files(Lake(lake_dir), [copy, data_only], jobs=jobs, parallel_min_bytes=0)
        files = [(f.status, f.flows, f.rejects) for f in summary.files]
        results.append((files, summary.exporters))
    assert results[0] == results[1]
    (copied, data), exporters = results[0]
    assert copied[0] == "skipped" and data[1] == 0 and data[2] > 0
    assert exporters["127.0.0.1"]["no_template"] > 0


def test_a_crash_between_the_workers_close_and_the_commit_leaves_invisible_files_and_the_rerun_lands_once(
    split_capture, tmp_path
):
    """The workers have renamed their files to part-<sha256>-<random>.parquet, then the process dies before
    the commit: no commit lists them (readers never see them), the rerun does not take them for a landed
    source (it looks in the table's log, not the directory) and lands the file once; vacuum deletes them."""
    capture = split_capture[1]
    digest = hashlib.sha256(capture.read_bytes()).hexdigest()
    lake_dir = tmp_path / "lake"
    state = DecoderState()
    for b in iter_udp_batches(split_capture[0]):  # its templates, as the run that died had learnt them
        walk_datagrams(b.payloads, b.exporters, b.ts_us, b.offsets, "part1", state)
    walked = [
        walk_datagrams(b.payloads, b.exporters, b.ts_us, b.offsets, str(capture.absolute()), state)[0]
        for b in iter_udp_batches(capture, batch_datagrams=4)
    ]
    with DecodePool(2, lake_dir) as pool:
        pool.begin(None)  # the hash still being computed
        for batch in walked:
            pool.submit(batch)
        _, adds, rows = pool.finish(source_key(digest))  # ... and then the process dies: no commit
    orphans = sorted(lake_dir.rglob("*.parquet"))
    assert rows > 0 and len(orphans) == len(adds) >= 1
    assert all(re.fullmatch(rf"part-{digest}-[0-9a-f]{{8}}\.parquet", p.name) for p in orphans)
    Lake(lake_dir).ingest("flows", "other", "0" * 64).commit()  # the table exists, without them
    assert not Lake(lake_dir).entries("flows") and not Lake(lake_dir).already_ingested("flows", digest)
    for _ in range(2):  # the rerun lands it once, the next one skips it
        ingest_flow_files(Lake(lake_dir), list(split_capture[:2]), jobs=2, parallel_min_bytes=0)
    lake = Lake(lake_dir)
    landed = [r for r in lake.manifest().to_pylist() if r["content_hash"] == digest]
    assert len(landed) == 1 and landed[0]["rows"] == rows
    listed = {e.path for e in lake.entries("flows")}
    assert not listed & set(orphans)
    hour_ago = time.time() - 3700
    for orphan in orphans:
        os.utime(orphan, (hour_ago, hour_ago))
    assert lake.vacuum(dt.timedelta(hours=1))["flows"] >= len(orphans)
    assert not any(p.exists() for p in orphans)
    assert Lake(lake_dir).read("flows").num_rows == sum(
        r["rows"] for r in Lake(lake_dir).manifest().to_pylist()
    )


def test_a_file_landed_before_and_unchanged_is_skipped_without_reading_it(tmp_path, monkeypatch):
    """An ops review: a sweep's drop folder was hashed whole at every run (264 + 264 hourly files: 3.9 s and 2.2 GB
    read an hour to land nothing). A file whose manifest row recorded it as it still is (device, inode, size,
    mtime, ctime) is skipped unread; one touched or replaced since is hashed (and skipped by its content)."""
    import shutil
    from pathlib import Path

    from tracepipe.ingest import flows as flow_ingest
    from tracepipe.ingest import vm as vm_ingest
    from tracepipe.ingest.flows import ingest_flow_files
    from tracepipe.ingest.vm import ingest_vm_files
    from tracepipe.lake import Lake

    story = Path(__file__).resolve().parent.parent / "sample_data" / "story"
    capture = shutil.copy(story / "netflow" / "openstack-softflowd-v9.pcap", tmp_path / "capture.pcap")
    events = shutil.copy(next((story / "nova").iterdir()), tmp_path / "nova.jsonl")
    lake = Lake(tmp_path / "lake")
    assert ingest_flow_files(lake, [Path(capture)]).files[0].status == "landed"
    assert not ingest_vm_files(lake, [Path(events)]).results[0].skipped
    read: list[str] = []

    def counted(real):
        return lambda path, *a, **k: (read.append(str(path)), real(path, *a, **k))[1]

    monkeypatch.setattr(flow_ingest, "hash_file", counted(flow_ingest.hash_file))
    monkeypatch.setattr(vm_ingest, "hash_file", counted(vm_ingest.hash_file))
    lake = Lake(lake.root)  # (a new run)
    assert ingest_flow_files(lake, [Path(capture)]).files[0].status == "skipped"
    assert ingest_vm_files(lake, [Path(events)]).results[0].skipped
    assert read == []
    for path in (capture, events):
        Path(path).touch()  # (a write since: the identity no longer matches)
    lake = Lake(lake.root)
    assert ingest_flow_files(lake, [Path(capture)]).files[0].status == "skipped"
    assert ingest_vm_files(lake, [Path(events)]).results[0].skipped
    assert sorted(read) == sorted([str(capture), str(events)])  # hashed, and skipped by their content


def test_a_file_landed_before_identities_were_recorded_is_read_once_more_then_never(tmp_path, monkeypatch):
    """A review of the fix: files landed by a version before identities were recorded kept being hashed at
    every run (an upgraded site's drop folder: 2.2 GB an hour). The first run that finds one by its content
    records its identity; the runs after skip it unread."""
    import shutil
    from pathlib import Path

    from tracepipe.ingest import flows as flow_ingest
    from tracepipe.ingest.flows import ingest_flow_files
    from tracepipe.lake import Lake

    story = Path(__file__).resolve().parent.parent / "sample_data" / "story"
    capture = Path(shutil.copy(story / "netflow" / "openstack-softflowd-v9.pcap", tmp_path / "capture.pcap"))
    with monkeypatch.context() as old_version:  # (lands it as the version before did: no identity)
        old_version.setattr(flow_ingest, "FILE_IDENTITY", "not-recorded")
        assert ingest_flow_files(Lake(tmp_path / "lake"), [capture]).files[0].status == "landed"
    read: list[str] = []
    real = flow_ingest.hash_file
    monkeypatch.setattr(
        flow_ingest, "hash_file", lambda path, *a, **k: (read.append(str(path)), real(path))[1]
    )
    for _run in range(3):
        assert ingest_flow_files(Lake(tmp_path / "lake"), [capture]).files[0].status == "skipped"
    assert read == [str(capture)]  # hashed by the first run after the upgrade only


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_capture_ingested_in_a_run_of_its_own_uses_the_templates_an_earlier_run_learnt(
    split_capture, tmp_path, jobs
):
    """A capture rotated by the hour (tcpdump -G) into a drop folder, each file landed by its own run: the
    second file's data came before the exporter's next template refresh and was all `no template` (a README
    limit until session 37). The first run keeps its exporters' templates in the lake for the next: the two
    runs land what one run of both files lands, and nothing is rejected."""
    part1, _, data_only = split_capture  # (data_only: the second file's data, none of its template refreshes)
    one = Lake(tmp_path / "one")
    together = ingest_flow_files(one, [part1, data_only], jobs=jobs, parallel_min_bytes=0)
    lake = Lake(tmp_path / "two")
    ingest_flow_files(lake, [part1], jobs=jobs, parallel_min_bytes=0)
    later = ingest_flow_files(Lake(lake.root), [data_only], jobs=jobs, parallel_min_bytes=0)
    assert [(f.status, f.rejects) for f in later.files] == [("landed", 0)]
    assert later.files[0].flows > 0 and later.exit_code == 0
    assert lake.read("flows").num_rows == one.read("flows").num_rows == sum(f.flows for f in together.files)


def _drop_folder(folder, count: int, start: int = 0):
    """`count` nfdump CSV files of one flow each and `count` syslog files of one line each (a relay's file per
    VM), all of other content."""
    from pathlib import Path

    (folder / "flows").mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    header = "ts,te,td,sa,da,sp,dp,pr,flg,fwd,stos,ipkt,ibyt,in,out,ra\n"
    for i in range(start, start + count):
        Path(folder / "flows" / f"nfcapd.{i:05d}.csv").write_text(
            header + f"2024-03-12 10:00:00,2024-03-12 10:00:01,1.0,10.0.0.{i % 250},192.0.2.1,"
            f"{1000 + i},443,TCP,......S.,0,0,1,60,0,0,127.0.0.1\n"
        )
        Path(folder / "logs" / f"vm-{i:05d}.log").write_text(
            f"Mar 12 10:00:{i % 60:02d} vm-{i} sshd[{100 + i}]: Accepted publickey for user{i}\n"
        )


@pytest.mark.parametrize("compacted", [False, True])
def test_a_rerun_over_a_big_drop_folder_reads_the_manifest_once_not_a_file_at_a_time(
    tmp_path, monkeypatch, compacted
):
    """A performance review: a rerun of `ingest netflow` over a drop folder of 20,000 files landed before took
    105 s (~5 ms a file: each path read a row group of the manifest twice, has_source then landed_as_it_is, and
    a row group of 8,192 rows at that), and the cost grew with the manifest. Lake.know_sources reads the
    `source` column once for all of them; the answers are the same: unchanged files unread, a touched one hashed
    and skipped by its content, a new one landed, for flows and for syslog (vm_logs)."""
    from pathlib import Path

    from tracepipe.ingest import flows as flow_ingest
    from tracepipe.ingest import vm as vm_ingest
    from tracepipe.ingest.vm import ingest_syslog_files
    from tracepipe.lake import MANIFEST_DIR

    _drop_folder(tmp_path / "drop", 40)
    lake = Lake(tmp_path / "lake")
    assert {f.status for f in ingest_flow_files(lake, [tmp_path / "drop" / "flows"], jobs=1).files} == {
        "landed"
    }
    assert not any(
        r.skipped for r in ingest_syslog_files(lake, [tmp_path / "drop" / "logs"], year=2024).results
    )
    if compacted:  # (a site's manifest after `compact`: merged files of row groups with Bloom filters)
        Lake(lake.root).compact(MANIFEST_DIR, min_files=2)
        assert len(Lake(lake.root).entries(MANIFEST_DIR)) == 1
    lookups: list[str] = []
    read: list[str] = []
    real_rows = Lake._manifest_rows
    monkeypatch.setattr(
        Lake,
        "_manifest_rows",
        lambda self, d, s, *a, **k: (lookups.append(s), real_rows(self, d, s, *a, **k))[1],
    )
    for module in (flow_ingest, vm_ingest):
        real = module.hash_file
        monkeypatch.setattr(
            module, "hash_file", lambda p, *a, real=real, **k: (read.append(str(p)), real(p))[1]
        )

    lake = Lake(lake.root)  # (the next run)
    assert {f.status for f in ingest_flow_files(lake, [tmp_path / "drop" / "flows"], jobs=1).files} == {
        "skipped"
    }
    assert all(r.skipped for r in ingest_syslog_files(lake, [tmp_path / "drop" / "logs"], year=2024).results)
    assert (lookups, read) == ([], [])  # (before: 160 lookups, two a file)

    touched = [
        tmp_path / "drop" / kind / name
        for kind, name in (("flows", "nfcapd.00007.csv"), ("logs", "vm-00007.log"))
    ]
    for path in touched:
        os.utime(
            path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000)
        )  # (a write since: identity differs)
    _drop_folder(tmp_path / "drop", 1, start=40)
    lake = Lake(lake.root)
    flows = {
        Path(f.path).name: f.status
        for f in ingest_flow_files(lake, [tmp_path / "drop" / "flows"], jobs=1).files
    }
    logs = ingest_syslog_files(lake, [tmp_path / "drop" / "logs"], year=2024).results
    assert flows.pop("nfcapd.00040.csv") == "landed" and set(flows.values()) == {"skipped"}
    assert [Path(r.source).name for r in logs if not r.skipped] == ["vm-00040.log"]
    assert sorted(read) == sorted(
        [str(p) for p in touched]
        + [
            str(tmp_path / "drop" / "flows" / "nfcapd.00040.csv"),
            str(tmp_path / "drop" / "logs" / "vm-00040.log"),
        ]
    )
    assert lookups == []
    assert Lake(lake.root).read("flows").num_rows == 41 and Lake(lake.root).read("vm_logs").num_rows == 41

    # the answers read in one pass are the ones a lookup a file at a time gives, for known and unknown paths
    monkeypatch.setattr(Lake, "_manifest_rows", real_rows)
    paths = [str(p.absolute()) for p in sorted((tmp_path / "drop" / "flows").iterdir())] + ["/nowhere/x.csv"]
    one_by_one, batched = Lake(lake.root), Lake(lake.root)
    batched.know_sources("flows", paths)
    for path in paths:
        assert batched.has_source("flows", path) == one_by_one.has_source("flows", path)
        assert batched.source_stats("flows", path) == one_by_one.source_stats("flows", path)
    assert not batched.has_source("flows", "/nowhere/x.csv") and batched.has_source("flows", paths[0])


def test_a_rerun_lists_what_landed_and_counts_the_many_files_skipped(tmp_path):
    """A rerun over a drop folder of 100,000 landed files printed a table of 100,000 'skipped' rows (90 s of
    CPU, 120 s in all, to say nothing landed). Past cli.LISTED_SKIPPED the skipped files are counted in a line;
    what landed is still listed; --format json still lists every file. Same for syslog and VM sources."""
    from tests.conftest import run_in_process
    from tracepipe.cli import LISTED_SKIPPED

    count = LISTED_SKIPPED + 5
    _drop_folder(tmp_path / "drop", count)
    lake = str(tmp_path / "lake")
    flows, logs = str(tmp_path / "drop" / "flows"), str(tmp_path / "drop" / "logs")
    first = run_in_process("ingest", "netflow", flows, "--lake", lake, "--jobs", "1")
    assert first.returncode == 0 and first.stdout.count("nfcapd.") == count  # (all landed: all listed)
    assert run_in_process("ingest", "syslog", logs, "--lake", lake, "--year", "2024").returncode == 0
    _drop_folder(tmp_path / "drop", 1, start=count)
    again = run_in_process("ingest", "netflow", flows, "--lake", lake, "--jobs", "1")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("nfcapd.") == 1 and f"nfcapd.{count:05d}.csv" in again.stdout
    assert f"{count} files skipped, not listed" in again.stdout
    logs_again = run_in_process("ingest", "syslog", logs, "--lake", lake, "--year", "2024")
    assert logs_again.returncode == 0 and logs_again.stdout.count("vm-") == 1
    assert f"{count} files skipped, not listed" in logs_again.stdout
    listed = json.loads(run_in_process("ingest", "netflow", flows, "--lake", lake, "--format", "json").stdout)
    assert [f["status"] for f in listed["files"]] == ["skipped"] * (count + 1)
