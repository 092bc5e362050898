"""Work items and the work functions every runner calls.

A work item is one (checkpoint, layer). It is done exactly when its result row is committed
under `{output}/results/`. The work for one checkpoint has two stages:

1. `extract`: one forward pass over the probe dataset fills activation shards for every
   pending layer at once (never one pass per layer), then publishes one manifest per layer
   under `{output}/activations/{run}/{checkpoint}/{layer}/manifest.json`. A layer's shards
   count only once its manifest exists, so a killed extraction leaves nothing that is used.
2. `probe`: for one layer, stream its shards, train the probe, and return the result row.

The in-process runner and the Ray runner both call exactly these functions, so they give
the same answers for the same spec.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from probeserve import layout, results
from probeserve.checkpoints import (
    Checkpoint,
    Discovery,
    check_dtypes,
    describe_casts,
    discover,
    load_state_dict,
)
from probeserve.errors import (
    CheckpointError,
    LayerError,
    ModelError,
    ProbeserveError,
    SpecError,
    StorageError,
    describe_error,
)
from probeserve.markers import HEARTBEAT_S, STALE_BEATS, Heartbeat, marker_state  # noqa: F401
from probeserve.spec import SweepSpec, dump_spec, old_default_hint
from probeserve.storage import LocalStorage, Storage, join, open_storage

if TYPE_CHECKING:  # for annotations only: these modules load lazily, where used
    from probeserve.data import Dataset
    from probeserve.layers import ProbePoint
    from probeserve.probe import ProbeData

log = logging.getLogger("probeserve")

SPLITS = ("train", "val", "test")
ACTIVATIONS_DIR = results.ACTIVATIONS_DIR
MANIFEST_MAX_BYTES = 64 << 20  # a manifest lists a layer's parts; far below this
RUNS_DIR = results.RUNS_DIR
DATA_INDEX = layout.DATA_INDEX  # runs/{run}/data/index.parquet: the frozen image index
MAX_SKIPPED_NAMES = 1000  # undecodable images named in a manifest (the row keeps 100)
# A layer's path-safe name is a file name in the output (`{name}.parquet`), and local file
# systems hold at most 255 bytes in one.
MAX_LAYER_STEM_BYTES = 255 - len(".parquet")


@dataclass(frozen=True)
class Item:
    checkpoint: Checkpoint
    layer: str
    layer_index: int


@dataclass
class Plan:
    """Every item of a sweep with its state: done (ok row), failed (failed row) or pending."""

    discovery: Discovery
    items: list[tuple[Item, str]] = field(default_factory=list)
    bytes_per_item: dict[str, int] = field(default_factory=dict)  # layer -> activation bytes

    def pending(self) -> list[Item]:
        return [i for i, s in self.items if s != "ok"]

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "failed": 0, "pending": 0}
        for _, s in self.items:
            out[s] += 1
        return out


def configure_torch(spec: SweepSpec) -> None:
    """Apply `resources.torch_threads` in this process; every runner and worker calls it.

    Unset, torch keeps its default (all cores in-process, the worker's CPU share under Ray);
    results then agree across runners to floating-point rounding, not bit for bit."""
    threads = spec.resources.torch_threads
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """Have glibc keep freed activation memory for the next batch; True if it was set.

    Extraction allocates the same large activations batch after batch, with small, longer-
    lived allocations (reduced rows, shard buffers) in between. glibc then returns the freed
    blocks to the OS and takes them back on the next batch, so every page is faulted in and
    zeroed again: on mnist_convnet (2 CPU cores), about 270,000 page faults per 5,000 images
    (`jobs/benchmarks/bench_extract.py --glibc-default-malloc`). Serving blocks up to 32 MiB
    from the heap and trimming it only past 1 GiB free removes them. The cost is
    that the process keeps its peak heap; extraction runs in a worker of its own under Ray.
    A no-op where the C library is not glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: other C libraries' mallopt differ
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    _MALLOC_TUNED = (
        libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    )
    return _MALLOC_TUNED


def release_freed_memory() -> bool:
    """Give the memory an extraction freed back to the OS; True if the C library did.

    `keep_freed_memory` has glibc keep freed blocks for the next batch, so a process holds
    the peak heap of its last extraction for as long as it lives. A Ray worker lives on after
    its task, waiting to be reused, and would hold that peak (hundreds of MB on a small
    convnet, far more on a large model) on every node that ever extracted. So an extraction
    task ends here: `malloc_trim(0)` returns the free pages of every arena (glibc also
    releases free pages inside the heap, not only at its top), and cached CUDA blocks go back
    to the driver. The worker keeps what it caches on purpose: the probe dataset, for the next
    checkpoint. Letting the worker exit instead (Ray's `max_calls=1`) cost a new worker,
    importing torch, per checkpoint (docs/benchmarks.md).
    """
    # no gc.collect(): the extraction's arrays are freed by reference counting when it returns,
    # and a full collection with torch loaded takes about 0.4 s (2 cores), per checkpoint
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "malloc_trim"):  # glibc only
        return False
    return libc.malloc_trim(0) == 1


def layer_prefix(run: str, ckpt: Checkpoint, layer: str) -> str:
    return layout.layer_prefix(run, ckpt.key, ckpt.step, layer)


def manifest_key(run: str, ckpt: Checkpoint, layer: str) -> str:
    return layout.manifest_key(run, ckpt.key, ckpt.step, layer)


def shard_keys(storage: Storage, prefix: str) -> list[str]:
    """The shard parts under one layer's prefix, as listed now: `{split}/part-NNNNN.parquet`
    keys only, so that nothing else a user may have put there is ever deleted."""
    start = len(prefix) + 1
    return [o.key for o in storage.list(prefix + "/") if layout.is_shard_part(o.key[start:])]


def publish_if_changed(storage: Storage, key: str, data: bytes) -> bool:
    """Publish `data` under `key` unless it holds exactly that already; True if it wrote."""
    if storage.stat(key) is not None:
        try:
            if storage.read_bytes(key, max_bytes=len(data)) == data:
                return False
        except StorageError:
            pass  # larger, or gone since the stat: write it
    storage.publish_bytes(key, data)
    return True


