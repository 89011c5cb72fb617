"""The busybox guest's userland: the host's own binaries, or Debian's build of them for another architecture.

An x86_64 guest on an x86_64 host gets the host's busybox-static, dropbear, sftp-server and kmod with the
libraries ldd names. An aarch64 guest needs Debian's arm64 builds of the same packages: they are fetched with
`apt-get download` from the host's suite through a private apt folder (kpipe.lab.kernel.AptSuite with arch
arm64, so the host's apt sources and dpkg architectures are never changed), unpacked with `dpkg-deb -x` into
the lab cache, and their libraries are found by reading each ELF's DT_NEEDED and PT_INTERP (ldd cannot run a
foreign binary).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kpipe.elf.programs import elf_needs
from kpipe.errors import KpipeError, NotFoundError
from kpipe.lab.arch import LabArch, lab_arch

BUSYBOX = "/bin/busybox"
DROPBEAR = "/usr/sbin/dropbear"
SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/lib/sftp-server")
KMOD = "/usr/bin/kmod"
# The Debian packages of the guest's programs (their libraries are added by soname, below).
PACKAGES = ("busybox-static", "dropbear-bin", "openssh-sftp-server", "kmod", "libc6")
# Where Debian's multiarch loader looks (its built-in system directories), relative to the unpacked root.
_LIB_DIRS = ("lib/{triplet}", "usr/lib/{triplet}", "lib", "usr/lib")
_TRIPLET = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
FORMAT = "1"


@dataclass(frozen=True)
class Userland:
    """The guest programs and the libraries they need, as (path inside the initramfs, file) pairs."""

    arch: str
    busybox: Path
    dropbear: Path
    sftp_server: Path
    kmod: Path
    libs: tuple[tuple[str, Path], ...]
    source: str  # "host" or "debian:<suite>/<debian arch>"

    def files(self) -> list[tuple[str, Path]]:
        """Every input file with its kind (the initramfs cache key hashes them)."""
        return [("busybox", self.busybox), ("dropbear", self.dropbear), ("sftp-server", self.sftp_server),
                ("kmod", self.kmod), *(("lib:" + dest, src) for dest, src in self.libs)]


def is_host_arch(arch: LabArch) -> bool:
    """True when the guest runs the host's own binaries."""
    host = platform.machine().lower()
    return lab_arch(host).name == arch.name if host in ("x86_64", "amd64", "aarch64", "arm64") else False


def _require(path: str, package: str) -> Path:
    if not os.path.exists(path):
        raise KpipeError(f"{path} is missing", hint=f"install Debian's {package} package")
    return Path(path)


def _ldd_libs(binary: Path) -> list[str]:
    """Shared libraries (and the loader) a host binary needs, from ldd."""
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    libs = []
    for line in r.stdout.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m and os.path.exists(m.group(1)):
            libs.append(m.group(1))
    return libs


def host_userland() -> Userland:
    """The host's busybox-static, dropbear, sftp-server and kmod, with the libraries ldd names."""
    sftp = next((Path(c) for c in SFTP_SERVER_CANDIDATES if os.path.exists(c)), None)
    if sftp is None:
        raise KpipeError("sftp-server is missing", hint="install Debian's openssh-sftp-server package")
    busybox, dropbear = _require(BUSYBOX, "busybox-static"), _require(DROPBEAR, "dropbear-bin")
    kmod = _require(KMOD, "kmod")
    libs: list[tuple[str, Path]] = []
    for lib in sorted(set(_ldd_libs(dropbear) + _ldd_libs(kmod) + _ldd_libs(sftp))):
        # keep the path ldd resolved: the loader's search path includes it
        dest = lib.lstrip("/")
        if not (dest.startswith("usr/lib/") or dest.startswith("lib/") or dest.startswith("lib64/")):
            dest = "lib/" + os.path.basename(lib)
        libs.append((dest, Path(os.path.realpath(lib))))
    return Userland(platform.machine(), busybox, dropbear, sftp, kmod, tuple(libs), "host")


def guest_userland(arch: LabArch, cache_dir: Path, *, suite: str | None = None) -> Userland:
    """The userland for a guest of arch: the host's own, or Debian's build for that arch (fetched once)."""
    if is_host_arch(arch):
        return host_userland()
    return foreign_userland(arch, cache_dir, suite=suite)


# --------------------------------------------------------------------------- ELF facts of foreign binaries

def _resolve(root: Path, rel: str) -> Path | None:
    """rel inside root with symlinks followed inside root (an absolute link target is root-relative)."""
    p = root / rel.lstrip("/")
    for _ in range(20):
        if p.is_symlink():
            target = os.readlink(p)
            p = (root / target.lstrip("/")) if target.startswith("/") else (p.parent / target)
            continue
        return p if p.is_file() else None
    return None


