"""The real kpatch-build, end to end on a forged kernel: recipe -> `kpipe build` on the chroot build host
over SSH -> validate against the forged vmlinux -> sign with the lab key -> preflight with sig_enforce=1.

No stand-in anywhere: Debian trixie's kpatch-build in the forge's chroot, reached over SSH with strict
host keys, patching Debian's linux-source built by `kpipe lab forge`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forge_support import TIMINGS, forge_buildhost, forged, workspace_with_buildhost  # noqa: F401
from kpipe.lab.forge import ForgedKernel, ensure_lab_key

pytestmark = [pytest.mark.forge, pytest.mark.timeout(5400)]

REPO = Path(__file__).resolve().parent.parent
RECIPE = "cmdline-kforge"
MODULE = "livepatch-cmdline-kforge"
TEXT = "kpipe kpatch-build live patch active"


def kp(ws: Path, *args: str, ok: tuple[int, ...] = (0,), timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ws, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode in ok, f"kpipe {' '.join(args)} exited {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def kws(tmp_path_factory, forge_buildhost, forged: ForgedKernel) -> Path:
    ws = workspace_with_buildhost(tmp_path_factory.mktemp("kforge") / "ws", forge_buildhost)
    (ws / "recipes").mkdir()
    (ws / "patches").mkdir()
    shutil.copy(REPO / "recipes" / f"{RECIPE}.yaml", ws / "recipes")
    shutil.copy(REPO / "patches" / f"{RECIPE}.patch", ws / "patches")
    key, cert = ensure_lab_key()
    with open(ws / "kpipe.toml", "a") as f:
        f.write(f'\n[signing]\ndefault = "lab"\n\n[signing.signers.lab]\ntype = "builtin"\nkey = "{key}"\n'
                f'cert = "{cert}"\nhash = "sha256"\n')
    assert forged.cert.read_bytes() == cert.read_bytes()  # the forged kernel trusts this key
    return ws


@pytest.fixture(scope="module")
def built(kws: Path, forged: ForgedKernel) -> dict:
    t = time.monotonic()
    r = kp(kws, "build", "--recipe", RECIPE, "--kernel", forged.release, "--host", "forge-trixie", "--json",
           timeout=5400)
    TIMINGS["kpatch_build_first"] = time.monotonic() - t
    [res] = json.loads(r.stdout)
    return res


def _chroot_path(state: dict, remote: str) -> Path:
    return Path(state["root"]) / remote.lstrip("/")


def test_kpipe_build_runs_the_real_kpatch_build_over_ssh(built, kws, forged, forge_buildhost):
    assert built["status"] == "built", built
    assert built["host"] == "forge-trixie" and built["module_name"] == MODULE
    art = json.loads(kp(kws, "artifacts", "show", built["artifact_id"], "--json").stdout)
    argv = art["meta"]["argv"] if "meta" in art else art["argv"]
    remote = built["remote_dir"]
    # the recorded argv is what ran: the forged kernel's tree, config and pristine vmlinux
    assert argv[:4] == ["env", "-u", "ARCH", "kpatch-build"]
    opts = dict(zip(argv[4::1], argv[5::1], strict=False))
    assert opts["-s"] == str(forged.tree) and opts["-c"] == str(forged.config)
    assert opts["-v"] == str(forged.vmlinux) and opts["-a"] == forged.release
    assert opts["-n"] == MODULE and opts["-o"] == f"{remote}/out"
    assert argv[-1] == f"{remote}/patches/00/{RECIPE}.patch"
    log = kp(kws, "artifacts", "log", built["artifact_id"]).stdout
    # ...and what the real tool said about it
    assert f"Using source directory at {forged.tree}" in log
    assert "cmdline.o: changed function: cmdline_proc_show" in log
    assert f"Building patch module: {MODULE}.ko" in log and "SUCCESS" in log
    # CACHEDIR: kpipe's slot folder, not kpatch-build's default ~/.kpatch
    cachedir = next(line.split("CACHEDIR=", 1)[1].strip() for line in log.splitlines() if "CACHEDIR=" in line)
    assert cachedir.startswith("/root/kpipe-builds/cache/slot-")
    # kpatch-build removes its tmp/ and build.log on success; that it used this CACHEDIR and not its
    # default shows in ~/.kpatch never appearing on the build host
    assert _chroot_path(forge_buildhost, cachedir).is_dir()
    assert not _chroot_path(forge_buildhost, "/root/.kpatch").exists()
    # the module kpatch-build wrote at -o is the artifact kpipe fetched
    ko = _chroot_path(forge_buildhost, f"{remote}/out/{MODULE}.ko")
    assert ko.is_file()
    assert hashlib.sha256(ko.read_bytes()).hexdigest() == art["sha256"]


def test_the_signed_module_validates_against_the_forged_vmlinux(built, kws, forged, tmp_path):
    art = json.loads(kp(kws, "artifacts", "show", built["artifact_id"], "--json").stdout)
    assert art["status"] == "valid", art
    ko = tmp_path / f"{MODULE}.ko"  # modinfo wants a .ko name; store blobs have none
    shutil.copyfile(art["path"], ko)
    r = subprocess.run(["modinfo", "-F", "vermagic", str(ko)], capture_output=True, text=True, check=True)
    assert r.stdout.split()[0] == forged.release  # kpatch-build built it against the forged tree
    report = json.loads(kp(kws, "validate", built["signed_id"], "--kernel", forged.release, "--cert",
                           str(forged.cert), "--json").stdout)
    assert report["ok"] is True, [f for f in report["findings"] if f["severity"] == "error"]
    assert str(forged.vmlinux) in json.dumps(report["symbol_sources"])


def test_signed_module_passes_preflight_on_the_forged_kernel_with_sig_enforce(built, kws, forged):
    signed = built["signed_id"]
    assert signed, built
    t = time.monotonic()
    r = kp(kws, "preflight", signed, "--sig-enforce", "--json", timeout=1800)
    TIMINGS["preflight"] = time.monotonic() - t
    res = json.loads(r.stdout)
    assert res["status"] == "passed", res
    assert res["kernel"] == forged.release


def test_a_second_build_in_the_same_tree_is_fast_and_identical_in_effect(built, kws, forged):
    t = time.monotonic()
    r = kp(kws, "build", "--recipe", RECIPE, "--kernel", forged.release, "--host", "forge-trixie", "--force",
           "--json", timeout=3600)
    TIMINGS["kpatch_build_warm"] = time.monotonic() - t
    [res] = json.loads(r.stdout)
    assert res["status"] == "built" and res["module_name"] == MODULE
    sys.stderr.write(f"timings: {json.dumps({k: round(v, 1) for k, v in TIMINGS.items()})}\n")
