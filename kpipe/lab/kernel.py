"""The lab's kernels: a Debian kernel image package unpacked into a cache, or a user's vmlinuz.

`apt-get download` + `dpkg-deb -x` fetch and unpack the image package without
running its initramfs/boot hooks (lab.md). The Debian ABI number moves and old
ABIs leave the registry, so the release is discovered, never hard-coded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kpipe.errors import ConfigError, KpipeError, NotFoundError

_RELEASE = re.compile(r"^[0-9][A-Za-z0-9._+~-]{2,100}$")
_DEP = re.compile(r"linux-(?:image|headers)-([0-9][A-Za-z0-9._+~-]*)")


@dataclass(frozen=True)
class KernelImage:
    """A bootable kernel: its release, the vmlinuz and the /lib/modules/<release> folder."""

    release: str
    vmlinuz: Path
    modules_dir: Path  # .../lib/modules/<release> (holds modules.order)
    source: str = ""  # "debian" or "user"

    def to_dict(self) -> dict[str, str]:
        return {"release": self.release, "vmlinuz": str(self.vmlinuz), "modules_dir": str(self.modules_dir),
                "source": self.source}


def default_cache_dir() -> Path:
    """~/.cache/kpipe/lab (or $KPIPE_LAB_CACHE): shared by every workspace of this user."""
    env = os.environ.get("KPIPE_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "kpipe" / "lab"


def _run(argv: list[str], *, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise KpipeError(f"{argv[0]} is not installed", hint="the lab needs Debian's apt, dpkg, qemu-system-x86, "
                         "busybox-static, dropbear-bin, openssh-sftp-server, cpio and kmod") from None


def parse_release_dependency(text: str) -> str | None:
    """The release named by a `linux-image-<r>` / `linux-headers-<r>` dependency in apt/dpkg output."""
    for m in _DEP.finditer(text):
        release = m.group(1)
        if release not in ("amd64", "arm64") and any(ch.isdigit() for ch in release.split("-")[0]):
            return release
    return None


def discover_debian_release() -> str:
    """The current Debian kernel release: installed linux-headers-amd64's, else linux-image-amd64's in apt."""
    r = _run(["dpkg-query", "-W", "-f", "${Depends}\n", "linux-headers-amd64"])
    release = parse_release_dependency(r.stdout) if r.returncode == 0 else None
    if release:
        return release
    r = _run(["apt-cache", "depends", "linux-image-amd64"])
    release = parse_release_dependency(r.stdout) if r.returncode == 0 else None
    if not release:
        raise NotFoundError("cannot discover the current Debian kernel release",
                            hint="install linux-headers-amd64, or pass --kernel RELEASE")
    return release


def fetch_debian_kernel(release: str, cache_dir: Path | None = None) -> KernelImage:
    """A kernel built by `kpipe lab forge`, else linux-image-<release> downloaded and unpacked (once)."""
    if not _RELEASE.match(release):
        raise ConfigError(f"invalid kernel release {release!r}", hint="e.g. 6.1.0-56-amd64")
    from kpipe.lab.forge import find_forged_kernel  # every release lookup (lab up, preflight) passes here

    forged = find_forged_kernel(release)
    if forged is not None:
        return forged
    cache = (cache_dir or default_cache_dir()) / "kernels" / release
    done = cache / ".complete"
    if not done.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.parent, prefix=f".{release}-") as tmp:
            r = _run(["apt-get", "download", f"linux-image-{release}"], cwd=Path(tmp))
            debs = sorted(Path(tmp).glob("*.deb"))
            if r.returncode != 0 or not debs:
                raise NotFoundError(f"apt-get download linux-image-{release} failed: "
                                    f"{(r.stderr.strip().splitlines() or ['no package'])[-1]}",
                                    hint="run apt-get update; old Debian ABIs leave the registry")
            tree = Path(tmp) / "tree"
            r = _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
            if r.returncode != 0:
                raise KpipeError(f"dpkg-deb -x {debs[0].name} failed: {r.stderr.strip()}")
            (tree / ".complete").write_text(debs[0].name + "\n")
            if cache.exists():  # a half-unpacked earlier attempt
                shutil.rmtree(cache)
            os.rename(tree, cache)
    vmlinuz = cache / "boot" / f"vmlinuz-{release}"
    modules = _modules_dir(cache, release)
    if not vmlinuz.is_file():
        raise NotFoundError(f"{vmlinuz} is missing from the linux-image-{release} package")
    return KernelImage(release, vmlinuz, modules, "debian")


def _modules_dir(tree: Path, release: str) -> Path:
    for cand in (tree / "lib" / "modules" / release, tree / "usr" / "lib" / "modules" / release):
        if cand.is_dir():
            return cand
    raise NotFoundError(f"no lib/modules/{release} under {tree}")


def user_kernel(vmlinuz: Path, modules: Path) -> KernelImage:
    """A user's kernel: a vmlinuz plus its modules folder (lib/modules/<r>, or a tree holding one)."""
    vmlinuz = vmlinuz.expanduser().resolve()
    modules = modules.expanduser().resolve()
    if not vmlinuz.is_file():
        raise NotFoundError(f"kernel image {vmlinuz} does not exist")
    if not modules.is_dir():
        raise NotFoundError(f"modules folder {modules} does not exist")
    if (modules / "modules.order").is_file() or (modules / "kernel").is_dir():
        return KernelImage(modules.name, vmlinuz, modules, "user")
    for base in (modules / "lib" / "modules", modules / "usr" / "lib" / "modules", modules):
        if base.is_dir():
            found = [d for d in base.iterdir() if (d / "modules.order").is_file()]
            if len(found) == 1:
                return KernelImage(found[0].name, vmlinuz, found[0], "user")
    raise ConfigError(f"{modules} is not a modules folder",
                      hint="pass /lib/modules/<release> (with modules.order) or a tree holding exactly one")


