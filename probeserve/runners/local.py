"""The in-process runner: every work item of a sweep, one after another, in this process.

It is the reference the Ray runner is checked against, and what runs where there is no
cluster. Each item is committed as soon as it finishes, so killing the process loses at most
the item in progress; the next run does only what is missing.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from probeserve import results
from probeserve.probe import resolve_device
from probeserve.spec import SweepSpec
from probeserve.sweep import (
    Item,
    Plan,
    Sweep,
    delete_activations,
    describe_error,
    extract,
    log_failure,
    probe,
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


def summarize_plan(plan: Plan, summary: RunSummary) -> None:
    summary.skipped_done = plan.counts()["ok"]
    summary.incomplete = [c.key for c in plan.discovery.incomplete]
    summary.rejected = list(plan.discovery.rejected)
    for key in summary.incomplete:
        log.warning("skipping %s: no completion marker yet", key)
    for key, why in summary.rejected:
        log.warning("skipping %s: %s", key, why)


def run_checkpoint(sweep: Sweep, items: list[Item], device: str, summary: RunSummary, total: int) -> None:
    """Extract what is missing for one checkpoint, then probe and commit each pending layer."""
    ckpt = items[0].checkpoint
    need = [i.layer for i in items if sweep.manifest(ckpt, i.layer) is None]
    layer_errors: dict[str, str] = {}
    if need:
        t0 = time.perf_counter()
        try:
            layer_errors = extract(sweep, ckpt, need, device=device)
        except Exception as e:
            log_failure(f"extract {ckpt.key}", e)
            layer_errors = {layer: describe_error(e) for layer in need}
        for layer, error in layer_errors.items():
            idx = next(i.layer_index for i in items if i.layer == layer)
            results.commit(sweep.output, sweep.failed_row(ckpt, layer, idx, error, time.perf_counter() - t0))
            summary.failed.append((ckpt.key, layer, error))
    for item in items:
        if item.layer in layer_errors:
            continue
        t0 = time.perf_counter()
        try:
            row = probe(sweep, ckpt, item.layer, device=device)
        except Exception as e:
            log_failure(f"probe {ckpt.key} {item.layer}", e)
            row = sweep.failed_row(
                ckpt, item.layer, item.layer_index, describe_error(e), time.perf_counter() - t0
            )
            summary.failed.append((ckpt.key, item.layer, row["error"]))
        else:
            summary.ok += 1
        results.commit(sweep.output, row)
        if row["status"] == "ok" and not sweep.spec.output.keep_activations:
            delete_activations(sweep, ckpt, item.layer)
        done = summary.ok + len(summary.failed)
        log.info(
            "[%d/%d] step %d %s: %s",
            done,
            total,
            ckpt.step,
            item.layer,
            f"test_error={row['test_error']:.4f}" if row["status"] == "ok" else "FAILED",
        )


def run_local(spec: SweepSpec) -> RunSummary:
    """Run every pending item of the sweep in this process."""
    t0 = time.perf_counter()
    sweep = Sweep(spec)
    if spec.resources.torch_threads:
        import torch

        torch.set_num_threads(spec.resources.torch_threads)
    device = resolve_device(spec.resources.device)
    plan = sweep.plan()  # resolves data, model and layers: a bad spec stops here
    sweep.record_spec()  # ...so only a spec that works gets bound to the run name
    summary = RunSummary()
    summarize_plan(plan, summary)
    by_ckpt: dict[str, list[Item]] = defaultdict(list)
    for item in plan.pending():
        by_ckpt[item.checkpoint.key].append(item)
    pending = sum(len(v) for v in by_ckpt.values())
    log.info(
        "run %s: %d checkpoint(s), %d layer(s), %d item(s) pending, %d already done, device %s",
        spec.run,
        len(plan.discovery.complete),
        len(sweep.points),
        pending,
        summary.skipped_done,
        device,
    )
    for items in by_ckpt.values():
        run_checkpoint(sweep, items, device, summary, pending)
    summary.seconds = time.perf_counter() - t0
    return summary
