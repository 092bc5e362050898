"""The sweep spec: the one config surface of probeserve.

A `SweepSpec` says which checkpoints to probe, how to build the model they belong to, which
layers to probe, how to reduce their activations, which labelled data to probe with, how to
train each probe, what resources to use and where the results go. Specs live in YAML or JSON
files; command-line `--set key=value` options only override fields of a file. Every model
forbids unknown fields so that a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from probeserve.errors import SpecError

GiB = 1024**3
MiB = 1024**2


# The most threads `resources.torch_threads` may ask for. torch starts them all at once, and
# asking for 100,000 crashed the process (segmentation fault); no machine has more cores.
MAX_TORCH_THREADS = 1024
# The most decode processes `data.num_workers` may start: each is a Python process with its
# own buffers, and a typo (80000) would start that many before anything failed.
MAX_DECODE_WORKERS = 256
# torch's seed range (`torch.Generator.manual_seed` refuses anything outside it).
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _is_number_type(annotation: Any) -> bool:
    """int, float, or an optional one (not bool, which is an int to Python)."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return bool not in args and any(a in (int, float) for a in args)
    return False


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf`, `.nan` (YAML), `Infinity`, `NaN` (JSON) and overflowing
    # literals such as 1.0e+400 are refused in every float field, naming it.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _model_of(annotation: Any, value: Any) -> type[BaseModel] | None:
    """The spec model a section's value is validated as (for a tagged union, by its `kind`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is Annotated:
        return _model_of(typing.get_args(annotation)[0], value)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and isinstance(value, dict):
        for member in typing.get_args(annotation):
            kind = getattr(member, "model_fields", {}).get("kind")
            if kind is not None and value.get("kind") in typing.get_args(kind.annotation):
                return member
    return None


def _bool_number_errors(model: type[BaseModel], data: Any, path: list[int | str]) -> list[str]:
    """`field: expected a number` for every numeric field given true or false.

    pydantic reads true as 1, so `data.train_size: yes` would be one example; YAML reads yes,
    no, on and off as booleans, which makes this mistake easy to write.
    """
    if not isinstance(data, dict):
        return []
    errors = []
    for name, value in data.items():
        field = model.model_fields.get(name) if isinstance(name, str) else None
        if field is None:
            continue
        if isinstance(value, bool) and _is_number_type(field.annotation):
            errors.append(
                f"{field_path([*path, name])}: expected a number, got {str(value).lower()} "
                "(YAML reads yes/no/on/off as true/false)"
            )
        sub = _model_of(field.annotation, value)
        if sub is not None:
            errors += _bool_number_errors(sub, value, [*path, name])
    return errors


def check_uri(v: str) -> str:
    """A storage location `storage.open_storage` can open: a path, file:///path or s3://bucket/prefix.

    Every field that holds a location uses it, so that an empty value, an unsupported scheme
    or an s3:// URI without a bucket is refused naming the field, before anything runs. The
    value itself is not repeated: it may hold credentials.
    """
    if not v.strip():
        raise ValueError("empty; give a path, file:///path or s3://bucket/prefix")
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise ValueError("contains a control character (a newline, a tab or a NUL byte)")
    parts = urlsplit(v)
    if parts.scheme and len(parts.scheme) > 1 and (parts.username or parts.password):
        raise ValueError("credentials do not go in a URI; use the standard AWS chain")
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError("an s3:// URI needs a bucket, like s3://bucket/prefix")
    elif parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError("a file:// URI names a local path, like file:///data/x (three slashes)")
        if not parts.path:
            raise ValueError("a file:// URI needs a path, like file:///data/x")
    elif parts.scheme and len(parts.scheme) > 1:  # one letter: a Windows drive
        raise ValueError(
            f"unsupported scheme '{parts.scheme}://'; use a path, file:///path or s3://bucket/prefix"
        )
    return v


# `package.module` or `function.attr`: dotted Python names (no relative imports)
_DOTTED = re.compile(r"^[^\W\d]\w*(\.[^\W\d]\w*)*$")
# a layer name or glob: never empty (an empty pattern matches nothing)
_Pattern = Annotated[str, Field(min_length=1)]


class CheckpointsSpec(_Strict):
    """Where checkpoints are and how to recognise a complete one.

    Each object under `uri` whose key (relative to `uri`) matches `weights` is one checkpoint.
    Its step is the first group of `step_regex` searched in that relative key. With
    `completeness: marker` (the default) a checkpoint counts only once the marker object,
    written last by the training job, exists next to the weights file.
    """

    uri: str = Field(description="prefix holding checkpoints: a path, file:// or s3://bucket/prefix")
    weights: str = Field(
        default="*/model.safetensors",
        description="glob on keys relative to uri; '*' also matches '/'",
    )
    step_regex: str = Field(
        default=r"step[=_-]?(\d+)",
        description="regex searched in the relative key; its first group is the step",
    )
    completeness: Literal["marker", "stable_size", "none"] = Field(
        default="marker",
        description="marker: the marker object exists; stable_size: size unchanged for "
        "stable_seconds (for jobs that cannot write a marker); none: every weights file counts",
    )
    marker: str = Field(
        default="COMPLETE",
        description="marker key relative to the weights file's folder; {stem} is the weights "
        "file name without its extension",
    )
    stable_seconds: float = Field(default=120.0, gt=0)
    max_bytes: int = Field(default=16 * GiB, gt=0, description="refuse larger weights files")
    steps: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, description="probe only these steps"
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("an empty glob matches nothing; the default is */model.safetensors")
        return v

    @field_validator("steps")
    @classmethod
    def _some_steps(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not v:
            raise ValueError("an empty list probes no checkpoint; leave steps out (null) to probe every step")
        return v

    @field_validator("marker")
    @classmethod
    def _marker(cls, v: str) -> str:
        return _check_marker(v)

    @field_validator("step_regex")
    @classmethod
    def _one_group(cls, v: str) -> str:
        try:
            pattern = re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        if pattern.groups < 1:
            raise ValueError("needs one capturing group for the step, like step=(\\d+)")
        return v


def _check_marker(v: str) -> str:
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
    except ValueError as e:
        raise ValueError(f"not a valid template: {e}") from None
    unknown = [f for f in fields if f != "stem"]
    if unknown:
        raise ValueError(f"only {{stem}} may be used in the marker name, not {{{unknown[0]}}}")
    if not v.strip():
        raise ValueError("empty; name the object written last next to the weights file (default COMPLETE)")
    if v.startswith("/") or "\\" in v or any(p in ("", ".", "..") for p in v.split("/")):
        raise ValueError(
            "the marker is a key relative to the weights file's folder (like COMPLETE or {stem}.done); "
            "it may not start with '/' or hold empty, '.' or '..' parts"
        )
    return v


class ModelSpec(_Strict):
    """How to build the model the checkpoints belong to (weights are loaded into it)."""

    factory: str = Field(
        description="a built-in name (mini_inception, mlp, mnist_convnet, tiny) or 'package.module:function'"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    strict: bool = Field(default=True, description="every weight must match a parameter and back")

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str) -> str:
        # The built-in names live with the models (which need torch); this only checks the form.
        module, sep, attr = v.partition(":")
        if not v.strip():
            raise ValueError(
                "empty; give a built-in model (mini_inception, mlp, mnist_convnet, tiny) or 'package.module:function'"
            )
        if sep and not (_DOTTED.match(module) and _DOTTED.match(attr)):
            raise ValueError(f"{v!r} is not of the form 'package.module:function'")
        return v


class LayersSpec(_Strict):
    """Which probe points to probe.

    Probe points are named after modules (`model.named_modules()`): `conv1` is the output of
    module `conv1`, `conv1:in` its input (the probe "before" the op, listed only with
    `inputs: true`), and `input` is the raw model input ("layer 0" in the paper).
    """

    include: list[_Pattern] = Field(default_factory=lambda: ["*"], min_length=1)
    exclude: list[_Pattern] = Field(default_factory=list)
    inputs: bool = Field(default=False, description="also offer module inputs as 'name:in'")


class ReducerSpec(_Strict):
    """How to shrink a layer's activations before probing.

    `avgpool` average-pools spatial dimensions (or groups of features of a flat layer) until
    at most `max_features` remain; `subset` keeps a fixed random subset of `max_features`
    features (what the paper did for Inception v3); `projection` multiplies by a seeded
    Gaussian random matrix to `max_features` dimensions. Layers already small enough are
    left as they are.
    """

    kind: Literal["none", "avgpool", "subset", "projection"] = "none"
    max_features: int | None = Field(default=None, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _needs_size(self) -> ReducerSpec:
        if self.kind != "none" and self.max_features is None:
            raise ValueError(f"reducer kind '{self.kind}' needs max_features")
        return self


class _DataCommon(_Strict):
    train_size: int | None = Field(default=None, gt=0, description="examples in the train split (None: all)")
    val_size: int = Field(default=5000, gt=0)
    test_size: int | None = Field(default=None, gt=0, description="examples in the test split (None: all)")
    seed: int = Field(default=0, description="fixes which examples go to which split")


class GaussianData(_DataCommon):
    """The paper's section 3.2 toy problem: x ~ N(0, I_dim), y = [x . w > 0] for a seeded w."""

    kind: Literal["gaussian"]
    dim: int = Field(default=32, gt=0)
    train_size: int | None = Field(default=10000, gt=0)
    val_size: int = Field(default=2000, gt=0)
    test_size: int | None = Field(default=2000, gt=0)


class IdxData(_DataCommon):
    """MNIST-format IDX files in a folder: train-images-idx3-ubyte(.gz) and friends.

    With no `path`, the Fashion-MNIST files of the Debian package `dataset-fashion-mnist`
    are used. The validation split is carved from the training file; test is the test file.
    """

    kind: Literal["idx"]
    path: str | None = None
    scale: float = Field(default=1.0 / 255.0, description="multiplies the raw bytes")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return v if v is None else check_uri(v)


class ParquetData(_DataCommon):
    """A user table: one input tensor column (list or fixed-size binary) and a label column."""

    kind: Literal["parquet"]
    uri: str
    input_column: str = "x"
    label_column: str = "label"
    shape: list[Annotated[int, Field(gt=0)]] | None = Field(
        default=None, min_length=1, description="per-example input shape; default flat"
    )
    split_column: str | None = Field(
        default=None, description="column with values train/val/test; otherwise a seeded split"
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PROBE_SPLITS = ("train", "val", "test")


class ImagesData(_DataCommon):
    """Labelled images from a local folder or an `s3://` prefix (docs/images.md).

    Two layouts: a folder tree `{split}/{class}/{file}` (ImageFolder: sorted class names
    give the label ids) or Parquet files with an encoded-image column and an integer label
    column. Images are decoded and given the standard evaluation preprocessing (shorter side
    resized to `resize_size`, centre crop to `image_size`, then (x/255 - mean)/std) in
    `num_workers` worker processes. The example index (keys and labels per split) is frozen
    with the run the first time it is resolved, so every checkpoint sees the same examples.
    """

    kind: Literal["images"]
    uri: str = Field(description="a folder or Parquet file(s): a path, file:// or s3://bucket/prefix")
    layout: Literal["auto", "folder", "parquet"] = Field(
        default="auto", description="auto: parquet if the uri holds .parquet files, folder if it holds images"
    )
    splits: dict[str, str | None] | None = Field(
        default=None,
        description="probe split -> source split: a folder name (folder layout), the split a Parquet "
        "file is named after (train-*.parquet) or a value of split_column; val: null carves val "
        "from train. Default: train from 'train', test from 'test' if it is there (and labelled) "
        "else from 'val'/'validation', val from 'val'/'validation' when 'test' is used, else "
        "carved from train",
    )
    image_size: int = Field(default=224, gt=0, description="side of the square centre crop")
    resize_size: int | None = Field(
        default=None,
        gt=0,
        description="the shorter side is resized to this first; default image_size*256/224",
    )
    mean: list[float] = Field(default_factory=lambda: list(IMAGENET_MEAN), min_length=3, max_length=3)
    std: list[float] = Field(default_factory=lambda: list(IMAGENET_STD), min_length=3, max_length=3)
    num_workers: int | None = Field(
        default=None,
        ge=0,
        le=MAX_DECODE_WORKERS,
        description="decode processes; default min(8, CPUs); 0 decodes in this process",
    )
    image_column: str = Field(
        default="image", description="parquet: encoded image bytes, or a struct with 'bytes'"
    )
    label_column: str = Field(default="label", description="parquet: integer (or string) labels")
    split_column: str | None = Field(
        default=None,
        description="parquet: a column naming each row's split; otherwise files are named by split",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: dict[str, str | None] | None) -> dict[str, str | None] | None:
        if v is None:
            return v
        unknown = sorted(set(v) - set(_PROBE_SPLITS))
        if unknown:
            raise ValueError(f"keys are probe splits train, val, test; not {', '.join(map(repr, unknown))}")
        for split in ("train", "test"):
            if not v.get(split):
                raise ValueError(f"needs a source for {split} (only val may be null: carved from train)")
        return v

    @field_validator("std")
    @classmethod
    def _std(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be positive")
        return v

    @field_validator("resize_size")
    @classmethod
    def _crop_fits(cls, v: int | None, info: ValidationInfo) -> int | None:
        size = info.data.get("image_size")
        if v is not None and size is not None and v < size:
            raise ValueError(f"{v} is smaller than image_size {size}: the centre crop would not fit")
        return v

    def resolved_resize_size(self) -> int:
        return self.resize_size if self.resize_size is not None else round(self.image_size * 256 / 224)


class SyntheticImagesData(_DataCommon):
    """Seeded images generated on the device, no I/O: for measuring the compute ceiling.

    Each class has a smooth random template; an example is its class's template plus
    Gaussian noise, so probes on it do far better than chance. The same (split, example)
    gives the same image on every call on the same kind of device (CPU and CUDA random
    streams differ).
    """

    kind: Literal["synthetic_images"]
    shape: list[int] = Field(
        default_factory=lambda: [3, 224, 224], min_length=3, max_length=3, description="one image: [C, H, W]"
    )
    num_classes: int = Field(default=1000, ge=2)
    signal: float = Field(default=1.0, ge=0, description="template amplitude; the noise has std 1")
    train_size: int | None = Field(default=10000, gt=0)
    val_size: int = Field(default=2000, gt=0)
    test_size: int | None = Field(default=2000, gt=0)

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(d <= 0 for d in v):
            raise ValueError("every dimension must be positive")
        return v


DataSpec = Annotated[
    GaussianData | IdxData | ParquetData | ImagesData | SyntheticImagesData, Field(discriminator="kind")
]
_DATA_KINDS = [
    typing.get_args(m.model_fields["kind"].annotation)[0]
    for m in typing.get_args(typing.get_args(DataSpec)[0])
]


# The default `probe.l2`: 8 values spread evenly in log scale from 1e-6 to 1e-1 (numpy's
# logspace(-6, -1, 8)), each rounded to one significant digit; the rounding keeps 1e-4, the
# single default before the grid, in it. Every value is trained (stacked, one read of the
# data) and the one with the lowest validation error is the answer.
DEFAULT_L2_GRID = (1e-6, 5e-6, 3e-5, 1e-4, 7e-4, 4e-3, 2e-2, 1e-1)
OLD_DEFAULT_L2 = 1e-4  # `probe.l2` before the grid: runs recorded then carry it in their hash
MAX_L2_VALUES = 64  # every value is a stacked head with its own solver state
# Voita & Titov (2020)'s online-code blocks: the first 0.1% of the train split is sent with
# the uniform code, then each prefix's probe encodes the next block.
MDL_FRACTIONS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)


def _l2_value(v: Any, where: str) -> float:
    """One l2 value, with pydantic's words for what is wrong (a bool is no number)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"{where}expected a number or a list of numbers, got {_yaml_type(v)}")
    try:
        f = float(v)
    except ValueError:
        raise ValueError(
            f"{where}Input should be a valid number, unable to parse string as a number"
        ) from None
    if not math.isfinite(f):
        raise ValueError(f"{where}Input should be a finite number")
    if f < 0:
        raise ValueError(f"{where}Input should be greater than or equal to 0")
    return f


