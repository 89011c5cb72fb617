"""The rollout engine: execute a plan wave by wave, journal every host step, gate, roll back, resume.

Per host: one preflight read (release, arch, free space, livepatch state,
conflicting patches, checksum of what is already installed), then the host's
plan built from those facts by pure functions (apply_plan; rollback_plan from a
state read): stage, marker, load, wait for the transition, verify (+ the
recipe's probe), for an upgrade retire the stream's older version (its patch disabled and its
sysfs folder gone, its module unloaded), optionally persist; each a kpipe.plan.Step of the builders in
kpipe.fleet.livepatch, run by kpipe.plan.run_steps. Each journal step is
recorded `intended` before it runs and `done`/`failed` after it
(kpipe.rollout.journal), and every step is idempotent (a fresh plan is built
from a fresh read), so a rollout killed at any instant is resumed by re-running
the unfinished host pipelines: nothing is loaded twice, nothing is forgotten.
Dry-run runs the preflight read and prints the plan (`Engine.dry_run`). One
host's exception never stops its wave: the fan-out returns a result or an
exception per host, and the gate decides what the wave's results mean.
"""

from __future__ import annotations

import fnmatch
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from kpipe.commands import Command, CommandResult
from kpipe.errors import CommandTimeout, ConfigError, KpipeError, TransportError
from kpipe.fleet import livepatch as lp
from kpipe.fleet.observe import run_reads_on
from kpipe.health import HealthResult, health_step
from kpipe.kernel import normalize_arch
from kpipe.plan import Recorder, Step, StepFailed, StepTransport, run_step, run_steps
from kpipe.prometheus import PrometheusError
from kpipe.prometheus import judge as judge_prometheus
from kpipe.prometheus import query as query_prometheus
from kpipe.rollout.gate import GateConfig, SoakWatch, decide, gate_schedule, judge_host
from kpipe.rollout.journal import Journal, host_state
from kpipe.rollout.planner import Assignment, RolloutPlan
from kpipe.rollout.summary import RunSummary, summarize

if TYPE_CHECKING:  # pragma: no cover
    from kpipe.builder.spec import Probe
    from kpipe.host import Host
    from kpipe.transport.base import Pool

T = TypeVar("T")

HOST_STATES = ("applied", "rolled_back", "failed", "excluded", "unreachable", "pending", "skipped", "interrupted",
               "rolling_back")
_FREE_MARGIN = 1 << 20  # bytes kept free on top of twice the module's size (temp copy + final file)


# -- plumbing ------------------------------------------------------------------
class Runner(Protocol):
    """Runs fn(transport) for many hosts with bounded parallelism; a result or an exception per host."""

    def run_many(self, hosts: list[str], fn: Callable[[Any], T], forks: int) -> dict[str, T | BaseException]: ...


class PoolRunner:
    """A Runner over kpipe.transport.ssh.SshPool and the hosts' Host records."""

    def __init__(self, pool: Pool, targets: Mapping[str, Host], forks: int | None = None):
        self.pool = pool
        self.targets = dict(targets)
        self.forks = forks  # the operator's --forks wins over the plan's

    def run_many(self, hosts: list[str], fn: Callable[[Any], T], forks: int) -> dict[str, T | BaseException]:
        forks = self.forks or forks
        missing = [h for h in hosts if h not in self.targets]
        out: dict[str, T | BaseException] = {
            h: TransportError(f"{h}: not in the inventory any more", host=h, kind="error") for h in missing}
        present = [self.targets[h] for h in hosts if h in self.targets]
        if present:
            out.update(self.pool.run_many(present, fn, forks=forks))
        return out

    def close(self) -> None:
        self.pool.close()


@dataclass(frozen=True)
class _HostName:
    """A host as the observer takes it (by name): the Runner holds the connection records."""

    name: str


class _RunnerFanOut:
    """The engine's Runner (keyed by host name) as the observer's fan-out."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def run_many(self, targets: Iterable[_HostName], fn: Callable[[Any], Any],
                 forks: int | None = None) -> Mapping[str, Any]:
        return self.runner.run_many([t.name for t in targets], fn, forks or 1)


@dataclass(frozen=True)
class Event:
    """A progress event: rollout, wave, host step, gate, rollback."""

    # rollout-start | wave-start | step | host | soak-start | soak | gate | wave-end | rollback-start |
    # rollout-end | resume. A `step` carries phase intended (the step starts), done or failed; a `soak` is one
    # verification tick with data round, checked, ok, regressions, remaining_s, soak_s. Kinds and data keys
    # are only ever added: a printer ignores what it does not know.
    kind: str
    rollout_id: str
    host: str = ""
    wave: int = 0
    step: str = ""
    phase: str = ""
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class HostResult:
    host: str
    state: str  # applied | failed | unreachable | skipped | rolled_back
    reason: str = ""
    step: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def classify(e: BaseException) -> tuple[str, str]:
    """A host step's exception -> (host state, reason)."""
    if isinstance(e, CommandTimeout):
        return "failed", str(e)
    if isinstance(e, TransportError):
        return "unreachable", str(e)
    if isinstance(e, StepFailed):
        return "failed", str(e)
    if isinstance(e, KpipeError):
        return "failed", str(e)
    return "failed", f"{type(e).__name__}: {e}"


def probe_of(plan: RolloutPlan, a: Assignment) -> Probe | None:
    """The recipe's probe for this host's artifact, as a kpipe.builder.spec.Probe (or None)."""
    return _probe_by_id(plan, a.artifact)


def _probe_by_id(plan: RolloutPlan, c: Any) -> Probe | None:
    if c is None:
        return None
    d = plan.probes.get(c.id)
    if not d or not d.get("argv"):
        return None
    from kpipe.builder.spec import Probe

    return Probe(argv=tuple(d["argv"]), expect=d.get("expect", ""),
                 expect_after_rollback=d.get("expect_after_rollback", ""))


# -- host steps (shared by the engine and --dry-run) --------------------------------
# "$1" staged path. Prints `key value` lines; a missing tool just leaves its line out.
PREFLIGHT_SCRIPT = r"""
echo "release $(uname -r)"
echo "arch $(uname -m)"
d=${1%/*}
while [ ! -d "$d" ]; do d=${d%/*}; [ -n "$d" ] || d=/; done
df -Pk "$d" 2>/dev/null | awk 'NR==2 {print "free_kb " $4}'
if [ -f "$1" ]; then echo "staged $(sha256sum "$1" | cut -d ' ' -f 1)"; else echo "staged absent"; fi
if command -v kpatch >/dev/null 2>&1; then echo "kpatch_cli 1"; else echo "kpatch_cli 0"; fi
if [ -e /sys/fs/selinux/enforce ]; then echo "selinux $(cat /sys/fs/selinux/enforce)"; else echo "selinux off"; fi
"""


