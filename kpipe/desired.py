"""Desired state: what should be loaded where, from the rollout journal and a desired-state file (pure).

The journal's records (what rollouts applied, minus what they rolled back) replay into a
`DesiredState`; a desired-state file (policy: patches required or forbidden on host
patterns) is merged on top. kpipe.audit compares it with what the hosts show.

Desired-state file (YAML), e.g. `desired.yml`::

    version: 1                  # required, must be 1
    allowed_taint: [K, O, E]    # optional; taint letters that are not a finding
                                # (default K O E: livepatched, out-of-tree, unsigned)
    unmanaged: flag             # optional: flag | ignore -- what to say about a
                                # loaded patch that neither a rollout nor this file names
    hosts:                      # optional list of rules, applied in order
      - match: "web:&prod"      # an inventory host pattern (Ansible pattern semantics)
        require:                # patches that must be loaded, enabled and settled
          - livepatch-cve-2026-1234          # a bare module name ('-' and '_' are equal)
          - name: livepatch_fix_cmdline      # or a mapping:
            sha256: 3f5a...                  #   installed module must have this sha256
            kernel: 6.1.0-56-amd64           #   only on hosts running this kernel (glob)
        forbid:                 # module names (globs) that must not be loaded
          - kpatch_old_*

A `require` entry overrides what the journal says for the same patch on the
same host (the file is explicit policy); `forbid` wins over both. The file is read
with kpipe's one line-keeping YAML loader (kpipe.yamlnodes): errors name file:line.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from kpipe.errors import ConfigError, NotFoundError
from kpipe.taint import DEFAULT_ALLOWED_TAINT, taint_mask
from kpipe.yamlnodes import LineDict, YamlError, load_yaml


class JournalAction(StrEnum):
    """What a journal record says a rollout did to a patch on a host."""

    APPLIED = "applied"
    ROLLED_BACK = "rolled_back"


class Unmanaged(StrEnum):
    """What to say about a loaded patch that neither a rollout nor the file names."""

    FLAG = "flag"
    IGNORE = "ignore"


def module_name(name: str) -> str:
    """The name sysfs and lsmod show for a module: '-' becomes '_', '.ko' dropped."""
    base = name.rsplit("/", 1)[-1]
    base = base.removesuffix(".ko")
    return base.replace("-", "_")


_VERSIONED = re.compile(r"^(?P<base>.+?)_v(?P<version>\d+)$")


def split_versioned(module: str) -> tuple[str, int] | None:
    """(base, version) of a versioned module name (kpipe.recipes names a stream's version N <base>-vN),
    '-' read as '_': kpipe_memcg_v2 -> (kpipe_memcg, 2); None for a name without a version."""
    m = _VERSIONED.match(module_name(module))
    return (m.group("base"), int(m.group("version"))) if m else None


# -- desired state -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppliedRecord:
    """One journaled fact: a rollout applied (or rolled back) a patch on a host.

    `seq` orders the records (the journal's row id or a timestamp); `replace`
    says the artifact is a klp replace-mode patch, which supersedes every other
    live patch on the host when it loads.
    """

    seq: float
    rollout_id: str
    host: str
    patch: str
    action: str  # a JournalAction value
    artifact_id: str = ""
    sha256: str = ""
    kernel: str = ""
    replace: bool = False
    build_id: str = ""  # the artifact's GNU build-id (hex), "" when unknown
    srcversion: str = ""
    stream: str = ""  # the artifact's patch stream ("" in records written before streams)
    version: int = 0  # its version in the stream (0: unknown)
    restored: str = ""  # a rollback of an upgrade: the older version's module it loaded again


@dataclass(frozen=True)
class DesiredPatch:
    """A patch that should be loaded, enabled and settled on a host."""

    patch: str  # sysfs module name ('_' form)
    artifact_id: str = ""
    sha256: str = ""
    kernel: str = ""  # release (glob allowed from the file) the artifact is for
    source: str = ""  # "rollout <id>" or "<file>:<line>"
    build_id: str = ""  # the loaded module must show this GNU build-id (when both are known)
    srcversion: str = ""  # else this srcversion
    stream: str = ""  # the patch stream (a rollout's record); "" when unknown
    version: int = 0  # the desired version of that stream; 0 when unknown

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"patch": self.patch, "artifact_id": self.artifact_id, "sha256": self.sha256,
                             "kernel": self.kernel, "source": self.source}
        if self.stream:
            d.update(stream=self.stream, version=self.version)
        return d


@dataclass(frozen=True)
class ForbidRule:
    """A module-name glob that must not be loaded on a host."""

    pattern: str  # '_' form
    source: str


@dataclass
class DesiredState:
    """Per host: required patches, forbidden globs, and why patches left the set."""

    patches: dict[str, dict[str, DesiredPatch]] = field(default_factory=dict)
    forbidden: dict[str, list[ForbidRule]] = field(default_factory=dict)
    # host -> patch -> why it is no longer desired ("rolled back by rollout R", ...)
    retired: dict[str, dict[str, str]] = field(default_factory=dict)
    # host -> older stream version -> what was desired before an upgrade superseded it (a rollback of
    # the upgrade that loaded it again makes it desired again)
    superseded: dict[str, dict[str, DesiredPatch]] = field(default_factory=dict)
    allowed_taint: int = DEFAULT_ALLOWED_TAINT
    unmanaged: Unmanaged = Unmanaged.FLAG
    sources: list[str] = field(default_factory=list)

    def for_host(self, host: str) -> dict[str, DesiredPatch]:
        return self.patches.get(host, {})


def desired_from_records(records: Iterable[AppliedRecord]) -> DesiredState:
    """Replay journal records in order: applied adds, rolled_back removes, replace supersedes."""
    state = DesiredState()
    for rec in sorted(records, key=lambda r: (r.seq, r.rollout_id, r.host)):
        name = module_name(rec.patch)
        host_patches = state.patches.setdefault(rec.host, {})
        retired = state.retired.setdefault(rec.host, {})
        superseded = state.superseded.setdefault(rec.host, {})
        if rec.action == JournalAction.APPLIED:
            for other in list(host_patches):
                old = host_patches[other]
                if other == name:
                    continue
                if rec.stream and old.stream == rec.stream:
                    # an upgrade: the older version of the stream is retired (kpipe unloads it)
                    superseded[other] = old
                    del host_patches[other]
                    retired[other] = (f"superseded by {name} (stream {rec.stream} v{old.version} -> "
                                      f"v{rec.version}, rollout {rec.rollout_id})")
                elif rec.replace:
                    # klp replace mode (kernel >= 5.1) disables every other live
                    # patch on the host when this one finishes its transition.
                    del host_patches[other]
                    retired[other] = f"superseded by replace-mode {name} (rollout {rec.rollout_id})"
            host_patches[name] = DesiredPatch(name, rec.artifact_id, rec.sha256.lower(), rec.kernel,
                                              f"rollout {rec.rollout_id}", rec.build_id.lower(), rec.srcversion,
                                              rec.stream, rec.version)
            retired.pop(name, None)
        elif rec.action == JournalAction.ROLLED_BACK:
            current = host_patches.get(name)
            if current is not None and current.sha256 and rec.sha256 and current.sha256 != rec.sha256.lower():
                # another build's rollback (a later rollout that was refused, say) does not undo this one
                continue
            if host_patches.pop(name, None) is not None or name not in retired:
                retired[name] = f"rolled back by rollout {rec.rollout_id}"
            back = module_name(rec.restored) if rec.restored else ""
            if back and back in superseded:
                # the rollback of an upgrade loaded the older version again: it is what the host should run
                host_patches[back] = superseded.pop(back)
                retired.pop(back, None)
        else:
            raise ValueError(f"unknown journal action {rec.action!r}")
    for host in [h for h, p in state.patches.items() if not p]:
        del state.patches[host]
    state.sources.append("journal")
    return state


# -- the desired-state file ----------------------------------------------------------------------------------------


def parse_desired_text(text: str, source: str = "desired.yml") -> Any:
    """YAML text of a desired-state file -> data whose mappings know their line; ConfigError names source:line."""
    try:
        return load_yaml(text, what="desired-state file")
    except YamlError as e:
        raise ConfigError(f"{source}:{e.line}: {e.message}", hint=e.hint or "fix the YAML syntax") from None


def load_desired_file(path: Path | str) -> Any:
    """Read and YAML-parse a desired-state file; ConfigError names the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFoundError(f"{path}: desired-state file not found", hint="check --desired") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the desired-state file: {e}") from None
    return parse_desired_text(text, str(path))


def apply_desired_file(
    state: DesiredState,
    doc: Any,
    match: Callable[[str], Iterable[str]],
    source: str = "desired.yml",
) -> DesiredState:
    """Merge a parsed desired-state document into `state` (in place; also returned).

    `match(pattern)` returns the host names an inventory pattern selects; the
    edge passes Inventory.select, tests pass a glob matcher.
    """
    def where(node: Any, fld: str) -> str:
        line = getattr(node, "line", 0)
        return f"{source}:{line}: {fld}" if line else f"{source}: {fld}"

    def bad(node: Any, fld: str, msg: str) -> ConfigError:
        return ConfigError(f"{where(node, fld)}: {msg}", hint="see the desired-state format in `kpipe audit --help`")

    if doc is None:
        doc = LineDict()
    if not isinstance(doc, dict):
        raise bad(doc, "document", "must be a mapping with version, hosts...")
    unknown = set(doc) - {"version", "allowed_taint", "unmanaged", "hosts"}
    if unknown:
        raise bad(doc, min(map(str, unknown)), "unknown key (allowed: version, allowed_taint, unmanaged, hosts)")
    if doc.get("version") != 1:
        raise bad(doc, "version", f"must be 1, got {doc.get('version')!r}")
    if "allowed_taint" in doc:
        letters = doc["allowed_taint"]
        if isinstance(letters, str):
            letters = list(letters.replace(",", "").replace(" ", ""))
        if not isinstance(letters, list):
            raise bad(doc, "allowed_taint", "must be a list of taint letters such as [K, O, E]")
        try:
            state.allowed_taint = taint_mask(letters)
        except ValueError as e:
            raise bad(doc, "allowed_taint", str(e)) from None
    if "unmanaged" in doc:
        if doc["unmanaged"] not in tuple(Unmanaged):
            raise bad(doc, "unmanaged", f"must be 'flag' or 'ignore', got {doc['unmanaged']!r}")
        state.unmanaged = Unmanaged(doc["unmanaged"])
    rules = doc.get("hosts")
    rules = [] if rules is None else rules
    if not isinstance(rules, list):
        raise bad(doc, "hosts", "must be a list of rules (match, require, forbid)")
    for i, rule in enumerate(rules):
        fld = f"hosts[{i}]"
        if not isinstance(rule, dict):
            raise bad(doc, fld, "must be a mapping with match, require and/or forbid")
        unknown = set(rule) - {"match", "require", "forbid"}
        if unknown:
            raise bad(rule, f"{fld}.{min(map(str, unknown))}", "unknown key (allowed: match, require, forbid)")
        pattern = rule.get("match")
        if not isinstance(pattern, str) or not pattern.strip():
            raise bad(rule, f"{fld}.match", "must be a non-empty host pattern")
        rule_src = f"{source}:{getattr(rule, 'line', 0)}" if getattr(rule, "line", 0) else source
        required: list[DesiredPatch] = []
        require = [] if rule.get("require") is None else rule["require"]
        if not isinstance(require, list):
            raise bad(rule, f"{fld}.require", "must be a list")
        for j, entry in enumerate(require):
            efld = f"{fld}.require[{j}]"
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, dict):
                raise bad(rule, efld, "must be a module name or a mapping with name, sha256, kernel")
            unknown = set(entry) - {"name", "sha256", "kernel", "artifact"}
            if unknown:
                raise bad(entry, f"{efld}.{min(map(str, unknown))}",
                          "unknown key (allowed: name, sha256, kernel, artifact)")
            name = entry.get("name")
            if not isinstance(name, str) or not name.strip():
                raise bad(entry, f"{efld}.name", "must be a module name")
            sha = str(entry.get("sha256") or "").lower()
            if sha and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
                raise bad(entry, f"{efld}.sha256", "must be 64 hex digits")
            required.append(
                DesiredPatch(
                    patch=module_name(name.strip()),
                    artifact_id=str(entry.get("artifact") or ""),
                    sha256=sha,
                    kernel=str(entry.get("kernel") or ""),
                    source=rule_src,
                )
            )
        forbid = [] if rule.get("forbid") is None else rule["forbid"]
        if not isinstance(forbid, list) or not all(isinstance(f, str) and f.strip() for f in forbid):
            raise bad(rule, f"{fld}.forbid", "must be a list of module names or globs")
        for host in match(pattern):
            host_patches = state.patches.setdefault(host, {})
            for want in required:
                host_patches[want.patch] = want
                state.retired.get(host, {}).pop(want.patch, None)
            for pat in forbid:
                state.forbidden.setdefault(host, []).append(ForbidRule(module_name(pat.strip()), rule_src))
    state.sources.append(source)
    return state


def glob_matcher(hosts: Iterable[str]) -> Callable[[str], list[str]]:
    """A host-pattern matcher over plain names: 'a:b' unions of globs (for tests and journals)."""
    names = list(hosts)

    def match(pattern: str) -> list[str]:
        parts = [p for p in pattern.replace(",", ":").split(":") if p]
        return [h for h in names if any(fnmatch.fnmatchcase(h, p) for p in parts)]

    return match
