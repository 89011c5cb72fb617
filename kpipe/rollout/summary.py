"""A rollout's outcome read from its journal alone: RunSummary and summarize.

Split from the engine so that `kpipe rollout status` reads the journal without importing the engine,
the planner or any transport (tests/test_startup_budget.py); the engine returns the same RunSummary.
The stored plan is read as the dict RolloutPlan.to_dict wrote: its `waves` and `excluded` lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kpipe.rollout.journal import Journal, host_state


@dataclass
class RunSummary:
    """What a start/resume/rollback ended with."""

    rollout_id: str
    state: str
    hosts: dict[str, str]  # host -> final state
    reasons: dict[str, str] = field(default_factory=dict)
    halt_reason: str = ""

    @property
    def halted(self) -> bool:
        return bool(self.halt_reason)

    def to_dict(self) -> dict[str, Any]:
        return {"rollout_id": self.rollout_id, "state": self.state, "hosts": self.hosts, "reasons": self.reasons,
                "halt_reason": self.halt_reason}


def summarize(journal: Journal, rid: str) -> RunSummary:
    """Every plan host's final state from the journal: applied, rolled_back, failed, unreachable, excluded,
    pending (never touched), skipped (aborted before it started), interrupted (kpipe died in the host's
    pipeline or rollback; the reason names the rollback step) or rolling_back (a live kpipe is at it)."""
    rec = journal.get(rid)
    # RolloutPlan.hosts and .excluded, read off the stored dict: the planner stays unimported
    plan_hosts = [str(h) for wave in rec.plan.get("waves", []) for h in wave]
    excluded = [(str(e["host"]), str(e.get("reason", ""))) for e in rec.plan.get("excluded", [])]
    hosts: dict[str, str] = {}
    reasons: dict[str, str] = {}
    by_host = dict(journal.iter_hosts(rid))
    alive = journal.live_owner(rid) is not None
    for h in plan_hosts:
        entries = by_host.get(h, [])
        st = host_state(h, entries)
        # no outcome yet: "pending" if never touched, "interrupted" if kpipe died in its pipeline
        hosts[h] = st.outcome or ("interrupted" if entries else "pending")
        # keep the first failure's reason even after a rollback outcome followed it
        why = [str(e.detail["reason"]) for e in entries if e.step == "outcome" and e.detail.get("reason")]
        if why:
            reasons[h] = why[-1] if st.outcome != "rolled_back" else why[0]
        step = _open_rollback(entries)
        if step:
            # rollback steps after the last outcome: the host may already be un-patched, never say applied
            hosts[h] = "rolling_back" if alive else "interrupted"
            reasons[h] = f"rollback {'at' if alive else 'interrupted at'} {step}"
    for host, reason in excluded:
        hosts[host] = "excluded"
        reasons[host] = reason
    halt = rec.detail.get("halt_reason", "") if rec.state in ("halted", "rolled_back") else ""
    return RunSummary(rid, rec.state, hosts, reasons, halt)


def _open_rollback(entries: list[Any]) -> str:
    """The rollback step a host is in (e.g. "rb-unload (started, not finished)") when rollback steps follow
    its last outcome; "" when none do."""
    last = max((i for i, e in enumerate(entries) if e.step == "outcome"), default=-1)
    rb = [e for e in entries[last + 1:] if e.step.startswith("rb-")]
    if not rb:
        return ""
    open_steps = [e.step for e in rb if e.phase == "intended"
                  and not any(x.step == e.step and x.seq > e.seq and x.phase != "intended" for x in rb)]
    if open_steps:
        return f"{open_steps[-1]} (started, not finished)"
    return f"{rb[-1].step} ({rb[-1].phase}; the next step did not start)"
