"""The rollout planner: hosts + facts + candidate artifacts -> RolloutPlan (pure).

A plan names, for every eligible host, the one artifact built for its exact
kernel release, cuts the eligible hosts into waves (`1,10%,50%,100%`:
cumulative counts or percentages of the eligible hosts, at least one host per
wave, canary hosts first), and lists every excluded host with its reason
before anything starts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kpipe.desired import split_versioned
from kpipe.errors import ConfigError

if TYPE_CHECKING:
    from kpipe.artifacts import Artifact

ROLLBACK_POLICIES = ("failed", "wave", "all")
DEFAULT_WAVES = "1,10%,50%,100%"


# -- options -----------------------------------------------------------------
@dataclass(frozen=True)
class FailureBudget:
    """How many failed hosts a rollout tolerates: a count, or a percentage of the hosts attempted."""

    count: int | None = 0
    percent: float | None = None

    @classmethod
    def parse(cls, text: str | int) -> FailureBudget:
        """`3` -> at most 3 failures; `10%` -> at most 10 % of the hosts attempted so far."""
        s = str(text).strip()
        try:
            if s.endswith("%"):
                p = float(s[:-1])
                if not 0 <= p <= 100:
                    raise ValueError
                return cls(count=None, percent=p)
            n = int(s)
            if n < 0:
                raise ValueError
            return cls(count=n, percent=None)
        except ValueError:
            raise ConfigError(f"--max-failures {s!r} is not a count or a percentage",
                              hint="use N (e.g. 0, 2) or N% (e.g. 10%)") from None

    def allowed(self, attempted: int) -> int:
        """Failures tolerated once `attempted` hosts have been tried (floor of the percentage)."""
        if self.percent is not None:
            return math.floor(self.percent * attempted / 100 + 1e-9)
        return self.count or 0

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


MAX_SOAK_S = 7 * 24 * 3600.0  # a week: longer is a typo, not a soak
MIN_VERIFY_INTERVAL_S = 0.5
MIN_STEP_TIMEOUT_S, MAX_STEP_TIMEOUT_S = 1.0, 24 * 3600.0


@dataclass(frozen=True)
class RolloutOptions:
    """How a plan is executed and gated."""

    waves: str = DEFAULT_WAVES
    soak_s: float = 0.0  # seconds each wave is watched after it applied
    verify_interval_s: float = 10.0  # re-verification period during the soak
    max_failures: FailureBudget = FailureBudget()
    rollback_policy: str = "failed"  # failed | wave | all
    skip_preflight: bool = False
    persist: bool = False  # install for reboot (kpatch install / copy to /var/lib/kpatch)
    forks: int = 50
    step_timeout_s: float = 120.0  # per host step (load, transition wait)

    def __post_init__(self) -> None:
        if self.rollback_policy not in ROLLBACK_POLICIES:
            raise ConfigError(f"--rollback-policy {self.rollback_policy!r} is unknown",
                              hint=f"use one of {', '.join(ROLLBACK_POLICIES)}")
        # Every bound is written so that nan fails it too (comparisons with nan are false),
        # whether the value came from the command line, a recipe's `rollout:` or a stored plan.
        for what, value, lo, hi in (("soak", self.soak_s, 0.0, MAX_SOAK_S),
                                    ("verify interval", self.verify_interval_s, MIN_VERIFY_INTERVAL_S, MAX_SOAK_S),
                                    ("step timeout", self.step_timeout_s, MIN_STEP_TIMEOUT_S, MAX_STEP_TIMEOUT_S)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi):
                raise ConfigError(f"rollout {what} {value!r} is not a number of seconds from {lo:g} to {hi:g}",
                                  hint="check --soak / --verify-interval / --step-timeout and the recipe's rollout:")
        if not (isinstance(self.forks, int) and 1 <= self.forks <= 10000):
            raise ConfigError(f"--forks {self.forks!r} must be a whole number from 1 to 10000")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_failures"] = str(self.max_failures)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutOptions:
        d = dict(d)
        d["max_failures"] = FailureBudget.parse(d.get("max_failures", "0"))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


# -- inputs ------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedPatch:
    """A livepatch the host already runs (from its facts)."""

    name: str
    enabled: bool = True
    transition: bool = False


@dataclass(frozen=True)
class HostView:
    """What the planner needs to know about one host: plain data, built from inventory + facts."""

    name: str
    reachable: bool = True
    error: str = ""  # why facts could not be gathered
    release: str = ""
    arch: str = ""
    livepatch: bool = True  # /sys/kernel/livepatch exists
    sig_enforce: bool = False
    loaded: tuple[LoadedPatch, ...] = ()
    canary: bool = False  # inventory group `canary` or host var kpipe_canary


@dataclass(frozen=True)
class Candidate:
    """An artifact the planner may assign (a projection of kpipe.artifacts.Artifact)."""

    id: str
    sha256: str
    module_name: str
    filename: str
    kernel: str
    arch: str = ""
    recipe: str = ""
    signed: bool = False
    status: str = "valid"
    preflight: str = ""  # passed | failed | "" (never run)
    created_at: float = 0.0
    replace: bool = True  # klp replace mode (kpatch-build default)
    stream: str = ""  # the recipe's patch stream ("": the recipe's name)
    version: int = 1  # the version within the stream

    @property
    def stream_name(self) -> str:
        """The stream this artifact belongs to: the recipe's `stream:`, else its recipe, else its module."""
        return self.stream or self.recipe or self.module_name.replace("-", "_")

    @property
    def sysfs_name(self) -> str:
        """The module name as sysfs and lsmod show it ('-' becomes '_')."""
        return self.module_name.replace("-", "_")

    @classmethod
    def of(cls, art: Artifact) -> Candidate:
        """From a kpipe.artifacts.Artifact."""
        meta = getattr(art, "meta", {}) or {}
        validation = getattr(art, "validation", {}) or {}
        replace = meta.get("replace", validation.get("replace", True))
        version = meta.get("version", 1)
        return cls(id=art.id, sha256=art.sha256, module_name=art.module_name, filename=art.filename,
                   kernel=art.kernel, arch=art.arch or "", recipe=art.recipe or "", signed=bool(art.signed),
                   status=art.status, preflight=str((art.preflight or {}).get("status", "")),
                   created_at=float(art.created_at or 0), replace=bool(replace),
                   stream=str(meta.get("stream") or ""),
                   version=version if isinstance(version, int) and not isinstance(version, bool) else 1)


