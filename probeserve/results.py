"""The results table: one committed row per (run, checkpoint, layer).

Each work item publishes its row as its own small Parquet file under
`{output}/results/{run}/{checkpoint dir}/{layer}.parquet`, atomically, so an item is done
exactly when its file exists and a reader never sees half a row. Together the files form one
Parquet dataset with the schema below; `load` reads it as one Arrow table, and any Parquet
reader (pandas, pyarrow, DuckDB, polars) reads the folder directly with its defaults.

Two things keep it so. No folder name under `results/` or `activations/` holds a `=`: every
one of those readers takes `name=value` folders for hive partitions and turns `name` into a
column (`step=...` clashed with the `step` column). And every file of an output has the same
schema: default readers take the first file's schema (pyarrow, pandas) or refuse files that
differ (DuckDB, polars). `{output}/layout.json` records the layout and the columns the rows
were written with; a run refuses an output written in another layout or with other columns,
and `probeserve migrate` (probeserve/migrate.py) brings one up to date. Reading (`load`,
`query`, `status`, `plan`) takes both layouts and any older schema.

A failed item is a row too (`status = "failed"`, `error` set), so failures are visible in the
same table; the next run retries it and, on success, replaces the row. A result file that
cannot be read as a row (damaged in storage, or edited by hand) counts as no row: runs and the
watch daemon do the item again, and its new row replaces the file. Reading the whole table
(`load`, `probeserve query`) refuses it instead, naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from probeserve.errors import StorageError

# The key layout is defined in probeserve/layout.py. These names of it are also found here,
# where they used to live, for the code that still reads them from this module.
from probeserve.layout import (  # noqa: F401
    ACTIVATIONS_DIR,
    LAYOUT,
    LAYOUT_KEY,
    LEDGER_DIR,
    PER_CHECKPOINT_DIRS,
    RESULTS_DIR,
    RUNNING_DIR,
    RUNS_DIR,
    checkpoint_dir,
    checkpoint_dir_of,
    from_v1_dir,
    layer_file,
    layer_from_file,
    layer_stem,
    output_root,
    recorded_run,
    result_key,
    results_prefix,
    run_key,
    runs_prefix,
    v1_checkpoint_dir,
)
from probeserve.storage import Storage, open_storage

log = logging.getLogger(__name__)

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
    ("n_skipped", pa.int64(), "examples that could not be decoded and were left out, over all splits"),
    ("skipped", pa.list_(pa.string()), "their names (at most 100)"),
    ("weights_cast", pa.string(), "float weights cast on loading: '2 tensors float64->float32: a, b'"),
    (
        "hit_max_epochs",
        pa.bool_(),
        "the probe ran probe.max_epochs epochs without early stopping or converging: its "
        "errors may still fall with more epochs; null when failed",
    ),
    ("precision", pa.string(), "precision of the extraction's forward pass: fp32, bf16 or fp16"),
    # issue 14: l2 chosen on validation, intervals, per-class errors, control tasks, MDL
    ("l2", pa.float64(), "the l2 of this row's probe: of probe.l2's values, the lowest val error"),
    ("l2_grid", pa.list_(pa.float64()), "probe.l2's values, all trained (stacked) on the same data"),
    ("grid_val_errors", pa.list_(pa.float64()), "val error of each l2_grid value (null: that probe failed)"),
    ("grid_val_losses", pa.list_(pa.float64()), "val loss of each l2_grid value"),
    ("train_error_low", pa.float64(), "Wilson 95% interval of train_error: lower end"),
    ("train_error_high", pa.float64(), "upper end"),
    ("val_error_low", pa.float64(), "Wilson 95% interval of val_error: lower end"),
    ("val_error_high", pa.float64(), "upper end"),
    ("test_error_low", pa.float64(), "Wilson 95% interval of test_error: lower end"),
    ("test_error_high", pa.float64(), "upper end"),
    ("class_names", pa.list_(pa.string()), "the class of each label, where the data names them"),
    ("test_class_counts", pa.list_(pa.int64()), "test examples of each class"),
    ("test_class_errors", pa.list_(pa.float64()), "test error of each class (null: no test example)"),
    (
        "test_class_confused_with",
        pa.list_(pa.int32()),
        "per class, the label its test examples are most often mistaken for (null: never wrong)",
    ),
    ("test_class_confused_count", pa.list_(pa.int64()), "how many of its test examples were"),
    (
        "confusion",
        pa.list_(pa.list_(pa.int64())),
        "test counts [true label][predicted label], up to probe.confusion_max_classes classes",
    ),
    ("control_error", pa.float64(), "probe.control: test error of the same probe on control labels"),
    ("control_error_low", pa.float64(), "Wilson 95% interval of control_error: lower end"),
    ("control_error_high", pa.float64(), "upper end"),
    ("control_train_error", pa.float64(), "probe.control: train error on control labels (memorisation)"),
    ("selectivity", pa.float64(), "control_error - test_error (Hewitt & Liang 2019)"),
    (
        "mdl_bits",
        pa.float64(),
        "probe.mdl: online code length of the train labels, bits (Voita & Titov 2020)",
    ),
    ("mdl_compression", pa.float64(), "uniform code length (n_train log2 num_classes) / mdl_bits"),
    ("mdl_block_bits", pa.list_(pa.float64()), "bits of each online-code block (the first: uniform code)"),
]
MAX_SKIPPED = 100  # names of undecodable examples kept in a row (the manifest keeps more)
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
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def arrow_owned(data: bytes) -> pa.Buffer:
    """A copy of `data` in memory that Arrow owns, for pyarrow readers.

    pyarrow can drop its last reference to a reader's source on one of its own threads, after
    the call that read it has returned. A source that wraps a Python object (bytes, io.BytesIO,
    `pa.py_buffer`, `pa.BufferReader(bytes)`) must take the GIL to be freed; if that happens
    while the interpreter shuts down, Python ends the thread inside C++ code and the process
    aborts (`terminate called without an active exception`, exit 134) after a correct run.
    Memory Arrow owns is freed without the GIL."""
    buf = pa.allocate_buffer(len(data))
    memoryview(buf).cast("B")[:] = data
    return buf


def read_parquet_bytes(data: bytes) -> pa.Table:
    """A whole Parquet file held in memory, read on this thread alone from Arrow-owned memory
    (see `arrow_owned`): no pre-buffering on pyarrow's IO threads, no decoding threads."""
    return pq.ParquetFile(pa.BufferReader(arrow_owned(data)), pre_buffer=False).read(use_threads=False)


