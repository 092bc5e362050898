"""`probeserve report`: one self-contained HTML page about a sweep, finished or not.

The page holds everything needed to read a run without probeserve installed: progress
counts, the plots (PNG embedded as base64, no external URL or script), the test-error grid,
failures with their error text, checkpoints, timings, the spec that produced the results
and every row. It is published atomically (`storage.publish_file`), so a watcher can
rewrite it after each checkpoint while someone has it open, and a reader never sees half a
page.

Every string that comes from the results or the spec is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import statistics
from collections.abc import Callable, Sequence
from html import escape
from typing import Any

import pyarrow as pa

from probeserve import layout, plots, results
from probeserve.errors import ProbeserveError
from probeserve.storage import Storage, open_storage, publish_file, redact

# Columns of the full rows table, in the order a reader scans them.
ROW_COLUMNS = [
    "step",
    "layer",
    "layer_index",
    "status",
    "train_error",
    "val_error",
    "test_error",
    "test_error_low",  # its 95% interval (Wilson)
    "test_error_high",
    "chance_error",
    "test_loss",
    "n_features",
    "epochs",
    "best_epoch",
    "hit_max_epochs",
    "l2",  # chosen on validation from probe.l2's grid
    "selectivity",  # probe.control: control_error - test_error
    "control_train_error",  # probe.control: where memorisation shows, for control labels per example
    "mdl_compression",  # probe.mdl
    "seconds",
    "device",
    "finished_at",
    "checkpoint",
    "error",
]

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
td.failed { background: #fde0e0; color: #a00; font-weight: 600; } td.pending { color: #999; }
pre { background: #f7f7f7; border: 1px solid #e4e4e4; padding: 8px; overflow-x: auto; }
.scroll { max-height: 480px; overflow: auto; border: 1px solid #eee; }
.counts span { display: inline-block; margin-right: 18px; font-size: 16px; }
.note { color: #666; } img { max-width: 100%; border: 1px solid #eee; margin: 6px 0; }
"""


output_root = results.output_root


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return str(v)


