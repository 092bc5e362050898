"""The platform engineer's path, played hostile: the review of main at 3535ebd (S3, Ray, watch).

Each test is something that went wrong when probeserve ran against a real S3 server, a Ray
head and a scheduler that stops commands the way schedulers do, and checks the fixed answer.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

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
