"""Tests of the linear probe trainer: optimality against reference solvers, determinism,
streaming versus in-memory, early stopping, float16 input and bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.optimize
import torch
from sklearn.datasets import load_digits, make_classification
from sklearn.linear_model import LogisticRegression

from probeserve.errors import DataError, ProbeserveError
from probeserve.probe import BudgetError, ProbeData, in_memory, resolve_device, train_probe, train_probes
from probeserve.spec import ProbeSpec


def _objective_and_grad(
    theta: np.ndarray, z: np.ndarray, y: np.ndarray, num_classes: int, l2: float
) -> tuple[float, np.ndarray]:
    """The probe objective in float64: mean cross-entropy + l2/2 ||W||^2, and its gradient."""
    n, d = z.shape
    w, b = theta[: num_classes * d].reshape(num_classes, d), theta[num_classes * d :]
    logits = z @ w.T + b
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    residual = np.exp(logits - lse[:, None])
    residual[np.arange(n), y] -= 1.0
    residual /= n
    loss = (lse - logits[np.arange(n), y]).mean() + 0.5 * l2 * (w**2).sum()
    grad = np.concatenate([(residual.T @ z + l2 * w).ravel(), residual.sum(axis=0)])
    return loss, grad


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x64 = x.astype(np.float64)
    mean, std = x64.mean(axis=0), x64.std(axis=0)
    std[std == 0] = 1.0
    return (x64 - mean) / std, mean, std


def _reference_optimum(z: np.ndarray, y: np.ndarray, num_classes: int, l2: float) -> float:
    theta0 = np.zeros(num_classes * (z.shape[1] + 1))
    res = scipy.optimize.minimize(
        _objective_and_grad,
        theta0,
        args=(z, y, num_classes, l2),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 5000, "ftol": 1e-14, "gtol": 1e-9},
    )
    return float(res.fun)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """901 examples, 64 pixel features (some constant), 5 classes."""
    x, y = load_digits(n_class=5, return_X_y=True)
    return x.astype(np.float32), y


def _blobs(n: int, d: int, k: int, seed: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_classification(
        n_samples=n,
        n_features=d,
        n_informative=min(d, 8),
        n_redundant=0,
        n_classes=k,
        random_state=seed,
        **kw,
    )
    return (x * 3.0 + 5.0).astype(np.float32), y  # off-centre and scaled: standardising matters


def _split(x: np.ndarray, y: np.ndarray, n_train: int) -> tuple[np.ndarray, ...]:
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# ---------------------------------------------------------------------------------------------
# Optimality


@pytest.mark.parametrize("standardize", [True, False])
def test_reaches_the_regularised_optimum(digits, standardize: bool) -> None:
    if standardize:
        x, y = digits
    else:
        # Raw digit pixels are too ill-conditioned for float32 L-BFGS without standardising
        # (scipy itself needs ~3000 float64 iterations); use features of comparable scales.
        x, y = make_classification(
            n_samples=900, n_features=40, n_informative=10, n_classes=5, random_state=0
        )
        x = x.astype(np.float32)
    l2 = 1e-3
    spec = ProbeSpec(patience=None, max_epochs=1000, tolerance=1e-10, l2=l2, standardize=standardize)
    result = train_probe(in_memory(x, y, batch_size=256), None, None, num_classes=5, spec=spec)

    if standardize:
        z, mean, std = _standardise(x)
    else:
        z, mean, std = x.astype(np.float64), np.zeros(x.shape[1]), np.ones(x.shape[1])
    optimum = _reference_optimum(z, y, 5, l2)
    assert result.objective == pytest.approx(optimum, rel=1e-3)
    assert result.objective >= optimum * (1 - 1e-5)  # cannot beat it beyond float32 rounding

    # The returned raw-space weights, mapped back to the standardised space, have that objective.
    w_std = result.weight.astype(np.float64) * std
    b_std = result.bias.astype(np.float64) + result.weight.astype(np.float64) @ mean
    recomputed, _ = _objective_and_grad(np.concatenate([w_std.ravel(), b_std]), z, y, 5, l2)
    assert recomputed == pytest.approx(result.objective, rel=1e-4)
    raw_error = np.mean((x @ result.weight.T + result.bias).argmax(axis=1) != y)
    assert raw_error == pytest.approx(result.train_error)
    assert result.best_epoch == result.epochs < spec.max_epochs


def test_matches_sklearn_on_standardised_features(digits) -> None:
    x, y = digits
    l2 = 1e-3
    z, _, _ = _standardise(x)
    reference = LogisticRegression(C=1.0 / (l2 * len(x)), tol=1e-8, max_iter=5000).fit(z, y)
    theta = np.concatenate([reference.coef_.ravel(), reference.intercept_])
    sklearn_objective, _ = _objective_and_grad(theta, z, y, 5, l2)

    spec = ProbeSpec(patience=None, max_epochs=1000, tolerance=1e-10, l2=l2)
    result = train_probe(in_memory(x, y), None, None, num_classes=5, spec=spec)
    assert result.objective == pytest.approx(sklearn_objective, rel=1e-3)
    ours = (x @ result.weight.T + result.bias).argmax(axis=1)
    assert np.mean(ours == reference.predict(z)) > 0.99


def test_adam_approaches_the_optimum() -> None:
    x, y = _blobs(600, 20, 3, seed=1)
    l2 = 1e-2
    lbfgs = train_probe(
        in_memory(x, y), None, None, num_classes=3, spec=ProbeSpec(patience=None, tolerance=1e-10, l2=l2)
    )
    spec = ProbeSpec(
        solver="adam", learning_rate=0.02, batch_size=64, max_epochs=60, patience=None, l2=l2, tolerance=1e-9
    )
    adam = train_probe(in_memory(x, y, batch_size=200), None, None, num_classes=3, spec=spec)
    assert adam.objective == pytest.approx(lbfgs.objective, rel=2e-2)
    assert adam.objective >= lbfgs.objective * (1 - 1e-4)


# ---------------------------------------------------------------------------------------------
# Determinism, streaming, float16


@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
def test_same_inputs_give_bit_identical_results(solver: str) -> None:
    x, y, xv, yv = _split(*_blobs(1100, 30, 4, seed=2), 800)
    spec = ProbeSpec(solver=solver, max_epochs=40, patience=5, batch_size=128, learning_rate=0.01, seed=7)

    def run():
        return train_probe(in_memory(x, y), in_memory(xv, yv), None, num_classes=4, spec=spec)

    first, second = run(), run()
    assert np.array_equal(first.weight, second.weight)
    assert np.array_equal(first.bias, second.bias)
    assert (first.objective, first.epochs, first.best_epoch, first.val_loss) == (
        second.objective,
        second.epochs,
        second.best_epoch,
        second.val_loss,
    )


class _CountingSource:
    """A chunk source that counts the passes started over it."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> None:
        self.source = in_memory(x, y, batch_size=batch_size)
        self.passes = 0

    def __call__(self):
        self.passes += 1
        return self.source()


