"""The one observer: read-only plan steps on many hosts at once, an observation or an error per host.

Every command that reads the fleet goes through here: `kpipe fleet facts`, `kpipe verify`,
`kpipe audit` and the rollout planner's fact gathering. What a host is asked is a list of
`kpipe.plan.Step`s (a constant command and its pure parser) computed before any host is
contacted; this module only runs them, at most `forks` hosts at once, and collects per host
the typed values or the error that stopped that host. One host's failure never stops or hides
the others (partial failure is data). Steps that write are refused: the observer only reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kpipe.commands import Command, CommandResult
from kpipe.errors import KpipeError, TransportError
from kpipe.fleet import livepatch as lp
from kpipe.fleet.facts import _LP_BEGIN as LP_BEGIN
from kpipe.fleet.facts import _LP_END as LP_END
from kpipe.fleet.facts import FACTS_SCRIPT, HostFacts, facts_step, interpret_facts
from kpipe.plan import FanOut, Step, StepFailed, StepTransport, run_steps

if TYPE_CHECKING:  # pragma: no cover
    from kpipe.transport.ssh import SshPool
    from kpipe.workspace import Workspace

# What stops one host: it could not be reached (TransportError, FactsError) or a step's
# interpreter refused its output (StepFailed).
HostError = TransportError | StepFailed


class NamedTarget(Protocol):
    """A host as a pool takes it (kpipe.host.Host): the results are keyed by its name."""

    @property
    def name(self) -> str: ...


# What the observer needs of a host: its name; the pool connects with the record itself.
ObservedHostSpec = NamedTarget

__all__ = ["FanOut", "HostError", "Observation", "ObservedHostSpec", "gather_facts", "observe", "pool_for",
           "run_reads", "run_reads_on"]


@dataclass(frozen=True)
class Observation:
    """What one host showed: its facts, and when asked, /sys/module of named modules and its kernel log."""

    host: str
    facts: HostFacts
    livepatch: lp.HostLivepatch | None = None  # STATE_SCRIPT with the modules asked about
    dmesg: str | None = None  # `dmesg` output, when asked


# -- steps -----------------------------------------------------------------------------------------------------------

def _interpret_dmesg(r: CommandResult) -> str:
    if not r.ok:
        raise StepFailed("dmesg", f"reading the kernel log failed: {r.summary()}")
    return r.stdout


def dmesg_step() -> Step[str]:
    """Read the kernel log (`dmesg`, as root): a read step."""
    return Step("dmesg", lp.DMESG, _interpret_dmesg, writes=False, journal=False)


def _valid_module(name: str) -> bool:
    try:
        lp.sysfs_name(name)
    except KpipeError:
        return False
    return True


# The facts script with its livepatch section also reporting /sys/module of the modules named as
# "$@" (sysfs names: letters, digits, '_', so splitting $mods is exact): facts and the modules'
# state in ONE round trip, which is what makes an audit cost what `fleet facts` costs.
_LP_SECTION = 'echo "---livepatch---"\nset --\n'
_FACTS_WITH_MODULES = 'mods="$*"\n' + FACTS_SCRIPT.replace(_LP_SECTION,
                                                            'echo "---livepatch---"\nset -f; set -- $mods; set +f\n')


def _interpret_facts_and_state(r: CommandResult) -> tuple[HostFacts, lp.HostLivepatch]:
    facts = interpret_facts(r)  # FactsError when the output is not a whole facts report
    lines = r.stdout.splitlines()
    start = lines.index(LP_BEGIN)  # interpret_facts checked both markers
    state = lp.parse_host_livepatch("\n".join(lines[start + 1:lines.index(LP_END, start)]))
    return facts, state


def facts_and_state_step(*module_names: str, timeout: float = 60.0) -> Step[tuple[HostFacts, lp.HostLivepatch]]:
    """Facts plus /sys/module of the named modules in one command (as root: module notes are root's)."""
    if _LP_SECTION not in FACTS_SCRIPT:  # a changed facts script must change this too, not ask twice silently
        raise AssertionError("kpipe.fleet.facts.FACTS_SCRIPT no longer has its livepatch section marker")
    cmd = Command.script(_FACTS_WITH_MODULES, *(lp.sysfs_name(m) for m in module_names), label="facts",
                         timeout=timeout, sudo=True)
    return Step("facts", cmd, _interpret_facts_and_state, writes=False, journal=False)


def observation_steps(modules: Iterable[str] = (), *, dmesg: bool = False,
                      timeout: float = 60.0) -> list[Step[Any]]:
    """The steps of one host's observation: facts (with the named modules' state, in the same command),
    then (when asked) dmesg.

    Names that are not module names are dropped: they come from journals and desired-state files,
    and the observer never formats such text into a command."""
    names = sorted({n for n in modules if _valid_module(n)})
    steps: list[Step[Any]] = [facts_and_state_step(*names, timeout=timeout) if names else facts_step(timeout)]
    if dmesg:
        steps.append(dmesg_step())
    return steps


# -- the fan-out -----------------------------------------------------------------------------------------------------

def _host_error(name: str, value: object) -> HostError:
    """Any failure of one host as a HostError naming it (an unexpected exception stays that host's failure)."""
    if isinstance(value, (TransportError, StepFailed)):
        return value
    if isinstance(value, KpipeError):
        return TransportError(f"{name}: {value.message}", host=name, kind="error", hint=value.hint)
    if value is None:
        return TransportError(f"{name}: no result", host=name, kind="error")
    return TransportError(f"{name}: {type(value).__name__}: {value}", host=name, kind="error")


def run_reads(pool: FanOut, hosts: Sequence[ObservedHostSpec], steps_for: Callable[[str], Sequence[Step[Any]]],
              forks: int | None = None) -> dict[str, list[Any] | HostError]:
    """Run each host's read steps (at most `forks` hosts at once): name -> the steps' values, or its HostError.

    ValueError, before any host is contacted, when a step writes. Results are in `hosts` order."""
    return run_reads_on(pool, hosts, steps_for, forks)


def run_reads_on(pool: FanOut, targets: Sequence[NamedTarget], steps_for: Callable[[str], Sequence[Step[Any]]],
                 forks: int | None = None) -> dict[str, list[Any] | HostError]:
    """run_reads over SSH targets the caller already holds (the rollout engine's PoolRunner keeps them by name)."""
    plans = {t.name: list(steps_for(t.name)) for t in targets}
    for name, steps in plans.items():
        for s in steps:
            if s.writes:
                raise ValueError(f"{name}: step {s.name!r} writes; the observer only reads")

    def one(t: StepTransport) -> list[Any]:
        return run_steps(t, plans[t.name])

    raw = pool.run_many(list(targets), one, forks)
    out: dict[str, list[Any] | HostError] = {}
    for name in plans:
        value = raw.get(name)
        out[name] = value if isinstance(value, list) else _host_error(name, value)
    return out


def workers_setting(workspace: Workspace | None, workers: int | None = None) -> int:
    """Worker processes for a fan-out: `workers` (--workers), else [fleet] workers, else one per core."""
    from kpipe.transport.workers import default_workers

    if workers:
        return workers
    configured = workspace.settings.fleet.workers if workspace is not None else 0
    return configured or default_workers()


def pool_for(workspace: Workspace, forks: int | None = None, workers: int | None = None) -> SshPool:
    """An SshPool with the workspace's [ssh] settings (strict known_hosts) and its fan-out worker processes
    (`workers`, else [fleet] workers, else one per core; small fan-outs stay in-process)."""
    from kpipe.transport.ssh import SshPool

    return SshPool(workspace.ssh, known_hosts=[Path(os.path.expanduser(workspace.ssh.known_hosts))],
                   forks=forks or workspace.ssh.forks, workers=workers_setting(workspace, workers))


def observe(workspace: Workspace | None, hosts: Sequence[ObservedHostSpec], forks: int | None = None, *,
            pool: FanOut | None = None, modules: Mapping[str, Iterable[str]] | None = None, dmesg: bool = False,
            timeout: float = 60.0) -> dict[str, Observation | HostError]:
    """Observe every host: name -> Observation, or the HostError that stopped it (in `hosts` order).

    `modules` names, per host, the modules whose /sys/module state to read as well (a disabled
    patch's sysfs folder is gone while its module may still be loaded). Without `pool` one is
    opened from the workspace's [ssh] settings and closed afterwards."""
    wanted = {h.name: list((modules or {}).get(h.name, ())) for h in hosts}

    def steps_for(name: str) -> list[Step[Any]]:
        return observation_steps(wanted[name], dmesg=dmesg, timeout=timeout)

    opened = None
    if pool is None:
        if workspace is None:
            raise ValueError("observe() needs a workspace or a pool")
        pool = opened = pool_for(workspace, forks)
    try:
        raw = run_reads(pool, hosts, steps_for, forks)
    finally:
        if opened is not None:
            opened.close()
    out: dict[str, Observation | HostError] = {}
    for name, values in raw.items():
        if not isinstance(values, list):
            out[name] = values
            continue
        first, state = values[0] if isinstance(values[0], tuple) else (values[0], None)
        log = next((v for v in values[1:] if isinstance(v, str)), None)
        out[name] = Observation(name, first, state, log)
    return out


def gather_facts(workspace: Workspace | None, hosts: Sequence[ObservedHostSpec], forks: int | None = None, *,
                 pool: FanOut | None = None, timeout: float = 60.0) -> dict[str, HostFacts | HostError]:
    """Facts for every host (at most `forks` at once): HostFacts, or the error that stopped it."""
    return {name: o.facts if isinstance(o, Observation) else o
            for name, o in observe(workspace, hosts, forks, pool=pool, timeout=timeout).items()}
