"""Plots of a results table: error by layer, by step, as a heatmap, and as an animation.

Every plot reads the Arrow table that `probeserve.results.load` returns and works on a
partly finished sweep: a pending item has no row and simply does not appear, a failed item
is drawn as a red x at the top of the axes and counted in the title, never dropped. The
data behind each plot is a `Grid` (`grid()`), so tests and notebooks can check it without
reading pixels.

The plots are meant to stay readable on real sweeps (hundreds of checkpoints, a hundred
layers and more): axes fit the data rather than 0-1, so a chance level far above the errors
is a legend entry instead of a line that squeezes every curve into a sliver; the heatmap's
colours span the bulk of the values (`color_limits`); tick labels are thinned to what fits
(`thin`) instead of shrunk or overlapped.

Names (layers, checkpoints, runs) are text, never markup: a `$` in a layer name would start
matplotlib's mathtext (and an unpaired one raises), so every name goes through `plain`, and
figures are built and saved with TeX off.

matplotlib is imported inside the functions (with the Agg backend), so importing this
module costs nothing and needs no display.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from probeserve import results
from probeserve.errors import ProbeserveError
from probeserve.results import METRICS
from probeserve.storage import publish_file

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from typing_extensions import Unpack  # typing's own from Python 3.11

KINDS = ("layers", "heatmap", "steps", "animation", "classes")
# Besides the errors and losses (`results.METRICS`), the line plots and the heatmap draw the
# control task's and MDL's columns: selectivity and code length by layer are Hewitt & Liang's
# and Voita & Titov's own figures. Each is in a row only when the spec section named here is on.
SCIENCE_METRICS = {
    "control_error": "probe.control",
    "control_train_error": "probe.control",
    "selectivity": "probe.control",
    "mdl_bits": "probe.mdl",
    "mdl_compression": "probe.mdl",
}
PLOT_METRICS = [*METRICS, *SCIENCE_METRICS]
# The task's errors: the chance level (always the majority class) is a baseline for these.
TASK_ERRORS = ("train_error", "val_error", "test_error")
# Error metrics with a 95% interval: the row's own columns, or Wilson's from the split's count.
INTERVALS = {
    "train_error": "n_train",
    "val_error": "n_val",
    "test_error": "n_test",
    "control_error": "n_test",
}
INTERVAL_ALPHA = 0.15  # the shaded interval behind each line of the layers plot
MAX_DEFAULT_STEPS = 6  # the `layers` plot: more lines than this stop being readable
MAX_LEGEND_LAYERS = 12  # the `steps` plot names its lines in a legend up to this; a colour bar past it
MAX_MARKER_POINTS = 40  # past this many points a line is drawn without markers
FAILED_COLOR = "#d62728"
ABSENT_COLOR = "#eeeeee"  # classes plot: a class without test examples (and failed layers)
CHANCE_COLOR = "0.3"
TICK_FONT = 8  # points: tick labels keep this size; past what fits, labels are thinned
OUTLIER_GAP = 0.5  # heatmap colours: see `color_limits`
ANIMATION_SECONDS = 20.0  # a long sweep's animation is sped up to last about this long


class ChoiceError(ProbeserveError):
    """A run, step or layer that the results do not hold, or a run left to choose.

    The message names the argument as Python spells it (`run="demo"`), since this module is a
    Python API; `cli` holds the same message with the command line's flag (`--run demo`), for
    `probeserve plot` and `probeserve report` to print instead.
    """

    def __init__(self, python: str, cli: str) -> None:
        super().__init__(python)
        self.cli = cli


def plain(text: str) -> str:
    """`text` as matplotlib shows it literally. Outside mathtext (and with TeX off) the only
    markup is `$`, which starts mathtext when paired and raises when not; `\\$` is its
    documented escape, and matplotlib turns it back into `$` when it draws the text."""
    return str(text).replace("$", r"\$")


@contextlib.contextmanager
def _plain_text() -> Iterator[None]:
    """Build and save figures with TeX off and mathtext in its default state, whatever the
    user's matplotlibrc says: `plain` relies on both."""
    import matplotlib

    with matplotlib.rc_context({"text.usetex": False, "text.parse_math": True}):
        yield


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
    # The chance error of the run: the median `chance_error` of all its ok rows, whatever steps
    # and layers are chosen, so every plot of a run shows the same number. (Every row of a run
    # scores the same test split, so the rows agree; a mean of identical values can still land
    # on either side of a rounding boundary, 0.9025 printing as 0.902 in one plot and 0.903 in
    # another.)
    chance: float | None = None
    # The 95% Wilson interval of each value, for the error metrics that have a count of examples
    # (`INTERVALS`); NaN where a row has neither the interval nor its count; None for other metrics.
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    @property
    def num_failed(self) -> int:
        return int(self.failed.sum())

    @property
    def num_pending(self) -> int:
        """Cells inside the grid with no row yet (checkpoints with no row at all are not counted)."""
        return int((np.isnan(self.values) & ~self.failed).sum())

    @property
    def shows_chance(self) -> bool:
        """The chance level applies to the task's error metrics only."""
        return self.chance is not None and self.metric in TASK_ERRORS

    def step_labels(self) -> list[str]:
        """`step N`, with the checkpoint key added where two checkpoints share a step."""
        dup = {s for s in self.steps if self.steps.count(s) > 1}
        return [
            f"step {s}" + (f" ({abbreviate(c, 32)})" if s in dup else "")
            for s, c in zip(self.steps, self.checkpoints)
        ]


