"""The Ray runner: the same work functions as the in-process runner, fanned out on Ray.

Per checkpoint, one extraction task (on a GPU when the cluster has one) runs the single
forward pass and writes the shards; then the pending (checkpoint, layer) items go to probe
actors, one or several of one checkpoint per call (`resources.probes_per_call`, trained
together on the actor's device); each item commits its own row. Only
small things travel through Ray (the spec, checkpoint keys, result rows); activations go
through object storage.

Faults: extraction tasks are retried (`max_retries`) and probe actors are restarted
(`max_restarts`) with their in-flight call retried (`max_task_retries`); a retried item just
commits its row again, which is harmless because an item is idempotent. If the driver dies,
Ray tears down its actors and tasks; nothing committed is lost and the next run does only
what is missing. Work is pipelined across checkpoints with at most
`resources.max_checkpoints_in_flight` checkpoints extracted but not yet fully probed, so
memory and storage use stay flat however many checkpoints there are.

This is the only module that imports ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import deque
from typing import Any

from probeserve.errors import ProbeserveError, first_line
from probeserve.progress import Progress
from probeserve.results import LOST
from probeserve.runners.base import RunSummary, group_by_checkpoint, start
from probeserve.spec import SweepSpec
from probeserve.sweep import (
    Item,
    Sweep,
    commit_unless_done,
    configure_torch,
    describe_error,
    extract_missing,
    probe_and_commit_group,
    probes_per_call,
    release_freed_memory,
)

log = logging.getLogger("probeserve")

EXTRACT_RETRIES = 2  # a killed extraction worker is retried this many times
ACTOR_RESTARTS = 2  # a killed probe actor is restarted this many times...
ACTOR_TASK_RETRIES = 2  # ...and the call it was running is retried
IDLE_RELEASE_S = 30.0  # an idle probe actor is released after this long while extractions wait

_sweeps: dict[str, Sweep] = {}


def _worker_sweep(spec: SweepSpec) -> Sweep:
    """One `Sweep` per spec per worker process, so datasets and storage clients are reused."""
    key = spec.model_dump_json()
    if key not in _sweeps:
        _sweeps.clear()
        _sweeps[key] = Sweep(spec)
    return _sweeps[key]


def _device(spec: SweepSpec, gpus: float) -> str:
    from probeserve.probe import resolve_device

    if spec.resources.device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    return resolve_device(spec.resources.device)


def _extract(spec: SweepSpec, items: list[Item], gpus: float) -> dict[str, str]:
    configure_torch(spec)
    sweep = _worker_sweep(spec)
    try:
        return extract_missing(sweep, items, device=_device(spec, gpus))
    finally:  # the worker waits to be reused: it should not hold the extraction's peak heap
        release_freed_memory()


class _ProbeActor:
    """Trains probes, one or several (checkpoint, layer) items of one checkpoint per call
    (`resources.probes_per_call`, trained together), and commits each item's row itself."""

    def __init__(self, spec: SweepSpec, gpus: float) -> None:
        self.spec = spec
        self.gpus = gpus
        configure_torch(spec)

    def pid(self) -> int:
        return os.getpid()

    def probe(self, items: list[Item]) -> list[dict[str, Any]]:
        return probe_and_commit_group(_worker_sweep(self.spec), items, device=_device(self.spec, self.gpus))


