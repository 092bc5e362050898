"""Plots from a real results table written by a small sweep (3 checkpoints, one of them corrupt)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from helpers import tiny_spec, write_checkpoints
from PIL import Image

from probeserve import plots, results
from probeserve.cli import main
from probeserve.errors import ProbeserveError
from probeserve.runners.local import run_local
from probeserve.storage import open_storage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = (0, 10, 20)
LAYERS = ["input", "fc1", "act", "fc2"]


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory):
    """An output folder with 12 rows: steps 0 and 10 ok, step 20 failed (truncated weights)."""
    root = tmp_path_factory.mktemp("plots")
    spec = tiny_spec(root)
    write_checkpoints(spec, steps=STEPS)
    with open(os.path.join(spec.checkpoints.uri, "step=000000020", "model.safetensors"), "r+b") as f:
        f.truncate(100)
    summary = run_local(spec)
    assert summary.ok == 8 and len(summary.failed) == 4
    return spec.output.uri


@pytest.fixture
def table(sweep_out):
    return results.load(sweep_out)


def test_grid_holds_the_table_in_step_and_model_order(table):
    g = plots.grid(table)
    assert g.run == "t" and g.steps == list(STEPS) and g.layers == LAYERS
    by_item = {(r["step"], r["layer"]): r for r in table.to_pylist()}
    for i, s in enumerate(g.steps):
        for j, layer in enumerate(g.layers):
            r = by_item[(s, layer)]
            if r["status"] == "ok":
                assert g.values[i, j] == r["test_error"] and not g.failed[i, j]
            else:
                assert np.isnan(g.values[i, j]) and g.failed[i, j]
    assert g.failed[2].all() and not g.failed[:2].any()
    assert g.num_failed == 4 and g.num_pending == 0
    assert "SHA-256" in g.errors[(2, "fc1")]
    assert g.chance == pytest.approx(0.5, abs=0.1)
    train = plots.grid(table, metric="train_error", layers=["fc2", "input"], steps=[10])
    assert train.layers == ["input", "fc2"] and train.steps == [10]
    assert train.values[0, 1] == by_item[(10, "fc2")]["train_error"]


def test_layers_plot_draws_one_line_per_step_chance_and_failures(table):
    g = plots.grid(table)
    fig = plots.layers_figure(g)
    ax = fig.axes[0]
    step_lines = [ln for ln in ax.lines if (ln.get_gid() or "").startswith("step-")]
    assert [ln.get_label() for ln in step_lines] == ["step 0", "step 10", "step 20"]
    np.testing.assert_array_equal(step_lines[1].get_ydata(), g.values[1])
    chance = [ln for ln in ax.lines if ln.get_gid() == "chance"]
    assert len(chance) == 1 and chance[0].get_linestyle() == "--"
    assert chance[0].get_label().startswith(f"chance ({plots.format_chance(g.chance)})")
    lo, hi = ax.get_ylim()
    if lo <= g.chance <= hi:  # a line at the level, or a note that it is off the axes
        assert chance[0].get_ydata()[0] == pytest.approx(g.chance)
    else:
        assert "the axes" in chance[0].get_label()
    # the failed step's items are red x marks at the top, one per failed layer, and counted
    (marks,) = ax.collections
    assert len(marks.get_offsets()) == 4 and marks.get_label() == "failed (4)"
    assert "4 failed" in ax.get_title()
    plots._pyplot().close(fig)


def test_default_steps_spread_over_the_run_and_long_names_are_shortened():
    assert plots.spread(3, 6) == [0, 1, 2]
    picked = plots.spread(50, 6)
    assert len(picked) == 6 and picked[0] == 0 and picked[-1] == 49
    name = "encoder.layers.11.attention.output.dense"
    assert plots.abbreviate(name) == "e.l.11.a.out.dense"  # dotted paths keep their numbers
    assert plots.abbreviate("blocks.12.layer1.conv") != plots.abbreviate("blocks.13.layer1.conv")
    short = plots.abbreviate("a_very_long_module_name_without_any_dots_at_all_dense")
    assert len(short) == 18 and short.startswith("a_v") and short.endswith("dense")
    assert plots.abbreviate("fc1") == "fc1"


@pytest.mark.parametrize(
    ("kind", "name"), [("layers", "l.png"), ("heatmap", "h.png"), ("steps", "s.png"), ("layers", "l.svg")]
)
def test_each_plot_writes_a_valid_image(table, tmp_path, kind, name):
    out = str(tmp_path / name)
    assert plots.plot(kind, table, out) == out
    data = open(out, "rb").read()
    if name.endswith(".png"):
        assert data.startswith(PNG_MAGIC)
        with Image.open(out) as im:
            im.verify()
        with Image.open(out) as im:
            assert im.size[0] > 300 and im.size[1] > 200
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not a blank canvas
    else:
        assert b"<svg" in data[:2000]
    assert sorted(os.listdir(tmp_path)) == [name]  # no temporary file left beside it


def test_animation_gif_has_one_frame_per_step(table, tmp_path):
    out = plots.animate(table, str(tmp_path / "a.gif"))
    assert open(out, "rb").read(6) == b"GIF89a"
    with Image.open(out) as im:
        assert im.n_frames == len(STEPS)
        assert im.size[0] > 300
    two = plots.animate(table, str(tmp_path / "b.gif"), steps=[0, 10])
    with Image.open(two) as im:
        assert im.n_frames == 2


def test_animation_mp4_needs_ffmpeg(table, tmp_path, monkeypatch):
    from matplotlib import animation

    if animation.writers.is_available("ffmpeg"):
        out = plots.animate(table, str(tmp_path / "a.mp4"))
        assert open(out, "rb").read(12)[4:8] == b"ftyp"
    monkeypatch.setattr(animation.writers, "is_available", lambda name: False)
    with pytest.raises(ProbeserveError, match="ffmpeg"):
        plots.animate(table, str(tmp_path / "b.mp4"))
    assert not (tmp_path / "b.mp4").exists()
    with pytest.raises(ProbeserveError, match=r"\.gif or \.mp4"):
        plots.animate(table, str(tmp_path / "c.png"))


def test_plots_work_on_a_partly_finished_sweep(sweep_out, tmp_path):
    """Delete two committed rows: those items are pending; they vanish from the plots, nothing else."""
    out = str(tmp_path / "out")
    shutil.copytree(sweep_out, out)
    storage = open_storage(out)
    gone = [
        k
        for k in results.result_keys(storage, "t")
        if "/step-000000000010-" in k and k.endswith(("act.parquet", "fc2.parquet"))
    ]
    assert len(gone) == 2
    for k in gone:
        storage.delete(k)
    table = results.load(out)
    g = plots.grid(table)
    assert g.num_pending == 2 and g.num_failed == 4
    assert np.isnan(g.values[1, 2:]).all() and not g.failed[1, 2:].any()
    assert np.isfinite(g.values[1, :2]).all()
    for kind, name in [("layers", "l.png"), ("heatmap", "h.png"), ("steps", "s.png"), ("animation", "a.gif")]:
        assert open(plots.plot(kind, table, str(tmp_path / name)), "rb").read(4) in (PNG_MAGIC[:4], b"GIF8")
    fig = plots.heatmap_figure(g)
    assert "2 pending" in fig.axes[0].get_title() and "4 failed" in fig.axes[0].get_title()
    plots._pyplot().close(fig)


def test_cli_plot_writes_the_file(sweep_out, tmp_path, capsys):
    out = str(tmp_path / "h.png")
    assert main(["plot", sweep_out, "--kind", "heatmap", "--out", out, "--metric", "val_error"]) == 0
    assert capsys.readouterr().out.strip() == out
    assert open(out, "rb").read(8) == PNG_MAGIC
    out = str(tmp_path / "l.png")
    assert main(["plot", sweep_out, "--out", out, "--steps", "0,10", "--layers", "fc1", "fc2"]) == 0
    assert os.path.getsize(out) > 1000


def test_cli_plot_empty_results_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "out"
    empty.mkdir()
    assert main(["plot", str(empty), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no results yet") and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ProbeserveError, match="empty"):
        plots.plot_layers(results.load(str(empty)), str(tmp_path / "y.png"))


def test_cli_plot_unknown_names_list_the_known_ones(sweep_out, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert main(["plot", sweep_out, "--out", out, "--layers", "fc1,fc9"]) == 2
    err = capsys.readouterr().err
    assert "fc9" in err and "input, fc1, act, fc2" in err
    assert main(["plot", sweep_out, "--out", out, "--steps", "0", "7"]) == 2
    err = capsys.readouterr().err
    assert "7" in err and "0, 10, 20" in err
    assert main(["plot", sweep_out, "--out", out, "--steps", "ten"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["plot", sweep_out, "--out", out, "--run", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["plot", sweep_out, "--out", str(tmp_path / "x.jpg")]) == 2
    assert ".png" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


# ---- synthetic result tables: the size of real sweeps, without running one ----


def synthetic_table(
    num_steps: int,
    num_layers: int,
    *,
    run: str = "r",
    layers: list[str] | None = None,
    steps: list[int] | None = None,
    chance: float = 0.9025,
    failed: frozenset[tuple[int, int]] = frozenset(),
    error=None,
):
    """Rows of a sweep: errors fall with training, deep layers later (a ripple), the input stays.

    `error(i, j)` overrides the error of step i, layer j; `failed` holds (i, j) of failed items."""
    layers = layers or ["input"] + [f"blocks.{k // 4}.layer{k % 4}.conv" for k in range(num_layers - 1)]
    steps = steps or [100 * i for i in range(num_steps)]
    rows = []
    for i, step in enumerate(steps):
        t = i / max(1, len(steps) - 1)
        for j, name in enumerate(layers):
            depth = j / max(1, len(layers) - 1)
            e = 0.17 if j == 0 else 0.15 + 0.25 * depth * (1 - t) ** 2
            if error is not None:
                e = error(i, j)
            ok = (i, j) not in failed
            rows.append(
                {
                    "run": run,
                    "spec_hash": "h",
                    "checkpoint": f"step={step}/model.safetensors",
                    "step": step,
                    "layer": name,
                    "layer_index": j,
                    "status": "ok" if ok else "failed",
                    "error": None if ok else f"boom at {name}",
                    "test_error": e if ok else None,
                    "val_error": e if ok else None,
                    "train_error": 0.8 * e if ok else None,
                    "chance_error": chance if ok else None,
                }
            )
    return results.rows_to_table(rows)


HOSTILE_NAMES = [
    "input",
    "cost $5",  # one $: plain text to matplotlib, and it must stay so next to the others
    "a$b$c",  # a pair: drawn as math (italic b) instead of the name
    "$\\alpha$_x^2",
    "x$^$y",  # not valid mathtext: drawing it raised ValueError, and `plot` and `report` crashed
    "a$\\nocommand{$b",
    "back\\slash\\n{}",
    "under_score_^caret",
    "_leading_underscore",  # matplotlib's legend leaves out labels starting with _
    "<script>alert('x')</script>",
    'fish & chips "quoted"',
    "ünïcødé.层.→",
    "enc." + "very_long_part." * 12 + "dense",
]


def _svg_texts(path: str) -> str:
    """All text of an SVG written with svg.fonttype none (text kept as text), joined."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    return "\n".join("".join(el.itertext()) for el in root.iter() if el.tag.endswith("text"))