def test_streaming_gives_the_in_memory_answer() -> None:
    x, y, xv, yv = _split(*_blobs(1400, 40, 3, seed=3), 1000)
    common = dict(patience=None, max_epochs=200, tolerance=1e-9, l2=1e-3, batch_size=100)

    resident = _CountingSource(x, y, 100)
    in_mem = train_probe(resident, in_memory(xv, yv), None, num_classes=3, spec=ProbeSpec(**common))
    assert resident.passes == 1  # kept while it was checked: read once
    assert in_mem.train_resident

    # room for the parameters, buffers and chunks in flight, not for the 168 KB train split
    streamed_source = _CountingSource(x, y, 100)
    streamed = train_probe(
        streamed_source,
        in_memory(xv, yv),
        None,
        num_classes=3,
        spec=ProbeSpec(memory_bytes=300_000, **common),
    )
    assert not streamed.train_resident
    assert streamed_source.passes > streamed.epochs  # every function evaluation read the source
    assert streamed.peak_bytes <= 300_000 < in_mem.peak_bytes

    assert streamed.objective == pytest.approx(in_mem.objective, rel=1e-5)
    np.testing.assert_allclose(
        streamed.weight, in_mem.weight, rtol=0, atol=2e-3 * np.abs(in_mem.weight).max()
    )
    assert streamed.val_loss == pytest.approx(in_mem.val_loss, rel=1e-4)


