"""The paper's experiments (jobs/paper/) end to end at a tiny size: the shape of each result.

Each test runs an entry point (`jobs/paper/figN.py --tiny`) the way a reader would, in this
process: it trains (or, for Figure 3, only initialises) the model, writes checkpoints with
`probeserve.save_checkpoint`, probes them through the normal sweep path, and draws the
figure. Then it checks the shape the paper reports, on the numbers behind the figure
(`jobs/paper/figures.py`), not on pixels. The MNIST-format experiments use Fashion-MNIST
when the Debian package is installed (what the committed figures show) and otherwise
synthetic images in the same format (`probeserve.demo.synthetic_idx`).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "jobs" / "paper"


@pytest.fixture(scope="module")
def paper():
    """The jobs/paper modules, imported as the scripts import each other (from their folder)."""
    sys.path.insert(0, str(PAPER))
    try:
        yield {name: importlib.import_module(name) for name in ("fig3", "fig5", "fig7", "fig8", "figures")}
    finally:
        sys.path.remove(str(PAPER))


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    """`--data` for the MNIST-format experiments: None (Fashion-MNIST) or synthetic IDX files."""
    from probeserve.data import find_fashion_mnist
    from probeserve.demo import synthetic_idx

    if find_fashion_mnist() is not None:
        return None
    return synthetic_idx(str(tmp_path_factory.mktemp("synthetic-idx")))


def data_args(idx_data):
    return [] if idx_data is None else ["--data", idx_data]


def check_png(path: Path) -> None:
    from PIL import Image

    assert path.exists(), path
    assert path.stat().st_size < 200_000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300


def test_fig3_error_climbs_from_the_input_to_the_last_layer(paper, tmp_path):
    assert paper["fig3"].main(["--tiny", "--out", str(tmp_path), "-q"]) == 0
    d = paper["figures"].fig3_data(str(tmp_path / "fig3" / "probes"))
    assert d["layers"] == [0, 8, 16, 24, 32]
    assert d["runs"] == ["fig3-rep000", "fig3-rep001"] and d["failed"] == 0
    assert not np.isnan(d["errors"]).any()
    # y is a linear function of the input: a probe there is nearly perfect...
    assert d["mean"][0] < 0.1
    # ...and the untrained layers scramble it: far worse by layer 32, still no worse than a coin
    assert d["mean"][-1] > d["mean"][0] + 0.2
    assert d["mean"][-1] < 0.55
    # each repetition has its own w and initialisation
    assert not np.allclose(d["errors"][0], d["errors"][1])
    check_png(tmp_path / "fig3.png")


def test_fig3_rerun_probes_nothing_again(paper, tmp_path, caplog):
    """The sweeps are the service's: a second run finds every item done."""
    args = ["--tiny", "--out", str(tmp_path), "-q"]
    assert paper["fig3"].main(args) == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "fig3" / "probes" / "results").rglob("*.parquet")}
    assert len(before) == 2 * 5
    assert paper["fig3"].main([*args, "--stage", "sweep"]) == 0
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "fig3" / "probes" / "results").rglob("*.parquet")}
    assert after == before


def test_fig5_random_features_help_and_training_helps_the_top(paper, tmp_path, idx_data):
    assert paper["fig5"].main(["--tiny", "--out", str(tmp_path), "-q", *data_args(idx_data)]) == 0
    d = paper["figures"].fig5_data(str(tmp_path / "fig5" / "probes"))
    assert d["names"] == list(paper["figures"].CONVNET_NAMES.values())
    assert d["steps"][0] == 0 and d["steps"][-1] > 0 and d["failed"] == 0
    init, trained = np.asarray(d["init"]), np.asarray(d["trained"])
    # at initialisation every probe is far better than chance: random features keep the signal
    assert (init < d["chance"] - 0.3).all(), init
    # training makes the logits far better than the random logits, and the input is the input
    assert trained[-1] < init[-1] - 0.05
    assert trained[0] == pytest.approx(init[0])
    check_png(tmp_path / "fig5.png")