def _read_file(storage: Storage, key: str) -> pa.Table:
    data = storage.read_bytes(key)  # a storage error propagates as itself
    try:
        # Arrow-owned memory (see `arrow_owned`), read on this thread alone: no pre-buffering
        # (which reads on pyarrow's IO threads) and no decoding threads.
        table = conform(read_parquet_bytes(data))
        if table.num_rows != 1:
            raise ValueError(f"{table.num_rows} rows, not 1")
        return table
    except (pa.ArrowException, KeyError, ValueError) as e:
        raise DamagedResult(storage.uri_for(key), str(e)) from None


def result_keys(storage: Storage, run: str | None = None) -> list[str]:
    """Keys of the result files (of one run, or all), in either layout."""
    return [o.key for o in storage.list(results_prefix(run)) if o.key.endswith(".parquet")]


def run_names(storage: Storage) -> list[str]:
    """The runs an output holds: those with a recorded spec, and those with result rows (an
    output written before specs were recorded, or whose `runs/` was lost)."""
    recorded = {r for o in storage.list(runs_prefix()) if (r := recorded_run(o.key))}
    with_rows = {key.split("/")[1] for key in result_keys(storage) if key.count("/") >= 2}
    return sorted(recorded | with_rows)


def _one_per_item(found: Iterable[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """The keys to read, one per item, from (key, row) pairs.

    A `probeserve migrate` killed between its copy and its delete leaves an item's row under
    both layouts (the same row twice); the copy in the current layout stands."""
    chosen: dict[tuple[str, str, str], str] = {}
    for key, row in found:
        item = (row["run"], row["checkpoint"], row["layer"])
        current = result_key(row["run"], row["checkpoint"], row["step"], row["layer"])
        if item not in chosen or key == current:
            chosen[item] = key
    return list(chosen.values())


def read_table(storage: Storage, run: str | None = None) -> pa.Table:
    """Every committed row (of one run, or all), sorted by run, step, layer_index."""
    tables = {k: _read_file(storage, k) for k in result_keys(storage, run)}
    if not tables:
        return SCHEMA.empty_table()
    keep = _one_per_item((k, t.to_pylist()[0]) for k, t in tables.items())  # one row each
    table = pa.concat_tables([tables[k] for k in keep])
    return table.sort_by([("run", "ascending"), ("step", "ascending"), ("layer_index", "ascending")])


def item_status(storage: Storage, run: str) -> dict[tuple[str, str], str]:
    """{(checkpoint, layer): status} of every committed row of a run; damaged files are left out."""
    rows = {k: read_row_file(storage, k) for k in result_keys(storage, run)}
    found = {k: r for k, r in rows.items() if r is not None}
    return {
        (found[k]["checkpoint"], found[k]["layer"]): found[k]["status"] for k in _one_per_item(found.items())
    }


class LayoutError(StorageError):
    """An output whose files are in another layout or schema than this probeserve writes.

    Adding rows to it would leave folders that default readers cannot read as one table, so
    a run refuses it and names the command that brings it up to date."""


def read_layout(storage: Storage) -> dict[str, Any] | None:
    """The output's `layout.json`, or None where there is none (a new output, or layout 1)."""
    if storage.stat(LAYOUT_KEY) is None:
        return None
    info = read_json(storage, LAYOUT_KEY)
    if not isinstance(info, dict):
        raise Damaged(f"{storage.uri_for(LAYOUT_KEY)}: damaged (not a JSON object)")
    # A layout that is not a whole number may be a newer probeserve's (`written_by_newer`);
    # a missing one, or one of this probeserve's layouts with columns that are not a list of
    # names, is damage: checked here, so `run` and `migrate` name the file instead of failing
    # with a traceback (`"columns": 5`) or calling it newer (`{}`)
    layout, columns = info.get("layout"), info.get("columns", [])
    if layout is None or isinstance(layout, bool):
        raise Damaged(
            f'{storage.uri_for(LAYOUT_KEY)}: damaged ("layout" is {json.dumps(layout)}, not a number)'
        )
    if isinstance(layout, int) and layout <= LAYOUT:
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise Damaged(f'{storage.uri_for(LAYOUT_KEY)}: damaged ("columns" is not a list of column names)')
    return info


def layout_body() -> bytes:
    return json.dumps({"layout": LAYOUT, "columns": COLUMN_NAMES}, indent=1).encode()


def written_by_newer(info: Mapping[str, Any] | None) -> bool:
    """Whether a layout record is of a newer probeserve (a later layout, or more columns)."""
    if info is None:
        return False
    layout, columns = info.get("layout"), list(info.get("columns") or [])
    more_columns = columns[: len(COLUMN_NAMES)] == COLUMN_NAMES and len(columns) > len(COLUMN_NAMES)
    return not isinstance(layout, int) or layout > LAYOUT or more_columns


def layout_problem(info: Mapping[str, Any] | None) -> str | None:
    """What keeps this probeserve from adding rows to an output with this layout record, or None."""
    if info is None:
        return "it was written by an older probeserve (no layout.json, checkpoint folders named step=...)"
    layout, columns = info.get("layout"), list(info.get("columns") or [])
    if written_by_newer(info):
        extra = [c for c in columns if c not in COLUMN_NAMES]
        return (
            f"it was written by a newer probeserve (layout {layout}"
            + (f", columns {', '.join(extra)}" if extra else "")
            + "); upgrade probeserve to add to it"
        )
    if isinstance(layout, int) and layout < LAYOUT:  # not an int: written_by_newer said so
        return f"it was written by an older probeserve (layout {layout})"
    if columns != COLUMN_NAMES:
        missing = [c for c in COLUMN_NAMES if c not in columns]
        return "its rows were written without the column(s) " + (", ".join(missing) or "in this order")
    return None


def v1_key(storage: Storage) -> str | None:
    """A key in layout 1 (under a `step=...` checkpoint folder), or None. It lists every
    per-checkpoint folder, so it is for outputs without layout.json: a new one (empty), or an
    old one (its first key answers)."""
    for top in PER_CHECKPOINT_DIRS:
        for obj in storage.list(top + "/"):
            if from_v1_dir(checkpoint_dir_of(obj.key) or ""):
                return obj.key
    return None


def check_layout(storage: Storage) -> None:
    """Before a run or a watch daemon adds anything: the output is in today's layout and schema.

    A new output gets its `layout.json` here, create-only, so first runs racing on one output
    agree. An output without a record that holds a layout-1 key (a checkpoint folder named
    `step=...`) was written by a probeserve before layout.json existed."""
    for _ in range(3):
        info = read_layout(storage)
        if info is None:
            if v1_key(storage) is None:
                if storage.create_only(LAYOUT_KEY, layout_body()):
                    return
                continue  # another run created it just now: read theirs
        problem = layout_problem(info)
        if problem is None:
            return
        fix = "" if written_by_newer(info) else f"; run `probeserve migrate {storage.uri}` first"
        raise LayoutError(f"{storage.uri}: {problem}{fix}")
    raise LayoutError(f"{storage.uri_for(LAYOUT_KEY)}: appears and disappears; is something deleting it?")


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


def _looks_like_output(folder: str) -> bool:
    """A local folder that a run wrote: its `layout.json`, or (an older layout) both `results/`
    and `runs/` (either alone is a common name for a folder of one's own)."""
    return os.path.isfile(os.path.join(folder, LAYOUT_KEY)) or all(
        os.path.isdir(os.path.join(folder, d)) for d in (RESULTS_DIR, RUNS_DIR)
    )


NEAR_OUTPUTS_SHOWN = 5  # outputs named in `not_an_output`'s line
_NEAR_ENTRIES = 1000  # entries of a folder looked at for outputs below it, at most


def not_an_output(uri: str, *, s3_endpoint: str | None = None) -> str | None:
    """Why a local folder that holds no results is not an output, when an output is near it:
    it is inside one (`demo-output/runs`, `demo-output/results/demo`), or outputs are in the
    folders below it (`probes`, which holds `probes/gaussian-mlp`). None otherwise: an empty
    folder, or one a run has not written to yet, simply has no results yet.

    Reading such a folder finds no rows, and "no results yet" with exit 0 would say the sweep
    has not started. Local folders: at most `_NEAR_ENTRIES` entries of each folder are looked
    at. S3 prefixes: see `_s3_not_an_output`."""
    if uri.startswith("s3://"):
        return _s3_not_an_output(uri, s3_endpoint)
    if "://" in uri and not uri.startswith("file://"):
        return None
    path = os.path.abspath(urlsplit(uri).path if uri.startswith("file://") else uri)
    if not os.path.isdir(path) or _looks_like_output(path):
        return None
    parent = os.path.dirname(path)
    while parent != os.path.dirname(parent):
        if _looks_like_output(parent):
            shown = os.path.relpath(parent) if not os.path.isabs(uri) else parent
            return f"{uri}: is inside the output {shown}; give {shown} (and --run to choose a run)"
        parent = os.path.dirname(parent)
    below: list[str] = []
    for depth_path in _subfolders(path):
        for sub in [depth_path, *_subfolders(depth_path)]:
            if _looks_like_output(sub):
                below.append(os.path.join(uri, os.path.relpath(sub, path)))
                break
    if not below:
        return None
    below.sort()
    more = f" and {len(below) - NEAR_OUTPUTS_SHOWN} more" if len(below) > NEAR_OUTPUTS_SHOWN else ""
    return f"{uri}: not a probeserve output, but outputs are below it: {', '.join(below[:NEAR_OUTPUTS_SHOWN])}{more}; give one"


_S3_NEAR_FOLDERS = 20  # folders right under an S3 prefix whose layout.json is looked for


def _s3_not_an_output(uri: str, s3_endpoint: str | None) -> str | None:
    """`not_an_output` for an `s3://` prefix, in a bounded number of requests (an S3 listing
    below a prefix has no bound, and each request is paid for): the prefix's own `layout.json`,
    that of each prefix above it (one HEAD per level), and that of at most `_S3_NEAR_FOLDERS`
    folders right under it (one delimited listing). Only outputs with a `layout.json` (what
    every run writes first) are found. A prefix that holds no object at all is a typo, as a
    local folder that does not exist is; an output a run has begun always holds its
    layout.json, so an output with no results yet is still "no results yet"."""
    store = open_storage(uri, s3_endpoint=s3_endpoint)
    if store.stat(LAYOUT_KEY) is not None:
        return None
    parts = urlsplit(uri)
    names = [n for n in parts.path.split("/") if n]
    for n in range(len(names) - 1, -1, -1):
        above = f"s3://{parts.netloc}/{'/'.join(names[:n])}".rstrip("/")
        if open_storage(above, s3_endpoint=s3_endpoint).stat(LAYOUT_KEY) is not None:
            return f"{uri}: is inside the output {above}; give {above} (and --run to choose a run)"
    below = []
    for name in getattr(store, "folders", lambda **_: [])(limit=1000)[:_S3_NEAR_FOLDERS]:
        if store.stat(f"{name}/{LAYOUT_KEY}") is not None:
            below.append(f"{uri.rstrip('/')}/{name}")
    if below:
        more = f" and {len(below) - NEAR_OUTPUTS_SHOWN} more" if len(below) > NEAR_OUTPUTS_SHOWN else ""
        return f"{uri}: not a probeserve output, but outputs are below it: {', '.join(below[:NEAR_OUTPUTS_SHOWN])}{more}; give one"
    if next(iter(store.list(page_size=1)), None) is None:
        return f"{uri}: no such output (no object under this prefix)"
    return None


def _subfolders(path: str) -> list[str]:
    """Real (not linked) subfolders of `path`, sorted; at most `_NEAR_ENTRIES` entries read."""
    found = []
    try:
        with os.scandir(path) as entries:
            for n, entry in enumerate(entries):
                if n >= _NEAR_ENTRIES:
                    break
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                    found.append(entry.path)
    except OSError:
        return []
    return sorted(found)


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


# --------------------------------------------------------------------------------------------
# Uncertainty, and what plots draw from it


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(rate: Any, n: Any, *, z: float = Z95) -> tuple[Any, Any]:
    """The Wilson score interval (95% by default) of an error rate: the fraction `rate` of
    `n` examples misclassified.

    Wilson rather than the normal approximation because probe errors are often near 0 (a
    linearly separable layer) or based on few examples (a rare class), where the normal
    interval collapses to a point or leaves [0, 1]; it keeps its nominal coverage there far
    better (Brown, Cai & DasGupta, 2001). Works on scalars and NumPy arrays alike; where
    `n` is 0 both ends are NaN."""
    import numpy as np

    n_arr = np.asarray(n, dtype=np.float64)
    p = np.asarray(rate, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z2 = z * z
        denom = 1.0 + z2 / n_arr
        centre = (p + z2 / (2 * n_arr)) / denom
        half = z * np.sqrt(p * (1 - p) / n_arr + z2 / (4 * n_arr * n_arr)) / denom
        # exactly 0 (1) when nothing (everything) was wrong, not a rounding error away
        low = np.where(p <= 0, 0.0, np.clip(centre - half, 0.0, 1.0))
        high = np.where(p >= 1, 1.0, np.clip(centre + half, 0.0, 1.0))
    low = np.where(n_arr > 0, low, np.nan)
    high = np.where(n_arr > 0, high, np.nan)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def layer_curve(rows: Iterable[Mapping[str, Any]], *, step: int, run: str | None = None) -> dict[str, list]:
    """What an error-versus-layer plot with intervals draws at one step: the ok rows of that
    step in forward order, as columns `layer_index`, `layer`, `test_error`, `test_error_low`,
    `test_error_high` (and `control_error`, `selectivity`, `mdl_bits` where present). Rows
    written before the intervals existed get them from `test_error` and `n_test`."""
    picked = sorted(
        (r for r in rows if r["step"] == step and r["status"] == "ok" and (run is None or r["run"] == run)),
        key=lambda r: r["layer_index"],
    )
    out: dict[str, list] = {
        k: []
        for k in (
            "layer_index",
            "layer",
            "test_error",
            "test_error_low",
            "test_error_high",
            "control_error",
            "selectivity",
            "mdl_bits",
        )
    }
    for r in picked:
        low, high = r.get("test_error_low"), r.get("test_error_high")
        if low is None and r.get("test_error") is not None and r.get("n_test"):
            low, high = wilson_interval(float(r["test_error"]), r["n_test"])
        for k in out:
            out[k].append({"test_error_low": low, "test_error_high": high}.get(k, r.get(k)))
    return out


def class_errors_by_layer(
    rows: Iterable[Mapping[str, Any]], *, step: int, run: str | None = None
) -> tuple[list[str], list[str], Any]:
    """What a per-class error plot draws at one step: (layers in forward order, class names,
    a [layers, classes] float array of test error per class, NaN where a class has no test
    example or a row has no per-class errors). Class names are the data's, else the labels."""
    import numpy as np

    picked = sorted(
        (r for r in rows if r["step"] == step and r["status"] == "ok" and (run is None or r["run"] == run)),
        key=lambda r: r["layer_index"],
    )
    num_classes = max((r["num_classes"] or 0 for r in picked), default=0)
    names = next((list(r["class_names"]) for r in picked if r.get("class_names")), None)
    if names is None:
        names = [str(i) for i in range(num_classes)]
    grid = np.full((len(picked), num_classes), np.nan)
    for i, r in enumerate(picked):
        errors = r.get("test_class_errors")
        if errors:
            grid[i, : len(errors)] = [np.nan if e is None else e for e in errors]
    return [r["layer"] for r in picked], names, grid
