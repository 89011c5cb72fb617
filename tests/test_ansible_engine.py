"""The Ansible executor for real: kpipe's Engine with every host step run as an Ansible task
(ansible-runner over real SSH) against SimFleet hosts (real sshd processes on loopback, each in
a private mount namespace where sysfs, insmod/rmmod, dmesg and /var/lib/kpatch are simulated and
verified before use). Nothing here touches this machine's kernel.

The scenarios the old role-based engine was tested with, now through the one plan: waves, an
idempotent second rollout, the gate's halt and the rollback policies, the failure budget, a
stuck transition, an unreachable host, strict host keys, values Ansible must not template.
tests/test_executors.py compares the two executors step for step."""

from __future__ import annotations

import ast
import hashlib
import signal
from pathlib import Path

import pytest

from kpipe.errors import ConfigError
from kpipe.rollout.ansible_executor import AnsibleRunner, ansible_engine_for
from kpipe.rollout.ansible_export import max_fail_percentage
from kpipe.rollout.planner import (
    FailureBudget,
)
from kpipe.transport.ansible import (
    AnsibleSession,
    HostAction,
    Unsafe,
    connection_vars,
    dump_yaml,
)
from kpipe.workspace import open_workspace
from rollout_world import ANSIBLE_TOML, MODULE, RELEASE, artifact_ws, rebooted, run_engine, stored_plan
from simfleet import simfleet_factory  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]



@pytest.fixture(scope="module")
def fleet(simfleet_factory):  # noqa: F811
    return simfleet_factory(5)


@pytest.fixture
def fresh(fleet):
    """Every host rebooted (no patches, no faults, nothing staged) before the test."""
    return rebooted(fleet)


def make_ws(fleet, tmp_path):
    return artifact_ws(fleet, tmp_path, extra_toml=ANSIBLE_TOML)


def make_plan(ws, art, waves: list[list[str]], **opts):
    sizes, total = [], 0
    for w in waves:
        total += len(w)
        sizes.append(str(total))
    return stored_plan(ws, art, [h for w in waves for h in w],
                       **{"waves": ",".join(sizes), "forks": 10, "step_timeout_s": 20.0, **opts})


def run(ws, journal, rid, what="start", **kw):
    return run_engine(ansible_engine_for, ws, journal, rid, what, **kw)


def assert_patched(host, sha):
    p = host.patches()
    assert str(p.get(MODULE, {}).get("enabled")) == "1", p
    staged = host.staged()
    assert {k: hashlib.sha256(v).hexdigest() for k, v in staged.items()} == \
        {f"/var/lib/kpatch/{RELEASE}/livepatch-demo.ko": sha}
    assert not host.temp_files(), "temporary file left behind"


def assert_clean(host):
    assert MODULE not in host.patches()
    assert MODULE not in host.modules()
    assert not host.staged()


def enables(host) -> int:
    return sum(f"enabling patch '{MODULE}'" in line for line in host.log())


def test_waves_apply_everywhere_and_a_second_rollout_loads_nothing_twice(fresh, tmp_path):
    ws, art = make_ws(fresh, tmp_path)
    names = [h.name for h in fresh.hosts[:3]]
    _plan, journal, rid = make_plan(ws, art, [names[:1], names[1:]])
    s, events = run(ws, journal, rid)
    assert s.state == "completed" and s.hosts == {n: "applied" for n in names}, s
    assert [e.wave for e in events if e.kind == "gate"] == [1, 2]
    assert {e.host for e in events if e.kind == "step"} == set(names), "progress reached the caller"
    for n in names:
        assert_patched(fresh.host(n), art.sha256)
        assert any(f"'{MODULE}': patching complete" in line for line in fresh.host(n).log())
    for h in fresh.hosts[3:]:
        assert_clean(h)  # not in the plan: untouched
    before = {n: enables(fresh.host(n)) for n in names}
    # A second rollout of the same build finds everything in place: verified, nothing loaded twice.
    _plan2, _, rid2 = make_plan(ws, art, [names])
    s2, _ = run(ws, journal, rid2)
    assert s2.hosts == {n: "applied" for n in names}, s2
    assert before == {n: enables(fresh.host(n)) for n in names}
    assert ws.store.root.joinpath("ansible").is_dir()  # ansible-runner's artifacts, per rollout


