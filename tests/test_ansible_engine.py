"""The Ansible engine for real: ansible-runner runs the kpipe playbook over real SSH
against SimFleet hosts (real sshd processes on loopback, each in a private mount
namespace where sysfs, insmod/rmmod, dmesg and /var/lib/kpatch are simulated and
verified before use). Nothing here touches this machine's kernel."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import kenv
from kpipe.errors import ConfigError
from kpipe.rollout.planner import Assignment, Candidate, FailureBudget, RolloutOptions, RolloutPlan
from kpipe.transport.ansible import budget_settings, build_inventory, run_plan_with_ansible
from simfleet import simfleet_factory  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RELEASE = kenv.kernel_env(module_level=True).release  # the installed headers' release (tests/kenv.py)
MODULE = "livepatch-demo"


@pytest.fixture(scope="module")
def fleet(simfleet_factory):  # noqa: F811
    return simfleet_factory(5)


@pytest.fixture
def fresh(fleet):
    """Every host rebooted (no patches, no faults) before the test."""
    for h in fleet.hosts:
        h.clear()
        h.reboot()
    fleet.verify()
    return fleet


def make_ws(fleet, tmp_path):
    from kpipe.workspace import open_workspace

    # The hosts share this machine's Python; pyenv's shims would fool interpreter discovery.
    folder = fleet.write_workspace(tmp_path / "ws", extra_toml='\n[ansible]\npython_interpreter = "/usr/bin/python3"\n')
    return open_workspace(str(folder)), folder / "simfleet.yml"


def artifact(tmp_path: Path, payload: bytes = b"simulated livepatch module\n") -> tuple[Path, Candidate]:
    path = tmp_path / f"{MODULE}.ko"
    path.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    cand = Candidate(id="a" + sha[:11], sha256=sha, module_name=MODULE, filename=f"{MODULE}.ko", kernel=RELEASE)
    return path, cand


def plan_for(waves: list[list[str]], cand: Candidate, path: Path, *, budget: str = "0", policy: str = "failed",
             timeout: float = 30) -> dict:
    assignments = {h: Assignment(h, i + 1, RELEASE, "x86_64", cand) for i, w in enumerate(waves) for h in w}
    opts = RolloutOptions(waves=",".join(str(len(w)) for w in waves), max_failures=FailureBudget.parse(budget),
                          rollback_policy=policy, step_timeout_s=timeout)
    plan = RolloutPlan(cand.id, "artifact", tuple(tuple(w) for w in waves), assignments, (), opts).to_dict()
    plan["artifact_paths"] = {cand.id: str(path)}
    return plan


def states(results) -> dict[str, str]:
    return {h: r.state for h, r in results.items()}


def assert_patched(host, sha):
    p = host.patches()
    assert p.get("livepatch_demo", {}).get("enabled") in (1, "1", True), p
    staged = host.staged()
    assert any(k.endswith(f"{RELEASE}/{MODULE}.ko") and hashlib.sha256(v).hexdigest() == sha
               for k, v in staged.items()), list(staged)
    assert not any(".kpipe-ansible" in k for k in staged), "temporary file left behind"


def assert_clean(host):
    assert "livepatch_demo" not in host.patches()
    assert "livepatch_demo" not in host.modules()


def test_waves_apply_everywhere_and_rerun_is_idempotent(fresh, tmp_path):
    ws, inv = make_ws(fresh, tmp_path)
    path, cand = artifact(tmp_path)
    names = [h.name for h in fresh.hosts[:3]]
    plan = plan_for([names[:1], names[1:]], cand, path)
    events = []
    results = run_plan_with_ansible(ws, plan, inv, on_event=events.append)
    assert states(results) == {n: "applied" for n in names}
    assert events, "the runner's event stream reached the caller"
    for n in names:
        assert_patched(fresh.host(n), cand.sha256)
        log = fresh.host(n).log()
        assert any("'livepatch_demo': patching complete" in line for line in log)
        assert any("kpipe: ansible marker livepatch_demo" in line for line in log)
    for h in fresh.hosts[3:]:
        assert_clean(h)  # not in the plan: untouched
    inserts = {n: sum("enabling patch 'livepatch_demo'" in line for line in fresh.host(n).log()) for n in names}
    # A second run finds everything in place: verified, nothing loaded twice.
    again = run_plan_with_ansible(ws, plan, inv)
    assert states(again) == {n: "applied" for n in names}
    assert inserts == {n: sum("enabling patch 'livepatch_demo'" in line for line in fresh.host(n).log())
                       for n in names}


def test_failed_host_is_rolled_back_and_gate_halts_later_waves(fresh, tmp_path):
    ws, inv = make_ws(fresh, tmp_path)
    path, cand = artifact(tmp_path)
    h = [x.name for x in fresh.hosts]
    fresh.host(h[2]).inject("sig_enforce")  # refuses the unsigned module
    plan = plan_for([[h[0]], [h[1], h[2]], [h[3], h[4]]], cand, path, budget="0", policy="failed")
    results = run_plan_with_ansible(ws, plan, inv)
    s = states(results)
    assert s[h[0]] == "applied" and s[h[1]] == "applied"
    assert s[h[2]] == "rolled_back" and results[h[2]].detail.get("apply_failed")
    assert "Key was rejected" in results[h[2]].reason or "insmod" in results[h[2]].reason
    assert s[h[3]] == s[h[4]] == "skipped"  # the gate halted before wave 3
    assert results[h[0]].detail["halted"] is True
    assert_patched(fresh.host(h[0]), cand.sha256)
    assert_patched(fresh.host(h[1]), cand.sha256)
    for n in (h[2], h[3], h[4]):
        assert_clean(fresh.host(n))


def test_wave_policy_rolls_back_the_whole_failing_wave_and_audit_agrees(fresh, tmp_path):
    from kpipe.fleet.auditing import run_audit
    from kpipe.rollout.journal import Journal
    from kpipe.transport.ansible import record_outcomes

    ws, inv = make_ws(fresh, tmp_path)
    path, cand = artifact(tmp_path)
    h = [x.name for x in fresh.hosts]
    fresh.host(h[2]).inject("sig_enforce")
    plan = plan_for([[h[0]], [h[1], h[2]], [h[3]]], cand, path, budget="0", policy="wave")
    results = run_plan_with_ansible(ws, plan, inv)
    s = states(results)
    assert s == {h[0]: "applied", h[1]: "rolled_back", h[2]: "rolled_back", h[3]: "skipped"}
    assert results[h[1]].detail["state_before_rollback"] == "applied"
    assert_patched(fresh.host(h[0]), cand.sha256)
    for n in (h[1], h[2], h[3]):
        assert_clean(fresh.host(n))
    assert not any(k.endswith(f"{MODULE}.ko") for k in fresh.host(h[1]).staged())  # unstaged too

    # Journaled like the SSH engine's outcomes, the audit then reads the hosts themselves.
    journal = Journal(ws.store)
    rid = journal.create(plan, plan["options"], target=cand.id)
    record_outcomes(journal, rid, plan, results)
    audit = run_audit(ws, f"{h[0]}:{h[1]}:{h[2]}:{h[3]}")
    assert {x.host: x.status for x in audit.hosts} == {n: "compliant" for n in h[:4]}, audit.to_dict()
    row = next(r for r in audit.rows if r.host == h[0])
    assert row.patch == "livepatch_demo" and row.observed_sha256 == cand.sha256
    # A host changed behind kpipe's back shows up at once.
    fresh.host(h[0]).reboot()
    fresh.verify([fresh.host(h[0])])
    assert run_audit(ws, h[0]).hosts[0].status == "missing"


def test_budget_tolerates_a_failure_and_stuck_transition_is_rolled_back(fresh, tmp_path):
    ws, inv = make_ws(fresh, tmp_path)
    path, cand = artifact(tmp_path)
    h = [x.name for x in fresh.hosts[:3]]
    fresh.host(h[1]).inject("stuck_transition")
    plan = plan_for([[h[0]], [h[1]], [h[2]]], cand, path, budget="1", timeout=3)
    results = run_plan_with_ansible(ws, plan, inv)
    s = states(results)
    assert s == {h[0]: "applied", h[1]: "rolled_back", h[2]: "applied"}, results
    assert "transition" in results[h[1]].reason
    assert_clean(fresh.host(h[1]))
    assert not any("force" in line for line in fresh.host(h[1]).log())


def test_unreachable_host_is_data_not_an_exception(fresh, tmp_path):
    ws, inv = make_ws(fresh, tmp_path)
    path, cand = artifact(tmp_path)
    h = [x.name for x in fresh.hosts[:3]]
    fresh.host(h[1]).stop()
    try:
        plan = plan_for([[h[0], h[1], h[2]]], cand, path, budget="1")
        results = run_plan_with_ansible(ws, plan, inv)
    finally:
        fresh.host(h[1]).start()
    s = states(results)
    assert s == {h[0]: "applied", h[1]: "unreachable", h[2]: "applied"}, results
    assert results[h[1]].reason


def test_strict_host_key_checking_refuses_unknown_keys(fresh, tmp_path):
    ws, inv = make_ws(fresh, tmp_path)
    path, cand = artifact(tmp_path)
    name = fresh.hosts[0].name
    # An inventory without kpipe_known_hosts and a workspace whose known_hosts is empty.
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    text = inv.read_text().replace(str(fresh.known_hosts), str(empty))
    inv2 = tmp_path / "strict.yml"
    inv2.write_text(text)
    toml = (tmp_path / "ws" / "kpipe.toml")
    toml.write_text(toml.read_text().replace(str(fresh.known_hosts), str(empty)))
    from kpipe.workspace import open_workspace

    ws = open_workspace(str(tmp_path / "ws"))
    results = run_plan_with_ansible(ws, plan_for([[name]], cand, path), inv2)
    assert results[name].state == "unreachable"
    assert "host key" in results[name].reason.lower() or "verification" in results[name].reason.lower()
    assert_clean(fresh.hosts[0])


# ---- pure parts ------------------------------------------------------------------------

@pytest.mark.parametrize("budget,waves,pct,allowed", [
    ("0", [[1], [1, 2], [1, 2, 3, 4]], 0, [0, 0, 0]),
    ("2", [[1], [1, 2, 3, 4]], 100, [2, 2]),
    ("1", [[1, 2], [1, 2, 3, 4]], 50, [1, 1]),
    ("10%", [[1], [1] * 9, [1] * 90], 10, [0, 1, 10]),
    ("50%", [[1, 2]], 50, [1]),
])
def test_budget_translation(budget, waves, pct, allowed):
    s = budget_settings(budget, waves)
    assert s["kpipe_serial"] == [len(w) for w in waves]
    assert s["kpipe_max_fail_percentage"] == pct
    assert s["kpipe_allowed_failures"] == allowed


class _H:
    def __init__(self, **kw):
        self.address, self.port, self.user, self.identity_file = "127.0.0.1", 22, "root", ""
        self.become, self.known_hosts = False, ""
        self.__dict__.update(kw)


@pytest.mark.parametrize("field,value", [
    ("module_name", "lp;rm -rf /"), ("module_name", "{{ lookup('pipe','id') }}"), ("filename", "../x.ko"),
    ("sha256", "zz"), ("release", "6.1 && reboot")])
def test_hostile_plan_values_are_refused(field, value, tmp_path):
    _, cand = artifact(tmp_path)
    plan = plan_for([["h1"]], cand, tmp_path / "x.ko")
    a = plan["assignments"]["h1"]
    if field == "release":
        a["release"] = value
    else:
        a["artifact"][field] = value
    with pytest.raises(ConfigError):
        build_inventory(plan, {"h1": _H()}, {cand.id: "/tmp/x.ko"}, [], rollout_hosts=["h1"], rollback_hosts=[])


def test_template_markers_in_connection_values_are_refused(tmp_path):
    _, cand = artifact(tmp_path)
    plan = plan_for([["h1"]], cand, tmp_path / "x.ko")
    with pytest.raises(ConfigError):
        build_inventory(plan, {"h1": _H(address="{{ lookup('pipe', 'id') }}")}, {cand.id: "/tmp/x.ko"}, [],
                        rollout_hosts=["h1"], rollback_hosts=[])


def test_inventory_orders_hosts_by_wave_and_is_strict(tmp_path):
    _, cand = artifact(tmp_path)
    plan = plan_for([["b"], ["c", "a"]], cand, tmp_path / "x.ko")
    doc = build_inventory(plan, {n: _H(known_hosts="/k/extra") for n in "abc"}, {cand.id: "/tmp/x.ko"},
                          ["/k/main"], rollout_hosts=["b", "c", "a"], rollback_hosts=[])
    hosts = doc["all"]["children"]["kpipe_rollout"]["hosts"]
    assert list(hosts) == ["b", "c", "a"]
    args = hosts["b"]["ansible_ssh_common_args"]
    assert "StrictHostKeyChecking=yes" in args and "UserKnownHostsFile=/k/main /k/extra" in args
    assert hosts["a"]["kpipe_wave"] == 2 and hosts["b"]["kpipe_module"] == "livepatch_demo"
