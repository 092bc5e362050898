"""The probe dataset: labelled examples fed through every checkpoint, split train/val/test.

A probe's accuracy is only comparable across checkpoints and layers if every probe sees the
same examples, so each split is a pure function of the data spec: the same spec yields the
same examples in the same order in any process (a Ray worker re-parses the spec from JSON and
must agree with the driver). All randomness comes from `numpy.random.default_rng` seeded with
the spec's `seed` plus a fixed stream name, one stream per purpose, so that for example
changing `test_size` of the gaussian data does not change its train split.

Five sources:

- `gaussian`: the paper's section 3.2 toy problem, x ~ N(0, I) and y = [x . w > 0].
- `idx`: MNIST-format IDX files (Fashion-MNIST from the Debian package by default). The val
  split is a seeded subset of the training file, so the test file stays untouched.
- `parquet`: a user table with an input tensor column and a label column, split by a
  column of the table or at random.
- `images`: ImageNet-style images in a folder tree or Parquet files, local or on S3,
  decoded in worker processes (`probeserve.images`).
- `synthetic_images`: seeded images generated on the device, for benchmarks.

The first three are held in memory in their stored dtype (IDX images stay uint8, 70k x 784
bytes for Fashion-MNIST) and converted to float32 one batch at a time; images are streamed.
Every dataset has the interface of `Dataset`.
"""

from __future__ import annotations

import gzip as gzip_lib
import logging
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from probeserve.errors import DataError, StorageError
from probeserve.results import read_parquet_bytes
from probeserve.spec import DataSpec, GaussianData, IdxData, ImagesData, ParquetData, SyntheticImagesData
from probeserve.storage import Storage, open_storage, redact, temp_name

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # for annotations only: these modules load lazily, where used
    import pyarrow as pa

SPLITS = ("train", "val", "test")
# Labels are class indices and a probe has an output for every index up to the largest, so a
# label sets the class count. Past this one it is not a class index but a mistake (a hash, an
# id, a timestamp in the label column): a label of 3e9 made arrays of 3e9 counts (24 GB) and
# the run was killed for memory. Every array per class is well within memory below it, and
# labels fit the int32 of the shards and the result rows.
MAX_CLASSES = 1 << 24
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # the Debian package's location

# The IDX files of a dataset folder; each may also carry a ".gz" suffix.
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_INSTALL_HINT = "apt-get install dataset-fashion-mnist, or set data.path to a folder of IDX files"


