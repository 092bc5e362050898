"""The spec: defaults, validation errors with field paths, overrides, hashing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from probeserve.errors import SpecError
from probeserve.spec import dump_spec, load_spec, spec_from_dict

BASE = {
    "checkpoints": {"uri": "ckpts"},
    "model": {"factory": "tiny"},
    "data": {"kind": "gaussian", "dim": 8},
    "output": {"uri": "out"},
}


def test_minimal_spec_fills_defaults():
    spec = spec_from_dict(BASE)
    assert spec.run == "default"
    assert spec.layers.include == ["*"]
    assert spec.probe.solver == "lbfgs"
    assert spec.checkpoints.marker == "COMPLETE"
    assert "probe:" in dump_spec(spec)


def test_unknown_field_is_named():
    bad = {**BASE, "probe": {"l3": 0.1}}
    with pytest.raises(SpecError) as info:
        spec_from_dict(bad)
    assert "probe.l3: unknown field" in str(info.value)


def test_wrong_type_and_every_error_listed():
    bad = {**BASE, "probe": {"max_epochs": "many"}, "reducer": {"kind": "subset"}}
    with pytest.raises(SpecError) as info:
        spec_from_dict(bad)
    text = str(info.value)
    assert "probe.max_epochs" in text
    assert "reducer" in text and "max_features" in text
    assert len(info.value.errors) == 2


def test_missing_required_section():
    bad = {k: v for k, v in BASE.items() if k != "output"}
    with pytest.raises(SpecError, match="output: Field required"):
        spec_from_dict(bad)


def test_bad_data_kind_names_discriminator():
    with pytest.raises(SpecError, match="data"):
        spec_from_dict({**BASE, "data": {"kind": "imagenet"}})


def test_step_regex_needs_a_group():
    with pytest.raises(SpecError, match="checkpoints.step_regex"):
        spec_from_dict({**BASE, "checkpoints": {"uri": "c", "step_regex": r"step\d+"}})


def test_overrides_parse_yaml_values():
    spec = spec_from_dict(BASE, overrides=["probe.l2=0.5", "layers.include=[fc1, fc2]", "run=r2"])
    assert spec.probe.l2 == 0.5
    assert spec.layers.include == ["fc1", "fc2"]
    assert spec.run == "r2"
    with pytest.raises(SpecError, match="expected key.path=value"):
        spec_from_dict(BASE, overrides=["probe.l2"])


def test_overrides_that_are_not_yaml_are_plain_strings_and_errors_name_them():
    spec = spec_from_dict(
        BASE, overrides=["checkpoints.weights=*/model.safetensors", "checkpoints.marker={stem}.done"]
    )
    assert spec.checkpoints.weights == "*/model.safetensors" and spec.checkpoints.marker == "{stem}.done"
    with pytest.raises(SpecError) as e:
        spec_from_dict(BASE, overrides=["probe.l2=[1,", "run=2024"])
    assert e.value.errors == [
        "run: Input should be a valid string (put it in quotes) (from --set)",
        "probe.l2: Input should be a valid number, unable to parse string as a number (from --set)",
    ]


def test_one_value_set_where_a_list_goes_says_how_to_write_the_list():
    with pytest.raises(SpecError) as e:
        spec_from_dict(BASE, overrides=["layers.include=fc9"])
    assert e.value.errors == [
        "layers.include: Input should be a valid list (write [fc9], or [a, b] for several) (from --set)"
    ]


def test_hash_ignores_where_but_not_what():
    a = spec_from_dict(BASE)
    assert a.hash() == spec_from_dict({**BASE, "output": {"uri": "elsewhere"}}).hash()
    assert a.hash() == spec_from_dict({**BASE, "layers": {"include": ["fc1"]}}).hash()
    assert a.hash() != spec_from_dict({**BASE, "probe": {"l2": 0.1}}).hash()


def test_load_yaml_and_json_files(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(BASE))
    (tmp_path / "s.yaml").write_text(
        "checkpoints: {uri: c}\nmodel: {factory: tiny}\ndata: {kind: gaussian}\noutput: {uri: o}\n"
    )
    assert load_spec(tmp_path / "s.json").model.factory == "tiny"
    assert load_spec(tmp_path / "s.yaml").checkpoints.uri == "c"
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("a: [unclosed\n")
    with pytest.raises(SpecError, match="cannot parse"):
        load_spec(tmp_path / "broken.yaml")


def test_spec_files_that_are_not_specs_are_named(tmp_path):
    with pytest.raises(SpecError, match="is a folder; give the spec file"):
        load_spec(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes(b"run: caf\xe9\n")
    with pytest.raises(SpecError, match="latin1.yaml is not UTF-8 text"):
        load_spec(tmp_path / "latin1.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(SpecError, match="the spec is empty"):
        load_spec(tmp_path / "empty.yaml")
    # a date-like value stays the string it looks like
    (tmp_path / "dated.yaml").write_text(
        "run: 2024-01-01\ncheckpoints: {uri: c}\nmodel: {factory: tiny}\ndata: {kind: gaussian}\noutput: {uri: o}\n"
    )
    assert load_spec(tmp_path / "dated.yaml").run == "2024-01-01"


def test_marker_template_and_endpoint_are_checked():
    bad = {
        **BASE,
        "checkpoints": {"uri": "c", "marker": "{step}.done"},
        "storage": {"s3_endpoint": "http://user:secret@minio:9000"},
    }
    with pytest.raises(SpecError) as info:
        spec_from_dict(bad)
    text = str(info.value)
    assert "checkpoints.marker" in text and "{stem}" in text
    assert "storage.s3_endpoint" in text and "credentials" in text
    assert "secret" not in text.replace("credentials", "")
    assert (
        spec_from_dict({**BASE, "checkpoints": {"uri": "c", "marker": "{stem}.done"}}).checkpoints.marker
        == "{stem}.done"
    )


def test_shard_dtype_is_part_of_the_answer():
    assert (
        spec_from_dict(BASE).hash()
        != spec_from_dict({**BASE, "output": {"uri": "out", "dtype": "float16"}}).hash()
    )


# --- hostile and careless values: one line naming the field ------------------------------


def _float_fields(model, prefix: str):
    """(dotted field path, section model) of every float field of a spec model, recursively."""
    import typing

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann = field.annotation
        args = typing.get_args(ann) or (ann,)
        if float in args:  # a list of floats is checked through its first item
            yield f"{prefix}{name}" + ("[0]" if typing.get_origin(ann) is list else "")
        for a in args:
            if isinstance(a, type) and issubclass(a, BaseModel):
                yield from _float_fields(a, f"{prefix}{name}.")


def _with(path: str, value, data: dict | None = None) -> dict:
    spec = json.loads(json.dumps(data or BASE))
    node = spec
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return spec


def test_every_float_field_refuses_inf_and_nan():
    from probeserve.spec import GaussianData, IdxData, ParquetData, SweepSpec

    paths = [p for p in _float_fields(SweepSpec, "") if not p.startswith("data.")]
    sections = {"gaussian": GaussianData, "idx": IdxData, "parquet": ParquetData}
    data_paths = [(k, p) for k, m in sections.items() for p in _float_fields(m, "data.")]
    assert "probe.l2" in paths and "probe.learning_rate" in paths and ("idx", "data.scale") in data_paths
    cases = [(p, BASE) for p in paths]
    cases += [
        (p, {**BASE, "data": {"kind": k, "uri": "d.parquet"} if k == "parquet" else {"kind": k}})
        for k, p in data_paths
    ]
    for path, base in cases:
        for bad in (float("inf"), float("-inf"), float("nan")):
            listed = path.endswith("[0]")
            with pytest.raises(SpecError) as info:
                spec_from_dict(_with(path.removesuffix("[0]"), [bad] if listed else bad, base))
            assert info.value.errors == [f"{path}: Input should be a finite number"], (path, bad)


def test_inf_nan_and_overflow_from_yaml_and_json_files(tmp_path):
    body = "checkpoints: {uri: c}\nmodel: {factory: tiny}\ndata: {kind: gaussian}\noutput: {uri: o}\n"
    for text, field in [
        ("probe: {l2: .inf}\n", "probe.l2"),
        ("probe: {learning_rate: .nan}\n", "probe.learning_rate"),
        ("probe: {l2: 1.0e+400}\n", "probe.l2"),  # overflows to inf
    ]:
        (tmp_path / "s.yaml").write_text(body + text)
        with pytest.raises(SpecError) as info:
            load_spec(tmp_path / "s.yaml")
        assert str(info.value) == f"{tmp_path / 's.yaml'}: {field}: Input should be a finite number"
    (tmp_path / "s.json").write_text(json.dumps(BASE)[:-1] + ', "probe": {"learning_rate": Infinity}}')
    with pytest.raises(SpecError, match="probe.learning_rate: Input should be a finite number"):
        load_spec(tmp_path / "s.json")


def test_true_or_false_is_not_a_number():
    with pytest.raises(SpecError) as info:
        spec_from_dict(_with("data.train_size", True, _with("probe.l2", False)))
    assert sorted(info.value.errors) == [
        "data.train_size: expected a number, got true (YAML reads yes/no/on/off as true/false)",
        "probe.l2: expected a number, got false (YAML reads yes/no/on/off as true/false)",
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty; give a path, file:///path or s3://bucket/prefix"),
        ("  ", "empty; give a path, file:///path or s3://bucket/prefix"),
        ("ftp://host/x", "unsupported scheme 'ftp://'; use a path, file:///path or s3://bucket/prefix"),
        ("http://host/x", "unsupported scheme 'http://'; use a path, file:///path or s3://bucket/prefix"),
        ("s3:///x", "an s3:// URI needs a bucket, like s3://bucket/prefix"),
        ("s3:bucket/x", "an s3:// URI needs a bucket, like s3://bucket/prefix"),
        ("file://host/x", "a file:// URI names a local path, like file:///data/x (three slashes)"),
        ("/data/a\x00b", "contains a control character (a newline, a tab or a NUL byte)"),
        ("s3://key:secret@bucket/x", "credentials do not go in a URI; use the standard AWS chain"),
    ],
)
def test_every_uri_field_names_itself(value, message):
    specs = {
        "checkpoints.uri": _with("checkpoints.uri", value),
        "output.uri": _with("output.uri", value),
        "data.uri": {**BASE, "data": {"kind": "parquet", "uri": value}},
        "data.path": {**BASE, "data": {"kind": "idx", "path": value}},
    }
    for field, data in specs.items():
        with pytest.raises(SpecError) as info:
            spec_from_dict(data)
        assert info.value.errors == [f"{field}: {message}"]
        assert "secret" not in str(info.value)
    # what storage.open_storage takes is accepted
    for good in (
        "relative/dir",
        "/abs/dir",
        "file:///abs/dir",
        "file://localhost/d",
        "s3://b",
        "s3://b/p/",
        "C:\\data",
    ):
        assert spec_from_dict(_with("output.uri", good)).output.uri == good


def test_torch_threads_is_bounded_and_says_why():
    from probeserve.spec import MAX_TORCH_THREADS

    assert spec_from_dict(_with("resources.torch_threads", MAX_TORCH_THREADS)).resources.torch_threads == 1024
    with pytest.raises(SpecError) as info:
        spec_from_dict(_with("resources.torch_threads", 100000))
    (line,) = info.value.errors
    assert line.startswith(
        "resources.torch_threads: 100000 is more than 1024: torch starts every thread at once"
    )
    assert "CPU cores" in line


def test_probe_seed_stays_in_torchs_range():
    assert spec_from_dict(_with("probe.seed", -5)).probe.seed == -5
    assert spec_from_dict(_with("probe.seed", 2**64 - 1)).probe.seed == 2**64 - 1
    with pytest.raises(SpecError, match=r"probe.seed: 10{30} is outside torch's seed range"):
        spec_from_dict(_with("probe.seed", 10**30))


@pytest.mark.parametrize(
    ("field", "value", "blamed"),
    [("data.train_size", 10**12, "data.train_size"), ("data.dim", 10**9, "data.dim")],
)
def test_gaussian_data_that_cannot_fit_in_memory_is_refused_with_its_estimate(field, value, blamed):
    with pytest.raises(SpecError) as info:
        spec_from_dict(
            _with(field, value, _with("data.dim", 8)) if field != "data.dim" else _with(field, value)
        )
    (line,) = info.value.errors
    assert line.startswith(f"{blamed}: the gaussian data (")
    assert "needs about" in line and "of memory, more than the" in line and "this machine has" in line
    # a JSON float that is a whole number is the same request
    with pytest.raises(SpecError, match=blamed):
        spec_from_dict(_with(field, float(value)))


def test_a_number_yaml_reads_as_text_gets_a_hint(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "checkpoints: {uri: c}\nmodel: {factory: tiny}\ndata: {kind: gaussian, train_size: 1e6}\noutput: {uri: o}\n"
    )
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "s.yaml")
    assert info.value.errors == [
        "data.train_size: Input should be a valid integer, unable to parse string as an integer "
        "(YAML reads 1e6 as text: write 1000000)"
    ]


def test_the_data_kind_is_not_part_of_a_field_path():
    with pytest.raises(SpecError) as info:
        spec_from_dict(_with("data.dim", -1))
    assert info.value.errors == ["data.dim: Input should be greater than 0"]
    with pytest.raises(SpecError) as info:
        spec_from_dict({**BASE, "data": {"dim": 3}})
    assert info.value.errors == [
        "data.kind: required, one of 'gaussian', 'idx', 'parquet', 'images', 'synthetic_images'"
    ]
    with pytest.raises(SpecError) as info:
        spec_from_dict({**BASE, "data": {"kind": "imagenet"}})
    assert info.value.errors == [
        "data.kind: 'imagenet' is not one of 'gaussian', 'idx', 'parquet', 'images', 'synthetic_images'"
    ]


def test_list_items_are_named_by_index():
    with pytest.raises(SpecError) as info:
        spec_from_dict(_with("layers.include", ["fc1", None, ""]))
    assert info.value.errors == [
        "layers.include[1]: Input should be a valid string",
        "layers.include[2]: String should have at least 1 character",
    ]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("checkpoints.steps", [], "checkpoints.steps: an empty list probes no checkpoint"),
        ("checkpoints.steps", [3, -1], "checkpoints.steps[1]: Input should be greater than or equal to 0"),
        ("checkpoints.weights", "", "checkpoints.weights: an empty glob matches nothing"),
        ("checkpoints.marker", "", "checkpoints.marker: empty"),
        ("checkpoints.marker", "../../etc/x", "checkpoints.marker: the marker is a key relative to"),
        ("checkpoints.marker", "/COMPLETE", "checkpoints.marker: the marker is a key relative to"),
        ("model.factory", "", "model.factory: empty"),
        ("model.factory", "..x:y", "model.factory: '..x:y' is not of the form 'package.module:function'"),
        ("model.factory", "a.b:", "model.factory: 'a.b:' is not of the form"),
        ("run", "ラン", "run: 'ラン' is not a run name"),
        ("run", "../up", "run: '../up' is not a run name"),
    ],
)
def test_values_that_would_silently_do_nothing_are_refused(path, value, message):
    with pytest.raises(SpecError) as info:
        spec_from_dict(_with(path, value))
    (line,) = info.value.errors
    assert line.startswith(message)


def test_parquet_shape_sizes_are_positive():
    with pytest.raises(SpecError) as info:
        spec_from_dict({**BASE, "data": {"kind": "parquet", "uri": "d.parquet", "shape": [0, 2]}})
    assert info.value.errors == ["data.shape[0]: Input should be greater than 0"]


def test_one_error_is_one_line_and_several_are_listed():
    with pytest.raises(SpecError) as info:
        spec_from_dict(_with("probe.l2", -1), source="s.yaml")
    assert str(info.value) == "s.yaml: probe.l2: Input should be greater than or equal to 0"
    with pytest.raises(SpecError) as info:
        spec_from_dict(_with("probe.l2", -1, _with("probe.max_epochs", 0)), source="s.yaml")
    assert str(info.value).splitlines()[0] == "s.yaml: 2 errors"


# --- YAML that would blow up or mislead ---------------------------------------------------

SPEC_YAML = "checkpoints: {uri: c}\nmodel: {factory: tiny}\ndata: {kind: gaussian}\noutput: {uri: o}\n"


def test_a_yaml_alias_bomb_is_refused(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "bomb.yaml").write_text("\n".join(levels) + "\n" + SPEC_YAML)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "bomb.yaml")
    (line,) = info.value.errors
    assert (
        line.startswith("cannot parse bomb.yaml: YAML aliases expand to")
        and "over the limit of 10000" in line
    )
    # modest reuse of an anchor is fine
    (tmp_path / "ok.yaml").write_text(
        "checkpoints: {uri: c}\nmodel: {factory: tiny}\ndata: &d {kind: gaussian, dim: 4}\noutput: {uri: o}\n"
        "layers: {include: &l [input, fc1], exclude: []}\n"
    )
    assert load_spec(tmp_path / "ok.yaml").layers.include == ["input", "fc1"]


def test_an_alias_bomb_in_a_set_value_is_refused():
    bomb = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + ["*a"] * 2000) + "]"
    with pytest.raises(SpecError, match=r"model.kwargs.x: YAML aliases expand to \d+ more values"):
        spec_from_dict(BASE, overrides=[f"model.kwargs.x={bomb}"])


def test_recursive_aliases_deep_nesting_and_duplicate_keys(tmp_path):
    cases = {
        "recursive.yaml": ("a: &a [1, *a]\n" + SPEC_YAML, "a YAML alias refers to a value that contains it"),
        "deep.yaml": ("x: " + "[" * 20000 + "]" * 20000 + "\n" + SPEC_YAML, "nested too deeply"),
        "twice.yaml": (SPEC_YAML + "probe: {l2: 0.1}\nprobe: {max_epochs: 3}\n", "key 'probe' appears twice"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SpecError) as info:
            load_spec(tmp_path / name)
        (line,) = info.value.errors
        assert line.startswith(f"cannot parse {name}: ") and message in line
    (tmp_path / "deep.json").write_text('{"x": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(SpecError, match="cannot parse deep.json: nested too deeply"):
        load_spec(tmp_path / "deep.json")


def test_values_that_are_not_plain_are_named(tmp_path):
    (tmp_path / "s.yaml").write_text(
        SPEC_YAML.replace(
            "{factory: tiny}", "{factory: tiny, kwargs: {hidden: !!binary aGVsbG8=, s: !!set {a}}}"
        )
    )
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "s.yaml")
    (line,) = info.value.errors
    assert line == (
        "model.kwargs.hidden: binary data (!!binary) is not a spec value; use numbers, text, lists and mappings only"
    )
    (tmp_path / "p.yaml").write_text("x: !!python/object/apply:os.system ['true']\n" + SPEC_YAML)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "p.yaml")
    (line,) = info.value.errors
    assert "could not determine a constructor" in line and "(line 1, column 4)" in line


def test_spec_files_that_are_huge_or_special_are_refused(tmp_path):
    import os

    from probeserve.spec import MAX_SPEC_BYTES

    (tmp_path / "big.yaml").write_text(SPEC_YAML + "#" * MAX_SPEC_BYTES)
    with pytest.raises(SpecError, match="big.yaml is larger than 16.0 MiB"):
        load_spec(tmp_path / "big.yaml")
    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(SpecError, match="is not a regular file"):
        load_spec(tmp_path / "fifo.yaml")


# --- `probeserve validate` finds what `layers` and `run` would, all at once ---------------


def _validate(tmp_path, text: str) -> subprocess.CompletedProcess:
    (tmp_path / "spec.yaml").write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "probeserve", "validate", "spec.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_validate_reports_every_model_and_data_error_with_its_field(tmp_path):
    done = _validate(
        tmp_path,
        "checkpoints: {uri: ckpts}\n"
        "model: {factory: mlp, kwargs: {input_dim: 8, widht: 16, depht: 2}}\n"
        "data: {kind: idx, path: no-such-folder}\n"
        "output: {uri: out}\n",
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "error: spec.yaml: 3 errors"
    assert lines[1].startswith(
        "  model.kwargs.widht: factory 'mlp' does not take 'widht' (did you mean 'width'?)"
    )
    assert lines[2].startswith(
        "  model.kwargs.depht: factory 'mlp' does not take 'depht' (did you mean 'depth'?)"
    )
    assert lines[3].startswith("  data: ") and "no-such-folder" in lines[3]
    assert done.stdout == ""


def test_validate_reports_every_layer_pattern_and_reducer_error(tmp_path):
    done = _validate(
        tmp_path,
        "checkpoints: {uri: ckpts}\n"
        "model: {factory: mlp, kwargs: {input_dim: 300000, width: 8, depth: 2}}\n"
        "layers: {include: [input, 'hidden.*', 'hiden.*', fc9]}\n"
        "reducer: {kind: projection, max_features: 1000}\n"
        "data: {kind: gaussian, dim: 300000, train_size: 4, val_size: 4, test_size: 4}\n"
        "output: {uri: out}\n",
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = [line.strip() for line in done.stderr.strip().splitlines()]
    assert lines[0] == "error: spec.yaml: 3 errors"
    assert lines[1].startswith("layers.include[2]: 'hiden.*' matches no probe point. Did you mean")
    assert lines[2].startswith("layers.include[3]: 'fc9' matches no probe point.")
    assert lines[3].startswith(
        "reducer: layer 'input': a projection from 300000 to 1000 features needs a 1.1 GiB"
    )


def test_validate_refuses_a_run_name_bound_to_another_spec_and_a_file_as_output(tmp_path):
    (tmp_path / "out" / "runs" / "r").mkdir(parents=True)
    (tmp_path / "out" / "runs" / "r" / "spec.json").write_text('{"spec_hash": "0123456789abcdef"}')
    done = _validate(
        tmp_path,
        "run: r\ncheckpoints: {uri: ckpts}\nmodel: {factory: tiny, kwargs: {input_dim: 4}}\n"
        "data: {kind: gaussian, dim: 4}\noutput: {uri: out}\n",
    )
    assert done.returncode == 2
    assert (
        done.stderr.startswith("error: spec.yaml: run: run 'r' in ")
        and "made with a different spec" in done.stderr
    )
    (tmp_path / "file").write_text("")
    done = _validate(
        tmp_path,
        "checkpoints: {uri: ckpts}\nmodel: {factory: tiny, kwargs: {input_dim: 4}}\n"
        "data: {kind: gaussian, dim: 4}\noutput: {uri: file}\n",
    )
    assert done.returncode == 2 and "output.uri: " in done.stderr and "is a file, not a folder" in done.stderr


def test_validate_prints_the_resolved_spec_and_what_it_checked(tmp_path):
    done = _validate(
        tmp_path,
        "checkpoints: {uri: ckpts}\nmodel: {factory: tiny, kwargs: {input_dim: 4}}\n"
        "layers: {include: ['fc*']}\ndata: {kind: gaussian, dim: 4}\noutput: {uri: out}\n",
    )
    assert done.returncode == 0, done.stderr
    spec = spec_from_dict(yaml.safe_load(done.stdout))
    assert spec.layers.include == ["fc*"] and spec.probe.solver == "lbfgs"
    assert (
        "# checked: data opens: train 10000, val 2000, test 2000 examples of shape [4], 2 classes"
        in done.stdout
    )
    assert "# checked: layers: 2 of 4 probe points selected" in done.stdout
    assert not (tmp_path / "out").exists()  # validate writes nothing


def test_a_json_key_twice_and_an_empty_section_are_named(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(BASE)[:-1] + ', "run": "a", "run": "b"}')
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "s.json")
    assert info.value.errors == [
        "cannot parse s.json: key 'run' appears twice in one object; the second would silently replace the first"
    ]
    (tmp_path / "s.yaml").write_text(SPEC_YAML + "probe:\n")
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "s.yaml")
    assert info.value.errors == [
        "probe: expected a mapping of fields, got nothing (a section header without fields?)"
    ]
