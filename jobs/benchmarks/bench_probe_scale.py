"""The probe trainer at ImageNet scale: 1,000 classes, many rows, several probes together, a budget.

    python jobs/benchmarks/bench_probe_scale.py                 # CPU sizes: each part well under a minute
    python jobs/benchmarks/bench_probe_scale.py --full          # a GPU: 1.28M x 9,216 x 1,000 in device memory
    python jobs/benchmarks/bench_probe_scale.py --only streamed --stream-budget-mib 512 --threads 1

Four measurements, each a function that `bench_scale.py` can call (each prints its figures
and returns them as a dict):

* `epoch_vs_products`: a 1,000-class L-BFGS epoch against the two matrix products it needs,
  the logits `X W^T` and the gradient `R^T X` over the train split, timed with torch in the
  same run on the same device and dtype (best of 3; CUDA events on a GPU). The epoch is the
  marginal cost of one more epoch: two runs of `train_probes` with different `max_epochs`,
  their difference in solver seconds over their difference in epochs. It includes what every
  epoch does: its function evaluations (a step of 1 is accepted on almost every epoch), the
  L-BFGS update and the validation pass for early stopping (validation is 4% of train, as
  ImageNet's 50,000 of 1.28M). Target (issue 10): <= 2x.
* `throughput`: epoch seconds and achieved TFLOP/s of the solver loop for one probe, for K
  `l2` values stacked as one set of heads on the same data, and for L layers (different data)
  trained together. FLOPs are those of the matrix products the solver ran: 4 n D C per
  function evaluation and 2 n_val D C per validation pass, per probe. Target on one H200:
  probes trained together >= 400 TFLOP/s.
* `streamed_vs_in_memory`: a probe whose training split (float32 shards on local disk, read
  with `iter_chunks` as a sweep reads them) is 4x `probe.memory_bytes`, in a fresh process,
  against the same probe with a budget that holds everything, in another. Peak memory is the
  process's peak RSS (VmHWM), Python and torch included. Targets (issue 10): peak RSS under
  the budget plus 1 GiB, and the same test error within 0.002.
* `bf16_drift`: `compute_dtype: bfloat16` against float32 on the same data: how far the
  optimum moves (objective, test error, weights).

Synthetic data: x ~ N(0, I) in D dimensions, labels the argmax of a fixed random linear map of
the first 64 features plus Gaussian noise, generated chunk by chunk on the device from seeded
generators (no I/O, and every pass yields the same chunks), except for the streamed check,
which writes real shards. Wall times on a shared machine move with its load; the ratios are
taken within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

GiB = 1 << 30
MiB = 1 << 20


# ----------------------------------------------------------------------------------------------
# Helpers


def synthetic(
    n: int,
    d: int,
    c: int,
    *,
    seed: int,
    device: str,
    chunk_rows: int = 8192,
    noise: float = 1.0,
    task: int = 0,
) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """A `ChunkSource` of seeded Gaussian features (`seed`: one per split) labelled by a
    teacher (`task`: the same for every split of one problem), made on `device`."""
    informative = min(d, 64)
    g = torch.Generator(device=device).manual_seed(task)
    teacher = torch.randn(c, informative, generator=g, device=device)

    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, start in enumerate(range(0, n, chunk_rows)):
            rows = min(chunk_rows, n - start)
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i + 1)
            x = torch.randn(rows, d, generator=gen, device=device)
            scores = x[:, :informative] @ teacher.T
            scores += noise * torch.randn(rows, c, generator=gen, device=device)
            yield x, scores.argmax(dim=1)

    return chunks


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_best(fn: Callable[[], Any], device: str, repeats: int = 3) -> float:
    """Best of `repeats` after a warm-up; CUDA events on a GPU, a wall clock otherwise."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), or 0 where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _gb(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _device_peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss_bytes()


