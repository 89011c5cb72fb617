"""Cross builds and aarch64 validation, real (marker `forge`): the kbuild builder builds an arm64 live patch
for the forged arm64 kernel on the x86_64 chroot build host over SSH, and kpipe's validation checks it (machine,
vermagic, relocation types the arm64 module loader accepts, livepatch symbols, signature) beside deliberately
wrong modules: an x86_64 module offered to the arm64 kernel and the arm64 module offered to an x86_64 kernel."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from arm64_support import (  # noqa: E402, F401  (fixtures)
    MODULE,
    RECIPE,
    arm64_buildhost,
    arm64_built,
    arm64_ws,
    artifact,
    forged_arm64,
    kp,
    x86_64_headers_release,
    x86_64_module,
)
from kpipe.elf.reader import read_module  # noqa: E402
from kpipe.errors import ExitCode  # noqa: E402

pytestmark = [pytest.mark.forge, pytest.mark.timeout(7200)]


def _findings(report: dict) -> dict[str, dict]:
    return {f["id"]: f for f in report["findings"]}


def test_kbuild_cross_builds_the_arm64_live_patch_on_the_x86_64_host(arm64_built, arm64_ws, forged_arm64):
    assert arm64_built["status"] == "built", arm64_built
    assert arm64_built["host"] == "forge-sid" and arm64_built["module_name"] == MODULE
    art = artifact(arm64_ws, arm64_built["artifact_id"])
    argv = (art.get("meta") or art)["argv"]
    # cross variables on make's command line, ARCH still removed from the environment
    assert argv[:4] == ["env", "-u", "ARCH", "make"]
    assert argv[argv.index("-C") + 1] == str(forged_arm64.tree)
    assert "ARCH=arm64" in argv and "CROSS_COMPILE=aarch64-linux-gnu-" in argv
    info = read_module(Path(art["path"]))
    assert info.header.machine == 183  # EM_AARCH64
    assert info.vermagic is not None and info.vermagic.split()[0] == forged_arm64.release
    assert info.vermagic.endswith("aarch64")  # MODULE_ARCH_VERMAGIC of arm64


def test_the_signed_arm64_module_validates_for_the_arm64_kernel(arm64_built, arm64_ws, forged_arm64):
    assert arm64_built["signed_id"], arm64_built
    report = json.loads(kp(arm64_ws, "validate", arm64_built["signed_id"], "--kernel", forged_arm64.release,
                           "--cert", str(forged_arm64.cert), "--symbols", str(forged_arm64.vmlinux),
                           "--json").stdout)
    assert report["ok"] is True, [f for f in report["findings"] if f["severity"] == "error"]
    f = _findings(report)
    assert f["elf.machine"]["severity"] == "info" and "aarch64" in f["elf.machine"]["message"]
    assert f["vermagic.flags"]["severity"] == "info"
    assert f["reloc.type"]["severity"] == "info"  # every relocation of a type arm64's apply_relocate_add takes
    assert f["sig.present"]["severity"] == "info" and f["sig.verify"]["severity"] == "info"  # the lab key
    assert report["facts"]["arch"] == "aarch64"


def test_an_x86_64_module_offered_to_the_arm64_kernel_is_refused(arm64_ws, forged_arm64, tmp_path):
    ko = tmp_path / "virtio_net.ko"
    shutil.copyfile(x86_64_module(), ko)
    r = kp(arm64_ws, "validate", str(ko), "--kernel", forged_arm64.release, "--json", ok=(int(ExitCode.INVALID),))
    report = json.loads(r.stdout)
    f = _findings(report)
    assert report["ok"] is False
    assert f["elf.machine"]["severity"] == "error" and "aarch64" in f["elf.machine"]["message"]
    assert f["vermagic.release"]["severity"] == "error"
    assert f["vermagic.flags"]["severity"] == "error"  # no "aarch64" suffix
    # R_X86_64_* numbers mean nothing to the arm64 loader: reported once, as the machine (no reloc.type noise)
    assert "reloc.type" not in f


def test_the_arm64_module_offered_to_an_x86_64_kernel_is_refused(arm64_built, arm64_ws):
    release = x86_64_headers_release()
    r = kp(arm64_ws, "validate", arm64_built["signed_id"], "--kernel", release, "--json",
           ok=(int(ExitCode.INVALID),))
    report = json.loads(r.stdout)
    f = _findings(report)
    assert report["facts"]["arch"] == "x86_64"
    assert f["elf.machine"]["severity"] == "error" and "x86_64" in f["elf.machine"]["message"]
    assert f["vermagic.flags"]["severity"] == "error"
    assert "reloc.type" not in f  # R_AARCH64_* numbers are not judged by the x86_64 loader's table


def test_an_unsigned_arm64_module_fails_the_signature_check(arm64_built, arm64_ws, forged_arm64):
    r = kp(arm64_ws, "validate", arm64_built["artifact_id"], "--kernel", forged_arm64.release,
           "--cert", str(forged_arm64.cert), "--json", ok=(int(ExitCode.INVALID),))
    f = _findings(json.loads(r.stdout))
    assert f["sig.present"]["severity"] == "error"
    assert f["elf.machine"]["severity"] == "info"


def test_the_recipe_is_the_arm64_one(arm64_ws):
    assert (arm64_ws / "recipes" / f"{RECIPE}.yaml").is_file()
