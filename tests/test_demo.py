"""The demo and what `run` prints: a story read from the table, the epoch cap, kept activations."""

from __future__ import annotations

import os

import pytest
import yaml
from helpers import tiny_spec, write_checkpoints

from probeserve import demo, results
from probeserve.cli import main
from probeserve.spec import spec_from_dict
from probeserve.sweep import hit_max_epochs

LAYERS = ["input", "conv1", "relu1", "pool1", "fc1", "fc2"]


def rows_of(errors: dict[str, list[float]], steps=(0, 20, 60, 200), chance=0.9, n_test=None) -> list[dict]:
    """Result rows (only the columns the story reads) from {layer: [error per step]}."""
    return [
        {
            "layer": layer,
            "layer_index": LAYERS.index(layer),
            "step": step,
            "status": "ok",
            "test_error": errs[i],
            "chance_error": chance,
            "n_test": n_test,
        }
        for layer, errs in errors.items()
        for i, step in enumerate(steps)
    ]


# The demo's table as the issue saw it: conv1 worse than the raw input at every step, only fc2
# clearly better with training.
ISSUE_TABLE = {
    "input": [0.20, 0.20, 0.20, 0.20],
    "conv1": [0.25, 0.24, 0.24, 0.23],
    "relu1": [0.22, 0.21, 0.20, 0.19],
    "pool1": [0.21, 0.20, 0.19, 0.18],
    "fc1": [0.19, 0.18, 0.17, 0.17],
    "fc2": [0.35, 0.25, 0.16, 0.12],
}


def test_story_says_what_the_issues_table_shows():
    story = demo.story(rows_of(ISSUE_TABLE))  # no n_test: every difference counts
    assert story == [
        "Chance (always the most frequent class) is 0.9000; at step 0 every probe beats it, "
        "from 0.1900 (fc1) to 0.3500 (fc2).",
        "At step 200, 4 of 5 layers beat the raw input (0.2000): relu1, pool1, fc1 and fc2.",
        "conv1 is worse than the raw input at every step, by 0.0300 to 0.0500.",
        "From step 0 to step 200 the error fell most at fc2 (0.3500 to 0.1200); it fell at 5 of 5 "
        "layers: conv1, relu1, pool1, fc1 and fc2.",
        "At step 200 the error is lowest at fc2 (0.1200) but does not fall steadily with depth: "
        "it rises from input (0.2000) to conv1 (0.2300).",
    ]
    assert "linearly separable" not in " ".join(story)


def test_story_counts_only_differences_beyond_the_test_sets_noise():
    """With 2000 test examples, differences under 0.025 are noise."""
    story = demo.story(rows_of(ISSUE_TABLE, n_test=2000))
    assert story[1] == (
        "With 2000 test examples, two errors near 0.20 can differ by about 0.025 by chance alone "
        "(two standard errors); below, a difference counts only beyond that noise."
    )
    assert (
        story[2]
        == "At step 200, 2 of 5 layers beat the raw input (0.2000) by more than the noise: fc1 and fc2."
    )
    assert story[3] == "conv1 is worse than the raw input at every step, by 0.0300 to 0.0500."
    assert story[4].endswith("it fell by more than the noise at 3 of 5 layers: relu1, pool1 and fc2.")
    assert story[5] == (
        "At step 200 the error is lowest at fc2 (0.1200) but does not fall steadily with depth: it rises "
        "by more than the noise from input (0.2000) to conv1 (0.2300)."
    )
    close = {**ISSUE_TABLE, "conv1": [0.21, 0.21, 0.205, 0.22]}
    (line,) = [s for s in demo.story(rows_of(close, n_test=2000)) if s.startswith("conv1")]
    assert (
        line
        == "conv1 is worse than the raw input at every step, but only by 0.0050 to 0.0200, within the noise."
    )


def test_story_follows_the_numbers_not_a_script():
    steady = {name: [0.3 - 0.02 * i, 0.25 - 0.03 * i] for i, name in enumerate(LAYERS)}
    story = demo.story(rows_of(steady, steps=(0, 40), chance=0.5))
    assert (
        story[1] == "At step 40, 5 of 5 layers beat the raw input (0.2500): conv1, relu1, pool1, fc1 and fc2."
    )
    assert not any("worse than the raw input" in s for s in story)
    assert story[-1] == (
        "At step 40 the error never rises from one layer to the next: 0.2500 at input, 0.1000 at fc2, "
        "lowest at fc2 (0.1000)."
    )
    flat = {name: [0.4, 0.4] for name in LAYERS}
    story = demo.story(rows_of(flat, steps=(0, 40), chance=0.3))
    assert story[0].startswith(
        "Chance (always the most frequent class) is 0.3000; at step 0 0 of 6 probes beat it"
    )
    assert story[-2] == "From step 0 to step 40 no layer's error fell."
    # failed rows and rows without an error are left out; no rows, no story
    broken = [*rows_of(ISSUE_TABLE), {**rows_of(ISSUE_TABLE)[0], "status": "failed", "test_error": None}]
    assert demo.story(broken) == demo.story(rows_of(ISSUE_TABLE))
    assert demo.story([]) == []


