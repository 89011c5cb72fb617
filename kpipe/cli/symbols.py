"""kpipe kernels symbols: kernel symbol indexes (fetch from a host, add files, list)."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

import typer

from kpipe.cli.context import print_json, state
from kpipe.cli.params import WORD
from kpipe.host import Host

if TYPE_CHECKING:
    from kpipe.workspace import Workspace

app = typer.Typer(help="Kernel symbol indexes used by validation (kallsyms, vmlinux, Module.symvers).",
                  no_args_is_help=True)


def _target(ws: Workspace, spec: str) -> Host:
    """A host from the fleet inventory (by host name), or from user@address[:port]."""
    from kpipe.errors import ConfigError, NotFoundError

    m = re.fullmatch(r"(?:([^@\s]+)@)?(\[[0-9a-fA-F:.]+\]|[^:@\s]+)(?::(\d+))?", spec)
    host = None
    if "@" not in spec and ":" not in spec:
        from kpipe.fleet.inventory import load_inventory

        try:
            host = load_inventory(ws).get(spec)
        except NotFoundError:
            host = None
        except ConfigError:
            host = None
    if host is not None:
        return replace(host, identity_file=host.identity_file or ws.ssh.identity_file)
    if m is None:
        raise ConfigError(f"--from {spec!r} is neither an inventory host nor user@address[:port]")
    user, address, port = m.group(1) or "root", m.group(2).strip("[]"), int(m.group(3) or 22)
    return Host(name=spec, address=address, port=port, user=user, identity_file=ws.ssh.identity_file)


@app.command("fetch")
def fetch_cmd(
    release: str = typer.Argument(..., metavar="RELEASE", click_type=WORD, help="Kernel release the host runs."),
    from_: str = typer.Option(..., "--from", metavar="HOST", help="Inventory host name, or user@address[:port]."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Read /proc/kallsyms and Module.symvers from a host into the symbol index."""
    from kpipe.elf.symbols import fetch_from_host, save_source
    from kpipe.transport.ssh import SshPool

    ws = state().workspace
    target = _target(ws, from_)
    pool = SshPool(ws.ssh)
    try:
        sources = fetch_from_host(pool.transport(target), release)
    finally:
        pool.close()
    rows = []
    for src in sources:
        sid = save_source(ws.store, release, src)
        rows.append({"id": sid, "kind": src.kind, "origin": src.origin, "exports": len(src.exports),
                     "symbols": src.symbol_total})
    if json_out:
        print_json({"release": release, "sources": rows})
        return
    for r in rows:
        state().console.print(f"{release}: {r['kind']} from {r['origin']} ({r['exports']} exports, "
                              f"{r['symbols']} symbols)", markup=False)


@app.command("add")
def add_cmd(
    release: str = typer.Argument(..., metavar="RELEASE", click_type=WORD, help="Kernel release the files describe."),
    files: list[str] = typer.Argument(..., metavar="FILE...", click_type=WORD,
                                      help="Module.symvers, kallsyms copy, System.map or vmlinux."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Index local symbol files for a release (parsed once, cached by content digest)."""
    from kpipe.elf.symbols import add_file, list_sources

    ws = state().workspace
    ids = [add_file(ws.store, release, f) for f in files]
    rows = [r for r in list_sources(ws.store, release) if r["id"] in ids]
    if json_out:
        print_json(rows)
        return
    for r in rows:
        state().console.print(f"{release}: {r['kind']} {r['origin']} ({r['exports']} exports, {r['symbols']} symbols)",
                              markup=False)


@app.command("list")
def list_cmd(
    release: str | None = typer.Argument(None, metavar="RELEASE", click_type=WORD, help="Only this release."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the cached symbol sources."""
    from kpipe.elf.symbols import list_sources

    rows = list_sources(state().workspace.store, release)
    if json_out:
        print_json(rows)
        return
    from rich.table import Table
    from rich.text import Text

    table = Table()
    for col in ("release", "kind", "origin", "exports", "symbols", "digest"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(Text(str(v)) for v in (r["release"], r["kind"], r["origin"], r["exports"], r["symbols"],
                                                r["digest"][:12])))
    state().console.print(table)
