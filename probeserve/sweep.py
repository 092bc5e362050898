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
import inspect
import json
import logging
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from probeserve import results
from probeserve.checkpoints import Checkpoint, Discovery, discover, load_state_dict
from probeserve.errors import CheckpointError, ModelError, ProbeserveError, SpecError
from probeserve.spec import SweepSpec, dump_spec
from probeserve.storage import LocalStorage, Storage, join, open_storage

log = logging.getLogger("probeserve")

SPLITS = ("train", "val", "test")
ACTIVATIONS_DIR = "activations"
RUNS_DIR = results.RUNS_DIR


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


def describe_error(e: BaseException) -> str:
    """One line for a result row: the message of a user error, type and message otherwise."""
    if isinstance(e, ProbeserveError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def layer_prefix(run: str, ckpt: Checkpoint, layer: str) -> str:
    return join(ACTIVATIONS_DIR, run, results.checkpoint_dir(ckpt.key, ckpt.step), results.layer_stem(layer))


def manifest_key(run: str, ckpt: Checkpoint, layer: str) -> str:
    return join(layer_prefix(run, ckpt, layer), "manifest.json")


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
    def dataset(self):  # -> probeserve.data.ProbeDataset
        from probeserve.data import load_dataset

        return load_dataset(self.spec.data, s3_endpoint=self.spec.storage.resolved_endpoint())

    def build_model(self) -> torch.nn.Module:
        from probeserve.models import build_model

        return build_model(self.spec.model)

    def example_input(self) -> torch.Tensor:
        return torch.zeros((2, *self.dataset.input_shape))

    @cached_property
    def all_points(self):  # -> list[ProbePoint]
        from probeserve.layers import discover_probe_points

        model = self.build_model().eval()
        self._module_names = [name for name, _ in model.named_modules()]  # for select's errors
        try:
            return discover_probe_points(model, self.example_input(), inputs=self.spec.layers.inputs)
        except ProbeserveError:
            raise
        except Exception as e:
            raise ModelError(
                f"model.factory {self.spec.model.factory}: a forward pass on the probe data's input shape "
                f"{tuple(self.dataset.input_shape)} failed: {describe_error(e)}"
            ) from None

    @cached_property
    def points(self):  # -> list[ProbePoint], the selected ones in forward order
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

    def plan(self) -> Plan:
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

    def record_spec(self) -> None:
        """Save the resolved spec beside the results; refuse a run name used by another spec.

        Also publish the selected layers (`runs/{run}/layers.json`) for `probeserve status`,
        which reads progress without building the model.
        """
        key = results.run_key(self.spec.run, "spec.json")
        body = json.dumps({"spec_hash": self.spec_hash, "spec": self.spec.model_dump(mode="json")}, indent=2)
        if self.output.create_only(key, body.encode()):
            self.output.publish_bytes(
                results.run_key(self.spec.run, "spec.yaml"), dump_spec(self.spec).encode()
            )
        else:
            stored = results.read_json(self.output, key)
            if stored.get("spec_hash") != self.spec_hash:
                raise SpecError(
                    [
                        f"run: run {self.spec.run!r} in {self.output.uri} was made with a different spec "
                        f"(hash {stored.get('spec_hash')} vs {self.spec_hash}: model, data, reducer, probe or "
                        "layers.inputs changed); choose another run name or output.uri"
                    ]
                )
        layers = [{"layer": p.name, "layer_index": p.index} for p in self.points]
        self.output.publish_bytes(results.run_key(self.spec.run, "layers.json"), json.dumps(layers).encode())

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


def _load_model(sweep: Sweep, ckpt: Checkpoint, device: str) -> torch.nn.Module:
    state = load_state_dict(sweep.checkpoints_storage, ckpt, sweep.spec.checkpoints)
    model = sweep.build_model()
    try:
        model.load_state_dict(state, strict=sweep.spec.model.strict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"{sweep.checkpoints_storage.uri_for(ckpt.key)}: weights do not fit model.factory "
            f"{sweep.spec.model.factory}: {' '.join(s.strip() for s in first[:4])}"
        ) from None
    return model.eval().to(device)


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
            model = model.to(memory_format=torch.channels_last)
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


def _batches(ds: Any, split: str, batch_size: int, device: torch.device):
    """The dataset's batches; datasets whose `batches` takes `device` put them there themselves."""
    try:
        takes_device = "device" in inspect.signature(ds.batches).parameters
    except (TypeError, ValueError):
        takes_device = False
    if takes_device:
        yield from ds.batches(split, batch_size, device=device)
    else:
        yield from ds.batches(split, batch_size)


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
    model = _load_model(sweep, ckpt, device)
    points = [sweep.point(name) for name in layers]
    model = fast.prepare(model, points)
    reducers = {p.name: sweep.reducer(p) for p in points}
    ds = sweep.dataset
    batch_size = spec.resources.extract_batch_size
    errors: dict[str, str] = {}
    shards: dict[str, dict[str, list]] = {p.name: {} for p in points}
    counts: dict[str, list[int]] = {}
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
                for x, y in _batches(ds, split, batch_size, fast.device):
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
        queue.drain()
    for name, e in queue.failures.items():
        errors.setdefault(name, f"layer {name}: {describe_error(e)}")
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
            "class_counts": counts,
            "extract_seconds": seconds,
            "precision": fast.precision,
            "extraction": fast.describe(),
            "splits": {
                s: {"rows": sum(i.rows for i in infos), "shards": [i.key for i in infos]}
                for s, infos in shards[p.name].items()
            },
        }
        sweep.output.publish_bytes(manifest_key(spec.run, ckpt, p.name), json.dumps(body, indent=1).encode())
    return errors


