"""The lab's kernels: a Debian kernel image package unpacked into a cache, or a user's vmlinuz.

`apt-get download` + `dpkg-deb -x` fetch and unpack the image package without
running its initramfs/boot hooks (lab.md). The Debian ABI number moves and old
ABIs leave the registry, so the release is discovered, never hard-coded.

A kernel of another Debian suite (bullseye's 5.10 on a bookworm host) comes
from that suite's own index: apt runs with a private sources list, state and
archive folder under the cache (`AptSuite`), so the host's apt sources and
lists are never read or changed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kpipe.errors import ConfigError, KpipeError, NotFoundError

_RELEASE = re.compile(r"^[0-9][A-Za-z0-9._+~-]{2,100}$")
_DEP = re.compile(r"linux-(?:image|headers)-([0-9][A-Za-z0-9._+~-]*)")
_SUITE = re.compile(r"^[a-z][a-z0-9-]{1,30}$")
_PREFIX = re.compile(r"^[0-9]+\.[0-9]+(?:\.[0-9]+)?$")  # 5.10 or 5.10.0: discover the newest ABI
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
INDEX_MAX_AGE = 24 * 3600  # seconds before a private suite index is refreshed for a discovery
# The Debian suite that ships each upstream kernel series (a plain `--kernel 5.10.0-NN-amd64` finds its suite here).
SUITE_OF_SERIES = {"4.19": "buster", "5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie"}


@dataclass(frozen=True)
class KernelImage:
    """A bootable kernel: its release, the vmlinuz and the /lib/modules/<release> folder."""

    release: str
    vmlinuz: Path
    modules_dir: Path  # .../lib/modules/<release> (holds modules.order)
    source: str = ""  # "debian", "debian:<suite>" (a private suite index) or "user"
    arch: str = ""  # the guest arch it boots on ("" = read from the image: image_arch)

    def to_dict(self) -> dict[str, str]:
        return {"release": self.release, "vmlinuz": str(self.vmlinuz), "modules_dir": str(self.modules_dir),
                "source": self.source, "arch": self.arch or image_arch(self.vmlinuz) or ""}


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


# --------------------------------------------------------------------------- other Debian suites

@dataclass(frozen=True)
class KernelSpec:
    """What `--kernel` asked for: a suite (None: the host's apt) and a release, a prefix, or "" (the current)."""

    suite: str | None
    release: str = ""  # a full release (5.10.0-32-amd64)
    prefix: str = ""  # or a release prefix to discover the newest of (5.10, 5.10.0)
    flavour: str = "amd64"


def host_suite() -> str:
    """The host's Debian codename (VERSION_CODENAME of /etc/os-release), or ""."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    m = re.search(r"^VERSION_CODENAME=\"?([a-z0-9-]*)\"?$", text, re.M)
    return m.group(1) if m else ""


def suite_of_release(release: str) -> str | None:
    """The Debian suite shipping a release's upstream series (5.10.0-32-amd64 -> bullseye), or None."""
    m = re.match(r"^([0-9]+\.[0-9]+)[.-]", release + "-")
    return SUITE_OF_SERIES.get(m.group(1)) if m else None


def parse_kernel_spec(text: str) -> KernelSpec:
    """`debian:<suite>[/<release or prefix>]`, a release, or a prefix (5.10) into a KernelSpec."""
    text = text.strip()
    suite: str | None = None
    rest = text
    if text.startswith("debian:"):
        suite, _, rest = text[len("debian:"):].partition("/")
        if not _SUITE.match(suite):
            raise ConfigError(f"--kernel {text!r}: {suite!r} is not a Debian suite name",
                              hint="e.g. debian:bullseye/5.10.0-32-amd64, debian:bullseye/5.10 or debian:bullseye")
    if rest == "":
        if suite is None:
            raise ConfigError("--kernel is empty", hint="e.g. 5.10.0-32-amd64 or debian:bullseye/5.10")
        return KernelSpec(suite)
    if _PREFIX.match(rest):
        return KernelSpec(suite or suite_of_release(rest), prefix=rest)
    if not _RELEASE.match(rest):
        raise ConfigError(f"--kernel {text!r}: {rest!r} is not a kernel release",
                          hint="e.g. 5.10.0-32-amd64, a prefix such as 5.10, or debian:bullseye/5.10")
    return KernelSpec(suite, release=rest)


def pick_release(names: list[str], prefix: str, flavour: str = "amd64") -> str | None:
    """The newest linux-image-<prefix>...-<ABI>-<flavour> release among package names (ABI compared as numbers)."""
    rx = re.compile(rf"^linux-image-({re.escape(prefix)}[0-9.]*-([0-9]+)-{re.escape(flavour)})$")
    best: tuple[tuple[int, ...], str] | None = None
    for n in names:
        m = rx.match(n.strip())
        if not m:
            continue
        version = tuple(int(x) for x in re.findall(r"[0-9]+", m.group(1).rsplit("-", 2)[0])) + (int(m.group(2)),)
        if best is None or version > best[0]:
            best = (version, m.group(1))
    return best[1] if best else None


@dataclass(frozen=True)
class AptSuite:
    """A Debian suite's package index in a private apt folder (its own sources list, lists and archives)."""

    suite: str
    cache_dir: Path
    mirror: str = DEBIAN_MIRROR
    arch: str = "amd64"

    def inputs(self) -> dict[str, str]:
        return {"suite": self.suite, "mirror": self.mirror, "components": "main", "arch": self.arch}

    @property
    def key(self) -> str:
        blob = "\n".join(f"{k}={v}" for k, v in sorted(self.inputs().items()))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def folder(self) -> Path:
        return self.cache_dir / "apt" / f"{self.suite}-{self.key}"

    def sources_line(self) -> str:
        """The one deb line of the private sources list (the archive keyring named when present)."""
        signed = f" [signed-by={DEBIAN_KEYRING}]" if os.path.isfile(DEBIAN_KEYRING) else ""
        return f"deb{signed} {self.mirror} {self.suite} main\n"

    def options(self) -> list[str]:
        """apt -o options that point every path apt reads or writes at the private folder."""
        f = self.folder
        return ["-o", f"Dir::Etc::SourceList={f / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", "Dir::Etc::Preferences=/dev/null", "-o", "Dir::Etc::PreferencesParts=/dev/null",
                "-o", f"Dir::State={f / 'state'}", "-o", "Dir::State::Status=/dev/null",
                "-o", f"Dir::Cache={f / 'cache'}", "-o", f"APT::Architecture={self.arch}",
                "-o", f"APT::Architectures::={self.arch}", "-o", "Acquire::Languages=none"]

    def _lists(self) -> list[Path]:
        return sorted((self.folder / "state" / "lists").glob("*_Packages*"))

    def update(self, max_age: float | None = INDEX_MAX_AGE) -> None:
        """apt-get update into the private folder, unless an index younger than max_age is there."""
        lists = self._lists()
        if lists and max_age is not None and time.time() - min(p.stat().st_mtime for p in lists) < max_age:
            return
        for d in ("state/lists/partial", "cache/archives/partial"):
            (self.folder / d).mkdir(parents=True, exist_ok=True)
        (self.folder / "sources.list").write_text(self.sources_line())
        r = _run(["apt-get", "-q", *self.options(), "update"])
        if r.returncode != 0 or not self._lists():
            raise NotFoundError(f"apt-get update of Debian {self.suite} ({self.mirror}) failed: "
                                f"{(r.stderr.strip().splitlines() or ['no index'])[-1]}",
                                hint="check the network to the mirror, or the suite's name")

    def current_release(self, flavour: str = "amd64") -> str:
        """The release linux-image-<flavour> of this suite depends on (its current ABI)."""
        self.update()
        r = _run(["apt-cache", *self.options(), "depends", f"linux-image-{flavour}"])
        release = parse_release_dependency(r.stdout) if r.returncode == 0 else None
        if not release:
            raise NotFoundError(f"Debian {self.suite} has no linux-image-{flavour}",
                                hint="name a release: --kernel debian:SUITE/RELEASE")
        return release

    def newest_release(self, prefix: str, flavour: str = "amd64") -> str:
        """The newest linux-image-<prefix>*-<flavour> release in this suite's index."""
        self.update()
        r = _run(["apt-cache", *self.options(), "pkgnames", f"linux-image-{prefix}"])
        release = pick_release(r.stdout.splitlines(), prefix, flavour) if r.returncode == 0 else None
        if not release:
            raise NotFoundError(f"Debian {self.suite} has no linux-image-{prefix}*-{flavour}",
                                hint=f"see `apt-cache pkgnames linux-image-` of {self.suite}; "
                                     "pass --kernel debian:SUITE/RELEASE")
        return release

    def download(self, package: str, dest: Path) -> subprocess.CompletedProcess[str]:
        """apt-get download package into dest (refreshing a stale index once when the package is not in it)."""
        self.update()
        r = _run(["apt-get", "-q", *self.options(), "download", package], cwd=dest)
        if r.returncode != 0 and not list(dest.glob("*.deb")):
            self.update(max_age=None)
            r = _run(["apt-get", "-q", *self.options(), "download", package], cwd=dest)
        return r


# Debian kernel flavours of another arch than the host's amd64, by the release's last word (6.1.0-50-arm64).
_FOREIGN_FLAVOURS = {"arm64": "arm64"}


def _foreign_debian_arch(release: str) -> str | None:
    """The dpkg arch of a Debian release of another arch (…-arm64 -> arm64), or None for the host's."""
    return _FOREIGN_FLAVOURS.get(release.rsplit("-", 1)[-1])


def suite_kernel_folder(release: str, apt: AptSuite) -> Path:
    """The cache folder of a suite's kernel, keyed by its inputs (release, suite, mirror, arch)."""
    return apt.cache_dir / "kernels" / f"{release}@{apt.suite}-{apt.key[:8]}"


def fetch_debian_kernel(release: str, cache_dir: Path | None = None, *, suite: str | None = None,
                        mirror: str = DEBIAN_MIRROR) -> KernelImage:
    """A kernel built by `kpipe lab forge`, else linux-image-<release> downloaded and unpacked (once).

    The package comes from the host's apt when the release belongs to the host's suite, else from
    its own suite's private index (suite, or the one SUITE_OF_SERIES names).
    """
    if not _RELEASE.match(release):
        raise ConfigError(f"invalid kernel release {release!r}", hint="e.g. 6.1.0-56-amd64")
    from kpipe.lab.forge import find_forged_kernel  # every release lookup (lab up, preflight) passes here

    forged = find_forged_kernel(release)
    if forged is not None:
        return forged
    cache_dir = cache_dir or default_cache_dir()
    foreign = _foreign_debian_arch(release)
    if suite is None:
        known = suite_of_release(release)
        suite = known if known and known != host_suite() else None
    if foreign and suite is None:  # another arch's package always comes from a private index of that arch
        suite = host_suite() or "bookworm"
    apt = AptSuite(suite, cache_dir, mirror, arch=foreign or "amd64") if suite else None
    cache = suite_kernel_folder(release, apt) if apt else cache_dir / "kernels" / release
    done = cache / ".complete"
    if not done.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.parent, prefix=f".{release}-") as tmp:
            if apt:
                r = apt.download(f"linux-image-{release}", Path(tmp))
            else:
                r = _run(["apt-get", "download", f"linux-image-{release}"], cwd=Path(tmp))
            debs = sorted(Path(tmp).glob("*.deb"))
            if r.returncode != 0 or not debs:
                where = f" from Debian {apt.suite}" if apt else ""
                raise NotFoundError(f"apt-get download linux-image-{release}{where} failed: "
                                    f"{(r.stderr.strip().splitlines() or ['no package'])[-1]}",
                                    hint="old Debian ABIs leave the archive: pass a prefix (--kernel 5.10) "
                                         "or debian:SUITE to discover the current one")
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
    return KernelImage(release, vmlinuz, modules, f"debian:{apt.suite}" if apt else "debian",
                       "aarch64" if foreign == "arm64" else "")


