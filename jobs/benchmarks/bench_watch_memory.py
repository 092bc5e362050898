"""Resident memory of an idle watch daemon that submits Ray jobs, over a few scans.

A daemon runs for weeks in a pod with a memory limit (deploy/watch/deployment.yaml), so what
it holds matters. This makes a local output with a few checkpoints of the `tiny` model, starts
a daemon in a fresh Python with the Ray job API replaced by an in-memory fake (the daemon
claims and submits every checkpoint, then follows jobs that stay RUNNING: idle scans), and
prints its resident memory (VmRSS) after each scan, its peak (VmHWM), whether torch and ray are
loaded in it, and the peak of any child process it started (where a daemon that loads no
torch resolves its spec). A daemon talking to a real cluster also imports Ray's job client,
`ray.job_submission`; the last line is what that import alone holds in a fresh Python.

    python jobs/benchmarks/bench_watch_memory.py [--scans 5] [--code DIR]

`--code DIR` runs the daemon with the probeserve package found in DIR instead (an older
version, to compare):

    mkdir -p /tmp/before && git archive 46a9699 probeserve | tar -x -C /tmp/before
    python jobs/benchmarks/bench_watch_memory.py --code /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

DAEMON = """
import json, resource, sys

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0

import probeserve
from probeserve.spec import load_spec
from probeserve.watch import RayJobSubmitter, Watcher

class JobAPI:  # the two calls the daemon makes of Ray's job client
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

api = JobAPI()
watcher = Watcher(load_spec(sys.argv[1]), RayJobSubmitter("http://127.0.0.1:8265", client=api))
rss = []
for _ in range(int(sys.argv[2])):
    watcher.scan()
    rss.append(status("VmRSS"))
print(json.dumps({
    "package": probeserve.__file__,
    "rss": rss,
    "peak": status("VmHWM"),
    "children_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    "torch": "torch" in sys.modules,
    "ray": "ray" in sys.modules,
    "jobs": len(api.jobs),
}))
"""

JOB_CLIENT = """
import json
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
before = rss()
import ray.job_submission
print(json.dumps({"before": before, "after": rss()}))
"""


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=5)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--code", help="a folder holding the probeserve package to run instead")
    args = parser.parse_args()

    from probeserve.checkpoints import save_checkpoint
    from probeserve.models import build_model
    from probeserve.spec import ModelSpec

    env = dict(os.environ)
    if args.code:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(args.code), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="probeserve-bench-watch-") as root:
        spec = {
            "run": "bench",
            "checkpoints": {"uri": os.path.join(root, "ckpts")},
            "model": {"factory": "tiny", "kwargs": {"input_dim": 6, "hidden": 12, "num_classes": 2}},
            "layers": {"include": ["input", "fc1", "act", "fc2"]},
            "data": {"kind": "gaussian", "dim": 6, "train_size": 600, "val_size": 200, "test_size": 200},
            "resources": {"device": "cpu"},
            "output": {"uri": os.path.join(root, "out")},
        }
        model = build_model(ModelSpec(**spec["model"]))
        for step in range(args.checkpoints):
            save_checkpoint(model, spec["checkpoints"]["uri"], step * 100)
        path = os.path.join(root, "spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        proc = subprocess.run(
            [sys.executable, "-c", DAEMON, path, str(args.scans)],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            sys.exit(f"the daemon failed:\n{proc.stderr[-3000:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"probeserve package: {os.path.dirname(got['package'])}")
    print(f"daemon: {args.checkpoints} checkpoint(s) submitted ({got['jobs']} jobs), then idle scans")
    print("RSS after each scan: " + ", ".join(mib(r) for r in got["rss"]))
    print(
        f"peak RSS of the daemon: {mib(got['peak'])}; torch loaded: {got['torch']}; ray loaded: {got['ray']}"
    )
    print(
        f"peak RSS of its child processes: {mib(got['children_peak']) if got['children_peak'] else 'none started'}"
    )
    client = subprocess.run(
        [sys.executable, "-c", JOB_CLIENT], env=env, capture_output=True, text=True, check=False
    )
    if client.returncode == 0:
        c = json.loads(client.stdout.strip().splitlines()[-1])
        print(
            f"importing ray.job_submission (the real job client) in a fresh Python: +{mib(c['after'] - c['before'])}"
        )
    else:
        print("ray.job_submission does not import here: " + client.stderr.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
