"""Probe points: where in a model a probe can look, which ones a sweep picks, and capturing them.

A probe point is a tensor the forward pass produces: the raw model input (`input`, the
paper's "layer 0"), the output of a named module (`conv1`), or, on request, the input of a
named module (`conv1:in`, the probe "before" an op). Points are discovered by running one
dummy batch through the model with hooks on every module and noting the order in which the
hooks fire, so the list is in forward order whatever the model's code looks like.

`ActivationCapture` then puts hooks on just the selected points, so that the extractor runs
the model ONCE per batch and gets every selected layer from that pass (never once per
layer). `make_reducer` builds the function that shrinks one point's activations to at most
`max_features` columns before they are stored.

Conventions worth knowing:

- A module called several times in one forward pass (a shared block) is probed at its
  first call only.
- A module whose output is a tuple, list, named tuple or mapping is probed at its first
  tensor (depth first); a module whose output holds no tensor, or one whose leading dimension
  is not the batch, is not a probe point.
- Discovery and extraction run the model in eval mode, so a module that runs only in
  training mode (Inception's auxiliary head) is not a probe point.
- A module named `input` is not a probe point (the name means the model input); a warning
  says so.
- A container module that is called (an `nn.Sequential` block) is a probe point of its own
  even though its output is also its last child's; `name:in` may likewise be the same tensor
  as the point before it. Such duplicates are harmless and keeping them keeps the rule simple.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import math
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

from probeserve.errors import LayerError
from probeserve.spec import ReducerSpec

INPUT = "input"
_INPUT_SUFFIX = ":in"
_MAX_NAMES_IN_ERROR = 40
_MAX_PROJECTION_BYTES = 1024**3
_MAX_NESTING = 4  # how deep `_first_tensor` looks into nested outputs


@dataclass(frozen=True)
class ProbePoint:
    """One probe-able tensor of the forward pass."""

    name: str  # "input", a module name (its output), or "module:in" (its input)
    index: int  # position in forward order; "input" is 0
    module: str  # the module's name; "" for the model input
    side: str  # "output" or "input"
    shape: tuple[int, ...]  # one example's activation shape, without the batch dimension
    n_features: int  # prod(shape)


def _first_tensor(value: Any, depth: int = 0) -> torch.Tensor | None:
    """The first tensor in a module's output: itself, or the first found depth first in a
    tuple, list, named tuple or mapping (Inception's `InceptionOutputs`, a dict of outputs)."""
    if isinstance(value, torch.Tensor):
        return value
    if depth >= _MAX_NESTING:
        return None
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item, depth + 1)
            if found is not None:
                return found
    return None


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    found = _first_tensor(args)
    return found if found is not None else _first_tensor(list(kwargs.values()))


def _batched(t: torch.Tensor | None, batch_size: int) -> TypeGuard[torch.Tensor]:
    return t is not None and t.dim() >= 1 and t.shape[0] == batch_size


def discover_probe_points(
    model: nn.Module, example: torch.Tensor, *, inputs: bool = False
) -> list[ProbePoint]:
    """Every probe point of `model`, in forward order, from one pass over `example`.

    `example` is a batch on the model's device; use at least 2 examples so that a tensor
    without a batch dimension is not mistaken for one. The pass runs in eval mode without
    gradients; each module's train/eval mode is restored afterwards. With `inputs=True`,
    each module's input is offered too, as `name:in`, just before the module's output.
    """
    batch_size = example.shape[0]
    found: dict[str, tuple[str, str, tuple[int, ...]]] = {INPUT: ("", "input", tuple(example.shape[1:]))}

    def note(name: str, module_name: str, side: str, t: torch.Tensor | None) -> None:
        if name not in found and _batched(t, batch_size):
            found[name] = (module_name, side, tuple(t.shape[1:]))

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            note(name + _INPUT_SUFFIX, name, "input", _first_input(args, kwargs))

        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            note(name, name, "output", _first_tensor(output))

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        for name, module in model.named_modules():
            if not name:
                continue  # the root's output is the last module's; its input is "input"
            if name == INPUT:
                warnings.warn(
                    f"module {INPUT!r} is not a probe point: the name means the model input "
                    f"(its input is still offered as '{INPUT}{_INPUT_SUFFIX}' with inputs=True)",
                    stacklevel=2,
                )
            if inputs:
                handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook(name)))
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training

    return [
        ProbePoint(name, i, module, side, shape, math.prod(shape))
        for i, (name, (module, side, shape)) in enumerate(found.items())
    ]


