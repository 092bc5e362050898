"""The demo: the main job on embedded defaults, on a laptop.

It trains the paper's `mnist_convnet` on Fashion-MNIST (from the Debian package
`dataset-fashion-mnist`; synthetic images in the same IDX format only where those files are
absent, and it says so), writes checkpoints from initialisation on with `save_checkpoint`
into a local folder that stands in for the bucket, then probes every checkpoint at every
layer, prints the error table and a few sentences read from it (`story`). Rerunning it
reuses the checkpoints and finishes only what is missing.

The demo keeps no activation shards (`output.keep_activations: false`): its table is the
point, and the shards of 4 checkpoints x 10 layers would fill about a gigabyte.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import yaml

from probeserve.errors import ProbeserveError

log = logging.getLogger("probeserve")

STEPS = (0, 20, 60, 200)
QUICK_STEPS = (0, 20)  # a subset of STEPS: the docs' examples run on either output


def synthetic_idx(folder: str, *, seed: int = 0) -> str:
    """Write a 10-class image problem in Fashion-MNIST's IDX format: class templates + noise."""
    from probeserve.data import write_idx

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, size=(10, 7, 7)).repeat(4, axis=1).repeat(4, axis=2)
    for name, n in (("train", 12000), ("t10k", 2000)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        noise = rng.normal(0, 90, size=(n, 28, 28))
        images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
        write_idx(os.path.join(folder, f"{name}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(folder, f"{name}-labels-idx1-ubyte.gz"), labels)
    return folder


def demo_spec(out: str, data_path: str | None, *, quick: bool) -> dict:
    """The demo's spec. Its probe settings, and why:

    - the whole test split (Fashion-MNIST's 10,000 images): a test error on n examples is
      uncertain by about sqrt(p (1 - p) / n), and with 2,000 examples two layers' errors near
      0.13 differ by up to 0.02 by chance, as much as most differences between layers here;
    - `max_epochs` left at its default (300): at 150, some of the demo's probes were cut off
      still improving, with nothing to say so (`hit_max_epochs` now does);
    - avgpool to at most 1,024 features: the convolutions' outputs (up to 25,088 values) shrink to
      what a laptop probes in seconds; conv1 is compared with the raw input's 784 pixels.
    The quick demo (for tests) is smaller on every count, and coarser.
    """
    data: dict = {"kind": "idx", "path": data_path, "train_size": 8000, "val_size": 2000}
    probe: dict = {"l2": 1e-3, "patience": 10}
    if quick:
        data.update(train_size=2000, val_size=1000, test_size=1000)
        probe.update(max_epochs=60)
    return {
        "run": "demo",
        "checkpoints": {"uri": os.path.join(out, "checkpoints")},
        "model": {"factory": "mnist_convnet"},
        "layers": {"include": ["*"]},
        "reducer": {"kind": "avgpool", "max_features": 512 if quick else 1024},
        "data": data,
        "probe": probe,
        "resources": {"device": "auto"},
        "output": {"uri": out, "keep_activations": False},
    }


def train_and_checkpoint(spec, steps: tuple[int, ...], *, quick: bool) -> None:
    """Train mnist_convnet with Adam, saving a checkpoint at each of `steps`."""
    from probeserve.checkpoints import discover, save_checkpoint
    from probeserve.data import load_dataset
    from probeserve.models import build_model
    from probeserve.storage import open_storage

    uri = spec.checkpoints.uri
    storage = open_storage(uri)
    have = {c.step for c in discover(storage, spec.checkpoints).complete} if storage.root_exists() else set()
    if set(steps) <= have:
        log.info("checkpoints at steps %s already in %s", sorted(have), uri)
        return
    torch.manual_seed(0)
    model = build_model(spec.model)
    ds = load_dataset(spec.data.model_copy(update={"train_size": 4000 if quick else 20000}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = 0
    batches: Iterator[tuple[torch.Tensor, np.ndarray]] = iter(())
    model.train()
    while True:
        if step in steps:
            save_checkpoint(model, uri, step)
            log.info("saved checkpoint at step %d", step)
        if step >= max(steps):
            break
        try:
            x, y = next(batches)
        except StopIteration:
            batches = ds.batches("train", 64)
            x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(x), torch.as_tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1


def story(rows: list[dict]) -> list[str]:
    """A few sentences that say what a run's table shows, each derived from its numbers.

    Nothing here is a claim made in advance: which layers beat chance and the raw input, how
    training changed each layer's error and where the error is lowest are read from the rows
    (test errors of `ok` rows), so the demo never tells a story its own table contradicts.
    A test error measured on n examples is itself uncertain, so differences are only counted
    when they are larger than `noise`: two standard errors of the difference of two errors
    near the table's median, 2 * sqrt(2 p (1 - p) / n) (0.02 for 2000 test examples at 0.13).
    """
    ok = [r for r in rows if r["status"] == "ok" and r["test_error"] is not None]
    if not ok:
        return []
    steps = sorted({r["step"] for r in ok})
    index = {r["layer"]: r["layer_index"] for r in ok}
    layers = sorted(index, key=lambda name: (index[name], name))
    error = {(r["layer"], r["step"]): r["test_error"] for r in ok}
    first, last = steps[0], steps[-1]
    out = []

    def listed(names: list[str]) -> str:
        return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1] if names else ""

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    chances = [r["chance_error"] for r in ok if r["chance_error"] is not None]
    at_first = {name: error[(name, first)] for name in layers if (name, first) in error}
    if chances and at_first:
        chance = median(chances)
        beat = [name for name, e in at_first.items() if e < chance]
        lo = min(at_first, key=lambda name: at_first[name])
        hi = max(at_first, key=lambda name: at_first[name])
        which = (
            "every probe beats it"
            if len(beat) == len(at_first)
            else f"{len(beat)} of {len(at_first)} probes beat it"
        )
        out.append(
            f"Chance (always the most frequent class) is {chance:.4f}; at step {first} {which}, "
            f"from {at_first[lo]:.4f} ({lo}) to {at_first[hi]:.4f} ({hi})."
        )

    n_tests = [r["n_test"] for r in ok if r.get("n_test")]
    noise = 0.0
    if n_tests:
        n, typical = median(n_tests), median([r["test_error"] for r in ok])
        noise = 2 * math.sqrt(2 * typical * (1 - typical) / n)
        out.append(
            f"With {n} test examples, two errors near {typical:.2f} can differ by about {noise:.3f} "
            "by chance alone (two standard errors); below, a difference counts only beyond that noise."
        )
    beyond = " by more than the noise" if noise else ""

    raw = "input" if "input" in index else None
    rest = [name for name in layers if name != raw]
    if raw is not None and rest:
        raw_error = {s: error[(raw, s)] for s in steps if (raw, s) in error}
        at_last = {name: error[(name, last)] for name in rest if (name, last) in error}
        if last in raw_error and at_last:
            better = [name for name in rest if name in at_last and at_last[name] < raw_error[last] - noise]
            out.append(
                f"At step {last}, {len(better)} of {len(at_last)} layers beat the raw input "
                f"({raw_error[last]:.4f}){beyond}" + (f": {listed(better)}." if better else ".")
            )
        for name in rest:
            gaps = [error[(name, s)] - raw_error[s] for s in steps if (name, s) in error and s in raw_error]
            if len(gaps) == len(steps) and min(gaps) > 0:
                by = f"by {min(gaps):.4f} to {max(gaps):.4f}" if len(gaps) > 1 else f"by {gaps[0]:.4f}"
                if min(gaps) > noise:
                    out.append(f"{name} is worse than the raw input at every step, {by}.")
                elif max(gaps) <= noise:
                    out.append(
                        f"{name} is worse than the raw input at every step, but only {by}, within the noise."
                    )
                else:
                    out.append(
                        f"{name} is worse than the raw input at every step, {by}, not always beyond the noise."
                    )

    if len(steps) > 1:
        change = {
            name: error[(name, last)] - error[(name, first)]
            for name in rest or layers
            if (name, first) in error and (name, last) in error
        }
        if change:
            most = min(change, key=lambda name: change[name])
            fell = [name for name in change if change[name] < -max(noise, 1e-9)]
            if fell:
                out.append(
                    f"From step {first} to step {last} the error fell most at {most} "
                    f"({error[(most, first)]:.4f} to {error[(most, last)]:.4f}); it fell{beyond} at "
                    f"{len(fell)} of {len(change)} layers: {listed(fell)}."
                )
            else:
                out.append(f"From step {first} to step {last} no layer's error fell{beyond}.")

    at_last_all = [(name, error[(name, last)]) for name in layers if (name, last) in error]
    if len(at_last_all) > 1:
        best = min(at_last_all, key=lambda item: item[1])
        rises = [(a, b) for (a, ea), (b, eb) in itertools.pairwise(at_last_all) if eb > ea + noise]
        if not rises:
            out.append(
                f"At step {last} the error never rises from one layer to the next{beyond}: "
                f"{at_last_all[0][1]:.4f} at {at_last_all[0][0]}, {at_last_all[-1][1]:.4f} at "
                f"{at_last_all[-1][0]}, lowest at {best[0]} ({best[1]:.4f})."
            )
        else:
            a, b = rises[0]
            times = "" if len(rises) == 1 else f" {len(rises)} times from one layer to the next, first"
            out.append(
                f"At step {last} the error is lowest at {best[0]} ({best[1]:.4f}) but does not fall "
                f"steadily with depth: it rises{beyond}{times} from {a} ({error[(a, last)]:.4f}) to "
                f"{b} ({error[(b, last)]:.4f})."
            )
    return out


def activate_hint(prefix: str = sys.prefix, environ: Mapping[str, str] | None = None) -> str | None:
    """The command that puts this virtual env's `probeserve` and `python` on PATH, when the
    demo runs from a virtual env that is not active (`make demo` calls `.venv/bin/probeserve`);
    None when it is active, or when this is no virtual env."""
    env = os.environ if environ is None else environ
    activate = os.path.join(prefix, "bin", "activate")
    if not os.path.exists(activate) or env.get("VIRTUAL_ENV") == prefix:
        return None
    rel = os.path.relpath(activate)
    return f"source {rel if not rel.startswith('..') else activate}"


def run_demo(*, out: str = "demo-output", quick: bool = False, runner: str = "ray") -> int:
    from probeserve.console import print_results_table, print_run_summary
    from probeserve.data import find_fashion_mnist
    from probeserve.results import run_names
    from probeserve.runners.base import run_spec
    from probeserve.spec import spec_from_dict
    from probeserve.storage import open_storage

    shown = out.rstrip("/") or out  # as the user wrote it, for the commands printed at the end
    if "://" in out:  # it trains and writes here itself: a local folder (abspath would make s3:/)
        raise ProbeserveError(f"--out {shown}: give a local folder; the demo writes its checkpoints there")
    out = os.path.abspath(out)
    try:  # before any work: a file or an unwritable place is the user's --out, not a traceback
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        why = "is a file, not a folder" if os.path.isfile(out) else f"cannot create it ({e.strerror})"
        raise ProbeserveError(f"--out {shown}: {why}") from None
    data_path = find_fashion_mnist()
    if data_path is None:
        data_path = os.path.join(out, "synthetic-data")
        print(
            "Fashion-MNIST not found (apt-get install dataset-fashion-mnist); "
            f"using SYNTHETIC images in the same format from {data_path}",
            file=sys.stderr,
        )
        synthetic_idx(data_path)
    else:
        print(f"probe data: Fashion-MNIST from {data_path}", file=sys.stderr)
    spec_dict = demo_spec(out, data_path, quick=quick)
    spec = spec_from_dict(spec_dict, source="demo spec")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "demo-spec.yaml"), "w") as f:
        yaml.safe_dump(spec_dict, f, sort_keys=False)
    train_and_checkpoint(spec, QUICK_STEPS if quick else STEPS, quick=quick)
    summary = run_spec(spec, runner=runner, address=None)
    rows = print_results_table(out, spec.run, None)
    print("\nWhat the table shows:")
    for sentence in story(rows):
        print(f"  {sentence}")
    print_run_summary(spec, summary, rows)
    hint = activate_hint()
    print("\nNext" + (f" (first, once per shell: {hint})" if hint else "") + ":")
    print(f"  probeserve query {shown}")
    # the tour's next step adds a run beside the demo's: a plot of several runs must name one
    others = [r for r in run_names(open_storage(out)) if r != spec.run]
    choose = f" --run {spec.run}" if others else ""
    print(f"  probeserve plot {shown}{choose} --kind heatmap --out heatmap.png")
    print(f"  probeserve report {shown} --out report.html")
    print(f"  probeserve run {shown}/demo-spec.yaml    # the demo's spec: copy it to write your own")
    return summary.exit_code
