"""The kernel forge: a small bootable, live-patchable kernel from a Debian source package.

`forge()` makes (once) a lean chroot of the source's suite with mmdebstrap
(`--variant=apt`, only build tools, kpatch-build installed with
`dpkg --force-depends` because its Depends pull ~500 MB of TeX), unpacks
linux-source-<version> in it, runs `make ARCH=x86_64 tinyconfig`, merges a
config fragment, `make olddefconfig`, and builds vmlinux, bzImage and modules
with the suite's own gcc, niced. Everything lands in a cache folder keyed by
the inputs (suite, version, source package version, fragment and lab
certificate digests). The kernel is booted from copies taken right after the
normal build: kpatch-build later rebuilds the same tree with
-ffunction-sections/-fdata-sections, and that vmlinux does not boot.

Forged kernels join the kernel catalog (kpipe.forged, the cache's reader, which imports no lab code)
and the lab (`find_forged_kernel`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpipe.errors import ConfigError, KpipeError, NotFoundError
from kpipe.forged import ForgedKernel as ForgedKernel  # the cache reader's names, re-exported by the forge
from kpipe.forged import default_cache_dir as default_cache_dir
from kpipe.forged import find_forged as find_forged
from kpipe.forged import forged_kernel_entries as forged_kernel_entries
from kpipe.forged import forged_kernels as forged_kernels
from kpipe.forged import kernels_dir as kernels_dir
from kpipe.lab.arch import LabArch, lab_arch
from kpipe.lab.chroot import enter_argv

if TYPE_CHECKING:
    from kpipe.lab.kernel import KernelImage

FORMAT_VERSION = 1
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_FRAGMENT = "forge-lab.config"


@dataclass(frozen=True)
class ForgeTarget:
    """What the forge builds for one guest arch: its default fragment and the images the lab boots."""

    fragment: str
    image_targets: tuple[str, ...]  # make targets besides vmlinux and modules
    images: tuple[tuple[str, str], ...]  # (path in the tree, name in the cache folder)


# arm64 has no PVH-like entry for vmlinux: qemu's virt board boots the flat Image (Image.gz is kept too).
FORGE_TARGETS: dict[str, ForgeTarget] = {
    "x86_64": ForgeTarget(DEFAULT_FRAGMENT, ("bzImage",), (("arch/x86/boot/bzImage", "bzImage"),)),
    "aarch64": ForgeTarget("forge-lab-arm64.config", ("Image", "Image.gz"),
                           (("arch/arm64/boot/Image", "Image"), ("arch/arm64/boot/Image.gz", "Image.gz"))),
}
NICE = 10
# Build tools only (kpatch-build's own Depends would add the kernel's packaging build-deps:
# TeX, asciidoc, ghostscript...). openssl: the kernel generates its module signing key;
# openssh-server: the same chroot serves as a kpatch-build build host (kpipe.lab.buildhost).
BASE_PACKAGES = ("build-essential", "bc", "bison", "flex", "libelf-dev", "libssl-dev", "openssl", "cpio", "kmod",
                 "xz-utils", "gawk", "patch", "python3", "openssh-server")
FORCE_DEPENDS_PACKAGES = ("kpatch-build",)
KLP_BUILD_SINCE = (6, 19)  # the first release with scripts/livepatch/klp-build and `objtool klp`
LAB_CERT_NAME = "kpipe-lab-cert.pem"  # inside the kernel tree's certs/

Progress = Callable[[str], None]

_SOURCE = re.compile(r"^debian:([a-z][a-z0-9-]{1,30})/([0-9]+\.[0-9]+)$")
_CONFIG_LINE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_LINE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set\s*$")


# --------------------------------------------------------------------------- pure logic

@dataclass(frozen=True)
class ForgeSource:
    """A Debian kernel source package: linux-source-<version> of <suite>."""

    suite: str
    version: str

    @property
    def package(self) -> str:
        return f"linux-source-{self.version}"

    def __str__(self) -> str:
        return f"debian:{self.suite}/{self.version}"


def parse_source(text: str) -> ForgeSource:
    """`debian:<suite>/<major.minor>` (e.g. debian:trixie/6.12) into a ForgeSource."""
    m = _SOURCE.match(text.strip())
    if not m:
        raise ConfigError(f"--source {text!r} is not debian:<suite>/<version>",
                          hint="e.g. debian:trixie/6.12 (the suite must ship linux-source-<version>)")
    return ForgeSource(m.group(1), m.group(2))


def klp_build_packages(version: str, arch: str = "x86_64") -> tuple[str, ...]:
    """Chroot packages klp-build needs on a kernel that carries it (>= 6.19, x86_64); none otherwise.

    objtool builds its `klp` subcommand only when libxxhash is found (pkg-config), and klp-build refuses to
    start without recountdiff (patchutils). Older kernels keep their chroot (and so their cache key) unchanged.
    """
    major, minor = (int(x) for x in version.split(".")[:2])
    # Only x86_64 selects HAVE_KLP_BUILD (Linux 7.2): other arches keep their chroot and cache key.
    if arch != "x86_64" or (major, minor) < KLP_BUILD_SINCE:
        return ()
    return ("libxxhash-dev", "pkgconf", "patchutils")


def parse_config(text: str) -> dict[str, str]:
    """A .config or fragment as {CONFIG_X: value}; `# CONFIG_X is not set` is 'n'."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _CONFIG_LINE.match(line):
            out[m.group(1)] = m.group(2)
        elif m := _UNSET_LINE.match(line):
            out[m.group(1)] = "n"
    return out


