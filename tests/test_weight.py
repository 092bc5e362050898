"""What the light commands load: `status`, `query`, `plot`, `report`, `watch --status` and a
watch daemon that submits Ray jobs never import torch (nor ray): the daemon runs for weeks in
a pod with a memory limit, and the others run on any laptop that can read the bucket.

Each command runs in a fresh Python, which reports the modules it ended up with.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import tiny_spec, write_checkpoints, write_spec

from probeserve.runners.local import run_local

HEAVY = ("torch", "ray", "torchvision")

COMMAND = """
import json, sys
from probeserve.cli import main
code = main(sys.argv[2:])
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[1])))
print("\\nMODULES " + json.dumps({"code": code, "heavy": heavy}))
"""

DAEMON = """
import json, sys
from probeserve.spec import load_spec
from probeserve.watch import RayJobSubmitter, Watcher

class JobAPI:  # the two calls the daemon makes of Ray's job client; the jobs never run
    def __init__(self):
        self.jobs = {}

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        self.jobs[submission_id] = entrypoint
        return submission_id

    def get_job_info(self, sid):
        if sid not in self.jobs:
            raise RuntimeError(f"Job {sid} does not exist.")

        class Info:
            status, message = "RUNNING", None

        return Info()

watcher = Watcher(load_spec(sys.argv[2]), RayJobSubmitter("http://127.0.0.1:8265", client=JobAPI()))
submitted = [watcher.scan().submitted for _ in range(3)]
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[1])))
print("\\nMODULES " + json.dumps({"submitted": submitted, "heavy": heavy}))
"""


def run_python(code: str, *args: str, cwd) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(HEAVY), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.rsplit("\nMODULES ", 1)[1])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny sweep: two checkpoints, two layers, its spec file beside it."""
    root = tmp_path_factory.mktemp("finished")
    spec = tiny_spec(root, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0, 10))
    assert run_local(spec).ok == 4
    return root, spec, write_spec(root, spec)


@pytest.mark.parametrize(
    "args",
    [
        ["status", "out"],
        ["query", "out", "--format", "csv"],
        ["plot", "out", "--out", "errors.png"],
        ["report", "out", "--out", "report.html"],
        ["watch", "spec.json", "--status"],
    ],
    ids=lambda args: " ".join(args[:2] if args[0] == "watch" else args[:1]),
)
def test_a_command_that_reads_results_loads_no_torch(finished, args):
    root, _, _ = finished
    seen = run_python(COMMAND, *args, cwd=root)
    assert seen == {"code": 0, "heavy": []}


def test_status_shows_no_torch_in_importtime(finished):
    root, _, _ = finished
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "probeserve", "status", "out"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = [
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    ]
    assert "probeserve.status" in imported  # the listing is what it claims to be
    assert [m for m in imported if m.split(".")[0] in HEAVY] == []


def test_a_daemon_that_submits_jobs_loads_no_torch_and_still_records_its_spec(tmp_path):
    spec = tiny_spec(tmp_path, run="d", layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0, 10))
    seen = run_python(DAEMON, write_spec(tmp_path, spec), cwd=tmp_path)
    assert seen["heavy"] == []
    assert seen["submitted"] == [
        ["step=000000000/model.safetensors", "step=000000010/model.safetensors"],
        [],
        [],
    ]
    # the spec was resolved (model built, layers matched) in a child process, and recorded
    recorded = json.loads((tmp_path / "out" / "runs" / "d" / "layers.json").read_text())
    assert [x["layer"] for x in recorded] == ["input", "fc2"]
    assert json.loads((tmp_path / "out" / "runs" / "d" / "spec.json").read_text())["spec"]["run"] == "d"


def test_a_daemon_whose_spec_cannot_work_stops_with_the_childs_error(tmp_path):
    # resolved in a child process, the error is raised in the daemon as itself: exit 2, one line
    spec = tiny_spec(tmp_path, layers={"include": ["no_such_layer"]})
    write_checkpoints(spec, steps=(0,))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "probeserve",
            "watch",
            write_spec(tmp_path, spec),
            "--address",
            "http://127.0.0.1:1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no_such_layer" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "ledger").exists()  # nothing claimed
