"""OpenNebula VM log (`/var/log/one/<id>.log`) + the VM's XML (`onevm show -x <id>`) -> schema.VM_EVENTS rows.

The log gives the state changes (`<ctime> [Z0][VM][I]: New state is ACTIVE`, `... New LCM state is RUNNING`)
in the frontend's local time (pass `tz`); it names no address. The XML gives owner (UNAME), group (GNAME, used
as the project), name, the NICs' addresses, the image of its first disk (TEMPLATE/DISK IMAGE_ID, else IMAGE) and
the hosts the VM ran on (HISTORY_RECORDS, epoch seconds).
Every RUNNING event carries the NIC addresses, DONE deletes: leases then span RUNNING..DONE.
Without a log, the XML alone yields create (STIME), running per host (HISTORY RSTIME) and done (ETIME).
"""

from __future__ import annotations

import datetime as dt
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import PurePath

import pyarrow as pa

from tracepipe.ingest.cloud.common import BadRecord, EventColumns, RejectColumns
from tracepipe.limits import text_lines
from tracepipe.units import in_time_window

CLOUD = "opennebula"

_LINE = re.compile(
    r"^(?P<ts>\w{3} \w{3} +\d{1,2} \d\d:\d\d:\d\d \d{4}) \[Z(?P<zone>\d+)\]\[(?P<module>\w+)\]"
    r"\[(?P<level>[IWED])\]: (?P<message>.*)$"
)
_STATE = re.compile(r"^New (?P<lcm>LCM )?state is (?P<state>[A-Z_0-9]+)")

# VmState -> (action, state); names from include/VirtualMachine.h
VM_STATE_EVENTS: dict[str, tuple[str, str | None]] = {
    "INIT": ("create", "building"),
    "PENDING": ("create", "building"),
    "HOLD": ("update", "building"),
    "ACTIVE": ("update", None),  # the LCM state that follows says more
    "STOPPED": ("power_off", "stopped"),
    "SUSPENDED": ("update", "suspended"),
    "DONE": ("delete", "deleted"),
    "FAILED": ("update", "error"),
    "POWEROFF": ("power_off", "stopped"),
    "UNDEPLOYED": ("shelve_offload", "shelved"),
    "CLONING": ("update", "building"),
    "CLONING_FAILURE": ("update", "error"),
}
# LcmState -> (action, state); the rest -> ("update", None)
LCM_STATE_EVENTS: dict[str, tuple[str, str | None]] = {
    "RUNNING": ("power_on", "active"),
    "PROLOG": ("update", "building"),
    "BOOT": ("update", "building"),
    "MIGRATE": ("migrate", "active"),
    "BOOT_MIGRATE": ("migrate", "active"),
    "PROLOG_MIGRATE": ("migrate", None),
    "SAVE_MIGRATE": ("migrate", None),
    "UNKNOWN": ("update", "unknown"),
}


@dataclass
class OneVm:
    """What the XML says about one VM."""

    vm_id: str
    name: str | None = None
    user: str | None = None
    group: str | None = None
    stime: dt.datetime | None = None
    etime: dt.datetime | None = None
    state: int | None = None
    image: str | None = None  # the first disk's IMAGE_ID (else its IMAGE name): what the VM boots
    addrs: list[str] = field(default_factory=list)
    history: list[tuple[dt.datetime, dt.datetime | None, str]] = field(
        default_factory=list
    )  # start, end, host
    running: list[tuple[dt.datetime, str]] = field(default_factory=list)  # (RSTIME, host)
    problems: list[str] = field(default_factory=list)  # XML values that were ignored (time out of range)

    def host_at(self, ts: dt.datetime) -> str | None:
        host = None  # before the first placement the VM is on no host
        for start, _end, hostname in sorted(self.history):
            if start <= ts:
                host = hostname
        return host


def _epoch(text: str | None) -> dt.datetime | None:
    """Epoch seconds from the XML -> UTC; None when 0 or empty (not set), BadRecord outside 1990..now+1 day."""
    if not text or not text.strip().isdigit() or int(text) <= 0:
        return None
    try:
        ts = dt.datetime.fromtimestamp(int(text), dt.UTC)
    except (OverflowError, ValueError, OSError):
        ts = None
    if ts is None or not in_time_window(ts):
        raise BadRecord("time out of range", f"epoch {text.strip()[:30]} (accepted: 1990 to now + 1 day)")
    return ts


