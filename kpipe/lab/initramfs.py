"""The lab guest: a small initramfs (busybox, dropbear, kmod, virtio modules) built from host packages.

The base archive is the same for every VM of a kernel and is cached by the
hash of everything that goes into it; each VM gets a tiny second archive with
its own host key and the lab's authorized key. The kernel unpacks concatenated
gzip'd cpio archives in order, later files replacing earlier ones.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kpipe.errors import KpipeError
from kpipe.lab.kernel import KernelImage
from kpipe.lab.userland import Userland, host_userland

FORMAT_VERSION = "3"

BUSYBOX = "/bin/busybox"
DROPBEAR = "/usr/sbin/dropbear"
SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/lib/sftp-server")
SFTP_SERVER_TARGET = "/usr/lib/sftp-server"  # where Debian's dropbear looks (SFTPSERVER_PATH)
KMOD = "/usr/bin/kmod"
KMOD_LINKS = ("insmod", "rmmod", "lsmod", "modprobe", "depmod", "modinfo")

# virtio-net and its dependencies (lab.md); modules the kernel has built in are skipped.
VIRTIO_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
                  "failover", "net_failover", "virtio_net")

# `--rootfs`: the disk, its file system and the checksum ext4 asks the crypto API for at mount time.
ROOTFS_MODULES = ("virtio_blk", "crc16", "mbcache", "jbd2", "crc32c_generic", "ext4")

READY_LINE = "KPIPE-LAB-READY"

INIT_SCRIPT = r"""#!/bin/sh
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /var/lib/kpatch /var/log /run/dropbear
[ -f /etc/hostname ] && hostname "$(cat /etc/hostname)"
for m in virtio_pci virtio_net; do /sbin/modprobe "$m" 2>/dev/null; done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
/usr/sbin/dropbear -s -r /etc/dropbear/dropbear_ed25519_host_key -p 22 -P /run/dropbear.pid
echo "KPIPE-LAB-READY $(hostname) $(cat /proc/sys/kernel/osrelease)" > /dev/console
while :; do sleep 3600; done
"""

# `--rootfs`: mount the VM's disk, copy in its own host key, the lab's client key and the hostname (the image
# holds none of them), then hand PID 1 to systemd. A disk that does not mount powers the VM off: `lab up`
# then reports "qemu exited" with this console line instead of waiting for its timeout.
ROOTFS_INIT_SCRIPT = r"""#!/bin/sh
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in virtio_pci virtio_net virtio_blk crc32c_generic ext4; do /sbin/modprobe "$m" 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
# the address survives switch_root: systemd needs no network daemon (and no minutes of TCG time for one)
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
mkdir -p /newroot
if ! mount -t ext4 -o rw /dev/vda /newroot; then
  echo "KPIPE-LAB-ROOTFS-FAILED: cannot mount /dev/vda as ext4" > /dev/console
  poweroff -f
fi
mkdir -p /newroot/root/.ssh /newroot/etc/ssh
chmod 700 /newroot/root/.ssh
cp /kpipe/authorized_keys /newroot/root/.ssh/authorized_keys
cp /kpipe/ssh_host_ed25519_key /newroot/etc/ssh/ssh_host_ed25519_key
cp /kpipe/ssh_host_ed25519_key.pub /newroot/etc/ssh/ssh_host_ed25519_key.pub
chmod 600 /newroot/root/.ssh/authorized_keys /newroot/etc/ssh/ssh_host_ed25519_key
cp /etc/hostname /newroot/etc/hostname
mount --move /dev /newroot/dev
mount --move /sys /newroot/sys
mount --move /proc /newroot/proc
exec switch_root /newroot /sbin/init
"""

PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
SHADOW = "root:*:19000:0:99999:7:::\n"  # no password; key login works with dropbear and OpenSSH
GROUP = "root:x:0:\n"


@dataclass
class _Entry:
    path: str  # inside the archive, no leading slash
    mode: int
    data: bytes = b""
    link: str = ""


class _Tree:
    """An in-memory file tree written as a newc cpio archive (owner root, fixed mtime)."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}

    def dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        parts = path.split("/")
        for i in range(1, len(parts)):
            p = "/".join(parts[:i])
            if p not in self.entries:
                self.entries[p] = _Entry(p, stat.S_IFDIR | 0o755)
        self.entries[path] = _Entry(path, stat.S_IFDIR | mode)

    def _parents(self, path: str) -> None:
        if "/" in path and path.rsplit("/", 1)[0] not in self.entries:
            self.dir(path.rsplit("/", 1)[0])

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = _Entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = _Entry(path, stat.S_IFLNK | 0o777, link=target)

    def copy(self, src: str | Path, dest: str, mode: int | None = None) -> None:
        p = Path(src)
        self.file(dest, p.read_bytes(), mode if mode is not None else stat.S_IMODE(p.stat().st_mode))

    def cpio(self) -> bytes:
        """The tree as a newc cpio archive (parents before children)."""
        out = io.BytesIO()
        ino = 1
        for path in sorted(self.entries, key=lambda p: (p.count("/"), p)):
            e = self.entries[path]
            body = e.link.encode() if e.link else e.data
            _write_newc(out, e.path, e.mode, body, ino)
            ino += 1
        _write_newc(out, "TRAILER!!!", 0, b"", 0)
        return out.getvalue()


