"""The first version's lease builder, a per-event Python replay, kept only as a test oracle: the vectorised
tracepipe.correlate.leases.build_leases must give the same leases on any history (tests/test_leases.py).
Not part of the package; slow (~40 k events/s)."""

from __future__ import annotations

import bisect
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

# the vocabulary (which action leaves which state, which VM facts the latest event decides) is the package's own:
# the oracle checks the replay, not a second copy of the tables
from tracepipe.correlate.leases import (
    _DEFAULT_STATUS,
    _FLOATING_ACTIONS,
    _GONE,
    _IDENTITY,
    _PASSIVE_PHASES,
)
from tracepipe.schema import VM_LEASES, VMS


def normalise_events(events: pa.Table) -> pl.DataFrame:
    """The replay order and de-duplication are the package's (both builders replay the same sequence)."""
    from tracepipe.correlate.leases import normalise_events as package_order

    return package_order(events)


@dataclass
class _Vm:
    vm_id: str
    cloud: str | None = None
    vm_name: str | None = None
    project: str | None = None
    user: str | None = None
    hypervisor: str | None = None
    status: str | None = None
    # times are µs since the epoch (UTC) inside the replay: ints compare and add far faster than datetimes
    created_at: int | None = None
    first_seen: int | None = None
    deleted_at: int | None = None
    soft_deleted_at: int | None = None
    quarantine_until: int | None = None
    last_event_at: int | None = None
    image: str | None = None
    open: set[str] = field(default_factory=set)  # addresses with an open lease


