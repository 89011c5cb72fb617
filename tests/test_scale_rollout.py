"""Rollouts at scale on SimFleet: worker processes, the journal's write-ahead order, journal reads.

- `kpipe rollout start/resume/rollback --workers N` run the SSH fan-out in N worker processes while
  this one process writes the journal: every host's records stay in order (each step's `intended`
  before its `done`/`failed`, wave by wave), and a write step's `done` is committed when recorded
  (never held back in a batch: a SIGKILL must not lose the record of a load that happened).
- A wave and a gate tick read the journal once, not once per host (a tick of a 1,000-host rollout's
  last wave re-verifies every applied host).
- An open SSH connection does not wake its transport thread 10 times a second while it waits.

The threshold that keeps small fan-outs in-process (kpipe.transport.workers.MIN_HOSTS_PER_WORKER)
is lowered so that 8 hosts use 2 workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import kpipe.transport.workers as workers_mod
from kpipe.artifacts import add_artifact
from kpipe.fleet.inventory import load_inventory
from kpipe.fleet.observe import pool_for
from kpipe.rollout.engine import summarize
from kpipe.rollout.journal import Entry, Journal
from kpipe.rollout.planner import Candidate, FailureBudget, HostView, RolloutOptions, plan_rollout
from kpipe.rollout.world import engine_for
from kpipe.store import Store
from kpipe.workspace import load_workspace, open_workspace
from simfleet import SimFleet, fake_module, simfleet_factory  # noqa: F401  (the fixture)

MODULE = "livepatch_demo"
REPO = Path(__file__).resolve().parent.parent
N = 8
# Steps that change a host: what they did is committed when it is recorded.
WRITE_STEPS = {"stage", "label", "marker", "load", "persist", "retire", "rb-disable", "rb-unload", "rb-unstage",
               "rb-marker", "rb-uninstall", "rb-restore", "rb-restage", "rb-reload"}

# Runs the kpipe CLI in this interpreter with the in-process threshold lowered (8 hosts -> 2 workers), and
# appends the worker count of every process pool it starts to a file (the pool itself is the real one).
CLI = r"""
import runpy, sys
sys.path.insert(0, sys.argv[1])
import kpipe.transport.workers as w
w.MIN_HOSTS_PER_WORKER = 1
real, log = w.ProcessPool._start, sys.argv[2]
def start(self):
    fresh = not self._procs
    real(self)
    if fresh:
        with open(log, "a") as f:
            f.write(f"{len(self._procs)}\n")
