"""Patch streams and cumulative upgrades: recipes, the planner, host plans, desired state and audit (pure),
then replace transitions on the simulated fleet with fault injection (real sshd hosts, simulated klp).

A stream's version N is a module of its own (<base>-vN): during an upgrade both versions are loaded, and the
kernel refuses two modules of one name. Upgrade: load vN (klp replace disables vN-1), prove it, retire vN-1
(its sysfs folder gone, its module removed). Rollback of an upgrade: load vN-1 again, remove vN.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import kenv
from kpipe import recipes
from kpipe.artifacts import add_artifact
from kpipe.audit import MISSING, UNEXPECTED, evaluate_host, observed_from_livepatch
from kpipe.builder.kpatch import KpatchBuilder
from kpipe.commands import CommandResult
from kpipe.desired import AppliedRecord, desired_from_records, split_versioned
from kpipe.errors import ConfigError
from kpipe.fleet import livepatch as lp
from kpipe.plan import StepFailed
from kpipe.rollout.engine import Restore, apply_plan, preflight_problems, rollback_plan
from kpipe.rollout.journal import Journal
from kpipe.rollout.planner import (
    Candidate,
    FailureBudget,
    HostView,
    LoadedPatch,
    RolloutOptions,
    RolloutPlan,
    plan_rollout,
)
from kpipe.workspace import load_workspace
from recipe_ws import line_of, make_workspace

KBUILD = """\
builder: kbuild
kernels: [5.15.0-91-generic]
kbuild:
  sources:
    - {template: templates/lp.c.j2, name: lp.c}
