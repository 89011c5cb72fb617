"""Scale-out on one machine: the fan-out over worker processes (kpipe.transport.workers) on SimFleet.

Worker processes must change nothing but where the SSH work runs: the same observations, the
same journaled step sequence per host with write-ahead kept, a killed worker is a per-host error
(never a hang), and a SIGKILLed parent leaves no host in an unknown state after resume.
The threshold that keeps small fan-outs in-process is lowered so that ~20 hosts use 2 workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import kpipe.transport.workers as workers_mod
from kpipe.artifacts import add_artifact
from kpipe.errors import TransportError
from kpipe.fleet.inventory import load_inventory
from kpipe.fleet.observe import Observation, observe, pool_for
from kpipe.rollout.engine import summarize
from kpipe.rollout.journal import Journal, host_state
from kpipe.rollout.planner import Candidate, HostView, RolloutOptions, plan_rollout
from kpipe.rollout.world import engine_for
from kpipe.workspace import load_workspace, open_workspace
from simfleet import SimFleet, fake_module, simfleet_factory  # noqa: F401  (the fixture)

MODULE = "livepatch_demo"
TESTS = Path(__file__).resolve().parent
CRASHPOINT = str(TESTS / "crashpoint.py")
N = 20


@pytest.fixture(autouse=True)
def _workers_for_small_fleets(monkeypatch: pytest.MonkeyPatch) -> None:
    # 20 hosts would stay in-process (MIN_HOSTS_PER_WORKER): these tests are about the workers
    monkeypatch.setattr(workers_mod, "MIN_HOSTS_PER_WORKER", 1)


@pytest.fixture(scope="module")
def fleet(simfleet_factory) -> SimFleet:  # noqa: F811
    return simfleet_factory(N, prefix="w")


def _comparable(o: object) -> object:
    """An observation without what changes between two reads of the same host (free disk space)."""
    if isinstance(o, Observation):
        d = o.facts.to_dict()
        d.pop("free_kb", None)
        return (o.host, d, o.livepatch, o.dmesg)
    return (type(o).__name__, str(o))


def test_workers_observe_the_same_as_in_process(fleet: SimFleet, tmp_path: Path) -> None:
    ws = load_workspace(fleet.write_workspace(tmp_path / "ws", forks=8))
    hosts = load_inventory(ws).select(None)
    fleet.hosts[4].inject("refused")  # a failure is an observation too
    try:
        seen = {}
        for n in (1, 2):
            with pool_for(ws, 8, workers=n) as pool:
                seen[n] = observe(ws, hosts, 8, pool=pool, modules={h.name: [MODULE] for h in hosts}, dmesg=True)
                # the fan-out really ran in worker processes (and only then): no connection in this process
                assert (pool._procs is not None) == (n > 1)
                if n > 1:
                    assert len(pool._procs.pids) == 2 and not pool._transports
        assert list(seen[1]) == list(seen[2]) == [h.name for h in hosts]
        assert {k: _comparable(v) for k, v in seen[1].items()} == {k: _comparable(v) for k, v in seen[2].items()}
        bad = seen[2][fleet.hosts[4].name]
        assert isinstance(bad, TransportError) and bad.kind == "refused"
        assert sum(isinstance(v, Observation) for v in seen[2].values()) == N - 1
    finally:
        fleet.hosts[4].clear()


def test_a_killed_worker_is_a_per_host_error_and_the_fan_out_ends(fleet: SimFleet, tmp_path: Path) -> None:
    ws = load_workspace(fleet.write_workspace(tmp_path / "ws", forks=N))
    hosts = load_inventory(ws).select(None)
    for h in fleet.hosts:
        h.inject("hang", op="uname", seconds=4)  # every host busy for a while: the kill lands mid-run
    try:
        with pool_for(ws, N, workers=2) as pool:
            procs = pool._process_pool(len(hosts))
            victim = procs.transport(hosts[0]).worker
            out: dict = {}
            runner = threading.Thread(target=lambda: out.update(observe(ws, hosts, N, pool=pool, timeout=60)))
            runner.start()
            deadline = time.monotonic() + 60
            while not victim._pending and time.monotonic() < deadline:
                time.sleep(0.02)
            assert victim._pending, "the worker never got a request"
            os.kill(victim.pid, signal.SIGKILL)
            runner.join(120)
            assert not runner.is_alive(), "the fan-out hung after its worker died"
            mine = {name for name, i in procs._assigned.items() if procs._procs[i] is victim}
    finally:
        for h in fleet.hosts:
            h.clear()
    assert mine and len(mine) < N
    for name, v in out.items():
        if name in mine:
            assert isinstance(v, TransportError) and "worker process" in str(v), (name, v)
        else:
            assert isinstance(v, Observation), (name, v)


def _workspace(fleet: SimFleet, folder: Path, extra_toml: str = ""):
    ws = open_workspace(fleet.write_workspace(folder / "ws", forks=10, extra_toml=extra_toml))
    ko = folder / "livepatch-demo.ko"
    ko.write_bytes(fake_module(MODULE, build_id=os.urandom(20)))
    art = add_artifact(ws.store, ko, kernel=fleet.release, status="valid", arch="x86_64",
                       module_name="livepatch-demo", preflight={"status": "passed"})
    return ws, art


def _plan(ws, art, fleet: SimFleet, hosts, waves: str = "1,50%,100%") -> tuple[Journal, str]:
    options = RolloutOptions(waves=waves, forks=10, step_timeout_s=30.0)
    views = [HostView(h.name, release=fleet.release, arch="x86_64") for h in hosts]
    plan = plan_rollout(art.id, "artifact", views, [Candidate.of(art)], options)
    journal = Journal(ws.store)
    return journal, journal.create(plan.to_dict(), options.to_dict(), target=art.id)


def _enables(h) -> int:
    return sum(1 for ln in h.log() if f"enabling patch '{MODULE}'" in ln)


def _cleanup(journal: Journal, ws, rid: str) -> None:
    engine, runner = engine_for(ws, journal, rid)
    try:
        assert engine.rollback(rid).state == "rolled_back"
    finally:
        runner.close()


def test_rollout_with_workers_journals_the_same_steps_write_ahead(fleet: SimFleet, tmp_path: Path) -> None:
    sequences = {}
    for n in (1, 2):
        ws, art = _workspace(fleet, tmp_path / f"w{n}")
        journal, rid = _plan(ws, art, fleet, fleet.hosts)
        pool = pool_for(ws, 10, workers=n)
        engine, runner = engine_for(ws, journal, rid, pool=pool)
        try:
            s = engine.start(rid)
            assert (pool._procs is not None) == (n > 1)
        finally:
            runner.close()
        assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s
        sequences[n] = {}
        for h in fleet.hosts:
            es = journal.entries(rid, h.name)
            sequences[n][h.name] = [(e.step, str(e.phase)) for e in es]
            # write-ahead, per host: every step's intended is journaled before its done
            for i, e in enumerate(es):
                if e.step != "outcome" and e.phase != "intended":
                    assert any(x.step == e.step and x.phase == "intended" for x in es[:i]), (h.name, e.step)
            assert [e.seq for e in es] == sorted(e.seq for e in es)
        _cleanup(journal, ws, rid)
    assert sequences[1] == sequences[2]


def test_sigkill_of_the_parent_mid_wave_then_resume_leaves_no_host_unknown(fleet: SimFleet, tmp_path: Path) -> None:
    ws, art = _workspace(fleet, tmp_path, extra_toml="workers = 2\n")
    journal, rid = _plan(ws, art, fleet, fleet.hosts, waves="100%")
    before = {h.name: _enables(h) for h in fleet.hosts}
    # the parent dies right after the 6th host's load was journaled `intended` (others are in flight in
    # both workers): crashpoint.py, with the in-process threshold lowered in that process too
    spec = {"event": "record", "match": {"step": "load", "phase": "intended"}, "nth": 6, "when": "after"}
    code = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); import kpipe.transport.workers as w; "
            "w.MIN_HOSTS_PER_WORKER = 1; sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, str(TESTS.parent), CRASHPOINT, json.dumps(spec),
                        "-W", str(ws.root), "rollout", "start", "--plan", rid, "--yes"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9 and "crashpoint: killed at" in r.stderr, (r.returncode, r.stderr[-2000:])
    engine, runner = engine_for(ws, journal, rid, pool=pool_for(ws, 10, workers=2))
    try:
        s = engine.resume(rid)
    finally:
        runner.close()
    unknown = {h: st for h, st in s.hosts.items() if st not in ("applied",)}
    assert s.state == "completed" and not unknown, (unknown, s.reasons)
    final = summarize(journal, rid)
    for h in fleet.hosts:
        assert final.hosts[h.name] == "applied"
        assert not host_state(h.name, journal.entries(rid, h.name)).unfinished
        # loaded once: the kill and the resume never load a module twice
        assert _enables(h) - before[h.name] == 1, h.name
    _cleanup(journal, ws, rid)


class _Counting:
    """A fan-out that counts the commands each host is sent (the real pool runs them)."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.runs: dict[str, int] = {}
        self.lock = threading.Lock()

    def run_many(self, targets, fn, forks=None):
        def counted(t):
            real = t.run

            class T:
                name = t.name

                def run(_self, cmd):
                    with self.lock:
                        self.runs[t.name] = self.runs.get(t.name, 0) + 1
                    return real(cmd)

                def put(_self, local, remote):
                    return t.put(local, remote)

            return fn(T())

        return self.pool.run_many(targets, counted, forks)


