"""Exit status is the truth, every time: commands run back to back, each in a new process.

A command used to exit 134 (`terminate called without an active exception`) now and then
after a correct run: a pyarrow thread freed a Python object while the interpreter was
shutting down (see `results.arrow_owned`). It showed in up to 1 run in 5, so each command
runs many times here, on one tiny finished output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import tiny_spec, write_checkpoints

from probeserve.runners.local import run_local

pytestmark = pytest.mark.integration

TIMES = 30


def test_commands_exit_with_their_real_status_every_time(tmp_path):
    spec = tiny_spec(
        tmp_path,
        layers={"include": ["input", "fc2"]},
        data={"kind": "gaussian", "dim": 6, "train_size": 100, "val_size": 50, "test_size": 50},
        resources={"device": "cpu", "torch_threads": 1},
    )
    write_checkpoints(spec, steps=(0, 10))
    assert run_local(spec).exit_code == 0  # a finished output
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    commands = {
        "run": ["run", str(path), "--runner", "local"],
        "status": ["status", spec.output.uri],
        "query": ["query", spec.output.uri],
        "plan": ["plan", str(path)],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(name: str) -> tuple[str, int, str]:
        proc = subprocess.run(
            [sys.executable, "-m", "probeserve", *commands[name]],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        return name, proc.returncode, proc.stderr[-500:]

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(one, [name for name in commands for _ in range(TIMES)]))
    wrong = [r for r in runs if r[1] != 0]
    assert not wrong, f"{len(wrong)} of {len(runs)} exited non-zero: {wrong[:3]}"
