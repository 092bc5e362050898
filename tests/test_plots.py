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
    chance = [ln for ln in ax.lines if ln.get_label().startswith("chance")]
    assert len(chance) == 1 and chance[0].get_linestyle() == "--"
    assert chance[0].get_ydata()[0] == pytest.approx(g.chance)
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
    short = plots.abbreviate(name)
    assert len(short) == 18 and short.startswith("enc") and short.endswith("dense")
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
