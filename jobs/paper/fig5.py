"""Figure 5 of Alain & Bengio (2016), section 3.3: the MNIST convnet, at initialisation and trained.

The built-in `mnist_convnet` (the TensorFlow MNIST tutorial's convnet, the paper's Figure 4)
is trained by `jobs/paper/train_convnet.py`, which writes a checkpoint at initialisation and
one after training, early-stopped on the validation examples; `specs/fig5.yaml` puts a probe
on each side of every convolution, activation and pooling (input, conv1 = conv1_preact,
relu1 = conv1_postact, pool1 = conv1_postpool, ..., fc2 = logits) of both checkpoints. The
figure is the test error of every probe, at initialisation and after training, side by side.

Data: Fashion-MNIST from the Debian package by default; `--data DIR` with MNIST's four IDX
files gives the paper's data set.

    python jobs/paper/fig5.py               # 2 epochs on 20,000 images, conv layers pooled (minutes)
    python jobs/paper/fig5.py --full        # 10 epochs on all 50,000, every feature (hours on a CPU)
    python jobs/paper/fig5.py --tiny        # 20 minibatches, 500 probe examples (the test)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import figures
import train_convnet
from paperlib import (
    Timer,
    dataset_name,
    load_paper_spec,
    machine,
    out_dir,
    resolve_idx_path,
    run_sweep,
    setup_logging,
    size_args,
    size_of,
    use_threads,
    user_errors,
)

SIZES: dict[str, dict[str, Any]] = {
    # epochs over train_model_on images (None: all but val); probe examples per split; reducer
    "tiny": {
        "epochs": 1,
        "train_model_on": 1000,
        "train": 500,
        "val": 500,
        "test": 500,
        "reducer": {"kind": "avgpool", "max_features": 256},
    },
    "default": {
        "epochs": 2,
        "train_model_on": 20000,
        "train": 5000,
        "val": 2000,
        "test": 2000,
        "reducer": {"kind": "avgpool", "max_features": 3136},
    },
    "full": {
        "epochs": 10,
        "train_model_on": None,
        "train": 50000,
        "val": 10000,
        "test": 10000,
        "reducer": {"kind": "none"},
    },
}


def spec_for(out: Path, size: str, data_path: str | None):  # -> SweepSpec
    s = SIZES[size]
    overrides: dict[str, Any] = {
        "checkpoints.uri": str(out / "fig5" / "checkpoints"),
        "output.uri": str(out / "fig5" / "probes"),
        "data.train_size": s["train"],
        "data.val_size": s["val"],
        "data.test_size": s["test"],
        "reducer": s["reducer"],
    }
    if data_path is not None:
        overrides["data.path"] = data_path
    return load_paper_spec("fig5", overrides)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_args(ap)
    ap.add_argument("--data", help="IDX folder to train and probe on, e.g. MNIST's (default: Fashion-MNIST)")
    args = ap.parse_args(argv)
    setup_logging(args.quiet)
    size, out = size_of(args), out_dir(args)
    png = Path(args.png) if args.png else out / "fig5.png"
    timer = Timer()
    status = 0
    try:
        use_threads(args.threads)
        data_path = resolve_idx_path(args.data)
        spec = spec_for(out, size, args.data)
        if args.stage in ("all", "train"):
            with timer.stage("train"):
                record = train_convnet.train(
                    spec.checkpoints.uri,
                    epochs=SIZES[size]["epochs"],
                    data_path=spec.data.path,
                    val_size=spec.data.val_size,
                    train_size=SIZES[size]["train_model_on"],
                    data_seed=spec.data.seed,
                )
            print(
                "training: validation error by epoch "
                + ", ".join(f"{h['epoch']}: {h['val_error']:.4f}" for h in record["history"])
                + f"; kept epoch {record['best_epoch']}"
            )
        if args.stage in ("all", "sweep"):
            with timer.stage("sweep"):
                status = run_sweep(
                    spec,
                    runner=args.runner,
                    address=args.address,
                    threads=args.threads,
                    spec_path=out / "fig5" / "specs" / "fig5.yaml",
                )
        if args.stage in ("all", "plot"):
            with timer.stage("figure"):
                d = figures.fig5_data(spec.output.uri)
                kb = figures.draw_fig5(d, png, dataset=dataset_name(data_path), size=size) / 1000
                print(figures.fig5_table(d))
                print(f"figure: {png} ({kb:.0f} kB)")
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"size {size}: {SIZES[size]}")
    print(f"machine: {machine()}")
    print(timer.report())
    return status


if __name__ == "__main__":
    sys.exit(main())
