"""Plots of a results table: error by layer, by step, as a heatmap, and as an animation.

Every plot reads the Arrow table that `probeserve.results.load` returns and works on a
partly finished sweep: a pending item has no row and simply does not appear, a failed item
is drawn as a red x at the top of the axes and counted in the title, never dropped. The
data behind each plot is a `Grid` (`grid()`), so tests and notebooks can check it without
reading pixels.

matplotlib is imported inside the functions (with the Agg backend), so importing this
module costs nothing and needs no display.
"""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from probeserve.errors import ProbeserveError
from probeserve.results import METRICS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KINDS = ("layers", "heatmap", "steps", "animation")
MAX_DEFAULT_STEPS = 6  # the `layers` plot: more lines than this stop being readable
MAX_DEFAULT_LAYERS = 8  # the `steps` plot, when the model has more probe points than this
FAILED_COLOR = "#d62728"


@dataclass
class Grid:
    """One metric of one run as a (checkpoint x layer) matrix, in step and model order.

    `values` is NaN wherever there is no `ok` row: `failed` tells a failed item from a
    pending one (a pending item has no row at all).
    """

    run: str
    metric: str
    steps: list[int]  # one per column of checkpoints, ascending
    checkpoints: list[str]  # the weights key of each of those checkpoints
    layers: list[str]  # in forward order (layer_index)
    values: np.ndarray  # (len(steps), len(layers)) float, NaN where not ok
    failed: np.ndarray  # (len(steps), len(layers)) bool
    errors: dict[tuple[int, str], str] = field(default_factory=dict)  # (row, layer) -> error text
    chance: float | None = None  # mean chance_error of the ok rows

    @property
    def num_failed(self) -> int:
        return int(self.failed.sum())

    @property
    def num_pending(self) -> int:
        """Cells inside the grid with no row yet (checkpoints with no row at all are not counted)."""
        return int((np.isnan(self.values) & ~self.failed).sum())

    def step_labels(self) -> list[str]:
        """`step N`, with the checkpoint key added where two checkpoints share a step."""
        dup = {s for s in self.steps if self.steps.count(s) > 1}
        return [f"step {s}" + (f" ({c})" if s in dup else "") for s, c in zip(self.steps, self.checkpoints)]


def select_run(table: pa.Table, run: str | None) -> tuple[str, pa.Table]:
    """The rows of one run: `run`, or the only run in the table."""
    runs = sorted(set(table.column("run").to_pylist()))
    if not runs:
        raise ProbeserveError(
            "the results table is empty: no item has finished yet (see `probeserve status`)"
        )
    if run is None:
        if len(runs) > 1:
            raise ProbeserveError(
                f"the results hold {len(runs)} runs ({', '.join(runs)}); choose one with --run"
            )
        run = runs[0]
    elif run not in runs:
        raise ProbeserveError(f"no results for run {run!r}; runs with results: {', '.join(runs)}")
    rows = table.filter(pc.equal(table.column("run"), run))
    return run, rows


def grid(
    table: pa.Table,
    *,
    run: str | None = None,
    metric: str = "test_error",
    steps: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
) -> Grid:
    """The data behind every plot; unknown `steps` or `layers` are an error that lists the known ones."""
    if metric not in METRICS:
        raise ProbeserveError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    run, rows_table = select_run(table, run)
    rows = rows_table.to_pylist()
    ckpts = sorted({(r["step"], r["checkpoint"]) for r in rows})
    index_of: dict[str, int] = {}
    for r in rows:
        index_of.setdefault(r["layer"], r["layer_index"])
    all_layers = sorted(index_of, key=lambda name: (index_of[name], name))
    if steps is not None:
        known = sorted({s for s, _ in ckpts})
        unknown = [s for s in steps if s not in known]
        if unknown:
            raise ProbeserveError(
                f"--steps: no results for step(s) {', '.join(map(str, unknown))} in run {run!r}; "
                f"steps with results: {', '.join(map(str, known))}"
            )
        ckpts = [c for c in ckpts if c[0] in set(steps)]
    chosen = all_layers
    if layers is not None:
        unknown_layers = [name for name in layers if name not in index_of]
        if unknown_layers:
            raise ProbeserveError(
                f"--layers: no results for layer(s) {', '.join(unknown_layers)} in run {run!r}; "
                f"layers with results: {', '.join(all_layers)}"
            )
        chosen = [name for name in all_layers if name in set(layers)]
    col = {name: j for j, name in enumerate(chosen)}
    row_of = {c: i for i, c in enumerate(ckpts)}
    values = np.full((len(ckpts), len(chosen)), np.nan)
    failed = np.zeros((len(ckpts), len(chosen)), dtype=bool)
    errors: dict[tuple[int, str], str] = {}
    chances = []
    for r in rows:
        i, j = row_of.get((r["step"], r["checkpoint"])), col.get(r["layer"])
        if i is None or j is None:
            continue
        if r["status"] == "ok":
            v = r[metric]
            values[i, j] = np.nan if v is None else v
            if r["chance_error"] is not None:
                chances.append(r["chance_error"])
        else:
            failed[i, j] = True
            errors[(i, r["layer"])] = r["error"] or "(no error text)"
    return Grid(
        run=run,
        metric=metric,
        steps=[s for s, _ in ckpts],
        checkpoints=[c for _, c in ckpts],
        layers=chosen,
        values=values,
        failed=failed,
        errors=errors,
        chance=float(np.mean(chances)) if chances else None,
    )