def _check_reachable(address: str, timeout: float = 5.0, *, given: str | None = None) -> None:
    """Fail fast: ray.init keeps retrying an address nobody listens on. `given` is what the
    user wrote, when `address` was resolved from it (`auto`)."""
    import socket

    given = given or address
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ProbeserveError(
            f"--address {given}: expected auto, host:port or ray://host:port, got {address}"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or str(e)
        if given == address:
            raise ProbeserveError(
                f"--address {given}: cannot connect to a Ray cluster: nothing answers at {host}:{port} ({why})"
            ) from None
        source = "$RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "Ray's ray_current_cluster file"
        raise ProbeserveError(
            f"--address {given}: cannot connect to a Ray cluster: nothing answers at {host}:{port}, the address "
            f"in {source} ({why}); that cluster is gone: start one with `ray start --head`, or leave out "
            "--address to start a local Ray"
        ) from None


def check_address(address: str) -> None:
    """That something listens at `address` ("auto": at what it resolves to); see `connect`."""
    _check_reachable(_auto_address() if address == "auto" else address, given=address)


def _auto_address() -> str:
    """The cluster `--address auto` means: $RAY_ADDRESS, else the one `ray start` recorded.

    Resolved here so that it can be checked: a cluster started with `ray start --head` and
    then killed leaves its address in Ray's temp folder (`ray_current_cluster`), and
    ray.init retries a dead address for many minutes.
    """
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return env
    recorded = None
    try:  # Ray's own reader, so that RAY_TMPDIR and friends are honoured as Ray does
        from ray._private.services import find_bootstrap_address

        recorded = find_bootstrap_address(None)
    except Exception:  # a Ray whose internals moved: fall back to the documented default
        path = os.path.join(os.environ.get("RAY_TMPDIR") or "/tmp", "ray", "ray_current_cluster")
        with contextlib.suppress(OSError):
            with open(path) as f:
                recorded = f.read().strip()
    if not recorded:
        raise ProbeserveError(
            "--address auto: no Ray cluster to join (no RAY_ADDRESS, and no `ray start` on this machine); "
            "start one with `ray start --head`, or leave out --address to start a local Ray"
        )
    return recorded


class _DropTokenAuthNotice(logging.Filter):
    """Drops Ray's notice that it turned token authentication on for a new local cluster.

    Ray 2.60 turns it on by default for a cluster `ray.init` starts and says so, as a warning,
    on every run; for the local Ray probeserve starts (and stops) itself it says nothing the
    user can act on. Only that one message is dropped: every other warning of Ray's passes.
    (Setting RAY_AUTH_MODE=token ourselves would silence it too, but set after Ray is
    imported it leaves Ray's cached config behind and the new GCS refuses the driver.)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def _quiet_token_notice() -> None:
    notices = logging.getLogger(_TOKEN_NOTICE_LOGGER)
    if not any(isinstance(f, _DropTokenAuthNotice) for f in notices.filters):
        notices.addFilter(_DropTokenAuthNotice())


def connect(address: str | None) -> None:
    """Join the cluster at `address` ("auto", "ray://host:port", host:port), or start a local one.

    Without an address this always starts a fresh local Ray (`address="local"`), never joins
    one: a bare `ray.init()` joins whatever $RAY_ADDRESS or Ray's `ray_current_cluster` file
    names, which may be another user's cluster or, after a `ray start --head` that was
    killed, a dead one that ray.init retries for about 14 minutes. Every address is checked
    for a listener first, so a failure to connect comes within seconds.

    The local Ray's workers can import what this process can from its working folder (a
    `model.factory` such as `acme_nets.zoo:build` kept beside the spec): Ray puts a driver's
    working folder on its workers' path itself, and nothing else is needed. A runtime_env
    that does the same (`env_vars` PYTHONPATH) keeps Ray from using its pre-started workers
    and makes start-up slower (`jobs/benchmarks/bench_ray_start.py`).
    """
    import ray

    if ray.is_initialized():
        return
    local = address is None or address == "local"
    if address is not None and not local:
        # "auto" goes to ray.init as it is (Ray then also turns on token authentication when
        # a token is there), but what it resolves to is checked here first
        check_address(address)
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if local:
        kwargs["include_dashboard"] = False
        _quiet_token_notice()
    # ray.init replaces SIGTERM's handler with one that prints a native stack dump and exits
    # 15 without the command's cleanup; a handler the command set (`probeserve` makes SIGTERM
    # end it like Ctrl-C) is put back, so a stopped run says so and exits as it would locally
    previous = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address="local" if local else address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        first = first_line(e) or type(e).__name__
        if local:
            raise ProbeserveError(f"cannot start a local Ray: {first}") from None
        raise ProbeserveError(f"--address {address}: cannot connect to a Ray cluster: {first}") from None
    if callable(previous) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


def plan_resources(spec: SweepSpec) -> tuple[float, float, int]:
    """GPUs per extraction task and per probe actor, and how many probe actors to run.

    On a cluster without GPUs both fall back to CPU. A request for more GPUs per actor than
    any node has is an error before anything runs.
    """
    import ray

    res = spec.resources
    node_gpus = [n.get("Resources", {}).get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    max_gpus = max(node_gpus, default=0.0)
    total_cpus = ray.cluster_resources().get("CPU", 1.0)
    # probe actors hold their resources while alive: leave room for one extraction task,
    # or the first checkpoint could never be extracted
    if res.device == "cpu" or max_gpus == 0:
        if res.device == "cuda":
            raise ProbeserveError("resources.device: cuda, but no node of the Ray cluster has a GPU")
        actors = int((total_cpus - 1) // res.num_cpus_per_probe)
        if actors < 1:
            raise ProbeserveError(
                f"resources.num_cpus_per_probe: the cluster's {total_cpus:g} CPU(s) cannot hold one probe "
                f"actor ({res.num_cpus_per_probe:g} CPU) and one extraction task (1 CPU) at once; lower it"
            )
        return 0.0, 0.0, actors
    for name, want in (
        ("resources.num_gpus_per_probe", res.num_gpus_per_probe),
        ("resources.num_gpus_per_extract", res.num_gpus_per_extract),
    ):
        if want > max_gpus:
            raise ProbeserveError(f"{name}: {want} GPUs asked, but the largest node has {max_gpus:g}")
        if want > 1 and want != int(want):
            raise ProbeserveError(f"{name}: above 1, Ray needs a whole number of GPUs, got {want}")
    spare_gpus = sum(node_gpus) - res.num_gpus_per_extract
    by_gpu = int(spare_gpus // res.num_gpus_per_probe) if res.num_gpus_per_probe > 0 else 10**6
    if by_gpu < 1:
        raise ProbeserveError(
            f"resources: the cluster's {sum(node_gpus):g} GPU(s) cannot hold one extraction task "
            f"({res.num_gpus_per_extract:g} GPU) and one probe actor ({res.num_gpus_per_probe:g} GPU) at once; "
            "lower resources.num_gpus_per_extract or resources.num_gpus_per_probe"
        )
    actors = max(1, min(by_gpu, int((total_cpus - 1) // res.num_cpus_per_probe)))
    return res.num_gpus_per_extract, res.num_gpus_per_probe, actors


def run_ray(spec: SweepSpec, *, address: str | None = None) -> RunSummary:
    """Run every pending item of the sweep on Ray; the results equal `run_local`'s."""
    t0 = time.perf_counter()
    if address is not None and address != "local":
        # before the run records its spec: a mistyped address is bad input (exit 2), and a
        # run name bound to this spec would refuse the corrected spec that follows it
        check_address(address)
    sweep, plan, summary = start(spec)
    pending = plan.pending()
    if not pending:  # nothing to do: no Ray to start (a local one takes seconds)
        log.info(
            "run %s: %d checkpoint(s), %d layer(s), nothing pending, %d already done",
            spec.run,
            len(plan.discovery.complete),
            len(sweep.points),
            summary.skipped_done,
        )
        summary.seconds = time.perf_counter() - t0
        return summary
    connect(address)
    extract_gpus, probe_gpus, n_actors = plan_resources(spec)
    if spec.resources.max_actors is not None:
        n_actors = min(n_actors, spec.resources.max_actors)
    n_actors = min(n_actors, len(pending))
    log.info(
        "run %s (ray): %d checkpoint(s), %d layer(s), %d item(s) pending, %d already done; "
        "%d probe actor(s) with %g GPU each, extraction with %g GPU",
        spec.run,
        len(plan.discovery.complete),
        len(sweep.points),
        len(pending),
        summary.skipped_done,
        n_actors,
        probe_gpus,
        extract_gpus,
    )
    scheduler = _Scheduler(
        sweep,
        summary,
        Progress(len(pending)),
        n_actors=n_actors,
        extract_gpus=extract_gpus,
        probe_gpus=probe_gpus,
    )
    scheduler.run(group_by_checkpoint(pending))
    summary.seconds = time.perf_counter() - t0
    return summary


