"""kpipe.toml as typed settings: one frozen dataclass per section, one parser, errors at file:line.

`parse_settings(file, text)` checks every section kpipe reads: unknown tables and keys (with a
did-you-mean, as recipe lint does), types (a quoted "false" is not a boolean), ranges and enums.
tomllib gives no positions, so `toml_lines` finds the line of every key, table header,
array-of-tables element and array item in the (already valid) TOML text itself.
"""

from __future__ import annotations

import bisect
import difflib
import fnmatch
import math
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import MISSING, FrozenInstanceError, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar, dataclass_transform

from kpipe.errors import ConfigError
from kpipe.taint import TAINT_LETTERS

# Enums. Mirrors of constants whose modules are slow to import (kpipe.recipes, cryptography);
# tests/test_truth_config.py checks they stay equal to the originals.
# A kernel entry's default builder (kpipe.recipes.select); the same names as kpipe.recipes.schema.BUILDERS.
BUILDERS = ("kpatch-build", "klp-build", "kbuild", "auto")
SIGN_HASHES = ("sha224", "sha256", "sha384", "sha512")  # kpipe.elf.sign.HASHES (builtin signer)
KERNEL_HASHES = ("sha1", "sha224", "sha256", "sha384", "sha512", "sm3")  # kpipe.elf.signature.KERNEL_HASHES
SIGNER_TYPES = ("builtin", "command")
# Every distro kpipe.kernel.parse_release can name.
DISTROS = ("alinux", "alpine", "amazon", "anolis", "archlinux", "ctyunos", "debian", "euleros", "fedora", "kylin",
           "loongnix", "opencloudos", "openeuler", "oracle", "rhel", "suse", "tencentos", "ubuntu", "uos",
           "unknown")
DEFAULT_INVENTORY_TIMEOUT = 60.0


# -- the sections --------------------------------------------------------------------------------


