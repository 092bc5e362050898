"""Probe points, their selection, reducers and activation capture."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from probeserve import layers
from probeserve.errors import LayerError
from probeserve.layers import (
    ActivationCapture,
    InplaceModified,
    ProbePoint,
    _point_seed,
    discover_probe_points,
    make_reducer,
    select_probe_points,
)
from probeserve.models import example_input, mlp, mnist_convnet, tiny
from probeserve.spec import ReducerSpec

MNIST_POINTS = [
    ("input", (1, 28, 28)),
    ("conv1", (32, 28, 28)),
    ("relu1", (32, 28, 28)),
    ("pool1", (32, 14, 14)),
    ("conv2", (64, 14, 14)),
    ("relu2", (64, 14, 14)),
    ("pool2", (64, 7, 7)),
    ("fc1", (512,)),
    ("relu3", (512,)),
    ("fc2", (10,)),
]


@pytest.fixture(scope="module")
def convnet():
    torch.manual_seed(0)
    return mnist_convnet()


@pytest.fixture(scope="module")
def convnet_points(convnet):
    return discover_probe_points(convnet, example_input(convnet))


def _point(name: str, shape: tuple[int, ...]) -> ProbePoint:
    return ProbePoint(name, 1, name, "output", shape, math.prod(shape))


# --- discovery --------------------------------------------------------------------------


def test_mnist_convnet_probe_points(convnet_points):
    assert [(p.name, p.shape) for p in convnet_points] == MNIST_POINTS
    assert [p.index for p in convnet_points] == list(range(len(MNIST_POINTS)))
    assert convnet_points[0].module == "" and convnet_points[1].module == "conv1"
    assert {p.side for p in convnet_points[1:]} == {"output"}
    assert convnet_points[6].n_features == 64 * 7 * 7


def test_module_inputs_come_just_before_outputs(convnet):
    points = discover_probe_points(convnet, example_input(convnet), inputs=True)
    expected = ["input"]
    for name, _ in MNIST_POINTS[1:]:
        expected += [f"{name}:in", name]
    assert [p.name for p in points] == expected
    by_name = {p.name: p for p in points}
    assert by_name["conv1:in"].shape == (1, 28, 28)
    assert by_name["fc1:in"].shape == (64 * 7 * 7,)  # the flatten in forward() shows up here
    assert by_name["relu3:in"].module == "relu3" and by_name["relu3:in"].side == "input"


def test_mlp_probe_points_follow_layer_numbers():
    model = mlp(input_shape=[1, 4, 4], depth=2, width=3, aux_every=1)
    names = [p.name for p in discover_probe_points(model, example_input(model))]
    # Hidden layers are never called as a whole, and aux heads do not run in forward().
    assert names == ["input", "hidden.1.linear", "hidden.1.act", "hidden.2.linear", "hidden.2.act", "head"]


def test_discovery_restores_training_mode():
    model = tiny()
    model.train()
    model.fc2.eval()
    discover_probe_points(model, example_input(model))
    assert model.training and model.fc1.training and not model.fc2.training


class _Odd(nn.Module):
    """A model with a shared module, a tuple output, a non-tensor output and a batch-less one."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.pair = _Pair()
        self.info = _Info()
        self.table = _Table()

    def forward(self, x):
        a = self.shared(x)
        b, _ = self.pair(a)
        self.info(b)
        self.table(b)
        return self.shared(b * 2)  # second call of `shared`


class _Pair(nn.Module):
    def forward(self, x):
        return x + 1, "not a tensor"


class _Info(nn.Module):
    def forward(self, x):
        return {"mean": x.mean()}


class _Table(nn.Module):
    def forward(self, x):
        return torch.ones(7, 3)  # no batch dimension


def test_odd_outputs_and_shared_modules():
    model = _Odd()
    x = torch.randn(3, 4)
    points = discover_probe_points(model, x)
    assert [(p.name, p.shape) for p in points] == [("input", (4,)), ("shared", (4,)), ("pair", (4,))]

    with ActivationCapture(model, points) as capture:
        model(x)
        acts = capture.take()
    # First call of the shared module only.
    torch.testing.assert_close(acts["shared"], model.shared(x))
    torch.testing.assert_close(acts["pair"], model.shared(x) + 1)


# --- selection --------------------------------------------------------------------------


def test_select_keeps_forward_order(convnet_points):
    chosen = select_probe_points(convnet_points, ["fc*", "relu?", "input", "pool1"], ["relu3"])
    assert [p.name for p in chosen] == ["input", "relu1", "pool1", "relu2", "fc1", "fc2"]
    everything = select_probe_points(convnet_points, ["*"], [])
    assert everything == convnet_points


