"""The extraction fast path, Inception-shaped models, and shards to and from S3 in parallel.

What runs on a GPU (pinned staging, the float16 check read once per batch) is exercised here
on the CPU by the same code, through `FastPath`'s switches; `test_on_cuda_*` runs it on CUDA
where there is one. torchvision cannot be imported beside the CPU build of torch, so its
models are tested where it imports (the GPU machine) and skipped with the reason elsewhere.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch import nn

from probeserve import results
from probeserve.checkpoints import save_checkpoint
from probeserve.errors import LayerError, StorageError
from probeserve.layers import (
    ActivationCapture,
    compile_regions,
    discover_probe_points,
    make_reducer,
    select_probe_points,
)
from probeserve.models import MINI_INCEPTION_POINTS, build_model, mini_inception
from probeserve.runners.local import run_local
from probeserve.shards import (
    ShardWriter,
    WriteQueue,
    float16_overflow,
    iter_chunks,
    read_shard,
)
from probeserve.spec import ModelSpec, ReducerSpec, load_spec, spec_from_dict
from probeserve.storage import LocalStorage
from probeserve.sweep import FastPath, Sweep, extract

REPO = Path(__file__).resolve().parent.parent


def _spec(root, **over):
    spec = {
        "run": "fast",
        "checkpoints": {"uri": str(root / "ckpts")},
        "model": {"factory": "tiny", "kwargs": {"input_dim": 6, "hidden": 12, "num_classes": 2}},
        "layers": {"include": ["input", "fc1", "act", "fc2"]},
        "data": {"kind": "gaussian", "dim": 6, "train_size": 300, "val_size": 100, "test_size": 100},
        "probe": {"max_epochs": 30, "l2": 1e-3},
        "resources": {"device": "cpu", "extract_batch_size": 64},
        "output": {"uri": str(root / "out")},
    }
    for key, value in over.items():
        replace = not isinstance(spec.get(key), dict) or (key == "data" and "kind" in value)
        spec[key] = value if replace else {**spec[key], **value}
    return spec_from_dict(spec)


def _checkpoint(spec, step=0, scale=None):
    torch.manual_seed(1)
    model = build_model(ModelSpec(**spec.model.model_dump()))
    if scale is not None:
        with torch.no_grad():
            for name, factor in scale.items():
                model.get_submodule(name).weight.mul_(factor)
    save_checkpoint(model, spec.checkpoints.uri, step)
    return model


def _shards(sweep, ckpt, layer, split="train"):
    manifest = sweep.manifest(ckpt, layer)
    parts = [read_shard(sweep.output.uri_for(k)) for k in manifest["splits"][split]["shards"]]
    return np.concatenate([p.x for p in parts]), manifest


def _extract(spec, fast=None):
    sweep = Sweep(spec)
    ckpt = sweep.discover().complete[0]
    errors = extract(sweep, ckpt, [p.name for p in sweep.points], device="cpu", fast=fast)
    return sweep, ckpt, errors


# --- models: outputs that are tuples, named tuples and mappings ---------------------------

USER_MODELS = '''
from collections import namedtuple

import torch
from torch import nn

Out = namedtuple("Out", ["logits", "features"])


class Encoder(nn.Module):
    """Returns a mapping, as many library models do."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 8)

    def forward(self, x):
        h = self.linear(x)
        return {"hidden": h, "norm": h.norm(dim=1)}


