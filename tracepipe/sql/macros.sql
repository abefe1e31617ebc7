-- Address macros over canonical text ('10.1.2.3', '2001:db8::1'): plain SQL, no extension needed (the inet
-- extension downloads from the internet, which an air-gapped site or CI may not have).
-- An address becomes a UHUGEINT (IPv4: 0 .. 2^32-1; IPv6: 0 .. 2^128-1) plus its family; text that does not
-- parse gives NULL. Lambda-free so that older DuckDB releases read it too.

-- 4 or 6 by the text's shape (NULL for NULL); whether it parses is ip_to_num's business.
CREATE OR REPLACE MACRO ip_family(a) AS
    CASE WHEN a IS NULL THEN NULL WHEN contains(a, ':') THEN 6 WHEN contains(a, '.') THEN 4 END;

CREATE OR REPLACE MACRO _v4_octet(a, i) AS try_cast(split_part(a, '.', i) AS UTINYINT)::UHUGEINT;

CREATE OR REPLACE MACRO ipv4_to_num(a) AS
    CASE WHEN split_part(a, '.', 5) = '' THEN
        (_v4_octet(a, 1) << 24) + (_v4_octet(a, 2) << 16) + (_v4_octet(a, 3) << 8) + _v4_octet(a, 4)
    END;

-- An IPv4 tail (::ffff:1.2.3.4) becomes two hex groups first.
CREATE OR REPLACE MACRO _v6_no_dots(a) AS
    CASE WHEN contains(a, '.') THEN
        regexp_replace(a, '[^:]*$', '')
        || printf('%x:%x', ipv4_to_num(regexp_extract(a, '[^:]*$')) >> 16,
                  ipv4_to_num(regexp_extract(a, '[^:]*$')) & 65535::UHUGEINT)
    ELSE a END;

-- '::' at either end gets a '0' so that exactly one '::' sits between two groups, then it becomes as many
-- ':0' groups as are missing to make eight.
CREATE OR REPLACE MACRO _v6_pad_ends(a) AS
    CASE WHEN ends_with(a, '::') THEN (CASE WHEN starts_with(a, '::') THEN '0' || a ELSE a END) || '0'
         WHEN starts_with(a, '::') THEN '0' || a
         ELSE a END;

CREATE OR REPLACE MACRO _v6_expand(s) AS
    CASE WHEN contains(s, '::') THEN
        replace(s, '::', ':' || repeat('0:', 8 - (length(s) - length(replace(s, ':', '')))))
    ELSE s END;

CREATE OR REPLACE MACRO _v6_group(s, i) AS try_cast('0x' || split_part(s, ':', i) AS USMALLINT)::UHUGEINT;

CREATE OR REPLACE MACRO _v6_full_to_num(s) AS
    CASE WHEN split_part(s, ':', 9) = '' AND length(s) - length(replace(s, ':', '')) = 7 THEN
        (_v6_group(s, 1) << 112) + (_v6_group(s, 2) << 96) + (_v6_group(s, 3) << 80) + (_v6_group(s, 4) << 64)
        + (_v6_group(s, 5) << 48) + (_v6_group(s, 6) << 32) + (_v6_group(s, 7) << 16) + _v6_group(s, 8)
    END;

CREATE OR REPLACE MACRO ipv6_to_num(a) AS
    CASE WHEN (length(a) - length(replace(a, '::', ''))) <= 2 THEN
        _v6_full_to_num(_v6_expand(_v6_pad_ends(_v6_no_dots(lower(a)))))
    END;

-- The address as a number (UHUGEINT); compare only within one family (see ip_family).
CREATE OR REPLACE MACRO ip_to_num(a) AS
    CASE ip_family(a) WHEN 4 THEN ipv4_to_num(a) WHEN 6 THEN ipv6_to_num(a) END;

-- Prefix length of 'net/len' (a bare address is a host route); NULL when it is out of range.
CREATE OR REPLACE MACRO _cidr_len(cidr) AS
    CASE WHEN NOT contains(cidr, '/') THEN (CASE ip_family(cidr) WHEN 4 THEN 32 WHEN 6 THEN 128 END)
         WHEN try_cast(split_part(cidr, '/', 2) AS INTEGER)
              BETWEEN 0 AND (CASE ip_family(split_part(cidr, '/', 1)) WHEN 4 THEN 32 WHEN 6 THEN 128 END)
         THEN try_cast(split_part(cidr, '/', 2) AS INTEGER)
    END;

-- cidr_contains('10.0.0.0/8', '10.1.2.3') -> true; IPv4 and IPv6; families that differ -> false;
-- text that does not parse -> NULL. Host bits set in the network part are ignored (10.1.2.3/8 = 10.0.0.0/8).
CREATE OR REPLACE MACRO cidr_contains(cidr, addr) AS
    CASE
        WHEN ip_to_num(split_part(cidr, '/', 1)) IS NULL OR ip_to_num(addr) IS NULL OR _cidr_len(cidr) IS NULL
            THEN NULL
        WHEN ip_family(split_part(cidr, '/', 1)) <> ip_family(addr) THEN false
        ELSE (ip_to_num(split_part(cidr, '/', 1))
                  >> CAST((CASE ip_family(addr) WHEN 4 THEN 32 ELSE 128 END) - _cidr_len(cidr) AS UHUGEINT))
             = (ip_to_num(addr)
                  >> CAST((CASE ip_family(addr) WHEN 4 THEN 32 ELSE 128 END) - _cidr_len(cidr) AS UHUGEINT))
    END;

-- ip_between(addr, lo, hi): addr within [lo, hi] of the same family (intel ranges keep net_lo / net_hi).
CREATE OR REPLACE MACRO ip_between(addr, lo, hi) AS
    ip_family(addr) = ip_family(lo) AND ip_family(addr) = ip_family(hi)
    AND ip_to_num(addr) BETWEEN ip_to_num(lo) AND ip_to_num(hi);
