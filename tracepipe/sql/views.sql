-- Views over the base relations that query.connect() creates from the lake (flows, vm_leases, vms, ...,
-- _vms_changed = the vms files holding VMs whose identity changed,
-- and the four parts of flows: _flows_facts = files attributed with vm keys and the VMs' facts (see
-- flows_attributed), _flows_keyed = files attributed with vm keys (src_vm_key/dst_vm_key, see
-- tracepipe/correlate/vm_keys.py) only, _flows_done = other attributed files (older ones, attributed before keys
-- existed or from vms without keys), _flows_todo = files never attributed), and the function vm_status(key).

-- What each VM is now: a plain read of vms. The lease builder (tracepipe/correlate/leases.py) writes a vms row
-- with its vm_key for every VM that holds a lease; for a lake whose leases were written some other way, or whose
-- vms rows predate vm_key, query.connect then runs sql/vm_info_from_leases.sql, which adds the VMs found only in
-- vm_leases and gives every VM without a key one of its own for the session.
CREATE OR REPLACE VIEW _vm_info AS
SELECT vm_id, vm_key, vm_name, project, "user", hypervisor, status, deleted_at, quarantine_until, image FROM vms;

-- Rows of never-attributed files get their VMs at query time, by the rules of tracepipe/correlate/lease_at.py
-- (the one definition): a lease holds its address on [valid_from, valid_to), valid_to NULL = still held. Leases
-- do not overlap per address, so the lease valid at ts_start is the last one that started at or before it
-- (ASOF), if it had not ended yet; at a boundary (one ends as the next begins) the new one holds the instant.
CREATE OR REPLACE VIEW _flows_resolved AS
SELECT * FROM _flows_done
UNION ALL BY NAME
SELECT f.* REPLACE (
           CASE WHEN s.valid_to IS NULL OR f.ts_start < s.valid_to THEN s.vm_id END AS src_vm,
           CASE WHEN d.valid_to IS NULL OR f.ts_start < d.valid_to THEN d.vm_id END AS dst_vm)
FROM _flows_todo f
ASOF LEFT JOIN vm_leases s ON f.src_addr = s.addr AND f.ts_start >= s.valid_from
ASOF LEFT JOIN vm_leases d ON f.dst_addr = d.addr AND f.ts_start >= d.valid_from;

-- Rows attributed without keys (never-attributed files, files attributed before the key columns existed) take
-- their VMs' keys from _vm_info by the text vm_id, so that flows_attributed joins every row on the key.
CREATE OR REPLACE VIEW _flows_rekeyed AS
SELECT f.* REPLACE (s.vm_key AS src_vm_key, d.vm_key AS dst_vm_key)
FROM _flows_resolved f
LEFT JOIN _vm_info s ON f.src_vm = s.vm_id
LEFT JOIN _vm_info d ON f.dst_vm = d.vm_id;

-- Both ends of every flow with the VM whose lease was valid at ts_start, and what that VM is NOW (name, project,
-- owner, hypervisor, status, image): an OpenNebula chown moves a VM to another owner and group, status changes.
-- Two forms, same rows (tests/test_attribution_view.py holds them to the plain definition):

-- Files attributed without stored facts (and the rows resolved or rekeyed above) join _vm_info on the integer
-- vm_key (correlate/vm_keys.py: one VM per key, every _vm_info row has one): a hash join on every VM per end.
CREATE OR REPLACE VIEW _flows_to_join AS
SELECT * FROM _flows_keyed UNION ALL BY NAME SELECT * FROM _flows_rekeyed;

CREATE OR REPLACE VIEW _flows_joined AS
SELECT f.* EXCLUDE (src_vm_name, src_project, src_user, src_hypervisor, src_image, dst_vm_name, dst_project, dst_user, dst_hypervisor, dst_image),
       s.vm_name AS src_vm_name, s.project AS src_project, s."user" AS src_user,
       s.hypervisor AS src_hypervisor, s.status AS src_vm_status, s.image AS src_image,
       d.vm_name AS dst_vm_name, d.project AS dst_project, d."user" AS dst_user,
       d.hypervisor AS dst_hypervisor, d.status AS dst_vm_status, d.image AS dst_image
FROM _flows_to_join f
LEFT JOIN _vm_info s ON f.src_vm_key = s.vm_key
LEFT JOIN _vm_info d ON f.dst_vm_key = d.vm_key;

-- Files attributed with the VMs' facts (_flows_facts, issue 18 item 4): joining every VM per end on every query
-- cost 4 plain scans at 3 M VMs, so attribution copied each VM's identity from vms into the file, and only the
-- VMs whose identity changed since their first vms row (vms.identity_changed_at: a chown, a rename, a rebuild,
-- a migration) are looked up, in a small overlay; keys vms no longer holds (_vm_lost_keys, from the last vms
-- commit) get no facts, as the join gives. Status changes for every VM (each deletion), so it is never stored:
-- vm_status(key) reads it from vms (query.connect), and DuckDB drops the call when a query does not use it.
CREATE OR REPLACE VIEW _vm_lost_keys AS SELECT CAST(NULL AS BIGINT) AS vm_key WHERE false;

CREATE OR REPLACE VIEW _vm_overlay AS
SELECT vm_key, vm_name, project, "user", hypervisor, image FROM _vms_changed WHERE identity_changed_at IS NOT NULL
UNION ALL BY NAME
SELECT vm_key FROM _vm_lost_keys;

