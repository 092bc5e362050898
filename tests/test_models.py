"""Model factories: built-ins, import paths and the errors a wrong `model:` section gets."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from torch import nn

from probeserve.errors import ModelError, first_line
from probeserve.models import BUILTIN_MODELS, build_model, example_input, mlp, mnist_convnet, tiny
from probeserve.spec import ModelSpec


def _build(factory: str, **kwargs):
    return build_model(ModelSpec(factory=factory, kwargs=kwargs))


# --- build_model ------------------------------------------------------------------------


def test_builtins_build_and_run_on_their_example_input():
    classes = {"tiny": 2, "mini_inception": 1000}
    for name in BUILTIN_MODELS:
        model = _build(name).eval()
        x = example_input(model, batch_size=3)
        assert x is not None and x.shape == (3, *model.input_shape)
        assert model(x).shape == (3, classes.get(name, 10))


def test_import_path_factory_from_a_user_module(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            def two_layers(*, width):
                return nn.Sequential(nn.Linear(3, width), nn.Linear(width, 2))

            NOT_A_MODULE = lambda: 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _build("my_factories:two_layers", width=5)
    assert isinstance(model, nn.Sequential) and model[0].out_features == 5

    with pytest.raises(ModelError, match=r"returned a int, not a torch.nn.Module"):
        _build("my_factories:NOT_A_MODULE")
    with pytest.raises(ModelError, match=r"does not take 'depth'.*it takes: width"):
        _build("my_factories:two_layers", width=5, depth=3)
    with pytest.raises(ModelError, match=r"my_factories:two_layers.*missing a required argument: 'width'"):
        _build("my_factories:two_layers")


def test_import_path_to_a_library_class():
    model = _build("torch.nn:Linear", in_features=4, out_features=3)
    assert isinstance(model, nn.Linear) and model.weight.shape == (3, 4)
    assert example_input(model) is None  # no input_shape attribute


def test_unknown_builtin_lists_the_builtins():
    with pytest.raises(
        ModelError, match=r"unknown built-in model 'resnet'.*mini_inception, mlp, mnist_convnet, tiny"
    ):
        _build("resnet")


def test_unimportable_module_and_missing_attribute():
    with pytest.raises(
        ModelError, match=r"cannot import module 'no_such_package_xyz.models'.*No module named"
    ):
        _build("no_such_package_xyz.models:net")
    with pytest.raises(ModelError, match=r"'torch.nn:NoSuchLayer'.*no attribute 'NoSuchLayer'"):
        _build("torch.nn:NoSuchLayer")


def test_bad_kwarg_of_a_builtin_names_it():
    with pytest.raises(ModelError, match=r"'mlp' does not take 'widht'"):
        _build("mlp", widht=10)
    with pytest.raises(ModelError, match=r"depth must be >= 1"):
        _build("mlp", depth=0)
    with pytest.raises(ModelError, match=r"activation must be one of"):
        _build("mlp", activation="gelu")
    with pytest.raises(ModelError, match=r"width must be an integer"):
        _build("mlp", width="128")


# --- mlp --------------------------------------------------------------------------------


def test_mlp_structure_and_names():
    model = mlp(depth=3, width=7, input_shape=[1, 4, 4], num_classes=5, activation="leaky_relu")
    names = [n for n, _ in model.named_modules()]
    for k in (1, 2, 3):
        assert f"hidden.{k}.linear" in names and f"hidden.{k}.act" in names
    assert "head" in names and "hidden.0.linear" not in names
    assert model.input_shape == (1, 4, 4)
    assert model.hidden["1"].linear.in_features == 16
    assert isinstance(model.hidden["2"].act, nn.LeakyReLU) and model.hidden["2"].act.negative_slope == 0.5
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 5)


def test_mlp_input_dim_must_agree_with_input_shape():
    assert mlp(input_dim=12, depth=1).input_shape == (12,)
    assert mlp(depth=1).input_shape == (784,)
    with pytest.raises(ValueError, match="input_dim=10 disagrees with input_shape"):
        mlp(input_dim=10, input_shape=[1, 28, 28])


def test_mlp_skip_connection_concatenates():
    model = mlp(input_dim=10, depth=5, width=6, skip_from=0, skip_to=4)
    assert model.hidden["4"].linear.in_features == 6 + 10
    assert all(model.hidden[str(k)].linear.in_features == 6 for k in (2, 3, 5))

    # The skip really feeds layer 0 into layer 4: with layers 1..3 zeroed out, the output
    # still depends on the input, through the skip alone.
    with torch.no_grad():
        for k in (1, 2, 3):
            model.hidden[str(k)].linear.weight.zero_()
    x = torch.randn(4, 10)
    assert not torch.allclose(model(x), model(torch.zeros(4, 10)))

    model = mlp(input_dim=10, depth=4, width=6, skip_from=1, skip_to=3)
    assert model.hidden["3"].linear.in_features == 12
    assert model(torch.randn(2, 10)).shape == (2, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"skip_from": 0}, "set both or neither"),
        ({"skip_from": 2, "skip_to": 2}, "0 <= skip_from < skip_to <= depth"),
        ({"skip_from": 0, "skip_to": 5}, "0 <= skip_from < skip_to <= depth"),
        ({"skip_from": -1, "skip_to": 2}, "skip_from must be >= 0"),
        ({"aux_every": 0}, "aux_every must be >= 1"),
    ],
)
def test_mlp_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mlp(depth=4, **kwargs)


def test_mlp_aux_heads():
    model = mlp(input_dim=8, depth=7, width=5, num_classes=3, aux_every=3)
    assert sorted(model.aux.keys()) == ["3", "6"]
    x = torch.randn(2, 8)
    logits, aux = model.forward_with_aux(x)
    assert torch.equal(logits, model(x))
    assert [a.shape for a in aux] == [(2, 3), (2, 3)]

    # aux.3 reads the activation of hidden layer 3.
    h = x
    for k in (1, 2, 3):
        h = model.hidden[str(k)].act(model.hidden[str(k)].linear(h))
    torch.testing.assert_close(aux[0], model.aux["3"](h))

    # No auxiliary head on the last hidden layer: that would be the main head again.
    assert list(mlp(input_dim=8, depth=4, width=5, aux_every=2).aux.keys()) == ["2"]


def test_mlp_glorot_normal_init():
    model = mlp(input_dim=400, depth=2, width=600, num_classes=10)
    linear = model.hidden["1"].linear
    expected_std = math.sqrt(2.0 / (400 + 600))
    assert linear.weight.std().item() == pytest.approx(expected_std, rel=0.03)
    assert abs(linear.weight.mean().item()) < 0.02 * expected_std  # ~10 standard errors of the mean
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
    head_std = math.sqrt(2.0 / (600 + 10))
    assert model.head.weight.std().item() == pytest.approx(head_std, rel=0.1)


@pytest.mark.parametrize(
    ("activation", "kind"),
    [("relu", nn.ReLU), ("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid), ("identity", nn.Identity)],
)
def test_mlp_activations(activation, kind):
    act = mlp(input_dim=4, depth=1, width=3, activation=activation).hidden["1"].act
    assert isinstance(act, kind)
    if isinstance(act, nn.ReLU):
        assert not act.inplace


# --- mnist_convnet and tiny -------------------------------------------------------------


def test_mnist_convnet_modules_in_order():
    model = mnist_convnet()
    names = [n for n, _ in model.named_children()]
    assert names == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "fc1", "relu3", "fc2"]
    assert model.input_shape == (1, 28, 28)
    assert model.fc1.in_features == 7 * 7 * 64 and model.fc1.out_features == 512
    assert model.conv1.kernel_size == (5, 5) and model.conv1.out_channels == 32
    assert model.conv2.out_channels == 64
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_mnist_convnet_other_sizes():
    model = mnist_convnet(in_channels=3, image_size=32, num_classes=4)
    assert model.input_shape == (3, 32, 32)
    assert model.fc1.in_features == 8 * 8 * 64
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_tiny():
    model = tiny(input_dim=5, hidden=4, num_classes=3)
    assert [n for n, _ in model.named_children()] == ["fc1", "act", "fc2"]
    assert model(torch.randn(2, 5)).shape == (2, 3)


def test_example_input_follows_model_dtype():
    model = tiny().double()
    x = example_input(model, batch_size=4)
    assert x.dtype == torch.float64 and x.shape == (4, 8)


# --- factories that misbehave ---------------------------------------------------------------

EVIL = """
import sys