class Sweep:
    """What a spec resolves to: storage, dataset, model probe points. Built lazily per process."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.spec_hash = spec.hash()

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "spec_hash": self.spec_hash}  # caches are rebuilt where used

    @cached_property
    def checkpoints_storage(self) -> Storage:
        return open_storage(self.spec.checkpoints.uri, s3_endpoint=self.spec.storage.resolved_endpoint())

    @cached_property
    def output(self) -> Storage:
        return results.open_output(
            self.spec.output.uri, s3_endpoint=self.spec.storage.resolved_endpoint(), must_exist=False
        )

    @cached_property
    def dataset(self) -> Dataset:
        from probeserve.data import load_dataset

        # images: the run's frozen example index, once record_spec has published it
        frozen = (self.output, results.run_key(self.spec.run, DATA_INDEX))
        return load_dataset(self.spec.data, s3_endpoint=self.spec.storage.resolved_endpoint(), frozen=frozen)

    def build_model(self) -> torch.nn.Module:
        from probeserve.models import build_model

        return build_model(self.spec.model)

    def example_input(self) -> torch.Tensor:
        return torch.zeros((2, *self.dataset.input_shape))

    @cached_property
    def all_points(self) -> list[ProbePoint]:
        from probeserve.layers import discover_probe_points
        from probeserve.models import user_code

        model = self.build_model().eval()
        self._module_names = [name for name, _ in model.named_modules()]  # for select's errors
        try:
            with user_code(self.spec.model.factory, "running the model's forward pass"):
                return discover_probe_points(model, self.example_input(), inputs=self.spec.layers.inputs)
        except ProbeserveError:
            raise
        except Exception as e:
            raise ModelError(
                f"model.factory {self.spec.model.factory}: a forward pass on the probe data's input shape "
                f"{tuple(self.dataset.input_shape)} failed: {describe_error(e)}"
            ) from None

    @cached_property
    def points(self) -> list[ProbePoint]:  # the selected ones, in forward order
        from probeserve.layers import select_probe_points

        return select_probe_points(
            self.all_points,
            self.spec.layers.include,
            self.spec.layers.exclude,
            modules=getattr(self, "_module_names", ()),
        )

    def point(self, layer: str):
        for p in self.points:
            if p.name == layer:
                return p
        raise ProbeserveError(f"layer {layer!r} is not selected by this spec")

    def reducer(self, point):
        from probeserve.layers import make_reducer

        return make_reducer(self.spec.reducer, point)

    def discover(self) -> Discovery:
        found = discover(self.checkpoints_storage, self.spec.checkpoints)
        if not found.complete and not found.incomplete:
            self._blame_steps_or_regex(found)
            raise CheckpointError(
                f"checkpoints.uri: no checkpoints under {self.checkpoints_storage.uri} match "
                f"checkpoints.weights {self.spec.checkpoints.weights!r}"
                + (
                    f" ({len(found.rejected)} key(s) rejected, e.g. {found.rejected[0]})"
                    if found.rejected
                    else ""
                )
            )
        return found

    def _blame_steps_or_regex(self, found: Discovery) -> None:
        """Name the field that left no checkpoint, when it is not `checkpoints.uri`: a step
        regex that reads no step number from any key, or `steps` that none of them has."""
        spec = self.spec.checkpoints
        no_step = [(k, why) for k, why in found.rejected if "step_regex" in why or "not an integer" in why]
        if no_step and len(no_step) == len(found.rejected):
            key, why = no_step[0]
            raise CheckpointError(
                f"checkpoints.step_regex: {spec.step_regex!r} reads no step number from the {len(no_step)} "
                f"key(s) that match checkpoints.weights, e.g. {key} ({why}); its group 1 must match the digits"
            )
        if spec.steps is not None:
            every = discover(self.checkpoints_storage, spec.model_copy(update={"steps": None}))
            steps = sorted({c.step for c in every.complete + every.incomplete})
            if steps:
                shown = ", ".join(map(str, steps[:10])) + (", ..." if len(steps) > 10 else "")
                raise CheckpointError(
                    f"checkpoints.steps: none of {spec.steps} is the step of a checkpoint under "
                    f"{self.checkpoints_storage.uri}; there are steps {shown}"
                )

    def check_layer_names(self) -> None:
        """Refuse, before any work, a selected layer whose name cannot be a key: its row
        could not even be committed as failed, so the run would stop halfway."""
        for p in self.points:
            size = len(results.layer_stem(p.name).encode())
            if size > MAX_LAYER_STEM_BYTES:
                raise LayerError(
                    f"layer {p.name[:60]!r}... ({len(p.name)} characters): made path-safe it is {size} bytes, "
                    f"over the {MAX_LAYER_STEM_BYTES} a file name in the output can hold; leave it out "
                    "with layers.exclude"
                )

    def plan(self) -> Plan:
        self.check_layer_names()
        found = self.discover()
        status = results.item_status(self.output, self.spec.run)
        plan = Plan(discovery=found)
        itemsize = 2 if self.spec.output.dtype == "float16" else 4
        rows = sum(self.dataset.size(s) for s in SPLITS)
        for p in self.points:
            plan.bytes_per_item[p.name] = rows * self.reducer(p).n_features * itemsize
        for ckpt in found.complete:
            for p in self.points:
                plan.items.append((Item(ckpt, p.name, p.index), status.get((ckpt.key, p.name), "pending")))
        return plan

    def record_spec(self, *, run_level: bool = False) -> None:
        """Save the resolved spec beside the results; refuse a run name used by another spec.

        Also publish the selected layers (`runs/{run}/layers.json`) for `probeserve status`,
        which reads progress without building the model. First, refuse an output in another
        layout or schema (`results.check_layout`): nothing is written to one.

        The first spec recorded under a run name stays its record, unless `run_level`: the watch
        daemon records its own spec before it submits anything, and replaces a record of the
        same hash, because the sweeps it submits are restricted to one checkpoint each and their
        restriction (`checkpoints.steps: [N]`) must not become what the run covers.

        Each object is read first and written only when it is missing or differs, so a rerun
        over a finished output writes nothing (on S3, every write is a billed request, and the
        watch daemon reruns on every scan).
        """
        results.check_layout(self.output)
        key = results.run_key(self.spec.run, "spec.json")
        yaml_key = results.run_key(self.spec.run, "spec.yaml")
        record: dict[str, Any] = {"spec_hash": self.spec_hash, "spec": self.spec.model_dump(mode="json")}
        ckpt_uri = self.spec.checkpoints.uri
        if "://" not in ckpt_uri and not os.path.isabs(ckpt_uri):
            # a relative checkpoints.uri means the folder this run ran in; `status` run from
            # another folder (with a `ckpts/` of its own) would otherwise count other checkpoints
            record["ran_in"] = os.getcwd()
        body = json.dumps(record, indent=2)
        if self.output.stat(key) is None and self.output.create_only(key, body.encode()):
            self.output.publish_bytes(yaml_key, dump_spec(self.spec).encode())
        else:
            stored = results.read_json(self.output, key)
            if (
                run_level
                and stored.get("spec_hash") == self.spec_hash
                and stored.get("spec") != json.loads(body)["spec"]
            ):
                self.output.publish_bytes(key, body.encode())
                self.output.publish_bytes(
                    results.run_key(self.spec.run, "spec.yaml"), dump_spec(self.spec).encode()
                )
            if stored.get("spec_hash") != self.spec_hash:
                hint = old_default_hint(self.spec, stored.get("spec_hash"))
                raise SpecError(
                    [
                        f"run: run {self.spec.run!r} in {self.output.uri} was made with a different spec "
                        f"(hash {stored.get('spec_hash')} vs {self.spec_hash}: "
                        + (
                            f"{hint})"
                            if hint
                            else "model, data, reducer, probe or layers.inputs changed); "
                            "choose another run name or output.uri"
                        )
                    ]
                )
            if self.output.stat(yaml_key) is None:  # the run that bound the name died before it
                self.output.publish_bytes(yaml_key, dump_spec(self.spec).encode())
        layers = [{"layer": p.name, "layer_index": p.index} for p in self.points]
        publish_if_changed(
            self.output, results.run_key(self.spec.run, "layers.json"), json.dumps(layers).encode()
        )
        self.record_data()

    def record_data(self) -> None:
        """Freeze the run's example index (images: every later process and checkpoint reads
        the same examples, even if the bucket changes) and publish its class names. Like
        `record_spec`, it writes nothing when both are there already."""
        ds = self.dataset
        freeze = getattr(ds, "freeze", None)
        index_key = results.run_key(self.spec.run, DATA_INDEX)
        if freeze is not None and self.output.stat(index_key) is None:
            freeze(self.output, index_key)
        if ds.class_names is not None:
            publish_if_changed(
                self.output,
                results.run_key(self.spec.run, "classes.json"),
                json.dumps(list(ds.class_names)).encode(),
            )

    def manifest(self, ckpt: Checkpoint, layer: str) -> dict[str, Any] | None:
        key = manifest_key(self.spec.run, ckpt, layer)
        if self.output.stat(key) is None:
            return None
        try:
            return results.read_json(self.output, key)
        except results.Damaged as e:
            # damaged (cut short, edited by hand): as if absent, so the layer is extracted again
            log.warning("%s; extracting layer %s of %s again", e, layer, ckpt.key)
            return None
        except StorageError:
            if self.output.stat(key) is None:
                return None  # another run deleted it since the stat: its item is committed
            raise

    def failed_row(self, ckpt: Checkpoint, layer: str, layer_index: int, error: str, seconds: float) -> dict:
        return results.make_row(
            run=self.spec.run,
            spec_hash=self.spec_hash,
            checkpoint=ckpt.key,
            step=ckpt.step,
            layer=layer,
            layer_index=layer_index,
            status="failed",
            error=error,
            seconds=seconds,
            precision=self.spec.resources.precision,
        )


_MAX_LOAD_ERROR = 1000  # characters of load_state_dict's message kept (it lists every bad key)


def _load_model(sweep: Sweep, ckpt: Checkpoint, device: str) -> tuple[torch.nn.Module, dict[str, str]]:
    """The model with the checkpoint's weights, and the dtype casts that loading did
    ({tensor: "float64->float32"}; lossy ones are refused, see `check_dtypes`)."""
    state = load_state_dict(sweep.checkpoints_storage, ckpt, sweep.spec.checkpoints)
    model = sweep.build_model()
    where = sweep.checkpoints_storage.uri_for(ckpt.key)
    casts = check_dtypes(state, model.state_dict(), where=where, model=sweep.spec.model.factory)
    if casts:
        log.warning("%s: weights cast to the model's dtypes: %s", where, describe_casts(casts))
    try:
        model.load_state_dict(state, strict=sweep.spec.model.strict)
    except RuntimeError as e:
        first = " ".join(s.strip() for s in str(e).strip().splitlines()[:4])
        if len(first) > _MAX_LOAD_ERROR:
            first = first[:_MAX_LOAD_ERROR] + " ..."
        raise CheckpointError(
            f"{where}: weights do not fit model.factory {sweep.spec.model.factory}: {first}"
        ) from None
    return model.eval().to(device), casts


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_WRITE_AHEAD = 2  # batches whose shard writes may wait behind the forward pass


@dataclass
class FastPath:
    """How extraction runs the model on its device: the `resources` choices (precision,
    channels-last, compile) and what the device itself decides.

    On a GPU, the reduced rows of every layer are copied into pinned host memory without
    blocking (`stage`), and the float16 overflow check of all layers is read once per batch
    with them, so the next batch's forward pass is queued while they travel; the writer
    thread (`shards.WriteQueue`) waits for the copies and writes. On a CPU the rows are
    already in host memory, the overflow check runs inside each hook on data still in cache
    (`shards.cast_rows`), and shards are written on the forward pass's thread unless they
    go to remote storage.
    """

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    pinned: bool = False  # stage rows in pinned host memory with asynchronous copies
    deferred_check: bool = False  # float16 overflow read once per batch, not in each hook
    write_thread: bool = True

    @classmethod
    def for_device(
        cls, resources: Any, device: str | torch.device, *, remote_output: bool = False
    ) -> FastPath:
        """The spec's choices on `device`. The writer thread is used where it pays: on a GPU
        (the forward pass is queued on the device while the host writes) and for remote
        output (uploads wait on the network); on a CPU writing local files it gained nothing
        measurable, since the two compete for the same cores (docs/performance.md)."""
        dev = torch.device(device)
        gpu = dev.type == "cuda"
        return cls(
            dev,
            precision=resources.precision,
            channels_last=resources.channels_last,
            compile=resources.compile,
            pinned=gpu,
            deferred_check=gpu,
            write_thread=gpu or remote_output,
        )

    def prepare(self, model: torch.nn.Module, points: list) -> torch.nn.Module:
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # documented; torch's stubs omit it
        if self.compile:
            from probeserve.layers import compile_regions

            compile_regions(model, points)
        return model

    def autocast(self) -> Any:
        """The forward pass's precision."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST[self.precision])

    def full_precision(self) -> Any:
        """For the hooks: reducers compute in float32 whatever the forward pass does."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def input(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compile and len(x) < batch_size:
            # a compiled region is specialised to its input shapes: pad the last batch of a
            # split to the same size (one compilation) and drop the padding's rows after it
            pad = x.new_zeros((batch_size - len(x), *x.shape[1:]))
            x = torch.cat([x, pad]).contiguous(memory_format=_memory_format(x))
        return x

    def stage(
        self, rows: dict[str, torch.Tensor], overflow: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
        """Host copies of `rows`, each layer's overflow value, and what to call before reading them."""
        if not self.pinned:
            return rows, dict(overflow), None
        host = {}
        for name, t in rows.items():
            host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host[name].copy_(t, non_blocking=True)
        worst = {}
        names = [n for n in rows if n in overflow]
        if names:
            values = torch.stack([overflow[n] for n in names])
            values_host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            values_host.copy_(values, non_blocking=True)
            worst = {n: values_host[i] for i, n in enumerate(names)}
        copied = torch.cuda.Event()
        copied.record()
        return host, worst, copied.synchronize

    def describe(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "pinned_staging": self.pinned,
            "deferred_overflow_check": self.deferred_check,
            "write_thread": self.write_thread,
        }


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _write_job(writer: Any, x: Any, y: np.ndarray, layer: str, worst: Any) -> Any:
    def job() -> None:
        try:
            if worst is not None:
                value = float(worst)
                if value > 0:
                    from probeserve.shards import overflow_error

                    raise overflow_error(layer, value)
            writer.write(x, y)
        except BaseException:
            writer.abort()
            raise

    return job


