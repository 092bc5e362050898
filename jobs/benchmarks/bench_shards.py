"""How fast shards are written and read, next to plain file I/O of the same bytes.

    python jobs/benchmarks/bench_shards.py [--mb 512] [--features 4096] [--dtype float16] [--cold]

Each repeat writes the activations once as a raw file (one unsynced `write` of the numpy
buffer) and once through `ShardWriter` into a `LocalStorage` (staging on the same file
system, publish included), then reads both back: the raw file with `read` into new memory,
with `readinto` a reused buffer and through a memory map (the way `read_shard` and
`iter_chunks` read local shards), the shards with `read_shard` and `iter_chunks`.

Every read ends with a checksum over every activation byte it returned, --batch-rows rows at
a time as a probe consumes them (the same checksum for all, compared with the raw file's): a
mapped read defers its page faults to the first access, so a read that only returned arrays
would not have read anything. The checksum's own speed is printed; it is part of every read
time, which brings read ratios closer to 1 than the reads alone would be.

Every read is of a file written moments before and, unless --cold evicts it (fsync, then
POSIX_FADV_DONTNEED), comes from the page cache; the output says which. Speeds are GB/s of
activation bytes, best of --repeats (median in brackets), all in one run on one machine. The
ratios compare shard writes with the raw write and shard reads with the fastest raw read;
target >= 0.7. "pyarrow write" is one pyarrow ParquetWriter call on the whole table with the
shard options, which is how shards were written before ShardWriter wrote Parquet itself.
The FixedSizeList<float16> line shows the layout the shard format avoids.

    python jobs/benchmarks/bench_shards.py --readers [--sizes-mb 1 16 64 256] [--repeats 7] [--cold]

measures the other half of the format on its own: probeserve's shard reader, which views the
pages of its own files in place, against pyarrow, which the reader falls back to for any other
Parquet file. See `compare_readers`.
"""

from __future__ import annotations

import argparse
import gc
import mmap
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from probeserve.shards import ShardInfo, ShardWriter, iter_chunks, read_shard, shard_schema, table_x
from probeserve.storage import LocalStorage

TARGET_RATIO = 0.7


