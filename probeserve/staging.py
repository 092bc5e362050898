"""Local staging folders (shard parts being written, checkpoints being downloaded), and the
removal of those that a killed process left behind.

A process killed with SIGKILL runs no cleanup, so its staging folders stay in `TMPDIR`
(a shard part of up to `output.max_shard_bytes` per layer being extracted, a whole
checkpoint per download). The next run removes them, but only those it can prove are
probeserve's and dead, because `TMPDIR` is shared with everything else on the machine:

- A staging folder is named `probeserve-stage-{host}-{pid}-{random}`: the prefix says it is
  ours, the host and pid say who made it.
- Its maker holds an exclusive `flock` on the `lock` file inside it for as long as it uses
  it; the kernel drops that lock when the process dies, however it dies.

A folder is removed only when all of these hold: its name has that exact shape, its host is
this host (a `TMPDIR` shared between machines says nothing about another machine's pids),
its pid is not a live process here, and its lock can be taken (so a process in another pid
namespace that shares this `TMPDIR` and happens to have that pid is still seen alive).
Anything else is left alone: a folder we cannot prove dead costs disk, one removed under a
live process would cost its work.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import weakref
from collections.abc import Callable

try:
    import fcntl
except ImportError:  # not on Windows: only the host and pid checks then
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("probeserve")

PREFIX = "probeserve-stage-"
LOCK_NAME = "lock"
_NAME = re.compile(r"^probeserve-stage-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>[0-9]+)-(?P<rand>[0-9a-f]{16})$")


def this_host() -> str:
    """This host's name as it appears in staging folder names."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a process on this host (a zombie counts as alive, which is safe)."""
    if pid <= 0:
        return True  # not a pid we could have written: never treat it as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError as e:
        return e.errno != errno.ESRCH
    except OverflowError:  # above any pid (a marker edited by hand): as for pid <= 0
        return True
    return True


class StagingDir:
    """A private local folder, locked for as long as this object lives.

    `remove()` (or garbage collection, or interpreter exit) deletes it; after a SIGKILL it
    stays, and `remove_stale` in a later process deletes it.
    """

    def __init__(self, parent: str | None = None) -> None:
        parent = parent or tempfile.gettempdir()
        name = f"{PREFIX}{this_host()}-{os.getpid()}-{secrets.token_hex(8)}"
        self.path = os.path.join(parent, name)
        os.mkdir(self.path, 0o700)
        fd = -1
        try:
            fd = os.open(os.path.join(self.path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new and ours: cannot be taken
        except BaseException:
            if fd >= 0:
                os.close(fd)
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(self, _remove, self.path, fd, os.getpid())

    def remove(self) -> None:
        self._finalizer()

    @property
    def removed(self) -> bool:
        return not self._finalizer.alive


def _remove(path: str, fd: int, owner: int) -> None:
    if os.getpid() != owner:
        return  # a forked child's copy: the folder is its parent's
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(fd)  # the lock goes with it


def is_stale(path: str) -> bool:
    """True only for a staging folder of a dead probeserve process on this host (see above)."""
    return _owner_dead(path) and _with_lock(path, lambda _path: None)


def _owner_dead(path: str) -> bool:
    m = _NAME.match(os.path.basename(path))
    if not m or m["host"] != this_host() or pid_alive(int(m["pid"])):
        return False
    return not os.path.islink(path) and os.path.isdir(path)


def _with_lock(path: str, action: Callable[[str], object]) -> bool:
    """Run `action(path)` holding the folder's lock; False (and nothing run) if someone holds it."""
    if fcntl is None:
        action(path)
        return True
    try:
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        action(path)  # its maker died between mkdir and creating its lock: its pid is dead
        return True
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held: a process is alive in there
        action(path)
        return True
    finally:
        os.close(fd)


def remove_stale(parent: str | None = None) -> list[str]:
    """Remove the staging folders of dead probeserve processes in `parent` (default: the
    temporary folder); return the paths removed. Never raises for a folder it cannot read."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(PREFIX):
            continue
        path = entry.path
        try:
            if not (_owner_dead(path) and _with_lock(path, shutil.rmtree)):
                continue
        except FileNotFoundError:
            continue  # another process removed it first
        except OSError as e:
            log.warning("%s: left by a dead probeserve process, but cannot remove it: %s", entry.path, e)
            continue
        removed.append(entry.path)
    if removed:
        log.info("removed %d staging folder(s) left by dead probeserve processes in %s", len(removed), parent)
    return removed
