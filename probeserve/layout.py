"""The key layout of an output, defined once: every key probeserve writes or reads under
`output.uri` is made, or taken apart, by a function here.

    layout.json                                               LAYOUT_KEY: layout and result columns
    runs/{run}/spec.json, spec.yaml, layers.json, classes.json    run_key(run, name)
    runs/{run}/data/index.parquet                             run_key(run, DATA_INDEX)
    results/{run}/{ckpt}/{layer}.parquet                      result_key
    activations/{run}/{ckpt}/{layer}/manifest.json            manifest_key
    activations/{run}/{ckpt}/{layer}/{split}/part-NNNNN.parquet   under layer_prefix; is_shard_part
    running/{run}/{ckpt}/{layer}.json                         running_key
    ledger/{run}/{ckpt}/claim-{gen:04d}.json, state-{gen:04d}.json    claim_key, state_key

`{ckpt}` is `checkpoint_dir(key, step)`, the same folder name in results, activations, the
running markers and the watch ledger; `{layer}` is the layer name made path-safe
(`layer_stem`). No folder is named `name=value`: pandas, pyarrow, DuckDB and polars take such
folders for hive partitions and make a column of them. Layout 1 (before `layout.json`
existed) named checkpoint folders `step={step:012d}-{hash}`; `probeserve migrate` moves them.

It imports nothing but the standard library (and `storage.join`), so any command can use it
without loading what the work needs.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import quote, unquote

from probeserve.storage import join as _join

LAYOUT = 2  # 1: checkpoint folders named step={step:012d}-{hash}, before layout.json existed
LAYOUT_KEY = "layout.json"  # {"layout": LAYOUT, "columns": [...]}: how this output's files are laid out
RESULTS_DIR = "results"
RUNS_DIR = "runs"
ACTIVATIONS_DIR = "activations"
LEDGER_DIR = "ledger"  # the watch daemon's claims and states
RUNNING_DIR = "running"  # a marker per item while it is probed
# every folder whose keys hold a checkpoint folder name (third part), so every folder a
# layout change moves
PER_CHECKPOINT_DIRS = (RESULTS_DIR, ACTIVATIONS_DIR, LEDGER_DIR, RUNNING_DIR)
DATA_INDEX = "data/index.parquet"  # runs/{run}/data/index.parquet: an image run's frozen example index
MANIFEST = "manifest.json"  # a layer's shards are complete: written last


# ---------------------------------------------------------------------------- names


def checkpoint_dir(checkpoint: str, step: int) -> str:
    """A readable, unique, path-safe folder name for a checkpoint key: `step-{step:012d}-{hash}`,
    where the hash (8 hex digits of the key) keeps two checkpoint files of one step apart.
    No `=` in it: readers take `name=value` folders for hive partitions."""
    return f"step-{step:012d}-{_key_digest(checkpoint)}"


def _key_digest(checkpoint: str) -> str:
    return hashlib.sha1(checkpoint.encode()).hexdigest()[:8]


_V1_DIR = re.compile(r"^step=(\d{12,})-([0-9a-f]{8})$")  # {step:012d}: more digits past 10**12


def v1_checkpoint_dir(checkpoint: str, step: int) -> str:
    """The folder name layout 1 gave a checkpoint (read by `probeserve migrate`)."""
    return f"step={step:012d}-{_key_digest(checkpoint)}"


def from_v1_dir(name: str) -> str | None:
    """The current folder name of a layout-1 checkpoint folder name; None if it is not one.

    Both layouts hash the checkpoint key the same way, so the name alone says where it goes."""
    m = _V1_DIR.match(name)
    return f"step-{m.group(1)}-{m.group(2)}" if m else None


def layer_stem(layer: str) -> str:
    """A layer name made path-safe (and reversible), for keys per layer."""
    return quote(layer, safe="")


def layer_file(layer: str) -> str:
    return layer_stem(layer) + ".parquet"


def layer_from_file(name: str) -> str:
    """The layer whose result file is named `name`."""
    return unquote(name.removesuffix(".parquet"))


def output_root(uri: str) -> str:
    """The output URI, given either it or its `results/` folder."""
    root = uri.rstrip("/")
    if root.endswith("/" + RESULTS_DIR) or root == RESULTS_DIR:
        root = root[: -len(RESULTS_DIR)].rstrip("/") or "."
    return root


# ---------------------------------------------------------------------------- runs/


def run_key(run: str, name: str) -> str:
    """Key of a run-level object: `runs/{run}/{name}` (spec.yaml, spec.json, layers.json, ...)."""
    return _join(RUNS_DIR, run, name)


def runs_prefix() -> str:
    return RUNS_DIR + "/"


def recorded_run(key: str) -> str | None:
    """The run whose recorded spec is at `key` (`runs/{run}/spec.json`), or None."""
    parts = key.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == RUNS_DIR and parts[2] == "spec.json" else None


# ---------------------------------------------------------------------------- results/


def results_prefix(run: str | None = None, checkpoint: str | None = None, step: int | None = None) -> str:
    """`results/`, or the folder of one run's rows, or of one checkpoint's rows in a run."""
    if run is None:
        return RESULTS_DIR + "/"
    if checkpoint is None:
        return _join(RESULTS_DIR, run) + "/"
    assert step is not None, "a checkpoint's folder needs its step"
    return _join(RESULTS_DIR, run, checkpoint_dir(checkpoint, step)) + "/"


def result_key(run: str, checkpoint: str, step: int, layer: str) -> str:
    return _join(RESULTS_DIR, run, checkpoint_dir(checkpoint, step), layer_file(layer))


def parse_result_key(key: str) -> tuple[str, str, str] | None:
    """(run, checkpoint folder, layer) of a result file's key, in either layout; None for a key
    probeserve would not have written there."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != RESULTS_DIR or not parts[3].endswith(".parquet"):
        return None
    return parts[1], parts[2], layer_from_file(parts[3])