def preflight_command(staged_path: str, module: str, *also: str) -> Command:
    """The facts the host pipeline re-reads, plus kpipe.fleet.livepatch's STATE_SCRIPT, in one round trip.
    `also`: more modules whose /sys/module state is read (the older version an upgrade retires)."""
    return Command.script(PREFLIGHT_SCRIPT + "shift\n" + lp.STATE_SCRIPT, staged_path, lp.sysfs_name(module),
                          *(lp.sysfs_name(m) for m in also), label="preflight", sudo=True, timeout=60)


def parse_preflight(stdout: str) -> dict[str, str]:
    """`key value` lines -> dict (pure)."""
    out: dict[str, str] = {}
    for line in stdout.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            out[key] = value.strip()
    return out


def preflight_problems(a: Assignment, facts: Mapping[str, str], state: lp.HostLivepatch, module_size: int,
                       ours_by_journal: bool, expect: lp.ModuleIdentity | None = None) -> list[str]:
    """Why this host must not get its artifact now (pure); empty when it may.

    A module of the same name that is loaded must be this very build: its build-id (or srcversion)
    when the host shows one and `expect` knows ours, else the installed file's checksum."""
    problems = []
    if facts.get("release") != a.release:
        problems.append(f"release changed: host runs {facts.get('release') or '?'}, plan expected {a.release}")
    arch = normalize_arch(facts.get("arch", ""))
    if a.artifact.arch and arch and arch != a.artifact.arch:
        problems.append(f"arch mismatch: host is {arch}, artifact is {a.artifact.arch}")
    if not state.sysfs:
        problems.append("/sys/kernel/livepatch does not exist (no livepatch support)")
    name = a.sysfs_name
    try:
        free = int(facts.get("free_kb", "")) * 1024
    except ValueError:
        free = None
    staged = facts.get("staged", "absent")
    if free is not None and staged != a.artifact.sha256 and free < 2 * module_size + _FREE_MARGIN:
        problems.append(f"not enough free space for {a.artifact.filename}: {free // 1024} KiB free, "
                        f"need {(2 * module_size + _FREE_MARGIN) // 1024} KiB")
    from kpipe.desired import split_versioned

    mine = split_versioned(name)
    for p in state.patches.values():
        theirs = split_versioned(p.name)
        if p.name == name:
            continue
        if p.transition == 1:
            problems.append(f"conflicting patch: {p.name} is in transition")
        elif p.name == a.supersedes or p.enabled != 1:
            continue  # the older version this upgrade retires; a disabled patch changes nothing
        elif mine and theirs and mine[0] == theirs[0] and theirs[1] > mine[1]:
            problems.append(f"{p.name} is loaded, a newer version of stream {a.artifact.stream_name} than ours "
                            f"(v{mine[1]}): kpipe does not downgrade (a rollback of the upgrade does)")
        elif p.name in a.coexists and a.artifact.replace:
            problems.append(f"conflicting patch: {p.name} is another stream's and ours is a replace patch")
        elif p.name not in a.coexists and not a.artifact.replace:
            problems.append(f"conflicting patch: {p.name} is loaded and ours is not a replace patch")
    ours = state.patches.get(name)
    mod = state.module(name)
    other = expect.differs(mod.identity()) if expect is not None and mod.present else ""
    comparable = expect is not None and expect.known and mod.identity().known
    if other:
        problems.append(f"a different build of {name} is loaded ({other})")
    elif (ours is not None or mod.present) and not ours_by_journal and not comparable \
            and staged != a.artifact.sha256:
        problems.append(f"a different build of {name} is loaded (installed file checksum "
                        f"{staged[:12] if staged != 'absent' else 'absent'}, want {a.artifact.sha256[:12]})")
    return problems




def preflight_step(a: Assignment, module_size: int, ours_by_journal: bool = False,
                   expect: lp.ModuleIdentity | None = None) -> Step[tuple[dict[str, str], lp.HostLivepatch]]:
    """The host's facts and livepatch state in one read; refused (StepFailed) when the host must not get
    its artifact now (preflight_problems). Its value is what apply_plan is built from."""
    dest = lp.staged_path(a.release, a.artifact.filename)

    def interpret(r: CommandResult) -> tuple[dict[str, str], lp.HostLivepatch]:
        facts = parse_preflight(r.stdout)
        # STATE_SCRIPT's lines share the output; its parser ignores ours, ours are read by key
        state = lp.parse_host_livepatch(r.stdout)
        if "release" not in facts or not state.complete:
            raise StepFailed("preflight", f"could not read the host's facts: {r.summary()}")
        problems = preflight_problems(a, facts, state, module_size, ours_by_journal, expect)
        if problems:
            raise StepFailed("preflight", "; ".join(problems), {"facts": facts})
        return facts, state

    also = (a.supersedes,) if a.supersedes else ()
    return Step("preflight", preflight_command(dest, a.sysfs_name, *also), interpret,
                intended={"release": a.release, "artifact": a.artifact.id},
                done=lambda v: {"facts": v[0], "loaded": sorted(v[1].patches), "tainted": v[1].tainted},
                writes=False)


def _journaled(steps: list[Step[Any]], intended: Mapping[str, Any],
               done: Callable[[Any], dict[str, Any]] | None) -> list[Step[Any]]:
    """One journal step (the steps share a name): `intended` on the first, `done` on the last."""
    out = list(steps)
    out[0] = replace(out[0], intended=dict(intended))
    out[-1] = replace(out[-1], done=done)
    return out


