"""Audit: desired live-patch state against what each host really shows.

Desired state comes from two places: the rollout journal (what completed or
partially completed rollouts applied to which host, minus what was rolled
back) and an optional desired-state file (policy: patches required or
forbidden on host patterns). Observed state comes only from what the hosts
report (sysfs livepatch state, installed module checksums, taint), never from
the journal: the journal says what kpipe *did*, the host says what *is*.

The core (`desired_from_records`, `apply_desired_file`, `evaluate`) is pure;
`run_audit` at the bottom is the edge that reads the store and the fleet.

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
same host (the file is explicit policy); `forbid` wins over both.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# The status vocabulary; every renderer and the CLI use these names.
COMPLIANT = "compliant"
MISSING = "missing"
UNEXPECTED = "unexpected"
DISABLED = "disabled"
TRANSITION = "transition"
WRONG_HASH = "wrong_hash"
UNEXPECTED_TAINT = "unexpected_taint"
UNREACHABLE = "unreachable"

# Ordered from best to worst: a host's overall status is its worst row.
STATUSES: tuple[str, ...] = (
    COMPLIANT,
    DISABLED,
    TRANSITION,
    MISSING,
    WRONG_HASH,
    UNEXPECTED,
    UNEXPECTED_TAINT,
    UNREACHABLE,
)

# A row that is about the host, not one patch (taint, unreachable, nothing to check).
HOST_ROW = ""

# Taint bits, Documentation/admin-guide/tainted-kernels.rst (bit -> letter).
TAINT_LETTERS: dict[int, str] = {
    0: "P", 1: "F", 2: "S", 3: "R", 4: "M", 5: "B", 6: "U", 7: "D", 8: "A", 9: "W",
    10: "C", 11: "I", 12: "O", 13: "E", 14: "L", 15: "K", 16: "X", 17: "T", 18: "N",
}
_LETTER_BITS = {v: k for k, v in TAINT_LETTERS.items()}
# Loading a live patch sets K (15, stays set after unload), O (12) for an
# out-of-tree module and E (13) when unsigned or signed by an unknown key.
DEFAULT_ALLOWED_TAINT = (1 << 12) | (1 << 13) | (1 << 15)


def module_name(name: str) -> str:
    """The name sysfs and lsmod show for a module: '-' becomes '_', '.ko' dropped."""
    base = name.rsplit("/", 1)[-1]
    if base.endswith(".ko"):
        base = base[:-3]
    return base.replace("-", "_")


def taint_letters(mask: int) -> str:
    """Taint bits as the kernel's letters, e.g. 45056 -> 'OEK'."""
    return "".join(TAINT_LETTERS.get(b, f"bit{b}") for b in range(32) if mask & (1 << b))


def taint_mask(letters: Iterable[str]) -> int:
    """The mask for taint letters ('K', 'O'...); ValueError on an unknown letter."""
    mask = 0
    for letter in letters:
        letter = str(letter).strip().upper()
        if letter not in _LETTER_BITS:
            raise ValueError(f"unknown taint letter {letter!r}")
        mask |= 1 << _LETTER_BITS[letter]
    return mask


