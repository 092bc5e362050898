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

import hashlib
import itertools
import math
import queue
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass
from typing import Any, cast

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
# The test pass of an answer's probes counts every [true, predicted] pair on the device while
# that matrix takes at most this (2,896 classes); above it, only per-class counts.
_CONFUSION_MAX_BYTES = 64 << 20


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
    manifest has it), lets a group reserve every probe's fixed memory before reading data.

    `key` names the examples (the same examples in the same order, whatever the layer or
    checkpoint: a sweep gives its data spec's identity). With `ProbeSpec.control` and
    `ProbeSpec.mdl` it seeds the control labels and the MDL transmission order, so these are
    the same wherever the data set is probed. `control` gives the control labels instead, per
    split in row order (control labels per value of a column, made by the caller)."""

    train: ChunkSource
    val: ChunkSource | None
    test: ChunkSource | None
    num_classes: int
    n_features: int | None = None
    key: str = ""
    control: Mapping[str, np.ndarray] | None = None
    max_rows: int | None = None  # rows of the largest split, when known: no chunk is larger


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
    # Test errors by class, for the probe an answer keeps (`Answer.chosen`, `Answer.control`):
    # examples of each true class and how many of them were misclassified, and the whole
    # [true, predicted] count matrix while it is at most `_CONFUSION_MAX_BYTES` on the device.
    test_class_counts: np.ndarray | None = None
    test_class_wrong: np.ndarray | None = None
    test_confusion: np.ndarray | None = None
    errors_train: int = 0  # misclassified counts behind the error fractions (for intervals)
    errors_val: int = 0
    errors_test: int = 0


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
        self,
        probe_data: ProbeData,
        *,
        heads: int,
        spec: ProbeSpec,
        device: str,
        ledger: _Ledger,
        sorted_rows: bool = False,
    ) -> None:
        self.spec, self.device, self.ledger = spec, device, ledger
        self.given = probe_data
        self.num_classes = probe_data.num_classes
        self.n_features: int | None = None
        self.heads = heads  # the most heads trained at once (the memory reserved is for these)
        self.sorted_rows = sorted_rows  # heads with windows (MDL): blocks are sorted by rank
        self.control_y: dict[str, torch.Tensor] = {}  # control labels per split, by row
        self.ranks: torch.Tensor | None = None  # MDL: each train row's place in the transmission order
        self.sorted_cache: dict[tuple[int, int], tuple[torch.Tensor, list[int]]] = {}
        self.windows: tuple[tuple[int, int], ...] = ()  # the windows sorted_cache's bounds are for
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
        if self.sorted_rows:  # a block's rows gathered in rank order, with their labels and order
            per_row += d * (2 if self.bf16 else 4) + 4 * 8
        cap = min(_BLOCK_BYTES["cuda" if self.cuda else "cpu"], self.ledger.budget // 4)
        rows = max(1, cap // per_row)
        # chunks in flight while reading: the queue, the one being read and the one being
        # computed, each as read (float32) and centred in the compute dtype
        chunk = chunk_rows * (d * (4 + (2 if self.bf16 else 4)) + 16)
        # the test pass of the answer's probes counts [true, predicted] pairs, or per class
        confusion = c * c * 8 if c * c * 8 <= _CONFUSION_MAX_BYTES else 2 * c * 8
        return fixed + confusion, buffers + rows * per_row + (_PREFETCH + 2) * chunk, rows

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

    def prepare(self, *, control: bool, mdl: bool, control_seed: int) -> None:
        """After the scan: the control labels (given, or drawn from `key`) and the MDL ranks,
        on the device and within the budget. They are fixed by the data set alone."""
        splits = [s for s in (self.train, self.val, self.test) if s is not None]
        need = 0
        if control:
            need += 8 * sum(s.n for s in splits)
        if mdl:
            need += 2 * 8 * self.train.n  # the ranks, and each block's order by rank (cached)
        if not need:
            return
        self.ledger.reserve(need, "control labels and MDL order of this data set")
        self.reserved += need
        assert self.counts is not None
        if control:
            given = self.given.control
            if given is None:
                sizes = {s.name: s.n for s in splits}
                given = control_labels(self.given.key, control_seed, sizes, self.counts.tolist())
            for s in splits:
                labels = np.asarray(given.get(s.name) if s.name in given else [], dtype=np.int64)
                if labels.shape != (s.n,):
                    raise DataError(f"{s.name} split: {labels.size} control labels for {s.n} rows")
                if s.n and (labels.min() < 0 or labels.max() >= self.num_classes):
                    raise DataError(f"{s.name} split: control labels outside [0, {self.num_classes})")
                self.control_y[s.name] = torch.from_numpy(labels).to(self.device)
        if mdl:
            self.ranks = torch.from_numpy(mdl_ranks(self.given.key, self.train.n)).to(self.device)

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
    errors: int  # 0 on passes with gradients, which do not count them
    n: int
    grad_w: torch.Tensor | None = None  # of the mean cross-entropy, float32 [C, D]
    grad_b: torch.Tensor | None = None  # float32 [C]
    confusion: torch.Tensor | None = None  # [C, C] counts of [true, predicted] (asked for one head)
    class_counts: torch.Tensor | None = None  # [C] examples of each true class (with `confusion`)
    class_wrong: torch.Tensor | None = None  # [C] of them misclassified

    @property
    def error(self) -> float:
        return self.errors / self.n if self.n else math.nan


@dataclass(frozen=True)
class _View:
    """What one head of a pass sees: the task's labels or the control labels and, on the
    train split only, which rows: those whose MDL rank r has lo <= r < hi (`window`)."""

    control: bool = False
    window: tuple[int, int] | None = None


_TASK = _View()


def _unpack(params: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_weights = params.numel() - num_classes
    return params[:n_weights].view(num_classes, -1), params[n_weights:]


class _Sums:
    """A pass's running sums on the device (no synchronisation per block)."""

    def __init__(self, data: _Data, k: int, *, with_grad: bool, counting: int | None) -> None:
        c, d, dev = data.num_classes, data.n_features, data.device
        assert d is not None
        self.loss = torch.zeros(k, dtype=torch.float64, device=dev)
        self.errors = torch.zeros(k, dtype=torch.int64, device=dev)
        self.grad_v = torch.zeros((k * c, d), dtype=torch.float32, device=dev) if with_grad else None
        self.grad_c = torch.zeros(k * c, dtype=torch.float32, device=dev) if with_grad else None
        self.counting = counting  # the head whose test errors are counted by class
        self.full = c * c * 8 <= _CONFUSION_MAX_BYTES
        self.confusion = None
        self.class_counts = self.class_wrong = None
        if counting is not None:
            if self.full:
                self.confusion = torch.zeros(c * c, dtype=torch.int64, device=dev)
            else:
                self.class_counts = torch.zeros(c, dtype=torch.int64, device=dev)
                self.class_wrong = torch.zeros(c, dtype=torch.int64, device=dev)


def _heads_block(
    data: _Data,
    sums: _Sums,
    first: int,
    x: torch.Tensor,
    v: torch.Tensor,
    c32: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> None:
    """Heads `first`.. of a stacked weight `v` ([m*C, D], offsets `c32`) on the rows `x`,
    whose true classes are `labels` ([rows], or [rows, m] when the heads' labels differ):
    their losses and errors, and gradients when the sums keep them. With `mask` ([rows, m],
    1 or 0), a head counts only its rows.

    One product for the logits of every head, one softmax over that [rows, m*C] block, and
    one product for the gradient of every head. Passes with gradients (training) count no
    errors (`_train_block`)."""
    products = data.products
    c = data.num_classes
    rows = len(x)
    m = len(c32) // c
    grouped = products.logits(c32, x, v).view(rows, m, c)
    truth = labels.view(rows, 1, 1).expand(rows, m, 1) if labels.ndim == 1 else labels.unsqueeze(2)
    against = labels[:, None] if labels.ndim == 1 else labels
    picked = grouped.gather(2, truth).squeeze(2)  # [rows, m] logit of the true class
    if sums.grad_v is not None and sums.grad_c is not None:
        _train_block(products, sums, first, x, grouped, picked, truth, mask)
        return
    predicted = grouped.max(dim=2).indices
    wrong = predicted != against
    if mask is not None:
        wrong &= mask.bool()
    sums.errors[first : first + m] += wrong.sum(dim=0)
    h = sums.counting
    if h is not None and first <= h < first + m:
        true_h = against[:, 0] if against.shape[1] == 1 else against[:, h - first]
        if sums.confusion is not None:
            sums.confusion += torch.bincount(true_h * c + predicted[:, h - first], minlength=c * c)
        else:
            assert sums.class_counts is not None and sums.class_wrong is not None
            sums.class_counts += torch.bincount(true_h, minlength=c)
            sums.class_wrong += torch.bincount(true_h[wrong[:, h - first]], minlength=c)
    terms = torch.logsumexp(grouped, dim=2) - picked
    sums.loss[first : first + m] += (terms if mask is None else terms * mask).sum(dim=0, dtype=torch.float64)


def _train_block(
    products: _Products,
    sums: _Sums,
    first: int,
    x: torch.Tensor,
    grouped: torch.Tensor,
    picked: torch.Tensor,
    truth: torch.Tensor,
    mask: torch.Tensor | None,
) -> None:
    """A training pass's share of `_heads_block`: losses and gradients from the [rows, m, C]
    logits `grouped`, which it overwrites. Error counts are left out: the solver never reads
    a training pass's errors (scoring passes count them).

    The softmax is written out (subtract the row maximum, exp, sum, divide), each step one
    pass over the contiguous block, because torch's softmax and max-with-index along a last
    dimension of a few classes go row by row: on one CPU thread, a block of 30,424 rows of 8
    heads x 10 classes took 31.8 ms in `torch.softmax` and 5.5 ms in `max`, against 5.9 ms
    written out (`OMP_NUM_THREADS=1 jobs/benchmarks/bench_science.py --only grid`, which
    measured the grid at 4.27x one probe's CPU time before and 3.71x after). logsumexp =
    top + log(sum) comes out of the same sums."""
    rows, m, c = grouped.shape
    grad_v, grad_c = sums.grad_v, sums.grad_c
    assert grad_v is not None and grad_c is not None
    top = grouped.amax(dim=2, keepdim=True)
    probs = grouped.sub_(top).exp_()
    total = probs.sum(dim=2, keepdim=True)
    terms = (top + total.log()).squeeze(2) - picked
    sums.loss[first : first + m] += (terms if mask is None else terms * mask).sum(dim=0, dtype=torch.float64)
    probs.div_(total)
    minus_one = torch.full((1, 1, 1), -1.0, device=x.device)
    probs.scatter_add_(2, truth, minus_one.expand(rows, m, 1))  # minus one-hot: the residual
    if mask is not None:
        probs.mul_(mask.unsqueeze(2))
    residual = probs.view(rows, m * c)
    products.accumulate_gradient(grad_v[first * c : (first + m) * c], residual, x)
    grad_c[first * c : (first + m) * c] += residual.sum(dim=0)


def _sorted_block(
    data: _Data, offset: int, rows: int, windows: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, list[int]]:
    """The train rows `offset`..`offset + rows` in MDL rank order, and for each window the
    range of that order it covers (lo, hi pairs, flat). Cached: blocks repeat every pass."""
    key = (offset, rows)
    if data.windows != tuple(windows):
        data.sorted_cache.clear()
        data.windows = tuple(windows)
    if key not in data.sorted_cache:
        assert data.ranks is not None
        ranks = data.ranks[offset : offset + rows]
        order = torch.argsort(ranks)
        edges = torch.tensor([e for w in windows for e in w], dtype=ranks.dtype, device=ranks.device)
        bounds = torch.searchsorted(ranks[order], edges).tolist()
        data.sorted_cache[key] = (order, bounds)
    return data.sorted_cache[key]


def _pass(
    data: _Data,
    split: _Split,
    params: Sequence[torch.Tensor],
    *,
    with_grad: bool,
    views: Sequence[_View] | None = None,
    counting: int | None = None,
) -> list[_Eval]:
    """One pass over `split` for the probes with float64 `params` (W in the standardised space,
    then b), stacked as one [K*C, D] weight: losses, error counts and, optionally, gradients;
    for head `counting`, its errors by true class.

    `views` say what each head sees (default: every row with the task's labels). Heads with
    a window (MDL prefixes, train split only) come after the others: each block's rows are
    put in rank order once, and every stretch of that order is one product for exactly the
    heads whose windows cover it, so a head computes on its own rows only, and rows that
    several heads share are read once for all of them. Sums stay on the device, so a GPU is
    not synchronised per block."""
    assert data.scale64 is not None and data.delta64 is not None and data.n_features is not None
    c, k, dev = data.num_classes, len(params), data.device
    kc = k * c
    views = list(views) if views is not None else [_TASK] * k
    assert len(views) == k
    is_train = split is data.train
    windows = [v.window for v in views if v.window is not None] if is_train else []
    plain = k - len(windows)  # heads on every row
    # heads with windows come last, and learn the task's labels
    assert not windows or all(v.window is None for v in views[:plain])
    assert not windows or not any(v.control for v in views[plain:])
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
    sums = _Sums(data, k, with_grad=with_grad, counting=counting)
    mixed = any(view.control for view in views[:plain])
    control_y = data.control_y.get(split.name) if mixed else None
    offset = 0
    with closing(split.blocks()) as blocks:
        for x, y in blocks:
            rows = len(y)
            xin = products.features(x)
            if plain:
                labels = y
                if control_y is not None:
                    yc = control_y[offset : offset + rows]
                    labels = torch.stack([yc if view.control else y for view in views[:plain]], dim=1)
                _heads_block(data, sums, 0, xin, v[: plain * c], c32[: plain * c], labels)
            if windows:
                order, bounds = _sorted_block(data, offset, rows, windows)
                xs, ys = xin.index_select(0, order), y.index_select(0, order)
                for lo, hi, first, last, merged in _stretches(bounds, plain):
                    mask = None
                    if merged:  # each head counts its own rows only
                        where = torch.arange(lo, hi, device=dev)[:, None]
                        own = bounds[2 * (first - plain) : 2 * (last - plain)]
                        ends = torch.tensor(own, device=dev).view(-1, 2)
                        mask = ((where >= ends[:, 0]) & (where < ends[:, 1])).float()
                    _heads_block(
                        data,
                        sums,
                        first,
                        xs[lo:hi],
                        v[first * c : last * c],
                        c32[first * c : last * c],
                        ys[lo:hi],
                        mask,
                    )
            offset += rows
    n = split.n
    sizes = [n] * plain + [max(0, min(hi, n) - lo) for lo, hi in windows]
    losses = [float(total) / size if size else 0.0 for total, size in zip(sums.loss.tolist(), sizes)]
    counts = sums.errors.tolist()
    grad_v, grad_c = sums.grad_v, sums.grad_c
    if grad_v is not None and grad_c is not None:
        # back to the standardised space, for every head at once and in place:
        # dL/dW = (R^T x_c - (R^T 1) delta^T) * s / n
        grad_v.addr_(grad_c, delta32, alpha=-1.0)
        if not windows:
            grad_v.mul_(scale32 / n)
            grad_c /= n
        else:
            per_head = torch.tensor([max(size, 1) for size in sizes], dtype=torch.float32, device=dev)
            grad_v.view(k, c, -1).mul_(scale32).div_(per_head.view(k, 1, 1))
            grad_c.view(k, c).div_(per_head.view(k, 1))
    out = []
    for i in range(k):
        ev = _Eval(losses[i], counts[i], sizes[i])
        if grad_v is not None and grad_c is not None:
            ev.grad_w, ev.grad_b = grad_v[i * c : (i + 1) * c], grad_c[i * c : (i + 1) * c]
        if i == counting:
            if sums.confusion is not None:
                ev.confusion = sums.confusion.view(c, c)
                ev.class_counts = ev.confusion.sum(dim=1)
                ev.class_wrong = ev.class_counts - ev.confusion.diagonal()
            else:
                ev.class_counts, ev.class_wrong = sums.class_counts, sums.class_wrong
        out.append(ev)
    return out


# Stretches of a block's rank order shorter than this are merged with the next (their heads
# masked to their own rows): every stretch costs a dozen small operations, whose overhead,
# not their arithmetic, is what tiny stretches (the first MDL blocks) cost.
_MERGE_ROWS = 1024


def _stretches(bounds: Sequence[int], plain: int) -> list[tuple[int, int, int, int, bool]]:
    """How a block sorted by rank is computed for heads with windows: (lo, hi, first head,
    last head + 1, merged) per product. `bounds` are each window's (lo, hi) range of the
    sorted rows.

    Between consecutive bounds, a stretch of rows is used by exactly the heads whose ranges
    cover it. The windows are nested prefixes (largest first) or disjoint blocks (latest
    first), so those heads are consecutive and their weights a slice of the stack; where they
    are not, each run of consecutive heads is its own product. Stretches shorter than
    `_MERGE_ROWS` are merged with the ones after them, for every head that covers any of them."""
    pairs = list(zip(bounds[0::2], bounds[1::2], strict=True))
    edges = sorted(set(bounds))
    out: list[tuple[int, int, int, int, bool]] = []
    pending: tuple[int, int, int, int, bool] | None = None
    for lo, hi in itertools.pairwise(edges):
        covering = [plain + j for j, (a, b) in enumerate(pairs) if a <= lo and hi <= b]
        runs: list[list[int]] = []
        for i in covering:
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        if len(runs) != 1:  # no head here, or heads apart: exact products, nothing merged
            if pending is not None:
                out.append(pending)
                pending = None
            out += [(lo, hi, first, last, False) for first, last in runs]
            continue
        first, last = runs[0]
        merged = pending is not None
        if pending is not None:
            first, last = min(first, pending[2]), max(last, pending[3])
            lo = pending[0]
        pending = (lo, hi, first, last, merged)
        if hi - lo >= _MERGE_ROWS:
            out.append(pending)
            pending = None
    if pending is not None:
        out.append(pending)
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
    """One probe: its data set, its l2, what it sees, its solver state and its early stopping."""

    def __init__(self, data: _Data, index: int, l2: float, spec: ProbeSpec, view: _View = _TASK) -> None:
        self.data, self.index, self.l2, self.spec, self.view = data, index, l2, spec, view
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

    def validated(self, epoch: int, params: torch.Tensor, val: _Eval | None) -> bool:
        """Record epoch `epoch`'s validation pass (its loss decides); return True when
        training should stop."""
        if val is None or self.spec.patience is None:
            return False
        if val.loss < self.best_loss:
            self.best_loss, self.best_epoch = val.loss, epoch
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
                evals = _pass(
                    data,
                    data.train,
                    [h.request.params for h in group],
                    with_grad=True,
                    views=[h.view for h in group],
                )
            except Exception as e:
                data.fail(e)
                continue
            for h, ev in zip(group, evals):
                h.evaluated(ev)
        ended = [h for h in running if h.running and isinstance(h.request, _EpochEnd)]
        for data, group in _by_data(ended):
            watched = [h for h in group if h.watched]
            vals: dict[int, _Eval] = {}
            if watched:
                assert data.val is not None
                try:
                    evals = _pass(
                        data,
                        data.val,
                        [h.request.params for h in watched],
                        with_grad=False,
                        views=[h.view for h in watched],
                    )
                except Exception as e:
                    data.fail(e)
                    continue
                vals = {id(h): ev for h, ev in zip(watched, evals)}
            for h in group:
                h.send(h.validated(h.request.epoch, h.request.params, vals.get(id(h))))


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


def _with_offsets(
    blocks: Generator[tuple[torch.Tensor, torch.Tensor], None, None],
) -> Generator[tuple[int, torch.Tensor, torch.Tensor], None, None]:
    """Blocks with the row number of their first row."""
    offset = 0
    with closing(blocks):
        for x, y in blocks:
            yield offset, x, y
            offset += len(y)


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

    view = head.view
    control_y = data.control_y.get("train") if view.control else None

    def as_seen(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A minibatch as this head sees it: its labels, and only the rows of its window."""
        if control_y is not None:
            y = control_y[rows]
        if view.window is not None:
            assert data.ranks is not None
            ranks = data.ranks[rows]
            keep = (ranks >= view.window[0]) & (ranks < view.window[1])
            x, y = x[keep], y[keep]
        return x, y

    def minibatches() -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        if train.slabs is not None and len(train.slabs) > 1:
            starts = np.cumsum([0] + [len(sy) for _, sy in train.slabs]).tolist()
            order = torch.randperm(len(train.slabs), generator=generator).tolist()
            blocks = iter([(starts[i], *train.slabs[i]) for i in order])
        else:
            blocks = _with_offsets(train.blocks())
        with closing(blocks) if isinstance(blocks, Generator) else nullcontext(blocks) as it:
            for offset, x, y in it:
                perm = torch.randperm(len(y), generator=generator).to(device)
                for start in range(0, len(y), batch):
                    idx = perm[start : start + batch]
                    bx, by = as_seen(x[idx], y[idx], idx + offset)
                    if len(by):
                        yield bx, by

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
        val = None
        if head.watched:
            assert data.val is not None
            val = _pass(data, data.val, [as64], with_grad=False, views=[view])[0]
        if head.validated(epoch, as64, val):
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


def _checked_l2s(values: Sequence[float]) -> list[float]:
    l2_values = [float(v) for v in values]
    if not l2_values or any(not math.isfinite(v) or v < 0 for v in l2_values):
        raise ProbeserveError(f"probe.l2: expected one or more values >= 0, got {l2_values}")
    return l2_values


def _load(
    data: Sequence[ProbeData], *, spec: ProbeSpec, device: str, heads: int, sorted_rows: bool = False
) -> tuple[_Ledger, list[_Data]]:
    """The call's data sets on the device: fixed memory first where the feature counts are
    known, then every split read once (train splits first, then val, then test), kept while
    it fits. A data set that fails here carries its error."""
    for given in data:
        if given.num_classes < 2:
            raise DataError(f"num_classes is {given.num_classes}; a probe needs at least two classes")
    ledger = _Ledger(spec.memory_bytes)
    datas = [
        _Data(given, heads=heads, spec=spec, device=device, ledger=ledger, sorted_rows=sorted_rows)
        for given in data
    ]
    for d, given in zip(datas, data):
        if given.n_features is not None:
            try:  # chunks of a small data set are its splits: reserve for those, not batch_size
                d.set_features(given.n_features, given.max_rows)
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
    return ledger, datas


def _solve(heads: list[_Head], spec: ProbeSpec) -> None:
    if spec.solver == "lbfgs":
        _solve_lbfgs(heads)
        return
    for h in heads:
        if not h.running:
            continue
        try:
            h.final = _adam(h)
        except Exception as e:
            h.error = e


def train_probes(
    data: Sequence[ProbeData],
    *,
    spec: ProbeSpec,
    device: str = "cpu",
    l2s: Sequence[float] | None = None,
) -> list[list[ProbeResult | Exception]]:
    """Train a probe for every data set and every l2 value (default: `spec.l2`, one value or
    a grid) together, on one device, within `spec.memory_bytes`; return, per data set, one
    outcome per l2 value: a `ProbeResult`, or the exception that failed it (a `DataError` for
    bad data, a `BudgetError` when the budget cannot hold that data set's probes beside the
    others'). Nothing is chosen here (`answer_probes` chooses), and `spec.control` and
    `spec.mdl` are not trained.

    The probes of one data set are stacked and read their data together; each probe's answer
    equals the one it gets trained alone, up to float32 rounding.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    l2_values = _checked_l2s(spec.l2_grid() if l2s is None else l2s)
    ledger, datas = _load(data, spec=spec, device=device, heads=len(l2_values))
    _sync(device)
    loaded = time.perf_counter()

    heads = [_Head(d, i, l2, spec) for d in datas if d.error is None for i, l2 in enumerate(l2_values)]
    _solve(heads, spec)
    _sync(device)
    solved = time.perf_counter()

    outcomes: list[list[ProbeResult | Exception]] = []
    for d in datas:
        mine = [h for h in heads if h.data is d]
        scored = _score(d, mine, started=started, loaded=loaded, solved=solved)
        outcomes.append([d.error if d.error is not None else scored[i] for i in range(len(l2_values))])
    _finish(outcomes, started, ledger)
    return outcomes


def _finish(outcomes: Iterable[Iterable[Any]], started: float, ledger: _Ledger) -> None:
    """Every result of a call gets the call's wall time and peak memory."""
    seconds = time.perf_counter() - started
    for results in outcomes:
        for r in results:
            if isinstance(r, ProbeResult):
                r.seconds = seconds
                r.peak_bytes = ledger.peak


def _score(
    d: _Data,
    heads: list[_Head],
    *,
    started: float,
    loaded: float,
    solved: float,
    choose: bool = False,
) -> dict[int, ProbeResult | Exception]:
    """Score `heads` (all of one data set, on the same view) on every split, stacked: {head
    index: result or error}. With `choose`, the validation pass comes first, the head chosen
    on it (`choose_l2`) gets its test errors counted by class, and its index is under -1."""
    out: dict[int, ProbeResult | Exception] = {}
    if d.error is not None:
        return out
    done = [h for h in heads if h.error is None and h.final is not None]
    for h in heads:
        if h not in done:
            out[h.index] = h.error if h.error is not None else ProbeserveError("probe did not run")
    if not done:
        return out
    views = [h.view for h in done]
    try:
        kept = [h.kept()[0] for h in done]
        ev_val = (
            _pass(d, d.val, kept, with_grad=False, views=views) if d.val is not None else [None] * len(done)
        )
        counting = None
        if choose:
            counting = choose_l2([h.l2 for h in done], ev_val)
            out[-1] = done[counting].index  # type: ignore[assignment]
        ev_test = (
            _pass(d, d.test, kept, with_grad=False, views=views, counting=counting)
            if d.test is not None
            else [None] * len(done)
        )
        ev_train = _pass(d, d.train, kept, with_grad=False, views=views)
    except Exception as e:
        d.fail(e)
        return out
    for h, a, b, c in zip(done, ev_train, ev_val, ev_test):
        out[h.index] = _result(h, a, b, c, started=started, loaded=loaded, solved=solved)
    return out


def choose_l2(l2s: Sequence[float], val: Sequence[Any]) -> int:
    """Index of the l2 value chosen on validation: the lowest validation error; among equal
    errors the lower validation loss, then the larger l2 (the simpler probe).

    Error, not loss, because error is what a row reports and compares across layers (as
    DINOv2's and SentEval's linear evaluations choose on accuracy); the loss only breaks the
    ties that a small validation split makes common. `val` holds, per value, something with
    `errors` and `loss` (an evaluation or a `ProbeResult`'s fields), or None for no split."""
    if len(l2s) == 1:
        return 0
    if any(v is None for v in val):
        raise ProbeserveError(
            f"probe.l2: choosing among {len(l2s)} values needs a validation split; give one, or a single l2"
        )

    def rank(i: int) -> tuple[float, float, float]:
        v = val[i]
        return (v.errors, v.loss if math.isfinite(v.loss) else math.inf, -l2s[i])

    return min(range(len(l2s)), key=rank)


@dataclass
class MdlResult:
    """The online code length of a data set's train labels (Voita & Titov, 2020).

    The first block is sent with the uniform code (log2 C bits a label); each later block with
    the code of a probe trained on everything before it (-log2 p(y | x) bits a label). A
    layer whose labels are easy to learn from few examples has a short code; `compression`
    is the uniform code's length over the online one (1: nothing learnt)."""

    bits: float
    uniform_bits: float
    block_ends: list[int]  # rows sent by the end of each block, in transmission order
    block_bits: list[float]  # bits of each block

    @property
    def compression(self) -> float:
        return self.uniform_bits / self.bits if self.bits > 0 else math.inf


@dataclass
class Answer:
    """What a probe call answers for one data set: the probe of every l2 value, the one chosen
    on validation, and the control task's probe and the MDL code length when asked for."""

    grid: list[ProbeResult | Exception]  # one per value of `spec.l2`, in its order
    chosen_index: int
    control: ProbeResult | None = None  # trained on control labels at the chosen l2
    mdl: MdlResult | None = None

    @property
    def chosen(self) -> ProbeResult:
        result = self.grid[self.chosen_index]
        assert isinstance(result, ProbeResult)
        return result


def control_labels(
    key: str, seed: int, sizes: Mapping[str, int], train_counts: Sequence[int]
) -> dict[str, np.ndarray]:
    """Control labels, one per example (Hewitt & Liang, 2019): drawn independently from the
    train split's label distribution, so that the control task has the task's class balance
    and nothing else. Fixed by (`key`, `seed`, split): the same in every process."""
    p = np.asarray(train_counts, dtype=np.float64)
    p /= p.sum()
    return {
        split: _generator(key, seed, "control", split).choice(len(p), size=n, p=p).astype(np.int64)
        for split, n in sizes.items()
    }


def control_labels_by_value(
    key: str, seed: int, values: Mapping[str, np.ndarray], train_counts: Sequence[int]
) -> dict[str, np.ndarray]:
    """Control labels per value (Hewitt & Liang's per word type): every example with the same
    value gets the same label, drawn from the train split's label distribution by a hash of
    (`key`, `seed`, the value), so it does not depend on which other values occur."""
    p = np.asarray(train_counts, dtype=np.float64)
    cdf = np.cumsum(p / p.sum())
    out = {}
    for split, vals in values.items():
        uniques, inverse = np.unique(np.asarray(vals), return_inverse=True)
        u = np.array(
            [
                int.from_bytes(
                    hashlib.sha256(f"{key}\0{seed}\0{type(v).__name__}:{v}".encode()).digest()[:8], "big"
                )
                / 2**64
                for v in uniques.tolist()
            ]
        )
        labels = np.minimum(np.searchsorted(cdf, u, side="right"), len(p) - 1)
        out[split] = labels[inverse.reshape(-1)].astype(np.int64)
    return out


def mdl_ranks(key: str, n: int) -> np.ndarray:
    """Each train row's place in the MDL transmission order: a seeded random order, because a
    split stored sorted (images listed class by class) would make every prefix one class."""
    order = _generator(key, 0, "mdl-order", "train").permutation(n)
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(n, dtype=np.int64)
    return ranks


def mdl_ends(fractions: Sequence[float], n: int) -> list[int]:
    """Rows sent by the end of each block: the fractions of `n`, the first at least 1."""
    ends = [max(1, min(n, math.floor(f * n))) for f in fractions]
    ends[-1] = n
    for i in range(1, len(ends)):
        ends[i] = max(ends[i], ends[i - 1])
    return ends


def _generator(key: str, seed: int, purpose: str, split: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{key}\0{seed}\0{purpose}\0{split}".encode()).digest()
    return np.random.default_rng(np.frombuffer(digest, dtype=np.uint32).tolist())


def answer_probes(
    data: Sequence[ProbeData], *, spec: ProbeSpec, device: str = "cpu"
) -> list[Answer | Exception]:
    """A sweep's probe call: for every data set, train `spec.l2`'s probes (stacked), choose one
    on validation (`choose_l2`), and, when the spec asks, train the control task's probe and
    the MDL prefix probes at the chosen l2 (stacked too: the prefixes read each row once for
    all the probes that use it). Return, per data set, its `Answer` or the exception that
    failed it; every probe's answer equals the one it gets trained alone.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    l2_values = _checked_l2s(spec.l2_grid())
    control = spec.control is not None
    fractions = list(spec.mdl.fractions) if spec.mdl is not None else []
    later = (1 if control else 0) + max(0, len(fractions) - 1)
    ledger, datas = _load(
        data, spec=spec, device=device, heads=max(len(l2_values), later), sorted_rows=bool(fractions)
    )
    for d in datas:
        if d.error is None:
            try:
                d.prepare(
                    control=control,
                    mdl=bool(fractions),
                    control_seed=spec.control.seed if spec.control else 0,
                )
            except Exception as e:
                d.fail(e)
    _sync(device)
    loaded = time.perf_counter()

    heads = [_Head(d, i, l2, spec) for d in datas if d.error is None for i, l2 in enumerate(l2_values)]
    _solve(heads, spec)
    _sync(device)
    solved = time.perf_counter()
    grids: dict[int, dict[int, ProbeResult | Exception]] = {}
    for d in datas:
        grids[id(d)] = _score(
            d, [h for h in heads if h.data is d], started=started, loaded=loaded, solved=solved, choose=True
        )

    # The control task and the MDL prefixes, at each data set's chosen l2.
    later_heads: list[_Head] = []
    ends: dict[int, list[int]] = {}
    for d in datas:
        if d.error is not None or -1 not in grids[id(d)]:
            continue
        chosen = grids[id(d)][grids[id(d)][-1]]  # type: ignore[index]
        assert isinstance(chosen, ProbeResult)
        if control:
            later_heads.append(_Head(d, -1, chosen.l2, spec, _View(control=True)))
        if fractions:
            ends[id(d)] = block_ends = mdl_ends(fractions, d.train.n)
            # largest prefix first: the heads that use a stretch of the rank order are consecutive
            for j in reversed(range(len(block_ends) - 1)):
                if block_ends[j + 1] > block_ends[j]:
                    later_heads.append(_Head(d, j, chosen.l2, spec, _View(window=(0, block_ends[j]))))
    _solve(later_heads, spec)
    _sync(device)

    answers: list[Answer | Exception] = []
    for d in datas:
        grid = grids[id(d)]
        if d.error is not None or -1 not in grid:
            failed = d.error or next((r for r in grid.values() if isinstance(r, Exception)), None)
            answers.append(failed or ProbeserveError("probe did not run"))
            continue
        answer = Answer(grid=[grid[i] for i in range(len(l2_values))], chosen_index=cast(int, grid[-1]))  # type: ignore[arg-type]
        mine = [h for h in later_heads if h.data is d]
        try:
            _answer_later(d, answer, mine, ends.get(id(d)), started=started, loaded=loaded, solved=solved)
        except Exception as e:
            traceback.clear_frames(e.__traceback__)
            answers.append(e)
            continue
        answers.append(answer)
    _finish(
        [[*a.grid, a.control] for a in answers if isinstance(a, Answer)],
        started,
        ledger,
    )
    return answers


def _answer_later(
    d: _Data,
    answer: Answer,
    heads: list[_Head],
    ends: list[int] | None,
    *,
    started: float,
    loaded: float,
    solved: float,
) -> None:
    """Score the control probe (every split, its own labels) and the MDL prefix probes (each
    on the block after its prefix) of one data set: one stacked train pass for all of them."""
    if not heads:
        return
    for h in heads:
        if h.error is not None:
            raise h.error
        if d.error is not None:
            raise d.error
        assert h.final is not None
    control = [h for h in heads if h.view.control]
    prefixes = [h for h in heads if h.view.window is not None]
    kept = [h.kept()[0] for h in heads]
    scoring = [h.view if h.view.control else _View(window=(ends[h.index], ends[h.index + 1])) for h in heads]  # type: ignore[index]
    ev_train = _pass(d, d.train, kept, with_grad=False, views=scoring)
    if control:
        (h,) = control
        ctrl_kept = [h.kept()[0]]
        ev_val = _pass(d, d.val, ctrl_kept, with_grad=False, views=[h.view]) if d.val is not None else [None]
        ev_test = (
            _pass(d, d.test, ctrl_kept, with_grad=False, views=[h.view], counting=0)
            if d.test is not None
            else [None]
        )
        answer.control = _result(
            h, ev_train[0], ev_val[0], ev_test[0], started=started, loaded=loaded, solved=solved
        )
    if prefixes:
        assert ends is not None
        bits_of = {h.index: ev.loss * ev.n / math.log(2) for h, ev in zip(heads, ev_train) if h in prefixes}
        # the uniform code over the classes the labels take (Voita & Titov's K), not the largest
        # label + 1: labels {0, 9} are two classes, and log2 10 bits a label would inflate both
        # the code length and its compression against the uniform code
        assert d.counts is not None
        log2c = math.log2(max(2, int((d.counts > 0).sum())))
        blocks = [ends[0] * log2c] + [bits_of.get(j, 0.0) for j in range(len(ends) - 1)]
        answer.mdl = MdlResult(
            bits=float(sum(blocks)), uniform_bits=d.train.n * log2c, block_ends=ends, block_bits=blocks
        )


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

    def host(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t.cpu().numpy()

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
        test_class_counts=host(test_eval.class_counts) if test_eval else None,
        test_class_wrong=host(test_eval.class_wrong) if test_eval else None,
        test_confusion=host(test_eval.confusion) if test_eval else None,
        errors_train=train_eval.errors,
        errors_val=val_eval.errors if val_eval else 0,
        errors_test=test_eval.errors if test_eval else 0,
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
    """Train one probe on `train`, early-stopped on `val`, and evaluate it on every split;
    with a grid in `spec.l2`, its probes are trained together and the one chosen on
    validation is returned.

    Raises `DataError` for an empty split, a train split with a single class, labels outside
    [0, num_classes), non-finite activations, or splits whose feature counts differ; raises
    `BudgetError` when `spec.memory_bytes` cannot hold the probe's parameters and buffers.
    """
    alone = spec.model_copy(update={"control": None, "mdl": None})
    (outcome,) = answer_probes([ProbeData(train, val, test, num_classes)], spec=alone, device=device)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome.chosen
