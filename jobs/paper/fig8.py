"""Figure 8 of Alain & Bengio (2016), section 3.4: a skip connection that makes layers useless.

The built-in `mlp` (128 hidden layers of 128 units, LeakyReLU(0.5), Glorot-normal) with a
skip connection that concatenates layer 0 (the input) into layer 64's input is trained on
MNIST-format data (Fashion-MNIST unless `--data` names MNIST's IDX folder) by
`jobs/paper/train_deep_mlp.py`, which writes checkpoints with `probeserve.save_checkpoint`;
`specs/fig8.yaml` probes every layer of every checkpoint. The figure is the probes' train
error by layer at 0, 500 and 2,000 minibatches (the other checkpoints in grey; they make the
animation). The paper's finding: the model ignores layers 1-63.

    python jobs/paper/fig8.py               # 1,000 minibatches, every 8th layer (minutes)
    python jobs/paper/fig8.py --full        # 2,000 minibatches, every layer
    python jobs/paper/fig8.py --tiny        # a 32-layer, 32-unit model, skip 0 -> 16 (the test)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mlp_experiment
from mlp_experiment import Size, Variant

VARIANTS = [Variant(run="fig8", spec="fig8", title="skip connection {skip_from} -> {skip_to}", marks="skip")]

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
        model={"skip_to": 16},
    ),
    "default": Size(
        depth=128,
        width=128,
        steps=1000,
        save_at=[0, 50, 100, 200, 300, 500, 750, 1000],
        highlight=[0, 250, 1000],
        every=8,
        train=5000,
        val=2000,
        test=2000,
        train_model_on=None,
    ),
    "full": Size(
        depth=128,
        width=128,
        steps=2000,
        save_at=[0, 100, 200, 300, 400, 500, 750, 1000, 1500, 2000],
        highlight=[0, 500, 2000],
        every=1,
        train=50000,
        val=10000,
        test=10000,
        train_model_on=None,
    ),
}


def main(argv: list[str] | None = None) -> int:
    return mlp_experiment.main("fig8", VARIANTS, SIZES, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
