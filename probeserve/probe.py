"""Linear classifier probes: multinomial logistic regression on streams of activation chunks,
one probe at a time or several trained together on one device.

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

Several probes together (`train_probes`). A sweep has many probes per checkpoint: the layers
(different data, different feature counts) and, for choosing `l2` on validation, several
`l2` values on the same data. The probes of one call advance in lockstep, one function
evaluation each per round. The heads that share data (the `l2` values) are stacked into one
`[K*C, D]` weight, so a round reads their data once and does one matrix product per block for
all of them, which is what keeps a GPU busy. Each probe keeps its own L-BFGS state, line
search and early stopping, and drops out of the stack when it stops; its answer is the one it
would have had alone, up to float32 rounding. A data set that fails (bad labels, a shard that
cannot be read) fails its own probes; the others go on.

Memory. `spec.memory_bytes` is a hard ceiling for everything a call holds on its device, all
its probes together: the parameters and L-BFGS history (2 x 10 x C x (D + 1) float64 per
probe, which is 1.5 GB at 1,000 classes x 9,216 features), the stacked weights and gradient,
the `[rows, K*C]` temporaries of one block, the chunks in flight while streaming, and the
splits held in memory. What the fixed part leaves holds splits, in the order they are read:
train splits first (every function evaluation), then validation (every epoch), then test
(once). Each split is read once to check it (shapes, finite values, label range), count
classes and, for train, take the feature moments in float64; a split that fits is kept while
it is read, so a resident split is read from its source exactly once. A split that does not
fit is streamed: each pass reads it again, on a background thread that reads and converts the
next chunks while the current one is computed (into pinned host memory, copied on a side
stream, on CUDA). What a source itself holds (a memory-mapped shard) is outside the budget.

Features are held centred but not scaled: minus a provisional mean (the first chunk's), so
that float32 keeps its precision, while the z-scoring is folded into the weights of every
pass (W z + b = (W s) x + b - (W s) m). Held features take 4 bytes each, or 2 with
`compute_dtype: bfloat16`: features and weights are then rounded to bfloat16 for the two
matrix products, which accumulate in float32 (on CUDA a tensor-core product with a float32
output; elsewhere the same rounding, computed in float32), while losses, softmax and the
L-BFGS state stay in float32/float64. It halves the memory and is several times faster on a
GPU; it moves the optimum slightly (`jobs/benchmarks/bench_probe_scale.py` measures how far),
which is why float32 is the default.

Solvers:
  * `lbfgs` (default): our own L-BFGS (two-loop recursion, float64 parameters and history,
    Armijo backtracking with quadratic interpolation). For a convex objective the curvature
    condition s.y > 0 holds by itself, so the Wolfe line search of general-purpose codes buys
    little, and a step of 1 is accepted on almost every iteration: about one pass over the
    data per epoch. (torch.optim.LBFGS re-evaluates the objective at the start of every
    `step()` call, which would cost a second pass per epoch.) Losses and gradients are
    computed in float32 (the gradient's matrix product accumulates over the whole split in
    float32, as one product over all rows would), so the objective is reached to about 1e-6
    relative; a feature set of wildly different scales without `standardize` can stall L-BFGS
    short of that.
  * `adam`: minibatch Adam for splits too large for many full passes. Rows are shuffled with
    a generator seeded by `spec.seed`, within each held block (blocks in a shuffled order) or
    within each streamed chunk, so a stream sorted by label should be shuffled upstream. The
    probes of a call train one after another with `adam` (on data read once).

Early stopping: with `spec.patience` set and a validation split, training stops once
`patience` epochs pass without a lower validation loss, and the weights of the best epoch
are returned. With `patience=None` (or no validation split) the final weights are returned:
that is the regularised optimum, up to `tolerance` and `max_epochs`. Either way training also
stops when the relative change of the objective, |f_old - f_new| / max(|f_old|, |f_new|, 1),
falls below `spec.tolerance`.

On CPU the result is bit-for-bit reproducible for the same inputs, spec, thread count and
grouping.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from probeserve.errors import DataError, ProbeserveError
from probeserve.spec import ProbeSpec

ChunkSource = Callable[[], Iterable[tuple[Any, Any]]]
"""Calling it starts a fresh pass over a split: it yields `(x [n, D], y [n])` chunks, NumPy
arrays or torch tensors (on the CPU or already on the probe's device), with x of a real dtype
(float16 and float32 are the usual) and y integer class labels. Chunks of about
`spec.batch_size` rows are what the memory budget assumes."""

_HISTORY = 10  # L-BFGS curvature pairs kept; more helps little on these problems
_ARMIJO_C1 = 1e-4
_MAX_BACKTRACKS = 30
_PREFETCH = 2  # chunks read ahead of the one being computed when a split is streamed
# Data is processed in blocks whose temporaries ([rows, K*C] logits and softmax, per-row
# statistics) take about this many bytes: large blocks mean few, large matrix products
# (faster than many small ones). On a GPU the gradient product adds into the [K*C, D]
# gradient once per block, so blocks are larger there, for that traffic to stay small next
# to the product itself. Never more than a quarter of `memory_bytes`.
_BLOCK_BYTES = {"cpu": 64 << 20, "cuda": 2 << 30}
# float64 vectors of the parameters' size a probe keeps besides its L-BFGS history:
# parameters, gradient, direction, candidate, new gradient, best-on-validation, and the
# transient [C, D] pieces of a gradient's assembly.
_LBFGS_VECTORS = 2 * _HISTORY + 10
_ADAM_VECTORS = 10  # float32: parameters, two moments, gradient, and the float64 copies


def _fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class BudgetError(ProbeserveError):
    """`probe.memory_bytes` cannot hold what a probe (or a group of probes) needs besides data."""


def in_memory(x: np.ndarray, y: np.ndarray, *, batch_size: int = 8192) -> ChunkSource:
    """A `ChunkSource` over arrays already in memory, in slices of `batch_size` rows."""
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} rows but y has {len(y)} labels")

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]

    return chunks


@dataclass
class ProbeData:
    """One probe's data: its splits and class count. `n_features`, when known (a shard
    manifest has it), lets a group reserve every probe's fixed memory before reading data."""

    train: ChunkSource
    val: ChunkSource | None
    test: ChunkSource | None
    num_classes: int
    n_features: int | None = None


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
    seconds: float  # wall time of the whole call (shared by the probes trained together)
    device: str  # "cpu" or "cuda:0"
    weight: np.ndarray  # [num_classes, n_features] float32, applies to raw (unstandardised) features
    bias: np.ndarray  # [num_classes] float32
    l2: float = 0.0
    evaluations: int = 0  # passes over the train split with a gradient (L-BFGS function evaluations)
    load_seconds: float = 0.0  # reading and checking every split of the call once
    solve_seconds: float = 0.0  # the solver loop of the call (all its probes together)
    train_resident: bool = True  # the train split was held in memory (else streamed every pass)
    peak_bytes: int = 0  # the most the call held at once by its own accounting (<= memory_bytes)
    compute_dtype: str = "float32"


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
# Matrix products in the compute dtype


