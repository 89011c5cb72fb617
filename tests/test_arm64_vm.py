"""arm64 VMs of the forged 7.2 kernel under qemu-system-aarch64 (TCG), real (markers `vm` and `forge`).

A live patch cross-built for the kernel is loaded, verified (the probe reads the patched
cmdline_proc_show()'s output in /proc/cmdline), disabled and unloaded through `kpipe preflight --vm` with
module.sig_enforce=1; the kernel's own refusals are shown for an unsigned module under sig_enforce and for a
module whose vermagic names another kernel. A mixed lab boots an x86_64 and an aarch64 group in one `lab up`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from arm64_support import (  # noqa: E402, F401  (fixtures)
    MESSAGE,
    TIMINGS,
    arm64_buildhost,
    arm64_built,
    arm64_ws,
    artifact,
    forged_arm64,
    kp,
    need_qemu_aarch64,
)
from kpipe.elf.reader import read_module  # noqa: E402
from kpipe.errors import ExitCode  # noqa: E402
from kpipe.forged import ForgedKernel  # noqa: E402
from kpipe.lab.lab import Lab  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.forge, pytest.mark.timeout(7200)]


@pytest.fixture(scope="module")
def arm64_lab(arm64_ws: Path, forged_arm64: ForgedKernel) -> Iterator[Path]:
    """Two arm64 VMs of the forged kernel, booted by release; lab1 with module.sig_enforce=1."""
    need_qemu_aarch64()
    t = time.monotonic()
    kp(arm64_ws, "lab", "up", "--kernel", forged_arm64.release, "--vms", "2", "--sig-enforce-vms", "lab1",
       "--timeout", "1200", "--no-progress", timeout=1500)
    TIMINGS["arm64_lab_up_2vms"] = time.monotonic() - t
    try:
        yield arm64_ws
    finally:
        kp(arm64_ws, "lab", "down")


def vm_sh(ws: Path, vm: str, script: str, *, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a shell script in a lab VM over OpenSSH with strict host keys (stdin passed through)."""
    argv = Lab(ws / ".lab").ssh_argv(vm, ["sh", "-c", script])
    return subprocess.run(argv, input=stdin if stdin is not None else b"", capture_output=True, timeout=300)


def test_arm64_vms_boot_the_forged_kernel_by_release(arm64_lab: Path, forged_arm64: ForgedKernel):
    for vm in ("lab1", "lab2"):
        r = vm_sh(arm64_lab, vm, "uname -m; uname -r; test -d /sys/kernel/livepatch && echo livepatch; "
                                 "cat /proc/cmdline")
        out = r.stdout.decode().split("\n")
        assert r.returncode == 0, r
        assert out[0] == "aarch64" and out[1] == forged_arm64.release and out[2] == "livepatch"
        assert "console=ttyAMA0" in out[3]
        assert ("module.sig_enforce=1" in out[3]) == (vm == "lab1")
    status = json.loads(kp(arm64_lab, "lab", "status", "--json").stdout)
    assert status["kernel"]["arch"] == "aarch64" and status["kernel"]["boot_image"].endswith("/Image")
    assert all(v["alive"] for v in status["vms"])


def test_preflight_loads_verifies_disables_and_unloads_the_arm64_patch(arm64_lab: Path, arm64_built: dict):
    t = time.monotonic()
    r = kp(arm64_lab, "preflight", arm64_built["signed_id"], "--vm", "lab1", "--sig-enforce", "--json",
           timeout=1800)
    TIMINGS["arm64_preflight"] = time.monotonic() - t
    res = json.loads(r.stdout)
    assert res["status"] == "passed", res
    steps = {s["step"]: s for s in res["steps"]}
    for name in ("load", "wait", "verify", "disable", "unload", "verify-removed"):
        assert steps[name]["ok"], steps[name]
    assert MESSAGE in steps["verify"]["probe_output"]  # the patched cmdline_proc_show() answered
    after = vm_sh(arm64_lab, "lab1", "cat /proc/cmdline; ls /sys/kernel/livepatch").stdout.decode()
    assert MESSAGE not in after and "console=ttyAMA0" in after  # the original function is back


