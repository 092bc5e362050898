"""The watch daemon against a real S3 server process (moto) on loopback.

Most tests use the in-process runner or a counting fake submitter; one runs a sweep on a
real local Ray. The ledger in the bucket is what every test checks: one claim per
checkpoint, states moving to done or failed, and results committed once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from probeserve import results
from probeserve.checkpoints import marker_key
from probeserve.cli import main
from probeserve.layout import checkpoint_dir, claim_key
from probeserve.ledger import Ledger
from probeserve.spec import spec_from_dict
from probeserve.storage import open_storage
from probeserve.sweep import Sweep
from probeserve.watch import LocalSubmitter, RayJobSubmitter, Watcher, submission_id

sys.path.insert(0, os.path.dirname(__file__))
from helpers import S3Server, acme_folder, tiny_spec, write_checkpoints
from rayhead import RAY_CLI, ray_head

pytestmark = pytest.mark.integration
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["input", "fc1", "act", "fc2"]


def s3_spec(bucket: str, endpoint: str | None = None, **over):
    spec = {
        "run": "w",
        "checkpoints": {"uri": f"s3://{bucket}/ckpts"},
        "model": {"factory": "tiny", "kwargs": {"input_dim": 6, "hidden": 12, "num_classes": 2}},
        "layers": {"include": LAYERS},
        "data": {"kind": "gaussian", "dim": 6, "train_size": 600, "val_size": 200, "test_size": 200},
        "probe": {"max_epochs": 50, "l2": 1e-3},
        "resources": {"device": "cpu", "torch_threads": 1},
        # as a daemon over a long training run is usually set up (docs/watch.md)
        "output": {"uri": f"s3://{bucket}/out", "keep_activations": False},
        "storage": {"s3_endpoint": endpoint},
    }
    for k, v in over.items():
        spec[k] = {**spec[k], **v} if isinstance(spec.get(k), dict) else v
    return spec_from_dict(spec)


@pytest.fixture
def endpoint(s3_server, monkeypatch):
    monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", s3_server.endpoint)
    return s3_server.endpoint


class CountingSubmitter:
    """Counts submissions (optionally shared between daemons) of real in-process sweeps.

    The sweeps are real because the daemon records `done` only for a checkpoint whose every
    layer has a committed row, whatever the submitter says.
    """

    synchronous = True

    def __init__(self, calls: list | None = None, *, delay: float = 0.0) -> None:
        self.calls = [] if calls is None else calls
        self.delay = delay
        self.inner = LocalSubmitter("local")
        self._lock = threading.Lock()

    def submit(self, checkpoint, spec, *, submission_id):
        with self._lock:
            self.calls.append((checkpoint.key, submission_id, spec.checkpoints.steps))
        time.sleep(self.delay)
        return self.inner.submit(checkpoint, spec, submission_id=submission_id)

    def state(self, sid):
        return self.inner.state(sid)

    def error(self, sid):
        return self.inner.error(sid)


def ledger_states(spec) -> dict[str, tuple[str, int]]:
    """{checkpoint key: (state, generation)}."""
    out = open_storage(spec.output.uri)
    return {e.claim["checkpoint"]: (e.status, e.gen) for e in Ledger(out, spec.run).read().values()}


def result_rows(spec) -> list[dict]:
    return results.load(spec.output.uri, run=spec.run).to_pylist()


def test_backfill_then_a_new_checkpoint_is_probed_once(s3_bucket, endpoint, capsys, tmp_path):
    spec = s3_spec(s3_bucket)
    write_checkpoints(spec, steps=(0, 10))
    sub = CountingSubmitter()
    w = Watcher(spec, sub)
    report = w.scan()
    assert sorted(report.submitted) == [
        "step=000000000/model.safetensors",
        "step=000000010/model.safetensors",
    ]
    assert [c[2] for c in sub.calls] == [[0], [10]]  # each sweep restricted to its checkpoint
    rows = result_rows(spec)
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    # the spec's keep_activations: false: shards go once their probes committed
    assert not list(open_storage(spec.output.uri).list("activations/"))
    assert w.scan().submitted == []  # nothing new: nothing submitted
    write_checkpoints(spec, steps=(20,))
    assert w.scan().submitted == ["step=000000020/model.safetensors"]
    assert len(sub.calls) == 3 and len({c[0] for c in sub.calls}) == 3
    assert set(ledger_states(spec).values()) == {("done", 1)}
    assert len(result_rows(spec)) == 12

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    assert main(["watch", str(path), "--status"]) == 0
    out = capsys.readouterr().out
    assert out.count(" done ") == 3
    assert submission_id("w", "step=000000020/model.safetensors", 1) in out


def test_checkpoint_without_marker_is_ignored_until_it_appears(s3_bucket, endpoint):
    spec = s3_spec(s3_bucket)
    write_checkpoints(spec, steps=(5,))
    ckpts = open_storage(spec.checkpoints.uri)
    marker = marker_key("step=000000005/model.safetensors")
    body = ckpts.read_bytes(marker)
    ckpts.delete(marker)
    sub = CountingSubmitter()
    w = Watcher(spec, sub)
    for _ in range(2):
        report = w.scan()
        assert report.waiting == ["step=000000005/model.safetensors"] and not report.submitted
    assert not list(open_storage(spec.output.uri).list("ledger/"))
    ckpts.publish_bytes(marker, body)
    assert w.scan().submitted == ["step=000000005/model.safetensors"]
    assert len(sub.calls) == 1


def test_stable_size_needs_two_scans_stable_seconds_apart(s3_bucket, endpoint):
    spec = s3_spec(s3_bucket, checkpoints={"completeness": "stable_size", "stable_seconds": 30})
    write_checkpoints(spec, steps=(1,))
    now = [1000.0]
    sub = CountingSubmitter()
    w = Watcher(spec, sub, clock=lambda: now[0])
    assert w.scan().waiting  # first sight
    now[0] += 10
    assert w.scan().waiting  # unchanged, but not for long enough
    # the training job rewrites the file (size changes): the clock starts over
    ckpts = open_storage(spec.checkpoints.uri)
    key = "step=000000001/model.safetensors"
    ckpts.publish_bytes(key, ckpts.read_bytes(key) + b" ")
    now[0] += 25
    assert w.scan().waiting
    now[0] += 25
    assert w.scan().waiting  # 25 s since the change
    now[0] += 10
    assert w.scan().submitted == [key]
    assert len(sub.calls) == 1


def test_policy_newest_submits_only_the_newest(s3_bucket, endpoint):
    spec = s3_spec(s3_bucket)
    write_checkpoints(spec, steps=(0, 10, 20))
    sub = CountingSubmitter()
    Watcher(spec, sub, policy="newest").scan()
    assert [c[0] for c in sub.calls] == ["step=000000020/model.safetensors"]


def test_two_daemons_never_both_submit_a_checkpoint(s3_bucket, endpoint):
    spec = s3_spec(s3_bucket)
    write_checkpoints(spec, steps=(0, 1, 2, 3, 4, 5))
    calls: list = []
    daemons = [Watcher(spec, CountingSubmitter(calls, delay=0.05)) for _ in range(3)]
    barrier = threading.Barrier(len(daemons))

    def loop(w):
        for _ in range(3):
            barrier.wait()
            w.scan()

    threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in daemons]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(c[0] for c in calls) == sorted({c[0] for c in calls}) and len(calls) == 6
    assert set(ledger_states(spec).values()) == {("done", 1)}


def test_a_dead_claim_is_taken_over_once_and_a_live_one_is_left_alone(s3_bucket, endpoint):
    spec = s3_spec(s3_bucket)
    write_checkpoints(spec, steps=(0, 1))
    out = open_storage(spec.output.uri)
    # the server stamps objects with the real time: an hour from now, both claims look old
    # by their LastModified, but the live one says it was claimed "now"
    now = time.time() + 3600
    dead, live = "step=000000000/model.safetensors", "step=000000001/model.safetensors"
    for key, step, at in ((dead, 0, 1000.0), (live, 1, now)):
        claim = {"checkpoint": key, "step": step, "generation": 1, "owner": "gone:1:x", "claimed_at": at}
        out.publish_bytes(claim_key("w", checkpoint_dir(key, step), 1), json.dumps(claim).encode())
    calls: list = []
    daemons = [Watcher(spec, CountingSubmitter(calls), claim_timeout=60, clock=lambda: now) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda w: w.scan(), daemons))
    assert [c[0] for c in calls] == [dead]  # taken over by exactly one daemon
    assert calls[0][1] == submission_id("w", dead, 2)
    assert ledger_states(spec) == {dead: ("done", 2), live: ("claimed", 1)}


def test_a_damaged_claim_holds_up_its_checkpoint_alone_until_taken_over(
    s3_bucket, endpoint, caplog, capsys, tmp_path
):
    spec = s3_spec(s3_bucket, layers={"include": ["input"]})
    write_checkpoints(spec, steps=(0, 1))
    out = open_storage(spec.output.uri)
    bad = "step=000000000/model.safetensors"
    out.publish_bytes(claim_key("w", checkpoint_dir(bad, 0), 1), b'{"checkpoint": "step=0')  # cut short
    caplog.set_level(logging.WARNING, logger="probeserve")
    report = Watcher(spec, CountingSubmitter(), claim_timeout=60).scan()  # the scan goes on
    assert report.done == ["step=000000001/model.safetensors"]
    assert any("damaged claim" in r.message for r in caplog.records)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    assert main(["watch", str(path), "--status"]) == 0
    assert "damaged claim" in capsys.readouterr().out
    later = time.time() + 3600  # an hour on, the claim has not moved: taken over, once
    report = Watcher(spec, CountingSubmitter(), claim_timeout=60, clock=lambda: later).scan()
    assert report.taken_over == [bad] and ledger_states(spec)[bad] == ("done", 2)


def test_a_corrupt_checkpoint_ends_failed_and_the_daemon_goes_on(s3_bucket, endpoint):
    spec = s3_spec(s3_bucket, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0, 10))
    ckpts = open_storage(spec.checkpoints.uri)
    ckpts.publish_bytes("step=000000010/model.safetensors", b"\x80\x04 not a checkpoint")
    w = Watcher(spec, LocalSubmitter("local"))
    report = w.scan()
    assert report.failed == ["step=000000010/model.safetensors"]
    entry = {e.claim["checkpoint"]: e for e in Ledger(open_storage(spec.output.uri), "w").read().values()}
    bad = entry["step=000000010/model.safetensors"]
    assert bad.status == "failed" and bad.gen == 1
    assert "step=000000010/model.safetensors" in bad.state["error"]
    assert entry["step=000000000/model.safetensors"].status == "done"
    write_checkpoints(spec, steps=(20,))
    report = w.scan()
    assert report.submitted == ["step=000000020/model.safetensors"]  # the failed one is not retried
    assert ledger_states(spec)["step=000000020/model.safetensors"] == ("done", 1)


def test_a_damaged_result_file_counts_as_no_result_and_is_done_again(s3_bucket, endpoint, caplog):
    spec = s3_spec(s3_bucket, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0, 10))
    out = open_storage(spec.output.uri)
    bad, damaged = (
        "step=000000000/model.safetensors",
        results.result_key("w", "step=000000000/model.safetensors", 0, "fc2"),
    )
    damage = [bad]

    class Damaging(CountingSubmitter):
        def submit(self, checkpoint, spec, *, submission_id):
            super().submit(checkpoint, spec, submission_id=submission_id)
            if checkpoint.key in damage:  # its row is damaged in storage after the sweep, once
                damage.remove(checkpoint.key)
                out.publish_bytes(damaged, b"PAR1 cut short")

    caplog.set_level(logging.WARNING, logger="probeserve")
    w = Watcher(spec, Damaging(), claim_timeout=60)
    report = w.scan()  # the sweep ran here, so it is taken over in the same scan
    assert report.taken_over == [bad] and sorted(report.done) == [bad, "step=000000010/model.safetensors"]
    assert any(damaged in r.message and "counting it as no result" in r.message for r in caplog.records)
    assert ledger_states(spec) == {bad: ("done", 2), "step=000000010/model.safetensors": ("done", 1)}
    assert {(r["step"], r["layer"], r["status"]) for r in result_rows(spec)} == {
        (s, layer, "ok") for s in (0, 10) for layer in ("input", "fc2")
    }


def test_more_than_1000_keys_are_all_listed(s3_server, s3_bucket, endpoint):
    spec = s3_spec(s3_bucket)
    client = s3_server.client()
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: client.put_object(Bucket=s3_bucket, Key=f"ckpts/junk/{i:05d}.bin", Body=b"x"),
                range(1010),
            )
        )
    write_checkpoints(spec, steps=(1, 2))  # "step=..." sorts after "junk/...": past the first pages
    sub = CountingSubmitter()
    w = Watcher(spec, sub, page_size=100)
    requests = []
    w.checkpoints._client.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **kw: requests.append(1)
    )
    report = w.scan()
    assert len(requests) >= 11
    assert sorted(report.submitted) == [
        "step=000000001/model.safetensors",
        "step=000000002/model.safetensors",
    ]


def test_unsafe_keys_are_skipped_and_nothing_is_written_outside_the_output_prefix(
    s3_server, s3_bucket, endpoint
):
    spec = s3_spec(s3_bucket, layers={"include": ["input"]})
    write_checkpoints(spec, steps=(3,))
    client = s3_server.client()
    good = open_storage(spec.checkpoints.uri)
    blob = good.read_bytes("step=000000003/model.safetensors")
    bad_keys = ["ckpts/x/../step=000000004/model.safetensors", "ckpts//step=000000005/model.safetensors"]
    for key in bad_keys:
        client.put_object(Bucket=s3_bucket, Key=key, Body=blob)
        client.put_object(Bucket=s3_bucket, Key=key.rsplit("/", 1)[0] + "/COMPLETE", Body=b"{}")
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert set(bad_keys) <= listed  # the server kept the keys as they are
    before = listed
    report = Watcher(spec, LocalSubmitter("local")).scan()
    assert report.submitted == ["step=000000003/model.safetensors"]
    assert sorted(k for k, _ in report.rejected) == sorted(k[len("ckpts/") :] for k in bad_keys)
    after = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    new = after - before
    assert new and all(k.startswith("out/") and ".." not in k.split("/") for k in new)
    assert len(result_rows(spec)) == 1


def test_storage_outage_backs_off_logs_and_recovers(s3_server, monkeypatch, caplog):
    server = S3Server()  # its own server: a restarted moto comes back empty
    server.start()
    try:
        monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", server.endpoint)
        bucket = server.new_bucket()
        spec = s3_spec(bucket, endpoint=server.endpoint)
        write_checkpoints(spec, steps=(0,))
        w = Watcher(spec, CountingSubmitter())
        rc: list = []
        t = threading.Thread(
            target=lambda: rc.append(w.run(interval=0.2, backoff_base=0.2, backoff_cap=1.0)), daemon=True
        )
        caplog.set_level(logging.INFO, logger="probeserve")
        t.start()

        def wait_for(cond, timeout=90):
            _wait(cond, timeout, "the daemon")

        wait_for(lambda: ledger_states(spec).get("step=000000000/model.safetensors") == ("done", 1))
        server.stop()
        wait_for(lambda: sum("scan failed" in r.message for r in caplog.records) >= 2)
        failures = [r.message for r in caplog.records if "scan failed" in r.message]
        # the outage may begin in the middle of a request: then the first says the connection broke
        assert all("retrying in" in f and f"S3 endpoint {server.endpoint}" in f for f in failures), failures
        assert any("cannot reach the S3 endpoint" in f for f in failures), failures
        assert t.is_alive()
        server.start()
        server.client().create_bucket(Bucket=bucket)
        write_checkpoints(spec, steps=(0, 10))
        wait_for(lambda: ledger_states(spec).get("step=000000010/model.safetensors") == ("done", 1))
        assert any("succeeded again" in r.message for r in caplog.records)
        w.stop.set()
        t.join(30)
        assert rc == [0]
    finally:
        if "w" in locals():
            w.stop.set()  # a failed assertion must not leave the daemon looping
        server.stop()


def _wait(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(Exception):
            if cond():
                return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_mid_scan_then_restart_skips_nothing_and_submits_nothing_twice(s3_bucket, endpoint, tmp_path):
    spec = s3_spec(s3_bucket, layers={"include": ["input", "fc2"]})
    steps = (0, 1, 2, 3, 4)
    write_checkpoints(spec, steps=steps)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    health = tmp_path / "alive"
    cmd = [sys.executable, "-m", "probeserve", "watch", str(path), "--runner", "local", "--interval", "0.3"]
    cmd += ["--claim-timeout", "4", "--health-file", str(health)]
    env = {**os.environ, "PROBESERVE_S3_ENDPOINT": endpoint}
    log1 = open(tmp_path / "d1.log", "w")
    d1 = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: sum(s == "done" for s, _ in ledger_states(spec).values()) >= 2, 120, "two done")
        d1.send_signal(signal.SIGKILL)
        d1.wait(10)
    finally:
        if d1.poll() is None:
            d1.kill()
    at_kill = ledger_states(spec)
    done_before = {k for k, (s, _) in at_kill.items() if s == "done"}
    assert len(done_before) < len(steps), "the daemon finished before it could be killed"
    out = open_storage(spec.output.uri)
    stamps = {
        k: out.stat(k).mtime
        for k in results.result_keys(out, "w")
        for c in done_before
        if checkpoint_dir(c, int(c[5:14])) in k
    }
    log2 = open(tmp_path / "d2.log", "w")
    d2 = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log2, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: [s for s, _ in ledger_states(spec).values()] == ["done"] * len(steps), 180, "all done")
        d2.send_signal(signal.SIGTERM)
        assert d2.wait(60) == 0, (tmp_path / "d2.log").read_text()[-3000:]
    finally:
        if d2.poll() is None:
            d2.kill()
    final = ledger_states(spec)
    for key, (state, gen) in final.items():
        assert state == "done"
        if key in done_before:
            assert gen == 1  # a finished checkpoint was never claimed again
        else:
            assert gen <= 2  # the one in flight was taken over once, the rest claimed once
    # claims are create-only: each generation has one claim object, so one submission each
    claims = [o.key for o in out.list("ledger/") if "/claim-" in o.key]
    assert len(claims) == len(steps) + sum(g - 1 for _, g in final.values())
    rows = result_rows(spec)
    assert len(rows) == len(steps) * 2 and {r["status"] for r in rows} == {"ok"}
    assert stamps and all(out.stat(k).mtime == m for k, m in stamps.items())  # never recomputed
    assert health.exists()
    assert "SIGTERM" in (tmp_path / "d2.log").read_text()


def test_sigterm_stops_a_daemon_on_local_ray_cleanly(s3_bucket, endpoint, tmp_path):
    # the default daemon runs sweeps on a local Ray, whose start installs signal handlers of
    # its own: SIGTERM must still finish the current step and exit 0
    spec = s3_spec(s3_bucket, layers={"include": ["input"]})
    write_checkpoints(spec, steps=(0,))
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "probeserve", "watch", str(path), "--interval", "1"]
    env = {**os.environ, "PROBESERVE_S3_ENDPOINT": endpoint}
    log = open(tmp_path / "d.log", "w")
    d = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: ledger_states(spec) == {"step=000000000/model.safetensors": ("done", 1)}, 180, "done")
        d.send_signal(signal.SIGTERM)
        assert d.wait(90) == 0, (tmp_path / "d.log").read_text()[-3000:]
    finally:
        if d.poll() is None:
            d.kill()
    text = (tmp_path / "d.log").read_text()
    assert "SIGTERM: finishing the current step" in text and "SIGTERM received" not in text


def test_a_claim_that_keeps_going_stale_ends_failed_after_max_attempts(s3_bucket, endpoint):
    # its daemon died each time (for example killed for memory by this very checkpoint)
    spec = s3_spec(s3_bucket, layers={"include": ["input"]})
    write_checkpoints(spec, steps=(7,))
    key = "step=000000007/model.safetensors"
    out = open_storage(spec.output.uri)
    claim = {"checkpoint": key, "step": 7, "generation": 3, "owner": "gone:1:x", "claimed_at": time.time()}
    out.publish_bytes(claim_key("w", checkpoint_dir(key, 7), 3), json.dumps(claim).encode())
    later = time.time() + 3600
    calls = []
    report = Watcher(spec, CountingSubmitter(calls), max_attempts=3, clock=lambda: later).scan()
    assert report.failed == [key] and calls == []  # no fourth attempt
    entry = next(iter(Ledger(out, "w").read().values()))
    assert entry.status == "failed" and entry.gen == 3
    assert "gave up after 3 attempt(s): claim 3 by gone:1:x did not move" in entry.state["error"]


def test_a_sweep_that_fails_here_is_retried_and_its_error_is_kept(s3_bucket, endpoint, caplog):
    spec = s3_spec(s3_bucket, layers={"include": ["input"]})
    write_checkpoints(spec, steps=(0,))
    key = "step=000000000/model.safetensors"
    other = spec.model_copy(update={"probe": spec.probe.model_copy(update={"l2": 0.5})})

    class RunNameTakenMeanwhile(LocalSubmitter):
        """After the daemon recorded its spec, another spec takes the run name: every sweep fails."""

        def submit(self, checkpoint, spec, *, submission_id):
            record = {"spec_hash": other.hash(), "spec": other.model_dump(mode="json")}
            open_storage(spec.output.uri).publish_bytes(
                results.run_key("w", "spec.json"), json.dumps(record).encode()
            )
            return super().submit(checkpoint, spec, submission_id=submission_id)

    caplog.set_level(logging.WARNING, logger="probeserve")
    report = Watcher(spec, RunNameTakenMeanwhile("local"), max_attempts=2).scan()
    assert report.taken_over == [key] and report.failed == [key]
    entry = next(iter(Ledger(open_storage(spec.output.uri), "w").read().values()))
    assert entry.status == "failed" and entry.gen == 2
    assert "gave up after 2 attempt(s)" in entry.state["error"] and "different spec" in entry.state["error"]
    assert any("taking it over" in r.message and "different spec" in r.message for r in caplog.records)


def test_rows_of_lost_workers_are_done_again(s3_bucket, endpoint):
    spec = s3_spec(s3_bucket, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0,))
    key = "step=000000000/model.safetensors"

    class LosingAWorker(CountingSubmitter):
        def submit(self, checkpoint, spec, *, submission_id):
            super().submit(checkpoint, spec, submission_id=submission_id)
            if len(self.calls) == 1:  # the first attempt lost the worker of fc2
                sweep = Sweep(spec)
                row = sweep.failed_row(checkpoint, "fc2", 2, results.LOST + "probe actor lost", 0.0)
                results.commit(sweep.output, row)

    w = Watcher(spec, LosingAWorker(), claim_timeout=60)
    w.scan()
    assert ledger_states(spec)[key] == ("done", 2)
    assert {r["status"] for r in result_rows(spec)} == {"ok"}


def test_once_scans_submits_and_exits(s3_bucket, endpoint, tmp_path):
    spec = s3_spec(s3_bucket, layers={"include": ["input"]})
    write_checkpoints(spec, steps=(0,))
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    assert main(["watch", str(path), "--runner", "local", "--once"]) == 0
    assert ledger_states(spec) == {"step=000000000/model.safetensors": ("done", 1)}
    assert main(["watch", str(path), "--runner", "local", "--once"]) == 0
    assert ledger_states(spec) == {"step=000000000/model.safetensors": ("done", 1)}


class FakeJobClient:
    """The two calls RayJobSubmitter makes of ray.job_submission.JobSubmissionClient."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.submits = 0
        self._lock = threading.Lock()  # the real API decides "already exists" atomically

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        with self._lock:
            self.submits += 1
            if submission_id in self.jobs:
                raise RuntimeError(f"Job with submission_id {submission_id} already exists.")
            self.jobs[submission_id] = {}
        files = sorted(
            os.path.relpath(os.path.join(d, f), runtime_env["working_dir"])
            for d, _, fs in os.walk(runtime_env["working_dir"])
            for f in fs
        )
        spec = open(os.path.join(runtime_env["working_dir"], "spec.yaml")).read()
        self.jobs[submission_id] = {
            "entrypoint": entrypoint,
            "files": files,
            "spec": spec,
            "status": "RUNNING",
        }
        return submission_id

    def get_job_info(self, sid):
        if sid not in self.jobs:
            raise RuntimeError(f"Job {sid} does not exist.")

        class Info:
            status = self.jobs[sid].get("status", "PENDING")
            message = "exit 1" if status == "FAILED" else None

        return Info()