def _fail_job(writer: Any, error: BaseException) -> Any:
    def job() -> None:
        writer.abort()
        raise error

    return job


def _close_job(writer: Any, done: dict[str, list], split: str) -> Any:
    def job() -> None:
        done[split] = writer.close()  # an error aborts the writer and fails the layer

    return job


def extract(
    sweep: Sweep, ckpt: Checkpoint, layers: list[str], *, device: str = "cpu", fast: FastPath | None = None
) -> dict[str, str]:
    """One forward pass over every split; shards and a manifest for each layer.

    Returns {layer: error} for layers that could not be extracted (the others have their
    manifests). A problem with the checkpoint itself raises: it concerns every layer.
    `fast` overrides the fast-path choices `FastPath.for_device` makes from the spec.
    """
    from probeserve.layers import ActivationCapture, InplaceModified
    from probeserve.shards import ShardWriter, WriteQueue, cast_rows, float16_overflow

    spec = sweep.spec
    t0 = time.perf_counter()
    keep_freed_memory()
    remote = not isinstance(sweep.output, LocalStorage)
    fast = fast or FastPath.for_device(spec.resources, device, remote_output=remote)
    model, casts = _load_model(sweep, ckpt, device)
    points = [sweep.point(name) for name in layers]
    model = fast.prepare(model, points)
    reducers = {p.name: sweep.reducer(p) for p in points}
    ds = sweep.dataset
    batch_size = spec.resources.extract_batch_size
    errors: dict[str, str] = {}
    shards: dict[str, dict[str, list]] = {p.name: {} for p in points}
    counts: dict[str, list[int]] = {}
    skipped: dict[str, list[str]] = {}
    check_later = fast.deferred_check and spec.output.dtype == "float16"
    created: list[Any] = []  # every writer, so that none is left open whatever happens
    with (
        contextlib.ExitStack() as cleanup,
        WriteQueue(max_batches=_WRITE_AHEAD, threaded=fast.write_thread) as queue,
    ):
        # runs after the queue has stopped: a writer whose layer failed, or that an error
        # left behind, drops its unfinished part (closed writers are not touched)
        cleanup.callback(lambda: [w.abort() for w in created])
        for split in SPLITS:
            writers = {}
            for p in points:
                if p.name in errors or p.name in queue.failures:
                    continue
                meta = {
                    "probeserve.layer": p.name,
                    "probeserve.layer_index": str(p.index),
                    "probeserve.shape": json.dumps(list(reducers[p.name].shape)),
                    "probeserve.reducer": json.dumps(reducers[p.name].describe()),
                    "probeserve.checkpoint": ckpt.key,
                    "probeserve.step": str(ckpt.step),
                    "probeserve.split": split,
                    "probeserve.spec_hash": sweep.spec_hash,
                    "probeserve.run": spec.run,
                }
                try:
                    writers[p.name] = ShardWriter(
                        sweep.output,
                        join(layer_prefix(spec.run, ckpt, p.name), split),
                        n_features=reducers[p.name].n_features,
                        dtype=spec.output.dtype,
                        metadata=meta,
                        max_bytes=spec.output.max_shard_bytes,
                    )
                    created.append(writers[p.name])
                except Exception as e:  # this layer alone fails
                    errors[p.name] = f"layer {p.name}: {describe_error(e)}"
            labels = []
            overflow: dict[str, torch.Tensor] = {}  # this batch's, when checked once per batch

            def reduce(
                name: str, t: torch.Tensor, writers: dict = writers, overflow: dict = overflow
            ) -> torch.Tensor:
                # in the hook: only the reduced rows outlive the layer, as in a plain forward pass
                if name not in writers or name in queue.failures:
                    return t.new_empty(0)  # failed already: nothing to keep
                with fast.full_precision():
                    r = reducers[name](t)
                    if check_later:
                        out = r.to(torch.float16).contiguous()
                        overflow[name] = float16_overflow(r, out)
                        return out
                    return cast_rows(r, spec.output.dtype, name)

            with ActivationCapture(model, points, transform=reduce) as capture, torch.no_grad():
                for x, y in ds.batches(split, batch_size, device=fast.device):
                    n = len(y)
                    x = fast.input(x, batch_size)
                    overflow.clear()
                    with fast.autocast():
                        model(x)
                    try:
                        acts = capture.take()
                    except InplaceModified:  # once per point at most: it is copied from now on
                        overflow.clear()
                        with fast.autocast():
                            model(x)
                        acts = capture.take()
                    labels.append(y)
                    live = [name for name in writers if name not in queue.failures]
                    failed = {name: capture.failures[name] for name in live if name in capture.failures}
                    rows = {name: acts[name][:n] for name in live if name not in failed}
                    host, worst, ready = fast.stage(rows, overflow)
                    jobs = [
                        (
                            name,
                            _fail_job(writers[name], failed[name])
                            if name in failed
                            else _write_job(writers[name], host[name], y, name, worst.get(name)),
                        )
                        for name in live
                    ]
                    queue.put(jobs, ready)  # waits while earlier batches are still being written
            queue.put([(name, _close_job(writer, shards[name], split)) for name, writer in writers.items()])
            y_all = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
            counts[split] = np.bincount(y_all, minlength=ds.num_classes).tolist()
            skipped[split] = ds.skipped(split)  # undecodable images: left out, named, never fatal
        queue.drain()
    for name, failure in queue.failures.items():
        errors.setdefault(name, f"layer {name}: {describe_error(failure)}")
    n_skipped = sum(len(v) for v in skipped.values())
    if n_skipped:
        log.warning("%s: %d undecodable image(s) left out of the probe data", ckpt.key, n_skipped)
    seconds = time.perf_counter() - t0
    for p in points:
        if p.name in errors:
            continue
        body = {
            "layer": p.name,
            "layer_index": p.index,
            "checkpoint": ckpt.key,
            "step": ckpt.step,
            "spec_hash": sweep.spec_hash,
            "n_features": reducers[p.name].n_features,
            "shape": list(reducers[p.name].shape),
            "dtype": spec.output.dtype,
            "reducer": reducers[p.name].describe(),
            "num_classes": ds.num_classes,
            "class_names": list(ds.class_names) if ds.class_names is not None else None,
            "data": ds.describe(),
            "n_skipped": n_skipped,
            "skipped": {s: names[:MAX_SKIPPED_NAMES] for s, names in skipped.items()},
            "class_counts": counts,
            "extract_seconds": seconds,
            "precision": fast.precision,
            "extraction": fast.describe(),
            # with false, the shards go once the item is committed: a manifest of a committed
            # item that says false was left by a run killed before it deleted them
            "keep_activations": spec.output.keep_activations,
            "weights_cast": casts,
            "splits": {
                s: {"rows": sum(i.rows for i in infos), "shards": [i.key for i in infos]}
                for s, infos in shards[p.name].items()
            },
        }
        sweep.output.publish_bytes(manifest_key(spec.run, ckpt, p.name), json.dumps(body, indent=1).encode())
        # only now, with the new manifest published, may parts it does not list go (an earlier
        # extraction with another output.max_shard_bytes, or one killed before its manifest)
        listed = {info.key for infos in shards[p.name].values() for info in infos}
        with tidying(f"layer {p.name} of {ckpt.key}: removing parts its new manifest does not list"):
            delete_unlisted_parts(sweep.output, layer_prefix(spec.run, ckpt, p.name), listed)
    for name in errors:  # a failed layer's complete parts have no manifest: nothing reads them
        with tidying(f"layer {name} of {ckpt.key}: removing the parts of its failed extraction"):
            delete_unlisted_parts(sweep.output, layer_prefix(spec.run, ckpt, name), set())
    return errors


