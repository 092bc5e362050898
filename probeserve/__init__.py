"""probeserve: linear classifier probes for every checkpoint and every layer.

The probe of Alain & Bengio (2016) is softmax(W h + b) trained with cross-entropy on a
layer's activations h; its error says how linearly separable the classes are at that layer.
probeserve computes it for every (checkpoint, layer) of a training run and keeps the answers
in a Parquet table. See README.md and docs/architecture.md.

Imports here are lazy so that `import probeserve` stays cheap and has no side effects.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "save_checkpoint": "probeserve.checkpoints",
    "SweepSpec": "probeserve.spec",
    "load_spec": "probeserve.spec",
    "ProbeserveError": "probeserve.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'probeserve' has no attribute {name!r}")
