"""The operator's health command (recipe `rollout: health:` or kpipe.toml [rollout.health]) as a read step.

It runs on each host as the login user, as an argv (never a shell string kpipe builds), under the
host's `timeout` so that a hung command is judged (exit 124) instead of stalling the soak; the
transport's own timeout is the backstop. Exit 0 is healthy; anything else fails the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kpipe.commands import Command, CommandResult
from kpipe.plan import Step

TIMED_OUT = 124  # coreutils' and busybox's `timeout` exit status when it killed the command
_GRACE_S = 15.0  # the transport's backstop beyond the health timeout


@dataclass(frozen=True)
class HealthCheck:
    """An argv run on every patched host at each gate tick; `timeout` in seconds."""

    argv: tuple[str, ...]
    timeout: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return {"command": list(self.argv), "timeout": self.timeout}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HealthCheck:
        return cls(tuple(str(a) for a in d["command"]), float(d.get("timeout", 10.0)))


@dataclass(frozen=True)
class HealthResult:
    """ok, or the problem (exit status / timeout and the output's last line)."""

    ok: bool
    problem: str = ""
    output: str = ""


def health_command(check: HealthCheck) -> Command:
    """`timeout SECS argv...`: the operator's argv as given, bounded on the host."""
    return Command(argv=("timeout", f"{check.timeout:g}", *check.argv), label="health",
                   timeout=check.timeout + _GRACE_S)


def judge_health(check: HealthCheck, r: CommandResult) -> HealthResult:
    """Exit status and timeout of one run (pure)."""
    shown = " ".join(check.argv)
    out = (r.stdout + r.stderr).strip()
    last = out.splitlines()[-1][:200] if out else ""
    if r.exit_status == 0:
        return HealthResult(True, "", out[-500:])
    if r.exit_status == TIMED_OUT:
        return HealthResult(False, f"health command {shown!r} timed out after {check.timeout:g} s", out[-500:])
    tail = f": {last}" if last else ""
    return HealthResult(False, f"health command {shown!r} exited {r.exit_status}{tail}", out[-500:])


def health_step(check: HealthCheck) -> Step[HealthResult]:
    """The health command as a read step; its value says healthy or why not (it never raises)."""
    return Step("health", health_command(check), lambda r: judge_health(check, r), writes=False, journal=False)
