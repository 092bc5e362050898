"""A training job that writes checkpoints probeserve picks up.

It trains the built-in `mlp` on the paper's Gaussian toy problem and calls
`probeserve.save_checkpoint` every `--every` steps: the weights (safetensors) first, then the
COMPLETE marker, so a watcher never sees a half-written checkpoint. Any job can do the same by
writing its own weights file and the marker last. With the virtual env active
(`source .venv/bin/activate`, see the README):

    python jobs/train_mlp.py --out ckpts/gaussian-mlp --steps 200 --every 50
    probeserve run jobs/examples/gaussian-mlp.yaml

The model's shape flags must match the spec's `model.kwargs` (the defaults match
jobs/examples/gaussian-mlp.yaml).
"""

from __future__ import annotations

import argparse
import sys

import torch

import probeserve
from probeserve.data import load_dataset
from probeserve.models import build_model
from probeserve.spec import GaussianData, ModelSpec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Train the built-in mlp on the paper's Gaussian toy problem (Adam, batch 128) "
        "and write a checkpoint probeserve picks up every --every steps, and at the last step.",
        epilog="example: python jobs/train_mlp.py --out ckpts/gaussian-mlp --steps 200 --every 50; "
        "then: probeserve run jobs/examples/gaussian-mlp.yaml",
    )
    ap.add_argument("--out", required=True, help="checkpoint prefix: a path, file:// or s3://bucket/prefix")
    ap.add_argument("--steps", type=int, default=200, help="training steps (default: %(default)s)")
    ap.add_argument(
        "--every",
        type=int,
        default=50,
        help="write a checkpoint every this many steps (default: %(default)s)",
    )
    ap.add_argument("--dim", type=int, default=32, help="input dimension (default: %(default)s)")
    ap.add_argument("--depth", type=int, default=8, help="hidden layers (default: %(default)s)")
    ap.add_argument("--width", type=int, default=64, help="units per hidden layer (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.steps < 0 or args.every < 1:
        ap.error("--steps must be >= 0 and --every >= 1")

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
    losses: list[float] = []  # training losses since the last checkpoint
    while True:
        for x, y in data.batches("train", 128):
            if step % args.every == 0 or step == args.steps:
                uri = probeserve.save_checkpoint(model, args.out, step)
                loss_text = (
                    f"train loss {sum(losses) / len(losses):.4f} (mean of the last {len(losses)} steps)"
                    if losses
                    else "initial weights"
                )
                print(f"step {step}: {loss_text}; wrote {uri}", flush=True)
                losses = []
            if step == args.steps:
                return
            loss = torch.nn.functional.cross_entropy(model(x), torch.as_tensor(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())  # float(loss) warns that loss requires grad
            step += 1


if __name__ == "__main__":
    try:
        main()
    except probeserve.ProbeserveError as e:  # a bucket that does not exist, an endpoint that refuses
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
