"""The core, end to end on one machine: checkpoints in storage to committed results."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import PROBESERVE, acme_folder, s3_tiny_spec, tiny_spec, write_checkpoints, write_spec

from probeserve import results
from probeserve.checkpoints import save_checkpoint
from probeserve.cli import main
from probeserve.errors import SpecError
from probeserve.models import build_model
from probeserve.runners.local import run_local
from probeserve.spec import ModelSpec
from probeserve.storage import open_storage
from probeserve.sweep import Sweep, manifest_key


def test_sweep_commits_one_row_per_item_and_rerun_does_nothing(tmp_path):
    spec = tiny_spec(tmp_path)
    write_checkpoints(spec)
    summary = run_local(spec)
    assert summary.ok == 8 and not summary.failed and summary.exit_code == 0
    table = results.load(spec.output.uri)
    assert table.num_rows == 8
    rows = table.to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    assert [r["layer"] for r in rows[:4]] == ["input", "fc1", "act", "fc2"]
    assert [r["layer_index"] for r in rows[:4]] == sorted(r["layer_index"] for r in rows[:4])
    # the input layer of the gaussian problem is linearly separable by construction
    inp = [r for r in rows if r["layer"] == "input"]
    assert all(r["test_error"] < 0.1 < r["chance_error"] for r in inp)
    assert all(r["n_train"] == 600 and r["n_val"] == 200 and r["n_test"] == 200 for r in rows)
    keys = results.result_keys(open_storage(spec.output.uri), "t")
    assert len(keys) == 8
    # shards are self-describing Parquet that plain pyarrow reads
    shard = next((tmp_path / "out" / "activations").rglob("part-00000.parquet"))
    meta = pq.read_schema(shard).metadata
    assert meta[b"probeserve.run"] == b"t" and b"probeserve.layer" in meta
    before = {k: os.stat(tmp_path / "out" / k).st_mtime_ns for k in keys}
    again = run_local(spec)
    assert again.ok == 0 and again.skipped_done == 8 and not again.failed
    assert before == {k: os.stat(tmp_path / "out" / k).st_mtime_ns for k in keys}


def test_interrupted_run_resumes_only_missing_items(tmp_path, monkeypatch):
    spec = tiny_spec(tmp_path)
    write_checkpoints(spec)
    import probeserve.sweep as sweep_mod

    calls = {"n": 0}
    real_probe = sweep_mod.probe

    def dying_probe(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # like a kill between two items
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(sweep_mod, "probe", dying_probe)
    with pytest.raises(KeyboardInterrupt):
        run_local(spec)
    assert results.load(spec.output.uri).num_rows == 2
    monkeypatch.setattr(sweep_mod, "probe", real_probe)
    summary = run_local(spec)
    assert summary.skipped_done == 2 and summary.ok == 6
    assert results.load(spec.output.uri).num_rows == 8


def test_corrupt_checkpoint_fails_its_items_and_others_go_on(tmp_path, capsys):
    spec = tiny_spec(tmp_path)
    write_checkpoints(spec)
    bad = os.path.join(spec.checkpoints.uri, "step=000000010", "model.safetensors")
    with open(bad, "r+b") as f:
        f.truncate(100)
    summary = run_local(spec)
    assert summary.ok == 4 and len(summary.failed) == 4 and summary.exit_code == 1
    rows = results.load(spec.output.uri).to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["step"] for r in failed} == {10}
    assert all("step=000000010/model.safetensors" in r["error"] for r in failed)
    # rerun retries only the failed items
    again = run_local(spec)
    assert again.skipped_done == 4 and len(again.failed) == 4


def test_checkpoint_without_marker_is_skipped_and_reported(tmp_path):
    spec = tiny_spec(tmp_path)
    write_checkpoints(spec)
    os.unlink(os.path.join(spec.checkpoints.uri, "step=000000010", "COMPLETE"))
    summary = run_local(spec)
    assert summary.incomplete == ["step=000000010/model.safetensors"]
    assert {r["step"] for r in results.load(spec.output.uri).to_pylist()} == {0}


def test_run_name_reused_by_another_spec_is_refused(tmp_path):
    spec = tiny_spec(tmp_path)
    write_checkpoints(spec, steps=(0,))
    run_local(spec)
    other = tiny_spec(tmp_path, probe={"l2": 0.5})
    with pytest.raises(SpecError, match="different spec"):
        run_local(other)


def test_adding_a_layer_to_a_finished_run_extracts_only_it(tmp_path):
    spec = tiny_spec(tmp_path, layers={"include": ["fc1"]})
    write_checkpoints(spec, steps=(0,))
    run_local(spec)
    more = tiny_spec(tmp_path, layers={"include": ["fc1", "fc2"]})
    summary = run_local(more)
    assert summary.ok == 1 and summary.skipped_done == 1


@pytest.mark.integration
def test_sweep_on_s3(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", s3_server.endpoint)
    bucket = s3_server.new_bucket()
    spec = s3_tiny_spec(tmp_path, bucket)
    write_checkpoints(spec, steps=(0,))
    summary = run_local(spec)
    assert summary.ok == 2 and not summary.failed
    table = results.load(f"s3://{bucket}/probes")
    assert table.column("status").to_pylist() == ["ok", "ok"]


# ---- the command line: bad input gets one clear line and exit 2 ----


def test_cli_validate_reports_field_paths(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "checkpoints: {uri: c}\nmodel: {factory: tiny}\ndata: {kind: gaussian}\noutput: {uri: o}\nprobe: {patience: soon, lr: 1}\n"
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "probe.patience" in err and "probe.lr: unknown field" in err
    assert "Traceback" not in err


def test_cli_unknown_layer_lists_available_names(tmp_path, capsys):
    spec = tiny_spec(tmp_path, layers={"include": ["fc9"]})
    write_checkpoints(spec, steps=(0,))
    assert main(["run", write_spec(tmp_path, spec), "--runner", "local"]) == 2
    err = capsys.readouterr().err
    assert "fc9" in err and "fc1" in err and "Traceback" not in err


def test_cli_no_checkpoints_and_missing_prefix(tmp_path, capsys):
    spec = tiny_spec(tmp_path)
    assert main(["run", write_spec(tmp_path, spec), "--runner", "local"]) == 2
    assert "does not exist" in capsys.readouterr().err
    os.makedirs(spec.checkpoints.uri)
    assert main(["plan", write_spec(tmp_path, spec)]) == 2
    assert "no checkpoints" in capsys.readouterr().err


def test_cli_missing_label_column_and_single_class(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
    table = pa.table({"x": list(x), "target": np.zeros(300, dtype=np.int64)})
    pq.write_table(table, tmp_path / "data.parquet")
    data = {"kind": "parquet", "uri": str(tmp_path / "data.parquet"), "val_size": 50, "test_size": 50}
    spec = tiny_spec(tmp_path, data=data)
    write_checkpoints(spec, steps=(0,))
    assert main(["run", write_spec(tmp_path, spec), "--runner", "local"]) == 2
    err = capsys.readouterr().err
    assert "label" in err and "target" in err
    one_class = tiny_spec(tmp_path, data={**data, "label_column": "target"})
    assert main(["run", write_spec(tmp_path, one_class), "--runner", "local"]) == 2
    assert "single class" in capsys.readouterr().err


def test_a_damaged_result_file_is_refused_by_query_and_redone_by_run(tmp_path, capsys):
    spec = tiny_spec(tmp_path, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec)
    path = write_spec(tmp_path, spec)
    assert main(["run", path, "--runner", "local"]) == 0
    damaged = tmp_path / "out" / results.result_key("t", "step=000000010/model.safetensors", 10, "fc2")
    damaged.write_bytes(b"PAR1 cut short")
    capsys.readouterr()
    assert main(["query", spec.output.uri]) == 2  # the table is not read past it ...
    err = capsys.readouterr().err
    assert "fc2.parquet: not a probeserve result file" in err and len(err.strip().splitlines()) == 1
    assert main(["plan", path]) == 0  # ... but a run does the item again
    assert "3 done" in capsys.readouterr().out
    summary = run_local(spec)
    assert summary.ok == 1 and summary.skipped_done == 3 and not summary.failed
    assert {r["status"] for r in results.load(spec.output.uri).to_pylist()} == {"ok"}


def test_damaged_run_records_are_named_or_redone(tmp_path, capsys):
    spec = tiny_spec(tmp_path, layers={"include": ["input", "fc2"]}, output={"uri": str(tmp_path / "o")})
    write_checkpoints(spec)
    path = write_spec(tmp_path, spec)
    (tmp_path / "o").write_text("a file where the output folder should be")
    for cmd in ("plan", "run"):
        assert main([cmd, path, "--runner", "local"] if cmd == "run" else [cmd, path]) == 2
        err = capsys.readouterr().err
        assert f"output.uri: {tmp_path / 'o'} is a file" in err and "Traceback" not in err
    (tmp_path / "o").unlink()
    for missing in (["query", str(tmp_path / "o")], ["status", str(tmp_path / "o")]):
        assert main(missing) == 2
        assert f"{tmp_path / 'o'}: no such output folder" in capsys.readouterr().err
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"keep_activations": True})})
    path = write_spec(tmp_path, spec)
    assert main(["run", path, "--runner", "local"]) == 0
    # a damaged manifest of a layer whose row is gone: that layer is extracted again
    sweep = Sweep(spec)
    ckpt = sweep.discover().complete[0]
    (tmp_path / "o" / manifest_key("t", ckpt, "fc2")).write_text("")
    (tmp_path / "o" / results.result_key("t", ckpt.key, ckpt.step, "fc2")).unlink()
    summary = run_local(spec)
    assert summary.ok == 1 and not summary.failed
    assert sweep.manifest(ckpt, "fc2")["layer"] == "fc2"
    # a damaged record of the run's spec: refused, naming it
    (tmp_path / "o" / "runs" / "t" / "spec.json").write_text("{cut")
    assert main(["run", path, "--runner", "local"]) == 2
    err = capsys.readouterr().err
    assert "runs/t/spec.json: damaged" in err and "Traceback" not in err
    assert main(["status", str(tmp_path / "o")]) == 1
    assert "runs/t/spec.json: damaged" in capsys.readouterr().out


def test_cli_run_plan_query(tmp_path, capsys):
    spec = tiny_spec(tmp_path, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec)
    path = write_spec(tmp_path, spec)
    assert main(["plan", path]) == 0
    assert "4 pending" in capsys.readouterr().out
    assert main(["run", path, "--runner", "local"]) == 0
    assert main(["plan", path]) == 0
    assert "4 done" in capsys.readouterr().out
    out = spec.output.uri
    assert (
        main(
            [
                "query",
                out,
                "--sql",
                "SELECT count(*) AS n FROM results WHERE status = 'ok'",
                "--format",
                "json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == [{"n": 4}]
    assert main(["query", out, "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith('"run","spec_hash","checkpoint","step","layer"')  # every column
    assert main(["query", out, "--sql", "SELEC nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --sql:") and len(err.strip().splitlines()) == 1


def test_cli_layers_lists_probe_points(tmp_path, capsys):
    spec = tiny_spec(tmp_path, reducer={"kind": "subset", "max_features": 4})
    assert main(["layers", write_spec(tmp_path, spec)]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "input" in out and "after_reducer" in out


def test_sweep_object_pickles_without_caches(tmp_path):
    import pickle

    spec = tiny_spec(tmp_path)
    sweep = Sweep(spec)
    _ = sweep.output
    clone = pickle.loads(pickle.dumps(sweep))
    assert clone.spec == spec and "output" not in clone.__dict__


@pytest.mark.integration
def test_cli_missing_bucket_is_named(s3_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", s3_server.endpoint)
    spec = tiny_spec(tmp_path, checkpoints={"uri": "s3://no-such-bucket-here/ckpts"})
    assert main(["plan", write_spec(tmp_path, spec)]) == 2
    err = capsys.readouterr().err
    assert "s3://no-such-bucket-here/ckpts does not exist" in err and "Traceback" not in err


def test_cli_unsupported_checkpoint_file_fails_its_items(tmp_path, capsys):
    spec = tiny_spec(
        tmp_path, checkpoints={"uri": str(tmp_path / "ckpts"), "weights": "*/model.*", "completeness": "none"}
    )
    write_checkpoints(spec, steps=(0,))
    (tmp_path / "ckpts" / "step=5").mkdir()
    (tmp_path / "ckpts" / "step=5" / "model.onnx").write_bytes(b"\x08\x07onnx-ish bytes")
    assert main(["run", write_spec(tmp_path, spec), "--runner", "local"]) == 1
    captured = capsys.readouterr()
    assert "unsupported checkpoint format" in captured.err and "step=5/model.onnx" in captured.err
    rows = results.load(spec.output.uri).to_pylist()
    assert {(r["step"], r["status"]) for r in rows} == {(0, "ok"), (5, "failed")}


def test_cli_status_reads_progress_from_storage(tmp_path, capsys):
    spec = tiny_spec(tmp_path, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0, 10, 20))
    run_local(spec)
    # a new checkpoint arrives and one item is being probed somewhere right now
    write_checkpoints(spec, steps=(30,))
    out = open_storage(spec.output.uri)
    from probeserve.checkpoints import discover
    from probeserve.sweep import running_key

    new = next(
        c for c in discover(open_storage(spec.checkpoints.uri), spec.checkpoints).complete if c.step == 30
    )
    out.publish_bytes(running_key("t", new, "fc2"), b"{}")
    assert main(["status", spec.output.uri]) == 0
    text = capsys.readouterr().out
    header, _, row = text.strip().splitlines()[:3]
    assert header.split() == ["run", "checkpoints", "items", "done", "failed", "running", "pending"]
    assert row.split() == ["t", "4", "8", "6", "0", "1", "1"]


def test_status_reads_a_spec_from_another_version_and_reports_a_broken_run(tmp_path, capsys):
    spec = tiny_spec(tmp_path, layers={"include": ["input"]})
    write_checkpoints(spec, steps=(0, 10))
    run_local(spec)
    out = open_storage(spec.output.uri)
    key = results.run_key("t", "spec.json")
    recorded = json.loads(out.read_bytes(key))
    recorded["spec"]["probe"]["a_field_of_a_newer_version"] = 1  # status does not need it
    recorded["spec"]["checkpoints"]["another_new_field"] = "x"  # nor this one, in a section it reads
    out.publish_bytes(key, json.dumps(recorded).encode())
    # a second run that stopped between recording its spec and its layers
    out.publish_bytes(results.run_key("u", "spec.json"), json.dumps(recorded).encode())
    assert main(["status", spec.output.uri]) == 1
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == [
        "run",
        "checkpoints",
        "items",
        "done",
        "failed",
        "running",
        "pending",
        "error",
    ]
    assert lines[2].split() == ["t", "2", "2", "2", "0", "0", "0", "-"]
    assert lines[3].startswith("u ") and "layers.json is missing" in lines[3]
    assert "run u: cannot read its records" in captured.err


def test_a_finished_item_is_never_turned_into_a_failure(tmp_path):
    from probeserve.sweep import commit_unless_done, probe_and_commit

    spec = tiny_spec(
        tmp_path,
        layers={"include": ["fc1"]},
        output={"uri": str(tmp_path / "out"), "keep_activations": False},
    )
    write_checkpoints(spec, steps=(0,))
    run_local(spec)
    sweep = Sweep(spec)
    plan = sweep.plan()
    ((item, status),) = plan.items
    assert status == "ok" and sweep.manifest(item.checkpoint, "fc1") is None  # shards were deleted
    # a second runner that planned this item before it was committed now gets to it
    row = probe_and_commit(sweep, item, device="cpu")
    assert row["status"] == "ok"
    failed = sweep.failed_row(item.checkpoint, "fc1", item.layer_index, "late failure", 0.0)
    assert commit_unless_done(sweep, failed)["status"] == "ok"
    assert results.load(spec.output.uri).column("status").to_pylist() == ["ok"]


@pytest.mark.integration
def test_cli_query_parquet_out_and_on_s3(s3_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", s3_server.endpoint)
    bucket = s3_server.new_bucket()
    spec = tiny_spec(tmp_path, output={"uri": f"s3://{bucket}/probes"}, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0,))
    run_local(spec)
    uri = f"s3://{bucket}/probes"
    sql = "SELECT layer, test_error FROM results ORDER BY layer_index"
    assert main(["query", uri, "--sql", sql, "--format", "json"]) == 0
    assert [r["layer"] for r in json.loads(capsys.readouterr().out)] == ["input", "fc2"]
    assert (
        main(["query", uri, "--sql", sql, "--format", "parquet", "--out", str(tmp_path / "a.parquet")]) == 0
    )
    assert pq.read_table(tmp_path / "a.parquet").column("layer").to_pylist() == ["input", "fc2"]
    assert main(["query", uri, "--format", "parquet"]) == 2
    assert "--out" in capsys.readouterr().err
    # a prefix that holds nothing is a typo, as a local folder that does not exist is
    assert main(["query", f"s3://{bucket}/empty", "--format", "csv"]) == 2
    assert "no such output (no object under this prefix)" in capsys.readouterr().err
    # a run the output does not hold is named, with the runs it does hold ("no results yet for
    # run 'nope'", exit 0, said the run had not finished anything yet)
    assert main(["query", uri, "--run", "nope"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --run nope: no such run under {uri}; runs there: t"


def test_a_layer_that_overflows_float16_fails_alone(tmp_path):
    spec = tiny_spec(tmp_path, output={"uri": str(tmp_path / "out"), "dtype": "float16"})
    torch.manual_seed(1)
    model = build_model(ModelSpec(**spec.model.model_dump()))
    with torch.no_grad():
        model.fc2.weight.mul_(1e6)  # logits far past float16's 65504; fc1 and act stay small
    save_checkpoint(model, spec.checkpoints.uri, 0)
    summary = run_local(spec)
    rows = {r["layer"]: r for r in results.load(spec.output.uri).to_pylist()}
    assert {k: r["status"] for k, r in rows.items()} == {
        "input": "ok",
        "fc1": "ok",
        "act": "ok",
        "fc2": "failed",
    }
    assert "overflow float16" in rows["fc2"]["error"] and "output.dtype: float32" in rows["fc2"]["error"]
    assert summary.exit_code != 0


PAGE_FAULTS = """
import json, os, resource, shutil, sys
import numpy as np, torch
import probeserve.sweep as sw
from probeserve.checkpoints import save_checkpoint
from probeserve.data import write_idx
from probeserve.models import build_model
from probeserve.spec import spec_from_dict