def test_float16_chunks_work() -> None:
    x, y = _blobs(600, 25, 3, seed=5)
    spec = ProbeSpec(patience=None, tolerance=1e-9, l2=1e-3)
    as32 = train_probe(in_memory(x, y), None, None, num_classes=3, spec=spec)
    as16 = train_probe(in_memory(x.astype(np.float16), y), None, None, num_classes=3, spec=spec)
    assert as16.weight.dtype == np.float32
    assert as16.objective == pytest.approx(as32.objective, rel=1e-2)
    assert abs(as16.train_error - as32.train_error) <= 0.01


# ---------------------------------------------------------------------------------------------
# Early stopping


def test_early_stopping_stops_when_val_loss_rises() -> None:
    # Few examples, many features, almost no penalty: the train fit keeps improving while the
    # validation loss turns up early.
    x, y, xv, yv = _split(*_blobs(560, 200, 2, seed=6), 60)
    spec = ProbeSpec(patience=5, max_epochs=300, l2=1e-6, tolerance=1e-12)
    stopped = train_probe(in_memory(x, y), in_memory(xv, yv), None, num_classes=2, spec=spec)
    assert stopped.epochs < spec.max_epochs
    assert stopped.epochs - stopped.best_epoch == spec.patience

    full = train_probe(
        in_memory(x, y),
        in_memory(xv, yv),
        None,
        num_classes=2,
        spec=spec.model_copy(update={"patience": None}),
    )
    assert full.epochs > stopped.epochs
    assert stopped.val_loss < full.val_loss  # the kept weights are the better ones on val
    assert stopped.objective > full.objective


# ---------------------------------------------------------------------------------------------
# Bad input


def _small() -> tuple[np.ndarray, np.ndarray]:
    return _blobs(100, 5, 3, seed=8)


def test_single_class_train_split_is_refused() -> None:
    x, _ = _small()
    y = np.full(len(x), 3)
    with pytest.raises(DataError, match=r"single class \(label 3\); a probe needs at least two"):
        train_probe(in_memory(x, y), None, None, num_classes=5, spec=ProbeSpec())


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("bad_label", [-1, 3])
def test_labels_outside_the_class_range_are_refused(split: str, bad_label: int) -> None:
    x, y = _small()
    bad = y.copy()
    bad[17] = bad_label
    sources = {name: in_memory(x, y) for name in ("train", "val", "test")}
    sources[split] = in_memory(x, bad)
    with pytest.raises(DataError, match=rf"{split} split: label {bad_label} is outside \[0, 3\)"):
        train_probe(sources["train"], sources["val"], sources["test"], num_classes=3, spec=ProbeSpec())


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_activations_are_refused(split: str, value: float) -> None:
    x, y = _small()
    bad = x.copy()
    bad[5, 2] = value
    sources = {"train": in_memory(x, y), "val": in_memory(x, y)}
    sources[split] = in_memory(bad, y)
    with pytest.raises(DataError, match="the activations contain non-finite values"):
        train_probe(sources["train"], sources["val"], None, num_classes=3, spec=ProbeSpec())


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_empty_splits_are_refused(split: str) -> None:
    x, y = _small()
    sources = {name: in_memory(x, y) for name in ("train", "val", "test")}
    sources[split] = in_memory(x[:0], y[:0])
    with pytest.raises(DataError, match=f"{split} split is empty"):
        train_probe(sources["train"], sources["val"], sources["test"], num_classes=3, spec=ProbeSpec())


def test_feature_count_mismatch_is_refused() -> None:
    x, y = _small()
    with pytest.raises(DataError, match="val split: a chunk has 4 features, expected 5"):
        train_probe(in_memory(x, y), in_memory(x[:, :4], y), None, num_classes=3, spec=ProbeSpec())


# ---------------------------------------------------------------------------------------------
# Several probes trained together