class ControlSpec(_Strict):
    """A control task (Hewitt & Liang, 2019): the same probe trained on random labels.

    The labels are drawn from the train split's label distribution, seeded by `seed` and by
    the identity of the run's data, so they are the same at every checkpoint, every layer and
    in every rerun. Per example by default; with `column`, per value of that column of a
    `parquet` table (examples that share a value share their control label, as Hewitt & Liang
    give each word type one).
    """

    column: str | None = Field(
        default=None,
        min_length=1,
        description="parquet data: one control label per value of this column; None: one per example",
    )
    seed: int = 0


class MdlSpec(_Strict):
    """Minimum description length probing (Voita & Titov, 2020): the online code length of
    the train labels, probes trained on growing prefixes each encoding the next block."""

    fractions: list[float] = Field(
        default=list(MDL_FRACTIONS),
        min_length=2,
        description="ends of the blocks, as fractions of the train split: increasing, the last 1.0",
    )

    @field_validator("fractions")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in v):
            raise ValueError("every fraction must be in (0, 1]")
        if any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError("fractions must increase")
        if v[-1] != 1.0:
            raise ValueError("the last fraction must be 1.0 (the whole train split is encoded)")
        return v


def _on_off(v: Any) -> Any:
    """`true` turns an opt-in section on with its defaults, `false` (or null) leaves it off."""
    if v is True:
        return {}
    if v is False:
        return None
    return v