def _modules_dir(tree: Path, release: str) -> Path:
    for cand in (tree / "lib" / "modules" / release, tree / "usr" / "lib" / "modules" / release):
        if cand.is_dir():
            return cand
    raise NotFoundError(f"no lib/modules/{release} under {tree}")


def image_arch(path: Path) -> str | None:
    """The arch a kernel image boots on, from its header: x86 bzImage, arm64 Image (also gzip'd), or ELF vmlinux."""
    import gzip

    try:
        with open(path, "rb") as f:
            head = f.read(0x240)
        if head[:2] == b"\x1f\x8b":  # Debian's arm64 vmlinuz is a gzip'd Image
            with gzip.open(path, "rb") as g:
                head = g.read(0x240)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if head[0x38:0x3C] == b"ARM\x64":  # arm64 Image header magic (Documentation/arch/arm64/booting.rst)
        return "aarch64"
    if head[0x202:0x206] == b"HdrS":  # x86 boot protocol header
        return "x86_64"
    if head[:4] == b"\x7fELF" and len(head) > 20:
        return {62: "x86_64", 183: "aarch64"}.get(int.from_bytes(head[18:20], "little"))
    return None


def user_kernel(vmlinuz: Path, modules: Path) -> KernelImage:
    """A user's kernel: a vmlinuz plus its modules folder (lib/modules/<r>, or a tree holding one)."""
    vmlinuz = vmlinuz.expanduser().resolve()
    modules = modules.expanduser().resolve()
    if not vmlinuz.is_file():
        raise NotFoundError(f"kernel image {vmlinuz} does not exist")
    if not modules.is_dir():
        raise NotFoundError(f"modules folder {modules} does not exist")
    if (modules / "modules.order").is_file() or (modules / "kernel").is_dir():
        return KernelImage(modules.name, vmlinuz, modules, "user", image_arch(vmlinuz) or "")
    for base in (modules / "lib" / "modules", modules / "usr" / "lib" / "modules", modules):
        if base.is_dir():
            found = [d for d in base.iterdir() if (d / "modules.order").is_file()]
            if len(found) == 1:
                return KernelImage(found[0].name, vmlinuz, found[0], "user", image_arch(vmlinuz) or "")
    raise ConfigError(f"{modules} is not a modules folder",
                      hint="pass /lib/modules/<release> (with modules.order) or a tree holding exactly one")


