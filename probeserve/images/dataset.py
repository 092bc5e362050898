"""Image datasets with the probe dataset interface (`probeserve.data.Dataset`).

`ImageDataset` reads the examples of a frozen `ImageIndex`: decode workers turn each task's
bytes into uint8 images [n, S, S, 3]; a background thread assembles them into batches (in
pinned memory when the device is CUDA) while the model runs on the previous one; the batch
is copied to the device (asynchronously from pinned memory) and only there converted to
float32 [b, 3, S, S] and normalised, so the host-to-device copy is a quarter of the float
bytes and the CPU never touches float pixels.

`SyntheticImageDataset` makes seeded images on the device itself: no I/O and no decode, so
an extraction fed by it runs at the model's own speed. It is the compute ceiling that real
data is measured against.
"""

from __future__ import annotations

import logging
import queue
import threading
import zlib
from collections.abc import Callable, Generator, Iterator
from typing import Any

import numpy as np
import torch

from probeserve.errors import DataError
from probeserve.images.decode import Decoder, default_workers
from probeserve.images.index import SPLITS, ImageIndex, SplitIndex, freeze
from probeserve.images.workers import DecodePool
from probeserve.spec import ImagesData, SyntheticImagesData
from probeserve.storage import Storage, redact

log = logging.getLogger("probeserve")

FILE_TASK = 16  # images per task of the folder layout: small, so workers stay evenly loaded
PARQUET_TASK = 256  # rows of one row group per task of the Parquet layout
PREFETCH = 2  # batches assembled ahead of the one the model is working on
_LOGGED_SKIPS = 10  # skipped images logged one by one per pass, then a count


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _check_labels(source: str, labels: dict[str, np.ndarray]) -> None:
    """What every probe relies on: no empty split, class indices, two classes in train."""
    for split in SPLITS:
        if len(labels[split]) == 0:
            raise DataError(f"{source}: the {split} split is empty; check the data sizes in the spec")
        if labels[split].min() < 0:
            raise DataError(
                f"{source}: label {int(labels[split].min())} in the {split} split; labels must be >= 0"
            )
    if len(np.unique(labels["train"])) < 2:
        raise DataError(
            f"{source}: the train split has a single class; a probe needs at least two (check the data)"
        )


