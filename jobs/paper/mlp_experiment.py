"""The section 3.4 experiments (Figures 7 and 8): train a deep MLP, probe every checkpoint, draw.

`fig7.py` and `fig8.py` each describe their variants (which runs of which spec, how the model
differs) and sizes; this module runs the three stages for them:

1. train: `train_deep_mlp.train` for each variant, with the model kwargs and the data split
   of that variant's sweep spec, so the checkpoints fit the spec by construction;
2. sweep: the variant's spec through the normal service path (`paperlib.run_sweep`);
3. plot: the error-by-layer figure (the chosen checkpoints in colour, the others grey), the
   animation over all checkpoints, and the tables behind them on stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import figures
import train_deep_mlp
from paperlib import (
    Timer,
    dataset_name,
    load_paper_spec,
    machine,
    mlp_points,
    out_dir,
    resolve_idx_path,
    run_sweep,
    setup_logging,
    size_args,
    size_of,
    use_threads,
    user_errors,
)

log = logging.getLogger("probeserve.paper")


@dataclass
class Size:
    """One size of an experiment: the model, the training, the probes."""

    depth: int
    width: int
    steps: int
    save_at: list[int]  # checkpoints (minibatches done)
    highlight: list[int]  # the checkpoints drawn in colour, as in the paper's figure
    every: int  # probe every k-th layer
    train: int  # probe examples per split
    val: int
    test: int
    train_model_on: int | None  # training examples the model learns from (None: all but val)
    model: dict[str, Any] = field(default_factory=dict)  # kwargs that differ from the spec's
    lr: float = 3e-4  # Adam's learning rate (train_deep_mlp.py says why 3e-4 for the 128-layer model)


@dataclass
class Variant:
    """One trained model and its sweep: a run of a spec, with some model kwargs changed."""

    run: str
    spec: str
    title: str  # formatted with the model's kwargs: "{aux_every}"
    model: dict[str, Any] = field(default_factory=dict)  # e.g. {"aux_every": None}
    marks: str = "aux"  # what the red vertical lines show: "aux" heads, the "skip" target, or ""


def spec_for(variant: Variant, size: Size, out: Path, data_path: str | None):  # -> SweepSpec
    base = load_paper_spec(variant.spec, {})
    kwargs = {**base.model.kwargs, "depth": size.depth, "width": size.width, **size.model, **variant.model}
    overrides: dict[str, Any] = {
        "run": variant.run,
        "checkpoints.uri": str(out / variant.spec / "checkpoints" / variant.run),
        "output.uri": str(out / variant.spec / "probes"),
        "model.kwargs": kwargs,
        "data.train_size": size.train,
        "data.val_size": size.val,
        "data.test_size": size.test,
        "layers.include": mlp_points(size.depth, size.every, always=_always(variant, kwargs)),
    }
    if data_path is not None:
        overrides["data.path"] = data_path
    return load_paper_spec(variant.spec, overrides)


def _always(variant: Variant, kwargs: dict[str, Any]) -> list[int]:
    """Layers probed whatever `every` says: the marked ones, and both sides of a skip's target."""
    marks = _marks(variant, kwargs)
    return [*marks, *(m - 1 for m in marks if variant.marks == "skip")]


def _marks(variant: Variant, kwargs: dict[str, Any]) -> list[int]:
    """The layers the red lines mark: auxiliary heads, or the two ends of the skip."""
    if variant.marks == "aux" and kwargs.get("aux_every"):
        return list(range(kwargs["aux_every"], kwargs["depth"], kwargs["aux_every"]))
    if variant.marks == "skip" and kwargs.get("skip_to") is not None:
        return [kwargs["skip_to"]]
    return []


def train(spec, size: Size) -> dict[str, Any]:  # spec: SweepSpec
    return train_deep_mlp.train(
        spec.checkpoints.uri,
        kwargs=dict(spec.model.kwargs),
        steps=size.steps,
        save_at=size.save_at,
        data_path=spec.data.path,
        val_size=spec.data.val_size,
        train_size=size.train_model_on,
        data_seed=spec.data.seed,
        lr=size.lr,
    )


def main(name: str, variants: list[Variant], sizes: dict[str, Size], doc: str, argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    size_args(ap)
    ap.add_argument("--data", help="IDX folder to train and probe on, e.g. MNIST's (default: Fashion-MNIST)")
    ap.add_argument("--video", help=f"where to write the animation (default: OUT/{name}.gif)")
    ap.add_argument(
        "--only",
        choices=[v.run for v in variants],
        help="this variant only (the others are not run or drawn)",
    )
    args = ap.parse_args(argv)
    setup_logging(args.quiet)
    size_name, out = size_of(args), out_dir(args)
    size = sizes[size_name]
    png = Path(args.png) if args.png else out / f"{name}.png"
    gif = Path(args.video) if args.video else out / f"{name}.gif"
    chosen = [v for v in variants if args.only in (None, v.run)]
    timer = Timer()
    status = 0
    try:
        use_threads(args.threads)
        data_path = resolve_idx_path(args.data)
        specs = {v.run: spec_for(v, size, out, args.data) for v in chosen}
        records = {}
        if args.stage in ("all", "train"):
            for v in chosen:
                with timer.stage(f"train {v.run}"):
                    records[v.run] = train(specs[v.run], size)
        if args.stage in ("all", "sweep"):
            for v in chosen:
                with timer.stage(f"sweep {v.run}"):
                    spec_path = out / name / "specs" / f"{v.run}.yaml"
                    status = max(
                        status,
                        run_sweep(
                            specs[v.run],
                            runner=args.runner,
                            address=args.address,
                            threads=args.threads,
                            spec_path=spec_path,
                        ),
                    )
        if args.stage in ("all", "plot"):
            with timer.stage("figure"):
                panels = []
                for v in chosen:
                    c = figures.curves(specs[v.run].output.uri, v.run, "train_error")
                    title = v.title.format(**specs[v.run].model.kwargs)
                    marks = _marks(v, dict(specs[v.run].model.kwargs))
                    panels.append((f"{title}, {dataset_name(data_path)}", c, marks))
                    print(figures.curves_table(c, always=_always(v, dict(specs[v.run].model.kwargs))))
                    history = records.get(v.run, {}).get("history") or _record(specs[v.run])
                    if history:
                        print(
                            f"{v.run}: the model's own main-head error on 2,000 training examples: "
                            + ", ".join(
                                f"step {h['step']}: {h['main_head_train_error']:.3f}" for h in history
                            )
                        )
                size_png = figures.draw_mlp_figure(
                    panels, png, wanted=size.highlight, mark_label=_mark_label(chosen[0])
                )
                title, first, marks = panels[0]
                size_gif = figures.draw_video(first, gif, title=title, marks=marks)
                print(
                    f"figure: {png} ({size_png / 1000:.0f} kB); animation: {gif} ({size_gif / 1000:.0f} kB)"
                )
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"size {size_name}: {size}")
    print(f"machine: {machine()}")
    print(timer.report())
    return status


def _record(spec) -> list[dict[str, Any]]:
    import json

    path = Path(spec.checkpoints.uri) / "training.json"
    return json.loads(path.read_text()).get("history", []) if path.exists() else []


def _mark_label(v: Variant) -> str:
    return {"aux": "auxiliary head", "skip": "skip connection target"}.get(v.marks, "")
