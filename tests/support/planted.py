"""Behaviours planted on the ordinary hosts of one generated story (stories.generate), in a lake of their own, and
the check that a sweep in host buckets gives the alerts the whole lake's sweep gives (test_detect_evasion,
test_detect_site_services)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from support import stories as gen
from tracepipe.lake import Lake
from tracepipe.sweep import run_sweep


def planted_lake(
    directory: Path, plant: Callable[[gen._Flows, gen.FlowStory], Any], key: str, seed: int = 11
) -> tuple[Lake, gen.FlowStory, Any]:
    """The story's flows and leases, and the flows `plant` adds (what it returns: who got which)."""
    story = gen.generate(seed=seed)
    lake = Lake(directory)
    lake.append("flows", story.flows, key=f"story-{seed}")
    lake.replace_dataset("vm_leases", story.leases)
    f = gen._Flows([])
    who = plant(f, story)
    lake.append("flows", f.table(), key=key)
    return lake, story, who


def alerts_alike_in_buckets(lake: Lake, config: Any, since: Any, until: Any) -> list[dict]:
    """The sweep's alerts over [since, until) (created_at aside, by id), asserted the same in 3 host buckets
    as in one."""
    whole = run_sweep(lake, config, since, until, write=False, buckets=1)
    split = run_sweep(lake, config, since, until, write=False, buckets=3)
    assert "spill" in split.timings

    def rows(result) -> list[dict]:
        return result.alerts.drop_columns(["created_at"]).sort_by("alert_id").to_pylist()

    assert rows(split) == rows(whole)
    return rows(whole)
