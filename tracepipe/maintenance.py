"""Keeping a lake fit for years: compaction, retention, vacuum, upgrade of an old lake, and lake versions.

Each function takes a Lake and returns a result with `exit_code` and `to_dict()`; `tracepipe compact`,
`expire`, `vacuum` and `upgrade` only print them. Every change is a commit in the tables' logs (operation,
parameters and what went are in `DESCRIBE HISTORY`-style commit info), so a site can show what was deleted
and when.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from tracepipe.errors import EXIT_OK, UsageError
from tracepipe.lake import COMPACT_MIN_FILES, RETAIN_REMOVED, Lake
from tracepipe.schema import DATASETS
from tracepipe.units import parse_time, utc_text

# Datasets that age out with `expire`: the observations. Lifecycle history (vm_events, and vm_leases/vms
# built from it) is kept because any flow still in the lake can point at it, and alerts are kept always.
EXPIRING = ("flows", "vm_logs", "rejects")


@dataclass
class CompactResult:
    datasets: dict[str, dict[str, int]] = field(default_factory=dict)
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compact_lake(
    lake: Lake,
    datasets: list[str] | None = None,
    days: list[str] | None = None,
    min_files: int = 2,
) -> CompactResult:
    """Merge small files of the given datasets (default: every day-partitioned one and the manifest) and days
    (default all) whenever a day holds at least `min_files` of them. Ingest does this by itself past
    COMPACT_MIN_FILES; by hand the default merges any day with two or more small files."""
    result = CompactResult()
    names = datasets or [n for n, d in DATASETS.items() if d.partition_ts is not None] + ["_ingest"]
    for name in names:
        if name not in DATASETS and name != "_ingest":
            raise UsageError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
        result.datasets[name] = lake.compact(name, days, min_files=min_files)
    return result


@dataclass
class ExpireResult:
    before: str
    datasets: list[dict[str, Any]] = field(default_factory=list)
    vacuumed: dict[str, int] = field(default_factory=dict)
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expire_lake(
    lake: Lake,
    older_than: dt.timedelta,
    now: dt.datetime | None = None,
    datasets: tuple[str, ...] = EXPIRING,
    vacuum: bool = True,
) -> ExpireResult:
    """Remove the day partitions of flows, VM logs and rejects whose whole day is older than `older_than`,
    one commit per table; with `vacuum`, delete the files that no version within RETAIN_REMOVED lists. The
    result lists, per dataset, the days, files and rows that went."""
    if older_than <= dt.timedelta(0):
        raise UsageError("--older-than must be positive (e.g. 400d)")
    now = now or dt.datetime.now(dt.UTC)
    before = (now - older_than).date()
    result = ExpireResult(before=before.isoformat())
    for name in datasets:
        result.datasets.append(lake.expire(name, before))
    if vacuum:
        result.vacuumed = lake.vacuum(RETAIN_REMOVED)
    return result


def vacuum_lake(lake: Lake, retain: dt.timedelta = RETAIN_REMOVED) -> dict[str, Any]:
    """Delete files no table version within `retain` lists (at least one hour: writers finish files first), and
    the staging folders of lease rebuilds killed before they ended (untouched for `retain`, at least a day)."""
    deleted = lake.vacuum(retain)
    stale = 0
    if (lake.root / "_settings").is_dir():
        from tracepipe.correlate.leases import remove_stale_rebuilds  # imports polars

        stale = remove_stale_rebuilds(lake, max(retain, dt.timedelta(days=1)))
    return {
        "retain_hours": retain.total_seconds() / 3600,
        "deleted": deleted,
        "lease_rebuilds_removed": stale,
        "exit_code": EXIT_OK,
    }


@dataclass
class UpgradeResult:
    converted: dict[str, int] = field(default_factory=dict)
    attribution: dict[str, Any] | None = None
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def upgrade_lake(lake: Lake) -> UpgradeResult:
    """Put an old-layout lake under transaction logs in place (Lake.upgrade), then attribute every flow day
    from the leases (the old footer marks are gone; attributed_at is set again). Idempotent."""
    result = UpgradeResult(converted=lake.upgrade())
    if result.converted.get("flows") and lake.files("vm_leases"):
        from tracepipe.correlate.attribution import attribute_flows

        result.attribution = attribute_flows(lake)
    return result


def parse_as_of(text: str) -> dt.datetime | dict[str, int]:
    """`--as-of`: a time (ISO 8601 or epoch seconds: every table as it was then) or the lake version a report
    recorded (`flows=812,vm_leases=40,...`: each table at that version)."""
    text = text.strip()
    if "=" in text:
        versions: dict[str, int] = {}
        for part in text.split(","):
            name, _, number = part.partition("=")
            name = name.strip()
            if name not in DATASETS or not number.strip().isdigit():
                raise UsageError(
                    f"--as-of {text!r}: give a time or a lake version like flows=812,vm_leases=40 "
                    f"(datasets: {', '.join(DATASETS)})"
                )
            versions[name] = int(number)
        return versions
    return parse_time(text)


def version_token(versions: dict[str, int]) -> str:
    """The lake version as `tracepipe sql --as-of` takes it back."""
    return ",".join(f"{name}={version}" for name, version in sorted(versions.items()))


def as_of_text(as_of: dt.datetime | dict[str, int]) -> str:
    """What `--as-of` was given, as it takes it back: a lake version or a UTC time."""
    if isinstance(as_of, dict):
        return version_token(as_of)
    return utc_text(as_of)


__all__ = [
    "COMPACT_MIN_FILES",
    "EXPIRING",
    "as_of_text",
    "compact_lake",
    "expire_lake",
    "parse_as_of",
    "upgrade_lake",
    "vacuum_lake",
    "version_token",
]
