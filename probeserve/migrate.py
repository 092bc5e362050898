"""`probeserve migrate OUTPUT`: bring an output written by an older probeserve up to date.

Two things change between versions, and both break default Parquet readers if an output
mixes them, so a run refuses such an output (`results.check_layout`) and this command fixes it:

- the layout: layout 1 named checkpoint folders `step={step:012d}-{hash}`, which pandas,
  pyarrow, DuckDB and polars take for hive partitions; layout 2 names them
  `step-{step:012d}-{hash}`. Results, activation shards (and their manifests, which list shard
  keys), the watch ledger and `running/` markers move.
- the schema: columns are appended to `results.COLUMNS` over time; rows written before a
  column existed are rewritten with it, null.

It is safe to kill at any point and to run again: every object is copied (an atomic publish)
before its old key is deleted, a manifest is published only after its shards are copied and
the old one is deleted before the old shards, and `layout.json`, which lets runs write again,
is written last. A row is never lost; if a kill leaves a row under both layouts, readers take
the one in the current layout. It refuses to run while a run or a watch daemon looks active
(a `running/` marker or a ledger claim that is live), because an older probeserve still
running would go on writing the old layout.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from probeserve import layout, results
from probeserve.errors import ProbeserveError
from probeserve.storage import LocalStorage, Storage, join, temp_name

# A marker or claim from another machine is taken as live while it is younger than this: a
# run there may still be going. (Markers from this machine are live exactly while their
# process is.) `--force` is for when you know nothing runs.
LIVE_SECONDS = 3600.0


class Busy(ProbeserveError):
    """A run or a watch daemon looks active on the output: migrating now could lose its work."""


@dataclass
class Migration:
    """What one `migrate` did, for its printout."""

    uri: str
    results_moved: int = 0
    results_rewritten: int = 0  # rows brought to the current schema (moved or in place)
    results_current: int = 0
    duplicates_removed: int = 0  # an old copy whose row already stood in the current layout
    added_columns: set[str] = field(default_factory=set)
    damaged: list[str] = field(default_factory=list)
    layers_moved: int = 0
    shard_files_moved: int = 0
    unused_files_removed: int = 0  # old shards no manifest lists (a killed extraction)
    ledger_moved: int = 0
    markers_removed: int = 0
    already_current: bool = False

    def lines(self) -> list[str]:
        if self.already_current:
            return [f"{self.uri}: already in layout {layout.LAYOUT} with the current columns; nothing to do"]
        added = f" (added, null: {', '.join(sorted(self.added_columns))})" if self.added_columns else ""
        out = [
            f"results: {self.results_moved} row(s) moved to the new layout, {self.results_rewritten} "
            f"rewritten in the current schema{added}, {self.results_current} already current"
            + (f", {self.duplicates_removed} old duplicate(s) removed" if self.duplicates_removed else ""),
            f"activations: {self.layers_moved} layer folder(s) moved ({self.shard_files_moved} shard file(s))"
            + (
                f", {self.unused_files_removed} unused old file(s) removed"
                if self.unused_files_removed
                else ""
            ),
            f"ledger: {self.ledger_moved} object(s) moved; running markers: {self.markers_removed} stale one(s) removed",
        ]
        for uri in self.damaged:
            out.append(f"left in place, damaged: {uri}")
        if self.damaged:
            out.append(
                f"{self.uri}: NOT migrated: move the damaged file(s) out of results/ and run `probeserve migrate` again"
            )
        else:
            out.append(f"{self.uri}: migrated to layout {layout.LAYOUT}; wrote {layout.LAYOUT_KEY}")
        return out


def migrate(uri: str, *, s3_endpoint: str | None = None, force: bool = False) -> Migration:
    """Migrate the output at `uri` (or its `results/` folder); see the module docstring."""
    return migrate_output(results.open_output(layout.output_root(uri), s3_endpoint=s3_endpoint), force=force)


def migrate_output(out: Storage, *, force: bool = False) -> Migration:
    """`migrate` on an opened output storage (tests wrap it to kill the migration midway)."""
    report = Migration(uri=out.uri)
    info = results.read_layout(out)
    if info is not None and results.layout_problem(info) is None:
        report.already_current = True
        return report
    if results.written_by_newer(info):
        raise ProbeserveError(f"{out.uri}: {results.layout_problem(info)}; this probeserve cannot migrate it")
    if info is None and not _written_by_probeserve(out):
        # a mistyped path, a data folder, a home folder: "migrating" it wrote layout.json
        # into it and said it was done (exit 0)
        raise ProbeserveError(
            f"{out.uri}: not an output of probeserve (nothing under {', '.join(d + '/' for d in _OUTPUT_DIRS)}); "
            "give the output.uri of a spec"
        )
    if not force:
        busy = live_work(out)
        if busy:
            more = f" (and {len(busy) - 3} more)" if len(busy) > 3 else ""
            raise Busy(
                f"{out.uri}: a run or watch daemon looks active: {'; '.join(busy[:3])}{more}. Stop it and "
                "wait for it to finish; if nothing runs any more, rerun with --force"
            )
    _migrate_results(out, report)
    _migrate_activations(out, report)
    _migrate_ledger(out, report)
    _remove_old_markers(out, report)
    _remove_empty_old_folders(out)
    if not report.damaged:
        out.publish_bytes(layout.LAYOUT_KEY, results.layout_body())  # last: runs may write again
    return report


# ---------------------------------------------------------------------------- is anything running?


def live_work(out: Storage, *, now: float | None = None) -> list[str]:
    """Descriptions of `running/` markers and ledger claims that look live."""
    from probeserve.ledger import Ledger

    now = time.time() if now is None else now
    here = socket.gethostname()
    found = []
    for obj in out.list(layout.running_prefix()):
        try:
            info = json.loads(out.read_bytes(obj.key, max_bytes=1 << 20))
            host, pid = info.get("host"), int(info.get("pid"))
        except (ValueError, TypeError, AttributeError, OverflowError):  # OverflowError: "pid": 1e999
            continue  # not a marker probeserve wrote whole: nothing to ask it
        if host == here:
            if _pid_alive(pid):
                found.append(f"{out.uri_for(obj.key)}: process {pid} on this machine is probing it")
        elif now - obj.mtime < LIVE_SECONDS:
            found.append(f"{out.uri_for(obj.key)}: written by {host} {now - obj.mtime:.0f} s ago")
    runs = {parsed[0] for o in out.list(layout.ledger_prefix()) if (parsed := layout.parse_ledger_key(o.key))}
    for run in sorted(runs):
        for entry in Ledger(out, run).read().values():
            if entry.status in ("done", "failed"):
                continue
            age = now - entry.last_update()
            if age < LIVE_SECONDS:
                found.append(
                    f"watch claim of {entry.claim.get('checkpoint') or entry.checkpoint_dir} (run {run}) is "
                    f"{entry.status}, last updated {age:.0f} s ago"
                )
    return found


_OUTPUT_DIRS = (results.RUNS_DIR, *results.PER_CHECKPOINT_DIRS)


def _written_by_probeserve(out: Storage) -> bool:
    """Whether anything is under the folders a run or a watch daemon writes."""
    return any(next(iter(out.list(top + "/")), None) is not None for top in _OUTPUT_DIRS)


def _pid_alive(pid: int) -> bool:
    # staging's: a pid too large for kill(2) counts as alive there instead of raising
    # OverflowError (a marker with pid 2**31 made migrate end in a traceback)
    from probeserve.staging import pid_alive

    return pid_alive(pid)


# ---------------------------------------------------------------------------- results


def _migrate_results(out: Storage, report: Migration) -> None:
    for key in results.result_keys(out):
        parsed = layout.parse_result_key(key)
        if parsed is None:
            continue  # not a result file probeserve wrote (results/{run}/{dir}/{layer}.parquet)
        data = out.read_bytes(key)
        try:
            table = results.read_parquet_bytes(data)
            current = results.conform(table)
            if current.num_rows != 1:
                raise ValueError(f"{current.num_rows} rows, not 1")
        except (pa.ArrowException, KeyError, ValueError) as e:
            report.damaged.append(f"{out.uri_for(key)} ({e})")
            continue
        row = current.to_pylist()[0]
        new_key = layout.result_key(parsed[0], row["checkpoint"], row["step"], row["layer"])
        stale = table.schema.names != results.COLUMN_NAMES or not table.schema.equals(
            results.SCHEMA, check_metadata=False
        )
        if stale:
            report.added_columns.update(c for c in results.COLUMN_NAMES if c not in table.schema.names)
        if new_key == key:
            if stale:
                out.publish_bytes(key, _row_bytes(current))
                report.results_rewritten += 1
            else:
                report.results_current += 1
            continue
        if out.stat(new_key) is not None and results.read_row_file(out, new_key) is not None:
            # an earlier migrate copied it and was killed before the delete (runs refuse an
            # output in layout 1, so nothing else writes there): as for readers, the copy in
            # the current layout stands
            out.delete(key)
            report.duplicates_removed += 1
            continue
        out.publish_bytes(new_key, _row_bytes(current) if stale else data)  # copy first...
        out.delete(key)  # ...then delete: a kill in between leaves two copies, never none
        report.results_moved += 1
        report.results_rewritten += int(stale)


def _row_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


# ---------------------------------------------------------------------------- activations


def _migrate_activations(out: Storage, report: Migration) -> None:
    """Per layer folder in layout 1: copy its shards, publish the manifest that lists the new
    keys, delete the old manifest, then the old shards."""
    groups: dict[str, list[str]] = defaultdict(list)  # old layer prefix -> its keys
    for obj in out.list(layout.ACTIVATIONS_DIR + "/"):
        prefix = layout.layer_prefix_of(obj.key)
        if prefix is not None and layout.from_v1_dir(layout.checkpoint_dir_of(prefix) or ""):
            groups[prefix].append(obj.key)
    for old_prefix, keys in sorted(groups.items()):
        new_dir = layout.from_v1_dir(layout.checkpoint_dir_of(old_prefix) or "")
        assert new_dir is not None  # only layout-1 folders were grouped
        new_prefix = layout.with_checkpoint_dir(old_prefix, new_dir)
        manifest_key = join(old_prefix, layout.MANIFEST)
        manifest = None
        if manifest_key in keys:
            with contextlib.suppress(results.Damaged):
                manifest = results.read_json(out, manifest_key)
        if isinstance(manifest, dict) and isinstance(manifest.get("splits"), dict):
            listed = set()
            for split in manifest["splits"].values():
                moved = []
                for key in split["shards"]:
                    new = new_prefix + key[len(old_prefix) :] if key.startswith(old_prefix + "/") else key
                    if key != new:
                        _copy(out, key, new)
                        report.shard_files_moved += 1
                    listed.add(key)
                    moved.append(new)
                split["shards"] = moved
            out.publish_bytes(join(new_prefix, layout.MANIFEST), json.dumps(manifest, indent=1).encode())
            out.delete(manifest_key)  # no reader is left with a manifest whose shards go next
            report.layers_moved += 1
            for key in keys:
                if key != manifest_key:
                    out.delete(key)
                    report.unused_files_removed += int(key not in listed)
        else:
            # no manifest (an extraction killed before it finished, or a migrate killed after
            # it deleted the old manifest) or a damaged one: shards nothing reads. The layer
            # is extracted again where a run needs it.
            for key in keys:
                out.delete(key)
                report.unused_files_removed += 1


def _copy(out: Storage, src: str, dst: str) -> None:
    """Copy one object, atomically; a hard link where the output is a local folder."""
    if isinstance(out, LocalStorage):
        dst_path = out.uri_for(dst)
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(dst_path), temp_name())
        try:
            try:
                os.link(out.uri_for(src), tmp)
            except OSError:
                shutil.copyfile(out.uri_for(src), tmp)
            os.replace(tmp, dst_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return
    out.publish_bytes(dst, out.read_bytes(src))


# ---------------------------------------------------------------------------- ledger and markers


def _migrate_ledger(out: Storage, report: Migration) -> None:
    """Claims and states keep their names, bodies (and, locally, their times); only their
    checkpoint folder changes. Per folder: states are copied before claims, and claims are
    deleted before states, because the ledger knows a checkpoint by its claims: a kill in
    between never shows a claim without its state, which would look like a live one. One
    already at the new key (a killed migrate) is kept: claims are create-only."""
    folders: dict[tuple[str, str], list[str]] = defaultdict(list)  # (run, old folder) -> names
    for obj in out.list(layout.ledger_prefix()):
        split = layout.split_checkpoint_key(obj.key)  # ledger/{run}/{dir}/{name}
        if split is not None and split[3] and "/" not in split[3] and layout.from_v1_dir(split[2]):
            folders[(split[1], split[2])].append(split[3])
    for (run, old_dir), names in sorted(folders.items()):
        new_dir = layout.from_v1_dir(old_dir) or old_dir
        copy_order = sorted(names, key=lambda n: (not n.startswith("state-"), n))
        for name in copy_order:
            old, new = layout.ledger_key(run, old_dir, name), layout.ledger_key(run, new_dir, name)
            if out.stat(new) is None:
                _copy(out, old, new)
        for name in reversed(copy_order):
            out.delete(layout.ledger_key(run, old_dir, name))
            report.ledger_moved += 1


def _remove_old_markers(out: Storage, report: Migration) -> None:
    """`running/` markers in layout 1 belong to runs that ended (none is live, or --force):
    nothing reads them any more."""
    for obj in out.list(layout.running_prefix()):
        split = layout.split_checkpoint_key(obj.key)  # running/{run}/{dir}/{layer}.json
        if split is not None and split[3] and "/" not in split[3] and layout.from_v1_dir(split[2]):
            out.delete(obj.key)
            report.markers_removed += 1


def _remove_empty_old_folders(out: Storage) -> None:
    """A local output keeps the folders its objects left; drop the empty layout-1 ones, so no
    `step=...` folder is left for a reader to take for a partition. (S3 has no folders.)"""
    if not isinstance(out, LocalStorage):
        return
    for top in layout.PER_CHECKPOINT_DIRS:
        for dirpath, _, _ in sorted(os.walk(out.uri_for(top)), key=lambda w: -len(w[0])):
            rel = os.path.relpath(dirpath, out.root).split(os.sep)
            if any(layout.from_v1_dir(part) for part in rel):
                with contextlib.suppress(OSError):  # not empty: a file someone put there stays
                    os.rmdir(dirpath)
