"""kpipe init: start a workspace from nothing."""

from __future__ import annotations

from pathlib import Path

import typer

from kpipe.cli.context import print_json, state
from kpipe.cli.params import WORD


def init_cmd(
    folder: str = typer.Argument(".", metavar="[DIR]", click_type=WORD,
                                 help="Folder of the new workspace (default: here)."),
    force: bool = typer.Option(False, "--force", help="Rewrite kpipe.toml and the example files if they exist."),
    json_out: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Write a commented kpipe.toml (a local build host, the installed kernels, a lab signer, an empty fleet),
    recipes/ with one example and patches/."""
    from kpipe.init import init_workspace
    from kpipe.workspace import discover_local_kernels

    kernels = sorted(k.release for k in discover_local_kernels())
    result = init_workspace(Path(folder), kernels, force=force)
    if json_out:
        print_json(result)
        return
    out = state().console
    out.print(f"workspace {result.root}", markup=False)
    for rel in result.written:
        out.print(f"  wrote {rel}", markup=False)
    out.print(f"kernels installed here: {', '.join(kernels) or 'none'}", markup=False)
    out.print("next: kpipe keys generate --signer lab; kpipe recipe render cmdline-demo --kernel RELEASE; "
              "kpipe build --recipe cmdline-demo --kernel RELEASE", markup=False)


def register(app: typer.Typer) -> None:
    """Add `kpipe init` to the root app."""
    app.command("init")(init_cmd)