class _Replay:
    """The state machine: one instance replays one sorted event history."""

    def __init__(
        self,
        reclaim_us: int | None,
        ports: dict[str, list[tuple[int, str]]],
    ) -> None:
        self.reclaim = reclaim_us
        self.vms: dict[str, _Vm] = {}
        self.leases: list[dict[str, Any]] = []
        self.open_by_addr: dict[str, int] = {}  # addr -> index of its open lease
        self.fips: dict[str, str] = {}  # floating IP key (id or address) -> floating address
        self.ports = ports
        self.port_addrs: dict[tuple[str, str | None], set[str]] = {}  # (port, VM or None) -> listed so far

    # ---- leases ----
    def open(self, addr: str, vm_id: str, kind: str, ts: int, hypervisor: str | None) -> None:
        current = self.open_by_addr.get(addr)
        if current is not None:
            if self.leases[current]["vm_id"] == vm_id:
                return
            self.close(addr, ts, "superseded")  # the holder missed its detach: one holder per instant
        self.open_by_addr[addr] = len(self.leases)
        self.leases.append(
            {
                "addr": addr,
                "vm_id": vm_id,
                "addr_kind": kind,
                "valid_from": ts,
                "valid_to": None,
                "end_reason": None,
                "hypervisor": hypervisor,
            }
        )
        if vm_id in self.vms:
            self.vms[vm_id].open.add(addr)

    def close(self, addr: str, ts: int, reason: str) -> None:
        index = self.open_by_addr.pop(addr, None)
        if index is None:
            return
        lease = self.leases[index]
        lease["valid_to"] = ts
        lease["end_reason"] = reason
        holder = self.vms.get(lease["vm_id"])
        if holder is not None:
            holder.open.discard(addr)

    def holder(self, addr: str) -> str | None:
        index = self.open_by_addr.get(addr)
        return None if index is None else self.leases[index]["vm_id"]

    def port_vm(self, port_id: str | None, ts: int) -> str | None:
        history = self.ports.get(port_id or "")
        if not history:
            return None
        position = bisect.bisect_right([t for t, _ in history], ts)
        return history[position - 1][1] if position else history[0][1]

    # ---- events ----
    def apply(self, e: dict[str, Any]) -> None:
        # what an event lists with a port counts for the detaches by port from it on (of its VM, or of any VM
        # when it names none)
        if e["port_id"] and e["addrs"] and not (e["action"] or "").startswith("fip_"):
            self.port_addrs.setdefault((e["port_id"], e["vm_id"]), set()).update(e["addrs"])
        self._apply(e)

    def _apply(self, e: dict[str, Any]) -> None:
        ts: int = e["ts"]
        action: str = e["action"] or "unknown"
        phase = e["_phase"]
        vm = self._vm(e) if e["vm_id"] else None
        if action in _FLOATING_ACTIONS:
            if phase not in _PASSIVE_PHASES or action == "fip_delete":
                self._floating(e, action, ts)
            return
        if vm is None:
            if action == "detach" and phase not in _PASSIVE_PHASES:
                self._detach(None, e, ts)
            return
        if phase in _PASSIVE_PHASES:
            if vm.hypervisor is None and e["hypervisor"] and action != "port_update":
                vm.hypervisor = e["hypervisor"]
            return
        if action in ("delete", "force_delete", "purge"):
            self._delete(vm, action, ts)
            return
        if action == "detach":
            self._detach(vm, e, ts)
            return
        if vm.status in _GONE:
            return  # late echoes of a deleted VM (exists, update) move nothing
        if action == "soft_delete":
            vm.status = "soft_deleted"
            vm.soft_deleted_at = vm.soft_deleted_at or ts
            vm.quarantine_until = vm.soft_deleted_at + self.reclaim if self.reclaim else None
        elif action == "restore":
            vm.status = e["state"] or "active"
            vm.soft_deleted_at = None
            vm.quarantine_until = None
        elif e["state"] and e["state"] != "unknown":
            vm.status = e["state"]
        elif action in _DEFAULT_STATUS:
            vm.status = _DEFAULT_STATUS[action]
        if action != "port_update" and e["hypervisor"] and e["hypervisor"] != vm.hypervisor:
            self._move(vm, e["hypervisor"], ts)
        elif action == "port_update" and vm.hypervisor is None:
            vm.hypervisor = e["hypervisor"]  # the port's binding host, when Nova said nothing yet
        kind = e["addr_kind"] or "fixed"
        for addr in e["addrs"] or ():
            self.open(addr, vm.vm_id, kind, ts, vm.hypervisor)
        if action == "attach" and e["addr"]:
            self.open(e["addr"], vm.vm_id, kind, ts, vm.hypervisor)

    def _vm(self, e: dict[str, Any]) -> _Vm:
        vm = self.vms.get(e["vm_id"])
        if vm is None:
            vm = self.vms[e["vm_id"]] = _Vm(e["vm_id"])
            # fixed in the oracle (the first version missed it): a floating IP pointed at this VM through its
            # port before the VM's first event is the VM's too, so that its delete ends it
            vm.open = {a for a, i in self.open_by_addr.items() if self.leases[i]["vm_id"] == vm.vm_id}
        return vm

    def _move(self, vm: _Vm, hypervisor: str, ts: int) -> None:
        """Hypervisor changed (live migration, unshelve elsewhere): split the open leases there."""
        if vm.hypervisor is not None:
            for addr in sorted(vm.open):
                kind = self.leases[self.open_by_addr[addr]]["addr_kind"]
                self.close(addr, ts, "migrate")
                self.open(addr, vm.vm_id, kind, ts, hypervisor)
        vm.hypervisor = hypervisor

    def _delete(self, vm: _Vm, action: str, ts: int) -> None:
        if vm.status in _GONE and action != "purge":
            return
        for addr in sorted(vm.open):
            self.close(addr, ts, action)
        if action == "purge":
            vm.status = "purged"
            vm.deleted_at = vm.deleted_at or ts
            return
        vm.status = "deleted"
        vm.deleted_at = ts
        if action == "force_delete" or self.reclaim is None:
            vm.quarantine_until = None
        elif vm.soft_deleted_at is not None:
            # Nova's reclaim at the window's end, or an earlier force delete (Nova sends instance.delete.* for
            # both): either way the image was kept until this delete at the latest
            vm.quarantine_until = min(vm.soft_deleted_at + self.reclaim, ts)
        else:
            vm.quarantine_until = ts + self.reclaim

    def _detach(self, vm: _Vm | None, e: dict[str, Any], ts: int) -> None:
        vm_id = vm.vm_id if vm else self.port_vm(e["port_id"], ts)
        if e["addr"]:
            targets = {e["addr"]}
        elif e["addrs"] is not None and vm is not None:
            # Nova sends the full list after the detach: whatever fixed address is missing went away
            targets = {a for a in vm.open if self.leases[self.open_by_addr[a]]["addr_kind"] == "fixed"}
            targets -= set(e["addrs"])
        elif e["port_id"]:
            # Neutron port.delete: only the port id; what the port's VM (or no VM) listed with it before
            targets = self.port_addrs.get((e["port_id"], vm_id), set()) | self.port_addrs.get(
                (e["port_id"], None), set()
            )
        else:
            targets = set()
        for addr in sorted(targets):
            if vm_id is None or self.holder(addr) == vm_id:
                self.close(addr, ts, "detach")

    def _floating(self, e: dict[str, Any], action: str, ts: int) -> None:
        key = e["resource_id"] or e["addr"]
        if not key:
            return
        previous = self.fips.get(key)
        address = e["addr"] or previous
        if action != "fip_associate":
            # close what the floating IP pointed at, under the address known so far and the one named now
            for name in sorted({a for a in (previous, e["addr"]) if a}):
                if (
                    self.holder(name) is not None
                    and self.leases[self.open_by_addr[name]]["addr_kind"] == "floating"
                ):
                    self.close(name, ts, action)
            if address:
                self.fips[key] = address
            return
        if address is None:
            return
        if previous and previous != address:
            self.close(previous, ts, "fip_reassociate")
        self.fips[key] = address
        fixed = (e["addrs"] or [None])[0]
        vm_id = (
            e["vm_id"]
            or self.port_vm(e["port_id"], ts)
            or (self.holder(fixed) if fixed else None)
            or (f"port:{e['port_id']}" if e["port_id"] else f"fixed:{fixed}")
        )
        holder = self.holder(address)
        if holder is not None and holder != vm_id:
            self.close(address, ts, "fip_reassociate")
        hypervisor = self.vms[vm_id].hypervisor if vm_id in self.vms else None
        self.open(address, vm_id, "floating", ts, hypervisor)


