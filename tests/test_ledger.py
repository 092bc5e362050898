"""The watch daemon's ledger on its own: create-only claims, states, generations, damage, ages.

A local folder stands in for the bucket (claims are create-only there too, by hard link);
tests/test_watch.py runs the daemon with the ledger in a real S3 server.
"""

from __future__ import annotations

import json
import time

from probeserve import layout
from probeserve.ledger import Ledger, submission_id
from probeserve.storage import LocalStorage

KEY = "step=000000007/model.safetensors"
DIR = layout.checkpoint_dir(KEY, 7)


def test_one_of_two_daemons_wins_a_claim_and_the_entry_says_which(tmp_path):
    out = LocalStorage(str(tmp_path))
    a, b = Ledger(out, "w", owner="a"), Ledger(out, "w", owner="b")
    assert a.claim(KEY, 7, 1) is True
    assert b.claim(KEY, 7, 1) is False  # create-only: the second claim of a generation loses
    (entry,) = b.read().values()
    assert entry.checkpoint_dir == DIR and entry.gen == 1 and entry.status == "claimed"
    assert entry.claim["owner"] == "a" and entry.claim["submission_id"] == submission_id("w", KEY, 1)
    assert [o.key for o in out.list("ledger/")] == [layout.claim_key("w", DIR, 1)]


def test_states_follow_the_newest_generation(tmp_path):
    out = LocalStorage(str(tmp_path))
    ledger = Ledger(out, "w", owner="a")
    ledger.claim(KEY, 7, 1)
    ledger.record(KEY, 7, 1, "submitted")
    assert ledger.read()[DIR].status == "submitted"
    ledger.record(KEY, 7, 1, "failed", "gave up")
    entry = ledger.read()[DIR]
    assert entry.status == "failed" and entry.state["error"] == "gave up"
    assert ledger.claim(KEY, 7, 2)  # a takeover: the next generation
    entry = ledger.read()[DIR]
    assert entry.gen == 2 and entry.status == "claimed" and entry.state is None  # gen 1's state is old news
    ledger.record(KEY, 7, 2, "done")
    assert ledger.read()[DIR].status == "done"
    assert ledger.rows() == [
        {
            "checkpoint": KEY,
            "step": 7,
            "state": "done",
            "generation": 2,
            "submission_id": submission_id("w", KEY, 2),
            "error": None,
        }
    ]


def test_submission_ids_are_deterministic_and_differ_by_run_checkpoint_and_generation():
    sid = submission_id("w", KEY, 1)
    assert sid == submission_id("w", KEY, 1) and sid.startswith("probeserve-w-") and sid.endswith("-g0001")
    assert (
        len({sid, submission_id("v", KEY, 1), submission_id("w", "other", 1), submission_id("w", KEY, 2)})
        == 4
    )


def test_damaged_objects_are_named_and_other_keys_ignored(tmp_path):
    out = LocalStorage(str(tmp_path))
    ledger = Ledger(out, "w", owner="a")
    out.publish_bytes(layout.claim_key("w", DIR, 1), b'{"checkpoint": "step=0')  # cut short
    other = layout.checkpoint_dir("step=000000008/model.safetensors", 8)
    ledger.claim("step=000000008/model.safetensors", 8, 1)
    out.publish_bytes(layout.state_key("w", other, 1), b"[1, 2]")  # JSON, but not an object
    out.publish_bytes(layout.ledger_key("w", other, "notes.txt"), b"a user's file")
    out.publish_bytes("ledger/w/stray.json", b"{}")
    entries = ledger.read()
    assert set(entries) == {DIR, other}
    assert entries[DIR].claim == {} and "damaged claim" in entries[DIR].problem
    assert entries[DIR].problem.startswith(out.uri_for(layout.claim_key("w", DIR, 1)))
    assert entries[other].state is None and "damaged state" in entries[other].problem
    errors = {r["checkpoint"]: r["error"] for r in ledger.rows()}
    assert "damaged state" in errors["step=000000008/model.safetensors"]


def test_age_counts_from_the_newest_write_and_the_clock_dates_them(tmp_path):
    out = LocalStorage(str(tmp_path))
    now = [time.time() + 1000.0]  # a clock ahead of the files' modification times
    ledger = Ledger(out, "w", owner="a", clock=lambda: now[0])
    ledger.claim(KEY, 7, 1)
    claim = json.loads(out.read_bytes(layout.claim_key("w", DIR, 1)))
    assert claim["claimed_at"] == now[0]
    now[0] += 30.0
    assert ledger.age(ledger.read()[DIR]) == 30.0
    ledger.record(KEY, 7, 1, "submitted")  # dated now: the entry moved
    now[0] += 5.0
    assert ledger.age(ledger.read()[DIR]) == 5.0


def test_refreshing_records_submitted_while_inside_and_stops_after(tmp_path):
    out = LocalStorage(str(tmp_path))
    ledger = Ledger(out, "w", owner="a")
    ledger.claim(KEY, 7, 1)
    key = layout.state_key("w", DIR, 1)
    stamps = []
    with ledger.refreshing(KEY, 7, 1, every=0.05):
        deadline = time.time() + 30
        while len(stamps) < 3 and time.time() < deadline:
            if out.stat(key) is not None:
                stamp = json.loads(out.read_bytes(key))["updated_at"]
                if stamp not in stamps:
                    stamps.append(stamp)
            time.sleep(0.01)
    assert len(stamps) == 3 and stamps == sorted(stamps)
    after = out.read_bytes(key)
    time.sleep(0.3)
    assert out.read_bytes(key) == after  # not written again once the sweep is over
    assert ledger.read()[DIR].status == "submitted"


def test_the_ledger_lists_with_its_page_size(tmp_path):
    pages = []

    class Counting(LocalStorage):
        def list(self, prefix="", *, page_size=1000):
            pages.append((prefix, page_size))
            return super().list(prefix, page_size=page_size)

    ledger = Ledger(Counting(str(tmp_path)), "w", owner="a", page_size=7)
    ledger.claim(KEY, 7, 1)
    assert list(ledger.read()) == [DIR]
    assert pages == [("ledger/w/", 7)]
