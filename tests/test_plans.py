"""Host operations as plans, in pyinfra's style: tables of (facts in -> exact argv out) for every
plan builder, (recorded output in -> parsed value or StepFailed out) for every interpreter, and
the dry-run's printed argv against what the Fabric executor then really runs on SimFleet.

The outputs are real: tests/data/livepatch holds what a Debian 6.1 kernel under qemu printed
(STATE_SCRIPT, dmesg, insmod's stderr); the simulated fleet's messages are copied from
tests/simfleet.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kpipe.builder.spec import Probe
from kpipe.commands import Command, CommandResult
from kpipe.fleet import livepatch as lp
from kpipe.plan import Step, StepFailed, Upload, argv_lists, describe, groups, run_steps
from kpipe.rollout import engine as eng
from kpipe.rollout.journal import Journal
from kpipe.rollout.planner import Assignment, Candidate
from kpipe.rollout.world import engine_for
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)
from test_rollout_engine import MODULE, RELEASE, make_plan, setup_ws

CAPTURED = Path(__file__).parent / "data" / "livepatch"
R = "6.1.0-56-amd64"  # the captured kernel's release (parser data only)
SHA = "ab" * 32
FILE = "livepatch-demo.ko"
DEST = f"/var/lib/kpatch/{R}/{FILE}"
FOLDER = f"/var/lib/kpatch/{R}"
TMP = f"/var/lib/kpatch/{R}/.{FILE}.kpipe-{SHA[:16]}"
LOCAL = Path("/store/blobs/ab/abab")
CAPTURED_DEST = f"/var/lib/kpatch/{R}/livepatch_demo.ko"  # the path in the captured insmod stderr
M = "kpipe: marker 0123456789abcdef0123456789abcdef rollout livepatch_demo"


def captured(name: str) -> str:
    return (CAPTURED / name).read_text()


def state(text: str) -> lp.HostLivepatch:
    return lp.parse_host_livepatch(text)


NONE = "livepatch_sysfs 1\ntainted 0\nmodule livepatch_demo 0 -\nend\n"
LOADED = captured("state_loaded.txt")
DISABLED = ("livepatch_sysfs 1\ntainted 45056\npatch livepatch_demo\nenabled livepatch_demo 0\n"
            "transition livepatch_demo 1\nmodule livepatch_demo 1 OEK\nend\n")
MODULE_ONLY = captured("state_disabled_module_loaded.txt")  # the sysfs dir gone, the module still loaded


def sh(script: str, *args: str) -> tuple[str, ...]:
    return ("sh", "-c", script, "kpipe", *args)


STATE_ARGV = sh(lp.STATE_SCRIPT, "livepatch_demo")
CHECK_ARGV = sh(lp.STAGE_CHECK_SCRIPT, FOLDER, DEST, FILE)
COMMIT_ARGV = sh(lp.STAGE_COMMIT_SCRIPT, TMP, DEST, SHA)
MARKER_ARGV = sh(lp.MARKER_SCRIPT, M)
INSMOD_ARGV = sh(lp.LOAD_SCRIPT, "/sbin/insmod", DEST)
KPATCH_LOAD_ARGV = sh(lp.LOAD_SCRIPT, "kpatch", "load", DEST)
DISABLE_ARGV = sh(lp.DISABLE_SCRIPT, "livepatch_demo")
RMMOD_ARGV = ("/sbin/rmmod", "livepatch_demo")
VERIFY_ARGV = sh(lp.VERIFY_SCRIPT, "livepatch_demo")


PERSISTED = f"/var/lib/kpipe/modules/{R}/livepatch_demo/{FILE}"
PERSIST_ARGV = sh(lp.PERSIST_SCRIPT, DEST, PERSISTED.rsplit("/", 1)[0], PERSISTED, lp.PERSIST_UNIT_PATH,
                  lp.PERSIST_UNIT_TEXT, lp.PERSIST_LOADER_PATH, lp.PERSIST_LOADER, "")


def wait_argv(timeout: str, wanted: str) -> tuple[str, ...]:
    return sh(lp.WAIT_SCRIPT, "livepatch_demo", timeout, wanted)


def argvs(steps: list[Step[Any]]) -> list[tuple[str, ...]]:
    return [s.argv() for s in steps]


# ------------------------------------------------------------------ builders: facts in -> argv out

@pytest.mark.parametrize("installed, want", [
    (SHA, [CHECK_ARGV]),  # already installed with this sha256: a check, no upload
    (SHA.upper(), [CHECK_ARGV]),
    ("absent", [CHECK_ARGV, ("upload", str(LOCAL), TMP), COMMIT_ARGV]),
    ("cd" * 32, [CHECK_ARGV, ("upload", str(LOCAL), TMP), COMMIT_ARGV]),  # another build there: replaced
])
def test_stage_plan(installed, want):
    steps = lp.stage_plan(LOCAL, R, SHA, FILE, installed)
    assert argvs(steps) == want
    assert {s.name for s in steps} == {"stage"} and all(s.writes for s in steps)


@pytest.mark.parametrize("facts, kpatch_cli, want", [
    (NONE, False, [INSMOD_ARGV]),
    (NONE, True, [KPATCH_LOAD_ARGV]),
    (LOADED, False, [STATE_ARGV]),  # loaded and enabled: a confirming read, no insmod
    (DISABLED, False, [DISABLE_ARGV, wait_argv("30", "gone"), RMMOD_ARGV, INSMOD_ARGV]),  # cannot be re-enabled
    (MODULE_ONLY, False, [RMMOD_ARGV, INSMOD_ARGV]),
])
def test_load_plan(facts, kpatch_cli, want):
    steps = lp.load_plan(DEST, "livepatch-demo", state(facts), marker=M, kpatch_cli=kpatch_cli, timeout=30)
    assert argvs(steps) == want
    assert [s.writes for s in steps][-1] == (facts != LOADED)


def test_load_plan_with_its_own_marker_writes_it_just_before_the_loader():
    steps = lp.load_plan(DEST, "livepatch_demo", state(MODULE_ONLY), marker=M, kpatch_cli=False, with_marker=True)
    assert argvs(steps) == [RMMOD_ARGV, MARKER_ARGV, sh(lp.LOAD_SCRIPT, "/sbin/insmod", DEST)]
    assert lp.load_plan(DEST, "livepatch_demo", state(LOADED), marker=M, kpatch_cli=False,
                        with_marker=True)[0].argv() == STATE_ARGV


@pytest.mark.parametrize("facts, want", [
    (NONE, [STATE_ARGV]),
    (LOADED, [MARKER_ARGV, DISABLE_ARGV, wait_argv("60", "gone")]),
    (DISABLED, [MARKER_ARGV, DISABLE_ARGV, wait_argv("60", "gone")]),  # unpatching: wait for the dir to go
])
def test_disable_plan(facts, want):
    assert argvs(lp.disable_plan("livepatch_demo", state(facts), marker=M)) == want


@pytest.mark.parametrize("facts, disabled_before, want", [
    (NONE, False, [STATE_ARGV]),
    (MODULE_ONLY, False, [RMMOD_ARGV]),
    (LOADED, False, [STATE_ARGV]),  # an enabled livepatch: refused, rmmod never runs
    (LOADED, True, [RMMOD_ARGV]),  # a disable precedes in the same plan
])
def test_unload_plan(facts, disabled_before, want):
    assert argvs(lp.unload_plan("livepatch_demo", state(facts), disabled_before=disabled_before)) == want


@pytest.mark.parametrize("probe, want", [
    (None, [VERIFY_ARGV]),
    (Probe(("cat", "/proc/cmdline"), "^x$"), [VERIFY_ARGV, ("cat", "/proc/cmdline")]),
])
def test_verify_plans(probe, want):
    assert argvs(lp.verify_loaded_plan("livepatch_demo", M, probe)) == want
    removed = lp.verify_removed_plan("livepatch_demo", probe, marker=M)
    assert argvs(removed) == [VERIFY_ARGV]  # no after-rollback regex: no probe
    with_after = Probe(("cat", "/proc/cmdline"), "^x$", "lab1")
    assert argvs(lp.verify_removed_plan("livepatch_demo", with_after))[1] == ("cat", "/proc/cmdline")


def test_scripts_take_user_values_only_as_parameters_and_never_force():
    hostile = "x;reboot"
    with pytest.raises(lp.KpipeError):
        lp.stage_plan(LOCAL, "../etc", SHA, FILE, "absent")
    with pytest.raises(lp.KpipeError):
        lp.disable_plan(hostile, state(NONE), marker=M)
    for s in (lp.LOAD_SCRIPT, lp.WAIT_SCRIPT, lp.DISABLE_SCRIPT, lp.UNSTAGE_SCRIPT):
        assert not re.search(r"/force\b", s)


def assignment(sha: str = SHA) -> Assignment:
    art = Candidate(id="a1", sha256=sha, module_name="livepatch-demo", filename=FILE, kernel=R, arch="x86_64")
    return Assignment(host="h1", wave=1, release=R, arch="x86_64", artifact=art)


FACTS = {"release": R, "arch": "x86_64", "free_kb": "100000", "staged": "absent", "kpatch_cli": "0"}


def names(steps: list[Step[Any]]) -> list[str]:
    return [g[0].name for g in groups(steps)]


@pytest.mark.parametrize("facts, st, journal_marker, persist, want_names, want_argv", [
    # a fresh host: everything
    (FACTS, NONE, "", False, ["stage", "marker", "load", "wait", "verify"],
     [CHECK_ARGV, ("upload", str(LOCAL), TMP), COMMIT_ARGV, MARKER_ARGV, INSMOD_ARGV, wait_argv("30", "0"),
      VERIFY_ARGV]),
    # staged by an earlier run: no upload
    ({**FACTS, "staged": SHA}, NONE, "", False, ["stage", "marker", "load", "wait", "verify"],
     [CHECK_ARGV, MARKER_ARGV, INSMOD_ARGV, wait_argv("30", "0"), VERIFY_ARGV]),
    # loaded by an earlier run of this rollout: no insmod, the journaled marker is looked up, not written
    ({**FACTS, "staged": SHA}, LOADED, M, False, ["stage", "marker", "load", "wait", "verify"],
     [CHECK_ARGV, ("dmesg",), STATE_ARGV, wait_argv("30", "0"), VERIFY_ARGV]),
    # the same build loaded by hand, no marker journaled: none to reuse
    ({**FACTS, "staged": SHA}, LOADED, "", False, ["stage", "load", "wait", "verify"],
     [CHECK_ARGV, STATE_ARGV, wait_argv("30", "0"), VERIFY_ARGV]),
    # persist without the kpatch CLI: kpipe's own layout and unit; with it: kpatch install
    ({**FACTS, "staged": SHA}, NONE, "", True, ["stage", "marker", "load", "wait", "verify", "persist"],
     [CHECK_ARGV, MARKER_ARGV, INSMOD_ARGV, wait_argv("30", "0"), VERIFY_ARGV, PERSIST_ARGV]),
    ({**FACTS, "staged": SHA, "kpatch_cli": "1"}, NONE, "", True,
     ["stage", "marker", "load", "wait", "verify", "persist"],
     [CHECK_ARGV, MARKER_ARGV, KPATCH_LOAD_ARGV, wait_argv("30", "0"), VERIFY_ARGV,
      ("kpatch", "install", "-k", R, DEST)]),
])
def test_apply_plan(facts, st, journal_marker, persist, want_names, want_argv):
    steps = eng.apply_plan(assignment(), facts, state(st), LOCAL, None, journal_marker=journal_marker,
                           persist=persist, timeout=30, marker=M)
    assert names(steps) == want_names
    assert argvs(steps) == want_argv
    # journal details as the journal's readers expect them (resume reads the load's marker)
    load = next(s for s in steps if s.name == "load")
    assert load.intended == {"marker": M if (st == NONE or journal_marker) else "", "path": DEST,
                             "kpatch_cli": facts["kpatch_cli"] == "1"}
    assert next(s for s in steps if s.name == "stage").intended == {"path": DEST, "sha256": SHA, "temp": TMP}


OTHER_BUILD = ("livepatch_sysfs 1\ntainted 45056\npatch livepatch_demo\nenabled livepatch_demo 1\n"
               "transition livepatch_demo 0\nmodule livepatch_demo 1 OEK\n"
               "notes livepatch_demo 040000001400000003000000474e5500" + "11" * 20 + "\nend\n")


@pytest.mark.parametrize("st, persisted, expect, want_names, want_argv", [
    (LOADED, False, None, ["rb-disable", "rb-unload", "rb-unstage", "rb-verify"],
     [MARKER_ARGV, DISABLE_ARGV, wait_argv("30", "gone"), RMMOD_ARGV,
      sh(lp.UNSTAGE_SCRIPT, DEST, FOLDER, FILE, SHA), VERIFY_ARGV]),
    (LOADED, True, None, ["rb-disable", "rb-unload", "rb-uninstall", "rb-unstage", "rb-verify"],
     [MARKER_ARGV, DISABLE_ARGV, wait_argv("30", "gone"), RMMOD_ARGV, ("kpatch", "uninstall", "-k", R, FILE),
      sh(lp.UNSTAGE_SCRIPT, DEST, FOLDER, FILE, SHA), VERIFY_ARGV]),
    # nothing loaded (killed before the load, or rolled back already): reads, the unstage, the verify
    (NONE, False, None, ["rb-disable", "rb-unload", "rb-unstage", "rb-verify"],
     [STATE_ARGV, STATE_ARGV, sh(lp.UNSTAGE_SCRIPT, DEST, FOLDER, FILE, SHA), VERIFY_ARGV]),
    # another build of the module is loaded: not ours to remove
    (OTHER_BUILD, False, lp.ModuleIdentity("22" * 20), ["rb-disable", "rb-unload", "rb-unstage", "rb-verify"],
     [STATE_ARGV, STATE_ARGV, sh(lp.UNSTAGE_SCRIPT, DEST, FOLDER, FILE, SHA), VERIFY_ARGV]),
    # ... unless it is ours
    (OTHER_BUILD, False, lp.ModuleIdentity("11" * 20), ["rb-disable", "rb-unload", "rb-unstage", "rb-verify"],
     [MARKER_ARGV, DISABLE_ARGV, wait_argv("30", "gone"), RMMOD_ARGV,
      sh(lp.UNSTAGE_SCRIPT, DEST, FOLDER, FILE, SHA), VERIFY_ARGV]),
])
def test_rollback_plan(st, persisted, expect, want_names, want_argv):
    steps = eng.rollback_plan(assignment(), state(st), None, timeout=30, persisted=persisted, expect=expect,
                              marker=M)
    assert names(steps) == want_names
    assert argvs(steps) == want_argv


def test_rollback_plan_verifies_the_unpatching_after_its_marker_only_when_it_disables():
    def verify_marker(st: str) -> str:
        steps = eng.rollback_plan(assignment(), state(st), None, marker=M)
        v = next(s for s in steps if s.name == "rb-verify")
        ok = CommandResult("h1", v.action, 0, captured("state_removed.txt") + "---kpipe-dmesg---\n")
        try:
            v.interpret(ok)
        except StepFailed as e:
            return e.reason
        return ""
    assert verify_marker(LOADED) == f"the marker {M!r} is not in the kernel log"
    assert verify_marker(NONE) == ""


# ------------------------------------------------------------------ interpreters: output in -> value out

def result(step: Step[Any], exit_status: int = 0, stdout: str = "", stderr: str = "") -> CommandResult:
    cmd = step.action if isinstance(step.action, Command) else Command.of("true")
    return CommandResult("h1", cmd, exit_status, stdout, stderr, 0.25)


def outcome(step: Step[Any], exit_status: int = 0, stdout: str = "", stderr: str = "") -> Any:
    """The interpreter's value, or ("failed", reason) when it raises StepFailed."""
    try:
        return step.interpret(result(step, exit_status, stdout, stderr))
    except StepFailed as e:
        return ("failed", e.reason)