def run_job_here(job: dict, tmp_path) -> None:
    """Runs a fake job's sweep in-process, as its entrypoint would on a cluster."""
    path = tmp_path / "job-spec.yaml"
    path.write_text(job["spec"])
    sets = job["entrypoint"].split(" --set ")[1:]
    assert main(["run", str(path), "--runner", "local", *(a for x in sets for a in ("--set", x))]) == 0


def test_ray_job_submitter_submits_once_and_follows_the_job(s3_bucket, endpoint, tmp_path):
    spec = s3_spec(s3_bucket)
    write_checkpoints(spec, steps=(7,))
    client = FakeJobClient()
    w = Watcher(spec, RayJobSubmitter("http://127.0.0.1:8265", client=client))
    assert w.scan().submitted == ["step=000000007/model.safetensors"]
    ((sid, job),) = client.jobs.items()
    assert sid == submission_id("w", "step=000000007/model.safetensors", 1)
    # the job module ships in the package: nothing is taken from a source checkout
    assert job["entrypoint"].startswith("python -m probeserve.job spec.yaml")
    assert "--set checkpoints.steps=[7]" in job["entrypoint"]
    assert "--set output.keep_activations=false" in job["entrypoint"]  # the spec's value
    assert job["files"] == ["spec.yaml"]
    assert endpoint in job["spec"] and "secret" not in job["spec"].lower()
    assert ledger_states(spec) == {"step=000000007/model.safetensors": ("submitted", 1)}
    assert w.scan().submitted == []  # running: left alone
    run_job_here(job, tmp_path)  # what the cluster would do with it
    client.jobs[sid]["status"] = "SUCCEEDED"
    assert w.scan().done == ["step=000000007/model.safetensors"]
    assert ledger_states(spec) == {"step=000000007/model.safetensors": ("done", 1)}
    assert len(client.jobs) == 1