@pytest.mark.parametrize("kind", ["layers", "heatmap", "steps"])
def test_names_are_text_never_markup(tmp_path, kind):
    """Every hostile name is drawn as itself: in tick labels, legends and titles, PNG and SVG."""
    import matplotlib

    table = synthetic_table(3, len(HOSTILE_NAMES), layers=HOSTILE_NAMES, failed=frozenset({(1, 3)}))
    assert plots.plot(kind, table, str(tmp_path / "x.png")).endswith("x.png")
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        out = plots.plot(kind, table, str(tmp_path / "x.svg"))
    texts = _svg_texts(out)
    width = {"layers": 18, "heatmap": 24, "steps": 24}[kind]
    for name in HOSTILE_NAMES:
        assert plots.abbreviate(name, width) in texts, name
    assert "\\$" not in texts  # the escape never shows (no name here holds one)


def test_names_are_text_in_the_animation_and_the_long_name_is_shortened(tmp_path):
    table = synthetic_table(3, len(HOSTILE_NAMES), layers=HOSTILE_NAMES, failed=frozenset({(1, 3)}))
    with Image.open(plots.animate(table, str(tmp_path / "a.gif"))) as im:
        assert im.n_frames == 3
    g = plots.grid(table, layers=["input", "_leading_underscore", HOSTILE_NAMES[-1]])  # a legend, not a bar
    fig = plots.steps_figure(g)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert plots.plain("_leading_underscore") in legend  # given explicitly, so not dropped
    assert plots.plain(plots.abbreviate(HOSTILE_NAMES[-1], 24)) in legend
    assert max(len(t) for t in legend) < 40
    plots._pyplot().close(fig)