def test_state_interpreter_reads_real_outputs_and_refuses_a_cut_one():
    step = lp.state_step("livepatch_demo")
    st = step.interpret(result(step, 0, LOADED))
    assert st.patches["livepatch_demo"].enabled == 1 and st.module("livepatch_demo").taint == "OEK"
    assert outcome(step, 0, LOADED.replace("end\n", "")) == (
        "failed", "reading livepatch state failed: livepatch-state exited 0: module livepatch_demo 1 OEK")
    assert not step.writes


@pytest.mark.parametrize("installed, code, stdout, want", [
    ("absent", 0, "absent\n", "absent"),
    ("absent", 0, f"{SHA}\n", SHA),
    (SHA, 0, f"{SHA}\n", DEST),  # confirmed: the value is the path
    (SHA, 0, "absent\n", ("failed", f"{DEST} changed after it was read (sha256 absent, want {SHA[:12]}); run again")),
    ("absent", 2, "", ("failed", (f"cannot create {FOLDER}: stage-check exited 2: mkdir: cannot create directory "
                                  f"'{FOLDER}': Read-only file system"))),
])
def test_stage_check_interpreter(installed, code, stdout, want):
    step = lp.stage_plan(LOCAL, R, SHA, FILE, installed)[0]
    stderr = f"mkdir: cannot create directory '{FOLDER}': Read-only file system\n" if code else ""
    assert outcome(step, code, stdout, stderr) == want


