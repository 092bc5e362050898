"""The platform engineer's path, played hostile: the review of main at 3535ebd (S3, Ray, watch).

Each test is something that went wrong when probeserve ran against a real S3 server, a Ray
head and a scheduler that stops commands the way schedulers do, and checks the fixed answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import s3_tiny_spec, tiny_spec, write_checkpoints, write_spec

from probeserve import results
from probeserve.cli import main

# A `probeserve run --runner local` whose second probe call announces itself and then hangs,
# so that a signal arrives while an item is being probed (its running marker exists).
_HANGING_RUN = textwrap.dedent(
    """
    import pathlib, sys, time
    import probeserve.probe
    from probeserve.cli import main

    real, calls = probeserve.probe.answer_probes, []

    def hang_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            pathlib.Path(sys.argv[1]).write_text("")
            time.sleep(120)
        return real(*args, **kwargs)

    probeserve.probe.answer_probes = hang_on_second
    sys.exit(main(["run", sys.argv[2], "--runner", "local"]))
    """
)


def test_sigterm_while_probing_leaves_no_running_marker(tmp_path, capsys):
    # `kill PID` (systemd, Kubernetes, Slurm and cron stop a command with SIGTERM) ended
    # `probeserve run` at once: Python's default for SIGTERM runs no `finally`, so the item
    # being probed kept its running/ marker, and `status` on any other host showed it as
    # running for two minutes. Ctrl-C removed it; SIGTERM now does the same, and exits 143.
    spec = tiny_spec(tmp_path, resources={"device": "cpu", "probes_per_call": 1})
    write_checkpoints(spec, steps=(0,))
    flag = tmp_path / "probing"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANGING_RUN, str(flag), write_spec(tmp_path, spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not flag.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    running = [p for p in (tmp_path / "out" / "running").rglob("*") if p.is_file()]
    assert len(running) == 1  # the item being probed when the signal comes
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert [p for p in (tmp_path / "out" / "running").rglob("*") if p.is_file()] == []
    assert len(results.load(str(tmp_path / "out"))) == 1  # the first call's item is kept
    assert main(["status", str(tmp_path / "out")]) == 0
    assert "stale" not in capsys.readouterr().out


def test_main_puts_the_sigterm_handler_back():
    # main() runs in tests and in other programs: its SIGTERM handler is its own business
    before = signal.getsignal(signal.SIGTERM)
    assert main(["query", "/nonexistent-probeserve-output"]) == 2
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.integration
def test_s3_commands_do_not_log_botocore_credentials_chatter(s3_server, s3_bucket, tmp_path, monkeypatch):
    # every command on S3 printed "HH:MM:SS INFO Found credentials in environment variables."
    # (botocore's own INFO line) to stderr, once per client it made: up to five per query
    monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", s3_server.endpoint)
    spec = s3_tiny_spec(tmp_path, s3_bucket)
    write_checkpoints(spec, steps=(0,))
    done = subprocess.run(
        [sys.executable, "-m", "probeserve", "plan", write_spec(tmp_path, spec)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "pending" in done.stdout
    assert "Found credentials" not in done.stderr


@pytest.fixture
def s3_output(s3_server, s3_bucket, tmp_path, monkeypatch):
    """A finished output at s3://{bucket}/probes/a (two rows), its checkpoints at .../ckpts."""
    from probeserve.runners.local import run_local

    monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", s3_server.endpoint)
    spec = s3_tiny_spec(tmp_path, s3_bucket, output={"uri": f"s3://{s3_bucket}/probes/a"})
    write_checkpoints(spec, steps=(0,))
    assert run_local(spec).exit_code == 0
    return f"s3://{s3_bucket}"