root, tuned = sys.argv[1], sys.argv[2] == "tuned"
if not tuned:
    sw.keep_freed_memory = lambda: False  # the control: glibc's own behaviour
os.makedirs(f"{root}/data")
rng = np.random.default_rng(0)
for prefix, n in (("train", 1500), ("t10k", 300)):
    write_idx(f"{root}/data/{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    write_idx(f"{root}/data/{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
spec = spec_from_dict({
    "checkpoints": {"uri": f"{root}/ckpts"}, "model": {"factory": "mnist_convnet"},
    "reducer": {"kind": "subset", "max_features": 256},
    "data": {"kind": "idx", "path": f"{root}/data", "val_size": 300},
    "output": {"uri": f"{root}/out"}, "resources": {"extract_batch_size": 256, "torch_threads": 1},
})
torch.manual_seed(0)
save_checkpoint(build_model(spec.model), spec.checkpoints.uri, 0)
sweep = sw.Sweep(spec)
ckpt = sweep.discover().complete[0]
faults = []
for _ in range(6):
    shutil.rmtree(f"{root}/out/activations", ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert not sw.extract(sweep, ckpt, [p.name for p in sweep.points])
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_extraction_does_not_fault_its_activation_memory_in_again_every_pass(tmp_path):
    # glibc hands freed activation blocks back to the OS between batches unless told not to;
    # every page then faults in again. The control run shows that it would here.
    counts = {}
    for mode in ("control", "tuned"):
        proc = subprocess.run(
            [sys.executable, "-c", PAGE_FAULTS, str(tmp_path / mode), mode],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    # the first pass grows the heap in both; after it, a pass now and then still takes a few
    # thousand faults when the tuned heap grows, so the typical pass is what is compared
    control, tuned = statistics.median(counts["control"][1:]), statistics.median(counts["tuned"][1:])
    assert control > 5000, counts  # the faults this guards against do happen here
    assert tuned < control / 4, counts


# ---- a user's own model, kept beside the spec ----


def test_a_model_beside_the_spec_is_importable_from_every_command(tmp_path):
    # as the user met it: the installed `probeserve` script, started in the folder that holds
    # acme_nets/ (Python puts the script's own folder on the path, not this one)
    folder = acme_folder(tmp_path)
    commands = [
        ["validate", "spec.json"],
        ["layers", "spec.json"],
        ["plan", "spec.json"],
        ["run", "spec.json", "--runner", "local"],
        ["watch", "spec.json", "--runner", "local", "--once", "--set", "run=acme-watched"],
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for args in commands:
        proc = subprocess.run(
            [PROBESERVE, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        assert "cannot import" not in proc.stderr
    rows = results.load(str(folder / "out")).to_pylist()
    assert sorted((r["run"], r["layer"], r["status"]) for r in rows) == [
        ("acme", "fc2", "ok"),
        ("acme", "input", "ok"),
        ("acme-watched", "fc2", "ok"),
        ("acme-watched", "input", "ok"),
    ]