def _port_maps(frame: pl.DataFrame) -> dict[str, list[tuple[int, str]]]:
    """port id -> [(ts, vm id)] sorted, from every event naming both."""
    ports: dict[str, list[tuple[int, str]]] = {}
    named = frame.filter(pl.col("port_id").is_not_null() & ~pl.col("action").str.starts_with("fip_"))
    for ts, port_id, vm_id in named.select("ts", "port_id", "vm_id").iter_rows():
        if vm_id:
            ports.setdefault(port_id, []).append((ts, vm_id))
    for history in ports.values():
        history.sort()
    return ports


def _set_identities(vms: dict[str, _Vm], frame: pl.DataFrame) -> None:
    """Name, project, user, cloud, image: the latest non-null value over the VM's own events (Neutron rows carry the
    port's project, so they only count when nothing else names the VM); created_at = first create event,
    else first event; last_event_at = last event."""
    own = pl.col("action").is_in(["port_update", "fip_associate"]).not_()
    facts = (
        frame.filter(pl.col("vm_id").is_not_null())
        .group_by("vm_id", maintain_order=True)
        .agg(
            *[
                pl.coalesce(
                    pl.col(name).filter(own).drop_nulls().last(), pl.col(name).drop_nulls().last()
                ).alias(name)
                for name in _IDENTITY
            ],
            pl.col("ts").filter(pl.col("action") == "create").first().alias("created"),
            pl.col("ts").first().alias("first_seen"),
            pl.col("ts").last().alias("last_event_at"),
        )
    )
    for vm_id, vm_name, project, user, cloud, image, created, first_seen, last_event_at in facts.iter_rows():
        vm = vms.get(vm_id)
        if vm is None:
            continue
        vm.vm_name, vm.project, vm.user, vm.cloud, vm.image = vm_name, project, user, cloud, image
        vm.created_at = created if created is not None else first_seen
        vm.first_seen, vm.last_event_at = first_seen, last_event_at


def _timestamps(values: list[int | None]) -> pa.Array:
    return pa.array(values, pa.int64()).cast(VM_LEASES.field("valid_from").type)