# --------------------------------------------------------------------------
# Desired state
# --------------------------------------------------------------------------


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
    action: str  # "applied" | "rolled_back"
    artifact_id: str = ""
    sha256: str = ""
    kernel: str = ""
    replace: bool = False
    build_id: str = ""  # the artifact's GNU build-id (hex), "" when unknown
    srcversion: str = ""


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "patch": self.patch,
            "artifact_id": self.artifact_id,
            "sha256": self.sha256,
            "kernel": self.kernel,
            "source": self.source,
        }


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
    allowed_taint: int = DEFAULT_ALLOWED_TAINT
    unmanaged: str = "flag"  # flag | ignore
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
        if rec.action == "applied":
            if rec.replace:
                # klp replace mode (kernel >= 5.1) disables every other live
                # patch on the host when this one finishes its transition.
                for other in list(host_patches):
                    if other != name:
                        del host_patches[other]
                        retired[other] = f"superseded by replace-mode {name} (rollout {rec.rollout_id})"
            host_patches[name] = DesiredPatch(
                patch=name,
                artifact_id=rec.artifact_id,
                sha256=rec.sha256.lower(),
                kernel=rec.kernel,
                source=f"rollout {rec.rollout_id}",
                build_id=rec.build_id.lower(),
                srcversion=rec.srcversion,
            )
            retired.pop(name, None)
        elif rec.action == "rolled_back":
            current = host_patches.get(name)
            if current is not None and current.sha256 and rec.sha256 and current.sha256 != rec.sha256.lower():
                # another build's rollback (a later rollout that was refused, say) does not undo this one
                continue
            if host_patches.pop(name, None) is not None or name not in retired:
                retired[name] = f"rolled back by rollout {rec.rollout_id}"
        else:
            raise ValueError(f"unknown journal action {rec.action!r}")
    for host in [h for h, p in state.patches.items() if not p]:
        del state.patches[host]
    state.sources.append("journal")
    return state


class _LineLoader:
    """A YAML SafeLoader whose mappings remember their line (for error messages)."""

    @staticmethod
    def load(text: str) -> Any:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def construct_mapping(loader: Any, node: Any) -> Any:
            mapping = _LineDict(loader.construct_mapping(node, deep=True))
            mapping.line = node.start_mark.line + 1
            return mapping

        Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
        return yaml.load(text, Loader=Loader)  # noqa: S506 -- SafeLoader subclass


class _LineDict(dict):
    line: int = 0


def load_desired_file(path: Path) -> Any:
    """Read and YAML-parse a desired-state file; ConfigError names the file and line."""
    from kpipe.errors import ConfigError, NotFoundError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFoundError(f"{path}: desired-state file not found", hint="check --desired") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the desired-state file: {e}") from None
    try:
        return _LineLoader.load(text)
    except Exception as e:  # yaml.YAMLError carries the position in its text
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}", hint="fix the YAML syntax") from None


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
    from kpipe.errors import ConfigError

    def where(node: Any, fld: str) -> str:
        line = getattr(node, "line", 0)
        return f"{source}:{line}: {fld}" if line else f"{source}: {fld}"

    def bad(node: Any, fld: str, msg: str) -> ConfigError:
        return ConfigError(f"{where(node, fld)}: {msg}", hint="see the desired-state format in `kpipe audit --help`")

    if doc is None:
        doc = _LineDict()
    if not isinstance(doc, dict):
        raise bad(doc, "document", "must be a mapping with version, hosts...")
    unknown = set(doc) - {"version", "allowed_taint", "unmanaged", "hosts"}
    if unknown:
        raise bad(doc, sorted(map(str, unknown))[0], "unknown key (allowed: version, allowed_taint, unmanaged, hosts)")
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
        if doc["unmanaged"] not in ("flag", "ignore"):
            raise bad(doc, "unmanaged", f"must be 'flag' or 'ignore', got {doc['unmanaged']!r}")
        state.unmanaged = doc["unmanaged"]
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
            raise bad(rule, f"{fld}.{sorted(map(str, unknown))[0]}", "unknown key (allowed: match, require, forbid)")
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
                raise bad(entry, f"{efld}.{sorted(map(str, unknown))[0]}", "unknown key (allowed: name, sha256, kernel, artifact)")
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


# --------------------------------------------------------------------------
# Observed state
# --------------------------------------------------------------------------


class PatchStateLike(Protocol):
    """What the audit reads of one live patch (kpipe.fleet.livepatch.LivepatchState has it)."""

    name: str
    enabled: Any  # bool | None
    transition: Any  # bool | None
    objects: Mapping[str, Any]  # object -> patched (bool | None)


