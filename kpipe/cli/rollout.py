"""kpipe rollout: plan, start (--dry-run), status, resume, abort, rollback, list.

`last` names the rollout that was started (or resumed) most recently; a plan that never ran is not
`last` (`start --plan last` takes the newest stored plan). Numeric options are checked while the
command line is parsed: nonsense is a usage error (exit 2) before any host is contacted.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from kpipe.cli import complete
from kpipe.cli.context import esc, plural, print_json, print_table, state
from kpipe.cli.params import WORD
from kpipe.cli.progress import NO_PROGRESS_HELP

if TYPE_CHECKING:
    from kpipe.host import Host
    from kpipe.rollout.journal import Journal
    from kpipe.rollout.planner import RolloutOptions

rollout_app = typer.Typer(help="Staged, health-gated rollouts with a journal, resume and rollback.",
                          no_args_is_help=True)

_WEEK = 7 * 24 * 3600.0
_DAY = 24 * 3600.0


def _number(lo: float, hi: float, what: str) -> Callable[[float | None], float | None]:
    """A click callback: the value must be a finite number in [lo, hi], else a usage error (exit 2).
    click's own range check lets nan through (every comparison with nan is false)."""
    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not a finite number of {what}")
        if not lo <= value <= hi:
            raise typer.BadParameter(f"{value:g} is not in the range {lo:g}<=x<={hi:g} ({what})")
        return value
    return check


def _budget(value: str | None) -> str | None:
    """--max-failures: N or N%, checked at parse time."""
    if value is None:
        return value
    from kpipe.errors import ConfigError
    from kpipe.rollout.planner import FailureBudget

    try:
        return str(FailureBudget.parse(value))
    except ConfigError:
        raise typer.BadParameter(f"{value!r} is not a count (0, 2) or a percentage (10%) of 0-100") from None


def _waves(value: str | None) -> str | None:
    """--waves: cumulative counts or percentages, checked at parse time."""
    if value is None:
        return value
    from kpipe.errors import ConfigError
    from kpipe.rollout.planner import parse_waves

    try:
        parse_waves(value)
    except ConfigError as e:
        raise typer.BadParameter(e.message.removeprefix("--waves ") + (f" ({e.hint})" if e.hint else "")) from None
    return value


def _policy(value: str | None) -> str | None:
    if value is None:
        return value
    from kpipe.rollout.planner import ROLLBACK_POLICIES

    if value not in ROLLBACK_POLICIES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(ROLLBACK_POLICIES)}")
    return value


def _engine(value: str) -> str:
    """--engine: fabric (SSH from this machine) or ansible (ansible-runner), checked at parse time."""
    if value not in ("fabric", "ansible"):
        raise typer.BadParameter(f"{value!r} is not one of fabric, ansible")
    return value


_ENGINE = typer.Option("fabric", "--engine", metavar="ENGINE", callback=_engine,
                       help="Who runs the host steps: fabric (SSH from here) or ansible (ansible-runner, "
                            "the same steps as Ansible tasks). The journal is the same either way.")
_WAVES = typer.Option(None, "--waves", metavar="SIZES", callback=_waves,
                      help="Cumulative wave sizes: counts or percentages (default: the recipe's, else 1,10%,50%,100%).")
_LIMIT = typer.Option(None, "--limit", "-l", autocompletion=complete.host_patterns, metavar="PATTERN",
                      help="Ansible host pattern (group, glob, a:b, a:&b, a:!b).")
_SOAK = typer.Option(None, "--soak", metavar="SECONDS", callback=_number(0.0, _WEEK, "seconds"),
                     help="Seconds to watch each wave, 0 to 604800 (default: the recipe's, else 0).")
_VERIFY_INTERVAL = typer.Option(10.0, "--verify-interval", metavar="SECONDS", callback=_number(0.5, _WEEK, "seconds"),
                                help="Re-verify every N seconds in a soak (at least 0.5).")
_MAX_FAILURES = typer.Option(None, "--max-failures", metavar="BUDGET", callback=_budget,
                             help="Failure budget: N hosts or N% (default 0).")
_POLICY = typer.Option(None, "--rollback-policy", metavar="POLICY", callback=_policy,
                       help="failed | wave | all (default failed).")
