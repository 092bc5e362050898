"""The `probeserve` command: validate | layers | plan | run | status | query | plot | report | watch | demo.

Every knob lives in the spec; `--set key.path=value` overrides a field of the spec file for
one invocation. User errors print one clear message (no traceback) and exit 2; a run in
which some items failed exits 1 and names them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from probeserve.console import format_table, human_bytes, print_results_table, print_run_summary
from probeserve.errors import ProbeserveError, SpecError, StorageError, first_line
from probeserve.runners.base import run_spec

log = logging.getLogger("probeserve")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # botocore logs "Found credentials in environment variables." at INFO on every command
    # that touches S3; that is its own chatter, not news to a user (-v still shows it).
    if not verbose:
        logging.getLogger("botocore").setLevel(logging.WARNING)


class Terminated(KeyboardInterrupt):
    """SIGTERM, the way schedulers (systemd, Kubernetes, Slurm, `kill`) stop a command.

    Raised like Ctrl-C's KeyboardInterrupt, so the same cleanup runs: a probe removes its
    `running/` marker, and no other reader takes the item for live for two minutes. Python's
    default for SIGTERM ends the process at once, without running any `finally`."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated()


def _spec(args: argparse.Namespace):
    from probeserve.spec import load_spec

    return load_spec(args.spec, overrides=args.set or [])


def _under(field: str, message: str) -> str:
    """A message that names `field` first (unless it already names a field below it)."""
    return message if message.startswith((field + ".", field + ":", field + "[")) else f"{field}: {message}"


def check_spec(spec) -> tuple[list[str], list[str]]:
    """Everything `validate` can find wrong with a spec beyond its fields, without a checkpoint:
    (errors, each naming its field, and notes on what was checked).

    The model is built (random weights), the probe data opened, the output location checked
    (and that the run name is not bound to another spec there), each layer pattern matched
    and each selected layer's reducer made. A step that fails does not hide the ones that
    do not depend on it: a model error is reported with a data error, but layers need both.
    """
    from probeserve import results
    from probeserve.layers import select_probe_points
    from probeserve.models import model_errors
    from probeserve.storage import open_storage
    from probeserve.sweep import Sweep

    sweep = Sweep(spec)
    errors: list[str] = []
    notes: list[str] = []
    errors += model_errors(spec.model)
    model_found = not errors  # the factory imports and takes the keywords: it can be called
    dataset = None
    try:
        dataset = sweep.dataset
        notes.append(
            f"data opens: {', '.join(f'{s} {dataset.size(s)}' for s in ('train', 'val', 'test'))} examples "
            f"of shape {list(dataset.input_shape)}, {dataset.num_classes} classes"
        )
    except ProbeserveError as e:
        # opening the data reads the output too (an image run's frozen index is there): an
        # output that cannot be opened is the check below's error, not the data's
        if not str(e).startswith("output.uri"):
            errors.append(_under("data", str(e)))
    try:
        checkpoints = open_storage(spec.checkpoints.uri, s3_endpoint=spec.storage.resolved_endpoint())
        # S3 only: a local folder the training job has not created yet is no error, but a
        # bucket is made by its owner, not by the job, and a missing one is a typo
        bucket = getattr(checkpoints, "bucket", None)
        if bucket and not checkpoints.root_exists():
            errors.append(f"checkpoints.uri: bucket {bucket!r} does not exist ({spec.checkpoints.uri})")
    except ProbeserveError as e:
        errors.append(_under("checkpoints.uri", str(e)))
    try:
        output = sweep.output
        bucket = getattr(output, "bucket", None)
        if bucket and not output.root_exists():  # a key in a missing bucket only reads as absent
            raise StorageError(f"bucket {bucket!r} does not exist ({spec.output.uri})")
        key = results.run_key(spec.run, "spec.json")
        if output.stat(key) is not None:
            stored = results.read_json(output, key)
            if isinstance(stored, dict) and stored.get("spec_hash") != sweep.spec_hash:
                from probeserve.spec import old_default_hint

                hint = old_default_hint(spec, stored.get("spec_hash"))
                errors.append(
                    f"run: run {spec.run!r} in {output.uri} was made with a different spec (hash "
                    f"{stored.get('spec_hash')} vs {sweep.spec_hash}"
                    + (f": {hint})" if hint else "); choose another run name or output.uri")
                )
    except ProbeserveError as e:
        errors.append(_under("output.uri", str(e)))
    if not model_found:
        return errors, notes  # no model: no layers to check
    if dataset is None:
        try:
            sweep.build_model()
        except ProbeserveError as e:
            errors.append(_under("model", str(e)))
        return errors, notes
    try:
        points = sweep.all_points
    except ProbeserveError as e:
        return [*errors, _under("model", str(e))], notes
    include, exclude = spec.layers.include, spec.layers.exclude
    matching = []
    for i, pattern in enumerate(include):
        try:
            select_probe_points(points, [pattern], [])
            matching.append(pattern)
        except ProbeserveError as e:
            errors.append(str(e).replace("layers.include:", f"layers.include[{i}]:", 1))
    if not matching:
        return errors, notes
    try:  # the reducers of what the patterns that match select
        selected = select_probe_points(points, matching, exclude)
    except ProbeserveError as e:
        return [*errors, str(e).replace("layers:", "layers.exclude:", 1)], notes
    notes.append(f"layers: {len(selected)} of {len(points)} probe points selected")
    for p in selected:
        try:
            sweep.reducer(p)
        except ProbeserveError as e:
            errors.append(_under("reducer", str(e)))
    return errors, notes