w.ProcessPool._start = start
sys.argv = ["kpipe"] + sys.argv[3:]
runpy.run_module("kpipe", run_name="__main__")
"""


@pytest.fixture(scope="module")
def fleet(simfleet_factory) -> SimFleet:  # noqa: F811
    return simfleet_factory(N, prefix="sr")


def _workspace(fleet: SimFleet, folder: Path):
    ws = open_workspace(fleet.write_workspace(folder / "ws", forks=8))
    ko = folder / "livepatch-demo.ko"
    ko.write_bytes(fake_module(MODULE, build_id=os.urandom(20)))
    art = add_artifact(ws.store, ko, kernel=fleet.release, status="valid", arch="x86_64",
                       module_name="livepatch-demo", preflight={"status": "passed"})
    return ws, art


def _plan(ws, art, fleet: SimFleet, hosts, waves: str = "1,50%,100%", soak: float = 0.0,
          interval: float = 10.0, journal: Journal | None = None) -> tuple[Journal, str]:
    # a budget of one failure: the host that is down during the CLI test's start does not halt the rollout
    options = RolloutOptions(waves=waves, forks=8, step_timeout_s=30.0, soak_s=soak, verify_interval_s=interval,
                             max_failures=FailureBudget(count=1))
    views = [HostView(h.name, release=fleet.release, arch="x86_64") for h in hosts]
    plan = plan_rollout(art.id, "artifact", views, [Candidate.of(art)], options)
    journal = journal or Journal(ws.store)
    return journal, journal.create(plan.to_dict(), options.to_dict(), target=art.id)


def _cli(ws_root: Path, log: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KPIPE_WORKSPACE"}
    return subprocess.run([sys.executable, "-c", CLI, str(REPO), str(log), "-W", str(ws_root), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def _check_order(journal: Journal, rid: str, action: str = "apply") -> dict[str, list[Entry]]:
    """Every host's records in write-ahead order, and each wave's host records between the gates around it."""
    by_host = journal.by_host(rid)
    plan = journal.get(rid).plan
    waves = {h: a["wave"] for h, a in plan["assignments"].items()}
    gates: dict[int, list[int]] = {}  # wave -> its gate records (a resume that re-runs a wave adds one)
    for e in by_host.get("", []):
        if e.step == "gate":
            gates.setdefault(e.wave, []).append(e.seq)
    for host, entries in by_host.items():
        if not host:
            continue
        assert [e.seq for e in entries] == sorted(e.seq for e in entries)
        open_steps: dict[str, int] = {}
        for e in entries:
            assert e.wave == waves[host], (host, e)
            if e.step == "outcome":
                assert not open_steps, (host, "outcome with steps still open", open_steps)
                continue
            if e.phase == "intended":
                open_steps[e.step] = e.seq
            else:  # done / failed: after this step's intended, with nothing recorded out of order
                assert e.step in open_steps, (host, f"{e.step} {e.phase} without an intended record before it")
                assert open_steps.pop(e.step) < e.seq
        if action == "apply":
            # wave by wave: a host's apply records lie after the previous wave's gate and before its own
            applied = [e for e in entries
                       if e.detail.get("action", "apply") == "apply" and not e.step.startswith("rb-")]
            lo, hi = min(gates.get(waves[host] - 1, [0])), max(gates.get(waves[host], [0]))
            assert all(lo < e.seq for e in applied), (host, "recorded before the previous wave's gate")
            assert all(e.seq < hi for e in applied), (host, "recorded after its wave's last gate")
    return by_host


def test_cli_rollout_with_workers_keeps_the_journal_in_write_ahead_order(fleet: SimFleet, tmp_path: Path) -> None:
    ws, art = _workspace(fleet, tmp_path)
    journal, rid = _plan(ws, art, fleet, fleet.hosts)
    log = tmp_path / "pools.txt"
    down = fleet.hosts[5]
    down.stop()  # unreachable during start: resume retries it
    try:
        r = _cli(ws.root, log, "rollout", "start", "--plan", rid, "--yes", "--workers", "2", "--json")
    finally:
        down.start()
    assert r.returncode in (0, 6), (r.returncode, r.stderr[-2000:])
    # the fan-out ran in 2 worker processes (the journal is this test's to read: one process wrote it)
    assert log.read_text().split() == ["2"], r.stderr[-2000:]
    s = summarize(journal, rid)
    assert s.hosts[down.name] == "unreachable" and Counter(s.hosts.values())["applied"] == N - 1, s
    _check_order(journal, rid)

    r = _cli(ws.root, log, "rollout", "resume", rid, "--yes", "--workers", "2", "--json")
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert log.read_text().split() == ["2", "2"]
    s = summarize(journal, rid)
    assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s
    by_host = _check_order(journal, rid)
    for h in fleet.hosts:
        assert MODULE in h.patches(), h.name
        loads = [e for e in by_host[h.name] if e.step == "load" and e.phase == "done"]
        assert len(loads) == 1, (h.name, loads)  # the resume loaded nothing twice

    r = _cli(ws.root, log, "rollout", "rollback", rid, "--yes", "--workers", "2", "--json")
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert log.read_text().split() == ["2", "2", "2"]
    assert summarize(journal, rid).state == "rolled_back"
    _check_order(journal, rid, action="rollback")
    assert all(MODULE not in h.patches() for h in fleet.hosts)


class _Watching(Journal):
    """The real journal; after each record it asks another connection whether the record is committed."""

    def __init__(self, store: Store, reader: Store):
        super().__init__(store)
        self.reader = reader
        self.recorded: Counter[tuple[str, str, str]] = Counter()
        self.late: list[tuple[str, str, str]] = []
        self.checked: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, rollout_id: str, host: str, wave: int, step: str, phase: Any,
               detail: dict[str, Any] | None = None) -> int:
        seq = super().record(rollout_id, host, wave, step, phase, detail)
        key = (host, step, str(phase))
        with self._lock:
            self.recorded[key] += 1
            must = host and (str(phase) == "intended" or step == "outcome" or step in WRITE_STEPS)
            if must:
                row = self.reader.query_one("SELECT COUNT(*) AS n FROM journal WHERE rollout_id = ? AND host = ? "
                                            "AND step = ? AND phase = ?", (rollout_id, *key))
                self.checked[f"{step} {phase}"] += 1
                if row["n"] < self.recorded[key]:
                    self.late.append(key)
        return seq


def test_a_write_steps_done_is_committed_at_once_with_workers(fleet: SimFleet, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers_mod, "MIN_HOSTS_PER_WORKER", 1)
    ws, art = _workspace(fleet, tmp_path)
    journal = _Watching(ws.store, Store(ws.store.root))
    journal, rid = _plan(ws, art, fleet, fleet.hosts, journal=journal)
    pool = pool_for(ws, 8, workers=2)
    engine, runner = engine_for(ws, journal, rid, pool=pool)
    try:
        s = engine.start(rid)
        assert pool._procs is not None and len(pool._procs.pids) == 2  # the fan-out ran in 2 worker processes
        assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s
        assert engine.rollback(rid).state == "rolled_back"
    finally:
        runner.close()
    assert not journal.late, journal.late
    for what in ("stage done", "marker done", "load done", "load intended", "rb-unload done"):
        assert journal.checked[what] >= N, (what, journal.checked)
    _check_order(journal, rid, action="rollback")


class _Counting(Journal):
    """The real journal, counting its reads of step records (every read goes through entries())."""

    def __init__(self, store: Store):
        super().__init__(store)
        self.reads = 0

    def entries(self, rollout_id: str, host: str | None = None) -> list[Entry]:
        self.reads += 1
        return super().entries(rollout_id, host)


def test_a_wave_and_a_gate_tick_read_the_journal_once_not_per_host(fleet: SimFleet, tmp_path: Path) -> None:
    reads = {}
    for n in (2, N):
        ws, art = _workspace(fleet, tmp_path / f"n{n}")
        journal = _Counting(ws.store)
        # one wave, a soak of 4 ticks (the sleep between them is skipped)
        journal, rid = _plan(ws, art, fleet, fleet.hosts[:n], waves="100%", soak=2.0, interval=0.5,
                             journal=journal)
        engine, runner = engine_for(ws, journal, rid, pool=pool_for(ws, 8, workers=1))
        engine.sleep = lambda s: None
        try:
            before = journal.reads
            s = engine.start(rid)
            reads[n] = journal.reads - before
            assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s
            assert engine.rollback(rid).state == "rolled_back"
        finally:
            runner.close()
    # the same reads for 2 hosts as for 8: none per host (a wave's states, each tick's gate context)
    assert reads[2] == reads[N], reads
    assert reads[N] <= 4 + 4, reads  # 4 ticks, the wave, the gate records, the summary


def test_an_open_connection_does_not_poll_its_socket_and_closes_at_once(fleet: SimFleet, tmp_path: Path) -> None:
    from kpipe.commands import Command

    ws = load_workspace(fleet.write_workspace(tmp_path / "ws", forks=4))
    host = load_inventory(ws).select(None)[0]
    with pool_for(ws, 4, workers=1) as pool:
        t = pool.transport(host)
        assert t.run(Command(("true",), label="noop")).ok
        transport = t.conn.client.get_transport()
        # paramiko's default (0.1 s) wakes the transport thread 10 times a second for as long as the
        # connection waits for its next command: 10,000 wake-ups a second for 1,000 open connections
        assert transport.sock.gettimeout() >= 10, transport.sock.gettimeout()
        assert t.run(Command(("echo", "again"), label="again")).stdout.strip() == "again"
        t.close()
        transport.join(5)  # the close shuts the socket down: the thread's read ends with EOF, no timeout
        assert not transport.is_alive()
