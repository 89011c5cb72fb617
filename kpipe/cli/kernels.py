"""kpipe kernels: parse release strings, show the kernel catalog (and `kernels symbols`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from kpipe.cli.context import print_json, print_table, state
from kpipe.cli.params import WORD
from kpipe.cli.symbols import app as symbols_app

if TYPE_CHECKING:
    from kpipe.workspace import Workspace

kernels_app = typer.Typer(help="Kernel releases and the workspace's kernel catalog.", no_args_is_help=True)


@kernels_app.command("parse")
def parse_cmd(
    release: str = typer.Argument(..., metavar="RELEASE", click_type=WORD,
                                  help="A kernel release as `uname -r` prints it."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Parse a kernel release: version, distro, flavour, architecture."""
    from kpipe.cli.listings import kernels_parse  # the body kpipe.cli.fast runs without Typer too

    kernels_parse(release, json_out=json_out)


def catalog_rows(ws: Workspace) -> list[dict[str, Any]]:
    """The kernel catalog as plain rows: fields, local presence of each path, build hosts that accept it."""
    from kpipe.errors import ConfigError
    from kpipe.kernel import parse_release

    rows = []
    for release in sorted(ws.kernels):
        e = ws.kernels[release]
        try:
            k = parse_release(release)
        except ConfigError as err:
            raise ConfigError(f"{ws.file}: [[kernels]] release: {err}", hint=err.hint) from None
        paths = {}
        for key in ("headers", "source", "vmlinux", "config"):
            value = getattr(e, key)
            # Paths name files on the build host; presence is checked here only as a hint.
            paths[key] = {"path": value, "present_here": bool(value) and Path(value).exists()}
        rows.append({
            "release": release,
            "arch": e.arch or k.arch,
            "distro": e.distro or k.distro,
            "version": list(k.version),
            "flavour": k.flavour,
            "builder": e.builder,
            "paths": paths,
            "discovered": bool(e.options.get("discovered")) if isinstance(e.options, dict) else False,
            "build_hosts": [h.name for h in ws.build_hosts if h.accepts(release, e.arch or k.arch)],
        })
    return rows


@kernels_app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the kernel catalog: the kernels of kpipe.toml plus locally installed headers."""
    st = state()
    rows = catalog_rows(st.workspace)
    if json_out:
        print_json(rows)
        return
    columns = ["release", "arch", "distro", "builder", "headers", "source", "vmlinux", "config", "build hosts"]
    if not st.is_terminal:
        # piped: one tab-separated line per kernel (print_table), no Rich; `--json` also says which were discovered
        print_table(columns, [[r["release"], r["arch"], r["distro"], r["builder"] or "-",
                               *(_where(r["paths"][k]) for k in ("headers", "source", "vmlinux", "config")),
                               ", ".join(r["build_hosts"]) or "none"] for r in rows])
        return
    from rich.table import Table
    from rich.text import Text

    def mark(p: dict[str, Any]) -> Text:
        return Text(_where(p), style={"-": "dim", "here": "green"}.get(_where(p), "yellow"))

    table = Table(title=Text(f"kernels in {st.workspace.file}"))
    table.add_column("release", no_wrap=True)
    for col in columns[1:]:
        table.add_column(col)
    for r in rows:
        table.add_row(Text(r["release"] + (" *" if r["discovered"] else "")), Text(r["arch"]), Text(r["distro"]),
                      Text(r["builder"] or "-"), *(mark(r["paths"][k]) for k in ("headers", "source", "vmlinux",
                                                                                   "config")),
                      Text(", ".join(r["build_hosts"]) or "none", style="" if r["build_hosts"] else "red"))
    st.console.print(table)
    if any(r["discovered"] for r in rows):
        st.console.print("* discovered from headers installed on this machine", style="dim")


def _where(path: dict[str, Any]) -> str:
    """Where a catalog path is: `-` (not set), `here` (present on this machine) or `remote` (the build host's)."""
    if not path["path"]:
        return "-"
    return "here" if path["present_here"] else "remote"


kernels_app.add_typer(symbols_app, name="symbols", help="Kernel symbol indexes (kallsyms, Module.symvers).")


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.add_typer(kernels_app, name="kernels")