def format_chance(chance: float) -> str:
    """The one way every plot and page prints the chance level (4 decimals, as the tables)."""
    return f"{chance:.4f}"


def _runs_text(runs: Sequence[str]) -> str:
    return ", ".join(runs)


def select_run(table: pa.Table, run: str | None) -> tuple[str, pa.Table]:
    """The rows of one run: `run`, or the only run in the table."""
    runs = sorted(set(table.column("run").to_pylist()))
    if not runs:
        raise ProbeserveError(
            "the results table is empty: no item has finished yet (see `probeserve status`)"
        )
    if run is None:
        if len(runs) > 1:
            held = f"the results hold {len(runs)} runs ({_runs_text(runs)})"
            raise ChoiceError(
                f"{held}; choose one with run={runs[0]!r} (or load one: results.load(..., run={runs[0]!r}))",
                f"{held}; choose one with --run {runs[0]}",
            )
        run = runs[0]
    elif run not in runs:
        known = f"no results for run {run!r}; runs with results: {_runs_text(runs)}"
        raise ChoiceError(f"run={run!r}: {known}", f"--run {run}: {known}")
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
    if metric not in PLOT_METRICS:
        raise ChoiceError(
            f"metric={metric!r}: unknown metric; choose one of {', '.join(PLOT_METRICS)}",
            f"--metric {metric}: unknown metric; choose one of {', '.join(PLOT_METRICS)}",
        )
    run, rows_table = select_run(table, run)
    rows = rows_table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    if metric in SCIENCE_METRICS and ok and all(r[metric] is None for r in ok):
        # or every ok item would be drawn as missing, and counted as pending
        why = f"no row of run {run!r} has {metric}: a run records it when its spec sets {SCIENCE_METRICS[metric]}"
        raise ChoiceError(f"metric={metric!r}: {why}", f"--metric {metric}: {why}")
    ckpts = sorted({(r["step"], r["checkpoint"]) for r in rows})
    index_of: dict[str, int] = {}
    for r in rows:
        index_of.setdefault(r["layer"], r["layer_index"])
    all_layers = sorted(index_of, key=lambda name: (index_of[name], name))
    if steps is not None:
        known = sorted({s for s, _ in ckpts})
        unknown = [s for s in steps if s not in known]
        if unknown:
            why = (
                f"no results for step(s) {', '.join(map(str, unknown))} in run {run!r}; "
                f"steps with results: {', '.join(map(str, known))}"
            )
            raise ChoiceError(f"steps={list(steps)!r}: {why}", f"--steps: {why}")
        ckpts = [c for c in ckpts if c[0] in set(steps)]
    chosen = all_layers
    if layers is not None:
        unknown_layers = [name for name in layers if name not in index_of]
        if unknown_layers:
            why = (
                f"no results for layer(s) {', '.join(unknown_layers)} in run {run!r}; "
                f"layers with results: {', '.join(all_layers)}"
            )
            raise ChoiceError(f"layers={list(layers)!r}: {why}", f"--layers: {why}")
        chosen = [name for name in all_layers if name in set(layers)]
    col = {name: j for j, name in enumerate(chosen)}
    row_of = {c: i for i, c in enumerate(ckpts)}
    values = np.full((len(ckpts), len(chosen)), np.nan)
    failed = np.zeros((len(ckpts), len(chosen)), dtype=bool)
    with_interval = metric in INTERVALS
    low = np.full(values.shape, np.nan) if with_interval else None
    high = np.full(values.shape, np.nan) if with_interval else None
    errors: dict[tuple[int, str], str] = {}
    chances = [r["chance_error"] for r in rows if r["status"] == "ok" and r["chance_error"] is not None]
    for r in rows:
        i, j = row_of.get((r["step"], r["checkpoint"])), col.get(r["layer"])
        if i is None or j is None:
            continue
        if r["status"] == "ok":
            v = r[metric]
            values[i, j] = np.nan if v is None else v
            if low is not None and high is not None and v is not None:
                low[i, j], high[i, j] = _interval(r, metric)
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
        chance=float(np.median(chances)) if chances else None,
        low=low,
        high=high,
    )


def _interval(row: dict[str, Any], metric: str) -> tuple[float, float]:
    """A row's 95% interval of `metric`: its columns, or (rows written before they existed)
    Wilson's from the error and its split's count; NaN when neither is there."""
    lo, hi = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    if lo is not None and hi is not None:
        return float(lo), float(hi)
    n = row.get(INTERVALS[metric])
    if not n:
        return math.nan, math.nan
    return results.wilson_interval(float(row[metric]), n)


def spread(n: int, k: int) -> list[int]:
    """Up to `k` indices out of `n`, evenly spread, always with the first and the last."""
    if n <= k:
        return list(range(n))
    return sorted({round(x) for x in np.linspace(0, n - 1, k)})


def thin(n: int, max_labels: int) -> list[int]:
    """Which of `n` ticks get a label: every k-th from the first, at most `max_labels` of them."""
    if n <= 0:
        return []
    every = max(1, math.ceil(n / max(1, max_labels)))
    return list(range(0, n, every))


