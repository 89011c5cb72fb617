"""kpipe preflight --vm: reuse a running lab VM (one VM at a time, booted by `kpipe lab up`): the same steps
as the booted preflight, the VM left running and clean, the result recorded; a VM of another kernel or one
that does not enforce signatures (with --sig-enforce) is refused with exit 2 before anything runs. On the
forge's kernel (it trusts the lab certificate) a lab-signed module passes under sig_enforce and an unsigned
one is refused with the kernel's reason."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpipe.artifacts import add_artifact, preflight_records
from kpipe.commands import Command
from kpipe.lab import Lab
from kpipe.lab import vm as vmmod
from kpipe.workspace import open_workspace
from test_lab_support import build_demo_module, headers_release, kpipe_cli, qemu_guard, remember  # noqa: F401

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ACTIVE = "kpipe live patch active"  # what recipes/cmdline-demo's probe expects


@pytest.fixture(scope="class")
def vm_ws(tmp_path_factory: pytest.TempPathFactory, qemu_guard) -> Iterator[dict]:
    """A workspace with a running one-VM lab of the headers' kernel, a good artifact and one for another kernel."""
    ws = tmp_path_factory.mktemp("pfvmws")
    (ws / "kpipe.toml").write_text("# preflight --vm test workspace\n")
    shutil.copytree(RECIPES, ws / "recipes")
    release = headers_release()
    good = build_demo_module(tmp_path_factory.mktemp("pfvmmod") / "src", release, text=ACTIVE)
    store = open_workspace(str(ws)).store
    a_good = add_artifact(store, good, kernel=release, module_name="livepatch_demo", status="valid",
                          recipe="cmdline-demo")
    other = tmp_path_factory.mktemp("pfvmother") / "livepatch_other.ko"
    other.write_bytes(good.read_bytes() + b"\0")  # another blob: its own artifact id
    a_other = add_artifact(store, other, kernel="0.0.1-other-amd64", module_name="livepatch_other",
                           status="valid")
    lab = Lab(ws / ".lab")
    r = kpipe_cli(ws, "lab", "up", "--kernel", release, "--vms", "1", timeout=900)
    remember(lab.load_state())
    try:
        assert r.returncode == 0, f"kpipe lab up failed ({r.returncode}): {r.stderr}{r.stdout}"
        yield {"ws": ws, "lab": lab, "good": a_good.id, "other": a_other.id, "release": release}
    finally:
        remember(lab.load_state())
        lab.down()


def _run_on_vm(lab: Lab, *argv: str) -> str:
    st = lab.require_state()
    pool = lab.pool(st)
    try:
        r = pool.transport(lab.targets(st)[0]).run(Command.of(*argv, timeout=60))
        return r.stdout
    finally:
        pool.close()


class TestOnADebianLabVm:
    """One VM of the headers' Debian kernel, stopped when the class ends (before the forge's boots)."""

    @pytest.mark.vm
    def test_preflight_on_a_running_lab_vm_passes_and_leaves_it_running_and_clean(self, vm_ws):
        ws, lab = vm_ws["ws"], vm_ws["lab"]
        pid_before = lab.require_state().vms[0].pid
        r = kpipe_cli(ws, "preflight", vm_ws["good"], "--vm", "lab1", "--json")
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        assert result["status"] == "passed", result["problems"]
        assert result["vm"] == "lab1"
        assert [s["step"] for s in result["steps"]] == ["attach", "stage", "load", "wait", "verify", "disable",
                                                        "unload", "verify-removed", "unstage"]
        verify = next(s for s in result["steps"] if s["step"] == "verify")
        assert verify["probe_output"].strip() == ACTIVE
        assert "livepatch: 'livepatch_demo': unpatching complete" in result["kernel_lines"]
        # the same VM, still running, with neither the module nor the staged file left
        st = lab.require_state()
        assert st.vms[0].pid == pid_before and vmmod.alive(st.vms[0])
        left = _run_on_vm(lab, "sh", "-c", f"ls /sys/module /sys/kernel/livepatch /var/lib/kpatch/{vm_ws['release']} "
                                           "2>/dev/null; true")
        assert "livepatch_demo" not in left
        assert not list((ws / ".lab").glob("preflight/*")), "a VM was booted although --vm was given"
        # recorded like a booted preflight (default options: the VM does not enforce signatures)
        recs = preflight_records(open_workspace(str(ws)).store, vm_ws["good"])
        assert recs and recs[-1]["status"] == "passed"
        assert recs[-1]["options"] == {"sig_enforce": False, "append": ""}


    @pytest.mark.vm
    def test_preflight_on_a_vm_of_another_kernel_is_refused_before_anything_runs(self, vm_ws):
        r = kpipe_cli(vm_ws["ws"], "preflight", vm_ws["other"], "--vm", "lab1")
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"runs kernel {vm_ws['release']}" in r.stderr and "0.0.1-other-amd64" in r.stderr
        assert "Traceback" not in r.stderr
        assert preflight_records(open_workspace(str(vm_ws["ws"])).store, vm_ws["other"]) == []


    @pytest.mark.vm
    def test_sig_enforce_on_a_lab_vm_without_enforcement_is_refused(self, vm_ws):
        r = kpipe_cli(vm_ws["ws"], "preflight", vm_ws["good"], "--vm", "lab1", "--sig-enforce")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "does not enforce module signatures" in r.stderr and "--sig-enforce" in r.stderr


    @pytest.mark.vm
    def test_an_unknown_lab_vm_is_not_found(self, vm_ws):
        r = kpipe_cli(vm_ws["ws"], "preflight", vm_ws["good"], "--vm", "lab9")
        assert r.returncode == 5, r.stdout + r.stderr
        assert "lab9" in r.stderr and "lab1" in r.stderr