class ProbeSpec(_Strict):
    """The probe: softmax(W h + b), cross-entropy + l2/2 * ||W||^2, early-stopped on val.

    `lbfgs` is a full-batch quasi-Newton method that reaches the convex optimum; each epoch
    is one iteration over the whole train split, streamed in `batch_size` chunks when it
    does not fit in `memory_bytes`. `adam` is minibatch for very large splits.

    `l2` is one value or a grid: every value is trained, stacked over one read of the data,
    and the answer is the probe with the lowest validation error (`probe.choose_l2`).
    """

    solver: Literal["lbfgs", "adam"] = "lbfgs"
    learning_rate: float = Field(default=1e-3, gt=0, description="adam only")
    batch_size: int = Field(default=8192, gt=0, description="rows per chunk (adam: per step)")
    max_epochs: int = Field(default=300, gt=0)
    patience: int | None = Field(default=10, gt=0, description="epochs without val improvement; None: off")
    l2: float | list[float] = Field(
        default=list(DEFAULT_L2_GRID),
        description="weight decay on W (not b), per example: one value, or a grid chosen on validation error",
    )
    standardize: bool = Field(default=True, description="z-score features with train statistics")
    tolerance: float = Field(default=1e-6, gt=0, description="stop when the relative loss change is smaller")
    memory_bytes: int = Field(
        default=4 * GiB,
        gt=0,
        description="ceiling on what one probe call holds on its device (all probes trained together): "
        "parameters, L-BFGS history, buffers and the splits kept in memory; splits that do not fit are streamed",
    )
    seed: int = 0
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="bfloat16: hold features in half the memory and run the two matrix products of a pass "
        "in bfloat16 with float32 accumulation (tensor cores on a GPU); moves the optimum slightly",
    )

    control: ControlSpec | None = Field(
        default=None, description="a control task: the same probe on seeded random labels (true: per example)"
    )
    mdl: MdlSpec | None = Field(
        default=None, description="the online code length of the train labels (true: on)"
    )
    confusion_max_classes: int = Field(
        default=100,
        gt=0,
        description="rows keep the test confusion matrix up to this many classes (num_classes^2 counts)",
    )

    @field_validator("seed")
    @classmethod
    def _torch_seed(cls, v: int) -> int:
        if not _SEED_MIN <= v <= _SEED_MAX:
            raise ValueError(f"{v} is outside torch's seed range, -2**63 to 2**64 - 1")
        return v

    @field_validator("l2", mode="before")
    @classmethod
    def _l2(cls, v: Any) -> float | list[float]:
        if isinstance(v, bool):
            return v  # `_bool_number_errors` names it (pydantic alone would read true as 1)
        if not isinstance(v, (list, tuple)):
            return _l2_value(v, "")
        if not v:
            raise ValueError("an empty list; give one value or a list of values >= 0")
        if len(v) > MAX_L2_VALUES:
            raise ValueError(
                f"{len(v)} values; at most {MAX_L2_VALUES} (each is a probe trained beside the others)"
            )
        values = [_l2_value(x, f"[{i}]: ") for i, x in enumerate(v)]
        seen = sorted(values)
        for a, b in itertools.pairwise(seen):
            if a == b:
                raise ValueError(f"{a} appears twice")
        return values

    @field_validator("control", "mdl", mode="before")
    @classmethod
    def _switch(cls, v: Any) -> Any:
        return _on_off(v)

    def l2_grid(self) -> list[float]:
        """The l2 values to train, in the order given."""
        return list(self.l2) if isinstance(self.l2, list) else [self.l2]


