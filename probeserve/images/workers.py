"""Decode worker processes, and the pool that feeds them tasks and returns results in order.

A worker is a plain subprocess, `python -c "...worker_main()"`, not a `multiprocessing`
child: `fork` is unsafe in a process that already runs threads (Ray's, torch's), and the
`spawn` and `forkserver` children re-import the parent's `__main__` script, which inside a
Ray worker is Ray's own worker script (it imports ray). A worker imports numpy, Pillow and,
for Parquet, pyarrow; it starts in a fraction of a second and lives as long as its dataset,
so a Ray extraction worker pays for it once for all its checkpoints.

Each worker reads tasks from its stdin and writes one result frame per task to its stdout.
A frame is a 16-byte header (two little-endian uint64: the length of a pickled object and
of a raw payload), the pickled object, then the payload: the decoded images as uint8 bytes,
read straight into an array on the other side. Tasks go round robin, so results come back
in task order by reading the workers in turn; each worker decodes ahead into a short queue
(`depth` results) while the previous result is being written, so memory stays bounded
however far the consumer falls behind. A worker stops when its stdin closes, which also
happens when the parent dies, however it dies.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import numpy as np

_HEADER = struct.Struct("<QQ")
_LATER = object()  # no next task queued yet
NEW_SESSION = True  # see DecodePool._spawn; bench_images.py --same-session shows why


def write_frame(f: BinaryIO, obj: Any, payload: Any = b"") -> None:
    head = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    payload = memoryview(payload).cast("B")
    f.write(_HEADER.pack(len(head), len(payload)) + head)
    if len(payload):
        f.write(payload)
    f.flush()


def _read_into(f: BinaryIO, view: memoryview) -> bool:
    """Fill `view` from `f`; False on end of file before it is full."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            return False
        got += n
    return True


def read_frame(f: BinaryIO) -> tuple[Any, np.ndarray] | None:
    """(object, payload as a uint8 array) or None at the end of the stream (or a cut frame)."""
    header = bytearray(_HEADER.size)
    if not _read_into(f, memoryview(header)):
        return None
    n_head, n_payload = _HEADER.unpack(header)
    head = bytearray(n_head)
    if not _read_into(f, memoryview(head)):
        return None
    payload = np.empty(n_payload, dtype=np.uint8)
    if n_payload and not _read_into(f, payload.data):
        return None
    return pickle.loads(head), payload


def worker_main() -> None:
    """The decode worker: an init frame (Decoder settings), then tasks until stdin closes."""
    from probeserve.images.decode import Decoder

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the frames
    inp = os.fdopen(0, "rb", buffering=0)
    first = read_frame(inp)
    if first is None:
        return
    settings, _ = first
    depth = settings.pop("depth")
    decoder = Decoder(**settings)
    tasks: queue.Queue[Any] = queue.Queue()
    results: queue.Queue[Any] = queue.Queue(maxsize=depth)

    def read_tasks() -> None:  # always drain stdin, so the parent never blocks on a write
        while (frame := read_frame(inp)) is not None:
            tasks.put(frame[0])
        tasks.put(None)

    def write_results() -> None:
        while (item := results.get()) is not None:
            try:
                write_frame(out, *item)
            except (BrokenPipeError, ValueError):  # the parent is gone
                os._exit(0)

    threading.Thread(target=read_tasks, daemon=True).start()
    writer = threading.Thread(target=write_results, daemon=True)
    writer.start()
    task = tasks.get()
    while task is not None:
        try:  # look ahead: the next task's bytes are fetched (S3) while this one decodes
            following = tasks.get_nowait()
        except queue.Empty:
            following = _LATER
        try:
            if isinstance(following, dict):
                decoder.prefetch(following["task"])
            images, failed = decoder.run(task["task"])
            results.put(({"id": task["id"], "n": len(images), "failed": failed}, images))
        except Exception as e:  # storage errors (and bugs): the parent raises them
            from probeserve.errors import ProbeserveError

            kind = type(e).__name__ if isinstance(e, ProbeserveError) else None
            results.put(({"id": task["id"], "error": (kind, f"{type(e).__name__}: {e}")}, b""))
        task = tasks.get() if following is _LATER else following
    results.put(None)
    writer.join()
    decoder.close()


class WorkerDied(RuntimeError):
    """A decode worker exited in the middle of a task."""


