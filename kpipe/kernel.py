"""Kernel release strings (`uname -r`): one parser for every naming scheme kpipe targets.

A release string says what it says and no more: Ubuntu's `5.15.0-91-generic`
names no architecture, so `arch` is "unknown" there and the kernel catalog
(kpipe.toml) supplies it. Rocky, Alma and CentOS share RHEL's `el8_9` tags, so
they all parse as "rhel" (RHEL-like); nothing in the string tells them apart.

The parser is a list of (scheme, regex) matchers tried in order; the first
that matches wins, and the fallback keeps the upstream version plus any
architecture word it can find. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from kpipe.errors import ConfigError

# Canonical names follow `uname -m`. kpipe targets x86_64, aarch64 and
# loongarch64; the others are normalised so that they never match by accident.
_ARCH_ALIASES = {
    "x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64",
    "aarch64": "aarch64", "arm64": "aarch64",
    # "loongson-3" is also Debian's mips64el flavour name; kpipe targets no MIPS
    # host, and Loongnix/UOS/Kylin use it for LoongArch (3A5000+) kernels.
    "loongarch64": "loongarch64", "loongarch": "loongarch64", "loongson": "loongarch64",
    "loong64": "loongarch64", "loongson-3": "loongarch64", "la64": "loongarch64",
    "i386": "i686", "i586": "i686", "i686": "i686", "686": "i686", "686-pae": "i686",
    "ppc64le": "ppc64le", "ppc64el": "ppc64le", "powerpc64le": "ppc64le",
    "s390x": "s390x", "riscv64": "riscv64",
    "armmp": "armv7l", "armmp-lpae": "armv7l", "armhf": "armv7l", "armv7hl": "armv7l",
    "sw64": "sw_64", "sw_64": "sw_64",
    "mips64el": "mips64", "mips64r2el": "mips64", "octeon": "mips64",
}

MAX_RELEASE_LEN = 64  # UTS release field: __NEW_UTS_LEN = 64 (include/uapi/linux/utsname.h)
_SAFE_RELEASE = re.compile(r"[0-9][0-9A-Za-z._+~-]*")
_UPSTREAM = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))*")

# Word lists used by the matchers.
_RPM_ARCHES = "x86_64|aarch64|loongarch64|ppc64le|s390x|riscv64|i686|armv7hl|sw_64|noarch"
_DEB_ARCHES = ("amd64|arm64|loong64|loongson-3|armmp-lpae|armmp|686-pae|686|powerpc64le|ppc64el|s390x|"
               "riscv64|mips64r2el|octeon|marvell|rpi|sw64")
_UOS_ARCHES = "amd64|arm64|loongarch64|loongson-3|sw64|mips64"


@dataclass(frozen=True)
class KernelRelease:
    """A parsed `uname -r` string; fields are "" (or "unknown") where the string does not say."""

    release: str
    version: tuple[int, ...]  # every numeric component of the upstream version: 5.10.0 -> (5, 10, 0)
    distro: str = "unknown"  # uos kylin openeuler anolis debian ubuntu rhel oracle fedora ... or unknown
    flavour: str = ""  # amd64 rt cloud generic lowlatency desktop UOS 64k uek ...
    arch: str = "unknown"  # x86_64 aarch64 loongarch64 ... or unknown
    distro_release: str = ""  # el9_3 oe2203sp1 ky10.v2101 fc39 deb13 an8 ...
    abi: str = ""  # package revision / ABI: 56 (Debian), 91 (Ubuntu), 513.5.1 (RHEL), 136.12.0.86 (openEuler)
    upstream: str = ""  # the upstream version as written: "5.10.0"
    family: str = ""  # packaging family: deb | rpm | "" (unknown)

    @property
    def major_minor(self) -> tuple[int, int]:
        """(major, minor) of the upstream version."""
        return (self.version[0], self.version[1])

    def to_dict(self) -> dict[str, Any]:
        """Plain data (version as a list) for JSON and templates."""
        d = asdict(self)
        d["version"] = list(self.version)
        return d


def normalize_arch(name: str) -> str:
    """Canonical arch name (x86_64, aarch64, loongarch64, ...) or the input lowercased."""
    key = name.strip().lower()
    return _ARCH_ALIASES.get(key, key)


def check_release(release: object) -> str:
    """Return `release` if it is a plausible, harmless release string; ConfigError otherwise."""
    hint = "a kernel release is what `uname -r` prints, e.g. 5.10.0-amd64-UOS or 6.1.0-56-amd64"
    if not isinstance(release, str):
        raise ConfigError(f"kernel release must be a string, got {type(release).__name__}", hint=hint)
    if not release:
        raise ConfigError("kernel release is empty", hint=hint)
    shown = repr(release if len(release) <= 80 else release[:80] + "...")
    if len(release) > MAX_RELEASE_LEN:
        raise ConfigError(f"kernel release {shown} is {len(release)} characters long; the kernel allows "
                          f"at most {MAX_RELEASE_LEN}", hint=hint)
    if any(ord(c) < 32 or ord(c) == 127 for c in release):
        raise ConfigError(f"kernel release {shown} contains control characters", hint=hint)
    if any(c.isspace() for c in release):
        raise ConfigError(f"kernel release {shown} contains whitespace", hint=hint)
    if "/" in release:
        raise ConfigError(f"kernel release {shown} contains '/'", hint=hint)
    if not _SAFE_RELEASE.fullmatch(release):
        bad = sorted({c for c in release if not re.fullmatch(r"[0-9A-Za-z._+~-]", c)})
        if bad:
            raise ConfigError(f"kernel release {shown} contains characters a release never has: "
                              f"{''.join(bad)!r}", hint=hint)
        raise ConfigError(f"kernel release {shown} does not start with a version number", hint=hint)
    if not _UPSTREAM.match(release):
        raise ConfigError(f"kernel release {shown} does not start with MAJOR.MINOR", hint=hint)
    return release


# --- matchers: each takes (upstream, rest) and returns fields or None -----------------------------

_Fields = dict[str, str]

# RPM dist tags: (regex over one dot-separated token, distro).
_RPM_DIST_TAGS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"el\d+(?:_\d+)?uek"), "oracle"),  # Oracle UEK: 5.15.0-200.131.27.el9uek
    (re.compile(r"el\d+(?:_\d+)?"), "rhel"),  # RHEL, CentOS, Rocky, Alma, Oracle RHCK
    (re.compile(r"oe\d+(?:sp\d+)?"), "openeuler"),  # oe1 (20.03), oe2203, oe2203sp1, oe2403
    (re.compile(r"ky\d+"), "kylin"),  # Kylin server V10: v2101.ky10
    (re.compile(r"an\d+(?:_\d+)?"), "anolis"),
    (re.compile(r"al\d+"), "alinux"),  # Alibaba Cloud Linux
    (re.compile(r"fc\d+"), "fedora"),
    (re.compile(r"amzn\d+"), "amazon"),
    (re.compile(r"uelc?\d+"), "uos"),  # UOS server (UnionTech Enterprise Linux): uel20, uelc20
    (re.compile(r"oc\d+"), "opencloudos"),
    (re.compile(r"tl\d+"), "tencentos"),
    (re.compile(r"lns\d+"), "loongnix"),  # Loongnix server
    (re.compile(r"ctl\d+"), "ctyunos"),
    (re.compile(r"eulerosv\d+r\d+"), "euleros"),
)


def _rpm(upstream: str, rest: str) -> _Fields | None:
    # <upstream>-<rev>.<dist>.<arch>[+variant]: 4.18.0-513.5.1.el8_9.x86_64, 5.14.0-362.8.1.el9_3.aarch64+64k
    m = re.fullmatch(rf"-(?P<rel>[0-9][0-9A-Za-z_.]*?)\.(?P<arch>{_RPM_ARCHES})(?:\+(?P<variant>[a-z0-9]+))?", rest)
    if not m:
        return None
    tokens = m["rel"].split(".")
    distro, dist_i = "unknown", -1
    for i in range(len(tokens) - 1, -1, -1):
        for rx, name in _RPM_DIST_TAGS:
            if rx.fullmatch(tokens[i]):
                distro, dist_i = name, i
                break
        if dist_i >= 0:
            break
    dist = tokens[dist_i] if dist_i >= 0 else ""
    abi_tokens = [t for i, t in enumerate(tokens) if i != dist_i]
    if distro == "kylin" and dist_i > 0 and re.fullmatch(r"v\d+", tokens[dist_i - 1]):
        # Kylin V10 puts its service-pack build before the tag: 24.4.v2101.ky10
        dist = f"{dist}.{tokens[dist_i - 1]}"
        abi_tokens = [t for i, t in enumerate(tokens) if i not in (dist_i, dist_i - 1)]
    flavour = ""
    if distro == "oracle":
        flavour, dist = "uek", dist[: -len("uek")]
    # Realtime builds carry rtN in the revision: 4.18.0-513.5.1.rt7.307.el8_9 (RHEL 8),
    # 5.10.0-60.18.0.rt62.52.oe2203 (openEuler); RHEL 9 uses the +rt variant instead.
    if any(re.fullmatch(r"rt\d+", t) for t in abi_tokens):
        flavour = "rt"
    if m["variant"]:
        flavour = m["variant"] if not flavour else f"{flavour}+{m['variant']}"
    return {"distro": distro, "distro_release": dist, "abi": ".".join(abi_tokens), "flavour": flavour,
            "arch": m["arch"], "family": "rpm" if distro != "unknown" else ""}


def _debian_new(upstream: str, rest: str) -> _Fields | None:
    # Debian 13+ and backports: 6.12.38+deb13-amd64, 6.12.38+deb13-rt-amd64, 6.12.12+bpo-amd64
    m = re.fullmatch(rf"\+(?P<dist>deb\d+|bpo)-(?:(?P<fl>rt|cloud)-)?(?P<arch>{_DEB_ARCHES})", rest)
    if not m:
        return None
    return {"distro": "debian", "distro_release": m["dist"], "abi": "", "flavour": m["fl"] or m["arch"],
            "arch": m["arch"], "family": "deb"}


def _debian(upstream: str, rest: str) -> _Fields | None:
    # 6.1.0-56-amd64, 6.1.0-56-rt-amd64, 6.1.0-56-cloud-arm64, 5.10.0-0.deb10.16-amd64, 4.19.0-0.bpo.9-amd64
    m = re.fullmatch(rf"-(?P<abi>\d+(?:\.(?P<dist>deb\d+|bpo)\.\d+)?)-(?:(?P<fl>rt|cloud)-)?(?P<arch>{_DEB_ARCHES})",
                     rest)
    if not m:
        return None
    return {"distro": "debian", "distro_release": m["dist"] or "", "abi": m["abi"], "flavour": m["fl"] or m["arch"],
            "arch": m["arch"], "family": "deb"}


def _uos(upstream: str, rest: str) -> _Fields | None:
    # UOS / deepin desktop and server (Debian-based, no ABI number): 4.19.0-amd64-desktop,
    # 5.10.0-amd64-UOS, 4.19.0-arm64-desktop, 5.10.0-loongarch64-UOS, 6.6.7-amd64-desktop-rolling
    m = re.fullmatch(rf"(?:-(?P<abi>\d+))?-(?P<arch>{_UOS_ARCHES})-(?P<fl>(?:desktop|server|UOS|uos)(?:-[a-z0-9]+)*)",
                     rest)
    if not m:
        return None
    return {"distro": "uos", "distro_release": "", "abi": m["abi"] or "", "flavour": m["fl"], "arch": m["arch"],
            "family": "deb"}


_SUSE_FLAVOURS = {"default", "64kb", "kvmsmall", "vanilla", "preempt", "pae", "azure", "rt", "lpae", "zfcpdump"}
_ALPINE_FLAVOURS = {"lts", "virt", "edge", "rpi"}


def _abi_flavour(upstream: str, rest: str) -> _Fields | None:
    # <upstream>-<abi>-<flavour>: Ubuntu (5.15.0-91-generic), Kylin desktop (5.4.18-53-generic),
    # SUSE (5.14.21-150500.55.39-default), Alpine (6.6.14-0-lts)
    m = re.fullmatch(r"-(?P<abi>\d+(?:\.\d+)*)-(?P<fl>[a-z][a-z0-9]*(?:-[a-z0-9]+)*)", rest)
    if not m:
        return None
    abi, fl = m["abi"], m["fl"]
    sublevel = upstream.split(".")[2] if upstream.count(".") >= 2 else "0"
    arch = "unknown"
    if fl.endswith("-64k"):  # Ubuntu builds 64 KiB-page flavours for arm64 only
        arch = "aarch64"
    if "." in abi or (fl in _SUSE_FLAVOURS and fl not in ("azure", "rt")):
        if fl not in _SUSE_FLAVOURS:
            return None
        return {"distro": "suse", "distro_release": "", "abi": abi, "flavour": fl,
                "arch": "aarch64" if fl == "64kb" else "unknown", "family": "rpm"}
    if fl in _ALPINE_FLAVOURS:
        return {"distro": "alpine", "distro_release": "", "abi": abi, "flavour": fl, "arch": "unknown", "family": ""}
    if re.fullmatch(r"\d{6}", abi):
        # Ubuntu mainline PPA builds: 6.5.6-060506-generic (ABI = zero-padded version)
        return {"distro": "ubuntu", "distro_release": "mainline", "abi": abi, "flavour": fl, "arch": arch,
                "family": "deb"}
    if sublevel == "0":
        # Ubuntu always names its kernels X.Y.0-ABI-flavour, whatever the real sublevel is.
        return {"distro": "ubuntu", "distro_release": "", "abi": abi, "flavour": fl, "arch": arch, "family": "deb"}
    if fl == "generic" or fl.startswith("generic-"):
        # Kylin desktop (Ubuntu-based) keeps the real sublevel: 5.4.18-53-generic
        return {"distro": "kylin", "distro_release": "", "abi": abi, "flavour": fl, "arch": arch, "family": "deb"}
    return None


def _archlinux(upstream: str, rest: str) -> _Fields | None:
    # Arch Linux: 6.6.1-arch1-1, 6.6.1-zen1-1-zen, 6.6.1-1-lts (the last one falls to Alpine-like lts)
    m = re.fullmatch(r"-(?P<abi>(?:arch|zen|hardened)\d+-\d+)(?:-(?P<fl>zen|hardened|lts|rt))?", rest)
    if not m:
        return None
    return {"distro": "archlinux", "distro_release": "", "abi": m["abi"], "flavour": m["fl"] or "",
            "arch": "unknown", "family": ""}


_MATCHERS: tuple[Callable[[str, str], _Fields | None], ...] = (
    _rpm, _debian_new, _debian, _uos, _abi_flavour, _archlinux,
)


def _fallback(upstream: str, rest: str) -> _Fields:
    """Unknown scheme: keep the suffix as the flavour and any architecture word found in it."""
    arch = "unknown"
    words = re.split(r"[-.+_~]", rest.lower())
    for i, w in enumerate(words):
        # two-word aliases first (loongson-3, 686-pae), then single words
        pair = f"{w}-{words[i + 1]}" if i + 1 < len(words) else ""
        if pair in _ARCH_ALIASES:
            arch = pair
        elif w in _ARCH_ALIASES:
            arch = w
    if "x86_64" in rest.lower():
        arch = "x86_64"
    return {"distro": "unknown", "distro_release": "", "abi": "", "flavour": rest.lstrip("-+.~"), "arch": arch,
            "family": ""}


def parse_release(release: str) -> KernelRelease:
    """Parse a `uname -r` string; ConfigError for empty, garbage or hostile input."""
    check_release(release)
    up = _UPSTREAM.match(release)
    assert up is not None  # check_release guarantees MAJOR.MINOR
    upstream = up.group(0)
    rest = release[len(upstream):]
    fields: _Fields | None = None
    if rest:
        for matcher in _MATCHERS:
            fields = matcher(upstream, rest)
            if fields is not None:
                break
    if fields is None:
        fields = _fallback(upstream, rest)
    arch = fields.pop("arch")
    return KernelRelease(
        release=release,
        version=tuple(int(x) for x in upstream.split(".")),
        arch="unknown" if arch == "unknown" else normalize_arch(arch),
        upstream=upstream,
        **fields,
    )
