"""A training job that writes checkpoints probeserve picks up.

It trains the built-in `mlp` on the paper's Gaussian toy problem and calls
`probeserve.save_checkpoint` every `--every` steps: the weights (safetensors) first, then the
COMPLETE marker, so a watcher never sees a half-written checkpoint. Any job can do the same by
writing its own weights file and the marker last.

    python jobs/train_mlp.py --out ckpts/gaussian-mlp --steps 200 --every 50
    probeserve run jobs/examples/gaussian-mlp.yaml
"""

from __future__ import annotations

import argparse

import torch

import probeserve
from probeserve.data import load_dataset
from probeserve.models import build_model
from probeserve.spec import GaussianData, ModelSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint prefix: a path, file:// or s3://bucket/prefix")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--width", type=int, default=64)
    args = ap.parse_args()

    torch.manual_seed(0)
    kwargs = {
        "input_dim": args.dim,
        "depth": args.depth,
        "width": args.width,
        "num_classes": 2,
        "activation": "leaky_relu",
    }
    model = build_model(ModelSpec(factory="mlp", kwargs=kwargs))
    data = load_dataset(
        GaussianData(kind="gaussian", dim=args.dim, train_size=5000, val_size=1000, test_size=1000)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = 0
    while True:
        for x, y in data.batches("train", 128):
            if step % args.every == 0 or step == args.steps:
                uri = probeserve.save_checkpoint(model, args.out, step)
                print(f"step {step}: wrote {uri}")
            if step == args.steps:
                return
            loss = torch.nn.functional.cross_entropy(model(x), torch.as_tensor(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1


if __name__ == "__main__":
    main()
