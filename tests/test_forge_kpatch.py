"""The real kpatch-build, end to end on a forged kernel: recipe -> `kpipe build` on the chroot build host
over SSH -> validate against the forged vmlinux -> sign with the lab key -> preflight with sig_enforce=1
-> rollout to two lab VMs of the forged kernel (sig_enforce=1) -> verify -> audit -> rollback, with
/proc/cmdline read inside the VMs before, during and after (the rollout test is also marked `vm`).

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


@pytest.fixture(scope="module")
def preflighted(built, kws) -> dict:
    signed = built["signed_id"]
    assert signed, built
    t = time.monotonic()
    r = kp(kws, "preflight", signed, "--sig-enforce", "--json", timeout=1800)
    TIMINGS["preflight"] = time.monotonic() - t
    res: dict = json.loads(r.stdout)
    return res


def test_signed_module_passes_preflight_on_the_forged_kernel_with_sig_enforce(preflighted, forged):
    assert preflighted["status"] == "passed", preflighted
    assert preflighted["kernel"] == forged.release


def test_the_build_record_matches_what_the_real_tool_did(built, kws, forged):
    [rec] = [r for r in json.loads(kp(kws, "builds", "--json").stdout) if r["artifact_id"] == built["artifact_id"]]
    assert rec["status"] == "succeeded" and rec["host"] == "forge-trixie" and rec["kernel"] == forged.release
    assert rec["remote_dir"] == built["remote_dir"]
    # the probe's --version line (0.9.10 prints 0.9.9) and the script's digest identify the tool
    assert "kpatch-build=Version : 0.9.9" in rec["builder_version"] and "kpatch-build-sha256=" in rec["builder_version"]
    log = kp(kws, "builds", "--log", rec["inputs_digest"][:12]).stdout
    art = json.loads(kp(kws, "artifacts", "show", built["artifact_id"], "--json").stdout)
    meta = art.get("meta", art)
    argv = meta["argv"]
    opts = dict(zip(argv[4::1], argv[5::1], strict=False))
    # the runner's slot line and the tool's own lines, in the stored log of the recorded build
    slot_line = next(line for line in log.splitlines() if line.startswith("kpipe: build slot "))
    assert slot_line == f"kpipe: build slot {meta['slot']}, CACHEDIR=/root/kpipe-builds/cache/slot-{meta['slot']}"
    real_src = next(line for line in log.splitlines() if line.startswith("Using source directory at "))
    assert real_src.split(" at ", 1)[1] == opts["-s"]
    real_module = next(line for line in log.splitlines() if line.startswith("Building patch module: "))
    assert real_module == f"Building patch module: {opts['-n']}.ko"
    # the name kpipe predicted and recorded is the one the real tool chose, fetched from -o/<name>.ko
    assert art["module_name"] == opts["-n"] == built["module_name"]
    assert opts["-o"] == f"{rec['remote_dir']}/out"
    assert "kpipe: builder exited with status 0" in log and log.count("SUCCESS") >= 1


def _cmdlines(ws: Path, vms: tuple[str, ...]) -> dict[str, str]:
    """/proc/cmdline read inside each VM over its own SSH session."""
    return {vm: kp(ws, "lab", "ssh", vm, "--", "cat", "/proc/cmdline", timeout=120).stdout.strip() for vm in vms}


@pytest.fixture(scope="module")
def forged_lab(kws: Path, forged: ForgedKernel):
    """Two lab VMs of the forged kernel, booted with module.sig_enforce=1; stopped at the end."""
    try:
        kp(kws, "lab", "up", "--kernel", forged.release, "--vms", "2", "--sig-enforce", "--timeout", "600",
           timeout=1200)
        yield ("lab1", "lab2")
    finally:
        subprocess.run([sys.executable, "-m", "kpipe", "-W", str(kws), "lab", "down"], capture_output=True,
                       timeout=300, cwd=kws)


@pytest.mark.vm
def test_rollout_verify_audit_rollback_on_forged_kernel_vms(built, preflighted, kws, forged, forged_lab):
    vms = forged_lab
    assert preflighted["status"] == "passed", preflighted  # the planner needs the signed module preflighted
    for vm in vms:
        uname = kp(kws, "lab", "ssh", vm, "--", "uname", "-r", timeout=120).stdout.strip()
        assert uname == forged.release, vm
    before = _cmdlines(kws, vms)
    for vm, text in before.items():
        assert TEXT not in text and "console=" in text and "module.sig_enforce=1" in text, (vm, text)

    plan = json.loads(kp(kws, "rollout", "plan", RECIPE, "--limit", "lab", "--waves", "1,100%", "--json").stdout)
    assert not plan["excluded"], plan["excluded"]
    assert json.dumps(plan).count(built["signed_id"]) >= len(vms)  # every host gets the signed module
    t = time.monotonic()
    r = kp(kws, "rollout", "start", RECIPE, "--limit", "lab", "--waves", "1,100%", "--max-failures", "0",
           "--rollback-policy", "wave", "--yes", "--json", timeout=1800)
    TIMINGS["rollout"] = time.monotonic() - t
    summary = json.loads(r.stdout)
    assert summary["state"] == "completed", summary
    assert summary["hosts"] == {vm: "applied" for vm in vms}
    during = _cmdlines(kws, vms)
    assert during == {vm: TEXT for vm in vms}  # the real kpatch-build's module replaced cmdline_proc_show
    for vm in vms:
        sysfs = kp(kws, "lab", "ssh", vm, "--", "cat", "/sys/kernel/livepatch/livepatch_cmdline_kforge/enabled",
                   timeout=120).stdout.strip()
        assert sysfs == "1", vm

    kp(kws, "verify", "--limit", "lab")
    audit = json.loads(kp(kws, "audit", "--limit", "lab", "--format", "json").stdout)
    assert audit["compliant"] is True, audit
    assert {h["host"] for h in audit["hosts"]} == set(vms)
    for h in audit["hosts"]:
        assert h["kernel"] == forged.release and h["compliant"], h
        [row] = [p for p in h["patches"] if p["patch"] == MODULE.replace("-", "_")]  # the kernel's name for it
        assert row["status"] == "compliant" and row["observed"]["enabled"] is True, row

    r = kp(kws, "rollout", "rollback", summary["rollout_id"], "--yes", "--json", timeout=1800)
    assert set(json.loads(r.stdout)["hosts"].values()) == {"rolled_back"}
    after = _cmdlines(kws, vms)
    rows = [(h["host"], h["status"], [p.get("patch") for p in h["patches"]]) for h in audit["hosts"]]
    sys.stderr.write(f"/proc/cmdline before: {before}\nduring: {during}\nafter: {after}\naudit rows: {rows}\n")
    assert after == before  # the original cmdline_proc_show again, read inside each VM
    for vm in vms:
        left = kp(kws, "lab", "ssh", vm, "--", "sh", "-c", "ls /sys/kernel/livepatch; true", timeout=120).stdout
        assert "livepatch_cmdline_kforge" not in left, vm


def test_a_second_build_in_the_same_tree_is_fast_and_identical_in_effect(built, kws, forged):
    t = time.monotonic()
    r = kp(kws, "build", "--recipe", RECIPE, "--kernel", forged.release, "--host", "forge-trixie", "--force",
           "--json", timeout=3600)
    TIMINGS["kpatch_build_warm"] = time.monotonic() - t
    [res] = json.loads(r.stdout)
    assert res["status"] == "built" and res["module_name"] == MODULE
    sys.stderr.write(f"timings: {json.dumps({k: round(v, 1) for k, v in TIMINGS.items()})}\n")
