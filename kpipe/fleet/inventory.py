"""The fleet's hosts: kpipe's own fleet file and Ansible inventories, read by ansible-core.

Sources (``load_inventory(workspace)`` with ``sources=None``), in this order:

1. every path in ``[fleet] inventories`` of kpipe.toml (files, folders, executable
   dynamic inventory scripts);
2. ``<workspace>/fleet.yml`` (or ``fleet.yaml``) when present;
3. ``<workspace>/.lab/inventory.yml`` when present (written by ``kpipe lab up``).

A file named ``fleet.yml`` / ``fleet.yaml`` or ``*.fleet.yml`` / ``*.fleet.yaml`` is in
kpipe's own format; anything else is handed to ansible-core's InventoryManager, whose
plugins (ini, yaml, toml, script, auto) parse it exactly as ``ansible -i`` would,
including ``group_vars/`` and ``host_vars/`` folders beside it (read through
VariableManager). kpipe never parses INI itself.

kpipe's fleet file (YAML)::

    defaults:            # optional, applied to every host of this file
      user: root
      port: 22
      identity_file: ~/.ssh/fleet_ed25519
      become: false
      known_hosts: ~/.ssh/known_hosts_fleet
    hosts:
      web1: {address: 10.0.0.11}
      web2: {address: 10.0.0.12, port: 2222, user: ops, become: true}
      db1:                                   # address defaults to the name
        vars: {rack: r7}
    groups:
      web: {hosts: [web1, web2], vars: {tier: front}}
      prod: {children: [web], hosts: [db1]}

Per host keys: address, port, user, identity_file, become, known_hosts, vars (a
mapping). Per group keys: hosts (list), children (list), vars (mapping). Unknown
keys are errors. Relative paths are relative to the file's folder.

Connection values come from these host variables (Ansible's names):
``ansible_host``, ``ansible_port``, ``ansible_user``, ``ansible_ssh_private_key_file``,
``ansible_become`` and kpipe's ``kpipe_known_hosts`` (an extra known_hosts file for
that host). Host variables are data: they are never templated (Jinja in Ansible
inventories can run lookups on the controller) and never reach a shell; values that
could be taken for options or that hold control characters are refused.

Patterns are Ansible's, evaluated by ``InventoryManager.get_hosts``: ``all``, a group,
a host, globs (``web*``), regexes (``~web[0-9]+``), unions ``a:b`` (or ``a,b``),
intersections ``a:&b``, exclusions ``a:!b`` and subscripts ``web[0:2]``. One deliberate
difference: an invalid or empty regex (``~[``, ``~``) is a ConfigError here, where Ansible
reads it as "every host" (the worst reading for a rollout). A pattern that matches no host
is a NotFoundError. Ansible's warnings are captured (never printed); a source no plugin can
parse is a ConfigError naming the file and the plugin's reason.

A dynamic inventory script runs in a process group of its own, with no stdin, for at most
``[fleet] inventory_timeout`` seconds (default 60; ``--list`` and any ``--host`` calls of one
source share it); past that the group is killed and a ConfigError names the script.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpipe.errors import ConfigError, NotFoundError
from kpipe.host import Host as Host  # noqa: PLC0414  (the record this module produces, re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from kpipe.workspace import Workspace

FLEET_FILE_NAMES = ("fleet.yml", "fleet.yaml")
LAB_INVENTORY = Path(".lab") / "inventory.yml"

# Host names are labels in tables, journals and file names; allow what DNS, Ansible
# and people use, refuse whitespace, control characters, path separators and a
# leading '-' (it would read as an option to any tool that receives it).
_NAME_RE = re.compile(r"^[^\s/\x00-\x1f\x7f-][^\s/\x00-\x1f\x7f]{0,252}$")
# An address is a host name, an IPv4 or an IPv6 address (optionally %zone).
_ADDRESS_RE = re.compile(r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})|\[?[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\]?)$")
_USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.@-]{0,63}\$?$")

_HOST_KEYS = {"address", "port", "user", "identity_file", "become", "known_hosts", "vars"}
_GROUP_KEYS = {"hosts", "children", "vars"}
_DEFAULT_KEYS = _HOST_KEYS - {"address", "vars"}

# One InventoryManager parse at a time: ansible's Display and plugin loader are
# process-wide singletons.
_ANSIBLE_LOCK = threading.RLock()


class Inventory:
    """Hosts and groups from every source, selectable with Ansible host patterns."""

    def __init__(self, manager: Any, loader: Any, sources: Sequence[Path], warnings: Sequence[str] = ()):
        self._manager = manager
        self._loader = loader
        self._variables: Any = None
        self.sources = list(sources)
        self.warnings = list(warnings)  # ansible's non-fatal warnings, captured
        self._cache: dict[str, Host] = {}

    @property
    def host_names(self) -> list[str]:
        """Every explicit host name, in inventory order."""
        return [h.name for h in self._all_ansible_hosts()]

    @property
    def groups(self) -> dict[str, list[str]]:
        """Group name -> host names (children included), without 'all' and 'ungrouped'."""
        out = {}
        for name, group in self._manager.groups.items():
            if name in ("all", "ungrouped"):
                continue
            out[str(name)] = [str(h.name) for h in group.get_hosts()]
        return out

    def __len__(self) -> int:
        return len(self._all_ansible_hosts())

    def _all_ansible_hosts(self) -> list[Any]:
        return [h for h in self._manager.get_hosts("all") if not getattr(h, "implicit", False)]

    def select(self, pattern: str | None = None) -> list[Host]:
        """Hosts matching an Ansible pattern (None or '' = all; `@FILE` reads patterns from a file);
        NotFoundError if none match."""
        pattern = (expand_limit_files(pattern) or "all").strip() or "all"
        if not self.sources:
            raise NotFoundError("no inventory: the workspace names no hosts",
                                hint="create fleet.yml in the workspace root, list Ansible inventories under "
                                     "[fleet] inventories in kpipe.toml, or run `kpipe lab up`")
        if "\n" in pattern or "\x00" in pattern:
            raise ConfigError(f"host pattern {pattern!r} contains a control character")
        from ansible.errors import AnsibleError
        from ansible.inventory.manager import split_host_pattern

        # Ansible treats some invalid regexes (e.g. '~[') as matching every host; for a
        # rollout that is the worst reading, so an invalid regex is an error here.
        for term in split_host_pattern(pattern):
            term = term.lstrip("&!")
            if term.startswith("~"):
                if term == "~":
                    raise ConfigError(f"host pattern {pattern!r}: empty or unparsable regular expression")
                try:
                    re.compile(term[1:])
                except re.error as e:
                    raise ConfigError(f"host pattern {pattern!r}: bad regular expression {term[1:]!r}: {e}") from None
        with _ANSIBLE_LOCK, _captured_warnings() as warnings:
            self._manager.clear_pattern_cache()
            try:
                matched = self._manager.get_hosts(pattern)
            except AnsibleError as e:
                raise ConfigError(f"host pattern {pattern!r}: {_first_line(e)}",
                                  hint="patterns follow Ansible: group, host, glob, ~regex, a:b, a:&b, a:!b") from None
            except re.error as e:
                raise ConfigError(f"host pattern {pattern!r}: bad regular expression: {e}") from None
            hosts = [h for h in matched if not getattr(h, "implicit", False)]
            if not hosts:
                known = ", ".join(sorted(self.groups)) or "none"
                detail = "; ".join(warnings.refresh()) or "no host matched"
                raise NotFoundError(
                    f"host pattern {pattern!r} matches no host ({detail})",
                    hint=f"groups: {known}; sources: {', '.join(map(str, self.sources)) or 'none'}",
                )
            return [self._host(h) for h in hosts]

    def get(self, name: str) -> Host:
        """One host by exact name; NotFoundError if unknown."""
        with _ANSIBLE_LOCK:
            h = self._manager.get_host(name)
        if h is None or getattr(h, "implicit", False):
            raise NotFoundError(f"no host named {name!r} in the inventory")
        return self._host(h)

    def _host(self, ahost: Any) -> Host:
        name = str(ahost.name)
        if name not in self._cache:
            with _ANSIBLE_LOCK, _captured_warnings():
                if self._variables is None:
                    from ansible.vars.manager import VariableManager

                    self._variables = VariableManager(loader=self._loader, inventory=self._manager)
                raw = self._variables.get_vars(host=ahost, include_hostvars=False)
                groups = tuple(sorted(str(g.name) for g in ahost.get_groups() if g.name not in ("all", "ungrouped")))
            # Drop the magic variables first: `groups` lists every host, so converting it per host is O(N^2).
            kept = {k: v for k, v in raw.items() if k not in _HIDDEN_VARS or k in ("inventory_dir", "inventory_file")}
            self._cache[name] = host_from_vars(name, _plain(kept), groups)
        return self._cache[name]


# Magic and connection variables that are not the user's host data.
_HIDDEN_VARS = {
    "groups", "group_names", "inventory_hostname", "inventory_hostname_short", "inventory_file",
    "inventory_dir", "omit", "playbook_dir", "ansible_playbook_python", "ansible_config_file",
    "ansible_facts", "ansible_version", "ansible_check_mode", "ansible_diff_mode", "ansible_forks",
    "ansible_inventory_sources", "ansible_skip_tags", "ansible_run_tags", "ansible_verbosity",
    "ansible_search_path", "ansible_collection_name", "ansible_play_name", "environment",
}


def host_from_vars(name: str, hv: dict[str, Any], groups: tuple[str, ...] = ()) -> Host:
    """A Host from one host's merged Ansible variables; ConfigError on values kpipe cannot use safely."""
    source = hv.get("inventory_file")
    where = f"{source}: host {name!r}" if source else f"host {name!r}"
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: unusable host name (whitespace, control characters, '/' or a leading '-')",
                          hint="rename the host and put the address in ansible_host")
    base = Path(str(hv.get("inventory_dir") or "."))

    def text(var: str, default: str = "") -> str:
        value = hv.get(var, default)
        if value is None:
            return default
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ConfigError(f"{where}: {var} must be a string, got {type(value).__name__}")
        value = str(value)
        if "{{" in value or "{%" in value:
            raise ConfigError(f"{where}: {var} is a Jinja template ({value!r}); "
                              "kpipe reads inventory variables as data",
                              hint="set the resolved value in the inventory")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ConfigError(f"{where}: {var} contains a control character: {value!r}")
        return value

    address = text("ansible_host", name) or name
    if not _ADDRESS_RE.match(address):
        raise ConfigError(f"{where}: ansible_host {address!r} is not a host name or IP address",
                          hint="a host name, IPv4 or IPv6 address; no spaces, no leading '-'")
    raw_port = hv.get("ansible_port", 22)
    try:
        if isinstance(raw_port, bool):
            raise ValueError
        port = int(str(raw_port).strip())
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: ansible_port {raw_port!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where}: ansible_port {port} is outside 1-65535")
    user = text("ansible_user", "root") or "root"
    if not _USER_RE.match(user):
        raise ConfigError(f"{where}: ansible_user {user!r} is not a valid user name")
    identity = text("ansible_ssh_private_key_file") or text("ansible_private_key_file")
    known = text("kpipe_known_hosts")

    def path(value: str) -> str:
        if not value:
            return ""
        if value.startswith("-"):
            raise ConfigError(f"{where}: path {value!r} starts with '-'")
        p = Path(os.path.expanduser(value))
        return str(p if p.is_absolute() else (base / p))

    become = _boolean(hv.get("ansible_become", False), f"{where}: ansible_become")
    user_vars = {k: v for k, v in hv.items() if k not in _HIDDEN_VARS and not k.startswith("ansible_")}
    return Host(name=name, address=address, port=port, user=user, identity_file=path(identity), become=become,
                known_hosts=path(known), groups=groups, vars=user_vars)


