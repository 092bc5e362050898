"""Activation shards: the Parquet files that hold one (checkpoint, layer, split) of examples.

Activations are extracted once and read many times (one probe per layer and seed), so the
format is chosen for fast, simple streaming rather than for analytics:

- One Parquet file per shard ("part"), uncompressed, with no dictionary and no statistics.
  Activations do not compress, and statistics on a blob column mean nothing.
- Three columns: `row` (int64, the example's index within its split), `label` (int32) and
  `x`, a `fixed_size_binary(n_features * itemsize)` holding the example's reduced activation
  vector as raw little-endian float16 or float32 bytes. Parquet then handles one value per
  example; a `FixedSizeList<float16>` column is about 10x slower to write and read, because
  every float becomes a separate value with its own levels. pyarrow still copies each byte
  two or three times on the way to the file, so a shard writes at about 0.3-0.4x the speed
  of a plain file write (jobs/benchmarks/bench_shards.py measures both).
- File-level key/value metadata, all strings, keys prefixed `probeserve.`: `format_version`
  ("1"), `layer`, `layer_index`, `shape` (JSON list, the per-example shape after reduction),
  `n_features`, `dtype`, `reducer` (JSON), `checkpoint`, `step`, `split`, `spec_hash`, `run`,
  plus whatever the caller adds. The writer sets `format_version`, `n_features` and `dtype`
  itself; the caller supplies the rest.

Plain pyarrow or pandas users can read a shard without probeserve::

    table = pyarrow.parquet.read_table("part-00000.parquet")
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    dtype = numpy.dtype(meta["probeserve.dtype"]).newbyteorder("<")
    x = numpy.frombuffer(table.column("x").combine_chunks().buffers()[1], dtype)
    x = x.reshape(-1, int(meta["probeserve.n_features"]))

    df = pandas.read_parquet("part-00000.parquet")  # the x column holds `bytes` objects
    x = numpy.frombuffer(b"".join(df["x"]), dtype).reshape(len(df), -1)

(`table_x` does the first for you.) Parts are written to a local staging file and published
only once closed, because pyarrow does not make writes atomic: an exception inside a
`ParquetWriter` block still leaves a truncated file that reads back without error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from probeserve.errors import LayerError, StorageError
from probeserve.storage import LocalStorage, Storage, join

FORMAT_VERSION = 1

KEY_FORMAT_VERSION = "probeserve.format_version"
KEY_N_FEATURES = "probeserve.n_features"
KEY_DTYPE = "probeserve.dtype"
KEY_SHAPE = "probeserve.shape"
KEY_LAYER = "probeserve.layer"

COL_ROW = "row"
COL_LABEL = "label"
COL_X = "x"

DTYPES = ("float16", "float32")
FLOAT16_MAX = 65504.0

# Columns are REQUIRED (non-nullable): no definition levels to write or read.
_WRITE_OPTIONS = {"compression": None, "use_dictionary": False, "write_statistics": False}
_CAST_BLOCK = 1 << 20  # elements cast and checked at a time, so both stay in cache


def shard_schema(n_features: int, dtype: str, metadata: dict[str, str] | None = None) -> pa.Schema:
    """The Arrow schema of a shard with `n_features` values of `dtype` per example."""
    width = n_features * np.dtype(dtype).itemsize
    fields = [
        pa.field(COL_ROW, pa.int64(), nullable=False),
        pa.field(COL_LABEL, pa.int32(), nullable=False),
        pa.field(COL_X, pa.binary(width), nullable=False),
    ]
    return pa.schema(fields, metadata=metadata)


@dataclass(frozen=True)
class ShardInfo:
    key: str  # relative to the storage root
    rows: int
    bytes: int  # size of the published file


class ShardWriter:
    """Streams (x, y) batches for one (checkpoint, layer, split) into bounded-size shards.

    A part is closed and a new one started when its blob bytes would exceed `max_bytes`
    (every part holds at least one row). Each part is written to a private staging folder
    (inside `staging_dir` when given; put it on the storage's file system and publishing a
    local part is a rename) and published as `{key_prefix}/part-{i:05d}.parquet` as soon as it
    is complete, so local disk holds at most one part. A part is published only whole: after
    `abort()` or an exception, storage may hold the parts that were already complete, never a
    truncated one. The list returned by `close()` is the authoritative set of parts; a prefix
    can also hold complete parts left by an earlier, failed attempt.

    Rows are buffered into row groups of about `row_group_bytes`, so the caller's batch size
    does not decide the file layout. Used as a context manager, it closes on success and
    aborts on an exception.
    """

    def __init__(
        self,
        storage: Storage,
        key_prefix: str,
        *,
        n_features: int,
        dtype: str,
        metadata: dict[str, str],
        max_bytes: int,
        staging_dir: str | None = None,
        row_group_bytes: int = 64 * 2**20,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
        if n_features < 1:
            raise ValueError(f"n_features must be at least 1, not {n_features}")
        if max_bytes < 1 or row_group_bytes < 1:
            raise ValueError(
                f"max_bytes and row_group_bytes must be positive ({max_bytes}, {row_group_bytes})"
            )
        self.storage = storage
        self.key_prefix = key_prefix
        self.n_features = n_features
        self.dtype = dtype
        self.metadata = _shard_metadata(metadata, n_features=n_features, dtype=dtype)
        self._schema = shard_schema(n_features, dtype, self.metadata)
        self._np_dtype = np.dtype(dtype).newbyteorder("<")
        self._width = n_features * self._np_dtype.itemsize
        row_bytes = self._width + 12  # the blob, the row number and the label
        self._rows_per_part = max(1, max_bytes // row_bytes)
        self._rows_per_group = max(1, min(row_group_bytes // row_bytes, self._rows_per_part))

        self._staging = tempfile.mkdtemp(prefix="probeserve-shards-", dir=staging_dir)
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._staging, ignore_errors=True)
        self._buf_x: np.ndarray | None = None  # one row group of rows, reused; allocated on demand
        self._buf_y: np.ndarray | None = None
        self._buffered = 0  # rows in the buffer
        self._next_row = 0  # row number of the first row not yet written to a part
        self._writer: pq.ParquetWriter | None = None
        self._part_path = ""
        self._part_rows = 0  # rows written to the open part
        self._parts: list[ShardInfo] = []
        self._state = "open"  # -> "closed" | "aborted"

    @property
    def rows_written(self) -> int:
        return self._next_row + self._buffered

    def write(self, x: Any, y: Any) -> None:
        """Append a batch: `x` [n, n_features] floats (numpy or torch), `y` [n] integer labels.

        Whole row groups are written straight from the batch; the rest is copied into a
        row-group buffer, so the caller may reuse its arrays as soon as this returns.
        """
        if self._state != "open":
            raise ValueError(f"write() on a {self._state} ShardWriter")
        x = _as_rows(x, self.n_features, self._np_dtype, self.metadata.get(KEY_LAYER))
        y = _as_labels(y, len(x))
        group = self._rows_per_group
        start = 0
        while start < len(x):
            fits = min(self._rows_per_part - self._part_rows - self._buffered, len(x) - start)
            if self._buffered == 0 and fits >= group:
                n = fits - fits % group
                self._write_rows(x[start : start + n], y[start : start + n])
            else:
                n = min(fits, group - self._buffered)
                self._buffer(x[start : start + n], y[start : start + n])
                if self._buffered == group:
                    self._write_buffer()
            start += n
            if self._part_rows + self._buffered == self._rows_per_part:
                self._write_buffer()
                self._finish_part()

    def close(self) -> list[ShardInfo]:
        """Write what is buffered, publish the last part and return every part, in order.

        A writer that received no rows publishes nothing and returns [].
        """
        if self._state == "closed":
            return list(self._parts)
        if self._state != "open":
            raise ValueError("close() on an aborted ShardWriter")
        try:
            self._write_buffer()
            if self._writer is not None:
                self._finish_part()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._buf_x = self._buf_y = None
        self._cleanup()
        return list(self._parts)

    def abort(self) -> None:
        """Discard buffered rows and the unfinished part; parts already published stay."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._buf_x = self._buf_y = None
        if self._writer is not None:
            with contextlib.suppress(Exception):  # the part is discarded; keep the original error
                self._writer.close()
            self._writer = None
        self._cleanup()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _buffer(self, x: np.ndarray, y: np.ndarray) -> None:
        if self._buf_x is None or self._buf_y is None:
            self._buf_x = np.empty((self._rows_per_group, self.n_features), self._np_dtype)
            self._buf_y = np.empty(self._rows_per_group, np.int32)
        self._buf_x[self._buffered : self._buffered + len(x)] = x
        self._buf_y[self._buffered : self._buffered + len(y)] = y
        self._buffered += len(x)

    def _write_buffer(self) -> None:
        if self._buffered and self._buf_x is not None and self._buf_y is not None:
            n, self._buffered = self._buffered, 0
            self._write_rows(self._buf_x[:n], self._buf_y[:n])

    def _write_rows(self, x: np.ndarray, y: np.ndarray) -> None:
        """Write rows to the open part (opening one if needed) as row groups of the set size.

        pyarrow encodes them into its own pages before returning, so `x` may be reused after.
        """
        if self._writer is None:
            self._part_path = os.path.join(self._staging, f"part-{len(self._parts):05d}.parquet")
            self._writer = pq.ParquetWriter(self._part_path, self._schema, **_WRITE_OPTIONS)
        n = len(x)
        blob = pa.FixedSizeBinaryArray.from_buffers(
            self._schema.field(COL_X).type, n, [None, pa.py_buffer(x)]
        )
        rows = pa.array(np.arange(self._next_row, self._next_row + n, dtype=np.int64))
        table = pa.Table.from_arrays([rows, pa.array(y), blob], schema=self._schema)
        self._writer.write_table(table, row_group_size=self._rows_per_group)
        self._next_row += n
        self._part_rows += n

    def _finish_part(self) -> None:
        assert self._writer is not None and self._part_rows > 0
        self._writer.close()
        self._writer = None
        key = join(self.key_prefix, f"part-{len(self._parts):05d}.parquet")
        size = os.path.getsize(self._part_path)
        self.storage.publish_file(key, self._part_path)
        self._parts.append(ShardInfo(key, self._part_rows, size))
        self._part_rows = 0
        if os.path.exists(self._part_path):  # publish_file moves or copies it
            os.unlink(self._part_path)


