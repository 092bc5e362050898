"""Decoding and evaluation preprocessing of encoded images, and fetching a task's bytes.

This module runs in the decode worker processes (`probeserve.images.workers`), many of them
per extraction, so it imports only numpy, Pillow and, for Parquet, pyarrow: no torch and no
spec, which would add seconds to every worker's start and hundreds of MB to its memory.

The preprocessing is torchvision's standard evaluation transform, computed the same way:
the shorter side is resized to `resize_size` with bilinear filtering (the longer side to
`int(resize_size * long / short)`), then the centre `image_size` square is cropped (offsets
rounded as torchvision rounds them). Every mode becomes RGB (grey, palette, RGBA and CMYK as
Pillow converts them; 16-bit grey scaled to 8 bits). One deliberate difference: a JPEG at least twice as large as the resized size is
decoded at 1/2, 1/4 or 1/8 scale by libjpeg (`Image.draft`) before the resize, which makes
large photos several times cheaper and changes pixels only slightly; ImageNet-sized images
(about 500x375 for 256) are decoded at full scale. Normalisation is not done here: workers
return uint8 HWC arrays, 4x fewer bytes to move than float32, and the main process
normalises on the device.

An example whose bytes cannot be decoded is reported with a reason and left out; an example
whose bytes cannot be *read* (storage unreachable, object gone) raises, because a retry
can fix it and leaving it out would change which examples the run sees.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

# File names the folder layout treats as images (torchvision's ImageFolder list); other
# files (README, label lists) are ignored. Matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Pillow formats we open: anything else (EPS, which runs Ghostscript, for one) is refused.
_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP", "GIF")  # JPEG includes MPO
_PARQUET_BATCH_ROWS = 64  # rows of a row group decoded from Parquet at a time: bounds memory
_PARQUET_BUFFER = 4 << 20  # Parquet reads in pieces this large, so a huge row group streams
_FETCH_THREADS = 16  # concurrent GETs per worker: S3 latency, not bandwidth, bounds one GET
_PREFETCH_MAX = 64 << 20  # a row group's image column is fetched ahead whole up to this size
# An image resized whole to the shorter side (torchvision's way) may hold at most this many
# crops' worth of pixels; a longer, thinner one has only its crop's part resampled.
_FULL_RESIZE_CROPS = 16
_ROWS_PER_BLOCK = 256  # rows of a 16-bit grey image converted to 8 bits at a time


class Undecodable(Exception):
    """These bytes are not an image we can decode (the message says why)."""


def resized_size(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to `resize_size`, as torchvision computes it."""
    if width <= height:
        return resize_size, int(resize_size * height / width)
    return int(resize_size * width / height), resize_size


def preprocess(data: bytes, *, image_size: int, resize_size: int) -> np.ndarray:
    """Decode one encoded image and give it the evaluation transform: uint8 [S, S, 3] RGB.

    Raises `Undecodable` for bytes that are not a decodable image of a known format."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise Undecodable("0 bytes (an empty file or cell)")
    try:
        with warnings.catch_warnings():
            # palette transparency, odd EXIF, large-image warnings: nothing to act on here
            warnings.simplefilter("ignore")
            img: Image.Image = Image.open(io.BytesIO(data), formats=_FORMATS)
            width, height = img.size
            if width < 1 or height < 1:
                raise ValueError(f"image of size {width}x{height}")
            new = resized_size(width, height, resize_size)
            img.draft(None, new)  # JPEG only: decode at reduced scale when it stays >= new
            if img.mode != "RGB":
                if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                    img = _grey_to_8_bit(img)
                img = img.convert("RGB")
            else:
                img.load()
            left = round((new[0] - image_size) / 2.0)
            top = round((new[1] - image_size) / 2.0)
            if new[0] * new[1] <= _FULL_RESIZE_CROPS * image_size * image_size:
                if img.size != new:
                    img = img.resize(new, Image.Resampling.BILINEAR)
                img = img.crop((left, top, left + image_size, top + image_size))
            else:
                # a long, thin image: resized whole, a 1x100000 PNG of 100 bytes would take
                # 256x25600000 pixels (20 GB). Resample only the crop's part of the source,
                # with the same filter: equal to resizing whole and cropping, up to rounding
                # (a value here and there differs by 1)
                sx, sy = img.size[0] / new[0], img.size[1] / new[1]
                box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
            out = np.asarray(img, dtype=np.uint8)
    except MemoryError:
        raise
    except UnidentifiedImageError:
        raise Undecodable(f"not an image in a known format ({', '.join(_FORMATS)})") from None
    except Exception as e:  # untrusted bytes: every way decoding fails means "not an image"
        raise Undecodable(f"{type(e).__name__}: {e}"[:300]) from None
    assert out.shape == (image_size, image_size, 3), out.shape
    return out


def _grey_to_8_bit(img: Any) -> Any:
    """A 16-bit (or 32-bit integer, or float) grey image as 8-bit grey ("L").

    `convert` would clip everything above 255 to white; 16-bit values are scaled 0..65535 to
    0..255 instead (x / 257), as are integer images with values above 255. Converted a block
    of rows at a time: a float64 copy of the whole image took 8 bytes a pixel, 4 GB for a
    13000x13000 PNG of 360 KB, which Pillow's decompression-bomb limit still admits."""
    from PIL import Image

    arr = np.asarray(img)  # uint16, int32 or float32: 2 or 4 bytes a pixel
    scale = img.mode.startswith("I;16") or (img.mode == "I" and arr.max() > 255)
    out = np.empty(arr.shape, dtype=np.uint8)
    for start in range(0, arr.shape[0], _ROWS_PER_BLOCK):
        block = arr[start : start + _ROWS_PER_BLOCK].astype(np.float64)
        if scale:
            block /= 257.0
        out[start : start + _ROWS_PER_BLOCK] = np.clip(np.rint(block), 0, 255)
    return Image.fromarray(out, "L")