def _boolean(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "yes", "y", "true", "t", "on"):
        return True
    if s in ("0", "no", "n", "false", "f", "off", ""):
        return False
    raise ConfigError(f"{where} must be a boolean, got {value!r}")


def _plain(value: Any) -> Any:
    """ansible-core's tagged values -> plain Python (str, int, float, bool, None, list, dict)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    # vault-encrypted values and other objects stay opaque rather than decrypting or executing anything
    return f"<{type(value).__name__}>"


def _first_line(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e)
    return str(msg).strip().splitlines()[0] if str(msg).strip() else type(e).__name__


class _Warnings(list[str]):
    """Warnings captured so far (a list that refreshes from ansible's deferred context)."""

    ctx: Any = None
    fmt: Any = None

    def refresh(self) -> _Warnings:
        if self.ctx is not None:
            self[:] = [" ".join(self.fmt(w, False).split()) for w in self.ctx.get_warnings()]
        return self


@contextlib.contextmanager
def _captured_warnings() -> Iterator[_Warnings]:
    """Collect ansible's Display warnings instead of letting them print to stderr."""
    messages = _Warnings()
    try:
        from ansible._internal._display_utils import DeferredWarningContext, format_message
    except ImportError:  # older ansible-core: patch the Display class for the duration
        from ansible.utils.display import Display

        saved = Display.warning, getattr(Display, "error_as_warning", None), Display.deprecated

        def warn(self: Any, msg: str, *a: Any, **k: Any) -> None:
            messages.append(str(msg))

        def warn_exc(self: Any, msg: Any, exception: BaseException, *a: Any, **k: Any) -> None:
            messages.append(f"{msg or ''} {exception}".strip())

        Display.warning = warn
        Display.error_as_warning = warn_exc
        Display.deprecated = lambda self, *a, **k: None
        try:
            yield messages
        finally:
            Display.warning, Display.error_as_warning, Display.deprecated = saved
        return
    messages.ctx = DeferredWarningContext(variables={})
    messages.fmt = format_message
    with messages.ctx:
        try:
            yield messages
        finally:
            messages.refresh()


def default_sources(workspace: Workspace | None) -> list[Path]:
    """The sources a workspace names: [fleet] inventories, fleet.yml, .lab/inventory.yml."""
    if workspace is None:
        return []
    out = list(workspace.inventories)
    for name in FLEET_FILE_NAMES:
        if (workspace.root / name).is_file():
            out.append(workspace.root / name)
            break
    lab = workspace.root / LAB_INVENTORY
    if lab.is_file():
        out.append(lab)
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def is_kpipe_fleet_file(path: Path) -> bool:
    """True for files in kpipe's own fleet format (by name, see the module docstring)."""
    n = path.name
    return path.is_file() and (n in FLEET_FILE_NAMES or n.endswith(".fleet.yml") or n.endswith(".fleet.yaml"))


class _ScriptClock:
    """The time a dynamic inventory source may take, and what overran it."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.overran: list[str] | None = None  # the argv of the script that was killed

    def restart(self) -> None:
        self.deadline = time.monotonic() + self.timeout
        self.overran = None

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def _bounded_popen(clock: _ScriptClock) -> type:
    """A Popen for ansible's script plugin: its own process group, and killed with it at the deadline."""

    class BoundedPopen(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["start_new_session"] = True  # a process group of its own, so its children die with it
            kwargs.setdefault("stdin", subprocess.DEVNULL)  # never kpipe's terminal (a --yes prompt)
            super().__init__(*args, **kwargs)

        def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[Any, Any]:
            try:
                return super().communicate(input, timeout=clock.remaining())
            except subprocess.TimeoutExpired:
                clock.overran = [str(a) for a in (self.args if isinstance(self.args, list) else [self.args])]
                _kill_group(self)
                raise

    return BoundedPopen


def _kill_group(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """SIGKILL a script's process group and reap it; pipes a stray grandchild holds are closed, not waited on."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a process that left the group still holds the pipes
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait(5)


@contextlib.contextmanager
def _bounded_inventory_scripts(clock: _ScriptClock) -> Iterator[None]:
    """Make ansible's script inventory plugin run scripts under `clock` (it waits for them forever).

    The plugin calls subprocess.Popen(...).communicate() with no timeout; its module gets a
    subprocess namespace whose Popen honours the clock, for the duration (under _ANSIBLE_LOCK).
    """
    from ansible.plugins.loader import inventory_loader

    plugin = inventory_loader.get("script")
    module = sys.modules.get(type(plugin).__module__) if plugin is not None else None
    if module is None or getattr(module, "subprocess", None) is not subprocess:
        yield  # a plugin that runs scripts differently: nothing to bound here
        return

    class _Subprocess:
        def __getattr__(self, name: str) -> Any:
            return getattr(subprocess, name)

    shim = _Subprocess()
    shim.Popen = _bounded_popen(clock)  # type: ignore[attr-defined]
    module.subprocess = shim  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.subprocess = subprocess  # type: ignore[attr-defined]


def inventory_timeout(workspace: Workspace | None) -> float:
    """Seconds a dynamic inventory script may run: [fleet] inventory_timeout (default 60)."""
    from kpipe.settings import DEFAULT_INVENTORY_TIMEOUT

    return workspace.settings.fleet.inventory_timeout if workspace is not None else DEFAULT_INVENTORY_TIMEOUT


def load_inventory(workspace: Workspace | None, sources: Sequence[str | os.PathLike[str]] | None = None) -> Inventory:
    """Read every inventory source with ansible-core; ConfigError names the file that fails.

    A dynamic inventory script that runs longer than [fleet] inventory_timeout is killed with its
    process group: a ConfigError names it."""
    paths = [Path(os.path.expanduser(os.fspath(s))) for s in sources] if sources is not None \
        else default_sources(workspace)
    if workspace is not None:
        paths = [p if p.is_absolute() else workspace.root / p for p in paths]
    for p in paths:
        if not p.exists():
            raise ConfigError(f"inventory source {p} does not exist",
                              hint="fix [fleet] inventories in kpipe.toml or the --inventory path")
    ansible_sources = [p for p in paths if not is_kpipe_fleet_file(p)]
    fleet_files = [p for p in paths if is_kpipe_fleet_file(p)]
    fleet_data = [(p, parse_fleet_file(p)) for p in fleet_files]

    with _ANSIBLE_LOCK:
        _quiet_ansible_env()
        from ansible.errors import AnsibleError
        from ansible.inventory.manager import InventoryManager
        from ansible.parsing.dataloader import DataLoader

        loader = DataLoader()
        clock = _ScriptClock(inventory_timeout(workspace))
        with _captured_warnings() as warnings, _bounded_inventory_scripts(clock):
            try:
                manager = InventoryManager(loader=loader, sources=[str(p) for p in ansible_sources] or [], parse=False)
                for p in ansible_sources:
                    before = len(warnings)
                    clock.restart()
                    try:
                        ok = manager.parse_source(str(p))
                        warnings.refresh()
                    except AnsibleError as e:
                        if clock.overran is not None:
                            raise _script_timeout(p, clock) from None
                        raise ConfigError(f"{p}: {_first_line(e)}", hint="fix the inventory file") from None
                    if clock.overran is not None:
                        raise _script_timeout(p, clock)
                    if not ok:
                        raise ConfigError(f"{p}: not a valid inventory: {_parse_reason(p, warnings[before:])}",
                                          hint="check it with: ansible-inventory -i <file> --list")
                    bad = [w for w in warnings[before:] if "Failed to parse" in w or "Unable to parse" in w]
                    if bad:
                        raise ConfigError(f"{p}: {_parse_reason(p, bad)}", hint="fix the inventory file")
                for p, data in fleet_data:
                    _add_fleet(manager, p, data)
                manager.reconcile_inventory()
                _add_inventory_stage_vars(manager, loader)
            except AnsibleError as e:
                raise ConfigError(f"inventory: {_first_line(e)}", hint="fix the inventory") from None
    return Inventory(manager, loader, paths, warnings)


def _script_timeout(path: Path, clock: _ScriptClock) -> ConfigError:
    argv = clock.overran or [str(path)]
    shown = " ".join(argv[1:])
    return ConfigError(f"{path}: inventory script did not finish within {clock.timeout:g} s"
                       + (f" (running {shown}); " if shown else "; ") + "killed it and its child processes",
                       hint="fix the script, or raise [fleet] inventory_timeout in kpipe.toml")


def _add_inventory_stage_vars(manager: Any, loader: Any) -> None:
    # What InventoryManager.parse_sources does after parsing: vars plugins of stage 'inventory'.
    from ansible.utils.vars import combine_vars
    from ansible.vars.plugins import get_vars_from_inventory_sources

    sources = list(getattr(manager, "_sources", []))
    if not sources:
        return
    for group in manager.groups.values():
        group.vars = combine_vars(group.vars, get_vars_from_inventory_sources(loader, sources, [group], "inventory"))
    for host in manager.hosts.values():
        host.vars = combine_vars(host.vars, get_vars_from_inventory_sources(loader, sources, [host], "inventory"))


def _parse_reason(path: Path, warnings: Sequence[str]) -> str:
    """The most useful plugin failure for a file: the plugin its kind suggests, else the first."""
    if not warnings:
        return "no inventory plugin accepted it"
    suffix = path.suffix.lower()
    preferred = ("'script'",) if os.access(path, os.X_OK) and path.is_file() else \
        ("'yaml'",) if suffix in (".yml", ".yaml") else ("'toml'",) if suffix == ".toml" else ("'ini'",)
    for w in warnings:
        if any(p in w for p in preferred):
            return _clean(w)
    return _clean(warnings[0])


def _clean(message: str) -> str:
    message = " ".join(message.split())
    return message[:500]


def _quiet_ansible_env() -> None:
    # Keep ansible from writing retry files or colour codes; settings read at import time.
    os.environ.setdefault("ANSIBLE_NOCOLOR", "1")
    os.environ.setdefault("ANSIBLE_LOCALHOST_WARNING", "False")
    os.environ.setdefault("ANSIBLE_INVENTORY_UNPARSED_WARNING", "False")


# kpipe's own fleet file ---------------------------------------------------------


@dataclass(frozen=True)
class FleetFile:
    """kpipe's fleet file, validated: hosts -> ansible-style vars, groups -> members."""

    hosts: dict[str, dict[str, Any]]
    groups: dict[str, dict[str, Any]]


def parse_fleet_file(path: Path) -> FleetFile:
    """Read and validate kpipe's fleet file (through the one line-keeping YAML loader); ConfigError
    names file:line and the field."""
    from kpipe.yamlnodes import YamlError, compose_yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        doc, lines, key_lines = compose_yaml(text, what="fleet file", allow_empty=True)
    except YamlError as e:
        raise ConfigError(f"{path}:{e.line}: invalid YAML: {e.message.removeprefix('broken YAML: ')}",
                          hint=e.hint or None) from None
    return fleet_from_data(path, doc if doc is not None else {}, {**lines, **key_lines})


def fleet_from_data(path: Path, doc: Any, lines: Mapping[tuple[Any, ...], int] | None = None) -> FleetFile:
    """Validate an already-loaded fleet document (see the module docstring for the format).

    `lines` maps a field's path (("hosts", "web1", "port")) to its line, for file:line errors."""
    known = lines or {}

    def at(*fld: Any) -> str:
        # the nearest field on the path that has a line (a key's own line wins over its value's)
        for n in range(len(fld), -1, -1):
            if fld[:n] in known:
                return f"{path}:{known[fld[:n]]}"
        return str(path)

    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the fleet file must be a mapping with hosts: and groups:")
    unknown = set(doc) - {"defaults", "hosts", "groups"}
    if unknown:
        raise ConfigError(f"{at(min(map(str, unknown)))}: unknown top-level keys {sorted(map(str, unknown))}",
                          hint="known keys: defaults, hosts, groups")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - _DEFAULT_KEYS:
        raise ConfigError(f"{at('defaults')}: defaults must be a mapping with keys from {sorted(_DEFAULT_KEYS)}")
    hosts_raw = doc.get("hosts") or {}
    if not isinstance(hosts_raw, dict):
        raise ConfigError(f"{at('hosts')}: hosts must be a mapping of host name -> settings")
    hosts: dict[str, dict[str, Any]] = {}
    for name, h in hosts_raw.items():
        where = f"{at('hosts', name)}: hosts.{name}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"{where}: host name {name!r} is not usable (whitespace, control characters, "
                              "'/' or a leading '-')")
        h = {} if h is None else h
        if not isinstance(h, dict):
            raise ConfigError(f"{where} must be a mapping")
        bad = set(h) - _HOST_KEYS
        if bad:
            raise ConfigError(f"{where} has unknown keys {sorted(map(str, bad))}", hint=f"known: {sorted(_HOST_KEYS)}")
        merged = {**defaults, **h}
        hv: dict[str, Any] = {}
        user_vars = merged.get("vars") or {}
        if not isinstance(user_vars, dict):
            raise ConfigError(f"{at('hosts', name, 'vars')}: hosts.{name}.vars must be a mapping")
        hv.update({str(k): v for k, v in user_vars.items()})
        mapping = {"address": "ansible_host", "port": "ansible_port", "user": "ansible_user",
                   "identity_file": "ansible_ssh_private_key_file", "become": "ansible_become",
                   "known_hosts": "kpipe_known_hosts"}
        for key, var in mapping.items():
            if key in merged and merged[key] is not None:
                value = merged[key]
                if key in ("identity_file", "known_hosts") and isinstance(value, str) and value:
                    p = Path(os.path.expanduser(value))
                    value = str(p if p.is_absolute() else path.parent / p)
                hv[var] = value
        # validate now; its errors name the host's line
        host_from_vars(name, {**hv, "inventory_dir": str(path.parent), "inventory_file": at("hosts", name)})
        hosts[name] = hv
    groups_raw = doc.get("groups") or {}
    if not isinstance(groups_raw, dict):
        raise ConfigError(f"{at('groups')}: groups must be a mapping of group name -> members")
    groups: dict[str, dict[str, Any]] = {}
    for gname, g in groups_raw.items():
        where = f"{at('groups', gname)}: groups.{gname}"
        if not isinstance(gname, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", gname):
            raise ConfigError(f"{where}: group names are letters, digits and '_' (Ansible's rule)")
        g = {} if g is None else g
        if not isinstance(g, dict) or set(g) - _GROUP_KEYS:
            raise ConfigError(f"{where} must be a mapping with keys from {sorted(_GROUP_KEYS)}")
        members = g.get("hosts") or []
        children = g.get("children") or []
        gvars = g.get("vars") or {}
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(f"{where}.hosts must be a list of host names")
        if not isinstance(children, list) or not all(isinstance(c, str) for c in children):
            raise ConfigError(f"{where}.children must be a list of group names")
        if not isinstance(gvars, dict):
            raise ConfigError(f"{where}.vars must be a mapping")
        for m in members:
            if m not in hosts:
                raise ConfigError(f"{where}.hosts names {m!r}, which is not under hosts:")
        for c in children:
            if c not in groups_raw:
                raise ConfigError(f"{where}.children names {c!r}, which is not under groups:")
        groups[gname] = {"hosts": members, "children": children, "vars": {str(k): v for k, v in gvars.items()}}
    return FleetFile(hosts=hosts, groups=groups)


def _add_fleet(manager: Any, path: Path, fleet: FleetFile) -> None:
    """Put a validated fleet file into ansible's inventory so that patterns treat it like any source."""
    for name, hv in fleet.hosts.items():
        manager.add_host(name, group="all")
        host = manager.get_host(name)
        host.set_variable("inventory_file", str(path))
        host.set_variable("inventory_dir", str(path.parent))
        for k, v in hv.items():
            host.set_variable(k, v)
    for gname in fleet.groups:
        manager.add_group(gname)
    for gname, g in fleet.groups.items():
        group = manager.groups[gname]
        for k, v in g["vars"].items():
            group.set_variable(k, v)
        for m in g["hosts"]:
            manager.add_host(m, group=gname)
        for c in g["children"]:
            group.add_child_group(manager.groups[c])


# -- selection cache -----------------------------------------------------------------------------
# Importing ansible-core and resolving a few hundred hosts' variables costs ~0.8 s of CPU per
# command; that is a fifth of a 200-host `kpipe fleet facts`. The resolved selection is kept in the
# store, keyed by the pattern and a fingerprint of every file ansible would read (sources,
# group_vars/host_vars beside them), so a later command on an unchanged inventory skips ansible.
# Dynamic inventory scripts are never cached: their output may change at every run.

_SELECTION_DDL = """
CREATE TABLE IF NOT EXISTS inventory_selections (
  key TEXT PRIMARY KEY,
  hosts_json TEXT NOT NULL,
  created_at REAL NOT NULL
)
"""
_SELECTION_KEEP = 64
_INVENTORY_ENV_PREFIXES = ("ANSIBLE_INVENTORY", "ANSIBLE_VARS", "ANSIBLE_CONFIG", "ANSIBLE_HOST_PATTERN")


def _fingerprint(paths: Sequence[Path]) -> str | None:
    """A digest of every inventory file's identity (path, size, mtime, inode); None if uncacheable."""
    import hashlib

    h = hashlib.sha256()

    def add(p: Path) -> None:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())

    def add_tree(d: Path) -> None:
        if d.is_dir():
            for root, dirs, files in os.walk(d):
                dirs.sort()
                add(Path(root))
                for f in sorted(files):
                    add(Path(root) / f)

    try:
        for p in paths:
            if p.is_dir():
                add_tree(p)
                continue
            if os.access(p, os.X_OK):
                return None  # a dynamic inventory script
            add(p)
            for sub in ("group_vars", "host_vars"):
                add_tree(p.parent / sub)
    except OSError:
        return None
    # settings that change how ansible reads inventories (kpipe's own defaults applied first,
    # so that the first parse does not change the key)
    _quiet_ansible_env()
    h.update(("\0".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                        if k.startswith(_INVENTORY_ENV_PREFIXES))).encode())
    return h.hexdigest()


def expand_limit_files(pattern: str | None) -> str | None:
    """`--limit @FILE` as Ansible reads it: each `@FILE` term becomes the file's patterns (one a line; blank
    lines and `#` comments skipped; a relative path is taken from the current folder). ConfigError names
    a missing or empty file."""
    if not pattern or "@" not in pattern:
        return pattern
    from ansible.inventory.manager import split_host_pattern

    terms: list[str] = []
    for term in split_host_pattern(pattern.strip()):
        if not term.startswith("@"):
            terms.append(term)
            continue
        path = Path(os.path.expanduser(term[1:]))
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"--limit {term}: cannot read the limit file {path}: {e.strerror or e}",
                              hint="@FILE names a file of host patterns, one a line (an Ansible retry file)") from None
        patterns = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not patterns:
            raise ConfigError(f"--limit {term}: the limit file {path} names no host",
                              hint="write one host or pattern a line")
        terms.extend(patterns)
    return ":".join(terms)


def select_hosts(workspace: Workspace | None, pattern: str | None = None,
                 sources: Sequence[str | os.PathLike[str]] | None = None) -> list[Host]:
    """`load_inventory(workspace, sources).select(pattern)`, answered from the store when no
    inventory file changed since the same selection was last resolved."""
    return HostSelector(workspace, sources).select(pattern)


class HostSelector:
    """Selections of one inventory, each answered from the store's selection cache while no
    inventory file changed; the inventory itself is read (with ansible-core: ~0.3 s of imports and
    parsing for a few hundred hosts) only on a miss, and then once for every later pattern.

    An audit resolves its limit and each pattern of the desired-state file through one of these:
    with warm caches it reads no inventory at all, which keeps it within a facts run's time."""

    def __init__(self, workspace: Workspace | None, sources: Sequence[str | os.PathLike[str]] | None = None):
        self._workspace = workspace
        self._sources = sources
        self._inventory: Inventory | None = None
        self._fingerprint: str | None = None
        if workspace is not None:
            paths = [Path(os.path.expanduser(os.fspath(s))) for s in sources] if sources is not None \
                else default_sources(workspace)
            paths = [p if p.is_absolute() else workspace.root / p for p in paths]
            self._fingerprint = _fingerprint(paths) if paths and all(p.exists() for p in paths) else None

    @property
    def inventory(self) -> Inventory:
        """The inventory itself, read on first use."""
        if self._inventory is None:
            self._inventory = load_inventory(self._workspace, self._sources)
        return self._inventory

    def select(self, pattern: str | None = None) -> list[Host]:
        """Hosts matching an Ansible pattern, as Inventory.select (NotFoundError if none match)."""
        import json
        import time

        from kpipe import __version__

        pattern = expand_limit_files(pattern)  # the file's patterns, not its name, key the cache
        store = self._workspace.store if self._workspace is not None and self._fingerprint else None
        if store is None:  # no store to cache the selection in, or an uncacheable source
            return self.inventory.select(pattern)
        key = f"{__version__}\0{(pattern or 'all').strip() or 'all'}\0{self._fingerprint}"
        store.ensure_schema(_SELECTION_DDL)
        row = store.query_one("SELECT hosts_json FROM inventory_selections WHERE key = ?", (key,))
        if row is not None:
            try:
                return [Host.from_dict(d) for d in json.loads(row[0])]
            except (KeyError, TypeError, ValueError):
                pass  # an unreadable entry: resolve again and overwrite it
        hosts = self.inventory.select(pattern)
        try:
            payload = json.dumps([h.to_dict() for h in hosts])
        except (TypeError, ValueError):
            return hosts  # variables that are not plain data: do not cache
        with store.write() as c:
            c.execute("INSERT OR REPLACE INTO inventory_selections (key, hosts_json, created_at) VALUES (?, ?, ?)",
                      (key, payload, time.time()))
            c.execute("DELETE FROM inventory_selections WHERE key NOT IN (SELECT key FROM inventory_selections "
                      "ORDER BY created_at DESC LIMIT ?)", (_SELECTION_KEEP,))
        return hosts