def _shard_metadata(metadata: dict[str, str], *, n_features: int, dtype: str) -> dict[str, str]:
    own = {KEY_FORMAT_VERSION: str(FORMAT_VERSION), KEY_N_FEATURES: str(n_features), KEY_DTYPE: dtype}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"shard metadata must map str to str; got {key!r}: {type(value).__name__}")
        if key in own and value != own[key]:
            raise ValueError(f"metadata[{key!r}] is {value!r} but the writer was given {own[key]!r}")
    if KEY_SHAPE in metadata:
        shape = json.loads(metadata[KEY_SHAPE])
        if math.prod(shape) != n_features:
            raise ValueError(
                f"metadata shape {shape} holds {math.prod(shape)} values, not n_features={n_features}"
            )
    return {**metadata, **own}


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _as_rows(x: Any, n_features: int, dtype: np.dtype, layer: str | None) -> np.ndarray:
    """`x` as a C-contiguous little-endian [n, n_features] array of `dtype` (a view when it is one)."""
    if _is_torch(x):
        if x.dim() != 2 or x.shape[1] != n_features:
            raise ValueError(f"x must have shape [n, {n_features}], not {list(x.shape)}")
        return _cast_torch(x.detach(), dtype, layer)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise ValueError(f"x must have shape [n, {n_features}], not {list(x.shape)}")
    if x.dtype == dtype and x.flags.c_contiguous:
        return x
    if x.dtype.kind != "f":
        raise ValueError(f"x must hold floating-point values, not {x.dtype}")
    if dtype.itemsize == 2 and x.dtype.itemsize > 2:  # narrowing: cast and check in torch, ~5x faster
        import torch

        native = np.float64 if x.dtype.itemsize > 8 else x.dtype.newbyteorder("=")
        return _cast_torch(torch.from_numpy(np.ascontiguousarray(x, dtype=native)), dtype, layer)
    return np.ascontiguousarray(x, dtype=dtype)  # widening, or float64 -> float32 (not checked)