class WithHeads(nn.Module):
    """A named tuple out of forward, a dict out of a block, an auxiliary head for training."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.act = nn.Tanh()
        self.aux = nn.Linear(8, 2)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.act(self.encoder(x)["hidden"])
        if self.training:
            return Out(self.head(h), self.aux(h))
        return Out(self.head(h), h)


def with_heads():
    return WithHeads()
'''


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "user_models_fast.py").write_text(textwrap.dedent(USER_MODELS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_models_fast:with_heads"


def test_a_model_returning_a_named_tuple_and_dicts_is_probed_end_to_end(tmp_path, user_models):
    spec = _spec(
        tmp_path,
        model={"factory": user_models, "kwargs": {}},
        layers={"include": ["*"]},
    )
    model = _checkpoint(spec).eval()
    sweep = Sweep(spec)
    # the dict-returning block is probed at its first tensor; the aux head runs only in training
    assert [(p.name, p.shape) for p in sweep.points] == [
        ("input", (6,)),
        ("encoder.linear", (8,)),
        ("encoder", (8,)),
        ("act", (8,)),
        ("head", (2,)),
    ]
    summary = run_local(spec)
    assert summary.exit_code == 0 and summary.ok == 5
    rows = results.load(spec.output.uri).to_pylist()
    assert {r["status"] for r in rows} == {"ok"} and {r["precision"] for r in rows} == {"fp32"}
    ckpt = sweep.discover().complete[0]
    x, manifest = _shards(sweep, ckpt, "encoder")
    assert manifest["precision"] == "fp32"
    inputs = torch.cat([b for b, _ in sweep.dataset.batches("train", 1000)])
    with torch.no_grad():
        np.testing.assert_allclose(x, model.encoder(inputs)["hidden"].numpy(), rtol=1e-6, atol=1e-6)


def test_mini_inception_has_the_papers_17_points_and_an_aux_head_for_training():
    torch.manual_seed(0)
    model = mini_inception(image_size=75, width=0.125, num_classes=7).eval()
    points = discover_probe_points(model, torch.randn(2, 3, 75, 75))
    names = [p.name for p in points]
    assert not any(n.startswith("AuxLogits") for n in names)  # eval mode: the aux head does not run
    chosen = select_probe_points(points, list(MINI_INCEPTION_POINTS), [])
    assert [p.name for p in chosen] == list(MINI_INCEPTION_POINTS)
    # parallel branches are concatenated: a block's channels are the sum of its branches'
    shapes = {p.name: p.shape for p in points}
    branches = ["branch1x1", "branch5x5_2", "branch3x3dbl_3", "branch_pool"]
    assert shapes["Mixed_5b"][0] == sum(shapes[f"Mixed_5b.{b}"][0] for b in branches)
    assert shapes["fc"] == (7,)

    with pytest.raises(LayerError, match=r"'AuxLogits' exists but did not run in the eval-mode forward pass"):
        select_probe_points(points, ["AuxLogits"], [], modules=[n for n, _ in model.named_modules()])

    model.train()
    out = model(torch.randn(2, 3, 75, 75))
    assert type(out).__name__ == "InceptionOutputs"
    assert out.logits.shape == (2, 7) and out.aux_logits.shape == (2, 7)
    with pytest.raises(ValueError, match="image_size must be >= 75"):
        mini_inception(image_size=64)


def _example(name: str):
    """An example spec; where `data.kind: images` is not known yet, with other data."""
    from probeserve import spec as spec_module

    if hasattr(spec_module, "ImagesData"):
        return load_spec(REPO / "jobs" / "examples" / name)
    data = yaml.safe_load((REPO / "jobs" / "examples" / name).read_text())
    assert data["data"]["kind"] == "images" and data["data"]["image_size"] == 299
    data["data"] = {"kind": "gaussian"}
    return spec_from_dict(data)


def test_the_inception_v3_examples_validate_and_select_17_points_on_mini_inception():
    for name in ("inception-v3.yaml", "inception-v3-pooled.yaml"):
        spec = _example(name)
        assert spec.model.factory == "torchvision.models:inception_v3"
        assert len(spec.layers.include) == 17
        assert tuple(spec.layers.include) == MINI_INCEPTION_POINTS
        model = mini_inception().eval()
        points = discover_probe_points(model, torch.randn(2, 3, 75, 75))
        assert len(select_probe_points(points, spec.layers.include, spec.layers.exclude)) == 17
    assert _example("inception-v3.yaml").reducer.kind == "subset"
    assert _example("inception-v3.yaml").resources.precision == "bf16"
    pooled = _example("inception-v3-pooled.yaml").reducer
    assert (pooled.kind, pooled.max_features) == ("avgpool", 9216)


def _image_table(path, n, *, size, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    templates = rng.standard_normal((num_classes, 3 * size * size)).astype(np.float32)
    x = templates[y] + 0.5 * rng.standard_normal((n, 3 * size * size)).astype(np.float32)
    flat = pa.array(x.reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, 3 * size * size)
    pq.write_table(pa.table({"x": column, "label": pa.array(y)}), path)


def test_mini_inception_sweep_from_a_state_dict_checkpoint(tmp_path):
    _image_table(tmp_path / "images.parquet", 160, size=75, num_classes=4)
    spec = _spec(
        tmp_path,
        model={"factory": "mini_inception", "kwargs": {"width": 0.125, "num_classes": 4}},
        layers={"include": list(MINI_INCEPTION_POINTS)},
        reducer={"kind": "subset", "max_features": 64},
        data={
            "kind": "parquet",
            "uri": str(tmp_path / "images.parquet"),
            "shape": [3, 75, 75],
            "val_size": 30,
            "test_size": 30,
            "train_size": None,
        },
        probe={"max_epochs": 5},
    )
    _checkpoint(spec)
    summary = run_local(spec)
    rows = results.load(spec.output.uri).to_pylist()
    assert summary.exit_code == 0, summary.failed
    assert [r["layer"] for r in rows] == list(MINI_INCEPTION_POINTS)
    assert [r["n_features"] for r in rows][-1] == 4 and all(r["n_features"] <= 64 for r in rows)


def test_asking_for_the_aux_head_says_why_it_is_not_a_probe_point(tmp_path):
    _image_table(tmp_path / "images.parquet", 30, size=75, num_classes=3)
    spec = _spec(
        tmp_path,
        model={"factory": "mini_inception", "kwargs": {"width": 0.125, "num_classes": 3}},
        layers={"include": ["Mixed_6e", "AuxLogits"]},
        data={
            "kind": "parquet",
            "uri": str(tmp_path / "images.parquet"),
            "shape": [3, 75, 75],
            "val_size": 5,
        },
    )
    with pytest.raises(
        LayerError, match=r"layers.include: 'AuxLogits' matches no probe point. Module 'AuxLogits'"
    ):
        _ = Sweep(spec).points


# --- the fast path on CPU: precision, channels-last, deferred checks, writer thread -----


def test_precision_is_autocast_recorded_and_part_of_the_spec_hash(tmp_path):
    fp32 = _spec(tmp_path)
    explicit = _spec(tmp_path, resources={"precision": "fp32"})
    bf16 = _spec(tmp_path, resources={"precision": "bf16"}, output={"uri": str(tmp_path / "bf16")})
    assert fp32.hash() == explicit.hash() != bf16.hash()
    _checkpoint(fp32)
    sweep32, ckpt, errors = _extract(fp32)
    assert not errors
    sweep16, _, errors = _extract(bf16)
    assert not errors
    for layer in ("fc1", "fc2"):
        x32, _ = _shards(sweep32, ckpt, layer)
        x16, manifest = _shards(sweep16, ckpt, layer)
        assert manifest["precision"] == "bf16" and manifest["extraction"]["precision"] == "bf16"
        assert not np.array_equal(x32, x16)  # the forward pass really ran in bfloat16
        np.testing.assert_allclose(x16, x32, rtol=0.05, atol=0.05)
    summary = run_local(bf16)
    assert summary.exit_code == 0
    assert {r["precision"] for r in results.load(bf16.output.uri).to_pylist()} == {"bf16"}


def test_reducers_run_in_float32_inside_an_autocast_forward():
    point = discover_probe_points(nn.Sequential(nn.Conv2d(3, 8, 3)), torch.randn(2, 3, 12, 12))[1]
    reducer = make_reducer(ReducerSpec(kind="avgpool", max_features=32), point)
    acts = torch.randn(4, 8, 10, 10)
    fast = FastPath(torch.device("cpu"), precision="bf16")
    with fast.autocast():
        assert (acts @ torch.ones(10, 10)).dtype == torch.bfloat16  # what the hooks would get
        with fast.full_precision():
            inside = reducer(acts)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, reducer(acts))


@pytest.mark.parametrize(
    ("kind", "max_features", "shape"),
    [
        ("subset", 100, (16, 9, 9)),
        ("avgpool", 16 * 9, (16, 9, 9)),  # one GEMM, even 3x3 cells
        ("avgpool", 16 * 4, (16, 9, 9)),  # one GEMM, uneven cells
        ("avgpool", 8 * 4 * 4, (8, 64, 64)),  # too large for one GEMM: pooling windows
        ("avgpool", 8 * 5 * 5, (8, 63, 64)),  # adaptive windows, a product per dim
        ("projection", 20, (4, 5, 5)),
        ("none", None, (4, 5, 5)),
    ],
)
def test_reducers_give_the_same_rows_for_channels_last_activations(kind, max_features, shape):
    module = nn.Identity()
    point = discover_probe_points(nn.Sequential(module), torch.randn(2, *shape))[1]
    reducer = make_reducer(ReducerSpec(kind=kind, max_features=max_features, seed=3), point)
    acts = torch.randn(5, *shape)
    nhwc = acts.contiguous(memory_format=torch.channels_last)
    assert not nhwc.is_contiguous()
    plain, fast = reducer(acts), reducer(nhwc)
    if kind == "subset":
        assert torch.equal(plain, fast)
    else:
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)


def test_channels_last_extraction_matches_contiguous(tmp_path):
    _image_table(tmp_path / "images.parquet", 60, size=75, num_classes=3)
    common = {
        "model": {"factory": "mini_inception", "kwargs": {"width": 0.125, "num_classes": 3}},
        "layers": {"include": ["Conv2d_2b_3x3", "Mixed_5b", "Mixed_6e", "fc"]},
        "reducer": {"kind": "subset", "max_features": 50},
        "data": {
            "kind": "parquet",
            "uri": str(tmp_path / "images.parquet"),
            "shape": [3, 75, 75],
            "val_size": 10,
            "test_size": 10,
            "train_size": None,
        },
    }
    plain = _spec(tmp_path, **common)
    nhwc = _spec(
        tmp_path, **common, resources={"channels_last": True}, output={"uri": str(tmp_path / "nhwc")}
    )
    _checkpoint(plain)
    sweep_a, ckpt, errors_a = _extract(plain)
    sweep_b, _, errors_b = _extract(nhwc)
    assert not errors_a and not errors_b
    for layer in common["layers"]["include"]:
        a, _ = _shards(sweep_a, ckpt, layer)
        b, manifest = _shards(sweep_b, ckpt, layer)
        assert manifest["extraction"]["channels_last"] is True
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_float16_overflow_value_without_synchronising():
    src = torch.tensor([[1.0, -7e4, float("inf"), float("nan")], [3e5, 2.0, 0.0, 1.0]])
    assert float(float16_overflow(src, src.to(torch.float16))) == 3e5
    fine = torch.tensor([[1.0, float("-inf"), float("nan"), 65504.0]])
    assert float(float16_overflow(fine, fine.to(torch.float16))) == 0.0
    assert float(float16_overflow(torch.empty(0, 3), torch.empty(0, 3, dtype=torch.float16))) == 0.0


@pytest.mark.parametrize("write_thread", [True, False], ids=["writer-thread", "inline"])
def test_deferred_float16_check_fails_the_overflowing_layer_alone(tmp_path, write_thread, monkeypatch):
    # the GPU's once-per-batch check, run on the CPU: fc2's logits pass float16's range
    spec = _spec(tmp_path, output={"dtype": "float16"})
    _checkpoint(spec, scale={"fc2": 1e6})
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    fast = FastPath(torch.device("cpu"), deferred_check=True, write_thread=write_thread)
    sweep, ckpt, errors = _extract(spec, fast=fast)
    assert os.listdir(staging) == []  # the failed layer's writers of every split are cleaned up
    assert list(errors) == ["fc2"]
    assert "layer 'fc2': activation values overflow float16" in errors["fc2"]
    assert "output.dtype: float32" in errors["fc2"]
    assert sweep.manifest(ckpt, "fc2") is None
    for layer in ("input", "fc1", "act"):
        assert sweep.manifest(ckpt, layer)["extraction"]["deferred_overflow_check"] is True


def test_fast_path_choices_follow_the_device_and_the_output(tmp_path):
    resources = _spec(tmp_path, resources={"precision": "bf16", "channels_last": True}).resources
    cpu = FastPath.for_device(resources, "cpu")
    assert (cpu.pinned, cpu.deferred_check, cpu.write_thread) == (False, False, False)
    assert (cpu.precision, cpu.channels_last, cpu.compile) == ("bf16", True, False)
    assert FastPath.for_device(resources, "cpu", remote_output=True).write_thread
    gpu = FastPath.for_device(resources, "cuda:0")
    assert (gpu.pinned, gpu.deferred_check, gpu.write_thread) == (True, True, True)


@pytest.mark.parametrize(
    "fast",
    [
        FastPath(torch.device("cpu"), write_thread=True),
        FastPath(torch.device("cpu"), write_thread=True, deferred_check=True),
    ],
    ids=["threaded", "threaded-deferred"],
)
def test_shards_are_the_same_whichever_way_they_are_written(tmp_path, fast):
    spec = _spec(tmp_path, output={"dtype": "float16", "max_shard_bytes": 1000})
    _checkpoint(spec)
    reference, ckpt, _ = _extract(spec)  # the spec's own choices: written inline on a CPU
    other = _spec(
        tmp_path, output={"uri": str(tmp_path / "other"), "dtype": "float16", "max_shard_bytes": 1000}
    )
    sweep, _, errors = _extract(other, fast=fast)
    assert not errors
    for layer in ("input", "fc1", "act", "fc2"):
        for split in ("train", "val", "test"):
            a, ma = _shards(reference, ckpt, layer, split)
            b, mb = _shards(sweep, ckpt, layer, split)
            assert a.tobytes() == b.tobytes()
            assert len(ma["splits"][split]["shards"]) == len(mb["splits"][split]["shards"]) > 1


class _FailsOneLayer(LocalStorage):
    """Publishing any part of `layer` fails, as a full disk or a refused upload would."""

    def __init__(self, root: str, layer: str) -> None:
        super().__init__(root)
        self.layer = layer
        self.threads: set[str] = set()

    def publish_file(self, key: str, local_path: str) -> None:
        self.threads.add(threading.current_thread().name)
        if f"/{self.layer}/" in key:
            raise StorageError(f"{key}: upload failed")
        super().publish_file(key, local_path)


def test_a_shard_upload_that_fails_on_the_writer_thread_fails_its_layer_alone(tmp_path, monkeypatch):
    spec = _spec(tmp_path, output={"max_shard_bytes": 2000})
    _checkpoint(spec)
    storage = _FailsOneLayer(str(tmp_path / "out"), "act")
    monkeypatch.setattr(Sweep, "output", property(lambda self: storage))
    sweep, ckpt, errors = _extract(spec, fast=FastPath(torch.device("cpu"), write_thread=True))
    assert list(errors) == ["act"] and "upload failed" in errors["act"]
    assert storage.threads == {"probeserve-shard-writes"}  # not the forward pass's thread
    assert sweep.manifest(ckpt, "act") is None and sweep.manifest(ckpt, "fc2") is not None


# --- the writer queue -----------------------------------------------------------------


def test_write_queue_runs_in_order_and_blocks_when_storage_is_slow():
    release = threading.Event()
    done: list[int] = []
    queue = WriteQueue(max_batches=2)
    queue.put([("a", release.wait)])  # storage is stuck on the first batch
    queue.put([("a", lambda: done.append(1))])
    third = threading.Thread(target=lambda: queue.put([("a", lambda: done.append(2))]))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # two batches wait unwritten: the third waits for room
    release.set()
    third.join(10)
    assert not third.is_alive()
    queue.drain()
    assert done == [1, 2]
    queue.close()


@pytest.mark.parametrize("threaded", [True, False])
def test_write_queue_failures_belong_to_their_layer(threaded):
    ran: list[str] = []

    def boom():
        raise OSError("disk full")

    with WriteQueue(threaded=threaded) as queue:
        queue.put([("a", lambda: ran.append("a1")), ("b", boom), ("c", lambda: ran.append("c1"))])
        queue.put([("a", lambda: ran.append("a2")), ("b", lambda: ran.append("b2"))])

        def not_copied():
            raise RuntimeError("copy failed")

        queue.put([("c", lambda: ran.append("c2"))], ready=not_copied)
    assert ran == ["a1", "c1", "a2"]
    assert isinstance(queue.failures["b"], OSError) and isinstance(queue.failures["c"], RuntimeError)
    assert "a" not in queue.failures


def test_write_queue_drops_waiting_jobs_when_extraction_fails():
    release = threading.Event()
    ran: list[int] = []
    with pytest.raises(KeyError), WriteQueue(max_batches=3) as queue:
        queue.put([("a", release.wait)])
        queue.put([("a", lambda: ran.append(1))])
        release.set()
        raise KeyError("the forward pass failed")
    time.sleep(0.1)
    assert ran in ([], [1])  # the job running may finish; nothing is run after close
    assert queue._thread is None


# --- compile ---------------------------------------------------------------------------


def test_compile_regions_wraps_whole_blocks_between_points_and_hooks_still_fire():
    torch.manual_seed(0)
    model = mini_inception(width=0.125, num_classes=5).eval()
    x = torch.randn(3, 3, 75, 75)
    points = select_probe_points(discover_probe_points(model, x), list(MINI_INCEPTION_POINTS), [])
    with ActivationCapture(model, points) as capture, torch.no_grad():
        model(x)
        eager = capture.take()
    called: list[str] = []

    def fake_compile(fn):
        def run(*args, **kwargs):
            called.append(fn.__self__.__class__.__name__)
            return fn(*args, **kwargs)

        return run

    regions = compile_regions(model, points, compile_fn=fake_compile)
    # each probed block whole (no point inside it), and the aux head (no point, has weights)
    assert sorted(regions) == sorted([*MINI_INCEPTION_POINTS, "AuxLogits"])
    with ActivationCapture(model, points) as capture, torch.no_grad():
        model(x)
        wrapped = capture.take()
    assert len(called) == 17  # every region but the aux head ran through its compiled forward
    for name in MINI_INCEPTION_POINTS:
        assert torch.equal(wrapped[name], eager[name])


def test_compile_regions_descends_into_blocks_that_hold_points():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    x = torch.randn(2, 4)
    points = select_probe_points(discover_probe_points(model, x), ["1.1"], [])
    assert compile_regions(model, points, compile_fn=lambda f: f) == ["0", "1.0", "1.2"]


def _inductor_works() -> str | None:
    try:
        fn = torch.compile(lambda t: t * 2 + 1)
        fn(torch.ones(3))
    except Exception as e:  # no C++ compiler, no Python headers, ...
        return f"torch.compile does not work here: {type(e).__name__}: {str(e)[:200]}"
    return None


def test_compiled_extraction_gives_the_eager_rows(tmp_path):
    why = _inductor_works()
    if why:
        pytest.skip(why)
    spec = _spec(tmp_path, data={"train_size": 150, "val_size": 50, "test_size": 70})
    _checkpoint(spec)
    eager, ckpt, _ = _extract(spec)
    compiled_spec = _spec(
        tmp_path,
        data={"train_size": 150, "val_size": 50, "test_size": 70},
        resources={"compile": True},
        output={"uri": str(tmp_path / "compiled")},
    )
    compiled, _, errors = _extract(compiled_spec)  # 150 = 2 x 64 + 22: the last batch is padded
    assert not errors
    for layer in ("input", "fc1", "act", "fc2"):
        for split in ("train", "val", "test"):
            a, _ = _shards(eager, ckpt, layer, split)
            b, manifest = _shards(compiled, ckpt, layer, split)
            assert manifest["extraction"]["compile"] is True and len(b) == len(a)
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


# --- reading shards from remote storage: one part ahead --------------------------------


class _SlowRemote:
    """A remote storage with `download`; records when each download starts and ends."""

    def __init__(self, inner: LocalStorage, delay: float = 0.0) -> None:
        self.inner = inner
        self.uri = "fake://bucket"
        self.delay = delay
        self.started: dict[str, threading.Event] = {}
        self.paths: list[str] = []

    def download(self, key: str, local_path: str) -> None:
        self.started.setdefault(key, threading.Event()).set()
        self.paths.append(local_path)
        time.sleep(self.delay)
        self.inner.download(key, local_path)

    def read_bytes(self, key, *, max_bytes=None):
        raise AssertionError("a storage that can download is not read into memory")

    def uri_for(self, key: str) -> str:
        return f"{self.uri}/{key}"


def _parts(storage, n_parts=4, rows=50, features=8):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_parts * rows, features)).astype(np.float32)
    y = rng.integers(0, 3, n_parts * rows)
    meta = {"probeserve.layer": "l", "probeserve.split": "train"}
    with ShardWriter(
        storage,
        "acts/l/train",
        n_features=features,
        dtype="float32",
        metadata=meta,
        max_bytes=rows * (features * 4 + 12),
    ) as writer:
        writer.write(x, y)
    return x, y, [i.key for i in writer.close()]


def test_iter_chunks_fetches_the_next_part_while_the_current_one_is_read(tmp_path):
    local = LocalStorage(str(tmp_path / "store"))
    x, y, keys = _parts(local)
    remote = _SlowRemote(local, delay=0.05)
    chunks = iter_chunks(remote, keys, batch_rows=50)
    first_x, first_y = next(chunks)
    # while the reader holds part 0, part 1 is on its way (and not part 2 yet: one ahead)
    assert remote.started.setdefault(keys[1], threading.Event()).wait(5)
    assert keys[2] not in remote.started
    rest = list(chunks)
    got_x = np.concatenate([first_x] + [c for c, _ in rest])
    assert got_x.tobytes() == x.tobytes()
    assert np.array_equal(np.concatenate([first_y] + [c for _, c in rest]), y)
    folders = {os.path.dirname(p) for p in remote.paths}
    assert len(folders) == 1 and not any(os.path.exists(f) for f in folders)  # nothing left behind


def test_iter_chunks_stopped_early_leaves_no_files(tmp_path):
    local = LocalStorage(str(tmp_path / "store"))
    _, _, keys = _parts(local)
    remote = _SlowRemote(local)
    chunks = iter_chunks(remote, keys, batch_rows=10)
    next(chunks)
    chunks.close()
    assert remote.paths and not any(os.path.exists(os.path.dirname(p)) for p in remote.paths)


# --- S3: parallel parts up and down ------------------------------------------------------


@pytest.mark.integration
def test_shard_parts_go_to_s3_and_back_in_parallel_parts(s3_bucket, s3_server, tmp_path, monkeypatch):
    from probeserve.storage import S3Storage

    monkeypatch.setattr(S3Storage, "part_bytes", 5 * 1024 * 1024)  # S3's smallest part
    storage = S3Storage(s3_bucket, "probes", endpoint_url=s3_server.endpoint)
    rng = np.random.default_rng(0)
    features = 4096
    x = rng.standard_normal((1200, features)).astype(np.float32)  # 19.7 MB: two parts of up to 12 MB
    y = rng.integers(0, 10, len(x))
    meta = {"probeserve.layer": "l", "probeserve.split": "train"}
    with ShardWriter(
        storage, "acts/l/train", n_features=features, dtype="float32", metadata=meta, max_bytes=12 * 2**20
    ) as writer:
        for start in range(0, len(x), 256):
            writer.write(x[start : start + 256], y[start : start + 256])
    keys = [i.key for i in writer.close()]
    assert len(keys) == 2
    head = s3_server.client().head_object(Bucket=s3_bucket, Key=f"probes/{keys[0]}")
    assert head["ETag"].strip('"').endswith("-3")  # 12 MB in three multipart parts
    got = list(iter_chunks(storage, keys, batch_rows=500))
    assert np.concatenate([c for c, _ in got]).tobytes() == x.tobytes()
    assert np.array_equal(np.concatenate([c for _, c in got]), y)


class _Remote:
    """A storage that is not local, so `iter_chunks` fetches each part ahead (`download`)."""

    def __init__(self, local: LocalStorage) -> None:
        self._local = local

    def __getattr__(self, name: str):
        return getattr(self._local, name)


def test_prefetched_parts_are_staged_in_a_locked_folder_and_a_vanished_part_is_named(tmp_path, monkeypatch):
    from probeserve import staging
    from probeserve.shards import ShardMissing

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    local = LocalStorage(str(tmp_path / "out"))
    x = np.arange(600 * 8, dtype=np.float32).reshape(600, 8)
    y = np.arange(600) % 3
    meta = {"probeserve.layer": "l", "probeserve.split": "train"}
    with ShardWriter(
        local, "acts/l/train", n_features=8, dtype="float32", metadata=meta, max_bytes=8192
    ) as w:
        w.write(x, y)
    keys = [i.key for i in w.close()]
    assert len(keys) >= 3
    remote = _Remote(local)

    chunks = iter_chunks(remote, keys, batch_rows=100)
    first, _ = next(chunks)
    # parts are fetched into a staging folder a later run can prove dead (staging.py), not
    # into a folder of another name that nothing would ever remove after a kill
    folders = [p.name for p in scratch.iterdir()]
    assert len(folders) == 1 and folders[0].startswith(
        f"probeserve-stage-{staging.this_host()}-{os.getpid()}-"
    )
    rest = [c for c, _ in chunks]
    assert np.concatenate([first, *rest]).tobytes() == x.tobytes()
    assert list(scratch.iterdir()) == []  # gone once read

    os.unlink(tmp_path / "out" / keys[1])  # deleted by another run after it was listed
    with pytest.raises(ShardMissing, match="shard is gone"):
        list(iter_chunks(remote, keys, batch_rows=100))
    assert list(scratch.iterdir()) == []


# --- torchvision and CUDA: where they are --------------------------------------------------


def _torchvision():
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # ImportError, or its compiled ops failing beside a CPU-only torch
        pytest.skip(f"torchvision does not import here ({type(e).__name__}: {str(e)[:120]})")


def test_torchvision_inception_v3_through_the_factory_path(tmp_path):
    _torchvision()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _image_table(tmp_path / "images.parquet", 48, size=299, num_classes=4)
    example = _example("inception-v3.yaml")
    spec = _spec(
        tmp_path,
        model=example.model.model_dump(),
        layers={"include": example.layers.include},
        reducer={"kind": "subset", "max_features": 100},
        data={
            "kind": "parquet",
            "uri": str(tmp_path / "images.parquet"),
            "shape": [3, 299, 299],
            "val_size": 8,
            "test_size": 8,
            "train_size": None,
        },
        resources={"device": device, "extract_batch_size": 16, "precision": "bf16", "channels_last": True},
        probe={"max_epochs": 3},
    )
    model = build_model(spec.model)
    model.train()  # a training forward returns InceptionOutputs, with the aux head's logits
    out = model(torch.randn(2, 3, 299, 299))
    assert type(out).__name__ == "InceptionOutputs"
    save_checkpoint(model.eval(), spec.checkpoints.uri, 0)
    summary = run_local(spec)
    assert summary.exit_code == 0, summary.failed
    rows = results.load(spec.output.uri).to_pylist()
    assert [r["layer"] for r in rows] == list(MINI_INCEPTION_POINTS)
    assert {r["precision"] for r in rows} == {"bf16"}
    resnet = build_model(ModelSpec(factory="torchvision.models:resnet50", kwargs={"weights": None}))
    points = discover_probe_points(resnet.eval(), torch.randn(2, 3, 64, 64))
    assert {"layer1", "layer4", "avgpool", "fc"} <= {p.name for p in points}


@pytest.mark.gpu
def test_on_cuda_pinned_staging_and_the_deferred_check(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: pinned staging and the once-per-batch float16 check run on a GPU")
    spec = _spec(tmp_path, output={"dtype": "float16"}, resources={"device": "cuda"})
    _checkpoint(spec, scale={"fc2": 1e6})
    sweep = Sweep(spec)
    ckpt = sweep.discover().complete[0]
    errors = extract(sweep, ckpt, [p.name for p in sweep.points], device="cuda")
    assert list(errors) == ["fc2"] and "overflow float16" in errors["fc2"]
    manifest = sweep.manifest(ckpt, "fc1")
    assert manifest["extraction"]["pinned_staging"] and manifest["extraction"]["deferred_overflow_check"]
    cpu_spec = _spec(
        tmp_path, output={"uri": str(tmp_path / "cpu"), "dtype": "float16"}, resources={"device": "cpu"}
    )
    cpu, _, _ = _extract(cpu_spec)
    for layer in ("input", "fc1", "act"):
        a, _ = _shards(cpu, ckpt, layer)
        b, _ = _shards(sweep, ckpt, layer)
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-3)
    assert sweep.manifest(ckpt, "fc2") is None  # the failed layer has no manifest
