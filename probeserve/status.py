"""`probeserve status`: how far each run has got, read from storage alone.

It needs no Ray, no model and no dataset, so it works from any machine that can read the
output location: the run's spec (`runs/{run}/spec.json`) says where the checkpoints are,
`runs/{run}/layers.json` which layers the latest run selected, committed rows which items
are done or failed, and `running/...` objects which are being probed right now.

A running marker whose probe died (kill -9, a lost node) stays until a run removes it, so
status judges each one (`markers.marker_state`): a marker not refreshed by its heartbeat for a
few beats, or one written on this host by a pid that is gone, is `stale`. A stale item
counts as pending, and the row says how many of those there are. Status only reads.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from probeserve import layout, results
from probeserve.checkpoints import discover
from probeserve.errors import ProbeserveError, first_line
from probeserve.markers import marker_state
from probeserve.spec import CheckpointsSpec, StorageSpec
from probeserve.storage import Storage, StorageError, open_storage

M = TypeVar("M", bound=BaseModel)


def run_status(
    output_uri: str, *, run: str | None = None, s3_endpoint: str | None = None
) -> list[dict[str, Any]]:
    """One row per run; a run whose records cannot be read gets a row that says why (`error`)
    rather than hiding the others."""
    # the output, or its results/ folder, as query, plot and report take it
    out = results.open_output(layout.output_root(output_uri), s3_endpoint=s3_endpoint)
    runs = sorted({r for o in out.list(layout.runs_prefix()) if (r := layout.recorded_run(o.key))})
    rows = []
    for name in runs:
        if run and name != run:
            continue
        try:
            rows.append(_one_run(out, name, s3_endpoint))
        except (ProbeserveError, ValidationError, ValueError, KeyError, TypeError) as e:
            what = first_line(e) or type(e).__name__
            rows.append({"run": name, "error": f"{type(e).__name__}: {what}"})
    return rows


def _one_run(out: Storage, name: str, s3_endpoint: str | None) -> dict[str, Any]:
    # only the sections status needs: a spec written by an older or newer probeserve, with
    # fields this one does not know, still says where its checkpoints are
    record = results.read_json(out, layout.run_key(name, "spec.json"))
    recorded = record["spec"]
    checkpoints = _known_fields(CheckpointsSpec, recorded["checkpoints"])
    ran_in = record.get("ran_in")
    if isinstance(ran_in, str) and "://" not in checkpoints.uri and not os.path.isabs(checkpoints.uri):
        # relative to the folder the run ran in, which the run recorded (older records did not)
        checkpoints = checkpoints.model_copy(update={"uri": os.path.join(ran_in, checkpoints.uri)})
    storage = _known_fields(StorageSpec, recorded.get("storage") or {})
    layers_key = layout.run_key(name, "layers.json")
    if out.stat(layers_key) is None:
        raise ProbeserveError(
            f"{out.uri_for(layers_key)} is missing: the run stopped before its first extraction"
        )
    layers = [entry["layer"] for entry in results.read_json(out, layers_key)]
    ckpt_storage = open_storage(checkpoints.uri, s3_endpoint=s3_endpoint or storage.resolved_endpoint())
    status = results.item_status(out, name)
    # The run covers the checkpoints its recorded spec names, and every checkpoint it has rows
    # for: a run recorded with a narrower `checkpoints.steps` than later runs of it used (a
    # first run of a few steps, or a record made by an older watch daemon's first sweep,
    # `steps: [N]`) still counts all of them.
    with_rows = {key for key, _ in status}
    try:
        every = discover(ckpt_storage, checkpoints.model_copy(update={"steps": None})).complete
    except StorageError as e:
        uri = checkpoints.uri
        if "://" in uri or os.path.isabs(uri):
            raise
        # a relative path is relative to the folder the run ran in, which status cannot know
        raise StorageError(
            f"{e} (the run recorded checkpoints.uri {uri!r}, a path relative to the folder it ran in: "
            "run status from that folder)"
        ) from None
    ckpts = [
        c for c in every if checkpoints.steps is None or c.step in checkpoints.steps or c.key in with_rows
    ]
    markers = {o.key: o for o in out.list(layout.running_prefix(name))}
    counts = {"done": 0, "failed": 0, "running": 0, "pending": 0, "stale": 0}
    for c in ckpts:
        for layer in layers:
            s = status.get((c.key, layer))
            if s == "ok":
                counts["done"] += 1
            elif s == "failed":
                counts["failed"] += 1
            elif (marker := markers.get(layout.running_key(name, c.key, c.step, layer))) is not None:
                if marker_state(out, marker)[0]:
                    counts["running"] += 1
                else:  # its probe died: it is pending again
                    counts["pending"] += 1
                    counts["stale"] += 1
            else:
                counts["pending"] += 1
    return {
        "run": name,
        "checkpoints": len(ckpts),
        "items": len(ckpts) * len(layers),
        **counts,
        "error": None,
    }


def _known_fields(model: type[M], data: dict[str, Any]) -> M:
    """Validate the fields this version knows; a newer version's extra fields are not errors here."""
    return model.model_validate({k: v for k, v in data.items() if k in model.model_fields})
