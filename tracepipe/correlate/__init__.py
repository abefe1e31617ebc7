"""Correlation: who held which address when, and which VM each flow, log line and alert belongs to.

    leases.py       vm_events -> vm_leases + vms (full rebuild, vectorised) and the incremental update.
    lease_at.py     lease_at(addresses, times): THE answer to "who held X at T" (half-open intervals).
    attribution.py  src_vm/dst_vm of flow files, vm_id of VM log lines, for the days ingest touched.

Ingest never imports this package: it lands sources and returns the days it touched; its caller (the CLI,
the collector's committer, a sweep) then calls `correlate.attribution.attribute_days`.
"""
