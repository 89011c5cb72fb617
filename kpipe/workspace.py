"""The workspace: a folder with kpipe.toml, recipes/, patches/ and the store.

kpipe.toml is found upward from the current directory, or named by
`--workspace` / `KPIPE_WORKSPACE`. Every section is parsed into plain,
typed data here; errors name the file and the field.
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpipe.errors import ConfigError, NotFoundError

WORKSPACE_FILE = "kpipe.toml"
LOCAL_HOST = "local"


@dataclass(frozen=True)
class BuildHost:
    """A machine that builds modules; `local` builds here without SSH."""

    name: str
    address: str = ""
    user: str = ""
    port: int = 22
    arch: str = "x86_64"
    kernels: tuple[str, ...] = ("*",)  # release globs this host can build
    workdir: str = "~/.cache/kpipe/builds"
    slots: int = 1  # concurrent builds
    identity_file: str = ""
    tools: dict[str, str] = field(default_factory=dict)  # e.g. {"kpatch-build": "/usr/bin/kpatch-build"}

    @property
    def is_local(self) -> bool:
        return self.name == LOCAL_HOST and not self.address

    def tool(self, name: str) -> str:
        return self.tools.get(name, name)

    def accepts(self, release: str, arch: str) -> bool:
        return (arch in ("", "unknown") or self.arch == arch) and any(
            fnmatch.fnmatchcase(release, g) for g in self.kernels
        )


@dataclass(frozen=True)
class KernelEntry:
    """A kernel in the catalog: where its build inputs live (on the build host)."""

    release: str
    arch: str = ""
    distro: str = ""
    source: str = ""  # kernel source tree (kpatch-build -s)
    vmlinux: str = ""  # debuginfo vmlinux (kpatch-build -v)
    config: str = ""  # .config (kpatch-build -c)
    headers: str = ""  # headers folder (kbuild: make -C)
    builder: str = ""  # default builder for this kernel
    symbols: tuple[str, ...] = ()  # symbol sources for validation (kallsyms, System.map, vmlinux, Module.symvers)
    sig_hash: str = ""  # CONFIG_MODULE_SIG_HASH, e.g. sha256
    vermagic: str = ""  # expected vermagic when it cannot be derived
    options: dict[str, Any] = field(default_factory=dict)  # builder defaults


@dataclass(frozen=True)
class SshSettings:
    known_hosts: str = "~/.ssh/known_hosts"
    accept_new_host_keys: bool = False  # strict by default
    identity_file: str = ""
    ssh_config: str = "~/.ssh/config"
    connect_timeout: float = 10.0
    command_timeout: float = 600.0
    forks: int = 50
    kex: tuple[str, ...] = ()  # empty = paramiko's defaults; pinning is the user's choice


@dataclass(frozen=True)
class SignerConfig:
    """A signer: builtin (key + cert) or an external argv template."""

    name: str
    type: str = "builtin"  # builtin | command
    key: str = ""
    cert: str = ""
    hash: str = "sha256"
    keyid: bool = False  # name the signer by subject key identifier (sign-file -k)
    argv: tuple[str, ...] = ()  # for type=command: "{module}", "{output}", "{key}", "{cert}", "{hash}"
    sm2_user_id: str | None = None  # SM2 Z_A convention; None = no Z_A (kernel PKCS#7 style)


@dataclass
class Workspace:
    """A loaded kpipe.toml plus the folders it names."""

    root: Path
    file: Path
    store_dir: Path
    recipes_dir: Path
    patches_dir: Path
    build_hosts: list[BuildHost]
    kernels: dict[str, KernelEntry]
    ssh: SshSettings
    signers: dict[str, SignerConfig]
    default_signer: str
    inventories: list[Path]
    raw: dict[str, Any]

    _store: Any = None

    @property
    def store(self):  # -> kpipe.store.Store (import kept lazy for --help speed)
        if self._store is None:
            from kpipe.store import open_store

            self._store = open_store(self.store_dir)
        return self._store

    def section(self, name: str) -> dict[str, Any]:
        """A raw [section] of kpipe.toml (for components that own their settings)."""
        value = self.raw.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.file}: [{name}] must be a table")
        return value

    def kernel(self, release: str) -> KernelEntry:
        try:
            return self.kernels[release]
        except KeyError:
            known = ", ".join(sorted(self.kernels)) or "none"
            raise NotFoundError(
                f"kernel {release!r} is not in the catalog of {self.file}",
                hint=f"known kernels: {known}; add a [[kernels]] entry",
            ) from None

    def build_host(self, name: str) -> BuildHost:
        for h in self.build_hosts:
            if h.name == name:
                return h
        raise NotFoundError(f"no build host named {name!r} in {self.file}")

    def path(self, value: str) -> Path:
        """A path from kpipe.toml: ~ expanded, relative to the workspace root."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else self.root / p


