"""What the paper's experiments (jobs/paper/fig*.py) share: sizes, specs, sweeps, layer numbers.

Each experiment of Alain & Bengio (2016) is a job in three parts, as any user's would be: a
training job that writes checkpoints with `probeserve.save_checkpoint`, a sweep spec
(`jobs/paper/specs/*.yaml`) that probes them through the normal service path
(`probeserve.runners.local.run_local`, or `probeserve run SPEC --runner ray`), and a figure
drawn from `probeserve.results.load` (`jobs/paper/figures.py`). Nothing here reaches into the
package's internals; where the package lacks something, it is worked around here and said so.

Every entry point takes one of three sizes: `--tiny` (seconds: what tests/test_paper.py
runs), the default (minutes on 2 CPU cores) and `--full` (the paper's size). A size's
outputs go to their own folder (`paper-output/{size}/` by default), because a run name is
bound to its spec: the same run with other sizes would be refused, and rightly so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
SPECS = HERE / "specs"

log = logging.getLogger("probeserve.paper")


class PaperError(ValueError):
    """A mistake in how an experiment was asked for: one line, exit 2."""


def user_errors() -> tuple[type[Exception], ...]:
    """The errors an entry point reports on one line with exit status 2 (no traceback)."""
    from probeserve.errors import ProbeserveError

    return (PaperError, ProbeserveError)


def size_args(ap: argparse.ArgumentParser) -> None:
    """The options every entry point shares."""
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--tiny", action="store_true", help="a few seconds' worth: the shape only (tests)")
    group.add_argument("--full", action="store_true", help="the paper's size (hours on a CPU)")
    ap.add_argument("--out", help="output folder (default: paper-output/{tiny,default,full})")
    ap.add_argument(
        "--runner",
        choices=("local", "ray"),
        default="local",
        help="local: sweeps run in this process; ray: through `probeserve run SPEC --runner ray`",
    )
    ap.add_argument(
        "--address",
        help="with --runner ray: the cluster to join (auto, host:port, ray://host:port; 'local' starts a "
        "fresh one); default: what `probeserve run` does without --address",
    )
    ap.add_argument(
        "--stage",
        choices=("all", "train", "sweep", "plot"),
        default="all",
        help="run one stage only (each stage skips what is already done)",
    )
    ap.add_argument("--png", help="where to write the figure (default: OUT/figN.png)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for training and probing (default 1: see docs/paper.md, 'The machine, and threads')",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings only")


def size_of(args: argparse.Namespace) -> str:
    return "tiny" if args.tiny else "full" if args.full else "default"


def out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path("paper-output") / size_of(args)


def use_threads(threads: int) -> None:
    """Train with `threads` torch threads (sweeps get them through `resources.torch_threads`).

    One is the default: these models are small (128-unit layers), so a second intra-op
    thread could gain little even on an idle machine, and on a busy one every small op waits
    for a thread the scheduler has not run yet. On the 2 shared cores these jobs were
    measured on, 20 minibatches of the 128-layer MLP took 2.0 s with 1 thread and 30.4 s
    with 2 (docs/paper.md)."""
    import torch

    if threads < 1:
        raise PaperError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    logging.getLogger("probeserve").setLevel(logging.WARNING if quiet else logging.INFO)


# ---- specs and sweeps ----


def load_paper_spec(name: str, overrides: dict[str, Any]):  # -> SweepSpec
    """`specs/{name}.yaml` with `overrides` ({"data.train_size": 1000, ...}) applied on top.

    The overrides go through the same path as `probeserve run SPEC --set key=value`, so a
    wrong value is the same one-line spec error, naming the field."""
    from probeserve.spec import spec_from_dict

    path = SPECS / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    sets = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return spec_from_dict(data, source=str(path), overrides=sets)


def write_spec(spec, path: Path) -> Path:  # spec: SweepSpec
    """The resolved spec as YAML, to rerun by hand: `probeserve run PATH`."""
    from probeserve.spec import dump_spec

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_spec(spec))
    return path


def run_sweep(
    spec, *, runner: str, spec_path: Path, threads: int | None = None, address: str | None = None
) -> int:  # spec: SweepSpec
    """Probe every pending (checkpoint, layer) of `spec`; return the exit status (0 all ok).

    The spec is written to `spec_path` first, so the exact sweep can be rerun by hand. The
    local runner runs in this process; `ray` runs the CLI, as a user would, on a local Ray.
    `threads` sets `resources.torch_threads` (where work runs, not part of the run's identity)."""
    if threads is not None:
        spec = spec.model_copy(
            update={"resources": spec.resources.model_copy(update={"torch_threads": threads})}
        )
    write_spec(spec, spec_path)
    if runner == "ray":
        cmd = [sys.executable, "-m", "probeserve", "run", str(spec_path), "--runner", "ray"]
        cmd += ["--address", address] if address else []
        log.info("%s", " ".join(cmd))
        return subprocess.run(cmd, check=False).returncode
    if address:
        raise PaperError("--address goes with --runner ray")
    from probeserve.runners.local import run_local

    summary = run_local(spec)
    for ckpt, layer, error in summary.failed:
        log.error("FAILED %s %s: %s", ckpt, layer, error)
    log.info(
        "run %s: %d probe(s) now, %d already done, %d failed, %.1f s",
        spec.run,
        summary.ok,
        summary.skipped_done,
        len(summary.failed),
        summary.seconds,
    )
    return summary.exit_code


def load_results(output_uri: str, run: str | None = None):  # -> pyarrow.Table
    from probeserve import results

    return results.load(output_uri, run=run)


# ---- checkpoints written by a training job ----


def check_training_record(ckpt_dir: Path, config: dict[str, Any]) -> bool:
    """True if `ckpt_dir` already holds every checkpoint of this exact training `config`.

    A training job records its configuration next to its checkpoints (`training.json`); a
    folder that holds checkpoints of another configuration is refused instead of mixed."""
    record = ckpt_dir / "training.json"
    if not record.exists():
        return False
    have = json.loads(record.read_text())
    if have.get("config") != config:
        raise PaperError(
            f"{ckpt_dir} holds checkpoints of another training configuration ({record}); "
            "give another --out or remove that folder"
        )
    return bool(have.get("complete"))


def write_training_record(ckpt_dir: Path, config: dict[str, Any], *, complete: bool, **extra: Any) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    body = {"config": config, "complete": complete, **extra}
    tmp = ckpt_dir / ".training.json.tmp"
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, ckpt_dir / "training.json")


