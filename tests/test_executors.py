"""Two executors of one plan: `kpipe rollout start --engine fabric|ansible` on SimFleet.

The same stored plan is run by the Fabric executor (SSH from kpipe) and by the
Ansible executor (ansible-runner, each host step an Ansible task); both must
leave the simulated fleet in the same state and journal the same steps, in the
same order, for every host — so that `rollout status`, `resume` and `rollback`
work after either engine (each test rolls back with the other engine).
Real sshd hosts on loopback with a simulated kernel; nothing touches this machine's kernel.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rollout_world import ANSIBLE_TOML, MODULE, RELEASE, artifact_ws, rebooted, stored_plan
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ENGINES = ["fabric", "ansible"]
OTHER = {"fabric": "ansible", "ansible": "fabric"}

APPLY = [(s, p) for s in ("preflight", "stage", "marker", "load", "wait", "verify") for p in ("intended", "done")]
ROLLBACK = [(s, p) for s in ("rb-disable", "rb-unload", "rb-unstage", "rb-verify") for p in ("intended", "done")]


@pytest.fixture(scope="module")
def fleet(simfleet_factory):  # noqa: F811
    return simfleet_factory(3)


@pytest.fixture
def fresh(fleet):
    """Every host rebooted (no patches, no faults, nothing staged) before the test."""
    return rebooted(fleet)


def setup(fleet, tmp_path: Path, **opts):
    ws, art = artifact_ws(fleet, tmp_path, extra_toml=ANSIBLE_TOML)
    plan, journal, rid = stored_plan(ws, art, [h.name for h in fleet.hosts],
                                     **{"waves": "1,100%", "forks": 10, "step_timeout_s": 20.0, **opts})
    return ws, art, plan, journal, rid


def kpipe(ws, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws.root), *args], capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, "NO_COLOR": "1"})


def steps(journal, rid, host) -> list[tuple[str, str]]:
    """The journaled (step, phase) sequence of one host, outcomes as (outcome, state)."""
    return [(e.step, e.detail.get("state", "") if e.step == "outcome" else e.phase)
            for e in journal.entries(rid, host)]


def fleet_state(fleet) -> dict[str, dict]:
    """What each simulated host shows: livepatch sysfs, loaded modules, staged files (sha256), leftovers."""
    out = {}
    for h in fleet.hosts:
        out[h.name] = {
            "patches": {n: (str(p.get("enabled")), str(p.get("transition"))) for n, p in h.patches().items()},
            "modules": sorted(h.modules()),
            "staged": {k: hashlib.sha256(v).hexdigest() for k, v in h.staged().items()},
            "temp": h.temp_files(),
        }
    return out


def applied_state(sha: str) -> dict:
    return {"patches": {MODULE: ("1", "0")}, "modules": [MODULE],
            "staged": {f"/var/lib/kpatch/{RELEASE}/livepatch-demo.ko": sha}, "temp": []}


CLEAN = {"patches": {}, "modules": [], "staged": {}, "temp": []}


@pytest.mark.parametrize("engine", ENGINES)
def test_same_plan_same_fleet_state_and_journal(engine, fresh, tmp_path):
    ws, art, _plan, journal, rid = setup(fresh, tmp_path)
    r = kpipe(ws, "rollout", "start", "--plan", rid, "--engine", engine, "--yes", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)
    assert summary["state"] == "completed", summary
    assert summary["hosts"] == {h.name: "applied" for h in fresh.hosts}
    assert fleet_state(fresh) == {h.name: applied_state(art.sha256) for h in fresh.hosts}
    for h in fresh.hosts:
        assert steps(journal, rid, h.name) == [*APPLY, ("outcome", "applied")], h.name
        assert any(f"'{MODULE}': patching complete" in ln for ln in h.log())
    gates = [e.detail["verdict"] for e in journal.entries(rid, "") if e.step == "gate"]
    assert gates == ["proceed", "proceed"]

    # status reads the journal whoever wrote it; the other engine rolls the rollout back
    st = kpipe(ws, "rollout", "status", rid, "--json")
    assert st.returncode == 0 and set(json.loads(st.stdout)["hosts"].values()) == {"applied"}, st.stdout
    rb = kpipe(ws, "rollout", "rollback", rid, "--engine", OTHER[engine], "--yes", "--json")
    assert rb.returncode == 0, rb.stdout + rb.stderr
    assert json.loads(rb.stdout)["state"] == "rolled_back"
    assert fleet_state(fresh) == {h.name: CLEAN for h in fresh.hosts}
    for h in fresh.hosts:
        assert steps(journal, rid, h.name) == [*APPLY, ("outcome", "applied"), *ROLLBACK,
                                               ("outcome", "rolled_back")], h.name


@pytest.mark.parametrize("engine", ENGINES)
def test_failure_in_the_canary_wave_halts_and_rolls_back(engine, fresh, tmp_path):
    ws, _art, plan, journal, rid = setup(fresh, tmp_path, rollback_policy="failed")
    canary = plan.waves[0][0]
    fresh.host(canary).inject("ebusy_enable")  # insmod fails: "Device or resource busy"
    r = kpipe(ws, "rollout", "start", "--plan", rid, "--engine", engine, "--yes", "--json")
    assert r.returncode == 8, r.stdout + r.stderr  # ROLLOUT_HALTED
    summary = json.loads(r.stdout)
    assert summary["hosts"][canary] == "rolled_back"
    assert canary in summary["halt_reason"]
    rest = [h for h in plan.hosts if h != canary]
    assert all(summary["hosts"][h] == "pending" for h in rest), summary
    assert fleet_state(fresh) == {h.name: CLEAN for h in fresh.hosts}
    assert steps(journal, rid, canary) == [
        *APPLY[:6], ("load", "intended"), ("load", "failed"), ("outcome", "failed"),
        *ROLLBACK, ("outcome", "rolled_back")]
    reason = next(e.detail["reason"] for e in journal.entries(rid, canary) if e.step == "outcome")
    assert "busy" in reason.lower(), reason
    for h in rest:
        assert steps(journal, rid, h) == []
    gates = [e.detail["verdict"] for e in journal.entries(rid, "") if e.step == "gate"]
    assert gates == ["halt"]


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions `text` (read from /proc; nothing is signalled)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def test_ctrl_c_stops_an_ansible_rollout_and_resume_finishes_it(fresh, tmp_path):
    ws, art, plan, journal, rid = setup(fresh, tmp_path)
    canary, later = plan.waves[0][0], list(plan.waves[1])
    p = subprocess.Popen([sys.executable, "-m", "kpipe", "-W", str(ws.root), "rollout", "start", "--plan", rid,
                          "--engine", "ansible", "--yes"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
    try:
        assert p.stdout is not None
        for line in p.stdout:
            words = line.split()
            if words[:2] == ["applied", canary]:
                break
        deadline = time.monotonic() + 120
        # wave 2 starts at once (no soak): interrupt it while its hosts' steps run as Ansible plays
        while not any(journal.entries(rid, h) for h in later) and time.monotonic() < deadline:
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert f"interrupted; resume with `kpipe rollout resume {rid}`" in err, err
    assert "Traceback" not in err
    st = json.loads(kpipe(ws, "rollout", "status", rid, "--json").stdout)
    assert st["state"] == "interrupted" and st["hosts"][canary] == "applied", st
    # the play that ran at the interrupt was stopped with kpipe, not left running on its own pty
    assert _processes_mentioning(journal.get(rid).detail["ansible_dir"]) == []

    r = kpipe(ws, "rollout", "resume", rid, "--engine", "ansible", "--yes", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["hosts"] == {h.name: "applied" for h in fresh.hosts}
    assert fleet_state(fresh) == {h.name: applied_state(art.sha256) for h in fresh.hosts}
    for h in fresh.hosts:  # nothing loaded twice by the resume
        assert sum(f"enabling patch '{MODULE}'" in ln for ln in h.log()) == 1, h.name