def abbreviate(name: str, width: int = 18) -> str:
    """Shorten a long layer name to `width` characters, keeping what tells layers apart.

    A dotted module path first loses letters, not parts, from the left:
    `encoder.layers.11.attention.output.dense` becomes `e.l.11.a.out.dense` (numbers and the
    last part stay whole), so that the names of a deep model's blocks stay distinct; what is
    still too long is cut in the middle, keeping its start and its (telling) end.
    """
    if len(name) <= width:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1):
        excess = len(".".join(parts)) - width
        if excess <= 0:
            break
        if not parts[i].isdigit():  # cut this part by the excess, down to its first letter
            parts[i] = parts[i][: max(1, len(parts[i]) - excess)]
    short = ".".join(parts)
    if len(short) <= width:
        return short
    head = width // 3
    return short[:head] + "…" + short[-(width - head - 1) :]


def front_loaded(steps: Sequence[int]) -> bool:
    """Whether checkpoints crowd the start of training (half of them in its first tenth, as
    when they are saved at geometric intervals): the steps plot then uses a log-like x axis,
    which shows the early checkpoints apart instead of piled up at 0."""
    if len(steps) < 4:
        return False
    arr = np.asarray(steps, dtype=float)
    span = float(arr.max() - arr.min())
    return span > 0 and float(np.median(arr) - arr.min()) < 0.1 * span


def _cell_text(v: float) -> str:
    """A heatmap cell's value in at most 6 characters: 3 decimals for errors and losses, whole
    numbers from 10 on (mdl_bits runs to thousands: `2356.229` would not fit the cell)."""
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}"


def value_limits(g: Grid) -> tuple[float, float]:
    """The y range of the line plots: the finite values with a margin, never 0-1 just because
    the chance level is far above them (see `_draw_chance`)."""
    finite = g.values[np.isfinite(g.values)]
    if not finite.size:
        return (0.0, 1.0) if g.chance is None else (max(0.0, g.chance - 0.1), g.chance + 0.1)
    lo, hi = float(finite.min()), float(finite.max())
    pad = 0.08 * (hi - lo) if hi > lo else max(0.01, 0.05 * abs(hi))
    lo, hi = lo - pad, hi + pad
    if lo < 0 <= finite.min():  # errors and losses are never negative: do not show below 0
        lo = 0.0
    return lo, hi


def color_limits(values: np.ndarray) -> tuple[float, float]:
    """Robust colour limits for the heatmap: the colours span the bulk of the values.

    The limits are the data's range, except for a few cells (at most a tenth on each side) set
    apart from all the others by a gap wider than `OUTLIER_GAP` times the others' range: the
    raw input, or one broken layer, far from every other layer. Those saturate (the colour
    bar's arrow says so, and their printed values stay exact) instead of squeezing every other
    cell into one colour. A continuous tail has no such gap and keeps its colours.
    """
    v = np.sort(values[np.isfinite(values)])
    if not v.size:
        return 0.0, 1.0
    if v[-1] - v[0] < 1e-12:
        pad = max(0.01, 0.05 * abs(float(v[-1])))
        return float(v[0]) - pad, float(v[-1]) + pad
    n, most = len(v), len(v) // 10
    lo, hi = 0, n - 1
    # the widest qualifying gap among the top k cells, k up to `most`; then the same at the bottom
    gaps = [(v[n - k] - v[n - k - 1], k) for k in range(1, most + 1)]
    top = [(gap, k) for gap, k in gaps if gap > OUTLIER_GAP * (v[n - k - 1] - v[0])]
    if top:
        hi = n - 1 - max(top)[1]
    gaps = [(v[k] - v[k - 1], k) for k in range(1, most + 1)]
    bottom = [(gap, k) for gap, k in gaps if gap > OUTLIER_GAP * (v[hi] - v[k])]
    if bottom:
        lo = max(bottom)[1]
    return float(v[lo]), float(v[hi])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


Entries = list[tuple[Any, str]]  # a figure's legend: (artist, text), in drawing order


def _entry(entries: Entries, artist: Any, text: str) -> Any:
    """Add `artist` to the legend as `text`; its label (`get_label`) is the name itself."""
    artist.set_label(text)
    entries.append((artist, text))
    return artist


def _legend(ax: Axes, entries: Entries, **kwargs: Any) -> None:
    """The legend, given explicitly: matplotlib's automatic legend leaves out any artist whose
    label starts with `_`, which a layer name may; the texts are escaped with `plain`."""
    if entries:
        ax.legend([a for a, _ in entries], [plain(t) for _, t in entries], **kwargs)


def _draw_chance(ax: Axes, g: Grid, lo: float, hi: float, entries: Entries) -> str | None:
    """The chance level: a dashed line when it lies inside the y range, else only a legend
    entry saying that it lies above (or below) the axes; a note on the axes themselves would
    sit among the curves, the failed marks or the title. Returns where it went
    ("line", "above", "below") or None when there is no chance level to draw."""
    if not g.shows_chance:
        return None
    assert g.chance is not None
    text = f"chance ({format_chance(g.chance)})"
    if lo <= g.chance <= hi:
        line = ax.axhline(g.chance, color=CHANCE_COLOR, linestyle="--", linewidth=1.2, gid="chance")
        _entry(entries, line, text)
        return "line"
    where = "above" if g.chance > hi else "below"
    proxy = ax.plot([], [], color=CHANCE_COLOR, linestyle="--", linewidth=1.2, gid="chance")[0]
    _entry(entries, proxy, f"{text}, {where} the axes")
    return where


def _draw_failed(ax: Axes, xs: Sequence[Any] | np.ndarray, label: str, entries: Entries) -> None:
    """Red x marks at the top of the axes (x in data units, y in axes units)."""
    if not len(xs):
        return
    marks = ax.scatter(
        xs,
        [0.97] * len(xs),
        marker="x",
        s=60,
        color=FAILED_COLOR,
        transform=ax.get_xaxis_transform(),
        clip_on=False,
        zorder=5,
    )
    _entry(entries, marks, label)