class ResourcesSpec(_Strict):
    """Where work runs. GPU amounts are Ray resource requests; they fall back to CPU."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    extract_batch_size: int = Field(default=256, gt=0)
    num_cpus_per_probe: float = Field(default=1.0, gt=0)
    num_gpus_per_probe: float = Field(default=0.25, ge=0)
    num_gpus_per_extract: float = Field(
        default=0.5, ge=0, description="leave room for probe actors on the same GPU"
    )
    max_checkpoints_in_flight: int = Field(
        default=4, gt=0, description="checkpoints extracted but not fully probed; bounds memory and storage"
    )
    torch_threads: int | None = Field(default=None, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="extraction's forward pass: fp32, or autocast to bf16 / fp16 (reducers still run in "
        "float32); recorded in every row, and part of the spec hash when not fp32",
    )
    channels_last: bool = Field(
        default=False, description="run conv models on NHWC (channels-last) tensors during extraction"
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the model's blocks between probe points during extraction (hooks stay eager)",
    )
    probes_per_call: int | None = Field(
        default=None,
        gt=0,
        description="probes of one checkpoint (layers) trained together in one call of a probe actor or the "
        "local runner; None: 1 on CPU, 8 on CUDA (so the GPU stays busy)",
    )
    max_actors: int | None = Field(
        default=None,
        gt=0,
        description="Ray runner: at most this many probe actors; None: as many as the cluster's resources hold",
    )

    @field_validator("torch_threads")
    @classmethod
    def _threads(cls, v: int | None) -> int | None:
        if v is not None and v > MAX_TORCH_THREADS:
            raise ValueError(
                f"{v} is more than {MAX_TORCH_THREADS}: torch starts every thread at once (too many crash "
                f"the process), and threads beyond the CPU cores only slow it down (this machine has {os.cpu_count()})"
            )
        return v


class OutputSpec(_Strict):
    """Where activation shards and results go, and how shards are stored."""

    uri: str = Field(description="a path, file:// or s3://bucket/prefix")
    dtype: Literal["float32", "float16"] = Field(default="float32", description="activation shard dtype")
    max_shard_bytes: int = Field(default=256 * MiB, gt=0)
    keep_activations: bool = Field(default=True, description="keep shards after all probes committed")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)


class StorageSpec(_Strict):
    """Storage settings beyond the standard AWS chain (credentials never go in a spec)."""

    s3_endpoint: str | None = Field(
        default=None,
        description="an S3-compatible endpoint URL; defaults to $PROBESERVE_S3_ENDPOINT, then AWS",
    )

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected a URL like http://127.0.0.1:9000 or https://s3.example.com")
        if parts.username or parts.password:
            raise ValueError("credentials do not go in the endpoint; use the standard AWS chain")
        return v

    def resolved_endpoint(self) -> str | None:
        return self.s3_endpoint or os.environ.get("PROBESERVE_S3_ENDPOINT") or None


# (section, field, default) for `hash`: fields added later that, at their default, leave every
# answer as it was. (Not `probe.l2`: its new default, a grid, changes answers, so a spec that
# does not set it has a new hash; `old_default_hint` says so when a run name is refused.)
_ADDED_AT_DEFAULT = [
    ("probe", "compute_dtype", "float32"),
    ("probe", "control", None),
    ("probe", "mdl", None),
    ("probe", "confusion_max_classes", 100),
]


class SweepSpec(_Strict):
    """A whole sweep: every (checkpoint, layer) pair it names is one idempotent work item."""

    run: str = Field(default="default", description="letters, digits, '.', '_', '-'; at most 128")
    checkpoints: CheckpointsSpec
    model: ModelSpec
    layers: LayersSpec = Field(default_factory=LayersSpec)
    reducer: ReducerSpec = Field(default_factory=ReducerSpec)
    data: DataSpec
    probe: ProbeSpec = Field(default_factory=ProbeSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    output: OutputSpec
    storage: StorageSpec = Field(default_factory=StorageSpec)

    @field_validator("run")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError(
                f"{v!r} is not a run name: it goes in keys and folder names, so use ASCII letters, digits, "
                "'.', '_' and '-' (at most 128, starting with a letter or digit)"
            )
        return v

    @model_validator(mode="after")
    def _output_outside_checkpoints(self) -> SweepSpec:
        # Discovery lists every key under checkpoints.uri: an output there would be listed on
        # every scan, and a weights glob that reaches it (`*`) probes probeserve's own files
        # as checkpoints, adding failed rows on every run.
        where = _overlap(self.checkpoints.uri, self.output.uri)
        if where:
            from pydantic_core import InitErrorDetails, PydanticCustomError

            message = (
                f"{self.output.uri} is {where} checkpoints.uri {self.checkpoints.uri}: every key there is "
                "listed as a possible checkpoint, so probeserve's own files would be scanned and, where "
                "checkpoints.weights matches them, probed as checkpoints; put the output elsewhere"
            )
            raise ValidationError.from_exception_data(
                "SweepSpec",
                [
                    InitErrorDetails(
                        type=PydanticCustomError("output_in_checkpoints", message),
                        loc=("output", "uri"),
                        input=self.output.uri,
                    )
                ],
            )
        return self

    @model_validator(mode="after")
    def _control_column(self) -> SweepSpec:
        control = self.probe.control
        if control is None or control.column is None:
            return self
        if self.data.kind == "images":
            why = (
                "image data has no column but the class folder, which is the label itself: control labels "
                "per class are the real classes renamed (or merged), so the control task would measure what "
                "the task does, not what a probe memorises; leave out column for a control label per example"
            )
        elif self.data.kind != "parquet":
            why = f"data.kind {self.data.kind} has no columns; leave it out for a control label per example"
        elif control.column == self.data.label_column:
            why = (
                f"{control.column!r} is data.label_column: control labels per class are the real classes "
                "renamed, so the control task would measure what the task does; name a column whose values "
                "recur across examples (a word type, a source id)"
            )
        else:
            return self
        return _field_error(("probe", "control", "column"), control.column, why)

    def hash(self) -> str:
        """Identity of everything that changes a probe's answer (not where it runs).

        Which layers are selected is left out, so that adding layers to a run is allowed;
        `layers.inputs` is in, because it changes every probe point's `layer_index`.
        """
        keep = self.model_dump(mode="json", include={"model", "reducer", "data", "probe"})
        keep["data"].pop("num_workers", None)  # images: how many processes decode, not what they see
        # Fields added after runs were recorded are left out at their default, so that a spec
        # written before they existed keeps its hash, and its run name keeps working.
        for section, name, default in _ADDED_AT_DEFAULT:
            if keep[section].get(name) == default:
                del keep[section][name]
        keep["layers.inputs"] = self.layers.inputs
        keep["output.dtype"] = self.output.dtype  # float16 shards can change an answer
        if self.resources.precision != "fp32":  # so is a bf16/fp16 forward; fp32 specs keep their hash
            keep["resources.precision"] = self.resources.precision
        blob = json.dumps(keep, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _field_error(loc: tuple[str, ...], value: Any, message: str) -> Any:
    """Raise a pydantic error at `loc` from a model validator (so it is named like any field's)."""
    from pydantic_core import InitErrorDetails, PydanticCustomError

    raise ValidationError.from_exception_data(
        "SweepSpec",
        [InitErrorDetails(type=PydanticCustomError("spec_field", message), loc=loc, input=value)],
    )


def old_default_hint(spec: SweepSpec, stored_hash: Any) -> str | None:
    """Why a run recorded before `probe.l2` became a grid refuses `spec`, when that is the
    only difference: the stored hash is this spec's with `probe.l2: 0.0001`."""
    if spec.probe.l2 != list(DEFAULT_L2_GRID):
        return None
    as_before = spec.model_copy(update={"probe": spec.probe.model_copy(update={"l2": OLD_DEFAULT_L2})})
    if as_before.hash() != stored_hash:
        return None
    return (
        f"probe.l2's default is now a grid of {len(DEFAULT_L2_GRID)} values chosen on validation; "
        f"set probe.l2: {OLD_DEFAULT_L2} to add to run {spec.run} as before, or use a new run name"
    )


def field_path(parts: tuple[int | str, ...] | list[int | str]) -> str:
    """`("layers", "include", 1)` -> `layers.include[1]`: how errors name a field."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _integral_text(value: Any) -> int | None:
    """The integer a string like '1e12' means, if it is one (YAML reads 1e12 as text)."""
    if not isinstance(value, str):
        return None
    try:
        f = float(value)
    except ValueError:
        return None
    return int(f) if math.isfinite(f) and f == int(f) else None


def _yaml_type(value: Any) -> str:
    """What a value is, in the words of YAML rather than Python."""
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _place(uri: str) -> tuple[str, str] | None:
    """(where, path) of a storage URI, to compare two of them: ("s3://bucket", prefix) or
    ("file", the real path, links resolved); None for a scheme storage does not know."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme == "s3":
        return f"s3://{parts.netloc}", parts.path.strip("/")
    if parts.scheme == "file":
        return "file", os.path.realpath(parts.path)
    if parts.scheme and len(parts.scheme) > 1:  # one letter: a Windows drive
        return None
    return "file", os.path.realpath(uri)


def _overlap(checkpoints_uri: str, output_uri: str) -> str | None:
    """'the same folder as' or 'inside' when the output lies in the checkpoints prefix; else None."""
    if not checkpoints_uri.strip() or not output_uri.strip():
        return None  # named by the fields' own checks
    ckpt, out = _place(checkpoints_uri), _place(output_uri)
    if ckpt is None or out is None or ckpt[0] != out[0]:
        return None
    if ckpt[1] == out[1]:
        return "the same location as"
    if ckpt[0] == "file":
        return "inside" if os.path.commonpath([ckpt[1], out[1]]) == ckpt[1] else None
    return "inside" if not ckpt[1] or out[1].startswith(ckpt[1] + "/") else None


def _format_validation_error(
    err: ValidationError, overridden: Sequence[str] = (), data: Any = None
) -> list[str]:
    # The tag of the `data` union (`data.gaussian.dim`) is pydantic's, not a field the user wrote.
    data_kind = (
        data.get("data", {}).get("kind")
        if isinstance(data, dict) and isinstance(data.get("data"), dict)
        else None
    )
    lines = []
    for e in err.errors():
        parts = list(e["loc"])
        if len(parts) > 1 and parts[0] == "data" and parts[1] == data_kind:
            del parts[1]
        loc = field_path(parts)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the spec reference in the README)"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif e["type"] == "string_type" and isinstance(e.get("input"), (int, float, bool)):
            msg += " (put it in quotes)"
        elif e["type"] in ("union_tag_not_found", "union_tag_invalid"):
            ctx = e.get("ctx", {})
            loc = field_path([*parts, ctx.get("discriminator", "'kind'").strip("'")])
            expected = ctx.get("expected_tags") or ", ".join(map(repr, _DATA_KINDS))
            msg = (
                f"required, one of {expected}"
                if e["type"] == "union_tag_not_found"
                else f"{ctx.get('tag')!r} is not one of {expected}"
            )
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            got = e.get("input")
            msg = "expected a mapping of fields, " + (
                "got nothing (a section header without fields?)" if got is None else f"got {_yaml_type(got)}"
            )
        elif e["type"] == "int_parsing" and _integral_text(e.get("input")) is not None:
            msg += f" (YAML reads {e['input']} as text: write {_integral_text(e['input'])})"
        elif e["type"] == "list_type" and isinstance(e.get("input"), (str, int, float)):
            # `--set layers.include=fc9`: one value where a list goes
            msg += f" (write [{e['input']}], or [a, b] for several)"
        if any(loc == k or loc.startswith((k + ".", k + "[")) for k in overridden):
            msg += " (from --set)"
        lines.append(f"{loc}: {msg}")
    return lines