@pytest.mark.parametrize("code, stdout, stderr, want", [
    (0, "staged\n", "", DEST),
    (0, "selinux-labeled\nstaged\n", "", DEST),
    (3, "", f"checksum mismatch: got {'cd' * 32}, want {SHA}\n",
     ("failed", f"staging {DEST} failed: checksum mismatch: got {'cd' * 32}, want {SHA}")),
    (1, "", f"sha256sum: {TMP}: No such file or directory\n",
     ("failed", f"staging {DEST} failed: sha256sum: {TMP}: No such file or directory")),
])
def test_stage_commit_interpreter(code, stdout, stderr, want):
    step = lp.stage_plan(LOCAL, R, SHA, FILE, "absent")[2]
    assert outcome(step, code, stdout, stderr) == want


def test_marker_interpreters():
    assert outcome(lp.marker_step(M), 0) == M
    assert outcome(lp.marker_step(M), 1, "", "sh: 1: cannot create /dev/kmsg: Permission denied\n") == (
        "failed", ("writing the /dev/kmsg marker failed: marker exited 1: sh: 1: cannot create /dev/kmsg: "
                   "Permission denied"))
    log = captured("dmesg_loaded.txt")
    real = "kpipe: marker ced6fd85e71446e0ae08ff43cb08e857 load livepatch_demo"
    check = lp.marker_check_step(real)
    assert outcome(check, 0, log) == real and check.done is not None and check.done(real) == {"marker": real}
    assert outcome(check, 0, "[    0.0] Linux version 6.1\n") == ""  # the ring buffer lost it
    assert check.done("") == {"marker": "", "lost": real} and check.intended == {"reuse": real}