def resolve_kernel(kernel: str | None, kernel_image: Path | None, modules: Path | None,
                   cache_dir: Path | None = None, arch: str = "") -> KernelImage:
    """--kernel RELEASE|PREFIX|debian[:SUITE[/RELEASE|PREFIX]], or --kernel-image + --modules, into a KernelImage.

    arch aarch64 with `debian` (or no --kernel): Debian's current arm64 kernel of the host's suite.
    """
    if kernel_image is not None:
        if modules is None:
            raise ConfigError("--kernel-image needs --modules DIR (its /lib/modules/<release> folder)")
        return user_kernel(kernel_image, modules)
    if kernel in (None, "", "debian") and arch in ("aarch64", "arm64"):
        apt = AptSuite(host_suite() or "bookworm", cache_dir or default_cache_dir(), arch="arm64")
        return fetch_debian_kernel(apt.current_release("arm64"), cache_dir, suite=apt.suite)
    if kernel in (None, "", "debian"):
        return fetch_debian_kernel(discover_debian_release(), cache_dir)
    release, suite = resolve_release(kernel, cache_dir)
    return fetch_debian_kernel(release, cache_dir, suite=suite)


def resolve_release(kernel: str, cache_dir: Path | None = None) -> tuple[str, str | None]:
    """--kernel text into (release, suite or None); a prefix or a bare suite is looked up in the suite's index."""
    spec = parse_kernel_spec(kernel)
    if spec.release:
        return spec.release, spec.suite
    if spec.suite is None:
        raise ConfigError(f"--kernel {kernel!r}: no Debian suite is known to ship {spec.prefix}",
                          hint="name it: --kernel debian:SUITE/" + spec.prefix)
    apt = AptSuite(spec.suite, cache_dir or default_cache_dir())
    release = apt.newest_release(spec.prefix, spec.flavour) if spec.prefix else apt.current_release(spec.flavour)
    return release, spec.suite


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


# An uncompressed kernel image is tens of MB; a payload that inflates past this is not one (or is a bomb),
# and the lab then boots the compressed image as it is instead of holding gigabytes in memory.
MAX_KERNEL_IMAGE_BYTES = 512 << 20


def _decompress(fmt: str, payload: bytes, limit: int = MAX_KERNEL_IMAGE_BYTES) -> bytes | None:
    """The bzImage payload inflated, at most `limit` bytes; None when it is larger or not understood."""
    out: bytes
    if fmt == "xz":
        import lzma

        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload, max_length=limit + 1)
    elif fmt == "gzip":
        import zlib

        out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload, limit + 1)
    elif fmt == "zstd":
        from kpipe.elf.reader import ModuleFormatError, decompress

        try:
            out, _ = decompress(payload, "the kernel image's payload", limit=limit, kind="kernel image")
        except ModuleFormatError:
            return None
        out = bytes(out)
    else:
        return None
    return out if len(out) <= limit else None


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