def _cast_torch(t: Any, dtype: np.dtype, layer: str | None) -> np.ndarray:
    import torch

    target = {"float16": torch.float16, "float32": torch.float32}[dtype.name]
    if not t.is_floating_point():
        raise ValueError(f"x must hold floating-point values, not {t.dtype}")
    if t.dtype == target:
        out = t.contiguous().cpu()
    elif t.device.type != "cpu" or target != torch.float16:
        out = t.to(target).contiguous()
        if target == torch.float16:
            _check_float16(t, out, layer)
        out = out.cpu()
    else:  # block by block, so the overflow check reads each block while it is in cache
        src = t.contiguous().view(-1)
        out = torch.empty(t.shape, dtype=target)
        flat = out.view(-1)
        for start in range(0, src.numel(), _CAST_BLOCK):
            block = flat[start : start + _CAST_BLOCK]
            block.copy_(src[start : start + _CAST_BLOCK])
            _check_float16(src[start : start + _CAST_BLOCK], block, layer)
    arr = out.numpy()
    return arr if sys.byteorder == "little" else arr.astype(dtype)


def _check_float16(src: Any, out: Any, layer: str | None) -> None:
    """Raise if casting `src` to float16 turned a finite value into inf (NaN passes through)."""
    peak = out.abs().max().item() if out.numel() else 0.0
    if peak <= FLOAT16_MAX:  # false for NaN: then look closer
        return
    import torch

    overflowed = torch.isinf(out) & torch.isfinite(src)
    if bool(overflowed.any()):
        where = f"layer {layer!r}: " if layer else ""
        worst = src[overflowed].abs().max().item()
        raise LayerError(
            f"{where}activation values overflow float16 (|x| up to {worst:.4g}, float16 max is 65504); "
            "set `output.dtype: float32` in the spec"
        )