# --- memory: refuse what cannot fit before anything is allocated ---------------------------


def memory_limit_bytes() -> int | None:
    """The memory this process may use: physical memory, or a lower cgroup (container) limit."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):  # not a POSIX system
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max", or v1's "no limit" near 2**63
            limits.append(int(text))
    return min(limits) if limits else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def memory_error(field: str, what: str, need: int) -> str | None:
    """`field: ...` when `need` bytes are more than this machine's memory, else None."""
    limit = memory_limit_bytes()
    if limit is None or need <= limit:
        return None
    return (
        f"{field}: {what} needs about {human_bytes(need)} of memory, more than the "
        f"{human_bytes(limit)} this machine has"
    )


def _memory_errors(spec: SweepSpec) -> list[str]:
    """Sizes whose arrays cannot fit in memory, found before any of them is allocated.

    Only generated data is sized by the spec alone (files bound idx and parquet data); it is
    held as float32, and each split is also copied to float64 once to compute its labels.
    """
    data = spec.data
    if not isinstance(data, GaussianData):
        return []
    sizes = {"train_size": data.train_size or 0, "val_size": data.val_size, "test_size": data.test_size or 0}
    need = sum(sizes.values()) * data.dim * 4 + max(sizes.values()) * data.dim * 8
    limit = memory_limit_bytes()
    # blame the dimension when even the default sizes (14,000 examples) would not fit
    field = (
        "dim" if limit is not None and 14_000 * data.dim * 8 > limit else max(sizes, key=sizes.__getitem__)
    )
    what = (
        f"the gaussian data ({sizes['train_size']} + {sizes['val_size']} + {sizes['test_size']} examples "
        f"of {data.dim} float32 features)"
    )
    err = memory_error(f"data.{field}", what, need)
    return [err] if err else []


