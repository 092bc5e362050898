"""What every runner shares: how a run starts, what it reports, and which runner a command gets.

`start` resolves and plans a sweep, binds its spec to the run name and removes what dead
processes left, before any work; `RunSummary` is what a run returns (the CLI prints it and
takes the exit status from it); `group_by_checkpoint` is the unit both runners extract by
(one forward pass per checkpoint); `run_spec` picks the in-process or the Ray runner.

Nothing here imports torch or ray at module level: the CLI imports this module for every
command, and only a command that runs a sweep should pay for them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from probeserve.errors import ProbeserveError
from probeserve.progress import Progress

if TYPE_CHECKING:
    from probeserve.spec import SweepSpec
    from probeserve.sweep import Item, Plan, Sweep

log = logging.getLogger("probeserve")


@dataclass
class RunSummary:
    """What one run did: items committed ok or failed now, and items already done before."""

    ok: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (checkpoint, layer, error)
    skipped_done: int = 0
    incomplete: list[str] = field(default_factory=list)  # checkpoints without their marker
    rejected: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def record(self, row: dict[str, Any], progress: Progress | None = None) -> None:
        if row["status"] == "ok":
            self.ok += 1
        else:
            self.failed.append((row["checkpoint"], row["layer"], row["error"]))
        log.debug(
            "step %d %s: %s",
            row["step"],
            row["layer"],
            f"test_error={row['test_error']:.4f}" if row["status"] == "ok" else f"FAILED {row['error']}",
        )
        if progress:
            progress.update(ok=row["status"] == "ok", what=f"step {row['step']} {row['layer']}")


def start(spec: SweepSpec) -> tuple[Sweep, Plan, RunSummary]:
    """Resolve and plan a sweep, bind the spec to its run name, and report what is skipped."""
    from probeserve.sweep import Sweep, start_cleanup

    sweep = Sweep(spec)
    plan = sweep.plan()  # resolves data, model and layers: a bad spec stops here
    sweep.record_spec()  # ...so only a spec that works gets bound to the run name
    start_cleanup(sweep, plan)  # what dead processes left: staging folders, markers, shards
    summary = RunSummary(skipped_done=plan.counts()["ok"])
    summary.incomplete = [c.key for c in plan.discovery.incomplete]
    summary.rejected = list(plan.discovery.rejected)
    for key in summary.incomplete:
        log.warning("skipping %s: no completion marker yet", key)
    for key, why in summary.rejected:
        log.warning("skipping %s: %s", key, why)
    return sweep, plan, summary


def group_by_checkpoint(items: list[Item]) -> list[list[Item]]:
    """The items of each checkpoint together, checkpoints in the order they first appear."""
    groups: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        groups[item.checkpoint.key].append(item)
    return list(groups.values())


def run_spec(spec: SweepSpec, *, runner: str, address: str | None) -> RunSummary:
    """Run a spec with the chosen runner: Ray (local cluster unless an address is given) or in-process."""
    if runner == "local":
        if address:
            raise ProbeserveError("--address goes with the ray runner, not --runner local")
        from probeserve.runners.local import run_local

        return run_local(spec)
    from probeserve.runners.ray import run_ray

    return run_ray(spec, address=address)