SIG_LOG = captured("dmesg_sig_enforce.txt")
SIG_MARKER = "kpipe: marker 544b2849829f4b7abe01b9b79a5660e5 load livepatch_demo"
VERMAGIC_MARKER = "kpipe: marker 953a093499ef48e38fbff9f7d89aed05 load livepatch_demo"


@pytest.mark.parametrize("marker, code, stdout, stderr, want_ok, want_message, want_kernel", [
    ("kpipe: marker ced6fd85e71446e0ae08ff43cb08e857 load livepatch_demo", 0,
     "---kpipe-dmesg---\n" + captured("dmesg_loaded.txt"), "", True, "loaded", True),
    (SIG_MARKER, 1, "---kpipe-dmesg---\n" + SIG_LOG, captured("insmod_stderr_sig_enforce.txt"), False,
     (f"insmod failed: insmod: ERROR: could not insert module {CAPTURED_DEST}: Key was rejected by "
      "service; kernel: Loading of unsigned module is rejected"), True),
    (VERMAGIC_MARKER, 1, "---kpipe-dmesg---\n" + captured("dmesg_vermagic.txt"),
     captured("insmod_stderr_vermagic.txt"), False,
     (f"insmod failed: insmod: ERROR: could not insert module {CAPTURED_DEST}: Invalid module format; "
      "kernel: livepatch_demo: version magic '6.1.0-56-amd64 SMP PREEMPT mod_unload modversions ' should be "
      "'6.1.0-56-amd64 SMP preempt mod_unload modversions '"), True),
    # the simulated fleet's EBUSY: no kernel line after the marker
    (M, 1, "---kpipe-dmesg---\n", f"insmod: ERROR: could not insert module {DEST}: Device or resource busy\n",
     False, f"insmod failed: insmod: ERROR: could not insert module {DEST}: Device or resource busy", False),
    (M, 137, "", "", False, "insmod failed: exit status 137", False),
], ids=["loaded", "sig_enforce", "vermagic", "simfleet-ebusy", "killed"])
def test_load_interpreter(marker, code, stdout, stderr, want_ok, want_message, want_kernel):
    step = lp.load_step(DEST, marker=marker, kpatch_cli=False)
    try:
        r = step.interpret(result(step, code, stdout, stderr))
    except lp.OpFailed as e:
        r = e.result
        assert e.detail["kernel"] == r.kernel_lines[-20:]
    assert (r.ok, r.message, bool(r.kernel_lines)) == (want_ok, want_message, want_kernel)
    assert r.marker == marker and "---kpipe-dmesg---" not in r.output