# -- outputs -----------------------------------------------------------------
@dataclass(frozen=True)
class Assignment:
    """One eligible host and what it gets."""

    host: str
    wave: int  # 1-based
    release: str
    arch: str
    artifact: Candidate
    notes: tuple[str, ...] = ()
    # an upgrade: the older version of the same stream loaded on the host (sysfs name), retired once ours
    # is verified, and its artifact when the store knows it (a rollback loads it again)
    supersedes: str = ""
    supersedes_artifact: Candidate | None = None
    coexists: tuple[str, ...] = ()  # other streams' patches ours loads beside (ours is not a replace patch)

    @property
    def sysfs_name(self) -> str:
        """The module name as sysfs and lsmod show it ('-' becomes '_')."""
        return self.artifact.module_name.replace("-", "_")


@dataclass(frozen=True)
class Exclusion:
    host: str
    code: str  # unreachable | no-livepatch | no-artifact | arch-mismatch | unsigned | not-preflighted | conflict
    #            | downgrade
    reason: str


@dataclass(frozen=True)
class RolloutPlan:
    """Waves of assignments, exclusions with reasons, and the options to run them with."""

    target: str  # the recipe name or artifact id the user asked for
    target_kind: str  # recipe | artifact
    waves: tuple[tuple[str, ...], ...]
    assignments: dict[str, Assignment]
    excluded: tuple[Exclusion, ...]
    options: RolloutOptions
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)  # artifact id -> Probe as dict
    gates: dict[str, Any] = field(default_factory=dict)  # kpipe.rollout.gate.GateConfig as dict

    @property
    def hosts(self) -> list[str]:
        """Eligible hosts in execution order."""
        return [h for w in self.waves for h in w]

    def artifacts(self) -> dict[str, Candidate]:
        return {a.artifact.id: a.artifact for a in self.assignments.values()}

    def restorable(self) -> dict[str, Candidate]:
        """The older versions a rollback of this plan's upgrades loads again, by artifact id."""
        return {a.supersedes_artifact.id: a.supersedes_artifact for a in self.assignments.values()
                if a.supersedes_artifact is not None}

    def preflight_missing(self) -> list[Exclusion]:
        """Exclusions that exist only because an artifact has not passed preflight."""
        return [e for e in self.excluded if e.code == "not-preflighted"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "target_kind": self.target_kind,
            "waves": [list(w) for w in self.waves],
            "assignments": {h: {**asdict(a), "artifact": asdict(a.artifact), "notes": list(a.notes),
                                "coexists": list(a.coexists)}
                            for h, a in self.assignments.items()},
            "excluded": [asdict(e) for e in self.excluded],
            "options": self.options.to_dict(),
            "probes": self.probes,
            "gates": self.gates,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutPlan:
        assignments = {}
        for h, a in d["assignments"].items():
            a = dict(a)
            a["artifact"] = Candidate(**a["artifact"])
            a["notes"] = tuple(a.get("notes", ()))
            a["coexists"] = tuple(a.get("coexists", ()))
            if a.get("supersedes_artifact"):
                a["supersedes_artifact"] = Candidate(**a["supersedes_artifact"])
            assignments[h] = Assignment(**a)
        return cls(target=d["target"], target_kind=d["target_kind"],
                   waves=tuple(tuple(w) for w in d["waves"]), assignments=assignments,
                   excluded=tuple(Exclusion(**e) for e in d["excluded"]),
                   options=RolloutOptions.from_dict(d["options"]), probes=dict(d.get("probes", {})),
                   gates=dict(d.get("gates") or {}))


# -- waves -------------------------------------------------------------------
_WAVE_ITEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


def parse_waves(spec: str) -> list[tuple[float, bool]]:
    """`1,10%,50%,100%` -> [(1, False), (10, True), ...]; ConfigError on nonsense."""
    items = []
    for part in spec.split(","):
        m = _WAVE_ITEM.match(part)
        if not m:
            raise ConfigError(f"--waves {spec!r}: {part.strip()!r} is neither a count nor a percentage",
                              hint="e.g. --waves 1,10%,50%,100%")
        value, pct = float(m.group(1)), bool(m.group(2))
        if (pct and not 0 < value <= 100) or (not pct and (value < 1 or value != int(value))):
            raise ConfigError(f"--waves {spec!r}: {part.strip()!r} is out of range",
                              hint="counts are whole numbers >= 1, percentages in (0, 100]")
        items.append((value, pct))
    if not items:
        raise ConfigError("--waves is empty", hint="e.g. --waves 1,10%,50%,100%")
    return items


def wave_sizes(spec: str, eligible: int) -> list[int]:
    """Sizes of the waves for `eligible` hosts. Entries are cumulative; each wave gets at least one
    host; waves that would be empty are dropped; hosts the spec leaves over form a last wave."""
    items = parse_waves(spec)
    sizes: list[int] = []
    done = 0
    for value, pct in items:
        if done >= eligible:
            break
        cumulative = math.ceil(value * eligible / 100 - 1e-9) if pct else int(value)
        cumulative = min(max(cumulative, done + 1), eligible)
        sizes.append(cumulative - done)
        done = cumulative
    if done < eligible:
        sizes.append(eligible - done)
    return sizes


def _natural_key(name: str) -> list[Any]:
    # web2 before web10: operators number their hosts
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def order_hosts(hosts: Iterable[HostView]) -> list[str]:
    """Deterministic execution order: canaries first, then round-robin over kernel releases
    (so that early waves touch every kernel), hosts in natural name order within a release."""
    hosts = list(hosts)
    canaries = sorted((h for h in hosts if h.canary), key=lambda h: _natural_key(h.name))
    by_release: dict[str, list[HostView]] = {}
    for h in sorted((h for h in hosts if not h.canary), key=lambda h: _natural_key(h.name)):
        by_release.setdefault(h.release, []).append(h)
    releases = sorted(by_release, key=lambda r: (-len(by_release[r]), r))
    rest: list[str] = []
    i = 0
    while any(i < len(by_release[r]) for r in releases):
        rest += [by_release[r][i].name for r in releases if i < len(by_release[r])]
        i += 1
    return [h.name for h in canaries] + rest


# -- choosing artifacts ------------------------------------------------------
def _rank(c: Candidate, skip_preflight: bool) -> tuple[int, bool, bool, float, str]:
    # the stream's highest version first (an older one is never shipped because it was preflighted);
    # then newest signed preferred; a preflighted artifact beats an unchecked one of the same signedness
    return (c.version, c.signed, skip_preflight or c.preflight == "passed", c.created_at, c.id)


def choose_artifact(host: HostView, candidates: list[Candidate], target_kind: str, target: str,
                    skip_preflight: bool) -> tuple[Candidate | None, Exclusion | None]:
    """The artifact for one host, or the reason it gets none."""
    if not host.reachable:
        return None, Exclusion(host.name, "unreachable", f"unreachable: {host.error or 'no facts'}")
    if not host.livepatch:
        return None, Exclusion(host.name, "no-livepatch",
                               f"no livepatch support (/sys/kernel/livepatch missing on {host.release or '?'})")
    valid = [c for c in candidates if c.status == "valid"]
    for_release = [c for c in valid if c.kernel == host.release]
    if not for_release:
        if target_kind == "artifact" and valid:
            return None, Exclusion(host.name, "no-artifact",
                                   f"no artifact for release {host.release}: {target} is for {valid[0].kernel}")
        return None, Exclusion(host.name, "no-artifact",
                               f"no valid artifact of {target} for release {host.release or '?'}")
    arch_ok = [c for c in for_release if not c.arch or not host.arch or c.arch == host.arch]
    if not arch_ok:
        return None, Exclusion(host.name, "arch-mismatch",
                               f"arch mismatch: host is {host.arch}, artifact {for_release[0].id} is "
                               f"{for_release[0].arch}")
    usable = [c for c in arch_ok if c.signed] if host.sig_enforce else arch_ok
    if not usable:
        return None, Exclusion(host.name, "unsigned",
                               f"sig_enforce is on and artifact {arch_ok[0].id} is unsigned "
                               f"(sign it: kpipe sign {arch_ok[0].id})")
    best = max(usable, key=lambda c: _rank(c, skip_preflight))
    if not skip_preflight and best.preflight != "passed":
        status = "failed" if best.preflight == "failed" else "not run"
        return None, Exclusion(host.name, "not-preflighted",
                               f"artifact {best.id} not preflighted (preflight {status}; run `kpipe preflight "
                               f"{best.id}` or pass --skip-preflight)")
    return best, None


@dataclass(frozen=True)
class _Identified:
    stream: str
    version: int
    artifact: Candidate | None


def identify(name: str, release: str, known: Iterable[Candidate]) -> _Identified | None:
    """The stream and version of a loaded patch `name` (sysfs form): from the store's artifacts of that
    module (the one for `release` preferred), else None (the patch is not kpipe's, or its artifact is gone)."""
    same = [c for c in known if c.sysfs_name == name]
    if not same:
        return None
    best = max(same, key=lambda c: (c.kernel == release, c.status == "valid", c.created_at, c.id))
    return _Identified(best.stream_name, best.version, best if best.kernel == release else None)


def _by_name(name: str, ours: Candidate) -> _Identified | None:
    """A loaded patch of our stream recognised by its versioned module name (base_vN) alone."""
    mine, theirs = split_versioned(ours.sysfs_name), split_versioned(name)
    if mine is None or theirs is None or mine[0] != theirs[0]:
        return None
    return _Identified(ours.stream_name, theirs[1], None)


@dataclass(frozen=True)
class _Fit:
    """What loading our artifact means on one host: refused (`why`), or notes, an upgrade, coexistence."""

    why: Exclusion | None = None
    notes: tuple[str, ...] = ()
    supersedes: str = ""
    supersedes_artifact: Candidate | None = None
    coexists: tuple[str, ...] = ()


def _conflicts(host: HostView, art: Candidate, known: Iterable[Candidate] = ()) -> _Fit:
    """A loaded patch that makes loading ours unsafe, or what ours will do to the loaded ones.

    Streams: an older version of our stream is upgraded (ours loads, then the older one is retired); a
    newer one refuses ours (a downgrade is a rollback's job). Another stream's patch and a replace patch
    of ours cannot share a host: klp replace disables every other live patch, whatever its stream, so
    ours must be built `replace: false` to load beside it."""
    ours = art.sysfs_name
    known = list(known)
    notes: list[str] = []
    supersedes, old_art, coexists = "", None, []

    def refuse(code: str, reason: str) -> _Fit:
        return _Fit(Exclusion(host.name, code, reason))

    for p in host.loaded:
        if p.transition:
            # enabling a patch while another is in transition fails with EBUSY (kernel/livepatch/core.c)
            return refuse("conflict", f"conflicting patch loaded: {p.name} is in transition")
        if p.name == ours:
            notes.append(f"{ours} already loaded ({'enabled' if p.enabled else 'disabled'}); will verify")
            if not p.enabled:
                # a disabled patch cannot be re-enabled; it must be removed first
                return refuse("conflict", f"conflicting patch loaded: {p.name} is loaded but disabled")
            continue
        ident = identify(p.name, host.release, known) or _by_name(p.name, art)
        if ident is not None and ident.stream == art.stream_name:
            if ident.version > art.version:
                return refuse("downgrade", f"stream {art.stream_name} v{ident.version} ({p.name}) is loaded, newer "
                                           f"than {ours} (v{art.version}): kpipe does not downgrade; `kpipe rollout "
                                           f"rollback` of the rollout that upgraded loads the older version again")
            if ident.version == art.version:
                return refuse("conflict", f"conflicting patch loaded: {p.name} is stream {art.stream_name} "
                                          f"v{art.version} too, under another module name")
            if supersedes:
                return refuse("conflict", f"two older versions of stream {art.stream_name} are loaded "
                                          f"({supersedes}, {p.name}): remove one first")
            supersedes, old_art = p.name, ident.artifact
            how = "replaces it" if art.replace else "then disables it"
            notes.append(f"upgrade of stream {art.stream_name}: v{ident.version} ({p.name}) -> v{art.version}; "
                         f"loads {ours} (which {how}), then unloads {p.name}"
                         + ("" if old_art else f"; no artifact of {p.name} in the store: a rollback cannot "
                                               f"load it again"))
        elif ident is not None:
            if not p.enabled:
                continue  # a disabled leftover of another stream: nothing ours would change
            if art.replace:
                return refuse("conflict", f"conflicting patch loaded: {p.name} (stream {ident.stream}) and ours "
                                          f"(stream {art.stream_name}) is a replace patch, which would disable "
                                          f"it: streams that share a host are built `replace: false`")
            coexists.append(p.name)
            notes.append(f"loads beside {p.name} (stream {ident.stream}): both are non-replace patches")
        elif p.enabled and not art.replace:
            return refuse("conflict", f"conflicting patch loaded: {p.name} (ours is not a replace patch, and "
                                      f"{p.name} is no kpipe stream's)")
        elif p.enabled:
            notes.append(f"replaces loaded livepatch {p.name}")
    return _Fit(None, tuple(notes), supersedes, old_art, tuple(coexists))


def plan_rollout(target: str, target_kind: str, hosts: Iterable[HostView], candidates: Iterable[Candidate],
                 options: RolloutOptions, probes: Mapping[str, dict[str, Any]] | None = None,
                 known: Iterable[Candidate] = ()) -> RolloutPlan:
    """The plan for `target` (a recipe name or an artifact id) over these hosts (pure).

    `known`: the store's artifacts, to tell which stream and version a loaded patch is (upgrades,
    downgrades, other streams); the candidates are always known."""
    if target_kind not in ("recipe", "artifact"):
        raise ValueError(f"bad target kind {target_kind!r}")
    cands = list(candidates)
    hosts = list(hosts)
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise ConfigError(f"host names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    known_all = cands + [k for k in known if k.id not in {c.id for c in cands}]
    chosen: dict[str, tuple[Candidate, _Fit]] = {}
    excluded: list[Exclusion] = []
    for h in hosts:
        art, why = choose_artifact(h, cands, target_kind, target, options.skip_preflight)
        if why is None and art is not None:
            fit = _conflicts(h, art, known_all)
            why = fit.why
            if why is None:
                chosen[h.name] = (art, fit)
        if why is not None:
            excluded.append(why)
    views = {h.name: h for h in hosts}
    order = order_hosts(views[n] for n in chosen)
    waves: list[tuple[str, ...]] = []
    i = 0
    for size in wave_sizes(options.waves, len(order)):
        waves.append(tuple(order[i:i + size]))
        i += size
    assignments = {}
    for w, wave in enumerate(waves, start=1):
        for name in wave:
            art, fit = chosen[name]
            assignments[name] = Assignment(host=name, wave=w, release=views[name].release,
                                           arch=views[name].arch, artifact=art, notes=fit.notes,
                                           supersedes=fit.supersedes, supersedes_artifact=fit.supersedes_artifact,
                                           coexists=fit.coexists)
    excluded.sort(key=lambda e: _natural_key(e.host))
    used = {a.artifact.id for a in assignments.values()}
    used |= {a.supersedes_artifact.id for a in assignments.values() if a.supersedes_artifact is not None}
    return RolloutPlan(target=target, target_kind=target_kind, waves=tuple(waves), assignments=assignments,
                       excluded=tuple(excluded), options=options,
                       probes={k: v for k, v in (probes or {}).items() if k in used})
