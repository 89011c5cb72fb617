"""Crash trials: kpipe SIGKILLed at random points of the staging step and of the rollback, then resumed.

The SIGKILL-then-resume tests of test_rollout_engine.py kill at two fixed points of the load. Here
the kill points are drawn at random (seeded: the same points every run, printed with -s) from every
journal write and every host command of the staging step and of the rollback, on a SimFleet of 2
hosts driven one at a time (forks 1, so a kill point names the same moment every run). After each
kill the trial checks what `kpipe rollout status` would report against the hosts, resumes, and counts:

- hosts in an unknown state: a state outside the engine's host states, a host reported applied that
  is not patched with this build, a host reported pending that holds something, or, after the resume,
  a host that did not end where it should (applied, or rolled back with nothing left);
- leftover files: partial uploads (`.NAME.ko.kpipe-*`) on a host after the resume (and after a
  rollback), or a staged module after a rollback;
- double applies: more than one "enabling patch" in a host's kernel log for one rollout, or any
  during a rollback.

Kill points come from tests/crashpoint.py (test code; the engine has no hook).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kpipe.artifacts import add_artifact
from kpipe.rollout.engine import HOST_STATES, summarize
from kpipe.rollout.journal import Journal
from kpipe.rollout.planner import Candidate, HostView, RolloutOptions, plan_rollout
from kpipe.rollout.world import engine_for
from kpipe.workspace import open_workspace
from simfleet import fake_module, simfleet_factory  # noqa: F401  (the session fixture)

MODULE = "livepatch_demo"
CRASHPOINT = str(Path(__file__).with_name("crashpoint.py"))
SEED = 8_2026
TRIALS = 20  # per phase
HOSTS = 2

# (event, match, when) of the staging step; each happens once per host, so nth picks the host
STAGING_POINTS = [
    ("record", {"step": "stage", "phase": "intended"}, "before"),
    ("record", {"step": "stage", "phase": "intended"}, "after"),
    ("run", {"label": "stage-check"}, "before"),
    ("run", {"label": "stage-check"}, "after"),
    ("put", {}, "before"),
    ("put", {}, "partial"),
    ("put", {}, "after"),
    ("run", {"label": "stage"}, "before"),
    ("run", {"label": "stage"}, "after"),
    ("record", {"step": "stage", "phase": "done"}, "before"),
    ("record", {"step": "stage", "phase": "done"}, "after"),
]
# ... and of the rollback
ROLLBACK_POINTS = [
    *[("record", {"step": s, "phase": p}, w) for s in ("rb-disable", "rb-unload", "rb-unstage", "rb-verify")
      for p in ("intended", "done") for w in ("before", "after")],
    ("record", {"step": "outcome"}, "before"),
    ("record", {"step": "outcome"}, "after"),
    *[("run", {"label": lb}, w) for lb in ("disable", "wait-gone", "unload", "unstage", "verify-state")
      for w in ("before", "after")],
]


def draw(points: list, n: int, rng: random.Random) -> list[dict]:
    """n kill points: every kind of point at least once (as far as n allows), then random ones."""
    kinds = list(points)
    rng.shuffle(kinds)
    picked = (kinds * (n // len(kinds) + 1))[:n]
    return [{"event": e, "match": m, "when": w, "nth": rng.randint(1, HOSTS)} for e, m, w in picked]


class Trials:
    """One workspace on one SimFleet; counts what the trials found."""

    def __init__(self, fleet, tmp_path: Path):
        self.fleet = fleet
        self.ws = open_workspace(fleet.write_workspace(tmp_path / "ws", forks=50))
        ko = tmp_path / "livepatch-demo.ko"
        self.build_id = os.urandom(20)
        ko.write_bytes(fake_module(MODULE, build_id=self.build_id, size=64 * 1024))
        self.art = add_artifact(self.ws.store, ko, kernel=fleet.release, status="valid", arch="x86_64",
                                module_name="livepatch-demo", preflight={"status": "passed"})
        self.journal = Journal(self.ws.store)
        self.unknown: list[str] = []
        self.leftovers: list[str] = []
        self.double: list[str] = []
        self.kills: list[str] = []

    def plan(self) -> str:
        options = RolloutOptions(waves="100%", forks=1, step_timeout_s=30.0)
        views = [HostView(h.name, release=self.fleet.release, arch="x86_64") for h in self.fleet.hosts]
        plan = plan_rollout(self.art.id, "artifact", views, [Candidate.of(self.art)], options)
        return self.journal.create(plan.to_dict(), options.to_dict(), target=self.art.id)

    def engine(self, rid: str, what: str):
        engine, runner = engine_for(self.ws, self.journal, rid)
        try:
            return getattr(engine, what)(rid)
        finally:
            runner.close()

    def crash(self, spec: dict, *args: str) -> None:
        r = subprocess.run([sys.executable, CRASHPOINT, json.dumps(spec), "-W", str(self.ws.root), *args],
                           capture_output=True, text=True, timeout=300)
        killed = [ln for ln in r.stderr.splitlines() if ln.startswith("crashpoint: killed at")]
        assert r.returncode == -9 and killed, (spec, r.returncode, r.stdout[-1000:], r.stderr[-2000:])
        self.kills.append(killed[-1][len("crashpoint: killed at "):])

    # -- what the hosts say ---------------------------------------------------------------
    def patched(self, h) -> bool:
        p = h.patches().get(MODULE)
        note = h.sysmod / MODULE / "notes" / ".note.gnu.build-id"
        return (bool(p) and p["enabled"] == "1" and p["transition"] == "0" and note.exists()
                and note.read_bytes()[16:] == self.build_id)

    def enables(self, h) -> int:
        return sum(1 for ln in h.log() if f"enabling patch '{MODULE}'" in ln)

    def check_status(self, rid: str, label: str) -> None:
        """What status reports right after the kill, against the hosts."""
        s = summarize(self.journal, rid)
        for h in self.fleet.hosts:
            st = s.hosts[h.name]
            if st not in HOST_STATES:
                self.unknown.append(f"{label}: {h.name} reported {st!r}")
            elif st == "applied" and not self.patched(h):
                self.unknown.append(f"{label}: {h.name} reported applied, not patched")
            elif st == "pending" and (h.staged() or MODULE in h.modules()):
                self.unknown.append(f"{label}: {h.name} reported pending, holds the module")
        if self.journal.live_owner(rid) is not None:
            self.unknown.append(f"{label}: a dead kpipe is still named as the driver")

    def check_clean(self, label: str) -> None:
        for h in self.fleet.hosts:
            if h.temp_files():
                self.leftovers.append(f"{label}: {h.name}: {h.temp_files()}")
            if h.staged() or MODULE in h.modules() or MODULE in h.patches():
                self.leftovers.append(f"{label}: {h.name} not clean after the rollback")

    def report(self, phase: str) -> str:
        return (f"{phase}: {len(self.kills)} kill points, {len(self.unknown)} hosts in an unknown state, "
                f"{len(self.leftovers)} leftover files, {len(self.double)} double applies")


@pytest.mark.slow
def test_crash_trials_staging(simfleet_factory, tmp_path):
    trials = Trials(simfleet_factory(HOSTS), tmp_path)
    rng = random.Random(SEED)
    for i, spec in enumerate(draw(STAGING_POINTS, TRIALS, rng)):
        label = f"staging trial {i}"
        before = {h.name: trials.enables(h) for h in trials.fleet.hosts}
        rid = trials.plan()
        trials.crash(spec, "rollout", "start", "--plan", rid, "--yes")
        trials.check_status(rid, label)
        s = trials.engine(rid, "resume")
        for h in trials.fleet.hosts:
            if s.hosts[h.name] != "applied" or not trials.patched(h):
                trials.unknown.append(f"{label}: {h.name} ended {s.hosts[h.name]} after resume")
            if h.temp_files():
                trials.leftovers.append(f"{label}: {h.name}: {h.temp_files()}")
            if trials.enables(h) - before[h.name] != 1:
                trials.double.append(f"{label}: {h.name} enabled {trials.enables(h) - before[h.name]} times")
        s = trials.engine(rid, "rollback")
        trials.check_clean(label)
    print("\n" + trials.report("staging") + "\n  " + "\n  ".join(trials.kills))
    assert len(trials.kills) >= 20
    assert not trials.unknown, trials.unknown
    assert not trials.leftovers, trials.leftovers
    assert not trials.double, trials.double


@pytest.mark.slow
def test_crash_trials_rollback(simfleet_factory, tmp_path):
    trials = Trials(simfleet_factory(HOSTS), tmp_path)
    rng = random.Random(SEED + 1)
    for i, spec in enumerate(draw(ROLLBACK_POINTS, TRIALS, rng)):
        label = f"rollback trial {i}"
        rid = trials.plan()
        s = trials.engine(rid, "start")
        assert s.state == "completed" and all(trials.patched(h) for h in trials.fleet.hosts), s
        before = {h.name: trials.enables(h) for h in trials.fleet.hosts}
        trials.crash(spec, "rollout", "rollback", rid)
        trials.check_status(rid, label)
        s = trials.engine(rid, "resume")  # continues the interrupted rollback
        if s.state != "rolled_back" or s.halt_reason or set(s.hosts.values()) != {"rolled_back"}:
            trials.unknown.append(f"{label}: resume ended {s.state} {s.hosts} {s.halt_reason}")
        for h in trials.fleet.hosts:
            if trials.enables(h) != before[h.name]:
                trials.double.append(f"{label}: {h.name} enabled during the rollback")
        trials.check_clean(label)
    print("\n" + trials.report("rollback") + "\n  " + "\n  ".join(trials.kills))
    assert len(trials.kills) >= 20
    assert not trials.unknown, trials.unknown
    assert not trials.leftovers, trials.leftovers
    assert not trials.double, trials.double