def build_leases(events: pa.Table, reclaim_interval: dt.timedelta | None = None) -> tuple[pa.Table, pa.Table]:
    """Whole event history -> (vm_leases, vms) tables in schema.VM_LEASES / schema.VMS, sorted.

    The replay walks the events one by one (a state machine over VMs and addresses; times as integer µs):
    lifecycle volume is small next to flows (hundreds of VMs an hour make ~10^6 events a month)."""
    frame = normalise_events(events)
    if frame.height:
        frame = frame.with_columns(pl.col("ts").dt.epoch("us"))
    reclaim_us = None if reclaim_interval is None else reclaim_interval // dt.timedelta(microseconds=1)
    replay = _Replay(reclaim_us, _port_maps(frame) if frame.height else {})
    columns = [
        "ts",
        "_phase",
        "action",
        "vm_id",
        "state",
        "addrs",
        "addr",
        "addr_kind",
        "port_id",
        "resource_id",
        "hypervisor",
    ]
    if frame.height:
        for e in frame.select(columns).iter_rows(named=True):
            replay.apply(e)
    if frame.height:
        _set_identities(replay.vms, frame)
    kept = [
        lease
        for lease in replay.leases
        if lease["valid_to"] is None or lease["valid_to"] > lease["valid_from"]
    ]
    kept.sort(key=lambda lease: (lease["addr"], lease["valid_from"], lease["vm_id"]))
    # a VM's lease superseded by another VM's claim that held the address for no time, taken back at once:
    # one lease (the zero-length one between is gone), or two split by the VM's move at that instant
    joined: list[dict[str, Any]] = []
    for lease in kept:
        last = joined[-1] if joined else None
        if (
            last is not None
            and last["end_reason"] == "superseded"
            and last["valid_to"] == lease["valid_from"]
            and all(last[k] == lease[k] for k in ("addr", "vm_id", "hypervisor", "addr_kind"))
        ):
            last["valid_to"], last["end_reason"] = lease["valid_to"], lease["end_reason"]
            continue
        if (
            last is not None
            and last["end_reason"] == "superseded"
            and last["valid_to"] == lease["valid_from"]
            and all(last[k] == lease[k] for k in ("addr", "vm_id", "addr_kind"))
        ):  # the VM moved at that instant: its lease ends as a move ends it, without the other VM's claim
            last["end_reason"] = "migrate"
        joined.append(lease)
    kept = joined
    vm_of = [replay.vms.get(lease["vm_id"]) for lease in kept]

    def vm_field(name: str) -> list[Any]:
        return [getattr(vm, name) if vm is not None else None for vm in vm_of]

    lease_table = pa.table(
        {
            "addr": [lease["addr"] for lease in kept],
            "vm_id": [lease["vm_id"] for lease in kept],
            "vm_name": vm_field("vm_name"),
            "project": vm_field("project"),
            "user": vm_field("user"),
            "hypervisor": [lease["hypervisor"] for lease in kept],
            "cloud": vm_field("cloud"),
            "addr_kind": [lease["addr_kind"] for lease in kept],
            "valid_from": _timestamps([lease["valid_from"] for lease in kept]),
            "valid_to": _timestamps([lease["valid_to"] for lease in kept]),
            "end_reason": [lease["end_reason"] for lease in kept],
            "vm_status": vm_field("status"),
            "quarantine_until": _timestamps(vm_field("quarantine_until")),
        },
        schema=VM_LEASES,
    )
    vms = sorted(replay.vms.values(), key=lambda vm: vm.vm_id)
    vm_table = pa.table(
        {
            "vm_id": [vm.vm_id for vm in vms],
            "cloud": [vm.cloud for vm in vms],
            "vm_name": [vm.vm_name for vm in vms],
            "project": [vm.project for vm in vms],
            "user": [vm.user for vm in vms],
            "hypervisor": [vm.hypervisor for vm in vms],
            "status": [vm.status or "unknown" for vm in vms],
            "created_at": _timestamps(
                [vm.created_at if vm.created_at is not None else vm.first_seen for vm in vms]
            ),
            "deleted_at": _timestamps([vm.deleted_at for vm in vms]),
            "quarantine_until": _timestamps([vm.quarantine_until for vm in vms]),
            "first_event_at": _timestamps([vm.first_seen for vm in vms]),
            "last_event_at": _timestamps([vm.last_event_at for vm in vms]),
            "image": [vm.image for vm in vms],
            "vm_key": [None] * len(vms),  # assigned when the lease writer commits vms (correlate/vm_keys.py)
            "identity_changed_at": _timestamps([None] * len(vms)),  # so is this one
        },
        schema=VMS,
    )
    return lease_table, vm_table