@pytest.mark.integration
@pytest.mark.parametrize(
    "command",
    [
        ["query", "{uri}"],
        ["status", "{uri}"],
        ["plot", "{uri}", "--out", "{tmp}/fig.png"],
        ["report", "{uri}", "--out", "{tmp}/report.html"],
    ],
)
@pytest.mark.parametrize(
    "where, says",
    [
        ("probes", "not a probeserve output, but outputs are below it: s3://{bucket}/probes/a; give one"),
        ("probes/a/results/t", "is inside the output s3://{bucket}/probes/a; give s3://{bucket}/probes/a"),
        ("probes/a/runs", "is inside the output s3://{bucket}/probes/a"),
        ("probes/b", "s3://{bucket}/probes/b: no such output (no object under this prefix)"),
    ],
)
def test_a_wrong_s3_prefix_is_named_with_exit_2(s3_output, tmp_path, capsys, command, where, says):
    # on a local folder these were refused (exit 2) this session, but on S3 `query` printed an
    # empty table with "no results yet" and `status` "no runs under ...", both exit 0, for a
    # prefix beside the output, inside it, or one that holds nothing (a typo): as if the
    # sweep had not started. Checked in a bounded number of requests, only when no row is found.
    uri = f"{s3_output}/{where}"
    argv = [a.format(uri=uri, tmp=tmp_path) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert says.format(bucket=s3_output[len("s3://") :]) in err
    assert not (tmp_path / "fig.png").exists() and not (tmp_path / "report.html").exists()


@pytest.mark.integration
def test_the_s3_output_itself_still_answers(s3_output, capsys):
    assert main(["query", f"{s3_output}/probes/a", "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # header and two rows
    assert main(["status", f"{s3_output}/probes/a/results"]) == 0


@pytest.mark.integration
def test_an_s3_output_a_run_has_begun_has_no_results_yet(s3_output, capsys):
    # what a run writes first (layout.json) makes a prefix an output: no rows there is news
    # about the sweep ("no results yet", exit 0), not a mistake
    from probeserve.storage import open_storage

    results.check_layout(open_storage(f"{s3_output}/probes/c"))
    assert main(["query", f"{s3_output}/probes/c"]) == 0
    assert "no results yet" in capsys.readouterr().err


@pytest.mark.integration
def test_the_training_job_names_a_bucket_that_does_not_exist(s3_server, tmp_path):
    # README step 4 with `--out s3://...` (its help says a path or s3://bucket/prefix) ended
    # in a traceback when the bucket did not exist; now one line naming it, exit 2
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PROBESERVE_S3_ENDPOINT": s3_server.endpoint}
    done = subprocess.run(
        [
            sys.executable,
            str(repo / "jobs" / "train_mlp.py"),
            "--out",
            "s3://no-such-bucket-x/c",
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: s3://no-such-bucket-x/c/step=000000000/model.safetensors: bucket 'no-such-bucket-x' does not exist"
    ]


@pytest.mark.integration
@pytest.mark.parametrize("field", ["checkpoints.uri", "output.uri"])
def test_validate_names_a_bucket_that_does_not_exist(
    s3_server, s3_bucket, tmp_path, capsys, monkeypatch, field
):
    # `probeserve validate` said the spec was fine (exit 0) with either URI in a bucket that
    # does not exist: a key in a missing bucket reads as absent, which looks like a new output
    monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", s3_server.endpoint)
    spec = s3_tiny_spec(tmp_path, s3_bucket)
    path = write_spec(tmp_path, spec)
    assert main(["validate", path]) == 0
    capsys.readouterr()
    assert main(["validate", path, "--set", f"{field}=s3://no-such-bucket-v/p"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {path}: {field}: bucket 'no-such-bucket-v' does not exist (s3://no-such-bucket-v/p)"
    ]


@pytest.mark.integration
def test_a_daemon_whose_checkpoint_bucket_does_not_exist_fails_its_scan(
    s3_server, s3_bucket, tmp_path, monkeypatch
):
    # `probeserve watch` on checkpoints.uri in a bucket that does not exist logged "does not
    # exist yet; waiting for the first checkpoint" and `--once` exited 0, scan after scan: a
    # training job cannot create the bucket, so it waited for ever on a typo. Its own comment
    # said "a missing bucket is still an error"; now the scan fails naming it (--once: exit 1)
    monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", s3_server.endpoint)
    spec = s3_tiny_spec(tmp_path, s3_bucket, checkpoints={"uri": "s3://no-such-bucket-w/ckpts"})
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "probeserve",
            "watch",
            write_spec(tmp_path, spec),
            "--runner",
            "local",
            "--once",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert "scan failed: checkpoints.uri: bucket 'no-such-bucket-w' does not exist" in done.stderr
    assert "waiting for the first checkpoint" not in done.stderr


@pytest.mark.integration
def test_starting_ray_keeps_the_commands_sigterm_handler():
    # `probeserve run` on Ray, stopped with SIGTERM (`kill`, `ray job stop` of a job running
    # it), printed Ray's native "*** SIGTERM received ... PC: @ ..." stack dump and exited 15:
    # ray.init had replaced the handler that makes SIGTERM end the command like Ctrl-C
    code = textwrap.dedent(
        """
        import signal
        import ray
        from probeserve.runners.ray import connect

        def ours(signum, frame):
            pass

        signal.signal(signal.SIGTERM, ours)
        connect(None)
        try:
            print("kept" if signal.getsignal(signal.SIGTERM) is ours else "replaced")
        finally:
            ray.shutdown()
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "kept"


def test_an_s3_endpoint_from_the_environment_is_named_as_such(tmp_path, capsys, monkeypatch):
    # PROBESERVE_S3_ENDPOINT=127.0.0.1:9000 (no http://) said only "S3 endpoint
    # '127.0.0.1:9000': expected a URL like ...": no spec field or flag of the command held it
    monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", "127.0.0.1:9000")
    assert main(["status", "s3://some-bucket/probes"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PROBESERVE_S3_ENDPOINT: S3 endpoint '127.0.0.1:9000': expected a URL"), err
    assert main(["status", "s3://some-bucket/probes", "--s3-endpoint", "127.0.0.1:9001"]) == 2
    assert capsys.readouterr().err.startswith("error: S3 endpoint '127.0.0.1:9001'")