def test_plain_round_trips_through_matplotlibs_text():
    """What matplotlib draws for plain(name) is the name, for any mix of $ and backslashes."""
    from matplotlib.text import Text

    for name in [*HOSTILE_NAMES, "\\$", "$\\", "\\\\$$", "$"]:
        shown, math = Text(text=plots.plain(name))._preprocess_math(plots.plain(name))
        assert (shown, math) == (name, False), name


def test_chance_is_one_number_in_every_plot():
    """0.9025 averaged over 10 rows is 0.9025000000000001, which printed as 0.903 where the
    whole grid printed 0.902: every selection now shows the run's own value."""
    table = synthetic_table(4, 10)
    whole = plots.grid(table)
    assert whole.chance == 0.9025
    for g in (plots.grid(table, steps=[0]), plots.grid(table, layers=["input", "blocks.0.layer0.conv"])):
        assert g.chance == whole.chance
    labels = []
    for make in (plots.layers_figure, plots.steps_figure, lambda g: plots.frames_figure(g)[0]):
        fig = make(plots.grid(table, steps=[0]))
        (line,) = [ln for ln in fig.axes[0].lines if ln.get_gid() == "chance"]
        labels.append(line.get_label().split(",")[0])
        plots._pyplot().close(fig)
    assert labels == ["chance (0.9025)"] * 3


