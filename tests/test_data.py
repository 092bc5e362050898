"""Probe datasets: deterministic splits, the IDX format, Parquet tables and the errors users see."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from probeserve.data import (
    SPLITS,
    ProbeDataset,
    find_fashion_mnist,
    gaussian_direction,
    load_dataset,
    read_idx,
    write_idx,
)
from probeserve.errors import DataError
from probeserve.spec import GaussianData, IdxData, ParquetData


def _all(ds: ProbeDataset, split: str, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*ds.batches(split, batch_size))
    return torch.cat(xs).numpy(), np.concatenate(ys)


# --- gaussian ------------------------------------------------------------------------------


def test_gaussian_is_deterministic_and_labels_follow_the_sign_of_x_dot_w():
    spec = GaussianData(kind="gaussian", dim=8, train_size=4000, val_size=500, test_size=1000, seed=3)
    ds = load_dataset(spec)
    again = load_dataset(GaussianData.model_validate_json(spec.model_dump_json()))
    assert ds.input_shape == (8,) and ds.num_classes == 2
    assert [ds.size(s) for s in SPLITS] == [4000, 500, 1000]

    x, y = _all(ds, "train", batch_size=300)  # uneven last batch
    x2, y2 = _all(again, "train", batch_size=4000)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(y, ds.labels("train"))
    assert 0.4 < y.mean() < 0.6

    # Directly: the labels are the sign of x . w for the hidden direction.
    np.testing.assert_array_equal(y, (x.astype(np.float64) @ gaussian_direction(spec) > 0).astype(np.int64))
    # Independently of w: for Gaussian x, E[x (2y - 1)] points along w, so a direction
    # estimated from train classifies test almost perfectly (a misaligned label would not).
    w_hat = (x * (2 * y[:, None] - 1)).mean(axis=0)
    xt, yt = _all(ds, "test")
    assert ((xt @ w_hat > 0) == yt).mean() > 0.95

    other = load_dataset(spec.model_copy(update={"seed": 4}))
    assert not np.array_equal(_all(other, "train")[0], x)


def test_gaussian_test_size_does_not_change_train():
    a = load_dataset(GaussianData(kind="gaussian", dim=4, train_size=300, test_size=100))
    b = load_dataset(GaussianData(kind="gaussian", dim=4, train_size=300, test_size=700))
    np.testing.assert_array_equal(_all(a, "train")[0], _all(b, "train")[0])
    np.testing.assert_array_equal(_all(a, "val")[0], _all(b, "val")[0])
    assert b.size("test") == 700


def test_gaussian_needs_sizes():
    with pytest.raises(DataError, match="data.test_size"):
        load_dataset(GaussianData(kind="gaussian", test_size=None))


def test_batches_are_float32_copies():
    ds = load_dataset(GaussianData(kind="gaussian", dim=3, train_size=10, val_size=4, test_size=4))
    x, y = next(ds.batches("train", 4))
    assert x.dtype == torch.float32 and x.shape == (4, 3) and y.dtype == np.int64
    x.zero_()
    y[:] = -1
    x_again, y_again = next(ds.batches("train", 4))
    assert x_again.abs().sum() > 0 and (y_again >= 0).all()
    with pytest.raises(ValueError, match="unknown split"):
        ds.size("validation")


def test_batches_go_to_the_device_asked_for_and_nothing_is_skipped():
    ds = load_dataset(GaussianData(kind="gaussian", dim=3, train_size=10, val_size=4, test_size=4))
    x, _ = next(ds.batches("train", 4))
    assert x.device.type == "cpu"
    # "meta" stands for any device other than the CPU (no GPU needed to see the copy happen)
    on_meta, y = next(ds.batches("train", 4, device="meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (4, 3) and on_meta.dtype == torch.float32
    assert isinstance(y, np.ndarray) and y.dtype == np.int64
    assert [ds.skipped(s) for s in SPLITS] == [[], [], []]
    assert ds.describe() == {"source": ds.source}


# --- IDX -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_idx_round_trip(tmp_path, compress, dtype):
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    if dtype == np.uint8:
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    path = str(tmp_path / "a-idx3-ubyte")
    write_idx(path, array, gzip=compress)
    with open(path, "rb") as f:
        data = f.read()
    assert (data[:2] == b"\x1f\x8b") == compress
    back = read_idx(data)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert os.listdir(tmp_path) == ["a-idx3-ubyte"]  # no temporary file left behind


def test_idx_header_is_the_mnist_layout():
    labels = np.array([1, 2, 3], dtype=np.uint8)
    raw = bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 1, 2, 3])  # what MNIST's label files look like
    np.testing.assert_array_equal(read_idx(raw), labels)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "truncated"),  # says 5 values, has 2
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "2 bytes|shape"),  # trailing garbage
        (b"\x00\x00\x08\x02\x00\x00", "truncated IDX header"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x01", "type code 0x07"),
        (b"\x00\x00\x08\x00", "no dimensions"),
        (b"PK\x03\x04 a zip file", "not an IDX file"),
        (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02\x01\x02")[:-6], "gzip"),
    ],
)
def test_corrupt_idx_is_a_data_error(data, message):
    with pytest.raises(DataError, match=message):
        read_idx(data, name="some-file")


def _write_idx_folder(folder, *, n_train=300, n_test=50, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    suffix = ".gz" if gz else ""
    # The first pixel encodes the example's index in its file, so tests can tell examples apart.
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 6, 5), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        images[:, 0, 1] = np.arange(n) // 256
        write_idx(f"{folder}/{prefix}-images-idx3-ubyte{suffix}", images, gzip=gz)
        write_idx(
            f"{folder}/{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % 3).astype(np.uint8), gzip=gz
        )
    return str(folder)


def _example_ids(ds: ProbeDataset, split: str, scale: float) -> np.ndarray:
    x, _ = _all(ds, split)
    pixels = np.rint(x[:, 0, 0, :2] / scale).astype(np.int64)
    return pixels[:, 0] + 256 * pixels[:, 1]


@pytest.mark.parametrize("gz", [True, False])
def test_idx_splits(tmp_path, gz):
    folder = _write_idx_folder(tmp_path / "data", gz=gz)
    spec = IdxData(kind="idx", path=folder, val_size=40, train_size=200, test_size=30, seed=1)
    ds = load_dataset(spec)
    assert ds.input_shape == (1, 6, 5) and ds.num_classes == 3
    assert [ds.size(s) for s in SPLITS] == [200, 40, 30]
    assert ds.source == f"idx:{folder}"

    train, val, test = (_example_ids(ds, s, spec.scale) for s in SPLITS)
    assert len(set(train)) == 200 and len(set(val)) == 40
    assert not set(train) & set(val)
    np.testing.assert_array_equal(test, np.arange(30))  # the first test_size of the test file
    np.testing.assert_array_equal(ds.labels("train"), train % 3)  # labels stay with their images
    x, _ = next(ds.batches("train", 8))
    assert 0.0 <= x.min() and x.max() <= 1.0

    same = load_dataset(spec)
    np.testing.assert_array_equal(_example_ids(same, "val", spec.scale), val)
    reseeded = load_dataset(spec.model_copy(update={"seed": 2}))
    assert set(_example_ids(reseeded, "val", spec.scale)) != set(val)

    everything = load_dataset(spec.model_copy(update={"train_size": None, "test_size": None}))
    assert [everything.size(s) for s in SPLITS] == [260, 40, 50]


def test_idx_size_errors(tmp_path):
    folder = _write_idx_folder(tmp_path / "data")
    with pytest.raises(DataError, match="data.val_size: 400 is more than the 300 training examples"):
        load_dataset(IdxData(kind="idx", path=folder, val_size=400))
    with pytest.raises(DataError, match="data.train_size: 290"):
        load_dataset(IdxData(kind="idx", path=folder, val_size=20, train_size=290))
    with pytest.raises(DataError, match="data.test_size: 51"):
        load_dataset(IdxData(kind="idx", path=folder, val_size=20, test_size=51))
    with pytest.raises(DataError, match="train split is empty"):
        load_dataset(IdxData(kind="idx", path=folder, val_size=300))


def test_idx_missing_and_mismatched_files(tmp_path):
    folder = _write_idx_folder(tmp_path / "data")
    os.unlink(f"{folder}/t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*apt-get install dataset-fashion-mnist"):
        load_dataset(IdxData(kind="idx", path=folder, val_size=10))

    write_idx(f"{folder}/t10k-labels-idx1-ubyte.gz", np.zeros(49, dtype=np.uint8))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz has 50 images but .*t10k-labels.* 49"):
        load_dataset(IdxData(kind="idx", path=folder, val_size=10))

    with pytest.raises(DataError, match="apt-get install"):
        load_dataset(IdxData(kind="idx", path=str(tmp_path / "nowhere")))


@pytest.mark.skipif(
    find_fashion_mnist() is None, reason="Fashion-MNIST not installed (dataset-fashion-mnist)"
)
def test_real_fashion_mnist():
    ds = load_dataset(IdxData(kind="idx"))
    assert ds.size("train") + ds.size("val") == 60000 and ds.size("val") == 5000
    assert ds.size("test") == 10000
    assert ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert set(np.unique(ds.labels("train"))) == set(range(10))
    x, y = next(ds.batches("test", 16))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    np.testing.assert_array_equal(y, ds.labels("test")[:16])


# --- Parquet -------------------------------------------------------------------------------


def _table(n=100, *, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x, (np.arange(n) % 4).astype(np.int64)


def test_parquet_list_column(tmp_path):
    x, y = _table()
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"x": pa.array(list(x)), "label": y, "id": np.arange(len(y))}), path)
    spec = ParquetData(kind="parquet", uri=path, val_size=20, test_size=10, shape=[2, 3], seed=5)
    ds = load_dataset(spec)
    assert [ds.size(s) for s in SPLITS] == [70, 20, 10]
    assert ds.input_shape == (2, 3) and ds.num_classes == 4

    # Each row's input still goes with its own label, and the splits partition the table.
    seen = []
    for split in SPLITS:
        xs, ys = _all(ds, split, batch_size=7)
        rows = [int(np.flatnonzero((x == r.reshape(-1)).all(axis=1))[0]) for r in xs]
        np.testing.assert_array_equal(y[rows], ys)
        seen += rows
    assert sorted(seen) == list(range(100))

    # The default test split is 10% of the rows.
    default = load_dataset(spec.model_copy(update={"test_size": None}))
    assert default.size("test") == 10

    with pytest.raises(DataError, match=r"data.shape: \[4, 2\] holds 8 values .* 6 per row"):
        load_dataset(spec.model_copy(update={"shape": [4, 2]}))


def test_parquet_fixed_size_list_and_binary_columns_in_a_folder(tmp_path):
    x, y = _table(60)
    folder = tmp_path / "table"
    folder.mkdir()
    binary = pa.array([row.astype("<f4").tobytes() for row in x], type=pa.binary(4 * x.shape[1]))
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    # Two files of one table; the folder reads them in key order.
    for i, part in enumerate((slice(0, 30), slice(30, 60))):
        t = pa.table({"b": binary[part], "f": fixed[part], "y": y[part]})
        pq.write_table(t, str(folder / f"part-{i}.parquet"))
    (folder / "README.txt").write_text("not a table")

    for column in ("b", "f"):
        spec = ParquetData(
            kind="parquet", uri=str(folder), input_column=column, label_column="y", val_size=10
        )
        ds = load_dataset(spec)
        assert ds.input_shape == (6,) and sum(ds.size(s) for s in SPLITS) == 60
        xs, ys = _all(ds, "train")
        rows = [int(np.flatnonzero((x == r).all(axis=1))[0]) for r in xs]
        np.testing.assert_array_equal(y[rows], ys)


def test_parquet_string_labels_and_split_column(tmp_path):
    n = 40
    split = np.array(["train"] * 25 + ["val"] * 10 + ["test"] * 5, dtype=object)
    names = np.array(["shirt", "boot", "coat"])[np.arange(n) % 3]
    x = np.arange(n, dtype=np.float32)[:, None].repeat(2, axis=1)
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"x": pa.array(list(x)), "label": names, "split": split}), path)

    spec = ParquetData(kind="parquet", uri=path, split_column="split")
    ds = load_dataset(spec)  # val_size (default 5000) is only an upper bound here
    assert [ds.size(s) for s in SPLITS] == [25, 10, 5]
    assert ds.class_names == ("boot", "coat", "shirt") and ds.num_classes == 3
    xs, ys = _all(ds, "val")
    np.testing.assert_array_equal(xs[:, 0], np.arange(25, 35))  # table order within a split
    np.testing.assert_array_equal(np.array(ds.class_names)[ys], names[25:35])

    capped = load_dataset(spec.model_copy(update={"train_size": 20, "val_size": 4}))
    assert [capped.size(s) for s in SPLITS] == [20, 4, 5]
    with pytest.raises(DataError, match="data.test_size: 6 is more than the 5 rows"):
        load_dataset(spec.model_copy(update={"test_size": 6}))

    bad = split.copy()
    bad[3], bad[4] = "validation", "holdout"
    pq.write_table(pa.table({"x": pa.array(list(x)), "label": names, "split": bad}), path)
    with pytest.raises(DataError, match="'holdout', 'validation'"):
        load_dataset(spec)


def test_parquet_missing_column_lists_the_columns(tmp_path):
    x, y = _table(20)
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"x": pa.array(list(x)), "target": y}), path)
    with pytest.raises(
        DataError, match=r"data.label_column: no column 'label'; available columns: x, target"
    ):
        load_dataset(ParquetData(kind="parquet", uri=path, val_size=2))
    with pytest.raises(DataError, match="data.input_column: no column 'pixels'"):
        load_dataset(ParquetData(kind="parquet", uri=path, input_column="pixels", label_column="target"))


def test_parquet_single_class_and_oversize_errors(tmp_path):
    x, _ = _table(50)
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"x": pa.array(list(x)), "label": ["cat"] * 50}), path)
    with pytest.raises(DataError, match=r"single class \(label 0: 'cat'\) in its train split"):
        load_dataset(ParquetData(kind="parquet", uri=path, val_size=5))

    pq.write_table(pa.table({"x": pa.array(list(x)), "label": np.arange(50) % 2}), path)
    with pytest.raises(DataError, match="data.val_size: 5000 is more than the 45 rows"):
        load_dataset(ParquetData(kind="parquet", uri=path))
    with pytest.raises(DataError, match="data.train_size: 41 is more than the 40 rows"):
        load_dataset(ParquetData(kind="parquet", uri=path, val_size=5, train_size=41))
    with pytest.raises(DataError, match="no Parquet file"):
        load_dataset(ParquetData(kind="parquet", uri=str(tmp_path / "missing"), val_size=5))


def test_parquet_rejects_negative_labels_and_unequal_rows(tmp_path):
    path = str(tmp_path / "t.parquet")
    x = [[0.0, 1.0]] * 20
    pq.write_table(pa.table({"x": x, "label": [-1, 0, 1, 2] * 5}), path)
    with pytest.raises(DataError, match="labels must be class indices >= 0"):
        load_dataset(ParquetData(kind="parquet", uri=path, val_size=2))
    pq.write_table(pa.table({"x": [[0.0, 1.0], [1.0]] * 10, "label": [0, 1] * 10}), path)
    with pytest.raises(DataError, match="different lengths"):
        load_dataset(ParquetData(kind="parquet", uri=path, val_size=2))


def test_a_val_or_test_class_that_train_lacks_is_named_in_a_warning(tmp_path, caplog):
    """Every example of such a class counts as an error, and nothing said so (the image layout
    refuses it; here a random split can cause it, so it is a warning that names the class)."""
    path = str(tmp_path / "t.parquet")
    labels = ["cat", "dog"] * 20 + ["emu"]  # emu: one row, put outside train by the split below
    x = [[float(i), 1.0] for i in range(len(labels))]
    pq.write_table(
        pa.table({"x": x, "label": labels, "split": ["train"] * 34 + ["val"] * 6 + ["test"]}), path
    )
    spec = ParquetData(kind="parquet", uri=path, split_column="split")
    with caplog.at_level("WARNING", logger="probeserve.data"):
        ds = load_dataset(spec)
    assert ds.num_classes == 3
    lines = [r.getMessage() for r in caplog.records if "no train example has" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "1 test example(s) of 1 class(es)" in lines[0] and "label 2: 'emu'" in lines[0]

    caplog.clear()
    pq.write_table(pa.table({"x": x[:40], "label": labels[:40]}), path)
    with caplog.at_level("WARNING", logger="probeserve.data"):
        load_dataset(ParquetData(kind="parquet", uri=path, val_size=4))
    assert "no train example has" not in caplog.text