def find_workspace(start: Path | None = None, explicit: str | os.PathLike | None = None) -> Path:
    """The folder holding kpipe.toml: explicit, $KPIPE_WORKSPACE, or upward from start."""
    explicit = explicit or os.environ.get("KPIPE_WORKSPACE")
    if explicit:
        p = Path(explicit).expanduser().resolve()
        if p.is_file():
            p = p.parent
        if not (p / WORKSPACE_FILE).is_file():
            raise ConfigError(f"{p} has no {WORKSPACE_FILE}", hint="run kpipe inside a workspace or pass --workspace")
        return p
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / WORKSPACE_FILE).is_file():
            return d
    raise ConfigError(
        f"no {WORKSPACE_FILE} in {here} or any parent folder",
        hint="run kpipe inside a workspace, or pass --workspace / set KPIPE_WORKSPACE",
    )


def _expect(file: Path, where: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind):
        raise ConfigError(f"{file}: {where} must be {what}, got {type(value).__name__} {value!r}")
    return value


def _str_tuple(file: Path, where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    _expect(file, where, value, list, "a list of strings")
    for v in value:
        _expect(file, where, v, str, "a list of strings")
    return tuple(value)


_BUILD_HOST_KEYS = {"name", "address", "user", "port", "arch", "kernels", "workdir", "slots", "identity_file", "tools"}
_KERNEL_KEYS = {"release", "arch", "distro", "source", "vmlinux", "config", "headers", "builder", "symbols",
                "sig_hash", "vermagic", "options"}


def load_workspace(root: Path) -> Workspace:
    """Parse root/kpipe.toml into a Workspace; ConfigError names the bad field."""
    file = root / WORKSPACE_FILE
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: {e}", hint="fix the TOML syntax") from None
    except OSError as e:
        raise ConfigError(f"{file}: {e.strerror}") from None

    ws_sec = _expect(file, "[workspace]", raw.get("workspace", {}), dict, "a table")

    def folder(key: str, default: str) -> Path:
        v = _expect(file, f"workspace.{key}", ws_sec.get(key, default), str, "a string")
        p = Path(os.path.expanduser(v))
        return p if p.is_absolute() else root / p

    hosts: list[BuildHost] = []
    for i, h in enumerate(_expect(file, "build_hosts", raw.get("build_hosts", []), list, "an array of tables")):
        where = f"build_hosts[{i}]"
        _expect(file, where, h, dict, "a table")
        unknown = set(h) - _BUILD_HOST_KEYS
        if unknown:
            raise ConfigError(f"{file}: {where} has unknown keys {sorted(unknown)}",
                              hint=f"known keys: {sorted(_BUILD_HOST_KEYS)}")
        name = _expect(file, f"{where}.name", h.get("name"), str, "a string")
        port = _expect(file, f"{where}.port", h.get("port", 22), int, "an integer")
        slots = _expect(file, f"{where}.slots", h.get("slots", 1), int, "an integer")
        if slots < 1:
            raise ConfigError(f"{file}: {where}.slots must be at least 1")
        from kpipe.kernel import normalize_arch

        hosts.append(BuildHost(
            name=name,
            address=_expect(file, f"{where}.address", h.get("address", ""), str, "a string"),
            user=_expect(file, f"{where}.user", h.get("user", ""), str, "a string"),
            port=port,
            arch=normalize_arch(_expect(file, f"{where}.arch", h.get("arch", "x86_64"), str, "a string")),
            kernels=_str_tuple(file, f"{where}.kernels", h.get("kernels", ["*"])),
            workdir=_expect(file, f"{where}.workdir", h.get("workdir", "~/.cache/kpipe/builds"), str, "a string"),
            slots=slots,
            identity_file=_expect(file, f"{where}.identity_file", h.get("identity_file", ""), str, "a string"),
            tools=dict(_expect(file, f"{where}.tools", h.get("tools", {}), dict, "a table")),
        ))
    names = [h.name for h in hosts]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{file}: build host names repeat: {sorted(dup)}")

    kernels: dict[str, KernelEntry] = {}
    for i, k in enumerate(_expect(file, "kernels", raw.get("kernels", []), list, "an array of tables")):
        where = f"kernels[{i}]"
        _expect(file, where, k, dict, "a table")
        unknown = set(k) - _KERNEL_KEYS
        if unknown:
            raise ConfigError(f"{file}: {where} has unknown keys {sorted(unknown)}",
                              hint=f"known keys: {sorted(_KERNEL_KEYS)}")
        release = _expect(file, f"{where}.release", k.get("release"), str, "a string")
        from kpipe.kernel import check_release

        try:
            check_release(release)
        except ConfigError as e:
            raise ConfigError(f"{file}: {where}.release: {e.message}", hint=e.hint) from None
        strs = {key: _expect(file, f"{where}.{key}", k.get(key, ""), str, "a string")
                for key in ("arch", "distro", "source", "vmlinux", "config", "headers", "builder", "sig_hash",
                            "vermagic")}
        if not strs["arch"] or not strs["distro"]:
            from kpipe.kernel import parse_release

            parsed = parse_release(release)
            strs["arch"] = strs["arch"] or parsed.arch
            strs["distro"] = strs["distro"] or parsed.distro
        else:
            from kpipe.kernel import normalize_arch

            strs["arch"] = normalize_arch(strs["arch"])
        kernels[release] = KernelEntry(
            release=release,
            symbols=_str_tuple(file, f"{where}.symbols", k.get("symbols", [])),
            options=dict(_expect(file, f"{where}.options", k.get("options", {}), dict, "a table")),
            **strs,
        )

    ssh_raw = _expect(file, "[ssh]", raw.get("ssh", {}), dict, "a table")
    ssh = SshSettings(
        known_hosts=str(ssh_raw.get("known_hosts", SshSettings.known_hosts)),
        accept_new_host_keys=bool(ssh_raw.get("accept_new_host_keys", False)),
        identity_file=str(ssh_raw.get("identity_file", "")),
        ssh_config=str(ssh_raw.get("ssh_config", SshSettings.ssh_config)),
        connect_timeout=float(ssh_raw.get("connect_timeout", SshSettings.connect_timeout)),
        command_timeout=float(ssh_raw.get("command_timeout", SshSettings.command_timeout)),
        forks=int(ssh_raw.get("forks", SshSettings.forks)),
        kex=_str_tuple(file, "ssh.kex", ssh_raw.get("kex", [])),
    )

    sign_raw = _expect(file, "[signing]", raw.get("signing", {}), dict, "a table")
    signers: dict[str, SignerConfig] = {}
    for name, s in _expect(file, "signing.signers", sign_raw.get("signers", {}), dict, "a table").items():
        _expect(file, f"signing.signers.{name}", s, dict, "a table")
        signers[name] = SignerConfig(
            name=name,
            type=str(s.get("type", "builtin")),
            key=str(s.get("key", "")),
            cert=str(s.get("cert", "")),
            hash=str(s.get("hash", "sha256")),
            keyid=bool(s.get("keyid", False)),
            argv=_str_tuple(file, f"signing.signers.{name}.argv", s.get("argv", [])),
            sm2_user_id=s.get("sm2_user_id"),
        )
        if signers[name].type not in ("builtin", "command"):
            raise ConfigError(f"{file}: signing.signers.{name}.type must be 'builtin' or 'command'")

    fleet_raw = _expect(file, "[fleet]", raw.get("fleet", {}), dict, "a table")
    inventories = [
        (p if (p := Path(os.path.expanduser(s))).is_absolute() else root / p)
        for s in _str_tuple(file, "fleet.inventories", fleet_raw.get("inventories", []))
    ]

    for entry in discover_local_kernels():
        kernels.setdefault(entry.release, entry)
    from kpipe.lab.forge import forged_kernel_entries  # kernels built by `kpipe lab forge` join the catalog

    for entry in forged_kernel_entries():
        kernels.setdefault(entry.release, entry)

    return Workspace(
        root=root,
        file=file,
        store_dir=folder("store", ".kpipe"),
        recipes_dir=folder("recipes", "recipes"),
        patches_dir=folder("patches", "patches"),
        build_hosts=hosts,
        kernels=kernels,
        ssh=ssh,
        signers=signers,
        default_signer=str(sign_raw.get("default", "")),
        inventories=inventories,
        raw=raw,
    )


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


def open_workspace(explicit: str | os.PathLike | None = None) -> Workspace:
    """Find and load the workspace."""
    return load_workspace(find_workspace(explicit=explicit))