def check_fragment(text: str, where: str) -> dict[str, str]:
    """Parse a fragment, refusing lines that are neither options, unset markers, comments nor blank."""
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#") and not _CONFIG_LINE.match(s):
            raise ConfigError(f"{where}:{i}: not a config line: {s[:60]!r}",
                              hint="write CONFIG_NAME=value or '# CONFIG_NAME is not set'")
    return parse_config(text)


def merge_config(base: str, fragment: dict[str, str]) -> str:
    """base .config with the fragment's values overriding (as merge_config.sh -m does), new ones appended."""
    lines: list[str] = []
    seen: set[str] = set()
    for line in base.splitlines():
        s = line.strip()
        m = _CONFIG_LINE.match(s) or _UNSET_LINE.match(s)
        if m and m.group(1) in fragment:
            name = m.group(1)
            seen.add(name)
            lines.append(_config_line(name, fragment[name]))
        else:
            lines.append(line)
    for name, value in fragment.items():
        if name not in seen:
            lines.append(_config_line(name, value))
    return "\n".join(lines) + "\n"


def _config_line(name: str, value: str) -> str:
    return f"# {name} is not set" if value == "n" else f"{name}={value}"


def dropped_options(final: dict[str, str], fragment: dict[str, str]) -> list[str]:
    """Fragment options that olddefconfig did not keep (a dependency is missing), as 'NAME=want (got)'."""
    out = []
    for name, want in fragment.items():
        got = final.get(name, "n")
        if got != want:
            out.append(f"{name}={want} (got {got if name in final else 'unset'})")
    return out


