"""The rollout journal: write-ahead records, crash safety, locking and abort (real SQLite, real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from kpipe.errors import Locked, NotFoundError
from kpipe.rollout.journal import Journal, host_state
from kpipe.store import Store


@pytest.fixture
def journal(tmp_path):
    return Journal(Store(tmp_path / "store"))


def test_create_resolve_last_and_prefix(journal):
    a = journal.create({"p": 1}, {"o": 1}, target="x", rollout_id="r20261129-000001-aaaa")
    b = journal.create({"p": 2}, {"o": 2}, target="y", rollout_id="r20261129-000002-bbbb")
    assert journal.resolve("last") == b
    assert journal.resolve("r20261129-000001") == a
    assert journal.get(a).plan == {"p": 1} and journal.get(a).state == "planned"
    with pytest.raises(NotFoundError):
        journal.resolve("nope")


def test_host_state_from_entries(journal):
    rid = journal.create({}, {})
    journal.record(rid, "h1", 1, "stage", "intended")
    journal.record(rid, "h1", 1, "stage", "done")
    journal.record(rid, "h1", 1, "load", "intended", {"marker": "kpipe-mark-1"})
    s = host_state("h1", journal.entries(rid, "h1"))
    assert s.unfinished == ("load",) and s.marker == "kpipe-mark-1" and s.outcome == ""
    journal.record(rid, "h1", 1, "load", "done")
    journal.record(rid, "h1", 1, "outcome", "done", {"state": "applied"})
    s = host_state("h1", journal.entries(rid, "h1"))
    assert s.unfinished == () and s.outcome == "applied"


CHILD = textwrap.dedent("""
    import os, sys
    from kpipe.store import Store
    from kpipe.rollout.journal import Journal
    j = Journal(Store(sys.argv[1]))
    rid = sys.argv[2]
    j.acquire(rid)
    for i in range(100000):
        j.record(rid, f"h{i % 7}", 1, "load", "intended", {"i": i})
        if i == 50:
            print("ready", flush=True)
        j.record(rid, f"h{i % 7}", 1, "load", "done", {"i": i})
""")


def test_sigkill_mid_write_leaves_a_consistent_journal_and_a_stale_lock(tmp_path):
    store_dir = tmp_path / "store"
    j = Journal(Store(store_dir))
    rid = j.create({}, {})
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(store_dir), rid], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        rec = j.get(rid)
        assert rec.owner_pid == p.pid
        with pytest.raises(Locked) as e:
            j.acquire(rid)
        assert e.value.exit_code == 10
    finally:
        p.kill()
        p.wait()
    entries = j.entries(rid)
    seqs = [e.seq for e in entries]
    assert seqs == list(range(1, len(seqs) + 1))  # no gap, no torn record
    # every `done` follows its `intended`; at most one step is left open
    open_count = sum(1 for h, es in j.iter_hosts(rid) for _ in host_state(h, es).unfinished)
    assert open_count <= 1
    j.acquire(rid)  # the owner is dead: its lock is stale and taken over
    assert j.get(rid).owner_pid == os.getpid()
    j.release(rid)
    assert j.get(rid).owner_pid is None


def test_abort_flag(journal):
    rid = journal.create({}, {})
    assert not journal.abort_requested(rid)
    journal.request_abort(rid)
    assert journal.abort_requested(rid)
    journal.clear_abort(rid)
    assert not journal.abort_requested(rid)


def test_state_detail_merges(journal):
    rid = journal.create({}, {})
    journal.set_state(rid, "running", wave=1)
    journal.set_state(rid, "halted", reason="x")
    rec = journal.get(rid)
    assert rec.state == "halted" and rec.detail == {"wave": 1, "reason": "x"}
    with pytest.raises(ValueError):
        journal.set_state(rid, "bogus")