def _name_list(names: list[str]) -> str:
    if len(names) <= _MAX_NAMES_IN_ERROR:
        return ", ".join(names)
    shown = ", ".join(names[:_MAX_NAMES_IN_ERROR])
    return f"{shown}, ... ({len(names) - _MAX_NAMES_IN_ERROR} more)"


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def select_probe_points(
    points: list[ProbePoint], include: list[str], exclude: list[str], *, modules: Collection[str] = ()
) -> list[ProbePoint]:
    """The points matching any `include` pattern and no `exclude` pattern, in forward order.

    Patterns are exact names or `fnmatch` globs (`*` also matches `.`, so `hidden.*` takes
    every hidden sub-module). An include pattern that matches nothing is an error, since it
    is almost always a typo; an exclude pattern that matches nothing is not. `modules`, the
    model's module names, lets that error say when the pattern names a module that exists
    but did not run in the eval-mode pass (an auxiliary head).
    """
    names = [p.name for p in points]
    for pattern in include:
        if not any(_matches(n, pattern) for n in names):
            idle = [m for m in modules if m and _matches(m, pattern)]
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            if idle:
                hint = (
                    f" Module {idle[0]!r} exists but did not run in the eval-mode forward pass that "
                    "extraction uses (a head that runs only in training, such as Inception's AuxLogits, "
                    "is not a probe point)." + hint
                )
            raise LayerError(
                f"layers.include: {pattern!r} matches no probe point.{hint} "
                f"Available ({len(names)}): {_name_list(names)}"
            )
    chosen = [
        p
        for p in points
        if any(_matches(p.name, pat) for pat in include) and not any(_matches(p.name, pat) for pat in exclude)
    ]
    if not chosen:
        raise LayerError(
            f"layers: include {include} and exclude {exclude} leave no probe point. "
            f"Available ({len(names)}): {_name_list(names)}"
        )
    return chosen


# --- reducers ---------------------------------------------------------------------------