def forge_key(inputs: dict[str, Any]) -> str:
    """The cache key of a forged kernel: sha256 over its canonical JSON inputs."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def chroot_inputs(suite: str, mirror: str, packages: tuple[str, ...] = BASE_PACKAGES,
                  forced: tuple[str, ...] = FORCE_DEPENDS_PACKAGES) -> dict[str, Any]:
    """What a forge chroot is made from (its cache key's inputs)."""
    return {"format": FORMAT_VERSION, "suite": suite, "mirror": mirror, "variant": "apt",
            "packages": sorted(set(packages)), "force_depends": sorted(set(forced))}


def mmdebstrap_argv(suite: str, target: Path, mirror: str, packages: tuple[str, ...],
                    forced: tuple[str, ...] = FORCE_DEPENDS_PACKAGES) -> list[str]:
    """The mmdebstrap command line; forced packages are downloaded and `dpkg --force-depends -i`-ed in a hook."""
    argv = ["mmdebstrap", "--variant=apt", "--components=main", "--include=" + ",".join(packages),
            # sid's Release carries a Valid-Until a week ahead; a mirror snapshot older than that is refused
            # without this (stable suites carry none, so it changes nothing for them).
            '--aptopt=Acquire::Check-Valid-Until "false"']
    if forced:
        # The hook's shell text is a constant; package names reach it as "$@"-free literals checked below.
        for p in forced:
            if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", p):
                raise ConfigError(f"invalid package name {p!r}")
        names = " ".join(forced)
        argv.append("--customize-hook=chroot \"$1\" sh -c 'cd /tmp && apt-get download " + names +
                    " && dpkg --force-depends -i *.deb && rm -f /tmp/*.deb'")
    argv += [suite, str(target), mirror]
    return argv


def make_argv(targets: list[str], jobs: int, *, src: Path, extra: tuple[str, ...] = (),
              arch: LabArch | None = None, host_machine: str | None = None) -> list[str]:
    """make in the kernel tree for arch (default x86_64) with -j jobs; CROSS_COMPILE= when the host differs."""
    make_vars = (arch or lab_arch("x86_64")).make_vars(host_machine)
    return ["make", "-C", str(src), *make_vars, f"-j{max(1, jobs)}", *extra, *targets]


# klp-build's own make variables for its original and patched kernels (build_kernel() in
# scripts/livepatch/klp-build). Its make runs without ARCH (it refuses none, kpipe removes it), so the
# forge's build of a klp-build tree does too: any difference in the command lines would make klp-build's
# patched build recompile the whole tree.
KLP_BUILD_MAKE_VARS = ("KBUILD_MODPOST_WARN=1", "KLP_SYMIDS=1", "KCFLAGS=-ffunction-sections -fdata-sections")
KLP_TMP = "klp-tmp"  # klp-build's state folder in the tree; 1-orig holds its original build


def klp_make_argv(targets: list[str], jobs: int, *, src: Path) -> list[str]:
    """The forge's build of a tree that carries klp-build: klp-build's own flags, so its original build is this."""
    return ["make", "-C", str(src), f"-j{max(1, jobs)}", *KLP_BUILD_MAKE_VARS, *targets]


def klp_orig_objects(src: Path) -> list[str]:
    """What klp-build's copy_orig_objects() keeps of a built tree: vmlinux.o and each module's .o, relative.

    Its find(1): vmlinux.o at the root and every *.ko below it (not root-level ones), pruning klp-tmp and .git;
    a module's object is its path with the first `.ko` replaced by `.o`.
    """
    out: list[str] = []
    if (src / "vmlinux.o").is_file():
        out.append("vmlinux.o")
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        if here == src:
            dirnames[:] = [d for d in dirnames if d not in (KLP_TMP, ".git")]
            continue
        for name in filenames:
            if name.endswith(".ko"):
                rel = str((here / name).relative_to(src))
                out.append(rel.replace(".ko", ".o", 1))
    return sorted(out)


def prime_klp_tmp(src: Path, note: str) -> int:
    """Lay the tree's fresh build out as klp-build's completed original build (<tree>/klp-tmp/1-orig).

    klp-build --short-circuit patched then starts from this build instead of `make clean` and a second full
    build; the layout is copy_orig_objects()'s: the objects, vmlinux, build.log, klp-tmp/timestamp (objects of
    the patched build must be newer) and 1-orig/.complete. Returns the number of objects copied.
    """
    tmp = src / KLP_TMP
    orig = tmp / "1-orig"
    if tmp.exists():
        shutil.rmtree(tmp)
    orig.mkdir(parents=True)
    objects = klp_orig_objects(src)
    for rel in objects:
        if not (src / rel).is_file():
            raise KpipeError(f"the forged tree has no {rel} for klp-build's original build")
        (orig / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, orig / rel)
    shutil.copy2(src / "vmlinux", orig / "vmlinux")
    (orig / "build.log").write_text(note + "\n")
    (tmp / "timestamp").touch()
    (orig / ".complete").touch()
    return len(objects)


def localversion(key: str) -> str:
    """The forge's LOCALVERSION: the key's first 8 hex digits, so each input set has its own release."""
    return f"-kforge-{key[:8]}"


def release_of(tree: Path) -> str | None:
    """The release a built tree records in include/config/kernel.release, or None."""
    try:
        release = (tree / "include" / "config" / "kernel.release").read_text().strip()
    except OSError:
        return None
    return release if re.fullmatch(r"[0-9][A-Za-z0-9._+~-]{2,100}", release) else None


# --------------------------------------------------------------------------- cache layout

@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One forge/chroot build per key at a time (a second caller waits, then finds the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(argv: list[str], *, log: Path | None = None, timeout: float = 7200, what: str = "") -> str:
    """Run argv (its output streamed into log when given, so a long build can be followed); raise on failure."""
    out = None
    try:
        if log is None:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                               stdin=subprocess.DEVNULL)
            text = r.stdout + r.stderr
        else:
            with open(log, "ab") as f:
                f.write(f"$ {' '.join(argv)}\n".encode())
                f.flush()
                start = f.tell()
                out = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False,
                                     stdin=subprocess.DEVNULL)
                f.write(f"[exit {out.returncode}]\n".encode())
            with open(log, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            r = subprocess.CompletedProcess(argv, out.returncode, text, "")
    except FileNotFoundError:
        raise KpipeError(f"{argv[0]} is not installed",
                         hint="run scripts/setup.sh (the forge needs mmdebstrap, util-linux and openssl)") from None
    except subprocess.TimeoutExpired:
        raise KpipeError(f"{what or argv[0]} took longer than {timeout:.0f} s",
                         hint=f"see {log}" if log else "") from None
    if r.returncode != 0:
        tail = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("[exit ")][-5:]
        raise KpipeError(f"{what or argv[0]} failed (exit {r.returncode}): {' | '.join(tail)[-400:]}",
                         hint=f"full output in {log}" if log else "")
    return r.stdout if log is None else text.rsplit("[exit ", 1)[0]


