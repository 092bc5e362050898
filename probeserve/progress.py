"""Progress of a sweep: a bar on a terminal, plain periodic log lines otherwise.

Both runners report each finished item here. On a terminal the bar is redrawn in place
(items done of total, rate, ETA); when stderr is a file or a pipe (a Ray job's log, CI) a
line is logged at most every `interval` seconds and at the end, so logs stay readable.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("probeserve")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    def __init__(
        self, total: int, *, stream: TextIO | None = None, interval: float = 10.0, width: int = 30
    ) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.stream = stream or sys.stderr
        self.interval = interval
        self.width = width
        self.start = time.monotonic()
        self._last_log = self.start
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 and left else ("0s" if not left else "?")
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.done}/{self.total} items{failed}, {rate * 60:.1f}/min, elapsed {_duration(elapsed)}, ETA {eta}"

    def update(self, *, ok: bool = True, what: str = "") -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if self.tty:
            filled = int(self.width * self.done / max(1, self.total))
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r[{bar}] {self.line()}")
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
            return
        now = time.monotonic()
        if now - self._last_log >= self.interval or self.done >= self.total:
            self._last_log = now
            log.info("progress: %s%s", self.line(), f" (last: {what})" if what else "")