def apply_plan(a: Assignment, facts: Mapping[str, str], state: lp.HostLivepatch, local_path: Path,
               probe: Probe | None = None, *, journal_marker: str = "", persist: bool = False,
               timeout: float = 120.0, expect: lp.ModuleIdentity | None = None,
               marker: str | None = None) -> list[Step[Any]]:
    """One host's apply steps after its preflight (pure): stage, marker, load, wait, verify, persist.

    Built from `facts` and `state` as preflight_step read them: an installed file of this sha256 is
    not uploaded again; a patch already loaded and enabled is not loaded again and keeps the marker an
    earlier run journaled (`journal_marker`). `marker`: the new /dev/kmsg marker (default: a fresh one).
    Journal step names and details are the engine's: the journal reads them on resume and status."""
    art = a.artifact
    name = a.sysfs_name
    dest = lp.staged_path(a.release, art.filename)
    # the temp name is journaled: a kpipe killed mid-upload leaves it, the next stage or unstage removes it
    steps = _journaled(lp.stage_plan(local_path, a.release, art.sha256, art.filename, facts.get("staged", "absent")),
                       {"path": dest, "sha256": art.sha256, "temp": lp.temp_path(a.release, art.filename, art.sha256)},
                       lambda p: {"path": p})
    # SELinux hosts (the facts say so): the staged file must carry modules_object_t, read back with ls -Z
    selinux = facts.get("selinux", "off") in ("0", "1")
    if selinux:
        steps += _journaled(lp.label_plan(dest), {"path": dest, "context": lp.SELINUX_MODULE_CONTEXT},
                            lambda d: d)
    ours = state.patches.get(name)
    loaded = ours is not None and ours.enabled == 1
    if loaded:
        # already loaded (by an earlier run of this rollout, or the same build by hand): keep the marker
        # that run journaled so verification still reads "patching complete" after it
        marker = journal_marker
        if marker:
            steps.append(lp.marker_check_step(marker))
    else:
        marker = marker or lp.new_marker("rollout", name)
        steps.append(lp.marker_step(marker))
    kpatch_cli = facts.get("kpatch_cli") == "1"
    steps += _journaled(lp.load_plan(dest, name, state, marker=marker, kpatch_cli=kpatch_cli, timeout=timeout),
                        {"marker": marker, "path": dest, "kpatch_cli": kpatch_cli},
                        lambda r: {"changed": r.changed, "message": r.message, "output": r.output[-500:]})
    steps += _journaled([lp.wait_step(name, timeout, marker=marker)], {"timeout": timeout},
                        lambda r: {"message": r.message, "seconds": round(r.seconds, 3)})
    # a reused marker the log lost (ring buffer wrapped, log reset): verification falls back to sysfs
    steps += _journaled(lp.verify_loaded_plan(name, marker, probe, expect, marker_may_be_lost=loaded),
                        {"marker": marker, "probe": bool(probe)},
                        lambda v: {"probe_output": v.probe_output[-500:]})
    if a.supersedes:
        # an upgrade: the older version goes only once ours is proved loaded. Each step is journaled
        # before it runs and acts on what the host shows then, so a host lost between our load and
        # the older module's removal is finished by `rollout resume`.
        for step in lp.retire_plan(a.supersedes, name, replaced=art.replace, timeout=timeout):
            steps.append(replace(step, intended={"module": lp.sysfs_name(a.supersedes), "replace": art.replace},
                                 done=lambda r: {"changed": r.changed, "message": r.message}))
    if persist:
        # one folder per stream: at boot the loader loads only the stream's newest version
        steps += lp.persist_plan(a.release, dest, kpatch_cli, selinux=selinux, stream=art.stream_name)
    return steps


def apply_host(t: StepTransport, a: Assignment, local_path: Path, probe: Probe | None, rec: Recorder, *,
               journal_marker: str = "", ours_by_journal: bool = False, persist: bool = False,
               timeout: float = 120.0, expect: lp.ModuleIdentity | None = None) -> HostResult:
    """Run one host's pipeline: the preflight read, then the plan built from its facts (apply_plan).
    Returns applied, or raises on the first failure. `expect`: the loaded module must be that build."""
    size = local_path.stat().st_size if local_path.exists() else 0
    facts, state = run_step(t, preflight_step(a, size, ours_by_journal, expect), rec)
    steps = apply_plan(a, facts, state, local_path, probe, journal_marker=journal_marker, persist=persist,
                       timeout=timeout, expect=expect)
    values = run_steps(t, steps, rec)
    verified = [v for s, v in zip(steps, values, strict=True) if s.name == "verify"][-1]
    return HostResult(t.name, "applied", "", "verify", {"probe_output": verified.probe_output[-200:]})


@dataclass(frozen=True)
class Restore:
    """The older version a rollback of an upgrade loads again: its assignment (the plan's host with the
    older artifact), module file, probe and build identity."""

    assignment: Assignment
    local_path: Path
    probe: Probe | None = None
    expect: lp.ModuleIdentity | None = None


def restore_of(a: Assignment, local_path: Callable[[Assignment], Path], probe: Probe | None = None,
               expect: Callable[[Assignment], lp.ModuleIdentity] | None = None) -> Restore | None:
    """The Restore of an upgrade's assignment (None for a first install, or when the store does not know
    the older version's artifact: the rollback then only removes ours)."""
    if not a.supersedes or a.supersedes_artifact is None:
        return None
    old = replace(a, artifact=a.supersedes_artifact, supersedes="", supersedes_artifact=None)
    return Restore(old, local_path(old), probe, expect(old) if expect is not None else None)


def _restore_steps(r: Restore, state: lp.HostLivepatch, timeout: float, marker: str) -> list[Step[Any]]:
    """Load the older version again (it replaces ours when it is a replace patch) and prove it loaded."""
    old = r.assignment
    art, name = old.artifact, old.sysfs_name
    dest = lp.staged_path(old.release, art.filename)

    def named(steps: list[Step[Any]], step: str) -> list[Step[Any]]:
        return [replace(s, name=step) for s in steps]

    # the older file is uploaded again unless a read proves it is still staged (stage_plan's check step)
    steps = _journaled(named(lp.stage_plan(r.local_path, old.release, art.sha256, art.filename, "absent"),
                             "rb-restage"),
                       {"path": dest, "sha256": art.sha256, "artifact": art.id,
                        "temp": lp.temp_path(old.release, art.filename, art.sha256)}, lambda p: {"path": p})
    steps.append(lp.marker_step(marker, "rb-marker"))
    steps += _journaled(lp.load_plan(dest, name, state, marker=marker, kpatch_cli=False, timeout=timeout,
                                     step="rb-reload"),
                        {"marker": marker, "path": dest, "module": name},
                        lambda o: {"changed": o.changed, "message": o.message, "output": o.output[-500:]})
    steps += _journaled([lp.wait_step(name, timeout, marker=marker, step="rb-rewait")], {"timeout": timeout},
                        lambda o: {"message": o.message, "seconds": round(o.seconds, 3)})
    steps += _journaled(lp.verify_loaded_plan(name, marker, r.probe, r.expect, step="rb-reverify",
                                              marker_may_be_lost=True),
                        {"marker": marker, "probe": bool(r.probe)},
                        lambda v: {"probe_output": v.probe_output[-500:]})
    return steps


