"""A real Debian userland for lab VMs (`kpipe lab up --rootfs debian`).

mmdebstrap builds a bookworm userland (systemd as init, OpenSSH, Python 3) into
a raw ext4 image, once per input set, cached under the lab cache keyed by the
suite, the package list, the mirror, this module's FORMAT_VERSION and the lab
kernel's modules (which are copied in, as on a real host). Every VM boots a
qcow2 overlay of that image, so VMs never share writes. The lab's busybox
initramfs mounts the disk and switch_roots into systemd after copying in the
VM's own SSH host key, the lab's client key and the hostname: the image itself
holds no host key.

The mirror comes from the host's apt sources (read only, never changed).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kpipe.errors import ConfigError, KpipeError
from kpipe.lab.kernel import KernelImage

FORMAT_VERSION = "2"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
NICE = 10
IMAGE_SIZE = "3G"  # sparse: the file holds only what is written
PACKAGES = ("systemd-sysv", "openssh-server", "python3", "kmod", "iproute2", "udev", "ca-certificates", "procps")
SELINUX_PACKAGES = ("selinux-policy-default", "selinux-basics", "policycoreutils", "auditd")
# Module folders copied from the lab kernel: the root disk, file systems and the virtio NIC need these.
MODULE_DIRS = ("kernel/fs", "kernel/lib", "kernel/crypto", "kernel/drivers/block", "kernel/drivers/virtio",
               "kernel/drivers/net/virtio_net.ko", "kernel/drivers/net/net_failover.ko", "kernel/net/core")
ROOT_DEVICE = "/dev/vda"
MIN_MEMORY_MB = 512
READY_UNIT = "kpipe-lab-ready.service"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RootfsKind:
    """One `--rootfs` choice: its name, extra packages and the kernel arguments it boots with."""

    name: str
    packages: tuple[str, ...]
    append: tuple[str, ...] = ()
    selinux: bool = False


KINDS: dict[str, RootfsKind] = {
    "debian": RootfsKind("debian", PACKAGES, ("net.ifnames=0",)),
    "debian-selinux": RootfsKind("debian-selinux", PACKAGES + SELINUX_PACKAGES,
                                 ("net.ifnames=0", "security=selinux", "selinux=1", "enforcing=0"), selinux=True),
}


def kind_of(name: str) -> RootfsKind:
    """The RootfsKind named by `--rootfs`; ConfigError for an unknown one."""
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"--rootfs {name!r} is not a known userland",
                          hint=f"choose one of: busybox (the default), {', '.join(KINDS)}") from None


# --------------------------------------------------------------------------- files written into the image

# No root line: kpipe's initramfs mounts it read-write, and a line would make boot wait for udev's dev-vda.device
# (minutes under TCG on a loaded machine).
FSTAB = f"# {ROOT_DEVICE} (ext4) is mounted read-write by kpipe's lab initramfs before systemd starts\n"
SSHD_CONFIG = """# written by kpipe's lab image: the VM's own key comes from the initramfs at every boot
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
"""
READY_SERVICE = """[Unit]
Description=Tell kpipe the lab VM is ready (a line on the serial console)
After=ssh.service
Wants=ssh.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "KPIPE-LAB-READY $(hostname) $(uname -r)" > /dev/console'
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""
SELINUX_CONFIG = "SELINUX=permissive\nSELINUXTYPE=default\n"