def parse_vm_xml(xml_text: str) -> OneVm:
    """`onevm show -x` output -> OneVm. Raises ValueError when it is not a VM document (no numeric VM ID).
    A time out of range is left out and named in `problems`."""
    root = ET.fromstring(xml_text)
    if root.tag != "VM" or not (root.findtext("ID") or "").strip().isdigit():
        raise ValueError("not an OpenNebula VM document (expected <VM><ID>number</ID>...)")
    problems: list[str] = []

    def epoch(element: ET.Element, tag: str) -> dt.datetime | None:
        try:
            return _epoch(element.findtext(tag))
        except BadRecord as bad:
            problems.append(f"{tag}: {bad.detail}")
            return None

    vm = OneVm(
        vm_id=root.findtext("ID", "").strip(),
        name=root.findtext("NAME"),
        user=root.findtext("UNAME"),
        group=root.findtext("GNAME"),
        stime=epoch(root, "STIME"),
        etime=epoch(root, "ETIME"),
        state=int(root.findtext("STATE")) if (root.findtext("STATE") or "").isdigit() else None,
        problems=problems,
    )
    for disk in root.findall("TEMPLATE/DISK"):  # in DISK_ID order; volatile disks name no image
        image = (disk.findtext("IMAGE_ID") or "").strip() or (disk.findtext("IMAGE") or "").strip()
        if image:
            vm.image = image
            break
    for nic in root.findall("TEMPLATE/NIC") + root.findall("TEMPLATE/NIC_ALIAS"):
        for tag in ("IP", "IP6_GLOBAL", "IP6", "IP6_ULA"):
            value = (nic.findtext(tag) or "").strip()
            if value and value not in vm.addrs:
                vm.addrs.append(value)
    for record in root.findall("HISTORY_RECORDS/HISTORY"):
        start = epoch(record, "STIME")
        host = (record.findtext("HOSTNAME") or "").strip()
        if start is None or not host:
            continue
        vm.history.append((start, epoch(record, "ETIME"), host))
        running = epoch(record, "RSTIME") or start
        vm.running.append((running, host))
    return vm


def _parse_ctime(text: str, tz: dt.tzinfo) -> dt.datetime:
    # ctime pads a one-digit day with a space: "Wed May  3 11:44:53 2020"
    local = dt.datetime.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y")
    return local.replace(tzinfo=tz).astimezone(dt.UTC)


def parse_opennebula(
    log_text: str | None,
    xml_text: str | None,
    source: str = "",
    tz: dt.tzinfo = dt.UTC,
    vm_id: str | None = None,
) -> tuple[pa.Table, pa.Table]:
    """A VM log and/or its XML -> (vm_events, rejects). The VM id comes from the XML, else `vm_id`, else the
    log's file name (`27.log`). Lines that are not OpenNebula log lines are rejects; other messages are skipped."""
    columns = EventColumns()
    rejects = RejectColumns(source)
    vm: OneVm | None = None
    if xml_text is not None:
        try:
            vm = parse_vm_xml(xml_text)
        except (ET.ParseError, ValueError) as exc:
            rejects.add(getattr(exc, "position", (None,))[0], "malformed OpenNebula VM XML", str(exc))
    if vm is None:
        stem = PurePath(source).stem if source else ""
        vm = OneVm(vm_id=vm_id or stem)
    for problem in vm.problems:
        rejects.add(None, "time out of range in OpenNebula VM XML", problem)
    if not vm.vm_id:  # rows without a VM id would land with vm_id empty: nothing could ever find them
        rejects.add(None, "no OpenNebula VM id", "name the log <id>.log or give the VM's XML with it")
        return columns.table(), rejects.table()

    def add(
        ts: dt.datetime,
        event_type: str,
        action: str,
        state: str | None,
        addrs: list[str] | None,
        line: int | None,
    ) -> None:
        columns.add(
            ts=ts,
            cloud=CLOUD,
            vm_id=vm.vm_id,
            vm_name=vm.name,
            project=vm.group,
            user=vm.user,
            hypervisor=vm.host_at(ts),
            event_type=event_type,
            action=action,
            state=state,
            addrs=addrs,
            addr_kind="fixed" if addrs else None,
            source=source,
            line=line,
            image=vm.image,
        )

    if log_text is not None:
        for number, line in enumerate(text_lines(log_text), start=1):
            if not line.strip():
                continue
            match = _LINE.match(line)
            if match is None:
                rejects.add(number, "not an OpenNebula log line", line)
                continue
            state_match = _STATE.match(match["message"])
            if state_match is None:
                continue  # driver output, commands: evidence for a human, not lifecycle
            try:
                ts = _parse_ctime(match["ts"], tz)
            except (ValueError, OverflowError):
                rejects.add(number, "bad OpenNebula log date", line)
                continue
            if not in_time_window(ts):
                rejects.add(number, "time out of range", line)
                continue
            name = state_match["state"]
            if state_match["lcm"]:
                action, state = LCM_STATE_EVENTS.get(name, ("update", "error" if "FAILURE" in name else None))
                event_type = f"lcm_state.{name}"
            else:
                action, state = VM_STATE_EVENTS.get(name, ("unknown", None))
                event_type = f"state.{name}"
            add(ts, event_type, action, state, list(vm.addrs) if name == "RUNNING" else None, number)
    elif xml_text is not None and vm.stime is not None:
        add(vm.stime, "xml.stime", "create", "building", None, None)
        for running, host in vm.running:
            columns.add(
                ts=running,
                cloud=CLOUD,
                vm_id=vm.vm_id,
                vm_name=vm.name,
                project=vm.group,
                user=vm.user,
                hypervisor=host,
                event_type="xml.history.rstime",
                action="power_on",
                state="active",
                addrs=list(vm.addrs),
                addr_kind="fixed" if vm.addrs else None,
                source=source,
                image=vm.image,
            )
        if vm.etime is not None and vm.state == 6:  # DONE
            add(vm.etime, "xml.etime", "delete", "deleted", None, None)
    return columns.finish(rejects), rejects.table()
