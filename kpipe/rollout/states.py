"""The rollout's states as StrEnums: what the journal stores and the CLI prints.

The values are stored in the state store (rollouts.state, journal.phase, outcome entries) and in
--json output: they must never change (tests/test_seams.py pins them). A StrEnum member equals
its string, so code and stores holding the plain strings keep working.
"""

from __future__ import annotations

import enum


class RolloutState(enum.StrEnum):
    """A rollout row's state."""

    PLANNED = "planned"
    RUNNING = "running"
    INTERRUPTED = "interrupted"  # the driving kpipe was stopped (Ctrl-C); resume continues it
    HALTED = "halted"  # the gate stopped it (failure budget, probe); rollback may follow
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class Phase(enum.StrEnum):
    """A journal entry's phase: write-ahead `intended`, then `done` or `failed`."""

    INTENDED = "intended"
    DONE = "done"
    FAILED = "failed"


class HostState(enum.StrEnum):
    """One host's state in a rollout (the journal's `outcome` entries, status and summaries)."""

    APPLIED = "applied"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    EXCLUDED = "excluded"  # the planner left it out (reason in the plan)
    UNREACHABLE = "unreachable"
    PENDING = "pending"  # never touched yet
    SKIPPED = "skipped"  # aborted before this host started
    INTERRUPTED = "interrupted"  # kpipe died inside its pipeline; resume re-reads the host
    ROLLING_BACK = "rolling_back"


# The outcomes a host ends a rollout with (the journal records one of them as its `outcome`).
FINAL_HOST_STATES = (HostState.APPLIED, HostState.ROLLED_BACK, HostState.FAILED, HostState.EXCLUDED,
                     HostState.UNREACHABLE, HostState.PENDING)
