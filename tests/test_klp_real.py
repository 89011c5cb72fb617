"""The kernel's own klp-build, end to end on a forged 7.x kernel: recipe -> `kpipe build` on the sid chroot
build host over SSH -> validate against the forged vmlinux -> sign with the lab key -> preflight with
sig_enforce=1 -> rollout to two lab VMs of the forged kernel (sig_enforce=1) -> verify -> audit -> rollback,
with /proc/cmdline read inside the VMs before, during and after (the rollout test is also marked `vm`).

No stand-in: Linux 7.2's scripts/livepatch/klp-build from Debian sid's linux-source-7.2, in the forge's sid
chroot reached over SSH with strict host keys. The forge built that tree with klp-build's own flags and laid
its build out as klp-build's original build (klp-tmp/1-orig), so every build here runs klp-build for real
from `--short-circuit patched`: it validates and fixes the patch, builds the patched kernel, checksums,
diffs and links the module, without a second full kernel build (CI time).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forge_support import KLP_SOURCE, TIMINGS, need_forge_tools, workspace_with_buildhost
from kpipe.builder.klp import KlpBuilder
from kpipe.lab.buildhost import BuildHostChroot, namespace_pids
from kpipe.lab.forge import ForgedKernel, ensure_lab_key, forge, parse_source

pytestmark = [pytest.mark.forge, pytest.mark.timeout(7200)]

REPO = Path(__file__).resolve().parent.parent
SOURCE = KLP_SOURCE
HOST = "forge-" + SOURCE.split(":", 1)[1].split("/")[0]
RECIPE = "cmdline-klp"
MODULE = "livepatch-cmdline-klp"
TEXT = "kpipe klp-build live patch active"


def kp(ws: Path, *args: str, ok: tuple[int, ...] = (0,), timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ws, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode in ok, f"kpipe {' '.join(args)} exited {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def klp_forged() -> ForgedKernel:
    """The forged 7.x kernel (built once per input set into the forge cache, then found there)."""
    need_forge_tools()
    t = time.monotonic()
    k = forge(parse_source(SOURCE), progress=lambda m: sys.stderr.write(f"forge: {m}\n"))
    TIMINGS["klp_forge"] = time.monotonic() - t
    return k


@pytest.fixture(scope="module")
def klp_buildhost(tmp_path_factory: pytest.TempPathFactory, klp_forged: ForgedKernel) -> Iterator[dict]:
    """The sid chroot's sshd on a free loopback port; stopped by PID at the end (no process left)."""
    bh = BuildHostChroot(tmp_path_factory.mktemp("klp-buildhost"))
    suite, version = SOURCE.split(":", 1)[1].split("/")
    state = bh.up(suite, version=version)
    ns = os.readlink(f"/proc/{state['pid']}/ns/mnt")
    try:
        yield {**state, "folder": bh.folder}
    finally:
        bh.down()
        left = namespace_pids(ns) if ns != os.readlink("/proc/self/ns/mnt") else []
        assert not left, f"build host processes left running: {left}"


@pytest.fixture(scope="module")
def kws(tmp_path_factory, klp_buildhost, klp_forged: ForgedKernel) -> Path:
    ws = workspace_with_buildhost(tmp_path_factory.mktemp("klp") / "ws", klp_buildhost, name=HOST)
    (ws / "recipes").mkdir()
    (ws / "patches").mkdir()
    recipe = (REPO / "recipes" / f"{RECIPE}.yaml").read_text()
    # klp-build's original build is the forge's (klp-tmp/1-orig): start at the patched kernel.
    assert (klp_forged.tree / "klp-tmp" / "1-orig" / ".complete").is_file()
    recipe = recipe.replace("  # short_circuit: patched", "  short_circuit: patched")
    assert "\n  short_circuit: patched" in recipe
    (ws / "recipes" / f"{RECIPE}.yaml").write_text(recipe)
    shutil.copy(REPO / "patches" / f"{RECIPE}.patch", ws / "patches")
    key, cert = ensure_lab_key()
    with open(ws / "kpipe.toml", "a") as f:
        f.write(f'\n[signing]\ndefault = "lab"\n\n[signing.signers.lab]\ntype = "builtin"\nkey = "{key}"\n'
                f'cert = "{cert}"\nhash = "sha256"\n')
    assert klp_forged.cert.read_bytes() == cert.read_bytes()  # the forged kernel trusts this key
    return ws


@pytest.fixture(scope="module")
def built(kws: Path, klp_forged: ForgedKernel) -> dict:
    t = time.monotonic()
    # --force: the build host keeps finished builds, and a new workspace would collect one of the same
    # inputs instead of running klp-build; this one must run it
    r = kp(kws, "build", "--recipe", RECIPE, "--kernel", klp_forged.release, "--host", HOST, "--force", "--json",
           timeout=7200)
    TIMINGS["klp_build"] = time.monotonic() - t
    [res] = json.loads(r.stdout)
    sys.stderr.write(f"klp-build through kpipe: {TIMINGS['klp_build']:.0f} s\n")
    return res