def test_select_unknown_pattern_lists_names(convnet_points):
    with pytest.raises(
        LayerError, match=r"'conv3' matches no probe point.*Did you mean conv2, conv1"
    ) as info:
        select_probe_points(convnet_points, ["conv1", "conv3"], [])
    assert "input, conv1, relu1, pool1, conv2, relu2, pool2, fc1, relu3, fc2" in str(info.value)

    many = [_point(f"block.{i}", (3,)) for i in range(200)]
    with pytest.raises(LayerError, match=r"Available \(200\):.*\(160 more\)"):
        select_probe_points(many, ["head"], [])


def test_select_exclude_that_matches_nothing_is_fine_but_empty_result_is_not(convnet_points):
    assert [p.name for p in select_probe_points(convnet_points, ["conv*"], ["nothing*"])] == [
        "conv1",
        "conv2",
    ]
    with pytest.raises(LayerError, match="leave no probe point"):
        select_probe_points(convnet_points, ["conv*"], ["conv*"])


# --- reducers ---------------------------------------------------------------------------


def test_none_and_small_layers_are_flattened():
    point = _point("pool2", (64, 7, 7))
    acts = torch.randn(2, 64, 7, 7)
    r = make_reducer(ReducerSpec(), point)
    assert r.n_features == 3136 and torch.equal(r(acts), acts.reshape(2, -1))
    for kind in ("avgpool", "subset", "projection"):
        r = make_reducer(ReducerSpec(kind=kind, max_features=5000), point)
        assert r.describe()["kind"] == "none" and r.describe()["requested_kind"] == kind
        assert torch.equal(r(acts), acts.reshape(2, -1))


def test_avgpool_spatial_square_ish():
    point = _point("conv1", (32, 28, 28))
    r = make_reducer(ReducerSpec(kind="avgpool", max_features=1000), point)
    # an even 4x4 grid (512 features) beats the uneven 5x5 (800): it keeps over half as many
    assert r.pooled_shape == (32, 4, 4) and r.n_features == 512
    acts = torch.randn(3, 32, 28, 28)
    out = r(acts)
    assert out.shape == (3, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.nn.functional.adaptive_avg_pool2d(acts, 4).reshape(3, -1))
    # 14 has no divisor near 4: uneven windows, computed as matrix products, equal adaptive pooling
    r14 = make_reducer(ReducerSpec(kind="avgpool", max_features=1024), _point("c2", (64, 14, 14)))
    assert r14.pooled_shape == (64, 4, 4)
    a14 = torch.randn(3, 64, 14, 14)
    torch.testing.assert_close(r14(a14), torch.nn.functional.adaptive_avg_pool2d(a14, 4).reshape(3, -1))
    # The mean over all positions of one channel equals the mean of its pooled cells when
    # every cell has the same size (28 = 4 * 7): check with a grid that divides evenly.
    r7 = make_reducer(ReducerSpec(kind="avgpool", max_features=32 * 49), _point("c", (32, 28, 28)))
    assert r7.pooled_shape == (32, 7, 7)
    torch.testing.assert_close(r7(acts).reshape(3, 32, 49).mean(-1), acts.mean((-1, -2)))

    wide = make_reducer(ReducerSpec(kind="avgpool", max_features=50), _point("w", (1, 4, 100)))
    assert wide.pooled_shape == (1, 4, 10)


@pytest.mark.parametrize("side", [112, 113])
def test_avgpool_of_a_large_image_equals_adaptive_pooling(side):
    # too large for the one-GEMM pooling matrix: plain windows (112 = 4 * 28) or one
    # product per dim (113 is prime) instead, with the same answer
    r = make_reducer(ReducerSpec(kind="avgpool", max_features=3 * 28 * 28), _point("in", (3, side, side)))
    assert math.prod(r.pooled_shape[1:]) * side * side > layers._KRON_MAX
    acts = torch.randn(2, 3, side, side)
    expected = torch.nn.functional.adaptive_avg_pool2d(acts, r.pooled_shape[1:]).reshape(2, -1)
    torch.testing.assert_close(r(acts), expected)
    # and on a view that is not contiguous (a channels-last activation)
    torch.testing.assert_close(r(acts.to(memory_format=torch.channels_last)), expected)