def probe(sweep: Sweep, ckpt: Checkpoint, layer: str, *, device: str = "cpu") -> dict[str, Any]:
    """Train and score the probe of one (checkpoint, layer) from its shards; return the row."""
    from probeserve.probe import train_probe
    from probeserve.shards import iter_chunks

    t0 = time.perf_counter()
    manifest = sweep.manifest(ckpt, layer)
    if manifest is None:
        raise ProbeserveError(f"layer {layer}: no activations for {ckpt.key}; extract first")
    batch = sweep.spec.probe.batch_size
    out = sweep.output

    def source(split: str):
        keys = manifest["splits"][split]["shards"]
        return lambda: iter_chunks(out, keys, batch_rows=batch)

    try:
        res = train_probe(
            source("train"),
            source("val"),
            source("test"),
            num_classes=manifest["num_classes"],
            spec=sweep.spec.probe,
            device=device,
        )
    except ProbeserveError as e:
        raise type(e)(f"layer {layer}: {e}") from None
    train_counts = manifest["class_counts"]["train"]
    test_counts = manifest["class_counts"]["test"]
    majority = int(np.argmax(train_counts))
    chance = 1.0 - test_counts[majority] / max(1, sum(test_counts))
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
        seconds=time.perf_counter() - t0,
        device=res.device,
        precision=manifest.get("precision", "fp32"),  # manifests before the field: fp32
    )


def delete_activations(sweep: Sweep, ckpt: Checkpoint, layer: str) -> None:
    """Drop a layer's shards (manifest first, so no reader is left with missing shards)."""
    manifest = sweep.manifest(ckpt, layer)
    sweep.output.delete(manifest_key(sweep.spec.run, ckpt, layer))
    if manifest:
        for split in manifest["splits"].values():
            for key in split["shards"]:
                sweep.output.delete(key)


def log_failure(item: str, e: BaseException) -> None:
    if isinstance(e, ProbeserveError):
        log.error("%s failed: %s", item, e)
    else:
        log.error("%s failed:\n%s", item, "".join(traceback.format_exception(e)))


RUNNING_DIR = "running"


def running_key(run: str, ckpt: Checkpoint, layer: str) -> str:
    return join(
        RUNNING_DIR,
        run,
        results.checkpoint_dir(ckpt.key, ckpt.step),
        results.layer_stem(layer) + ".json",
    )


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
    t0 = time.perf_counter()
    try:
        errors = extract(sweep, ckpt, [i.layer for i in need], device=device)
    except Exception as e:
        log_failure(f"extract {ckpt.key}", e)
        errors = {i.layer: describe_error(e) for i in need}
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


def probe_and_commit(sweep: Sweep, item: Item, *, device: str) -> dict[str, Any]:
    """Probe one item and commit its row (ok or failed); the commit is what makes it done.

    While it runs, a small `running/...` object says so, for `probeserve status` on any machine.
    """
    ckpt = item.checkpoint
    done = results.read_row(sweep.output, sweep.spec.run, ckpt.key, ckpt.step, item.layer)
    if done is not None and done["status"] == "ok":
        return done  # committed by another run since this one was planned
    marker = running_key(sweep.spec.run, ckpt, item.layer)
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "device": device}
    sweep.output.publish_bytes(marker, json.dumps(info).encode())
    t0 = time.perf_counter()
    try:
        row = probe(sweep, ckpt, item.layer, device=device)
    except Exception as e:
        log_failure(f"probe {ckpt.key} {item.layer}", e)
        row = sweep.failed_row(
            ckpt, item.layer, item.layer_index, describe_error(e), time.perf_counter() - t0
        )
    row = commit_unless_done(sweep, row)
    try:  # the item is done now; tidying up after it must not undo that
        sweep.output.delete(marker)
        if row["status"] == "ok" and not sweep.spec.output.keep_activations:
            delete_activations(sweep, ckpt, item.layer)
    except Exception as e:
        log.warning(
            "step %d %s: committed, but cleaning up failed: %s", ckpt.step, item.layer, describe_error(e)
        )
    return row
