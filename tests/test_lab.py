"""kpipe lab: pure pieces (release discovery, accel choice, inventory, cpio) and real VMs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kpipe.commands import Command
from kpipe.errors import ConfigError, KpipeError, TransportError
from kpipe.lab import Lab, LabConfig, initramfs
from kpipe.lab import kernel as labkernel
from kpipe.lab import vm as vmmod
from kpipe.lab.arch import AARCH64, X86_64, host_has_hw_virt, lab_arch
from kpipe.lab.lab import LabState, render_inventory
from test_lab_support import (  # noqa: F401  (fixtures)
    SharedLab,
    headers_release,
    kpipe_cli,
    qemu_guard,
    remember,
    shared_lab,
)

# ------------------------------------------------------------------ pure

@pytest.mark.parametrize("text, release", [
    ("linux-headers-6.1.0-56-amd64 (= 6.1.192-2)\n", "6.1.0-56-amd64"),
    ("linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n", "6.1.0-56-amd64"),
    ("linux-image-amd64\n  Depends: linux-image-6.12.9+bpo-amd64\n", "6.12.9+bpo-amd64"),
    ("linux-image-amd64\n  Depends: <linux-image-amd64>\n", None),
    ("", None),
])
def test_release_discovery_reads_apt_and_dpkg_dependencies(text, release):
    assert labkernel.parse_release_dependency(text) == release


@pytest.mark.parametrize("flags, hw", [
    ("fpu vme de pse tsc msr pae mce cx8 apic", False),
    ("fpu vme vmx ept", True),
    ("fpu svm npt", True),
    ("fpu vmxnet", False),  # a word that merely contains vmx is not the flag
])
def test_kvm_only_with_vmx_or_svm(flags, hw):
    assert host_has_hw_virt(f"processor\t: 0\nflags\t\t: {flags}\n") is hw


def test_tcg_command_line_forwards_ssh_to_loopback_only(tmp_path):
    spec = vmmod.VmSpec("lab1", Path("/k/vmlinuz"), Path("/i.img"), 40022, tmp_path, 128, "console=ttyS0", False)
    argv = spec.argv()
    assert argv[argv.index("-accel") + 1].startswith("tcg,thread=multi")
    assert argv[argv.index("-cpu") + 1].startswith("qemu64")
    assert "-enable-kvm" not in argv and "kvm" not in argv[argv.index("-accel") + 1]
    assert "user,id=n0,hostfwd=tcp:127.0.0.1:40022-:22" in argv
    assert f"file:{tmp_path / 'console.log'}" in argv
    assert argv[argv.index("-m") + 1] == "128"


def _state(tmp_path: Path) -> LabState:
    vms = [vmmod.VmProcess("lab1", 1, 1, 40001, str(tmp_path / "vms/lab1"), host_key="ssh-ed25519 AAAA1"),
           vmmod.VmProcess("lab2", 2, 2, 40002, str(tmp_path / "vms/lab2"), sig_enforce=True,
                           host_key="ssh-ed25519 AAAA2")]
    return LabState(tmp_path, {"release": headers_release()}, vms, str(tmp_path / "id_ed25519"),
                    str(tmp_path / "known_hosts"), str(tmp_path / "inventory.yml"))


def test_inventory_is_read_by_ansible_itself(tmp_path):
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    st = _state(tmp_path)
    inv = tmp_path / "inventory.yml"
    inv.write_text(render_inventory(st))
    im = InventoryManager(loader=DataLoader(), sources=[str(inv)])
    assert sorted(h.name for h in im.get_hosts("lab")) == ["lab1", "lab2"]
    hv = im.get_host("lab2").vars
    assert (hv["ansible_host"], hv["ansible_port"], hv["ansible_user"]) == ("127.0.0.1", 40002, "root")
    assert hv["ansible_ssh_private_key_file"] == str(tmp_path / "id_ed25519")
    assert hv["kpipe_known_hosts"] == str(tmp_path / "known_hosts")
    assert "StrictHostKeyChecking=yes" in hv["ansible_ssh_common_args"]


def test_cpio_archives_unpack_with_gnu_cpio(tmp_path):
    key = tmp_path / "hostkey"
    pub = initramfs.make_host_key(key)
    assert pub.startswith("ssh-ed25519 ")
    assert initramfs.make_host_key(key) == pub  # created once
    other = initramfs.make_host_key(tmp_path / "other")
    assert other != pub  # one distinct host key per VM
    archive = tmp_path / "vm.cpio.gz"
    archive.write_bytes(initramfs.vm_overlay(key, "ssh-ed25519 AAAAclient", "lab7"))
    out = tmp_path / "x"
    out.mkdir()
    r = subprocess.run(f"zcat {archive} | cpio -idm --quiet --no-absolute-filenames", shell=True, cwd=out,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "etc/hostname").read_text() == "lab7\n"
    assert (out / "root/.ssh/authorized_keys").read_text() == "ssh-ed25519 AAAAclient\n"
    assert (out / "etc/dropbear/dropbear_ed25519_host_key").stat().st_mode & 0o777 == 0o600
    assert (out / "root/.ssh").stat().st_mode & 0o777 == 0o700


def test_client_key_is_generated_once_and_private(tmp_path):
    pub = initramfs.make_client_key(tmp_path / "id_ed25519")
    assert pub.startswith("ssh-ed25519 ")
    assert (tmp_path / "id_ed25519").stat().st_mode & 0o777 == 0o600
    assert initramfs.make_client_key(tmp_path / "id_ed25519") == pub
    import paramiko

    assert paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "id_ed25519")).get_base64() == pub.split()[1]


def test_stop_never_signals_a_process_that_is_not_the_recorded_qemu(tmp_path):
    p = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        st = vmmod.proc_start_time(p.pid)
        # same PID and start time but not a qemu (a reused PID): untouched
        assert not vmmod.stop(vmmod.VmProcess("x", p.pid, st, 1, str(tmp_path)))
        # a stale start time: untouched
        assert not vmmod.stop(vmmod.VmProcess("x", p.pid, st - 1, 1, "sleep"))
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def test_down_without_a_lab_and_with_dead_vms(tmp_path):
    lab = Lab(tmp_path / ".lab")
    assert lab.down() == []
    assert lab.status() == {"running": False, "folder": str(tmp_path / ".lab"), "vms": []}
    lab.folder.mkdir()
    st = _state(lab.folder)
    st.vms[0].pid = 2 ** 22 + 7  # beyond pid_max defaults: certainly not running
    st.vms[1].pid = 2 ** 22 + 8
    lab._save(st)
    assert [v["alive"] for v in lab.status()["vms"]] == [False, False]
    assert lab.down() == []
    assert not lab.state_file.exists()


def test_user_kernel_accepts_a_modules_folder_or_a_tree_holding_one(tmp_path):
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(b"k")
    mods = tmp_path / "tree" / "lib" / "modules" / "5.10.0-136.12.0.86.oe2203sp1.x86_64"
    mods.mkdir(parents=True)
    (mods / "modules.order").write_text("")
    for given in (mods, tmp_path / "tree"):
        k = labkernel.resolve_kernel(None, vmlinuz, given)
        assert (k.release, k.modules_dir, k.source) == ("5.10.0-136.12.0.86.oe2203sp1.x86_64", mods, "user")
    with pytest.raises(ConfigError, match="--modules"):
        labkernel.resolve_kernel(None, vmlinuz, None)
    with pytest.raises(ConfigError, match="not a modules folder"):
        labkernel.resolve_kernel(None, vmlinuz, tmp_path)
    with pytest.raises(ConfigError, match="invalid kernel release"):
        labkernel.fetch_debian_kernel("../../etc", tmp_path)


def test_bad_sig_enforce_vm_names_are_refused(tmp_path):
    lab = Lab(tmp_path / ".lab")
    image = labkernel.KernelImage("6.1.0-0-amd64", tmp_path / "vmlinuz", tmp_path)
    with pytest.raises(ConfigError, match="lab9"):
        lab.up(image, LabConfig(vms=2, sig_enforce_vms=("lab9",)))


# ------------------------------------------------------------------ real VMs

@pytest.mark.vm
def test_lab_vms_answer_ssh_with_strict_distinct_host_keys(shared_lab: SharedLab):
    lab, st = shared_lab.lab, shared_lab.state
    status = json.loads(kpipe_cli(shared_lab.workspace, "lab", "status", "--json").stdout)
    assert [(v["name"], v["alive"], v["sig_enforce"]) for v in status["vms"]] == [("lab1", True, False),
                                                                                  ("lab2", True, True)]
    keys = Path(st.known_hosts).read_text().splitlines()
    assert len(keys) == 2 and len({k.split()[2] for k in keys}) == 2
    assert all(k.startswith(f"[127.0.0.1]:{v.ssh_port} ssh-ed25519 ") for k, v in zip(keys, st.vms, strict=True))
    with lab.pool(st) as pool:
        out = pool.run_many(lab.targets(st), lambda t: t.run(Command.of("cat", "/proc/cmdline")).stdout)
    assert "kpipe.lab=lab1" in out["lab1"] and "module.sig_enforce=1" not in out["lab1"]
    assert "kpipe.lab=lab2" in out["lab2"] and "module.sig_enforce=1" in out["lab2"]


@pytest.mark.vm
def test_a_vm_presenting_another_vms_key_is_refused(shared_lab: SharedLab, tmp_path):
    from kpipe.host import Host
    from kpipe.transport.ssh import SshPool

    st = shared_lab.state
    lab1, lab2 = st.vms
    wrong = tmp_path / "known_hosts"  # lab2's key recorded for lab1's port
    wrong.write_text(f"[127.0.0.1]:{lab1.ssh_port} {lab2.host_key}\n")
    target = Host("lab1", "127.0.0.1", lab1.ssh_port, "root", st.identity_file, False, str(wrong), 10.0)
    with SshPool(known_hosts=[wrong]) as pool, pytest.raises(TransportError) as e:
        pool.transport(target).run(Command.of("true"))
    assert e.value.kind == "hostkey" and "MISMATCH" in str(e.value)


@pytest.mark.vm
def test_lab_ssh_and_ansible_reach_the_vms(shared_lab: SharedLab):
    r = kpipe_cli(shared_lab.workspace, "lab", "ssh", "lab1", "--", "cat", "/proc/cmdline")
    assert r.returncode == 0, r.stderr
    assert "kpipe.lab=lab1" in r.stdout
    r = kpipe_cli(shared_lab.workspace, "lab", "ssh", "lab9", "--", "true")
    assert r.returncode == 4 and "no lab VM named 'lab9'" in r.stderr
    # Ansible reads the inventory and connects with strict host keys (raw: the guest has no Python)
    env = dict(os.environ, ANSIBLE_HOST_KEY_CHECKING="True", ANSIBLE_NOCOLOR="1")
    r = subprocess.run(["ansible", "-i", shared_lab.state.inventory, "lab", "-m", "raw", "-a", "uname -r"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(shared_lab.state.kernel["release"]) == 2


@pytest.mark.vm
def test_fleet_inventory_includes_the_lab(shared_lab: SharedLab):
    from kpipe.fleet.inventory import load_inventory
    from kpipe.workspace import open_workspace

    inv = load_inventory(open_workspace(str(shared_lab.workspace)))
    hosts = {h.name: h for h in inv.select("lab")}
    assert sorted(hosts) == ["lab1", "lab2"]
    assert hosts["lab1"].port == shared_lab.state.vms[0].ssh_port
    assert hosts["lab1"].known_hosts == shared_lab.state.known_hosts


@pytest.mark.vm
def test_second_lab_up_is_refused_while_running(shared_lab: SharedLab):
    r = kpipe_cli(shared_lab.workspace, "lab", "up", "--vms", "1")
    assert r.returncode == 4, r.stderr
    assert "already running" in r.stderr


@pytest.mark.vm
def test_lab_up_reuses_the_cache_and_down_stops_exactly_its_qemu(tmp_path, qemu_guard):
    image = labkernel.resolve_kernel(None, None, None)
    lab = Lab(tmp_path / ".lab", prefix="solo")
    base = initramfs.build_base(image, lab.cache_dir)
    mtime = base.stat().st_mtime_ns
    try:
        st = lab.up(image, LabConfig(vms=1, memory_mb=192, append="kpipe.test=1"))
        remember(st)
        assert initramfs.build_base(image, lab.cache_dir) == base and base.stat().st_mtime_ns == mtime
        v = st.vms[0]
        assert vmmod.is_ours(v)
        assert "kpipe.test=1" in v.append
        with lab.pool(st) as pool:
            r = pool.transport(lab.targets(st)[0]).run(Command.of("cat", "/proc/cmdline"))
        assert "kpipe.test=1" in r.stdout
    finally:
        stopped = lab.down()
    assert stopped == ["solo1"]
    assert vmmod.proc_start_time(v.pid) != v.start_time
    assert not (tmp_path / ".lab" / "state.json").exists()


def test_a_kernel_that_does_not_boot_fails_up_cleanly(tmp_path, qemu_guard):
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(b"this is not a kernel\n" * 100)
    mods = tmp_path / "lib" / "modules" / "6.1.0-0-bogus"
    mods.mkdir(parents=True)
    (mods / "modules.order").write_text("")
    image = labkernel.user_kernel(vmlinuz, mods)
    lab = Lab(tmp_path / ".lab", cache_dir=tmp_path / "cache")
    started = len(vmmod.STARTED)
    with pytest.raises(KpipeError, match="lab VM lab1 did not come up: qemu exited") as e:
        lab.up(image, LabConfig(vms=1, boot_timeout=60))
    assert "console.log" in (e.value.hint or "")
    assert not lab.state_file.exists() and lab.load_state() is None
    assert all(not vmmod.alive(v) for v in vmmod.STARTED[started:])


def test_a_forwarded_port_taken_before_qemu_binds_it_gets_a_new_port(tmp_path, qemu_guard, monkeypatch):
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    assert vmmod.listens_on(os.getpid(), busy) and not vmmod.listens_on(os.getpid(), busy + 1)
    ports = iter([busy])
    real = vmmod.free_port
    monkeypatch.setattr(vmmod, "free_port", lambda: next(ports, None) or real())  # the first VM gets a taken port
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(b"not a kernel\n")
    mods = tmp_path / "lib" / "modules" / "6.1.0-0-bogus"
    mods.mkdir(parents=True)
    (mods / "modules.order").write_text("")
    lab = Lab(tmp_path / ".lab", cache_dir=tmp_path / "cache")
    started = len(vmmod.STARTED)
    try:
        with pytest.raises(KpipeError) as e:
            lab.up(labkernel.user_kernel(vmlinuz, mods), LabConfig(vms=1, boot_timeout=60))
    finally:
        holder.close()
    ours = vmmod.STARTED[started:]
    assert [v.ssh_port == busy for v in ours] == [True, False]  # restarted once, on another port
    assert "host forwarding" not in str(e.value)  # it then failed for the bogus kernel, not the port
    assert all(not vmmod.alive(v) for v in ours)


@pytest.mark.slow
def test_the_debian_bzimage_is_unpacked_once_into_a_pvh_vmlinux(tmp_path):
    image = labkernel.resolve_kernel(None, None, None)
    fmt, payload = labkernel.bzimage_payload(image.vmlinuz.read_bytes())
    assert fmt in ("xz", "gzip", "zstd") and len(payload) > 1_000_000
    elf = labkernel.boot_image(image, tmp_path)
    assert elf != image.vmlinuz and elf.parent == tmp_path / "pvh"
    data = elf.read_bytes()
    assert data[:4] == b"\x7fELF" and labkernel.has_pvh_entry(data)
    mtime = elf.stat().st_mtime_ns
    assert labkernel.boot_image(image, tmp_path) == elf and elf.stat().st_mtime_ns == mtime
    assert labkernel.bzimage_payload(data) is None and not labkernel.has_pvh_entry(b"\x7fELF" + bytes(100))


@pytest.mark.parametrize("name, arch", [
    ("x86_64", X86_64), ("amd64", X86_64), ("AMD64", X86_64),
    ("aarch64", AARCH64), ("arm64", AARCH64),
])
def test_the_architecture_registry_accepts_every_spelling_of_an_arch(name, arch):
    assert lab_arch(name) is arch


def test_an_architecture_the_lab_cannot_boot_is_a_config_error():
    from kpipe.errors import ConfigError
    with pytest.raises(ConfigError, match="loongarch64"):
        lab_arch("loongarch64")


@pytest.mark.parametrize("arch, qemu, console, machine", [
    (X86_64, "qemu-system-x86_64", "ttyS0", None),
    (AARCH64, "qemu-system-aarch64", "ttyAMA0", "virt,gic-version=max"),
])
def test_the_qemu_command_line_comes_from_the_architecture(tmp_path, arch, qemu, console, machine):
    spec = vmmod.VmSpec("lab1", Path("/k/vmlinuz"), Path("/i.img"), 40022, tmp_path, 128,
                        f"console={console}", False, arch)
    argv = spec.argv()
    assert argv[0] == qemu and arch.console == console
    assert argv[argv.index("-cpu") + 1] == arch.tcg_cpu
    assert (argv[argv.index("-machine") + 1] if "-machine" in argv else None) == machine
    assert f"{arch.nic},netdev=n0,romfile=" in argv


class _SlowExecSpec:
    """A VmSpec whose "qemu" takes a moment to exec (as a loaded machine does): before the exec,
    /proc/<pid>/cmdline is still the parent's Python."""

    def __init__(self, folder: Path):
        from kpipe.lab.arch import X86_64

        self.name, self.folder, self.arch = "slow1", folder, X86_64
        self.ssh_port, self.append = 0, ""

    def argv(self) -> list[str]:
        code = ("import os, sys, time; time.sleep(0.5); "
                "os.execv('/bin/sh', ['qemu-system-x86_64', '-c', 'sleep 30; true', sys.argv[1]])")
        return [sys.executable, "-c", code, str(self.folder)]


def test_a_vm_that_is_still_starting_is_alive_not_exited(tmp_path):
    """`lab up` once reported 'qemu exited' for a VM that booted fine: alive() read the pre-exec cmdline."""
    from kpipe.lab import vm as vmmod

    v = vmmod.start(_SlowExecSpec(tmp_path / "slow1"))  # type: ignore[arg-type]
    try:
        assert vmmod.alive(v)
    finally:
        assert vmmod.stop(v)
        try:  # the stand-in's own `sleep` child, in the session start() gave it
            os.killpg(v.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
