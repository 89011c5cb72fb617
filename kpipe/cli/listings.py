"""The bodies of the read-only commands scripts run most (`artifacts list`, `rollout status`, `kernels parse`).

No Typer here: the Typer commands (kpipe.cli.artifacts, kpipe.cli.rollout, kpipe.cli.kernels) call these
functions, and so does kpipe.cli.fast, which runs them straight from a plain argv without loading Typer
(start-up budget, tests/test_startup_budget.py). One body per command, whichever way it was reached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kpipe.cli.context import esc, print_fields, print_json, print_markup, print_table, state

if TYPE_CHECKING:
    from kpipe.rollout.journal import Journal


def artifacts_list(kernel: str | None = None, recipe: str | None = None, status: str | None = None,
                   json_out: bool = False) -> None:
    """`kpipe artifacts list`: artifacts, newest first."""
    from kpipe.artifacts import list_artifacts

    st = state()
    arts = list_artifacts(st.workspace.store, kernel=kernel, recipe=recipe, status=status)
    if json_out:
        print_json([a.to_dict() for a in arts])
        return
    if not arts:
        print_markup("no artifacts" + (" match" if kernel or recipe or status else " yet; run `kpipe build`"))
        return
    # cells are plain text (never markup); Rich draws them only on a terminal
    print_table(["id", "module", "kernel", "recipe", "status", "signed", "host", "built"],
                [[a.id, a.module_name, a.kernel, a.recipe, str(a.status), "yes" if a.signed else "", a.build_host,
                  when(a.created_at)] for a in arts])


def when(ts: float) -> str:
    """A store timestamp as UTC `YYYY-MM-DD HH:MM:SSZ` ("" for none)."""
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else ""


def journal() -> Journal:
    """The workspace's rollout journal."""
    from kpipe.rollout.journal import Journal

    return Journal(state().workspace.store)


def resolve_rollout(j: Journal, ref: str) -> str:
    """A rollout id from an id, a unique prefix, or `last`: the rollout started (or resumed) most
    recently. A stored plan that never ran is not `last`: rolling it back or resuming it means nothing."""
    if (ref or "").strip() != "last":
        return j.resolve(ref)
    return j.last_started()


def rollout_status(rollout_id: str = "last", json_out: bool = False) -> None:
    """`kpipe rollout status`: a rollout's state and every host's final state."""
    from kpipe.rollout.summary import summarize  # the journal alone: no engine, planner or transport

    j = journal()
    rid = resolve_rollout(j, rollout_id)
    rec = j.get(rid)
    s = summarize(j, rid)
    owner = j.live_owner(rid)  # a killed kpipe's pid is not a driver
    if json_out:
        print_json({**rec.to_dict(), "owner_pid": owner, "hosts": s.hosts, "reasons": s.reasons})
        return
    print_markup(f"rollout {esc(rid)}: [bold]{esc(rec.state)}[/bold] (target {esc(rec.target)})"
                 + (f", driven by pid {owner}" if owner else "")
                 + (", abort requested" if rec.abort_requested else ""))
    if rec.detail.get("halt_reason"):
        print_markup(f"  halted: {esc(rec.detail['halt_reason'])}")
    if rec.state == "interrupted":
        print_markup(f"  interrupted: continue with `kpipe rollout resume {esc(rid)}`")
    print_table(["host", "state", "reason"], [[h, str(st), s.reasons.get(h, "")] for h, st in s.hosts.items()])


def kernels_parse(release: str, json_out: bool = False) -> None:
    """`kpipe kernels parse`: version, distro, flavour, architecture of a kernel release."""
    from kpipe.kernel import parse_release

    k = parse_release(release)
    if json_out:
        print_json(k.to_dict())
        return
    rows = [(key, ".".join(str(v) for v in value) if key == "version" else str(value if value != "" else "-"))
            for key, value in k.to_dict().items()]
    print_fields(rows)  # Rich only on a terminal: piped, `key: value` lines