def test_y_axis_fits_the_data_and_chance_far_above_is_a_note():
    table = synthetic_table(4, 10, error=lambda i, j: 0.11 + 0.06 * j / 9 - 0.01 * i)
    g = plots.grid(table)
    fig = plots.layers_figure(g)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert 0.05 < lo < 0.08 and 0.17 < hi < 0.2  # the data's range, not 0-1
    (proxy,) = [ln for ln in ax.lines if ln.get_gid() == "chance"]
    assert len(proxy.get_xdata()) == 0 and proxy.get_label() == "chance (0.9025), above the axes"
    assert "chance (0.9025), above the axes" in [t.get_text() for t in ax.get_legend().get_texts()]
    plots._pyplot().close(fig)
    # chance inside the data's range is a line at its level
    near = plots.grid(synthetic_table(4, 10, chance=0.5, error=lambda i, j: 0.3 + 0.05 * j))
    fig = plots.steps_figure(near)
    (line,) = [ln for ln in fig.axes[0].lines if ln.get_gid() == "chance"]
    assert list(line.get_ydata()) == [0.5, 0.5] and line.get_label() == "chance (0.5000)"
    plots._pyplot().close(fig)


def test_heatmap_colours_span_the_bulk_of_the_values():
    rng = np.random.default_rng(0)
    bulk = rng.uniform(0.11, 0.17, size=(4, 10))
    bulk[:, 1] = 0.6  # one layer far off: it saturates instead of flattening the others
    rest = bulk[:, [0, *range(2, 10)]]
    assert plots.color_limits(bulk) == (rest.min(), rest.max())
    bulk[:, 3] = 0.01  # and one far below
    rest = bulk[:, [0, 2, *range(4, 10)]]
    assert plots.color_limits(bulk) == (rest.min(), rest.max())
    smooth = np.linspace(0.1, 0.6, 40).reshape(4, 10) ** 3  # a continuous tail keeps its colours
    assert plots.color_limits(smooth) == (smooth.min(), smooth.max())
    gap = np.concatenate([np.linspace(0.1, 0.2, 30), np.full(10, 0.9)])  # a quarter apart: no outliers
    assert plots.color_limits(gap) == (0.1, 0.9)
    lo, hi = plots.color_limits(np.full((3, 3), 0.2))
    assert lo < 0.2 < hi
    assert plots.color_limits(np.full((2, 2), np.nan)) == (0.0, 1.0)
    # the figure uses them, and its colour bar's arrow says that cells saturate
    table = synthetic_table(4, 10, error=lambda i, j: 0.6 if j == 1 else 0.11 + 0.005 * (i + j))
    g = plots.grid(table)
    fig = plots.heatmap_figure(g)
    (image,) = fig.axes[0].images
    assert image.get_clim() == plots.color_limits(g.values)
    assert fig.axes[1].get_label() == "<colorbar>" and "chance 0.9025" in fig.axes[1].get_ylabel()
    plots._pyplot().close(fig)


