"""Training job of the paper's section 3.4: the 128-layer MLP, with auxiliary heads or a skip.

It trains the built-in `mlp` (leaky ReLU, Glorot-normal initialisation) on MNIST-format IDX
data (Fashion-MNIST from the Debian package unless `--data` names a folder, such as MNIST's)
and writes a checkpoint with `probeserve.save_checkpoint` at every step of `--save-at`
(minibatches done), the weights first and the completion marker last, as any training job
that probeserve watches does.

The optimiser is Adam (learning rate 3e-4, minibatches of 128) with the gradient's norm
clipped to 1: with a learning rate of 1e-3, or without clipping, training of the 128-layer
model with auxiliary heads was unstable (the main head's error went back up after 300
minibatches), and plain SGD with momentum had hardly moved after 1,000 minibatches.

With `--aux-every K` the loss is the main head's cross-entropy plus that of a linear
auxiliary head on every K-th hidden layer (`MLP.forward_with_aux`), as in the paper's
Figure 7. With `--skip-from 0 --skip-to 64` layer 0 (the input) is concatenated into layer
64's input: the paper's pathological skip connection of Figure 8.

The training split is the IDX training file less the validation examples that the probe
sweep holds out (`--val-size`, `--seed`: the same seeded split that `data.kind: idx` makes),
so the probes' validation examples are never trained on. `training.json` next to the
checkpoints records the configuration and, per checkpoint, the main head's error on the
first 2,000 training examples (the model's own answer, not a probe's).

    python jobs/paper/train_deep_mlp.py --out ckpts/fig7 --aux-every 16 --steps 5000 \
        --save-at 0,500,1000,2000,3000,4000,5000
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paperlib import (
    PaperError,
    check_training_record,
    resolve_idx_path,
    use_threads,
    user_errors,
    write_training_record,
)

log = logging.getLogger("probeserve.paper")
MONITOR_EXAMPLES = 2000  # training examples the main head is scored on at each checkpoint


def model_kwargs(
    *,
    depth: int,
    width: int,
    aux_every: int | None = None,
    skip_from: int | None = None,
    skip_to: int | None = None,
    input_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
) -> dict[str, Any]:
    """The `model.kwargs` of the built-in `mlp` that the sweep spec must repeat exactly."""
    kwargs: dict[str, Any] = {
        "input_shape": list(input_shape),
        "depth": depth,
        "width": width,
        "num_classes": num_classes,
        "activation": "leaky_relu",
        "negative_slope": 0.5,
    }
    if aux_every:
        kwargs["aux_every"] = aux_every
    if skip_from is not None:
        kwargs["skip_from"], kwargs["skip_to"] = skip_from, skip_to
    return kwargs


def load_training_split(
    data_path: str, *, val_size: int, seed: int, train_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [n, 1, 28, 28] float32 and labels [n] of the IDX training split, less `val_size`
    examples, exactly as the sweep's `data.kind: idx` with the same seed splits it."""
    from probeserve.data import load_dataset
    from probeserve.spec import IdxData

    ds = load_dataset(
        IdxData(kind="idx", path=data_path, val_size=val_size, train_size=train_size, test_size=1, seed=seed)
    )
    n = ds.size("train")
    ((x, y),) = list(ds.batches("train", n))
    return x, torch.as_tensor(y)


