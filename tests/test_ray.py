"""The Ray runner against a real local Ray: same answers, faults, resources, Ray jobs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from probeserve import results
from probeserve.runners.local import run_local
from probeserve.storage import is_temp_name, open_storage
from probeserve.sweep import RUNNING_DIR

sys.path.insert(0, os.path.dirname(__file__))
from helpers import PROBESERVE, acme_folder, tiny_spec, write_checkpoints
from rayhead import RAY_CLI, free_port, ray_head

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


def test_ray_trains_several_probes_of_a_checkpoint_per_call(cluster, tmp_path):
    from probeserve.runners.ray import run_ray

    spec = tiny_spec(tmp_path, resources={"device": "cpu", "probes_per_call": 4, "max_actors": 1})
    write_checkpoints(spec)
    summary = run_ray(spec)
    assert summary.ok == 8 and not summary.failed
    together = rows_by_item(spec.output.uri)
    # one call per checkpoint: its four rows share the call's wall time
    for ckpt in {key for key, _ in together}:
        assert len({r["seconds"] for (c, _), r in together.items() if c == ckpt}) == 1
    local = tiny_spec(tmp_path, output={"uri": str(tmp_path / "local")})
    run_local(local)
    alone = rows_by_item(local.output.uri)
    assert together.keys() == alone.keys()
    for key in together:
        for col in results.METRICS:
            assert together[key][col] == pytest.approx(alone[key][col], abs=1e-6), (key, col)
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
    # refused before the run recorded its spec: the run name is not bound to it, so the same
    # run with a corrected spec is not refused as "made with a different spec" next
    assert not os.path.exists(os.path.join(spec.output.uri, "runs")), os.listdir(spec.output.uri)


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


def readme_ray_job_lines() -> list[str]:
    """The README's shell block that submits a Ray job, as commands (continuations joined)."""
    text = open(os.path.join(REPO, "README.md")).read()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "ray job submit" in b]
    commands = block.replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+#.*$", "", c).strip() for c in commands if c.strip()]


@pytest.mark.skipif(not os.path.exists(RAY_CLI), reason="ray CLI not installed beside this python")
def test_the_readme_ray_job_lines_work_as_written(tmp_path):
    # the README's block, line by line, in a folder laid out like the repository, against a
    # head of this test's own (its address instead of the default one; `ray stop` would stop
    # every Ray on the machine, so the test stops its head itself)
    lines = readme_ray_job_lines()
    assert lines[0] == "export RAY_AUTH_MODE=token" and lines[2].startswith("ray start --head")
    train, submit, status = lines[3], lines[4], lines[5]
    assert submit.startswith("ray job submit --address http://127.0.0.1:8265 --working-dir . -- ")
    assert status == "probeserve status probes/gaussian-mlp" and lines[-1] == "ray stop"
    shutil.copytree(os.path.join(REPO, "jobs"), tmp_path / "clone" / "jobs")
    clone = tmp_path / "clone"
    with ray_head(tmp_path) as head:
        env = {**head.env, "PATH": os.path.dirname(sys.executable) + os.pathsep + head.env["PATH"]}

        def sh(line: str) -> subprocess.CompletedProcess:
            line = line.replace("http://127.0.0.1:8265", head.address)
            return subprocess.run(
                ["bash", "-c", line], cwd=clone, env=env, capture_output=True, text=True, timeout=400
            )

        def submitted(line: str) -> subprocess.CompletedProcess:
            for _attempt in range(60):  # the head's job agent starts a while after its dashboard
                job = sh(line)
                if "No available agent" not in job.stdout + job.stderr:
                    return job
                time.sleep(3)
            raise AssertionError("the head's job agent never came up")

        assert sh(train + " --steps 0").returncode == 0  # one checkpoint is enough here
        relative = submitted(submit.split(" --set ")[0])  # the spec's own paths: relative
        said = relative.stdout + relative.stderr
        assert relative.returncode != 0, said[-3000:]
        assert (
            "error: checkpoints.uri: 'ckpts/gaussian-mlp' is a relative path, and this Ray job runs" in said
        )
        assert "Traceback" not in said and not (clone / "probes").exists()
        job = submitted(submit)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        shown = sh(status)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[2].split() == ["gaussian-mlp", "1", "10", "10", "0", "0", "0"]
    rows = results.load(str(clone / "probes" / "gaussian-mlp")).to_pylist()
    assert len(rows) == 10 and {r["status"] for r in rows} == {"ok"}