# --------------------------------------------------------------------------- the chroot

@dataclass(frozen=True)
class Chroot:
    """A cached chroot of one suite."""

    suite: str
    root: Path
    key: str

    def run(self, argv: list[str], *, binds: tuple[Path, ...] = (), nice: int = 0, log: Path | None = None,
            what: str = "", timeout: float = 7200) -> str:
        """Run argv inside the chroot (private mount namespace, binds at their host paths)."""
        return _run(enter_argv(self.root, argv, binds, nice=nice), log=log, what=what, timeout=timeout)

    def package_version(self, package: str) -> str:
        """The installed version of a package in the chroot (read from its dpkg status file)."""
        status = (self.root / "var/lib/dpkg/status").read_text(errors="replace")
        for block in status.split("\n\n"):
            if re.search(rf"^Package: {re.escape(package)}$", block, re.M) and \
                    re.search(r"^Status: install ok installed$", block, re.M):
                m = re.search(r"^Version: (\S+)$", block, re.M)
                if m:
                    return m.group(1)
        raise NotFoundError(f"{package} is not installed in the {self.suite} chroot {self.root}")


def ensure_chroot(suite: str, *, extra_packages: tuple[str, ...] = (), mirror: str = DEFAULT_MIRROR,
                  cache_dir: Path | None = None, progress: Progress | None = None,
                  forced: tuple[str, ...] = FORCE_DEPENDS_PACKAGES) -> Chroot:
    """The suite's build chroot, made once with mmdebstrap (as root) and cached by its inputs.

    forced: packages installed with `dpkg --force-depends` (kpatch-build; none for a kbuild-only host).
    """
    say = progress or (lambda _m: None)
    packages = tuple(dict.fromkeys(BASE_PACKAGES + extra_packages))
    inputs = chroot_inputs(suite, mirror, packages, forced)
    key = forge_key(inputs)
    base = (cache_dir or default_cache_dir()) / "chroots" / f"{suite}-{key[:16]}"
    root = base / "root"
    done = base / "chroot.json"
    if done.is_file():
        return Chroot(suite, root, key)
    if os.geteuid() != 0:
        raise KpipeError("the forge makes its chroot as root (mmdebstrap --mode=root, chroot, mount namespaces)",
                         hint="run `kpipe lab forge` as root, or in a root container")
    with _locked(base.parent / (base.name + ".lock")):
        if done.is_file():
            return Chroot(suite, root, key)
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=".root-"))
        tmp.rmdir()  # mmdebstrap wants to create (or find empty) the target itself
        say(f"creating a {suite} chroot with mmdebstrap ({len(packages)} packages"
            f"{' + ' + ', '.join(forced) if forced else ''}); once per input set")
        t0 = time.monotonic()
        log = base / "mmdebstrap.log"
        try:
            _run(["nice", "-n", str(NICE), *mmdebstrap_argv(suite, tmp, mirror, packages, forced)], log=log,
                 what=f"mmdebstrap {suite}", timeout=3600)
        except KpipeError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if root.exists():
            shutil.rmtree(root)
        os.rename(tmp, root)
        inputs["seconds"] = round(time.monotonic() - t0, 1)
        done.write_text(json.dumps(inputs, indent=2) + "\n")
        say(f"chroot ready in {inputs['seconds']:.0f} s: {root}")
    return Chroot(suite, root, key)


