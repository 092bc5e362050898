"""Image decoding throughput: one decode worker against N, on ImageNet-sized JPEGs.

Writes `--images` seeded synthetic JPEGs of about 500x375 pixels (quality 90; smooth colour
fields with texture, so that they compress about as photos do) as an ImageFolder tree, then
decodes and preprocesses them all (resize the shorter side to 256, centre crop 224: the
ImageNet evaluation transform) through `ImageDataset`'s decode workers, in index order, with
1 worker and with N workers. The two runs alternate `--repeat` times, after a warm-up pass
that starts the workers, and the medians are compared: the target of issue 10 is that N
workers reach >= 0.8 of N times one worker's rate. That wall-clock ratio needs N idle cores;
on a shared machine the CPU time per image (workers and this process together, with 1 and
with N workers) shows the overhead of decoding in parallel, whatever else runs. It also times starting the workers (a
fresh interpreter that imports numpy and Pillow) and one pass of whole batches
(`batches(device="cpu")`: decode plus normalisation to float32 in this process).

    python jobs/benchmarks/bench_images.py [--images 400] [--workers 2] [--repeat 5]

`measure()` returns the figures as a dict, for `bench_scale.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from probeserve.data import load_dataset
from probeserve.spec import ImagesData


def make_jpegs(root: str, n: int, *, seed: int = 0, classes: int = 10) -> float:
    """n seeded JPEGs of about 500x375 in root/train/{class}/ (and 2 per class in val/);
    returns their mean size in bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = []
    for split, count in (("train", n), ("val", 2 * classes)):
        for i in range(count):
            cls = f"c{i % classes:02d}"
            os.makedirs(f"{root}/{split}/{cls}", exist_ok=True)
            h, w = (375, 500) if i % 4 else (500, 375)  # some portrait, as in ImageNet
            field = rng.uniform(0, 255, (4, 5, 3)).astype(np.float32)
            smooth = np.asarray(
                Image.fromarray(field.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
            )
            pixels = np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            path = f"{root}/{split}/{cls}/{i:06d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            sizes.append(os.path.getsize(path))
    return float(np.mean(sizes))


def _workers_cpu(ds: Any) -> float:
    """CPU seconds the dataset's decode workers have used so far (Linux: /proc)."""
    total = 0.0
    for proc in ds._pool._procs if ds._pool is not None else []:
        try:
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, AttributeError):
            return float("nan")
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def _decode_pass(ds: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds of workers and this process) to decode the whole train
    split (uint8 images, in order), workers already running."""
    cpu0, t0 = _workers_cpu(ds) + time.process_time(), time.perf_counter()
    count = sum(len(y) for _, y in ds._decoded("train"))
    wall = time.perf_counter() - t0
    assert count == ds.size("train"), (count, ds.size("train"))
    return wall, _workers_cpu(ds) + time.process_time() - cpu0


def measure(
    *, n_images: int = 400, workers: int = 2, repeat: int = 5, image_size: int = 224, root: str | None = None
) -> dict[str, Any]:
    """Decode rates (img/s) with 1 and with `workers` workers and their scaling ratio."""
    tmp = None
    if root is None:
        tmp = root = tempfile.mkdtemp(prefix="probeserve-bench-images-")
    try:
        mean_bytes = make_jpegs(root, n_images)

        def dataset(num_workers: int) -> Any:
            spec = ImagesData(
                kind="images", uri=root, image_size=image_size, val_size=1, num_workers=num_workers
            )
            return load_dataset(spec)

        one, many = dataset(1), dataset(workers)
        starts = {}
        for name, ds in (("1", one), (str(workers), many)):
            t0 = time.perf_counter()
            next(iter(ds._decoded("val")))  # start the workers: the first result of the first task
            starts[name] = time.perf_counter() - t0
            for _ in ds._decoded("test"):  # and let them all decode once
                pass
        n = one.size("train")
        t_one, t_many, cpu_one, cpu_many = [], [], [], []
        for _ in range(repeat):
            for ts, cpus, ds in ((t_one, cpu_one, one), (t_many, cpu_many, many)):
                wall, cpu = _decode_pass(ds)
                ts.append(wall)
                cpus.append(cpu)
        t0 = time.perf_counter()
        for _ in many.batches("train", 256, device="cpu"):
            pass
        t_batches = time.perf_counter() - t0
        one.close()
        many.close()
        rate_one = n / statistics.median(t_one)
        rate_many = n / statistics.median(t_many)
        return {
            "images": n,
            "mean_jpeg_bytes": mean_bytes,
            "image_size": image_size,
            "workers": workers,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "one_worker_img_s": rate_one,
            "n_workers_img_s": rate_many,
            "ratio": rate_many / (workers * rate_one),
            # CPU seconds per image, workers and this process together: what parallel decoding
            # costs in overhead, whatever else the machine runs
            "one_worker_cpu_ms": 1000 * statistics.median(cpu_one) / n,
            "n_workers_cpu_ms": 1000 * statistics.median(cpu_many) / n,
            "cpu_efficiency": statistics.median(cpu_one) / statistics.median(cpu_many),
            "one_worker_runs_img_s": [n / t for t in t_one],
            "n_workers_runs_img_s": [n / t for t in t_many],
            "batches_img_s": n / t_batches,
            "start_seconds": starts,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=400, help="JPEGs to decode per pass")
    ap.add_argument("--workers", type=int, default=2, help="N, the workers compared with one")
    ap.add_argument("--repeat", type=int, default=5, help="alternating passes of each")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument(
        "--same-session",
        action="store_true",
        help="start the decode workers in this process's session (they get a session each otherwise): "
        "shows what that costs where the kernel shares CPU time out by session (autogroup)",
    )
    args = ap.parse_args()
    if args.same_session:
        import probeserve.images.workers

        probeserve.images.workers.NEW_SESSION = False
    r = measure(n_images=args.images, workers=args.workers, repeat=args.repeat, image_size=args.image_size)
    autogroup = "?"
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            autogroup = "on" if f.read().strip() == "1" else "off"
    print(
        f"decode workers in {'this process' + chr(39) + 's session' if args.same_session else 'sessions of their own'}; "
        f"the kernel's autogroup is {autogroup}"
    )
    print(
        f"{r['images']} JPEGs of about 500x375 ({r['mean_jpeg_bytes'] / 1024:.0f} KiB on average), "
        f"resize {round(r['image_size'] * 256 / 224)} + centre crop {r['image_size']}, {r['cpus']} CPUs, "
        f"load average (1, 5, 15 min) {' '.join(f'{v:.1f}' for v in r['load_average'])}"
    )
    print(
        "worker start (to the first image): "
        + ", ".join(f"{k} worker(s) {v:.2f} s" for k, v in r["start_seconds"].items())
    )
    print(
        f"1 worker:             {r['one_worker_img_s']:7.0f} img/s (median; runs "
        + " ".join(f"{v:.0f}" for v in r["one_worker_runs_img_s"])
        + ")"
    )
    print(
        f"{r['workers']} workers:            {r['n_workers_img_s']:7.0f} img/s (median; runs "
        + " ".join(f"{v:.0f}" for v in r["n_workers_runs_img_s"])
        + ")"
    )
    print(
        f"batches on the CPU:   {r['batches_img_s']:7.0f} img/s with {r['workers']} workers "
        "(decode + float32 normalisation in this process)"
    )
    print(
        f"CPU time per image:   {r['one_worker_cpu_ms']:.2f} ms with 1 worker, {r['n_workers_cpu_ms']:.2f} ms with "
        f"{r['workers']} (workers + this process; ratio {r['cpu_efficiency']:.2f}: 1.00 means no parallel overhead)"
    )
    print(
        f"ratio {r['workers']} workers / ({r['workers']} x 1 worker): {r['ratio']:.2f} wall-clock (target >= 0.8; "
        "meaningful only on a machine with that many idle cores)"
    )


if __name__ == "__main__":
    main()