def test_sig_enforce_refuses_the_unsigned_arm64_module(arm64_lab: Path, arm64_built: dict):
    art = artifact(arm64_lab, arm64_built["artifact_id"])
    r = vm_sh(arm64_lab, "lab1", "cat > /tmp/unsigned.ko && insmod /tmp/unsigned.ko; echo rc=$?; "
                                 "dmesg | tail -n 5", stdin=Path(art["path"]).read_bytes())
    out = r.stdout.decode() + r.stderr.decode()
    assert "rc=0" not in out
    assert "Key was rejected by service" in out, out  # EKEYREJECTED: module.sig_enforce=1
    assert "Loading of unsigned module is rejected" in out, out
    gone = vm_sh(arm64_lab, "lab1", "cat /proc/modules").stdout.decode()
    assert "livepatch_cmdline_arm64" not in gone


def test_the_arm64_kernel_refuses_a_module_whose_vermagic_names_another_kernel(
        arm64_lab: Path, arm64_built: dict, forged_arm64: ForgedKernel, tmp_path):
    data = Path(artifact(arm64_lab, arm64_built["artifact_id"])["path"]).read_bytes()
    release = forged_arm64.release.encode()
    other = release[:-8] + (b"00000000" if not release.endswith(b"00000000") else b"11111111")
    assert data.count(b"vermagic=" + release) == 1
    bad = data.replace(b"vermagic=" + release, b"vermagic=" + other)
    (tmp_path / "bad.ko").write_bytes(bad)
    # kpipe's validation says what the kernel will say...
    report = json.loads(kp(arm64_lab, "validate", str(tmp_path / "bad.ko"), "--kernel", forged_arm64.release,
                           "--json", ok=(int(ExitCode.INVALID),)).stdout)
    found = {f["id"]: f for f in report["findings"]}
    assert found["vermagic.release"]["severity"] == "error"
    assert read_module(tmp_path / "bad.ko").header.machine == 183  # still an arm64 module
    # ...and the kernel (no sig_enforce on lab2: an unsigned module only taints) refuses it for its vermagic
    r = vm_sh(arm64_lab, "lab2", "cat > /tmp/bad.ko && insmod /tmp/bad.ko; echo rc=$?; dmesg | tail -n 5",
              stdin=bad)
    out = r.stdout.decode() + r.stderr.decode()
    assert "rc=0" not in out
    assert "invalid module format" in out.lower(), out  # ENOEXEC (busybox's or kmod's insmod wording)
    assert "version magic" in out and other.decode() in out, out


@pytest.fixture(scope="module")
def mixed_lab(tmp_path_factory, forged_arm64: ForgedKernel) -> Iterator[Path]:
    """One `lab up`: an aarch64 VM of the forged Image (--arch, --kernel-image) and an x86_64 group (Debian's)."""
    need_qemu_aarch64()
    ws = tmp_path_factory.mktemp("mixed")
    (ws / "kpipe.toml").write_text("[workspace]\n")
    t = time.monotonic()
    kp(ws, "lab", "up", "--arch", "aarch64", "--kernel-image", str(forged_arm64.boot_image), "--modules",
       str(forged_arm64.modules_dir), "--group", "debian:1", "--timeout", "1200", "--no-progress", timeout=1500)
    TIMINGS["mixed_lab_up"] = time.monotonic() - t
    try:
        yield ws
    finally:
        kp(ws, "lab", "down")


def test_a_mixed_lab_boots_both_arches_with_one_inventory(mixed_lab: Path, forged_arm64: ForgedKernel):
    import yaml

    arches = {vm: vm_sh(mixed_lab, vm, "uname -m").stdout.decode().strip() for vm in ("lab1", "lab2")}
    assert arches == {"lab1": "aarch64", "lab2": "x86_64"}
    inv = yaml.safe_load((mixed_lab / ".lab" / "inventory.yml").read_text())
    lab = inv["all"]["children"]["lab"]
    assert set(lab["hosts"]) == {"lab1", "lab2"}
    assert set(lab["children"]["lab_aarch64"]["hosts"]) == {"lab1"}
    assert set(lab["children"]["lab_x86_64"]["hosts"]) == {"lab2"}
    # kpipe's own inventory reader (ansible-core) sees the per-arch groups
    from kpipe.fleet.inventory import load_inventory

    groups = load_inventory(None, [mixed_lab / ".lab" / "inventory.yml"]).groups
    assert set(groups["lab_aarch64"]) == {"lab1"} and set(groups["lab"]) == {"lab1", "lab2"}
    status = json.loads(kp(mixed_lab, "lab", "status", "--json").stdout)
    assert status["kernel"]["arch"] == "aarch64" and len(status["vms"]) == 2