def _write_newc(out: io.BytesIO, name: str, mode: int, body: bytes, ino: int) -> None:
    nb = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(body), 0, 0, 0, 0, len(nb), 0)
    out.write(b"070701" + b"".join(b"%08X" % v for v in fields))
    out.write(nb)
    out.write(b"\0" * ((4 - (110 + len(nb)) % 4) % 4))
    out.write(body)
    out.write(b"\0" * ((4 - len(body) % 4) % 4))


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def _find_modules(modules_dir: Path, extra: tuple[str, ...] = ()) -> list[Path]:
    """The virtio module files (and `extra` ones) present in modules_dir (any compression)."""
    wanted = set(VIRTIO_MODULES) | set(extra)
    found: dict[str, Path] = {}
    for root, _dirs, files in os.walk(modules_dir / "kernel"):
        for f in files:
            m = re.match(r"^(.*)\.ko(\.xz|\.zst|\.gz)?$", f)
            if m and m.group(1).replace("-", "_") in wanted:
                found.setdefault(m.group(1), Path(root) / f)
    return sorted(found.values())


def _inputs(kernel: KernelImage, rootfs: bool = False, userland: Userland | None = None) -> list[tuple[str, Path]]:
    files = (userland or host_userland()).files()
    for mod in _find_modules(kernel.modules_dir, ROOTFS_MODULES if rootfs else ()):
        files.append(("module", mod))
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (kernel.modules_dir / name).is_file():
            files.append(("modmeta", kernel.modules_dir / name))
    return files


def base_digest(kernel: KernelImage, rootfs: bool = False, userland: Userland | None = None) -> str:
    """The cache key of the base initramfs: sha256 over every input file and the init script."""
    h = hashlib.sha256()
    h.update(f"kpipe-lab-initramfs {FORMAT_VERSION} {kernel.release}\n".encode())
    h.update((ROOTFS_INIT_SCRIPT if rootfs else INIT_SCRIPT).encode())
    for kind, path in _inputs(kernel, rootfs, userland):
        h.update(f"{kind} {path}\n".encode())
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def _busybox_applets(busybox: Path | str = BUSYBOX, *, native: bool = True) -> list[str]:
    """busybox's applet names: `busybox --list` for the host's own, else read from the binary's name table."""
    if native:
        r = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=False)
        return [a for a in r.stdout.split() if a and "/" not in a]
    return applets_in_binary(Path(busybox).read_bytes())


def applets_in_binary(data: bytes) -> list[str]:
    """The applet names busybox keeps as one NUL-separated, sorted table starting "[", "[[" (any arch)."""
    i = data.find(b"[\0[[\0")
    if i < 0:
        raise KpipeError("busybox: no applet table found in the binary", hint="is it Debian's busybox-static?")
    out: list[str] = []
    for raw in data[i:i + 65536].split(b"\0"):
        if not raw or not re.fullmatch(rb"[\[a-z0-9_.-]{1,40}", raw):
            break
        out.append(raw.decode())
    return out


def build_base(kernel: KernelImage, cache_dir: Path, rootfs: bool = False,
               userland: Userland | None = None) -> Path:
    """The base initramfs for `kernel` (gzip'd newc cpio), built once per content digest.

    rootfs: the variant that mounts the VM's disk and switch_roots into its systemd (`--rootfs`).
    userland: the guest programs (default: the host's; kpipe.lab.userland fetches another arch's).
    """
    ul = userland or host_userland()
    digest = base_digest(kernel, rootfs, ul)
    name = "rootfs" if rootfs else "base"
    out = cache_dir / "initramfs" / f"{name}-{kernel.release}-{digest[:16]}.cpio.gz"
    if out.is_file():
        return out
    tree = _Tree()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "usr/lib", "lib", "lib64", "etc/dropbear", "proc", "sys",
              "dev", "tmp", "run", "var/lib/kpatch", "var/log", "mnt"):
        tree.dir(d)
    tree.dir("root", 0o700)
    tree.dir("root/.ssh", 0o700)
    tree.dir("tmp", 0o1777)
    tree.symlink("var/run", "/run")
    tree.copy(ul.busybox, "bin/busybox", 0o755)
    kmod_links = set(KMOD_LINKS)
    for applet in _busybox_applets(ul.busybox, native=ul.source == "host"):
        if applet in kmod_links or applet in ("busybox",):
            continue
        tree.symlink(f"bin/{applet}", "busybox")
    tree.copy(ul.dropbear, "usr/sbin/dropbear", 0o755)
    tree.copy(ul.sftp_server, SFTP_SERVER_TARGET.lstrip("/"), 0o755)
    tree.copy(ul.kmod, "bin/kmod", 0o755)
    for link in KMOD_LINKS:  # in /bin too: dropbear's session PATH is /usr/bin:/bin
        tree.symlink(f"sbin/{link}", "/bin/kmod")
        tree.symlink(f"bin/{link}", "kmod")
    for dest, real in ul.libs:
        tree.file(dest, real.read_bytes(), 0o755)
    tree.file("etc/passwd", PASSWD.encode())
    tree.file("etc/group", GROUP.encode())
    tree.file("etc/shadow", SHADOW.encode(), 0o600)
    tree.file("etc/shells", b"/bin/sh\n")
    tree.file("etc/hosts", b"127.0.0.1 localhost\n")
    tree.file("init", (ROOTFS_INIT_SCRIPT if rootfs else INIT_SCRIPT).encode(), 0o755)
    if rootfs:
        tree.dir("newroot")
    _add_modules(tree, kernel, ROOTFS_MODULES if rootfs else ())
    data = _gzip(tree.cpio())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return out


