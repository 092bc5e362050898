"""The watch daemon: probe every checkpoint a training job writes, exactly once, with no database.

Each scan lists the checkpoint prefix in full (paginated; never a cursor, so a key written
"behind" the last one seen is still found), keeps the complete checkpoints (marker written
last, or size and mtime unchanged across scans `stable_seconds` apart), and submits one sweep
per new checkpoint, restricted to that checkpoint's step.

Exactly once comes from a ledger in the output storage (`probeserve/ledger.py`), not from
the daemon's memory: per checkpoint, create-only claims and the state of the newest one.
Before its first scan the daemon resolves its spec (model, data, layers) and records it as the
run's spec: a spec that cannot work stops the daemon (exit 2) instead of failing every
checkpoint, and the run's record says what the daemon covers, not the one step each of its
sweeps is restricted to. A daemon that submits Ray jobs does that in a child process, the one
time it needs torch: the daemon itself imports neither torch nor the model, and stays small.

A daemon submits a checkpoint only after *creating* claim generation 1, and create-only writes
have one winner, so two daemons on one bucket never both submit it. A claim whose job died (the
submitter says failed without every layer having a committed row, or it does not know the
job and nobody has updated the ledger for `claim_timeout` seconds) is taken over by creating
the next generation's claim, create-only again. Submission ids are deterministic (run,
checkpoint key, generation), so a daemon that died between claiming and recording can still
find the job it started. A sweep that ran and committed a row for every layer, some failed
(a corrupt checkpoint, say), ends `failed` for good with the error; results already committed
are never recomputed, because the sweep itself skips committed items.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol

from probeserve import layout, results
from probeserve.checkpoints import Checkpoint, discover
from probeserve.errors import (
    CheckpointError,
    DataError,
    LayerError,
    ModelError,
    ProbeserveError,
    SpecError,
    StorageError,
)
from probeserve.ledger import Ledger, LedgerEntry, submission_id
from probeserve.spec import SweepSpec, dump_spec, load_spec, spec_from_dict
from probeserve.storage import open_storage

log = logging.getLogger("probeserve.watch")

JobState = Literal["running", "succeeded", "failed", "unknown"]
Policy = Literal["all", "newest"]


# ---------------------------------------------------------------------------- submitters


class Submitter(Protocol):
    """Starts the sweep of one checkpoint and reports on it later.

    `submit` must be idempotent for one `submission_id`: submitting an id that already exists
    is not an error (the daemon may have died after submitting, before recording it).
    """

    synchronous: bool  # True: submit() returns only when the sweep has finished

    def submit(self, checkpoint: Checkpoint, spec: SweepSpec, *, submission_id: str) -> str: ...
    def state(self, submission_id: str) -> JobState: ...
    def error(self, submission_id: str) -> str | None: ...


def spec_for_checkpoint(spec: SweepSpec, ckpt: Checkpoint) -> SweepSpec:
    """The sweep spec restricted to one checkpoint's step.

    A relative local `checkpoints.uri` or `output.uri` is made absolute, against the daemon's
    working folder: a Ray job runs in a copy of its working folder, where a relative output
    would vanish. (Data paths stay as they are: they are part of the spec's hash.)"""
    data = spec.model_dump(mode="json")
    for section in (data["checkpoints"], data["output"]):
        if is_relative_local(section["uri"]):
            section["uri"] = os.path.abspath(section["uri"])
    data["checkpoints"]["steps"] = [ckpt.step]
    data["checkpoints"]["completeness"] = "none"  # the daemon has decided completeness already
    if spec.storage.resolved_endpoint():  # a job elsewhere has no $PROBESERVE_S3_ENDPOINT
        data["storage"]["s3_endpoint"] = spec.storage.resolved_endpoint()
    return spec_from_dict(data, source=f"spec for {ckpt.key}")


def local_path_fields(data: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """(field path, section, name) of every spec field that can hold a local path."""
    fields = [("checkpoints.uri", data["checkpoints"], "uri"), ("output.uri", data["output"], "uri")]
    for name in ("path", "uri"):
        if data["data"].get(name):
            fields.append((f"data.{name}", data["data"], name))
    return fields


def is_relative_local(uri: str) -> bool:
    """A plain path that is not absolute (`s3://`, `file:///...` and absolute paths are not)."""
    return "://" not in uri and not os.path.isabs(uri)


def _user_package(factory: str) -> str | None:
    """The folder or file in the working folder that holds a `module:function` factory's
    top-level package, or None (a built-in model, or one that is installed)."""
    module = factory.partition(":")[0] if ":" in factory else ""
    top = module.split(".")[0]
    if not top:
        return None
    for candidate in (top, top + ".py"):
        path = os.path.join(os.getcwd(), candidate)
        if os.path.isdir(path) or os.path.isfile(path):
            return path
    return None


class LocalSubmitter:
    """Runs the sweep right here, before `submit` returns: in-process, or on a local Ray."""

    synchronous = True

    def __init__(self, runner: Literal["local", "ray"] = "local") -> None:
        self.runner = runner
        self._done: dict[str, tuple[JobState, str | None]] = {}

    def submit(self, checkpoint: Checkpoint, spec: SweepSpec, *, submission_id: str) -> str:
        if submission_id in self._done:
            return submission_id
        try:
            if self.runner == "local":
                from probeserve.runners.local import run_local

                summary = run_local(spec)
            else:
                from probeserve.runners.ray import run_ray

                summary = run_ray(spec)
        except ProbeserveError as e:
            self._done[submission_id] = ("failed", str(e))
            return submission_id
        if summary.failed:
            first = summary.failed[0]
            more = f" (and {len(summary.failed) - 1} more)" if len(summary.failed) > 1 else ""
            self._done[submission_id] = ("failed", f"{first[1]}: {first[2]}{more}")
        else:
            self._done[submission_id] = ("succeeded", None)
        return submission_id

    def state(self, submission_id: str) -> JobState:
        # a sweep of another process (or of this one before a restart) is unknown here
        return self._done.get(submission_id, ("unknown", None))[0]

    def error(self, submission_id: str) -> str | None:
        return self._done.get(submission_id, ("unknown", None))[1]


JOB_MODULE = "probeserve.job"  # the Ray job entrypoint, inside the package


class RayJobSubmitter:
    """Submits each checkpoint's sweep as a Ray job through the job-submission API.

    The job's working directory is a small folder made per submission: the resolved spec
    (restricted to the checkpoint, relative local paths made absolute) and the package of a
    `model.factory` that lives in the daemon's working folder rather than being installed
    (`acme_nets/` for `acme_nets.zoo:build`); Ray puts the job's working directory on every
    worker's import path. The entrypoint is the job module inside the package,
    `python -m probeserve.job` (`probeserve/job.py`), so the cluster's image must have
    probeserve installed, and nothing is looked for in a source checkout. No credentials travel: runtime_env is readable by anyone who can read the job
    API, so S3 credentials must come from the cluster's own environment.
    """

    synchronous = False

    def __init__(self, address: str, *, client: Any = None) -> None:
        self.address = address
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address)
            except Exception as e:
                self._raise(e, "cannot reach the Ray job API")
        return self._client

    def _raise(self, e: Exception, what: str) -> NoReturn:
        if type(e).__name__ == "AuthenticationError":  # ray.exceptions: a token is wanted
            raise ProbeserveError(
                f"--address {self.address}: the Ray job API refused this client (token authentication): "
                "set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                "or ~/.ray/auth_token"
            ) from None
        if isinstance(e, (ConnectionError, RuntimeError, ValueError)):
            raise ProbeserveError(f"--address {self.address}: {what}: {e}") from None
        raise e

    def check_spec(self, spec: SweepSpec) -> None:
        """Refuse what a job cannot run: a relative data path would be looked for in the job's
        copy of its working folder. (It is not made absolute, as the other paths are, because
        data paths are part of the spec's hash.) The daemon asks before it claims anything."""
        for field_path, section, name in local_path_fields(spec.model_dump(mode="json")):
            if field_path.startswith("data.") and is_relative_local(section[name]):
                raise SpecError(
                    [
                        f"{field_path}: {section[name]!r} is a relative path, which a Ray job would look "
                        "for in its copy of the working folder; give an absolute path or s3://"
                    ]
                )

    def submit(self, checkpoint: Checkpoint, spec: SweepSpec, *, submission_id: str) -> str:
        self.check_spec(spec)
        if self.state(submission_id) != "unknown":
            return submission_id  # submitted before a restart: the same deterministic id
        tmp = tempfile.mkdtemp(prefix="probeserve-job-")
        try:
            Path(tmp, "spec.yaml").write_text(dump_spec(spec))
            entrypoint = f"python -m {JOB_MODULE} spec.yaml"
            package = _user_package(spec.model.factory)
            if package and os.path.isdir(package):
                shutil.copytree(
                    package,
                    os.path.join(tmp, os.path.basename(package)),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                )
            elif package:
                shutil.copyfile(package, os.path.join(tmp, os.path.basename(package)))
            entrypoint += f" --set checkpoints.steps=[{checkpoint.step}]"
            entrypoint += f" --set output.keep_activations={str(spec.output.keep_activations).lower()}"
            try:
                self.client.submit_job(
                    entrypoint=entrypoint,
                    submission_id=submission_id,
                    runtime_env={"working_dir": tmp},
                    metadata={"probeserve.run": spec.run, "probeserve.checkpoint": checkpoint.key},
                )
            except Exception as e:
                if not (isinstance(e, RuntimeError) and "already exists" in str(e)):
                    self._raise(e, "submit failed")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return submission_id

    def _info(self, submission_id: str) -> Any:
        try:
            return self.client.get_job_info(submission_id)
        except Exception as e:
            if isinstance(e, RuntimeError) and ("does not exist" in str(e) or "404" in str(e)):
                return None
            self._raise(e, "job status")

    def state(self, submission_id: str) -> JobState:
        info = self._info(submission_id)
        if info is None:
            return "unknown"
        status = str(getattr(info.status, "value", info.status)).upper()
        if status in ("PENDING", "RUNNING"):
            return "running"
        if status == "SUCCEEDED":
            return "succeeded"
        return "failed"  # FAILED, STOPPED

    def error(self, submission_id: str) -> str | None:
        info = self._info(submission_id)
        return None if info is None else (info.message or None)


def _some(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------------------- the run's record


def record_here(spec: SweepSpec) -> None:
    """Resolve the spec (model, data, layers) and record it as its run's spec, in this process."""
    from probeserve.sweep import Sweep

    Sweep(spec).record_spec(run_level=True)


# The errors a child reports by name are raised again as themselves, so the daemon tells a spec
# that cannot work (stop, exit 2) from storage that is down (back off, retry) as it does here.
_CHILD_ERRORS: dict[str, type[ProbeserveError]] = {
    cls.__name__: cls
    for cls in (CheckpointError, DataError, LayerError, ModelError, StorageError, results.LayoutError)
}


def record_elsewhere(spec: SweepSpec) -> None:
    """`record_here` in a child process of this Python: the spec resolved there, its errors
    raised here as the same types, its log on this process's stderr.

    Resolving a spec builds the model and opens the data, which loads torch (hundreds of MB)
    for good; a daemon that only submits jobs has no other use for it."""
    with tempfile.TemporaryDirectory(prefix="probeserve-record-") as tmp:
        spec_path, outcome_path = os.path.join(tmp, "spec.yaml"), os.path.join(tmp, "outcome.json")
        Path(spec_path).write_text(dump_spec(spec))
        code = "import sys; from probeserve.watch import record_main; sys.exit(record_main(sys.argv[1:]))"
        proc = subprocess.run([sys.executable, "-c", code, spec_path, outcome_path], stdin=subprocess.DEVNULL)
        try:
            outcome = json.loads(Path(outcome_path).read_text())
        except (OSError, ValueError):
            raise ProbeserveError(
                f"recording run {spec.run}'s spec: the process that resolves it ended with exit status "
                f"{proc.returncode} (killed, or out of memory?) and no answer"
            ) from None
    kind = outcome.get("error")
    if kind is None:
        return
    if kind == "SpecError":
        raise SpecError(outcome["errors"], source=outcome["source"])
    raise _CHILD_ERRORS.get(kind, ProbeserveError)(outcome["message"])


def record_main(argv: Sequence[str]) -> int:
    """The child of `record_elsewhere`: SPEC_PATH OUTCOME_PATH. Writes {"error": null} or the
    error's type and message to OUTCOME_PATH; its exit status says only that it got there."""
    spec_path, outcome_path = argv
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    outcome: dict[str, Any] = {"error": None}
    try:
        record_here(load_spec(spec_path))
    except SpecError as e:
        outcome = {"error": "SpecError", "errors": e.errors, "source": e.source}
    except ProbeserveError as e:
        outcome = {"error": type(e).__name__, "message": str(e)}
    except Exception as e:  # a bug or an environment problem: a failed scan, retried
        outcome = {"error": "Exception", "message": f"recording the run's spec: {type(e).__name__}: {e}"}
    Path(outcome_path).write_text(json.dumps(outcome))
    return 0


# ---------------------------------------------------------------------------- the daemon


@dataclass
class ScanReport:
    """What one scan saw and did."""

    complete: int = 0
    waiting: list[str] = field(default_factory=list)  # not complete yet
    rejected: list[tuple[str, str]] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    taken_over: list[str] = field(default_factory=list)


class Watcher:
    """One daemon: scans, claims, submits and follows up, with state only in storage.

    The previous scan's sizes and mtimes are the only thing held in memory, for
    `completeness: stable_size`; a restarted daemon simply waits `stable_seconds` again.
    """

    def __init__(
        self,
        spec: SweepSpec,
        submitter: Submitter,
        *,
        policy: Policy = "all",
        claim_timeout: float = 600.0,
        max_attempts: int = 3,
        page_size: int = 1000,
        health_file: str | None = None,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if policy not in ("all", "newest"):
            raise ProbeserveError(f"--policy {policy}: expected all or newest")
        if claim_timeout <= 0:
            raise ProbeserveError("--claim-timeout must be > 0 seconds")
        self.spec = spec
        self.submitter = submitter
        self.policy = policy
        self.claim_timeout = claim_timeout
        self.max_attempts = max_attempts
        self.page_size = page_size
        self.health_file = health_file
        self.clock = clock
        endpoint = spec.storage.resolved_endpoint()
        self.checkpoints = open_storage(spec.checkpoints.uri, s3_endpoint=endpoint)
        self.output = open_storage(spec.output.uri, s3_endpoint=endpoint)
        self.ledger = Ledger(self.output, spec.run, owner=owner, clock=clock, page_size=page_size)
        self.owner = self.ledger.owner
        self._seen: dict[str, tuple[int, float, float]] = {}  # key -> (size, mtime, first seen)
        self._reported: set[str] = set()
        self._recorded = False  # the run's spec is recorded (once per daemon)
        self._said_empty = False  # "no checkpoints yet" was logged (once until some appear)
        self.stop = threading.Event()

    def record_run(self) -> None:
        """Resolve the spec and record it as the run's spec, once, before anything is claimed.

        A spec that cannot work (model, data, layers, a run name bound to another spec, an
        output in an older layout) raises here, so the daemon stops with exit 2 rather than
        claim every checkpoint and fail it. Recording the daemon's own spec keeps its sweeps'
        restriction to one step out of the run's record, which `probeserve status` and the
        report read to count the checkpoints the run covers.

        A daemon that runs its sweeps itself has torch loaded for them anyway, and records
        here. One that submits jobs elsewhere records in a child process (`record_elsewhere`),
        so that it never loads torch and the model itself: it runs for weeks in a small pod.
        """
        if self._recorded:
            return
        check = getattr(self.submitter, "check_spec", None)  # what only this submitter refuses
        if check is not None:
            check(self.spec)
        if self.submitter.synchronous:
            record_here(self.spec)
        else:
            record_elsewhere(self.spec)
        if self.spec.output.keep_activations:
            log.info(
                "output.keep_activations is true: every checkpoint's activation shards are kept once it is "
                "probed; set it to false in the spec to delete them"
            )
        self._recorded = True

    # -- discovery

    def find_checkpoints(self, report: ScanReport) -> list[Checkpoint]:
        spec = self.spec.checkpoints
        stable = spec.completeness == "stable_size"
        disc_spec = spec.model_copy(update={"completeness": "none"}) if stable else spec
        if not self.checkpoints.root_exists():
            # a local folder the training job has not created yet (an S3 prefix that does not
            # exist yet just lists empty; a missing bucket is still an error): no checkpoints
            # yet, not a failed scan, so the first checkpoint is not kept waiting by a backoff
            bucket = getattr(self.checkpoints, "bucket", None)
            if bucket:  # S3's root_exists is the bucket's: a training job never creates one
                raise StorageError(
                    f"checkpoints.uri: bucket {bucket!r} does not exist ({self.checkpoints.uri})"
                )
            self._say_empty(f"{self.checkpoints.uri} does not exist yet")
            return []
        found = discover(self.checkpoints, disc_spec, page_size=self.page_size)
        if not found.complete and not found.incomplete and not found.rejected:
            self._say_empty(f"no checkpoints under {self.checkpoints.uri} yet")
        else:
            self._said_empty = False
        for key, why in found.rejected:
            report.rejected.append((key, why))
            if key not in self._reported:
                self._reported.add(key)
                log.warning("ignoring checkpoint key %r: %s", key, why)
        report.waiting = [c.key for c in found.incomplete]
        complete = list(found.complete)
        if stable:
            now = self.clock()
            seen, complete = self._seen, []
            self._seen = {}
            for c in found.complete:
                size, mtime, first = seen.get(c.key, (c.size, c.mtime, now))
                if (size, mtime) != (c.size, c.mtime):
                    first = now  # changed since the last scan: start over
                self._seen[c.key] = (c.size, c.mtime, first)
                if now - first >= spec.stable_seconds and c.key in seen:
                    complete.append(c)
                else:
                    report.waiting.append(c.key)
        report.complete = len(complete)
        if self.policy == "newest" and complete:
            complete = [max(complete, key=lambda c: (c.step, c.key))]
        return complete

    def _say_empty(self, what: str) -> None:
        if not self._said_empty:
            log.info("checkpoints.uri: %s; waiting for the first checkpoint", what)
            self._said_empty = True

    # -- results

    def _committed(self, ckpt: Checkpoint) -> tuple[list[str], str | None]:
        """(selected layers without a committed row, the first failed row's error)."""
        layers_key = layout.run_key(self.spec.run, "layers.json")
        if self.output.stat(layers_key) is None:
            return ["(every layer: the sweep never started)"], None
        layers = [x["layer"] for x in results.read_json(self.output, layers_key)]
        prefix = layout.results_prefix(self.spec.run, ckpt.key, ckpt.step)
        seen, error = set(), None
        for obj in self.output.list(prefix, page_size=self.page_size):
            layer = layout.layer_from_file(obj.key.rsplit("/", 1)[-1])
            if layer not in layers:
                continue
            row = results.read_row_file(self.output, obj.key)
            if row is None:  # damaged: no result, so the checkpoint is done again
                continue
            if row["status"] != "ok" and (row["error"] or "").startswith(results.LOST):
                continue  # its worker was lost, not its answer: done again, under --max-attempts
            seen.add(layer)
            if row["status"] != "ok" and error is None:
                error = f"{layer}: {row['error']}"
        return [x for x in layers if x not in seen], error

    # -- one checkpoint

    def _record(self, ckpt: Checkpoint, gen: int, state: str, error: str | None = None) -> None:
        self.ledger.record(ckpt.key, ckpt.step, gen, state, error)

    def _submit(self, ckpt: Checkpoint, gen: int, report: ScanReport) -> None:
        sid = self.ledger.submission_id(ckpt.key, gen)
        spec = spec_for_checkpoint(self.spec, ckpt)
        log.info("step %d (%s): submitting %s", ckpt.step, ckpt.key, sid)
        if not self.submitter.synchronous:
            self.submitter.submit(ckpt, spec, submission_id=sid)
            self._record(ckpt, gen, "submitted")
            report.submitted.append(ckpt.key)
            return
        self._record(ckpt, gen, "submitted")
        report.submitted.append(ckpt.key)
        with self.ledger.refreshing(ckpt.key, ckpt.step, gen, every=self.claim_timeout / 4):
            self.submitter.submit(ckpt, spec, submission_id=sid)
        if self._follow_up(ckpt, gen, sid, self.submitter.state(sid), report):
            self._take_over(ckpt, gen, report)  # it ran here and left rows missing: next generation

    def _take_over(self, ckpt: Checkpoint, gen: int, report: ScanReport, why: str | None = None) -> None:
        """Claim generation `gen + 1` of a dead claim and submit it; past --max-attempts, the
        checkpoint ends `failed` instead (a checkpoint that kills its daemon every time, for
        example by running it out of memory, must not crash-loop it forever)."""
        if gen >= self.max_attempts:
            sid = self.ledger.submission_id(ckpt.key, gen)
            why = why or self.submitter.error(sid) or "its job died or never ran"
            error = f"gave up after {gen} attempt(s): {why}"
            self._record(ckpt, gen, "failed", error)
            report.failed.append(ckpt.key)
            log.error("step %d (%s): failed (%s): %s", ckpt.step, ckpt.key, sid, error)
            return
        if self.ledger.claim(ckpt.key, ckpt.step, gen + 1):
            report.taken_over.append(ckpt.key)
            self._submit(ckpt, gen + 1, report)

    def _follow_up(self, ckpt: Checkpoint, gen: int, sid: str, state: JobState, report: ScanReport) -> bool:
        """Record a finished job; return True when the claim is dead and may be taken over.

        A job is `done` only when every selected layer has a committed row, whatever the job
        says of itself: a job that "succeeded" without writing them is treated as one that
        died. A failed row (a corrupt checkpoint, a shape error) is a final answer: `failed`.
        """
        if state not in ("succeeded", "failed"):
            return False
        missing, error = self._committed(ckpt)
        if not missing and error is None:
            self._record(ckpt, gen, "done")
            report.done.append(ckpt.key)
            log.info("step %d (%s): done (%s)", ckpt.step, ckpt.key, sid)
            return False
        if missing and gen < self.max_attempts:
            why = self.submitter.error(sid)
            log.warning(
                "step %d (%s): job %s %s without committing %s%s; taking it over",
                ckpt.step,
                ckpt.key,
                sid,
                "succeeded" if state == "succeeded" else "died",
                _some(missing),
                f" ({why})" if why else "",
            )
            return True
        if missing:
            why = error or self.submitter.error(sid) or f"the sweep job {state}"
            error = f"gave up after {gen} attempt(s): {why}; no result for {_some(missing)}"
        self._record(ckpt, gen, "failed", error)
        report.failed.append(ckpt.key)
        log.error("step %d (%s): failed (%s): %s", ckpt.step, ckpt.key, sid, error)
        return False

    def process(self, ckpt: Checkpoint, ledger: dict[str, LedgerEntry], report: ScanReport) -> None:
        entry = ledger.get(layout.checkpoint_dir(ckpt.key, ckpt.step))
        if entry is None:
            if self.ledger.claim(ckpt.key, ckpt.step, 1):
                self._submit(ckpt, 1, report)
            return
        if entry.status in ("done", "failed"):
            return
        gen = entry.gen
        sid = self.ledger.submission_id(ckpt.key, gen)
        if entry.claim.get("owner") == self.owner and entry.state is None:
            self._submit(ckpt, gen, report)  # our own claim whose submit failed: retry it
            return
        state = self.submitter.state(sid)
        if entry.state is None and state == "unknown" and not self.submitter.synchronous:
            # its daemon died, or failed to submit, before the job reached the job API. The id
            # is deterministic and the API refuses a second job under it, so submitting it
            # here cannot run the checkpoint twice; no need to wait for the claim to time out
            log.info(
                "step %d (%s): claim %d by %s has no job yet; submitting it",
                ckpt.step,
                ckpt.key,
                gen,
                entry.claim.get("owner"),
            )
            self._submit(ckpt, gen, report)
            return
        if state == "running" and entry.state is None:
            self._record(ckpt, gen, "submitted")  # its daemon died before recording it
        dead = self._follow_up(ckpt, gen, sid, state, report)
        age = self.ledger.age(entry)
        why = None
        if state == "unknown" and age > self.claim_timeout:
            why = (
                f"claim {gen} by {entry.claim.get('owner')} did not move for "
                f"{age:.0f} s and its job {sid} is unknown"
            )
            then = "; taking it over" if gen < self.max_attempts else ""
            log.warning("step %d (%s): %s%s", ckpt.step, ckpt.key, why, then)
            dead = True
        if dead:
            self._take_over(ckpt, gen, report, why)

    # -- scans and the loop

    def scan(self) -> ScanReport:
        """One full scan: discover, read the ledger, claim/submit/follow up each checkpoint."""
        report = ScanReport()
        self.record_run()
        checkpoints = self.find_checkpoints(report)
        ledger = self.ledger.read()
        for ckpt in checkpoints:
            if self.stop.is_set():
                break
            self.process(ckpt, ledger, report)
        if self.health_file:
            Path(self.health_file).touch()
        return report

    def run(
        self,
        *,
        interval: float = 60.0,
        once: bool = False,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
    ) -> int:
        """Scan until stopped (SIGTERM/SIGINT set `self.stop`); with `once`, one scan.

        A failed scan (storage or Ray unreachable, ...) is logged with when it will be retried,
        and retried with exponential backoff up to `backoff_cap` seconds. A spec that cannot
        work, or an output in another layout, is raised at once: no retry can fix it.
        """
        failures = 0
        while not self.stop.is_set():
            try:
                report = self.scan()
            except (SpecError, ModelError, DataError, LayerError, results.LayoutError):
                raise
            except Exception as e:  # keep the daemon alive whatever one scan hits
                failures += 1
                what = str(e) if isinstance(e, ProbeserveError) else f"{type(e).__name__}: {e}"
                if once:
                    log.error("scan failed: %s", what)
                    return 1
                delay = min(backoff_cap, backoff_base * 2 ** (failures - 1))
                log.warning(
                    "scan failed (%d in a row): %s; retrying in %.1f s at %s",
                    failures,
                    what,
                    delay,
                    time.strftime("%H:%M:%S", time.localtime(time.time() + delay)),
                )
                self.stop.wait(delay)
                continue
            if failures:
                log.info("scan succeeded again after %d failure(s)", failures)
            failures = 0
            log.info(
                "scan: %d complete checkpoint(s), %d waiting, %d rejected; %d submitted, %d done, %d failed",
                report.complete,
                len(report.waiting),
                len(report.rejected),
                len(report.submitted),
                len(report.done),
                len(report.failed),
            )
            if once:
                return 0
            self.stop.wait(interval)
        log.info("stopping: the current step finished, exiting")
        return 0


__all__ = [
    "LedgerEntry",
    "LocalSubmitter",
    "RayJobSubmitter",
    "ScanReport",
    "Submitter",
    "Watcher",
    "record_elsewhere",
    "record_here",
    "spec_for_checkpoint",
    "submission_id",
]