def test_a_claim_whose_job_never_reached_the_job_api_is_submitted_at_once(s3_bucket, endpoint):
    spec = s3_spec(s3_bucket)
    write_checkpoints(spec, steps=(7,))
    key = "step=000000007/model.safetensors"
    claim = {"checkpoint": key, "step": 7, "generation": 1, "owner": "gone:1:x", "claimed_at": time.time()}
    out = open_storage(spec.output.uri)
    out.publish_bytes(claim_key("w", checkpoint_dir(key, 7), 1), json.dumps(claim).encode())
    client = FakeJobClient()
    daemons = [Watcher(spec, RayJobSubmitter("http://127.0.0.1:8265", client=client)) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:  # both may submit: the deterministic id makes it one job
        list(pool.map(lambda w: w.scan(), daemons))
    assert list(client.jobs) == [submission_id("w", key, 1)]
    assert ledger_states(spec) == {key: ("submitted", 1)}


@pytest.mark.parametrize("end", ["FAILED", "SUCCEEDED"])
def test_a_job_that_ends_without_its_rows_is_resubmitted_then_given_up(s3_bucket, endpoint, caplog, end):
    # a job that died, or one that says it succeeded but committed no row: not done either way
    key = "step=000000007/model.safetensors"
    spec = s3_spec(s3_bucket)
    write_checkpoints(spec, steps=(7,))
    client = FakeJobClient()
    w = Watcher(spec, RayJobSubmitter("http://127.0.0.1:8265", client=client), max_attempts=2)
    w.scan()
    client.jobs[submission_id("w", key, 1)]["status"] = end
    caplog.set_level(logging.INFO, logger="probeserve")
    report = w.scan()  # the next generation takes over
    assert report.done == [] and report.taken_over == [key] and len(client.jobs) == 2
    verb = "succeeded" if end == "SUCCEEDED" else "died"
    assert any(
        f"{verb} without committing input, fc1, act, fc2" in r.message  # the daemon recorded the layers
        for r in caplog.records
    )
    client.jobs[submission_id("w", key, 2)]["status"] = end
    report = w.scan()  # out of attempts: failed for good, saying what is missing
    assert report.failed == [key] and len(client.jobs) == 2
    entry = next(iter(Ledger(open_storage(spec.output.uri), "w").read().values()))
    assert entry.status == "failed" and "gave up after 2" in entry.state["error"]
    assert "no result for" in entry.state["error"]


def test_local_ray_sweep_for_one_checkpoint(s3_bucket, endpoint):
    ray = pytest.importorskip("ray")
    spec = s3_spec(s3_bucket, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0, 4))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        w = Watcher(spec, LocalSubmitter("ray"), policy="newest")
        assert w.scan().done == ["step=000000004/model.safetensors"]
    finally:
        ray.shutdown()
    rows = result_rows(spec)
    assert [(r["step"], r["status"]) for r in rows] == [(4, "ok"), (4, "ok")]


