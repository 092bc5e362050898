"""Results open in every tool the README names, with its defaults; older outputs are migrated.

The outputs are made the way a user makes them: `probeserve watch --once` and `probeserve
run` as subprocesses of the installed `probeserve` script. pandas, pyarrow (file and dataset
API), DuckDB and polars then read `results/` with no options: right row count, `step` int64,
every column. An output written by an older probeserve (checkpoint folders `step=...`, rows
without the newest columns) is refused by `run`, still read by `query`, and brought up to date
by `probeserve migrate`, which loses no row wherever it is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from probeserve import results
from probeserve.migrate import Busy, migrate_output
from probeserve.storage import open_storage

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_spec, write_checkpoints

PROBESERVE = os.path.join(os.path.dirname(sys.executable), "probeserve")
# rows written before the newest columns existed lack them; these stand for them here
LATER_COLUMNS = [c for c in results.COLUMN_NAMES if c not in results.REQUIRED_COLUMNS][-2:]


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PROBESERVE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def read_with_every_tool(folder: Path) -> dict[str, pa.Table]:
    """`folder` read by each tool with its defaults, as Arrow tables."""
    import duckdb
    import pandas as pd

    tables = {
        "pandas": pa.Table.from_pandas(pd.read_parquet(folder), preserve_index=False),
        "pyarrow.parquet": pq.read_table(folder),
        "pyarrow.dataset": pads.dataset(folder, format="parquet").to_table(),
    }
    rel = duckdb.connect().sql(f"SELECT * FROM read_parquet('{folder}/**/*.parquet')")
    tables["duckdb"] = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
    polars = pytest.importorskip("polars", reason="polars is a test extra: pip install -e '.[test]'")
    tables["polars"] = polars.read_parquet(f"{folder}/**/*.parquet").to_arrow()
    return tables


def assert_read_right(folder: Path, expected: list[dict]) -> None:
    """Every tool: the expected rows, `step` int64, every column and no other."""
    want = sorted((r["step"], r["layer"], r["test_error"]) for r in expected)
    for tool, table in read_with_every_tool(folder).items():
        assert table.num_rows == len(expected), tool
        assert table.column_names == results.COLUMN_NAMES, (tool, table.column_names)
        step = table.schema.field("step").type
        assert step == pa.int64(), (tool, step)
        got = sorted(zip(*(table.column(c).to_pylist() for c in ("step", "layer", "test_error"))))
        assert got == want, tool


@pytest.fixture(scope="module")
def made_by_watch(tmp_path_factory) -> Path:
    """A finished output with every kind of object: results, activations, ledger, records."""
    root = tmp_path_factory.mktemp("readers")
    spec = tiny_spec(root, layers={"include": ["input", "fc2"]}, output={"uri": str(root / "out")})
    write_checkpoints(spec, steps=(0, 10))
    (root / "spec.json").write_text(json.dumps(spec.model_dump(mode="json")))
    proc = cli("watch", "spec.json", "--once", "--runner", "local", "--keep-activations", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    spec = json.loads((dst / "spec.json").read_text())
    spec["checkpoints"]["uri"] = str(dst / "ckpts")
    spec["output"]["uri"] = str(dst / "out")
    (dst / "spec.json").write_text(json.dumps(spec))
    return dst / "out"


def make_layout_1(out: Path) -> None:
    """Turn an output into what probeserve wrote before: checkpoint folders `step=...`, rows
    without the newest columns, no layout.json, and a marker its killed run left."""
    for top in results.PER_CHECKPOINT_DIRS:
        for d in sorted((out / top).glob("*/step-*")):
            d.rename(d.with_name(d.name.replace("step-", "step=", 1)))
    for m in (out / "activations").rglob("manifest.json"):
        body = json.loads(m.read_text())
        for split in body["splits"].values():
            split["shards"] = [k.replace("/step-", "/step=") for k in split["shards"]]
        m.write_text(json.dumps(body))
    for f in (out / "results").rglob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(LATER_COLUMNS), f)
    (out / results.LAYOUT_KEY).unlink()
    marker = next((out / "results").glob("*/step=*")).relative_to(out / "results")
    (out / "running" / marker).mkdir(parents=True, exist_ok=True)
    (out / "running" / marker / "fc2.json").write_text(
        json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1, "started": 0})  # no such process
    )


def every_key(out: Path) -> list[str]:
    """Every file and folder under the output, relative to it."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_a_run_writes_results_that_every_tool_reads_with_its_defaults(made_by_watch):
    out = made_by_watch / "out"
    expected = results.load(str(out)).to_pylist()
    assert len(expected) == 4 and {r["step"] for r in expected} == {0, 10}
    assert_read_right(out / "results", expected)
    assert not [k for k in every_key(out) if "=" in k], "a name=value folder is a hive partition"
    # `probeserve query` exports every row, and a plain `run` on it has nothing to do
    assert cli("run", "spec.json", "--runner", "local", cwd=made_by_watch).returncode == 0