@dataclass(frozen=True)
class ObservedPatch:
    """One live patch as sysfs shows it (a plain stand-in for LivepatchState)."""

    name: str
    enabled: bool | None = True
    transition: bool | None = False
    objects: Mapping[str, bool | None] = field(default_factory=dict)


@dataclass(frozen=True)
class ObservedHost:
    """What one host reported: reachability, kernel, taint, live patches, installed modules."""

    host: str
    reachable: bool = True
    error: str = ""
    kernel: str = ""
    tainted: int | None = None
    patches: Mapping[str, PatchStateLike] = field(default_factory=dict)
    # sysfs module name -> sha256 of the installed file under /var/lib/kpatch/<release>/
    installed: Mapping[str, str] = field(default_factory=dict)
    # module name -> present in /sys/module (reported for the names the audit asked about)
    modules: Mapping[str, bool] = field(default_factory=dict)
    arch: str = ""  # `uname -m`, normalised (the CVE view matches it against the recipe's kernel)
    # module name -> (build-id hex, srcversion) of the loaded module, "" where the kernel shows none
    builds: Mapping[str, tuple[str, str]] = field(default_factory=dict)


# --------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchStatus:
    """One verdict: a host, a patch (or HOST_ROW), a status and why."""

    host: str
    patch: str
    status: str
    detail: str = ""
    desired: DesiredPatch | None = None
    enabled: bool | None = None
    transition: bool | None = None
    observed_sha256: str = ""

    @property
    def ok(self) -> bool:
        return self.status == COMPLIANT

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "patch": self.patch,
            "status": self.status,
            "ok": self.ok,
            "detail": self.detail,
            "desired": self.desired.to_dict() if self.desired else None,
            "observed": {
                "enabled": self.enabled,
                "transition": self.transition,
                "sha256": self.observed_sha256 or None,
            },
        }


@dataclass(frozen=True)
class HostAudit:
    """Every verdict for one host, plus what it reported about itself."""

    host: str
    reachable: bool
    kernel: str
    tainted: int | None
    error: str
    rows: tuple[PatchStatus, ...]

    @property
    def compliant(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def status(self) -> str:
        """The worst status among the host's rows."""
        return max((r.status for r in self.rows), key=STATUSES.index, default=COMPLIANT)

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "reachable": self.reachable,
            "kernel": self.kernel,
            "tainted": self.tainted,
            "taint_flags": taint_letters(self.tainted) if self.tainted is not None else None,
            "error": self.error,
            "status": self.status,
            "compliant": self.compliant,
            "patches": [r.to_dict() for r in self.rows],
        }


@dataclass(frozen=True)
class AuditResult:
    """The audit of a set of hosts at one moment (`generated_at`, Unix seconds)."""

    generated_at: float
    hosts: tuple[HostAudit, ...]
    sources: tuple[str, ...] = ()
    cves: Any = None  # kpipe.cve.CveReport: which CVEs loaded patches fix, who is exposed (None: not computed)

    @property
    def rows(self) -> list[PatchStatus]:
        return [r for h in self.hosts for r in h.rows]

    @property
    def compliant(self) -> bool:
        return all(h.compliant for h in self.hosts)

    @property
    def patches(self) -> list[str]:
        """Every patch name that appears in a row, sorted (HOST_ROW excluded)."""
        return sorted({r.patch for r in self.rows if r.patch != HOST_ROW})

    def counts(self) -> dict[str, int]:
        """Rows per status, every status present (0 where none)."""
        out = {s: 0 for s in STATUSES}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "kpipe.audit/v1",
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.generated_at)),
            "generated_at_epoch": self.generated_at,
            "sources": list(self.sources),
            "compliant": self.compliant,
            "summary": {
                "hosts": len(self.hosts),
                "compliant_hosts": sum(1 for h in self.hosts if h.compliant),
                "statuses": self.counts(),
            },
            "hosts": [h.to_dict() for h in self.hosts],
            **({"cves": self.cves.to_dict()} if self.cves is not None else {}),
        }


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def _flag(value: Any) -> bool | None:
    """A sysfs 0/1 flag (int, bool or None from the parsers) as a bool, None when unknown."""
    if value is None or isinstance(value, bool):
        return value
    try:
        return int(value) != 0
    except (TypeError, ValueError):
        return None


