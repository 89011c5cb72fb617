"""The one observer (kpipe.fleet.observe) over SimFleet's real sshd hosts: read steps on every host at
once, an observation or an error per host (partial failure is data), and the same observation behind
`fleet facts`, the audit and the rollout planner."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kpipe.commands import Command, CommandResult
from kpipe.errors import TransportError
from kpipe.fleet import livepatch as lp
from kpipe.fleet.facts import HostFacts, facts_step, interpret_facts
from kpipe.fleet.inventory import load_inventory
from kpipe.fleet.observe import (
    Observation,
    gather_facts,
    observation_steps,
    observe,
    pool_for,
    run_reads,
)
from kpipe.plan import Step
from kpipe.workspace import load_workspace
from simfleet import SimFleet, fake_module, simfleet_factory  # noqa: F401  (the fixture)

NAME = "livepatch_obs"


@pytest.fixture(scope="module")
def scene(simfleet_factory, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """5 hosts: [0] has a loaded live patch, [1] is down, [2] reports a release that is no release."""
    f = simfleet_factory(5, prefix="obs")
    folder = f.write_workspace(tmp_path_factory.mktemp("obsws"), forks=5)
    toml = folder / "kpipe.toml"
    # This machine is shared with VM tests: give loaded sshds time to answer.
    toml.write_text(toml.read_text().replace("connect_timeout = 10", "connect_timeout = 30"))
    workspace = load_workspace(folder)
    mod = folder / "livepatch-obs.ko"
    mod.write_bytes(fake_module(NAME, build_id=b"\x12" * 20, srcversion="ABCDEF0123456789ABCDEF0"))
    sha = hashlib.sha256(mod.read_bytes()).hexdigest()
    with pool_for(workspace) as pool:
        t = pool.transport(f.hosts[0].target())
        lp.load(t, lp.stage(t, mod, f.release, sha, "livepatch-obs.ko"), NAME)
        lp.wait_transition(t, NAME, timeout=30)
    f.hosts[0].klog("kpipe-observer-test: a line in the kernel log")
    f.hosts[1].stop()
    f.hosts[2].set_release("not/a release")
    yield f, workspace
    f.hosts[1].start()
    f.hosts[2].set_release("")


@pytest.fixture(scope="module")
def fleet(scene: Any) -> SimFleet:
    return scene[0]


@pytest.fixture(scope="module")
def ws(scene: Any) -> Any:
    return scene[1]


def hosts_of(ws: Any) -> list[Any]:
    return load_inventory(ws).select("simfleet")


def test_partial_failure_is_data(fleet: SimFleet, ws: Any) -> None:
    hosts = hosts_of(ws)
    out = observe(ws, hosts, forks=5)
    assert list(out) == [h.name for h in hosts]  # every host, in inventory order
    down, liar = fleet.hosts[1].name, fleet.hosts[2].name
    assert isinstance(out[down], TransportError) and out[down].kind == "refused"
    assert isinstance(out[liar], TransportError) and out[liar].kind == "facts"
    assert "not/a" in out[liar].message and out[liar].message.startswith(liar)
    good = {n: o for n, o in out.items() if n not in (down, liar)}
    assert len(good) == 3 and all(isinstance(o, Observation) for o in good.values())
    for name, o in good.items():
        assert (o.host, o.facts.name, o.facts.release, o.facts.arch) == (name, name, fleet.release, "x86_64")
        assert o.livepatch is None and o.dmesg is None  # nothing more was asked
    assert set(good[fleet.hosts[0].name].facts.patches) == {NAME}
    assert good[fleet.hosts[3].name].facts.patches == {}


def test_unreachable_host_does_not_stop_the_others_with_a_shared_pool(fleet: SimFleet, ws: Any) -> None:
    hosts = hosts_of(ws)
    with pool_for(ws, 2) as pool:
        first = gather_facts(ws, hosts, 2, pool=pool)
        again = gather_facts(ws, hosts, 2, pool=pool)  # the caller's pool stays open between reads
    for out in (first, again):
        assert [n for n, r in out.items() if isinstance(r, HostFacts)] == \
            [fleet.hosts[i].name for i in (0, 3, 4)]


def test_modules_and_dmesg_are_read_when_asked(fleet: SimFleet, ws: Any) -> None:
    hosts = hosts_of(ws)
    h0, h3 = fleet.hosts[0].name, fleet.hosts[3].name
    out = observe(ws, hosts, modules={h0: [NAME, "bad name; rm -rf /"], h3: [NAME]}, dmesg=True)
    o0, o3 = out[h0], out[h3]
    assert isinstance(o0, Observation) and isinstance(o3, Observation)
    assert o0.livepatch is not None and o0.livepatch.module(NAME).present
    assert o0.livepatch.module(NAME).build_id == "12" * 20
    assert o3.livepatch is not None and not o3.livepatch.module(NAME).present
    assert "kpipe-observer-test: a line in the kernel log" in (o0.dmesg or "")
    assert o3.dmesg is not None and "kpipe-observer-test" not in o3.dmesg


def stable(facts: dict[str, Any]) -> dict[str, Any]:
    """A host's facts without free space (this machine's disk, which other tests write to meanwhile)."""
    return {k: v for k, v in facts.items() if k != "free_kb"}


def test_facts_audit_and_planner_see_the_same_observation(fleet: SimFleet, ws: Any) -> None:
    """`fleet facts`, the audit and the rollout planner read the hosts through the same steps."""
    from kpipe.audit import DesiredState
    from kpipe.fleet.auditing import observe_for_audit
    from kpipe.rollout import world

    hosts = hosts_of(ws)
    facts = gather_facts(ws, hosts)
    with pool_for(ws) as pool:
        planned = world.gather(ws, hosts, pool, 5)
    audited = observe_for_audit(ws, hosts, DesiredState())
    cli = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws.root), "fleet", "facts", "--json"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert cli.returncode == 0, cli.stderr
    doc = json.loads(cli.stdout)["hosts"]
    for h in hosts:
        f, p, a = facts[h.name], planned[h.name], audited[h.name]
        if isinstance(f, HostFacts):
            assert isinstance(p, HostFacts)
            want = stable(f.to_dict())
            assert stable(p.to_dict()) == want and doc[h.name]["ok"] is True
            assert stable(doc[h.name]["facts"]) == json.loads(json.dumps(want))
            assert (a.reachable, a.kernel, a.tainted, set(a.patches)) == (True, f.release, f.tainted, set(f.patches))
        else:
            assert type(p) is type(f) and p.kind == f.kind and doc[h.name]["kind"] == f.kind
            assert not a.reachable and a.error


# -- the fan-out itself, over in-memory transports (no SSH): what it does with each kind of failure -----------------

class _T:
    """A transport whose host answers each command with canned output (or raises)."""

    def __init__(self, name: str, answers: dict[str, Any]):
        self.name, self.answers, self.ran = name, answers, []

    def run(self, cmd: Command) -> CommandResult:
        self.ran.append(cmd.label)
        a = self.answers[cmd.label]
        if isinstance(a, BaseException):
            raise a
        return CommandResult(self.name, cmd, a[0], a[1], "")

    def put(self, local: Path, remote: str) -> None:
        raise AssertionError("the observer never uploads")


class _Host:
    def __init__(self, name: str):
        self.name = name

    def target(self) -> _Host:
        return self  # the SSH target: anything with a name


class _Pool:
    """A FanOut over _T transports, sequential (what a pool does with each fn result or exception)."""

    def __init__(self, transports: dict[str, _T]):
        self.transports, self.calls = transports, 0

    def run_many(self, targets: Any, fn: Any, forks: int | None = None) -> dict[str, Any]:
        self.calls += 1
        out: dict[str, Any] = {}
        for target in targets:
            name = target.name
            try:
                out[name] = fn(self.transports[name])
            except Exception as e:  # noqa: BLE001 -- as SshPool.run_many: collected, not raised
                out[name] = e
        return out



def _facts_text(release: str = "6.1.0-56-amd64") -> str:
    return ("kpipe-facts 1\nrelease " + release + "\nmachine x86_64\nos ID=debian\ntainted 0\nkpatch -\nselinux -\n"
            "sig_enforce -\ndf-begin /var/lib\ndf-end\n---livepatch---\nlivepatch_sysfs 1\ntainted 0\nend\n"
            "---end-livepatch---\nkpipe-facts-end\n")


def test_each_failure_kind_is_one_hosts_data() -> None:
    ts = {
        "ok": _T("ok", {"facts": (0, _facts_text()), "livepatch-state": (0, "livepatch_sysfs 1\ntainted 0\nend\n")}),
        # the modules' state comes in the facts command (one round trip): a cut livepatch section is
        # a facts error of that host
        "cut": _T("cut", {"facts": (0, _facts_text().replace("tainted 0\nend\n---end", "---end"))}),
        "gone": _T("gone", {"facts": TransportError("gone: connection refused", host="gone", kind="refused")}),
        "odd": _T("odd", {"facts": RuntimeError("paramiko broke")}),
        "junk": _T("junk", {"facts": (127, "sh: not found")}),
    }
    hosts = [_Host(n) for n in ts]
    out = observe(None, hosts, pool=_Pool(ts), modules={n: ["lp_x"] for n in ts})
    assert list(out) == list(ts)
    ok = out["ok"]
    assert isinstance(ok, Observation) and ok.facts.release == "6.1.0-56-amd64" and ok.livepatch is not None
    assert isinstance(out["cut"], TransportError) and out["cut"].kind == "facts"
    assert ts["ok"].ran == ["facts"]  # facts and the modules' state: one command
    assert isinstance(out["gone"], TransportError) and out["gone"].kind == "refused"
    assert isinstance(out["odd"], TransportError) and "paramiko broke" in out["odd"].message
    assert isinstance(out["junk"], TransportError) and out["junk"].kind == "facts"
    assert ts["gone"].ran == ["facts"] and ts["junk"].ran == ["facts"]  # a failed step stops that host only


def test_a_write_step_is_refused_before_any_host_is_contacted() -> None:
    pool = _Pool({"a": _T("a", {})})
    write = Step("stage", Command.of("true", label="stage"), lambda r: None)
    with pytest.raises(ValueError, match="writes"):
        run_reads(pool, [_Host("a")], lambda name: [facts_step(), write])
    assert pool.calls == 0


STEP_TABLE = [
    # (modules asked, dmesg) -> step names, in order
    ((), False, ["facts"]),
    (("lp_a",), False, ["facts"]),  # the modules' state is read by the facts command itself
    (("lp_a", "not a name;"), True, ["facts", "dmesg"]),
    (("$(reboot)",), False, ["facts"]),
]


@pytest.mark.parametrize("modules,dmesg,names", STEP_TABLE)
def test_observation_steps_table(modules: tuple[str, ...], dmesg: bool, names: list[str]) -> None:
    steps = observation_steps(modules, dmesg=dmesg)
    assert [s.name for s in steps] == names
    assert not any(s.writes for s in steps)
    for s in steps:
        assert "reboot" not in " ".join(s.argv()) and "not a name" not in " ".join(s.argv())
    assert ("lp_a" in steps[0].argv()) == ("lp_a" in modules)


def test_state_step_argv_names_only_valid_modules() -> None:
    step = lp.state_step("lp-a", "lp_b")
    assert step.argv()[-2:] == ("lp_a", "lp_b") and step.action.sudo


def test_facts_step_interprets_output() -> None:
    r = CommandResult("h1", facts_step().action, 0, _facts_text())  # type: ignore[arg-type]
    assert interpret_facts(r).name == "h1" and facts_step().interpret(r).release == "6.1.0-56-amd64"


def test_reads_on_targets_the_caller_holds() -> None:
    """The rollout engine keeps SshTargets by name: it can run its soak reads through the same fan-out."""
    from kpipe.fleet.observe import run_reads_on

    ts = {"a": _T("a", {"facts": (0, _facts_text())}), "b": _T("b", {"facts": (1, "")})}
    out = run_reads_on(_Pool(ts), [_Host("a"), _Host("b")], lambda name: [facts_step()])
    assert list(out) == ["a", "b"]
    a, b = out["a"], out["b"]
    assert isinstance(a, list) and isinstance(a[0], HostFacts) and a[0].name == "a"
    assert isinstance(b, TransportError) and b.kind == "facts"
