"""Build the model a sweep's checkpoints belong to, and the built-in models of the paper.

A checkpoint holds only weights, so probeserve needs the code that builds the matching
`nn.Module`. `ModelSpec.factory` names that code: a built-in name from `BUILTIN_MODELS`, or
`package.module:function` for a user's own factory, called with `ModelSpec.kwargs`. Every
way that can go wrong (unknown name, module not importable, attribute missing, a keyword
the factory does not take, a result that is not a module) becomes a `ModelError` that names
the factory, because these are spec mistakes, not bugs. So does a factory that ends the
process (`sys.exit`, a `KeyboardInterrupt` it raises itself): building a model is not a
reason for probeserve to exit with the factory's status. torch's own errors are cut to their
first line, without the C++ frames some builds append (`errors.first_line`).

The built-ins reproduce the models of Alain & Bengio (2016): the deep MLP of section 3.4
(with its auxiliary heads and the pathological skip connection) and the TensorFlow MNIST
convnet of Figure 4. Every operation is its own named module (no inplace ops, no
`nn.Sequential` wrappers around a layer) so that each one is a separate probe point and a
captured activation is never overwritten later in the forward pass.

Models may set `input_shape`, the shape of one example without the batch dimension; all
built-ins do. `example_input` uses it to make the dummy batch that discovers probe points.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import math
import re
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from probeserve.errors import ModelError, first_line
from probeserve.spec import ModelSpec, memory_error

_ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "identity")


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_size(name: str, what: str, weights: int) -> None:
    """Refuse a built-in model whose float32 weights cannot fit in memory, before allocating:
    torch would fail on one huge tensor, but fill memory layer by layer with many big ones."""
    err = memory_error(name, f"{what} ({weights} weights)", 4 * weights)
    if err:
        raise ValueError(err)


def _make_activation(activation: str, negative_slope: float) -> nn.Module:
    if activation == "relu":
        return nn.ReLU()
    if activation == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    if activation == "tanh":
        return nn.Tanh()
    if activation == "sigmoid":
        return nn.Sigmoid()
    if activation == "identity":
        return nn.Identity()
    raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}; got {activation!r}")


def _glorot_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class MLP(nn.Module):
    """The deep MLP of the paper's section 3.4.

    Layers are numbered as in the paper: layer 0 is the (flattened) input and hidden layer
    `k` (1 to `depth`) is `hidden.k`, made of `hidden.k.linear` then `hidden.k.act`. The
    final logits come from `head`. Module names and argument numbers therefore agree:
    `aux.k` reads the activation of hidden layer `k`, and the skip connection goes from the
    activation of layer `skip_from` (0: the input) into the linear of layer `skip_to`,
    whose input is `cat(activation of layer skip_to - 1, activation of layer skip_from)`.
    That skip is the paper's pathological shortcut: training routes around the layers in
    between, and their probes show it.

    Each hidden layer is a `ModuleDict` that is never called itself, so it is not a probe
    point of its own that would duplicate `hidden.k.act`. Auxiliary heads run only in
    `forward_with_aux`; `forward` returns the main logits and ignores them.
    """

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        depth: int,
        width: int,
        num_classes: int,
        activation: str,
        negative_slope: float,
        aux_every: int | None,
        skip_from: int | None,
        skip_to: int | None,
    ) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.skip_from = skip_from
        self.skip_to = skip_to
        input_dim = math.prod(input_shape)

        def width_of(layer: int) -> int:
            return input_dim if layer == 0 else width

        self.hidden = nn.ModuleDict()
        for k in range(1, depth + 1):
            in_features = width_of(k - 1)
            if k == skip_to:
                assert skip_from is not None
                in_features += width_of(skip_from)
            self.hidden[str(k)] = nn.ModuleDict(
                {
                    "linear": _glorot_linear(in_features, width),
                    "act": _make_activation(activation, negative_slope),
                }
            )
        self.head = _glorot_linear(width, num_classes)
        # An auxiliary head on the last hidden layer would duplicate `head`, so none there.
        aux_layers = range(aux_every, depth, aux_every) if aux_every else range(0)
        self.aux = nn.ModuleDict({str(k): _glorot_linear(width, num_classes) for k in aux_layers})

    def _run(self, x: torch.Tensor, *, with_aux: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = x.flatten(1)
        skip_source = h if self.skip_from == 0 else None
        aux_logits = []
        for key, layer in self.hidden.items():
            k = int(key)
            if k == self.skip_to:
                assert skip_source is not None  # skip_from < skip_to, checked at construction
                h = torch.cat([h, skip_source], dim=1)
            assert isinstance(layer, nn.ModuleDict)
            h = layer["act"](layer["linear"](h))
            if k == self.skip_from:
                skip_source = h
            if with_aux and key in self.aux:
                aux_logits.append(self.aux[key](h))
        return self.head(h), aux_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, with_aux=False)[0]

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits and the auxiliary heads' logits, in layer order (for training)."""
        return self._run(x, with_aux=True)


