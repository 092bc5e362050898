"""The paper's figures, drawn from the committed results of the sweeps (jobs/paper/fig*.py).

Each figure reads the results table with `probeserve.results.load`, turns it into numbers
with `probeserve.plots.grid` (the data behind every probeserve plot: steps x layers, NaN
where an item has no `ok` row), and draws them in the paper's style: error against layer,
one line per checkpoint. The `*_data` functions return those numbers (tests check their
shape), the `*_table` functions print them, the `draw_*` functions write the PNG or GIF.
A failed or missing item is never dropped silently: it is a gap in the line, and counted
in the title.

Redraw a figure from existing results without running anything:

    python jobs/paper/figures.py fig3 paper-output/default/fig3/probes fig3.png
    python jobs/paper/figures.py fig7 paper-output/default/fig7/probes fig7.png --video fig7.gif
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paperlib import mlp_layer_number

MAX_PNG_BYTES = 200_000  # committed figures stay small
MAX_GIF_BYTES = 2_000_000

# Figure 5: our probe points and the paper's names for them (Figure 4's convnet).
CONVNET_NAMES = {
    "input": "input",
    "conv1": "conv1_preact",
    "relu1": "conv1_postact",
    "pool1": "conv1_postpool",
    "conv2": "conv2_preact",
    "relu2": "conv2_postact",
    "pool2": "conv2_postpool",
    "fc1": "fc1_preact",
    "relu3": "fc1_postact",
    "fc2": "logits",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grid(output_uri: str, run: str, metric: str):  # -> probeserve.plots.Grid
    from probeserve import plots, results

    return plots.grid(results.load(output_uri, run=run), run=run, metric=metric)


def save_png(fig, path: Path, *, dpi: int = 90) -> int:
    """Write the figure as a PNG, palette-quantised so that it stays under MAX_PNG_BYTES."""
    from PIL import Image

    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(colors=64)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(out.getvalue())
    os.replace(tmp, path)
    return len(out.getvalue())


# ---- Figure 3: the untrained MLP, mean over repetitions ----


def fig3_data(output_uri: str) -> dict[str, Any]:
    """Test error per repetition (run) and layer: {'layers', 'runs', 'errors' [runs x layers],
    'mean', 'std', 'min', 'max', 'failed', 'chance'}."""
    from probeserve import plots, results

    table = results.load(output_uri)
    runs = sorted({r for r in table.column("run").to_pylist() if r.startswith("fig3-rep")})
    per_run, failed, chances = {}, 0, []
    for run in runs:
        g = plots.grid(table, run=run, metric="test_error")
        failed += g.num_failed
        if g.chance is not None:
            chances.append(g.chance)
        per_run[run] = {mlp_layer_number(name): float(g.values[0, j]) for j, name in enumerate(g.layers)}
    layers = sorted({k for v in per_run.values() for k in v if k is not None})
    errors = np.array([[per_run[r].get(k, np.nan) for k in layers] for r in runs])
    with np.errstate(all="ignore"):
        return {
            "layers": layers,
            "runs": runs,
            "errors": errors,
            "mean": np.nanmean(errors, axis=0),
            "std": np.nanstd(errors, axis=0),
            "min": np.nanmin(errors, axis=0),
            "max": np.nanmax(errors, axis=0),
            "failed": failed,
            "chance": float(np.mean(chances)) if chances else None,
        }


def fig3_table(d: dict[str, Any]) -> str:
    lines = [
        f"Figure 3: test error by layer over {len(d['runs'])} repetition(s) (failed items: {d['failed']})"
    ]
    lines.append(f"{'layer':>5}  {'mean':>6}  {'std':>6}  {'min':>6}  {'max':>6}")
    for i, k in enumerate(d["layers"]):
        lines.append(
            f"{k:>5}  {d['mean'][i]:6.3f}  {d['std'][i]:6.3f}  {d['min'][i]:6.3f}  {d['max'][i]:6.3f}"
        )
    return "\n".join(lines)


def draw_fig3(d: dict[str, Any], png: Path, *, size: str = "") -> int:
    plt = _pyplot()
    fig = plt.figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.asarray(d["layers"])
    ax.fill_between(x, d["min"], d["max"], color="#1f77b4", alpha=0.12, linewidth=0, label="min-max")
    ax.fill_between(
        x,
        d["mean"] - d["std"],
        d["mean"] + d["std"],
        color="#1f77b4",
        alpha=0.3,
        linewidth=0,
        label="mean ± 1 sd",
    )
    ax.plot(x, d["mean"], marker="o", markersize=3.5, color="#1f77b4", label="mean test error")
    ax.axhline(0.5, color="0.3", linestyle="--", linewidth=1.2, label="coin flip (0.5)")
    ax.set_xlim(-0.5, max(x) + 0.5)
    ax.set_ylim(0, 0.56)
    ax.set_xlabel("layer (0 = input)")
    ax.set_ylabel("probe test error")
    failed = f", {d['failed']} failed" if d["failed"] else ""
    ax.set_title(
        f"Untrained 32-layer MLP, {len(d['runs'])} repetitions{failed}" + (f" ({size} size)" if size else ""),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    return save_png(fig, png)


# ---- Figure 5: the convnet at initialisation and after training ----


def fig5_data(output_uri: str, run: str = "fig5") -> dict[str, Any]:
    """Test error per probe at the first checkpoint (initialisation) and the last (trained):
    {'layers' (our names), 'names' (the paper's), 'steps', 'init', 'trained', 'failed', 'chance'}."""
    g = _grid(output_uri, run, "test_error")
    return {
        "layers": list(g.layers),
        "names": [CONVNET_NAMES.get(n, n) for n in g.layers],
        "steps": list(g.steps),
        "init": g.values[0],
        "trained": g.values[-1],
        "failed": g.num_failed,
        "chance": g.chance,
    }


def fig5_table(d: dict[str, Any]) -> str:
    lines = [
        f"Figure 5: probe test error at initialisation (step {d['steps'][0]}) and after training "
        f"(step {d['steps'][-1]}); failed items: {d['failed']}",
        f"{'probe':<16} {'ours':<8} {'init':>6} {'trained':>8}",
    ]
    for name, ours, a, b in zip(d["names"], d["layers"], d["init"], d["trained"]):
        lines.append(f"{name:<16} {ours:<8} {a:6.3f} {b:8.3f}")
    return "\n".join(lines)


def draw_fig5(d: dict[str, Any], png: Path, *, dataset: str, size: str = "") -> int:
    plt = _pyplot()
    fig = plt.figure(figsize=(8.0, 4.4), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(d["names"]))
    w = 0.4
    for offset, values, label, color in (
        (-w / 2, d["init"], f"at initialisation (step {d['steps'][0]})", "#9ecae1"),
        (w / 2, d["trained"], f"after training (step {d['steps'][-1]})", "#08519c"),
    ):
        bars = ax.bar(x + offset, values, width=w, color=color, label=label)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=6, rotation=90, padding=2)
    ax.set_xticks(x)
    ax.set_xticklabels(d["names"], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("probe test error")
    top = np.nanmax(np.concatenate([d["init"], d["trained"]]))
    ax.set_ylim(0, top * 1.3)
    failed = f", {d['failed']} failed" if d["failed"] else ""
    ax.set_title(
        f"MNIST convnet (Figure 4) on {dataset}{failed}" + (f" ({size} size)" if size else ""), fontsize=10
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="upper right")
    return save_png(fig, png)


# ---- Figures 7 and 8: the 128-layer MLP during training ----


def curves(output_uri: str, run: str, metric: str = "train_error") -> dict[str, Any]:
    """Error by the paper's layer number at every checkpoint of `run`:
    {'run', 'metric', 'steps', 'layers' (0 = input), 'values' [steps x layers], 'failed', 'chance'}."""
    g = _grid(output_uri, run, metric)
    numbers = [mlp_layer_number(name) for name in g.layers]
    keep = [j for j, k in enumerate(numbers) if k is not None]
    return {
        "run": run,
        "metric": metric,
        "steps": list(g.steps),
        "layers": [numbers[j] for j in keep],
        "values": g.values[:, keep],
        "failed": g.num_failed,
        "chance": g.chance,
    }


def curves_table(c: dict[str, Any], *, max_layers: int = 17, always: Sequence[int] = ()) -> str:
    """Steps (rows) by up to `max_layers` layers spread over the model, and the layers in
    `always` (columns)."""
    cols = {round(x) for x in np.linspace(0, len(c["layers"]) - 1, min(max_layers, len(c["layers"])))}
    cols = sorted(cols | {c["layers"].index(k) for k in always if k in c["layers"]})
    head = "step   " + " ".join(f"{c['layers'][j]:>5}" for j in cols)
    lines = [
        f"{c['run']}: {c['metric']} by layer (columns) and step (rows); failed items: {c['failed']}",
        head,
    ]
    for i, s in enumerate(c["steps"]):
        lines.append(f"{s:<6} " + " ".join(f"{c['values'][i, j]:5.3f}" for j in cols))
    return "\n".join(lines)


def _highlight(steps: Sequence[int], wanted: Sequence[int]) -> list[int]:
    """Rows of the checkpoints to draw in colour: each wanted step's nearest checkpoint."""
    rows = []
    for s in wanted:
        i = int(np.argmin([abs(t - s) for t in steps]))
        if i not in rows:
            rows.append(i)
    return sorted(rows)


def _draw_curves(ax, c: dict[str, Any], wanted: Sequence[int], marks: Sequence[int], mark_label: str) -> None:
    plt = _pyplot()
    x = np.asarray(c["layers"])
    rows = _highlight(c["steps"], wanted)
    for i in range(len(c["steps"])):
        if i not in rows:
            ax.plot(x, c["values"][i], color="0.75", linewidth=0.8, zorder=1)
    cmap = plt.get_cmap("viridis")
    for n, i in enumerate(rows):
        color = cmap(n / max(1, len(rows) - 1) * 0.85)
        ax.plot(x, c["values"][i], color=color, linewidth=1.8, zorder=3, label=f"{c['steps'][i]} minibatches")
    for n, m in enumerate(marks):
        ax.axvline(
            m, color="#d62728", alpha=0.35, linewidth=1, zorder=0, label=mark_label if n == 0 else None
        )
    if c["chance"] is not None:
        ax.axhline(c["chance"], color="0.3", linestyle="--", linewidth=1, label=f"chance ({c['chance']:.2f})")
    ax.set_xlim(-1, max(x) + 1)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("layer (0 = input)")
    ax.grid(alpha=0.3)


def draw_mlp_figure(
    panels: Sequence[tuple[str, dict[str, Any], Sequence[int]]],
    png: Path,
    *,
    wanted: Sequence[int],
    mark_label: str,
) -> int:
    """One panel per run (title, curves, layers to mark with a red line): error by layer,
    the checkpoints nearest to `wanted` in colour, the others grey."""
    plt = _pyplot()
    fig = plt.figure(figsize=(5.2 * len(panels) + 1.6, 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, c, marks) in zip(axes, panels):
        _draw_curves(ax, c, wanted, marks, mark_label)
        failed = f", {c['failed']} failed" if c["failed"] else ""
        ax.set_title(title + failed, fontsize=10)
    axes[0].set_ylabel(panels[0][1]["metric"].replace("_", " ") + " of the probe")
    axes[-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_png(fig, png)


def draw_video(c: dict[str, Any], gif: Path, *, title: str, marks: Sequence[int] = (), fps: int = 3) -> int:
    """The error-by-layer curve, one frame per checkpoint, earlier ones fading behind it."""
    from matplotlib import animation

    plt = _pyplot()
    fig = plt.figure(figsize=(7.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.asarray(c["layers"])
    for m in marks:
        ax.axvline(m, color="#d62728", alpha=0.3, linewidth=1)
    if c["chance"] is not None:
        ax.axhline(c["chance"], color="0.3", linestyle="--", linewidth=1)
    trails = [ax.plot([], [], color="0.6", linewidth=0.8)[0] for _ in range(3)]
    (line,) = ax.plot([], [], color="#1f77b4", linewidth=2, marker="o", markersize=2)
    ax.set_xlim(-1, max(x) + 1)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("layer (0 = input)")
    ax.set_ylabel(c["metric"].replace("_", " ") + " of the probe")
    ax.grid(alpha=0.3)
    label = ax.set_title("")
    gif.parent.mkdir(parents=True, exist_ok=True)
    tmp = gif.with_name(f".{gif.name}.tmp.gif")
    writer = animation.PillowWriter(fps=fps)
    try:
        with writer.saving(fig, str(tmp), dpi=80):
            for i, step in enumerate(c["steps"]):
                for back, trail in enumerate(trails, start=1):
                    j = i - back
                    trail.set_data(x, c["values"][j] if j >= 0 else np.full(len(x), np.nan))
                    trail.set_alpha(0.8 / back)
                line.set_data(x, c["values"][i])
                label.set_text(f"{title}: after {step} minibatches")
                writer.grab_frame()
                if i == len(c["steps"]) - 1:  # hold the last frame
                    for _ in range(2 * fps):
                        writer.grab_frame()
    finally:
        plt.close(fig)
    os.replace(tmp, gif)
    return gif.stat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Redraw a paper figure from existing sweep results.")
    ap.add_argument("figure", choices=("fig3", "fig5", "fig7", "fig8"))
    ap.add_argument("results", help="the sweep's output.uri (e.g. paper-output/default/fig7/probes)")
    ap.add_argument("png")
    ap.add_argument("--video", help="fig7, fig8: also the animation (.gif)")
    ap.add_argument("--dataset", default="Fashion-MNIST", help="fig5: the data's name in the title")
    args = ap.parse_args(argv)
    png = Path(args.png)
    if args.figure == "fig3":
        d = fig3_data(args.results)
        draw_fig3(d, png)
        print(fig3_table(d))
    elif args.figure == "fig5":
        d = fig5_data(args.results)
        draw_fig5(d, png, dataset=args.dataset)
        print(fig5_table(d))
    else:
        c = curves(args.results, args.figure)
        marks = (64,) if args.figure == "fig8" else tuple(range(16, 128, 16))
        draw_mlp_figure([(args.figure, c, marks)], png, wanted=(0, 500, 5000), mark_label="")
        print(curves_table(c, always=(63, 64) if args.figure == "fig8" else ()))
        if args.video:
            draw_video(c, Path(args.video), title=args.figure, marks=marks)
    print(f"figure: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