def _kernel_applies(want: DesiredPatch, kernel: str) -> bool:
    return not want.kernel or not kernel or fnmatch.fnmatchcase(kernel, want.kernel)


def _short(sha: str) -> str:
    return sha[:12] if sha else "?"


def evaluate_host(desired: DesiredState, obs: ObservedHost) -> HostAudit:
    """The verdicts for one host: desired patches and observed patches, one row each."""
    host = obs.host
    wanted = dict(desired.for_host(host))
    rules = desired.forbidden.get(host, [])
    retired = desired.retired.get(host, {})

    def forbidden_by(name: str) -> ForbidRule | None:
        return next((r for r in rules if fnmatch.fnmatchcase(name, r.pattern)), None)

    # `forbid` is policy: it wins over a rollout that applied the patch.
    for name in list(wanted):
        if forbidden_by(name):
            del wanted[name]

    rows: list[PatchStatus] = []
    if not obs.reachable:
        err = obs.error or "host did not answer"
        for name in sorted(wanted):
            rows.append(PatchStatus(host, name, UNREACHABLE, err, desired=wanted[name]))
        if not rows:
            rows.append(PatchStatus(host, HOST_ROW, UNREACHABLE, err))
        return HostAudit(host, False, obs.kernel, obs.tainted, err, tuple(rows))

    observed = {module_name(n): p for n, p in obs.patches.items()}
    installed = {module_name(n): s.lower() for n, s in obs.installed.items()}

    if obs.tainted is not None:
        extra = obs.tainted & ~desired.allowed_taint
        if extra:
            rows.append(
                PatchStatus(
                    host,
                    HOST_ROW,
                    UNEXPECTED_TAINT,
                    f"tainted={obs.tainted} ({taint_letters(obs.tainted)}); not allowed: {taint_letters(extra)}",
                )
            )

    modules = {module_name(n): bool(v) for n, v in obs.modules.items()}
    builds = {module_name(n): (str(b[0]).lower(), str(b[1])) for n, b in obs.builds.items()}
    # A retired patch whose module is still loaded is an unfinished rollback.
    lingering = {n for n in retired if modules.get(n) and n not in observed}
    for name in sorted(set(wanted) | set(observed) | lingering):
        want = wanted.get(name)
        state = observed.get(name)
        sha = installed.get(name, "")
        enabled = None if state is None else _flag(state.enabled)
        transition = None if state is None else _flag(state.transition)

        def row(status: str, detail: str) -> PatchStatus:
            return PatchStatus(host, name, status, detail, want, enabled, transition, sha)

        if state is None and modules.get(name):
            # Since 5.1 a disabled patch's sysfs directory goes away while its
            # module stays loaded until rmmod: the module is the only trace.
            detail = "module loaded but the livepatch is disabled (no /sys/kernel/livepatch entry)"
            if want is None and retired[name].startswith("superseded"):
                # klp replace disables the older patches but nothing rmmods them:
                # an inactive module is expected there, not a failed rollback.
                rows.append(row(COMPLIANT, f"{retired[name]}; its module is still loaded, inactive"))
                continue
            if want is None:
                detail += f"; {retired[name]}, module not removed"
            rows.append(row(DISABLED, detail))
            continue
        if state is None:
            assert want is not None
            if not _kernel_applies(want, obs.kernel):
                if want.source.startswith("rollout"):
                    detail = f"not loaded; host now runs {obs.kernel}, artifact {want.artifact_id or '?'} is for {want.kernel}"
                    rows.append(row(MISSING, detail))
                # a file rule scoped to another kernel does not apply to this host
                continue
            detail = "not loaded (no /sys/kernel/livepatch entry)"
            if sha:
                detail += "; installed file present"
            rows.append(row(MISSING, detail))
            continue

        if transition:
            what = "patching" if enabled else "unpatching"
            rows.append(row(TRANSITION, f"{what} transition not finished (transition=1)"))
            continue
        if enabled is not True:
            detail = "loaded but disabled (enabled=0)" if enabled is False else "enabled flag unreadable"
            if want is None:
                detail += "; " + (retired.get(name) or "not desired")
            rows.append(row(DISABLED, detail))
            continue
        if want is None:
            rule = forbidden_by(name)
            if rule is not None:
                rows.append(row(UNEXPECTED, f"loaded and enabled; forbidden by {rule.source} ({rule.pattern})"))
            elif name in retired:
                rows.append(row(UNEXPECTED, f"loaded and enabled; {retired[name]}"))
            elif desired.unmanaged == "ignore":
                rows.append(row(COMPLIANT, "unmanaged patch (ignored by policy)"))
            else:
                rows.append(row(UNEXPECTED, "loaded and enabled; no rollout or rule asks for it"))
            continue
        # `patched` is 0 for an object whose module is not loaded (normal), but
        # vmlinux is always loaded: 0 there means patching is not finished.
        unpatched = [o for o, p in (state.objects or {}).items() if o == "vmlinux" and _flag(p) is False]
        if unpatched:
            rows.append(row(TRANSITION, "enabled but vmlinux object not patched (patched=0)"))
            continue
        loaded_build = builds.get(name, ("", ""))
        if want.build_id and loaded_build[0] and loaded_build[0] != want.build_id:
            rows.append(row(WRONG_HASH, f"loaded module build-id {loaded_build[0][:16]} != expected "
                                        f"{want.build_id[:16]} (artifact {want.artifact_id or '?'})"))
            continue
        if (not (want.build_id and loaded_build[0]) and want.srcversion and loaded_build[1]
                and loaded_build[1] != want.srcversion):
            rows.append(row(WRONG_HASH, f"loaded module srcversion {loaded_build[1]} != expected {want.srcversion}"))
            continue
        if want.sha256 and sha and sha != want.sha256:
            rows.append(
                row(WRONG_HASH, f"installed module sha256 {_short(sha)} != expected {_short(want.sha256)}")
            )
            continue
        notes = ["enabled, transition finished"]
        if want.sha256 and not sha:
            notes.append("installed file not found, hash not checked")
        if not _kernel_applies(want, obs.kernel):
            notes.append(f"artifact is for {want.kernel}, host runs {obs.kernel}")
        rows.append(row(COMPLIANT, "; ".join(notes)))

    # A forbid rule with nothing loaded is a passed check worth showing (one testcase each).
    for rule in rules:
        if not any(fnmatch.fnmatchcase(n, rule.pattern) for n in observed):
            rows.append(PatchStatus(host, rule.pattern, COMPLIANT, f"not loaded, as {rule.source} requires"))

    if not rows:
        rows.append(PatchStatus(host, HOST_ROW, COMPLIANT, "no live patch expected or loaded"))
    return HostAudit(host, True, obs.kernel, obs.tainted, obs.error, tuple(rows))


