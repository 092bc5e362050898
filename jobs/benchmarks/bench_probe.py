"""Benchmark: probeserve's probe trainer against scikit-learn on Fashion-MNIST raw pixels.

Both fit multinomial logistic regression on the same data, in one process, on the same cores:

  * data: the 60,000 training images are split with a seeded permutation (seed 0) into
    55,000 train and 5,000 validation images; the standard 10,000 test images are the test
    set. Features are the 784 pixels as float32, divided by 255 (so in [0, 1]).
  * scikit-learn: `LogisticRegression(solver="lbfgs", max_iter=1000)` (C=1.0, its defaults
    otherwise) fitted on the 55,000 train rows exactly as above; it has no use for the
    validation rows.
  * probeserve: `train_probe` with `ProbeSpec()` defaults but one `l2`, 1e-4 (standardised
    features, L-BFGS, early stopping on the 5,000 validation rows), on the same arrays: one
    probe against one fit (the default `probe.l2` grid is `bench_science.py`'s subject);
    `--probe key=value` overrides a ProbeSpec field (the value is read as YAML).

Targets: test error within 0.005 of scikit-learn's, and at least 5x faster. Wall times are
taken once each, so on a shared machine they move with whatever else runs there.

    python jobs/benchmarks/bench_probe.py [--idx-dir DIR] [--probe patience=10 ...] [--skip-sklearn]

`--skip-sklearn` prints probeserve's line alone (scikit-learn's fit takes minutes).

A second benchmark, `lbfgs`, measures our L-BFGS against torch.optim.LBFGS on the same
objective (see `lbfgs_main`):

    python jobs/benchmarks/bench_probe.py lbfgs [--problems fashion synthetic] [--tolerance 1e-6]
"""

from __future__ import annotations

import argparse
import gzip
import math
import sys
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

    spec = ProbeSpec(**{"l2": 1e-4, **dict(parse_overrides(args.probe))})
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


# ----------------------------------------------------------------------------------------------
# Our L-BFGS against torch.optim.LBFGS (issue 12, item 16)


def _standardize(x: np.ndarray):
    """z = (x - mean) * (1 / std) in float32, with float64 statistics and train_probe's rule
    for constant features, so that both solvers see the same features."""
    import torch

    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    std = np.sqrt(((x64 - mean) ** 2).mean(axis=0))
    std[(std == 0) | (std <= 10 * np.finfo(np.float64).eps * np.abs(mean))] = 1.0
    shift = torch.from_numpy(mean).to(torch.float32)
    scale = torch.from_numpy(1.0 / std).to(torch.float32)
    return (torch.from_numpy(x).to(torch.float32) - shift) * scale, shift, scale


def _objective(z, y, weight, bias, l2: float):
    """mean CE + l2/2 ||W||^2 as train_probe computes it: logits in float32 from float64
    parameters, sums in float64. Differentiable in `weight` and `bias`."""
    import torch

    logits = torch.addmm(bias.to(torch.float32), z, weight.to(torch.float32).T)
    per_row = torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None]).squeeze(1)
    return per_row.to(torch.float64).sum() / len(y) + 0.5 * l2 * weight.pow(2).sum()


def _torch_lbfgs(
    z, y, num_classes: int, *, l2: float, line_search: str | None, per_epoch: bool, args
) -> dict:
    """torch.optim.LBFGS from W = 0, b = 0 (float64, as ours), counting objective evaluations.

    per_epoch=False: one `step()` with max_iter=--max-epochs, torch's own stopping rules
    (tolerance_change=--tolerance, absolute, as ours is for objectives below 1).
    per_epoch=True: `step()` with max_iter=1 once per epoch, as a loop that checks validation
    between epochs must call it, stopped by our rule (relative change below --tolerance) on
    the objective each step() returns.
    """
    import torch

    weight = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    history: list[float] = []  # the objective at every evaluation, in order

    def closure():
        optimizer.zero_grad()
        f = _objective(z, y, weight, bias, l2)
        f.backward()
        history.append(f.item())
        return f

    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=1 if per_epoch else args.max_epochs,
        # torch's line search may evaluate max_eval minus the evaluations already made in this
        # step(); its default, max_iter * 5 // 4, is 1 when max_iter is 1, which leaves strong
        # Wolfe no evaluation of its own (it then returns t = 0 and stalls). 26: 1 + its max_ls.
        max_eval=26 if per_epoch else 4 * args.max_epochs,
        tolerance_grad=1e-12,  # leave stopping to the objective's change, as ours does
        tolerance_change=args.tolerance,
        history_size=10,  # ours keeps 10 pairs too
        line_search_fn=line_search,
    )
    started, started_cpu = time.perf_counter(), time.process_time()
    if per_epoch:
        previous = math.inf
        epochs = 0
        while epochs < args.max_epochs:
            epochs += 1
            # step() returns the objective where it started, i.e. after the previous epoch: the
            # stopping rule sees each epoch's objective one epoch late, but costs no extra pass.
            f = optimizer.step(closure).item()
            if not math.isfinite(f) or abs(previous - f) / max(abs(previous), abs(f), 1.0) < args.tolerance:
                break
            previous = f
    else:
        optimizer.step(closure)
        epochs = optimizer.state[optimizer._params[0]]["n_iter"]
    seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    return {
        "weight": weight.detach(),
        "bias": bias.detach(),
        "epochs": epochs,
        "evals": len(history),
        "seconds": seconds,
        "cpu": cpu,
        "history": history,
    }


