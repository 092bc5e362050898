"""Benchmark: what issue 14's answers cost and whether choosing l2 on validation pays.

Three measurements, printed as ratios in one run:

1. **The l2 grid's cost** (target: <= 2x). Fashion-MNIST raw pixels as `bench_probe.py` reads
   them (55,000 train / 5,000 val, a seeded split of the training file / 10,000 test; 784
   features, pixels / 255), on the CPU: `train_probes` with one l2 (1e-4, the default before
   the grid) against the default grid of 8 values trained together (stacked as one
   [80, 784] weight). Wall and CPU time of each, and the epochs each probe ran; then where a
   training pass's time goes, for 1 and 8 heads (its products; the softmax).
2. **The chosen l2 against the old fixed default** (target: chosen test error never worse
   than 1e-4's by more than 0.002, on any layer). The demo's sweep (`probeserve demo`: its
   `mnist_convnet` checkpoints, layers, reducer and Fashion-MNIST data; `--quick` sizes by
   default, `--full` for the demo's own) with `probe.l2` left at the default grid: every
   (checkpoint, layer) is extracted and probed with `answer_probes`, whose grid holds 1e-4,
   so each row's chosen probe and the 1e-4 probe come from the same call (a stacked head
   answers what it answers alone: `tests/test_science.py`).
3. **What `probe.control` and `probe.mdl` add** on the same items: wall time of
   `answer_probes` with both on against the grid alone.
4. **What dropping losing heads early would buy** (`--only drop`, not in the default run;
   probeserve does not drop heads): the grid's every head recorded at every epoch on
   Fashion-MNIST pixels and the demo's items, then rules such as successive halving replayed
   on those curves: their cost against one probe (from the measured seconds of a pass of k
   heads) and their chosen probe's test error against the 1e-4 probe and the exact grid.

    python jobs/benchmarks/bench_science.py [--idx-dir DIR] [--out DIR] [--full] [--only grid|demo|drop]

Wall times are taken once each, so on a shared machine they move with whatever else runs
there; CPU time (`time.process_time`, all threads) is the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_probe import DEFAULT_IDX_DIR, find, read_idx

OLD_DEFAULT = 1e-4


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def bench_grid(idx_dir: Path) -> bool:
    import torch

    from probeserve.probe import ProbeData, in_memory, train_probes
    from probeserve.spec import DEFAULT_L2_GRID, ProbeSpec

    images = read_idx(find(idx_dir, "train-images-idx3-ubyte")).reshape(60000, -1)
    labels = read_idx(find(idx_dir, "train-labels-idx1-ubyte")).astype(np.int64)
    test_x = read_idx(find(idx_dir, "t10k-images-idx3-ubyte")).reshape(10000, -1).astype(np.float32) / 255
    test_y = read_idx(find(idx_dir, "t10k-labels-idx1-ubyte")).astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    val_rows, train_rows = order[:5000], order[5000:]
    x, y = images[train_rows].astype(np.float32) / 255, labels[train_rows]
    xv, yv = images[val_rows].astype(np.float32) / 255, labels[val_rows]

    def data() -> ProbeData:
        return ProbeData(in_memory(x, y), in_memory(xv, yv), in_memory(test_x, test_y), 10)

    print(
        f"1. l2 grid on Fashion-MNIST pixels: train {len(x)}, val {len(xv)}, test {len(test_x)}, "
        f"784 features, 10 classes; CPU, torch threads {torch.get_num_threads()}"
    )
    spec = ProbeSpec()
    (one,), one_wall, one_cpu = _timed(lambda: train_probes([data()], spec=spec, l2s=[OLD_DEFAULT])[0])
    grid, grid_wall, grid_cpu = _timed(lambda: train_probes([data()], spec=spec, l2s=DEFAULT_L2_GRID)[0])
    print(
        f"   one probe (l2 {OLD_DEFAULT:g}):  {one_wall:6.1f} s wall  {one_cpu:6.1f} s CPU  "
        f"epochs {one.epochs}, function evaluations {one.evaluations}, test error {one.test_error:.4f}; "
        f"solver {one.solve_seconds:.1f} s wall"
    )
    print(
        f"   grid of {len(grid)} together:      {grid_wall:6.1f} s wall  {grid_cpu:6.1f} s CPU  "
        f"epochs {[r.epochs for r in grid]}; solver {grid[0].solve_seconds:.1f} s wall"
    )
    for r in grid:
        print(f"     l2 {r.l2:<7g} val error {r.val_error:.4f}  test error {r.test_error:.4f}")
    ratio = grid_wall / one_wall
    print(
        f"   grid / one probe: {ratio:.2f}x wall, {grid_cpu / one_cpu:.2f}x CPU time   target <= 2x (wall); "
        f"head-evaluations {sum(r.evaluations for r in grid)} vs {one.evaluations}"
    )
    return ratio <= 2.0


def bench_passes(idx_dir: Path, ks: tuple[int, ...] = (1, 8)) -> dict[int, float]:
    """Where a training pass's time goes, for 1 and 8 stacked heads: the CPU time of one pass
    over the same 55,000 rows as measurement 1, of its two matrix products alone, and, on its
    largest block, of the softmax written out against `torch.softmax` and `max`. Returns the
    seconds of a pass of k heads, for each k in `ks`."""
    import torch

    from probeserve.probe import ProbeData, _load, _pass, in_memory
    from probeserve.spec import ProbeSpec

    images = read_idx(find(idx_dir, "train-images-idx3-ubyte")).reshape(60000, -1)
    labels = read_idx(find(idx_dir, "train-labels-idx1-ubyte")).astype(np.int64)
    rows = np.random.default_rng(0).permutation(len(images))[5000:]
    x, y = images[rows].astype(np.float32) / 255, labels[rows]
    _, (d,) = _load([ProbeData(in_memory(x, y), None, None, 10)], spec=ProbeSpec(), device="cpu", heads=8)
    assert d.train.slabs is not None
    blocks = [sx.float() for sx, _ in d.train.slabs]

    def cpu(fn, repeat: int = 5) -> float:
        fn()
        started = time.process_time()
        for _ in range(repeat):
            fn()
        return (time.process_time() - started) / repeat

    print(
        f"\n   training passes over {len(x)} rows in blocks of {[len(b) for b in blocks]}, "
        f"CPU time, torch threads {torch.get_num_threads()}:"
    )
    generator = torch.Generator().manual_seed(0)
    seconds: dict[int, float] = {}
    for k in ks:
        params = [torch.randn(10 * 785, dtype=torch.float64, generator=generator) * 0.01 for _ in range(k)]
        whole = seconds[k] = cpu(lambda params=params: _pass(d, d.train, params, with_grad=True))
        v = torch.randn(10 * k, 784, generator=generator)
        c = torch.zeros(10 * k)
        products = cpu(lambda v=v, c=c: [torch.addmm(c, b, v.T).T @ b for b in blocks])
        print(
            f"     {k} head(s): pass {whole * 1e3:6.1f} ms ({whole / k * 1e3:5.1f} ms a head), "
            f"its two products {products * 1e3:6.1f} ms ({products / whole:.0%})"
        )
    g = torch.randn(len(blocks[-1]), 8, 10, generator=generator)

    def written_out() -> None:
        top = g.amax(dim=2, keepdim=True)
        probs = (g - top).exp_()
        probs.div_(probs.sum(dim=2, keepdim=True))

    print(
        f"     softmax of a [{len(g)}, 8 x 10] block: torch.softmax {cpu(lambda: torch.softmax(g, dim=2)) * 1e3:.1f} ms, "
        f"max with indices {cpu(lambda: g.max(dim=2)) * 1e3:.1f} ms; written out (amax, exp, sum, divide) "
        f"{cpu(written_out) * 1e3:.1f} ms"
    )
    if 1 in seconds and 8 in seconds:
        print(
            f"     an 8-head pass costs {seconds[8] / seconds[1]:.2f}x a 1-head pass: the grid's floor while "
            "every head trains as many epochs as one probe does"
        )
    return seconds


def demo_items(out: str, *, full: bool):
    """The demo's sweep with probe.l2 at its default grid: checkpoints trained (or reused),
    every item extracted. Returns (sweep, items)."""
    from probeserve.data import find_fashion_mnist
    from probeserve.demo import QUICK_STEPS, STEPS, demo_spec, train_and_checkpoint
    from probeserve.runners.local import group_by_checkpoint
    from probeserve.spec import spec_from_dict
    from probeserve.sweep import Sweep, extract_missing

    path = find_fashion_mnist()
    if path is None:
        raise SystemExit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist")
    spec_dict = demo_spec(out, path, quick=not full)
    del spec_dict["probe"]["l2"]  # the demo sets 1e-3; here: the default grid
    spec_dict["run"] = "science"
    spec_dict["resources"]["device"] = "cpu"
    spec = spec_from_dict(spec_dict, source="bench spec")
    train_and_checkpoint(spec, STEPS if full else QUICK_STEPS, quick=not full)
    sweep = Sweep(spec)
    plan = sweep.plan()
    sweep.record_spec()
    items = [item for item, _ in plan.items]
    for group in group_by_checkpoint(items):
        extract_missing(sweep, group, device="cpu")
    return sweep, items


def bench_demo(out: str, *, full: bool, with_extras: bool = True) -> bool:
    from probeserve.probe import answer_probes
    from probeserve.spec import DEFAULT_L2_GRID, ControlSpec, MdlSpec
    from probeserve.sweep import _probe_data

    sweep, items = demo_items(out, full=full)
    spec = sweep.spec.probe
    sizes = sweep.spec.data
    print(
        f"\n2. chosen l2 vs l2 {OLD_DEFAULT:g} on the demo's sweep ({'full' if full else 'quick'} size: "
        f"train {sizes.train_size}, val {sizes.val_size}, test {sizes.test_size}; {len(items)} items)"
    )
    at_default = list(DEFAULT_L2_GRID).index(OLD_DEFAULT)
    diffs, by_loss = [], []
    grid_wall = both_wall = 0.0
    with_both = spec.model_copy(update={"control": ControlSpec(), "mdl": MdlSpec()})
    print(
        f"   {'step':>4}  {'layer':<7} {'l2 (val error)':>14} {'test error':>10}  {'at 1e-4':>8}  "
        f"{'difference':>10}  |  {'l2 (val loss)':>13} {'test error':>10} {'difference':>10}"
    )
    for item in items:
        _, data = _probe_data(sweep, item.checkpoint, item.layer)
        (answer,), wall, _ = _timed(lambda data=data: answer_probes([data], spec=spec))
        grid_wall += wall
        chosen, default = answer.chosen, answer.grid[at_default]
        # the other rule one could use: the lowest validation loss
        on_loss = min(answer.grid, key=lambda r: (r.val_loss, -r.l2))
        diffs.append(chosen.test_error - default.test_error)
        by_loss.append(on_loss.test_error - default.test_error)
        print(
            f"   {item.checkpoint.step:>4}  {item.layer:<7} {chosen.l2:>14g} {chosen.test_error:>10.4f}  "
            f"{default.test_error:>8.4f}  {diffs[-1]:>+10.4f}  |  {on_loss.l2:>13g} {on_loss.test_error:>10.4f} "
            f"{by_loss[-1]:>+10.4f}"
        )
        if with_extras:
            _, data = _probe_data(sweep, item.checkpoint, item.layer)
            (_,), wall, _ = _timed(lambda data=data: answer_probes([data], spec=with_both))
            both_wall += wall
    worst = max(diffs)
    print(
        f"   chosen on val error (probeserve's rule) - 1e-4: worst {worst:+.4f}, mean {np.mean(diffs):+.4f}, "
        f"better on {sum(d < 0 for d in diffs)} of {len(diffs)} items   target: worst <= +0.002"
    )
    print(
        f"   chosen on val loss (for comparison)      - 1e-4: worst {max(by_loss):+.4f}, "
        f"mean {np.mean(by_loss):+.4f}, better on {sum(d < 0 for d in by_loss)} of {len(by_loss)} items"
    )
    if with_extras:
        print(
            f"\n3. control task + MDL on the same items: {both_wall:.1f} s wall against {grid_wall:.1f} s for "
            f"the grid alone: {both_wall / grid_wall:.2f}x"
        )
    return worst <= 0.002


def _recording_curves():
    """A context in which every task head of a probe call records, at each epoch, its
    validation loss and error and its test error (one test pass more per epoch: slow, only
    for measurement 4). Yields {head index: [(epoch, val loss, val error, test error)]}."""
    from contextlib import contextmanager

    from probeserve import probe as P

    @contextmanager
    def recording():
        curves: dict[int, list[tuple[int, float, float, float]]] = {}
        original = P._Head.validated

        def validated(self, epoch, params, val):
            if val is not None and self.view == P._TASK and self.data.test is not None:
                test = P._pass(self.data, self.data.test, [params], with_grad=False, views=[self.view])[0]
                curves.setdefault(self.index, []).append((epoch, val.loss, val.error, test.error))
            return original(self, epoch, params, val)

        P._Head.validated = validated
        try:
            yield curves
        finally:
            P._Head.validated = original

    return recording()


def _simulate(l2s, curves, rule, pass_seconds):
    """Replay a grid's recorded epochs under a rule that drops heads early. Heads do not
    interact (each has its own solver and stop), so a head that is not dropped runs exactly
    as recorded, and a dropped one keeps what early stopping kept by then. Returns (index
    chosen as `choose_l2` chooses, {index: kept (epoch, val loss, val error, test error)},
    seconds of training passes, from `pass_seconds(k heads)`)."""
    last = {h: c[-1][0] for h, c in curves.items()}
    stop, alive, seconds, epoch = dict(last), set(curves), 0.0, 0
    while True:
        epoch += 1
        alive = {h for h in alive if last[h] >= epoch}
        if not alive:
            break
        seconds += pass_seconds(len(alive))
        for h in rule(epoch, alive, curves, l2s):
            stop[h] = epoch
            alive.discard(h)
    kept = {h: min((r for r in curves[h] if r[0] <= stop[h]), key=lambda r: r[1]) for h in curves}
    chosen = min(kept, key=lambda h: (kept[h][2], kept[h][1], -l2s[h]))
    return chosen, kept, seconds


def _so_far(curve, epoch):
    return min((r for r in curve if r[0] <= epoch), key=lambda r: r[1])


def _halving(milestones):
    """Successive halving (Jamieson & Talwalkar, 2016): at each milestone epoch keep the
    better half of the heads still running, ranked as `choose_l2` ranks."""

    def rule(epoch, alive, curves, l2s):
        if epoch not in milestones:
            return []
        ranked = sorted(alive, key=lambda h: (*_so_far(curves[h], epoch)[2:0:-1], -l2s[h]))
        return ranked[max(1, (len(ranked) + 1) // 2) :]

    return rule


def _margin(relative):
    """Drop a head whose best validation loss so far is worse than the best head's by more
    than `relative`."""

    def rule(epoch, alive, curves, l2s):
        best = {h: _so_far(curves[h], epoch)[1] for h in alive}
        lead = min(best.values())
        return [h for h in alive if best[h] > (1 + relative) * lead]

    return rule


def bench_early_drop(idx_dir: Path, out: str, *, full: bool) -> None:
    """Measurement 4: what dropping losing heads early would save and what it would answer
    (probeserve does not do it). Every head's curve is recorded once (the grid trained in
    full); each rule is replayed on the curves (`_simulate`), its cost from the measured
    seconds of a pass of k heads, against the 1e-4 probe's epochs at a 1-head pass."""
    import torch

    from probeserve.probe import ProbeData, answer_probes, in_memory, train_probes
    from probeserve.spec import DEFAULT_L2_GRID, ProbeSpec
    from probeserve.sweep import _probe_data

    ks = (1, 2, 4, 8)
    seconds = bench_passes(idx_dir, ks)

    def pass_seconds(k: int) -> float:
        return float(np.interp(k, ks, [seconds[j] for j in ks]))

    l2s = list(DEFAULT_L2_GRID)
    sets: dict[str, dict[int, list]] = {}
    images = read_idx(find(idx_dir, "train-images-idx3-ubyte")).reshape(60000, -1)
    labels = read_idx(find(idx_dir, "train-labels-idx1-ubyte")).astype(np.int64)
    test_x = read_idx(find(idx_dir, "t10k-images-idx3-ubyte")).reshape(10000, -1).astype(np.float32) / 255
    test_y = read_idx(find(idx_dir, "t10k-labels-idx1-ubyte")).astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    x, y = images[order[5000:]].astype(np.float32) / 255, labels[order[5000:]]
    xv, yv = images[order[:5000]].astype(np.float32) / 255, labels[order[:5000]]
    with _recording_curves() as curves:
        data = ProbeData(in_memory(x, y), in_memory(xv, yv), in_memory(test_x, test_y), 10)
        train_probes([data], spec=ProbeSpec(), l2s=l2s)
    sets["pixels"] = dict(curves)
    sweep, items = demo_items(out, full=full)
    for item in items:
        _, data = _probe_data(sweep, item.checkpoint, item.layer)
        with _recording_curves() as curves:
            answer_probes([data], spec=sweep.spec.probe)
        sets[f"{item.checkpoint.step}/{item.layer}"] = dict(curves)

    rules = {
        "every head to its own stop (what probeserve does)": lambda *a: [],
        "successive halving at epochs 8, 16, 32": _halving({8, 16, 32}),
        "successive halving at epochs 10, 20, 40": _halving({10, 20, 40}),
        "successive halving at epochs 15, 30": _halving({15, 30}),
        "drop at 2% worse validation loss": _margin(0.02),
        "drop at 0.5% worse validation loss": _margin(0.005),
    }
    at_default = l2s.index(OLD_DEFAULT)
    print(
        f"\n4. dropping losing heads early (not done by probeserve), replayed on recorded curves: Fashion-MNIST "
        f"pixels and the demo's {len(items)} items ({'full' if full else 'quick'} size); torch threads "
        f"{torch.get_num_threads()}; cost = training passes of the heads still running, at the seconds measured "
        f"above, over the 1e-4 probe's epochs at a 1-head pass (line-search passes and validation left out)"
    )
    print(
        f"   {'rule':<50} {'cost / one probe':>20}  {'chosen - 1e-4 test error':>25}  "
        f"{'chosen - exact grid':>20}  same l2"
    )
    for name, rule in rules.items():
        costs, against_default, against_exact, same = [], [], [], 0
        for curves in sets.values():
            exact, exact_kept, _ = _simulate(l2s, curves, rules[next(iter(rules))], pass_seconds)
            chosen, kept, cost = _simulate(l2s, curves, rule, pass_seconds)
            costs.append(cost / (curves[at_default][-1][0] * pass_seconds(1)))
            against_default.append(kept[chosen][3] - exact_kept[at_default][3])
            against_exact.append(kept[chosen][3] - exact_kept[exact][3])
            same += chosen == exact
        print(
            f"   {name:<50} mean {np.mean(costs):4.2f}x max {max(costs):4.2f}x  "
            f"worst {max(against_default):+.4f} mean {np.mean(against_default):+.4f}  "
            f"worst {max(against_exact):+.4f}      {same}/{len(sets)}"
        )
    print(
        f"   pixels alone: every head to its own stop {_simulate(l2s, sets['pixels'], rules[next(iter(rules))], pass_seconds)[2] / (sets['pixels'][at_default][-1][0] * pass_seconds(1)):.2f}x "
        "(measurement 1 times the whole call)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idx-dir", default=DEFAULT_IDX_DIR, type=Path)
    parser.add_argument(
        "--out", help="where the demo's checkpoints and shards go (default: a temporary folder)"
    )
    parser.add_argument("--full", action="store_true", help="the demo's own sizes, not --quick's")
    parser.add_argument(
        "--only",
        choices=["grid", "demo", "drop"],
        help="drop: measurement 4 alone (it is not in the default run)",
    )
    parser.add_argument("--skip-extras", action="store_true", help="leave out measurement 3")
    args = parser.parse_args()
    ok = True
    if args.only in (None, "grid"):
        ok &= bench_grid(args.idx_dir)
        bench_passes(args.idx_dir)
    if args.only in (None, "demo"):
        out = args.out or tempfile.mkdtemp(prefix="bench-science-")
        ok &= bench_demo(out, full=args.full, with_extras=not args.skip_extras)
    if args.only == "drop":
        bench_early_drop(args.idx_dir, args.out or tempfile.mkdtemp(prefix="bench-science-"), full=args.full)
        return
    print("targets met" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    main()