# --------------------------------------------------------------------------- the lab key

LAB_KEY_CONFIG = """[ req ]
default_bits = 3072
distinguished_name = req_distinguished_name
prompt = no
string_mask = utf8only
x509_extensions = myexts
[ req_distinguished_name ]
O = kpipe lab
CN = kpipe forge lab module signing key
[ myexts ]
basicConstraints=critical,CA:FALSE
keyUsage=digitalSignature
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
"""


def ensure_lab_key(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """(signing_key.pem, signing_cert.pem) of the forge's lab key, created once with openssl."""
    folder = (cache_dir or default_cache_dir()) / "labkey"
    key, cert = folder / "signing_key.pem", folder / "signing_cert.pem"
    if key.is_file() and cert.is_file():
        return key, cert
    with _locked(folder.parent / (folder.name + ".lock")):
        if key.is_file() and cert.is_file():
            return key, cert
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        genkey = folder / "x509.genkey"
        genkey.write_text(LAB_KEY_CONFIG)
        tmp_key, tmp_cert = folder / ".key.tmp", folder / ".cert.tmp"
        _run(["openssl", "req", "-new", "-nodes", "-utf8", "-sha256", "-days", "3650", "-batch", "-x509",
              "-config", str(genkey), "-outform", "PEM", "-out", str(tmp_cert), "-keyout", str(tmp_key)],
             what="openssl req (lab key)")
        os.chmod(tmp_key, 0o600)
        os.replace(tmp_cert, cert)
        os.replace(tmp_key, key)
    return key, cert


def _cert_pem(path: Path) -> bytes:
    data = path.read_bytes() if path.is_file() else b""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"--cert {path}: not a PEM certificate",
                          hint="pass the lab signer's signing_cert.pem (the key stays out of the kernel)")
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"--cert {path}: holds a private key; pass the certificate alone",
                          hint="the kernel embeds SYSTEM_TRUSTED_KEYS in vmlinux")
    return data


# --------------------------------------------------------------------------- the forge