def host_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The first Debian archive URI of the host's apt sources (deb822 or one-line), else deb.debian.org."""
    files = [sources_dir / "sources.list", *sorted((sources_dir / "sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^\s*URIs:\s*(\S+)", text, re.M):
            if "security" not in m.group(1):
                return m.group(1).rstrip("/")
        for m in re.finditer(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if "security" not in m.group(1):
                return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


def _modules_digest(kernel: KernelImage) -> str:
    """A digest of the copied module files' names and sizes (cheap; a new ABI changes it)."""
    h = hashlib.sha256(kernel.release.encode())
    for rel in MODULE_DIRS:
        p = kernel.modules_dir / rel
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(f"{f.relative_to(kernel.modules_dir)} {f.stat().st_size}\n".encode())
    return h.hexdigest()


def image_inputs(kind: RootfsKind, kernel: KernelImage, mirror: str) -> dict[str, object]:
    """What an image is made from: its cache key's inputs."""
    return {"format": FORMAT_VERSION, "kind": kind.name, "suite": SUITE, "mirror": mirror, "variant": "minbase",
            "packages": sorted(kind.packages), "kernel": kernel.release, "modules": _modules_digest(kernel),
            "files": hashlib.sha256((FSTAB + SSHD_CONFIG + READY_SERVICE + SELINUX_CONFIG).encode()).hexdigest()}


def image_key(inputs: dict[str, object]) -> str:
    """The sha256 of the inputs (the image file's name carries its first 16 hex digits)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def mmdebstrap_argv(kind: RootfsKind, target: Path, mirror: str) -> list[str]:
    """The mmdebstrap command line (minbase; the packages a real host has for kpipe and Ansible)."""
    return ["mmdebstrap", "--mode=root", "--variant=minbase", "--components=main",
            "--include=" + ",".join(kind.packages), "--dpkgopt=path-exclude=/usr/share/{doc,man,locale}/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright", SUITE, str(target), mirror]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _run(argv: list[str], *, log: Path, what: str, timeout: float = 3600) -> None:
    try:
        with open(log, "ab") as out:
            r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               timeout=timeout, check=False)
    except FileNotFoundError:
        raise KpipeError(f"{argv[0]} is not installed",
                         hint="the lab's Debian userland needs mmdebstrap, e2fsprogs and qemu-utils") from None
    except subprocess.TimeoutExpired:
        raise KpipeError(f"{what} took longer than {timeout:g} s", hint=f"see {log}") from None
    if r.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise KpipeError(f"{what} failed (exit {r.returncode}): {tail}", hint=f"see {log}")


def _copy_modules(kernel: KernelImage, root: Path, log: Path) -> None:
    """The lab kernel's modules for disks, file systems and the NIC, indexed with depmod -b."""
    dest = root / "lib" / "modules" / kernel.release
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (kernel.modules_dir / name).is_file():
            shutil.copy2(kernel.modules_dir / name, dest / name)
    for rel in MODULE_DIRS:
        src = kernel.modules_dir / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, dirs_exist_ok=True)
        elif src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    _run(["depmod", "-b", str(root), kernel.release], log=log, what=f"depmod -b for {kernel.release}")


def _customize(kind: RootfsKind, kernel: KernelImage, root: Path, log: Path) -> None:
    """Make the userland a lab host: fstab, networkd, sshd without host keys, the ready unit, modules."""
    (root / "etc" / "fstab").write_text(FSTAB)
    (root / "etc" / "hostname").write_text("lab\n")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc" / "resolv.conf").unlink(missing_ok=True)
    (root / "etc" / "resolv.conf").write_text("nameserver 10.0.2.3\n")
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()  # each VM gets its own from the initramfs: an image key would be shared by every VM
    conf = root / "etc" / "ssh" / "sshd_config.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "kpipe-lab.conf").write_text(SSHD_CONFIG)
    units = root / "etc" / "systemd" / "system"
    (units / READY_UNIT).write_text(READY_SERVICE)
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit, target in ((READY_UNIT, f"/etc/systemd/system/{READY_UNIT}"),):
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(target)
    # Boot time on a 2-CPU TCG machine: the initramfs configures eth0 (the address survives switch_root), so
    # no network daemon; udevd runs but the coldplug trigger (a minute of CPU) and timers/scrubbers are off.
    for masked in ("systemd-networkd.service", "systemd-networkd-wait-online.service", "apt-daily.timer",
                   "apt-daily-upgrade.timer", "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer",
                   "systemd-timesyncd.service", "getty@tty1.service", "getty-static.service",
                   "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "systemd-udev-trigger.service"):
        m = units / masked
        if m.exists() or m.is_symlink():
            m.unlink()
        m.symlink_to("/dev/null")
    root_ssh = root / "root" / ".ssh"
    root_ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / "var" / "lib" / "kpatch").mkdir(parents=True, exist_ok=True)
    (root / "var" / "log" / "journal").mkdir(parents=True, exist_ok=True)  # persistent journald
    _copy_modules(kernel, root, log)
    if kind.selinux:
        (root / "etc" / "selinux" / "config").write_text(SELINUX_CONFIG)
        fc = root / "etc" / "selinux" / "default" / "contexts" / "files" / "file_contexts"
        if not fc.is_file():
            raise KpipeError(f"{fc} is missing after mmdebstrap", hint=f"see {log}")
        _label_tree(root, log)


def _label_tree(root: Path, log: Path, batch: int = 400) -> None:
    """Write every file's SELinux label (the policy's file_contexts, asked with matchpathcon in the chroot) as its
    security.selinux xattr, which mkfs.ext4 -d copies into the image: no relabelling boot. setfiles itself
    cannot be used here: on a host without SELinux it fails on every file."""
    paths = ["/"]
    for dirpath, dirnames, filenames in os.walk(root):
        rel = "/" + os.path.relpath(dirpath, root) if dirpath != str(root) else ""
        for name in dirnames + filenames:
            paths.append(f"{rel}/{name}")
    labelled = 0
    for i in range(0, len(paths), batch):
        chunk = [p for p in paths[i:i + batch] if "\n" not in p and "\t" not in p]
        r = subprocess.run(["chroot", str(root), "matchpathcon", *chunk], capture_output=True, text=True,
                           check=False, timeout=600)
        for line in r.stdout.splitlines():
            path, sep, ctx = line.rpartition("\t")
            if not sep or ":" not in ctx:
                continue  # <<none>>: the policy gives no label
            os.setxattr(str(root) + path if path != "/" else str(root), "security.selinux", ctx.encode() + b"\0",
                        follow_symlinks=False)
            labelled += 1
    with open(log, "a") as f:
        f.write(f"kpipe: labelled {labelled} of {len(paths)} files (matchpathcon, security.selinux)\n")
    if labelled < len(paths) // 2:
        raise KpipeError(f"SELinux labelling of the image labelled only {labelled} of {len(paths)} files",
                         hint=f"see {log}")


def _mkfs_argv(src: Path, image: Path) -> list[str]:
    return ["mkfs.ext4", "-q", "-F", "-L", "kpipe-root", "-E", "root_owner=0:0", "-d", str(src), str(image),
            IMAGE_SIZE]


def ensure_image(kind: RootfsKind, kernel: KernelImage, cache_dir: Path, progress: Progress | None = None) -> Path:
    """The raw ext4 image of `kind` for `kernel`, built once (niced, as root) and cached by its inputs."""
    say = progress or (lambda _m: None)
    mirror = host_mirror()
    inputs = image_inputs(kind, kernel, mirror)
    key = image_key(inputs)
    folder = cache_dir / "rootfs"
    image = folder / f"{kind.name}-{SUITE}-{kernel.release}-{key[:16]}.img"
    meta = image.with_suffix(".json")
    if image.is_file() and meta.is_file():
        return image
    if os.geteuid() != 0:
        raise KpipeError("building the lab's Debian image needs root (mmdebstrap --mode=root, chroot)",
                         hint="run `kpipe lab up --rootfs ...` once as root, or in a root container")
    with _locked(folder / f".{image.name}.lock"):
        if image.is_file() and meta.is_file():
            return image
        log = folder / f"{image.stem}.log"
        log.write_bytes(b"")
        say(f"building the {kind.name} image ({SUITE}, {len(kind.packages)} packages, mirror {mirror}); "
            f"once per input set, log {log}")
        t0 = time.monotonic()
        # The userland (the slow part) is kept until the image exists: a failed later step does not redo it.
        stage = folder / f".stage-{key[:16]}"
        root = stage / "root"
        if not (stage / "mmdebstrap.done").is_file():
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
            _run(["nice", "-n", str(NICE), *mmdebstrap_argv(kind, root, mirror)], log=log,
                 what=f"mmdebstrap {SUITE} ({kind.name})")
            (stage / "mmdebstrap.done").write_text("")
        _customize(kind, kernel, root, log)
        part = stage / "image.raw"
        part.unlink(missing_ok=True)
        _run(["nice", "-n", str(NICE), *_mkfs_argv(root, part)], log=log, what="mkfs.ext4 -d")
        os.replace(part, image)
        shutil.rmtree(stage, ignore_errors=True)
        inputs["seconds"] = round(time.monotonic() - t0, 1)
        meta.write_text(json.dumps(inputs, indent=2) + "\n")
        say(f"{kind.name} image ready in {inputs['seconds']:.0f} s: {image}")
    return image


def make_overlay(base: Path, overlay: Path) -> None:
    """A fresh qcow2 overlay of the base image for one VM (its writes never reach the base)."""
    overlay.parent.mkdir(parents=True, exist_ok=True)
    overlay.unlink(missing_ok=True)
    try:
        r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(overlay)],
                           capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise KpipeError("qemu-img is not installed", hint="install Debian's qemu-utils package") from None
    if r.returncode != 0:
        raise KpipeError(f"qemu-img create {overlay} failed: {r.stderr.strip()}")


def make_openssh_host_key(path: Path) -> str:
    """An OpenSSH ed25519 host key at `path` (created once); returns its public key line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    loaded = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    pub = loaded.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return " ".join(pub.decode().split()[:2])