class Dataset(Protocol):
    """What extraction needs from a probe dataset; every source implements it.

    `batches(split, batch_size, device=...)` yields (float32 inputs [b, *input_shape] already
    on `device`, int64 numpy labels [b]) in the same order on every call and in every
    process. `size` and `labels` describe what it yields; `skipped(split)` names the examples
    the last full pass over `split` left out because they could not be decoded (images).
    """

    source: str
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...] | None

    def size(self, split: str) -> int: ...
    def labels(self, split: str) -> np.ndarray: ...
    def skipped(self, split: str) -> list[str]: ...
    def describe(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
    def batches(
        self, split: str, batch_size: int, *, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[torch.Tensor, np.ndarray]]: ...


class ProbeDataset:
    """Labelled examples split into train/val/test, fixed by the spec's seed.

    `splits` maps each of SPLITS to `(inputs, labels)`: inputs of shape [n, *input_shape] in
    any numeric dtype (kept as given, so uint8 images cost one byte a value) and integer
    labels [n]. Batches are inputs converted to float32 and multiplied by `scale`.

    Construction validates what every probe relies on: no split is empty, labels are class
    indices (>= 0) and the train split has at least two classes. `num_classes` is the largest
    label over all splits plus one, so a probe has an output for every class it is tested on.
    """

    def __init__(
        self,
        splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
        *,
        source: str,
        scale: float = 1.0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        assert set(splits) == set(SPLITS), f"need exactly the splits {SPLITS}, got {sorted(splits)}"
        self.source = source
        self.scale = float(scale)
        self.class_names = tuple(class_names) if class_names is not None else None
        self.source_rows: dict[str, np.ndarray] | None = None  # parquet: each example's table row
        self._inputs: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        shapes = set()
        for split in SPLITS:
            inputs, labels = splits[split]
            assert inputs.ndim >= 2 and len(inputs) == len(labels), (split, inputs.shape, labels.shape)
            if len(labels) == 0:
                raise DataError(f"{source}: the {split} split is empty; check the data sizes in the spec")
            if labels.min() < 0:
                raise DataError(
                    f"{source}: label {int(labels.min())} in the {split} split; "
                    "labels must be class indices >= 0"
                )
            if labels.max() >= MAX_CLASSES:
                raise DataError(
                    f"{source}: label {int(labels.max())} in the {split} split; labels must be class "
                    f"indices below {MAX_CLASSES} (a probe has an output for every index up to the largest)"
                )
            self._inputs[split] = inputs
            self._labels[split] = labels.astype(np.int64, copy=False)
            shapes.add(inputs.shape[1:])
        assert len(shapes) == 1, f"splits disagree on the input shape: {shapes}"
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in shapes.pop())
        self.num_classes = max(int(self._labels[s].max()) for s in SPLITS) + 1

        train_classes = np.unique(self._labels["train"])
        if len(train_classes) < 2:
            raise DataError(
                f"probe dataset has a single class ({self._class_name(int(train_classes[0]))}) in its "
                f"train split ({source}); a probe needs at least two classes: check the label column "
                "or use a larger or different train split"
            )
        for split in ("val", "test"):
            unseen, counts = np.unique(
                self._labels[split][~np.isin(self._labels[split], train_classes)], return_counts=True
            )
            if len(unseen):
                # the probe can never predict such a class: each of its examples is an error, which
                # reads as a worse layer unless one knows (a rare class that a random split put
                # only outside train, or a split column that gives train fewer classes)
                log.warning(
                    "%s: %d %s example(s) of %d class(es) no train example has (%s): the probe cannot "
                    "predict them, so every one counts as an error",
                    source,
                    int(counts.sum()),
                    split,
                    len(unseen),
                    ", ".join(self._class_name(int(c)) for c in unseen[:5])
                    + (" ..." if len(unseen) > 5 else ""),
                )

    def _class_name(self, label: int) -> str:
        if self.class_names is not None:
            return f"label {label}: {self.class_names[label]!r}"
        return f"label {label}"

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def size(self, split: str) -> int:
        self._check_split(split)
        return len(self._labels[split])

    def labels(self, split: str) -> np.ndarray:
        """All labels of a split (int64, a copy), in the order batches() yields them."""
        self._check_split(split)
        return self._labels[split].copy()

    def skipped(self, split: str) -> list[str]:
        """Examples left out of `split`: none, the data is all in memory already."""
        self._check_split(split)
        return []

    def describe(self) -> dict[str, Any]:
        return {"source": self.source}

    def close(self) -> None:
        pass

    def batches(
        self, split: str, batch_size: int, *, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Float32 inputs [b, *input_shape] on `device` and int64 labels [b], in the same
        order every call."""
        self._check_split(split)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        dev = torch.device(device)
        inputs, labels = self._inputs[split], self._labels[split]
        for start in range(0, len(labels), batch_size):
            x = inputs[start : start + batch_size].astype(np.float32)  # always a copy
            if self.scale != 1.0:
                x *= np.float32(self.scale)
            yield torch.from_numpy(x).to(dev), labels[start : start + batch_size].copy()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.size(s)}" for s in SPLITS)
        return (
            f"ProbeDataset({self.source}, {sizes}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes})"
        )


def load_dataset(
    spec: DataSpec, *, s3_endpoint: str | None = None, frozen: tuple[Storage, str] | None = None
) -> Dataset:
    """Build the probe dataset a data spec describes; a DataError says what to fix.

    `frozen` is where a run keeps its frozen example index (storage, key): images read it
    from there when it exists instead of listing the data again (`probeserve.images.index`).
    The other sources are fixed by the spec alone and ignore it."""
    if isinstance(spec, GaussianData):
        return _load_gaussian(spec)
    if isinstance(spec, IdxData):
        return _load_idx(spec, s3_endpoint=s3_endpoint)
    if isinstance(spec, ParquetData):
        return _load_parquet(spec, s3_endpoint=s3_endpoint)
    if isinstance(spec, ImagesData):
        return _load_images(spec, s3_endpoint=s3_endpoint, frozen=frozen)
    if isinstance(spec, SyntheticImagesData):
        from probeserve.images.dataset import SyntheticImageDataset

        return SyntheticImageDataset(spec)
    raise TypeError(f"not a data spec: {type(spec).__name__}")


def _load_images(spec: ImagesData, *, s3_endpoint: str | None, frozen: tuple[Storage, str] | None) -> Dataset:
    from probeserve.images import index
    from probeserve.images.dataset import ImageDataset

    found = None
    if frozen is not None:
        try:
            found = index.load_frozen(*frozen, index.identity(spec))
        except StorageError as e:
            raise DataError(f"cannot read the run's frozen image index: {e}") from None
    if found is None:
        found = index.resolve(spec, s3_endpoint=s3_endpoint)
    return ImageDataset(spec, found, s3_endpoint=s3_endpoint)


def _rng(seed: int, stream: str) -> np.random.Generator:
    """A generator for one purpose: the same (seed, stream) always gives the same numbers."""
    # SeedSequence wants non-negative integers; the spec allows any int.
    return np.random.default_rng([seed % 2**64, zlib.crc32(stream.encode())])


def _check_size(field: str, requested: int, available: int, what: str) -> None:
    if requested > available:
        raise DataError(f"data.{field}: {requested} is more than the {available} {what}")


# --- gaussian ------------------------------------------------------------------------------


def gaussian_direction(spec: GaussianData) -> np.ndarray:
    """The hidden w of the gaussian data: y = [x . w > 0]."""
    return _rng(spec.seed, "gaussian/w").standard_normal(spec.dim)


def _load_gaussian(spec: GaussianData) -> ProbeDataset:
    w = gaussian_direction(spec)
    sizes = {"train": spec.train_size, "val": spec.val_size, "test": spec.test_size}
    splits = {}
    for split, n in sizes.items():
        if n is None:
            raise DataError(f"data.{split}_size: gaussian data is generated, so it needs a size, not null")
        x = _rng(spec.seed, f"gaussian/{split}").standard_normal((n, spec.dim), dtype=np.float32)
        y = (x.astype(np.float64) @ w > 0).astype(np.int64)
        splits[split] = (x, y)
    return ProbeDataset(splits, source=f"gaussian:dim={spec.dim},seed={spec.seed}")


# --- idx -----------------------------------------------------------------------------------

# IDX type codes (the third byte of the magic number); values are big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}


def read_idx(data: bytes, *, name: str = "IDX data") -> np.ndarray:
    """Parse an IDX file (gzip-compressed or not); `name` goes in error messages.

    The header is two zero bytes, a type code, the number of dimensions, then each dimension
    as a big-endian uint32; the values follow. Anything that does not add up is a DataError,
    so a truncated download fails here instead of as a shape error deep in a probe run.
    """
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip_lib.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{name}: corrupt or truncated gzip data ({e})") from None
    if len(data) < 4:
        raise DataError(f"{name}: {len(data)} bytes is too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{name}: not an IDX file (magic {data[:4].hex()} does not start with 0000)")
    dtype = _IDX_DTYPES.get(data[2])
    if dtype is None:
        raise DataError(f"{name}: unknown IDX type code 0x{data[2]:02x}")
    ndim = data[3]
    if ndim == 0:
        raise DataError(f"{name}: IDX header has no dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes, {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{name}: IDX header says shape {shape} ({expected} bytes) but there are {len(data)} bytes"
            + (" (truncated?)" if len(data) < expected else "")
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str, array: np.ndarray, *, gzip: bool = True) -> None:
    """Write an array as an IDX file, gzip-compressed by default, atomically.

    The demo uses it to write synthetic data in Fashion-MNIST's format when the real files
    are absent. Any dtype IDX knows works; images are uint8.
    """
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use uint8, int8, int16, int32, float32/64")
    if not 1 <= array.ndim <= 255 or max(array.shape) >= 2**32:
        raise ValueError(f"IDX cannot store shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(_IDX_DTYPES[code], copy=False).tobytes()
    if gzip:
        data = gzip_lib.compress(data, mtime=0)  # mtime=0: same array, same bytes
    tmp = os.path.join(os.path.dirname(path) or ".", temp_name())
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _find_idx_files(storage: Storage) -> dict[str, str | None]:
    """The key of each IDX file in a folder (".gz" preferred), or None where it is missing."""
    found: dict[str, str | None] = {}
    for role, base in _IDX_FILES.items():
        found[role] = next((k for k in (base + ".gz", base) if storage.stat(k) is not None), None)
    return found


def find_fashion_mnist() -> str | None:
    """FASHION_MNIST_DIR if the Debian package's four files are there, else None."""
    if not os.path.isdir(FASHION_MNIST_DIR):
        return None
    found = _find_idx_files(open_storage(FASHION_MNIST_DIR))
    return FASHION_MNIST_DIR if all(found.values()) else None


def _read_idx_pair(storage: Storage, images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    images_uri, labels_uri = storage.uri_for(images_key), storage.uri_for(labels_key)
    images = read_idx(storage.read_bytes(images_key), name=images_uri)
    labels = read_idx(storage.read_bytes(labels_key), name=labels_uri)
    if images.ndim != 3:
        raise DataError(f"{images_uri}: expected images of shape (N, H, W), got {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{labels_uri}: expected integer labels of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(f"{images_uri} has {len(images)} images but {labels_uri} has {len(labels)} labels")
    return images[:, None], labels  # (N, 1, H, W): one channel


def _load_idx(spec: IdxData, *, s3_endpoint: str | None) -> ProbeDataset:
    folder = spec.path if spec.path is not None else find_fashion_mnist()
    if folder is None:
        raise DataError(
            f"no probe data: data.path is not set and Fashion-MNIST is not in {FASHION_MNIST_DIR}; "
            + _INSTALL_HINT
        )
    storage = open_storage(folder, s3_endpoint=s3_endpoint)
    found = _find_idx_files(storage)
    missing = [base for role, base in _IDX_FILES.items() if found[role] is None]
    if missing:
        raise DataError(
            f"{redact(folder)}: missing IDX file(s) {', '.join(f'{m}(.gz)' for m in missing)}; "
            + _INSTALL_HINT
        )
    keys = {role: key for role, key in found.items() if key is not None}
    train_x, train_y = _read_idx_pair(storage, keys["train_images"], keys["train_labels"])
    test_x, test_y = _read_idx_pair(storage, keys["test_images"], keys["test_labels"])
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"{redact(folder)}: training images are {train_x.shape[2:]} but test images are {test_x.shape[2:]}"
        )

    # val: a seeded subset of the training file; train: the rest (or train_size of it).
    n = len(train_y)
    _check_size("val_size", spec.val_size, n, "training examples")
    rest = n - spec.val_size
    train_n = rest if spec.train_size is None else spec.train_size
    _check_size("train_size", train_n, rest, f"training examples left after data.val_size ({spec.val_size})")
    order = _rng(spec.seed, "idx/split").permutation(n)
    val_idx, train_idx = order[: spec.val_size], order[spec.val_size : spec.val_size + train_n]

    test_n = len(test_y) if spec.test_size is None else spec.test_size
    _check_size("test_size", test_n, len(test_y), "test examples")
    splits = {
        "train": (train_x[train_idx], train_y[train_idx]),
        "val": (train_x[val_idx], train_y[val_idx]),
        "test": (test_x[:test_n], test_y[:test_n]),
    }
    return ProbeDataset(splits, source=f"idx:{redact(folder)}", scale=spec.scale)


# --- parquet -------------------------------------------------------------------------------


def _read_parquet_table(uri: str, *, s3_endpoint: str | None) -> pa.Table:
    """One Parquet file, or every .parquet file under a folder or key prefix, in key order."""
    import pyarrow as pa

    storage = open_storage(uri, s3_endpoint=s3_endpoint)
    try:
        single = None if uri.endswith("/") else storage.stat("")
    except StorageError:
        single = None  # e.g. a bucket root, which is no object; listing below reports real problems
    if single is not None:
        sources = [(storage, "")]
    else:
        sources = [(storage, o.key) for o in storage.list("") if o.key.endswith(".parquet")]
        if not sources and uri.startswith("s3://") and uri.count("/") > 2 and not uri.endswith("/"):
            # not a folder: a key prefix like s3://bucket/data/part- (local paths are never
            # prefixes: listing a missing path's parent could walk a whole file system)
            parent, tail = uri.rsplit("/", 1)
            parent_storage = open_storage(parent, s3_endpoint=s3_endpoint)
            listed = parent_storage.list(tail)
            sources = [(parent_storage, o.key) for o in listed if o.key.endswith(".parquet")]
    if not sources:
        raise DataError(f"data.uri: no Parquet file at {redact(uri)} (nor .parquet files under it)")

    tables = []
    for src, key in sources:
        where = redact(src.uri_for(key))
        try:
            tables.append(read_parquet_bytes(src.read_bytes(key)))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{where}: not a readable Parquet file ({e})") from None
    try:
        return pa.concat_tables(tables)
    except pa.ArrowException as e:
        raise DataError(
            f"data.uri: the Parquet files under {redact(uri)} have different schemas ({e})"
        ) from None


def _column(table: pa.Table, field: str, name: str) -> pa.Array:
    if name not in table.column_names:
        raise DataError(
            f"data.{field}: no column {name!r}; available columns: {', '.join(table.column_names)}"
        )
    column = table.column(name).combine_chunks()
    if column.null_count:
        raise DataError(f"data.{field}: column {name!r} has {column.null_count} null value(s)")
    return column


def _input_values(column, name: str) -> np.ndarray:
    """A tensor column as an array [rows, values per row]: lists of numbers or float32 bytes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    rows = len(column)
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        value_type = t.value_type
        if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)):
            raise DataError(
                f"data.input_column: column {name!r} holds lists of {value_type}, not numbers; "
                "store each input as a flat list of numbers and set data.shape"
            )
        lengths = np.unique(pc.list_value_length(column).to_numpy(zero_copy_only=False))
        if len(lengths) > 1:
            raise DataError(
                f"data.input_column: rows of column {name!r} have different lengths "
                f"({', '.join(map(str, lengths[:5]))}...); every input needs the same number of values"
            )
        width = int(lengths[0]) if rows else 0
        flat = column.flatten()
        if flat.null_count:
            raise DataError(f"data.input_column: column {name!r} has null values inside its lists")
        values = flat.to_numpy(zero_copy_only=False)
        if values.dtype == np.float64:
            values = values.astype(np.float32)  # batches are float32 anyway; halve the memory
        return values.reshape(rows, width)
    if pa.types.is_fixed_size_binary(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        lengths = np.unique(pc.binary_length(column).to_numpy(zero_copy_only=False))
        if len(lengths) > 1 or (rows and lengths[0] % 4):
            raise DataError(
                f"data.input_column: column {name!r} must hold float32 bytes, the same number per row "
                f"(found lengths {', '.join(map(str, lengths[:5]))})"
            )
        blob = b"".join(column.to_pylist())
        return np.frombuffer(blob, dtype="<f4").astype(np.float32).reshape(rows, -1)
    raise DataError(
        f"data.input_column: column {name!r} has type {t}; expected a list of numbers or "
        "fixed_size_binary of float32 bytes"
    )


def _label_values(column, name: str) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels as they are; strings (or booleans) become indices of the sorted classes."""
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    t = column.type
    if pa.types.is_integer(t):
        return column.to_numpy(zero_copy_only=False).astype(np.int64), None
    if pa.types.is_boolean(t):
        return column.to_numpy(zero_copy_only=False).astype(np.int64), None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        names, labels = np.unique(np.asarray(column.to_pylist(), dtype=object), return_inverse=True)
        return labels.astype(np.int64), [str(n) for n in names]
    raise DataError(f"data.label_column: column {name!r} has type {t}; expected integers or strings")


def _load_parquet(spec: ParquetData, *, s3_endpoint: str | None) -> ProbeDataset:
    import pyarrow as pa

    table = _read_parquet_table(spec.uri, s3_endpoint=s3_endpoint)
    inputs = _input_values(_column(table, "input_column", spec.input_column), spec.input_column)
    labels, class_names = _label_values(_column(table, "label_column", spec.label_column), spec.label_column)
    if spec.shape is not None:
        per_row = int(np.prod(spec.shape))
        if per_row != inputs.shape[1]:
            raise DataError(
                f"data.shape: {spec.shape} holds {per_row} values but column {spec.input_column!r} "
                f"has {inputs.shape[1]} per row"
            )
        inputs = inputs.reshape(len(inputs), *spec.shape)

    n = len(labels)
    if spec.split_column is not None:
        column = _column(table, "split_column", spec.split_column)
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        names = np.asarray(column.cast(pa.string()).to_pylist(), dtype=object)
        others = sorted(set(np.unique(names)) - set(SPLITS))
        if others:
            shown = ", ".join(repr(o) for o in others[:10]) + (" ..." if len(others) > 10 else "")
            raise DataError(
                f"data.split_column: column {spec.split_column!r} has values other than "
                f"train/val/test: {shown}"
            )
        # Table order within each split. train_size and test_size (null by default) must fit;
        # val_size always has a value (default 5000), so here it is only an upper bound.
        index = {}
        for split in SPLITS:
            rows = np.flatnonzero(names == split)
            size = getattr(spec, f"{split}_size")
            if size is not None and split != "val":
                _check_size(f"{split}_size", size, len(rows), f"rows with {spec.split_column} = {split!r}")
            index[split] = rows if size is None else rows[:size]
    else:
        test_n = spec.test_size if spec.test_size is not None else n // 10
        _check_size("test_size", test_n, n, "rows of the table")
        _check_size("val_size", spec.val_size, n - test_n, f"rows of the table left after {test_n} test rows")
        rest = n - test_n - spec.val_size
        train_n = rest if spec.train_size is None else spec.train_size
        _check_size("train_size", train_n, rest, "rows left after the val and test splits")
        order = _rng(spec.seed, "parquet/split").permutation(n)
        index = {
            "val": order[: spec.val_size],
            "test": order[spec.val_size : spec.val_size + test_n],
            "train": order[spec.val_size + test_n :][:train_n],
        }
    splits = {s: (inputs[index[s]], labels[index[s]]) for s in SPLITS}
    ds = ProbeDataset(splits, source=f"parquet:{redact(spec.uri)}", class_names=class_names)
    ds.source_rows = {s: np.asarray(index[s]) for s in SPLITS}  # for `parquet_column`
    return ds


def parquet_column(spec: ParquetData, name: str, ds: ProbeDataset, *, field: str, s3_endpoint: str | None):
    """The values of column `name` for each split's examples, in the order `ds` yields them
    (`ds` is `load_dataset(spec)`); `field` is the spec field that names the column."""
    table = _read_parquet_table(spec.uri, s3_endpoint=s3_endpoint)
    if name not in table.column_names:
        raise DataError(f"{field}: no column {name!r}; available columns: {', '.join(table.column_names)}")
    import pyarrow as pa

    column = table.column(name).combine_chunks()
    if column.null_count:
        raise DataError(f"{field}: column {name!r} has {column.null_count} null value(s)")
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    t = column.type
    if not (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_integer(t)
        or pa.types.is_boolean(t)
    ):
        raise DataError(f"{field}: column {name!r} has type {t}; name a column of text or integers")
    values = np.asarray(column.to_pylist(), dtype=object)
    rows = ds.source_rows
    assert rows is not None, "not a dataset of parquet data"
    return {s: values[rows[s]] for s in SPLITS}
