"""How fast shards are written and read, next to plain file I/O of the same bytes.

    python jobs/benchmarks/bench_shards.py [--mb 512] [--features 4096] [--dtype float16] [--cold]

Each repeat writes the activations once as a raw file (one unsynced `write` of the numpy
buffer) and once through `ShardWriter` into a `LocalStorage` (staging on the same file
system, publish included), then reads both back: the raw file with one `read` into new
memory and with `readinto` a reused buffer, the shards with `read_shard` and `iter_chunks`.
Every read is of a file written moments before and, unless --cold evicts it (fsync, then
POSIX_FADV_DONTNEED), comes from the page cache; the output says which. Speeds are GB/s of
activation bytes, best of --repeats (median in brackets). The ratios compare shard with raw
(reads with the faster raw read), target >= 0.7. "pyarrow write" is one ParquetWriter call on
the whole table with the shard options: the floor under ShardWriter.
The FixedSizeList<float16> line shows the layout the shard format avoids.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from probeserve.shards import ShardInfo, ShardWriter, iter_chunks, read_shard, shard_schema
from probeserve.storage import LocalStorage

TARGET_RATIO = 0.7


def evict(path: str) -> None:
    """Drop a file's pages from the page cache (they must be clean first, hence fsync)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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
    args = parser.parse_args()

    dtype = np.dtype(args.dtype)
    rows = args.mb * 2**20 // (args.features * dtype.itemsize)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, args.features), dtype=np.float32).astype(dtype)
    y = rng.integers(0, 10, rows).astype(np.int32)
    nbytes = x.nbytes
    root = tempfile.mkdtemp(prefix="bench-shards-", dir=args.dir)
    print(f"{rows} rows x {args.features} {args.dtype} = {nbytes / 1e9:.2f} GB per repeat, in {root}")
    print(
        f"reads: {'cold (fsync + fadvise DONTNEED)' if args.cold else 'page cache (just written, not dropped)'}"
    )

    times: dict[str, list[float]] = {
        k: []
        for k in (
            "raw write",
            "raw read",
            "raw readinto",
            "pyarrow write",
            "shard write",
            "read_shard",
            "iter_chunks",
        )
    }
    try:
        for rep in range(args.repeats):
            raw_path = os.path.join(root, f"raw-{rep}.bin")

            def raw_write(path: str = raw_path) -> None:
                with open(path, "wb") as f:
                    f.write(memoryview(x).cast("B"))

            times["raw write"].append(timed(raw_write))
            if args.cold:
                evict(raw_path)

            def raw_read(path: str = raw_path) -> np.ndarray:
                with open(path, "rb") as f:
                    return np.frombuffer(f.read(), dtype).reshape(-1, args.features)

            times["raw read"].append(timed(raw_read))
            if args.cold:
                evict(raw_path)
            reused = np.empty_like(x)  # faulted in before timing, like pyarrow's reused pool memory
            reused.fill(0)

            def raw_readinto(path: str = raw_path, out: np.ndarray = reused) -> None:
                with open(path, "rb") as f:
                    f.readinto(memoryview(out).cast("B"))

            times["raw readinto"].append(timed(raw_readinto))
            del reused
            os.unlink(raw_path)

            def pyarrow_write(path: str = raw_path + ".parquet") -> None:  # ShardWriter minus its own work
                schema = shard_schema(args.features, args.dtype)
                blob = pa.FixedSizeBinaryArray.from_buffers(
                    schema.field("x").type, rows, [None, pa.py_buffer(x)]
                )
                table = pa.Table.from_arrays([pa.array(np.arange(rows)), pa.array(y), blob], schema=schema)
                with pq.ParquetWriter(
                    path, schema, compression=None, use_dictionary=False, write_statistics=False
                ) as w:
                    w.write_table(table, row_group_size=64 * 2**20 // (args.features * dtype.itemsize + 12))

            times["pyarrow write"].append(timed(pyarrow_write))
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

            times["shard write"].append(timed(shard_write))
            paths = [storage.uri_for(info.key) for info in infos]
            if args.cold:
                for path in paths:
                    evict(path)
            times["read_shard"].append(timed(lambda paths=paths: [read_shard(p) for p in paths]))
            if args.cold:
                for path in paths:
                    evict(path)

            def stream(storage: LocalStorage = storage, keys: list[str] = [i.key for i in infos]) -> None:  # noqa: B006
                for _ in iter_chunks(storage, keys, batch_rows=args.batch_rows):
                    pass

            times["iter_chunks"].append(timed(stream))
            shutil.rmtree(storage.root)

        fsl_rows = min(rows, args.fsl_mb * 2**20 // (args.features * dtype.itemsize))
        fsl_path = os.path.join(root, "fsl.parquet")

        def fsl_write() -> None:
            values = pa.array(x[:fsl_rows].reshape(-1))
            column = pa.FixedSizeListArray.from_arrays(values, args.features)
            table = pa.table({"row": np.arange(fsl_rows), "label": y[:fsl_rows], "x": column})
            pq.write_table(table, fsl_path, compression=None, use_dictionary=False, write_statistics=False)

        fsl_seconds = timed(fsl_write)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    speed = {k: nbytes / min(v) / 1e9 for k, v in times.items()}
    median = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    for name in times:
        print(f"{name:>13}: {speed[name]:6.2f} GB/s  ({median[name]:.2f} median of {args.repeats})")
    print(
        f"FixedSizeList<{args.dtype}> write: {fsl_rows * args.features * dtype.itemsize / fsl_seconds / 1e9:.2f} GB/s"
    )
    # reads are compared with the faster of the two raw reads
    raw_read = max(("raw read", "raw readinto"), key=speed.__getitem__)
    pairs = [("pyarrow write", "raw write"), ("shard write", "raw write")]
    for shard, raw in [*pairs, ("read_shard", raw_read), ("iter_chunks", raw_read)]:
        ratio = speed[shard] / speed[raw]
        verdict = "ok" if ratio >= TARGET_RATIO else f"below the {TARGET_RATIO} target"
        print(f"{shard} / {raw}: {ratio:.2f}  {verdict}")


if __name__ == "__main__":
    main()