def test_an_old_output_is_refused_by_run_read_by_query_and_migrated(made_by_watch, tmp_path):
    out = fresh_copy(made_by_watch, tmp_path / "old")
    before = {(r["checkpoint"], r["layer"]): r for r in results.load(str(out)).to_pylist()}
    make_layout_1(out)

    run = cli("run", "spec.json", "--runner", "local", cwd=out.parent)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: {out}: it was written by an older probeserve (no layout.json, checkpoint folders named "
        f"step=...); run `probeserve migrate {out}` first"
    ]
    query = cli(
        "query", str(out), "--format", "json", "--sql", "SELECT layer, step FROM results", cwd=out.parent
    )
    assert query.returncode == 0 and len(json.loads(query.stdout)) == 4
    watch = cli("watch", "spec.json", "--once", "--runner", "local", cwd=out.parent)
    assert watch.returncode == 2 and f"probeserve migrate {out}" in watch.stderr

    done = cli("migrate", str(out), cwd=out.parent)
    assert done.returncode == 0, done.stderr
    assert "results: 4 row(s) moved to the new layout, 4 rewritten in the current schema" in done.stdout
    assert "activations: 4 layer folder(s) moved (12 shard file(s))" in done.stdout
    assert "ledger: 4 object(s) moved; running markers: 1 stale one(s) removed" in done.stdout
    assert not [k for k in every_key(out) if "=" in k]
    after = {(r["checkpoint"], r["layer"]): r for r in results.load(str(out)).to_pylist()}
    assert after.keys() == before.keys()
    for item, row in after.items():
        assert all(row[c] is None for c in LATER_COLUMNS)  # older rows: the new columns are null
        assert {k: v for k, v in row.items() if k not in LATER_COLUMNS} == {
            k: v for k, v in before[item].items() if k not in LATER_COLUMNS
        }
    assert_read_right(out / "results", list(after.values()))

    # the migrated output works as before: shards still found, the ledger says done, runs go on
    rerun = cli("watch", "spec.json", "--once", "--runner", "local", cwd=out.parent)
    assert rerun.returncode == 0 and "0 submitted" in rerun.stderr, rerun.stderr[-2000:]
    write_checkpoints(tiny_spec(out.parent, layers={"include": ["input", "fc2"]}), steps=(20,))
    assert cli("run", "spec.json", "--runner", "local", cwd=out.parent).returncode == 0
    assert results.load(str(out)).num_rows == 6
    again = cli("migrate", str(out), cwd=out.parent)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_rows_written_without_the_newest_columns_are_rewritten(made_by_watch, tmp_path):
    out = fresh_copy(made_by_watch, tmp_path / "cols")
    for f in (out / "results").rglob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(LATER_COLUMNS), f)
    older = [c for c in results.COLUMN_NAMES if c not in LATER_COLUMNS]
    (out / results.LAYOUT_KEY).write_text(json.dumps({"layout": results.LAYOUT, "columns": older}))
    run = cli("run", "spec.json", "--runner", "local", cwd=out.parent)
    assert run.returncode == 2 and f"without the column(s) {', '.join(LATER_COLUMNS)}" in run.stderr
    done = cli("migrate", str(out), cwd=out.parent)
    assert done.returncode == 0 and "0 row(s) moved to the new layout, 4 rewritten" in done.stdout
    assert_read_right(out / "results", results.load(str(out)).to_pylist())
    assert cli("run", "spec.json", "--runner", "local", cwd=out.parent).returncode == 0


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even `except Exception`."""


class DiesAfter:
    """A storage that dies before its (n+1)-th write or delete."""

    def __init__(self, inner, n: int) -> None:
        self._inner, self.left = inner, n

    def _tick(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise Killed

    def publish_bytes(self, key, data):
        self._tick()
        self._inner.publish_bytes(key, data)

    def delete(self, key):
        self._tick()
        self._inner.delete(key)

    def create_only(self, key, data):
        self._tick()
        return self._inner.create_only(key, data)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_migrate_killed_at_any_write_loses_no_row_and_finishes_when_run_again(made_by_watch, tmp_path):
    template = fresh_copy(made_by_watch, tmp_path / "template")
    expected = {
        (r["checkpoint"], r["layer"]): r["test_error"] for r in results.load(str(template)).to_pylist()
    }
    make_layout_1(template)
    whole = DiesAfter(open_storage(str(shutil.copytree(template, tmp_path / "whole"))), 10**6)
    migrate_output(whole)
    total = 10**6 - whole.left  # writes and deletes of a whole migrate
    assert total > 20
    for n in range(total):
        out = Path(shutil.copytree(template, tmp_path / f"k{n}"))
        with pytest.raises(Killed):
            migrate_output(DiesAfter(open_storage(str(out)), n))
        rows = results.load(str(out)).to_pylist()  # readable at every point, each item once
        assert {(r["checkpoint"], r["layer"]): r["test_error"] for r in rows} == expected, n
        migrate_output(open_storage(str(out)))
        rows = results.load(str(out)).to_pylist()
        assert {(r["checkpoint"], r["layer"]): r["test_error"] for r in rows} == expected, n
        assert not [k for k in every_key(out) if "=" in k], n
        assert json.loads((out / results.LAYOUT_KEY).read_text())["columns"] == results.COLUMN_NAMES
        shutil.rmtree(out)


def test_migrate_refuses_while_a_run_is_in_progress(made_by_watch, tmp_path):
    out = fresh_copy(made_by_watch, tmp_path / "busy")
    make_layout_1(out)
    marker = next((out / "running").rglob("fc2.json"))
    marker.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0}))
    refused = cli("migrate", str(out), cwd=tmp_path)
    assert refused.returncode == 2 and "a run or watch daemon looks active" in refused.stderr
    assert f"process {os.getpid()} on this machine" in refused.stderr
    assert (out / "results" / "t").is_dir() and any((out / "results" / "t").glob("step=*"))  # untouched
    with pytest.raises(Busy):
        migrate_output(open_storage(str(out)))
    forced = cli("migrate", str(out), "--force", cwd=tmp_path)
    assert forced.returncode == 0 and "running markers: 1 stale one(s) removed" in forced.stdout


@pytest.mark.integration
def test_migrate_an_old_output_on_s3(made_by_watch, tmp_path, s3_server, monkeypatch):
    monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", s3_server.endpoint)
    local = fresh_copy(made_by_watch, tmp_path / "src")
    expected = {(r["checkpoint"], r["layer"]): r["test_error"] for r in results.load(str(local)).to_pylist()}
    make_layout_1(local)
    uri = f"s3://{s3_server.new_bucket()}/probes"
    bucket = open_storage(uri)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            bucket.publish_bytes(str(p.relative_to(local)), p.read_bytes())
    refused = cli("run", "spec.json", "--runner", "local", "--set", f"output.uri={uri}", cwd=local.parent)
    assert refused.returncode == 2 and f"run `probeserve migrate {uri}` first" in refused.stderr
    done = cli("migrate", uri, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "results: 4 row(s) moved to the new layout" in done.stdout and "12 shard file(s)" in done.stdout
    keys = [o.key for o in bucket.list("")]
    assert not [k for k in keys if "=" in k] and results.LAYOUT_KEY in keys
    rows = results.load(uri).to_pylist()
    assert {(r["checkpoint"], r["layer"]): r["test_error"] for r in rows} == expected
    for key in [k for k in keys if k.endswith("manifest.json")]:
        for split in json.loads(bucket.read_bytes(key))["splits"].values():
            assert all(s in keys for s in split["shards"])  # the manifests name the moved shards
    again = cli("run", "spec.json", "--runner", "local", "--set", f"output.uri={uri}", cwd=local.parent)
    assert again.returncode == 0 and "4 already done" in again.stdout, again.stderr[-2000:]


@pytest.mark.parametrize(
    "body, why",
    [
        ('{"layout": 2, "columns": 5}', '"columns" is not a list of column names'),
        ('{"layout": 2, "columns": [1, [2]]}', '"columns" is not a list of column names'),
        ('{"columns": []}', '"layout" is null, not a number'),
        ('{"layout": true}', '"layout" is true, not a number'),
    ],
)
def test_a_damaged_layout_json_is_named_by_run_and_migrate(tmp_path, body, why):
    """`"columns": 5` failed `run` and `migrate` with a TypeError traceback (exit 1); `{}` was
    called the output of a newer probeserve and `{"layout": true}` one of layout 1, which
    migrate then rewrote. Each is named as damaged, one line (exit 2)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / results.LAYOUT_KEY).write_text(body)
    storage = open_storage(str(out))
    expected = f"{out / results.LAYOUT_KEY}: damaged ({why})"
    with pytest.raises(results.Damaged) as e:
        results.check_layout(storage)
    assert str(e.value) == expected
    with pytest.raises(results.Damaged) as e:
        migrate_output(storage)
    assert str(e.value) == expected
    assert (out / results.LAYOUT_KEY).read_text() == body  # left as it was, for its owner to look at