def _chroot_path(state: dict, remote: str) -> Path:
    return Path(state["root"]) / remote.lstrip("/")


def test_recipe_render_picks_klp_build_for_the_forged_7_x_kernel(kws, klp_forged):
    data = json.loads(kp(kws, "recipe", "render", RECIPE, "--kernel", klp_forged.release, "--json").stdout)
    assert data["builder"] == "klp-build"
    kernels = json.loads(kp(kws, "kernels", "list", "--json").stdout)
    [entry] = [k for k in kernels if k["release"] == klp_forged.release]
    assert entry["builder"] == "klp-build"  # the forged tree carries scripts/livepatch/klp-build


def test_kpipe_build_runs_the_real_klp_build_over_ssh(built, kws, klp_forged, klp_buildhost):
    assert built["status"] == "built", built
    assert built["host"] == HOST and built["module_name"] == MODULE
    assert not built["reattached"]  # klp-build ran now, not an earlier run collected
    art = json.loads(kp(kws, "artifacts", "show", built["artifact_id"], "--json").stdout)
    argv = art["meta"]["argv"] if "meta" in art else art["argv"]
    remote = built["remote_dir"]
    tree = str(klp_forged.tree)
    # the recorded argv is what ran: the forged tree's own klp-build, from the tree's root, under its lock
    assert argv[:8] == ["flock", f"{tree}/.kpipe-klp-build.lock", "env", "-u", "ARCH", "-C", tree,
                        f"{tree}/scripts/livepatch/klp-build"]
    assert argv[argv.index("--output") + 1] == f"{remote}/out/{MODULE}.ko"
    assert argv[argv.index("--short-circuit") + 1] == "2" and "--keep-tmp" in argv
    assert argv[-1] == f"{remote}/patches/00/{RECIPE}.patch"
    log = kp(kws, "artifacts", "log", built["artifact_id"]).stdout
    # ...and what the real tool said: it started at the patched kernel and found the one changed function
    assert "Validating patch(es)" in log and "Building patched kernel" in log
    assert "Building original kernel" not in log  # short-circuited: the forge's build is the original
    assert "cmdline.o: changed function: cmdline_proc_show" in log or \
        "vmlinux.o: changed function: cmdline_proc_show" in log
    assert f"Building patch module: {remote}/out/{MODULE}.ko" in log and "SUCCESS" in log
    # the milestones kpipe reads from that output, in the tool's order
    steps = [m.step for m in (KlpBuilder().milestone(line) for line in log.splitlines()) if m]
    order = ["validating-patches", "fixing-patches", "building-patched", "copying-patched", "checksums",
             "diffing", "changed-function", "building-module", "success"]
    assert [s for s in dict.fromkeys(steps) if s in order] == order, steps
    # the module klp-build wrote at --output is the artifact kpipe fetched
    ko = _chroot_path(klp_buildhost, f"{remote}/out/{MODULE}.ko")
    assert ko.is_file()
    assert hashlib.sha256(ko.read_bytes()).hexdigest() == art["sha256"]
    # klp-build reverted the patch in the shared tree
    assert "seq_puts(m, saved_command_line);" in (klp_forged.tree / "fs" / "proc" / "cmdline.c").read_text()