def html_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    *,
    text: Sequence[str] = (),
    classes: Callable[[dict[str, Any], str], str] | None = None,
) -> str:
    """An escaped HTML table; `text` columns are left-aligned, `classes` may add a class per cell."""
    head = "".join(f'<th class="{"text" if c in text else ""}">{escape(c)}</th>' for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            cls = " ".join(filter(None, ["text" if c in text else "", classes(r, c) if classes else ""]))
            cells.append(f'<td class="{cls}">{escape(_cell(r.get(c)))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _runs(out: Storage, table: pa.Table) -> list[str]:
    with_spec = {r for o in out.list(layout.runs_prefix()) if (r := layout.recorded_run(o.key))}
    return sorted(with_spec | set(table.column("run").to_pylist()))


def _read_text(out: Storage, key: str) -> str | None:
    try:
        if out.stat(key) is None:
            return None
        return out.read_bytes(key, max_bytes=4 << 20).decode("utf-8", errors="replace")
    except ProbeserveError:
        return None


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _plots_section(table: pa.Table, run: str) -> str:
    g = plots.grid(table, run=run)
    parts = [
        _img(plots.figure_png(plots.heatmap_figure(g)), "test error by step and layer"),
        _img(plots.figure_png(plots.layers_figure(g)), "test error by layer (95% intervals shaded)"),
        _img(plots.figure_png(plots.steps_figure(g)), "test error by step"),
    ]
    try:
        cg = plots.class_grid(table, run=run)
    except ProbeserveError:
        pass  # rows written before per-class errors were kept
    else:
        parts.append(
            _img(plots.figure_png(plots.classes_figure(cg)), f"test error per class by layer, step {cg.step}")
        )
    return "<h2>Plots</h2>" + "\n".join(parts)


def _grid_section(rows: list[dict[str, Any]]) -> str:
    columns, grid_rows = results.error_grid(rows)

    def cls(row: dict[str, Any], col: str) -> str:
        v = row.get(col)
        return "failed" if v == "FAILED" else "pending" if v is None and col != "layer" else ""

    return (
        "<h2>Test error by layer and step</h2>"
        '<p class="note">Rows in forward order; - marks an item not finished yet.</p>'
        + html_table(grid_rows, columns, text=["layer"], classes=cls)
    )


def _failures_section(rows: list[dict[str, Any]]) -> str:
    failed = [r for r in rows if r["status"] != "ok"]
    if not failed:
        return "<h2>Failures</h2><p>None.</p>"
    body = html_table(
        failed, ["step", "layer", "checkpoint", "seconds", "error"], text=["layer", "checkpoint", "error"]
    )
    return (
        f"<h2>Failures ({len(failed)})</h2>"
        '<p class="note">The next <code>probeserve run</code> retries these items.</p>' + body
    )


def _checkpoints_section(
    rows: list[dict[str, Any]], discovered: list[tuple[int, str]] | None, num_layers: int | None
) -> str:
    ckpts = {(r["step"], r["checkpoint"]) for r in rows} | set(discovered or [])
    out = []
    for step, key in sorted(ckpts):
        mine = [r for r in rows if r["checkpoint"] == key and r["step"] == step]
        ok = sum(r["status"] == "ok" for r in mine)
        failed = len(mine) - ok
        line = {"step": step, "checkpoint": key, "done": ok, "failed": failed}
        line["not done"] = None if num_layers is None else max(0, num_layers - ok - failed)
        out.append(line)
    note = (
        ""
        if discovered is not None
        else '<p class="note">The checkpoint prefix could not be listed; these are the checkpoints with rows.</p>'
    )
    return f"<h2>Checkpoints ({len(out)})</h2>{note}" + html_table(
        out, ["step", "checkpoint", "done", "failed", "not done"], text=["checkpoint"]
    )


def _timings_section(rows: list[dict[str, Any]]) -> str:
    secs = [r["seconds"] for r in rows if r["seconds"] is not None]
    if not secs:
        return "<h2>Timings</h2><p>No timed items yet.</p>"
    summary = {
        "items": len(secs),
        "total s": float(sum(secs)),
        "mean s/item": float(statistics.fmean(secs)),
        "median s/item": float(statistics.median(secs)),
        "max s/item": float(max(secs)),
    }
    by_device: dict[str, list[float]] = {}
    for r in rows:
        if r["seconds"] is not None:
            by_device.setdefault(r["device"] or "(none: failed before probing)", []).append(r["seconds"])
    dev_rows = [
        {"device": d, "items": len(v), "total s": float(sum(v)), "mean s/item": float(statistics.fmean(v))}
        for d, v in sorted(by_device.items())
    ]
    return (
        "<h2>Timings</h2>"
        "<p class=\"note\">Seconds per item are the probe's wall time (extraction is shared by a checkpoint's layers).</p>"
        + html_table([summary], list(summary))
        + "<h3>By device</h3>"
        + html_table(dev_rows, ["device", "items", "total s", "mean s/item"], text=["device"])
    )


def _run_section(out: Storage, root: str, table: pa.Table, run: str, s3_endpoint: str | None) -> str:
    from probeserve.status import run_status

    rows = [r for r in table.to_pylist() if r["run"] == run]
    progress: dict[str, Any] | None = None
    progress_error = None
    try:
        found = run_status(root, run=run, s3_endpoint=s3_endpoint)
        progress = found[0] if found else None
    except (ProbeserveError, ValueError, KeyError) as e:
        progress_error = str(e)
    spec_yaml = _read_text(out, layout.run_key(run, "spec.yaml"))
    layers_json = _read_text(out, layout.run_key(run, "layers.json"))
    num_layers = len(json.loads(layers_json)) if layers_json else None
    discovered = _discovered(out, run, s3_endpoint)

    parts = [f'<h2 id="run-{escape(run)}">Run {escape(run)}</h2>']
    if progress is not None:
        counts = "".join(
            f"<span><b>{progress[k]}</b> {k}</span>"
            for k in ("checkpoints", "items", "done", "failed", "running", "pending")
        )
        parts.append(f'<p class="counts">{counts}</p>')
    else:
        why = progress_error or f"no {layout.run_key(run, 'spec.json')}: this run has no recorded spec here"
        parts.append(f'<p class="note">Progress unavailable: {escape(why)}</p>')
    if rows:
        try:
            parts.append(_plots_section(table, run))
        except ProbeserveError as e:
            parts.append(f'<p class="note">No plots: {escape(str(e))}</p>')
        parts.append(_grid_section(rows))
    else:
        parts.append("<p>No item has finished yet.</p>")
    capped = [r for r in rows if r["status"] == "ok" and r.get("hit_max_epochs")]
    if capped:
        parts.append(
            f'<p class="note">{len(capped)} of {sum(r["status"] == "ok" for r in rows)} probes hit '
            "probe.max_epochs before early stopping or converging (column hit_max_epochs below): "
            "their errors may still fall with more epochs.</p>"
        )
    parts.append(_failures_section(rows))
    parts.append(_checkpoints_section(rows, discovered, num_layers))
    parts.append(_timings_section(rows))
    parts.append("<h2>Spec</h2>")
    if spec_yaml is None:
        parts.append(f'<p class="note">No {escape(layout.run_key(run, "spec.yaml"))} in the output.</p>')
    else:
        parts.append(
            f'<p class="note">{escape(layout.run_key(run, "spec.yaml"))}, as resolved by the run:</p>'
            f"<pre>{escape(spec_yaml)}</pre>"
        )
    parts.append(f"<h2>All rows ({len(rows)})</h2>")
    parts.append(
        '<div class="scroll">'
        + html_table(
            # l2 spans 1e-6 to 1e-1: in full, not at the 4 decimals of the other numbers
            [{**r, "l2": None if r.get("l2") is None else f"{r['l2']:g}"} for r in rows],
            ROW_COLUMNS,
            text=["layer", "status", "device", "checkpoint", "error"],
            classes=lambda r, c: "failed" if c == "status" and r["status"] != "ok" else "",
        )
        + "</div>"
    )
    return "\n".join(parts)


def _discovered(out: Storage, run: str, s3_endpoint: str | None) -> list[tuple[int, str]] | None:
    """(step, key) of the run's complete checkpoints, or None when they cannot be listed."""
    from probeserve.checkpoints import discover
    from probeserve.spec import SweepSpec

    text = _read_text(out, layout.run_key(run, "spec.json"))
    if text is None:
        return None
    try:
        spec = SweepSpec.model_validate(json.loads(text)["spec"])
        storage = open_storage(
            spec.checkpoints.uri, s3_endpoint=s3_endpoint or spec.storage.resolved_endpoint()
        )
        return [(c.step, c.key) for c in discover(storage, spec.checkpoints).complete]
    except (ProbeserveError, ValueError, KeyError):
        return None


def build_report(
    results_uri: str,
    *,
    run: str | None = None,
    s3_endpoint: str | None = None,
    refresh_seconds: int | None = None,
) -> str:
    """The report's HTML for every run under `results_uri` (or one run)."""
    root = output_root(results_uri)
    out = open_storage(root, s3_endpoint=s3_endpoint)
    table = results.read_table(out, run)
    runs = _runs(out, table)
    if run is not None:
        if run not in runs:
            why = f"no such run under {redact(root)}; runs there: {', '.join(runs) or 'none'}"
            raise plots.ChoiceError(f"run={run!r}: {why}", f"--run {run}: {why}")
        runs = [run]
    if not runs:
        near = results.not_an_output(root, s3_endpoint=s3_endpoint)  # beside an output, not an empty one
        if near is not None:
            raise ProbeserveError(near)
        raise ProbeserveError(
            f"no results and no runs under {redact(root)}: start a run (`probeserve run SPEC`) with this output.uri"
        )
    sections = [_run_section(out, root, table, name, s3_endpoint) for name in runs]
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = f"probeserve report: {', '.join(runs)}"
    meta_refresh = f'<meta http-equiv="refresh" content="{int(refresh_seconds)}">' if refresh_seconds else ""
    nav = ""
    if len(runs) > 1:
        nav = "<p>Runs: " + " · ".join(f'<a href="#run-{escape(r)}">{escape(r)}</a>' for r in runs) + "</p>"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">{meta_refresh}'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1>"
        f'<p class="note">Linear classifier probes (Alain &amp; Bengio, 2016) on {escape(redact(root))}; '
        f"generated {escape(now)}. Rebuild with <code>probeserve report</code>.</p>"
        + nav
        + "\n".join(sections)
        + "</body></html>\n"
    )


def write_report(
    results_uri: str,
    out: str,
    *,
    run: str | None = None,
    s3_endpoint: str | None = None,
    refresh_seconds: int | None = None,
) -> str:
    """Build the report and publish it atomically at `out` (a path or URI); return `out`."""
    page = build_report(results_uri, run=run, s3_endpoint=s3_endpoint, refresh_seconds=refresh_seconds)
    return publish_file(out, page.encode("utf-8"), s3_endpoint=s3_endpoint)
