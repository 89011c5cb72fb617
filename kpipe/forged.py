"""The kernel forge's cache as a reader sees it: which forged kernels are finished and where their parts are.

kpipe.lab.forge builds kernels into this cache; the workspace's kernel catalog and the lab read it through
this module, which imports no lab code (opening a workspace stays cheap: tests/test_startup_budget.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpipe.settings import KernelEntry


def default_cache_dir() -> Path:
    """$KPIPE_FORGE_CACHE, else $XDG_CACHE_HOME/kpipe/forge, else ~/.cache/kpipe/forge."""
    env = os.environ.get("KPIPE_FORGE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "kpipe" / "forge"


@dataclass(frozen=True)
class ForgedKernel:
    """A forged kernel in the cache: its release and where its parts are."""

    release: str
    folder: Path
    source: str  # debian:<suite>/<version>
    package_version: str  # linux-source-<version>'s Debian version
    key: str
    created_at: float = 0.0
    seconds: float = 0.0
    arch: str = "x86_64"  # the guest arch it was built for (forge.json "arch")

    @property
    def tree(self) -> Path:
        return self.folder / "src"

    @property
    def vmlinux(self) -> Path:
        return self.folder / "vmlinux"

    @property
    def bzimage(self) -> Path:
        return self.folder / "bzImage"

    @property
    def boot_image(self) -> Path:
        """What qemu boots: bzImage on x86_64, the flat Image on aarch64."""
        return self.folder / ("Image" if self.arch == "aarch64" else "bzImage")

    @property
    def config(self) -> Path:
        return self.folder / "config"

    @property
    def system_map(self) -> Path:
        return self.folder / "System.map"

    @property
    def symvers(self) -> Path:
        return self.folder / "Module.symvers"

    @property
    def cert(self) -> Path:
        return self.folder / "trusted-cert.pem"

    @property
    def modules_dir(self) -> Path:
        return self.folder / "modroot" / "lib" / "modules" / self.release

    def to_dict(self) -> dict[str, Any]:
        return {"release": self.release, "source": self.source, "package_version": self.package_version,
                "key": self.key, "folder": str(self.folder), "tree": str(self.tree), "vmlinux": str(self.vmlinux),
                "arch": self.arch, "boot_image": str(self.boot_image),
                "bzImage": str(self.bzimage), "config": str(self.config), "system_map": str(self.system_map),
                "module_symvers": str(self.symvers), "modules_dir": str(self.modules_dir),
                "trusted_cert": str(self.cert), "created_at": self.created_at, "seconds": self.seconds}

    @classmethod
    def load(cls, folder: Path) -> ForgedKernel | None:
        """The forged kernel recorded in folder/forge.json, or None when absent or unfinished."""
        try:
            d = json.loads((folder / "forge.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(d, dict) or not d.get("complete"):
            return None
        try:
            return cls(str(d["release"]), folder, str(d["source"]), str(d["package_version"]), str(d["key"]),
                       float(d.get("created_at", 0.0)), float(d.get("seconds", 0.0)), str(d.get("arch", "x86_64")))
        except (KeyError, TypeError, ValueError):  # a record from another format: not a kernel kpipe can use
            return None


# The arches whose kernels select HAVE_KLP_BUILD (Linux 7.2: x86_64 only); kpipe.recipes.select uses it too.
KLP_BUILD_ARCHES = ("x86_64",)


def _tree_builder(tree: Path, arch: str) -> str:
    """klp-build when the forged tree carries it (Linux >= 6.19) and the arch selects it, else kpatch-build.

    Linux 7.2's arm64 tree carries scripts/livepatch/klp-build too, but only x86_64 selects HAVE_KLP_BUILD."""
    carries = (tree / "scripts" / "livepatch" / "klp-build").is_file()
    return "klp-build" if carries and arch in KLP_BUILD_ARCHES else "kpatch-build"


def kernels_dir(cache_dir: Path | None = None) -> Path:
    """Where forged kernels live (bind-mounted at the same path into chroots)."""
    return (cache_dir or default_cache_dir()) / "kernels"


def forged_kernels(cache_dir: Path | None = None) -> list[ForgedKernel]:
    """Every finished forged kernel in the cache, newest first."""
    base = kernels_dir(cache_dir)
    try:
        folders = [p for p in base.iterdir() if p.is_dir()]
    except OSError:
        return []
    found = [k for k in (ForgedKernel.load(p) for p in folders) if k is not None]
    return sorted(found, key=lambda k: k.created_at, reverse=True)


def find_forged(release: str, cache_dir: Path | None = None) -> ForgedKernel | None:
    """The newest forged kernel of that release, or None."""
    for k in forged_kernels(cache_dir):
        if k.release == release:
            return k
    return None


def forged_kernel_entries(cache_dir: Path | None = None) -> list[KernelEntry]:
    """Catalog entries (workspace.KernelEntry) for the forged kernels: tree, vmlinux, config on this machine."""
    out = []
    seen: set[str] = set()
    for k in forged_kernels(cache_dir):
        if k.release in seen:
            continue
        seen.add(k.release)
        symbols = tuple(str(p) for p in (k.vmlinux, k.symvers) if p.is_file())
        out.append(KernelEntry(release=k.release, arch=k.arch, distro="debian", source=str(k.tree),
                               vmlinux=str(k.vmlinux), config=str(k.config), headers=str(k.tree),
                               builder=_tree_builder(k.tree, k.arch), symbols=symbols, sig_hash="sha256",
                               options={"forged": k.source}))
    return out