class _RangeReader(io.RawIOBase):
    """A read-only, seekable file over an S3 object, one ranged GET per read.

    pyarrow reads a Parquet file's footer and then only the column chunks it needs through
    it, so a worker fetches one row group's images, never the whole file. A range fetched
    ahead (`prefetch`) serves the reads that fall inside it."""

    def __init__(self, storage: Any, key: str, size: int) -> None:
        self._storage, self._key, self._size, self._pos = storage, key, size, 0
        self._ahead: list[tuple[int, int, Future[bytes]]] = []  # (start, end, bytes) fetched ahead

    def prefetch(self, start: int, length: int, executor: ThreadPoolExecutor) -> None:
        if any(a == start and b == start + length for a, b, _ in self._ahead):
            return
        future = executor.submit(read_range, self._storage, self._key, start, length)
        self._ahead = [*self._ahead[-1:], (start, start + length, future)]  # this task's and the next

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        for a, b, future in self._ahead:
            if a <= self._pos and self._pos + n <= b:
                data = future.result()[self._pos - a : self._pos - a + n]
                break
        else:
            data = read_range(self._storage, self._key, self._pos, n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def read_range(storage: Any, key: str, start: int, length: int) -> bytes:
    """Bytes [start, start + length) of an object in a probeserve Storage (local or S3)."""
    root = getattr(storage, "root", None)
    if root is not None:  # LocalStorage
        path = storage.uri_for(key)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(length)
        except OSError as e:
            from probeserve.errors import StorageError

            raise StorageError(f"{path}: cannot read: {e.strerror or e}") from None
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        obj = storage._client.get_object(
            Bucket=storage.bucket, Key=storage._full(key), Range=f"bytes={start}-{start + length - 1}"
        )
        return obj["Body"].read()
    except (ClientError, BotoCoreError) as e:
        raise storage._error(e, key, "read") from None


class Decoder:
    """What one decode worker (or the main process, with `num_workers: 0`) keeps between
    tasks: the storage client and open Parquet files, and the preprocessing settings.

    On S3 the bytes of a task are fetched by `_FETCH_THREADS` threads at once (a GET takes
    tens of milliseconds whatever its size, longer than decoding a small image), and
    `prefetch(next_task)` starts fetching the next task's bytes while this one decodes."""

    def __init__(
        self,
        *,
        uri: str,
        s3_endpoint: str | None,
        image_size: int,
        resize_size: int,
        image_column: str | None = None,
    ) -> None:
        self.uri, self.s3_endpoint = uri, s3_endpoint
        self.image_size, self.resize_size = image_size, resize_size
        self.image_column = image_column
        self._storage: Any = None
        self._parquet: OrderedDict[str, Any] = OrderedDict()  # key -> ParquetFile, a few kept open
        self._readers: dict[str, _RangeReader] = {}  # S3 Parquet: key -> its reader
        self._executor: ThreadPoolExecutor | None = None

    def _remote(self) -> bool:
        return getattr(self.storage, "root", None) is None

    def _threads(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(_FETCH_THREADS, thread_name_prefix="fetch")
        return self._executor

    def prefetch(self, task: dict[str, Any]) -> None:
        """Start fetching a task's bytes from S3 (a no-op for local files: the OS reads ahead)."""
        if not self._remote() or "_fetch" in task:
            return
        if task["kind"] == "files":
            task["_fetch"] = [self._threads().submit(self.storage.read_bytes, k) for k in task["keys"]]
            return
        try:
            self._prefetch_row_group(task)
        except Exception:  # a damaged file: reading the task itself reports it, with its name
            pass
        task["_fetch"] = True

    def _prefetch_row_group(self, task: dict[str, Any]) -> None:
        pf = self._parquet_file(task["file"], task["size"])
        meta = pf.metadata.row_group(task["row_group"])
        column = pf.schema_arrow.get_field_index(self.image_column)
        # the column chunks of the image column (a struct has one per field, adjacent)
        chunks = [meta.column(i) for i in range(meta.num_columns)]
        chunks = [c for c in chunks if c.path_in_schema.split(".")[0] == self.image_column] or [
            meta.column(column)
        ]
        start = min(c.dictionary_page_offset or c.data_page_offset for c in chunks)
        end = max((c.dictionary_page_offset or c.data_page_offset) + c.total_compressed_size for c in chunks)
        if end - start <= _PREFETCH_MAX:
            self._readers[task["file"]].prefetch(start, end - start, self._threads())

    @property
    def storage(self) -> Any:
        if self._storage is None:
            from probeserve.storage import open_storage

            self._storage = open_storage(self.uri, s3_endpoint=self.s3_endpoint)
        return self._storage

    def run(self, task: dict[str, Any]) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """Decode a task's examples: (uint8 [n_ok, S, S, 3] in task order, [(position, why)])
        for the examples left out."""
        self.prefetch(task)  # on S3: all of a task's GETs at once (no-op if the worker did it ahead)
        if task["kind"] == "files":
            if "_fetch" in task:
                blobs: Iterator[bytes | None] = (f.result() for f in task["_fetch"])
            else:
                blobs = (self.storage.read_bytes(k) for k in task["keys"])
            count = len(task["keys"])
        else:
            blobs = self._parquet_blobs(task["file"], task["size"], task["row_group"], task["rows"])
            count = len(task["rows"])
        out = np.empty((count, self.image_size, self.image_size, 3), dtype=np.uint8)
        failed: list[tuple[int, str]] = []
        n_ok = 0
        for pos, data in enumerate(blobs):
            if data is None:
                failed.append((pos, "no image bytes in this row"))
                continue
            try:
                out[n_ok] = preprocess(data, image_size=self.image_size, resize_size=self.resize_size)
                n_ok += 1
            except Undecodable as e:
                failed.append((pos, str(e)))
        return out[:n_ok], failed

    def _parquet_file(self, key: str, size: int) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pf = self._parquet.get(key)
        if pf is not None:
            self._parquet.move_to_end(key)
            return pf
        if getattr(self.storage, "root", None) is not None:
            source: Any = self.storage.uri_for(key)
        else:
            self._readers[key] = _RangeReader(self.storage, key, size)
            source = pa.PythonFile(self._readers[key], mode="r")
        pf = pq.ParquetFile(source, buffer_size=_PARQUET_BUFFER, pre_buffer=False)  # this thread only
        self._parquet[key] = pf
        while len(self._parquet) > 4:
            old, old_file = self._parquet.popitem(last=False)
            old_file.close()
            self._readers.pop(old, None)
        return pf

    def _parquet_blobs(self, key: str, size: int, row_group: int, rows: list[int]) -> Iterator[bytes | None]:
        """The image bytes of `rows` (ascending positions within one row group), streamed a
        few rows at a time so a row group of any size fits in memory."""
        import pyarrow as pa

        assert self.image_column is not None
        start, j = 0, 0
        try:
            pf = self._parquet_file(key, size)
            for batch in pf.iter_batches(
                batch_size=_PARQUET_BATCH_ROWS,
                row_groups=[row_group],
                columns=[self.image_column],
                use_threads=False,
            ):
                column = batch.column(0)
                if pa.types.is_struct(column.type):
                    column = column.field("bytes")
                n = batch.num_rows
                while j < len(rows) and rows[j] < start + n:
                    yield column[rows[j] - start].as_py()
                    j += 1
                start += n
                if j == len(rows):
                    return
        except (pa.ArrowException, OSError) as e:
            # a damaged file, not an undecodable image: its other rows cannot be trusted either
            from probeserve.errors import DataError

            self._parquet.pop(key, None)
            self._readers.pop(key, None)
            raise DataError(
                f"{self.storage.uri_for(key)}: cannot read row group {row_group} of column "
                f"{self.image_column!r}: {e}"
            ) from None
        assert j == len(rows), f"{key} row group {row_group} has {start} rows, wanted row {rows[j]}"

    def close(self) -> None:
        for pf in self._parquet.values():
            pf.close()
        self._parquet.clear()
        self._readers.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def default_workers() -> int:
    """min(8, the CPUs this process may run on)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))