# --- YAML and plain values ---------------------------------------------------------------

# How many values YAML aliases (`*name`) may add by repeating what they refer to. A spec
# needs a handful; a "billion laughs" document expands a few lines into 10**9 values.
MAX_ALIAS_EXPANSION = 10_000
# How deep a spec may nest. A spec is about 4 levels deep; model.kwargs may add a few.
MAX_DEPTH = 64
MAX_SPEC_BYTES = 16 * MiB


class _AliasError(yaml.YAMLError):
    pass


def _check_aliases(root: yaml.Node) -> None:
    """Refuse aliases that expand past MAX_ALIAS_EXPANSION values, or that refer to themselves.

    Walks the composed node graph once (iteratively: no recursion limit), computing each
    node's size with every alias expanded, as the spec's plain values will have it.
    """
    size: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children(node))
            continue
        if key in size:
            continue
        if key in open_nodes:  # reached again below itself
            raise _AliasError(
                f"a YAML alias refers to a value that contains it (line {node.start_mark.line + 1})"
            )
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children(node))
    added = size[id(root)] - len(size)
    if added > MAX_ALIAS_EXPANSION:
        raise _AliasError(
            f"YAML aliases expand to {added} more values, over the limit of {MAX_ALIAS_EXPANSION}; "
            "write the values out instead of repeating anchors"
        )


