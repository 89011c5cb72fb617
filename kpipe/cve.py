"""CVE coverage: which hosts a recipe's patch protects and which are still exposed.

A recipe declares the CVEs its patch fixes (`fixes:` in the recipe). A host is
*exposed* to a CVE when it runs a kernel that a recipe fixing that CVE targets
(the recipe's kernel globs match the host's release, and the kernel's
architecture, where known, is the host's) but none of the modules that recipe
builds is loaded and verified there (the audit's verdict for the module is
compliant and the patch is enabled). It is *fixed* when one is. A host that
could not be read is *unknown* for every CVE: kpipe cannot tell which kernel it
runs, and "who is still exposed" must not leave it out silently. Hosts that no
recipe fixing the CVE targets get no verdict for it.

`evaluate_cves` is pure (data in, data out); `cve_hosts_from_audit` turns the
audit's verdicts into its input and `load_cve_recipes` (the edge) reads the
workspace's recipes and artifacts.
"""

from __future__ import annotations

import fnmatch
import glob
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kpipe.kernel import normalize_arch
from kpipe.recipes.schema import SEVERITIES

if TYPE_CHECKING:
    from kpipe.recipes.loading import Recipe
    from kpipe.workspace import Workspace

FIXED = "fixed"
EXPOSED = "exposed"
UNKNOWN = "unknown"
CVE_STATUSES: tuple[str, ...] = (FIXED, EXPOSED, UNKNOWN)


@dataclass(frozen=True)
class Fix:
    """One `fixes:` entry of a recipe."""

    cve: str
    severity: str
    summary: str


@dataclass(frozen=True)
class CveRecipe:
    """What the CVE view needs of a recipe: its kernel globs, the modules it builds, what they fix.

    `arch` is the architecture of the targeted kernel when the catalog or the
    release name says it ("" or "unknown": any). `arches` is the recipe's own
    `arches:` list (empty: every arch): one release string can name kernels of
    several arches, and a recipe built for one of them fixes nothing on the others.
    """

    recipe: str
    kernels: tuple[str, ...]
    modules: tuple[str, ...]  # sysfs names ('_' form)
    fixes: tuple[Fix, ...]
    arch: str = ""
    arches: tuple[str, ...] = ()

    def targets(self, release: str, arch: str) -> bool:
        """True if this recipe's patch is meant for a host running `release` on `arch`."""
        if not release or not any(fnmatch.fnmatchcase(release, g) for g in self.kernels):
            return False
        theirs = normalize_arch(arch) if arch and arch != "unknown" else ""
        if theirs and self.arches and theirs not in {normalize_arch(a) for a in self.arches}:
            return False
        mine = normalize_arch(self.arch) if self.arch and self.arch != "unknown" else ""
        return not mine or not theirs or mine == theirs


@dataclass(frozen=True)
class CveHost:
    """What the CVE view needs of a host: its kernel, and which modules are loaded and verified."""

    host: str
    reachable: bool = True
    release: str = ""
    arch: str = ""
    verified: frozenset[str] = frozenset()  # sysfs module names: loaded, enabled, settled, audit-compliant
    # module -> audit status, for the modules the host shows but that are not verified (for the detail)
    seen: Mapping[str, str] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class CveVerdict:
    """One host and one CVE: fixed, exposed or unknown, and why."""

    host: str
    cve: str
    severity: str
    status: str
    recipes: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    kernel: str = ""
    detail: str = ""

    @property
    def exposed(self) -> bool:
        return self.status == EXPOSED

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "cve": self.cve, "severity": self.severity, "status": self.status,
                "recipes": list(self.recipes), "modules": list(self.modules), "kernel": self.kernel,
                "detail": self.detail}


@dataclass(frozen=True)
class CveSummary:
    """One CVE across the fleet: what it is and how many hosts are fixed, exposed, unknown."""

    cve: str
    severity: str
    summary: str
    recipes: tuple[str, ...]
    fixed_hosts: tuple[str, ...]
    exposed_hosts: tuple[str, ...]
    unknown_hosts: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"cve": self.cve, "severity": self.severity, "summary": self.summary, "recipes": list(self.recipes),
                "hosts_targeted": len(self.fixed_hosts) + len(self.exposed_hosts),
                "hosts_fixed": len(self.fixed_hosts), "hosts_exposed": len(self.exposed_hosts),
                "hosts_unknown": len(self.unknown_hosts), "fixed_hosts": list(self.fixed_hosts),
                "exposed_hosts": list(self.exposed_hosts), "unknown_hosts": list(self.unknown_hosts)}


