"""Nova versioned notifications (real samples): envelope and bare messages, actions, states, addresses, times;
unknown event types kept, malformed lines rejected with their line number."""

import datetime as dt
import json
from pathlib import Path

import pytest

from tracepipe.ingest.cloud import detect_format, parse_cloud_text
from tracepipe.ingest.cloud.nova import nova_action
from tracepipe.schema import VM_ACTIONS

DATA = Path(__file__).parent / "data" / "cloud" / "nova"
REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "nova"  # ../shared beside the clone


def test_story_envelope_parsed():
    events, rejects = parse_cloud_text((DATA / "notifications.jsonl").read_text(), "story")
    assert rejects.num_rows == 0
    d = events.to_pydict()
    assert d["action"] == [
        "create",
        "create",
        "create",
        "create",
        "attach",
        "power_off",
        "power_on",
        "detach",
        "soft_delete",
        "restore",
        "delete",
        "delete",
        "delete",
        "delete",
        "create",
        "create",
    ]
    assert d["ts"][1] == dt.datetime(2024, 3, 12, 7, 0, 40, tzinfo=dt.UTC)
    assert d["vm_name"][1] == "web-01" and d["hypervisor"][1] == "compute-1" and d["user"][1] == "fake"
    assert d["addrs"][4] == ["192.168.1.3", "192.168.1.30"]
    assert d["state"][8] == "soft_deleted" and d["state"][11] == "deleted"
    assert d["addrs"][11] == []  # instance.delete.end reports no addresses any more
    assert d["event_id"][0] == "c9e9c616-612e-4696-a6ce-cc1b78e51061"
    assert d["line"] == list(range(1, 17)) and set(d["cloud"]) == {"openstack"}


@pytest.mark.parametrize(
    ("sample", "action", "state", "n_addrs"),
    [
        ("instance-create-end.json", "create", "active", 1),
        ("instance-delete-end.json", "delete", "deleted", 0),
        ("instance-soft_delete-end.json", "soft_delete", "soft_deleted", 1),
        ("instance-restore-end.json", "restore", "active", 1),
        ("instance-shelve_offload-end.json", "shelve_offload", "shelved", 1),
        ("instance-unshelve-end.json", "unshelve", "active", 1),
        ("instance-power_off-end.json", "power_off", "stopped", 1),
        ("instance-interface_attach-end.json", "attach", "active", 2),
        ("instance-interface_detach-end.json", "detach", "active", 1),
        ("instance-live_migration_post-end.json", "migrate", "active", 1),
        ("instance-rebuild-end.json", "rebuild", "active", 1),
        ("instance-exists.json", "exists", "active", 1),
        ("instance-update.json", "update", "active", 0),
    ],
)
def test_doc_samples_bare_pretty_printed(sample, action, state, n_addrs):
    events, rejects = parse_cloud_text((REAL / sample).read_text(), sample)
    assert rejects.num_rows == 0
    row = events.to_pylist()[0]
    assert (row["action"], row["state"], len(row["addrs"])) == (action, state, n_addrs)
    assert row["vm_id"] == "178b0921-8f85-4257-88b6-2e743b5a975c"
    # no envelope timestamp in Nova's doc samples: the instance's updated_at stands in
    assert row["ts"] == dt.datetime(2012, 10, 29, 13, 42, 11, tzinfo=dt.UTC)


def test_json_array_file_and_detection():
    messages = [
        json.loads((REAL / s).read_text()) for s in ("instance-create-end.json", "instance-delete-end.json")
    ]
    text = json.dumps(messages)
    assert detect_format("dump.json", text) == "nova"
    events, rejects = parse_cloud_text(text, "dump.json")
    assert events.column("action").to_pylist() == ["create", "delete"] and rejects.num_rows == 0


def test_unknown_event_kept_and_malformed_line_rejected():
    lines = (DATA / "notifications.jsonl").read_text().splitlines()[:3]
    message = json.loads(json.loads(lines[1])["oslo.message"])
    message["event_type"] = "instance.trigger_crash_dump.end"
    message["message_id"] = "m-unknown"
    lines.insert(1, json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(message)}))
    lines.insert(3, '{"oslo.version": "2.0", "oslo.message": "{truncated')
    lines.insert(4, "[1, 2]")
    events, rejects = parse_cloud_text("\n".join(lines) + "\n", "mixed.jsonl")
    assert events.num_rows == 4
    unknown = next(r for r in events.to_pylist() if r["event_id"] == "m-unknown")
    assert unknown["action"] == "unknown" and unknown["event_type"] == "instance.trigger_crash_dump.end"
    assert unknown["line"] == 2
    assert rejects.column("line").to_pylist() == [4, 5]
    assert set(rejects.column("reason").to_pylist()) == {"malformed JSON", "not a notification"}