def test_activate_hint_only_where_the_venv_is_not_active(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    assert demo.activate_hint(str(venv), environ={}) is None  # not a virtual env
    (venv / "bin" / "activate").write_text("# activate\n")
    hint = demo.activate_hint(str(venv), environ={})
    assert hint is not None and hint.startswith("source ") and hint.endswith(os.path.join("bin", "activate"))
    assert demo.activate_hint(str(venv), environ={"VIRTUAL_ENV": str(venv)}) is None


def test_hit_max_epochs_means_cut_off_not_early_stopped():
    spec = spec_from_dict(
        {
            "checkpoints": {"uri": "c"},
            "model": {"factory": "tiny"},
            "data": {"kind": "gaussian"},
            "probe": {"max_epochs": 100, "patience": 10},
            "output": {"uri": "o"},
        }
    )
    assert not hit_max_epochs(epochs=40, best_epoch=30, n_val=10, spec=spec)  # stopped before the cap
    assert hit_max_epochs(epochs=100, best_epoch=99, n_val=10, spec=spec)  # still improving at the cap
    assert not hit_max_epochs(epochs=100, best_epoch=90, n_val=10, spec=spec)  # early stop at the last epoch
    assert hit_max_epochs(epochs=100, best_epoch=90, n_val=0, spec=spec)  # no val split: no early stopping
    no_patience = spec.model_copy(update={"probe": spec.probe.model_copy(update={"patience": None})})
    assert hit_max_epochs(epochs=100, best_epoch=100, n_val=10, spec=no_patience)


def _spec_file(tmp_path, **over) -> str:
    spec = tiny_spec(tmp_path, **over)
    write_checkpoints(spec, steps=(0, 10))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return str(path)


def test_run_names_its_run_says_what_it_keeps_and_flags_capped_probes(tmp_path, capsys):
    spec_path = _spec_file(tmp_path, probe={"max_epochs": 3, "l2": 1e-3, "patience": 10})
    assert main(["run", spec_path, "--runner", "local"]) == 0
    out = capsys.readouterr().out
    rows = results.load(str(tmp_path / "out")).to_pylist()
    capped = [r for r in rows if r["hit_max_epochs"]]
    assert capped and all(r["epochs"] == 3 for r in capped)
    assert all(r["hit_max_epochs"] is False for r in rows if r not in capped)
    assert out.startswith("run t: test error by layer (rows, in forward order) and checkpoint step (columns)")
    assert "; * hit probe.max_epochs:" in out.splitlines()[0]
    assert out.count("*") >= len(capped) + 1
    assert f"{len(capped)} of 8 probes hit probe.max_epochs=3 before early stopping or converging" in out
    shards = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(tmp_path / "out" / "activations" / "t")
        for f in files
    )
    assert shards > 0
    kept = [ln for ln in out.splitlines() if ln.startswith("kept ")]
    assert kept == [
        f"kept {_human(shards)} of activations in {tmp_path / 'out'}/activations/t/ "
        "(output.keep_activations: true; false deletes a layer's once its probe is committed)"
    ]
    # query's default table shows the column
    assert main(["query", str(tmp_path / "out")]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[header.index("epochs") + 1] == "hit_max_epochs"


def _human(n: int) -> str:
    from probeserve.console import human_bytes

    return human_bytes(n)


def test_run_without_kept_activations_says_so(tmp_path, capsys):
    spec_path = _spec_file(
        tmp_path,
        output={"uri": str(tmp_path / "out"), "keep_activations": False},
        probe={"max_epochs": 200, "l2": 1e-3},
    )
    assert main(["run", spec_path, "--runner", "local"]) == 0
    out = capsys.readouterr().out
    assert "kept no activations (output.keep_activations: false)" in out
    assert "hit probe.max_epochs" not in out  # no probe here needs 200 epochs
    assert not any(files for _, _, files in os.walk(tmp_path / "out" / "activations"))


@pytest.mark.integration
def test_quick_demo_tells_its_story_and_keeps_no_activations(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo.run_demo(out="demo-out", quick=True, runner="local") == 0
    out = capsys.readouterr().out
    rows = results.load(str(tmp_path / "demo-out"), run="demo").to_pylist()
    assert len(rows) == 20 and {r["step"] for r in rows} == set(demo.QUICK_STEPS)
    assert "run demo: test error by layer" in out
    told = out.split("What the table shows:\n")[1].split("\n\n")[0]
    assert [ln.strip() for ln in told.splitlines()] == demo.story(rows)
    assert "kept no activations (output.keep_activations: false)" in out
    assert not any(files for _, _, files in os.walk(tmp_path / "demo-out" / "activations"))
    assert "probeserve query demo-out\n" in out and "probeserve run demo-out/demo-spec.yaml" in out
    spec = yaml.safe_load(open(tmp_path / "demo-out" / "demo-spec.yaml"))
    assert spec["output"]["keep_activations"] is False
    # the README's tour then adds a run beside the demo's; a demo run again prints a plot
    # command that still works (without --run, plot refuses an output of several runs)
    assert "probeserve plot demo-out --kind heatmap" in out
    results.commit(results.open_output("demo-out"), {**rows[0], "run": "l2-1e-2"})
    assert demo.run_demo(out="demo-out", quick=True, runner="local") == 0
    out = capsys.readouterr().out
    assert "probeserve plot demo-out --run demo --kind heatmap --out heatmap.png" in out
    assert main(["plot", "demo-out", "--run", "demo", "--kind", "heatmap", "--out", "heatmap.png"]) == 0


@pytest.mark.parametrize("where", ["a-file", "a-file/below", "s3://bucket/demo"])
def test_demo_out_that_cannot_be_a_local_folder_is_one_line(tmp_path, capsys, monkeypatch, where):
    # `probeserve demo --out FILE` was a FileExistsError traceback with exit 1; an s3:// URI
    # made a local folder named "s3:"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("mine")
    assert main(["demo", "--out", where, "--quick", "--runner", "local"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {where}: ") and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert (tmp_path / "a-file").read_text() == "mine"
