"""Syslog lines written inside VMs (RFC 3164, RFC 5424, rsyslog's file formats) -> schema.VM_LOGS rows.

Vectorised: the whole file goes through polars regex extraction (no Python work per line). Accepted shapes,
each with or without a leading `<PRI>`:
  RFC 5424             `<34>1 2024-03-12T07:41:02.1Z web-01 sshd 1234 - - message`
  RFC 3164 / rsyslog   `Mar 12 07:41:02 web-01 sshd[1234]: message` (no year: `year`, rolled back one
  default file format  year for lines that would lie in the future of `reference`, e.g. the file's mtime)
  rsyslog high-precision `2024-03-12T07:41:02.123456+01:00 web-01 sshd[1234]: message`
sshd's authentication messages become auth_event (failed / accepted / invalid_user / preauth_closed),
auth_user, auth_src_addr, auth_method. Lines in no known shape, or whose time does not parse or lies outside
units.time_window (1990 .. now + 1 day), are rejects with their line number.
A PRI above 191 is invalid (RFC 5424 6.2.1). rsyslog keeps such a message and files it under its own
pseudo-facility "invld" (no RFC number) instead of dropping it; so does this reader: the line lands with
facility and severity null (not a made-up severity 7 of facility 124), and is also counted in rejects as
"invalid PRI" with its raw text, so the summary shows it.
vm_id is left null: correlation (tracepipe.correlate.attribution.attribute_logs) sets it from the sender
address (given, or a hostname that is an IP address, as rsyslog writes %fromhost-ip%) or the hostname.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from tracepipe.schema import VM_LOGS
from tracepipe.units import canonical_addresses, time_window

# Header regexes capture the short fields only and end where the rest begins: the rest is cut off with a
# regex replace, which is many times faster than capturing `(.*)` (Rust regex captures run the slower engine).
_PRI = r"^(?:<(?P<pri>\d{1,64})>)?"  # any digits: a PRI above MAX_PRI is read, then marked invalid
MAX_PRI = 191  # RFC 5424 6.2.1 / RFC 3164 4.1.1: facility 23 * 8 + severity 7 (rsyslog's LOG_MAXPRI)
RFC5424 = (
    _PRI + r"1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<pid>\S+) (?P<msgid>\S+) "
    r"(?P<sd>-|(?:\[(?:[^\]\\]|\\.)*\])+)(?: \x{FEFF}?|$)"
)
RFC3164 = _PRI + r"(?P<ts>[A-Z][a-z]{2} [ \d]?\d \d\d:\d\d:\d\d) (?P<host>\S+)(?: |$)"
ISO_FILE = _PRI + r"(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)) (?P<host>\S+)(?: |$)"
TAG = r"^(?P<app>[^:\[\s]+)(?:\[(?P<pid>\d+)\])?: ?"  # RFC 3164 TAG: sshd[1234]:
_FIELDS = ("pri", "ts", "host", "app", "pid")

# sshd messages (OpenSSH auth.c / auth2.c / sshd-session), first match wins. The user name is what the client
# sent (spaces and all: `ssh 'x from 192.0.2.66 port 1'@host`), and so is a certificate's key ID, which sshd
# writes after the address (": ED25519-CERT SHA256:.. ID <key id> (serial N) CA .."): a line holding two
# "A port P" is read with no user and no address (_sshd_columns), never with one the client chose. PAM's rhost
# comes before its user=
_TAIL = r"(?: ssh\d)?(?::? [^ ].*?)?(?: \[preauth\])?$"
SSHD_PATTERNS: list[tuple[str, str]] = [
    (
        "failed",
        r"^Failed (?P<method>\S+) for (?:invalid user )?(?P<user>.*) from (?P<addr>\S+) port \d+" + _TAIL,
    ),
    ("accepted", r"^Accepted (?P<method>\S+) for (?P<user>.*) from (?P<addr>\S+) port \d+" + _TAIL),
    ("invalid_user", r"^Invalid user (?P<user>.*) from (?P<addr>\S+)(?: port \d+)?" + _TAIL),
    (
        "failed",
        r"^error: maximum authentication attempts exceeded for (?:invalid user )?(?P<user>.*) "
        r"from (?P<addr>\S+) port \d+" + _TAIL,
    ),
    (
        "preauth_closed",
        r"^(?:Connection closed by|Disconnected from) (?:authenticating|invalid) user "
        r"(?P<user>.*) (?P<addr>\S+) port \d+" + _TAIL,
    ),
    (
        "failed",
        r"pam_unix\(sshd:auth\): authentication failure;.*? rhost=(?P<addr>\S+)(?:\s+user=(?P<user>.*?))?\s*$",
    ),
]


def _parse_5424_ts(col: pl.Expr) -> pl.Expr:
    return (
        col.str.replace(r"Z$", "+00:00")
        .str.replace(r"([+-]\d\d)(\d\d)$", "$1:$2")
        .str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", strict=False, time_zone="UTC")
    )


@dataclass
class YearWraps:
    """The year of RFC 3164 lines when it is given (`--year`: the year of the file's first line). Every line is
    dated on its own, in the year that begins 30 days before the first line (ANCHOR_SLACK): "Jan  1" after
    "Dec 31" is the next year, a line a few seconds before the first one (threads of one rsyslog) the same.
    A file of more than eleven months cannot be dated so (logrotate cuts far sooner). The year used to go on
    by the order of the lines (+1 at each month falling back 6 or more), so one VM writing a "Dec 31" line
    into a file shared with others moved every later line of the file a year on (session-25 review). Kept
    across the blocks of one file: `anchor` is the first line's local time (_anchor: unless most of the first
    block's lines lie far from it), once read."""

    year: int
    anchor: dt.datetime | None = None


ANCHOR_SLACK = dt.timedelta(days=30)
# the first line anchors the year when at least half the first block's lines are this near it (_anchor)
ANCHOR_NEAR_DAYS = 60


def _anchor(times: pl.Series) -> dt.datetime:
    """The line the year of --year is read from (YearWraps): the file's first line, unless fewer than half of
    the first block's lines lie within ANCHOR_NEAR_DAYS of it in the calendar (either way round the year):
    then the line most of them lie around. A tenant writing the first line of a shared file ("Dec 31" before
    its neighbours' "Jun 17") dated every other line a year on (hostile review); a file across new year
    ("Dec 31" then "Jan 1" lines) keeps its first line."""
    days = times.dt.ordinal_day().to_numpy().astype(np.int64) - 1
    counts = np.bincount(days, minlength=366)[:366]
    near = ANCHOR_NEAR_DAYS
    around = np.cumsum(np.r_[0, counts[-near:], counts, counts[:near]])
    within = around[2 * near + 1 :] - around[: -(2 * near + 1)]  # lines within +-near days of each day
    if 2 * within[days[0]] >= len(days):
        return times[0]
    return times[int(np.argmax(within[days]))]


YEAR = dt.timedelta(days=366)  # (two candidate years of a line are 365 or 366 days apart: the earlier wins)


def parse_syslog(
    text: str,
    source: str = "",
    year: int | None = None,
    reference: dt.datetime | None = None,
    tz: str = "UTC",
    sender_addr: str | None = None,
    first_line: int = 1,
    wraps: YearWraps | None = None,
    counts: dict[str, int] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Syslog text -> (vm_logs without vm_id, rejects). `year` and `tz` complete RFC 3164 timestamps,
    which carry neither; `reference` (default: now) is the latest plausible time (the file's mtime).
    `first_line` numbers the lines of a block cut out of a bigger file. `wraps`: the year as the file goes
    (YearWraps; `year` is then ignored). `counts`: "no_year" is increased by the lines that landed with a year
    they did not carry (RFC 3164), what a caller warns about when the year was a guess."""
    reference = reference or dt.datetime.now(dt.UTC)
    year = wraps.year if wraps is not None else (year or reference.year)
    lines = pl.DataFrame(
        {"raw": pl.Series(text.split("\n"), dtype=pl.String).str.strip_chars_end("\r")}
    ).with_row_index("line", offset=first_line)
    lines = lines.filter(pl.col("raw").str.strip_chars(" \t") != "")  # blank lines are no records
    parsed = lines.with_columns(
        pl.col("raw").str.extract_groups(RFC5424).alias("a"),
        pl.col("raw").str.extract_groups(ISO_FILE).alias("b"),
        pl.col("raw").str.extract_groups(RFC3164).alias("c"),
    )
    shape = (
        pl.when(pl.col("a").struct.field("ts").is_not_null())
        .then(pl.lit("5424"))
        .when(pl.col("b").struct.field("ts").is_not_null())
        .then(pl.lit("iso"))
        .when(pl.col("c").struct.field("ts").is_not_null())
        .then(pl.lit("3164"))
    )
    parsed = parsed.with_columns(
        shape.alias("shape"),
        *[
            pl.coalesce(
                pl.col(s).struct.field(f) for s in ("abc" if f != "app" and f != "pid" else "a")
            ).alias(f)
            for f in _FIELDS
        ],
        pl.when(pl.col("a").struct.field("ts").is_not_null())
        .then(pl.col("raw").str.replace(RFC5424, ""))
        .when(pl.col("b").struct.field("ts").is_not_null())
        .then(pl.col("raw").str.replace(ISO_FILE, ""))
        .otherwise(pl.col("raw").str.replace(RFC3164, ""))
        .alias("rest"),
    ).drop("a", "b", "c")
    # RFC 3164 and the rsyslog file formats: "sshd[1234]: message" (a TAG is optional)
    tagged = pl.col("shape").is_in(["iso", "3164"])
    parsed = parsed.with_columns(pl.when(tagged).then(pl.col("rest").str.extract_groups(TAG)).alias("tag"))
    parsed = parsed.with_columns(
        pl.coalesce(pl.col("app"), pl.col("tag").struct.field("app")).alias("app"),
        pl.coalesce(pl.col("pid"), pl.col("tag").struct.field("pid")).alias("pid"),
        pl.when(tagged & pl.col("tag").struct.field("app").is_not_null())
        .then(pl.col("rest").str.replace(TAG, ""))
        .otherwise(pl.col("rest"))
        .alias("msg"),
    )

    def naive_time(years: pl.Expr | int) -> pl.Expr:
        return (
            pl.lit(years).cast(pl.String) + pl.lit(" ") + pl.col("ts").str.replace_all(r" +", " ")
        ).str.to_datetime("%Y %b %d %H:%M:%S", strict=False)

    def in_utc(local: pl.Expr) -> pl.Expr:
        return local.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null").dt.convert_time_zone(
            "UTC"
        )

    if wraps is not None:  # (--year) each line on its own, in the year from 30 days before the first line
        if wraps.anchor is None:
            times = parsed.filter(pl.col("shape") == "3164").select(naive_time(year).drop_nulls()).to_series()
            wraps.anchor = _anchor(times) if len(times) else None
        if wraps.anchor is None:  # (no RFC 3164 line read yet, or only a Feb 29 the year has not)
            local = in_utc(naive_time(year))
        else:
            start = wraps.anchor - ANCHOR_SLACK
            within = pl.lit(start, dtype=pl.Datetime("us")), pl.lit(start + YEAR, dtype=pl.Datetime("us"))
            # the earliest of the years around it within that year (a Feb 29 without one in it: no date)
            local = in_utc(
                pl.coalesce(
                    pl.when(t.is_between(*within, closed="left")).then(t)
                    for t in (naive_time(year - 1), naive_time(year), naive_time(year + 1))
                )
            )
    else:
        # a "Dec 31" line read in January belongs to the previous year; so does "Feb 29" read in 2025 (parsed in
        # 2024, not clamped to a Feb 28 the line never said: read in the year it names, or rejected)
        limit = pl.lit(reference + dt.timedelta(days=1)).dt.convert_time_zone("UTC")
        this_year, year_before = in_utc(naive_time(year)), in_utc(naive_time(year - 1))
        local = pl.when(this_year.is_not_null() & (this_year <= limit)).then(this_year).otherwise(year_before)
    parsed = parsed.with_columns(
        pl.when(pl.col("shape") == "3164").then(local).otherwise(_parse_5424_ts(pl.col("ts"))).alias("ts_utc")
    )
    earliest, latest = time_window()
    in_window = pl.col("ts_utc").is_between(pl.lit(earliest), pl.lit(latest))
    pri = pl.col("pri").cast(pl.Int32, strict=False)
    bad_pri = pl.col("pri").is_not_null() & (pri.is_null() | (pri > MAX_PRI))
    reason = (
        pl.when(pl.col("shape").is_null())
        .then(pl.lit("unknown syslog format"))
        .when(pl.col("ts_utc").is_null())
        .then(pl.lit("bad syslog timestamp"))
        .when(~in_window)
        .then(pl.lit("time out of range"))
        .when(bad_pri)
        .then(pl.lit(f"invalid PRI (above {MAX_PRI}): line kept, facility and severity unknown"))
    )
    rejects = (
        parsed.with_columns(reason.alias("reason"))
        .filter(pl.col("reason").is_not_null())
        .select(
            pl.lit(source).alias("source"),
            pl.col("line").cast(pl.Int64),
            "reason",
            pl.col("raw").str.slice(0, 300).alias("detail"),
        )
    )
    good = parsed.filter(pl.col("ts_utc").is_not_null() & in_window)
    if counts is not None:
        counts["no_year"] = counts.get("no_year", 0) + int((good.get_column("shape") == "3164").sum())
    pri = pl.when(bad_pri).then(None).otherwise(pri)
    nil = ["-", ""]
    logs = good.select(
        pl.col("ts_utc").alias("ts"),
        pl.lit(sender_addr, dtype=pl.String).alias("sender_addr"),
        pl.when(pl.col("host").is_in(nil)).then(None).otherwise(pl.col("host")).alias("hostname"),
        pl.when(pl.col("app").is_in(nil)).then(None).otherwise(pl.col("app")).alias("app"),
        pl.col("pid").cast(pl.Int64, strict=False).alias("pid"),
        (pri // 8).cast(pl.Int16).alias("facility"),
        (pri % 8).cast(pl.Int16).alias("severity"),
        pl.col("msg").fill_null("").alias("message"),
        pl.lit(source).alias("source"),
        pl.col("line").cast(pl.Int64),
    )
    if sender_addr is None:
        logs = logs.with_columns(_addresses_as_text(logs.get_column("hostname")).alias("sender_addr"))
    logs = logs.with_columns(
        pl.col("message").str.extract_groups(pattern).alias(f"_sshd{i}")
        for i, (_, pattern) in enumerate(SSHD_PATTERNS)
    )
    logs = logs.with_columns(*_sshd_columns()).drop(f"_sshd{i}" for i in range(len(SSHD_PATTERNS)))
    table = logs.to_arrow()
    table = pa.Table.from_arrays(
        [
            table.column(f.name).cast(f.type)
            if f.name in table.column_names
            else pa.nulls(table.num_rows, f.type)
            for f in VM_LOGS
        ],
        schema=VM_LOGS,
    )
    return table, rejects.to_arrow()


_AMBIGUOUS = pl.col("message").str.count_matches(r" port \d+") > 1


def _sshd_columns() -> list[pl.Expr]:
    """auth_* columns from the `_sshd<i>` structs (one per SSHD_PATTERNS entry, extracted once)."""
    extracted = [pl.col(f"_sshd{i}") for i in range(len(SSHD_PATTERNS))]

    def first(field: str) -> pl.Expr:
        exprs = []
        for (event, pattern), groups in zip(SSHD_PATTERNS, extracted, strict=True):
            if f"<{field}>" in pattern:
                value = groups.struct.field(field)
            elif field == "event":
                value = pl.when(groups.struct.field("addr").is_not_null()).then(pl.lit(event))
            elif field == "method" and event == "failed":
                value = pl.when(groups.struct.field("addr").is_not_null()).then(pl.lit("password"))
            else:
                continue
            if field in ("user", "addr") and " port " in pattern:
                # two "A port P" in one line: the client wrote one (its user name, a certificate's key ID, both
                # its own): which is sshd's cannot be told, so neither is taken (the attempt still counts)
                value = pl.when(~_AMBIGUOUS).then(value)
            # a pattern's value counts only when that pattern matched (its addr group is set)
            exprs.append(pl.when(groups.struct.field("addr").is_not_null()).then(value))
        return pl.coalesce(exprs)

    method = first("method").str.replace(r"/.*$", "")  # keyboard-interactive/pam -> keyboard-interactive
    return [
        first("event").alias("auth_event"),
        first("user").alias("auth_user"),
        first("addr").alias("auth_src_addr"),
        pl.when(first("event").is_in(["failed", "accepted"])).then(method).alias("auth_method"),
    ]


def _addresses_as_text(hostnames: pl.Series) -> pl.Series:
    """Hostnames that are IP addresses (rsyslog writes %fromhost-ip% when it does not resolve names), in
    canonical text; others null. `ipaddress` runs on the distinct candidates only."""
    candidate = hostnames.str.contains(r"^[0-9.]+$|:")
    return canonical_addresses(pl.select(pl.when(candidate).then(hostnames)).to_series())
