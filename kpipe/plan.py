"""Host operations as plans: steps of (action, pure interpreter).

A host operation (facts, stage, load, wait, verify, disable, unload, unstage,
persist) is a list of `Step`s computed from data the caller already holds (the
assignment, the facts read before). Each step carries one action, a `Command`
or an `Upload`, and a pure function that turns the action's `CommandResult`
into a typed value or raises `StepFailed`. Nothing here touches a host.

Executors run the same steps: `run_steps` over a `Transport` (Fabric/paramiko
or local), the Ansible executor as generated tasks. Dry-run prints the steps'
argv (`describe`) and invents no output. Tests feed outputs to interpreters.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from kpipe.commands import Command, CommandResult
from kpipe.errors import KpipeError

T = TypeVar("T")

# (step name, phase "intended" | "done" | "failed", detail): the journal's write-ahead hook
Recorder = Callable[[str, str, dict[str, Any]], None]


class StepFailed(KpipeError):
    """A host step ran and failed (the host answered)."""

    def __init__(self, step: str, reason: str, detail: dict[str, Any] | None = None):
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason
        self.detail = detail or {}


@dataclass(frozen=True)
class Upload:
    """Copy a local file to a path on the host (the interpreter sees an empty, successful result)."""

    local: Path
    remote: str
    label: str = "upload"

    def display(self) -> str:
        return f"upload {self.local} -> {self.remote}"


Action = Command | Upload


@dataclass(frozen=True)
class Step(Generic[T]):
    """One journaled host step: an action, and the pure function that reads its result."""

    name: str  # the journal's step name: "stage", "load", "wait", ...
    action: Action
    interpret: Callable[[CommandResult], T]
    intended: Mapping[str, Any] = field(default_factory=dict)  # journaled before the action runs
    done: Callable[[T], dict[str, Any]] | None = None  # journaled after: what the value means
    writes: bool = True  # False: a read; dry-run may run it, a write it only prints
    journal: bool = True  # False: part of a journaled step, not a step of its own (e.g. an upload's check)

    def argv(self) -> tuple[str, ...]:
        """The exact argv this step runs on the host (an upload shows as `upload SRC DEST`)."""
        if isinstance(self.action, Upload):
            return ("upload", str(self.action.local), self.action.remote)
        return self.action.argv

    def display(self) -> str:
        return self.action.display()


@runtime_checkable
class StepTransport(Protocol):
    """What the core needs from a transport to run steps: the minimal protocol. The edges'
    kpipe.transport.base.Transport extends it; the core imports this one, never kpipe.transport."""

    name: str

    def run(self, cmd: Command) -> CommandResult:
        """Run one command; return its exit status and output (a non-zero exit is a result)."""
        ...

    def put(self, local: Path, remote: str) -> None:
        """Copy a local file to a remote path."""
        ...


@runtime_checkable
class FanOut(Protocol):
    """The one fan-out abstraction: fn(transport) on many targets (each with a `name`), at most `forks` at
    once; a result or the exception per target name (partial failure is data). kpipe.transport.base.Pool
    extends it with transport() and close(); SshPool runs it in threads or in worker processes."""

    def run_many(self, targets: Iterable[Any], fn: Callable[[Any], Any],
                 forks: int | None = None) -> Mapping[str, Any]:
        """fn(transport) for every target; each result or exception, by the target's name."""
        ...


def execute(t: StepTransport, step: Step[T]) -> T:
    """Run one step's action on `t` and interpret its result (no journaling)."""
    if isinstance(step.action, Upload):
        t.put(step.action.local, step.action.remote)
        result = CommandResult(t.name, Command.of("true", label=step.action.label), 0)
    else:
        result = t.run(step.action)
    return step.interpret(result)


def run_step(t: StepTransport, step: Step[T], rec: Recorder | None = None) -> T:
    """Write-ahead: journal `intended`, run, journal `done` or `failed`; re-raise failures."""
    if rec is None or not step.journal:
        return execute(t, step)
    rec(step.name, "intended", dict(step.intended))
    try:
        value = execute(t, step)
    except StepFailed as e:
        rec(step.name, "failed", {"error": e.reason, **e.detail})
        raise
    except BaseException as e:
        rec(step.name, "failed", {"error": str(e) or type(e).__name__, "type": type(e).__name__})
        raise
    rec(step.name, "done", step.done(value) if step.done else {})
    return value


def groups(steps: Sequence[Step[Any]]) -> list[list[Step[Any]]]:
    """The journal steps of a plan: consecutive journaled steps sharing a name are one journal step
    (e.g. a stage's check, upload and commit); an unjournaled step is a group of its own."""
    out: list[list[Step[Any]]] = []
    for s in steps:
        if out and s.journal and out[-1][0].journal and out[-1][0].name == s.name:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def run_steps(t: StepTransport, steps: Sequence[Step[Any]], rec: Recorder | None = None) -> list[Any]:
    """Run steps in order, stopping at the first failure (which is re-raised); return the values.

    Write-ahead per journal step (see `groups`): the first step's `intended` is recorded before the
    group's first action, `done` (from the last step's value) after its last, `failed` on any failure."""
    values: list[Any] = []
    for group in groups(steps):
        if rec is None or not group[0].journal:
            values.extend(execute(t, s) for s in group)
            continue
        if len(group) == 1:
            values.append(run_step(t, group[0], rec))
            continue
        name = group[0].name
        rec(name, "intended", dict(group[0].intended))
        try:
            for s in group:
                values.append(execute(t, s))
        except StepFailed as e:
            rec(name, "failed", {"error": e.reason, **e.detail})
            raise
        except BaseException as e:
            rec(name, "failed", {"error": str(e) or type(e).__name__, "type": type(e).__name__})
            raise
        last = group[-1]
        rec(name, "done", last.done(values[-1]) if last.done else {})
    return values


def argv_lists(steps: Sequence[Step[Any]]) -> list[list[str]]:
    """Every step's exact argv (an upload as `upload SRC DEST`), for dry-run's JSON."""
    return [list(s.argv()) for s in steps]


def describe(steps: Sequence[Step[Any]], scripts: dict[str, str] | None = None) -> list[str]:
    """One printable line per step: `name: argv` (secrets shown as ***), for dry-run.

    With `scripts`, a multi-line `sh -c` script shows as `[script NAME]` and its exact text is
    put in `scripts` (NAME -> text; one name per distinct text), so that a reader sees each once."""
    if scripts is None:
        return [f"{s.name}: {s.display()}" for s in steps]
    names = {text: name for name, text in scripts.items()}
    out = []
    for s in steps:
        a = s.action
        if isinstance(a, Command) and not a.secret and a.argv[:2] == ("sh", "-c") and len(a.argv) > 2 \
                and "\n" in a.argv[2]:
            text = a.argv[2]
            if text not in names:
                base = a.label or s.name
                name, n = base, 2
                while name in scripts:
                    name, n = f"{base}-{n}", n + 1
                names[text] = name
                scripts[name] = text
            sudo = "sudo -n -- " if a.sudo else ""
            out.append(f"{s.name}: {sudo}sh -c [script {names[text]}] {shlex.join(a.argv[3:])}")
        else:
            out.append(f"{s.name}: {s.display()}")
    return out
