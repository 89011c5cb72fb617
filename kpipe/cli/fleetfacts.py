"""The body of `kpipe fleet facts`, without Typer.

The Typer command (kpipe.cli.fleet) calls `fleet_facts`, and so does kpipe.cli.fast, which runs a plain
`kpipe fleet facts ...` argv without loading Typer: monitoring scripts and the fleet benchmarks run this
command often, and Typer's import and command building are ~40-60 ms of CPU on one core before the first
connection opens (start-up budget, tests/test_startup_budget.py). One body, whichever way it was reached.
"""

from __future__ import annotations

import os
from typing import Any

from kpipe.cli.context import plural


def select(limit: str | None, inventory: list[str] | None) -> list[Any]:
    """The hosts `--limit` selects, from the workspace's inventories or the `-i` sources given."""
    from kpipe.cli.context import state
    from kpipe.fleet.inventory import select_hosts

    if not inventory:
        return select_hosts(state().workspace, limit, None)
    # -i paths are the user's, relative to the current folder (as `ansible -i`); with them no
    # workspace is needed.
    sources = [os.path.abspath(os.path.expanduser(p)) for p in inventory]
    return select_hosts(state().optional_workspace(), limit, sources)


def fleet_facts(limit: str | None = None, inventory: list[str] | None = None, forks: int | None = None,
                as_json: bool = False, strict: bool = False, timeout: float = 60.0, workers: int | None = None) -> None:
    """Read kernel, arch, distro, livepatch state, taint, kpatch CLI, SELinux, sig_enforce and free space."""
    import time

    from kpipe.cli.context import print_json, state
    from kpipe.errors import ExitCode, KpipeError
    from kpipe.fleet.facts import HostFacts
    from kpipe.fleet.observe import gather_facts, pool_for

    st = state()
    hosts = select(limit, inventory)
    start = time.monotonic()
    with pool_for(st.workspace, forks, workers) as pool:
        results = gather_facts(st.workspace, hosts, forks, pool=pool, timeout=timeout)
    elapsed = time.monotonic() - start
    failed = [n for n, r in results.items() if not isinstance(r, HostFacts)]
    _record(st.workspace, results)
    if as_json:
        print_json({
            "hosts": {n: ({"ok": True, "facts": r.to_dict()} if isinstance(r, HostFacts)
                          else {"ok": False, "kind": getattr(r, "kind", "error"), "error": str(r)})
                      for n, r in results.items()},
            "summary": {"hosts": len(results), "ok": len(results) - len(failed), "failed": len(failed),
                        "seconds": round(elapsed, 3)},
        })
    else:
        _facts_table(st.console, results, elapsed)
    if failed and len(failed) == len(results):
        raise KpipeError(f"none of the {plural(len(results), 'host')} reported facts", exit_code=ExitCode.UNREACHABLE,
                         hint="each host's reason is in the output above; check addresses, ports and that sshd runs")
    if strict and failed:
        raise KpipeError(f"{len(failed)} of {plural(len(results), 'host')} did not report facts: "
                         f"{', '.join(failed[:10])}"
                         + (" ..." if len(failed) > 10 else ""), exit_code=ExitCode.UNREACHABLE,
                         hint="see each host's status above; drop --strict to exit 0 with partial results")


def _record(workspace: Any, results: dict[str, Any]) -> None:
    """Keep the latest facts per host in the state store (kpipe.fleet.factstore)."""
    from kpipe.cli.context import esc, state
    from kpipe.fleet.factstore import record_facts

    try:
        record_facts(workspace.store, results)
    except Exception as e:  # noqa: BLE001 -- facts were read; failing to remember them must not hide them
        state().err_console.print(f"[yellow]warning:[/] facts not recorded in the store: {esc(e)}")


def _facts_table(console: Any, results: dict[str, Any], elapsed: float) -> None:
    from rich.table import Table

    from kpipe.cli.context import esc as escape
    from kpipe.fleet.facts import HostFacts

    ok = sum(isinstance(r, HostFacts) for r in results.values())
    table = Table(title=f"facts: {ok}/{plural(len(results), 'host')} answered in {elapsed:.1f} s", title_justify="left")
    # Failed hosts show their failure kind in the kernel column; the reasons follow the table.
    for col in ("host", "kernel", "arch", "distro", "livepatch", "taint", "kpatch", "selinux", "sig", "free"):
        table.add_column(col, overflow="fold", no_wrap=col not in ("livepatch", "kernel", "distro"),
                         min_width={"kernel": 14, "livepatch": 9}.get(col))
    failures = []
    for name, r in results.items():
        if not isinstance(r, HostFacts):
            kind = getattr(r, "kind", "error")
            table.add_row(escape(name), f"[red]{escape(kind)}[/]", *[""] * 8)
            failures.append((name, kind, str(r)))
            continue
        if not r.livepatch_sysfs:
            lp = "[yellow]no sysfs[/]"
        elif not r.patches:
            lp = "none"
        else:
            lp = ", ".join(f"{escape(p.name)} ({_patch_state(p)})" for p in r.patches.values())
        free = "" if r.free_kb is None else _size(r.free_kb)
        sig = {None: "-", True: "Y", False: "N"}[r.sig_enforce]
        table.add_row(escape(name), escape(r.release), escape(r.arch),
                      escape(f"{r.os_id} {r.os_version}".strip()), lp, escape(r.taint_flags or "-"),
                      "yes" if r.kpatch_cli else "no", escape(r.selinux), sig, free)
    console.print(table)
    for name, kind, message in failures:
        prefix = f"{name}: "
        console.print(f"[red]{escape(name)}[/] {escape(kind)}: "
                      f"{escape(message.removeprefix(prefix))}")


def _size(kib: int) -> str:
    for unit, div in (("T", 1 << 30), ("G", 1 << 20), ("M", 1 << 10)):
        if kib >= div:
            return f"{kib / div:.1f}{unit}"
    return f"{kib}K"


def _patch_state(p: Any) -> str:
    if p.transition == 1:
        return "in transition"
    return {1: "enabled", 0: "disabled"}.get(p.enabled, "?")
