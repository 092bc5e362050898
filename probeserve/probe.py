"""Linear classifier probes: multinomial logistic regression on a stream of activation chunks.

A probe (Alain & Bengio, 2016) is softmax(W h + b) trained with cross-entropy on one layer's
activations h. The problem is convex, so the answer should not depend on how it was trained:
we minimise the regularised training objective

    objective(W, b) = mean_i CE(softmax(W z_i + b), y_i) + (l2 / 2) * ||W||^2      (b is free)

to its optimum with full-batch L-BFGS, watching the validation loss after every iteration
("epoch") for early stopping. W starts at zero; nothing random is involved in `lbfgs`.

Relation to scikit-learn: `LogisticRegression(C=C)` (multinomial, lbfgs) minimises
sum_i CE_i + ||W||^2 / (2 C), which divided by n_train is the objective above with
`l2 = 1 / (C * n_train)`. The penalty acts on whatever features the probe sees: with
`standardize` (the default) `z_i` are the z-scored activations, so the match is with
scikit-learn fitted on `StandardScaler().fit_transform(h)`, not on raw `h`. Standardising
makes one `l2` mean the same thing for every layer whatever its activation scale, and makes
the problem much better conditioned, so L-BFGS needs far fewer iterations.

Memory is bounded whatever the size of a split. Data comes as a `ChunkSource`: a callable
that starts a fresh pass and yields `(x [n, D], y [n])` chunks. The train split is first
scanned once (validation, counts, float64 mean/std); if it fits in `spec.memory_bytes` as
float32 it is then read a second time into one standardised tensor on the device, otherwise
every L-BFGS function evaluation is one streamed pass that accumulates loss and gradient
chunk by chunk. Validation and test splits are kept on the device when they fit in what the
budget has left, and streamed otherwise. Peak memory is the budget plus a few chunks.

Solvers:
  * `lbfgs` (default): our own L-BFGS (two-loop recursion, float64 parameters and history,
    Armijo backtracking with quadratic interpolation). For a convex objective the curvature
    condition s.y > 0 holds by itself, so the Wolfe line search of general-purpose codes buys
    little, and a step of 1 is accepted on almost every iteration: about one pass over the
    data per epoch. (torch.optim.LBFGS re-evaluates the objective at the start of every
    `step()` call, which would cost a second pass per epoch.) Losses and gradients are
    computed in float32, so the objective is reached to about 1e-6 relative; a feature set
    of wildly different scales without `standardize` can stall L-BFGS short of that.
  * `adam`: minibatch Adam for splits too large for many full passes. Rows are shuffled with
    a generator seeded by `spec.seed` (globally in memory; within each chunk when streamed,
    so a stream sorted by label should be shuffled upstream).

Early stopping: with `spec.patience` set and a validation split, training stops once
`patience` epochs pass without a lower validation loss, and the weights of the best epoch
are returned. With `patience=None` (or no validation split) the final weights are returned:
that is the regularised optimum, up to `tolerance` and `max_epochs`. Either way training also
stops when the relative change of the objective, |f_old - f_new| / max(|f_old|, |f_new|, 1),
falls below `spec.tolerance`.

On CPU the result is bit-for-bit reproducible for the same inputs, spec and thread count.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from probeserve.errors import DataError, ProbeserveError
from probeserve.spec import ProbeSpec

ChunkSource = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
"""Calling it starts a fresh pass over a split: it yields `(x [n, D], y [n])` chunks with x
float16 or float32 (any real dtype is accepted) and y integer class labels."""

_HISTORY = 10  # L-BFGS curvature pairs kept; more helps little on these problems
_ARMIJO_C1 = 1e-4
_MAX_BACKTRACKS = 30
# Resident data is processed in blocks whose [rows, num_classes] temporaries hold about this
# many floats: large blocks mean few, large matrix products (faster than many small ones),
# while the temporaries stay small whatever the number of classes.
_BLOCK_ELEMENTS = 1 << 22


def _block_rows(spec: ProbeSpec, num_classes: int) -> int:
    return max(spec.batch_size, _BLOCK_ELEMENTS // num_classes)


def in_memory(x: np.ndarray, y: np.ndarray, *, batch_size: int = 8192) -> ChunkSource:
    """A `ChunkSource` over arrays already in memory, in slices of `batch_size` rows."""
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} rows but y has {len(y)} labels")

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]

    return chunks


@dataclass
class ProbeResult:
    """One trained probe and how well it does. Losses are mean cross-entropy without the
    L2 term; errors are fractions of misclassified examples."""

    train_error: float
    val_error: float | None
    test_error: float | None
    train_loss: float
    val_loss: float | None
    test_loss: float | None
    objective: float  # regularised train objective at the returned weights: train_loss + l2/2*||W||^2
    epochs: int  # epochs (L-BFGS iterations, or Adam passes) run
    best_epoch: int  # epoch whose weights were kept
    n_train: int
    n_val: int
    n_test: int
    n_features: int
    num_classes: int
    seconds: float
    device: str  # "cpu" or "cuda:0"
    weight: np.ndarray  # [num_classes, n_features] float32, applies to raw (unstandardised) features
    bias: np.ndarray  # [num_classes] float32


def resolve_device(requested: str) -> str:
    """Map "auto", "cpu", "cuda" or "cuda:N" to a concrete torch device name."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ProbeserveError(
                f"device '{requested}' was requested but CUDA is not available here; "
                "use device 'auto' or 'cpu'"
            )
        index = torch.device(requested).index
        return f"cuda:{torch.cuda.current_device() if index is None else index}"
    raise ProbeserveError(f"unknown device '{requested}'; expected auto, cpu, cuda or cuda:N")