CREATE OR REPLACE VIEW _flows_facts_now AS
SELECT f.* EXCLUDE (src_vm_name, src_project, src_user, src_hypervisor, src_image, dst_vm_name, dst_project, dst_user, dst_hypervisor, dst_image),
       CASE WHEN s.vm_key IS NULL THEN f.src_vm_name ELSE s.vm_name END AS src_vm_name,
       CASE WHEN s.vm_key IS NULL THEN f.src_project ELSE s.project END AS src_project,
       CASE WHEN s.vm_key IS NULL THEN f.src_user ELSE s."user" END AS src_user,
       CASE WHEN s.vm_key IS NULL THEN f.src_hypervisor ELSE s.hypervisor END AS src_hypervisor,
       vm_status(f.src_vm_key) AS src_vm_status,
       CASE WHEN s.vm_key IS NULL THEN f.src_image ELSE s.image END AS src_image,
       CASE WHEN d.vm_key IS NULL THEN f.dst_vm_name ELSE d.vm_name END AS dst_vm_name,
       CASE WHEN d.vm_key IS NULL THEN f.dst_project ELSE d.project END AS dst_project,
       CASE WHEN d.vm_key IS NULL THEN f.dst_user ELSE d."user" END AS dst_user,
       CASE WHEN d.vm_key IS NULL THEN f.dst_hypervisor ELSE d.hypervisor END AS dst_hypervisor,
       vm_status(f.dst_vm_key) AS dst_vm_status,
       CASE WHEN d.vm_key IS NULL THEN f.dst_image ELSE d.image END AS dst_image
FROM _flows_facts f
LEFT JOIN _vm_overlay s ON f.src_vm_key = s.vm_key
LEFT JOIN _vm_overlay d ON f.dst_vm_key = d.vm_key;

CREATE OR REPLACE VIEW flows_attributed AS
SELECT * FROM _flows_facts_now UNION ALL BY NAME SELECT * FROM _flows_joined;

-- who_had('10.0.0.5', TIMESTAMPTZ '2024-03-12 07:30:00+00'): the lease(s) valid then (same half-open intervals
-- as lease_at; more than one row only if a planted file made leases overlap), with what the VM is now (image:
-- the one it runs now or last ran; a rebuild since shows in the VM's vm_events), except its hypervisor: the
-- one it ran on during that lease (a migration ends a lease: the compute node whose logs and disks tell of
-- that time), the one it is on now beside it (hypervisor_now).
-- Addresses are compared as canonical text (the lake stores them so): the one given goes through ip_canonical
-- first ('2001:DB8:0::1F' finds the lease of 2001:db8::1f, '::ffff:10.0.0.5' that of 10.0.0.5).
CREATE OR REPLACE MACRO who_had(addr_text, at_time) AS TABLE
SELECT l.addr, l.vm_id, coalesce(v.vm_name, l.vm_name) AS vm_name, coalesce(v.project, l.project) AS project,
       coalesce(v."user", l."user") AS "user", coalesce(l.hypervisor, v.hypervisor) AS hypervisor, l.cloud,
       l.addr_kind, l.valid_from, l.valid_to, l.end_reason,
       coalesce(v.status, l.vm_status) AS vm_status, v.deleted_at,
       coalesce(v.quarantine_until, l.quarantine_until) AS quarantine_until, v.image,
       v.hypervisor AS hypervisor_now
FROM vm_leases l LEFT JOIN _vm_info v ON l.vm_id = v.vm_id
WHERE l.addr = ip_canonical(addr_text)
  AND l.valid_from <= CAST(at_time AS TIMESTAMPTZ)
  AND (l.valid_to IS NULL OR CAST(at_time AS TIMESTAMPTZ) < l.valid_to)
ORDER BY l.valid_from;

-- nat_inside('198.51.100.7', TIMESTAMPTZ '2024-03-12 07:30:00+00', 51234): who was behind a public (post-NAT)
-- source address and port at a time - what a CSIRT report names for a NAT'd host. Read from the translations
-- firewall/NAT routers export (flows.nat_src_addr/nat_src_port: Cisco ASA NSEL, NEL loggers), each with the inside
-- address and port and the VM that held the inside address then, nearest translation first. public_port NULL:
-- any port; within: how far the time may lie outside a translation's [ts_start, ts_end] (a NAT event carries
-- one time, reports are rounded; default 5 minutes).
CREATE OR REPLACE MACRO nat_inside(public_addr, at_time, public_port := NULL, within := INTERVAL 5 MINUTE) AS TABLE
SELECT f.src_addr AS inside_addr, f.src_port AS inside_port, f.nat_src_addr, f.nat_src_port,
       f.dst_addr, f.dst_port, f.proto, f.ts_start, f.ts_end, f.nat_event, f.fw_event, f.exporter,
       f.src_vm, f.src_vm_name, f.src_project, f.src_user
FROM flows_attributed f
WHERE f.nat_src_addr = ip_canonical(public_addr)
  AND (public_port IS NULL OR f.nat_src_port = public_port)
  AND f.ts_start <= CAST(at_time AS TIMESTAMPTZ) + within
  AND f.ts_end >= CAST(at_time AS TIMESTAMPTZ) - within
ORDER BY abs(epoch(f.ts_start) - epoch(CAST(at_time AS TIMESTAMPTZ))), f.ts_start, f.src_addr, f.src_port;