def train(
    ckpt_uri: str,
    *,
    kwargs: dict[str, Any],
    steps: int,
    save_at: list[int],
    data_path: str | None = None,
    val_size: int = 10000,
    train_size: int | None = None,
    data_seed: int = 0,
    batch_size: int = 128,
    lr: float = 3e-4,
    clip: float | None = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Train, writing a checkpoint at each step in `save_at`; return the training record.

    Does nothing if `ckpt_uri` (a local folder) already holds every checkpoint of this same
    configuration."""
    import probeserve
    from probeserve.models import build_model
    from probeserve.spec import ModelSpec

    data_path = resolve_idx_path(data_path)
    save_at = sorted(set(save_at))
    if not save_at or save_at[0] < 0 or save_at[-1] > steps:
        raise PaperError(f"--save-at must be steps in 0..{steps}, got {save_at}")
    config = {
        "model": {"factory": "mlp", "kwargs": kwargs},
        "data": {"path": data_path, "val_size": val_size, "train_size": train_size, "seed": data_seed},
        "steps": steps,
        "save_at": save_at,
        "optimizer": {"name": "adam", "lr": lr, "batch_size": batch_size, "clip_grad_norm": clip},
        "loss": "main head cross-entropy + sum of the auxiliary heads' cross-entropies",
        "seed": seed,
    }
    ckpt_dir = Path(ckpt_uri)
    if check_training_record(ckpt_dir, config):
        log.info("checkpoints of this training already in %s", ckpt_dir)
        return _read_record(ckpt_dir)

    x_train, y_train = load_training_split(
        data_path, val_size=val_size, seed=data_seed, train_size=train_size
    )
    torch.manual_seed(seed)
    model = build_model(ModelSpec(factory="mlp", kwargs=kwargs))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y_train), generator=gen)
    cursor = 0
    history = []
    write_training_record(ckpt_dir, config, complete=False)
    t0 = time.perf_counter()
    for step in range(steps + 1):
        if step in save_at:
            probeserve.save_checkpoint(model, str(ckpt_dir), step)
            history.append({"step": step, "main_head_train_error": _error(model, x_train, y_train)})
            log.info(
                "step %d: checkpoint written; main head train error %.3f",
                step,
                history[-1]["main_head_train_error"],
            )
        if step == steps:
            break
        if cursor + batch_size > len(order):  # a fresh permutation each epoch
            order, cursor = torch.randperm(len(y_train), generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        logits, aux_logits = model.forward_with_aux(x_train[idx])
        y = y_train[idx]
        loss = F.cross_entropy(logits, y) + sum((F.cross_entropy(a, y) for a in aux_logits), torch.zeros(()))
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    seconds = time.perf_counter() - t0
    log.info(
        "%d minibatches in %.1f s (%.3f s each, checkpoints included), %d torch thread(s)",
        steps,
        seconds,
        seconds / max(1, steps),
        torch.get_num_threads(),
    )
    write_training_record(
        ckpt_dir,
        config,
        complete=True,
        history=history,
        seconds=seconds,
        torch_threads=torch.get_num_threads(),
    )
    return _read_record(ckpt_dir)


def _read_record(ckpt_dir: Path) -> dict[str, Any]:
    import json

    return json.loads((ckpt_dir / "training.json").read_text())


@torch.no_grad()
def _error(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = model(x[:MONITOR_EXAMPLES]).argmax(1)
    model.train()
    return float((pred != y[:MONITOR_EXAMPLES]).float().mean())


def _steps_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint folder")
    ap.add_argument("--depth", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--aux-every", type=int, default=None, help="an auxiliary head every K hidden layers")
    ap.add_argument("--skip-from", type=int, default=None, help="0: the input")
    ap.add_argument("--skip-to", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5000, help="minibatches")
    ap.add_argument(
        "--save-at", type=_steps_list, default=None, help="comma-separated steps (default: 10 spread)"
    )
    ap.add_argument("--data", default=None, help="IDX folder (default: Fashion-MNIST)")
    ap.add_argument("--val-size", type=int, default=10000)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (see docs/paper.md, 'The machine, and threads')"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        use_threads(args.threads)
        return _run(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    save_at = args.save_at or sorted({round(args.steps * i / 9) for i in range(10)})
    record = train(
        args.out,
        kwargs=model_kwargs(
            depth=args.depth,
            width=args.width,
            aux_every=args.aux_every,
            skip_from=args.skip_from,
            skip_to=args.skip_to,
        ),
        steps=args.steps,
        save_at=save_at,
        data_path=args.data,
        val_size=args.val_size,
        train_size=args.train_size,
        data_seed=args.data_seed,
        batch_size=args.batch_size,
        lr=args.lr,
        clip=args.clip or None,
        seed=args.seed,
    )
    for h in record.get("history", []):
        print(f"step {h['step']:>6}: main head train error {h['main_head_train_error']:.3f}")
    if "seconds" in record:
        print(
            f"{args.steps} minibatches in {record['seconds']:.1f} s with {record['torch_threads']} torch thread(s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