@pytest.mark.parametrize(
    ("num_steps", "num_layers", "values"),
    [(4, 10, True), (25, 10, True), (25, 130, False), (400, 130, False)],
)
def test_heatmap_of_a_real_sweep_size_thins_its_labels(num_steps, num_layers, values):
    g = plots.grid(synthetic_table(num_steps, num_layers, failed=frozenset({(1, 2)})))
    layout = plots.heatmap_layout(g)
    assert layout["values"] == values
    width, height = layout["size"]
    assert width <= 20 and height <= 20
    # labels at most one per 0.3 in along the steps, 0.16 in along the layers, and all when they fit
    assert len(layout["step_ticks"]) <= max(1, (width - 3.2) / 0.3)
    assert len(layout["layer_ticks"]) <= max(1, (height - 1.8) / 0.16)
    if num_steps == 25:
        assert layout["step_ticks"] == list(range(25))
    if num_layers == 10:
        assert layout["layer_ticks"] == list(range(10))
    fig = plots.heatmap_figure(g)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(g.steps[i]) for i in layout["step_ticks"]]
    assert all(t.get_fontsize() == plots.TICK_FONT for t in ax.get_yticklabels())
    assert len([t for t in ax.texts if t.get_text().startswith("0.")]) == (g.values.size - 1 if values else 0)
    plots._pyplot().close(fig)


def test_steps_plot_draws_every_layer_as_its_help_says():
    g = plots.grid(synthetic_table(25, 10))
    fig = plots.steps_figure(g)
    ax = fig.axes[0]
    lines = [ln for ln in ax.lines if (ln.get_gid() or "").startswith("layer-")]
    assert len(lines) == 10
    assert [t.get_text() for t in ax.get_legend().get_texts()][:10] == g.layers
    plots._pyplot().close(fig)
    deep = plots.grid(synthetic_table(400, 130))
    fig = plots.steps_figure(deep)
    lines = [ln for ln in fig.axes[0].lines if (ln.get_gid() or "").startswith("layer-")]
    assert len(lines) == 130 and len(fig.axes) == 2  # a colour bar names the layers instead
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["chance (0.9025), above the axes"]
    bar_labels = [t.get_text() for t in fig.axes[1].get_yticklabels() if t.get_text()]
    assert bar_labels[0] == "input" and 10 <= len(bar_labels) <= 25
    plots._pyplot().close(fig)


