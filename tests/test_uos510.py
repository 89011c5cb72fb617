"""The UOS lineage, 5.10: Debian bullseye's kernel in the lab, a bullseye kbuild build host, a mixed fleet.

The pure tests check how `--kernel` is read and that a bullseye kernel comes from a private apt index
(never the host's sources). The VM test (markers vm + forge) runs the whole path: `kpipe lab up --kernel
<5.10 release>` boots bullseye's kernel, the recipe cmdline-uos510 is built for 5.10 on the bullseye chroot
build host (over SSH, its gcc-10 and headers) and for 6.1 on `local`, validated against each kernel's
Module.symvers, signed, then rolled out in waves (1,100%) to 5.10 + 6.1 lab VMs, verified (/proc/cmdline
read in each VM) and rolled back. Fixtures are cached by their inputs (tests/uos510_support.py).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kenv
from kpipe.errors import ConfigError, NotFoundError
from kpipe.lab.buildhost import kbuild_host_packages, kbuild_kernel_toml
from kpipe.lab.kernel import (
    AptSuite,
    fetch_debian_kernel,
    parse_kernel_spec,
    pick_release,
    resolve_kernel,
    suite_of_release,
)

REPO = Path(__file__).resolve().parent.parent
RECIPE = "cmdline-uos510"
TEXT = "kpipe live patch active"


# --------------------------------------------------------------------------- --kernel forms

def test_kernel_spec_forms() -> None:
    s = parse_kernel_spec("debian:bullseye/5.10.0-32-amd64")
    assert (s.suite, s.release, s.prefix) == ("bullseye", "5.10.0-32-amd64", "")
    s = parse_kernel_spec("debian:bullseye/5.10")
    assert (s.suite, s.release, s.prefix) == ("bullseye", "", "5.10")
    s = parse_kernel_spec("debian:bullseye")
    assert (s.suite, s.release, s.prefix) == ("bullseye", "", "")
    s = parse_kernel_spec("5.10")  # a bare prefix: the series names its suite
    assert (s.suite, s.prefix) == ("bullseye", "5.10")
    s = parse_kernel_spec("5.10.0-32-amd64")  # a release: suite decided when fetching
    assert (s.suite, s.release) == (None, "5.10.0-32-amd64")


@pytest.mark.parametrize("text", ["debian:Bull seye/5.10", "debian:bullseye/5.10 ; rm", "debian:/5.10", ""])
def test_kernel_spec_rejects_bad_text_with_one_line(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_kernel_spec(text)
    assert "\n" not in str(e.value) and e.value.hint


def test_suite_of_release() -> None:
    assert suite_of_release("5.10.0-32-amd64") == "bullseye"
    assert suite_of_release("6.1.0-57-amd64") == "bookworm"
    assert suite_of_release("5.10.0-amd64-UOS") == "bullseye"  # UOS releases name their 5.10 base too
    assert suite_of_release("9.99.0-1-amd64") is None


def test_pick_release_is_the_newest_plain_abi_by_number() -> None:
    names = ["linux-image-5.10.0-9-amd64", "linux-image-5.10.0-32-amd64", "linux-image-5.10.0-32-amd64-dbg",
             "linux-image-5.10.0-33-rt-amd64", "linux-image-5.10.0-33-cloud-amd64",
             "linux-image-5.10.0-32-amd64-unsigned", "linux-image-6.1.0-57-amd64"]
    assert pick_release(names, "5.10") == "5.10.0-32-amd64"
    assert pick_release(names, "5.10", "rt-amd64") == "5.10.0-33-rt-amd64"
    assert pick_release(names, "5.4") is None


def test_private_apt_options_never_name_the_hosts_apt(tmp_path: Path) -> None:
    apt = AptSuite("bullseye", tmp_path)
    opts = apt.options()
    values = [o.split("=", 1)[1] for o in opts[1::2]]
    for key in ("Dir::Etc::SourceList", "Dir::State", "Dir::Cache"):
        [v] = [o.split("=", 1)[1] for o in opts[1::2] if o.split("=", 1)[0] == key]
        assert Path(v).is_relative_to(apt.folder)
    assert not any(v.startswith("/etc/apt") or v.startswith("/var/lib/apt") for v in values)
    assert " bullseye main" in apt.sources_line()
    assert AptSuite("bullseye", tmp_path, "http://mirror.example/debian").key != apt.key  # keyed by its inputs


def _fake_apt(bin_dir: Path, log: Path, packages_text: str = "") -> None:
    """apt-get/apt-cache stand-ins for the download step only: they log their argv and `download` makes a real
    .deb with dpkg-deb (the code under test is kpipe's choice of apt options and its unpacking)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = f"""#!/usr/bin/env python3
import os, subprocess, sys, tempfile
args = sys.argv[1:]
with open({str(log)!r}, "a") as f:
    f.write(os.path.basename(sys.argv[0]) + " " + " ".join(args) + "\\n")
opts = {{a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a and "::" in a}}
cmd = [a for a in args if not a.startswith("-") and "=" not in a]
if os.path.basename(sys.argv[0]) == "apt-cache":
    print({packages_text!r}, end="")
    sys.exit(0)
if cmd[:1] == ["update"]:
    lists = os.path.join(opts["Dir::State"], "lists")
    os.makedirs(lists, exist_ok=True)
    open(os.path.join(lists, "deb.debian.org_debian_dists_x_main_binary-amd64_Packages"), "w").close()
    sys.exit(0)
if cmd[:1] == ["download"] and "Dir::Etc::SourceList" in opts and "-99-" not in cmd[1]:
    pkg = cmd[1]; rel = pkg[len("linux-image-"):]
    root = tempfile.mkdtemp()
    os.makedirs(root + "/DEBIAN"); os.makedirs(root + "/boot"); os.makedirs(root + "/lib/modules/" + rel)
    open(root + "/DEBIAN/control", "w").write(
        "Package: " + pkg + "\\nVersion: 1\\nArchitecture: amd64\\nMaintainer: t <t@t>\\nDescription: t\\n")
    open(root + "/boot/vmlinuz-" + rel, "wb").write(b"not a kernel")
    open(root + "/lib/modules/" + rel + "/modules.order", "w").close()
    subprocess.run(["dpkg-deb", "-b", root, pkg + "_1_amd64.deb"], check=True, capture_output=True)
    sys.exit(0)
sys.stderr.write("E: Unable to locate package " + (cmd[1] if len(cmd) > 1 else "?") + "\\n")
sys.exit(100)
"""
    for name in ("apt-get", "apt-cache"):
        p = bin_dir / name
        p.write_text(script)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)


def test_a_bullseye_kernel_comes_from_a_private_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kenv.require_tool("dpkg-deb")
    log = tmp_path / "apt.log"
    _fake_apt(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("KPIPE_FORGE_CACHE", str(tmp_path / "forge"))  # no forged kernel of that name
    monkeypatch.setattr("kpipe.lab.kernel.host_suite", lambda: "bookworm")
    cache = tmp_path / "lab"
    k = fetch_debian_kernel("5.10.0-77-amd64", cache)
    assert k.source == "debian:bullseye"
    assert k.vmlinuz.read_bytes() == b"not a kernel"
    assert k.vmlinuz.is_relative_to(cache / "kernels") and "@bullseye-" in str(k.vmlinuz)
    download = [ln for ln in log.read_text().splitlines() if " download " in ln]
    assert download and f"Dir::Etc::SourceList={AptSuite('bullseye', cache).folder}/sources.list" in download[0]
    assert (AptSuite("bullseye", cache).folder / "sources.list").read_text().split()[-2:] == ["bullseye", "main"]
    # cached: a second fetch runs no apt at all
    before = log.read_text()
    assert fetch_debian_kernel("5.10.0-77-amd64", cache) == k
    assert log.read_text() == before


def test_a_prefix_is_discovered_from_the_suite_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kenv.require_tool("dpkg-deb")
    log = tmp_path / "apt.log"
    _fake_apt(tmp_path / "bin", log, "linux-image-5.10.0-9-amd64\nlinux-image-5.10.0-41-amd64\n"
                                     "linux-image-5.10.0-41-amd64-dbg\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("KPIPE_FORGE_CACHE", str(tmp_path / "forge"))
    k = resolve_kernel("debian:bullseye/5.10", None, None, tmp_path / "lab")
    assert k.release == "5.10.0-41-amd64"
    assert any(ln.startswith("apt-cache ") and "pkgnames linux-image-5.10" in ln
               for ln in log.read_text().splitlines())


def test_a_missing_package_names_the_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "apt.log"
    _fake_apt(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("KPIPE_FORGE_CACHE", str(tmp_path / "forge"))
    with pytest.raises(NotFoundError) as e:
        fetch_debian_kernel("5.10.0-99-amd64", tmp_path / "lab", suite="bullseye")
    assert "from Debian bullseye" in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / "lab" / "kernels").iterdir())  # nothing half-unpacked left
    # a stale index was refreshed once before giving up
    assert sum(" update" in ln for ln in log.read_text().splitlines()) == 2


def test_cli_rejects_a_bad_kernel_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "kpipe.toml").write_text("[workspace]\n")
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(tmp_path), "lab", "up", "--kernel",
                        "debian:No Suite/5.10"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == ConfigError.exit_code
    assert "Traceback" not in r.stderr and "not a Debian suite name" in r.stderr


def test_kbuild_host_packages_and_catalog_entry(tmp_path: Path) -> None:
    assert kbuild_host_packages("bullseye", "5.10.0-32-amd64") == ("linux-headers-5.10.0-32-amd64", "gcc-10")
    import tomllib

    doc = tomllib.loads(kbuild_kernel_toml("5.10.0-32-amd64", tmp_path / "root"))
    [k] = doc["kernels"]
    assert k["headers"] == str(tmp_path / "root" / "usr/src/linux-headers-5.10.0-32-amd64")
    assert k["symbols"] == [k["headers"] + "/Module.symvers"]


# --------------------------------------------------------------------------- the mixed fleet, real

def kp(ws: Path, *args: str, ok: tuple[int, ...] = (0,), timeout: float = 1800) -> subprocess.CompletedProcess:
    """`python -m kpipe -W ws ...` as a user runs it; assert the exit code."""
    r = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "kpipe", "-W", str(ws), *args],
                       capture_output=True, text=True, timeout=timeout, cwd=ws, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode in ok, f"kpipe {' '.join(args)} exited {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def vm_cmdline(ws: Path, lab_folder: Path, vm: str) -> str:
    """/proc/cmdline read in the VM itself, over OpenSSH with the lab's strict known_hosts."""
    from kpipe.lab.lab import Lab

    argv = Lab(lab_folder).ssh_argv(vm, ["cat", "/proc/cmdline"])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory):
    """Workspace: .lab = 1 VM of bullseye's 5.10 (`kpipe lab up --kernel`), .lab61 = 2 VMs of Debian 12's 6.1,
    build hosts `local` (6.1) and the bullseye chroot's sshd (5.10)."""
    import uos510_support as u
    from kpipe.lab import Lab, LabConfig, discover_debian_release
    from kpipe.lab import fetch_debian_kernel as fetch
    from kpipe.lab.buildhost import BuildHostChroot, build_host_toml, namespace_pids

    for tool in ("qemu-system-x86_64", "ssh", "ssh-keygen"):
        u.need_tools(tool)
    env61 = kenv.kernel_env()
    release = u.release_510()
    u.kernel_510()
    bh = BuildHostChroot(tmp_path_factory.mktemp("bullseye-bh"))
    state = u.start_buildhost(bh.folder)
    ns = os.readlink(f"/proc/{state['pid']}/ns/mnt")
    ws = tmp_path_factory.mktemp("uos510") / "ws"
    lab61 = Lab(ws / ".lab61", prefix="bw")
    try:
        (ws / "recipes").mkdir(parents=True)
        shutil.copy(REPO / "recipes" / f"{RECIPE}.yaml", ws / "recipes")
        shutil.copytree(REPO / "recipes" / "templates", ws / "recipes" / "templates")
        (ws / "patches").mkdir()
        (ws / "kpipe.toml").write_text(
            "[workspace]\n\n"
            f'[[build_hosts]]\nname = "local"\narch = "x86_64"\nkernels = ["{env61.release}"]\nslots = 1\n'
            'workdir = ".kpipe/builds"\n\n'
            + build_host_toml("kbuild-bullseye", int(state["port"]), Path(state["identity_file"]), (release,))
            + 'workdir = "/root/kpipe-builds"\n\n'
            + kbuild_kernel_toml(release, Path(state["root"]))
            + f'\n[ssh]\nknown_hosts = "{state["known_hosts"]}"\naccept_new_host_keys = false\n\n'
            '[signing]\ndefault = "lab"\n\n[signing.signers.lab]\ntype = "builtin"\n'
            'key = ".lab-keys/signing_key.pem"\ncert = ".lab-keys/signing_cert.pem"\nhash = "sha256"\n\n'
            f'[fleet]\ninventories = ["{ws / ".lab61" / "inventory.yml"}"]\n')
        kp(ws, "keys", "generate", "--signer", "lab", "--cn", "kpipe uos510 lab key")
        t = time.monotonic()
        kp(ws, "lab", "up", "--kernel", release, "--vms", "1")  # item 1: bullseye's kernel through the CLI
        u.TIMINGS["lab_up_510"] = time.monotonic() - t
        t = time.monotonic()
        image61 = fetch(discover_debian_release())
        assert image61.release == env61.release, "the lab's default kernel must match the installed headers"
        lab61.up(image61, LabConfig(vms=2), lambda m: sys.stderr.write(f"lab61: {m}\n"))
        u.TIMINGS["lab_up_61"] = time.monotonic() - t
        yield {"ws": ws, "release": release, "release61": env61.release, "buildhost": state, "lab61": lab61}
    finally:
        subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), "lab", "down"], capture_output=True,
                       timeout=120, check=False, cwd=ws)
        lab61.down()
        bh.down()
        left = namespace_pids(ns) if ns != os.readlink("/proc/self/ns/mnt") else []
        sys.stderr.write(f"uos510 timings: {json.dumps({k: round(v, 1) for k, v in u.TIMINGS.items()})}\n")
        assert not left, f"build host processes left running: {left}"