def _as_labels(y: Any, n: int) -> np.ndarray:
    y = y.detach().cpu().numpy() if _is_torch(y) else np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"y must have shape [{n}] to match x, not {list(y.shape)}")
    if y.dtype.kind not in "iub":
        raise ValueError(f"labels must be integers, not {y.dtype}")
    if y.dtype != np.int32:
        if n and (y.min() < np.iinfo(np.int32).min or y.max() > np.iinfo(np.int32).max):
            raise ValueError("labels must fit in int32")
        y = y.astype(np.int32)
    return np.ascontiguousarray(y)


@dataclass
class Shard:
    x: np.ndarray  # [rows, n_features], float16 or float32
    y: np.ndarray  # [rows] int32 labels
    rows: np.ndarray  # [rows] int64 row numbers within the split
    metadata: dict[str, str]


class _ShardFile:
    """An open shard, read one row group at a time."""

    def __init__(self, source: bytes | str, name: str = "") -> None:
        self.name = name or (source if isinstance(source, str) else "shard")
        try:
            if isinstance(source, str):  # decoding from mapped pages saves a copy: ~2x faster here
                self.file = pq.ParquetFile(source, memory_map=True)
            else:
                self.file = pq.ParquetFile(pa.BufferReader(source))
        except FileNotFoundError:
            raise StorageError(f"{self.name}: no such file") from None
        except (pa.ArrowException, OSError) as e:
            raise StorageError(f"{self.name}: not a readable Parquet file ({e})") from None
        self.metadata = _decode_metadata(self.file.metadata.metadata)
        version = self.metadata.get(KEY_FORMAT_VERSION)
        if version is None:
            raise StorageError(f"{self.name}: not a probeserve shard (no {KEY_FORMAT_VERSION} metadata)")
        if version != str(FORMAT_VERSION):
            raise StorageError(
                f"{self.name}: shard format version {version}, this probeserve reads version {FORMAT_VERSION}"
            )
        self.n_features = int(self.metadata[KEY_N_FEATURES])
        self.dtype = np.dtype(self.metadata[KEY_DTYPE]).newbyteorder("<")
        self.num_rows = self.file.metadata.num_rows

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, rows) of the whole shard. pyarrow decodes all row groups of a fixed-size
        column into one array, so x is normally a view of it, not a second copy."""
        return self._arrays(self.file.read(columns=[COL_ROW, COL_LABEL, COL_X]))

    def row_groups(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(x, y, rows) of each row group in turn, so only one is decoded at a time."""
        for i in range(self.file.num_row_groups):
            yield self._arrays(self.file.read_row_group(i, columns=[COL_ROW, COL_LABEL, COL_X]))

    def _arrays(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        width = self.n_features * self.dtype.itemsize
        column = table.column(COL_X)
        if column.type != pa.binary(width) or column.null_count:
            raise StorageError(
                f"{self.name}: x column does not hold n_features={self.n_features} {self.dtype}"
            )
        chunks = column.chunks
        if len(chunks) == 1:
            x = _blobs(chunks[0], self.dtype, self.n_features)
        else:  # several chunks (or none): one copy into a contiguous array
            x = np.empty((len(table), self.n_features), self.dtype)
            np.concatenate([_blobs(c, self.dtype, self.n_features) for c in chunks] or [x], out=x)
        return x, table.column(COL_LABEL).to_numpy(), table.column(COL_ROW).to_numpy()


def _blobs(chunk: pa.FixedSizeBinaryArray, dtype: np.dtype, n_features: int) -> np.ndarray:
    count = len(chunk) * n_features
    offset = chunk.offset * n_features * dtype.itemsize
    return np.frombuffer(chunk.buffers()[1], dtype, count=count, offset=offset).reshape(-1, n_features)


def _decode_metadata(raw: dict[bytes, bytes] | None) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (raw or {}).items() if not k.startswith(b"ARROW:")}


