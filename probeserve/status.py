"""`probeserve status`: how far each run has got, read from storage alone.

It needs no Ray, no model and no dataset, so it works from any machine that can read the
output location: the run's spec (`runs/{run}/spec.json`) says where the checkpoints are,
`runs/{run}/layers.json` which layers the latest run selected, committed rows which items
are done or failed, and `running/...` objects which are being probed right now.
"""

from __future__ import annotations

import json
from typing import Any

from probeserve import results
from probeserve.checkpoints import discover
from probeserve.spec import SweepSpec
from probeserve.storage import open_storage
from probeserve.sweep import RUNNING_DIR, RUNS_DIR, running_key


def run_status(
    output_uri: str, *, run: str | None = None, s3_endpoint: str | None = None
) -> list[dict[str, Any]]:
    out = open_storage(output_uri, s3_endpoint=s3_endpoint)
    runs = sorted({o.key.split("/")[1] for o in out.list(RUNS_DIR + "/") if o.key.endswith("/spec.json")})
    rows = []
    for name in runs:
        if run and name != run:
            continue
        spec = SweepSpec.model_validate(
            json.loads(out.read_bytes(results.run_key(name, "spec.json")))["spec"]
        )
        layers = [
            entry["layer"] for entry in json.loads(out.read_bytes(results.run_key(name, "layers.json")))
        ]
        ckpt_storage = open_storage(
            spec.checkpoints.uri, s3_endpoint=s3_endpoint or spec.storage.resolved_endpoint()
        )
        ckpts = discover(ckpt_storage, spec.checkpoints).complete
        status = results.item_status(out, name)
        running = {o.key for o in out.list(f"{RUNNING_DIR}/{name}/")}
        counts = {"done": 0, "failed": 0, "running": 0, "pending": 0}
        for c in ckpts:
            for layer in layers:
                s = status.get((c.key, layer))
                if s == "ok":
                    counts["done"] += 1
                elif s == "failed":
                    counts["failed"] += 1
                elif running_key(name, c, layer) in running:
                    counts["running"] += 1
                else:
                    counts["pending"] += 1
        rows.append({"run": name, "checkpoints": len(ckpts), "items": len(ckpts) * len(layers), **counts})
    return rows
