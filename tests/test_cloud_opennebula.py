"""OpenNebula VM log + `onevm show -x` XML: leases from the NICs over RUNNING..DONE, owner and group from the
XML, hosts from HISTORY_RECORDS, local log time converted with --tz."""

import datetime as dt
import zoneinfo
from pathlib import Path

from tracepipe.correlate.leases import build_leases
from tracepipe.ingest.cloud import detect_format, parse_cloud_text
from tracepipe.ingest.cloud.opennebula import parse_opennebula

DATA = Path(__file__).parent / "data" / "cloud" / "opennebula"
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def utc(h: int, m: int, s: int = 0) -> dt.datetime:
    return dt.datetime(2024, 3, 12, h, m, s, tzinfo=dt.UTC)


def test_log_and_xml_give_leases_running_to_done():
    log = (DATA / "42.log").read_text()
    events, rejects = parse_opennebula(log, (DATA / "42.xml").read_text(), "42.log", tz=BERLIN)
    assert rejects.num_rows == 0
    assert events.column("event_type").to_pylist()[:2] == ["state.PENDING", "state.ACTIVE"]
    assert events.column("line").to_pylist()[-1] == 19
    leases, vms = build_leases(events)
    got = [
        (r["addr"], r["hypervisor"], r["valid_from"], r["valid_to"], r["end_reason"])
        for r in leases.to_pylist()
    ]
    assert got == [
        ("10.10.0.42", "kvm-node-01", utc(8, 0, 41), utc(9, 0), "migrate"),
        ("10.10.0.42", "kvm-node-02", utc(9, 0), utc(10, 30, 25), "delete"),
        ("198.51.100.42", "kvm-node-01", utc(8, 0, 41), utc(9, 0), "migrate"),
        ("198.51.100.42", "kvm-node-02", utc(9, 0), utc(10, 30, 25), "delete"),
        ("2001:db8:42::2a", "kvm-node-01", utc(8, 0, 41), utc(9, 0), "migrate"),
        ("2001:db8:42::2a", "kvm-node-02", utc(9, 0), utc(10, 30, 25), "delete"),
    ]
    assert set(leases.column("vm_name").to_pylist()) == {"sim-node-3"}
    assert set(leases.column("user").to_pylist()) == {"alice"}
    assert set(leases.column("project").to_pylist()) == {"astro-lab"}
    vm = vms.to_pylist()[0]
    assert (vm["vm_id"], vm["status"], vm["created_at"], vm["deleted_at"]) == (
        "42",
        "deleted",
        utc(8, 0),
        utc(10, 30, 25),
    )


def test_log_timezone_default_is_utc():
    events, _ = parse_cloud_text(
        (DATA / "42.log").read_text(), "42.log", fmt="opennebula", xml_text=(DATA / "42.xml").read_text()
    )
    assert events.column("ts").to_pylist()[0] == utc(9, 0)


def test_xml_alone():
    text = (DATA / "42.xml").read_text()
    assert detect_format("42.xml", text) == "opennebula"
    events, rejects = parse_cloud_text(text, "42.xml")
    assert rejects.num_rows == 0
    leases, _ = build_leases(events)
    first = leases.to_pylist()[0]
    assert (first["addr"], first["valid_from"], first["valid_to"]) == (
        "10.10.0.42",
        utc(8, 0, 41),
        utc(9, 0, 12),
    )
    assert leases.column("valid_to").to_pylist()[1] == utc(10, 30, 25)


def test_real_excerpts_and_log_without_xml():
    text = (DATA / "log_excerpts.txt").read_text()
    assert detect_format("27.log", text.split("\n", 2)[2]) == "opennebula"
    events, rejects = parse_opennebula(text, None, "27.log")
    # the comment lines of the excerpt file are no log lines
    assert rejects.column("line").to_pylist() == [1, 2, 7]
    assert events.column("event_type").to_pylist() == [
        "state.ACTIVE",
        "lcm_state.PROLOG",
        "state.ACTIVE",
        "lcm_state.PROLOG",
        "lcm_state.BOOT",
        "lcm_state.BOOT_FAILURE",
    ]
    assert events.column("state").to_pylist()[-1] == "error"
    assert set(events.column("vm_id").to_pylist()) == {"27"}
    assert events.column("ts").to_pylist()[0] == dt.datetime(2020, 5, 13, 11, 44, 53, tzinfo=dt.UTC)
    leases, _ = build_leases(events)
    assert leases.num_rows == 0  # the log names no address


