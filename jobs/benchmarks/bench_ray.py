"""Ray runner costs, measured against the in-process runner in one run on this machine.

1. Orchestration overhead per (checkpoint, layer) item, with items that do almost no work:
   the slope of wall time versus item count (two sweep sizes), Ray minus in-process, so that
   fixed start-up (ray.init, worker processes importing torch) is reported apart.
2. A demo-like sweep (mnist_convnet on Fashion-MNIST) on local Ray versus in-process.
3. Scaling: the same sweep with 1, 2 and 4 probe actors.
4. What the Ray workers keep once the demo-like sweep has finished: the resident memory of
   each idle worker (Linux), so that a worker that ran an extraction shows next to fresh ones.

    python jobs/benchmarks/bench_ray.py [--skip-demo] [--skip-scaling]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time

import torch

from probeserve.checkpoints import save_checkpoint
from probeserve.models import build_model
from probeserve.runners.local import run_local
from probeserve.spec import spec_from_dict


def tiny_items_spec(root: str, n_ckpts: int, name: str) -> dict:
    return {
        "run": name,
        "checkpoints": {"uri": f"{root}/ckpts-{n_ckpts}"},
        "model": {"factory": "tiny", "kwargs": {"input_dim": 4, "hidden": 4, "num_classes": 2}},
        "layers": {"include": ["input", "fc1", "act", "fc2"]},
        "data": {"kind": "gaussian", "dim": 4, "train_size": 64, "val_size": 32, "test_size": 32},
        "probe": {"max_epochs": 1},
        "resources": {"device": "cpu", "torch_threads": 1},
        "output": {"uri": f"{root}/out-{name}"},
    }


def write_ckpts(spec, steps) -> None:
    torch.manual_seed(0)
    model = build_model(spec.model)
    for s in steps:
        save_checkpoint(model, spec.checkpoints.uri, s)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def overhead(root: str) -> None:
    from probeserve.runners.ray import run_ray

    sizes = (5, 20)
    t = {}
    warm = spec_from_dict(tiny_items_spec(root, 2, "warmup"))
    write_ckpts(warm, range(2))
    run_ray(warm)  # the first sweep also starts Ray's worker pool; keep that out of the slope
    for n in sizes:
        for runner in ("local", "ray"):
            spec = spec_from_dict(tiny_items_spec(root, n, f"{runner}{n}"))
            write_ckpts(spec, range(n))
            fn = (lambda s=spec: run_local(s)) if runner == "local" else (lambda s=spec: run_ray(s))
            t[runner, n], summary = timed(fn)
            assert summary.ok == 4 * n, summary
    items = 4 * (sizes[1] - sizes[0])
    slope_local = (t["local", sizes[1]] - t["local", sizes[0]]) / items
    slope_ray = (t["ray", sizes[1]] - t["ray", sizes[0]]) / items
    print("1. orchestration overhead (items that do almost no work)")
    for n in sizes:
        print(f"   {4 * n:3d} items: in-process {t['local', n]:6.2f} s, ray {t['ray', n]:6.2f} s")
    print(f"   per item: in-process {slope_local * 1000:6.1f} ms, ray {slope_ray * 1000:6.1f} ms")
    print(f"   ray overhead per item: {(slope_ray - slope_local) * 1000:6.1f} ms  (target <= 50 ms)")
    fixed = t["ray", sizes[0]] - t["local", sizes[0]] - 4 * sizes[0] * (slope_ray - slope_local)
    print(f"   fixed start-up of a ray sweep (workers importing torch etc.): {fixed:6.2f} s")


def demo_like(root: str, *, actors_list: tuple[int, ...], compare_local: bool) -> None:
    from probeserve.runners.ray import run_ray

    base = {
        "checkpoints": {"uri": f"{root}/demo-ckpts"},
        "model": {"factory": "mnist_convnet"},
        "reducer": {"kind": "avgpool", "max_features": 1024},
        "data": {"kind": "idx", "train_size": 5000, "val_size": 1000, "test_size": 1000},
        "probe": {"l2": 1e-3, "max_epochs": 100, "patience": 10},
        "resources": {"device": "cpu", "num_cpus_per_probe": 0.5},
    }
    spec0 = spec_from_dict({**base, "output": {"uri": f"{root}/x"}})
    write_ckpts(spec0, (0, 100))
    t = {}
    if compare_local:
        spec = spec_from_dict({**base, "run": "local", "output": {"uri": f"{root}/demo-local"}})
        t["local"], s = timed(lambda: run_local(spec))
        assert not s.failed
    for n in actors_list:
        spec = spec_from_dict({**base, "run": f"ray{n}", "output": {"uri": f"{root}/demo-ray{n}"}})
        t[n], s = timed(lambda spec=spec, n=n: run_ray(spec, max_actors=n))
        assert not s.failed
    items = 2 * 10
    if compare_local:
        print(
            f"2. demo-like sweep ({items} items, mnist_convnet, Fashion-MNIST 5k/1k/1k, {os.cpu_count()} cores)"
        )
        print(
            f"   in-process {t['local']:6.1f} s, ray ({actors_list[0]} actor) {t[actors_list[0]]:6.1f} s, ratio {t[actors_list[0]] / t['local']:.2f}x (target <= 1.5x)"
        )
    print("3. scaling with probe actors on this machine")
    for n in actors_list:
        print(f"   {n} actor(s): {t[n]:6.1f} s  ({items / t[n] * 60:5.1f} items/min)")
    idle_workers_memory()


def idle_workers_memory() -> None:
    """Resident memory of this driver's idle Ray workers (descendants titled ray::IDLE)."""
    if not os.path.isdir("/proc/self"):
        print("4. idle worker memory: needs Linux's /proc; skipped")
        return
    time.sleep(5.0)  # let workers that are to exit do so
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    mine, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, ppid in parent.items() if ppid in mine} - mine
        mine |= new
        grew = bool(new)
    sizes = []
    for pid in mine - {os.getpid()}:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            with open(f"/proc/{pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
        if title.startswith("ray::IDLE"):
            sizes.append(rss / 1024)
    print("4. idle Ray workers once the sweeps have finished (resident MiB, largest first)")
    print("   " + (", ".join(f"{s:.0f}" for s in sorted(sizes, reverse=True)) or "none"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    # extra logical CPUs so that 4 actors of 0.5 CPU and an extraction task fit on 2 cores
    ray.init(num_cpus=max(3, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR")
    root = tempfile.mkdtemp(prefix="probeserve-bench-ray-")
    try:
        overhead(root)
        if not args.skip_demo:
            demo_like(root, actors_list=(1,) if args.skip_scaling else (1, 2, 4), compare_local=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