class _Frozen:
    """What @dataclass(frozen=True) generates per class (__init__, ==, hash, repr, and the refusal to assign),
    written once: on Python 3.11 the dataclass machinery compiles each generated method from source, and
    kpipe.toml's 17 classes made that ~15 ms of every command's start (bench/startup.py). The classes are
    still dataclasses (fields(), asdict(), replace() work) and behave as frozen ones: __init__ takes the
    fields positionally or by name with their defaults, assigning or deleting a field raises
    FrozenInstanceError, and equality, hashing and repr are the dataclass ones, over every field."""

    __slots__ = ()
    _init_spec: ClassVar[tuple[tuple[str, Any, Any], ...]]  # (name, default, default_factory), by _frozen

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        spec = self._init_spec
        if len(args) > len(spec):
            raise TypeError(f"{self.__class__.__qualname__}() takes {len(spec)} positional arguments but "
                            f"{len(args)} were given")
        for (name, _, _), value in zip(spec, args, strict=False):  # fewer args than fields
            if name in kwargs:
                raise TypeError(f"{self.__class__.__qualname__}() got multiple values for argument {name!r}")
            object.__setattr__(self, name, value)
        for name, default, factory in spec[len(args):]:
            if name in kwargs:
                value = kwargs.pop(name)
            elif default is not MISSING:
                value = default
            elif factory is not MISSING:
                value = factory()
            else:
                raise TypeError(f"{self.__class__.__qualname__}() missing 1 required argument: {name!r}")
            object.__setattr__(self, name, value)
        if kwargs:
            raise TypeError(f"{self.__class__.__qualname__}() got an unexpected keyword argument "
                            f"{next(iter(kwargs))!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Frozen) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))  # type: ignore[arg-type]
        return f"{self.__class__.__qualname__}({inner})"


_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def _frozen(cls: type[_T]) -> type[_T]:
    """A frozen dataclass whose generated methods are _Frozen's (the dataclass machinery only collects the
    fields: init=False, eq=False, repr=False generate nothing)."""
    made = dataclass(init=False, eq=False, repr=False, match_args=False)(cls)
    made._init_spec = tuple((f.name, f.default, f.default_factory)  # type: ignore[attr-defined]
                            for f in fields(made))  # type: ignore[arg-type]
    return made


@_frozen
class WorkspaceDirs(_Frozen):
    """[workspace]: the folders, relative to the workspace root unless absolute."""

    store: str = ".kpipe"
    recipes: str = "recipes"
    patches: str = "patches"


@_frozen
class BuildHost(_Frozen):
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
    cross_arches: tuple[str, ...] = ()  # other arches it cross-builds kbuild modules for (aarch64 on x86_64)

    @property
    def is_local(self) -> bool:
        """True for the host named `local` without an address: builds run on this machine."""
        return self.name == "local" and not self.address

    def tool(self, name: str) -> str:
        """The path of a build tool on this host (its `tools` entry, else the bare name)."""
        return self.tools.get(name, name)

    def accepts(self, release: str, arch: str) -> bool:
        """Whether this host builds for a kernel release and arch."""
        return (arch in ("", "unknown") or self.arch == arch or arch in self.cross_arches) and any(
            fnmatch.fnmatchcase(release, g) for g in self.kernels
        )


@_frozen
class KernelEntry(_Frozen):
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


@_frozen
class SshSettings(_Frozen):
    """[ssh]: host keys, identity, timeouts and fan-out width."""

    known_hosts: str = "~/.ssh/known_hosts"
    accept_new_host_keys: bool = False  # strict by default
    identity_file: str = ""
    ssh_config: str = "~/.ssh/config"
    connect_timeout: float = 10.0
    command_timeout: float = 600.0  # 0 = no limit
    forks: int = 50
    kex: tuple[str, ...] = ()  # empty = paramiko's defaults; pinning is the user's choice


@_frozen
class SignerConfig(_Frozen):
    """A signer: builtin (key + cert) or an external argv template."""

    name: str
    type: str = "builtin"  # builtin | command
    key: str = ""
    cert: str = ""
    hash: str = "sha256"
    keyid: bool = False  # name the signer by subject key identifier (sign-file -k)
    argv: tuple[str, ...] = ()  # for type=command: "{module}", "{output}", "{key}", "{cert}", "{hash}"
    sm2_user_id: str | None = None  # SM2 Z_A convention; None = no Z_A (kernel PKCS#7 style)


@_frozen
class SigningSettings(_Frozen):
    """[signing]: the default signer and every [signing.signers.NAME]."""

    default: str = ""
    signers: dict[str, SignerConfig] = field(default_factory=dict)


@_frozen
class FleetSettings(_Frozen):
    """[fleet]: inventory sources and how long a dynamic inventory script may run."""

    inventories: tuple[str, ...] = ()
    inventory_timeout: float = DEFAULT_INVENTORY_TIMEOUT  # seconds per script source
    workers: int = 0  # fan-out worker processes; 0 = one per core, 1 = in-process (kpipe.transport.workers)


@_frozen
class LabKernel(_Frozen):
    """[lab.kernels."RELEASE"]: a bootable kernel of the user's own."""

    image: str
    modules: str = ""


@_frozen
class LabSettings(_Frozen):
    """[lab]: defaults of `kpipe lab up` and `kpipe preflight`."""

    cache_dir: str = ""
    vms: int = 1
    memory: int = 256  # MiB per guest
    append: str = ""  # extra kernel arguments
    kernels: dict[str, LabKernel] = field(default_factory=dict)


@_frozen
class AuditSettings(_Frozen):
    """[audit]: the desired-state file and the taint letters that are not a finding."""

    desired: str = ""
    allowed_taint: tuple[str, ...] | None = None  # None = kpipe's default (O, E, K)


@_frozen
class ValidationSettings(_Frozen):
    """[validation]: strict turns warnings into errors."""

    strict: bool = False


@_frozen
class AnsibleSettings(_Frozen):
    """[ansible]: the Ansible engine's settings."""

    python_interpreter: str = "auto_silent"


@_frozen
class HealthSettings(_Frozen):
    """[rollout.health]: an argv run on each patched host at every gate tick (exit 0 = healthy)."""

    command: tuple[str, ...] = ()
    timeout: float = 10.0


@_frozen
class PrometheusSettings(_Frozen):
    """[rollout.prometheus]: an instant PromQL query per gate tick; a host breaking `threshold` fails."""

    url: str = ""
    query: str = ""
    threshold: float = 0.0
    host_label: str = "instance"
    fail_when: str = "above"
    timeout: float = 10.0


@_frozen
class RolloutSettings(_Frozen):
    """[rollout]: the gate's extra checks ([rollout.health], [rollout.prometheus]); None = not configured."""

    health: HealthSettings | None = None
    prometheus: PrometheusSettings | None = None


@_frozen
class Settings(_Frozen):
    """Every section of one kpipe.toml, typed."""

    file: Path
    workspace: WorkspaceDirs = field(default_factory=WorkspaceDirs)
    build_hosts: tuple[BuildHost, ...] = ()
    kernels: tuple[KernelEntry, ...] = ()
    ssh: SshSettings = field(default_factory=SshSettings)
    signing: SigningSettings = field(default_factory=SigningSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    lab: LabSettings = field(default_factory=LabSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    ansible: AnsibleSettings = field(default_factory=AnsibleSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)


SECTIONS = ("workspace", "build_hosts", "kernels", "ssh", "signing", "fleet", "lab", "audit", "validation", "ansible",
            "rollout")


# -- where each key is: a position scanner over valid TOML ----------------------------------------

Path_ = tuple[str | int, ...]  # a key path: ("ssh", "forks"), ("build_hosts", 0, "port"), ("fleet", "inventories", 1)

_BARE = re.compile(r"[A-Za-z0-9_-]+")


class _Scanner:
    """Walks TOML text that tomllib accepted and records the line where each key path is written."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0
        self.n = len(text)
        self.starts = [0] + [m.end() for m in re.finditer(r"\n", text)]
        self.lines: dict[Path_, int] = {}
        self.aot: dict[Path_, int] = {}  # concrete path of an array of tables -> elements so far

    def line(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos)

    def mark(self, path: Path_, pos: int, *, first: bool = False) -> None:
        if first:
            self.lines.setdefault(path, self.line(pos))
        else:
            self.lines[path] = self.line(pos)

    def peek(self, k: int = 1) -> str:
        return self.s[self.i:self.i + k]

    def ws(self, newlines: bool = False) -> None:
        while self.i < self.n:
            c = self.s[self.i]
            if c in " \t" or (newlines and c in "\r\n"):
                self.i += 1
            elif newlines and c == "#":
                self.comment()
            else:
                return

    def comment(self) -> None:
        while self.i < self.n and self.s[self.i] != "\n":
            self.i += 1

    def document(self) -> dict[Path_, int]:
        table: Path_ = ()
        while self.i < self.n:
            self.ws(newlines=True)
            if self.i >= self.n:
                break
            start = self.i
            if self.peek(2) == "[[":
                self.i += 2
                keys = self.key("]")
                self.i += 2  # ]]
                table = self.header(keys, start, array=True)
            elif self.peek() == "[":
                self.i += 1
                keys = self.key("]")
                self.i += 1
                table = self.header(keys, start, array=False)
            else:
                keys = self.key("=")
                self.keyval(table, keys, start)
            self.ws()
            if self.peek() == "#":
                self.comment()
        return self.lines

    def header(self, keys: list[str], pos: int, *, array: bool) -> Path_:
        path: Path_ = ()
        for j, k in enumerate(keys):
            path = path + (k,)
            last = j == len(keys) - 1
            if last and array:
                idx = self.aot.get(path, 0)
                self.aot[path] = idx + 1
                self.mark(path, pos, first=True)
                path = path + (idx,)
                self.mark(path, pos)
            else:
                self.mark(path, pos, first=not last)
                if not last and path in self.aot:
                    path = path + (self.aot[path] - 1,)  # a sub-table of the latest element
        return path

    def keyval(self, table: Path_, keys: list[str], pos: int) -> None:
        path = table
        for k in keys:
            path = path + (k,)
            self.mark(path, pos, first=len(path) < len(table) + len(keys))
        self.ws()
        self.i += 1  # =
        self.ws()
        self.value(path)

    def key(self, end: str) -> list[str]:
        keys = []
        while True:
            self.ws()
            c = self.peek()
            if c == '"':
                j = self.basic_end(self.i)
                keys.append(tomllib.loads("k = " + self.s[self.i:j])["k"])
                self.i = j
            elif c == "'":
                j = self.s.index("'", self.i + 1)
                keys.append(self.s[self.i + 1:j])
                self.i = j + 1
            else:
                m = _BARE.match(self.s, self.i)
                if not m:
                    raise ValueError(f"no key at {self.i}")
                keys.append(m.group())
                self.i = m.end()
            self.ws()
            if self.peek() == ".":
                self.i += 1
                continue
            if self.peek() != end:
                raise ValueError(f"expected {end!r} at {self.i}")
            return keys

    def basic_end(self, i: int) -> int:
        j = i + 1
        while self.s[j] != '"':
            j += 2 if self.s[j] == "\\" else 1
        return j + 1

    def multiline_end(self, i: int, quote: str) -> int:
        j = i + 3
        while True:
            if quote == '"' and self.s[j] == "\\":
                j += 2
                continue
            if self.s.startswith(quote * 3, j):
                k = j + 3
                extra = 0
                while extra < 2 and k < self.n and self.s[k] == quote:  # up to two quotes end the content
                    k += 1
                    extra += 1
                return k
            j += 1

    def value(self, path: Path_) -> None:
        c = self.peek()
        if self.peek(3) in ('"""', "'''"):
            self.i = self.multiline_end(self.i, c)
        elif c == '"':
            self.i = self.basic_end(self.i)
        elif c == "'":
            self.i = self.s.index("'", self.i + 1) + 1
        elif c == "[":
            self.i += 1
            idx = 0
            while True:
                self.ws(newlines=True)
                if self.peek() == "]":
                    self.i += 1
                    return
                item = path + (idx,)
                self.mark(item, self.i)
                self.value(item)
                self.ws(newlines=True)
                if self.peek() == ",":
                    self.i += 1
                    idx += 1
        elif c == "{":
            self.i += 1
            while True:
                self.ws(newlines=True)
                if self.peek() == "}":
                    self.i += 1
                    return
                start = self.i
                keys = self.key("=")
                sub = path
                for k in keys:
                    sub = sub + (k,)
                    self.mark(sub, start, first=True)
                self.mark(sub, start)
                self.ws()
                self.i += 1  # =
                self.ws()
                self.value(sub)
                self.ws(newlines=True)
                if self.peek() == ",":
                    self.i += 1
        else:  # number, boolean, date-time (which may hold one space)
            while self.i < self.n and self.s[self.i] not in ",]}#\r\n":
                self.i += 1


def toml_lines(text: str) -> dict[Path_, int]:
    """The 1-based line of every key path in TOML text that tomllib accepted.

    Paths name table keys by string and array (or array-of-tables) elements by index. Text the
    scanner cannot follow yields the lines found so far: errors then point at the nearest
    enclosing table instead of a wrong line.
    """
    scanner = _Scanner(text)
    try:
        scanner.document()
    except (ValueError, IndexError, tomllib.TOMLDecodeError):
        pass
    return scanner.lines


# -- reading ---------------------------------------------------------------------------------------


def _field(path: Iterable[Any]) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif out:
            out += "." + (p if _BARE.fullmatch(p) else _quoted(p))
        else:
            out = p if _BARE.fullmatch(p) else _quoted(p)
    return out


def _quoted(key: str) -> str:
    # a key as TOML writes it when it is not bare: "6.1.0-57-amd64"
    import json

    return json.dumps(key, ensure_ascii=False)


def _type(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return "a date/time" if hasattr(v, "isoformat") else type(v).__name__


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """'did you mean 'x'? ' for the closest choice, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


@_frozen
class SettingsProblem(_Frozen):
    """One problem of kpipe.toml: where, what, and a hint."""

    file: Path
    line: int
    message: str
    hint: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class _Reader:
    """Typed reads of the parsed document; each problem is recorded with its line, the first raised."""

    def __init__(self, file: Path, text: str):
        self.file = file
        self.lines = toml_lines(text)
        self.problems: list[SettingsProblem] = []

    def line(self, path: Path_) -> int:
        p = path
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return 1

    def error(self, path: Path_, message: str, hint: str) -> None:
        self.problems.append(SettingsProblem(self.file, self.line(path), message, hint))

    def raise_first(self) -> None:
        if not self.problems:
            return
        first = self.problems[0]
        more = f" (+{len(self.problems) - 1} more problem(s))" if len(self.problems) > 1 else ""
        raise ConfigError(f"{first}{more}", hint=first.hint)

    # -- containers

    def table(self, value: Any, path: Path_, allowed: tuple[str, ...] | None, *, what: str = "") -> dict[str, Any]:
        """A table (or {} after reporting a problem); unknown keys are reported with a did-you-mean."""
        if not isinstance(value, dict):
            self.error(path, f"{_field(path)} must be a table, got {_type(value)} {_shown(value)}",
                       what or f"write it as [{_field(path)}] with key = value lines under it")
            return {}
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    where = f"[{_field(path)}]" if path else "kpipe.toml"
                    v = value[key]
                    kind = "table" if not path and (isinstance(v, dict) or (
                        isinstance(v, list) and v and all(isinstance(x, dict) for x in v))) else "key"
                    home = _KEY_HOMES.get(key) if not path else None
                    self.error(path + (key,), f"unknown {kind} {key!r} in {where}",
                               (f"{key} belongs under [{home}]; " if home else did_you_mean(key, allowed))
                               + f"known: {', '.join(allowed)}")
        return value

    def tables(self, data: dict[str, Any], key: str, path: Path_,
               allowed: tuple[str, ...]) -> list[tuple[Path_, dict[str, Any]]]:
        """An array of tables ([[key]]) as (path, table) pairs."""
        p = path + (key,)
        value = data.get(key, [])
        if not isinstance(value, list):
            self.error(p, f"{_field(p)} must be an array of tables, got {_type(value)}",
                       f"write each entry under its own [[{_field(p)}]] header")
            return []
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                self.error(p + (i,), f"{_field(p + (i,))} must be a table, got {_type(item)} {_shown(item)}",
                           f"write each entry under its own [[{_field(p)}]] header")
                continue
            out.append((p + (i,), self.table(item, p + (i,), allowed)))
        return out

    # -- scalars

    def string(self, d: dict[str, Any], key: str, path: Path_, default: str = "", *, required: bool = False,
               nonempty: bool = False) -> str:
        p = path + (key,)
        if key not in d:
            if required:
                self.error(path, f"{_field(p)} is required", f"add `{key} = \"...\"` to [{_field(path)}]")
            return default
        v = d[key]
        if not isinstance(v, str):
            self.error(p, f"{_field(p)} must be a string, got {_type(v)} {_shown(v)}", "write it in double quotes")
            return default
        if (nonempty or required) and not v.strip():
            self.error(p, f"{_field(p)} must not be empty", f"give {key} a value or remove the line")
            return default
        if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in v):
            self.error(p, f"{_field(p)} contains a control character: {_shown(v)}", "remove it")
            return default
        return v

    def boolean(self, d: dict[str, Any], key: str, path: Path_, default: bool) -> bool:
        p = path + (key,)
        if key not in d:
            return default
        v = d[key]
        if isinstance(v, bool):
            return v
        hint = "write true or false without quotes"
        if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            hint = f"write {key} = {'true' if v.strip().lower() in ('true', 'yes', 'on', '1') else 'false'} " \
                   "(a quoted string is not a boolean)"
        self.error(p, f"{_field(p)} must be true or false, got {_type(v)} {_shown(v)}", hint)
        return default

    def integer(self, d: dict[str, Any], key: str, path: Path_, default: int, *, minimum: int, maximum: int) -> int:
        p = path + (key,)
        if key not in d:
            return default
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int):
            self.error(p, f"{_field(p)} must be an integer, got {_type(v)} {_shown(v)}",
                       f"write a whole number from {minimum} to {maximum} without quotes")
            return default
        if not minimum <= v <= maximum:
            self.error(p, f"{_field(p)} must be from {minimum} to {maximum}, got {v}",
                       f"use a value from {minimum} to {maximum}")
            return default
        return v

    def number(self, d: dict[str, Any], key: str, path: Path_, default: float, *, minimum: float, maximum: float,
               above: bool = False) -> float:
        """A float or integer in [minimum, maximum] ((minimum, maximum] with above=True); never nan/inf."""
        p = path + (key,)
        if key not in d:
            return default
        v = d[key]
        low = f"above {minimum:g}" if above else f"at least {minimum:g}"
        hint = f"write a number of seconds {low} and at most {maximum:g}, without quotes"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.error(p, f"{_field(p)} must be a number, got {_type(v)} {_shown(v)}", hint)
            return default
        v = float(v)
        if math.isnan(v) or not (minimum < v if above else minimum <= v) or v > maximum:
            self.error(p, f"{_field(p)} must be {low} and at most {maximum:g}, got {v:g}", hint)
            return default
        return v

    def choice(self, d: dict[str, Any], key: str, path: Path_, default: str, choices: tuple[str, ...], *,
               empty_ok: bool = False) -> str:
        p = path + (key,)
        if key not in d:
            return default
        v = d[key]
        if not isinstance(v, str):
            self.error(p, f"{_field(p)} must be one of {', '.join(choices)}, got {_type(v)} {_shown(v)}",
                       f"write one of {', '.join(choices)} in double quotes")
            return default
        if v in choices or (empty_ok and v == ""):
            return v
        known = f"is not one of {', '.join(choices)}" if len(choices) <= 6 else "is not a known value"
        self.error(p, f"{_field(p)} {v!r} {known}", did_you_mean(v, choices) + f"known: {', '.join(choices)}")
        return default

    def str_list(self, d: dict[str, Any], key: str, path: Path_, default: tuple[str, ...] = (), *,
                 single_ok: bool = False, nonempty_items: bool = True) -> tuple[str, ...]:
        p = path + (key,)
        if key not in d:
            return default
        v = d[key]
        if single_ok and isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            self.error(p, f"{_field(p)} must be an array of strings, got {_type(v)} {_shown(v)}",
                       f'write {key} = ["...", "..."]')
            return default
        out = []
        for i, item in enumerate(v):
            if not isinstance(item, str):
                self.error(p + (i,), f"{_field(p + (i,))} must be a string, got {_type(item)} {_shown(item)}",
                           "write each item in double quotes")
                return default
            if nonempty_items and not item.strip():
                self.error(p + (i,), f"{_field(p + (i,))} must not be empty", "remove the empty item")
                return default
            out.append(item)
        return tuple(out)

    def str_map(self, d: dict[str, Any], key: str, path: Path_) -> dict[str, str]:
        p = path + (key,)
        if key not in d:
            return {}
        table = self.table(d[key], p, None, what=f'write {key} = {{ "name" = "value" }}')
        out = {}
        for k, v in table.items():
            s = self.string(table, k, p, nonempty=True)
            if isinstance(v, str) and s:
                out[k] = s
        return out


# -- the sections, one reader each -----------------------------------------------------------------


def _workspace(r: _Reader, data: dict[str, Any]) -> WorkspaceDirs:
    p = ("workspace",)
    d = r.table(data.get("workspace", {}), p, ("store", "recipes", "patches"))
    return WorkspaceDirs(store=r.string(d, "store", p, ".kpipe", nonempty=True),
                         recipes=r.string(d, "recipes", p, "recipes", nonempty=True),
                         patches=r.string(d, "patches", p, "patches", nonempty=True))


_BUILD_HOST_KEYS = ("name", "address", "user", "port", "arch", "kernels", "workdir", "slots", "identity_file",
                    "tools", "cross_arches")


def _build_hosts(r: _Reader, data: dict[str, Any]) -> tuple[BuildHost, ...]:
    hosts: list[BuildHost] = []
    seen: dict[str, Path_] = {}
    for p, h in r.tables(data, "build_hosts", (), _BUILD_HOST_KEYS):
        from kpipe.kernel import normalize_arch  # here: a kpipe.toml without build hosts does not need it

        name = r.string(h, "name", p, required=True)
        if name and name in seen:
            r.error(p + ("name",), f"build host name {name!r} repeats (first at line {r.line(seen[name])})",
                    "give every [[build_hosts]] entry its own name")
        seen.setdefault(name, p + ("name",))
        hosts.append(BuildHost(
            name=name,
            address=r.string(h, "address", p),
            user=r.string(h, "user", p),
            port=r.integer(h, "port", p, 22, minimum=1, maximum=65535),
            arch=normalize_arch(r.string(h, "arch", p, "x86_64", nonempty=True)),
            kernels=r.str_list(h, "kernels", p, ("*",), single_ok=True),
            workdir=r.string(h, "workdir", p, "~/.cache/kpipe/builds", nonempty=True),
            slots=r.integer(h, "slots", p, 1, minimum=1, maximum=1024),
            identity_file=r.string(h, "identity_file", p),
            tools=r.str_map(h, "tools", p),
            cross_arches=tuple(normalize_arch(a) for a in r.str_list(h, "cross_arches", p, (), single_ok=True)),
        ))
    return tuple(hosts)


_KERNEL_KEYS = ("release", "arch", "distro", "source", "vmlinux", "config", "headers", "builder", "symbols",
                "sig_hash", "vermagic", "options")


def _kernels(r: _Reader, data: dict[str, Any]) -> tuple[KernelEntry, ...]:
    out: list[KernelEntry] = []
    seen: dict[str, Path_] = {}
    for p, k in r.tables(data, "kernels", (), _KERNEL_KEYS):
        from kpipe.kernel import check_release, normalize_arch, parse_release  # here: only [[kernels]] need it

        release = r.string(k, "release", p, required=True)
        if release:
            try:
                check_release(release)
            except ConfigError as e:
                r.error(p + ("release",), f"{_field(p + ('release',))}: {e.message}", e.hint or "fix the release")
                release = ""
        strs = {key: r.string(k, key, p) for key in ("source", "vmlinux", "config", "headers", "vermagic")}
        arch = r.string(k, "arch", p)
        distro = r.choice(k, "distro", p, "", DISTROS, empty_ok=True)
        builder = r.choice(k, "builder", p, "", BUILDERS, empty_ok=True)
        symbols = r.str_list(k, "symbols", p, single_ok=True)
        sig_hash = r.choice(k, "sig_hash", p, "", KERNEL_HASHES, empty_ok=True)
        options = r.table(k["options"], p + ("options",), None) if "options" in k else {}
        if not release:
            continue
        if release in seen:
            r.error(p + ("release",), f"kernel {release!r} repeats (first at line {r.line(seen[release])})",
                    "keep one [[kernels]] entry per release")
            continue
        seen[release] = p + ("release",)
        parsed = parse_release(release)
        out.append(KernelEntry(
            release=release, arch=normalize_arch(arch) if arch else parsed.arch, distro=distro or parsed.distro,
            builder=builder, symbols=symbols, sig_hash=sig_hash, options=dict(options), **strs,
        ))
    return tuple(out)


_SSH_KEYS = ("known_hosts", "accept_new_host_keys", "identity_file", "ssh_config", "connect_timeout",
             "command_timeout", "forks", "kex")


def _ssh(r: _Reader, data: dict[str, Any]) -> SshSettings:
    p = ("ssh",)
    d = r.table(data.get("ssh", {}), p, _SSH_KEYS)
    base = SshSettings()
    return SshSettings(
        known_hosts=r.string(d, "known_hosts", p, base.known_hosts, nonempty=True),
        accept_new_host_keys=r.boolean(d, "accept_new_host_keys", p, base.accept_new_host_keys),
        identity_file=r.string(d, "identity_file", p),
        ssh_config=r.string(d, "ssh_config", p, base.ssh_config, nonempty=True),
        connect_timeout=r.number(d, "connect_timeout", p, base.connect_timeout, minimum=0, maximum=3600, above=True),
        command_timeout=r.number(d, "command_timeout", p, base.command_timeout, minimum=0, maximum=7 * 86400),
        forks=r.integer(d, "forks", p, base.forks, minimum=1, maximum=10000),
        kex=_kex(r, d, p),
    )


def _kex(r: _Reader, d: dict[str, Any], p: Path_) -> tuple[str, ...]:
    names = r.str_list(d, "kex", p)
    if names:
        from kpipe.transport.sshlibs import import_ssh_libraries

        import_ssh_libraries()  # without unittest.mock and asyncio (kpipe.transport.sshlibs)
        import paramiko  # only when kex is pinned: paramiko is slow to import

        # private, so types-paramiko leaves it out; it is the list paramiko really negotiates from
        known = tuple(paramiko.Transport._preferred_kex)  # type: ignore[attr-defined]
        for i, name in enumerate(names):
            if name not in known:
                r.error(p + ("kex", i), f"ssh.kex[{i}] {name!r} is not a key exchange paramiko knows",
                        did_you_mean(name, known) + f"known: {', '.join(known)}")
    return names


_SIGNER_KEYS = ("type", "key", "cert", "hash", "keyid", "argv", "sm2_user_id")


def _signing(r: _Reader, data: dict[str, Any]) -> SigningSettings:
    p = ("signing",)
    d = r.table(data.get("signing", {}), p, ("default", "signers"))
    signers: dict[str, SignerConfig] = {}
    sp = p + ("signers",)
    table = r.table(d["signers"], sp, None) if "signers" in d else {}
    for name, s in table.items():
        q = sp + (name,)
        s = r.table(s, q, _SIGNER_KEYS)
        kind = r.choice(s, "type", q, "builtin", SIGNER_TYPES)
        signers[name] = SignerConfig(
            name=name, type=kind, key=r.string(s, "key", q), cert=r.string(s, "cert", q),
            # a builtin signer signs with kpipe's own code; a command may use any hash the kernel knows
            hash=r.choice(s, "hash", q, "sha256", SIGN_HASHES if kind == "builtin" else KERNEL_HASHES),
            keyid=r.boolean(s, "keyid", q, False),
            argv=r.str_list(s, "argv", q),
            sm2_user_id=r.string(s, "sm2_user_id", q) if "sm2_user_id" in s else None,
        )
        if kind == "command" and "argv" in s and not signers[name].argv:
            r.error(q + ("argv",), f"{_field(q + ('argv',))} must not be empty for type = \"command\"",
                    'e.g. argv = ["/usr/bin/sign", "{hash}", "{module}", "{output}"]')
    default = r.string(d, "default", p)
    if default and default not in signers and not r.problems:
        r.error(p + ("default",), f"signing.default names signer {default!r}, which is not defined",
                did_you_mean(default, signers) + f"signers: {', '.join(sorted(signers)) or 'none'}; "
                f"add [signing.signers.{default}]")
    return SigningSettings(default=default, signers=signers)


def _fleet(r: _Reader, data: dict[str, Any]) -> FleetSettings:
    p = ("fleet",)
    d = r.table(data.get("fleet", {}), p, ("inventories", "inventory_timeout", "workers"))
    return FleetSettings(inventories=r.str_list(d, "inventories", p, single_ok=True),
                         inventory_timeout=r.number(d, "inventory_timeout", p, DEFAULT_INVENTORY_TIMEOUT,
                                                    minimum=0, maximum=86400, above=True),
                         workers=r.integer(d, "workers", p, 0, minimum=0, maximum=256))


def _lab(r: _Reader, data: dict[str, Any]) -> LabSettings:
    p = ("lab",)
    d = r.table(data.get("lab", {}), p, ("cache_dir", "vms", "memory", "append", "kernels"))
    kernels: dict[str, LabKernel] = {}
    kp = p + ("kernels",)
    for release, k in (r.table(d["kernels"], kp, None) if "kernels" in d else {}).items():
        q = kp + (release,)
        from kpipe.kernel import check_release

        try:
            check_release(release)
        except ConfigError as e:
            r.error(q, f"[{_field(q)}]: {e.message}", e.hint or "name the table by the kernel's release")
            continue
        k = r.table(k, q, ("image", "modules"), what=f'write [lab.kernels."{release}"] with image = "..." under it')
        image = r.string(k, "image", q, required=True)
        if image:
            kernels[release] = LabKernel(image=image, modules=r.string(k, "modules", q))
    return LabSettings(cache_dir=r.string(d, "cache_dir", p), vms=r.integer(d, "vms", p, 1, minimum=1, maximum=16),
                       memory=r.integer(d, "memory", p, 256, minimum=96, maximum=1 << 20),
                       append=r.string(d, "append", p), kernels=kernels)


def _audit(r: _Reader, data: dict[str, Any]) -> AuditSettings:
    p = ("audit",)
    d = r.table(data.get("audit", {}), p, ("desired", "allowed_taint"))
    allowed: tuple[str, ...] | None = None
    if "allowed_taint" in d:
        v = d["allowed_taint"]
        letters = list(v) if isinstance(v, str) else v
        q = p + ("allowed_taint",)
        if not isinstance(letters, list) or not all(isinstance(x, str) for x in letters):
            r.error(q, f"audit.allowed_taint must be taint letters, got {_type(v)} {_shown(v)}",
                    'write e.g. allowed_taint = "OEK" or ["O", "E", "K"]')
        else:
            norm = [x.strip().upper() for x in letters if x.strip()]
            bad = [x for x in norm if x not in TAINT_LETTERS or len(x) != 1]
            if bad:
                r.error(q, f"audit.allowed_taint has unknown taint letter(s) {', '.join(map(repr, bad))}",
                        f"taint letters: {TAINT_LETTERS}")
            else:
                allowed = tuple(norm)
    return AuditSettings(desired=r.string(d, "desired", p), allowed_taint=allowed)


def _validation(r: _Reader, data: dict[str, Any]) -> ValidationSettings:
    p = ("validation",)
    d = r.table(data.get("validation", {}), p, ("strict",))
    return ValidationSettings(strict=r.boolean(d, "strict", p, False))


def _ansible(r: _Reader, data: dict[str, Any]) -> AnsibleSettings:
    p = ("ansible",)
    d = r.table(data.get("ansible", {}), p, ("python_interpreter",))
    return AnsibleSettings(python_interpreter=r.string(d, "python_interpreter", p, "auto_silent", nonempty=True))


def _rollout(r: _Reader, data: dict[str, Any]) -> RolloutSettings:
    p = ("rollout",)
    d = r.table(data.get("rollout", {}), p, ("health", "prometheus"))
    health = prom = None
    if "health" in d:
        q = p + ("health",)
        h = r.table(d["health"], q, ("command", "timeout"))
        if isinstance(d["health"], dict):
            if "command" not in h:
                r.error(q, "rollout.health.command is required",
                        'add command = ["/usr/local/bin/check-service", "--quiet"] (an argv, run without a shell)')
            argv = r.str_list(h, "command", q)
            if "command" in h and isinstance(h["command"], list) and not h["command"]:
                r.error(q + ("command",), "rollout.health.command must not be empty",
                        'give the argv to run, e.g. command = ["systemctl", "is-active", "nginx"]')
            timeout = r.number(h, "timeout", q, 10.0, minimum=0, maximum=3600, above=True)
            if argv:
                health = HealthSettings(argv, timeout)
    if "prometheus" in d:
        q = p + ("prometheus",)
        m = r.table(d["prometheus"], q, ("url", "query", "threshold", "host_label", "fail_when", "timeout"))
        if isinstance(d["prometheus"], dict):
            url = r.string(m, "url", q, required=True)
            if url and not re.match(r"^https?://[^/\s]+", url):
                r.error(q + ("url",), f"rollout.prometheus.url {url!r} is not an http(s) URL",
                        'write the server\'s base URL, e.g. url = "http://prometheus.example:9090"')
            query = r.string(m, "query", q, required=True)
            threshold = 0.0
            if "threshold" not in m:
                r.error(q, "rollout.prometheus.threshold is required",
                        "add threshold = 0.5 (a host whose value is above it fails)")
            else:
                v = m["threshold"]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
                    r.error(q + ("threshold",), f"rollout.prometheus.threshold must be a number, got {_type(v)} "
                            f"{_shown(v)}", "write a number without quotes, e.g. threshold = 0.5")
                else:
                    threshold = float(v)
            prom = PrometheusSettings(url=url, query=query, threshold=threshold,
                                      host_label=r.string(m, "host_label", q, "instance", nonempty=True),
                                      fail_when=r.choice(m, "fail_when", q, "above", ("above", "below")),
                                      timeout=r.number(m, "timeout", q, 10.0, minimum=0, maximum=300, above=True))
    return RolloutSettings(health=health, prometheus=prom)


# A key written above every [section] header: which section it belongs to.
_KEY_HOMES = {
    **{k: "ssh" for k in _SSH_KEYS}, **{k: "fleet" for k in ("inventories", "inventory_timeout", "workers")},
    **{k: "workspace" for k in ("store", "recipes", "patches")}, "strict": "validation",
    "python_interpreter": "ansible", "desired": "audit", "allowed_taint": "audit", "cache_dir": "lab",
    "vms": "lab", "memory": "lab", "append": "lab", "default": "signing",
}

_SECTION_READERS: tuple[tuple[str, Callable[[_Reader, dict[str, Any]], Any]], ...] = (
    ("workspace", _workspace), ("build_hosts", _build_hosts), ("kernels", _kernels), ("ssh", _ssh),
    ("signing", _signing), ("fleet", _fleet), ("lab", _lab), ("audit", _audit), ("validation", _validation),
    ("ansible", _ansible), ("rollout", _rollout),
)


def decode_toml(file: Path, data: bytes) -> tuple[str, dict[str, Any]]:
    """The text and the parsed document of kpipe.toml bytes; ConfigError at file:line otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{file}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {col})",
                          hint="save kpipe.toml as UTF-8") from None
    text = text.removeprefix("\ufeff")  # a BOM some editors write
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column (\d+)\)$", msg)
        if m:
            raise ConfigError(f"{file}:{m[1]}: {msg[:m.start()].strip()} (column {m[2]})",
                              hint="fix the TOML syntax") from None
        m = re.search(r"\(at end of document\)$", msg)
        where = f"{file}:{text.count(chr(10)) + 1}" if m else str(file)
        raise ConfigError(f"{where}: {msg}", hint="fix the TOML syntax") from None


def parse_settings(file: Path, data: bytes) -> Settings:
    """Every section of kpipe.toml, typed and checked; ConfigError names file:line, the field and a fix."""
    text, doc = decode_toml(file, data)
    r = _Reader(file, text)
    r.table(doc, (), SECTIONS)
    values = {name: read(r, doc) for name, read in _SECTION_READERS}
    r.raise_first()
    return Settings(file=file, **values)
