"""The watch daemon's ledger: which checkpoints of a run are claimed, by whom, and how far
their sweeps have got, kept in the output storage rather than in any daemon's memory.

    {output}/ledger/{run}/{checkpoint dir}/claim-{gen:04d}.json   created create-only
    {output}/ledger/{run}/{checkpoint dir}/state-{gen:04d}.json   submitted | done | failed

(`layout.claim_key`, `layout.state_key`.) A generation is one attempt at a checkpoint. Its
claim is created create-only (If-None-Match: * on S3, a hard link locally), and create-only
writes have one winner, so of any number of daemons exactly one owns each generation; a dead
claim is taken over by creating the next generation's. Its state is published whole, and
again while a sweep runs in the daemon, so that the entry's age says whether anyone still
looks after it. Submission ids are derived from (run, checkpoint key, generation): a daemon
that died between claiming and recording can find the job it started.

The ledger records and reads; what to do with an entry (submit, follow up, take over, give
up) is the daemon's decision (`watch.Watcher`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from probeserve import layout
from probeserve.storage import ObjectInfo, Storage

log = logging.getLogger("probeserve.watch")

LEDGER_OBJECT_MAX_BYTES = 1 << 20  # a claim or state is a few hundred bytes


@dataclass
class LedgerEntry:
    """The newest claim of one checkpoint and its state."""

    checkpoint_dir: str
    gen: int = 0
    claim: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] | None = None
    state_mtime: float = 0.0
    claim_mtime: float = 0.0
    problem: str | None = None  # a damaged claim or state object, named

    @property
    def status(self) -> str:
        return self.state["state"] if self.state else "claimed"

    def last_update(self) -> float:
        stamps = [self.claim_mtime, self.state_mtime, self.claim.get("claimed_at", 0.0)]
        if self.state:
            stamps.append(self.state.get("updated_at", 0.0))
        return max(stamps)


def submission_id(run: str, checkpoint_key: str, gen: int) -> str:
    """Deterministic: the same claim always names the same job."""
    digest = hashlib.sha256(f"{run}\0{checkpoint_key}".encode()).hexdigest()[:12]
    return f"probeserve-{run}-{digest}-g{gen:04d}"


def default_owner() -> str:
    """Who a daemon is, in the objects it writes: host, pid and a random part (a restarted
    daemon with the pid of a dead one is still someone else)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Ledger:
    """One run's ledger in an output storage, as one daemon (`owner`) reads and writes it.

    `clock` dates what it writes (tests move it); the ages that decide a takeover also use
    the storage's own modification times, so a daemon with a wrong clock cannot make a live
    claim look dead by much.
    """

    def __init__(
        self,
        storage: Storage,
        run: str,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        page_size: int = 1000,
    ) -> None:
        self.storage = storage
        self.run = run
        self.owner = owner or default_owner()
        self.clock = clock
        self.page_size = page_size

    def submission_id(self, checkpoint_key: str, gen: int) -> str:
        return submission_id(self.run, checkpoint_key, gen)

    # -- reading

    def read(self) -> dict[str, LedgerEntry]:
        """{checkpoint dir: newest entry}, from one paginated listing of the run's ledger."""
        newest: dict[str, dict[str, ObjectInfo]] = {}
        gens: dict[str, int] = {}
        for obj in self.storage.list(layout.ledger_prefix(self.run), page_size=self.page_size):
            parsed = layout.parse_ledger_key(obj.key)
            if parsed is None:
                continue
            _, ckpt_dir, kind, gen = parsed
            if gen > gens.get(ckpt_dir, 0) and kind == "claim":
                gens[ckpt_dir] = gen
            newest.setdefault(ckpt_dir, {})[f"{kind}-{gen}"] = obj
        out = {}
        for ckpt_dir, gen in gens.items():
            objs = newest[ckpt_dir]
            entry = LedgerEntry(ckpt_dir, gen=gen)
            claim_obj = objs[f"claim-{gen}"]
            entry.claim_mtime = claim_obj.mtime
            claim = self._read_json(claim_obj.key)
            if claim is None:
                # e.g. a claim still being written, or cut short, on a file system without hard
                # links: a claim of unknown owner, dated by the object. It is taken over like any
                # claim that does not move, and this checkpoint alone waits for that.
                entry.problem = f"{self.storage.uri_for(claim_obj.key)}: damaged claim (not a JSON object)"
                log.warning(
                    "%s; treating it as a claim that has not moved since it was written", entry.problem
                )
            else:
                entry.claim = claim
            state_obj = objs.get(f"state-{gen}")
            if state_obj is not None:
                entry.state = self._read_json(state_obj.key)
                entry.state_mtime = state_obj.mtime
                if entry.state is None:  # states are published whole: only a hand could damage one
                    entry.problem = (
                        f"{self.storage.uri_for(state_obj.key)}: damaged state (not a JSON object)"
                    )
                    log.warning("%s; following the claim's job as if no state were recorded", entry.problem)
            out[ckpt_dir] = entry
        return out

    def _read_json(self, key: str) -> dict[str, Any] | None:
        """A ledger object, or None when it is not a JSON object (damaged or half-written)."""
        raw = self.storage.read_bytes(key, max_bytes=LEDGER_OBJECT_MAX_BYTES)
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def age(self, entry: LedgerEntry) -> float:
        """Seconds since anyone last wrote the entry's claim or state."""
        return self.clock() - entry.last_update()

    def rows(self) -> list[dict[str, Any]]:
        """The ledger as table rows, by step (`probeserve watch --status`)."""
        rows = []
        for entry in self.read().values():
            state = entry.state or {}
            rows.append(
                {
                    "checkpoint": entry.claim.get("checkpoint"),
                    "step": entry.claim.get("step"),
                    "state": entry.status,
                    "generation": entry.gen,
                    "submission_id": state.get("submission_id") or entry.claim.get("submission_id"),
                    "error": state.get("error") or entry.problem,
                }
            )
        rows.sort(key=lambda r: (r["step"] if r["step"] is not None else -1, r["checkpoint"] or ""))
        return rows

    # -- writing

    def claim(self, checkpoint_key: str, step: int, gen: int) -> bool:
        """Create generation `gen`'s claim of a checkpoint; True if this daemon won it."""
        body = {
            "checkpoint": checkpoint_key,
            "step": step,
            "generation": gen,
            "submission_id": self.submission_id(checkpoint_key, gen),
            "owner": self.owner,
            "claimed_at": self.clock(),
        }
        key = layout.claim_key(self.run, layout.checkpoint_dir(checkpoint_key, step), gen)
        return self.storage.create_only(key, json.dumps(body, indent=1).encode())

    def record(self, checkpoint_key: str, step: int, gen: int, state: str, error: str | None = None) -> None:
        """Publish generation `gen`'s state: submitted, done or failed (with its error)."""
        body = {
            "state": state,
            "checkpoint": checkpoint_key,
            "step": step,
            "generation": gen,
            "submission_id": self.submission_id(checkpoint_key, gen),
            "error": error,
            "owner": self.owner,
            "updated_at": self.clock(),
        }
        key = layout.state_key(self.run, layout.checkpoint_dir(checkpoint_key, step), gen)
        self.storage.publish_bytes(key, json.dumps(body, indent=1).encode())

    @contextlib.contextmanager
    def refreshing(self, checkpoint_key: str, step: int, gen: int, *, every: float) -> Iterator[None]:
        """While a sweep runs in this daemon, record `submitted` again every `every` seconds,
        so that no other daemon takes the claim over for want of news."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(every):
                try:
                    self.record(checkpoint_key, step, gen, "submitted")
                except Exception as e:  # keep beating: a missed beat only risks a takeover
                    log.warning("heartbeat for step %d failed: %s", step, e)

        t = threading.Thread(target=beat, name="probeserve-heartbeat", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()
