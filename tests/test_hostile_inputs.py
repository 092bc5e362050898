"""The red-team's bad specs and SQL (issue 9, items 6 and 7), played against the command line.

Every bad spec gets one line that names the field and exit 2, never a traceback; every query
that reaches past the results table (files, network, other databases, extensions, settings)
is refused with exit 2 and touches nothing. The integrator folds this file into
tests/test_hostile.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from probeserve.checkpoints import save_checkpoint
from probeserve.cli import main
from probeserve.models import tiny
from probeserve.runners.local import run_local
from probeserve.spec import spec_from_dict

GOOD = {
    "run": "h",
    "checkpoints": "{uri: ckpts}",
    "model": "{factory: tiny, kwargs: {input_dim: 6}}",
    "data": "{kind: gaussian, dim: 6, train_size: 100, val_size: 50, test_size: 50}",
    "output": "{uri: out}",
}


def spec_text(**sections: str) -> str:
    merged = {**GOOD, **sections}
    return "".join(f"{k}: {v}\n" for k, v in merged.items() if v is not None)


def probeserve(*args: str, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "probeserve", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]),
            **(env or {}),
        },
    )


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# --- the findings named in the issue, as the user met them: subprocesses ------------------

EVIL_FACTORY = """
import sys

import torch


def build(**kwargs):
    sys.exit(7)


class ExitsInForward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 2)

    def forward(self, x):
        sys.exit(5)


def exits_in_forward():
    return ExitsInForward()
