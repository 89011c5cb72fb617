"""The gate between waves (pure): failures against the budget, plus the soak schedule.

After a wave applied, the engine re-verifies its hosts (and the earlier waves')
every `verify_interval_s` seconds through `soak_s`; any host that fails a step
or regresses during the soak counts as a failure. The budget counts failures
over every host attempted so far in the rollout, so a percentage budget means
"of the hosts touched", not "of this wave".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kpipe.rollout.planner import FailureBudget


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

    def record(self, results: Mapping[str, tuple[bool, str]]) -> list[str]:
        """Record one round (host -> (ok, problem)); return hosts that newly regressed."""
        self.rounds += 1
        new = []
        for host, (ok, problem) in results.items():
            if not ok and host not in self.regressions:
                self.regressions[host] = f"regressed during soak (round {self.rounds}): {problem}"
                new.append(host)
        return new