def test_confirming_load_read_fails_when_the_patch_went_away():
    step = lp.load_plan(DEST, "livepatch_demo", state(LOADED), marker=M, kpatch_cli=False)[0]
    assert outcome(step, 0, LOADED).message == "already loaded and enabled"
    assert outcome(step, 0, NONE) == ("failed", "livepatch_demo is no longer loaded and enabled; run again")


STALL = captured("dmesg_stall.txt")
STALL_MARKER = "kpipe: marker 5484c624ba0845ef8fb96b97fe1ca26e load livepatch_stall"


@pytest.mark.parametrize("code, stdout, want", [
    (0, "transition 0\n", (True, "transition complete")),
    (0, "gone\n", (False, "/sys/kernel/livepatch/livepatch_stall is gone")),
    (1, "timeout transition 1 enabled 1\n---kpipe-dmesg---\n" + STALL.split("[   28.068073]")[0],
     (False, ("transition still running after 20 s (timeout transition 1 enabled 1); kernel: livepatch: "
              "signaling remaining tasks"))),
    (1, "timeout transition 1 enabled 1\n---kpipe-dmesg---\n",
     (False, "transition still running after 20 s (timeout transition 1 enabled 1)")),
], ids=["done", "gone", "stalled", "timeout"])
def test_wait_interpreter(code, stdout, want):
    step = lp.wait_step("livepatch_stall", 20, marker=STALL_MARKER)
    try:
        r = step.interpret(result(step, code, stdout))
    except lp.OpFailed as e:
        r = e.result
    assert (r.ok, r.message) == want
    assert step.argv() == sh(lp.WAIT_SCRIPT, "livepatch_stall", "20", "0")


@pytest.mark.parametrize("index, code, stdout, stderr, want", [
    (1, 0, "disabled\n", "", (True, True, "disabled")),
    (1, 0, "already-disabled\n", "", (True, False, "already-disabled")),
    (1, 16, "", "sh: 4: cannot create /sys/kernel/livepatch/livepatch_demo/enabled: Read-only file system\n",
     (False, False, ("writing enabled failed: sh: 4: cannot create /sys/kernel/livepatch/livepatch_demo/enabled: "
                     "Read-only file system"))),
    (1, 16, "", "sh: 4: echo: echo: I/O error: Device or resource busy\n",
     (False, False, ("EBUSY: another livepatch is in transition: sh: 4: echo: echo: I/O error: Device or "
                     "resource busy"))),
    (2, 0, "gone\n", "", (True, True, "disabled; sysfs dir gone")),
    (2, 1, "timeout transition 1 enabled 0\n---kpipe-dmesg---\n", "",
     (False, True, "/sys/kernel/livepatch/livepatch_demo still present after 60 s (timeout transition 1 enabled 0)")),
])
def test_disable_interpreters(index, code, stdout, stderr, want):
    step = lp.disable_plan("livepatch_demo", state(LOADED), marker=M)[index]
    try:
        r = step.interpret(result(step, code, stdout, stderr))
    except lp.OpFailed as e:
        r = e.result
    assert (r.ok, r.changed, r.message) == want
    assert r.marker == M


@pytest.mark.parametrize("code, stderr, want", [
    (0, "", (True, True, "removed")),
    (1, "rmmod: ERROR: Module livepatch_demo is not currently loaded\n", (True, False, "not loaded")),
    (1, "rmmod: ERROR: Module livepatch_demo is in use\n",
     (False, False, "rmmod failed: rmmod: ERROR: Module livepatch_demo is in use")),
])
def test_rmmod_interpreter(code, stderr, want):
    step = lp.unload_plan("livepatch_demo", state(MODULE_ONLY))[0]
    try:
        r = step.interpret(result(step, code, "", stderr))
    except lp.OpFailed as e:
        r = e.result
    assert (r.ok, r.changed, r.message) == want


def test_refused_unload_and_noop_reads():
    refuse = lp.unload_plan("livepatch_demo", state(LOADED))[0]
    assert outcome(refuse, 0, LOADED) == ("failed", "livepatch_demo is an enabled livepatch: disable it first")
    noop = lp.unload_plan("livepatch_demo", state(NONE))[0]
    assert outcome(noop, 0, NONE).message == "not loaded"
    assert outcome(noop, 0, MODULE_ONLY) == ("failed", ("livepatch_demo was loaded after the state was read; "
                                                        "run again"))
    note = lp.note_step("rb-unload", "livepatch_demo", "left livepatch_demo loaded")
    assert outcome(note, 0, OTHER_BUILD).message == "left livepatch_demo loaded"


