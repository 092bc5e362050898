"""The `probeserve` command: validate | layers | plan | run | status | query | plot | report | watch | demo.

Every knob lives in the spec; `--set key.path=value` overrides a field of the spec file for
one invocation. User errors print one clear message (no traceback) and exit 2; a run in
which some items failed exits 1 and names them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from probeserve.errors import ProbeserveError, SpecError

log = logging.getLogger("probeserve")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    """Plain fixed-width text table; floats with 4 decimals."""

    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _spec(args: argparse.Namespace):
    from probeserve.spec import load_spec

    return load_spec(args.spec, overrides=args.set or [])


def cmd_validate(args: argparse.Namespace) -> int:
    from probeserve.spec import dump_spec

    spec = _spec(args)
    print(dump_spec(spec), end="")
    print(f"# spec_hash: {spec.hash()}")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from probeserve.sweep import Sweep

    sweep = Sweep(_spec(args))
    selected = {p.name for p in sweep.points}
    rows = []
    for p in sweep.all_points:
        reduced = sweep.reducer(p).n_features if p.name in selected else None
        rows.append(
            {
                "index": p.index,
                "name": p.name,
                "shape": "x".join(map(str, p.shape)),
                "features": p.n_features,
                "after_reducer": reduced,
                "selected": "yes" if p.name in selected else "",
            }
        )
    print(format_table(rows, ["index", "name", "shape", "features", "after_reducer", "selected"]))
    return 0


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_plan(args: argparse.Namespace) -> int:
    from probeserve.sweep import Sweep

    sweep = Sweep(_spec(args))
    plan = sweep.plan()
    rows = []
    todo_bytes = 0
    for item, status in plan.items:
        est = plan.bytes_per_item[item.layer]
        if status != "ok":
            todo_bytes += est
        rows.append(
            {
                "step": item.checkpoint.step,
                "layer": item.layer,
                "index": item.layer_index,
                "status": "done" if status == "ok" else status,
                "activation_bytes": _human_bytes(est),
            }
        )
    print(format_table(rows, ["step", "layer", "index", "status", "activation_bytes"]))
    counts = plan.counts()
    print(
        f"\n{len(plan.items)} item(s): {counts['ok']} done, {counts['failed']} failed, "
        f"{counts['pending']} pending; activations to extract: about {_human_bytes(todo_bytes)}"
    )
    for c in plan.discovery.incomplete:
        print(f"skipped (no completion marker yet): {c.key}")
    for key, why in plan.discovery.rejected:
        print(f"skipped ({why}): {key}")
    return 0


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


def activation_bytes(spec) -> int:
    """Bytes of activation shards stored for the spec's run (one listing of its prefix)."""
    from probeserve.results import open_output
    from probeserve.storage import join
    from probeserve.sweep import ACTIVATIONS_DIR

    out = open_output(spec.output.uri, s3_endpoint=spec.storage.resolved_endpoint(), must_exist=False)
    return sum(o.size for o in out.list(join(ACTIVATIONS_DIR, spec.run) + "/"))