def _point_seed(seed: int, name: str) -> int:
    """A seed of its own per layer, the same in every process (unlike `hash(str)`)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Reducer:
    """Maps a batch of one point's activations `[B, *in_shape]` to `[B, n_features]` float32.

    `in_shape` is the point's per-example shape, `shape` the per-example output shape
    (`(n_features,)`). The output stays on the input's device. This base class flattens;
    the subclasses pool, pick a subset or project.
    """

    kind = "none"

    def __init__(self, spec: ReducerSpec, point: ProbePoint, n_features: int) -> None:
        self.point_name = point.name
        self.requested_kind = spec.kind
        self.max_features = spec.max_features
        self.seed = spec.seed
        self.in_shape = point.shape
        self.n_features = n_features
        self.shape = (n_features,)

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        if tuple(acts.shape[1:]) != self.in_shape:
            raise LayerError(
                f"layer {self.point_name!r}: activations of shape {list(acts.shape[1:])} per example, "
                f"expected {list(self.in_shape)} (the shape found when probe points were discovered)"
            )
        return self._reduce(acts)

    def _reduce(self, acts: torch.Tensor) -> torch.Tensor:
        return acts.reshape(acts.shape[0], -1).float()

    def describe(self) -> dict[str, Any]:
        """What was done to this layer, for the results table (JSON-able)."""
        return {
            "kind": self.kind,
            "requested_kind": self.requested_kind,
            "max_features": self.max_features,
            "seed": self.seed,
            "in_shape": list(self.in_shape),
            "out_shape": list(self.shape),
        }


def _is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor stored NHWC (channels_last) rather than in its plain NCHW order."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _largest_divisor_at_most(d: int, s: int) -> int:
    return max(g for g in range(1, min(d, s) + 1) if d % g == 0)


def _largest_grid(channels: int, spatial: tuple[int, ...], budget: int, size) -> tuple[int, ...]:
    """The largest grid `size(d, s)` per dim, over s, with channels * cells <= budget."""
    for s in range(max(spatial), 0, -1):
        candidate = tuple(size(d, s) for d in spatial)
        if channels * math.prod(candidate) <= budget:
            return candidate
    return (1,) * len(spatial)


# H*W*gh*gw: up to 1 MiB of pooling weights. Measured on 2 CPU cores, the one-GEMM pooling
# was faster than avg_pool2d up to this size (256 MACs per activation element) and about
# even with it there; past it, plain windows or one product per dim.
_KRON_MAX = 1 << 18


class _AvgPool(Reducer):
    """Average pooling: spatial dims to the largest square-ish grid that fits, then channels.

    For `[C, *spatial]` (1 to 3 spatial dims) every spatial dim is pooled to
    `min(dim, s)` for the largest `s` with `C * prod(min(dim, s)) <= max_features`. If even
    a 1x1 grid leaves more than `max_features` channels, neighbouring channels are averaged
    too. A flat `[D]` layer averages groups of consecutive features down to `max_features`.
    A grid whose cells tile each dim evenly is preferred (it pools with plain, fast
    windows) unless it keeps less than half the features of the best uneven grid, which
    adaptive pooling handles.
    """

    kind = "avgpool"

    def __init__(self, spec: ReducerSpec, point: ProbePoint) -> None:
        max_features = spec.max_features
        assert max_features is not None
        shape = point.shape
        if len(shape) == 1:
            self.pooled_shape: tuple[int, ...] = (max_features,)
            self.spatial: tuple[int, ...] = ()
            self.channels = max_features
        elif 2 <= len(shape) <= 4:
            channels, spatial = shape[0], shape[1:]
            grid = _largest_grid(channels, spatial, max_features, lambda d, s: min(d, s))
            # windows that tile each dim evenly pool several times faster than adaptive ones;
            # take them unless they keep far fewer features
            even = _largest_grid(channels, spatial, max_features, _largest_divisor_at_most)
            if 2 * math.prod(even) >= math.prod(grid):
                grid = even
            self.spatial = grid
            self.channels = min(channels, max_features)
            self.pooled_shape = (self.channels, *grid)
        else:
            raise LayerError(
                f"layer {point.name!r}: avgpool handles [C], [C, L], [C, H, W] or [C, D, H, W] "
                f"activations, not {list(shape)}; use reducer kind 'subset' or 'projection'"
            )
        super().__init__(spec, point, math.prod(self.pooled_shape))

    def _reduce(self, acts: torch.Tensor) -> torch.Tensor:
        x = acts.float()
        b = x.shape[0]
        if not self.spatial:  # flat layer: groups of consecutive features
            return F.adaptive_avg_pool1d(x.unsqueeze(1), self.channels).reshape(b, -1)
        dims = self.in_shape[1:]
        if len(dims) == 2 and self._kron_size() <= _KRON_MAX:
            # [B*C, H*W] @ [H*W, gh*gw], one GEMM that reads the activation once: faster
            # than avg_pool2d or adaptive_avg_pool2d on CPU, even or uneven windows
            # (jobs/benchmarks/bench_reducers.py)
            if _is_channels_last(x):  # NHWC storage: [gh*gw, H*W] @ [B, H*W, C], no copy of x
                pooled = torch.matmul(
                    self._kron(x.device).T, x.permute(0, 2, 3, 1).reshape(b, -1, x.shape[1])
                )
                x = pooled.transpose(1, 2)  # [B, C, gh*gw], as the NCHW path gives
            else:
                x = x.reshape(b * x.shape[1], -1) @ self._kron(x.device)
        elif all(d % g == 0 for d, g in zip(dims, self.spatial)):
            pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(self.spatial) - 1]
            x = pool(x, tuple(d // g for d, g in zip(dims, self.spatial)))
        else:  # adaptive windows as one small matrix product per dim (much faster on CPU)
            if len(dims) == 2:  # the common case, without moving axes: M_h^T (x M_w)
                x = self._matrix(dims[0], self.spatial[0], x.device).T @ (
                    x @ self._matrix(dims[1], self.spatial[1], x.device)
                )
            else:
                for axis, (d, g) in enumerate(zip(dims, self.spatial)):
                    m = self._matrix(d, g, x.device)
                    x = torch.movedim(torch.movedim(x, 2 + axis, -1) @ m, -1, 2 + axis)
        if self.channels < self.in_shape[0]:  # only when spatial dims are already 1
            x = F.adaptive_avg_pool1d(x.reshape(b, 1, -1), self.channels)
        return x.reshape(b, -1)

    def _kron_size(self) -> int:
        """Elements of the [H*W, gh*gw] pooling matrix."""
        return math.prod(self.in_shape[1:]) * math.prod(self.spatial)

    def _kron(self, device: torch.device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_matrices", {})
        key = ("kron", str(device))
        if key not in cache:
            (h, w), (gh, gw) = self.in_shape[1:], self.spatial
            cache[key] = torch.kron(self._matrix(h, gh, device), self._matrix(w, gw, device))
        return cache[key]

    def _matrix(self, d: int, g: int, device: torch.device) -> torch.Tensor:
        """[d, g] averaging weights of adaptive pooling: cell i spans floor(i*d/g)..ceil((i+1)*d/g)."""
        cache = self.__dict__.setdefault("_matrices", {})
        key = (d, g, str(device))
        if key not in cache:
            m = torch.zeros(d, g)
            for i in range(g):
                start, end = (i * d) // g, -((-(i + 1) * d) // g)
                m[start:end, i] = 1.0 / (end - start)
            cache[key] = m.to(device)
        return cache[key]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pooled_shape": list(self.pooled_shape)}


class _Subset(Reducer):
    """A fixed random subset of flat features (what the paper did for Inception v3).

    The indices come from a CPU `torch.Generator` seeded by the spec's seed and the layer
    name, so each layer gets its own subset and every process, every checkpoint and every
    batch gets the same one. Indices are sorted, which keeps the gather cache-friendly.
    """

    kind = "subset"

    def __init__(self, spec: ReducerSpec, point: ProbePoint) -> None:
        assert spec.max_features is not None
        super().__init__(spec, point, spec.max_features)
        g = torch.Generator().manual_seed(_point_seed(spec.seed, point.name))
        self.indices = torch.randperm(point.n_features, generator=g)[: spec.max_features].sort().values
        self._on_device: dict[tuple[torch.device, bool], torch.Tensor] = {}

    def _reduce(self, acts: torch.Tensor) -> torch.Tensor:
        if _is_channels_last(acts):
            # [B, C, H, W] stored as NHWC (resources.channels_last): flattening it in NCHW
            # order would copy the whole activation (7x to 33x the time of the pick itself);
            # pick from the NHWC view instead, each index moved to where its value lies there.
            # Same values, same order. index_select rather than gather on these scattered
            # indices: 1.1x to 4.9x faster single-threaded (jobs/benchmarks/bench_reducers.py).
            flat = acts.permute(0, 2, 3, 1).reshape(acts.shape[0], -1)  # a view
            return flat.index_select(1, self._indices_on(acts.device, nhwc=True)).float()
        flat = acts.reshape(acts.shape[0], -1)
        idx = self._indices_on(acts.device, nhwc=False)
        # gather with a broadcast index: up to 1.6x faster than index_select on CPU
        return torch.gather(flat, 1, idx.expand(flat.shape[0], -1)).float()

    def _indices_on(self, device: torch.device, *, nhwc: bool) -> torch.Tensor:
        key = (device, nhwc)
        idx = self._on_device.get(key)
        if idx is None:
            idx = self.indices
            if nhwc:  # NCHW flat index c*H*W + p (p = h*W + w) lies at p*C + c in NHWC
                channels, plane = self.in_shape[0], math.prod(self.in_shape[1:])
                idx = (idx % plane) * channels + idx // plane
            idx = self._on_device[key] = idx.to(device)
        return idx


class _Projection(Reducer):
    """A seeded Gaussian random projection `[D, max_features]`, scaled by 1/sqrt(max_features).

    The matrix is made on first use (not when the reducer is built) so that building the
    reducers of every layer costs no memory, and is kept on the device of the activations.
    """

    kind = "projection"

    def __init__(self, spec: ReducerSpec, point: ProbePoint) -> None:
        assert spec.max_features is not None
        size = point.n_features * spec.max_features * 4
        if size > _MAX_PROJECTION_BYTES:
            raise LayerError(
                f"layer {point.name!r}: a projection from {point.n_features} to {spec.max_features} "
                f"features needs a {size / 1024**3:.1f} GiB matrix (limit 1 GiB); use reducer kind "
                f"'subset' or 'avgpool' for this layer, or a smaller max_features"
            )
        super().__init__(spec, point, spec.max_features)
        self._matrix: torch.Tensor | None = None

    def matrix(self, device: torch.device | str = "cpu") -> torch.Tensor:
        if self._matrix is None:
            g = torch.Generator().manual_seed(_point_seed(self.seed, self.point_name))
            m = torch.randn(math.prod(self.in_shape), self.n_features, generator=g)
            self._matrix = m / math.sqrt(self.n_features)
        if self._matrix.device != torch.device(device):
            self._matrix = self._matrix.to(device)
        return self._matrix

    def _reduce(self, acts: torch.Tensor) -> torch.Tensor:
        return acts.reshape(acts.shape[0], -1).float() @ self.matrix(acts.device)


def make_reducer(spec: ReducerSpec, point: ProbePoint) -> Reducer:
    """The reducer of `spec` for `point`.

    A layer with at most `max_features` features is only flattened whatever the kind:
    pooling, subsetting or projecting it could only lose information or, for a projection
    to more dimensions, add none that a linear probe could use. `describe()["kind"]` then
    says "none".
    """
    if spec.kind == "none" or spec.max_features is None or point.n_features <= spec.max_features:
        return Reducer(spec, point, point.n_features)
    if spec.kind == "avgpool":
        return _AvgPool(spec, point)
    if spec.kind == "subset":
        return _Subset(spec, point)
    if spec.kind == "projection":
        return _Projection(spec, point)
    raise AssertionError(f"unhandled reducer kind {spec.kind!r}")


# --- capture ----------------------------------------------------------------------------


class InplaceModified(LayerError):
    """An inplace op overwrote captured activations after capture; those points are copied
    from now on, so running the same batch again gives correct values."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        super().__init__(f"layers {names} were modified in place after capture; run the batch again")