LIST_JOBS = """
import json, sys
from ray.job_submission import JobSubmissionClient
print(json.dumps({j.submission_id: j.status.value for j in JobSubmissionClient(sys.argv[1]).list_jobs()}))
"""


@pytest.mark.skipif(not os.path.exists(RAY_CLI), reason="ray CLI not installed beside this python")
def test_watch_submits_ray_jobs_through_a_real_job_api(s3_bucket, endpoint, tmp_path):
    pytest.importorskip("ray")
    spec = s3_spec(s3_bucket, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0, 3))
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    keys = ["step=000000000/model.safetensors", "step=000000003/model.safetensors"]
    with ray_head(tmp_path) as head:
        # the job agent starts a while after the dashboard: the first submits may fail, and
        # the daemon must back off and submit the same ids again
        cmd = [sys.executable, "-m", "probeserve", "watch", str(path), "--address", head.address]
        no_token = {**head.env, "RAY_AUTH_MODE": "disabled"}
        refused = subprocess.run(
            [*cmd, "--once"], cwd=tmp_path, env=no_token, capture_output=True, text=True, timeout=120
        )
        assert refused.returncode == 1 and "set RAY_AUTH_MODE=token" in refused.stderr, refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr
        log = tmp_path / "watch.log"
        with open(log, "w") as out:
            daemon = subprocess.Popen(
                [*cmd, "--interval", "1"], cwd=tmp_path, env=head.env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            _wait(
                lambda: set(ledger_states(spec).values()) == {("done", 1)} and len(ledger_states(spec)) == 2,
                300,
                "both done",
            )
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(60) == 0, log.read_text()[-3000:]
        finally:
            if daemon.poll() is None:
                daemon.kill()
        # a second daemon, --once, on the same bucket: nothing is submitted again
        again = subprocess.run(
            [*cmd, "--once"], cwd=tmp_path, env=head.env, capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 0, again.stderr[-3000:]
        # ask the job API from a process with the client's environment (token auth on)
        listing = subprocess.run(
            [sys.executable, "-c", LIST_JOBS, head.address],
            env=head.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listing.returncode == 0, listing.stderr[-3000:]
        jobs = json.loads(listing.stdout)
    assert set(jobs) == {submission_id("w", k, 1) for k in keys}  # one deterministic job each
    assert set(jobs.values()) == {"SUCCEEDED"}
    rows = result_rows(spec)
    assert sorted((r["step"], r["layer"], r["status"]) for r in rows) == [
        (0, "fc2", "ok"),
        (0, "input", "ok"),
        (3, "fc2", "ok"),
        (3, "input", "ok"),
    ]
    out = open_storage(spec.output.uri)
    assert not [o.key for o in out.list("activations/")]  # as the spec says: shards deleted


# ---- what a user meets from the command line ----

PROBESERVE = os.path.join(os.path.dirname(sys.executable), "probeserve")  # the installed script


def test_a_daemon_whose_spec_cannot_work_stops_at_once_and_claims_nothing(
    s3_bucket, endpoint, tmp_path, capsys
):
    spec = s3_spec(s3_bucket, layers={"include": ["input"]})
    write_checkpoints(spec, steps=(0, 1))
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    other = spec.model_copy(update={"probe": spec.probe.model_copy(update={"l2": 0.5})})
    Sweep(other).record_spec()  # the run name is bound to another spec
    assert main(["watch", str(path), "--runner", "local"]) == 2  # not a loop of failing scans
    err = capsys.readouterr().err
    assert "different spec" in err and "Traceback" not in err
    assert ledger_states(spec) == {}  # no checkpoint claimed, so none ends failed for good
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {**spec.model_dump(mode="json"), "run": "x", "model": {"factory": "tiny", "kwargs": {"hiden": 3}}}
        )
    )
    assert main(["watch", str(bad), "--runner", "local"]) == 2
    assert "model.kwargs" in capsys.readouterr().err


def test_status_counts_every_checkpoint_of_a_run_made_by_watch(tmp_path):
    # `status` and the report read the run's recorded spec: it must say what the daemon covers,
    # not `steps: [N]`, the restriction of the daemon's first sweep
    spec = tiny_spec(tmp_path, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0, 10, 20))
    (tmp_path / "spec.json").write_text(json.dumps(spec.model_dump(mode="json")))

    def cli(*args):
        proc = subprocess.run([PROBESERVE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    cli("watch", "spec.json", "--runner", "local", "--once")
    assert cli("status", "out").splitlines()[2].split() == ["t", "3", "6", "6", "0", "0", "0"]
    recorded = json.loads((tmp_path / "out" / "runs" / "t" / "spec.json").read_text())
    assert recorded["spec"]["checkpoints"]["steps"] is None
    write_checkpoints(spec, steps=(30,))  # a new checkpoint the daemon has not seen yet: pending
    assert cli("status", "out").splitlines()[2].split() == ["t", "4", "8", "6", "0", "0", "2"]
    # a record an older daemon made (its first sweep's `steps: [0]`) still counts every
    # checkpoint with rows, and the daemon's next start records what it covers
    recorded["spec"]["checkpoints"]["steps"] = [0]
    (tmp_path / "out" / "runs" / "t" / "spec.json").write_text(json.dumps(recorded))
    assert cli("status", "out").splitlines()[2].split() == ["t", "3", "6", "6", "0", "0", "0"]
    cli("watch", "spec.json", "--runner", "local", "--once")
    assert cli("status", "out").splitlines()[2].split() == ["t", "4", "8", "8", "0", "0", "0"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_daemon_started_before_the_checkpoint_prefix_exists_waits_without_backoff(where, tmp_path, request):
    layers = {"include": ["input"]}
    if where == "s3":
        request.getfixturevalue("endpoint")  # the daemon and this test find the server through the env
        bucket = request.getfixturevalue("s3_bucket")
        spec = tiny_spec(
            tmp_path,
            layers=layers,
            checkpoints={"uri": f"s3://{bucket}/not/yet"},
            output={"uri": f"s3://{bucket}/out"},
        )
    else:
        spec = tiny_spec(tmp_path, layers=layers, checkpoints={"uri": str(tmp_path / "not" / "yet")})
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    log = tmp_path / "watch.log"
    with open(log, "w") as sink:
        daemon = subprocess.Popen(
            [PROBESERVE, "watch", str(path), "--runner", "local", "--interval", "0.3"],
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait(lambda: "scan" in log.read_text() or "waiting" in log.read_text(), 120, "its first scan")
        time.sleep(3)  # ten scans or so of a prefix that does not exist yet
        write_checkpoints(spec, steps=(0,))
        _wait(lambda: ledger_states(spec) == {"step=000000000/model.safetensors": ("done", 1)}, 120, "done")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    text = log.read_text()
    assert "scan failed" not in text, text[-3000:]
    assert text.count("waiting for the first checkpoint") == 1, text[-3000:]


class KeepingJobClient(FakeJobClient):
    """Also keeps each job's working folder, as Ray's job agent keeps its copy of it."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        sid = super().submit_job(
            entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env, metadata=metadata
        )
        self.jobs[sid]["copy"] = shutil.copytree(runtime_env["working_dir"], self.root / sid)
        return sid


def test_ray_jobs_carry_the_model_beside_the_spec_and_absolute_paths(tmp_path, monkeypatch):
    from probeserve.spec import load_spec

    folder = acme_folder(tmp_path / "user")  # acme_nets/zoo.py and relative paths, as a user has them
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))  # what the CLI does for the daemon
    try:
        client = KeepingJobClient(tmp_path)
        w = Watcher(load_spec("spec.json"), RayJobSubmitter("http://127.0.0.1:8265", client=client))
        key = "step=000000000/model.safetensors"
        assert w.scan().submitted == [key]
        ((sid, job),) = client.jobs.items()
        assert job["files"] == ["acme_nets/__init__.py", "acme_nets/zoo.py", "spec.yaml"]
        assert f"uri: {folder / 'out'}" in job["spec"] and f"uri: {folder / 'ckpts'}" in job["spec"]
        # what the cluster does with it: the entrypoint, in Ray's copy of the working folder
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(
            {"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}
        )
        argv = [sys.executable, *job["entrypoint"].split()[1:], "--runner", "local"]
        proc = subprocess.run(argv, cwd=job["copy"], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        client.jobs[sid]["status"] = "SUCCEEDED"
        assert w.scan().done == [key]
        rows = results.load(str(folder / "out")).to_pylist()
        assert sorted((r["layer"], r["status"]) for r in rows) == [("fc2", "ok"), ("input", "ok")]
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "acme_nets"]:
            del sys.modules[name]


def test_a_relative_data_path_is_refused_before_anything_is_submitted_as_a_ray_job(tmp_path, monkeypatch):
    from probeserve.errors import SpecError

    spec = tiny_spec(tmp_path, data={"kind": "idx", "path": "fashion-mnist"})  # relative, and in the hash
    write_checkpoints(spec, steps=(0,))
    client = FakeJobClient()
    w = Watcher(spec, RayJobSubmitter("http://127.0.0.1:8265", client=client))
    with pytest.raises(SpecError, match=r"data.path: 'fashion-mnist' is a relative path, which a Ray job"):
        w.scan()
    assert client.jobs == {} and ledger_states(spec) == {}