def _add_modules(tree: _Tree, kernel: KernelImage, extra: tuple[str, ...] = ()) -> None:
    """Copy the virtio modules and index them with depmod -b (at build time, not in the guest)."""
    rel = kernel.release
    with tempfile.TemporaryDirectory(prefix="kpipe-lab-mods-") as tmp:
        root = Path(tmp)
        mdir = root / "lib" / "modules" / rel
        mdir.mkdir(parents=True)
        for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            src = kernel.modules_dir / name
            if src.is_file():
                shutil.copy2(src, mdir / name)
        for mod in _find_modules(kernel.modules_dir, extra):
            dest = mdir / mod.relative_to(kernel.modules_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(mod, dest)
        r = subprocess.run(["depmod", "-b", str(root), rel], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise KpipeError(f"depmod -b for {rel} failed: {r.stderr.strip()}")
        for path in sorted(root.rglob("*")):
            arc = str(path.relative_to(root))
            if path.is_dir():
                tree.dir(arc)
            elif path.is_file():
                tree.file(arc, path.read_bytes(), 0o644)


def vm_overlay(host_key: Path, authorized_key: str, hostname: str) -> bytes:
    """The per-VM archive (gzip'd cpio): its dropbear host key, the lab's client key, its hostname."""
    tree = _Tree()
    tree.dir("etc/dropbear")
    tree.dir("root", 0o700)
    tree.dir("root/.ssh", 0o700)
    tree.file("etc/dropbear/dropbear_ed25519_host_key", host_key.read_bytes(), 0o600)
    tree.file("root/.ssh/authorized_keys", authorized_key.strip().encode() + b"\n", 0o600)
    tree.file("etc/hostname", hostname.encode() + b"\n")
    return _gzip(tree.cpio())


def rootfs_overlay(host_key: Path, host_pub: str, authorized_key: str, hostname: str) -> bytes:
    """The per-VM archive of a `--rootfs` VM: its OpenSSH host key pair, the lab's client key, its hostname."""
    tree = _Tree()
    tree.dir("kpipe", 0o700)
    tree.file("kpipe/ssh_host_ed25519_key", host_key.read_bytes(), 0o600)
    tree.file("kpipe/ssh_host_ed25519_key.pub", f"{host_pub} root@{hostname}\n".encode())
    tree.file("kpipe/authorized_keys", authorized_key.strip().encode() + b"\n", 0o600)
    tree.file("etc/hostname", hostname.encode() + b"\n")
    return _gzip(tree.cpio())


def make_host_key(path: Path) -> str:
    """A dropbear ed25519 host key at `path` (created once); returns its OpenSSH public key line."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(path)], capture_output=True, text=True,
                           check=False)
        if r.returncode != 0:
            raise KpipeError(f"dropbearkey failed: {r.stderr.strip()}", hint="install Debian's dropbear-bin")
    r = subprocess.run(["dropbearkey", "-y", "-f", str(path)], capture_output=True, text=True, check=False)
    for line in r.stdout.splitlines():
        if line.startswith("ssh-ed25519 "):
            return " ".join(line.split()[:2])
    raise KpipeError(f"cannot read the public half of {path}: {r.stderr.strip()}")


def make_client_key(path: Path) -> str:
    """The lab's client key (OpenSSH ed25519, created once); returns its public key line."""
    if not path.is_file():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        Path(str(path) + ".pub").write_bytes(pub + b" kpipe-lab\n")
    pub_file = Path(str(path) + ".pub")
    if not pub_file.is_file():  # derive it again from the private key
        from cryptography.hazmat.primitives import serialization

        loaded = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        pub_file.write_bytes(loaded.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                           serialization.PublicFormat.OpenSSH) + b" kpipe-lab\n")
    return " ".join(pub_file.read_text().split()[:2])