def test_steps_saved_at_geometric_intervals_get_a_log_axis():
    assert not plots.front_loaded([0, 20, 60, 200])
    assert not plots.front_loaded(list(range(0, 40000, 100)))
    assert plots.front_loaded([0, 1, 2, 5, 10, 20, 50, 100, 1000, 10000])
    geometric = plots.grid(synthetic_table(10, 3, steps=[0, 1, 2, 5, 10, 20, 50, 100, 1000, 10000]))
    fig = plots.steps_figure(geometric)
    assert fig.axes[0].get_xscale() == "symlog" and fig.axes[0].get_xlim()[0] == 0
    plots._pyplot().close(fig)


def test_animation_legend_shows_failed_only_when_something_failed():
    def legend_of(table) -> list[str]:
        fig, draw = plots.frames_figure(plots.grid(table))
        draw(0)
        texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        plots._pyplot().close(fig)
        return texts

    assert "failed" not in legend_of(synthetic_table(3, 4))
    assert "failed" in legend_of(synthetic_table(3, 4, failed=frozenset({(2, 1)})))


def test_a_long_sweeps_animation_is_sped_up():
    assert plots.animation_fps(4) == 2
    assert plots.animation_fps(400) == 20  # 400 frames in 20 s
    assert plots.animation_fps(10_000) == 25


def test_python_api_errors_name_python_arguments_and_the_cli_its_flags(tmp_path, capsys):
    import pyarrow as pa

    both = pa.concat_tables([synthetic_table(2, 3, run="demo"), synthetic_table(2, 3, run="l2-1e-3")])
    with pytest.raises(plots.ChoiceError) as e:
        plots.plot_layers(both, str(tmp_path / "x.png"))
    assert "run='demo'" in str(e.value) and "--run" not in str(e.value)
    for kwargs, needle in [
        ({"run": "nope"}, "run='nope'"),
        ({"run": "demo", "steps": [300]}, "steps=[300]"),
        ({"run": "demo", "layers": ["fc9"]}, "layers=['fc9']"),
        ({"run": "demo", "metric": "accuracy"}, "metric='accuracy'"),
    ]:
        with pytest.raises(plots.ChoiceError) as e:
            plots.plot_layers(both, str(tmp_path / "x.png"), **kwargs)
        assert needle in str(e.value) and "--" not in str(e.value)
    with pytest.raises(plots.ChoiceError, match=r"out='x\.jpg'"):
        plots.plot_layers(both, "x.jpg", run="demo")
    # the same mistakes on the command line name the flags
    out_dir = tmp_path / "out"
    open_storage(str(out_dir))
    storage = open_storage(str(out_dir))
    for row in both.to_pylist():
        results.commit(storage, row)
    assert main(["plot", str(out_dir), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "choose one with --run demo" in err and "run=" not in err
    assert (
        main(["plot", str(out_dir), "--run", "demo", "--steps", "300", "--out", str(tmp_path / "x.png")]) == 2
    )
    assert capsys.readouterr().err.startswith("error: --steps: no results for step(s) 300")


def test_the_numbers_docs_results_md_gives_for_the_plots():
    """docs/results.md: values printed up to 40 steps and 107 layers, a legend up to 12
    layers, 2 frames a second up to 40 checkpoints."""

    def prints_values(num_steps: int, num_layers: int) -> bool:
        return plots.heatmap_layout(plots.grid(synthetic_table(num_steps, num_layers)))["values"]

    assert prints_values(40, 10) and not prints_values(41, 10)
    assert prints_values(3, 107) and not prints_values(3, 108)
    assert plots.MAX_LEGEND_LAYERS == 12
    assert plots.animation_fps(40) == 2 and plots.animation_fps(41) > 2
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "results.md"), encoding="utf-8").read()
    assert "up to 40 steps, and up to 107 layers" in doc and "up to 12 layers" in doc
    assert "faster past 40 checkpoints so that it lasts about 20 s" in doc