def _data(x, y, n_train, n_val, num_classes, batch_size=128, **kw) -> ProbeData:
    tr, va = slice(0, n_train), slice(n_train, n_train + n_val)
    te = slice(n_train + n_val, None)
    return ProbeData(
        in_memory(x[tr], y[tr], batch_size=batch_size),
        in_memory(x[va], y[va], batch_size=batch_size),
        in_memory(x[te], y[te], batch_size=batch_size),
        num_classes,
        **kw,
    )


def _alone(data: ProbeData, spec: ProbeSpec, l2: float, device: str = "cpu"):
    return train_probe(
        data.train,
        data.val,
        data.test,
        num_classes=data.num_classes,
        spec=spec.model_copy(update={"l2": l2}),
        device=device,
    )


def _assert_same_probe(together, alone) -> None:
    assert together.objective == pytest.approx(alone.objective, rel=1e-5)
    assert (together.epochs, together.best_epoch) == (alone.epochs, alone.best_epoch)
    assert together.evaluations == alone.evaluations
    assert together.test_error == pytest.approx(alone.test_error, abs=1e-9)
    assert together.val_loss == pytest.approx(alone.val_loss, rel=1e-5)
    np.testing.assert_allclose(together.weight, alone.weight, rtol=0, atol=1e-3 * np.abs(alone.weight).max())


def test_stacked_l2_heads_equal_training_each_alone() -> None:
    # one [K*C, D] weight for the whole grid; each head keeps its own L-BFGS and early stopping
    x, y = _blobs(1600, 60, 5, seed=11)
    data = _data(x, y, 1000, 300, 5)
    spec = ProbeSpec(patience=4, max_epochs=300, tolerance=1e-9)
    l2s = [1e-6, 1e-4, 1e-2, 1e-1]
    (together,) = train_probes([data], spec=spec, l2s=l2s)
    for l2, result in zip(l2s, together, strict=True):
        assert result.l2 == l2
        _assert_same_probe(result, _alone(data, spec, l2))
    # the heads stopped at different epochs: each dropped out of the stack on its own
    assert len({r.epochs for r in together}) > 1


def test_a_training_pass_gives_each_stacked_heads_loss_and_gradient() -> None:
    # the training pass writes its softmax out (for speed); against the float64 objective, per
    # head, with logits large enough (tens) that an unshifted exp would overflow float32
    from probeserve.probe import _load, _pass

    x, y = _blobs(700, 30, 6, seed=5)
    spec = ProbeSpec()
    _, (d,) = _load(
        [ProbeData(in_memory(x, y, batch_size=256), None, None, 6)], spec=spec, device="cpu", heads=3
    )
    z, _, _ = _standardise(x)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(6 * 31, dtype=torch.float64, generator=g) * scale for scale in (0.01, 1.0, 20.0)]
    evals = _pass(d, d.train, params, with_grad=True)
    for p, ev in zip(params, evals, strict=True):
        want_loss, want_grad = _objective_and_grad(p.numpy(), z, y, 6, 0.0)
        assert ev.loss == pytest.approx(want_loss, rel=1e-5)
        got = torch.cat([ev.grad_w.reshape(-1), ev.grad_b]).double().numpy()
        np.testing.assert_allclose(got, want_grad, rtol=0, atol=1e-5 * max(1.0, np.abs(want_grad).max()))


def test_layers_trained_together_equal_training_each_alone() -> None:
    # different data, feature counts and class counts; the budget holds the small layer's
    # train split but streams the large one's
    small = _data(*_blobs(900, 20, 3, seed=12), 600, 150, 3)
    large = _data(*_blobs(2600, 120, 4, seed=13), 2000, 300, 4)
    spec = ProbeSpec(patience=5, max_epochs=200, tolerance=1e-9, batch_size=128, memory_bytes=2_000_000)
    l2s = [1e-4, 1e-2]
    outcomes = train_probes([small, large], spec=spec, l2s=l2s)
    assert [r.train_resident for r in outcomes[0]] == [True, True]
    assert [r.train_resident for r in outcomes[1]] == [False, False]
    assert all(r.peak_bytes <= spec.memory_bytes for rs in outcomes for r in rs)
    for data, results in zip([small, large], outcomes, strict=True):
        for l2, result in zip(l2s, results, strict=True):
            roomy = spec.model_copy(update={"memory_bytes": 1 << 30})
            _assert_same_probe(result, _alone(data, roomy, l2))