def read_shard(source: bytes | str) -> Shard:
    """A whole shard from its bytes or a local file path (read through a memory map).

    `x` is normally a view of the buffer pyarrow decoded into, with no further copy."""
    shard = _ShardFile(source)
    x, y, rows = shard.read()
    return Shard(x=x, y=y, rows=rows, metadata=shard.metadata)


def read_metadata(source: bytes | str) -> dict[str, str]:
    """The key/value metadata of a shard (without pyarrow's own `ARROW:` keys)."""
    return _ShardFile(source).metadata


def table_x(table: pa.Table) -> np.ndarray:
    """The [rows, n_features] activations of a shard read with plain `pyarrow.parquet`."""
    meta = _decode_metadata(table.schema.metadata)
    dtype = np.dtype(meta[KEY_DTYPE]).newbyteorder("<")
    return _blobs(table.column(COL_X).combine_chunks(), dtype, int(meta[KEY_N_FEATURES]))


def iter_chunks(
    storage: Storage, keys: list[str], *, batch_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream the shards at `keys` in order as (x, y) chunks of `batch_rows` rows (the last
    may be shorter), holding one shard's bytes and one decoded row group in memory. Chunks do not depend on how the rows
    were split into parts; a chunk that spans two row groups is a copy, the others are views."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, not {batch_rows}")
    carry_x: list[np.ndarray] = []
    carry_y: list[np.ndarray] = []
    carried = 0
    layout = None
    for key in keys:
        # a local object is read in place through a memory map; others are fetched whole
        source = storage.uri_for(key) if isinstance(storage, LocalStorage) else storage.read_bytes(key)
        shard = _ShardFile(source, name=storage.uri_for(key))
        if layout is None:
            layout = (shard.n_features, shard.dtype)
        elif (shard.n_features, shard.dtype) != layout:
            raise StorageError(
                f"{shard.name}: {shard.n_features} x {shard.dtype}, earlier shards are {layout}"
            )
        for x, y, _ in shard.row_groups():
            start = 0
            if carried:  # complete the chunk begun in the previous row group
                start = min(batch_rows - carried, len(x))
                carry_x.append(x[:start])
                carry_y.append(y[:start])
                carried += start
                if carried < batch_rows:
                    continue
                yield np.concatenate(carry_x), np.concatenate(carry_y)
                carry_x, carry_y, carried = [], [], 0
            while len(x) - start >= batch_rows:
                yield x[start : start + batch_rows], y[start : start + batch_rows]
                start += batch_rows
            if start < len(x):
                carry_x, carry_y, carried = [x[start:]], [y[start:]], len(x) - start
    if carried:
        yield np.concatenate(carry_x), np.concatenate(carry_y)