def resolve_idx_path(path: str | None) -> str:
    """The IDX folder to train on: the user's (MNIST), or Fashion-MNIST from the Debian package."""
    if path is not None:
        return path
    from probeserve.data import FASHION_MNIST_DIR, find_fashion_mnist

    found = find_fashion_mnist()
    if found is None:
        raise PaperError(
            f"no data: Fashion-MNIST is not in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist), "
            "and --data was not given (a folder with MNIST's four IDX files)"
        )
    return found


def dataset_name(path: str) -> str:
    """What the figures call the data: 'Fashion-MNIST', 'MNIST' or the folder's name."""
    from probeserve.data import FASHION_MNIST_DIR

    if os.path.abspath(path) == os.path.abspath(FASHION_MNIST_DIR):
        return "Fashion-MNIST"
    name = os.path.basename(os.path.normpath(path))
    return "MNIST" if name.lower() == "mnist" else name


# ---- the MLP's layers, numbered as in the paper ----

_HIDDEN = re.compile(r"^hidden\.(\d+)\.act$")


def mlp_layer_number(point: str) -> int | None:
    """The paper's layer number of an `mlp` probe point: `input` is 0, `hidden.k.act` is k."""
    if point == "input":
        return 0
    m = _HIDDEN.match(point)
    return int(m.group(1)) if m else None


def mlp_points(depth: int, every: int = 1, *, always: Sequence[int] = ()) -> list[str]:
    """Probe points of the paper's layers 0, every, 2*every, ..., depth (and `always`)."""
    layers = sorted({*range(0, depth + 1, every), depth, *always})
    return ["input" if k == 0 else f"hidden.{k}.act" for k in layers if 0 <= k <= depth]


# ---- the record of how a figure was made ----


def machine() -> str:
    """One line: CPUs, load, torch, Python; it goes under every figure's numbers."""
    import torch

    try:
        load = "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        load = "load unknown"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU core(s), {load}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


class Timer:
    """Wall time per stage, printed at the end of each entry point."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)

    def report(self) -> str:
        parts = [f"{k} {v:.0f} s" for k, v in self.stages.items()]
        return f"wall time: {', '.join(parts)}; total {time.perf_counter() - self._t0:.0f} s"


class _Stage:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.stages[self.name] = self.timer.stages.get(self.name, 0.0) + time.perf_counter() - self.t0
