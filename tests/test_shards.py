"""Activation shards: exact round trips, bounded parts, atomic publishing, and files that
pyarrow, pandas and DuckDB read like any Parquet file."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from probeserve.errors import LayerError, StorageError
from probeserve.shards import (
    CREATED_BY,
    FORMAT_VERSION,
    ShardInfo,
    ShardWriter,
    _decode_struct,
    _encode_struct,
    iter_chunks,
    read_metadata,
    read_shard,
    shard_schema,
    table_x,
)
from probeserve.staging import LOCK_NAME
from probeserve.storage import LocalStorage, is_temp_name

D = 24
META = {
    "probeserve.layer": "blocks.3.mlp",
    "probeserve.layer_index": "3",
    "probeserve.shape": json.dumps([D]),
    "probeserve.reducer": json.dumps({"kind": "mean"}),
    "probeserve.checkpoint": "ckpt/step_000100.pt",
    "probeserve.step": "100",
    "probeserve.split": "train",
    "probeserve.spec_hash": "abc123",
    "probeserve.run": "run-1",
    "team": "interp",
}


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(str(tmp_path / "store"))


@pytest.fixture
def staging(tmp_path) -> str:
    path = tmp_path / "staging"
    path.mkdir()
    return str(path)


def make_writer(
    storage, staging, *, dtype="float32", max_bytes=2**30, row_group_bytes=2**20, **kw
) -> ShardWriter:
    return ShardWriter(
        storage,
        "acts/train",
        n_features=D,
        dtype=dtype,
        metadata=META,
        max_bytes=max_bytes,
        staging_dir=staging,
        row_group_bytes=row_group_bytes,
        **kw,
    )


def batches(n_rows: int, batch: int, seed: int = 0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, D)).astype(dtype)
    y = rng.integers(0, 5, n_rows)
    return x, y, [(x[i : i + batch], y[i : i + batch]) for i in range(0, n_rows, batch)]


def published(storage) -> list[str]:
    return [o.key for o in storage.list("")]


def read_all(storage, infos: list[ShardInfo]):
    shards = [read_shard(storage.read_bytes(i.key)) for i in infos]
    return (
        np.concatenate([s.x for s in shards]),
        np.concatenate([s.y for s in shards]),
        np.concatenate([s.rows for s in shards]),
    )


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_is_byte_exact(storage, staging, dtype):
    x, y, parts = batches(1000, 37, dtype=np.dtype(dtype))
    with make_writer(storage, staging, dtype=dtype) as w:
        for bx, by in parts:
            w.write(bx, by)
    infos = w.close()
    assert [i.key for i in infos] == ["acts/train/part-00000.parquet"]
    shard = read_shard(storage.uri_for(infos[0].key))  # from a local path this time
    assert shard.x.dtype == np.dtype(dtype) and shard.x.shape == (1000, D)
    assert shard.x.tobytes() == x.tobytes()
    assert shard.y.dtype == np.int32 and np.array_equal(shard.y, y)
    assert np.array_equal(shard.rows, np.arange(1000))
    assert infos[0] == ShardInfo(infos[0].key, 1000, os.path.getsize(storage.uri_for(infos[0].key)))
    assert os.listdir(staging) == []


def test_float16_cast_from_float32_and_torch_matches_numpy_cast(storage, staging):
    x, y, _ = batches(300, 300, dtype=np.float32)
    x[0, :4] = [np.nan, 65504.0, -65519.0, 1e-8]  # NaN passes; the others round within range
    with make_writer(storage, staging, dtype="float16") as w:
        w.write(x[:100], y[:100])  # numpy float32
        w.write(torch.from_numpy(x[100:200].astype(np.float64)), torch.from_numpy(y[100:200]))
        w.write(torch.from_numpy(x[200:]).to(torch.bfloat16), y[200:])
    got = read_all(storage, w.close())[0]
    expected = np.concatenate(
        [x[:200].astype(np.float16), torch.from_numpy(x[200:]).to(torch.bfloat16).to(torch.float16).numpy()]
    )
    assert got.tobytes() == expected.tobytes()
    assert np.isnan(got[0, 0]) and got[0, 1] == 65504.0


def test_metadata_round_trip(storage, staging):
    with make_writer(storage, staging, dtype="float16") as w:
        w.write(np.zeros((3, D), np.float16), [0, 1, 2])
    info = w.close()[0]
    expected = {
        **META,
        "probeserve.format_version": str(FORMAT_VERSION),
        "probeserve.n_features": str(D),
        "probeserve.dtype": "float16",
    }
    assert read_metadata(storage.read_bytes(info.key)) == expected
    assert read_metadata(storage.uri_for(info.key)) == expected
    assert read_shard(storage.read_bytes(info.key)).metadata == expected


def test_parts_are_bounded_and_rows_consecutive(storage, staging):
    row_bytes = D * 4 + 12
    max_bytes = 100 * row_bytes  # 100 rows a part
    x, y, parts = batches(1234, 37)
    with make_writer(storage, staging, max_bytes=max_bytes, row_group_bytes=30 * row_bytes) as w:
        for bx, by in parts:
            w.write(bx, by)
            assert len(os.listdir(staging)) == 1  # one private folder ...
            held = os.listdir(os.path.join(staging, os.listdir(staging)[0]))
            assert len([n for n in held if n != LOCK_NAME]) <= 1  # ... holding one part (and its lock)
    infos = w.close()
    assert [i.rows for i in infos] == [100] * 12 + [34]
    assert (
        published(storage)
        == [f"acts/train/part-{i:05d}.parquet" for i in range(13)]
        == [i.key for i in infos]
    )
    for info in infos:
        assert info.bytes == len(storage.read_bytes(info.key))
        assert info.bytes <= max_bytes + 4096  # page headers and footer on top of the counted bytes
        groups = pq.ParquetFile(storage.uri_for(info.key)).metadata
        sizes = [groups.row_group(g).num_rows for g in range(groups.num_row_groups)]
        assert sizes == ([30, 30, 30, 10] if info.rows == 100 else [30, 4])
    got_x, got_y, rows = read_all(storage, infos)
    assert got_x.tobytes() == x.tobytes() and np.array_equal(got_y, y)
    assert np.array_equal(rows, np.arange(1234))


class RemoteLike:
    """A storage that is not a LocalStorage, so readers must fetch objects as bytes."""

    def __init__(self, inner: LocalStorage) -> None:
        self.inner = inner
        self.uri = "fake://bucket"

    def read_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        return self.inner.read_bytes(key, max_bytes=max_bytes)

    def uri_for(self, key: str) -> str:
        return f"{self.uri}/{key}"


@pytest.mark.parametrize("batch_rows", [1, 29, 100, 5000])
@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
def test_iter_chunks_streams_everything_in_order(storage, staging, batch_rows, remote):
    row_bytes = D * 4 + 12
    x, y, parts = batches(1234, 64)
    with make_writer(storage, staging, max_bytes=100 * row_bytes, row_group_bytes=30 * row_bytes) as w:
        for bx, by in parts:
            w.write(bx, by)
    keys = [i.key for i in w.close()]
    chunks = list(iter_chunks(RemoteLike(storage) if remote else storage, keys, batch_rows=batch_rows))
    sizes = [len(cx) for cx, _ in chunks]
    assert all(s == batch_rows for s in sizes[:-1]) and 0 < sizes[-1] <= batch_rows
    assert np.concatenate([cx for cx, _ in chunks]).tobytes() == x.tobytes()
    assert np.array_equal(np.concatenate([cy for _, cy in chunks]), y)


def test_exception_before_any_part_is_complete_publishes_nothing(storage, staging):
    x, y, parts = batches(500, 50)
    with pytest.raises(RuntimeError, match="boom"), make_writer(storage, staging) as w:
        for bx, by in parts:
            w.write(bx, by)
        raise RuntimeError("boom")
    assert published(storage) == []
    assert os.listdir(staging) == []
    with pytest.raises(ValueError, match="aborted"):
        w.write(x[:1], y[:1])


def test_abort_keeps_only_complete_parts(storage, staging):
    row_bytes = D * 4 + 12
    x, _, parts = batches(250, 25)
    w = make_writer(storage, staging, max_bytes=100 * row_bytes, row_group_bytes=10 * row_bytes)
    for bx, by in parts:
        w.write(bx, by)
    w.abort()  # rows 200..249 were in an open part, with row groups already written to it
    keys = published(storage)
    assert keys == ["acts/train/part-00000.parquet", "acts/train/part-00001.parquet"]
    got_x, _, rows = read_all(storage, [ShardInfo(k, 0, 0) for k in keys])
    assert np.array_equal(rows, np.arange(200)) and got_x.tobytes() == x[:200].tobytes()
    assert os.listdir(staging) == []
    assert not any(is_temp_name(name) for _, _, files in os.walk(storage.root) for name in files)


class FailingStorage(LocalStorage):
    """Checks every part is complete when published; fails on the `fail_at`-th publish."""

    def __init__(self, root: str, fail_at: int) -> None:
        super().__init__(root)
        self.fail_at = fail_at
        self.calls = 0

    def publish_file(self, key: str, local_path: str) -> None:
        read_shard(local_path)  # a truncated file would fail here: no footer
        self.calls += 1
        if self.calls == self.fail_at:
            raise StorageError(f"{key}: upload failed")
        super().publish_file(key, local_path)


def test_failed_publish_on_close_cleans_up(tmp_path, staging):
    storage = FailingStorage(str(tmp_path / "store"), fail_at=2)
    row_bytes = D * 4 + 12
    x, y, _ = batches(150, 150)
    w = make_writer(storage, staging, max_bytes=100 * row_bytes)
    w.write(x, y)
    with pytest.raises(StorageError, match="upload failed"):
        w.close()
    assert published(storage) == ["acts/train/part-00000.parquet"]
    assert os.listdir(staging) == []


def test_failed_publish_inside_write_aborts_the_writer(tmp_path, staging):
    storage = FailingStorage(str(tmp_path / "store"), fail_at=1)
    row_bytes = D * 4 + 12
    x, y, _ = batches(150, 150)
    w = make_writer(storage, staging, max_bytes=100 * row_bytes)
    with pytest.raises(StorageError, match="upload failed"):
        w.write(x, y)  # the first part fills up and fails to publish
    with pytest.raises(ValueError, match="aborted"):
        w.write(x, y)
    assert published(storage) == [] and os.listdir(staging) == []


def test_buffered_rows_do_not_alias_the_callers_memory(storage, staging):
    x = np.ones((10, D), np.float32)
    y = np.zeros(10, np.int64).astype(np.int32)
    with make_writer(storage, staging) as w:  # 10 rows stay buffered: far below a row group
        w.write(x, y)
        x[:] = 7.0  # the caller reuses its buffers before the writer flushes
        y[:] = 3
    shard = read_shard(storage.read_bytes(w.close()[0].key))
    assert np.all(shard.x == 1.0) and np.all(shard.y == 0)


@pytest.mark.parametrize("as_torch", [False, True])
def test_float16_overflow_names_the_layer_and_the_fix(storage, staging, as_torch):
    x = np.zeros((4, D), np.float32)
    x[2, 5] = 70000.0
    x[1, 1] = np.nan  # NaN alone is not overflow; make sure it does not hide the inf
    w = make_writer(storage, staging, dtype="float16")
    with pytest.raises(LayerError, match=r"blocks\.3\.mlp.*overflow float16.*output\.dtype: float32"):
        w.write(torch.from_numpy(x) if as_torch else x, np.zeros(4, np.int64))
    w.abort()


def test_infinities_already_in_the_input_are_not_overflow(storage, staging):
    x = np.zeros((2, D), np.float32)
    x[0, 0], x[1, 1] = np.inf, np.nan
    with make_writer(storage, staging, dtype="float16") as w:
        w.write(x, [0, 1])
    shard = read_shard(storage.read_bytes(w.close()[0].key))
    assert np.isposinf(shard.x[0, 0]) and np.isnan(shard.x[1, 1])


def test_plain_pyarrow_reads_as_documented(storage, staging):
    x, y, _ = batches(200, 200, dtype=np.float16)
    with make_writer(storage, staging, dtype="float16", row_group_bytes=64 * (2 * D + 12)) as w:
        w.write(x, y)
    path = storage.uri_for(w.close()[0].key)
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    dtype = np.dtype(meta["probeserve.dtype"]).newbyteorder("<")
    plain = np.frombuffer(table.column("x").combine_chunks().buffers()[1], dtype)
    plain = plain.reshape(-1, int(meta["probeserve.n_features"]))
    assert plain.tobytes() == x.tobytes() == table_x(table).tobytes()
    assert table.column("label").to_pylist() == y.tolist()
    assert table.column("row").to_pylist() == list(range(200))


def test_pandas_reads_as_documented(storage, staging):
    pd = pytest.importorskip("pandas", reason="pandas is not installed; it is not a probeserve dependency")
    x, y, _ = batches(50, 50)
    with make_writer(storage, staging) as w:
        w.write(x, y)
    df = pd.read_parquet(storage.uri_for(w.close()[0].key))
    assert np.frombuffer(b"".join(df["x"]), "<f4").reshape(len(df), -1).tobytes() == x.tobytes()
    assert df["label"].tolist() == y.tolist()


def test_empty_writer_publishes_nothing(storage, staging):
    with make_writer(storage, staging) as w:
        w.write(np.zeros((0, D), np.float32), np.zeros(0, np.int64))
    assert w.close() == [] and published(storage) == [] and os.listdir(staging) == []


def test_bad_input_is_refused_with_what_to_change(storage, staging):
    w = make_writer(storage, staging)
    with pytest.raises(ValueError, match=r"x must have shape \[n, 24\]"):
        w.write(np.zeros((3, D + 1), np.float32), [0, 0, 0])
    with pytest.raises(ValueError, match=r"y must have shape \[3\]"):
        w.write(np.zeros((3, D), np.float32), [0, 0])
    with pytest.raises(ValueError, match="labels must be integers"):
        w.write(np.zeros((3, D), np.float32), [0.5, 0, 0])
    w.abort()
    with pytest.raises(ValueError, match="n_features=24"):
        ShardWriter(
            storage, "k", n_features=D, dtype="float32", metadata={"probeserve.shape": "[5, 5]"}, max_bytes=1
        )
    with pytest.raises(ValueError, match="dtype must be one of"):
        ShardWriter(storage, "k", n_features=D, dtype="bfloat16", metadata={}, max_bytes=1)


def test_reading_something_else_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match="not a readable Parquet file"):
        read_shard(b"not parquet at all")
    path = str(tmp_path / "other.parquet")
    pq.write_table(pa.table({"a": [1, 2]}), path)
    with pytest.raises(StorageError, match="not a probeserve shard"):
        read_metadata(path)


def write_shards(storage, staging, x, y, *, dtype="float32", metadata=META, **kw) -> list[ShardInfo]:
    w = ShardWriter(
        storage,
        "acts/train",
        n_features=x.shape[1],
        dtype=dtype,
        metadata=metadata,
        max_bytes=kw.pop("max_bytes", 2**30),
        staging_dir=staging,
        **kw,
    )
    with w:
        for start in range(0, len(x), 37):
            w.write(x[start : start + 37], y[start : start + 37])
    return w.close()


def own_metadata(metadata: dict[str, str], n_features: int, dtype: str) -> dict[str, str]:
    own = {
        "probeserve.format_version": "1",
        "probeserve.n_features": str(n_features),
        "probeserve.dtype": dtype,
    }
    return {**metadata, **own}


def test_pyarrow_sees_the_shard_schema_metadata_and_row_groups(storage, staging):
    # 23 metadata entries and a 300-byte value: Thrift's long list and multi-byte length forms
    metadata = {**META, **{f"extra.{i}": "v" * 30 * i for i in range(11)}}
    x, y, _ = batches(500, 500, dtype=np.float16)
    row_bytes = 2 * D + 12
    infos = write_shards(
        storage,
        staging,
        x,
        y,
        dtype="float16",
        metadata=metadata,
        max_bytes=300 * row_bytes,
        row_group_bytes=128 * row_bytes,
    )
    assert [i.rows for i in infos] == [300, 200]
    expected_meta = own_metadata(metadata, D, "float16")
    tables = []
    for info, groups in zip(infos, ([128, 128, 44], [128, 72]), strict=True):
        path = storage.uri_for(info.key)
        assert pq.read_schema(path).equals(shard_schema(D, "float16", expected_meta), check_metadata=True)
        parquet = pq.ParquetFile(path).metadata
        assert parquet.created_by == CREATED_BY and parquet.num_rows == info.rows
        assert [parquet.row_group(g).num_rows for g in range(parquet.num_row_groups)] == groups
        for g in range(parquet.num_row_groups):
            for c, (name, kind) in enumerate(
                [("row", "INT64"), ("label", "INT32"), ("x", "FIXED_LEN_BYTE_ARRAY")]
            ):
                column = parquet.row_group(g).column(c)
                assert (column.path_in_schema, column.physical_type) == (name, kind)
                assert column.compression == "UNCOMPRESSED" and column.statistics is None
                assert column.num_values == groups[g] and "PLAIN" in column.encodings
        table = pq.read_table(path)
        assert {k.decode(): v.decode() for k, v in table.schema.metadata.items()} == expected_meta
        tables.append(table)
    assert [r["row"] for t in tables for r in t.to_pylist()] == list(range(500))
    assert [r["label"] for t in tables for r in t.to_pylist()] == y.tolist()
    assert [r["x"] for t in tables for r in t.to_pylist()] == [row.tobytes() for row in x]
    assert np.concatenate([table_x(t) for t in tables]).tobytes() == x.tobytes()
    batches_read = list(pq.ParquetFile(storage.uri_for(infos[0].key)).iter_batches(batch_size=50))
    assert sum(len(b) for b in batches_read) == 300


def test_duckdb_reads_shards(storage, staging):
    duckdb = pytest.importorskip("duckdb")
    x, y, _ = batches(300, 300)
    row_bytes = 4 * D + 12
    infos = write_shards(storage, staging, x, y, max_bytes=200 * row_bytes, row_group_bytes=64 * row_bytes)
    assert len(infos) == 2
    paths = [storage.uri_for(i.key) for i in infos]
    files = f"[{', '.join(repr(p) for p in paths)}]"
    got = duckdb.sql(
        f"select count(*), min(row), max(row), sum(label), min(octet_length(x)) from read_parquet({files})"
    ).fetchall()
    assert got == [(300, 0, 299, int(y.sum()), 4 * D)]
    rows = duckdb.sql(f"select row, label, x from read_parquet({files}) order by row").fetchall()
    assert [r[0] for r in rows] == list(range(300)) and [r[1] for r in rows] == y.tolist()
    assert b"".join(r[2] for r in rows) == x.tobytes()
    kv = duckdb.sql(f"select key, value from parquet_kv_metadata({paths[0]!r})").fetchall()
    assert {k.decode(): v.decode() for k, v in kv} == own_metadata(META, D, "float32")
    count = duckdb.sql(f"select count(*) from {paths[0]!r} where row % 7 = 0").fetchall()
    assert count == [(sum(1 for r in range(200) if r % 7 == 0),)]


def test_a_row_group_of_one_large_page_reads_everywhere(storage, staging):
    duckdb = pytest.importorskip("duckdb")
    n_features, n = 4096, 8200  # one 67 MB x page
    x = np.random.default_rng(1).integers(0, 2**15, (n, n_features), dtype=np.uint16).view(np.float16)
    y = np.arange(n) % 3
    with ShardWriter(
        storage,
        "big",
        n_features=n_features,
        dtype="float16",
        metadata={},
        max_bytes=2**30,
        staging_dir=staging,
    ) as w:
        for start in range(0, n, 1000):
            w.write(x[start : start + 1000], y[start : start + 1000])
    path = storage.uri_for(w.close()[0].key)
    parquet = pq.ParquetFile(path).metadata
    assert parquet.num_row_groups == 1 and parquet.row_group(0).column(2).total_compressed_size > 64 * 2**20
    assert np.array_equal(table_x(pq.read_table(path)).view(np.uint16), x.view(np.uint16))
    got = duckdb.sql(f"select count(*), max(row), sum(label), sum(octet_length(x)) from {path!r}").fetchall()
    assert got == [(n, n - 1, int(y.sum()), x.nbytes)]
    shard = read_shard(path)
    assert np.array_equal(shard.x.view(np.uint16), x.view(np.uint16)) and np.array_equal(shard.y, y)


@pytest.mark.parametrize("groups", [1, 3])
def test_our_reader_and_pyarrow_agree(storage, staging, groups):
    x, y, _ = batches(240, 240)
    infos = write_shards(storage, staging, x, y, row_group_bytes=240 // groups * (4 * D + 12))
    path = storage.uri_for(infos[0].key)
    assert pq.ParquetFile(path).metadata.num_row_groups == groups
    table = pq.read_table(path)
    for shard in (read_shard(path), read_shard(storage.read_bytes(infos[0].key))):
        assert shard.x.tobytes() == table_x(table).tobytes() == x.tobytes()
        assert np.array_equal(shard.y, table.column("label").to_numpy()) and shard.y.dtype == np.int32
        assert np.array_equal(shard.rows, table.column("row").to_numpy()) and shard.rows.dtype == np.int64
        assert shard.x.ctypes.data % 16 == 0  # page values are aligned, so are views of them
    if groups == 1:  # a single row group is viewed in place, read-only
        assert not read_shard(path).x.flags.writeable


def test_a_shard_written_by_pyarrow_is_read_through_pyarrow(storage, tmp_path):
    """Files with the shard schema written by other Parquet writers (multi-page chunks here)."""
    x, y, _ = batches(300, 300)
    schema = shard_schema(D, "float32", own_metadata(META, D, "float32"))
    blob = pa.FixedSizeBinaryArray.from_buffers(schema.field("x").type, 300, [None, pa.py_buffer(x)])
    table = pa.Table.from_arrays(
        [pa.array(np.arange(300)), pa.array(y.astype(np.int32)), blob], schema=schema
    )
    path = str(tmp_path / "store" / "pa.parquet")
    os.makedirs(os.path.dirname(path))
    pq.write_table(table, path, row_group_size=128, data_page_size=1000, use_dictionary=False)
    assert pq.ParquetFile(path).metadata.created_by != CREATED_BY
    shard = read_shard(path)
    assert shard.x.tobytes() == x.tobytes() and np.array_equal(shard.y, y)
    assert np.array_equal(shard.rows, np.arange(300)) and shard.metadata == own_metadata(META, D, "float32")
    chunks = list(iter_chunks(storage, ["pa.parquet"], batch_rows=100))
    assert np.concatenate([c for c, _ in chunks]).tobytes() == x.tobytes()


def test_truncated_or_damaged_shards_are_refused(storage, staging, tmp_path):
    x, y, _ = batches(100, 100)
    infos = write_shards(storage, staging, x, y, row_group_bytes=40 * (4 * D + 12))
    data = storage.read_bytes(infos[0].key)
    for size in (0, 3, 4, 100, len(data) // 2, len(data) - 9, len(data) - 8, len(data) - 1):
        path = tmp_path / f"cut-{size}.parquet"
        path.write_bytes(data[:size])
        for source in (data[:size], str(path)):
            with pytest.raises(StorageError, match="not a readable Parquet file"):
                read_shard(source)
    # a footer that no longer matches the pages: the first x page header overwritten
    offset = pq.ParquetFile(pa.BufferReader(data)).metadata.row_group(0).column(2).data_page_offset
    damaged = data[:offset] + bytes(8) + data[offset + 8 :]
    with pytest.raises(StorageError, match="row group 0 is not the single plain page.*damaged"):
        read_shard(damaged)
    storage.publish_bytes("damaged.parquet", damaged)
    with pytest.raises(StorageError, match="damaged"):
        list(iter_chunks(storage, ["damaged.parquet"], batch_rows=10))


def test_thrift_compact_round_trip():
    nested = [(1, 5, -1), (2, 8, b"")]
    fields = [
        (1, 5, 2**31 - 1),
        (2, 6, -(2**63)),
        (3, 8, "x" * 200),
        (20, 9, (5, list(range(-20, 20)))),  # a field id jump over 15, a long list
        (21, 9, (12, [nested] * 3)),
        (300, 12, nested),
    ]
    encoded = _encode_struct(fields)
    decoded, end = _decode_struct(encoded + b"tail", 0)
    assert end == len(encoded)
    assert decoded == {
        1: 2**31 - 1,
        2: -(2**63),
        3: b"x" * 200,
        20: list(range(-20, 20)),
        21: [{1: -1, 2: b""}] * 3,
        300: {1: -1, 2: b""},
    }
    with pytest.raises(IndexError):
        _decode_struct(encoded[:-3], 0)


@pytest.mark.integration
def test_shards_through_s3(s3_bucket, s3_server, staging):
    from probeserve.storage import S3Storage

    storage = S3Storage(s3_bucket, "run-1", endpoint_url=s3_server.endpoint)
    x, y, parts = batches(500, 50, dtype=np.float16)
    with make_writer(storage, staging, dtype="float16", max_bytes=200 * (2 * D + 12)) as w:
        for bx, by in parts:
            w.write(bx, by)
    infos = w.close()
    assert [o.key for o in storage.list("acts/")] == [i.key for i in infos] and len(infos) == 3
    chunks = list(iter_chunks(storage, [i.key for i in infos], batch_rows=64))
    assert np.concatenate([c for c, _ in chunks]).tobytes() == x.tobytes()
    assert np.array_equal(np.concatenate([c for _, c in chunks]), y)
    assert os.listdir(staging) == []