def test_a_data_set_with_bad_data_fails_alone() -> None:
    x, y = _blobs(900, 20, 3, seed=14)
    bad_y = y.copy()
    bad_y[700] = 7  # in the val split
    good, bad = _data(x, y, 600, 150, 3), _data(x, bad_y, 600, 150, 3)
    spec = ProbeSpec(patience=5, max_epochs=100)
    outcomes = train_probes([bad, good], spec=spec, l2s=[1e-3, 1e-2])
    assert all(isinstance(o, DataError) and "val split: label 7" in str(o) for o in outcomes[0])
    for l2, result in zip([1e-3, 1e-2], outcomes[1], strict=True):
        _assert_same_probe(result, _alone(good, spec, l2))


def test_a_budget_too_small_for_the_parameters_is_one_clear_error() -> None:
    x, y = _blobs(300, 40, 3, seed=15)
    with pytest.raises(
        BudgetError, match=r"^probe.memory_bytes: 10000 \(9.8 KiB\) cannot hold the parameters"
    ):
        train_probe(in_memory(x, y), None, None, num_classes=3, spec=ProbeSpec(memory_bytes=10_000))
    # a budget that holds one probe's fixed memory but not two: the second fails alone, and
    # says so; the first is trained
    import threading

    first = _data(x, y, 200, 50, 3, batch_size=64)
    reader = _FailingSource(x[:200], y[:200], fail_on_pass=0, batch_size=20)
    second = ProbeData(reader, None, None, 3)
    spec = ProbeSpec(memory_bytes=170_000, batch_size=64, max_epochs=30, l2=1e-4)  # one probe each
    threads = threading.active_count()
    ok, too_many = train_probes([first, second], spec=spec)
    assert ok[0].peak_bytes <= spec.memory_bytes
    assert isinstance(too_many[0], BudgetError)
    assert "resources.probes_per_call" in str(too_many[0])
    # refused at its first chunk, while its reader was ahead: the read was closed, the
    # reading thread is gone, although the error is still held
    assert reader.passes == reader.closed == 1
    assert threading.active_count() == threads


def test_known_feature_counts_reserve_memory_before_reading() -> None:
    x, y = _blobs(300, 40, 3, seed=16)
    data = _data(x, y, 200, 50, 3, n_features=39)  # a manifest that disagrees with the shards
    (outcome,) = train_probes([data], spec=ProbeSpec(l2=1e-4))[0]
    assert isinstance(outcome, DataError)
    assert "train split: a chunk has 40 features, expected 39" in str(outcome)


class _FailingSource:
    """Yields `chunks` chunks of a split, then raises OSError on pass `fail_on_pass`; records
    whether each pass's generator was closed."""

    def __init__(self, x, y, *, fail_on_pass: int, batch_size: int = 100) -> None:
        self.x, self.y, self.fail_on_pass, self.batch_size = x, y, fail_on_pass, batch_size
        self.passes = 0
        self.closed = 0

    def __call__(self):
        self.passes += 1
        this_pass = self.passes
        try:
            for start in range(0, len(self.x), self.batch_size):
                if this_pass == self.fail_on_pass and start > 0:
                    raise OSError("connection reset while reading part-00003")
                yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]
        finally:
            self.closed += 1


def test_a_read_error_on_the_prefetch_thread_fails_the_probe_and_stops_the_thread() -> None:
    import threading

    x, y = _blobs(1000, 30, 3, seed=17)
    source = _FailingSource(x, y, fail_on_pass=4)
    before = threading.active_count()
    with pytest.raises(OSError, match="connection reset while reading part-00003"):
        train_probe(
            source, None, None, num_classes=3, spec=ProbeSpec(memory_bytes=200_000, batch_size=100, l2=1e-4)
        )
    assert source.passes == 4 and source.closed == 4  # streamed: read again, each pass closed
    assert threading.active_count() == before