class ActivationCapture:
    """Context manager: hooks on the selected points; after `model(x)`, `take()` returns them.

    Usage::

        with ActivationCapture(model, points) as capture, torch.no_grad():
            for x in batches:
                model(x)
                acts = capture.take()  # {point name: tensor [B, *point.shape]}

    Captured tensors are kept by reference (copying every layer's activations costs as much
    as a good part of the forward pass), and their version counters are checked in
    `take()`: if a later inplace op (a `ReLU(inplace=True)` after a conv) overwrote one,
    `take()` raises `InplaceModified` and copies that point from then on, so the caller runs
    that batch again. Use `torch.no_grad()`, not `inference_mode()`: inference tensors have
    no version counter, so under inference mode every point is copied.

    With `transform(name, tensor)`, each activation is transformed inside its hook (reduced
    and cast, for extraction), and only the result is kept: the full activation is released
    as soon as the model is done with it, as in a plain forward pass, and an inplace op that
    runs later cannot touch a result that is a new tensor. A result that is a view of the
    activation is kept by reference and checked as above. An exception from `transform` fails
    that point alone: it is in `failures`, and `take()` leaves the point out.

    A new forward pass of the root model starts a fresh set, so `take()` always
    returns the last pass. Mode (eval) and gradients are the caller's business.
    """

    def __init__(
        self,
        model: nn.Module,
        points: list[ProbePoint],
        transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.points = list(points)
        self.transform = transform
        self._acts: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.copy: set[str] = set()  # points an inplace op overwrites: these are copied
        self.failures: dict[str, Exception] = {}  # of the last pass: transform errors by point

    def _keep(self, name: str, t: torch.Tensor | None) -> None:
        if name in self._acts or name in self.failures or t is None:
            return
        t = t.detach()
        if self.transform is not None:
            try:
                r = self.transform(name, t)
            except Exception as e:
                self.failures[name] = e
                return
            if r.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
                self._acts[name] = r  # a new tensor: nothing done to `t` later can change it
                return
            t = r  # a view of the activation: checked like the activation itself
        if name in self.copy or t.is_inference():  # inference tensors have no version counter
            t = t.clone()
        else:
            self._versions[name] = t._version
        self._acts[name] = t

    def __enter__(self) -> ActivationCapture:
        modules = dict(self.model.named_modules())
        wanted = {p.name for p in self.points}
        for p in self.points:
            if p.name != INPUT and p.module not in modules:
                raise LayerError(f"layer {p.name!r}: the model has no module named {p.module!r}")

        def root_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._acts, self._versions, self.failures = {}, {}, {}  # a new forward pass
            if INPUT in wanted:
                self._keep(INPUT, _first_input(args, kwargs))

        def pre_hook(name: str):
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                self._keep(name, _first_input(args, kwargs))

            return hook

        def post_hook(name: str):
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                self._keep(name, _first_tensor(output))

            return hook

        try:
            # Registered first, so it runs before any hook a point puts on the root itself.
            self._handles.append(self.model.register_forward_pre_hook(root_pre_hook, with_kwargs=True))
            for p in self.points:
                if p.name == INPUT:
                    continue
                module = modules[p.module]
                if p.side == "input":
                    handle = module.register_forward_pre_hook(pre_hook(p.name), with_kwargs=True)
                else:
                    handle = module.register_forward_hook(post_hook(p.name))
                self._handles.append(handle)
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._remove_hooks()
        self._acts = {}

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def take(self) -> dict[str, torch.Tensor]:
        """The activations of the last forward pass, by point name, in point order; clears them."""
        acts, self._acts = self._acts, {}
        # an activation kept by reference is only valid if nothing wrote to it afterwards
        overwritten = [n for n, v in self._versions.items() if acts[n]._version != v]
        self._versions = {}
        if overwritten:
            self.copy.update(overwritten)
            raise InplaceModified(overwritten)
        missing = [p.name for p in self.points if p.name not in acts and p.name not in self.failures]
        if missing:
            raise LayerError(
                f"layers {_name_list(missing)} produced no tensor in the last forward pass "
                "(was the model run inside the capture? does its forward skip these modules for this input?)"
            )
        return {p.name: acts[p.name] for p in self.points if p.name in acts}


# --- compiling between the probe points ---------------------------------------------------


def compile_regions(
    model: nn.Module, points: list[ProbePoint], compile_fn: Callable[[Callable], Callable] | None = None
) -> list[str]:
    """Compile the largest submodules that hold no probe point inside them; their names.

    `torch.compile` of the whole model would trace the capture hooks too, and they break its
    graph at every point (they store tensors in Python objects, read version counters). So
    each module with parameters whose descendants hold no selected point has its `forward`
    replaced by a compiled one, while `nn.Module.__call__`, which runs the hooks, stays eager:
    a point's own module is compiled as a whole and its hooks fire around it. For Inception v3
    and its 17 points that is each stem convolution and each Inception block, where nearly all
    the work is. Module code between regions (the model's own `forward`) stays eager.

    `compile_fn` defaults to `torch.compile`; call this before the first forward pass.
    """
    compile_fn = compile_fn or torch.compile
    inside = {p.module for p in points if p.module}
    done: set[int] = set()
    compiled: list[str] = []

    def has_params(m: nn.Module) -> bool:
        return next(m.parameters(), None) is not None

    def visit(name: str, module: nn.Module) -> None:
        if id(module) in done:
            return
        holds_point = any(m.startswith(name + ".") for m in inside) if name else bool(inside)
        if not holds_point:
            done.add(id(module))
            if has_params(module):
                module.forward = compile_fn(module.forward)
                compiled.append(name)
            return
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    visit("", model)
    if compiled and compile_fn is torch.compile:
        # Dynamo keeps up to `recompile_limit` (8) compiled versions per code object, and
        # blocks of one class share their `forward` code with different weights' shapes
        # (Inception v3's four Mixed_6 blocks): let every region keep its own.
        from torch import _dynamo

        config = _dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 2 * len(compiled) + 8))
    return compiled
