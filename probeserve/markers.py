"""Running markers: which items are being probed right now, readable from any machine.

While an item is probed, its `running/{run}/{ckpt}/{layer}.json` marker (`layout.running_key`)
says who runs it (host, pid, start, device) and is published again every `HEARTBEAT_S`
seconds by a thread, so its age in storage shows that the probe is alive. Kill -9 leaves the
marker behind; `marker_state` tells such a dead one from a live one, from storage alone, for
`probeserve status` (which counts the item as pending) and for the next run (which removes it).

It needs no torch and no model: `status` and the report read markers without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from probeserve.errors import ProbeserveError, describe_error
from probeserve.storage import ObjectInfo, Storage

log = logging.getLogger("probeserve")

# A running marker is published again every HEARTBEAT_S seconds while its probe runs; one not
# refreshed for STALE_BEATS of its own heartbeats is dead, wherever its process ran.
HEARTBEAT_S = 30.0
STALE_BEATS = 4
MARKER_MAX_BYTES = 64 << 10


class Heartbeat:
    """The `running/...` marker of one item while it is probed: published at once, then again
    every `HEARTBEAT_S` seconds from a thread (so any machine can see that it is alive by its
    age), and deleted at the end. It says who runs it: host, pid, start time, device."""

    def __init__(self, storage: Storage, key: str, *, device: str) -> None:
        self.storage, self.key = storage, key
        self.interval = HEARTBEAT_S
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "device": device,
            "heartbeat_s": self.interval,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _publish(self) -> None:
        self.storage.publish_bytes(self.key, json.dumps({**self.info, "beat": time.time()}).encode())

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._publish()
            except Exception as e:  # a missed beat only makes status call it stale sooner
                log.warning("%s: cannot refresh the running marker: %s", self.key, describe_error(e))

    def __enter__(self) -> Heartbeat:
        self._publish()
        self._thread = threading.Thread(target=self._beat, name="probeserve-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating; once this returns, the marker is not published again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        if exc_type is not None:
            # the item is not finished and this process no longer probes it (Ctrl-C, an error
            # that escaped the item): its marker goes now, or `status` would count the item as
            # running (stale once the pid is gone) until the next run removed it
            with contextlib.suppress(Exception):
                self.storage.delete(self.key)


def marker_state(storage: Storage, obj: ObjectInfo, *, now: float | None = None) -> tuple[bool, str]:
    """(alive, why) for a running marker, from storage alone.

    Dead: its pid is gone and it was written on this host, or it has not been refreshed for
    `STALE_BEATS` heartbeats (its own `heartbeat_s`, or `HEARTBEAT_S` for a marker that does
    not say). Its age is the storage's modification time, so clocks of the writer's machine
    do not matter. A marker that cannot be read is judged by its age alone."""
    now = time.time() if now is None else now
    info: dict[str, Any] = {}
    with contextlib.suppress(ProbeserveError, ValueError):
        loaded = json.loads(storage.read_bytes(obj.key, max_bytes=MARKER_MAX_BYTES))
        if isinstance(loaded, dict):
            info = loaded
    host, pid = info.get("host"), info.get("pid")
    if host == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
        from probeserve.staging import pid_alive

        if not pid_alive(pid):
            return False, f"pid {pid} on {host} is gone"
    interval = info.get("heartbeat_s")
    if not isinstance(interval, (int, float)) or isinstance(interval, bool) or not 0 < interval < 1e6:
        interval = HEARTBEAT_S
    age = now - obj.mtime
    if age > STALE_BEATS * interval:
        who = f" (host {host}, pid {pid})" if host else ""
        return False, f"not refreshed for {age:.0f} s{who}"
    return True, "running"
