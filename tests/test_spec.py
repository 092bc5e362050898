"""The spec: defaults, validation errors with field paths, overrides, hashing."""

from __future__ import annotations

import json

import pytest

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