def _title(g: Grid, what: str) -> str:
    extra = []
    if g.num_failed:
        extra.append(f"{g.num_failed} failed")
    if g.num_pending:
        extra.append(f"{g.num_pending} pending")
    return plain(
        f"{g.metric} {what} (run {abbreviate(g.run, 40)})" + (f" — {', '.join(extra)}" if extra else "")
    )


def _layer_axis(ax: Axes, layers: Sequence[str], width_in: float) -> None:
    """Layers on x in forward order, labelled as many as fit in `width_in` inches."""
    ax.set_xticks(range(len(layers)))
    labelled = set(thin(len(layers), int(width_in / 0.18)))
    labels = [plain(abbreviate(n)) if i in labelled else "" for i, n in enumerate(layers)]
    rotate = len(layers) > 6 or max((len(n) for n in labels), default=0) > 8
    ax.set_xticklabels(
        labels, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=TICK_FONT
    )
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.set_xlabel("layer (forward order)")


def _figure(width: float, height: float) -> Figure:
    return _pyplot().figure(figsize=(width, height), layout="constrained")


def _layers_width(num_layers: int) -> float:
    return min(20.0, max(7.0, 0.3 * num_layers + 3))


def _draw_interval(ax: Axes, x: np.ndarray, low: np.ndarray, high: np.ndarray, color: Any, gid: str) -> int:
    """A shaded band from `low` to `high` behind a line, one polygon per stretch of layers
    that have an interval (a failed or pending layer leaves a gap, as in the line). Polygons
    (patches), not `fill_between` (a collection beside the failed marks). Returns how many."""
    ok = np.isfinite(low) & np.isfinite(high)
    drawn = 0
    start = None
    for j in range(len(x) + 1):
        if j < len(x) and ok[j]:
            start = j if start is None else start
            continue
        if start is not None:
            xs = np.concatenate([x[start:j], x[start:j][::-1]])
            ys = np.concatenate([high[start:j], low[start:j][::-1]])
            if j - start == 1:  # one layer alone: a narrow bar rather than a zero-width polygon
                xs = np.array([x[start] - 0.08, x[start] + 0.08, x[start] + 0.08, x[start] - 0.08])
                ys = np.array([high[start], high[start], low[start], low[start]])
            ax.fill(xs, ys, color=color, alpha=INTERVAL_ALPHA, linewidth=0, gid=gid)
            drawn += 1
            start = None
    return drawn


def interval_limits(g: Grid, rows: Sequence[int], lo: float, hi: float) -> tuple[float, float]:
    """The layers plot's y range widened to hold the drawn rows' intervals (within [0, 1]),
    so that a band is never cut off by the axes."""
    if g.low is None or g.high is None or not rows:
        return lo, hi
    low, high = g.low[list(rows)], g.high[list(rows)]
    if np.isfinite(low).any():
        lo = min(lo, max(0.0, float(np.nanmin(low)) - 0.02 * (hi - lo)))
    if np.isfinite(high).any():
        hi = max(hi, min(1.0, float(np.nanmax(high)) + 0.02 * (hi - lo)))
    return lo, hi


