"""Activation shards: the Parquet files that hold one (checkpoint, layer, split) of examples.

Activations are extracted once and read many times (one probe per layer and seed), so the
format is chosen for fast, simple streaming rather than for analytics:

- One Parquet file per shard ("part"), uncompressed, with no dictionary and no statistics.
  Activations do not compress, and statistics on a blob column mean nothing.
- Three REQUIRED columns: `row` (int64, the example's index within its split), `label`
  (int32) and `x`, a `fixed_size_binary(n_features * itemsize)` holding the example's reduced
  activation vector as raw little-endian float16 or float32 bytes. Parquet then handles one
  value per example; a `FixedSizeList<float16>` column is about 10x slower to write and read,
  because every float becomes a separate value with its own levels.
- File-level key/value metadata, all strings, keys prefixed `probeserve.`: `format_version`
  ("1"), `layer`, `layer_index`, `shape` (JSON list, the per-example shape after reduction),
  `n_features`, `dtype`, `reducer` (JSON), `checkpoint`, `step`, `split`, `spec_hash`, `run`,
  plus whatever the caller adds. The writer sets `format_version`, `n_features` and `dtype`
  itself; the caller supplies the rest.

The files are written by a small Parquet writer of our own rather than by pyarrow, which
copies every byte two or three times on the way to the file and so wrote at about 0.3x the
speed of a plain file write (jobs/benchmarks/bench_shards.py measures both). For REQUIRED
columns with PLAIN encoding and no compression, a column's data page is just its values as
a little-endian buffer, so each row group is written as:

- `x`: one data page whose values are the caller's array bytes, written as they arrive with
  no copy; its page header (whose sizes are only known when the group ends) goes into room
  left in front of them, so a few unused zero bytes precede it;
- `row` and `label`: one data page each, written when the row group ends;

followed by the usual footer (Thrift compact `FileMetaData`, its length, `PAR1`). Every page
starts its values at a multiple of 64 bytes. Parquet locates pages through the footer's
offsets, so the order of the column chunks in the file and the unused bytes between them are
invisible to readers: pyarrow, pandas and DuckDB read these files like any other.

`read_shard` and `iter_chunks` read our own files (footer `created_by` "probeserve") by
locating each page from the footer and viewing its values in place, in a memory map of a local
file or in the bytes of a fetched one: no decoding and no copy. Other Parquet files with the
shard schema and metadata (for example written by pyarrow) are decoded through pyarrow.

Plain pyarrow or pandas users can read a shard without probeserve::

    table = pyarrow.parquet.read_table("part-00000.parquet")
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    dtype = numpy.dtype(meta["probeserve.dtype"]).newbyteorder("<")
    x = numpy.frombuffer(table.column("x").combine_chunks().buffers()[1], dtype)
    x = x.reshape(-1, int(meta["probeserve.n_features"]))

    df = pandas.read_parquet("part-00000.parquet")  # the x column holds `bytes` objects
    x = numpy.frombuffer(b"".join(df["x"]), dtype).reshape(len(df), -1)

(`table_x` does the first for you.) Parts are written to a local staging file and published
only once closed, so no reader ever sees a part without its footer.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import queue
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from probeserve.errors import LayerError, StorageError
from probeserve.staging import StagingDir
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

CREATED_BY = "probeserve"  # the footer's `created_by`: our reader views the pages of these files in place
_CAST_BLOCK = 1 << 20  # elements cast and checked at a time, so both stay in cache
_ROW_BLOCK = 1 << 20  # row numbers generated and written at a time
_MAX_GROUP_BYTES = 2**30  # Parquet page sizes are int32; one page per column chunk stays below
_ALIGN = 64  # page values start at a multiple of this, so arrays viewed in place are aligned


def shard_schema(n_features: int, dtype: str, metadata: dict[str, str] | None = None) -> pa.Schema:
    """The Arrow schema of a shard with `n_features` values of `dtype` per example."""
    width = n_features * np.dtype(dtype).itemsize
    fields = [
        pa.field(COL_ROW, pa.int64(), nullable=False),
        pa.field(COL_LABEL, pa.int32(), nullable=False),
        pa.field(COL_X, pa.binary(width), nullable=False),
    ]
    return pa.schema(fields, metadata=metadata)


# ----------------------------------------------------------------------------------------------
# Parquet, the little we write: parquet-format's parquet.thrift in the Thrift compact protocol

_MAGIC = b"PAR1"
# Thrift compact type ids
_T_I32, _T_I64, _T_BINARY, _T_LIST, _T_STRUCT = 5, 6, 8, 9, 12
# parquet.thrift enums
_INT32, _INT64, _FIXED_LEN_BYTE_ARRAY = 1, 2, 7  # Type
_REQUIRED = 0  # FieldRepetitionType
_PLAIN, _RLE = 0, 3  # Encoding
_UNCOMPRESSED = 0  # CompressionCodec
_DATA_PAGE = 0  # PageType

# A struct is a list of (field id, Thrift type, value) in increasing field id order; a list
# value is (element type, items); a struct value is another such list.
_Struct = list[tuple[int, int, Any]]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _zigzag(n: int) -> int:
    return n << 1 if n >= 0 else (-n << 1) - 1


def _encode_value(kind: int, value: Any) -> bytes:
    if kind in (_T_I32, _T_I64):
        return _varint(_zigzag(value))
    if kind == _T_BINARY:
        data = value.encode() if isinstance(value, str) else bytes(value)
        return _varint(len(data)) + data
    if kind == _T_STRUCT:
        return _encode_struct(value)
    assert kind == _T_LIST, kind
    item_kind, items = value
    head = bytes([len(items) << 4 | item_kind]) if len(items) < 15 else bytes([0xF0 | item_kind])
    size = _varint(len(items)) if len(items) >= 15 else b""
    return head + size + b"".join(_encode_value(item_kind, item) for item in items)


def _encode_struct(fields: _Struct) -> bytes:
    out = bytearray()
    last = 0
    for field_id, kind, value in fields:
        delta = field_id - last
        assert delta > 0, "fields must be in increasing id order"
        out += bytes([delta << 4 | kind]) if delta <= 15 else bytes([kind]) + _varint(_zigzag(field_id))
        out += _encode_value(kind, value)
        last = field_id
    out.append(0)  # stop
    return bytes(out)


def _decode_struct(buf: Any, pos: int) -> tuple[dict[int, Any], int]:
    """A Thrift compact struct at `buf[pos:]` as {field id: value}, and the position after it.

    Values are ints, bytes, lists and nested dicts; fields of a type that parquet.thrift does
    not use raise ValueError, as does a struct that runs past the end (IndexError)."""
    fields: dict[int, Any] = {}
    last = 0
    while True:
        byte = buf[pos]
        pos += 1
        if byte == 0:
            return fields, pos
        kind, delta = byte & 0x0F, byte >> 4
        if delta:
            field_id = last + delta
        else:
            raw, pos = _decode_varint(buf, pos)
            field_id = raw >> 1 ^ -(raw & 1)
        if kind in (1, 2):  # a bool field carries its value in its type
            fields[field_id] = kind == 1
        else:
            fields[field_id], pos = _decode_value(buf, pos, kind)
        last = field_id


def _decode_varint(buf: Any, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _decode_value(buf: Any, pos: int, kind: int) -> tuple[Any, int]:
    if kind in (4, _T_I32, _T_I64):  # i16, i32, i64: zigzag varints
        raw, pos = _decode_varint(buf, pos)
        return raw >> 1 ^ -(raw & 1), pos
    if kind == 3:  # byte
        return buf[pos], pos + 1
    if kind == _T_BINARY:
        size, pos = _decode_varint(buf, pos)
        if pos + size > len(buf):
            raise IndexError("binary runs past the end")
        return bytes(buf[pos : pos + size]), pos + size
    if kind == _T_STRUCT:
        return _decode_struct(buf, pos)
    if kind in (_T_LIST, 10):  # list, set
        head = buf[pos]
        pos += 1
        size, item_kind = head >> 4, head & 0x0F
        if size == 15:
            size, pos = _decode_varint(buf, pos)
        items = []
        for _ in range(size):
            if item_kind in (1, 2):  # bools in a list are one byte each
                item, pos = buf[pos] == 1, pos + 1
            else:
                item, pos = _decode_value(buf, pos, item_kind)
            items.append(item)
        return items, pos
    raise ValueError(f"Thrift compact type {kind} does not occur in Parquet metadata")


def _page_header(num_values: int, nbytes: int) -> bytes:
    """The header of a v1 data page of `num_values` PLAIN values, uncompressed, no levels."""
    data_page = [(1, _T_I32, num_values), (2, _T_I32, _PLAIN), (3, _T_I32, _RLE), (4, _T_I32, _RLE)]
    return _encode_struct(
        [(1, _T_I32, _DATA_PAGE), (2, _T_I32, nbytes), (3, _T_I32, nbytes), (5, _T_STRUCT, data_page)]
    )


_MAX_PAGE_HEADER = len(_page_header(2**31 - 1, 2**31 - 1))
# (name, Parquet type, bytes per value or None for x) of the columns, in schema order
_COLUMNS = ((COL_ROW, _INT64, 8), (COL_LABEL, _INT32, 4), (COL_X, _FIXED_LEN_BYTE_ARRAY, None))


@dataclass(frozen=True)
class _Chunk:
    """Where one column chunk (a single page) of a row group lies in the file."""

    offset: int  # of the page header
    size: int  # page header and values


def _file_metadata(width: int, groups: list[tuple[int, list[_Chunk]]], metadata: dict[str, str]) -> bytes:
    """The footer (`FileMetaData`) of a part with `groups` of (rows, chunks in schema order)."""
    schema: list[_Struct] = [[(4, _T_BINARY, "schema"), (5, _T_I32, len(_COLUMNS))]]
    for name, kind, _ in _COLUMNS:
        length = [(2, _T_I32, width)] if kind == _FIXED_LEN_BYTE_ARRAY else []
        schema.append([(1, _T_I32, kind), *length, (3, _T_I32, _REQUIRED), (4, _T_BINARY, name)])
    row_groups: list[_Struct] = []
    for rows, chunks in groups:
        columns: list[_Struct] = []
        for (name, kind, _), chunk in zip(_COLUMNS, chunks, strict=True):
            meta = [
                (1, _T_I32, kind),
                (2, _T_LIST, (_T_I32, [_PLAIN, _RLE])),  # RLE: the (empty) levels' declared encoding
                (3, _T_LIST, (_T_BINARY, [name])),
                (4, _T_I32, _UNCOMPRESSED),
                (5, _T_I64, rows),
                (6, _T_I64, chunk.size),
                (7, _T_I64, chunk.size),
                (9, _T_I64, chunk.offset),
            ]
            columns.append([(2, _T_I64, 0), (3, _T_STRUCT, meta)])  # 2: deprecated, 0 in new files
        size = sum(c.size for c in chunks)
        row_groups.append(
            [
                (1, _T_LIST, (_T_STRUCT, columns)),
                (2, _T_I64, size),
                (3, _T_I64, rows),
                (5, _T_I64, min(c.offset for c in chunks)),
                (6, _T_I64, size),
            ]
        )
    key_values: list[_Struct] = [[(1, _T_BINARY, k), (2, _T_BINARY, v)] for k, v in metadata.items()]
    return _encode_struct(
        [
            (1, _T_I32, 1),
            (2, _T_LIST, (_T_STRUCT, schema)),
            (3, _T_I64, sum(rows for rows, _ in groups)),
            (4, _T_LIST, (_T_STRUCT, row_groups)),
            (5, _T_LIST, (_T_STRUCT, key_values)),
            (6, _T_BINARY, CREATED_BY),
        ]
    )


def _write_page(f: BinaryIO, num_values: int, nbytes: int, values: Iterable[np.ndarray]) -> _Chunk:
    """Append a data page holding `values` (`nbytes` in all), its values aligned; where it is."""
    header = _page_header(num_values, nbytes)
    start = f.tell()
    pad = -(start + len(header)) % _ALIGN
    f.write(bytes(pad))
    f.write(header)
    for block in values:
        f.write(block.data.cast("B"))
    return _Chunk(start + pad, len(header) + nbytes)


# ----------------------------------------------------------------------------------------------
# Writing


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

    Activations go to the staging file as they arrive, straight from the caller's (cast)
    array; only the labels of the open row group are held in memory. Rows form row groups of
    about `row_group_bytes` (at most 1 GiB, the limit of one Parquet page), so the caller's
    batch size does not decide the file layout. The default makes a part of up to 1 GiB a
    single row group, which `read_shard` views in place without a copy; Parquet's own guidance
    is row groups of 512 MiB to 1 GiB. Used as a context manager, it closes on success and
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
        row_group_bytes: int = 2**30,
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
        self._np_dtype = np.dtype(dtype).newbyteorder("<")
        self._width = n_features * self._np_dtype.itemsize
        if self._width > _MAX_GROUP_BYTES:
            raise ValueError(
                f"one example of {n_features} {dtype} values is {self._width} bytes, over the "
                f"{_MAX_GROUP_BYTES} bytes a shard page holds; reduce the layer's activations further"
            )
        row_bytes = self._width + 12  # the blob, the row number and the label
        self._rows_per_part = max(1, max_bytes // row_bytes)
        group_bytes = min(row_group_bytes, _MAX_GROUP_BYTES)
        self._rows_per_group = max(1, min(group_bytes // row_bytes, self._rows_per_part))

        # named and locked so that a later run can tell it from a live writer's (staging.py)
        self._staging_dir = StagingDir(staging_dir)
        self._staging = self._staging_dir.path
        self._cleanup = self._staging_dir.remove
        self._file: BinaryIO | None = None  # the open part's staging file
        self._part_path = ""
        self._groups: list[tuple[int, list[_Chunk]]] = []  # the open part's finished row groups
        self._part_rows = 0  # rows in those row groups
        self._group_rows = 0  # rows in the open row group, whose x values are in the file
        self._x_start = 0  # file offset of the open row group's first x value
        self._labels: np.ndarray | None = None  # the open row group's labels; allocated on demand
        self._next_row = 0  # row number of the next row
        self._parts: list[ShardInfo] = []
        self._state = "open"  # -> "closed" | "aborted"

    @property
    def rows_written(self) -> int:
        return self._next_row

    def write(self, x: Any, y: Any) -> None:
        """Append a batch: `x` [n, n_features] floats (numpy or torch), `y` [n] integer labels.

        The rows are in the staging file (or the writer's copy of the labels) when this
        returns, so the caller may reuse its arrays. An error while writing aborts the writer;
        invalid input is refused before anything is written, and the writer stays open.
        """
        if self._state != "open":
            raise ValueError(f"write() on a {self._state} ShardWriter")
        x = _as_rows(x, self.n_features, self._np_dtype, self.metadata.get(KEY_LAYER))
        y = _as_labels(y, len(x))
        try:
            start = 0
            while start < len(x):
                if self._group_rows == 0:
                    self._start_group()
                assert self._file is not None and self._labels is not None
                room = min(
                    self._rows_per_group - self._group_rows,
                    self._rows_per_part - self._part_rows - self._group_rows,
                )
                n = min(room, len(x) - start)
                self._file.write(x[start : start + n].data.cast("B"))
                self._labels[self._group_rows : self._group_rows + n] = y[start : start + n]
                self._group_rows += n
                self._next_row += n
                start += n
                if n == room:
                    self._finish_group()
                    if self._part_rows == self._rows_per_part:
                        self._finish_part()
        except BaseException:
            self.abort()  # the open part may be inconsistent; it is never published
            raise

    def close(self) -> list[ShardInfo]:
        """Write what is buffered, publish the last part and return every part, in order.

        A writer that received no rows publishes nothing and returns [].
        """
        if self._state == "closed":
            return list(self._parts)
        if self._state != "open":
            raise ValueError("close() on an aborted ShardWriter")
        try:
            if self._group_rows:
                self._finish_group()
            if self._file is not None:
                self._finish_part()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._labels = None
        self._cleanup()
        return list(self._parts)

    def abort(self) -> None:
        """Discard the unfinished part; parts already published stay."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._labels = None
        if self._file is not None:
            with contextlib.suppress(Exception):  # the part is discarded; keep the original error
                self._file.close()
            self._file = None
        self._cleanup()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _start_group(self) -> None:
        """Open a part if none is open, and leave room for the x page header of a new row group."""
        if self._file is None:
            self._part_path = os.path.join(self._staging, f"part-{len(self._parts):05d}.parquet")
            self._file = open(self._part_path, "wb")  # closed by _finish_part or abort
            self._file.write(_MAGIC)
            self._groups = []
        if self._labels is None:
            self._labels = np.empty(self._rows_per_group, "<i4")
        start = self._file.tell()
        self._x_start = start + _MAX_PAGE_HEADER + (-(start + _MAX_PAGE_HEADER) % _ALIGN)
        self._file.write(bytes(self._x_start - start))

    def _finish_group(self) -> None:
        """Put the x page header in front of the x values, then write the row and label pages."""
        f, n = self._file, self._group_rows
        assert f is not None and self._labels is not None and n > 0
        header = _page_header(n, n * self._width)
        x_chunk = _Chunk(self._x_start - len(header), len(header) + n * self._width)
        end = f.tell()
        assert end == self._x_start + n * self._width
        f.seek(x_chunk.offset)
        f.write(header)
        f.seek(end)
        first = self._next_row - n
        row_blocks = (
            np.arange(first + s, first + min(s + _ROW_BLOCK, n), dtype="<i8") for s in range(0, n, _ROW_BLOCK)
        )
        row_chunk = _write_page(f, n, 8 * n, row_blocks)
        label_chunk = _write_page(f, n, 4 * n, [self._labels[:n]])
        self._groups.append((n, [row_chunk, label_chunk, x_chunk]))
        self._part_rows += n
        self._group_rows = 0

    def _finish_part(self) -> None:
        assert self._file is not None and self._part_rows > 0 and self._group_rows == 0
        footer = _file_metadata(self._width, self._groups, self.metadata)
        self._file.write(footer)
        self._file.write(struct.pack("<I", len(footer)))
        self._file.write(_MAGIC)
        self._file.close()
        self._file = None
        key = join(self.key_prefix, f"part-{len(self._parts):05d}.parquet")
        size = os.path.getsize(self._part_path)
        self.storage.publish_file(key, self._part_path)
        self._parts.append(ShardInfo(key, self._part_rows, size))
        self._part_rows = 0
        if os.path.exists(self._part_path):  # publish_file moves or copies it
            os.unlink(self._part_path)


class WriteQueue:
    """Shard writes of several layers, run in order on one background thread behind a bound.

    Extraction puts each batch's writes here and goes on with the next batch's forward pass,
    so writing to disk and uploading a finished part to S3 overlap the model's work. At most
    `max_batches` batches wait unwritten: when storage is slower than the forward pass, `put`
    blocks, so memory stays bounded and the model runs at the speed storage takes. Jobs run
    one at a time in the order they were put, so each layer's writer sees its batches in
    order. A job that raises fails its layer alone: the exception is kept in
    `failures[layer]` and the layer's later jobs are skipped (each job cleans up after itself,
    for instance aborts its writer). With `threaded=False` each job runs inside `put`, with
    the same semantics and no thread.

    Used as a context manager, it waits for every job on success and drops the jobs not yet
    run on an exception.
    """

    def __init__(self, *, max_batches: int = 2, threaded: bool = True) -> None:
        if max_batches < 1:
            raise ValueError(f"max_batches must be at least 1, not {max_batches}")
        self.failures: dict[str, BaseException] = {}
        self._slots = threading.Semaphore(max_batches)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._discard = False
        if threaded:
            self._thread = threading.Thread(target=self._run, name="probeserve-shard-writes", daemon=True)
            self._thread.start()

    def put(self, jobs: list[tuple[str, Callable[[], Any]]], ready: Callable[[], Any] | None = None) -> None:
        """Queue one batch: `ready()` (for instance: wait for its device-to-host copies), then
        each `(layer, job)`; waits while `max_batches` batches are still unwritten."""
        if self._thread is None:
            self._execute(jobs, ready)
            return
        if not self._thread.is_alive():
            raise RuntimeError("the shard writing thread has stopped")
        self._slots.acquire()
        self._jobs.put((jobs, ready))

    def drain(self) -> None:
        """Wait until every job put so far has run."""
        if self._thread is None:
            return
        done = threading.Event()
        self.put([], done.set)
        while not done.wait(1.0):
            if not self._thread.is_alive():
                raise RuntimeError("the shard writing thread has stopped")

    def close(self, *, discard: bool = False) -> None:
        """Stop the thread: after every queued job (or, with `discard`, the one running)."""
        if self._thread is None:
            return
        self._discard = discard
        self._jobs.put(None)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> WriteQueue:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(discard=exc_type is not None)

    def _execute(self, jobs: list[tuple[str, Callable[[], Any]]], ready: Callable[[], Any] | None) -> None:
        if ready is not None:
            try:
                ready()
            except Exception as e:  # the batch's data never arrived: every layer in it fails
                for layer, _ in jobs:
                    self.failures.setdefault(layer, e)
                return
        for layer, job in jobs:
            if layer in self.failures:
                continue
            try:
                job()
            except Exception as e:
                self.failures[layer] = e

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            try:
                if not self._discard:
                    self._execute(*item)
            finally:
                self._slots.release()


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
    arr = cast_rows(t, dtype.name, layer).cpu().numpy()
    return arr if sys.byteorder == "little" else arr.astype(dtype)


def cast_rows(t: Any, dtype: str, layer: str | None = None) -> Any:
    """A torch tensor as a contiguous tensor of the shard dtype ("float16" or "float32"), on
    its own device; a float16 cast that would turn a finite value into inf raises LayerError.

    Extraction calls this inside the capture hooks, so that what a `ShardWriter` gets needs
    no further copy; the writer calls it too, for whatever else it is given.
    """
    import torch

    target = {"float16": torch.float16, "float32": torch.float32}[dtype]
    if not t.is_floating_point():
        raise ValueError(f"x must hold floating-point values, not {t.dtype}")
    if t.dtype == target:
        return t.contiguous()
    if t.device.type != "cpu" or target != torch.float16:
        out = t.to(target).contiguous()
        if target == torch.float16:
            _check_float16(t, out, layer)
        return out
    # block by block, so the overflow check reads each block while it is in cache
    src = t.contiguous().view(-1)
    out = torch.empty(t.shape, dtype=target)
    flat = out.view(-1)
    for start in range(0, src.numel(), _CAST_BLOCK):
        block = flat[start : start + _CAST_BLOCK]
        block.copy_(src[start : start + _CAST_BLOCK])
        _check_float16(src[start : start + _CAST_BLOCK], block, layer)
    return out


def float16_overflow(src: Any, out: Any) -> Any:
    """A 0-d tensor on `src`'s device: the largest |value| of `src` whose float16 cast `out`
    became inf while it was finite (0 if none). No synchronisation: on a GPU, extraction
    computes it inside the hook and reads the values of all layers once per batch, together
    with the batch's rows (`overflow_error`), instead of waiting on the device per layer."""
    import torch

    if not out.numel():
        return torch.zeros((), device=src.device)
    bad = torch.isinf(out) & torch.isfinite(src)
    return torch.where(bad, src.abs(), 0).amax().float()


def overflow_error(layer: str | None, worst: float) -> LayerError:
    """The error for a layer whose values reached |x| = `worst` past float16's range."""
    where = f"layer {layer!r}: " if layer else ""
    return LayerError(
        f"{where}activation values overflow float16 (|x| up to {worst:.4g}, float16 max is 65504); "
        "set `output.dtype: float32` in the spec"
    )


def _check_float16(src: Any, out: Any, layer: str | None) -> None:
    """Raise if casting `src` to float16 turned a finite value into inf (NaN passes through)."""
    import torch

    if not out.numel():
        return
    low, high = torch.aminmax(out)  # one pass, no temporary
    if -low.item() <= FLOAT16_MAX and high.item() <= FLOAT16_MAX:  # false for NaN: then look closer
        return

    overflowed = torch.isinf(out) & torch.isfinite(src)
    if bool(overflowed.any()):
        raise overflow_error(layer, src[overflowed].abs().max().item())


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


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass
class Shard:
    x: np.ndarray  # [rows, n_features], float16 or float32
    y: np.ndarray  # [rows] int32 labels
    rows: np.ndarray  # [rows] int64 row numbers within the split
    metadata: dict[str, str]


class _ShardFile:
    """An open shard, read one row group at a time.

    Our own files are read in place: each page's values are viewed where they lie, in a
    read-only memory map of a local file or in the bytes given. The arrays keep the map alive;
    it is unmapped when the last of them goes. Mapping is safe because a published shard is
    never changed in place (storage replaces a file by renaming a new one over it). Any other
    Parquet file is decoded by pyarrow.
    """

    def __init__(self, source: bytes | str, name: str = "") -> None:
        self.name = name or (source if isinstance(source, str) else "shard")
        try:
            if isinstance(source, str):
                with open(source, "rb") as f:
                    self.data: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            else:
                self.data = source
            # Read on this thread alone (no pre-buffering on pyarrow's IO threads, no decoding
            # threads below): a pyarrow thread must never drop the last reference to a source
            # that wraps a Python object (results.arrow_owned says why). Our own shards are
            # viewed in place, so the bytes are not copied into Arrow-owned memory here.
            self.file = pq.ParquetFile(pa.BufferReader(pa.py_buffer(self.data)), pre_buffer=False)
        except FileNotFoundError:
            raise StorageError(f"{self.name}: no such file") from None
        except (pa.ArrowException, OSError, ValueError) as e:  # ValueError: mmap of an empty file
            raise StorageError(f"{self.name}: not a readable Parquet file ({e})") from None
        parquet = self.file.metadata
        self.metadata = _decode_metadata(parquet.metadata)
        version = self.metadata.get(KEY_FORMAT_VERSION)
        if version is None:
            raise StorageError(f"{self.name}: not a probeserve shard (no {KEY_FORMAT_VERSION} metadata)")
        if version != str(FORMAT_VERSION):
            raise StorageError(
                f"{self.name}: shard format version {version}, this probeserve reads version {FORMAT_VERSION}"
            )
        self.n_features = int(self.metadata[KEY_N_FEATURES])
        self.dtype = np.dtype(self.metadata[KEY_DTYPE]).newbyteorder("<")
        self.width = self.n_features * self.dtype.itemsize
        self.num_rows = parquet.num_rows
        self.in_place = (parquet.created_by or "").split(" ")[0] == CREATED_BY
        if self.in_place:
            self._check_schema()

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, rows) of the whole shard: views of the file when it is one row group of
        ours, otherwise one copy (the row groups' pages are apart in the file)."""
        if not self.in_place:  # pyarrow decodes a fixed-size column into one array: no 2nd copy
            return self._arrays(self.file.read(columns=[COL_ROW, COL_LABEL, COL_X], use_threads=False))
        groups = list(self.row_groups())
        if len(groups) == 1:
            return groups[0]
        if not groups:
            return np.empty((0, self.n_features), self.dtype), np.empty(0, "<i4"), np.empty(0, "<i8")
        x, y, rows = zip(*groups, strict=True)
        return np.concatenate(x), np.concatenate(y), np.concatenate(rows)

    def row_groups(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(x, y, rows) of each row group in turn; ours are views, others decoded one at a time."""
        for i in range(self.file.num_row_groups):
            if self.in_place:
                yield self._group_in_place(i)
            else:
                yield self._arrays(
                    self.file.read_row_group(i, columns=[COL_ROW, COL_LABEL, COL_X], use_threads=False)
                )

    def _check_schema(self) -> None:
        schema = self.file.metadata.schema
        flba = "FIXED_LEN_BYTE_ARRAY"
        want = [(COL_ROW, "INT64", 0), (COL_LABEL, "INT32", 0), (COL_X, flba, self.width)]
        have = [(c.name, c.physical_type, c.length if c.physical_type == flba else 0) for c in schema]
        if have != want or any(c.max_definition_level or c.max_repetition_level for c in schema):
            raise StorageError(
                f"{self.name}: columns {have} are not those of a shard of "
                f"n_features={self.n_features} {self.dtype} ({want}, all REQUIRED)"
            )

    def _group_in_place(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        group = self.file.metadata.row_group(i)
        n = group.num_rows
        x = self._values(group, i, 2, n, self.width, self.dtype).reshape(n, self.n_features)
        y = self._values(group, i, 1, n, 4, np.dtype("<i4"))
        rows = self._values(group, i, 0, n, 8, np.dtype("<i8"))
        return x, y, rows

    def _values(self, group: Any, i: int, column: int, n: int, width: int, dtype: np.dtype) -> np.ndarray:
        """The values of a column chunk that is one PLAIN, uncompressed page, viewed in place."""
        chunk = group.column(column)
        offset, size, nbytes = chunk.data_page_offset, chunk.total_compressed_size, n * width
        header: dict[int, Any] = {}
        start = -1
        if chunk.compression == "UNCOMPRESSED" and chunk.num_values == n and 4 <= offset:
            try:
                header, start = _decode_struct(memoryview(self.data)[offset : offset + size], 0)
            except (IndexError, ValueError):
                pass
        page = header.get(5)
        if not isinstance(page, dict):
            page = {}
        if (
            header.get(1) != _DATA_PAGE
            or header.get(2) != nbytes
            or header.get(3) != nbytes
            or page.get(1) != n
            or page.get(2) != _PLAIN
            or start + nbytes != size
            or offset + size > len(self.data) - 8  # the footer length and magic follow
        ):
            raise StorageError(
                f"{self.name}: column {chunk.path_in_schema!r} of row group {i} is not the single "
                f"plain page of {n} values this shard's footer describes; the file is damaged"
            )
        return np.frombuffer(self.data, dtype, count=n * width // dtype.itemsize, offset=offset + start)

    def _arrays(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        column = table.column(COL_X)
        if column.type != pa.binary(self.width) or column.null_count:
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

    For a shard of one row group written by probeserve, the arrays are read-only views of the
    bytes or of the map, with no copy; otherwise x, y and rows are each one new array."""
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


class ShardMissing(StorageError):
    """A shard that a manifest lists is not there: another run deleted the layer's shards
    (its item was committed, or its extraction failed) or replaced them after this reader
    read the manifest. The reader's item is not broken: see `sweep.probe_and_commit`."""


def iter_chunks(
    storage: Storage, keys: list[str], *, batch_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream the shards at `keys` in order as (x, y) chunks of `batch_rows` rows (the last
    may be shorter). A local shard is memory-mapped, another is fetched whole; either way one
    shard at a time is held. Chunks do not depend on how the rows were split into parts or row
    groups; a chunk that spans two row groups is a copy, the others are read-only views."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, not {batch_rows}")
    carry_x: list[np.ndarray] = []
    carry_y: list[np.ndarray] = []
    carried = 0
    layout = None
    with contextlib.ExitStack() as stack:
        fetched = None if isinstance(storage, LocalStorage) else stack.enter_context(_Prefetch(storage, keys))
        for i, key in enumerate(keys):
            try:
                shard = _ShardFile(storage.uri_for(key)) if fetched is None else fetched.open(i)
            except StorageError:
                if storage.stat(key) is None:
                    raise ShardMissing(
                        f"{storage.uri_for(key)}: shard is gone (deleted after it was listed)"
                    ) from None
                raise
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


class _Prefetch:
    """Fetches the shards at `keys` from remote storage one ahead of the reader.

    While the reader works through part i, a thread fetches part i+1, so a probe streaming
    its shards from S3 waits for the network only when it reads faster than storage serves.
    A storage with `download` (S3: a parallel, ranged download with the storage's transfer
    settings) fetches into a staging folder (staging.py: named and locked, so a later run removes
    it if this process is killed); the file is memory-mapped and unlinked at once, so the page
    cache, not the heap, holds it, and nothing is left behind once it is read. Other storages
    are read with `read_bytes`. At most two parts are held at a time.
    """

    def __init__(self, storage: Storage, keys: list[str]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.storage = storage
        self.keys = keys
        self._download = callable(getattr(storage, "download", None))
        self._staging = StagingDir() if self._download else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probeserve-shard-prefetch")
        self._pending: dict[int, Any] = {}

    def _fetch(self, i: int) -> bytes | str:
        if not self._download:
            return self.storage.read_bytes(self.keys[i])
        assert self._staging is not None
        path = os.path.join(self._staging.path, f"part-{i:06d}.parquet")
        self.storage.download(self.keys[i], path)
        return path

    def _start(self, i: int) -> None:
        if i < len(self.keys) and i not in self._pending:
            self._pending[i] = self._pool.submit(self._fetch, i)

    def open(self, i: int) -> _ShardFile:
        """Part i (fetched by now, or waited for), while part i+1 is being fetched."""
        self._start(i)
        self._start(i + 1)
        source = self._pending.pop(i).result()
        try:
            return _ShardFile(source, name=self.storage.uri_for(self.keys[i]))
        finally:
            if isinstance(source, str):
                with contextlib.suppress(OSError):
                    os.unlink(source)  # mapped already, or unreadable: either way not needed

    def __enter__(self) -> _Prefetch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pending = {}
        if self._staging is not None:
            self._staging.remove()
