"""Rollouts never report what is not true (issue 8, section 2: items 1, 6, 8, 9, 16), on SimFleet.

Each test reproduces a defect on simulated hosts (real sshd, simulated livepatch sysfs): a refused
rollout undoing an earlier one, verification by module name only, partial staging files left
forever, two rollouts driving the same hosts, status and resume after a crashed rollback, a
progress printer aborting the engine, a recipe that no longer renders, the engine's env test hook.
Kill points come from tests/crashpoint.py (test code; the engine has no hook).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kpipe.artifacts import add_artifact
from kpipe.fleet import livepatch as lp
from kpipe.rollout.engine import summarize
from kpipe.rollout.journal import Journal
from kpipe.rollout.planner import Candidate, HostView, RolloutOptions, plan_rollout
from kpipe.rollout.world import engine_for
from kpipe.workspace import open_workspace
from simfleet import fake_module, simfleet_factory  # noqa: F401  (the session fixture)

MODULE = "livepatch_demo"
CRASHPOINT = str(Path(__file__).with_name("crashpoint.py"))


def release_of(fleet) -> str:
    return fleet.release


def workspace(fleet, tmp_path: Path):
    return open_workspace(fleet.write_workspace(tmp_path / "ws", forks=50))


BUILD_IDS: dict[str, str] = {}  # artifact id -> the build-id written into it


def artifact(ws, fleet, tmp_path: Path, tag: str, **fields):
    """A build of livepatch-demo.ko with its own GNU build-id (tag: which build)."""
    ko = tmp_path / tag / "livepatch-demo.ko"
    ko.parent.mkdir(parents=True, exist_ok=True)
    build_id = os.urandom(20)
    ko.write_bytes(fake_module(MODULE, build_id=build_id))
    art = add_artifact(ws.store, ko, kernel=release_of(fleet), status="valid", arch="x86_64",
                        module_name="livepatch-demo", preflight={"status": "passed"}, **fields)
    BUILD_IDS[art.id] = build_id.hex()
    return art


def make_plan(ws, fleet, art, hosts, **opts):
    options = RolloutOptions(**{"waves": "100%", "forks": 50, "step_timeout_s": 30.0, **opts})
    views = [HostView(h.name, release=release_of(fleet), arch="x86_64") for h in hosts]
    plan = plan_rollout(art.id, "artifact", views, [Candidate.of(art)], options)
    journal = Journal(ws.store)
    return plan, journal, journal.create(plan.to_dict(), options.to_dict(), target=art.id)


def run(ws, journal, rid, what="start", on_event=None, **kw):
    engine, runner = engine_for(ws, journal, rid, on_event=on_event)
    try:
        return getattr(engine, what)(rid, **kw)
    finally:
        runner.close()


def kpipe(ws, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws.root), *args], capture_output=True,
                          text=True, timeout=timeout)


def crash(ws, spec: dict, *args, timeout=300) -> subprocess.CompletedProcess:
    """Run the kpipe CLI under tests/crashpoint.py until the kill point (it must be reached)."""
    r = subprocess.run([sys.executable, CRASHPOINT, json.dumps(spec), "-W", str(ws.root), *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == -9 and "crashpoint: killed at" in r.stderr, (r.returncode, r.stderr[-2000:])
    return r


def enabled(host) -> bool:
    p = host.patches().get(MODULE)
    return bool(p) and p["enabled"] == "1" and p["transition"] == "0"


def loaded_build_id(host) -> str:
    """The build-id the simulated kernel shows (one GNU note: a 12-byte header, "GNU\\0", the id)."""
    note = host.sysmod / MODULE / "notes" / ".note.gnu.build-id"
    return note.read_bytes()[16:].hex() if note.exists() else ""


def identity(ws, art) -> str:
    return BUILD_IDS[art.id]


# -- item 1 ---------------------------------------------------------------------------------
def test_refused_rollout_does_not_undo_the_earlier_one(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws = workspace(fleet, tmp_path)
    a = artifact(ws, fleet, tmp_path, "a")
    b = artifact(ws, fleet, tmp_path, "b")
    _, journal, rid_a = make_plan(ws, fleet, a, fleet.hosts)
    assert run(ws, journal, rid_a).state == "completed"
    _, _, rid_b = make_plan(ws, fleet, b, fleet.hosts)
    s = run(ws, journal, rid_b)
    # B is refused at preflight on both hosts: it changed nothing, so it rolls nothing back
    assert s.state == "halted" and set(s.hosts.values()) == {"failed"}, s
    assert all("different build" in s.reasons[h.name] for h in fleet.hosts), s.reasons
    assert not any(e.step.startswith("rb-") for e in journal.entries(rid_b))
    for h in fleet.hosts:
        assert enabled(h), h.patches()
        assert loaded_build_id(h) == identity(ws, a)
        assert list(h.staged().values()) == [ws.store.get_bytes(a.sha256)]
    assert set(summarize(journal, rid_a).hosts.values()) == {"applied"}
    r = kpipe(ws, "verify")
    assert r.returncode == 0, r.stdout + r.stderr


def test_verify_compares_the_loaded_build_not_the_name(simfleet_factory, tmp_path):
    fleet = simfleet_factory(1)
    ws = workspace(fleet, tmp_path)
    a = artifact(ws, fleet, tmp_path, "a")
    _, journal, rid = make_plan(ws, fleet, a, fleet.hosts)
    assert run(ws, journal, rid).state == "completed"
    host = fleet.hosts[0]
    assert kpipe(ws, "verify").returncode == 0
    # behind kpipe's back: another build of the same module replaces it (the staged file stays A's)
    other = tmp_path / "other.ko"
    other.write_bytes(fake_module(MODULE, build_id=os.urandom(20)))
    script = (f"echo 0 > /sys/kernel/livepatch/{MODULE}/enabled && "
              f"while [ -d /sys/kernel/livepatch/{MODULE} ]; do sleep 0.05; done && "
              f"/sbin/rmmod {MODULE} && /sbin/insmod {other}")
    r = subprocess.run(host.ssh_argv(script), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    time.sleep(0.5)  # the simulated transition
    assert enabled(host) and loaded_build_id(host) != identity(ws, a)
    r = kpipe(ws, "verify", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "build-id" in r.stdout
    # the engine's own verification (soak, resume re-check) tells the builds apart the same way
    from kpipe.transport.ssh import SshPool

    with SshPool(ws.ssh, known_hosts=[fleet.known_hosts]) as pool:
        t = pool.transport(host.target())
        v = lp.verify_loaded(t, MODULE, "", None, lp.ModuleIdentity(identity(ws, a)))
    assert not v.ok and any("another build" in p for p in v.problems), v.problems


# -- item 6 ---------------------------------------------------------------------------------
def test_partial_upload_left_by_a_kill_is_removed_by_resume_and_by_rollback(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws = workspace(fleet, tmp_path)
    a = artifact(ws, fleet, tmp_path, "a")
    for what in ("resume", "rollback"):
        _, journal, rid = make_plan(ws, fleet, a, fleet.hosts, forks=1)
        crash(ws, {"event": "put", "nth": 2, "when": "partial"}, "rollout", "start", "--plan", rid, "--yes")
        left = {h.name: h.temp_files() for h in fleet.hosts}
        assert sum(len(v) for v in left.values()) == 1, left  # the half-written copy on the second host
        s = run(ws, journal, rid, what)
        assert s.state == ("completed" if what == "resume" else "rolled_back"), s
        assert all(not h.temp_files() for h in fleet.hosts), {h.name: h.temp_files() for h in fleet.hosts}
        if what == "resume":
            assert all(enabled(h) for h in fleet.hosts)
            assert run(ws, journal, rid, "rollback").state == "rolled_back"
        assert all(not h.staged() and MODULE not in h.modules() for h in fleet.hosts)


# -- item 8 ---------------------------------------------------------------------------------
def test_two_rollouts_never_drive_the_same_host(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws = workspace(fleet, tmp_path)
    a = artifact(ws, fleet, tmp_path, "a")
    _, journal, rid_x = make_plan(ws, fleet, a, fleet.hosts)
    hold = json.dumps({"event": "record", "match": {"step": "load", "phase": "done"}, "nth": 999, "hold": True})
    x = subprocess.Popen([sys.executable, CRASHPOINT, hold, "-W", str(ws.root), "rollout", "start", "--plan",
                          rid_x, "--yes"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        held = 0
        while held < 2:  # X has loaded on both hosts and not verified yet
            line = x.stderr.readline()
            assert line, "the first rollout ended before its hold point"
            held += line.startswith("crashpoint: holding")
        r = kpipe(ws, "rollout", "start", a.id, "--waves", "100%", "--yes", "--json")
        assert r.returncode == 10, r.stdout + r.stderr
        assert rid_x in r.stderr and "one rollout per host" in r.stderr
        rid_y = journal.resolve("last")
        assert rid_y != rid_x and journal.entries(rid_y) == []  # Y touched no host
    finally:
        x.kill()
        x.wait()
    # X's driver is dead: its locks are stale, X resumes and finishes
    s = run(ws, journal, rid_x, "resume")
    assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s
    assert all(enabled(h) for h in fleet.hosts)


# -- item 9 ---------------------------------------------------------------------------------
def test_status_and_resume_after_a_crashed_rollback(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws = workspace(fleet, tmp_path)
    a = artifact(ws, fleet, tmp_path, "a")
    _, journal, rid = make_plan(ws, fleet, a, fleet.hosts, forks=1)
    assert run(ws, journal, rid).state == "completed"
    # killed once the first host's patch is disabled and removed, before its outcome is journaled
    crash(ws, {"event": "record", "match": {"step": "rb-unload", "phase": "done"}, "nth": 1},
          "rollout", "rollback", rid)
    r = kpipe(ws, "rollout", "status", rid, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    first = fleet.hosts[0]
    assert MODULE not in first.modules()
    assert st["hosts"][first.name] == "interrupted", st
    assert "rb-unload" in st["reasons"][first.name]
    assert st["owner_pid"] is None  # the killed kpipe is nobody's driver
    r = kpipe(ws, "rollout", "status", rid)
    assert "driven by pid" not in r.stdout
    r = kpipe(ws, "rollout", "resume", rid, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["state"] == "rolled_back"
    r = kpipe(ws, "rollout", "resume", rid)  # a finished rollback stays a success
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(not h.staged() and MODULE not in h.modules() for h in fleet.hosts)


def test_abort_of_a_crashed_rollout(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws = workspace(fleet, tmp_path)
    a = artifact(ws, fleet, tmp_path, "a")
    _, journal, rid = make_plan(ws, fleet, a, fleet.hosts, forks=1)
    crash(ws, {"event": "record", "match": {"step": "load", "phase": "done"}, "nth": 1},
          "rollout", "start", "--plan", rid, "--yes")
    assert journal.get(rid).state == "running"
    r = kpipe(ws, "rollout", "abort", rid)
    assert r.returncode == 0, r.stderr
    assert journal.get(rid).state == "aborted"
    r = kpipe(ws, "rollout", "status", rid)
    assert "driven by pid" not in r.stdout
    s = run(ws, journal, rid, "resume")  # and it can still be finished
    assert s.state == "completed" and all(enabled(h) for h in fleet.hosts)


# -- progress callback, item 16 ---------------------------------------------------------------
def test_a_failing_progress_printer_never_aborts_the_engine(simfleet_factory, tmp_path, capfd):
    fleet = simfleet_factory(2)
    ws = workspace(fleet, tmp_path)
    a = artifact(ws, fleet, tmp_path, "a")
    _, journal, rid = make_plan(ws, fleet, a, fleet.hosts, waves="1,100%")

    def printer(ev):
        raise ValueError("closing tag '[/x]' does not match")
    s = run(ws, journal, rid, on_event=printer)
    assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s
    err = capfd.readouterr().err
    assert err.count("progress display failed") == 1


def test_a_recipe_that_does_not_render_is_an_error_unless_no_probe(simfleet_factory, tmp_path):
    fleet = simfleet_factory(1)
    ws = workspace(fleet, tmp_path)
    a = artifact(ws, fleet, tmp_path, "a", recipe="gone-recipe")
    r = kpipe(ws, "rollout", "plan", a.id, "--json")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "gone-recipe" in r.stderr and "does not render" in r.stderr and "--no-probe" in r.stderr
    assert "Traceback" not in r.stderr
    r = kpipe(ws, "rollout", "start", a.id, "--yes", "--waves", "100%")
    assert r.returncode == 4 and "does not render" in r.stderr
    assert not fleet.hosts[0].staged()
    r = kpipe(ws, "rollout", "plan", a.id, "--no-probe", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["probes"] == {}


def test_the_engine_reads_no_test_hook_from_the_environment(simfleet_factory, tmp_path):
    fleet = simfleet_factory(1)
    ws = workspace(fleet, tmp_path)
    a = artifact(ws, fleet, tmp_path, "a")
    _, journal, rid = make_plan(ws, fleet, a, fleet.hosts)
    env = {**os.environ, "KPIPE_TEST_PAUSE_AFTER": "load", "KPIPE_TEST_PAUSE_SECONDS": "600"}
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws.root), "rollout", "start", "--plan", rid,
                        "--yes"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "test pause" not in r.stderr
    assert summarize(journal, rid).state == "completed"


# -- pure parts of the build comparison ------------------------------------------------------
def test_desired_state_keeps_a_build_that_another_builds_rollback_did_not_touch():
    from kpipe.audit import AppliedRecord, desired_from_records

    a, b = "a" * 64, "b" * 64
    recs = [AppliedRecord(1, "r1", "h1", MODULE, "applied", "aaaa", a, "k"),
            AppliedRecord(2, "r2", "h1", MODULE, "rolled_back", "bbbb", b, "k")]
    want = desired_from_records(recs).for_host("h1")
    assert MODULE in want and want[MODULE].sha256 == a
    recs.append(AppliedRecord(3, "r1", "h1", MODULE, "rolled_back", "aaaa", a, "k"))
    assert MODULE not in desired_from_records(recs).for_host("h1")


def test_state_script_output_carries_the_loaded_build():
    note = (4).to_bytes(4, "little") + (20).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"GNU\0" + \
        bytes(range(20))
    out = (f"livepatch_sysfs 1\ntainted 32768\nmodule {MODULE} 1 OEK\nnotes {MODULE} {note.hex()}\n"
           f"srcversion {MODULE} 9F1C0A\nend\n")
    st = lp.parse_host_livepatch(out)
    assert st.module(MODULE).build_id == bytes(range(20)).hex()
    assert st.module(MODULE).srcversion == "9F1C0A"
    ours = lp.ModuleIdentity(bytes(range(20)).hex())
    assert ours.differs(st.module(MODULE).identity()) == ""
    assert "build-id" in lp.ModuleIdentity("ff" * 20).differs(st.module(MODULE).identity())
    assert lp.ModuleIdentity("", "9F1C0A").differs(lp.ModuleIdentity("", "000000")).startswith("srcversion")
