"""Rows for the audit table: plain tuples the CLI draws with Rich (or prints as text)."""

from __future__ import annotations

from collections.abc import Sequence

from kpipe.audit import HOST_ROW, AuditResult, HostAudit, PatchStatus

# Lower-case headers, as every table kpipe prints.
# boot: "persisted" (loaded again at boot), "live-only" (gone after a reboot), "-" for what is not loaded.
COLUMNS: tuple[str, ...] = ("host", "patch", "status", "boot", "kernel", "detail")

# A Rich style per status; the CLI applies it, this module stays Rich-free.
STATUS_STYLE: dict[str, str] = {
    "compliant": "green",
    "disabled": "yellow",
    "transition": "yellow",
    "missing": "red",
    "wrong_hash": "red",
    "unexpected": "red",
    "unexpected_taint": "magenta",
    "unreachable": "bold red",
}


def boot_of(h: HostAudit, r: PatchStatus) -> str:
    """What a reboot does to a verdict's patch: "persisted" (loaded again), "live-only" (gone), "-" (not loaded)."""
    if r.patch == HOST_ROW or r.enabled is None:
        return "-"
    return "persisted" if r.patch in h.persisted else "live-only"


def table_rows(result: AuditResult) -> list[tuple[str, str, str, str, str, str]]:
    """One (host, patch, status, boot, kernel, detail) tuple per verdict, hosts in order."""
    return [(h.host, r.patch if r.patch != HOST_ROW else "-", str(r.status), boot_of(h, r), h.kernel or "-", r.detail)
            for h in result.hosts for r in h.rows]


def summary_line(result: AuditResult) -> str:
    """'N hosts, M compliant; status counts' in one line."""
    counts = ", ".join(f"{k} {v}" for k, v in result.counts().items() if v)
    ok = sum(1 for h in result.hosts if h.compliant)
    return f"{len(result.hosts)} host{'' if len(result.hosts) == 1 else 's'}, {ok} compliant; {counts or 'no rows'}"


def render_text(result: AuditResult) -> str:
    """A plain-text table (for --output with the table format, and logs)."""
    text = _text_table(COLUMNS, table_rows(result)) + summary_line(result) + "\n"
    cves = cve_summary_rows(result)
    if cves:
        text += "\n" + _text_table(CVE_COLUMNS, cves)
    return text


def _text_table(columns: tuple[str, ...], body: Sequence[tuple[str, ...]]) -> str:
    rows = [columns, *body]
    # Control characters in host names or details would break the layout (and a terminal).
    rows = [tuple(_printable(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns) - 1)]
    # the last column is not padded: widths has one entry fewer than a row
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


# The CVE view: one row per CVE for the fleet, and one per host and CVE for `--cve`.
CVE_COLUMNS: tuple[str, ...] = ("cve", "severity", "fixed", "exposed", "unknown", "exposed hosts")
CVE_HOST_COLUMNS: tuple[str, ...] = ("host", "cve", "severity", "status", "kernel", "detail")
CVE_STYLE: dict[str, str] = {"fixed": "green", "exposed": "red", "unknown": "bold red",
                             "critical": "bold red", "high": "red", "medium": "yellow"}


def cve_summary_rows(result: AuditResult) -> list[tuple[str, ...]]:
    """One (cve, severity, fixed, exposed, unknown, exposed hosts) row per CVE; [] without a CVE view."""
    report = getattr(result, "cves", None)
    if report is None:
        return []
    return [(s.cve, s.severity, str(len(s.fixed_hosts)), str(len(s.exposed_hosts)), str(len(s.unknown_hosts)),
             ", ".join(s.exposed_hosts) or "-") for s in report.cves]


def cve_host_rows(result: AuditResult, cves: list[str], *, all_hosts: bool = False) -> list[tuple[str, ...]]:
    """(host, cve, severity, status, kernel, detail) for the hosts exposed (or unknown) to `cves`.

    With all_hosts, the fixed hosts too.
    """
    report = getattr(result, "cves", None)
    if report is None:
        return []
    return [(v.host, v.cve, v.severity, v.status, v.kernel or "-", v.detail) for v in report.verdicts
            if v.cve in cves and (all_hosts or v.status != "fixed")]


def _printable(s: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
