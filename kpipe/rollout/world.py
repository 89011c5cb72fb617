"""The rollout's edges: inventory, facts, artifacts and probes in; an Engine over SSH out.

Everything here touches the world (the store, the inventory files, the hosts);
the planner, the gate and the journal reader stay pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpipe.errors import ConfigError, KpipeError, NotFoundError, ValidationFailed
from kpipe.host import Host
from kpipe.rollout.journal import Journal
from kpipe.rollout.planner import (
    Assignment,
    Candidate,
    HostView,
    LoadedPatch,
    RolloutOptions,
    RolloutPlan,
    plan_rollout,
)

if TYPE_CHECKING:  # real imports would load Fabric/paramiko and the engine for every rollout command
    from kpipe.builder.spec import BuildSpec
    from kpipe.fleet.facts import HostFacts
    from kpipe.fleet.observe import HostError
    from kpipe.rollout.engine import Engine, PoolRunner
    from kpipe.store import Store
    from kpipe.transport.ssh import SshPool
    from kpipe.workspace import Workspace

_ARTIFACT_ID = re.compile(r"^[0-9a-f]{4,12}$")


def _truthy(v: Any) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes", "on")


def host_view(host: Host, facts: HostFacts | BaseException | None) -> HostView:
    """A planner HostView from an inventory Host and its HostFacts (or the exception gathering raised)."""
    canary = "canary" in host.groups or _truthy(host.vars.get("kpipe_canary", False))
    if facts is None or isinstance(facts, BaseException):
        return HostView(name=host.name, reachable=False, error=str(facts or "no facts"), canary=canary)
    loaded = tuple(LoadedPatch(name=p.name, enabled=p.enabled == 1, transition=p.transition == 1)
                   for p in facts.patches.values())
    from kpipe.kernel import normalize_arch

    return HostView(name=host.name, reachable=True, release=facts.release, arch=normalize_arch(facts.arch or ""),
                    livepatch=facts.livepatch_sysfs, sig_enforce=bool(facts.sig_enforce), loaded=loaded,
                    canary=canary)


def candidates_for(store: Store, target: str) -> tuple[str, list[Candidate]]:
    """(target kind, candidate artifacts): a recipe name -> its valid artifacts; an id -> that artifact.
    StoreCorrupt when a candidate's module changed in the store: it never leaves, and no host is asked."""
    kind, cands = _candidates(store, target)
    for c in cands:
        store.verified_path(c.sha256)
    return kind, cands


def _candidates(store: Store, target: str) -> tuple[str, list[Candidate]]:
    from kpipe.artifacts import get_artifact, list_artifacts

    if _ARTIFACT_ID.match(target.lower()):
        try:
            art = get_artifact(store, target)
        except NotFoundError:
            art = None
        if art is not None:
            if art.status != "valid":
                raise ValidationFailed(f"artifact {art.id} is {art.status}, not valid: it cannot be rolled out",
                                       hint=f"see `kpipe artifacts show {art.id}`")
            return "artifact", [Candidate.of(art)]
    arts = list_artifacts(store, recipe=target, status="valid")
    if not arts:
        anything = list_artifacts(store, recipe=target)
        if anything:
            raise ValidationFailed(f"recipe {target!r} has no valid artifact ({len(anything)} built, none valid)",
                                   hint="validate them: kpipe validate ARTIFACT_ID")
        raise NotFoundError(f"no artifact of recipe {target!r} and no artifact with that id",
                            hint=f"build it first: kpipe build {target}")
    return "recipe", [Candidate.of(a) for a in arts]


def _render(workspace: Workspace, c: Candidate) -> BuildSpec:
    """The recipe of artifact `c` rendered for its kernel; a recipe that does not render is an error."""
    from kpipe import recipes
    from kpipe.errors import KpipeError

    try:
        return recipes.render(workspace, c.recipe, c.kernel)
    except KpipeError as e:
        # without it the rollout would run without the recipe's probe and `rollout:` settings
        raise ConfigError(f"recipe {c.recipe!r} of artifact {c.id} does not render for {c.kernel}: {e.message}",
                          hint="fix the recipe (`kpipe recipe lint`), or pass --no-probe to roll out without "
                               "its probe and rollout settings") from e


def probes_for(workspace: Workspace, candidates: Iterable[Candidate], *,
               no_probe: bool = False) -> dict[str, dict[str, Any]]:
    """artifact id -> the recipe's probe rendered for the artifact's kernel (when the recipe has one).

    ConfigError when an artifact's recipe does not render, unless `no_probe` (then no probe at all)."""
    out: dict[str, dict[str, Any]] = {}
    if no_probe:
        return out
    for c in candidates:
        if not c.recipe:
            continue
        p = getattr(_render(workspace, c), "probe", None)
        if p is not None and p.argv:
            out[c.id] = {"argv": list(p.argv), "expect": p.expect, "expect_after_rollback": p.expect_after_rollback}
    return out


