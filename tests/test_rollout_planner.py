"""Table tests for the rollout planner and the gate (pure, no network)."""

from __future__ import annotations

import pytest

import kenv
from kpipe.errors import ConfigError
from kpipe.rollout.gate import SoakWatch, decide, soak_schedule
from kpipe.rollout.planner import (
    Candidate,
    FailureBudget,
    HostView,
    LoadedPatch,
    RolloutOptions,
    RolloutPlan,
    order_hosts,
    plan_rollout,
    wave_sizes,
)

R1 = kenv.kernel_env(module_level=True).release  # the installed headers' release (tests/kenv.py)
R2 = "5.10.0-136.12.0.86.oe2203sp1.x86_64"


@pytest.mark.parametrize("spec,n,expected", [
    ("1,10%,50%,100%", 200, [1, 19, 80, 100]),
    ("1,10%,50%,100%", 3, [1, 1, 1]),          # each wave at least one host
    ("1,10%,50%,100%", 1, [1]),                # later waves would be empty: dropped
    ("1,10%,50%,100%", 0, []),
    ("1,100%", 3, [1, 2]),
    ("1,3", 3, [1, 2]),
    ("1,2", 10, [1, 1, 8]),                    # leftovers form a last wave
    ("50%", 5, [3, 2]),                         # ceil
    ("100%", 7, [7]),
    ("5,2,100%", 10, [5, 1, 4]),                # non-increasing cumulative counts still give >= 1
    ("33%,66%,100%", 3, [1, 1, 1]),
    ("10", 4, [4]),
])
def test_wave_sizes(spec, n, expected):
    assert wave_sizes(spec, n) == expected
    assert sum(expected) == n


@pytest.mark.parametrize("spec", ["", "a", "0", "0%", "150%", "1,,2", "-1", "1.5", "10%%"])
def test_bad_wave_specs_are_config_errors(spec):
    with pytest.raises(ConfigError):
        wave_sizes(spec, 10)


@pytest.mark.parametrize("text,attempted,allowed", [
    ("0", 100, 0), ("3", 1, 3), ("10%", 100, 10), ("10%", 9, 0), ("10%", 10, 1), ("50%", 3, 1), ("100%", 7, 7),
])
def test_failure_budget(text, attempted, allowed):
    assert FailureBudget.parse(text).allowed(attempted) == allowed


@pytest.mark.parametrize("text", ["x", "-1", "101%", "1.5", ""])
def test_bad_failure_budget(text):
    with pytest.raises(ConfigError):
        FailureBudget.parse(text)


@pytest.mark.parametrize("budget,attempted,failures,proceed", [
    ("0", 1, {}, True),
    ("0", 1, {"a": "load failed"}, False),
    ("1", 5, {"a": "x"}, True),
    ("1", 5, {"a": "x", "b": "y"}, False),
    ("10%", 20, {"a": "x", "b": "y"}, True),
    ("10%", 20, {"a": "x", "b": "y", "c": "z"}, False),
    ("10%", 1, {"a": "x"}, False),  # a failed canary halts a percentage budget
])
def test_gate_decide(budget, attempted, failures, proceed):
    d = decide(FailureBudget.parse(budget), attempted, failures)
    assert d.proceed is proceed
    if not proceed:
        assert "budget" in d.reason and sorted(failures)[0] in d.reason


def test_gate_abort_halts():
    d = decide(FailureBudget.parse("100%"), 3, {}, aborted=True)
    assert not d.proceed and "aborted" in d.reason


@pytest.mark.parametrize("soak,interval,expected", [
    (0, 10, []), (30, 10, [10, 20, 30]), (25, 10, [10, 20, 25]), (5, 10, [5]),
])
def test_soak_schedule(soak, interval, expected):
    assert soak_schedule(soak, interval) == expected


def test_soak_watch_counts_first_regression_only():
    w = SoakWatch()
    assert w.record({"a": (True, ""), "b": (False, "enabled=0")}) == ["b"]
    assert w.record({"a": (False, "gone"), "b": (False, "still")}) == ["a"]
    assert set(w.regressions) == {"a", "b"} and "round 1" in w.regressions["b"]


def cand(id, kernel=R1, **kw):
    kw.setdefault("preflight", "passed")
    return Candidate(id=id, sha256=id * 5, module_name="livepatch-cmdline", filename="livepatch-cmdline.ko",
                     kernel=kernel, recipe="cmdline-demo", arch=kw.pop("arch", "x86_64"), **kw)


def host(name, release=R1, **kw):
    kw.setdefault("arch", "x86_64")
    return HostView(name=name, release=release, **kw)


OPTS = RolloutOptions(waves="1,100%")