def test_failed_host_is_rolled_back_and_gate_halts_later_waves(fresh, tmp_path):
    ws, art = make_ws(fresh, tmp_path)
    h = [x.name for x in fresh.hosts]
    fresh.host(h[2]).inject("sig_enforce")  # refuses the unsigned module
    _plan, journal, rid = make_plan(ws, art, [[h[0]], [h[1], h[2]], [h[3], h[4]]],
                                    max_failures=FailureBudget.parse("0"), rollback_policy="failed")
    s, _ = run(ws, journal, rid)
    assert s.state == "halted" and h[2] in s.halt_reason
    assert s.hosts == {h[0]: "applied", h[1]: "applied", h[2]: "rolled_back", h[3]: "pending", h[4]: "pending"}
    assert "Key was rejected" in s.reasons[h[2]] or "insmod" in s.reasons[h[2]], s.reasons
    assert_patched(fresh.host(h[0]), art.sha256)
    assert_patched(fresh.host(h[1]), art.sha256)
    for n in (h[2], h[3], h[4]):
        assert_clean(fresh.host(n))


def test_wave_policy_rolls_back_the_whole_failing_wave_and_audit_agrees(fresh, tmp_path):
    from kpipe.fleet.auditing import run_audit

    ws, art = make_ws(fresh, tmp_path)
    h = [x.name for x in fresh.hosts]
    fresh.host(h[2]).inject("sig_enforce")
    _plan, journal, rid = make_plan(ws, art, [[h[0]], [h[1], h[2]], [h[3]]], rollback_policy="wave")
    s, _ = run(ws, journal, rid)
    assert s.hosts == {h[0]: "applied", h[1]: "rolled_back", h[2]: "rolled_back", h[3]: "pending"}, s
    assert_patched(fresh.host(h[0]), art.sha256)
    for n in (h[1], h[2], h[3]):
        assert_clean(fresh.host(n))
    # the journal the Ansible executor wrote is the one the audit reads; it then asks the hosts themselves
    audit = run_audit(ws, f"{h[0]}:{h[1]}:{h[2]}:{h[3]}")
    assert {x.host: x.status for x in audit.hosts} == {n: "compliant" for n in h[:4]}, audit.to_dict()
    fresh.host(h[0]).reboot()
    fresh.verify([fresh.host(h[0])])
    assert run_audit(ws, h[0]).hosts[0].status == "missing"


def test_budget_tolerates_a_failure_and_stuck_transition_is_rolled_back(fresh, tmp_path):
    ws, art = make_ws(fresh, tmp_path)
    h = [x.name for x in fresh.hosts[:3]]
    fresh.host(h[1]).inject("stuck_transition")
    # 15 s: long enough for the healthy hosts' steps on a loaded machine; the stuck host times out anyway
    _plan, journal, rid = make_plan(ws, art, [[h[0]], [h[1]], [h[2]]], max_failures=FailureBudget.parse("1"),
                                   step_timeout_s=15.0)
    s, _ = run(ws, journal, rid)
    assert s.state == "completed"
    assert s.hosts == {h[0]: "applied", h[1]: "failed", h[2]: "applied"}, s
    assert "transition" in s.reasons[h[1]]
    # the failed host is rolled back on request, by either engine: here the Ansible one
    r, _ = run(ws, journal, rid, "rollback", limit=h[1])
    assert r.hosts[h[1]] == "rolled_back"
    assert_clean(fresh.host(h[1]))
    assert not any("force" in line for line in fresh.host(h[1]).log())


def test_unreachable_host_is_data_not_an_exception(fresh, tmp_path):
    ws, art = make_ws(fresh, tmp_path)
    h = [x.name for x in fresh.hosts[:3]]
    _plan, journal, rid = make_plan(ws, art, [h], max_failures=FailureBudget.parse("1"))
    fresh.host(h[1]).stop()
    try:
        s, _ = run(ws, journal, rid)
    finally:
        fresh.host(h[1]).start()
    assert s.hosts == {h[0]: "applied", h[1]: "unreachable", h[2]: "applied"}, s
    assert s.reasons[h[1]]
    # resume retries the unreachable host, nothing is forgotten
    s2, _ = run(ws, journal, rid, "resume")
    assert s2.hosts == {n: "applied" for n in h}, s2


