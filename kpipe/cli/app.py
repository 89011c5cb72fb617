"""The kpipe command line: one Typer app, one module per command group.

Command modules import their heavy dependencies inside the commands, so that
`kpipe --help` and shell completion stay instant.
"""

from __future__ import annotations

import os
import sys
from typing import Protocol

import typer

from kpipe import __version__
from kpipe.cli.context import STATE

app = typer.Typer(
    name="kpipe",
    help="Build, validate, sign and roll out kernel live patches to Linux fleets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    workspace: str | None = typer.Option(
        None, "--workspace", "-W", envvar="KPIPE_WORKSPACE", help="Workspace folder (holds kpipe.toml)."
    ),
    debug: bool = typer.Option(False, "--debug", envvar="KPIPE_DEBUG", help="Show tracebacks."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    STATE.workspace_arg = workspace
    STATE.debug = debug


def _register() -> None:
    # Each module adds its commands or sub-app; the import is cheap by design.
    from kpipe.cli import (  # noqa: F401
        artifacts,
        audit,
        build,
        fleet,
        init,
        kernels,
        keys,
        lab,
        recipe,
        rollout,
        sign,
        validate,
    )

    for mod in (init, kernels, recipe, build, artifacts, validate, sign, keys, fleet, rollout, audit, lab):
        mod.register(app)


_register()


def main() -> None:
    """Console-script entry point: run the app, map KpipeError to one line and its exit code."""
    from kpipe.errors import ExitCode, KpipeError

    debug = os.environ.get("KPIPE_DEBUG", "") not in ("", "0")
    _click_completion_order()
    try:
        rc = app(standalone_mode=False)
    except KpipeError as e:
        if debug or STATE.debug:
            import traceback

            traceback.print_exc()
        _print_error(str(e), e.hint)
        sys.exit(int(e.exit_code))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _print_error("aborted", None)
        sys.exit(int(ExitCode.INTERRUPTED))
    except KeyboardInterrupt:
        _print_error("interrupted", None)
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception as e:  # click usage errors and the unexpected
        click_error = _click_exception_types()
        if isinstance(e, click_error):
            _print_click_error(e)
            sys.exit(e.exit_code)
        if debug or STATE.debug:
            raise
        _print_error(f"internal error: {type(e).__name__}: {e}", "rerun with KPIPE_DEBUG=1 for a traceback")
        sys.exit(int(ExitCode.FAILURE))
    if rc == ExitCode.INTERRUPTED:  # Typer turns Ctrl-C into a silent return of 130
        _print_error("interrupted", None)
    sys.exit(_exit_code(rc))


class _ClickError(Protocol):
    """What main() uses of a click usage error (click's own class or Typer's vendored copy)."""

    exit_code: int

    def format_message(self) -> str: ...


def _click_exception_types() -> tuple[type[_ClickError], ...]:
    """ClickException classes: click's own, and the copy newer Typer releases vendor."""
    # Both are genuine version differences, not missing kpipe code: Typer < 0.26 depends on click and has
    # no vendored copy; Typer >= 0.26 vendors click and no longer installs it.
    types: list[type[_ClickError]] = []
    try:
        import click

        types.append(click.exceptions.ClickException)
    except ImportError:  # Typer >= 0.26 without a separately installed click
        pass
    try:
        from typer._click import exceptions as vendored

        types.append(vendored.ClickException)
    except ImportError:  # Typer < 0.26
        pass
    return tuple(types)


def _click_completion_order() -> None:
    """Accept click's `_KPIPE_COMPLETE=bash_complete` (SHELL_INSTRUCTION) too: Typer reads INSTRUCTION_SHELL."""
    shell, _, instruction = os.environ.get("_KPIPE_COMPLETE", "").partition("_")
    if shell in ("bash", "zsh", "fish", "powershell", "pwsh") and instruction in ("complete", "source"):
        os.environ["_KPIPE_COMPLETE"] = f"{instruction}_{shell}"


def _print_click_error(e: _ClickError) -> None:
    """click's usage errors in kpipe's one-line format, with the command's --help as the hint."""
    message = e.format_message()
    if not message.strip():  # `kpipe GROUP` without a command: its help was printed, nothing is wrong to say
        return
    ctx = getattr(e, "ctx", None)
    hint = f"see `{ctx.command_path} --help`" if ctx is not None else "see `kpipe --help`"
    _print_error(message, hint)


def _exit_code(rc: object) -> int:
    return rc if isinstance(rc, int) else 0


def _print_error(message: str, hint: str | None) -> None:
    sys.stderr.write(f"kpipe: error: {message}\n")
    if hint:
        sys.stderr.write(f"  hint: {hint}\n")
    sys.stderr.flush()