def test_avgpool_preserves_constants_and_pools_channels():
    for shape, max_features in [((32, 28, 28), 1000), ((64, 7, 7), 10), ((5000,), 300), ((8, 50), 40)]:
        r = make_reducer(ReducerSpec(kind="avgpool", max_features=max_features), _point("x", shape))
        out = r(torch.full((2, *shape), 3.5))
        assert out.shape[1] == r.n_features <= max_features
        torch.testing.assert_close(out, torch.full_like(out, 3.5))
    # 64 channels > 10 features even at 1x1: groups of channels are averaged.
    r = make_reducer(ReducerSpec(kind="avgpool", max_features=10), _point("x", (64, 7, 7)))
    assert r.pooled_shape == (10, 1, 1)
    acts = torch.arange(64.0).reshape(1, 64, 1, 1).expand(1, 64, 7, 7)
    out = r(acts)
    assert out[0, 0] < out[0, -1]  # channel order is kept
    torch.testing.assert_close(out.mean(), acts.mean(), rtol=0.05, atol=0)


def test_avgpool_rejects_high_rank():
    with pytest.raises(LayerError, match="'subset' or 'projection'"):
        make_reducer(ReducerSpec(kind="avgpool", max_features=4), _point("x", (2, 2, 2, 2, 2)))


def test_subset_is_seeded_per_layer():
    spec = ReducerSpec(kind="subset", max_features=100, seed=7)
    a = make_reducer(spec, _point("conv1", (32, 28, 28)))
    again = make_reducer(spec, _point("conv1", (32, 28, 28)))
    other_layer = make_reducer(spec, _point("relu1", (32, 28, 28)))
    other_seed = make_reducer(
        ReducerSpec(kind="subset", max_features=100, seed=8), _point("conv1", (32, 28, 28))
    )
    assert torch.equal(a.indices, again.indices)
    assert not torch.equal(a.indices, other_layer.indices)
    assert not torch.equal(a.indices, other_seed.indices)
    assert torch.equal(a.indices, a.indices.sort().values) and len(set(a.indices.tolist())) == 100

    acts = torch.randn(4, 32, 28, 28, dtype=torch.float16)
    out = a(acts)
    assert out.shape == (4, 100) and out.dtype == torch.float32
    assert torch.equal(out, acts.reshape(4, -1)[:, a.indices].float())


def test_projection():
    spec = ReducerSpec(kind="projection", max_features=64, seed=1)
    r = make_reducer(spec, _point("fc1", (512,)))
    acts = torch.randn(5, 512)
    out = r(acts)
    assert out.shape == (5, 64)
    torch.testing.assert_close(out, make_reducer(spec, _point("fc1", (512,)))(acts))
    assert not torch.allclose(out, make_reducer(spec, _point("relu3", (512,)))(acts))
    # Scaled so that squared norms are preserved on average (Johnson-Lindenstrauss).
    ratio = (out.norm(dim=1) ** 2 / acts.norm(dim=1) ** 2).mean().item()
    assert 0.6 < ratio < 1.4


def test_projection_size_guard():
    big = _point("conv1", (64, 224, 224))  # 3.2M features x 4096 x 4 bytes = 49 GiB
    with pytest.raises(LayerError, match=r"'conv1'.*'subset' or 'avgpool'"):
        make_reducer(ReducerSpec(kind="projection", max_features=4096), big)


def test_reducer_checks_shape_and_describes_itself():
    r = make_reducer(ReducerSpec(kind="avgpool", max_features=100), _point("conv1", (32, 28, 28)))
    with pytest.raises(LayerError, match=r"'conv1'.*\[32, 14, 14\].*expected \[32, 28, 28\]"):
        r(torch.randn(2, 32, 14, 14))
    described = json.loads(json.dumps(r.describe()))
    assert described["kind"] == "avgpool" and described["in_shape"] == [32, 28, 28]
    assert described["out_shape"] == [r.n_features] and described["max_features"] == 100


def test_layer_seeds_are_pinned():
    # Subsets and projections must be the same in every process and every release: shards
    # written by one worker are read next to shards written by another, and a resumed sweep
    # must pick the same features. So the per-layer seed is a fixed function of (seed, name),
    # not Python's per-process hash(); torch's CPU generator does the rest.
    assert _point_seed(3, "hidden.3.act") == 534794801168226410
    assert _point_seed(0, "conv1") == 1598969932640799638


# --- capture ----------------------------------------------------------------------------


