"""The in-process runner: every work item of a sweep, one after another, in this process.

It is the reference the Ray runner is checked against, and what runs where there is no
cluster. Each item is committed as soon as it finishes, so killing the process loses at most
the items in progress (one, or the `resources.probes_per_call` items of a checkpoint trained
together); the next run does only what is missing.
"""

from __future__ import annotations

import logging
import time

from probeserve.probe import resolve_device
from probeserve.progress import Progress
from probeserve.runners.base import RunSummary, group_by_checkpoint, start
from probeserve.spec import SweepSpec
from probeserve.sweep import (
    Item,
    configure_torch,
    extract_missing,
    probe_and_commit_group,
    probes_per_call,
)

log = logging.getLogger("probeserve")


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