@pytest.mark.parametrize("code, stdout, want", [
    (0, "removed\n", (True, True, "removed")),
    (0, "absent\n", (True, False, "not staged")),
    (0, "kept-other\n", (True, False, f"kept {DEST}: another build (not sha256 {SHA[:12]})")),
    (1, "", (False, False, "unstage exited 1: rm: cannot remove: Read-only file system")),
])
def test_unstage_interpreter(code, stdout, want):
    step = lp.unstage_step(R, FILE, SHA)
    try:
        r = step.interpret(result(step, code, stdout, "rm: cannot remove: Read-only file system\n" if code else ""))
    except lp.OpFailed as e:
        r = e.result
    assert (r.ok, r.changed, r.message) == want


LOAD_MARKER = "kpipe: marker ced6fd85e71446e0ae08ff43cb08e857 load livepatch_demo"


@pytest.mark.parametrize("st, log, marker, lost_ok, want", [
    (LOADED, "dmesg_loaded.txt", LOAD_MARKER, False, []),
    (LOADED, "dmesg_loaded.txt", "kpipe: marker 00 gone", False,
     ["the marker 'kpipe: marker 00 gone' is not in the kernel log"]),
    (LOADED, "dmesg_loaded.txt", "kpipe: marker 00 gone", True, []),  # a reused marker the log lost: sysfs decides
    ("state_in_transition.txt", "dmesg_stall.txt", STALL_MARKER, False, None),
    ("state_sig_enforce.txt", "dmesg_sig_enforce.txt", SIG_MARKER, False, None),
], ids=["loaded", "marker-missing", "marker-lost-reused", "in-transition", "sig-enforce"])
def test_verify_interpreter(st, log, marker, lost_ok, want):
    name = "livepatch_stall" if "stall" in log else "livepatch_demo"
    step = lp.verify_loaded_plan(name, marker, None, marker_may_be_lost=lost_ok)[0]
    text = (LOADED if st == LOADED else captured(st)) + "---kpipe-dmesg---\n" + captured(log)
    expected = want if want is not None else lp.evaluate_loaded(
        name, state(text.split("---kpipe-dmesg---")[0]), lp.lines_after_marker(captured(log), marker), marker)
    try:
        v = step.interpret(result(step, 0, text))
        assert v.ok and v.state is not None
        problems: list[str] = []
    except lp.VerifyFailed as e:
        problems = e.verification.problems
        assert e.reason == "; ".join(problems)
    assert problems == expected and (want is not None or problems)


@pytest.mark.parametrize("stdout, code, want", [
    ("lab1 patched\n", 0, "lab1 patched\n"),
    ("console=ttyS0\n", 0, ("failed", "probe 'cat /proc/cmdline' printed 'console=ttyS0', want /patched/")),
    ("", 1, ("failed", "probe 'cat /proc/cmdline' printed '', want /patched/ (exit 1: cat: denied)")),
])
def test_probe_interpreter(stdout, code, want):
    step = lp.verify_loaded_plan("livepatch_demo", M, Probe(("cat", "/proc/cmdline"), "patched"))[1]
    got = outcome(step, code, stdout, "cat: denied" if code else "")
    assert (got.probe_output if isinstance(got, lp.Verification) else got) == want


@pytest.mark.parametrize("kpatch_cli, code, stdout, stderr, want", [
    (True, 0, "", "", {"persisted": True, "method": "kpatch"}),
    (True, 1, "", "kpatch: livepatch-demo.ko: module not found\n",
     ("failed", "kpatch install failed: persist exited 1: kpatch: livepatch-demo.ko: module not found")),
    (False, 0, "persisted\n", "", {"persisted": True, "method": "kpipe", "path": PERSISTED,
                                   "unit": "kpipe-livepatch.service"}),
    (False, 0, "no-systemd\n", "",
     {"persisted": False, "why": "no kpatch CLI and no systemd on the host: staged only, not loaded at boot"}),
    (False, 6, "", "systemctl enable kpipe-livepatch.service failed\n",
     ("failed", f"persisting {PERSISTED} failed: systemctl enable kpipe-livepatch.service failed")),
])
def test_persist_interpreters(kpatch_cli, code, stdout, stderr, want):
    step, = lp.persist_plan(R, DEST, kpatch_cli)
    assert outcome(step, code, stdout, stderr) == want
    assert step.writes
    un = lp.uninstall_step(R, FILE)
    assert un.argv() == ("kpatch", "uninstall", "-k", R, FILE) and un.done is not None
    assert un.done(un.interpret(result(un, 1, "", "not installed"))) == {"exit": 1}


PREFLIGHT_OUT = (f"release {R}\narch x86_64\nfree_kb 1048576\nstaged absent\nkpatch_cli 0\n" + NONE)