def _ours(x: np.ndarray, y: np.ndarray, num_classes: int, *, l2: float, args) -> dict:
    """train_probe to the optimum (no val split, patience None), held in memory. Its passes are
    the engine's own count of train passes with a gradient (`ProbeResult.evaluations`); the
    one pass that checks the split and takes its moments, and the one that scores the
    returned weights, are not in it (torch's runs have neither: their standardisation is
    timed as setup). Wall time is the whole call, the solver loop alone in `solve`."""
    from probeserve.probe import in_memory, train_probe
    from probeserve.spec import ProbeSpec

    spec = ProbeSpec(l2=l2, patience=None, max_epochs=args.max_epochs, tolerance=args.tolerance)
    started, started_cpu = time.perf_counter(), time.process_time()
    result = train_probe(in_memory(x, y), None, None, num_classes=num_classes, spec=spec)
    seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    return {
        "result": result,
        "seconds": seconds,
        "cpu": cpu,
        "solve": result.solve_seconds,
        "epochs": result.epochs,
        "evals": result.evaluations,
    }


def _refine(z, y, weight, bias, l2: float, iterations: int) -> float:
    """The objective after `iterations` more strong-Wolfe L-BFGS iterations from (weight, bias)."""
    import torch

    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        max_iter=iterations,
        tolerance_grad=0,
        tolerance_change=0,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        f = _objective(z, y, weight, bias, l2)
        f.backward()
        return f

    optimizer.step(closure)
    with torch.no_grad():
        return float(_objective(z, y, weight, bias, l2))


def _fashion(args) -> tuple[str, np.ndarray, np.ndarray, int, float]:
    images = read_idx(find(args.idx_dir, "train-images-idx3-ubyte")).reshape(60000, -1)
    labels = read_idx(find(args.idx_dir, "train-labels-idx1-ubyte")).astype(np.int64)
    train_rows = np.random.default_rng(0).permutation(len(images))[5000:]  # main()'s train split
    train_rows = train_rows[: args.fashion_rows]  # its first rows, for a shorter run
    x = images[train_rows].astype(np.float32) / 255
    return f"Fashion-MNIST pixels, {len(x)} x {x.shape[1]}, 10 classes", x, labels[train_rows], 10, 1e-4


def _synthetic(args) -> tuple[str, np.ndarray, np.ndarray, int, float]:
    rng = np.random.default_rng(0)
    n, d, c = args.synthetic_rows, args.synthetic_features, 1000
    means = rng.standard_normal((c, d), dtype=np.float32) * args.synthetic_signal
    y = rng.integers(0, c, n)
    x = means[y] + rng.standard_normal((n, d), dtype=np.float32)
    name = f"synthetic, {n} x {d}, {c} classes (class means N(0, {args.synthetic_signal}^2 I) + N(0, I))"
    return name, x, y, c, 1e-4