_FAST_MM: dict[str, bool] = {}


def _fast_bf16_mm(device: str) -> bool:
    """Whether `torch.mm(bf16, bf16, out_dtype=float32)` works here (CUDA builds have it)."""
    if device not in _FAST_MM:
        ok = False
        if device.startswith("cuda"):
            try:
                a = torch.randn(64, 32, device=device)
                b = torch.randn(32, 16, device=device)
                got = torch.mm(a.bfloat16(), b.bfloat16(), out_dtype=torch.float32)
                want = a.bfloat16().float() @ b.bfloat16().float()
                ok = got.dtype == torch.float32 and bool(torch.allclose(got, want, rtol=1e-3, atol=1e-3))
            except (RuntimeError, TypeError):
                ok = False
        _FAST_MM[device] = ok
    return _FAST_MM[device]


class _Products:
    """The two matrix products of a pass, `x V^T` and `R^T x`, in the compute dtype with
    float32 results. In bfloat16 without a native float32-output product (CPU), operands are
    rounded to bfloat16 and multiplied in float32: the same numbers as the GPU's."""

    def __init__(self, device: str, bf16: bool) -> None:
        self.bf16 = bf16
        self.native = bf16 and _fast_bf16_mm(device)

    def weights(self, v32: torch.Tensor) -> torch.Tensor:
        if not self.bf16:
            return v32
        vb = v32.to(torch.bfloat16)
        return vb if self.native else vb.float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """A block as the products take it (float32 on the emulated path)."""
        return x.float() if self.bf16 and not self.native else x

    def logits(self, c: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.native:
            out = torch.mm(x, v.T, out_dtype=torch.float32)
            return out.add_(c)
        return torch.addmm(c, x, v.T)

    def accumulate_gradient(self, grad: torch.Tensor, residual: torch.Tensor, x: torch.Tensor) -> None:
        if not self.bf16:
            grad.addmm_(residual.T, x)
        elif self.native:
            grad.add_(torch.mm(residual.to(torch.bfloat16).T, x, out_dtype=torch.float32))
        else:
            grad.addmm_(residual.to(torch.bfloat16).float().T, x)


# ----------------------------------------------------------------------------------------------
# Reading and checking splits


def _host_tensor(a: Any) -> torch.Tensor:
    """A chunk as a tensor without copying where possible (NumPy arrays are shared)."""
    if isinstance(a, torch.Tensor):
        return a
    with warnings.catch_warnings():
        # shards arrive as read-only views of a memory-mapped file; they are only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(a))


def _checked(
    x: Any, y: Any, split: str, num_classes: int, n_features: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk checked (shapes, real finite values, labels in range): float32 x, int64 y."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        xt, yt = torch.as_tensor(x), torch.as_tensor(y)
        if xt.ndim != 2 or yt.ndim != 1 or len(xt) != len(yt):
            raise DataError(
                f"{split} split: expected chunks x [n, D] and y [n], got x {tuple(xt.shape)} and y {tuple(yt.shape)}"
            )
        if n_features is not None and len(xt) and xt.shape[1] != n_features:
            raise DataError(f"{split} split: a chunk has {xt.shape[1]} features, expected {n_features}")
        if yt.dtype.is_floating_point or yt.dtype.is_complex or yt.dtype == torch.bool:
            raise DataError(f"{split} split: labels must be integers, got dtype {yt.dtype}")
        if xt.dtype.is_complex or xt.dtype == torch.bool:
            raise DataError(f"{split} split: activations must be real numbers, got dtype {xt.dtype}")
        xt = xt.float()
        if len(xt) == 0:
            return xt, yt.long()
        finite = torch.isfinite(xt)
        if not bool(finite.all()):
            bad = int((~finite).any(dim=1).sum())
            raise DataError(
                f"{split} split: the activations contain non-finite values (NaN or inf) "
                f"in {bad} of {len(xt)} rows of a chunk"
            )
        low, high = int(yt.min()), int(yt.max())
        if low < 0 or high >= num_classes:
            raise DataError(f"{split} split: label {low if low < 0 else high} is outside [0, {num_classes})")
        return xt, yt.long()

    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{split} split: expected chunks x [n, D] and y [n], got x {x.shape} and y {y.shape}")
    if n_features is not None and len(x) and x.shape[1] != n_features:
        raise DataError(f"{split} split: a chunk has {x.shape[1]} features, expected {n_features}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{split} split: labels must be integers, got dtype {y.dtype}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise DataError(f"{split} split: activations must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if len(x) == 0:
        return _host_tensor(x), _host_tensor(y.astype(np.int64))
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise DataError(
            f"{split} split: the activations contain non-finite values (NaN or inf) "
            f"in {bad} of {len(x)} rows of a chunk"
        )
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{split} split: label {low if low < 0 else high} is outside [0, {num_classes})")
    return _host_tensor(x), _host_tensor(y.astype(np.int64, copy=False))


_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Prefetch:
    """Runs an iterator on a background thread, up to `depth` items ahead of its consumer.

    Reading a chunk (a memory-mapped page fault, an S3 read, a float16 to float32 cast) and
    computing the previous one then overlap: NumPy and torch release the GIL for both. An
    error on the thread is raised in the consumer; a consumer that stops early stops the
    thread and closes the iterator, so the source releases what it holds."""

    def __init__(
        self,
        produce: Callable[[], Iterator[Any]],
        depth: int = _PREFETCH,
        stop: threading.Event | None = None,
    ) -> None:
        self._produce = produce
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = stop or threading.Event()  # set when the consumer stops; `produce` may watch it
        self._thread = threading.Thread(target=self._run, name="probeserve-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            it = self._produce()
            try:
                for item in it:
                    if not self._put(item):
                        return
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            self._put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(_Failed(e))

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


class _Ledger:
    """What a call holds on its device, against `spec.memory_bytes`.

    Fixed reservations (parameters, history, buffers, temporaries, streaming chunks) are made
    first and never given back during training; resident splits take what is left and are
    evicted, last admitted first, if a later fixed reservation needs their room."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.fixed = 0  # includes `shared`
        self.shared = 0  # the largest pass's buffers: passes run one at a time
        self.held: list[_Split] = []
        self.peak = 0

    def holding(self) -> int:
        return self.fixed + sum(s.held_bytes for s in self.held)

    def _note(self) -> None:
        self.peak = max(self.peak, self.holding())

    def reserve(self, nbytes: int, what: str) -> None:
        if self.fixed + nbytes > self.budget:
            others = f", besides {_fmt_bytes(self.fixed)} already reserved in this call" if self.fixed else ""
            raise BudgetError(
                f"probe.memory_bytes: {self.budget} ({_fmt_bytes(self.budget)}) cannot hold {what} "
                f"({_fmt_bytes(nbytes)}{others}); raise probe.memory_bytes"
                + (" or train fewer probes together (resources.probes_per_call)" if self.fixed else "")
            )
        self.fixed += nbytes
        while self.holding() > self.budget and self.held:
            self.held.pop().drop()
        self._note()

    def unreserve(self, nbytes: int) -> None:
        self.fixed -= nbytes

    def grow(self, split: _Split, nbytes: int) -> bool:
        """Let `split` hold `nbytes` more, if they fit."""
        if self.holding() + nbytes > self.budget:
            return False
        if split not in self.held:
            self.held.append(split)
        split.held_bytes += nbytes
        self._note()
        return True

    def release(self, split: _Split) -> None:
        if split in self.held:
            self.held.remove(split)
        split.drop()


class _Split:
    """A split of one data set: resident blocks on the device, or a source streamed per pass."""

    def __init__(self, name: str, source: ChunkSource, data: _Data) -> None:
        self.name, self.source, self.data = name, source, data
        self.n = 0
        self.slabs: list[tuple[torch.Tensor, torch.Tensor]] | None = []  # None: streamed
        self.held_bytes = 0

    @property
    def resident(self) -> bool:
        return self.slabs is not None

    def drop(self) -> None:
        self.slabs = None
        self.held_bytes = 0

    def blocks(self) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        """One pass in blocks of at most `block_rows` centred rows in the compute dtype."""
        if self.slabs is not None:
            yield from self.slabs
            return
        rows = 0
        d = self.data
        with closing(d.stream(self.source, centre=True)) as chunks:
            for x, y in chunks:
                rows += len(x)
                for start in range(0, len(x), d.block_rows):
                    yield x[start : start + d.block_rows], y[start : start + d.block_rows]
        if rows != self.n:
            raise DataError(f"{self.name} split: a later pass yielded {rows} rows, the first {self.n}")


class _Data:
    """One data set on the device: its splits, standardisation and pass buffers."""

    def __init__(
        self, probe_data: ProbeData, *, heads: int, spec: ProbeSpec, device: str, ledger: _Ledger
    ) -> None:
        self.spec, self.device, self.ledger = spec, device, ledger
        self.num_classes = probe_data.num_classes
        self.n_features: int | None = None
        self.heads = heads
        self.error: Exception | None = None
        self.bf16 = spec.compute_dtype == "bfloat16"
        self.compute_dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.products = _Products(device, self.bf16)
        self.cuda = device.startswith("cuda")
        self.copy_stream = torch.cuda.Stream(device=device) if self.cuda else None
        self.train = _Split("train", probe_data.train, self)
        self.val = _Split("val", probe_data.val, self) if probe_data.val is not None else None
        self.test = _Split("test", probe_data.test, self) if probe_data.test is not None else None
        self.reserved = 0
        self.block_rows = 1
        self.shift0: torch.Tensor | None = None  # provisional mean: what held features are centred by
        self.mean64: torch.Tensor | None = None  # the model's centre m (0 without standardize)
        self.scale64: torch.Tensor | None = None  # 1 / std (1 without standardize)
        self.delta64: torch.Tensor | None = None  # m - shift0
        self.counts: torch.Tensor | None = None  # train class counts

    # -- memory

    def needs(self, n_features: int, chunk_rows: int) -> tuple[int, int, int]:
        """(bytes this data set's probes hold for good, bytes of one pass's buffers, rows per
        block). Passes run one at a time, so a call holds the largest pass's buffers once."""
        c, d, k = self.num_classes, n_features, self.heads
        n_params = c * (d + 1)
        vectors = _LBFGS_VECTORS * 8 if self.spec.solver == "lbfgs" else _ADAM_VECTORS * 4
        fixed = k * n_params * vectors + 8 * d * 8  # solver state, then moments and centre
        # stacked float32 weights (and their bf16 rounding) and gradient accumulator
        buffers = k * c * d * (4 + 4 + (4 if self.bf16 else 0))
        # temporaries of one block: [rows, K*C] float32 logits and softmax (+ its bf16 rounding),
        # per-row statistics, and a float32 copy of a bf16 block where the products need one
        per_row = k * c * (8 + (4 if self.bf16 else 0)) + k * 8 * 8 + (d * 4 if self.bf16 else 0)
        cap = min(_BLOCK_BYTES["cuda" if self.cuda else "cpu"], self.ledger.budget // 4)
        rows = max(1, cap // per_row)
        # chunks in flight while reading: the queue, the one being read and the one being
        # computed, each as read (float32) and centred in the compute dtype
        chunk = chunk_rows * (d * (4 + (2 if self.bf16 else 4)) + 16)
        return fixed, buffers + rows * per_row + (_PREFETCH + 2) * chunk, rows

    def set_features(self, n_features: int, chunk_rows: int | None = None) -> None:
        """Reserve this data set's memory once its feature count is known (from a manifest
        before reading, or from the first chunk, whose size stands for the source's chunks)."""
        if self.n_features is not None:
            if n_features != self.n_features:
                raise DataError(
                    f"train split: chunks have {n_features} features, but the shard manifest says {self.n_features}"
                )
            return
        rows = min(self.spec.batch_size, chunk_rows or self.spec.batch_size)
        fixed, shared, self.block_rows = self.needs(n_features, rows)
        what = f"{self.heads} probe(s) of {self.num_classes} classes x {n_features} features"
        self.ledger.reserve(
            fixed + max(0, shared - self.ledger.shared),
            f"the parameters, L-BFGS history and working buffers of {what}",
        )
        self.ledger.shared = max(self.ledger.shared, shared)
        self.reserved, self.n_features = fixed, n_features

    def fail(self, error: Exception) -> None:
        # the error is kept (and returned) while the other probes train: its frames must not
        # keep this data set's tensors, or a suspended reader and its thread, alive
        traceback.clear_frames(error.__traceback__)
        self.error = error
        for split in (self.train, self.val, self.test):
            if split is not None:
                self.ledger.release(split)
        self.ledger.unreserve(self.reserved)
        self.reserved = 0

    # -- reading

    def _upload(
        self, x: torch.Tensor, y: torch.Tensor, centre: bool, buffer: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """On the prefetch thread: a host chunk to the device, centred and cast if asked (on a
        CPU, into `buffer` when one is given)."""
        event = None
        if self.cuda and x.device.type == "cpu":
            assert self.copy_stream is not None
            with torch.cuda.stream(self.copy_stream):
                xp = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                yp = torch.empty(y.shape, dtype=torch.int64, pin_memory=True)
                xp.copy_(x)
                yp.copy_(y)
                x = xp.to(self.device, non_blocking=True)
                y = yp.to(self.device, non_blocking=True)
                if centre:
                    assert self.shift0 is not None
                    x = (x.float() - self.shift0).to(self.compute_dtype)
                else:
                    x = x.float()
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            return x, y, event
        x, y = x.to(self.device), y.to(self.device, torch.int64)
        if centre:
            assert self.shift0 is not None
            if buffer is not None:
                x = torch.sub(x, self.shift0, out=buffer[: len(x)])
            else:
                x = torch.sub(x.float(), self.shift0).to(self.compute_dtype)
        else:
            x = x.float()
        return x, y, event

    def stream(
        self, source: ChunkSource, *, centre: bool, check: tuple[str, int | None] | None = None
    ) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        """One pass over `source` with the next chunks read on a background thread."""
        if self.copy_stream is not None:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

        # On a CPU, centred chunks go into a ring of buffers the consumer hands back: chunks
        # allocated on the reading thread and freed on this one would make glibc's heap grow
        # well past what is in flight (measured: peak RSS 0.25 GiB above the budget's share).
        ring: queue.Queue[torch.Tensor] | None = None
        if centre and not self.cuda and self.n_features is not None:
            ring = queue.Queue()
            for _ in range(_PREFETCH + 2):
                shape = (self.spec.batch_size, self.n_features)
                ring.put(torch.empty(shape, dtype=self.compute_dtype, device=self.device))

        done = threading.Event()  # the consumer stopped: a reader waiting for a buffer gives up

        def take_buffer() -> torch.Tensor | None:
            assert ring is not None
            while not done.is_set():
                try:
                    return ring.get(timeout=0.05)
                except queue.Empty:
                    continue
            return None

        def produce() -> Iterator[tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor | None]]:
            n_features = check[1] if check else None
            if self.cuda:
                torch.cuda.set_device(self.device)
            for x, y in source():
                if check is not None:
                    xt, yt = _checked(x, y, check[0], self.num_classes, n_features)
                    if len(xt) and n_features is None:
                        n_features = xt.shape[1]
                else:
                    xt = _host_tensor(x)
                    yt = _host_tensor(y)
                    if ring is None and not (xt.dtype == torch.float16 and self.cuda):
                        xt = xt.float()  # (float16 crosses PCIe as it is, and is cast there)
                if not len(xt):
                    continue
                buffer = None
                if ring is not None and len(xt) <= self.spec.batch_size:
                    buffer = take_buffer()
                    if buffer is None:
                        return
                yield (*self._upload(xt, yt, centre, buffer), buffer)

        prefetch = _Prefetch(produce, stop=done)
        lent: torch.Tensor | None = None
        try:
            for x, y, event, buffer in prefetch:
                if lent is not None and ring is not None:
                    ring.put(lent)  # the consumer is done with the previous chunk
                lent = buffer
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    x.record_stream(current)
                    y.record_stream(current)
                yield x, y
        finally:
            prefetch.close()

    def scan(self, split: _Split, *, keep: bool) -> None:
        """Read `split` once: check it, count rows (and classes and moments for train), and
        hold it on the device while it fits."""
        check = (split.name, self.n_features)
        with closing(self.stream(split.source, centre=False, check=check)) as chunks:
            self._keep(split, chunks, keep=keep)

    def _keep(
        self, split: _Split, chunks: Iterator[tuple[torch.Tensor, torch.Tensor]], *, keep: bool
    ) -> None:
        is_train = split is self.train
        n = 0
        s1: torch.Tensor | None = None
        s2: torch.Tensor | None = None
        counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
        slab_x: torch.Tensor | None = None
        slab_y: torch.Tensor | None = None
        filled = capacity = 0
        first_rows = 0
        slabs: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (x, y, filled)
        keeping = keep
        for x, y in chunks:
            if self.n_features is None or (is_train and n == 0):
                self.set_features(x.shape[1], len(x))
            if is_train and self.shift0 is None:
                self.shift0 = x.mean(0, dtype=torch.float64).float()
            assert self.shift0 is not None
            xc = x - self.shift0
            if is_train:
                if s1 is None or s2 is None:
                    s1 = torch.zeros(x.shape[1], dtype=torch.float64, device=self.device)
                    s2 = torch.zeros_like(s1)
                # per chunk in float32 (centred data, cascade summation), across chunks in
                # float64: a float64 copy of every chunk cost more than the rest of the scan
                s1 += xc.sum(0)
                s2 += (xc * xc).sum(0)
                counts += torch.bincount(y, minlength=self.num_classes)
            rows = len(x)
            n += rows
            first_rows = first_rows or rows
            pos = 0
            while keeping and pos < rows:
                if slab_x is None or filled == capacity:
                    if slab_x is not None:
                        slabs.append((slab_x, slab_y, filled))  # type: ignore[arg-type]
                    capacity = min(self.block_rows, first_rows << len(slabs))
                    item = 2 if self.bf16 else 4
                    if not self.ledger.grow(split, capacity * (x.shape[1] * item + 8)):
                        keeping = False
                        slab_x = slab_y = None
                        slabs = []
                        self.ledger.release(split)
                        break
                    slab_x = torch.empty((capacity, x.shape[1]), dtype=self.compute_dtype, device=self.device)
                    slab_y = torch.empty(capacity, dtype=torch.int64, device=self.device)
                    filled = 0
                take = min(rows - pos, capacity - filled)
                assert slab_x is not None and slab_y is not None
                slab_x[filled : filled + take] = xc[pos : pos + take]
                slab_y[filled : filled + take] = y[pos : pos + take]
                filled += take
                pos += take
            if not split.resident:  # evicted by a later reservation while being read
                keeping = False
                slab_x = slab_y = None
                slabs = []
        if n == 0:
            raise DataError(f"{split.name} split is empty")
        split.n = n
        if keeping and split.resident:
            if slab_x is not None:
                slabs.append((slab_x, slab_y, filled))  # type: ignore[arg-type]
            split.slabs = [(sx[:f], sy[:f]) for sx, sy, f in slabs]
        else:
            self.ledger.release(split)
        if not is_train:
            return
        assert s1 is not None and s2 is not None and self.shift0 is not None
        self.counts = counts
        present = torch.nonzero(counts).flatten().tolist()
        if len(present) < 2:
            raise DataError(
                f"train split has a single class (label {int(present[0])}); a probe needs at least two"
            )
        offset = s1 / n  # mean - shift0
        var = (s2 / n - offset * offset).clamp_(min=0)
        shift64 = self.shift0.double()
        if self.spec.standardize:
            mean = shift64 + offset
            std = var.sqrt()
            # A constant feature carries no information; dividing by its rounding-noise std
            # would only blow that noise up. Same rule of thumb as scikit-learn's StandardScaler.
            constant = (std == 0) | (std <= 10 * np.finfo(np.float64).eps * mean.abs())
            std[constant] = 1.0
            self.mean64, self.scale64 = mean, 1.0 / std
        else:
            self.mean64 = torch.zeros_like(shift64)
            self.scale64 = torch.ones_like(shift64)
        self.delta64 = self.mean64 - shift64


# ----------------------------------------------------------------------------------------------
# The objective, for several probes of one data set at once


@dataclass
class _Eval:
    loss: float  # mean cross-entropy
    errors: int
    n: int
    grad_w: torch.Tensor | None = None  # of the mean cross-entropy, float32 [C, D]
    grad_b: torch.Tensor | None = None  # float32 [C]

    @property
    def error(self) -> float:
        return self.errors / self.n


def _unpack(params: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_weights = params.numel() - num_classes
    return params[:n_weights].view(num_classes, -1), params[n_weights:]


def _pass(data: _Data, split: _Split, params: Sequence[torch.Tensor], *, with_grad: bool) -> list[_Eval]:
    """One pass over `split` for the probes with float64 `params` (W in the standardised space,
    then b), stacked as one [K*C, D] weight: losses, error counts and, optionally, gradients.

    Per block: one product for the logits of every probe, one fused softmax over that
    [rows, K*C] block, and one product for the gradient of every probe; sums stay on the
    device, so a GPU is not synchronised per block."""
    assert data.scale64 is not None and data.delta64 is not None and data.n_features is not None
    c, k, dev = data.num_classes, len(params), data.device
    kc = k * c
    # Fold the standardisation into the weights: W z + b = (W s) x_c + (b - (W s) delta),
    # with x_c the held (centred) features and delta = m - shift0.
    scale32, delta32 = data.scale64.float(), data.delta64.float()
    v32 = torch.empty((kc, data.n_features), dtype=torch.float32, device=dev)
    c32 = torch.empty(kc, dtype=torch.float32, device=dev)
    for i, p in enumerate(params):
        w, b = _unpack(p, c)
        v32[i * c : (i + 1) * c] = w
        c32[i * c : (i + 1) * c] = b
    v32.mul_(scale32)
    c32.sub_(v32 @ delta32)
    products = data.products
    v = products.weights(v32)
    loss_sum = torch.zeros(k, dtype=torch.float64, device=dev)
    errors = torch.zeros(k, dtype=torch.int64, device=dev)
    grad_v = torch.zeros((kc, data.n_features), dtype=torch.float32, device=dev) if with_grad else None
    grad_c = torch.zeros(kc, dtype=torch.float32, device=dev) if with_grad else None
    minus_one = torch.full((1, 1, 1), -1.0, device=dev)
    with closing(split.blocks()) as blocks:
        for x, y in blocks:
            rows = len(y)
            xin = products.features(x)
            grouped = products.logits(c32, xin, v).view(rows, k, c)
            truth = y.view(rows, 1, 1).expand(rows, k, 1)
            picked = grouped.gather(2, truth).squeeze(2)  # [rows, K] logit of the true class
            if grad_v is None or grad_c is None:
                top, predicted = grouped.max(dim=2)
                errors += (predicted != y[:, None]).sum(dim=0)
                loss_sum += (torch.logsumexp(grouped, dim=2) - picked).sum(dim=0, dtype=torch.float64)
                continue
            top, predicted = grouped.max(dim=2)
            errors += (predicted != y[:, None]).sum(dim=0)
            # One fused softmax instead of separate subtract, exp, sum and divide passes over the
            # [rows, K*C] block; its largest entry is 1 / sum(exp(logits - top)), so
            # logsumexp = top - log(p_top) without another pass (and p_top >= 1/C never underflows).
            probs = torch.softmax(grouped, dim=2)
            del grouped
            p_top = probs.gather(2, predicted.unsqueeze(2)).squeeze(2)
            loss_sum += (top - p_top.log() - picked).sum(dim=0, dtype=torch.float64)
            probs.scatter_add_(2, truth, minus_one.expand(rows, k, 1))  # minus one-hot: the residual
            residual = probs.view(rows, kc)
            products.accumulate_gradient(grad_v, residual, xin)
            grad_c += residual.sum(dim=0)
    n = split.n
    losses = (loss_sum / n).tolist()
    counts = errors.tolist()
    if grad_v is not None and grad_c is not None:
        # back to the standardised space, for every head at once and in place:
        # dL/dW = (R^T x_c - (R^T 1) delta^T) * s / n
        grad_v.addr_(grad_c, delta32, alpha=-1.0).mul_(scale32 / n)
        grad_c /= n
    out = []
    for i in range(k):
        ev = _Eval(losses[i], counts[i], n)
        if grad_v is not None and grad_c is not None:
            ev.grad_w, ev.grad_b = grad_v[i * c : (i + 1) * c], grad_c[i * c : (i + 1) * c]
        out.append(ev)
    return out


def _relative_change(old: float, new: float) -> float:
    return abs(old - new) / max(abs(old), abs(new), 1.0)


# ----------------------------------------------------------------------------------------------
# Solvers. Parameters live in one float64 vector: W ([C, D], row-major) then b ([C]).


@dataclass
class _Evaluate:
    params: torch.Tensor


@dataclass
class _EpochEnd:
    epoch: int
    params: torch.Tensor


_Solver = Generator[Any, Any, tuple[torch.Tensor, int]]


def _lbfgs(n_params: int, *, device: str, spec: ProbeSpec) -> _Solver:
    """L-BFGS as a coroutine, so that many run in lockstep: it yields `_Evaluate(params)` and
    is sent back (objective, gradient); it yields `_EpochEnd` after each accepted step and is
    sent back whether to stop. Returns the final parameters and the epochs run."""
    params = torch.zeros(n_params, dtype=torch.float64, device=device)
    f, grad = yield _Evaluate(params)
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
            q.add_(yk, alpha=-a)
            alphas.append(a)
        if steps:
            q *= float(steps[-1] @ diffs[-1]) / float(diffs[-1] @ diffs[-1])
        for s, yk, rho, a in zip(steps, diffs, rhos, reversed(alphas), strict=True):
            q.add_(s, alpha=a - rho * float(yk @ q))
        direction = q.neg_()
        slope = float(grad @ direction)
        if slope >= 0:  # numerically lost descent: restart from steepest descent
            steps, diffs, rhos = [], [], []
            direction, slope = -grad, -float(grad @ grad)
        # First iteration: a unit-length step, the scale is unknown until curvature is seen.
        t = 1.0 if steps else 1.0 / max(float(grad.norm()), 1e-12)

        for _ in range(_MAX_BACKTRACKS):
            candidate = torch.add(params, direction, alpha=t)
            f_new, grad_new = yield _Evaluate(candidate)
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
        if (yield _EpochEnd(epoch, params)):
            break
        if change < spec.tolerance:
            break
    return params, epoch


class _Head:
    """One probe: its data set, its l2, its solver state and its early stopping."""

    def __init__(self, data: _Data, index: int, l2: float, spec: ProbeSpec) -> None:
        self.data, self.index, self.l2, self.spec = data, index, l2, spec
        self.evaluations = 0
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_params: torch.Tensor | None = None
        self.final: tuple[torch.Tensor, int] | None = None
        self.error: Exception | None = None
        self.request: Any = None
        self.solver: _Solver | None = None

    @property
    def watched(self) -> bool:
        return self.data.val is not None and self.spec.patience is not None

    @property
    def running(self) -> bool:
        return self.final is None and self.error is None and self.data.error is None

    def start(self) -> None:
        assert self.data.n_features is not None
        self.solver = _lbfgs(
            self.data.num_classes * (self.data.n_features + 1), device=self.data.device, spec=self.spec
        )
        self.request = next(self.solver)

    def send(self, value: Any) -> None:
        assert self.solver is not None
        try:
            self.request = self.solver.send(value)
        except StopIteration as stop:
            self.final, self.request, self.solver = stop.value, None, None

    def evaluated(self, ev: _Eval) -> None:
        """Hand a train pass's result (with the L2 term added) to the solver."""
        self.evaluations += 1
        if not math.isfinite(ev.loss):
            self.error = DataError("the loss became non-finite; the activations may be too large for float32")
            return
        assert ev.grad_w is not None and ev.grad_b is not None
        params = self.request.params
        w, _ = _unpack(params, self.data.num_classes)
        f = ev.loss + 0.5 * self.l2 * float(torch.dot(w.reshape(-1), w.reshape(-1)))
        grad = torch.empty_like(params)
        grad_w, grad_b = _unpack(grad, self.data.num_classes)
        grad_w.copy_(ev.grad_w).add_(w, alpha=self.l2)
        grad_b.copy_(ev.grad_b)
        self.send((f, grad))

    def validated(self, epoch: int, params: torch.Tensor, val_loss: float | None) -> bool:
        """Record epoch `epoch`'s validation loss; return True when training should stop."""
        if val_loss is None or self.spec.patience is None:
            return False
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, epoch
            self.best_params = params  # the solvers never change a parameter vector in place
            return False
        return epoch - self.best_epoch >= self.spec.patience

    def kept(self) -> tuple[torch.Tensor, int, int]:
        """(parameters to keep, epochs run, epoch kept)."""
        assert self.final is not None
        final, epochs = self.final
        if self.watched and self.best_params is not None:
            return self.best_params, epochs, self.best_epoch
        return final, epochs, epochs


def _by_data(heads: Iterable[_Head]) -> list[tuple[_Data, list[_Head]]]:
    groups: dict[int, tuple[_Data, list[_Head]]] = {}
    for h in heads:
        groups.setdefault(id(h.data), (h.data, []))[1].append(h)
    return list(groups.values())


def _solve_lbfgs(heads: list[_Head]) -> None:
    """Run the heads' L-BFGS in lockstep: per round, one stacked train pass per data set for
    every head that wants a function evaluation, then one stacked validation pass per data set
    for the heads that finished an epoch."""
    for h in heads:
        h.start()
    while True:
        running = [h for h in heads if h.running]
        if not running:
            return
        for data, group in _by_data(running):
            try:
                evals = _pass(data, data.train, [h.request.params for h in group], with_grad=True)
            except Exception as e:
                data.fail(e)
                continue
            for h, ev in zip(group, evals):
                h.evaluated(ev)
        ended = [h for h in running if h.running and isinstance(h.request, _EpochEnd)]
        for data, group in _by_data(ended):
            watched = [h for h in group if h.watched]
            losses: dict[int, float] = {}
            if watched:
                assert data.val is not None
                try:
                    evals = _pass(data, data.val, [h.request.params for h in watched], with_grad=False)
                except Exception as e:
                    data.fail(e)
                    continue
                losses = {id(h): ev.loss for h, ev in zip(watched, evals)}
            for h in group:
                h.send(h.validated(h.request.epoch, h.request.params, losses.get(id(h))))


def _minibatch_grad(
    data: _Data, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Sum of cross-entropies and mean gradients (standardised space) of one float32 probe."""
    assert data.scale64 is not None and data.delta64 is not None
    scale, delta = data.scale64.float(), data.delta64.float()
    v = w * scale
    logits = torch.addmm(b - v @ delta, x.float(), v.T)
    lse = torch.logsumexp(logits, dim=1)
    loss = float((lse - logits.gather(1, y[:, None]).squeeze(1)).sum(dtype=torch.float64))
    residual = torch.exp(logits - lse[:, None])  # softmax minus one-hot, over the batch
    residual[torch.arange(len(y), device=y.device), y] -= 1.0
    residual /= len(y)
    gb = residual.sum(dim=0)
    gw = (residual.T @ x.float() - gb[:, None] * delta[None, :]) * scale
    return loss, gw, gb


def _adam(head: _Head) -> tuple[torch.Tensor, int]:
    """Minibatch Adam on the same objective; return the last parameters and the epochs run."""
    data, spec = head.data, head.spec
    assert data.n_features is not None
    num_classes = data.num_classes
    device = data.device
    params = torch.zeros(num_classes * (data.n_features + 1), dtype=torch.float32, device=device)
    first = torch.zeros_like(params)  # Adam's moment estimates
    second = torch.zeros_like(params)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    generator = torch.Generator().manual_seed(spec.seed)
    batch = spec.batch_size
    train = data.train

    def minibatches() -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        if train.slabs is not None and len(train.slabs) > 1:
            order = torch.randperm(len(train.slabs), generator=generator).tolist()
            blocks = iter([train.slabs[i] for i in order])
        else:
            blocks = train.blocks()
        with closing(blocks) if isinstance(blocks, Generator) else nullcontext(blocks) as it:
            for x, y in it:
                perm = torch.randperm(len(y), generator=generator).to(device)
                for start in range(0, len(y), batch):
                    idx = perm[start : start + batch]
                    yield x[idx], y[idx]

    previous = math.inf
    step = 0
    epoch = 0
    while epoch < spec.max_epochs:
        epoch += 1
        total, seen = 0.0, 0
        with closing(minibatches()) as batches:
            for x, y in batches:
                w, b = _unpack(params, num_classes)
                loss, gw, gb = _minibatch_grad(data, x, y, w, b)
                total += loss + 0.5 * head.l2 * float(w.pow(2).sum()) * len(y)
                seen += len(y)
                grad = torch.cat([(gw + head.l2 * w).reshape(-1), gb])
                step += 1
                first.mul_(beta1).add_(grad, alpha=1 - beta1)
                second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (second / (1 - beta2**step)).sqrt_().add_(eps)
                params.addcdiv_(first, denom, value=-spec.learning_rate / (1 - beta1**step))
        head.evaluations += 1
        if not math.isfinite(total):
            raise DataError("the loss became non-finite; try a smaller learning_rate")
        as64 = params.to(torch.float64)
        val_loss = None
        if head.watched:
            assert data.val is not None
            val_loss = _pass(data, data.val, [as64], with_grad=False)[0].loss
        if head.validated(epoch, as64, val_loss):
            break
        objective = total / seen  # epoch average of minibatch objectives, a noisy estimate
        if _relative_change(previous, objective) < spec.tolerance:
            break
        previous = objective
    return params.to(torch.float64), epoch


# ----------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def train_probes(
    data: Sequence[ProbeData],
    *,
    spec: ProbeSpec,
    device: str = "cpu",
    l2s: Sequence[float] | None = None,
) -> list[list[ProbeResult | Exception]]:
    """Train a probe for every data set and every l2 value (default: `spec.l2`) together, on
    one device, within `spec.memory_bytes`; return, per data set, one outcome per l2 value: a
    `ProbeResult`, or the exception that failed it (a `DataError` for bad data, a
    `BudgetError` when the budget cannot hold that data set's probes beside the others').

    The probes of one data set are stacked and read their data together; each probe's answer
    equals the one `train_probe` gives it alone, up to float32 rounding.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    l2_values = [spec.l2] if l2s is None else [float(v) for v in l2s]
    if not l2_values or any(not math.isfinite(v) or v < 0 for v in l2_values):
        raise ProbeserveError(f"probe.l2: expected one or more values >= 0, got {l2_values}")
    for given in data:
        if given.num_classes < 2:
            raise DataError(f"num_classes is {given.num_classes}; a probe needs at least two classes")
    ledger = _Ledger(spec.memory_bytes)
    datas = [_Data(given, heads=len(l2_values), spec=spec, device=device, ledger=ledger) for given in data]

    # Fixed memory first where the feature counts are known, then the splits by priority.
    for d, given in zip(datas, data):
        if given.n_features is not None:
            try:
                d.set_features(given.n_features)
            except Exception as e:
                d.fail(e)
    for split_name in ("train", "val", "test"):
        for d in datas:
            split = getattr(d, split_name)
            if d.error is not None or split is None:
                continue
            try:
                d.scan(split, keep=True)
            except Exception as e:
                d.fail(e)
    _sync(device)
    loaded = time.perf_counter()

    heads = [_Head(d, i, l2, spec) for d in datas if d.error is None for i, l2 in enumerate(l2_values)]
    if spec.solver == "lbfgs":
        _solve_lbfgs(heads)
    else:
        for h in heads:
            if not h.running:
                continue
            try:
                h.final = _adam(h)
            except Exception as e:
                h.error = e
    _sync(device)
    solved = time.perf_counter()

    outcomes: list[list[ProbeResult | Exception]] = []
    for d in datas:
        mine = [h for h in heads if h.data is d]
        done = [h for h in mine if h.error is None and h.final is not None]
        scored: dict[int, tuple[_Eval, _Eval | None, _Eval | None]] = {}
        if d.error is None and done:
            try:
                kept = [h.kept()[0] for h in done]
                ev_train = _pass(d, d.train, kept, with_grad=False)
                ev_val = _pass(d, d.val, kept, with_grad=False) if d.val is not None else [None] * len(done)
                ev_test = (
                    _pass(d, d.test, kept, with_grad=False) if d.test is not None else [None] * len(done)
                )
                for h, a, b, c in zip(done, ev_train, ev_val, ev_test):
                    scored[id(h)] = (a, b, c)
            except Exception as e:
                d.fail(e)
        results: list[ProbeResult | Exception] = []
        for i in range(len(l2_values)):
            head = next((h for h in mine if h.index == i), None)
            if d.error is not None:
                results.append(d.error)
            elif head is None or head.error is not None:
                results.append(head.error if head and head.error else ProbeserveError("probe did not run"))
            else:
                results.append(
                    _result(head, *scored[id(head)], started=started, loaded=loaded, solved=solved)
                )
        outcomes.append(results)
    seconds = time.perf_counter() - started
    for results in outcomes:
        for r in results:
            if isinstance(r, ProbeResult):
                r.seconds = seconds
                r.peak_bytes = ledger.peak
    return outcomes


def _result(
    head: _Head,
    train_eval: _Eval,
    val_eval: _Eval | None,
    test_eval: _Eval | None,
    *,
    started: float,
    loaded: float,
    solved: float,
) -> ProbeResult:
    d = head.data
    assert d.n_features is not None and d.scale64 is not None and d.mean64 is not None
    params, epochs, best_epoch = head.kept()
    w_std, b_std = _unpack(params, d.num_classes)
    objective = train_eval.loss + 0.5 * head.l2 * float(w_std.pow(2).sum())
    # Fold the standardisation back: W z + b with z = (h - mean) * scale is
    # (W * scale) h + (b - (W * scale) mean).
    w_raw = w_std * d.scale64
    b_raw = b_std - w_raw @ d.mean64
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
        n_train=d.train.n,
        n_val=d.val.n if d.val else 0,
        n_test=d.test.n if d.test else 0,
        n_features=d.n_features,
        num_classes=d.num_classes,
        seconds=0.0,
        device=d.device,
        weight=w_raw.to(torch.float32).cpu().numpy(),
        bias=b_raw.to(torch.float32).cpu().numpy(),
        l2=head.l2,
        evaluations=head.evaluations,
        load_seconds=loaded - started,
        solve_seconds=solved - loaded,
        train_resident=d.train.resident,
        compute_dtype=d.spec.compute_dtype,
    )


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
    [0, num_classes), non-finite activations, or splits whose feature counts differ; raises
    `BudgetError` when `spec.memory_bytes` cannot hold the probe's parameters and buffers.
    """
    ((outcome,),) = train_probes([ProbeData(train, val, test, num_classes)], spec=spec, device=device)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