def exits():
    sys.exit(7)

def interrupts():
    raise KeyboardInterrupt

class Stop(BaseException):
    pass

def stops():
    raise Stop("custom base exception")

def cpp_frames():
    raise RuntimeError(
        "Trying to create tensor with negative dimension -2: [-2, 6]\\n"
        "Exception raised from check_size_nonnegative at aten/src/ATen/EmptyTensor.h:8 (most recent call first):\\n"
        "C++ CapturedTraceback:\\n#4 std::_Function_handler<...> from Logging.cpp:0\\nframe #0: c10::Error::Error"
    )

def enforce():
    raise RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 24000000000000 bytes. Error code 12 (Cannot allocate memory)\\n"
        "C++ CapturedTraceback:\\n#4 c10::ThrowEnforceNotMet(char const*, int, char const*)"
    )
"""


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    (tmp_path / "evil_factories.py").write_text(EVIL)
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(9)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (
            "evil_factories:exits",
            "model.factory 'evil_factories:exits': called sys.exit(7) while building the model",
        ),
        (
            "evil_factories:interrupts",
            "model.factory 'evil_factories:interrupts': raised KeyboardInterrupt while building the model",
        ),
        (
            "evil_factories:stops",
            "model.factory 'evil_factories:stops': raised Stop: custom base exception while building the model",
        ),
        (
            "exits_on_import:build",
            "model.factory 'exits_on_import:build': called sys.exit(9) while importing",
        ),
    ],
)
def test_a_factory_that_ends_the_process_is_a_model_error(evil_module, factory, message):
    with pytest.raises(ModelError) as info:
        _build(factory)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_torch_errors_lose_their_cpp_frames(evil_module):
    with pytest.raises(ModelError) as info:
        _build("evil_factories:cpp_frames")
    assert str(info.value) == (
        "model.factory 'evil_factories:cpp_frames' raised RuntimeError: "
        "Trying to create tensor with negative dimension -2: [-2, 6]"
    )
    with pytest.raises(ModelError) as info:
        _build("evil_factories:enforce")
    assert str(info.value) == (
        "model.factory 'evil_factories:enforce' raised RuntimeError: DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 24000000000000 bytes. Error code 12 (Cannot allocate memory)"
    )
    # and a real one from torch
    with pytest.raises(ModelError) as info:
        _build("torch.nn:Linear", in_features=6, out_features=-2)
    assert str(info.value).startswith("model.factory 'torch.nn:Linear' raised RuntimeError: Trying to create")
    assert "\n" not in str(info.value)


def test_every_unknown_keyword_is_named_with_a_suggestion():
    from probeserve.models import model_errors

    errors = model_errors(ModelSpec(factory="mlp", kwargs={"widht": 3, "depht": 2, "depth": 2}))
    assert [e.split(":")[0] for e in errors] == ["model.kwargs.widht", "model.kwargs.depht"]
    assert "(did you mean 'width'?)" in errors[0] and "(did you mean 'depth'?)" in errors[1]
    with pytest.raises(ModelError, match=r"^model.kwargs.widht: .*; model.kwargs.depht: "):
        _build("mlp", widht=3, depht=2)
    assert model_errors(ModelSpec(factory="resnet")) == [
        "model.factory: unknown built-in model 'resnet'; built-ins are mini_inception, mlp, mnist_convnet, tiny, "
        "or give an import path 'package.module:function'"
    ]


def test_a_rejected_value_names_its_keyword():
    with pytest.raises(ModelError) as info:
        _build("tiny", hidden=-3)
    assert (
        str(info.value)
        == "model.kwargs.hidden: factory 'tiny' rejected its arguments: hidden must be >= 1, got -3"
    )


@pytest.mark.parametrize(
    ("factory", "kwargs", "field"),
    [
        ("mlp", {"width": 10**10}, "model.kwargs.width"),
        ("mlp", {"depth": 10**6, "width": 10**5}, "model.kwargs.width"),
        ("tiny", {"hidden": 10**12}, "model.kwargs.hidden"),
        ("mnist_convnet", {"image_size": 10**6}, "model.kwargs.image_size"),
    ],
)
def test_builtins_that_cannot_fit_in_memory_are_refused_before_allocating(factory, kwargs, field):
    # Each of these would ask for terabytes; the check runs before the first tensor is made.
    with pytest.raises(ModelError) as info:
        _build(factory, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{field}: factory {factory!r} rejected its arguments: ")
    assert "weights) needs about" in message and "this machine has" in message


def test_a_real_ctrl_c_while_building_still_interrupts(tmp_path):
    """SIGINT during a slow factory ends the command as an interrupt (130), not a model error."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "slow_factory.py").write_text(
        "import time, pathlib\n"
        "def build():\n"
        "    pathlib.Path('building').write_text('')\n"
        "    time.sleep(60)\n"
    )
    (tmp_path / "spec.yaml").write_text(
        "checkpoints: {uri: c}\nmodel: {factory: 'slow_factory:build'}\n"
        "data: {kind: gaussian, dim: 4}\noutput: {uri: o}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "probeserve", "validate", "spec.yaml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (tmp_path / "building").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "model.factory" not in err


@pytest.mark.parametrize(
    "message, line",
    [
        ("plain", "plain"),
        ("\n  first \nsecond", "first"),
        (
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: out of memory\nframe #0",
            "DefaultCPUAllocator: out of memory",
        ),
        (
            "shape mismatch\nException raised from check at aten/x.cpp:1 (most recent call first):\nframe #0: 0x1",
            "shape mismatch",
        ),
        ("", ""),
        (" \n ", ""),
    ],
)
def test_first_line_of_an_error_is_its_first_meaningful_line(message, line):
    assert first_line(RuntimeError(message)) == line