def forge(source: ForgeSource, *, arch: str = "x86_64", fragment: Path | None = None, cert: Path | None = None,
          jobs: int | None = None, mirror: str = DEFAULT_MIRROR, cache_dir: Path | None = None,
          progress: Progress | None = None) -> ForgedKernel:
    """Build (or find in the cache) a kernel for arch (x86_64, aarch64) from a Debian source package; return it."""
    say = progress or (lambda _m: None)
    cache = cache_dir or default_cache_dir()
    larch = lab_arch(arch)
    target = FORGE_TARGETS.get(larch.name)
    if target is None:
        raise ConfigError(f"the forge cannot build for {arch!r}", hint=f"supported: {', '.join(FORGE_TARGETS)}")
    if fragment is not None:
        frag_path = fragment.expanduser()
        try:
            frag_text = frag_path.read_text()
        except OSError as e:
            raise ConfigError(f"--config-fragment {fragment}: {e.strerror}") from None
        where = str(frag_path)
    else:
        frag_text = resources.files("kpipe").joinpath("lab_assets", target.fragment).read_text()
        where = f"(default fragment {target.fragment})"
    frag = check_fragment(frag_text, where)
    cert_path = cert.expanduser().resolve() if cert is not None else ensure_lab_key(cache)[1]
    cert_pem = _cert_pem(cert_path)

    # A cross build needs the suite's cross gcc in the chroot (a chroot of its own: another package set);
    # a kernel that carries klp-build needs that tool's build dependencies (x86_64 only).
    cross = (larch.cross_package,) if larch.needs_cross() else ()
    chroot = ensure_chroot(source.suite,
                           extra_packages=(source.package, *cross, *klp_build_packages(source.version, larch.name)),
                           mirror=mirror, cache_dir=cache,
                           progress=say)
    pkg_version = chroot.package_version(source.package)
    inputs = {"format": FORMAT_VERSION, "arch": larch.name, "suite": source.suite, "version": source.version,
              "package_version": pkg_version, "chroot": chroot.key,
              "fragment_sha256": hashlib.sha256(frag_text.encode()).hexdigest(),
              "cert_sha256": hashlib.sha256(cert_pem).hexdigest()}
    if klp_build_packages(source.version, str(inputs["arch"])):  # only then: other kernels keep their key
        inputs["build"] = "klp-build-flags"
    key = forge_key(inputs)
    kdir = kernels_dir(cache)
    folder = kdir / f"{source.version}-{key[:16]}"
    found = ForgedKernel.load(folder)
    if found is not None:
        say(f"cached: {found.release} ({folder})")
        return found
    with _locked(folder.parent / (folder.name + ".lock")):
        found = ForgedKernel.load(folder)
        if found is not None:
            return found
        return _build(chroot, source, pkg_version, frag, cert_pem, inputs, key, folder, jobs, say, larch, target)


