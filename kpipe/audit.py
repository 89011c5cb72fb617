"""Audit: desired live-patch state against what each host really shows (pure).

Desired state comes from the rollout journal (what completed or partially
completed rollouts applied to which host, minus what was rolled back) and an
optional desired-state file (policy; its format and parser: kpipe/desired.py).
Observed state comes only from what the hosts report (sysfs livepatch state,
/sys/module, installed module checksums, taint), never from the journal: the
journal says what kpipe *did*, the host says what *is*.

Everything here is a function over plain data: `desired_from_records` (journal
records -> DesiredState), `observed_from_facts` (an observation -> ObservedHost)
and `evaluate` (desired + observed -> verdicts). The observing, the store and the
rendering are the edges' (kpipe/fleet/auditing.py, kpipe/cli/audit.py, kpipe/report/).
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any, Protocol

from kpipe.desired import (  # noqa: F401 -- the desired side, re-exported: callers see one audit API
    AppliedRecord,
    DesiredPatch,
    DesiredState,
    ForbidRule,
    JournalAction,
    Unmanaged,
    apply_desired_file,
    desired_from_records,
    glob_matcher,
    load_desired_file,
    module_name,
    parse_desired_text,
    split_versioned,
)
from kpipe.findings import Finding, Severity
from kpipe.taint import DEFAULT_ALLOWED_TAINT, TAINT_LETTERS, taint_letters, taint_mask  # noqa: F401 -- re-exported


class Verdict(StrEnum):
    """A row's status; declared from best to worst: a host's overall status is its worst row."""

    COMPLIANT = "compliant"
    DISABLED = "disabled"
    TRANSITION = "transition"
    MISSING = "missing"
    WRONG_HASH = "wrong_hash"
    UNEXPECTED = "unexpected"
    UNEXPECTED_TAINT = "unexpected_taint"
    UNREACHABLE = "unreachable"


# The names every renderer and the CLI use.
COMPLIANT, DISABLED, TRANSITION, MISSING, WRONG_HASH, UNEXPECTED, UNEXPECTED_TAINT, UNREACHABLE = tuple(Verdict)
STATUSES: tuple[Verdict, ...] = tuple(Verdict)

# A row that is about the host, not one patch (taint, unreachable, nothing to check).
HOST_ROW = ""

# -- observed state ------------------------------------------------------------------------------------------------


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
    # module names (sysfs spelling) persisted for boot: kpipe-livepatch.service's files, or kpatch's
    persisted: frozenset[str] = frozenset()


# -- result --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchStatus:
    """One verdict: a host, a patch (or HOST_ROW), a status and why."""

    host: str
    patch: str
    status: Verdict
    detail: str = ""
    desired: DesiredPatch | None = None
    enabled: bool | None = None
    transition: bool | None = None
    observed_sha256: str = ""

    @property
    def ok(self) -> bool:
        return self.status == COMPLIANT

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "patch": self.patch, "status": str(self.status), "ok": self.ok,
                "detail": self.detail, "desired": self.desired.to_dict() if self.desired else None,
                "observed": {"enabled": self.enabled, "transition": self.transition,
                             "sha256": self.observed_sha256 or None}}

    def finding(self) -> Finding:
        """This verdict as a Finding (id `audit.<status>`, located at the host)."""
        severity = {COMPLIANT: Severity.INFO, DISABLED: Severity.WARNING, TRANSITION: Severity.WARNING}.get(
            Verdict(self.status), Severity.ERROR)
        what = f"{self.patch}: {self.detail}" if self.patch != HOST_ROW else self.detail
        return Finding(f"audit.{self.status}", severity, what, host=self.host)


@dataclass(frozen=True)
class HostAudit:
    """Every verdict for one host, plus what it reported about itself."""

    host: str
    reachable: bool
    kernel: str
    tainted: int | None
    error: str
    rows: tuple[PatchStatus, ...]
    persisted: tuple[str, ...] = ()  # modules loaded again at boot; a loaded patch not in it is live-only

    @property
    def compliant(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def status(self) -> Verdict:
        """The worst status among the host's rows."""
        return max((Verdict(r.status) for r in self.rows), key=STATUSES.index, default=COMPLIANT)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "reachable": self.reachable, "kernel": self.kernel, "tainted": self.tainted,
                "taint_flags": taint_letters(self.tainted) if self.tainted is not None else None,
                "error": self.error, "status": str(self.status), "compliant": self.compliant,
                "persisted": list(self.persisted),
                "patches": [self._row_dict(r) for r in self.rows]}

    def _row_dict(self, r: PatchStatus) -> dict[str, Any]:
        d = r.to_dict()
        if r.patch != HOST_ROW:  # persisted: loaded again at boot; false: live-only
            d["observed"]["persisted"] = r.patch in self.persisted
        return d


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
        out = {str(s): 0 for s in STATUSES}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def findings(self) -> list[Finding]:
        """Every verdict as a Finding (the shape checks and recipe lint report too)."""
        return [r.finding() for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "kpipe.audit/v1",
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.generated_at)),
            "generated_at_epoch": self.generated_at, "sources": list(self.sources), "compliant": self.compliant,
            "summary": {"hosts": len(self.hosts), "compliant_hosts": sum(1 for h in self.hosts if h.compliant),
                        "statuses": self.counts()},
            "hosts": [h.to_dict() for h in self.hosts],
            **({"cves": self.cves.to_dict()} if self.cves is not None else {}),
        }