def test_an_audit_read_is_one_round_trip_per_host(fleet: SimFleet, tmp_path: Path) -> None:
    ws = load_workspace(fleet.write_workspace(tmp_path / "ws", forks=8))
    hosts = load_inventory(ws).select(None)[:4]
    with pool_for(ws, 8, workers=1) as pool:
        fan = _Counting(pool)
        seen = observe(ws, hosts, 8, pool=fan, modules={h.name: [MODULE, "other_mod"] for h in hosts})
    assert fan.runs == {h.name: 1 for h in hosts}
    for o in seen.values():
        assert isinstance(o, Observation) and o.livepatch is not None
        assert set(o.livepatch.modules) == {MODULE, "other_mod"}  # the modules' /sys/module state was read
        assert o.livepatch.patches == o.facts.patches


def test_journal_batches_done_records_and_commits_intended_ones_at_once(tmp_path: Path) -> None:
    from kpipe.store import Store

    writer = Journal(Store(tmp_path / "store"))
    rid = writer.create({"hosts": []}, {})
    reader = Journal(Store(tmp_path / "store"))  # another connection: sees only what is committed

    def seen() -> list[tuple[str, str, str]]:
        rows = reader.store.query("SELECT host, step, phase FROM journal WHERE rollout_id = ? ORDER BY seq", (rid,))
        return [(r["host"], r["step"], r["phase"]) for r in rows]

    writer.record(rid, "a", 1, "stage", "intended")
    assert seen() == [("a", "stage", "intended")]  # write-ahead: committed before the action may run
    writer.record(rid, "a", 1, "stage", "done")
    assert seen()[-1] == ("a", "stage", "done")  # what a write did is kept at once
    writer.record(rid, "a", 1, "verify", "intended")
    writer.record(rid, "a", 1, "verify", "done")
    writer.record(rid, "b", 1, "wait", "failed", {"error": "x"})
    assert seen()[-1] == ("a", "verify", "intended")  # a read step's done/failed waits for the next durable one
    writer.record(rid, "a", 1, "load", "intended")  # ... which carries them, in order, in one transaction
    assert seen()[-3:] == [("a", "verify", "done"), ("b", "wait", "failed"), ("a", "load", "intended")]
    writer.record(rid, "a", 1, "preflight", "done")
    assert [(e.step, str(e.phase)) for e in writer.entries(rid, "a")][-1] == ("preflight", "done")  # reads flush
    writer.record(rid, "a", 1, "outcome", "done", {"state": "applied"})
    assert seen()[-1] == ("a", "outcome", "done")  # an outcome is never held back
    assert writer.stats.records == 8 and writer.stats.transactions == 6
    unbatched = Journal(Store(tmp_path / "store"), batch=False)
    unbatched.record(rid, "c", 1, "stage", "done")
    assert seen()[-1] == ("c", "stage", "done") and unbatched.stats.transactions == 1
