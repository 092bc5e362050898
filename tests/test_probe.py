"""Tests of the linear probe trainer: optimality against reference solvers, determinism,
streaming versus in-memory, early stopping, float16 input and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
from sklearn.datasets import load_digits, make_classification
from sklearn.linear_model import LogisticRegression

from probeserve.errors import DataError, ProbeserveError
from probeserve.probe import in_memory, resolve_device, train_probe
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