def test_malformed_xml_is_a_reject():
    events, rejects = parse_opennebula(None, "<VM><ID>3</ID", "3.xml")
    assert events.num_rows == 0 and rejects.column("reason").to_pylist() == ["malformed OpenNebula VM XML"]


def test_hostile_opennebula_times_addresses_and_ids():
    log = (DATA / "42.log").read_text().splitlines()
    log.insert(1, "Mon Jan  1 12:00:00 1900 [Z0][VM][I]: New state is ACTIVE")
    log.insert(2, "Fri Dec 31 23:59:59 9999 [Z0][VM][I]: New state is ACTIVE")
    xml = (DATA / "42.xml").read_text()
    # the first NIC's IP is not an address; its IP6 is not written canonically
    bad_nic = "<IP><![CDATA[not-an-ip]]></IP><IP6><![CDATA[2001:DB8::0042]]></IP6><IP><![CDATA["
    xml = xml.replace("<IP><![CDATA[", bad_nic, 1)
    events, rejects = parse_opennebula("\n".join(log), xml, "42.log", tz=BERLIN)
    assert rejects.to_pydict()["line"][:2] == [2, 3]
    assert rejects.to_pydict()["reason"][:2] == ["time out of range"] * 2
    running = [a for a in events.column("addrs").to_pylist() if a]
    assert running and all("2001:db8::42" in a and "not-an-ip" not in a for a in running)
    assert "not an IP address in the address list (dropped)" in rejects.to_pydict()["reason"]


def test_xml_times_out_of_range_are_left_out_and_counted():
    xml = "<VM><ID>7</ID><NAME>x</NAME><STIME>253402300800000</STIME><ETIME>1</ETIME><STATE>3</STATE></VM>"
    events, rejects = parse_opennebula(None, xml, "7.xml")
    assert events.num_rows == 0  # no usable creation time: nothing to say
    assert rejects.to_pydict()["reason"] == ["time out of range in OpenNebula VM XML"] * 2


def test_log_without_a_vm_id_is_rejected_not_landed_with_an_empty_id():
    events, rejects = parse_opennebula("Tue Mar 12 09:00:00 2024 [Z0][VM][I]: New state is PENDING", None, "")
    assert events.num_rows == 0 and rejects.to_pydict()["reason"] == ["no OpenNebula VM id"]


def test_image_of_the_first_disk_that_names_one():
    """Issue 15: TEMPLATE/DISK IMAGE_ID (the id), else the IMAGE name; a volatile disk (no image) before it is
    skipped; no disk at all: null. Every row of the VM carries it, and vms keeps it."""
    xml = (DATA / "42.xml").read_text()
    events, _ = parse_opennebula((DATA / "42.log").read_text(), xml, "42.log", tz=BERLIN)
    assert set(events.column("image").to_pylist()) == {"5"}
    assert build_leases(events)[1].column("image").to_pylist() == ["5"]
    volatile = "<DISK><DISK_ID>0</DISK_ID><TYPE>fs</TYPE><SIZE>1024</SIZE></DISK>"
    named_only = xml.replace("<IMAGE_ID><![CDATA[5]]></IMAGE_ID>", "").replace(
        "<DISK>", volatile + "<DISK>", 1
    )
    assert set(parse_opennebula(None, named_only, "42.xml")[0].column("image").to_pylist()) == {
        "ubuntu-22.04"
    }
    start, end = xml.index("<DISK>"), xml.index("</DISK>") + len("</DISK>")
    no_disk = xml[:start] + xml[end:]
    assert set(parse_opennebula(None, no_disk, "42.xml")[0].column("image").to_pylist()) == {None}
