"""A Ray head of its own, started with `ray start --head`, for tests of the job API."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BINDIR = os.path.dirname(sys.executable)
RAY_CLI = os.path.join(BINDIR, "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Head:
    address: str  # the dashboard and job API, http://127.0.0.1:PORT
    env: dict[str, str]  # what a client needs: token auth on, the ray CLI on PATH
    log: Path


@contextlib.contextmanager
def ray_head(log_dir: Path, *, num_cpus: int = 2, env: dict[str, str] | None = None) -> Iterator[Head]:
    """Starts a head with its own ports and stops only it.

    `--block` keeps `ray start` in the foreground, so stopping its process group stops this
    head only; `ray stop` would stop every Ray on the machine, other tests' included. Other
    Rays on the machine hold the default agent ports, so every port is a free one.
    """
    env = {
        **os.environ,
        **(env or {}),
        "RAY_AUTH_MODE": "token",
        "PATH": BINDIR + os.pathsep + os.environ["PATH"],
    }
    port = free_port()
    short_tmp = tempfile.mkdtemp(prefix="pray-", dir="/tmp")  # Ray's socket paths stay under 108 bytes
    log = Path(log_dir) / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                RAY_CLI,
                "start",
                "--head",
                "--block",
                f"--num-cpus={num_cpus}",
                f"--dashboard-port={port}",
                "--dashboard-host=127.0.0.1",
                "--port=0",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--temp-dir={short_tmp}",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        address = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # answering, if only to say that a token is needed
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ray head did not start:\n" + log.read_text()[-3000:]) from None
                time.sleep(1)
        yield Head(address=address, env=env, log=log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(short_tmp, ignore_errors=True)
