"""`kpipe lab up --rootfs debian|debian-selinux`: a real Debian userland (systemd, OpenSSH, Python 3) on the lab
kernel, `kpipe lab reboot`, the Ansible executor against it, and SELinux labels of staged modules.

The pure tests check the image's inputs and the qemu command line; the `vm` tests boot real VMs (one
per userland for the whole session: the `debian_lab` / `selinux_lab` fixtures in conftest.py).
"""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pytest

from kpipe.errors import ConfigError
from kpipe.lab import initramfs, rootfs
from kpipe.lab.lab import Lab
from kpipe.lab.vm import VmSpec
from rootfs_lab import MODULE, TEXT, kp

# -- pure ----------------------------------------------------------------------------------------------------------


def test_mirror_comes_from_the_hosts_apt_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\nComponents: main\n")
    assert rootfs.host_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("# one-line format\n"
                                           "deb [arch=amd64] http://old.example/debian bookworm main\n")
    assert rootfs.host_mirror(tmp_path) == "http://old.example/debian"
    assert rootfs.host_mirror(tmp_path / "missing") == rootfs.DEFAULT_MIRROR


def test_mmdebstrap_argv_and_the_image_key():
    kind = rootfs.kind_of("debian")
    argv = rootfs.mmdebstrap_argv(kind, Path("/t/root"), "http://m/debian")
    assert argv[:4] == ["mmdebstrap", "--mode=root", "--variant=minbase", "--components=main"]
    assert argv[-3:] == ["bookworm", "/t/root", "http://m/debian"]
    included = next(a for a in argv if a.startswith("--include=")).split("=", 1)[1].split(",")
    assert {"systemd-sysv", "openssh-server", "python3", "kmod", "iproute2", "udev"} <= set(included)
    sel = rootfs.kind_of("debian-selinux")
    assert {"selinux-policy-default", "selinux-basics"} <= set(sel.packages) and sel.selinux
    assert {"security=selinux", "selinux=1"} <= set(sel.append)


def test_unknown_rootfs_is_one_clear_error():
    with pytest.raises(ConfigError) as e:
        rootfs.kind_of("ubuntu")
    assert "--rootfs 'ubuntu' is not a known userland" in str(e.value)
    assert "debian-selinux" in (e.value.hint or "")


def test_qemu_gets_the_vms_overlay_as_virtio_disk_only_with_a_rootfs(tmp_path):
    spec = VmSpec("lab1", Path("/k"), Path("/i"), 2222, tmp_path)
    assert "-drive" not in spec.argv()
    spec.disk = tmp_path / "disk.qcow2"
    argv = spec.argv()
    assert argv[argv.index("-drive") + 1] == f"file={tmp_path / 'disk.qcow2'},if=virtio,format=qcow2"


def test_overlay_is_copy_on_write_over_the_base(tmp_path):
    base = tmp_path / "base.img"
    subprocess.run(["truncate", "-s", "16M", str(base)], check=True)
    rootfs.make_overlay(base, tmp_path / "vm" / "disk.qcow2")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(tmp_path / "vm" / "disk.qcow2")],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "raw"


def test_per_vm_archive_holds_its_own_openssh_host_key_and_the_client_key(tmp_path):
    pub = rootfs.make_openssh_host_key(tmp_path / "k")
    assert pub.startswith("ssh-ed25519 ") and rootfs.make_openssh_host_key(tmp_path / "k") == pub  # created once
    data = gzip.decompress(initramfs.rootfs_overlay(tmp_path / "k", pub, "ssh-ed25519 AAAAclient", "lab7"))
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True).stdout.decode()
    assert set(listing.split()) >= {"kpipe/ssh_host_ed25519_key", "kpipe/ssh_host_ed25519_key.pub",
                                    "kpipe/authorized_keys", "etc/hostname"}
    assert pub.encode() in data and b"ssh-ed25519 AAAAclient\n" in data and b"lab7\n" in data
    # the init script copies them into the disk's root before systemd starts, and switch_roots
    script = initramfs.ROOTFS_INIT_SCRIPT
    assert "/newroot/etc/ssh/ssh_host_ed25519_key" in script and "exec switch_root /newroot /sbin/init" in script


def test_reboot_without_a_lab_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no lab is running"):
        Lab(tmp_path / ".lab").reboot("lab1")


# -- real VMs ------------------------------------------------------------------------------------------------------


def on_vm(ws: Path, *cmd: str) -> str:
    return kp(ws, "lab", "ssh", "lab1", "--", *cmd, timeout=300).stdout