def observed_from_livepatch(
    host: str,
    state: Any,
    *,
    kernel: str = "",
    installed: Mapping[str, str] | None = None,
    error: str = "",
) -> ObservedHost:
    """An ObservedHost from kpipe.fleet.livepatch.HostLivepatch (patches, tainted, modules)."""
    modules = {n: bool(getattr(m, "present", m)) for n, m in (getattr(state, "modules", None) or {}).items()}
    return ObservedHost(
        host=host,
        reachable=True,
        error=error,
        kernel=kernel,
        tainted=getattr(state, "tainted", None),
        patches=dict(getattr(state, "patches", None) or {}),
        installed=dict(installed or {}),
        modules=modules,
    )


def evaluate(
    desired: DesiredState, observed: Iterable[ObservedHost], *, generated_at: float | None = None
) -> AuditResult:
    """Audit every observed host against the desired state; hosts sorted by name."""
    hosts = tuple(evaluate_host(desired, o) for o in sorted(observed, key=lambda o: o.host))
    return AuditResult(
        generated_at=time.time() if generated_at is None else generated_at,
        hosts=hosts,
        sources=tuple(desired.sources),
    )


# --------------------------------------------------------------------------
# The edge: journal + inventory + hosts -> AuditResult
# --------------------------------------------------------------------------


