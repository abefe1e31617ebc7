"""Every dataset of the lake, declared once: its Arrow schema and the column its UTC-day partition comes from.

Everything else imports from here. Column names are NetFlow/IPFIX-flavoured and stable (users write SQL
against them). Types are chosen so that DuckDB, polars, pyarrow and Spark read them alike: signed integers
only (Spark has no unsigned types), timestamps in microseconds with tz=UTC, addresses as canonical text.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

# The VM identity facts attribution copies into flow files (FLOWS src_<fact>/dst_<fact>) from vms: what names
# a VM; its status, deletion and quarantine change for every VM and are always read from vms
VM_FACTS = ("vm_name", "project", "user", "hypervisor", "image")

FLOWS = pa.schema(
    [
        pa.field("ts_start", TS, nullable=False),
        pa.field("ts_end", TS, nullable=False),
        pa.field("src_addr", pa.string(), nullable=False),  # canonical text: 10.1.2.3, 2001:db8::1
        pa.field("dst_addr", pa.string(), nullable=False),
        pa.field("src_port", pa.int32()),
        pa.field("dst_port", pa.int32()),  # ICMP: type*256+code, as NetFlow exporters put it
        pa.field("proto", pa.int16()),
        pa.field("packets", pa.int64()),
        pa.field("bytes", pa.int64()),
        pa.field("tcp_flags", pa.int16()),  # cumulative OR of the flow's TCP flags
        pa.field("ip_version", pa.int8()),
        pa.field("exporter", pa.string()),  # address of the exporter that sent the record
        pa.field("input_if", pa.int32()),
        pa.field("output_if", pa.int32()),
        pa.field("sampling_interval", pa.int32()),  # null = unknown (exporter sent no options template)
        pa.field("source", pa.string()),  # evidence: file path or collector spool segment it came from
        pa.field("src_vm", pa.string()),  # vm_id holding src_addr at ts_start; null until attributed
        pa.field("dst_vm", pa.string()),
        # when src_vm/dst_vm were looked up in vm_leases; null = not yet (flows_attributed joins at query time)
        pa.field("attributed_at", TS),
        # Added after lakes existed (issue 14), so last. The sensor's own connection id and TCP state words,
        # null for NetFlow: Zeek's `uid` (pivot to its other logs), `conn_state` (Zeek's, or argus' State)
        # and Zeek's `history`. Both rows of a bidirectional connection carry them; detectors read tcp_flags
        # (tracepipe.flowstate), which the readers derive from these.
        pa.field("uid", pa.string()),
        pa.field("conn_state", pa.string()),
        pa.field("history", pa.string()),
        # tunnelled traffic (issue 16): src/dst/proto/ports above are the inner conversation, read from the packet
        # bytes a router exported (IPFIX IE 313/315); these keep the outer (tunnel) header. Null when not tunnelled
        pa.field("tunnel_src_addr", pa.string()),
        pa.field("tunnel_dst_addr", pa.string()),
        pa.field("tunnel_proto", pa.int16()),
        # what routers say about a flow beyond its 5-tuple (issue 16); null where the exporter did not say
        pa.field("flow_direction", pa.string()),  # IE 61: "ingress" / "egress" (another code: its number)
        pa.field(
            "flow_end_reason", pa.string()
        ),  # IE 136: idleTimeout, activeTimeout, endOfFlowDetected, ...
        # IE 70-79, top first, as nfdump prints mpls1..mpls10: "label-exp-S" each, space-separated
        pa.field("mpls_labels", pa.string()),
        pa.field("ingress_vrf", pa.int64()),  # IE 234 ingressVRFID
        pa.field("egress_vrf", pa.int64()),  # IE 235 egressVRFID
        pa.field(
            "input_if_name", pa.string()
        ),  # IE 82 (else 83) of input_if, from the exporter's options data
        pa.field("output_if_name", pa.string()),
        # issue 16, firewall/NAT routers and SRv6 (ROUTER_EXTRA_COLUMNS); null where the exporter did not say.
        # A NAT'd flow's post-NAT source is the public address a CSIRT reports (README: the nat_inside macro)
        pa.field("nat_src_addr", pa.string()),  # IE 225 / 281 (Cisco NSEL v9: 40001)
        pa.field("nat_dst_addr", pa.string()),  # IE 226 / 282 (40002)
        pa.field("nat_src_port", pa.int32()),  # IE 227 (40003)
        pa.field("nat_dst_port", pa.int32()),  # IE 228 (40004)
        pa.field("nat_event", pa.string()),  # IE 230 natEvent: IANA name ("NAT44 session create", ...)
        pa.field(
            "fw_event", pa.string()
        ),  # IE 233 firewallEvent (40005): CREATE, DELETE, DENIED, ALERT, UPDATE
        pa.field("fw_ext_event", pa.int32()),  # Cisco NSEL 33002 extended event code (reason, e.g. 2025)
        pa.field("ingress_vrf_name", pa.string()),  # options data: IE 236 VRFname of ingress_vrf
        pa.field("egress_vrf_name", pa.string()),
        pa.field("srv6_active_segment", pa.string()),  # IE 495 srhActiveSegmentIPv6
        pa.field("srv6_segments", pa.string()),  # IE 497 (or 496): the SRH's segment list, space-separated
        pa.field("mpls_vpn_rd", pa.string()),  # IE 90 mplsVpnRouteDistinguisher (RFC 4364 text: 65000:100)
        # IE 5 ipClassOfService (v1/v5/v7: the record's tos byte): DSCP << 2 | ECN. Null where not exported
        pa.field("tos", pa.int16()),
        # issue 18: the vms.vm_key of src_vm/dst_vm, written with them at attribution, so that flows_attributed
        # joins vms on integers (correlate/vm_keys.py). Null where src_vm/dst_vm is null, and in files
        # attributed before the column existed (the view then joins on src_vm/dst_vm)
        pa.field("src_vm_key", pa.int64()),
        pa.field("dst_vm_key", pa.int64()),
        # issue 18 item 4: each end's VM identity as vms held it when the file was attributed (vm_facts_at set),
        # so that flows_attributed need not join 3 M vms rows per end on every query. What a VM is NOW is
        # flows_attributed's: it overrides these from vms for the VMs whose identity changed since
        # (vms.identity_changed_at); read them there, not here. Null in files attributed before they existed
        *(pa.field(f"{end}_{fact}", pa.string()) for end in ("src", "dst") for fact in VM_FACTS),
        pa.field("vm_facts_at", TS),  # when the facts above were copied from vms; null: not stored, joined
    ]
)

# columns only tunnelled flows fill (issue 16); readers of other sources leave them null
TUNNEL_COLUMNS = ("tunnel_src_addr", "tunnel_dst_addr", "tunnel_proto")
# columns only router exports (NetFlow v9 / IPFIX) fill (issue 16); other readers leave them null
ROUTER_COLUMNS = (
    "flow_direction",
    "flow_end_reason",
    "mpls_labels",
    "ingress_vrf",
    "egress_vrf",
    "input_if_name",
    "output_if_name",
)
# filled by firewall/NAT routers (Cisco ASA NSEL, NEL loggers) and SRv6 routers (issue 16); others leave them null
ROUTER_EXTRA_COLUMNS = (
    "nat_src_addr",
    "nat_dst_addr",
    "nat_src_port",
    "nat_dst_port",
    "nat_event",
    "fw_event",
    "fw_ext_event",
    "ingress_vrf_name",
    "egress_vrf_name",
    "srv6_active_segment",
    "srv6_segments",
    "mpls_vpn_rd",
)

# One row per lifecycle event, whatever the cloud. `action` is normalised (see VM_ACTIONS); the cloud's own
# event name stays in `event_type`. `addrs` lists every address the VM holds according to this event (Nova
# sends the full list on most events); `addr` is the one address an attach/detach/floating-IP event is about.
VM_EVENTS = pa.schema(
    [
        pa.field("ts", TS, nullable=False),
        pa.field("cloud", pa.string(), nullable=False),  # e.g. "openstack", "opennebula", or a site name
        pa.field("vm_id", pa.string()),
        pa.field("vm_name", pa.string()),
        pa.field("project", pa.string()),
        pa.field("user", pa.string()),
        pa.field("hypervisor", pa.string()),
        pa.field("event_type", pa.string()),  # as the cloud names it: instance.soft_delete.end
        pa.field("action", pa.string()),  # normalised, one of VM_ACTIONS
        pa.field("state", pa.string()),  # VM state after the event, normalised, one of VM_STATES (or null)
        pa.field("addrs", pa.list_(pa.string())),
        pa.field("addr", pa.string()),
        pa.field("addr_kind", pa.string()),  # "fixed" or "floating"
        pa.field("port_id", pa.string()),
        pa.field("event_id", pa.string()),  # message id, for de-duplicating at-least-once delivery
        pa.field("source", pa.string()),
        pa.field("line", pa.int64()),
        pa.field("resource_id", pa.string()),  # what the event is about when not the VM: floating IP id
        # the image the VM runs: Nova's image_uuid, OpenNebula's IMAGE_ID (else IMAGE name), the generic form's
        # `image`; null when the source does not say (Neutron). Last column: added after lakes existed
        pa.field("image", pa.string()),
    ]
)

VM_ACTIONS = (
    "create",
    "update",
    "exists",
    "power_on",
    "power_off",
    "reboot",
    "rebuild",
    "shelve",
    "shelve_offload",
    "unshelve",
    "soft_delete",
    "restore",
    "delete",
    "force_delete",
    "purge",
    "migrate",
    "attach",
    "detach",
    "fip_associate",
    "fip_disassociate",
    "fip_delete",
    "port_update",
    "unknown",
)
VM_STATES = (
    "building",
    "active",
    "stopped",
    "paused",
    "suspended",
    "shelved",
    "soft_deleted",
    "deleted",
    "purged",
    "error",
    "unknown",
)

# Who held which address from when to when. valid_to null = still held.
VM_LEASES = pa.schema(
    [
        pa.field("addr", pa.string(), nullable=False),
        pa.field("vm_id", pa.string(), nullable=False),
        pa.field("vm_name", pa.string()),
        pa.field("project", pa.string()),
        pa.field("user", pa.string()),
        pa.field("hypervisor", pa.string()),
        pa.field("cloud", pa.string()),
        pa.field("addr_kind", pa.string()),  # fixed / floating
        pa.field("valid_from", TS, nullable=False),
        pa.field("valid_to", TS),
        pa.field("end_reason", pa.string()),  # detach, delete, force_delete, fip_disassociate, ...
        pa.field("vm_status", pa.string()),  # what the VM is now, one of VM_STATES
        pa.field("quarantine_until", TS),  # deleted under deferred deletion: image kept until then
    ]
)

# One row per VM: what it is now.
VMS = pa.schema(
    [
        pa.field("vm_id", pa.string(), nullable=False),
        pa.field("cloud", pa.string()),
        pa.field("vm_name", pa.string()),
        pa.field("project", pa.string()),
        pa.field("user", pa.string()),
        pa.field("hypervisor", pa.string()),
        pa.field("status", pa.string()),
        pa.field("created_at", TS),
        pa.field("deleted_at", TS),
        pa.field("quarantine_until", TS),
        # the VM's earliest event (created_at is its first create when it has one): where an update that reads
        # back a deleted VM's events starts (correlate/leases._history). Null in rows written before it existed
        pa.field("first_event_at", TS),
        pa.field("last_event_at", TS),
        pa.field("image", pa.string()),  # the image it runs now (or last ran): the latest event naming one
        # issue 18: a dense integer per VM, assigned once and kept forever (correlate/vm_keys.py); flow files
        # carry it as src_vm_key/dst_vm_key. Null in rows written before the column existed
        pa.field("vm_key", pa.int64()),
        # issue 18 item 4: when one of VM_FACTS of this VM first changed after its first vms row (a chown, a
        # rename, a rebuild's image, a migration's hypervisor); null = never. flows_attributed takes those VMs'
        # facts from here instead of what flow files stored at attribution (correlate/vm_keys.py sets it)
        pa.field("identity_changed_at", TS),
    ]
)

VM_LOGS = pa.schema(
    [
        pa.field("ts", TS, nullable=False),
        pa.field("sender_addr", pa.string()),  # address the line came from (rsyslog forwarder), if known
        pa.field("hostname", pa.string()),
        pa.field("app", pa.string()),
        pa.field("pid", pa.int64()),
        pa.field("facility", pa.int16()),
        pa.field("severity", pa.int16()),
        pa.field("message", pa.string()),
        pa.field("vm_id", pa.string()),  # attributed by sender address and time
        pa.field("auth_event", pa.string()),  # sshd: failed / accepted / invalid_user / null
        pa.field("auth_user", pa.string()),
        pa.field("auth_src_addr", pa.string()),
        pa.field("auth_method", pa.string()),  # password / publickey / keyboard-interactive
        pa.field("source", pa.string()),
        pa.field("line", pa.int64()),
    ]
)

# Ground-truth labels that came with a flow input (argus binetflow `Label`), kept for evaluation only: the
# detectors read `flows`, never this. One row per labelled flow record, with the flow's key to join it back.
FLOW_LABELS = pa.schema(
    [
        pa.field("ts_start", TS, nullable=False),
        pa.field("src_addr", pa.string()),
        pa.field("dst_addr", pa.string()),
        pa.field("src_port", pa.int32()),
        pa.field("dst_port", pa.int32()),
        pa.field("proto", pa.int16()),
        pa.field("label", pa.string()),
        pa.field("source", pa.string()),
        pa.field("line", pa.int64()),
    ]
)

INTEL = pa.schema(
    [
        pa.field("indicator", pa.string(), nullable=False),  # address, CIDR or domain as given
        pa.field("kind", pa.string()),  # ip / cidr / domain
        pa.field("net_lo", pa.string()),  # CIDRs: first and last address, canonical text
        pa.field("net_hi", pa.string()),
        pa.field("ip_version", pa.int8()),
        pa.field("description", pa.string()),
        pa.field("tags", pa.string()),
        pa.field("event_id", pa.string()),
        pa.field("first_seen", TS),
        pa.field("imported_at", TS, nullable=False),
        pa.field("source", pa.string()),
    ]
)

ALERTS = pa.schema(
    [
        pa.field(
            "alert_id", pa.string(), nullable=False
        ),  # deterministic: re-running a sweep raises no duplicate
        pa.field("detector", pa.string(), nullable=False),
        pa.field("window_start", TS, nullable=False),
        pa.field("window_end", TS, nullable=False),
        pa.field("addr", pa.string()),
        pa.field("peer", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("reason", pa.string()),
        pa.field("vm_id", pa.string()),
        pa.field("vm_name", pa.string()),
        pa.field("project", pa.string()),
        pa.field("user", pa.string()),
        pa.field("hypervisor", pa.string()),
        pa.field("vm_status", pa.string()),
        pa.field("quarantine_until", TS),
        pa.field("features", pa.string()),  # JSON: the numbers that made it stand out
        pa.field("evidence", pa.string()),  # JSON: top flows / peers / ports
        pa.field("pipeline", pa.string()),
        pa.field("created_at", TS, nullable=False),
    ]
)

REJECTS = pa.schema(
    [
        pa.field("ingested_at", TS, nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # file path or spool segment
        pa.field("offset", pa.int64()),  # byte offset in the file (pcap, spool) ...
        pa.field("line", pa.int64()),  # ... or line number (text inputs)
        pa.field("exporter", pa.string()),
        pa.field("reason", pa.string(), nullable=False),  # short, countable: "truncated pcap record", ...
        pa.field("detail", pa.string()),
    ]
)

INGEST_MANIFEST = pa.schema(
    [
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("rows", pa.int64()),
        pa.field("rejects", pa.int64()),
        pa.field("files", pa.list_(pa.string())),
        pa.field("ingested_at", TS, nullable=False),
        pa.field("stats", pa.string()),  # JSON summary of the ingest (per exporter counts, ...)
    ]
)


@dataclass(frozen=True)
class Dataset:
    name: str
    schema: pa.Schema
    partition_ts: str | None  # column whose UTC day names the partition; None = unpartitioned
    sort_by: tuple[str, ...] = ()
    # rows a Parquet row group of its files holds when fewer than the sorted unit (lake.PartFile): the ingest
    # manifest, looked up by content hash, keeps small groups whose statistics name a narrow range of hashes
    group_rows: int | None = None
    # text columns whose row groups carry a Parquet Bloom filter (of their group's rows): looked up by a value
    # that their statistics cannot narrow (the manifest's `source`, its files being sorted by content hash)
    bloom_filters: tuple[str, ...] = ()


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset("flows", FLOWS, "ts_start", ("src_addr", "ts_start")),
        Dataset("vm_events", VM_EVENTS, "ts", ("ts",)),
        Dataset("vm_leases", VM_LEASES, None, ("addr", "valid_from")),
        Dataset("vms", VMS, None, ("vm_id",)),
        Dataset("vm_logs", VM_LOGS, "ts", ("ts",)),
        Dataset("intel", INTEL, None, ("indicator",)),
        Dataset("flow_labels", FLOW_LABELS, "ts_start", ("ts_start",)),
        Dataset("alerts", ALERTS, "window_start", ("window_start", "detector")),
        Dataset("rejects", REJECTS, "ingested_at", ()),
    )
}


_NULL_ROWS_CACHED = 1 << 21  # per type: at most 2 M rows (16 MB for 8-byte types) kept for the process
_NULLS: dict[pa.DataType, pa.Array] = {}


def null_column(length: int, type: pa.DataType) -> pa.Array:
    """A column of `length` nulls of `type`, sliced from one kept per type (zero-copy). A flows table of a
    plain NetFlow exporter has 26 such columns of 47; pa.nulls zero-filled fresh memory for each, every batch:
    ~0.6 ms per column of 272 k rows in a decode worker, 0.07 us of CPU per record (issue 17)."""
    if length > _NULL_ROWS_CACHED:
        return pa.nulls(length, type)
    column = _NULLS.get(type)
    if column is None or len(column) < length:
        rows = min(max(length, 2 * len(column) if column is not None else 0, 1 << 18), _NULL_ROWS_CACHED)
        column = _NULLS[type] = pa.nulls(rows, type)
    return column.slice(0, length)