def cmd_validate(args: argparse.Namespace) -> int:
    from probeserve.spec import dump_spec

    spec = _spec(args)
    errors, notes = check_spec(spec)
    if errors:
        raise SpecError(errors, source=args.spec)
    print(dump_spec(spec), end="")
    print(f"# spec_hash: {spec.hash()}")
    for note in [f"model builds: {spec.model.factory}", *notes]:
        print(f"# checked: {note}")
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
                "activation_bytes": human_bytes(est),
            }
        )
    print(format_table(rows, ["step", "layer", "index", "status", "activation_bytes"]))
    counts = plan.counts()
    print(
        f"\n{len(plan.items)} item(s): {counts['ok']} done, {counts['failed']} failed, "
        f"{counts['pending']} pending; activations to extract: about {human_bytes(todo_bytes)}"
    )
    for c in plan.discovery.incomplete:
        print(f"skipped (no completion marker yet): {c.key}")
    for key, why in plan.discovery.rejected:
        print(f"skipped ({why}): {key}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    summary = run_spec(spec, runner=args.runner, address=args.address)
    rows = print_results_table(spec.output.uri, spec.run, spec.storage.resolved_endpoint())
    print_run_summary(spec, summary, rows)
    for ckpt, layer, error in summary.failed:
        print(f"FAILED {ckpt} {layer}: {error}", file=sys.stderr)
    return summary.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from probeserve.status import run_status

    rows = run_status(args.output, run=args.run, s3_endpoint=args.s3_endpoint)
    if not rows:
        _no_rows(args.output, args.run, args.s3_endpoint)
        print(f"no runs under {args.output}")
        return 0
    columns = ["run", "checkpoints", "items", "done", "failed", "running", "pending"]
    broken = [r for r in rows if r.get("error")]
    stale = [r for r in rows if r.get("stale")]
    print(format_table(rows, columns + (["stale"] if stale else []) + (["error"] if broken else [])))
    for r in stale:
        print(
            f"run {r['run']}: {r['stale']} item(s) marked running have no live probe (dead process or "
            "no heartbeat): counted as pending; the next run removes their markers"
        )
    for r in broken:
        print(f"run {r['run']}: cannot read its records: {r['error']}", file=sys.stderr)
    return 1 if broken else 0


# The plain terminal table shows these; exports (csv, json, parquet) carry every column.
DEFAULT_SQL = (
    "SELECT run, step, layer, layer_index, n_features, l2, train_error, val_error, test_error, "
    "test_error_low, test_error_high, control_error, selectivity, control_train_error, mdl_bits, "
    "mdl_compression, epochs, hit_max_epochs, status, error FROM results ORDER BY run, step, layer_index"
)
# Columns of the default terminal table left out when no row has them (older rows; runs
# without probe.control or probe.mdl), so the table stays readable.
OPTIONAL_COLUMNS = (
    "l2",
    "test_error_low",
    "test_error_high",
    "control_error",
    "selectivity",
    "control_train_error",
    "mdl_bits",
    "mdl_compression",
)
EXPORT_SQL = "SELECT * FROM results ORDER BY run, step, layer_index"


def _sandbox(con) -> None:
    """Let a query see the registered results table and nothing else.

    `enable_external_access = false` stops every file system and network access (read_csv,
    glob, COPY ... TO, ATTACH, EXPORT DATABASE, INSTALL and LOAD); no extension is installed
    or loaded behind the query's back; Python replacement scans (a query reading any Arrow or
    pandas object in scope by its variable name) are off; and the configuration is locked so
    that the query cannot turn any of this back on.
    """
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def _nested(t) -> bool:
    import pyarrow as pa

    return (
        pa.types.is_nested(t)  # list, large list, fixed-size list, list view, struct, map, union
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_interval(t)
        or isinstance(t, pa.ExtensionType)
    )


def _json_value(v: object) -> object:
    """A value JSON can hold: non-finite floats become null, bytes hex text, others as they are."""
    import math

    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def _as_text(table, *, parquet: bool = False):
    """Columns a CSV file (or the terminal table) cannot hold as they are, as JSON text.

    Lists, structs and maps become `[1, 2]`, `{"a": 1}`, `{"k": 1}`; binary becomes hex text. For Parquet (which holds lists, structs and binary) only the types it has no
    counterpart for (intervals, unions) are turned into text.
    """
    import pyarrow as pa

    def needs_text(t) -> bool:
        if parquet:
            if pa.types.is_interval(t) or pa.types.is_union(t):
                return True
            return pa.types.is_nested(t) and any(needs_text(t.field(i).type) for i in range(t.num_fields))
        return _nested(t)

    columns = []
    for field, column in zip(table.schema, table.columns):
        if not needs_text(field.type):
            columns.append(column)
            continue
        text = [
            None
            if v is None
            else (
                v.hex()
                if isinstance(v, bytes)
                else json.dumps(_json_value(v), default=str, ensure_ascii=False)
            )
            for v in column.to_pylist(maps_as_pydicts="lossy")
        ]
        columns.append(pa.array(text, pa.string()))
    names = table.column_names
    return pa.Table.from_arrays(columns, names=names)


def _encode(table, fmt: str) -> bytes:
    """The answer as bytes in a format: Arrow's own buffers for Parquet and CSV.

    Not `io.BytesIO`: a Python file object written by pyarrow's threads can be destroyed by
    one of them during interpreter shutdown, which aborted the process (exit 134) after a
    correct answer.
    """
    import pyarrow as pa

    if fmt == "json":
        rows = [
            {k: _json_value(v) for k, v in row.items()} for row in table.to_pylist(maps_as_pydicts="lossy")
        ]
        return (json.dumps(rows, default=str, indent=1, ensure_ascii=False) + "\n").encode()
    if fmt == "table":
        return (format_table(_as_text(table).to_pylist(), table.column_names) + "\n").encode()
    buf = pa.BufferOutputStream()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(_as_text(table, parquet=True), buf)
    else:
        import pyarrow.csv as pcsv

        pcsv.write_csv(_as_text(table), buf)
    return buf.getvalue().to_pybytes()


_GOOD_OUT = "a file path, file:///path/answer.csv or s3://bucket/path/answer.csv"


def _out_location(out: str, results_uri: str) -> tuple[str, str]:
    """(folder URI, file name) of `--out`, or a one-line error naming `--out`.

    The answer goes exactly where `--out` says (`storage.file_location`), as one file: never a
    folder, never inside the results folder (where every file is read as a result row).
    """
    import os
    import re
    from urllib.parse import urlsplit

    from probeserve.spec import check_uri
    from probeserve.storage import file_location

    try:
        check_uri(out)
    except ValueError as e:
        what = re.split(r"; |, like ", str(e))[0]  # the problem, not check_uri's spec-field advice
        raise ProbeserveError(f"--out {out!r}: {what}; give {_GOOD_OUT}") from None
    parts = urlsplit(out)
    folder, name = file_location(out)
    if parts.scheme == "s3":
        if not name:
            raise ProbeserveError(f"--out {out!r}: names no object; give {_GOOD_OUT}")
    else:
        path = parts.path if parts.scheme == "file" else out
        if not name or os.path.isdir(path):
            raise ProbeserveError(
                f"--out {out!r}: is a folder; give a file name, like {out.rstrip('/')}/answer.csv"
            )
    _outside_results(out, folder, name, results_uri)
    return folder, name


def _outside_results(out: str, folder: str, name: str, results_uri: str) -> None:
    """Refuse an `--out` (of query, plot or report) inside the results folder: every reader
    takes each file there for a result row, and pandas and pyarrow fail on one that is not."""
    import os
    from urllib.parse import urlsplit

    from probeserve import layout

    results_dir = layout.output_root(results_uri).rstrip("/") + "/" + layout.RESULTS_DIR
    if results_dir.startswith("file://"):
        results_dir = urlsplit(results_dir).path
    if "://" not in results_dir:
        results_dir = os.path.abspath(results_dir)
    target = folder.rstrip("/") + "/" + name
    if target.startswith(results_dir + "/"):
        raise ProbeserveError(
            f"--out {out!r}: is inside {results_dir}, where every file is read as a result row; write it elsewhere"
        )


def _figure_out(out: str, results_uri: str) -> None:
    """`--out` of plot and report, before any work: not inside the results folder."""
    from probeserve.storage import file_location

    folder, name = file_location(out)
    if name:  # a folder: plot and report say what is wrong with it themselves
        _outside_results(out, folder, name, results_uri)


def _no_rows(results_uri: str, run: str | None, s3_endpoint: str | None) -> None:
    """Raise where reading found no rows because of what the user typed, not because nothing
    is finished yet: a folder beside an output (inside one, or above some), or a `--run` the
    output does not hold. An output a run has not written to yet still has "no results yet"."""
    from probeserve import results

    why = results.not_an_output(results.output_root(results_uri), s3_endpoint=s3_endpoint)
    if why is not None:
        raise ProbeserveError(why)
    if run is not None:
        out = results.open_output(results.output_root(results_uri), s3_endpoint=s3_endpoint)
        runs = results.run_names(out)
        if run not in runs:
            raise ProbeserveError(
                f"--run {run}: no such run under {results_uri}; runs there: {', '.join(runs) or 'none'}"
            )


_FORMAT_OF_EXTENSION = {".csv": "csv", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


def _query_format(given: str | None, where: tuple[str, str] | None) -> str:
    """The answer's format: `--format`, else the one `--out`'s extension names (`answer.parquet`
    was written as the terminal's text table, which no Parquet reader opens), else `table`. A
    `--format` that another extension contradicts is refused: readers go by the extension."""
    import os

    ext = os.path.splitext(where[1])[1].lower() if where is not None else ""
    named = _FORMAT_OF_EXTENSION.get(ext)
    if given is None:
        return named or "table"
    if named is not None and named != given:
        raise ProbeserveError(
            f"--out {where[1] if where else ''!r}: a {ext} file, but --format {given}; "
            f"leave --format out (the extension says {named}) or name the file for {given}"
        )
    return given


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from probeserve import results
    from probeserve.storage import publish_file

    where = _out_location(args.out, args.results) if args.out is not None else None  # before any work
    args.format = _query_format(args.format, where)
    if args.format == "parquet" and where is None:
        raise ProbeserveError("--format parquet: give --out FILE (Parquet is not for a terminal)")
    table = results.load(args.results, run=args.run, s3_endpoint=args.s3_endpoint)
    if table.num_rows == 0:
        _no_rows(args.results, args.run, args.s3_endpoint)
        scope = f"run {args.run!r} under {args.results}" if args.run else args.results  # as plot says
        print(f"no results yet for {scope}", file=sys.stderr)
    con = duckdb.connect()
    con.register("results", table)
    con.execute("SET python_enable_replacements = false")  # never: it reads Python variables by name
    if not args.allow_external_access:
        _sandbox(con)
    sql = args.sql or (DEFAULT_SQL if args.format == "table" else EXPORT_SQL)
    try:
        rel = con.sql(sql)
        if rel is None:  # a statement with no result set
            raise ProbeserveError("--sql: the statement returns no rows; use a SELECT")
        out = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
    except duckdb.Error as e:
        first = first_line(e) or type(e).__name__
        if "configuration" in first and ("disabled" in first or "locked" in first):
            first += " (a query sees the results table only; --allow-external-access lifts this)"
        raise ProbeserveError(f"--sql: {first}") from None
    finally:
        con.close()
    if args.sql is None and args.format == "table":
        out = out.drop_columns([c for c in OPTIONAL_COLUMNS if out.column(c).null_count == out.num_rows])
    data = _encode(out, args.format)
    if where is not None:
        publish_file(args.out, data, s3_endpoint=args.s3_endpoint)
        print(f"{out.num_rows} row(s) written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    import signal

    from probeserve.ledger import Ledger
    from probeserve.storage import open_storage
    from probeserve.watch import LocalSubmitter, RayJobSubmitter, Watcher

    spec = _spec(args)
    if args.status:
        storage = open_storage(spec.output.uri, s3_endpoint=spec.storage.resolved_endpoint())
        rows = Ledger(storage, spec.run, page_size=args.page_size).rows()
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

    _figure_out(args.out, args.results)
    table = results.load(args.results, run=args.run, s3_endpoint=args.s3_endpoint)
    if table.num_rows == 0:
        _no_rows(args.results, args.run, args.s3_endpoint)
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

    _figure_out(args.out, args.results)
    try:
        out = write_report(
            args.results, args.out, run=args.run, s3_endpoint=args.s3_endpoint, refresh_seconds=args.refresh
        )
    except ChoiceError as e:  # its message names Python's `run=`; a user here typed --run
        raise ProbeserveError(e.cli) from None
    print(out)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from probeserve.migrate import migrate

    done = migrate(args.output, s3_endpoint=args.s3_endpoint, force=args.force)
    print("\n".join(done.lines()))
    return 1 if done.damaged else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from probeserve.demo import run_demo

    return run_demo(out=args.out, quick=args.quick, runner=args.runner)


def _positive(kind: type) -> Any:
    """An argparse type: a number of `kind` above 0. A 0 or negative `--interval` would scan
    without pause, `--page-size 0` list nothing forever, `--refresh -5` write a refresh the
    browser ignores; each is refused as argparse refuses a word where a number goes (exit 2)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:  # NaN included
            raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


class _SetField(argparse.Action):
    """A flag that is shorthand for `--set FIELD=VALUE`: it overrides that spec field, in its
    place among the `--set`s, and nothing else. Settings live in the spec; such a flag says in
    its help which field it overrides."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, field: str, **kwargs: Any) -> None:
        self.field = field
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        value = self.const if self.nargs == 0 else values
        overrides = list(getattr(namespace, "set", None) or [])
        namespace.set = [*overrides, f"{self.field}={value}"]


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
    r.add_argument(
        "--max-actors",
        action=_SetField,
        field="resources.max_actors",
        type=int,
        metavar="N",
        help="shorthand for --set resources.max_actors=N: at most N probe actors (overrides the spec)",
    )
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
        help="(default: the --out file's extension, .csv, .json or .parquet; else table)",
    )
    q.add_argument(
        "--out", help="write the answer here (a path or URI) instead of stdout; needed for parquet"
    )
    q.add_argument(
        "--allow-external-access",
        action="store_true",
        help="let --sql read and write files, attach databases and load extensions (DuckDB's defaults); "
        "by default a query sees the results table and nothing else",
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
        "--interval", type=_positive(float), default=60.0, help="seconds between scans (default: %(default)g)"
    )
    w.add_argument(
        "--policy",
        choices=["all", "newest"],
        default="all",
        help="probe every checkpoint, or only the newest (default: %(default)s)",
    )
    w.add_argument(
        "--claim-timeout",
        type=_positive(float),
        default=600.0,
        help="take over a claim unchanged this many seconds whose job is unknown (default: %(default)g)",
    )
    w.add_argument(
        "--max-attempts",
        type=_positive(int),
        default=3,
        help="claim generations before a dying job ends failed (default: %(default)s)",
    )
    w.add_argument(
        "--keep-activations",
        action=_SetField,
        field="output.keep_activations",
        const="true",
        nargs=0,
        help="shorthand for --set output.keep_activations=true: keep activation shards once probed "
        "(overrides the spec; the daemon does what the spec's output.keep_activations says)",
    )
    w.add_argument("--health-file", help="touched after every successful scan, for a liveness check")
    w.add_argument(
        "--page-size",
        type=_positive(int),
        default=1000,
        help="keys per listing request (default: %(default)s)",
    )
    w.add_argument("--status", action="store_true", help="print the ledger and exit")
    w.set_defaults(func=cmd_watch)

    pl = sub.add_parser(
        "plot",
        help="plot the results: error by layer, heatmap, by step, an animation, or per class",
        description="Draw one figure of a run's results: error by layer (a line per step, its 95% "
        "interval shaded), a heatmap of steps by layers, error by step (a line per layer), an "
        "animation of the error by layer over the steps, or the test error of each class by layer "
        "at one step. See docs/results.md.",
    )
    pl.add_argument("results", help="the spec's output.uri (or its results/ folder)")
    pl.add_argument(
        "--kind",
        choices=["layers", "heatmap", "steps", "animation", "classes"],
        default="layers",
        help="layers: error by layer, a line per step; heatmap: step x layer; steps: error by step, "
        "a line per layer; animation: the layers plot, a frame per step (.gif, or .mp4 with ffmpeg); "
        "classes: class x layer, the test error of each class at one step (default: the last) "
        "(default: %(default)s)",
    )
    pl.add_argument(
        "--out", required=True, help="file to write: .png, .svg, .pdf; .gif or .mp4 for animation"
    )
    pl.add_argument("--run", help="the run to plot (needed when the results hold several)")
    pl.add_argument(
        "--metric",
        choices=[
            *["test_error", "val_error", "train_error", "test_loss", "val_loss", "train_loss"],
            *["control_error", "control_train_error", "selectivity", "mdl_bits", "mdl_compression"],
        ],
        default="test_error",
        help="the value plotted; the chance level is drawn for the task's errors; the last five need "
        "probe.control or probe.mdl (default: %(default)s)",
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
        "--refresh", type=_positive(int), metavar="SECONDS", help="make an open page reload itself this often"
    )
    rp.add_argument("--s3-endpoint", help="an S3-compatible endpoint (default: $PROBESERVE_S3_ENDPOINT)")
    rp.set_defaults(func=cmd_report)

    mg = sub.add_parser(
        "migrate",
        help="bring an output written by an older probeserve to the current layout and columns",
        description="Move results, activations, the watch ledger and running markers of an output written "
        "by an older probeserve to the current layout, and rewrite its older rows with today's columns "
        "(null where a row lacks one). Idempotent and safe to kill; refuses while a run or a watch "
        "daemon looks active.",
    )
    mg.add_argument("output", help="the spec's output.uri")
    mg.add_argument(
        "--force", action="store_true", help="migrate although running markers or watch claims look live"
    )
    mg.add_argument("--s3-endpoint", help="an S3-compatible endpoint (default: $PROBESERVE_S3_ENDPOINT)")
    mg.set_defaults(func=cmd_migrate)

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


def importable_working_folder() -> None:
    """Make the folder the command runs in importable, as `python -m` and uvicorn do, so a
    `model.factory` kept beside the spec (`acme_nets.zoo:build` for ./acme_nets/zoo.py) is
    found by every command. (Python puts the `probeserve` script's own folder first, not
    this one; Ray passes a driver's working folder on to its workers itself.)"""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    importable_working_folder()
    with _sigterm_raises():
        return _main(args)


@contextlib.contextmanager
def _sigterm_raises():
    """While a command runs, SIGTERM raises `Terminated` (where it would end the process at
    once); the handler that was there before is put back after (`main` runs in tests too).
    `watch` installs its own handler, which stops after the current step."""
    previous = signal.getsignal(signal.SIGTERM)
    ours = previous is signal.SIG_DFL and threading.current_thread() is threading.main_thread()
    if ours:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except ProbeserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print("terminated (SIGTERM); committed results are kept, rerun to finish", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted; committed results are kept, rerun to finish", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader stopped reading (`probeserve plan SPEC | head`): no traceback, and no second
        # one when Python flushes stdout at exit; the status a shell gives a command SIGPIPE ended
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