def print_run_summary(spec, summary, rows: list[dict]) -> None:
    """What a run did, what it keeps, and which probes hit their epoch cap (after the table)."""
    from probeserve.storage import redact
    from probeserve.sweep import ACTIVATIONS_DIR

    uri = redact(spec.output.uri.rstrip("/"))
    print(
        f"\nrun {spec.run}: {summary.ok} item(s) done now, {summary.skipped_done} already done, "
        f"{len(summary.failed)} failed, in {summary.seconds:.1f} s; results in {uri}/results/"
    )
    kept = activation_bytes(spec)
    where = f"{uri}/{ACTIVATIONS_DIR}/{spec.run}/"
    if spec.output.keep_activations:
        print(
            f"kept {_human_bytes(kept)} of activations in {where} (output.keep_activations: true; "
            "false deletes a layer's once its probe is committed)"
        )
    elif kept:
        print(
            f"kept {_human_bytes(kept)} of activations in {where} (output.keep_activations: false: "
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


def run_spec(spec, *, runner: str, address: str | None, max_actors: int | None = None):
    """Run a spec with the chosen runner: Ray (local cluster unless an address is given) or in-process."""
    if runner == "local":
        if address:
            raise ProbeserveError("--address goes with the ray runner, not --runner local")
        from probeserve.runners.local import run_local

        return run_local(spec)
    from probeserve.runners.ray import run_ray

    return run_ray(spec, address=address, max_actors=max_actors)


def cmd_run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    summary = run_spec(spec, runner=args.runner, address=args.address, max_actors=args.max_actors)
    rows = print_results_table(spec.output.uri, spec.run, spec.storage.resolved_endpoint())
    print_run_summary(spec, summary, rows)
    for ckpt, layer, error in summary.failed:
        print(f"FAILED {ckpt} {layer}: {error}", file=sys.stderr)
    return summary.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from probeserve.status import run_status

    rows = run_status(args.output, run=args.run, s3_endpoint=args.s3_endpoint)
    if not rows:
        print(f"no runs under {args.output}")
        return 0
    columns = ["run", "checkpoints", "items", "done", "failed", "running", "pending"]
    broken = [r for r in rows if r.get("error")]
    print(format_table(rows, columns + (["error"] if broken else [])))
    for r in broken:
        print(f"run {r['run']}: cannot read its records: {r['error']}", file=sys.stderr)
    return 1 if broken else 0


DEFAULT_SQL = (
    "SELECT run, step, layer, layer_index, n_features, train_error, val_error, test_error, "
    "epochs, hit_max_epochs, status, error FROM results ORDER BY run, step, layer_index"
)


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from probeserve import results

    table = results.load(args.results, run=args.run, s3_endpoint=args.s3_endpoint)
    if table.num_rows == 0:
        print(f"no results yet under {args.results}", file=sys.stderr)
    con = duckdb.connect()
    con.register("results", table)
    try:
        rel = con.sql(args.sql or DEFAULT_SQL)
        if rel is None:  # a statement with no result set
            raise ProbeserveError("--sql: the statement returns no rows; use a SELECT")
        out = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0]
        raise ProbeserveError(f"--sql: {first}") from None
    if args.format == "parquet":
        import io

        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(out, buf)
        data = buf.getvalue()
    elif args.format == "json":
        data = (json.dumps(out.to_pylist(), default=str, indent=1) + "\n").encode()
    elif args.format == "csv":
        import io

        import pyarrow.csv as pcsv

        buf = io.BytesIO()
        pcsv.write_csv(out, buf)
        data = buf.getvalue()
    else:
        data = (format_table(out.to_pylist(), out.column_names) + "\n").encode()
    if args.out:
        _publish(args.out, data, s3_endpoint=args.s3_endpoint)
        print(f"{out.num_rows} row(s) written to {args.out}", file=sys.stderr)
    elif args.format == "parquet":
        raise ProbeserveError("--format parquet: give --out FILE (Parquet is not for a terminal)")
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


def _publish(uri: str, data: bytes, *, s3_endpoint: str | None) -> None:
    """Write one whole object atomically to a path or URI."""
    import posixpath

    from probeserve.storage import open_storage

    parent, name = posixpath.split(uri.rstrip("/"))
    open_storage(parent or ".", s3_endpoint=s3_endpoint).publish_bytes(name, data)


def cmd_watch(args: argparse.Namespace) -> int:
    import signal

    from probeserve.storage import open_storage
    from probeserve.watch import LocalSubmitter, RayJobSubmitter, Watcher, ledger_rows

    spec = _spec(args)
    if args.status:
        storage = open_storage(spec.output.uri, s3_endpoint=spec.storage.resolved_endpoint())
        rows = ledger_rows(storage, spec.run, page_size=args.page_size)
        if not rows:
            print(f"the ledger of run {spec.run} in {spec.output.uri} is empty")
        else:
            print(format_table(rows, ["checkpoint", "step", "state", "generation", "submission_id", "error"]))
        return 0
    if args.address and args.runner == "local":
        raise ProbeserveError("--address submits Ray jobs; it does not go with --runner local")
    submitter = RayJobSubmitter(args.address) if args.address else LocalSubmitter(args.runner)
    watcher = Watcher(
        spec,
        submitter,
        policy=args.policy,
        claim_timeout=args.claim_timeout,
        max_attempts=args.max_attempts,
        keep_activations=args.keep_activations,
        page_size=args.page_size,
        health_file=args.health_file,
    )

    def stop(signum: int, _frame: object) -> None:
        log.info("%s: finishing the current step, then exiting", signal.Signals(signum).name)
        watcher.stop.set()

    if not args.address and args.runner == "ray":
        from probeserve.runners.ray import connect

        connect(None)  # now: starting Ray installs signal handlers of its own, which ours replace
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return watcher.run(interval=args.interval, once=args.once)