_FORKS = typer.Option(None, "--forks", metavar="N", min=1, max=1000,
                      help="Hosts in flight at once (default: 50, or forks in the ssh section of kpipe.toml).")
_WORKERS = typer.Option(None, "--workers", metavar="N", min=1, max=256,
                        help="Worker processes for the SSH fan-out (default: workers in the fleet section of "
                             "kpipe.toml, else one per core; 1 = in-process; fewer than 250 hosts per worker stay "
                             "in-process). The journal is written by this process either way.")
_STEP_TIMEOUT = typer.Option(120.0, "--step-timeout", metavar="SECONDS", callback=_number(1.0, _DAY, "seconds"),
                             help="Seconds per load / transition wait (1 to 86400).")
_YES = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")
_NO_PROGRESS = typer.Option(False, "--no-progress", help=NO_PROGRESS_HELP)
_NO_PROBE = typer.Option(False, "--no-probe",
                         help="Roll out without the recipe's probe (a recipe that no longer renders is then "
                              "tolerated and its rollout settings are not used).")


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.add_typer(rollout_app, name="rollout")


def _options(target: str, waves: str | None, soak: float | None, verify_interval: float,
             max_failures: str | None, rollback_policy: str | None, skip_preflight: bool, persist: bool,
             forks: int | None, timeout: float, no_probe: bool = False) -> RolloutOptions:
    """Options from the command line; what it leaves out comes from the recipe's `rollout:` section."""
    from kpipe.rollout.planner import DEFAULT_WAVES, FailureBudget, RolloutOptions
    from kpipe.rollout.world import recipe_defaults

    ws = state().workspace
    rd = recipe_defaults(ws, target, no_probe=no_probe) if None in (waves, soak, max_failures, rollback_policy) else {}
    if waves is None:
        waves = ",".join(str(w) for w in rd["waves"]) if rd.get("waves") else DEFAULT_WAVES
    if soak is None:
        soak = float(rd.get("soak", 0) or 0)
    if max_failures is None:
        max_failures = str(rd.get("max_failures", 0))
    if rollback_policy is None:
        rollback_policy = str(rd.get("rollback", "failed"))
    return RolloutOptions(waves=waves, soak_s=soak, verify_interval_s=verify_interval,
                          max_failures=FailureBudget.parse(max_failures), rollback_policy=rollback_policy,
                          skip_preflight=skip_preflight, persist=persist, forks=forks or ws.ssh.forks,
                          step_timeout_s=timeout)


def _journal() -> Journal:
    from kpipe.cli.listings import journal

    return journal()


def _resolve(journal: Journal, ref: str) -> str:
    """A rollout id from an id, a unique prefix, or `last` (kpipe.cli.listings.resolve_rollout)."""
    from kpipe.cli.listings import resolve_rollout

    return resolve_rollout(journal, ref)


def _resolve_plan(journal: Journal, ref: str) -> str:
    """`start --plan`: an id, a prefix, or `last` (the newest stored plan that has not run)."""
    if (ref or "").strip() != "last":
        return journal.resolve(ref)
    return journal.last_planned()


def _refuse_plan(journal: Any, rid: str, verb: str) -> Any:
    """The rollout's record; a plan that never ran cannot be resumed or rolled back (ConfigError, exit 4)."""
    from kpipe.errors import ConfigError

    rec = journal.get(rid)
    if rec.state == "planned":
        raise ConfigError(f"rollout {rid} is a plan that never ran: there is nothing to {verb}",
                          hint=f"start it with `kpipe rollout start --plan {rid}`")
    return rec


def _interactive() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):  # no stdin, or it was closed
        return False


def _need_yes(what: str) -> None:
    """Without a terminal there is no one to ask: a rollout must then be confirmed with --yes (exit 2)."""
    from kpipe.errors import ExitCode, KpipeError

    raise KpipeError(f"cannot ask for confirmation to {what}: stdin is not a terminal",
                     hint="pass --yes to confirm on the command line", exit_code=ExitCode.USAGE)


