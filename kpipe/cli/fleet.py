"""kpipe fleet commands: list hosts from the inventories, read their facts.

Exit codes: `fleet list` exits 5 when --limit matches nothing and 4 for a malformed
inventory. `fleet facts` exits 0 when at least one selected host reported facts, even if
others were unreachable or answered nonsense (each host's status is in the table / JSON:
partial failure is data); it exits 6 when no host reported facts, and with --strict when
any host failed. Each failing host is reported on one line.
"""

from __future__ import annotations

import typer

from kpipe.cli import complete
from kpipe.cli.context import plural

fleet_app = typer.Typer(help="The fleet: hosts from kpipe's fleet file and Ansible inventories, and their facts.",
                        no_args_is_help=True)

_LIMIT = typer.Option(None, "--limit", "-l", autocompletion=complete.host_patterns, metavar="PATTERN",
                      help="Ansible host pattern: group, host, glob, ~regex, a:b, a:&b, a:!b.")
_INVENTORY = typer.Option(None, "--inventory", "-i", metavar="FILE",
                          help="Inventory source(s) to read instead of the workspace's (repeatable).")
_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")


@fleet_app.command("list")
def list_hosts(limit: str | None = _LIMIT, inventory: list[str] | None = _INVENTORY,
               as_json: bool = _JSON) -> None:
    """List the hosts a pattern selects, with their connection settings and groups."""
    from kpipe.cli.context import esc, print_json, state
    from kpipe.cli.fleetfacts import select

    hosts = select(limit, inventory)
    if as_json:
        print_json({"hosts": [h.to_dict() for h in hosts]})
        return
    from rich.table import Table

    table = Table(title=plural(len(hosts), "host"), title_justify="left")
    for col in ("host", "address", "port", "user", "become", "groups"):
        table.add_column(col)
    for h in hosts:
        table.add_row(esc(h.name), esc(h.address), str(h.port), esc(h.user or ""), "yes" if h.become else "",
                      esc(", ".join(h.groups)))
    state().console.print(table)


@fleet_app.command("facts")
def facts(limit: str | None = _LIMIT, inventory: list[str] | None = _INVENTORY,
          forks: int | None = typer.Option(None, "--forks", "-f", metavar="N", min=1, max=1000,
                                              help="Hosts in flight at once (default: 50, or forks in the ssh "
                                                   "section of kpipe.toml)."),
          as_json: bool = _JSON,
          strict: bool = typer.Option(False, "--strict", help="Exit 6 if any host was unreachable or failed."),
          timeout: float = typer.Option(60.0, "--timeout", metavar="SECONDS", min=1.0,
                                        help="Seconds the facts command may run on one host."),
          workers: int | None = typer.Option(None, "--workers", metavar="N", min=1, max=256,
                                             help="Worker processes for the SSH fan-out (default: workers in "
                                                  "the fleet section of kpipe.toml, else one per core; "
                                                  "1 = in-process)."),
          ) -> None:
    """Read kernel, arch, distro, livepatch state, taint, kpatch CLI, SELinux, sig_enforce and free space."""
    from kpipe.cli.fleetfacts import fleet_facts

    fleet_facts(limit, inventory, forks, as_json, strict, timeout, workers)


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.add_typer(fleet_app, name="fleet")