@pytest.mark.vm
@pytest.mark.timeout(5400)
def test_debian_vm_is_a_real_systemd_host(debian_lab):
    ws = debian_lab["ws"]
    assert on_vm(ws, "readlink", "/proc/1/exe").strip() == "/usr/lib/systemd/systemd"
    assert on_vm(ws, "systemctl", "is-active", "ssh.service", "systemd-journald.service").split() == ["active"] * 2
    assert on_vm(ws, "python3", "-c", "import sys; print(sys.version_info[0])").strip() == "3"
    assert on_vm(ws, "findmnt", "-n", "-o", "SOURCE,FSTYPE", "/").split() == ["/dev/vda", "ext4"]
    assert on_vm(ws, "uname", "-r").strip() == debian_lab["release"]
    assert on_vm(ws, "hostname").strip() == "lab1"
    assert "/var/log/journal" in on_vm(ws, "journalctl", "--header", "-n", "0")  # persistent journald
    status = json.loads(kp(ws, "lab", "status", "--json").stdout)
    assert status["running"] and status["rootfs"] == "debian"
    # the image holds no host key: the VM's own came from its initramfs and kpipe pinned it
    known = (ws / ".lab" / "known_hosts").read_text()
    assert on_vm(ws, "cat", "/etc/ssh/ssh_host_ed25519_key.pub").split()[1] in known


@pytest.mark.vm
@pytest.mark.timeout(5400)
def test_ansible_executor_rolls_out_to_a_systemd_lab_vm(debian_lab):
    ws = debian_lab["ws"]
    r = kp(ws, "rollout", "start", debian_lab["artifact"], "--engine", "ansible", "--limit", "lab1",
           "--waves", "100%", "--skip-preflight", "--yes", "--json", timeout=1800)
    summary = json.loads(r.stdout)
    assert summary["hosts"] == {"lab1": "applied"}, summary
    assert on_vm(ws, "cat", "/proc/cmdline").strip() == TEXT
    r = kp(ws, "rollout", "rollback", summary["rollout_id"], "--engine", "ansible", "--json", timeout=1800)
    assert set(json.loads(r.stdout)["hosts"].values()) == {"rolled_back"}
    assert TEXT not in on_vm(ws, "cat", "/proc/cmdline")
    assert MODULE not in on_vm(ws, "sh", "-c", "ls /sys/kernel/livepatch; true")


@pytest.mark.vm
@pytest.mark.timeout(5400)
def test_selinux_vm_labels_staged_modules_and_reports_a_host_where_it_fails(selinux_lab):
    ws = selinux_lab["ws"]
    assert on_vm(ws, "cat", "/sys/fs/selinux/enforce").strip() == "0"  # SELinux on, permissive
    assert "security=selinux" in on_vm(ws, "cat", "/proc/cmdline")
    r = kp(ws, "rollout", "start", selinux_lab["artifact"], "--limit", "lab1", "--waves", "100%",
           "--skip-preflight", "--yes", "--json", timeout=1800)
    summary = json.loads(r.stdout)
    assert summary["hosts"] == {"lab1": "applied"}, summary
    staged = f"/var/lib/kpatch/{selinux_lab['release']}/{MODULE}.ko"
    assert on_vm(ws, "ls", "-Z", staged).split()[0] == "system_u:object_r:modules_object_t:s0"
    assert on_vm(ws, "cat", "/proc/cmdline").strip() == TEXT
    kp(ws, "rollout", "rollback", summary["rollout_id"], "--json", timeout=1800)
    # a host where labelling fails (here: chcon is gone) fails its label step with the reason, not silently
    on_vm(ws, "mv", "/usr/bin/chcon", "/usr/bin/chcon.kpipe-test")
    try:
        r = kp(ws, "rollout", "start", selinux_lab["artifact"], "--limit", "lab1", "--waves", "100%",
               "--skip-preflight", "--yes", "--json", ok=(8,), timeout=1800)  # 8: the rollout halted
    finally:
        on_vm(ws, "mv", "/usr/bin/chcon.kpipe-test", "/usr/bin/chcon")
    summary = json.loads(r.stdout)
    assert summary["state"] == "halted" and summary["hosts"]["lab1"] in ("failed", "rolled_back"), summary
    # the stage's own chcon (before kpipe's label step) is the first to fail here; either way, with the reason
    reason = summary["reasons"].get("lab1", "")
    assert "chcon" in reason and "failed" in reason, summary
    assert TEXT not in on_vm(ws, "cat", "/proc/cmdline")  # never loaded
