"""What the rollout tests share: a workspace over a SimFleet with one artifact, a stored plan, an engine run.

The engine tests (fabric and Ansible executors, the export, plans, persistence) all start the same way; the
helpers here keep that one way, so a change to how a rollout is set up is made once.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import kenv
from kpipe.artifacts import add_artifact
from kpipe.rollout.journal import Journal
from kpipe.rollout.planner import Candidate, HostView, RolloutOptions, plan_rollout
from kpipe.workspace import open_workspace

RELEASE = kenv.kernel_env(module_level=True).release  # the installed headers' release (tests/kenv.py)
MODULE = "livepatch_demo"
# The hosts share this machine's Python; pyenv's shims would fool Ansible's interpreter discovery.
ANSIBLE_TOML = '\n[ansible]\npython_interpreter = "/usr/bin/python3"\n'


def artifact_ws(fleet: Any, tmp_path: Path, *, extra_toml: str = "", n_bytes: int = 4096) -> tuple[Any, Any]:
    """A workspace whose inventory is `fleet`, holding one valid, preflighted artifact of random bytes."""
    ws = open_workspace(fleet.write_workspace(tmp_path / "ws", extra_toml=extra_toml))
    ko = tmp_path / "livepatch-demo.ko"
    ko.write_bytes(os.urandom(n_bytes))
    art = add_artifact(ws.store, ko, kernel=RELEASE, status="valid", arch="x86_64", module_name="livepatch-demo",
                       preflight={"status": "passed"})
    return ws, art


def stored_plan(ws: Any, art: Any, hosts: Sequence[str], **opts: Any) -> tuple[Any, Journal, str]:
    """The pure planner's plan of `art` over `hosts` (all on RELEASE), stored in the journal: (plan, journal, id)."""
    options = RolloutOptions(**opts)
    views = [HostView(h, release=RELEASE, arch="x86_64") for h in hosts]
    plan = plan_rollout(art.id, "artifact", views, [Candidate.of(art)], options)
    journal = Journal(ws.store)
    rid = journal.create(plan.to_dict(), options.to_dict(), target=art.id)
    return plan, journal, rid


def run_engine(engine_for: Callable[..., tuple[Any, Any]], ws: Any, journal: Journal, rid: str,
               what: str = "start", **kw: Any) -> tuple[Any, list[Any]]:
    """engine.start/resume/rollback(rid) with the engine `engine_for` makes; (its summary, the events it sent)."""
    events: list[Any] = []
    engine, runner = engine_for(ws, journal, rid, on_event=events.append)
    try:
        return getattr(engine, what)(rid, **kw), events
    finally:
        runner.close()


def rebooted(fleet: Any) -> Any:
    """Every host rebooted (no patches, no faults, nothing staged), checked, before a test."""
    for h in fleet.hosts:
        h.clear()
        h.reboot()
        shutil.rmtree(h.dir / "var_lib" / "kpatch", ignore_errors=True)  # a reboot keeps the disk
        (h.dir / "var_lib" / "kpatch").mkdir()
    fleet.verify()
    return fleet