@dataclass(frozen=True)
class CveReport:
    """Every CVE the workspace's recipes fix, per host and for the fleet."""

    cves: tuple[CveSummary, ...] = ()
    verdicts: tuple[CveVerdict, ...] = ()
    errors: tuple[str, ...] = ()  # recipes that could not be read (their CVEs are missing from the view)

    def for_cve(self, cve: str) -> list[CveVerdict]:
        """The verdicts about one CVE, hosts in order."""
        return [v for v in self.verdicts if v.cve == cve]

    def for_host(self, host: str) -> list[CveVerdict]:
        """The verdicts about one host, CVEs in order."""
        return [v for v in self.verdicts if v.host == host]

    def only(self, cves: Iterable[str]) -> CveReport:
        """The same report narrowed to some CVEs."""
        keep = set(cves)
        return CveReport(tuple(s for s in self.cves if s.cve in keep),
                         tuple(v for v in self.verdicts if v.cve in keep), self.errors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": [s.to_dict() for s in self.cves],
            "hosts": [v.to_dict() for v in self.verdicts],
            "errors": list(self.errors),
        }


def severity_rank(severity: str) -> int:
    """Position in SEVERITIES (none=0 ... critical=4); -1 for an unknown word."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else -1


def evaluate_cves(recipes: Iterable[CveRecipe], hosts: Iterable[CveHost]) -> CveReport:
    """CVE verdicts per host and a fleet summary per CVE (sorted by CVE id, hosts by name).

    When several recipes declare the same CVE, the highest severity wins and the
    summary comes from the first recipe by name.
    """
    recipes = sorted(recipes, key=lambda r: (r.recipe, r.kernels))
    hosts = sorted(hosts, key=lambda h: h.host)
    info: dict[str, Fix] = {}
    by_cve: dict[str, list[CveRecipe]] = {}
    for r in recipes:
        for f in r.fixes:
            known = info.get(f.cve)
            if known is None:
                info[f.cve] = f
            elif severity_rank(f.severity) > severity_rank(known.severity):
                info[f.cve] = Fix(f.cve, f.severity, known.summary)
            by_cve.setdefault(f.cve, []).append(r)

    verdicts: list[CveVerdict] = []
    summaries: list[CveSummary] = []
    for cve in sorted(by_cve):
        fix = info[cve]
        fixed: list[str] = []
        exposed: list[str] = []
        unknown: list[str] = []
        for h in hosts:
            if not h.reachable:
                unknown.append(h.host)
                verdicts.append(CveVerdict(h.host, cve, fix.severity, UNKNOWN, kernel=h.release,
                                           detail=f"host not read: {h.error or 'unreachable'}"))
                continue
            aiming = [r for r in by_cve[cve] if r.targets(h.release, h.arch)]
            if not aiming:
                continue
            names = tuple(sorted({r.recipe for r in aiming}))
            modules = tuple(sorted({m for r in aiming for m in r.modules}))
            active = sorted(m for m in modules if m in h.verified)
            if active:
                fixed.append(h.host)
                verdicts.append(CveVerdict(h.host, cve, fix.severity, FIXED, names, modules, h.release,
                                           f"{', '.join(active)} loaded and verified"))
                continue
            exposed.append(h.host)
            present = [f"{m} is {h.seen[m]}" for m in modules if m in h.seen]
            if present:
                why = "; ".join(present) + " (not verified)"
            else:
                why = f"{' or '.join(modules) or 'no module known'} not loaded"
            verdicts.append(CveVerdict(h.host, cve, fix.severity, EXPOSED, names, modules, h.release,
                                       f"{why}; {h.release} is targeted by {', '.join(names)}"))
        summaries.append(CveSummary(cve, fix.severity, fix.summary, tuple(sorted({r.recipe for r in by_cve[cve]})),
                                    tuple(fixed), tuple(exposed), tuple(unknown)))
    return CveReport(tuple(summaries), tuple(verdicts))


def cve_hosts_from_audit(result: Any, arches: Mapping[str, str] | None = None) -> list[CveHost]:
    """CveHost per audited host (kpipe.audit.AuditResult): a module counts when its verdict is compliant and enabled.

    `arches` maps host -> architecture as the host reported it (facts).
    """
    out = []
    for h in result.hosts:
        verified: set[str] = set()
        seen: dict[str, str] = {}
        for r in h.rows:
            if not r.patch:
                continue
            if r.status == "compliant" and r.enabled is True:
                verified.add(r.patch)
            elif r.status != "compliant":
                seen.setdefault(r.patch, r.status)
        out.append(CveHost(host=h.host, reachable=h.reachable, release=h.kernel, arch=(arches or {}).get(h.host, ""),
                           verified=frozenset(verified), seen=seen, error=h.error))
    return out


# --------------------------------------------------------------------------
# The edge: the workspace's recipes (rendered per release) and artifacts
# --------------------------------------------------------------------------


def _recipe_for_release(ws: Workspace, recipe: Recipe, release: str, modules_built: Iterable[str]) -> CveRecipe:
    """A recipe's `fixes:` and module name rendered for one release (in the recipes' sandbox).

    ConfigError (file:line) on a problem.
    """
    from kpipe.desired import module_name
    from kpipe.kernel import parse_release
    from kpipe.recipes.loading import _display
    from kpipe.recipes.problems import _Problems, _raise_first
    from kpipe.recipes.render import _kernel_vars, _render_tree, predict_module_name
    from kpipe.recipes.sandbox import _sandbox, _WorkspaceLoader
    from kpipe.recipes.schema import check_fixes
    from kpipe.settings import KernelEntry

    entry = ws.kernels.get(release) or KernelEntry(release=release)
    _, kvars = _kernel_vars(entry)
    options = recipe.options
    entry_opts = dict(getattr(entry, "options", {}) or {})
    for key in options:
        if key in entry_opts:
            options[key] = entry_opts[key]
    variables = {"kernel": kvars, "options": options, "recipe": recipe.name}
    shown = _display(ws, recipe.file)
    probs = _Problems(shown, recipe.lines, recipe.key_lines, context=f"kernel {release}")
    loader = _WorkspaceLoader(ws)
    env = _sandbox(loader)
    data = recipe.data
    # Only what the CVE view reads: a template elsewhere (a source name, the signer) is
    # the build's business, and `kpipe recipe lint` reports it.
    section_key = "kpatch" if recipe.builder == "kpatch-build" else "kbuild"
    subset: dict[str, Any] = {k: data[k] for k in ("fixes", "patches") if k in data}
    section = data.get(section_key)
    if isinstance(section, dict) and "module_name" in section:
        subset[section_key] = {"module_name": section["module_name"]}
    rendered = _render_tree(env, subset, (), variables, probs, loader)
    fixes = check_fixes(rendered, probs, rendered=True) if not probs.errors else []
    _raise_first(probs.items, shown)
    explicit = (rendered.get(section_key) or {}).get("module_name")
    patches = [p for p in rendered.get("patches") or [] if isinstance(p, str)]
    module = predict_module_name(recipe.builder, recipe.name, patches, explicit if isinstance(explicit, str) else None)
    arch = getattr(entry, "arch", "") or parse_release(release).arch
    return CveRecipe(recipe=recipe.name, kernels=(glob.escape(release),),
                     modules=tuple(sorted({module_name(module), *(module_name(m) for m in modules_built)})),
                     fixes=tuple(Fix(**f) for f in fixes), arch=arch, arches=recipe.arches)


def _one_line(e: Any) -> str:
    """A KpipeError as "file:line: message (hint)": the CVE view keeps problems as lines."""
    hint = (e.hint or "").strip()
    return f"{e.message} ({hint})" if hint else e.message


def load_cve_recipes(ws: Workspace, releases: Iterable[str]) -> tuple[list[CveRecipe], list[str]]:
    """The recipes that declare `fixes:`, one CveRecipe per recipe and fleet release it targets.

    Returns (recipes, errors): a recipe that cannot be read or rendered is one
    "file:line: message" in errors, and the rest of the view still stands.
    """
    from kpipe.errors import KpipeError
    from kpipe.recipes.loading import load_recipe, recipe_files
    from kpipe.recipes.problems import _Problems
    from kpipe.recipes.schema import _is_template, check_fixes

    releases = sorted({r for r in releases if r})
    out: list[CveRecipe] = []
    errors: list[str] = []
    built: dict[tuple[str, str], set[str]] = {}
    try:
        from kpipe.artifacts import list_artifacts

        for art in list_artifacts(ws.store):
            if art.recipe and art.status != "rejected":
                built.setdefault((art.recipe, art.kernel), set()).add(art.module_name)
    except Exception as e:  # noqa: BLE001 -- no store yet: the predicted module name is enough
        errors.append(f"artifacts not read: {e}")
    for file in recipe_files(ws):
        try:
            recipe = load_recipe(ws, file.stem)
        except KpipeError as e:
            errors.append(_one_line(e))
            continue
        if not recipe.data.get("fixes"):
            continue
        targeted = [r for r in releases if recipe.matches(r)]
        for release in targeted:
            try:
                out.append(_recipe_for_release(ws, recipe, release, built.get((recipe.name, release), ())))
            except KpipeError as e:
                errors.append(_one_line(e))
        if not targeted:
            # No audited host runs a kernel it targets: its CVEs still belong in the
            # view (nobody exposed), from the literal entries (templates need a kernel).
            literal = [f for f in recipe.data["fixes"] if isinstance(f, dict)
                       and not any(_is_template(v) for v in f.values())]
            probs = _Problems(str(file))
            fixes = check_fixes({"fixes": literal}, probs, rendered=True)
            out.append(CveRecipe(recipe=recipe.name, kernels=(), modules=(), fixes=tuple(Fix(**f) for f in fixes)))
    return out, errors


def cve_report(ws: Workspace, result: Any, arches: Mapping[str, str] | None = None) -> CveReport:
    """The CVE view of an audit result: the workspace's recipes against the audited hosts."""
    hosts = cve_hosts_from_audit(result, arches)
    recipes, errors = load_cve_recipes(ws, [h.release for h in hosts])
    report = evaluate_cves(recipes, hosts)
    return CveReport(report.cves, report.verdicts, tuple(errors))
