"""A newcomer's first hour, played carelessly: the review of main at merge dbe0eff.

Each test is a mistake a user makes at the surface (a folder beside the output, a mistyped
`--run`, an output that is a file, a small image data set with a wide layer) and checks that
the answer is one line naming what to change, with the exit status that tells the truth.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas
import pytest
from helpers import tiny_spec, write_checkpoints, write_spec

from probeserve import results
from probeserve.cli import main
from probeserve.runners.local import run_local


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """`probes/a` and `probes/b`: two finished outputs in one folder, as the README's tour
    leaves `probes/gaussian-mlp` (and a user's next spec, `probes/...`)."""
    root = tmp_path_factory.mktemp("first-hour")
    for name in ("a", "b"):
        spec = tiny_spec(
            root, checkpoints={"uri": str(root / "ckpts")}, output={"uri": str(root / "probes" / name)}
        )
        spec = spec.model_copy(
            update={"layers": spec.layers.model_copy(update={"include": ["input", "fc2"]})}
        )
        if name == "a":
            write_checkpoints(spec, steps=(0,))
        assert run_local(spec).exit_code == 0
    return root


READERS = [
    ["query", "{}"],
    ["plot", "{}", "--out", "{out}/x.png"],
    ["report", "{}", "--out", "{out}/x.html"],
    ["status", "{}"],
]


def _call(argv, where, out, capsys):
    code = main([a.format(where, out=out) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv", READERS, ids=[a[0] for a in READERS])
def test_a_folder_that_holds_outputs_is_named_with_them(outputs, tmp_path, capsys, argv):
    # `probeserve query probes` said "no results yet for probes" and exited 0 (status: "no
    # runs under probes"), as if the sweep had not started: the rows are in probes/a.
    code, out, err = _call(argv, str(outputs / "probes"), tmp_path, capsys)
    assert code == 2, (out, err)
    assert "not a probeserve output" in err and "probes/a, " in err and "probes/b" in err
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # no plot or report written


@pytest.mark.parametrize("inside", ["runs", "results/t", "activations"])
@pytest.mark.parametrize("argv", READERS, ids=[a[0] for a in READERS])
def test_a_folder_inside_an_output_names_the_output(outputs, tmp_path, capsys, argv, inside):
    code, out, err = _call(argv, str(outputs / "probes" / "a" / inside), tmp_path, capsys)
    assert code == 2, (out, err)
    assert f"is inside the output {outputs / 'probes' / 'a'}" in err


@pytest.mark.parametrize("argv", READERS, ids=[a[0] for a in READERS])
def test_a_mistyped_run_is_named_with_the_runs_there(outputs, tmp_path, capsys, argv):
    # query printed "no results yet for run 'tt'" and exited 0; plot said "no results yet";
    # status printed "no runs under ..." and exited 0. report already named the runs.
    code, out, err = _call([*argv, "--run", "tt"], str(outputs / "probes" / "a"), tmp_path, capsys)
    assert code == 2, (out, err)
    assert "--run tt: no such run under" in err and "runs there: t" in err


@pytest.mark.parametrize("argv", READERS, ids=[a[0] for a in READERS])
def test_a_new_empty_output_folder_still_has_no_results_yet(tmp_path, capsys, argv):
    (tmp_path / "fresh").mkdir()  # made by hand before a first run: nothing is wrong with it
    code, out, err = _call(argv, str(tmp_path / "fresh"), tmp_path / "fresh", capsys)
    assert code == {"query": 0, "status": 0, "plot": 2, "report": 2}[argv[0]]  # nothing to draw
    assert ("no results" in err or "no runs" in out) and "not a probeserve output" not in err


def test_status_takes_the_results_folder_as_query_plot_and_report_do(outputs, capsys):
    # `probeserve status OUT/results` printed "no runs under OUT/results" and exited 0
    code = main(["status", str(outputs / "probes" / "a" / "results")])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[2].split()[:4] == ["t", "1", "2", "2"]  # run, checkpoints, items, done


def test_validate_blames_an_output_that_is_a_file_once_and_not_on_data(tmp_path, capsys):
    # validate listed "data: output.uri: ... is a file" too: opening the data reads the output
    (tmp_path / "out").write_text("")
    spec = tiny_spec(tmp_path)
    assert main(["validate", write_spec(tmp_path, spec)]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == f"error: {tmp_path / 'spec.json'}: output.uri: {tmp_path / 'out'} is a file, not a folder"
    )


def test_a_small_data_set_is_not_refused_for_chunks_of_rows_it_does_not_have(tmp_path):
    # A folder of 120 images probed at a conv layer of 25,088 features failed with "probe.
    # memory_bytes: 4.0 GiB cannot hold ... (6.2 GiB)": the reservation counted streamed chunks
    # of `probe.batch_size` (8192) rows, though no split had more than 75. Here the same, small:
    # 1,000 examples of at most 12 features need well under 4 MB, which was refused.
    spec = tiny_spec(tmp_path, probe={"max_epochs": 50, "l2": 1e-3, "memory_bytes": 4_000_000})
    write_checkpoints(spec, steps=(0,))
    summary = run_local(spec)
    assert summary.failed == [] and summary.ok == 4


def test_the_tours_training_job_prints_no_warning(tmp_path):
    # README step 4, `python jobs/train_mlp.py --out ckpts/gaussian-mlp ...`, printed torch's
    # "UserWarning: Converting a tensor with requires_grad=True to a scalar" on every run
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [
            sys.executable,
            str(repo / "jobs" / "train_mlp.py"),
            "--out",
            str(tmp_path / "c"),
            "--steps",
            "4",
            "--every",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "step 4: train loss" in done.stdout


@pytest.mark.parametrize("kind", ["plot", "report"])
@pytest.mark.parametrize("inside", ["results/x", "results/t/x"])
def test_a_figure_is_never_written_into_the_results_folder(outputs, capsys, kind, inside):
    # query refused it, but `plot --out OUT/results/x.png` and `report --out OUT/results/t/r.html`
    # wrote there, and then pandas.read_parquet(OUT/results), the README's reader, failed
    out = outputs / "probes" / "a"
    target = out / f"{inside}.{'png' if kind == 'plot' else 'html'}"
    assert main([kind, str(out), "--out", str(target)]) == 2
    assert "where every file is read as a result row" in capsys.readouterr().err
    assert not target.exists()
    assert pandas.read_parquet(out / "results").shape[0] == 2


@pytest.mark.parametrize("per_call", [1, 2])
def test_ctrl_c_while_probing_leaves_no_running_marker(tmp_path, monkeypatch, capsys, per_call):
    # Ctrl-C in `probeserve run --runner local` printed "interrupted; committed results are
    # kept" but left running/.../{layer}.json of the item it was probing: `status` then
    # showed it as a stale running item until the next run removed it
    import probeserve.probe

    spec = tiny_spec(tmp_path, resources={"device": "cpu", "probes_per_call": per_call})
    write_checkpoints(spec, steps=(0,))
    real, calls = probeserve.probe.answer_probes, []

    def interrupted(*args, **kwargs):  # Ctrl-C while the second call trains
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(probeserve.probe, "answer_probes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_local(spec)
    assert len(results.load(str(tmp_path / "out"))) == per_call  # the first call's items
    assert [p for p in (tmp_path / "out" / "running").rglob("*") if p.is_file()] == []
    assert main(["status", str(tmp_path / "out")]) == 0
    assert "stale" not in capsys.readouterr().out


@pytest.mark.parametrize("command", [["plan", "{spec}"], ["query", "{out}", "--format", "csv"]])
def test_a_reader_that_stops_reading_gets_no_traceback(outputs, tmp_path, command):
    # `probeserve plan SPEC | head -2` ended in a BrokenPipeError traceback with exit 1
    spec = tiny_spec(outputs, output={"uri": str(outputs / "probes" / "a")})
    argv = [a.format(spec=write_spec(tmp_path, spec), out=spec.output.uri) for a in command]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    done = subprocess.run(
        [sys.executable, "-m", "probeserve.cli", *argv],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    os.close(write)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 128 + signal.SIGPIPE


@pytest.mark.parametrize("name", ["answer.parquet", "answer.csv", "answer.json", "ANSWER.PQ"])
def test_query_out_without_format_writes_what_its_extension_says(outputs, tmp_path, capsys, name):
    # `probeserve query OUT --out answer.parquet` wrote the terminal's text table into it, which
    # pandas.read_parquet (and read_csv, for answer.csv) could not read as the rows
    out = tmp_path / name
    assert main(["query", str(outputs / "probes" / "a"), "--out", str(out)]) == 0
    ext = name.lower().rsplit(".", 1)[1]
    read = {"parquet": pandas.read_parquet, "pq": pandas.read_parquet, "csv": pandas.read_csv}
    frame = read.get(ext, pandas.read_json)(out)
    assert len(frame) == 2 and "confusion" in frame.columns  # every column, as --format says


def test_query_format_that_its_out_extension_contradicts_is_refused(outputs, tmp_path, capsys):
    out = tmp_path / "answer.csv"
    assert main(["query", str(outputs / "probes" / "a"), "--format", "json", "--out", str(out)]) == 2
    assert "a .csv file, but --format json" in capsys.readouterr().err
    assert not out.exists()
    assert main(["query", str(outputs / "probes" / "a"), "--out", str(tmp_path / "answer.txt")]) == 0
    assert (tmp_path / "answer.txt").read_text().startswith("run ")  # no extension of a format: the table


@pytest.mark.parametrize(
    "argv",
    [
        ["watch", "{spec}", "--once", "--runner", "local", "--interval", "0"],  # a scan loop without pause
        ["watch", "{spec}", "--once", "--runner", "local", "--interval", "nan"],
        ["watch", "{spec}", "--once", "--runner", "local", "--page-size", "0"],
        ["watch", "{spec}", "--once", "--runner", "local", "--max-attempts", "0"],
        ["watch", "{spec}", "--once", "--runner", "local", "--claim-timeout", "-1"],
        ["report", "{out}", "--out", "{tmp}/r.html", "--refresh", "-5"],  # was written as content="-5"
    ],
    ids=lambda a: " ".join(a[-2:]),
)
def test_a_count_or_period_of_zero_or_less_is_refused_before_anything_runs(outputs, tmp_path, capsys, argv):
    # (with --once, so that without the check the daemon scans once and ends)
    spec = write_spec(tmp_path, tiny_spec(outputs, output={"uri": str(outputs / "probes" / "a")}))
    with pytest.raises(SystemExit) as exited:
        main([a.format(spec=spec, out=outputs / "probes" / "a", tmp=tmp_path) for a in argv])
    assert exited.value.code == 2
    assert f"argument {argv[-2]}: expected a number above 0" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]
