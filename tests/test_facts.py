"""Facts: the one script, its pure parser over real outputs (lab VM, this machine, SimFleet) and lying ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from kpipe.errors import TransportError
from kpipe.fleet.facts import FACTS_SCRIPT, FactsError, HostFacts, facts_command, parse_facts, taint_letters
from kpipe.transport.local import LocalTransport

DATA = Path(__file__).parent / "test_facts_data"


def data(name: str) -> str:
    return (DATA / name).read_text()


# {captured output file -> expected facts}; the files are real outputs of facts_command().
REAL = {
    "debian12-operator-machine.txt": dict(
        release="6.18.44-fc-v657", arch="x86_64", os_id="debian", os_version="12", tainted=0,
        livepatch_sysfs=False, patches={}, kpatch_cli="", selinux="disabled", sig_enforce=None,
        free_path="/var/lib", installed=()),
    "simfleet-openeuler-loaded.txt": dict(
        release="5.10.0-136.12.0.86.oe2203sp1.x86_64", arch="x86_64", os_id="openEuler", os_version="22.03",
        tainted=45056, taint_flags="OEK", livepatch_sysfs=True, kpatch_cli="", sig_enforce=False,
        free_path="/var/lib/kpatch"),
    "simfleet-openeuler-stuck-transition.txt": dict(tainted=45056, livepatch_sysfs=True),
    "simfleet-openeuler-sig-enforce.txt": dict(tainted=0, sig_enforce=True, patches={}, installed=()),
}


@pytest.mark.parametrize("file_name", sorted(REAL))
def test_real_outputs_parse(file_name: str) -> None:
    facts = parse_facts("h1", data(file_name))
    for key, want in REAL[file_name].items():
        assert getattr(facts, key) == want, key
    assert facts.warnings == ()
    assert facts.free_kb is not None and facts.free_kb > 0
    assert facts.arch == "x86_64" and facts.machine == "x86_64"
    assert facts.to_dict()["name"] == "h1"


def test_loaded_patch_and_installed_module_are_reported() -> None:
    facts = parse_facts("h1", data("simfleet-openeuler-loaded.txt"))
    p = facts.patches["livepatch_cmdline"]
    assert (p.enabled, p.transition, p.objects, p.module_present) == (1, 0, {"vmlinux": 1}, True)
    assert p.functions == ("vmlinux/cmdline_proc_show,1",)
    [m] = facts.installed
    assert m.file_name == "livepatch-cmdline.ko" and len(m.sha256) == 64
    assert m.path.startswith("/var/lib/kpatch/5.10.0-136.12.0.86.oe2203sp1.x86_64/")
    assert facts.livepatched


def test_stuck_transition_is_visible() -> None:
    p = parse_facts("h1", data("simfleet-openeuler-stuck-transition.txt")).patches["livepatch_cmdline"]
    assert (p.enabled, p.transition, p.objects) == (1, 1, {"vmlinux": 0})


LAB = DATA / "lab-vm-debian-6.1.txt"


def test_lab_vm_output() -> None:
    facts = parse_facts("vm0", LAB.read_text())
    assert facts.release.startswith("6.1.0-") and facts.arch == "x86_64"
    assert facts.livepatch_sysfs  # Debian's 6.1: CONFIG_LIVEPATCH=y
    assert facts.sig_enforce is False and facts.selinux == "disabled" and facts.kpatch_cli == ""
    # the lab's initramfs has no /etc/os-release and its root file system shows no df line
    assert facts.os_id == "" and facts.free_kb is None and "no file system" in facts.warnings[0]


def test_lab_vm_with_a_real_livepatch_loaded() -> None:
    """Captured after `kpipe lab up` + stage + insmod of the kbuild demo module on Debian's 6.1."""
    facts = parse_facts("lab1", data("lab-vm-debian-6.1-loaded.txt"))
    p = facts.patches["livepatch_demo"]
    assert (p.enabled, p.transition, p.objects, p.module_present, p.module_taint) == (1, 0, {"vmlinux": 1}, True,
                                                                                      "OEK")
    assert p.functions == ("vmlinux/cmdline_proc_show,1",)
    assert (facts.tainted, facts.taint_flags, facts.sig_enforce) == (45056, "OEK", False)
    [m] = facts.installed
    assert m.path == "/var/lib/kpatch/6.1.0-56-amd64/livepatch_demo.ko"