def _split_list(values: Sequence[str] | None) -> list[str] | None:
    """`--layers a b`, `--layers a,b` or both; None when the flag was not given."""
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def cmd_plot(args: argparse.Namespace) -> int:
    from probeserve import plots, results

    table = results.load(args.results, run=args.run, s3_endpoint=args.s3_endpoint)
    if table.num_rows == 0:
        where = f"run {args.run!r} under {args.results}" if args.run else args.results
        raise ProbeserveError(f"no results yet for {where}: nothing to plot (see `probeserve status`)")
    steps = _split_list(args.steps)
    try:
        step_values = None if steps is None else [int(s) for s in steps]
    except ValueError:
        raise ProbeserveError(
            f"--steps: expected checkpoint step numbers, got {' '.join(steps or [])}"
        ) from None
    try:
        path = plots.plot(
            args.kind,
            table,
            args.out,
            run=args.run,
            metric=args.metric,
            steps=step_values,
            layers=_split_list(args.layers),
            s3_endpoint=args.s3_endpoint,
        )
    except plots.ChoiceError as e:  # its message names Python's `run=`; a user here typed --run
        raise ProbeserveError(e.cli) from None
    print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from probeserve.plots import ChoiceError
    from probeserve.report import write_report

    try:
        out = write_report(
            args.results, args.out, run=args.run, s3_endpoint=args.s3_endpoint, refresh_seconds=args.refresh
        )
    except ChoiceError as e:  # its message names Python's `run=`; a user here typed --run
        raise ProbeserveError(e.cli) from None
    print(out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from probeserve.demo import run_demo

    return run_demo(out=args.out, quick=args.quick, runner=args.runner)


def build_parser() -> argparse.ArgumentParser:
    from probeserve import __version__

    parser = argparse.ArgumentParser(
        prog="probeserve",
        description="Linear classifier probes for every checkpoint and layer (Alain & Bengio, 2016).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"probeserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_spec(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description)
        p.add_argument("spec", help="sweep spec, YAML or JSON")
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a spec field, e.g. probe.l2=0.001"
        )
        return p

    with_spec(
        "validate",
        "check a spec: print it resolved, or every error with its field path",
        "Check a spec without running anything: print it with every default filled in, and its "
        "hash; or print every error with its field path and exit 2.",
    ).set_defaults(func=cmd_validate)
    with_spec(
        "layers",
        "list the model's probe points, shapes and features after the reducer",
        "Build the spec's model (random weights) and list its probe points in forward order: "
        "index, name, output shape, features, features after the reducer, and whether the spec "
        "selects it.",
    ).set_defaults(func=cmd_layers)
    with_spec(
        "plan",
        "show done, failed and pending items with activation sizes",
        "List every (checkpoint, layer) item of the spec as done, failed or pending, with the "
        "activation bytes each needs; reads storage only, runs nothing.",
    ).set_defaults(func=cmd_plan)
    r = with_spec(
        "run",
        "run every pending item: on Ray (a local one unless --address), or in-process",
        "Run every pending item of the spec and print the test-error table. Done items are "
        "skipped and failed ones retried. Exit status: 0 all done, 1 some items failed, 2 bad input.",
    )
    r.add_argument(
        "--address", help="Ray cluster: auto, host:port or ray://host:port (default: start a local Ray)"
    )
    r.add_argument(
        "--runner",
        choices=["ray", "local"],
        default="ray",
        help="ray, or local: in this process, no Ray (default: %(default)s)",
    )
    r.add_argument("--max-actors", type=int, help="at most this many probe actors")
    r.set_defaults(func=cmd_run)

    st = sub.add_parser(
        "status",
        help="progress of the runs in an output location, read from storage",
        description="Count the checkpoints and items done, failed, running and pending of every run "
        "in an output location (a path or s3://), from storage alone: from any machine, while a "
        "sweep runs. Exit 1 when a run's records cannot be read.",
    )
    st.add_argument("output", help="the spec's output.uri")
    st.add_argument("--run", help="only this run")
    st.add_argument("--s3-endpoint", help="an S3-compatible endpoint (default: $PROBESERVE_S3_ENDPOINT)")
    st.set_defaults(func=cmd_status)

    q = sub.add_parser(
        "query",
        help="query the results table with SQL (a view named 'results')",
        description="Read the committed result rows under an output location as a table named "
        "'results' (DuckDB SQL), and print the answer as a table, CSV or JSON, or write it to a "
        "file (Parquet needs --out).",
    )
    q.add_argument("results", help="the spec's output.uri (or its results/ folder)")
    q.add_argument("--sql", help=f"default: {DEFAULT_SQL}")
    q.add_argument(
        "--format",
        choices=["table", "csv", "json", "parquet"],
        default="table",
        help="(default: %(default)s)",
    )
    q.add_argument(
        "--out", help="write the answer here (a path or URI) instead of stdout; needed for parquet"
    )
    q.add_argument("--run", help="only this run")
    q.add_argument("--s3-endpoint", help="an S3-compatible endpoint (default: $PROBESERVE_S3_ENDPOINT)")
    q.set_defaults(func=cmd_query)

    w = with_spec(
        "watch",
        "watch the checkpoint prefix and probe every new complete checkpoint once",
        "Scan the spec's checkpoint prefix every --interval seconds and run the sweep of each new "
        "complete checkpoint exactly once, here or as Ray jobs; stop with SIGTERM or Ctrl-C. "
        "See docs/watch.md.",
    )
    w.add_argument("--address", help="submit Ray jobs to this job API (http://head:8265); default: run here")
    w.add_argument(
        "--runner",
        choices=["ray", "local"],
        default="ray",
        help="without --address: local Ray or in-process (default: %(default)s)",
    )
    w.add_argument("--once", action="store_true", help="one scan, submit, exit (cron, Kubernetes CronJob)")
    w.add_argument(
        "--interval", type=float, default=60.0, help="seconds between scans (default: %(default)g)"
    )
    w.add_argument(
        "--policy",
        choices=["all", "newest"],
        default="all",
        help="probe every checkpoint, or only the newest (default: %(default)s)",
    )
    w.add_argument(
        "--claim-timeout",
        type=float,
        default=600.0,
        help="take over a claim unchanged this many seconds whose job is unknown (default: %(default)g)",
    )
    w.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="claim generations before a dying job ends failed (default: %(default)s)",
    )
    w.add_argument(
        "--keep-activations", action="store_true", help="keep activation shards (default: delete once probed)"
    )
    w.add_argument("--health-file", help="touched after every successful scan, for a liveness check")
    w.add_argument(
        "--page-size", type=int, default=1000, help="keys per listing request (default: %(default)s)"
    )
    w.add_argument("--status", action="store_true", help="print the ledger and exit")
    w.set_defaults(func=cmd_watch)

    pl = sub.add_parser(
        "plot",
        help="plot the results: error by layer, heatmap, by step, or an animation",
        description="Draw one figure of a run's results: error by layer (a line per step), a "
        "heatmap of steps by layers, error by step (a line per layer), or an animation of the "
        "error by layer over the steps. See docs/results.md.",
    )
    pl.add_argument("results", help="the spec's output.uri (or its results/ folder)")
    pl.add_argument(
        "--kind",
        choices=["layers", "heatmap", "steps", "animation"],
        default="layers",
        help="layers: error by layer, a line per step; heatmap: step x layer; steps: error by step, "
        "a line per layer; animation: the layers plot, a frame per step (.gif, or .mp4 with ffmpeg) "
        "(default: %(default)s)",
    )
    pl.add_argument(
        "--out", required=True, help="file to write: .png, .svg, .pdf; .gif or .mp4 for animation"
    )
    pl.add_argument("--run", help="the run to plot (needed when the results hold several)")
    pl.add_argument(
        "--metric",
        choices=["test_error", "val_error", "train_error", "test_loss", "val_loss", "train_loss"],
        default="test_error",
        help="the value plotted; the chance level is drawn for errors (default: %(default)s)",
    )
    pl.add_argument(
        "--steps",
        nargs="+",
        metavar="STEP",
        help="checkpoint steps (default: all; the layers plot draws up to 6, spread over the run)",
    )
    pl.add_argument("--layers", nargs="+", metavar="LAYER", help="layer names (default: all)")
    pl.add_argument("--s3-endpoint", help="an S3-compatible endpoint (default: $PROBESERVE_S3_ENDPOINT)")
    pl.set_defaults(func=cmd_plot)

    rp = sub.add_parser(
        "report",
        help="write one self-contained HTML report of a sweep, finished or not",
        description="Write one HTML file (plots embedded, no script, no external URL) with a "
        "run's progress, plots, error grid, failures, checkpoints, timings, spec and rows; it is "
        "published atomically, so it can be rewritten while someone reads it.",
    )
    rp.add_argument("results", help="the spec's output.uri (or its results/ folder)")
    rp.add_argument("--out", required=True, help="the HTML file to write (a path or s3:// URI)")
    rp.add_argument("--run", help="only this run (default: every run there)")
    rp.add_argument(
        "--refresh", type=int, metavar="SECONDS", help="make an open page reload itself this often"
    )
    rp.add_argument("--s3-endpoint", help="an S3-compatible endpoint (default: $PROBESERVE_S3_ENDPOINT)")
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser(
        "demo",
        help="train mnist_convnet on Fashion-MNIST, checkpoint it, probe every layer",
        description="The main job on embedded defaults: train the paper's mnist_convnet on "
        "Fashion-MNIST (synthetic images in the same format where the Debian package is absent), "
        "save checkpoints, probe every layer of every checkpoint, and print what the table "
        "shows. A rerun only finishes what is missing.",
    )
    d.add_argument(
        "--out", default="demo-output", help="folder used as the bucket and output (default: %(default)s)"
    )
    d.add_argument("--quick", action="store_true", help="a smaller, faster demo (for tests)")
    d.add_argument(
        "--runner",
        choices=["ray", "local"],
        default="ray",
        help="ray, or local: in this process, no Ray (default: %(default)s)",
    )
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except ProbeserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; committed results are kept, rerun to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