class _Loader(yaml.SafeLoader):
    """YAML as JSON-like values: a date-like scalar (`run: 2024-01-01`) stays a string,
    aliases may not expand past a small budget, and a key may not appear twice in a mapping
    (PyYAML keeps the last silently, so a second `probe:` section would replace the first)."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        if node is not None:
            _check_aliases(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = key_node.value
                if key in seen:
                    raise yaml.YAMLError(
                        f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                        f"{key_node.start_mark.line + 1}); the second would silently replace the first"
                    )
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml_message(e: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own text spans lines)."""
    problem = getattr(e, "problem", None)
    if not problem:
        return " ".join(str(e).split())
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(e, "context", None)
    return f"{context + ': ' if context else ''}{problem}{where}"


def _yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects
    except RecursionError:
        raise yaml.YAMLError(
            f"nested too deeply (a spec is a few levels deep; the limit is {MAX_DEPTH})"
        ) from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (json.loads keeps the last one silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(
                f"key {key!r} appears twice in one object; the second would silently replace the first"
            )
        out[key] = value
    return out


def _plain(value: Any, path: list[int | str]) -> Any:
    """A deep copy made only of JSON values; anything else is an error naming its field."""
    if len(path) > MAX_DEPTH:
        raise SpecError([f"{field_path(path[:MAX_DEPTH])}: nested deeper than {MAX_DEPTH} levels"])
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, [*path, i]) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, (bool, int, float)) or k is None:
                k = json.dumps(k)  # as JSON would: 1 -> "1", true -> "true", null -> "null"
            elif not isinstance(k, str):
                raise SpecError(
                    [f"{field_path(path)}: a key of type {type(k).__name__} ({k!r}); keys are text"]
                )
            out[k] = _plain(v, [*path, k])
        return out
    tags: dict[type, str] = {bytes: "binary data (!!binary)", set: "a set (!!set)"}
    what = tags.get(type(value), f"a {type(value).__name__}")
    raise SpecError(
        [f"{field_path(path)}: {what} is not a spec value; use numbers, text, lists and mappings only"]
    )


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise SpecError([f"{dotted}: '{p}' is not a section"], source="--set")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse `key.path=value` strings; the value is read as YAML (numbers, lists, null...), and
    one that is not YAML (`*/model.safetensors`, `{stem}.done`) is taken as a plain string."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError([f"{item!r}: expected key.path=value"], source="--set")
        try:
            value = _yaml(raw) if raw.strip() else None
        except _AliasError as e:
            raise SpecError([f"{key.strip()}: {e}"], source="--set") from None
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def spec_from_dict(data: Any, *, source: str = "spec", overrides: Sequence[str] = ()) -> SweepSpec:
    """Validate a plain mapping (with optional overrides) into a `SweepSpec`.

    Besides the fields' own rules, sizes are checked against this machine's memory
    (`_memory_errors`), so that a spec whose arrays cannot fit is refused before any is made.
    """
    if data is None:
        raise SpecError(["(top level): the spec is empty"], source=source)
    if not isinstance(data, dict):
        raise SpecError([f"(top level): expected a mapping, got {type(data).__name__}"], source=source)
    try:
        data = _plain(data, [])  # a deep copy, of JSON values only
    except SpecError as e:
        raise SpecError(e.errors, source=source) from None
    parsed = parse_overrides(list(overrides))
    for key, value in parsed:
        _set_dotted(data, key, value)
    errors = _bool_number_errors(SweepSpec, data, [])
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        errors += _format_validation_error(e, [k for k, _ in parsed], data)
    if errors:
        raise SpecError(errors, source=source)
    errors = _memory_errors(spec)
    if errors:
        raise SpecError(errors, source=source)
    return spec


