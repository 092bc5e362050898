"""Benchmark: probeserve's probe trainer against scikit-learn on Fashion-MNIST raw pixels.

Both fit multinomial logistic regression on the same data, in one process, on the same cores:

  * data: the 60,000 training images are split with a seeded permutation (seed 0) into
    55,000 train and 5,000 validation images; the standard 10,000 test images are the test
    set. Features are the 784 pixels as float32, divided by 255 (so in [0, 1]).
  * scikit-learn: `LogisticRegression(solver="lbfgs", max_iter=1000)` (C=1.0, its defaults
    otherwise) fitted on the 55,000 train rows exactly as above; it has no use for the
    validation rows.
  * probeserve: `train_probe` with `ProbeSpec()` defaults (standardised features, L-BFGS,
    early stopping on the 5,000 validation rows), on the same arrays; `--probe key=value`
    overrides a ProbeSpec field (the value is read as YAML).

Targets: test error within 0.005 of scikit-learn's, and at least 5x faster. Wall times are
taken once each, so on a shared machine they move with whatever else runs there.

    python jobs/benchmarks/bench_probe.py [--idx-dir DIR] [--probe patience=10 ...] [--skip-sklearn]

`--skip-sklearn` prints probeserve's line alone (scikit-learn's fit takes minutes).
"""

from __future__ import annotations

import argparse
import gzip
import time
import warnings
from pathlib import Path

import numpy as np

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: magic (2 zero bytes, dtype code, rank), big-endian dims, data."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    rank = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=rank, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def find(idx_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (idx_dir / name).exists():
            return idx_dir / name
    raise FileNotFoundError(f"{idx_dir}: no {stem}(.gz)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idx-dir", default=DEFAULT_IDX_DIR, type=Path)
    parser.add_argument("--probe", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--skip-sklearn", action="store_true", help="probeserve's figures only")
    args = parser.parse_args()

    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from probeserve.probe import in_memory, train_probe
    from probeserve.spec import ProbeSpec, parse_overrides

    images = read_idx(find(args.idx_dir, "train-images-idx3-ubyte")).reshape(60000, -1)
    labels = read_idx(find(args.idx_dir, "train-labels-idx1-ubyte")).astype(np.int64)
    test_images = read_idx(find(args.idx_dir, "t10k-images-idx3-ubyte")).reshape(10000, -1)
    test_labels = read_idx(find(args.idx_dir, "t10k-labels-idx1-ubyte")).astype(np.int64)

    order = np.random.default_rng(0).permutation(len(images))
    val_rows, train_rows = order[:5000], order[5000:]
    x_train = images[train_rows].astype(np.float32) / 255
    y_train = labels[train_rows]
    x_val = images[val_rows].astype(np.float32) / 255
    y_val = labels[val_rows]
    x_test = test_images.astype(np.float32) / 255

    print(
        f"Fashion-MNIST: train {len(x_train)}, val {len(x_val)}, test {len(x_test)}, "
        f"{x_train.shape[1]} features; torch threads {torch.get_num_threads()}"
    )

    spec = ProbeSpec(**dict(parse_overrides(args.probe)))
    started, started_cpu = time.perf_counter(), time.process_time()
    ours = train_probe(
        in_memory(x_train, y_train),
        in_memory(x_val, y_val),
        in_memory(x_test, test_labels),
        num_classes=10,
        spec=spec,
    )
    ours_seconds = time.perf_counter() - started
    ours_cpu = time.process_time() - started_cpu
    print(
        f"probeserve  test error {ours.test_error:.4f}  val error {ours.val_error:.4f}  "
        f"train error {ours.train_error:.4f}  {ours_seconds:6.1f} s ({ours_cpu:.1f} s CPU)  "
        f"(epochs {ours.epochs}, best {ours.best_epoch}; {spec.solver}, l2 {spec.l2}, "
        f"patience {spec.patience}, tolerance {spec.tolerance})"
    )

    if args.skip_sklearn:
        return
    started, started_cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        sklearn = LogisticRegression(solver="lbfgs", max_iter=1000).fit(x_train, y_train)
    sklearn_seconds = time.perf_counter() - started
    sklearn_cpu = time.process_time() - started_cpu
    sklearn_test = float(np.mean(sklearn.predict(x_test) != test_labels))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    print(
        f"sklearn     test error {sklearn_test:.4f}  val error "
        f"{np.mean(sklearn.predict(x_val) != y_val):.4f}  train error "
        f"{np.mean(sklearn.predict(x_train) != y_train):.4f}  {sklearn_seconds:6.1f} s ({sklearn_cpu:.1f} s CPU)  "
        f"(iterations {int(sklearn.n_iter_[0])}, converged {converged})"
    )

    difference = ours.test_error - sklearn_test
    ratio = sklearn_seconds / ours_seconds
    print(f"test error difference (probeserve - sklearn): {difference:+.4f}   target |d| <= 0.005")
    print(
        f"speed ratio (sklearn / probeserve): {ratio:.1f}x wall, "
        f"{sklearn_cpu / ours_cpu:.1f}x CPU time   target >= 5x (wall)"
    )
    ok = abs(difference) <= 0.005 and ratio >= 5
    print("targets met" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    main()