def test_lab_vm_with_sig_enforce_that_refused_the_module() -> None:
    """Booted with module.sig_enforce=1: the unsigned module is staged but never loaded."""
    facts = parse_facts("lab2", data("lab-vm-debian-6.1-sig-enforce-refused.txt"))
    assert facts.sig_enforce is True and facts.patches == {} and facts.tainted == 0
    assert [m.file_name for m in facts.installed] == ["livepatch_demo.ko"]


def test_simfleet_matches_the_real_kernel() -> None:
    """SimFleet's loaded state reads exactly like the real VM's (same taint, objects, functions)."""
    real = parse_facts("x", data("lab-vm-debian-6.1-loaded.txt")).patches["livepatch_demo"]
    sim = parse_facts("x", data("simfleet-openeuler-loaded.txt")).patches["livepatch_cmdline"]
    assert (real.enabled, real.transition, real.objects, real.functions, real.module_taint) == (
        sim.enabled, sim.transition, sim.objects, sim.functions, sim.module_taint)


def test_this_machine_live() -> None:
    """The script runs under this machine's /bin/sh (dash) and parses."""
    r = LocalTransport().run(facts_command())
    assert r.exit_status == 0, r.stderr
    facts = parse_facts("local", r.stdout)
    import platform

    assert facts.release == platform.release()
    assert facts.machine == platform.machine()


@pytest.mark.parametrize("shell", ["sh", "bash", "busybox"])
def test_the_kpatch_cli_is_found_on_path_as_command_v_finds_it(tmp_path: Path, shell: str) -> None:
    """The script walks PATH itself (no subshell per host): the first executable regular file named
    kpatch wins; a folder or a file without x named kpatch is passed over (busybox's `command -v`
    would name the file without x)."""
    import shutil
    import subprocess

    program = shutil.which(shell)
    if program is None:
        pytest.fail(f"{shell} is not installed (.ci/run installs it)")
    folder, no_x, real, later = (tmp_path / n for n in ("folder", "no-x", "real", "later"))
    for d in (folder, no_x, real, later):
        d.mkdir()
    (folder / "kpatch").mkdir()
    (no_x / "kpatch").write_text("#!/bin/sh\n")
    for d in (real, later):
        (d / "kpatch").write_text("#!/bin/sh\n")
        (d / "kpatch").chmod(0o755)
    argv = [program, "-c", FACTS_SCRIPT] if shell != "busybox" else [program, "sh", "-c", FACTS_SCRIPT]

    def kpatch_line(path: str) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, env={"PATH": path}, timeout=60).stdout
        lines = [ln for ln in out.splitlines() if ln.startswith("kpatch ")]
        assert len(lines) == 1, out
        return "" if lines[0] == "kpatch -" else lines[0].removeprefix("kpatch ")

    system = "/usr/sbin:/usr/bin:/sbin:/bin"
    assert kpatch_line(f"{folder}:{no_x}:{real}:{later}:{system}") == f"{real}/kpatch"
    assert kpatch_line(f"{folder}:{no_x}:{system}") == ""
    assert kpatch_line(f"{folder}:{no_x}:{later}:{real}:{system}") == f"{later}/kpatch"
    assert kpatch_line(f"{later}:{real}") == f"{later}/kpatch"  # PATH without the system folders


def test_the_command_is_constant_and_read_only() -> None:
    cmd = facts_command()
    assert cmd.argv[:2] == ("sh", "-c") and cmd.argv[2] == FACTS_SCRIPT and len(cmd.argv) == 4
    assert not cmd.sudo
    for writer in (">/", "> /", "rm ", "insmod", "rmmod", "echo 0", "tee ", "mv ", "/force"):
        assert writer not in FACTS_SCRIPT.replace("2>/dev/null", "").replace(">&2", ""), writer


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


GOOD = data("simfleet-openeuler-loaded.txt")

