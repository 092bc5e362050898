"""`probeserve query` as a user runs it: exports carry every column, nested columns in CSV,
and `--out` that names a bad place. Every test runs the command line in a subprocess and
reads what it wrote with pandas, pyarrow and DuckDB."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch

from probeserve import results
from probeserve.checkpoints import save_checkpoint
from probeserve.models import build_model
from probeserve.runners.local import run_local
from probeserve.spec import spec_from_dict


def probeserve(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "probeserve", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> str:
    """A finished sweep: one checkpoint, two layers, two rows."""
    root = tmp_path_factory.mktemp("query")
    spec = spec_from_dict(
        {
            "run": "q",
            "checkpoints": {"uri": str(root / "ckpts")},
            "model": {"factory": "tiny", "kwargs": {"input_dim": 6}},
            "layers": {"include": ["input", "fc2"]},
            "data": {"kind": "gaussian", "dim": 6, "train_size": 200, "val_size": 100, "test_size": 100},
            "probe": {"max_epochs": 20},
            "resources": {"device": "cpu"},
            "output": {"uri": str(root / "out")},
        }
    )
    torch.manual_seed(0)
    save_checkpoint(build_model(spec.model), spec.checkpoints.uri, 0)
    assert run_local(spec).exit_code == 0
    return spec.output.uri


NESTED_SQL = (
    "SELECT layer, [n_train, n_val, n_test] AS sizes, {'error': test_error, 'layer': layer} AS info, "
    "MAP {'epochs': epochs} AS m FROM results ORDER BY layer_index"
)


def test_csv_holds_lists_structs_and_maps_as_json_text(output, tmp_path):
    done = probeserve("query", output, "--sql", NESTED_SQL, "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    for frame in (
        pd.read_csv(io.StringIO(done.stdout)),
        pcsv.read_csv(pa.BufferReader(done.stdout.encode())).to_pandas(),
    ):
        assert list(frame.columns) == ["layer", "sizes", "info", "m"]
        assert [json.loads(s) for s in frame["sizes"]] == [[200, 100, 100]] * 2
        info = [json.loads(s) for s in frame["info"]]
        assert [i["layer"] for i in info] == ["input", "fc2"] and all(0 <= i["error"] <= 1 for i in info)
        assert all(json.loads(m).keys() == {"epochs"} for m in frame["m"])
    out = tmp_path / "nested.csv"
    assert (
        probeserve("query", output, "--sql", NESTED_SQL, "--format", "csv", "--out", str(out)).returncode == 0
    )
    sizes = duckdb.sql(f"SELECT sizes FROM read_csv('{out}') ORDER BY layer DESC").fetchall()
    assert [json.loads(s) for (s,) in sizes] == [[200, 100, 100]] * 2


def test_the_terminal_table_shows_nested_values_as_json(output):
    done = probeserve("query", output, "--sql", NESTED_SQL)
    assert done.returncode == 0, done.stderr
    assert '{"error": ' in done.stdout and "[200, 100, 100]" in done.stdout and '{"epochs": ' in done.stdout


def test_parquet_and_json_keep_lists_as_lists(output, tmp_path):
    out = tmp_path / "nested.parquet"
    done = probeserve("query", output, "--sql", NESTED_SQL, "--format", "parquet", "--out", str(out))
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out)
    assert pa.types.is_list(table.schema.field("sizes").type)
    assert table.column("sizes").to_pylist() == [[200, 100, 100]] * 2
    assert pd.read_parquet(out)["info"].iloc[0]["layer"] == "input"
    assert duckdb.sql(f"SELECT sizes[1] FROM read_parquet('{out}')").fetchall() == [(200,), (200,)]
    done = probeserve("query", output, "--sql", NESTED_SQL, "--format", "json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows[0]["sizes"] == [200, 100, 100] and rows[0]["m"] == {"epochs": rows[0]["m"]["epochs"]}


def test_values_no_format_holds_as_they_are_become_text_or_null(output, tmp_path):
    sql = "SELECT INTERVAL 1 DAY AS i, union_value(k := 1) AS u, 'nan'::DOUBLE AS d, '\\xAA'::BLOB AS b"
    out = tmp_path / "odd.parquet"
    done = probeserve("query", output, "--sql", sql, "--format", "parquet", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert pq.read_table(out).schema.field("i").type == pa.string()
    done = probeserve("query", output, "--sql", sql, "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert pd.read_csv(io.StringIO(done.stdout))["b"].tolist() == ["aa"]
    done = probeserve("query", output, "--sql", sql, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert "NaN" not in done.stdout and json.loads(done.stdout)[0]["d"] is None  # strict JSON


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_exports_carry_every_column(output, tmp_path, fmt):
    out = tmp_path / f"all.{fmt}"
    done = probeserve("query", output, "--format", fmt, "--out", str(out))
    assert done.returncode == 0, done.stderr
    if fmt == "parquet":
        readers = [pq.read_table(out).column_names, list(pd.read_parquet(out).columns)]
        readers.append([c[0] for c in duckdb.sql(f"SELECT * FROM read_parquet('{out}')").description])
    elif fmt == "csv":
        readers = [list(pd.read_csv(out).columns), pcsv.read_csv(out).column_names]
        readers.append([c[0] for c in duckdb.sql(f"SELECT * FROM read_csv('{out}')").description])
    else:
        readers = [list(json.loads(out.read_text())[0]), list(pd.read_json(out).columns)]
    for columns in readers:
        assert columns == results.COLUMN_NAMES
    if fmt != "parquet":  # to stdout as well
        done = probeserve("query", output, "--format", fmt)
        assert done.returncode == 0, done.stderr
        first = done.stdout.splitlines()[0] if fmt == "csv" else json.dumps(list(json.loads(done.stdout)[0]))
        assert all(name in first for name in results.COLUMN_NAMES)


def test_the_terminal_table_keeps_the_short_selection(output):
    done = probeserve("query", output)
    assert done.returncode == 0, done.stderr
    header = done.stdout.splitlines()[0].split()
    assert header[:4] == ["run", "step", "layer", "layer_index"] and "spec_hash" not in header


def test_out_with_an_s3_uri_without_a_bucket_names_out(output):
    done = probeserve("query", output, "--format", "csv", "--out", "s3:///x.csv")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --out 's3:///x.csv': an s3:// URI needs a bucket; give a file path, "
        "file:///path/answer.csv or s3://bucket/path/answer.csv"
    ]


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("", "--out '': empty"),
        ("s3://bucket", "--out 's3://bucket': names no object"),
        ("ftp://host/x.csv", "--out 'ftp://host/x.csv': unsupported scheme 'ftp://'"),
        ("{tmp}/", "is a folder; give a file name, like"),
        ("{tmp}", "is a folder; give a file name, like"),
        ("{output}/results/answer.parquet", "where every file is read as a result row"),
    ],
)
def test_out_goes_only_where_it_says(output, tmp_path, capsys, out, message):
    from probeserve.cli import main

    before = sorted(os.listdir(tmp_path))
    out = out.format(tmp=tmp_path, output=output)
    assert main(["query", output, "--format", "parquet", "--out", out]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before
    assert not os.path.exists(os.path.join(output, "results", "answer.parquet"))


def test_out_writes_one_file_and_nothing_beside_it(output, tmp_path):
    out = tmp_path / "sub" / "answer.csv"
    done = probeserve("query", output, "--format", "csv", "--out", f"file://{out}")
    assert done.returncode == 0, done.stderr
    assert os.listdir(tmp_path / "sub") == ["answer.csv"]
    assert len(pd.read_csv(out)) == 2


@pytest.mark.integration
def test_out_to_s3_writes_one_object(output, s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    env = {**os.environ, "PROBESERVE_S3_ENDPOINT": s3_server.endpoint}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "probeserve",
            "query",
            output,
            "--format",
            "csv",
            "--out",
            f"s3://{bucket}/a/b.csv",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    listed = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["a/b.csv"]
    body = s3_server.client().get_object(Bucket=bucket, Key="a/b.csv")["Body"].read()
    assert list(pd.read_csv(io.BytesIO(body)).columns) == results.COLUMN_NAMES
