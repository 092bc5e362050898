"""Extraction cost: all probe points of mnist_convnet vs a plain forward pass.

Runs `probeserve.sweep.extract` (load the checkpoint, one forward pass with hooks on every
layer, reduction, shard writing and publishing) and what running the checkpoint costs anyway
(load it, a plain eval forward pass over the same data), on the same threads, in
interleaved pairs, and prints the median ratio. Target: <= 1.25x.

    python jobs/benchmarks/bench_extract.py [--n 4000] [--reducer subset|avgpool|none]
        [--precision fp32|bf16|fp16] [--channels-last] [--writes auto|inline|thread] [--s3]

`--precision` and `--channels-last` apply to both sides (the plain forward pass runs the same
way); `--writes` chooses where shards are written, to measure what the writer thread gains,
and `--s3` sends them to an S3 server (moto, on loopback) instead of a local folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import probeserve.sweep
from probeserve.checkpoints import save_checkpoint
from probeserve.layers import ActivationCapture
from probeserve.models import build_model
from probeserve.shards import ShardWriter
from probeserve.spec import spec_from_dict
from probeserve.sweep import SPLITS, FastPath, Sweep, extract


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4000, help="examples in the train split")
    ap.add_argument("--reducer", choices=["none", "avgpool", "subset"], default="subset")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float16")
    ap.add_argument("--repeat", type=int, default=7, help="pairs of runs")
    ap.add_argument("--batch-size", type=int, default=256, help="examples per forward pass, in both")
    ap.add_argument(
        "--glibc-default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (extract sets mallopt otherwise): shows the page faults it avoids",
    )
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument(
        "--writes",
        choices=["auto", "inline", "thread"],
        default="auto",
        help="shard writes on the forward pass's thread or the writer thread (auto: extract's choice)",
    )
    ap.add_argument(
        "--s3",
        action="store_true",
        help="write the shards to S3: a moto server on loopback, started here (needs moto[server])",
    )
    args = ap.parse_args()
    if args.glibc_default_malloc:
        probeserve.sweep.keep_freed_memory = lambda: False

    tmp = tempfile.mkdtemp(prefix="probeserve-bench-")
    server = _start_s3() if args.s3 else None
    try:
        reducer = {"kind": args.reducer, "max_features": 1024} if args.reducer != "none" else {"kind": "none"}
        spec = spec_from_dict(
            {
                "checkpoints": {"uri": f"{tmp}/ckpts"},
                "model": {"factory": "mnist_convnet"},
                "reducer": reducer,
                "data": {"kind": "idx", "train_size": args.n, "val_size": 500, "test_size": 500},
                "output": {"uri": server[1] if server else f"{tmp}/out", "dtype": args.dtype},
                "storage": {"s3_endpoint": server[2] if server else None},
                "resources": {
                    "extract_batch_size": args.batch_size,
                    "precision": args.precision,
                    "channels_last": args.channels_last,
                },
            }
        )
        torch.manual_seed(0)
        save_checkpoint(build_model(spec.model), spec.checkpoints.uri, 0)
        sweep = Sweep(spec)
        ckpt = sweep.discover().complete[0]
        layers = [p.name for p in sweep.points]
        ds = sweep.dataset
        n = sum(ds.size(s) for s in SPLITS)

        fast = FastPath.for_device(spec.resources, "cpu", remote_output=args.s3)
        if args.writes != "auto":
            fast.write_thread = args.writes == "thread"

        def plain() -> None:
            # what running the checkpoint over the data costs anyway: load it, one forward pass
            model, _ = probeserve.sweep._load_model(sweep, ckpt, "cpu")
            model = fast.prepare(model, [])
            with torch.inference_mode(), fast.autocast():
                for split in SPLITS:
                    for x, _ in ds.batches(split, spec.resources.extract_batch_size):
                        model(fast.input(x, spec.resources.extract_batch_size))

        def extraction() -> None:
            errors = extract(sweep, ckpt, layers, device="cpu", fast=fast)
            assert not errors, errors

        plain()  # warm up both paths (allocator, data decoding)
        extraction()
        shutil.rmtree(f"{tmp}/out", ignore_errors=True)
        # This machine's speed drifts by up to 2x within a minute, so the two are run in
        # pairs, one right after the other, and the ratio of each pair is what counts: the
        # median over pairs, in wall and in CPU time (all threads of this process).
        pairs, parts = [], []
        for _ in range(args.repeat):
            t_p = _time(plain)
            shutil.rmtree(
                f"{tmp}/out", ignore_errors=True
            )  # the last run's shards, untimed (S3: overwritten)
            with _timed_parts() as spent:
                t_e = _time(extraction)
            pairs.append((t_p, t_e))
            parts.append(spent)
        wall = sorted(e[0] / p[0] for p, e in pairs)
        cpu = sorted(e[1] / p[1] for p, e in pairs)
        t_plain = statistics.median(p[0] for p, _ in pairs)
        t_extract = statistics.median(e[0] for _, e in pairs)
        feats = sum(sweep.reducer(p).n_features for p in sweep.points)
        print(
            f"mnist_convnet, {n} examples, {len(layers)} probe points, {feats} features/example after reducer '{args.reducer}', {args.dtype} shards, {torch.get_num_threads()} threads"
        )
        print(f"extraction options:   {fast.describe()}")
        print(f"load + plain forward: {t_plain:7.2f} s  ({n / t_plain:8.0f} examples/s, median)")
        print(
            f"extract all layers:   {t_extract:7.2f} s  ({n / t_extract:8.0f} examples/s, {n * feats * (2 if args.dtype == 'float16' else 4) / t_extract / 1e9:.2f} GB/s of activations, median)"
        )
        print("pair ratios (wall):   " + " ".join(f"{r:.2f}" for r in wall))
        print(
            f"page faults (median): plain {statistics.median(p[2] for p, _ in pairs):.0f}, "
            f"extract {statistics.median(e[2] for _, e in pairs):.0f}"
        )
        # the work extraction adds, timed inside it: steadier than the end-to-end ratio here
        added = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
        print(
            f"added work (median):  {sum(added.values()):7.2f} s = {sum(added.values()) / t_plain:.0%} of load + plain forward: "
            + ", ".join(f"{k} {v:.3f} s" for k, v in added.items())
        )
        # what no shard format can go below: the same bytes written with plain file writes,
        # one file per (layer, split) and one write per batch, as the shard writer does
        itemsize = 2 if args.dtype == "float16" else 4
        sizes = [sweep.reducer(p).n_features * itemsize for p in sweep.points]
        split_rows = [ds.size(s) for s in SPLITS]
        floors = []
        for _ in range(max(3, args.repeat // 2)):
            floors.append(_time(lambda: _plain_writes(f"{tmp}/raw", sizes, split_rows, args.batch_size))[0])
            shutil.rmtree(f"{tmp}/raw")  # untimed, like the shards of the last extraction
        floor = statistics.median(floors)
        print(
            f"plain file writes:    {floor:7.2f} s  for the same {n * sum(sizes) / 1e6:.0f} MB = {floor / t_plain:.0%} of load + plain forward (a floor for any shard format)"
        )
        print(
            f"ratio extract/plain:  {statistics.median(wall):7.2f}x wall, {statistics.median(cpu):.2f}x CPU time  (median of {len(pairs)} pairs; target <= 1.25x)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if server:
            server[0].terminate()
            server[0].wait(10)


def _start_s3() -> tuple[subprocess.Popen, str, str]:
    """A moto S3 server on a free loopback port with a fresh bucket: (process, output URI, endpoint)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(key, value)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return proc, "s3://bench/out", endpoint