@pytest.mark.integration  # two models trained and probed at 6 checkpoints: the slowest of these
def test_fig7_auxiliary_heads_train_the_deep_layers(paper, tmp_path, idx_data):
    assert paper["fig7"].main(["--tiny", "--out", str(tmp_path), "-q", *data_args(idx_data)]) == 0
    figures = paper["figures"]
    aux = figures.curves(str(tmp_path / "fig7" / "probes"), "fig7")
    control = figures.curves(str(tmp_path / "fig7" / "probes"), "fig7-noaux")
    assert aux["steps"] == [0, 20, 40, 60, 90, 120] and aux["failed"] == control["failed"] == 0
    assert aux["layers"][0] == 0 and aux["layers"][-1] == 32
    # the same initialisation: the step-0 curves agree
    np.testing.assert_allclose(aux["values"][0], control["values"][0], atol=1e-6)
    # with auxiliary heads the last layer becomes much more separable...
    assert aux["values"][-1, -1] < aux["values"][0, -1] - 0.15
    # ...and more so than without them
    assert aux["values"][-1, -1] < control["values"][-1, -1] - 0.05
    check_png(tmp_path / "fig7.png")
    gif = tmp_path / "fig7.gif"
    assert gif.stat().st_size < 2_000_000 and gif.read_bytes()[:6] in (b"GIF87a", b"GIF89a")


def test_fig8_layers_before_the_skip_target_improve_less(paper, tmp_path, idx_data):
    assert paper["fig8"].main(["--tiny", "--out", str(tmp_path), "-q", *data_args(idx_data)]) == 0
    c = paper["figures"].curves(str(tmp_path / "fig8" / "probes"), "fig8")
    assert c["failed"] == 0
    layers = np.asarray(c["layers"])
    assert {15, 16} <= set(c["layers"])  # both sides of the skip's target are probed
    gain = c["values"][0] - c["values"][-1]  # how much each layer's error came down
    bypassed, after = gain[(layers >= 1) & (layers < 16)], gain[layers >= 16]
    assert bypassed.mean() < after.mean() - 0.02, (bypassed, after)
    # the input joins layer 16: from there on the error drops back below layer 15's
    j15, j16 = list(layers).index(15), list(layers).index(16)
    assert c["values"][-1, j16] < c["values"][-1, j15]
    check_png(tmp_path / "fig8.png")


def test_entry_point_reports_bad_data_on_one_line(tmp_path):
    """Run as a script: a data folder without IDX files is exit 2 and one line naming it."""
    missing = tmp_path / "no-idx-here"
    missing.mkdir()
    proc = subprocess.run(
        [sys.executable, str(PAPER / "fig8.py"), "--tiny", "--out", str(tmp_path), "--data", str(missing)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0] and "IDX" in errors[0]
    assert "Traceback" not in proc.stderr


def test_training_refuses_a_folder_of_another_configuration(paper, tmp_path, idx_data):
    """Checkpoints of different trainings never mix in one folder."""
    import train_deep_mlp

    kwargs = train_deep_mlp.model_kwargs(depth=2, width=8)
    common = {"steps": 2, "save_at": [0, 2], "val_size": 500, "train_size": 200, "data_path": idx_data}
    train_deep_mlp.train(str(tmp_path), kwargs=kwargs, **common)
    assert sorted(p.name for p in tmp_path.glob("step=*")) == ["step=000000000", "step=000000002"]
    train_deep_mlp.train(str(tmp_path), kwargs=kwargs, **common)  # the same: nothing to do
    with pytest.raises(ValueError, match="another training configuration"):
        train_deep_mlp.train(str(tmp_path), kwargs={**kwargs, "width": 16}, **common)


@pytest.mark.integration
def test_fig3_through_the_ray_runner_gives_the_local_answers(paper, tmp_path):
    """`--runner ray` goes through `probeserve run SPEC --runner ray` on a fresh local Ray."""
    pytest.importorskip("ray")
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert paper["fig3"].main(["--tiny", "--out", str(local), "-q"]) == 0
    assert (
        paper["fig3"].main(["--tiny", "--out", str(ray_out), "-q", "--runner", "ray", "--address", "local"])
        == 0
    )
    a = paper["figures"].fig3_data(str(local / "fig3" / "probes"))
    b = paper["figures"].fig3_data(str(ray_out / "fig3" / "probes"))
    np.testing.assert_allclose(a["errors"], b["errors"], atol=1e-9)