# -- evaluation ----------------------------------------------------------------------------------------------------


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


def _older_versions(want: DesiredPatch, observed: Mapping[str, Any]) -> list[tuple[str, int]]:
    """Loaded patches of `want`'s stream at a lower version than desired, as (name, version), newest first:
    a versioned module name (base_vN) with the same base as the desired one's."""
    mine = split_versioned(want.patch) if want.stream and want.version else None
    if mine is None:
        return []
    out = [(n, v[1]) for n in observed if (v := split_versioned(n)) and v[0] == mine[0] and v[1] < mine[1]]
    return sorted(out, key=lambda o: -o[1])


def _short(sha: str) -> str:
    return sha[:12] if sha else "?"


def _row(host: str, name: str, want: DesiredPatch | None, enabled: bool | None, transition: bool | None, sha: str,
         status: Verdict, detail: str) -> PatchStatus:
    return PatchStatus(host, name, status, detail, want, enabled, transition, sha)


def evaluate_host(desired: DesiredState, obs: ObservedHost, *,
                  built: Mapping[str, Iterable[str]] | None = None) -> HostAudit:
    """The verdicts for one host: desired patches and observed patches, one row each.

    `built`: patch module name -> the kernel releases the store holds an artifact of it for; a host
    that rebooted into a kernel without one is flagged "kernel changed: build needed for R"."""
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
            rows.append(PatchStatus(host, HOST_ROW, UNEXPECTED_TAINT, f"tainted={obs.tainted} "
                                    f"({taint_letters(obs.tainted)}); not allowed: {taint_letters(extra)}"))

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

        row = partial(_row, host, name, want, enabled, transition, sha)

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
                    detail = (f"not loaded; host now runs {obs.kernel}, "
                              f"artifact {want.artifact_id or '?'} is for {want.kernel}")
                    if built is not None:
                        have = {module_name(k): set(v) for k, v in built.items()}.get(name, set())
                        detail = (f"kernel changed: build needed for {obs.kernel} (`kpipe build --fleet {host}`)"
                                  if obs.kernel not in have else
                                  f"kernel changed: an artifact for {obs.kernel} exists, roll it out") \
                            + f"; {detail}"
                    rows.append(row(MISSING, detail))
                # a file rule scoped to another kernel does not apply to this host
                continue
            detail = "not loaded (no /sys/kernel/livepatch entry)"
            older = _older_versions(want, observed)
            if older:
                # the stream is there, at an older version: name it, an operator reads "outdated", not "gone"
                detail = (f"outdated: stream {want.stream} runs v{older[0][1]} ({older[0][0]}), desired "
                          f"v{want.version} ({name})")
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
                newer = [w for w in wanted.values() if any(o[0] == name for o in _older_versions(w, observed))]
                what = f"outdated version of stream {newer[0].stream} (desired v{newer[0].version}); " if newer else ""
                rows.append(row(UNEXPECTED, f"{what}loaded and enabled; {retired[name]}"))
            elif desired.unmanaged == Unmanaged.IGNORE:
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
            rows.append(row(WRONG_HASH, f"installed module sha256 {_short(sha)} != expected {_short(want.sha256)}"))
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
    return HostAudit(host, True, obs.kernel, obs.tainted, obs.error, tuple(rows), tuple(sorted(obs.persisted)))


def observed_from_livepatch(host: str, state: Any, *, kernel: str = "", installed: Mapping[str, str] | None = None,
                            error: str = "") -> ObservedHost:
    """An ObservedHost from kpipe.fleet.livepatch.HostLivepatch (patches, tainted, modules)."""
    modules = {n: bool(getattr(m, "present", m)) for n, m in (getattr(state, "modules", None) or {}).items()}
    return ObservedHost(host=host, reachable=True, error=error, kernel=kernel, tainted=getattr(state, "tainted", None),
                        patches=dict(getattr(state, "patches", None) or {}), installed=dict(installed or {}),
                        modules=modules)


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
    persisted = frozenset(module_name(f) for f in getattr(facts, "persisted", ()))
    return ObservedHost(host=facts.name, reachable=True, kernel=facts.release, arch=getattr(facts, "arch", ""),
                        tainted=facts.tainted, patches=patches, installed=installed, modules=modules, builds=builds,
                        persisted=persisted)


def unreachable(host: str, error: str) -> ObservedHost:
    """A host that could not be read: its first error line is the verdict's detail."""
    return ObservedHost(host, reachable=False, error=error.splitlines()[0] if error else "error")


def modules_to_read(desired: DesiredState, host: str) -> set[str]:
    """The modules whose /sys/module state a host's audit needs: desired and retired ones (a disabled
    patch's sysfs folder is gone while its module may still be loaded)."""
    return set(desired.for_host(host)) | set(desired.retired.get(host, {}))


def evaluate(desired: DesiredState, observed: Iterable[ObservedHost], *,
             generated_at: float | None = None, built: Mapping[str, Iterable[str]] | None = None) -> AuditResult:
    """Audit every observed host against the desired state; hosts sorted by name (`built`: see evaluate_host)."""
    hosts = tuple(evaluate_host(desired, o, built=built) for o in sorted(observed, key=lambda o: o.host))
    return AuditResult(generated_at=time.time() if generated_at is None else generated_at, hosts=hosts,
                       sources=tuple(desired.sources))