def evict(path: str) -> None:
    """Drop a file's pages from the page cache (they must be clean first, hence fsync)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def checksum(arrays: Iterable[np.ndarray], batch_rows: int) -> int:
    """Read every byte of the [rows, n_features] `arrays` once, `batch_rows` rows at a time as a
    consumer would: the sum of their 64-bit words, modulo 2**64."""
    total = 0
    for a in arrays:
        for start in range(0, len(a), batch_rows):
            words = a[start : start + batch_rows].reshape(-1).view(np.uint8)
            whole = len(words) - len(words) % 8
            total += int(words[:whole].view(np.uint64).sum(dtype=np.uint64)) + int(words[whole:].sum())
    return total % 2**64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=512, help="activation bytes per repeat, in MiB")
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--batch-rows", type=int, default=1024, help="rows per ShardWriter.write call")
    parser.add_argument("--part-mb", type=int, default=256, help="ShardWriter max_bytes, in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fsl-mb", type=int, default=64, help="bytes for the FixedSizeList comparison")
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
    parser.add_argument("--cold", action="store_true", help="evict files from the page cache before reading")
    parser.add_argument("--readers", action="store_true", help="only compare read_shard with pyarrow")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 16, 64, 256], help="with --readers")
    parser.add_argument(
        "--consume", choices=["checksum", "float32"], default="checksum", help="with --readers: what reads x"
    )
    args = parser.parse_args()
    if args.readers:
        compare_readers(args)
        return

    dtype = np.dtype(args.dtype)
    rows = args.mb * 2**20 // (args.features * dtype.itemsize)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, args.features), dtype=np.float32).astype(dtype)
    y = rng.integers(0, 10, rows).astype(np.int32)
    nbytes = x.nbytes
    expected = checksum([x], args.batch_rows)
    root = tempfile.mkdtemp(prefix="bench-shards-", dir=args.dir)
    print(f"{rows} rows x {args.features} {args.dtype} = {nbytes / 1e9:.2f} GB per repeat, in {root}")
    print(
        f"reads: {'cold (fsync + fadvise DONTNEED)' if args.cold else 'page cache (just written, not dropped)'}"
    )

    names = ["raw write", "pyarrow write", "shard write", "checksum alone", "raw read", "raw readinto"]
    names += ["raw mmap", "read_shard", "iter_chunks"]
    times: dict[str, list[float]] = {name: [] for name in names}

    def timed(name: str, fn: Callable[[], object], paths: list[str] = []) -> None:  # noqa: B006
        """Time `fn`; when it returns arrays, checksum them inside the timing and check the sum."""
        for path in paths if args.cold else []:
            evict(path)
        start = time.perf_counter()
        out = fn()
        got = checksum(out, args.batch_rows) if out is not None else expected  # type: ignore[arg-type]
        times[name].append(time.perf_counter() - start)
        assert got == expected, f"{name} returned different bytes"

    try:
        for rep in range(args.repeats):
            raw_path = os.path.join(root, f"raw-{rep}.bin")

            def raw_write(path: str = raw_path) -> None:
                with open(path, "wb") as f:
                    f.write(memoryview(x).cast("B"))

            timed("raw write", raw_write)
            timed("checksum alone", lambda: [x])

            def raw_read(path: str = raw_path) -> list[np.ndarray]:
                with open(path, "rb") as f:
                    return [np.frombuffer(f.read(), dtype).reshape(rows, -1)]

            timed("raw read", raw_read, [raw_path])
            reused = np.empty_like(x)  # faulted in before timing: a buffer reused across reads
            reused.fill(0)

            def raw_readinto(path: str = raw_path, out: np.ndarray = reused) -> list[np.ndarray]:
                with open(path, "rb") as f:
                    f.readinto(memoryview(out).cast("B"))
                return [out]

            timed("raw readinto", raw_readinto, [raw_path])
            del reused

            def raw_mmap(path: str = raw_path) -> list[np.ndarray]:
                with open(path, "rb") as f:
                    return [
                        np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype).reshape(
                            rows, -1
                        )
                    ]

            timed("raw mmap", raw_mmap, [raw_path])
            os.unlink(raw_path)

            def pyarrow_write(path: str = raw_path + ".parquet") -> None:
                schema = shard_schema(args.features, args.dtype)
                blob = pa.FixedSizeBinaryArray.from_buffers(
                    schema.field("x").type, rows, [None, pa.py_buffer(x)]
                )
                table = pa.Table.from_arrays([pa.array(np.arange(rows)), pa.array(y), blob], schema=schema)
                with pq.ParquetWriter(
                    path, schema, compression=None, use_dictionary=False, write_statistics=False
                ) as w:
                    w.write_table(table, row_group_size=64 * 2**20 // (args.features * dtype.itemsize + 12))

            timed("pyarrow write", pyarrow_write)
            os.unlink(raw_path + ".parquet")

            storage = LocalStorage(os.path.join(root, f"store-{rep}"))
            staging = os.path.join(root, "staging")
            os.makedirs(staging, exist_ok=True)
            infos: list[ShardInfo] = []

            def shard_write(
                storage: LocalStorage = storage, staging: str = staging, infos: list = infos
            ) -> None:
                writer = ShardWriter(
                    storage,
                    "acts",
                    n_features=args.features,
                    dtype=args.dtype,
                    metadata={"probeserve.layer": "bench"},
                    max_bytes=args.part_mb * 2**20,
                    staging_dir=staging,
                )
                with writer:
                    for start in range(0, rows, args.batch_rows):
                        writer.write(x[start : start + args.batch_rows], y[start : start + args.batch_rows])
                infos.extend(writer.close())

            timed("shard write", shard_write)
            paths = [storage.uri_for(info.key) for info in infos]
            timed("read_shard", lambda paths=paths: [read_shard(p).x for p in paths], paths)

            def stream(storage: LocalStorage = storage, keys: list[str] = [i.key for i in infos]):  # noqa: B006
                return (cx for cx, _ in iter_chunks(storage, keys, batch_rows=args.batch_rows))

            timed("iter_chunks", stream, paths)
            shutil.rmtree(storage.root)

        fsl_rows = min(rows, args.fsl_mb * 2**20 // (args.features * dtype.itemsize))
        fsl_path = os.path.join(root, "fsl.parquet")

        def fsl_write() -> None:
            values = pa.array(x[:fsl_rows].reshape(-1))
            column = pa.FixedSizeListArray.from_arrays(values, args.features)
            table = pa.table({"row": np.arange(fsl_rows), "label": y[:fsl_rows], "x": column})
            pq.write_table(table, fsl_path, compression=None, use_dictionary=False, write_statistics=False)

        start = time.perf_counter()
        fsl_write()
        fsl_seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)

    speed = {k: nbytes / min(v) / 1e9 for k, v in times.items()}
    median = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    for name in times:
        print(f"{name:>14}: {speed[name]:6.2f} GB/s  ({median[name]:.2f} median of {args.repeats})")
    print(
        f"FixedSizeList<{args.dtype}> write: {fsl_rows * args.features * dtype.itemsize / fsl_seconds / 1e9:.2f} GB/s"
    )
    raw_read = max(("raw read", "raw readinto", "raw mmap"), key=speed.__getitem__)
    pairs = [("pyarrow write", "raw write"), ("shard write", "raw write")]
    for shard, raw in [*pairs, ("read_shard", raw_read), ("iter_chunks", raw_read)]:
        ratio = speed[shard] / speed[raw]
        verdict = "ok" if ratio >= TARGET_RATIO else f"below the {TARGET_RATIO} target"
        print(f"{shard} / {raw}: {ratio:.2f}  {verdict}")


def _shard_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, rows) of a shard that pyarrow read: the same arrays `read_shard` returns."""
    return table_x(table), table.column("label").to_numpy(), table.column("row").to_numpy()


