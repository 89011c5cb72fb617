"""Livepatch host operations: parsers over real outputs captured from lab VMs, then the real thing.

The captured files in tests/data/livepatch/ are verbatim outputs of STATE_SCRIPT,
dmesg and insmod on Debian's 6.1.0-56-amd64 under qemu (kpipe lab).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from kpipe.builder.spec import Probe
from kpipe.commands import Command
from kpipe.errors import KpipeError
from kpipe.fleet import livepatch as lp
from test_lab_support import (  # noqa: F401  (fixtures)
    DEMO_TEXT,
    SharedLab,
    altered_vermagic,
    demo_module,
    qemu_guard,
    shared_lab,
)

CAPTURED = Path(__file__).parent / "data" / "livepatch"


def captured(name: str) -> str:
    return (CAPTURED / name).read_text()


# ------------------------------------------------------------------ parsers (real outputs)

@pytest.mark.parametrize("file, patches, module_present, tainted", [
    ("state_none.txt", {}, False, 0),
    ("state_loaded.txt", {"livepatch_demo": (1, 0, {"vmlinux": 1}, ("vmlinux/cmdline_proc_show,1",))}, True, 45056),
    ("state_disabled_module_loaded.txt", {}, True, 45056),
    ("state_removed.txt", {}, False, 45056),
    ("state_sig_enforce.txt", {}, False, 0),
    ("state_vermagic.txt", {}, False, 0),
    ("state_in_transition.txt",
     {"livepatch_stall": (1, 1, {"vmlinux": 1}, ("vmlinux/wait_for_completion_state,1",))}, True, 45056),
])
def test_state_parser_reads_real_vm_outputs(file, patches, module_present, tainted):
    st = lp.parse_host_livepatch(captured(file))
    assert st.complete and st.sysfs
    assert st.tainted == tainted
    module = next(iter(patches), "livepatch_demo")
    assert st.module(module).present is module_present
    assert {n: (p.enabled, p.transition, p.objects, p.functions) for n, p in st.patches.items()} == patches
    assert lp.parse_livepatch_state(captured(file)).keys() == patches.keys()


def test_state_parser_keeps_module_taint_letters():
    st = lp.parse_host_livepatch(captured("state_loaded.txt"))
    assert st.patches["livepatch_demo"].module_taint == "OEK"
    assert st.patches["livepatch_demo"].module_present


@pytest.mark.parametrize("text, expect", [
    ("", dict(complete=False, sysfs=False, patches={})),
    ("livepatch_sysfs 0\ntainted 0\nend\n", dict(complete=True, sysfs=False, patches={})),
    # a kernel before 6.1 has no per-object `patched` file: '-' means missing, not 0
    ("livepatch_sysfs 1\ntainted 32768\npatch p\nenabled p 1\ntransition p 1\nobject p vmlinux -\nend\n",
     dict(complete=True, sysfs=True, patches={"p": (1, 1, {"vmlinux": None})})),
    # unreadable values and garbage lines
    ("livepatch_sysfs 1\ntainted ?\npatch p\nenabled p ?\nhello world\ntransition p\nend\n",
     dict(complete=True, sysfs=True, patches={"p": (None, None, {})})),
    # truncated output (connection lost mid-way): not complete
    ("livepatch_sysfs 1\ntainted 0\npatch p\nenabled p 1\n",
     dict(complete=False, sysfs=True, patches={"p": (1, None, {})})),
])
def test_state_parser_edge_cases(text, expect):
    st = lp.parse_host_livepatch(text)
    assert st.complete is expect["complete"]
    assert st.sysfs is expect["sysfs"]
    assert {n: (p.enabled, p.transition, p.objects) for n, p in st.patches.items()} == expect["patches"]


def test_state_script_runs_under_dash_and_busybox_without_livepatch_sysfs():
    # reads only; on this machine /sys/kernel/livepatch may or may not exist, the output must parse either way
    for sh in (["sh"], ["busybox", "sh"]):
        r = subprocess.run([*sh, "-c", lp.STATE_SCRIPT, "kpipe", "no_such_mod", "no_such_mod"], capture_output=True,
                           text=True, timeout=30)
        st = lp.parse_host_livepatch(r.stdout)
        assert st.complete, r.stderr
        assert list(st.modules) == ["no_such_mod"]
        assert not st.module("no_such_mod").present


def test_markers_are_unique_and_found_in_real_log():
    log = captured("dmesg_removed.txt")
    load_marker = "kpipe: marker ced6fd85e71446e0ae08ff43cb08e857 load livepatch_demo"
    after = lp.lines_after_marker(log, load_marker)
    assert after is not None
    assert after[:3] == ["livepatch_demo: loading out-of-tree module taints kernel.",
                         "livepatch_demo: tainting kernel with TAINT_LIVEPATCH",
                         "livepatch_demo: module verification failed: signature and/or required key missing - "
                         "tainting kernel"]
    assert "livepatch: 'livepatch_demo': patching complete" in after
    assert lp.lines_after_marker(log, "kpipe: marker 0000 load x") is None
    assert lp.new_marker("load", "m") != lp.new_marker("load", "m")
    assert re.fullmatch(r"kpipe: marker [0-9a-f]{32} load m", lp.new_marker("load", "m"))


# The kernel's refusals of a live patch's relocations, as the 7.2 sources print them (kernel/livepatch/core.c,
# arch/*/kernel/module.c), each found among ordinary lines; the good-load lines around them are not failures.
@pytest.mark.parametrize("line", [
    "livepatch: symbol 'kpipe_nope' not found in symbol table",
    "livepatch: unresolvable ambiguity for symbol 'show' in object 'vmlinux'",
    "livepatch: symbol position 3 for symbol 'show' in object 'vmlinux' not found",
    "livepatch: symbol .klp.sym.vmlinux.x,0 at rela sec 41 idx 2 is not marked as a livepatch symbol",
    "livepatch: invalid access to vmlinux symbol 'seq_printf' from module-specific livepatch relocation section",
    "livepatch_x: Unknown rela relocation: 283",
    "module livepatch_x: unsupported RELA relocation: 4",
    "module livepatch_x: overflow in relocation type 283 val ffff800080010000",
])
def test_relocation_refusals_are_failure_lines(line):
    around = ["livepatch_x: loading out-of-tree module taints kernel.", line,
              "livepatch_x: tainting kernel with TAINT_LIVEPATCH"]
    assert lp.failure_lines(around) == [line]


@pytest.mark.parametrize("file, marker, reason", [
    ("dmesg_vermagic.txt", "kpipe: marker 953a093499ef48e38fbff9f7d89aed05 load livepatch_demo",
     "livepatch_demo: version magic '6.1.0-56-amd64 SMP PREEMPT mod_unload modversions ' should be "
     "'6.1.0-56-amd64 SMP preempt mod_unload modversions '"),
    ("dmesg_sig_enforce.txt", "kpipe: marker 544b2849829f4b7abe01b9b79a5660e5 load livepatch_demo",
     "Loading of unsigned module is rejected"),
])
def test_refused_loads_are_reported_with_the_kernels_own_line(file, marker, reason):
    after = lp.lines_after_marker(captured(file), marker)
    assert lp.failure_lines(after) == [reason]
    problems = lp.evaluate_loaded("livepatch-demo", lp.parse_host_livepatch(captured(file.replace("dmesg", "state"))),
                                  after, marker)
    assert problems[0] == f"kernel: {reason}"
    assert any("does not exist" in p for p in problems)
    assert any("taint K" in p for p in problems)


def test_a_stalled_transition_is_reported_with_the_kernels_line():
    log = captured("dmesg_stall.txt")
    marker = "kpipe: marker 5484c624ba0845ef8fb96b97fe1ca26e load livepatch_stall"
    assert lp._stall_lines(log, marker) == ["livepatch: signaling remaining tasks"]
    st = lp.parse_host_livepatch(captured("state_in_transition.txt"))
    after = lp.lines_after_marker(log, marker)
    cut = after.index("livepatch: signaling remaining tasks") + 1  # the log as it was while stalled
    assert lp.evaluate_loaded("livepatch_stall", st, after[:cut], marker) == [
        "/sys/kernel/livepatch/livepatch_stall/transition is 1, want 0",
        "no \"livepatch: 'livepatch_stall': patching complete\" in the kernel log after the marker",
    ]


def test_successful_load_evaluates_clean_and_taint_warnings_are_not_failures():
    log = captured("dmesg_loaded.txt")
    marker = "kpipe: marker ced6fd85e71446e0ae08ff43cb08e857 load livepatch_demo"
    after = lp.lines_after_marker(log, marker)
    assert lp.failure_lines(after) == []  # "module verification failed ... tainting kernel" is a taint, not a refusal
    assert lp.evaluate_loaded("livepatch_demo", lp.parse_host_livepatch(captured("state_loaded.txt")), after,
                              marker) == []


def test_load_evaluation_flags_each_unhealthy_sysfs_value():
    st = lp.parse_host_livepatch("livepatch_sysfs 1\ntainted 4096\npatch m\nenabled m 0\ntransition m 1\n"
                                 "object m vmlinux 0\nobject m ext4 -\nmodule m 0 -\nend\n")
    problems = lp.evaluate_loaded("m", st, ["livepatch: 'm': starting patching transition"], "mk")
    assert problems == [
        "/sys/kernel/livepatch/m/enabled is 0, want 1",
        "/sys/kernel/livepatch/m/transition is 1, want 0",
        "/sys/kernel/livepatch/m/vmlinux/patched is 0, want 1",
        "/sys/module/m does not exist",
        "taint K (livepatch, bit 15) is not set: tainted=4096",
        "no \"livepatch: 'm': patching complete\" in the kernel log after the marker",
    ]
    assert lp.evaluate_loaded("m", st, None, "mk")[-1] == "the marker 'mk' is not in the kernel log"


def test_removal_evaluation_over_real_states():
    marker = "kpipe: marker 8f0c1e9898514898968094d1fced78dd disable livepatch_demo"
    after = lp.lines_after_marker(captured("dmesg_removed.txt"), marker)
    assert after == ["livepatch: 'livepatch_demo': starting unpatching transition",
                     "livepatch: 'livepatch_demo': unpatching complete"]
    assert lp.evaluate_removed("livepatch_demo", lp.parse_host_livepatch(captured("state_removed.txt")), after,
                               marker) == []
    half = lp.evaluate_removed("livepatch_demo", lp.parse_host_livepatch(captured("state_disabled_module_loaded.txt")),
                               after, marker)
    assert half == ["/sys/module/livepatch_demo still exists (module still loaded)"]
    loaded = lp.evaluate_removed("livepatch_demo", lp.parse_host_livepatch(captured("state_loaded.txt")), [], marker)
    assert loaded[0].startswith("/sys/kernel/livepatch/livepatch_demo still exists (enabled=1")


@pytest.mark.parametrize("name, sysfs", [("livepatch-cmdline-demo", "livepatch_cmdline_demo"),
                                         ("kpatch_x.ko", "kpatch_x"), ("a" * 55, "a" * 55)])
def test_sysfs_names(name, sysfs):
    assert lp.sysfs_name(name) == sysfs


@pytest.mark.parametrize("bad", ["", "../etc", "a b", "x;rm -rf /", "a" * 56, "m/../../x"])
def test_hostile_module_names_are_refused(bad):
    with pytest.raises(KpipeError):
        lp.sysfs_name(bad)


@pytest.mark.parametrize("release, name", [("../../etc", "m.ko"), ("6.1.0", "../m.ko"), ("6.1 0", "m.ko"),
                                           ("6.1.0", "$(reboot).ko"), ("..", "m.ko")])
def test_staged_path_refuses_traversal_and_shell_text(release, name):
    with pytest.raises(KpipeError):
        lp.staged_path(release, name)


def test_user_values_travel_only_as_positional_parameters():
    cmd = lp.state_command("evil-name")
    assert cmd.argv[:3] == ("sh", "-c", lp.STATE_SCRIPT)
    assert cmd.argv[3:] == ("kpipe", "evil_name")
    for script in (lp.STATE_SCRIPT, lp.STAGE_CHECK_SCRIPT, lp.STAGE_COMMIT_SCRIPT, lp.WAIT_SCRIPT, lp.DISABLE_SCRIPT,
                   lp.MARKER_SCRIPT, lp.VERIFY_SCRIPT, lp.LOAD_SCRIPT, lp.UNSTAGE_SCRIPT):
        assert not re.search(r"/force\b", script)  # never write the livepatch force file
    assert lp.load_command("/var/lib/kpatch/r/m.ko", kpatch_cli=False).argv == ("/sbin/insmod",
                                                                               "/var/lib/kpatch/r/m.ko")
    assert lp.load_command("/p/m.ko", kpatch_cli=True).argv == ("kpatch", "load", "/p/m.ko")


# ------------------------------------------------------------------ real kernels (lab VMs)

def _transport(shared: SharedLab, name: str):
    pool = shared.lab.pool(shared.state)
    target = next(t for t in shared.lab.targets(shared.state) if t.name == name)
    return pool, pool.transport(target)


@pytest.mark.vm
def test_livepatch_lifecycle_on_a_real_kernel(shared_lab, demo_module):
    pool, t = _transport(shared_lab, "lab1")
    try:
        release = t.run(Command.of("uname", "-r")).stdout.strip()
        sha = hashlib.sha256(demo_module.read_bytes()).hexdigest()
        original = t.run(Command.of("cat", "/proc/cmdline")).stdout
        assert "kpipe.lab=lab1" in original
        probe = Probe(("cat", "/proc/cmdline"), f"^{DEMO_TEXT}$", "kpipe.lab=lab1")

        path = lp.stage(t, demo_module, release, sha, "livepatch_demo.ko")
        assert path == f"/var/lib/kpatch/{release}/livepatch_demo.ko"
        assert t.run(Command.of("sha256sum", path)).stdout.split()[0] == sha
        assert lp.stage(t, demo_module, release, sha, "livepatch_demo.ko") == path  # idempotent
        with pytest.raises(lp.LivepatchOpError, match="checksum mismatch"):
            lp.stage(t, demo_module, release, "0" * 64, "other.ko")
        assert "other.ko" not in t.run(Command.of("ls", "-a", f"/var/lib/kpatch/{release}")).stdout

        loaded = lp.load(t, path, "livepatch-demo")
        assert loaded.ok and loaded.changed, loaded
        assert lp.wait_transition(t, "livepatch_demo", 30).ok
        v = lp.verify_loaded(t, "livepatch_demo", loaded.marker, probe)
        assert v.ok, v.problems
        assert "livepatch: 'livepatch_demo': patching complete" in v.kernel_lines
        assert v.state.patches["livepatch_demo"].functions == ("vmlinux/cmdline_proc_show,1",)
        assert t.run(Command.of("cat", "/proc/cmdline")).stdout.strip() == DEMO_TEXT

        again = lp.load(t, path, "livepatch_demo")  # idempotent: already loaded and enabled
        assert again.ok and not again.changed
        refused = lp.unload(t, "livepatch_demo")  # rmmod of an enabled patch is refused before it runs
        assert not refused.ok and "disable it first" in refused.message

        d = lp.disable(t, "livepatch_demo", timeout=30)
        assert d.ok and d.changed, d
        u = lp.unload(t, "livepatch_demo")
        assert u.ok and u.changed, u
        r = lp.verify_removed(t, "livepatch_demo", probe, marker=d.marker)
        assert r.ok, r.problems
        assert t.run(Command.of("cat", "/proc/cmdline")).stdout == original
        assert not lp.disable(t, "livepatch_demo").changed  # idempotent
        assert not lp.unload(t, "livepatch_demo").changed
        assert lp.unstage(t, release, "livepatch_demo.ko").ok
    finally:
        pool.close()


@pytest.mark.vm
def test_verification_fails_when_the_probe_does_not_match(shared_lab, demo_module):
    pool, t = _transport(shared_lab, "lab1")
    try:
        release = t.run(Command.of("uname", "-r")).stdout.strip()
        sha = hashlib.sha256(demo_module.read_bytes()).hexdigest()
        path = lp.stage(t, demo_module, release, sha, "livepatch_demo.ko")
        loaded = lp.load(t, path, "livepatch_demo")
        assert loaded.ok
        v = lp.verify_loaded(t, "livepatch_demo", loaded.marker, Probe(("cat", "/proc/cmdline"), "^something else$"))
        assert not v.ok
        assert v.problems == [f"probe 'cat /proc/cmdline' printed '{DEMO_TEXT}', want /^something else$/"]
        # the wrong marker: the log after it cannot prove this load
        v = lp.verify_loaded(t, "livepatch_demo", "kpipe: marker not-written", None)
        assert v.problems == ["the marker 'kpipe: marker not-written' is not in the kernel log"]
    finally:
        lp.disable(t, "livepatch_demo", 30)
        lp.unload(t, "livepatch_demo")
        pool.close()


@pytest.mark.vm
def test_sig_enforce_vm_refuses_an_unsigned_module_with_the_kernels_reason(shared_lab, demo_module):
    pool, t = _transport(shared_lab, "lab2")
    try:
        assert "module.sig_enforce=1" in t.run(Command.of("cat", "/proc/cmdline")).stdout
        release = t.run(Command.of("uname", "-r")).stdout.strip()
        sha = hashlib.sha256(demo_module.read_bytes()).hexdigest()
        path = lp.stage(t, demo_module, release, sha, "livepatch_demo.ko")
        loaded = lp.load(t, path, "livepatch_demo")
        assert not loaded.ok
        assert "Key was rejected by service" in loaded.message
        v = lp.verify_loaded(t, "livepatch_demo", loaded.marker, None)
        assert not v.ok
        assert v.problems[0] == "kernel: Loading of unsigned module is rejected"
        assert not lp.read_state(t, "livepatch_demo").module("livepatch_demo").present
    finally:
        pool.close()


@pytest.mark.vm
def test_altered_vermagic_is_refused_by_the_kernel(shared_lab, demo_module, tmp_path):
    bad = altered_vermagic(demo_module, tmp_path / "livepatch_demo.ko")
    pool, t = _transport(shared_lab, "lab1")
    release = t.run(Command.of("uname", "-r")).stdout.strip()
    try:
        path = lp.stage(t, bad, release, hashlib.sha256(bad.read_bytes()).hexdigest(), "livepatch_demo.ko")
        loaded = lp.load(t, path, "livepatch_demo")
        assert not loaded.ok and "Invalid module format" in loaded.message
        v = lp.verify_loaded(t, "livepatch_demo", loaded.marker, None)
        assert re.fullmatch(r"kernel: livepatch_demo: version magic '.* SMP PREEMPT .*' should be '.* SMP preempt .*'",
                            v.problems[0]), v.problems
    finally:
        lp.unstage(t, release, "livepatch_demo.ko")
        pool.close()


FAKE_KPATCH = """#!/bin/sh
# a stand-in for the kpatch CLI (not in the guest): records the call, loads like `kpatch load`
echo "$*" >> /tmp/kpatch.calls
case "$1" in load) exec /sbin/insmod "$2";; *) echo "unsupported: $1" >&2; exit 2;; esac
"""


@pytest.mark.vm
def test_load_uses_the_kpatch_cli_where_the_host_has_one(shared_lab, demo_module):
    pool, t = _transport(shared_lab, "lab1")
    release = t.run(Command.of("uname", "-r")).stdout.strip()
    install = 'printf "%s" "$1" > /usr/bin/kpatch && chmod 755 /usr/bin/kpatch'
    try:
        assert not lp.has_kpatch_cli(t)
        assert t.run(Command.script(install, FAKE_KPATCH)).ok
        assert lp.has_kpatch_cli(t)
        path = lp.stage(t, demo_module, release, hashlib.sha256(demo_module.read_bytes()).hexdigest(),
                        "livepatch_demo.ko")
        loaded = lp.load(t, path, "livepatch_demo")  # use_kpatch_cli=None: detected
        assert loaded.ok, loaded
        assert t.run(Command.of("cat", "/tmp/kpatch.calls")).stdout == f"load {path}\n"
        assert lp.verify_loaded(t, "livepatch_demo", loaded.marker).ok
        # told not to use it: insmod directly (no new call recorded)
        assert lp.disable(t, "livepatch_demo", 30).ok and lp.unload(t, "livepatch_demo").ok
        assert lp.load(t, path, "livepatch_demo", use_kpatch_cli=False).ok
        assert t.run(Command.of("cat", "/tmp/kpatch.calls")).stdout == f"load {path}\n"
    finally:
        lp.disable(t, "livepatch_demo", 30)
        lp.unload(t, "livepatch_demo")
        t.run(Command.of("rm", "-f", "/usr/bin/kpatch", "/tmp/kpatch.calls"))
        pool.close()


@pytest.fixture(scope="module")
def stall_kit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A livepatch whose transition stalls behind a vfork() parent, and the static program that holds one."""
    import shutil

    from test_lab_support import DATA, headers_release

    src = tmp_path_factory.mktemp("stall") / "src"
    shutil.copytree(DATA / "livepatch_stall", src)
    r = subprocess.run(["make", "-s", "-C", f"/usr/src/linux-headers-{headers_release()}", f"M={src}", "modules"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["gcc", "-static", "-O2", "-o", str(src / "vforkhold"), str(src / "vforkhold.c")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return src / "livepatch_stall.ko", src / "vforkhold"


@pytest.mark.vm
def test_wait_transition_reports_a_real_stall_and_never_forces(shared_lab, stall_kit, demo_module):
    ko, holder = stall_kit
    pool, t = _transport(shared_lab, "lab1")
    release = t.run(Command.of("uname", "-r")).stdout.strip()
    try:
        demo = lp.stage(t, demo_module, release, hashlib.sha256(demo_module.read_bytes()).hexdigest(),
                        "livepatch_demo.ko")
        assert lp.load(t, demo, "livepatch_demo").ok
        assert lp.wait_transition(t, "livepatch_demo", 30).ok
        t.put(holder, "/tmp/vforkhold")
        r = t.run(Command.script("chmod 755 /tmp/vforkhold && (setsid /tmp/vforkhold </dev/null >/dev/null 2>&1 &) "
                                 "&& sleep 1 && pidof vforkhold"))
        assert len(r.stdout.split()) == 2, r  # the vfork parent and its child
        path = lp.stage(t, ko, release, hashlib.sha256(ko.read_bytes()).hexdigest(), "livepatch_stall.ko")
        loaded = lp.load(t, path, "livepatch_stall")
        assert loaded.ok, loaded
        w = lp.wait_transition(t, "livepatch_stall", 20, marker=loaded.marker)
        assert not w.ok
        assert "transition still running after 20 s" in w.message
        assert w.kernel_lines == ["livepatch: signaling remaining tasks"]  # after ~15 s (klp_send_signals)
        v = lp.verify_loaded(t, "livepatch_stall", loaded.marker)
        assert "/sys/kernel/livepatch/livepatch_stall/transition is 1, want 0" in v.problems
        # another patch cannot be disabled while one is in transition (kernel/livepatch/core.c: -EBUSY)
        busy = lp.disable(t, "livepatch_demo", 10)
        assert not busy.ok and busy.message.startswith("EBUSY"), busy
        assert lp.read_state(t).patches["livepatch_demo"].enabled == 1
        # the stall ends when the task leaves the old function: nothing forced
        # (killing one of the pair may end the other first: only check that none is left)
        assert t.run(Command.script("kill -9 $(pidof vforkhold) 2>/dev/null; sleep 1; ! pidof vforkhold")).ok
        assert lp.wait_transition(t, "livepatch_stall", 60, marker=loaded.marker).ok
        assert lp.verify_loaded(t, "livepatch_stall", loaded.marker).ok
    finally:
        t.run(Command.script("kill -9 $(pidof vforkhold) 2>/dev/null; rm -f /tmp/vforkhold"))
        for name in ("livepatch_stall", "livepatch_demo"):
            d = lp.disable(t, name, 60)
            assert d.ok, d
            assert lp.unload(t, name).ok
            assert lp.verify_removed(t, name, marker=d.marker if d.changed else "").ok
            lp.unstage(t, release, f"{name}.ko")
        pool.close()