def _refuse_restore(why: str, r: CommandResult) -> None:
    raise StepFailed("rb-restore", why)


def rollback_plan(a: Assignment, state: lp.HostLivepatch, probe: Probe | None = None, *, timeout: float = 120.0,
                  persisted: bool | str = False, expect: lp.ModuleIdentity | None = None,
                  marker: str | None = None, restore: Restore | None = None) -> list[Step[Any]]:
    """One host's rollback steps (pure), from its livepatch `state` as read: disable, wait until the
    sysfs dir is gone, unload, uninstall (if persisted), unstage, verify removal.

    `persisted`: how the apply persisted the module, as its journal says ("kpatch" or "kpipe"; True is
    "kpatch", as journals written before kpipe's own layout existed mean).

    Only what this rollout installed is removed: a module of the same name that is another build
    (`expect`: the artifact's build-id or srcversion) stays loaded, a file of another build stays staged.
    `restore` (the rollback of an upgrade): the older version is loaded again first, then ours removed;
    the probe then checks the older version (its own probe), not the unpatched behaviour."""
    name = a.sysfs_name
    art = a.artifact
    mod = state.module(name)
    other = expect.differs(mod.identity()) if expect is not None and expect.known and mod.present else ""

    def disable_done(r: lp.OpResult) -> dict[str, Any]:
        return {"marker": r.marker, "changed": r.changed, "message": r.message}

    restoring: list[Step[Any]] = []
    if restore is not None and not other and restore.assignment.artifact.replace:
        keep = (name, restore.assignment.sysfs_name)
        others = sorted(p.name for p in state.patches.values() if p.name not in keep and p.enabled == 1)
        if others:
            # loading the older replace-mode version would disable these too: refuse, ours stays loaded
            why = (f"rolling back would load {restore.assignment.sysfs_name}, a replace patch, which would also "
                   f"disable {', '.join(others)} (another stream's); roll those back first")
            return [Step("rb-restore", lp.state_command(name), partial(_refuse_restore, why), writes=False)]
    if restore is not None and not other:
        restoring = _restore_steps(restore, state, timeout, lp.new_marker("restore", restore.assignment.sysfs_name))
        probe = None  # ours is gone when the older version answers the probe: _restore_steps checked that
    if other:
        left = f"left {name} loaded: not this rollout's build ({other})"
        steps = _journaled([lp.note_step("rb-disable", name, left)], {}, disable_done)
        steps += _journaled([lp.note_step("rb-unload", name, left)], {}, lambda r: {"message": r.message})
        verify_marker = ""
    else:
        marker = marker or lp.new_marker("disable", name)
        patch = state.patches.get(name)
        # the log after the marker holds "unpatching complete" only when this rollback disables the patch
        verify_marker = marker if patch is not None and patch.enabled == 1 and not restoring else ""
        # after a restore that replaced ours, the disable finds nothing to disable (its script reads first)
        steps = restoring + _journaled(lp.disable_plan(name, state, marker=marker, timeout=timeout,
                                                       step="rb-disable"), {}, disable_done)
        steps += _journaled(lp.unload_plan(name, state, disabled_before=True, step="rb-unload"), {},
                            lambda r: {"message": r.message})
    if persisted:
        method = persisted if isinstance(persisted, str) else "kpatch"
        steps.append(lp.remove_persisted_step(a.release, art.filename, method, stream=art.stream_name,
                                              step="rb-uninstall"))
    steps += _journaled([lp.unstage_step(a.release, art.filename, art.sha256, step="rb-unstage")],
                        {"temp": lp.temp_path(a.release, art.filename, art.sha256)},
                        lambda r: {"message": r.message})
    steps += _journaled(lp.verify_removed_plan(name, probe, marker=verify_marker, expect=expect, step="rb-verify"),
                        {}, lambda v: {"probe_output": v.probe_output[-200:]})
    return steps


def rollback_host(t: StepTransport, a: Assignment, probe: Probe | None, rec: Recorder, *, timeout: float = 120.0,
                  persisted: bool | str = False, expect: lp.ModuleIdentity | None = None,
                  restore: Restore | None = None) -> HostResult:
    """Read the host's livepatch state, then run the rollback plan built from it (each step idempotent)."""
    names = (a.sysfs_name, restore.assignment.sysfs_name) if restore is not None else (a.sysfs_name,)
    state = run_step(t, lp.state_step(*names))
    run_steps(t, rollback_plan(a, state, probe, timeout=timeout, persisted=persisted, expect=expect,
                               restore=restore), rec)
    return HostResult(t.name, "rolled_back", "", "rb-verify",
                      {"restored": restore.assignment.sysfs_name} if restore is not None else {})


def persist_method(entries: Sequence[Any]) -> str:
    """How a host's module was persisted, from its journal ("kpatch", "kpipe"), or "" (not persisted)."""
    method = ""
    for e in entries:
        if e.step == "persist" and e.phase == "done" and e.detail.get("persisted"):
            method = e.detail.get("method", "kpatch")
        elif e.step in ("rb-uninstall", "unpersist") and e.phase == "done":
            method = ""  # removed since
    return method


# -- dry run ---------------------------------------------------------------------
def dry_run_host(t: StepTransport, a: Assignment, local_path: Path, probe: Probe | None, *,
                 persist: bool = False, timeout: float = 120.0,
                 expect: lp.ModuleIdentity | None = None) -> list[Step[Any]]:
    """The preflight read (run: it writes nothing) and the plan built from its facts (not run)."""
    size = local_path.stat().st_size if local_path.exists() else 0
    pre = preflight_step(a, size, False, expect)
    facts, state = run_step(t, pre)
    return [pre, *apply_plan(a, facts, state, local_path, probe, persist=persist, timeout=timeout, expect=expect)]


def _gate_read(r: CommandResult) -> tuple[lp.HostLivepatch, str]:
    """VERIFY_SCRIPT's output as (state, kernel log) for the gate; StepFailed when the state is unreadable."""
    head, _, log = r.stdout.partition("---kpipe-dmesg---")  # VERIFY_SCRIPT's separator before `dmesg`
    st = lp.parse_host_livepatch(head)
    if not st.complete:
        raise StepFailed("verify", f"could not read the livepatch state: {r.summary()}")
    return st, log