"""
TEMPLATE = "replace={{ replace }} stream={{ stream }} version={{ version }} module={{ module }}\n"


def _ws(tmp_path: Path, text: str, name: str = "memcg"):
    return load_workspace(make_workspace(tmp_path, {name: text}, templates={"lp.c.j2": TEMPLATE}))


def _errors(ws):
    return [p for p in recipes.lint(ws) if p.severity == "error"]


# --- recipes ---------------------------------------------------------------------------------------------------


def test_defaults_stream_is_the_recipe_version_1_replace_mode(tmp_path):
    ws = _ws(tmp_path, KBUILD)
    spec = recipes.render(ws, "memcg", "5.15.0-91-generic")
    assert (spec.stream, spec.version, spec.replace) == ("memcg", 1, True)
    assert spec.module_name == "livepatch-memcg"  # no declared version: the name a recipe always had
    assert spec.sources[0].text == "replace=True stream=memcg version=1 module=livepatch-memcg\n"


def test_version_is_encoded_in_the_module_name_and_reaches_the_templates(tmp_path):
    ws = _ws(tmp_path, KBUILD + "stream: cgroup\nversion: 2\nreplace: false\n")
    spec = recipes.render(ws, "memcg", "5.15.0-91-generic")
    assert (spec.stream, spec.version, spec.replace) == ("cgroup", 2, False)
    assert spec.module_name == "livepatch-memcg-v2"
    assert spec.options["module_name"] == "livepatch-memcg-v2"  # the Kbuild's obj-m, the sysfs folder
    assert spec.sources[0].text == "replace=False stream=cgroup version=2 module=livepatch-memcg-v2\n"
    assert spec.rendered["version"] == 2 and spec.rendered["replace"] is False
    # an explicit name that already says v2 is kept; one that does not gets the suffix
    named = KBUILD.replace("kbuild:\n", "kbuild:\n  module_name: kpipe_memcg_v2\n")
    assert recipes.render(_ws(tmp_path / "b", named + "version: 2\n"), "memcg",
                          "5.15.0-91-generic").module_name == "kpipe_memcg_v2"
    named = KBUILD.replace("kbuild:\n", "kbuild:\n  module_name: kpipe-memcg\n")
    assert recipes.render(_ws(tmp_path / "c", named + "version: 3\n"), "memcg",
                          "5.15.0-91-generic").module_name == "kpipe-memcg-v3"


@pytest.mark.parametrize("extra, field, words", [
    ("version: 0\n", "version", "between 1 and"),
    ("version: two\n", "version", "must be an integer"),
    ("version: \"{{ kernel.abi }}\"\n", "version", "not a template"),
    ("stream: \"bad stream\"\n", "stream", "not a valid stream name"),
    ("replace: maybe\n", "replace", "true or false"),
])
def test_bad_stream_keys_are_one_line_with_file_and_line(tmp_path, extra, field, words):
    ws = _ws(tmp_path, KBUILD + extra)
    errs = _errors(ws)
    assert errs, extra
    text = str(errs[0])
    assert words in text and f"memcg.yaml:{line_of(ws.root, 'memcg', field + ':')}" in text, text
    with pytest.raises(ConfigError):
        recipes.render(ws, "memcg", "5.15.0-91-generic")


def test_kpatch_build_replace_mode_by_default_and_minus_r_for_non_replace(tmp_path):
    base = "builder: kpatch-build\nkernels: [5.10.0-amd64-UOS]\npatches: [fix.patch]\n"
    host = load_workspace(make_workspace(tmp_path / "h", {})).build_hosts[0]

    def argv(text: str, sub: str) -> tuple[str, ...]:
        ws = load_workspace(make_workspace(tmp_path / sub, {"fix": text}))
        spec = recipes.render(ws, "fix", "5.10.0-amd64-UOS")
        return KpatchBuilder().plan(spec, host, "/w").argv

    assert "-R" not in argv(base, "a")
    assert "-R" in argv(base + "replace: false\n", "b")
    plan = argv(base + "version: 4\n", "c")
    assert plan[plan.index("-n") + 1] == "livepatch-fix-v4"
    # the older spelling still works, and a contradiction is an error naming both
    assert "-R" in argv(base + "kpatch: {non_replace: true}\n", "d")
    ws = load_workspace(make_workspace(tmp_path / "e", {"fix": base + "replace: true\nkpatch: {non_replace: true}\n"}))
    assert any("contradicts" in str(p) for p in _errors(ws))


def test_shipped_cmdline_template_sets_klp_replace(tmp_path):
    ws = load_workspace(make_workspace(tmp_path, {}, examples=True))
    release = kenv.kernel_env().release  # the installed headers' release: in the catalog by discovery
    for name, want in (("cmdline-stream-v1", ".replace = true"), ("cmdline-stream-v2", ".replace = true"),
                       ("proc-version-stream", ".replace = false")):
        spec = recipes.render(ws, name, release)
        c = next(s.text for s in spec.sources if s.name.endswith(".c"))
        assert want in c, name
        assert f'MODULE_INFO(kpipe_version, "{spec.version}")' in c


# --- the planner -----------------------------------------------------------------------------------------------
R1 = "5.10.0-amd64-UOS"  # any release: the planner and audit here are pure, no headers are read


def cand(id_: str, version: int, *, stream: str = "demo", replace_: bool = True, base: str = "kpipe-demo",
         kernel: str = R1, **kw) -> Candidate:
    return Candidate(id=id_, sha256=(id_ * 6)[:64], module_name=f"{base}-v{version}",
                     filename=f"{base}-v{version}.ko", kernel=kernel, recipe=f"{stream}-recipe", arch="x86_64",
                     preflight="passed", replace=replace_, stream=stream, version=version, **kw)


V1, V2, V3 = cand("aaaa00000001", 1), cand("aaaa00000002", 2), cand("aaaa00000003", 3)
OPTS = RolloutOptions(waves="100%")


def view(*loaded: str) -> HostView:
    return HostView("h1", release=R1, arch="x86_64", loaded=tuple(LoadedPatch(n) for n in loaded))


def test_upgrade_plans_a_transition_that_names_the_older_version_and_its_artifact():
    plan = plan_rollout("demo-recipe", "recipe", [view("kpipe_demo_v1")], [V2], OPTS, known=[V1, V2])
    a = plan.assignments["h1"]
    assert a.artifact == V2 and a.supersedes == "kpipe_demo_v1" and a.supersedes_artifact == V1
    assert any("v1 (kpipe_demo_v1) -> v2" in n for n in a.notes)
    assert RolloutPlan.from_dict(plan.to_dict()) == plan
    assert plan.restorable() == {V1.id: V1}


def test_recipe_target_picks_the_highest_version():
    old_but_newer_build = replace(V1, created_at=99.0)
    plan = plan_rollout("demo-recipe", "recipe", [view()], [old_but_newer_build, V2], OPTS)
    assert plan.assignments["h1"].artifact.id == V2.id


def test_older_version_recognised_by_its_module_name_without_the_store():
    plan = plan_rollout("x", "artifact", [view("kpipe_demo_v1")], [V2], OPTS)
    a = plan.assignments["h1"]
    assert a.supersedes == "kpipe_demo_v1" and a.supersedes_artifact is None
    assert any("cannot load it again" in n for n in a.notes)


@pytest.mark.parametrize("loaded, ours, known, code, words", [
    (["kpipe_demo_v3"], V2, [V3], "downgrade", "does not downgrade"),
    (["kpipe_demo_v1", "kpipe_demo_v2"], V3, [V1, V2], "conflict", "two older versions"),
    (["kpipe_other_v1"], V2, [cand("bbbb00000001", 1, stream="other", base="kpipe-other", replace_=False)],
     "conflict", "replace patch"),
])
def test_refusals_say_why(loaded, ours, known, code, words):
    plan = plan_rollout("x", "artifact", [view(*loaded)], [ours], OPTS, known=known)
    (ex,) = plan.excluded
    assert ex.code == code and words in ex.reason, ex


def test_non_replace_streams_coexist():
    other = cand("bbbb00000001", 1, stream="other", base="kpipe-other", replace_=False)
    ours = cand("aaaa00000011", 1, replace_=False)
    plan = plan_rollout("x", "artifact", [view("kpipe_other_v1")], [ours], OPTS, known=[other])
    a = plan.assignments["h1"]
    assert a.coexists == ("kpipe_other_v1",) and not a.supersedes


# --- host plans ------------------------------------------------------------------------------------------------


def state(*patches: str, modules: tuple[str, ...] = ()) -> lp.HostLivepatch:
    lines = ["livepatch_sysfs 1", "tainted 0"]
    for p in patches:
        lines += [f"patch {p}", f"enabled {p} 1", f"transition {p} 0", f"module {p} 1 OK"]
    lines += [f"module {m} 1 OK" for m in modules]
    return lp.parse_host_livepatch("\n".join(lines + ["end"]))


FACTS = {"release": R1, "arch": "x86_64", "free_kb": "100000", "staged": "absent", "kpatch_cli": "0"}


def _upgrade_assignment():
    return plan_rollout("x", "artifact", [view("kpipe_demo_v1")], [V2], OPTS, known=[V1]).assignments["h1"]


def test_apply_plan_retires_the_older_version_after_verifying_ours(tmp_path):
    a = _upgrade_assignment()
    ko = tmp_path / "m.ko"
    ko.write_bytes(b"x")
    steps = apply_plan(a, FACTS, state("kpipe_demo_v1"), ko)
    names = [s.name for s in steps]
    assert names.index("verify") < names.index("retire") < names.index("retire-unload") < names.index(
        "retire-verify")
    retire = next(s for s in steps if s.name == "retire")
    assert retire.argv()[-3:] == ("kpipe_demo_v1", "120", "1")  # replace mode: must be gone, not disabled
    assert retire.intended == {"module": "kpipe_demo_v1", "replace": True}
    # a first install has no retire step
    first = plan_rollout("x", "artifact", [view()], [V2], OPTS).assignments["h1"]
    assert "retire" not in [s.name for s in apply_plan(first, FACTS, state(), ko)]


def test_preflight_accepts_the_older_version_and_refuses_a_newer_one():
    a = _upgrade_assignment()
    assert preflight_problems(a, FACTS, state("kpipe_demo_v1"), 1, False) == []
    probs = preflight_problems(a, FACTS, state("kpipe_demo_v3"), 1, False)
    assert any("does not downgrade" in p for p in probs), probs


def test_rollback_of_an_upgrade_loads_the_older_version_then_removes_ours(tmp_path):
    a = _upgrade_assignment()
    old = replace(a, artifact=V1, supersedes="", supersedes_artifact=None)
    ko = tmp_path / "v1.ko"
    ko.write_bytes(b"x")
    steps = rollback_plan(a, state("kpipe_demo_v2", modules=()), restore=Restore(old, ko))
    names = list(dict.fromkeys(s.name for s in steps))
    assert names == ["rb-restage", "rb-marker", "rb-reload", "rb-rewait", "rb-reverify", "rb-disable", "rb-unload",
                     "rb-unstage", "rb-verify"]
    load = next(s for s in steps if s.name == "rb-reload" and "insmod" in " ".join(s.argv()))
    assert load.argv()[-1].endswith("/kpipe-demo-v1.ko")
    # a first install's rollback: disable and unload only
    first = rollback_plan(a, state("kpipe_demo_v2"))
    assert "rb-reload" not in [s.name for s in first]
    # another stream's patch loaded meanwhile: reloading replace-mode v1 would disable it too, so the
    # rollback refuses (ours stays loaded) and says why
    (refuse,) = rollback_plan(a, state("kpipe_demo_v2", "kpipe_other_v1"), restore=Restore(old, ko))
    with pytest.raises(StepFailed, match="kpipe_other_v1"):
        refuse.interpret(CommandResult("h1", refuse.action, 0))


# --- desired state and audit -----------------------------------------------------------------------------------


def rec(seq: float, rid: str, patch: str, action: str = "applied", version: int = 1, **kw) -> AppliedRecord:
    return AppliedRecord(seq, rid, "h1", patch, action, f"art{version}", "", R1, True, stream="demo",
                         version=version, **kw)


def test_split_versioned():
    assert split_versioned("kpipe-memcg-v12") == ("kpipe_memcg", 12)
    assert split_versioned("livepatch_cmdline") is None


def test_upgrade_then_rollback_of_the_upgrade_makes_the_older_version_desired_again():
    up = [rec(1, "r1", "kpipe_demo_v1"), rec(2, "r2", "kpipe_demo_v2", version=2)]
    d = desired_from_records(up)
    assert list(d.for_host("h1")) == ["kpipe_demo_v2"] and d.for_host("h1")["kpipe_demo_v2"].version == 2
    assert "v1 -> v2" in d.retired["h1"]["kpipe_demo_v1"]
    back = desired_from_records(up + [rec(3, "r2", "kpipe_demo_v2", "rolled_back", 2, restored="kpipe_demo_v1")])
    assert list(back.for_host("h1")) == ["kpipe_demo_v1"]
    # a rollback that restored nothing (a first install) leaves nothing desired
    assert not desired_from_records(up[:1] + [rec(2, "r1", "kpipe_demo_v1", "rolled_back")]).for_host("h1")


def test_audit_names_an_outdated_version():
    d = desired_from_records([rec(1, "r1", "kpipe_demo_v1"), rec(2, "r2", "kpipe_demo_v2", version=2)])
    audit = evaluate_host(d, observed_from_livepatch("h1", state("kpipe_demo_v1"), kernel=R1))
    rows = {r.patch: r for r in audit.rows}
    assert rows["kpipe_demo_v2"].status == MISSING
    assert rows["kpipe_demo_v2"].detail.startswith("outdated: stream demo runs v1 (kpipe_demo_v1), desired v2")
    assert rows["kpipe_demo_v1"].status == UNEXPECTED and "outdated version of stream demo" in rows[
        "kpipe_demo_v1"].detail
    assert not audit.compliant


# --- the simulated fleet ---------------------------------------------------------------------------------------
from simfleet import fake_module, simfleet_factory  # noqa: E402,F401  (the session fixture)

RELEASE = kenv.kernel_env(module_level=True).release


def _artifact(ws, tmp_path: Path, version: int, *, stream: str = "demo", replace_: bool = True,
              base: str = "kpipe-demo"):
    name = f"{base}-v{version}"
    ko = tmp_path / f"{name}.ko"
    ko.write_bytes(fake_module(name.replace("-", "_"), build_id=bytes([version]) * 20, replace=replace_))
    return add_artifact(ws.store, ko, kernel=RELEASE, status="valid", arch="x86_64", module_name=name,
                        recipe=f"{stream}-recipe", preflight={"status": "passed"},
                        meta={"stream": stream, "version": version, "replace": replace_})


def _plan(ws, art, hosts, known=(), loaded=(), **opts):
    options = RolloutOptions(**{"waves": "1,100%", "forks": 50, "step_timeout_s": 30.0, **opts})
    views = [HostView(h.name, release=RELEASE, arch="x86_64", loaded=tuple(LoadedPatch(n) for n in loaded))
             for h in hosts]
    plan = plan_rollout(art.id, "artifact", views, [Candidate.of(art)], options,
                        known=[Candidate.of(k) for k in known])
    journal = Journal(ws.store)
    return plan, journal, journal.create(plan.to_dict(), options.to_dict(), target=art.id)


def _run(ws, journal, rid, what="start"):
    from kpipe.rollout.world import engine_for

    engine, runner = engine_for(ws, journal, rid)
    try:
        return getattr(engine, what)(rid)
    finally:
        runner.close()


def _verify(ws) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws.root), "verify"], capture_output=True,
                          text=True, timeout=300)


def _live(host, name: str) -> bool:
    p = host.patches().get(name)
    return bool(p) and p["enabled"] == "1" and p["transition"] == "0"


def test_replace_upgrade_on_50_hosts_with_hosts_dying_mid_transition_then_rollback(simfleet_factory, tmp_path):
    fleet = simfleet_factory(50)
    ws = load_workspace(fleet.write_workspace(tmp_path / "ws", forks=50))
    v1, v2 = _artifact(ws, tmp_path, 1), _artifact(ws, tmp_path, 2)
    _, journal, r1 = _plan(ws, v1, fleet.hosts)
    s = _run(ws, journal, r1)
    assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s
    assert all(_live(h, "kpipe_demo_v1") for h in fleet.hosts)

    # v2: some hosts die right after the kernel loaded v2 (v1 still loaded), some right after v1's rmmod
    died_load = [h.name for h in fleet.hosts[3:30:9]]
    died_rmmod = [h.name for h in fleet.hosts[5:40:11]]
    for n in died_load:
        fleet.host(n).inject("die_during", op="insmod")
    for n in died_rmmod:
        fleet.host(n).inject("die_during", op="rmmod")
    plan, journal, r2 = _plan(ws, v2, fleet.hosts, known=[v1], loaded=["kpipe_demo_v1"],
                              max_failures=FailureBudget.parse("100%"))
    assert all(a.supersedes == "kpipe_demo_v1" for a in plan.assignments.values())
    s = _run(ws, journal, r2)
    assert s.state == "completed"
    for h in fleet.hosts:
        name = h.name
        if name in died_load or name in died_rmmod:
            assert s.hosts[name] == "unreachable", (name, s.hosts[name], s.reasons.get(name))
            continue
        assert s.hosts[name] == "applied", (name, s.reasons.get(name))
        assert _live(h, "kpipe_demo_v2")
        assert "kpipe_demo_v1" not in h.patches() and "kpipe_demo_v1" not in h.modules()
    for n in died_load:  # a known, journaled state: v2 loaded by the kernel, v1's module still there
        host = fleet.host(n)
        assert "kpipe_demo_v1" in host.modules() and "kpipe_demo_v1" not in host.patches()
        steps = [e.step for e in journal.entries(r2, n)]
        assert "load" in steps and "retire-unload" not in steps
    for n in died_rmmod:
        steps = [(e.step, e.phase) for e in journal.entries(r2, n)]
        assert ("retire-unload", "intended") in steps and ("retire-unload", "done") not in steps
    # the hosts come back (kernel state kept): resume finishes the transition, loading nothing twice
    for n in died_load + died_rmmod:
        fleet.host(n).clear()
        fleet.host(n).start()
    s = _run(ws, journal, r2, "resume")
    assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s
    for h in fleet.hosts:
        assert _live(h, "kpipe_demo_v2") and "kpipe_demo_v1" not in h.modules()
        assert sum(1 for ln in h.log() if "enabling patch 'kpipe_demo_v2'" in ln) == 1
    r = _verify(ws)
    assert r.returncode == 0, r.stdout + r.stderr

    # the rollback of the upgrade loads v1 again (it replaces v2), then unloads v2
    s = _run(ws, journal, r2, "rollback")
    assert s.state == "rolled_back" and set(s.hosts.values()) == {"rolled_back"}, s
    for h in fleet.hosts:
        assert _live(h, "kpipe_demo_v1"), h.name
        assert "kpipe_demo_v2" not in h.modules() and "kpipe_demo_v2" not in h.patches()
    r = _verify(ws)
    assert r.returncode == 0, r.stdout + r.stderr  # v1 is what the journal now wants


def test_non_replace_streams_coexist_and_upgrade_independently(simfleet_factory, tmp_path):
    fleet = simfleet_factory(3)
    ws = load_workspace(fleet.write_workspace(tmp_path / "ws", forks=50))
    a1 = _artifact(ws, tmp_path, 1, replace_=False)
    b1 = _artifact(ws, tmp_path, 1, stream="other", base="kpipe-other", replace_=False)
    a2 = _artifact(ws, tmp_path, 2, replace_=False)
    for art, loaded in ((a1, []), (b1, ["kpipe_demo_v1"])):
        _, journal, rid = _plan(ws, art, fleet.hosts, known=[a1, b1], loaded=loaded)
        assert _run(ws, journal, rid).state == "completed"
    for h in fleet.hosts:
        assert _live(h, "kpipe_demo_v1") and _live(h, "kpipe_other_v1")
    assert _verify(ws).returncode == 0
    # a non-replace upgrade of stream demo: v2 stacks, then kpipe disables and unloads v1; stream other stays
    plan, journal, rid = _plan(ws, a2, fleet.hosts, known=[a1, b1], loaded=["kpipe_demo_v1", "kpipe_other_v1"])
    a = plan.assignments[fleet.hosts[0].name]
    assert a.supersedes == "kpipe_demo_v1" and a.coexists == ("kpipe_other_v1",)
    s = _run(ws, journal, rid)
    assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s
    for h in fleet.hosts:
        assert _live(h, "kpipe_demo_v2") and _live(h, "kpipe_other_v1")
        assert "kpipe_demo_v1" not in h.modules()
    r = _verify(ws)
    assert r.returncode == 0, r.stdout + r.stderr
    # a replace patch of stream demo would disable stream other: refused before any host is touched
    a3 = _artifact(ws, tmp_path, 3)
    plan, _, _ = _plan(ws, a3, fleet.hosts, known=[a1, a2, b1], loaded=["kpipe_demo_v2", "kpipe_other_v1"])
    assert not plan.assignments and {e.code for e in plan.excluded} == {"conflict"}
    assert "kpipe_other_v1 (stream other)" in plan.excluded[0].reason