def _confirm(question: str, json_out: bool, what: str = "rollout", hint: str | None = None) -> None:
    """Ask on the terminal; a no ends the command with exit 1 and "WHAT not started" (nothing changed)."""
    # the question goes to stderr when stdout carries JSON
    if not typer.confirm(question, err=json_out):
        from kpipe.errors import ExitCode, KpipeError

        raise KpipeError(f"{what} not started: not confirmed", exit_code=ExitCode.FAILURE, hint=hint)


def _print_plan(plan: Any, rollout_id: str) -> None:
    from rich.table import Table

    con = state().console
    o = plan.options
    con.print(f"[bold]rollout {esc(rollout_id)}[/bold]: {esc(plan.target_kind)} {esc(plan.target)}, "
              f"{plural(len(plan.hosts), 'host')} in {plural(len(plan.waves), 'wave')}, {len(plan.excluded)} excluded")
    con.print(f"  soak {o.soak_s:g} s (verify every {o.verify_interval_s:g} s), max failures {esc(o.max_failures)}, "
              f"rollback policy {esc(o.rollback_policy)}, persist {'yes' if o.persist else 'no'}"
              + (", [yellow]preflight skipped[/yellow]" if o.skip_preflight else ""))
    if plan.hosts:
        t = Table(title="waves", show_lines=False)
        for col in ("wave", "host", "release", "artifact", "signed", "preflight", "notes"):
            t.add_column(col, no_wrap=col in ("host", "release"))
        for w, wave in enumerate(plan.waves, start=1):
            for h in wave:
                a = plan.assignments[h]
                pf = a.artifact.preflight or "not run"
                t.add_row(str(w), esc(h), esc(a.release), esc(f"{a.artifact.id} ({a.artifact.module_name})"),
                          "yes" if a.artifact.signed else "no",
                          f"[green]{esc(pf)}[/green]" if pf == "passed" else f"[yellow]{esc(pf)}[/yellow]",
                          esc("; ".join(a.notes)))
        con.print(t)
    if plan.excluded:
        t = Table(title="excluded")
        t.add_column("host")
        t.add_column("reason")
        for e in plan.excluded:
            t.add_row(esc(e.host), esc(e.reason))
        con.print(t)


def _plan_and_store(target: str, limit: str | None, opts: Any, store: bool = True,
                    pool: Any = None, no_probe: bool = False) -> tuple[Any, str, list[Host]]:
    from kpipe.rollout.world import build_plan

    ws = state().workspace
    plan, hosts = build_plan(ws, target, limit, opts, pool=pool, no_probe=no_probe)
    rid = ""
    if store:
        rid = _journal().create(plan.to_dict(), opts.to_dict(), target=target)
    return plan, rid, hosts