def compare_readers(args: argparse.Namespace) -> None:
    """probeserve's shard reader against pyarrow, on the same files, into the same arrays.

    One shard (one part, one row group, as ShardWriter writes parts of up to 1 GiB) per size,
    written by ShardWriter to a local folder. Each reader turns it into x [rows, n_features],
    y and rows as numpy arrays, and the same checksum then reads every byte of all three,
    --batch-rows rows at a time, inside the timing (a memory-mapped view costs nothing until
    it is read). Readers:

    - `read_shard`: our reader; views of the pages in a memory map, no copy.
    - `iter_chunks`: our streaming reader (LocalStorage), --batch-rows rows at a time.
    - `pyarrow`: `pyarrow.parquet.read_table(path)` and `shards.table_x`, which is what the
      reader does for Parquet files that are not ours (decoded into Arrow memory, one copy).
    - `pyarrow mmap`: the same with `memory_map=True`.
    - `pyarrow batches`: `ParquetFile.iter_batches(batch_size=--batch-rows)`, the streaming
      equivalent of iter_chunks.

    With --consume float32, x is read the way a probe reads it instead: --batch-rows rows at a
    time made a float32 torch tensor (`probe.py` does that on the CPU before copying to the
    device); the conversion costs more than the reading, so differences shrink.

    Each reader runs once untimed, then --repeats times per size, in rotating order; the figures are the median
    and the range (min-max) of the wall times, and the bytes pyarrow's allocator held while
    the arrays were alive (the least over the repeats; ours hold none: they are views of the
    page cache).
    """
    dtype = np.dtype(args.dtype)
    row_bytes = args.features * dtype.itemsize
    root = tempfile.mkdtemp(prefix="bench-readers-", dir=args.dir)
    storage = LocalStorage(root)
    print(
        f"readers: {args.features} {args.dtype} features per row, {args.consume} every {args.batch_rows} rows; "
        f"{'cold (evicted before each read)' if args.cold else 'warm (page cache)'}; "
        f"{args.repeats} repeats per reader and size"
    )

    def read_ours(path: str, key: str) -> list[np.ndarray]:
        shard = read_shard(path)
        return [shard.x, shard.y, shard.rows]

    def stream_ours(path: str, key: str) -> Iterable[np.ndarray]:
        for x, y in iter_chunks(storage, [key], batch_rows=args.batch_rows):
            yield x
            yield y

    def read_pyarrow(path: str, key: str, memory_map: bool = False) -> list[np.ndarray]:
        return list(_shard_arrays(pq.read_table(path, memory_map=memory_map)))

    def stream_pyarrow(path: str, key: str) -> Iterable[np.ndarray]:
        file = pq.ParquetFile(path)
        n_features = int(file.schema_arrow.metadata[b"probeserve.n_features"])
        for batch in file.iter_batches(batch_size=args.batch_rows, columns=["label", "x"]):
            blobs = batch.column("x")
            count = len(blobs) * n_features
            yield np.frombuffer(
                blobs.buffers()[1], dtype, count=count, offset=blobs.offset * row_bytes
            ).reshape(len(blobs), n_features)
            yield batch.column("label").to_numpy()

    readers: dict[str, Callable[[str, str], Iterable[np.ndarray]]] = {
        "read_shard": read_ours,
        "pyarrow": read_pyarrow,
        "pyarrow mmap": lambda path, key: read_pyarrow(path, key, memory_map=True),
        "iter_chunks": stream_ours,
        "pyarrow batches": stream_pyarrow,
    }
    whole = {"read_shard", "pyarrow", "pyarrow mmap"}  # the streaming ones checksum x and y only

    if args.consume == "float32":
        import torch

        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        torch.set_num_threads(1)  # one conversion at a time, as in a probe actor with one CPU

    def consume(arrays: Iterable[np.ndarray]) -> float:
        """The checksum of every byte, or (--consume float32) what a probe does with x: each
        --batch-rows rows made a float32 torch tensor (then only its last value is taken, so
        that the conversion is all that is timed; the checksum runs check the bytes)."""
        total = 0.0
        for a in arrays:
            if args.consume == "checksum":
                total += checksum([a.reshape(len(a), -1)], args.batch_rows)
            elif a.dtype.kind == "f":
                for s in range(0, len(a), args.batch_rows):
                    total += float(torch.from_numpy(a[s : s + args.batch_rows]).to(torch.float32)[-1, -1])
        return total

    results = []
    try:
        for size_mb in args.sizes_mb:
            rows = max(1, int(size_mb * 2**20) // row_bytes)
            rng = np.random.default_rng(0)
            x = rng.standard_normal((rows, args.features), dtype=np.float32).astype(dtype)
            y = rng.integers(0, 1000, rows).astype(np.int32)
            prefix = f"size-{size_mb:g}"
            staging = os.path.join(root, "staging")
            os.makedirs(staging, exist_ok=True)
            writer = ShardWriter(
                storage,
                prefix,
                n_features=args.features,
                dtype=args.dtype,
                metadata={"probeserve.layer": "bench"},
                max_bytes=2**30,
                staging_dir=staging,
            )
            with writer:
                for start in range(0, rows, args.batch_rows):
                    writer.write(x[start : start + args.batch_rows], y[start : start + args.batch_rows])
                (info,) = writer.close()
            path = storage.uri_for(info.key)
            expected = {
                True: consume([x, y, np.arange(rows, dtype=np.int64)]),
                False: consume(
                    part
                    for start in range(0, rows, args.batch_rows)
                    for part in (x[start : start + args.batch_rows], y[start : start + args.batch_rows])
                ),
            }
            del x, y
            times: dict[str, list[float]] = {name: [] for name in readers}
            held: dict[str, int] = {name: 0 for name in readers}
            names = list(readers)
            for name in names:  # untimed: pyarrow starts its thread pool on first use
                consume(readers[name](path, info.key))
            for rep in range(args.repeats):
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    if args.cold:
                        evict(path)
                    gc.collect()  # the previous reader's arrays are gone before this one's are counted
                    before = pa.total_allocated_bytes()
                    start = time.perf_counter()
                    arrays = readers[name](path, info.key)
                    if name in whole:
                        arrays = list(arrays)
                        grew = pa.total_allocated_bytes() - before
                        held[name] = grew if rep == 0 else min(held[name], grew)
                    got = consume(arrays)
                    times[name].append(time.perf_counter() - start)
                    del arrays
                    assert got == expected[name in whole], f"{name} returned different bytes"
            results.append((size_mb, rows, info.bytes, times, held))
            storage.delete(info.key)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    for size_mb, rows, nbytes, times, held in results:
        print(f"\n{size_mb:g} MiB shard: {rows} rows, {nbytes / 2**20:.1f} MiB file")
        base = statistics.median(times["read_shard"])
        stream_base = statistics.median(times["iter_chunks"])
        for name, seconds in times.items():
            median = statistics.median(seconds)
            ours = stream_base if name in {"iter_chunks", "pyarrow batches"} else base
            print(
                f"  {name:>15}: median {median * 1e3:8.2f} ms  range {min(seconds) * 1e3:8.2f}-{max(seconds) * 1e3:8.2f} ms"
                f"  {nbytes / median / 1e9:6.2f} GB/s  {median / ours:5.2f}x ours"
                + (f"  pyarrow held {held[name] / 2**20:.1f} MiB" if held[name] else "")
            )


if __name__ == "__main__":
    main()