class ImageDataset:
    """Labelled images from a folder tree or Parquet files (see `probeserve.images.index`).

    `size` and `labels` describe the index; after a full pass over a split, `skipped(split)`
    names the examples that could not be decoded, and `size`/`labels` leave them out, as
    `batches` does. Decoding is deterministic, so every pass, in any process, leaves out the
    same examples.
    """

    def __init__(self, spec: ImagesData, index: ImageIndex, *, s3_endpoint: str | None) -> None:
        self.spec = spec
        self.s3_endpoint = s3_endpoint
        size = spec.image_size
        self.input_shape: tuple[int, ...] = (3, size, size)
        self.source = f"images:{redact(spec.uri)}"
        self.num_workers = spec.num_workers if spec.num_workers is not None else default_workers()
        self._pool: DecodePool | None = None
        self._decoder: Decoder | None = None
        self._busy = threading.Lock()  # held by the pass that uses _pool / _decoder
        self._skipped: dict[str, list[str] | None] = dict.fromkeys(SPLITS)
        self._skipped_at: dict[str, np.ndarray] = {}
        self._scale: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._use(index)

    def _use(self, index: ImageIndex) -> None:
        self.index = index
        self.class_names = tuple(index.classes) if index.classes is not None else None
        self.num_classes = index.num_classes()
        _check_labels(self.source, {s: index.splits[s].labels for s in SPLITS})

    # --- the dataset interface -----------------------------------------------------------

    def size(self, split: str) -> int:
        return len(self.labels(split))

    def labels(self, split: str) -> np.ndarray:
        """Labels in the order batches() yields them (int64, a copy)."""
        _check_split(split)
        labels = self.index.splits[split].labels
        if split in self._skipped_at:
            return np.delete(labels, self._skipped_at[split])
        return labels.copy()

    def skipped(self, split: str) -> list[str]:
        """Names of the examples of `split` the last full pass could not decode."""
        _check_split(split)
        return list(self._skipped[split] or [])

    def describe(self) -> dict[str, Any]:
        return self.index.describe()

    def freeze(self, storage: Storage, key: str) -> None:
        """Publish this dataset's index at `key` for the rest of the run, or adopt the one
        already there (see `probeserve.images.index.freeze`)."""
        stored = freeze(self.index, storage, key)
        if stored is not self.index:
            self._use(stored)
            self._skipped = dict.fromkeys(SPLITS)
            self._skipped_at.clear()

    def batches(
        self, split: str, batch_size: int, *, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Normalised float32 images [b, 3, S, S] on `device` and int64 labels [b], in index
        order without the examples that cannot be decoded, `batch_size` at a time."""
        _check_split(split)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        dev = torch.device(device)
        pin = dev.type == "cuda"
        scale, shift = self._normaliser(dev)
        for u8, y in _in_background(lambda: self._u8_batches(split, batch_size, pin=pin), PREFETCH):
            x = u8.to(dev, non_blocking=pin)  # uint8 [b, S, S, 3]: a quarter of the float bytes
            x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
            yield x.mul_(scale).sub_(shift), y

    def close(self) -> None:
        """Stop the decode workers (a later pass starts them again)."""
        if self._pool is not None:
            self._pool.close()
        if self._decoder is not None:
            self._decoder.close()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.index.splits[s])}" for s in SPLITS)
        return f"ImageDataset({self.source}, {self.index.layout}, {sizes}, num_classes={self.num_classes})"

    # --- the pipeline ----------------------------------------------------------------------

    def _normaliser(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(x/255 - mean)/std as x * scale - shift, one fused pass on the device."""
        if dev not in self._scale:
            mean = torch.tensor(self.spec.mean, dtype=torch.float64)
            std = torch.tensor(self.spec.std, dtype=torch.float64)
            scale = (1.0 / (255.0 * std)).to(torch.float32).view(1, 3, 1, 1).to(dev)
            shift = (mean / std).to(torch.float32).view(1, 3, 1, 1).to(dev)
            self._scale[dev] = (scale, shift)
        return self._scale[dev]

    def _settings(self) -> dict[str, Any]:
        return {
            "uri": self.index.root,
            "s3_endpoint": self.s3_endpoint,
            "image_size": self.spec.image_size,
            "resize_size": self.spec.resolved_resize_size(),
            "image_column": self.spec.image_column if self.index.layout == "parquet" else None,
        }

    def _tasks(self, s: SplitIndex) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(first position, end position, task) covering the split in order."""
        n = len(s)
        if s.row_group is None:
            for a in range(0, n, FILE_TASK):
                b = min(n, a + FILE_TASK)
                yield a, b, {"kind": "files", "keys": s.keys[a:b].tolist()}
            return
        assert s.group_row is not None
        a = 0
        while a < n:
            b = a + 1
            while (
                b < n and b - a < PARQUET_TASK and s.row_group[b] == s.row_group[a] and s.keys[b] == s.keys[a]
            ):
                b += 1
            key = str(s.keys[a])
            yield (
                a,
                b,
                {
                    "kind": "parquet",
                    "file": key,
                    "size": self.index.files[key],
                    "row_group": int(s.row_group[a]),
                    "rows": s.group_row[a:b].tolist(),
                },
            )
            a = b

    def _decoded(self, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(uint8 images [n, S, S, 3], labels [n]) task by task, recording the examples left out."""
        s = self.index.splits[split]
        spans: list[tuple[int, int]] = []

        def tasks() -> Iterator[dict[str, Any]]:
            for a, b, task in self._tasks(s):
                spans.append((a, b))
                yield task

        # The workers (or the in-process decoder) are kept for the next pass; a pass that
        # runs while another is still going (two batches() iterated together) gets its own.
        shared = self._busy.acquire(blocking=False)
        settings = self._settings()
        runner: Decoder | DecodePool
        results: Iterator[tuple[np.ndarray, list[tuple[int, str]]]]
        if self.num_workers == 0:
            if shared and self._decoder is None:
                self._decoder = Decoder(**settings)
            decoder = self._decoder if shared and self._decoder is not None else Decoder(**settings)
            runner, results = decoder, (decoder.run(t) for t in tasks())
        else:
            if shared and self._pool is None:
                self._pool = DecodePool(settings, self.num_workers)
            pool = self._pool if shared and self._pool is not None else DecodePool(settings, self.num_workers)
            runner, results = pool, pool.map(tasks())
        skipped: list[str] = []
        skipped_at: list[int] = []
        first_why = ""
        try:
            for i, (images, failed) in enumerate(results):
                a, b = spans[i]
                keep = np.ones(b - a, dtype=bool)
                for pos, why in failed:
                    keep[pos] = False
                    skipped_at.append(a + pos)
                    skipped.append(s.name(a + pos))
                    first_why = first_why or why
                    if len(skipped) <= _LOGGED_SKIPS:
                        log.warning(
                            "data: skipping %s (%s split): cannot decode it: %s", skipped[-1], split, why
                        )
                yield images, s.labels[a:b][keep]
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()  # the pool's pass ends here, not whenever it is collected
            if shared:
                self._busy.release()
            else:
                runner.close()
        if len(skipped) > _LOGGED_SKIPS:
            log.warning(
                "data: %d images of the %s split could not be decoded and were skipped", len(skipped), split
            )
        self._skipped[split] = skipped
        self._skipped_at[split] = np.asarray(skipped_at, dtype=np.int64)
        if skipped and split == "train" and len(skipped) < len(s):
            kept = np.delete(s.labels, skipped_at)
            lost = sorted(set(np.unique(s.labels).tolist()) - set(np.unique(kept).tolist()))
            if lost:
                # the probe cannot predict such a class: every val and test example of it is an error
                names = [repr(self.class_names[c]) if self.class_names else str(c) for c in lost]
                log.warning(
                    "data: no train image of class %s could be decoded (%d such class(es)); the probe "
                    "cannot predict it, and its val and test examples all count as errors",
                    ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""),
                    len(lost),
                )
        if skipped and len(skipped) == len(s):
            # every probe of the checkpoint would fail with "split is empty", which says nothing
            # of why: zero-byte files, an image column of paths without bytes, the wrong column
            raise DataError(
                f"data.uri: none of the {len(s)} images of the {split} split could be decoded "
                f"(the first, {skipped[0]}: {first_why})"
            )

    def _u8_batches(
        self, split: str, batch_size: int, *, pin: bool
    ) -> Generator[tuple[torch.Tensor, np.ndarray], None, None]:
        """The decoded images regrouped into batches of `batch_size` (the last may be short)."""
        size = self.spec.image_size
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        count = 0

        def batch(n: int) -> tuple[torch.Tensor, np.ndarray]:
            nonlocal count
            out = torch.empty((n, size, size, 3), dtype=torch.uint8, pin_memory=pin)
            view = out.numpy()
            labels = np.empty(n, dtype=np.int64)
            filled = 0
            while filled < n:
                images, y = pending[0]
                take = min(n - filled, len(y))
                view[filled : filled + take] = images[:take]
                labels[filled : filled + take] = y[:take]
                filled += take
                if take == len(y):
                    pending.pop(0)
                else:
                    pending[0] = (images[take:], y[take:])
            count -= n
            return out, labels

        for images, y in self._decoded(split):
            if len(y):
                pending.append((images, y))
                count += len(y)
            while count >= batch_size:
                yield batch(batch_size)
        if count:
            yield batch(count)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def _in_background(make: Callable[[], Generator[Any, None, None]], depth: int) -> Iterator[Any]:
    """Run a generator in a thread, at most `depth` items ahead of the consumer. Its
    exceptions are raised here; closing this generator stops (and closes) the other."""
    items: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run() -> None:
        gen = make()
        try:
            for item in gen:
                if not put(item):
                    break
        except BaseException as e:
            put(_Raised(e))
        finally:
            gen.close()  # in this thread: the generator's cleanup (the decode pool's) runs here
            put(_DONE)

    thread = threading.Thread(target=run, name="probeserve-images", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not _DONE:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


# --- synthetic images ------------------------------------------------------------------------


class SyntheticImageDataset:
    """Seeded synthetic images made on the device (see `SyntheticImagesData`).

    Class c's template is a seeded Gaussian pattern of at most 8x8 per channel, resized
    bilinearly to the image size; an example is `signal * template + noise`, noise standard
    normal. Noise is drawn in blocks of `BLOCK` examples from a generator seeded by (seed,
    split, block), so an example is the same whatever the batch size and however often it
    is drawn (on one kind of device: CPU and CUDA generators differ).
    """

    BLOCK = 256

    def __init__(self, spec: SyntheticImagesData) -> None:
        self.spec = spec
        c, h, w = spec.shape
        self.input_shape: tuple[int, ...] = (c, h, w)
        self.num_classes = spec.num_classes
        self.class_names: tuple[str, ...] | None = None
        self.source = f"synthetic_images:{c}x{h}x{w},classes={spec.num_classes},seed={spec.seed}"
        self._labels: dict[str, np.ndarray] = {}
        for split in SPLITS:
            n = getattr(spec, f"{split}_size")
            if n is None:
                raise DataError(
                    f"data.{split}_size: synthetic images are generated, so it needs a size, not null"
                )
            rng = np.random.default_rng([spec.seed % 2**64, zlib.crc32(f"synthetic_images/{split}".encode())])
            self._labels[split] = rng.integers(0, spec.num_classes, n, dtype=np.int64)
        _check_labels(self.source, self._labels)
        rng = np.random.default_rng([spec.seed % 2**64, zlib.crc32(b"synthetic_images/templates")])
        self._templates = torch.from_numpy(
            rng.standard_normal((spec.num_classes, c, min(8, h), min(8, w)), dtype=np.float32)
        )
        self._on: dict[torch.device, torch.Tensor] = {}
        self._block: tuple[Any, torch.Tensor] | None = None  # ((split, block, device), noise)

    def size(self, split: str) -> int:
        _check_split(split)
        return len(self._labels[split])

    def labels(self, split: str) -> np.ndarray:
        _check_split(split)
        return self._labels[split].copy()

    def skipped(self, split: str) -> list[str]:
        _check_split(split)
        return []

    def describe(self) -> dict[str, Any]:
        return {"synthetic": self.source}

    def close(self) -> None:
        self._block = None

    def batches(
        self, split: str, batch_size: int, *, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Float32 images [b, C, H, W] made on `device`, with int64 labels [b]."""
        _check_split(split)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        dev = torch.device(device)
        if dev not in self._on:
            self._on[dev] = self._templates.to(dev)
        templates = self._on[dev]
        labels = self._labels[split]
        _, h, w = self.input_shape
        for start in range(0, len(labels), batch_size):
            y = labels[start : start + batch_size]
            t = templates[torch.from_numpy(y).to(dev)]
            x = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
            x.mul_(self.spec.signal).add_(self._noise(split, start, start + len(y), dev))
            yield x, y.copy()

    def _noise(self, split: str, start: int, stop: int, dev: torch.device) -> torch.Tensor:
        pieces = []
        for b in range(start // self.BLOCK, (stop - 1) // self.BLOCK + 1):
            block = self._noise_block(split, b, dev)
            lo, hi = max(start, b * self.BLOCK), min(stop, (b + 1) * self.BLOCK)
            pieces.append(block[lo - b * self.BLOCK : hi - b * self.BLOCK])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _noise_block(self, split: str, b: int, dev: torch.device) -> torch.Tensor:
        key = (split, b, dev)
        if self._block is not None and self._block[0] == key:
            return self._block[1]
        n = min(self.BLOCK, len(self._labels[split]) - b * self.BLOCK)
        gen = torch.Generator(device=dev)
        gen.manual_seed(
            zlib.crc32(f"{self.spec.seed}/{split}/{b}".encode()) + (self.spec.seed % 2**31) * 2**32
        )
        noise = torch.randn((n, *self.input_shape), generator=gen, device=dev, dtype=torch.float32)
        self._block = (key, noise)
        return noise