@contextlib.contextmanager
def tidying(what: str) -> Iterator[None]:
    """Clean-up that must not turn work that succeeded into a failure: log, and go on.

    What it leaves is removed by a later run."""
    try:
        yield
    except Exception as e:
        log.warning("%s failed: %s", what, describe_error(e))


def delete_unlisted_parts(storage: Storage, prefix: str, listed: set[str]) -> int:
    """Delete the shard parts under a layer's prefix that are not in `listed`; how many.

    With `listed` empty, a manifest published meanwhile by a racing run (the same layer
    extracted twice at once) keeps its parts: only parts nothing lists are garbage. That
    check and the deletion are not atomic; a reader that then misses a part extracts again
    (`probe_and_commit`)."""
    if not listed:
        key = join(prefix, layout.MANIFEST)
        if storage.stat(key) is not None:
            try:
                other = json.loads(storage.read_bytes(key, max_bytes=MANIFEST_MAX_BYTES))
                listed = {k for split in other["splits"].values() for k in split["shards"]}
            except (ValueError, KeyError, TypeError, AttributeError, StorageError):
                pass  # damaged or gone: it keeps nothing
    stale = [k for k in shard_keys(storage, prefix) if k not in listed]
    for k in stale:
        storage.delete(k)
    return len(stale)