def resolve_kernel(kernel: str | None, kernel_image: Path | None, modules: Path | None,
                   cache_dir: Path | None = None) -> KernelImage:
    """--kernel RELEASE|debian, or --kernel-image + --modules, into a KernelImage."""
    if kernel_image is not None:
        if modules is None:
            raise ConfigError("--kernel-image needs --modules DIR (its /lib/modules/<release> folder)")
        return user_kernel(kernel_image, modules)
    release = discover_debian_release() if kernel in (None, "", "debian") else kernel
    return fetch_debian_kernel(release, cache_dir)


# --------------------------------------------------------------------------- PVH boot

# Under TCG the guest spends about half of its boot CPU time decompressing an
# xz bzImage (measured on Debian's 6.1: 7.0 s -> 3.4 s of qemu CPU to the READY
# line). qemu boots an uncompressed vmlinux directly through its PVH entry point
# (the Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY, CONFIG_PVH, Linux 4.21+), so the
# lab unpacks the payload once, on the host, and caches it.
XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4


def bzimage_payload(data: bytes) -> tuple[str, bytes] | None:
    """(format, compressed payload) of a bzImage (boot protocol 2.08+), or None."""
    import struct

    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < 0x208:
        return None
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start:start + length]
    for magic, fmt in ((b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd")):
        if payload.startswith(magic):
            return fmt, payload
    return None


def has_pvh_entry(elf: bytes) -> bool:
    """True when an ELF64 vmlinux carries the Xen PHYS32_ENTRY note (PVH boot)."""
    import struct

    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:  # ELF64, little endian
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", elf, phoff + i * phentsize)
        if p_type != PT_NOTE:
            continue
        off, = struct.unpack_from("<Q", elf, phoff + i * phentsize + 8)
        size, = struct.unpack_from("<Q", elf, phoff + i * phentsize + 32)
        pos, end = off, off + size
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def _decompress(fmt: str, payload: bytes) -> bytes | None:
    if fmt == "xz":
        import lzma

        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if fmt == "gzip":
        import zlib

        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    if fmt == "zstd" and shutil.which("zstd"):
        r = subprocess.run(["zstd", "-dc"], input=payload, capture_output=True, check=False)
        return r.stdout if r.returncode == 0 else None
    return None


def boot_image(kernel: KernelImage, cache_dir: Path | None = None) -> Path:
    """What qemu boots: the cached uncompressed PVH vmlinux when the kernel has one, else the vmlinuz."""
    import hashlib

    data = kernel.vmlinuz.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    out = (cache_dir or default_cache_dir()) / "pvh" / f"vmlinux-{kernel.release}-{digest}"
    if out.is_file():
        return out
    found = bzimage_payload(data)
    if found is None:
        return kernel.vmlinuz
    try:
        elf = _decompress(*found)
    except (OSError, ValueError, EOFError):
        elf = None
    if not elf or not has_pvh_entry(elf):
        return kernel.vmlinuz
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_bytes(elf)
    os.replace(tmp, out)
    return out
