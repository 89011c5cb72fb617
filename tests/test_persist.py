"""Persistence across reboot without the kpatch CLI (issue 11 §3) and SELinux labels of staged modules.

Plan tables (facts in -> exact argv out), the host scripts run for real in a private mount namespace
(a tmpfs /run with /run/systemd/system, a fake systemctl and insmod that log their argv: this machine's
own /etc, /var/lib and kernel are never touched), and the simulated fleet for a rollout with --persist
on hosts without systemd. The real reboot is tests/test_persist_vm.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from kpipe.audit import evaluate_host, observed_from_facts
from kpipe.commands import CommandResult
from kpipe.desired import DesiredState
from kpipe.fleet import facts as factsmod
from kpipe.fleet import livepatch as lp
from kpipe.plan import StepFailed, groups
from kpipe.rollout import engine as eng
from kpipe.rollout.planner import Assignment, Candidate
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)
from test_rollout_engine import make_plan, run, setup_ws

R = "6.1.0-56-amd64"  # parser data only
FILE = "livepatch-demo.ko"
DEST = f"/var/lib/kpatch/{R}/{FILE}"
PERSISTED = f"/var/lib/kpipe/modules/{R}/livepatch_demo/{FILE}"
FACTS = {"release": R, "arch": "x86_64", "free_kb": "1048576", "staged": "ab" * 32, "kpatch_cli": "0",
         "selinux": "off"}
NONE = "livepatch_sysfs 1\ntainted 0\nmodule livepatch_demo 0 -\nend\n"
CTX = "system_u:object_r:modules_object_t:s0"


def assignment() -> Assignment:
    art = Candidate(id="a1", sha256="ab" * 32, module_name="livepatch-demo", filename=FILE, kernel=R,
                    arch="x86_64")
    return Assignment("h1", 1, R, "x86_64", art)


def result(step, code: int, stdout: str = "", stderr: str = "") -> CommandResult:
    return CommandResult("h1", step.action, code, stdout, stderr)


# -- plan tables ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("facts, want_persist_argv0, selinux_arg", [
    (FACTS, "sh", ""),
    ({**FACTS, "selinux": "1"}, "sh", CTX),
    ({**FACTS, "kpatch_cli": "1"}, "kpatch", None),
])
def test_apply_plan_persists_with_kpipes_unit_unless_kpatch_exists(facts, want_persist_argv0, selinux_arg):
    steps = eng.apply_plan(assignment(), facts, lp.parse_host_livepatch(NONE), Path("/x"), persist=True,
                           marker="m")
    persist = [s for s in steps if s.name == "persist"]
    assert len(persist) == 1 and persist[0].argv()[0] == want_persist_argv0
    if want_persist_argv0 == "kpatch":
        assert persist[0].argv() == ("kpatch", "install", "-k", R, DEST)
        return
    argv = persist[0].argv()
    assert argv[3:] == ("kpipe", DEST, PERSISTED.rsplit("/", 1)[0], PERSISTED, lp.PERSIST_UNIT_PATH,
                        lp.PERSIST_UNIT_TEXT, lp.PERSIST_LOADER_PATH, lp.PERSIST_LOADER, selinux_arg)
    assert persist[0].intended == {"kpatch_cli": False, "path": PERSISTED, "unit": "kpipe-livepatch.service"}


def test_apply_plan_labels_staged_modules_only_on_selinux_hosts():
    def label_argvs(facts):
        steps = eng.apply_plan(assignment(), facts, lp.parse_host_livepatch(NONE), Path("/x"), marker="m")
        return [s.argv() for s in steps if s.name == "label"]

    assert label_argvs(FACTS) == []
    for mode in ("0", "1"):  # permissive and enforcing both label: a later switch to enforcing must not break
        assert label_argvs({**FACTS, "selinux": mode}) == [("chcon", CTX, DEST), ("ls", "-Z", DEST)]
    # the label is one journal step, after the stage and before the load
    steps = eng.apply_plan(assignment(), {**FACTS, "selinux": "1"}, lp.parse_host_livepatch(NONE), Path("/x"),
                           marker="m")
    assert [g[0].name for g in groups(steps)][:3] == ["stage", "label", "marker"]


@pytest.mark.parametrize("out, code, want", [
    (f"{CTX} {DEST}\n", 0, {"path": DEST, "context": CTX}),
    (f"system_u:object_r:var_lib_t:s0 {DEST}\n", 0,
     f"{DEST} is labelled system_u:object_r:var_lib_t:s0 after chcon, want {CTX}"),
    (f"? {DEST}\n", 0, f"{DEST} is labelled nothing after chcon, want {CTX}"),
    ("", 2, f"{DEST} is labelled nothing after chcon, want {CTX}"),
])
def test_label_check_reports_a_label_that_did_not_stick(out, code, want):
    chcon, check = lp.label_plan(DEST)
    assert check.writes is False
    try:
        got = check.interpret(result(check, code, out))
    except StepFailed as e:
        got = e.reason if hasattr(e, "reason") else str(e)
    assert got == want


def test_label_failure_names_the_path_and_the_context():
    chcon, _ = lp.label_plan(DEST)
    with pytest.raises(lp.LivepatchOpError) as e:
        chcon.interpret(result(chcon, 1, "", "chcon: failed to change context of 'x': Invalid argument"))
    assert f"cannot label {DEST} {CTX}: chcon: failed to change context" in str(e.value)
    assert e.value.hint and "SELinux" in e.value.hint


@pytest.mark.parametrize("persisted, want", [
    (False, None),
    (True, ("kpatch", "uninstall", "-k", R, FILE)),
    ("kpatch", ("kpatch", "uninstall", "-k", R, FILE)),
    ("kpipe", ("sh", "-c", lp.UNPERSIST_SCRIPT, "kpipe", PERSISTED, PERSISTED.rsplit("/", 1)[0], lp.PERSIST_DIR,
               lp.PERSIST_UNIT_PATH, lp.PERSIST_LOADER_PATH)),
])
def test_rollback_removes_what_the_apply_persisted(persisted, want):
    steps = eng.rollback_plan(assignment(), lp.parse_host_livepatch(NONE), persisted=persisted, marker="m")
    got = [s.argv() for s in steps if s.name == "rb-uninstall"]
    assert got == ([want] if want else [])


def E(step, phase, **detail):
    return SimpleNamespace(step=step, phase=phase, detail=detail)


@pytest.mark.parametrize("entries, want", [
    ([], ""),
    ([E("persist", "intended"), E("persist", "failed", error="x")], ""),
    ([E("persist", "done", persisted=False, why="no systemd")], ""),
    ([E("persist", "done", persisted=True)], "kpatch"),  # journals written before kpipe's own layout
    ([E("persist", "done", persisted=True, method="kpipe")], "kpipe"),
    ([E("persist", "done", persisted=True, method="kpipe"), E("unpersist", "done", changed=True)], ""),
    ([E("persist", "done", persisted=True, method="kpipe"), E("rb-uninstall", "done")], ""),
])
def test_persist_method_from_the_journal(entries, want):
    assert eng.persist_method(entries) == want


def test_persisted_path_refuses_path_characters():
    with pytest.raises(Exception, match="invalid stream"):
        lp.persisted_path(R, "../etc", FILE)
    with pytest.raises(Exception, match="invalid kernel release"):
        lp.persisted_path("6.1 x", "s", FILE)


# -- the host scripts, run for real in a private mount namespace ---------------------------------------------------

def _fake_bin(folder: Path) -> Path:
    """systemctl and insmod that append their argv to calls.log (and succeed)."""
    b = folder / "bin"
    b.mkdir(parents=True, exist_ok=True)
    for tool in ("systemctl", "insmod", "chcon"):
        f = b / tool
        f.write_text(f'#!/bin/sh\necho "{tool} $*" >> {folder}/calls.log\n')
        f.chmod(0o755)
    return b


def _in_namespace(setup: str, argv: list[str], fake: Path) -> subprocess.CompletedProcess:
    """argv in a private mount namespace after `setup` (mounts there vanish with it)."""
    wrapper = setup + '\nexec "$@"'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", wrapper, "ns", *argv],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})


def test_persist_script_installs_file_loader_and_unit_and_enables_it(tmp_path):
    fake = _fake_bin(tmp_path)
    staged = tmp_path / "staged.ko"
    staged.write_bytes(b"module v1")
    stream = tmp_path / "modules" / R / "livepatch_demo"
    unit = tmp_path / "etc" / "kpipe-livepatch.service"
    loader = tmp_path / "libexec" / "kpipe-livepatch-load"
    unit.parent.mkdir()
    argv = ["sh", "-c", lp.PERSIST_SCRIPT, "kpipe", str(staged), str(stream), str(stream / FILE), str(unit),
            lp.PERSIST_UNIT_TEXT, str(loader), lp.PERSIST_LOADER, CTX]
    r = _in_namespace("mount -t tmpfs kpipe-test /run && mkdir -p /run/systemd/system", argv, fake)
    assert r.returncode == 0 and r.stdout.strip() == "persisted", r.stderr
    assert (stream / FILE).read_bytes() == b"module v1"
    assert unit.read_text() == lp.PERSIST_UNIT_TEXT and f"ExecStart={lp.PERSIST_LOADER_PATH}" in unit.read_text()
    assert loader.read_text() == lp.PERSIST_LOADER and os.access(loader, os.X_OK)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == [f"chcon {CTX} {stream / FILE}", "systemctl daemon-reload",
                     "systemctl enable kpipe-livepatch.service"]
    # no systemd (no /run/systemd/system): nothing is written, and it says so
    (tmp_path / "calls.log").unlink()
    other = tmp_path / "modules2"
    argv[5:7] = [str(other), str(other / FILE)]
    r = _in_namespace("mount -t tmpfs kpipe-test /run", argv, fake)
    assert r.stdout.strip() == "no-systemd" and not other.exists() and not (tmp_path / "calls.log").exists()


def test_loader_loads_the_newest_version_of_each_stream_for_the_running_release_only(tmp_path):
    fake = _fake_bin(tmp_path)
    release = os.uname().release
    var_lib = tmp_path / "var_lib"
    mods = var_lib / "kpipe" / "modules"
    for rel, stream, name in ((release, "memcg", "kpatch_memcg_v1.ko"), (release, "memcg", "kpatch_memcg_v2.ko"),
                              (release, "memcg", "kpatch_memcg_v10.ko"), (release, "net", "kpatch_net.ko"),
                              (release, "loaded", "kpatch_loaded.ko"), ("0.0.0-other", "memcg", "kpatch_old.ko")):
        (mods / rel / stream).mkdir(parents=True, exist_ok=True)
        (mods / rel / stream / name).write_bytes(b"x")
    sysmod = tmp_path / "sys_module"
    (sysmod / "kpatch_loaded").mkdir(parents=True)  # already loaded: not loaded twice
    loader = tmp_path / "loader"
    loader.write_text(lp.PERSIST_LOADER)
    insmod = tmp_path / "fake-insmod"
    insmod.write_text((fake / "insmod").read_text())
    insmod.chmod(0o755)
    setup = (f"mount --bind '{var_lib}' /var/lib && mount --bind '{sysmod}' /sys/module && "
             f"mount --bind '{insmod}' /sbin/insmod")
    r = _in_namespace(setup, ["sh", str(loader)], fake)
    assert r.returncode == 0, r.stderr
    calls = sorted((tmp_path / "calls.log").read_text().splitlines())
    base = f"/var/lib/kpipe/modules/{release}"
    assert calls == [f"insmod {base}/memcg/kpatch_memcg_v10.ko", f"insmod {base}/net/kpatch_net.ko"]


def test_unpersist_script_removes_the_file_and_the_unit_with_the_last_module(tmp_path):
    fake = _fake_bin(tmp_path)
    root = tmp_path / "modules"
    a = root / R / "a" / "a.ko"
    b = root / R / "b" / "b.ko"
    for f in (a, b):
        f.parent.mkdir(parents=True)
        f.write_bytes(b"x")
    unit, loader = tmp_path / "kpipe-livepatch.service", tmp_path / "loader"
    unit.write_text("u")
    loader.write_text("l")

    def unpersist(f: Path) -> str:
        r = subprocess.run(["sh", "-c", lp.UNPERSIST_SCRIPT, "kpipe", str(f), str(f.parent), str(root), str(unit),
                            str(loader)], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    assert unpersist(a) == "removed" and not a.parent.exists() and unit.exists()  # b still needs the unit
    assert not (tmp_path / "calls.log").exists()
    assert unpersist(a) == "absent"  # idempotent
    assert unpersist(b) == "removed" and not unit.exists() and not loader.exists()
    assert (tmp_path / "calls.log").read_text().splitlines() == ["systemctl disable kpipe-livepatch.service",
                                                                "systemctl daemon-reload"]


# -- facts and audit -----------------------------------------------------------------------------------------------

def test_facts_and_audit_show_persisted_versus_live_only():
    text = (f"kpipe-facts 1\nrelease {R}\nmachine x86_64\ntainted 45056\nkpatch -\nselinux -\nsig_enforce N\n"
            f"persisted kpatch_memcg_v2.ko\n---livepatch---\nlivepatch_sysfs 1\ntainted 45056\n"
            "patch kpatch_memcg_v2\nenabled kpatch_memcg_v2 1\ntransition kpatch_memcg_v2 0\n"
            "patch kpatch_net\nenabled kpatch_net 1\ntransition kpatch_net 0\nend\n---end-livepatch---\n"
            "kpipe-facts-end\n")
    facts = factsmod.parse_facts("h1", text)
    assert facts.persisted == ("kpatch_memcg_v2.ko",)
    assert facts.to_dict()["persisted"] == ["kpatch_memcg_v2.ko"]
    audit = evaluate_host(DesiredState(), observed_from_facts(facts)).to_dict()
    assert audit["persisted"] == ["kpatch_memcg_v2"]
    by_patch = {p["patch"]: p["observed"]["persisted"] for p in audit["patches"]}
    assert by_patch == {"kpatch_memcg_v2": True, "kpatch_net": False}
    # the table says it too: a boot column per loaded patch
    from kpipe.audit import AuditResult
    from kpipe.report.table import COLUMNS, render_text, table_rows

    result = AuditResult(0.0, (evaluate_host(DesiredState(), observed_from_facts(facts)),))
    boot = {row[1]: row[COLUMNS.index("boot")] for row in table_rows(result)}
    assert boot == {"kpatch_memcg_v2": "persisted", "kpatch_net": "live-only"}
    assert "live-only" in render_text(result)
    from kpipe.report.jsonfmt import AUDIT_SCHEMA  # the documented schema carries the field

    host_props = AUDIT_SCHEMA["properties"]["hosts"]["items"]["properties"]
    assert host_props["persisted"]["type"] == "array"


def test_kpatch_hosts_count_their_installed_modules_as_persisted():
    text = (f"kpipe-facts 1\nrelease {R}\nmachine x86_64\ntainted 0\nkpatch /usr/sbin/kpatch\nselinux 1\n"
            f"installed {'ab' * 32}  /var/lib/kpatch/{R}/{FILE}\n---livepatch---\nlivepatch_sysfs 1\ntainted 0\n"
            "end\n---end-livepatch---\nkpipe-facts-end\n")
    facts = factsmod.parse_facts("h1", text)
    assert facts.persisted == (FILE,) and facts.selinux == "enforcing"


# -- the simulated fleet: hosts without systemd --------------------------------------------------------------------

def test_persist_on_hosts_without_systemd_is_journaled_as_not_persisted(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws, art = setup_ws(fleet, tmp_path)
    plan, journal, rid = make_plan(ws, art, fleet.hosts, waves="100%", persist=True)
    s, _ = run(ws, journal, rid)
    assert set(s.hosts.values()) == {"applied"}
    for h in fleet.hosts:
        done = [e for e in journal.entries(rid, h.name) if e.step == "persist" and e.phase == "done"]
        assert len(done) == 1 and done[0].detail["persisted"] is False
        assert "no systemd" in done[0].detail["why"]
        assert not any(p.startswith("/var/lib/kpipe") for p in h.staged())
    # unpersist finds nothing persisted: it changes nothing and says so
    s2, _ = run(ws, journal, rid, "unpersist")
    assert s2.hosts == {}
    assert json.loads(json.dumps(s2.to_dict()))["hosts"] == {}