def test_strict_host_key_checking_refuses_unknown_keys(fresh, tmp_path):
    ws, art = make_ws(fresh, tmp_path)
    name = fresh.hosts[0].name
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    for f in (tmp_path / "ws" / "kpipe.toml", tmp_path / "ws" / "simfleet.yml"):
        f.write_text(f.read_text().replace(str(fresh.known_hosts), str(empty)))
    ws = open_workspace(str(tmp_path / "ws"))
    _plan, journal, rid = make_plan(ws, art, [[name]])
    s, _ = run(ws, journal, rid)
    assert s.hosts[name] == "unreachable", s
    assert "host key" in s.reasons[name].lower() or "verification" in s.reasons[name].lower(), s.reasons
    assert_clean(fresh.hosts[0])


def test_argv_reaches_the_host_verbatim_never_templated(fresh, tmp_path):
    """Every value travels `!unsafe`: a `{{ }}` in an argv is text on the host, not code on the controller."""
    from kpipe.commands import Command
    from kpipe.fleet.inventory import Host

    h = fresh.hosts[0]
    host = Host(h.name, h.address, h.port, "root", str(fresh.client_key))
    session = AnsibleSession({h.name: connection_vars(host, [str(fresh.known_hosts)], "/usr/bin/python3")},
                             tmp_path / "priv")
    runner = AnsibleRunner(session, {h.name: host})
    hostile = "{{ lookup('pipe', 'touch " + str(tmp_path / "pwned") + "') }}"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        out = runner.run_many([h.name], lambda t: t.run(Command.of("printf", "%s|%s", hostile, "a b\n")), 1)
    finally:
        runner.close()
    r = out[h.name]
    assert not isinstance(r, BaseException), r
    assert r.exit_status == 0 and r.stdout == hostile + "|a b\n"
    assert not (tmp_path / "pwned").exists()
    # ansible-runner must not take over Ctrl-C: kpipe's own handling (journal `interrupted`) needs it
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


# ---- pure parts ------------------------------------------------------------------------

@pytest.mark.parametrize("budget,waves,pct", [
    ("0", [[1], [1, 2], [1, 2, 3, 4]], 0),
    ("2", [[1], [1, 2, 3, 4]], 100),
    ("1", [[1, 2], [1, 2, 3, 4]], 50),
    ("10%", [[1], [1] * 9, [1] * 90], 10),
    ("50%", [[1, 2]], 50),
])
def test_budget_translation(budget, waves, pct):
    assert max_fail_percentage(FailureBudget.parse(budget), waves) == pct


class _H:
    def __init__(self, **kw):
        self.name, self.address, self.port, self.user, self.identity_file = "h1", "127.0.0.1", 22, "root", ""
        self.become, self.known_hosts, self.vars = False, "", {}
        self.__dict__.update(kw)


@pytest.mark.parametrize("field,value", [
    ("address", "{{ lookup('pipe', 'id') }}"), ("user", "root -oProxyCommand=x"), ("known_hosts", "/k/{% x %}"),
    ("identity_file", "/k/a b")])
def test_hostile_connection_values_are_refused(field, value):
    with pytest.raises(ConfigError):
        connection_vars(_H(**{field: value}), ["/k/main"])


def test_connection_vars_are_strict_and_dump_unsafe():
    v = connection_vars(_H(known_hosts="/k/extra", identity_file="/k/id"), ["/k/main"], "/usr/bin/python3")
    assert "StrictHostKeyChecking=yes" in v["ansible_ssh_common_args"]
    assert "UserKnownHostsFile=/k/main /k/extra" in v["ansible_ssh_common_args"]
    assert v["ansible_ssh_private_key_file"] == "/k/id"
    assert "ansible_ssh_private_key_file" not in connection_vars(_H(identity_file="/k/id"), [], with_identity=False)
    assert dump_yaml({"a": [Unsafe("{{ x }}")]}) == "a:\n- !unsafe '{{ x }}'\n"
    assert HostAction(src="/x", dest="/y").kind == "copy" and HostAction(argv=("true",)).kind == "command"


def test_transport_layer_does_not_import_the_rollout_layer():
    src = Path(__file__).resolve().parents[1] / "kpipe" / "transport" / "ansible.py"
    mods = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
    assert not [m for m in mods if m.startswith("kpipe.rollout")], mods
