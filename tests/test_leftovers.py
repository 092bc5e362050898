"""What killed, failed and racing runs leave behind, and what a rerun writes (issue 9, items 9
and 10).

The next run removes what is provably its own and dead (staging folders in TMPDIR, running
markers, shards of committed items, parts no manifest lists) and nothing else; `status` tells
a live item from a dead one; a rerun, `plan` and `status` over a finished output write nothing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import probeserve.markers as markers_mod
import probeserve.shards as shards_mod
import probeserve.sweep as sweep_mod
from probeserve import results, staging
from probeserve.cli import main
from probeserve.runners.local import run_local
from probeserve.storage import LocalStorage, open_storage
from probeserve.sweep import (
    ACTIVATIONS_DIR,
    RUNNING_DIR,
    Sweep,
    extract,
    layer_prefix,
    manifest_key,
    probe_and_commit,
    running_key,
)

sys.path.insert(0, os.path.dirname(__file__))
from helpers import S3Server, tiny_spec, write_checkpoints, write_spec

WRITES = ("publish_bytes", "publish_file", "create_only", "delete")


def objects(spec, prefix: str) -> list[str]:
    return [o.key for o in open_storage(spec.output.uri).list(prefix + "/")]


def dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def no_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---- staging folders in TMPDIR


STAGING_CHILD = """
import os, signal, sys
import numpy as np
from probeserve.shards import ShardWriter
from probeserve.staging import StagingDir
from probeserve.storage import LocalStorage

w = ShardWriter(LocalStorage(sys.argv[1]), "acts/train", n_features=4, dtype="float32",
                metadata={}, max_bytes=1 << 20)