def _build(chroot: Chroot, source: ForgeSource, pkg_version: str, frag: dict[str, str], cert_pem: bytes,
           inputs: dict[str, Any], key: str, folder: Path, jobs: int | None, say: Progress,
           larch: LabArch | None = None, target: ForgeTarget | None = None) -> ForgedKernel:
    larch = larch or lab_arch("x86_64")
    target = target or FORGE_TARGETS[larch.name]

    def make(targets: list[str], n: int, *, extra: tuple[str, ...] = ()) -> list[str]:
        return make_argv(targets, n, src=src, extra=extra, arch=larch)

    if folder.exists():  # an interrupted earlier build
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    log = folder / "forge.log"
    binds = (folder,)
    njobs = jobs or os.cpu_count() or 1
    t0 = time.monotonic()
    times: dict[str, float] = {}

    def step(name: str, argv: list[str], *, nice: int = NICE) -> str:
        t = time.monotonic()
        out = chroot.run(argv, binds=binds, nice=nice, log=log, what=f"forge {name}")
        times[name] = round(time.monotonic() - t, 1)
        return out

    tarball = f"/usr/src/{source.package}.tar.xz"
    if not (chroot.root / tarball.lstrip("/")).is_file():
        raise NotFoundError(f"{tarball} is missing from the {source.suite} chroot")
    say(f"unpacking {source.package} {pkg_version}")
    step("unpack", ["tar", "-xf", tarball, "-C", str(folder)])
    os.rename(folder / source.package, folder / "src")
    src = folder / "src"
    (src / "certs" / LAB_CERT_NAME).write_bytes(cert_pem)
    (folder / "trusted-cert.pem").write_bytes(cert_pem)

    say("make tinyconfig, merge the fragment, make olddefconfig")
    step("tinyconfig", make(["tinyconfig"], 1))
    frag = dict(frag)
    frag.setdefault("CONFIG_LOCALVERSION", f'"{localversion(key)}"')
    frag["CONFIG_LOCALVERSION_AUTO"] = "n"
    if frag.get("CONFIG_MODULE_SIG") == "y":
        frag["CONFIG_SYSTEM_TRUSTED_KEYS"] = f'"certs/{LAB_CERT_NAME}"'
    config = src / ".config"
    config.write_text(merge_config(config.read_text(), frag))
    step("olddefconfig", make(["olddefconfig"], 1))
    dropped = dropped_options(parse_config(config.read_text()), frag)
    if dropped:
        raise ConfigError(f"the fragment's options did not survive olddefconfig: {', '.join(dropped[:6])}"
                          + (f" and {len(dropped) - 6} more" if len(dropped) > 6 else ""),
                          hint="add the options they depend on to the fragment (see `make menuconfig` help)")
    gcc_name = f"{larch.cross_prefix}gcc" if larch.needs_cross() else "gcc"
    built = ["vmlinux", *target.image_targets, "modules"]
    klp = inputs.get("build") == "klp-build-flags"
    say(f"building {source.package} {pkg_version} for {larch.name}: {' '.join(built)} (-j{njobs}, nice {NICE}, "
        f"the suite's {gcc_name}{', klp-build flags' if klp else ''})")
    if klp:
        # The kernel the lab boots is klp-build's original build (this tree's linker script places
        # -ffunction-sections/-fdata-sections output, .bss.* included, where a normal build puts it).
        step("build", klp_make_argv(built, njobs, src=src))
    else:
        step("build", make(built, njobs))
    # Written by the build from auto.conf (`make kernelrelease` before it lacks CONFIG_LOCALVERSION).
    release = release_of(src)
    if release is None:
        raise KpipeError("the build wrote no valid include/config/kernel.release", hint=f"see {log}")
    step("modules_install", make(["modules_install"], 1, extra=(f"INSTALL_MOD_PATH={folder / 'modroot'}",)))
    # Copies taken now are what boots; kpatch-build later rebuilds src with its own flags.
    for name, dest in (("vmlinux", "vmlinux"), *target.images, (".config", "config"),
                       ("System.map", "System.map"), ("Module.symvers", "Module.symvers")):
        if (src / name).is_file():
            shutil.copy2(src / name, folder / dest)
    for needed in ("vmlinux", target.images[0][1], "config"):
        if not (folder / needed).is_file():
            raise KpipeError(f"the build produced no {needed}", hint=f"see {log}")
    modules = folder / "modroot" / "lib" / "modules" / release
    modules.mkdir(parents=True, exist_ok=True)
    (modules / "modules.order").touch()
    if klp:
        t = time.monotonic()
        flags = " ".join(KLP_BUILD_MAKE_VARS)
        n = prime_klp_tmp(src, f"klp-tmp/1-orig primed by kpipe's forge from its build ({flags})")
        times["klp_prime"] = round(time.monotonic() - t, 1)
        say(f"klp-build's original build is this one: klp-tmp/1-orig primed ({n} objects)")
    gcc = step("gcc", [gcc_name, "--version"], nice=0).splitlines()
    record = {**inputs, "key": key, "release": release, "source": str(source), "complete": True,
              "created_at": time.time(), "seconds": round(time.monotonic() - t0, 1), "steps": times,
              "jobs": njobs, "gcc": gcc[0] if gcc else ""}
    tmp = folder / "forge.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, folder / "forge.json")
    say(f"forged {release} in {record['seconds']:.0f} s")
    loaded = ForgedKernel.load(folder)
    assert loaded is not None
    return loaded


# --------------------------------------------------------------------------- registry

def find_forged_kernel(release: str, cache_dir: Path | None = None) -> KernelImage | None:
    """The lab's view (lab.kernel.KernelImage) of a forged kernel, or None."""
    from kpipe.lab.kernel import KernelImage

    k = find_forged(release, cache_dir)
    if k is None:
        return None
    return KernelImage(k.release, k.boot_image, k.modules_dir, "forge", k.arch)
