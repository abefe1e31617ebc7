"""Correlation: who held which address when, and which VM each flow, log line and alert belongs to.

    leases.py       vm_events -> vm_leases + vms (full rebuild, vectorised) and the incremental update.
    lease_at.py     lease_at(addresses, times): THE answer to "who held X at T" (half-open intervals).
    attribution.py  src_vm/dst_vm of flow files, vm_id of VM log lines, for the days ingest touched.

Ingest never imports this package: it lands sources and returns the days it touched; its caller (the CLI,
the collector's committer, a sweep) then calls `correlate.attribution.attribute_days`.
"""

# recorded with each vm_leases commit that leases.py makes: vms then holds a row for every VM of vm_leases, so
# query.connect reads what a VM is now from vms alone (sql/views.sql); a lake whose leases were written another
# way gets sql/vm_info_from_leases.sql, which also takes VMs from vm_leases. Here, not in leases.py: query.py
# reads it without importing polars.
VMS_COMPLETE = "vms_hold_every_lease_vm"
# recorded with each vms commit that the lease writer makes (correlate/vm_keys.py): the vm_key ranges
# [[first, last], ...] below the counter that no vms row holds, so that flows_attributed gives flows carrying such
# a key no facts, as a join to vms would (query.lost_vm_keys). More than MAX_LOST_KEYS keys (only a damaged or
# planted lake) and the commit records none: every flow file is then joined to vms.
LOST_KEYS = "lost_vm_keys"
MAX_LOST_KEYS = 100_000
