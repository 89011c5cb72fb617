"""kpipe validate: prove a module is sound for its kernel (exit 0 valid, 3 invalid)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from kpipe.cli import complete
from kpipe.cli.context import plural, print_json, state
from kpipe.cli.params import WORD

if TYPE_CHECKING:
    from kpipe.validation import ValidationReport
    from kpipe.workspace import Workspace

_STYLE = {"error": "bold red", "warning": "yellow", "info": "green", "skipped": "dim"}


def _workspace_or_none() -> Workspace | None:
    from kpipe.errors import ConfigError

    try:
        return state().workspace
    except ConfigError:
        return None


def render_report(report: ValidationReport, verbose: bool = False) -> None:
    """A Rich table of findings, then the verdict; the checks that passed (info) only with `verbose`."""
    from rich.table import Table
    from rich.text import Text

    console = state().console
    table = Table(title=Text(f"{report.module_name or report.module} -> {report.kernel}"), title_justify="left")
    table.add_column("severity")
    table.add_column("check")
    table.add_column("finding", overflow="fold")
    order = {"error": 0, "warning": 1, "skipped": 2, "info": 3}
    shown = [f for f in report.findings if verbose or f.severity != "info"]
    for f in sorted(shown, key=lambda f: order.get(f.severity, 9)):
        msg = Text(f.message)
        if f.hint and f.severity != "info":
            msg.append(f"\n  hint: {f.hint}", style="dim")
        table.add_row(Text(f.severity, style=_STYLE.get(f.severity, "")), Text(f.id), msg)
    if shown:
        console.print(table)
    else:
        console.print(table.title)
    passed = len(report.findings) - len(shown)
    if passed:
        console.print(Text(f"{plural(passed, 'check')} passed (--verbose lists them)", style="green"))
    console.print(Text(report.summary(), style="bold green" if report.ok else "bold red"))


def validate_cmd(
    target: str = typer.Argument(..., metavar="TARGET", click_type=WORD,
                                 help="An artifact id, or a module file (.ko, .ko.xz, .ko.zst, .ko.gz)."),
    kernel: str | None = typer.Option(None, "--kernel", "-k", autocompletion=complete.kernels, metavar="RELEASE",
                                      help="Target kernel release (default: the artifact's)."),
    symbols: list[str] = typer.Option([], "--symbols", metavar="FILE",
                                      help="Symbol source: Module.symvers, /proc/kallsyms copy, "
                                      "System.map or vmlinux (repeatable)."),
    cert: list[str] = typer.Option([], "--cert", metavar="FILE",
                                   help="Signing certificate, PEM or DER (repeatable); makes a "
                                   "valid signature mandatory."),
    strict: bool | None = typer.Option(None, "--strict/--no-strict", help="Skipped checks fail too "
                                          "(default: \\[validation] strict in kpipe.toml, else off)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List the checks that passed too."),
    json_out: bool = typer.Option(False, "--json", help="Print every finding as JSON."),
) -> None:
    """Validate a module or artifact for a kernel; exit 3 when it is invalid."""
    from kpipe.errors import UsageError

    path = Path(target)
    if path.is_file():
        ws = _workspace_or_none()
        if not kernel:
            raise UsageError("--kernel is required when validating a file",
                              hint="name the target release, e.g. one from `kpipe kernels list`")
        from kpipe.validation import validate_module

        if strict is None:
            strict = ws.settings.validation.strict if ws is not None else False
        report = validate_module(ws, path, kernel, symbol_files=symbols, certs=cert, strict=strict)
    else:
        from kpipe.artifacts import get_artifact
        from kpipe.validation import validate_and_record

        ws = state().workspace
        art = get_artifact(ws.store, target)
        # Recorded either way; only the artifact's own validation (its kernel, certificates, symbols and
        # the workspace's strictness) can change its status: a trial with other options never does.
        report = validate_and_record(ws, art, symbol_files=symbols, certs=cert, strict=strict, kernel=kernel)
    if json_out:
        print_json({**report.to_dict(), **({"own": report.own} if report.own is not None else {})})
    else:
        render_report(report, verbose)
        if report.own is False:
            from rich.text import Text

            state().console.print(Text(f"a trial with other options than {target}'s own validation: recorded; "
                                       "its status is unchanged", style="dim"))
    if not report.ok:
        # A KpipeError, not typer.Exit: main() runs click with standalone_mode=False, which returns
        # (and so loses) an Exit's code.
        from kpipe.errors import ValidationFailed

        # The first real error; a skipped check only when strict mode failed on skips alone.
        first = next((f for f in report.findings if f.severity == "error"),
                     next((f for f in report.findings if f.severity == "skipped"), None))
        raise ValidationFailed(report.summary() + (f"; first: {first.id}: {first.message}" if first else ""),
                               hint="see the findings above" if not json_out else None)


def register(app: typer.Typer) -> None:
    """Add `kpipe validate` to the root app."""
    app.command("validate")(validate_cmd)
