"""Figure 7 of Alain & Bengio (2016), section 3.4: auxiliary heads make a 128-layer MLP trainable.

The built-in `mlp` (128 hidden layers of 128 units, LeakyReLU(0.5), Glorot-normal) is trained
on MNIST-format data (Fashion-MNIST unless `--data` names MNIST's IDX folder) with a linear
auxiliary head every 16 layers whose losses are added to the main loss
(`jobs/paper/train_deep_mlp.py`); checkpoints are written during training with
`probeserve.save_checkpoint`, and `specs/fig7.yaml` probes every layer of every checkpoint.
The figure is the probes' train error by layer, as in the paper, at 0, 500 and 5,000
minibatches (the other checkpoints in grey; they make the animation).

A control for the claim that the heads are what makes the model trainable: the same model,
seed and data without them (run `fig7-noaux`), in the figure's second panel.

    python jobs/paper/fig7.py               # 1,000 minibatches, every 8th layer (minutes)
    python jobs/paper/fig7.py --full        # 5,000 minibatches, every layer
    python jobs/paper/fig7.py --tiny        # a 32-layer, 32-unit model, 120 minibatches (the test)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mlp_experiment
from mlp_experiment import Size, Variant

VARIANTS = [
    Variant(run="fig7", spec="fig7", title="auxiliary heads every {aux_every} layers"),
    Variant(run="fig7-noaux", spec="fig7", title="no auxiliary heads (control)", model={"aux_every": None}),
]

SIZES = {
    "tiny": Size(
        depth=32,
        width=32,
        steps=120,
        save_at=[0, 20, 40, 60, 90, 120],
        highlight=[0, 40, 120],
        every=4,
        train=1000,
        val=500,
        test=500,
        train_model_on=5000,
        lr=1e-3,  # the small model learns its shape in 120 minibatches at this rate, stably
        model={"aux_every": 8},
    ),
    "default": Size(
        depth=128,
        width=128,
        steps=1000,
        save_at=[0, 50, 100, 200, 300, 500, 750, 1000],
        highlight=[0, 100, 1000],
        every=8,
        train=5000,
        val=2000,
        test=2000,
        train_model_on=None,
    ),
    "full": Size(
        depth=128,
        width=128,
        steps=5000,
        save_at=[0, 100, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 4000, 5000],
        highlight=[0, 500, 5000],
        every=1,
        train=50000,
        val=10000,
        test=10000,
        train_model_on=None,
    ),
}


def main(argv: list[str] | None = None) -> int:
    return mlp_experiment.main("fig7", VARIANTS, SIZES, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