# ---------------------------------------------------------------------------- activations/


def activations_prefix(run: str) -> str:
    return _join(ACTIVATIONS_DIR, run) + "/"


def layer_prefix(run: str, checkpoint: str, step: int, layer: str) -> str:
    """The folder of one (checkpoint, layer)'s shards and manifest (no trailing slash)."""
    return _join(ACTIVATIONS_DIR, run, checkpoint_dir(checkpoint, step), layer_stem(layer))


def manifest_key(run: str, checkpoint: str, step: int, layer: str) -> str:
    return _join(layer_prefix(run, checkpoint, step, layer), MANIFEST)


def layer_prefix_of(key: str) -> str | None:
    """The layer folder (`activations/{run}/{ckpt}/{layer}`) a key under `activations/` is in."""
    parts = key.split("/")
    return "/".join(parts[:4]) if len(parts) >= 5 and parts[0] == ACTIVATIONS_DIR else None


_PART = re.compile(r"^(?:train|val|test)/part-[0-9]{5}\.parquet$")


def is_shard_part(relative: str) -> bool:
    """Whether a key relative to a layer folder is a shard part (`{split}/part-NNNNN.parquet`):
    nothing else a user may have put there is ever deleted."""
    return _PART.match(relative) is not None


# ---------------------------------------------------------------------------- running/


def running_prefix(run: str | None = None) -> str:
    return RUNNING_DIR + "/" if run is None else _join(RUNNING_DIR, run) + "/"


def running_key(run: str, checkpoint: str, step: int, layer: str) -> str:
    return _join(RUNNING_DIR, run, checkpoint_dir(checkpoint, step), layer_stem(layer) + ".json")


# ---------------------------------------------------------------------------- ledger/


def ledger_prefix(run: str | None = None) -> str:
    return LEDGER_DIR + "/" if run is None else _join(LEDGER_DIR, run) + "/"


def ledger_key(run: str, ckpt_dir: str, name: str) -> str:
    return _join(LEDGER_DIR, run, ckpt_dir, name)


def claim_key(run: str, ckpt_dir: str, gen: int) -> str:
    return ledger_key(run, ckpt_dir, f"claim-{gen:04d}.json")


def state_key(run: str, ckpt_dir: str, gen: int) -> str:
    return ledger_key(run, ckpt_dir, f"state-{gen:04d}.json")


def parse_ledger_key(key: str) -> tuple[str, str, str, int] | None:
    """(run, checkpoint folder, "claim" or "state", generation) of a ledger object's key; None
    for anything else under `ledger/`."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != LEDGER_DIR or not parts[3].endswith(".json"):
        return None
    kind, _, gen = parts[3][:-5].partition("-")
    if kind not in ("claim", "state") or not gen.isdigit():
        return None
    return parts[1], parts[2], kind, int(gen)


# ---------------------------------------------------------------------------- per checkpoint


def split_checkpoint_key(key: str) -> tuple[str, str, str, str] | None:
    """(top folder, run, checkpoint folder, the rest) of a key under one of
    `PER_CHECKPOINT_DIRS`, in either layout; None for any other key."""
    parts = key.split("/", 3)
    if len(parts) < 3 or parts[0] not in PER_CHECKPOINT_DIRS:
        return None
    return parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else ""


def checkpoint_dir_of(key: str) -> str | None:
    """The checkpoint folder of a key under one of `PER_CHECKPOINT_DIRS`, or None."""
    split = split_checkpoint_key(key)
    return None if split is None else split[2]


def with_checkpoint_dir(key: str, name: str) -> str:
    """`key` with its checkpoint folder (see `split_checkpoint_key`) renamed to `name`."""
    split = split_checkpoint_key(key)
    assert split is not None, f"{key} is not under a checkpoint folder"
    return _join(split[0], split[1], name, split[3])
