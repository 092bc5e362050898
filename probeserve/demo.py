"""The demo: the main job on embedded defaults, on a laptop.

It trains the paper's `mnist_convnet` on Fashion-MNIST (from the Debian package
`dataset-fashion-mnist`; synthetic images in the same IDX format only where those files are
absent, and it says so), writes checkpoints from initialisation on with `save_checkpoint`
into a local folder that stands in for the bucket, then probes every checkpoint at every
layer and prints the error table. Rerunning it reuses the checkpoints and finishes only
what is missing.
"""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import torch
import yaml

log = logging.getLogger("probeserve")

STEPS = (0, 20, 60, 200)
QUICK_STEPS = (0, 40)


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
    return {
        "run": "demo",
        "checkpoints": {"uri": os.path.join(out, "checkpoints")},
        "model": {"factory": "mnist_convnet"},
        "layers": {"include": ["*"]},
        "reducer": {"kind": "avgpool", "max_features": 512 if quick else 1024},
        "data": {
            "kind": "idx",
            "path": data_path,
            "train_size": 2000 if quick else 8000,
            "val_size": 1000 if quick else 2000,
            "test_size": 1000 if quick else 2000,
        },
        "probe": {"l2": 1e-3, "max_epochs": 60 if quick else 150, "patience": 10},
        "resources": {"device": "auto"},
        "output": {"uri": out},
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
    batches = iter(())
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


def run_demo(*, out: str = "demo-output", quick: bool = False, runner: str = "ray") -> int:
    from probeserve.cli import print_results_table, run_spec
    from probeserve.data import find_fashion_mnist
    from probeserve.spec import spec_from_dict

    out = os.path.abspath(out)
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
    print_results_table(out, spec.run, None)
    print(
        f"\n{summary.ok} probe(s) trained now, {summary.skipped_done} already done, "
        f"{len(summary.failed)} failed, in {summary.seconds:.1f} s."
    )
    print(f"results: {out}/results/  (probeserve query {out})")
    print(
        f"spec:    {out}/demo-spec.yaml  (probeserve run {out}/demo-spec.yaml reruns it; nothing left to do)"
    )
    return summary.exit_code
