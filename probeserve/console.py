"""What the commands print on a terminal: fixed-width tables, a run's error table and its summary.

`probeserve run` and `probeserve demo` end alike (the error table, then what the run did and
kept), so the printing lives here, where the CLI and the demo both import it; the demo never
imports the CLI, which imports the demo only inside `cmd_demo`
(`tests/test_structure.py`). Nothing here imports torch, pyarrow or ray at module level: the
CLI imports this module for every command.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from probeserve.runners.base import RunSummary
    from probeserve.spec import SweepSpec


# Columns whose floats are shown in full rather than at 4 decimals: `l2` spans 1e-6 to 1e-1
# (the default grid), and at 4 decimals 1e-6, 5e-6 and 3e-5 all read 0.0000.
FULL_FLOATS = frozenset({"l2"})


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    """Plain fixed-width text table; floats with 4 decimals (those of `FULL_FLOATS` in full)."""

    def cell(v: object, column: str) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:g}" if column in FULL_FLOATS else f"{v:.4f}"
        return str(v)

    body = [[cell(r.get(c), c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    """A byte count for people: 512 B, 1.5 KiB, 3.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def print_results_table(output_uri: str, run: str, s3_endpoint: str | None) -> list[dict]:
    """Print a run's test errors as a layer-by-step table, naming the run; return its rows.

    A probe that hit `probe.max_epochs` is marked with `*`."""
    from probeserve import results

    rows = results.load(output_uri, run=run, s3_endpoint=s3_endpoint).to_pylist()
    columns, grid = results.error_grid(rows)
    capped = {(r["layer"], f"step {r['step']}") for r in rows if r.get("hit_max_epochs")}
    for line in grid:
        for col in columns[1:]:
            if (line["layer"], col) in capped and isinstance(line[col], float):
                line[col] = f"{line[col]:.4f}*"
    note = "; * hit probe.max_epochs" if capped else ""
    print(f"run {run}: test error by layer (rows, in forward order) and checkpoint step (columns){note}:")
    print(format_table(grid, columns))
    return rows


def activation_bytes(spec: SweepSpec) -> int:
    """Bytes of activation shards stored for the spec's run (one listing of its prefix)."""
    from probeserve import layout
    from probeserve.results import open_output

    out = open_output(spec.output.uri, s3_endpoint=spec.storage.resolved_endpoint(), must_exist=False)
    return sum(o.size for o in out.list(layout.activations_prefix(spec.run)))


def print_run_summary(spec: SweepSpec, summary: RunSummary, rows: list[dict]) -> None:
    """What a run did, what it keeps, and which probes hit their epoch cap (after the table)."""
    from probeserve import layout
    from probeserve.storage import redact

    uri = redact(spec.output.uri.rstrip("/"))
    print(
        f"\nrun {spec.run}: {summary.ok} item(s) done now, {summary.skipped_done} already done, "
        f"{len(summary.failed)} failed, in {summary.seconds:.1f} s; results in {uri}/{layout.results_prefix()}"
    )
    kept = activation_bytes(spec)
    where = f"{uri}/{layout.activations_prefix(spec.run)}"
    if spec.output.keep_activations:
        print(
            f"kept {human_bytes(kept)} of activations in {where} (output.keep_activations: true; "
            "false deletes a layer's once its probe is committed)"
        )
    elif kept:
        print(
            f"kept {human_bytes(kept)} of activations in {where} (output.keep_activations: false: "
            "they belong to items not done, or to an interrupted run)"
        )
    else:
        print("kept no activations (output.keep_activations: false)")
    ok = [r for r in rows if r["status"] == "ok"]
    capped = [r for r in ok if r.get("hit_max_epochs")]
    if capped:
        cap = spec.probe.max_epochs
        print(
            f"{len(capped)} of {len(ok)} probes hit probe.max_epochs={cap} before early stopping or "
            f"converging (* above; column hit_max_epochs): their errors may still fall. Raise it for "
            f"a new run: --set probe.max_epochs={2 * cap} --set run=NAME."
        )