def test_migrate_names_a_marker_with_a_pid_no_process_can_have(tmp_path):
    """`migrate` ended in an OverflowError traceback on a marker of this host with pid 2**31
    (os.kill takes a C int), and on `"pid": 1e999` (int(inf)). The first looks live, as pid 0
    does (exit 2, naming the marker); the second is not a marker probeserve wrote."""
    out = tmp_path / "out"
    marker = out / "running" / "r" / "step=000000000000-00000000" / "fc.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**31}))
    with pytest.raises(Busy, match=f"{marker}: process {2**31} on this machine is probing it"):
        migrate_output(open_storage(str(out)))
    marker.write_text(
        json.dumps({"host": socket.gethostname(), "pid": 0}).replace('"pid": 0', '"pid": 1e999')
    )
    migrate_output(open_storage(str(out)))
    assert (out / results.LAYOUT_KEY).exists()


def test_migrate_refuses_a_folder_that_is_not_an_output(tmp_path):
    """`probeserve migrate` on a data folder (or a mistyped path, or $HOME) wrote layout.json
    into it and said "migrated" (exit 0). It names the folder and writes nothing (exit 2)."""
    data = tmp_path / "images"
    (data / "train" / "cat").mkdir(parents=True)
    (data / "train" / "cat" / "0.png").write_bytes(b"not looked at")
    proc = cli("migrate", str(data), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {data}: not an output of probeserve (nothing under runs/, results/, activations/, "
        "ledger/, running/); give the output.uri of a spec"
    ]
    assert sorted(p.name for p in data.iterdir()) == ["train"]