# -- the engine --------------------------------------------------------------------
class Engine:
    """Drives stored rollouts: start, resume, rollback; every host step journaled."""

    def __init__(self, journal: Journal, runner: Runner, local_path: Callable[[Assignment], Path], *,
                 on_event: Callable[[Event], None] | None = None, sleep: Callable[[float], None] = time.sleep):
        self.journal = journal
        self.runner = runner
        self.local_path = local_path
        self._on_event = on_event
        self._event_lock = threading.Lock()
        self._event_failed = False
        self._identities: dict[str, lp.ModuleIdentity] = {}
        self.sleep = sleep

    def identity(self, a: Assignment) -> lp.ModuleIdentity:
        """The artifact's build identity (build-id, srcversion), read once from its bytes in the store."""
        sha = a.artifact.sha256
        if sha not in self._identities:
            try:
                path = self.local_path(a)
            except KpipeError:
                return lp.ModuleIdentity()  # the missing blob fails the host's stage step with its own message
            self._identities[sha] = lp.module_identity(path)
        return self._identities[sha]

    def emit(self, **kw: Any) -> None:
        """Tell the progress callback; its failure never stops the rollout (the journal is the record)."""
        if self._on_event is None:
            return
        with self._event_lock:
            try:
                self._on_event(Event(**kw))
            except Exception as e:
                # a broken progress printer must not leave hosts half-applied and the rollout `running`
                if not self._event_failed:
                    self._event_failed = True
                    sys.stderr.write(f"kpipe: progress display failed ({type(e).__name__}: {e}); "
                                     f"the rollout continues, see `kpipe rollout status {kw.get('rollout_id', '')}`\n")

    def _recorder(self, rid: str, host: str, wave: int) -> Recorder:
        def rec(step: str, phase: str, detail: dict[str, Any]) -> None:
            self.journal.record(rid, host, wave, step, phase, detail)
            self.emit(kind="step", rollout_id=rid, host=host, wave=wave, step=step, phase=phase,
                      message=str(detail.get("error", "")))
        return rec

    def _outcome(self, rid: str, r: HostResult, wave: int, a: Assignment, action: str = "apply") -> None:
        ident = self.identity(a)
        self.journal.record(rid, r.host, wave, "outcome", "done" if r.state in ("applied", "rolled_back") else
                            "failed", {"state": r.state, "reason": r.reason, "step": r.step, "action": action,
                                       "artifact": a.artifact.id, "sha256": a.artifact.sha256,
                                       "module": a.sysfs_name, "kernel": a.release, "replace": a.artifact.replace,
                                       "build_id": ident.build_id, "srcversion": ident.srcversion,
                                       "stream": a.artifact.stream_name, "version": a.artifact.version,
                                       "supersedes": a.supersedes, "restored": r.detail.get("restored", "")})
        self.emit(kind="host", rollout_id=rid, host=r.host, wave=wave, step=r.step, phase=r.state, message=r.reason)

    # -- public --------------------------------------------------------------------
    def start(self, rollout_id: str) -> RunSummary:
        """Run a planned rollout from its first wave."""
        rec = self.journal.get(rollout_id)
        if rec.state != "planned":
            raise ConfigError(f"rollout {rollout_id} is {rec.state}, not planned",
                              hint=f"use `kpipe rollout resume {rollout_id}`")
        return self._drive(rollout_id)

    def resume(self, rollout_id: str) -> RunSummary:
        """Continue a rollout from its journal after re-reading every host's real state."""
        return self._drive(rollout_id, resuming=True)

    def rollback(self, rollout_id: str, limit: str | frozenset[str] | None = None) -> RunSummary:
        """Roll back every host this rollout touched (or those matching `limit`: globs, or a set of names)."""
        # only the hosts this rollback may touch are locked: `--limit` leaves the others to other rollouts
        self._acquire(rollout_id, only=lambda h: _matches(h, limit))
        try:
            rec = self.journal.get(rollout_id)
            plan = RolloutPlan.from_dict(rec.plan)
            hosts = [h for h in self._touched(rollout_id, plan) if _matches(h, limit)]
            # an operator's rollback is no halt: only a gate's halt reason (if any) is kept
            self.journal.set_state(rollout_id, "halted",
                                   rollback={"policy": "manual", "hosts": hosts, "done": False,
                                             "all": limit is None})
            return self._rollback(rollout_id, plan, hosts, final_all=limit is None,
                                  halt_reason=rec.detail.get("halt_reason", ""))
        finally:
            self.journal.release(rollout_id)

    def persisted_hosts(self, rollout_id: str, limit: str | frozenset[str] | None = None) -> dict[str, str]:
        """The rollout's hosts whose module is persisted for boot, as its journal says: host -> method."""
        plan = RolloutPlan.from_dict(self.journal.get(rollout_id).plan)
        out = {}
        for h, entries in self.journal.iter_hosts(rollout_id):
            method = persist_method(entries)
            if h in plan.assignments and method and _matches(h, limit):
                out[h] = method
        return out

    def unpersist(self, rollout_id: str, limit: str | frozenset[str] | None = None) -> RunSummary:
        """Remove what `--persist` installed for boot on the rollout's hosts (the live patch stays loaded);
        each removal journaled as step `unpersist`. Hosts with nothing persisted are left alone."""
        self._acquire(rollout_id)
        try:
            plan = RolloutPlan.from_dict(self.journal.get(rollout_id).plan)
            todo = self.persisted_hosts(rollout_id, limit)

            def one(t: StepTransport) -> lp.OpResult:
                a = plan.assignments[t.name]
                step = lp.remove_persisted_step(a.release, a.artifact.filename, todo[t.name],
                                                stream=a.artifact.stream_name, step="unpersist")
                value = run_step(t, step, self._recorder(rollout_id, t.name, a.wave))
                if isinstance(value, CommandResult) and not value.ok:  # kpatch uninstall's own exit status
                    raise StepFailed("unpersist", f"kpatch uninstall failed: {value.summary()}")
                return value if isinstance(value, lp.OpResult) else lp.OpResult("unpersist", True, True, "uninstalled")

            results = self.runner.run_many(sorted(todo), one, plan.options.forks) if todo else {}
            hosts: dict[str, str] = {}
            reasons: dict[str, str] = {}
            for h in sorted(todo):
                r = results.get(h)
                if isinstance(r, BaseException):
                    hosts[h], reasons[h] = classify(r)
                else:
                    hosts[h] = "unpersisted"
            return RunSummary(rollout_id, self.journal.get(rollout_id).state, hosts, reasons)
        finally:
            self.journal.release(rollout_id)

    # -- internals -----------------------------------------------------------------
    def _touched(self, rid: str, plan: RolloutPlan) -> list[str]:
        """Hosts where this rollout may have changed something and that are not rolled back."""
        out = []
        for h, entries in self.journal.iter_hosts(rid):
            if h not in plan.assignments:
                continue
            st = host_state(h, entries)
            changed = any(e.step in ("stage", "marker", "load") for e in entries)
            if changed and st.outcome != "rolled_back":
                out.append(h)
        return [h for h in plan.hosts if h in out]

    def _acquire(self, rid: str, only: Callable[[str], bool] | None = None) -> None:
        """The rollout's driver lock plus one lock per host of its plan, or of the plan's hosts that `only`
        keeps (Locked, exit 10, if taken)."""
        plan = RolloutPlan.from_dict(self.journal.get(rid).plan)
        self.journal.acquire(rid, hosts={h: a.sysfs_name for h, a in plan.assignments.items()
                                         if only is None or only(h)})

    def _drive(self, rid: str, resuming: bool = False) -> RunSummary:
        self._acquire(rid)
        try:
            rec = self.journal.get(rid)
            plan = RolloutPlan.from_dict(rec.plan)
            rb = rec.detail.get("rollback") or {}
            if rec.state == "halted" and rb and not rb.get("done"):
                self.emit(kind="resume", rollout_id=rid, message="continuing the rollback")
                return _finished_rollback(self._rollback(rid, plan, list(rb.get("hosts", [])),
                                                         final_all=bool(rb.get("all")),
                                                         halt_reason=rec.detail.get("halt_reason", "")))
            if rec.state == "completed" and resuming and self._unfinished_hosts(rid, plan):
                pass  # hosts that were unreachable (or interrupted) are retried: nothing is forgotten
            elif rec.state in ("completed", "rolled_back", "halted"):
                return _finished_rollback(self.summary(rid))
            if resuming:
                self.journal.clear_abort(rid)
            return self._run(rid, plan, resuming)
        finally:
            self.journal.release(rid)

    def _run(self, rid: str, plan: RolloutPlan, resuming: bool) -> RunSummary:
        opts = plan.options
        self.journal.set_state(rid, "running", started_at=time.time())
        self.emit(kind="rollout-start", rollout_id=rid, data={"waves": [list(w) for w in plan.waves],
                                                              "resuming": resuming})
        failures: dict[str, str] = {}
        attempted: set[str] = set()
        applied: list[str] = []
        if resuming:
            self._recheck_applied(rid, plan)
        gates = {e.wave: e.detail for e in self.journal.entries(rid, "") if e.step == "gate" and e.phase == "done"}
        for wave_no, wave in enumerate(plan.waves, start=1):
            # one read of the journal per wave, not one per host (a wave may hold 1,000 hosts)
            by_host = self.journal.by_host(rid)
            states = {h: host_state(h, by_host.get(h, [])) for h in wave}
            # "ours by journal": this rollout already loaded (or began loading) the module on the host
            loaded = {h for h in wave if any(e.step == "load" for e in by_host.get(h, ()))}
            todo = []
            for h in wave:
                st = states[h]
                if st.outcome == "applied":
                    attempted.add(h)
                    applied.append(h)
                elif st.outcome in ("failed", "rolled_back"):
                    attempted.add(h)
                    failures[h] = st.outcome_detail.get("reason", st.outcome)
                else:  # pending, skipped, unreachable, or killed mid-pipeline: (re)run, every step idempotent
                    todo.append(h)
            if gates.get(wave_no, {}).get("verdict") == "proceed" and not todo:
                continue
            if self.journal.abort_requested(rid):
                return self._aborted(rid)
            self.journal.update_detail(rid, wave=wave_no)
            self.emit(kind="wave-start", rollout_id=rid, wave=wave_no, data={"hosts": list(wave), "todo": todo,
                                                                                "waves": len(plan.waves)})
            apply_one = partial(self._apply_one, rid, plan, wave=wave_no, states=states, loaded=loaded)
            results = self.runner.run_many(todo, apply_one, opts.forks) if todo else {}
            skipped = False
            for h in todo:
                r = results.get(h)
                if isinstance(r, BaseException):
                    # the fan-out itself failed for this host (connection): journal it so nothing is forgotten
                    state, reason = classify(r)
                    r = HostResult(h, state, reason, "connect")
                    self._outcome(rid, r, wave_no, plan.assignments[h])
                if r is None or r.state == "skipped":
                    skipped = True
                    continue
                attempted.add(h)
                if r.state == "applied":
                    applied.append(h)
                else:
                    failures[h] = r.reason
            if skipped:
                return self._aborted(rid)
            # the soak: re-verify every applied host (this wave's and earlier ones'); a regression is a failure
            watch = SoakWatch(soak=opts.soak_s > 0)
            begin = time.monotonic()
            if opts.soak_s > 0:
                self.emit(kind="soak-start", rollout_id=rid, wave=wave_no,
                          data={"soak_s": opts.soak_s, "interval_s": opts.verify_interval_s,
                                "hosts": len([h for h in applied if h not in failures])})
            for offset in gate_schedule(opts.soak_s, opts.verify_interval_s):
                wait = begin + offset - time.monotonic()
                if wait > 0:
                    self.sleep(wait)
                live = [h for h in applied if h not in failures]
                round_ = self._reverify(plan, live, rid) if live else {}
                results_ok = {}
                for h, v in round_.items():
                    results_ok[h] = (False, classify(v)[1]) if isinstance(v, BaseException) else v
                for h in watch.record(results_ok):
                    failures[h] = watch.regressions[h]
                    self._outcome(rid, HostResult(h, "failed", watch.regressions[h], "soak"),
                                  plan.assignments[h].wave, plan.assignments[h])
                self.emit(kind="soak", rollout_id=rid, wave=wave_no, data={
                    "round": watch.rounds, "regressions": dict(watch.regressions), "checked": len(results_ok),
                    "ok": sum(1 for ok, _ in results_ok.values() if ok), "soak_s": opts.soak_s,
                    "remaining_s": max(0.0, opts.soak_s - offset)})
                if self.journal.abort_requested(rid):
                    break
            decision = decide(opts.max_failures, len(attempted), failures,
                              aborted=self.journal.abort_requested(rid))
            self.journal.record(rid, "", wave_no, "gate", "done", decision.to_dict())
            self.emit(kind="gate", rollout_id=rid, wave=wave_no, phase=decision.verdict, message=decision.reason,
                      data=decision.to_dict())
            self.emit(kind="wave-end", rollout_id=rid, wave=wave_no, phase=decision.verdict,
                      data={"applied": len(applied), "failed": len(failures), "waves": len(plan.waves)})
            if self.journal.abort_requested(rid):
                return self._aborted(rid)
            if not decision.proceed:
                policy = opts.rollback_policy
                if policy == "failed":
                    hosts = sorted(failures)
                elif policy == "wave":
                    hosts = sorted(set(wave) | set(failures))
                else:
                    hosts = sorted(attempted | set(failures))
                # only where this rollout changed something: a host refused before its stage step still
                # runs what it ran before (another rollout's build of the module, say), and stays `failed`
                touched = set(self._touched(rid, plan))
                hosts = [h for h in plan.hosts if h in hosts and h in touched]
                self.journal.set_state(rid, "halted", halt_reason=decision.reason,
                                       rollback={"policy": policy, "hosts": hosts, "done": False,
                                                 "all": policy == "all"})
                return self._rollback(rid, plan, hosts, final_all=policy == "all", halt_reason=decision.reason)
        self.journal.set_state(rid, "completed", finished_at=time.time())
        s = self.summary(rid)
        self.emit(kind="rollout-end", rollout_id=rid, phase=s.state, data=s.to_dict())
        return s

    def _unfinished_hosts(self, rid: str, plan: RolloutPlan) -> list[str]:
        by_host = self.journal.by_host(rid)
        return [h for h in plan.hosts if host_state(h, by_host.get(h, [])).outcome not in
                ("applied", "failed", "rolled_back")]

    def _recheck_applied(self, rid: str, plan: RolloutPlan) -> None:
        """On resume, re-read the real state of every host the journal calls applied: a host whose patch
        is gone or broken becomes failed (a regression); one that cannot be reached is retried."""
        by_host = self.journal.by_host(rid)
        done = [h for h in plan.hosts if host_state(h, by_host.get(h, [])).outcome == "applied"]
        if not done:
            return
        results = self._reverify(plan, done, rid)
        for h in done:
            v = results.get(h)
            a = plan.assignments[h]
            if isinstance(v, BaseException):
                state, reason = classify(v)
                self._outcome(rid, HostResult(h, state, f"re-check on resume: {reason}", "resume"), a.wave, a)
            elif v is not None and not v[0]:
                self._outcome(rid, HostResult(h, "failed", f"regressed before resume: {v[1]}", "resume"), a.wave, a)
        self.emit(kind="resume", rollout_id=rid,
                  message=f"re-checked {len(done)} applied host{'' if len(done) == 1 else 's'}")

    def _aborted(self, rid: str) -> RunSummary:
        self.journal.set_state(rid, "aborted", finished_at=time.time())
        s = self.summary(rid)
        self.emit(kind="rollout-end", rollout_id=rid, phase="aborted", data=s.to_dict())
        return s

    def _apply_one(self, rid: str, plan: RolloutPlan, t: StepTransport, wave: int,
                   states: Mapping[str, Any], loaded: Set[str] = frozenset()) -> HostResult:
        a = plan.assignments[t.name]
        if self.journal.abort_requested(rid):
            return HostResult(t.name, "skipped", "aborted before this host started")
        st = states.get(t.name)
        rec = self._recorder(rid, t.name, wave)
        # the wave's journal read (states, loaded) is this host's too: nothing records for a host
        # between its wave's start and its own first step
        ours = t.name in loaded
        try:
            r = apply_host(t, a, self.local_path(a), probe_of(plan, a), rec,
                           journal_marker=st.marker if st else "", ours_by_journal=ours,
                           persist=plan.options.persist, timeout=plan.options.step_timeout_s,
                           expect=self.identity(a))
        except Exception as e:
            state, reason = classify(e)
            r = HostResult(t.name, state, reason, getattr(e, "step", ""))
        self._outcome(rid, r, wave, a)
        return r

    @staticmethod
    def _gate_context(entries: Iterable[Any]) -> tuple[str, int | None]:
        """The load's kernel-log marker and the taint read before the load, from the host's journal entries."""
        marker, taint = "", None
        for e in entries:
            if e.step == "marker" and e.phase == "done" and e.detail.get("marker"):
                marker = str(e.detail["marker"])
            elif e.step == "preflight" and e.phase == "done" and taint is None and \
                    isinstance(e.detail.get("tainted"), int):
                taint = e.detail["tainted"]  # the first read: later ones may already show the patch's bits
        return marker, taint

    def _reverify(self, plan: RolloutPlan, hosts: list[str],
                  rid: str = "") -> dict[str, tuple[bool, str] | BaseException]:
        """One gate tick over applied hosts through the one observer (read steps only: state and kernel log
        in one command, the probe, the health command), then the Prometheus query once for all of them:
        per host (ok, problems), or the exception that stopped its reads.

        With `rid`, the kernel log after the load's marker and the taint since the read before the load
        are judged too (kpipe.rollout.gate.judge_host)."""
        out: dict[str, tuple[bool, str] | BaseException] = {}
        gates = GateConfig.from_dict(plan.gates)
        plans: dict[str, list[Step[Any]]] = {}
        context: dict[str, tuple[str, int | None]] = {}
        # one read of the journal per tick, not one per host: a tick of a 1,000-host rollout's last wave
        # re-verifies every applied host
        by_host = self.journal.by_host(rid) if rid and hosts else {}
        for h in hosts:
            a = plan.assignments[h]
            try:
                name = lp.sysfs_name(a.sysfs_name)
                context[h] = self._gate_context(by_host.get(h, ()))
                verify = lp.verify_loaded_plan(name, "", probe_of(plan, a), self.identity(a))
                # the state and the whole kernel log in one read; the gate judges them (judge_host)
                steps: list[Step[Any]] = [Step(verify[0].name, lp.verify_state_command(name), _gate_read,
                                               writes=False), *verify[1:]]
                check = gates.health.get(a.artifact.id)
                if check is not None:
                    steps.append(health_step(check))
                plans[h] = steps
            except KpipeError as e:  # e.g. a module name a hand-edited journal made unusable: this host's failure
                out[h] = e
        raw = run_reads_on(_RunnerFanOut(self.runner), [_HostName(h) for h in plans], plans.__getitem__,
                           plan.options.forks)
        for h, v in raw.items():
            if isinstance(v, lp.VerifyFailed):  # the host answered and its patch is not right: a regression
                out[h] = (False, "; ".join(v.verification.problems))
                continue
            if isinstance(v, BaseException):
                out[h] = v
                continue
            a = plan.assignments[h]
            state, log = v[0]
            marker, taint = context[h]
            judged = judge_host(a.sysfs_name, state, log, marker=marker, taint_before=taint,
                                expect=self.identity(a))
            problems = list(judged.problems)
            problems += [r.problem for r in v[1:] if isinstance(r, HealthResult) and not r.ok]
            out[h] = (not problems, "; ".join(problems))
        if gates.prometheus is not None:
            judged_hosts = [h for h in hosts if isinstance(out.get(h), tuple)]
            try:
                bad = judge_prometheus(gates.prometheus, query_prometheus(gates.prometheus), judged_hosts) \
                    if judged_hosts else {}
            except PrometheusError as e:
                # a gate that cannot ask Prometheus cannot pass anyone: every judged host fails, the gate halts
                bad = {h: f"gate error: {e.message}" for h in judged_hosts}
            for h, problem in bad.items():
                prev = out[h]
                text = prev[1] if isinstance(prev, tuple) else ""
                out[h] = (False, f"{text}; {problem}" if text else problem)
        return {h: out[h] for h in hosts}  # in the caller's order, as the journal records them

    def _rollback(self, rid: str, plan: RolloutPlan, hosts: list[str], *, final_all: bool,
                  halt_reason: str = "") -> RunSummary:
        self.emit(kind="rollback-start", rollout_id=rid, data={"hosts": hosts}, message=halt_reason)
        by_host = self.journal.by_host(rid)
        todo = [h for h in hosts if h in plan.assignments
                and host_state(h, by_host.get(h, [])).outcome != "rolled_back"]
        persisted = {h: persist_method(by_host.get(h, [])) for h in todo}

        def one(t: StepTransport) -> HostResult:
            a = plan.assignments[t.name]
            rec = self._recorder(rid, t.name, a.wave)
            try:
                restore = restore_of(a, self.local_path, _probe_by_id(plan, a.supersedes_artifact), self.identity)
                r = rollback_host(t, a, probe_of(plan, a), rec, timeout=plan.options.step_timeout_s,
                                  persisted=persisted.get(t.name, ""), expect=self.identity(a), restore=restore)
            except Exception as e:
                state, reason = classify(e)
                r = HostResult(t.name, state, f"rollback failed: {reason}", getattr(e, "step", ""))
            self._outcome(rid, r, a.wave, a, action="rollback")
            return r

        results = self.runner.run_many(todo, one, plan.options.forks) if todo else {}
        ok = True
        for h in todo:
            r = results.get(h)
            if isinstance(r, BaseException):
                state, reason = classify(r)
                r = HostResult(h, state, f"rollback failed: {reason}", "connect")
                self._outcome(rid, r, plan.assignments[h].wave, plan.assignments[h], action="rollback")
            if r is None or r.state != "rolled_back":
                ok = False
        rec = self.journal.get(rid)
        rb = dict(rec.detail.get("rollback") or {})
        rb["done"] = ok
        everything = final_all and ok and not self._touched(rid, plan)
        self.journal.set_state(rid, "rolled_back" if everything else "halted", rollback=rb,
                               finished_at=time.time())
        s = self.summary(rid)
        self.emit(kind="rollout-end", rollout_id=rid, phase=s.state, data=s.to_dict())
        return s

    def dry_run(self, plan: RolloutPlan) -> dict[str, list[Step[Any]] | BaseException]:
        """Every host's steps: its preflight read runs (reads only), the plan built from the facts it
        returned is not run. A host that cannot be read or that its preflight refuses maps to the error."""
        def one(t: StepTransport) -> list[Step[Any]]:
            a = plan.assignments[t.name]
            return dry_run_host(t, a, self.local_path(a), probe_of(plan, a), persist=plan.options.persist,
                                timeout=plan.options.step_timeout_s, expect=self.identity(a))

        results = self.runner.run_many(list(plan.hosts), one, plan.options.forks)
        return {h: results.get(h) or KpipeError(f"{h}: not run") for h in plan.hosts}

    def summary(self, rid: str) -> RunSummary:
        """The rollout's state and every host's final state, from the journal."""
        return summarize(self.journal, rid)


