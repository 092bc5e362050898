"""The in-process runner: every work item of a sweep, one after another, in this process.

It is the reference the Ray runner is checked against, and what runs where there is no
cluster. Each item is committed as soon as it finishes, so killing the process loses at most
the items in progress (one, or the `resources.probes_per_call` items of a checkpoint trained
together); the next run does only what is missing.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from probeserve.probe import resolve_device
from probeserve.progress import Progress
from probeserve.spec import SweepSpec
from probeserve.sweep import (
    Item,
    Plan,
    Sweep,
    configure_torch,
    extract_missing,
    probe_and_commit_group,
    probes_per_call,
    start_cleanup,
)

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

    def record(self, row: dict, progress: Progress | None = None) -> None:
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
    groups: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        groups[item.checkpoint.key].append(item)
    return list(groups.values())


def run_local(spec: SweepSpec) -> RunSummary:
    """Run every pending item of the sweep in this process."""
    t0 = time.perf_counter()
    configure_torch(spec)
    sweep, plan, summary = start(spec)
    device = resolve_device(spec.resources.device)
    pending = plan.pending()
    log.info(
        "run %s (in-process): %d checkpoint(s), %d layer(s), %d item(s) pending, %d already done, device %s",
        spec.run,
        len(plan.discovery.complete),
        len(sweep.points),
        len(pending),
        summary.skipped_done,
        device,
    )
    progress = Progress(len(pending))
    per_call = probes_per_call(spec, device)
    for items in group_by_checkpoint(pending):
        failed = extract_missing(sweep, items, device=device)
        ready: list[Item] = []
        for item in items:
            if item.layer in failed:
                summary.record(
                    sweep.failed_row(item.checkpoint, item.layer, item.layer_index, failed[item.layer], 0.0),
                    progress,
                )
                continue
            ready.append(item)
            if len(ready) == per_call:
                for row in probe_and_commit_group(sweep, ready, device=device):
                    summary.record(row, progress)
                ready = []
        for row in probe_and_commit_group(sweep, ready, device=device):  # what is left
            summary.record(row, progress)
    summary.seconds = time.perf_counter() - t0
    return summary