def gates_for(workspace: Workspace, candidates: Iterable[Candidate], *, no_probe: bool = False) -> dict[str, Any]:
    """The gate's extra checks as a GateConfig dict: per artifact the recipe's `rollout.health` (else
    kpipe.toml's [rollout.health]), and kpipe.toml's [rollout.prometheus]. `no_probe`: no recipe is read."""
    from kpipe.health import HealthCheck
    from kpipe.prometheus import PromCheck
    from kpipe.rollout.gate import GateConfig

    conf = workspace.settings.rollout
    default = HealthCheck(conf.health.command, conf.health.timeout) if conf.health else None
    health: dict[str, HealthCheck] = {}
    for c in candidates:
        ro = dict(getattr(_render(workspace, c), "rollout", None) or {}) if c.recipe and not no_probe else {}
        h = ro.get("health")
        if h:
            health[c.id] = HealthCheck(tuple(h["command"]), float(h.get("timeout", 10)))
        elif default is not None:
            health[c.id] = default
    p = conf.prometheus
    prom = PromCheck(p.url, p.query, p.threshold, p.host_label, p.fail_when, p.timeout) if p else None
    return GateConfig(health, prom).to_dict()


def recipe_defaults(workspace: Workspace, target: str, *, no_probe: bool = False) -> dict[str, Any]:
    """The recipe's `rollout:` section (waves, max_failures, soak, rollback) for the target, or {}.

    {} when there is no artifact yet (the planner reports that) or the artifact has no recipe; ConfigError
    when the recipe does not render, unless `no_probe` (then the command line's defaults apply)."""
    try:
        _, cands = candidates_for(workspace.store, target)
    except KpipeError:
        return {}  # build_plan reports the missing, invalid or damaged artifact with its own message
    for c in cands:
        if c.recipe:
            try:
                return dict(_render(workspace, c).rollout or {})
            except ConfigError:
                if no_probe:
                    return {}
                raise
    return {}


def make_pool(workspace: Workspace, forks: int | None = None, workers: int | None = None) -> SshPool:
    """An SshPool with the workspace's [ssh] settings and its fan-out worker processes (`workers`, else
    [fleet] workers, else one per core; kpipe.transport.workers)."""
    from kpipe.fleet.observe import pool_for

    return pool_for(workspace, forks, workers)


def select_hosts(workspace: Workspace, limit: str | None) -> list[Host]:
    """The inventory's hosts matching `limit` (all when None); NotFoundError when none match."""
    from kpipe.fleet.inventory import select_hosts as select_from_inventory

    hosts = select_from_inventory(workspace, limit)
    if not hosts:
        raise NotFoundError(f"no host matches {limit!r}" if limit else "the inventory has no hosts",
                            hint="see `kpipe fleet list`")
    return hosts


def gather(workspace: Workspace, hosts: list[Host], pool: SshPool,
           forks: int) -> dict[str, HostFacts | HostError]:
    """name -> HostFacts or the error that prevented gathering them (through the one observer)."""
    from kpipe.fleet.observe import gather_facts

    return gather_facts(workspace, hosts, forks, pool=pool)


def build_plan(workspace: Workspace, target: str, limit: str | None, options: RolloutOptions,
               *, pool: SshPool | None = None, no_probe: bool = False) -> tuple[RolloutPlan, list[Host]]:
    """Select hosts, gather their facts, choose artifacts, render probes -> (plan, hosts).

    The probes are rendered first: a recipe that does not render stops here, before any host is asked."""
    kind, cands = candidates_for(workspace.store, target)  # checks every candidate's bytes
    probes = probes_for(workspace, cands, no_probe=no_probe)
    gates = gates_for(workspace, cands, no_probe=no_probe)
    hosts = select_hosts(workspace, limit)
    own = pool is None
    pool = pool or make_pool(workspace, options.forks)
    try:
        facts = gather(workspace, hosts, pool, options.forks)
    finally:
        if own:
            pool.close()
    views = [host_view(h, facts.get(h.name)) for h in hosts]
    plan = plan_rollout(target, kind, views, cands, options, probes, known=known_artifacts(workspace.store))
    restorable = [c for c in plan.restorable().values() if c.id not in plan.probes]
    if restorable:  # a rollback of an upgrade loads the older version again and probes it with its recipe's probe
        plan = replace(plan, probes={**plan.probes, **stored_probes(workspace, restorable, no_probe=no_probe)})
    used = set(plan.artifacts())
    gates["health"] = {k: v for k, v in gates["health"].items() if k in used}
    return replace(plan, gates=gates), hosts