w.write(np.zeros((10, 4), np.float32), np.zeros(10, np.int64))  # a part half written
d = StagingDir()  # what load_state_dict holds while it downloads a checkpoint
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
print("ready", flush=True)
sys.stdin.read()  # alive until the test closes stdin
"""


def test_a_run_removes_staging_folders_of_killed_processes_and_nothing_else(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    child = [sys.executable, "-c", STAGING_CHILD, str(tmp_path / "store")]
    killed = subprocess.run([*child, "kill"], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    of_killed = set(os.listdir(tmp))
    assert len(of_killed) == 2 and all(n.startswith("probeserve-stage-") for n in of_killed)
    live = subprocess.Popen(
        [*child, "live"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert live.stdout.readline().strip() == "ready"
        of_live = set(os.listdir(tmp)) - of_killed
        assert len(of_live) == 2
        # not provably ours and dead: an old-style name, another host's, a stranger's, and one
        # whose pid is gone here but whose lock a live process holds (another pid namespace)
        gone = dead_pid()
        foreign = {
            "probeserve-shards-abc123",
            f"probeserve-stage-elsewhere.invalid-{gone}-{secrets.token_hex(8)}",
            "someone-elses",
        }
        for name in foreign:
            (tmp / name).mkdir()
        held = tmp / f"probeserve-stage-{staging.this_host()}-{gone}-{secrets.token_hex(8)}"
        held.mkdir()
        lock = os.open(held / staging.LOCK_NAME, os.O_RDWR | os.O_CREAT)
        fcntl.flock(lock, fcntl.LOCK_EX)

        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        spec = tiny_spec(tmp_path, layers={"include": ["fc1"]})
        write_checkpoints(spec, steps=(0,))
        assert run_local(spec).ok == 1
        assert set(os.listdir(tmp)) == of_live | foreign | {held.name}

        os.close(lock)  # now nothing holds it: it is dead
        assert staging.remove_stale(str(tmp)) == [str(held)]
    finally:
        live.stdin.close()
        assert live.wait(60) == 0
    assert set(os.listdir(tmp)) == foreign  # the live process removed its own on exit


@pytest.mark.integration
def test_a_checkpoint_download_stages_in_a_folder_a_later_run_can_judge(s3_server, tmp_path, monkeypatch):
    from probeserve import checkpoints

    monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bucket = s3_server.new_bucket()
    spec = tiny_spec(tmp_path, checkpoints={"uri": f"s3://{bucket}/ckpts"})
    write_checkpoints(spec, steps=(0,))
    sweep = Sweep(spec)
    seen = []
    real = checkpoints._load_file

    def load(path, where):
        folder = os.path.dirname(path)
        seen.append((os.path.basename(folder), staging.is_stale(folder)))
        return real(path, where)

    monkeypatch.setattr(checkpoints, "_load_file", load)
    ckpt = sweep.discover().complete[0]
    assert checkpoints.load_state_dict(sweep.checkpoints_storage, ckpt, spec.checkpoints)
    ((name, stale),) = seen
    assert name.startswith(f"probeserve-stage-{staging.this_host()}-{os.getpid()}-") and not stale
    assert not [n for n in os.listdir(tmp_path) if n.startswith("probeserve-")]


# ---- running markers


def test_status_tells_a_dead_probe_from_a_live_one_and_the_next_run_removes_it(tmp_path, capsys):
    spec = tiny_spec(tmp_path, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0, 10))
    run_local(spec)
    write_checkpoints(spec, steps=(20,))
    out = open_storage(spec.output.uri)
    ckpts = {c.step: c for c in Sweep(spec).discover().complete}
    here, gone = socket.gethostname(), dead_pid()
    dead = running_key("t", ckpts[20], "fc2")  # killed on this host: its pid is gone
    elsewhere = running_key("t", ckpts[20], "input")  # on another machine, beating
    after_commit = running_key("t", ckpts[0], "input")  # killed between its commit and the marker's delete
    for key, host, pid in (
        (dead, here, gone),
        (elsewhere, "elsewhere.invalid", 1),
        (after_commit, here, gone),
    ):
        info = {"host": host, "pid": pid, "started": time.time(), "device": "cpu", "heartbeat_s": 30.0}
        out.publish_bytes(key, json.dumps(info).encode())

    assert main(["status", spec.output.uri]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == [
        "run",
        "checkpoints",
        "items",
        "done",
        "failed",
        "running",
        "pending",
        "stale",
    ]
    assert lines[2].split() == ["t", "3", "6", "4", "0", "1", "1", "1"]
    assert "1 item(s) marked running have no live probe" in lines[3]

    # the other machine stops beating: after a few heartbeats, it is dead too
    old = time.time() - 5 * 30.0
    os.utime(out.uri_for(elsewhere), (old, old))
    assert main(["status", spec.output.uri]) == 0
    assert capsys.readouterr().out.strip().splitlines()[2].split() == ["t", "3", "6", "4", "0", "0", "2", "2"]
    assert {o.key for o in out.list(RUNNING_DIR + "/")} == {
        dead,
        elsewhere,
        after_commit,
    }  # status only reads

    # the next run removes every dead marker, also that of an item it does not redo
    only_old = tiny_spec(
        tmp_path,
        layers={"include": ["input", "fc2"]},
        checkpoints={"uri": spec.checkpoints.uri, "steps": [0, 10]},
    )
    assert run_local(only_old).skipped_done == 4
    assert list(out.list(RUNNING_DIR + "/")) == []


def test_a_live_marker_on_this_host_is_running_and_an_unreadable_one_is_judged_by_its_age(tmp_path):
    out = LocalStorage(str(tmp_path))
    info = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat_s": 30.0}
    out.publish_bytes("running/t/a.json", json.dumps(info).encode())
    out.publish_bytes("running/t/b.json", b"\x00 not json")
    a, b = out.stat("running/t/a.json"), out.stat("running/t/b.json")
    assert markers_mod.marker_state(out, a)[0] and markers_mod.marker_state(out, b)[0]
    late = a.mtime + 4 * 30.0 + 1
    assert not markers_mod.marker_state(out, a, now=late)[0]
    assert not markers_mod.marker_state(out, b, now=late)[0]


def test_a_marker_with_a_pid_no_process_can_have_is_judged_by_its_age(tmp_path):
    """A pid of 2**31 in a marker of this host made `status` (and `migrate`) end in an
    OverflowError traceback: os.kill takes a C int. It counts as alive, as pid 0 does, until
    its age says it is stale."""
    out = LocalStorage(str(tmp_path))
    for pid in (2**31, 10**22):
        info = {"host": socket.gethostname(), "pid": pid, "heartbeat_s": 30.0}
        out.publish_bytes("running/t/a.json", json.dumps(info).encode())
        a = out.stat("running/t/a.json")
        assert sweep_mod.marker_state(out, a) == (True, "running")
        assert not sweep_mod.marker_state(out, a, now=a.mtime + 4 * 30.0 + 1)[0]


def test_a_probe_refreshes_its_marker_while_it_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(markers_mod, "HEARTBEAT_S", 0.1)
    real_probe = sweep_mod.probe

    def slow_probe(*args, **kwargs):
        time.sleep(1.5)
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(sweep_mod, "probe", slow_probe)
    beats = []
    real_publish = LocalStorage.publish_bytes

    def publish(self, key, data):
        if key.startswith(RUNNING_DIR + "/"):
            beats.append((key, json.loads(data)))
        return real_publish(self, key, data)

    monkeypatch.setattr(LocalStorage, "publish_bytes", publish)
    spec = tiny_spec(tmp_path, layers={"include": ["fc1"]})
    write_checkpoints(spec, steps=(0,))
    assert run_local(spec).ok == 1
    assert len(beats) >= 5, beats  # the first publish, then one every 0.1 s for 1.5 s
    assert len({k for k, _ in beats}) == 1
    assert all(b["pid"] == os.getpid() and b["heartbeat_s"] == 0.1 for _, b in beats)
    assert [b["beat"] for _, b in beats] == sorted(b["beat"] for _, b in beats)
    assert objects(spec, RUNNING_DIR) == []  # and it is gone once the row is committed


# ---- shards with keep_activations: false


def no_keep(tmp_path, **over):
    return tiny_spec(tmp_path, output={"uri": str(tmp_path / "out"), "keep_activations": False}, **over)


@pytest.mark.parametrize("killed", ["before deleting anything", "after deleting the manifest"])
def test_shards_of_a_run_killed_after_its_commit_go_with_the_next_run(tmp_path, monkeypatch, killed):
    spec = no_keep(tmp_path, layers={"include": ["fc1", "fc2"]})
    write_checkpoints(spec, steps=(0,))
    real_delete = LocalStorage.delete

    def delete(self, key):
        if killed == "before deleting anything" or not key.endswith("manifest.json"):
            raise KeyboardInterrupt  # like kill -9 at this moment
        return real_delete(self, key)

    monkeypatch.setattr(LocalStorage, "delete", delete)
    with pytest.raises(KeyboardInterrupt):
        run_local(spec)
    monkeypatch.setattr(LocalStorage, "delete", real_delete)
    assert results.load(spec.output.uri).num_rows == 1  # fc1 committed, its shards still there
    assert [k for k in objects(spec, ACTIVATIONS_DIR) if "/fc1/" in k and "part-" in k]
    summary = run_local(spec)
    assert summary.ok == 1 and summary.skipped_done == 1
    assert objects(spec, ACTIVATIONS_DIR) == []


def test_shards_a_run_kept_are_not_removed_by_a_run_that_does_not_keep_them(tmp_path):
    kept = tiny_spec(tmp_path, layers={"include": ["fc1"]})
    write_checkpoints(kept, steps=(0,))
    run_local(kept)
    before = objects(kept, ACTIVATIONS_DIR)
    assert before and any(k.endswith("manifest.json") for k in before)
    run_local(no_keep(tmp_path, layers={"include": ["fc1"]}))
    assert objects(kept, ACTIVATIONS_DIR) == before


@pytest.mark.parametrize("keep", [True, False])
def test_a_failed_extraction_leaves_no_parts(tmp_path, monkeypatch, keep):
    spec = tiny_spec(
        tmp_path,
        layers={"include": ["fc1", "fc2"]},
        output={"uri": str(tmp_path / "out"), "keep_activations": keep, "max_shard_bytes": 4096},
    )
    write_checkpoints(spec, steps=(0,))
    real_write = shards_mod.ShardWriter.write

    def write(self, x, y):
        if self.metadata["probeserve.layer"] == "fc2" and self.metadata["probeserve.split"] == "val":
            raise OSError("disk full")  # after fc2's train parts were published
        return real_write(self, x, y)

    monkeypatch.setattr(shards_mod.ShardWriter, "write", write)
    summary = run_local(spec)
    assert [(layer, "disk full" in e) for _, layer, e in summary.failed] == [("fc2", True)]
    fc2 = [k for k in objects(spec, ACTIVATIONS_DIR) if "/fc2/" in k]
    assert fc2 == []
    monkeypatch.setattr(shards_mod.ShardWriter, "write", real_write)
    assert run_local(spec).ok == 1
    assert bool(objects(spec, ACTIVATIONS_DIR)) == keep


# ---- parts of an earlier extraction with another output.max_shard_bytes


def test_re_extraction_removes_the_parts_its_manifest_does_not_list_after_publishing_it(
    tmp_path, monkeypatch
):
    small = tiny_spec(
        tmp_path, layers={"include": ["fc1"]}, output={"uri": str(tmp_path / "out"), "max_shard_bytes": 2048}
    )
    write_checkpoints(small, steps=(0,))
    real_publish = LocalStorage.publish_bytes

    def killed_before_manifest(self, key, data):
        if key.endswith("manifest.json"):
            raise KeyboardInterrupt
        return real_publish(self, key, data)

    monkeypatch.setattr(LocalStorage, "publish_bytes", killed_before_manifest)
    with pytest.raises(KeyboardInterrupt):
        run_local(small)
    monkeypatch.setattr(LocalStorage, "publish_bytes", real_publish)
    many = objects(small, ACTIVATIONS_DIR)
    assert len(many) > 6  # several parts per split

    out = open_storage(small.output.uri)
    seen_when_deleting = []
    real_delete = LocalStorage.delete

    def delete(self, key):
        if "part-" in key:
            seen_when_deleting.append(out.stat(key.rsplit("/", 2)[0] + "/manifest.json") is not None)
        return real_delete(self, key)

    monkeypatch.setattr(LocalStorage, "delete", delete)
    large = tiny_spec(tmp_path, layers={"include": ["fc1"]})  # the default: one part per split
    assert run_local(large).ok == 1
    ckpt = Sweep(large).discover().complete[0]
    manifest = json.loads(out.read_bytes(manifest_key("t", ckpt, "fc1")))
    listed = sorted(k for split in manifest["splits"].values() for k in split["shards"])
    assert len(listed) == 3
    assert sorted(k for k in objects(large, ACTIVATIONS_DIR) if "part-" in k) == listed
    assert len(seen_when_deleting) == len(many) - 3 and all(seen_when_deleting)


# ---- two runs on one output, keep_activations: false


def finished_elsewhere(tmp_path, spec):
    """A Sweep of run B, and its item, planned while the item was pending."""
    write_checkpoints(spec, steps=(0,))
    sweep = Sweep(spec)
    ((item, status),) = sweep.plan().items
    assert status == "pending"
    return sweep, item


def test_a_probe_whose_shards_another_run_deleted_after_committing_takes_that_row(
    tmp_path, monkeypatch, caplog
):
    spec = no_keep(tmp_path, layers={"include": ["fc1"]})
    sweep, item = finished_elsewhere(tmp_path, spec)
    assert not sweep_mod.extract_missing(sweep, [item], device="cpu")
    real_iter = shards_mod.iter_chunks
    raced = []

    def iter_chunks(*args, **kwargs):
        if not raced:  # B has read the manifest; now A probes, commits and deletes the shards
            raced.append("A")
            raced.append(run_local(spec))
        return real_iter(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "iter_chunks", iter_chunks)
    caplog.set_level(logging.INFO, "probeserve")
    row = probe_and_commit(sweep, item, device="cpu")
    assert raced[1].ok == 1
    (committed,) = results.load(spec.output.uri).to_pylist()
    assert row["status"] == "ok" and row["finished_at"] == committed["finished_at"]
    assert no_errors(caplog) == []
    assert objects(spec, ACTIVATIONS_DIR) == [] and objects(spec, RUNNING_DIR) == []


def test_a_probe_whose_shards_vanished_without_a_committed_row_extracts_again(tmp_path, monkeypatch, caplog):
    spec = no_keep(tmp_path, layers={"include": ["fc1"]})
    sweep, item = finished_elsewhere(tmp_path, spec)
    assert not sweep_mod.extract_missing(sweep, [item], device="cpu")
    real_iter = shards_mod.iter_chunks
    out = open_storage(spec.output.uri)
    raced = []

    def iter_chunks(*args, **kwargs):
        if not raced:  # B has read the manifest; a racing run whose own extraction failed deletes the parts
            raced.extend(k for k in objects(spec, layer_prefix("t", item.checkpoint, "fc1")) if "part-" in k)
            for k in raced:
                out.delete(k)
        return real_iter(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "iter_chunks", iter_chunks)
    caplog.set_level(logging.INFO, "probeserve")
    row = probe_and_commit(sweep, item, device="cpu")
    assert row["status"] == "ok", row["error"]
    assert any("extracting it again" in r.getMessage() for r in caplog.records)
    assert no_errors(caplog) == []
    assert results.load(spec.output.uri).column("status").to_pylist() == ["ok"]
    assert objects(spec, ACTIVATIONS_DIR) == []


def test_shards_extracted_after_another_run_committed_are_removed(tmp_path, caplog):
    spec = no_keep(tmp_path, layers={"include": ["fc1"]})
    sweep, item = finished_elsewhere(tmp_path, spec)
    assert run_local(spec).ok == 1  # run A, from start to end
    assert not extract(sweep, item.checkpoint, ["fc1"])  # run B's extraction, begun before A committed
    caplog.set_level(logging.INFO, "probeserve")
    row = probe_and_commit(sweep, item, device="cpu")
    assert row["status"] == "ok" and no_errors(caplog) == []
    assert objects(spec, ACTIVATIONS_DIR) == []


def test_two_runs_at_once_without_keeping_activations(tmp_path):
    spec = no_keep(tmp_path)  # 2 checkpoints x 4 layers
    write_checkpoints(spec)
    path = write_spec(tmp_path, spec)
    cmd = [sys.executable, "-m", "probeserve", "run", path, "--runner", "local"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "ERROR" not in err and "no such" not in err.lower() and "WARNING" not in err, err[-3000:]
    rows = results.load(spec.output.uri).to_pylist()
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert objects(spec, ACTIVATIONS_DIR) == [] and objects(spec, RUNNING_DIR) == []


# ---- a rerun over a finished output writes nothing


def count_local_writes(monkeypatch) -> list[tuple[str, str]]:
    writes: list[tuple[str, str]] = []
    for name in WRITES:
        real = getattr(LocalStorage, name)

        def counted(self, key, *args, _real=real, _name=name, **kwargs):
            writes.append((_name, key))
            return _real(self, key, *args, **kwargs)

        monkeypatch.setattr(LocalStorage, name, counted)
    return writes


@pytest.mark.parametrize("keep", [True, False])
def test_a_rerun_plan_and_status_over_a_finished_output_write_nothing(tmp_path, monkeypatch, capsys, keep):
    spec = tiny_spec(tmp_path, output={"uri": str(tmp_path / "out"), "keep_activations": keep})
    write_checkpoints(spec)
    path = write_spec(tmp_path, spec)
    assert main(["run", path, "--runner", "local"]) == 0
    writes = count_local_writes(monkeypatch)
    assert main(["run", path, "--runner", "local"]) == 0
    assert main(["plan", path]) == 0
    assert main(["status", spec.output.uri]) == 0
    assert writes == []
    # and a change is still written: another layer selection
    assert main(["run", path, "--runner", "local", "--set", 'layers.include=["fc1"]']) == 0
    assert writes == [("publish_bytes", "runs/t/layers.json")]
    capsys.readouterr()


@pytest.mark.integration
def test_a_rerun_plan_and_status_send_s3_no_write_request(tmp_path, monkeypatch, capsys):
    # a server of our own, recording every request it gets into a file of this test's
    recording = tmp_path / "requests.jsonl"
    monkeypatch.setenv("MOTO_RECORDER_FILEPATH", str(recording))
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = S3Server()
    server.start()
    try:
        monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", server.endpoint)
        bucket = server.new_bucket()
        spec = tiny_spec(
            tmp_path,
            checkpoints={"uri": f"s3://{bucket}/ckpts"},
            output={"uri": f"s3://{bucket}/probes", "keep_activations": False},
            layers={"include": ["input", "fc2"]},
        )
        write_checkpoints(spec)
        path = write_spec(tmp_path, spec)
        assert main(["run", path, "--runner", "local"]) == 0
        import urllib.request

        def api(what: str) -> None:
            urllib.request.urlopen(
                urllib.request.Request(f"{server.endpoint}/moto-api/recorder/{what}", method="POST")
            )

        api("reset-recording")
        api("start-recording")
        assert main(["run", path, "--runner", "local"]) == 0
        assert main(["plan", path]) == 0
        assert main(["status", spec.output.uri]) == 0
        api("stop-recording")
    finally:
        server.stop()
    requests = [json.loads(line) for line in recording.read_text().splitlines()]
    methods = [r["method"] for r in requests]
    assert methods.count("GET") + methods.count("HEAD") > 10  # it did record the rerun
    assert [(r["method"], r["url"]) for r in requests if r["method"] not in ("GET", "HEAD")] == []
    capsys.readouterr()


# ---- a process that extracted does not keep its peak heap

RELEASE = """
import json, sys
import numpy as np
import probeserve.sweep as sw

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) << 10

