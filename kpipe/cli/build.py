"""kpipe build and kpipe builds: the Typer commands (the build's body is kpipe.cli.building)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from kpipe.cli import complete

if TYPE_CHECKING:  # imported inside the commands: `kpipe --help` stays fast
    from kpipe.store import Store


def build(
    kernel: str | None = typer.Option(None, "--kernel", "-k", autocompletion=complete.kernels, metavar="RELEASE",
                                      help="Target kernel release."),
    recipe: str | None = typer.Option(None, "--recipe", "-r", autocompletion=complete.recipes, metavar="RECIPE",
                                      help="Recipe name (default: every recipe "
                                         "targeting --kernel)."),
    all_kernels: bool = typer.Option(False, "--all-kernels", help="Build --recipe for every catalog kernel it "
                                     "targets."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when the store has this exact build."),
    host: str | None = typer.Option(None, "--host", metavar="HOST", help="Build only on this build host."),
    jobs: int | None = typer.Option(None, "--jobs", "-j", metavar="N", min=1, help="make jobs per build (overrides the "
                                       "recipe; does not change the cache key)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print every line of the builder's output."),
    fleet: str | None = typer.Option(None, "--fleet", metavar="PATTERN",
                                     help="Build every recipe for the kernels the hosts matching PATTERN run "
                                          "(an inventory pattern; with --recipe, only that recipe)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Build live patch modules on the workspace's build hosts (reattaches to running builds)."""
    from kpipe.cli.building import build_command

    build_command(kernel=kernel, recipe=recipe, all_kernels=all_kernels, force=force, host=host, jobs=jobs,
                  verbose=verbose, fleet=fleet, json_out=json_out)


def builds(
    status: str | None = typer.Option(None, "--status", metavar="STATUS",
                                      help="Only running, succeeded or failed builds."),
    log: str | None = typer.Option(None, "--log", metavar="ID", help="Print the stored log of the build whose "
                                      "id (inputs digest prefix) is ID."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List recorded builds (running ones can be reattached with the same `kpipe build`)."""
    from kpipe.builder.records import list_builds
    from kpipe.cli.context import print_json, print_markup, print_table, state

    st = state()
    rows = list_builds(st.workspace.store, status=status)
    if log is not None:
        _print_build_log(st.workspace.store, rows, log)
        return
    if json_out:
        print_json(rows)
        return
    if not rows:
        print_markup("no builds recorded")
        return
    # a Rich table on a terminal; piped, tab-separated lines (print_table), as scripts read them
    print_table(["id", "recipe", "kernel", "host", "status", "category", "artifact", "folder on host", "pid"],
                [[r["inputs_digest"][:12], r["recipe"], r["kernel"], r["host"], r["status"], r["category"],
                  r["artifact_id"], r["remote_dir"], str(r["pid"] or "")] for r in rows])


def _print_build_log(store: Store, rows: list[dict[str, Any]], ref: str) -> None:
    import sys

    from kpipe.errors import ConfigError, NotFoundError

    ref = ref.strip().lower()
    hits = [r for r in rows if r["inputs_digest"].startswith(ref)] if len(ref) >= 4 else []
    if not hits:
        raise NotFoundError(f"no recorded build {ref!r}", hint="ids are in the first column of `kpipe builds`")
    if len({r["inputs_digest"] for r in hits}) > 1:
        raise ConfigError(f"build id prefix {ref!r} is ambiguous", hint="give more digits")
    done = [r for r in hits if r["log_sha256"]]
    if not done:
        raise NotFoundError(f"build {ref} has no stored log yet (still running?)",
                            hint=f"the live log is {hits[0]['remote_dir']}/log on {hits[0]['host']}")
    sys.stdout.buffer.write(store.get_bytes(done[0]["log_sha256"]))
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    """Add `kpipe build` and `kpipe builds` to the root app."""
    app.command("build")(build)
    app.command("builds")(builds)
