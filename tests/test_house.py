"""Issue 9, round 2: one observer for the gate, one taint table, one YAML loader for the fleet file,
one transport protocol."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

import kpipe.rollout.engine as engine_mod
from kpipe.errors import ConfigError
from kpipe.fleet import observe
from kpipe.fleet.inventory import load_inventory
from kpipe.plan import Step
from kpipe.rollout.world import engine_for
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)
from test_plans import normal, start_recorded
from test_rollout_engine import MODULE, make_plan, setup_ws

# -- the gate's soak and resume's re-check read through the one observer ------------------------------------------

def watch_observer(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, list[Step[Any]]]]:
    """Each call the engine makes to the observer, as host -> the steps it asked for (the real observer runs them).

    raising=True: the engine must reach the hosts through kpipe.fleet.observe's run_reads_on."""
    planned: list[dict[str, list[Step[Any]]]] = []
    real = observe.run_reads_on

    def seen(pool: Any, targets: Any, steps_for: Any, forks: int | None = None) -> Any:
        planned.append({t.name: list(steps_for(t.name)) for t in targets})
        return real(pool, targets, steps_for, forks)

    monkeypatch.setattr(engine_mod, "run_reads_on", seen, raising=True)
    return planned



def test_soak_reverification_runs_only_the_observers_read_steps(simfleet_factory, tmp_path, monkeypatch):
    fleet = simfleet_factory(2)
    ws, art = setup_ws(fleet, tmp_path)
    _, journal, rid = make_plan(ws, art, fleet.hosts, waves="1,100%", soak_s=1.0, verify_interval_s=0.5)
    planned = watch_observer(monkeypatch)
    s, rec = start_recorded(ws, rid, [h.name for h in fleet.hosts])
    assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s
    first, second = (h.name for h in fleet.hosts)
    # two rounds per wave: the canary in both waves' soaks, the second host in the last wave's
    assert [sorted(p) for p in planned] == [[first], [first], [first, second], [first, second]]
    for p in planned:
        for steps in p.values():
            assert steps and not any(st.writes for st in steps)
            assert [st.name for st in steps] == ["verify"] * len(steps)
    # the soak's commands are the last ones each host saw, and exactly the planned read steps
    for host in (first, second):
        soak = [list(st.argv()) for p in planned if host in p for st in p[host]]
        assert normal(rec.argv[host][-len(soak):]) == normal(soak), host


def test_resume_recheck_reads_through_the_observer(simfleet_factory, tmp_path, monkeypatch):
    fleet = simfleet_factory(2)
    ws, art = setup_ws(fleet, tmp_path)
    _, journal, rid = make_plan(ws, art, fleet.hosts, waves="1,100%")
    engine, runner = engine_for(ws, journal, rid)
    try:
        assert engine.start(rid).state == "completed"
    finally:
        runner.close()
    # the canary's patch is removed behind kpipe's back; the other host is made unfinished so resume runs
    canary, other = (h.name for h in fleet.hosts)
    script = (f"echo 0 > /sys/kernel/livepatch/{MODULE}/enabled && "
              f"while [ -d /sys/kernel/livepatch/{MODULE} ]; do sleep 0.05; done && /sbin/rmmod {MODULE}")
    r = subprocess.run(fleet.hosts[0].ssh_argv(script), capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    journal.record(rid, other, 2, "outcome", "done", {"state": "unreachable", "reason": "test"})
    planned = watch_observer(monkeypatch)
    engine, runner = engine_for(ws, journal, rid)
    try:
        s = engine.resume(rid)
    finally:
        runner.close()
    assert planned and sorted(planned[0]) == [canary]
    assert not any(st.writes for p in planned for steps in p.values() for st in steps)
    assert s.hosts[canary] in ("failed", "rolled_back") and "regressed before resume" in s.reasons[canary], s


# -- one taint table ----------------------------------------------------------------------------------------------

def test_one_taint_table_everywhere(tmp_path: Path) -> None:
    from kpipe import settings, taint
    from kpipe.desired import DesiredState, apply_desired_file, glob_matcher, parse_desired_text
    from kpipe.fleet.facts import HostFacts

    # bit 19 (J) and a bit past the table read the same in facts, the audit and the reports
    mask = (1 << 19) | (1 << 20) | taint.TAINT_LIVEPATCH
    assert taint.taint_letters(mask) == "KJbit20"
    assert HostFacts(name="h", release="r", arch="x86_64", machine="x86_64", tainted=mask).taint_flags == "KJbit20"
    assert taint.taint_mask("J") == 1 << 19
    # the desired-state file and kpipe.toml accept every letter of the table
    doc = parse_desired_text("version: 1\nallowed_taint: [K, J]\nhosts: []\n", "d.yml")
    state = apply_desired_file(DesiredState(), doc, glob_matcher([]), "d.yml")
    assert state.allowed_taint == (1 << 15) | (1 << 19)
    toml = tmp_path / "kpipe.toml"
    toml.write_text('[audit]\nallowed_taint = "KJ"\n')
    assert settings.parse_settings(toml, toml.read_bytes()).audit.allowed_taint == ("K", "J")


# -- the fleet file through the one line-keeping YAML loader ------------------------------------------------------

@pytest.mark.parametrize("text,line,message", [
    ("hosts:\n  a: {}\n  a: {port: 22}\n", 3, "duplicate key 'a'"),
    ("hosts:\n  a: {}\n  b: {port: 70000}\n", 3, "outside 1-65535"),
    ("hosts:\n  a: {}\ngroups:\n  g:\n    hosts: [zz]\n", 4, "not under hosts"),
    ("hosts:\n  a: !!python/object:os.system {}\n", 2, "unsupported YAML tag"),
    ("hosts:\n  a: {address: [\n", 3, "invalid YAML"),
])
def test_fleet_file_errors_name_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = tmp_path / "fleet.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_inventory(None, [path])
    assert str(e.value).startswith(f"{path}:{line}:"), str(e.value)


# -- one transport protocol ---------------------------------------------------------------------------------------

def test_transport_extends_the_cores_step_transport() -> None:
    from kpipe.plan import StepTransport
    from kpipe.transport.base import Transport
    from kpipe.transport.local import LocalTransport

    assert StepTransport in Transport.__mro__
    t = LocalTransport()
    assert isinstance(t, Transport) and isinstance(t, StepTransport)


def test_the_cli_holds_no_sql():
    """The CLI reads the store through kpipe.store / the journal / the fact store, never with its own SQL
    (completion included: kpipe.store.peek_ids)."""
    import re

    cli = Path(__file__).resolve().parent.parent / "kpipe" / "cli"
    sql = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE)\b\s+\S+.*\b(FROM|INTO|SET|WHERE)\b|import sqlite3")
    offenders = [f"{p.name}:{i}" for p in sorted(cli.glob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1) if sql.search(line)]
    assert offenders == []