@pytest.mark.parametrize("stdout, want", [
    (PREFLIGHT_OUT, {"release": R, "arch": "x86_64", "free_kb": "1048576", "staged": "absent", "kpatch_cli": "0"}),
    (PREFLIGHT_OUT.replace(f"release {R}", "release 6.1.0-99-amd64"),
     ("failed", f"release changed: host runs 6.1.0-99-amd64, plan expected {R}")),
    (PREFLIGHT_OUT.replace("end\n", ""), ("failed", ("could not read the host's facts: preflight exited 0: "
                                                     "module livepatch_demo 0 -"))),
    (PREFLIGHT_OUT.replace("free_kb 1048576", "free_kb 4"),
     ("failed", f"not enough free space for {FILE}: 4 KiB free, need 1032 KiB")),
], ids=["ok", "release-changed", "cut", "full"])
def test_preflight_interpreter(stdout, want):
    step = eng.preflight_step(assignment(), 4096)
    got = outcome(step, 0, stdout)
    if isinstance(want, dict):  # the facts, and the state read in the same round trip
        facts, st = got
        assert {k: facts[k] for k in want} == want and st.complete and not st.patches
    else:
        assert got == want
    assert not step.writes


# ------------------------------------------------------------------ the executor's journal

class Canned:
    """A transport answering each argv from a table (a test double of the host, not of run_steps)."""

    name = "h1"

    def __init__(self, answers: dict[tuple[str, ...], tuple[int, str, str]]):
        self.answers = answers
        self.ran: list[tuple[str, ...]] = []

    def run(self, cmd: Command) -> CommandResult:
        self.ran.append(cmd.argv)
        code, out, err = self.answers[cmd.argv]
        return CommandResult(self.name, cmd, code, out, err)

    def put(self, local: Path, remote: str) -> None:
        self.ran.append(("upload", str(local), remote))


def test_a_stage_is_one_journal_step_written_ahead_of_its_upload():
    steps = eng.apply_plan(assignment(), FACTS, state(NONE), LOCAL, None, marker=M, timeout=30)[:3]
    t = Canned({CHECK_ARGV: (0, "absent\n", ""), COMMIT_ARGV: (0, "staged\n", "")})
    journal: list[tuple[str, str, dict[str, Any]]] = []

    def rec(step: str, phase: str, detail: dict[str, Any]) -> None:
        journal.append((step, phase, detail))
        if phase == "intended":
            assert t.ran == []  # write-ahead: nothing ran before the intent was recorded

    assert run_steps(t, steps, rec)[-1] == DEST
    assert journal == [("stage", "intended", {"path": DEST, "sha256": SHA, "temp": TMP}),
                       ("stage", "done", {"path": DEST})]
    assert t.ran == [CHECK_ARGV, ("upload", str(LOCAL), TMP), COMMIT_ARGV]
    t = Canned({CHECK_ARGV: (0, "absent\n", ""), COMMIT_ARGV: (3, "", f"checksum mismatch: got x, want {SHA}\n")})
    journal.clear()
    with pytest.raises(StepFailed):
        run_steps(t, steps, rec)
    assert [j[:2] for j in journal] == [("stage", "intended"), ("stage", "failed")]
    assert journal[-1][2]["error"] == f"staging {DEST} failed: checksum mismatch: got x, want {SHA}"


def test_describe_and_argv_lists_show_exact_argv():
    steps = lp.stage_plan(LOCAL, R, SHA, FILE, "absent")
    assert argv_lists(steps)[1] == ["upload", str(LOCAL), TMP]
    assert describe(steps)[1] == f"stage: upload {LOCAL} -> {TMP}"
    assert describe([lp.unload_plan("livepatch_demo", state(MODULE_ONLY))[0]]) == [
        "unload: sudo -n -- /sbin/rmmod livepatch_demo"]
    assert isinstance(steps[1].action, Upload)
    # the dry-run's readable form: each script's text once, the steps naming it
    scripts: dict[str, str] = {}
    plan = steps + lp.disable_plan("livepatch_demo", state(LOADED), marker=M)
    lines = describe(plan, scripts)
    assert lines[0] == f"stage: sudo -n -- sh -c [script stage-check] kpipe {FOLDER} {DEST} {FILE}"
    assert lines[3].startswith("disable: sudo -n -- sh -c 'printf")  # one-line scripts stay inline
    assert lines[-1] == "disable: sudo -n -- sh -c [script wait-gone] kpipe livepatch_demo 60 gone"
    assert scripts == {"stage-check": lp.STAGE_CHECK_SCRIPT, "stage": lp.STAGE_COMMIT_SCRIPT,
                       "disable": lp.DISABLE_SCRIPT, "wait-gone": lp.WAIT_SCRIPT}


# ------------------------------------------------------------------ dry-run == what really runs (SimFleet)

class Recording:
    """A real transport that also records every argv it runs (uploads as `upload SRC DEST`)."""

    def __init__(self, t: Any, log: list[list[str]]):
        self._t = t
        self._log = log
        self.name = t.name

    def run(self, cmd: Command) -> CommandResult:
        self._log.append(list(cmd.argv))
        return self._t.run(cmd)

    def put(self, local: Path, remote: str) -> None:
        self._log.append(["upload", str(local), remote])
        self._t.put(local, remote)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


class RecordingRunner:
    def __init__(self, inner: Any, hosts: list[str]):
        self.inner = inner
        self.argv: dict[str, list[list[str]]] = {h: [] for h in hosts}

    def run_many(self, hosts: list[str], fn: Any, forks: int) -> dict[str, Any]:
        return self.inner.run_many(hosts, lambda t: fn(Recording(t, self.argv[t.name])), forks)

    def close(self) -> None:
        self.inner.close()


