"""The audit as one static HTML page: a host x patch grid, summary counts, no external assets.

Rendered with Jinja2 from templates/audit.html.j2 with autoescaping ON, so a
hostile host name or detail is shown as text, never run as markup.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpipe.audit import HOST_ROW, STATUSES, AuditResult, PatchStatus
from kpipe.report.table import boot_of
from kpipe.taint import taint_letters

if TYPE_CHECKING:  # Jinja2 is imported when a page is rendered
    import jinja2

TEMPLATE_DIR = Path(__file__).parent / "templates"

# Background colour per status (the legend prints them too).
STATUS_COLOUR: dict[str, str] = {
    "compliant": "#2e7d32",
    "disabled": "#f9a825",
    "transition": "#ef6c00",
    "missing": "#c62828",
    "wrong_hash": "#6a1b9a",
    "unexpected": "#ad1457",
    "unexpected_taint": "#4527a0",
    "unreachable": "#424242",
}


def _environment() -> jinja2.Environment:
    import jinja2

    # autoescape=True for every template: host names, patch names and
    # details come from inventories and hosts, i.e. from outside.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def grid(result: AuditResult) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns (host checks first, then patches) and one row per host with a cell per column."""
    has_host_rows = any(r.patch == HOST_ROW for r in result.rows)
    columns = (["(host)"] if has_host_rows else []) + result.patches
    rows = []
    for h in result.hosts:
        cells: dict[str, list[PatchStatus]] = {}
        boots: dict[str, str] = {}
        for r in h.rows:
            column = "(host)" if r.patch == HOST_ROW else r.patch
            cells.setdefault(column, []).append(r)
            if boot_of(h, r) != "-":
                boots[column] = boot_of(h, r)
        rows.append(
            {
                "host": h.host,
                "kernel": h.kernel,
                "status": h.status,
                "tainted": "" if h.tainted is None else f"{h.tainted} {taint_letters(h.tainted)}".strip(),
                "cells": [cells.get(c, []) for c in columns],
                "boots": [boots.get(c, "") for c in columns],  # persisted / live-only where loaded
            }
        )
    return columns, rows


def scope(result: AuditResult, limit: str | None = None) -> dict[str, Any]:
    """What the page covers: the host pattern, and the rollouts and artifacts its desired state comes from."""
    desired = [r.desired for r in result.rows if r.desired is not None]
    return {
        "limit": limit or "all",
        "rollouts": sorted({d.source.removeprefix("rollout ") for d in desired if d.source.startswith("rollout ")}),
        "artifacts": sorted({d.artifact_id for d in desired if d.artifact_id}),
    }


def render_html(result: AuditResult, title: str = "kpipe live-patch audit", *, limit: str | None = None) -> str:
    """The whole page as a string (UTF-8 text, inline CSS, no scripts); `limit` is the audit's host pattern."""
    columns, rows = grid(result)
    counts = result.counts()
    host_counts = {s: 0 for s in STATUSES}
    for h in result.hosts:
        host_counts[h.status] += 1
    return _environment().get_template("audit.html.j2").render(
        title=title,
        scope=scope(result, limit),
        shown_statuses=[s for s in STATUSES if host_counts[s] or counts[s]],
        empty_statuses=[s for s in STATUSES if not (host_counts[s] or counts[s])],
        generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(result.generated_at)),
        sources=list(result.sources),
        columns=columns,
        rows=rows,
        counts=counts,
        host_counts=host_counts,
        hosts_total=len(result.hosts),
        hosts_compliant=sum(1 for h in result.hosts if h.compliant),
        colours=STATUS_COLOUR,
        statuses=STATUSES,
        cves=cve_section(result),
    )


def cve_section(result: AuditResult) -> dict[str, Any] | None:
    """What the page's CVE section shows: per CVE the fleet counts and exposed hosts; None without a CVE view."""
    report = getattr(result, "cves", None)
    if report is None:
        return None
    return {
        "summary": [s.to_dict() for s in report.cves],
        "exposed": [v.to_dict() for v in report.verdicts if v.status != "fixed"],
        "errors": list(report.errors),
    }
