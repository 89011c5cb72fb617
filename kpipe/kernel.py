"""Kernel release strings: parsing for every naming scheme kpipe targets.

(Placeholder API; the full parser lands with the foundation work.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

_ARCH_ALIASES = {
    "x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64",
    "aarch64": "aarch64", "arm64": "aarch64",
    "loongarch64": "loongarch64", "loongarch": "loongarch64", "loongson": "loongarch64", "loong64": "loongarch64",
}


def normalize_arch(name: str) -> str:
    """Canonical arch name (x86_64, aarch64, loongarch64) or the input lowercased."""
    return _ARCH_ALIASES.get(name.strip().lower(), name.strip().lower())


@dataclass(frozen=True)
class KernelRelease:
    release: str
    version: tuple[int, ...]
    distro: str = "unknown"
    flavour: str = ""
    arch: str = "unknown"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = list(self.version)
        return d


def parse_release(release: str) -> KernelRelease:
    import re

    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    version = tuple(int(x) for x in m.groups() if x is not None) if m else ()
    arch = "unknown"
    for token in re.split(r"[-.]", release.lower()):
        if token in _ARCH_ALIASES:
            arch = _ARCH_ALIASES[token]
    return KernelRelease(release=release, version=version, arch=arch)