def spread(n: int, k: int) -> list[int]:
    """Up to `k` indices out of `n`, evenly spread, always with the first and the last."""
    if n <= k:
        return list(range(n))
    return sorted({round(x) for x in np.linspace(0, n - 1, k)})


def abbreviate(name: str, width: int = 18) -> str:
    """Shorten a long layer name in the middle, keeping its start and its (telling) end."""
    if len(name) <= width:
        return name
    head = width // 3
    return name[:head] + "…" + name[-(width - head - 1) :]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _draw_chance(ax, g: Grid) -> bool:
    if g.chance is None or not g.metric.endswith("_error"):
        return False
    ax.axhline(g.chance, color="0.3", linestyle="--", linewidth=1.2, label=f"chance ({g.chance:.3f})")
    return True


def _draw_failed(ax, xs: Sequence[Any] | np.ndarray, label: str) -> None:
    """Red x marks at the top of the axes (x in data units, y in axes units)."""
    if not len(xs):
        return
    ax.scatter(
        xs,
        [0.97] * len(xs),
        marker="x",
        s=60,
        color=FAILED_COLOR,
        transform=ax.get_xaxis_transform(),
        clip_on=False,
        zorder=5,
        label=label,
    )


def _title(g: Grid, what: str) -> str:
    extra = []
    if g.num_failed:
        extra.append(f"{g.num_failed} failed")
    if g.num_pending:
        extra.append(f"{g.num_pending} pending")
    return f"{g.metric} {what} (run {g.run})" + (f" — {', '.join(extra)}" if extra else "")


def _ylim(g: Grid) -> tuple[float, float]:
    finite = g.values[np.isfinite(g.values)]
    top = float(finite.max()) if finite.size else 1.0
    if g.chance is not None and g.metric.endswith("_error"):
        top = max(top, g.chance)
    return 0.0, top * 1.12 if top > 0 else 1.0


