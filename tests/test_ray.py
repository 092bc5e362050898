"""The Ray runner against a real local Ray: same answers, faults, resources, Ray jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from probeserve import results
from probeserve.runners.local import run_local
from probeserve.storage import is_temp_name, open_storage
from probeserve.sweep import RUNNING_DIR

sys.path.insert(0, os.path.dirname(__file__))
from rayhead import RAY_CLI, ray_head
from test_sweep import tiny_spec, write_checkpoints

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def wait_cpus_free(total: float = 2.0, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0.0) >= total:
            return
        time.sleep(0.5)
    raise AssertionError(f"CPUs still held: {ray.available_resources()}")


def slow_spec(tmp_path, **over):
    """Probes that take seconds, so that something can be killed while they train."""
    fields = {
        "model": {"factory": "tiny", "kwargs": {"input_dim": 64, "hidden": 64, "num_classes": 2}},
        "data": {"kind": "gaussian", "dim": 64, "train_size": 20000, "val_size": 2000, "test_size": 2000},
        # minibatch Adam for a fixed number of epochs: about 2 s a probe on 2 cores, however
        # quickly L-BFGS would have converged on this data
        "probe": {"solver": "adam", "batch_size": 32, "max_epochs": 40, "patience": None, "tolerance": 1e-12},
        "layers": {"include": ["input", "fc1"]},
    }
    return tiny_spec(tmp_path, **{**fields, **over})


def rows_by_item(uri):
    return {(r["checkpoint"], r["layer"]): r for r in results.load(uri).to_pylist()}


def test_ray_gives_the_same_answers_as_in_process(cluster, tmp_path):
    from probeserve.runners.ray import run_ray

    spec = tiny_spec(tmp_path)
    write_checkpoints(spec)
    summary = run_ray(spec)
    assert summary.ok == 8 and not summary.failed
    local = tiny_spec(tmp_path, output={"uri": str(tmp_path / "local")})
    run_local(local)
    a, b = rows_by_item(spec.output.uri), rows_by_item(local.output.uri)
    assert a.keys() == b.keys() and len(a) == 8
    for key in a:
        for col in results.METRICS:
            assert a[key][col] == pytest.approx(b[key][col], abs=1e-6), (key, col)
    again = run_ray(spec)
    assert again.ok == 0 and again.skipped_done == 8
    wait_cpus_free()


def test_killed_probe_actor_is_restarted_and_each_item_commits_once(cluster, tmp_path):
    from probeserve.runners.ray import run_ray

    spec = slow_spec(tmp_path)
    write_checkpoints(spec)
    out = open_storage(spec.output.uri)
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for obj in out.list(RUNNING_DIR + "/"):
                try:
                    info = json.loads(out.read_bytes(obj.key))
                except Exception:
                    continue
                time.sleep(1.0)  # let it get into training
                try:
                    os.kill(info["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(obj.key)
                return
            time.sleep(0.2)

    t = threading.Thread(target=killer)
    t.start()
    summary = run_ray(spec)
    t.join()
    assert killed, "no probe actor was caught running"
    assert summary.ok == 4 and not summary.failed
    rows = results.load(spec.output.uri).to_pylist()
    assert len(rows) == 4 and len({(r["checkpoint"], r["layer"]) for r in rows}) == 4
    assert all(r["status"] == "ok" for r in rows)
    names = [p.name for p in (tmp_path / "out" / "results").rglob("*") if p.is_file()]
    assert all(n.endswith(".parquet") or is_temp_name(n) for n in names), "a partial file is visible"
    assert [o.key for o in out.list(RUNNING_DIR + "/")] == []
    wait_cpus_free()


def test_killed_driver_loses_nothing_and_rerun_does_only_missing(cluster, tmp_path):
    from probeserve.runners.ray import run_ray

    spec = slow_spec(tmp_path, layers={"include": ["input", "fc1", "act", "fc2"]})
    write_checkpoints(spec)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    driver = subprocess.Popen(
        [sys.executable, "-m", "probeserve", "run", str(path), "--address", cluster],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out = open_storage(spec.output.uri)
    deadline = time.time() + 180
    while time.time() < deadline and len(results.result_keys(out, spec.run)) < 2:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    committed = len(results.result_keys(out, spec.run))
    assert 2 <= committed < 8
    wait_cpus_free()  # Ray tore down the dead driver's actors and tasks
    summary = run_ray(spec)
    assert summary.skipped_done >= committed - 1  # at most the item in flight was re-committed
    assert summary.ok + summary.skipped_done == 8 and not summary.failed
    assert len(results.result_keys(out, spec.run)) == 8
    wait_cpus_free()


def test_a_driver_finishes_while_another_holds_part_of_the_cluster(cluster, tmp_path):
    # the watch daemon submits a job per checkpoint, so several drivers share a cluster and
    # each sizes its actors from the cluster's total. Here another driver's probe actor holds
    # one of the 2 CPUs. This driver's own actor takes the last CPU before its extraction
    # starts; unless the driver gives that idle actor back, it waits forever for an
    # extraction that no node can take any more.
    @ray.remote(num_cpus=1)
    class OtherDriversActor:
        def ping(self) -> int:
            return 1

    other = OtherDriversActor.remote()
    ray.get(other.ping.remote())
    spec = tiny_spec(tmp_path, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0, 10))
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    try:
        driver = subprocess.run(
            [sys.executable, "-m", "probeserve", "run", str(path), "--address", cluster],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        ray.kill(other)
    assert driver.returncode == 0, driver.stderr[-3000:]
    rows = results.load(spec.output.uri).to_pylist()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    wait_cpus_free()


def test_corrupt_checkpoint_ends_failed_while_the_rest_complete(cluster, tmp_path):
    from probeserve.runners.ray import run_ray

    spec = tiny_spec(tmp_path)
    write_checkpoints(spec)
    with open(os.path.join(spec.checkpoints.uri, "step=000000000", "model.safetensors"), "r+b") as f:
        f.truncate(64)
    summary = run_ray(spec)
    assert summary.ok == 4 and len(summary.failed) == 4
    rows = results.load(spec.output.uri).to_pylist()
    assert {r["step"] for r in rows if r["status"] == "failed"} == {0}
    assert all("step=000000000/model.safetensors" in r["error"] for r in rows if r["status"] == "failed")
    wait_cpus_free()


def test_unreachable_address_is_one_clear_line(tmp_path):
    spec = tiny_spec(tmp_path)
    write_checkpoints(spec, steps=(0,))
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    proc = subprocess.run(
        [sys.executable, "-m", "probeserve", "run", str(path), "--address", "127.0.0.1:1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2
    assert "cannot connect to a Ray cluster" in proc.stderr and "127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr


GPU_CHECK = """
import json, sys, ray
from probeserve.spec import spec_from_dict
from probeserve.runners.ray import connect, plan_resources
from probeserve.errors import ProbeserveError
ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, logging_level="ERROR")
spec = spec_from_dict(json.loads(sys.argv[1]))
try:
    plan_resources(spec)