def test_a_ray_job_refuses_a_relative_local_path(tmp_path):
    folder = acme_folder(tmp_path)  # checkpoints.uri: ckpts, output.uri: out
    env = {
        **os.environ,
        "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}),
    }
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "jobs", "sweep.py"), "spec.json"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: checkpoints.uri: 'ckpts' is a relative path, and this Ray job runs in Ray's temporary copy of "
        f"the working folder ({folder}), where it would vanish; give an absolute path (--set "
        "checkpoints.uri=$PWD/ckpts on the ray job submit line) or s3://bucket/prefix"
    ]
    assert not (folder / "out").exists()


def isolated_ray_env(tmp_root: str, **extra: str) -> dict[str, str]:
    """An environment whose Ray keeps its temp folder (ray_current_cluster, sessions) in `tmp_root`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "PYTHONPATH")}
    return {**env, "RAY_TMPDIR": tmp_root, **extra}


def test_a_stale_ray_current_cluster_is_never_joined(tmp_path):
    # `ray start --head` stopped with SIGTERM leaves its address in Ray's temp folder; a bare
    # ray.init() then retried that dead GCS for 14 minutes
    spec = tiny_spec(tmp_path, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0,))
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    ray_tmp = tempfile.mkdtemp(prefix="pr-", dir="/tmp")  # Ray's socket paths stay under 108 bytes
    try:
        os.makedirs(os.path.join(ray_tmp, "ray"))
        dead = f"127.0.0.1:{free_port()}"
        with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write(dead)
        env = isolated_ray_env(ray_tmp)
        run = [PROBESERVE, "run", str(path)]
        # naming the stale cluster (--address auto) fails within seconds, saying what is wrong
        auto = subprocess.run(
            [*run, "--address", "auto"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert auto.returncode == 2
        assert auto.stderr.strip().splitlines()[-1] == (
            f"error: --address auto: cannot connect to a Ray cluster: nothing answers at {dead}, the address in "
            "Ray's ray_current_cluster file (Connection refused); that cluster is gone: start one with "
            "`ray start --head`, or leave out --address to start a local Ray"
        )
        # without --address: a fresh local Ray, not the leftover
        proc = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Token authentication is enabled" not in proc.stderr  # Ray's notice, on every run before
        assert len(results.load(spec.output.uri).to_pylist()) == 2
        # nothing pending: no Ray is started at all
        sessions = {p for p in os.listdir(os.path.join(ray_tmp, "ray")) if p.startswith("session_2")}
        again = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert again.returncode == 0 and "2 already done" in again.stdout
        assert {p for p in os.listdir(os.path.join(ray_tmp, "ray")) if p.startswith("session_2")} == sessions
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_model_beside_the_spec_is_importable_in_local_ray_workers(tmp_path):
    folder = acme_folder(tmp_path, steps=(0, 10))
    ray_tmp = tempfile.mkdtemp(prefix="pr-", dir="/tmp")
    try:
        env = isolated_ray_env(ray_tmp)
        for args in (["run", "spec.json"], ["watch", "spec.json", "--once", "--set", "run=acme-watched"]):
            proc = subprocess.run(
                [PROBESERVE, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=300
            )
            assert proc.returncode == 0, (args, proc.stderr[-3000:])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    rows = results.load(str(folder / "out")).to_pylist()
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