def layers_figure(g: Grid, *, rows: Sequence[int] | None = None) -> Figure:
    """Error versus layer, one line per chosen checkpoint (the paper's Figures 3, 5, 7, 8),
    each with its 95% interval shaded behind it where the rows have one (`Grid.low`/`high`):
    two layers whose bands do not overlap differ beyond the test split's sampling noise."""
    with _plain_text():
        rows = spread(len(g.steps), MAX_DEFAULT_STEPS) if rows is None else list(rows)
        width = _layers_width(len(g.layers))
        fig = _figure(width, 4.8)
        ax = fig.add_subplot()
        cmap = _pyplot().get_cmap("viridis")
        labels = g.step_labels()
        x = np.arange(len(g.layers))
        entries: Entries = []
        marker = "o" if len(g.layers) <= MAX_MARKER_POINTS else None
        bands = 0
        for n, i in enumerate(rows):
            color = cmap(n / max(1, len(rows) - 1) * 0.9)
            (line,) = ax.plot(x, g.values[i], marker=marker, markersize=4, color=color, gid=f"step-{i}")
            _entry(entries, line, labels[i])
            if g.low is not None and g.high is not None:
                bands += _draw_interval(ax, x, g.low[i], g.high[i], color, f"interval-{i}")
        if bands:
            proxy = ax.fill([], [], color="0.5", alpha=2 * INTERVAL_ALPHA, linewidth=0, gid="interval")[0]
            _entry(entries, proxy, "95% interval (Wilson)")
        lo, hi = interval_limits(g, rows, *value_limits(g))
        _draw_chance(ax, g, lo, hi, entries)
        failed_x = [j for i in rows for j in np.flatnonzero(g.failed[i])]
        _draw_failed(ax, failed_x, f"failed ({len(failed_x)})", entries)
        _layer_axis(ax, g.layers, width - 2.5)
        ax.set_ylim(lo, hi)
        ax.set_ylabel(g.metric.replace("_", " "))
        ax.set_title(_title(g, "by layer"))
        ax.grid(alpha=0.3)
        _legend(ax, entries, fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _heatmap_size(num_steps: int, num_layers: int) -> tuple[float, float]:
    return (
        min(20.0, max(6.0, 0.6 * num_steps + 3)),
        min(20.0, max(4.0, 0.3 * num_layers + 2)),
    )


def heatmap_layout(g: Grid) -> dict[str, Any]:
    """What the heatmap shows, decided from the grid's size alone: the figure size, which
    step and layer ticks are labelled, whether cell values are printed, the colour limits."""
    width, height = _heatmap_size(len(g.steps), len(g.layers))
    # the axes get about the figure less the colour bar and the layer labels (width), the title
    # and the step labels (height)
    axes_w, axes_h = max(1.0, width - 3.2), max(1.0, height - 1.8)
    cell_w, cell_h = axes_w / max(1, len(g.steps)), axes_h / max(1, len(g.layers))
    return {
        "size": (width, height),
        "step_ticks": thin(len(g.steps), int(axes_w / 0.3)),  # rotated labels, about 0.3 in apart
        "layer_ticks": thin(len(g.layers), int(axes_h / 0.16)),  # 8 pt labels need about 0.16 in
        "values": cell_w >= 0.42 and cell_h >= 0.17,  # "0.123" at 7 pt fits in the cell
        "limits": color_limits(g.values),
    }


def heatmap_figure(g: Grid) -> Figure:
    """Layers (rows, forward order) by checkpoint step (columns); colour is the error."""
    with _plain_text():
        plt = _pyplot()
        layout = heatmap_layout(g)
        fig = _figure(*layout["size"])
        ax = fig.add_subplot()
        # pending and failed cells are light grey; failed ones also get a red x
        cmap = plt.get_cmap("viridis").with_extremes(bad=ABSENT_COLOR)
        data = np.ma.masked_invalid(g.values.T)
        lo, hi = layout["limits"]
        image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        finite = g.values[np.isfinite(g.values)]
        extend = {
            (False, False): "neither",
            (True, False): "min",
            (False, True): "max",
            (True, True): "both",
        }[(bool(finite.size and finite.min() < lo), bool(finite.size and finite.max() > hi))]
        label = g.metric.replace("_", " ")
        if g.shows_chance:
            assert g.chance is not None
            label += f" (chance {format_chance(g.chance)})"
        fig.colorbar(image, ax=ax, label=label, extend=extend, fraction=min(0.15, 1.0 / layout["size"][0]))
        if layout["values"]:
            for (i, j), v in np.ndenumerate(g.values):
                if np.isfinite(v):
                    shade = (min(max(v, lo), hi) - lo) / ((hi - lo) or 1.0)
                    ax.text(
                        i,
                        j,
                        _cell_text(v),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="k" if shade > 0.5 else "w",
                    )
        fi, fj = np.nonzero(g.failed)
        if len(fi):
            marks = ax.scatter(fi, fj, marker="x", s=80, color=FAILED_COLOR)
            marks.set_label(f"failed ({len(fi)})")
            # below the figure, whatever its height (constrained layout makes room for it)
            fig.legend([marks], [f"failed ({len(fi)})"], fontsize="small", loc="outside lower left")
        ax.set_xticks(layout["step_ticks"])
        ax.set_xticklabels(
            [str(g.steps[i]) for i in layout["step_ticks"]],
            rotation=45 if len(g.steps) > 8 else 0,
            ha="right" if len(g.steps) > 8 else "center",
            fontsize=TICK_FONT,
        )
        ax.set_xlabel("checkpoint step")
        ax.set_yticks(layout["layer_ticks"])
        ax.set_yticklabels(
            [plain(abbreviate(g.layers[j], 24)) for j in layout["layer_ticks"]], fontsize=TICK_FONT
        )
        ax.set_ylabel("layer (forward order)")
        ax.set_title(_title(g, "by step and layer"))
    return fig


def steps_figure(g: Grid, *, cols: Sequence[int] | None = None) -> Figure:
    """Error versus checkpoint step, one line per chosen layer (default: all), coloured
    shallow to deep; named in a legend up to `MAX_LEGEND_LAYERS` lines, by a colour bar of
    layer names past that."""
    with _plain_text():
        cols = list(range(len(g.layers))) if cols is None else list(cols)
        plt = _pyplot()
        fig = _figure(min(14.0, max(8.0, 6.0 + len(g.steps) / 40)), 4.8)
        ax = fig.add_subplot()
        cmap = plt.get_cmap("plasma")
        steps = np.asarray(g.steps, dtype=float)
        many = len(cols) > MAX_LEGEND_LAYERS
        entries: Entries = []
        marker = "o" if len(steps) <= MAX_MARKER_POINTS and not many else None
        for n, j in enumerate(cols):
            color = cmap(n / max(1, len(cols) - 1) * 0.85)
            (line,) = ax.plot(
                steps,
                g.values[:, j],
                marker=marker,
                markersize=4,
                linewidth=0.9 if many else 1.5,
                color=color,
                gid=f"layer-{j}",
            )
            if not many:
                _entry(entries, line, abbreviate(g.layers[j], 24))
        lo, hi = value_limits(g)
        _draw_chance(ax, g, lo, hi, entries)
        fi, _ = np.nonzero(g.failed[:, cols])
        _draw_failed(ax, steps[fi], f"failed ({len(fi)})", entries)
        from matplotlib.ticker import MaxNLocator

        if front_loaded(g.steps):  # linear up to the first positive step, logarithmic past it
            ax.set_xscale("symlog", linthresh=max(1.0, float(np.min(steps[steps > 0], initial=1.0))))
            ax.set_xlim(float(steps.min()), float(steps.max()) * 1.1)
        elif len(steps):  # the failed marks do not widen the x axis by themselves
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            pad = max(1.0, 0.02 * float(steps.max() - steps.min()))
            ax.set_xlim(float(steps.min()) - pad, float(steps.max()) + pad)
        ax.tick_params(labelsize=TICK_FONT)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel(g.metric.replace("_", " "))
        ax.set_title(_title(g, "by step"))
        ax.grid(alpha=0.3)
        if many:  # a legend of 100 names is unreadable: a colour bar from the first layer to the last
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import BoundaryNorm, ListedColormap

            colors = [cmap(n / max(1, len(cols) - 1) * 0.85) for n in range(len(cols))]
            norm = BoundaryNorm(np.arange(len(cols) + 1) - 0.5, len(cols))
            bar = fig.colorbar(ScalarMappable(norm=norm, cmap=ListedColormap(colors)), ax=ax, fraction=0.05)
            ticks = thin(len(cols), int(3.6 / 0.16))
            bar.set_ticks(ticks)
            bar.set_ticklabels([plain(abbreviate(g.layers[cols[t]], 24)) for t in ticks], fontsize=TICK_FONT)
            bar.set_label(f"layer ({len(cols)}, forward order)")
        if many:  # the colour bar holds the right side: the legend goes below the axes
            _legend(ax, entries, fontsize="small", loc="upper left", bbox_to_anchor=(0, -0.14), ncols=2)
        else:
            _legend(ax, entries, fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


# ---- writing files ----


@dataclass
class ClassGrid:
    """The test error of each class at each layer, at one step of one run: what the classes
    plot draws (it shows which classes become linearly separable first, which the average
    error hides). `values` is NaN where a class has no test example, and in the columns of
    failed layers (`failed`) and of rows written before per-class errors were kept."""

    run: str
    step: int
    layers: list[str]  # forward order
    classes: list[str]  # the data's class names, else the labels
    values: np.ndarray  # (len(classes), len(layers)) float
    failed: np.ndarray  # (len(layers),) bool
    counts: list[int]  # test examples of each class


def class_grid(
    table: pa.Table,
    *,
    run: str | None = None,
    step: int | None = None,
    layers: Sequence[str] | None = None,
) -> ClassGrid:
    """Per-class test errors by layer at `step` (default: the last step whose rows have them)."""
    run, rows_table = select_run(table, run)
    rows = rows_table.to_pylist()
    with_classes = sorted({r["step"] for r in rows if r["status"] == "ok" and r.get("test_class_errors")})
    if not with_classes:
        raise ProbeserveError(
            f"no row of run {run!r} has per-class test errors (test_class_errors): its rows were written "
            "before probeserve recorded them, and a rerun under the same name only does items not done; "
            "the spec run under a new name (--set run=NAME) records them"
        )
    if step is None:
        step = with_classes[-1]
    elif step not in with_classes:
        why = (
            f"no per-class test errors at step {step} in run {run!r}; steps that have them: "
            f"{', '.join(map(str, with_classes))}"
        )
        raise ChoiceError(f"steps=[{step}]: {why}", f"--steps: {why}")
    at_step = [r for r in rows if r["step"] == step]
    index_of: dict[str, int] = {}
    for r in at_step:
        index_of.setdefault(r["layer"], r["layer_index"])
    chosen = sorted(index_of, key=lambda name: (index_of[name], name))
    if layers is not None:
        unknown = [name for name in layers if name not in index_of]
        if unknown:
            why = (
                f"no results for layer(s) {', '.join(unknown)} at step {step} in run {run!r}; "
                f"layers with results: {', '.join(chosen)}"
            )
            raise ChoiceError(f"layers={list(layers)!r}: {why}", f"--layers: {why}")
        chosen = [name for name in chosen if name in set(layers)]
    ok = [r for r in at_step if r["status"] == "ok"]
    num_classes = max((r["num_classes"] or 0 for r in ok), default=0)
    names = next((list(r["class_names"]) for r in ok if r.get("class_names")), None)
    counts = next((list(r["test_class_counts"]) for r in ok if r.get("test_class_counts")), [])
    values = np.full((num_classes, len(chosen)), np.nan)
    failed = np.zeros(len(chosen), dtype=bool)
    col = {name: j for j, name in enumerate(chosen)}
    for r in at_step:
        j = col.get(r["layer"])
        if j is None:
            continue
        if r["status"] != "ok":
            failed[j] = True
        elif r.get("test_class_errors"):
            errors = r["test_class_errors"]
            values[: len(errors), j] = [np.nan if e is None else e for e in errors]
    return ClassGrid(
        run=run,
        step=step,
        layers=chosen,
        classes=names if names is not None else [str(i) for i in range(num_classes)],
        values=values,
        failed=failed,
        counts=counts,
    )


def classes_figure(cg: ClassGrid) -> Figure:
    """Classes (rows, in label order) by layer (columns, forward order); colour is the class's
    test error. Failed layers are grey columns with a red x at the top."""
    with _plain_text():
        plt = _pyplot()
        width = min(20.0, max(6.0, 0.45 * len(cg.layers) + 3.5))
        height = min(20.0, max(4.0, 0.25 * len(cg.classes) + 2))
        axes_w, axes_h = max(1.0, width - 3.5), max(1.0, height - 1.8)
        fig = _figure(width, height)
        ax = fig.add_subplot()
        cmap = plt.get_cmap("viridis").with_extremes(bad=ABSENT_COLOR)
        finite = cg.values[np.isfinite(cg.values)]
        hi = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = ax.imshow(
            np.ma.masked_invalid(cg.values),
            aspect="auto",
            cmap=cmap,
            vmin=0.0,
            vmax=hi,
            interpolation="nearest",
        )
        fig.colorbar(image, ax=ax, label="test error of the class", fraction=min(0.15, 1.0 / width))
        cell_w, cell_h = axes_w / max(1, len(cg.layers)), axes_h / max(1, len(cg.classes))
        if cell_w >= 0.42 and cell_h >= 0.17:  # as the heatmap: "0.123" at 7 pt fits in the cell
            for (i, j), v in np.ndenumerate(cg.values):
                if np.isfinite(v):
                    ax.text(
                        j,
                        i,
                        f"{v:.3f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="k" if v > hi / 2 else "w",
                    )
        handles: list[Any] = []
        labels: list[str] = []
        failed = np.flatnonzero(cg.failed)
        if len(failed):
            marks = ax.scatter(
                failed, [-0.5] * len(failed), marker="x", s=80, color=FAILED_COLOR, clip_on=False
            )
            handles.append(marks)
            labels.append(f"failed ({len(failed)})")
        # A class without test examples has no error (0 of 0): its row is grey, and says why,
        # or it would read as data that is missing
        absent = [cg.classes[i] for i, n in enumerate(cg.counts) if n == 0 and i < len(cg.classes)]
        if absent:
            from matplotlib.patches import Patch

            handles.append(Patch(facecolor=ABSENT_COLOR, edgecolor="0.6"))
            named = ", ".join(plain(abbreviate(c, 24)) for c in absent[:3])
            more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
            labels.append(f"no test example: {named}{more}")
        if handles:
            fig.legend(handles, labels, fontsize="small", loc="outside lower left", ncols=len(handles))
        _layer_axis(ax, cg.layers, axes_w)
        ticks = thin(len(cg.classes), int(axes_h / 0.16))
        ax.set_yticks(ticks)
        ax.set_yticklabels([plain(abbreviate(cg.classes[i], 24)) for i in ticks], fontsize=TICK_FONT)
        ax.set_ylim(len(cg.classes) - 0.5, -0.5)
        ax.set_ylabel("class")
        ax.set_title(plain(f"test error per class by layer, step {cg.step} (run {abbreviate(cg.run, 40)})"))
    return fig


def figure_png(fig: Figure, *, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    try:
        with _plain_text():
            fig.savefig(buf, format="png", dpi=dpi)
    finally:
        _pyplot().close(fig)
    return buf.getvalue()


def _out_error(out: str, why: str) -> ChoiceError:
    return ChoiceError(f"out={out!r}: {why}", f"--out {out}: {why}")


def _save(fig: Figure, out: str, s3_endpoint: str | None) -> str:
    ext = os.path.splitext(out)[1].lower()
    fmt = {".png": "png", ".svg": "svg", ".pdf": "pdf"}.get(ext)
    if fmt is None:
        _pyplot().close(fig)
        raise _out_error(out, "write a .png, .svg or .pdf file")
    buf = io.BytesIO()
    try:
        with _plain_text():
            fig.savefig(buf, format=fmt, dpi=110)
    finally:
        _pyplot().close(fig)
    return publish_file(out, buf.getvalue(), s3_endpoint=s3_endpoint)


# ---- the public API: a table in, a file out ----


class PlotOptions(TypedDict, total=False):
    """What each plot takes besides its table and `out`: the flags of `probeserve plot`."""

    run: str | None  # the run to plot (needed when the table holds several)
    metric: str  # one of PLOT_METRICS (default: test_error)
    steps: Sequence[int] | None  # checkpoint steps (default: all, or a spread for `layers`)
    layers: Sequence[str] | None  # layer names (default: all)
    s3_endpoint: str | None  # where `out` is on an S3-compatible server


def _plot_grid(
    kind: str,
    table: pa.Table,
    out: str,
    *,
    run: str | None = None,
    metric: str = "test_error",
    steps: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    s3_endpoint: str | None = None,
) -> str:
    """The layers, heatmap and steps plots: the grid of the chosen values, drawn as `kind`."""
    g = grid(table, run=run, metric=metric, steps=steps, layers=layers)
    if kind == "layers":
        fig = layers_figure(g, rows=range(len(g.steps)) if steps is not None else None)
    elif kind == "heatmap":
        fig = heatmap_figure(g)
    else:
        assert kind == "steps", kind
        fig = steps_figure(g)
    return _save(fig, out, s3_endpoint)


def plot_layers(table: pa.Table, out: str, **options: Unpack[PlotOptions]) -> str:
    """Error versus layer, one line per step (default: up to 6 spread over the run)."""
    return _plot_grid("layers", table, out, **options)


def plot_heatmap(table: pa.Table, out: str, **options: Unpack[PlotOptions]) -> str:
    """Step by layer, colour = error: the ripple at a glance."""
    return _plot_grid("heatmap", table, out, **options)


def plot_steps(table: pa.Table, out: str, **options: Unpack[PlotOptions]) -> str:
    """Error versus step, one line per layer (default: all of them)."""
    return _plot_grid("steps", table, out, **options)


def plot_classes(
    table: pa.Table,
    out: str,
    *,
    run: str | None = None,
    metric: str = "test_error",
    steps: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    s3_endpoint: str | None = None,
) -> str:
    """Test error per class by layer at one step (default: the last with per-class errors)."""
    if metric != "test_error":
        why = "the classes plot draws test_error, the only metric rows keep per class"
        raise ChoiceError(f"metric={metric!r}: {why}", f"--metric {metric}: {why}")
    if steps is not None and len(steps) != 1:
        why = f"the classes plot draws one step; choose one of {', '.join(map(str, steps))}"
        raise ChoiceError(f"steps={list(steps)!r}: {why}", f"--steps: {why}")
    cg = class_grid(table, run=run, step=steps[0] if steps else None, layers=layers)
    return _save(classes_figure(cg), out, s3_endpoint)


def animate(
    table: pa.Table,
    out: str,
    *,
    run: str | None = None,
    metric: str = "test_error",
    steps: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    fps: int | None = None,
    s3_endpoint: str | None = None,
) -> str:
    """The `layers` plot, one frame per checkpoint, on a fixed y axis: a .gif, or .mp4 with ffmpeg.

    `fps` defaults to 2 frames a second, faster for a long sweep so that the whole animation
    lasts about `ANIMATION_SECONDS` (400 checkpoints at 2 a second would take over 3 minutes).
    """
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".gif", ".mp4"):
        raise _out_error(out, "an animation is written as .gif or .mp4")
    g = grid(table, run=run, metric=metric, steps=steps, layers=layers)
    fps = animation_fps(len(g.steps)) if fps is None else fps
    plt = _pyplot()
    from matplotlib import animation

    if ext == ".mp4":
        if not animation.writers.is_available("ffmpeg"):
            raise _out_error(
                out,
                "writing MP4 needs ffmpeg on PATH (Debian: apt-get install ffmpeg); or write a .gif instead",
            )
        writer: Any = animation.FFMpegWriter(fps=fps)
    else:
        writer = animation.PillowWriter(fps=fps)
    fig, draw = frames_figure(g)

    with tempfile.TemporaryDirectory(prefix=".probeserve-anim-") as tmp:
        local = os.path.join(tmp, "anim" + ext)
        try:
            with _plain_text(), writer.saving(fig, local, dpi=100):
                for i in range(len(g.steps)):
                    draw(i)
                    writer.grab_frame()
        finally:
            plt.close(fig)
        with open(local, "rb") as f:
            return publish_file(out, f.read(), s3_endpoint=s3_endpoint)


def animation_fps(num_frames: int) -> int:
    """2 frames a second, or as many as make `num_frames` last about `ANIMATION_SECONDS` (at
    most 25: GIF frame times are whole hundredths of a second, and few viewers show more)."""
    return min(25, max(2, math.ceil(num_frames / ANIMATION_SECONDS)))


def frames_figure(g: Grid) -> tuple[Figure, Callable[[int], None]]:
    """The animation's figure, on a fixed y axis, and a function that draws frame `i` into it.

    The legend has a "failed" entry only when some item of the grid failed."""
    with _plain_text():
        width = _layers_width(len(g.layers))
        fig = _figure(width, 4.8)
        ax = fig.add_subplot()
        entries: Entries = []
        (trail,) = ax.plot([], [], color="0.7", linewidth=1)
        _entry(entries, trail, "previous step")
        marker = "o" if len(g.layers) <= MAX_MARKER_POINTS else None
        (line,) = ax.plot([], [], marker=marker, markersize=5, color="#1f77b4", linewidth=2)
        _entry(entries, line, "this step")
        lo, hi = value_limits(g)
        _draw_chance(ax, g, lo, hi, entries)
        failed = None
        if g.failed.any():
            failed = ax.scatter(
                [],
                [],
                marker="x",
                s=60,
                color=FAILED_COLOR,
                transform=ax.get_xaxis_transform(),
                clip_on=False,
                zorder=5,
            )
            _entry(entries, failed, "failed")
        _layer_axis(ax, g.layers, width - 2.5)
        ax.set_ylim(lo, hi)
        ax.set_ylabel(g.metric.replace("_", " "))
        ax.grid(alpha=0.3)
        _legend(ax, entries, fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
        title = ax.set_title("")
    labels = g.step_labels()
    x = np.arange(len(g.layers))

    def draw(i: int) -> None:
        line.set_data(x, g.values[i])
        trail.set_data(x, g.values[i - 1] if i > 0 else np.full(len(x), np.nan))
        fx = np.flatnonzero(g.failed[i])
        if failed is not None:
            failed.set_offsets(np.column_stack([fx, np.full(len(fx), 0.97)]) if len(fx) else np.empty((0, 2)))
        extra = f" — {len(fx)} failed" if len(fx) else ""
        title.set_text(plain(f"{g.metric} by layer (run {abbreviate(g.run, 40)}), {labels[i]}{extra}"))

    return fig, draw


def plot(kind: str, table: pa.Table, out: str, **kwargs: Any) -> str:
    """Dispatch on `kind` (one of KINDS)."""
    funcs = {
        "layers": plot_layers,
        "heatmap": plot_heatmap,
        "steps": plot_steps,
        "animation": animate,
        "classes": plot_classes,
    }
    if kind not in funcs:
        raise ChoiceError(
            f"kind={kind!r}: unknown plot kind; choose one of {', '.join(KINDS)}",
            f"--kind {kind}: unknown plot kind; choose one of {', '.join(KINDS)}",
        )
    return funcs[kind](table, out, **kwargs)