def test_the_signed_module_validates_against_the_forged_vmlinux(built, kws, klp_forged, tmp_path):
    art = json.loads(kp(kws, "artifacts", "show", built["artifact_id"], "--json").stdout)
    assert art["status"] == "valid", art
    ko = tmp_path / f"{MODULE}.ko"  # modinfo wants a .ko name; store blobs have none
    shutil.copyfile(art["path"], ko)
    r = subprocess.run(["modinfo", "-F", "vermagic", str(ko)], capture_output=True, text=True, check=True)
    assert r.stdout.split()[0] == klp_forged.release
    r = subprocess.run(["modinfo", "-F", "livepatch", str(ko)], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "Y"
    report = json.loads(kp(kws, "validate", built["signed_id"], "--kernel", klp_forged.release, "--cert",
                           str(klp_forged.cert), "--json").stdout)
    assert report["ok"] is True, [f for f in report["findings"] if f["severity"] == "error"]


@pytest.fixture(scope="module")
def preflighted(built, kws) -> dict:
    signed = built["signed_id"]
    assert signed, built
    t = time.monotonic()
    r = kp(kws, "preflight", signed, "--sig-enforce", "--json", timeout=1800)
    TIMINGS["klp_preflight"] = time.monotonic() - t
    res: dict = json.loads(r.stdout)
    return res


def test_signed_module_passes_preflight_on_the_forged_kernel_with_sig_enforce(preflighted, klp_forged):
    assert preflighted["status"] == "passed", preflighted
    assert preflighted["kernel"] == klp_forged.release


def test_the_build_record_names_the_builder_and_host(built, kws, klp_forged):
    [rec] = [r for r in json.loads(kp(kws, "builds", "--json").stdout) if r["artifact_id"] == built["artifact_id"]]
    assert rec["status"] == "succeeded" and rec["host"] == HOST and rec["kernel"] == klp_forged.release
    assert rec["builder"] == "klp-build" and "klp-build=in-tree" in rec["builder_version"]
    assert "gcc=gcc (Debian 1" in rec["builder_version"]


def _cmdlines(ws: Path, vms: tuple[str, ...]) -> dict[str, str]:
    """/proc/cmdline read inside each VM over its own SSH session."""
    return {vm: kp(ws, "lab", "ssh", vm, "--", "cat", "/proc/cmdline", timeout=120).stdout.strip() for vm in vms}


@pytest.fixture(scope="module")
def klp_lab(kws: Path, klp_forged: ForgedKernel):
    """Two lab VMs of the forged kernel, booted with module.sig_enforce=1; stopped at the end."""
    try:
        kp(kws, "lab", "up", "--kernel", klp_forged.release, "--vms", "2", "--sig-enforce", "--timeout", "600",
           timeout=1200)
        yield ("lab1", "lab2")
    finally:
        subprocess.run([sys.executable, "-m", "kpipe", "-W", str(kws), "lab", "down"], capture_output=True,
                       timeout=300, cwd=kws)


@pytest.mark.vm
def test_rollout_verify_audit_rollback_on_forged_7_x_vms(built, preflighted, kws, klp_forged, klp_lab):
    vms = klp_lab
    assert preflighted["status"] == "passed", preflighted
    for vm in vms:
        uname = kp(kws, "lab", "ssh", vm, "--", "uname", "-r", timeout=120).stdout.strip()
        assert uname == klp_forged.release, vm
    before = _cmdlines(kws, vms)
    for vm, text in before.items():
        assert TEXT not in text and "console=" in text and "module.sig_enforce=1" in text, (vm, text)

    plan = json.loads(kp(kws, "rollout", "plan", RECIPE, "--limit", "lab", "--waves", "1,100%", "--json").stdout)
    assert not plan["excluded"], plan["excluded"]
    assert json.dumps(plan).count(built["signed_id"]) >= len(vms)
    t = time.monotonic()
    r = kp(kws, "rollout", "start", RECIPE, "--limit", "lab", "--waves", "1,100%", "--max-failures", "0",
           "--rollback-policy", "wave", "--yes", "--json", timeout=1800)
    TIMINGS["klp_rollout"] = time.monotonic() - t
    summary = json.loads(r.stdout)
    assert summary["state"] == "completed", summary
    assert summary["hosts"] == {vm: "applied" for vm in vms}
    during = _cmdlines(kws, vms)
    assert during == {vm: TEXT for vm in vms}  # klp-build's module replaced cmdline_proc_show
    for vm in vms:
        sysfs = kp(kws, "lab", "ssh", vm, "--", "cat", "/sys/kernel/livepatch/livepatch_cmdline_klp/enabled",
                   timeout=120).stdout.strip()
        assert sysfs == "1", vm

    kp(kws, "verify", "--limit", "lab")
    audit = json.loads(kp(kws, "audit", "--limit", "lab", "--format", "json").stdout)
    assert audit["compliant"] is True, audit
    for h in audit["hosts"]:
        assert h["kernel"] == klp_forged.release and h["compliant"], h

    r = kp(kws, "rollout", "rollback", summary["rollout_id"], "--yes", "--json", timeout=1800)
    assert set(json.loads(r.stdout)["hosts"].values()) == {"rolled_back"}
    after = _cmdlines(kws, vms)
    sys.stderr.write(f"/proc/cmdline before: {before}\nduring: {during}\nafter: {after}\n"
                     f"timings: {json.dumps({k: round(v, 1) for k, v in TIMINGS.items()})}\n")
    assert after == before
    for vm in vms:
        left = kp(kws, "lab", "ssh", vm, "--", "sh", "-c", "ls /sys/kernel/livepatch; true", timeout=120).stdout
        assert "livepatch_cmdline_klp" not in left, vm


def _alive_in_chroot(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # the chroot shares this PID namespace
    except ProcessLookupError:
        return False
    return True


def test_a_sigkilled_kpipe_leaves_klp_build_running_and_a_rerun_reattaches(built, kws, klp_forged):
    args = ["build", "--recipe", RECIPE, "--kernel", klp_forged.release, "--host", HOST, "--force"]
    proc = subprocess.Popen([sys.executable, "-m", "kpipe", "-W", str(kws), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=kws, env={**os.environ, "COLUMNS": "200"})
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "Building patched kernel" in line:  # klp-build's own status line, followed live
                break
        else:
            pytest.fail(f"klp-build never reached its patched build: {''.join(seen)[-3000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    started = next(line for line in seen if f"started on {HOST}" in line)
    pid = int(started.rsplit("(pid ", 1)[1].split(")")[0])
    assert _alive_in_chroot(pid), "klp-build died with kpipe"
    r = kp(kws, *args, "--json", timeout=1800)
    [res] = json.loads(r.stdout)
    assert res["status"] == "built" and res["reattached"] and res["pid"] == pid, res
    assert "reattached to the running build" in r.stderr
    log = kp(kws, "artifacts", "log", res["artifact_id"]).stdout
    assert log.count("Validating patch(es)") == 1 and "SUCCESS" in log  # one klp-build run, followed twice