"""

NAMED = [
    (
        "train_size 1e12",
        {"data": "{kind: gaussian, dim: 6, train_size: 1000000000000}"},
        "data.train_size: the gaussian data",
    ),
    ("dim 1e9", {"data": "{kind: gaussian, dim: 1000000000}"}, "data.dim: the gaussian data"),
    ("l2 inf", {"probe": "{l2: .inf}"}, "probe.l2: Input should be a finite number"),
    (
        "learning_rate inf",
        {"probe": "{learning_rate: .inf}"},
        "probe.learning_rate: Input should be a finite number",
    ),
    (
        "learning_rate nan",
        {"probe": "{learning_rate: .nan}"},
        "probe.learning_rate: Input should be a finite number",
    ),
    (
        "torch_threads 100000",
        {"resources": "{torch_threads: 100000}"},
        "resources.torch_threads: 100000 is more than",
    ),
    (
        "factory calls sys.exit",
        {"model": "{factory: 'evil:build'}"},
        "model.factory 'evil:build': called sys.exit(7)",
    ),
    (
        "forward calls sys.exit",
        {"model": "{factory: 'evil:exits_in_forward'}"},
        "model.factory 'evil:exits_in_forward': called sys.exit(5) while running the model's forward pass",
    ),
    (
        "torch fails with C++ frames",
        {"model": "{factory: 'torch.nn:Linear', kwargs: {in_features: 6, out_features: -2}}"},
        "model.factory 'torch.nn:Linear' raised RuntimeError: Trying to create tensor with negative dimension",
    ),
    ("empty output.uri", {"output": "{uri: ''}"}, "output.uri: empty"),
    ("ftp output.uri", {"output": "{uri: 'ftp://host/probes'}"}, "output.uri: unsupported scheme 'ftp://'"),
    (
        "ftp checkpoints.uri",
        {"checkpoints": "{uri: 'ftp://host/ckpts'}"},
        "checkpoints.uri: unsupported scheme",
    ),
    (
        "ftp data.uri",
        {"data": "{kind: parquet, uri: 'ftp://host/d.parquet'}"},
        "data.uri: unsupported scheme",
    ),
]


@pytest.mark.parametrize(("name", "sections", "message"), NAMED, ids=[n for n, _, _ in NAMED])
def test_named_bad_specs_get_one_line_naming_the_field(tmp_path, name, sections, message):
    (tmp_path / "evil.py").write_text(EVIL_FACTORY)
    (tmp_path / "spec.yaml").write_text(spec_text(**sections))
    # torch's C++ frames are in every error message with this set
    done = probeserve(
        "validate",
        "spec.yaml",
        cwd=tmp_path,
        env={"TORCH_SHOW_CPP_STACKTRACES": "1", "TORCH_DISABLE_ADDR2LINE": "1"},
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    line = one_line(done.stderr)
    assert line.startswith(f"error: spec.yaml: {message}"), line
    assert "C++" not in line and "frame #" not in line and "enforce fail" not in line


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")  # 9**9 values
    (tmp_path / "spec.yaml").write_text("\n".join(levels) + "\n" + spec_text())
    done = probeserve("validate", "spec.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert one_line(done.stderr).startswith(
        "error: spec.yaml: cannot parse spec.yaml: YAML aliases expand to"
    )


def test_a_step_regex_whose_group_reads_no_number_is_blamed_on_it(tmp_path):
    save_checkpoint(tiny(input_dim=6), str(tmp_path / "ckpts"), 3)
    (tmp_path / "spec.yaml").write_text(spec_text(checkpoints="{uri: ckpts, step_regex: '(step)'}"))
    done = probeserve("plan", "spec.yaml", cwd=tmp_path)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.startswith("error: checkpoints.step_regex: '(step)' reads no step number from the 1 key(s)")
    assert "checkpoints.uri" not in line
    (tmp_path / "spec.yaml").write_text(spec_text(checkpoints="{uri: ckpts, steps: [5]}"))
    done = probeserve("plan", "spec.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert one_line(done.stderr) == (
        f"error: checkpoints.steps: none of [5] is the step of a checkpoint under {tmp_path / 'ckpts'}; "
        "there are steps 3"
    )


# --- about fifty more, in-process (same code path, without 50 interpreter starts) ---------

MORE = [
    ({"data": "{kind: gaussian, dim: -1}"}, "data.dim: Input should be greater than 0"),
    ({"data": "{kind: gaussian, train_size: lots}"}, "data.train_size: Input should be a valid integer"),
    (
        {"data": "{kind: gaussian, train_size: 1e6}"},
        "data.train_size: Input should be a valid integer, unable to parse string as an integer (YAML reads 1e6 as text: write 1000000)",
    ),
    ({"data": "{kind: gaussian, train_size: yes}"}, "data.train_size: expected a number, got true"),
    (
        {"data": "{kind: gaussian, train_size: 10.5}"},
        "data.train_size: Input should be a valid integer, got a number with a fractional part",
    ),
    ({"data": "{kind: gaussian, val_size: 0}"}, "data.val_size: Input should be greater than 0"),
    ({"data": "{kind: gaussian, seed: []}"}, "data.seed: Input should be a valid integer"),
    ({"data": "{kind: imagenet}"}, "data.kind: 'imagenet' is not one of"),
    ({"data": "{dim: 3}"}, "data.kind: required, one of"),
    ({"data": "[1, 2]"}, "data: expected a mapping of fields, got a list"),
    ({"data": "{kind: idx, scale: .nan}"}, "data.scale: Input should be a finite number"),
    ({"data": "{kind: idx, path: ''}"}, "data.path: empty"),
    ({"data": "{kind: parquet, uri: 's3:///d.parquet'}"}, "data.uri: an s3:// URI needs a bucket"),
    (
        {"data": "{kind: parquet, uri: d.parquet, shape: [-1, 2]}"},
        "data.shape[0]: Input should be greater than 0",
    ),
    ({"probe": "{l2: -1}"}, "probe.l2: Input should be greater than or equal to 0"),
    ({"probe": "{l2: 1.0e+400}"}, "probe.l2: Input should be a finite number"),
    ({"probe": "{tolerance: .nan}"}, "probe.tolerance: Input should be a finite number"),
    ({"probe": "{batch_size: -1}"}, "probe.batch_size: Input should be greater than 0"),
    ({"probe": "{patience: 0}"}, "probe.patience: Input should be greater than 0"),
    (
        {"probe": "{seed: 1000000000000000000000000000000}"},
        "probe.seed: 1000000000000000000000000000000 is outside torch's seed range",
    ),
    ({"probe": "{solver: sgd}"}, "probe.solver: Input should be 'lbfgs' or 'adam'"),
    ({"probe": "fast"}, "probe: expected a mapping of fields, got the text 'fast'"),
    ({"probe": "{l3: 0.1}"}, "probe.l3: unknown field"),
    (
        {"resources": "{num_cpus_per_probe: .inf}"},
        "resources.num_cpus_per_probe: Input should be a finite number",
    ),
    (
        {"resources": "{num_gpus_per_probe: .nan}"},
        "resources.num_gpus_per_probe: Input should be a finite number",
    ),
    ({"resources": "{torch_threads: 0}"}, "resources.torch_threads: Input should be greater than 0"),
    ({"resources": "{device: gpu}"}, "resources.device: Input should be 'auto', 'cpu' or 'cuda'"),
    ({"checkpoints": "{uri: ''}"}, "checkpoints.uri: empty"),
    ({"checkpoints": "{uri: 'http://host/c'}"}, "checkpoints.uri: unsupported scheme 'http://'"),
    ({"checkpoints": "{uri: 'file://host/c'}"}, "checkpoints.uri: a file:// URI names a local path"),
    (
        {"checkpoints": "{uri: ckpts, step_regex: '(['}"},
        "checkpoints.step_regex: not a valid regular expression",
    ),
    (
        {"checkpoints": "{uri: ckpts, step_regex: 'step'}"},
        "checkpoints.step_regex: needs one capturing group",
    ),
    (
        {"checkpoints": "{uri: ckpts, steps: [1, null]}"},
        "checkpoints.steps[1]: Input should be a valid integer",
    ),
    (
        {"checkpoints": "{uri: ckpts, steps: [-1]}"},
        "checkpoints.steps[0]: Input should be greater than or equal to 0",
    ),
    ({"checkpoints": "{uri: ckpts, steps: []}"}, "checkpoints.steps: an empty list probes no checkpoint"),
    ({"checkpoints": "{uri: ckpts, weights: ''}"}, "checkpoints.weights: an empty glob matches nothing"),
    ({"checkpoints": "{uri: ckpts, marker: ''}"}, "checkpoints.marker: empty"),
    (
        {"checkpoints": "{uri: ckpts, marker: '../../etc/x'}"},
        "checkpoints.marker: the marker is a key relative",
    ),
    ({"checkpoints": "{uri: ckpts, marker: '{step}.done'}"}, "checkpoints.marker: only {stem} may be used"),
    ({"checkpoints": "{uri: ckpts, max_bytes: -1}"}, "checkpoints.max_bytes: Input should be greater than 0"),
    (
        {"checkpoints": "{uri: ckpts, stable_seconds: .inf}"},
        "checkpoints.stable_seconds: Input should be a finite number",
    ),
    ({"output": "{uri: null}"}, "output.uri: Input should be a valid string"),
    ({"output": "{uri: 3}"}, "output.uri: Input should be a valid string (put it in quotes)"),
    ({"output": '{uri: "/tmp/a\\0b"}'}, "output.uri: contains a control character"),
    ({"output": "{uri: 's3://key:secret@bucket/p'}"}, "output.uri: credentials do not go in a URI"),
    ({"output": "{uri: out, dtype: int8}"}, "output.dtype: Input should be 'float32' or 'float16'"),
    ({"storage": "{s3_endpoint: 'ftp://x'}"}, "storage.s3_endpoint: expected a URL like"),
    ({"layers": "{include: []}"}, "layers.include: List should have at least 1 item"),
    ({"layers": "{include: ['']}"}, "layers.include[0]: String should have at least 1 character"),
    ({"layers": "{include: [fc1, null]}"}, "layers.include[1]: Input should be a valid string"),
    ({"layers": "{include: fc1}"}, "layers.include: Input should be a valid list"),
    ({"layers": "{include: [fc9]}"}, "layers.include[0]: 'fc9' matches no probe point. Did you mean"),
    ({"layers": "{exclude: ['*']}"}, "layers.exclude: include ['*'] and exclude ['*'] leave no probe point"),
    ({"model": "{factory: ''}"}, "model.factory: empty"),
    ({"model": "{factory: '..x:y'}"}, "model.factory: '..x:y' is not of the form"),
    ({"model": "{factory: resnet}"}, "model.factory: unknown built-in model 'resnet'"),
    (
        {"model": "{factory: 'модуль:функция'}"},
        "model.factory 'модуль:функция': cannot import module 'модуль'",
    ),
    (
        {"model": "{factory: tiny, kwargs: {input_dim: 6, hiden: 3}}"},
        "model.kwargs.hiden: factory 'tiny' does not take 'hiden' (did you mean 'hidden'?)",
    ),
    (
        {"model": "{factory: tiny, kwargs: {input_dim: 6, hidden: -3}}"},
        "model.kwargs.hidden: factory 'tiny' rejected its arguments: hidden must be >= 1",
    ),
    (
        {"model": "{factory: tiny, kwargs: {input_dim: 6, hidden: 100000000000}}"},
        "model.kwargs.hidden: factory 'tiny' rejected its arguments: a tiny model",
    ),
    ({"model": "{factory: tiny, kwargs: [1]}"}, "model.kwargs: expected a mapping of fields, got a list"),
    (
        {"model": "{factory: tiny, kwargs: {input_dim: !!binary aGk=}}"},
        "model.kwargs.input_dim: binary data (!!binary) is not a spec value",
    ),
    (
        {"model": "{factory: tiny, kwargs: {input_dim: 6}}\nmodel: {factory: mlp}"},
        "cannot parse spec.yaml: key 'model' appears twice",
    ),
    ({"run": "ラン"}, "run: 'ラン' is not a run name"),
    ({"run": "''"}, "run: '' is not a run name"),
    ({"run": "2024"}, "run: Input should be a valid string (put it in quotes)"),
    ({"reducer": "{kind: subset}"}, "reducer: reducer kind 'subset' needs max_features"),
    ({"reducer": "{kind: avgpool, max_features: 0}"}, "reducer.max_features: Input should be greater than 0"),
    ({"extra": "1"}, "extra: unknown field"),
    ({"probe": ""}, "probe: expected a mapping of fields, got nothing (a section header without fields?)"),
    ({"data": "null"}, "data: expected a mapping of fields, got nothing"),
    (
        {"x": "!!python/object/apply:os.system ['touch pwned']"},
        "cannot parse spec.yaml: could not determine a constructor",
    ),
    ({"a": "&a [1, *a]"}, "cannot parse spec.yaml: a YAML alias refers to a value that contains it"),
]


@pytest.mark.parametrize(
    ("sections", "message"), MORE, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(MORE)]
)
def test_more_bad_specs_get_one_line_naming_the_field(tmp_path, monkeypatch, capsys, sections, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(spec_text(**sections))
    assert main(["validate", "spec.yaml"]) == 2
    out = capsys.readouterr()
    line = one_line(out.err)
    assert line.startswith(f"error: spec.yaml: {message}"), line
    assert "secret" not in line
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_the_good_spec_of_these_tests_is_good(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(spec_text())
    assert main(["validate", "spec.yaml"]) == 0, capsys.readouterr().err


# --- SQL that reaches past the results table ----------------------------------------------


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("hostile-sql")
    spec = spec_from_dict(
        {
            "checkpoints": {"uri": str(root / "ckpts")},
            "model": {"factory": "tiny", "kwargs": {"input_dim": 6}},
            "layers": {"include": ["input"]},
            "data": {"kind": "gaussian", "dim": 6, "train_size": 100, "val_size": 50, "test_size": 50},
            "probe": {"max_epochs": 10},
            "output": {"uri": str(root / "out")},
        }
    )
    torch.manual_seed(0)
    save_checkpoint(tiny(input_dim=6), spec.checkpoints.uri, 0)
    assert run_local(spec).exit_code == 0
    return spec.output.uri


ATTACKS = {
    "read a file": "SELECT * FROM read_csv('{secret}')",
    "read a file as text": "SELECT * FROM read_text('{secret}')",
    "read a file as a blob": "SELECT * FROM read_blob('{secret}')",
    "list files": "SELECT * FROM glob('{dir}/*')",
    "sniff a file": "SELECT * FROM sniff_csv('{secret}')",
    "write a file": "COPY (SELECT 1) TO '{dir}/pwned.csv'",
    "export the database": "EXPORT DATABASE '{dir}/pwned'",
    "attach a database": "ATTACH '{dir}/pwned.db' AS x",
    "install an extension": "INSTALL httpfs",
    "load an extension": "LOAD httpfs",
    "read a URL": "SELECT * FROM read_parquet('https://example.com/x.parquet')",
    "turn access back on": "SET enable_external_access = true",
    "unlock the configuration": "RESET lock_configuration",
    "read a Python variable": 'SELECT * FROM "table"',
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_query_sees_the_results_table_and_nothing_else(output, tmp_path, attack):
    (tmp_path / "secret.csv").write_text("token\nSECRET-VALUE\n")
    sql = ATTACKS[attack].format(secret=tmp_path / "secret.csv", dir=tmp_path)
    done = probeserve("query", output, "--sql", sql, "--format", "csv", cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    line = one_line(done.stderr)
    assert line.startswith("error: --sql: ")
    if attack != "read a Python variable":  # refused by the sandbox, not by a missing network
        assert line.endswith("(a query sees the results table only; --allow-external-access lifts this)")
    else:
        assert "Table with name table does not exist" in line
    assert "SECRET-VALUE" not in done.stdout + done.stderr
    assert sorted(os.listdir(tmp_path)) == ["secret.csv"]  # nothing written


def test_allow_external_access_lets_a_user_join_their_own_file(output, tmp_path):
    (tmp_path / "names.csv").write_text("layer,nice\ninput,the raw input\n")
    sql = f"SELECT r.layer, n.nice FROM results r JOIN read_csv('{tmp_path / 'names.csv'}') n USING (layer)"
    done = probeserve("query", output, "--sql", sql, "--format", "csv", cwd=tmp_path)
    assert done.returncode == 2 and "--allow-external-access lifts this" in done.stderr
    done = probeserve(
        "query", output, "--sql", sql, "--format", "csv", "--allow-external-access", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['"layer","nice"', '"input","the raw input"']
