"""One config surface: a setting lives in the spec, and a flag of a command that reads a spec
only overrides a spec field as shorthand for `--set`, saying so in its help."""

from __future__ import annotations

import argparse

import pytest
from helpers import tiny_spec, write_checkpoints, write_spec

from probeserve.cli import _SetField, build_parser, main
from probeserve.spec import SweepSpec, load_spec

SPEC_COMMANDS = ("validate", "layers", "plan", "run", "watch")


def spec_fields() -> set[str]:
    names = set(SweepSpec.model_fields)
    for field in SweepSpec.model_fields.values():
        model = field.annotation
        if isinstance(model, type) and hasattr(model, "model_fields"):
            names |= set(model.model_fields)
    return names


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_no_flag_of_a_spec_command_shadows_a_spec_field_except_as_set_shorthand():
    fields = spec_fields()
    assert {"max_actors", "keep_activations", "device"} <= fields  # what the check looks for is there
    shorthands = []
    for name in SPEC_COMMANDS:
        for action in subcommands()[name]._actions:
            if isinstance(action, _SetField):
                shorthands.append(action.field)
                assert f"--set {action.field}=" in action.help and "overrides the spec" in action.help
            elif action.dest in fields:
                raise AssertionError(
                    f"probeserve {name} {action.option_strings}: a second surface for a spec field"
                )
    assert sorted(shorthands) == ["output.keep_activations", "resources.max_actors"]


def test_max_actors_is_set_in_the_spec_and_the_flag_overrides_it_in_order(tmp_path):
    path = write_spec(tmp_path, tiny_spec(tmp_path, resources={"device": "cpu", "max_actors": 3}))
    assert load_spec(path).resources.max_actors == 3
    args = build_parser().parse_args(["run", path, "--max-actors", "2"])
    assert load_spec(args.spec, overrides=args.set).resources.max_actors == 2
    args = build_parser().parse_args(["run", path, "--max-actors", "2", "--set", "resources.max_actors=5"])
    assert load_spec(args.spec, overrides=args.set).resources.max_actors == 5  # the last one given


def test_a_bad_max_actors_names_the_spec_field(tmp_path, capsys):
    path = write_spec(tmp_path, tiny_spec(tmp_path))
    assert main(["run", path, "--max-actors", "0"]) == 2
    assert "resources.max_actors" in capsys.readouterr().err


def test_keep_activations_flag_is_true_shorthand(tmp_path):
    path = write_spec(
        tmp_path, tiny_spec(tmp_path, output={"uri": str(tmp_path / "out"), "keep_activations": False})
    )
    args = build_parser().parse_args(["watch", path])
    assert load_spec(args.spec, overrides=args.set or []).output.keep_activations is False
    args = build_parser().parse_args(["watch", path, "--keep-activations"])
    assert load_spec(args.spec, overrides=args.set).output.keep_activations is True


@pytest.mark.parametrize(
    ("flags", "kept"),
    [
        ((), True),  # the spec's default
        (("--set", "output.keep_activations=false"), False),
        (("--set", "output.keep_activations=false", "--keep-activations"), True),
    ],
)
def test_the_watch_daemon_keeps_activations_as_its_spec_says(tmp_path, flags, kept):
    spec = tiny_spec(tmp_path, layers={"include": ["input"]})
    write_checkpoints(spec, steps=(0,))
    assert main(["watch", write_spec(tmp_path, spec), "--runner", "local", "--once", *flags]) == 0
    shards = list((tmp_path / "out" / "activations").rglob("part-*.parquet"))
    assert bool(shards) is kept