def _data(n: int, d: int, c: int, *, seed: int, device: str, chunk_rows: int):
    from probeserve.probe import ProbeData

    n_val = max(c, n // 25)
    return ProbeData(
        synthetic(n, d, c, seed=seed, device=device, chunk_rows=chunk_rows, task=seed),
        synthetic(n_val, d, c, seed=seed + 500, device=device, chunk_rows=chunk_rows, task=seed),
        None,
        c,
    ), n_val


def _spec(epochs: int, compute_dtype: str, memory_bytes: int, batch_size: int):
    from probeserve.spec import ProbeSpec

    # never stops early: early stopping runs (a validation pass every epoch) but patience
    # outlasts the run, and the tolerance is below any change
    return ProbeSpec(
        l2=1e-4,  # one probe (the default is a grid); `l2s` stacks several where a case asks
        max_epochs=epochs,
        patience=10**6,
        tolerance=1e-300,
        compute_dtype=compute_dtype,
        memory_bytes=memory_bytes,
        batch_size=batch_size,
    )


# ----------------------------------------------------------------------------------------------
# 1. A 1,000-class epoch against its two matrix products


def time_products(n: int, d: int, c: int, *, device: str, compute_dtype: str) -> tuple[float, float]:
    """Best-of-3 seconds of `X W^T` and `R^T X` together (wall, then CPU time; CPU time is
    steadier on a machine shared with other work, and not taken on a GPU)."""
    dtype = torch.bfloat16 if compute_dtype == "bfloat16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, generator=g, device=device, dtype=dtype)
    w = torch.randn(c, d, generator=g, device=device, dtype=dtype)
    r = torch.randn(n, c, generator=g, device=device, dtype=dtype)

    def both() -> None:
        x @ w.T
        r.T @ x

    wall = time_best(both, device)
    cpu = math.inf
    if not device.startswith("cuda"):
        for _ in range(3):
            c0 = time.process_time()
            both()
            cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def epoch_vs_products(
    n: int = 8192,
    d: int = 1024,
    c: int = 1000,
    *,
    device: str = "cpu",
    compute_dtype: str = "float32",
    memory_bytes: int = 8 * GiB,
    batch_size: int = 8192,
    short: int = 1,
    long: int = 3,
) -> dict[str, float]:
    from probeserve.probe import resolve_device, train_probes

    device = resolve_device(device)
    products, products_cpu = time_products(n, d, c, device=device, compute_dtype=compute_dtype)
    _reset_peak(device)

    runs, cpu = [], []
    for epochs in (short, long):
        data, n_val = _data(n, d, c, seed=1, device=device, chunk_rows=batch_size)
        spec = _spec(epochs, compute_dtype, memory_bytes, batch_size)
        c0 = time.process_time()
        ((res,),) = train_probes([data], spec=spec, device=device)
        cpu.append(time.process_time() - c0)  # loading and scoring cost the same in both runs
        assert not isinstance(res, Exception), res
        runs.append(res)
    a, b = runs
    extra = max(1, b.epochs - a.epochs)
    epoch = (b.solve_seconds - a.solve_seconds) / extra
    epoch_cpu = (cpu[1] - cpu[0]) / extra
    evals = (b.evaluations - a.evaluations) / extra
    out = {
        "n": n,
        "d": d,
        "c": c,
        "products_s": products,
        "epoch_s": epoch,
        "evaluations_per_epoch": evals,
        "ratio": epoch / products,
        "epochs": [a.epochs, b.epochs],
        "load_s": b.load_seconds,
        "resident": b.train_resident,
    }
    print(
        f"[epoch] {n:,} x {d:,} features x {c:,} classes, {compute_dtype} on {device}, val {n_val:,} rows: "
        f"two products (X W^T, R^T X) {products:.3f} s; one more L-BFGS epoch {epoch:.3f} s "
        f"({evals:.2f} function evaluations + validation; runs of {a.epochs} and {b.epochs} epochs, "
        f"train split {'in memory' if b.train_resident else 'streamed'}, load {b.load_seconds:.1f} s)"
    )
    if not device.startswith("cuda"):
        out["ratio_cpu_time"] = epoch_cpu / products_cpu
        print(
            f"[epoch] in CPU time: products {products_cpu:.3f} s, epoch {epoch_cpu:.3f} s: "
            f"{epoch_cpu / products_cpu:.2f}x"
        )
    print(f"[epoch] ratio epoch / products: {epoch / products:.2f}x (wall)   target <= 2x")
    return out


# ----------------------------------------------------------------------------------------------
# 2. Throughput: one probe, stacked l2 heads, layers together


def _flops(res, n: int, n_val: int) -> float:
    return 4.0 * n * res.n_features * res.num_classes * res.evaluations + 2.0 * n_val * res.n_features * (
        res.num_classes * res.epochs
    )


def throughput(
    n: int = 4096,
    d: int = 512,
    c: int = 1000,
    *,
    heads: int = 4,
    layers: int = 2,
    device: str = "cpu",
    compute_dtype: str = "float32",
    epochs: int = 2,
    memory_bytes: int = 8 * GiB,
    batch_size: int = 8192,
) -> dict[str, dict[str, float]]:
    from probeserve.probe import resolve_device, train_probes

    device = resolve_device(device)
    l2_grid = [float(v) for v in torch.logspace(-6, -1, heads).tolist()] if heads > 1 else None
    cases = {
        "one probe": (1, None),
        f"{heads} l2 values stacked": (1, l2_grid),
        f"{layers} layers together": (layers, None),
    }
    out: dict[str, dict[str, float]] = {}
    for name, (n_data, l2s) in cases.items():
        _reset_peak(device)
        datas, n_val = [], 0
        for i in range(n_data):
            data, n_val = _data(n, d, c, seed=10 + i, device=device, chunk_rows=batch_size)
            datas.append(data)
        spec = _spec(epochs, compute_dtype, memory_bytes, batch_size)
        outcomes = train_probes(datas, spec=spec, device=device, l2s=l2s)
        results = [r for rs in outcomes for r in rs]
        failed = [r for r in results if isinstance(r, Exception)]
        assert not failed, failed[0]
        solve = results[0].solve_seconds
        flops = sum(_flops(r, n, n_val) for r in results)
        probe_epochs = sum(r.epochs for r in results)
        peak = _device_peak(device)
        out[name] = {
            "probes": len(results),
            "solve_s": solve,
            "epoch_s": solve / max(r.epochs for r in results),
            "probe_epochs_per_s": probe_epochs / solve,
            "tflops": flops / solve / 1e12,
            "peak_bytes": peak,
            "accounted_bytes": results[0].peak_bytes,
        }
        print(
            f"[throughput] {name}: {len(results)} probe(s) of {n:,} x {d:,} x {c:,} ({compute_dtype}, {device}), "
            f"{max(r.epochs for r in results)} epochs in {solve:.2f} s: {solve / max(r.epochs for r in results):.3f} s "
            f"per epoch, {flops / solve / 1e12:.3f} TFLOP/s; peak {'GPU' if device.startswith('cuda') else 'RSS'} "
            f"{_gb(peak)}, accounted {_gb(results[0].peak_bytes)} of {_gb(memory_bytes)}"
        )
    one = out["one probe"]["tflops"]
    for name in list(cases)[1:]:
        print(f"[throughput] {name} / one probe: {out[name]['tflops'] / one:.2f}x the TFLOP/s")
    if device.startswith("cuda"):
        best = max(v["tflops"] for v in out.values())
        print(f"[throughput] best {best:.1f} TFLOP/s   target (H200) >= 400 for probes trained together")
    return out


# ----------------------------------------------------------------------------------------------
# 3. A train split 4x the budget, streamed, against the same probe in memory

_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[3])
from bench_probe_scale import peak_rss_bytes
baseline = peak_rss_bytes()
from probeserve.probe import train_probe
from probeserve.shards import iter_chunks
from probeserve.spec import ProbeSpec
from probeserve.storage import open_storage
args = json.loads(sys.argv[1])
if args["threads"]:
    import torch
    torch.set_num_threads(args["threads"])
