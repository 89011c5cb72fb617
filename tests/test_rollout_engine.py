"""The rollout engine against SimFleet: real sshd hosts on loopback, a simulated kernel, injected faults.

Every run must end with every host in a known, journaled state; resume must apply
nothing twice and forget nothing. Plans are built with the pure planner from the
simulated hosts' known release (the engine's own preflight re-reads the real facts).

Kill points: tests/crashpoint.py runs the CLI with the journal wrapped (test code only), so a
test can hold kpipe after it journaled a step, or SIGKILL it there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kpipe.rollout.engine import summarize
from kpipe.rollout.journal import host_state
from kpipe.rollout.planner import FailureBudget
from kpipe.rollout.world import engine_for
from rollout_world import MODULE, RELEASE, artifact_ws, run_engine, stored_plan
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)


def setup_ws(fleet, tmp_path: Path, n_bytes: int = 4096):
    return artifact_ws(fleet, tmp_path, n_bytes=n_bytes)


def make_plan(ws, art, hosts, **opts):
    return stored_plan(ws, art, [h.name for h in hosts],
                       **{"waves": "1,10%,50%,100%", "forks": 50, "step_timeout_s": 30.0, **opts})


def run(ws, journal, rid, what="start", **kw):
    return run_engine(engine_for, ws, journal, rid, what, **kw)


def enabled(host) -> bool:
    p = host.patches().get(MODULE)
    return bool(p) and str(p.get("enabled")) == "1" and str(p.get("transition")) == "0"


def enables(host) -> int:
    return sum(1 for ln in host.log() if f"enabling patch '{MODULE}'" in ln)


def test_happy_rollout_then_rollback(simfleet_factory, tmp_path):
    fleet = simfleet_factory(5)
    ws, art = setup_ws(fleet, tmp_path)
    plan, journal, rid = make_plan(ws, art, fleet.hosts, waves="1,100%", soak_s=1.0, verify_interval_s=0.5)
    s, events = run(ws, journal, rid)
    assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s
    assert all(enabled(h) for h in fleet.hosts)
    assert [e.wave for e in events if e.kind == "gate"] == [1, 2]
    assert sum(1 for e in events if e.kind == "soak") == 4  # 2 rounds per wave
    # write-ahead: each step's intended precedes its done, for every host
    for h in fleet.hosts:
        es = journal.entries(rid, h.name)
        for step in ("preflight", "stage", "marker", "load", "wait", "verify"):
            phases = [e.phase for e in es if e.step == step]
            assert phases == ["intended", "done"], (h.name, step, phases)
        staged = h.staged()
        assert list(staged.values()) == [ws.store.get_bytes(art.sha256)]
    s, _ = run(ws, journal, rid, "rollback")
    assert s.state == "rolled_back" and set(s.hosts.values()) == {"rolled_back"}
    for h in fleet.hosts:
        assert MODULE not in h.patches() and MODULE not in h.modules() and not h.staged()
        assert any(f"'{MODULE}': unpatching complete" in ln for ln in h.log())


def test_dry_run_changes_nothing(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws, art = setup_ws(fleet, tmp_path)
    plan, journal, rid = make_plan(ws, art, fleet.hosts)
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws.root), "rollout", "start", "--plan", rid,
                        "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for h in fleet.hosts:
        assert h.name in r.stdout
        assert not h.patches() and not h.staged()
    assert f"/sbin/insmod /var/lib/kpatch/{RELEASE}/livepatch-demo.ko" in r.stdout
    assert journal.entries(rid) == []


FAULTS = {  # fault -> (inject kwargs, expected final state after the run)
    "refused": ({}, "unreachable"),
    "die_during": ({"op": "insmod"}, "unreachable"),
    "hang": ({"op": "insmod", "seconds": 3600}, "failed"),
    "stuck_transition": ({"stall_after": 0.5}, "failed"),
    "ebusy_enable": ({}, "failed"),
    "full_disk": ({}, "failed"),
    "sig_enforce": ({}, "failed"),
}


@pytest.mark.slow
def run_cli(ws, journal, rid, *args: str):
    """`kpipe rollout ARGS` as its own process, as operators run it, then the journal's summary. A fleet this
    large runs kpipe out of the test's process: in-process, kpipe's hundreds of threads would share one GIL
    with the simulated kernels' thread, which then reacts to `echo 0 > enabled` seconds late on a loaded
    machine, and a step timeout measures the harness, not kpipe."""
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws.root), "rollout", *args], capture_output=True,
                       text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert "Traceback" not in r.stderr and r.returncode in (0, 1, 8), (r.returncode, r.stderr[-2000:])
    return summarize(journal, rid)


def test_200_hosts_with_faults_end_in_known_journaled_states(simfleet_factory, tmp_path):
    fleet = simfleet_factory(200)
    ws, art = setup_ws(fleet, tmp_path, n_bytes=64 * 1024)  # bigger than the full disk's 16 KiB
    faulty = {}
    names = sorted(FAULTS)
    for i, h in enumerate(fleet.hosts[5::9][:len(names) * 3]):  # 3 hosts per fault, never the canary
        fault = names[i % len(names)]
        h.inject(fault, **FAULTS[fault][0])
        faulty[h.name] = fault
    plan, journal, rid = make_plan(ws, art, fleet.hosts, max_failures=FailureBudget.parse("100%"),
                                   step_timeout_s=15.0)
    t0 = time.monotonic()
    s = run_cli(ws, journal, rid, "start", "--plan", rid, "--yes")
    took = time.monotonic() - t0
    assert s.state == "completed"
    assert len(s.hosts) == 200
    for h in fleet.hosts:
        want = FAULTS[faulty[h.name]][1] if h.name in faulty else "applied"
        assert s.hosts[h.name] == want, (h.name, faulty.get(h.name), s.reasons.get(h.name))
        st = host_state(h.name, journal.entries(rid, h.name))
        assert st.outcome == want and not st.unfinished or want == "unreachable"
        if want == "applied":
            assert enabled(h) and enables(h) == 1
    reasons = {faulty[h]: s.reasons[h] for h in faulty}
    assert "timed out" in reasons["hang"]
    assert "transition" in reasons["stuck_transition"]
    assert "free space" in reasons["full_disk"]
    assert "busy" in reasons["ebusy_enable"].lower()
    assert "rejected" in reasons["sig_enforce"].lower()
    print(f"rollout of 200 hosts, {len(faulty)} faulty: {took:.1f} s; "
          f"slowest simulator step {fleet.slowest_step_s:.2f} s")
    # now the hosts come back; resume retries the unreachable ones without loading anything twice
    for name, fault in faulty.items():
        fleet.host(name).clear()
        if fault in ("refused", "die_during"):
            fleet.host(name).start()
    # a completed rollout is finished: roll everything back, then every host ends rolled_back
    t0 = time.monotonic()
    s = run_cli(ws, journal, rid, "rollback", rid, "--yes")
    print(f"rollback of 200 hosts: {time.monotonic() - t0:.1f} s; slowest simulator step {fleet.slowest_step_s:.2f} s")
    for h in fleet.hosts:
        if faulty.get(h.name) in ("refused", "full_disk"):
            # never touched (unreachable; refused by kpipe's own free-space preflight): nothing to roll back
            want = "unreachable" if faulty[h.name] == "refused" else "failed"
            assert s.hosts[h.name] == want and not h.staged() and not h.modules()
            continue
        assert s.hosts[h.name] == "rolled_back", (h.name, s.hosts[h.name], s.reasons.get(h.name))
        assert MODULE not in h.patches() and MODULE not in h.modules() and not h.staged()
    # the hosts that died mid-insmod had the module loaded by the kernel: rollback removed it
    for name, fault in faulty.items():
        if fault == "die_during":
            assert s.hosts[name] == "rolled_back" and MODULE not in fleet.host(name).modules()
    assert fleet.errors() == []


def test_gate_halts_and_rolls_back_the_wave(simfleet_factory, tmp_path):
    fleet = simfleet_factory(10)
    ws, art = setup_ws(fleet, tmp_path)
    plan, journal, rid = make_plan(ws, art, fleet.hosts, waves="1,50%,100%", rollback_policy="wave")
    bad = plan.waves[1][2]
    fleet.host(bad).inject("ebusy_enable")
    s, events = run(ws, journal, rid)
    assert s.state == "halted" and bad in s.halt_reason
    wave1, wave2, wave3 = plan.waves
    assert all(s.hosts[h] == "applied" for h in wave1)
    assert all(s.hosts[h] == "rolled_back" for h in wave2 if h != bad)
    assert s.hosts[bad] == "rolled_back"  # nothing loaded; cleanup verified anyway
    assert all(s.hosts[h] == "pending" for h in wave3)
    for h in wave3:
        assert not fleet.host(h).staged() and not fleet.host(h).patches()
    assert enabled(fleet.host(wave1[0]))
    assert [e.phase for e in events if e.kind == "gate"] == ["proceed", "halt"]


def test_soak_regression_halts(simfleet_factory, tmp_path):
    fleet = simfleet_factory(3)
    ws, art = setup_ws(fleet, tmp_path)
    plan, journal, rid = make_plan(ws, art, fleet.hosts, waves="1,100%", soak_s=3.0, verify_interval_s=1.0,
                                   rollback_policy="all")
    canary = fleet.host(plan.waves[0][0])

    def regress(ev):
        if ev.kind == "soak" and ev.wave == 1 and ev.data["round"] == 1:
            canary.reboot()  # the patch is gone: a regression during the soak
    engine, runner = engine_for(ws, journal, rid, on_event=regress)
    try:
        s = engine.start(rid)
    finally:
        runner.close()
    assert s.state == "rolled_back"
    assert "regressed during soak" in s.halt_reason
    assert s.hosts[canary.name] == "rolled_back"
    assert all(s.hosts[h] == "pending" for h in plan.waves[1])


def test_abort_stops_after_in_flight_hosts(simfleet_factory, tmp_path):
    fleet = simfleet_factory(6)
    ws, art = setup_ws(fleet, tmp_path)
    plan, journal, rid = make_plan(ws, art, fleet.hosts, waves="1,100%", forks=1)

    def on_event(ev):
        if ev.kind == "host" and ev.wave == 2 and ev.phase == "applied":
            journal.request_abort(rid)  # what `kpipe rollout abort` does, from another process
    engine, runner = engine_for(ws, journal, rid, on_event=on_event)
    try:
        s = engine.start(rid)
    finally:
        runner.close()
    assert s.state == "aborted"
    states = [s.hosts[h] for h in plan.waves[1]]
    assert states[0] == "applied" and set(states[1:]) == {"pending"}
    s, _ = run(ws, journal, rid, "resume")
    assert s.state == "completed" and set(s.hosts.values()) == {"applied"}
    assert all(enables(h) == 1 for h in fleet.hosts)


CRASHPOINT = str(Path(__file__).with_name("crashpoint.py"))


def test_lock_refuses_a_second_driver(simfleet_factory, tmp_path):
    fleet = simfleet_factory(1)
    ws, art = setup_ws(fleet, tmp_path)
    plan, journal, rid = make_plan(ws, art, fleet.hosts)
    hold = json.dumps({"event": "record", "match": {"step": "load", "phase": "done"}, "nth": 999, "hold": True})
    p = subprocess.Popen([sys.executable, CRASHPOINT, hold, "-W", str(ws.root), "rollout", "start", "--plan", rid,
                          "--yes"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while "crashpoint: holding at record" not in (p.stderr.readline() or "crashpoint: holding at record"):
            pass
        r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws.root), "rollout", "resume", rid],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 10, r.stderr
        assert "driven by another kpipe" in r.stderr
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("pause", ["load", "wait"])
def test_sigkill_mid_rollout_then_resume_verifies_everything(simfleet_factory, tmp_path, pause):
    fleet = simfleet_factory(20)
    ws, art = setup_ws(fleet, tmp_path)
    plan, journal, rid = make_plan(ws, art, fleet.hosts, waves="2,100%")
    # both canary hosts are held after journaling `pause` as done; the second one's arrival kills kpipe
    hold = json.dumps({"event": "record", "match": {"step": pause, "phase": "done"}, "nth": 2, "hold": True})
    p = subprocess.Popen([sys.executable, CRASHPOINT, hold, "-W", str(ws.root), "rollout", "start", "--plan", rid,
                          "--yes"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        paused = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the canary wave: 2 hosts
            line = p.stderr.readline()
            if not line:
                break
            if line.startswith("crashpoint: "):
                paused.add(line.split(" record ", 1)[1].split()[0])
        assert paused == set(plan.waves[0])
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    s = summarize(journal, rid)
    assert s.state == "running"
    assert {s.hosts[h] for h in plan.waves[0]} == {"interrupted"}
    assert {s.hosts[h] for h in plan.waves[1]} == {"pending"}
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws.root), "rollout", "resume", rid, "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["state"] == "completed" and set(out["hosts"].values()) == {"applied"}
    for h in fleet.hosts:
        assert enabled(h) and enables(h) == 1  # nothing applied twice
        es = journal.entries(rid, h.name)
        assert any(e.step == "verify" and e.phase == "done" for e in es)


def kpipe_cli(ws, *args, ok=(0,), env=None, timeout=300):
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws.root), *args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    assert r.returncode in ok, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_cli_plan_gathers_facts_and_lists_exclusions(simfleet_factory, tmp_path):
    fleet = simfleet_factory(6)
    ws, art = setup_ws(fleet, tmp_path)
    fleet.hosts[4].inject("sig_enforce")
    fleet.hosts[5].stop()
    try:
        r = kpipe_cli(ws, "rollout", "plan", art.id, "--waves", "1,100%", "--json")
        plan = json.loads(r.stdout)
        reasons = {e["host"]: e["reason"] for e in plan["excluded"]}
        assert set(reasons) == {"sim004", "sim005"}, reasons
        assert "unsigned" in reasons["sim004"] and "unreachable" in reasons["sim005"]
        assert plan["waves"] == [["sim000"], ["sim001", "sim002", "sim003"]]
        assert plan["assignments"]["sim000"]["artifact"]["preflight"] == "passed"
        # a table for humans, with the same content
        r = kpipe_cli(ws, "rollout", "plan", art.id, "--limit", "sim000:sim001:sim002:sim003")
        assert "sim003" in r.stdout and "0 excluded" in r.stdout
        # start: refuses an artifact without preflight (exit 9) unless --skip-preflight
        from kpipe.artifacts import update_artifact

        update_artifact(ws.store, art.id, preflight={})
        r = kpipe_cli(ws, "rollout", "start", art.id, "--limit", "sim000:sim001:sim002:sim003", "--yes", ok=(9,))
        assert "preflight" in r.stderr
        r = kpipe_cli(ws, "rollout", "start", art.id, "--limit", "sim000:sim001:sim002:sim003", "--waves", "1,100%",
                      "--yes", "--skip-preflight", "--json")
        out = json.loads(r.stdout)
        assert set(out["hosts"].values()) == {"applied"}
        st = json.loads(kpipe_cli(ws, "rollout", "status", "last", "--json").stdout)
        assert st["state"] == "completed" and st["id"] == out["rollout_id"]
        assert out["rollout_id"] in kpipe_cli(ws, "rollout", "list").stdout
        r = kpipe_cli(ws, "rollout", "rollback", "last", "--limit", "sim000", "--json")
        assert json.loads(r.stdout)["hosts"]["sim000"] == "rolled_back"
        assert MODULE not in fleet.host("sim000").patches() and enabled(fleet.host("sim001"))
        r = kpipe_cli(ws, "rollout", "rollback", "last", "--json")
        assert set(json.loads(r.stdout)["hosts"].values()) == {"rolled_back"}
        # a halting gate exits 8
        fleet.host("sim002").inject("ebusy_enable")
        r = kpipe_cli(ws, "rollout", "start", art.id, "--limit", "sim000:sim001:sim002:sim003", "--waves", "1,100%",
                      "--yes", "--skip-preflight", "--rollback-policy", "all", ok=(8,))
        assert "halted" in r.stderr and "sim002" in r.stderr
        assert all(MODULE not in fleet.host(f"sim00{i}").patches() for i in range(4))
        # unknown ids are clear errors
        r = kpipe_cli(ws, "rollout", "status", "nope", ok=(5,))
        assert "no rollout" in r.stderr and "Traceback" not in r.stderr
    finally:
        fleet.hosts[4].clear()
        fleet.hosts[5].start()


def test_host_dying_mid_insmod_is_resumed_without_loading_twice(simfleet_factory, tmp_path):
    fleet = simfleet_factory(4)
    ws, art = setup_ws(fleet, tmp_path)
    plan, journal, rid = make_plan(ws, art, fleet.hosts, waves="100%", max_failures=FailureBudget.parse("50%"))
    victim = fleet.host("sim002")
    victim.inject("die_during", op="insmod")
    s, _ = run(ws, journal, rid)
    assert s.state == "completed" and s.hosts["sim002"] == "unreachable"
    assert MODULE in victim.modules()  # the kernel loaded it before the host died
    victim.clear()
    victim.reboot()  # it comes back rebooted: the module is gone, the staged file stays
    s, _ = run(ws, journal, rid, "resume")
    assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s
    assert enables(victim) == 1 and enabled(victim)
    loads = [e for e in journal.entries(rid, "sim002") if e.step == "load"]
    assert [e.phase for e in loads] == ["intended", "failed", "intended", "done"]
    assert loads[-1].detail["changed"] is True
    for h in ("sim000", "sim001", "sim003"):  # the others were re-checked, not touched again
        assert enables(fleet.host(h)) == 1
        assert [e.phase for e in journal.entries(rid, h) if e.step == "load"] == ["intended", "done"]


def test_halted_rollout_resumes_its_rollback(simfleet_factory, tmp_path):
    fleet = simfleet_factory(3)
    ws, art = setup_ws(fleet, tmp_path)
    plan, journal, rid = make_plan(ws, art, fleet.hosts, waves="100%", rollback_policy="all")
    stuck, bad = fleet.host("sim000"), fleet.host("sim001")
    stuck.inject("ebusy_disable")  # loads fine; writing `enabled` fails later
    bad.inject("ebusy_enable")     # the load fails: the gate halts
    s, _ = run(ws, journal, rid)
    assert s.state == "halted" and "sim001" in s.halt_reason
    assert s.hosts["sim000"] == "failed" and "rollback failed" in s.reasons["sim000"]
    assert s.hosts["sim002"] == "rolled_back"
    assert journal.get(rid).detail["rollback"]["done"] is False
    assert enabled(stuck)  # still patched: the rollback is pending
    stuck.clear()
    bad.clear()
    s, events = run(ws, journal, rid, "resume")
    assert any(e.kind == "resume" and "rollback" in e.message for e in events)
    assert s.state == "rolled_back" and set(s.hosts.values()) == {"rolled_back"}, s
    for h in fleet.hosts:
        assert MODULE not in h.patches() and MODULE not in h.modules() and not h.staged()
