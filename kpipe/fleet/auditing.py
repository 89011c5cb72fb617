"""The audit's edge: the journal and the desired-state file in, the fleet observed, verdicts out.

`run_audit` is what `kpipe verify` and `kpipe audit` run: it reads the rollout journal and the
desired-state file, asks every selected host through the one observer (kpipe.fleet.observe),
and hands both to the pure kpipe.audit.evaluate. Recording the result (the audit trail) and
rendering it are the CLI's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpipe.audit import (
    AuditResult,
    ObservedHost,
    Verdict,
    evaluate,
    evaluate_host,
    modules_to_read,
    observed_from_facts,
    unreachable,
)
from kpipe.desired import (
    AppliedRecord,
    DesiredState,
    apply_desired_file,
    desired_from_records,
    load_desired_file,
    module_name,
)
from kpipe.errors import KpipeError, NotFoundError
from kpipe.fleet.observe import FanOut, Observation, ObservedHostSpec, observe
from kpipe.taint import taint_mask

if TYPE_CHECKING:  # pragma: no cover
    from kpipe.workspace import Workspace


def journal_records(workspace: Workspace) -> list[AppliedRecord]:
    """Every applied / rolled_back host outcome in the workspace's rollout journal."""
    from kpipe.rollout.engine import applied_records
    from kpipe.rollout.journal import Journal

    return [AppliedRecord(seq=float(r["seq"]), rollout_id=str(r["rollout_id"]), host=str(r["host"]),
                          patch=str(r["patch"]), action=str(r["action"]), artifact_id=str(r.get("artifact_id", "")),
                          sha256=str(r.get("sha256", "")), kernel=str(r.get("kernel", "")),
                          replace=bool(r.get("replace", False)), build_id=str(r.get("build_id", "")),
                          srcversion=str(r.get("srcversion", "")), stream=str(r.get("stream", "")),
                          version=int(r.get("version") or 0), restored=str(r.get("restored", "")))
            for r in applied_records(Journal(workspace.store))]


def observe_for_audit(workspace: Workspace | None, hosts: Sequence[ObservedHostSpec], desired: DesiredState,
                      forks: int | None = None, *, pool: FanOut | None = None) -> dict[str, ObservedHost]:
    """What each host shows (facts, and /sys/module of the modules its audit names), as ObservedHosts."""
    modules = {h.name: modules_to_read(desired, h.name) for h in hosts}
    out: dict[str, ObservedHost] = {}
    for name, o in observe(workspace, hosts, forks, pool=pool, modules=modules).items():
        if isinstance(o, Observation):
            out[name] = observed_from_facts(o.facts, o.livepatch)
        else:
            out[name] = unreachable(name, o.message if isinstance(o, KpipeError) else str(o))
    return out


def desired_state(workspace: Workspace, match: Any, desired_file: str | Path | None = None) -> DesiredState:
    """The journal's desired state, with [audit] allowed_taint and the desired-state file (default [audit] desired)."""
    desired = desired_from_records(journal_records(workspace))
    section = workspace.settings.audit
    if desired_file is None and section.desired:
        desired_file = workspace.path(section.desired)
    if section.allowed_taint is not None:
        desired.allowed_taint = taint_mask(section.allowed_taint)
    if desired_file:
        apply_desired_file(desired, load_desired_file(Path(desired_file)), match, str(desired_file))
    return desired


def run_audit(workspace: Workspace, limit: str | None = None, *, desired_file: str | Path | None = None,
              forks: int | None = None, settle: float = 0.0, pool: FanOut | None = None) -> AuditResult:
    """Audit the hosts `limit` selects: journal (+ desired file) against what each host reports now.

    `desired_file` defaults to `[audit] desired` in kpipe.toml. Hosts still in
    transition are read again after `settle` seconds before they are called stuck.
    """
    from kpipe.cve import cve_report
    from kpipe.fleet.inventory import HostSelector
    from kpipe.fleet.observe import pool_for

    # the selection cache answers the limit and the desired file's patterns: an audit reads (and
    # parses with ansible-core) its inventory only when a file of it changed
    inventory = HostSelector(workspace)
    hosts = inventory.select(limit)

    def match(pattern: str) -> list[str]:
        try:
            return [h.name for h in inventory.select(pattern)]
        except NotFoundError:
            return []

    desired = desired_state(workspace, match, desired_file)
    own = pool is None
    fan: Any = pool if pool is not None else pool_for(workspace, forks)
    try:
        observed = observe_for_audit(workspace, hosts, desired, forks, pool=fan)
        if settle > 0:
            shaky = [h for h in hosts if evaluate_host(desired, observed[h.name]).status == Verdict.TRANSITION]
            if shaky:
                time.sleep(settle)
                observed.update(observe_for_audit(workspace, shaky, desired, forks, pool=fan))
    finally:
        if own:
            fan.close()
    if limit in (None, "", "all"):
        # A host a rollout patched that left the inventory cannot be verified: say so.
        known = {h.name for h in hosts}
        for host in sorted(set(desired.patches) - known):
            observed[host] = ObservedHost(host, reachable=False, error="not in the inventory (a rollout patched it)")
    result = evaluate(desired, observed.values(), built=built_kernels(workspace))
    return replace(result, cves=cve_report(workspace, result, _arches(observed)))


def built_kernels(workspace: Workspace) -> dict[str, set[str]]:
    """Patch module name -> the kernel releases the store holds a usable artifact of it for."""
    from kpipe.artifacts import list_artifacts

    out: dict[str, set[str]] = {}
    for a in list_artifacts(workspace.store):
        if str(a.status) != "rejected":
            out.setdefault(module_name(a.module_name), set()).add(a.kernel)
    return out


def _arches(observed: Mapping[str, ObservedHost]) -> dict[str, str]:
    return {o.host: o.arch for o in observed.values()}