@pytest.mark.parametrize(
    ("event_type", "action"),
    [
        ("instance.live_migration_rollback_dest.end", "migrate"),
        ("instance.interface_detach.start", "detach"),
        ("instance.force_delete.end", "force_delete"),
        ("instance.shelve_offload.end", "shelve_offload"),
        ("instance.volume_attach.end", "unknown"),
    ],
)
def test_action_names(event_type, action):
    assert nova_action(event_type) == action


def _leases_of(*messages: dict, fmt: str = "auto") -> list[tuple]:
    """(addr, vm_id, hypervisor, valid_from hh:mm, valid_to hh:mm or None, end_reason) of the leases built
    from these notifications."""
    from tracepipe.correlate.leases import build_leases

    events, rejects = parse_cloud_text("\n".join(json.dumps(m) for m in messages), "x", fmt=fmt)
    assert rejects.num_rows == 0, rejects.to_pylist()
    leases, _ = build_leases(events)
    return sorted(
        (
            r["addr"],
            r["vm_id"],
            r["hypervisor"],
            f"{r['valid_from']:%H:%M}",
            r["valid_to"] and f"{r['valid_to']:%H:%M}",
            r["end_reason"],
        )
        for r in leases.to_pylist()
    )


def _legacy(event_type: str, at: str, **payload) -> dict:
    base = {
        "instance_id": "vm-a",
        "display_name": "old-style",
        "tenant_id": "p",
        "user_id": "u",
        "host": "c1",
        "state": "active",
        "fixed_ips": [
            {
                "address": "10.0.0.5",
                "type": "fixed",
                "version": 4,
                "label": "net",
                "vif_mac": "fa:16:3e:00:00:01",
                "floating_ips": [],
                "meta": {},
            },
            {
                "address": "2001:db8::5",
                "type": "fixed",
                "version": 6,
                "label": "net",
                "vif_mac": "fa:16:3e:00:00:01",
                "floating_ips": [],
                "meta": {},
            },
        ],
    }
    return {
        "event_type": event_type,
        "timestamp": f"2024-03-12 {at}:00.000000",
        "message_id": f"{event_type}-{at}",
        "publisher_id": "compute.c1",
        "priority": "INFO",
        "payload": {**base, **payload},
    }


def test_legacy_unversioned_notifications_give_the_leases_of_versioned_ones():
    """Cloud review (session 35): Nova with notification_format=unversioned sends `compute.instance.*` with
    `instance_id` and `fixed_ips`; every one was "notification without instance uuid" and `who` said nobody."""
    leases = _leases_of(
        _legacy("compute.instance.create.start", "07:00", state="building", fixed_ips=[]),
        _legacy("compute.instance.create.end", "07:01"),
        _legacy("compute.instance.live_migration.post.dest.end", "08:00", host="c2"),
        _legacy("compute.instance.volume.detach", "08:10", host="c2"),  # (a volume, not an interface)
        _legacy("compute.instance.delete.end", "09:00", host="c2", state="deleted", fixed_ips=[]),
    )
    assert leases == [
        ("10.0.0.5", "vm-a", "c1", "07:01", "08:00", "migrate"),
        ("10.0.0.5", "vm-a", "c2", "08:00", "09:00", "delete"),
        ("2001:db8::5", "vm-a", "c1", "07:01", "08:00", "migrate"),
        ("2001:db8::5", "vm-a", "c2", "08:00", "09:00", "delete"),
    ]
    assert [
        nova_action(e) for e in ("compute.instance.finish_resize.end", "compute.instance.volume.detach")
    ] == [
        "migrate",
        "unknown",
    ]


def _created(*addrs_ports: tuple[str, str]) -> dict:
    """A versioned instance.create.end of vm-a at 07:00 listing these (address, port)."""
    ips = [{"nova_object.data": {"address": a, "port_uuid": p}} for a, p in addrs_ports]
    data = {
        "uuid": "vm-a",
        "tenant_id": "p",
        "user_id": "u",
        "host": "c1",
        "state": "active",
        "ip_addresses": ips,
    }
    return {
        "event_type": "instance.create.end",
        "timestamp": "2024-03-12 07:00:00",
        "message_id": "m1",
        "payload": {"nova_object.data": data},
    }


