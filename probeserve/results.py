"""The results table: one committed row per (run, checkpoint, layer).

Each work item publishes its row as its own small Parquet file under
`{output}/results/{run}/{checkpoint dir}/{layer}.parquet`, atomically, so an item is done
exactly when its file exists and a reader never sees half a row. Together the files form one
Parquet dataset with the schema below; `load` reads it as one Arrow table, and any Parquet
reader (pandas, DuckDB, Spark) can read the folder directly.

A failed item is a row too (`status = "failed"`, `error` set), so failures are visible in the
same table; the next run retries it and, on success, replaces the row. A result file that
cannot be read as a row (damaged in storage, or edited by hand) counts as no row: runs and the
watch daemon do the item again, and its new row replaces the file. Reading the whole table
(`load`, `probeserve query`) refuses it instead, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.parquet as pq

from probeserve.errors import StorageError
from probeserve.storage import Storage, join, open_storage

log = logging.getLogger(__name__)

RESULTS_DIR = "results"
RUNS_DIR = "runs"  # runs/{run}/spec.yaml, spec.json, layers.json
# The start of the `error` of an item whose worker was lost (killed, out of memory, node gone)
# rather than one that failed on its own: the watch daemon does these again, under
# --max-attempts, instead of recording the checkpoint as failed.
LOST = "lost: "

# (name, type, description): the public columns, defined once.
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("run", pa.string(), "the spec's run name"),
    ("spec_hash", pa.string(), "hash of the spec parts that change an answer (model, data, reducer, probe)"),
    ("checkpoint", pa.string(), "weights key relative to checkpoints.uri"),
    ("step", pa.int64(), "training step read from the checkpoint key"),
    ("layer", pa.string(), "probe point: 'input', a module name, or 'module:in'"),
    ("layer_index", pa.int32(), "position of the probe point in the forward pass (0 = input)"),
    ("n_features", pa.int64(), "features the probe saw, after the reducer"),
    ("num_classes", pa.int32(), "classes in the probe dataset"),
    ("n_train", pa.int64(), "training examples"),
    ("n_val", pa.int64(), "validation examples (early stopping)"),
    ("n_test", pa.int64(), "test examples"),
    ("train_error", pa.float64(), "fraction misclassified on train"),
    ("val_error", pa.float64(), "fraction misclassified on val"),
    ("test_error", pa.float64(), "fraction misclassified on test"),
    ("train_loss", pa.float64(), "mean cross-entropy on train (no L2 term)"),
    ("val_loss", pa.float64(), "mean cross-entropy on val"),
    ("test_loss", pa.float64(), "mean cross-entropy on test"),
    ("chance_error", pa.float64(), "test error of always predicting the most frequent train class"),
    ("epochs", pa.int32(), "solver epochs run"),
    ("best_epoch", pa.int32(), "epoch whose weights were kept (best val loss)"),
    ("status", pa.string(), "'ok' or 'failed'"),
    ("error", pa.string(), "what went wrong; null when ok"),
    ("seconds", pa.float64(), "wall time of the probe (and of extraction, for failed extraction)"),
    ("device", pa.string(), "where the probe trained: cpu or cuda:N"),
    ("finished_at", pa.timestamp("ms", tz="UTC"), "when the row was committed"),
    ("precision", pa.string(), "precision of the extraction's forward pass: fp32, bf16 or fp16"),
]
SCHEMA = pa.schema([pa.field(n, t, metadata={"description": d}) for n, t, d in COLUMNS])
COLUMN_NAMES = [c[0] for c in COLUMNS]
METRICS = [
    "train_error",
    "val_error",
    "test_error",
    "train_loss",
    "val_loss",
    "test_loss",
]


def checkpoint_dir(checkpoint: str, step: int) -> str:
    """A readable, unique, path-safe folder name for a checkpoint key."""
    digest = hashlib.sha1(checkpoint.encode()).hexdigest()[:8]
    return f"step={step:012d}-{digest}"


def layer_stem(layer: str) -> str:
    """A layer name made path-safe (and reversible), for keys per layer."""
    return quote(layer, safe="")


def layer_file(layer: str) -> str:
    return layer_stem(layer) + ".parquet"


def run_key(run: str, name: str) -> str:
    """Key of a run-level object: `runs/{run}/{name}` (spec.yaml, spec.json, layers.json)."""
    return join(RUNS_DIR, run, name)


def output_root(uri: str) -> str:
    """The output URI, given either it or its `results/` folder."""
    root = uri.rstrip("/")
    if root.endswith("/" + RESULTS_DIR) or root == RESULTS_DIR:
        root = root[: -len(RESULTS_DIR)].rstrip("/") or "."
    return root


def layer_from_file(name: str) -> str:
    return unquote(name.removesuffix(".parquet"))


def result_key(run: str, checkpoint: str, step: int, layer: str) -> str:
    return join(RESULTS_DIR, run, checkpoint_dir(checkpoint, step), layer_file(layer))


def make_row(**values: Any) -> dict[str, Any]:
    """A full row: unknown keys are a programming error, missing ones are null."""
    unknown = set(values) - set(COLUMN_NAMES)
    assert not unknown, f"unknown result columns {sorted(unknown)}"
    row = {name: values.get(name) for name in COLUMN_NAMES}
    if row["finished_at"] is None:
        row["finished_at"] = int(time.time() * 1000)
    return row


def commit(storage: Storage, row: Mapping[str, Any]) -> str:
    """Publish one row atomically (replacing a previous row of the same item); return its key."""
    table = pa.Table.from_pylist([make_row(**row)], schema=SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    key = result_key(row["run"], row["checkpoint"], row["step"], row["layer"])
    storage.publish_bytes(key, buf.getvalue().to_pybytes())
    return key


class Damaged(StorageError):
    """An object that probeserve wrote, found damaged (cut short, edited by hand)."""


def read_json(storage: Storage, key: str) -> Any:
    """A JSON object that probeserve wrote; a damaged one raises `Damaged`, naming it."""
    data = storage.read_bytes(key)  # a storage error propagates as itself
    try:
        return json.loads(data)
    except ValueError as e:
        raise Damaged(f"{storage.uri_for(key)}: damaged ({e}); it is not JSON probeserve wrote") from None


class DamagedResult(Damaged):
    """A file under results/ that is not a readable result row."""

    def __init__(self, uri: str, why: str) -> None:
        super().__init__(f"{uri}: not a probeserve result file ({why}); move it out of results/")
        self.uri, self.why = uri, why


def read_row(storage: Storage, run: str, checkpoint: str, step: int, layer: str) -> dict[str, Any] | None:
    """The committed row of one item, or None (also when its file is damaged: see above)."""
    key = result_key(run, checkpoint, step, layer)
    if storage.stat(key) is None:
        return None
    return read_row_file(storage, key)


def read_row_file(storage: Storage, key: str) -> dict[str, Any] | None:
    """The row in one result file; None, with a warning, when the file is damaged."""
    try:
        return _read_file(storage, key).to_pylist()[0]
    except DamagedResult as e:
        log.warning(
            "%s: damaged result file (%s); counting it as no result, so the item is done again", e.uri, e.why
        )
        return None


def is_done(storage: Storage, run: str, checkpoint: str, step: int, layer: str) -> bool:
    row = read_row(storage, run, checkpoint, step, layer)
    return row is not None and row["status"] == "ok"


# Columns every result file has had since the first release. A file without one of these is
# not a result file; a file without a column added later is an older row, whose new columns
# read as null.
REQUIRED_COLUMNS = ("run", "checkpoint", "step", "layer", "status")


def conform(table: pa.Table) -> pa.Table:
    """A table of result rows in today's schema: columns added since it was written are
    null, columns this version does not know are dropped (a newer writer's)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise KeyError(f"no column {missing[0]!r}")
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _read_file(storage: Storage, key: str) -> pa.Table:
    data = storage.read_bytes(key)  # a storage error propagates as itself
    try:
        # An Arrow buffer, not io.BytesIO: a Python file object read by pyarrow's threads can be
        # destroyed by one of them during interpreter shutdown, which aborts the process
        # ("terminate called without an active exception", exit 134) after a correct run.
        table = conform(pq.read_table(pa.BufferReader(data), use_threads=False))
        if table.num_rows != 1:
            raise ValueError(f"{table.num_rows} rows, not 1")
        return table
    except (pa.ArrowException, KeyError, ValueError) as e:
        raise DamagedResult(storage.uri_for(key), str(e)) from None


def result_keys(storage: Storage, run: str | None = None) -> list[str]:
    prefix = join(RESULTS_DIR, run) + "/" if run else RESULTS_DIR + "/"
    return [o.key for o in storage.list(prefix) if o.key.endswith(".parquet")]


def read_table(storage: Storage, run: str | None = None) -> pa.Table:
    """Every committed row (of one run, or all), sorted by run, step, layer_index."""
    tables = [_read_file(storage, k) for k in result_keys(storage, run)]
    if not tables:
        return SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    return table.sort_by([("run", "ascending"), ("step", "ascending"), ("layer_index", "ascending")])


def item_status(storage: Storage, run: str) -> dict[tuple[str, str], str]:
    """{(checkpoint, layer): status} of every committed row of a run; damaged files are left out."""
    rows = (read_row_file(storage, k) for k in result_keys(storage, run))
    return {(r["checkpoint"], r["layer"]): r["status"] for r in rows if r is not None}


def load(uri: str, *, run: str | None = None, s3_endpoint: str | None = None, pandas: bool = False) -> Any:
    """Read the results under an output URI (or its `results/` folder) as an Arrow table.

    >>> table = load("demo-output")                # doctest: +SKIP
    >>> df = load("s3://bucket/probes", pandas=True)  # doctest: +SKIP
    """
    table = read_table(open_output(output_root(uri), s3_endpoint=s3_endpoint), run)
    return table.to_pandas() if pandas else table


def open_output(uri: str, *, s3_endpoint: str | None = None, must_exist: bool = True) -> Storage:
    """An output location. A local one that is a file is an error, and so is a missing one
    that is to be read (`must_exist`: a typo); a run creates it."""
    storage = open_storage(uri, s3_endpoint=s3_endpoint)
    root = getattr(storage, "root", None)  # a local folder
    if root is not None and os.path.exists(root) and not os.path.isdir(root):
        raise StorageError(f"output.uri: {root} is a file, not a folder")
    if root is not None and must_exist and not os.path.exists(root):
        raise StorageError(f"{root}: no such output folder")
    return storage


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([make_row(**r) for r in rows], schema=SCHEMA)


def error_grid(
    rows: list[dict[str, Any]], metric: str = "test_error"
) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows as a layer-by-step grid: (columns, one dict per layer in forward order).

    A cell holds the metric, "FAILED" for a failed item, or None for one not done yet."""
    steps = sorted({r["step"] for r in rows})
    layers = sorted({(r["layer_index"], r["layer"]) for r in rows})
    by_item = {(r["layer"], r["step"]): r for r in rows}
    columns = ["layer"] + [f"step {s}" for s in steps]
    grid = []
    for _, layer in layers:
        line: dict[str, Any] = {"layer": layer}
        for s in steps:
            r = by_item.get((layer, s))
            line[f"step {s}"] = None if r is None else (r[metric] if r["status"] == "ok" else "FAILED")
        grid.append(line)
    return columns, grid