def test_capture_matches_running_modules_by_hand(convnet, convnet_points):
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = {"input": x}
        h = x
        for name in ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2"]:
            h = expected[name] = getattr(convnet, name)(h)
        h = expected["fc1"] = convnet.fc1(h.flatten(1))
        h = expected["relu3"] = convnet.relu3(h)
        expected["fc2"] = convnet.fc2(h)

        with ActivationCapture(convnet, convnet_points) as capture:
            logits = convnet(x)
            acts = capture.take()
    assert list(acts) == [p.name for p in convnet_points]
    for name, t in acts.items():
        torch.testing.assert_close(t, expected[name], msg=name)
    assert torch.equal(acts["fc2"], logits)


def test_capture_module_inputs_and_hooks_removed(convnet):
    points = discover_probe_points(convnet, example_input(convnet), inputs=True)
    chosen = select_probe_points(points, ["fc1:in", "relu1", "input"], [])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), ActivationCapture(convnet, chosen) as capture:
        convnet(x)
        acts = capture.take()
    assert list(acts) == ["input", "relu1", "fc1:in"]
    assert acts["fc1:in"].shape == (2, 3136)
    assert torch.equal(acts["input"], x)
    for m in convnet.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_capture_keeps_last_pass_and_reports_missing():
    model = tiny()
    points = discover_probe_points(model, example_input(model))
    with ActivationCapture(model, points) as capture:
        with pytest.raises(LayerError, match="produced no tensor"):
            capture.take()  # nothing ran yet
        x1, x2 = torch.randn(2, 8), torch.randn(2, 8)
        model(x1)
        model(x2)
        acts = capture.take()
        assert torch.equal(acts["input"], x2)
        with pytest.raises(LayerError, match="input, fc1, act, fc2 produced no tensor"):
            capture.take()  # take() clears


def test_capture_survives_inplace_ops_and_is_detached():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    points = discover_probe_points(model, x)
    assert [p.name for p in points] == ["input", "0", "1", "2"]
    with ActivationCapture(model, points) as capture:
        model(x)
        with pytest.raises(InplaceModified) as info:
            capture.take()  # kept by reference, then overwritten by the inplace ReLU: detected
        assert info.value.names == ["0"] and capture.copy == {"0"}
        model(x)  # the same batch again: point "0" is copied now
        acts = capture.take()
    pre = model[0](x).detach()
    assert (pre < 0).any()
    torch.testing.assert_close(acts["0"], pre)  # not overwritten by the inplace ReLU
    assert not acts["0"].requires_grad


def test_capture_transforms_in_the_hook_before_inplace_ops_and_fails_points_alone():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    points = discover_probe_points(model, x)
    pre = model[0](x).detach()
    assert (pre < 0).any()

    def transform(name, t):
        if name == "2":
            raise LayerError("no room for this one")
        if name == "1":
            return t[:, :3]  # a view: kept by reference, and checked like the activation
        return (t * 2).half()  # a new tensor: taken before the inplace ReLU runs

    with ActivationCapture(model, points, transform=transform) as capture:
        with torch.no_grad():
            model(x)
        acts = capture.take()  # nothing to run again: "0" was transformed before the ReLU
        assert list(acts) == ["input", "0", "1"] and list(capture.failures) == ["2"]
        assert "no room" in str(capture.failures["2"])
        torch.testing.assert_close(acts["0"], (pre * 2).half())
        torch.testing.assert_close(acts["1"], pre.clamp(min=0)[:, :3])
        # a view of a point that is then modified in place is caught as before
        model2 = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True))
        with ActivationCapture(
            model2, discover_probe_points(model2, x), transform=lambda n, t: t[:, :3]
        ) as c2:
            with torch.no_grad():
                model2(x)
            with pytest.raises(InplaceModified):
                c2.take()
    with ActivationCapture(model, points, transform=transform) as capture, torch.no_grad():
        model(x)
        model(x)  # a new pass starts a fresh set of failures too
        assert list(capture.failures) == ["2"]


def test_capture_unknown_module_is_an_error():
    model = tiny()
    with (
        pytest.raises(LayerError, match="no module named 'fc9'"),
        ActivationCapture(model, [_point("fc9", (3,))]),
    ):
        pass
    assert not model._forward_pre_hooks


def test_a_module_named_input_does_not_replace_the_model_input():
    model = nn.Sequential()
    model.add_module("input", nn.Linear(4, 3))
    with pytest.warns(UserWarning, match="module 'input' is not a probe point"):
        points = discover_probe_points(model, torch.randn(2, 4), inputs=True)
    assert [(p.name, p.shape) for p in points] == [("input", (4,)), ("input:in", (4,))]
