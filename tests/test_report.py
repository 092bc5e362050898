"""The HTML report: self-contained, escaped, atomic, readable by a real browser, on local and S3."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from helpers import s3_tiny_spec, tiny_spec, write_checkpoints
from PIL import Image

from probeserve import report, results
from probeserve.cli import main
from probeserve.errors import ProbeserveError
from probeserve.runners.local import run_local
from probeserve.storage import open_storage

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory):
    """12 rows: steps 0 and 10 ok, step 20 failed (truncated weights)."""
    root = tmp_path_factory.mktemp("report")
    spec = tiny_spec(root)
    write_checkpoints(spec, steps=(0, 10, 20))
    with open(os.path.join(spec.checkpoints.uri, "step=000000020", "model.safetensors"), "r+b") as f:
        f.truncate(100)
    summary = run_local(spec)
    assert summary.ok == 8 and len(summary.failed) == 4
    return spec.output.uri


def external_refs(page: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, flags=re.I)


def test_report_is_self_contained_with_spec_failures_progress_and_timings(sweep_out, tmp_path):
    out = str(tmp_path / "report.html")
    assert report.write_report(sweep_out, out) == out
    page = open(out, encoding="utf-8").read()
    assert page.startswith("<!DOCTYPE html>")
    assert not external_refs(page) and "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page
    # three plots and the per-class plot (the rows have per-class errors), embedded
    assert page.count('src="data:image/png;base64,') == 4
    assert 'alt="test error per class by layer, step 10"' in page  # the last step with them
    # the spec that produced the run, as stored
    spec_yaml = open(os.path.join(sweep_out, "runs", "t", "spec.yaml"), encoding="utf-8").read()
    assert "factory: tiny" in spec_yaml and "factory: tiny" in page
    # progress, from probeserve.status
    assert "<b>3</b> checkpoints" in page and "<b>8</b> done" in page and "<b>4</b> failed" in page
    # failures with their text, checkpoints with their keys, timings by device
    assert "Failures (4)" in page and "SHA-256 differs from its marker" in page
    assert "Checkpoints (3)" in page and "step=000000020/model.safetensors" in page
    assert "By device" in page and '<td class="text">cpu</td>' in page
    # the grid and the full rows table
    assert "Test error by layer and step" in page and "All rows (12)" in page
    assert sorted(os.listdir(tmp_path)) == ["report.html"]


def test_report_escapes_strings_from_the_data(sweep_out, tmp_path):
    out_uri = str(tmp_path / "out")
    shutil.copytree(sweep_out, out_uri)
    row = results.load(out_uri).to_pylist()[-1]
    assert row["status"] == "failed"
    row.update(layer="fc2", error='<script>alert("x")</script> & <img src=http://evil/>')
    results.commit(open_storage(out_uri), row)
    page = report.build_report(out_uri)
    assert "<script>" not in page and "<img src=http" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=http://evil/&gt;" in page


def test_report_of_a_run_with_no_finished_item(sweep_out, tmp_path):
    """A sweep that has started but committed nothing: the report still shows spec and progress."""
    out_uri = str(tmp_path / "out")
    shutil.copytree(sweep_out, out_uri)
    shutil.rmtree(os.path.join(out_uri, "results"))
    page = report.build_report(out_uri, run="t")
    assert "<b>12</b> pending" in page and "<b>0</b> done" in page
    assert "No item has finished yet" in page and "factory: tiny" in page
    assert "Checkpoints (3)" in page and "data:image/png" not in page


def test_report_on_the_results_folder_and_rewrite_in_place(sweep_out, tmp_path):
    out = str(tmp_path / "r.html")
    report.write_report(os.path.join(sweep_out, "results"), out, refresh_seconds=30)
    first = open(out, encoding="utf-8").read()
    assert '<meta http-equiv="refresh" content="30">' in first and "All rows (12)" in first
    report.write_report(sweep_out, out)
    assert "http-equiv" not in open(out, encoding="utf-8").read()
    assert sorted(os.listdir(tmp_path)) == ["r.html"]


def test_cli_report_and_its_errors(sweep_out, tmp_path, capsys):
    out = str(tmp_path / "r.html")
    assert main(["report", sweep_out, "--out", out, "--run", "t"]) == 0
    assert capsys.readouterr().out.strip() == out and os.path.getsize(out) > 10_000
    assert main(["report", sweep_out, "--out", out, "--run", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "runs there: t" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--out", str(tmp_path / "e.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no results and no runs") and "Traceback" not in err
    assert not (tmp_path / "e.html").exists()


def test_the_report_finds_runs_where_sweeps_record_them(tmp_path):
    from probeserve.sweep import Sweep

    spec = tiny_spec(tmp_path, run="recorded")
    Sweep(spec).record_spec()  # a run with its spec recorded and no rows yet
    assert report._runs(open_storage(spec.output.uri), results.SCHEMA.empty_table()) == ["recorded"]


def _chromium(tmp_path, url: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(os.listdir(tmp_path))}"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} absent (Debian package 'chromium')")
def test_report_renders_in_a_headless_browser_without_console_errors(sweep_out, tmp_path):
    page = tmp_path / "report.html"
    report.write_report(sweep_out, str(page))
    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1280,2000")
    assert run.returncode == 0, run.stderr[-2000:]
    assert not _console_lines(run.stderr), _console_lines(run.stderr)
    with Image.open(shot) as im:
        im.verify()
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        gray = im.convert("L")
        lo, hi = gray.getextrema()
        assert hi - lo > 100  # text and plots, not a blank page
        # the embedded plots decoded: many distinct colours on the page
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 200
    dom = _chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert dom.returncode == 0 and not _console_lines(dom.stderr)
    assert "Test error by layer and step" in dom.stdout and "<table>" in dom.stdout
    assert dom.stdout.count("data:image/png;base64,") == 4 and "FAILED" in dom.stdout  # 3 + per class
    # the console check can fail: a page with a script error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>notDefined();</script></body></html>")
    caught = _chromium(tmp_path, bad.as_uri(), "--dump-dom")
    assert any("Uncaught" in ln for ln in _console_lines(caught.stderr))


@pytest.mark.integration
def test_plots_and_report_on_s3(s3_server, tmp_path, monkeypatch):
    from probeserve import plots

    monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", s3_server.endpoint)
    bucket = s3_server.new_bucket()
    spec = s3_tiny_spec(tmp_path, bucket)
    write_checkpoints(spec, steps=(0, 10))
    assert run_local(spec).ok == 4
    table = results.load(spec.output.uri)
    assert plots.plot_heatmap(table, f"s3://{bucket}/plots/h.png") == f"s3://{bucket}/plots/h.png"
    assert plots.animate(table, str(tmp_path / "a.gif")).endswith("a.gif")
    assert main(["report", spec.output.uri, "--out", f"s3://{bucket}/report.html"]) == 0
    client = s3_server.client()
    png = client.get_object(Bucket=bucket, Key="plots/h.png")["Body"].read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    page = client.get_object(Bucket=bucket, Key="report.html")["Body"].read().decode()
    assert "<b>4</b> done" in page and "factory: tiny" in page and page.count("data:image/png") == 4
    assert not external_refs(page)
    with pytest.raises(ProbeserveError, match="no such run"):
        report.build_report(spec.output.uri, run="other")


def test_report_of_hostile_names_is_text_never_markup(tmp_path):
    """Layer names full of $, backslashes, braces, tags and quotes: plots draw, the page escapes."""
    from html.parser import HTMLParser

    from test_plots import HOSTILE_NAMES, synthetic_table

    out_uri = str(tmp_path / "out")
    storage = open_storage(out_uri)
    table = synthetic_table(3, len(HOSTILE_NAMES), run="t", layers=HOSTILE_NAMES, failed=frozenset({(1, 7)}))
    for row in table.to_pylist():
        results.commit(storage, row)
    page = report.build_report(out_uri)

    class Collect(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[str] = []
            self.cells: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

        def handle_data(self, data):
            self.cells.append(data)

    parsed = Collect()
    parsed.feed(page)
    assert "script" not in parsed.tags and page.count("data:image/png;base64,") == 3
    for name in HOSTILE_NAMES:
        assert name in parsed.cells, name  # a cell holding exactly the name, as text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_report_run_errors_name_python_arguments_and_the_cli_its_flag(sweep_out, capsys):
    from probeserve.plots import ChoiceError

    with pytest.raises(ChoiceError) as e:
        report.build_report(sweep_out, run="nope")
    assert str(e.value).startswith("run='nope': no such run under ") and "--run" not in str(e.value)
    assert main(["report", sweep_out, "--out", "x.html", "--run", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: --run nope: no such run under ")


def test_report_counts_probes_that_hit_max_epochs(sweep_out, tmp_path):
    out_uri = str(tmp_path / "out")
    shutil.copytree(sweep_out, out_uri)
    row = next(r for r in results.load(out_uri).to_pylist() if r["status"] == "ok")
    row.update(hit_max_epochs=True)
    results.commit(open_storage(out_uri), row)
    page = report.build_report(out_uri)
    assert "1 of 8 probes hit probe.max_epochs before early stopping or converging" in page
    assert '<th class="">hit_max_epochs</th>' in page