def journal_records(workspace: Any) -> list[AppliedRecord]:
    """Every applied / rolled_back host outcome in the workspace's rollout journal."""
    from kpipe.rollout.engine import applied_records
    from kpipe.rollout.journal import Journal

    out = []
    for r in applied_records(Journal(workspace.store)):
        out.append(
            AppliedRecord(
                seq=float(r["seq"]),
                rollout_id=str(r["rollout_id"]),
                host=str(r["host"]),
                patch=str(r["patch"]),
                action=str(r["action"]),
                artifact_id=str(r.get("artifact_id", "")),
                sha256=str(r.get("sha256", "")),
                kernel=str(r.get("kernel", "")),
                replace=bool(r.get("replace", False)),
                build_id=str(r.get("build_id", "")),
                srcversion=str(r.get("srcversion", "")),
            )
        )
    return out


def observed_from_facts(facts: Any, state: Any = None) -> ObservedHost:
    """An ObservedHost from kpipe.fleet.facts.HostFacts (+ an optional HostLivepatch for /sys/module)."""
    installed = {module_name(m.file_name): m.sha256 for m in getattr(facts, "installed", ()) if m.sha256 != "?"}
    patches = dict(facts.patches)
    modules: dict[str, bool] = {}
    builds: dict[str, tuple[str, str]] = {}
    if state is not None:
        patches = dict(state.patches) or patches
        modules = {n: bool(m.present) for n, m in state.modules.items()}
        builds = {n: (getattr(m, "build_id", ""), getattr(m, "srcversion", "")) for n, m in state.modules.items()
                  if m.present}
    return ObservedHost(
        host=facts.name,
        reachable=True,
        kernel=facts.release,
        arch=getattr(facts, "arch", ""),
        tainted=facts.tainted,
        patches=patches,
        installed=installed,
        modules=modules,
        builds=builds,
    )


def _valid_module(name: str) -> bool:
    from kpipe.errors import KpipeError
    from kpipe.fleet import livepatch as lp

    try:
        lp.sysfs_name(name)
    except KpipeError:
        return False
    return True


def observe_hosts(
    workspace: Any, hosts: list[Any], names: Mapping[str, Iterable[str]], forks: int | None = None
) -> dict[str, ObservedHost]:
    """Ask each host (over SSH, at most `forks` at once) for its facts and its modules' /sys/module state."""
    from kpipe.errors import KpipeError
    from kpipe.fleet import facts as F
    from kpipe.fleet import livepatch as lp

    cmd = F.facts_command()

    def one(t: Any) -> ObservedHost:
        r = t.run(cmd)
        if r.exit_status != 0 and F.HEADER not in r.stdout:
            raise F.FactsError(f"the facts command exited {r.exit_status}", host=t.name)
        facts = F.parse_facts(t.name, r.stdout)
        # Module names from the journal and the desired file: a disabled patch's sysfs
        # folder is gone while its module may still be loaded.
        wanted = sorted({n for n in names.get(t.name, ()) if _valid_module(n)})
        state = lp.read_state(t, *wanted) if wanted else None
        return observed_from_facts(facts, state)

    pool = F.pool_for(workspace, forks)
    try:
        raw = pool.run_many(hosts, one, forks or workspace.ssh.forks)
    finally:
        pool.close()
    out: dict[str, ObservedHost] = {}
    for h in hosts:
        value = raw.get(h.name)
        if isinstance(value, ObservedHost):
            out[h.name] = value
        else:
            msg = value.message if isinstance(value, KpipeError) else f"{type(value).__name__}: {value}"
            out[h.name] = ObservedHost(h.name, reachable=False, error=str(msg).splitlines()[0] if msg else "error")
    return out