def start_recorded(ws: Any, rid: str, hosts: list[str]) -> tuple[Any, RecordingRunner]:
    """Run a planned rollout with the engine over SSH, recording every argv each host ran: (summary, recorder)."""
    engine, runner = engine_for(ws, Journal(ws.store), rid)
    rec = RecordingRunner(runner, hosts)
    engine.runner = rec
    try:
        return engine.start(rid), rec
    finally:
        rec.close()


_UUID = re.compile(r"(kpipe: marker )[0-9a-f]{32}")


def normal(argv_lists_: list[list[str]]) -> list[list[str]]:
    # the /dev/kmsg marker is unique per run by design (a fresh uuid): everything else must be equal
    return [[_UUID.sub(r"\1<uuid>", a) for a in argv] for argv in argv_lists_]


def host_tree(h: Any) -> dict[str, Any]:
    """What a write would change on a simulated host: its files under /var/lib, sysfs, modules, log, taint."""
    files = sorted(str(p.relative_to(h.dir)) for sub in ("var_lib", "sys_kernel", "sys_module")
                   for p in (h.dir / sub).rglob("*"))
    return {"files": files, "log": h.log(), "tainted": h.tainted, "patches": h.patches(), "staged": h.staged()}


def test_dry_run_prints_the_argv_the_fabric_executor_then_runs(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws, art = setup_ws(fleet, tmp_path)
    _, journal, rid = make_plan(ws, art, fleet.hosts, waves="1,100%")
    before = {h.name: host_tree(h) for h in fleet.hosts}
    base = [sys.executable, "-m", "kpipe", "-W", str(ws.root), "rollout", "start", "--plan", rid, "--dry-run"]
    r = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert printed["refused"] == {} and set(printed["commands"]) == {h.name for h in fleet.hosts}
    human = subprocess.run(base, capture_output=True, text=True, timeout=120, check=False)
    assert human.returncode == 0, human.stderr
    assert " 1. (read) preflight: " in human.stdout and "(write) stage: upload " in human.stdout
    assert "(write) load: sudo -n -- sh -c" in human.stdout
    assert f"/sbin/insmod /var/lib/kpatch/{RELEASE}/" in human.stdout
    # no write reached any host, nothing was journaled
    assert {h.name: host_tree(h) for h in fleet.hosts} == before
    assert journal.entries(rid) == []

    s, rec = start_recorded(ws, rid, [h.name for h in fleet.hosts])
    assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s
    for h in fleet.hosts:
        # after the host's own pipeline (what the dry run printed) come the gate's ticks after each wave: the
        # one read-only state + kernel log command, through the observer
        want = printed["commands"][h.name]
        ran, gate_reads = rec.argv[h.name][:len(want)], rec.argv[h.name][len(want):]
        assert normal(ran) == normal(want), h.name
        assert gate_reads and all(a == list(lp.verify_state_command(MODULE).argv) for a in gate_reads), h.name
        insmod = ["/sbin/insmod", f"/var/lib/kpatch/{RELEASE}/{art.filename}"]
        assert any(a[:1] == ["upload"] for a in ran) and any(a[-2:] == insmod for a in ran)
        assert MODULE in h.patches()


def test_dry_run_runs_only_reads(simfleet_factory, tmp_path):
    fleet = simfleet_factory(2)
    ws, art = setup_ws(fleet, tmp_path)
    plan, journal, rid = make_plan(ws, art, fleet.hosts, waves="1,100%")
    fleet.hosts[1].set_release("6.1.0-0-other")  # its preflight refuses: the dry-run says why, changes nothing
    try:
        engine, runner = engine_for(ws, journal, rid)
        rec = RecordingRunner(runner, [h.name for h in fleet.hosts])
        engine.runner = rec
        try:
            plans = engine.dry_run(plan)
        finally:
            rec.close()
    finally:
        fleet.hosts[1].set_release("")
    good, bad = fleet.hosts[0].name, fleet.hosts[1].name
    steps = plans[good]
    assert not isinstance(steps, BaseException)
    ran_steps = [s for s in steps if not s.writes and s.name == "preflight"]
    assert rec.argv[good] == [list(s.argv()) for s in ran_steps] and len(ran_steps) == 1
    assert isinstance(plans[bad], StepFailed) and "release changed: host runs 6.1.0-0-other" in str(plans[bad])
    assert rec.argv[bad] == [list(ran_steps[0].argv())]
    for h in fleet.hosts:
        assert not h.staged() and not h.patches() and not any("kpipe: marker" in ln for ln in h.log())


def test_module_identity_is_read_by_kpipe_elf(tmp_path):
    from simfleet import fake_module

    ko = tmp_path / "a.ko"
    ko.write_bytes(fake_module("m", build_id=bytes(range(20)), srcversion="9F1C0A"))
    assert lp.module_identity(ko) == lp.ModuleIdentity(bytes(range(20)).hex(), "9F1C0A")
    junk = tmp_path / "b.ko"
    junk.write_bytes(b"\x7fELF" + b"\0" * 60)  # not a module kpipe can read: nothing known, no exception
    assert lp.module_identity(junk) == lp.ModuleIdentity() and not lp.module_identity(tmp_path / "none.ko").known
    assert "import elftools" not in (src := Path(lp.__file__).read_text()) and "from elftools" not in src
