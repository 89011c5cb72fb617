"""kpipe unpersist: remove what `rollout start --persist` installed for boot (the live patch stays loaded)."""

from __future__ import annotations

from typing import Any

import typer

from kpipe.cli import complete
from kpipe.cli.context import esc, print_json, state
from kpipe.cli.params import WORD


def register(app: typer.Typer) -> None:
    """Add this command to the root app."""
    app.command("unpersist", help=UNPERSIST_HELP)(unpersist_cmd)


UNPERSIST_HELP = ("Remove what `rollout start --persist` installed for boot (kpipe's unit and file, or kpatch "
                  "uninstall) on a rollout's hosts; the live patch stays loaded.")


def rollouts_of(journal: Any, target: str) -> list[str]:
    """The rollouts a TARGET names: a rollout id (prefix, `last`), else every rollout shipping that artifact."""
    from kpipe.errors import NotFoundError

    try:
        return [journal.resolve(target)]
    except NotFoundError:
        pass
    from kpipe.artifacts import get_artifact
    from kpipe.rollout.planner import RolloutPlan

    try:
        art = get_artifact(state().workspace.store, target)
    except NotFoundError:
        raise NotFoundError(f"{target!r} is neither a rollout nor an artifact",
                            hint="see `kpipe rollout list` and `kpipe artifacts list`") from None
    out = []
    for rec in journal.list(limit=10_000):
        if any(a.artifact.id == art.id for a in RolloutPlan.from_dict(rec.plan).assignments.values()):
            out.append(rec.id)
    if not out:
        raise NotFoundError(f"no rollout shipped artifact {art.id}", hint="nothing of it is persisted by kpipe")
    return sorted(out)


def unpersist_cmd(
    targets: list[str] = typer.Argument(..., autocompletion=complete.rollouts, metavar="TARGET...", click_type=WORD,
                                        help="Rollout ids (or `last`) or artifact ids."),
    limit: str | None = typer.Option(None, "--limit", "-l", autocompletion=complete.host_patterns,
                                     metavar="PATTERN", help="Only these hosts (an Ansible pattern)."),
    forks: int | None = typer.Option(None, "--forks", "-f", min=1, metavar="N", help="Hosts at a time."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Remove the boot-time persistence of a rollout's (or an artifact's) module on its hosts, journaled."""
    from kpipe.cli.progress import RolloutProgress, live_wanted
    from kpipe.cli.rollout import _journal, _rollback_hosts
    from kpipe.errors import KpipeError
    from kpipe.rollout.world import engine_for

    journal = _journal()
    rids = list(dict.fromkeys(r for t in targets for r in rollouts_of(journal, t)))
    results: dict[str, Any] = {}
    bad: list[str] = []
    for rid in rids:
        picked = _rollback_hosts(journal.get(rid), limit)
        with RolloutProgress(live=live_wanted(False), json_out=json_out) as progress:
            engine, runner = engine_for(state().workspace, journal, rid, forks=forks, on_event=progress.callback)
            try:
                s = engine.unpersist(rid, picked)
            finally:
                runner.close()
        results[rid] = s.to_dict()
        bad += [f"{h} ({esc(s.reasons.get(h, st))})" for h, st in s.hosts.items() if st != "unpersisted"]
        if not json_out:
            con = state().console
            if not s.hosts:
                con.print(f"rollout {esc(rid)}: nothing persisted")
            for h, st in sorted(s.hosts.items()):
                con.print(f"rollout {esc(rid)}: {esc(h)} [{'green' if st == 'unpersisted' else 'red'}]"
                          f"{esc(st)}[/] {esc(s.reasons.get(h, ''))}")
    if json_out:
        print_json({"rollouts": results})
    if bad:
        raise KpipeError(f"unpersist failed on {len(bad)} host(s): {', '.join(bad[:5])}",
                         hint="fix the hosts and run `kpipe unpersist` again (it is idempotent)")