def stored_probes(workspace: Workspace, candidates: Iterable[Candidate], *,
                  no_probe: bool = False) -> dict[str, dict[str, Any]]:
    """artifact id -> the probe its recipe had when it was built (kept in the artifact's metadata): an older
    version's probe, when the recipe file now describes a newer one; the recipe rendered now otherwise."""
    from kpipe.artifacts import get_artifact

    out: dict[str, dict[str, Any]] = {}
    if no_probe:
        return out
    rest = []
    for c in candidates:
        rendered = (get_artifact(workspace.store, c.id).meta or {}).get("rendered") or {}
        if "probe" in rendered:
            p = rendered["probe"]
            if p and p.get("argv"):
                out[c.id] = {"argv": list(p["argv"]), "expect": p.get("expect", ""),
                             "expect_after_rollback": p.get("expect_after_rollback", "")}
        else:
            rest.append(c)
    return {**out, **probes_for(workspace, rest)}


def known_artifacts(store: Store) -> list[Candidate]:
    """Every stored artifact as a Candidate: the planner tells a loaded patch's stream and version by them."""
    from kpipe.artifacts import list_artifacts

    return [Candidate.of(a) for a in list_artifacts(store)]


def local_path_fn(store: Store) -> Callable[[Assignment], Path]:
    """Where an assignment's module bytes are (the blob store), checked."""
    def path(a: Assignment) -> Path:
        return store.verified_path(a.artifact.sha256)  # NotFoundError if gone, StoreCorrupt if changed
    return path


def plan_and_targets(workspace: Workspace, journal: Journal, rollout_id: str, *, hosts: list[Host] | None = None,
                     check_blobs: bool = False) -> tuple[RolloutPlan, dict[str, Host]]:
    """A journaled rollout's plan and its hosts, whichever executor will run it.

    The hosts are `hosts` when the caller just loaded them, else the current inventory's; a host the
    inventory no longer has is left out, and the engine journals it as unreachable. check_blobs: refuse
    (StoreCorrupt / NotFoundError, before any host is contacted) when a module the plan ships changed
    in the store or is gone."""
    plan = RolloutPlan.from_dict(journal.get(rollout_id).plan)
    if check_blobs:
        for sha in sorted({a.artifact.sha256 for a in plan.assignments.values()}):
            workspace.store.verified_path(sha)
    if hosts is not None:
        return plan, {h.name: h for h in hosts if h.name in plan.assignments}
    from kpipe.fleet.inventory import load_inventory

    inv = load_inventory(workspace)
    targets: dict[str, Host] = {}
    for name in plan.assignments:
        try:
            targets[name] = inv.get(name)
        except NotFoundError:
            pass  # journaled as unreachable by the engine: "not in the inventory any more"
    return plan, targets


def engine_for(workspace: Workspace, journal: Journal, rollout_id: str, *, forks: int | None = None,
               on_event: Callable[..., None] | None = None, pool: SshPool | None = None,
               hosts: list[Host] | None = None, check_blobs: bool = False,
               workers: int | None = None) -> tuple[Engine, PoolRunner]:
    """An Engine over SSH to the rollout's hosts (targets from the current inventory, or `hosts` when
    the caller just loaded them). Passing the planning pool reuses its open connections. check_blobs:
    refuse (before any host is contacted) when a module the plan ships changed in the store. workers: the
    SSH fan-out's worker processes when no pool is passed (else [fleet] workers, else one per core); the
    journal stays this process's either way."""
    from kpipe.rollout.engine import Engine, PoolRunner

    plan, targets = plan_and_targets(workspace, journal, rollout_id, hosts=hosts, check_blobs=check_blobs)
    pool = pool or make_pool(workspace, forks or plan.options.forks, workers)
    runner = PoolRunner(pool, targets, forks)
    return Engine(journal, runner, local_path_fn(workspace.store), on_event=on_event), runner


def check_preflight(plan: RolloutPlan) -> None:
    """Refuse a plan whose artifacts have not passed preflight (PreflightFailed, exit 9)."""
    from kpipe.errors import PreflightFailed

    missing = plan.preflight_missing()
    if missing and not plan.options.skip_preflight:
        ids = sorted({m.reason.split()[1] for m in missing})
        raise PreflightFailed(f"{len(missing)} host{'' if len(missing) == 1 else 's'} excluded because "
                              f"artifact{'' if len(ids) == 1 else 's'} {', '.join(ids)} "
                              f"{'has' if len(ids) == 1 else 'have'} not passed preflight",
                              hint=f"run `kpipe preflight {ids[0]}`, or pass --skip-preflight")
    if not plan.hosts:
        raise ConfigError("the plan has no eligible host", hint="see the excluded hosts and their reasons")