def test_a_streamed_pass_stopped_early_releases_its_reader() -> None:
    # the consumer leaves after one block while the reader waits for a chunk buffer to come
    # back: closing must not wait for it forever
    import threading

    from probeserve import probe as engine

    x, y = _blobs(5000, 16, 3, seed=20)
    spec = ProbeSpec(batch_size=100)
    data = engine._Data(
        ProbeData(in_memory(x, y, batch_size=100), None, None, 3),
        heads=1,
        spec=spec,
        device="cpu",
        ledger=engine._Ledger(spec.memory_bytes),
    )
    data.scan(data.train, keep=False)
    assert not data.train.resident
    threads = threading.active_count()

    def consume_one_block() -> None:
        blocks = data.train.blocks()
        next(blocks)
        time.sleep(0.3)  # the reader fills its queue and waits for a buffer
        blocks.close()

    worker = threading.Thread(target=consume_one_block, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "closing a streamed pass hung"
    assert threading.active_count() == threads


def test_torch_tensor_chunks_give_the_numpy_answer() -> None:
    x, y = _blobs(900, 25, 4, seed=18)
    spec = ProbeSpec(patience=None, tolerance=1e-9, l2=1e-4)
    as_numpy = train_probe(in_memory(x, y, batch_size=200), None, None, num_classes=4, spec=spec)

    def tensors():
        for start in range(0, len(x), 200):
            yield torch.from_numpy(x[start : start + 200]).half(), torch.from_numpy(y[start : start + 200])

    as_torch = train_probe(tensors, None, None, num_classes=4, spec=spec)
    half = train_probe(
        in_memory(x.astype(np.float16), y, batch_size=200), None, None, num_classes=4, spec=spec
    )
    assert as_torch.objective == half.objective
    assert as_torch.objective == pytest.approx(as_numpy.objective, rel=1e-2)


def test_bfloat16_compute_moves_the_optimum_little() -> None:
    x, y = _blobs(3000, 60, 5, seed=19)
    data = _data(x, y, 2000, 500, 5, batch_size=256)
    f32 = train_probes([data], spec=ProbeSpec(patience=None, tolerance=1e-9, l2=1e-3))[0][0]
    bf16 = train_probes(
        [data], spec=ProbeSpec(patience=None, tolerance=1e-9, l2=1e-3, compute_dtype="bfloat16")
    )[0][0]
    assert bf16.compute_dtype == "bfloat16" and bf16.weight.dtype == np.float32
    assert bf16.objective == pytest.approx(f32.objective, rel=5e-3)
    assert abs(bf16.test_error - f32.test_error) <= 0.01
    # the held features take half the bytes
    held = 2000 * 60 + 500 * 60 + 500 * 60
    assert f32.peak_bytes - bf16.peak_bytes >= held * 2 * 0.9


def test_compute_dtype_changes_the_spec_hash_only_when_set() -> None:
    from probeserve.spec import spec_from_dict

    base = {
        "checkpoints": {"uri": "x"},
        "model": {"factory": "mlp"},
        "data": {"kind": "gaussian"},
        "output": {"uri": "o"},
    }
    # the hash this spec had before `probe.compute_dtype` existed (and when probe.l2's default
    # was 0.0001): runs recorded then keep their run name (a branch that adds a field without
    # this care changes it, and fails here)
    old_default = {**base, "probe": {"l2": 0.0001}}
    assert spec_from_dict(old_default).hash() == "85939bc4532e37e0"
    # the default grid changes the answer, so the hash: pinned, like the old one
    assert spec_from_dict(base).hash() == "da77a028d33c6f44"
    as_bf16 = spec_from_dict({**base, "probe": {"compute_dtype": "bfloat16"}})
    assert as_bf16.hash() != spec_from_dict(base).hash()


# ---------------------------------------------------------------------------------------------
# Devices


def test_resolve_device() -> None:
    assert resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto").startswith("cuda:")
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ProbeserveError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ProbeserveError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; none on this machine")
def test_cuda_matches_cpu() -> None:
    x, y, xv, yv = _split(*_blobs(2500, 50, 4, seed=9), 2000)
    spec = ProbeSpec(patience=None, max_epochs=300, tolerance=1e-9, l2=1e-3)
    on_cpu = train_probe(in_memory(x, y), in_memory(xv, yv), in_memory(xv, yv), num_classes=4, spec=spec)
    on_gpu = train_probe(
        in_memory(x, y), in_memory(xv, yv), in_memory(xv, yv), num_classes=4, spec=spec, device="cuda"
    )
    assert on_gpu.device.startswith("cuda:")
    assert on_gpu.objective == pytest.approx(on_cpu.objective, rel=1e-5)
    assert on_gpu.test_error == pytest.approx(on_cpu.test_error, abs=0.005)
    np.testing.assert_allclose(on_gpu.weight, on_cpu.weight, atol=2e-3 * np.abs(on_cpu.weight).max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; none on this machine")
def test_cuda_groups_streaming_and_bfloat16_match_cpu() -> None:
    # the CUDA paths: stacked heads, a streamed split (pinned buffers, copies on a side stream),
    # and bfloat16 products with a float32 output
    from probeserve.probe import _fast_bf16_mm

    small = _data(*_blobs(1500, 40, 3, seed=21), 1000, 250, 3, batch_size=200)
    large = _data(*_blobs(6000, 300, 5, seed=22), 5000, 500, 5, batch_size=200)
    spec = ProbeSpec(patience=None, max_epochs=150, tolerance=1e-9, batch_size=200, memory_bytes=12_000_000)
    l2s = [1e-4, 1e-2]
    on_cpu = train_probes([small, large], spec=spec, l2s=l2s)
    on_gpu = train_probes([small, large], spec=spec, l2s=l2s, device="cuda")
    assert [r.train_resident for r in on_gpu[1]] == [False, False]  # streamed to the GPU
    for cpu_results, gpu_results in zip(on_cpu, on_gpu, strict=True):
        for a, b in zip(cpu_results, gpu_results, strict=True):
            assert b.device.startswith("cuda:")
            assert b.objective == pytest.approx(a.objective, rel=1e-4)
            assert b.test_error == pytest.approx(a.test_error, abs=0.005)

    assert _fast_bf16_mm(resolve_device("cuda"))  # the tensor-core path, not the emulation
    bf16 = spec.model_copy(update={"compute_dtype": "bfloat16", "memory_bytes": 1 << 30})
    on_gpu16 = train_probes([small, large], spec=bf16, l2s=l2s, device="cuda")
    for cpu_results, gpu_results in zip(on_cpu, on_gpu16, strict=True):
        for a, b in zip(cpu_results, gpu_results, strict=True):
            assert b.objective == pytest.approx(a.objective, rel=5e-3)
            assert abs(b.test_error - a.test_error) <= 0.01


# ---------------------------------------------------------------------------------------------
# A sweep's probes trained together (resources.probes_per_call)


def _sweep_helpers():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from helpers import tiny_spec, write_checkpoints

    return tiny_spec, write_checkpoints


def _rows(uri) -> dict:
    from probeserve import results

    return {(r["checkpoint"], r["layer"]): r for r in results.load(uri).to_pylist()}


def test_probes_per_call_gives_the_rows_of_one_probe_per_call(tmp_path) -> None:
    from probeserve import results
    from probeserve.runners.local import run_local

    tiny_spec, write_checkpoints = _sweep_helpers()
    spec = tiny_spec(tmp_path, resources={"device": "cpu", "probes_per_call": 3})
    write_checkpoints(spec)
    summary = run_local(spec)
    assert summary.ok == 8 and not summary.failed
    alone = tiny_spec(tmp_path, output={"uri": str(tmp_path / "alone")})
    run_local(alone)
    together, one_by_one = _rows(spec.output.uri), _rows(alone.output.uri)
    assert together.keys() == one_by_one.keys() and len(together) == 8
    for key, row in together.items():
        assert row["status"] == "ok"
        for col in results.METRICS:
            assert row[col] == pytest.approx(one_by_one[key][col], abs=1e-6), (key, col)
    # four layers per checkpoint in calls of three: the first three rows share one call's time
    for ckpt in {k[0] for k in together}:
        seconds = [together[(ckpt, layer)]["seconds"] for layer in ("input", "fc1", "act", "fc2")]
        assert seconds[0] == seconds[1] == seconds[2] != seconds[3]
    assert run_local(spec).skipped_done == 8


def _extracted(tmp_path, **over):
    from probeserve.sweep import Sweep, extract_missing

    tiny_spec, write_checkpoints = _sweep_helpers()
    spec = tiny_spec(tmp_path, **over)
    write_checkpoints(spec, steps=(0,))
    sweep = Sweep(spec)
    items = sweep.plan().pending()
    assert extract_missing(sweep, items, device="cpu") == {}
    return spec, sweep, items


def test_an_item_with_damaged_shards_fails_alone_in_its_group(tmp_path) -> None:
    import os

    from probeserve.sweep import probe_and_commit_group

    spec, sweep, items = _extracted(tmp_path)
    fc1 = next(i for i in items if i.layer == "fc1")
    key = sweep.manifest(fc1.checkpoint, "fc1")["splits"]["train"]["shards"][0]
    with open(os.path.join(spec.output.uri, key), "r+b") as f:
        f.truncate(100)
    rows = probe_and_commit_group(sweep, items, device="cpu")
    assert [r["layer"] for r in rows] == [i.layer for i in items]
    by_layer = {r["layer"]: r for r in rows}
    assert by_layer["fc1"]["status"] == "failed"
    assert (
        by_layer["fc1"]["error"].startswith("layer fc1: ")
        and "part-00000.parquet" in by_layer["fc1"]["error"]
    )
    assert {r["status"] for layer, r in by_layer.items() if layer != "fc1"} == {"ok"}
    assert set(_rows(spec.output.uri)) == {(fc1.checkpoint.key, i.layer) for i in items}
    assert not list((tmp_path / "out").rglob("running/**/*.json"))


def test_a_group_skips_items_already_committed(tmp_path) -> None:
    from probeserve import results
    from probeserve.sweep import probe_and_commit, probe_and_commit_group

    spec, sweep, items = _extracted(tmp_path)
    ckpt = items[0].checkpoint
    probe_and_commit(sweep, items[0], device="cpu")
    first = results.read_row(sweep.output, spec.run, ckpt.key, ckpt.step, items[0].layer)
    rows = probe_and_commit_group(sweep, items, device="cpu")
    assert rows[0] == first  # read back, not trained again
    assert results.read_row(sweep.output, spec.run, ckpt.key, ckpt.step, items[0].layer) == first
    assert [r["status"] for r in rows] == ["ok"] * len(items)
    assert len(_rows(spec.output.uri)) == len(items)


def test_items_that_do_not_fit_together_are_trained_alone(tmp_path) -> None:
    from probeserve.sweep import _probe_data, probe_and_commit_group

    # 256 features: each probe reserves ~125 KB of solver state; 1 MB holds one probe with
    # its buffers and streamed chunks, not four
    spec, sweep, items = _extracted(
        tmp_path,
        model={"factory": "tiny", "kwargs": {"input_dim": 256, "hidden": 256, "num_classes": 2}},
        data={"kind": "gaussian", "dim": 256, "train_size": 600, "val_size": 200, "test_size": 200},
        layers={"include": ["input", "fc1", "act"]},
        probe={"max_epochs": 50, "l2": 1e-3, "batch_size": 64, "memory_bytes": 1_000_000},
    )
    together = train_probes(
        [_probe_data(sweep, i.checkpoint, i.layer)[1] for i in items], spec=spec.probe, device="cpu"
    )
    assert any(isinstance(o, BudgetError) for (o,) in together)  # the premise
    rows = probe_and_commit_group(sweep, items, device="cpu")
    assert [r["status"] for r in rows] == ["ok"] * len(items)
    for row, (outcome,) in zip(rows, together, strict=True):
        if not isinstance(outcome, Exception):
            assert row["test_error"] == pytest.approx(outcome.test_error, abs=1e-9)
