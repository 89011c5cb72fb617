"""The gate between waves (pure): failures against the budget, the soak schedule, and what a tick judges.

After a wave applied, the engine re-verifies its hosts (and the earlier waves')
every `verify_interval_s` seconds through `soak_s` (once right after the wave when
there is no soak); any host that fails a step or regresses counts as a failure.
Each tick judges, per host: the patch's state (sysfs, /sys/module, taint K, the
probe), kernel trouble logged since kpipe's load marker (kpipe.kernlog), taint bits
new since the read before the load (beyond O/E/K), the operator's health command,
and the optional Prometheus query. The budget counts failures over every host
attempted so far in the rollout, so a percentage budget means "of the hosts
touched", not "of this wave".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kpipe.fleet import livepatch as lp
from kpipe.health import HealthCheck
from kpipe.kernlog import KernelFinding, find_trouble
from kpipe.prometheus import PromCheck
from kpipe.rollout.planner import FailureBudget
from kpipe.taint import DEFAULT_ALLOWED_TAINT, taint_letters


@dataclass(frozen=True)
class Decision:
    """proceed, or halt with a reason; `failed` names every failed host so far."""

    proceed: bool
    reason: str = ""
    failed: tuple[str, ...] = ()
    allowed: int = 0
    attempted: int = 0

    @property
    def verdict(self) -> str:
        return "proceed" if self.proceed else "halt"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reason": self.reason, "failed": list(self.failed),
                "allowed": self.allowed, "attempted": self.attempted}


def decide(budget: FailureBudget, attempted: int, failures: Mapping[str, str],
           *, aborted: bool = False) -> Decision:
    """Weigh `failures` (host -> reason, cumulative) against the budget after `attempted` hosts."""
    allowed = budget.allowed(attempted)
    failed = tuple(sorted(failures))
    if aborted:
        return Decision(False, "aborted by the operator", failed, allowed, attempted)
    if len(failed) > allowed:
        first = failed[0]
        reason = (f"{len(failed)} of {attempted} host{'' if attempted == 1 else 's'} failed "
                  f"(budget {budget}: {allowed} allowed); "
                  f"first: {first}: {failures[first]}")
        return Decision(False, reason, failed, allowed, attempted)
    return Decision(True, "", failed, allowed, attempted)


def gate_schedule(soak_s: float, interval_s: float) -> list[float]:
    """The soak's offsets; without a soak one tick right after the wave (the kernel, taint and health
    checks run at least once per wave)."""
    return soak_schedule(soak_s, interval_s) or [0.0]


def soak_schedule(soak_s: float, interval_s: float) -> list[float]:
    """Offsets in seconds (from the end of a wave) at which to re-verify; the last is soak_s.
    No soak -> no round (each host was verified as its last step moments ago)."""
    if soak_s <= 0:
        return []
    n = max(1, math.ceil(soak_s / interval_s - 1e-9))
    return [min(soak_s, interval_s * (i + 1)) for i in range(n)]


@dataclass
class SoakWatch:
    """Accumulates verification rounds during a soak: the first failure of a host is kept."""

    regressions: dict[str, str] = field(default_factory=dict)
    rounds: int = 0
    soak: bool = True  # False: the one tick right after a wave without a soak

    def record(self, results: Mapping[str, tuple[bool, str]]) -> list[str]:
        """Record one round (host -> (ok, problem)); return hosts that newly regressed."""
        self.rounds += 1
        new = []
        for host, (ok, problem) in results.items():
            if not ok and host not in self.regressions:
                self.regressions[host] = (f"regressed during soak (round {self.rounds}): {problem}" if self.soak
                                          else f"failed the gate after its wave: {problem}")
                new.append(host)
        return new


@dataclass(frozen=True)
class GateConfig:
    """What a tick checks besides the patch: the health command per artifact id, and Prometheus."""

    health: dict[str, HealthCheck] = field(default_factory=dict)
    prometheus: PromCheck | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"health": {k: v.to_dict() for k, v in self.health.items()},
                "prometheus": self.prometheus.to_dict() if self.prometheus else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> GateConfig:
        d = d or {}
        prom = d.get("prometheus")
        return cls({k: HealthCheck.from_dict(v) for k, v in (d.get("health") or {}).items()},
                   PromCheck.from_dict(prom) if prom else None)


@dataclass(frozen=True)
class HostJudgement:
    """One host at one tick: ok, or every problem (the patch's, the kernel's, taint)."""

    problems: tuple[str, ...] = ()
    findings: tuple[KernelFinding, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def new_taint(before: int | None, now: int | None, allowed: int = DEFAULT_ALLOWED_TAINT) -> int:
    """Taint bits set since `before` (the read before the load), beyond `allowed` (O, E, K); 0 when unknown."""
    if before is None or now is None:
        return 0
    return now & ~before & ~allowed


def judge_host(module: str, state: lp.HostLivepatch, log: str, *, marker: str = "", taint_before: int | None = None,
               expect: lp.ModuleIdentity | None = None) -> HostJudgement:
    """A patched host at a gate tick (pure): the patch as the soak re-verifies it, kernel trouble
    logged after `marker` (the load's), and taint bits new since `taint_before`.

    A marker the log no longer holds (ring buffer wrapped) leaves the log unjudged: lines before it
    are not this patch's. No `taint_before` (a journal from an older kpipe): the taint is unjudged."""
    name = lp.sysfs_name(module)
    problems = list(lp.evaluate_loaded(name, state, [], "", expect))
    findings: list[KernelFinding] = []
    after = lp.lines_after_marker(log, marker) if marker else None
    if after is not None:
        patch = state.patches.get(name)
        findings = find_trouble(after, patch.functions if patch else (), name)
        problems += [f.describe() for f in findings]
    added = new_taint(taint_before, state.tainted)
    if added:
        problems.append(f"new kernel taint {taint_letters(added)} since the load "
                        f"(tainted {taint_letters(taint_before or 0) or '-'} -> {taint_letters(state.tainted or 0)})")
    return HostJudgement(tuple(problems), tuple(findings))