store = open_storage(sys.argv[2])
keys = {s: sorted(o.key for o in store.list(s + "/")) for s in ("train", "val", "test")}
spec = ProbeSpec(l2=1e-4, memory_bytes=args["memory_bytes"], batch_size=args["batch_size"], max_epochs=args["max_epochs"])
src = lambda s: (lambda: iter_chunks(store, keys[s], batch_rows=spec.batch_size))
t0 = time.perf_counter()
res = train_probe(src("train"), src("val"), src("test"), num_classes=args["c"], spec=spec)
print(json.dumps({"test_error": res.test_error, "objective": res.objective, "epochs": res.epochs,
  "seconds": time.perf_counter() - t0, "resident": res.train_resident, "accounted": res.peak_bytes,
  "peak_rss": peak_rss_bytes(), "baseline_rss": baseline}))
"""


def _write_shards(root: str, n: int, d: int, c: int, n_val: int, n_test: int) -> int:
    import numpy as np

    from probeserve.shards import ShardWriter
    from probeserve.storage import open_storage

    store = open_storage(root)
    total = 0
    for split, rows, seed in (("train", n, 1), ("val", n_val, 2), ("test", n_test, 3)):
        source = synthetic(rows, d, c, seed=seed, device="cpu", chunk_rows=16384, noise=2.0)
        with ShardWriter(store, split, n_features=d, dtype="float32", metadata={}, max_bytes=64 * MiB) as w:
            for x, y in source():
                w.write(x.numpy(), y.numpy().astype(np.int32))
        total += rows * d * 4 if split == "train" else 0
    return total


def streamed_vs_in_memory(
    memory_bytes: int = 64 * MiB,
    d: int = 512,
    c: int = 10,
    *,
    times: float = 4.0,
    batch_size: int = 1024,
    max_epochs: int = 100,
    workdir: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    n = int(times * memory_bytes / (d * 4))
    n_val = n_test = max(1000, n // 20)
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory(dir=workdir) as root:
        t0 = time.perf_counter()
        train_bytes = _write_shards(root, n, d, c, n_val, n_test)
        written = time.perf_counter() - t0
        runs = {}
        for name, budget in (("streamed", memory_bytes), ("in memory", 4 * train_bytes)):
            args = {
                "memory_bytes": budget,
                "batch_size": batch_size,
                "max_epochs": max_epochs,
                "c": c,
                "threads": threads,
            }
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, json.dumps(args), root, here],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{name} run failed:\n{proc.stderr[-3000:]}")
            runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    s, m = runs["streamed"], runs["in memory"]
    print(
        f"[streamed] train split {n:,} x {d} float32 = {_gb(train_bytes)} on disk = {train_bytes / memory_bytes:.1f}x "
        f"probe.memory_bytes {_gb(memory_bytes)} (shards written in {written:.1f} s); val/test {n_val:,} rows each"
    )
    for name, r in runs.items():
        print(
            f"[streamed] {name}: train split {'in memory' if r['resident'] else 'streamed'}, {r['epochs']} epochs, "
            f"{r['seconds']:.1f} s, test error {r['test_error']:.4f}, peak RSS {_gb(r['peak_rss'])} "
            f"(after imports {_gb(r['baseline_rss'])}), accounted {_gb(r['accounted'])}"
        )
    limit = memory_bytes + GiB
    diff = abs(s["test_error"] - m["test_error"])
    print(
        f"[streamed] peak RSS streamed {_gb(s['peak_rss'])} vs budget + 1 GiB {_gb(limit)}: "
        f"{'under' if s['peak_rss'] < limit else 'OVER'}; test error difference {diff:.4f}   target <= 0.002"
    )
    return {"runs": runs, "train_bytes": train_bytes, "limit": limit, "error_difference": diff}


# ----------------------------------------------------------------------------------------------
# 4. How far bfloat16 moves the optimum


def bf16_drift(
    n: int = 4096,
    d: int = 256,
    c: int = 100,
    *,
    device: str = "cpu",
    batch_size: int = 8192,
    l2: float = 1e-3,
    max_epochs: int = 200,
) -> dict[str, float]:
    """The regularised optimum (no early stopping) with float32 and with bfloat16 products,
    both solutions then scored the same way: float32 objective on the float32 train data,
    test error on float32 test data."""
    from probeserve.probe import ProbeData, resolve_device, train_probes
    from probeserve.spec import ProbeSpec

    device = resolve_device(device)
    splits = {
        name: synthetic(rows, d, c, seed=seed, device=device, chunk_rows=batch_size)
        for name, rows, seed in (("train", n, 7), ("test", n // 4, 9))
    }
    data = ProbeData(splits["train"], None, splits["test"], c)
    x, y = (torch.cat(t) for t in zip(*splits["train"](), strict=True))
    xt, yt = (torch.cat(t) for t in zip(*splits["test"](), strict=True))
    x64 = x.double()
    std = x64.std(0, unbiased=False)

    def exact(res) -> tuple[float, float]:
        w = torch.from_numpy(res.weight).to(device, torch.float64)
        b = torch.from_numpy(res.bias).to(device, torch.float64)
        ce = torch.nn.functional.cross_entropy(x64 @ w.T + b, y).item()
        penalty = 0.5 * l2 * float(((w * std) ** 2).sum())  # the penalty is on standardised W
        error = ((xt.double() @ w.T + b).argmax(1) != yt).double().mean().item()
        return ce + penalty, error

    out = {}
    for dtype in ("float32", "bfloat16"):
        spec = ProbeSpec(
            compute_dtype=dtype,
            batch_size=batch_size,
            patience=None,
            tolerance=1e-9,
            max_epochs=max_epochs,
            l2=l2,
        )
        ((res,),) = train_probes([data], spec=spec, device=device)
        assert not isinstance(res, Exception), res
        out[dtype] = (res, *exact(res))
    (a, fa, ea), (b, fb, eb) = out["float32"], out["bfloat16"]
    rel = (fb - fa) / fa
    wd = float(abs(b.weight - a.weight).max() / abs(a.weight).max())
    print(
        f"[bf16] {n:,} x {d} x {c} classes on {device}, l2 {l2}, run to the optimum: float32 objective "
        f"{fa:.6f} ({a.epochs} epochs, {a.solve_seconds:.1f} s), bfloat16 solution scored in float32 {fb:.6f} "
        f"({b.epochs} epochs, {b.solve_seconds:.1f} s): relative drift {rel:+.2e}; test error {ea:.4f} vs {eb:.4f} "
        f"(difference {eb - ea:+.4f}); largest weight difference {wd:.3f} of the largest weight"
    )
    return {"objective_drift": rel, "test_error_difference": eb - ea, "weight_drift": wd}


# ----------------------------------------------------------------------------------------------


PARTS = ("epoch", "throughput", "streamed", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--full", action="store_true", help="GPU sizes: 1.28M x 9,216 x 1,000, bfloat16, 13 heads"
    )
    parser.add_argument("--device", default=None, help="default: cuda with --full, else cpu")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--stream-budget-mib",
        type=int,
        default=None,
        help="probe.memory_bytes of the streamed check, whose train split is 4x it (default 64; --full 256)",
    )
    args = parser.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if args.full else "cpu")
    print(
        f"torch {torch.__version__}, device {device}"
        + (
            f" ({torch.cuda.get_device_name()})"
            if device.startswith("cuda")
            else f", {torch.get_num_threads()} threads"
        )
    )
    t0 = time.perf_counter()
    if args.full:
        full = {"device": device, "compute_dtype": "bfloat16", "memory_bytes": 120 * GiB, "batch_size": 8192}
        if "epoch" in parts:
            epoch_vs_products(1_280_000, 9216, 1000, short=2, long=5, **full)
        if "throughput" in parts:
            throughput(1_280_000, 9216, 1000, heads=13, layers=3, epochs=4, **full)
        if "streamed" in parts:
            streamed_vs_in_memory((args.stream_budget_mib or 256) * MiB, 1024, 100, threads=args.threads)
        if "bf16" in parts:
            bf16_drift(200_000, 2048, 1000, device=device)
    else:
        if "epoch" in parts:
            epoch_vs_products(device=device)
        if "throughput" in parts:
            throughput(device=device)
        if "streamed" in parts:
            streamed_vs_in_memory((args.stream_budget_mib or 64) * MiB, threads=args.threads)
        if "bf16" in parts:
            bf16_drift(device=device)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