class _Scheduler:
    """The driver's loop of one Ray run: it starts extractions, hands extracted items to probe
    actors, releases idle actors, and records every row as its task or call comes back.

    An item goes through the queues in order: `todo` (checkpoints not started), `extracting`
    (an extraction task's ref -> the items of its checkpoint), `ready` (extracted, waiting for
    an actor), `probing` (a probe call's ref -> (actor, its items)). `open_items` counts each
    started checkpoint's unfinished items and so bounds the checkpoints in flight. Every
    failure of a task or an actor, whether it raised or was lost, goes through `_fail`.

    Probe actors hold their CPUs and GPUs for as long as they live. They start with the first
    extraction, so that they are ready (torch imported, data loaded) when its items are; but
    one left idle for IDLE_RELEASE_S while extractions are outstanding is released, and
    started again only when an item is ready for it. Otherwise the actors of several drivers
    on one cluster (the watch daemon submits a job per checkpoint) could fill it while each
    driver waits for an extraction that no node can take any more.
    """

    def __init__(
        self,
        sweep: Sweep,
        summary: RunSummary,
        progress: Progress,
        *,
        n_actors: int,
        extract_gpus: float,
        probe_gpus: float,
    ) -> None:
        import ray

        self.ray = ray
        self.sweep, self.spec = sweep, sweep.spec
        self.summary, self.progress = summary, progress
        self.n_actors = n_actors
        self.extract_gpus, self.probe_gpus = extract_gpus, probe_gpus
        self.per_call = probes_per_call(self.spec, _device(self.spec, probe_gpus))
        self.extract_task = ray.remote(_extract).options(
            num_cpus=1, num_gpus=extract_gpus, max_retries=EXTRACT_RETRIES, retry_exceptions=False
        )
        self.actor_cls = ray.remote(_ProbeActor).options(
            num_cpus=self.spec.resources.num_cpus_per_probe,
            num_gpus=probe_gpus,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_TASK_RETRIES,
        )
        self.actors: list[Any] = []  # alive
        self.idle: deque[tuple[Any, float]] = deque()  # (actor, idle since)
        self.todo: deque[list[Item]] = deque()
        self.extracting: dict[Any, list[Item]] = {}
        self.ready: deque[Item] = deque()
        self.probing: dict[Any, tuple[Any, list[Item]]] = {}
        self.open_items: dict[str, int] = {}  # checkpoint -> items not yet finished

    def run(self, checkpoints: list[list[Item]]) -> None:
        """Run the items of `checkpoints` (one list per checkpoint) until every one has a row."""
        self.todo.extend(checkpoints)
        for _ in range(self.n_actors):
            self._new_actor(idle=True)
        try:
            while self.todo or self.extracting or self.ready or self.probing:
                self._start_extractions()
                self._start_probes()
                self._release_idle_actors()
                done, _ = self.ray.wait([*self.extracting, *self.probing], num_returns=1, timeout=1.0)
                for ref in done:
                    if ref in self.extracting:
                        self._extracted(ref)
                    else:
                        self._probed(ref)
        finally:
            for actor in self.actors:
                self.ray.kill(actor, no_restart=True)

    # -- starting work

    def _new_actor(self, *, idle: bool) -> Any:
        actor = self.actor_cls.remote(self.spec, self.probe_gpus)
        self.actors.append(actor)
        if idle:
            self.idle.append((actor, time.monotonic()))
        return actor

    def _start_extractions(self) -> None:
        while self.todo and len(self.open_items) < self.spec.resources.max_checkpoints_in_flight:
            items = self.todo.popleft()
            self.open_items[items[0].checkpoint.key] = len(items)
            self.extracting[self.extract_task.remote(self.spec, items, self.extract_gpus)] = items

    def _start_probes(self) -> None:
        while self.ready and (self.idle or len(self.actors) < self.n_actors):
            call = self._next_call()
            actor = self.idle.popleft()[0] if self.idle else self._new_actor(idle=False)
            self.probing[actor.probe.remote(call)] = (actor, call)

    def _next_call(self) -> list[Item]:
        """The next ready items to train together: of one checkpoint, at most `per_call`, and
        spread over the actors free to take them rather than piled on the first one."""
        key = self.ready[0].checkpoint.key
        same = 0
        while same < len(self.ready) and self.ready[same].checkpoint.key == key:
            same += 1
        free = len(self.idle) + self.n_actors - len(self.actors)
        size = max(1, min(self.per_call, -(-same // max(1, free))))
        return [self.ready.popleft() for _ in range(min(size, same))]

    def _release_idle_actors(self) -> None:
        while self.idle and self.extracting and time.monotonic() - self.idle[0][1] > IDLE_RELEASE_S:
            self._drop_actor(self.idle.popleft()[0])

    def _drop_actor(self, actor: Any) -> None:
        self.actors.remove(actor)
        self.ray.kill(actor, no_restart=True)

    # -- what comes back

    def _extracted(self, ref: Any) -> None:
        items = self.extracting.pop(ref)
        try:
            failed = self.ray.get(ref)  # {layer: error}; extract_missing committed their rows itself
        except self.ray.exceptions.RayError as e:
            lost = f"extraction worker lost after {EXTRACT_RETRIES} retries"
            for row in self._fail(items, self._why(e, "extraction", lost)):
                self._finish(row)
            return
        for item in items:
            if item.layer in failed:
                error = failed[item.layer]
                self._finish(self.sweep.failed_row(item.checkpoint, item.layer, item.layer_index, error, 0.0))
            else:
                self.ready.append(item)

    def _probed(self, ref: Any) -> None:
        actor, call = self.probing.pop(ref)
        try:
            rows = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            if not isinstance(e, self.ray.exceptions.RayTaskError):
                self._drop_actor(actor)  # died more often than it may restart: let it go
                actor = None
            rows = self._fail(
                call, self._why(e, "probe", f"probe actor lost after {ACTOR_RESTARTS} restarts")
            )
        if actor is not None:  # a call that raised leaves its actor fine
            self.idle.append((actor, time.monotonic()))
        for row in rows:
            self._finish(row)

    def _why(self, e: Exception, what: str, lost: str) -> str:
        """A failed row's error: what the task raised, or (past Ray's retries) that its worker
        was lost, marked `LOST` so that the watch daemon tries the checkpoint again."""
        if isinstance(e, self.ray.exceptions.RayTaskError):  # raised, not retried
            return f"{what} raised: {describe_error(e)}"
        return f"{LOST}{lost}: {describe_error(e)}"

    def _fail(self, items: list[Item], error: str) -> list[dict[str, Any]]:
        """Commit a failed row for each item (never over an ok one); the rows that stand."""
        sweep = self.sweep
        return [
            commit_unless_done(sweep, sweep.failed_row(i.checkpoint, i.layer, i.layer_index, error, 0.0))
            for i in items
        ]

    def _finish(self, row: dict[str, Any]) -> None:
        self.summary.record(row, self.progress)
        key = row["checkpoint"]
        self.open_items[key] -= 1
        if self.open_items[key] == 0:
            del self.open_items[key]
