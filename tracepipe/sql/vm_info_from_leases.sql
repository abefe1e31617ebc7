-- _vm_info for a lake whose vm_leases were not written by the lease builder (hand-made, another tool, or built
-- before vms held every lease VM), or whose vms rows predate vm_key: vms, plus each VM that only appears in
-- leases (its facts from its leases). A VM without a vm_key gets a negative one, its rank by vm_id, for this
-- session (flow files only ever carry the positive keys of correlate/vm_keys.py). An anti join over every lease
-- and a sort of every VM on each query: `tracepipe leases rebuild` replaces it by the plain read of vms.
CREATE OR REPLACE VIEW _vm_info AS
SELECT vm_id, coalesce(vm_key, -row_number() OVER (ORDER BY vm_id)) AS vm_key, vm_name, project, "user",
       hypervisor, status, deleted_at, quarantine_until, image
FROM (
    SELECT vm_id, vm_key, vm_name, project, "user", hypervisor, status, deleted_at, quarantine_until, image
    FROM vms
    UNION ALL
    SELECT l.vm_id, NULL::BIGINT, any_value(l.vm_name), any_value(l.project), any_value(l."user"),
           any_value(l.hypervisor), any_value(l.vm_status), NULL::TIMESTAMPTZ, max(l.quarantine_until),
           NULL::VARCHAR
    FROM vm_leases l ANTI JOIN vms v ON l.vm_id = v.vm_id
    GROUP BY l.vm_id
) v;