def probes_per_call(spec: SweepSpec, device: str) -> int:
    """How many items of one checkpoint a probe call trains together (`resources.probes_per_call`;
    unset: 1 on CPU, where one probe already uses every core, and more on a GPU, which one
    probe of a small layer leaves mostly idle)."""
    if spec.resources.probes_per_call is not None:
        return spec.resources.probes_per_call
    return CUDA_PROBES_PER_CALL if device.startswith("cuda") else 1


CUDA_PROBES_PER_CALL = 8


def _probe_data(sweep: Sweep, ckpt: Checkpoint, layer: str) -> tuple[dict[str, Any], ProbeData]:
    """A layer's shards as the probe trainer reads them, with its manifest."""
    from probeserve.probe import ProbeData
    from probeserve.shards import iter_chunks

    manifest = sweep.manifest(ckpt, layer)
    if manifest is None:
        from probeserve.shards import ShardMissing

        raise ShardMissing(f"layer {layer}: no activations for {ckpt.key}; extract first")
    batch = sweep.spec.probe.batch_size
    out = sweep.output

    def source(split: str):
        keys = manifest["splits"][split]["shards"]
        return lambda: iter_chunks(out, keys, batch_rows=batch)

    data = ProbeData(
        source("train"),
        source("val"),
        source("test"),
        num_classes=manifest["num_classes"],
        n_features=manifest["n_features"],
        key=data_key(sweep.spec),
        control=_control_by_column(sweep, manifest),
        max_rows=max((int(s.get("rows") or 0) for s in manifest["splits"].values()), default=0) or None,
    )
    return manifest, data


def data_key(spec: SweepSpec) -> str:
    """The identity of a run's probe examples (its data spec, not how many processes decode
    it): what seeds the control labels and the MDL order, so that they are the same at every
    checkpoint and layer of the run, and in every rerun."""
    data = spec.data.model_dump(mode="json")
    data.pop("num_workers", None)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


_CONTROL_CACHE: dict[str, dict[str, np.ndarray]] = {}  # per process: a table is read once


def _control_by_column(sweep: Sweep, manifest: dict) -> dict[str, np.ndarray] | None:
    """`probe.control.column`'s control labels per split (parquet data), or None for control
    labels per example (the probe draws those itself from `data_key`)."""
    control = sweep.spec.probe.control
    if control is None or control.column is None:
        return None
    from probeserve.data import parquet_column
    from probeserve.probe import control_labels_by_value

    ident = f"{data_key(sweep.spec)}|{control.column}|{control.seed}"
    if ident not in _CONTROL_CACHE:
        values = parquet_column(
            sweep.spec.data,  # type: ignore[arg-type]  # the spec allows a column for parquet data only
            control.column,
            sweep.dataset,  # type: ignore[arg-type]  # parquet data: a ProbeDataset
            field="probe.control.column",
            s3_endpoint=sweep.spec.storage.resolved_endpoint(),
        )
        counts = manifest["class_counts"]["train"]
        _CONTROL_CACHE.clear()
        _CONTROL_CACHE[ident] = control_labels_by_value(data_key(sweep.spec), control.seed, values, counts)
    return _CONTROL_CACHE[ident]