# ----------------------------------------------------------------------------------------------
# Reading and checking splits


def _checked_chunks(
    source: ChunkSource, split: str, num_classes: int, n_features: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One pass over `source`, with every chunk checked: shapes, finite values, label range."""
    for x, y in source():
        x = np.asarray(x)
        y = np.asarray(y)
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{split} split: expected chunks x [n, D] and y [n], got x {x.shape} and y {y.shape}"
            )
        if len(y) == 0:
            continue
        if n_features is None:
            n_features = x.shape[1]
        if x.shape[1] != n_features:
            raise DataError(f"{split} split: a chunk has {x.shape[1]} features, expected {n_features}")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{split} split: labels must be integers, got dtype {y.dtype}")
        if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise DataError(f"{split} split: activations must be real numbers, got dtype {x.dtype}")
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).any(axis=1).sum())
            raise DataError(
                f"{split} split: the activations contain non-finite values (NaN or inf) "
                f"in {bad} of {len(x)} rows of a chunk"
            )
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            label = low if low < 0 else high
            raise DataError(f"{split} split: label {label} is outside [0, {num_classes})")
        yield x, y.astype(np.int64, copy=False)


@dataclass
class _Moments:
    """Running count, mean and sum of squared deviations (Chan et al.), all float64."""

    n: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        x64 = x.astype(np.float64)
        n_b = len(x64)
        mean_b = x64.mean(axis=0)
        m2_b = ((x64 - mean_b) ** 2).sum(axis=0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.n = n


class _Split:
    """A split on the device: resident standardised chunks, or a source streamed on demand."""

    def __init__(
        self,
        source: ChunkSource,
        *,
        n: int,
        resident: list[tuple[torch.Tensor, torch.Tensor]] | None,
        shift: torch.Tensor,
        scale: torch.Tensor,
        block_rows: int,
        device: str,
    ) -> None:
        self.source, self.n, self.resident = source, n, resident
        self.shift, self.scale = shift, scale
        self.block_rows, self.device = block_rows, device

    def prepare(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        with warnings.catch_warnings():
            # shards arrive as read-only views of a memory-mapped file; they are only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, torch.float32)
        xt = (xt - self.shift) * self.scale
        return xt, torch.from_numpy(np.ascontiguousarray(y)).to(self.device, torch.int64)

    def blocks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass in blocks of at most `block_rows` standardised rows."""
        if self.resident is not None:
            for x, y in self.resident:
                for start in range(0, len(x), self.block_rows):
                    yield x[start : start + self.block_rows], y[start : start + self.block_rows]
            return
        for x, y in self.source():
            x = np.asarray(x)
            if len(x):
                yield self.prepare(x.astype(np.float32, copy=False), np.asarray(y).astype(np.int64))

    def tensor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as one (x, y) pair; only for a split held in a single tensor."""
        assert self.resident is not None and len(self.resident) == 1
        return self.resident[0]


def _load(
    source: ChunkSource,
    split: str,
    *,
    num_classes: int,
    n_features: int,
    shift: torch.Tensor,
    scale: torch.Tensor,
    budget: int,
    block_rows: int,
    device: str,
) -> tuple[_Split, int]:
    """Check a val/test split in one pass, keeping it on the device if it fits in `budget`
    bytes. Returns the split and the bytes it holds."""
    split_obj = _Split(
        source, n=0, resident=None, shift=shift, scale=scale, block_rows=block_rows, device=device
    )
    kept: list[tuple[torch.Tensor, torch.Tensor]] | None = []
    held = 0
    n = 0
    for x, y in _checked_chunks(source, split, num_classes, n_features):
        n += len(x)
        if kept is not None:
            held += x.shape[0] * x.shape[1] * 4
            if held <= budget:
                kept.append(split_obj.prepare(x, y))
            else:
                kept, held = None, 0
    if n == 0:
        raise DataError(f"{split} split is empty")
    split_obj.n, split_obj.resident = n, kept
    return split_obj, held


def _load_train(source: ChunkSource, *, num_classes: int, spec: ProbeSpec, device: str) -> tuple[_Split, int]:
    """Scan the train split (checks, class counts, moments); hold it in one tensor if it fits."""
    moments = _Moments()
    counts = np.zeros(num_classes, dtype=np.int64)
    n_features: int | None = None
    for x, y in _checked_chunks(source, "train", num_classes, None):
        n_features = x.shape[1]
        moments.add(x)
        counts += np.bincount(y, minlength=num_classes)
    if moments.n == 0 or moments.mean is None or moments.m2 is None or n_features is None:
        raise DataError("train split is empty")
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise DataError(
            f"train split has a single class (label {int(present[0])}); a probe needs at least two"
        )

    if spec.standardize:
        mean = moments.mean
        std = np.sqrt(moments.m2 / moments.n)
        # A constant feature carries no information; dividing by its rounding-noise std would
        # only blow that noise up. Same rule of thumb as scikit-learn's StandardScaler.
        constant = (std == 0) | (std <= 10 * np.finfo(np.float64).eps * np.abs(mean))
        std[constant] = 1.0
    else:
        mean = np.zeros(n_features)
        std = np.ones(n_features)
    shift = torch.from_numpy(mean).to(device, torch.float32)
    scale = torch.from_numpy(1.0 / std).to(device, torch.float32)

    n = moments.n
    split = _Split(
        source,
        n=n,
        resident=None,
        shift=shift,
        scale=scale,
        block_rows=_block_rows(spec, num_classes),
        device=device,
    )
    held = n * n_features * 4
    if held <= spec.memory_bytes:
        x_all = torch.empty((n, n_features), dtype=torch.float32, device=device)
        y_all = torch.empty(n, dtype=torch.int64, device=device)
        row = 0
        for x, y in source():
            x = np.asarray(x)
            if len(x) == 0:
                continue
            if row + len(x) > n:
                raise DataError("train split: a second pass yielded more rows than the first")
            xt, yt = split.prepare(x.astype(np.float32, copy=False), np.asarray(y).astype(np.int64))
            x_all[row : row + len(x)] = xt
            y_all[row : row + len(x)] = yt
            row += len(x)
        if row != n:
            raise DataError("train split: a second pass yielded fewer rows than the first")
        split.resident = [(x_all, y_all)]
    else:
        held = 0
    return split, held


# ----------------------------------------------------------------------------------------------
# The objective


@dataclass
class _Eval:
    loss: float  # mean cross-entropy
    errors: int
    n: int

    @property
    def error(self) -> float:
        return self.errors / self.n


def _pass(
    split: _Split, weight: torch.Tensor, bias: torch.Tensor, *, with_grad: bool
) -> tuple[_Eval, torch.Tensor | None, torch.Tensor | None]:
    """One pass: mean cross-entropy, error count and (optionally) the gradient of the mean
    cross-entropy with respect to float64 `weight` [C, D] and `bias` [C]."""
    w32, b32 = weight.to(torch.float32), bias.to(torch.float32)
    loss_sum = 0.0
    errors = 0
    grad_w = torch.zeros_like(weight) if with_grad else None
    grad_b = torch.zeros_like(bias) if with_grad else None
    for x, y in split.blocks():
        logits = torch.addmm(b32, x, w32.T)
        lse = torch.logsumexp(logits, dim=1)
        picked = logits.gather(1, y[:, None]).squeeze(1)
        loss_sum += float((lse - picked).sum(dtype=torch.float64))
        errors += int((logits.argmax(dim=1) != y).sum())
        if grad_w is not None and grad_b is not None:
            residual = torch.exp(logits - lse[:, None])  # softmax
            residual[torch.arange(len(y), device=y.device), y] -= 1.0
            grad_w += (residual.T @ x).to(torch.float64)
            grad_b += residual.sum(dim=0, dtype=torch.float64)
    n = split.n
    if not math.isfinite(loss_sum):
        raise DataError("the loss became non-finite; the activations may be too large for float32")
    if grad_w is not None and grad_b is not None:
        grad_w /= n
        grad_b /= n
    return _Eval(loss_sum / n, errors, n), grad_w, grad_b


def _relative_change(old: float, new: float) -> float:
    return abs(old - new) / max(abs(old), abs(new), 1.0)


class _EarlyStopping:
    """Tracks the best validation loss and the parameters that produced it."""

    def __init__(self, val: _Split | None, patience: int | None) -> None:
        self.val, self.patience = val, patience
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_params: torch.Tensor | None = None
        self.best_train: _Eval | None = None

    @property
    def active(self) -> bool:
        return self.val is not None and self.patience is not None

    def update(self, epoch: int, params: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> bool:
        """Record epoch `epoch`; return True when training should stop."""
        if self.val is None or self.patience is None:
            return False
        val, _, _ = _pass(self.val, w, b, with_grad=False)
        if val.loss < self.best_loss:
            self.best_loss, self.best_epoch = val.loss, epoch
            self.best_params = params.clone()
            return False
        return epoch - self.best_epoch >= self.patience


# ----------------------------------------------------------------------------------------------
# Solvers. Parameters live in one float64 vector: W ([C, D], row-major) then b ([C]).


def _unpack(params: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_weights = params.numel() - num_classes
    return params[:n_weights].view(num_classes, -1), params[n_weights:]


def _lbfgs(
    train: _Split, stopper: _EarlyStopping, *, num_classes: int, n_features: int, spec: ProbeSpec
) -> tuple[torch.Tensor, int]:
    """Minimise the objective; return the parameters to keep and the epochs run."""
    device = train.shift.device
    params = torch.zeros(num_classes * (n_features + 1), dtype=torch.float64, device=device)
    l2 = spec.l2

    def evaluate(p: torch.Tensor) -> tuple[float, torch.Tensor]:
        w, b = _unpack(p, num_classes)
        ev, gw, gb = _pass(train, w, b, with_grad=True)
        assert gw is not None and gb is not None
        f = ev.loss + 0.5 * l2 * float(w.pow(2).sum())
        return f, torch.cat([(gw + l2 * w).reshape(-1), gb])

    f, grad = evaluate(params)
    steps: list[torch.Tensor] = []  # s_k = x_{k+1} - x_k
    diffs: list[torch.Tensor] = []  # y_k = g_{k+1} - g_k
    rhos: list[float] = []
    epoch = 0
    while epoch < spec.max_epochs:
        epoch += 1
        # Two-loop recursion: direction = -H grad.
        q = grad.clone()
        alphas = []
        for s, yk, rho in zip(reversed(steps), reversed(diffs), reversed(rhos), strict=True):
            a = rho * float(s @ q)
            q -= a * yk
            alphas.append(a)
        if steps:
            q *= float(steps[-1] @ diffs[-1]) / float(diffs[-1] @ diffs[-1])
        for s, yk, rho, a in zip(steps, diffs, rhos, reversed(alphas), strict=True):
            q += (a - rho * float(yk @ q)) * s
        direction = -q
        slope = float(grad @ direction)
        if slope >= 0:  # numerically lost descent: restart from steepest descent
            steps, diffs, rhos = [], [], []
            direction, slope = -grad, -float(grad @ grad)
        # First iteration: a unit-length step, the scale is unknown until curvature is seen.
        t = 1.0 if steps else 1.0 / max(float(grad.norm()), 1e-12)

        for _ in range(_MAX_BACKTRACKS):
            candidate = params + t * direction
            f_new, grad_new = evaluate(candidate)
            if f_new <= f + _ARMIJO_C1 * t * slope:
                break
            # Minimiser of the quadratic through f, slope and f_new, kept within [0.1t, 0.5t].
            t_quad = -slope * t * t / (2.0 * (f_new - f - slope * t))
            t = min(max(t_quad, 0.1 * t), 0.5 * t)
        else:  # no decrease representable in float32: as converged as it gets
            epoch -= 1
            break

        s, yk = candidate - params, grad_new - grad
        sy = float(s @ yk)
        if sy > 1e-10 * float(yk @ yk):
            steps.append(s)
            diffs.append(yk)
            rhos.append(1.0 / sy)
            if len(steps) > _HISTORY:
                steps.pop(0), diffs.pop(0), rhos.pop(0)
        change = _relative_change(f, f_new)
        params, f, grad = candidate, f_new, grad_new
        if stopper.update(epoch, params, *_unpack(params, num_classes)):
            break
        if change < spec.tolerance:
            break
    return params, epoch


def _adam(
    train: _Split, stopper: _EarlyStopping, *, num_classes: int, n_features: int, spec: ProbeSpec
) -> tuple[torch.Tensor, int]:
    """Minibatch Adam on the same objective; return the last parameters and the epochs run."""
    device = train.shift.device
    params = torch.zeros(num_classes * (n_features + 1), dtype=torch.float32, device=device)
    first = torch.zeros_like(params)  # Adam's moment estimates
    second = torch.zeros_like(params)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    generator = torch.Generator().manual_seed(spec.seed)
    batch = spec.batch_size

    def minibatches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if train.resident is not None:
            x_all, y_all = train.tensor()
            order = torch.randperm(train.n, generator=generator).to(device)
            for start in range(0, train.n, batch):
                idx = order[start : start + batch]
                yield x_all[idx], y_all[idx]
            return
        for x, y in train.blocks():
            order = torch.randperm(len(y), generator=generator).to(device)
            for start in range(0, len(y), batch):
                idx = order[start : start + batch]
                yield x[idx], y[idx]

    previous = math.inf
    step = 0
    epoch = 0
    while epoch < spec.max_epochs:
        epoch += 1
        total, seen = 0.0, 0
        for x, y in minibatches():
            w, b = _unpack(params, num_classes)
            logits = torch.addmm(b, x, w.T)
            lse = torch.logsumexp(logits, dim=1)
            loss = float((lse - logits.gather(1, y[:, None]).squeeze(1)).sum(dtype=torch.float64))
            total += loss + 0.5 * spec.l2 * float(w.pow(2).sum()) * len(y)
            seen += len(y)
            residual = torch.exp(logits - lse[:, None])  # softmax minus one-hot, over the batch
            residual[torch.arange(len(y), device=device), y] -= 1.0
            residual /= len(y)
            grad = torch.cat([(residual.T @ x + spec.l2 * w).reshape(-1), residual.sum(dim=0)])
            step += 1
            first.mul_(beta1).add_(grad, alpha=1 - beta1)
            second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (second / (1 - beta2**step)).sqrt_().add_(eps)
            params.addcdiv_(first, denom, value=-spec.learning_rate / (1 - beta1**step))
        if not math.isfinite(total):
            raise DataError("the loss became non-finite; try a smaller learning_rate")
        as64 = params.to(torch.float64)
        if stopper.update(epoch, as64, *_unpack(as64, num_classes)):
            break
        objective = total / seen  # epoch average of minibatch objectives, a noisy estimate
        if _relative_change(previous, objective) < spec.tolerance:
            break
        previous = objective
    return params.to(torch.float64), epoch


# ----------------------------------------------------------------------------------------------


def train_probe(
    train: ChunkSource,
    val: ChunkSource | None,
    test: ChunkSource | None,
    *,
    num_classes: int,
    spec: ProbeSpec,
    device: str = "cpu",
) -> ProbeResult:
    """Train one probe on `train`, early-stopped on `val`, and evaluate it on every split.

    Raises `DataError` for an empty split, a train split with a single class, labels outside
    [0, num_classes), non-finite activations, or splits whose feature counts differ.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    if num_classes < 2:
        raise DataError(f"num_classes is {num_classes}; a probe needs at least two classes")

    train_split, held = _load_train(train, num_classes=num_classes, spec=spec, device=device)
    n_features = train_split.shift.numel()
    loaded: dict[str, _Split | None] = {"val": None, "test": None}
    for name, source in (("val", val), ("test", test)):
        if source is not None:
            loaded[name], used = _load(
                source,
                name,
                num_classes=num_classes,
                n_features=n_features,
                shift=train_split.shift,
                scale=train_split.scale,
                budget=spec.memory_bytes - held,
                block_rows=_block_rows(spec, num_classes),
                device=device,
            )
            held += used
    val_split, test_split = loaded["val"], loaded["test"]

    stopper = _EarlyStopping(val_split, spec.patience)
    solve = _lbfgs if spec.solver == "lbfgs" else _adam
    final, epochs = solve(train_split, stopper, num_classes=num_classes, n_features=n_features, spec=spec)
    if stopper.active and stopper.best_params is not None:
        params, best_epoch = stopper.best_params, stopper.best_epoch
    else:
        params, best_epoch = final, epochs

    w_std, b_std = _unpack(params, num_classes)
    train_eval, _, _ = _pass(train_split, w_std, b_std, with_grad=False)
    objective = train_eval.loss + 0.5 * spec.l2 * float(w_std.pow(2).sum())
    val_eval = _pass(val_split, w_std, b_std, with_grad=False)[0] if val_split is not None else None
    test_eval = _pass(test_split, w_std, b_std, with_grad=False)[0] if test_split is not None else None

    # Fold the standardisation back: W z + b with z = (h - mean) * scale is
    # (W * scale) h + (b - (W * scale) mean).
    scale = train_split.scale.to(torch.float64)
    w_raw = w_std * scale
    b_raw = b_std - w_raw @ train_split.shift.to(torch.float64)

    return ProbeResult(
        train_error=train_eval.error,
        val_error=val_eval.error if val_eval else None,
        test_error=test_eval.error if test_eval else None,
        train_loss=train_eval.loss,
        val_loss=val_eval.loss if val_eval else None,
        test_loss=test_eval.loss if test_eval else None,
        objective=objective,
        epochs=epochs,
        best_epoch=best_epoch,
        n_train=train_split.n,
        n_val=val_split.n if val_split else 0,
        n_test=test_split.n if test_split else 0,
        n_features=n_features,
        num_classes=num_classes,
        seconds=time.perf_counter() - started,
        device=device,
        weight=w_raw.to(torch.float32).cpu().numpy(),
        bias=b_raw.to(torch.float32).cpu().numpy(),
    )
