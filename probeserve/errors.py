"""Error types. Every error a user can cause is a `ProbeserveError` whose message names the
thing to fix (spec field, object key, layer name); the CLI prints it on one line and exits 2.
"""

from __future__ import annotations

import re


class ProbeserveError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 2


class SpecError(ProbeserveError):
    """The spec is invalid. `errors` holds one `field.path: message` line per problem."""

    def __init__(self, errors: list[str], *, source: str = "spec") -> None:
        self.errors = list(errors)
        self.source = source
        if len(self.errors) == 1:  # one problem, one line
            super().__init__(f"{source}: {self.errors[0]}")
        else:
            lines = "\n".join(f"  {e}" for e in self.errors)
            super().__init__(f"{source}: {len(self.errors)} errors\n{lines}")


class StorageError(ProbeserveError):
    """A storage location is missing, unreadable or refused a write."""


class CheckpointError(ProbeserveError):
    """A checkpoint is missing, incomplete, too large, corrupt or in a refused format."""


class LayerError(ProbeserveError):
    """A layer name or pattern is unknown, or a layer's activations cannot be probed."""


class DataError(ProbeserveError):
    """The probe dataset is missing, malformed or unusable (for example, one class)."""


class ModelError(ProbeserveError):
    """The model factory cannot be imported or called, or weights do not fit it."""


def describe_error(e: BaseException) -> str:
    """One line for a result row: the message of a user error, type and message otherwise."""
    if isinstance(e, ProbeserveError):
        return str(e)
    return f"{type(e).__name__}: {e}"


_ENFORCE = re.compile(r"^\[enforce fail at [^\]]*\]\s*(?:[^.]*\.\s+)?")


def first_line(e: BaseException) -> str:
    """The first meaningful line of an error's message; "" when it has none.

    Where a message from a library (torch, Ray, DuckDB, a safe unpickler) is quoted inside one
    of ours, only its first line fits. torch errors can carry C++ frames ("Exception raised
    from ...", "C++ CapturedTraceback:", "frame #0: ...") after the message, and allocation
    failures start with the C++ assertion that failed ("[enforce fail at alloc_cpu.cpp:127]
    err == 0."); neither says anything to a user. A caller that must say something writes
    `first_line(e) or type(e).__name__`.
    """
    for line in str(e).splitlines():
        line = _ENFORCE.sub("", line.strip())
        if line:
            return line
    return ""
