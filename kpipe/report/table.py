"""Rows for the audit table: plain tuples the CLI draws with Rich (or prints as text)."""

from __future__ import annotations

from kpipe.audit import HOST_ROW, AuditResult

COLUMNS: tuple[str, ...] = ("HOST", "PATCH", "STATUS", "KERNEL", "DETAIL")

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


def table_rows(result: AuditResult) -> list[tuple[str, str, str, str, str]]:
    """One (host, patch, status, kernel, detail) tuple per verdict, hosts in order."""
    rows = []
    for h in result.hosts:
        for r in h.rows:
            rows.append((h.host, r.patch if r.patch != HOST_ROW else "-", r.status, h.kernel or "-", r.detail))
    return rows


def summary_line(result: AuditResult) -> str:
    """'N hosts, M compliant; status counts' in one line."""
    counts = ", ".join(f"{k} {v}" for k, v in result.counts().items() if v)
    ok = sum(1 for h in result.hosts if h.compliant)
    return f"{len(result.hosts)} hosts, {ok} compliant; {counts or 'no rows'}"


def render_text(result: AuditResult) -> str:
    """A plain-text table (for --output with the table format, and logs)."""
    rows = [COLUMNS, *table_rows(result)]
    # Control characters in host names or details would break the layout (and a terminal).
    rows = [tuple(_printable(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n" + summary_line(result) + "\n"


def _printable(s: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