def _named(e: Exception, layer: str) -> Exception:
    """A user error with the layer it concerns in front of its message."""
    if isinstance(e, ProbeserveError) and not isinstance(e, SpecError):
        named = type(e)(f"layer {layer}: {e}")
        return named
    return e


def _probe_row(
    sweep: Sweep, ckpt: Checkpoint, layer: str, manifest: dict, answer, seconds: float
) -> dict[str, Any]:
    """The row of one item from its `probe.Answer`: the chosen probe's errors with their
    intervals, the l2 grid, per-class test errors, and the control task and MDL when asked."""
    res = answer.chosen
    train_counts = manifest["class_counts"]["train"]
    test_counts = manifest["class_counts"]["test"]
    majority = int(np.argmax(train_counts))
    chance = 1.0 - test_counts[majority] / max(1, sum(test_counts))
    grid = answer.grid

    def interval(name: str, rate: float | None, n: int) -> dict[str, float | None]:
        low, high = results.wilson_interval(rate, n) if rate is not None and n else (None, None)
        return {f"{name}_low": low, f"{name}_high": high}

    control = answer.control
    extra: dict[str, Any] = {}
    if control is not None:
        extra.update(
            control_error=control.test_error,
            control_train_error=control.train_error,
            selectivity=None
            if control.test_error is None or res.test_error is None
            else control.test_error - res.test_error,
            **interval("control_error", control.test_error, control.n_test),
        )
    if answer.mdl is not None:
        extra.update(
            mdl_bits=answer.mdl.bits,
            mdl_compression=answer.mdl.compression,
            mdl_block_bits=answer.mdl.block_bits,
        )
    return results.make_row(
        run=sweep.spec.run,
        spec_hash=sweep.spec_hash,
        checkpoint=ckpt.key,
        step=ckpt.step,
        layer=layer,
        layer_index=manifest["layer_index"],
        n_features=manifest["n_features"],
        num_classes=manifest["num_classes"],
        n_train=res.n_train,
        n_val=res.n_val,
        n_test=res.n_test,
        train_error=res.train_error,
        val_error=res.val_error,
        test_error=res.test_error,
        train_loss=res.train_loss,
        val_loss=res.val_loss,
        test_loss=res.test_loss,
        chance_error=chance,
        epochs=res.epochs,
        best_epoch=res.best_epoch,
        status="ok",
        error=None,
        seconds=seconds,
        device=res.device,
        n_skipped=manifest.get("n_skipped", 0),
        skipped=[n for names in manifest.get("skipped", {}).values() for n in names][: results.MAX_SKIPPED],
        weights_cast=describe_casts(manifest.get("weights_cast") or {}),
        l2=res.l2,
        l2_grid=sweep.spec.probe.l2_grid(),
        grid_val_errors=[None if isinstance(r, Exception) else r.val_error for r in grid],
        grid_val_losses=[None if isinstance(r, Exception) else r.val_loss for r in grid],
        **interval("train_error", res.train_error, res.n_train),
        **interval("val_error", res.val_error, res.n_val),
        **interval("test_error", res.test_error, res.n_test),
        class_names=manifest.get("class_names"),
        **_per_class(res, sweep.spec.probe.confusion_max_classes),
        **extra,
        hit_max_epochs=hit_max_epochs(
            epochs=res.epochs, best_epoch=res.best_epoch, n_val=res.n_val, spec=sweep.spec
        ),
        precision=manifest.get("precision", "fp32"),  # manifests before the field: fp32
    )


def _per_class(res, max_classes: int) -> dict[str, Any]:
    """Per-class test columns of a row: counts, errors, each class's most frequent wrong
    prediction, and the confusion matrix while num_classes <= `max_classes` (at ImageNet's
    1,000 classes it would be a million counts a row: 8 MB over 17 layers is 136 MB a
    checkpoint, so above the cap only the per-class lists, 4 x num_classes values, stay)."""
    counts, wrong = res.test_class_counts, res.test_class_wrong
    if counts is None or wrong is None:
        return {}
    out: dict[str, Any] = {
        "test_class_counts": counts.tolist(),
        "test_class_errors": [None if n == 0 else float(w) / float(n) for w, n in zip(wrong, counts)],
    }
    confusion = res.test_confusion
    if confusion is not None:
        off = confusion.copy()
        np.fill_diagonal(off, 0)
        most = off.argmax(axis=1)
        top = off[np.arange(len(off)), most]
        out["test_class_confused_with"] = [int(m) if t else None for m, t in zip(most, top)]
        out["test_class_confused_count"] = [int(t) for t in top]
        if len(confusion) <= max_classes:
            out["confusion"] = confusion.tolist()
    return out


def hit_max_epochs(*, epochs: int, best_epoch: int, n_val: int, spec: SweepSpec) -> bool:
    """Whether a probe stopped only because it reached `probe.max_epochs`.

    A probe that stopped earlier converged (the objective stopped changing) or was early-stopped;
    one that ran all its epochs was early-stopped at the last one when `patience` epochs had
    passed since its best validation loss (the stopping rule of `probe.train_probe`), and
    otherwise was cut off: its error may still fall with more epochs, which the summary of a
    run says.
    """
    probe = spec.probe
    if epochs < probe.max_epochs:
        return False
    early_stopped = probe.patience is not None and n_val > 0 and epochs - best_epoch >= probe.patience
    return not early_stopped


def probe(sweep: Sweep, ckpt: Checkpoint, layer: str, *, device: str = "cpu") -> dict[str, Any]:
    """Train and score the probe of one (checkpoint, layer) from its shards; return the row."""
    from probeserve.probe import answer_probes

    t0 = time.perf_counter()
    manifest, data = _probe_data(sweep, ckpt, layer)
    try:
        (outcome,) = answer_probes([data], spec=sweep.spec.probe, device=device)
    except ProbeserveError as e:
        raise _named(e, layer) from None
    if isinstance(outcome, Exception):
        raise _named(outcome, layer)
    return _probe_row(sweep, ckpt, layer, manifest, outcome, time.perf_counter() - t0)