@pytest.mark.vm
@pytest.mark.forge
@pytest.mark.timeout(5400)
def test_mixed_510_61_fleet_gets_one_recipe_in_waves(mixed: dict) -> None:
    import uos510_support as u

    ws, r510, r61 = mixed["ws"], mixed["release"], mixed["release61"]
    lab510, lab61 = ws / ".lab", ws / ".lab61"
    # item 1: the lab VM runs bullseye's kernel
    assert kp(ws, "lab", "ssh", "lab1", "--", "uname", "-r").stdout.strip() == r510

    # item 2: built on the bullseye chroot over SSH, validated against its headers' Module.symvers, signed
    t = time.monotonic()
    [b510] = json.loads(kp(ws, "build", "--recipe", RECIPE, "--kernel", r510, "--host", "kbuild-bullseye",
                           "--json").stdout)
    u.TIMINGS["build_510"] = time.monotonic() - t
    [b61] = json.loads(kp(ws, "build", "--recipe", RECIPE, "--kernel", r61, "--host", "local", "--json").stdout)
    arts = json.loads(kp(ws, "artifacts", "list", "--recipe", RECIPE, "--json").stdout)
    by_kernel = {a["kernel"]: a for a in arts if a["status"] == "valid" and a["signed"]}
    assert set(by_kernel) >= {r510, r61}, arts
    assert by_kernel[r510]["id"] != by_kernel[r61]["id"]
    art510 = by_kernel[r510]["id"]
    v = kp(ws, "validate", art510, "--kernel", r510, "--json").stdout
    assert "Module.symvers" in v and f"{r510} SMP mod_unload modversions" in v, v

    # item 3: one recipe, waves (1,100%), each host its own artifact, nobody excluded
    for art in (art510, by_kernel[r61]["id"]):  # the gate before the first canary, each in a VM of its kernel
        t = time.monotonic()
        kp(ws, "preflight", art)
        u.TIMINGS[f"preflight_{art[:8]}"] = time.monotonic() - t
    vms = ((lab510, "lab1"), (lab61, "bw1"), (lab61, "bw2"))
    before = {vm: vm_cmdline(ws, f, vm) for f, vm in vms}
    assert all(TEXT not in c for c in before.values()), before
    plan = json.loads(kp(ws, "rollout", "plan", RECIPE, "--limit", "lab", "--waves", "1,100%", "--json").stdout)
    plan = plan.get("plan", plan)
    assert plan["excluded"] == [], plan["excluded"]
    assert {h: a["artifact"]["id"] for h, a in plan["assignments"].items()} == {
        "lab1": art510, "bw1": by_kernel[r61]["id"], "bw2": by_kernel[r61]["id"]}
    assert [len(w) for w in plan["waves"]] == [1, 2]
    t = time.monotonic()
    out = kp(ws, "rollout", "start", RECIPE, "--limit", "lab", "--waves", "1,100%", "--max-failures", "0",
             "--rollback-policy", "wave", "--yes", "--json")
    u.TIMINGS["rollout"] = time.monotonic() - t
    after = {vm: vm_cmdline(ws, f, vm) for f, vm in vms}
    assert all(c == TEXT for c in after.values()), (after, out.stdout[-2000:])
    kp(ws, "verify", "--limit", "lab")

    kp(ws, "rollout", "rollback", "last", "--yes", ok=(0,))
    back = {vm: vm_cmdline(ws, f, vm) for f, vm in vms}
    assert all(TEXT not in c and "console=" in c for c in back.values()), back