@contextlib.contextmanager
def _timed_parts():
    """Seconds spent in each piece of work that running the checkpoint does not do."""
    spent: dict[str, float] = {}
    targets = [
        (ActivationCapture, "_keep", "reducing+casting in hooks"),
        (ShardWriter, "write", "shard writes"),
        (ShardWriter, "close", "shard close+publish"),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
    for (obj, name, label), (_, _, fn) in zip(targets, saved):
        spent[label] = 0.0

        def timed(*a, _fn=fn, _label=label, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[_label] += time.perf_counter() - t0

        setattr(obj, name, timed)
    try:
        yield spent
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def _plain_writes(folder: str, row_bytes: list[int], split_rows: list[int], batch: int) -> None:
    """Write rows of `row_bytes` per layer for every split into `folder`, a batch at a time."""
    os.makedirs(folder, exist_ok=True)
    block = memoryview(bytes(max(row_bytes) * batch))
    for split, rows in enumerate(split_rows):
        files = [open(os.path.join(folder, f"{i}-{split}.bin"), "wb") for i in range(len(row_bytes))]
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            for f, width in zip(files, row_bytes):
                f.write(block[: n * width])
        for f in files:
            f.close()


def _time(fn) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, minor page faults)."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return time.perf_counter() - w0, time.process_time() - c0, f1 - f0


if __name__ == "__main__":
    main()