def test_preflight_vm_without_a_running_lab_says_lab_up(tmp_path):
    (tmp_path / "kpipe.toml").write_text("# no lab\n")
    ko = tmp_path / "m.ko"
    ko.write_bytes(b"\x7fELF not really")
    a = add_artifact(open_workspace(str(tmp_path)).store, ko, kernel="6.1.0-1-amd64", module_name="m")
    r = kpipe_cli(tmp_path, "preflight", a.id, "--vm", "lab1")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "no lab is running" in r.stderr and "kpipe lab up --kernel 6.1.0-1-amd64" in r.stderr
    assert "Traceback" not in r.stderr


def test_keep_and_vm_do_not_go_together(tmp_path):
    (tmp_path / "kpipe.toml").write_text("# no lab\n")
    ko = tmp_path / "m.ko"
    ko.write_bytes(b"\x7fELF not really")
    a = add_artifact(open_workspace(str(tmp_path)).store, ko, kernel="6.1.0-1-amd64", module_name="m")
    r = kpipe_cli(tmp_path, "preflight", a.id, "--vm", "lab1", "--keep")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--keep and --vm" in r.stderr


def test_the_sig_enforce_note_names_the_forge_for_vendor_kernels_only():
    from kpipe.preflight import sig_enforce_note

    assert "docs/forge.md" in sig_enforce_note("6.1.0-57-amd64")
    assert "not the lab certificate" in sig_enforce_note("6.1.0-57-amd64")
    assert sig_enforce_note("6.12.117-kforge-9c43e147") == ""


@pytest.fixture
def forged_lab(tmp_path: Path, qemu_guard) -> Iterator[dict]:
    """One sig-enforcing VM of the forged kernel; the demo module built against its tree (in the forge's
    chroot), once unsigned and once signed with the lab key the kernel trusts."""
    from forge_support import forged_kernel
    from kpipe.lab.forge import ensure_chroot, ensure_lab_key, parse_source

    forged = forged_kernel()
    key, cert = ensure_lab_key()
    assert forged.cert.read_bytes() == cert.read_bytes()  # the forged kernel trusts this key
    source = parse_source(forged.source)
    chroot = ensure_chroot(source.suite, extra_packages=(source.package,))
    src = tmp_path / "demo"
    shutil.copytree(Path(__file__).resolve().parent / "data" / "livepatch_demo", src)
    chroot.run(["make", "-s", "-C", str(forged.tree), f"M={src}", f"KPIPE_CFLAGS=-DKPIPE_TEXT='\"{ACTIVE}\"'",
                "modules"], binds=(forged.folder, src), what="demo module for the forged kernel")
    unsigned = src / "livepatch_demo.ko"
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "kpipe.toml").write_text("# preflight --vm on the forged kernel\n")
    signed = tmp_path / "signed" / "livepatch_demo.ko"
    signed.parent.mkdir()
    r = kpipe_cli(ws, "sign", str(unsigned), "--key", str(key), "--cert", str(cert), "-o", str(signed))
    assert r.returncode == 0, r.stderr
    store = open_workspace(str(ws)).store
    a_signed = add_artifact(store, signed, kernel=forged.release, module_name="livepatch_demo", status="valid")
    a_unsigned = add_artifact(store, unsigned, kernel=forged.release, module_name="livepatch_demo", status="valid")
    lab = Lab(ws / ".lab")
    r = kpipe_cli(ws, "lab", "up", "--kernel", forged.release, "--sig-enforce", "--vms", "1", timeout=900)
    remember(lab.load_state())
    try:
        assert r.returncode == 0, f"kpipe lab up failed ({r.returncode}): {r.stderr}{r.stdout}"
        yield {"ws": ws, "lab": lab, "signed": a_signed.id, "unsigned": a_unsigned.id, "release": forged.release}
    finally:
        remember(lab.load_state())
        lab.down()


@pytest.mark.vm
@pytest.mark.forge
def test_on_the_forged_kernel_a_lab_signed_module_passes_under_sig_enforce(forged_lab):
    ws = forged_lab["ws"]
    r = kpipe_cli(ws, "preflight", forged_lab["signed"], "--vm", "lab1", "--sig-enforce", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["status"] == "passed" and result["sig_enforce"] is True, result["problems"]
    assert not any("forged kernel" in n for n in result["notes"])
    recs = preflight_records(open_workspace(str(ws)).store, forged_lab["signed"])
    assert recs[-1]["options"]["sig_enforce"] is True and recs[-1]["status"] == "passed"
    # the kernel enforces: the unsigned build of the same module is refused with the kernel's reason
    r = kpipe_cli(ws, "preflight", forged_lab["unsigned"], "--vm", "lab1", "--json")
    assert r.returncode == 9, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["sig_enforce"] is True  # recorded as what the VM is, not what was asked
    assert any("key" in p.lower() for p in result["problems"]), result["problems"]
    left = _run_on_vm(forged_lab["lab"], "sh", "-c",
                      f"ls /sys/module /var/lib/kpatch/{forged_lab['release']} 2>/dev/null; true")
    assert "livepatch_demo" not in left