def _layer_axis(ax, layers: Sequence[str]) -> None:
    ax.set_xticks(range(len(layers)))
    every = max(1, len(layers) // 40)  # past ~40 ticks, label every k-th
    labels = [abbreviate(n) if i % every == 0 else "" for i, n in enumerate(layers)]
    rotate = len(layers) > 6 or max((len(n) for n in labels), default=0) > 8
    ax.set_xticklabels(labels, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.set_xlabel("layer (forward order)")


def _figure(num_layers: int, height: float = 4.8) -> Figure:
    plt = _pyplot()
    return plt.figure(figsize=(min(20.0, max(7.0, 0.4 * num_layers + 3)), height), layout="constrained")


def layers_figure(g: Grid, *, rows: Sequence[int] | None = None) -> Figure:
    """Error versus layer, one line per chosen checkpoint (the paper's Figures 3, 5, 7, 8)."""
    rows = spread(len(g.steps), MAX_DEFAULT_STEPS) if rows is None else list(rows)
    fig = _figure(len(g.layers))
    ax = fig.add_subplot()
    cmap = _pyplot().get_cmap("viridis")
    labels = g.step_labels()
    x = np.arange(len(g.layers))
    for n, i in enumerate(rows):
        color = cmap(n / max(1, len(rows) - 1) * 0.9)
        ax.plot(x, g.values[i], marker="o", markersize=4, color=color, label=labels[i], gid=f"step-{i}")
    _draw_chance(ax, g)
    failed_x = [j for i in rows for j in np.flatnonzero(g.failed[i])]
    _draw_failed(ax, failed_x, f"failed ({len(failed_x)})")
    _layer_axis(ax, g.layers)
    ax.set_ylim(*_ylim(g))
    ax.set_ylabel(g.metric.replace("_", " "))
    ax.set_title(_title(g, "by layer"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def heatmap_figure(g: Grid) -> Figure:
    """Layers (rows, forward order) by checkpoint step (columns); colour is the error."""
    plt = _pyplot()
    fig = plt.figure(
        figsize=(min(20.0, max(6.0, 0.6 * len(g.steps) + 3)), min(20.0, max(4.0, 0.35 * len(g.layers) + 2))),
        layout="constrained",
    )
    ax = fig.add_subplot()
    # pending and failed cells are light grey; failed ones also get a red x
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    data = np.ma.masked_invalid(g.values.T)
    lo, hi = _ylim(g)
    image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=lo, vmax=hi / 1.12, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=g.metric.replace("_", " "))
    if g.values.size <= 200:  # small enough to print every value
        for (i, j), v in np.ndenumerate(g.values):
            if np.isfinite(v):
                shade = (v - lo) / ((hi / 1.12 - lo) or 1.0)
                ax.text(
                    i, j, f"{v:.3f}", ha="center", va="center", fontsize=7, color="k" if shade > 0.5 else "w"
                )
    fi, fj = np.nonzero(g.failed)
    if len(fi):
        ax.scatter(fi, fj, marker="x", s=80, color=FAILED_COLOR, label=f"failed ({len(fi)})")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0, -0.12))
    ax.set_xticks(range(len(g.steps)))
    ax.set_xticklabels([str(s) for s in g.steps], rotation=45 if len(g.steps) > 8 else 0)
    ax.set_xlabel("checkpoint step")
    ax.set_yticks(range(len(g.layers)))
    ax.set_yticklabels([abbreviate(n, 24) for n in g.layers])
    ax.set_ylabel("layer (forward order)")
    ax.set_title(_title(g, "by step and layer"))
    return fig


def steps_figure(g: Grid, *, cols: Sequence[int] | None = None) -> Figure:
    """Error versus checkpoint step, one line per chosen layer (default: all, or 8 spread over
    the model), coloured shallow to deep."""
    cols = spread(len(g.layers), MAX_DEFAULT_LAYERS) if cols is None else list(cols)
    plt = _pyplot()
    fig = plt.figure(figsize=(8.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    cmap = plt.get_cmap("plasma")
    steps = np.asarray(g.steps, dtype=float)
    for n, j in enumerate(cols):
        color = cmap(n / max(1, len(cols) - 1) * 0.85)
        ax.plot(
            steps, g.values[:, j], marker="o", markersize=4, color=color, label=abbreviate(g.layers[j], 24)
        )
    _draw_chance(ax, g)
    fi, _ = np.nonzero(g.failed[:, cols])
    _draw_failed(ax, steps[fi], f"failed ({len(fi)})")
    if len(steps):  # the failed marks do not widen the x axis by themselves
        pad = max(1.0, 0.05 * float(steps.max() - steps.min()))
        ax.set_xlim(float(steps.min()) - pad, float(steps.max()) + pad)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(*_ylim(g))
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel(g.metric.replace("_", " "))
    ax.set_title(_title(g, "by step"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


# ---- writing files ----


def _is_remote(out: str) -> bool:
    scheme = urlsplit(out).scheme
    return len(scheme) > 1 and scheme != "file"


def publish(out: str, data: bytes, *, s3_endpoint: str | None = None) -> str:
    """Write `data` to a path or URI atomically (a reader never sees half a file); return `out`."""
    from probeserve.storage import open_storage

    if _is_remote(out):
        parent, name = posixpath.split(out.rstrip("/"))
        open_storage(parent, s3_endpoint=s3_endpoint).publish_bytes(name, data)
        return out
    path = urlsplit(out).path if out.startswith("file://") else out
    folder, name = os.path.split(os.path.abspath(path))
    open_storage(folder).publish_bytes(name, data)
    return out


def figure_png(fig: Figure, *, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        _pyplot().close(fig)
    return buf.getvalue()


def _save(fig: Figure, out: str, s3_endpoint: str | None) -> str:
    ext = os.path.splitext(out)[1].lower()
    fmt = {".png": "png", ".svg": "svg", ".pdf": "pdf"}.get(ext)
    if fmt is None:
        _pyplot().close(fig)
        raise ProbeserveError(f"--out {out}: write a .png, .svg or .pdf file")
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=fmt, dpi=110)
    finally:
        _pyplot().close(fig)
    return publish(out, buf.getvalue(), s3_endpoint=s3_endpoint)


# ---- the public API: a table in, a file out ----


def plot_layers(
    table: pa.Table,
    out: str,
    *,
    run: str | None = None,
    metric: str = "test_error",
    steps: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    s3_endpoint: str | None = None,
) -> str:
    """Error versus layer, one line per step (default: up to 6 spread over the run)."""
    g = grid(table, run=run, metric=metric, steps=steps, layers=layers)
    rows = range(len(g.steps)) if steps is not None else None
    return _save(layers_figure(g, rows=rows), out, s3_endpoint)


def plot_heatmap(
    table: pa.Table,
    out: str,
    *,
    run: str | None = None,
    metric: str = "test_error",
    steps: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    s3_endpoint: str | None = None,
) -> str:
    """Step by layer, colour = error: the ripple at a glance."""
    g = grid(table, run=run, metric=metric, steps=steps, layers=layers)
    return _save(heatmap_figure(g), out, s3_endpoint)


def plot_steps(
    table: pa.Table,
    out: str,
    *,
    run: str | None = None,
    metric: str = "test_error",
    steps: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    s3_endpoint: str | None = None,
) -> str:
    """Error versus step, one line per layer (default: all, or 8 spread over the model)."""
    g = grid(table, run=run, metric=metric, steps=steps, layers=layers)
    cols = range(len(g.layers)) if layers is not None else None
    return _save(steps_figure(g, cols=cols), out, s3_endpoint)


def animate(
    table: pa.Table,
    out: str,
    *,
    run: str | None = None,
    metric: str = "test_error",
    steps: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    fps: int = 2,
    s3_endpoint: str | None = None,
) -> str:
    """The `layers` plot, one frame per checkpoint, on a fixed y axis: a .gif, or .mp4 with ffmpeg."""
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".gif", ".mp4"):
        raise ProbeserveError(f"--out {out}: an animation is written as .gif or .mp4")
    g = grid(table, run=run, metric=metric, steps=steps, layers=layers)
    plt = _pyplot()
    from matplotlib import animation

    if ext == ".mp4":
        if not animation.writers.is_available("ffmpeg"):
            raise ProbeserveError(
                f"--out {out}: writing MP4 needs ffmpeg on PATH (Debian: apt-get install ffmpeg); "
                "or write a .gif instead"
            )
        writer: Any = animation.FFMpegWriter(fps=fps)
    else:
        writer = animation.PillowWriter(fps=fps)
    fig, draw = frames_figure(g)

    with tempfile.TemporaryDirectory(prefix=".probeserve-anim-") as tmp:
        local = os.path.join(tmp, "anim" + ext)
        try:
            with writer.saving(fig, local, dpi=100):
                for i in range(len(g.steps)):
                    draw(i)
                    writer.grab_frame()
        finally:
            plt.close(fig)
        with open(local, "rb") as f:
            return publish(out, f.read(), s3_endpoint=s3_endpoint)


def frames_figure(g: Grid) -> tuple[Figure, Callable[[int], None]]:
    """The animation's figure, on a fixed y axis, and a function that draws frame `i` into it."""
    fig = _figure(len(g.layers))
    ax = fig.add_subplot()
    (trail,) = ax.plot([], [], color="0.7", linewidth=1, label="previous step")
    (line,) = ax.plot([], [], marker="o", markersize=5, color="#1f77b4", linewidth=2, label="this step")
    _draw_chance(ax, g)
    failed = ax.scatter(
        [],
        [],
        marker="x",
        s=60,
        color=FAILED_COLOR,
        transform=ax.get_xaxis_transform(),
        clip_on=False,
        zorder=5,
        label="failed",
    )
    _layer_axis(ax, g.layers)
    ax.set_ylim(*_ylim(g))
    ax.set_ylabel(g.metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    title = ax.set_title("")
    labels = g.step_labels()
    x = np.arange(len(g.layers))

    def draw(i: int) -> None:
        line.set_data(x, g.values[i])
        trail.set_data(x, g.values[i - 1] if i > 0 else np.full(len(x), np.nan))
        fx = np.flatnonzero(g.failed[i])
        failed.set_offsets(np.column_stack([fx, np.full(len(fx), 0.97)]) if len(fx) else np.empty((0, 2)))
        extra = f" — {len(fx)} failed" if len(fx) else ""
        title.set_text(f"{g.metric} by layer (run {g.run}), {labels[i]}{extra}")

    return fig, draw


def plot(kind: str, table: pa.Table, out: str, **kwargs: Any) -> str:
    """Dispatch on `kind` (one of KINDS)."""
    funcs = {"layers": plot_layers, "heatmap": plot_heatmap, "steps": plot_steps, "animation": animate}
    if kind not in funcs:
        raise ProbeserveError(f"unknown plot kind {kind!r}; choose one of {', '.join(KINDS)}")
    return funcs[kind](table, out, **kwargs)