def _port_deleted(port_id: str, *addrs: str) -> dict:
    """Neutron's port.delete.end of vm-a's port at 07:30, its fixed_ips these addresses."""
    port = {
        "id": port_id,
        "tenant_id": "p",
        "device_id": "vm-a",
        "device_owner": "compute:nova",
        "fixed_ips": [{"ip_address": a} for a in addrs],
    }
    return {
        "event_type": "port.delete.end",
        "timestamp": "2024-03-12 07:30:00",
        "message_id": "m2",
        "payload": {"port_id": port_id, "port": port},
    }


def test_a_dual_stack_port_deleted_by_neutron_ends_both_addresses():
    """Cloud review (session 35): a Nova event named the port of its addresses only when it listed one
    address, so Neutron's port.delete.end of a dual-stack port (IPv4 and IPv6 on one port) released nothing
    and `who` named the VM "still held" for both."""
    created = _created(("10.0.0.5", "pa"), ("2001:db8::5", "pa"))
    events, _ = parse_cloud_text(json.dumps(created), "x")
    assert events.column("port_id").to_pylist() == ["pa"]
    assert _leases_of(created, _port_deleted("pa", "10.0.0.5", "2001:db8::5")) == [
        ("10.0.0.5", "vm-a", "c1", "07:00", "07:30", "detach"),
        ("2001:db8::5", "vm-a", "c1", "07:00", "07:30", "detach"),
    ]


def test_lines_of_the_oslo_log_notification_driver_are_read():
    """`[oslo_messaging_notifications] driver = log` writes each notification as JSON after the service's log
    prefix: every such line was "malformed JSON" (cloud review, session 35)."""
    message = _legacy("compute.instance.create.end", "07:01")
    line = (
        "2024-03-12 07:01:00.123 4242 INFO oslo.messaging.notification.compute.instance.create.end "
        f"[req-1 - - - - -] {json.dumps(message)}"
    )
    assert detect_format("nova.log", line) == "nova"
    events, rejects = parse_cloud_text(line + "\nnot a notification at all\n", "nova.log")
    assert events.column("vm_id").to_pylist() == ["vm-a"] and rejects.column("line").to_pylist() == [2]