def library_closure(root: Path, programs: list[Path], triplet: str) -> tuple[list[tuple[str, Path]], list[str]]:
    """The loader and libraries programs need, found in root: ([(path in guest, file)], missing sonames)."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    todo = list(programs)
    seen: set[Path] = set()
    while todo:
        prog = todo.pop()
        if prog in seen:
            continue
        seen.add(prog)
        interp, needed = elf_needs(prog)
        if interp and interp.lstrip("/") not in found:
            real = _resolve(root, interp)
            if real is None:
                missing.append(interp)
            else:
                found[interp.lstrip("/")] = real
        for soname in needed:
            dest = next((d.format(triplet=triplet) + "/" + soname for d in _LIB_DIRS
                         if _resolve(root, d.format(triplet=triplet) + "/" + soname)), None)
            if dest is None:
                if soname not in missing:
                    missing.append(soname)
                continue
            if dest not in found:
                real = _resolve(root, dest)
                assert real is not None
                found[dest] = real
                todo.append(real)
    return sorted(found.items()), missing


def _packages_of_sonames(sonames: list[str]) -> list[str]:
    """The Debian packages shipping these sonames, asked of the host's dpkg (package names are arch-free)."""
    out: list[str] = []
    for soname in sonames:
        r = subprocess.run(["dpkg", "-S", f"*/{os.path.basename(soname)}"], capture_output=True, text=True,
                           check=False)
        for line in r.stdout.splitlines():
            name = line.split(":", 1)[0].split(",")[0].strip()
            if name and name not in out:
                out.append(name)
                break
    return out


def foreign_userland(arch: LabArch, cache_dir: Path, *, suite: str | None = None) -> Userland:
    """Debian's arch build of the guest programs, downloaded and unpacked once into cache_dir/userland."""
    from kpipe.lab.kernel import AptSuite, host_suite

    suite = suite or host_suite() or "bookworm"
    triplet = _TRIPLET.get(arch.name)
    if triplet is None:
        raise KpipeError(f"the lab has no {arch.name} userland", hint="supported: " + ", ".join(_TRIPLET))
    apt = AptSuite(suite, cache_dir, arch=arch.debian_arch)
    key = hashlib.sha256(f"{FORMAT} {apt.key} {' '.join(PACKAGES)}".encode()).hexdigest()[:16]
    folder = cache_dir / "userland" / f"{suite}-{arch.debian_arch}-{key}"
    root = folder / "root"
    if not (folder / ".complete").is_file():
        _fetch(apt, folder, triplet)
    return _userland_in(root, arch, triplet, f"debian:{suite}/{arch.debian_arch}")


def _program(root: Path, name: str) -> Path | None:
    """name in an unpacked root: packages of a suite before the /usr merge keep some programs in /bin."""
    return next((root / d / name for d in ("usr/sbin", "usr/bin", "sbin", "bin") if (root / d / name).is_file()),
                None)


def _programs(root: Path) -> list[Path]:
    found = [_program(root, n) for n in ("dropbear", "kmod")]
    found += [root / c.lstrip("/") for c in SFTP_SERVER_CANDIDATES if (root / c.lstrip("/")).is_file()]
    return [p for p in found if p is not None]


def _userland_in(root: Path, arch: LabArch, triplet: str, source: str) -> Userland:
    sftp = next((root / c.lstrip("/") for c in SFTP_SERVER_CANDIDATES if (root / c.lstrip("/")).is_file()), None)
    progs = {name: _program(root, name) for name in ("busybox", "dropbear", "kmod")}
    for name, p in progs.items():
        if p is None:
            raise NotFoundError(f"{source}: {name} is missing from the unpacked packages in {root}",
                                hint=f"delete {root.parent} to fetch them again")
    if sftp is None:
        raise NotFoundError(f"{source}: sftp-server is missing from the unpacked packages",
                            hint=f"delete {root.parent} to fetch them again")
    libs, missing = library_closure(root, _programs(root), triplet)
    if missing:
        raise NotFoundError(f"{source}: no package provides {', '.join(missing)}",
                            hint=f"delete {root.parent} to fetch the packages again")
    busybox, dropbear, kmod = progs["busybox"], progs["dropbear"], progs["kmod"]
    assert busybox is not None and dropbear is not None and kmod is not None
    return Userland(arch.name, busybox, dropbear, sftp, kmod, tuple(libs), source)


def _fetch(apt: object, folder: Path, triplet: str) -> None:
    """Download the packages (then those of missing sonames) and unpack them into folder/root."""
    from kpipe.lab.kernel import AptSuite

    assert isinstance(apt, AptSuite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".userland-") as tmp:
        debs_dir = Path(tmp) / "debs"
        debs_dir.mkdir()
        root = Path(tmp) / "root"
        root.mkdir()
        wanted = list(PACKAGES)
        fetched: set[str] = set()
        for _ in range(4):  # each round adds the packages of sonames still missing
            for pkg in [p for p in wanted if p not in fetched]:
                r = apt.download(pkg, debs_dir)
                fetched.add(pkg)
                debs = sorted(debs_dir.glob(f"{pkg}_*.deb"))
                if r.returncode != 0 or not debs:
                    raise NotFoundError(f"apt-get download {pkg} ({apt.arch}, Debian {apt.suite}) failed: "
                                        f"{(r.stderr.strip().splitlines() or ['no package'])[-1]}",
                                        hint="check the network to the mirror")
                x = subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], capture_output=True, text=True,
                                   check=False)
                if x.returncode != 0:
                    raise KpipeError(f"dpkg-deb -x {debs[-1].name} failed: {x.stderr.strip()}")
            _, missing = library_closure(root, _programs(root), triplet)
            more = [p for p in _packages_of_sonames(missing) if p not in fetched]
            if not more:
                break
            wanted += more
        (root / ".complete").write_text(" ".join(sorted(fetched)) + "\n")
        if folder.exists():  # a half-made earlier attempt
            shutil.rmtree(folder)
        folder.mkdir()
        os.rename(root, folder / "root")
        os.rename(folder / "root" / ".complete", folder / ".complete")