def lbfgs_main(argv: list[str]) -> None:
    """Our L-BFGS (train_probe) against torch.optim.LBFGS, with and without strong Wolfe.

    The claim tested (probe.py's docstring): our L-BFGS costs about one pass over the data per
    epoch, while torch.optim.LBFGS re-evaluates the objective at the start of every step()
    call, a second pass per epoch for a loop that checks validation between epochs.

    Same objective for all: mean cross-entropy + l2/2 ||W||^2 on standardised features (float32
    data and logits, float64 parameters and sums, W = 0 and b = 0 at the start), l2 1e-4,
    history 10, stopped when the objective changes by less than --tolerance (ours relative to
    max(|f|, 1), torch's absolute: the same below 1). A "pass" is one evaluation of the
    objective and its gradient over the whole train split; torch's are counted in the closure,
    ours by the engine (`ProbeResult.evaluations`). Every final objective is recomputed here
    by one function from each run's weights (ours from the float32 raw-feature weights it
    returns, folded back onto the standardised features). f* is the best objective any run
    reached, refined by --refine-iterations more strong-Wolfe iterations from there (100 were
    too few on Fashion-MNIST, which converges slowly); "gap" is f - f*. "passes to ours" is how many evaluations a torch run needed before its objective first came
    within ours' final gap. "wall s" is the whole call (ours: reading, checking, moments,
    solving, scoring; torch: standardising and solving), "solve s" the solver loop alone,
    "CPU s" the process's CPU time over the whole call (steadier than wall time on a shared
    machine; all threads together).
    """
    import torch

    parser = argparse.ArgumentParser(
        prog="bench_probe.py lbfgs", description=lbfgs_main.__doc__.split("\n")[0]
    )
    parser.add_argument("--idx-dir", default=DEFAULT_IDX_DIR, type=Path)
    parser.add_argument(
        "--problems", nargs="+", choices=["fashion", "synthetic"], default=["fashion", "synthetic"]
    )
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument(
        "--refine-iterations", type=int, default=1000, help="strong-Wolfe iterations that refine f*"
    )
    parser.add_argument("--max-epochs", type=int, default=1000)
    parser.add_argument(
        "--fashion-rows", type=int, default=55000, help="the first N of the 55,000 train rows"
    )
    parser.add_argument("--synthetic-rows", type=int, default=10000)
    parser.add_argument("--synthetic-features", type=int, default=64)
    parser.add_argument("--synthetic-signal", type=float, default=0.5)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tolerance {args.tolerance}")

    for problem in args.problems:
        name, x, y, num_classes, l2 = (_fashion if problem == "fashion" else _synthetic)(args)
        print(f"\n{name}; l2 {l2}")
        ours = {OURS: _ours(x, y, num_classes, l2=l2, args=args)}
        print(f"  done: {OURS}, {ours[OURS]['evals']} passes", file=sys.stderr, flush=True)

        started, started_cpu = time.perf_counter(), time.process_time()
        z, shift, scale = _standardize(x)
        yt = torch.from_numpy(y.astype(np.int64))
        setup, setup_cpu = time.perf_counter() - started, time.process_time() - started_cpu
        runs = {}
        for label, line_search, per_epoch in [
            ("torch, strong_wolfe, one step()", "strong_wolfe", False),
            ("torch, no line search, one step()", None, False),
            ("torch, strong_wolfe, step() per epoch", "strong_wolfe", True),
            ("torch, no line search, step() per epoch", None, True),
        ]:
            runs[label] = _torch_lbfgs(
                z, yt, num_classes, l2=l2, line_search=line_search, per_epoch=per_epoch, args=args
            )
            runs[label]["solve"] = runs[label]["seconds"]
            runs[label]["seconds"] += setup
            runs[label]["cpu"] += setup_cpu
            print(f"  done: {label}, {runs[label]['evals']} passes", file=sys.stderr, flush=True)

        for run in ours.values():  # ours in the same terms: raw-feature weights folded back
            w_raw = torch.from_numpy(run["result"].weight).to(torch.float64)
            run["weight"] = w_raw / scale.to(torch.float64)
            run["bias"] = torch.from_numpy(run["result"].bias).to(torch.float64) + w_raw @ shift.to(
                torch.float64
            )
        everything = ours | runs
        with torch.no_grad():
            finals = {
                label: float(_objective(z, yt, r["weight"], r["bias"], l2)) for label, r in everything.items()
            }
        best = min((f, label) for label, f in finals.items() if math.isfinite(f))[1]
        refined = _refine(
            z, yt, everything[best]["weight"], everything[best]["bias"], l2, args.refine_iterations
        )
        f_star = min(refined, min(finals.values()))

        # the objective torch runs must reach: where ours stopped
        target = finals[OURS] - f_star
        print(f"f* = {f_star:.10f}")
        print(
            f"{'':40} {'epochs':>6} {'passes':>6} {'per epoch':>9} {'wall s':>7} {'solve s':>7} {'CPU s':>7} {'objective':>14} "
            f"{'gap':>9} {'gap / f*':>9} {'passes to ours':>14}"
        )
        for label, r in everything.items():
            gap = finals[label] - f_star
            evals = r["evals"]
            per_epoch = "" if evals is None else f"{evals / max(r['epochs'], 1):.2f}"
            reached = ""
            if "history" in r:
                reached = next((i + 1 for i, f in enumerate(r["history"]) if f - f_star <= target), "never")
            print(
                f"{label:40} {r['epochs']:6d} {'' if evals is None else evals:>6} "
                f"{per_epoch:>9} {r['seconds']:7.2f} {r['solve']:7.2f} {r['cpu']:7.2f} "
                f"{finals[label]:14.10f} {gap:9.2e} {gap / abs(f_star):9.2e} {reached:>14}"
            )


OURS = "ours (train_probe)"


if __name__ == "__main__":
    if sys.argv[1:2] == ["lbfgs"]:
        lbfgs_main(sys.argv[2:])
    else:
        main()
