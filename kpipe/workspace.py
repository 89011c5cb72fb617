"""The workspace: a folder with kpipe.toml, recipes/, patches/ and the store.

kpipe.toml is found upward from the current directory, or named by
`--workspace` / `KPIPE_WORKSPACE`. Every section is parsed into typed
settings by kpipe.settings; errors name file:line and the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kpipe.errors import ConfigError, NotFoundError
from kpipe.settings import (  # noqa: F401  (re-exported: the settings types' historical home)
    BuildHost,
    KernelEntry,
    Settings,
    SignerConfig,
    SshSettings,
    parse_settings,
)

if TYPE_CHECKING:  # the store imports sqlite3 and hashing: kept lazy for --help speed
    from kpipe.store import Store

__all__ = [
    "HEADERS_GLOB_ROOTS",
    "LOCAL_HOST",
    "WORKSPACE_FILE",
    "BuildHost",
    "KernelEntry",
    "NoWorkspace",
    "Settings",
    "SignerConfig",
    "SshSettings",
    "Workspace",
    "discover_local_kernels",
    "find_workspace",
    "kernel_catalog",
    "load_workspace",
    "open_workspace",
    "parse_settings",
]

WORKSPACE_FILE = "kpipe.toml"
LOCAL_HOST = "local"  # BuildHost.is_local: a build host of this name and no address builds here


@dataclass
class Workspace:
    """A loaded kpipe.toml plus the folders it names."""

    root: Path
    file: Path
    store_dir: Path
    recipes_dir: Path
    patches_dir: Path
    build_hosts: list[BuildHost]
    ssh: SshSettings
    signers: dict[str, SignerConfig]
    default_signer: str
    inventories: list[Path]
    settings: Settings

    _store: Store | None = None
    _kernels: dict[str, KernelEntry] | None = None

    @property
    def kernels(self) -> dict[str, KernelEntry]:
        """The kernel catalog: kpipe.toml's [[kernels]], then kernels whose headers are installed here, then
        forged ones (a declared entry wins). Built on first use, so that commands that never look at kernels
        (`artifacts list`, `rollout status`) skip the scan of /usr/src and of the forge's cache."""
        if self._kernels is None:
            self._kernels = kernel_catalog(self.settings)
        return self._kernels

    @property
    def store(self) -> Store:
        """The workspace's state store, opened on first use."""
        if self._store is None:
            from kpipe.store import open_store

            self._store = open_store(self.store_dir)
        return self._store

    def kernel(self, release: str) -> KernelEntry:
        """The catalog entry of a kernel release; NotFoundError names the known ones."""
        try:
            return self.kernels[release]
        except KeyError:
            known = ", ".join(sorted(self.kernels)) or "none"
            raise NotFoundError(
                f"kernel {release!r} is not in the catalog of {self.file}",
                hint=f"known kernels: {known}; add a [[kernels]] entry",
            ) from None

    def build_host(self, name: str) -> BuildHost:
        """The [[build_hosts]] entry of that name; NotFoundError otherwise."""
        for h in self.build_hosts:
            if h.name == name:
                return h
        raise NotFoundError(f"no build host named {name!r} in {self.file}")

    def path(self, value: str) -> Path:
        """A path from kpipe.toml: ~ expanded, relative to the workspace root."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else self.root / p


class NoWorkspace(ConfigError):
    """No kpipe.toml where kpipe looked (exit 4, like every configuration error)."""


def find_workspace(start: Path | None = None, explicit: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding kpipe.toml: explicit, $KPIPE_WORKSPACE, or upward from start."""
    explicit = explicit or os.environ.get("KPIPE_WORKSPACE")
    if explicit:
        p = Path(explicit).expanduser().resolve()
        if p.is_file():
            p = p.parent
        if not (p / WORKSPACE_FILE).is_file():
            raise NoWorkspace(f"{p} has no {WORKSPACE_FILE}",
                              hint=f"create one with `kpipe init {p}`, or pass another --workspace")
        return p
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / WORKSPACE_FILE).is_file():
            return d
    raise NoWorkspace(
        f"no {WORKSPACE_FILE} in {here} or any parent folder",
        hint="start one with `kpipe init`, or run kpipe inside a workspace (--workspace / KPIPE_WORKSPACE)",
    )


def load_workspace(root: Path) -> Workspace:
    """Parse root/kpipe.toml into a Workspace; ConfigError names file:line and the bad field."""
    file = root / WORKSPACE_FILE
    try:
        data = file.read_bytes()
    except OSError as e:
        raise ConfigError(f"{file}: {e.strerror or e}") from None
    settings = parse_settings(file, data)

    def folder(value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else root / p

    return Workspace(
        root=root,
        file=file,
        store_dir=folder(settings.workspace.store),
        recipes_dir=folder(settings.workspace.recipes),
        patches_dir=folder(settings.workspace.patches),
        build_hosts=list(settings.build_hosts),
        ssh=settings.ssh,
        signers=dict(settings.signing.signers),
        default_signer=settings.signing.default,
        inventories=[folder(s) for s in settings.fleet.inventories],
        settings=settings,
    )


def kernel_catalog(settings: Settings) -> dict[str, KernelEntry]:
    """kpipe.toml's kernels, then the ones installed here, then the forged ones; the first entry of a release wins."""
    kernels = {k.release: k for k in settings.kernels}
    for entry in discover_local_kernels():
        kernels.setdefault(entry.release, entry)
    from kpipe.forged import forged_kernel_entries  # kernels built by `kpipe lab forge` join the catalog

    for entry in forged_kernel_entries():
        kernels.setdefault(entry.release, entry)
    return kernels


HEADERS_GLOB_ROOTS = (Path("/usr/src"),)


def discover_local_kernels(roots: tuple[Path, ...] | None = None) -> list[KernelEntry]:
    """Kernels whose headers are installed here (a linux-headers-<release> folder with Module.symvers).

    These join the catalog without being declared, so that a Debian machine
    with linux-headers-amd64 can build and validate for its kernel at once.
    """
    from kpipe.kernel import parse_release

    found: list[KernelEntry] = []
    for root in roots or HEADERS_GLOB_ROOTS:
        try:
            candidates = sorted(root.glob("linux-headers-*"))
        except OSError:
            continue
        for d in candidates:
            symvers = d / "Module.symvers"
            if not symvers.is_file():
                continue  # the -common half of Debian's headers, or a broken install
            release = d.name[len("linux-headers-"):]
            try:
                parsed = parse_release(release)
            except Exception:  # an odd folder name is not a kernel; skip it rather than fail every command
                continue
            found.append(KernelEntry(
                release=release, arch=parsed.arch, distro=parsed.distro, headers=str(d), builder="kbuild",
                symbols=(str(symvers),), options={"discovered": True},
            ))
    return found


def open_workspace(explicit: str | os.PathLike[str] | None = None) -> Workspace:
    """Find and load the workspace."""
    return load_workspace(find_workspace(explicit=explicit))