class DecodePool:
    """`num_workers` decode worker processes, started on first use and kept until `close()`.

    `settings` are the `Decoder` arguments. `map(tasks)` yields each task's result, (uint8
    images [n, S, S, 3], [(position, reason)] of the examples left out), in task order. A
    worker that dies (killed, out of memory) is restarted and its tasks are sent again; a
    task that kills a worker twice raises `WorkerDied`, so the set of examples never depends
    on a crash.
    """

    def __init__(self, settings: dict[str, Any], num_workers: int, *, depth: int = 2) -> None:
        assert num_workers >= 1
        self.settings = dict(settings)
        self.num_workers = num_workers
        self.depth = depth
        self._procs: list[subprocess.Popen | None] = [None] * num_workers
        self._lock = threading.Lock()  # one map() at a time

    def _spawn(self) -> subprocess.Popen:
        # sys.path[0] of `python -c` is the working directory; this package's parent instead,
        # so the worker runs this very code whatever the working directory holds
        parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = f"import sys; sys.path[0] = {parent!r}; from probeserve.images.workers import worker_main; worker_main()"
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"  # one decode per process; the processes are the parallelism
        # A session of its own: where the kernel groups CPU time by session (autogroup, on by
        # default on desktop and many shared machines), N workers in the parent's session
        # would share one session's CPU share and never decode faster than one. Ctrl-C in a
        # terminal goes to the parent only, which closes the workers' stdin: they stop.
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
            start_new_session=NEW_SESSION,
        )
        assert proc.stdin is not None
        write_frame(proc.stdin, {**self.settings, "depth": self.depth})  # type: ignore[arg-type]
        return proc

    def start(self) -> None:
        """Start every worker now, all at once (they import numpy and Pillow in parallel)."""
        for w in range(self.num_workers):
            self._proc(w)

    def _proc(self, w: int) -> subprocess.Popen:
        proc = self._procs[w]
        if proc is None:
            proc = self._procs[w] = self._spawn()
        return proc

    def _send(self, w: int, frame: dict[str, Any]) -> None:
        proc = self._proc(w)
        try:
            write_frame(proc.stdin, frame)  # type: ignore[arg-type]
        except (BrokenPipeError, OSError):
            pass  # it died: reading its result finds out and restarts it

    def map(self, tasks: Iterable[dict[str, Any]]) -> Iterator[tuple[np.ndarray, list[tuple[int, str]]]]:
        """One pass at a time: results of two passes would mix in the workers' pipes."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("DecodePool.map: a pass is already running on this pool")
        try:
            yield from self._map(tasks)
        finally:
            self._lock.release()

    def _map(self, tasks: Iterable[dict[str, Any]]) -> Iterator[tuple[np.ndarray, list[tuple[int, str]]]]:
        self.start()
        n = self.num_workers
        todo = iter(tasks)
        outstanding: deque[list[Any]] = deque()  # [id, worker, task, tries]
        next_id = 0
        exhausted = False
        settings = self.settings
        try:
            while True:
                while not exhausted and len(outstanding) < n * (self.depth + 1):
                    task = next(todo, None)
                    if task is None:
                        exhausted = True
                        break
                    w = next_id % n
                    outstanding.append([next_id, w, task, 0])
                    self._send(w, {"id": next_id, "task": task})
                    next_id += 1
                if not outstanding:
                    return
                tid, w, task, tries = outstanding[0]
                proc = self._proc(w)
                frame = read_frame(proc.stdout)  # type: ignore[arg-type]
                if frame is None:  # the worker died: start another, send its tasks again
                    code = proc.wait()
                    self._procs[w] = None
                    if tries >= 1:
                        raise WorkerDied(
                            f"an image decode worker died twice (exit status {code}) on {_describe(task)}"
                        )
                    for entry in outstanding:
                        if entry[1] == w:
                            entry[3] += 1
                            self._send(w, {"id": entry[0], "task": entry[2]})
                    continue
                head, payload = frame
                outstanding.popleft()
                assert head["id"] == tid, (head["id"], tid)
                if "error" in head:
                    raise _rebuild_error(*head["error"])
                size = settings["image_size"]
                yield payload.reshape(head["n"], size, size, 3), head["failed"]
        finally:
            if outstanding:  # abandoned half way: results in flight are of no use to anyone
                self.close(kill=True)

    def close(self, *, kill: bool = False) -> None:
        """Stop the workers (they finish when their stdin closes); the next map starts new ones."""
        procs, self._procs = self._procs, [None] * self.num_workers
        for proc in procs:
            if proc is None:
                continue
            if kill:
                proc.kill()
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
        for proc in procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(OSError):
                proc.stdout.close()  # type: ignore[union-attr]

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close(kill=True)


def _describe(task: dict[str, Any]) -> str:
    if task["kind"] == "files":
        keys = task["keys"]
        return f"one of {len(keys)} images from {keys[0]} to {keys[-1]}"
    return f"rows of {task['file']} row group {task['row_group']}"


def _rebuild_error(kind: str | None, message: str) -> Exception:
    from probeserve import errors

    cls = getattr(errors, kind, None) if kind else None
    if isinstance(cls, type) and issubclass(cls, errors.ProbeserveError):
        return cls(message.split(": ", 1)[1] if ": " in message else message)
    return RuntimeError(f"image decode worker: {message}")