def probe_group(sweep: Sweep, ckpt: Checkpoint, layers: list[str], *, device: str = "cpu") -> list[Any]:
    """Train the probes of several layers of one checkpoint together on one device (one call
    of `probe.answer_probes`, within one `probe.memory_bytes`); return, per layer, its row or
    the exception that failed it alone. Each row's `seconds` is its share of the wall time."""
    from probeserve.probe import answer_probes

    t0 = time.perf_counter()
    outcomes: list[Any] = [None] * len(layers)
    inputs = []
    for i, layer in enumerate(layers):
        try:
            inputs.append((i, *_probe_data(sweep, ckpt, layer)))
        except Exception as e:
            outcomes[i] = _named(e, layer)
    trained = answer_probes([data for _, _, data in inputs], spec=sweep.spec.probe, device=device)
    share = (time.perf_counter() - t0) / max(1, len(layers))
    for (i, manifest, _), outcome in zip(inputs, trained, strict=True):
        layer = layers[i]
        if isinstance(outcome, Exception):
            outcomes[i] = _named(outcome, layer)
        else:
            outcomes[i] = _probe_row(sweep, ckpt, layer, manifest, outcome, share)
    return outcomes


def delete_activations(sweep: Sweep, ckpt: Checkpoint, layer: str) -> int:
    """Drop a layer's shards once its item is committed; return how many objects went.

    The manifest goes first, so that no run starts reading shards that are about to go; then
    every part under the layer's prefix, listed or not (a racing run's, or one left by a
    killed or failed extraction). Only what is there is deleted, so a second run doing the
    same finds nothing to do and writes nothing; a reader that had the manifest already and
    misses a part finds the committed row (`probe_and_commit`)."""
    out = sweep.output
    key = manifest_key(sweep.spec.run, ckpt, layer)
    n = 0
    if out.stat(key) is not None:
        out.delete(key)
        n += 1
    for part in shard_keys(out, layer_prefix(sweep.spec.run, ckpt, layer)):
        out.delete(part)
        n += 1
    return n


def clean_committed_activations(sweep: Sweep, plan: Plan) -> int:
    """With `output.keep_activations: false`: delete the shards that runs killed after
    committing an item left behind; how many objects went.

    One listing of the run's activations. Only layers whose item is committed ok are
    touched, and of those only parts with no manifest (nothing reads them) or with a
    manifest that says it was not to be kept: a manifest from a run that kept its
    activations (or one written before manifests said so) stays, with its parts."""
    if sweep.spec.output.keep_activations:
        return 0
    out, run = sweep.output, sweep.spec.run
    done = {layer_prefix(run, i.checkpoint, i.layer): i for i, s in plan.items if s == "ok"}
    if not done:
        return 0
    found = {p for o in out.list(layout.activations_prefix(run)) if (p := layout.layer_prefix_of(o.key))}
    n = 0
    for prefix in sorted(found):
        item = done.get(prefix)
        if item is None:
            continue
        manifest = sweep.manifest(item.checkpoint, item.layer)
        if manifest is None or manifest.get("keep_activations") is False:
            n += delete_activations(sweep, item.checkpoint, item.layer)
    if n:
        log.info("removed %d activation object(s) of committed items left by killed runs", n)
    return n


def log_failure(item: str, e: BaseException) -> None:
    if isinstance(e, ProbeserveError):
        log.error("%s failed: %s", item, e)
    else:
        log.error("%s failed:\n%s", item, "".join(traceback.format_exception(e)))


RUNNING_DIR = results.RUNNING_DIR


def running_key(run: str, ckpt: Checkpoint, layer: str) -> str:
    return layout.running_key(run, ckpt.key, ckpt.step, layer)


def remove_dead_markers(sweep: Sweep) -> int:
    """Delete the running markers of this run whose probes are dead (see `marker_state`);
    how many. A live probe whose marker is deleted by mistake publishes it again at its
    next heartbeat."""
    out = sweep.output
    n = 0
    for obj in out.list(layout.running_prefix(sweep.spec.run)):
        alive, why = marker_state(out, obj)
        if not alive:
            log.info("removing the running marker %s: %s", obj.key, why)
            out.delete(obj.key)
            n += 1
    return n


def start_cleanup(sweep: Sweep, plan: Plan) -> None:
    """What a run removes before it starts: leftovers of dead processes that are provably
    its own (staging folders on this host, running markers, shards of committed items).
    On an output with nothing left over, it writes nothing."""
    from probeserve.staging import remove_stale

    remove_stale()
    with tidying(f"run {sweep.spec.run}: removing running markers of dead probes"):
        remove_dead_markers(sweep)
    with tidying(f"run {sweep.spec.run}: removing shards of committed items"):
        clean_committed_activations(sweep, plan)


def extract_missing(sweep: Sweep, items: list[Item], *, device: str) -> dict[str, str]:
    """Extract the layers of one checkpoint that have no manifest; commit a failed row for
    each layer that could not be extracted. Returns {layer: error} of those."""
    ckpt = items[0].checkpoint
    out, run = sweep.output, sweep.spec.run
    # another run may have finished some of these since they were planned: never redo them
    items = [i for i in items if not results.is_done(out, run, ckpt.key, ckpt.step, i.layer)]
    need = [i for i in items if sweep.manifest(ckpt, i.layer) is None]
    if not need:
        return {}
    from probeserve.staging import remove_stale

    remove_stale()  # a Ray worker on another host cleans up after that host's dead processes
    t0 = time.perf_counter()
    try:
        errors = extract(sweep, ckpt, [i.layer for i in need], device=device)
    except Exception as e:
        log_failure(f"extract {ckpt.key}", e)
        errors = {i.layer: describe_error(e) for i in need}
        for i in need:  # parts it published before it failed: no manifest lists them
            with tidying(f"layer {i.layer} of {ckpt.key}: removing the parts of its failed extraction"):
                delete_unlisted_parts(out, layer_prefix(run, ckpt, i.layer), set())
    seconds = time.perf_counter() - t0
    for item in need:
        if item.layer in errors:
            commit_unless_done(
                sweep, sweep.failed_row(ckpt, item.layer, item.layer_index, errors[item.layer], seconds)
            )
    return errors


def commit_unless_done(sweep: Sweep, row: dict[str, Any]) -> dict[str, Any]:
    """Commit a row, but never a failed one over an ok one: a finished item stays finished.

    Returns the row that stands committed afterwards."""
    if row["status"] != "ok":
        existing = results.read_row(sweep.output, row["run"], row["checkpoint"], row["step"], row["layer"])
        if existing is not None and existing["status"] == "ok":
            return existing
    results.commit(sweep.output, row)
    return row


REEXTRACT_TRIES = 2  # a probe whose shards vanish under it extracts again at most this often