# {broken or lying output -> a piece of the per-host error}
BROKEN = {
    "empty": ("", "does not start with"),
    "garbage": ("Welcome to the jungle\n\x1b[31mrandom\n", "does not start with"),
    "motd-then-nothing": ("Last login: yesterday\n", "does not start with"),
    "cut-short": (GOOD.split("---livepatch---")[0], "cut short"),
    "no-livepatch-section": (edit(GOOD, "---livepatch---", "---nope---"), "no livepatch section"),
    "livepatch-incomplete": (edit(GOOD, "\nend\n", "\n"), "livepatch section is incomplete"),
    "no-release": (edit(GOOD, "release 5.10.0-136.12.0.86.oe2203sp1.x86_64", "release "), "no release"),
    "no-tainted": ("\n".join(ln for ln in GOOD.splitlines() if not ln.startswith("tainted 45056") or
                             "livepatch" in ln) + "\n", "no tainted"),
    "taint-text": (edit(GOOD, "tainted 45056\nkpatch", "tainted lots\nkpatch"), "not a number"),
    "taint-unreadable": (edit(GOOD, "tainted 45056\nkpatch", "tainted ?\nkpatch"), "not a number"),
    "taint-negative": (edit(GOOD, "tainted 45056\nkpatch", "tainted -5\nkpatch"), "out of range"),
    "taint-huge": (edit(GOOD, "tainted 45056\nkpatch", "tainted 99999999999999\nkpatch"), "out of range"),
    "release-shell": (edit(GOOD, "release 5.10.0-136.12.0.86.oe2203sp1.x86_64", "release 5.10;reboot"),
                      "characters a release never has"),
    "release-not-version": (edit(GOOD, "release 5.10.0-136.12.0.86.oe2203sp1.x86_64", "release linux"),
                            "kernel release"),
    "machine-lie": (edit(GOOD, "machine x86_64", "machine x86 64 $(id)"), "not an architecture"),
    "repeated-release": (edit(GOOD, "machine x86_64", "machine x86_64\nrelease 6.1.0-1-amd64"), "repeats"),
    "nul": (GOOD + "\x00", "NUL"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_or_lying_output_is_a_clear_per_host_error(case: str) -> None:
    text, message = BROKEN[case]
    with pytest.raises(FactsError) as e:
        parse_facts("web7", text)
    assert message in str(e.value)
    assert str(e.value).startswith("web7: ")
    assert isinstance(e.value, TransportError) and e.value.host == "web7" and e.value.kind == "facts"


SOFT = {
    "no-os-release": (edit(GOOD, 'os PRETTY_NAME="openEuler 22.03 (simfleet)"\nos ID=openEuler\n'
                            'os VERSION_ID="22.03"', "os -"), dict(os_id="", os_version="")),
    "df-missing": (edit(GOOD, GOOD[GOOD.index("df-begin"):GOOD.index("df-end")], "df-begin /var/lib\n"),
                   dict(free_kb=None, free_path="/var/lib")),
    "df-garbage": (edit(GOOD, GOOD[GOOD.index("df-begin"):GOOD.index("df-end")], "df-begin /var/lib\nx y z w v\n"),
                   dict(free_kb=None)),
    "selinux-enforcing": (edit(GOOD, "selinux -", "selinux 1"), dict(selinux="enforcing")),
    "selinux-permissive": (edit(GOOD, "selinux -", "selinux 0"), dict(selinux="permissive")),
    "kpatch-present": (edit(GOOD, "kpatch -", "kpatch /usr/sbin/kpatch"), dict(kpatch_cli="/usr/sbin/kpatch")),
    "sig-enforce-missing": (edit(GOOD, "sig_enforce N", "sig_enforce -"), dict(sig_enforce=None)),
    "installed-garbled": (edit(GOOD, "installed 573a", "installed zz73a"), dict(installed=())),
    "taint-changed-between-reads": (edit(GOOD, "tainted 45056\nkpatch", "tainted 4096\nkpatch"),
                                    dict(tainted=4096)),
    "crlf": (GOOD.replace("\n", "\r\n"), dict(release="5.10.0-136.12.0.86.oe2203sp1.x86_64")),
}


@pytest.mark.parametrize("case", sorted(SOFT))
def test_odd_but_usable_output(case: str) -> None:
    text, want = SOFT[case]
    facts = parse_facts("h", text)
    for key, value in want.items():
        assert getattr(facts, key) == value, key
    if case in ("df-missing", "df-garbage", "installed-garbled", "taint-changed-between-reads"):
        assert facts.warnings


@pytest.mark.parametrize("bits,letters", [(0, ""), (45056, "OEK"), (1, "P"), (4096 | 32768, "OK"),
                                          (1 << 19, "J"), ((1 << 9) | (1 << 12), "WO")])
def test_taint_letters(bits: int, letters: str) -> None:
    assert taint_letters(bits) == letters


def test_hostfacts_to_dict_is_plain_json() -> None:
    import json

    d = parse_facts("h1", GOOD).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["patches"]["livepatch_cmdline"]["enabled"] == 1
    assert isinstance(parse_facts("h1", GOOD), HostFacts)