def load_spec(path: str | os.PathLike[str], *, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read a YAML or JSON spec file; raise `SpecError` listing every problem with its field."""
    p = Path(path)
    if p.is_dir():
        raise SpecError([f"{p} is a folder; give the spec file (YAML or JSON)"], source=str(p))
    if p.exists() and not p.is_file():
        raise SpecError(
            [f"{p} is not a regular file (a device or a pipe?); give the spec file"], source=str(p)
        )
    if not p.is_file():
        raise SpecError([f"spec file not found: {p}"], source=str(p))
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError(
                [f"{p.name} is larger than {human_bytes(MAX_SPEC_BYTES)}; a spec is a few lines"],
                source=str(p),
            )
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            [f"{p.name} is not UTF-8 text ({e.reason} at byte {e.start})"], source=str(p)
        ) from None
    except OSError as e:
        raise SpecError([f"cannot read {p}: {e.strerror}"], source=str(p)) from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys) if p.suffix == ".json" else _yaml(text)
    except RecursionError:
        raise SpecError([f"cannot parse {p.name}: nested too deeply"], source=str(p)) from None
    except ValueError as e:  # json.JSONDecodeError included
        raise SpecError([f"cannot parse {p.name}: {e}"], source=str(p)) from None
    except yaml.YAMLError as e:
        raise SpecError([f"cannot parse {p.name}: {_yaml_message(e)}"], source=str(p)) from None
    return spec_from_dict(data, source=str(p), overrides=overrides)


def dump_spec(spec: SweepSpec) -> str:
    """The resolved spec (all defaults filled in) as YAML."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
