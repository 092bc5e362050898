"""The sweep spec: the one config surface of probeserve.

A `SweepSpec` says which checkpoints to probe, how to build the model they belong to, which
layers to probe, how to reduce their activations, which labelled data to probe with, how to
train each probe, what resources to use and where the results go. Specs live in YAML or JSON
files; command-line `--set key=value` options only override fields of a file. Every model
forbids unknown fields so that a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from probeserve.errors import SpecError

GiB = 1024**3
MiB = 1024**2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    steps: list[int] | None = Field(default=None, description="probe only these steps")

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
    return v


class ModelSpec(_Strict):
    """How to build the model the checkpoints belong to (weights are loaded into it)."""

    factory: str = Field(
        description="a built-in name (mlp, mnist_convnet, tiny) or 'package.module:function'"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    strict: bool = Field(default=True, description="every weight must match a parameter and back")


class LayersSpec(_Strict):
    """Which probe points to probe.

    Probe points are named after modules (`model.named_modules()`): `conv1` is the output of
    module `conv1`, `conv1:in` its input (the probe "before" the op, listed only with
    `inputs: true`), and `input` is the raw model input ("layer 0" in the paper).
    """

    include: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    exclude: list[str] = Field(default_factory=list)
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


class ParquetData(_DataCommon):
    """A user table: one input tensor column (list or fixed-size binary) and a label column."""

    kind: Literal["parquet"]
    uri: str
    input_column: str = "x"
    label_column: str = "label"
    shape: list[int] | None = Field(default=None, description="per-example input shape; default flat")
    split_column: str | None = Field(
        default=None, description="column with values train/val/test; otherwise a seeded split"
    )


DataSpec = Annotated[GaussianData | IdxData | ParquetData, Field(discriminator="kind")]


class ProbeSpec(_Strict):
    """The probe: softmax(W h + b), cross-entropy + l2/2 * ||W||^2, early-stopped on val.

    `lbfgs` is a full-batch quasi-Newton method that reaches the convex optimum; each epoch
    is one iteration over the whole train split, streamed in `batch_size` chunks when it
    does not fit in `memory_bytes`. `adam` is minibatch for very large splits.
    """

    solver: Literal["lbfgs", "adam"] = "lbfgs"
    learning_rate: float = Field(default=1e-3, gt=0, description="adam only")
    batch_size: int = Field(default=8192, gt=0, description="rows per chunk (adam: per step)")
    max_epochs: int = Field(default=300, gt=0)
    patience: int | None = Field(default=10, gt=0, description="epochs without val improvement; None: off")
    l2: float = Field(default=1e-4, ge=0, description="weight decay on W (not b), per example")
    standardize: bool = Field(default=True, description="z-score features with train statistics")
    tolerance: float = Field(default=1e-6, gt=0, description="stop when the relative loss change is smaller")
    memory_bytes: int = Field(default=4 * GiB, gt=0, description="hold a split in memory up to this size")
    seed: int = 0


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


class OutputSpec(_Strict):
    """Where activation shards and results go, and how shards are stored."""

    uri: str = Field(description="a path, file:// or s3://bucket/prefix")
    dtype: Literal["float32", "float16"] = Field(default="float32", description="activation shard dtype")
    max_shard_bytes: int = Field(default=256 * MiB, gt=0)
    keep_activations: bool = Field(default=True, description="keep shards after all probes committed")


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


class SweepSpec(_Strict):
    """A whole sweep: every (checkpoint, layer) pair it names is one idempotent work item."""

    run: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    checkpoints: CheckpointsSpec
    model: ModelSpec
    layers: LayersSpec = Field(default_factory=LayersSpec)
    reducer: ReducerSpec = Field(default_factory=ReducerSpec)
    data: DataSpec
    probe: ProbeSpec = Field(default_factory=ProbeSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    output: OutputSpec
    storage: StorageSpec = Field(default_factory=StorageSpec)

    def hash(self) -> str:
        """Identity of everything that changes a probe's answer (not where it runs).

        Which layers are selected is left out, so that adding layers to a run is allowed;
        `layers.inputs` is in, because it changes every probe point's `layer_index`.
        """
        keep = self.model_dump(mode="json", include={"model", "reducer", "data", "probe"})
        keep["layers.inputs"] = self.layers.inputs
        keep["output.dtype"] = self.output.dtype  # float16 shards can change an answer
        if self.resources.precision != "fp32":  # so is a bf16/fp16 forward; fp32 specs keep their hash
            keep["resources.precision"] = self.resources.precision
        blob = json.dumps(keep, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _format_validation_error(err: ValidationError, overridden: list[str] = ()) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the spec reference in the README)"
        elif e["type"] == "string_type" and isinstance(e.get("input"), (int, float, bool)):
            msg += " (put it in quotes)"
        if any(loc == k or loc.startswith(k + ".") for k in overridden):
            msg += " (from --set)"
        lines.append(f"{loc}: {msg}")
    return lines


class _Loader(yaml.SafeLoader):
    """YAML as JSON-like values: a date-like scalar (`run: 2024-01-01`) stays a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects


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
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def spec_from_dict(data: Any, *, source: str = "spec", overrides: list[str] = ()) -> SweepSpec:
    """Validate a plain mapping (with optional overrides) into a `SweepSpec`."""
    if data is None:
        raise SpecError(["(top level): the spec is empty"], source=source)
    if not isinstance(data, dict):
        raise SpecError([f"(top level): expected a mapping, got {type(data).__name__}"], source=source)
    try:
        data = json.loads(json.dumps(data))  # deep copy, and JSON-able only
    except (TypeError, ValueError) as e:
        raise SpecError([f"(top level): only plain values are allowed ({e})"], source=source) from None
    parsed = parse_overrides(list(overrides))
    for key, value in parsed:
        _set_dotted(data, key, value)
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_validation_error(e, [k for k, _ in parsed]), source=source) from None


def load_spec(path: str | os.PathLike[str], *, overrides: list[str] = ()) -> SweepSpec:
    """Read a YAML or JSON spec file; raise `SpecError` listing every problem with its field."""
    p = Path(path)
    if p.is_dir():
        raise SpecError([f"{p} is a folder; give the spec file (YAML or JSON)"], source=str(p))
    if not p.is_file():
        raise SpecError([f"spec file not found: {p}"], source=str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            [f"{p.name} is not UTF-8 text ({e.reason} at byte {e.start})"], source=str(p)
        ) from None
    except OSError as e:
        raise SpecError([f"cannot read {p}: {e.strerror}"], source=str(p)) from None
    try:
        data = json.loads(text) if p.suffix == ".json" else _yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SpecError([f"cannot parse {p.name}: {e}"], source=str(p)) from None
    return spec_from_dict(data, source=str(p), overrides=overrides)


def dump_spec(spec: SweepSpec) -> str:
    """The resolved spec (all defaults filled in) as YAML."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