assert sw.keep_freed_memory()  # as every extraction does
blocks = [np.ones(1 << 20, np.uint8) for _ in range(300)]  # 300 MiB from the heap, touched
held = rss()
del blocks
freed = rss()
if sys.argv[1] == "release":
    sw.release_freed_memory()
print(json.dumps([held, freed, rss()]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_the_memory_an_extraction_freed_is_given_back_at_its_end():
    got = {}
    for mode in ("control", "release"):
        proc = subprocess.run(
            [sys.executable, "-c", RELEASE, mode], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    held, freed, after = got["control"]
    assert held - after < 50 * mib, got  # kept for the next batch: what a waiting worker would hold
    held, freed, after = got["release"]
    assert freed - after > 250 * mib, got


PID_FACTORY = """
import os

from probeserve.models import build_model
from probeserve.spec import ModelSpec


def build(**kwargs):
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(os.environ["PROBESERVE_TEST_PID_LOG"], "a") as f:
        f.write(f"{os.getpid()} {rss}\\n")
    return build_model(ModelSpec(factory="mnist_convnet", kwargs=kwargs))
"""


def worker_memory(pid: int) -> tuple[int, int]:
    """(resident, peak resident) KiB of a process."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_ray_worker_does_not_keep_what_its_extraction_used(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    import numpy as np

    from probeserve.data import write_idx
    from probeserve.runners.ray import run_ray

    # a model factory that says which processes build the model, and their memory then:
    # the driver (planning) and the extraction workers (probe actors only read shards)
    (tmp_path / "pid_factory.py").write_text(PID_FACTORY)
    pids = tmp_path / "pids"
    monkeypatch.setenv("PROBESERVE_TEST_PID_LOG", str(pids))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # Ray puts the driver's folder on its workers' path
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for prefix, n in (("train", 1200), ("t10k", 300)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(str(tmp_path / "data" / f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(
            str(tmp_path / "data" / f"{prefix}-labels-idx1-ubyte.gz"), (np.arange(n) % 10).astype(np.uint8)
        )
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        spec = tiny_spec(
            tmp_path,
            model={"factory": "pid_factory:build"},
            data={"kind": "idx", "path": str(tmp_path / "data"), "val_size": 300},
            layers={"include": ["input", "fc2"]},
            reducer={"kind": "subset", "max_features": 64},
            probe={"max_epochs": 2},
            resources={"device": "cpu", "extract_batch_size": 512, "max_checkpoints_in_flight": 1},
        )
        write_checkpoints(spec, steps=(0,))
        assert run_ray(spec).ok == 2
        built = {}
        for line in pids.read_text().splitlines():
            pid, rss = map(int, line.split())
            built.setdefault(pid, rss)  # the first build: before any activation was computed
        ((worker, before),) = [(p, r) for p, r in built.items() if p != os.getpid()]
        now, peak = worker_memory(worker)
        assert peak - before > 64 << 10  # the extraction took over 64 MiB at its peak (about 120 here)
        assert now - before < (peak - before) / 3, (before, now, peak)  # and kept little of it
    finally:
        ray.shutdown()


def test_status_of_a_run_with_a_relative_checkpoints_uri_says_where_to_run_it(tmp_path, monkeypatch, capsys):
    """A run made with `checkpoints.uri: ckpts/...` records that relative path; status from
    another folder said only "ckpts/... does not exist". It says why, and from the run's
    folder it counts the run as before."""
    spec = tiny_spec(tmp_path, output={"uri": str(tmp_path / "out")})
    write_checkpoints(spec, steps=(0,))
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(spec.checkpoints.uri, tmp_path)
    run_local(spec.model_copy(update={"checkpoints": spec.checkpoints.model_copy(update={"uri": relative})}))
    assert main(["status", spec.output.uri]) == 0
    assert capsys.readouterr().out.strip().splitlines()[2].split()[:4] == ["t", "1", "4", "4"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # from another folder with a `ckpts/` of its own (two checkpoints), the run's own are counted:
    # the run recorded the folder it ran in
    write_checkpoints(
        spec.model_copy(
            update={"checkpoints": spec.checkpoints.model_copy(update={"uri": str(elsewhere / relative)})}
        ),
        steps=(0, 1),
    )
    assert main(["status", spec.output.uri]) == 0
    assert capsys.readouterr().out.strip().splitlines()[2].split()[:4] == ["t", "1", "4", "4"]
    # a record made before runs recorded their folder says why status cannot count it
    shutil.rmtree(elsewhere / relative.split(os.sep)[0])
    record_path = tmp_path / "out" / "runs" / "t" / "spec.json"
    record = json.loads(record_path.read_text())
    assert record.pop("ran_in") == str(tmp_path)
    record_path.write_text(json.dumps(record))
    assert main(["status", spec.output.uri]) == 1
    assert capsys.readouterr().err.strip() == (
        f"run t: cannot read its records: StorageError: checkpoints.uri: {elsewhere / relative} does not "
        f"exist (the run recorded checkpoints.uri {relative!r}, a path relative to the folder it ran in: "
        "run status from that folder)"
    )