# (hosts, candidates, options, expected excluded codes by host, expected artifact by host)
CASES = {
    "happy": ([host("a"), host("b")], [cand("aaaa00000001")], OPTS, {},
              {"a": "aaaa00000001", "b": "aaaa00000001"}),
    "unreachable": ([host("a", reachable=False, error="connection refused")], [cand("aaaa00000001")], OPTS,
                    {"a": "unreachable"}, {}),
    "no livepatch": ([host("a", livepatch=False)], [cand("aaaa00000001")], OPTS, {"a": "no-livepatch"}, {}),
    "no artifact for release": ([host("a", release=R2)], [cand("aaaa00000001")], OPTS, {"a": "no-artifact"}, {}),
    "arch mismatch": ([host("a", arch="aarch64")], [cand("aaaa00000001")], OPTS, {"a": "arch-mismatch"}, {}),
    "sig_enforce unsigned": ([host("a", sig_enforce=True)], [cand("aaaa00000001")], OPTS, {"a": "unsigned"}, {}),
    "sig_enforce picks signed": ([host("a", sig_enforce=True)],
                                 [cand("aaaa00000001", created_at=2), cand("bbbb00000001", signed=True, created_at=1)],
                                 OPTS, {}, {"a": "bbbb00000001"}),
    "signed preferred": ([host("a")], [cand("aaaa00000001", created_at=2), cand("bbbb00000001", signed=True)],
                         OPTS, {}, {"a": "bbbb00000001"}),
    "newest preferred": ([host("a")], [cand("aaaa00000001", created_at=1), cand("bbbb00000001", created_at=2)],
                         OPTS, {}, {"a": "bbbb00000001"}),
    "rejected never chosen": ([host("a")], [cand("aaaa00000001", status="rejected")], OPTS, {"a": "no-artifact"}, {}),
    "not preflighted": ([host("a")], [cand("aaaa00000001", preflight="")], OPTS, {"a": "not-preflighted"}, {}),
    "preflight failed": ([host("a")], [cand("aaaa00000001", preflight="failed")], OPTS, {"a": "not-preflighted"}, {}),
    "skip preflight": ([host("a")], [cand("aaaa00000001", preflight="")],
                       RolloutOptions(waves="1", skip_preflight=True), {}, {"a": "aaaa00000001"}),
    "conflict in transition": ([host("a", loaded=(LoadedPatch("vendor_fix", transition=True),))],
                               [cand("aaaa00000001")], OPTS, {"a": "conflict"}, {}),
    "conflict non-replace": ([host("a", loaded=(LoadedPatch("vendor_fix"),))],
                             [cand("aaaa00000001", replace=False)], OPTS, {"a": "conflict"}, {}),
    "ours disabled": ([host("a", loaded=(LoadedPatch("livepatch_cmdline", enabled=False),))],
                      [cand("aaaa00000001")], OPTS, {"a": "conflict"}, {}),
    "replace supersedes": ([host("a", loaded=(LoadedPatch("vendor_fix"),))], [cand("aaaa00000001")], OPTS, {},
                           {"a": "aaaa00000001"}),
    "two kernels": ([host("a"), host("b", release=R2)], [cand("aaaa00000001"), cand("cccc00000001", kernel=R2)],
                    OPTS, {}, {"a": "aaaa00000001", "b": "cccc00000001"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_table(case):
    hosts, cands, opts, excluded, assigned = CASES[case]
    plan = plan_rollout("cmdline-demo", "recipe", hosts, cands, opts)
    assert {e.host: e.code for e in plan.excluded} == excluded
    assert {h: a.artifact.id for h, a in plan.assignments.items()} == assigned
    for e in plan.excluded:
        assert e.reason  # every exclusion says why
    # the plan survives its JSON round trip
    assert RolloutPlan.from_dict(plan.to_dict()) == plan


def test_plan_by_artifact_excludes_other_kernels_with_reason():
    plan = plan_rollout("aaaa00000001", "artifact", [host("a"), host("b", release=R2)], [cand("aaaa00000001")], OPTS)
    assert list(plan.assignments) == ["a"]
    (ex,) = plan.excluded
    assert ex.host == "b" and R2 in ex.reason and R1 in ex.reason


def test_waves_canary_first_and_deterministic():
    hosts = [host(f"web{i}") for i in range(1, 12)] + [host("db1", release=R2), host("zz-canary", canary=True)]
    cands = [cand("aaaa00000001"), cand("cccc00000001", kernel=R2)]
    p1 = plan_rollout("cmdline-demo", "recipe", hosts, cands, RolloutOptions(waves="1,10%,50%,100%"))
    p2 = plan_rollout("cmdline-demo", "recipe", list(reversed(hosts)), cands, RolloutOptions(waves="1,10%,50%,100%"))
    assert p1.waves == p2.waves
    assert p1.waves[0] == ("zz-canary",)
    assert p1.hosts[:3] == ["zz-canary", "web1", "db1"]  # round-robin over kernels, natural order
    assert "web2" in p1.hosts[:5] and p1.hosts.index("web2") < p1.hosts.index("web10")
    assert sorted(p1.hosts) == sorted(h.name for h in hosts)
    assert [len(w) for w in p1.waves] == wave_sizes("1,10%,50%,100%", 13)


def test_order_hosts_without_canary_is_natural():
    assert order_hosts([host("h10"), host("h2"), host("h1")]) == ["h1", "h2", "h10"]


def test_options_validation():
    with pytest.raises(ConfigError):
        RolloutOptions(rollback_policy="some")
    with pytest.raises(ConfigError):
        RolloutOptions(forks=0)
    o = RolloutOptions(max_failures=FailureBudget.parse("10%"), soak_s=5)
    assert RolloutOptions.from_dict(o.to_dict()) == o


def test_duplicate_hosts_rejected():
    with pytest.raises(ConfigError):
        plan_rollout("x", "recipe", [host("a"), host("a")], [], OPTS)
