"""Training job of the paper's section 3.3: the MNIST convnet of Figure 4, with early stopping.

It trains the built-in `mnist_convnet` (conv 5x5x32, ReLU, maxpool, conv 5x5x64, ReLU,
maxpool, fc 512, ReLU, fc 10) on MNIST-format IDX data (Fashion-MNIST from the Debian
package unless `--data` names a folder, such as MNIST's) and writes two checkpoints with
`probeserve.save_checkpoint`: the initialisation (step 0) and, after `--epochs` epochs, the
weights of the epoch with the lowest validation error (early stopping), at the step they
were reached. The validation examples are the `--val-size` examples that the probe sweep
holds out with the same seeded split (`data.kind: idx`), so neither the model nor the
probes train on them. `training.json` next to the checkpoints records the configuration
and each epoch's validation error.

    python jobs/paper/train_convnet.py --out ckpts/fig5 --epochs 10
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paperlib import check_training_record, resolve_idx_path, use_threads, user_errors, write_training_record

log = logging.getLogger("probeserve.paper")


def load_split(
    data_path: str, split: str, *, val_size: int, seed: int, train_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, 1, 28, 28] float32 and labels [n] of one split, exactly as the sweep's
    `data.kind: idx` with the same seed and val_size makes it."""
    from probeserve.data import load_dataset
    from probeserve.spec import IdxData

    ds = load_dataset(
        IdxData(kind="idx", path=data_path, val_size=val_size, train_size=train_size, test_size=1, seed=seed)
    )
    ((x, y),) = list(ds.batches(split, ds.size(split)))
    return x, torch.as_tensor(y)


@torch.no_grad()
def error(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    wrong = sum(
        int((model(x[i : i + batch]).argmax(1) != y[i : i + batch]).sum()) for i in range(0, len(y), batch)
    )
    model.train()
    return wrong / len(y)


def train(
    ckpt_uri: str,
    *,
    epochs: int,
    data_path: str | None = None,
    val_size: int = 10000,
    train_size: int | None = None,
    data_seed: int = 0,
    batch_size: int = 50,
    lr: float = 1e-3,
    seed: int = 0,
    kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the initial checkpoint and the early-stopped one; return the training record.

    Does nothing if `ckpt_uri` (a local folder) already holds both checkpoints of this same
    configuration."""
    import probeserve
    from probeserve.models import build_model
    from probeserve.spec import ModelSpec

    data_path = resolve_idx_path(data_path)
    kwargs = dict(kwargs or {})
    config = {
        "model": {"factory": "mnist_convnet", "kwargs": kwargs},
        "data": {"path": data_path, "val_size": val_size, "train_size": train_size, "seed": data_seed},
        "epochs": epochs,
        "optimizer": {"name": "adam", "lr": lr, "batch_size": batch_size},
        "early_stopping": "the epoch with the lowest validation error",
        "seed": seed,
    }
    ckpt_dir = Path(ckpt_uri)
    if check_training_record(ckpt_dir, config):
        log.info("checkpoints of this training already in %s", ckpt_dir)
        return json.loads((ckpt_dir / "training.json").read_text())

    split = {"val_size": val_size, "seed": data_seed, "train_size": train_size}
    x_train, y_train = load_split(data_path, "train", **split)
    x_val, y_val = load_split(data_path, "val", **split)
    torch.manual_seed(seed)
    model = build_model(ModelSpec(factory="mnist_convnet", kwargs=kwargs))
    write_training_record(ckpt_dir, config, complete=False)
    probeserve.save_checkpoint(model, str(ckpt_dir), 0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = [{"epoch": 0, "step": 0, "val_error": error(model, x_val, y_val)}]
    best = history[0] | {"state": None}
    step = 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(y_train), generator=gen)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        history.append({"epoch": epoch, "step": step, "val_error": error(model, x_val, y_val)})
        log.info("epoch %d (step %d): validation error %.4f", epoch, step, history[-1]["val_error"])
        if history[-1]["val_error"] < best["val_error"]:
            best = history[-1] | {"state": copy.deepcopy(model.state_dict())}
    if best["state"] is None:
        raise RuntimeError("training never beat the initialisation on the validation examples")
    probeserve.save_checkpoint(best["state"], str(ckpt_dir), best["step"])
    write_training_record(ckpt_dir, config, complete=True, history=history, best_epoch=best["epoch"])
    return json.loads((ckpt_dir / "training.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint folder")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--data", default=None, help="IDX folder (default: Fashion-MNIST)")
    ap.add_argument("--val-size", type=int, default=10000)
    ap.add_argument("--train-size", type=int, default=None, help="training examples (default: all but val)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
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
    record = train(
        args.out,
        epochs=args.epochs,
        data_path=args.data,
        val_size=args.val_size,
        train_size=args.train_size,
        data_seed=args.data_seed,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    for h in record["history"]:
        print(f"epoch {h['epoch']:>3} (step {h['step']:>6}): validation error {h['val_error']:.4f}")
    print(f"kept epoch {record['best_epoch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