def mlp(
    *,
    input_dim: int | None = None,
    input_shape: list[int] | None = None,
    depth: int = 4,
    width: int = 128,
    num_classes: int = 10,
    activation: str = "relu",
    negative_slope: float = 0.5,
    aux_every: int | None = None,
    skip_from: int | None = None,
    skip_to: int | None = None,
) -> MLP:
    """The paper's deep MLP: `depth` hidden layers of `width` units, Glorot-normal init.

    `input_shape` (for example `[1, 28, 28]`) lets it take images, flattened first;
    `input_dim` is then optional and must agree. With neither, the input is 784 features.
    `activation` is relu, leaky_relu (slope `negative_slope`; the paper uses 0.5), tanh,
    sigmoid or identity. See `MLP` for `aux_every`, `skip_from` and `skip_to`.
    """
    if input_shape is not None:
        if not isinstance(input_shape, (list, tuple)) or not input_shape:
            raise ValueError(f"input_shape must be a non-empty list of sizes, got {input_shape!r}")
        shape = tuple(_check_int("input_shape[]", s, minimum=1) for s in input_shape)
        if input_dim is not None and input_dim != math.prod(shape):
            raise ValueError(
                f"input_dim={input_dim} disagrees with input_shape={list(shape)} "
                f"({math.prod(shape)} features); give only one of them"
            )
    else:
        shape = (_check_int("input_dim", 784 if input_dim is None else input_dim, minimum=1),)
    _check_int("depth", depth, minimum=1)
    _check_int("width", width, minimum=1)
    _check_int("num_classes", num_classes, minimum=2)
    _make_activation(activation, negative_slope)  # validates the name
    if aux_every is not None:
        _check_int("aux_every", aux_every, minimum=1)
    if (skip_from is None) != (skip_to is None):
        raise ValueError("skip_from and skip_to go together: set both or neither")
    if skip_from is not None:
        _check_int("skip_from", skip_from, minimum=0)
        assert skip_to is not None  # the two go together, checked above
        _check_int("skip_to", skip_to, minimum=1)
        if not skip_from < skip_to <= depth:
            raise ValueError(
                f"need 0 <= skip_from < skip_to <= depth; got skip_from={skip_from}, "
                f"skip_to={skip_to}, depth={depth} (0 is the input, 1..depth the hidden layers)"
            )
    input_dim = math.prod(shape)
    weights = input_dim * width + (depth - 1) * width * width + width * num_classes
    weights += (depth // aux_every if aux_every else 0) * width * num_classes
    weights += (input_dim if skip_from == 0 else width) * width if skip_from is not None else 0
    _check_size("width", f"an mlp of depth {depth} and width {width}", weights)
    return MLP(
        input_shape=shape,
        depth=depth,
        width=width,
        num_classes=num_classes,
        activation=activation,
        negative_slope=float(negative_slope),
        aux_every=aux_every,
        skip_from=skip_from,
        skip_to=skip_to,
    )


class MnistConvNet(nn.Module):
    """The TensorFlow MNIST tutorial convnet of the paper's Figure 4.

    Each op is its own module so that the probes of Figure 5 (conv1 pre-activation,
    post-activation, post-pooling, ...) are the probe points `conv1`, `relu1`, `pool1`, ...
    The flatten before `fc1` happens in `forward`, so it is not a probe point (it would
    only repeat `pool2`).
    """

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.input_shape = (in_channels, image_size, image_size)
        pooled = image_size // 2 // 2
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(pooled * pooled * 64, 512)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


def mnist_convnet(*, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> MnistConvNet:
    """The paper's Figure 4 convnet: 28x28 input, two 5x5 conv + 2x2 maxpool, fc 512, logits."""
    _check_int("num_classes", num_classes, minimum=2)
    _check_int("in_channels", in_channels, minimum=1)
    _check_int("image_size", image_size, minimum=4)
    _check_size(
        "image_size",
        f"an mnist_convnet for {image_size}x{image_size} images",
        (image_size // 4) ** 2 * 64 * 512,
    )
    return MnistConvNet(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


class Tiny(nn.Module):
    """Two linear layers and a ReLU: a model small enough for every unit test."""

    def __init__(self, *, input_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.input_shape = (input_dim,)
        self.fc1 = nn.Linear(input_dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def tiny(*, input_dim: int = 8, hidden: int = 16, num_classes: int = 2) -> Tiny:
    """A 2-layer MLP (`fc1`, `act`, `fc2`) for fast tests."""
    _check_int("input_dim", input_dim, minimum=1)
    _check_int("hidden", hidden, minimum=1)
    _check_int("num_classes", num_classes, minimum=2)
    _check_size(
        "hidden",
        f"a tiny model of {input_dim} inputs and {hidden} hidden units",
        (input_dim + num_classes) * hidden,
    )
    return Tiny(input_dim=input_dim, hidden=hidden, num_classes=num_classes)


# --- an Inception-shaped convnet of our own -----------------------------------------------


class InceptionOutputs(NamedTuple):
    """What `MiniInception` returns in training mode with its auxiliary head (as torchvision's
    Inception v3 does): the main logits and the auxiliary head's."""

    logits: torch.Tensor
    aux_logits: torch.Tensor | None


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm, ReLU: each a module of its own (no inplace op)."""

    def __init__(self, in_channels: int, out_channels: int, **conv: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class _Branches(nn.Module):
    """An Inception block: parallel branches of the same input, concatenated on channels.

    Subclasses build `self.paths`: a list of (modules applied in turn, or a pooling op name)
    whose outputs are concatenated in order."""

    def _path(self, x: torch.Tensor, steps: list[Any]) -> torch.Tensor:
        for step in steps:
            if step == "avg":
                x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
            elif step == "max":
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            elif isinstance(step, tuple):  # two convolutions of the same input, concatenated
                x = torch.cat([step[0](x), step[1](x)], 1)
            else:
                x = step(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._path(x, steps) for steps in self.paths()], 1)

    def paths(self) -> list[list[Any]]:
        raise NotImplementedError


class _BlockA(_Branches):
    """35x35 grid in Inception v3: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, cin: int, pool_features: int, w: float) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, _scaled(64, w), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, _scaled(48, w), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(_scaled(48, w), _scaled(64, w), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, _scaled(64, w), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(_scaled(64, w), _scaled(96, w), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(_scaled(96, w), _scaled(96, w), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, _scaled(pool_features, w), kernel_size=1)
        self.out_channels = _scaled(64, w) * 2 + _scaled(96, w) + _scaled(pool_features, w)

    def paths(self) -> list[list[Any]]:
        return [
            [self.branch1x1],
            [self.branch5x5_1, self.branch5x5_2],
            [self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3],
            ["avg", self.branch_pool],
        ]


class _BlockB(_Branches):
    """Grid reduction 35 -> 17: strided 3x3, strided double 3x3, max pooling."""

    def __init__(self, cin: int, w: float) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, _scaled(384, w), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, _scaled(64, w), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(_scaled(64, w), _scaled(96, w), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(_scaled(96, w), _scaled(96, w), kernel_size=3, stride=2)
        self.out_channels = _scaled(384, w) + _scaled(96, w) + cin

    def paths(self) -> list[list[Any]]:
        return [
            [self.branch3x3],
            [self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3],
            ["max"],
        ]


class _BlockC(_Branches):
    """17x17 grid: 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, cin: int, channels_7x7: int, w: float) -> None:
        super().__init__()
        c7, c192 = _scaled(channels_7x7, w), _scaled(192, w)
        row, col = {"kernel_size": (1, 7), "padding": (0, 3)}, {"kernel_size": (7, 1), "padding": (3, 0)}
        self.branch1x1 = BasicConv2d(cin, c192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, c192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, c192, **row)
        self.branch_pool = BasicConv2d(cin, c192, kernel_size=1)
        self.out_channels = 4 * c192

    def paths(self) -> list[list[Any]]:
        return [
            [self.branch1x1],
            [self.branch7x7_1, self.branch7x7_2, self.branch7x7_3],
            [
                self.branch7x7dbl_1,
                self.branch7x7dbl_2,
                self.branch7x7dbl_3,
                self.branch7x7dbl_4,
                self.branch7x7dbl_5,
            ],
            ["avg", self.branch_pool],
        ]


class _BlockD(_Branches):
    """Grid reduction 17 -> 8: strided 3x3 after 1x1, strided 3x3 after 1x7/7x1, max pooling."""

    def __init__(self, cin: int, w: float) -> None:
        super().__init__()
        c192 = _scaled(192, w)
        self.branch3x3_1 = BasicConv2d(cin, c192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(c192, _scaled(320, w), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, c192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(c192, c192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c192, c192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c192, c192, kernel_size=3, stride=2)
        self.out_channels = _scaled(320, w) + c192 + cin

    def paths(self) -> list[list[Any]]:
        return [
            [self.branch3x3_1, self.branch3x3_2],
            [self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4],
            ["max"],
        ]


class _BlockE(_Branches):
    """8x8 grid: the expanded block, whose 3x3 branches split into parallel 1x3 and 3x1."""

    def __init__(self, cin: int, w: float) -> None:
        super().__init__()
        c384 = _scaled(384, w)
        row, col = {"kernel_size": (1, 3), "padding": (0, 1)}, {"kernel_size": (3, 1), "padding": (1, 0)}
        self.branch1x1 = BasicConv2d(cin, _scaled(320, w), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, c384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(c384, c384, **row)
        self.branch3x3_2b = BasicConv2d(c384, c384, **col)
        self.branch3x3dbl_1 = BasicConv2d(cin, _scaled(448, w), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(_scaled(448, w), c384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c384, c384, **row)
        self.branch3x3dbl_3b = BasicConv2d(c384, c384, **col)
        self.branch_pool = BasicConv2d(cin, _scaled(192, w), kernel_size=1)
        self.out_channels = _scaled(320, w) + 4 * c384 + _scaled(192, w)

    def paths(self) -> list[list[Any]]:
        return [
            [self.branch1x1],
            [self.branch3x3_1, (self.branch3x3_2a, self.branch3x3_2b)],
            [self.branch3x3dbl_1, self.branch3x3dbl_2, (self.branch3x3dbl_3a, self.branch3x3dbl_3b)],
            ["avg", self.branch_pool],
        ]


class _AuxHead(nn.Module):
    """The auxiliary classifier on the 17x17 grid (pooled, 1x1 conv, conv, logits).

    Adaptive pooling instead of Inception v3's fixed 5x5/3 window, so that it also runs on
    the small inputs this model is meant for."""

    def __init__(self, cin: int, num_classes: int, w: float) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(5)
        self.conv0 = BasicConv2d(cin, _scaled(128, w), kernel_size=1)
        self.conv1 = BasicConv2d(_scaled(128, w), _scaled(768, w), kernel_size=5)
        self.fc = nn.Linear(_scaled(768, w), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv1(self.conv0(self.pool(x))).flatten(1))


class MiniInception(nn.Module):
    """Inception v3's layout at a fraction of its width, for tests and CPU benchmarks.

    The stem, the eleven Inception blocks (parallel branches concatenated), the auxiliary
    head and the classifier carry torchvision's `inception_v3` module names, so the paper's
    17 probe points select the same way on both (`jobs/examples/inception-v3.yaml`):
    `Conv2d_1a_3x3`, `Conv2d_2a_3x3`, `Conv2d_2b_3x3`, `Conv2d_3b_1x1`, `Conv2d_4a_3x3`,
    `Mixed_5b` ... `Mixed_7c` and `fc` (`MINI_INCEPTION_POINTS`). Every channel count is
    torchvision's times `width`.

    As in torchvision, the auxiliary head runs only in training mode, where `forward`
    returns `InceptionOutputs(logits, aux_logits)`; in eval mode (extraction) it returns the
    logits and the head is not a probe point.
    """

    def __init__(
        self, *, num_classes: int, image_size: int, width: float, aux_logits: bool, dropout: float
    ) -> None:
        super().__init__()
        self.input_shape = (3, image_size, image_size)
        w = width
        self.Conv2d_1a_3x3 = BasicConv2d(3, _scaled(32, w), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(_scaled(32, w), _scaled(32, w), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(_scaled(32, w), _scaled(64, w), kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(_scaled(64, w), _scaled(80, w), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(_scaled(80, w), _scaled(192, w), kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = _BlockA(_scaled(192, w), 32, w)
        self.Mixed_5c = _BlockA(self.Mixed_5b.out_channels, 64, w)
        self.Mixed_5d = _BlockA(self.Mixed_5c.out_channels, 64, w)
        self.Mixed_6a = _BlockB(self.Mixed_5d.out_channels, w)
        self.Mixed_6b = _BlockC(self.Mixed_6a.out_channels, 128, w)
        self.Mixed_6c = _BlockC(self.Mixed_6b.out_channels, 160, w)
        self.Mixed_6d = _BlockC(self.Mixed_6c.out_channels, 160, w)
        self.Mixed_6e = _BlockC(self.Mixed_6d.out_channels, 192, w)
        self.AuxLogits = _AuxHead(self.Mixed_6e.out_channels, num_classes, w) if aux_logits else None
        self.Mixed_7a = _BlockD(self.Mixed_6e.out_channels, w)
        self.Mixed_7b = _BlockE(self.Mixed_7a.out_channels, w)
        self.Mixed_7c = _BlockE(self.Mixed_7b.out_channels, w)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.Mixed_7c.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | InceptionOutputs:
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        block: nn.Module
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        aux = self.AuxLogits(x) if self.AuxLogits is not None and self.training else None
        for block in (self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        logits = self.fc(self.dropout(self.avgpool(x)).flatten(1))
        return InceptionOutputs(logits, aux) if aux is not None else logits


# The 17 probe points of the paper's Inception v3 sweep, by torchvision's module names: the
# five stem convolutions, the eleven Inception blocks and the logits. MiniInception has them too.
MINI_INCEPTION_POINTS = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "fc",
)


def mini_inception(
    *,
    num_classes: int = 1000,
    image_size: int = 75,
    width: float = 0.25,
    aux_logits: bool = True,
    dropout: float = 0.5,
) -> MiniInception:
    """Inception v3's layout (torchvision's module names) with every width times `width`.

    `image_size` is the side of the square RGB input; 75 is the smallest that passes every
    grid reduction (Inception v3 itself takes 299). `aux_logits` adds the auxiliary head,
    which runs in training mode only.
    """
    _check_int("num_classes", num_classes, minimum=2)
    _check_int("image_size", image_size, minimum=75)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 4:
        raise ValueError(f"width must be a number in (0, 4], got {width!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return MiniInception(
        num_classes=num_classes,
        image_size=image_size,
        width=float(width),
        aux_logits=bool(aux_logits),
        dropout=float(dropout),
    )


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "mnist_convnet": mnist_convnet,
    "tiny": tiny,
    "mini_inception": mini_inception,
}


@contextlib.contextmanager
def _telling_real_interrupts() -> Iterator[dict[str, bool]]:
    """Note whether a real SIGINT (Ctrl-C) arrives while user code runs.

    Then a KeyboardInterrupt from a real Ctrl-C still interrupts, and one the factory raised
    itself is an error of the factory. Only the main thread receives signals; where a signal
    handler of someone else's is installed, it is left alone (a KeyboardInterrupt then did not
    come from the default handler, so it is the factory's).
    """
    state = {"signalled": False}
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield state
        return

    def on_sigint(signum: int, frame: Any) -> None:
        state["signalled"] = True
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


def _stopped(factory: str, e: BaseException, doing: str) -> ModelError:
    """A ModelError for user code that tried to end the process instead of raising an error."""
    if isinstance(e, SystemExit):
        how = f"called sys.exit({e.code!r})"
    else:
        how = f"raised {type(e).__name__}" + (f": {first_line(e)}" if first_line(e) else "")
    return ModelError(
        f"model.factory {factory!r}: {how} while {doing}; user code must raise an exception, not end the process"
    )


@contextlib.contextmanager
def user_code(factory: str, doing: str) -> Iterator[None]:
    """Run the user's model code (its factory, its forward pass) so that it cannot end the
    process: `sys.exit()` or a BaseException of its own becomes a ModelError naming the
    factory; a real Ctrl-C still interrupts."""
    with _telling_real_interrupts() as interrupts:
        try:
            yield
        except Exception:
            raise
        except BaseException as e:  # sys.exit(), a KeyboardInterrupt of its own, ...
            if isinstance(e, KeyboardInterrupt) and interrupts["signalled"]:
                raise
            raise _stopped(factory, e, doing) from None


def _resolve_factory(factory: str) -> Callable[..., Any]:
    if factory in BUILTIN_MODELS:
        return BUILTIN_MODELS[factory]
    module_name, sep, attr_path = factory.partition(":")
    if not sep:
        raise ModelError(
            f"model.factory: unknown built-in model {factory!r}; built-ins are "
            f"{', '.join(sorted(BUILTIN_MODELS))}, or give an import path 'package.module:function'"
        )
    if not module_name or not attr_path:
        raise ModelError(f"model.factory: {factory!r} is not of the form 'package.module:function'")
    try:
        with user_code(factory, f"importing {module_name!r}"):
            obj: Any = importlib.import_module(module_name)
    except ModelError:
        raise
    except Exception as e:  # user code: an import can fail in any way, all of them are spec errors
        raise ModelError(
            f"model.factory {factory!r}: cannot import module {module_name!r}: {type(e).__name__}: {first_line(e)}"
        ) from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ModelError(
                f"model.factory {factory!r}: module {module_name!r} has no attribute {attr_path!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model.factory {factory!r}: {attr_path!r} is a {type(obj).__name__}, not callable")
    return obj


def kwargs_errors(factory: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> list[str]:
    """Every keyword the factory cannot take, one `model.kwargs.NAME: ...` line each, found
    before calling it (rather than relaying a bare TypeError for the first one)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; the call will tell
        return []
    params = sig.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [
        name
        for name, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown and not takes_any:
        takes = ", ".join(accepted) or "(no keyword arguments)"
        errors = []
        for k in unknown:
            close = difflib.get_close_matches(k, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(
                f"model.kwargs.{k}: factory {factory!r} does not take {k!r}{hint}; it takes: {takes}"
            )
        return errors
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        return [f"model.kwargs: factory {factory!r}: {e}"]
    return []


def model_errors(spec: ModelSpec) -> list[str]:
    """What is wrong with the model section that shows without building the model: a factory
    that cannot be found or imported, and every keyword it does not take."""
    try:
        fn = _resolve_factory(spec.factory)
    except ModelError as e:
        return [str(e)]
    return kwargs_errors(spec.factory, fn, spec.kwargs)


def _kwarg_field(kwargs: dict[str, Any], message: str) -> tuple[str, str]:
    """(`model.kwargs.width`, message) when a factory's message starts with that keyword (a
    leading `width:` is then dropped), else (`model.kwargs`, message)."""
    first = re.split(r"[\s=\[:]", message, maxsplit=1)[0]
    if first not in kwargs:
        return "model.kwargs", message
    return f"model.kwargs.{first}", message.removeprefix(f"{first}:").strip()


def build_model(spec: ModelSpec) -> nn.Module:
    """Call the factory `spec.factory` with `spec.kwargs`; the result has random weights."""
    fn = _resolve_factory(spec.factory)
    errors = kwargs_errors(spec.factory, fn, spec.kwargs)
    if errors:
        raise ModelError("; ".join(errors))
    try:
        with user_code(spec.factory, "building the model"):
            model = fn(**spec.kwargs)
    except ModelError:
        raise
    except (TypeError, ValueError) as e:
        field, message = _kwarg_field(spec.kwargs, first_line(e))
        raise ModelError(f"{field}: factory {spec.factory!r} rejected its arguments: {message}") from None
    except Exception as e:  # user code: report it on one line, naming the factory
        raise ModelError(
            f"model.factory {spec.factory!r} raised {type(e).__name__}: {first_line(e)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model.factory {spec.factory!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def example_input(model: nn.Module, batch_size: int = 2) -> torch.Tensor | None:
    """A random batch shaped like the model's input, or None if `model.input_shape` is unset.

    The batch is on the device of the model's first parameter, in its floating dtype.
    """
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return None
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn(batch_size, *tuple(shape), device=device, dtype=dtype)