def run_audit(
    workspace: Any,
    limit: str | None = None,
    *,
    desired_file: str | Path | None = None,
    forks: int | None = None,
    settle: float = 0.0,
) -> AuditResult:
    """Audit the hosts `limit` selects: journal (+ desired file) against what each host reports now.

    `desired_file` defaults to `[audit] desired` in kpipe.toml. Hosts still in
    transition are read again after `settle` seconds before they are called stuck.
    """
    from kpipe.errors import NotFoundError
    from kpipe.fleet.inventory import load_inventory

    inventory = load_inventory(workspace)
    hosts = inventory.select(limit)
    desired = desired_from_records(journal_records(workspace))
    section = workspace.settings.audit
    if desired_file is None and section.desired:
        desired_file = workspace.path(section.desired)
    if section.allowed_taint is not None:
        desired.allowed_taint = taint_mask(section.allowed_taint)
    if desired_file:

        def match(pattern: str) -> list[str]:
            try:
                return [h.name for h in inventory.select(pattern)]
            except NotFoundError:
                return []

        apply_desired_file(desired, load_desired_file(Path(desired_file)), match, str(desired_file))

    names = {
        h.name: set(desired.for_host(h.name)) | set(desired.retired.get(h.name, {})) for h in hosts
    }
    observed = observe_hosts(workspace, hosts, names, forks)
    if settle > 0:
        shaky = [h for h in hosts if evaluate_host(desired, observed[h.name]).status == TRANSITION]
        if shaky:
            time.sleep(settle)
            observed.update(observe_hosts(workspace, shaky, names, forks))
    if limit in (None, "", "all"):
        # A host a rollout patched that left the inventory cannot be verified: say so.
        known = {h.name for h in hosts}
        for host in sorted(set(desired.patches) - known):
            observed[host] = ObservedHost(host, reachable=False, error="not in the inventory (a rollout patched it)")
    result = evaluate(desired, observed.values())
    from dataclasses import replace

    from kpipe.cve import cve_report

    return replace(result, cves=cve_report(workspace, result, {o.host: o.arch for o in observed.values()}))


# --------------------------------------------------------------------------
# The audit trail: every verify / audit run, kept in the state store
# --------------------------------------------------------------------------

AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    generated_at REAL NOT NULL,
    command TEXT NOT NULL,
    host_pattern TEXT NOT NULL DEFAULT '',
    compliant INTEGER NOT NULL,
    hosts INTEGER NOT NULL,
    compliant_hosts INTEGER NOT NULL,
    result_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audits_time ON audits(generated_at)
"""


def record_audit(store: Any, result: AuditResult, *, command: str = "audit", limit: str | None = None) -> int:
    """Keep one audit's full result in the store (compliance asks for a trail); return its id."""
    import json

    store.ensure_schema(AUDIT_SCHEMA)
    doc = result.to_dict()
    with store.write() as c:
        cur = c.execute(
            "INSERT INTO audits (generated_at, command, host_pattern, compliant, hosts, compliant_hosts, result_json)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (result.generated_at, command, limit or "", int(result.compliant), len(result.hosts),
             doc["summary"]["compliant_hosts"], json.dumps(doc, ensure_ascii=False)),
        )
        return int(cur.lastrowid)


def audit_history(store: Any, limit: int = 20) -> list[dict[str, Any]]:
    """The most recent audits, newest first: id, time, command, pattern, counts (no full result)."""
    store.ensure_schema(AUDIT_SCHEMA)
    rows = store.query(
        "SELECT id, generated_at, command, host_pattern, compliant, hosts, compliant_hosts FROM audits"
        " ORDER BY generated_at DESC, id DESC LIMIT ?", (limit,))
    return [dict(r) for r in rows]