def _finished_rollback(s: RunSummary) -> RunSummary:
    """What resuming a rollout whose rollback is complete reports: success. The halt that started
    the rollback was reported when it happened; a finished rollback is what resume was asked for."""
    if s.state == "rolled_back":
        return RunSummary(s.rollout_id, s.state, s.hosts, s.reasons, "")
    return s


def _matches(host: str, pattern: str | frozenset[str] | None) -> bool:
    # a set is the host names the CLI resolved from an Ansible pattern; a string is globs joined by ':'
    if pattern is None:
        return True
    if isinstance(pattern, frozenset):
        return host in pattern
    if not pattern:
        return True
    return any(fnmatch.fnmatchcase(host, p) for p in pattern.split(":") if p)


def applied_records(journal: Journal) -> list[dict[str, Any]]:
    """Every host outcome of every rollout that applied or rolled back a patch, in journal order
    (for kpipe.audit's AppliedRecord: seq, rollout_id, host, patch, action, artifact_id, sha256, kernel, replace,
    build_id, srcversion, stream, version, restored)."""
    rows = journal.store.query("SELECT rollout_id, seq, host, detail_json, ts FROM journal "
                               "WHERE step = 'outcome' ORDER BY ts, rollout_id, seq")
    import json

    out = []
    for r in rows:
        d = json.loads(r["detail_json"])
        if d.get("state") not in ("applied", "rolled_back"):
            continue
        out.append({"seq": r["ts"], "rollout_id": r["rollout_id"], "host": r["host"], "patch": d.get("module", ""),
                    "action": d["state"], "artifact_id": d.get("artifact", ""), "sha256": d.get("sha256", ""),
                    "kernel": d.get("kernel", ""), "replace": bool(d.get("replace", False)),
                    "build_id": d.get("build_id", ""), "srcversion": d.get("srcversion", ""),
                    "stream": d.get("stream", ""), "version": d.get("version", 0), "restored": d.get("restored", "")})
    return out
