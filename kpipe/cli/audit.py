"""kpipe verify and kpipe audit: desired live-patch state against what the hosts show.

Desired state: what completed (or partly completed) rollouts applied, minus
what was rolled back, plus an optional desired-state file (`--desired`, or
`[audit] desired` in kpipe.toml; format in kpipe/desired.py). Observed state:
only what each host reports now over SSH (sysfs, /sys/module, installed
module checksums, taint), never the journal.

Exit codes: `verify` exits 0 when every selected host is compliant and 1
otherwise (an unreachable host is not compliant). `audit` exits 0 once the
report is written, whatever it says (`--strict`: 1 if anything is not
compliant). `audit --cve CVE-...` exits 1 when a selected host is exposed to
that CVE or could not be read, 0 when none is. Both exit 4 for a malformed
desired-state file or inventory (and `--cve` for a malformed id or a recipe
that cannot be read) and 5 when --limit matches no host (`--cve`: a CVE no
recipe declares). Every run is kept in the store's `audits` table
(the audit trail).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from kpipe.cli import complete
from kpipe.cli.context import plural

if TYPE_CHECKING:  # pragma: no cover
    from kpipe.audit import AuditResult
    from kpipe.workspace import Workspace

_LIMIT = typer.Option(None, "--limit", "-l", autocompletion=complete.host_patterns, metavar="PATTERN",
                      help="Ansible host pattern: group, host, glob, ~regex, a:b, a:&b, a:!b.")
_DESIRED = typer.Option(None, "--desired", "-d", metavar="FILE",
                        help="Desired-state YAML (hosts/patterns -> patches required/forbidden).")
_FORKS = typer.Option(None, "--forks", "-f", metavar="N", min=1, max=1000,
                      help="Hosts in flight at once (default: 50, or forks in the ssh section of kpipe.toml).")
_WORKERS = typer.Option(None, "--workers", metavar="N", min=1, max=256,
                        help="Worker processes for the SSH fan-out (default: workers in the fleet section of "
                             "kpipe.toml, else one per core; 1 = in-process).")
_SETTLE = typer.Option(5.0, "--settle", metavar="SECONDS", min=0.0, max=600.0,
                       help="Seconds to wait before re-reading a host in transition (then it counts as stuck).")


def _print_table(result: AuditResult) -> None:
    from rich.table import Table
    from rich.text import Text

    from kpipe.cli.context import state
    from kpipe.report.table import COLUMNS, STATUS_STYLE, summary_line, table_rows

    def cell(value: str, style: str = "") -> Text:
        # Text(), not markup: host names and details come from outside ("[bold]" stays literal).
        return Text("".join(c if c.isprintable() else repr(c)[1:-1] for c in value), style=style)

    table = Table(title=Text(summary_line(result)), title_justify="left")
    for col in COLUMNS:
        table.add_column(col, overflow="fold")
    for host, patch, status, boot, kernel, detail in table_rows(result):
        table.add_row(cell(host), cell(patch), cell(status, STATUS_STYLE.get(status, "")), cell(boot), cell(kernel),
                      cell(detail))
    state().console.print(table)


def _print_cves(result: AuditResult, cves: list[str]) -> None:
    """The CVE view under the audit table: per CVE the fleet counts, or (with --cve) the exposed hosts."""
    from rich.table import Table
    from rich.text import Text

    from kpipe.cli.context import state
    from kpipe.report.table import (
        CVE_COLUMNS,
        CVE_HOST_COLUMNS,
        CVE_STYLE,
        cve_host_rows,
        cve_summary_rows,
    )

    def cell(value: str, style: str = "") -> Text:
        return Text("".join(c if c.isprintable() else repr(c)[1:-1] for c in value), style=style)

    console = state().console
    if cves:
        for s in result.cves.cves:
            console.print(Text(f"{s.cve} ({s.severity}): {len(s.exposed_hosts)} exposed, {len(s.fixed_hosts)} fixed, "
                               f"{len(s.unknown_hosts)} unknown; {s.summary}"))
        rows = cve_host_rows(result, cves)
        if not rows:
            console.print(Text(f"no selected host is exposed to {', '.join(cves)}", style="green"))
            return
        table = Table(title="exposed hosts", title_justify="left")
        for col in CVE_HOST_COLUMNS:
            table.add_column(col, overflow="fold")
        for host, cve, severity, status, kernel, detail in rows:
            table.add_row(cell(host), cell(cve), cell(severity, CVE_STYLE.get(severity, "")),
                          cell(status, CVE_STYLE.get(status, "")), cell(kernel), cell(detail))
        console.print(table)
        return
    rows = cve_summary_rows(result)
    if not rows:
        return
    table = Table(title="CVEs the recipes fix", title_justify="left")
    for col in CVE_COLUMNS:
        table.add_column(col, overflow="fold")
    for cve, severity, fixed, exposed, unknown, hosts in rows:
        table.add_row(cell(cve), cell(severity, CVE_STYLE.get(severity, "")), cell(fixed),
                      cell(exposed, "red" if exposed != "0" else ""), cell(unknown), cell(hosts))
    console.print(table)


def _check_cve_ids(cves: list[str]) -> list[str]:
    """The --cve values, upper-cased; ConfigError on one that is not CVE-YYYY-NNNN."""
    from kpipe.errors import ConfigError
    from kpipe.recipes.schema import CVE_RE

    out = []
    for raw in cves:
        cve = raw.strip().upper()
        if not CVE_RE.fullmatch(cve):
            raise ConfigError(f"--cve {raw!r} is not a CVE id", hint="write CVE-YYYY-NNNN, e.g. CVE-2024-12345")
        if cve not in out:
            out.append(cve)
    return out


def _narrow_to_cves(result: AuditResult, cves: list[str]) -> AuditResult:
    """The result with its CVE view narrowed to `cves`; NotFoundError for a CVE no recipe declares."""
    from dataclasses import replace

    from kpipe.cve import CveReport
    from kpipe.errors import ConfigError, NotFoundError
    from kpipe.recipes.problems import _did_you_mean

    report = result.cves if result.cves is not None else CveReport()
    if report.errors:
        # A recipe that cannot be read may declare this CVE too: the answer would be incomplete.
        more = f" (+{len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        raise ConfigError(f"{report.errors[0]}{more}",
                          hint="fix the recipe (`kpipe recipe lint`) so that its fixes count")
    known = [s.cve for s in report.cves]
    for cve in cves:
        if cve not in known:
            raise NotFoundError(f"no recipe declares a fix for {cve}",
                                hint=_did_you_mean(cve, known) + f"declared: {', '.join(known) or 'none'} "
                                     "(recipes list them under `fixes:`)")
    return replace(result, cves=report.only(cves))


def _fail_if_exposed(result: AuditResult, cves: list[str]) -> None:
    from kpipe.errors import ExitCode, KpipeError

    bad = sorted({v.host for v in result.cves.verdicts if v.cve in cves and v.status != "fixed"})
    if bad:
        raise KpipeError(f"{plural(len(bad), 'host')} exposed to {', '.join(cves)} or not read: {', '.join(bad[:10])}"
                         + (" ..." if len(bad) > 10 else ""),
                         hint="roll out the recipe's patch to them (`kpipe rollout start`), then audit again",
                         exit_code=ExitCode.FAILURE)


def _warn_recipe_errors(result: AuditResult) -> None:
    from kpipe.cli.context import state

    for problem in getattr(result.cves, "errors", ()) if result.cves is not None else ():
        state().err_console.print(f"warning: CVE view incomplete: {problem}", markup=False, highlight=False)


def _keep(ws: Workspace, result: AuditResult, command: str, limit: str | None) -> None:
    # The audit trail (table `audits`): a failure to record must not hide the result.
    from kpipe.fleet.factstore import record_audit

    try:
        record_audit(ws.store, result, command=command, limit=limit)
    except Exception as e:  # noqa: BLE001
        from kpipe.cli.context import state

        state().err_console.print(f"warning: audit not recorded in the store: {e}", markup=False)


def _fail_unless_compliant(result: AuditResult) -> None:
    # A KpipeError, not typer.Exit: main() runs the app with standalone_mode=False,
    # where click returns an Exit's code instead of exiting with it.
    from kpipe.errors import ExitCode, KpipeError

    if not result.compliant:
        bad = [h.host for h in result.hosts if not h.compliant]
        raise KpipeError(f"{len(bad)} of {plural(len(result.hosts), 'host')} not compliant: {', '.join(bad[:10])}"
                         + (" ..." if len(bad) > 10 else ""),
                         hint="see the table / JSON for each host's status and detail",
                         exit_code=ExitCode.FAILURE)


def _audit_with_workers(ws: Any, limit: str | None, desired: str | None, forks: int | None, workers: int | None,
                        settle: float) -> Any:
    """run_audit over a pool with the chosen worker processes (closed afterwards)."""
    from kpipe.fleet.auditing import run_audit
    from kpipe.fleet.observe import pool_for

    with pool_for(ws, forks, workers) as pool:
        return run_audit(ws, limit, desired_file=desired, forks=forks, settle=settle, pool=pool)


def verify(
    limit: str | None = _LIMIT,
    as_json: bool = typer.Option(False, "--json", help="Print the audit as JSON instead of a table."),
    forks: int | None = _FORKS,
    workers: int | None = _WORKERS,
    desired: str | None = _DESIRED,
    settle: float = _SETTLE,
) -> None:
    """Read every selected host's live patches over SSH and check them against the desired state
    (exit 1 if any host is not compliant)."""
    from kpipe.cli.context import print_json, state

    ws = state().workspace
    result = _audit_with_workers(ws, limit, desired, forks, workers, settle)
    _keep(ws, result, "verify", limit)
    if as_json:
        print_json(result.to_dict())
    else:
        _print_table(result)
    _fail_unless_compliant(result)


def audit(
    limit: str | None = _LIMIT,
    desired: str | None = _DESIRED,
    fmt: str = typer.Option("table", "--format", "-F", autocompletion=complete.audit_formats, metavar="FORMAT",
                            help="table | json | junit | prometheus | html", case_sensitive=False),
    output: str | None = typer.Option(None, "--output", "-o", metavar="FILE",
                                         help="Write the report here (atomically: temp file + rename)."),
    forks: int | None = _FORKS,
    workers: int | None = _WORKERS,
    settle: float = _SETTLE,
    strict: bool = typer.Option(False, "--strict", help="Exit 1 if any host is not compliant."),
    cve: list[str] | None = typer.Option(None, "--cve", metavar="CVE-YYYY-NNNN",  # noqa: B008 -- typer declares options in defaults
                                            help="Who is still exposed to this CVE (repeatable): the table lists the "
                                                 "exposed hosts; exit 1 if any host is exposed or unreadable."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: the same as --format json."),
) -> None:
    """Report desired vs observed live-patch state per host and patch, as a table, JSON, JUnit XML,
    Prometheus text or HTML."""
    from pathlib import Path

    from kpipe.cli.context import state
    from kpipe.errors import ConfigError
    from kpipe.report import FORMATS, render, write_atomic

    fmt = fmt.lower()
    if as_json and fmt not in ("table", "json"):
        from kpipe.errors import UsageError

        raise UsageError(f"--json and --format {fmt} ask for two formats", hint="give one of them")
    if as_json:
        fmt = "json"
    if fmt not in FORMATS:
        from kpipe.errors import UsageError

        raise UsageError(f"--format {fmt!r} is unknown", hint=f"use one of {', '.join(FORMATS)}")
    out_path = Path(output) if output else None
    if out_path is not None and not out_path.parent.is_dir():
        raise ConfigError(f"--output {output}: folder {out_path.parent} does not exist")
    cves = _check_cve_ids(cve or [])
    ws = state().workspace
    result = _audit_with_workers(ws, limit, desired, forks, workers, settle)
    _keep(ws, result, "audit", limit)
    if cves:
        result = _narrow_to_cves(result, cves)
    else:
        _warn_recipe_errors(result)
    if out_path is None and fmt == "table":
        if not cves:
            _print_table(result)
        _print_cves(result, cves)
    else:
        text = render(result, fmt, limit=limit)
        if out_path is None:
            import sys

            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            try:
                write_atomic(out_path, text)
            except OSError as e:
                raise ConfigError(f"--output {output}: cannot write: {e.strerror}") from None
            state().err_console.print(f"wrote {fmt} report to {out_path}", highlight=False, markup=False)
    if cves:
        _fail_if_exposed(result, cves)
    if strict:
        _fail_unless_compliant(result)


def register(app: typer.Typer) -> None:
    """Add `kpipe verify` and `kpipe audit` to the root app."""
    app.command("verify")(verify)
    app.command("audit")(audit)