except ProbeserveError as e:
    print(e)
"""


def test_more_gpus_per_actor_than_any_node_is_refused_before_running(tmp_path):
    spec = tiny_spec(tmp_path, resources={"num_gpus_per_probe": 2})
    proc = subprocess.run(
        [sys.executable, "-c", GPU_CHECK, json.dumps(spec.model_dump(mode="json"))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert "resources.num_gpus_per_probe: 2.0 GPUs asked, but the largest node has 1" in proc.stdout, (
        proc.stderr
    )


def test_entrypoint_with_missing_spec_file():
    proc = subprocess.run(
        [sys.executable, "jobs/sweep.py", "no/such/spec.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "spec file not found: no/such/spec.yaml" in proc.stderr


@pytest.mark.skipif(not os.path.exists(RAY_CLI), reason="ray CLI not installed beside this python")
def test_ray_job_submit_against_a_head_started_with_ray_start(tmp_path):
    spec = tiny_spec(tmp_path, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0,))
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    with ray_head(tmp_path) as head:
        submit = [RAY_CLI, "job", "submit", f"--address={head.address}", "--working-dir", REPO, "--"]
        for _attempt in range(60):  # the head's job agent starts a while after its dashboard
            job = subprocess.run(
                [*submit, "python", "jobs/sweep.py", str(path)],
                env=head.env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=400,
            )
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
    rows = results.load(spec.output.uri).to_pylist()
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