def test_a_file_of_unknown_format_in_a_folder_is_not_read_and_the_others_land(tmp_path):
    """Cloud review (session 35): a README beside the dumps made `ingest vm DIR` stop with exit 2, nothing
    landed. It is now named as not read (and not recorded, so a run with --format reads it later); exit 3."""
    from tests.conftest import run_in_process

    folder = tmp_path / "dumps"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps(_legacy("compute.instance.create.end", "07:01")) + "\n")
    (folder / "README.md").write_text("# where these come from\n")
    run = run_in_process("ingest", "vm", str(folder), "--output", "json", "--lake", str(tmp_path / "lake"))
    assert run.returncode == 3, run.stdout + run.stderr
    out = json.loads(run.stdout)
    assert out["rows"] == 1 and [n["source"].rsplit("/", 1)[1] for n in out["not_read"]] == ["README.md"]
    named = run_in_process("ingest", "vm", str(folder / "README.md"), "--lake", str(tmp_path / "lake"))
    assert named.returncode == 2 and "cannot tell the format" in named.stderr


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JSONISH = st.sampled_from(
    [
        *list('{}[]",:\n 01abe.-_ZT'),
        '"oslo.message"',
        '"event_type"',
        '"instance.x"',
        '"payload"',
        "null",
        '"timestamp"',
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    text=st.one_of(st.text(), st.lists(_JSONISH).map("".join)),
    fmt=st.sampled_from(["nova", "opennebula", "csv", "jsonl"]),
)
def test_any_text_gives_rows_or_rejects_never_a_crash(text, fmt):
    events, rejects = parse_cloud_text(text, "fuzz", fmt=fmt)
    assert events.num_rows >= 0 and rejects.num_rows >= 0
    assert set(events.column("action").to_pylist()) <= set(VM_ACTIONS)


# ---- hostile input (issue 12, items 8 and 9): bad records are rejects with their line, the rest lands ----------


def _story_message(index: int = 1) -> dict:
    """Message `index` of the real story dump (oslo envelope unwrapped)."""
    line = (DATA / "notifications.jsonl").read_text().splitlines()[index]
    return json.loads(json.loads(line)["oslo.message"])


def _hostile_dump(*changes) -> str:
    """The story's web-01 create.end (192.168.1.3), once as it is (line 1), then once per change(message)."""
    lines = [json.dumps(_story_message())]
    for change in changes:
        message = _story_message()
        message["message_id"] = f"m-{len(lines) + 1}"
        change(message)
        lines.append(json.dumps(message))
    return "\n".join(lines) + "\n"


def _data(message: dict) -> dict:
    return message["payload"]["nova_object.data"]


def test_unparseable_or_absurd_timestamp_is_a_reject_not_a_fallback_to_the_payload_date():
    # before: "garbage" silently became the instance's updated_at (2012 in the doc samples), years 1 and 9999
    # landed, and 0001-01-01T00:00:00+01:00 raised OverflowError (the whole file lost)
    text = _hostile_dump(
        lambda m: m.update(timestamp="garbage"),
        lambda m: m.update(timestamp="0001-01-01 00:00:00.000000"),
        lambda m: m.update(timestamp="9999-12-31 23:59:59.000000"),
        lambda m: m.update(timestamp="0001-01-01T00:00:00+01:00"),
        lambda m: m.update(timestamp="1970-01-01T00:00:00Z"),
    )
    events, rejects = parse_cloud_text(text, "n.jsonl", fmt="nova")
    assert events.column("line").to_pylist() == [1]
    assert rejects.column("line").to_pylist() == [2, 3, 4, 5, 6]
    assert rejects.column("reason").to_pylist() == [
        "bad timestamp",
        "time out of range",
        "time out of range",
        "bad timestamp",
        "time out of range",
    ]


def test_doc_sample_without_timestamp_still_uses_updated_at_but_a_bad_one_is_rejected():
    sample = json.loads((REAL / "instance-create-end.json").read_text())
    assert "timestamp" not in sample  # the doc samples' case: the fallback stays
    sample["payload"]["nova_object.data"]["updated_at"] = "yesterday"
    events, rejects = parse_cloud_text(json.dumps(sample), "s.json", fmt="nova")
    assert events.num_rows == 0 and rejects.column("reason").to_pylist() == ["bad updated_at"]


def test_missing_instance_uuid_is_a_reject_not_a_row_without_vm_id():
    text = _hostile_dump(lambda m: _data(m).pop("uuid"), lambda m: _data(m).update(uuid=""))
    events, rejects = parse_cloud_text(text, "n.jsonl", fmt="nova")
    assert events.column("vm_id").to_pylist() == ["7311d8a3-c2ce-4f44-bed4-d57b1e2feb89"]
    assert rejects.column("reason").to_pylist() == ["notification without instance uuid"] * 2


def test_addresses_are_canonical_and_non_addresses_are_dropped_and_counted():
    def addresses(message: dict, *texts: str) -> None:
        template = _data(message)["ip_addresses"][0]
        _data(message)["ip_addresses"] = [
            {**template, "nova_object.data": {**template["nova_object.data"], "address": t}} for t in texts
        ]

    text = _hostile_dump(lambda m: addresses(m, "2001:DB8::0001", "not-an-ip", "192.168.1.9"))
    events, rejects = parse_cloud_text(text, "n.jsonl", fmt="nova")
    # the flows' form (str(ipaddress)), so `who 2001:db8::1` and flow attribution find it
    assert events.column("addrs").to_pylist() == [["192.168.1.3"], ["2001:db8::1", "192.168.1.9"]]
    assert rejects.to_pydict()["line"] == [2]
    assert rejects.to_pydict()["reason"] == ["not an IP address in the address list (dropped)"]
    assert rejects.to_pydict()["detail"] == ["not-an-ip"]


def test_fields_of_the_wrong_json_type_reject_their_line_only():
    # before: a number as uuid made the whole file land nothing (ArrowTypeError, exit 4); a list as payload
    # landed a row without vm_id
    text = _hostile_dump(
        lambda m: _data(m).update(uuid=12345),
        lambda m: m.update(payload=[1, 2]),
        lambda m: m.update(payload="a string"),
        lambda m: m["payload"].update({"nova_object.data": "a string"}),
        lambda m: _data(m).update(ip_addresses="10.0.0.1"),
        lambda m: _data(m).update(ip_addresses=["10.0.0.1"]),
        lambda m: _data(m).update(display_name={"nested": "object"}),
        lambda m: _data(m).update(tenant_id=["a", "list"]),
        lambda m: m.update(timestamp={"an": "object"}),
        lambda m: m.update(message_id=7),
    )
    events, rejects = parse_cloud_text(text, "n.jsonl", fmt="nova")
    assert events.column("line").to_pylist() == [1]
    assert rejects.column("line").to_pylist() == list(range(2, 12))
    assert set(rejects.column("reason").to_pylist()) == {"wrong JSON type", "bad timestamp"}


def test_a_hostile_line_in_a_real_dump_costs_that_line_only(tmp_path):
    from tracepipe.errors import EXIT_PARTIAL
    from tracepipe.ingest.vm import ingest_vm_files
    from tracepipe.lake import Lake

    lines = (REAL / "notifications.jsonl").read_text().splitlines()
    bad = json.loads(json.loads(lines[0])["oslo.message"])
    bad["payload"]["nova_object.data"]["uuid"] = 42
    lines.insert(3, json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(bad)}))
    dump = tmp_path / "notifications.jsonl"
    dump.write_text("\n".join(lines) + "\n")
    report = ingest_vm_files(Lake(tmp_path / "lake"), [dump])
    assert (report.rows, report.rejects, report.exit_code) == (len(lines) - 1, 1, EXIT_PARTIAL)
    stored = Lake(tmp_path / "lake").read("rejects").to_pylist()
    assert [(r["line"], r["reason"]) for r in stored] == [(4, "wrong JSON type")]


