"""Figure 3 of Alain & Bengio (2016), section 3.2: probes on an untrained 32-layer MLP.

The model is the built-in `mlp` (32 hidden layers of 128 units, LeakyReLU(0.5), Glorot-normal
initialisation) and is never trained: its checkpoint is its initialisation, written with
`probeserve.save_checkpoint` at step 0. The data is the paper's toy problem, x ~ N(0, I_128)
and y = [x . w > 0] (`data.kind: gaussian`). Each repetition draws a fresh initialisation
(torch seed = repetition) and a fresh w (`data.seed` = repetition), and is its own run of
`specs/fig3.yaml` (`fig3-rep000`, ...) in one output folder. A probe reads every layer,
including the input (layer 0); the figure is the mean test error per layer over the
repetitions, with their spread and the 0.5 coin-flip line.

    python jobs/paper/fig3.py                 # 10 repetitions (minutes on 2 CPU cores)
    python jobs/paper/fig3.py --full          # the paper's 100 repetitions
    python jobs/paper/fig3.py --tiny          # 2 repetitions, 5 layers, small data (the test)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import figures
from paperlib import (
    Timer,
    load_paper_spec,
    machine,
    mlp_points,
    out_dir,
    run_sweep,
    setup_logging,
    size_args,
    size_of,
    use_threads,
    user_errors,
)

log = logging.getLogger("probeserve.paper")

DEPTH, WIDTH, DIM = 32, 128, 128
SIZES: dict[str, dict[str, Any]] = {
    # repetitions, probe data per split, every k-th layer
    "tiny": {"repetitions": 2, "train": 1000, "val": 500, "test": 1000, "every": 8},
    "default": {"repetitions": 10, "train": 5000, "val": 1000, "test": 2000, "every": 1},
    "full": {"repetitions": 100, "train": 10000, "val": 2000, "test": 2000, "every": 1},
}


def model_kwargs() -> dict[str, Any]:
    return load_paper_spec("fig3", {}).model.kwargs


def write_initial_checkpoints(ckpt_root: Path, repetitions: int) -> list[str]:
    """The 'training job' of an untrained model: each repetition's initialisation, at step 0."""
    import torch

    import probeserve
    from probeserve.models import build_model
    from probeserve.spec import ModelSpec

    uris = []
    for rep in range(repetitions):
        uri = ckpt_root / f"rep{rep:03d}"
        uris.append(str(uri))
        if (uri / "step=000000000" / "COMPLETE").exists():
            continue
        torch.manual_seed(rep)  # a fresh initialisation in every repetition
        model = build_model(ModelSpec(factory="mlp", kwargs=model_kwargs()))
        probeserve.save_checkpoint(model, str(uri), 0)
    return uris


def specs(out: Path, size: str) -> list:  # -> list[SweepSpec]
    """One sweep spec per repetition: its own run, checkpoint, w and initialisation."""
    s = SIZES[size]
    return [
        load_paper_spec(
            "fig3",
            {
                "run": f"fig3-rep{rep:03d}",
                "checkpoints.uri": str(out / "fig3" / "checkpoints" / f"rep{rep:03d}"),
                "output.uri": str(out / "fig3" / "probes"),
                "data.seed": rep,
                "data.train_size": s["train"],
                "data.val_size": s["val"],
                "data.test_size": s["test"],
                "layers.include": mlp_points(DEPTH, s["every"]),
            },
        )
        for rep in range(s["repetitions"])
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_args(ap)
    args = ap.parse_args(argv)
    setup_logging(args.quiet)
    size, out = size_of(args), out_dir(args)
    png = Path(args.png) if args.png else out / "fig3.png"
    timer = Timer()
    status = 0
    try:
        use_threads(args.threads)
        if args.stage in ("all", "train"):
            with timer.stage("checkpoints"):
                write_initial_checkpoints(out / "fig3" / "checkpoints", SIZES[size]["repetitions"])
        if args.stage in ("all", "sweep"):
            with timer.stage("sweep"):
                for spec in specs(out, size):
                    spec_path = out / "fig3" / "specs" / f"{spec.run}.yaml"
                    status = max(
                        status,
                        run_sweep(
                            spec,
                            runner=args.runner,
                            address=args.address,
                            threads=args.threads,
                            spec_path=spec_path,
                        ),
                    )
        if args.stage in ("all", "plot"):
            with timer.stage("figure"):
                data = figures.fig3_data(str(out / "fig3" / "probes"))
                figures.draw_fig3(data, png, size=size)
                print(figures.fig3_table(data))
                print(f"figure: {png}")
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"size {size}: {SIZES[size]}")
    print(f"machine: {machine()}")
    print(timer.report())
    return status


if __name__ == "__main__":
    sys.exit(main())