@rollout_app.command("plan")
def plan_cmd(
    target: str = typer.Argument(..., autocompletion=complete.targets, metavar="TARGET", click_type=WORD,
                                 help="A recipe name, or an artifact id."),
    limit: str | None = _LIMIT,
    waves: str | None = _WAVES,
    soak: float | None = _SOAK,
    verify_interval: float = _VERIFY_INTERVAL,
    max_failures: str | None = _MAX_FAILURES,
    rollback_policy: str | None = _POLICY,
    skip_preflight: bool = typer.Option(False, "--skip-preflight", help="Allow artifacts without a passed preflight."),
    persist: bool = typer.Option(False, "--persist", help="Install for reboot (kpatch install)."),
    forks: int | None = _FORKS,
    timeout: float = _STEP_TIMEOUT,
    no_probe: bool = _NO_PROBE,
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Plan a rollout: waves, hosts, the artifact per host, preflight status, excluded hosts with reasons."""
    opts = _options(target, waves, soak, verify_interval, max_failures, rollback_policy, skip_preflight, persist, forks,
                    timeout, no_probe)
    plan, rid, _ = _plan_and_store(target, limit, opts, no_probe=no_probe)
    if json_out:
        print_json({"id": rid, **plan.to_dict()})
    else:
        _print_plan(plan, rid)


def _finish(summary: Any, json_out: bool) -> None:
    from kpipe.errors import RolloutHalted

    if json_out:
        print_json(summary.to_dict())
    else:
        _print_summary(summary)
    if summary.halt_reason:
        raise RolloutHalted(f"rollout {summary.rollout_id} halted: {summary.halt_reason}",
                            hint=f"see `kpipe rollout status {summary.rollout_id}`")
    if summary.state == "aborted":
        from kpipe.errors import ExitCode, KpipeError

        raise KpipeError(f"rollout {summary.rollout_id} aborted", exit_code=ExitCode.FAILURE,
                         hint=f"continue with `kpipe rollout resume {summary.rollout_id}`")


def _print_summary(s: Any) -> None:
    from collections import Counter

    con = state().console
    counts = Counter(s.hosts.values())
    con.print(f"rollout {esc(s.rollout_id)}: [bold]{esc(s.state)}[/bold] — "
              + ", ".join(f"{n} {esc(k)}" for k, n in sorted(counts.items())))
    if s.halt_reason:
        con.print(f"  halted: {esc(s.halt_reason)}")


def _run_engine(rid: str, what: str, forks: int | None, limit: frozenset[str] | None = None,
                json_out: bool = False, pool: Any = None, hosts: list[Host] | None = None,
                engine_name: str = "fabric", no_progress: bool = False, workers: int | None = None) -> Any:
    from kpipe.cli.progress import RolloutProgress, live_wanted

    progress = RolloutProgress(live=live_wanted(no_progress), json_out=json_out)
    journal = _journal()
    runner: Any  # the executor's runner: an SSH pool or Ansible plays; closed at the end either way
    if engine_name == "ansible":
        from kpipe.rollout.ansible_executor import ansible_engine_for

        engine, runner = ansible_engine_for(state().workspace, journal, rid, forks=forks,
                                            on_event=progress.callback, hosts=hosts,
                                            check_blobs=what != "rollback")
    else:
        from kpipe.rollout.world import engine_for

        engine, runner = engine_for(state().workspace, journal, rid, forks=forks,
                                    on_event=progress.callback, pool=pool, hosts=hosts,
                                    check_blobs=what != "rollback", workers=workers)
    try:
        with progress:
            if what == "start":
                return engine.start(rid)
            if what == "resume":
                return engine.resume(rid)
            return engine.rollback(rid, limit)
    except KeyboardInterrupt:
        # Ctrl-C: the journal holds every step taken so far; the rollout is not `running` any more
        from kpipe.errors import ExitCode, KpipeError
        from kpipe.rollout.journal import mark_interrupted

        if mark_interrupted(journal, rid) == "planned":  # stopped before its first step
            raise KpipeError(f"interrupted before rollout {rid} started; nothing was changed",
                             exit_code=ExitCode.INTERRUPTED,
                             hint=f"start it with `kpipe rollout start --plan {rid}`") from None
        raise KpipeError(f"interrupted; resume with `kpipe rollout resume {rid}`", exit_code=ExitCode.INTERRUPTED,
                         hint=f"`kpipe rollout status {rid}` shows where each host stopped") from None
    finally:
        runner.close()


@rollout_app.command("start")
def start_cmd(
    target: str | None = typer.Argument(None, autocompletion=complete.targets, metavar="TARGET", click_type=WORD,
                                        help="A recipe name or an artifact id (or use --plan)."),
    plan_id: str | None = typer.Option(None, "--plan", autocompletion=complete.plans, metavar="ID",
                                       help="Start a stored plan (an id, or `last`: the newest plan)."),
    limit: str | None = _LIMIT,
    waves: str | None = _WAVES,
    soak: float | None = _SOAK,
    verify_interval: float = _VERIFY_INTERVAL,
    max_failures: str | None = _MAX_FAILURES,
    rollback_policy: str | None = _POLICY,
    skip_preflight: bool = typer.Option(False, "--skip-preflight", help="Allow artifacts without a passed preflight."),
    persist: bool = typer.Option(False, "--persist", help="Install for reboot (kpatch install)."),
    forks: int | None = _FORKS,
    workers: int | None = _WORKERS,
    timeout: float = _STEP_TIMEOUT,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every command for every host; change nothing."),
    no_probe: bool = _NO_PROBE,
    engine: str = _ENGINE,
    yes: bool = _YES,
    no_progress: bool = _NO_PROGRESS,
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Plan (or take a stored plan) and run it wave by wave; exit 8 when a gate halts it."""
    from kpipe.errors import UsageError
    from kpipe.rollout.planner import RolloutPlan

    if not (yes or dry_run or _interactive()):
        _need_yes("start a rollout")  # before any host is asked or any plan stored
    journal = _journal()
    pool, hosts = None, None
    if plan_id:
        # A stored plan was reviewed as it is: options that would reshape it are refused, not silently ignored.
        given = [name for name, value in (("TARGET", target), ("--limit", limit), ("--waves", waves), ("--soak", soak),
                                          ("--max-failures", max_failures), ("--rollback-policy", rollback_policy))
                 if value is not None]
        given += [name for name, on in (("--skip-preflight", skip_preflight), ("--persist", persist),
                                        ("--no-probe", no_probe),
                                        ("--verify-interval", verify_interval != _VERIFY_INTERVAL.default),
                                        ("--step-timeout", timeout != _STEP_TIMEOUT.default)) if on]
        if given:
            raise UsageError(f"--plan runs a stored plan as it was made; {', '.join(given)} cannot change it",
                             hint="make a new plan with `kpipe rollout plan ...` (or start TARGET with those options)")
        rid = _resolve_plan(journal, plan_id)
        plan = RolloutPlan.from_dict(journal.get(rid).plan)
    elif target:
        from kpipe.rollout.world import make_pool

        opts = _options(target, waves, soak, verify_interval, max_failures, rollback_policy, skip_preflight, persist,
                        forks, timeout, no_probe)
        # one pool for facts and the rollout: each host's connection is opened once
        pool = make_pool(state().workspace, opts.forks, workers)
        try:
            plan, rid, hosts = _plan_and_store(target, limit, opts, store=not dry_run, pool=pool, no_probe=no_probe)
        except BaseException:
            pool.close()
            raise
    else:
        raise UsageError("name what to roll out", hint="kpipe rollout start RECIPE|ARTIFACT_ID, or --plan ID")
    try:
        _start(plan, rid, dry_run, yes, json_out, forks, pool, hosts, engine, no_progress, workers)
    finally:
        if pool is not None:
            pool.close()


def _start(plan: Any, rid: str, dry_run: bool, yes: bool, json_out: bool, forks: int | None, pool: Any,
           hosts: list[Host] | None, engine: str = "fabric", no_progress: bool = False,
           workers: int | None = None) -> None:
    from kpipe.rollout.world import check_preflight

    if not json_out:
        _print_plan(plan, rid or "(dry run, not stored)")
    check_preflight(plan)
    if dry_run:
        _dry_run(plan, rid, json_out, forks, pool, hosts, workers)
        return
    if not yes:
        _confirm(f"Roll out to {plural(len(plan.hosts), 'host')} in {plural(len(plan.waves), 'wave')}?", json_out,
                 f"rollout {rid}", hint=f"the plan is kept: `kpipe rollout start --plan {rid}`")
    if engine == "ansible" and pool is not None:
        pool.close()  # the planning connections are not used by Ansible
        pool = None
    _finish(_run_engine(rid, "start", forks, json_out=json_out, pool=pool, hosts=hosts, engine_name=engine,
                        no_progress=no_progress, workers=workers), json_out)


def _dry_run(plan: Any, rid: str, json_out: bool, forks: int | None, pool: Any, hosts: list[Any] | None,
             workers: int | None = None) -> None:
    """Print every host's steps (the exact argv): its preflight read runs, nothing that writes does."""
    from kpipe.plan import argv_lists, describe
    from kpipe.rollout.engine import Engine, PoolRunner
    from kpipe.rollout.world import engine_for, local_path_fn

    journal = _journal()
    if rid:
        engine, runner = engine_for(state().workspace, journal, rid, forks=forks, pool=pool, hosts=hosts,
                                    check_blobs=True, workers=workers)
    else:  # a plan made for this dry run only: its hosts and pool are at hand
        runner = PoolRunner(pool, {h.name: h for h in hosts or [] if h.name in plan.assignments}, forks)
        engine = Engine(journal, runner, local_path_fn(state().workspace.store))
    try:
        plans = engine.dry_run(plan)
    finally:
        if pool is None:
            runner.close()  # its own pool; the caller closes the planning pool
    refused = {h: str(v) for h, v in plans.items() if isinstance(v, BaseException)}
    if json_out:
        print_json({"plan": plan.to_dict(),
                    "commands": {h: argv_lists(v) for h, v in plans.items() if not isinstance(v, BaseException)},
                    "refused": refused})
        return
    con = state().console
    scripts: dict[str, str] = {}  # each script's exact text is printed once, after the hosts
    for host, steps in plans.items():
        con.print(f"[bold]{esc(host)}[/bold] (wave {plan.assignments[host].wave}):")
        if isinstance(steps, BaseException):
            con.print(f"  [red]would fail:[/red] {esc(str(steps))}")
            continue
        for i, line in enumerate(describe(steps, scripts), start=1):
            kind = "read" if not steps[i - 1].writes else "write"
            con.print(f"  {i:>2}. ({kind}) {line}", markup=False, highlight=False)
    for name, text in scripts.items():
        con.print(f"[bold]script {esc(name)}[/bold] (sh -c; its arguments are $1, $2, ...):")
        con.print(text.strip("\n"), markup=False, highlight=False)
    con.print("dry run: nothing was changed (of each host's steps only 1, the preflight read, ran)")


@rollout_app.command("resume")
def resume_cmd(rollout_id: str = typer.Argument(..., autocompletion=complete.rollouts, metavar="ID", click_type=WORD,
                                                help="Rollout id, or `last` (the last one started)."),
               forks: int | None = _FORKS,
               workers: int | None = _WORKERS,
               engine: str = _ENGINE,
               yes: bool = _YES,
               no_progress: bool = _NO_PROGRESS,
               json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Continue a rollout from its journal (re-reads every host's real state first).
    On a terminal it asks first unless --yes; without one it goes on (the rollout was confirmed at start)."""
    j = _journal()
    rid = _resolve(j, rollout_id)
    rec = _refuse_plan(j, rid, "resume")
    if not yes and _interactive():
        _confirm(f"Resume rollout {rid} ({rec.state}, target {rec.target})?", json_out, f"resume of rollout {rid}")
    _finish(_run_engine(rid, "resume", forks, json_out=json_out, engine_name=engine, no_progress=no_progress,
                        workers=workers), json_out)


@rollout_app.command("rollback")
def rollback_cmd(rollout_id: str = typer.Argument(..., autocompletion=complete.rollouts, metavar="ID", click_type=WORD,
                                                  help="Rollout id, or `last` (the last one started)."),
                 limit: str | None = typer.Option(None, "--limit", "-l",
                                                  autocompletion=complete.host_patterns, metavar="PATTERN",
                                                  help="Only these hosts: an Ansible pattern (group, glob, "
                                                       "a:b, a:&b, a:!b, @FILE)."),
                 forks: int | None = _FORKS,
                 workers: int | None = _WORKERS,
                 engine: str = _ENGINE,
                 yes: bool = _YES,
                 no_progress: bool = _NO_PROGRESS,
                 json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Roll back every host the rollout applied (disable, wait, unload, verify removal).
    On a terminal it asks first unless --yes; without one it goes on (a rollback is the way back)."""
    j = _journal()
    rid = _resolve(j, rollout_id)
    rec = _refuse_plan(j, rid, "roll back")
    picked = _rollback_hosts(rec, limit)  # a pattern that selects none of its hosts fails before the question
    if not yes and _interactive():
        _confirm(f"Roll back rollout {rid} ({rec.state}, target {rec.target})"
                 + (f" on hosts matching {limit}" if limit else "") + "?", json_out, f"rollback of rollout {rid}")
    s = _run_engine(rid, "rollback", forks, picked, json_out=json_out, engine_name=engine, no_progress=no_progress,
                    workers=workers)
    if json_out:
        print_json(s.to_dict())
    else:
        _print_summary(s)
    bad = [h for h, st in s.hosts.items() if st in ("failed", "unreachable")]
    if bad:
        from kpipe.errors import KpipeError

        raise KpipeError(f"rollback incomplete on {plural(len(bad), 'host')}: {', '.join(bad[:5])}",
                         hint=f"fix them, then `kpipe rollout resume {rid}`")


def _rollback_hosts(rec: Any, limit: str | None) -> frozenset[str] | None:
    """The rollout's hosts an Ansible pattern selects (None: all). Hosts that have left the inventory
    since the rollout still match by name or glob; NotFoundError when the pattern selects none of them."""
    if limit is None:
        return None
    import fnmatch

    from kpipe.errors import NotFoundError
    from kpipe.fleet.inventory import expand_limit_files, select_hosts
    from kpipe.rollout.planner import RolloutPlan

    ws = state().workspace
    pattern = expand_limit_files(limit) or ""
    plan_hosts = RolloutPlan.from_dict(rec.plan).hosts
    try:
        known = {h.name for h in select_hosts(ws)}
    except NotFoundError:  # no inventory any more: names and globs only
        known = set()
    try:
        chosen = {h.name for h in select_hosts(ws, pattern)} if known else set()
    except NotFoundError:
        chosen = set()
    globs = [t for t in pattern.split(":") if t and t[0] not in "&!~"]
    chosen |= {h for h in plan_hosts if h not in known and any(fnmatch.fnmatchcase(h, g) for g in globs)}
    picked = frozenset(h for h in plan_hosts if h in chosen)
    if not picked:
        raise NotFoundError(f"--limit {limit!r} matches no host of rollout {rec.id}",
                            hint=f"its hosts: {', '.join(plan_hosts[:10])}" + (" ..." if len(plan_hosts) > 10 else ""))
    return picked


@rollout_app.command("export")
def export_cmd(rollout_id: str = typer.Argument(..., autocompletion=complete.rollouts, metavar="ID", click_type=WORD,
                                              help="Rollout id, or `last` (the last one started)."),
               ansible_dir: Path = typer.Option(..., "--ansible", metavar="DIR",
                                                help="Write a self-contained Ansible project (playbook, inventory, "
                                                     "vars, module files) to this new folder."),
               json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON.")) -> None:
    """Export a stored rollout as an Ansible project for ansible-playbook or AWX / Automation Platform."""
    from kpipe.rollout.ansible_export import export_ansible
    from kpipe.rollout.planner import RolloutPlan

    j = _journal()
    rid = _resolve(j, rollout_id)
    plan = RolloutPlan.from_dict(j.get(rid).plan)
    if not plan.hosts:
        from kpipe.errors import ConfigError

        raise ConfigError(f"rollout {rid} has no eligible host", hint="see `kpipe rollout status`")
    summary = export_ansible(state().workspace, rid, plan, ansible_dir)
    if json_out:
        print_json(summary)
        return
    state().console.print(f"wrote {esc(summary['folder'])}: {summary['hosts']} host(s) in waves "
                          f"{summary['waves']}; run `ansible-playbook playbook.yml` there", markup=True)


@rollout_app.command("abort")
def abort_cmd(rollout_id: str = typer.Argument(..., autocompletion=complete.rollouts, metavar="ID", click_type=WORD,
                                               help="Rollout id, or `last` (the last one started).")) -> None:
    """Ask the driving kpipe to stop after its in-flight hosts."""
    j = _journal()
    rid = _resolve(j, rollout_id)
    st = j.abort(rid)
    state().console.print(f"rollout {esc(rid)}: abort requested (state {esc(st)})")


@rollout_app.command("status")
def status_cmd(rollout_id: str = typer.Argument("last", autocompletion=complete.rollouts, metavar="ID", click_type=WORD,
                                                help="Rollout id, or `last` (the last one started)."),
               json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """A rollout's state and every host's final state."""
    from kpipe.cli.listings import rollout_status  # the body kpipe.cli.fast runs without Typer too

    rollout_status(rollout_id, json_out=json_out)


@rollout_app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Rollouts, newest first."""
    j = _journal()
    recs = j.list()
    if json_out:
        print_json([r.to_dict() for r in recs])
        return
    import time as _time

    # a Rich table on a terminal; piped, tab-separated lines (print_table), as scripts read them
    print_table(["id", "created", "state", "target", "hosts"],
                [[r.id, _time.strftime("%Y-%m-%d %H:%M:%S", _time.gmtime(r.created_at)), r.state, r.target,
                  str(sum(len(w) for w in r.plan.get("waves", [])))] for r in recs], no_wrap=("id",))
