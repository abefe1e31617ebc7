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

-- Text an IPv6 address may be: hex groups of 1-4 digits, one '::' at most, no ':' alone at either end.
CREATE OR REPLACE MACRO _v6_shape_ok(s) AS
    regexp_full_match(s, '[0-9a-f:]{2,39}')
    AND NOT regexp_matches(s, '[0-9a-f]{5}|:::|::.*::|^:[^:]|[^:]:$');

-- Every group padded to 4 digits ('000' before each, then keep the last 4), '::' kept as a 'z' mark, colons
-- dropped: '2001:db8::1' -> '20010db8z0001'. Each step reads the previous one once (macros are inlined:
-- an argument used n times is copied n times, so nesting must not multiply).
CREATE OR REPLACE MACRO _v6_packed(s) AS
    replace(regexp_replace(regexp_replace(replace(s, '::', ':z:'), '([0-9a-f]+)', '000\1', 'g'),
                           '0*([0-9a-f]{4})\b', '\1', 'g'), ':', '');

-- The 'z' mark becomes as many zeros as are missing to make 32 hex digits ('::' stands for one group or more).
CREATE OR REPLACE MACRO _v6_hex(packed) AS
    CASE WHEN NOT contains(packed, 'z') OR length(packed) <= 29 THEN replace(packed, 'z', repeat('0', 33 - length(packed))) END;

CREATE OR REPLACE MACRO _v6_hex_to_num(h) AS
    CASE WHEN length(h) = 32 THEN try_cast('0x' || h AS UHUGEINT) END;

CREATE OR REPLACE MACRO ipv6_to_num(a) AS
    CASE WHEN _v6_shape_ok(_v6_no_dots(lower(a))) THEN _v6_hex_to_num(_v6_hex(_v6_packed(_v6_no_dots(lower(a))))) END;

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
-- text that does not parse -> NULL. Host bits in the network part are ignored (10.1.2.3/8 = 10.0.0.0/8).
CREATE OR REPLACE MACRO cidr_contains(cidr, addr) AS
    CASE WHEN ip_family(split_part(cidr, '/', 1)) <> ip_family(addr) THEN false
    ELSE (ip_to_num(addr) >> CAST((CASE ip_family(addr) WHEN 4 THEN 32 ELSE 128 END) - _cidr_len(cidr) AS UHUGEINT))
       = (ip_to_num(split_part(cidr, '/', 1))
          >> CAST((CASE ip_family(addr) WHEN 4 THEN 32 ELSE 128 END) - _cidr_len(cidr) AS UHUGEINT))
    END;

-- ip_between(addr, lo, hi): addr within [lo, hi] of the same family (intel ranges keep net_lo / net_hi).
CREATE OR REPLACE MACRO ip_between(addr, lo, hi) AS
    ip_family(addr) = ip_family(lo) AND ip_family(addr) = ip_family(hi)
    AND ip_to_num(addr) BETWEEN ip_to_num(lo) AND ip_to_num(hi);

-- ip_canonical(' 2001:DB8:0:0::1F ') -> '2001:db8::1f': the text the lake stores for an address (as Python's
-- ipaddress writes it, RFC 5952: lower case, leading zeros dropped, the longest run of two or more zero groups
-- as '::', leftmost of equal runs), an IPv4-mapped IPv6 address as its IPv4 address, as flows carry it; NULL
-- when it is no address (IPv4 octets with a leading zero too: some tools read them as octal). Compare addresses
-- typed by hand through it: who_had and nat_inside do.
CREATE OR REPLACE MACRO _v4_text(n) AS
    printf('%d.%d.%d.%d', (n >> 24) & 255::UHUGEINT, (n >> 16) & 255::UHUGEINT, (n >> 8) & 255::UHUGEINT,
           n & 255::UHUGEINT);

-- 32 hex digits -> ':g1:g2:...:g8:' (leading zeros of each group dropped; the colons at both ends stay so that
-- every zero group reads ':0:')
CREATE OR REPLACE MACRO _v6_groups(h) AS
    regexp_replace(regexp_replace(h, '(....)', ':\1', 'g'), ':0{0,3}([0-9a-f]{1,4})', ':\1', 'g') || ':';

-- the longest run of 2+ zero groups becomes '::' (runs are matched whole; list_max of ':0:...:' texts is the
-- longest, found first at the leftmost such run)
CREATE OR REPLACE MACRO _v6_compress(s) AS
    coalesce(regexp_replace(s, list_max(regexp_extract_all(s, '(?::0){2,}:')), '::'), s);

-- the end colons go, unless they are part of '::'
CREATE OR REPLACE MACRO _v6_trim(z) AS
    regexp_replace(regexp_replace(z, '^:([^:])', '\1'), '([^:]):$', '\1');

-- (a subquery binds the number once: a macro's argument is copied wherever it is used, and this one, written
-- out 6 times, made every call take 0.2 s to bind)
CREATE OR REPLACE MACRO _v6_text(n) AS (
    SELECT CASE WHEN v >> 32 = 65535::UHUGEINT THEN _v4_text(v & 4294967295::UHUGEINT)
                ELSE _v6_trim(_v6_compress(_v6_groups(lpad(lower(hex(v)), 32, '0')))) END
    FROM (SELECT n AS v));

CREATE OR REPLACE MACRO ip_canonical(a) AS (
    SELECT CASE ip_family(t)
        WHEN 4 THEN CASE WHEN regexp_full_match(t, '(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}')
                         THEN _v4_text(ipv4_to_num(t)) END
        WHEN 6 THEN _v6_text(ipv6_to_num(t))
    END
    FROM (SELECT trim(a) AS t));