def test_image_from_versioned_and_legacy_payloads_and_a_rebuild_changes_it():
    """Issue 15: the image the VM runs. Versioned: image_uuid (the rebuild sample names another image than the
    create); legacy: image_meta.base_image_ref, else the id at the end of image_ref_url; an empty image_uuid
    (volume-backed instance) is null, an object there is a reject."""
    import pyarrow as pa

    from tracepipe.correlate.leases import build_leases

    create, _ = parse_cloud_text((REAL / "instance-create-end.json").read_text(), "create")
    rebuild, _ = parse_cloud_text((REAL / "instance-rebuild-end.json").read_text(), "rebuild")
    assert create.column("image").to_pylist() == ["155d900f-4e14-4e4c-a73d-069cbf4541e6"]
    assert rebuild.column("image").to_pylist() == ["a2459075-d96c-40d5-893e-577ff92e721c"]

    def legacy(payload: dict) -> dict:
        base = {"instance_id": "vm-1", "tenant_id": "p", "user_id": "u", "state": "active"}
        return {
            "event_type": "instance.create.end",
            "timestamp": "2024-03-12T07:00:00Z",
            "payload": {**base, "uuid": "vm-1", **payload},
        }

    lines = [
        legacy(
            {"image_meta": {"base_image_ref": "img-meta"}, "image_ref_url": "http://g:9292/images/img-url"}
        ),
        legacy({"image_ref_url": "http://glance:9292/images/img-url/"}),
        legacy({"image_uuid": ""}),
        legacy({"image_uuid": {"id": "x"}}),
    ]
    events, rejects = parse_cloud_text("\n".join(json.dumps(m) for m in lines), "legacy", fmt="nova")
    assert events.column("image").to_pylist() == ["img-meta", "img-url", None]
    assert rejects.column("reason").to_pylist() == ["wrong JSON type"]
    _, vms = build_leases(pa.concat_tables([create, rebuild]))
    assert vms.column("image").to_pylist() == ["a2459075-d96c-40d5-893e-577ff92e721c"]  # the latest


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])  # (JSON escapes the C0 ones)
def test_a_vm_name_holding_a_unicode_line_separator_is_one_record(separator):
    # valid inside a JSON string (ensure_ascii=False and `jq -c` write it raw); str.splitlines() cut the line
    # there: the VM's create became two "malformed JSON" rejects and `who` answered "nobody held"
    def rename(message: dict) -> None:
        _data(message)["display_name"] = f"web{separator}01"

    renamed = _story_message()
    rename(renamed)
    text = (
        json.dumps(renamed, ensure_ascii=False)
        + "\r\n"
        + json.dumps(_story_message(2), ensure_ascii=False)
        + "\n"
    )
    assert separator in text
    events, rejects = parse_cloud_text(text, "n.jsonl", fmt="nova")
    assert rejects.num_rows == 0, rejects.to_pylist()
    assert events.column("line").to_pylist() == [1, 2]
    assert events.column("vm_name").to_pylist()[0] == f"web{separator}01"


def test_the_port_deleted_of_a_vm_of_two_nics_ends_its_own_addresses():
    """Cloud review (session 35): Nova names no port for a VM of two NICs (one event, two ports), so Neutron's
    port.delete.end of one of them released nothing; its fixed_ips name the addresses that leave the VM."""
    created = _created(("10.0.0.5", "pa"), ("10.0.1.5", "pb"), ("2001:db8:1::5", "pb"))
    delete = _port_deleted("pb", "10.0.1.5", "2001:db8:1::5")
    assert _leases_of(created, delete, delete) == [  # (delivered twice: one event)
        ("10.0.0.5", "vm-a", "c1", "07:00", None, None),
        ("10.0.1.5", "vm-a", "c1", "07:00", "07:30", "detach"),
        ("2001:db8:1::5", "vm-a", "c1", "07:00", "07:30", "detach"),
    ]