def _probe_retrying(
    sweep: Sweep, item: Item, *, device: str, t0: float, first: Any = None
) -> tuple[dict[str, Any], bool]:
    """Probe one item until there is a row for it; return (row, whether it is committed already).

    `first` is the outcome of a first attempt made elsewhere (a row, or the exception that
    failed it, from a group trained together); without it the first attempt is made here.

    Another run on the same output may delete this layer's shards while this one reads
    them: with `keep_activations: false` once it has committed the item, or after its own
    extraction of the layer failed; or extract the layer again and replace its parts. A probe
    that misses its shards therefore looks again: a committed ok row is the answer (nothing is
    logged as an error); a manifest that is there is read again, once; otherwise it extracts
    the layer again and retries, and fails only if that keeps happening.
    """
    from probeserve.shards import ShardMissing

    ckpt, run = item.checkpoint, sweep.spec.run
    extractions = 0
    reread = False  # whether the manifest was read again since the last extraction
    outcome = first
    while True:
        if outcome is None:
            try:
                outcome = probe(sweep, ckpt, item.layer, device=device)
            except Exception as e:
                outcome = e
        if not isinstance(outcome, Exception):
            return outcome, False
        err, outcome = outcome, None
        if not isinstance(err, ShardMissing):
            log_failure(f"probe {ckpt.key} {item.layer}", err)
            return sweep.failed_row(
                ckpt, item.layer, item.layer_index, describe_error(err), time.perf_counter() - t0
            ), False
        done = results.read_row(sweep.output, run, ckpt.key, ckpt.step, item.layer)
        if done is not None and done["status"] == "ok":
            log.info("step %d %s: committed by another run meanwhile", ckpt.step, item.layer)
            return done, True
        if not reread and sweep.manifest(ckpt, item.layer) is not None:
            # a new manifest (another run extracted the layer again) lists other parts
            log.info("step %d %s: %s; reading its manifest again", ckpt.step, item.layer, err)
            reread = True
            continue
        if extractions == REEXTRACT_TRIES:
            log_failure(f"probe {ckpt.key} {item.layer}", err)
            return sweep.failed_row(
                ckpt, item.layer, item.layer_index, describe_error(err), time.perf_counter() - t0
            ), False
        log.info("step %d %s: %s; extracting it again", ckpt.step, item.layer, err)
        extractions += 1
        reread = False
        try:
            failed = extract(sweep, ckpt, [item.layer], device=device)
        except Exception as ex:
            failed = {item.layer: describe_error(ex)}
        if item.layer in failed:
            return sweep.failed_row(
                ckpt, item.layer, item.layer_index, failed[item.layer], time.perf_counter() - t0
            ), False


def _committed_ok(sweep: Sweep, item: Item) -> dict[str, Any] | None:
    """The item's row if another run committed it ok since this one was planned (then the
    shards this run extracted for it go, with `keep_activations: false`)."""
    ckpt = item.checkpoint
    done = results.read_row(sweep.output, sweep.spec.run, ckpt.key, ckpt.step, item.layer)
    if done is not None and done["status"] == "ok":
        _drop_activations(sweep, item)
        return done
    return None


def _finish(
    sweep: Sweep, item: Item, beat: Heartbeat, row: dict[str, Any], committed: bool
) -> dict[str, Any]:
    """Commit the item's row (the commit is what makes it done), then tidy up after it."""
    if not committed:
        row = commit_unless_done(sweep, row)
    beat.stop()  # before the marker goes, or a last beat could publish it again
    with tidying(f"step {item.checkpoint.step} {item.layer}: committed, but cleaning up"):
        sweep.output.delete(beat.key)
    if row["status"] == "ok":
        _drop_activations(sweep, item)
    return row


def probe_and_commit(sweep: Sweep, item: Item, *, device: str) -> dict[str, Any]:
    """Probe one item and commit its row (ok or failed); the commit is what makes it done.

    While it runs, a `running/...` marker with a heartbeat says so, for `probeserve status`
    on any machine. Shards that vanish under it are handled by `_probe_retrying`.
    """
    done = _committed_ok(sweep, item)
    if done is not None:
        return done  # committed by another run since this one was planned
    t0 = time.perf_counter()
    with Heartbeat(
        sweep.output, running_key(sweep.spec.run, item.checkpoint, item.layer), device=device
    ) as beat:
        row, committed = _probe_retrying(sweep, item, device=device, t0=t0)
        return _finish(sweep, item, beat, row, committed)


def probe_and_commit_group(sweep: Sweep, items: list[Item], *, device: str) -> list[dict[str, Any]]:
    """Probe several items of one checkpoint together and commit each one's row as
    `probe_and_commit` does; return the rows in the order of `items`.

    An item already committed ok is skipped. A failure fails its item alone: an item whose data
    is bad gets a failed row while the others are trained; an item that does not fit in
    `probe.memory_bytes` beside the others is trained again on its own, and so is one whose
    shards vanished (see `_probe_retrying`); and if the group as a whole fails (an error no
    single item's data explains), each item is trained on its own.
    """
    if len(items) <= 1:
        return [probe_and_commit(sweep, item, device=device) for item in items]
    from probeserve.probe import BudgetError
    from probeserve.shards import ShardMissing

    ckpt = items[0].checkpoint
    assert all(i.checkpoint == ckpt for i in items), "a probe group holds items of one checkpoint"
    rows: dict[str, dict[str, Any]] = {}
    todo: list[Item] = []
    for item in items:
        done = _committed_ok(sweep, item)
        if done is not None:
            rows[item.layer] = done
        else:
            todo.append(item)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        beats = [
            stack.enter_context(
                Heartbeat(sweep.output, running_key(sweep.spec.run, ckpt, i.layer), device=device)
            )
            for i in todo
        ]
        try:
            outcomes = probe_group(sweep, ckpt, [i.layer for i in todo], device=device) if todo else []
        except Exception as e:
            log.warning(
                "step %d: %d probes trained together failed (%s); training each alone",
                ckpt.step,
                len(todo),
                describe_error(e),
            )
            outcomes = [None] * len(todo)
        for item, beat, outcome in zip(todo, beats, outcomes, strict=True):
            if isinstance(outcome, (BudgetError, ShardMissing)):
                outcome = None  # on its own: alone it may fit; its shards may be found again
            row, committed = _probe_retrying(sweep, item, device=device, t0=t0, first=outcome)
            rows[item.layer] = _finish(sweep, item, beat, row, committed)
    return [rows[item.layer] for item in items]


def _drop_activations(sweep: Sweep, item: Item) -> None:
    if sweep.spec.output.keep_activations:
        return
    with tidying(f"step {item.checkpoint.step} {item.layer}: committed, but deleting its shards"):
        delete_activations(sweep, item.checkpoint, item.layer)
